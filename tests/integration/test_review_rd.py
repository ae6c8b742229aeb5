"""Review probes (session 32, rD): the dispatcher's back half against the
real daemon and PostgreSQL, with two processes on one database."""
import signal
import threading
import time

import requests

from harness import wait_until
from peer import push_peers


def rows(pg, db_url, where="true"):
    out = pg.psql(f"SELECT id, state, coalesce(claimed_by, ''), attempts FROM outbox WHERE {where} ORDER BY id",
                  db_url)
    return [line.split("|") for line in out.splitlines() if line]


def test_sigterm_releases_rows_in_flight_at_once(make_daemon, db_url, pg):
    # A delivery in flight to a slow peer when SIGTERM comes: its rows must
    # be released (pending, unclaimed) so that the next start sends them at
    # once, not after claim_timeout_s (60 s here).
    opts = {"dispatcher": {"claim_timeout_s": "60", "http_timeout_ms": "20000"}}
    d = make_daemon(db_url, options=opts).start()
    (a, sa), (b, sb) = push_peers(d)
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    sb.delay = 10.0
    mid = a.send(room, a.user("alice"), "slow").json()["id"]
    wait_until(lambda: sb.requests >= 1, what="the delivery started")
    t0 = time.time()
    assert d.stop() == 0
    took = time.time() - t0
    left = rows(pg, db_url, "destination = 'peer:tg'")
    print("stop took", round(took, 2), "rows after stop", left)
    assert took < 8, took
    assert all(r[1] == "pending" and r[2] == "" for r in left), left
    sb.delay = 0
    n0 = sb.requests
    d2 = make_daemon(db_url, options=opts).start()
    wait_until(lambda: sb.requests > n0, timeout=10, what="sent again soon after the restart")
    d2.stop()
    sa.close()
    sb.close()
    assert mid in sb.seen


def test_two_daemons_one_killed_keep_order_and_lose_nothing(make_daemon, db_url, pg):
    # The fault suite runs one daemon (docs/faults.md): two processes on one
    # database, load through both, one killed with SIGKILL while its
    # deliveries are in flight; the other takes its rows once their claim
    # runs out.  Every accepted message arrives, in order per room.
    opts = {"dispatcher": {"claim_timeout_s": "5", "retry_base_ms": "50", "retry_max_ms": "500",
                           "retry_budget": "1000"}}
    d1 = make_daemon(db_url, options=opts).start()
    d2 = make_daemon(db_url, options=opts).start()
    (a, sa), (b, sb) = push_peers(d1)
    sb.delay = 0.05
    rooms = [a.create_room([a.user("alice"), b.user(f"bob{k}")]).json()["id"] for k in range(4)]
    accepted = {r: [] for r in rooms}
    stop = threading.Event()

    def send_loop(which):
        i = 0
        while not stop.is_set():
            room = rooms[i % len(rooms)]
            key = f"k{which}-{i}"
            while True:
                try:
                    r = a.send(room, a.user("alice"), f"{which}.{i}", idem=key)
                    if r.status_code == 202:
                        accepted[room].append(r.json()["id"])
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.05)
            i += 1

    # the load through d2 only (d1 will die); both dispatch
    a.base = d2.url
    t = threading.Thread(target=send_loop, args=(1,), daemon=True)
    t.start()
    wait_until(lambda: sum(map(len, accepted.values())) >= 60, timeout=30, what="load")
    d1.signal(signal.SIGKILL)
    d1.proc.wait()
    time.sleep(3)
    wait_until(lambda: sum(map(len, accepted.values())) >= 150, timeout=60, what="more load")
    stop.set()
    t.join(30)
    n = sum(map(len, accepted.values()))
    got = sb.wait_events(n, timeout=60)
    ids = {m for v in accepted.values() for m in v}
    assert {e["id"] for e in got} == ids
    for room, want in accepted.items():
        assert [e["id"] for e in got if e["room_id"] == room] == want
    print("duplicates absorbed", sb.duplicates)
    sa.close()
    sb.close()


def test_a_delivery_longer_than_the_claim_is_not_sent_again_by_another_process(make_daemon, db_url, pg):
    # claim_timeout_s 5, a peer that answers after 9 s: the keeper renews
    # the claim, and the second process must not take the rows and send
    # them again while the first still waits for the answer.
    opts = {"dispatcher": {"claim_timeout_s": "5", "http_timeout_ms": "20000"}}
    d1 = make_daemon(db_url, options=opts).start()
    d2 = make_daemon(db_url, options=opts).start()
    (a, sa), (b, sb) = push_peers(d1)
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    sb.delay = 9.0
    a.send(room, a.user("alice"), "slow")
    wait_until(lambda: sb.requests >= 1, what="first request")
    time.sleep(12)
    print("requests", sb.requests, "duplicates", sb.duplicates, rows(pg, db_url, "destination = 'peer:tg'"))
    assert sb.requests == 1
    assert sb.duplicates == 0
    sa.close()
    sb.close()


def test_attempts_spent_by_deaths_never_end_in_a_dead_letter(make_daemon, db_url, pg):
    # A row whose every try ends with the process gone (a crash while
    # delivering it, an OOM kill) is claimed again after claim_timeout_s
    # each time, its attempt counted at the claim, but the retry budget is
    # only checked when a failure is recorded: it never goes dead, and a
    # poison row crash-loops the daemon for ever.
    opts = {"dispatcher": {"claim_timeout_s": "5", "retry_budget": "1", "http_timeout_ms": "60000"}}
    d = make_daemon(db_url, options=opts).start()
    (a, sa), (b, sb) = push_peers(d)
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    sb.delay = 60.0
    a.send(room, a.user("alice"), "poison")
    for k in range(3):
        n0 = sb.requests
        wait_until(lambda: sb.requests > n0, timeout=20, what=f"try {k + 1}")
        d.signal(signal.SIGKILL)
        d.proc.wait()
        d = make_daemon(db_url, options=opts).start()
    left = rows(pg, db_url, "destination = 'peer:tg'")
    print("after three deaths:", left)
    d.signal(signal.SIGKILL)
    d.proc.wait()
    sa.close()
    sb.close()
    assert int(left[0][3]) > 1 and left[0][1] != "dead", left
