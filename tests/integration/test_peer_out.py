"""Pushes to a peer whose answers are odd: a 2xx whose body never ends, a
redirect, a Retry-After given as an HTTP date (POST {push_url}/v1/notify,
adapters/peer/peer_out.c)."""
import email.utils
import json
import re
import socket
import threading
import time

from harness import HeldSession, wait_until
from peer import NotifyServer, push_peers
from test_peer_api import room


class RawPeer:
    """A notify endpoint that answers as told, byte by byte: each request
    is read whole (headers and Content-Length body), counted, then answered
    with head (bytes) and, when hang, the connection kept open without a
    byte more until close()."""

    def __init__(self, head, hang=False):
        self.head = head
        self.hang = hang
        self.requests = []  # (time, request line)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closing.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        f = c.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                length = 0
                while True:
                    h = f.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode().partition(":")
                    if k.strip().lower() == "content-length":
                        length = int(v.strip())
                f.read(length)
                with self.lock:
                    self.requests.append((time.time(), line.decode().strip()))
                c.sendall(self.head)
                if self.hang:
                    self.closing.wait()
                    return
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.closing.set()
        self.sock.close()


def test_a_2xx_whose_body_never_ends_is_an_acknowledgement(make_daemon, db_url, pg):
    """A peer that answers 200 and then sends its body slowly, or never
    all of it, took the batch when it said 200: the row is delivered after
    one request, not sent again and again into dead letters (a 2xx whose
    body is too long already counted so; one that stalled past
    dispatcher.http_timeout_ms counted as a failure, and each retry too)."""
    d = make_daemon(db_url, options={"dispatcher": {"http_timeout_ms": "1500", "retry_budget": "2",
                                                   "retry_base_ms": "50", "retry_max_ms": "100"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    raw = RawPeer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
                  hang=True)
    try:
        assert d.admin("PATCH", "/peers/tg", json={"push_url": raw.url}).status_code == 200
        rm = room(a, b)
        r = a.send(rm["id"], a.user("alice"), "acknowledged, then silence")
        assert r.status_code == 202, r.text
        q = "SELECT state || ' ' || attempts FROM outbox WHERE destination = 'peer:tg'"
        state = wait_until(lambda: (lambda s: s if s and not s.startswith(("pending", "in_flight")) else None)(
            pg.psql(q, db_url)), timeout=30, what="the outcome recorded")
        assert state == "delivered 1", (state, raw.requests)
        # Delivered is final: the peer's requests for the row all came
        # before it was written (each is counted before its answer), and
        # none comes after; the dispatcher's tries say one, taken (until
        # the sixty-fourth session a sleep of half a second stood before
        # the count).
        assert pg.psql("SELECT count(*) || ' ' || bool_and(t.ok) FROM delivery_attempts t JOIN outbox o "
                       "ON o.id = t.outbox_id WHERE o.destination = 'peer:tg'", db_url) == "1 true"
        assert len(raw.requests) == 1, raw.requests
    finally:
        raw.close()
        for _, srv in made:
            srv.close()


def test_an_answer_whose_body_stalls_holds_the_lane_a_second_not_the_timeout(make_daemon, db_url, pg):
    """The body of the peer's answer is not read (its status and
    Retry-After are): one that stalls after the head is cut off a second
    later, not at dispatcher.http_timeout_ms (10 s by default), a 200 then
    delivered and a 503 with Retry-After then waited out as it says.  Until
    the fiftieth session each batch to such a peer held its lane for the
    whole timeout."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "3"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    stalled_503 = RawPeer(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 10\r\n\r\n{",
                          hang=True)
    stalled_200 = RawPeer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{", hang=True)
    q = ("SELECT o.state, o.attempts, extract(epoch FROM a.finished_at), extract(epoch FROM o.next_attempt_at - a.finished_at) "
         "FROM outbox o JOIN delivery_attempts a ON a.outbox_id = o.id WHERE o.destination = 'peer:tg' "
         "ORDER BY a.id DESC LIMIT 1")
    try:
        rm = room(a, b)
        for raw, want in ((stalled_503, "pending"), (stalled_200, "delivered")):
            assert d.admin("PATCH", "/peers/tg", json={"push_url": raw.url}).status_code == 200
            if want == "pending":
                assert a.send(rm["id"], a.user("alice"), "a stalled answer").status_code == 202
            else:
                pg.psql("UPDATE outbox SET next_attempt_at = now() WHERE destination = 'peer:tg'", db_url)
            row = wait_until(lambda: (lambda s: s.split("|") if s.startswith(want) else None)(pg.psql(q, db_url)),
                             timeout=30, what=f"the try answered by the stalled {want}")
            came = raw.requests[0][0]
            assert float(row[2]) - came < 2.5, (want, row, came)  # recorded a second after the head, not 10 s
            if want == "pending":
                assert 6 <= float(row[3]) <= 7.5, row  # Retry-After: 7, read from the head
        assert len(stalled_200.requests) == 1, stalled_200.requests
    finally:
        stalled_503.close()
        stalled_200.close()
        for _, srv in made:
            srv.close()


def test_a_redirect_is_not_followed(make_daemon, db_url, pg):
    """A peer answering 3xx with a Location elsewhere (another host, an
    address inside the operator's network) is not followed: the push is
    a failure, retried at push_url, and the other address gets nothing."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2", "retry_base_ms": "50",
                                                   "retry_max_ms": "100"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    raw = RawPeer(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {sb.url}/v1/notify\r\n"
                  "Content-Length: 0\r\n\r\n".encode())
    try:
        assert d.admin("PATCH", "/peers/tg", json={"push_url": raw.url}).status_code == 200
        rm = room(a, b)
        assert a.send(rm["id"], a.user("alice"), "stay where you are").status_code == 202
        q = "SELECT state FROM outbox WHERE destination = 'peer:tg'"
        wait_until(lambda: pg.psql(q, db_url) == "dead", timeout=30, what="a dead letter")
        assert len(raw.requests) == 2 and sb.requests == 0, (raw.requests, sb.answers)
        err = pg.psql("SELECT code FROM delivery_attempts ORDER BY id LIMIT 1", db_url)
        assert err == "307", err
    finally:
        raw.close()
        for _, srv in made:
            srv.close()


def _first_error(pg, db_url):
    """The error of the first try of the peer tg's row, once it is recorded."""
    q = ("SELECT a.error FROM delivery_attempts a JOIN outbox o ON o.id = a.outbox_id "
         "WHERE o.destination = 'peer:tg' ORDER BY a.id LIMIT 1")
    wait_until(lambda: pg.psql(q, db_url) != "", timeout=30, what="the first try recorded")
    return pg.psql(q, db_url)


def test_a_long_push_urls_failure_says_what_the_peer_answered(make_daemon, db_url, pg):
    """A push_url may have 2048 bytes, a failure's reason (outbox.last_error,
    delivery_attempts.error, the log's detail) 511: the reason names the
    URL cut short and keeps what the peer answered.  Until the fiftieth
    session a push_url of 700 bytes filled it, and "answered 503" was cut
    off, the operator told where the push went and not what came back."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "1"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    raw = RawPeer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    try:
        url = raw.url + "/" + "p" * 700
        assert d.admin("PATCH", "/peers/tg", json={"push_url": url}).status_code == 200
        rm = room(a, b)
        assert a.send(rm["id"], a.user("alice"), "what came back?").status_code == 202
        err = _first_error(pg, db_url)
        assert err.startswith(url[:200]) and "..." in err and err.endswith(" answered 503"), err
        assert len(err) < 300, err
        assert raw.requests and raw.requests[0][1].startswith("POST /" + "p" * 700 + "/v1/notify "), raw.requests
    finally:
        raw.close()
        for _, srv in made:
            srv.close()


def test_a_push_url_stored_before_its_check_waits_untried(make_daemon, db_url, pg):
    """A push_url the admin API refuses now (a user and password, since the
    thirty-sixth session; a byte that is not ASCII), kept in the row from
    before its check: nothing is sent to it, and its rows wait, untried
    (no attempt counted, never dead), as a disabled peer's do; the log
    (rate-limited) and GET /admin/v1/peers say which peer and what is
    wrong with its URL; given a good push_url, the peer gets them.  Until
    the fiftieth session's review each claim counted a failed try and the
    rows went dead though nothing was sent (the URL that was not ASCII
    failed at its signing, "target URI has an invalid byte 0xc3", naming
    no peer)."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "1", "retry_base_ms": "10",
                                                   "retry_max_ms": "50"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    rows = "SELECT string_agg(state || ' ' || attempts, ',') FROM outbox WHERE destination = 'peer:tg'"
    tries = ("SELECT count(*) FROM delivery_attempts t JOIN outbox o ON o.id = t.outbox_id "
             "WHERE o.destination = 'peer:tg'")
    try:
        bad = [(f"http://u:pw@127.0.0.1:{sb.port}", "push_url has a user or password (a signed URI cannot)"),
               (f"http://127.0.0.1:{sb.port}/caf\u00e9", "push_url has a byte that is not printable ASCII at byte")]
        # a room each: the second's row, in the first's room, would wait
        # behind the first's (a room's rows go in order) for its next try,
        # 10 s (peer_out.c's BAD_URL_RETRY_MS), before it was looked at
        rooms = [room(a, b) for _ in bad]
        for k, (url, why) in enumerate(bad):
            pg.psql(f"UPDATE peers SET push_url = '{url}' WHERE name = 'tg'", db_url)
            start = len(d.records)
            assert a.send(rooms[k]["id"], a.user("alice"), f"nowhere to go {k}").status_code == 202
            rec = d.wait_for(lambda r: r.get("msg", "").startswith("a push peer's push_url cannot be pushed to"),
                             timeout=30, start=start)
            assert rec.get("peer") == "tg" and rec.get("detail", "").startswith(why), rec
            time.sleep(0.5)  # long enough for the budget of 1 try, were they tried
            assert pg.psql(rows, db_url) == ",".join(["pending 0"] * (k + 1)), pg.psql(rows, db_url)
            assert pg.psql(tries, db_url) == "0"
            shown = [p for p in d.admin("GET", "/peers").json()["peers"] if p["name"] == "tg"][0]
            assert shown["push_url_problem"].startswith(why), shown
            assert sb.requests == 0
        assert d.admin("PATCH", "/peers/tg", json={"push_url": sb.url}).status_code == 200
        assert d.admin("GET", "/peers/tg").json()["push_url_problem"] is None
        got = sb.wait_events(2, timeout=30)  # within the rows' wait (10 s) of the last look
        assert sorted(e["content"]["parts"][0]["body"] for e in got) == ["nowhere to go 0", "nowhere to go 1"], got
    finally:
        for _, srv in made:
            srv.close()


def test_rows_of_a_type_the_peer_does_not_take_are_done_when_their_batch_fails(make_daemon, db_url, pg):
    """A row of a type the peer does not take (its event_types) is not sent
    and is done, in a batch the peer refuses as in one it takes: only the
    rows sent spend their tries.  Until the fiftieth session a failed
    batch failed them too, and a peer away for the retry budget made its
    receipts dead letters, which it would never have been sent (and the
    later rows of their rooms with them)."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2", "retry_base_ms": "50",
                                                   "retry_max_ms": "100"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    try:
        assert d.admin("PATCH", "/peers/tg", json={"event_types": ["message"]}).status_code == 200
        rm = room(a, b)["id"]
        alice = a.user("alice")
        first = a.send(rm, alice, "taken").json()["id"]
        sb.wait_events(1, timeout=30)
        assert d.admin("POST", "/peers/tg/disable").status_code == 200  # the rows wait: one batch
        rc = a.call("POST", f"/v1/rooms/{rm}/receipts", {"type": "receipt", "sender": alice,
                                                          "content": {"in_reply_to": first, "receipt": "read"}})
        assert rc.status_code == 202, rc.text
        assert a.send(rm, alice, "refused").status_code == 202
        sb.fail_next = 1000
        assert d.admin("POST", "/peers/tg/enable").status_code == 200
        q = ("SELECT string_agg(e.type || ' ' || o.state || ' ' || o.attempts, ', ' ORDER BY o.id) FROM outbox o "
             "JOIN events e ON e.id = o.event_id WHERE o.destination = 'peer:tg' AND o.id > "
             "(SELECT min(id) FROM outbox WHERE destination = 'peer:tg')")
        got = wait_until(lambda: (lambda s: s if s and "pending" not in s and "in_flight" not in s else None)(
            pg.psql(q, db_url)), timeout=30, what="the batch's rows settled")
        assert got == "receipt delivered 1, message dead 2", got
        assert [e["content"]["parts"][0]["body"] for e in sb.events] == ["taken"], sb.events
    finally:
        for _, srv in made:
            srv.close()


def test_a_503_to_a_batch_with_rows_not_sent_leaves_the_429_slow_down(make_daemon, db_url, pg):
    """A 429 without Retry-After slows the pace down, retry_base_ms doubling
    with each one in a row (here 400 ms to 4 s); a delivery ends it, a 503
    does not.  A 503 to a batch that carried rows of a type the peer does
    not take (done, not sent: docs/interop-api.md) is no delivery either:
    the next 429 waits on from the streak (2-4 s), not from its start
    (0.2-0.4 s).  Until the fiftieth session's review those rows, marked
    done, ended the streak as if the peer had taken them."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_base_ms": "400", "retry_max_ms": "4000"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    try:
        assert d.admin("PATCH", "/peers/tg", json={"event_types": ["message"]}).status_code == 200
        alice = a.user("alice")
        r1, r2 = room(a, b)["id"], room(a, b)["id"]
        first = a.send(r2, alice, "taken").json()["id"]
        sb.wait_events(1, timeout=30)
        came = len(sb.answers)
        sb.script = [(429, None)] * 4 + [(503, None), (429, None)]
        assert a.send(r1, alice, "slow down").status_code == 202
        wait_until(lambda: len(sb.answers) >= came + 4, timeout=30, what="four 429s")
        # the fifth try (1.6-3.2 s after the fourth) carries a receipt, not sent
        rc = a.call("POST", f"/v1/rooms/{r2}/receipts", {"type": "receipt", "sender": alice,
                                                          "content": {"in_reply_to": first, "receipt": "read"}})
        assert rc.status_code == 202, rc.text
        sb.wait_events(2, timeout=60)
        answers = sb.answers[came:]
        assert [st for _, st in answers] == [429] * 4 + [503, 429, 200], answers
        assert len(sb.events) == 2  # the receipt was not sent
        gap = answers[6][0] - answers[5][0]
        assert gap >= 1.9, gap  # 2-4 s: the sixth 429 in a row (with the 503 between), not the first
        q = ("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id WHERE e.type = 'receipt' "
             "AND o.destination = 'peer:tg'")
        assert pg.psql(q, db_url) == "delivered"
    finally:
        for _, srv in made:
            srv.close()


def test_a_retry_after_given_as_a_date_is_obeyed(make_daemon, db_url, pg):
    """Retry-After as an HTTP date (RFC 9110) on a 503: the batch waits
    until then, as for the seconds form."""
    d = make_daemon(db_url).start()
    (a, _), (b, sb) = made = push_peers(d)
    # the first push answered at once with the date 4 s from it, made as it
    # comes: made before the room, the message and the claim, what they took
    # on a loaded machine was taken from the 2.5 s asserted below
    sb.hold(count=1, bound=0, answer=lambda came: (503, email.utils.formatdate(came + 4, usegmt=True)))
    try:
        rm = room(a, b)
        assert a.send(rm["id"], a.user("alice"), "later").status_code == 202
        sb.wait_events(1, timeout=30)
        came = [t for t, _ in sb.answers]
        assert [st for _, st in sb.answers] == [503, 200], sb.answers
        assert came[1] - came[0] >= 2.5, sb.answers  # the date has a second's resolution
    finally:
        for _, srv in made:
            srv.close()


def _first_wait_s(make_daemon, db_url, pg, retry_after):
    """How long after a 503 with Retry-After: retry_after the row waits
    (its next_attempt_at), a daemon and peers of their own on a database
    of their own."""
    db_url = pg.new_database("ra_" + re.sub(r"[^a-z0-9]", "_", retry_after.lower())[:40])
    d = make_daemon(db_url, options={"dispatcher": {"retry_base_ms": "1000", "retry_max_ms": "2000"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    sb.hold(count=1, bound=0, answer=lambda came: (503, retry_after))
    try:
        rm = room(a, b)
        assert a.send(rm["id"], a.user("alice"), "when?").status_code == 202
        q = ("SELECT extract(epoch FROM next_attempt_at - now()) FROM outbox WHERE destination = 'peer:tg' "
             "AND state = 'pending' AND attempts > 0")
        wait_until(lambda: pg.psql(q, db_url) != "", timeout=30, what="the 503 recorded")
        return float(pg.psql(q, db_url))
    finally:
        d.stop()
        for _, srv in made:
            srv.close()


def test_a_retry_after_out_of_range_or_past_waits_a_bounded_time(make_daemon, db_url, pg):
    """libcurl reads a Retry-After leniently (CURLINFO_RETRY_AFTER): a
    number past 64 bits is 0, INT64_MAX itself, a date in the past a
    negative delay, "120abc" 120.  Each is bounded (outbox_retry_after_ms):
    at most an hour, and a wait of 0 or less is the retry backoff, never an
    immediate retry."""
    wait = _first_wait_s(make_daemon, db_url, pg, "9223372036854775807")
    assert 3500 <= wait <= 3600, wait
    for ra in ("Thu, 01 Jan 1970 00:00:00 GMT", "-5", "99999999999999999999"):
        wait = _first_wait_s(make_daemon, db_url, pg, ra)
        assert 0.2 <= wait <= 2.5, (ra, wait)  # the backoff (base 1 s, jittered)
    wait = _first_wait_s(make_daemon, db_url, pg, "120abc")
    assert 100 <= wait <= 120, wait


def test_a_peer_disabled_between_the_claim_and_the_push_spends_no_try(make_daemon, db_url, pg):
    """A peer disabled after a lane claimed its rows and before it pushed
    them: the rows wait for it untried, as a disabled peer's rows do (no
    attempt counted, never dead: docs/interop-api.md).  The claim is held
    between its reading of the push peers and its claim of the rows (its
    taking back of a run-out claim waits for a row lock), the peer is
    disabled meanwhile, then the claim goes on.

    The claim is held by a lock on delivery_attempts, taken before the
    run-out claim is made, and the test goes on only once the taking back
    waits for that very lock (pg_blocking_pids): that lane then holds the
    claim lock every claim takes, so no other lane can claim m1 first.
    Until the forty-fifth session the claim waited for a FOR UPDATE taken
    after the run-out claim was committed, and "a claim waiting" was any
    backend waiting for any lock with claimed_until in its text: a lane
    could take the row back in between (it was not held then), or one
    waiting a moment for the claim lock passed for the held claim, and
    under load another lane claimed and pushed m1 before the disable."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "1"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    held = HeldSession(db_url)
    try:
        r0, r1 = room(a, b), room(a, b)
        m0 = a.send(r0["id"], a.user("alice"), "first").json()["id"]
        sb.wait_events(1)
        row = ("(SELECT o.id FROM outbox o JOIN events e ON e.id = o.event_id WHERE e.public_id = '{}' "
               "AND o.destination = 'peer:tg')")
        wait_until(lambda: pg.psql(f"SELECT state FROM outbox WHERE id = {row.format(m0)}", db_url) == "delivered",
                   what="delivered")
        # cw_take_back writes delivery_attempts: it waits for this lock
        # from its start, in the claim's transaction, under the claim lock
        held.run("SET application_name = 'cw_test_held'; BEGIN; LOCK TABLE delivery_attempts IN SHARE MODE;")
        # a claim that ran out, which the next claim takes back
        pg.psql(f"UPDATE outbox SET state = 'in_flight', claimed_by = 'gone/0', "
                f"claimed_until = now() - interval '1 hour' WHERE id = {row.format(m0)}", db_url)
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity w, pg_stat_activity h "
                                   "WHERE h.application_name = 'cw_test_held' AND w.wait_event_type = 'Lock' "
                                   "AND h.pid = ANY (pg_blocking_pids(w.pid)) "
                                   "AND w.query LIKE '%WITH t AS (SELECT o.id, o.claimed_until%'", db_url) == "1",
                   what="a claim's taking back waiting")
        # A claim that found nothing for a destination, slowly (a loaded
        # machine), pauses the destination for ten times as long, at most
        # 10 s (CLAIM_SLOW_US, gateway/dispatcher.c): the held claim would
        # then pass over peer:tg, and m1 would wait for a claim after the
        # disable, which never takes it.  No claim pauses anything while
        # this one holds the claim lock: one made before is over in 10 s.
        pauses = re.search(r"^causeway_dispatch_pauses_total (\S+)$", d.get("/metrics").text, re.M)
        if pauses and float(pauses.group(1)) > 0:
            time.sleep(10.5)
        m1 = a.send(r1["id"], a.user("alice"), "second").json()["id"]
        # due for the claim under way (its now() is its transaction's start)
        pg.psql(f"UPDATE outbox SET next_attempt_at = now() - interval '1 hour' WHERE id = {row.format(m1)}",
                db_url)
        assert d.admin("POST", "/peers/tg/disable").status_code == 200
        held.run("COMMIT;")
        # the claim goes on, pushes (or not) and records: the row is out
        # of flight, due again from now on (not an hour ago)
        q = f"SELECT state || ' ' || attempts FROM outbox WHERE id = {row.format(m1)}"
        wait_until(lambda: pg.psql(f"SELECT state <> 'in_flight' AND next_attempt_at > now() - interval '1 minute' "
                                   f"FROM outbox WHERE id = {row.format(m1)}", db_url) == "t",
                   what="the claimed row's outcome")
        assert pg.psql(q, db_url) == "pending 0", pg.psql(q, db_url)
        tries = pg.psql(f"SELECT count(*) FROM delivery_attempts WHERE outbox_id = {row.format(m1)}", db_url)
        assert tries == "0", tries
        assert sb.requests == 1, sb.answers
        # enabled again, it gets it
        assert d.admin("POST", "/peers/tg/enable").status_code == 200
        got = sb.wait_events(2, timeout=20)
        assert got[1]["id"] == m1
    finally:
        held.end()
        for _, srv in made:
            srv.close()


def test_a_retry_after_met_while_refused_events_are_searched_holds_the_whole_peer(make_daemon, db_url, pg):
    """A batch the peer refuses (400) is sent again in smaller batches to
    find the events it will not take; when one of those is answered 503
    with Retry-After, nothing else is sent to the peer until then, as for
    a batch answered so at once (docs/interop-api.md): the rooms of the
    next batch wait too."""
    d = make_daemon(db_url, options={"dispatcher": {"batch_max": "2", "retry_base_ms": "50",
                                                   "retry_max_ms": "100"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    try:
        rooms = [room(a, b) for _ in range(3)]
        assert d.admin("POST", "/peers/tg/disable").status_code == 200  # the rows wait: batches of 2 later
        for k, rm in enumerate(rooms):
            assert a.send(rm["id"], a.user("alice"), f"m{k}").status_code == 202
        sb.script = [(400, None), (503, 3)]
        assert d.admin("POST", "/peers/tg/enable").status_code == 200
        sb.wait_events(3, timeout=30)
        came = [t for t, _ in sb.answers]
        assert [st for _, st in sb.answers][:2] == [400, 503], sb.answers
        # every request after the 503 came once its Retry-After was over
        assert all(t - came[1] >= 2.9 for t in came[2:]), [(round(t - came[1], 2), st) for t, st in sb.answers]
    finally:
        for _, srv in made:
            srv.close()


def _refused_batches(d, a, b, sb, pg, db_url, answers):
    """For each (status, body) of answers: 8 rows in 4 rooms wait (the
    peer disabled), then go in one batch to a peer that answers every
    request so; returns, for each, the events of each request it got and
    the rows that went dead with a reason naming the status (and the
    problem's code, when its body has one)."""
    sizes = []  # the events of each request the peer got

    def answer(status):
        def handle(method, path, headers, body, port):
            sb.requests += 1
            sizes.append(len(json.loads(body)["events"]))
            return status
        return handle
    rooms = [room(a, b) for _ in range(4)]
    q = "SELECT count(*) FROM outbox WHERE destination = 'peer:tg' AND state IN ('pending', 'in_flight')"
    got = []
    for status, body in answers:
        sb._handle = answer(status)
        sb.answer_body = body
        del sizes[:]
        before = pg.psql("SELECT coalesce(max(id), 0) FROM outbox", db_url)
        assert d.admin("POST", "/peers/tg/disable").status_code == 200  # the rows wait: one batch
        for rm in rooms:
            for i in range(2):
                assert a.send(rm["id"], a.user("alice"), f"{status} {i}").status_code == 202
        assert d.admin("POST", "/peers/tg/enable").status_code == 200
        wait_until(lambda: pg.psql(q, db_url) == "0", timeout=60, what=f"the rows answered {status} settled")
        try:
            code = json.loads(body).get("code")
        except ValueError:
            code = None
        why = f"%answered {status}" + (f" {code}" if code else "")
        dead = pg.psql("SELECT count(*) FROM outbox WHERE destination = 'peer:tg' AND state = 'dead' "
                       f"AND last_error LIKE '{why}' AND id > {before}", db_url)
        got.append((list(sizes), dead))
    return got


def test_a_refusal_of_the_request_as_a_whole_is_not_searched(make_daemon, db_url, pg):
    """A peer (or the proxy in front of it) that answers every push 421
    Misdirected Request, 426 Upgrade Required or 431 Request Header Fields
    Too Large refuses the request, not some of its events: the batch is
    not sent again in smaller batches to find the events refused, each try
    is one request carrying the whole batch (as for 404 since the
    thirtieth session).  Until the forty-fourth session's review each try
    of a batch of 4 rooms was 11 requests (up to 33 for a large one)."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "1", "retry_base_ms": "10",
                                                   "retry_max_ms": "50"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    try:
        got = _refused_batches(d, a, b, sb, pg, db_url, [(421, b""), (426, b""), (431, b"")])
        assert got == [([8], "8")] * 3, got
    finally:
        for _, srv in made:
            srv.close()


def test_a_400_whose_problem_is_about_the_request_is_not_searched(make_daemon, db_url, pg):
    """A 400 whose problem+json code is about the request as a whole (a
    header the peer will not take: invalid_header, as a peer that runs
    Causeway answers it; the request's framing, its signature) is not
    searched for the events refused: each try is one request, its rows'
    reason names the code.  A 400 about the body (invalid_body), or one
    whose body says nothing readable, is searched as before.  Until the
    fiftieth session's review the answer's body was not read, and every
    400 made each try of a batch of 4 rooms 11 requests (up to 33)."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "1", "retry_base_ms": "10",
                                                   "retry_max_ms": "50"}}).start()
    (a, _), (b, sb) = made = push_peers(d)

    def problem(code):
        return json.dumps({"type": "about:blank", "title": "Bad Request", "status": 400,
                           "detail": "refused", "code": code}).encode()
    try:
        got = _refused_batches(d, a, b, sb, pg, db_url, [(400, problem("invalid_header")),
                                                   (400, problem("bad_signature")),
                                                   (400, problem("invalid_body")), (400, b"not json")])
        assert got[0] == ([8], "8") and got[1] == ([8], "8"), got
        for sizes, dead in got[2:]:  # searched: every row refused alone in the end
            assert sizes[0] == 8 and len(sizes) > 8 and dead == "8", got
    finally:
        for _, srv in made:
            srv.close()


def test_the_record_of_deliveries_is_not_planned_at_each_call(make_daemon, pg_planned):
    """A lane's record of a delivery runs with its generic plan
    (store_exec_generic): each lane's connection plans it once.  Until the
    forty-fifth session PostgreSQL planned it at every call (the outcome's
    flags fold its failure's arms away, so that every custom plan looked
    cheaper than the generic one; 0.4-1 ms a batch; docs/performance.md)."""
    db_url = pg_planned.new_database("t_claim_record_planned")
    d = make_daemon(db_url, options={"dispatcher": {"lanes": "2"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    try:
        rm = room(a, b)
        undelivered = "SELECT count(*) FROM outbox WHERE state NOT IN ('delivered', 'dropped')"
        for i in range(15):
            assert a.send(rm["id"], a.user("alice"), f"one of fifteen: {i}").status_code == 202
            wait_until(lambda: pg_planned.psql(undelivered, db_url) == "0", what=f"message {i} delivered")
        calls, plans = pg_planned.planned(db_url, "WITH cfg AS MATERIALIZED (SELECT set_config(")
        # once on each of the two lanes' connections, and once more if an
        # ANALYZE (autovacuum's) came between
        assert calls >= 15 and plans <= 3, ("cw_record", calls, plans)
        # and the claim's opening (claim_open), at every claim
        calls, plans = pg_planned.planned(db_url, "SELECT EXISTS (SELECT $1 FROM outbox WHERE state = $2 AND "
                                                  "claimed_until < now())")
        assert calls >= 15 and plans <= 3, ("cw_claim_ran_out", calls, plans)
        calls, plans = pg_planned.planned(db_url, "SELECT $1 || name FROM peers WHERE mode = $2 AND enabled")
        assert calls >= 15 and plans <= 3, ("cw_push_peers", calls, plans)
    finally:
        for _, srv in made:
            srv.close()


def test_a_push_over_https_verifies_the_peers_certificate_and_name(make_daemon, db_url, pg, tmp_path):
    """A push to an https push_url goes only to a peer whose certificate a
    trusted CA signed (server.ca_file, else the system's) for the push_url's
    host: one of a CA not trusted, or of a trusted one for another name,
    is a failure, retried until a dead letter, and the peer gets nothing.
    Written down in the forty-eighth session's review (libcurl's defaults,
    which curl_easy_reset keeps); no test said so before."""
    import ssl
    from harness import self_signed_ca
    good = self_signed_ca(tmp_path, "notify tls good", (), ["127.0.0.1"])
    other_name = self_signed_ca(tmp_path, "notify tls other name", ["other.example"], ())
    untrusted = self_signed_ca(tmp_path, "notify tls untrusted", (), ["127.0.0.1"])
    bundle = tmp_path / "trusted.pem"
    bundle.write_bytes(open(good[0], "rb").read() + open(other_name[0], "rb").read())
    d = make_daemon(db_url, options={"server": {"ca_file": str(bundle)},
                                     "dispatcher": {"retry_budget": "2", "retry_base_ms": "50",
                                                    "retry_max_ms": "100"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    q = "SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id WHERE o.destination = 'peer:tg' " \
        "AND e.content->'content'->'parts'->0->>'body' = '{}'"
    servers = []
    try:
        rm = room(a, b)
        for (cert, key), text, want in ((untrusted, "untrusted", "dead"), (other_name, "other name", "dead"),
                                        (good, "good", "delivered")):
            # the peer's notify server, speaking TLS with this certificate
            srv = NotifyServer()
            servers.append(srv)
            srv.public_b64 = sb.public_b64
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            srv.httpd.socket = ctx.wrap_socket(srv.httpd.socket, server_side=True)
            srv.target_base = f"https://127.0.0.1:{srv.port}"
            assert d.admin("PATCH", "/peers/tg", json={"push_url": srv.target_base}).status_code == 200
            assert a.send(rm["id"], a.user("alice"), text).status_code == 202
            state = wait_until(lambda: (lambda s: s if s in ("delivered", "dead") else None)(
                pg.psql(q.format(text), db_url)), timeout=30, what=f"the push to the {text} certificate's peer")
            err = pg.psql("SELECT error FROM delivery_attempts ORDER BY id DESC LIMIT 1", db_url)
            assert state == want, (text, state, err)
            if want == "dead":
                assert "certificate" in err, err
                assert srv.requests == 0
        assert [e["content"]["parts"][0]["body"] for e in servers[-1].events] == ["good"], servers[-1].events
        assert servers[-1].errors == [], servers[-1].errors
    finally:
        for srv in servers + [s for _, s in made]:
            srv.close()


def test_a_link_local_push_url_signs_the_address_without_its_zone(make_daemon, db_url, pg):
    """A push_url with an IPv6 zone id (http://[fe80::1%25eth0]:port, here
    ::1 on lo, which every host has) is requested through that interface,
    but the zone is this host's and is not in the Host header libcurl sends
    ("[::1]:port"): the @target-uri signed is the URL without it, as the
    peer rebuilds it.  Until the fifty-second session "%25lo" was signed
    and every push failed the peer's check (401, then dead letters)."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2", "retry_base_ms": "50",
                                                   "retry_max_ms": "100"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    v6 = NotifyServer(host="::1")
    v6.public_b64 = sb.public_b64
    v6.target_base = f"http://[::1]:{v6.port}"
    hosts = []
    handle = v6.handle

    def noting(method, path, headers, body, port, answer=None):
        hosts.append(headers.get("Host"))
        return handle(method, path, headers, body, port, answer)

    v6.handle = noting
    try:
        r = d.admin("PATCH", "/peers/tg", json={"push_url": f"http://[::1%25lo]:{v6.port}"})
        assert r.status_code == 200, r.text
        rm = room(a, b)
        assert a.send(rm["id"], a.user("alice"), "over the link").status_code == 202
        q = "SELECT string_agg(DISTINCT state, ',') FROM outbox WHERE destination = 'peer:tg'"
        state = wait_until(lambda: (lambda s: s if s and "pending" not in s and "in_flight" not in s else None)(
            pg.psql(q, db_url)), timeout=30, what="the outcomes recorded")
        assert state == "delivered", (state, v6.errors, v6.answers)
        assert v6.errors == [] and v6.events and set(hosts) == {f"[::1]:{v6.port}"}, (v6.errors, hosts)
    finally:
        v6.close()
        for _, srv in made:
            srv.close()


def test_a_batch_of_local_users_files_keeps_its_bound_as_sent(make_daemon, db_url, pg):
    """A local user's file goes to the peer as a link of Causeway's
    (/v1/media/{token}?ev=&exp=, peer_media_offer), longer than its mxc://
    source: a pushed batch's bound (server.max_body_bytes) holds for the
    body as sent, links and all, not for the stored events the claim
    counts, and a backlog of such messages goes in several batches, in
    order, none lost.  Until the fifty-second session the batch was
    bounded by the stored content only and passed the bound by some 40 %
    (as a pull answer did: test_peer_pull.py)."""
    from homeserver import Homeserver
    from test_matrix import registration, start_mx
    budget = 128 * 1024
    hs = Homeserver(server_name="example.org", registration=registration())
    hs.start()
    d = start_mx(make_daemon, db_url, hs, server={"max_body_bytes": "128KiB"})
    peers = push_peers(d)
    (a, _), (b, sb) = peers
    sizes = []
    handle = sb.handle

    def sized(method, path, headers, body, port):
        sizes.append(len(body))
        return handle(method, path, headers, body, port)
    sb.handle = sized
    try:
        rm = room(a, b)
        assert d.admin("POST", "/peers/tg/disable").status_code == 200
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
        assert d.admin("POST", "/peers/tg/enable").status_code == 200
        got = sb.wait_events(len(ids), timeout=60)
        for e in got:
            assert all(x["url"].startswith(d.url + "/v1/media/") for x in e["content"]["attachments"]), e
        assert [e["id"] for e in got] == ids
        assert len(sizes) >= 3 and max(sizes) <= budget, sizes
        wait_until(lambda: pg.psql("SELECT string_agg(DISTINCT state, ',') FROM outbox "
                                   "WHERE destination = 'peer:tg'", db_url) == "delivered",
                   what="every row delivered")
        # no try counted for the rows a batch gave back untried
        assert pg.psql("SELECT max(attempts) FROM outbox WHERE destination = 'peer:tg'", db_url) == "1"
    finally:
        for _, srv in peers:
            srv.close()
        hs.close()
