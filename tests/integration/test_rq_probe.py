"""rQ review probes (session 32): what a peer sees of the four kinds of
local target (unknown, not opted in, blocked, held)."""
import json
import statistics
import time

from harness import wait_until
from peer import push_peers
from test_peer_api import peers  # noqa: F401
from test_policy import ALICE, BOB, consent, dm, opt_in, send, states

CAROL = "mimi://example.org/u/carol"   # known, not opted in
NOBODY = "mimi://example.org/u/nobody"


def setup_targets(daemon, a):
    opt_in(daemon)                                   # alice: held
    opt_in(daemon, user=BOB)
    consent(daemon, a.user("wally"), "blocked", user=BOB)   # bob: blocked
    opt_in(daemon, user=CAROL, on=False)             # carol: not opted in
    return {"held": ALICE, "blocked": BOB, "not_opted_in": CAROL, "unknown": NOBODY}


def shape(r):
    h = {k.lower(): v for k, v in r.headers.items() if k.lower() not in ("date", "content-length")}
    try:
        body = r.json()
    except Exception:
        body = r.text
    return r.status_code, h, body


def scrub(o):
    """ids and times out of a body."""
    if isinstance(o, dict):
        return {k: scrub(v) for k, v in o.items() if k not in ("id", "accepted_ts", "room_id", "uri", "room",
                                                                 "ts")}
    if isinstance(o, list):
        return [scrub(x) for x in o]
    if isinstance(o, str) and o.startswith("mimi://example.org/u/"):
        return "LOCAL"
    return o


def test_probe_four_cases_rooms_receipts_typing(daemon, peers, pg, db_url):
    (a, sa), (b, sb) = peers
    t = setup_targets(daemon, a)
    out = {}
    for name, user in t.items():
        r = a.create_room([a.user("wally"), user])
        room = r.json()
        got = {"create": (r.status_code, scrub(r.json()))}
        g = a.call("GET", f"/v1/rooms/{room['id']}")
        got["get"] = (g.status_code, scrub(g.json()))
        m = send(a, room["id"], "hello")
        got["msg"] = (m.status_code, scrub(m.json()))
        mid = m.json()["id"]
        rc = a.call("POST", f"/v1/rooms/{room['id']}/receipts",
                    {"type": "receipt", "sender": a.user("wally"), "content": {"receipt": "read", "in_reply_to": mid}})
        got["receipt"] = (rc.status_code, scrub(rc.json()) if rc.headers.get("content-type", "").endswith("json") else rc.text)
        ty = a.call("POST", f"/v1/rooms/{room['id']}/typing",
                    {"type": "typing", "sender": a.user("wally"), "content": {"state": "start"}})
        got["typing"] = (ty.status_code, scrub(ty.json()))
        for k, x in (("msg_status", mid), ("rc_status", rc.json().get("id")), ("ty_status", ty.json().get("id"))):
            if x:
                s = a.call("GET", f"/v1/messages/{x}")
                got[k] = (s.status_code, scrub(s.json()))
        cr = a.call("POST", "/v1/consent/requests", {"requester": a.user("wally"), "target": user})
        got["consent_req"] = shape(cr)[0], scrub(cr.json())
        out[name] = got
    time.sleep(1.5)
    for name, got in out.items():
        print(name, json.dumps(got, sort_keys=True))
    print("pushed to gk:", [(e["type"], e.get("sender")) for e in sa.events])
    print("pushed to tg:", [(e["type"], e.get("sender")) for e in sb.events])
    print(pg.psql("SELECT e.type, o.destination, o.state, coalesce(t.uri,'') FROM outbox o JOIN events e ON "
                  "e.id = o.event_id LEFT JOIN identities t ON t.id = o.target_identity_id ORDER BY o.id", db_url))
    base = out["unknown"]
    for name, got in out.items():
        assert got == base, (name, got, base)


def timed(fn, n, keys):
    """Round-robin n calls for each key; medians in ms."""
    ts = {k: [] for k in keys}
    for i in range(n):
        for k in keys:
            t0 = time.perf_counter()
            r = fn(k, i)
            ts[k].append((time.perf_counter() - t0) * 1000)
            assert r.status_code in (200, 202), r.text
    return {k: (round(statistics.median(v), 3), round(statistics.quantiles(v, n=10)[0], 3)) for k, v in ts.items()}


def test_probe_consent_request_timing(daemon, peers, pg, db_url):
    (a, _), _ = peers
    t = setup_targets(daemon, a)
    dave = "mimi://example.org/u/dave"
    opt_in(daemon, user=dave)
    consent(daemon, a.user("wally"), "allowed", user=dave)
    t["allowed"] = dave
    time.sleep(1)
    # one requester, asking again and again
    med = timed(lambda k, i: a.call("POST", "/v1/consent/requests", {"requester": a.user("wally"), "target": t[k]}),
                200, list(t))
    print("same requester (median, p10) ms:", med)
    # a fresh requester each time (a first request each)
    med2 = timed(lambda k, i: a.call("POST", "/v1/consent/requests",
                                     {"requester": a.user(f"r{k}{i}"), "target": t[k]}), 200, list(t))
    print("fresh requesters (median, p10) ms:", med2)


def test_probe_identifier_query_timing(daemon, peers, pg, db_url):
    (a, _), _ = peers
    assert daemon.admin("PATCH", "/settings", json={"policy.identifier_queries_per_minute": 1000000}).status_code == 200
    pg.psql("INSERT INTO identities (uri, domain, localpart, is_local, network, discoverable) VALUES "
            "('mimi://example.org/u/found', 'example.org', 'found', true, 'local', true), "
            "('mimi://example.org/u/hidden', 'example.org', 'hidden', true, 'local', false)", db_url)
    time.sleep(1)
    med = timed(lambda k, i: a.call("POST", "/v1/identifiers/query", {"handle": k}), 200,
                ["found", "hidden", "nobody"])
    print("identifier query (median, p10) ms:", med)


def paired(fn, n, keys, ref):
    """Round-robin n calls per key (order rotated each round); per key: median ms,
    and the share of rounds in which it was slower than ref (0.5: no difference)
    with the sign test's z."""
    ts = {k: [] for k in keys}
    for i in range(n):
        order = keys[i % len(keys):] + keys[:i % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            r = fn(k, i)
            ts[k].append((time.perf_counter() - t0) * 1000)
            assert r.status_code in (200, 202), r.text
    out = {}
    for k, v in ts.items():
        wins = sum(1 for x, y in zip(v, ts[ref]) if x > y)
        out[k] = (round(statistics.median(v), 3), round(wins / n, 2), round((wins - n / 2) / (n ** 0.5 / 2), 1))
    return out


def test_probe_consent_request_timing_paired(daemon, peers, pg, db_url):
    (a, _), _ = peers
    t = setup_targets(daemon, a)
    time.sleep(1)
    keys = list(t)
    res = paired(lambda k, i: a.call("POST", "/v1/consent/requests", {"requester": a.user("wally"), "target": t[k]}),
                 400, keys, "unknown")
    print("consent requests, one requester (median ms, share slower than unknown, z):", res)
    res = paired(lambda k, i: a.call("POST", "/v1/consent/requests", {"requester": a.user(f"q{i}"), "target": t[k]}),
                 400, ["held", "not_opted_in", "unknown"], "unknown")
    print("consent requests, a new requester each round:", res)


def test_probe_message_timing_paired(daemon, peers, pg, db_url):
    (a, _), _ = peers
    t = setup_targets(daemon, a)
    rooms = {k: dm(a, local=u) for k, u in t.items()}
    time.sleep(1)
    keys = list(t)
    res = paired(lambda k, i: send(a, rooms[k], f"m{i}"), 300, keys, "unknown")
    print("messages (median ms, share slower than unknown, z):", res)


def item(rm, sender, text, key):
    return {"idempotency_key": key, "room": rm["uri"],
            "event": {"type": "message", "sender": sender, "content": {"parts": [{"type": "text/plain", "body": text}]}}}


def test_probe_batch_semantics(daemon, peers, pg, db_url):
    (a, sa), (b, sb) = peers
    rm = a.create_room([a.user("alice"), b.user("bob")]).json()
    # the same key twice, same body
    r = a.call("POST", "/v1/batch", {"events": [item(rm, a.user("alice"), "x", "k1"), item(rm, a.user("alice"), "x", "k1")]})
    print("same key same body:", r.status_code, r.text)
    # the same key twice, other bodies
    r = a.call("POST", "/v1/batch", {"events": [item(rm, a.user("alice"), "y", "k2"), item(rm, a.user("alice"), "z", "k2")]})
    print("same key other body:", r.status_code, r.text)
    # a bad one in the middle
    bad = item(rm, a.user("alice"), "b", "k4")
    bad["event"]["type"] = "nonsense"
    r = a.call("POST", "/v1/batch", {"events": [item(rm, a.user("alice"), "a", "k3"), bad, item(rm, b.user("bob"), "c", "k5"),
                                                item(rm, a.user("alice"), "d", "k6")]})
    print("bad in the middle:", r.status_code, r.text)
    # missing key
    nokey = item(rm, a.user("alice"), "e", "k7")
    del nokey["idempotency_key"]
    r = a.call("POST", "/v1/batch", {"events": [nokey]})
    print("no key:", r.status_code, r.text)
    # empty batch
    r = a.call("POST", "/v1/batch", {"events": []})
    print("empty:", r.status_code, r.text)
    # same key as a single submit before
    s = a.send(rm["id"], a.user("alice"), "solo", idem="k8")
    r = a.call("POST", "/v1/batch", {"events": [item(rm, a.user("alice"), "solo", "k8")]})
    print("single then batch:", s.json(), r.status_code, r.text)
    time.sleep(1.5)
    print("tg got:", [(e["content"]["parts"][0]["body"], e["id"]) for e in sb.events])
    print(pg.psql("SELECT public_id, origin_native_id, content->'content'->'parts'->0->>'body' FROM events ORDER BY id", db_url))


def test_consent_request_timing_does_not_tell_who_exists_or_decided(daemon, peers, pg, db_url):
    """spec/interop-api.md: requestConsent never reveals whether the user
    exists; errors, status and the timing of answers say nothing of it.
    A consent request to a user who exists, is opted in and has not
    decided (hold) runs one statement more (the consent request's INSERT)
    than one to an unknown, not opted-in or blocking user (deny: the audit
    record only), and one to a user who allowed the requester runs none:
    paired over 300 rounds, each must be slower than the unknown user's in
    about half of them (a sign test), not in 80 %."""
    (a, _), _ = peers
    t = setup_targets(daemon, a)
    dave = "mimi://example.org/u/dave"
    opt_in(daemon, user=dave)
    consent(daemon, a.user("wally"), "allowed", user=dave)
    t["allowed"] = dave
    time.sleep(1)
    res = paired(lambda k, i: a.call("POST", "/v1/consent/requests", {"requester": a.user("wally"), "target": t[k]}),
                 300, list(t), "unknown")
    print(res)
    for k, (_, share, z) in res.items():
        if k != "unknown":
            assert abs(z) < 4, (k, res)


def test_probe_group_add_four_cases(daemon, peers, pg, db_url):
    (a, sa), (b, sb) = peers
    t = setup_targets(daemon, a)
    rm = a.create_room([a.user("wally"), b.user("bob")], kind="group").json()
    out = {}
    for name, user in t.items():
        r = a.call("POST", f"/v1/rooms/{rm['id']}/members", {"add": [user]})
        out[name] = (r.status_code, scrub(r.json()) if r.text else None)
    g = a.call("GET", f"/v1/rooms/{rm['id']}").json()
    print("adds:", out)
    print("room:", g)
    m = send(a, rm["id"], "hi all")
    st = a.call("GET", f"/v1/messages/{m.json()['id']}").json()
    print("status:", st)
    time.sleep(1.5)
    print("tg got:", [(e["type"], e.get("content")) for e in sb.events])
    print(pg.psql("SELECT e.type, o.destination, o.state, coalesce(t.uri,'') FROM outbox o JOIN events e ON "
                  "e.id = o.event_id LEFT JOIN identities t ON t.id = o.target_identity_id ORDER BY o.id", db_url))


def test_probe_recipient_order_tells_known_users(daemon, peers, pg, db_url):
    """A peer adds, in one request, a handle it made up (nobody has it)
    and then the user it asks about; the status of its next message lists
    the local recipients in the order of their identity rows."""
    (a, sa), (b, sb) = peers
    opt_in(daemon)  # alice: a user of this provider (she opted in)
    rm = a.create_room([a.user("wally"), b.user("bob")], kind="group").json()
    ref, x = "mimi://example.org/u/zz-made-up-1", "mimi://example.org/u/nobody-2"
    r = a.call("POST", f"/v1/rooms/{rm['id']}/members", {"add": [ref, ALICE, x]})
    assert r.status_code == 200, r.text
    # a typing notification is enough (no consent request, nothing shown)
    m = a.call("POST", f"/v1/rooms/{rm['id']}/typing",
               {"type": "typing", "sender": a.user("wally"), "content": {"state": "start"}}).json()["id"]
    st = a.call("GET", f"/v1/messages/{m}").json()
    order = [y["recipient"] for y in st["recipients"] if y["recipient"].startswith("mimi://example.org/")]
    print("recipients:", order)
    assert pg.psql("SELECT count(*) FROM consent_requests", db_url) == "0"
    time.sleep(1.5)
    print("tg got:", [e["content"].get("target") for e in sb.events if e["type"] == "membership"])
    # Nothing about the users should follow from the order: the order of the
    # request (or of the URIs) would say nothing; the identities' order does.
    assert order in ([ref, ALICE, x], sorted([ref, ALICE, x])), order
