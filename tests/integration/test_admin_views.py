"""/admin/v1's views through the real daemon: rooms with their members and
bindings (paged), adapters' health, the configuration in force with its
secrets masked, and the last hour's statistics, all checked against real
traffic between two peers; and the operator's one change to a room, the
removal of a remote member."""
import concurrent.futures
import json
import os
import re
import time

from harness import TOP_SRCDIR, HeldSession, run_causewayd, wait_until
from pgproxy import PgProxy
from peer import push_peers
from test_admin_api import make_token
from test_openapi import check_schema
from test_peer_api import peers  # noqa: F401  (the fixture)
from test_peer_pull import long_poll, make_peers
from test_policy import consent, opt_in, send, wait_policy

ALICE = "mimi://example.org/u/alice"
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MINUTE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:00Z$")


def get(d, path, token=None):
    if token:
        r = d.request("GET", "/admin/v1" + path, headers={"Authorization": "Bearer " + token})
    else:
        r = d.admin("GET", path)
    assert r.status_code == 200, (path, r.text)
    return r.json()


def matches_doc(d, path, route):
    """The answer to GET path checked against docs/admin-openapi.json."""
    with open(os.path.join(TOP_SRCDIR, "docs", "admin-openapi.json"), encoding="utf-8") as f:
        doc = json.load(f)
    schema = doc["paths"][route]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    faults = check_schema(doc, schema, get(d, path))
    assert not faults, (path, faults)


def sums(stats, direction):
    """{adapter: count} of the throughput rows and of the totals."""
    rows, tot = {}, {}
    for x in stats["throughput"]:
        if x["direction"] == direction:
            assert MINUTE.match(x["minute"]) and x["count"] > 0, x
            rows[x["adapter"]] = rows.get(x["adapter"], 0) + x["count"]
    for x in stats["totals"]:
        if x["direction"] == direction:
            tot[x["adapter"]] = x["count"]
    assert rows == tot, (rows, tot)
    return tot


def test_views_after_real_traffic(daemon, peers, pg, db_url):  # noqa: F811
    (a, sa), (b, sb) = peers
    # Nothing yet: empty but complete answers.
    s = get(daemon, "/stats")
    assert s["window_s"] == 3600 and TS.match(s["now"])
    assert s["throughput"] == [] and s["totals"] == [] and s["decisions"] == []
    assert s["queue"] == {"pending": 0, "in_flight": 0, "held": 0, "dead": 0, "failed": 0}
    assert s["latency_ms"] == {"p50": None, "p90": None, "p99": None, "count": 0}
    assert get(daemon, "/rooms") == {"rooms": [], "next_after": None}

    r = a.create_room([a.user("alice"), b.user("bob")])
    assert r.status_code == 201, r.text
    room = r.json()
    ids = [a.send(room["id"], a.user("alice"), f"hello {i}").json()["id"] for i in range(5)]
    assert [e["id"] for e in sb.wait_events(5)] == ids

    def delivered():
        st = get(daemon, "/stats")
        return st if st["latency_ms"]["count"] == 5 else None
    s = wait_until(delivered, what="five deliveries in the stats")
    assert sums(s, "in") == {"peer": 5}
    assert sums(s, "out") == {"peer": 5}
    lat = s["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] < 10000, lat
    assert s["queue"] == {"pending": 0, "in_flight": 0, "held": 0, "dead": 0, "failed": 0}
    assert s["decisions"] == []
    # The same numbers, straight from the tables.
    assert pg.psql("SELECT count(*) FROM events WHERE accepted_at >= now() - interval '1 hour'", db_url) == "5"

    # Rooms: the room with its two members; a binding shows with its network.
    pg.psql(f"INSERT INTO room_bindings (room_id, network, native_id) SELECT id, 'matrix', '!abc:hs.example' "
            f"FROM rooms WHERE public_id = '{room['id']}'", db_url)
    rooms = get(daemon, "/rooms")
    assert rooms["next_after"] is None and len(rooms["rooms"]) == 1
    x = rooms["rooms"][0]
    row = int(pg.psql(f"SELECT id FROM rooms WHERE public_id = '{room['id']}'", db_url))
    assert (x["id"], x["row"], x["uri"], x["kind"], x["member_count"]) == (room["id"], row, room["uri"], "direct", 2)
    assert x["name"] is None  # a group's name shows here (POST /v1/rooms "name")
    assert TS.match(x["created_at"])
    assert [(y["network"], y["native_id"]) for y in x["bindings"]] == [("matrix", "!abc:hs.example")]
    assert TS.match(x["bindings"][0]["created_at"])
    one = get(daemon, f"/rooms/{room['id']}")
    members = one.pop("members")
    assert one.pop("next_after") is None  # the page of members is not full
    assert one == x
    assert sorted(m["uri"] for m in members) == sorted([a.user("alice"), b.user("bob")])
    assert all(m["membership"] == "joined" and m["role"] for m in members), members
    # A member who left still shows, but is not counted.
    pg.psql(f"UPDATE room_members SET membership = 'left' WHERE room_id = {row} AND identity_id = "
            f"(SELECT id FROM identities WHERE uri = '{b.user('bob')}')", db_url)
    assert get(daemon, "/rooms")["rooms"][0]["member_count"] == 1
    assert {m["uri"]: m["membership"] for m in get(daemon, f"/rooms/{room['id']}")["members"]} == \
        {a.user("alice"): "joined", b.user("bob"): "left"}

    # Adapters: the dispatcher of this process, the peers and their queue,
    # this process's policy; no Matrix or XMPP here.
    # The dispatcher counts a delivery just after its record's commit,
    # which the stats read: the count is waited for (until the
    # sixty-third session read at once, a thread descheduled between the
    # two on a loaded machine showed 4).
    ad = wait_until(lambda: (lambda x: x if x["dispatcher"]["delivered"] >= 5 else None)(get(daemon, "/adapters")),
                    what="the dispatcher's five deliveries counted")
    assert set(ad) == {"dispatcher", "peer", "policy"}
    assert ad["policy"]["status"] == "current" and ad["policy"]["reload_failures"] == 0
    assert ad["dispatcher"]["status"] == "up" and ad["dispatcher"]["delivered"] == 5
    assert ad["dispatcher"]["dead"] == 0 and ad["dispatcher"]["requests_ok"] >= 1
    assert ad["peer"] == {"peers": 2, "enabled": 2, "pending": 0, "dead": 0, "push_url_problems": 0,
                          "push_url_problem_peers": []}
    assert daemon.admin("POST", "/peers/tg/disable").status_code == 200
    assert get(daemon, "/adapters")["peer"]["enabled"] == 1

    for path, route in (("/stats", "/stats"), ("/rooms", "/rooms"), (f"/rooms/{room['id']}", "/rooms/{id}"),
                        ("/adapters", "/adapters"), ("/config", "/config")):
        matches_doc(daemon, path, "/admin/v1" + route)

    # A viewer may read all five; nobody without a token.
    viewer = make_token(daemon, "watcher", "viewer")["token"]
    for path in ("/rooms", f"/rooms/{room['id']}", "/adapters", "/config", "/stats"):
        get(daemon, path, viewer)
        assert daemon.request("GET", "/admin/v1" + path).status_code == 401, path


def test_rooms_paging_and_not_found(daemon, peers):  # noqa: F811
    (a, _), (b, _) = peers
    made = [a.create_room([a.user(f"u{i}"), b.user("bob")]).json()["id"] for i in range(3)]
    page = get(daemon, "/rooms?limit=1")
    assert [x["id"] for x in page["rooms"]] == made[:1] and page["next_after"] == page["rooms"][0]["row"]
    page = get(daemon, f"/rooms?limit=1&after={page['next_after']}")
    assert [x["id"] for x in page["rooms"]] == made[1:2]
    rest = get(daemon, f"/rooms?limit=5&after={page['next_after']}")
    assert [x["id"] for x in rest["rooms"]] == made[2:] and rest["next_after"] is None
    exact = get(daemon, "/rooms?limit=3")
    assert [x["id"] for x in exact["rooms"]] == made and exact["next_after"] == exact["rooms"][-1]["row"]
    assert get(daemon, f"/rooms?after={exact['next_after']}") == {"rooms": [], "next_after": None}
    for q in ("limit=0", "limit=501", "limit=x", "after=-1", "after=x", "after="):
        r = daemon.admin("GET", "/rooms?" + q)
        assert r.status_code == 400 and r.json()["code"] == "invalid_query", q
    for rid in ("r_nope", "x" * 129, "r_a%20b", "r_%C3%A9", "r_a'b", "r_a%25"):
        r = daemon.admin("GET", f"/rooms/{rid}")
        assert r.status_code == 404 and r.json()["code"] == "not_found", (rid, r.text)
        assert r.headers["Content-Type"].startswith("application/problem+json")
    assert get(daemon, f"/rooms/{made[1]}")["member_count"] == 2


def test_a_rooms_members_are_paged(daemon, peers, pg, db_url):  # noqa: F811
    """GET /admin/v1/rooms/{id} answers a page of the members, as the lists
    page (?after=<row>&limit=<1..500>, 100 by default, next_after): a
    gatekeeper's group of thousands was answered whole, and the console's
    room page built a row for each.  The members are in the order of their
    identity's row, which each carries as "row"."""
    (a, _), (b, _) = peers
    gid = a.create_room([a.user("wally"), b.user("bob"), b.user("eve")], kind="group").json()["id"]
    row = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{gid}'", db_url)
    # 250 more of gk's users (rows as the peer API makes them), one of
    # them left: every membership is listed, the joined ones counted.
    pg.psql("INSERT INTO identities (uri, domain, localpart, is_local, network, peer_id) "
            "SELECT 'mimi://gk.example/u/m' || g, 'gk.example', 'm' || g, false, 'peer:gk', "
            " (SELECT id FROM peers WHERE name = 'gk') FROM generate_series(1, 250) g", db_url)
    pg.psql(f"INSERT INTO room_members (room_id, identity_id, membership) SELECT {row}, id, "
            "CASE WHEN localpart = 'm7' THEN 'left' ELSE 'joined' END FROM identities "
            "WHERE localpart ~ '^m[0-9]+$' AND domain = 'gk.example'", db_url)
    every = [(int(r.split("|")[0]), r.split("|")[1]) for r in pg.psql(
        "SELECT m.identity_id, i.uri FROM room_members m JOIN identities i ON i.id = m.identity_id "
        f"WHERE m.room_id = {row} ORDER BY m.identity_id", db_url).splitlines()]
    assert len(every) == 253

    first = get(daemon, f"/rooms/{gid}")
    assert [(m["row"], m["uri"]) for m in first["members"]] == every[:100]
    assert first["next_after"] == every[99][0] and first["member_count"] == 252
    seen, after = [], None
    while True:
        page = get(daemon, f"/rooms/{gid}?limit=60" + (f"&after={after}" if after else ""))
        assert page["member_count"] == 252 and page["id"] == gid
        seen += [(m["row"], m["uri"]) for m in page["members"]]
        if page["next_after"] is None:
            break
        assert page["next_after"] == page["members"][-1]["row"]
        after = page["next_after"]
    assert seen == every
    assert {m["membership"] for m in get(daemon, f"/rooms/{gid}?limit=500")["members"]} == {"joined", "left"}
    # A full last page names its last row; the page after it is empty.
    tail = get(daemon, f"/rooms/{gid}?after={every[-4][0]}&limit=3")
    assert [m["uri"] for m in tail["members"]] == [u for _, u in every[-3:]] and tail["next_after"] == every[-1][0]
    end = get(daemon, f"/rooms/{gid}?after={every[-1][0]}")
    assert end["members"] == [] and end["next_after"] is None and end["member_count"] == 252
    matches_doc(daemon, f"/rooms/{gid}?limit=2", "/admin/v1/rooms/{id}")
    # Bad paging is 400 invalid_query, problem+json; an unknown room stays 404.
    for q in ("limit=0", "limit=501", "limit=x", "limit=+5", "limit=%205", "after=-1", "after=x", "after=",
              "after=-0"):
        r = daemon.admin("GET", f"/rooms/{gid}?" + q)
        assert r.status_code == 400 and r.json()["code"] == "invalid_query", (q, r.text)
        assert r.headers["Content-Type"].startswith("application/problem+json")
    r = daemon.admin("GET", "/rooms/r_nope?limit=5")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    # The answer to a removal is the room's first page, as GET shows it.
    r = daemon.admin("POST", f"/rooms/{gid}/members", json={"remove": [b.user("eve")]})
    assert r.status_code == 200, r.text
    assert r.json() == get(daemon, f"/rooms/{gid}") and len(r.json()["members"]) == 100


def test_the_operator_removes_a_remote_member_of_a_group(daemon, peers, pg, db_url):  # noqa: F811
    """POST /admin/v1/rooms/{id}/members {"remove": [...]}: the remedy of
    docs/policy.md for a group whose row to a peer a server deny of one of
    its members drops. The member leaves as when their peer removes them
    (the same change), audited under the admin's name; after it the row
    goes to the peer's other members again. Until the twenty-fourth
    session the admin API had no member removal."""
    (a, _), (b, sb) = peers
    opt_in(daemon)
    consent(daemon, a.user("wally"), "allowed")
    bob, eve = b.user("bob"), b.user("eve")
    gid = a.create_room([a.user("wally"), bob, eve, ALICE]).json()["id"]
    assert daemon.admin("POST", "/rules", json={"scope": "user", "pattern": eve, "mode": "deny"}).status_code == 201
    sent = []

    def tg_row(mid):
        return pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                       f"WHERE e.public_id = '{mid}' AND o.destination = 'peer:tg'", db_url)

    def refused_now():
        r = send(a, gid, "while eve is denied")
        assert r.status_code == 202, r.text
        sent.append(r.json()["id"])
        return tg_row(sent[-1]) == "dropped"
    wait_policy(daemon, refused_now, "the deny in force")

    def remove(room, body, token=None):
        headers = {"Authorization": "Bearer " + token} if token else {}
        if token:
            return daemon.request("POST", f"/admin/v1/rooms/{room}/members", json=body, headers=headers)
        return daemon.admin("POST", f"/rooms/{room}/members", json=body)

    def membership():
        return {m["uri"]: m["membership"] for m in get(daemon, f"/rooms/{gid}")["members"]}
    audited = "SELECT count(*) FROM audit_log WHERE action = 'room.members'"
    before = pg.psql(audited, db_url)
    # Refused, nothing changed: a bad body, a direct room, an unknown room,
    # a user not in the room (named), a local user, a viewer.
    direct = a.create_room([a.user("wally"), ALICE]).json()["id"]
    nobody = b.user("nobody")
    for room, body, status, says in (
            (gid, {}, 400, "remove"), (gid, {"remove": []}, 400, "remove"),
            (gid, {"remove": eve}, 400, "remove"), (gid, {"remove": ["mimi://tg.example/r/x"]}, 400, "user URI"),
            (gid, {"remove": [eve] * 257}, 400, "256"), (gid, {"remove": [eve], "add": [nobody]}, 400, "add"),
            (gid, {"remove": [eve, nobody]}, 400, nobody), (gid, {"remove": [eve, ALICE]}, 400, "their own client"),
            (direct, {"remove": [a.user("wally")]}, 400, "a direct room keeps its two members"),
            ("r_nope", {"remove": [eve]}, 404, "no room")):
        r = remove(room, body)
        assert r.status_code == status, (body, r.text)
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert r.json()["code"] == ("not_found" if status == 404 else "invalid_body"), r.text
        assert says in r.json()["detail"], (body, r.text)
    viewer = make_token(daemon, "room-watcher", "viewer")["token"]
    assert remove(gid, {"remove": [eve]}, viewer).status_code == 403
    # alice, whom the peer put in, is invited (she has not taken part:
    # docs/policy.md, since the thirty-first session).
    assert membership() == {a.user("wally"): "joined", bob: "joined", eve: "joined", ALICE: "invited"}
    assert pg.psql(audited, db_url) == before

    # eve removed: she has left (as her peer's removal leaves her), the
    # answer is the room as GET shows it, and the audit names the admin.
    r = remove(gid, {"remove": [eve]})
    assert r.status_code == 200, r.text
    assert r.json() == get(daemon, f"/rooms/{gid}")
    assert membership() == {a.user("wally"): "joined", bob: "joined", eve: "left", ALICE: "invited"}
    assert r.json()["member_count"] == 2
    assert pg.psql("SELECT actor || ' ' || subject || ' ' || details::text FROM audit_log "
                   "WHERE action = 'room.members' ORDER BY id DESC LIMIT 1", db_url) == \
        f'admin:config {gid} {{"add": [], "remove": ["{eve}"]}}'
    # The next message goes to tg's other member again.
    n = len(sb.events)
    after = send(a, gid, "eve is out").json()["id"]
    wait_until(lambda: tg_row(after) == "delivered", what="the row to tg delivered")
    assert after in [e["id"] for e in sb.wait_events(n + 1)]
    assert [e["id"] for e in sb.events if e["id"] in sent] == []
    # Once out, not a member to remove; bob removed too: tg has no row.
    r = remove(gid, {"remove": [eve]})
    assert r.status_code == 400 and eve in r.json()["detail"], r.text
    assert remove(gid, {"remove": [bob]}).status_code == 200
    last = send(a, gid, "tg has nobody here").json()["id"]
    rows = pg.psql("SELECT o.destination FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{last}'", db_url)
    assert "peer:tg" not in rows.splitlines(), rows


def test_the_peers_of_a_group_are_told_of_the_operators_removal(daemon, peers, pg, db_url):  # noqa: F811
    """The operator's removal of a remote member reaches every peer with
    members in the group, the removed user's own among them, as a member's
    leaving reaches it (a `membership` event, content {membership: leave,
    target}, the removed user its sender), signed and once, through the
    outbox, written in the transaction of the removal: a refused request
    writes none. Local members get no row of it (their adapters show the
    change from the membership itself). A peer none of whose users is left
    in the group is told of its last one's removal too. Until the
    twenty-fifth session no peer was told: its view of the group was
    wrong until it asked GET /v1/rooms/{room}."""
    (a, sa), (b, sb) = peers
    bob, eve, wally = b.user("bob"), b.user("eve"), a.user("wally")
    gid = a.create_room([wally, bob, eve, ALICE]).json()["id"]

    def leaves(srv):
        return [e for e in list(srv.events) if e["type"] == "membership" and e["room_id"] == gid]

    def stored():
        return pg.psql("SELECT count(*) FROM events e JOIN rooms r ON r.id = e.room_id "
                       f"WHERE r.public_id = '{gid}' AND e.type = 'membership'", db_url)
    r = daemon.admin("POST", f"/rooms/{gid}/members", json={"remove": [eve, b.user("nobody")]})
    assert r.status_code == 400, r.text
    assert stored() == "0"
    r = daemon.admin("POST", f"/rooms/{gid}/members", json={"remove": [eve]})
    assert r.status_code == 200, r.text
    for srv in (sa, sb):
        got = wait_until(lambda: leaves(srv) or None, what="eve's leaving at the peer")
        assert len(got) == 1, got
        assert got[0]["sender"] == eve and got[0]["content"] == \
            {"membership": "leave", "target": eve, "by": daemon.options["server"]["domain"]}, got
    rows = pg.psql("SELECT o.destination FROM outbox o JOIN events e ON e.id = o.event_id JOIN rooms r "
                   f"ON r.id = e.room_id WHERE r.public_id = '{gid}' AND e.type = 'membership' "
                   "ORDER BY o.destination", db_url)
    assert rows.splitlines() == ["peer:gk", "peer:tg"], rows
    # The next message reaches tg after the leave, in the room's order.
    mid = send(a, gid, "eve is out").json()["id"]
    wait_until(lambda: mid in [e["id"] for e in list(sb.events)], what="the next message at tg")
    ids = [e["id"] for e in list(sb.events)]
    assert ids.index(leaves(sb)[0]["id"]) < ids.index(mid), ids
    # bob, tg's last member (named twice: he leaves once): tg is told still.
    assert daemon.admin("POST", f"/rooms/{gid}/members", json={"remove": [bob, bob]}).status_code == 200
    for srv in (sa, sb):
        wait_until(lambda: len(leaves(srv)) == 2, what="bob's leaving at the peer")
        assert [(e["sender"], e["content"]["target"]) for e in leaves(srv)] == [(eve, eve), (bob, bob)]
    assert stored() == "2"
    for srv in (sa, sb):
        assert srv.errors == [] and srv.duplicates == 0, (srv.errors, srv.duplicates)


def test_a_pull_peer_is_told_of_the_operators_removal_at_once(daemon):
    """A pull peer waiting on GET /v1/events gets the removed member's
    leaving when the removal commits (its pull is woken, as by any event
    for it), not at the end of its wait. A peer with no member in the
    group (gk here) is told nothing."""
    _, b, _, srv = make_peers(daemon)
    try:
        bob, eve = b.user("bob"), b.user("eve")
        gid = b.create_room([bob, eve, b.user("carol")], kind="group").json()["id"]
        cursor = b.call("GET", "/v1/events?after=0").json()["next"]
        t, result = long_poll(b, cursor, 20)  # nothing for it until the removal
        r = daemon.admin("POST", f"/rooms/{gid}/members", json={"remove": [eve]})
        assert r.status_code == 200, r.text
        t.join(25)
        assert "r" in result, "the poll did not answer"
        got = result["r"].json()["events"]
        assert [(e["type"], e["sender"], e["content"]) for e in got] == \
            [("membership", eve, {"membership": "leave", "target": eve, "by": daemon.options["server"]["domain"]})], got
        assert result["t"] < 10, result["t"]
        assert srv.requests == 0 and srv.events == []
    finally:
        srv.close()


def test_stats_queue_dead_letters_and_decisions(make_daemon, db_url, pg):
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2", "retry_base_ms": "20",
                                                    "retry_max_ms": "50"}}).start()
    made = push_peers(d)
    try:
        (a, _), (b, sb) = made
        sb.fail_next = 1000  # B is down: its deliveries die after two attempts
        room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
        for i in range(3):
            assert a.send(room, a.user("alice"), f"m{i}").status_code == 202
        # Waited for on /adapters, not cached: an answer of /stats from
        # before the rows died would serve for 5 s (docs/admin-api.md).
        ad = wait_until(lambda: (lambda ad: ad if ad["peer"]["dead"] == 3 else None)(get(d, "/adapters")),
                        what="three dead letters")
        assert ad["peer"]["pending"] == 0
        assert get(d, "/stats")["queue"]["dead"] == 3
        assert ad["dispatcher"]["dead"] == 3 and ad["dispatcher"]["requests_failed"] >= 2

        # First contact with a local user who opted in: held for consent.
        assert d.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk",
                                                "opted_in": True}).status_code == 200
        dm = a.create_room([a.user("wally"), ALICE]).json()["id"]
        for i in range(2):
            assert a.send(dm, a.user("wally"), f"hi {i}").status_code == 202
        # Then a deny rule for the senders' domain: what waits from it (the
        # held rows, the dead letters) is dropped as well (since the
        # thirty-first session), each a deny of the sweep's.
        assert d.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                               "mode": "deny"}).status_code == 201
        wait_until(lambda: a.send(dm, a.user("wally"), "denied?").status_code == 202 and
                   pg.psql("SELECT count(*) FROM audit_log WHERE action = 'policy.deny' AND details->>'by' IS NULL",
                           db_url) != "0", what="the deny rule in force")
        # One answer serves every caller for 5 s (docs/admin-api.md): wait for a fresh one.
        s = wait_until(lambda: (lambda s: s if s["queue"]["held"] == 0 and s["queue"]["dead"] == 0 else None)(
            get(d, "/stats")), timeout=15, what="fresh statistics")
        assert s["queue"] == {"pending": 0, "in_flight": 0, "held": 0, "dead": 0, "failed": 0}
        dec = {(x["verdict"], x["reason"]): x["count"] for x in s["decisions"]}
        assert dec == {("hold", "no_consent_yet"): 2, ("deny", "server_denied_domain"): 6}, s["decisions"]
        assert s["decisions"][0]["count"] == 6  # most frequent first
        assert sums(s, "in") == {"peer": 6}
        assert sums(s, "out") == {} and s["latency_ms"]["count"] == 0
        # Out of the window: older events and audit records are not counted.
        pg.psql("UPDATE events SET accepted_at = accepted_at - interval '2 hours'; "
                "UPDATE audit_log SET at = at - interval '2 hours'", db_url)
        s = wait_until(lambda: (lambda s: s if s["totals"] == [] else None)(get(d, "/stats")),
                       timeout=15, what="fresh statistics")
        assert s["totals"] == [] and s["decisions"] == [] and s["queue"]["dead"] == 0
    finally:
        for _, srv in made:
            srv.close()


SECRETS = {"xmpp": "xmpp-secret-do-not-show", "as": "as-token-do-not-show", "hs": "hs-token-do-not-show"}


def stats_statements(recording):
    """How many times the statistics' statement was sent (PgProxy.record)."""
    return sum(1 for _, kind, text in list(recording) if kind == "B" and text.startswith("WITH dl AS MATERIALIZED"))


def test_consoles_asking_at_once_share_one_statistics_statement(make_daemon, db_url):
    """With no statistics of the last 5 s, N consoles (or causewayctl
    status runs) asking at once ran N copies of the heaviest read, each on
    a reader of its own (until the fiftieth session). The first runs it
    now and the others wait for its answer: one statement, one answer for
    all; and when it fails (here its deadline, the database held), those
    waiting are answered 503 to try again, as the first is."""
    with PgProxy(db_url) as p:
        d = make_daemon(p.url, options={"database": {"pool_size": "4", "request_timeout_ms": "2000"}}).start()
        def all_connected():   # the readers connect at their first job; the lock below would hold that
            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                list(ex.map(lambda _: d.admin("GET", "/rooms"), range(8)))
            m = d.get("/metrics").text
            return re.search(r"^causeway_db_pool_connections_up (\d+)", m, re.M).group(1) == \
                re.search(r"^causeway_db_pool_connections (\d+)", m, re.M).group(1)
        wait_until(all_connected, what="every pool connection made")
        rec = p.record()
        n = 5
        for release_after in (None, 0.8):   # held past the deadline; then released before it
            del rec[:]
            locker = HeldSession(db_url)
            try:
                locker.run("BEGIN; LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE;")
                with concurrent.futures.ThreadPoolExecutor(n) as ex:
                    calls = [ex.submit(d.admin, "GET", "/stats", timeout=30) for _ in range(n)]
                    wait_until(lambda: stats_statements(rec) >= 1, what="the statement sent")
                    if release_after:
                        time.sleep(release_after)   # the others come meanwhile
                        locker.end()
                    answers = [c.result() for c in calls]
            finally:
                locker.end()
            assert stats_statements(rec) == 1, rec
            if release_after:
                assert [r.status_code for r in answers] == [200] * n, [r.text for r in answers]
                assert all(r.json() == answers[0].json() for r in answers)   # one answer: the same "now"
                assert "throughput" in answers[0].json()
            else:
                assert [r.status_code for r in answers] == [503] * n, [r.text for r in answers]
                assert all("Retry-After" in r.headers for r in answers)
        # Within 5 s of that answer, no statement at all.
        del rec[:]
        assert d.admin("GET", "/stats").json() == answers[0].json()
        assert stats_statements(rec) == 0


def test_config_in_force_with_secrets_masked(make_daemon, db_url, tmp_path):
    d = make_daemon(db_url, options={
        "xmpp": {"components": "gk.example.org=gk", "server_port": "1", "secret": SECRETS["xmpp"],
                 "reconnect_max_ms": "200"},
        "matrix": {"as_token": SECRETS["as"], "hs_token": SECRETS["hs"]},
        "dispatcher": {"retry_budget": "7"},
    }).start()
    r = d.admin("GET", "/config")
    assert r.status_code == 200
    for s in list(SECRETS.values()) + [db_url]:
        assert s not in r.text, s
    opts = {(o["section"], o["name"]): o for o in r.json()["options"]}
    assert opts[("xmpp", "secret")] == {"section": "xmpp", "name": "secret", "value": "********", "default": "",
                                        "changed": True, "reloadable": False, "secret": True,
                                        "doc": opts[("xmpp", "secret")]["doc"], "pending": None}
    for k in (("matrix", "as_token"), ("matrix", "hs_token"), ("database", "url")):
        assert opts[k]["value"] == "********" and opts[k]["secret"] is True, k
    assert opts[("dispatcher", "retry_budget")]["value"] == "7"
    assert opts[("dispatcher", "retry_budget")]["default"] == "12"
    assert opts[("dispatcher", "retry_budget")]["changed"] is True
    # A size at its default is not changed, though its value (bytes) and
    # its default (as the table writes it) read otherwise: until the
    # forty-ninth session the console compared the two texts and marked
    # every size at its default as changed.
    body = opts[("server", "max_body_bytes")]
    assert (body["value"], body["default"], body["changed"]) == ("1048576", "1MiB", False), body
    assert opts[("log", "level")]["changed"] is False
    for k in (("xmpp", "components"), ("xmpp", "reconnect_max_ms"), ("matrix", "as_token")):
        assert opts[k]["changed"] is True, k
    assert opts[("xmpp", "components")]["value"] == "gk.example.org=gk"
    assert opts[("log", "level")]["value"] == "info" and opts[("log", "level")]["reloadable"] is True
    # Every option of the table, in its order, with its default and doc.
    listed = [line.split("\t") for line in run_causewayd(["--list-options"]).stdout.splitlines() if line]
    assert [f"{o['section']}.{o['name']}" for o in r.json()["options"]] == [x[0] for x in listed]
    for x in listed:
        o = opts[tuple(x[0].split(".", 1))]
        assert (o["default"], o["reloadable"], o["doc"]) == (x[2], x[3] == "reloadable", x[5]), x
    # The other answers do not leak them either; XMPP's health is there.
    for path in ("/adapters", "/stats", "/rooms"):
        body = d.admin("GET", path).text
        for s in SECRETS.values():
            assert s not in body, (path, s)
    ad = d.admin("GET", "/adapters").json()
    assert "gk.example.org" in ad["xmpp"]["components"] and "matrix" not in ad
    assert SECRETS["xmpp"] not in d.log()


def test_config_unset_secret_is_empty(daemon):
    opts = {(o["section"], o["name"]): o for o in get(daemon, "/config")["options"]}
    assert opts[("xmpp", "secret")]["value"] == "" and opts[("matrix", "as_token")]["value"] == ""
    assert opts[("database", "url")]["value"] == "********"
    assert all(o["value"] in ("", "********") for o in opts.values() if o["secret"])


def test_adapters_with_matrix_configured(make_daemon, db_url):
    # No homeserver listens there: the adapter is reported, not required.
    d = make_daemon(db_url, options={"matrix": {"homeserver_url": "http://127.0.0.1:9", "as_token": SECRETS["as"],
                                                "hs_token": SECRETS["hs"]}}).start()
    r = d.admin("GET", "/adapters")
    assert r.status_code == 200 and SECRETS["as"] not in r.text and SECRETS["hs"] not in r.text
    ad = r.json()
    assert set(ad) == {"dispatcher", "peer", "matrix", "policy"}
    assert ad["matrix"]["homeserver"] == "http://127.0.0.1:9", ad
    assert ad["matrix"]["ping"] in ("pending", "failed"), ad
    assert set(ad["matrix"]) == set(d.get("/readyz").json()["adapters"]["matrix"])
    opts = {(o["section"], o["name"]): o["value"] for o in get(d, "/config")["options"]}
    assert opts[("matrix", "homeserver_url")] == "http://127.0.0.1:9"
    assert opts[("matrix", "as_token")] == opts[("matrix", "hs_token")] == "********"


def test_stats_count_the_gateways_own_events_as_gateway(daemon, peers):  # noqa: F811
    """Events the gateway makes itself (an operator's removal of a member,
    an expiry's delete) have the origin `gateway`, as the trace shows them,
    and /stats counts them `in` under that name.  Until the thirty-fourth
    session docs/admin-api.md called them `system`, which no event has."""
    (a, _), (b, _) = peers
    gid = a.create_room([a.user("wally"), b.user("bob"), b.user("eve")]).json()["id"]
    r = daemon.admin("POST", f"/rooms/{gid}/members", json={"remove": [b.user("eve")]})
    assert r.status_code == 200, r.text
    s = get(daemon, "/stats")  # the first asking: computed now
    assert sums(s, "in") == {"gateway": 1}, s


# The routes of this file's views, and where their answers' schemas are.
VIEW_ANSWERS = (("get", "/admin/v1/rooms"), ("get", "/admin/v1/rooms/{id}"), ("post", "/admin/v1/rooms/{id}/members"),
                ("get", "/admin/v1/adapters"), ("get", "/admin/v1/config"), ("get", "/admin/v1/stats"))


def test_the_views_answers_are_documented_member_by_member(make_daemon, pg):
    """Each object of the answers of the rooms, the adapters, the
    configuration and the statistics is documented member by member in
    docs/admin-openapi.json, and each answer (Matrix and XMPP configured, a
    room with a binding and a member) holds those members and no other.
    Until the forty-ninth session the rooms of the list and their bindings,
    the adapters, the options and the statistics' queue and latency were
    documented as any object: test_admin_api's check of every member
    answered did not look into them, and a client made from the document
    knew none of their members."""
    from test_admin_api import bare_objects, undocumented_members
    with open(os.path.join(TOP_SRCDIR, "docs", "admin-openapi.json"), encoding="utf-8") as f:
        doc = json.load(f)

    def answer_schema(method, route):
        return doc["paths"][route][method]["responses"]["200"]["content"]["application/json"]["schema"]
    bare = [f"{m.upper()} {route}: {x}" for m, route in VIEW_ANSWERS for x in bare_objects(doc, answer_schema(m, route))]
    assert not bare, "\n".join(bare)

    def fill(url, network):
        """A group with a binding and a local member of network."""
        pg.psql("INSERT INTO rooms (public_id, uri, hub_domain, kind, name) VALUES "
                "('r_docs', 'mimi://example.org/r/docs', 'example.org', 'group', 'g')", url)
        pg.psql("INSERT INTO room_bindings (room_id, network, native_id) SELECT id, 'matrix', '!docs:hs.example' "
                "FROM rooms WHERE public_id = 'r_docs'", url)
        pg.psql("INSERT INTO identities (uri, domain, localpart, is_local, network) VALUES "
                f"('mimi://example.org/u/alice', 'example.org', 'alice', true, '{network}')", url)
        pg.psql("INSERT INTO room_members (room_id, identity_id, membership) SELECT r.id, i.id, 'joined' FROM rooms r, "
                "identities i WHERE r.public_id = 'r_docs' AND i.uri = 'mimi://example.org/u/alice'", url)
    faults = []
    # a daemon serves one local network: Matrix's, then XMPP's
    for local in ({"matrix": {"homeserver_url": "http://127.0.0.1:9", "as_token": SECRETS["as"],
                              "hs_token": SECRETS["hs"]}},
                  {"xmpp": {"components": "gk.example.org=gk", "server_port": "1", "secret": SECRETS["xmpp"],
                            "reconnect_max_ms": "200"}}):
        url = pg.new_database("views_" + next(iter(local)))  # a database serves one local network
        fill(url, next(iter(local)))
        d = make_daemon(url, options=local).start()
        for path, route in (("/rooms", "/rooms"), ("/rooms/r_docs", "/rooms/{id}"), ("/adapters", "/adapters"),
                            ("/config", "/config"), ("/stats", "/stats")):
            body, schema = get(d, path), answer_schema("get", "/admin/v1" + route)
            faults += [f"GET {path}: {x}" for x in check_schema(doc, schema, body)]
            faults += [f"GET {path}: undocumented {x}" for x in undocumented_members(doc, schema, body)]
            if path == "/rooms":
                assert body["rooms"] and body["rooms"][-1]["bindings"], body
            if path == "/adapters":
                assert {"dispatcher", "peer", "policy", *local} <= set(body), body
        d.stop()
    assert not faults, "\n".join(faults)
