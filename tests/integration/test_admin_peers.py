"""/admin/v1/peers: the operator creates, lists, disables and rotates peers."""
import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harness import HeldSession, wait_until
from peer import PeerClient
from pgproxy import PgProxy


def new_key():
    k = Ed25519PrivateKey.generate()
    raw = k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return k, base64.b64encode(raw).decode()


def peer_body(name="gk", domain="wa.example", **kw):
    _, pub = new_key()
    body = {"name": name, "domain": domain, "mode": "push", "push_url": "http://127.0.0.1:9/notify",
            "public_key": pub}
    body.update(kw)
    return body


def test_admin_routes_need_the_admin_token(daemon):
    for method, path in [("GET", "/peers"), ("POST", "/peers"), ("GET", "/peers/gk"),
                         ("POST", "/peers/gk/disable"), ("POST", "/peers/gk/rotate"), ("PATCH", "/peers/gk")]:
        r = daemon.request(method, "/admin/v1" + path)
        assert r.status_code == 401, (method, path)
        assert r.json()["code"] == "unauthenticated"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = daemon.request(method, "/admin/v1" + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401


def test_admin_api_off_without_a_configured_hash(make_daemon, db_url):
    d = make_daemon(db_url, options={"admin": {"token_sha256": ""}}).start()
    r = d.admin("GET", "/peers")
    assert r.status_code == 403 and r.json()["code"] == "admin_disabled"


def test_create_shows_the_token_once_and_stores_only_its_hash(daemon, pg, db_url):
    body = peer_body()
    r = daemon.admin("POST", "/peers", json=body)
    assert r.status_code == 201, r.text
    p = r.json()
    token = p["token"]
    assert token.startswith("cwp_") and len(token) > 40
    assert p["name"] == "gk" and p["domain"] == "wa.example" and p["mode"] == "push"
    assert p["public_key"] == body["public_key"] and p["enabled"] is True
    stored = pg.psql("SELECT encode(token_hash, 'hex') FROM peers WHERE name = 'gk'", db_url)
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    assert token not in pg.psql("SELECT row_to_json(peers)::text FROM peers", db_url)
    # Listing and reading never show a token.
    listed = daemon.admin("GET", "/peers").json()["peers"]
    assert [x["name"] for x in listed] == ["gk"] and "token" not in listed[0]
    one = daemon.admin("GET", "/peers/gk").json()
    assert one["domain"] == "wa.example" and "token" not in one
    assert daemon.admin("GET", "/peers/nope").status_code == 404
    # The change is audited.
    assert pg.psql("SELECT actor || ' ' || action || ' ' || subject FROM audit_log", db_url) == \
        "admin:config peer.create gk"


def test_a_creation_whose_commit_was_not_answered_says_to_look_first(make_daemon, db_url, pg):
    """The commit of a peer's creation ran and its answer was lost: 503,
    "it may have been stored", and no advice to retry with an
    Idempotency-Key, which no admin route takes: the peer was stored, and
    a repeat is 409.  Until the twenty-third session the answer said a
    retry with the same key was not done twice (a review's finding)."""
    with PgProxy(db_url) as px:
        d = make_daemon(px.url).start()
        px.cut_commit_matching(lambda s: s.startswith("INSERT INTO peers"))
        r = d.admin("POST", "/peers", json=peer_body(), headers={"Idempotency-Key": "k1"})
        assert px.cuts == 1
        assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
        detail = r.json()["detail"]
        assert "may have been stored" in detail and "look before you repeat it" in detail, detail
        assert "is not done twice" not in detail
        assert pg.psql("SELECT name FROM peers", db_url) == "gk"
        wait_until(lambda: d.admin("POST", "/peers", json=peer_body(),
                                   headers={"Idempotency-Key": "k1"}).status_code == 409,
                   what="the repeat refused as existing")


def test_duplicates_conflict(daemon):
    assert daemon.admin("POST", "/peers", json=peer_body()).status_code == 201
    r = daemon.admin("POST", "/peers", json=peer_body())
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    r = daemon.admin("POST", "/peers", json=peer_body(name="other"))  # same domain
    assert r.status_code == 409
    # A domain under or above another peer's: a peer's domain covers the
    # names under it (Causeway signs its fetches there), so none may nest.
    for name, domain, where in (("eu", "eu.wa.example", "under"), ("deep", "a.b.wa.example", "under")):
        r = daemon.admin("POST", "/peers", json=peer_body(name=name, domain=domain))
        assert r.status_code == 409 and f"is {where} peer gk's domain wa.example" in r.json()["detail"], r.text
    assert daemon.admin("POST", "/peers", json=peer_body(name="deep", domain="x.zz.example")).status_code == 201
    r = daemon.admin("POST", "/peers", json=peer_body(name="zz", domain="zz.example"))
    assert r.status_code == 409 and "is above peer deep's domain x.zz.example" in r.json()["detail"], r.text
    # on a label boundary only: awa.example is not under wa.example
    assert daemon.admin("POST", "/peers", json=peer_body(name="look", domain="awa.example")).status_code == 201



def test_a_key_another_peer_has_or_the_providers_own_is_refused(daemon, pg, db_url):
    """One public key, one peer: a create or a rotation with the key of
    another peer, enabled or disabled (it may be enabled again), is 409
    conflict naming it, and nothing is stored, issued or audited; the
    provider's own key (what its directory publishes) is 400 invalid_body.
    Until the forty-fifth session both were taken."""
    gk = peer_body()
    assert daemon.admin("POST", "/peers", json=gk).status_code == 201
    facts = "SELECT (SELECT string_agg(name || encode(token_hash, 'hex') || encode(ed25519_public_key, 'hex'), " \
            "',' ORDER BY name) FROM peers) || ' ' || (SELECT string_agg(action, ',' ORDER BY id) FROM audit_log)"
    before = pg.psql(facts, db_url)
    r = daemon.admin("POST", "/peers", json=peer_body(name="tg", domain="tg.example", public_key=gk["public_key"]))
    assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
    assert "public_key is peer gk's:" in r.json()["detail"] and "token" not in r.json(), r.text
    assert r.headers["Content-Type"] == "application/problem+json"
    assert pg.psql(facts, db_url) == before
    assert daemon.admin("POST", "/peers/gk/disable").status_code == 200
    before = pg.psql(facts, db_url)
    r = daemon.admin("POST", "/peers", json=peer_body(name="tg", domain="tg.example", public_key=gk["public_key"]))
    assert r.status_code == 409 and "peer gk's (disabled: its key still counts)" in r.json()["detail"], r.text
    assert pg.psql(facts, db_url) == before
    tg = peer_body(name="tg", domain="tg.example")
    assert daemon.admin("POST", "/peers", json=tg).status_code == 201
    before = pg.psql(facts, db_url)
    r = daemon.admin("POST", "/peers/tg/rotate", json={"public_key": gk["public_key"]})
    assert r.status_code == 409 and "public_key is peer gk's" in r.json()["detail"] and "token" not in r.json()
    assert pg.psql(facts, db_url) == before
    # A peer's own key again is no conflict (a rotation of the token alone, said so).
    r = daemon.admin("POST", "/peers/tg/rotate", json={"public_key": tg["public_key"]})
    assert r.status_code == 200 and r.json()["public_key"] == tg["public_key"], r.text
    # The provider's own key.
    own = daemon.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    own = base64.b64encode(base64.b64decode(own + "=" * (-len(own) % 4), altchars=b"-_")).decode()
    before = pg.psql(facts, db_url)
    for method, path, body in (("POST", "/peers", peer_body(name="ow", domain="ow.example", public_key=own)),
                               ("POST", "/peers/tg/rotate", {"public_key": own})):
        r = daemon.admin(method, path, json=body)
        assert r.status_code == 400 and r.json()["code"] == "invalid_body", (path, r.text)
        assert "public_key is this provider's own" in r.json()["detail"], r.text
    assert pg.psql(facts, db_url) == before


def test_a_rotation_of_no_peer_is_404_whatever_its_key(daemon, pg, db_url):
    """The name first: a rotation of a name no peer has is 404 not_found,
    also with another peer's key (until the forty-fifth session's review
    that was 409, naming the other peer); nothing is stored or audited."""
    gk = peer_body()
    assert daemon.admin("POST", "/peers", json=gk).status_code == 201
    facts = "SELECT (SELECT string_agg(name, ',') FROM peers) || ' ' || (SELECT count(*) FROM audit_log)"
    before = pg.psql(facts, db_url)
    for body in ({"public_key": gk["public_key"]}, {"public_key": new_key()[1]}, None):
        r = daemon.admin("POST", "/peers/nosuch/rotate", json=body)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (body, r.text)
    assert pg.psql(facts, db_url) == before


def test_a_disabled_peer_sharing_an_enabled_peers_key_is_not_enabled(daemon, pg, db_url):
    """Two peers stored before the forty-fifth session may share a key
    (no migration refuses them): at most one of them may be enabled. An
    enable of the disabled one while the other is enabled is 409 conflict
    naming it, nothing changed or audited (until that session's review it
    was enabled, and what the one signed verified as the other's); once
    the other is disabled, or this one's key rotated, it is enabled."""
    gk, tg = peer_body(), peer_body(name="tg", domain="tg.example")
    assert daemon.admin("POST", "/peers", json=gk).status_code == 201
    assert daemon.admin("POST", "/peers", json=tg).status_code == 201
    assert daemon.admin("POST", "/peers/tg/disable").status_code == 200
    # as stored before the check
    pg.psql("UPDATE peers SET ed25519_public_key = (SELECT ed25519_public_key FROM peers WHERE name = 'gk') "
            "WHERE name = 'tg'", db_url)
    facts = "SELECT (SELECT string_agg(name || enabled::text, ',' ORDER BY name) FROM peers) || ' ' || " \
            "(SELECT string_agg(action, ',' ORDER BY id) FROM audit_log)"
    before = pg.psql(facts, db_url)
    r = daemon.admin("POST", "/peers/tg/enable")
    assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
    assert "also enabled peer gk's" in r.json()["detail"], r.text
    assert pg.psql(facts, db_url) == before
    # an enabled one enabled again is answered as it is
    assert daemon.admin("POST", "/peers/gk/enable").status_code == 200
    # the other off: this one may be on (and then the other may not)
    assert daemon.admin("POST", "/peers/gk/disable").status_code == 200
    r = daemon.admin("POST", "/peers/tg/enable")
    assert r.status_code == 200 and r.json()["enabled"] is True, r.text
    r = daemon.admin("POST", "/peers/gk/enable")
    assert r.status_code == 409 and "also enabled peer tg's" in r.json()["detail"], r.text
    # a key of its own: enabled
    assert daemon.admin("POST", "/peers/gk/rotate", json={"public_key": new_key()[1]}).status_code == 200
    assert daemon.admin("POST", "/peers/gk/enable").status_code == 200
    assert pg.psql("SELECT string_agg(name || enabled::text, ',' ORDER BY name) FROM peers", db_url) == \
        "gktrue,tgtrue"


def test_creates_of_one_key_at_once_make_one_peer(daemon, pg, db_url):
    """Of several creates with one key at once, one is made and the others
    are 409, never two peers of one key (in one process its writer's one
    connection orders them; across processes the lock does:
    test_creates_of_one_key_in_two_processes_take_turns_on_a_lock)."""
    from concurrent.futures import ThreadPoolExecutor
    _, key = new_key()
    bodies = [peer_body(name=f"p{i}", domain=f"p{i}.example", public_key=key) for i in range(6)]
    with ThreadPoolExecutor(len(bodies)) as ex:
        got = sorted(r.status_code for r in ex.map(lambda b: daemon.admin("POST", "/peers", json=b), bodies))
    assert got == [201] + [409] * 5, got
    assert pg.psql("SELECT count(*) FROM peers", db_url) == "1"


def test_creates_of_one_key_in_two_processes_take_turns_on_a_lock(make_daemon, db_url, pg):
    """Two processes each write on a connection of their own: without a
    lock, a create in each could find one key free and both store it.  They
    take turns on PEER_KEY_LOCK_KEY (adapters/peer/peers.c): while another
    session holds it, a create in each process waits for it; once it is
    let go, one peer is made and the other create is 409.  (The test of one
    process above passes without the lock: its writer orders the creates.)"""
    from concurrent.futures import ThreadPoolExecutor
    lock_key = 7161132091431352701
    waiting = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = %d "
               "AND objid = %d AND objsubid = 1" % (lock_key >> 32, lock_key & 0xffffffff))
    d1, d2 = make_daemon(db_url).start(), make_daemon(db_url).start()
    _, key = new_key()
    held = HeldSession(db_url)
    try:
        held.run(f"BEGIN; SELECT pg_advisory_xact_lock({lock_key});")
        with ThreadPoolExecutor(2) as ex:
            creates = [ex.submit(d.admin, "POST", "/peers",
                                 json=peer_body(name=f"p{i}", domain=f"p{i}.example", public_key=key))
                       for i, d in enumerate((d1, d2))]
            wait_until(lambda: pg.psql(waiting, db_url) == "2", what="a create of each process waiting for the lock")
            assert not any(f.done() for f in creates)
            held.run("COMMIT;")
            got = sorted(f.result().status_code for f in creates)
    finally:
        held.end()
    assert got == [201, 409], got
    assert pg.psql("SELECT count(*) FROM peers", db_url) == "1"


def test_a_change_the_database_refuses_by_a_constraint_is_409_and_stores_nothing(daemon, pg, db_url):
    """A write refused by a unique or foreign key of the database (SQLSTATE
    23505/23503: in real use a key a concurrent change's commit took; here
    a unique index added for the test) is the documented 409 conflict with
    Retry-After (docs/admin-api.md, "Conventions"; the ConcurrentChange
    response of docs/admin-openapi.json), and the transaction is rolled
    back: the peer is not disabled, nothing is audited.  A CHECK the
    route's own checks let through is no race: 500 internal, nothing
    stored either (until the forty-fifth session it too was "retry")."""
    assert daemon.admin("POST", "/peers", json=peer_body()).status_code == 201
    pg.psql("INSERT INTO audit_log (actor, action) VALUES ('test', 'peer.disable'); "
            "CREATE UNIQUE INDEX test_one_disable ON audit_log (action) WHERE action = 'peer.disable'", db_url)
    try:
        r = daemon.admin("POST", "/peers/gk/disable")
    finally:
        pg.psql("DROP INDEX test_one_disable; DELETE FROM audit_log WHERE actor = 'test'", db_url)
    assert r.status_code == 409 and r.headers["Content-Type"] == "application/problem+json", r.text
    assert r.headers["Retry-After"] == "1"
    p = r.json()
    assert p["code"] == "conflict" and p["detail"] == "a concurrent request changed the same data; retry the request"
    doc = daemon.get("/admin/v1/openapi.json").json()
    assert doc["paths"]["/admin/v1/peers/{name}/disable"]["post"]["responses"]["409"] == \
        {"$ref": "#/components/responses/ConcurrentChange"}
    assert doc["components"]["responses"]["ConcurrentChange"]["content"]["application/problem+json"]["schema"][
        "allOf"][1]["properties"]["code"]["enum"] == [p["code"]]
    pg.psql("ALTER TABLE audit_log ADD CONSTRAINT test_no_disable CHECK (action <> 'peer.disable') NOT VALID",
            db_url)
    try:
        r = daemon.admin("POST", "/peers/gk/disable")
    finally:
        pg.psql("ALTER TABLE audit_log DROP CONSTRAINT test_no_disable", db_url)
    assert r.status_code == 500 and r.json()["code"] == "internal", r.text
    assert "Retry-After" not in r.headers
    assert pg.psql("SELECT enabled FROM peers WHERE name = 'gk'", db_url) == "t"
    assert pg.psql("SELECT string_agg(action, ',') FROM audit_log", db_url) == "peer.create"
    # and again, now that nothing refuses it: done
    assert daemon.admin("POST", "/peers/gk/disable").json()["enabled"] is False

BAD = [
    ({"name": ""}, "name"),
    ({"name": "UPPER"}, "name"),
    ({"name": "a" * 33}, "name"),
    ({"name": "-x"}, "name"),
    ({"name": "x'; DROP TABLE peers; --"}, "name"),
    ({"name": 5}, "name"),
    ({"domain": "Wa.Example"}, "domain"),
    ({"domain": "nodot"}, "domain"),
    ({"domain": "a..b"}, "domain"),
    ({"domain": "-a.b"}, "domain"),
    ({"domain": "192.0.2.1"}, "domain"),  # no mimi:// URI has it (stored until the twenty-first session)
    ({"domain": "a" * 64 + ".example"}, "domain"),
    ({"domain": "example.org"}, "domain is one of this provider's own"),  # server.domain: no speaking for locals
    ({"mode": "carrier-pigeon"}, "mode"),
    ({"mode": 7}, "mode"),  # not taken as absent (a push peer) since the twenty-first session
    ({"mode": None}, "mode"),
    ({"event_type": ["message"]}, "unknown member 'event_type'"),  # misspelt: would take every type
    ({"publicKey": "x"}, "unknown member 'publicKey'"),
    # a name cut at 64 bytes inside a character in the detail (a bare 500
    # until the twenty-third session)
    ({"a" * 63 + "\u00e9": 1}, "unknown member '" + "a" * 63),
    ({"push_url": None}, "push_url"),
    ({"push_url": "ftp://x/y"}, "push_url"),
    ({"push_url": "http://"}, "push_url"),
    ({"push_url": "http://a b/"}, "push_url"),
    ({"push_url": "http://x/" + "a" * 3000}, "push_url"),
    ({"public_key": "not base64!"}, "public_key"),
    ({"public_key": base64.b64encode(b"x" * 31).decode()}, "public_key"),
    ({"public_key": base64.b64encode(b"x" * 64).decode()}, "public_key"),
    ({"public_key": None}, "public_key"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_peer_bodies_are_refused_and_change_nothing(daemon, pg, db_url, change, field):
    body = peer_body(**change)
    r = daemon.admin("POST", "/peers", json=body)
    assert r.status_code == 400, r.text
    p = r.json()
    assert p["code"] == "invalid_body" and field in p["detail"]
    assert pg.psql("SELECT count(*) FROM peers", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM audit_log", db_url) == "0"


def test_bad_json_and_media_type(daemon):
    r = daemon.admin("POST", "/peers", data="{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = daemon.admin("POST", "/peers", data='{"a":1,"a":2}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = daemon.admin("POST", "/peers", data="[]", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "object" in r.json()["detail"]
    r = daemon.admin("POST", "/peers", data="name=gk", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_disable_enable_and_rotate(daemon, pg, db_url):
    first = daemon.admin("POST", "/peers", json=peer_body()).json()
    r = daemon.admin("POST", "/peers/gk/disable")
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["disabled_at"]
    r = daemon.admin("POST", "/peers/gk/enable")
    assert r.json()["enabled"] is True and r.json()["disabled_at"] is None
    # Neither takes a body: a member is refused, not ignored (until the
    # twenty-third session {"name": "other"} disabled gk).
    for verb in ("disable", "enable"):
        r = daemon.admin("POST", f"/peers/gk/{verb}", json={"name": "other"})
        assert r.status_code == 400 and "unknown member 'name'" in r.json()["detail"], r.text
    assert daemon.admin("GET", "/peers/gk").json()["enabled"] is True
    _, pub2 = new_key()
    r = daemon.admin("POST", "/peers/gk/rotate", json={"public_key": pub2})
    assert r.status_code == 200
    rotated = r.json()
    assert rotated["token"] != first["token"] and rotated["public_key"] == pub2
    assert pg.psql("SELECT encode(token_hash, 'hex') FROM peers", db_url) == \
        hashlib.sha256(rotated["token"].encode()).hexdigest()
    # Rotating without a body keeps the key.
    r = daemon.admin("POST", "/peers/gk/rotate")
    assert r.status_code == 200 and r.json()["public_key"] == pub2
    assert daemon.admin("POST", "/peers/none/rotate").status_code == 404
    assert pg.psql("SELECT string_agg(action, ',' ORDER BY id) FROM audit_log", db_url) == \
        "peer.create,peer.disable,peer.enable,peer.rotate,peer.rotate"


def test_a_rotation_with_a_bad_body_issues_nothing(daemon, pg, db_url):
    """A misspelt public_key was ignored until the twenty-first session: the
    rotation answered 200 with a new token and the old key, which the
    operator believed replaced."""
    first = daemon.admin("POST", "/peers", json=peer_body()).json()
    before = pg.psql("SELECT encode(token_hash, 'hex') || encode(ed25519_public_key, 'base64') FROM peers", db_url)
    _, pub2 = new_key()
    for body, words in (({"publicKey": pub2}, "unknown member 'publicKey'"),
                        ({"public_key": pub2, "token": "cwp_x"}, "unknown member 'token'"),
                        ({"a" * 63 + "\u00e9": pub2}, "unknown member '" + "a" * 63),
                        ({"public_key": 7}, "public_key"), ({"public_key": None}, "public_key")):
        r = daemon.admin("POST", "/peers/gk/rotate", json=body)
        assert r.status_code == 400 and r.json()["code"] == "invalid_body", (body, r.text)
        assert words in r.json()["detail"] and "token" not in r.json(), (body, r.text)
    assert pg.psql("SELECT encode(token_hash, 'hex') || encode(ed25519_public_key, 'base64') FROM peers",
                   db_url) == before
    assert before == hashlib.sha256(first["token"].encode()).hexdigest() + first["public_key"]
    assert pg.psql("SELECT string_agg(action, ',' ORDER BY id) FROM audit_log", db_url) == "peer.create"


def test_a_peer_change_reaches_every_daemon_process(make_daemon, db_url, tmp_path):
    key = str(tmp_path / "shared.key")
    d1 = make_daemon(db_url, options={"peer": {"signing_key_file": key}}).start()
    d2 = make_daemon(db_url, options={"peer": {"signing_key_file": key}}).start()
    c = PeerClient(d2.url, "gk", "wa.example")
    r = d1.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "mode": "pull",
                                         "public_key": c.signer.public_b64})
    c.token = r.json()["token"]
    # Created through d1, usable at d2 (told by NOTIFY, not by a restart).
    wait_until(lambda: c.call("GET", "/v1/events?after=0").status_code == 200, what="peer known to d2")
    d1.admin("POST", "/peers/gk/disable")
    wait_until(lambda: c.call("GET", "/v1/events?after=0").status_code == 401, what="disable seen by d2")


def test_a_process_with_another_signing_key_is_told_in_the_log(make_daemon, db_url, pg, tmp_path):
    """Every process of one database must sign with the same key (peers pin
    the directory's one, and file links are keyed on it): a process started
    with a key of its own says so in its log, naming both keys, and starts
    (a key replaced on purpose looks the same); one with the shared key
    says nothing."""
    warning = "signs with another key than the last one started on this database"
    d1 = make_daemon(db_url).start()
    k1 = d1.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    d2 = make_daemon(db_url).start()  # make_daemon's shared key
    assert warning not in d1.log() and warning not in d2.log()
    d3 = make_daemon(db_url, options={"peer": {"signing_key_file": str(tmp_path / "own.key")}}).start()
    k3 = d3.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    assert k3 != k1
    line = next(x for x in d3.log().splitlines() if warning in x)
    assert k1 in line and k3 in line, line
    assert d3.get("/readyz").status_code == 200
    assert pg.psql("SELECT value #>> '{}' FROM settings WHERE key = 'peer.signing_public_key'", db_url) == k3
    # Not among the policy's settings of the admin API.
    assert "peer.signing_public_key" not in d1.admin("GET", "/settings").json()


def test_event_types_and_push_url_are_set_checked_and_changed(daemon, pg, db_url):
    r = daemon.admin("POST", "/peers", json=peer_body(event_types=["message", "receipt"]))
    assert r.status_code == 201 and r.json()["event_types"] == ["message", "receipt"], r.text
    assert daemon.admin("GET", "/peers/gk").json()["event_types"] == ["message", "receipt"]
    r = daemon.admin("POST", "/peers", json=peer_body(name="tg", domain="tg.example"))
    assert r.json()["event_types"] is None  # every type
    before = pg.psql("SELECT row_to_json(peers)::text FROM peers WHERE name = 'gk'", db_url)
    audits = pg.psql("SELECT count(*) FROM audit_log", db_url)
    for body in [{"event_types": []}, {"event_types": ["receipt"]}, {"event_types": ["message", "message"]},
                 {"event_types": ["message", "poll"]}, {"event_types": "message"}, {"event_types": [5]},
                 {"event_types": ["message", None]}, {"name": "other"}, {"public_key": "x"}, {},
                 {"push_url": "ftp://x/"}, {"push_url": None}]:
        r = daemon.admin("PATCH", "/peers/gk", json=body)
        assert r.status_code == 400 and r.json()["code"] == "invalid_body", (body, r.text)
    r = daemon.admin("POST", "/peers", json=peer_body(name="x1", domain="x1.example", event_types=["edit"]))
    assert r.status_code == 400 and "event_types" in r.json()["detail"]
    assert pg.psql("SELECT row_to_json(peers)::text FROM peers WHERE name = 'gk'", db_url) == before
    assert pg.psql("SELECT count(*) FROM audit_log", db_url) == audits
    assert daemon.admin("PATCH", "/peers/nope", json={"event_types": None}).status_code == 404
    r = daemon.admin("PATCH", "/peers/gk", json={"event_types": ["block", "message"], "push_url": "https://gk.example/x"})
    assert r.status_code == 200, r.text
    assert r.json()["event_types"] == ["block", "message"] and r.json()["push_url"] == "https://gk.example/x"
    assert pg.psql("SELECT event_types::text FROM peers WHERE name = 'gk'", db_url) == "{block,message}"
    assert pg.psql("SELECT action FROM audit_log ORDER BY id DESC LIMIT 1", db_url) == "peer.update"
    # The log says what the peer became (a redirected push URL is visible there).
    details = json.loads(pg.psql("SELECT details FROM audit_log ORDER BY id DESC LIMIT 1", db_url))
    assert details["push_url"] == "https://gk.example/x" and details["event_types"] == ["block", "message"]
    assert "token" not in details
    # Each alone: the push URL (the types stay), an unknown peer's 404 (neither was a 500 before).
    assert daemon.admin("PATCH", "/peers/nope", json={"push_url": "https://gk.example/y"}).status_code == 404
    r = daemon.admin("PATCH", "/peers/gk", json={"push_url": "https://gk.example/y"})
    assert r.status_code == 200 and r.json()["push_url"] == "https://gk.example/y", r.text
    assert r.json()["event_types"] == ["block", "message"]


def test_a_repeated_disable_or_enable_is_answered_as_it_is(daemon, pg, db_url):
    """A peer disabled already is answered 200 as it is (its first
    disabled_at), with no audit record and no NOTIFY, as a token revoked
    already is; likewise an enable of an enabled peer.  Until the
    thirty-sixth session each repeat was audited again, moved updated_at
    and made every process reload its peers."""
    daemon.admin("POST", "/peers", json=peer_body())
    row = "SELECT enabled || ' ' || coalesce(disabled_at::text, '-') || ' ' || updated_at FROM peers"
    acts = "SELECT string_agg(action, ',' ORDER BY id) FROM audit_log"
    first = daemon.admin("POST", "/peers/gk/disable")
    assert first.status_code == 200 and first.json()["enabled"] is False
    stored = pg.psql(row, db_url)
    again = daemon.admin("POST", "/peers/gk/disable")
    assert again.status_code == 200 and again.json() == first.json(), (first.json(), again.json())
    assert pg.psql(row, db_url) == stored
    assert pg.psql(acts, db_url) == "peer.create,peer.disable"
    on = daemon.admin("POST", "/peers/gk/enable")
    assert on.status_code == 200 and on.json()["enabled"] is True and on.json()["disabled_at"] is None
    stored = pg.psql(row, db_url)
    again = daemon.admin("POST", "/peers/gk/enable")
    assert again.status_code == 200 and again.json() == on.json()
    assert pg.psql(row, db_url) == stored
    assert pg.psql(acts, db_url) == "peer.create,peer.disable,peer.enable"
    assert daemon.admin("POST", "/peers/nobody/disable").status_code == 404


def test_a_push_url_the_dispatcher_refuses_is_refused_at_once(daemon, pg, db_url):
    """The dispatcher pushes to push_url rebuilt by peer_out_notify_url,
    which refuses a URL with a user or password (a signed @target-uri
    cannot carry one), a port past 65535, or no host; until the
    thirty-sixth session POST /peers and PATCH took such a URL (201, 200),
    and every push to the peer failed until its rows went dead.  Now 400
    invalid_body, nothing stored."""
    from peer import push_peers
    made = push_peers(daemon, (("gk", "gk.example"),))
    try:
        gk = made[0][0]
        facts = "SELECT (SELECT count(*) FROM peers) || ' ' || (SELECT count(*) FROM audit_log)"
        bad_urls = ("http://user:secret@127.0.0.1:9/notify", "https://user@tg.example/push",
                    "http://127.0.0.1:99999/notify", "http://:80/notify")
        before = pg.psql(facts, db_url)
        out = []
        for url in bad_urls:
            r = daemon.admin("POST", "/peers", json=peer_body("tg", "tg.example", push_url=url))
            out.append((url, r.status_code, r.json().get("detail")))
        assert [o[1] for o in out] == [400] * len(bad_urls), out
        assert pg.psql(facts, db_url) == before
        for url in bad_urls:
            r = daemon.admin("PATCH", "/peers/gk", json={"push_url": url})
            assert r.status_code == 400 and r.json()["code"] == "invalid_body", (url, r.text)
        assert pg.psql(facts, db_url) == before
        # What the dispatcher takes is taken.
        r = daemon.admin("POST", "/peers", json=peer_body("tg", "tg.example", push_url="https://Tg.Example:443/push/"))
        assert r.status_code == 201, r.text
        assert gk
    finally:
        for _, s in made:
            s.close()


def test_a_password_in_a_push_url_stored_before_is_never_shown(daemon, pg, db_url):
    """A push_url with a user and password was taken until the thirty-sixth
    session, and such rows stay: every viewer read the password in GET
    /peers (the console's Peers page too), and each disable, enable or
    rotation copied it into a new audit record, which viewers read as well.
    The answers and the audit give the user information as ********; the
    row itself is left as it is (the operator replaces it with PATCH)."""
    r = daemon.admin("POST", "/peers", json=peer_body("gk", "gk.example"))
    assert r.status_code == 201, r.text
    pg.psql("UPDATE peers SET push_url = 'https://ops:hunter2@gk.example/p@th?x=a@b' WHERE name = 'gk'", db_url)
    r = daemon.admin("POST", "/tokens", json={"name": "night-viewer", "role": "viewer"})
    assert r.status_code == 201, r.text
    viewer = {"Authorization": "Bearer " + r.json()["token"]}
    shown = "https://********@gk.example/p@th?x=a@b"
    answers = [daemon.admin("GET", "/peers", headers=viewer).json()["peers"][0],
               daemon.admin("GET", "/peers/gk", headers=viewer).json()]
    for what in ("disable", "enable", "rotate"):
        r = daemon.admin("POST", f"/peers/gk/{what}")
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert [a["push_url"] for a in answers] == [shown] * 5, answers
    audit = daemon.admin("GET", "/audit?action=peer.", headers=viewer).json()["rows"]
    assert len(audit) == 4 and "hunter2" not in json.dumps(audit), audit
    assert "hunter2" not in pg.psql("SELECT string_agg(details::text, ' ') FROM audit_log", db_url)
    # The row keeps what it had: only what is shown is masked.
    assert pg.psql("SELECT push_url FROM peers WHERE name = 'gk'", db_url) == \
        "https://ops:hunter2@gk.example/p@th?x=a@b"
    # A URL without user information is shown as it is.
    r = daemon.admin("PATCH", "/peers/gk", json={"push_url": "https://gk.example/p@th"})
    assert r.status_code == 200 and r.json()["push_url"] == "https://gk.example/p@th", r.text
