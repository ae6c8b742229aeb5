"""GET /v1/events: delivery by pulling, acknowledged by the cursor, with
long-poll."""
import json
import re
import signal
import subprocess
import threading
import time

import requests

from harness import answered_at, logged_at, served_in, stopped_in, wait_until
from peer import NotifyServer, PeerClient


def make_peers(d):
    srv = NotifyServer()
    a = PeerClient(d.url, "gk", "wa.example")
    b = PeerClient(d.url, "tg", "tg.example")
    a.token = d.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "push_url": srv.url,
                                              "public_key": a.signer.public_b64}).json()["token"]
    b.token = d.admin("POST", "/peers", json={"name": "tg", "domain": "tg.example", "mode": "pull",
                                              "public_key": b.signer.public_b64}).json()["token"]
    rm = a.create_room([a.user("alice"), b.user("bob")]).json()
    return a, b, rm, srv


def in_flight(base):
    """The requests the daemon at base is serving, this one to /metrics
    left out."""
    text = requests.get(base + "/metrics", timeout=10).text
    return int(float(re.search(r"^causeway_http_requests_in_flight (\S+)$", text, re.M).group(1))) - 1


def long_poll(b, cursor, wait, others=0):
    """Starts b's GET /v1/events?after=cursor&wait=wait in a thread, waits
    until the daemon has it (others: the test's long polls waiting there
    already), and checks, a second after it was sent, that it is waiting:
    (thread, result), result getting "r" (the answer) and "t" (how long
    it took)."""
    result = {}

    def poll():
        t0 = time.time()
        result["r"] = b.call("GET", f"/v1/events?after={cursor}&wait={wait}")
        result["t"] = time.time() - t0
    t0 = time.time()
    t = threading.Thread(target=poll)
    t.start()
    # a second alone did not always see the request at the daemon on a loaded machine (session 35)
    wait_until(lambda: in_flight(b.base) > others or not t.is_alive(), what="the long poll at the daemon")
    time.sleep(max(0.0, 1.0 - (time.time() - t0)))
    assert t.is_alive()
    return t, result


def test_pull_in_order_with_ack_and_long_poll(daemon):
    a, b, rm, srv = make_peers(daemon)
    ids = [a.send(rm["id"], a.user("alice"), f"p{i}").json()["id"] for i in range(5)]
    r = b.call("GET", "/v1/events?after=0")
    assert r.status_code == 200, r.text
    got = r.json()
    assert [e["id"] for e in got["events"]] == ids
    assert got["events"][0]["room"] == rm["uri"] and got["events"][0]["sender"] == a.user("alice")
    cursor = got["next"]
    # Not acknowledged yet: asking again from 0 gives the same events.
    assert [e["id"] for e in b.call("GET", "/v1/events?after=0&limit=2").json()["events"]] == ids[:2]
    # Long-poll: nothing new, the request waits until an event arrives.
    t, result = long_poll(b, cursor, 10)
    sent = a.send(rm["id"], a.user("alice"), "late")
    new = sent.json()["id"]
    t.join(10)
    assert result["r"].status_code == 200
    assert [e["id"] for e in result["r"].json()["events"]] == [new]
    # it waited, and was answered once the event came, not at its 10 s:
    # within 2.5 s of the send's answer on the daemon's clock (the test's
    # around the poll, bounded 5 s until the fifty-sixth session, counted
    # the test's own send and its wait for a processor too)
    assert 0.9 < result["t"] and answered_at(daemon, result["r"]) - answered_at(daemon, sent) < 2.5, result["t"]
    # The cursor acknowledged the first five: delivered in the sender's view.
    st = a.call("GET", f"/v1/messages/{ids[0]}").json()
    assert st["recipients"] == [{"recipient": "mimi://tg.example", "status": "delivered"}]
    # Waiting with nothing new ends empty at the deadline, cursor unchanged.
    last = result["r"].json()["next"]
    r = b.call("GET", f"/v1/events?after={last}&wait=1")
    # its second on the daemon's clock (the access log), not the test's
    # around the call, which counted its own wait for a processor too
    assert r.json() == {"events": [], "next": last} and 0.9 < served_in(daemon, r) < 3, served_in(daemon, r)
    assert srv.events == []  # the pushing peer got nothing back
    srv.close()


def test_pull_bad_queries(daemon):
    """A cursor is taken only in the form an answer's `next` has (decimal
    digits, no leading zero but "0" itself); wait and limit are digits.
    Anything else is 400 invalid_query as problem+json, and hands out
    nothing. Until the forty-second session strtoll read "+1", " 1" and
    "01" as 1."""
    a, b, rm, srv = make_peers(daemon)
    a.send(rm["id"], a.user("alice"), "waiting")
    for q in ("after=-1", "after=x", "wait=61", "wait=-1", "limit=0", "limit=1001", "after=",
              "after=%2B1", "after=+1", "after=%201", "after=1%20", "after=01", "after=00", "after=-0", "after=1e3",
              "after=0x1", "after=12345678901234567890", "after=1234567890123456789", "after=1.0",
              "wait=%2B1", "wait=%201", "limit=%2B5", "limit=5%20"):
        r = b.call("GET", "/v1/events?" + q)
        assert r.status_code == 400 and r.json()["code"] == "invalid_query", (q, r.text)
        assert r.headers["Content-Type"].startswith("application/problem+json"), q
    assert [x["state"] for x in daemon.admin("GET", "/outbox?destination=peer:tg").json()["rows"]] == ["pending"]
    r = b.call("GET", "/v1/events?after=0&wait=0&limit=05")
    assert r.status_code == 200 and len(r.json()["events"]) == 1, r.text
    r = b.call("GET", f"/v1/events?after={r.json()['next']}")
    assert r.status_code == 200 and r.json()["events"] == [], r.text
    assert b.call("GET", "/v1/events", sign=False).status_code == 401
    srv.close()


def test_sigterm_answers_waiting_long_polls(daemon):
    _, b, _, srv = make_peers(daemon)
    result = {}

    def poll():
        result["r"] = b.call("GET", "/v1/events?after=0&wait=60")
    t = threading.Thread(target=poll)
    t.start()
    # the poll is at the daemon before the signal (a fixed 0.5 s was not always enough: session 35)
    wait_until(lambda: in_flight(daemon.url) >= 1, what="the long poll at the daemon")
    daemon.signal(signal.SIGTERM)
    t.join(10)
    assert result["r"].status_code == 200 and result["r"].json()["events"] == []
    assert daemon.wait_exit(15) == 0
    # Answered in the drain, at once: the stop on the daemon's clock (its
    # "stopped" record), not the test's around it, which counted the
    # sanitizers' exit and its own wait for a processor too.  A poll left
    # waiting holds the drain its 5 s, and is abandoned.
    stopped = daemon.wait_for(lambda x: x.get("msg") == "stopped")
    assert stopped["drained"] == "true" and stopped["abandoned_requests"] == "0", stopped
    assert stopped_in(daemon) < 3, stopped
    srv.close()


def test_messages_for_a_pull_peer_do_not_wake_the_dispatcher(daemon):
    # The dispatcher delivers to push peers and local adapters; a pull peer
    # fetches its own.  A write whose rows are for pull peers alone wakes
    # the pull stream, not the dispatcher, which used to run a claim
    # transaction, and find nothing, for every such commit.
    a, b, rm, srv = make_peers(daemon)
    r = a.create_room([a.user("carol"), b.user("dave")]).json()  # gk's user and tg's (pull) only

    def claims():
        m = re.search(r"^causeway_dispatch_claims_total (\d+)", daemon.get("/metrics").text, re.M)
        return int(m.group(1))
    before, t0 = claims(), time.time()
    for i in range(40):
        assert a.send(r["id"], a.user("carol"), f"q{i}").status_code == 202
    took, tries = time.time() - t0, claims() - before
    # an idle dispatcher claims every 200 ms on its own: that many, and a few more
    assert tries <= took / 0.2 + 5, f"{tries} claims in {took:.1f} s for 40 messages to a pull peer"
    got = b.call("GET", "/v1/events?after=0").json()["events"]
    assert [e["content"]["parts"][0]["body"] for e in got if e["room"] == r["uri"]] == [f"q{i}" for i in range(40)]
    srv.close()


def test_a_pull_peer_gets_only_the_event_types_it_takes(daemon):
    """A pull peer whose event_types leave out reactions and edits is
    passed over them: the cursor moves past them (answered with fewer or no
    events), and the push peer, which takes every type, gets them all."""
    a, b, rm, srv = make_peers(daemon)
    r = daemon.admin("PATCH", "/peers/tg", json={"event_types": ["message", "delete"]})
    assert r.status_code == 200 and r.json()["event_types"] == ["message", "delete"], r.text
    m1 = a.send(rm["id"], a.user("alice"), "one").json()["id"]
    body = {"type": "reaction", "sender": a.user("alice"),
            "content": {"parts": [{"type": "text/plain", "body": "+1"}], "in_reply_to": m1,
                        "disposition": "reaction"}}
    assert a.call("POST", f"/v1/rooms/{rm['id']}/messages", body, idem="re-1").status_code == 202
    edit = {"type": "edit", "sender": a.user("alice"),
            "content": {"parts": [{"type": "text/plain", "body": "one!"}], "replaces": m1}}
    assert a.call("POST", f"/v1/rooms/{rm['id']}/messages", edit, idem="ed-1").status_code == 202
    m2 = a.send(rm["id"], a.user("alice"), "two").json()["id"]
    got = b.call("GET", "/v1/events?after=0").json()
    assert [e["id"] for e in got["events"]] == [m1, m2], got
    # Only a reaction left after m2's cursor... none: a poll with nothing it takes answers empty.
    assert a.call("POST", f"/v1/rooms/{rm['id']}/messages", dict(body, content=dict(body["content"], in_reply_to=m2)),
                  idem="re-2").status_code == 202
    r = b.call("GET", f"/v1/events?after={got['next']}&wait=2").json()
    assert r["events"] == [] and int(r["next"]) > int(got["next"]), r
    b.call("GET", f"/v1/events?after={r['next']}")
    # Everything the pull peer was sent or passed over is done.
    st = a.call("GET", f"/v1/messages/{m2}").json()
    assert st["recipients"] == [{"recipient": "mimi://tg.example", "status": "delivered"}]
    srv.close()


def test_a_long_poll_waits_on_past_events_the_peer_does_not_take(daemon):
    """A waiting long poll is answered when an event the peer takes comes,
    not when one of a type it leaves out does (a reaction here; typing,
    all day long, for a peer that takes none): that one is passed over and
    the poll waits on, from a cursor past it, which the answer's next
    acknowledges with the rest. Until the forty-eighth session each such
    event answered the poll at once with an empty list."""
    a, b, rm, srv = make_peers(daemon)
    try:
        assert daemon.admin("PATCH", "/peers/tg", json={"event_types": ["message"]}).status_code == 200
        m1 = a.send(rm["id"], a.user("alice"), "one").json()["id"]
        cursor = b.call("GET", "/v1/events?after=0").json()["next"]
        t, result = long_poll(b, cursor, 20)
        body = {"type": "reaction", "sender": a.user("alice"),
                "content": {"parts": [{"type": "text/plain", "body": "+1"}], "in_reply_to": m1,
                            "disposition": "reaction"}}
        assert a.call("POST", f"/v1/rooms/{rm['id']}/messages", body, idem="re-1").status_code == 202
        time.sleep(1.5)
        assert t.is_alive(), result["r"].text
        m2 = a.send(rm["id"], a.user("alice"), "two").json()["id"]
        t.join(15)
        r = result["r"]
        assert r.status_code == 200 and [e["id"] for e in r.json()["events"]] == [m2], r.text
        cursor = r.json()["next"]
        assert b.call("GET", f"/v1/events?after={cursor}").json()["events"] == []
        rows = daemon.admin("GET", "/outbox?destination=peer:tg").json()["rows"]
        assert [x["state"] for x in rows] == ["delivered"] * 3, rows

        def react(n, start):
            for i in range(start, start + n):
                assert a.call("POST", f"/v1/rooms/{rm['id']}/messages", dict(body, content=dict(
                    body["content"], parts=[{"type": "text/plain", "body": f"+{i}"}])), idem=f"re-{i}").status_code == 202
        # Passed over one hand-out at a time (limit=1), those waiting
        # already are passed over as the poll comes, and it waits on.
        react(3, 2)
        t, result = long_poll(b, f"{cursor}&limit=1", 20)
        sent = a.send(rm["id"], a.user("alice"), "three")
        m3 = sent.json()["id"]
        t.join(15)
        assert not t.is_alive(), "the message waits behind the rows passed over"
        r = result["r"]
        assert r.status_code == 200 and [e["id"] for e in r.json()["events"]] == [m3], r.text
        # once the message came, on the daemon's clock (as above)
        took = answered_at(daemon, r) - answered_at(daemon, sent)
        assert took < 2.5, took
        # A backlog of them is passed over some hand-outs at a time: the
        # poll is answered an empty list and a next past those, at once.
        cursor = r.json()["next"]
        react(12, 5)
        r = b.call("GET", f"/v1/events?after={cursor}&limit=1&wait=20")
        assert r.status_code == 200 and r.json()["events"] == [] and int(r.json()["next"]) > int(cursor), r.text
        assert served_in(daemon, r) < 5, served_in(daemon, r)  # on the daemon's clock, not the 20 s wait
    finally:
        srv.close()


def test_a_row_committed_late_is_pulled_not_acknowledged_unseen(daemon, pg, db_url):
    """Outbox ids are taken when a transaction writes, not when it commits:
    a row with a lower id can become visible after a higher one was pulled
    (another daemon process, the policy sweep releasing held rows, a
    replay).  The cursor of the pull that did not see it must not
    acknowledge it: the next pull returns it."""
    a, b, rm, srv = make_peers(daemon)
    first = a.send(rm["id"], a.user("alice"), "first").json()["id"]
    # A writer that takes its outbox id now and commits later.
    held = subprocess.Popen(["psql", db_url, "-v", "ON_ERROR_STOP=1", "-qAt"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held.stdin.write(
            "BEGIN;\n"
            "WITH e AS (INSERT INTO events (public_id, room_id, sender_id, type, content, origin_network, ts) "
            " SELECT 'msg_late', room_id, sender_id, type, jsonb_set(content, '{content,parts,0,body}', '\"late\"'), "
            f" origin_network, ts FROM events WHERE public_id = '{first}' RETURNING id, room_id) "
            "INSERT INTO outbox (event_id, destination, room_id) SELECT id, 'peer:tg', room_id FROM e RETURNING id;\n")
        held.stdin.flush()
        late_row = int(held.stdout.readline())
        second = a.send(rm["id"], a.user("alice"), "second").json()["id"]
        second_row = pg.psql("SELECT o.id FROM outbox o JOIN events e ON e.id = o.event_id "
                             f"WHERE o.destination = 'peer:tg' AND e.public_id = '{second}'", db_url)
        assert int(second_row) > late_row  # taken later, committed first
        got = b.call("GET", "/v1/events?after=0").json()
        assert [e["id"] for e in got["events"]] == [first, second], got
        held.stdin.write("COMMIT;\n")
        held.stdin.close()
        assert held.wait(30) == 0, held.stderr.read()
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()
    late = b.call("GET", f"/v1/events?after={got['next']}").json()
    assert [(e["id"], e["content"]["parts"][0]["body"]) for e in late["events"]] == [("msg_late", "late")], late
    assert pg.psql(f"SELECT state FROM outbox WHERE id = {late_row}", db_url) != "delivered"
    # Asked again from the older cursor (its answer lost), it comes again.
    again = b.call("GET", f"/v1/events?after={got['next']}").json()
    assert [e["id"] for e in again["events"]] == ["msg_late"] and again["next"] == late["next"], again
    # Its own cursor acknowledges it, and with it everything handed out.
    end = b.call("GET", f"/v1/events?after={late['next']}").json()
    assert end == {"events": [], "next": late["next"]}, end
    assert pg.psql("SELECT string_agg(DISTINCT state, ',') FROM outbox WHERE destination = 'peer:tg'", db_url) == \
        "delivered"
    srv.close()


def test_a_push_peer_cannot_pull_its_rows_away_from_the_push(daemon, pg, db_url):
    """GET /v1/events hands out rows only to a peer in pull mode: a push
    peer that pulls gets nothing, and its rows go out by the push, in
    order.  Before, it took them from under the dispatcher (a review saw
    a row pulled while an earlier row of its room was being pushed)."""
    a, b, rm, srv = make_peers(daemon)
    srv.public_b64 = daemon.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    try:
        ids = [b.send(rm["id"], b.user("bob"), f"to gk {i}").json()["id"] for i in range(3)]
        r = a.call("GET", "/v1/events?after=0")
        assert r.status_code == 200 and r.json()["events"] == [], r.text
        got = srv.wait_events(3)
        assert [e["id"] for e in got] == ids
        # the peer has them before the daemon has its 200 and records it (session 35)
        wait_until(lambda: pg.psql("SELECT string_agg(DISTINCT state, ',') FROM outbox WHERE destination = 'peer:gk'",
                                   db_url) == "delivered", what="the pushes recorded")
        # Switched to pull: a room with a row still being pushed waits for it.
        pg.psql("UPDATE peers SET mode = 'pull', push_url = NULL WHERE name = 'gk'", db_url)
        pg.psql(f"UPDATE outbox SET state = 'in_flight', claimed_by = 'host:1:ff', "
                f"claimed_until = now() + interval '1 minute' WHERE destination = 'peer:gk' AND event_id = "
                f"(SELECT id FROM events WHERE public_id = '{ids[0]}')", db_url)
        later = b.send(rm["id"], b.user("bob"), "after the switch").json()["id"]
        assert a.call("GET", "/v1/events?after=0").json()["events"] == []
        pg.psql("UPDATE outbox SET state = 'delivered', claimed_by = NULL, claimed_until = NULL "
                "WHERE destination = 'peer:gk' AND state = 'in_flight'", db_url)
        assert [e["id"] for e in a.call("GET", "/v1/events?after=0").json()["events"]] == [later]
    finally:
        srv.close()


def test_a_peer_switched_to_push_is_not_handed_its_pulled_rows_again(daemon, pg, db_url):
    """A pull peer switched to push that pulls again from an older cursor
    (its old poller still running) is handed nothing: neither new rows nor
    those it was handed and did not acknowledge, whose claim is not
    renewed (they run out of their hand-out and go by the push; the push
    takes no row of a room while one of its rows is in flight).  Its
    cursor still acknowledges what it was handed.  Until the fifty-first
    session's review it was handed them again, their claim renewed for
    10 minutes at each pull, for as long as it pulled."""
    a, b, rm, srv = make_peers(daemon)
    try:
        ids = [a.send(rm["id"], a.user("alice"), f"s{i}").json()["id"] for i in range(2)]
        got = b.call("GET", "/v1/events?after=0").json()
        assert [e["id"] for e in got["events"]] == ids, got
        pg.psql(f"UPDATE peers SET mode = 'push', push_url = '{srv.url}' WHERE name = 'tg'", db_url)
        until = "SELECT string_agg(claimed_until::text, ',' ORDER BY id) FROM outbox WHERE destination = 'peer:tg'"
        pg.psql("UPDATE outbox SET claimed_until = now() + interval '5 minutes' WHERE destination = 'peer:tg'",
                db_url)
        before = pg.psql(until, db_url)
        again = b.call("GET", "/v1/events?after=0")
        assert again.status_code == 200 and again.json() == {"events": [], "next": "0"}, again.text
        assert pg.psql(until, db_url) == before  # not renewed
        assert pg.psql("SELECT string_agg(DISTINCT state, ',') FROM outbox WHERE destination = 'peer:tg'",
                       db_url) == "in_flight"
        # Its cursor acknowledges what it was handed while it pulled.
        assert b.call("GET", f"/v1/events?after={got['next']}").json()["events"] == []
        assert pg.psql("SELECT string_agg(DISTINCT state, ',') FROM outbox WHERE destination = 'peer:tg'",
                       db_url) == "delivered"
    finally:
        srv.close()


def test_a_peer_switched_to_push_by_the_admin_api_is_pushed_its_pulled_rows_at_once(daemon, pg, db_url):
    """PATCH /admin/v1/peers/{name} with "mode": "push" switches a pull
    peer to push, and the rows a pull handed out and the peer did not
    acknowledge are made due again at once, to be pushed in order with the
    rest (none counted as a try), not left in flight until their hand-out
    runs out 10 minutes on, their rooms waiting with them (until the
    fifty-second session the API had no mode, and a peer switched in the
    table waited so).  A mode of another value, or push without a push_url
    given or stored, is 400 and changes nothing."""
    a, b, rm, srv = make_peers(daemon)
    srv2 = NotifyServer()
    srv2.public_b64 = daemon.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    try:
        ids = [a.send(rm["id"], a.user("alice"), f"p{i}").json()["id"] for i in range(2)]
        got = b.call("GET", "/v1/events?after=0").json()
        assert [e["id"] for e in got["events"]] == ids, got
        ids.append(a.send(rm["id"], a.user("alice"), "p2").json()["id"])  # not handed out yet
        mode = "SELECT mode FROM peers WHERE name = 'tg'"
        for body in ({"mode": "poll"}, {"mode": 1}, {"mode": "push"}, {"mode": "push", "push_url": "ftp://x"}):
            r = daemon.admin("PATCH", "/peers/tg", json=body)
            assert r.status_code == 400 and r.json()["code"] == "invalid_body", (body, r.text)
        assert pg.psql(mode, db_url) == "pull"
        assert pg.psql("SELECT count(*) FROM outbox WHERE destination = 'peer:tg' AND state = 'in_flight'",
                       db_url) == "2"
        started = time.monotonic()
        r = daemon.admin("PATCH", "/peers/tg", json={"mode": "push", "push_url": srv2.url})
        assert r.status_code == 200 and r.json()["mode"] == "push", r.text
        assert pg.psql(mode, db_url) == "push"
        pushed = srv2.wait_events(3, timeout=15)
        assert [e["id"] for e in pushed] == ids, pushed
        assert time.monotonic() - started < 15
        wait_until(lambda: pg.psql("SELECT string_agg(DISTINCT state, ',') FROM outbox "
                                   "WHERE destination = 'peer:tg'", db_url) == "delivered", what="all pushed")
        assert pg.psql("SELECT count(*) FROM delivery_attempts d JOIN outbox o ON o.id = d.outbox_id "
                       "WHERE o.destination = 'peer:tg' AND NOT d.ok", db_url) == "0"
        # a pull now (an old poller) is handed nothing, and acknowledges nothing it did not get
        again = b.call("GET", f"/v1/events?after={got['next']}")
        assert again.status_code == 200 and again.json()["events"] == [], again.text
        audit = pg.psql("SELECT details->>'mode' FROM audit_log WHERE action = 'peer.update' "
                        "AND subject = 'tg' ORDER BY id DESC LIMIT 1", db_url)
        assert audit == "push", audit
    finally:
        srv.close()
        srv2.close()


def test_a_pulled_row_taken_back_unacknowledged_has_no_try_in_its_trace(make_daemon, pg, db_url):
    """Rows a pull handed out and the peer did not acknowledge within 10
    minutes are taken back by the dispatcher's recovery of run-out claims,
    due again.  The pull made no try (it counts none in attempts): the
    message's trace shows none, last_error says the hand-out was taken
    back, and a row never dies of it, even one whose attempts (from pushes
    under a larger retry budget) are past today's.  Until the forty-second
    session each got a "no outcome" try, "the process delivering it
    stopped", and such a row was made a dead letter."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2"}}).start()
    a, b, rm, srv = make_peers(d)
    try:
        ids = [a.send(rm["id"], a.user("alice"), f"t{i}").json()["id"] for i in range(2)]
        got = b.call("GET", "/v1/events?after=0").json()
        assert [e["id"] for e in got["events"]] == ids, got
        # pushed 3 times under a budget of 12, then the peer pulled it
        pg.psql("UPDATE outbox SET attempts = 3 WHERE destination = 'peer:tg' AND event_id = "
                f"(SELECT id FROM events WHERE public_id = '{ids[0]}')", db_url)
        # ten minutes on, not acknowledged: the hand-out ran out
        pg.psql("UPDATE outbox SET claimed_until = now() - interval '1 second' "
                "WHERE destination = 'peer:tg' AND state = 'in_flight'", db_url)
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'peer:tg' AND state = 'in_flight'",
                                   db_url) == "0", what="the hand-out taken back")
        for i, mid in enumerate(ids):
            rows = [x for x in d.admin("GET", f"/messages/{mid}").json()["deliveries"]
                    if x["destination"] == "peer:tg"]
            assert len(rows) == 1, rows
            row = rows[0]
            assert row["state"] == "pending" and row["tries"] == [] and row["attempts"] == (3 if i == 0 else 0), row
            assert row["last_error"].startswith("handed out to the peer's pull and not acknowledged within 10 "
                                                "minutes"), row
        # handed out anew, in order, and acknowledged: delivered, the note gone
        again = b.call("GET", "/v1/events?after=0").json()
        assert [e["id"] for e in again["events"]] == ids, again
        assert b.call("GET", f"/v1/events?after={again['next']}").json()["events"] == []
        for mid in ids:
            row = [x for x in d.admin("GET", f"/messages/{mid}").json()["deliveries"]
                   if x["destination"] == "peer:tg"][0]
            assert row["state"] == "delivered" and row["last_error"] is None and row["tries"] == [], row
    finally:
        srv.close()


def test_a_backlog_of_large_events_comes_in_several_bounded_answers(make_daemon, db_url):
    """An answer holds events up to about server.max_body_bytes (at least
    one): a backlog of large events comes in several pulls, in order, none
    lost. Before, one answer took up to `limit` events whatever their size
    (1000 of 64 KiB: 64 MiB held for one long-poll)."""
    budget = 256 * 1024
    d = make_daemon(db_url, options={"server": {"max_body_bytes": "256KiB"}}).start()
    a, b, rm, srv = make_peers(d)
    ids = []
    for i in range(16):  # 16 events of 60 kB (4 parts of 15 kB: near the largest a peer may send)
        parts = [{"type": "text/plain", "body": f"{i:03d}{j}" + "x" * 15000} for j in range(4)]
        r = a.call("POST", f"/v1/rooms/{rm['id']}/messages",
                   {"type": "message", "sender": a.user("alice"), "content": {"parts": parts}}, idem=f"big-{i}")
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    got, sizes, cursor = [], [], "0"
    for _ in range(len(ids) + 1):
        r = b.call("GET", f"/v1/events?after={cursor}&limit=1000")
        assert r.status_code == 200, r.text
        body = r.json()
        if not body["events"]:
            break
        sizes.append(len(r.content))
        got += [e["id"] for e in body["events"]]
        cursor = body["next"]
    assert got == ids
    assert len(sizes) >= 3 and max(sizes) <= budget, sizes
    # The last cursor acknowledged them all.
    st = a.call("GET", f"/v1/messages/{ids[-1]}").json()
    assert st["recipients"] == [{"recipient": "mimi://tg.example", "status": "delivered"}]
    srv.close()


def test_an_answer_of_local_users_files_keeps_its_bound_as_sent(make_daemon, db_url, pg):
    """A local user's file goes to the peer as a link of Causeway's
    (/v1/media/{token}?ev=&exp=, peer_media_offer), longer than its mxc://
    source: the answer's bound (server.max_body_bytes) holds for the
    answer as sent, links and all, not for the stored events, and a
    backlog of such messages comes in several answers, in order, none
    lost.  Until the fifty-second session the bound counted the stored
    content, and such an answer passed it by some 40 %."""
    from homeserver import Homeserver
    from test_matrix import registration, start_mx  # here: test_matrix imports this module's neighbours
    budget = 128 * 1024
    hs = Homeserver(server_name="example.org", registration=registration())
    hs.start()
    d = start_mx(make_daemon, db_url, hs, server={"max_body_bytes": "128KiB"})
    a, b, rm, srv = make_peers(d)
    try:
        ids = []
        for k in range(3):
            items = [{"idempotency_key": f"f{k}-{i}", "room": rm["uri"] if "uri" in rm else rm["id"],
                      "event": {"type": "message", "sender": a.user("alice"),
                                "content": {"attachments": [
                                    {"content_type": "image/png", "size": 1,
                                     "url": f"mxc://example.org/{k:02d}{i:02d}{j}" + "m" * 140} for j in range(8)]}}}
                     for i in range(40)]
            r = a.call("POST", "/v1/batch", {"events": items})
            assert r.status_code == 200, r.text
            res = r.json()["results"]
            assert all(x["status"] == "accepted" for x in res), res
            ids += [x["id"] for x in res]
        # made a local user's (a Matrix user's files, as her adapter makes them)
        pg.psql("INSERT INTO identities (uri, domain, localpart, is_local, network) "
                "VALUES ('mimi://example.org/u/zed', 'example.org', 'zed', true, 'matrix')", db_url)
        pg.psql("UPDATE events SET sender_id = (SELECT id FROM identities WHERE uri = 'mimi://example.org/u/zed') "
                f"WHERE public_id IN ({', '.join(repr(i) for i in ids)})", db_url)
        got, sizes, cursor = [], [], "0"
        for _ in range(len(ids) + 1):
            r = b.call("GET", f"/v1/events?after={cursor}&limit=1000")
            assert r.status_code == 200, r.text
            body = r.json()
            if not body["events"]:
                break
            sizes.append(len(r.content))
            for e in body["events"]:
                assert all(x["url"].startswith(d.url + "/v1/media/") for x in e["content"]["attachments"]), e
            got += [e["id"] for e in body["events"]]
            cursor = body["next"]
        assert got == ids
        assert len(sizes) >= 3 and max(sizes) <= budget, sizes
        assert pg.psql("SELECT string_agg(DISTINCT state, ',') FROM outbox WHERE destination = 'peer:tg'",
                       db_url) == "delivered"
    finally:
        srv.close()
        hs.close()


def test_a_pulled_events_numbers_are_those_a_push_gives(daemon):
    """A pulled event's numbers are printed as a pushed one's, 17
    significant digits (docs/interop-api.md, "Unknown members and
    numbers"): until the fifty-third session the answer was printed with
    the HTTP thread's 6, and 0.123456789 was pulled as 0.123457,
    1234567.891 as 1234570.0."""
    a, b, rm, srv = make_peers(daemon)
    body = {"type": "message", "sender": a.user("alice"), "x_real": 0.123456789, "x_big": 1234567.891,
            "x_small": 1e-15, "x_int": 9007199254740991,
            "content": {"parts": [{"type": "text/plain", "body": "n"}], "x": [2.718281828459045]}}
    r = a.call("POST", f"/v1/rooms/{rm['id']}/messages", body, idem="numbers")
    assert r.status_code == 202, r.text
    r = b.call("GET", "/v1/events?after=0")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json", r.text
    ev = r.json()["events"][0]
    assert (ev["x_real"], ev["x_big"], ev["x_small"], ev["x_int"], ev["content"]["x"]) == (
        0.123456789, 1234567.891, 1e-15, 9007199254740991, [2.718281828459045]), r.text
    srv.close()


def test_a_stored_event_that_does_not_parse_is_not_pulled_as_an_empty_shell(daemon, pg, db_url):
    """As for a push (test_peer_api.py): an event stored before the
    thirtieth session with a number jansson cannot read (1e19, stored as
    20 digits) was handed out as a shell without content.  Now it is left
    out of the answer, its row a dead letter, said in the log; the room's
    next event comes in the same answer."""
    a, b, rm, srv = make_peers(daemon)
    nxt = b.call("GET", "/v1/events?after=0").json()["next"]
    bad = a.send(rm["id"], a.user("alice"), "stored before the fix").json()["id"]
    after = a.send(rm["id"], a.user("alice"), "after it").json()["id"]
    pg.psql("UPDATE events SET content = jsonb_set(content, '{x}', '10000000000000000000'::jsonb) "
            f"WHERE public_id = '{bad}'", db_url)
    got = b.call("GET", f"/v1/events?after={nxt}").json()
    assert [e["id"] for e in got["events"]] == [after], got
    assert got["events"][0]["content"]["parts"][0]["body"] == "after it"
    row = pg.psql("SELECT o.state, o.last_error FROM outbox o JOIN events e ON e.id = o.event_id "
                  f"WHERE e.public_id = '{bad}'", db_url)
    assert row.startswith("dead|") and "does not parse" in row, row
    rec = daemon.wait_for(lambda r: r.get("msg", "").startswith("a stored event does not parse"))
    assert rec["event"] == bad and rec["destination"] == "peer:tg"
    # Acknowledged with the rest, it stays a dead letter.
    b.call("GET", f"/v1/events?after={got['next']}")
    assert pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{bad}'", db_url) == "dead"
    srv.close()


PULL_UNAVAILABLE = "the database is unavailable; pull again from the same position (after)"


def test_a_pull_that_the_database_fails_is_503_and_the_next_one_works(make_daemon, db_url, pg):
    """The pull's lock and hand-out go as one pipeline: when either
    statement fails (here each waits out its statement timeout behind a
    lock of another session), the answer is 503 with Retry-After
    (database.retry_after_s, as every 503 of the database's: until the
    forty-fourth session's review a pull's was 2 whatever it said), nothing
    is handed out or acknowledged, and the connection serves the next pull."""
    d = make_daemon(db_url, options={"database": {"statement_timeout_ms": "1000", "retry_after_s": "7"}}).start()
    a, b, rm, srv = make_peers(d)
    one = a.send(rm["id"], a.user("alice"), "one").json()["id"]
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'peer:tg' AND state = 'pending'",
                               db_url) == "1", what="the row for tg")
    lockers = {
        # the hand-out (the second statement) waits on the table
        "hand-out": ("BEGIN; LOCK TABLE outbox IN SHARE MODE; SELECT pg_sleep(60); COMMIT;",
                     "relation = 'outbox'::regclass AND mode = 'ShareLock'"),
        # the peer's pull lock (the first) is held: the hand-out is aborted
        # (the locker's own: the daemon takes advisory locks of its own, a
        # claim's for one, and a test that counted any advisory lock pulled
        # before the locker had its lock, under load)
        "lock": ("SELECT pg_advisory_lock(hashtextextended('causeway.pull:peer:tg', 0)); SELECT pg_sleep(60);",
                 "locktype = 'advisory' AND pid IN (SELECT pid FROM pg_stat_activity "
                 "WHERE query LIKE '%causeway.pull:peer:tg%' AND pid <> pg_backend_pid())"),
    }
    for what, (sql, lock) in lockers.items():
        locker = subprocess.Popen(["psql", db_url, "-qAtc", sql], stdout=subprocess.DEVNULL)
        try:
            wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_locks WHERE {lock} AND granted", db_url) == "1",
                       what=f"the {what} lock")
            r = b.call("GET", "/v1/events?after=0")
            assert r.status_code == 503 and r.headers.get("Retry-After") == "7", (what, r.status_code, r.headers)
            assert r.json()["code"] == "unavailable", r.text
            # PostgreSQL's own message (which may quote stored data) goes to
            # the log, not to the peer (until the forty-fourth session the
            # detail was "the database did not answer in time: ERROR:
            # canceling statement due to statement timeout")
            assert r.json()["detail"] == PULL_UNAVAILABLE, (what, r.text)
            assert pg.psql("SELECT state FROM outbox WHERE destination = 'peer:tg'", db_url) == "pending", what
        finally:
            locker.kill()
            locker.wait()
            pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' "
                    "AND pid <> pg_backend_pid()", db_url)
    got = wait_until(lambda: (lambda r: r.status_code == 200 and r.json())(b.call("GET", "/v1/events?after=0")),
                     what="a pull that works")
    assert [e["id"] for e in got["events"]] == [one], got
    end = b.call("GET", f"/v1/events?after={got['next']}").json()
    assert end["events"] == [] and pg.psql("SELECT state FROM outbox WHERE destination = 'peer:tg'", db_url) == \
        "delivered"
    srv.close()


def test_a_pull_peer_keeps_at_most_max_long_polls_waiting(make_daemon, db_url):
    """A pull peer's long polls waiting at once are capped
    (peer.max_long_polls, here 2, per process): one more is answered 429
    rate_limited with Retry-After, at once, while one without wait is
    answered as usual, and another pull peer's poll is not counted with
    them; once the waiting ones are answered, the peer may wait again.
    Until the thirtieth session a peer could hold hundreds (up to
    server.connection_limit), and each notification ran the hand-out once
    per waiting poll: another pull peer's message took 8 times as long
    (a review's probe)."""
    d = make_daemon(db_url, options={"peer": {"max_long_polls": "2"}}).start()
    a, b, rm, srv = make_peers(d)
    c = PeerClient(d.url, "tg2", "t2.example")
    c.token = d.admin("POST", "/peers", json={"name": "tg2", "domain": "t2.example", "mode": "pull",
                                              "public_key": c.signer.public_b64}).json()["token"]
    try:
        cursor = b.call("GET", "/v1/events?after=0").json()["next"]
        held = [long_poll(b, cursor, 20, others=i) for i in range(2)]
        r = b.call("GET", f"/v1/events?after={cursor}&wait=20")
        assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
        assert int(r.headers["Retry-After"]) >= 1 and served_in(d, r) < 10  # at once, not the 20 s wait
        assert "max_long_polls" not in r.text and "2" in r.json()["detail"], r.text
        r = b.call("GET", f"/v1/events?after={cursor}")  # no wait: not counted
        assert r.status_code == 200 and r.json()["events"] == [], r.text
        other, res = long_poll(c, 0, 3, others=2)  # another peer's own count
        other.join(10)
        assert res["r"].status_code == 200, res["r"].text
        new = a.send(rm["id"], a.user("alice"), "for the waiting ones").json()["id"]
        for t, result in held:
            t.join(10)
            assert result["r"].status_code == 200 and [e["id"] for e in result["r"].json()["events"]] == [new]
        again, res = long_poll(b, held[0][1]["r"].json()["next"], 3)
        again.join(10)
        assert res["r"].status_code == 200, res["r"].text
    finally:
        srv.close()


def test_a_pull_peer_keeps_at_most_max_long_polls_pulls_without_wait_open(make_daemon, db_url):
    """Pulls without wait are answered at once, but by the one thread that
    answers every pull peer, one after the other: a peer's open ones are
    capped too (peer.max_long_polls, here 2, a count apart from its long
    polls'), one more 429 rate_limited with Retry-After at once. Until
    the forty-eighth session they had no cap: one peer's 40 pulls at once
    made another pull peer's waiting poll answer a new event 2 s late
    instead of 0.01 s (a review's probe). Here the peer's turn is held
    (its advisory lock, pull_lock_sql), so that its first pull waits in
    the thread and the second behind it."""
    d = make_daemon(db_url, options={"peer": {"max_long_polls": "2"}}).start()
    a, b, rm, srv = make_peers(d)
    lock = "hashtextextended('causeway.pull:peer:tg', 0)"
    holder = subprocess.Popen(["psql", db_url, "-v", "ON_ERROR_STOP=1", "-qAt"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answers = {}

    def pull(i):
        answers[i] = b.call("GET", "/v1/events?after=0")
    threads = []
    try:
        holder.stdin.write(f"SELECT pg_advisory_lock({lock});\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == ""
        for i in range(2):
            threads.append(threading.Thread(target=pull, args=(i,)))
            threads[-1].start()
            wait_until(lambda: in_flight(b.base) > i, what="the pull at the daemon")
        # In flight is counted before the handler counts the pull: the
        # third may yet overtake the second. Whichever it is, one of the
        # three is refused at once and the other two wait.
        t0 = time.time()
        threads.append(threading.Thread(target=pull, args=(2,)))
        threads[-1].start()
        wait_until(lambda: answers, what="a pull refused")
        assert time.time() - t0 < 10  # at once: the two others wait for as long as the lock is held
        (refused, r), = answers.items()
        assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["detail"].startswith("2 pulls of this peer without wait are being answered"), r.text
        assert all(threads[k].is_alive() for k in {0, 1, 2} - {refused})
        # a long poll has a count of its own
        waiting = threading.Thread(target=lambda: answers.update(w=b.call("GET", "/v1/events?after=0&wait=1")))
        waiting.start()
        wait_until(lambda: in_flight(b.base) > 2 or not waiting.is_alive(), what="the long poll at the daemon")
        holder.stdin.write(f"SELECT pg_advisory_unlock({lock});\n")
        holder.stdin.flush()
        for t in threads + [waiting]:
            t.join(15)
        assert [answers[k].status_code for k in sorted({0, 1, 2} - {refused}) + ["w"]] == [200, 200, 200], answers
        # the places are free again
        assert b.call("GET", "/v1/events?after=0").status_code == 200
    finally:
        holder.stdin.close()
        holder.wait(10)
        srv.close()


def test_a_disabled_or_rotated_peers_waiting_long_poll_is_answered_401(daemon):
    """A long poll waiting when its peer is disabled, or its token
    rotated, is answered at once as a fresh request with that token would
    be (401 unauthenticated), not handed the events that come after: until
    the thirty-first session it waited on and got them (a review's probe;
    the reload of the peers refreshed the registry, not the waiting polls,
    and the hand-out looked at the peer's mode only).  What came meanwhile
    waits for the peer, enabled again or with its new token."""
    a, b, rm, srv = make_peers(daemon)
    try:
        cursor = b.call("GET", "/v1/events?after=0").json()["next"]
        for change in ("disable", "rotate"):
            t, result = long_poll(b, cursor, 30)
            t0 = time.time()
            r = daemon.admin("POST", f"/peers/tg/{change}")
            assert r.status_code == 200, r.text
            rotated = r.json().get("token")
            new = a.send(rm["id"], a.user("alice"), f"after the {change}").json()["id"]
            t.join(15)
            assert not t.is_alive(), f"the long poll still waits after the {change}"
            r = result["r"]
            assert r.status_code == 401, (change, r.text)
            assert r.json()["code"] == "unauthenticated" and r.headers["WWW-Authenticate"] == "Bearer", r.text
            assert r.headers["Content-Type"].startswith("application/problem+json")
            assert time.time() - t0 < 10
            # A fresh request with that token is answered the same.
            again = b.call("GET", f"/v1/events?after={cursor}")
            assert again.status_code == 401 and again.json()["code"] == "unauthenticated", again.text
            if change == "disable":
                assert daemon.admin("POST", "/peers/tg/enable").status_code == 200
            else:
                b.token = rotated
            got = b.call("GET", f"/v1/events?after={cursor}").json()
            assert [e["id"] for e in got["events"]] == [new], got
            cursor = got["next"]
    finally:
        srv.close()


# The one detail of a replayed nonce's 401 (adapters/peer/peers.h,
# PEER_NONCE_REPLAYED), whichever check found it.
REPLAYED = "this signature's nonce was seen before (a replay)"


def test_a_pull_replayed_to_another_process_hands_out_nothing(make_daemon, pg, db_url):
    """Two daemon processes behind one public URL: a pull (it acknowledges
    up to its cursor and hands out what follows) captured on its way to one
    and replayed to the other is refused there, 401 bad_signature, and
    hands out nothing: its nonce is claimed in the database, as a write's
    is. Until the forty-first session the replay was answered the peer's
    events (those in flight above the cursor, and new ones). A long poll
    claims once, however often it asks; fresh pulls pass on either process.
    A replayed write is answered the same detail, on either process."""
    public = "https://gw.example.org"
    d1 = make_daemon(db_url, options={"server": {"public_url": public}}).start()
    d2 = make_daemon(db_url, options={"server": {"public_url": public}}).start()
    srv = NotifyServer()
    try:
        a = PeerClient(public, "gk", "wa.example")
        b = PeerClient(public, "tg", "tg.example")
        a.token = d1.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "push_url": srv.url,
                                                   "public_key": a.signer.public_b64}).json()["token"]
        b.token = d1.admin("POST", "/peers", json={"name": "tg", "domain": "tg.example", "mode": "pull",
                                                   "public_key": b.signer.public_b64}).json()["token"]

        def signed(client, method, path, body=None, idem=None):
            raw = json.dumps(body).encode() if body is not None else None
            h = client.signer.headers(method, public + path, raw, idem=idem)
            h["Authorization"] = "Bearer " + client.token
            return raw, h

        def send(text):
            raw, h = signed(a, "POST", f"/v1/rooms/{rid}/messages", {
                "type": "message", "sender": a.user("alice"),
                "content": {"parts": [{"type": "text/plain", "body": text}]}}, idem=text)
            r = d1.request("POST", f"/v1/rooms/{rid}/messages", data=raw, headers=h)
            assert r.status_code == 202, r.text
            return r.json()["id"]

        room_raw, room_h = signed(a, "POST", "/v1/rooms", {"kind": "direct",
                                                          "members": [a.user("alice"), b.user("bob")]})
        r = d1.request("POST", "/v1/rooms", data=room_raw, headers=room_h)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        first = send("one")
        _, pull = signed(b, "GET", "/v1/events?after=0")
        r = d1.request("GET", "/v1/events?after=0", headers=pull)
        assert r.status_code == 200 and [e["id"] for e in r.json()["events"]] == [first], r.text
        send("two")
        for d in (d1, d2):
            r = d.request("GET", "/v1/events?after=0", headers=pull)
            assert r.status_code == 401 and r.json()["code"] == "bad_signature", r.text
            assert r.json()["detail"] == REPLAYED and r.headers.get("WWW-Authenticate") == "Bearer"
        # A write replayed is told the same, by its own process (the
        # in-memory cache) and by the other (its claim in the database).
        for d in (d1, d2):
            r = d.request("POST", "/v1/rooms", data=room_raw, headers=room_h)
            assert r.status_code == 401 and r.json() == {**r.json(), "code": "bad_signature", "detail": REPLAYED}, \
                r.text
        # Nothing more was handed out: "two" is pending still.
        assert pg.psql("SELECT string_agg(o.state, ',' ORDER BY o.id) FROM outbox o "
                       "WHERE o.destination = 'peer:tg'", db_url) == "in_flight,pending"
        nonces = int(pg.psql("SELECT count(*) FROM signature_nonces", db_url))
        # Fresh pulls on the other process, a long poll among them: one
        # claim each, however often the long poll asks.
        _, h = signed(b, "GET", "/v1/events?after=0&wait=3")
        r = d2.request("GET", "/v1/events?after=0&wait=3", headers=h)
        assert r.status_code == 200 and len(r.json()["events"]) == 2, r.text
        path = f"/v1/events?after={r.json()['next']}&wait=2"
        r = d2.request("GET", path, headers=signed(b, "GET", path)[1])
        assert r.status_code == 200 and r.json()["events"] == [], r.text
        assert int(pg.psql("SELECT count(*) FROM signature_nonces", db_url)) == nonces + 2
    finally:
        srv.close()


def test_a_long_poll_is_answered_for_rows_written_while_its_poller_reconnected(make_daemon, db_url, pg):
    """The pull poller's connection lost, the rows written before it is
    back (its LISTEN anew) were notified to no one: the waiting long polls
    are asked again once it is back, not left to their deadline (until the
    forty-second session they waited it out, up to a minute)."""
    from pgproxy import PgProxy
    with PgProxy(db_url) as px:
        d = make_daemon(px.url).start()
        a, b, rm, srv = make_peers(d)
        result = {}

        def poll():
            url = b.base + "/v1/events?after=0&wait=50"
            h = {"Authorization": "Bearer " + b.token}
            h.update(b.signer.headers("GET", url, None))
            result["r"] = requests.get(url, headers=h, timeout=90)
            result["at"] = time.time()
        t = threading.Thread(target=poll)
        t.start()
        # The poller's backend: after the start its last statement is a
        # hand-out or the registry's reload (a peer's change notified),
        # which it alone runs.  The poll waits at the poller once its
        # nonce is claimed (there, on that connection) and that backend is
        # idle after the hand-out that followed: a cut before it (a second
        # after the request, on a loaded machine) left it a pull coming in
        # while the poller connected, answered 503; and the reload that
        # came after the hand-out was no "ack AS (UPDATE outbox" for the
        # cut to find (session 50).
        poller = ("pid <> pg_backend_pid() AND (query LIKE '%ack AS (UPDATE outbox%' "
                  "OR query LIKE 'SELECT id, name, domain, token_hash,%')")
        wait_until(lambda: pg.psql("SELECT EXISTS (SELECT 1 FROM signature_nonces n JOIN peers p ON p.id = n.peer_id "
                                   "WHERE p.name = 'tg') AND EXISTS (SELECT 1 FROM pg_stat_activity WHERE "
                                   f"state = 'idle' AND {poller})", db_url) == "t",
                   what="the long poll waiting at the poller")
        assert t.is_alive()
        px.slow(connect=3.0)
        cut = pg.psql(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {poller}", db_url)
        assert cut == "1", cut
        one = a.send(rm["id"], a.user("alice"), "while away").json()["id"]
        sent = time.time()
        t.join(80)
        assert not t.is_alive()
        r = result["r"]
        assert r.status_code == 200 and [e["id"] for e in r.json()["events"]] == [one], r.text
        # answered once the poller was back (3 s after the cut), not at the
        # poll's deadline (50 s after it began)
        assert result["at"] - sent < 30, result["at"] - sent
        px.slow()
        srv.close()


def test_a_long_poll_whose_client_went_away_frees_its_place(daemon):
    """A client that closes its connection while its long poll waits: the
    poll ends then, not at its deadline, so that it no longer holds one of
    the peer's peer.max_long_polls (until the forty-second session the
    peer's next polls were 429 for up to a minute)."""
    import socket
    import urllib.parse
    a, b, rm, srv = make_peers(daemon)
    u = urllib.parse.urlsplit(b.base)
    socks = []
    for i in range(4):   # peer.max_long_polls
        target = "/v1/events?after=0&wait=50"
        h = {"Authorization": "Bearer " + b.token}
        h.update(b.signer.headers("GET", b.base + target, None))
        s = socket.create_connection((u.hostname, u.port))
        s.sendall((f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\n" +
                   "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode())
        socks.append(s)
        wait_until(lambda: in_flight(b.base) > i, what="the long poll at the daemon")
    for s in socks:
        s.close()
    wait_until(lambda: in_flight(b.base) == 0, timeout=20, what="the closed clients' polls ended")
    t, result = long_poll(b, 0, 30)
    one = a.send(rm["id"], a.user("alice"), "after they left").json()["id"]
    t.join(40)
    r = result["r"]
    assert r.status_code == 200 and [e["id"] for e in r.json()["events"]] == [one], r.text
    srv.close()


def test_a_head_on_the_pull_is_405_and_hands_nothing_out(daemon, pg, db_url):
    """A pull acknowledges what its after names and hands out what
    follows: a HEAD, the GET of every other path (RFC 9110 9.3.2), ran the
    whole pull until the forty-fifth session (the events handed out into
    an answer without a body, the cursor moved, a wait of up to a minute).
    It is 405 with Allow: GET, signed or not, before any credentials, and
    nothing is handed out, acknowledged or waited for; another method's
    405 there does not offer HEAD either."""
    a, b, rm, srv = make_peers(daemon)
    ids = [a.send(rm["id"], a.user("alice"), f"h{i}").json()["id"] for i in range(2)]
    state = "SELECT string_agg(state || coalesce(claimed_by, ''), ',' ORDER BY id) FROM outbox " \
            "WHERE destination = 'peer:tg'"
    before = pg.psql(state, db_url)
    assert before == "pending,pending", before
    t0 = time.time()
    for r in (b.call("HEAD", "/v1/events?after=0&wait=30"), daemon.request("HEAD", "/v1/events?after=0"),
              b.call("HEAD", "/v1/events?after=999999999")):
        assert r.status_code == 405 and r.headers["Allow"] == "GET", (r.status_code, r.headers)
        assert r.content == b""
    assert time.time() - t0 < 10
    assert pg.psql(state, db_url) == before
    r = daemon.request("POST", "/v1/events")
    assert r.status_code == 405 and r.headers["Allow"] == "GET", r.headers
    # the GET itself: every event, from the start
    r = b.call("GET", "/v1/events?after=0")
    assert [e["id"] for e in r.json()["events"]] == ids, r.text
    # a HEAD of another path is still its GET
    path = f"/v1/rooms/{rm['id']}"
    assert b.call("HEAD", path).status_code == 200
    srv.close()


def test_a_cursor_past_every_one_given_is_refused_and_acknowledges_nothing(daemon, pg, db_url):
    """after acknowledges what was handed out up to it: a cursor above every
    position this server has given (none of its answers had it: a peer's
    bug, a cursor kept across a restore of the database) is 400
    invalid_query, and nothing is acknowledged or handed out.  Until the
    forty-sixth session it marked every row in flight to the peer
    delivered, those of an answer the peer never got too (the sender saw
    "delivered"), and came back as the answer's next."""
    a, b, rm, srv = make_peers(daemon)
    ids = [a.send(rm["id"], a.user("alice"), f"c{i}").json()["id"] for i in range(3)]
    state = "SELECT string_agg(state, ',' ORDER BY id) FROM outbox WHERE destination = 'peer:tg'"
    got = b.call("GET", "/v1/events?after=0&limit=2").json()  # an answer the peer loses
    assert [e["id"] for e in got["events"]] == ids[:2], got
    before = pg.psql(state, db_url)
    assert before == "in_flight,in_flight,pending", before
    last = int(pg.psql("SELECT last_value FROM outbox_id_seq", db_url))
    for cursor in (last + 1, 10 ** 17):
        for wait in ("", "&wait=5"):
            r = b.call("GET", f"/v1/events?after={cursor}{wait}")
            assert r.status_code == 400 and r.json()["code"] == "invalid_query", (cursor, r.text)
            assert "above every cursor this server has given" in r.json()["detail"], r.text
            # a long poll is refused at once (on the daemon's clock: the
            # test's around the call counted its own connect and signing)
            assert served_in(daemon, r) < 3, served_in(daemon, r)
    assert pg.psql(state, db_url) == before
    st = a.call("GET", f"/v1/messages/{ids[0]}").json()
    assert st["recipients"] == [{"recipient": "mimi://tg.example", "status": "accepted"}], st
    # the cursors it was given work as before: from 0 the same two, then the rest
    again = b.call("GET", "/v1/events?after=0").json()
    assert [e["id"] for e in again["events"]] == ids, again
    assert b.call("GET", f"/v1/events?after={again['next']}").json()["events"] == []
    assert pg.psql(state, db_url) == "delivered,delivered,delivered"
    srv.close()


def test_a_typing_notification_too_old_to_show_is_expired_not_pulled(make_daemon, db_url, pg):
    """Typing is best-effort: a notification accepted longer ago than
    dispatcher.typing_stale_ms would show someone typing who stopped long
    ago, and a push expires it instead of sending it late
    (test_peer_api.py::test_typing_too_old_to_be_shown_is_expired_not_sent_late).
    A pull does the same with those it would hand out: left out of the
    answer, its row expired with the push's words; the events around it
    come, and a fresh one is handed out.  Until the forty-sixth session a
    pull peer that came back late got every one of them."""
    d = make_daemon(db_url, options={"dispatcher": {"typing_stale_ms": "2000"}}).start()
    a, b, rm, srv = make_peers(d)
    typing = {"type": "typing", "sender": a.user("alice"), "content": {"state": "start"}}
    first = a.send(rm["id"], a.user("alice"), "before").json()["id"]
    assert a.call("POST", f"/v1/rooms/{rm['id']}/typing", typing).status_code == 202
    last = a.send(rm["id"], a.user("alice"), "after").json()["id"]
    time.sleep(3)
    got = b.call("GET", "/v1/events?after=0").json()
    assert [e["id"] for e in got["events"]] == [first, last], got
    rows = "SELECT string_agg(e.type || ':' || o.state || ':' || coalesce(o.last_error, ''), ',' ORDER BY o.id) " \
           "FROM outbox o JOIN events e ON e.id = o.event_id WHERE o.destination = 'peer:tg'"
    assert pg.psql(rows, db_url) == \
        "message:in_flight:,typing:expired:typing notification too old to be shown: not sent,message:in_flight:"
    assert b.call("GET", f"/v1/events?after={got['next']}").json()["events"] == []
    assert pg.psql(rows, db_url).count("delivered") == 2
    # a fresh one is handed out as before
    assert a.call("POST", f"/v1/rooms/{rm['id']}/typing", typing).status_code == 202
    fresh = b.call("GET", f"/v1/events?after={got['next']}").json()
    assert [e["type"] for e in fresh["events"]] == ["typing"], fresh
    srv.close()


def test_a_dead_letter_replayed_to_a_pull_peer_wakes_its_waiting_long_poll(daemon, pg, db_url):
    """A pull peer's dead letter (one that died while the peer was pushed
    to, say) replayed while the peer's long poll waits is handed to that
    poll at once, not at its deadline: the replay notifies
    causeway_outbox, which the pull stream listens to as well as
    causeway_pull (checked in the forty-sixth session's review: 0.05 s)."""
    a, b, rm, srv = make_peers(daemon)
    try:
        mid = a.send(rm["id"], a.user("alice"), "dead, then replayed").json()["id"]
        oid = pg.psql("SELECT o.id FROM outbox o JOIN events e ON e.id = o.event_id "
                      f"WHERE e.public_id = '{mid}' AND o.destination = 'peer:tg'", db_url)
        pg.psql(f"UPDATE outbox SET state = 'dead', attempts = 3 WHERE id = {oid}", db_url)
        r = b.call("GET", "/v1/events?after=0").json()
        assert r["events"] == [], r
        t, result = long_poll(b, r["next"], 8)
        replay = daemon.admin("POST", f"/outbox/{oid}/replay")
        assert replay.status_code == 200, replay.text
        t.join(15)
        assert [e["id"] for e in result["r"].json()["events"]] == [mid], result["r"].text
        # At once, not at the poll's 8 s (which, the poll a second or more
        # old at the replay, ends 7 s or less after it): the poll's answer
        # after the replay's on the daemon's clock (their access log
        # records, each written as its answer is sent).  The test's clock
        # around the replay and the join, bounded 6 s until the
        # fifty-sixth session, counted its own wait for a processor too.
        took = answered_at(daemon, result["r"]) - answered_at(daemon, replay)
        assert took < 2.5, took
    finally:
        srv.close()


def test_a_long_poll_is_answered_at_its_end_while_the_poller_cannot_connect(make_daemon, db_url, pg):
    """A long poll waiting as the poller's connection is lost, while the
    database's address takes new connections and never answers them, is
    answered at the end of its wait (503: no database), not held until
    the connect's timeout (5 s) is over.  Until the fifty-first session's
    review only a pull that came in during the connect cut it short."""
    from pgproxy import PgProxy
    with PgProxy(db_url) as px:
        d = make_daemon(px.url).start()
        a, b, rm, srv = make_peers(d)
        try:
            got = b.call("GET", "/v1/events?after=0").json()
            t, result = long_poll(b, got["next"], 3)  # waits a second in there
            px.swallow()
            kill = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND query LIKE '%ack AS (UPDATE outbox%'")
            assert pg.psql(kill, db_url) == "1"
            wait_until(lambda: px.swallowed > 0, what="the poller's connect, swallowed")
            t.join(15)
            r = result["r"]
            assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
            assert result["t"] < 4.2, result["t"]  # 3 s and a round; after 6 s until then
        finally:
            px.thaw()
            srv.close()


def test_the_pull_poller_reconnects_without_blocking_and_backs_off(make_daemon, db_url, pg):
    """The pull poller's connection lost while the database's address takes
    new connections and never answers them (a dropped route, a firewall
    that drops): each pull is answered 503 within about a second, not
    after connect_timeout (5 s; until the forty-eighth session every
    attempt blocked the poller, which answers every pull peer, that
    long), and the daemon stops at once.  While the database refuses,
    the poller tries again after 250 ms, then twice as long each time up
    to database.reconnect_max_ms (until then every 250 ms), and is back
    once the database is."""
    from pgproxy import PgProxy
    with PgProxy(db_url) as px:
        d = make_daemon(px.url, options={"database": {"reconnect_max_ms": "4000"}}).start()
        a, b, rm, srv = make_peers(d)
        kill = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                "AND query LIKE '%ack AS (UPDATE outbox%'")

        def cut():
            r = b.call("GET", "/v1/events?after=0")   # the poller's last statement: the pull's
            assert r.status_code == 200, r.text
            assert pg.psql(kill, db_url) == "1"

        def failures():
            return sum(1 for rec in list(d.records) if rec.get("msg") == "pull poller cannot connect to the database")

        px.swallow()
        cut()
        wait_until(lambda: px.swallowed > 0, what="the poller's connect, swallowed")
        answers = []
        t_end = time.time() + 6
        while time.time() < t_end:
            r = b.call("GET", "/v1/events?after=0")
            answers.append(r)
            assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
            time.sleep(0.2)
        # each within about a second, not connect_timeout's 5 s, on the
        # daemon's clock (the access log): the test's around each call
        # counted its own connect and signing too
        times = [served_in(d, r) for r in answers]
        assert max(times) < 2.5, times

        # Refused: the attempts back off (250 ms, 0.5 s, 1 s, 2 s, 4 s: 4 in
        # 5 s; every 250 ms before, 20).
        px.thaw()
        wait_until(lambda: b.call("GET", "/v1/events?after=0").status_code == 200, timeout=20,
                   what="the poller back")
        px.refuse()
        cut()
        wait_until(lambda: px.refused > 0, what="the poller's connect, refused")
        n0, f0 = px.refused, failures()
        time.sleep(5)
        tries, logged = px.refused - n0, failures() - f0
        assert 2 <= tries <= 6 and 2 <= logged <= 6, (tries, logged)
        mark = len(d.records)
        t0 = time.time()
        px.thaw()
        # Back at its next attempt (4 s or less away), not at an uncapped
        # backoff's 8 s: when the daemon logs its reconnect, on the
        # daemon's clock.  Until the fifty-eighth session the test pulled
        # until a pull was answered and counted that on its own clock,
        # with its pulls' connects and signing on a loaded machine.
        back = d.wait_for(lambda rec: rec.get("msg") == "pull poller connected to the database again",
                          timeout=20, start=mark)
        assert logged_at(back) - t0 < 6, logged_at(back) - t0
        assert b.call("GET", "/v1/events?after=0").status_code == 200

        # A stop while the poller's connect is swallowed: at once.
        px.swallow()
        s0 = px.swallowed
        cut()
        wait_until(lambda: px.swallowed > s0, what="the poller's connect, swallowed")
        time.sleep(0.5)
        assert d.stop() == 0
        # on the daemon's clock (its "stopped" record): the test's around
        # d.stop() counted the sanitizers' exit and its own wait too
        took = stopped_in(d)
        assert took < 3, took
        px.thaw()
        srv.close()
