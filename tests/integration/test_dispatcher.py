"""The dispatcher's lanes and what they claimed (gateway/dispatcher.c): an
outcome recorded on a new connection while the renewed claim holds, a
destination that comes up while every known one is busy, the stop while
the claims' keeper waits (for a lock, for a frozen postmaster), a lane's
round of the destinations, a failed renewal tried again in time."""
import datetime
import os
import re
import signal
import time

import pytest

from harness import answered_at, stopped_in, wait_until
from peer import push_peers
from test_faults import outbox_locked
from test_peer_api import room


def settled(pg, db_url):
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE state NOT IN ('delivered', 'dropped')",
                               db_url) == "0", what="every row delivered")


def test_an_outcome_lost_with_the_connection_after_a_renewed_claim_is_recorded(make_daemon, db_url, pg):
    """A push longer than dispatcher.claim_timeout_s (5 s here; the peer
    answers after 8) has its claim renewed while it runs; the lane's
    connection is then cut (its backend terminated) before the answer
    comes.  The lane records the outcome on a new connection, as it does
    whenever its claim still holds: the row is delivered once, its one try
    counted.  Until the forty-sixth session the lane took its claim to end
    claim_timeout_s after the claim was made, renewals aside: it gave up at
    once, the row stayed in flight until the claim ran out, then was sent
    again (a duplicate) and its lost try counted as one with no outcome."""
    d = make_daemon(db_url, options={"dispatcher": {"claim_timeout_s": "5", "http_timeout_ms": "15000"}}).start()
    (a, sa), (b, sb) = made = push_peers(d)
    try:
        rm = room(a, b)
        settled(pg, db_url)
        before = sb.requests
        sb.delay = 8.0
        assert a.send(rm["id"], a.user("alice"), "slow, then cut", idem="k-cut").status_code == 202
        wait_until(lambda: sb.requests == before + 1, what="the slow push under way")
        time.sleep(6.0)  # past the claim's first timeout: renewed meanwhile
        # The delivering lane's backend: the last statement it ran is the peer's address.
        cut = pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                      "WHERE query LIKE 'SELECT push_url%'", db_url)
        assert cut == "1", cut
        q = ("SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
             "WHERE o.destination = 'peer:tg' AND e.origin_native_id = 'k-cut'")
        row = wait_until(lambda: (lambda x: x if "in_flight" not in x else None)(pg.psql(q, db_url)),
                         timeout=30, what="the outcome recorded")
        assert row == "delivered 1", row
        time.sleep(7.0)  # a claim left to run out would have been taken back and sent again by now
        assert sb.requests == before + 1 and sb.duplicates == 0, sb.answers
        mid = pg.psql("SELECT public_id FROM events WHERE origin_native_id = 'k-cut'", db_url)
        [dv] = [x for x in d.admin("GET", f"/messages/{mid}").json()["deliveries"] if x["destination"] == "peer:tg"]
        assert [(x["attempt"], x["ok"]) for x in dv["tries"]] == [(1, True)], dv
    finally:
        for _, srv in made:
            srv.close()


def test_a_destination_enabled_while_every_known_one_is_busy_is_claimed(make_daemon, db_url, pg):
    """Every push destination of the last claim is a lane's, each in a slow
    delivery (its answer held here until the end), and a peer is enabled
    meanwhile: an idle lane claims its rows within a second or so, not
    once one of the slow deliveries is over.  Until the forty-sixth
    session the idle lanes counted the destinations as of the last claim
    and, all of those taken, made no claim at all: the new peer's rows
    waited for a busy lane to finish (with a peer's refused events
    searched, 33 requests of up to dispatcher.http_timeout_ms)."""
    d = make_daemon(db_url, options={"dispatcher": {"http_timeout_ms": "30000", "lanes": "4"}}).start()
    (a, sa), (b, sb) = made = push_peers(d)
    slow = []
    try:
        ab = room(a, b)
        [(c, sc)] = push_peers(d, [("xx", "xx.example")])
        made.append((c, sc))
        ac = room(a, c)
        settled(pg, db_url)
        assert d.admin("POST", "/peers/xx/disable").status_code == 200
        # A claim after the disable: the destinations it counts are gk and tg.
        assert b.send(ab["id"], b.user("bob"), "counted without xx").status_code == 202
        sa.wait_events(1)
        settled(pg, db_url)
        # The slow pushes are held until xx's row is delivered (hold),
        # not answered after 12 s: xx's row waiting for one of them to end
        # is then a failure whatever the machine's load, and a loaded
        # machine's enable, claim and push, slower than 4 s, none.
        slow += [sa.hold(count=1), sb.hold(count=1)]
        ga, gb = sa.requests, sb.requests
        assert a.send(ab["id"], a.user("alice"), "to tg, slowly").status_code == 202
        assert b.send(ab["id"], b.user("bob"), "to gk, slowly").status_code == 202
        wait_until(lambda: all(h.came.is_set() for h in slow), what="both slow pushes under way")
        assert a.send(ac["id"], a.user("alice"), "to xx, once it is back").status_code == 202
        n0 = len(sc.answers)
        enable = d.admin("POST", "/peers/xx/enable")
        assert enable.status_code == 200, enable.text
        sc.wait_events(1, timeout=30)
        # From the enable answered (the daemon's access log) to the push's
        # arrival at xx's server (its thread's clock): not the test's
        # around the call and its wait, which counted its own turns too.
        enabled = answered_at(d, enable)
        took = min(came for came, status in sc.answers[n0:] if status == 200) - enabled
        assert took < 10, took  # and both slow pushes still held: it waited for neither
        assert sa.requests == ga + 1 and sb.requests == gb + 1
    finally:
        for h in slow:
            h.release()
        for _, srv in made:
            srv.close()


def test_sigterm_while_a_claims_renewal_waits_for_a_lock_stops_within_the_grace(make_daemon, db_url, pg):
    """The claims' keeper renews the claim of a slow delivery while a lock
    on outbox (a migration's) holds its UPDATE; SIGTERM comes.  Its
    statement is cancelled after the grace the lanes get (2 s), as theirs
    are, and the daemon exits 0 within the drain and a moment.  Until the
    forty-sixth session the stop joined the keeper without cancelling
    anything: it waited out the keeper's statement timeout (10 s), close
    to the stop's deadline (drain plus 10 s, then exit 1)."""
    d = make_daemon(db_url, options={"dispatcher": {"claim_timeout_s": "6", "http_timeout_ms": "30000"},
                                     "server": {"drain_timeout_ms": "1000"}}).start()
    (a, sa), (b, sb) = made = push_peers(d)
    try:
        rm = room(a, b)
        settled(pg, db_url)
        sb.delay = 20.0
        before = sb.requests
        assert a.send(rm["id"], a.user("alice"), "slow").status_code == 202
        wait_until(lambda: sb.requests == before + 1, what="the slow push under way")
        with outbox_locked(pg, db_url, "SHARE"):
            wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                       "AND query LIKE 'UPDATE outbox SET claimed_until%'", db_url) == "1",
                       timeout=10, what="the keeper's renewal waiting for the lock")
            d.signal(signal.SIGTERM)
            rc = d.wait_exit(30)
        assert rc == 0, d.log()[-3000:]
        # the drain (1 s), the dispatcher's grace (2 s), the policy thread's, held
        # by the same lock (2 s), and a moment; not the keeper's 10 s statement timeout.
        # On the daemon's clock (its "stopped" record): the test's from the
        # signal to the exit counted the sanitizers' exit and its own wait
        # for a processor too.
        took = stopped_in(d)
        assert took < 9, took
    finally:
        for _, srv in made:
            srv.close()


def test_a_lane_goes_round_the_destinations_in_the_same_order_after_a_peers_change(make_daemon, db_url, pg):
    """One lane, one row a claim, three peers with rows waiting: the lane
    serves gk, tg, xx, gk... in turn.  A change of tg's (a PATCH) while it
    is pushed to tg does not make tg's next row go before xx's.  Until the
    forty-sixth session the lane read the push destinations in the table's
    order, which an UPDATE changes (the row's new version goes after the
    others): its place in the list pointed at tg again, and xx waited a
    round (fairness, not order: a room's rows kept theirs)."""
    d = make_daemon(db_url, options={"dispatcher": {"lanes": "1", "batch_max": "1"}}).start()
    (a, sa), (b, sb) = made = push_peers(d)
    held = []
    try:
        [(c, sc)] = push_peers(d, [("xx", "xx.example")])
        made.append((c, sc))
        ab, ac = room(a, b), room(a, c)
        settled(pg, db_url)
        servers = {"gk": sa, "tg": sb, "xx": sc}
        sa.delay = sb.delay = sc.delay = 0.5
        seen = {k: len(s.answers) for k, s in servers.items()}
        # The first row, xx's, holds the lane while the others are written;
        # tg's first push, until the PATCH is made. Each push is held from
        # the moment it comes until released, not for a delay the server
        # reads after recording it (a delay changed once the push was seen
        # could be the one it read) nor for a time the writes may outlast
        # on a loaded machine (3 s for nine messages, before).
        held += [sc.hold(count=1), sb.hold(count=1)]
        xx_held, tg_held = held
        assert a.send(ac["id"], a.user("alice"), "x0").status_code == 202
        wait_until(xx_held.came.is_set, what="the first push under way")
        for i in range(3):
            assert b.send(ab["id"], b.user("bob"), f"g{i}").status_code == 202
            assert a.send(ab["id"], a.user("alice"), f"t{i}").status_code == 202
            assert a.send(ac["id"], a.user("alice"), f"x{i + 1}").status_code == 202
        xx_held.release()
        wait_until(tg_held.came.is_set, what="the first push to tg")
        assert d.admin("PATCH", "/peers/tg", json={"event_types": None}).status_code == 200
        tg_held.release()
        settled(pg, db_url)
        order = sorted((t, k) for k, s in servers.items() for t, _ in s.answers[seen[k]:])
        got = [k for _, k in order]
        assert got == ["xx", "gk", "tg", "xx", "gk", "tg", "xx", "gk", "tg", "xx"], got
    finally:
        for h in held:
            h.release()
        for _, srv in made:
            srv.close()


def test_a_claims_renewal_that_failed_is_tried_again_before_the_claim_runs_out(make_daemon, db_url, pg):
    """claim_timeout_s 9 (the keeper renews every 3 s), a push that takes
    13 s, and the keeper's renewals fail for a while (the row locked by
    another session, the keeper's lock_timeout 300 ms; any failure would
    do: a database restarting, a connection cut): the first two at 3 and
    6 s.  Tried again within half a second of each failure, the renewal
    goes through once the lock is gone (7.4 s), before the claim's 9 s
    are up: the row is never free for another lane's claim, which would
    send it again.  Until the forty-sixth session a failed renewal was
    tried again a third of claim_timeout_s later: two failures in a row,
    and the third try came after the claim had run out."""
    import urllib.parse
    from harness import HeldSession
    d = make_daemon(db_url, options={"dispatcher": {"claim_timeout_s": "9", "http_timeout_ms": "30000"}}).start()
    (a, sa), (b, sb) = made = push_peers(d)
    try:
        rm = room(a, b)
        settled(pg, db_url)
        sb.delay = 13.0
        before = sb.requests
        assert a.send(rm["id"], a.user("alice"), "slow, its claim renewed late").status_code == 202
        wait_until(lambda: sb.requests == before + 1, what="the slow push under way")
        row = pg.psql("SELECT id, extract(epoch FROM claimed_until) FROM outbox "
                      "WHERE destination = 'peer:tg' AND state = 'in_flight'", db_url)
        assert row, "the row in flight"
        oid, until = row.split("|")
        # The claim's time on the server's clock (claimed_until is its
        # now() and claim_timeout_s): the windows below are counted from
        # it, not from when the test saw the push come (a loaded machine's
        # test saw it, and took its psql turns, a second or more later,
        # and held the lock past the claim's end).
        claimed_at = float(until) - 9
        # The keeper connects at its first renewal: its session takes the
        # database's lock_timeout (one made before is cut, to connect again).
        name = urllib.parse.urlparse(db_url).path.lstrip("/")
        pg.psql(f"ALTER DATABASE \"{name}\" SET lock_timeout = '300ms'; "
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'UPDATE outbox SET claimed_until%'", db_url)
        held = HeldSession(db_url)
        seen = []

        def look():
            v = pg.psql(f"SELECT extract(epoch FROM claimed_until) FROM outbox WHERE id = {oid} "
                        "AND state = 'in_flight'", db_url)
            if v and (not seen or float(v) != seen[-1]):
                seen.append(float(v))
            return v
        try:
            held.run(f"BEGIN; SELECT id FROM outbox WHERE id = {oid} FOR UPDATE;")
            # the lock taken before the keeper's first renewal: the claim's
            # claimed_until still (the server's word, not the test's clock)
            assert look() == until, (until, seen)
            while time.time() < claimed_at + 7.4:
                look()
                time.sleep(0.1)
        finally:
            held.end()
        wait_until(lambda: not look(), timeout=20, interval=0.1, what="the row out of flight")
        state = pg.psql(f"SELECT state || ' ' || attempts FROM outbox WHERE id = {oid}", db_url)
        # the claim's claimed_until, then a renewal's
        assert len(seen) >= 2, f"the row {state} with no renewal: taken back when its claim ran out"
        claimed, renewed = seen[0], seen[1] - 9
        assert renewed < claimed, f"renewed {renewed - claimed:.2f} s after the claim ran out"
        assert state == "delivered 1", state
        time.sleep(1.0)
        assert sb.requests == before + 1 and sb.duplicates == 0, sb.answers
    finally:
        for _, srv in made:
            srv.close()


def test_sigterm_while_the_claims_keeper_connects_to_a_frozen_postmaster_stops_in_time(make_daemon, db_url, pg):
    """PostgreSQL's postmaster stopped (SIGSTOP: the sessions made go on,
    a new connection is never answered) as the keeper makes its first
    connection, for the renewal of a slow delivery's claim; SIGTERM
    comes.  The stop waits for that connection, not cancellable, until its
    connect_timeout (5 s), and the daemon exits 0 within the stop's
    deadline (drain plus 10 s, docs/operations.md): checked in the
    forty-sixth session's review, no change needed."""
    import os
    d = make_daemon(db_url, options={"dispatcher": {"claim_timeout_s": "6", "http_timeout_ms": "30000"},
                                     "server": {"drain_timeout_ms": "1000"}}).start()
    (a, sa), (b, sb) = made = push_peers(d)
    with open(os.path.join(pg.dir, "data", "postmaster.pid")) as f:
        postmaster = int(f.readline())
    try:
        rm = room(a, b)
        settled(pg, db_url)
        sb.delay = 20.0
        before = sb.requests
        assert a.send(rm["id"], a.user("alice"), "slow").status_code == 202
        wait_until(lambda: sb.requests == before + 1, what="the slow push under way")
        t0 = time.time()
        os.kill(postmaster, signal.SIGSTOP)
        try:
            time.sleep(max(0.0, t0 + 2.7 - time.time()))  # the keeper's first renewal: 2 s in, connecting
            d.signal(signal.SIGTERM)
            rc = d.wait_exit(30)
        finally:
            os.kill(postmaster, signal.SIGCONT)
        assert rc == 0, d.log()[-3000:]
        # the keeper's connection, not answered, ends at its connect_timeout (5 s)
        assert "cannot renew the dispatcher's claims" in d.log() and "timeout expired" in d.log(), d.log()[-3000:]
        # on the daemon's clock (its "stopped" record), not the test's
        # around the signal and the exit (4.2-4.9 s measured there)
        took = stopped_in(d)
        assert took < 11, took
    finally:
        for _, srv in made:
            srv.close()


def _claims_plans(make_daemon, pg, db_url):
    """The plans of the claims (logged by auto_explain, turned on here for
    the test's database, the daemon's sessions to come) of one message from
    a to b through a daemon started now.  Until the sixty-first session
    each caller turned auto_explain on by the same three lines."""
    name = db_url.split("?")[0].rsplit("/", 1)[1]
    pg.psql(f'ALTER DATABASE "{name}" SET session_preload_libraries = \'auto_explain\'')
    pg.psql(f'ALTER DATABASE "{name}" SET auto_explain.log_min_duration = 0')
    log = os.path.join(pg.dir, "postgresql.log")
    start = os.path.getsize(log)
    d = make_daemon(db_url).start()
    (a, sa), (b, sb) = made = push_peers(d)
    try:
        rm = room(a, b)
        assert a.send(rm["id"], a.user("alice"), "planned").status_code == 202
        sb.wait_events(1)
        with open(log, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            plans = [p for p in f.read().split("plan:") if "blocked AS" in p]
        assert plans, "no plan of the claim logged"
        return plans
    finally:
        for _, srv in made:
            srv.close()


def test_the_claims_rows_backing_off_are_read_in_their_index_whatever_the_statistics(make_daemon, db_url, pg):
    """The claim's arm of the rows backing off (pending, next_attempt_at
    still to come) is planned, on a table never analyzed, as a descent of
    outbox_backing_off_idx (046) on the destination and next_attempt_at,
    not as a scan of outbox_state_dest_idx on the destination with
    next_attempt_at as a filter: that plan walked every pending row of the
    destination at every claim (5-40 ms a claim of a released backlog of
    20,000; docs/performance.md, "Forty-sixth session"), and until 046 a
    table of a few thousand rows and no statistics (autovacuum had not
    analyzed it yet) had it.  The daemon's sessions log their plans
    (auto_explain); the statistics of outbox are removed before the daemon
    starts."""
    pg.psql("INSERT INTO outbox (event_id, destination, room_id, state, delivered_at) "
            "SELECT -g, 'peer:zz', -1, 'delivered', now() FROM generate_series(1, 5000) g", db_url)
    pg.psql("DELETE FROM pg_statistic WHERE starelid = 'outbox'::regclass", db_url)
    pg.psql("UPDATE pg_class SET reltuples = -1, relpages = 0 WHERE oid = 'outbox'::regclass", db_url)
    for p in _claims_plans(make_daemon, pg, db_url):
        assert "Filter: (next_attempt_at > now())" not in p, p
        assert "outbox_backing_off_idx" in p, p


@pytest.mark.parametrize("statistics", ["no held row", "a backlog since released"])
def test_the_claims_held_rows_probe_is_one_descent_whatever_the_statistics(make_daemon, db_url, pg, statistics):
    """The claim's probe of an earlier held row (same user, room and
    sender) is planned as a descent of outbox_held_probe_idx (047) with
    statistics that count no held row while thousands are held (analyzed
    before they came), and with statistics taken while a user's backlog
    was held, since released: with the probe's state = 'held' and its join
    of events, the first read outbox_held_age_idx whole for each row
    claimed and the second outbox_event_dest_key (0.4-0.8 s and 3.4-12.6
    s a claim of 250 rows; docs/performance.md, "Forty-seventh
    session").  The daemon's sessions log their plans (auto_explain);
    autovacuum is off for outbox, so the statistics stay as made.  (A
    bitmap scan of that index, with the same conditions, is the same
    descent.)"""
    pg.psql("ALTER TABLE outbox SET (autovacuum_enabled = off)", db_url)
    held = ("INSERT INTO outbox (event_id, destination, target_identity_id, room_id, state) "
            "SELECT -g, 'peer:zz', -1 - g % 4, -1 - g % 4, 'held' FROM generate_series(1, 3000) g")
    if statistics == "no held row":
        pg.psql("INSERT INTO outbox (event_id, destination, room_id, state, delivered_at) "
                "SELECT -100000 - g, 'peer:zz', -1, 'delivered', now() FROM generate_series(1, 5000) g", db_url)
        pg.psql("ANALYZE outbox", db_url)
        pg.psql(held, db_url)
    else:
        pg.psql(held, db_url)
        pg.psql("ANALYZE outbox", db_url)
        pg.psql("UPDATE outbox SET state = 'dropped' WHERE state = 'held'", db_url)
    for p in _claims_plans(make_daemon, pg, db_url):
        scans = re.findall(r"->  ([^(\n]*?) on outbox h\b", p)
        assert scans and all(s in ("Index Scan using outbox_held_probe_idx", "Bitmap Heap Scan")
                             for s in scans), p
        assert re.search(r"(Index Scan using outbox_held_probe_idx on outbox h|Bitmap Index Scan on"
                         r" outbox_held_probe_idx)\b.*\n\s+Index Cond: \(\(target_identity_id"
                         r" = (o\w*)\.target_identity_id\) AND \(room_id = \2\.room_id\) AND \(id < \2\.id\)\)", p), p


def test_the_lanes_reconnect_without_blocking_the_stop_and_back_off(make_daemon, db_url, pg):
    """The lanes' connections lost while the database's address takes new
    connections and never answers them (a dropped route, a firewall that
    drops): the daemon stops at once, not after connect_timeout (5 s;
    until the forty-eighth session each lane's connect blocked it that
    long).  While the database refuses, a lane tries again after 250 ms,
    then twice as long each time up to database.reconnect_max_ms (until
    then every second, each lane), and delivers again once it is back.
    The pace is read from the daemon's own log (each failure's retry_in_ms
    and time), not from how many came within a time the test measures:
    on a loaded machine the test's own wait for the first failure took up
    to seconds, and the count of the next 8 s was one short (session 50)."""
    from pgproxy import PgProxy, stop_while_connects_swallowed
    # The lane's backend among the daemon's idle ones (the policy's too).
    # The lane is idle at its last claim's COMMIT but while it claims again
    # (every 200 ms when idle; longer under load): cut again until it is
    # seen reconnecting (once cut, it cannot reconnect while refused).
    cut = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'causewayd' "
           "AND query = 'COMMIT'")

    def failures():
        return [rec for rec in list(d.records) if rec.get("msg") == "dispatcher lane cannot connect to the database"]

    def cut_lane():
        pg.psql(cut, db_url)
        return failures()
    with PgProxy(db_url) as px:
        d = make_daemon(px.url, options={"dispatcher": {"lanes": "1"},
                                         "database": {"reconnect_max_ms": "4000"}}).start()
        (a, sa), (b, sb) = made = push_peers(d)
        try:
            rm = room(a, b)
            assert a.send(rm["id"], a.user("alice"), "first").status_code == 202
            sb.wait_events(1)
            settled(pg, db_url)

            # Refused: tried again after 250 ms, 0.5 s, 1 s, 2 s, 4 s, 4 s
            # (every second before), each failure saying when.
            px.refuse()
            wait_until(cut_lane, what="the lane's connect, refused")
            wait_until(lambda: len(failures()) >= 6, timeout=40, what="six connects refused")
            six = failures()[:6]
            assert [int(rec["retry_in_ms"]) for rec in six] == [250, 500, 1000, 2000, 4000, 4000], six
            at = [datetime.datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() for rec in six]
            # each waited for: at least half the time said (a record's time
            # is taken after the try's, late by as much as the machine is
            # loaded; a lane that tried every second, or every 250 ms,
            # fails this by the third gap)
            gaps = [round(t1 - t0, 3) for t0, t1 in zip(at, at[1:])]
            assert all(g >= int(rec["retry_in_ms"]) / 2000 for g, rec in zip(gaps, six)), (gaps, six)
            px.thaw()
            assert a.send(rm["id"], a.user("alice"), "second").status_code == 202
            sb.wait_events(2, timeout=20)
            settled(pg, db_url)

            # A stop while the lane's connect is swallowed: at once.  Every
            # connection of the daemon is cut (the lane may be between its
            # COMMITs, as above): each thread connects anew into the void.
            stop_while_connects_swallowed(px, d, pg, db_url)
        finally:
            for _, srv in made:
                srv.close()
