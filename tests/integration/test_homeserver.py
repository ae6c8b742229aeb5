"""The Matrix homeserver stand-in (tests/integration/homeserver.py) alone, against a tiny fake application
service: the Client-Server rules an application service meets, and the homeserver's side of the
Application Service API (transactions, queries, ping). No causewayd here."""
import http.server
import json
import threading
import time
import urllib.parse

import pytest
import requests

from harness import free_port
from homeserver import Homeserver

AS_TOKEN = "as-" + "a" * 40
HS_TOKEN = "hs-" + "b" * 40
C3 = "/_matrix/client/v3"
BOT = "@_cw_bot:example.org"


def registration(url, **extra):
    reg = {"id": "causeway", "url": url, "as_token": AS_TOKEN, "hs_token": HS_TOKEN,
           "sender_localpart": "_cw_bot", "rate_limited": False, "receive_ephemeral": True,
           "de.sorunome.msc2409.push_ephemeral": True,
           "namespaces": {"users": [{"exclusive": True, "regex": "^@_cw_.*:example\\.org$"}],
                          "aliases": [{"exclusive": True, "regex": "^#_cw_.*:example\\.org$"}], "rooms": []}}
    reg.update(extra)
    return reg


class FakeAS:
    """An application service that records what the homeserver sends it and answers as told."""

    def __init__(self):
        self.requests = []          # dicts: method, path, query, auth (header), body, start, end
        self.fail_next = 0          # answer 500 to that many transactions
        self.bad_body_next = 0      # answer 200 with a body that is not JSON to that many transactions
        self.delay = 0.0            # seconds to hold each transaction
        self.in_flight = 0
        self.max_in_flight = 0
        self.user_handler = lambda user_id: 404
        self.room_handler = lambda alias: 404
        self.ping_status = 200
        self.ping_delay = 0.0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body = outer.handle(self.command, self.path, self.headers, raw)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = _any

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle(self, method, target, headers, raw):
        split = urllib.parse.urlsplit(target)
        rec = {"method": method, "path": split.path, "query": dict(urllib.parse.parse_qsl(split.query)),
               "auth": headers.get("Authorization"), "body": json.loads(raw) if raw else None,
               "start": time.time(), "end": None}
        with self.lock:
            self.requests.append(rec)
        token = rec["auth"][len("Bearer "):] if rec["auth"] else rec["query"].get("access_token")
        if token != HS_TOKEN:
            return 403, b'{"errcode": "M_FORBIDDEN"}'
        path = split.path
        for prefix in ("/_matrix/app/v1", ""):
            if path.startswith(prefix + "/transactions/") and method == "PUT":
                with self.lock:
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                time.sleep(self.delay)
                with self.lock:
                    self.in_flight -= 1
                    rec["end"] = time.time()
                    if self.fail_next:
                        self.fail_next -= 1
                        return 500, b'{"errcode": "M_UNKNOWN"}'
                    if self.bad_body_next:
                        self.bad_body_next -= 1
                        return 200, b"ok"
                return 200, b"{}"
            if path.startswith(prefix + "/users/") and method == "GET":
                return self.user_handler(urllib.parse.unquote(path.split("/")[-1])), b"{}"
            if path.startswith(prefix + "/rooms/") and method == "GET":
                return self.room_handler(urllib.parse.unquote(path.split("/")[-1])), b"{}"
        if path == "/_matrix/app/v1/ping" and method == "POST":
            time.sleep(self.ping_delay)
            return self.ping_status, (b"{}" if self.ping_status == 200 else b'{"errcode": "M_FORBIDDEN"}')
        return 404, b'{"errcode": "M_UNRECOGNIZED"}'

    def txns(self):
        """(txn_id, body) of every transaction PUT received, in order."""
        with self.lock:
            return [(r["path"].rsplit("/", 1)[1], r["body"]) for r in self.requests
                    if r["method"] == "PUT" and "/transactions/" in r["path"]]

    def events(self):
        """Unique events received, by event_id, in order."""
        seen, out = set(), []
        for _, body in self.txns():
            for e in body["events"]:
                if e["event_id"] not in seen:
                    seen.add(e["event_id"])
                    out.append(e)
        return out

    def ephemeral(self, key="ephemeral"):
        return [e for _, body in self.txns() for e in body.get(key, [])]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def world():
    """make(**homeserver options) -> (hs, app): a running stand-in registered with a fake AS."""
    made = []

    def make(reg_extra=None, **kw):
        app = FakeAS()
        kw.setdefault("retry_base", 0.02)
        kw.setdefault("retry_max", 0.2)
        hs = Homeserver(server_name="example.org", registration=registration(app.url, **(reg_extra or {})), **kw)
        hs.start()
        made.append((hs, app))
        return hs, app

    yield make
    for hs, app in made:
        hs.close()
        app.close()
        assert not hs.errors, hs.errors


def err(r):
    return r.status_code, r.json().get("errcode")


def ghost(hs, local):
    """A registered ghost and its client (as the application service)."""
    r = hs.appservice().request("POST", C3 + "/register", {"type": "m.login.application_service",
                                                           "username": local, "inhibit_login": True})
    assert r.status_code == 200, r.text
    return hs.appservice(f"@{local}:example.org")


def test_versions_unknown_routes_and_bodies(world):
    hs, _ = world()
    v = requests.get(hs.url + "/_matrix/client/versions").json()
    assert "v1.7" in v["versions"] and "unstable_features" in v
    _, alice = hs.create_user("alice")
    a = hs.as_user(alice)
    assert "m.room_versions" in a.call("GET", C3 + "/capabilities")["capabilities"]
    assert err(requests.get(hs.url + C3 + "/capabilities")) == (401, "M_MISSING_TOKEN")
    assert err(a.request("GET", C3 + "/nothing/here")) == (404, "M_UNRECOGNIZED")
    assert err(a.request("GET", "/_matrix/client/r0/capabilities")) == (404, "M_UNRECOGNIZED")  # v3 only
    assert err(a.request("DELETE", C3 + "/createRoom")) == (405, "M_UNRECOGNIZED")
    assert err(a.request("POST", C3 + "/createRoom", raw=b"{not json")) == (400, "M_NOT_JSON")
    assert err(a.request("POST", C3 + "/createRoom", raw=b"")) == (400, "M_NOT_JSON")
    assert err(a.request("POST", C3 + "/createRoom", raw=b'{"a": NaN}')) == (400, "M_NOT_JSON")
    assert err(a.request("POST", C3 + "/createRoom", raw=b"[]")) == (400, "M_BAD_JSON")
    assert err(a.request("POST", C3 + "/createRoom", {"name": 5})) == (400, "M_BAD_JSON")
    assert err(a.request("POST", C3 + "/createRoom", {"room_version": "99"})) == (400, "M_UNSUPPORTED_ROOM_VERSION")
    room = a.create_room(name="r")
    # Every POST and PUT needs a JSON object body, even an empty one.
    assert err(a.request("POST", f"{C3}/rooms/{room}/leave")) == (400, "M_NOT_JSON")
    assert [r["status"] for r in hs.requests if r["path"] == C3 + "/capabilities"] == [200, 401]


def test_auth_errors_and_masquerading(world):
    hs, _ = world()
    _, alice = hs.create_user("alice")
    who = C3 + "/account/whoami"
    assert err(requests.get(hs.url + who)) == (401, "M_MISSING_TOKEN")
    assert err(requests.get(hs.url + who, headers={"Authorization": "Bearer nope"})) == (401, "M_UNKNOWN_TOKEN")
    assert err(requests.get(hs.url + who, headers={"Authorization": "Basic " + alice})) == (401, "M_MISSING_TOKEN")
    assert requests.get(hs.url + who, params={"access_token": alice}).json()["user_id"] == "@alice:example.org"
    r = requests.get(hs.url + who, params={"access_token": alice}, headers={"Authorization": "Bearer " + alice})
    assert err(r) == (401, "M_MISSING_TOKEN")  # never both
    # The appservice acts only as users it registered: the bot too.
    assert err(hs.appservice().request("GET", who)) == (403, "M_FORBIDDEN")
    ghost(hs, "_cw_bot")
    assert hs.appservice().user_id == BOT
    assert err(hs.appservice("@alice:example.org").request("GET", who)) == (403, "M_FORBIDDEN")
    r = hs.appservice("@_cw_x:example.org").request("GET", who)
    assert err(r) == (403, "M_FORBIDDEN") and "has not registered" in r.json()["error"]
    assert err(hs.appservice("@_cw_x:other.org").request("GET", who)) == (403, "M_FORBIDDEN")
    assert err(hs.appservice("not-a-user").request("GET", who)) == (400, "M_INVALID_USERNAME")
    ghost(hs, "_cw_x")
    assert hs.appservice("@_cw_x:example.org").user_id == "@_cw_x:example.org"
    # ?user_id means nothing to a user's own token.
    assert hs.as_user(alice).request("GET", who, query={"user_id": BOT}).json()["user_id"] == "@alice:example.org"


def test_register_namespace_rules(world):
    hs, _ = world()
    _, alice = hs.create_user("alice")
    reg = C3 + "/register"
    body = {"type": "m.login.application_service", "username": "_cw_a", "inhibit_login": True}
    r = hs.appservice().request("POST", reg, body)
    assert r.status_code == 200 and r.json()["user_id"] == "@_cw_a:example.org"
    assert "access_token" not in r.json() and "device_id" not in r.json()
    assert err(hs.appservice().request("POST", reg, body)) == (400, "M_USER_IN_USE")
    assert err(hs.appservice().request("POST", reg, dict(body, username="alice"))) == (400, "M_EXCLUSIVE")
    assert err(hs.appservice().request("POST", reg, dict(body, username="bob"))) == (400, "M_EXCLUSIVE")
    assert err(hs.appservice().request("POST", reg, dict(body, username="_cw_Upper"))) == (400, "M_INVALID_USERNAME")
    assert err(hs.appservice().request("POST", reg, dict(body, username="_cw_a b"))) == (400, "M_INVALID_USERNAME")
    assert err(hs.appservice().request("POST", reg, dict(body, username=7))) == (400, "M_BAD_JSON")
    assert err(hs.appservice().request("POST", reg, {"type": "m.login.application_service"})) == \
        (400, "M_MISSING_PARAM")
    # Without the as_token, appservice registration is refused; ordinary registration is closed.
    assert err(requests.post(hs.url + reg, json=dict(body, username="_cw_b"))) == (401, "M_MISSING_TOKEN")
    assert err(hs.as_user(alice).request("POST", reg, dict(body, username="_cw_b"))) == (401, "M_UNKNOWN_TOKEN")
    assert err(requests.post(hs.url + reg, json={"username": "carol", "password": "x"})) == (403, "M_FORBIDDEN")
    assert not hs.user_exists("@_cw_b:example.org")
    # Without inhibit_login the user gets a token of its own; the profile starts as the localpart.
    r = hs.appservice().request("POST", reg, {"type": "m.login.application_service", "username": "_cw_c"})
    assert hs.as_user(r.json()["access_token"]).user_id == "@_cw_c:example.org"
    assert hs.profile("@_cw_a:example.org") == {"displayname": "_cw_a"}
    with pytest.raises(ValueError, match="M_EXCLUSIVE"):
        hs.create_user("_cw_human")


def test_send_idempotency_and_forgetting(world):
    hs, _ = world()
    alice_id, alice = hs.create_user("alice")
    bob_id, bob = hs.create_user("bob")
    a, b = hs.as_user(alice), hs.as_user(bob)
    room = a.create_room(preset="public_chat")
    b.join(room)
    msg = {"msgtype": "m.text", "body": "hi"}
    e1 = a.send(room, "m.room.message", msg, txn_id="1")
    assert a.send(room, "m.room.message", msg, txn_id="1") == e1
    assert b.send(room, "m.room.message", msg, txn_id="1") != e1  # another token, another scope
    texts = lambda: [e for e in hs.events(room) if e["type"] == "m.room.message"]  # noqa: E731
    assert len(texts()) == 2
    hs.forget_txn_ids()
    e3 = a.send(room, "m.room.message", msg, txn_id="1")
    assert e3 != e1 and len(texts()) == 3
    # The appservice's scope is its as_token, whatever ?user_id says (as Synapse keys it).
    g1, g2 = ghost(hs, "_cw_one"), ghost(hs, "_cw_two")
    g1.join(room)
    g2.join(room)
    eg = g1.send(room, "m.room.message", {"msgtype": "m.text", "body": "from one"}, txn_id="g")
    assert g2.send(room, "m.room.message", {"msgtype": "m.text", "body": "from two"}, txn_id="g") == eg
    assert [e["content"]["body"] for e in texts()][-1] == "from one" and len(texts()) == 4
    # The same txnId in another room is another request.
    other = a.create_room(preset="public_chat")
    g1.join(other)
    assert g1.send(other, "m.room.message", msg, txn_id="g") != eg


def test_only_joined_members_may_send(world):
    hs, _ = world()
    _, alice = hs.create_user("alice")
    bob_id, bob = hs.create_user("bob")
    a, b = hs.as_user(alice), hs.as_user(bob)
    room = a.create_room(preset="private_chat")
    path = f"{C3}/rooms/{room}/send/m.room.message/x1"
    msg = {"msgtype": "m.text", "body": "x"}
    assert err(b.request("PUT", path, msg)) == (403, "M_FORBIDDEN")
    assert err(b.request("POST", f"{C3}/join/{room}", {})) == (403, "M_FORBIDDEN")  # not invited
    a.invite(room, bob_id)
    a.invite(room, bob_id)  # already invited: 200, and no second event
    assert len([e for e in hs.events(room) if e.get("state_key") == bob_id]) == 1
    assert err(b.request("PUT", path, msg)) == (403, "M_FORBIDDEN")  # invited is not joined
    b.join(room)
    assert err(a.request("POST", f"{C3}/rooms/{room}/invite", {"user_id": bob_id})) == (403, "M_FORBIDDEN")
    b.send(room, "m.room.message", msg)
    b.leave(room)
    assert err(b.request("PUT", f"{C3}/rooms/{room}/send/m.room.message/x2", msg)) == (403, "M_FORBIDDEN")
    assert err(b.request("POST", f"{C3}/rooms/{room}/join", {})) == (403, "M_FORBIDDEN")  # invite-only again
    assert err(b.request("PUT", f"{C3}/rooms/!nope:example.org/send/m.room.message/x3", msg)) == (403, "M_FORBIDDEN")
    assert err(b.request("POST", f"{C3}/rooms/{room}/invite", {"user_id": "@carol:example.org"})) == \
        (403, "M_FORBIDDEN")  # only members invite
    assert hs.members(room) == {"@alice:example.org": "join", bob_id: "leave"}


def test_ts_is_honoured_for_the_appservice_only(world):
    hs, _ = world()
    _, alice = hs.create_user("alice")
    a = hs.as_user(alice)
    room = a.create_room(preset="public_chat")
    g = ghost(hs, "_cw_g")
    g.join(room)
    eg = g.send(room, "m.room.message", {"msgtype": "m.text", "body": "old"}, ts=1234567890123)
    ea = a.send(room, "m.room.message", {"msgtype": "m.text", "body": "now"}, ts=1234567890123)
    assert hs.event(eg)["origin_server_ts"] == 1234567890123
    assert abs(hs.event(ea)["origin_server_ts"] - time.time() * 1000) < 60000
    r = g.request("PUT", f"{C3}/rooms/{room}/send/m.room.message/bad", {"msgtype": "m.text", "body": "x"},
                  query={"ts": "abc"})
    assert err(r) == (400, "M_INVALID_PARAM")
    # State events honour ts too (the ghost made its own room to have the power to).
    own = g.create_room()
    es = g.call("PUT", f"{C3}/rooms/{own}/state/m.room.topic/", {"topic": "t"}, {"ts": "1000"})["event_id"]
    assert hs.event(es)["origin_server_ts"] == 1000


def test_one_transaction_in_flight_at_most_100_events(world):
    hs, app = world()
    app.delay = 0.01
    g = ghost(hs, "_cw_g")
    room = g.create_room()
    hs.wait_for(lambda: len(app.events()) == len(hs.events(room)), what="the room's creation")
    before = len(app.txns())
    hs.stop_pushing()
    sent = [g.send(room, "m.room.message", {"msgtype": "m.text", "body": str(i)}) for i in range(250)]
    time.sleep(0.1)
    assert len(app.txns()) == before  # nothing while stopped
    hs.resume_pushing()
    hs.wait_for(lambda: len(hs.pushed_events()) >= len(hs.events(room)), what="all events pushed")
    txns = app.txns()
    assert [len(b["events"]) for _, b in txns[before:]] == [100, 100, 50]
    assert [t for t, _ in txns] == [str(i) for i in range(1, len(txns) + 1)]  # 1, 2, 3, ...
    assert [e["event_id"] for e in app.events()][-250:] == sent  # in order, each once
    # Sent quickly without a stop: still one at a time, at most 100 each.
    more = [g.send(room, "m.room.message", {"msgtype": "m.text", "body": str(i)}) for i in range(250)]
    hs.wait_for(lambda: len(hs.pushed_events()) >= len(hs.events(room)), what="all events pushed")
    assert [e["event_id"] for e in app.events()][-250:] == more
    assert all(len(b["events"]) <= 100 for _, b in app.txns())
    assert app.max_in_flight == 1
    puts = [r for r in app.requests if r["method"] == "PUT"]
    assert all(p["end"] <= q["start"] for p, q in zip(puts, puts[1:]))  # never overlapping
    assert all(t["done"] and t["tries"] == 1 for t in hs.transactions)


def test_failing_appservice_gets_the_same_transaction_again(world):
    hs, app = world()
    g = ghost(hs, "_cw_g")
    room = g.create_room()
    hs.wait_for(lambda: all(t["done"] for t in hs.transactions) and len(app.events()) == len(hs.events(room)))
    first = len(app.txns())
    app.fail_next = 3
    app.bad_body_next = 1  # a 200 that is not JSON is no answer either
    e1 = g.send(room, "m.room.message", {"msgtype": "m.text", "body": "one"})
    hs.wait_for(lambda: len(app.txns()) >= first + 2, what="a retry")
    e2 = g.send(room, "m.room.message", {"msgtype": "m.text", "body": "two"})  # while it fails
    hs.wait_for(lambda: e2 in [e["event_id"] for e in hs.pushed_events()], what="delivery")
    txns = app.txns()[first:]
    tid = str(first + 1)
    assert [t for t, _ in txns[:5]] == [tid] * 5
    assert all([e["event_id"] for e in b["events"]] == [e1] for _, b in txns[:5])
    assert txns[5][0] == str(first + 2) and [e["event_id"] for e in txns[5][1]["events"]] == [e2]
    rec = [t for t in hs.transactions if t["txn_id"] == tid][0]
    assert rec["tries"] == 5 and rec["done"] and [a["status"] for a in rec["attempts"]] == [500, 500, 500, 200, 200]
    assert rec["attempts"][3]["error"] == "answer not a JSON object"
    starts = [a["start"] for a in rec["attempts"]]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] >= 0.015 and gaps[1] >= 0.035 and gaps[2] >= 0.07  # 0.02, 0.04, 0.08 ...
    # An application service that is not listening: the same, until it is.
    url = hs.registration["url"]
    hs.registration["url"] = f"http://127.0.0.1:{free_port()}"
    e3 = g.send(room, "m.room.message", {"msgtype": "m.text", "body": "three"})
    hs.wait_for(lambda: any(t["tries"] >= 3 for t in hs.transactions if e3 in [e["event_id"] for e in t["events"]]))
    hs.registration["url"] = url
    hs.wait_for(lambda: e3 in [e["event_id"] for e in hs.pushed_events()], what="delivery after the outage")
    rec = [t for t in hs.transactions if e3 in [e["event_id"] for e in t["events"]]][0]
    assert rec["done"] and rec["attempts"][0]["status"] is None and "ConnectionError" in rec["attempts"][0]["error"]
    assert [t for t, _ in app.txns()].count(rec["txn_id"]) == 1


@pytest.mark.parametrize("legacy,query_token", [(False, False), (True, True), (False, True)])
def test_paths_and_token_forms(world, legacy, query_token):
    hs, app = world(legacy_paths=legacy, token_in_query=query_token)
    _, alice = hs.create_user("alice")
    a = hs.as_user(alice)
    g = ghost(hs, "_cw_g")
    room = a.create_room(preset="public_chat")
    g.join(room)
    hs.wait_for(lambda: app.txns(), what="a transaction")
    r = a.request("POST", f"{C3}/rooms/{room}/invite", {"user_id": "@_cw_new:example.org"})
    assert err(r) == (404, "M_NOT_FOUND")
    put = [r for r in app.requests if r["method"] == "PUT"][0]
    query = [r for r in app.requests if r["method"] == "GET"][0]
    prefix = "" if legacy else "/_matrix/app/v1"
    assert put["path"] == prefix + "/transactions/1"
    assert query["path"] == prefix + "/users/%40_cw_new%3Aexample.org"
    for req in (put, query):
        if query_token:
            assert req["auth"] is None and req["query"] == {"access_token": HS_TOKEN}
        else:
            assert req["auth"] == "Bearer " + HS_TOKEN and req["query"] == {}
    ping = hs.appservice().request("POST", "/_matrix/client/v1/appservice/causeway/ping", {})
    versions = requests.get(hs.url + "/_matrix/client/versions").json()["versions"]
    if legacy or query_token:  # such homeservers predate the ping (Matrix 1.7)
        assert err(ping) == (404, "M_UNRECOGNIZED") and "v1.7" not in versions
    else:
        assert ping.status_code == 200 and "v1.7" in versions


@pytest.mark.parametrize("unstable,reg_keys,pushed", [
    (False, ("receive_ephemeral", "de.sorunome.msc2409.push_ephemeral"), True),
    (True, ("receive_ephemeral", "de.sorunome.msc2409.push_ephemeral"), True),
    (False, ("de.sorunome.msc2409.push_ephemeral",), False),
    (True, ("receive_ephemeral",), False),
])
def test_ephemeral_under_either_key(world, unstable, reg_keys, pushed):
    flags = {"receive_ephemeral": False, "de.sorunome.msc2409.push_ephemeral": False}
    flags.update({k: True for k in reg_keys})
    hs, app = world(reg_extra=flags, unstable_ephemeral=unstable)
    key, other = ("de.sorunome.msc2409.ephemeral", "ephemeral") if unstable else \
        ("ephemeral", "de.sorunome.msc2409.ephemeral")
    alice_id, alice = hs.create_user("alice")
    _, bob = hs.create_user("bob")
    a = hs.as_user(alice)
    lonely = a.create_room(preset="public_chat")  # no ghost there: nothing of it goes out
    hs.as_user(bob).join(lonely)
    a.typing(lonely, True, 30000)
    g = ghost(hs, "_cw_g")
    room = a.create_room(preset="public_chat")
    g.join(room)
    # 2 s: the second call comes before the first times out, however loaded the machine (session 35)
    a.typing(room, True, 2000)
    a.typing(room, True, 2000)  # still typing: no second EDU
    ev = a.send_text(room, "read me")
    g.read_receipt(room, ev)
    a.read_receipt(room, ev, "m.read.private")  # alice's private receipt is not the appservice's business
    g.read_receipt(room, ev, "m.read.private")
    hs.wait_for(lambda: ev in [e["event_id"] for e in app.events()], what="the message")
    if not pushed:
        time.sleep(0.3)
        assert app.ephemeral(key) == [] and app.ephemeral(other) == []
        return
    hs.wait_for(lambda: [e for e in app.ephemeral(key) if e["type"] == "m.typing" and
                         e["content"]["user_ids"] == []], what="the typing timeout")
    hs.wait_for(lambda: len([e for e in app.ephemeral(key) if e["type"] == "m.receipt"]) >= 2, what="the receipts")
    eph = app.ephemeral(key)
    assert app.ephemeral(other) == []
    typing = [e for e in eph if e["type"] == "m.typing"]
    assert [(e["room_id"], e["content"]["user_ids"]) for e in typing] == [(room, [alice_id]), (room, [])]
    receipts = [e for e in eph if e["type"] == "m.receipt"]
    assert [(e["room_id"], list(e["content"][ev])) for e in receipts] == [(room, ["m.read"]), (room, ["m.read.private"])]
    assert "@_cw_g:example.org" in receipts[0]["content"][ev]["m.read"]
    assert all(e["room_id"] != lonely for e in eph)


def test_users_query_on_invite_of_unknown_ghosts(world):
    hs, app = world()

    def answer(user_id):
        local = user_id[1:].split(":")[0]
        if local == "_cw_yes":  # the appservice registers it, then says yes
            ghost(hs, local)
            return 200
        return 200 if local == "_cw_liar" else 404

    app.user_handler = answer
    alice_id, alice = hs.create_user("alice")
    a = hs.as_user(alice)
    room = a.create_room()
    a.send_text(room, "before")
    inv = lambda u: a.request("POST", f"{C3}/rooms/{room}/invite", {"user_id": u})  # noqa: E731
    assert inv("@_cw_yes:example.org").status_code == 200
    assert hs.members(room)["@_cw_yes:example.org"] == "invite"
    assert err(inv("@_cw_no:example.org")) == (404, "M_NOT_FOUND")
    assert err(inv("@_cw_liar:example.org")) == (404, "M_NOT_FOUND")  # said yes, registered nobody
    assert err(inv("@nobody:example.org")) == (404, "M_NOT_FOUND")  # not the appservice's: not asked
    queried = [urllib.parse.unquote(r["path"]) for r in app.requests if r["method"] == "GET"]
    assert queried == ["/_matrix/app/v1/users/@_cw_yes:example.org", "/_matrix/app/v1/users/@_cw_no:example.org",
                       "/_matrix/app/v1/users/@_cw_liar:example.org"]
    assert all(r["auth"] == "Bearer " + HS_TOKEN for r in app.requests)
    # The invite reaches the appservice (its ghost is the target) ...
    hs.wait_for(lambda: [e for e in app.events() if e.get("state_key") == "@_cw_yes:example.org"])
    invite = [e for e in app.events() if e.get("state_key") == "@_cw_yes:example.org"][0]
    assert invite["content"]["membership"] == "invite" and invite["sender"] == alice_id
    assert {s["type"] for s in invite["unsigned"]["invite_room_state"]} >= {"m.room.create", "m.room.join_rules"}
    # ... but the room's other events only once a ghost is joined: invited is not enough.
    quiet = a.send_text(room, "while invited")
    ghost_client = hs.appservice("@_cw_yes:example.org")
    ghost_client.join(room)
    loud = a.send_text(room, "once joined")
    echo = ghost_client.send_text(room, "my own echo")
    hs.wait_for(lambda: echo in [e["event_id"] for e in app.events()])
    ids = [e["event_id"] for e in app.events()]
    assert quiet not in ids and loud in ids
    assert [e["content"]["body"] for e in app.events() if e["type"] == "m.room.message"] == \
        ["once joined", "my own echo"]


def test_rooms_query_on_join_of_unknown_alias(world):
    hs, app = world()
    bot = ghost(hs, "_cw_bot")

    def answer(alias):
        if alias != "#_cw_room:example.org":
            return 404
        room = bot.create_room(preset="public_chat", name="bridged")
        bot.call("PUT", f"{C3}/directory/room/{urllib.parse.quote(alias)}", {"room_id": room})
        return 200

    app.room_handler = answer
    _, alice = hs.create_user("alice")
    a = hs.as_user(alice)
    room = a.join("#_cw_room:example.org")
    assert hs.alias("#_cw_room:example.org") == room and hs.members(room)["@alice:example.org"] == "join"
    assert a.join("#_cw_room:example.org") == room  # known now: not asked again
    assert err(a.request("POST", f"{C3}/join/%23_cw_none:example.org", {})) == (404, "M_NOT_FOUND")
    assert err(a.request("POST", f"{C3}/join/%23other:example.org", {})) == (404, "M_NOT_FOUND")
    queried = [urllib.parse.unquote(r["path"]) for r in app.requests if r["method"] == "GET"]
    assert queried == ["/_matrix/app/v1/rooms/#_cw_room:example.org", "/_matrix/app/v1/rooms/#_cw_none:example.org"]
    # The namespace is the appservice's alone, and it has no other.
    mine = a.create_room()
    assert err(a.request("PUT", f"{C3}/directory/room/%23_cw_mine:example.org", {"room_id": mine})) == \
        (400, "M_EXCLUSIVE")
    assert err(a.request("POST", f"{C3}/createRoom", {"room_alias_name": "_cw_x"})) == (400, "M_EXCLUSIVE")
    assert err(bot.request("PUT", f"{C3}/directory/room/%23plain:example.org", {"room_id": room})) == \
        (400, "M_EXCLUSIVE")


def test_ping_round_trip_and_errors(world):
    hs, app = world(ping_timeout=0.3)
    ping = "/_matrix/client/v1/appservice/causeway/ping"
    r = hs.appservice().request("POST", ping, {"transaction_id": "meow"})
    assert r.status_code == 200 and isinstance(r.json()["duration_ms"], int)
    got = [x for x in app.requests if x["path"] == "/_matrix/app/v1/ping"]
    assert got[0]["method"] == "POST" and got[0]["body"] == {"transaction_id": "meow"}
    assert got[0]["auth"] == "Bearer " + HS_TOKEN
    app.ping_status = 403
    r = hs.appservice().request("POST", ping, {})
    assert err(r) == (502, "M_BAD_STATUS") and r.json()["status"] == 403 and "M_FORBIDDEN" in r.json()["body"]
    app.ping_status = 200
    app.ping_delay = 1.0
    assert err(hs.appservice().request("POST", ping, {})) == (504, "M_CONNECTION_TIMEOUT")
    app.ping_delay = 0
    _, alice = hs.create_user("alice")
    assert err(hs.as_user(alice).request("POST", ping, {})) == (403, "M_FORBIDDEN")
    assert err(requests.post(hs.url + ping, json={})) == (401, "M_MISSING_TOKEN")
    assert err(hs.appservice().request("POST", "/_matrix/client/v1/appservice/other/ping", {})) == (403, "M_FORBIDDEN")
    assert err(hs.appservice().request("POST", ping, {"transaction_id": 5})) == (400, "M_BAD_JSON")
    assert err(hs.appservice().request("POST", ping)) == (400, "M_NOT_JSON")
    url = hs.registration["url"]
    hs.registration["url"] = f"http://127.0.0.1:{free_port()}"
    assert err(hs.appservice().request("POST", ping, {})) == (502, "M_CONNECTION_FAILED")
    hs.registration["url"] = None
    assert err(hs.appservice().request("POST", ping, {})) == (400, "M_URL_NOT_SET")
    hs.registration["url"] = url
    assert hs.appservice().request("POST", ping, {}).status_code == 200


def test_rooms_of_others_are_not_pushed(world):
    hs, app = world()
    _, alice = hs.create_user("alice")
    bob_id, bob = hs.create_user("bob")
    a = hs.as_user(alice)
    room = a.create_dm(bob_id)
    hs.as_user(bob).join(room)
    a.send_text(room, "private")
    g = ghost(hs, "_cw_g")
    mine = g.create_room()
    hs.wait_for(lambda: len(app.events()) == len(hs.events(mine)))
    time.sleep(0.1)
    assert {e["room_id"] for e in app.events()} == {mine}


def test_dm_profile_redaction_and_reads(world):
    hs, app = world()
    alice_id, alice = hs.create_user("alice")
    a = hs.as_user(alice)
    g = ghost(hs, "_cw_g")
    room = g.create_dm(alice_id)
    invite = [e for e in hs.events(room) if e.get("state_key") == alice_id][0]
    assert invite["content"] == {"membership": "invite", "is_direct": True, "displayname": "alice"}
    assert hs.state(room, "m.room.join_rules")["content"] == {"join_rule": "invite"}
    a.join(room)
    assert g.joined_members(room) == {alice_id: {"display_name": "alice"},
                                      "@_cw_g:example.org": {"display_name": "_cw_g"}}
    g.set_displayname("wally (gk)")
    assert hs.profile("@_cw_g:example.org")["displayname"] == "wally (gk)"
    member = hs.state(room, "m.room.member", "@_cw_g:example.org")
    assert member["content"]["displayname"] == "wally (gk)"
    assert member["unsigned"]["prev_content"]["displayname"] == "_cw_g"
    assert err(a.request("PUT", f"{C3}/profile/%40_cw_g%3Aexample.org/displayname", {"displayname": "x"})) == \
        (403, "M_FORBIDDEN")
    assert err(g.request("PUT", f"{C3}/profile/%40_cw_g%3Aexample.org/avatar_url", {"avatar_url": "http://x"})) == \
        (400, "M_INVALID_PARAM")
    # Messages, edits, reactions, redactions.
    ev = a.send_text(room, "hello", formatted="<b>hello</b>")
    assert g.call("GET", f"{C3}/rooms/{room}/event/{urllib.parse.quote(ev)}")["content"]["formatted_body"] == \
        "<b>hello</b>"
    reply = g.send_text(room, "hi", reply_to=ev)
    assert hs.event(reply)["content"]["m.relates_to"] == {"m.in_reply_to": {"event_id": ev}}
    g.edit(room, reply, "hi!")
    g.react(room, ev, "👍")
    assert err(g.request("PUT", f"{C3}/rooms/{room}/send/m.reaction/dup", {
        "m.relates_to": {"rel_type": "m.annotation", "event_id": ev, "key": "👍"}})) == (400, "M_DUPLICATE_ANNOTATION")
    red = a.redact(room, ev, reason="oops")
    assert hs.event(ev)["content"] == {} and hs.event(ev)["unsigned"]["redacted_because"]["event_id"] == red
    assert hs.event(red)["redacts"] == ev and hs.event(red)["content"] == {"reason": "oops"}
    # State: present, absent.
    assert g.get_state(room, "m.room.join_rules") == {"join_rule": "invite"}
    assert err(g.request("GET", f"{C3}/rooms/{room}/state/m.room.name/")) == (404, "M_NOT_FOUND")
    assert err(g.request("PUT", f"{C3}/rooms/{room}/state/m.room.topic/%40alice%3Aexample.org", {"topic": "x"})) == \
        (403, "M_FORBIDDEN")
    # Content a homeserver refuses.
    assert err(g.request("PUT", f"{C3}/rooms/{room}/send/m.room.message/f", {"msgtype": "m.text", "body": "x",
                                                                              "n": 1.5})) == (400, "M_BAD_JSON")
    # Only from room version 6 (Synapse's strict canonical JSON): a version
    # 5 room takes any number a JSON encoder can write back.
    old = g.create_room(room_version="5")
    big = g.send(old, "m.room.message", {"msgtype": "m.text", "body": "x", "n": 1.5, "b": 10 ** 25})
    assert hs.event(big)["content"]["b"] == 10 ** 25
    assert err(g.request("PUT", f"{C3}/rooms/{old}/send/m.room.message/inf", raw=b'{"n": 1e400}')) == \
        (400, "M_BAD_JSON")
    assert err(g.request("PUT", f"{C3}/rooms/{room}/send/m.room.message/big",
                         {"msgtype": "m.text", "body": "x" * 70000})) == (413, "M_TOO_LARGE")
    # Typing and receipts need membership and one's own user.
    assert err(a.request("PUT", f"{C3}/rooms/{room}/typing/%40_cw_g%3Aexample.org", {"typing": True,
                                                                                      "timeout": 1000})) == \
        (403, "M_FORBIDDEN")
    assert err(a.request("PUT", f"{C3}/rooms/{room}/typing/%40alice%3Aexample.org", {"typing": True})) == \
        (400, "M_MISSING_PARAM")
    assert err(a.request("POST", f"{C3}/rooms/{room}/receipt/m.bogus/{urllib.parse.quote(reply)}", {})) == \
        (400, "M_INVALID_PARAM")
    # Members of another room may not look in.
    _, carol = hs.create_user("carol")
    c = hs.as_user(carol)
    assert err(c.request("GET", f"{C3}/rooms/{room}/joined_members")) == (403, "M_FORBIDDEN")
    assert err(c.request("GET", f"{C3}/rooms/{room}/members")) == (403, "M_FORBIDDEN")
    assert err(c.request("GET", f"{C3}/rooms/{room}/messages", query={"dir": "b"})) == (403, "M_FORBIDDEN")
    chunk = a.call("GET", f"{C3}/rooms/{room}/messages", query={"dir": "b", "limit": "2"})["chunk"]
    assert [e["type"] for e in chunk] == ["m.room.redaction", "m.reaction"]
    hs.wait_for(lambda: red in [e["event_id"] for e in app.events()])
    # An event it does not have: taken, 200, redacting nothing, as Synapse
    # (until the thirtieth session 404 M_NOT_FOUND here).
    nope = a.call("PUT", f"{C3}/rooms/{room}/redact/%24nope/t1", {})["event_id"]
    assert hs.event(nope)["redacts"] == "$nope" and hs.event(reply)["content"]["body"] == "hi"
    # The body is the content, whole (Synapse's /redact): in a version 10
    # room a redacts there is mere content.
    other = a.send_text(room, "other")
    red2 = a.call("PUT", f"{C3}/rooms/{room}/redact/{urllib.parse.quote(other)}/t2",
                  {"redacts": reply, "reason": "x"})["event_id"]
    assert hs.event(red2)["redacts"] == other and hs.event(red2)["content"] == {"redacts": reply, "reason": "x"}
    assert hs.event(other)["content"] == {} and hs.event(reply)["content"]["body"] == "hi"
    # The member events, filtered as asked: carol invited, then the lists.
    a.invite(room, "@carol:example.org")
    members = lambda **q: sorted((e["state_key"], e["content"]["membership"]) for e in a.call(
        "GET", f"{C3}/rooms/{room}/members", query=q)["chunk"])
    assert members() == sorted([("@_cw_g:example.org", "join"), ("@carol:example.org", "invite"), (alice_id, "join")])
    assert members(membership="invite") == [("@carol:example.org", "invite")]
    assert members(not_membership="join") == [("@carol:example.org", "invite")]
    assert err(a.request("GET", f"{C3}/rooms/{room}/members", query={"membership": "joined"})) == \
        (400, "M_INVALID_PARAM")


def test_power_levels_and_kicks_follow_the_authorization_rules(world):
    """A trusted private chat's invitee has the creator's level, so neither
    may kick the other; nobody gives a level above their own, nor changes
    one at or above it (but their own); a member invited by their
    m.room.member state event carries is_direct, as createRoom's would."""
    hs, _ = world()
    alice_id, alice = hs.create_user("alice")
    bob_id, bob = hs.create_user("bob")
    a, b = hs.as_user(alice), hs.as_user(bob)
    g = ghost(hs, "_cw_g")
    gid = "@_cw_g:example.org"
    trusted = g.create_dm(alice_id)
    assert hs.state(trusted, "m.room.power_levels")["content"]["users"] == {gid: 100, alice_id: 100}
    assert err(g.request("POST", f"{C3}/rooms/{trusted}/kick", {"user_id": alice_id})) == (403, "M_FORBIDDEN")
    assert hs.members(trusted)[alice_id] == "invite"
    # Made without her, she is invited by her member event, and given a level.
    room = g.create_room(preset="trusted_private_chat", is_direct=True)
    pl = hs.state(room, "m.room.power_levels")["content"]
    assert pl["users"] == {gid: 100}
    path = f"{C3}/rooms/{room}/state/m.room.power_levels/"
    assert err(g.request("PUT", path, dict(pl, users={gid: 100, alice_id: 101}))) == (403, "M_FORBIDDEN")
    assert err(g.request("PUT", path, dict(pl, users={gid: 100, alice_id: "100"}))) == (400, "M_BAD_JSON")
    assert err(g.request("PUT", path, dict(pl, kick=101))) == (403, "M_FORBIDDEN")
    assert g.request("PUT", path, dict(pl, users={gid: 100, alice_id: 100})).status_code == 200
    g.state(room, "m.room.member", {"membership": "invite", "is_direct": True}, state_key=alice_id)
    assert hs.state(room, "m.room.member", alice_id)["content"]["is_direct"] is True
    a.join(room)
    # Equal levels: neither lowers the other, each may lower themselves.
    assert err(a.request("PUT", path, dict(pl, users={gid: 0, alice_id: 100}))) == (403, "M_FORBIDDEN")
    # A private chat's invitee (0) is the creator's to kick.
    portal = g.create_room(preset="private_chat", invite=[bob_id])
    assert g.request("POST", f"{C3}/rooms/{portal}/kick", {"user_id": bob_id}).status_code == 200
    assert hs.members(portal)[bob_id] == "leave"
    assert err(b.request("POST", f"{C3}/rooms/{portal}/join", {})) == (403, "M_FORBIDDEN")


def test_stop_resume_and_reset_of_txn_ids(world):
    hs, app = world()
    g = ghost(hs, "_cw_g")
    room = g.create_room()
    hs.wait_for(lambda: len(app.events()) == len(hs.events(room)))
    hs.stop_pushing()
    e1 = g.send_text(room, "held")
    time.sleep(0.15)
    assert e1 not in [e["event_id"] for e in app.events()]
    hs.resume_pushing()
    hs.wait_for(lambda: e1 in [e["event_id"] for e in hs.pushed_events()])
    assert app.txns()[-1][0] != "1"
    hs.reset_txn_ids()
    e2 = g.send_text(room, "after a reset")
    hs.wait_for(lambda: e2 in [e["event_id"] for e in hs.pushed_events()])
    assert app.txns()[-1][0] == "1"
    assert [e["event_id"] for e in hs.pushed_events()][-2:] == [e1, e2]


def test_history_visibility_filters_what_a_member_reads(world):
    """/messages and /event give what the room's history visibility lets
    the requester read (Synapse's filter_events_for_client): `joined`,
    from her join on; `invited`, from her invitation on; `shared`, all."""
    hs, _ = world()
    _, alice = hs.create_user("alice")
    bob_id, bob = hs.create_user("bob")
    a, b = hs.as_user(alice), hs.as_user(bob)
    for visibility, seen in (("joined", ["after"]), ("invited", ["invited", "after"]),
                             ("shared", ["before", "invited", "after"])):
        room = a.create_room(preset="private_chat", initial_state=[
            {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": visibility}}])
        early = a.send_text(room, "before")
        a.invite(room, bob_id)
        a.send_text(room, "invited")
        b.join(room)
        a.send_text(room, "after")
        page = b.call("GET", f"{C3}/rooms/{room}/messages", query={"dir": "b", "limit": "100"})
        assert [e["content"]["body"] for e in reversed(page["chunk"]) if e["type"] == "m.room.message"] == seen
        assert "end" in page
        r = b.request("GET", f"{C3}/rooms/{room}/event/{urllib.parse.quote(early)}")
        assert (r.status_code == 200) == (visibility == "shared"), (visibility, r.text)


def test_an_upgrade_makes_a_new_room_with_nobody_else_in_it(world):
    """POST /rooms/{id}/upgrade as the specification's server behaviour
    says: a new room with a predecessor, the transferable state copied,
    nobody invited; a tombstone in the old room, whose events_default and
    invite are raised to 50; only who may send a tombstone may upgrade."""
    hs, _ = world()
    _, alice = hs.create_user("alice")
    bob_id, bob = hs.create_user("bob")
    a, b = hs.as_user(alice), hs.as_user(bob)
    room = a.create_room(preset="private_chat", name="ours", invite=[bob_id])
    b.join(room)
    r = b.request("POST", f"{C3}/rooms/{room}/upgrade", {"new_version": "11"})
    assert err(r) == (403, "M_FORBIDDEN")
    assert err(a.request("POST", f"{C3}/rooms/{room}/upgrade", {"new_version": "99"})) == \
        (400, "M_UNSUPPORTED_ROOM_VERSION")
    new = a.upgrade(room, "11")
    assert hs.state(room, "m.room.tombstone")["content"]["replacement_room"] == new
    assert hs.state(new, "m.room.create")["content"]["predecessor"]["room_id"] == room
    assert hs.state(new, "m.room.name")["content"]["name"] == "ours"
    assert hs.members(new) == {"@alice:example.org": "join"}
    pl = hs.state(room, "m.room.power_levels")["content"]
    assert pl["events_default"] == 50 and pl["invite"] == 50
    msg = {"msgtype": "m.text", "body": "x"}
    assert err(b.request("PUT", f"{C3}/rooms/{room}/send/m.room.message/late", msg)) == (403, "M_FORBIDDEN")


def test_relations_give_an_events_annotations_newest_first_by_page(world):
    """GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]] (Matrix 1.3): the
    events relating to the parent, filtered by relation and type, newest first (dir=b, the default), in pages
    joined by next_batch; a redacted annotation is none (its m.relates_to is gone); an unknown parent is 404,
    a room the requester is not in 403."""
    hs, _ = world()
    alice_id, alice = hs.create_user("alice")
    a = hs.as_user(alice)
    g = ghost(hs, "_cw_g")
    room = g.create_dm(alice_id)
    a.join(room)
    ev = a.send_text(room, "react to me")
    keys = ["1", "2", "3", "4", "5"]
    mine = [g.react(room, ev, k) for k in keys]
    hers = a.react(room, ev, "1")
    g.send_text(room, "a reply", reply_to=ev)
    a.redact(room, hers)
    rel = f"/_matrix/client/v1/rooms/{urllib.parse.quote(room)}/relations/{urllib.parse.quote(ev)}"
    got, frm = [], None
    while True:
        page = g.call("GET", rel + "/m.annotation/m.reaction", query=dict({"limit": "2"}, **({"from": frm} if frm
                                                                                              else {})))
        got += [(e["sender"], e["content"]["m.relates_to"]["key"], e["event_id"]) for e in page["chunk"]]
        frm = page.get("next_batch")
        if not frm:
            break
    assert got == [("@_cw_g:example.org", k, e) for k, e in reversed(list(zip(keys, mine)))]
    forward = g.call("GET", rel + "/m.annotation", query={"dir": "f", "limit": "100"})["chunk"]
    assert [e["event_id"] for e in forward] == mine and "next_batch" not in g.call(
        "GET", rel + "/m.annotation", query={"limit": "100"})
    assert [e["type"] for e in g.call("GET", rel, query={"limit": "100"})["chunk"]] == ["m.reaction"] * 5
    assert err(g.request("GET", f"/_matrix/client/v1/rooms/{urllib.parse.quote(room)}/relations/%24nope")) == \
        (404, "M_NOT_FOUND")
    _, carol = hs.create_user("carol")
    assert err(hs.as_user(carol).request("GET", rel)) == (403, "M_FORBIDDEN")


def test_a_request_whose_effect_shows_is_already_in_requests(world):
    """requests agrees with what the stand-in shows: once a test sees a request's effect (an event in the
    room, a user registered, a profile, an alias, a file), the request is in requests with its status.
    Until the sixty-second session a request was recorded only after its handler had returned, so a test
    that saw the bot's notice in the room could read requests before the send was in it (stop 75's CI:
    min() of nothing); a slow lose_reply, asked between the two, widens that moment to a second here.  A
    request only begun (an upload still taking its upload_latency) is not waited for."""
    hs, _ = world()
    alice_id, alice = hs.create_user("alice")
    a = hs.as_user(alice)
    room = a.create_room(preset="public_chat")
    g = ghost(hs, "_cw_ghost")
    g.join(room)
    slow = {"on": True}

    def lose_reply(method, path, user):
        if slow["on"]:
            time.sleep(1.0)
        return False
    hs.lose_reply = lose_reply

    def upload(data, name):
        r = requests.post(hs.url + "/_matrix/media/v3/upload", params={"filename": name}, data=data, timeout=10,
                          headers={"Authorization": "Bearer " + alice, "Content-Type": "text/plain"})
        assert r.status_code == 200, r.text

    oid = "@_cw_other:example.org"
    cases = [
        ("a send", lambda: a.send_text(room, "hello"), "/send/",
         lambda: any(e["content"].get("body") == "hello" for e in hs.events(room))),
        ("a registration", lambda: ghost(hs, "_cw_other"), "/register",
         lambda: hs.user_exists(oid)),
        ("a profile", lambda: hs.appservice(oid).call("PUT", f"{C3}/profile/{oid}/displayname", {"displayname": "O"}),
         "/profile/", lambda: (hs.profile(oid) or {}).get("displayname") == "O"),  # in no room: no member event
        ("an alias", lambda: g.call("PUT", C3 + "/directory/room/%23_cw_a:example.org", {"room_id": room}),
         "/directory/room/", lambda: hs.alias("#_cw_a:example.org") == room),
        ("an upload", lambda: upload(b"a file", "f.txt"), "/upload", lambda: b"a file" in hs.uploaded()),
    ]
    for what, call, path, seen in cases:
        n = len(hs.requests)
        t = threading.Thread(target=call)
        t.start()
        try:
            hs.wait_for(seen, timeout=10, what=what)
            recs = [q for q in hs.requests[n:] if path in q["path"]]
            assert len(recs) == 1 and recs[0]["status"] == 200 and recs[0]["lost"] is False, (what, recs)
        finally:
            t.join()
    slow["on"] = False
    hs.upload_latency = 3.0
    t = threading.Thread(target=upload, args=(b"a slow file", "s.txt"))
    t.start()
    try:
        hs.wait_for(lambda: hs.uploads_started == 2, what="the slow upload begun")
        began = time.monotonic()
        n = len([q for q in hs.requests if q["path"].endswith("/upload")])
        assert time.monotonic() - began < 1.0 and n == 1
    finally:
        t.join()
    assert len([q for q in hs.requests if q["path"].endswith("/upload")]) == 2
