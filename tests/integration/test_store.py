"""The store's own tests (tests/integration/store_test.c, a Check suite) run
against the harness's PostgreSQL, and its outage mode while the harness stops
and restarts the server."""
import os
import subprocess
import threading
import time

from harness import TOP_BUILDDIR

STORE_TEST = os.path.join(TOP_BUILDDIR, "tests", "integration", "store_test")


def test_store_suite(pg, db_url):
    r = subprocess.run([STORE_TEST], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, CAUSEWAY_TEST_DATABASE_URL=db_url))
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100%: Checks: 16, Failures: 0, Errors: 0" in r.stdout


def test_store_survives_a_database_restart(private_pg):
    p = subprocess.Popen([STORE_TEST, "outage"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, CAUSEWAY_TEST_DATABASE_URL=private_pg.url))
    lines = []
    seen = threading.Event()

    def read():
        for line in p.stdout:
            lines.append(line.strip())
            if line.strip() == "running":
                seen.set()
    t = threading.Thread(target=read, daemon=True)
    t.start()
    assert seen.wait(30), lines
    time.sleep(1.0)          # writes succeed for a while
    private_pg.stop("fast")  # then the server goes away
    time.sleep(3.0)
    private_pg.start()
    rc = p.wait(timeout=120)
    t.join(5)
    err = p.stderr.read()
    print("\n".join(lines), err)
    assert rc == 0, "\n".join(lines) + err
    assert "outage" in lines and "recovered" in lines
    summary = [x for x in lines if x.startswith("outage summary")][0]
    assert "failed=0" not in summary
