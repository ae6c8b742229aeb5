"""docs/openapi.json: a well-formed OpenAPI 3.1 document, served by the
daemon as is, that lists exactly the routes of the neutral API."""
import glob
import json
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
    """The operations of doc that take a request body but do not document
    the 413 too_large the daemon answers to one past server.max_body_bytes
    (gateway/http.c, before any route's handler)."""
    faults = []
    for method, path, op in operations(doc):
        if "requestBody" in op:
            resp = deref(doc, op["responses"].get("413", {}))
            if "too_large" not in [c for _, n in walk(resp) for c in n.get("code", {}).get("enum", [])]:
                faults.append((method, path))
    return faults


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


def test_every_operation_with_a_body_documents_too_large(doc):
    """Until the thirty-second session PATCH /v1/rooms/{room} did not."""
    assert not too_large_faults(doc)


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
