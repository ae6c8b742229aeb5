"""The web console at /admin/: its files and headers (CSP, nosniff, ETag),
then the console itself in a real headless Chromium (Debian's chromium
package driven by playwright-core, both installed by tools/dev test):
tests/browser/console.mjs signs in, reads the dashboard while this test sends
messages, adds a deny rule and reads the next message's trace, replays a dead
letter, removes a peer's user from a group (its peers told), pages a big
group's members, and finds no change control as a viewer.  Screenshots of
every page go to $top_builddir/test-artefacts/console/."""
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time

import pytest

from harness import ADMIN_TOKEN, TOP_BUILDDIR, TOP_SRCDIR, wait_until
from peer import GK_TG, push_peers

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
CONSOLE_DIR = os.path.join(TOP_SRCDIR, "gateway", "console")
SCRIPT = os.path.join(TOP_SRCDIR, "tests", "browser", "console.mjs")
SHOTS = os.path.join(TOP_BUILDDIR, "test-artefacts", "console")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ALICE = "mimi://example.org/u/alice"
TYPES = {"index.html": "text/html", "console.css": "text/css", "console.js": "text/javascript"}


def test_console_files_and_headers(daemon):
    r = daemon.get("/admin", allow_redirects=False)
    assert r.status_code == 301 and r.headers["Location"] == "/admin/"
    for path, name in (("/admin/", "index.html"), ("/admin/index.html", "index.html"),
                       ("/admin/console.css", "console.css"), ("/admin/console.js", "console.js")):
        r = daemon.get(path)
        assert r.status_code == 200, path
        assert r.headers["Content-Type"].startswith(TYPES[name]), (path, r.headers["Content-Type"])
        assert r.headers["Content-Security-Policy"] == CSP, path
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
        with open(os.path.join(CONSOLE_DIR, name), "rb") as f:
            assert r.content == f.read(), f"{path} is not {name} as in the source tree"
        etag = r.headers["ETag"]
        assert re.fullmatch(r'"[0-9a-f]{16,}"', etag), etag
        again = daemon.get(path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"", path
        assert again.headers["ETag"] == etag
        assert daemon.get(path, headers={"If-None-Match": '"other"'}).status_code == 200
    for path in ("/admin/nope.js", "/admin/..%2Fconsole.js", "/admin/.env"):
        assert daemon.get(path).status_code == 404, path
    # The console's page needs no credentials; the API behind it does, and
    # sends no CORS headers (no other origin may call it).
    r = daemon.get("/admin/v1/whoami", headers={"Origin": "https://evil.example"})
    assert r.status_code == 401 and "Access-Control-Allow-Origin" not in r.headers


def test_console_sources_keep_to_the_csp():
    """What the CSP would refuse (and the rules the console keeps) checked in
    the sources, so that a mistake fails here with its line, not only as a
    console error in the browser test."""
    with open(os.path.join(CONSOLE_DIR, "index.html")) as f:
        html = f.read()
    with open(os.path.join(CONSOLE_DIR, "console.js")) as f:
        js = f.read()
    for s in re.findall(r"<script\b[^>]*>", html):
        assert 'src="console.js"' in s, f"inline script: {s}"
    assert "<style" not in html and "style=" not in html
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "nothing from another origin"
    for bad in (".innerHTML", ".outerHTML", ".insertAdjacentHTML", "document.write", "eval(", "new Function",
                "setAttribute(\"style\"", "setAttribute('style'", "localStorage", "document.cookie"):
        assert bad not in js, f"console.js uses {bad}"
    # A link's target is never built from data: every href is a literal
    # "#/..." route (with enc() of an id after it), so no answer can make a
    # javascript: or off-site link.  card()'s {href} is given literals.
    for m in re.finditer(r"\bhref:\s*([^,}]+)", js):
        assert re.match(r'"#/[a-z]*/?"(\s*\+\s*enc\([^()]*\))?\s*$', m.group(1).strip()), m.group(0)
    for m in re.finditer(r"\bcard\(([^;]*?)\)(?=[,)])", js):
        args = m.group(1).split(",")
        if len(args) == 4 and "href" not in args[3]:
            assert re.match(r'\s*"#/[a-z]+"\s*$', args[3]), m.group(0)
    assert not re.search(r"\b(src|action|formaction|xlink:href)\s*:", js), "no other URL attribute"
    # tools/embed makes C string literals of these: keep out trigraphs.
    for name in ("index.html", "console.css", "console.js"):
        with open(os.path.join(CONSOLE_DIR, name)) as f:
            assert "??" not in f.read(), f"{name}: '??' could make a C trigraph"


# ------------------------------------------------------------ the browser test

def browser_or_skip():
    modules = os.environ.get("CAUSEWAY_NODE_MODULES")
    node = shutil.which("node")
    why = []
    if not node:
        why.append("node is not installed")
    if not modules or not os.path.isdir(os.path.join(modules, "playwright-core")):
        why.append("CAUSEWAY_NODE_MODULES does not name a node_modules with playwright-core")
    if not os.access(CHROMIUM, os.X_OK):
        why.append(f"{CHROMIUM} is missing (Debian package chromium)")
    if why:
        pytest.skip("; ".join(why) + ": run tools/dev test, which installs them")
    return node, modules


class Scenario:
    """The daemon's world for the browser: three peers, traffic, a held
    message and a dead letter; answers the script's NEED lines."""

    def __init__(self, d):
        self.d = d
        specs = GK_TG + (("sp", "spam.example"),)
        self.peers = {name: made for (name, _), made in zip(specs, push_peers(d, specs))}
        gk, tg, sp = (self.peers[n][0] for n in ("gk", "tg", "sp"))
        # gk <-> sp: the traffic (and, once the rule is in, the denied message)
        self.chat = self.room(gk, [gk.user("alice"), sp.user("carol")])
        self.sent = 0
        self.traffic(3)
        self.peers["sp"][1].wait_events(3)
        # a first contact for a local user: held
        r = d.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True})
        assert r.status_code == 200, r.text
        # a group with a local member, of which the console removes dan
        r = gk.create_room([gk.user("alice"), sp.user("carol"), gk.user("dan"), ALICE], kind="group",
                           name="Book club")
        assert r.status_code == 201, r.text
        self.group = r.json()["id"]
        dm = self.room(gk, [gk.user("wally"), ALICE])
        self.held = self.send(gk, dm, gk.user("wally"), "hello, do you know me?")
        # gk -> tg while tg is down: a dead letter
        self.peers["tg"][1].fail_next = 10 ** 6
        self.down = self.room(gk, [gk.user("alice"), tg.user("bob")])
        self.dead = self.send(gk, self.down, gk.user("alice"), "are you there?")
        self.dead_row(self.dead)
        self.again = None

    def dead_row(self, message):
        """The outbox row of message to tg, once it is a dead letter."""
        def dead_now():
            rows = self.d.admin("GET", "/outbox?state=dead&destination=peer:tg").json()["rows"]
            return [x for x in rows if x["message"] == message]
        return wait_until(dead_now, timeout=20, what="the dead letter")[0]

    @staticmethod
    def room(client, members):
        r = client.create_room(members)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    @staticmethod
    def send(client, room, sender, text):
        r = client.send(room, sender, text)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def traffic(self, n):
        gk = self.peers["gk"][0]
        for i in range(n):
            self.send(gk, self.chat, gk.user("alice"), f"traffic {self.sent}")
            self.sent += 1
        return n

    def answer(self, need):
        if need == "traffic":
            n = self.traffic(5)
            self.peers["sp"][1].wait_events(self.sent)
            return str(n)
        if need == "denied":
            sp = self.peers["sp"][0]
            return self.send(sp, self.chat, sp.user("carol"), "buy now")
        if need == "heal":
            self.peers["tg"][1].fail_next = 0
            return self.dead
        if need == "another dead letter":
            gk = self.peers["gk"][0]
            self.peers["tg"][1].fail_next = 10 ** 6
            msg = self.send(gk, self.down, gk.user("alice"), "still there?")
            self.again = self.dead_row(msg)
            self.peers["tg"][1].fail_next = 0
            return msg
        if need == "replay it elsewhere":
            r = self.d.admin("POST", f"/outbox/{self.again['id']}/replay")
            assert r.status_code == 200, r.text
            return str(self.again["id"])
        if need == "group":
            return self.group
        if need == "big group":
            # more members than a page of the console (50)
            gk = self.peers["gk"][0]
            r = gk.create_room([gk.user(f"m{i:02}") for i in range(60)], kind="group", name="Big group")
            assert r.status_code == 201, r.text
            return r.json()["id"]
        if need == "removed":
            dan = self.peers["gk"][0].user("dan")

            def told(name):
                return [e for e in list(self.peers[name][1].events) if e["type"] == "membership"
                        and e["room_id"] == self.group and e["content"] == {"membership": "leave", "target": dan,
                                                      "by": self.d.options["server"]["domain"]}]
            for name in ("gk", "sp"):
                wait_until(lambda: told(name), what=f"dan's leaving at {name}")
            return json.dumps({name: len(told(name)) for name in ("gk", "sp")})
        if need == "a push url stored before its check":
            url = self.peers["sp"][1].url.replace("://", "://u:pw@", 1)
            self.pg.psql(f"UPDATE peers SET push_url = '{url}' WHERE name = 'sp'", self.db_url)
            (sp,) = [p for p in self.d.admin("GET", "/peers").json()["peers"] if p["name"] == "sp"]
            assert sp["push_url_problem"], sp
            return sp["push_url_problem"]
        raise AssertionError(f"the browser script asked for {need!r}")

    def close(self):
        for _, srv in self.peers.values():
            srv.close()


def run_script(node, modules, env, scenario, timeout=150):
    """Runs console.mjs, answering its NEED lines; returns (exit code, results, other output)."""
    proc = subprocess.Popen([node, SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    lines = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)), daemon=True).start()
    results, other = [], []
    deadline = time.time() + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                raise AssertionError(f"console.mjs did not finish in {timeout}s; so far: {results} {other}")
            if line is None:
                break
            line = line.rstrip("\n")
            if line.startswith("NEED "):
                proc.stdin.write(scenario.answer(line[5:].strip()) + "\n")
                proc.stdin.flush()
            elif line.startswith("{"):
                results.append(json.loads(line))
            elif line:
                other.append(line)
        return proc.wait(timeout=30), results, other
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_console_in_a_browser(make_daemon, db_url, pg):
    node, modules = browser_or_skip()
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2", "retry_base_ms": "20",
                                                    "retry_max_ms": "50"}}).start()
    r = d.admin("POST", "/tokens", json={"name": "night-viewer", "role": "viewer"})
    assert r.status_code == 201, r.text
    viewer = r.json()["token"]
    scenario = Scenario(d)
    scenario.pg, scenario.db_url = pg, db_url
    # A consent of a domain no peer has, as one stored before the admin API
    # refused them: the users page marks it.
    pg.psql("INSERT INTO consents (local_identity_id, subject_kind, subject, state, source) SELECT id, 'domain', "
            f"'nowhere.example', 'blocked', 'admin' FROM identities WHERE uri = '{ALICE}'", db_url)
    shutil.rmtree(SHOTS, ignore_errors=True)
    os.makedirs(SHOTS)
    env = dict(os.environ, BASE_URL=d.url, ADMIN_TOKEN=ADMIN_TOKEN, VIEWER_TOKEN=viewer,
               SCREENSHOT_DIR=SHOTS, CAUSEWAY_NODE_MODULES=modules, CHROMIUM=CHROMIUM)
    try:
        rc, results, other = run_script(node, modules, env, scenario)
    finally:
        scenario.close()
    failed = [x for x in results if not x["ok"]]
    report = "\n".join(f"{'ok  ' if x['ok'] else 'FAIL'} {x['check']}: {x['detail']}" for x in results)
    assert rc == 0 and not failed, f"console.mjs exited {rc}\n{report}\nother output:\n" + "\n".join(other[-40:])
    checks = {x["check"] for x in results}
    for must in ("a token with an invisible character inside is refused, and not sent",
                 "sign in as admin", "dashboard shows live numbers",
                 "a hidden tab asks for nothing until it is shown again",
                 "the chart draws every minute of the window, the oldest too", "add a deny rule", "a setting emptied is not saved as 0",
                 "the next message is denied, and its trace says why", "replay a dead letter and see it delivered",
                 "a replay answered 409 shows why, and the row its state now",
                 "a destination filter that matches nothing says so",
                 "a list answered late for a filter changed since is not shown",
                 "a long audit detail is folded between characters",
                 "an option waiting for a restart shows the value it waits with",
                 "allow a held sender", "a consent of a domain of no peer is marked",
                 "remove a peer's user from a group",
                 "a big group's members come a page at a time",
                 "a viewer sees no change controls on any page",
                 "a change whose answer is lost may have been done, and says so",
                 "an answer that is not the daemon's JSON is said so",
                 "a time is shown in the browser's zone, the zone named",
                 "add a peer pasted with white space around its fields",
                 "a push URL nothing is pushed to is said under it, as text",
                 "phone width: dashboard and navigation",
                 "no CSP violation, console error or page error"):
        assert must in checks, f"check not run: {must}\n{report}"
    # What the browser did, seen from the API.
    rules = d.admin("GET", "/rules").json()["rows"]
    assert [(x["scope"], x["pattern"], x["mode"], x["comment"]) for x in rules] == \
        [("domain", "spam.example", "deny", "console test: no spam")]
    assert d.admin("GET", "/settings").json()["policy.report_limit_threshold"] == 5
    trace = d.admin("GET", f"/messages/{scenario.dead}").json()
    (tg,) = [x for x in trace["deliveries"] if x["destination"] == "peer:tg"]
    assert tg["state"] == "delivered" and tg["tries"][-1]["ok"] and tg["tries"][-1]["code"] == 200, tg
    audit = d.admin("GET", "/audit?actor=admin:config").json()["rows"]
    assert {"rule.create", "settings.update", "outbox.replay", "consent.set", "room.members"} <= \
        {x["action"] for x in audit}
    members = {m["uri"]: (m["membership"], m["local"]) for m in
               d.admin("GET", f"/rooms/{scenario.group}").json()["members"]}
    assert members == {"mimi://wa.example/u/alice": ("joined", False), "mimi://spam.example/u/carol": ("joined", False),
                       # a local user a peer put into the group is invited until she
                       # takes part herself (docs/policy.md, since the thirty-first session)
                       "mimi://wa.example/u/dan": ("left", False), ALICE: ("invited", True)}, members
    assert d.admin("GET", "/held").json()["rows"] == [], "the held message was released"
    assert not d.admin("GET", "/audit?actor=admin:night-viewer").json()["rows"], "the viewer changed nothing"
    (peer,) = [p for p in d.admin("GET", "/peers").json()["peers"] if p["name"] == "console-peer"]
    assert (peer["domain"], peer["mode"]) == ("console.example", "pull"), peer
    # The lost answer's request never left the browser (the route aborted it).
    assert "lost-answer" not in [t["name"] for t in d.admin("GET", "/tokens").json()["tokens"]]
    shots = sorted(os.listdir(SHOTS))
    assert len([s for s in shots if s.endswith(".png")]) >= 30, shots


MARKUP = ('<img src="http://127.0.0.1:9/x.png" onerror="window.__pwned=1"><script>window.__pwned=2</script>'
          '<b class="planted">bold</b><a href="javascript:window.__pwned=3">link</a>&amp;')


def test_stored_markup_is_shown_as_text_in_a_browser(make_daemon, db_url, pg):
    """What others wrote (a rule's comment, a report's comment, a room's
    name a peer gave, and the audit records that repeat them) holding
    markup, a script, a javascript: link and an entity: the
    console shows each as the text it is, runs none of it and loads
    nothing it names, page by page in a real Chromium (the sources' own
    rules are test_console_sources_keep_to_the_csp)."""
    stored_text_in_a_browser(make_daemon, db_url, pg, MARKUP, MARKUP)


# A right-to-left override that would show "exe.pdf" as "fdp.exe" and turn
# the rest of its cell round, an isolate never closed, a mark, a C1 control,
# the line separator, and Hebrew, a right-to-left script a name may be in.
BIDI = "invoice\u202efdp.exe \u2067(gk)\u200f \u05e9\u05dc\u05d5\u05dd 12\u0085\u2028end"
BIDI_SHOWN = "invoice\\u202efdp.exe \\u2067(gk)\\u200f \u05e9\u05dc\u05d5\u05dd 12\\u0085\\u2028end"


def test_stored_bidi_controls_are_shown_escaped_in_a_browser(make_daemon, db_url, pg):
    """The same fields holding bidirectional controls (overrides, isolates,
    marks) and other controls: the console shows each as its \\u escape
    (the list the log and causewayctl escape, cw_utf8_display_control) and
    isolates right-to-left text in a <bdi>, so that a peer's room name or a
    user's comment cannot turn round what is shown in the operator's view.
    The peer API refuses such a room name, and the APIs such a report
    comment (since the forty-eighth session) and a rule's (since the
    fiftieth); one stored before they did (or given where no check
    applies) is stored here by hand. Until the
    forty-fifth session they went into the page raw."""
    stored_text_in_a_browser(make_daemon, db_url, pg, BIDI, BIDI_SHOWN)


def pg_text(s):
    """s as a PostgreSQL string constant (E'', each character past ASCII as \\uXXXX)."""
    return "E'" + "".join(c if " " <= c < "\x7f" and c not in "'\\" else f"\\u{ord(c):04x}" for c in s) + "'"


def stored_text_in_a_browser(make_daemon, db_url, pg, text, shown):
    """Stores text where others write (a rule's and a report's comment, a
    room's name a peer gave: the audit records repeat them) and runs
    console_markup.mjs on the pages that show it."""
    node, modules = browser_or_skip()
    d = make_daemon(db_url).start()
    (gk, srv), (tg, srv2) = push_peers(d, GK_TG)
    try:
        r = d.admin("POST", "/rules", json={"scope": "domain", "pattern": "spam.example", "mode": "deny",
                                             "comment": "commented below" if text == BIDI else text})
        assert r.status_code == 201, r.text
        if text == BIDI:  # refused by the API since the fiftieth session; one stored before is shown so,
            # in the rule and in its creation's audit record (whose details are the rule as answered)
            pg.psql("UPDATE rules SET comment = " + pg_text(text) + f" WHERE id = {r.json()['id']}", db_url)
            pg.psql("UPDATE audit_log SET details = jsonb_set(details, '{comment}', to_jsonb(" + pg_text(text)
                    + "::text)) WHERE action = 'rule.create' AND subject = 'spam.example'", db_url)
        r = d.admin("POST", "/reports", json={"subject": gk.user("wally"), "reason": "spam",
                                               "comment": "commented below" if text == BIDI else text})
        assert r.status_code == 201, r.text
        if text == BIDI:  # refused by the API since the forty-eighth session; one stored before is shown so
            pg.psql("UPDATE reports SET comment = " + pg_text(text) + f" WHERE id = {r.json()['id']}", db_url)
        r = gk.create_room([gk.user("wally"), tg.user("tina"), ALICE], name="named below" if text == BIDI else text)
        assert r.status_code == 201, r.text
        room = r.json()["id"]
        if text == BIDI:
            pg.psql("UPDATE rooms SET name = " + pg_text(text) + f" WHERE public_id = '{room}'", db_url)
        env = dict(os.environ, BASE_URL=d.url, ADMIN_TOKEN=ADMIN_TOKEN, MARKUP=text, SHOWN=shown,
                   CAUSEWAY_NODE_MODULES=modules, CHROMIUM=CHROMIUM,
                   PAGES=",".join(["#/rules", "#/reports", "#/audit", "#/rooms", f"#/rooms/{room}"]))
        p = subprocess.run([node, os.path.join(TOP_SRCDIR, "tests", "browser", "console_markup.mjs")],
                           capture_output=True, text=True, env=env, timeout=180)
        results = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
        report = "\n".join(f"{'ok  ' if x['ok'] else 'FAIL'} {x['check']}: {x['detail']}" for x in results)
        assert p.returncode == 0 and len(results) == 5 and all(x["ok"] for x in results), \
            f"exit {p.returncode}\n{report}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    finally:
        srv.close()
        srv2.close()
