"""Resources after repeated faults (tests/faults/leaks runs this file; it is
not part of `make check`): the daemon's descriptors, threads, RSS,
PostgreSQL sessions and rows measured after a warm-up (LEAK_WARM cycles, 3)
and after LEAK_CYCLES more (20) of one fault: the database frozen and
thawed (pgproxy), short freezes around the deadline under load, one long
freeze under load, PostgreSQL stopped and started, Prosody restarted, the
push peer down and up.  Each prints its figures (and appends them to
LEAK_FIGS when set) and asserts no growth past a small slack.  On a plain
build the RSS is compared too; on a sanitized one (causewayd linked to
libasan, as ldd shows) it is left out, ASan's quarantine growing it, and
the make_daemon fixture's exit check catches a leak report instead.
LEAK_RSS=0 or 1 says which, whatever the build: until the sixty-first
session the RSS was compared unless LEAK_RSS=0 was given, and a run on
the sanitized build without it could fail on the quarantine's growth.
Written by a review of the thirty-fourth session (no growth found:
docs/faults.md)."""
import collections
import concurrent.futures
import contextlib
import json
import os
import re
import subprocess
import time

import requests

from harness import CAUSEWAYD, Postgres, thread_names, wait_until
from peer import push_peers
from pgproxy import PgProxy

N = int(os.environ.get("LEAK_CYCLES", "20"))
WARM = int(os.environ.get("LEAK_WARM", "3"))
FIGS = os.environ.get("LEAK_FIGS")


def sanitized():
    """Whether causewayd is built with AddressSanitizer (as test_daemon.py
    and test_valgrind.py ask: the build links it dynamically, gcc's way)."""
    out = subprocess.run(["ldd", CAUSEWAYD], capture_output=True, text=True).stdout
    return "libasan" in out


RSS = os.environ.get("LEAK_RSS", "0" if sanitized() else "1") == "1"


def snap(d, pg, db_url, tables=()):
    pid = d.proc.pid
    kinds = collections.Counter()
    for f in os.listdir(f"/proc/{pid}/fd"):
        try:
            t = os.readlink(f"/proc/{pid}/fd/{f}")
        except OSError:
            continue
        kinds[t.split(":")[0] if ":" in t and not t.startswith("/") else ("dev" if t.startswith("/dev") else "file")] += 1
    st = open(f"/proc/{pid}/status").read()
    names = collections.Counter(thread_names(pid, exiting=True))
    dbname = db_url.split("?")[0].rsplit("/", 1)[1]
    sess = pg.psql("SELECT coalesce(nullif(application_name, ''), '-') || ':' || count(*) FROM pg_stat_activity "
                   f"WHERE datname = '{dbname}' AND pid <> pg_backend_pid() AND application_name <> '' "
                   "GROUP BY application_name ORDER BY 1", pg.url).split()
    rows = {t: int(pg.psql(f"SELECT count(*) FROM {t}", db_url)) for t in tables}
    return {"fds": sum(kinds.values()), "fd_kinds": dict(kinds),
            "threads": int(re.search(r"Threads:\s+(\d+)", st).group(1)),
            "thread_names": dict(names),
            "rss_kb": int(re.search(r"VmRSS:\s+(\d+)", st).group(1)),
            "sessions": sess, "rows": rows}


def settle(d, pg, db_url, tables, quiet_s=6):
    """A snapshot once the detached threads (cancels, pings) have ended:
    the thread count is the same over quiet_s."""
    time.sleep(quiet_s)
    return snap(d, pg, db_url, tables)


def keep(*lines):
    """The figures, into LEAK_FIGS when it is set."""
    if FIGS:
        with open(FIGS, "a") as f:
            f.write("".join(line + "\n" for line in lines))


def record(name, before, after, extra=""):
    keep(f"== {name} (build {os.environ.get('top_builddir')}, warm-up {WARM}, cycles {N}) {extra}",
         "before: " + json.dumps(before, sort_keys=True), "after:  " + json.dumps(after, sort_keys=True))
    print(name, "\nbefore", before, "\nafter ", after)


def grew(before, after, fd_slack=2, thread_slack=1, rss_slack_kb=4096):
    out = []
    if after["fds"] > before["fds"] + fd_slack:
        out.append(f"fds {before['fds']} -> {after['fds']}")
    if after["threads"] > before["threads"] + thread_slack:
        out.append(f"threads {before['threads']} -> {after['threads']}")
    if RSS and after["rss_kb"] > before["rss_kb"] + rss_slack_kb:
        out.append(f"rss {before['rss_kb']} -> {after['rss_kb']} kB")
    if len(after["sessions"]) and sorted(after["sessions"]) != sorted(before["sessions"]):
        out.append(f"sessions {before['sessions']} -> {after['sessions']}")
    return out


TABLES_A = ("events", "idempotency_keys", "signature_nonces", "outbox", "delivery_attempts", "audit_log")


def test_freeze_thaw_cycles(make_daemon, db_url, pg):
    """(a) The database frozen (pgproxy) while reads and a write run, the
    watchdog's cancels and pings unanswered, connections shut down; thawed,
    reads answered again. Alternately slowed (COMMIT 2.5 s late: pings
    answered)."""
    with PgProxy(db_url) as p:
        d = make_daemon(p.url, options={"server": {"drain_timeout_ms": "1000"},
                                        "database": {"request_timeout_ms": "1000", "pool_size": "2"}}).start()
        (a, _), (b, sb) = push_peers(d)
        try:
            room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
            reads = {"peer": lambda: a.call("GET", f"/v1/rooms/{room}"),
                     "admin": lambda: d.admin("GET", "/outbox?state=dead"),
                     "readyz": lambda: d.get("/readyz")}
            seq = [0]

            def write():
                seq[0] += 1
                return a.send(room, a.user("alice"), f"m{seq[0]}", idem=f"k{seq[0]}")

            def cycle(i):
                mark = len(d.records)
                p.freeze()
                for _ in range(2):
                    with concurrent.futures.ThreadPoolExecutor(5) as ex:
                        futs = [ex.submit(r) for r in reads.values()] + [ex.submit(write), ex.submit(write)]
                        for f in futs:
                            with contextlib.suppress(requests.RequestException):
                                f.result()
                d.wait_for(lambda r: r.get("msg") == "the database stopped answering: a connection is dropped",
                           start=mark, timeout=30)
                p.thaw()
                for name, read in reads.items():
                    wait_until(lambda: read().status_code == 200, timeout=30, what=f"{name} again")
                wait_until(lambda: write().status_code == 202, timeout=30, what="write again")
                if i % 2:
                    p.slow(commit=2.5)
                    with concurrent.futures.ThreadPoolExecutor(3) as ex:
                        list(ex.map(lambda _: write(), range(3)))
                    p.slow(0)

            for i in range(WARM):
                cycle(i)
            before = settle(d, pg, db_url, TABLES_A)
            for i in range(N):
                cycle(i)
            after = settle(d, pg, db_url, TABLES_A)
            record("freeze/thaw", before, after)
            assert not grew(before, after), grew(before, after)
        finally:
            sb.close()
            if d.proc.poll() is None:
                rc = d.stop()
                assert rc == 0, d.log()[-6000:]


def test_postgres_stop_start_cycles(make_daemon, pg):
    """(b) PostgreSQL stopped (fast) and started again, requests refused
    503 meanwhile; after the restart the daemon reconnects by itself."""
    own = Postgres()
    d = None
    try:
        url = own.new_database("leak_b")
        # The dispatcher's backoff bounded as in tests/faults/run: by
        # default a row that failed through a few restarts waits minutes.
        d = make_daemon(url, options={"database": {"request_timeout_ms": "1000"},
                                      "dispatcher": {"retry_base_ms": "100", "retry_max_ms": "2000",
                                                     "claim_timeout_s": "5"}}).start()
        (a, _), (b, sb) = push_peers(d)
        room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
        seq = [0]

        def write():
            seq[0] += 1
            return a.send(room, a.user("alice"), f"m{seq[0]}", idem=f"k{seq[0]}")

        def cycle(i):
            own.stop("immediate" if i % 2 else "fast")
            t0 = time.time()
            while time.time() - t0 < 2:
                with contextlib.suppress(requests.RequestException):
                    assert write().status_code == 503
                    a.call("GET", f"/v1/rooms/{room}")
                    d.admin("GET", "/outbox?state=dead")
            own.start()
            wait_until(lambda: d.get("/readyz").status_code == 200, timeout=30, what="ready again")
            wait_until(lambda: write().status_code == 202, timeout=30, what="write again")
            wait_until(lambda: a.call("GET", f"/v1/rooms/{room}").status_code == 200, timeout=30, what="read")
            wait_until(lambda: len(sb.events) >= int(own.psql("SELECT count(*) FROM events", url)) - 0,
                       timeout=30, what="delivered")

        for i in range(WARM):
            cycle(i)
        before = settle(d, own, url, TABLES_A)
        for i in range(N):
            cycle(i)
        after = settle(d, own, url, TABLES_A)
        record("postgres stop/start", before, after)
        sb.close()
        assert not grew(before, after), grew(before, after)
    finally:
        if d and d.proc.poll() is None:
            assert d.stop() == 0, d.log()[-3000:]
        own.destroy()


def test_peer_down_up_cycles(make_daemon, db_url, pg):
    """(d) A push peer's server gone (connection refused) for a while with
    messages for it, then back on the same port; the backlog delivered."""
    import http.server
    import threading
    d = make_daemon(db_url, options={"dispatcher": {"retry_base_ms": "50", "retry_max_ms": "500",
                                                    "retry_budget": "1000"}}).start()
    (a, _), (b, sb) = push_peers(d)
    try:
        room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
        port = sb.port
        handler = sb.httpd.RequestHandlerClass
        seq = [0]

        def write():
            seq[0] += 1
            return a.send(room, a.user("alice"), f"m{seq[0]}", idem=f"k{seq[0]}")

        def cycle(i):
            sb.close()
            for _ in range(5):
                assert write().status_code == 202
            time.sleep(1.5)
            sb.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
            # as NotifyServer's own (peer.py): its next close() waits 25 ms on
            # average for serve_forever to see it, not 0.25 s
            sb.thread = threading.Thread(target=sb.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            sb.thread.start()
            sb.wait_events(seq[0], timeout=60)

        for i in range(WARM):
            cycle(i)
        before = settle(d, pg, db_url, TABLES_A)
        for i in range(N):
            cycle(i)
        after = settle(d, pg, db_url, TABLES_A)
        record("peer down/up", before, after)
        assert d.stop() == 0, d.log()[-6000:]
        assert not grew(before, after), grew(before, after)
    finally:
        sb.close()


def test_prosody_restart_cycles(make_daemon, db_url, pg, tmp_path):
    """(c) Prosody stopped (SIGTERM; odd cycles SIGKILL) and started again
    with messages for an XMPP user meanwhile; the component reconnects and
    the backlog goes out."""
    import test_xmpp as tx
    from prosody import Prosody
    prosody = Prosody(tmp_path / "prosody", host=tx.HOST, components={tx.COMP: tx.SECRET})
    prosody.start()
    prosody.register("alice", "pw-alice")
    try:
        d, a, srv = tx.start_with_gk(make_daemon, db_url, prosody)
        tx.consent_alice(d)
        room = a.create_room([a.user("wally"), tx.ALICE]).json()["id"]
        seq = [0]

        def write():
            seq[0] += 1
            return a.send(room, a.user("wally"), f"m{seq[0]}", idem=f"k{seq[0]}")

        def delivered():
            return int(pg.psql("SELECT count(*) FROM outbox WHERE destination = 'xmpp' AND state = 'delivered'",
                               db_url))

        def cycle(i):
            assert write().status_code == 202
            if i % 2:
                prosody.kill()
            else:
                prosody.stop()
            wait_until(lambda: tx.component_state(d)["state"] != "up", what="the stream to break")
            for _ in range(3):
                assert write().status_code == 202
            time.sleep(1.0)
            prosody.start()
            wait_until(lambda: tx.component_state(d)["state"] == "up", timeout=30, what="the reconnect")
            wait_until(lambda: delivered() >= seq[0], timeout=30, what="the backlog")

        for i in range(WARM):
            cycle(i)
        before = settle(d, pg, db_url, TABLES_A + ("event_native_ids",))
        for i in range(N):
            cycle(i)
        after = settle(d, pg, db_url, TABLES_A + ("event_native_ids",))
        record("prosody restart", before, after)
        srv.close()
        assert d.stop() == 0, d.log()[-6000:]
        assert not grew(before, after), grew(before, after)
    finally:
        prosody.close()


def test_long_freeze_under_load_peak(make_daemon, db_url, pg):
    """(a, peak) One freeze of LEAK_FREEZE_S seconds (40) under a steady load
    of reads and writes, sampled every second: descriptors and threads
    while it lasts stay bounded (the detached cancels and pings)."""
    import threading
    secs = int(os.environ.get("LEAK_FREEZE_S", "40"))
    with PgProxy(db_url) as p:
        d = make_daemon(p.url, options={"server": {"drain_timeout_ms": "1000"},
                                        "database": {"request_timeout_ms": "1000", "pool_size": "2"}}).start()
        (a, _), (b, sb) = push_peers(d)
        stop = threading.Event()
        try:
            room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
            assert a.send(room, a.user("alice"), "warm", idem="warm").status_code == 202
            sb.wait_events(1)
            seq = [0]

            def load(k):
                while not stop.is_set():
                    seq[0] += 1
                    with contextlib.suppress(requests.RequestException):
                        if k % 2:
                            a.send(room, a.user("alice"), f"m{seq[0]}", idem=f"k{k}-{seq[0]}")
                        else:
                            a.call("GET", f"/v1/rooms/{room}")

            def start_load():
                stop.clear()
                ts = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(6)]
                for t in ts:
                    t.start()
                return ts
            # The warm-up: the same load through a short freeze, so that
            # every connection made lazily (both readers, the readiness
            # check's) and every one a freeze replaces is there before the
            # count (without it, 7 sessions before and 9 after).
            ts = start_load()
            time.sleep(1)
            p.freeze()
            time.sleep(3)
            p.thaw()
            time.sleep(1)
            stop.set()
            for t in ts:
                t.join(30)
            wait_until(lambda: d.get("/readyz").status_code == 200, timeout=30, what="ready after the warm-up")
            before = settle(d, pg, db_url, ())
            ts = start_load()
            time.sleep(1)
            p.freeze()
            samples = []
            for _ in range(secs):
                time.sleep(1)
                s = snap(d, pg, db_url)
                samples.append((s["fds"], s["threads"], s["rss_kb"],
                                {k: v for k, v in s["thread_names"].items() if k in ("cw-cancel", "cw-ping")}))
            p.thaw()
            stop.set()
            for t in ts:
                t.join(30)
            wait_until(lambda: d.get("/readyz").status_code == 200, timeout=30, what="ready again")
            after = settle(d, pg, db_url, ())
            keep(f"== long freeze {secs}s peak (build {os.environ.get('top_builddir')})",
                 "before: " + json.dumps(before, sort_keys=True),
                 "samples (fds, threads, rss_kb, detached): " + json.dumps(samples),
                 "after:  " + json.dumps(after, sort_keys=True))
            print(samples)
            assert max(s[0] for s in samples) <= before["fds"] + 16, samples  # in-flight HTTP and held connects: 6 clients
            assert max(s[1] for s in samples) <= before["threads"] + 10, samples
            assert not grew(before, after), grew(before, after)
        finally:
            stop.set()
            sb.close()
            if d.proc.poll() is None:
                rc = d.stop()
                assert rc == 0, d.log()[-6000:]


def test_short_freezes_under_load(make_daemon, db_url, pg):
    """(a, races) Freezes of 0.3 to 2.6 s (around the deadline and the
    cancel's grace) under a steady load, LEAK_CYCLES * 2 of them: every
    request answered (no client timeout at 10 s), and nothing grows."""
    import random
    import threading
    rnd = random.Random(int(os.environ.get("LEAK_SEED", "34")))
    with PgProxy(db_url) as p:
        d = make_daemon(p.url, options={"server": {"drain_timeout_ms": "1000"},
                                        "database": {"request_timeout_ms": "1000", "pool_size": "2"}}).start()
        (a, _), (b, sb) = push_peers(d)
        stop = threading.Event()
        timeouts, statuses = [], collections.Counter()
        try:
            room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
            assert a.send(room, a.user("alice"), "warm", idem="warm").status_code == 202
            sb.wait_events(1)
            seq = [0]

            def load(k):
                while not stop.is_set():
                    seq[0] += 1
                    try:
                        if k % 2:
                            r = a.send(room, a.user("alice"), f"m{seq[0]}", idem=f"k{k}-{seq[0]}")
                        else:
                            r = a.call("GET", f"/v1/rooms/{room}")
                        statuses[r.status_code] += 1
                    except requests.Timeout:
                        timeouts.append(time.time())
                    except requests.RequestException as ex:
                        statuses[type(ex).__name__] += 1
            ts = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
            for t in ts:
                t.start()
            before = None
            for i in range(WARM + 2 * N):
                if i == WARM:
                    stop.set()
                    for t in ts:
                        t.join(30)
                    before = settle(d, pg, db_url, ())
                    stop.clear()
                    ts = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
                    for t in ts:
                        t.start()
                p.freeze()
                time.sleep(rnd.uniform(0.3, 2.6))
                p.thaw()
                time.sleep(rnd.uniform(0.2, 1.5))
            stop.set()
            for t in ts:
                t.join(30)
            wait_until(lambda: d.get("/readyz").status_code == 200, timeout=30, what="ready again")
            wait_until(lambda: a.send(room, a.user("alice"), "after", idem="after").status_code == 202, timeout=30,
                       what="a write")
            after = settle(d, pg, db_url, ())
            record("short freezes", before, after, extra=f"statuses {dict(statuses)} timeouts {len(timeouts)}")
            assert not timeouts, timeouts
            assert not grew(before, after), grew(before, after)
        finally:
            stop.set()
            sb.close()
            if d.proc.poll() is None:
                rc = d.stop()
                assert rc == 0, d.log()[-6000:]
