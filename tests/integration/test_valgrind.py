"""The daemon's start and stop path under valgrind (memcheck): no definite
leak and no memory error from start to a clean exit on SIGTERM, with the
admin API, the console, a peer and a signed message on the way.  Sanitized
builds link AddressSanitizer, which valgrind cannot run; this test runs in
the plain build (`make distcheck` in `tools/dev test`)."""
import shutil
import subprocess

import pytest

from harness import CAUSEWAYD
from peer import NotifyServer, PeerClient


def sanitized():
    out = subprocess.run(["ldd", CAUSEWAYD], capture_output=True, text=True).stdout
    return "libasan" in out or "libubsan" in out


pytestmark = [
    pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed"),
    pytest.mark.skipif(sanitized(), reason="a sanitized build: valgrind runs in the plain build (make distcheck)"),
]


def test_start_work_and_stop_leak_nothing(make_daemon, db_url, tmp_path):
    log = tmp_path / "valgrind.log"
    d = make_daemon(db_url, wrapper=["valgrind", "--leak-check=full", "--show-leak-kinds=definite",
                                     "--errors-for-leak-kinds=definite", "--error-exitcode=99",
                                     "--num-callers=30", f"--log-file={log}"],
                    ready_timeout=180).start()
    assert d.get("/readyz", timeout=60).status_code == 200
    r = d.admin("POST", "/tokens", json={"name": "vg", "role": "viewer"}, timeout=60)
    assert r.status_code == 201, r.text
    assert d.get("/admin/", timeout=60).status_code == 200
    key = d.get("/.well-known/mimi-protocol-directory", timeout=60).json()["public_key"]["key"]
    srv = NotifyServer()
    srv.public_b64 = key
    c = PeerClient(d.url, "gk", "wa.example")
    r = d.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "push_url": srv.url,
                                        "public_key": c.signer.public_b64}, timeout=60)
    assert r.status_code == 201, r.text
    c.token = r.json()["token"]
    room = c.create_room([c.user("alice"), c.user("bob")]).json()["id"]
    assert c.send(room, c.user("alice"), "under valgrind").status_code == 202
    assert d.admin("GET", "/stats", timeout=60).status_code == 200
    rc = d.stop()
    srv.close()
    report = log.read_text()
    assert rc == 0, f"exit {rc}; valgrind:\n{report}"
    # valgrind ran the daemon to its end, and found nothing.
    assert "HEAP SUMMARY" in report and "ERROR SUMMARY: 0 errors" in report, report
    assert "definitely lost: 0 bytes" in report or "All heap blocks were freed" in report, report
