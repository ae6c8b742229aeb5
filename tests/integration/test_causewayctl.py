"""causewayctl, the operator's command-line client of /admin/v1, against the
real daemon: every command's table and --json (compared with the API's own
answer), paging, tokens and roles, the exit statuses and their messages,
and where the URL and the token come from (flags > environment > file)."""
import http.server
import json
import os
import re
import subprocess
import threading
import time
import unicodedata
import urllib.parse

import pytest

import harness
from harness import ADMIN_TOKEN, HeldSession, free_port, wait_until
from peer import PeerClient, Signer, push_peers

CTL = os.path.join(harness.TOP_BUILDDIR, "causewayctl")
ALICE = "mimi://example.org/u/alice"


def ctl(*args, url=None, token=ADMIN_TOKEN, env=None, home=None, timeout=60, cwd=None):
    """Runs causewayctl; returns (exit status, stdout, stderr).  The token is
    given in the environment unless token=None; url likewise."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("CAUSEWAY_")}
    # No settings file of the person running the tests may leak in.
    e["HOME"] = home or "/nonexistent"
    e.pop("XDG_CONFIG_HOME", None)
    if url:
        e["CAUSEWAY_URL"] = url
    if token:
        e["CAUSEWAY_ADMIN_TOKEN"] = token
    e.update(env or {})
    r = subprocess.run([CTL, *args], capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)
    assert "Sanitizer" not in r.stderr, r.stderr
    return r.returncode, r.stdout, r.stderr


def ok(*args, **kw):
    rc, out, err = ctl(*args, **kw)
    assert rc == 0, (args, rc, out, err)
    assert ADMIN_TOKEN not in out + err  # never printed
    return out


def refused(*args, **kw):
    rc, out, err = ctl(*args, **kw)
    assert rc == 1, (args, rc, out, err)
    assert ADMIN_TOKEN not in out + err
    return err


def cells(out):
    """The table's rows as lists of cells (columns are 2+ spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()[1:] if line.strip()]


@pytest.fixture
def world(make_daemon, db_url):
    """Two peers (gk up, tg down), one dead letter to tg, one message held for
    alice, one rule."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2", "retry_base_ms": "20",
                                                    "retry_max_ms": "50"}}).start()
    peers = push_peers(d)
    (a, _), (b, sb) = peers
    sb.fail_next = 1000  # tg is down
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    dead = a.send(room, a.user("alice"), "to a peer that is down").json()["id"]
    wait_until(lambda: d.admin("GET", "/outbox?state=dead").json()["rows"], what="a dead letter")
    r = d.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True})
    assert r.status_code == 200, r.text
    dm = a.create_room([a.user("wally"), ALICE]).json()["id"]
    held = a.send(dm, a.user("wally"), "first contact").json()["id"]
    r = d.admin("POST", "/rules", json={"scope": "domain", "pattern": "spam.example", "mode": "deny",
                                         "comment": "abuse wave"})
    assert r.status_code == 201, r.text
    w = type("World", (), {})()
    w.d, w.url, w.a, w.b, w.sb = d, d.url, a, b, sb
    w.room, w.dead, w.held, w.rule = room, dead, held, r.json()
    yield w
    for _, srv in peers:
        srv.close()


# ------------------------------------------------------------ usage

def test_help_and_usage_errors():
    rc, out, err = ctl("--help", token=None)
    assert rc == 0 and err == ""
    for command in ("status", "peers", "rules", "users", "held", "trace MESSAGE-ID", "deadletters replay OUTBOX-ID",
                    "deadletters discard OUTBOX-ID", "token create NAME", "token revoke NAME", "token list", "audit", "peers add NAME DOMAIN --key KEY",
                    "peers disable NAME", "peers enable NAME", "peers rotate NAME [--key KEY]", "rules add SCOPE PATTERN",
                    "rules delete ID", "reports [--open]", "reports handle REPORT-ID", "reports dismiss REPORT-ID",
                    "outbox [--state S] [--destination D]"):
        assert command in out, command
    assert "exit status" in out
    rc, out, _ = ctl("help", "trace", token=None)
    assert rc == 0 and "usage: causewayctl trace MESSAGE-ID" in out and "/admin/v1/messages/" in out
    rc, out, _ = ctl("token", "create", "--help", token=None)
    assert rc == 0 and "--role admin|viewer" in out
    for args, why in ((["frobnicate"], "no command 'frobnicate'"),
                      ([], "no command given"),
                      (["trace"], "usage: causewayctl trace MESSAGE-ID"),
                      (["users", "extra"], "usage: causewayctl users"),
                      (["rules", "extra"], "rules has no subcommand 'extra' (it has add, delete)"),
                      (["peers", "extra"], "peers has no subcommand 'extra' (it has add, disable, enable, rotate)"),
                      (["peers", "add", "x", "x.example"], "peers add needs --key"),
                      (["token"], "token needs a subcommand: list, create, revoke"),
                      (["deadletters", "resend", "3"], "no subcommand 'resend'"),
                      (["peers", "--role", "viewer"], "peers takes no --role"),
                      (["token", "create", "x", "--role", "root"], "--role takes admin or viewer"),
                      (["audit", "--limit", "0"], "--limit takes a number"),
                      (["rules", "--after", "-5"], "--after takes a row id"),
                      # digits alone, as a row id (until the forty-second session
                      # strtoll took a sign and leading blanks here: --limit +5 was 5)
                      (["audit", "--limit", "+5"], "--limit takes a number"),
                      (["rules", "--after", " 5"], "--after takes a row id"),
                      (["rules", "add", "domain", "x.example", "--mode", "deny", "--expires-in", "+60"],
                       "--expires-in takes a number"),
                      (["peers", "--bogus"], "unknown option '--bogus'"),
                      (["peers", "--url"], "--url needs a value"),
                      (["help", "nothing"], "no command 'nothing'")):
        rc, out, err = ctl(*args)
        assert rc == 2 and why in err and out == "", (args, rc, out, err)
    # Nothing to connect with: said before any request.
    rc, _, err = ctl("peers", token=None)
    assert rc == 2 and "no admin token" in err
    rc, _, err = ctl("peers", "--url", "ftp://127.0.0.1/")
    assert rc == 2 and "not an http:// or https:// URL" in err
    rc, _, err = ctl("deadletters", "replay", "twelve", url="http://127.0.0.1:1")
    assert rc == 2 and "not an outbox row id" in err


def test_a_settings_or_token_file_that_is_a_directory_is_refused(tmp_path):
    """libinih reads a directory as an empty file: --config naming one was
    ignored without a word, and a token file that is one was said to hold
    no token (until the forty-first session)."""
    d = tmp_path / "causeway"
    d.mkdir()
    rc, out, err = ctl("peers", "--config", str(d), url="http://127.0.0.1:1")
    assert rc == 2 and out == "" and f"cannot read {d}: Is a directory" in err, (rc, err)
    rc, out, err = ctl("peers", "--token-file", str(d), url="http://127.0.0.1:1", token=None)
    assert rc == 2 and out == "" and f"cannot read the token file {d}: Is a directory" in err, (rc, err)


def test_unreachable_daemon_exits_3():
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    rc, out, err = ctl("peers", url=url)
    assert rc == 3 and out == ""
    assert err == f"causewayctl: cannot reach {url}: Couldn't connect to server\n"
    rc, _, err = ctl("status", "--url", url)
    assert rc == 3 and f"cannot reach {url}" in err
    # A password in the URL is not repeated in the message.
    rc, _, err = ctl("peers", "--url", f"http://ops:hunter2@127.0.0.1:{port}/")
    assert rc == 3 and "hunter2" not in err and f"cannot reach http://127.0.0.1:{port}:" in err


def test_a_token_sent_in_clear_to_another_machine_is_warned_of():
    """Over http:// to a host not on this machine's loopback the admin token
    crosses the network in clear: said on stderr, once, before the request
    (until the forty-first session only docs/causewayctl.md said so).
    Loopback names and https:// are not warned of."""
    warning = "the admin token crosses the network in clear; use https://"
    # .invalid never resolves (RFC 6761): the warning, then "cannot reach".
    rc, out, err = ctl("peers", url="http://causeway-ctl-test.invalid:1")
    assert rc == 3 and out == "", (rc, err)
    assert err.count(warning) == 1 and err.index(warning) < err.index("cannot reach"), err
    assert "http://causeway-ctl-test.invalid:1 is http:// to another machine" in err
    rc, _, err = ctl("peers", url="https://causeway-ctl-test.invalid:1")
    assert rc == 3 and warning not in err, err
    port = free_port()  # nothing listens there
    for host in ("127.0.0.1", "127.3.2.1", "localhost", "LocalHost", "ctl.localhost", "[::1]"):
        rc, _, err = ctl("peers", url=f"http://{host}:{port}")
        assert rc == 3 and warning not in err and "cannot reach" in err, (host, err)


def test_wrong_token_exits_1_naming_401(daemon):
    rc, out, err = ctl("peers", url=daemon.url, token="cwa_wrong")
    assert rc == 1 and out == ""
    assert err == "causewayctl: 401 unauthenticated: a valid admin bearer token is required\n"
    assert "cwa_wrong" not in err
    # With --json the problem document comes on stdout too, for scripts.
    rc, out, err = ctl("--json", "rules", url=daemon.url, token="cwa_wrong")
    assert rc == 1 and json.loads(out)["code"] == "unauthenticated" and "401" in err
    # A token with a line break cannot smuggle a header in: refused before sending.
    rc, _, err = ctl("peers", url=daemon.url, token="cwa_x\r\nX-Evil: 1")
    assert rc == 2 and "token has characters" in err


# ------------------------------------------------------------ the lists

def test_peers_table_and_json(world):
    out = ok("peers", url=world.url)
    rows = cells(out)
    assert out.splitlines()[0].split()[:3] == ["NAME", "DOMAIN", "MODE"]
    assert [r[:4] for r in rows] == [["gk", "wa.example", "push", "yes"], ["tg", "tg.example", "push", "yes"]]
    got = json.loads(ok("peers", "--json", url=world.url))
    assert got == world.d.admin("GET", "/peers").json()
    assert all("token" not in p for p in got["peers"])


def test_a_push_url_nothing_is_pushed_to_is_said_under_the_table(world, pg, db_url):
    """A push_url stored before the admin API checked it (here one with a
    user and password), to which nothing is pushed and whose rows wait
    untried: GET /admin/v1/peers' push_url_problem is said, whole (a table
    cell is clipped), under the table, for that peer only; a good one
    given, nothing is.  Until the fiftieth session's review causewayctl
    peers showed such a peer as it showed any other."""
    pg.psql(f"UPDATE peers SET push_url = 'http://u:pw@127.0.0.1:{world.sb.port}/in' WHERE name = 'gk'", db_url)
    pg.psql(f"UPDATE peers SET push_url = 'http://127.0.0.1:{world.sb.port}/caf\u00e9' WHERE name = 'tg'", db_url)
    problem = {p["name"]: p["push_url_problem"] for p in world.d.admin("GET", "/peers").json()["peers"]}
    assert problem["gk"].startswith("push_url has a user or password"), problem
    assert problem["tg"].startswith("push_url has a byte that is not printable ASCII") and len(problem["tg"]) > 64
    out = ok("peers", url=world.url)
    table, _, said = out.partition("\n\n")
    assert [r[:4] for r in cells(table)] == [["gk", "wa.example", "push", "yes"], ["tg", "tg.example", "push", "yes"]]
    assert said == "\n".join(f"peer '{n}': push URL problem: {problem[n]}\n  nothing is pushed to it; its rows wait, "
                             f"untried, until a good push_url is given (PATCH /admin/v1/peers/{n})\n"
                             for n in ("gk", "tg")), out
    assert ":pw@" not in out
    assert json.loads(ok("peers", "--json", url=world.url)) == world.d.admin("GET", "/peers").json()
    for n in ("gk", "tg"):
        assert world.d.admin("PATCH", f"/peers/{n}", json={"push_url": world.sb.url}).status_code == 200
    out = ok("peers", url=world.url)
    assert "push URL problem" not in out and "\n\n" not in out, out


def test_status_counts_the_push_urls_nothing_is_pushed_to(world, pg, db_url):
    """GET /admin/v1/adapters counts the push peers whose stored push_url
    nothing is pushed to (push_url_problem in GET /admin/v1/peers), and
    names them; causewayctl status says so on its peers line.  Until the
    fifty-second session only causewayctl peers said it: status showed
    such a daemon as a healthy one."""
    def peers_line():
        out = ok("status", url=world.url)
        return next(x for x in out.splitlines() if x.startswith("peers ")), out

    line, _ = peers_line()
    assert "push URL problem" not in line, line
    assert world.d.admin("GET", "/adapters").json()["peer"]["push_url_problems"] == 0
    pg.psql(f"UPDATE peers SET push_url = 'http://u:pw@127.0.0.1:{world.sb.port}/in' WHERE name = 'gk'", db_url)
    peer = world.d.admin("GET", "/adapters").json()["peer"]
    assert peer["push_url_problems"] == 1 and peer["push_url_problem_peers"] == ["gk"], peer
    line, out = peers_line()
    assert line.endswith(", 1 push URL problem (gk: causewayctl peers)"), out
    pg.psql(f"UPDATE peers SET push_url = 'http://127.0.0.1:{world.sb.port}/caf\u00e9' WHERE name = 'tg'", db_url)
    line, out = peers_line()
    assert line.endswith(", 2 push URL problems (gk, tg: causewayctl peers)"), out
    assert ":pw@" not in out
    # A disabled push peer's is counted too (as GET /admin/v1/peers says it).
    pg.psql("UPDATE peers SET enabled = false, disabled_at = now() WHERE name = 'tg'", db_url)
    assert world.d.admin("GET", "/adapters").json()["peer"]["push_url_problems"] == 2
    pg.psql("UPDATE peers SET enabled = true, disabled_at = NULL WHERE name = 'tg'", db_url)
    for n in ("gk", "tg"):
        assert world.d.admin("PATCH", f"/peers/{n}", json={"push_url": world.sb.url}).status_code == 200
    line, out = peers_line()
    assert "push URL problem" not in line, out
    assert world.d.admin("GET", "/adapters").json()["peer"] == dict(peer, push_url_problems=0,
                                                                    push_url_problem_peers=[])


def test_a_push_url_problem_cannot_drive_the_terminal():
    """push_url_problem is the API's text as any other: its controls are
    '?' for each byte, the name's as well, and it is not clipped."""
    peer = {"name": "p\u202eq", "domain": "p.example", "mode": "push", "enabled": True,
            "push_url": "https://********@p.example/", "event_types": None, "created_at": "2026-12-01T00:00:00.000Z",
            "push_url_problem": "push_url has \x1b[2J and \u009b31m " + "x" * 200}
    s = StandIn({"/admin/v1/peers": doc({"peers": [peer, dict(peer, name="ok", push_url_problem=None)]})})
    try:
        out = ok("peers", url=s.url)
        for c in ("\x1b", "\u009b", "\u202e"):
            assert c not in out, (c, out)
        assert ("\npeer 'p???q': push URL problem: push_url has ?[2J and ??31m " + "x" * 200 + "\n") in out, out
        assert out.count("push URL problem") == 1, out
    finally:
        s.close()


def test_rules_users_held_tables_and_json(world, pg, db_url):
    out = ok("rules", url=world.url)
    [row] = cells(out)
    assert row[:4] == [str(world.rule["id"]), "domain", "spam.example", "deny"] and row[-1] == "abuse wave"
    assert json.loads(ok("--json", "rules", url=world.url)) == world.d.admin("GET", "/rules").json()

    # A consent of a domain no peer has (stored before the forty-first
    # session: the API refuses one now) is marked: it matches no one.
    r = world.d.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "domain", "subject": "tg.example",
                                                 "state": "blocked"})
    assert r.status_code == 200, r.text
    pg.psql("INSERT INTO consents (local_identity_id, subject_kind, subject, state, source) SELECT id, 'domain', "
            f"'nowhere.example', 'blocked', 'admin' FROM identities WHERE uri = '{ALICE}'", db_url)
    out = ok("users", url=world.url)
    [row] = [r for r in cells(out) if ALICE in r]
    assert "peer:gk:in" in row and row[-2:] == ["1", "1"]  # one held message, one pending request
    assert "nowhere.example blocked (no peer), tg.example blocked" in row, row
    assert json.loads(ok("users", "--json", url=world.url)) == world.d.admin("GET", "/users").json()

    out = ok("held", url=world.url)
    [row] = cells(out)
    assert row[1:5] == [world.held, ALICE, world.a.user("wally"), "message"]
    api = world.d.admin("GET", "/held").json()
    assert json.loads(ok("held", "--json", url=world.url)) == api and len(api["rows"]) == 1


def test_deadletters_and_the_trace(world):
    out = ok("deadletters", url=world.url)
    [row] = cells(out)
    dead = world.d.admin("GET", "/outbox?state=dead").json()
    assert row[:5] == [str(dead["rows"][0]["id"]), world.dead, "peer:tg", "-", "2"]
    assert "answered 503" in row[-1]
    assert json.loads(ok("deadletters", "--json", url=world.url)) == dead

    # The trace of the dead letter: origin, no policy decision, each attempt.
    out = ok("trace", world.dead, url=world.url)
    assert re.search(rf"^message\s+{world.dead}$", out, re.M)
    assert re.search(rf"^room\s+{world.room}$", out, re.M)
    assert re.search(r"^origin\s+peer:gk", out, re.M)
    assert "none recorded" in out
    assert re.search(r"#\d+\s+to peer:tg", out) and "state dead after 2 attempt(s); verdict allow" in out
    tries = [line.split() for line in out.splitlines() if re.match(r"\s+[12]\s+\d{4}-", line)]
    assert [t[0] for t in tries] == ["1", "2"] and all(t[5:7] == ["no", "503"] for t in tries), out
    api = world.d.admin("GET", f"/messages/{world.dead}").json()
    assert json.loads(ok("trace", "--json", world.dead, url=world.url)) == api

    # The held message: the decision with its reason, and the delivery waiting.
    out = ok("trace", world.held, url=world.url)
    assert re.search(rf"hold\s+no_consent_yet\s+-\s+{re.escape(ALICE)}", out), out
    assert f"to local, for {ALICE}" in out and "state held" in out

    rc, out, err = ctl("trace", "msg_nothere", url=world.url)
    assert rc == 1 and out == "" and err == "causewayctl: 404 not_found: no message with that id\n"


def test_replay_and_discard(world):
    [row] = world.d.admin("GET", "/outbox?state=dead").json()["rows"]
    rid = str(row["id"])
    # The peer is back: the dead letter is sent again, and arrives.
    world.sb.fail_next = 0
    out = ok("deadletters", "replay", rid, url=world.url)
    assert out == f"outbox row {rid}: pending (it will be sent again)\n"
    assert [e["id"] for e in world.sb.wait_events(1)] == [world.dead]
    wait_until(lambda: world.d.admin("GET", f"/messages/{world.dead}").json()["deliveries"][0]["state"]
               == "delivered", what="the replayed letter delivered")
    assert "no dead letters" in ok("deadletters", url=world.url)
    err = refused("deadletters", "replay", rid, url=world.url)
    assert err == "causewayctl: 409 conflict: only a dead letter can be replayed; this row is delivered\n"
    # A second dead letter, given up on.
    world.sb.fail_next = 1000
    msg = world.a.send(world.room, world.a.user("alice"), "again down").json()["id"]
    row = wait_until(lambda: (world.d.admin("GET", "/outbox?state=dead").json()["rows"] or [None])[0],
                     what="a second dead letter")
    assert row["message"] == msg
    got = json.loads(ok("--json", "deadletters", "discard", str(row["id"]), url=world.url))
    assert got == {"id": row["id"], "state": "dropped"}
    assert "discarded by admin:config" in ok("trace", msg, url=world.url)
    err = refused("deadletters", "discard", str(row["id"]), url=world.url)
    assert "409 conflict" in err and "dropped" in err
    assert "404 not_found" in refused("deadletters", "discard", "999999", url=world.url)
    out = ok("audit", "--action", "outbox.", url=world.url)
    assert [r[3] for r in cells(out)] == ["outbox.replay", "outbox.discard"]


def test_audit_filters_and_paging(world, pg, db_url):
    # 600 records: more than the API's largest page (500).
    pg.psql("INSERT INTO audit_log (actor, action, subject, details) SELECT 'test:bulk', 'test.bulk', 's' || g, "
            "jsonb_build_object('n', g) FROM generate_series(1, 600) g", db_url)
    ids = [int(x) for x in pg.psql("SELECT id FROM audit_log WHERE action = 'test.bulk' ORDER BY id",
                                   db_url).split()]
    got = json.loads(ok("--json", "audit", "--action", "test.bulk", url=world.url))
    assert [r["id"] for r in got["rows"]] == ids and got["next_after"] is None
    first = world.d.admin("GET", "/audit?action=test.bulk&limit=500").json()
    assert got["rows"][:500] == first["rows"]
    # --limit stops part-way; next_after says where to go on, and --after does.
    got = json.loads(ok("--json", "audit", "--action", "test.bulk", "--limit", "550", url=world.url))
    assert [r["id"] for r in got["rows"]] == ids[:550] and got["next_after"] == ids[549]
    got = json.loads(ok("--json", "audit", "--action", "test.bulk", "--after", str(ids[549]), url=world.url))
    assert [r["id"] for r in got["rows"]] == ids[550:] and got["next_after"] is None
    rows = cells(ok("audit", "--action", "test.bulk", "--limit", "3", url=world.url))
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [(str(i), "test:bulk", "test.bulk", f"s{n}")
                                                        for n, i in enumerate(ids[:3], 1)]
    # The other filters.
    rows = cells(ok("audit", "--message", world.held, url=world.url))
    assert [(r[2], r[3], r[5], r[6]) for r in rows] == [("policy", "policy.hold", "no_consent_yet", world.held)]
    rows = cells(ok("audit", "--actor", "admin:config", "--action", "peer.create", url=world.url))
    assert [r[4] for r in rows] == ["gk", "tg"]
    assert "no audit records" in ok("audit", "--actor", "nobody", url=world.url)
    err = refused("audit", "--message", "not-a-message", url=world.url)
    assert err == "causewayctl: 400 invalid_query: message must be a message id (msg_...)\n"


# ------------------------------------------------------------ tokens and roles

def test_tokens_created_used_refused_and_revoked(world, pg, db_url):
    out = ok("token", "create", "night-shift", "--role", "viewer", url=world.url)
    m = re.search(r"^\s+(cwa_\S+)$", out, re.M)
    assert m and "role viewer" in out and "shown only this once" in out, out
    viewer = m.group(1)
    r = world.d.request("GET", "/admin/v1/whoami", headers={"Authorization": f"Bearer {viewer}"})
    assert r.json() == {"name": "night-shift", "role": "viewer"}
    # The list names it and never shows a token.
    out = ok("token", "list", url=world.url)
    [row] = cells(out)
    assert row[1:3] == ["night-shift", "viewer"] and viewer not in out
    assert json.loads(ok("--json", "token", "list", url=world.url)) == world.d.admin("GET", "/tokens").json()
    # A viewer reads, and is refused a change with a clear reason.
    assert "tg.example" in ok("peers", url=world.url, token=viewer)
    [row] = world.d.admin("GET", "/outbox?state=dead").json()["rows"]
    rc, out, err = ctl("deadletters", "replay", str(row["id"]), url=world.url, token=viewer)
    assert rc == 1 and out == ""
    assert err == "causewayctl: 403 forbidden: this token has the viewer role: it may read, not change\n"
    assert world.d.admin("GET", "/outbox?state=dead").json()["rows"] == [row]  # nothing was done
    # --json: the API's answer with the token, once.
    made = json.loads(ok("--json", "token", "create", "robot", url=world.url))
    assert made["name"] == "robot" and made["role"] == "admin" and made["token"].startswith("cwa_")
    assert "409 conflict: a token with that name exists" in refused("token", "create", "robot", url=world.url)
    # Revoked: that token is refused at once, by the API and so by causewayctl.
    out = ok("token", "revoke", "night-shift", url=world.url)
    assert out.startswith("Revoked the token 'night-shift'")
    r = world.d.request("GET", "/admin/v1/whoami", headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 401
    err = refused("peers", url=world.url, token=viewer)
    assert err == "causewayctl: 401 unauthenticated: a valid admin bearer token is required\n"
    rows = {r[1]: r for r in cells(ok("token", "list", url=world.url))}
    assert rows["night-shift"][-1] != "-" and rows["robot"][-1] == "-"
    assert "404 not_found: no token with that name" in refused("token", "revoke", "nobody", url=world.url)
    assert pg.psql("SELECT string_agg(action || ' ' || subject, ',' ORDER BY id) FROM audit_log "
                   "WHERE action LIKE 'token.%'", db_url) == \
        "token.create night-shift,token.create robot,token.revoke night-shift"


def test_peers_added_switched_and_rotated(daemon, pg, db_url):
    """peers add / disable / enable / rotate: what the console and the API
    do, from the command line; the peer's token printed once, and working."""
    signer = Signer("gk")
    out = ok("peers", "add", "gk", "wa.example", "--key", signer.public_b64, "--pull", url=daemon.url)
    m = re.search(r"^\s+(cwp_\S+)$", out, re.M)
    assert m and out.startswith("Made the peer 'gk' (wa.example, pull)") and "shown only this once" in out, out
    gk = PeerClient(daemon.url, "gk", "wa.example", token=m.group(1), signer=signer)
    assert gk.call("GET", "/v1/events?after=0&wait=0").status_code == 200
    [row] = cells(ok("peers", url=daemon.url))
    assert row[:4] == ["gk", "wa.example", "pull", "yes"]
    # Disabled: its requests are refused; enabled: taken again.
    out = ok("peers", "disable", "gk", url=daemon.url)
    assert out.startswith("The peer 'gk' is disabled (since ") and "refused (401)" in out, out
    assert gk.call("GET", "/v1/events?after=0&wait=0").status_code == 401
    assert ok("peers", "enable", "gk", url=daemon.url).startswith("The peer 'gk' is enabled")
    assert gk.call("GET", "/v1/events?after=0&wait=0").status_code == 200
    # Rotated, with a new key: the old token and key are refused, the new ones taken.
    signer2 = Signer("gk")
    out = ok("peers", "rotate", "gk", "--key", signer2.public_b64, url=daemon.url)
    assert out.startswith("Rotated the token and key of the peer 'gk'"), out
    token2 = re.search(r"^\s+(cwp_\S+)$", out, re.M).group(1)
    assert gk.call("GET", "/v1/events?after=0&wait=0").status_code == 401
    gk2 = PeerClient(daemon.url, "gk", "wa.example", token=token2, signer=signer2)
    assert gk2.call("GET", "/v1/events?after=0&wait=0").status_code == 200
    # A push peer with its event types; --json is the API's answer, with the token.
    made = json.loads(ok("--json", "peers", "add", "tg", "tg.example", "--key", Signer("tg").public_b64,
                         "--push-url", "https://interop.tg.example", "--event-types", "message,edit",
                         url=daemon.url))
    assert made["mode"] == "push" and made["push_url"] == "https://interop.tg.example"
    assert made["event_types"] == ["message", "edit"] and made["token"].startswith("cwp_")
    # Refusals: the API's reason, exit 1, nothing stored; usage errors, exit 2, nothing asked.
    before = pg.psql("SELECT count(*) FROM peers", db_url)
    assert "400 invalid_body: public_key" in refused("peers", "add", "x", "x.example", "--key", "AAAA", "--pull",
                                                     url=daemon.url)
    assert "409 conflict" in refused("peers", "add", "gk", "gk.example", "--key", signer.public_b64, "--pull",
                                     url=daemon.url)
    assert "404 not_found: no peer of that name" in refused("peers", "rotate", "nobody", url=daemon.url)
    for args, says in [((), "needs --key"),
                       (("--key", signer.public_b64), "either --push-url URL"),
                       (("--key", signer.public_b64, "--pull", "--push-url", "https://a.example"), "not both"),
                       (("--key", signer.public_b64, "--pull", "--event-types", "message,"), "--event-types takes"),
                       (("--key", signer.public_b64, "--pull", "--event-types", ""), "--event-types takes")]:
        rc, out, err = ctl("peers", "add", "x", "x.example", *args, url=daemon.url)
        assert rc == 2 and out == "" and says in err, (args, rc, err)
    rc, _, err = ctl("peers", "disable", "gk", "--key", "k", url=daemon.url)
    assert rc == 2 and "peers disable takes no --key" in err
    rc, _, err = ctl("rules", "--pull", url=daemon.url)
    assert rc == 2 and "rules takes no --push-url, --pull or --event-types" in err
    assert pg.psql("SELECT count(*) FROM peers", db_url) == before
    assert pg.psql("SELECT string_agg(action || ' ' || subject, ',' ORDER BY id) FROM audit_log "
                   "WHERE action LIKE 'peer.%'", db_url) == \
        "peer.create gk,peer.disable gk,peer.enable gk,peer.rotate gk,peer.create tg"


def test_rules_added_and_deleted(daemon, pg, db_url):
    """rules add / delete: the API's rule, its checks and answers; a rule
    made so is in force (a denied domain's peer is refused a room)."""
    (a, sa), _ = push_peers(daemon)
    try:
        out = ok("rules", "add", "domain", "wa.example", "--mode", "deny", "--comment", "abuse wave",
                 url=daemon.url)
        assert out.startswith("Made the rule ") and "every daemon process applies it" in out, out
        [row] = cells("\n".join(out.splitlines()[1:]))
        assert row[1:4] == ["domain", "wa.example", "deny"] and row[-1] == "abuse wave", row
        rule = row[0]
        wait_until(lambda: a.create_room([a.user("wally"), ALICE]).status_code == 403, what="the rule in force")
        made = json.loads(ok("--json", "rules", "add", "network", "peer:tg", "--limits",
                             '{"messages_per_minute": 30}', "--expires-in", "3600", url=daemon.url))
        assert made["mode"] is None and made["limits"] == {"messages_per_minute": 30} and made["expires_at"]
        assert made == daemon.admin("GET", f"/rules/{made['id']}").json()
        # Refusals: the API's (exit 1) and usage errors (exit 2), nothing stored.
        before = pg.psql("SELECT count(*) FROM rules", db_url)
        assert "400 invalid_body: pattern" in refused("rules", "add", "domain", "BAD", "--mode", "deny",
                                                      url=daemon.url)
        assert "400 invalid_body: mode must be" in refused("rules", "add", "domain", "x.example", "--mode", "nah",
                                                           url=daemon.url)
        assert "409" in refused("rules", "add", "domain", "wa.example", "--mode", "deny", url=daemon.url)
        for args, says in [((), "needs --mode"),
                           (("--limits", "[1]"), "--limits takes a JSON object"),
                           (("--limits", "{"), "--limits takes a JSON object"),
                           (("--mode", "deny", "--expires-in", "0"), "--expires-in takes a number"),
                           (("--mode", "deny", "--pull"), "rules add takes no --push-url")]:
            rc, out, err = ctl("rules", "add", "domain", "x.example", *args, url=daemon.url)
            assert rc == 2 and out == "" and says in err, (args, rc, err)
        assert pg.psql("SELECT count(*) FROM rules", db_url) == before
        # Deleted: gone, and no longer in force.
        out = ok("rules", "delete", rule, url=daemon.url)
        assert out.startswith(f"Deleted the rule {rule} (domain wa.example)"), out
        wait_until(lambda: a.create_room([a.user("wally"), ALICE]).status_code == 201, what="the rule gone")
        assert "404 not_found: no rule with that id" in refused("rules", "delete", rule, url=daemon.url)
        for bad in ("x1", "+1", "0", ""):
            rc, _, err = ctl("rules", "delete", bad, url=daemon.url)
            assert rc == 2 and "is not a rule id" in err, (bad, err)
        rc, _, err = ctl("rules", "delete", "1", "--mode", "deny", url=daemon.url)
        assert rc == 2 and "rules delete takes no --mode" in err
        assert pg.psql("SELECT string_agg(action, ',' ORDER BY id) FROM audit_log WHERE action LIKE 'rule.%'",
                       db_url) == "rule.create,rule.create,rule.delete"
    finally:
        sa.close()


# ------------------------------------------------------------ status

def test_status_summarizes_what_answers(world):
    adapters = world.d.admin("GET", "/adapters")
    stats = world.d.admin("GET", "/stats")
    rc, out, err = ctl("status", url=world.url)
    assert re.search(rf"^daemon\s+{world.url}: ready$", out, re.M), out
    assert re.search(r"^database\s+up, [\d.]+ ms$", out, re.M)
    assert re.search(r"^migrations\s+current \((\d+) of \1 applied\)$", out, re.M)
    # Each admin part is shown if the API gives it, else named with the API's reason.
    refusals = []
    for key, r in (("adapters", adapters), ("stats", stats)):
        if r.status_code == 200:
            continue
        p = r.json()
        reason = f"{r.status_code} {p['code']}: {p['detail']}"
        assert re.search(rf"^{key}\s+not shown: {re.escape(reason)}$", out, re.M), out
        refusals.append(reason)
    if adapters.status_code == 200:
        a = adapters.json()
        assert re.search(rf"^dispatcher\s+{a['dispatcher']['status']}$", out, re.M)
        assert re.search(rf"^peers\s+{a['peer']['peers']} \({a['peer']['enabled']} enabled\)", out, re.M)
    if stats.status_code == 200:
        q = stats.json()["queue"]
        assert re.search(rf"^queue\s+{q['pending']} pending, {q['in_flight']} in flight, {q['held']} held, "
                         rf"{q['dead']} dead", out, re.M), out
    assert rc == (1 if refusals else 0), (rc, err)
    assert all(x in err for x in refusals)
    # --json: the three answers as the API gave them.
    rc2, out, _ = ctl("--json", "status", url=world.url)
    got = json.loads(out)
    ready = world.d.get("/readyz").json()
    for x in (ready, got["ready"]):  # the one member that differs between two calls
        assert isinstance(x["database"].pop("latency_ms"), (int, float))
    assert rc2 == rc and got["ready"] == ready and ready["status"] == "ready"
    for key, r in (("adapters", adapters), ("stats", stats)):
        if r.status_code == 200:  # live numbers: the same members
            assert set(got[key]) == set(r.json()), key
        else:  # the problem document as the API gave it
            assert got[key] == r.json(), key
    # A wrong token: readiness still shows (it needs none); the refusal is said once.
    rc, out, err = ctl("status", url=world.url, token="cwa_wrong")
    assert rc == 1 and re.search(r"^daemon\s+.*: ready$", out, re.M)
    assert err == "causewayctl: 401 unauthenticated: a valid admin bearer token is required\n"


def test_status_shows_a_policy_that_does_not_reload(daemon, pg, db_url):
    """A process whose reloads of the rules have failed for 5 s reports its
    policy "stale" in /readyz and /admin/v1/adapters (docs/operations.md,
    "A policy that does not reload"); status shows it with the failure's
    detail, and, as the adapters' health, does not make the exit status 1:
    the daemon is ready and goes on with the rules in force.  Until the
    fortieth session status did not show the policy at all."""
    def line(out):
        [m] = re.findall(r"^policy\s+(.*)$", out, re.M)
        return m

    def state():
        return daemon.get("/readyz").json()["policy"]

    version = state()["version"]
    assert line(ok("status", url=daemon.url)) == f"current (version {version})"
    pg.psql("ALTER TABLE rules RENAME COLUMN limits TO limits_gone", db_url)
    try:
        pg.psql("NOTIFY causeway_policy", db_url)
        wait_until(lambda: state()["status"] == "stale", timeout=30, what="the policy reported stale")
        rc, out, err = ctl("status", url=daemon.url)
        assert rc == 0 and err == "", (rc, out, err)
        m = re.fullmatch(rf"stale for (\d+) s \(version {version} in force\): (.*)", line(out))
        assert m and int(m.group(1)) >= 5 and "limits" in m.group(2), out
        assert re.search(rf"^daemon\s+{daemon.url}: ready$", out, re.M), out
        rc, out, _ = ctl("--json", "status", url=daemon.url)
        got = json.loads(out)
        assert rc == 0 and got["ready"]["policy"]["status"] == got["adapters"]["policy"]["status"] == "stale"
    finally:
        pg.psql("ALTER TABLE rules RENAME COLUMN limits_gone TO limits", db_url)
    pg.psql("NOTIFY causeway_policy", db_url)
    wait_until(lambda: state()["status"] == "current", what="the policy current again")
    assert line(ok("status", url=daemon.url)) == f"current (version {state()['version']})"


# ------------------------------------------------------------ settings

def test_flags_beat_environment_beat_file(daemon, tmp_path):
    home = tmp_path / "home"
    conf_dir = home / ".config" / "causeway"
    conf_dir.mkdir(parents=True)
    dead_url = f"http://127.0.0.1:{free_port()}"
    conf = conf_dir / "causewayctl.ini"

    def write(text):
        conf.write_text(text)
        conf.chmod(0o600)

    # The default file alone gives both.
    write(f"[causewayctl]\nurl = {daemon.url}\ntoken = {ADMIN_TOKEN}\n")
    assert "no peers" in ok("peers", token=None, home=str(home))
    # XDG_CONFIG_HOME wins over ~/.config.
    xdg = tmp_path / "xdg"
    (xdg / "causeway").mkdir(parents=True)
    (xdg / "causeway" / "causewayctl.ini").write_text(f"[causewayctl]\nurl = {dead_url}\n")
    rc, _, err = ctl("peers", token=None, home=str(home), env={"XDG_CONFIG_HOME": str(xdg)})
    assert rc == 2 and "no admin token" in err and str(xdg) in err
    # The environment beats the file: URL and token each.
    write(f"[causewayctl]\nurl = {dead_url}\ntoken = cwa_from-the-file\n")
    assert "no peers" in ok("peers", url=daemon.url, home=str(home))
    rc, _, err = ctl("peers", token=None, home=str(home))
    assert rc == 3 and dead_url in err
    # Flags beat the environment.
    rc, _, err = ctl("peers", "--url", dead_url, url=daemon.url, home=str(home))
    assert rc == 3 and dead_url in err
    err = refused("peers", "--token", "cwa_from-the-flag", url=daemon.url, home=str(home))
    assert "401 unauthenticated" in err and "cwa_from-the-flag" not in err
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o600)
    assert "no peers" in ok("peers", "--token-file", str(token_file), url=daemon.url,
                            env={"CAUSEWAY_ADMIN_TOKEN": "cwa_from-the-env"})
    rc, _, err = ctl("peers", "--token-file", str(token_file), "--token", "x", url=daemon.url)
    assert rc == 2 and "keep one" in err
    # --config names another file; token_file there; a shared token file is warned about.
    other = tmp_path / "other.ini"
    other.write_text(f"; the night shift's settings\n[causewayctl]\nurl = {daemon.url}\n"
                     f"token_file = {token_file}\n")
    assert "no peers" in ok("peers", "--config", str(other), token=None, home=str(home))
    token_file.chmod(0o644)
    rc, out, err = ctl("peers", "--config", str(other), token=None)
    assert rc == 0 and "no peers" in out and f"warning: {token_file} holds a token" in err
    # A missing or wrong file is a usage error that says where.
    rc, _, err = ctl("peers", "--config", str(tmp_path / "missing.ini"))
    assert rc == 2 and "missing.ini" in err
    # A relative token_file is the settings file's neighbour, not one of the
    # working directory, which may be anyone's (until the forty-fifth
    # session's review it was looked for there).
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "admin-token").chmod(0o600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "admin-token").write_text("cwa_of-the-working-directory\n")
    other.write_text(f"[causewayctl]\nurl = {daemon.url}\ntoken_file = admin-token\n")
    assert "no peers" in ok("peers", "--config", str(other), token=None, cwd=str(elsewhere))
    other.write_text("[causewayctl]\nurl = http://x\ntoekn = y\n")
    rc, _, err = ctl("peers", "--config", str(other))
    assert rc == 2 and f"{other}:3: unknown setting 'toekn'" in err


def test_a_settings_file_is_read_as_written_or_refused(tmp_path):
    """The settings file is read as the daemon reads its configuration
    (gateway/ini_lines.c).  A url (or token) set twice: which was meant is
    a guess, and until the forty-seventh session's review the last one won,
    the token going to the url pasted below.  A setting after
    "[causewayctl]" on its line was dropped by libinih (the default URL
    stayed), a line past libinih's 200 bytes was read as two, and an
    indented line as more of the setting above.  Refused, exit 2, nothing
    asked; an indented line is a line like any other."""
    mute = Mute()
    try:
        f = tmp_path / "ctl.ini"
        long_path = "/" + "d" * 230 + "/admin-token"
        for text, line, what in (
                (f"[causewayctl]\nurl = http://127.0.0.1:1\nurl = {mute.url}\n", 3, "'url' is set twice; keep one"),
                (f"[causewayctl]\nurl = {mute.url}\ntoken = a\n[causewayctl]\ntoken = b\n", 5,
                 "'token' is set twice; keep one"),
                (f"[causewayctl] url = {mute.url}\n", 1, "text after the section's ']'"),
                (f"[causewayctl]\nurl = {mute.url}\ntoken_file = {long_path}\n", 3,
                 "the line is longer than the INI parser (libinih) reads"),
                (f"[causewayctl]\nurl = {mute.url} ;x\n", 2, "';' after a space starts a comment here"),
                # was "the line is longer than ...", for the string ended at the first NUL
                (f"[causewayctl]\nurl = {mute.url}\n".encode("utf-16"), 1,
                 "the line holds a NUL byte: is the file UTF-16? save it as UTF-8")):
            f.write_bytes(text if isinstance(text, bytes) else text.encode())
            f.chmod(0o600)
            rc, out, err = ctl("peers", "--config", str(f), token=None)
            assert rc == 2 and out == "", (text, rc, err)
            assert f"{f}:{line}: {what}" in err, (text, err)
        assert mute.requests == []
        # Indented, a setting is one of its own (it was the url's value).
        (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
        (tmp_path / "admin-token").chmod(0o600)
        f.write_text(f"[causewayctl]\n  url = {mute.url}\n  token_file = admin-token\n")
        rc, out, err = ctl("peers", "--config", str(f), token=None)
        assert rc == 3 and mute.requests and mute.requests[-1].startswith("GET /admin/v1/peers"), (rc, err)
    finally:
        mute.close()


# ------------------------------------------------------------ against a stand-in

class StandIn:
    """An HTTP server answering fixed documents per path, recording each
    request: for what the real daemon cannot show yet (the documented shapes
    of /admin/v1/adapters and /stats) or will not do (answer too much)."""

    def __init__(self, routes):
        # path -> (status, body bytes, send Content-Length[, headers]), or a
        # list of them answered in turn, the last one from then on
        self.routes = routes
        self.seen = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                outer.seen.append((u.path, urllib.parse.parse_qs(u.query), dict(self.headers)))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                route = outer.routes.get(u.path, (404, b"", True))
                if isinstance(route, list):
                    route = route.pop(0) if len(route) > 1 else route[0]
                status, body, length, *headers = route
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in (headers[0] if headers else {}).items():
                    self.send_header(name, value)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()  # without a length: the body ends with the connection (HTTP/1.0)
                try:
                    self.wfile.write(body)
                except OSError:  # the client stopped reading, as it should
                    pass

            do_POST = do_DELETE = do_GET

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() is seen every poll_interval: 0.5 s by default, a
        # quarter of a second on average in each close()
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def doc(obj):
    return (200, json.dumps(obj).encode(), True)


READY = {"status": "ready", "database": {"status": "up", "latency_ms": 0.42},
         "migrations": {"status": "current", "applied": 4, "expected": 4},
         "adapters": {"matrix": {"homeserver": "http://hs.example", "ping": "ok", "last_error": ""},
                      "xmpp": {"server": "xmpp.example", "port": 5347, "components": {
                          "x.example.org": {"state": "up", "peer": "xmpp.example", "last_error": "",
                                            "connected_since_ms": 1, "queued": 0, "stanzas_in": 5,
                                            "stanzas_out": 6}}}}}
ADAPTERS = {"dispatcher": {"status": "up"}, "peer": {"peers": 2, "enabled": 1, "pending": 4, "dead": 1},
            "matrix": READY["adapters"]["matrix"], "xmpp": READY["adapters"]["xmpp"]}
STATS = {"window_s": 3600, "now": "2026-11-29T06:02:00Z",
         "throughput": [{"minute": "2026-11-29T06:01:00Z", "adapter": "peer", "direction": "in", "count": 42}],
         "totals": [{"adapter": "peer", "direction": "in", "count": 4200},
                    {"adapter": "matrix", "direction": "out", "count": 4100}],
         "queue": {"pending": 0, "in_flight": 2, "held": 3, "dead": 1, "failed": 0},
         "latency_ms": {"p50": 8.1, "p90": 12.0, "p99": 30.5, "count": 4100},
         "decisions": [{"verdict": "deny", "reason": "rule_deny", "count": 7}]}



def test_status_shows_a_policy_degraded_by_a_setting_it_cannot_read(daemon, pg, db_url):
    """A policy.default_mode SQL wrote that the load cannot read keeps the
    mode in force before it (docs/policy.md, "Rows the load cannot
    read"): /readyz says "degraded" with why, and status shows it so (it
    printed the JSON of an unknown status), exit status 0."""
    def line(out):
        [m] = re.findall(r"^policy\s+(.*)$", out, re.M)
        return m

    def state():
        return daemon.get("/readyz").json()["policy"]
    pg.psql("UPDATE settings SET value = '\"shut\"' WHERE key = 'policy.default_mode'; NOTIFY causeway_policy",
            db_url)
    try:
        wait_until(lambda: state()["status"] == "degraded", what="the policy reported degraded")
        rc, out, err = ctl("status", url=daemon.url)
        assert rc == 0 and err == "", (rc, out, err)
        assert line(out) == (f"degraded (version {state()['version']}): policy.default_mode cannot be read "
                             "(not open, allowlist or closed): open, the mode in force before it, stays until "
                             "it is set again"), out
    finally:
        pg.psql("UPDATE settings SET value = '\"open\"' WHERE key = 'policy.default_mode'; "
                "NOTIFY causeway_policy", db_url)
    wait_until(lambda: state()["status"] == "current", what="the policy current again")


def test_status_shows_the_documented_adapters_and_stats():
    s = StandIn({"/readyz": doc(READY), "/admin/v1/adapters": doc(ADAPTERS), "/admin/v1/stats": doc(STATS)})
    try:
        out = ok("status", url=s.url)
        for line in (f"daemon       {s.url}: ready", "database     up, 0.42 ms",
                     "migrations   current (4 of 4 applied)", "matrix       http://hs.example, ping ok",
                     "xmpp         xmpp.example:5347; x.example.org up", "dispatcher   up",
                     "peers        2 (1 enabled), 4 pending, 1 dead",
                     "queue        0 pending, 2 in flight, 3 held, 1 dead, 0 failed",
                     "latency      p50 8.1 ms, p90 12 ms, p99 30.5 ms (4100 deliveries)",
                     "last hour    peer in 4200, matrix out 4100", "decisions    deny rule_deny 7"):
            assert line in out.splitlines(), (line, out)
        # The token goes to /admin/v1 only, never to the unauthenticated /readyz.
        auth = {path: h.get("Authorization") for path, _, h in s.seen}
        assert auth == {"/readyz": None, "/admin/v1/adapters": f"Bearer {ADMIN_TOKEN}",
                        "/admin/v1/stats": f"Bearer {ADMIN_TOKEN}"}
        raw = ok("--json", "status", url=s.url)
        assert json.loads(raw) == {"ready": READY, "adapters": ADAPTERS, "stats": STATS}
        assert "8.1," in raw and "0.42" in raw  # reals printed as they came, not 8.0999...
    finally:
        s.close()


def test_status_says_matrix_delivery_is_held_while_the_token_is_refused():
    """/readyz's matrix part says delivery: token_refused while the
    homeserver refuses the as_token (the rows wait, docs/operations.md):
    status says so on the matrix line (since the fifty-first session)."""
    held = dict(READY["adapters"]["matrix"], delivery="token_refused", token_refused_since_ms=1,
                last_error="401 M_UNKNOWN_TOKEN")
    ready = dict(READY, adapters=dict(READY["adapters"], matrix=held))
    s = StandIn({"/readyz": doc(ready), "/admin/v1/adapters": doc(dict(ADAPTERS, matrix=held)),
                 "/admin/v1/stats": doc(STATS)})
    try:
        out = ok("status", url=s.url)
        assert ("matrix       http://hs.example, ping ok, delivery held: the homeserver refuses the as_token, "
                "last error: 401 M_UNKNOWN_TOKEN") in out.splitlines(), out
    finally:
        s.close()


def test_filters_are_encoded_and_answers_are_capped():
    big = b'{"peers": ["' + b"x" * (17 << 20) + b'"]}'
    s = StandIn({"/admin/v1/audit": doc({"rows": [], "next_after": None}),
                 "/admin/v1/peers": (200, big, True),
                 "/admin/v1/tokens": (200, big, False),
                 "/admin/v1/users": (200, b"<html>hello</html>", True),
                 "/admin/v1/held": (502, b"<html>bad gateway</html>", True),
                 "/admin/v1/messages/msg_x": doc({
                     "message": "msg_x", "sender": "mimi://evil.example/u/\u202eevil\x1b[2J", "deliveries": [],
                     "decisions": [{"verdict": "deny", "reason": "x\u009b31m", "recipient": "a\nb"}]})})
    try:
        # What a remote network wrote cannot drive or reorder the terminal.
        out = ok("trace", "msg_x", url=s.url)
        assert "\x1b" not in out and "\u202e" not in out and "\u009b" not in out
        assert "mimi://evil.example/u/???evil?[2J" in out and "x??31m" in out and "a b" in out
        err = refused("held", url=s.url)
        assert err == f"causewayctl: 502 without a problem document: is {s.url} causewayd?\n"
        s.seen.clear()
        ok("audit", "--actor", "admin:a b&c=d", "--action", "token.", "--limit", "7", url=s.url)
        [(path, q, _)] = s.seen
        assert q == {"actor": ["admin:a b&c=d"], "action": ["token."], "after": ["0"], "limit": ["7"]}
        for cmd in (["peers"], ["token", "list"]):  # with and without Content-Length
            err = refused(*cmd, url=s.url)
            assert "is larger than 16 MiB" in err, err
        err = refused("users", url=s.url)
        assert "is not a JSON object" in err
        err = refused("rules", url=s.url)  # a 404 with no problem document
        assert err == f"causewayctl: 404 without a problem document: is {s.url} causewayd?\n"
    finally:
        s.close()


def test_a_list_is_bounded_in_bytes_and_a_page_in_rows():
    """A list's pages are held until printed (its table's widths, one JSON
    document): 100,000 rows by default, up to --limit 10,000,000, each
    answer up to 16 MiB, so gigabytes from a large or hostile list until
    the forty-fifth session's review.  Past 32 MiB of rows the command is
    refused, naming where to go on from; a page with more rows than asked
    for is refused, not printed past --limit."""
    def page(first, n, size):
        return doc({"rows": [{"id": i, "actor": "a" * size} for i in range(first, first + n)],
                    "next_after": first + n - 1})
    for json_out in ([], ["--json"]):
        s = StandIn({"/admin/v1/audit": [page(1 + 500 * k, 500, 20000) for k in range(6)]})  # 10 MB a page
        try:
            rc, out, err = ctl(*json_out, "audit", url=s.url)
            assert rc == 1 and out == "", (rc, out[:200])
            assert err == ("causewayctl: the list is larger than 32 MiB after 1500 rows: ask for fewer with "
                           "--limit, and for the next with --after 1500\n"), err
            assert [q["after"] for p, q, _ in s.seen] == [["0"], ["500"], ["1000"], ["1500"]]
        finally:
            s.close()
    s = StandIn({"/admin/v1/users": page(1, 3, 10), "/admin/v1/rules": page(1, 501, 10)})
    try:
        for args in (["users", "--limit", "2"], ["--json", "users", "--limit", "2"], ["rules"]):
            rc, out, err = ctl(*args, url=s.url)
            assert rc == 1 and out == "", (args, out)
            asked = "2" if "--limit" in args else "500"
            assert err.startswith("causewayctl: the answer to GET /admin/v1/") and \
                f"more than the {asked} asked for" in err, (args, err)
        out = ok("users", "--limit", "3", url=s.url)
        assert len(out.splitlines()) == 4, out  # the head and three rows
    finally:
        s.close()


def test_a_stale_policys_detail_cannot_drive_the_terminal():
    """The policy's detail is the database's error, which may quote what a
    row holds: shown defanged, on one line, as other relayed text is."""
    ready = dict(READY, policy={"status": "stale", "version": 7, "reload_failures": 4, "stale_for_s": 12,
                                "detail": "column \"x\x1b[2J\" does not exist\nLINE 1: \u202eSELECT"})
    s = StandIn({"/readyz": doc(ready), "/admin/v1/adapters": doc(dict(ADAPTERS, policy=ready["policy"])),
                 "/admin/v1/stats": doc(STATS)})
    try:
        out = ok("status", url=s.url)
        assert "\x1b" not in out and "\u202e" not in out
        lines = out.splitlines()
        assert 'policy       stale for 12 s (version 7 in force): column "x?[2J" does not exist LINE 1: ???SELECT' \
            in lines, out
        assert lines.index(f"daemon       {s.url}: ready") < lines.index("migrations   current (4 of 4 applied)") \
            < [i for i, x in enumerate(lines) if x.startswith("policy")][0]
    finally:
        s.close()


def test_status_says_what_readyz_answered_that_is_no_readiness_document():
    """Until the forty-seventh session's review an answer to /readyz that
    was not JSON (a proxy's error page) or a redirect was said to be
    "empty"."""
    s = StandIn({"/readyz": (502, b"<html>bad gateway</html>", True), "/admin/v1/adapters": doc(ADAPTERS),
                 "/admin/v1/stats": doc(STATS)})
    try:
        err = refused("status", url=s.url)
        assert err == f"causewayctl: the answer to GET /readyz (HTTP 502) is not a JSON object: is {s.url} " \
                      "causewayd?\n", err
        s.routes["/readyz"] = (503, b"", True)
        err = refused("status", url=s.url)
        assert err == f"causewayctl: the answer to GET /readyz (HTTP 503) is empty: is {s.url} causewayd?\n", err
        s.routes["/readyz"] = (301, b"", True, {"Location": "https://ctl.example/readyz"})
        err = refused("status", url=s.url)
        assert err == f"causewayctl: GET /readyz: 301: {s.url} redirects to https://ctl.example/readyz, which " \
                      "causewayctl does not follow (the token would go along); if that is the daemon, give its " \
                      "URL with --url\n", err
        assert [p for p, _, _ in s.seen] == ["/readyz"] * 3  # nothing asked after it
    finally:
        s.close()


def test_status_of_a_daemon_that_is_not_ready_exits_1():
    """/readyz answering 503 (the database down, a migration missing) is a
    daemon that is not ready: status shows what it said and what the admin
    API gave, and exits 1, so that `causewayctl status || alert` sees it.
    Until the thirty-fourth session it exited 0 whenever the admin parts
    answered, a daemon missing a migration included."""
    not_ready = dict(READY, status="not_ready",
                     migrations={"status": "not_current", "applied": 3, "expected": 4})
    s = StandIn({"/readyz": (503, json.dumps(not_ready).encode(), True), "/admin/v1/adapters": doc(ADAPTERS),
                 "/admin/v1/stats": doc(STATS)})
    try:
        rc, out, err = ctl("status", url=s.url)
        assert rc == 1, (rc, out, err)
        assert f"daemon       {s.url}: not_ready" in out.splitlines(), out
        assert "migrations   not_current (3 of 4 applied)" in out.splitlines(), out
        assert "queue        0 pending, 2 in flight, 3 held, 1 dead, 0 failed" in out.splitlines(), out
        assert err == "causewayctl: the daemon is not ready: GET /readyz answered 503 (not_ready)\n", err
        rc, out, err = ctl("--json", "status", url=s.url)
        assert rc == 1 and json.loads(out) == {"ready": not_ready, "adapters": ADAPTERS, "stats": STATS}
        assert "not ready" in err
        # Not ready and a part refused: both said, in one line.
        s.routes["/admin/v1/stats"] = (403, json.dumps({"code": "forbidden", "detail": "no"}).encode(), True)
        rc, out, err = ctl("status", url=s.url)
        assert rc == 1 and err == "causewayctl: the daemon is not ready: GET /readyz answered 503 (not_ready); " \
                                  "403 forbidden: no\n", err
    finally:
        s.close()


class Mute:
    """A server that reads each request whole and closes the connection
    without answering: a daemon that went away (or a proxy that timed out)
    after the request reached it."""

    def __init__(self):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            while m and len(body) < int(m.group(1)):
                body += conn.recv(65536)
            self.requests.append(head.split(b"\r\n")[0].decode())
            conn.close()

    def close(self):
        self.sock.close()


def test_a_change_without_an_answer_may_have_been_done():
    """A change whose request was sent and never answered (the daemon
    stopped, a proxy timed out, the 30 s passed) may have been done: the
    message says so and to look before repeating it (a token made so is
    never shown, and a repeat is 409).  Until the thirty-sixth session it
    said "cannot reach", as if nothing had been sent.  A read, and a change
    that never connected, are still "cannot reach"."""
    mute = Mute()
    try:
        for args, what in ((("token", "create", "night"), "POST /admin/v1/tokens"),
                           (("token", "revoke", "night"), "POST /admin/v1/tokens/night/revoke"),
                           (("deadletters", "replay", "7"), "POST /admin/v1/outbox/7/replay"),
                           (("deadletters", "discard", "7"), "POST /admin/v1/outbox/7/discard")):
            rc, out, err = ctl(*args, url=mute.url)
            assert rc == 3 and out == "", (args, rc, out, err)
            assert f"no answer to {what}" in err and "may have been done" in err and \
                "look before you repeat it" in err, (args, err)
        rc, out, err = ctl("peers", url=mute.url)
        assert rc == 3 and "cannot reach" in err and "may have been" not in err, err
        assert mute.requests[-1].startswith("GET /admin/v1/peers "), mute.requests
    finally:
        mute.close()
    rc, out, err = ctl("token", "create", "night", url=f"http://127.0.0.1:{free_port()}")
    assert rc == 3 and "cannot reach" in err and "may have been" not in err, err


def test_a_change_a_gateway_answered_502_or_504_may_have_been_done():
    """A reverse proxy whose upstream timed out (504) or went away (502)
    answers with a page of its own: the daemon did not answer, and a change
    passed on may have been done, exit 3 as for a connection closed
    unanswered.  Until the forty-seventh session's review it was exit 1,
    "is URL causewayd?", and the change was repeated.  The daemon's own
    refusal (a problem document) and a read so answered stay exit 1."""
    page = b"<html>504 Gateway Time-out</html>"
    s = StandIn({"/admin/v1/tokens": (504, page, True),
                 "/admin/v1/peers/gk/rotate": (502, b"<html>bad gateway</html>", True),
                 "/admin/v1/rules/7": (502, json.dumps({"status": 502, "code": "upstream",
                                                         "detail": "the daemon's own"}).encode(), True),
                 "/admin/v1/peers": (504, page, True)})
    try:
        for args, what, status in ((("token", "create", "night"), "POST /admin/v1/tokens", 504),
                                   (("peers", "rotate", "gk"), "POST /admin/v1/peers/gk/rotate", 502)):
            rc, out, err = ctl(*args, url=s.url)
            assert rc == 3 and out == "", (args, rc, out, err)
            assert err == (f"causewayctl: no answer to {what} from {s.url} (a gateway answered {status}): it "
                           "was sent and may have been done; look before you repeat it (causewayctl audit "
                           "shows what was done)\n"), err
        err = refused("peers", url=s.url)
        assert err == f"causewayctl: 504 without a problem document: is {s.url} causewayd?\n"
        err = refused("rules", "delete", "7", url=s.url)
        assert err == "causewayctl: 502 upstream: the daemon's own\n"
    finally:
        s.close()


def test_the_token_never_goes_to_a_proxy_of_the_environment():
    """An http:// daemon URL is asked directly, whatever http_proxy or
    all_proxy say: through a proxy the request, bearer token and all, would
    cross it in clear (libcurl follows those variables by default), and a
    proxy is another party, which may log what it carries.  Until the
    fortieth session causewayctl sent the admin token to such a proxy even
    for the loopback default URL.  (An https:// URL may still go through
    one: a CONNECT tunnel, the proxy sees the host only.)"""
    daemon = StandIn({"/admin/v1/peers": doc({"peers": []})})
    proxy = StandIn({})  # would answer 404 to anything it is asked
    try:
        for var in ("http_proxy", "all_proxy", "ALL_PROXY"):
            daemon.seen.clear()
            ok("peers", url=daemon.url, env={var: proxy.url})
            assert proxy.seen == [], (var, proxy.seen)
            [(path, _, headers)] = daemon.seen
            assert path == "/admin/v1/peers" and headers["Authorization"] == f"Bearer {ADMIN_TOKEN}", var
    finally:
        daemon.close()
        proxy.close()


def test_a_refusals_detail_cannot_drive_the_terminal():
    """The reason of a refusal quotes the daemon's problem detail (which may
    quote what a remote network wrote): its controls are '?' as a table
    cell's are, the C1 ones (U+009B is CSI to a terminal) and the
    bidirectional overrides included.  Until the fortieth session only the
    C0 controls and DEL were."""
    bad = {"type": "about:blank", "title": "Conflict", "status": 409, "code": "conflict",
           "detail": "held by mimi://evil.example/u/\u202eevil\x1b[2J and \u009b31mred\u2066"}
    s = StandIn({"/admin/v1/peers": (409, json.dumps(bad).encode(), True)})
    try:
        err = refused("peers", url=s.url)
        for c in ("\x1b", "\u009b", "\u202e", "\u2066"):
            assert c not in err, (c, err)
        assert err == "causewayctl: 409 conflict: held by mimi://evil.example/u/???evil?[2J and ??31mred???\n", err
    finally:
        s.close()


def test_bidirectional_marks_are_defanged_as_the_overrides_are():
    """The marks (U+200E, U+200F, U+061C) give the neutral text around them
    a direction, so a peer's text can move what is shown next to it: since
    the forty-fourth session's review causewayctl shows them as the
    overrides and isolates, '?' for each byte in a table, the reason of a
    refusal and a summary, a \\u escape with --json (one list with what the
    daemon's logs escape, utf8.c's cw_utf8_bidi_format).  Their neighbours
    (U+200D, U+061B) are shown as they are."""
    sender = "mimi://evil.example/u/a\u200fb\u200ec\u061cd\u200d\u061b"
    s = StandIn({"/admin/v1/messages/msg_x": doc({"message": "msg_x", "sender": sender, "deliveries": [],
                                                  "decisions": []}),
                 "/admin/v1/peers": (409, json.dumps({"type": "about:blank", "title": "Conflict", "status": 409,
                                                      "code": "conflict", "detail": sender}).encode(), True)})
    try:
        out = ok("trace", "msg_x", url=s.url)
        assert "mimi://evil.example/u/a???b???c??d\u200d\u061b" in out, out
        err = refused("peers", url=s.url)
        assert err == "causewayctl: 409 conflict: mimi://evil.example/u/a???b???c??d\u200d\u061b\n", err
        out = ok("--json", "trace", "msg_x", url=s.url)
        assert "\\u200fb\\u200ec\\u061cd\u200d\u061b" in out, out
        assert json.loads(out)["sender"] == sender
        for c in ("\u200e", "\u200f", "\u061c"):
            assert c not in out, (c, out)
    finally:
        s.close()


def test_line_and_paragraph_separators_are_defanged():
    """U+2028 and U+2029 are shown as a line break by a viewer that honours
    them: since the forty-fifth session causewayctl shows them as it shows a
    control, '?' for each byte, and a \\u escape with --json (the list the
    daemon's logs escape, utf8.c's cw_utf8_display_control).  Their
    neighbours (U+2027, U+202F) are shown as they are."""
    sender = "mimi://evil.example/u/a\u2028b\u2029c\u2027d\u202fe"
    s = StandIn({"/admin/v1/messages/msg_x": doc({"message": "msg_x", "sender": sender, "deliveries": [],
                                                  "decisions": []})})
    try:
        out = ok("trace", "msg_x", url=s.url)
        assert "mimi://evil.example/u/a???b???c\u2027d\u202fe" in out, out
        out = ok("--json", "trace", "msg_x", url=s.url)
        assert "a\\u2028b\\u2029c\u2027d\u202fe" in out, out
        assert json.loads(out)["sender"] == sender
        for c in ("\u2028", "\u2029"):
            assert c not in out, (c, out)
    finally:
        s.close()


def test_a_settings_file_others_may_change_is_warned_about(tmp_path):
    """A settings file that other users may write names where the token is
    sent: one of them could set url = http://their.host and be handed the
    token (from token_file, the environment or a flag) at the next command.
    causewayctl says so, as it does of a token others may read (a warning,
    not a refusal: some setups share a group on purpose).  Until the
    fortieth session only a file holding a token itself was looked at, and
    only for being readable."""
    s = StandIn({"/admin/v1/peers": doc({"peers": []})})
    try:
        token_file = tmp_path / "token"
        token_file.write_text(ADMIN_TOKEN + "\n")
        token_file.chmod(0o600)
        conf = tmp_path / "causewayctl.ini"
        conf.write_text(f"[causewayctl]\nurl = {s.url}\ntoken_file = {token_file}\n")
        for mode, warned in ((0o600, False), (0o644, False), (0o620, True), (0o602, True)):
            conf.chmod(mode)
            rc, out, err = ctl("peers", "--config", str(conf), token=None)
            assert rc == 0 and "no peers" in out, (oct(mode), rc, out, err)
            said = f"causewayctl: warning: {conf} may be changed by other users, and with it where the token " \
                f"is sent (chmod 600 {conf})\n"
            assert err == (said if warned else ""), (oct(mode), err)
        # Its owner may change it, whatever its mode (since the forty-fifth
        # session's review); root may anyway, and is not warned of.
        conf.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(conf, 65534, -1)
            rc, out, err = ctl("peers", "--config", str(conf), token=None)
            assert rc == 0 and err == f"causewayctl: warning: {conf} belongs to another user (uid 65534), who " \
                "may change it and with it where the token is sent\n", (rc, err)
            os.chown(conf, 0, -1)
        rc, out, err = ctl("peers", "--config", str(conf), token=None)
        assert rc == 0 and err == "", (rc, err)
    finally:
        s.close()


def test_json_output_cannot_drive_the_terminal(daemon, pg, db_url):
    """--json prints the API's answer for scripts, but it reaches a terminal
    too: a string's C1 controls (U+009B is CSI), DEL and bidirectional
    overrides and isolates are written as \\u escapes, the same JSON once
    parsed, where until the forty-third session they went out raw (the
    table defanged them; --json printed a rule's comment, a delivery's last
    error or a report's comment, which a peer writes, as it was).  Other
    text, accents and all, is printed as it is.  The API refuses such a
    rule comment since the fiftieth session: one stored before (or by SQL)
    is stored here by hand."""
    comment = "wave \u009b2J\u202eevil\u2066 caf\u00e9 \x7f\x1b[31m"
    r = daemon.admin("POST", "/rules", json={"scope": "domain", "pattern": "x.example", "mode": "deny",
                                             "comment": "replaced below"})
    assert r.status_code == 201, r.text
    pg.psql("UPDATE rules SET comment = E'wave \\u009b2J\\u202eevil\\u2066 caf\\u00e9 \\u007f\\u001b[31m' "
            f"WHERE id = {r.json()['id']}", db_url)
    out = ok("--json", "rules", url=daemon.url)
    for c in ("\u009b", "\u202e", "\u2066", "\x7f", "\x1b"):
        assert c not in out, (c, out)
    assert "caf\u00e9" in out and "\\u009b2J\\u202eevil\\u2066" in out and "\\u007f" in out, out
    assert json.loads(out)["rows"][0]["comment"] == comment
    # A refusal's problem document on stdout likewise: its detail names the
    # unknown member of --limits as it was given.
    key = "k\u009b2J\u202e\x1b[31m"
    rc, out, err = ctl("--json", "rules", "add", "domain", "y.example", "--mode", "deny",
                       "--limits", json.dumps({key: 1}, ensure_ascii=False), url=daemon.url)
    assert rc == 1 and json.loads(out)["code"] == "invalid_body", (rc, out, err)
    assert "\u009b" not in out and "\u202e" not in out and "\x1b" not in out and key in json.loads(out)["detail"], out
    rc, out, err = ctl("--json", "rules", "add", "domain", "y.example", "--mode", "deny", "--comment", comment,
                       url=daemon.url)
    assert rc == 1 and json.loads(out)["code"] == "invalid_body" and "control" in json.loads(out)["detail"], out


def test_a_read_answered_503_with_retry_after_is_asked_again():
    """A list of records answers 503 with Retry-After: 1 while a writer of
    its table stays open (docs/admin-api.md, since the forty-fifth
    session), as any route does while the database is away: a read is
    asked again after the wait it names, a few times, so that one such
    answer does not fail an export of the audit log in its middle (until
    the forty-fifth session's review it did, exit 1, nothing printed).  A
    wait longer than causewayctl's is not waited for; a change is never
    repeated (it may have been done)."""
    busy = (503, json.dumps({"type": "about:blank", "title": "Service Unavailable", "status": 503,
                             "code": "unavailable", "detail": "a writer of the audit log is open"}).encode(),
            True, {"Retry-After": "1"})
    rows = [{"id": i, "at": "2026-11-29T06:01:00Z", "actor": "admin:ops", "action": "token.create",
             "subject": f"t{i}", "reason": None, "message": None, "details": {}} for i in range(1, 6)]
    s = StandIn({"/admin/v1/audit": [doc({"rows": rows[:2], "next_after": 2}), busy, busy,
                                     doc({"rows": rows[2:4], "next_after": 4}), doc({"rows": rows[4:],
                                                                                  "next_after": None})]})
    try:
        got = json.loads(ok("--json", "audit", url=s.url))
        assert got == {"rows": rows, "next_after": None}, got
        assert [q["after"] for _, q, _ in s.seen] == [["0"], ["2"], ["2"], ["2"], ["4"]], s.seen
        # Still busy after every wait: refused, saying so.
        s.seen.clear()
        s.routes["/admin/v1/audit"] = busy
        err = refused("audit", url=s.url)
        assert err == "causewayctl: 503 unavailable: a writer of the audit log is open " \
                      "(asked 4 times, as Retry-After said)\n", err
        assert len(s.seen) == 4
        # A wait longer than causewayctl's: refused at once.
        s.seen.clear()
        s.routes["/admin/v1/audit"] = busy[:3] + ({"Retry-After": "3600"},)
        err = refused("audit", url=s.url)
        assert "503 unavailable" in err and "(Retry-After 3600 s, longer than causewayctl waits)" in err, err
        assert len(s.seen) == 1
        # A 503 without Retry-After is not a "try again": refused at once.
        s.seen.clear()
        s.routes["/admin/v1/audit"] = busy[:3]
        err = refused("audit", url=s.url)
        assert err == "causewayctl: 503 unavailable: a writer of the audit log is open\n", err
        assert len(s.seen) == 1
        # A change answered so is not sent again.
        s.routes["/admin/v1/tokens"] = busy
        s.seen.clear()
        err = refused("token", "create", "night", url=s.url)
        assert "503 unavailable" in err and "asked" not in err, err
        assert [p for p, _, _ in s.seen] == ["/admin/v1/tokens"]
    finally:
        s.close()


def test_an_audit_export_waits_out_a_writer_of_the_audit_log(daemon, db_url):
    """The real daemon's audit list answers 503 with Retry-After while a
    writer of audit_log stays open past a second: causewayctl asks again
    after the wait, and the export holds the record committed late, in id
    order, rather than failing (until the forty-fifth session's review)."""
    held = HeldSession(db_url)
    try:
        held.run("BEGIN; INSERT INTO audit_log (actor, action) VALUES ('admin:late', 'test.late');")
        # committed after the daemon's first wait (a second) has ended in a 503
        timer = threading.Timer(2.5, lambda: held.run("COMMIT;"))
        timer.start()
        t0 = time.monotonic()
        got = json.loads(ok("--json", "audit", "--action", "test.", url=daemon.url))
        timer.join()
        assert time.monotonic() - t0 >= 2.0
        assert [(r["actor"], r["action"]) for r in got["rows"]] == [("admin:late", "test.late")], got
    finally:
        held.end()


def test_arguments_that_are_not_utf8_are_a_usage_error():
    """An argument that goes into the request's JSON must be UTF-8 text:
    token create's name, as peers add's and rules add's, is a usage error,
    exit 2, nothing asked (until the forty-seventh session's review token
    create said "out of memory", exit 1)."""
    s = StandIn({})
    try:
        for args in (("token", "create", b"night\xff"), ("peers", "add", b"g\xffk", "gk.example", "--key", "k",
                                                         "--pull"),
                     ("rules", "add", "domain", b"spam\xff.example", "--mode", "deny")):
            rc, out, err = ctl(*args, url=s.url)
            assert (rc, out, err) == (2, "", "causewayctl: the arguments must be UTF-8 text\n"), (args, rc, err)
        assert s.seen == []
    finally:
        s.close()


def test_a_name_of_dots_or_nothing_is_refused_before_any_request():
    """A name or id goes into the request's path escaped, but escaping
    leaves '.', and libcurl (as a proxy would) resolves the segments "."
    and "..": `token revoke ..` was sent as POST /admin/v1/revoke, `trace .`
    as GET /admin/v1/messages/, `peers disable ''` as POST
    /admin/v1/peers//disable (until the forty-fifth session's review).  No
    name or id is so: a usage error, nothing asked.  Dots within a name go
    as they are."""
    s = StandIn({})
    try:
        for args in (("token", "revoke", ".."), ("peers", "disable", "."), ("peers", "enable", ""),
                     ("peers", "rotate", ".."), ("trace", "."), ("trace", ".."), ("trace", "")):
            rc, out, err = ctl(*args, url=s.url)
            assert rc == 2 and out == "" and \
                err == f"causewayctl: '{args[-1]}' cannot be a name or id: it would change the request's path\n", \
                (args, rc, err)
        assert s.seen == []
        refused("trace", "...", url=s.url)
        assert [p for p, _, _ in s.seen] == ["/admin/v1/messages/..."]
    finally:
        s.close()


def test_https_verifies_the_certificate_and_its_host_name_and_a_ca_file_adds_a_ca(tmp_path):
    """An https:// daemon (behind a TLS reverse proxy, docs/security.md) is
    trusted only with a certificate of a CA trusted here, for the URL's host
    name: otherwise nothing is sent, the token included (exit 3, saying
    why).  A reverse proxy with a certificate of a private CA is reached
    with --ca-file (CAUSEWAY_CA_FILE, ca_file =): until the forty-fifth
    session's review there was no way but the system's CA store, and an
    operator was left with http://, the token in clear."""
    import ssl

    ca, key_file = harness.self_signed_ca(tmp_path, "causewayctl test CA", ["localhost"])
    s = StandIn({"/admin/v1/peers": doc({"peers": []})})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(ca), str(key_file))
    s.httpd.socket = ctx.wrap_socket(s.httpd.socket, server_side=True, do_handshake_on_connect=False)
    port = s.httpd.server_address[1]
    good, other_name = f"https://localhost:{port}", f"https://127.0.0.1:{port}"
    try:
        rc, out, err = ctl("peers", url=good)
        assert rc == 3 and out == "" and f"cannot reach {good}:" in err and "--ca-file FILE" in err, (rc, err)
        assert ok("peers", "--ca-file", str(ca), url=good) == "no peers\n"
        assert ok("peers", url=good, env={"CAUSEWAY_CA_FILE": str(ca)}) == "no peers\n"
        conf = tmp_path / "causewayctl.ini"
        conf.write_text(f"[causewayctl]\nurl = {good}\nca_file = {ca}\n")
        conf.chmod(0o600)
        assert ok("peers", "--config", str(conf)) == "no peers\n"
        # relative: the settings file's neighbour, whatever the working directory
        conf.write_text(f"[causewayctl]\nurl = {good}\nca_file = {os.path.basename(ca)}\n")
        assert ok("peers", "--config", str(conf), cwd="/") == "no peers\n"
        # the CA's certificate, but not for this host name
        rc, out, err = ctl("peers", "--ca-file", str(ca), url=other_name)
        assert rc == 3 and out == "" and f"cannot reach {other_name}:" in err, (rc, err)
        assert [h["Authorization"] for _, _, h in s.seen] == [f"Bearer {ADMIN_TOKEN}"] * 4
        rc, out, err = ctl("peers", "--ca-file", str(tmp_path / "none.pem"), url=good)
        assert rc == 2 and f"cannot read the CA file {tmp_path / 'none.pem'}: No such file" in err, (rc, err)
        rc, out, err = ctl("peers", "--ca-file", str(tmp_path), url=good)
        assert rc == 2 and "Is a directory" in err, (rc, err)
    finally:
        s.close()


def test_a_redirect_is_not_followed_and_is_named():
    """A redirect is never followed: the bearer token would go along to
    wherever it points (libcurl sends it to another host too).  The refusal
    names where it pointed (a TLS proxy sending http:// to https://, the
    common case), where until the forty-fifth session's review it said
    only "302 without a problem document: is URL causewayd?"."""
    elsewhere = StandIn({"/admin/v1/peers": doc({"peers": []})})
    s = StandIn({"/admin/v1/peers": (302, b"", True, {"Location": elsewhere.url + "/admin/v1/peers"}),
                 "/admin/v1/tokens": (301, b"", True, {"Location": "https://ctl.example/\x1b[2J"})})
    try:
        err = refused("peers", url=s.url)
        assert err == f"causewayctl: 302: {s.url} redirects to {elsewhere.url}/admin/v1/peers, which causewayctl " \
                      "does not follow (the token would go along); if that is the daemon, give its URL with " \
                      "--url\n", err
        err = refused("token", "list", url=s.url)
        assert "\x1b" not in err and "redirects to https://ctl.example/" in err, err
        assert elsewhere.seen == []
    finally:
        s.close()
        elsewhere.close()


def test_a_long_refusal_and_a_long_redirect_target_are_said_whole():
    """The reason of a refusal is said whole: a daemon's long detail (one
    quoting a 512-byte user URI), a redirect's target to give with --url,
    status's reason of a part refused.  Until the fiftieth session's review
    the reason was cut at 511 bytes and a refusal at 399 without a mark,
    and a redirect's target at 200: a URL shown cut, to be pasted as it
    was."""
    detail = "held by mimi://example.org/u/" + "\u00e9" * 600 + " (see the audit log) END"
    prob = {"type": "about:blank", "title": "Conflict", "status": 409, "code": "conflict", "detail": detail}
    target = "https://ctl.example/" + "p" * 900 + "/admin/v1/tokens"
    s = StandIn({"/admin/v1/peers": (409, json.dumps(prob).encode(), True),
                 "/admin/v1/tokens": (301, b"", True, {"Location": target}),
                 "/readyz": doc(READY), "/admin/v1/adapters": doc(ADAPTERS),
                 "/admin/v1/stats": (409, json.dumps(prob).encode(), True)})
    try:
        assert refused("peers", url=s.url) == f"causewayctl: 409 conflict: {detail}\n"
        err = refused("token", "list", url=s.url)
        assert err == f"causewayctl: 301: {s.url} redirects to {target}, which causewayctl does not follow (the " \
                      "token would go along); if that is the daemon, give its URL with --url\n", err
        rc, out, err = ctl("status", url=s.url)
        assert rc == 1 and err == f"causewayctl: 409 conflict: {detail}\n", err
        assert f"not shown: 409 conflict: {detail}\n" in out, out
    finally:
        s.close()


def test_a_token_files_byte_order_mark_is_skipped_and_utf16_is_named(tmp_path):
    """An editor's UTF-8 byte order mark before the token is no part of it
    (no token has one), and is skipped, as libinih skips the settings
    file's; a file saved as UTF-16 is refused, saying so.  Until the
    fiftieth session's review both were "the admin token has characters no
    token has (blanks or control characters)", naming neither the file nor
    the mark."""
    s = StandIn({"/admin/v1/peers": doc({"peers": []})})
    f = tmp_path / "token"
    try:
        f.write_bytes(b"\xef\xbb\xbf" + ADMIN_TOKEN.encode() + b"\r\n")
        f.chmod(0o600)
        assert ok("peers", "--token-file", str(f), url=s.url, token=None) == "no peers\n"
        assert s.seen[-1][2]["Authorization"] == f"Bearer {ADMIN_TOKEN}"
        for data, why in ((b"\xef\xbb\xbf \n", f"the token file {f} holds no token on its first line"),
                          ("\ufeff" + ADMIN_TOKEN + "\n", f"the token file {f} is UTF-16 text")):
            f.write_bytes(data if isinstance(data, bytes) else data.encode("utf-16-le"))
            rc, out, err = ctl("peers", "--token-file", str(f), url=s.url, token=None)
            assert rc == 2 and out == "" and err.startswith(f"causewayctl: {why}"), (rc, err)
        f.write_bytes(("\ufeff" + ADMIN_TOKEN).encode("utf-16-be"))
        rc, _, err = ctl("peers", "--token-file", str(f), url=s.url, token=None)
        assert rc == 2 and "save it as UTF-8 or ASCII" in err, err
        assert len(s.seen) == 1
    finally:
        s.close()


def test_trace_and_status_show_long_values_whole():
    """A user URI may be 512 bytes (MIMI_URI_MAX), a remote id and a reload's
    failure longer than a line: trace and status show each whole.  Until the
    forty-ninth session's review a value of trace was cut at 299 bytes and a
    line of status at 1023, without a word: the sender or recipient shown was
    another user's (a prefix of the real one), the remote id one that does
    not exist."""
    sender = "mimi://wa.example/u/" + "s" * 470 + "\u00e9" * 11  # 512 bytes
    recipient = "mimi://example.org/u/" + "r" * 480 + "\u00e9" * 5
    remote = "$" + "x" * 254
    detail = "cannot read the rules: " + "d" * 1200 + " (the end)"
    trace = {"message": "msg_1", "room": "r_1", "sender": sender, "type": "message",
             "origin": {"network": "peer", "native_id": "n" * 400}, "accepted_at": "2026-11-29T06:01:00Z",
             "content_deleted": False, "decisions": [],
             "deliveries": [{"id": 7, "destination": "matrix", "recipient": recipient, "state": "delivered",
                             "attempts": 1, "verdict": "allow", "reason": "open", "remote_id": remote,
                             "created_at": "2026-11-29T06:01:00Z", "tries": []}]}
    ready = dict(READY, policy={"status": "stale", "stale_for_s": 12, "version": 3, "detail": detail})
    s = StandIn({"/admin/v1/messages/msg_1": doc(trace), "/readyz": doc(ready), "/admin/v1/adapters": doc(ADAPTERS),
                 "/admin/v1/stats": doc(STATS)})
    try:
        out = ok("trace", "msg_1", url=s.url)
        assert f"\nsender       {sender}\n" in out, out
        assert "origin       peer (native id " + "n" * 400 + ")\n" in out, out
        assert f"  #7  to matrix, for {recipient}\n" in out, out
        assert f"remote id {remote}\n" in out, out
        out = ok("status", url=s.url)
        assert f"\npolicy       stale for 12 s (version 3 in force): {detail}\n" in out, out
    finally:
        s.close()


def columns(text):
    """The columns of a terminal text takes: two for a wide character, none
    for a combining one, one for the rest."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def test_a_tables_columns_are_counted_in_terminal_columns():
    """A cell of CJK text (an XMPP user's name, a peer's user) takes two
    columns a character, a combining accent none: the columns after it stay
    in line, whatever the locale causewayctl runs in, and a long cell is cut
    at 64 columns, not 64 characters.  Until the forty-ninth session's review
    a column was as wide as its characters, and the columns after such a
    cell were pushed out of line."""
    rows = [{"id": 1, "message": "msg_1", "user": ALICE, "sender": "mimi://wa.example/u/\u5c71\u7530\u592a\u90ce",
             "type": "message"},
            {"id": 2, "message": "msg_2", "user": ALICE, "sender": "mimi://wa.example/u/jose\u0301",
             "type": "message"},
            {"id": 3, "message": "msg_3", "user": ALICE, "sender": "mimi://wa.example/u/" + "\u6f22" * 40,
             "type": "message"},
            {"id": 4, "message": "msg_4", "user": ALICE, "sender": "mimi://wa.example/u/wally", "type": "message"}]
    s = StandIn({"/admin/v1/held": doc({"rows": rows, "next_after": None})})
    try:
        for lang in ("C", "C.UTF-8"):
            out = ok("held", url=s.url, env={"LC_ALL": lang})
            lines = out.splitlines()
            assert len(lines) == 5, out
            at = {columns(line[:line.index(" message ") + 1]) for line in lines[1:]}
            at.add(columns(lines[0][:lines[0].index("TYPE")]))
            assert len(at) == 1, (lang, at, out)
            cut = re.split(r"\s{2,}", lines[3])[3]
            assert cut.endswith("...") and 62 <= columns(cut) <= 64, (cut, columns(cut))
            assert "mimi://wa.example/u/jose\u0301  " in lines[2], lines[2]
    finally:
        s.close()


def test_reports_listed_handled_and_dismissed(daemon, pg, db_url):
    """An operator handles an abuse report from the command line as from the
    console: reports (--open: those not handled yet), reports handle ID,
    reports dismiss ID, each the API's answer; a second handle is the API's
    409 naming who handled it, exit 1; a bad id a usage error, nothing
    asked.  Until the forty-ninth session's review causewayctl had no
    report command at all: a report was handled from the console or curl."""
    made = [daemon.admin("POST", "/reports", json={"subject": f"mimi://wa.example/u/{who}", "reason": "spam",
                                                   "comment": "line one\nline \u200ftwo"}).json()
            for who in ("w1", "w2")]
    first, second = (str(r["id"]) for r in made)
    rows = cells(ok("reports", url=daemon.url))
    assert [r[0] for r in rows] == [first, second], rows
    assert rows[0][2:6] == ["admin:config", "mimi://wa.example/u/w1", "spam", "line one line ???two"], rows
    assert rows[0][6:] == ["-", "-", "no"], rows
    assert json.loads(ok("--json", "reports", url=daemon.url))["rows"] == \
        daemon.admin("GET", "/reports").json()["rows"]
    out = ok("reports", "handle", first, url=daemon.url)
    assert re.fullmatch(rf"Handled the report {first} \(handled at \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ by admin:config\)\.\n",
                        out), out
    err = refused("reports", "handle", first, url=daemon.url)
    assert f"409 conflict: report {first} was already handled" in err and "by admin:config" in err, err
    assert [r[0] for r in cells(ok("reports", "--open", url=daemon.url))] == [second]
    out = ok("reports", "dismiss", second, url=daemon.url)
    assert out.startswith(f"Dismissed the report {second} (handled at ") and \
        "it no longer counts toward an automatic limit" in out, out
    assert ok("reports", "--open", url=daemon.url) == "no open reports\n"
    assert pg.psql(f"SELECT dismissed FROM reports WHERE id = {second}", db_url) == "t"
    assert "404" in refused("reports", "dismiss", "999999", url=daemon.url)
    for args, why in ((["reports", "handle", "x1"], "'x1' is not a report id"),
                      (["reports", "dismiss", "0"], "'0' is not a report id"),
                      (["reports", "handle", first, "--open"], "reports handle takes no --open"),
                      (["peers", "--open"], "peers takes no --open")):
        rc, out, err = ctl(*args, url="http://127.0.0.1:1")
        assert rc == 2 and why in err and out == "", (args, rc, err)


def test_status_shows_every_decision_and_component():
    """A busy hour's decisions (a verdict and reason each, of some forty
    reasons) and a deployment's XMPP components, each with its last error,
    are shown every one.  Until the forty-ninth session's review each line
    was cut at 899 bytes without a word, in the middle of an entry."""
    decisions = [{"verdict": v, "reason": f"reason_{i:02d}", "count": 1000 + i}
                 for i in range(40) for v in ("deny", "hold")]
    components = {f"c{i:02d}.example.org": {"state": "down", "last_error": f"stream closed: host-unknown {i:02d}"}
                  for i in range(30)}
    ready = dict(READY, adapters={"xmpp": {"server": "xmpp.example", "port": 5347, "components": components}})
    adapters = dict(ADAPTERS, xmpp=ready["adapters"]["xmpp"])
    adapters.pop("matrix")
    s = StandIn({"/readyz": doc(ready), "/admin/v1/adapters": doc(adapters),
                 "/admin/v1/stats": doc(dict(STATS, decisions=decisions))})
    try:
        out = ok("status", url=s.url)
        want = ", ".join(f"{d['verdict']} {d['reason']} {d['count']}" for d in decisions)
        assert f"\ndecisions    {want}\n" in out, out
        want = "; ".join(f"{c} down ({x['last_error']})" for c, x in components.items())
        assert f"\nxmpp         xmpp.example:5347; {want}\n" in out, out
    finally:
        s.close()


def test_the_outbox_by_state_and_destination(world):
    """outbox lists the deliveries as GET /admin/v1/outbox does, filtered by
    --state and --destination: the operator finds a failed or pending
    delivery to replay, or what waits for a peer, where until the
    forty-ninth session's review causewayctl showed the dead ones alone (and
    replay, which takes a failed one too, had no list of them)."""
    api = world.d.admin("GET", "/outbox?destination=peer:tg").json()
    assert api["rows"], api
    assert json.loads(ok("--json", "outbox", "--destination", "peer:tg", url=world.url))["rows"] == api["rows"]
    rows = cells(ok("outbox", "--destination", "peer:tg", url=world.url))
    assert [r[0] for r in rows] == [str(r["id"]) for r in api["rows"]], rows
    assert all(r[2] == "peer:tg" for r in rows) and "dead" in [r[4] for r in rows], rows
    dead = cells(ok("outbox", "--state", "dead", url=world.url))
    assert [(r[0], r[4]) for r in dead] == [(str(r["id"]), "dead")
                                           for r in world.d.admin("GET", "/outbox?state=dead").json()["rows"]]
    held = cells(ok("outbox", "--state", "held", url=world.url))
    assert [r[1:5] for r in held] == [[world.held, "local", ALICE, "held"]], held
    assert ok("outbox", "--state", "failed", "--destination", "peer:nobody", url=world.url) == "no deliveries\n"
    for args, why in ((["deadletters", "--state", "dead"], "deadletters takes no --state or --destination"),
                      (["outbox", "--state"], "--state needs a value")):
        rc, out, err = ctl(*args, url="http://127.0.0.1:1")
        assert rc == 2 and why in err and out == "", (args, rc, err)


def test_the_outbox_filters_are_checked_as_the_api_documents_them():
    """--state takes the values docs/admin-openapi.json lists (each one of
    them, and nothing else), --destination 1 to 299 bytes: anything else is
    a usage error (exit 2) said before any request, where until the
    fiftieth session's review it was sent and refused by the daemon
    (exit 1, "400 invalid_query")."""
    with open(os.path.join(harness.TOP_SRCDIR, "docs", "admin-openapi.json")) as f:
        api = json.load(f)
    states = api["components"]["parameters"]["OutboxStateFilter"]["schema"]["enum"]
    mute = StandIn({})
    try:
        for state in states:  # each one asked for (the stand-in's 404 is exit 1)
            rc, _, err = ctl("outbox", "--state", state, url=mute.url)
            assert rc == 1 and "404 without a problem document" in err, (state, rc, err)
        for dest in ("matrix", "d" * 299):
            rc, _, err = ctl("outbox", "--destination", dest, url=mute.url)
            assert rc == 1, (dest, rc, err)
        asked = len(mute.seen)
        assert asked == len(states) + 2
        for args, why in ((["--state", "stuck"], "--state takes " + ", ".join(states[:-1]) + " or " + states[-1] +
                           ", not 'stuck'"),
                          (["--state", "DEAD"], "not 'DEAD'"),
                          (["--state", ""], "not ''"),
                          (["--destination", ""], "--destination takes a destination of 1 to 299 bytes"),
                          (["--destination", "d" * 300], "not one of 300")):
            rc, out, err = ctl("outbox", *args, url=mute.url)
            assert rc == 2 and out == "" and why in err, (args, rc, err)
        assert len(mute.seen) == asked
    finally:
        mute.close()
    # Every XMPP component's deliveries are "xmpp" (docs/schema.md): until
    # the fiftieth session's review the help sent the operator to
    # xmpp:COMPONENT-DOMAIN, which no delivery has.
    rc, out, _ = ctl("help", "outbox", token=None)
    assert rc == 0 and "--destination peer:NAME, matrix or xmpp\n(matched whole; xmpp for every component)" in out, out
    assert "xmpp:" not in out, out


def test_what_the_command_line_quotes_back_cannot_drive_the_terminal():
    """A usage error quotes the command line, which may come from elsewhere
    (a script's variable, a pasted id): its controls are '?' as the API's
    words are, and what a message's bound cut of a character, or an
    argument that is not UTF-8, is a '?' too, never a broken character.
    Until the forty-ninth session's review an unknown command's escape
    sequence went to the terminal as it was, and a long id of accented
    letters ended in half a character."""
    rc, out, err = ctl("\x1b[2Jfoo\u202e", url="http://127.0.0.1:1")
    assert (rc, out, err) == (2, "", "causewayctl: no command '?[2Jfoo???' (see causewayctl --help)\n"), err
    rc, out, err = ctl("rules", "delete", "a" + "\u00e9" * 30, url="http://127.0.0.1:1")
    assert rc == 2 and err.startswith("causewayctl: 'a" + "\u00e9" * 19 + "?' is not a rule id"), err
    r = subprocess.run([CTL, b"token\xff"], capture_output=True, env={"HOME": "/nonexistent"}, timeout=60)
    assert r.returncode == 2 and r.stderr == b"causewayctl: no command 'token?' (see causewayctl --help)\n", r.stderr
