"""CPU per event from /proc for the benchmarks (forty-fourth session).

Events/s move with whatever else shares the machine; the CPU each process
spends per event moves far less. Meter.snap() reads the daemon's threads
(/proc/PID/task, user + system) and every child of the postmaster, split
into the backends of the daemon's connections, the benchmark's own psql
sessions (left out: the polls of wait_until) and PostgreSQL's background
processes (the WAL writer, the checkpointer, autovacuum). Meter.per()
turns two snapshots into microseconds per event. Uses only what every
tree's harness has (Postgres.dir, Postgres.psql, Daemon.proc), so an older
tree can be measured with a copy of this file."""
import json
import os
import re

TCK = os.sysconf("SC_CLK_TCK")


def _stat(path):
    """(name, parent pid, user + system CPU seconds) of a /proc stat file, or None."""
    try:
        s = open(path).read()
    except OSError:
        return None
    f = s[s.rindex(")") + 2:].split()
    return s[s.index("(") + 1:s.rindex(")")], int(f[1]), (int(f[11]) + int(f[12])) / TCK


class Meter:
    def __init__(self, pg, daemon):
        self.pg = pg
        self.daemon_pid = daemon.proc.pid
        self.postmaster = int(open(os.path.join(pg.dir, "data", "postmaster.pid")).readline())

    def snap(self):
        threads = {}
        for t in os.listdir(f"/proc/{self.daemon_pid}/task"):
            r = _stat(f"/proc/{self.daemon_pid}/task/{t}/stat")
            if r:
                name = re.sub(r"[-_]?\d+$", "", r[0])
                threads[name] = threads.get(name, 0) + r[2]
        # The daemon's sessions by their name (store.c names them
        # causewayd); any other client is the harness's.  Until the
        # sixty-fourth session the harness's were told by the name
        # 'psql', which its libpq session (no name) stopped giving: its
        # CPU was counted as the daemon's backends'.
        kinds = {}
        for line in self.pg.psql("SELECT pid, CASE WHEN application_name = 'causewayd' THEN 'daemon' "
                                 "WHEN backend_type = 'client backend' THEN 'psql' ELSE 'other' END "
                                 "FROM pg_stat_activity", self.pg.url).splitlines():
            pid, kind = line.split("|")
            kinds[int(pid)] = kind
        procs = {}
        for p in filter(str.isdigit, os.listdir("/proc")):
            r = _stat(f"/proc/{p}/stat")
            if r and r[1] == self.postmaster:
                procs[int(p)] = (kinds.get(int(p), "other"), r[2])
        return threads, procs

    def per(self, before, after, n):
        """CPU microseconds per event between two snapshots, n events."""
        t0, p0 = before
        t1, p1 = after
        threads = {k: (t1[k] - t0.get(k, 0)) / n * 1e6 for k in t1}
        pg = {"daemon": 0.0, "other": 0.0}
        backends = []
        for pid, (kind, c) in p1.items():
            if kind == "psql":
                continue
            d = (c - p0.get(pid, (kind, 0))[1]) / n * 1e6
            pg[kind if kind in pg else "other"] += d
            if kind == "daemon" and d >= 0.1:
                backends.append(round(d, 1))
        return {"daemon_us": round(sum(threads.values()), 1),
                "daemon_threads_us": {k: round(v, 1) for k, v in sorted(threads.items()) if v >= 0.1},
                "pg_us": round(pg["daemon"] + pg["other"], 1), "pg_backends_us": round(pg["daemon"], 1),
                "pg_backends": sorted(backends, reverse=True), "pg_background_us": round(pg["other"], 1),
                "load1": float(open("/proc/loadavg").read().split()[0])}

    def report(self, phase, before, after, n, **extra):
        out = dict(phase=phase, events=n, **extra, **self.per(before, after, n))
        print(f"    [{phase}] CPU per event: daemon {out['daemon_us']} us {out['daemon_threads_us']}, "
              f"PostgreSQL {out['pg_us']} us (its backends {out['pg_backends_us']} {out['pg_backends']}, "
              f"background {out['pg_background_us']}) (load average {out['load1']})")
        print("RESULT " + json.dumps(out), flush=True)
        return out
