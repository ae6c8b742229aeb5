"""Review probes (session 36, rP): interactions of the peer API's routes."""
import hashlib
import json
import re
import threading

import pytest

from harness import HeldSession, wait_until
from peer import PeerClient, push_peers


@pytest.fixture
def peers(daemon):
    made = push_peers(daemon)
    yield made
    for _, srv in made:
        srv.close()


def test_a_peer_cannot_forge_membership_events_of_others(daemon, peers, pg, db_url):
    """A peer's `membership` event tells of its own user's joining or
    leaving only (target the sender, `by` absent or its own domain): one
    naming another peer's user, or this provider's, or claiming this
    provider made the change, is refused 403 not_allowed, alone and as a
    batch item, and nothing is stored or sent. A peer takes only its own
    users out (POST /v1/rooms/{room}/members); until the thirty-sixth
    session such an event was accepted and pushed, signed by this provider,
    to the group's other peers, who read it as their user's removal. Its
    own domain in another case ("WA.example": a DNS name's case means
    nothing) is taken, and kept and passed on as the domain is spelled,
    lower case (until the forty-second session as the peer spelled it)."""
    (a, sa), (b, sb) = peers
    wally, walt, wendy, bob = a.user("wally"), a.user("walt"), a.user("wendy"), b.user("bob")
    gid = a.create_room([wally, walt, wendy, bob, "mimi://example.org/u/dave"], kind="group").json()["id"]
    uri = a.call("GET", f"/v1/rooms/{gid}").json()["uri"]

    def ev(target, sender=wally, **content):
        return {"type": "membership", "sender": sender, "content": dict(content, membership="leave", target=target)}

    bad = [ev(bob, by="example.org"), ev(bob), ev("mimi://example.org/u/dave"), ev(wally, by="example.org"),
           ev(wally, by=7)]
    for i, e in enumerate(bad):
        r = a.call("POST", f"/v1/rooms/{gid}/messages", e, idem=f"forge{i}")
        assert r.status_code == 403 and r.json()["code"] == "not_allowed", (e, r.text)
    r = a.call("POST", "/v1/batch", {"events": [{"idempotency_key": f"fb{i}", "room": uri, "event": e}
                                                for i, e in enumerate(bad)] +
                                     [{"idempotency_key": "own", "room": uri, "event": ev(wally, by="WA.example")}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [(x["status"], x.get("code"), x.get("http_status")) for x in res] == \
        [("refused", "not_allowed", 403)] * len(bad) + [("accepted", None, None)], res
    # Its own user's: taken and passed on, as before (and, since the
    # forty-first session, she has left: test_peer_api.py,
    # test_a_members_own_leave_and_join_events_change_her_membership).
    own = a.call("POST", f"/v1/rooms/{gid}/messages", ev(walt, sender=walt), idem="own1")
    assert own.status_code == 202, own.text
    m = a.send(gid, wendy, "after").json()["id"]
    wait_until(lambda: m in [e["id"] for e in list(sb.events)], what="the message at tg")
    got = [(e["sender"], e["content"]) for e in list(sb.events) if e["type"] == "membership"]
    assert got == [(wally, {"membership": "leave", "target": wally, "by": "wa.example"}),
                   (walt, {"membership": "leave", "target": walt})], got
    assert pg.psql("SELECT string_agg(coalesce(e.content->'content'->>'by', '-'), ',' ORDER BY e.id) "
                   "FROM events e JOIN rooms r ON r.id = e.room_id "
                   f"WHERE r.public_id = '{gid}' AND e.type = 'membership'", db_url) == "wa.example,-"
    # The same by /messages: what the local adapters are sent (the outbox
    # row of dave's, from the stored event) spells it so too.
    r = a.call("POST", f"/v1/rooms/{gid}/messages", ev(wendy, sender=wendy, by="Wa.Example"), idem="own2")
    assert r.status_code == 202, r.text
    assert pg.psql("SELECT e.content->'content'->>'by' FROM events e JOIN outbox o ON o.event_id = e.id "
                   f"AND o.destination = 'local' WHERE e.public_id = '{r.json()['id']}'", db_url) == "wa.example"
    wait_until(lambda: [e["content"].get("by") for e in list(sb.events) if e["type"] == "membership"] ==
               ["wa.example", None, "wa.example"], what="wendy's leave at tg")


def test_a_membership_events_key_is_for_the_event_as_sent(daemon, peers, pg, db_url):
    """A membership event's `by` is kept in the one spelling of the peer's
    domain (lower case), but its Idempotency-Key holds the event as the
    peer sent it (keys sorted, compact), as for every other member: a
    retry of the same bytes is the same request whatever the daemon that
    stored the key. In the forty-second session the key held the
    respelled event, and a key stored before it ("WA.example" as sent),
    retried, was a 409; a key stored then is still taken. The same key
    with the domain spelled another way is another request (409)."""
    (a, sa), (b, sb) = peers
    wally, walt = a.user("wally"), a.user("walt")
    gid = a.create_room([wally, walt, b.user("bob")], kind="group").json()["id"]
    ev = {"type": "membership", "sender": walt, "content": {"membership": "leave", "target": walt, "by": "WA.example"}}
    spelled = dict(ev, content=dict(ev["content"], by="wa.example"))

    def text(e):
        return json.dumps(e, sort_keys=True, separators=(",", ":")).encode()

    def post(e):
        return a.call("POST", f"/v1/rooms/{gid}/messages", e, idem="walt-leaves")

    def stored(digest=None):  # an event's key is its origin_native_id
        where = "origin_native_id = 'walt-leaves'"
        if digest:
            pg.psql(f"UPDATE events SET request_hash = '\\x{digest}' WHERE {where}", db_url)
        return pg.psql(f"SELECT encode(request_hash, 'hex') FROM events WHERE {where}", db_url)

    first = post(ev)
    assert first.status_code == 202, first.text
    sent, respelled = hashlib.sha256(text(ev)).hexdigest(), hashlib.sha256(text(spelled)).hexdigest()
    assert stored() == sent  # as a daemon before the forty-second session stored it
    for digest in (sent, respelled):  # stored before, and in, the forty-second session
        stored(digest)
        r = post(ev)
        assert r.status_code == 202 and r.json()["id"] == first.json()["id"], (digest, r.text)
    stored(sent)
    r = post(spelled)
    assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
    # what is kept is the one spelling
    assert pg.psql(f"SELECT content->'content'->>'by' FROM events WHERE public_id = '{first.json()['id']}'",
                   db_url) == "wa.example"


def test_a_leave_and_a_join_in_two_requests_of_one_group_commit(daemon, peers, pg, db_url):
    """A peer's user's own leave and then her join, sent as two requests,
    written in one transaction (the coalesced requests of one job: the
    writer held up meanwhile by another write waiting for a room's lock)
    take effect in order as the items of one batch do: she is joined, and
    the group's other peer gets her leave and then her join."""
    (a, sa), (b, sb) = peers
    wally, bob, eve = a.user("wally"), b.user("bob"), b.user("eve")
    gid = a.create_room([wally, bob, eve], kind="group").json()["id"]
    other = a.create_room([wally, bob], kind="group").json()
    rid = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{other['id']}'", db_url)

    def own(membership):
        return {"type": "membership", "sender": eve, "content": {"membership": membership, "target": eve}}

    def metric(name):
        m = re.search(r"^" + name + r" (\S+)$", daemon.get("/metrics").text, re.M)
        return float(m.group(1)) if m else None

    held = HeldSession(db_url)
    out, threads = {}, []

    def start(name, fn):
        t = threading.Thread(target=lambda: out.update({name: fn()}))
        t.start()
        threads.append(t)
    committed = metric("causeway_db_writes_committed_total")
    try:
        # the writer held up by a batch (a job of its own) waiting for the other room's lock ...
        held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, ({rid} % 2147483647)::int);")
        start("blocker", lambda: a.call("POST", "/v1/batch", {"events": [
            {"room": other["uri"], "idempotency_key": "waits", "event": {
                "type": "message", "sender": wally,
                "content": {"parts": [{"type": "text/plain", "body": "waits"}]}}}]}))
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                                   db_url) == "1", what="the writer waiting for the room's lock")
        # ... while her leave makes a job that waits, and her join joins its queue
        start("leave", lambda: b.call("POST", f"/v1/rooms/{gid}/messages", own("leave"), idem="eve-leaves"))
        wait_until(lambda: metric("causeway_db_writes_queued") == 1, what="the leave's job queued")
        assert metric("causeway_peer_submits_queued") == 1
        start("join", lambda: b.call("POST", f"/v1/rooms/{gid}/messages", own("join"), idem="eve-joins"))
        # Both in the queue the leave's job takes when the writer gets to
        # it.  Until the sixty-fourth session this waited for four requests
        # in flight (these three and the scrape); one is in flight from its
        # first byte, before its handler queues it, and a join queued after
        # the writer was let go made a job of its own: the test failed
        # under load.
        wait_until(lambda: metric("causeway_peer_submits_queued") == 2, what="the join queued")
        assert metric("causeway_db_writes_queued") == 1
        held.end()
        for t in threads:
            t.join(30)
    finally:
        held.end()
        for t in threads:
            t.join(30)
    assert [out[k].status_code for k in ("blocker", "leave", "join")] == [200, 202, 202], \
        [out[k].text for k in ("blocker", "leave", "join")]
    # Two jobs written, the blocker's and the leave's, which took the join:
    # it had no job of its own.  The jobs' gauge above is 1 whether or not
    # the join was queued yet; until the sixty-fourth session it was all
    # the test had of this, and it held as well with every request a job.
    assert metric("causeway_db_writes_committed_total") - committed == 2
    # the job took the queue: nothing is left counted in it
    assert metric("causeway_peer_submits_queued") == 0
    ids = [out[k].json()["id"] for k in ("leave", "join")]
    # one transaction
    assert pg.psql("SELECT count(DISTINCT xmin::text) FROM events WHERE public_id IN "
                   f"('{ids[0]}', '{ids[1]}')", db_url) == "1"
    members = {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]}
    assert members == {wally: "joined", bob: "joined", eve: "joined"}, members
    wait_until(lambda: [(e["sender"], e["content"]["membership"]) for e in list(sa.events)
                        if e["type"] == "membership" and e["room_id"] == gid] == [(eve, "leave"), (eve, "join")],
               what="her leave, then her join, at wa")


def test_an_edit_of_a_deleted_message(daemon, peers, pg, db_url):
    """A message deleted by its sender, then edited by her or reacted to by
    another member: both are refused, 400 invalid_body saying the message
    was deleted, nothing is stored and nothing is pushed (an edit after
    the delete brought the deleted text back wherever edits are applied).
    A reply to it is taken, as Matrix and XMPP take one to a redacted or
    retracted message (their clients show "message deleted"); so is a
    retry of an edit made before the delete (the key's first answer).
    Until the thirty-sixth session the edit and the reaction were taken
    (202) and the edit pushed after the delete (rP's probe)."""
    (a, sa), (b, sb) = peers
    wally, bob = a.user("wally"), b.user("bob")
    gid = a.create_room([wally, bob], kind="direct").json()["id"]
    m = a.send(gid, wally, "oops").json()["id"]
    edit = {"type": "edit", "sender": wally,
            "content": {"replaces": m, "parts": [{"type": "text/plain", "body": "oops, fixed"}]}}
    assert a.call("POST", f"/v1/rooms/{gid}/messages", edit, idem="ed0").status_code == 202
    d = a.call("POST", f"/v1/rooms/{gid}/messages",
               {"type": "delete", "sender": wally, "content": {"replaces": m}}, idem="del1")
    assert d.status_code == 202, d.text
    ed = a.call("POST", f"/v1/rooms/{gid}/messages",
                dict(edit, content={"replaces": m, "parts": [{"type": "text/plain", "body": "back again"}]}),
                idem="ed1")
    re_ = b.call("POST", f"/v1/rooms/{gid}/messages",
                 {"type": "reaction", "sender": bob,
                  "content": {"in_reply_to": m, "disposition": "reaction",
                              "parts": [{"type": "text/plain", "body": "+"}]}}, idem="re1")
    for r in (ed, re_):
        assert r.status_code == 400 and r.json()["code"] == "invalid_body", r.text
        assert "deleted" in r.json()["detail"], r.text
    assert "content.replaces" in ed.json()["detail"] and "content.in_reply_to" in re_.json()["detail"]
    # The edit made before the delete, retried: its first answer.
    again = a.call("POST", f"/v1/rooms/{gid}/messages", edit, idem="ed0")
    assert again.status_code == 202, again.text
    reply = b.send(gid, bob, "what did you say?", content={"in_reply_to": m,
                                                           "parts": [{"type": "text/plain", "body": "what?"}]})
    assert reply.status_code == 202, reply.text
    wait_until(lambda: reply.json()["id"] in [e["id"] for e in list(sa.events)], what="bob's reply at gk")
    sb.wait_events(3)
    assert [e["type"] for e in list(sb.events)] == ["message", "edit", "delete"], list(sb.events)
    assert pg.psql("SELECT string_agg(e.type, ',' ORDER BY e.id) FROM events e JOIN rooms r ON r.id = e.room_id "
                   f"WHERE r.public_id = '{gid}'", db_url) == "message,edit,delete,message"


def test_a_delete_and_an_edit_of_one_message_in_one_batch(daemon, peers, pg, db_url):
    """In one batch, an edit (or a reaction) of a message before its delete
    is taken and one after it refused, 400 invalid_body as alone; a reply
    after the delete is taken. A delete refused (another's message) deletes
    nothing: an edit after it in the batch is taken. Only what was taken
    is pushed, in the batch's order."""
    (a, sa), (b, sb) = peers
    wally, bob = a.user("wally"), b.user("bob")
    rj = a.create_room([wally, bob], kind="direct").json()
    m = a.send(rj["id"], wally, "stored").json()["id"]
    other = a.send(rj["id"], wally, "other").json()["id"]

    def edit(target, text, sender=wally):
        return {"type": "edit", "sender": sender,
                "content": {"replaces": target, "parts": [{"type": "text/plain", "body": text}]}}

    def react(target, sender=wally):
        return {"type": "reaction", "sender": sender,
                "content": {"in_reply_to": target, "disposition": "reaction",
                            "parts": [{"type": "text/plain", "body": "+"}]}}

    def delete(target, sender=wally):
        return {"type": "delete", "sender": sender, "content": {"replaces": target}}

    def reply(target):
        return {"type": "message", "sender": wally,
                "content": {"in_reply_to": target, "parts": [{"type": "text/plain", "body": "re"}]}}

    evs = [edit(m, "before"), react(m), delete(m), edit(m, "after"), react(m), reply(m)]
    r = a.call("POST", "/v1/batch", {"events": [{"idempotency_key": f"bd{i}", "room": rj["uri"], "event": e}
                                                for i, e in enumerate(evs)]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [(x["status"], x.get("code"), x.get("http_status")) for x in res] == \
        [("accepted", None, None)] * 3 + [("refused", "invalid_body", 400)] * 2 + [("accepted", None, None)], res
    assert "content.replaces" in res[3]["detail"] and "deleted" in res[3]["detail"], res[3]
    assert "content.in_reply_to" in res[4]["detail"] and "deleted" in res[4]["detail"], res[4]
    # bob's delete of wally's message is refused and deletes nothing: his
    # reaction after it in the batch is taken.
    r = b.call("POST", "/v1/batch", {"events": [
        {"idempotency_key": "bx0", "room": rj["uri"], "event": delete(other, bob)},
        {"idempotency_key": "bx1", "room": rj["uri"], "event": react(other, bob)}]})
    assert [(x["status"], x.get("code")) for x in r.json()["results"]] == \
        [("refused", "invalid_body"), ("accepted", None)], r.text
    wait_until(lambda: r.json()["results"][1]["id"] in [e["id"] for e in list(sa.events)], what="bob's reaction")
    sb.wait_events(6)
    assert [e["type"] for e in list(sb.events)] == ["message", "message", "edit", "reaction", "delete", "message"], \
        list(sb.events)
    assert pg.psql("SELECT count(*) FROM events e JOIN rooms r ON r.id = e.room_id "
                   f"WHERE r.public_id = '{rj['id']}'", db_url) == "7"


def test_a_delete_and_an_edit_of_one_message_at_once(make_daemon, pg, db_url):
    """A delete of a message and an edit of it (and a reaction to it) sent
    at the same moment, in requests of their own, to one daemon or to two
    processes of one database, alone or as a batch's item, in a direct
    room or a group: one of them
    wins, never both. Either the edit (the reaction) is stored and pushed
    before the delete, or it is refused, 400 invalid_body saying the
    message was deleted, and nothing of it is stored or pushed. Until the
    thirty-eighth session the check read the deletes committed before the
    write: the two requests both passed it, and the edit was stored and
    pushed after the delete (the deleted text came back)."""
    d1 = make_daemon(db_url).start()
    d2 = make_daemon(db_url).start()
    made = push_peers(d1)
    try:
        (a, sa), (b, sb) = made
        a2 = PeerClient(d2.url, a.name, a.domain, token=a.token, signer=a.signer)
        b2 = PeerClient(d2.url, b.name, b.domain, token=b.token, signer=b.signer)
        wally, bob = a.user("wally"), b.user("bob")
        rooms = [a.create_room([wally, bob], kind=kind).json() for kind in ("direct", "group")]
        for room in rooms:
            wait_until(lambda: a2.call("GET", f"/v1/rooms/{room['id']}").status_code == 200 and
                       b2.call("GET", f"/v1/rooms/{room['id']}").status_code == 200, timeout=30,
                       what="the peers known to the second process")
        room = None

        def single(client, ev, key):
            r = client.call("POST", f"/v1/rooms/{room['id']}/messages", ev, idem=key)
            return r.status_code, r.json()

        def batched(client, ev, key):
            r = client.call("POST", "/v1/batch", {"events": [{"idempotency_key": key, "room": room["uri"],
                                                              "event": ev}]})
            assert r.status_code == 200, r.text
            x = r.json()["results"][0]
            return (202, x) if x["status"] == "accepted" else (x["http_status"], x)

        # Who sends what, round by round: the delete, the edit and the
        # reaction to one process or spread over both, alone or batched
        # (a batch's reading round runs before the writer's transaction).
        routes = [(a, single, a, single, b, single), (a, single, a2, single, b2, single),
                  (a2, single, a, batched, b, batched), (a, batched, a2, single, b2, batched)]
        rounds, outcomes = 48, []
        for k in range(rounds):
            room = rooms[k % 2]
            m = a.send(room["id"], wally, f"m{k}", idem=f"m{k}").json()["id"]
            dc, dsend, ec, esend, rc, rsend = routes[k // 2 % len(routes)]
            jobs = [(dc, dsend, {"type": "delete", "sender": wally, "content": {"replaces": m}}, f"d{k}"),
                    (ec, esend, {"type": "edit", "sender": wally,
                                 "content": {"replaces": m, "parts": [{"type": "text/plain", "body": f"e{k}"}]}},
                     f"e{k}"),
                    (rc, rsend, {"type": "reaction", "sender": bob,
                                 "content": {"in_reply_to": m, "disposition": "reaction",
                                             "parts": [{"type": "text/plain", "body": "+"}]}}, f"r{k}")]
            go, got = threading.Barrier(len(jobs)), [None] * len(jobs)

            def run(i, client, send, ev, key):
                go.wait()
                got[i] = send(client, ev, key)
            threads = [threading.Thread(target=run, args=(i,) + j) for i, j in enumerate(jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert got[0][0] == 202, got
            stored = dict(tuple(x.split(":")) for x in pg.psql(
                "SELECT coalesce(string_agg(e.type || ':' || e.id, ',' ORDER BY e.id), '') FROM events e "
                "JOIN events t ON t.id = coalesce(e.replaces_id, e.in_reply_to_id) "
                f"WHERE t.public_id = '{m}'", db_url).split(",") if x)
            assert "delete" in stored, (k, stored)
            for (status, body), kind, ref in ((got[1], "edit", "content.replaces"),
                                              (got[2], "reaction", "content.in_reply_to")):
                if status == 202:
                    # taken: stored before the delete, so it comes first
                    assert kind in stored and int(stored[kind]) < int(stored["delete"]), (k, kind, got, stored)
                else:
                    assert status == 400 and body["code"] == "invalid_body", (k, kind, got)
                    assert body["detail"] == f"{ref} names a message that was deleted", (k, kind, body)
                    assert kind not in stored, (k, kind, got, stored)
                outcomes.append((kind, status))
        # What the peers were pushed: nothing of a message after its delete.
        taken_edits = sum(1 for x in outcomes if x == ("edit", 202))
        taken_reactions = sum(1 for x in outcomes if x == ("reaction", 202))
        sb.wait_events(2 * rounds + taken_edits, timeout=60)
        sa.wait_events(taken_reactions, timeout=60)
        for srv in (sa, sb):
            gone = set()
            for e in list(srv.events):
                target = e["content"].get("replaces") or e["content"].get("in_reply_to")
                assert target not in gone, (e, list(srv.events))
                if e["type"] == "delete":
                    gone.add(target)
        # The race was run: some delete was written before the edit or the
        # reaction it met (about half of them here; by chance alone, none
        # of 96 is all but impossible).
        assert ("edit", 400) in outcomes or ("reaction", 400) in outcomes, outcomes
    finally:
        for _, srv in made:
            srv.close()


def test_member_adds_are_charged_as_the_peers_messages(daemon, peers, pg, db_url):
    """An add of members (POST /v1/rooms/{room}/members) takes a token of
    the calling peer's messages_per_minute bucket, as a rename and its
    users' messages do: past it, 429 rate_limited with Retry-After, no
    member changed and no event written, audited once. A remove alone is
    not charged (a peer takes its users out whatever the limits). Until
    the thirty-sixth session adds were not limited: a peer adding and
    removing its user made membership events to every other peer of the
    group (and presences to its XMPP occupants) without end."""
    (a, sa), (b, sb) = peers
    wally, bert, bob = a.user("wally"), a.user("bert"), b.user("bob")
    gid = a.create_room([wally, bob], kind="group").json()["id"]
    assert daemon.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                                "limits": {"messages_per_minute": 3}}).status_code == 201

    def stored():
        return pg.psql("SELECT count(*) FROM events e JOIN rooms r ON r.id = e.room_id "
                       f"WHERE r.public_id = '{gid}' AND e.type = 'membership'", db_url)

    adds = 0

    def limited():
        nonlocal adds
        r = a.call("POST", f"/v1/rooms/{gid}/members", {"add": [bert]})
        assert r.status_code in (200, 429), r.text
        if r.status_code == 429:
            return [r]
        adds += 1
        assert a.call("POST", f"/v1/rooms/{gid}/members", {"remove": [bert]}).status_code == 200
        return None
    r, = wait_until(limited, what="an add limited")
    assert r.json()["code"] == "rate_limited" and 1 <= int(r.headers["Retry-After"]) <= 60, r.headers
    assert 1 <= adds <= 3, adds
    assert stored() == str(2 * adds)
    members = {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]}
    assert bert not in members, members  # he left: listed no more
    # The same bucket as the peer's messages; another peer's adds are not in it.
    assert a.send(gid, wally, "hi").status_code == 429
    assert b.call("POST", f"/v1/rooms/{gid}/members", {"add": [b.user("carol")]}).status_code == 200
    assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'policy.limit' "
                   "AND details->>'type' = 'member_add'", db_url) == "1"


def test_a_users_own_join_is_charged_as_her_peers_add_of_her(daemon, peers, pg, db_url):
    """A peer's user's own join of a group she is not in (a membership
    event) makes the change an add of her does, and takes a token of the
    same bucket: the peer's own (messages_per_minute_per_user with its
    domain as the sender), not only her message buckets (one per user, so
    that each new user was a way around the limit). Past it, 429
    rate_limited with Retry-After as for an add, she stays out and nothing
    is stored; the episode is audited once, type member_add, whichever of
    the two met it; then the peer's add is refused too. A join of one
    joined already changes nothing and is charged as any event. Until the
    forty-second session the joins of ever new users were never limited."""
    (a, sa), (b, sb) = peers
    wally, bob, carol, dan, erin = a.user("wally"), b.user("bob"), b.user("carol"), b.user("dan"), b.user("erin")
    gid = a.create_room([wally, bob, carol, dan], kind="group").json()["id"]

    def own(who, membership, idem):
        return b.call("POST", f"/v1/rooms/{gid}/messages",
                      {"type": "membership", "sender": who, "content": {"membership": membership, "target": who}},
                      idem=idem)

    def members():
        return {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]}

    def stored():
        return pg.psql("SELECT count(*) FROM events e JOIN rooms r ON r.id = e.room_id "
                       f"WHERE r.public_id = '{gid}'", db_url)

    for i, who in enumerate((carol, dan)):
        assert own(who, "leave", f"leaves{i}").status_code == 202
    assert daemon.admin("POST", "/rules", json={"scope": "domain", "pattern": "tg.example",
                                                "limits": {"messages_per_minute_per_user": 2}}).status_code == 201
    assert b.call("POST", f"/v1/rooms/{gid}/members", {"add": [erin]}).status_code == 200  # a token
    assert own(carol, "join", "carol-joins").status_code == 202                            # the other
    before = stored()
    r = own(dan, "join", "dan-joins")
    assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
    assert "too many changes" in r.json()["detail"] and 1 <= int(r.headers["Retry-After"]) <= 60, r.headers
    assert dan not in members() and stored() == before
    r = b.call("POST", f"/v1/rooms/{gid}/members", {"add": [b.user("fay")]})
    assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
    # bob is joined: his join changes nothing, and takes his own token only.
    assert own(bob, "join", "bob-joins").status_code == 202
    assert pg.psql("SELECT string_agg(subject || ' ' || (details->>'type') || ' ' || (details->>'member'), ',') "
                   "FROM audit_log WHERE action = 'policy.limit'", db_url) == f"mimi://tg.example member_add {dan}"
    assert members() == {wally: "joined", bob: "joined", carol: "joined", erin: "joined"}


def fail_once(pg, db_url, name, table, when="true"):
    """The first row written to table (that when holds of) fails as a
    serialization failure does (40001): the group-commit writer rolls
    its batch back and runs it again. The sequence name says whether it
    fired."""
    pg.psql(f"CREATE SEQUENCE {name}; "
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f" IF nextval('{name}') = 1 THEN "
            "  RAISE EXCEPTION 'test: run again' USING ERRCODE = '40001'; END IF; RETURN NEW; END $$; "
            f"CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW "
            f"WHEN ({when}) EXECUTE FUNCTION {name}()", db_url)


def test_a_join_whose_write_runs_again_is_charged_once(daemon, peers, pg, db_url):
    """A peer's user's own join is a coalesced write, decided (its
    member_add token, her own message token) in its job's first round,
    which runs again when the group commit's batch does (a lost deadlock,
    a serialization failure, another job of the batch failing). Until the
    forty-third session each run took the tokens again: one join with a
    run again spent two of the peer's adds and two of her messages. The
    job now gives back what a run took before it decides again: one
    token of each, whatever the runs."""
    (a, sa), (b, sb) = peers
    wally, bob, carol = a.user("wally"), b.user("bob"), b.user("carol")
    gid = a.create_room([wally, bob, carol], kind="group").json()["id"]

    def own(who, membership, idem):
        return b.call("POST", f"/v1/rooms/{gid}/messages",
                      {"type": "membership", "sender": who, "content": {"membership": membership, "target": who}},
                      idem=idem)

    assert own(carol, "leave", "carol-leaves").status_code == 202
    assert daemon.admin("POST", "/rules", json={"scope": "domain", "pattern": "tg.example",
                                                "limits": {"messages_per_minute_per_user": 2}}).status_code == 201
    fail_once(pg, db_url, "test_join_once", "room_members")  # her joining's update
    r = own(carol, "join", "carol-joins")
    assert r.status_code == 202, r.text
    assert int(pg.psql("SELECT last_value FROM test_join_once", db_url)) >= 2  # the write ran again
    # One of the peer's two adds left, and one of her two messages.
    assert b.call("POST", f"/v1/rooms/{gid}/members", {"add": [b.user("erin")]}).status_code == 200
    r = b.call("POST", f"/v1/rooms/{gid}/members", {"add": [b.user("fay")]})
    assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
    assert b.send(gid, carol, "back").status_code == 202
    r = b.send(gid, carol, "once more")
    assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text


def test_a_limit_refused_in_a_write_that_runs_again_is_recorded_once(daemon, peers, pg, db_url):
    """A message refused by a limit, the first refusal of its episode, is
    recorded (policy.limit) by its job's write; when that write is rolled
    back and runs again, the run again is refused by the bucket as one of
    the episode, not its first, and until the forty-third session the
    record was lost. The run again now records it, once."""
    (a, sa), (b, sb) = peers
    wally, bob = a.user("wally"), b.user("bob")
    gid = a.create_room([wally, bob], kind="group").json()["id"]
    assert daemon.admin("POST", "/rules", json={"scope": "domain", "pattern": "tg.example",
                                                "limits": {"messages_per_minute_per_user": 1}}).status_code == 201
    assert b.send(gid, bob, "one").status_code == 202
    fail_once(pg, db_url, "test_limit_once", "audit_log", "NEW.action = 'policy.limit'")
    r = b.send(gid, bob, "two")
    assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
    assert pg.psql("SELECT last_value FROM test_limit_once", db_url) == "2"  # the write ran again
    r = b.send(gid, bob, "three")
    assert r.status_code == 429, r.text
    assert pg.psql("SELECT count(*) || ' ' || min(subject) FROM audit_log WHERE action = 'policy.limit'",
                   db_url) == f"1 {bob}"


def test_a_room_the_peer_has_no_member_in_is_answered_as_one_that_does_not_exist(daemon, peers, pg, db_url):
    """A peer none of whose users is a member of a room (never was, or all
    left) gets for it, on every route that names a room, the answer a room
    that does not exist gets, to the byte of its status, code and detail:
    404 unknown_room, before anything the request refers to is looked at
    (a message id of the room or of another, an Idempotency-Key used in
    another room, the room a body names). In a batch, whose items name
    rooms by URI, the same per item. Until the thirty-sixth session a
    message to such a room was 403 not_allowed (a batch item naming a room
    another peer hosts under a guessable URI told whether it exists here),
    and a reference was checked first (400 or 403 told whether a message id
    was of that room)."""
    (a, sa), (b, sb) = peers
    wally, bob, dave = a.user("wally"), b.user("bob"), "mimi://example.org/u/dave"
    team = b.call("POST", "/v1/rooms", {"kind": "group", "members": [bob, dave], "uri": "mimi://tg.example/r/team"})
    assert team.status_code == 201, team.text
    team = team.json()
    m_in = b.send(team["id"], bob, "inside").json()["id"]
    # A group wally was in, until gk took him out.
    gone = a.create_room([wally, bob, a.user("walt")], kind="group").json()
    assert a.call("POST", f"/v1/rooms/{gone['id']}/members", {"remove": [wally, a.user("walt")]}).status_code == 200
    m_gone = b.send(gone["id"], bob, "after they left").json()["id"]
    own = a.create_room([wally, bob], kind="direct").json()
    m_own = a.send(own["id"], wally, "mine", idem="reused").json()["id"]

    def msg(**content):
        return {"type": "message", "sender": wally,
                "content": dict({"parts": [{"type": "text/plain", "body": "probe"}]}, **content)}

    def cases(rid, m):
        edit = {"type": "edit", "sender": wally,
                "content": {"replaces": m, "parts": [{"type": "text/plain", "body": "x"}]}}
        return [
            ("GET", f"/v1/rooms/{rid}", None, None),
            ("PATCH", f"/v1/rooms/{rid}", {"name": "mine now"}, None),
            ("POST", f"/v1/rooms/{rid}/members", {"add": [wally]}, None),
            ("POST", f"/v1/rooms/{rid}/members", {"remove": [wally]}, None),
            ("POST", f"/v1/rooms/{rid}/messages", msg(), "p1"),
            ("POST", f"/v1/rooms/{rid}/messages", msg(in_reply_to=m), "p2"),
            ("POST", f"/v1/rooms/{rid}/messages", msg(in_reply_to=m_own), "p3"),
            ("POST", f"/v1/rooms/{rid}/messages", edit, "p4"),
            ("POST", f"/v1/rooms/{rid}/messages", dict(msg(), room=own["uri"]), "p5"),
            ("POST", f"/v1/rooms/{rid}/messages", msg(), "reused"),
            ("POST", f"/v1/rooms/{rid}/messages", {"type": "delete", "sender": wally, "content": {"replaces": m}},
             "p6"),
            ("POST", f"/v1/rooms/{rid}/receipts",
             {"type": "receipt", "sender": wally, "content": {"receipt": "read", "in_reply_to": m}}, None),
            ("POST", f"/v1/rooms/{rid}/typing", {"type": "typing", "sender": wally, "content": {"state": "start"}},
             None),
        ]

    def answers(rid, m):
        out = []
        for method, path, body, idem in cases(rid, m):
            r = a.call(method, path, body, idem=idem)
            j = r.json()
            out.append((method, path.replace(rid, "{room}"), r.status_code, j.get("code"), j.get("detail")))
        return out

    def batch(uri, m):
        evs = [c[2] for c in cases("r_x", m) if c[1].endswith("/messages")]
        keys = [c[3] for c in cases("r_x", m) if c[1].endswith("/messages")]
        r = a.call("POST", "/v1/batch", {"events": [{"idempotency_key": k, "room": uri, "event": e}
                                                    for k, e in zip(keys, evs)]})
        assert r.status_code == 200, r.text
        return [(x["status"], x.get("code"), x.get("http_status"), x.get("detail")) for x in r.json()["results"]]

    none_id = "r_" + "Q" * (len(team["id"]) - 2)
    nothing = answers(none_id, m_in)
    assert {(s, c, d) for _, _, s, c, d in nothing} == {(404, "unknown_room", "no such room")} | \
        {(404, "unknown_room", "no such group")}, nothing
    for rid, m in ((team["id"], m_in), (gone["id"], m_gone)):
        assert answers(rid, m) == nothing
    nothing_b = batch("mimi://tg.example/r/teams", m_in)
    # (a body naming another room than its item is refused as malformed,
    # before any room is looked up)
    assert set(nothing_b[:4] + nothing_b[5:]) == {("refused", "unknown_room", 404, "no such room")}, nothing_b
    assert batch(team["uri"], m_in) == nothing_b
    assert batch(gone["uri"], m_gone) == nothing_b
    # Nothing was stored, renamed, or changed.
    assert pg.psql("SELECT count(*) FROM events e JOIN identities s ON s.id = e.sender_id "
                   f"WHERE s.uri = '{wally}' AND e.id > (SELECT id FROM events WHERE public_id = '{m_own}')",
                   db_url) == "0"
    assert b.call("GET", f"/v1/rooms/{team['id']}").json().get("name") is None
    # A member's own calls still tell what is wrong (403 for a sender of
    # the peer who is not a member, 400 for a reference elsewhere).
    r = b.send(team["id"], b.user("nobody"), "hi")
    assert (r.status_code, r.json()["code"]) == (403, "not_allowed"), r.text
    r = b.send(team["id"], bob, "re", content={"in_reply_to": m_own, "parts": [{"type": "text/plain", "body": "x"}]})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_body"), r.text


def hold_the_writer(a, pg, db_url, held, start, room):
    """The group-commit writer held up by a batch waiting for room's lock
    (held takes it first); what is queued meanwhile waits behind it."""
    rid = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{room['id']}'", db_url)
    held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, ({rid} % 2147483647)::int);")
    start("blocker", lambda: a.call("POST", "/v1/batch", {"events": [
        {"room": room["uri"], "idempotency_key": "waits", "event": {
            "type": "message", "sender": a.user("wally"),
            "content": {"parts": [{"type": "text/plain", "body": "waits"}]}}}]}))
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                               db_url) == "1", what="the writer waiting for the room's lock")


def metric(daemon, name):
    m = re.search(r"^" + name + r" (\S+)$", daemon.get("/metrics").text, re.M)
    return float(m.group(1)) if m else None


def test_an_item_that_lost_its_key_to_another_request_spends_no_token(daemon, peers, pg, db_url):
    """Two requests with one Idempotency-Key at once (two batches, each
    decided on a reader before either is written): the second to be
    written finds the key taken and is refused, 409 in_progress, nothing
    stored; its retry gets the first one's answer. The refused item was
    decided, and took its sender's message token; until the forty-third
    session it kept it, and the sender had one message fewer for nothing.
    Now the write gives back the tokens of an item it refuses."""
    (a, sa), (b, sb) = peers
    wally, bob = a.user("wally"), b.user("bob")
    gid = a.create_room([wally, bob], kind="group").json()["id"]
    gid_uri = a.call("GET", f"/v1/rooms/{gid}").json()["uri"]
    other = a.create_room([wally, bob], kind="group").json()
    assert daemon.admin("POST", "/rules", json={"scope": "domain", "pattern": "tg.example",
                                                "limits": {"messages_per_minute_per_user": 2}}).status_code == 201
    batch = {"events": [{"room": gid_uri, "idempotency_key": "one-key", "event": {
        "type": "message", "sender": bob, "content": {"parts": [{"type": "text/plain", "body": "once"}]}}}]}
    held = HeldSession(db_url)
    out, threads = {}, []

    def start(name, fn):
        t = threading.Thread(target=lambda: out.update({name: fn()}))
        t.start()
        threads.append(t)
    try:
        hold_the_writer(a, pg, db_url, held, start, other)
        start("first", lambda: b.call("POST", "/v1/batch", batch))
        start("second", lambda: b.call("POST", "/v1/batch", batch))
        wait_until(lambda: metric(daemon, "causeway_db_writes_queued") == 2, what="both batches decided")
        held.end()
        for t in threads:
            t.join(30)
    finally:
        held.end()
        for t in threads:
            t.join(30)
    results = sorted((out[k].json()["results"][0] for k in ("first", "second")), key=lambda x: x["status"])
    assert [x["status"] for x in results] == ["accepted", "refused"], results
    assert (results[1]["http_status"], results[1]["code"]) == (409, "in_progress"), results
    assert pg.psql("SELECT count(*) FROM events WHERE origin_native_id = 'one-key'", db_url) == "1"
    # bob's second token is his: one message more, then the limit
    assert b.send(gid, bob, "two").status_code == 202
    r = b.send(gid, bob, "three")
    assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text


def test_an_item_whose_sender_left_meanwhile_spends_no_token(daemon, peers, pg, db_url):
    """A message decided while its sender was a member of the group, whose
    sender left before it was written (another process took her out under
    the room's lock), is refused, 403 not_allowed, nothing stored. Until
    the forty-third session it kept the message token it took when it was
    decided; now the write gives it back."""
    (a, sa), (b, sb) = peers
    wally, bob = a.user("wally"), b.user("bob")
    gid = a.create_room([wally, bob], kind="group").json()["id"]
    gid_uri = a.call("GET", f"/v1/rooms/{gid}").json()["uri"]
    other = a.create_room([wally, bob], kind="group").json()["id"]
    rid = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{gid}'", db_url)
    bob_id = pg.psql(f"SELECT id FROM identities WHERE uri = '{bob}'", db_url)
    assert daemon.admin("POST", "/rules", json={"scope": "domain", "pattern": "tg.example",
                                                "limits": {"messages_per_minute_per_user": 2}}).status_code == 201
    held = HeldSession(db_url)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=b.call("POST", "/v1/batch", {"events": [
        {"room": gid_uri, "idempotency_key": "bob-writes", "event": {
            "type": "message", "sender": bob, "content": {"parts": [{"type": "text/plain", "body": "hi"}]}}}]})))
    try:
        held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, ({rid} % 2147483647)::int);")
        t.start()
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                                   db_url) == "1", what="the write waiting for the room's lock")
        held.run(f"UPDATE room_members SET membership = 'left' WHERE room_id = {rid} AND identity_id = {bob_id};")
        held.end()
        t.join(30)
    finally:
        held.end()
        t.join(30)
    res = out["r"].json()["results"][0]
    assert (res["status"], res["http_status"], res["code"]) == ("refused", 403, "not_allowed"), res
    assert pg.psql("SELECT count(*) FROM events WHERE origin_native_id = 'bob-writes'", db_url) == "0"
    # bob's two tokens are his: two messages elsewhere, then the limit
    assert [b.send(other, bob, f"m{k}").status_code for k in range(2)] == [202, 202]
    r = b.send(other, bob, "three")
    assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text


def test_one_key_twice_in_a_group_commit_is_told_to_retry_and_another_peers_same_key_is_not(
        daemon, peers, pg, db_url):
    """Single messages queued while the writer is held are written in one
    group; in it, a request whose Idempotency-Key an earlier one of the
    same peer has is answered 409 in_progress (Retry-After: 1), and its
    retry gets the earlier one's answer; the same key from another peer is
    another key, and written. The group is checked for keys seen by a
    table (since the forty-fourth session; before, each request against
    every earlier one): 27 requests, more than its smallest size."""
    (a, sa), (b, sb) = peers
    wally, bob = a.user("wally"), b.user("bob")
    gid = a.create_room([wally, bob], kind="group").json()["id"]
    other = a.create_room([wally, bob], kind="group").json()
    keys = [f"grp-{k}" for k in range(12)]
    committed = metric(daemon, "causeway_db_writes_committed_total")
    twice = {"grp-2", "grp-7", "grp-11"}
    calls = [(a, wally, k) for k in keys] + [(b, bob, k) for k in keys] + [(a, wally, k) for k in sorted(twice)]
    held = HeldSession(db_url)
    out, threads = {}, []

    def start(name, fn):
        t = threading.Thread(target=lambda: out.update({name: fn()}))
        t.start()
        threads.append(t)
    try:
        hold_the_writer(a, pg, db_url, held, start, other)
        for i, (c, sender, key) in enumerate(calls):
            start(i, lambda c=c, sender=sender, key=key: c.send(gid, sender, "body of " + key, idem=key))
        # every request queued for one job (until the sixty-fourth session
        # this waited for them in flight, which they are from their first
        # byte, before their handlers queue them: one queued after the
        # writer was let go made a job of its own, and the test failed
        # under load)
        wait_until(lambda: metric(daemon, "causeway_peer_submits_queued") == len(calls),
                   timeout=30, what="all the requests queued")
        assert metric(daemon, "causeway_db_writes_queued") == 1
        held.end()
        for t in threads:
            t.join(30)
    finally:
        held.end()
        for t in threads:
            t.join(30)
    assert out["blocker"].status_code == 200, out["blocker"].text
    # two jobs written: the blocker's and the one that took all the others
    # (the jobs' gauge above is 1 too while requests in flight are not
    # queued yet: until the sixty-fourth session it was all the test had
    # of this), and the queue's gauge back to 0 once it took them
    assert metric(daemon, "causeway_db_writes_committed_total") - committed == 2
    assert metric(daemon, "causeway_peer_submits_queued") == 0
    res = [out[i] for i in range(len(calls))]
    by_call = {}
    for (c, _, key), r in zip(calls, res):
        by_call.setdefault((c.name, key), []).append(r)
    for (peer, key), rs in by_call.items():
        codes = sorted(r.status_code for r in rs)
        if peer == a.name and key in twice:
            assert codes == [202, 409], (peer, key, [r.text for r in rs])
            lost = next(r for r in rs if r.status_code == 409)
            assert lost.json()["code"] == "in_progress" and lost.headers.get("Retry-After") == "1", lost.text
            # refused in the group, before the write (whose unique index
            # would refuse it too, "was being written at the same time")
            assert "is in progress" in lost.json()["detail"], lost.text
            won = next(r for r in rs if r.status_code == 202)
            again = a.send(gid, wally, "body of " + key, idem=key)
            assert again.status_code == 202 and again.json()["id"] == won.json()["id"], again.text
        else:
            assert codes == [202], (peer, key, [r.text for r in rs])
    # both peers' events of every key, once each, all in one transaction
    assert pg.psql("SELECT count(*) || ' ' || count(DISTINCT origin_native_id) || ' ' || count(DISTINCT xmin::text) "
                   "FROM events WHERE origin_native_id LIKE 'grp-%'", db_url) == f"{2 * len(keys)} {len(keys)} 1"
