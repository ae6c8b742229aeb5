"""docs/openapi.json: a well-formed OpenAPI 3.1 document, served by the
daemon as is, that lists exactly the routes of the neutral API."""
import glob
import json
import math
import os
import re

import pytest

from harness import TOP_SRCDIR

DOC_PATH = os.path.join(TOP_SRCDIR, "docs", "openapi.json")
APP_C = os.path.join(TOP_SRCDIR, "gateway", "app.c")
DIRECTORY = "/.well-known/mimi-protocol-directory"
SELF = "/v1/openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
ROUTE_RE = re.compile(r'^\s*\{\s*"([A-Z]+)"\s*,\s*"([^"]+)"\s*,\s*(\w+)\s*,\s*(CW_AUTH_\w+)\s*,', re.M)


@pytest.fixture(scope="module")
def doc():
    with open(DOC_PATH, encoding="utf-8") as f:
        return json.load(f)


def resolve(doc, ref):
    """The target of a local $ref ("#/a/b~1c"), or KeyError."""
    assert ref.startswith("#/"), f"non-local $ref {ref}"
    node = doc
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(token)]
        else:
            node = node[token]
    return node


def deref(doc, node):
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(doc, node["$ref"])
    return node


def walk(node, where=""):
    """(json pointer, dict) for every object in node."""
    if isinstance(node, dict):
        yield where, node
        for k, v in node.items():
            yield from walk(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{where}/{i}")


def operations(doc, section="paths"):
    """(METHOD, path or webhook name, operation) of the document."""
    for path, item in doc.get(section, {}).items():
        for m in METHODS:
            if m in item:
                yield m.upper(), path, item[m]


def route_table():
    """(METHOD, pattern, auth) of gateway/app.c's app_routes[]."""
    with open(APP_C, encoding="utf-8") as f:
        src = f.read()
    m = re.search(r"app_routes\[\]\s*=\s*\{(.*?)\n\};", src, re.S)
    assert m, "app_routes[] not found in gateway/app.c"
    routes = [(r.group(1), r.group(2), r.group(4)) for r in ROUTE_RE.finditer(m.group(1))]
    assert routes, "no routes parsed from app_routes[]"
    return routes


def api_routes():
    return {(meth, path): auth for meth, path, auth in route_table()
            if (path.startswith("/v1/") or path == DIRECTORY) and path != SELF}


def check_schema(doc, schema, value, where="$"):
    """A small subset of JSON Schema: $ref, allOf, type, const, enum, required,
    properties, items. Returns a list of faults."""
    schema = deref(doc, schema)
    faults = []
    for sub in schema.get("allOf", []):
        faults += check_schema(doc, sub, value, where)
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        py = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
              "number": (int, float), "integer": int}
        ok = any(isinstance(value, py[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                 for t in types)
        if not ok:
            return faults + [f"{where}: {value!r} is not of type {types}"]
    if "const" in schema and value != schema["const"]:
        faults.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        faults.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                faults.append(f"{where}: {name} is missing")
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                faults += check_schema(doc, sub, value[name], f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            faults += check_schema(doc, schema["items"], v, f"{where}[{i}]")
    return faults


def query_400_faults(doc, authenticated):
    """The operations of doc that authenticated(method, path) says check
    credentials but that do not document the 400 invalid_query each of
    them answers to a query that is not UTF-8 (gateway/http.c)."""
    faults = []
    for method, path, op in operations(doc):
        if authenticated(method, path):
            resp = deref(doc, op["responses"].get("400", {}))
            if "invalid_query" not in [c for _, n in walk(resp) for c in n.get("code", {}).get("enum", [])]:
                faults.append((method, path))
    return faults


def too_large_faults(doc):
    """The operations of doc that do not document the 413 too_large the
    daemon answers to a request body past server.max_body_bytes
    (gateway/http.c, from the Content-Length, before the credentials and
    any route's handler): every operation, one that takes no body (a GET,
    a DELETE) too. Until the thirty-sixth session only those with a
    requestBody were asked, and the others left it out."""
    faults = []
    for method, path, op in operations(doc):
        resp = deref(doc, op["responses"].get("413", {}))
        if "too_large" not in [c for _, n in walk(resp) for c in n.get("code", {}).get("enum", [])]:
            faults.append((method, path))
    return faults



def concurrent_change_faults(doc, reads=()):
    """The operations of doc that change something (every method but GET,
    less those named in reads) and do not document the 409 conflict a
    write the database refuses by a constraint is answered (a unique or
    foreign key a concurrent request's commit took: app_reply_store_error,
    gateway/app.c). Until the forty-fifth session only those with a 409
    of their own listed one."""
    faults = []
    for method, path, op in operations(doc):
        if method == "GET" or (method, path) in reads:
            continue
        resp = deref(doc, op["responses"].get("409", {}))
        codes = [c for _, n in walk(resp) for c in n.get("code", {}).get("enum", [])]
        if "conflict" not in codes or "concurrent request" not in resp.get("description", ""):
            faults.append((method, path))
    return faults

def too_large_answers(daemon, doc):
    """Faults if an operation of doc does not answer a body past
    server.max_body_bytes (announced by its Content-Length, never sent)
    with a 413 too_large it documents; the operations asked."""
    from test_peer_auth import read_answer, send_head
    faults, asked = [], 0
    for method, path, op in operations(doc):
        target = re.sub(r"\{(\w+)\}", "x", path)
        s = send_head(daemon.port, method, target, [("Content-Type", "application/json"),
                                                    ("Content-Length", str(1024 * 1024 + 1))])
        try:
            status, _, body, _ = read_answer(s, 10)
        finally:
            s.close()
        asked += 1
        if status != 413:
            faults.append(f"{method} {path}: {status} {body[:200]!r}")
            continue
        faults += documented(doc, method, path, Answer(status, json.loads(body)))
    return faults, asked


# ------------------------------------------------------------ the document

def test_is_openapi_3_1(doc):
    assert re.fullmatch(r"3\.1\.\d+", doc["openapi"]), doc["openapi"]
    assert doc["info"]["title"] and doc["info"]["version"]
    assert "x-causeway-routes" not in json.dumps(doc)


def test_file_is_two_space_indented_json():
    with open(DOC_PATH, encoding="utf-8") as f:
        text = f.read()
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"


def test_every_ref_resolves(doc):
    refs = [(where, node["$ref"]) for where, node in walk(doc) if "$ref" in node]
    assert refs
    for where, ref in refs:
        try:
            resolve(doc, ref)
        except (KeyError, IndexError, ValueError) as ex:
            pytest.fail(f"{where}: $ref {ref} does not resolve ({ex!r})")


def test_every_operation_has_responses(doc):
    ops = list(operations(doc)) + list(operations(doc, "webhooks"))
    assert ops
    for method, path, op in ops:
        assert op.get("summary") and op.get("description"), (method, path)
        assert op.get("responses"), (method, path)
        for status, resp in op["responses"].items():
            assert deref(doc, resp).get("description"), (method, path, status)


def test_errors_are_problem_json_with_codes(doc):
    for method, path, op in operations(doc):
        for status, resp in op["responses"].items():
            if not re.fullmatch(r"[45]\d\d", status):
                continue
            content = deref(doc, resp).get("content", {})
            assert list(content) == ["application/problem+json"], (method, path, status)
            schema = content["application/problem+json"]["schema"]
            codes = [c for _, node in walk(schema) for c in node.get("code", {}).get("enum", [])]
            assert codes, (method, path, status, "no code enum")


def test_problem_codes_are_the_codes_of_the_code(doc):
    """Every documented code occurs as a string literal in the C sources."""
    literals = set()
    for pattern in ("gateway/*.c", "adapters/peer/*.c", "adapters/peer/*.h"):
        for name in glob.glob(os.path.join(TOP_SRCDIR, pattern)):
            with open(name, encoding="utf-8", errors="replace") as f:
                literals |= set(re.findall(r'"([a-z_]+)"', f.read()))
    documented = {c for _, node in walk(doc) for c in node.get("code", {}).get("enum", [])}
    assert documented and documented <= literals, documented - literals


# The sources of the answers a peer's request may get (the routes of
# docs/openapi.json, the front's, the links of gateway/media.c's files).
PEER_SOURCES = ("adapters/peer/peer_api.c", "adapters/peer/peer_pull.c", "adapters/peer/peer_social.c",
                "adapters/peer/peer_media.c", "adapters/peer/httpsig.c", "gateway/http.c", "gateway/app.c")
# Codes of the admin API's alone (gateway/app.c's admin_authorize).
ADMIN_ONLY = {"admin_disabled", "forbidden"}
# Given outside the document's operations: the front's answer to a path or
# a method it does not serve, or to a request line and headers that frame
# no request it takes, and a /media/ capability link's (its media_refused
# a token's too since the fifty-first session: GET /v1/media/{token}).
OUTSIDE_OPERATIONS = {"not_found", "method_not_allowed", "invalid_request", "not_implemented",
                      "expired_media", "media_mismatch"}


def emitted_problems():
    """(status, code) of every problem the peer API's sources give: the
    calls that pass a status and then a code (cw_req_problem, app_job_fail,
    item_fail, problem_item), a code by its macro (CONFLICT_RETRY), and a
    result's .status/.code pair."""
    defs, srcs = {}, []
    for name in PEER_SOURCES + ("adapters/peer/event.h",):
        with open(os.path.join(TOP_SRCDIR, name), encoding="utf-8") as f:
            src = f.read()
        defs.update(re.findall(r'#define\s+([A-Z_]+)\s+"([a-z_]+)"', src))
        srcs.append(src)
    pairs = set()
    for src in srcs[:-1]:
        for m in re.finditer(r'\b([1-5]\d\d),\s*(?:\.code = )?(?:"([a-z_]+)"|([A-Z][A-Z_]+)\b)', src):
            code = m.group(2) or defs.get(m.group(3))
            if code:
                pairs.add((int(m.group(1)), code))
    return pairs


def test_the_problem_codes_are_those_the_code_gives(doc):
    """The codes docs/openapi.json gives its operations, each under the
    status it comes with, and those docs/interop-api.md's "Errors" lists,
    are exactly the (status, code) pairs the peer API's sources give, no
    more and none left out.  Until the forty-fifth session nothing
    compared them: not_found and method_not_allowed (a path or method not
    served) were named nowhere, expired_media and media_mismatch (a /media/
    link's) only under "Media"."""
    code = emitted_problems()
    assert len(code) >= 20 and (409, "in_progress") in code and (413, "too_large") in code, code
    peer = {(st, c) for st, c in code if c not in ADMIN_ONLY}
    assert {c for _, c in code} >= ADMIN_ONLY | OUTSIDE_OPERATIONS, code
    documented = set()
    for _, _, op in operations(doc):
        for status, resp in op["responses"].items():
            if not re.fullmatch(r"[45]\d\d", status):
                continue
            schema = deref(doc, resp)["content"]["application/problem+json"]["schema"]
            nodes = [deref(doc, n) for _, n in walk(schema)] + [deref(doc, schema)]
            documented |= {(int(status), c) for n in nodes for _, m in walk(n)
                           for c in m.get("code", {}).get("enum", [])}
    # the codes a batch item's result carries (200) are some of these
    items = {c for _, node in walk(doc["components"]["schemas"]["BatchRefused"])
             for c in node.get("code", {}).get("enum", [])}
    assert items and items <= {c for _, c in peer}, items
    expected = {(st, c) for st, c in peer if c not in OUTSIDE_OPERATIONS}
    assert documented == expected, {"undocumented": sorted(expected - documented),
                                    "never given": sorted(documented - expected)}
    with open(os.path.join(TOP_SRCDIR, "docs", "interop-api.md"), encoding="utf-8") as f:
        prose = f.read()
    errors = re.search(r"^## Errors\n(.*?)^## ", prose, re.S | re.M)
    assert errors, "no Errors section in docs/interop-api.md"
    listed = set()
    for m in re.finditer(r"((?:`[a-z_]+`\s*/\s*)*`[a-z_]+`)\s+\((\d{3})\b", errors.group(1)):
        listed |= {(int(m.group(2)), c) for c in re.findall(r"`([a-z_]+)`", m.group(1))}
    assert listed == peer, {"not in the list": sorted(peer - listed), "never given": sorted(listed - peer)}


def test_path_parameters_are_declared(doc):
    for path, item in doc["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for m in METHODS:
            if m not in item:
                continue
            params = [deref(doc, p) for p in item.get("parameters", []) + item[m].get("parameters", [])]
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == names, (m, path, declared)
            assert all(p["required"] for p in params if p["in"] == "path"), (m, path)


def test_documents_exactly_the_routes_of_the_daemon(doc):
    routes = api_routes()
    documented = {(m, p) for m, p, _ in operations(doc)}
    assert documented == set(routes), {"undocumented": sorted(set(routes) - documented),
                                       "not served": sorted(documented - set(routes))}


def test_security_matches_the_route_auth(doc):
    routes = api_routes()
    for method, path, op in operations(doc):
        security = op.get("security", doc.get("security", []))
        schemes = {name for req in security for name in req}
        if routes[(method, path)] == "CW_AUTH_NONE":
            assert not schemes, (method, path)
        else:
            assert {"bearer", "httpMessageSignature"} <= schemes, (method, path)
            assert set(doc["components"]["securitySchemes"]) >= schemes


def test_every_authenticated_operation_documents_invalid_query(doc):
    """Until the twenty-first session only GET /v1/events said so."""
    routes = api_routes()
    assert not query_400_faults(doc, lambda m, p: routes[(m, p)] != "CW_AUTH_NONE")


def test_every_authenticated_operation_documents_invalid_header(doc):
    """Every signed request's headers are checked before its handler
    (a Content-Type or Idempotency-Key sent twice, a folded line: 400
    invalid_header, docs/interop-api.md): until the thirty-fourth session
    the GETs, the rename and the batch did not say so."""
    routes = api_routes()
    faults = []
    for method, path, op in operations(doc):
        if routes[(method, path)] != "CW_AUTH_NONE":
            resp = deref(doc, op["responses"].get("400", {}))
            if "invalid_header" not in [c for _, n in walk(resp) for c in n.get("code", {}).get("enum", [])]:
                faults.append((method, path))
    assert not faults, faults


def test_every_operation_documents_too_large(doc):
    """Until the thirty-second session PATCH /v1/rooms/{room} did not; until
    the thirty-sixth no operation without a body did (GET /v1/events, GET
    /v1/rooms/{room}, ...), though each answers it (the
    TooLargeWithoutBody response)."""
    assert not too_large_faults(doc)



def test_every_change_documents_the_409_of_a_concurrent_change(doc):
    """A write the database refuses by a constraint (another request's
    commit came between the checks and the write) is 409 conflict on every
    route that writes (docs/interop-api.md, "Errors"); discovery only
    reads."""
    assert not concurrent_change_faults(doc, reads={("POST", "/v1/identifiers/query")})

# ------------------------------------------------------------ the daemon

def test_daemon_serves_the_document(daemon, doc):
    r = daemon.get(SELF)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].split(";")[0].strip() == "application/json"
    assert r.json() == doc


def test_unauthenticated_gets_match_their_schema(daemon, doc):
    checked = 0
    for method, path, op in operations(doc):
        if method != "GET" or "{" in path or op.get("security", doc.get("security")):
            continue  # only the operations a caller without credentials may use
        r = daemon.get(path)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["Content-Type"].split(";")[0].strip() == "application/json"
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
        faults = check_schema(doc, schema, r.json())
        assert not faults, (path, faults)
        checked += 1
    assert checked >= 1


def test_the_directory_says_what_the_documents_say(daemon, doc):
    """The directory's lists and limits are what docs/interop-api.md and
    docs/openapi.json say of them: its features the ones the endpoints
    row names, its event and content types the document's enums, its
    endpoints the routes served, its limits the document's bounds of an
    event (parts, attachments, a part's body, the values and the batch),
    its signature's components those of the Signature-Input the page
    shows."""
    d = daemon.get(DIRECTORY).json()
    with open(os.path.join(TOP_SRCDIR, "docs", "interop-api.md"), encoding="utf-8") as f:
        prose = f.read()
    row = re.search(r"`features` \(what this profile does: ([^)]*)\)", prose)
    assert row, "the directory's features not found in docs/interop-api.md"
    assert re.findall(r"`([a-z]+)`", row.group(1)) == d["features"], (row.group(1), d["features"])
    schemas = doc["components"]["schemas"]
    described = schemas["Directory"]["properties"]["features"]["description"]
    assert re.findall(r"\b[a-z]+\b", described.split(":", 1)[1]) == d["features"], described
    assert d["event_types"] == schemas["Event"]["properties"]["type"]["enum"]
    assert d["content_types"] == schemas["Part"]["properties"]["type"]["enum"]
    served = {path for _, path, _ in route_table()}
    assert {p for k, p in d["endpoints"].items() if k != "notify"} == {p for p in served if p.startswith("/v1/")}, \
        d["endpoints"]
    lim = d["limits"]
    assert set(lim) == set(schemas["Directory"]["properties"]["limits"]["properties"]), lim
    content = schemas["EventContent"]["properties"]
    assert (content["parts"]["maxItems"], content["attachments"]["maxItems"]) == (lim["max_parts"],
                                                                               lim["max_attachments"])
    assert f"At most {lim['max_body_bytes']} bytes" in schemas["Part"]["properties"]["body"]["description"]
    assert f"in one event, {lim['max_event_values']};" in \
        schemas["Directory"]["properties"]["limits"]["properties"]["max_event_values"]["description"]
    assert f"**At most {lim['max_event_values']} JSON values** per event" in prose
    assert f"(rooms.max_members, {lim['max_room_members']} by default)" in \
        schemas["Directory"]["properties"]["limits"]["properties"]["max_room_members"]["description"]
    assert f"up to `peer.max_batch` events ({lim['max_batch_events']} by default;" in prose
    assert lim["max_request_bytes"] == 1024 * 1024 and "`server.max_body_bytes` (1 MiB" in prose
    sig = re.search(r'Signature-Input: sig1=\(([^)]*)\)', prose)
    assert sig and re.findall(r'"([^"]+)"', sig.group(1)) == d["signatures"]["components"], d["signatures"]


def config_defaults():
    """{"section.key": default text} of gateway/conf.c's table."""
    with open(os.path.join(TOP_SRCDIR, "gateway", "conf.c"), encoding="utf-8") as f:
        src = f.read()
    return {f"{s}.{k}": v for s, k, v in re.findall(r'\{ "(\w+)", "(\w+)", CFG_\w+, OFF\(\w+\), "([^"]*)"', src)}


def test_the_defaults_the_peer_documents_give_are_the_codes():
    """The defaults docs/interop-api.md and docs/openapi.json give of the
    settings a peer meets are those of the code (gateway/conf.c,
    policy_settings_defaults): until the forty-fifth session the notify
    webhook said dispatcher.batch_max was 100 (250 since the thirtieth),
    the batch took a fixed 256 events (peer.max_batch since the
    twenty-first), and a consent request expired after a fixed 7 days."""
    conf = config_defaults()
    with open(os.path.join(TOP_SRCDIR, "gateway", "policy_live.c"), encoding="utf-8") as f:
        live = f.read()
    policy = {k: math.prod(int(n) for n in v.split("*"))
              for k, v in re.findall(r"s->(\w+) = ([0-9][0-9 *]*);", live)}
    assert len(conf) > 50 and policy["peer_updates_per_minute"] > 0, (conf, policy)

    def size(v):
        n, unit = re.fullmatch(r"(\d+)(MiB|KiB)", v).groups()
        return f"{n} {unit}"
    days = policy["held_expiry_s"] // 86400
    assert days * 86400 == policy["held_expiry_s"]
    with open(os.path.join(TOP_SRCDIR, "docs", "interop-api.md"), encoding="utf-8") as f:
        prose = " ".join(f.read().split())
    claims = [
        f"`dispatcher.typing_stale_ms` ({int(conf['dispatcher.typing_stale_ms']) // 1000} s;",
        f"`dispatcher.batch_max` ({conf['dispatcher.batch_max']}) events",
        f"`server.max_body_bytes` ({size(conf['server.max_body_bytes'])}:",
        f"`peer.max_batch` events ({conf['peer.max_batch']} by default;",
        f"`peer.max_long_polls` requests waiting at once in one daemon process (default "
        f"{conf['peer.max_long_polls']};",
        f"`server.media_max_bytes` ({size(conf['server.media_max_bytes'])})",
        f"the default {int(conf['peer.replay_cache_entries']):,} over {2 * int(conf['peer.max_clock_skew_s'])} s",
        f"`server.media_link_lifetime_s` ({int(conf['server.media_link_lifetime_s']) // 86400} days)",
        f"`policy.held_expiry_seconds` ({days} days by default)",
        f"`policy.peer_updates_per_minute`, default {policy['peer_updates_per_minute']};",
        f"`rooms.max_members` ({conf['rooms.max_members']} by default:",
    ]
    missing = [c for c in claims if c not in prose]
    with open(DOC_PATH, encoding="utf-8") as f:
        document = json.dumps(json.load(f), ensure_ascii=False)
    for c in (f"dispatcher.batch_max (default {conf['dispatcher.batch_max']})",
              f"server.max_body_bytes of them ({size(conf['server.max_body_bytes'])} by default",
              f"policy.identifier_queries_per_minute queries a minute from each peer "
              f"({policy['identifier_queries_per_minute']} by default)",
              f"dispatcher.typing_stale_ms ({int(conf['dispatcher.typing_stale_ms']) // 1000} s)",
              f"peer.max_batch events ({conf['peer.max_batch']} by default",
              f"limits.max_room_members, {conf['rooms.max_members']} by default",
              f"policy.held_expiry_seconds ({days} days by default)"):
        if c not in document:
            missing.append(c)
    assert not missing, missing


def c_constants(*names):
    """{NAME: int} of the #defines of the given sources (a number, or a
    product of numbers, as EVENT_EXPIRES_LIMIT's digits)."""
    out = {}
    for name in names:
        with open(os.path.join(TOP_SRCDIR, name), encoding="utf-8") as f:
            for k, v in re.findall(r"^#define (\w+) (\d+)(?:LL|U|ULL)?\b", f.read(), re.M):
                out[k] = int(v)
    return out


def test_the_documents_bounds_are_the_constants_of_the_code(doc):
    """Each bound docs/openapi.json gives a field (a length, a count, a
    range, the repeat of a pattern) is the constant the code checks it
    against, and the bounds of the signature profile docs/interop-api.md
    gives are httpsig.h's."""
    k = c_constants("adapters/peer/event.h", "adapters/peer/peer_api.h", "adapters/peer/peer_api.c",
                    "adapters/peer/peer_social.c", "adapters/peer/peer_pull.c", "adapters/peer/httpsig.h",
                    "gateway/policy_admin.h")
    sc = doc["components"]["schemas"]
    paths = doc["paths"]

    def body(path, name):
        op = paths[path]["post"] if "post" in paths[path] else paths[path]["patch"]
        return op["requestBody"]["content"]["application/json"]["schema"]["properties"][name]

    def repeat(pattern, after):
        m = re.search(re.escape(after) + r"\{1,(\d+)\}", pattern)
        assert m, (pattern, after)
        return int(m.group(1))
    params = {p["name"]: p["schema"] for p in (deref(doc, x) for x in paths["/v1/events"]["get"]["parameters"])}
    att, content = sc["Attachment"]["properties"], sc["EventContent"]["properties"]
    pairs = {
        "UserUri maxLength": (sc["UserUri"]["maxLength"], k["MIMI_URI_MAX"]),
        "RoomUri maxLength": (sc["RoomUri"]["maxLength"], k["MIMI_URI_MAX"]),
        "UserUri local part": (repeat(sc["UserUri"]["pattern"], "/u/[A-Za-z0-9._~+=-]"), k["MIMI_LOCAL_MAX"]),
        "RoomUri id": (repeat(sc["RoomUri"]["pattern"], "/r/[A-Za-z0-9_-]"), k["MIMI_ROOM_ID_MAX"]),
        "RoomId": (repeat(sc["RoomId"]["pattern"], "r_[A-Za-z0-9_-]"), k["EVENT_OPAQUE_ID_MAX"]),
        "MessageId": (repeat(sc["MessageId"]["pattern"], "msg_[A-Za-z0-9_-]"), k["EVENT_OPAQUE_ID_MAX"]),
        "IdempotencyKey": (repeat(sc["IdempotencyKey"]["pattern"], "[A-Za-z0-9._:-]"), k["IDEMPOTENCY_KEY_MAX"]),
        "attachment content_type": (att["content_type"]["maxLength"], k["EVENT_CONTENT_TYPE_MAX"]),
        "attachment url": (att["url"]["maxLength"], k["EVENT_URL_MAX"]),
        "attachment filename": (att["filename"]["maxLength"], k["EVENT_FILENAME_MAX"]),
        "expires": (content["expires"]["anyOf"][0]["maximum"] + 1, k["EVENT_EXPIRES_LIMIT"]),
        "room members": (sc["RoomCreate"]["properties"]["members"]["maxItems"], k["ROOM_MEMBERS_MAX"]),
        "members add": (body("/v1/rooms/{room}/members", "add")["maxItems"], k["ROOM_MEMBERS_MAX"]),
        "members remove": (body("/v1/rooms/{room}/members", "remove")["maxItems"], k["ROOM_MEMBERS_MAX"]),
        "room name": (sc["RoomCreate"]["properties"]["name"]["maxLength"], k["ROOM_NAME_MAX"]),
        "rename": (body("/v1/rooms/{room}", "name")["maxLength"], k["ROOM_NAME_MAX"]),
        "report evidence": (body("/v1/reports", "evidence")["maxItems"], k["REPORT_EVIDENCE_IDS_MAX"]),
        "report comment": (body("/v1/reports", "comment")["maxLength"], k["REPORT_COMMENT_MAX"]),
        "display_name": (body("/v1/profiles", "display_name")["maxLength"], k["DISPLAY_NAME_MAX"]),
        "handle": (body("/v1/identifiers/query", "handle")["maxLength"], k["MIMI_LOCAL_MAX"]),
        "wait": (params["wait"]["maximum"], k["WAIT_MAX_S"]),
        "limit": (params["limit"]["maximum"], k["LIMIT_MAX"]),
    }
    assert f"At most {k['EVENT_TOPIC_MAX']} bytes" in content["topic"]["description"]
    assert k["EVENT_TS_AHEAD_MS"] == 86400000 and \
        "more than a day ahead of this server's clock is 400" in sc["Event"]["properties"]["ts"]["description"]
    reaction = [x["then"]["properties"]["content"] for x in sc["Event"]["allOf"]
                if x["if"]["properties"].get("type", {}).get("const") == "reaction"]
    assert reaction and f"body is at most {k['EVENT_REACTION_MAX']} bytes" in reaction[0]["description"]
    wrong = {what: pair for what, pair in pairs.items() if pair[0] != pair[1]}
    assert not wrong, wrong
    with open(os.path.join(TOP_SRCDIR, "docs", "interop-api.md"), encoding="utf-8") as f:
        prose = " ".join(f.read().split())
    words = {4: "four", 16: "sixteen"}
    assert (f"the first {words[k['HTTPSIG_MAX_TRIES']]} at most, so that a request cannot make the daemon check "
            f"{words[k['HTTPSIG_MAX_MEMBERS']]}") in prose
    assert f"The URI is checked whole, up to {k['HTTPSIG_MAX_FIELD']} bytes" in prose



def test_the_identifier_patterns_take_what_the_daemon_takes(daemon, doc):
    """UserUri's and RoomUri's patterns take exactly the identifiers the
    daemon parses (event.c, mimi_uri_parse), asked of it through a batch's
    items (an identifier it does not parse is the item's 400 "... is not a
    valid mimi URI"; any other answer is one it took), and the pattern of
    a discovery's handle the handles it takes: a peer that checks its
    identifiers with the document is never refused for one the document
    allows.  Until the forty-sixth session both URI patterns took a port,
    which the daemon refuses, a domain of one label and an IP address, and
    a handle had no pattern."""
    from peer import push_peers
    (a, sa), (b, sb) = made = push_peers(daemon)
    try:
        sc = doc["components"]["schemas"]
        up, rp = sc["UserUri"]["pattern"], sc["RoomUri"]["pattern"]
        label = "l" * 63
        domains = ["wa.example", "a.b.example", "x1.example", "a-b.example", "1x.example", "wa.example:8448",
                   "wa.example:1", "localhost", "wa..example", "wa.example.", ".wa.example", "-wa.example",
                   "wa-.example", "wa.-example", "wa.123", "1.2.3.4", "wa.1x", "WA.example", "wa_b.example",
                   f"{label}.example", f"{label}l.example", ".".join([label] * 3) + "." + "a" * 61,
                   ".".join([label] * 3) + "." + "a" * 62, "wa.example?x", "wa.example#x", "wa.ex ample", ""]
        users = [f"mimi://{d}/u/alice" for d in domains] + [
            "mimi://wa.example/u/.", "mimi://wa.example/u/..", "mimi://wa.example/u/...", "mimi://wa.example/u/.a",
            "mimi://wa.example/u/+4915112345678", "mimi://wa.example/u/a~b=c_d-e", "mimi://wa.example/u/",
            "mimi://wa.example/u/a/b", "mimi://wa.example/u/a%20b", "mimi://wa.example/u/" + "a" * 255,
            "mimi://wa.example/u/" + "a" * 256, "mimi://wa.example/u/a?b", "mimi:/wa.example/u/a"]
        rooms = [f"mimi://{d}/r/r_1" for d in domains] + [
            "mimi://wa.example/r/" + "r" * 128, "mimi://wa.example/r/" + "r" * 129, "mimi://wa.example/r/",
            "mimi://wa.example/r/a.b", "mimi://wa.example/r/a/b", "mimi://wa.example/r/A-z_9"]
        items = [{"idempotency_key": f"u{i}", "room": "mimi://wa.example/r/r_1",
                  "event": {"type": "message", "sender": u, "content": {"parts": [{"type": "text/plain",
                                                                                   "body": "x"}]}}}
                 for i, u in enumerate(users)]
        items += [{"idempotency_key": f"r{i}", "room": r,
                   "event": {"type": "message", "sender": a.user("wally"),
                             "content": {"parts": [{"type": "text/plain", "body": "x"}]}}}
                  for i, r in enumerate(rooms)]
        r = a.call("POST", "/v1/batch", {"events": items})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        wrong = []
        for uri, pattern, res in [(u, up, x) for u, x in zip(users, results)] + \
                                 [(x, rp, y) for x, y in zip(rooms, results[len(users):])]:
            taken = "is not a valid mimi URI" not in res.get("detail", "")
            if taken != bool(re.fullmatch(pattern, uri)) or (taken and len(uri) > 512):
                wrong.append((uri, taken, res))
        # a handle of POST /v1/identifiers/query is a local part
        hp = doc["paths"]["/v1/identifiers/query"]["post"]["requestBody"]["content"]["application/json"][
            "schema"]["properties"]["handle"]["pattern"]
        for handle in ("alice", "+4915112345678", "a~b=c_d-e.f", ".a", "...", ".", "..", "", "a b", "a/b", "a%20b",
                       "ali\u00e7e", "a" * 255, "a" * 256):
            r = a.call("POST", "/v1/identifiers/query", {"handle": handle})
            assert r.status_code in (200, 400), r.text
            if (r.status_code == 200) != bool(re.fullmatch(hp, handle)):
                wrong.append((handle, r.status_code, r.text))
        assert not wrong, wrong
    finally:
        for _, srv in made:
            srv.close()


def test_the_attachment_patterns_take_what_the_daemon_takes(daemon, doc):
    """Attachment's url and sha256 patterns take exactly what the daemon
    takes (event.c, check_attachment), asked through a batch's items: a
    value it refuses is the item's 400 invalid_body at the member (any
    other answer is one it took).  Until the fiftieth session's review
    the daemon took a url that names no host (https://?x, https://#x,
    https://:443/x), which the pattern refuses, and a sha256 of 65 digits
    was 413 too_large, not invalid_body; until the fifty-first session's
    review so was a content_type over 255 bytes.  Since the fifty-second
    session a content_type is RFC 9110's media type, its names RFC 6838's,
    parameters taken."""
    from peer import push_peers
    (a, sa), (b, sb) = made = push_peers(daemon)
    try:
        att = doc["components"]["schemas"]["Attachment"]["properties"]
        urls = ["https://a.example/f", "https://a.example", "mxc://matrix.example/AbC", "https://a.example:8443/f",
                "https://a.example?f=1", "https://a.example#x", "https://[::1]/f", "https://a.example/a@b",
                "https://?x", "https://#x", "https://:443/x", "https:///x", "https://", "mxc://", "mxc://?x",
                "https://u@a.example/f", "https://u:p@a.example/f", "http://a.example/f", "https://a b/f",
                "https://a.example/{x}", "https://a.example/\u00e9", "https://a.example/" + "a" * 2030,
                "https://a.example/" + "a" * 2031]
        digest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        sums = [digest, digest[:63], digest + "0", digest.upper(), "g" * 64, ""]
        types = ["image/png", "application/vnd.a+b", "image/x-'or'1", "image/" + "x" * 249, "image/" + "x" * 250,
                 "image", "/png", "image/", "image/png; q=1", "a/b/c", "image/p\u00e9", "",
                 "x" * 127 + "/" + "y" * 127, "x" * 128 + "/y", "*/*", "-a/b", "a/+b", "image/png ", "image/png;",
                 "image/png; ", "text/plain;charset=\"utf-8\" ;format=flowed", "a/b;\tq=\"a \\\"b\\\" ;=c\";;",
                 "image/png; q", "image/png; q=", "image/png; =1", "image/png; q = 1", "image/png; q=a/b",
                 "image/png; q=\"abc", "image/png; q=\"abc\\\"", "image/png; q=\"a\r\nX: 1\"",
                 "image/png; q=\"\u00e9\"", "image/png; q=\"a\x7f\"", "image/png; a=" + "x" * 242,
                 "image/png; a=" + "x" * 243]
        cases = [("url", u, {"content_type": "image/png", "url": u}) for u in urls] + \
                [("sha256", h, {"content_type": "image/png", "url": "https://a.example/f", "sha256": h}) for h in sums] + \
                [("content_type", t, {"content_type": t, "url": "https://a.example/f"}) for t in types]
        items = [{"idempotency_key": f"k{i}", "room": "mimi://wa.example/r/r_1",
                  "event": {"type": "message", "sender": a.user("wally"), "content": {"attachments": [x]}}}
                 for i, (_, _, x) in enumerate(cases)]
        r = a.call("POST", "/v1/batch", {"events": items})
        assert r.status_code == 200, r.text
        wrong = []
        for (member, value, _), res in zip(cases, r.json()["results"]):
            refused = f"/content/attachments/0/{member}" in res.get("detail", "")
            if refused == bool(re.fullmatch(att[member]["pattern"], value) and len(value) <=
                               att[member].get("maxLength", len(value))):
                wrong.append((member, value, res))
            elif refused and res.get("code") != "invalid_body" and not (member == "url" and len(value) > 2048):
                wrong.append((member, value, res))
        assert not wrong, wrong
    finally:
        for _, srv in made:
            srv.close()


def test_an_events_nesting_and_values_are_answered_as_documented(daemon, doc):
    """The Event schema's description says what an event nested too deep
    and one of too many values are answered, and the daemon answers so:
    nesting past EVENT_MAX_DEPTH is 400 invalid_body (a syntax fault,
    pointing at the member), values past EVENT_MAX_VALUES 413 too_large.
    Until the fiftieth session's review the description said 413
    too_large for both."""
    from peer import push_peers
    k = c_constants("adapters/peer/event.h")
    said = " ".join(doc["components"]["schemas"]["Event"]["description"].split())
    depth, values = k["EVENT_MAX_DEPTH"], k["EVENT_MAX_VALUES"]
    m = re.search(rf"at most {depth} levels of nesting \(deeper: (\d+) (\w+)", said)
    n = re.search(rf"{values} JSON values \(more: (\d+) (\w+)\)", said)
    assert m and n, said
    (a, _), _ = made = push_peers(daemon)
    try:
        deep = 1
        for _ in range(depth - 1):  # the event object, content, x, then depth - 3 arrays: depth + 1 levels
            deep = [deep]
        many = list(range(values))
        events = [{"type": "message", "sender": a.user("wally"),
                   "content": {"parts": [{"type": "text/plain", "body": "x"}], "x": extra}} for extra in (deep, many)]
        r = a.call("POST", "/v1/batch", {"events": [{"idempotency_key": f"k{i}", "room": "mimi://wa.example/r/r_1",
                                                     "event": ev} for i, ev in enumerate(events)]})
        assert r.status_code == 200, r.text
        got = [(str(x.get("http_status")), x.get("code")) for x in r.json()["results"]]
        assert got == [m.groups(), n.groups()], (got, said)
        assert "/events/0/event/content/x/0" in r.json()["results"][0]["detail"], r.text
    finally:
        for _, srv in made:
            srv.close()


# ------------------------------------------------------------ the answers

class Answer:
    """An answer read by hand (test_peer_auth.send_lines), as requests'."""

    def __init__(self, status, body):
        self.status_code, self.body = status, body
        self.text = json.dumps(body)

    def json(self):
        return self.body


def documented(doc, method, path, r):
    """Faults if the answer r to METHOD path is not one the document
    lists: its status among the operation's responses, and a problem's
    code in that response's code enum."""
    op = doc["paths"][path][method.lower()]
    resp = op["responses"].get(str(r.status_code))
    if resp is None:
        return [f"{method} {path}: {r.status_code} is not documented ({r.text[:200]})"]
    if r.status_code < 400:
        return []
    codes = [c for _, n in walk(deref(doc, resp)) for c in n.get("code", {}).get("enum", [])]
    code = r.json().get("code")
    return [] if code in codes else [f"{method} {path}: {r.status_code} {code} is not documented ({codes})"]


def test_the_refusals_the_prose_names_are_in_the_document(daemon, doc):
    """Each refusal docs/interop-api.md (or the code) says an operation
    gives is one docs/openapi.json lists for it, with its code: a peer
    generating a client from the document must know them.  Until the
    thirty-fourth session it left out the 403 not_allowed of the consent,
    block and report endpoints (their peer's user named in another
    domain), the 429 rate_limited of a rename (charged as the peer's
    messages) and of a long poll past peer.max_long_polls, and the 400
    invalid_header every signed request may get (a header sent twice)."""
    from peer import push_peers
    (a, sa), (b, sb) = made = push_peers(daemon)
    try:
        faults = []
        other = "mimi://tg.example/u/tom"   # not a user of a's domain
        local = "mimi://example.org/u/alice"
        for path, body in (("/v1/consent/requests", {"requester": other, "target": local}),
                           ("/v1/consent/updates", {"user": other, "target": local, "consent": "granted"}),
                           ("/v1/blocks", {"blocker": other, "blocked": local, "action": "block"}),
                           ("/v1/reports", {"reporter": other, "subject": local, "reason": "spam"}),
                           ("/v1/profiles", {"user": other, "display_name": "Tom"})):
            r = a.call("POST", path, body)
            assert r.status_code == 403 and r.json()["code"] == "not_allowed", (path, r.text)
            faults += documented(doc, "POST", path, r)
        # A rename past the peer's messages_per_minute.
        gid = a.create_room([a.user("wally"), b.user("bob")], kind="group", name="n").json()["id"]
        assert daemon.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                                    "limits": {"messages_per_minute": 1}}).status_code == 201
        answers = [a.call("PATCH", f"/v1/rooms/{gid}", {"name": f"n{i}"}) for i in range(3)]
        r = answers[-1]
        assert r.status_code == 429 and r.json()["code"] == "rate_limited", [x.text for x in answers]
        faults += documented(doc, "PATCH", "/v1/rooms/{room}", r)
        # Idempotency-Key sent twice, to a GET and to a POST.
        from test_peer_auth import send_lines
        for method, path, tmpl, body in (("GET", f"/v1/rooms/{gid}", "/v1/rooms/{room}", None),
                                         ("GET", "/v1/events", "/v1/events", None),
                                         ("POST", "/v1/blocks", "/v1/blocks",
                                          {"blocker": a.user("w"), "blocked": local, "action": "block"})):
            data = json.dumps(body).encode() if body is not None else b""
            h = a.signer.headers(method, a.base + path, data or None, idem="k1")
            lines = [("Authorization", "Bearer " + a.token)] + list(h.items()) + [("Idempotency-Key", "k2")]
            st, j = send_lines(daemon.port, method, path, lines, data)
            assert st == 400 and j["code"] == "invalid_header", (path, st, j)
            faults += documented(doc, method, tmpl, Answer(st, j))
        assert not faults, faults
    finally:
        for _, srv in made:
            srv.close()


def test_a_body_past_the_cap_is_a_documented_413_on_every_operation(daemon, doc):
    """A body past server.max_body_bytes is 413 too_large on every route,
    one that takes no body too (the daemon answers from the Content-Length
    before it knows what the route takes), and the document says so for
    each (until the thirty-sixth session it did for those with a body
    alone)."""
    faults, asked = too_large_answers(daemon, doc)
    assert not faults and asked == len(list(operations(doc))) and asked >= 18, faults


def test_only_the_operations_that_read_an_idempotency_key_refuse_a_bad_one(daemon, doc):
    """Room creation and the event submits read Idempotency-Key and refuse
    a malformed one (400 invalid_header); the others (members, consent,
    blocks, reports, discovery, profiles) do not read it and take the
    request.  Until the thirty-fourth session the document said every one
    of them refused "an invalid Idempotency-Key", and that the social ones
    could answer unknown_domain, which only a room's members can."""
    from peer import push_peers
    (a, _), (b, _) = made = push_peers(daemon)
    try:
        local = "mimi://example.org/u/alice"
        gid = a.create_room([a.user("wally"), b.user("bob")], kind="group").json()["id"]
        bad = "not a key!"
        for path, tmpl, body, want in (
                (f"/v1/rooms/{gid}/members", "/v1/rooms/{room}/members", {"add": [a.user("w2")]}, 200),
                ("/v1/consent/requests", None, {"requester": a.user("w"), "target": local}, 202),
                ("/v1/consent/updates", None, {"user": a.user("w"), "target": local, "consent": "granted"}, 202),
                ("/v1/blocks", None, {"blocker": a.user("w"), "blocked": local, "action": "unblock"}, 202),
                ("/v1/reports", None, {"reporter": a.user("w"), "subject": local, "reason": "spam"}, 202),
                ("/v1/identifiers/query", None, {"handle": "alice"}, 200),
                ("/v1/profiles", None, {"user": a.user("w"), "display_name": "W"}, 200),
                ("/v1/rooms", None, {"kind": "direct", "members": [a.user("x"), b.user("y")]}, 400)):
            r = a.call("POST", path, body, idem=bad)
            assert r.status_code == want, (path, r.text)
            op = doc["paths"][tmpl or path]["post"]
            reads_key = any("IdempotencyKey" in p.get("$ref", "") for p in op.get("parameters", []))
            assert reads_key == (want == 400), path
            resp = deref(doc, op["responses"]["400"])
            assert ("Idempotency-Key missing or invalid" in resp["description"]
                    or "an invalid Idempotency-Key" in resp["description"]) == reads_key, (path, resp["description"])
            codes = [c for _, n in walk(resp) for c in n.get("code", {}).get("enum", [])]
            assert ("unknown_domain" in codes) == (path.endswith("/members") or path == "/v1/rooms"), (path, codes)
    finally:
        for _, srv in made:
            srv.close()


def test_a_query_parameter_a_peer_route_does_not_take_is_refused_naming_it(daemon, doc):
    """Every route of the peer API takes the query parameters the document
    lists and no other: /v1/events?after=0&wiat=30 (wait misspelt) is 400
    invalid_query naming it, before the handler, and so is a parameter
    given twice.  Until the forty-seventh session both were ignored: the
    pull answered at once, as if no wait had been asked, or with the
    first of two cursors."""
    from peer import push_peers
    (a, _), (b, _) = made = push_peers(daemon)
    faults = []
    try:
        for (method, path), auth in sorted(api_routes().items()):
            if auth != "CW_AUTH_PEER":
                continue
            item = doc["paths"][path]
            params = [deref(doc, x) for x in item.get("parameters", []) + item[method.lower()].get("parameters", [])]
            known = {p["name"] for p in params if p["in"] == "query"}
            url = re.sub(r"\{(\w+)\}", "x", path)
            body = {} if method in ("POST", "PATCH", "PUT") else None
            for q, name, twice in [("wiat=30", "wiat", False)] + [(f"{n}=1&{n}=1", n, True) for n in sorted(known)]:
                r = b.call(method, f"{url}?{q}", body)
                p = r.json() if r.headers.get("Content-Type") == "application/problem+json" else {}
                if r.status_code != 400 or p.get("code") != "invalid_query" or f"'{name}'" not in p.get("detail", "") \
                        or twice != ("more than once" in p.get("detail", "")):
                    faults.append(f"{method} {path}?{q}: {r.status_code} {r.text[:160]}")
            for n in known:
                r = b.call(method, f"{url}?{n}=1", body)
                if "unknown query parameter" in r.text:
                    faults.append(f"{method} {path}?{n}=1: {r.status_code} {r.text[:160]}")
        assert not faults, "\n".join(faults)
        r = b.call("GET", "/v1/events?after=0&wait=0&limit=5")
        assert r.status_code == 200, r.text
    finally:
        for _, srv in made:
            srv.close()


def test_a_long_poll_past_the_cap_is_a_documented_429(make_daemon, db_url, doc):
    """GET /v1/events past peer.max_long_polls is 429 rate_limited
    (docs/interop-api.md, "Pulling"); until the thirty-fourth session the
    document listed no 429 for it."""
    from test_peer_pull import long_poll, make_peers
    d = make_daemon(db_url, options={"peer": {"max_long_polls": "1"}}).start()
    a, b, rm, srv = make_peers(d)
    try:
        cursor = b.call("GET", "/v1/events?after=0").json()["next"]
        held, _ = long_poll(b, cursor, 3)  # waiting, a second on
        r = b.call("GET", f"/v1/events?after={cursor}&wait=3")
        assert r.status_code == 429, r.text
        held.join(10)
        assert r.json()["code"] == "rate_limited", r.text
        assert not documented(doc, "GET", "/v1/events", r), documented(doc, "GET", "/v1/events", r)
    finally:
        srv.close()
