"""The Matrix adapter through the real daemon and the homeserver stand-in
(tests/integration/homeserver.py): registration, the appservice API and its
errors, transactions (dedupe, echoes), and messages both ways between a peer
and a Matrix user in a direct room."""
import collections
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import urllib.parse

import psycopg
import pytest
import requests
import yaml

from harness import (CAUSEWAYD, NAMES_SHOWN, HeldSession, answered_at, delivered_to_her, free_port, outbox_state_of,
                     stopped_in, wait_until)
import homeserver
from homeserver import Homeserver
from peer import MediaServer, NotifyServer, PeerClient
from pgproxy import PgProxy
from test_admin_api import reloads
from test_peer_auth import read_answer, send_head
from test_retention import dangling, written_while_deleted

AS_TOKEN = "as-" + "a" * 40
HS_TOKEN = "hs-" + "b" * 40
ALICE_MX = "@alice:example.org"
ALICE = "mimi://example.org/u/alice"
# The answer to a report that took none of its subject's messages as
# evidence (policy_report_evidence_words)
NO_EVIDENCE = "with no message of theirs: none that reached you is kept here"
REPORTED = f"Reported to the operator, {NO_EVIDENCE}. Thank you."


def registration(url="http://127.0.0.1:1"):
    return {"id": "causeway", "url": url, "as_token": AS_TOKEN, "hs_token": HS_TOKEN,
            "sender_localpart": "_cw_bot", "rate_limited": False, "receive_ephemeral": True,
            "de.sorunome.msc2409.push_ephemeral": True,
            "namespaces": {"users": [{"exclusive": True, "regex": "^@_cw_.*:example\\.org$"}],
                           "aliases": [{"exclusive": True, "regex": "^#_cw_.*:example\\.org$"}], "rooms": []}}


@pytest.fixture
def hs():
    h = Homeserver(server_name="example.org", registration=registration())
    h.start()
    yield h
    h.close()


@pytest.fixture
def mx(make_daemon, db_url, hs):
    return start_mx(make_daemon, db_url, hs)


def start_mx(make_daemon, db_url, hs, **sections):
    """The daemon with the Matrix adapter, registered with the stand-in (its
    port chosen first: the homeserver must reach it for the start-up ping);
    sections: more configuration ({"dispatcher": {...}}), merged."""
    port = free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    options = {"server": {"port": str(port)},
               "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN, "hs_token": HS_TOKEN}}
    for section, values in sections.items():
        options.setdefault(section, {}).update(values)
    return make_daemon(db_url, options=options).start()


def add_gk(d):
    """The push peer gk of daemon d: (client, its notify server)."""
    srv = NotifyServer()
    directory = d.get("/.well-known/mimi-protocol-directory").json()
    srv.public_b64 = directory["public_key"]["key"]
    client = PeerClient(d.url, "gk", "wa.example")
    r = d.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "mode": "push",
                                       "push_url": srv.url, "public_key": client.signer.public_b64})
    assert r.status_code == 201, r.text
    client.token = r.json()["token"]
    return client, srv


@pytest.fixture
def gk(mx):
    client, srv = add_gk(mx)
    yield client, srv
    srv.close()


def alice_writes_to_wally(hs, a):
    """Alice opens a direct room with the ghost of wally (whom the peer a
    introduces): (her client, the room, the ghost), the ghost joined."""
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])
    ghost = "@_cw_gk_wally:example.org"
    room = alice.create_dm(ghost)
    wait_until(lambda: hs.members(room).get(ghost) == "join", what="the ghost joins")
    return alice, room, ghost


def wally_wrote_to_alice(mx, hs, a, pg, db_url):
    """wally (of the peer a) wrote to alice, who consented: (the neutral
    room, her Matrix room), bound."""
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    a.send(room, a.user("wally"), "hello")
    mx_room = wait_until(lambda: next(iter(hs.rooms()), None), what="the direct room")
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings", db_url) == "1", what="the binding")
    return room, mx_room


def bot_answer(said, send):
    """What the bot says next (said: its words so far) after send()."""
    n = len(said())
    send()
    wait_until(lambda: len(said()) > n, what="the answer")
    return said()[n]


def alice_and_the_bot(hs, name="alice"):
    """Alice (or the user name) opens a room with the bot: (her client, the
    room, a function giving what the bot said there), once the bot has said
    its help. causewayd registers the bot after it answers /readyz, so
    the bot is waited for first: an invite of a user the homeserver does
    not know yet is a 404 (a start_mx with extra sections was fast enough
    to lose that race once in CI, stop 48)."""
    bot = "@_cw_bot:example.org"
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")
    _, alice_token = hs.create_user(name)
    alice = hs.as_user(alice_token)
    mgmt = alice.create_dm(bot)
    said = lambda: [e["content"]["body"] for e in hs.events(mgmt)  # noqa: E731
                    if e["type"] == "m.room.message" and e["sender"] == bot]
    wait_until(lambda: any("Commands" in n for n in said()), what="the bot's help")
    return alice, mgmt, said


def consent_alice(mx, subject="mimi://wa.example/u/wally"):
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user", "subject": subject,
                                               "state": "allowed"}).ok


def as_put(mx, txn, body, token=HS_TOKEN, legacy=False, query_token=False):
    path = f"/transactions/{txn}" if legacy else f"/_matrix/app/v1/transactions/{txn}"
    headers = {} if query_token or token is None else {"Authorization": "Bearer " + token}
    if query_token:
        path += "?access_token=" + token
    return requests.put(mx.url + path, json=body, headers=headers, timeout=10)


def test_registration_yaml(tmp_path):
    env = {"CAUSEWAY_SERVER_DOMAIN": "example.org", "CAUSEWAY_DATABASE_URL": "postgresql:///none"}
    out = subprocess.run([CAUSEWAYD, "--matrix-registration"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    reg = yaml.safe_load(out.stdout)
    assert set(reg) >= {"id", "url", "as_token", "hs_token", "sender_localpart", "namespaces", "rate_limited",
                        "receive_ephemeral", "de.sorunome.msc2409.push_ephemeral"}
    assert reg["rate_limited"] is False and reg["receive_ephemeral"] is True
    assert reg["de.sorunome.msc2409.push_ephemeral"] is True
    assert len(reg["as_token"]) == 64 and reg["as_token"] != reg["hs_token"]
    assert "as_token and hs_token" in out.stdout  # the note to put them in the configuration
    users = reg["namespaces"]["users"]
    assert users == [{"exclusive": True, "regex": "^@_cw_.*:example\\.org$"}]
    assert reg["namespaces"]["aliases"] == [{"exclusive": True, "regex": "^#_cw_.*:example\\.org$"}]
    # Anchored at both ends: Synapse matches with re.match (at the start
    # only), as the stand-in does; until the thirtieth session the regex
    # had no anchors and claimed @_cw_x:example.org.evil.com too.
    claims = Homeserver(server_name="example.org", registration=reg)
    for kind, yes, no in (("users", "@_cw_gk_wally:example.org", "@_cw_gk_wally:example.org.evil.com"),
                          ("aliases", "#_cw_room:example.org", "#_cw_room:example.org.evil.com")):
        assert claims._in_namespace(kind, yes) and not claims._in_namespace(kind, no), kind
    # With tokens configured, they are printed as they are.
    env.update({"CAUSEWAY_MATRIX_AS_TOKEN": AS_TOKEN, "CAUSEWAY_MATRIX_HS_TOKEN": HS_TOKEN})
    reg = yaml.safe_load(subprocess.run([CAUSEWAYD, "--matrix-registration"], capture_output=True, text=True,
                                        env=env, timeout=30).stdout)
    assert (reg["as_token"], reg["hs_token"]) == (AS_TOKEN, HS_TOKEN)
    # Tokens of any length, with characters YAML escapes inside quotes, are
    # printed whole (until the seventeenth session they were cut at 64).
    long_as, long_hs = "as-" + "x" * 200 + '"\\', "hs-" + "y" * 100 + "'#:{z}"
    env.update({"CAUSEWAY_MATRIX_AS_TOKEN": long_as, "CAUSEWAY_MATRIX_HS_TOKEN": long_hs})
    out = subprocess.run([CAUSEWAYD, "--matrix-registration"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    reg = yaml.safe_load(out.stdout)
    assert (reg["as_token"], reg["hs_token"]) == (long_as, long_hs)
    # A token no Authorization header can carry (a space, a control
    # character) is refused with the reason.
    env["CAUSEWAY_MATRIX_HS_TOKEN"] = "hs token"
    out = subprocess.run([CAUSEWAYD, "--matrix-registration"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode != 0 and not out.stdout
    assert "matrix.hs_token" in out.stderr and "space" in out.stderr, out.stderr


def test_appservice_auth_and_errors(mx):
    body = {"events": []}
    r = as_put(mx, "1", body, token=None)
    assert r.status_code == 401 and r.json()["errcode"] == "M_MISSING_TOKEN"
    r = as_put(mx, "1", body, token="nope")
    assert r.status_code == 403 and r.json()["errcode"] == "M_FORBIDDEN"
    assert as_put(mx, "1", body).status_code == 200
    assert as_put(mx, "2", body, legacy=True).status_code == 200
    assert as_put(mx, "3", body, query_token=True).status_code == 200
    # Both the header and the legacy parameter: they must match (the
    # specification's Authorization section).
    for path in ("/_matrix/app/v1/transactions/3b", "/_matrix/app/v1/users/%40_cw_gk_x%3Aexample.org"):
        r = requests.request("PUT" if "transactions" in path else "GET", mx.url + path + "?access_token=wrong",
                             json=body, headers={"Authorization": "Bearer " + HS_TOKEN}, timeout=10)
        assert r.status_code == 403 and r.json()["errcode"] == "M_FORBIDDEN", (path, r.text)
        r = requests.request("PUT" if "transactions" in path else "GET", mx.url + path + "?access_token=" + HS_TOKEN,
                             json=body, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 403 and r.json()["errcode"] == "M_FORBIDDEN", (path, r.text)
    r = requests.put(mx.url + "/_matrix/app/v1/transactions/3c?access_token=" + HS_TOKEN, json=body,
                     headers={"Authorization": "Bearer " + HS_TOKEN}, timeout=10)
    assert r.status_code == 200
    r = requests.get(mx.url + "/_matrix/app/v1/nothing", headers={"Authorization": "Bearer " + HS_TOKEN})
    assert r.status_code == 404 and r.json()["errcode"] == "M_UNRECOGNIZED"
    r = requests.delete(mx.url + "/_matrix/app/v1/transactions/4", headers={"Authorization": "Bearer " + HS_TOKEN})
    assert r.status_code == 405 and r.json()["errcode"] == "M_UNRECOGNIZED"
    r = requests.put(mx.url + "/_matrix/app/v1/transactions/5", data=b"{not json",
                     headers={"Authorization": "Bearer " + HS_TOKEN, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["errcode"] == "M_NOT_JSON"
    r = as_put(mx, "6", {"events": {"a": 1}})
    assert r.status_code == 400 and r.json()["errcode"] == "M_BAD_JSON"
    # The ping answers with the homeserver's token only.
    r = requests.post(mx.url + "/_matrix/app/v1/ping", json={"transaction_id": "x"},
                      headers={"Authorization": "Bearer " + HS_TOKEN})
    assert r.status_code == 200 and r.json() == {}


def test_a_large_transaction_is_taken(mx):
    """A homeserver's transaction may hold 100 events of up to 64 KiB: the
    transaction routes take bodies up to matrix.max_transaction_bytes (16
    MiB), past server.max_body_bytes (1 MiB), which still bounds the rest.
    Before, one over 1 MiB was answered 413, and the homeserver would send
    it again for ever, holding back every transaction after it."""
    ev = lambda i: {"type": "m.room.message", "room_id": "!elsewhere:example.org", "sender": "@alice:example.org",
                    "event_id": f"$big{i}", "origin_server_ts": 1764300000000 + i,
                    "content": {"msgtype": "m.text", "body": "x" * 60000}}
    big = {"events": [ev(i) for i in range(30)]}
    assert len(json.dumps(big)) > 1_700_000
    for legacy in (False, True):
        r = as_put(mx, f"big-{legacy}", big, legacy=legacy)
        assert r.status_code == 200, (legacy, r.status_code, r.text[:200])
    r = requests.put(mx.url + "/_matrix/app/v1/transactions/huge", data=b" " * (17 << 20),
                     headers={"Authorization": "Bearer " + HS_TOKEN, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = requests.post(mx.url + "/v1/batch", data=b" " * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    # The large limit is the homeserver's alone, its token checked before
    # the body is read: anyone else is held to server.max_body_bytes
    # (before, anyone could make the daemon buffer 32 MiB a connection).
    body = json.dumps(big).encode()
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        r = requests.put(mx.url + "/_matrix/app/v1/transactions/nobody", data=body,
                         headers=dict(auth, **{"Content-Type": "application/json"}))
        assert r.status_code == 413, (auth, r.status_code, r.text[:200])
    # Under that cap, the token is checked from the headers too: anyone
    # else is refused before a byte of the body (900 KB announced, never
    # sent) is read, with no 100 Continue (until the forty-ninth session
    # the handler checked it, after reading the whole body).
    for path in ("/_matrix/app/v1/transactions/nobody", "/transactions/nobody", "/_matrix/app/v1/ping"):
        for auth, want, code in (([], 401, "M_MISSING_TOKEN"), ([("Authorization", "Bearer wrong")], 403,
                                                                 "M_FORBIDDEN")):
            for expect in (True, False):
                h = auth + [("Content-Type", "application/json"), ("Content-Length", "900000")]
                if expect:
                    h.append(("Expect", "100-continue"))
                s = send_head(mx.port, "POST" if path.endswith("ping") else "PUT", path, h)
                try:
                    status, _, answer, interim = read_answer(s, 5)
                finally:
                    s.close()
                assert status == want and interim == [], (path, auth, expect, status, interim)
                assert json.loads(answer)["errcode"] == code, (path, auth, answer)
    r = requests.put(mx.url + "/_matrix/app/v1/transactions/query-token", data=body,
                     params={"access_token": HS_TOKEN}, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:200]
    # A small body without the token is still told why.
    r = requests.put(mx.url + "/_matrix/app/v1/transactions/small", json={"events": []})
    assert r.status_code == 401 and r.json()["errcode"] == "M_MISSING_TOKEN"


def metrics(d, name):
    """{labels: value} of one metric from /metrics."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^" + name + r"\{([^}]*)\} (\S+)$", d.get("/metrics").text, re.M)}


def test_ping_at_start_is_reported(mx, hs):
    wait_until(lambda: mx.get("/readyz").json()["adapters"]["matrix"]["ping"] != "pending", what="the ping")
    health = mx.get("/readyz").json()["adapters"]["matrix"]
    assert health["ping"] == "ok", health
    assert metrics(mx, "causeway_matrix_ping") == {'state="pending"': 0, 'state="ok"': 1, 'state="failed"': 0,
                                                   'state="unsupported"': 0}


def test_a_homeserver_without_the_ping_is_no_failed_ping(make_daemon, db_url):
    """A homeserver older than Matrix 1.7 has no appservice ping (404
    M_UNRECOGNIZED), and the adapter works with it all the same: it is not
    pinged again, and its state is `unsupported`, not `failed` (until the
    thirty-fourth session it was `failed` for good, and the alert
    docs/operations.md gives on causeway_matrix_ping{state="failed"} fired
    for as long as the daemon ran)."""
    hs = Homeserver(server_name="example.org", registration=registration(), ping_supported=False)
    hs.start()
    try:
        d = start_mx(make_daemon, db_url, hs)
        wait_until(lambda: d.get("/readyz").json()["adapters"]["matrix"]["ping"] != "pending", what="the ping")
        health = d.get("/readyz").json()["adapters"]["matrix"]
        assert health["ping"] == "unsupported", health
        assert "M_UNRECOGNIZED" in health["last_error"], health
        assert metrics(d, "causeway_matrix_ping") == {'state="pending"': 0, 'state="ok"': 0, 'state="failed"': 0,
                                                      'state="unsupported"': 1}
        wait_until(lambda: hs.user_exists("@_cw_bot:example.org"), what="the bot registered")
        time.sleep(2.5)  # past the second try's wait (1 s, then 2 s)
        assert len([q for q in hs.requests if q["path"].endswith("/ping")]) == 1
    finally:
        hs.close()


def test_the_bot_asked_for_before_its_registration_is_registered_then(make_daemon, db_url, hs):
    """The homeserver refused the bot's registration at start (it came up
    after causewayd), and a user invites the bot before causewayd's next
    try (1, 2, 4 ... s apart): the homeserver asks the application service
    about the unknown user of its namespace, which registers the bot before
    it answers 200, as it does a ghost, and the invitation goes through.
    Until the thirty-fifth session the query was answered 404 and the
    invitation refused as of an unknown user (a CI run of stop 48 lost
    that race)."""
    bot = "@_cw_bot:example.org"
    registers = lambda: [q for q in hs.requests if q["path"] == "/_matrix/client/v3/register"]  # noqa: E731
    hs.refuse = lambda method, path, user: path == "/_matrix/client/v3/register"
    start_mx(make_daemon, db_url, hs)
    wait_until(lambda: len(registers()) >= 3, timeout=20, what="three refused registrations")
    hs.refuse = None
    _, alice_token = hs.create_user("alice")
    mgmt = hs.as_user(alice_token).create_dm(bot)  # the invitation of a user it does not know yet
    assert hs.user_exists(bot)
    # Registered by the query, during the createRoom, not by the next try
    # before it; a try after it (4 s after the third, or sooner on a slow
    # machine) is M_USER_IN_USE, not the registration (session 35).
    [create] = [q for q in hs.requests if q["path"].endswith("/createRoom")]
    made = [q for q in registers() if q["status"] == 200]
    assert len(made) == 1 and made[0]["time"] >= create["time"], (made, create["time"])
    wait_until(lambda: hs.members(mgmt).get(bot) == "join", what="the bot in its room")


def test_a_homeserver_that_comes_up_later_is_pinged_and_has_the_bot(make_daemon, db_url, hs):
    """The homeserver answers 503 while causewayd starts (restarting behind
    its proxy): the bot's registration and the ping are tried again until
    they succeed (until the seventeenth session, once at start only)."""
    hs.refuse = lambda method, path, user: True
    d = start_mx(make_daemon, db_url, hs)
    wait_until(lambda: d.get("/readyz").json()["adapters"]["matrix"]["ping"] == "failed", what="the failed ping")
    assert not hs.user_exists("@_cw_bot:example.org")
    hs.refuse = None  # the homeserver is up now
    wait_until(lambda: d.get("/readyz").json()["adapters"]["matrix"]["ping"] == "ok", timeout=20,
               what="the ping once the homeserver is up")
    # (waited for: the homeserver may have come up between a try's refused
    # registration and its ping, and the registration is the next try's)
    wait_until(lambda: hs.user_exists("@_cw_bot:example.org"), what="the bot registered")
    # Done: nothing more is asked.
    time.sleep(2.5)
    pings = [q for q in hs.requests if q["path"].endswith("/ping")]
    assert pings[-1]["status"] == 200 and len([q for q in pings if q["status"] == 200]) == 1


def test_a_stop_does_not_wait_for_the_next_ping(make_daemon, db_url, hs):
    """While the homeserver stays away, the next try is up to a minute
    away: a stop does not wait for it."""
    hs.refuse = lambda method, path, user: True
    d = start_mx(make_daemon, db_url, hs)
    pings = lambda: [q for q in hs.requests if q["path"].endswith("/ping")]  # noqa: E731
    wait_until(lambda: len(pings()) >= 4, timeout=30, what="four pings")  # 1, 2 and 4 s apart, the next 8 s on
    assert d.stop() == 0
    # Over before the next try was due: a stop that waited for it ends
    # after (not "within 3 s" of the third, 4 s before the next: a loaded
    # machine's stop can take longer; session 35).
    fourth = pings()[3]
    assert time.time() < fourth["time"] + 8, time.time() - fourth["time"]
    assert len(pings()) == 4


def test_a_ping_answered_by_another_process_is_ok(make_daemon, db_url, hs):
    """Several processes behind one registration URL: the homeserver's ping
    reaches one of them; its 200 (with the duration) tells every pinging
    process that the homeserver reaches the appservice."""
    port_b, port_a = free_port(), free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port_b}"  # the balancer sends the pings to b
    opts = lambda p: {"server": {"port": str(p)},  # noqa: E731
                      "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN, "hs_token": HS_TOKEN}}
    b = make_daemon(db_url, options=opts(port_b)).start()
    a = make_daemon(db_url, options=opts(port_a)).start()
    for d in (a, b):
        wait_until(lambda: d.get("/readyz").json()["adapters"]["matrix"]["ping"] != "pending", what="the ping")
        health = d.get("/readyz").json()["adapters"]["matrix"]
        assert health["ping"] == "ok", health


def test_a_display_name_as_long_as_a_peer_may_give_is_shortened(make_daemon, db_url, hs, tmp_path):
    """The peer API takes names of 256 bytes; the ghost's name (with its
    network after it) is cut at a character's boundary (to the 256
    characters Synapse takes until the thirtieth session, to 64 since),
    and the avatar is set whatever became of the name
    (until the seventeenth session both were refused, again and again)."""
    media = MediaServer(tmp_path)
    try:
        mx = start_mx(make_daemon, db_url, hs, server={"ca_file": media.cert_file,
                                                      "media_private_addresses": "true"})
        a, srv = add_gk(mx)
        consent_alice(mx)
        hs.create_user("alice")
        ghost = "@_cw_gk_wally:example.org"
        face = b"\x89PNG\r\n\x1a\n" + os.urandom(900)
        url = media.put("/u/wally.png", "image/png", face)
        avatar = {"content_type": "image/png", "url": url, "size": len(face),
                  "sha256": hashlib.sha256(face).hexdigest()}
        name = "W" * 250 + "é" * 3  # 256 bytes, 253 characters
        assert len(name.encode()) == 256
        r = a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": name, "avatar": avatar})
        assert r.status_code == 200, r.text
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        a.send(room, a.user("wally"), "hi")
        wait_until(lambda: hs.profile(ghost).get("avatar_url"), what="the ghost's avatar")
        assert hs.profile(ghost)["displayname"] == "W" * 63 + "…" + " (gk)"  # (the name part's cap, below)
        # Nor is the name refused when the ghost is made: every PUT was taken.
        puts = [q for q in hs.requests if q["method"] == "PUT" and "/profile/" in q["path"]]
        assert puts and all(q["status"] == 200 for q in puts), puts
        # A name the homeserver refuses does not keep the avatar from being set.
        hs.refuse = lambda method, path, user: method == "PUT" and path.endswith("/displayname")
        consent_alice(mx, "mimi://wa.example/u/vera")
        r = a.call("POST", "/v1/profiles", {"user": a.user("vera"), "display_name": "Vera", "avatar": avatar})
        assert r.status_code == 200, r.text
        room = a.create_room([a.user("vera"), ALICE]).json()["id"]
        a.send(room, a.user("vera"), "hi")
        wait_until(lambda: hs.profile("@_cw_gk_vera:example.org").get("avatar_url"), what="vera's avatar")
        srv.close()
    finally:
        media.close()


@pytest.mark.parametrize("name, shown", NAMES_SHOWN)
def test_a_ghosts_name_keeps_its_network_in_sight(mx, hs, gk, pg, db_url, name, shown):
    """A ghost's display name is the peer's name for its user, then the
    peer's: "Wally (gk)".  A name padded with what shows nothing (fillers,
    zero-width characters) or with a bidirectional control, or just long,
    pushed the "(gk)" out of sight (clients cut long names) or reversed it,
    and the ghost passed for a local user.  Since the thirtieth session
    what shows nothing is left out, blanks are one space, and the name part
    is at most 64 characters."""
    a, _ = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    r = a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": name})
    assert r.status_code == 200, r.text
    ghost = "@_cw_gk_wally:example.org"
    names = lambda: [q for q in hs.requests if q["method"] == "PUT" and q["path"].endswith("/displayname")]  # noqa
    before = len(names())
    a.send(room, a.user("wally"), "renamed")
    wait_until(lambda: len(names()) > before, what="the ghost renamed")
    assert hs.profile(ghost)["displayname"] == shown + " (gk)"


def test_peer_to_matrix_and_back(mx, hs, gk, pg, db_url):
    a, srv = gk
    consent_alice(mx)
    alice_id, alice_token = hs.create_user("alice")
    assert alice_id == ALICE_MX
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    r = a.send(room, a.user("wally"), "hello alice")
    assert r.status_code == 202, r.text
    ghost = "@_cw_gk_wally:example.org"
    # The ghost made a direct room, invited alice, and said it there.
    mx_room = wait_until(lambda: next((rid for rid in hs.rooms() if any(
        e["type"] == "m.room.message" and e["sender"] == ghost for e in hs.events(rid))), None), what="delivery")
    msgs = [e for e in hs.events(mx_room) if e["type"] == "m.room.message"]
    assert [m["content"]["body"] for m in msgs] == ["hello alice"]
    assert msgs[0]["content"]["org.causeway.outbox_id"] > 0
    invite = [e for e in hs.events(mx_room) if e["type"] == "m.room.member" and e.get("state_key") == ALICE_MX]
    assert invite and invite[0]["content"]["membership"] == "invite" and invite[0]["content"].get("is_direct")
    assert hs.profile(ghost)["displayname"] == "wally (gk)"
    # Nobody's level reaches "redact": the ghost may redact only its own events, never alice's.
    [pl] = [e["content"] for e in hs.events(mx_room) if e["type"] == "m.room.power_levels"]
    assert pl["redact"] > max(pl["users"].values()), pl
    wait_until(lambda: pg.psql("SELECT state FROM outbox o JOIN events e ON e.id = o.event_id "
                               f"WHERE e.public_id = '{r.json()['id']}'", db_url) == "delivered", what="delivered")
    st = a.call("GET", f"/v1/messages/{r.json()['id']}").json()
    assert [x["status"] for x in st["recipients"]] == ["delivered"]

    # Alice joins and answers: the peer gets it, from her, in its room.
    alice = hs.as_user(alice_token)
    alice.join(mx_room)
    alice.send_text(mx_room, "hi wally")
    got = srv.wait_events(2)  # her joining, then her message
    assert got[0]["type"] == "membership" and got[0]["content"]["membership"] == "join"
    assert got[1]["sender"] == ALICE and got[1]["content"]["parts"][0]["body"] == "hi wally"
    assert got[1]["room_id"] == room
    # Her message came back to nobody else, and the ghost's own echo was dropped.
    assert pg.psql("SELECT count(*) FROM events", db_url) == "3"
    # wally deletes his message: the ghost redacts its own event (allowed under the room's levels).
    d = a.call("POST", f"/v1/rooms/{room}/messages", {"type": "delete", "sender": a.user("wally"),
                                                      "content": {"replaces": r.json()["id"]}}, idem="del-1")
    assert d.status_code == 202, d.text
    red = wait_until(lambda: next((e for e in hs.events(mx_room) if e["type"] == "m.room.redaction"), None),
                     what="the redaction")
    assert red["sender"] == ghost and red.get("redacts", red["content"].get("redacts")) == msgs[0]["event_id"]


def wally_says_hello_losing(hs, a, pg, db_url, lose):
    """wally (of the peer a) writes to alice while the stand-in loses the
    replies lose(method, path, user) says: her Matrix room once bound and
    the message in it."""
    hs.lose_reply = lose
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    a.send(room, a.user("wally"), "hello")
    mx_room = wait_until(lambda: pg.psql("SELECT native_id FROM room_bindings", db_url), timeout=30,
                         what="the binding")
    wait_until(lambda: any(e["type"] == "m.room.message" and e["content"].get("body") == "hello"
                           for e in hs.events(mx_room)), what="the message")
    hs.lose_reply = None
    return mx_room


def test_a_room_whose_making_was_not_answered_is_made_once(mx, hs, gk, pg, db_url):
    """The homeserver makes the ghost's direct room with alice, but its
    answer is lost (the connection drops): the delivery is tried again and
    finds the room made, by the alias in the appservice's namespace given
    at its making, instead of making a second room with a second
    invitation (as until the eighteenth session). The alias goes once the
    room is bound, and was never the room's name (canonical alias)."""
    a, srv = gk
    consent_alice(mx)
    hs.create_user("alice")
    ghost = "@_cw_gk_wally:example.org"
    lost = []

    def lose(method, path, user):
        if method == "POST" and path.endswith("/createRoom") and not lost:
            lost.append(user)
            return True
        return False
    mx_room = wally_says_hello_losing(hs, a, pg, db_url, lose)
    assert lost == [ghost]
    assert hs.rooms() == [mx_room], [r for r in hs.requests if r["path"].endswith("/createRoom")]
    assert [u for u, ms in hs.members(mx_room).items() if ms == "invite"] == [ALICE_MX]
    assert not (hs.state(mx_room, "m.room.canonical_alias") or {}).get("content", {}).get("alias")
    deleted = [r for r in hs.requests if r["method"] == "DELETE" and "/directory/room/" in r["path"]]
    assert deleted and deleted[-1]["status"] == 200 and hs.alias(urllib.parse.unquote(
        deleted[-1]["path"].rsplit("/", 1)[1])) is None, deleted


def test_a_room_found_by_its_alias_before_its_invitation_is_waited_for(mx, hs, gk, pg, db_url):
    """As Synapse does, the stand-in gives the new room its alias before the
    invitations, which come seconds later here: the delivery, tried again
    after the createRoom answer was lost, finds the room by its alias while
    alice has no membership in it yet. It takes that room (inviting her
    itself since the nineteenth session: the homeserver's own invitation,
    when it comes, repeats it); it does not take it for a stale one,
    delete its alias and make a second room (as the eighteenth session's
    first version did, when the createRoom was slower than the daemon's
    timeout)."""
    a, srv = gk
    consent_alice(mx)
    hs.create_user("alice")
    lost = []

    def lose(method, path, user):
        if method == "POST" and path.endswith("/createRoom") and not lost:
            lost.append(user)
            return True
        return False
    hs.defer_invites = 3
    try:
        mx_room = wally_says_hello_losing(hs, a, pg, db_url, lose)
    finally:
        hs.defer_invites = None
    assert len(lost) == 1
    assert hs.rooms() == [mx_room], [r for r in hs.requests if r["path"].endswith("/createRoom")]
    assert [u for u, ms in hs.members(mx_room).items() if ms == "invite"] == [ALICE_MX]
    # One alias deleted, once the room was bound; none taken for stale.
    deleted = [r for r in hs.requests if r["method"] == "DELETE" and "/directory/room/" in r["path"]]
    assert len(deleted) == 1 and deleted[0]["status"] == 200, deleted


def test_a_room_whose_making_stopped_before_its_invitations_is_finished(mx, hs, gk, pg, db_url):
    """The homeserver makes the ghost's direct room with alice and its alias,
    then fails before the invitations (createRoom answered 500, alice never
    invited). The delivery, tried again, finds the room by its alias with
    alice not in it, and the ghost finishes it: it invites her as the
    createRoom would have (is_direct), then delivers there. One room, one
    invitation, the message once; until the nineteenth session the row
    waited for an invitation that never came until its retries were spent."""
    a, srv = gk
    consent_alice(mx)
    hs.create_user("alice")
    ghost = "@_cw_gk_wally:example.org"
    failed = []

    def fail(user):
        if failed:
            return False
        failed.append(user)
        return True
    hs.fail_invites = fail
    try:
        mx_room = wally_says_hello_losing(hs, a, pg, db_url, lambda *_: False)
    finally:
        hs.fail_invites = None
    assert failed == [ghost]
    assert hs.rooms() == [mx_room], [r for r in hs.requests if r["path"].endswith("/createRoom")]
    invites = [e for e in hs.events(mx_room) if e["type"] == "m.room.member" and e["state_key"] == ALICE_MX]
    assert len(invites) == 1 and invites[0]["sender"] == ghost, invites
    assert invites[0]["content"]["membership"] == "invite" and invites[0]["content"].get("is_direct"), invites
    assert [e["content"]["body"] for e in hs.events(mx_room) if e["type"] == "m.room.message"] == ["hello"]
    wait_until(lambda: pg.psql("SELECT string_agg(state, ',') FROM outbox", db_url) == "delivered",
               what="the row delivered")
    deleted = [r for r in hs.requests if r["method"] == "DELETE" and "/directory/room/" in r["path"]]
    assert [r["status"] for r in deleted] == [200], deleted


def test_a_room_made_unanswered_and_declined_is_not_taken(mx, hs, gk, pg, db_url):
    """The same lost answer, but alice declines the room's invitation
    before the delivery is tried again: the room the alias names is not
    hers any more, so the alias is deleted and a new room made (with a
    new invitation), rather than the message going to a room she left."""
    a, srv = gk
    consent_alice(mx)
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    declined = []

    def lose(method, path, user):
        if method == "POST" and path.endswith("/createRoom") and not declined:
            declined.append(hs.rooms()[-1])
            alice.leave(declined[0])
            return True
        return False
    mx_room = wally_says_hello_losing(hs, a, pg, db_url, lose)
    assert declined and mx_room != declined[0] and sorted(hs.rooms()) == sorted([declined[0], mx_room])
    assert hs.members(mx_room).get(ALICE_MX) == "invite" and hs.members(declined[0]).get(ALICE_MX) == "leave"
    # deleted twice: the stale one, and the new room's once bound
    assert [r["status"] for r in hs.requests if r["method"] == "DELETE" and "/directory/room/" in r["path"]] == \
        [200, 200]


def test_transactions_are_deduplicated_by_event_id(mx, hs, gk, pg, db_url):
    a, srv = gk
    consent_alice(mx)
    _, alice_token = hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    a.send(room, a.user("wally"), "hello")
    mx_room = wait_until(lambda: next(iter(hs.rooms()), None), what="the direct room")
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings", db_url) == "1", what="the binding")
    ev = {"event_id": "$abc123", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
          "origin_server_ts": 1700000000000, "content": {"msgtype": "m.text", "body": "once"}}
    txns0, events0 = metrics(mx, "causeway_matrix_transactions_total"), metrics(mx, "causeway_matrix_events_total")
    assert as_put(mx, "100", {"events": [ev]}).status_code == 200
    assert as_put(mx, "100", {"events": [ev]}).status_code == 200           # the same transaction
    assert as_put(mx, "1", {"events": [ev]}).status_code == 200             # after a homeserver reset
    bad = [{"event_id": 5}, {"event_id": "$x", "room_id": mx_room}, "junk",
           dict(ev, event_id="$big", content={"msgtype": "m.text", "body": "x" * 70000}),
           dict(ev, event_id="$typ", content={"msgtype": "m.text", "body": 7})]
    good = dict(ev, event_id="$def456", content={"msgtype": "m.text", "body": "twice"})
    assert as_put(mx, "101", {"events": bad + [good]}).status_code == 200  # bad ones never drop the others
    assert pg.psql("SELECT count(*) FROM events WHERE origin_network = 'matrix'", db_url) == "2"
    # Counted once each (the stand-in's own pushes in between carry only echoes, which are ignored).
    txns, events = metrics(mx, "causeway_matrix_transactions_total"), metrics(mx, "causeway_matrix_events_total")
    delta = lambda now, before, k: now[k] - before.get(k, 0)  # noqa: E731
    assert delta(txns, txns0, 'result="repeat"') == 1 and delta(txns, txns0, 'result="taken"') >= 3, txns
    assert delta(events, events0, 'result="accepted"') == 3, events  # once, the same again, twice
    assert delta(events, events0, 'result="invalid"') == 5 and delta(events, events0, 'result="refused"') == 0, events
    got = srv.wait_events(2)
    assert [e["content"]["parts"][0]["body"] for e in got] == ["once", "twice"]


def put_raw(mx, txn, raw):
    """A transaction whose body is given as text (what json= cannot make)."""
    return requests.put(mx.url + f"/_matrix/app/v1/transactions/{txn}", data=raw.encode(),
                        headers={"Authorization": "Bearer " + HS_TOKEN, "Content-Type": "application/json"},
                        timeout=10)


BIG = "1000000000000000000000000"  # past 64 bits: room versions 1 to 5 allow any JSON number


def ghost_notices(hs, room, ghost):
    return [e["content"]["body"] for e in hs.events(room)
            if e["sender"] == ghost and e["content"].get("msgtype") == "m.notice"]


def all_said(hs, pg, db_url, outbox=False):
    """What the daemon was given has all been said: every event the
    homeserver has is pushed in a transaction and every transaction
    answered, the bot's inbox handled (a command's answer is sent or
    queued before its row is marked), no notice (matrix_notices) left to
    send, and with outbox no row for the peer still to go (pending, held,
    in flight) nor a sender still to be told of a row that died or was
    dropped with its quote (the bot's dead-letter round queues that
    notice up to half a second after).  A refused event's notice is put
    in the writer's queue before the transaction's answer but may be
    committed just after it: the callers first wait for the notices they
    expect.  Once these hold, a notice or a delivery more could come only
    from a row that is not there: a test's "nothing more" is read then,
    where until the sixty-fourth session a sleep (half a second to a
    second and a half) stood for it (the house rule: a state read once
    the daemon wrote it)."""
    def pushed():
        with hs._cond:
            return not hs._queue_events and all(t["done"] for t in hs.transactions)
    wait_until(pushed, timeout=30, what="the homeserver's events pushed and its transactions taken")
    rows = ("SELECT (SELECT count(*) FROM matrix_notices WHERE done_at IS NULL) "
            "+ (SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL)"
            + (" + (SELECT count(*) FROM outbox WHERE state IN ('pending', 'held', 'in_flight') "
               "OR (state = 'dead' AND sender_told_at IS NULL) OR (state = 'dropped' AND sender_quote IS NOT NULL))"
               if outbox else ""))
    wait_until(lambda: pg.psql(rows, db_url) == "0", timeout=30, what="every notice sent, the bot's inbox handled"
               + (", every delivery done" if outbox else ""))


def test_an_event_a_plain_json_parse_refuses_is_refused_alone(mx, hs, gk, pg, db_url):
    """Valid JSON that jansson refuses without being asked: a NUL (\\u0000)
    in a string (Synapse stores and sends it) and an integer past 64 bits
    (room versions 1 to 5 allow any number). Until the thirtieth session
    one such event failed the whole transaction (400 M_NOT_JSON), which the
    homeserver sends again for ever, holding back all after it. Now only
    that event is refused, nothing of it stored (PostgreSQL cannot store a
    NUL; the bot's inbox neither), its writer told; a number past 64 bits
    in mere content is carried. Since the thirty-first session so for a
    NUL in a key and a number past a double's range too."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    now = int(time.time() * 1000)

    def msg(event_id, body, **extra):
        return dict({"event_id": event_id, "room_id": room, "sender": ALICE_MX, "type": "m.room.message",
                     "origin_server_ts": now, "content": {"msgtype": "m.text", "body": body}}, **extra)
    big_content = msg("$bigc", "big content")
    big_content["content"]["n"] = "@BIG@"
    events = [msg("$nul1", "bo\u0000om"),
              {"event_id": "$nul2", "room_id": "!else:example.org", "sender": ALICE_MX, "type": "m.room.member",
               "state_key": "@_cw_bot:example.org", "origin_server_ts": now,
               "content": {"membership": "invite", "displayname": "b\u0000t"}},
              big_content, msg("$bigts", "big ts", origin_server_ts="@BIG@"), msg("$good", "good one")]
    eph = [{"type": "m.typing", "room_id": room, "content": {"user_ids": [ALICE_MX + "\u0000x"]}}]
    raw = json.dumps({"events": events, "ephemeral": eph}).replace('"@BIG@"', BIG)
    assert "\\u0000" in raw and BIG in raw
    invalid0 = metrics(mx, "causeway_matrix_events_total").get('result="invalid"', 0)
    r = put_raw(mx, "odd1", raw)
    assert r.status_code == 200, r.text
    got = srv.wait_events(2)
    assert sorted(e["content"]["parts"][0]["body"] for e in got) == ["big content", "good one"]
    stored = pg.psql("SELECT string_agg(origin_native_id, ',' ORDER BY origin_native_id) FROM events "
                     "WHERE origin_network = 'matrix'", db_url)
    assert stored == "$bigc,$good", stored
    assert pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE event_id = '$nul2'", db_url) == "0"
    assert metrics(mx, "causeway_matrix_events_total")['result="invalid"'] - invalid0 == 3
    # Alice is told of her message that holds a NUL, in the room.
    wait_until(lambda: any("U+0000" in n for n in ghost_notices(hs, room, ghost)), what="the NUL's notice")
    # What jansson cannot read at all is its event's trouble alone too (since
    # the thirty-first session; until then the whole transaction was refused
    # with 400 M_NOT_JSON): a NUL in an object's key, a number past a
    # double's range; each refused and told, the event after them carried.
    keyed = msg("$nulkey", "nul key")
    keyed["content"]["@KEY@"] = 1
    huge = msg("$huge", "huge")
    huge["content"]["n"] = "@HUGE@"
    raw = json.dumps({"events": [keyed, huge, msg("$after", "after both")]})
    raw = raw.replace('"@KEY@"', '"a\\u0000"').replace('"@HUGE@"', "1e400")
    assert '"a\\u0000"' in raw and "1e400" in raw
    r = put_raw(mx, "odd2", raw)
    assert r.status_code == 200, r.text
    got = srv.wait_events(3)
    assert sorted(e["content"]["parts"][0]["body"] for e in got) == ["after both", "big content", "good one"]
    stored = pg.psql("SELECT string_agg(origin_native_id, ',' ORDER BY origin_native_id) FROM events "
                     "WHERE origin_network = 'matrix'", db_url)
    assert stored == "$after,$bigc,$good", stored
    assert metrics(mx, "causeway_matrix_events_total")['result="invalid"'] - invalid0 == 5
    wait_until(lambda: len([n for n in ghost_notices(hs, room, ghost) if "U+0000" in n]) == 2,
               what="the NUL key's notice")
    wait_until(lambda: any("too large" in n for n in ghost_notices(hs, room, ghost)), what="the number's notice")
    # What is not JSON is still refused whole.
    r = put_raw(mx, "odd-whole", '{"events": [{"a": 1}')
    assert r.status_code == 400 and r.json()["errcode"] == "M_NOT_JSON", r.text


def test_an_event_holding_a_duplicate_key_is_refused_alone(mx, hs, gk, pg, db_url):
    """A key twice in one object of an event (RFC 8259 only says names
    SHOULD be unique, and the Matrix specification says nothing of them:
    matrix-org/matrix-spec#1246; a homeserver that passes an event's raw
    content through, as Dendrite does, gives what a remote server sent) is
    that event's trouble, not the transaction's: the event is refused (which
    of the two values is meant cannot be told), its writer told, and the
    events around it taken. Until the forty-second session the whole
    transaction was answered 400 M_NOT_JSON, which the homeserver sends
    again for ever, every later one waiting behind it. A key twice at the
    transaction's own level is still the transaction's trouble."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    before = len(srv.events)
    now = int(time.time() * 1000)

    def msg(event_id, body):
        return {"event_id": event_id, "room_id": room, "sender": ALICE_MX, "type": "m.room.message",
                "origin_server_ts": now, "content": {"msgtype": "m.text", "body": body}}
    raw = json.dumps({"events": [msg("$dup1", "twice"), msg("$dup-after", "after the twice")]})
    raw = raw.replace('"body": "twice"', '"body": "twice", "body": "other"')
    assert raw.count('"body"') == 3
    r = put_raw(mx, "dup1", raw)
    assert r.status_code == 200, r.text
    got = srv.wait_events(before + 1)
    assert [e["content"]["parts"][0]["body"] for e in got[before:]] == ["after the twice"]
    assert pg.psql("SELECT count(*) FROM events WHERE origin_native_id = '$dup1'", db_url) == "0"
    wait_until(lambda: any("same key twice" in n for n in ghost_notices(hs, room, ghost)),
               what="the notice of the duplicate key")
    # Two of them, one in the event's own object (its type): refused alone
    # as well.
    raw = json.dumps({"events": [msg("$dup2", "two"), msg("$dup2-after", "after two")]})
    raw = raw.replace('"type": "m.room.message", "origin_server_ts": %d, "content": {"msgtype": "m.text", '
                      '"body": "two"}' % now,
                      '"type": "m.room.message", "type": "m.sticker", "origin_server_ts": %d, '
                      '"content": {"msgtype": "m.text", "body": "two", '
                      '"body": "deux"}' % now)
    assert '"type": "m.sticker"' in raw
    r = put_raw(mx, "dup2", raw)
    assert r.status_code == 200, r.text
    got = srv.wait_events(before + 2)
    assert [e["content"]["parts"][0]["body"] for e in got[before:]] == ["after the twice", "after two"]
    assert pg.psql("SELECT count(*) FROM events WHERE origin_native_id = '$dup2'", db_url) == "0"
    r = put_raw(mx, "dup3", '{"events": [], "events": []}')
    assert r.status_code == 400 and r.json()["errcode"] == "M_NOT_JSON", r.text


def test_an_event_nested_past_what_jansson_reads_is_refused_alone(mx, hs, gk, pg, db_url):
    """JSON nested deeper than jansson reads (2048 levels: 4 KiB of
    brackets, well within an event's 64 KiB; Dendrite's parser takes 10000,
    and a remote user's event reaches every appservice of the room) is
    that event's trouble, not the transaction's: its writer is told, and
    the other events are taken. Until the thirty-ninth session the whole
    transaction was answered 400 M_NOT_JSON, which the homeserver sends
    again for ever, every later one waiting behind it."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    now = int(time.time() * 1000)
    deep = {"[": "[" * 2100 + '"x", {"k": "]"}' + "]" * 2100, "{": '{"a":' * 2100 + '"}"' + "}" * 2100}
    for n, (kind, value) in enumerate(deep.items()):
        bad = ('{"event_id": "$deep%d", "room_id": "%s", "sender": "%s", "type": "m.room.message", '
               '"origin_server_ts": %d, "content": {"msgtype": "m.text", "body": "deep", "x": %s}}'
               % (n, room, ALICE_MX, now, value))
        good = json.dumps({"event_id": f"$after-deep{n}", "room_id": room, "sender": ALICE_MX,
                           "type": "m.room.message", "origin_server_ts": now,
                           "content": {"msgtype": "m.text", "body": f"after {kind}", "y": [[1, 2], {"z": "]"}]}})
        r = put_raw(mx, f"deep-{n}", '{"events": [%s, %s]}' % (bad, good))
        assert r.status_code == 200, r.text
    got = srv.wait_events(2)
    assert [e["content"]["parts"][0]["body"] for e in got] == ["after [", "after {"]
    told = lambda: [n for n in ghost_notices(hs, room, ghost) if n.startswith("Not delivered")]  # noqa: E731
    wait_until(lambda: len(told()) >= 2, what="two notices")
    assert told() == ["Not delivered: it is nested deeper than this gateway can read."] * 2, told()
    assert pg.psql("SELECT count(*) FROM events WHERE origin_native_id LIKE '$deep%'", db_url) == "0"


def test_a_message_holding_a_nul_through_the_homeserver_holds_nothing_back(mx, hs, gk, pg, db_url):
    """The same through the stand-in, as a Matrix client writes it: the
    message with a NUL is refused and told, the next one is carried."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "first")
    srv.wait_events(1)
    alice.send_text(room, "with a \u0000 nul")
    alice.send_text(room, "after the nul")
    got = srv.wait_events(2)
    assert [e["content"]["parts"][0]["body"] for e in got] == ["first", "after the nul"]
    wait_until(lambda: any("U+0000" in n for n in ghost_notices(hs, room, ghost)), what="the NUL's notice")


def test_a_transaction_whose_events_name_each_other(mx, hs, gk, pg, db_url):
    """A homeserver batches what came while its last transaction was in
    flight: here a message and, in the same transaction, a reaction to it,
    an edit, a reply and the reaction's redaction, each naming an event
    before it by its Matrix id. Before the thirteenth session a reference
    was found only among stored events: the reaction was dropped and the
    rest refused."""
    a, srv = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    base = {"room_id": mx_room, "sender": ALICE_MX, "origin_server_ts": 1700000000000}
    evs = [dict(base, event_id="$m1", type="m.room.message", content={"msgtype": "m.text", "body": "frist"}),
           dict(base, event_id="$r1", type="m.reaction",
                content={"m.relates_to": {"rel_type": "m.annotation", "event_id": "$m1", "key": "\U0001F44D"}}),
           dict(base, event_id="$e1", type="m.room.message",
                content={"msgtype": "m.text", "body": "* first", "m.new_content": {"msgtype": "m.text", "body": "first"},
                         "m.relates_to": {"rel_type": "m.replace", "event_id": "$m1"}}),
           dict(base, event_id="$p1", type="m.room.message",
                content={"msgtype": "m.text", "body": "and a reply", "m.relates_to": {"m.in_reply_to": {"event_id": "$m1"}}}),
           dict(base, event_id="$x1", type="m.room.redaction", redacts="$r1", content={"redacts": "$r1"})]
    assert as_put(mx, "200", {"events": evs}).status_code == 200
    got = srv.wait_events(5)
    assert [e["type"] for e in got] == ["message", "reaction", "edit", "message", "delete"]
    m1 = got[0]["id"]
    assert got[1]["content"]["in_reply_to"] == m1 and got[2]["content"]["replaces"] == m1
    assert got[3]["content"]["in_reply_to"] == m1 and got[4]["content"]["replaces"] == got[1]["id"]
    # stored with the references, in order
    assert pg.psql("SELECT string_agg(coalesce(r.public_id, '-') || '/' || coalesce(x.public_id, '-'), ' ' ORDER BY e.id) "
                   "FROM events e LEFT JOIN events r ON r.id = e.in_reply_to_id LEFT JOIN events x ON x.id = e.replaces_id "
                   "WHERE e.origin_network = 'matrix'", db_url) == f"-/- {m1}/- -/{m1} {m1}/- -/{got[1]['id']}"
    # The same transaction again changes nothing; a reference to an event of
    # the transaction that could not be stored is refused, the rest goes on.
    assert as_put(mx, "200", {"events": evs}).status_code == 200
    bad = [dict(base, event_id="$m2", type="m.room.message", content={"msgtype": "m.text", "body": 7}),
           dict(base, event_id="$r2", type="m.reaction",
                content={"m.relates_to": {"rel_type": "m.annotation", "event_id": "$m2", "key": "x"}}),
           dict(base, event_id="$m3", type="m.room.message", content={"msgtype": "m.text", "body": "still here"})]
    assert as_put(mx, "201", {"events": bad}).status_code == 200
    got = srv.wait_events(6)
    assert got[5]["content"]["parts"][0]["body"] == "still here"
    assert pg.psql("SELECT count(*) FROM events WHERE origin_network = 'matrix'", db_url) == "6"


def alice_wrote_first(hs, a, srv):
    """alice writes "first" to wally: (the room, the ghost, the fields of an
    event of hers there, for a transaction pushed by hand)."""
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "first")
    srv.wait_events(1)
    return room, ghost, {"room_id": room, "sender": ALICE_MX, "origin_server_ts": int(time.time() * 1000)}


def text_ev(base, eid, body):
    return dict(base, event_id=eid, type="m.room.message", content={"msgtype": "m.text", "body": body})


def edit_ev(base, eid, target, body):
    return dict(base, event_id=eid, type="m.room.message",
                content={"msgtype": "m.text", "body": "* " + body, "m.new_content": {"msgtype": "m.text", "body": body},
                         "m.relates_to": {"rel_type": "m.replace", "event_id": target}})


def reaction_ev(base, eid, target, key):
    return dict(base, event_id=eid, type="m.reaction",
                content={"m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": key}})


def redaction_ev(base, eid, target):
    return dict(base, event_id=eid, type="m.room.redaction", redacts=target, content={"redacts": target})


def test_an_event_naming_a_later_event_of_its_transaction_follows_it(mx, hs, gk, pg, db_url):
    """A homeserver sends a transaction's events in its stream order, and a
    client's edit, reaction or reply names an event the homeserver has
    (Synapse refuses a relation to an unknown event), so the event named
    comes first.  Nothing in the specification promises that order within
    a transaction, though (a redaction may name an event the server does
    not have yet): one that names an event later in its transaction is
    carried after it.  Until the forty-sixth session the edit, the
    reaction and the redaction were dropped untold (nothing of it at the
    peer, no notice) and the reply lost what it answered."""
    a, srv = gk
    room, ghost, base = alice_wrote_first(hs, a, srv)
    evs = [edit_ev(base, "$lx1", "$lm1", "first!"), reaction_ev(base, "$lr1", "$lm1", "x"),
           redaction_ev(base, "$ld2", "$lm2"),
           dict(base, event_id="$lp1", type="m.room.message",
                content={"msgtype": "m.text", "body": "a reply", "m.relates_to": {"m.in_reply_to": {"event_id": "$lm1"}}}),
           # a chain: a reaction to the edit of a message, both later
           reaction_ev(base, "$lr3", "$lx3", "y"), edit_ev(base, "$lx3", "$lm3", "third!"),
           text_ev(base, "$lm1", "frist"), text_ev(base, "$lm2", "oops"), text_ev(base, "$lm3", "thrid")]
    assert as_put(mx, "later-1", {"events": evs}).status_code == 200
    got = srv.wait_events(1 + len(evs))[1:]
    assert [e["type"] for e in got] == ["message"] * 3 + ["edit", "reaction", "delete", "message", "edit", "reaction"], got
    m1, m2, m3 = (e["id"] for e in got[:3])
    assert [e["content"]["parts"][0]["body"] for e in got[:3]] == ["frist", "oops", "thrid"]
    assert got[3]["content"]["replaces"] == m1 and got[3]["content"]["parts"][0]["body"] == "first!"
    assert got[4]["content"]["in_reply_to"] == m1 and got[5]["content"]["replaces"] == m2
    assert got[6]["content"]["in_reply_to"] == m1 and got[6]["content"]["parts"][0]["body"] == "a reply"
    assert got[7]["content"]["replaces"] == m3 and got[8]["content"]["in_reply_to"] == m3
    assert not [n for n in ghost_notices(hs, room, ghost) if n.startswith("Not delivered")]
    # The same transaction again changes nothing.
    assert as_put(mx, "later-1", {"events": evs}).status_code == 200
    assert as_put(mx, "later-2", {"events": evs}).status_code == 200
    ids = ", ".join(f"'{e['event_id']}'" for e in evs)
    assert pg.psql(f"SELECT count(*) FROM events WHERE origin_native_id IN ({ids})", db_url) == str(len(evs))


def test_an_edit_of_a_message_never_carried_is_told(mx, hs, gk, pg, db_url):
    """An edit names its message, which Causeway may never have carried:
    the user wrote it before the room was bridged, or it was refused
    (told then).  The edit cannot reach the other side as one; until the
    forty-sixth session it was dropped untold, and the user believed the
    other side had her correction.  Now she is told, as of any event not
    delivered.  A redaction or a reaction of such a message stays untold:
    there is nothing at the other side to take back or to react to."""
    a, srv = gk
    room, ghost, base = alice_wrote_first(hs, a, srv)
    evs = [edit_ev(base, "$nx1", "$never-carried", "fixed"), redaction_ev(base, "$nd1", "$never-carried"),
           reaction_ev(base, "$nr1", "$never-carried", "x"), text_ev(base, "$nm1", "after")]
    assert as_put(mx, "never-1", {"events": evs}).status_code == 200
    got = srv.wait_events(2)
    assert [(e["type"], e["content"]["parts"][0]["body"]) for e in got] == [("message", "first"), ("message", "after")]
    told = lambda: [n for n in ghost_notices(hs, room, ghost) if n.startswith("Not delivered")]  # noqa: E731
    wait_until(lambda: told(), what="the edit's notice")
    assert told() == [EDIT_UNKNOWN], told()
    assert pg.psql("SELECT string_agg(origin_native_id, ' ') FROM events "
                   "WHERE origin_native_id IN ('$nx1', '$nd1', '$nr1', '$nm1')", db_url) == "$nm1"
    assert [e["type"] for e in srv.events] == ["message", "message"]


EDIT_UNKNOWN = ("Not delivered: an edit of a message the other side does not have (written before the "
                "conversation was bridged, or not delivered itself): write it again as a new message.")


def test_a_transaction_naming_its_own_events_draws_their_ids_after_the_rooms_lock(mx, hs, gk, pg, db_url):
    """A transaction's message and a reaction to it (a job whose items name
    earlier ones) waits for the room's lock while another process writes
    an event of the room under it (a psql session that holds the lock and
    inserts one, drawing its id then, as another daemon's write does):
    the transaction's events get ids after the other's, in the order they
    were committed, as every other write's do. What reads a room's events
    in id order (an XMPP occupant's history on joining and its latest edit,
    a correction's "is last", which edit of a message is the last) then
    reads them as they were delivered. Until the thirty-ninth session such
    a job drew its ids before it waited: smaller than the other's, though
    committed after it."""
    a, srv = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    rid = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{room}'", db_url)
    base = {"room_id": mx_room, "sender": ALICE_MX, "origin_server_ts": 1700000000000}
    evs = [dict(base, event_id="$ord1", type="m.room.message", content={"msgtype": "m.text", "body": "mine"}),
           dict(base, event_id="$ord2", type="m.reaction",
                content={"m.relates_to": {"rel_type": "m.annotation", "event_id": "$ord1", "key": "x"}})]
    held = HeldSession(db_url)
    done = {}
    writer = None
    try:
        held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, ({rid} % 2147483647)::int);")
        writer = threading.Thread(target=lambda: done.update(r=as_put(mx, "ord-1", {"events": evs})))
        writer.start()
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                                   db_url) == "1", timeout=30, what="the transaction waiting for the room's lock")
        held.run("INSERT INTO events (public_id, room_id, sender_id, type, content, origin_network, ts) "
                 "SELECT 'msg_otherProcess', e.room_id, e.sender_id, e.type, e.content, 'system', e.ts FROM events e "
                 f"WHERE e.room_id = {rid} AND e.origin_network = 'peer:gk' AND e.type = 'message';")
        held.end()
        writer.join(30)
    finally:
        held.end()
        if writer:
            writer.join(30)
    assert done["r"].status_code == 200
    assert pg.psql("SELECT string_agg(coalesce(origin_native_id, public_id), ' ' ORDER BY id) FROM events "
                   f"WHERE room_id = {rid} AND public_id <> (SELECT public_id FROM events WHERE room_id = {rid} "
                   "AND origin_network = 'peer:gk')", db_url) == "msg_otherProcess $ord1 $ord2"
    got = srv.wait_events(2)
    assert [e["type"] for e in got] == ["message", "reaction"]


def peer_events(srv, typ):
    return [e for e in list(srv.events) if e.get("type") == typ]


@pytest.mark.parametrize("version", ["10", "11"])
def test_a_redaction_deletes_at_the_peer_what_the_homeserver_redacted(mx, hs, gk, pg, db_url, version):
    """In room versions 1 to 10 the top-level redacts is the target the
    homeserver authorised; content.redacts is mere content there, and
    Synapse's /redact puts the request's body in as content. Until the
    thirtieth session content.redacts was taken first: alice redacting
    "two" with a body naming "one" deleted "one" at the peer. Now the
    top-level one counts, content's only without it (version 11): "two"
    is deleted at the peer, "one" is not."""
    a, srv = gk
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])
    ghost = "@_cw_gk_wally:example.org"
    room = alice.create_dm(ghost, room_version=version)
    wait_until(lambda: hs.members(room).get(ghost) == "join", what="the ghost joins")
    ids = {t: alice.send_text(room, t) for t in ("one", "two", "three")}
    got = srv.wait_events(3)
    peer = {e["content"]["parts"][0]["body"]: e["id"] for e in got}
    q = urllib.parse.quote
    r = alice.request("PUT", f"/_matrix/client/v3/rooms/{q(room)}/redact/{q(ids['two'])}/odd",
                      {"redacts": ids["one"]})
    if version == "10":
        assert r.status_code == 200, r.text
        red = hs.event(r.json()["event_id"])
        assert red["redacts"] == ids["two"] and red["content"] == {"redacts": ids["one"]}
    else:
        assert r.status_code == 400 and r.json()["errcode"] == "M_INVALID_PARAM"
        alice.redact(room, ids["two"])  # content.redacts the path's event, copied to the top level
    alice.redact(room, ids["three"])
    wait_until(lambda: any(d["content"]["replaces"] == peer["three"] for d in peer_events(srv, "delete")),
               what="three deleted at the peer")
    deleted = sorted(d["content"]["replaces"] for d in peer_events(srv, "delete"))
    assert peer["one"] not in deleted
    assert deleted == sorted([peer["two"], peer["three"]]), (deleted, peer)


def test_an_event_id_that_is_none_in_a_sends_answer_is_not_recorded(mx, hs, gk, pg, db_url):
    """The homeserver answers wally's second message to alice with an
    event_id that is no event id: the message is delivered (the room has
    it), but no Matrix id is recorded for it. Until the forty-ninth session the
    answer's id was stored as the message's Matrix id, as it was."""
    a, srv = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    hs.answer_event_id = lambda eid: "$not an id"
    try:
        second = a.send(room, a.user("wally"), "second").json()["id"]
        state = ("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                 f"WHERE e.public_id = '{second}'")
        wait_until(lambda: pg.psql(state, db_url) == "delivered", what="the second message delivered")
    finally:
        hs.answer_event_id = None
    assert "second" in [e["content"].get("body") for e in hs.events(mx_room) if e["type"] == "m.room.message"]
    assert pg.psql("SELECT count(*) FROM event_native_ids n JOIN events e ON e.id = n.event_id "
                   f"WHERE e.public_id = '{second}'", db_url) == "0"
    assert pg.psql(f"SELECT coalesce(o.remote_id, '') FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{second}'", db_url) == ""


def test_references_to_an_event_being_deleted_are_refused_down_the_chain(mx, hs, gk, pg, db_url):
    """A reply from Matrix to a message the retention sweep deletes while
    the reply is being written is refused (its sender told), not stored
    naming the deleted event; so is a reaction, in the same transaction,
    to that reply (it would name an event never written); docs/operations.md,
    "Retention"."""
    a, srv = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    hello = pg.psql("SELECT public_id FROM events WHERE origin_network = 'peer:gk' AND type = 'message'", db_url)
    native = wait_until(lambda: pg.psql("SELECT n.native_id FROM event_native_ids n JOIN events e ON e.id = n.event_id "
                                        f"WHERE e.public_id = '{hello}' AND n.kind = 'event_id'", db_url),
                        what="the message's Matrix id")
    base = {"room_id": mx_room, "sender": ALICE_MX, "origin_server_ts": 1700000000000}
    evs = [dict(base, event_id="$p1", type="m.room.message",
                content={"msgtype": "m.text", "body": "a reply", "m.relates_to": {"m.in_reply_to": {"event_id": native}}}),
           dict(base, event_id="$q1", type="m.reaction",
                content={"m.relates_to": {"rel_type": "m.annotation", "event_id": "$p1", "key": "x"}})]
    r = written_while_deleted(pg, db_url, hello, lambda: as_put(mx, "300", {"events": evs}))
    assert r.status_code == 200
    assert pg.psql("SELECT count(*) FROM events WHERE origin_network = 'matrix'", db_url) == "0"
    assert dangling(pg, db_url) == 0
    # alice is told that her reply went nowhere.
    wait_until(lambda: any("names no message" in e["content"].get("body", "") for rid in hs.rooms()
                           for e in hs.events(rid) if e["type"] == "m.room.message"), what="the notice")


def test_an_event_naming_one_that_lost_its_key_race_is_not_stored(mx, hs, gk, pg, db_url):
    """A transaction's message loses the race for its key (its Matrix event
    id, written at the same moment by another process: played by a psql
    session that holds the row uncommitted until the writer waits for it)
    and a reaction to it in the same transaction names it by the id the
    job gave it: the reaction is refused as the message is (409, retry),
    not stored naming an event that was never written (it was until the
    twenty-fourth session); docs/interop-api.md, "Idempotency"."""
    a, srv = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    base = {"room_id": mx_room, "sender": ALICE_MX, "origin_server_ts": 1700000000000}
    evs = [dict(base, event_id="$race1", type="m.room.message", content={"msgtype": "m.text", "body": "raced"}),
           dict(base, event_id="$race2", type="m.reaction",
                content={"m.relates_to": {"rel_type": "m.annotation", "event_id": "$race1", "key": "x"}})]
    other = subprocess.Popen(["psql", db_url, "-v", "ON_ERROR_STOP=1", "-qAt"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {}
    writer = None
    try:
        other.stdin.write("BEGIN;\nINSERT INTO events (public_id, room_id, sender_id, type, content, origin_network, "
                          "origin_native_id, ts) SELECT 'msg_raceWinner', e.room_id, i.id, 'message', e.content, "
                          f"'matrix', '$race1', e.ts FROM events e, identities i WHERE i.uri = '{ALICE}' "
                          f"AND e.origin_network = 'peer:gk' AND e.type = 'message' LIMIT 1;\nSELECT 'taken';\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "taken"
        writer = threading.Thread(target=lambda: done.update(r=as_put(mx, "race-1", {"events": evs})))
        writer.start()
        # The writer's insert of $race1 waits for the other's row.
        wait_until(lambda: not writer.is_alive() or pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'", db_url) != "0", timeout=15, what="the writer")
        other.stdin.write("COMMIT;\n")
        other.stdin.close()
        assert other.wait(30) == 0, other.stderr.read()
        writer.join(30)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
        if writer:
            writer.join(30)
    assert done["r"].status_code == 200
    assert dangling(pg, db_url) == 0
    assert pg.psql("SELECT string_agg(public_id, ' ') FROM events WHERE origin_network = 'matrix'",
                   db_url) == "msg_raceWinner"


def test_a_reply_to_a_message_refused_as_its_sender_left_is_refused_as_it_is(mx, hs, gk, pg, db_url):
    """A transaction holds alice's message to a group and carol's reply to
    it (both local users, in a room bound to the group); alice leaves the
    group while the transaction waits for the room's lock (a psql session
    holds it, as a leaving's transaction does, and marks her left under
    it): her message is refused, 403 not_allowed, as any message of one
    who is not a member, and carol's reply, which names it, is refused as
    it is (403 not_allowed), not as a reply to an unknown message (400
    invalid_body: until the twenty-sixth session); docs/interop-api.md."""
    a, srv = gk
    carol = "mimi://example.org/u/carol"
    gid = a.create_room([a.user("wally"), ALICE, carol], kind="group").json()["id"]
    rid = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{gid}'", db_url)
    pg.psql("INSERT INTO room_bindings (room_id, network, native_id, local_identity_id) SELECT "
            f"{rid}, 'matrix', '!portal:example.org', id FROM identities WHERE uri = '{ALICE}'", db_url)
    # Both have joined their portals (the peer put them in invited: since
    # the thirty-first session), as members who write there have.
    pg.psql(f"UPDATE room_members SET membership = 'joined', peer_invited = false WHERE room_id = {rid}", db_url)
    base = {"room_id": "!portal:example.org", "origin_server_ts": 1700000000000}
    evs = [dict(base, sender=ALICE_MX, event_id="$left1", type="m.room.message",
                content={"msgtype": "m.text", "body": "bye"}),
           dict(base, sender="@carol:example.org", event_id="$left2", type="m.room.message",
                content={"msgtype": "m.text", "body": "see you",
                         "m.relates_to": {"m.in_reply_to": {"event_id": "$left1"}}})]
    start = len(mx.records)
    held = HeldSession(db_url)
    done = {}
    try:
        held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, ({rid} % 2147483647)::int); "
                 "UPDATE room_members SET membership = 'left', updated_at = now() WHERE room_id = "
                 f"{rid} AND identity_id = (SELECT id FROM identities WHERE uri = '{ALICE}');")
        writer = threading.Thread(target=lambda: done.update(r=as_put(mx, "left-1", {"events": evs})))
        writer.start()
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                                   db_url) == "1", what="the write waiting for the room's lock")
        held.end()
        writer.join(30)
    finally:
        held.end()
    assert done["r"].status_code == 200
    assert pg.psql("SELECT count(*) FROM events WHERE origin_network = 'matrix'", db_url) == "0"
    refused = [mx.wait_for(lambda r: r.get("msg") == "matrix event not taken", start=start)]
    refused.append(mx.wait_for(lambda r: r.get("msg") == "matrix event not taken" and r is not refused[0],
                               start=start))
    assert [r["code"] for r in refused] == ["not_allowed", "not_allowed"], refused
    assert "in_reply_to" in refused[1]["detail"] and "member" in refused[1]["detail"], refused[1]


def test_a_transaction_of_echoes_only_is_answered_and_remembered(mx, pg, db_url):
    """The homeserver pushes the gateway's own sends back: a transaction with
    nothing but those (and invalid events) stores nothing, is answered 200,
    counted, and a repeat of it is known."""
    echo = {"event_id": "$echo1", "room_id": "!r:example.org", "sender": "@_cw_bot:example.org",
            "type": "m.room.message", "origin_server_ts": 1700000000000,
            "content": {"msgtype": "m.notice", "body": "from the bot"}}
    stored0 = pg.psql("SELECT count(*) FROM events", db_url)
    txns0, events0 = metrics(mx, "causeway_matrix_transactions_total"), metrics(mx, "causeway_matrix_events_total")
    body = {"events": [echo, dict(echo, event_id="$echo2"), {"event_id": 5}]}
    r = as_put(mx, "echo-1", body)
    assert r.status_code == 200 and r.json() == {}
    assert as_put(mx, "echo-1", body).status_code == 200
    txns, events = metrics(mx, "causeway_matrix_transactions_total"), metrics(mx, "causeway_matrix_events_total")
    delta = lambda now, before, k: now[k] - before.get(k, 0)  # noqa: E731
    assert delta(txns, txns0, 'result="taken"') == 1 and delta(txns, txns0, 'result="repeat"') == 1, txns
    assert delta(events, events0, 'result="ignored"') == 2 and delta(events, events0, 'result="invalid"') == 1, events
    assert delta(events, events0, 'result="accepted"') == 0, events
    assert pg.psql("SELECT count(*) FROM events", db_url) == stored0


def test_a_transaction_whose_commit_fails_is_stored_when_retried(mx, hs, gk, pg, db_url):
    """The answer is 200 only once the events are durable, and so is the
    memory of answered transactions: after a commit that failed (503), the
    homeserver's retry of the same transaction is stored, not waved through."""
    a, srv = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    # The next commit with an event from Matrix fails, once (checked at commit: a deferred trigger).
    pg.psql("CREATE SEQUENCE test_fail_once; "
            "CREATE FUNCTION test_fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            " IF NEW.origin_network = 'matrix' AND nextval('test_fail_once') = 1 THEN "
            "  RAISE EXCEPTION 'injected failure at commit'; END IF; RETURN NULL; END $$; "
            "CREATE CONSTRAINT TRIGGER test_fail_commit AFTER INSERT ON events DEFERRABLE INITIALLY DEFERRED "
            " FOR EACH ROW EXECUTE FUNCTION test_fail_commit()", db_url)
    ev = {"event_id": "$commit1", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
          "origin_server_ts": 1700000000000, "content": {"msgtype": "m.text", "body": "after a failed commit"}}
    r = as_put(mx, "300", {"events": [ev]})
    assert r.status_code == 503 and r.json()["errcode"] == "M_UNKNOWN", r.text
    assert pg.psql("SELECT count(*) FROM events WHERE origin_native_id = '$commit1'", db_url) == "0"
    r = wait_until(lambda: (lambda x: x if x.status_code == 200 else None)(as_put(mx, "300", {"events": [ev]})),
                   what="the retry taken")
    assert pg.psql("SELECT count(*) FROM events WHERE origin_native_id = '$commit1'", db_url) == "1"
    got = srv.wait_events(1)
    assert got[-1]["content"]["parts"][0]["body"] == "after a failed commit"


def test_users_query_answers_for_known_remote_users(mx, gk):
    a, _ = gk
    a.create_room([a.user("wally"), ALICE])
    h = {"Authorization": "Bearer " + HS_TOKEN}
    r = requests.get(mx.url + "/_matrix/app/v1/users/@_cw_gk_wally:example.org", headers=h)
    assert r.status_code == 200 and r.json() == {}
    r = requests.get(mx.url + "/_matrix/app/v1/users/@_cw_gk_nobody:example.org", headers=h)
    assert r.status_code == 404 and r.json()["errcode"] == "M_NOT_FOUND"
    r = requests.get(mx.url + "/users/@someone:example.org", headers=h)
    assert r.status_code == 404
    r = requests.get(mx.url + "/_matrix/app/v1/rooms/%23_cw_x:example.org", headers=h)
    assert r.status_code == 404 and r.json()["errcode"] == "M_NOT_FOUND"


def test_a_head_of_a_query_registers_no_ghost(mx, hs, gk):
    """The appservice API's queries are GETs only, and the user query has
    an effect (the ghost of a known remote user is registered on the
    homeserver before the 200).  A HEAD, taken as the GET of its path
    (RFC 9110 9.3.2), ran it until the forty-sixth session: it registered
    the ghost and answered without a body.  HEAD is a safe method (9.2.1):
    now it is a method these paths do not take, 405 M_UNRECOGNIZED with
    the methods they take in Allow, before the token is looked at, as for
    the transactions and the ping, and nothing is registered."""
    a, _ = gk
    a.create_room([a.user("wally"), ALICE])
    ghost = "@_cw_gk_wally:example.org"
    h = {"Authorization": "Bearer " + HS_TOKEN}
    for path, allow in (("/_matrix/app/v1/users/" + ghost, "GET"), ("/users/" + ghost, "GET"),
                        ("/_matrix/app/v1/rooms/%23_cw_x:example.org", "GET"), ("/rooms/%23_cw_x:example.org", "GET"),
                        ("/_matrix/app/v1/transactions/1", "PUT"), ("/transactions/1", "PUT"),
                        ("/_matrix/app/v1/ping", "POST")):
        for headers in (h, {}):
            r = requests.head(mx.url + path, headers=headers, timeout=10)
            assert r.status_code == 405 and r.headers.get("Allow") == allow, (path, r.status_code, r.headers)
        # the body a HEAD's answer does not carry
        r = requests.request("PATCH", mx.url + path, headers=h, timeout=10)
        assert r.status_code == 405 and r.json()["errcode"] == "M_UNRECOGNIZED", (path, r.text)
        assert r.headers.get("Allow") == allow, (path, r.headers)
    assert not hs.user_exists(ghost)
    r = requests.get(mx.url + "/_matrix/app/v1/users/" + ghost, headers=h, timeout=10)
    assert r.status_code == 200 and r.json() == {} and hs.user_exists(ghost)


def test_a_room_alias_with_a_slash_reaches_its_route(mx):
    """The Matrix specification lets a room alias's localpart hold a '/'
    (and a user id's), which the homeserver percent-encodes in the path of
    its query.  The path libmicrohttpd had decoded was routed until the
    forty-fifth session: such a query reached no route (404 M_UNRECOGNIZED,
    whatever its token).  Now it is the route's: the token is checked, and
    the alias is unknown."""
    h = {"Authorization": "Bearer " + HS_TOKEN}
    for base in ("/_matrix/app/v1", ""):
        for what, q, unknown in (("rooms", "%23a%2Fb:example.org", "no such room alias"),
                                 ("users", "@_cw_gk_a%2Fb:example.org", "no such user")):
            r = requests.get(mx.url + f"{base}/{what}/{q}", headers=h, timeout=10)
            assert r.status_code == 404 and r.json() == {"errcode": "M_NOT_FOUND", "error": unknown}, (base, q, r.text)
            r = requests.get(mx.url + f"{base}/{what}/{q}", headers={"Authorization": "Bearer nope"}, timeout=10)
            assert r.status_code == 403 and r.json()["errcode"] == "M_FORBIDDEN", (base, q, r.text)
    # A dot segment is resolved into no route.
    r = requests.get(mx.url + "/_matrix/app/v1/rooms/%2E%2E", headers=h, timeout=10)
    assert r.status_code == 404 and r.json()["errcode"] == "M_UNRECOGNIZED", r.text


def test_a_ghost_that_could_not_be_registered_is_not_said_to_exist(mx, hs, gk):
    """GET /users/{id}: the ghost is registered before the answer; when the
    homeserver does not take the registration (503), the answer is no 200
    (before, it was: the homeserver took the invitation of a user that
    does not exist, and the ghost could never join). The next query
    registers it."""
    a, _ = gk
    a.create_room([a.user("wally"), ALICE])
    ghost = "@_cw_gk_wally:example.org"
    hs.refuse = lambda method, path, user: path.endswith("/register")
    h = {"Authorization": "Bearer " + HS_TOKEN}
    r = requests.get(mx.url + "/_matrix/app/v1/users/" + ghost, headers=h, timeout=10)
    assert r.status_code == 503 and r.json()["errcode"] == "M_UNKNOWN", r.text
    assert not hs.user_exists(ghost)
    hs.refuse = None
    r = requests.get(mx.url + "/_matrix/app/v1/users/" + ghost, headers=h, timeout=10)
    assert r.status_code == 200 and r.json() == {} and hs.user_exists(ghost)


def test_a_stop_waits_for_a_ghost_registration_under_way(make_daemon, db_url, hs):
    """SIGTERM while GET /users/{id} waits on a slow homeserver's POST
    /register (3 s, longer than the drain of 1 s and its second second):
    the daemon answers the query and exits cleanly.  The registration
    runs on a thread of its own, which nothing waited for: the HTTP front
    stopped under a suspended request (libmicrohttpd aborts the process
    then) and the adapter was freed under the thread."""
    d = start_mx(make_daemon, db_url, hs, server={"drain_timeout_ms": "1000"})
    a, srv = add_gk(d)
    try:
        a.create_room([a.user("wally"), ALICE])
        ghost = "@_cw_gk_wally:example.org"
        # The bot's own registration (after /readyz) must not be the slow
        # one the stop comes during (session 35).
        wait_until(lambda: hs.user_exists("@_cw_bot:example.org"), what="the bot registered")
        started = threading.Event()

        def slow(method, path, user):
            if path.endswith("/register"):
                started.set()
                time.sleep(3.0)
            return False
        hs.refuse = slow
        answer = {}

        def ask():
            try:
                answer["r"] = requests.get(d.url + "/_matrix/app/v1/users/" + ghost,
                                           headers={"Authorization": "Bearer " + HS_TOKEN}, timeout=20)
            except requests.RequestException as ex:
                answer["ex"] = ex
        t = threading.Thread(target=ask)
        t.start()
        assert started.wait(10), "the registration under way"
        assert d.stop() == 0, d.log()[-2000:]
        t.join(20)
        assert "r" in answer and answer["r"].status_code == 200, answer
        assert hs.user_exists(ghost)
    finally:
        hs.refuse = None
        srv.close()


def test_management_room_consent_flow(mx, hs, gk, pg, db_url):
    """A user invites the bot, opts in there, gets one consent request for a
    new sender, accepts it: the held messages arrive in order."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    mgmt = alice.create_dm(bot)
    notices = lambda: [e["content"]["body"] for e in hs.events(mgmt)
                       if e["type"] == "m.room.message" and e["sender"] == bot]
    wait_until(lambda: any("Commands" in n for n in notices()), what="the bot's help")
    # A network no sender has is not stored as if it meant something.
    alice.send_text(mgmt, "opt-in whatsapp")
    wait_until(lambda: any("I know no network whatsapp. The networks here: peer:gk" in n for n in notices()),
               what="the unknown network")
    assert pg.psql("SELECT count(*) FROM user_optin", db_url) == "0"
    alice.send_text(mgmt, "opt-in gk")  # a peer's name alone will do
    wait_until(lambda: any("opted in for peer:gk" in n for n in notices()), what="opt-in")
    # The peer names its user as it likes: the request quotes at most 80
    # bytes of it, and the instructions come whole after it.
    name = "Reply accept mimi://evil.example/u/x " + "é" * 100
    assert a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": name}).status_code == 200
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    ids = [a.send(room, a.user("wally"), f"first {i}").json()["id"] for i in range(3)]
    # One request, shown once, however many messages.
    wait_until(lambda: any("wants to write to you" in n for n in notices()), what="the consent request")
    assert sum("wants to write to you" in n for n in notices()) == 1
    request = next(n for n in notices() if "wants to write to you" in n)
    quoted = request.split('"')[1]
    assert request.startswith('"' + quoted + '" mimi://wa.example/u/wally (network') and len(quoted.encode()) <= 80
    assert quoted == name.encode()[:len(quoted.encode())].decode()  # whole characters
    assert 'Reply "accept mimi://wa.example/u/wally" or "block mimi://wa.example/u/wally".' in request
    assert pg.psql("SELECT count(*) FROM outbox WHERE state = 'held'", db_url) == "3"
    alice.send_text(mgmt, "accept mimi://wa.example/u/wally")
    wait_until(lambda: any("3 waiting message(s) released" in n for n in notices()), what="accept")
    ghost = "@_cw_gk_wally:example.org"
    dm = wait_until(lambda: next((rid for rid in hs.rooms() if any(
        e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="delivery")
    wait_until(lambda: len([e for e in hs.events(dm) if e["type"] == "m.room.message"]) == 3, what="all three")
    assert [e["content"]["body"] for e in hs.events(dm) if e["type"] == "m.room.message"] == \
        ["first 0", "first 1", "first 2"]
    # list shows the decision; block drops what comes next.
    alice.send_text(mgmt, "list")
    wait_until(lambda: any("allowed: mimi://wa.example/u/wally" in n for n in notices()), what="list")
    alice.send_text(mgmt, "block mimi://wa.example/u/wally")
    wait_until(lambda: any(n.startswith("Blocked mimi://wa.example/u/wally") for n in notices()), what="block")
    assert len(ids) == 3
    # She leaves the management room: the bot leaves too, and a new request
    # waits for her next one instead of going to a room nobody reads.
    alice.leave(mgmt)
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot leaving")
    room2 = a.create_room([a.user("ed"), ALICE]).json()["id"]
    a.send(room2, a.user("ed"), "hi alice")
    wait_until(lambda: pg.psql("SELECT count(*) FROM consent_requests WHERE state = 'pending'", db_url) == "1",
               what="ed's request")
    time.sleep(0.5)
    assert not any("mimi://wa.example/u/ed" in n for n in notices())
    mgmt2 = alice.create_room(preset="private_chat", is_direct=True, invite=[bot])  # hers to kick in
    wait_until(lambda: any("mimi://wa.example/u/ed" in e["content"].get("body", "") and
                           "wants to write to you" in e["content"]["body"]
                           for e in hs.events(mgmt2) if e["sender"] == bot), what="ed's request in the new room")
    # She puts the bot out of that one: the next request is not lost in a
    # room the bot cannot write to, but waits for her next one.
    r = alice.request("POST", f"/_matrix/client/v3/rooms/{mgmt2}/kick", {"user_id": bot})
    assert r.status_code == 200, r.text
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0", what="no management room")
    room3 = a.create_room([a.user("fred"), ALICE]).json()["id"]
    a.send(room3, a.user("fred"), "hi alice")
    wait_until(lambda: pg.psql("SELECT count(*) FROM consent_requests WHERE state = 'pending'", db_url) == "2",
               what="fred's request")
    mgmt3 = alice.create_dm(bot)
    wait_until(lambda: any("mimi://wa.example/u/fred" in e["content"].get("body", "") and
                           "wants to write to you" in e["content"]["body"]
                           for e in hs.events(mgmt3) if e["sender"] == bot), what="fred's request in the new room")
    assert pg.psql("SELECT count(*) FROM identities WHERE localpart = '_cw_bot'", db_url) == "0"


@pytest.mark.parametrize("how", ["leave", "kick"])
def test_a_management_room_whose_forgetting_fails_is_tried_again(mx, hs, pg, db_url, how):
    """alice leaves her room with the bot, or puts the bot out of it, and
    the database refuses the statement that forgets the room once (a lock
    or statement timeout, a failover). The work is tried again, as an
    unbinding of a direct room is: the room is hers no more, and a leave
    has the bot leave it too. Until the fifty-second session the failure
    was taken for no management room (her leave: the bot stayed in the
    room) or lost (the bot put out), and the room stayed hers: her consent
    requests went on to it."""
    bot = "@_cw_bot:example.org"
    alice, mgmt, _ = alice_and_the_bot(hs)
    if how == "kick":  # a room of hers to kick in
        mgmt = alice.create_room(preset="private_chat", is_direct=True, invite=[bot])
        wait_until(lambda: pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == mgmt, what="the new room")
        wait_until(lambda: any("Commands" in e["content"].get("body", "") for e in hs.events(mgmt)
                               if e["sender"] == bot), what="the bot's help")
    pg.psql("CREATE SEQUENCE test_fail; "
            "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            " IF nextval('test_fail') <= 1 THEN RAISE EXCEPTION 'injected failure'; END IF; "
            " RETURN OLD; END $$; "
            "CREATE TRIGGER test_fail BEFORE DELETE ON matrix_mgmt_rooms FOR EACH ROW EXECUTE FUNCTION test_fail()",
            db_url)
    if how == "leave":
        alice.leave(mgmt)
    else:
        r = alice.request("POST", f"/_matrix/client/v3/rooms/{mgmt}/kick", {"user_id": bot})
        assert r.status_code == 200, r.text
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0", timeout=20,
               what="the room forgotten")
    assert int(pg.psql("SELECT last_value FROM test_fail", db_url)) >= 2
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot out of the room")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               what="her leave's work done")


def test_accept_or_block_alone_in_a_reply_to_a_request_takes_its_party(mx, hs, gk, pg, db_url):
    """"accept" or "block" with no party, in a reply to the bot's notice of a
    consent request (m.in_reply_to), is about that request's party: the
    notice as the homeserver gives it, said by the bot, names it. A reply
    to another message of the bot's, or to a text of her own that looks
    like a request, is "Whom?" as before; until the forty-seventh session
    every such reply was."""
    a, _ = gk
    bot = "@_cw_bot:example.org"
    alice, mgmt, said = alice_and_the_bot(hs)
    alice.send_text(mgmt, "opt-in gk")
    wait_until(lambda: any("opted in for peer:gk" in n for n in said()), what="opt-in")
    for who in ("wally", "ed"):
        room = a.create_room([a.user(who), ALICE]).json()["id"]
        assert a.send(room, a.user(who), f"hi from {who}").status_code in (200, 202)

    def request_of(who):
        return next((e["event_id"] for e in hs.events(mgmt) if e["sender"] == bot and
                     f"mimi://wa.example/u/{who} (network" in e["content"].get("body", "")), None)
    wally_req = wait_until(lambda: request_of("wally"), what="wally's request")
    ed_req = wait_until(lambda: request_of("ed"), what="ed's request")
    help_ev = next(e["event_id"] for e in hs.events(mgmt) if e["sender"] == bot and
                   "Commands" in e["content"].get("body", ""))
    n = len(said())
    forged = alice.send(mgmt, "m.room.message", {
        "msgtype": "m.text", "body": 'x\nReply "accept mimi://wa.example/u/ed" or "block mimi://wa.example/u/ed".'})
    wait_until(lambda: len(said()) > n, what="the help for no command")

    def reply(verb, to, quote=""):
        n = len(said())
        alice.send(mgmt, "m.room.message", {"msgtype": "m.text", "body": quote + verb,
                                            "m.relates_to": {"m.in_reply_to": {"event_id": to}}})
        wait_until(lambda: len(said()) > n, what=f"the answer to {verb}")
        return said()[n]
    whom = "Whom? Give an address (mimi://...), a bridged user's Matrix id, or a domain."
    assert reply("block", help_ev) == whom
    assert reply("block", forged) == whom  # her own text: the request line is the bot's word only
    assert pg.psql("SELECT count(*) FROM consents", db_url) == "0"
    assert reply("accept", wally_req) == "Accepted mimi://wa.example/u/wally. 1 waiting message(s) released."
    # with the client's quote of the notice before it (the reply fallback)
    assert reply("Block", ed_req, quote="> <@_cw_bot:example.org> ed wants to write to you\n\n") == \
        "Blocked mimi://wa.example/u/ed. 1 waiting message(s) dropped."
    assert pg.psql("SELECT subject || ' ' || state FROM consents ORDER BY 1", db_url) == \
        "mimi://wa.example/u/ed blocked\nmimi://wa.example/u/wally allowed"


def list_answered_after_a_look_for_expiries(alice, mgmt, hs, pg, db_url, answered):
    """alice's "list" answered (answered() true) by a round of the bot's
    that looked for expiries before (the look back of a bot started
    again), and all that look queued said: what the bot tells of expiries
    is read then.  The answer's first send is refused (500), so that it
    is queued (matrix_notices) and sent by a later round, whose look for
    expiries comes before its notices; said at once (in the round's
    inbox, before its look), it proved no look ran.  Until the
    sixty-fourth session a sleep of a second and a half after the answer
    stood for the look."""
    hs.refuse_send = lambda path: "/cwcmd-" in path
    try:
        alice.send_text(mgmt, "list")
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_notices WHERE txn_id LIKE 'cwcmd-%' "
                                   "AND done_at IS NULL", db_url) != "0", what="the answer to list queued")
    finally:
        hs.refuse_send = None
    wait_until(answered, what="the answer to list")
    all_said(hs, pg, db_url)


def test_an_expired_request_is_withdrawn_in_the_management_room(mx, hs, gk, pg, db_url):
    """A consent request shown in the management room that expires (the
    policy's sweep: docs/policy.md; its held messages expire and are
    deleted with it) is withdrawn there: one short notice says the request
    from that sender expired and their messages were deleted, read from
    the sweep's audit record (consent.expire) as the XMPP component reads
    it. A request still pending is not touched, and a restart tells
    nothing again. Until the thirty-second session the request's notice
    stood as if it could still be accepted."""
    a, srv = gk
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    for who in ("wally", "eve"):
        room = a.create_room([a.user(who), ALICE]).json()["id"]
        assert a.send(room, a.user(who), f"may I? ({who})").status_code == 202
    wait_until(lambda: sum("wants to write to you" in n for n in said()) == 2, what="both requests shown")
    expired = lambda: [n for n in said() if "expired" in n]  # noqa: E731
    assert expired() == []
    # wally's request and his held message reach their expiry
    pg.psql("UPDATE outbox o SET created_at = now() - interval '8 days' FROM events e JOIN identities s "
            "ON s.id = e.sender_id WHERE e.id = o.event_id AND s.localpart = 'wally'; "
            "UPDATE consent_requests q SET created_at = now() - interval '8 days', "
            "expires_at = now() - interval '1 s' FROM identities i "
            "WHERE i.id = q.remote_identity_id AND i.localpart = 'wally'", db_url)
    wait_until(lambda: expired(), timeout=20, what="the expiry told")
    [note] = expired()
    assert "mimi://wa.example/u/wally" in note and "deleted" in note and "eve" not in note, note
    assert pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id JOIN identities s "
                   "ON s.id = e.sender_id WHERE s.localpart = 'wally'", db_url) == "expired"
    assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'consent.expire'", db_url) == "1"
    # once: not again after a restart (the bot's look starts over)
    mx.stop()
    mx.start()
    list_answered_after_a_look_for_expiries(alice, mgmt, hs, pg, db_url,
                                            lambda: any("request from mimi://wa.example/u/eve" in n for n in said()))
    assert len(expired()) == 1, said()


def test_a_request_whose_sender_the_rules_now_refuse_is_withdrawn_and_never_shown(mx, hs, gk, pg, db_url):
    """The operator denies wally (abuse) while his request to alice, shown
    in her management room, and mallory's to carol, who has no management
    room yet, wait. Both requests are withdrawn (docs/policy.md, "Consent
    and the sweep"): alice is told in one notice that the server no longer
    takes wally's messages (not that he will ask again), her list no
    longer names him, and carol, opening her room with the bot later, is
    never shown mallory's. eve's request stands until alice opts out of
    the network, which withdraws it with its own words. Until the
    forty-third session such requests stood for a week: carol was shown a
    request from a sender the operator had denied."""
    a, srv = gk
    carol = "mimi://example.org/u/carol"
    for user in (ALICE, carol):
        assert mx.admin("POST", "/optins", json={"user": user, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    for who, to in (("wally", ALICE), ("eve", ALICE), ("mallory", carol)):
        room = a.create_room([a.user(who), to]).json()["id"]
        assert a.send(room, a.user(who), f"may I? ({who})").status_code == 202
    wait_until(lambda: sum("wants to write to you" in n for n in said()) == 2, what="both requests shown")
    withdrawn = lambda: [n for n in said() if "withdrawn" in n or "expired" in n]  # noqa: E731
    for who in ("wally", "mallory"):
        r = mx.admin("POST", "/rules", json={"scope": "user", "pattern": a.user(who), "mode": "deny"})
        assert r.status_code == 201, r.text
    wait_until(lambda: withdrawn(), timeout=20, what="the withdrawal told")
    [note] = withdrawn()
    assert "mimi://wa.example/u/wally" in note and "no longer takes messages from them" in note, note
    assert "asked again" not in note
    alice.send_text(mgmt, "list")
    listed = wait_until(lambda: next((n for n in said() if "opted in: peer:gk" in n), None), what="the answer to list")
    assert "mimi://wa.example/u/eve" in listed and "wally" not in listed, listed
    # mallory's withdrawal is a walk of its own when her rule came after
    # the policy thread's walk for wally's, which alice's notice and list
    # follow, not that one: waited for, where until the sixty-third
    # session it was read at once
    wait_until(lambda: pg.psql("SELECT q.state FROM consent_requests q JOIN identities s "
                               "ON s.id = q.remote_identity_id WHERE s.localpart = 'mallory'", db_url) == "expired",
               what="mallory's request withdrawn")
    _, _, carol_said = alice_and_the_bot(hs, name="carol")
    # zoe's request, made after mallory's, is shown: the bot shows them in
    # order, so mallory's would have been shown first
    room = a.create_room([a.user("zoe"), carol]).json()["id"]
    assert a.send(room, a.user("zoe"), "may I? (zoe)").status_code == 202
    wait_until(lambda: any("wants to write to you" in n for n in carol_said()), what="zoe's request shown")
    asked = [n for n in carol_said() if "wants to write to you" in n]
    assert len(asked) == 1 and "mimi://wa.example/u/zoe" in asked[0], carol_said()
    # alice opts out of the gatekeeper's network: eve's request goes, in its own words.
    alice.send_text(mgmt, "opt-out peer:gk")
    wait_until(lambda: len(withdrawn()) == 2, timeout=20, what="eve's withdrawal told")
    assert "mimi://wa.example/u/eve" in withdrawn()[1] and "opted out" in withdrawn()[1], withdrawn()


def test_a_management_room_that_refuses_the_bot_holds_up_no_one_elses_requests(mx, hs, gk, pg, db_url):
    """alice takes away the bot's right to speak in her management room
    (its power levels: the homeserver answers the bot's words 403), and
    twenty remote users write to her. Her room is one no more, as after
    the bot's kick: the bot forgets it and leaves, and her requests wait
    for the next room she opens with it, where they are shown. carol's
    request, made after those twenty, is shown at once. Until the
    forty-seventh session the twenty refused requests stayed first in the
    bot's look (twenty a round, oldest first), tried every half minute,
    and no other user's request was ever shown."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    carol = "mimi://example.org/u/carol"
    assert mx.admin("PATCH", "/settings", json={"policy.consent_requests_per_user_per_day": 0}).ok
    for user in (ALICE, carol):
        assert mx.admin("POST", "/optins", json={"user": user, "network": "peer:gk", "opted_in": True}).ok
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    mgmt = alice.create_room(preset="private_chat", is_direct=True, invite=[bot])  # the bot at level 0
    said = lambda room: [e["content"]["body"] for e in hs.events(room)  # noqa: E731
                         if e["type"] == "m.room.message" and e["sender"] == bot]
    wait_until(lambda: any("Commands" in n for n in said(mgmt)), what="the bot's help")
    pl = hs.state(mgmt, "m.room.power_levels")["content"]
    pl["events_default"] = 50
    alice.state(mgmt, "m.room.power_levels", pl)
    for k in range(20):
        room = a.create_room([a.user(f"s{k}"), ALICE]).json()["id"]
        assert a.send(room, a.user(f"s{k}"), f"hello from s{k}").status_code == 202
    _, _, carol_said = alice_and_the_bot(hs, name="carol")
    room = a.create_room([a.user("zoe"), carol]).json()["id"]
    assert a.send(room, a.user("zoe"), "may I? (zoe)").status_code == 202
    wait_until(lambda: any("mimi://wa.example/u/zoe" in n and "wants to write to you" in n for n in carol_said()),
               timeout=15, what="zoe's request shown to carol")
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot leaving alice's room")
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms WHERE user_id = '@alice:example.org'", db_url) == "0"
    assert said(mgmt) == [n for n in said(mgmt) if "Commands" in n]
    assert pg.psql("SELECT count(*) FROM consent_requests WHERE state = 'pending' AND notified_at IS NULL", db_url) == "20"
    mgmt2 = alice.create_dm(bot)
    wait_until(lambda: sum("wants to write to you" in n for n in said(mgmt2)) == 20, timeout=15,
               what="her requests in her new room")


def test_a_stop_while_the_bot_waits_for_the_homeserver_is_at_once(make_daemon, db_url, hs):
    """The bot's answer to alice's "help" is slow to be taken (the
    homeserver answers the bot's sends after 8 s) when the daemon is
    stopped: the bot's call ends with the stop, within a second (libcurl
    looks at it at least once a second), and the process exits in 0.6 s
    (with the leak check).  Until the fiftieth session the stop waited
    for the call, up to its 10 s timeout (6.7 s measured here), and for
    each later call of the round in turn."""
    mx = start_mx(make_daemon, db_url, hs)
    alice, mgmt, said = alice_and_the_bot(hs)
    bot = "@_cw_bot:example.org"
    sending = threading.Event()

    def latency(user):
        if user != bot:
            return 0.0
        sending.set()
        return 8.0
    hs.send_latency = latency
    try:
        alice.send_text(mgmt, "help")
        # the bot in its send of the answer (not a fixed 1.5 s, which a
        # loaded machine's bot can take to get there)
        assert sending.wait(20), "the bot's answer not sent"
        mx.signal(signal.SIGTERM)
        assert mx.wait_exit(30) == 0, mx.log()[-3000:]
    finally:
        hs.send_latency = 0.0
    # the send's 8 s not waited for, on the daemon's clock (its "stopped"
    # record): the test's from the signal to the exit counted the
    # sanitizers' exit and its own wait for a processor (over 3.5 s once)
    took = stopped_in(mx)
    assert took < 6, took
    assert not any(r.get("msg", "").startswith("the stop took too long") for r in mx.records)


def test_a_homeserver_refusing_the_bot_everywhere_costs_no_one_her_management_room(mx, hs, gk, pg, db_url):
    """A 403 to the bot's words in a management room ends that room only
    when the homeserver takes the bot elsewhere (GET /account/whoami): one
    that refuses the bot everywhere (its registration lost: Conduit
    answers an unregistered appservice user so) is the homeserver's
    trouble, not the room's, and the request waits for it to end, shown
    then in the same room."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.refuse = lambda method, path, user: 403 if user == bot else False
    try:
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        assert a.send(room, a.user("wally"), "may I?").status_code == 202
        wait_until(lambda: any(r["user"] == bot and "/send/" in r["path"] and r["status"] == 403
                               for r in hs.requests), what="the request refused")
        time.sleep(1)
        assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "1"
    finally:
        hs.refuse = None
    wait_until(lambda: any("wants to write to you" in n for n in said()), timeout=45,
               what="the request shown once the bot is taken again")
    assert hs.members(mgmt).get(bot) == "join"


def test_first_contacts_from_one_domain_ask_a_user_no_more_than_the_daily_bound(mx, hs, gk, pg, db_url):
    """policy.consent_requests_per_user_per_day (default 10): a peer rotating
    sender names asks one local user no more than that a day.  The first
    contacts past it are held as any are (the admin API's held view), but
    no request is made and no notice shown; the user's list names their
    senders, and accept releases them.  0 lifts the bound.  Until the
    fortieth session every new name made a notice, unless the operator had
    written a rule with consent_requests_per_day."""
    a, srv = gk
    assert mx.admin("GET", "/settings").json()["policy.consent_requests_per_user_per_day"] == 10
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    ids = []
    for k in range(12):
        room = a.create_room([a.user(f"s{k}"), ALICE]).json()["id"]
        r = a.send(room, a.user(f"s{k}"), f"hello from s{k}")
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    asked = pg.psql("SELECT string_agg(i.localpart, ',' ORDER BY q.id) FROM consent_requests q "
                    "JOIN identities i ON i.id = q.remote_identity_id", db_url)
    assert asked == ",".join(f"s{k}" for k in range(10))
    wait_until(lambda: sum("wants to write to you" in n for n in said()) == 10, what="ten notices")
    held = mx.admin("GET", f"/held?user={ALICE}").json()["rows"]
    assert sorted(h["message"] for h in held) == sorted(ids)
    # The refusal: audited once (an episode), with the user not asked.
    assert pg.psql("SELECT string_agg(a.reason_code || ' ' || coalesce(a.rule_id::text, '-') || ' ' || "
                   "(a.details->>'user') || ' ' || e.public_id, ',') FROM audit_log a JOIN events e "
                   "ON e.id = a.event_id WHERE a.action = 'policy.limit'", db_url) == \
        f"rate_limited_recipient_consent_requests - {ALICE} {ids[10]}"
    alice.send_text(mgmt, "list")
    wait_until(lambda: any("held, not asked" in n for n in said()), what="the answer to list")
    [listed] = [n for n in said() if "held, not asked" in n]
    lines = [x for x in listed.splitlines() if x.startswith("held, not asked")]
    assert sorted(lines) == [f"held, not asked (too many requests): {a.user(f's{k}')} (peer:gk)"
                             for k in (10, 11)], listed
    assert sum(x.startswith("request from ") for x in listed.splitlines()) == 10, listed
    # She may accept one of them all the same: its message is released.
    alice.send_text(mgmt, f"accept {a.user('s11')}")
    wait_until(lambda: pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                               f"WHERE e.public_id = '{ids[11]}'", db_url) in ("pending", "in_flight", "delivered"),
               what="s11's message released")
    # 0: no bound; the next new name asks again.
    assert mx.admin("PATCH", "/settings", json={"policy.consent_requests_per_user_per_day": -1}).status_code == 400
    assert mx.admin("PATCH", "/settings", json={"policy.consent_requests_per_user_per_day": 0}).ok
    room = a.create_room([a.user("s12"), ALICE]).json()["id"]

    def s12_asks():
        assert a.send(room, a.user("s12"), "and me?").status_code == 202
        return pg.psql("SELECT count(*) FROM consent_requests q JOIN identities i ON i.id = q.remote_identity_id "
                       "WHERE i.localpart = 's12'", db_url) == "1"
    wait_until(s12_asks, what="the bound lifted")
    wait_until(lambda: sum("wants to write to you" in n for n in said()) == 11, what="s12's notice")


def test_an_expiry_not_told_is_not_told_days_later_by_a_restart(mx, hs, gk, pg, db_url):
    """A consent request's expiry the bot did not tell when it happened
    (here: alice had no management room then) is passed for good once its
    record is a minute old: told by neither process. A restart (or another
    process taking the bot's lock) looks six days back and tells it then,
    late, after alice has accepted the sender since: "expired without an
    answer ... if they write again, you will be asked again". Until the
    thirty-second session's review it did (a review's finding)."""
    a, srv = gk
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    assert a.send(room, a.user("wally"), "may I?").status_code == 202
    wait_until(lambda: any("wants to write to you" in n for n in said()), what="the request shown")
    alice.leave(mgmt)
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0", what="no management room")
    pg.psql("UPDATE outbox o SET created_at = now() - interval '8 days' FROM events e JOIN identities s "
            "ON s.id = e.sender_id WHERE e.id = o.event_id AND s.localpart = 'wally'; "
            "UPDATE consent_requests q SET created_at = now() - interval '8 days', "
            "expires_at = now() - interval '1 s' FROM identities i "
            "WHERE i.id = q.remote_identity_id AND i.localpart = 'wally'", db_url)
    wait_until(lambda: pg.psql("SELECT count(*) FROM audit_log WHERE action = 'consent.expire'", db_url) == "1",
               timeout=30, what="the expiry")
    # The bot's cursor passes a record a minute old: moved back a minute
    # rather than waited for, then a few of the bot's turns (0.5 s each).
    pg.psql("UPDATE audit_log SET at = at - interval '2 minutes' WHERE action = 'consent.expire'", db_url)
    time.sleep(3)
    bot = "@_cw_bot:example.org"
    mgmt2 = alice.create_dm(bot)
    said2 = lambda: [e["content"]["body"] for e in hs.events(mgmt2)  # noqa: E731
                     if e["type"] == "m.room.message" and e["sender"] == bot]
    wait_until(lambda: any("Commands" in n for n in said2()), what="the bot's help")
    alice.send_text(mgmt2, "accept mimi://wa.example/u/wally")
    wait_until(lambda: any("Accepted" in n for n in said2()), what="the accept")
    time.sleep(2)
    before = [n for n in said2() if "expired" in n]
    mx.stop()
    mx.start()
    alice.send_text(mgmt2, "list")
    wait_until(lambda: len([n for n in said2() if "request" in n.lower() or "Nothing" in n]) >= 1, what="list")
    time.sleep(3)
    after = [n for n in said2() if "expired" in n]
    print("before the restart:", before, "after:", after)
    assert after == before, f"told only after a restart, after alice accepted wally: {after}"


def test_a_block_from_the_bot_drops_what_waits_for_delivery(mx, hs, gk, pg, db_url):
    """alice allowed wally; the delivery of his first message backs off (as
    after a failed delivery to the homeserver: its row pending again, due
    in an hour) and three more wait behind it. Her block, from the bot,
    drops all four and says so: before, only held messages were dropped,
    and these were delivered after her block."""
    a, srv = gk

    def states(pg, db_url, ids):  # of the rows to Matrix, in the messages' order
        rows = pg.psql("SELECT e.public_id, o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                       "WHERE o.destination = 'matrix' AND e.public_id IN (%s)" % ",".join("'%s'" % i for i in ids),
                       db_url)
        got = dict(r.split("|") for r in rows.splitlines())
        return [got.get(i) for i in ids]
    consent_alice(mx)
    alice, mgmt, notices = alice_and_the_bot(hs)
    ghost = "@_cw_gk_wally:example.org"
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    first = a.send(room, a.user("wally"), "hello").json()["id"]
    dm = wait_until(lambda: next((rid for rid in hs.rooms() if any(
        e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="hello")
    wait_until(lambda: states(pg, db_url, [first]) == ["delivered"], what="hello recorded")
    pg.psql("UPDATE outbox o SET state = 'pending', next_attempt_at = now() + interval '1 hour' FROM events e "
            "WHERE e.id = o.event_id AND e.public_id = '%s'" % first, db_url)
    ids = [first] + [a.send(room, a.user("wally"), f"spam {i}").json()["id"] for i in range(3)]
    assert states(pg, db_url, ids) == ["pending"] * 4
    alice.send_text(mgmt, "block mimi://wa.example/u/wally")
    wait_until(lambda: any(n.startswith("Blocked mimi://wa.example/u/wally. 4 waiting message(s) dropped")
                           for n in notices()), what="the block")
    assert states(pg, db_url, ids) == ["dropped"] * 4
    assert [e["content"]["body"] for e in hs.events(dm) if e["type"] == "m.room.message"] == ["hello"]


def test_a_block_made_while_a_message_is_in_flight_stops_its_retry(make_daemon, db_url, hs, pg):
    """alice allowed wally; his message is in flight to the homeserver
    (the send hangs) when she blocks him: her block's sweep passes over a
    row in flight (the far side may have it). The homeserver then fails
    the send (500): the row is decided again as it goes back to waiting,
    and her block drops it, with why. Until the forty-third session it
    went back pending and its retry (due in 100 ms here, 500 by default)
    came before the periodic sweep (2 s by default; a minute here, so that
    only the failure's decision can stop it) and delivered it after her
    block (a review's probe)."""
    mx = start_mx(make_daemon, db_url, hs, policy={"sweep_interval_ms": "60000"})
    a, srv = add_gk(mx)
    try:
        room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
        wait_until(lambda: any(e["type"] == "m.room.message" and e["content"].get("body") == "hello"
                               for e in hs.events(mx_room)), what="hello delivered")
        entered, gate = threading.Event(), threading.Event()

        def hang_then_fail(path):
            entered.set()
            gate.wait(60)
            return True  # 500 M_UNKNOWN
        hs.refuse_send = hang_then_fail
        try:
            r = a.send(room, a.user("wally"), "after the block")
            assert r.status_code == 202, r.text
            msg = r.json()["id"]
            row = (f"SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{msg}' AND o.destination = 'matrix'")
            assert entered.wait(30), "the send never reached the homeserver"
            assert pg.psql(row, db_url) == "in_flight"
            out = mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user",
                                                     "subject": a.user("wally"), "state": "blocked"})
            assert out.status_code == 200, out.text
            assert out.json()["dropped"] == 0  # in flight: not recalled
        finally:
            hs.refuse_send = None
            gate.set()
        state = wait_until(lambda: (lambda s: s if s not in ("in_flight", "pending") else None)(pg.psql(row, db_url)),
                           timeout=30, what="the row done with")
        assert state == "dropped", state
        assert not any(e["type"] == "m.room.message" and e["content"].get("body") == "after the block"
                       for e in hs.events(mx_room))
        why = mx.admin("GET", f"/messages/{msg}/decision").json()
        assert [(x["verdict"], x["reason"]) for x in why["recipients"]] == [("deny", "user_blocked_sender")], why
        assert why["content_deleted"] is True
        # The try made is recorded, as any failed try.
        assert pg.psql("SELECT count(*) FROM delivery_attempts d JOIN outbox o ON o.id = d.outbox_id "
                       f"JOIN events e ON e.id = o.event_id WHERE e.public_id = '{msg}' AND NOT d.ok",
                       db_url) == "1"
    finally:
        srv.close()


def test_a_user_whose_row_the_sweep_forgets_while_she_is_bound_keeps_it(mx, hs, pg, db_url):
    """The bot takes a local user's row (identity_id: made if new, locked
    FOR KEY SHARE) and binds her Matrix id to it in one transaction, so
    that the retention sweep, which forgets a local row nothing refers to,
    passes over it (its lock: FOR UPDATE SKIP LOCKED) until the binding
    keeps it. Until the forty-sixth session the lock ended with identity_id's
    statement: a sweep deleting the row before the binding's statement left
    her an id of no row (the binding's failure unseen), and her management
    room was refused by its foreign key, the bot silent. Here the binding's
    statement is held (another transaction writing the same Matrix id) while
    the sweep runs."""
    # made now: the daemon's own sweep forgets only rows made 30 days ago
    pg.psql("INSERT INTO identities (uri, domain, localpart, is_local, network) VALUES "
            f"('{ALICE}', 'example.org', 'alice', true, 'matrix')", db_url)
    old = pg.psql(f"SELECT id FROM identities WHERE uri = '{ALICE}'", db_url)
    bot = "@_cw_bot:example.org"
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")
    held = HeldSession(db_url)
    sweep = HeldSession(db_url)
    try:
        held.run("BEGIN; WITH x AS (INSERT INTO identities (uri, domain, localpart, is_local, network) VALUES "
                 "('mimi://example.org/u/held', 'example.org', 'held', true, 'matrix') RETURNING id) "
                 f"INSERT INTO identity_bindings (identity_id, network, native_id) SELECT id, 'matrix', '{ALICE_MX}' "
                 "FROM x;")
        _, token = hs.create_user("alice")
        mgmt = hs.as_user(token).create_dm(bot)
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND query LIKE '%INSERT INTO identity_bindings%'", db_url) == "1",
                   what="the bot's binding waiting")
        sweep.run(f"BEGIN; WITH l AS (SELECT id FROM identities WHERE id = {old} FOR UPDATE SKIP LOCKED) "
                  "DELETE FROM identities WHERE id IN (SELECT id FROM l);")
        sweep.end()
        held.run("ROLLBACK;")
    finally:
        sweep.end()
        held.end()
    wait_until(lambda: any("Commands" in e["content"]["body"] for e in hs.events(mgmt)
                           if e["type"] == "m.room.message" and e["sender"] == bot), what="the bot's help")
    assert pg.psql(f"SELECT id FROM identities WHERE uri = '{ALICE}'", db_url) == old
    assert pg.psql(f"SELECT native_id FROM identity_bindings WHERE identity_id = {old}", db_url) == ALICE_MX
    assert pg.psql(f"SELECT identity_id FROM matrix_mgmt_rooms WHERE user_id = '{ALICE_MX}'", db_url) == old


def test_a_second_management_room_takes_over_and_the_first_says_so(mx, hs, pg, db_url):
    """A user who opens a second room with the bot gets her commands answered
    there; the first one is not left as a room where commands go unanswered:
    the bot says where it went, and leaves it."""
    bot = "@_cw_bot:example.org"
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)

    def notices(room):
        return [e["content"]["body"] for e in hs.events(room) if e["type"] == "m.room.message" and e["sender"] == bot]
    # The daemon registers its bot at start (a real homeserver has it from
    # the registration file already): an invitation before that is refused.
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")
    first = alice.create_dm(bot)
    wait_until(lambda: any("Commands" in n for n in notices(first)), what="the bot's help")
    second = alice.create_room(preset="private_chat", is_direct=True, invite=[bot])
    wait_until(lambda: any("Commands" in n for n in notices(second)), what="the bot's help in the second room")
    assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == second
    wait_until(lambda: any("new room with me" in n for n in notices(first)), what="the move told in the first room")
    wait_until(lambda: hs.members(first).get(bot) == "leave", what="the bot leaving the first room")
    alice.send_text(second, "list")
    wait_until(lambda: len(notices(second)) >= 2, what="an answer in the second room")
    # She leaves the old room: the one she uses stays hers.
    alice.leave(first)
    time.sleep(0.5)
    assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == second
    assert hs.members(second).get(bot) == "join"


@pytest.mark.parametrize("new", ["plain", "encrypted"])
def test_the_bots_words_queued_in_a_management_room_she_moved_from_go_with_her(mx, hs, pg, db_url, new):
    """Two words of the bot's wait for alice in her management room (one of
    the room's notices, as a report's answer is, and one of the bot's own
    with its transaction id, as a command's answer the homeserver did not
    take at once), held back as a failed send holds them.  She opens a new
    room with the bot: the words go there with the move, due at once, and
    nothing of hers is said in the old room, where bob is now (invited by
    her once the bot moved).  Until the fifty-sixth session they stayed in
    the old room, words of a room that was no management room any more,
    and went out there unlooked at, to bob, before the "moved" word and the
    leave queued behind them.  A new room the bot gives up (encrypted) gives
    her old room back, and the words with it: said there, never in the
    encrypted room before the bot's leave."""
    bot = "@_cw_bot:example.org"
    alice, first, said_first = alice_and_the_bot(hs)
    hs.create_user("bob")
    pg.psql("INSERT INTO matrix_notices (room_id, body, next_at) VALUES ('%s', 'word 1', now() + interval '1 hour'); "
            "INSERT INTO matrix_notices (room_id, body, sender, txn_id, next_at) "
            "VALUES ('%s', 'word 2', '%s', 'test-word-2', now() + interval '1 hour')" % (first, first, bot), db_url)
    words = "SELECT room_id FROM matrix_notices WHERE body LIKE 'word %' AND done_at IS NULL GROUP BY room_id"

    def said(room):
        return [e["content"]["body"] for e in hs.events(room) if e["type"] == "m.room.message" and e["sender"] == bot]
    if new == "encrypted":
        second = alice.create_dm(bot, initial_state=[{"type": "m.room.encryption",
                                                      "content": {"algorithm": "m.megolm.v1.aes-sha2"}}])
        wait_until(lambda: hs.members(second).get(bot) == "leave", what="the bot leaving the encrypted room")
        assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == first
        # back with the room (due at once as the move made them, or later)
        pg.psql("UPDATE matrix_notices SET next_at = now() WHERE body LIKE 'word %' AND done_at IS NULL; "
                "NOTIFY causeway_matrix_bot", db_url)
        wait_until(lambda: "word 2" in said_first(), what="the words said in her room")
        # marked done once the homeserver took them: a moment after
        wait_until(lambda: pg.psql(words, db_url) == "", what="the words marked said")
        assert [w for w in said_first() if w.startswith("word ")] == ["word 1", "word 2"], said_first()
        assert not [w for w in said(second) if w.startswith("word ")], said(second)
        assert hs.members(first).get(bot) == "join"
        return
    second = alice.create_room(preset="private_chat", is_direct=True, invite=[bot])
    wait_until(lambda: pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == second, what="the move")
    wait_until(lambda: any("Commands" in w for w in said(second)), what="the bot's help in the new room")
    alice.invite(first, "@bob:example.org")
    # whatever held them back: due now, wherever they are
    pg.psql("UPDATE matrix_notices SET next_at = now() WHERE body LIKE 'word %' AND done_at IS NULL; "
            "NOTIFY causeway_matrix_bot", db_url)
    wait_until(lambda: hs.members(first).get(bot) == "leave", timeout=30, what="the bot leaving the old room")
    time.sleep(1)
    assert not [w for w in said_first() if w.startswith("word ")], said_first()
    assert "new room with me" in said_first()[-1], said_first()
    wait_until(lambda: "word 2" in said(second), what="the words said in her new room")
    assert [w for w in said(second) if w.startswith("word ")] == ["word 1", "word 2"], said(second)
    wait_until(lambda: pg.psql(words, db_url) == "", what="the words marked said")


def test_a_command_in_a_transaction_sent_again_runs_once(mx, hs, gk, pg, db_url):
    """The homeserver does not get the answer to the transaction that
    carried alice's command (a dropped connection), and sends the same
    txnId again (each event's age changed, as a retry has it): the command
    does not run a second time. Until the eighteenth session the retry put
    the command back into the bot's inbox, whose row had gone once
    handled: a second report, a second answer."""
    alice, mgmt, notices = alice_and_the_bot(hs)
    lost = []

    def lose_answer(txn):
        # The first answer to the command's transaction is lost once the
        # bot has run the command (the row it had is gone by then).
        if txn["tries"] == 1 and any(e["type"] == "m.room.message" and e["sender"] == ALICE_MX and
                                     e["content"].get("body", "").startswith("report ") for e in txn["events"]):
            wait_until(lambda: any(n.startswith("Reported") for n in notices()), what="the report's answer")
            lost.append(txn["txn_id"])
            return True
        return False
    hs.lose_answer = lose_answer
    alice.send_text(mgmt, "report mimi://wa.example/u/wally spam")
    wait_until(lambda: lost and any(t["txn_id"] == lost[0] and t["done"] for t in hs.transactions),
               what="the transaction taken on its second try")
    hs.lose_answer = None
    # The bot works its inbox in order: once it answered a later command,
    # a second run of the first would have happened.
    alice.send_text(mgmt, "help")
    wait_until(lambda: sum("Commands" in n for n in notices()) == 2, what="the answer to help")
    assert sum(n.startswith("Reported") for n in notices()) == 1, notices()
    assert pg.psql("SELECT count(*) FROM reports", db_url) == "1"


@pytest.mark.parametrize("lost", ["report", "commit"])
def test_a_report_whose_answer_was_lost_is_stored_once_and_answered(make_daemon, db_url, hs, pg, lost):
    """The database ran alice's report, or the commit that keeps it, and
    its answer was lost with the connection (a network cut): there is one
    report and alice is told it was reported.  The report, the command's
    handled mark and the answer (a notice) are kept together or not at
    all: the command runs again after the reconnect only when none was
    kept.  Until the twenty-third session the bot told alice the report
    could not be stored, then ran the command again and stored a second."""
    with PgProxy(db_url) as px:
        mx = start_mx(make_daemon, px.url, hs)
        a, srv = add_gk(mx)
        try:
            wally = a.user("wally")
            a.create_room([wally, ALICE])
            alice, mgmt, said = alice_and_the_bot(hs)
            stored = lambda t: "INSERT INTO reports" in t  # noqa: E731
            if lost == "report":
                px.cut_statement(stored)
            else:
                px.cut_commit_matching(stored)
            n0 = len(said())
            alice.send_text(mgmt, f"report {wally} spam")
            wait_until(lambda: px.cuts == 1, timeout=20, what="the report's answer lost")
            wait_until(lambda: any(n.startswith("Reported") for n in said()[n0:]), timeout=20,
                       what="the report's answer")
            # The bot works its inbox in order: once it answered a later
            # command, a second run of the report would have happened.
            alice.send_text(mgmt, "help")
            wait_until(lambda: any("Commands" in n for n in said()[n0:]), timeout=20, what="the answer to help")
            assert [n for n in said()[n0:] if "Commands" not in n] == [REPORTED]
            assert pg.psql("SELECT count(*) FROM reports", db_url) == "1"
        finally:
            srv.close()


def test_bot_lines_users_can_repeat_are_logged_at_most_ten_a_second(mx, hs):
    """What the bot logs of a user's membership events (here: its join
    refused, as when the user takes the invitation back first) is one line
    per event, which any user of the homeserver can send in a loop: at most
    ten are written a second, the others counted (`suppressed`) in the next
    one or on a line of their own once the second has passed (since the
    thirtieth session; before, one line each). Every invitation is still
    handled: the bot joins none."""
    bot = "@_cw_bot:example.org"
    _, token = hs.create_user("alice")
    alice = hs.as_user(token)
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")  # else an invitation of it is 404
    hs.refuse = lambda method, path, user: 403 if user == bot and path.endswith("/join") else False
    flood = 40
    hs.stop_pushing()  # the invitations reach the bot together, as a quick client's would
    rooms = [alice.create_room(preset="private_chat", is_direct=True, invite=[bot]) for _ in range(flood)]
    hs.resume_pushing()

    def refused():
        return [r for r in mx.records if r.get("msg") == "the bot cannot join"]

    def written():
        return [r for r in refused() if "room" in r]
    told = lambda: sum(int(r.get("suppressed", "0")) for r in refused())  # noqa: E731
    wait_until(lambda: len(written()) + told() == flood, timeout=20, what="every refused join written or counted")
    per_second = collections.Counter(r["ts"][:19] for r in written())
    assert max(per_second.values()) <= 10 and told() > 0, (per_second, told())
    assert {r["room"] for r in written()} <= set(rooms) and all(r["level"] == "warn" for r in refused())
    assert not any(hs.members(r).get(bot) == "join" for r in rooms)


def test_reports_to_the_bot_set_the_automatic_limit(mx, hs, gk, pg, db_url):
    """Reports against a remote user by policy.report_limit_threshold (3)
    reporters set the automatic limit however they arrive: `report`
    commands to the bot by alice, bob and carol make the rule POST
    /admin/v1/reports makes, each audited as a report.create by its
    reporter.  Alice's three reports alone make none: until the
    twenty-second session the threshold counted reports, and one user
    could have anyone limited.  Until the twenty-first session only the
    admin API's reports counted: the bot's were stored and never limited
    anyone."""
    a, _ = gk
    wally = a.user("wally")
    room = a.create_room([wally, ALICE]).json()["id"]

    def report(client, mgmt, notices, text):
        before = sum(n.startswith("Reported") for n in notices())
        client.send_text(mgmt, f"report {wally} {text}")
        wait_until(lambda: sum(n.startswith("Reported") for n in notices()) == before + 1,
                   what="the report's answer")
    alice_bot = alice_and_the_bot(hs)
    for i in range(3):
        report(*alice_bot, f"spam {i}")
    assert pg.psql("SELECT count(*) FROM rules", db_url) == "0"
    reporters = [ALICE] * 3
    for name in ("bob", "carol"):
        report(*alice_and_the_bot(hs, name), "spam")
        reporters.append(f"mimi://example.org/u/{name}")
    assert pg.psql("SELECT string_agg(reporter_kind || ' ' || reporter || ' ' || subject_uri, ',' ORDER BY id) "
                   "FROM reports", db_url) == ",".join(f"local_user {r} {wally}" for r in reporters)
    assert pg.psql("SELECT scope || ' ' || pattern || ' ' || created_by || ' ' || (expires_at > now())::text "
                   "FROM rules", db_url) == f"user {wally} system:reports true"
    assert pg.psql("SELECT string_agg(actor || ' ' || subject || ' ' || (details->>'reports_in_window') || ' ' || "
                   "(details->>'reporters_in_window') || ' ' || (details->>'limit_rule_id' IS NOT NULL), ',' "
                   "ORDER BY id) FROM audit_log WHERE action = 'report.create'", db_url) == \
        ",".join(f"user:{r} {wally} {n} {k} {str(n == 5).lower()}"
                 for r, n, k in zip(reporters, (1, 2, 3, 4, 5), (1, 1, 1, 2, 3)))
    # In force in the daemon (every process told, not at its next reload).
    wait_until(lambda: a.send(room, a.user("wally"), "more").status_code == 429, what="the automatic limit")


def block_events(pg, db_url):
    return int(pg.psql("SELECT count(*) FROM events WHERE type = 'block'", db_url))


def test_a_users_commands_to_the_bot_are_limited(mx, hs, gk, pg, db_url):
    """policy.user_updates_per_minute (here 4) limits the bot's commands as
    the XMPP component's: a local user's accepts and blocks, opt-ins and
    opt-outs and reports share one bucket per user; past it a command
    changes nothing and sends the peer nothing, and one notice (at most one
    a minute, however many commands are refused) says to wait. Each block
    and its end is an event to the peer, past the outbound limits, and a
    reload in every process: until the thirtieth session a user toggling
    block and accept at the bot set that pace."""
    a, _ = gk
    wally = a.user("wally")
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 4}).ok
    room = a.create_room([wally, ALICE]).json()["id"]  # a room shared: each block and unblock is an event to gk
    alice, mgmt, notices = alice_and_the_bot(hs)
    delivered_to_her(mx, a, pg, db_url, room, ALICE)  # a block travels only where the peer knows her
    for verb in ("block", "accept", "block", "accept"):
        before = len(notices())
        alice.send_text(mgmt, f"{verb} {wally}")
        wait_until(lambda: len(notices()) == before + 1, what=verb)
        assert notices()[-1].startswith(("Blocked " if verb == "block" else "Accepted ") + wally), notices()[-1]
    assert block_events(pg, db_url) == 4  # block, unblock, block, unblock
    before = len(notices())
    for text in ["block " + wally, "opt-out gk", "opt-in gk", f"report {wally} spam"] * 3:
        alice.send_text(mgmt, text)
    alice.send_text(mgmt, "list")  # no change: not limited by this bucket (its commands bucket has room), answered last
    wait_until(lambda: any("allowed: " + wally in n for n in notices()[before:]), what="the list")
    said = notices()[before:]
    assert len(said) == 2 and "too many changes" in said[0] and "Try again in a minute" in said[0], said
    assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == wally + " allowed"
    assert block_events(pg, db_url) == 4
    assert pg.psql("SELECT count(*) FROM user_optin", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM reports", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM audit_log WHERE actor LIKE 'user:%'", db_url) == "4"
    # bob has his own bucket
    bob, bob_mgmt, bob_said = alice_and_the_bot(hs, "bob")
    bob.send_text(bob_mgmt, f"block {wally}")
    wait_until(lambda: any(n.startswith("Blocked " + wally) for n in bob_said()), what="bob's block")



def test_every_command_to_the_bot_is_limited_and_the_limit_told_once(mx, hs, gk, pg, db_url):
    """Every command takes a token of the user's commands bucket
    (policy.user_updates_per_minute + 30 a minute, here 31), list, help
    and words the bot does not understand included; past it a command is
    neither run nor answered, and one notice (at most one a minute) says
    to slow down. Until the fifty-second session only changes were
    limited: each list or unknown word was a notice (and a list a query),
    as fast as she sent them."""
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    before = len(said())
    start = time.monotonic()
    for i in range(60):
        alice.send_text(mgmt, "list" if i % 2 else f"what now {i}")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               what="every command handled")
    elapsed = time.monotonic() - start
    time.sleep(1)  # any notice still on its way
    answers = said()[before:]
    slow = [n for n in answers if n.startswith("Slow down")]
    assert len(slow) == 1, answers
    assert "not say so again for a minute" in slow[0], slow[0]
    # 30 at once (her invitation of the bot took one), then one every 60/31 s at most
    assert 30 <= len(answers) - 1 <= 30 + elapsed * 31 / 60 + 1, (len(answers), elapsed)
    assert answers.index(slow[0]) >= 30, answers
    # bob has his own bucket
    bob, bob_mgmt, bob_said = alice_and_the_bot(hs, "bob")
    assert bot_answer(bob_said, lambda: bob.send_text(bob_mgmt, "list")).startswith("Nothing yet")


def test_a_change_refused_by_her_changes_limit_counts_as_a_command(mx, hs, gk, pg, db_url):
    """A change her changes' limit refuses (here 1 a minute) keeps the
    token of her commands bucket it took (here 31 a minute): it was read,
    its party looked up, and the first such refusal answered, which is
    what that bucket bounds; it takes none of her changes' bucket. So
    fifty blocks sent at once are one change, one "too many changes"
    notice, silence, and once her commands are spent one "Slow down". Were
    the token given back, a user past her changes' limit could have the
    bot look up a party for every message she sent, as fast as she sent
    them."""
    a, _ = gk
    wally = a.user("wally")
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, mgmt, said = alice_and_the_bot(hs)  # one command token
    before = len(said())
    for _ in range(50):
        alice.send_text(mgmt, f"block {wally}")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               timeout=30, what="every command handled")
    time.sleep(1)  # any notice still on its way
    answers = said()[before:]
    assert answers[0].startswith("Blocked " + wally), answers
    assert len([n for n in answers if "too many changes" in n]) == 1, answers
    assert len([n for n in answers if n.startswith("Slow down")]) == 1, answers
    assert len(answers) == 3, answers
    assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == wally + " blocked"
    assert pg.psql("SELECT count(*) FROM audit_log WHERE actor LIKE 'user:%'", db_url) == "1"


def test_invitations_of_the_bot_are_limited_as_commands(mx, hs, pg, db_url):
    """Each invitation of the bot is answered (its help in the new room, a
    "moved" notice in the one she had, which it leaves): it takes a token
    of her commands bucket (here 31 a minute), and past it is declined,
    nothing said. Until the fifty-second session a user opening room after
    room with the bot (or kicking it and inviting it again) had a join, a
    help and a notice for each, uncounted."""
    bot = "@_cw_bot:example.org"
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, first, _ = alice_and_the_bot(hs)  # one token
    start = time.monotonic()
    rooms = [alice.create_dm(bot) for _ in range(40)]
    # (the inbox is empty too before the homeserver has pushed the last
    # invitations: in the fifty-third session, on a loaded machine, the
    # look came before them and 4 rooms were neither answered nor declined)
    wait_until(lambda: not any(hs.members(r).get(bot) == "invite" for r in rooms), timeout=60,
               what="every invitation joined or declined")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               timeout=60, what="every invitation handled")
    elapsed = time.monotonic() - start
    time.sleep(1)  # any notice still on its way

    def bot_said(room):
        return [e["content"]["body"] for e in hs.events(room) if e["type"] == "m.room.message"
                and e["sender"] == bot]

    helps = sum(1 for r in rooms if any("Commands" in w for w in bot_said(r)))
    declined = [r for r in rooms if hs.members(r).get(bot) == "leave" and not bot_said(r)]
    # 30 tokens left at once, then one every 60/31 s at most
    assert 30 <= helps <= 30 + elapsed * 31 / 60 + 1, (helps, elapsed)
    assert len(declined) == 40 - helps, (len(declined), helps)
    # the room that took the management room last is hers, and answers
    last = pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url)
    assert last in rooms and last not in declined
    assert not any(hs.members(r).get(bot) == "join" for r in rooms + [first] if r != last)


def test_an_invitation_of_the_bot_tried_again_takes_one_token(mx, hs, pg, db_url):
    """Each of alice's 25 invitations of the bot is tried again once (the
    homeserver did not take the bot's first join, a 503): a try again of
    the same invitation takes no token of her commands bucket (31 a
    minute), so the 25 cost 25 of the 30 she has left and each is
    answered. Until the fifty-third session every try took one: 50
    tokens, and the tries again past her 30th were declined (the bot left,
    nothing said) though she had invited it only 25 times."""
    bot = "@_cw_bot:example.org"
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, first, _ = alice_and_the_bot(hs)  # one token
    refused = set()

    def refuse(method, path, user):
        if user == bot and path.endswith("/join") and path not in refused:
            refused.add(path)
            return True
        return False
    hs.refuse = refuse
    rooms = [alice.create_dm(bot) for _ in range(25)]
    wait_until(lambda: len(refused) == 25, timeout=60, what="every first join refused")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               timeout=60, what="every invitation handled")
    hs.refuse = None
    time.sleep(1)  # any notice still on its way

    def bot_said(room):
        return [e["content"]["body"] for e in hs.events(room) if e["type"] == "m.room.message"
                and e["sender"] == bot]
    assert len(refused) == 25, len(refused)
    helps = [r for r in rooms if any("Commands" in w for w in bot_said(r))]
    assert len(helps) == 25, [(hs.members(r).get(bot), bot_said(r)) for r in rooms if r not in helps]
    assert "past the user's commands limit" not in mx.log()
    assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == rooms[-1]


def test_an_invitation_of_the_bot_held_for_the_as_token_takes_one_token(mx, hs, pg, db_url):
    """Alice's commands bucket (31 a minute) is emptied, and has one token
    again when she invites the bot to a new room, whose join the homeserver
    refuses 401 M_UNKNOWN_TOKEN ten times (the as_token refused: the bot's
    work waits for it, and runs again once the token is taken, some second
    later each time): the runs again of the same invitation take no token,
    so it is answered. Until the fifty-fourth session a row stopped by the
    as_token's refusal was not marked tried (only a try again backed off
    was), and each run again took a token as a new invitation would: the
    eleven runs needed eleven tokens in some twelve seconds, and the
    invitation was declined, the bot left, nothing said, though she had
    invited it once."""
    bot = "@_cw_bot:example.org"
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    for i in range(40):
        alice.send_text(mgmt, f"what now {i}")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               timeout=30, what="every command handled")
    wait_until(lambda: any(n.startswith("Slow down") for n in said()), what="the bucket emptied")
    time.sleep(2)  # a token back (31 a minute), and at most a second one
    refused = []

    def refuse(method, path, user):
        if user == bot and path.endswith("/join") and mgmt not in urllib.parse.unquote(path) and len(refused) < 10:
            refused.append(path)
            return 401
        return False
    hs.refuse = refuse
    try:
        room = alice.create_dm(bot)
        wait_until(lambda: len(refused) == 10 or hs.members(room).get(bot) == "leave", timeout=60,
                   what="the join refused ten times, or the invitation declined")
        wait_until(lambda: hs.members(room).get(bot) in ("join", "leave"), timeout=30,
                   what="the invitation joined or declined")
    finally:
        hs.refuse = None
    assert "past the user's commands limit" not in mx.log()
    assert hs.members(room).get(bot) == "join", (len(refused), hs.members(room))
    bot_said = lambda: [e["content"]["body"] for e in hs.events(room)  # noqa: E731
                        if e["type"] == "m.room.message" and e["sender"] == bot]
    wait_until(lambda: any("Commands" in t for t in bot_said()), what="the bot's help")
    assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == room


def test_what_the_bot_quotes_of_a_command_is_shown_safe(mx, hs, gk, pg, db_url):
    """An answer that quotes what the user typed (here "I know no network
    ...") writes each control character, bidirectional control or mark
    as U+FFFD, and at most 100 characters of it (a cut one ends with an
    ellipsis): until the fifty-second session it quoted her words as typed,
    a right-to-left override turning the bot's own words round."""
    alice, mgmt, said = alice_and_the_bot(hs)

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    assert answer_to("opt-in ev\u202eil\u2066x\u200fy\u009bz") == \
        "I know no network ev\ufffdil\ufffdx\ufffdy\ufffdz. The networks here: peer:gk"
    text = answer_to("opt-in " + "n" * 150)
    assert text == "I know no network " + "n" * 100 + "\u2026. The networks here: peer:gk", text
    assert pg.psql("SELECT count(*) FROM user_optin", db_url) == "0"


def test_a_bot_command_that_failed_in_the_database_does_not_count_against_the_limit(mx, hs, gk, pg, db_url):
    """policy.user_updates_per_minute (here 2): a command whose statements
    failed (here a column its transaction writes is gone) changed nothing
    and is answered so; its token is given back, as the XMPP component's
    commands give theirs, and the user who tries again once the database
    answers is not told to wait a minute. Until the forty-sixth session
    such a failure kept its token: three of them and her real change was
    refused as too many."""
    a, _ = gk
    wally = a.user("wally")
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 2}).ok
    alice, mgmt, notices = alice_and_the_bot(hs)
    pg.psql("ALTER TABLE audit_log RENAME COLUMN actor TO actor_gone", db_url)
    try:
        for verb in ("block", "accept", "block"):
            before = len(notices())
            alice.send_text(mgmt, f"{verb} {wally}")
            wait_until(lambda: len(notices()) == before + 1, what=verb)
            assert notices()[-1] == "That did not work; try again in a moment.", notices()[-1]
    finally:
        pg.psql("ALTER TABLE audit_log RENAME COLUMN actor_gone TO actor", db_url)
    for verb in ("block", "accept"):
        before = len(notices())
        alice.send_text(mgmt, f"{verb} {wally}")
        wait_until(lambda: len(notices()) == before + 1, what=verb)
        assert notices()[-1].startswith(("Blocked " if verb == "block" else "Accepted ") + wally), notices()[-1]
    # the two changes spent the bucket: the third is refused
    before = len(notices())
    alice.send_text(mgmt, f"block {wally}")
    wait_until(lambda: len(notices()) == before + 1, what="the refusal")
    assert "too many changes" in notices()[-1], notices()[-1]
    assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == wally + " allowed"


def test_an_opt_in_that_failed_in_the_database_is_told_so_and_stores_nothing(mx, hs, gk, pg, db_url):
    """opt-in and opt-out whose statements fail (here a column they read
    or write is gone) change nothing and say "That did not work", as
    accept and block do, and their token is given back. Until the
    forty-seventh session a failed look-up of the network answered "I know
    no network gk. No network is connected here yet." and a failed write
    "That network name is not valid.", both untrue, and the write and the
    policy's word of it were two statements, the first kept when the
    second failed."""
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, mgmt, notices = alice_and_the_bot(hs)
    for table, column in (("peers", "enabled"), ("user_optin", "opted_in")):
        pg.psql(f"ALTER TABLE {table} RENAME COLUMN {column} TO {column}_gone", db_url)
        try:
            for verb in ("opt-in", "opt-out"):
                before = len(notices())
                alice.send_text(mgmt, f"{verb} gk")
                wait_until(lambda: len(notices()) == before + 1, what=f"{verb} with {table}.{column} gone")
                assert notices()[-1] == "That did not work; try again in a moment.", notices()[-1]
        finally:
            pg.psql(f"ALTER TABLE {table} RENAME COLUMN {column}_gone TO {column}", db_url)
    assert pg.psql("SELECT count(*) FROM user_optin", db_url) == "0"
    before = len(notices())
    alice.send_text(mgmt, "opt-in gk")  # the bucket (1) was given back
    wait_until(lambda: len(notices()) == before + 1, what="the opt-in")
    assert notices()[-1] == "You are now opted in for peer:gk.", notices()[-1]
    assert pg.psql("SELECT network || ' ' || opted_in FROM user_optin", db_url) == "peer:gk true"


def test_a_command_whose_senders_identity_could_not_be_stored_is_answered(mx, hs, gk, pg, db_url):
    """The bot reads (and binds) the sender's identity first; when the
    database refuses that (here a trigger), the command is answered "That
    did not work; try again in a moment." and nothing is stored. Until the
    forty-seventh session it was marked done with no answer at all."""
    alice, mgmt, notices = alice_and_the_bot(hs)
    pg.psql("CREATE FUNCTION cw_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN RAISE EXCEPTION 'refused by the test'; END$$; "
            "CREATE TRIGGER cw_test_refuse BEFORE INSERT ON identity_bindings "
            "FOR EACH ROW EXECUTE FUNCTION cw_test_refuse()", db_url)
    try:
        for text in ("list", "opt-in gk"):
            before = len(notices())
            alice.send_text(mgmt, text)
            wait_until(lambda: len(notices()) == before + 1, what=f"the answer to {text}")
            assert notices()[-1] == "That did not work; try again in a moment.", notices()[-1]
    finally:
        pg.psql("DROP TRIGGER cw_test_refuse ON identity_bindings; DROP FUNCTION cw_test_refuse()", db_url)
    assert pg.psql("SELECT count(*) FROM user_optin", db_url) == "0"
    before = len(notices())
    alice.send_text(mgmt, "opt-in gk")
    wait_until(lambda: len(notices()) == before + 1, what="the opt-in")
    assert notices()[-1] == "You are now opted in for peer:gk.", notices()[-1]


def test_a_ghosts_id_that_makes_no_address_is_whom(mx, hs, gk, pg, db_url):
    """A Matrix id in the ghosts' namespace whose escaped name stands for
    bytes no address's local part may hold ('=40' an '@', a '/' itself)
    names nobody: accept, block and report answer "Whom?" and store
    nothing. Until the forty-seventh session "block @_cw_gk_wal=40ly:..."
    answered "Blocked mimi://wa.example/u/wal@ly" and stored that consent,
    which matched no sender."""
    alice, mgmt, notices = alice_and_the_bot(hs)
    for who in ("@_cw_gk_wal=40ly:example.org", "@_cw_gk_wal/ly:example.org"):
        for verb in ("block", "accept", "report"):
            before = len(notices())
            alice.send_text(mgmt, f"{verb} {who}")
            wait_until(lambda: len(notices()) == before + 1, what=f"{verb} {who}")
            assert notices()[-1].startswith("Whom?"), notices()[-1]
    assert pg.psql("SELECT count(*) FROM consents", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM reports", db_url) == "0"
    # a ghost's id that makes an address is taken, as ever
    alice.send_text(mgmt, "block @_cw_gk_wally:example.org")
    wait_until(lambda: notices()[-1].startswith("Blocked mimi://wa.example/u/wally"), what="the block")


def test_someone_let_into_a_management_room_later_does_not_read_its_requests(mx, hs, gk, pg, db_url):
    """A room made as clients make a direct one has its history "shared":
    whoever joins later reads all of it. The bot, taking the room, makes
    its history visible to members from their join on, so that bob, whom
    alice lets in after a consent request was shown there (the bot then
    leaves: the room is hers no more), does not read who wanted to reach
    her. Until the forty-seventh session he read every request and every
    answer shown before."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    assert a.send(room, a.user("wally"), "may I?").status_code == 202
    wait_until(lambda: any("wants to write to you" in n for n in said()), what="the request shown")
    _, bob_token = hs.create_user("bob")
    bob = hs.as_user(bob_token)
    alice.invite(mgmt, "@bob:example.org")
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot leaving")
    bob.join(mgmt)
    bodies = reads(bob, mgmt)
    assert not any("wally" in b for b in bodies), bodies
    assert any("wally" in b for b in reads(alice, mgmt))
    assert hs.state(mgmt, "m.room.history_visibility")["content"] == {"history_visibility": "joined"}


def reads(client, room):
    """The bodies of the messages of room that client may read (GET /messages), newest first."""
    read = client.call("GET", f"/_matrix/client/v3/rooms/{client.q(room)}/messages", query={"dir": "b", "limit": "100"})
    return [e["content"].get("body", "") for e in read["chunk"] if e["type"] == "m.room.message"]


def send_pill(client, room, verb, user_id, name, after="", link=None, mentions=None, reply_to=None):
    """What Element sends for "<verb> <pill>[ after]" once the user picked
    user_id (whose display name is name) from the autocompletion: the name
    in body, a link to the id in formatted_body, the id in m.mentions (the
    Client-Server API's "User and room mentions").  link: another href;
    mentions: other user ids (None: [user_id]; False: no m.mentions, as
    clients before it); reply_to: (event id, its sender) of the message
    answered, whose sender m.mentions then names too, with a reply
    fallback."""
    href = link or f"https://matrix.to/#/{user_id}"
    body = f"{verb} {name}{after}"
    html = f'{verb} <a href="{href}">{html_escape(name)}</a>{html_escape(after)}'
    content = {"msgtype": "m.text", "body": body, "format": "org.matrix.custom.html", "formatted_body": html}
    ids = [user_id] if mentions is None else mentions
    if reply_to is not None:
        eid, sender = reply_to
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": eid}}
        content["body"] = f"> <{sender}> a request\n\n{body}"
        content["formatted_body"] = (
            f'<mx-reply><blockquote><a href="https://matrix.to/#/{room}/{eid}">In reply to</a> '
            f'<a href="https://matrix.to/#/{sender}">{sender}</a><br>a request</blockquote></mx-reply>{html}')
        ids = ids + [sender] if ids is not False else ids
    if ids is not False:
        content["m.mentions"] = {"user_ids": ids}
    return client.send(room, "m.room.message", content)


def html_escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_a_bridged_user_picked_in_the_client_is_the_commands_party(mx, hs, gk, pg, db_url):
    """A user who picks the remote user in her client instead of typing his
    id sends a "pill": body says "accept Wally (gk)", his Matrix id is only
    in formatted_body's link and in m.mentions.  accept, block and report
    take the one user mentioned (the ghost: its remote user), in a reply to
    the bot's request too (whose sender the client mentions as well), from
    a percent-encoded matrix.to link or a matrix: URI of a client without
    m.mentions, and a report's reason is what follows the name.  Until the
    thirty-fourth session the bot read body only and answered "Whom?"."""
    a, _ = gk
    bot = "@_cw_bot:example.org"
    ghost = "@_cw_gk_wally:example.org"
    wally = a.user("wally")
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    room = a.create_room([wally, ALICE]).json()["id"]
    hello = a.send(room, wally, "hello").json()["id"]
    request = wait_until(lambda: next((e for e in hs.events(mgmt) if e["sender"] == bot and
                                       "wants to write to you" in e["content"].get("body", "")), None),
                         what="the consent request")

    def answered(start):
        wait_until(lambda: len(said()) > start, what="the answer")
        return said()[start]
    n = len(said())
    send_pill(alice, mgmt, "accept", ghost, "Wally (gk)", reply_to=(request["event_id"], bot))
    assert answered(n) == f"Accepted {wally}. 1 waiting message(s) released."
    # his message released by her accept, delivered to her (it goes with
    # her report) before her block, which would drop it while it waits to
    # be sent: until the sixty-third session this wait came after the
    # block, and a delivery slower than her two commands (once in a run of
    # the suite, stop 76's) left it dropped, never delivered
    wait_until(lambda: outbox_state_of(pg, db_url, hello) == "delivered", what="his message delivered")
    n = len(said())
    send_pill(alice, mgmt, "block", ghost, "Wally (gk)", link="https://matrix.to/#/%40_cw_gk_wally%3Aexample.org",
              mentions=False)
    assert answered(n) == f"Blocked {wally}. 0 waiting message(s) dropped."
    n = len(said())
    send_pill(alice, mgmt, "accept", ghost, "Wally (gk)", link="matrix:u/_cw_gk_wally:example.org?action=chat",
              mentions=False)
    assert answered(n).startswith(f"Accepted {wally}.")
    n = len(said())
    assert outbox_state_of(pg, db_url, hello) == "delivered"
    send_pill(alice, mgmt, "report", ghost, "Wally (gk)", after=" sends spam")
    assert answered(n) == "Reported to the operator, with 1 message(s) of theirs to you as evidence. Thank you."
    assert pg.psql("SELECT subject_uri || ' ' || comment || ' ' || array_to_string(evidence_public_ids, ',') "
                   "FROM reports", db_url) == f"{wally} sends spam {hello}"
    assert pg.psql("SELECT string_agg(action || ' ' || subject, ',' ORDER BY id) FROM audit_log "
                   "WHERE actor = 'user:@alice:example.org'", db_url) == \
        f"consent.allow {wally},consent.block {wally},consent.allow {wally}"


def test_a_command_mentioning_several_users_or_a_matrix_user_is_refused(mx, hs, gk, pg, db_url):
    """A command whose message mentions two users is refused, not carried
    out for one of them; a mention of a Matrix user (of this server or
    another, existing or not: the answer is the same) is not taken for a
    remote one, nor is the name in body read as an address.  The bot
    itself and the sender, whom a reply mentions, do not count: a reply
    to the bot that types the address is carried out."""
    a, _ = gk
    bot = "@_cw_bot:example.org"
    ghost = "@_cw_gk_wally:example.org"
    wally = a.user("wally")
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")

    def answer_to(send):
        return bot_answer(said, send)
    two = answer_to(lambda: send_pill(alice, mgmt, "block", ghost, "Wally (gk)", after=" and Ed (gk)",
                                      mentions=[ghost, "@_cw_gk_ed:example.org"]))
    assert two == "Whom? Your message mentions more than one person: name one at a time.", two
    for who in ("@bob:example.org", "@nobody:example.org", "@carol:elsewhere.example"):
        text = answer_to(lambda: send_pill(alice, mgmt, "block", who, "example.com"))
        assert text.startswith(f"{who} is not someone from another network"), text
    # (a report of a user of this server is taken since the thirty-eighth
    # session: test_a_report_of_a_user_of_this_service_is_taken)
    text = answer_to(lambda: send_pill(alice, mgmt, "report", "@carol:elsewhere.example", "carol", after=" spam"))
    assert text.startswith("@carol:elsewhere.example is not someone from another network nor a user of this "
                           "service"), text
    assert pg.psql("SELECT count(*) FROM consents", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM reports", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM audit_log WHERE actor LIKE 'user:%'", db_url) == "0"
    # A reply to the bot (mentioning it, and alice herself) with the address typed.
    eid = next(e["event_id"] for e in hs.events(mgmt) if e["sender"] == bot)
    text = answer_to(lambda: alice.send(mgmt, "m.room.message", {
        "msgtype": "m.text", "body": f"block {wally}", "m.mentions": {"user_ids": [bot, ALICE_MX]},
        "m.relates_to": {"m.in_reply_to": {"event_id": eid}}}))
    assert text.startswith(f"Blocked {wally}."), text



def test_the_bot_as_a_commands_party_is_told_and_a_pills_name_is_a_whole_word(mx, hs, gk, pg, db_url):
    """The bot's own id (in the ghosts' namespace with the default names),
    typed or picked as the party of accept, block or report, is answered
    as the bot ("... is me, this gateway's bot, not someone from another
    network ..."), storing nothing; until the fortieth session it was looked
    up as a ghost's and answered "Whom?". A pill's name is matched against
    the text typed as a whole word (followed by the end, a blank or a ':'):
    a name that is only the start of the word typed leaves all of the line
    the reason (until then "Wal" against "Wally spams" left "ly spams")."""
    a, _ = gk
    bot = "@_cw_bot:example.org"
    ghost = "@_cw_gk_wally:example.org"
    wally = a.user("wally")
    alice, mgmt, said = alice_and_the_bot(hs)
    for verb in ("accept", "block", "report"):
        for send in (lambda: alice.send_text(mgmt, f"{verb} {bot} now"),
                     lambda: send_pill(alice, mgmt, verb, bot, "Causeway", after=": please")):
            text = bot_answer(said, send)
            assert text.startswith(f"{bot} is me, this gateway's bot, not someone from another network: {verb} "
                                   "is for the people who reach you through the gateway"), text
    assert pg.psql("SELECT (SELECT count(*) FROM consents) || ' ' || (SELECT count(*) FROM reports) || ' ' || "
                   "(SELECT count(*) FROM audit_log WHERE actor LIKE 'user:%')", db_url) == "0 0 0"
    assert bot_answer(said, lambda: send_pill(alice, mgmt, "report", ghost, "Wal", after="ly spams")) == \
        REPORTED
    assert bot_answer(said, lambda: send_pill(alice, mgmt, "report", ghost, "Wally", after=": sends spam")) == \
        REPORTED
    assert pg.psql("SELECT string_agg(subject_uri || ' ' || comment, ',' ORDER BY id) FROM reports", db_url) == \
        f"{wally} Wally spams,{wally} sends spam"


def test_accept_or_block_of_a_local_user_or_domain_is_refused(make_daemon, db_url, hs, pg):
    """The policy asks a user's consents of remote senders only, and what
    this provider's users send one another passes no decision: an accept
    or block of one of them (a mimi:// address of one of its domains, a
    Matrix id of this server typed) or of its domain (server.domain, the
    Matrix server name, the XMPP domain) would be stored and match
    nothing, as in the admin API (400 since the thirty-fourth session).
    The bot refuses it, says why and what to use instead, and stores
    nothing; the answer is the same for an existing and an unknown user.
    Until the thirty-fourth session the address and the domains were
    "Accepted"/"Blocked" and stored, a Matrix id typed was "Whom?"."""
    start_mx(make_daemon, db_url, hs, xmpp={"domain": "chat.example.org"})
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    users = ("mimi://example.org/u/{}", "mimi://chat.example.org/u/{}", "@{}:example.org")
    for verb in ("accept", "block"):
        for shape in users:
            known, unknown = shape.format("bob"), shape.format("nobody")
            text = answer_to(f"{verb} {known}")
            assert text.startswith(f"{known} is not someone from another network"), text
            assert "client's ignore" in text, text
            # An unknown user gets the same answer, her name aside.
            assert answer_to(f"{verb} {unknown}") == text.replace(known, unknown)
        for domain in ("example.org", "chat.example.org"):
            text = answer_to(f"{verb} {domain}")
            assert text.startswith(f"{domain} is a domain of this service, not another network"), text
            assert "client's ignore" in text, text
    # A Matrix user of another server typed is no party either (as when mentioned).
    text = answer_to("block @carol:elsewhere.example")
    assert text.startswith("@carol:elsewhere.example is not someone from another network"), text
    text = answer_to("report @carol:elsewhere.example spam")
    assert text.startswith("@carol:elsewhere.example is not someone from another network nor a user of this "
                           "service"), text
    assert pg.psql("SELECT count(*) FROM consents", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM reports", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM audit_log WHERE actor LIKE 'user:%'", db_url) == "0"
    # A name no address's domain can be is no party (as POST /admin/v1/consents
    # refuses it; until the thirty-ninth session each was "Blocked" and stored).
    for bad in ("gk..example", "10.0.0.1", "gk-.example", "-gk.example"):
        assert answer_to(f"block {bad}").startswith("Whom?"), bad
    assert pg.psql("SELECT count(*) FROM consents", db_url) == "0"
    # A remote domain is refused for another reason here: no peer has it (since
    # the fortieth session; a peer's is taken, test_a_partys_domain_in_any_case_...).
    assert answer_to("block wa.example").startswith("wa.example is the domain of no network this gateway is "
                                                    "connected to")
    assert pg.psql("SELECT count(*) FROM consents", db_url) == "0"



def test_a_partys_domain_in_any_case_and_an_address_of_no_peer(mx, hs, gk, pg, db_url):
    """A domain, an address's or typed alone, is taken in any case and
    stored in lower case (DNS names are case-insensitive; a remote user's
    id keeps its case): until the fortieth session mimi://WA.Example/u/x
    and WA.Example were "Whom?". An address whose domain is neither this
    provider's nor a peer's names nobody who can reach the user: accept,
    block and report say so and store nothing (until then such a consent
    was "Accepted" and stored, matching no sender, and a report of it
    stored), as the XMPP component's commands do; so does a domain typed
    alone that is neither this provider's nor a peer's (until then it was
    "Blocked" and stored)."""
    alice, mgmt, said = alice_and_the_bot(hs)

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    assert answer_to("block mimi://WA.Example/u/Wally") == "Blocked mimi://wa.example/u/Wally. 0 waiting message(s) dropped."
    assert answer_to("accept MIMI://wa.EXAMPLE/u/zoe") == "Accepted mimi://wa.example/u/zoe. 0 waiting message(s) released."
    assert answer_to("block WA.Example") == "Blocked wa.example. 0 waiting message(s) dropped."
    text = answer_to("block mimi://Example.ORG/u/bob")
    assert text.startswith("mimi://example.org/u/bob is not someone from another network"), text
    assert answer_to("report mimi://WA.example/u/wally spam") == REPORTED
    for verb, done in (("accept", "stored"), ("block", "stored"), ("report", "reported")):
        assert answer_to(f"{verb} mimi://Nowhere.Example/u/x") == (
            "mimi://nowhere.example/u/x is nobody who can reach you here: nowhere.example is the domain of no "
            f"network this gateway is connected to. Nothing was {done}. Give an address on a connected "
            "network's domain (mimi://...) or a bridged user's Matrix id."), verb
    # So is a domain typed alone that is no peer's (a sender's domain is its
    # peer's, matched exactly): until the fortieth session "Blocked", stored.
    for verb in ("accept", "block"):
        assert answer_to(f"{verb} Nowhere.Example") == (
            "nowhere.example is the domain of no network this gateway is connected to: nobody from it can "
            "reach you here. Nothing was stored. Give a connected network's domain, an address on one "
            "(mimi://...) or a bridged user's Matrix id."), verb
    for domain in ("sub.wa.example", "example"):  # not the peer's, nor a domain at all
        assert answer_to(f"block {domain}").startswith(
            "sub.wa.example is the domain of no network" if "." in domain else "Whom?"), domain
    assert answer_to("report nowhere.example spam").startswith("Whom?")  # a report names a user
    assert pg.psql("SELECT string_agg(subject_kind || ' ' || subject || ' ' || state, ',' ORDER BY subject) "
                   "FROM consents", db_url) == \
        "user mimi://wa.example/u/Wally blocked,user mimi://wa.example/u/zoe allowed,domain wa.example blocked"
    assert pg.psql("SELECT string_agg(subject_uri, ',') FROM reports", db_url) == "mimi://wa.example/u/wally"


def test_accepting_a_domain_without_its_networks_opt_in_says_to_opt_in(mx, hs, gk, pg, db_url):
    """An accept of a whole domain lets its users write to the user only
    where she is opted in to its network (policy: user_not_opted_in; the
    unit case "an allowed domain does not"): the answer says so, naming
    the network's opt-in, when she has not opted in (and the default does
    not opt her in) or opted out; opted in (hers, or policy.optin_default),
    it says "Accepted" alone. Until the forty-third session it was
    "Accepted wa.example" alone, and the help said accept lets a whole
    domain write to her."""
    alice, mgmt, said = alice_and_the_bot(hs)

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    assert any("accept <who>              let someone write to you (or a whole domain, once you opt in to its "
               "network)" in n for n in said())
    assert answer_to("accept wa.example") == (
        "Accepted wa.example. 0 waiting message(s) released. You are not opted in to peer:gk, though: its users "
        "reach you only once you also send \"opt-in peer:gk\" (until then only those you accepted one by one, "
        "and the conversations you wrote in, do).")
    assert pg.psql("SELECT subject_kind || ' ' || subject || ' ' || state FROM consents", db_url) == \
        "domain wa.example allowed"
    assert answer_to("opt-out gk") == "You are now opted out for peer:gk."
    assert answer_to("accept WA.example") == (
        "Accepted wa.example. 0 waiting message(s) released. You opted out of peer:gk, though: nothing from it "
        "reaches you until you also send \"opt-in peer:gk\".")
    assert answer_to("opt-in peer:gk") == "You are now opted in for peer:gk."
    assert answer_to("accept wa.example") == "Accepted wa.example. 0 waiting message(s) released."
    # a user accepted alone is no opt-in matter (what she accepts one by one passes)
    assert answer_to("opt-out peer:gk") == "You are now opted out for peer:gk."
    assert answer_to("accept mimi://wa.example/u/zoe") == "Accepted mimi://wa.example/u/zoe. 0 waiting message(s) released."
    # policy.optin_default on: carol, with no opt-in of her own, is opted in
    a, _ = gk
    assert mx.admin("PATCH", "/settings", json={"policy.optin_default": True}).ok
    wait_until(lambda: a.call("POST", "/v1/consent/requests", {"requester": a.user("wally"),
                                                               "target": "mimi://example.org/u/fresh"})
               .status_code == 202 and pg.psql("SELECT count(*) FROM consent_requests", db_url) == "1",
               what="optin_default in force")
    carol, carols, carol_said = alice_and_the_bot(hs, "carol")
    assert bot_answer(carol_said, lambda: carol.send_text(carols, "accept wa.example")) == \
        "Accepted wa.example. 0 waiting message(s) released."
    # alice's own opt-out stays hers
    assert answer_to("accept wa.example").endswith("You opted out of peer:gk, though: nothing from it reaches you "
                                                   "until you also send \"opt-in peer:gk\".")



def test_an_accept_under_a_block_of_the_other_kind_says_the_block_stands(mx, hs, gk, pg, db_url):
    """A block wins over an allow of the other kind (policy: a block of the
    sender's domain before his consent; since the forty-fifth session his
    request is 'blocked'): an accept of a user whose domain she blocked
    says that block still stands and nothing of theirs reaches her until
    she lifts it, and an accept of a domain names her blocks of users of
    it. Until that session's review it said "Accepted" alone, the messages
    not released."""
    a, _ = gk
    wally, zoe = a.user("wally"), a.user("zoe")
    alice, mgmt, said = alice_and_the_bot(hs)

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    assert answer_to("opt-in peer:gk") == "You are now opted in for peer:gk."
    room = a.create_room([wally, ALICE]).json()["id"]
    assert a.send(room, wally, "may I?").status_code == 202
    wait_until(lambda: any("wants to write to you" in n for n in said()), what="the request shown")
    assert answer_to("block wa.example").startswith("Blocked wa.example.")
    assert answer_to(f"accept {wally}") == (
        f"Accepted {wally}. 0 waiting message(s) released. Your block of their whole domain wa.example still "
        "stands, though: nothing of theirs reaches you until you lift it.")
    assert pg.psql("SELECT string_agg(state, ',') FROM consent_requests", db_url) == "blocked"
    # a domain's accept: her blocks of its users stand
    assert answer_to(f"block {wally}").startswith(f"Blocked {wally}.")
    assert answer_to("accept wa.example") == (
        f"Accepted wa.example. 0 waiting message(s) released. Your block of {wally} still stands, though: "
        "nothing of theirs reaches you until you lift it.")
    assert answer_to(f"block {zoe}").startswith(f"Blocked {zoe}.")
    assert answer_to("accept wa.example") == (
        f"Accepted wa.example. 0 waiting message(s) released. Your blocks of {wally} and 1 other user(s) of "
        "wa.example still stand, though: nothing of theirs reaches you until you lift them.")
    # lifted: said alone
    assert answer_to(f"accept {wally}") == f"Accepted {wally}. 0 waiting message(s) released."
    assert answer_to(f"accept {zoe}") == f"Accepted {zoe}. 0 waiting message(s) released."
    assert answer_to("accept wa.example") == "Accepted wa.example. 0 waiting message(s) released."

def test_a_decision_repeated_through_the_bot_is_answered_and_not_audited_again(mx, hs, gk, pg, db_url):
    """An accept or a block the user has already (and no request of theirs
    left to decide) is answered as the change was, with no second
    consent.allow or consent.block record, no reload of any process, and
    the consent's source and updated_at kept, as the admin API answers a
    repeat (policy_consent_apply decides it for both).  Until the
    fifty-first session each repeat was audited and reloaded again."""
    a, _ = gk
    wally = a.user("wally")
    alice, mgmt, said = alice_and_the_bot(hs)
    audit = ("SELECT string_agg(action || ' ' || subject, ',' ORDER BY id) FROM audit_log "
             "WHERE actor = 'user:@alice:example.org'")
    stamp = "SELECT state || ' ' || source || ' ' || updated_at FROM consents"

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    for verb, state, action in (("block", "blocked", "consent.block"), ("accept", "allowed", "consent.allow")):
        first = answer_to(f"{verb} {wally}")
        assert first.startswith("Blocked " if verb == "block" else "Accepted "), first
        stamped, audited = pg.psql(stamp, db_url), pg.psql(audit, db_url)
        assert stamped.startswith(f"{state} user ") and audited.endswith(f"{action} {wally}"), (stamped, audited)
        before = reloads(mx, settle=True)
        assert answer_to(f"{verb} {wally}") == first
        time.sleep(0.5)
        assert (pg.psql(stamp, db_url), pg.psql(audit, db_url), reloads(mx)) == (stamped, audited, before), verb
    assert pg.psql(audit, db_url) == f"consent.block {wally},consent.allow {wally}"
    # The admin's decision given again by her is a repeat too (its source kept).
    assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user", "subject": wally,
                                               "state": "blocked"}).ok
    assert answer_to(f"block {wally}").startswith(f"Blocked {wally}.")
    assert pg.psql("SELECT state || ' ' || source FROM consents", db_url) == "blocked admin"
    assert pg.psql(audit, db_url) == f"consent.block {wally},consent.allow {wally}"


def test_a_failed_look_up_of_the_partys_peer_is_try_again_and_stores_nothing(mx, hs, gk, pg, db_url):
    """Whose a party is (a domain's peer, a ghost's) is read from the peers
    table; when that read fails, the command is not carried out: "try
    again", nothing stored, as when the decision's own store fails. Until
    the forty-first session a failed look-up of a domain took it for a
    peer's (an address of no peer's domain was then stored, the very
    consent the rule refuses), and of a ghost's answered "Whom?"."""
    alice, mgmt, said = alice_and_the_bot(hs)

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    pg.psql("ALTER TABLE peers RENAME COLUMN domain TO domain_gone", db_url)
    try:
        for text in ("block nowhere.example", "accept mimi://nowhere.example/u/x", "block mimi://wa.example/u/wally",
                     "report mimi://nowhere.example/u/x spam", "block @_cw_gk_wally:example.org"):
            assert answer_to(text) == "That did not work; try again in a moment.", text
    finally:
        pg.psql("ALTER TABLE peers RENAME COLUMN domain_gone TO domain", db_url)
    assert pg.psql("SELECT (SELECT count(*) FROM consents) || ' ' || (SELECT count(*) FROM reports) || ' ' || "
                   "(SELECT count(*) FROM audit_log WHERE actor LIKE 'user:%')", db_url) == "0 0 0"
    # The store back, the same commands are answered as ever.
    assert answer_to("block nowhere.example").startswith("nowhere.example is the domain of no network")
    assert answer_to("block @_cw_gk_wally:example.org") == \
        "Blocked mimi://wa.example/u/wally. 0 waiting message(s) dropped."


def test_an_opt_in_for_a_disabled_peer_says_it_is_switched_off(mx, hs, gk, pg, db_url):
    """The list of networks the bot offers after an unknown name is of the
    enabled peers; a disabled one is still a network (its rows wait for it,
    it may come back), so an opt-in for it is stored, and the answer says
    that nothing comes from it meanwhile, instead of the plain "You are now
    opted in" of an enabled one (until the thirty-fourth session nothing
    said so, and the user was left to think herself reachable). An opt-out
    is always taken."""
    alice, mgmt, said = alice_and_the_bot(hs)
    assert mx.admin("POST", "/peers/gk/disable").ok

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    assert answer_to("opt-in whatsapp") == "I know no network whatsapp. No network is connected here yet."
    assert answer_to("opt-in gk") == ("You are now opted in for peer:gk. That network is switched off for now: "
                                      "nothing comes from it until the operator turns it on again.")
    assert answer_to("opt-out peer:gk") == "You are now opted out for peer:gk."
    assert pg.psql("SELECT network || ' ' || opted_in FROM user_optin", db_url) == "peer:gk false"
    assert mx.admin("POST", "/peers/gk/enable").ok
    assert answer_to("opt-in gk") == "You are now opted in for peer:gk."


def test_a_command_in_any_case_and_white_space_of_any_kind(mx, hs, gk, pg, db_url):
    """A network is a peer's name, lower case by definition: `opt-in GK`
    is for gk (until the forty-second session "I know no network GK").
    The words of a command are separated, and trimmed, by white space of
    any kind: a no-break space (phones and some clients put one in), an
    ideographic or an em space, a tab (until then `opt-in`+U+00A0+`gk`
    was no command, and got the help). What is stored is what the plain
    command stores; a report's reason is kept without the white space
    around it, with what is within (zero-width characters: below)."""
    alice, mgmt, said = alice_and_the_bot(hs)

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))

    def optins():
        return pg.psql("SELECT string_agg(network || ' ' || opted_in, ',') FROM user_optin", db_url)
    assert answer_to("opt-in GK") == "You are now opted in for peer:gk."
    assert optins() == "peer:gk true"
    assert answer_to("OPT-OUT\u00a0PEER:Gk\u00a0") == "You are now opted out for peer:gk."
    assert optins() == "peer:gk false"
    assert answer_to("\u3000opt-in\tgk\u2003") == "You are now opted in for peer:gk."
    assert optins() == "peer:gk true"
    # A name no peer has, in any case, is still none: nothing stored.
    assert answer_to("opt-in\u00a0WhatsApp") == "I know no network whatsapp. The networks here: peer:gk"
    assert optins() == "peer:gk true"
    wally = "mimi://wa.example/u/wally"
    assert answer_to("block\u00a0mimi://WA.example/u/wally\u202f") == \
        f"Blocked {wally}. 0 waiting message(s) dropped."
    assert answer_to("report\u00a0" + wally + "\u00a0he\u00a0spams\u3000\t") == REPORTED
    assert pg.psql("SELECT string_agg(subject_kind || ' ' || subject || ' ' || state, ',') FROM consents", db_url) \
        == f"user {wally} blocked"
    assert pg.psql("SELECT subject_uri || ' [' || comment || ']' FROM reports", db_url) == \
        f"{wally} [he\u00a0spams]"



def test_a_commands_words_are_separated_by_zero_width_characters_too(mx, hs, gk, pg, db_url):
    """A zero-width character (a zero-width space a copied text brings, a
    BOM, a word joiner, a joiner) separates a command's words as white
    space does, and is left out around them: the command is what the user
    sees. Until the forty-third session it was part of a word: `accept`
    U+200B `@x:y` was the verb "accept\u200b@x:y" (the help), and `accept
    @x:y` U+200B named the party "@x:y\u200b"."""
    alice, mgmt, said = alice_and_the_bot(hs)

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    assert answer_to("opt-in\u200bgk") == "You are now opted in for peer:gk."
    assert pg.psql("SELECT string_agg(network || ' ' || opted_in, ',') FROM user_optin", db_url) == "peer:gk true"
    # the answer of the plain command (a Matrix user is no one of another
    # network), naming what the user sees
    plain = answer_to("accept @bob:elsewhere.example")
    assert plain.startswith("@bob:elsewhere.example is not someone from another network"), plain
    assert answer_to("accept\u200b@bob:elsewhere.example\u200b") == plain
    wally = "mimi://wa.example/u/wally"
    assert answer_to("\ufeffblock\u2060" + wally + "\u200d") == f"Blocked {wally}. 0 waiting message(s) dropped."
    assert answer_to("report\u200b" + wally + "\u200b\u200che\u200dspams\u200b") == \
        REPORTED
    assert pg.psql("SELECT string_agg(subject_kind || ' ' || subject || ' ' || state, ',') FROM consents", db_url) \
        == f"user {wally} blocked"
    # within the reason, kept
    assert pg.psql("SELECT subject_uri || ' [' || comment || ']' FROM reports", db_url) == \
        f"{wally} [he\u200dspams]"


def test_inviting_a_ghost_asks_the_appservice(mx, hs, gk):
    """The homeserver asks GET /users/{id} on an invite of an unknown ghost:
    a known remote user's ghost exists afterwards, an unknown one does not."""
    a, _ = gk
    a.create_room([a.user("wally"), ALICE])
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    room = alice.call("POST", "/_matrix/client/v3/createRoom", {})["room_id"]
    r = alice.request("POST", f"/_matrix/client/v3/rooms/{room}/invite", {"user_id": "@_cw_gk_wally:example.org"})
    assert r.status_code == 200, r.text
    assert hs.user_exists("@_cw_gk_wally:example.org")
    r = alice.request("POST", f"/_matrix/client/v3/rooms/{room}/invite", {"user_id": "@_cw_gk_nobody:example.org"})
    assert r.status_code in (403, 404) and not hs.user_exists("@_cw_gk_nobody:example.org")


def test_a_conversation_started_from_matrix(mx, hs, gk, pg, db_url):
    """Alice invites the ghost of a known remote user: the ghost joins, her
    message reaches the peer, and writing first is her consent to the reply
    (no consent request, nothing held), not an opt-in to the whole network:
    a stranger there is still refused (until the twenty-third session her
    message opted her in, and the stranger's became a message request)."""
    a, srv = gk
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])  # the peer introduced wally
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    ghost = "@_cw_gk_wally:example.org"
    room = alice.create_dm(ghost)
    wait_until(lambda: hs.members(room).get(ghost) == "join", what="the ghost joins")
    alice.send_text(room, "hi wally, it's alice")
    got = srv.wait_events(1)
    assert got[0]["sender"] == ALICE and got[0]["content"]["parts"][0]["body"] == "hi wally, it's alice"
    assert pg.psql("SELECT state || ' ' || source FROM consents", db_url) == "allowed outbound"
    # The bot invited into the conversation says where it takes commands
    # and goes: what alice writes here is for wally, not a command.
    bot = "@_cw_bot:example.org"
    alice.invite(room, bot)
    wait_until(lambda: hs.members(room).get(bot) == "leave", what="the bot leaving the conversation")
    assert any(e["sender"] == bot and e["content"]["body"].startswith("I take commands in a room of your own")
               for e in hs.events(room) if e["type"] == "m.room.message")
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"
    # The reply comes back into her room, at once.
    r = a.send(got[0]["room_id"], a.user("wally"), "hello alice")
    assert r.status_code == 202, r.text
    wait_until(lambda: any(e["sender"] == ghost and e["type"] == "m.room.message" and
                           e["content"]["body"] == "hello alice" for e in hs.events(room)), what="the reply")
    assert pg.psql("SELECT count(*) FROM consent_requests", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM user_optin", db_url) == "0"
    ed = a.create_room([a.user("ed"), ALICE]).json()["id"]
    r = a.send(ed, a.user("ed"), "hello alice, it's a stranger")
    assert r.status_code == 202, r.text
    why = mx.admin("GET", f"/messages/{r.json()['id']}/decision").json()
    assert why["recipients"][0]["reason"] == "user_not_opted_in", why
    assert pg.psql("SELECT count(*) FROM consent_requests", db_url) == "0"


def alice_invites_wally_unheard(hs, a):
    """alice opens a direct room with wally's ghost (whom the peer
    introduced) while the homeserver pushes nothing: whatever she writes
    now is surely written before the ghost is in.  (alice, room, ghost);
    the test resumes pushing."""
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    ghost = "@_cw_gk_wally:example.org"
    hs.stop_pushing()
    return alice, alice.create_dm(ghost), ghost


def test_what_was_written_before_the_ghost_joined_is_fetched(mx, hs, gk, pg, db_url):
    """A client that makes a direct room with its first message sends that
    message at once, while the ghost is only invited: the homeserver hands
    an appservice the events of rooms its users are in, so it never comes.
    The ghost, once in, reads the room back to its invitation and the
    messages go on as if pushed, in order, once each (before the
    thirteenth session it asked alice to write them again)."""
    a, srv = gk
    alice, room, ghost = alice_invites_wally_unheard(hs, a)
    first = alice.send_text(room, "are you there?")
    alice.send_text(room, "it's alice")
    alice.call("PUT", f"/_matrix/client/v3/rooms/{room}/send/m.reaction/r1",
               {"m.relates_to": {"rel_type": "m.annotation", "event_id": first, "key": "👋"}})
    # A sticker too (until the fifteenth session only messages, reactions
    # and redactions were read back: a sticker was lost without a word).
    alice.send(room, "m.sticker", {"body": "a cat", "url": "mxc://example.org/cat", "info": {}})
    hs.resume_pushing()
    got = srv.wait_events(4)
    assert [e["content"]["parts"][0]["body"] for e in got[:2]] == ["are you there?", "it's alice"]
    assert got[2]["type"] == "reaction" and got[2]["content"]["in_reply_to"] == got[0]["id"]
    assert got[3]["content"]["parts"][0]["body"] == "[sticker: a cat]"
    alice.send_text(room, "and now?")
    got = srv.wait_events(5)
    assert got[4]["content"]["parts"][0]["body"] == "and now?"
    time.sleep(1)
    assert len(srv.events) == 5 and srv.duplicates == 0
    assert pg.psql("SELECT count(*) FROM events WHERE origin_network = 'matrix'", db_url) == "5"  # none twice
    assert not any(e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(room))


@pytest.mark.parametrize("visibility", ["invited", "joined"])
def test_a_room_read_back_shows_the_ghost_what_its_history_visibility_lets_it(mx, hs, gk, pg, db_url, visibility):
    """The ghost reads back what the room's history visibility lets it read,
    as a homeserver filters /messages: from its invitation on in an
    `invited` room (all of what alice wrote after inviting it), from its
    join on in a `joined` one (what she wrote before is not found, as
    docs/matrix.md says; the read-back ends at the empty page). Until the
    thirty-sixth session the stand-in gave every event whatever the
    visibility, and neither case was tried against what a homeserver
    answers."""
    a, srv = gk
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    ghost = "@_cw_gk_wally:example.org"
    hs.stop_pushing()
    room = alice.create_dm(ghost, initial_state=[{"type": "m.room.history_visibility", "state_key": "",
                                                  "content": {"history_visibility": visibility}}])
    alice.send_text(room, "before the ghost joined")
    hs.resume_pushing()
    wait_until(lambda: hs.members(room).get(ghost) == "join", what="the ghost joins")
    wait_until(lambda: any(r["user"] == ghost and r["path"].endswith("/messages") for r in hs.requests),
               what="the read-back")
    alice.send_text(room, "and now?")
    want = (["before the ghost joined"] if visibility == "invited" else []) + ["and now?"]
    srv.wait_events(len(want))
    time.sleep(1)
    assert [e["content"]["parts"][0]["body"] for e in srv.events] == want


def test_a_number_past_64_bits_in_an_old_room_holds_nothing_back(mx, hs, gk, pg, db_url):
    """Room versions 1 to 5 take any JSON number (strict canonical JSON
    came with version 6; until the thirtieth session the stand-in refused
    such numbers in every version, and hid that one of them failed the
    whole transaction): a message carrying one in its content is carried,
    and so is the next."""
    a, srv = gk
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])
    ghost = "@_cw_gk_wally:example.org"
    room = alice.create_dm(ghost, room_version="5")
    wait_until(lambda: hs.members(room).get(ghost) == "join", what="the ghost joins")
    alice.send(room, "m.room.message", {"msgtype": "m.text", "body": "big", "n": 10 ** 25, "f": 1.5})
    alice.send_text(room, "after it")
    got = srv.wait_events(2)
    assert [e["content"]["parts"][0]["body"] for e in got] == ["big", "after it"]


def test_a_message_holding_a_nul_read_back_is_refused_alone(mx, hs, gk, pg, db_url):
    """The homeserver's answers are read as its transactions are: a page of
    the room read back (what alice wrote before the ghost joined) with a
    message holding a NUL was no JSON to jansson, the whole read back
    failed and nothing of it was stored (until the thirtieth session)."""
    a, srv = gk
    alice, room, ghost = alice_invites_wally_unheard(hs, a)
    alice.send_text(room, "before")
    alice.send_text(room, "with a \u0000 nul")
    alice.send_text(room, "after")
    hs.resume_pushing()
    got = srv.wait_events(2)
    assert [e["content"]["parts"][0]["body"] for e in got] == ["before", "after"]
    wait_until(lambda: any("U+0000" in n for n in ghost_notices(hs, room, ghost)), what="the NUL's notice")
    assert pg.psql("SELECT count(*) FROM events WHERE origin_network = 'matrix'", db_url) == "2"


def test_a_long_history_before_the_ghost_joined_is_read_back_page_by_page(mx, hs, gk, pg, db_url):
    """alice writes 130 messages while the ghost is only invited: the
    ghost reads the room back page by page to its invitation, and all of
    them go on, in order, once each (before, it read the last 50 and
    asked alice to write the other 80 again)."""
    a, srv = gk
    alice, room, ghost = alice_invites_wally_unheard(hs, a)
    texts = [f"line {i}" for i in range(130)]
    for text in texts:
        alice.send_text(room, text)
    hs.resume_pushing()
    got = srv.wait_events(130, timeout=60)
    assert [e["content"]["parts"][0]["body"] for e in got] == texts
    pages = [r for r in hs.requests if r["user"] == ghost and r["path"].endswith("/messages")]
    assert len(pages) == 2 and all(r["status"] == 200 for r in pages)
    time.sleep(1)
    assert len(srv.events) == 130 and srv.duplicates == 0
    assert not any(e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(room))


def test_what_is_written_while_the_room_is_read_back_comes_after_it(mx, hs, gk, pg, db_url):
    """alice writes once while the ghost is only invited, and again
    while the ghost reads the room back (the homeserver pushes that one at
    once, the room being bound by then): the pushed transaction waits for
    the read-back, and the peer gets the two in the order written. Before,
    the second was stored first."""
    a, srv = gk
    alice, room, ghost = alice_invites_wally_unheard(hs, a)
    alice.send_text(room, "first")
    held = []

    def meanwhile(method, path, user):
        if user == ghost and path.endswith("/messages") and not held:
            held.append(alice.send_text(room, "second"))
            time.sleep(1.5)  # the homeserver pushes "second" while this read is answered
        return False
    hs.refuse = meanwhile
    hs.resume_pushing()
    got = srv.wait_events(2)
    hs.refuse = None
    assert held and [e["content"]["parts"][0]["body"] for e in got] == ["first", "second"]
    alice.send_text(room, "third")
    got = srv.wait_events(3)
    assert got[2]["content"]["parts"][0]["body"] == "third"
    time.sleep(1)
    assert len(srv.events) == 3 and srv.duplicates == 0


def test_a_transaction_waiting_for_a_read_back_is_stored_when_the_daemon_stops(make_daemon, hs, pg, db_url):
    """The daemon is stopped while a pushed transaction waits for a slow
    read-back (longer than the drain may take): the transaction is taken
    at once rather than left suspended when the HTTP front stops, and the
    daemon stops cleanly."""
    mx = start_mx(make_daemon, db_url, hs, server={"drain_timeout_ms": "300"}, log={"level": "debug"})
    a, srv = add_gk(mx)
    alice, room, ghost = alice_invites_wally_unheard(hs, a)
    reading = threading.Event()

    def slow(method, path, user):
        if user == ghost and path.endswith("/messages") and not reading.is_set():
            alice.send_text(room, "while you read")
            reading.set()
            time.sleep(8)  # within the daemon's 10 s for a call
        return False
    hs.refuse = slow
    hs.resume_pushing()
    assert reading.wait(20)
    stored = "SELECT count(*) FROM events WHERE content::text LIKE '%while you read%'"
    # The homeserver's push of it reached the daemon, which holds it: not
    # "a second later", which a slow push can miss, and the daemon then
    # stopped before it came (session 35).
    txn = wait_until(lambda: next((t["txn_id"] for t in hs.transactions if any(
        e["content"].get("body") == "while you read" for e in t["events"])), None), what="its push")
    mx.wait_for(lambda r: r.get("msg") == "a transaction waits for a ghost's join" and r.get("txn") == txn,
                timeout=15)
    assert pg.psql(stored, db_url) == "0"  # it waits for the read-back
    started = time.time()
    assert mx.stop() == 0, mx.log()[-6000:]
    assert time.time() - started < 20
    hs.refuse = None
    srv.close()
    assert pg.psql(stored, db_url) == "1"


def test_what_could_not_be_fetched_is_asked_for_again(mx, hs, gk, pg, db_url):
    """When the fetched messages cannot be stored (here a trigger of the
    test's own database fails them), the ghost says how many did not reach
    it, and what alice writes again arrives."""
    a, srv = gk
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    ghost = "@_cw_gk_wally:example.org"
    pg.psql("CREATE FUNCTION t_boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.content::text LIKE '%are you there?%' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER t_boom BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION t_boom()", db_url)
    hs.stop_pushing()
    room = alice.create_dm(ghost)
    alice.send_text(room, "are you there?")
    hs.resume_pushing()
    wait_until(lambda: any(e["sender"] == ghost and e["type"] == "m.room.message" and
                           e["content"]["body"].startswith("1 message you wrote here while I was joining")
                           for e in hs.events(room)), timeout=40, what="the ghost asking for it again")
    pg.psql("DROP TRIGGER t_boom ON events", db_url)
    alice.send_text(room, "are you there? (again)")
    got = srv.wait_events(1)
    assert [e["content"]["parts"][0]["body"] for e in got] == ["are you there? (again)"]


def test_a_join_the_homeserver_did_not_take_is_tried_again(mx, hs, gk, pg, db_url):
    """The ghost's join on alice's invitation meets a homeserver that is
    restarting (503): the invitation is tried again (2 s, then 4 s later)
    and the conversation starts. Before, it was dropped, and alice's room
    waited for a ghost that never came. The bot's join into a management
    room likewise; a refusal (403) is an answer and is not tried again."""
    a, srv = gk
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])  # the peer introduced wally
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    ghost, bot = "@_cw_gk_wally:example.org", "@_cw_bot:example.org"
    refused = []

    def refuse(method, path, user):
        if user in (ghost, bot) and path.endswith("/join") and sum(1 for u in refused if u == user) < 2:
            refused.append(user)
            return True
        return False
    hs.refuse = refuse
    room = alice.create_dm(ghost)
    mgmt = alice.create_room(preset="private_chat", is_direct=True, invite=[bot])
    wait_until(lambda: hs.members(room).get(ghost) == "join", timeout=40, what="the ghost joins on its third try")
    wait_until(lambda: hs.members(mgmt).get(bot) == "join", timeout=40, what="the bot joins on its third try")
    assert refused.count(ghost) == 2 and refused.count(bot) == 2
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "1", what="the management room")
    # (the bot marks the invitation handled after it has said its help there)
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               what="the invitations handled")
    alice.send_text(room, "hi wally")
    got = srv.wait_events(1)
    assert got[0]["content"]["parts"][0]["body"] == "hi wally"
    # A refusal is the homeserver's answer: the invitation goes at once.
    joins = lambda: sum(1 for r in hs.requests if r["user"] == bot and r["path"].endswith("/join"))
    before = joins()
    hs.refuse = lambda method, path, user: 403 if user == bot and path.endswith("/join") else False
    other = alice.create_room(preset="private_chat", is_direct=True, invite=[bot])
    wait_until(lambda: joins() == before + 1, what="the bot's refused join")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               what="the inbox empty")
    time.sleep(3)
    assert joins() == before + 1 and hs.members(other).get(bot) == "invite"
    hs.refuse = None


def test_a_ghost_put_out_of_a_direct_room_closes_it(mx, hs, gk, pg, db_url):
    """alice kicks wally's ghost out of the direct room she made with it:
    the room is no longer the conversation (before, it stayed bound, and
    every message to her was refused there until it was a dead letter);
    wally's next message opens a new room."""
    a, srv = gk
    consent_alice(mx)
    conv = a.create_room([a.user("wally"), ALICE]).json()["id"]
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    ghost = "@_cw_gk_wally:example.org"
    a.send(conv, a.user("wally"), "hello")  # the ghost exists
    first = wait_until(lambda: next((rid for rid in hs.rooms() if hs.members(rid).get("@alice:example.org")
                                     == "invite"), None), what="the ghost's room")
    alice.join(first)
    mine = alice.create_room(preset="private_chat", is_direct=True, invite=[ghost])  # alice's, hers to kick in
    wait_until(lambda: hs.members(mine).get(ghost) == "join", what="the ghost joins alice's room")
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings WHERE network = 'matrix' "
                               f"AND native_id = '{mine}'", db_url) == "1", what="her room bound")
    r = alice.request("POST", f"/_matrix/client/v3/rooms/{mine}/kick", {"user_id": ghost})
    assert r.status_code == 200, r.text
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings WHERE network = 'matrix'", db_url) == "0",
               what="the room no longer bound")
    assert a.send(conv, a.user("wally"), "still there?").status_code == 202
    new = wait_until(lambda: next((rid for rid in hs.rooms() if rid not in (first, mine) and
                                   hs.members(rid).get("@alice:example.org") == "invite"), None), what="a new room")
    wait_until(lambda: any(e["type"] == "m.room.message" and e["content"]["body"] == "still there?"
                           for e in hs.events(new)), what="the message in it")


def test_a_ghost_put_out_by_a_user_of_another_server_closes_the_room(mx, hs, gk, pg, db_url):
    """A user of another server alice gave the power to kicks (or bans)
    wally's ghost out of her direct room: the room is no longer the
    conversation, as when alice does it. Until the thirty-ninth session
    only member events sent by this server's users were looked at: the
    room stayed bound, and every message to alice was refused there until
    it was a dead letter."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi")
    srv.wait_events(1)
    ev = {"event_id": "$ghost-kicked", "room_id": room, "sender": "@mod:evil.example", "type": "m.room.member",
          "state_key": ghost, "origin_server_ts": int(time.time() * 1000), "content": {"membership": "ban"},
          "unsigned": {"prev_content": {"membership": "join"}}}
    assert as_put(mx, "ghost-kicked", {"events": [ev]}).status_code == 200
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings WHERE network = 'matrix'", db_url) == "0",
               what="the room no longer bound")


@pytest.mark.parametrize("who", ["@bob:example.org", "@eve:evil.example"])
def test_someone_joining_a_bridged_room_uninvited_is_put_out(mx, hs, gk, pg, db_url, who):
    """A bridged room is one user's view (what the policy let through for
    her), so nobody else is in it: someone who joins alice's direct room
    without an invitation (she made it public, or a space's members may
    join it), of this server or another, is put out by the ghost, with the
    reason said in the room, as an invitation is taken back. Until the
    thirty-ninth session only invitations were looked at, and whoever
    joined read the conversation."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi")
    srv.wait_events(1)
    alice.state(room, "m.room.join_rules", {"join_rule": "public"})
    if who.endswith(":example.org"):
        hs.as_user(hs.create_user("bob")[1]).join(room)
    else:  # as federation would bring her join (the stand-in has none)
        hs.remote_user(who)
        with hs._lock:
            hs._membership(hs._room(room), who, who, "join")
    wait_until(lambda: any(e["type"] == "m.room.member" and e.get("state_key") == who and e["sender"] == ghost
                           and e["content"]["membership"] == "leave" for e in hs.events(room)),
               what="the joiner put out")
    assert pg.psql("SELECT count(*) FROM room_bindings WHERE network = 'matrix'", db_url) == "1"
    # alice's own join (again) is hers: nobody put out
    mine = {"event_id": "$alice-rejoined", "room_id": room, "sender": ALICE_MX, "type": "m.room.member",
            "state_key": ALICE_MX, "origin_server_ts": int(time.time() * 1000), "content": {"membership": "join"},
            "unsigned": {"prev_content": {"membership": "join"}}}
    assert as_put(mx, "alice-rejoined", {"events": [mine]}).status_code == 200
    alice.send_text(room, "marker")
    wait_until(lambda: any(e.get("type") == "message" and e["content"]["parts"][0]["body"] == "marker"
                           for e in list(srv.events)), what="the marker")
    assert hs.members(room).get(ALICE_MX) == "join"


def test_a_ghost_invited_into_a_room_shared_with_others_leaves_it(mx, hs, gk, pg, db_url):
    """alice invites wally's ghost into a room bob is in (or is invited
    to): what reaches the room would be what alice's consent let through,
    read by bob, who may have blocked wally. The ghost says why and leaves;
    nothing is bound, and wally's next message opens a room of alice's own."""
    a, srv = gk
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])  # the peer introduced wally
    _, alice_token = hs.create_user("alice")
    _, bob_token = hs.create_user("bob")
    alice, bob = hs.as_user(alice_token), hs.as_user(bob_token)
    ghost = "@_cw_gk_wally:example.org"
    for invited in (["@bob:example.org", ghost], ["@bob:example.org"]):
        room = alice.create_room(invite=invited)
        if ghost not in invited:  # bob joins, then the ghost is invited
            bob.join(room)
            alice.invite(room, ghost)
        wait_until(lambda: hs.members(room).get(ghost) == "leave", what="the ghost leaves")
        said = [e["content"]["body"] for e in hs.events(room) if e["sender"] == ghost and e["type"] == "m.room.message"]
        assert said and said[-1].startswith("Other people of this server are in this room"), said
    assert pg.psql("SELECT count(*) FROM room_bindings WHERE network = 'matrix'", db_url) == "0"


def test_a_member_list_the_homeserver_did_not_give_is_asked_again(mx, hs, gk, pg, db_url):
    """The ghost, joined on alice's invitation, asks who is in the room and
    the homeserver answers 503 (restarting): the invitation is tried again
    and the conversation starts. Before, no answer counted as "others are
    here": the ghost said so, untruly, and left for good."""
    a, srv = gk
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])  # the peer introduced wally
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    ghost = "@_cw_gk_wally:example.org"
    refused = []

    def refuse(method, path, user):
        if user == ghost and path.endswith("/members") and not refused:
            refused.append(path)
            return True
        return False
    hs.refuse = refuse
    room = alice.create_dm(ghost)
    wait_until(lambda: refused, what="the refused member list")
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings WHERE network = 'matrix'", db_url) == "1",
               timeout=20, what="the room bound on the second try")
    assert hs.members(room).get(ghost) == "join"
    assert not any(e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(room))
    alice.send_text(room, "hi wally")
    got = srv.wait_events(1)
    assert got[0]["content"]["parts"][0]["body"] == "hi wally"
    hs.refuse = None


def test_a_second_room_with_a_ghost_takes_over_and_a_second_ghost_makes_it_a_group(
        mx, hs, gk, pg, db_url):
    """A user who opens a new direct room with a ghost she already has one
    with (an old room forgotten, or left in another client) talks in the
    new one: the conversation (the same neutral room) moves there, the
    ghost says so in the old room and leaves it.  Before, the ghost joined
    the new room and what she wrote there went nowhere, in silence.  A
    second ghost she invites there makes it a group (hosted here)."""
    a, srv = gk
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])  # the peer introduced wally
    ghost = "@_cw_gk_wally:example.org"
    first = alice.create_dm(ghost)
    wait_until(lambda: hs.members(first).get(ghost) == "join", what="the ghost joins")
    alice.send_text(first, "in the first room")
    got = srv.wait_events(1)
    conversation = got[0]["room_id"]
    second = alice.create_dm(ghost)
    wait_until(lambda: hs.members(second).get(ghost) == "join", what="the ghost joins the second room")
    wait_until(lambda: hs.members(first).get(ghost) == "leave", what="the ghost leaves the first room")
    notice = [e for e in hs.events(first) if e["type"] == "m.room.message" and e["sender"] == ghost]
    assert notice and notice[-1]["content"]["msgtype"] == "m.notice" and "new room" in notice[-1]["content"]["body"]
    alice.send_text(second, "in the second room")
    got = wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "message" and
                              e["content"]["parts"][0]["body"] == "in the second room"] or None, what="the peer")
    assert got[0]["room_id"] == conversation
    # The reply comes into the second room.
    assert a.send(conversation, a.user("wally"), "got both").status_code == 202
    wait_until(lambda: any(e["sender"] == ghost and e["type"] == "m.room.message" and
                           e["content"]["body"] == "got both" for e in hs.events(second)), what="the reply")
    assert pg.psql("SELECT native_id FROM room_bindings WHERE network = 'matrix'", db_url) == second
    # A second ghost invited into that direct room makes it a group hosted
    # here, of the three: what alice writes there reaches both, and the
    # answers come back into it; a third joins the same way.
    bob, zed = "@_cw_gk_bob:example.org", "@_cw_gk_zed:example.org"
    # bob's ghost is known already: he has a direct room with alice.
    consent_alice(mx, a.user("bob"))
    with_bob = a.create_room([a.user("bob"), ALICE]).json()["id"]
    assert a.send(with_bob, a.user("bob"), "hi alice").status_code == 202
    wait_until(lambda: pg.psql(f"SELECT count(*) FROM identity_bindings WHERE native_id = '{bob}'", db_url) == "1",
               what="bob's ghost")
    a.create_room([a.user("zed"), "mimi://example.org/u/someone"])
    alice.invite(second, bob)
    wait_until(lambda: hs.members(second).get(bob) == "join", what="bob's ghost joins")
    wait_until(lambda: pg.psql("SELECT r.kind FROM room_bindings b JOIN rooms r ON r.id = b.room_id "
                               f"WHERE b.network = 'matrix' AND b.native_id = '{second}'", db_url) == "group",
               what="the room bound to a group")
    alice.send_text(second, "hello both")
    got = wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "message" and
                              e["content"]["parts"][0]["body"] == "hello both"] or None, what="the group's message")
    group = got[0]["room_id"]
    assert group != conversation
    state = a.call("GET", f"/v1/rooms/{group}").json()
    assert state["kind"] == "group" and sorted(m["user"] for m in state["members"]) == sorted(
        [ALICE, a.user("wally"), a.user("bob")]), state
    assert a.send(group, a.user("bob"), "hi alice and wally").status_code == 202
    wait_until(lambda: any(e["sender"] == bob and e["type"] == "m.room.message" and
                           e["content"]["body"] == "hi alice and wally" for e in hs.events(second)),
               what="bob's answer in the room")
    alice.invite(second, zed)
    wait_until(lambda: hs.members(second).get(zed) == "join", what="zed's ghost joins")
    wait_until(lambda: a.user("zed") in [m["user"] for m in a.call("GET", f"/v1/rooms/{group}").json()["members"]],
               what="zed in the group")
    assert pg.psql("SELECT count(*) FROM rooms WHERE kind = 'group'", db_url) == "1"
    # The ghosts' invites are the bot's to act on, not events for the peer
    # (the first would have named the direct room of alice and wally).
    assert not [e for e in list(srv.events) if e.get("type") == "membership"
                and e["content"].get("membership") == "invite"], list(srv.events)
    # carol, another user here, invited into alice's room of the group:
    # invited to the group, the invitation taken back (the room is alice's
    # view), and to a room of her own at once: a member once she joins it.
    carol = hs.as_user(hs.create_user("carol")[1])
    carol_uri, carol_mx = "mimi://example.org/u/carol", "@carol:example.org"
    assert mx.admin("POST", "/optins", json={"user": carol_uri, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": carol_uri, "subject_kind": "user", "subject": a.user("bob"),
                                              "state": "allowed"}).ok
    alice.invite(second, carol_mx)
    wait_until(lambda: hs.members(second).get(carol_mx) == "leave", what="the invitation taken back")
    # (said by a ghost: the room is alice's own, the bot was not in it; said
    # just after the kick: waited for)
    wait_until(lambda: any(e["type"] == "m.room.message" and e["sender"] in (ghost, bob, zed)
                           and e["content"]["body"].startswith("carol is invited to the group")
                           for e in hs.events(second)), what="the notice")
    membership = lambda: {m["user"]: m["membership"]  # noqa: E731
                          for m in a.call("GET", f"/v1/rooms/{group}").json()["members"]}.get(carol_uri)
    assert membership() == "invited"
    hers = wait_until(lambda: next((rid for rid in hs.rooms() if rid != second and hs.state(rid, "m.room.create")
                                    and hs.state(rid, "m.room.create")["sender"] == "@_cw_bot:example.org"
                                    and hs.members(rid).get(carol_mx) == "invite"), None), what="carol's room")
    carol.join(hers)
    wait_until(lambda: membership() == "joined", what="carol a member")
    assert a.send(group, a.user("bob"), "welcome, carol").status_code == 202
    wait_until(lambda: any(e["type"] == "m.room.message" and e["sender"] == bob and e["content"]["body"] ==
                           "welcome, carol" for e in hs.events(hers)), what="the message in carol's room")



def alice_makes_a_group_with_bob(mx, hs, a, srv, pg, db_url, others=()):
    """alice, who consented to wally, bob and the others, makes a group of
    her direct room with wally's ghost (alice_writes_to_wally) by inviting
    bob's (the peer a introduced him). (her client, her room, wally's
    ghost, the group's id), once the peer has her "hi both"."""
    consent_alice(mx)
    for who in ("bob",) + others:
        consent_alice(mx, a.user(who))
    a.create_room([a.user("bob"), "mimi://example.org/u/someone"])  # the peer introduced bob
    alice, room, wally = alice_writes_to_wally(hs, a)
    bob = "@_cw_gk_bob:example.org"
    alice.invite(room, bob)
    wait_until(lambda: hs.members(room).get(bob) == "join", what="bob's ghost in")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "2", what="a group")
    alice.send_text(room, "hi both")
    gid = wait_until(lambda: next((e["room_id"] for e in list(srv.events) if e.get("type") == "message"
                                   and e["content"]["parts"][0]["body"] == "hi both"), None), what="the group")
    return alice, room, wally, gid


def test_a_ghost_banned_from_a_users_room_of_a_group_is_not_delivered_there(mx, hs, gk, pg, db_url):
    """alice makes a group of her room with wally's ghost by inviting bob's,
    then bans bob's ghost (her room: hers to ban in). What bob writes to
    the group is not delivered to her, at once (dropped, "not delivered"
    for the peer), and what wally writes after it comes as before. Until
    the thirteenth session bob's row failed on the refused join again and
    again until it was dead, and the room's later rows waited behind it."""
    a, srv = gk
    alice, room, wally, gid = alice_makes_a_group_with_bob(mx, hs, a, srv, pg, db_url)
    bob = "@_cw_gk_bob:example.org"
    r = alice.request("POST", f"/_matrix/client/v3/rooms/{room}/ban", {"user_id": bob, "reason": "spam"})
    assert r.status_code == 200, r.text
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "1", what="bob's ghost out")
    spam = a.send(gid, a.user("bob"), "let me back in")
    assert spam.status_code == 202, spam.text
    row = f"(SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e ON e.id = o.event_id " \
          f"WHERE e.public_id = '{spam.json()['id']}' AND o.destination = 'matrix')"
    wait_until(lambda: pg.psql(f"SELECT {row}", db_url) == "dropped 1", what="bob's row dropped at once")
    # his ghost's join refused: the room bans it (the bot is in, it could invite)
    error = pg.psql("SELECT o.last_error FROM outbox o JOIN events e ON e.id = o.event_id "
                    f"WHERE e.public_id = '{spam.json()['id']}' AND o.destination = 'matrix'", db_url)
    assert error.startswith("the recipient's room refuses the sender (banned there)"), error
    st = a.call("GET", f"/v1/messages/{spam.json()['id']}").json()
    assert [x["status"] for x in st["recipients"]] == ["accepted"], st  # as a block: not_delivered a week later
    assert a.send(gid, a.user("wally"), "still here").status_code == 202
    wait_until(lambda: any(e["sender"] == wally and e["type"] == "m.room.message"
                           and e["content"]["body"] == "still here" for e in hs.events(room)), what="wally's message")
    assert hs.members(room).get(bob) == "ban"
    assert not any(e["type"] == "m.room.message" and e["content"]["body"] == "let me back in" for e in hs.events(room))


def test_a_ghost_banned_from_a_room_of_a_group_before_the_adapter_hears_of_it_is_not_retried(mx, hs, gk, pg, db_url):
    """As above, but the peer's messages come while the ban has not reached
    the adapter yet (the homeserver's transaction still pending): the ghost
    is still counted in the room, and every send is refused 403 M_FORBIDDEN.
    The adapter asks the homeserver for the ghost's membership (the state
    when it left, as the specification has GET /state answer a departed
    user): banned, so each row is not delivered at once, with the reason
    in the admin API, none retried, and the room's next rows go on. Until
    the fifty-third session each row was tried again for its whole retry
    budget and then a dead letter that said nothing of the ban."""
    a, srv = gk
    alice, room, wally, gid = alice_makes_a_group_with_bob(mx, hs, a, srv, pg, db_url)
    bob = "@_cw_gk_bob:example.org"
    hs.stop_pushing()
    r = alice.request("POST", f"/_matrix/client/v3/rooms/{room}/ban", {"user_id": bob, "reason": "spam"})
    assert r.status_code == 200, r.text
    ids = []
    for i in range(3):
        s = a.send(gid, a.user("bob"), f"spam {i}")
        assert s.status_code == 202, s.text
        ids.append(s.json()["id"])
    rows = ("SELECT string_agg(o.state || ' ' || o.attempts, ',' ORDER BY o.id) FROM outbox o "
            "JOIN events e ON e.id = o.event_id WHERE o.destination = 'matrix' AND e.public_id IN ("
            + ", ".join(f"'{i}'" for i in ids) + ")")
    wait_until(lambda: pg.psql(rows, db_url) == "dropped 1,dropped 1,dropped 1", timeout=20,
               what="bob's rows not delivered at once, each tried once")
    assert pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "2"  # the ban not heard of yet
    errors = pg.psql("SELECT DISTINCT o.last_error FROM outbox o JOIN events e ON e.id = o.event_id "
                     f"WHERE e.public_id = '{ids[0]}' AND o.destination = 'matrix'", db_url)
    assert errors.startswith("the recipient's room refuses the sender (banned there)"), errors
    dropped = mx.admin("GET", "/outbox?state=dropped&destination=matrix").json()["rows"]
    assert sorted(x["message"] for x in dropped if x["last_error"] == errors) == sorted(ids), dropped
    st = a.call("GET", f"/v1/messages/{ids[0]}").json()
    assert [x["status"] for x in st["recipients"]] == ["accepted"], st  # the peer: not_delivered, as a block
    assert a.send(gid, a.user("wally"), "still here").status_code == 202
    wait_until(lambda: any(e["sender"] == wally and e["type"] == "m.room.message"
                           and e["content"]["body"] == "still here" for e in hs.events(room)), what="wally's message")
    hs.resume_pushing()
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "1", what="bob's ghost out")
    assert not any(e["type"] == "m.room.message" and e["content"]["body"].startswith("spam") for e in hs.events(room))


def test_the_membership_question_after_a_403_holds_up_no_other_room(mx, hs, gk, pg, db_url):
    """As above, bob's ghost banned from alice's room of the group before the
    adapter hears of it: his row's send is refused 403, and the adapter asks
    the homeserver the ghost's membership. The homeserver is slow to answer
    that question (answered only once the other room's rows are in, 8 s at
    most here); the rows of another of alice's rooms (zed's
    direct room), delivered in the same batch, go on meanwhile, one after
    the other, and bob's row is not delivered once the answer says banned.
    Until the fifty-fourth session the question was asked on the delivery
    thread, and every other room in flight waited for its answer."""
    a, srv = gk
    alice, room, wally, gid = alice_makes_a_group_with_bob(mx, hs, a, srv, pg, db_url, others=("zed",))
    bob, zed = "@_cw_gk_bob:example.org", "@_cw_gk_zed:example.org"
    zid = a.create_room([a.user("zed"), ALICE]).json()["id"]
    assert a.send(zid, a.user("zed"), "hello").status_code == 202
    zroom = wait_until(lambda: next((rid for rid in hs.rooms() if any(
        e["sender"] == zed and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="zed's room")
    hs.stop_pushing()
    r = alice.request("POST", f"/_matrix/client/v3/rooms/{room}/ban", {"user_id": bob, "reason": "spam"})
    assert r.status_code == 200, r.text
    asked, answered, released = [], [], threading.Event()

    # The question is answered only once zed's five rows are in (8 s at
    # most, within the adapter's 10 s request timeout): each of zed's sends
    # coming before its answer shows they did not wait for it, however
    # slow a loaded machine makes them (a fixed 5 s against a 2.5 s bound
    # before).
    def slow_question(room_id, etype, state_key, user):
        if room_id == room and etype == "m.room.member" and state_key == bob:
            asked.append(time.time())
            released.wait(8)
            answered.append(time.time())
        return 0

    slow, queued = [], threading.Event()

    def slow_first_send(user):
        if user == zed and not slow:
            slow.append(time.time())
            queued.wait(8)
        return 0

    hs.state_latency = slow_question
    # one slow send of zed's holds the delivery while bob's row and zed's
    # next ones are queued: the next batch takes them all
    hs.send_latency = slow_first_send
    try:
        assert a.send(zid, a.user("zed"), "first").status_code == 202
        wait_until(lambda: slow, what="zed's slow send")
        spam = a.send(gid, a.user("bob"), "spam")
        assert spam.status_code == 202, spam.text
        for i in range(5):
            assert a.send(zid, a.user("zed"), f"z {i}").status_code == 202
        queued.set()
        wait_until(lambda: sum(e["sender"] == zed and e["type"] == "m.room.message"
                               and e["content"]["body"].startswith("z ") for e in hs.events(zroom)) == 5,
                   timeout=30, what="zed's messages")
    finally:
        queued.set()
        released.set()
    row = ("SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
           f"WHERE e.public_id = '{spam.json()['id']}' AND o.destination = 'matrix'")
    wait_until(lambda: pg.psql(row, db_url) == "dropped 1", timeout=30, what="bob's row not delivered, tried once")
    error = pg.psql(row.replace("o.state || ' ' || o.attempts", "o.last_error"), db_url)
    assert error.startswith("the recipient's room refuses the sender (banned there)"), error
    sends = [q["time"] for q in hs.requests if q["method"] == "PUT" and q["user"] == zed and q["status"] == 200
             and str((q["body"] or {}).get("body", "")).startswith("z ")]
    assert len(sends) == 5 and len(asked) == 1 and len(answered) == 1, (sends, asked, answered)
    # zed's rows went one after the other while the question waited for its answer
    assert max(sends) < answered[0], (sends, asked, answered)
    hs.state_latency = 0.0
    hs.send_latency = 0.0
    hs.resume_pushing()


def alice_makes_a_group_the_bot_can_be_put_out_of(mx, hs, a, srv, pg, db_url, others=()):
    """alice, who consented to wally, bob and the others (each introduced by
    the peer a), makes a private_chat room with wally's ghost, where only
    she has power (the ghosts and the bot none: hers to kick the bot), and
    a group of it by inviting bob's ghost; the bot joins it. (her client,
    her room, the group's id), once the peer has her "hi both"."""
    consent_alice(mx)
    for who in ("bob",) + others:
        consent_alice(mx, a.user(who))
    for who in ("bob", "wally") + others:
        a.create_room([a.user(who), "mimi://example.org/u/someone"])  # the peer introduced them
    alice = hs.as_user(hs.create_user("alice")[1])
    wally, bob, bot = "@_cw_gk_wally:example.org", "@_cw_gk_bob:example.org", "@_cw_bot:example.org"
    room = alice.create_room(preset="private_chat", is_direct=True, invite=[wally])
    wait_until(lambda: hs.members(room).get(wally) == "join", what="the ghost joins")
    alice.invite(room, bob)
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "2", what="a group")
    wait_until(lambda: hs.members(room).get(bot) == "join", what="the bot in alice's room of the group")
    alice.send_text(room, "hi both")
    gid = wait_until(lambda: next((e["room_id"] for e in list(srv.events) if e.get("type") == "message"
                                   and e["content"]["parts"][0]["body"] == "hi both"), None), what="the group")
    return alice, room, gid


def alice_kicks_the_bot(hs, alice, room):
    """alice puts the bot out of her room (of a group), and it is out."""
    bot = "@_cw_bot:example.org"
    r = alice.request("POST", f"/_matrix/client/v3/rooms/{room}/kick", {"user_id": bot, "reason": "no bots"})
    assert r.status_code == 200, r.text
    wait_until(lambda: hs.members(room).get(bot) == "leave", what="the bot out")


def test_what_the_bot_relays_into_a_room_of_a_group_it_was_put_out_of_is_not_delivered(mx, hs, gk, pg, db_url):
    """alice makes a group of her room (wally's and bob's ghosts); carol,
    another user here, becomes a member in a room of her own. alice then
    kicks the bot out of her room: what carol writes, which the bot relays
    into alice's room, is refused 403; the bot's membership there is
    "leave", so each such row is not delivered at once, the reason in the
    admin API, and not retried (until the fifty-third session each spent
    its retry budget and ended a dead letter naming no cause). alice
    inviting the bot back lets carol's next message in."""
    a, srv = gk
    alice, room, gid = alice_makes_a_group_the_bot_can_be_put_out_of(mx, hs, a, srv, pg, db_url)
    bot = "@_cw_bot:example.org"
    carol = hs.as_user(hs.create_user("carol")[1])
    carol_uri, carol_mx = "mimi://example.org/u/carol", "@carol:example.org"
    assert mx.admin("POST", "/optins", json={"user": carol_uri, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": carol_uri, "subject_kind": "user", "subject": a.user("bob"),
                                              "state": "allowed"}).ok
    alice.invite(room, carol_mx)
    hers = wait_until(lambda: next((rid for rid in hs.rooms() if rid != room and hs.state(rid, "m.room.create")
                                    and hs.state(rid, "m.room.create")["sender"] == bot
                                    and hs.members(rid).get(carol_mx) == "invite"), None), what="carol's room")
    carol.join(hers)
    wait_until(lambda: {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]}
               .get(carol_uri) == "joined", what="carol a member")
    alice_kicks_the_bot(hs, alice, room)
    n = len(hs.events(room))
    for i in range(3):
        carol.send_text(hers, f"carol {i}")
    rows = ("SELECT string_agg(o.state || ' ' || o.attempts, ',' ORDER BY o.id) FROM outbox o "
            "JOIN events e ON e.id = o.event_id JOIN identities t ON t.id = o.target_identity_id "
            f"WHERE o.destination = 'matrix' AND t.uri = '{ALICE}' AND e.content::text LIKE '%carol _%'")
    wait_until(lambda: pg.psql(rows, db_url) == "dropped 1,dropped 1,dropped 1", timeout=30,
               what="the relayed rows not delivered at once, each tried once")
    errors = pg.psql("SELECT DISTINCT o.last_error FROM outbox o JOIN identities t ON t.id = o.target_identity_id "
                     f"WHERE o.destination = 'matrix' AND t.uri = '{ALICE}' AND o.state = 'dropped'", db_url)
    assert errors.startswith("the gateway's bot was put out of the recipient's room of the group"), errors
    # the three rows of her messages, by their ids: what else of carol's the
    # bot relays there (a membership change of the group's) is not delivered as well
    ids = pg.psql(rows.replace("string_agg(o.state || ' ' || o.attempts, ','", "string_agg(o.id::text, ','"),
                  db_url).split(",")
    dropped = mx.admin("GET", "/outbox?state=dropped&destination=matrix").json()["rows"]
    shown = {str(x["id"]): x["last_error"] for x in dropped}
    assert len(ids) == 3 and all(shown.get(i) == errors for i in ids), (ids, dropped)
    assert not [e for e in hs.events(room)[n:] if e["type"] == "m.room.message"]
    # alice invites the bot back: it joins, and carol's next message is relayed
    alice.invite(room, bot)
    wait_until(lambda: hs.members(room).get(bot) == "join", what="the bot back")
    carol.send_text(hers, "back again")
    wait_until(lambda: any(e["type"] == "m.room.message" and e["sender"] == bot and
                           "back again" in e["content"]["body"] for e in hs.events(room)), what="the relay")


@pytest.mark.parametrize("who", ["new member", "kicked ghost"])
def test_a_ghost_the_bot_cannot_let_into_a_room_it_was_put_out_of_is_not_delivered_as_banned(mx, hs, gk, pg,
                                                                                            db_url, who):
    """alice makes a group of her room (wally's and bob's ghosts), then
    kicks the bot out of it. A member whose ghost is not in her room
    writes: zed, whom the peer adds to the group afterwards, or bob, whose
    ghost alice kicked too. His ghost must be invited by the bot, which is
    out: the invitation is refused, and so is the ghost's join. Each row is
    not delivered at once (the peer sees only that), and its last_error, in
    the admin API too, says what is true: the bot is out, so the ghost
    cannot be let in, until the bot is invited again; until the
    fifty-third session it said "banned there". alice inviting the bot back
    lets his next message in."""
    a, srv = gk
    alice, room, gid = alice_makes_a_group_the_bot_can_be_put_out_of(mx, hs, a, srv, pg, db_url, others=("zed",))
    bob, bot = "@_cw_gk_bob:example.org", "@_cw_bot:example.org"
    alice_kicks_the_bot(hs, alice, room)
    members = lambda: {m["user"]: m["membership"]  # noqa: E731
                       for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]}
    if who == "new member":
        sender, ghost = a.user("zed"), "@_cw_gk_zed:example.org"
        r = a.call("POST", f"/v1/rooms/{gid}/members", {"add": [sender]})
        assert r.status_code == 200, r.text
        wait_until(lambda: members().get(sender) == "joined", what="zed a member of the group")
    else:
        sender, ghost = a.user("bob"), bob
        r = alice.request("POST", f"/_matrix/client/v3/rooms/{room}/kick", {"user_id": bob})
        assert r.status_code == 200, r.text
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "1",
                   what="bob's ghost no longer counted in")
        assert members().get(sender) == "joined"  # still a member: only his ghost is out
    ids = []
    for i in range(2):
        s = a.send(gid, sender, f"hello {i}")
        assert s.status_code == 202, s.text
        ids.append(s.json()["id"])
    rows = ("SELECT string_agg(o.state || ' ' || o.attempts, ',' ORDER BY o.id) FROM outbox o "
            "JOIN events e ON e.id = o.event_id WHERE o.destination = 'matrix' AND e.public_id IN ("
            + ", ".join(f"'{i}'" for i in ids) + ")")
    wait_until(lambda: pg.psql(rows, db_url) == "dropped 1,dropped 1", timeout=30,
               what="the rows not delivered at once, each tried once")
    assert hs.members(room).get(ghost) != "join"
    errors = pg.psql("SELECT string_agg(DISTINCT o.last_error, '|') FROM outbox o JOIN events e ON e.id = o.event_id "
                     "WHERE o.destination = 'matrix' AND e.public_id IN ("
                     + ", ".join(f"'{i}'" for i in ids) + ")", db_url)
    assert errors.startswith("the gateway's bot was put out of the recipient's room of the group, so the sender's "
                             "ghost cannot be let in"), errors
    assert "banned" not in errors and "|" not in errors, errors
    dropped = mx.admin("GET", "/outbox?state=dropped&destination=matrix").json()["rows"]
    assert sorted(x["message"] for x in dropped if x["last_error"] == errors) == sorted(ids), dropped
    st = a.call("GET", f"/v1/messages/{ids[0]}").json()
    assert [x["status"] for x in st["recipients"]] == ["accepted"], st  # the peer: not_delivered, as a block
    assert not any(e["type"] == "m.room.message" and e["content"]["body"].startswith("hello") for e in hs.events(room))
    # alice invites the bot back: it joins, lets the ghost in, and the next message comes
    alice.invite(room, bot)
    wait_until(lambda: hs.members(room).get(bot) == "join", what="the bot back")
    assert a.send(gid, sender, "back again").status_code == 202
    wait_until(lambda: any(e["type"] == "m.room.message" and e["sender"] == ghost and
                           e["content"]["body"] == "back again" for e in hs.events(room)), what="his message")


def test_a_refused_joins_questions_are_awaited_briefly(mx, hs, gk, pg, db_url):
    """As above (the bot kicked out of alice's room of the group, zed new to
    the group), but the homeserver is slow to answer the two membership
    questions that word the refused join's reason (the bot's, then the
    ghost's: 9 s each here, within the adapter's request timeout). They are asked while the row is prepared, every
    other room of the batch waiting: each is awaited 2 s at most, since the
    row is not delivered whatever the answer, and the reason is then the
    homeserver's refusal. Until the fifty-fourth session each was awaited
    the adapter's 10 s request timeout."""
    a, srv = gk
    alice, room, gid = alice_makes_a_group_the_bot_can_be_put_out_of(mx, hs, a, srv, pg, db_url, others=("zed",))
    bot, ghost = "@_cw_bot:example.org", "@_cw_gk_zed:example.org"
    alice_kicks_the_bot(hs, alice, room)
    r = a.call("POST", f"/v1/rooms/{gid}/members", {"add": [a.user("zed")]})
    assert r.status_code == 200, r.text
    wait_until(lambda: {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]}
               .get(a.user("zed")) == "joined", what="zed a member of the group")
    asked = []

    def slow_question(room_id, etype, state_key, user):
        if room_id == room and etype == "m.room.member" and state_key in (bot, ghost) and user == state_key:
            asked.append((state_key, time.time()))
            return 9.0
        return 0

    hs.state_latency = slow_question
    s = a.send(gid, a.user("zed"), "hello")
    assert s.status_code == 202, s.text
    row = ("SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
           f"WHERE e.public_id = '{s.json()['id']}' AND o.destination = 'matrix'")
    wait_until(lambda: pg.psql(row, db_url) == "dropped 1", timeout=30, what="the row not delivered, tried once")
    done = time.time()
    assert [who for who, _ in asked] == [bot, ghost], (asked, done)
    # each question given up long before its answer (9 s): the ghost's was
    # asked, then the row done with, within 7 s of the question before
    # (2 s awaited; 7 s for both before, too close on a loaded machine)
    assert asked[1][1] - asked[0][1] < 7 and done - asked[1][1] < 7, (asked, done)
    error = pg.psql(row.replace("o.state || ' ' || o.attempts", "o.last_error"), db_url)
    assert error.startswith("the recipient's room of the group does not let the sender's ghost in: "), error
    hs.state_latency = 0.0


@pytest.mark.parametrize("how", ["own leave", "removed", "banned", "left meanwhile"])
def test_a_ghost_whose_user_left_a_group_made_here_is_not_brought_back(mx, hs, gk, pg, db_url, how):
    """alice makes a group of her room with wally's ghost by inviting bob's;
    bob then leaves the group (his own leave, his peer's removal of him) or
    is banned from it, and his ghost leaves alice's room. alice inviting
    his ghost again does not make him a member again (mx_bot.c grow_group,
    as an XMPP member's invitation is refused: xmpp_muc.c invite_fn): the
    ghost declines the invitation, the bot says why in the room, once, and
    nothing stored changes (his membership, the room's members, nothing
    for the peer). "left meanwhile": bob leaves while the bot's work on the
    invitation waits for the group's lock (his ghost, still a member, joins
    first), and the ghost leaves again. Until the forty-third session the
    invitation set his membership back to joined."""
    a, srv = gk
    consent_alice(mx)
    consent_alice(mx, a.user("bob"))
    a.create_room([a.user("bob"), "mimi://example.org/u/someone"])  # the peer introduced bob
    alice, room, wally = alice_writes_to_wally(hs, a)
    bob, bot = "@_cw_gk_bob:example.org", "@_cw_bot:example.org"
    alice.invite(room, bob)
    wait_until(lambda: hs.members(room).get(bob) == "join", what="bob's ghost in")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "2", what="a group")
    wait_until(lambda: hs.members(room).get(bot) == "join", what="the bot in alice's room of the group")
    group = pg.psql("SELECT public_id FROM rooms WHERE kind = 'group'", db_url)
    membership = ("SELECT m.membership || ' ' || m.updated_at FROM room_members m JOIN rooms r ON r.id = m.room_id "
                  f"JOIN identities i ON i.id = m.identity_id WHERE r.public_id = '{group}' "
                  f"AND i.uri = '{a.user('bob')}'")
    if how == "own leave":
        r = a.call("POST", f"/v1/rooms/{group}/messages",
                   {"type": "membership", "sender": a.user("bob"),
                    "content": {"membership": "leave", "target": a.user("bob")}}, idem="bob-leaves-" + group)
        assert r.status_code == 202, r.text
    elif how == "removed":
        r = a.call("POST", f"/v1/rooms/{group}/members", {"remove": [a.user("bob")]})
        assert r.status_code == 200, r.text
    elif how == "banned":
        pg.psql(f"UPDATE room_members SET membership = 'banned' WHERE identity_id = (SELECT id FROM identities "
                f"WHERE uri = '{a.user('bob')}')", db_url)
    if how == "left meanwhile":  # alice puts his ghost out of her room: he stays a member
        r = alice.request("POST", f"/_matrix/client/v3/rooms/{room}/kick", {"user_id": bob})
        assert r.status_code == 200, r.text
    wait_until(lambda: hs.members(room).get(bob) == "leave", what="bob's ghost out of alice's room")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "1",
               what="bob's ghost no longer counted in")
    events = f"SELECT count(*) FROM events e JOIN rooms r ON r.id = e.room_id WHERE r.public_id = '{group}'"
    n_peer = len(srv.events)
    n_member_events = len([e for e in hs.events(room) if e["type"] == "m.room.member" and e["state_key"] == bob])
    if how == "left meanwhile":
        key = int(pg.psql(f"SELECT id % 2147483647 FROM rooms WHERE public_id = '{group}'", db_url))
        waiting = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1129796434 "
                   f"AND objid = {key} AND objsubid = 2 AND NOT granted")
        held = HeldSession(db_url)
        try:
            held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, {key});")
            alice.invite(room, bob)
            wait_until(lambda: hs.members(room).get(bob) == "join", what="bob's ghost joining (still a member)")
            wait_until(lambda: pg.psql(waiting, db_url) == "1", what="the bot's work waiting for the group's lock")
            held.run("UPDATE room_members SET membership = 'left', updated_at = now() WHERE identity_id = "
                     f"(SELECT id FROM identities WHERE uri = '{a.user('bob')}');")
        finally:
            held.end()  # commits
        before = pg.psql(membership, db_url)
        n_events = pg.psql(events, db_url)
    else:
        before = pg.psql(membership, db_url)
        n_events = pg.psql(events, db_url)
        alice.invite(room, bob)
    assert before.split()[0] == ("banned" if how == "banned" else "left"), before

    def notices():
        return [e["content"] for e in hs.events(room) if e["type"] == "m.room.message" and e["sender"] == bot
                and "left this group" in e["content"]["body"]]
    wait_until(lambda: hs.members(room).get(bob) == "leave" and notices(), what="the ghost out again, the notice")
    mine = [e for e in hs.events(room) if e["type"] == "m.room.member" and e["state_key"] == bob][n_member_events:]
    want = ["invite", "join", "leave"] if how == "left meanwhile" else ["invite", "leave"]  # declined, not joined
    assert [e["content"]["membership"] for e in mine] == want, mine
    assert mine[-1]["sender"] == bob, mine
    # the next message in the room: the notice was said once, and nothing
    # reached the peer but alice's message, to wally
    alice.send_text(room, "without bob")
    got = wait_until(lambda: [e for e in list(srv.events)[n_peer:] if e.get("type") == "message"] or None,
                     what="alice's message at the peer")
    assert got[0]["room_id"] == group and got[0]["content"]["parts"][0]["body"] == "without bob", got
    assert [e.get("type") for e in list(srv.events)[n_peer:]] == ["message"], list(srv.events)[n_peer:]
    assert len(notices()) == 1 and notices()[0]["msgtype"] == "m.notice", notices()
    assert notices()[0]["body"].startswith(bob + " left this group"), notices()
    assert pg.psql(membership, db_url) == before
    assert pg.psql(events, db_url) == str(int(n_events) + 1)  # alice's message
    assert pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "1"
    members = {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{group}").json()["members"]}
    # the peer's view lists the members now: a ban, not one who left
    assert members.get(a.user("bob")) == ("banned" if how == "banned" else None), members


def test_a_local_user_banned_from_a_group_made_here_is_not_brought_back(mx, hs, gk, pg, db_url):
    """carol, another user here, invited into alice's group and then banned
    from it (by hand: nothing here bans yet), is not invited again by
    alice's next invitation of her (mx_bot.c grow_group, as on XMPP: a
    banned user is no one's to bring back): the invitation is taken back
    as every invitation into alice's room is, the notice says she was put
    out of the group, and her membership stays banned. (One who left is
    invited again: hers to accept.)"""
    a, srv = gk
    consent_alice(mx)
    consent_alice(mx, a.user("bob"))
    a.create_room([a.user("bob"), "mimi://example.org/u/someone"])  # the peer introduced bob
    alice, room, wally = alice_writes_to_wally(hs, a)
    bob, carol_mx = "@_cw_gk_bob:example.org", "@carol:example.org"
    alice.invite(room, bob)
    wait_until(lambda: hs.members(room).get(bob) == "join", what="bob's ghost in")
    group = wait_until(lambda: pg.psql("SELECT public_id FROM rooms WHERE kind = 'group'", db_url), what="a group")
    hs.create_user("carol")
    membership = ("SELECT m.membership || ' ' || m.updated_at FROM room_members m JOIN rooms r ON r.id = m.room_id "
                  "JOIN identities i ON i.id = m.identity_id WHERE r.public_id = "
                  f"'{group}' AND i.uri = 'mimi://example.org/u/carol'")
    alice.invite(room, carol_mx)
    wait_until(lambda: pg.psql(membership, db_url).startswith("invited "), what="carol invited")
    wait_until(lambda: hs.members(room).get(carol_mx) == "leave", what="the invitation taken back")
    pg.psql("UPDATE room_members SET membership = 'banned' WHERE identity_id = (SELECT id FROM identities "
            "WHERE uri = 'mimi://example.org/u/carol')", db_url)
    before = pg.psql(membership, db_url)

    def put_out():
        return [e for e in hs.events(room) if e["type"] == "m.room.message"
                and e["content"]["body"].startswith("carol was put out of this group")]
    alice.invite(room, carol_mx)
    wait_until(lambda: hs.members(room).get(carol_mx) == "leave" and put_out(), what="taken back, and why")
    assert len(put_out()) == 1, put_out()
    assert pg.psql(membership, db_url) == before


def test_an_invitation_takes_a_group_no_further_than_rooms_max_members(make_daemon, db_url, hs, pg):
    """A Matrix user's invitation into her room of a group made here that
    would take it past rooms.max_members (joined or invited) adds nobody:
    another user of this server is not invited (the invitation taken back,
    the notice says why), a ghost declines (the bot says why), and nothing
    stored changes. Since the forty-sixth session: before, a local user
    grew a group without bound, as a peer could."""
    mx = start_mx(make_daemon, db_url, hs, rooms={"max_members": "3"})
    a, srv = add_gk(mx)
    try:
        consent_alice(mx)
        consent_alice(mx, a.user("bob"))
        a.create_room([a.user("bob"), "mimi://example.org/u/someone"])  # the peer introduced bob
        a.create_room([a.user("dave"), "mimi://example.org/u/someone"])  # and dave
        alice, room, wally = alice_writes_to_wally(hs, a)
        bob, dave, carol_mx = "@_cw_gk_bob:example.org", "@_cw_gk_dave:example.org", "@carol:example.org"
        alice.invite(room, bob)  # a group of three: alice, wally, bob
        wait_until(lambda: hs.members(room).get(bob) == "join", what="bob's ghost in")
        group = wait_until(lambda: pg.psql("SELECT public_id FROM rooms WHERE kind = 'group'", db_url),
                           what="a group")
        members = ("SELECT string_agg(i.uri || ' ' || m.membership, ',' ORDER BY i.uri) FROM room_members m "
                   f"JOIN rooms r ON r.id = m.room_id JOIN identities i ON i.id = m.identity_id "
                   f"WHERE r.public_id = '{group}'")
        wait_until(lambda: pg.psql(members, db_url).count(" joined") == 3, what="the three joined")
        before = pg.psql(members, db_url)

        def full():
            return [e for e in hs.events(room) if e["type"] == "m.room.message"
                    and e["content"]["body"].startswith("This group has as many members as it may have here (3)")]
        hs.create_user("carol")
        alice.invite(room, carol_mx)
        wait_until(lambda: hs.members(room).get(carol_mx) == "leave" and full(), what="taken back, and why")
        alice.invite(room, dave)
        wait_until(lambda: hs.members(room).get(dave) == "leave" and len(full()) == 2, what="declined, and why")
        assert full()[1]["sender"] == "@_cw_bot:example.org", full()
        assert pg.psql(members, db_url) == before
        assert "carol" not in before and "dave" not in before, before
    finally:
        srv.close()


@pytest.mark.parametrize("members_filters", [True, False], ids=["synapse", "conduit"])
def test_a_local_user_invited_into_a_direct_room_makes_a_group(mx, hs, gk, pg, db_url, members_filters):
    """alice invites carol, another user of this server, into her direct
    room with wally: the room is alice's view, so the invitation is taken
    back (by the ghost: the bot is not in it), and the three are a group
    hosted here; carol is invited to a room of her own for it, and is the
    group's member once she joins it (invited until then: until the
    eighteenth session the peer saw her joined before she had accepted
    anything); what alice writes there reaches wally in the group, and
    carol in her room.  With a homeserver that answers GET /members
    whatever its membership filter (Conduit), her invitation is not taken
    for her join (until the twentieth session it was)."""
    hs.members_filters = members_filters
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi wally")
    direct = srv.wait_events(1)[0]["room_id"]
    carol = hs.as_user(hs.create_user("carol")[1])
    carol_mx, bot = "@carol:example.org", "@_cw_bot:example.org"
    alice.invite(room, carol_mx)
    wait_until(lambda: hs.members(room).get(carol_mx) == "leave", what="the invitation taken back")
    wait_until(lambda: any(e["type"] == "m.room.message" and e["sender"] == ghost and
                           e["content"]["body"].startswith("carol is invited to the group")
                           for e in hs.events(room)), what="the notice, said after the kick")
    group = wait_until(lambda: pg.psql("SELECT public_id FROM rooms WHERE kind = 'group'", db_url), what="the group")
    assert group != direct
    members = lambda: {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{group}").json()["members"]}  # noqa: E731
    assert members() == {ALICE: "joined", a.user("wally"): "joined", "mimi://example.org/u/carol": "invited"}
    hers = wait_until(lambda: next((rid for rid in hs.rooms() if hs.state(rid, "m.room.create")
                                    and hs.state(rid, "m.room.create")["sender"] == bot
                                    and hs.members(rid).get(carol_mx) == "invite"), None), what="carol's room")
    # The bot asked the homeserver whether she joined once her room was
    # bound: she had not.
    wait_until(lambda: any(urllib.parse.unquote(q["path"]).endswith(f"/rooms/{hers}/members")
                           and q["status"] == 200 for q in hs.requests),
               what="the bot's look at her room's members")
    # What it makes of the answer (a wrong mark came within milliseconds).
    # The sleep stays a window, not a stand-in for a state: an answer of
    # "not joined" writes nothing (mx_mark_if_joined returns, the bot's
    # invitation row is done with the binding), so nothing the daemon
    # writes marks the moment a wrong mark would have come.
    time.sleep(1)
    assert members()["mimi://example.org/u/carol"] == "invited"
    carol.join(hers)
    wait_until(lambda: members()["mimi://example.org/u/carol"] == "joined", what="carol joined")
    wait_until(lambda: any(e.get("type") == "membership" and e["room_id"] == group and
                           e["content"]["membership"] == "join" and e["sender"] == "mimi://example.org/u/carol"
                           for e in list(srv.events)), what="her join, a member's, reaching the peer")
    alice.send_text(room, "carol is with us")
    got = wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "message"
                              and e["content"]["parts"][0]["body"] == "carol is with us"] or None, what="the peer")
    assert got[0]["room_id"] == group
    state = a.call("GET", f"/v1/rooms/{group}").json()
    assert state["kind"] == "group" and sorted(m["user"] for m in state["members"]) == sorted(
        [ALICE, a.user("wally"), "mimi://example.org/u/carol"]), state
    wait_until(lambda: any(e["type"] == "m.room.message" and e["sender"] == bot and
                           e["content"]["body"] == "alice: carol is with us" for e in hs.events(hers)),
               what="alice's message in carol's room")
    # What carol writes in hers reaches alice's room, which alice made: the
    # bot, who relays it, was brought in when it became a group's, with
    # the ghost's power (a trusted private chat's), so the group's name
    # reaches the room too.
    assert hs.members(room).get(bot) == "join"
    levels = hs.state(room, "m.room.power_levels")["content"]["users"]
    assert levels[bot] == levels[ghost] == 100, levels
    assert a.call("PATCH", f"/v1/rooms/{group}", {"name": "Trio"}).status_code == 200
    wait_until(lambda: (hs.state(room, "m.room.name") or {}).get("content", {}).get("name") == "Trio",
               what="alice's room named as the group")
    carol.send_text(hers, "hello alice")
    wait_until(lambda: any(e["type"] == "m.room.message" and e["sender"] == bot and
                           e["content"]["body"] == "carol: hello alice" for e in hs.events(room)),
               what="carol's message in alice's room")

def carol_joins_before_her_room_is_bound(hs, gk, pg, db_url, until, what, then=None):
    """alice invites carol into her direct room with wally (so a group); the
    bot makes carol a room of her own, which her client joins at once (and
    then(carol) does, when given), but the answer to the bot's createRoom
    is lost, so the room is bound only when the bot tries again and finds
    it by its alias: (alice, her room, carol's room, the group), once
    until(group) holds (the answer lost until then)."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi wally")
    srv.wait_events(1)
    carol = hs.as_user(hs.create_user("carol")[1])
    bot = "@_cw_bot:example.org"
    hers = []

    def lose(method, path, user):
        if method == "POST" and path.endswith("/createRoom") and user == bot and not hers:
            hers.append(hs.rooms()[-1])
            carol.join(hers[0])
            if then:
                then(carol)
            return True
        return False
    hs.lose_reply = lose
    try:
        alice.invite(room, "@carol:example.org")
        group = wait_until(lambda: pg.psql("SELECT public_id FROM rooms WHERE kind = 'group'", db_url),
                           what="the group")
        wait_until(lambda: until(group), timeout=30, what=what)
    finally:
        hs.lose_reply = None
    return alice, room, hers[0], group


def group_members(a, group):
    return {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{group}").json()["members"]}


def test_an_invited_user_who_joins_before_their_room_is_bound_is_joined(mx, hs, gk, pg, db_url):
    """carol, invited into alice's direct room with wally (so a group), gets
    a room of her own from the bot; her client joins it at once, but the
    answer to the bot's createRoom is lost, so the room is bound only when
    the bot tries again and finds it by its alias. Her join came while the
    room was bound to nothing: she is the group's member all the same
    (until the eighteenth session she stayed invited, so listed to the
    peer, and got nothing of the group). So is one whose join an older
    daemon took, found by the bot's look at members still invited."""
    a, srv = gk
    carol_uri, bot = "mimi://example.org/u/carol", "@_cw_bot:example.org"
    alice, room, hers, group = carol_joins_before_her_room_is_bound(
        hs, gk, pg, db_url, lambda group: group_members(a, group).get(carol_uri) == "joined", "carol a member")
    assert pg.psql("SELECT b.native_id FROM room_bindings b JOIN identities i ON i.id = b.local_identity_id "
                   "WHERE i.uri = 'mimi://example.org/u/carol'", db_url) == hers
    alice.send_text(room, "carol, are you there?")
    wait_until(lambda: any(e["type"] == "m.room.message" and e["sender"] == bot and
                           e["content"]["body"] == "alice: carol, are you there?" for e in hs.events(hers)),
               what="alice's message in carol's room")
    # A join an older daemon took (a rolling restart: it knows no invited
    # members) marked nothing: the bot asks the homeserver about members
    # still invited a minute after its last look.
    pg.psql("UPDATE room_members x SET membership = 'invited', updated_at = now() - interval '2 minutes' "
            "FROM identities i WHERE i.id = x.identity_id AND i.uri = 'mimi://example.org/u/carol'", db_url)
    wait_until(lambda: group_members(a, group).get(carol_uri) == "joined", timeout=15,
               what="carol's join found by the bot")


@pytest.mark.parametrize("renamed", [False, True])
def test_a_join_found_late_reaches_the_peer_once(mx, hs, gk, pg, db_url, renamed):
    """carol joins her room of the group before it is bound (the bot's
    createRoom answer lost, as above): the bot finds her join when it binds
    the room, and the peer gets it as the membership event a pushed join
    makes (until the nineteenth session the peer heard nothing: only the
    group's member list said joined). The bot's later look at members
    still invited finds the same join again: the peer still has it once
    (it is the same Matrix event, stored once). So also when her client
    set her display name right after joining: her member event then is a
    join after a join, which a transaction takes for a profile change."""
    a, srv = gk
    carol_uri = "mimi://example.org/u/carol"

    def joins(group):
        return [e for e in list(srv.events) if e.get("type") == "membership" and e["room_id"] == group
                and e["content"]["membership"] == "join" and e["sender"] == carol_uri]

    def stored():
        return pg.psql("SELECT count(*) FROM events e JOIN rooms r ON r.id = e.room_id JOIN identities i "
                       "ON i.id = e.sender_id WHERE e.type = 'membership' "
                       "AND e.content->'content'->>'membership' = 'join' "
                       f"AND r.public_id = '{group}' AND i.uri = '{carol_uri}'", db_url)
    alice, room, hers, group = carol_joins_before_her_room_is_bound(
        hs, gk, pg, db_url, joins, "carol's join at the peer",
        then=(lambda carol: carol.set_displayname("Carol C")) if renamed else None)
    [join] = joins(group)
    assert join["content"]["target"] == carol_uri and stored() == "1", (stored(), joins(group))

    def taken():
        m = metrics(mx, "causeway_matrix_events_total")
        return m['result="accepted"'] + m['result="ignored"']
    # The homeserver's transaction with her first join, again or late (a
    # transaction pushed after the bot's look): no change, nothing new is
    # stored or sent.  Renamed, it is another Matrix event than the one the
    # bot stored (her member event after the rename), and the peer got the
    # join twice (a flaky test showed it: the homeserver's push came late).
    [first] = [e for e in hs.events(hers) if e["type"] == "m.room.member" and e["state_key"] == "@carol:example.org"
               and e["content"]["membership"] == "join"
               and e["unsigned"].get("prev_content", {}).get("membership") != "join"]
    before = taken()
    assert as_put(mx, "late-first-join", {"events": [first]}).status_code == 200
    wait_until(lambda: taken() > before, what="the late transaction taken")
    assert stored() == "1"
    # The bot's look at members still invited (a join an older daemon took)
    # finds it once more: nothing new is stored or sent.
    before = taken()
    pg.psql("UPDATE room_members x SET membership = 'invited', updated_at = now() - interval '2 minutes' "
            "FROM identities i WHERE i.id = x.identity_id AND i.uri = 'mimi://example.org/u/carol'", db_url)
    wait_until(lambda: group_members(a, group).get(carol_uri) == "joined" and taken() > before, timeout=30,
               what="carol's join found again by the bot")
    assert stored() == "1"
    alice.send_text(room, "after the look")
    wait_until(lambda: any(e.get("type") == "message" and e["content"]["parts"][0]["body"] == "after the look"
                           for e in list(srv.events)), what="a later message at the peer")
    assert len(joins(group)) == 1, joins(group)


def test_a_join_found_late_and_pushed_at_once_reaches_the_peer_once(mx, hs, gk, pg, db_url):
    """The race under the test above, made certain: the bot's look stores
    carol's join found late (her member event after a rename), and the
    homeserver pushes her first join while that write waits (here on a
    lock on events).  Both read that no join of hers was stored, and both
    were written: two joins stored, the peer told twice (the test above
    failed so once in 27 runs under load).  Now the second read waits for
    the first write, and finds the join."""
    a, srv = gk
    carol_uri = "mimi://example.org/u/carol"
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi wally")
    srv.wait_events(1)
    carol = hs.as_user(hs.create_user("carol")[1])
    bot = "@_cw_bot:example.org"
    hers, locker = [], []

    def lose(method, path, user):
        if method == "POST" and path.endswith("/createRoom") and user == bot and not hers:
            hers.append(hs.rooms()[-1])
            hs.stop_pushing()  # her joins wait at the homeserver
            carol.join(hers[0])
            carol.set_displayname("Carol C")
            # the bot's write of the join it finds will wait on this lock
            locker.append(subprocess.Popen(["psql", db_url, "-qAtc", "BEGIN; LOCK TABLE events IN SHARE MODE; "
                                            "SELECT pg_sleep(120); COMMIT;"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_until(lambda: pg.psql("SELECT count(*) FROM pg_locks WHERE relation = 'events'::regclass "
                                       "AND mode = 'ShareLock' AND granted", db_url) == "1", what="the lock")
            return True
        return False

    def stored():
        return pg.psql("SELECT count(*) FROM events e JOIN rooms r ON r.id = e.room_id JOIN identities i "
                       "ON i.id = e.sender_id WHERE e.type = 'membership' "
                       "AND e.content->'content'->>'membership' = 'join' AND r.kind = 'group' "
                       f"AND i.uri = '{carol_uri}'", db_url)
    hs.lose_reply = lose
    try:
        alice.invite(room, "@carol:example.org")
        # the bot's look read that nothing is stored (and marked her
        # joined on the way), and its write waits
        wait_until(lambda: pg.psql("SELECT x.membership FROM room_members x JOIN identities i ON i.id = "
                                   f"x.identity_id JOIN rooms r ON r.id = x.room_id WHERE i.uri = '{carol_uri}' "
                                   "AND r.kind = 'group'", db_url) == "joined", timeout=30, what="the bot's look")
        pushed = len(hs.transactions)
        hs.resume_pushing()
        # the push's read, while that write waits: 1 s, well within the
        # 5 s a read waits for a write of the same join (JOIN_WAIT_MS)
        wait_until(lambda: len(hs.transactions) > pushed and hs.transactions[pushed]["attempts"],
                   what="the push sent")
        time.sleep(1.0)
    finally:
        hs.lose_reply = None
        hs.resume_pushing()
        pg.psql("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE relation = 'events'::regclass "
                "AND mode = 'ShareLock'", db_url)
        for p in locker:
            p.kill()
            p.wait()
    wait_until(lambda: all(t["done"] for t in hs.transactions), timeout=30, what="every push taken")
    wait_until(lambda: stored() != "0", timeout=30, what="carol's join stored")
    alice.send_text(room, "after the joins")
    wait_until(lambda: any(e.get("type") == "message" and e["content"]["parts"][0]["body"] == "after the joins"
                           for e in list(srv.events)), what="a later message at the peer")
    joins = [e for e in list(srv.events) if e.get("type") == "membership" and e["sender"] == carol_uri
             and e["content"]["membership"] == "join"]
    assert stored() == "1" and len(joins) == 1, (stored(), joins)



def wally_ruled_after_a_first_message(mx, hs, a, srv, rule):
    """alice writes "before the rule" to wally (delivered), then the
    operator puts rule (its scope and pattern: wally's domain) in force:
    alice, her room with wally's ghost, the ghost."""
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "before the rule")
    srv.wait_events(1)
    r = mx.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example", **rule})
    assert r.status_code == 201, r.text
    return alice, room, ghost


def test_a_message_that_goes_nowhere_is_told_to_its_writer(mx, hs, gk, pg, db_url):
    """A local user's message refused by this server's policy for every
    recipient is stored as dropped and answered 202 like any (the
    homeserver needs no more), but its writer is told in the room, by the
    ghost, that it was not delivered and why; so is one too large to
    carry.  A delivered one gets no notice."""
    a, srv = gk
    alice, room, ghost = wally_ruled_after_a_first_message(mx, hs, a, srv, {"mode": "deny"})
    alice.send_text(room, "after the rule")

    def notices():
        return ghost_notices(hs, room, ghost)
    wait_until(lambda: notices(), what="the notice")
    assert notices() == ["Not delivered: this server does not allow messages to their domain."], notices()
    assert pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                   "ORDER BY e.id DESC LIMIT 1", db_url) == "dropped"  # its content not kept
    alice.send_text(room, "x" * 20000)
    wait_until(lambda: len(notices()) == 2, what="the second notice")
    assert notices()[1].startswith("Not delivered: ") and "16384" in notices()[1], notices()
    all_said(hs, pg, db_url, outbox=True)
    assert len(srv.events) == 1 and len(notices()) == 2
    # A homeserver that fails the notice's send: the notice is kept
    # (matrix_notices) and sent again later, once.
    hs.refuse_send = lambda path: "/cwnotice-" in path
    alice.send_text(room, "y" * 20000)
    wait_until(lambda: pg.psql("SELECT tries FROM matrix_notices WHERE done_at IS NULL", db_url) == "1",
               what="a failed send")
    assert len(notices()) == 2
    hs.refuse_send = None
    wait_until(lambda: len(notices()) == 3, what="the notice, sent again")
    all_said(hs, pg, db_url)  # the row done, sent once
    assert len(notices()) == 3
    # Each names its refused event, kept once sent (so that a transaction
    # sent again tells it no more).
    assert pg.psql("SELECT count(DISTINCT event_id) FROM matrix_notices WHERE done_at IS NOT NULL", db_url) == "3"


@pytest.mark.parametrize("how", ["retried", "restarted"])
def test_a_refused_message_of_a_transaction_sent_again_is_told_once(make_daemon, db_url, hs, pg, how):
    """A transaction whose answer was lost is sent again (each event's
    unsigned.age changed, so the body differs: no answer from memory),
    its message refused before the pipeline (too long) again. Until the
    thirtieth session each sending made its notice: two "Not delivered"
    for one message, and so after a restart. The notice is keyed on the
    refused event's id now, and kept a while once sent."""
    d = start_mx(make_daemon, db_url, hs)
    a, srv = add_gk(d)
    try:
        alice, room, ghost = alice_writes_to_wally(hs, a)
        alice.send_text(room, "first")
        srv.wait_events(1)
        lost = []

        def lose_answer(txn):
            if txn["tries"] == 1 and any(e["type"] == "m.room.message" and e["sender"] == ALICE_MX and
                                         len(e["content"].get("body", "")) > 17000 for e in txn["events"]):
                lost.append(txn["txn_id"])
                if how == "restarted":
                    hs.stop_pushing()
                return True
            return False
        hs.lose_answer = lose_answer
        alice.send_text(room, "x" * 20000)
        wait_until(lambda: lost, what="the first answer lost")
        told = lambda: [n for n in ghost_notices(hs, room, ghost) if n.startswith("Not delivered")]  # noqa: E731
        wait_until(told, what="the notice")
        if how == "restarted":
            assert d.stop() == 0
            d.start()
            hs.resume_pushing()
        wait_until(lambda: any(t["txn_id"] == lost[0] and t["done"] for t in hs.transactions),
                   what="the transaction taken again")
        hs.lose_answer = None
        alice.send_text(room, "marker")
        wait_until(lambda: any(e["content"]["parts"][0]["body"] == "marker" for e in list(srv.events)),
                   what="a later message")
        assert len(told()) == 1, told()
    finally:
        srv.close()


def test_a_refused_kind_of_content_is_named_to_its_writer(mx, hs, gk, pg, db_url):
    """A rule's content_kinds may leave out "text" (the spec asks only for
    "allowed content kinds"): a local user's text refused by it is told
    as a text refused, not as files (until the thirty-ninth session every
    such refusal said "(files)")."""
    a, srv = gk
    alice, room, ghost = wally_ruled_after_a_first_message(mx, hs, a, srv, {"limits": {"content_kinds": ["media"]}})
    alice.send_text(room, "plain text")

    def notices():
        return ghost_notices(hs, room, ghost)
    wait_until(lambda: notices(), what="the notice")
    assert notices() == ["Not delivered: this server does not allow text messages to them."], notices()
    assert pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                   "ORDER BY e.id DESC LIMIT 1", db_url) == "dropped"
    assert [e["content"]["parts"][0]["body"] for e in list(srv.events) if e.get("type") == "message"] == \
        ["before the rule"]


def test_a_dead_letter_is_told_to_its_matrix_writer(make_daemon, db_url, hs, pg):
    """A message to a peer that stays down for the whole retry budget ends
    a dead letter; its writer hears it in the room, once, with what the
    operator can do.  Replayed and dead again, it is told again."""
    d = start_mx(make_daemon, db_url, hs,
                 dispatcher={"retry_budget": "2", "retry_base_ms": "20", "retry_max_ms": "50"})
    a, srv = add_gk(d)
    try:
        alice, room, ghost = alice_writes_to_wally(hs, a)
        srv.fail_next = 1000
        alice.send_text(room, "into the void")

        def notices():
            return [e["content"]["body"] for e in hs.events(room)
                    if e["sender"] == ghost and e["content"].get("msgtype") == "m.notice"]
        wait_until(lambda: notices(), timeout=20, what="the notice")
        assert notices() == ["Not delivered \u201cinto the void\u201d: gk could not be reached (2 tries over the "
                             "retry budget). The operator can send it again."], notices()
        row = d.admin("GET", "/outbox?state=dead").json()["rows"][0]
        assert pg.psql(f"SELECT sender_told_at IS NOT NULL FROM outbox WHERE id = {row['id']}", db_url) == "t"
        time.sleep(1.0)
        assert len(notices()) == 1  # once
        assert d.admin("POST", f"/outbox/{row['id']}/replay").status_code == 200
        wait_until(lambda: len(notices()) == 2, timeout=20, what="told again after a second death")
        srv.fail_next = 0
        assert d.admin("POST", f"/outbox/{row['id']}/replay").status_code == 200
        got = srv.wait_events(1)
        assert got[0]["content"]["parts"][0]["body"] == "into the void"
        # A dead letter of a peer's user has no one here to tell: the look
        # marks it told as it passes, or it would walk it every turn forever.
        tg = PeerClient(d.url, "tg", "tg.example")
        tg.token = d.admin("POST", "/peers", json={"name": "tg", "domain": "tg.example", "mode": "push",
                                                   "push_url": "https://127.0.0.1:9/v1", "public_key":
                                                   tg.signer.public_b64}).json()["token"]
        pp = a.create_room([a.user("wally"), tg.user("tom")]).json()["id"]
        assert a.send(pp, a.user("wally"), "to a peer that is down").status_code == 202
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'peer:tg' AND state = 'dead' "
                                   "AND sender_told_at IS NOT NULL", db_url) == "1",
                   timeout=20, what="the peer's dead letter passed over")
        assert len(notices()) == 2
    finally:
        srv.close()


def test_a_refused_as_token_holds_the_matrix_rows_until_it_is_taken(make_daemon, db_url, hs, pg):
    """The homeserver refuses the gateway's as_token (401 M_UNKNOWN_TOKEN:
    the registration changed, the token rotated on one side): the Matrix
    rows wait, untried and not counted, however long, and /readyz, GET
    /admin/v1/adapters and /metrics say so; once the homeserver takes the
    token again (the adapter asks it again, backing off), they are
    delivered in order, once.  Until the fifty-first session every row
    failed, spent its retry budget and went dead (here in well under a
    second)."""
    d = start_mx(make_daemon, db_url, hs,
                 dispatcher={"retry_budget": "2", "retry_base_ms": "20", "retry_max_ms": "50"})
    a, srv = add_gk(d)
    try:
        consent_alice(d)
        hs.create_user("alice")
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        ghost = "@_cw_gk_wally:example.org"

        def bodies():
            return [e["content"]["body"] for rid in hs.rooms() for e in hs.events(rid)
                    if e["type"] == "m.room.message" and e["sender"] == ghost]

        def health(view):
            body = (d.get("/readyz") if view == "readyz" else d.admin("GET", "/adapters")).json()
            return body["adapters"]["matrix"] if view == "readyz" else body["matrix"]
        assert a.send(room, a.user("wally"), "before").status_code == 202
        wait_until(lambda: bodies() == ["before"], timeout=20, what="the first delivery")
        wait_until(lambda: health("readyz")["ping"] == "ok", what="the ping")
        assert health("readyz")["delivery"] == "up"
        hs.registration["as_token"] = "rotated-on-the-homeserver"
        texts = [f"held {i}" for i in range(4)]
        for text in texts:
            assert a.send(room, a.user("wally"), text).status_code == 202
        wait_until(lambda: health("readyz")["delivery"] == "token_refused", timeout=20, what="the hold")
        time.sleep(3)  # the whole retry budget many times over
        rows = ("SELECT string_agg(o.state || ' ' || o.attempts, ',' ORDER BY o.id) FROM outbox o "
                "WHERE o.destination = 'matrix' AND o.id > (SELECT min(id) FROM outbox WHERE destination = 'matrix')")
        assert pg.psql(rows, db_url) == ",".join(["pending 0"] * 4)
        assert d.admin("GET", "/outbox?state=dead").json()["rows"] == []
        assert bodies() == ["before"]
        for view in ("readyz", "adapters"):
            h = health(view)
            assert h["delivery"] == "token_refused" and "M_UNKNOWN_TOKEN" in h["last_error"], h
            assert abs(h["token_refused_since_ms"] - time.time() * 1000) < 60000, h
        assert d.get("/readyz").status_code == 200  # not a readiness condition
        assert metrics_plain(d, "causeway_matrix_token_refused") == 1
        # asked again meanwhile, each refused
        checks = [r for r in hs.requests if r["path"].endswith("/account/whoami") and r["status"] == 401]
        assert len(checks) >= 1, checks
        hs.registration["as_token"] = AS_TOKEN  # the operator mends it
        wait_until(lambda: bodies() == ["before"] + texts, timeout=30, what="the held rows delivered")
        wait_until(lambda: health("adapters")["delivery"] == "up", what="the hold over")
        assert "token_refused_since_ms" not in health("readyz")
        assert metrics_plain(d, "causeway_matrix_token_refused") == 0
        wait_until(lambda: pg.psql(rows, db_url) == ",".join(["delivered 1"] * 4), what="the rows delivered")
        time.sleep(0.5)
        assert bodies() == ["before"] + texts  # once each
    finally:
        srv.close()


def test_a_refused_as_token_holds_the_bots_work_and_notices_until_it_is_taken(mx, hs, pg, db_url):
    """While the homeserver refuses the as_token, the bot's work waits as
    the Matrix rows do, untried and not counted: bob's invitation of the
    bot (an inbox row) and the bot's answer to alice's command (a queued
    notice) spend no tries meanwhile, and once the token is taken again
    bob gets the bot's help and alice her answer, once. Until the
    fifty-second session the inbox row spent its twelve tries (2 s, 4 s,
    ... some 40 minutes) and was given up, and the notice backed off to
    ten minutes a try."""
    bot = "@_cw_bot:example.org"
    alice, mgmt, said = alice_and_the_bot(hs)
    helps = len([t for t in said() if "Commands" in t])

    def delivery():
        return mx.get("/readyz").json()["adapters"]["matrix"]["delivery"]
    hs.registration["as_token"] = "rotated-on-the-homeserver"
    try:
        alice.send_text(mgmt, "help")
        wait_until(lambda: delivery() == "token_refused", timeout=20, what="the hold")
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_notices WHERE done_at IS NULL", db_url) == "1",
                   what="the answer queued")
        _, bob_token = hs.create_user("bob")
        bob = hs.as_user(bob_token)
        bob_room = bob.create_dm(bot)
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL "
                                   f"AND event->>'room_id' = '{bob_room}'", db_url) == "1", what="bob's invitation")
        # Tried at once and again 2 s later before (each try counted): two
        # tries of each.  Not longer: the ping's thread asks whether the
        # token is taken again 1 s, 3 s, 7 s, 15 s ... after the refusal,
        # and a later mending is found later (this slept 7 s until the
        # fifty-seventh session: the test took some 18 s, now some 5 s).
        time.sleep(2.5)
        assert pg.psql("SELECT attempts FROM matrix_bot_inbox WHERE handled_at IS NULL "
                       f"AND event->>'room_id' = '{bob_room}'", db_url) == "0"
        assert pg.psql("SELECT tries FROM matrix_notices WHERE done_at IS NULL", db_url) == "0"
        assert delivery() == "token_refused"
        assert len([t for t in said() if "Commands" in t]) == helps
    finally:
        hs.registration["as_token"] = AS_TOKEN  # the operator mends it
    wait_until(lambda: len([t for t in said() if "Commands" in t]) == helps + 1, timeout=30,
               what="alice's answer")
    bob_said = lambda: [e["content"]["body"] for e in hs.events(bob_room)  # noqa: E731
                        if e["type"] == "m.room.message" and e["sender"] == bot]
    wait_until(lambda: any("Commands" in t for t in bob_said()), timeout=30, what="bob's help")
    assert hs.members(bob_room).get(bot) == "join"
    assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms WHERE user_id = '@bob:example.org'", db_url) == bob_room
    wait_until(lambda: delivery() == "up", what="the hold over")
    time.sleep(0.5)
    assert len([t for t in said() if "Commands" in t]) == helps + 1
    assert len([t for t in bob_said() if "Commands" in t]) == 1


@pytest.mark.parametrize("lost", ["look", "commit"])
def test_a_dead_letter_whose_telling_lost_its_answer_is_told(make_daemon, db_url, hs, pg, lost):
    """The look that marks dead letters told ran and its answer was lost
    with the connection (a network cut), or the commit that keeps the mark
    did: the writer is told all the same, once.  The notice is queued in
    the transaction that marks the row, so a look whose answer was lost
    marked nothing and the next one tells, and a commit that ran kept the
    notice with the mark.  Until the twenty-third session the look marked
    the rows in a statement of its own, and a lost answer left them marked
    told and nobody telling."""
    with PgProxy(db_url) as px:
        d = start_mx(make_daemon, px.url, hs,
                     dispatcher={"retry_budget": "2", "retry_base_ms": "20", "retry_max_ms": "50"})
        a, srv = add_gk(d)
        try:
            alice, room, ghost = alice_writes_to_wally(hs, a)
            px.cut_answer(lost, lambda t: t == "cw_dead_untold")  # dispatcher_dead_stmts, prepared
            srv.fail_next = 1000
            alice.send_text(room, "into the void")

            def notices():
                return [e["content"]["body"] for e in hs.events(room)
                        if e["sender"] == ghost and e["content"].get("msgtype") == "m.notice"]
            wait_until(lambda: px.cuts == 1, timeout=20, what="the telling's answer lost")
            wait_until(lambda: notices(), timeout=20, what="the notice")
            wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE state = 'dead' AND sender_told_at IS NULL",
                                       db_url) == "0" and pg.psql("SELECT count(*) FROM matrix_notices", db_url) == "0",
                       timeout=20, what="told and the notice sent")
            assert len(notices()) == 1, notices()
        finally:
            srv.close()


def wally_sends_expiring(mx, hs, a, pg, db_url, in_ms=None):
    """wally (of the peer a) sends alice, who consented, a message expiring
    in ten minutes: (the neutral room, the answer, its time, the Matrix
    event), once delivered; with in_ms, its stored expiry is then brought
    to in_ms from now (as retention shortens one: content.expires).  A
    short expiry at sending could come before a slow first delivery (a
    ghost and a room to make, on a loaded machine), and the row expired
    undelivered (session 35)."""
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    soon = int(time.time() * 1000) + 600000
    r = a.send(room, a.user("wally"), "this disappears", content={
        "parts": [{"type": "text/plain", "body": "this disappears"}], "expires": soon})
    assert r.status_code == 202, r.text
    ghost = "@_cw_gk_wally:example.org"
    msg = wait_until(lambda: next((e for rid in hs.rooms() for e in hs.events(rid)
                                   if e["type"] == "m.room.message" and e["sender"] == ghost), None),
                     what="delivery")
    assert msg["content"]["body"] == "this disappears"
    if in_ms is not None:
        soon = int(time.time() * 1000) + in_ms
        pg.psql(f"UPDATE events SET content = jsonb_set(content, '{{content,expires}}', '{soon}') "
                f"WHERE public_id = '{r.json()['id']}'", db_url)
    return room, r, soon, msg


def test_an_expiring_message_is_taken_back_when_its_time_comes(mx, hs, gk, pg, db_url):
    """A peer's message with content.expires (a gatekeeper's disappearing
    message) reaches the room, and at its time the ghost redacts it and its
    stored content is deleted; one still held for consent at its time is
    never delivered, even once the user accepts."""
    a, _ = gk
    room, r, soon, msg = wally_sends_expiring(mx, hs, a, pg, db_url, 2500)
    ghost, mx_room = msg["sender"], msg["room_id"]
    # an edit of it: its stored text goes with the message's
    ed = {"type": "edit", "sender": a.user("wally"),
          "content": {"replaces": r.json()["id"], "parts": [{"type": "text/plain", "body": "this too"}]}}
    r_ed = a.call("POST", f"/v1/rooms/{room}/messages", ed, idem="exp-ed-1")
    assert r_ed.status_code == 202, r_ed.text
    red = wait_until(lambda: next((e for e in hs.events(mx_room) if e["type"] == "m.room.redaction"), None),
                     timeout=15, what="the redaction at its time")
    assert red["sender"] == ghost and red["redacts"] == msg["event_id"]
    assert red["origin_server_ts"] >= soon - 50
    assert pg.psql(f"SELECT content::text FROM events WHERE public_id = '{r.json()['id']}'", db_url) == "{}"
    assert pg.psql(f"SELECT content::text FROM events WHERE public_id = '{r_ed.json()['id']}'", db_url) == "{}"
    # Held for bob's consent past its time: expired, not delivered on accept.
    room2 = a.create_room([a.user("bob"), ALICE]).json()["id"]
    r2 = a.send(room2, a.user("bob"), "gone before you say yes", content={
        "parts": [{"type": "text/plain", "body": "gone before you say yes"}],
        "expires": int(time.time() * 1000) + 500})
    assert r2.status_code == 202, r2.text
    wait_until(lambda: pg.psql(f"SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                               f"WHERE e.public_id = '{r2.json()['id']}'", db_url) == "expired",
               timeout=15, what="expired while held")
    consent_alice(mx, "mimi://wa.example/u/bob")
    time.sleep(1.0)
    assert not any(e["type"] == "m.room.message" and e["content"].get("body") == "gone before you say yes"
                   for rid in hs.rooms() for e in hs.events(rid))
    st = a.call("GET", f"/v1/messages/{r2.json()['id']}").json()
    assert [x["status"] for x in st["recipients"]] == ["accepted"], st  # as any unseen one, for a week
    # Expired before it came: stored for the record, never shown, no
    # consent asked.
    r3 = a.send(room, a.user("wally"), "already gone", content={
        "parts": [{"type": "text/plain", "body": "already gone"}], "expires": int(time.time() * 1000) - 1000})
    assert r3.status_code == 202, r3.text
    assert pg.psql(f"SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{r3.json()['id']}'", db_url) == "expired"
    wait_until(lambda: pg.psql(f"SELECT content::text FROM events WHERE public_id = '{r3.json()['id']}'",
                               db_url) == "{}", what="its content deleted")
    assert not any(e["type"] == "m.room.message" and e["content"].get("body") == "already gone"
                   for e in hs.events(mx_room))


def edit_waiting(hs, pg, db_url, a, room, r, text, idem):
    """wally edits his message r (the answer of its sending) to text while
    the homeserver refuses sends (left refusing): the edit's answer, once
    its row has been tried and waits for its next try."""
    hs.refuse_send = lambda path: True
    ed = {"type": "edit", "sender": a.user("wally"),
          "content": {"replaces": r.json()["id"], "parts": [{"type": "text/plain", "body": text}]}}
    r_ed = a.call("POST", f"/v1/rooms/{room}/messages", ed, idem=idem)
    assert r_ed.status_code == 202, r_ed.text
    tried = (f"SELECT o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
             f"WHERE e.public_id = '{r_ed.json()['id']}' AND o.state = 'pending'")
    wait_until(lambda: int(pg.psql(tried, db_url) or 0) >= 1, what="the edit waiting for the homeserver")
    return r_ed


def test_an_edit_waiting_at_the_expiry_expires_with_its_message(make_daemon, db_url, hs, pg):
    """An edit of an expiring message still waiting for the homeserver at
    the message's time expires with it, and the message is redacted once
    the homeserver takes sends again (until the twenty-fourth session the
    edit's row stayed pending with its content erased, could not be made a
    Matrix event, and took the redaction's row down with it: the message
    stayed shown).  The message's time is set once the edit is seen
    waiting (failed, to be tried again), and the retries cannot run out
    before the sweep: until the thirty-first session the message expired
    8 s after it was sent, while the edit's 12 tries took 4.3-8.5 s (the
    suite's retry_max_ms), and under load the edit went dead first."""
    mx = start_mx(make_daemon, db_url, hs, dispatcher={"retry_budget": "1000"})
    a, srv = add_gk(mx)
    try:
        room, r, _, msg = wally_sends_expiring(mx, hs, a, pg, db_url)
        ghost, mx_room = msg["sender"], msg["room_id"]
        r_ed = edit_waiting(hs, pg, db_url, a, room, r, "edited, waiting", "exp-ed-wait")
        edit_row = (f"SELECT o.state, o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
                    f"WHERE e.public_id = '{r_ed.json()['id']}'")
        # Its time comes now (as retention shortens an expiry: the stored content.expires).
        pg.psql("UPDATE events SET content = jsonb_set(content, '{content,expires}', "
                "to_jsonb((extract(epoch FROM now()) * 1000)::bigint)) "
                f"WHERE public_id = '{r.json()['id']}'", db_url)
        wait_until(lambda: pg.psql(f"SELECT content::text FROM events WHERE public_id = '{r.json()['id']}'",
                                   db_url) == "{}", timeout=30, what="the message expired")
        # (a try claimed as the sweep began may still be under way: see the test below)
        wait_until(lambda: pg.psql(edit_row, db_url).split("|")[0] != "in_flight", what="no try under way")
        assert pg.psql(edit_row, db_url).split("|")[0] == "expired"
        assert pg.psql(f"SELECT content::text FROM events WHERE public_id = '{r_ed.json()['id']}'", db_url) == "{}"
        hs.refuse_send = None
        red = wait_until(lambda: next((e for e in hs.events(mx_room) if e["type"] == "m.room.redaction"), None),
                         timeout=60, what="the redaction once sends are taken")
        assert red["sender"] == ghost and red["redacts"] == msg["event_id"]
        assert not any("edited, waiting" in json.dumps(e.get("content")) for e in hs.events(mx_room))
        assert pg.psql("SELECT count(*) FROM outbox WHERE state = 'dead'", db_url) == "0"
    finally:
        srv.close()


def test_a_row_of_an_expired_message_left_waiting_is_expired_not_dead(make_daemon, db_url, hs, pg):
    """A row of an expired event left waiting, its content erased: what
    the race of the test below leaves when the process that had the try
    under way dies (its claim runs out and the row is taken back pending),
    or what any other way back to pending would. The state is made here
    directly: at its next claim the row is expired, with why, and nothing
    is sent. Until the thirty-fifth session the erased event could be made
    no Matrix event and the row went dead, a dead letter for the operator
    of a message that had simply expired."""
    mx = start_mx(make_daemon, db_url, hs)
    a, srv = add_gk(mx)
    try:
        room, r, _, msg = wally_sends_expiring(mx, hs, a, pg, db_url)
        r_ed = edit_waiting(hs, pg, db_url, a, room, r, "edited, waiting", "exp-ed-left")
        edit_row = (f"SELECT o.state || '|' || o.attempts || '|' || coalesce(o.last_error, '') FROM outbox o "
                    f"JOIN events e ON e.id = o.event_id WHERE e.public_id = '{r_ed.json()['id']}'")
        # What the sweep leaves when the edit's row was claimed as it ran.
        pg.psql("UPDATE events SET content = '{}'::jsonb, expired = true "
                f"WHERE public_id IN ('{r.json()['id']}', '{r_ed.json()['id']}')", db_url)
        hs.refuse_send = None
        state = wait_until(lambda: (lambda row: row if row.split("|")[0] not in ("pending", "in_flight") else None)(
            pg.psql(edit_row, db_url)), what="the edit's row claimed again and done with")
        assert state.split("|")[0] == "expired", state
        assert "expired before it was delivered" in state.split("|")[2], state
        assert pg.psql("SELECT count(*) FROM outbox WHERE state = 'dead'", db_url) == "0"
        assert not any("edited, waiting" in json.dumps(e.get("content")) for e in hs.events(msg["room_id"]))
        assert 'causeway_dispatch_rows_total{outcome="expired"} 1\n' in mx.get("/metrics").text
    finally:
        srv.close()


def claimed_under_the_sweep(hs, pg, db_url, room, expiring, claimed, hold):
    """The race of the expiry sweep and a claim, made certain: the message
    expiring (public id) comes due while a psql session holds its room's
    lock, so the sweep reads the rows on its snapshot and waits; then the
    row of claimed (public id, waiting for its next try an hour away) is
    made due and claimed, its send held by hold (the stand-in's refuse,
    which replaces refuse_send: sends refused until then keep the row
    waiting); the lock is let go. Returns once the sweep's statement has
    ended."""
    row = (f"SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
           f"WHERE e.public_id = '{claimed}' AND o.destination NOT LIKE 'peer:%'")
    tried = row.replace("o.state FROM", "o.attempts FROM") + " AND o.state = 'pending'"
    wait_until(lambda: int(pg.psql(tried, db_url) or 0) >= 1, what="the row waiting for its next try")
    # Its next try not before an hour (until the sweep has read the row pending).
    pg.psql("UPDATE outbox o SET next_attempt_at = now() + interval '1 hour' FROM events e "
            f"WHERE e.id = o.event_id AND e.public_id = '{claimed}' AND o.state = 'pending'", db_url)
    assert pg.psql(row, db_url) == "pending"
    rid = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{room}'", db_url)
    waiting = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1129796434 "
               f"AND objid = {int(rid) % 2147483647} AND objsubid = 2 AND NOT granted")
    held = HeldSession(db_url)
    try:
        held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, ({rid} % 2147483647)::int);")
        pg.psql("UPDATE events SET content = jsonb_set(content, '{content,expires}', "
                f"to_jsonb((extract(epoch FROM now()) * 1000)::bigint)) WHERE public_id = '{expiring}'", db_url)
        wait_until(lambda: pg.psql(waiting, db_url) == "1", what="the sweep waiting for the room's lock")
        hs.refuse, hs.refuse_send = hold, None  # hold alone decides the try's fate
        pg.psql("UPDATE outbox o SET next_attempt_at = now() FROM events e WHERE e.id = o.event_id "
                f"AND e.public_id = '{claimed}' AND o.state = 'pending'; NOTIFY causeway_outbox", db_url)
        wait_until(lambda: pg.psql(row, db_url) == "in_flight", what="the try under way")
    finally:
        held.end()  # commits: the sweep goes on
    wait_until(lambda: pg.psql(waiting, db_url) == "0", what="the sweep past the room's lock")
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                               "AND pid <> pg_backend_pid() AND query LIKE '%WITH due AS MATERIALIZED%'",
                               db_url) == "0", what="the sweep's statement ended")


def test_an_edit_whose_try_was_under_way_when_its_message_expired_expires(make_daemon, db_url, hs, pg):
    """The expiry sweep reads which rows are in flight as it starts, then
    waits for the locks of the rooms (here a psql session holds one, as a
    write of events in the room does): an edit's row the dispatcher claimed
    meanwhile (a retry, while the homeserver fails sends) was passed over
    as in flight, but the message's content and the edit's were erased and
    the message marked expired, and the try's failure made the row pending
    again: an edit of nothing, tried until it was dead, never expired (the
    test above failed so under load, session 35).  The sweep now finds the
    row it should have taken and did not: the message waits whole for the
    next sweep, which, the try failed, expires the row and takes the
    message back."""
    mx = start_mx(make_daemon, db_url, hs, dispatcher={"retry_budget": "1000"})
    a, srv = add_gk(mx)
    release = threading.Event()
    try:
        room, r, _, msg = wally_sends_expiring(mx, hs, a, pg, db_url)
        mx_room = msg["room_id"]
        r_ed = edit_waiting(hs, pg, db_url, a, room, r, "edited, racing", "exp-ed-race")
        edit_row = (f"SELECT o.state, o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
                    f"WHERE e.public_id = '{r_ed.json()['id']}'")
        state = lambda: pg.psql(edit_row, db_url).split("|")[0]  # noqa: E731

        def hold(method, path, user):  # the edit's next try: under way until released, then failed
            if "/send/m.room.message/" in path:
                release.wait(20)
                return True
            return False
        claimed_under_the_sweep(hs, pg, db_url, room, r.json()["id"], r_ed.json()["id"], hold)
        # Passed over by the sweep, the message kept whole for the next one.
        assert state() == "in_flight"
        assert pg.psql(f"SELECT content::text FROM events WHERE public_id = '{r.json()['id']}'", db_url) != "{}"
        release.set()  # the try fails: the next sweep takes it all back
        wait_until(lambda: pg.psql(f"SELECT content::text FROM events WHERE public_id = '{r.json()['id']}'",
                                   db_url) == "{}", what="the message taken back")
        assert state() == "expired", pg.psql(edit_row, db_url)
        hs.refuse = hs.refuse_send = None
        red = wait_until(lambda: next((e for e in hs.events(mx_room) if e["type"] == "m.room.redaction"), None),
                         what="the redaction once sends are taken")
        assert red["redacts"] == msg["event_id"]
        assert not any("edited, racing" in json.dumps(e.get("content")) for e in hs.events(mx_room))
        assert pg.psql("SELECT count(*) FROM outbox WHERE state = 'dead'", db_url) == "0"
    finally:
        release.set()
        hs.refuse = None
        srv.close()


def test_a_message_whose_raced_try_succeeds_is_taken_back_at_the_next_sweep(make_daemon, db_url, hs, pg):
    """wally's second expiring message waits for the homeserver; its time
    comes, and its row is claimed while the sweep waits for the room's lock
    (read pending on the sweep's snapshot). The sweep leaves it whole; the
    try succeeds; the next sweep finds it delivered and redacts it. Until
    the thirty-fifth session its content was erased under the try: shown
    after its time, and for good, as nothing found it again to take back
    (a review's finding, its probe this test)."""
    mx = start_mx(make_daemon, db_url, hs, dispatcher={"retry_budget": "1000"})
    a, srv = add_gk(mx)
    release = threading.Event()
    try:
        room, r, _, msg = wally_sends_expiring(mx, hs, a, pg, db_url)
        mx_room = msg["room_id"]
        hs.refuse_send = lambda path: True
        r2 = a.send(room, a.user("wally"), "SECRET raced", content={
            "parts": [{"type": "text/plain", "body": "SECRET raced"}], "expires": int(time.time() * 1000) + 600000})
        assert r2.status_code == 202, r2.text
        pid = r2.json()["id"]
        row = (f"SELECT o.state, o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
               f"WHERE e.public_id = '{pid}' AND o.destination NOT LIKE 'peer:%'")
        state = lambda: pg.psql(row, db_url).split("|")[0]  # noqa: E731

        def hold(method, path, user):  # the raced try: under way until released, then taken
            if "/send/m.room.message/" in path:
                release.wait(20)
            return False
        claimed_under_the_sweep(hs, pg, db_url, room, pid, pid, hold)
        assert state() == "in_flight"
        assert pg.psql(f"SELECT expired FROM events WHERE public_id = '{pid}'", db_url) == "f"
        release.set()
        wait_until(lambda: state() != "in_flight", what="the raced try's outcome")
        assert state() == "delivered", pg.psql(row, db_url)
        # What the homeserver took (its event may be redacted already: the
        # sweep runs every 200 ms here).
        sent = [q for q in hs.requests if "/send/m.room.message/" in q["path"] and q["status"] == 200
                and (q.get("body") or {}).get("body") == "SECRET raced"]
        assert len(sent) == 1, sent
        shown = sent[0]["answer"]["event_id"]
        red = wait_until(lambda: next((e for e in hs.events(mx_room) if e["type"] == "m.room.redaction"
                                       and e.get("redacts") == shown), None),
                         what="its redaction at the next sweep")
        assert red["sender"] == sent[0]["user"]
        assert pg.psql(f"SELECT expired, content::text FROM events WHERE public_id = '{pid}'", db_url) == "t|{}"
    finally:
        release.set()
        hs.refuse = hs.refuse_send = None
        srv.close()


def test_a_run_out_claim_of_an_expired_message_takes_no_later_message_down(make_daemon, db_url, hs, pg):
    """A row of an expired event in flight under a process that died on
    its last try (its budget spent): taken back, it is not dead and kills
    no later row of its room ("ran out of retries"); it is expired at its
    next claim, and the room's next, ordinary message is delivered. Until
    the thirty-fifth session the take-back ignored the expiry (a review's
    finding, its probe this test). The state is made directly."""
    mx = start_mx(make_daemon, db_url, hs, dispatcher={"retry_budget": "3"})
    a, srv = add_gk(mx)
    try:
        room, r, _, msg = wally_sends_expiring(mx, hs, a, pg, db_url)
        hs.refuse_send = lambda path: True
        r2 = a.send(room, a.user("wally"), "expiring two", content={
            "parts": [{"type": "text/plain", "body": "expiring two"}], "expires": int(time.time() * 1000) + 600000})
        r3 = a.send(room, a.user("wally"), "plain three")
        assert r2.status_code == 202 and r3.status_code == 202
        row = lambda pid: (f"SELECT o.state, o.attempts, coalesce(o.last_error, '') FROM outbox o "  # noqa: E731
                           f"JOIN events e ON e.id = o.event_id WHERE e.public_id = '{pid}' "
                           "AND o.destination NOT LIKE 'peer:%'")
        p2, p3 = r2.json()["id"], r3.json()["id"]
        wait_until(lambda: (lambda st, n, _e: st == "pending" and int(n) >= 1)(*pg.psql(row(p2), db_url).split("|")),
                   what="two waiting")
        pg.psql("BEGIN; UPDATE outbox o SET state = 'in_flight', claimed_by = 'dead-process', "
                "claimed_until = now() - interval '1 minute', attempts = 3 FROM events e "
                f"WHERE e.id = o.event_id AND e.public_id = '{p2}' AND o.destination NOT LIKE 'peer:%'; "
                f"UPDATE events SET content = '{{}}'::jsonb, expired = true WHERE public_id = '{p2}'; COMMIT", db_url)
        hs.refuse_send = None
        pg.psql("NOTIFY causeway_outbox", db_url)
        wait_until(lambda: pg.psql(row(p3), db_url).split("|")[0] in ("delivered", "dead"), timeout=60,
                   what="three's outcome")
        assert pg.psql(row(p3), db_url).split("|")[0] == "delivered", pg.psql(row(p3), db_url)
        two = wait_until(lambda: (lambda v: v if v.split("|")[0] not in ("pending", "in_flight") else None)(
            pg.psql(row(p2), db_url)), what="two done with")
        assert two.split("|")[0] == "expired", two
        assert pg.psql("SELECT count(*) FROM outbox WHERE state = 'dead'", db_url) == "0"
    finally:
        hs.refuse_send = None
        srv.close()


def test_an_edit_after_the_expiry_is_stored_expired_and_never_shown(mx, hs, gk, pg, db_url):
    """An edit sent after its message's expiry carries the message's new
    text: it is answered 202 as any edit, stored with its rows expired and
    its content deleted, and never shown, whether the sweep has taken the
    message back already or not yet (until the twenty-fourth session it was
    delivered, as an m.replace "* SECRET", and its text kept)."""
    a, _ = gk
    room, r, _, msg = wally_sends_expiring(mx, hs, a, pg, db_url, 2500)
    mx_room = msg["room_id"]
    wait_until(lambda: next((e for e in hs.events(mx_room) if e["type"] == "m.room.redaction"), None),
               timeout=15, what="the redaction at its time")
    content = "SELECT content::text FROM events WHERE public_id = '{}'"
    rows = ("SELECT string_agg(DISTINCT o.state, ',') FROM outbox o JOIN events e ON e.id = o.event_id "
            "WHERE e.public_id = '{}'")
    assert pg.psql(content.format(r.json()["id"]), db_url) == "{}"
    # expired and taken back, then one expired on arrival (the sweep may
    # not have come to it yet): an edit of either is expired as it comes
    r_old = a.send(room, a.user("wally"), "already gone", content={
        "parts": [{"type": "text/plain", "body": "already gone"}], "expires": int(time.time() * 1000) - 1000})
    assert r_old.status_code == 202, r_old.text
    for n, target in enumerate((r.json()["id"], r_old.json()["id"])):
        ed = {"type": "edit", "sender": a.user("wally"),
              "content": {"replaces": target, "parts": [{"type": "text/plain", "body": f"SECRET after expiry {n}"}]}}
        r_ed = a.call("POST", f"/v1/rooms/{room}/messages", ed, idem=f"exp-ed-late-{n}")
        assert r_ed.status_code == 202, r_ed.text
        assert pg.psql(rows.format(r_ed.json()["id"]), db_url) == "expired"
        assert pg.psql(content.format(r_ed.json()["id"]), db_url) == "{}"
    # a message after them is shown, they never are
    assert a.send(room, a.user("wally"), "after the edits").status_code == 202
    wait_until(lambda: any(e["type"] == "m.room.message" and e["content"].get("body") == "after the edits"
                           for e in hs.events(mx_room)), what="the next message")
    assert not any("SECRET" in json.dumps(e.get("content")) for e in hs.events(mx_room))


def test_users_met_before_the_adapter_move_to_it(make_daemon, db_url, hs, pg):
    """Messages that waited for an adapter (destination "local") are
    delivered once the Matrix adapter is configured."""
    d = make_daemon(db_url).start()
    client = PeerClient(d.url, "gk", "wa.example")
    r = d.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "mode": "pull",
                                       "public_key": client.signer.public_b64})
    client.token = r.json()["token"]
    consent_alice(d)
    room = client.create_room([client.user("wally"), ALICE]).json()["id"]
    assert client.send(room, client.user("wally"), "waiting for an adapter").status_code == 202
    wait_until(lambda: pg.psql("SELECT destination || ' ' || state FROM outbox", db_url) == "local pending",
               what="the waiting row")
    d.stop()
    hs.create_user("alice")
    port = free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    make_daemon(db_url, options={"server": {"port": str(port)},
                                 "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN,
                                            "hs_token": HS_TOKEN}}).start()
    wait_until(lambda: any(e["type"] == "m.room.message" and e["content"]["body"] == "waiting for an adapter"
                           for rid in hs.rooms() for e in hs.events(rid)), what="delivery after the move")
    assert pg.psql("SELECT DISTINCT network FROM identities WHERE is_local", db_url) == "matrix"


def test_a_bridged_room_turned_encrypted_gets_a_notice(mx, hs, gk, pg, db_url):
    _, mx_room, alice, ghost = wally_writes_to_alice(mx, hs, gk)
    alice.join(mx_room)
    alice.state(mx_room, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    wait_until(lambda: any(e["sender"] == ghost and e["content"].get("msgtype") == "m.notice" and
                           "end-to-end encrypted" in e["content"]["body"] for e in hs.events(mx_room)),
               what="the notice")


def test_a_groups_room_turned_encrypted_gets_the_bots_notice(mx, hs, gk, pg, db_url):
    """alice's room made a group (she invited a second ghost) has no one
    remote user to speak for: when she turns encryption on there, the bot
    says that what is written from now on will not reach the group.
    Before, nobody said anything, and her messages vanished."""
    a, _ = gk
    consent_alice(mx)
    consent_alice(mx, "mimi://wa.example/u/bob")
    a.create_room([a.user("bob"), "mimi://example.org/u/someone"])  # the peer introduced bob
    alice, room, _ = alice_writes_to_wally(hs, a)
    alice.invite(room, "@_cw_gk_bob:example.org")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "2", what="a group")
    wait_until(lambda: hs.members(room).get("@_cw_bot:example.org") == "join", what="the bot in")
    alice.state(room, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    wait_until(lambda: any(e["sender"] == "@_cw_bot:example.org" and e["content"].get("msgtype") == "m.notice"
                           and "group's room is now end-to-end encrypted" in e["content"].get("body", "")
                           for e in hs.events(room)), what="the bot's notice")


def test_a_queued_word_of_the_bot_in_a_groups_room_is_said_without_a_false_log_line(mx, hs, gk, pg, db_url):
    """The bot's word in a group's room (its notice that the room is now
    encrypted) which the homeserver did not take at once is queued and said
    by the bot's notices, which look first whether the room is a management
    room still hers alone (hers_alone): it is none, and the word is said.
    Until the fifty-third session's review that look logged "a command's
    answer is not said: the room is no management room now" for each such
    word, which was said; only a command's answer in a room that is no
    management room now logs it."""
    a, _ = gk
    bot = "@_cw_bot:example.org"
    consent_alice(mx)
    consent_alice(mx, "mimi://wa.example/u/bob")
    a.create_room([a.user("bob"), "mimi://example.org/u/someone"])  # the peer introduced bob
    alice, room, _ = alice_writes_to_wally(hs, a)
    alice.invite(room, "@_cw_gk_bob:example.org")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_portal_members", db_url) == "2", what="a group")
    wait_until(lambda: hs.members(room).get(bot) == "join", what="the bot in")
    refused = []

    def refuse(method, path, user):
        if not refused and method == "PUT" and "/send/m.room.message/" in path and user == bot:
            refused.append(path)
            return True
        return False

    start = len(mx.records)
    hs.refuse = refuse
    try:
        alice.state(room, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
        wait_until(lambda: any(e["sender"] == bot and "group's room is now end-to-end encrypted"
                               in e["content"].get("body", "") for e in hs.events(room)),
                   timeout=30, what="the bot's notice, said from the queue")
    finally:
        hs.refuse = None
    assert refused
    # marked done once its send was answered: the event can be seen first
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_notices WHERE room_id = '%s' AND done_at IS NOT NULL"
                               % room, db_url) == "1", what="the notice marked done")
    false_lines = [r for r in mx.records[start:] if r.get("msg", "").startswith("a command's answer is not said")]
    assert not false_lines, false_lines


def test_a_direct_room_encrypted_from_its_start_is_not_bridged_in_silence(mx, hs, gk, pg, db_url):
    """Clients on matrix-rust-sdk (Element X) make every direct room with
    m.room.encryption in its initial state: that event comes before any
    ghost is in the room, so no transaction carries it, and all alice
    writes is m.room.encrypted. The ghost, invited, says that the gateway
    cannot read the room and leaves it, nothing bound (before, it joined,
    the room was bound, and every message was dropped without a word)."""
    a, srv = gk
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])  # the peer introduced wally
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    ghost = "@_cw_gk_wally:example.org"
    room = alice.create_dm(ghost, initial_state=[{"type": "m.room.encryption",
                                                  "content": {"algorithm": "m.megolm.v1.aes-sha2"}}])
    wait_until(lambda: hs.members(room).get(ghost) == "leave", what="the ghost leaves")
    said = [e["content"]["body"] for e in hs.events(room) if e["sender"] == ghost and e["type"] == "m.room.message"]
    assert said and said[-1].startswith("This room is end-to-end encrypted"), said
    assert pg.psql("SELECT count(*) FROM room_bindings WHERE network = 'matrix'", db_url) == "0"
    # The same without encryption is bridged as before.
    room = alice.create_dm(ghost)
    wait_until(lambda: hs.members(room).get(ghost) == "join", what="the ghost joins")
    alice.send_text(room, "hi wally")
    got = srv.wait_events(1)
    assert got[0]["content"]["parts"][0]["body"] == "hi wally"


def test_a_retry_is_not_taken_for_sent_by_someone_elses_event(mx, hs, gk, pg, db_url):
    """A row tried before is looked for in the room by its outbox id: only
    among the ghost's own events. An event of alice's that carries the same
    key (a client that forwards or copies a message keeps its content;
    anyone may write any key) is not the row's event: before, the row
    counted as delivered and the ghost's message never came."""
    a, srv = gk
    consent_alice(mx)
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    a.send(room, a.user("wally"), "hello")
    mx_room = wait_until(lambda: next(iter(hs.rooms()), None), what="the direct room")
    alice.join(mx_room)
    ghost = "@_cw_gk_wally:example.org"
    refused, spoofed = [], threading.Event()

    def refuse(method, path, user):
        m = re.search(r"/send/m\.room\.message/cw-(\d+)$", path)
        if user == ghost and m and not spoofed.is_set():
            refused.append(int(m.group(1)))
            return True
        return False
    hs.refuse = refuse
    a.send(room, a.user("wally"), "second")
    wait_until(lambda: refused, what="a refused send")
    alice.send(mx_room, "m.room.message", {"msgtype": "m.text", "body": "quoting wally",
                                           "org.causeway.outbox_id": refused[0]})
    spoofed.set()
    wait_until(lambda: any(e["sender"] == ghost and e["type"] == "m.room.message" and
                           e["content"]["body"] == "second" for e in hs.events(mx_room)), what="the ghost's message")
    hs.refuse = None


def test_what_a_user_is_told_of_a_refused_event_is_in_their_words(mx, hs, gk, pg, db_url):
    """Alice edits and redacts wally's message (in Matrix she may: it is
    her room): neither reaches the peer, and she is told in plain words,
    not in the neutral API's ("content.replaces names a message of another
    sender", until the thirtieth session; the redaction was not told at
    all). Refusals before the pipeline are told for what the user writes
    (messages), not for a malformed reaction or an event whose shape is
    the homeserver's fault (origin_server_ts): until then every refused
    event of any type made a notice."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi")
    got = srv.wait_events(1)
    wally_msg = a.send(got[0]["room_id"], a.user("wally"), "from wally").json()["id"]
    theirs = wait_until(lambda: next((e["event_id"] for e in hs.events(room) if e["sender"] == ghost and
                                      e["content"].get("body") == "from wally"), None), what="wally's message")
    # its delivery recorded (the Matrix event id it got), not only sent: an
    # edit read before that names a message the gateway does not know yet
    # (the clean-clone run at load 22 was told so)
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id "
                               f"WHERE e.public_id = '{wally_msg}' AND o.state = 'delivered'", db_url) == "1",
               what="wally's message recorded delivered")
    alice.edit(room, theirs, "hacked")
    alice.redact(room, theirs)
    now = int(time.time() * 1000)
    odd = [{"event_id": "$oddreact", "room_id": room, "sender": ALICE_MX, "type": "m.reaction",
            "origin_server_ts": now, "content": {"m.relates_to": ["m.annotation", theirs, "x"]}},
           {"event_id": "$oddts", "room_id": room, "sender": ALICE_MX, "type": "m.room.message",
            "origin_server_ts": -5, "content": {"msgtype": "m.text", "body": "when?"}}]
    assert as_put(mx, "odd-shapes", {"events": odd}).status_code == 200
    alice.send_text(room, "marker")
    wait_until(lambda: any(e.get("type") == "message" and e["content"]["parts"][0]["body"] == "marker"
                           for e in list(srv.events)), what="the marker")
    told = lambda: [n for n in ghost_notices(hs, room, ghost) if n.startswith("Not delivered")]  # noqa: E731
    wait_until(lambda: len(told()) >= 2, what="two notices")
    all_said(hs, pg, db_url, outbox=True)
    assert told() == ["Not delivered: you can edit only your own messages.",
                      "Not delivered: you can delete only your own messages on the other side."], told()
    assert not [e for e in list(srv.events) if e.get("type") in ("edit", "delete", "reaction")]


def test_a_redaction_of_an_edit_deletes_nothing_at_the_peer_and_is_told(mx, hs, gk, pg, db_url):
    """Redacting an edit event withdraws that edit only (Matrix clients
    show the version before it); it has no neutral form (a delete names a
    message or a reaction), so it is refused and told to its writer
    (docs/interop-api.md). Until the thirty-ninth session the lookup, which
    lets an edit stand for the message it edits (a reply or a reaction
    naming the edit names the message), made it a delete of the whole
    message at the peer; and within one transaction a reply or a reaction
    naming an edit of that transaction went to the peer naming the edit,
    not the first version, and a redaction of it was refused untold."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    first = alice.send_text(room, "first")
    got = srv.wait_events(1)
    m1 = got[0]["id"]
    second = alice.edit(room, first, "second")
    srv.wait_events(2)
    alice.redact(room, second)
    # the same in one transaction: a message, its edit, a reply to and a
    # reaction to the edit, and the edit's redaction
    base = {"room_id": room, "sender": ALICE_MX, "origin_server_ts": int(time.time() * 1000)}
    evs = [dict(base, event_id="$rm2", type="m.room.message", content={"msgtype": "m.text", "body": "m2"}),
           dict(base, event_id="$re2", type="m.room.message",
                content={"msgtype": "m.text", "body": "* m2 edited", "m.new_content": {"msgtype": "m.text", "body": "m2 edited"},
                         "m.relates_to": {"rel_type": "m.replace", "event_id": "$rm2"}}),
           dict(base, event_id="$rp2", type="m.room.message",
                content={"msgtype": "m.text", "body": "a reply", "m.relates_to": {"m.in_reply_to": {"event_id": "$re2"}}}),
           dict(base, event_id="$rr2", type="m.reaction",
                content={"m.relates_to": {"rel_type": "m.annotation", "event_id": "$re2", "key": "x"}}),
           dict(base, event_id="$rx2", type="m.room.redaction", redacts="$re2", content={"redacts": "$re2"})]
    assert as_put(mx, "redact-an-edit", {"events": evs}).status_code == 200
    alice.send_text(room, "marker")
    wait_until(lambda: any(e.get("type") == "message" and e["content"]["parts"][0]["body"] == "marker"
                           for e in list(srv.events)), what="the marker")
    told = lambda: [n for n in ghost_notices(hs, room, ghost) if n.startswith("Not delivered")]  # noqa: E731
    wait_until(lambda: len(told()) >= 2, what="two notices")
    assert told() == [EDIT_REDACTED] * 2, told()
    got = list(srv.events)
    assert not [e for e in got if e["type"] == "delete"], got
    m2 = next(e["id"] for e in got if e["type"] == "message" and e["content"]["parts"][0]["body"] == "m2")
    reply = next(e for e in got if e["type"] == "message" and e["content"]["parts"][0]["body"] == "a reply")
    reaction = next(e for e in got if e["type"] == "reaction")
    assert reply["content"]["in_reply_to"] == m2 and reaction["content"]["in_reply_to"] == m2
    assert pg.psql("SELECT count(*) FROM events WHERE type = 'delete'", db_url) == "0"
    assert m1 != m2


EDIT_REDACTED = ("Not delivered: taking back an edit has no form on the other side, which still shows the "
                 "message as edited (delete the whole message to take it back there).")


def test_an_edit_of_an_edit_is_refused_and_told(mx, hs, gk, pg, db_url):
    """Matrix forbids an edit (m.replace) whose target is itself an edit,
    and its clients ignore one, showing the message as it was. The lookup
    lets an edit stand for its message, so until the fiftieth session such
    an edit went to the peer as an edit of the message: the peer showed the
    new text, Matrix the old. Now it is refused and told to its writer,
    whether the edit it names is stored or of the same transaction; a valid
    edit after it still goes."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    first = alice.send_text(room, "first")
    srv.wait_events(1)
    second = alice.edit(room, first, "second")
    srv.wait_events(2)
    base = {"room_id": room, "sender": ALICE_MX, "origin_server_ts": int(time.time() * 1000)}
    evs = [edit_ev(base, "$ee1", second, "edit of a stored edit"),
           text_ev(base, "$em2", "m2"), edit_ev(base, "$ee2", "$em2", "m2 edited"),
           edit_ev(base, "$ee3", "$ee2", "edit of an edit of this transaction"),
           edit_ev(base, "$ee4", first, "third")]
    assert as_put(mx, "edit-an-edit", {"events": evs}).status_code == 200
    told = lambda: [n for n in ghost_notices(hs, room, ghost) if n.startswith("Not delivered")]  # noqa: E731
    wait_until(lambda: len(told()) >= 2 and len(srv.events) >= 5, what="two notices and the valid events")
    assert told() == [EDIT_OF_EDIT] * 2, told()
    got = list(srv.events)
    bodies = [(e["type"], e["content"]["parts"][0]["body"]) for e in got]
    assert bodies == [("message", "first"), ("edit", "second"), ("message", "m2"), ("edit", "m2 edited"),
                      ("edit", "third")], bodies
    assert got[4]["content"]["replaces"] == got[0]["id"] and got[3]["content"]["replaces"] == got[2]["id"]
    assert pg.psql("SELECT count(*) FROM events WHERE origin_native_id IN ('$ee1', '$ee3')", db_url) == "0"


EDIT_OF_EDIT = ("Not delivered: an edit of an edit, which Matrix does not allow (its clients still show the "
                "message as it was): edit the message itself.")


def sticker_ev(base, eid, body, target=None):
    """A sticker of body, or with target its edit (an m.sticker with
    m.new_content and m.replace, the outer body the "* " fallback)."""
    sticker = {"body": body, "url": "mxc://example.org/st", "info": {"mimetype": "image/png"}}
    content = sticker if target is None else dict(sticker, body="* " + body, **{
        "m.new_content": sticker, "m.relates_to": {"rel_type": "m.replace", "event_id": target}})
    return dict(base, event_id=eid, type="m.sticker", content=content)


def test_a_stickers_edit_is_an_edit_at_the_peer(mx, hs, gk, pg, db_url):
    """A sticker's edit (m.sticker with m.replace: Matrix's rules of an
    edit are the same for every type) reaches the peer as an edit of the
    sticker. Until the fifty-third session it went as a second sticker,
    "[sticker: * Landing]", beside the first; an edit of a sticker never
    carried is told as a message's is, and a message's edit of a sticker
    (a sticker into a text) is an edit too."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    base = {"room_id": room, "sender": ALICE_MX, "origin_server_ts": int(time.time() * 1000)}
    evs = [sticker_ev(base, "$es1", "Take off"), sticker_ev(base, "$es2", "Landing", "$es1"),
           sticker_ev(base, "$es3", "Nowhere", "$never-carried"), edit_ev(base, "$es4", "$es1", "no sticker")]
    assert as_put(mx, "edit-a-sticker", {"events": evs}).status_code == 200
    told = lambda: [n for n in ghost_notices(hs, room, ghost) if n.startswith("Not delivered")]  # noqa: E731
    wait_until(lambda: len(told()) >= 1 and len(srv.events) >= 3, what="a notice and the valid events")
    all_said(hs, pg, db_url, outbox=True)
    assert told() == [EDIT_UNKNOWN], told()
    got = list(srv.events)
    assert [(e["type"], e["content"]["parts"][0]["body"]) for e in got] == [
        ("message", "[sticker: Take off]"), ("edit", "[sticker: Landing]"), ("edit", "no sticker")], got
    assert got[1]["content"]["replaces"] == got[0]["id"] and got[2]["content"]["replaces"] == got[0]["id"]


def poll_ev(base, eid, text, target=None):
    """Element's poll (org.matrix.msc3381.poll.start) of text, or with
    target its edit: an event of the poll's type holding m.new_content and
    the relation alone."""
    poll = {"org.matrix.msc3381.poll.start": {"kind": "org.matrix.msc3381.poll.disclosed", "max_selections": 1,
                                              "question": {"org.matrix.msc1767.text": text}, "answers": []},
            "org.matrix.msc1767.text": text}
    content = poll if target is None else {"m.new_content": poll,
                                           "m.relates_to": {"rel_type": "m.replace", "event_id": target}}
    return dict(base, event_id=eid, type="org.matrix.msc3381.poll.start", content=content)


def test_an_edit_of_a_poll_edit_is_refused_and_told(mx, hs, gk, pg, db_url):
    """Matrix's rules of an edit hold whatever its type: a poll's edit of
    a poll's edit is no edit its clients apply. Until the fifty-first
    session only an m.room.message was checked, and a poll's went to the
    peer as an edit of the poll: the peer showed the new question, Matrix
    the old. Now it is refused and told, as a message's is; and a poll's
    edit of a poll never carried is told as a message's is (before, it went
    untold)."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    base = {"room_id": room, "sender": ALICE_MX, "origin_server_ts": int(time.time() * 1000)}
    evs = [poll_ev(base, "$ep1", "Where?"), poll_ev(base, "$ep2", "Where, then?", "$ep1"),
           poll_ev(base, "$ep3", "Where now?", "$ep2"), edit_ev(base, "$ep4", "$ep2", "as a message"),
           poll_ev(base, "$ep5", "Here.", "$ep1"), poll_ev(base, "$ep6", "Nowhere?", "$never-carried")]
    assert as_put(mx, "edit-a-poll-edit", {"events": evs}).status_code == 200
    told = lambda: [n for n in ghost_notices(hs, room, ghost) if n.startswith("Not delivered")]  # noqa: E731
    wait_until(lambda: len(told()) >= 3 and len(srv.events) >= 3, what="three notices and the valid events")
    all_said(hs, pg, db_url, outbox=True)
    assert told() == [EDIT_OF_EDIT] * 2 + [EDIT_UNKNOWN], told()
    got = list(srv.events)
    assert [(e["type"], e["content"]["parts"][0]["body"]) for e in got] == [
        ("message", "Where?"), ("edit", "Where, then?"), ("edit", "Here.")], got
    assert got[1]["content"]["replaces"] == got[0]["id"] and got[2]["content"]["replaces"] == got[0]["id"]
    assert pg.psql("SELECT count(*) FROM events WHERE origin_native_id IN ('$ep3', '$ep4')", db_url) == "0"


def test_a_peers_reply_to_a_message_in_a_thread_goes_in_the_thread(mx, hs, gk, pg, db_url):
    """A reply belongs where what it answers is: Matrix puts a reply to an
    event in a thread in that thread (m.thread to the root, not a
    fallback, m.in_reply_to the event). The neutral reply names only the
    message; the adapter reads the thread of its Matrix event from the
    homeserver. Until the fiftieth session a peer's reply to a message in
    a thread went to the room's main timeline. A reply to a thread's root,
    or to a message in no thread, stays a plain reply."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    root = alice.send_text(room, "root")
    in_thread = alice.send(room, "m.room.message", {
        "msgtype": "m.text", "body": "in the thread",
        "m.relates_to": {"rel_type": "m.thread", "event_id": root, "is_falling_back": True,
                         "m.in_reply_to": {"event_id": root}}})
    got = srv.wait_events(2)
    conversation, m_root, m_thread = got[0]["room_id"], got[0]["id"], got[1]["id"]
    assert got[1]["content"]["in_reply_to"] == m_root, got[1]
    for k, (body, target) in enumerate((("to the thread", m_thread), ("to the root", m_root))):
        reply = {"type": "message", "sender": a.user("wally"),
                 "content": {"in_reply_to": target, "parts": [{"type": "text/plain", "body": body}]}}
        r = a.call("POST", f"/v1/rooms/{conversation}/messages", reply, idem=f"thread-{k}")
        assert r.status_code == 202, r.text

    def relation(body):
        evs = [e for e in hs.events(room) if e["sender"] == ghost and e["content"].get("body") == body]
        return evs[0]["content"].get("m.relates_to") if evs else None
    wait_until(lambda: relation("to the thread") and relation("to the root"), what="the ghost's replies")
    assert relation("to the thread") == {"rel_type": "m.thread", "event_id": root, "is_falling_back": False,
                                         "m.in_reply_to": {"event_id": in_thread}}, relation("to the thread")
    assert relation("to the root") == {"m.in_reply_to": {"event_id": root}}, relation("to the root")


def test_a_members_change_by_another_never_reaches_the_peer_whoever_else_the_transaction_names(
        mx, hs, gk, pg, db_url):
    """alice's invitation of carol into her direct room with wally, and her
    kick of dave, are the bot's to act on (it takes the invitation back and
    makes a group), never membership events of the direct room for the peer.
    Until the thirty-ninth session the member was looked up among every
    user the transaction named: when carol typed elsewhere, or dave wrote
    anywhere, in the same transaction, the peer got alice's invitation of
    carol into the direct room (carol stored as invited in it) and dave's
    leave of a room he was never in."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi")
    direct = srv.wait_events(1)[0]["room_id"]
    for who in ("carol", "dave"):
        assert mx.admin("POST", "/optins", json={"user": f"mimi://example.org/u/{who}", "network": "peer:gk",
                                                 "opted_in": True}).ok
    now = int(time.time() * 1000)
    base = {"room_id": room, "sender": ALICE_MX, "type": "m.room.member", "origin_server_ts": now}
    evs = [dict(base, event_id="$carol-invited", state_key="@carol:example.org", content={"membership": "invite"}),
           dict(base, event_id="$dave-kicked", state_key="@dave:example.org", content={"membership": "leave"},
                unsigned={"prev_content": {"membership": "join"}}),
           {"event_id": "$dave-elsewhere", "room_id": "!elsewhere:example.org", "sender": "@dave:example.org",
            "type": "m.room.message", "origin_server_ts": now, "content": {"msgtype": "m.text", "body": "x"}}]
    eph = [{"type": "m.typing", "room_id": "!elsewhere:example.org", "content": {"user_ids": ["@carol:example.org"]}}]
    assert as_put(mx, "others-members", {"events": evs, "ephemeral": eph}).status_code == 200
    alice.send_text(room, "marker")
    wait_until(lambda: any(e.get("type") == "message" and e["content"]["parts"][0]["body"] == "marker"
                           for e in list(srv.events)), what="the marker")
    assert not [e for e in list(srv.events) if e.get("type") == "membership"], list(srv.events)
    assert pg.psql("SELECT count(*) FROM events WHERE type = 'membership'", db_url) == "0"
    assert pg.psql(f"SELECT count(*) FROM room_members m JOIN rooms r ON r.id = m.room_id "
                   f"WHERE r.public_id = '{direct}'", db_url) == "2"


def test_a_peer_cannot_put_members_of_its_own_into_the_matrix_content(mx, hs, gk, pg, db_url):
    """No member of a peer's content goes into the Matrix content but what
    the mapping makes of the neutral ones: clients act on members in
    namespaces of their own (com.beeper.per_message_profile shows another
    name and avatar than the ghost's, past its "(peer)" suffix: a peer's
    user could pass for alice; com.beeper.linkpreviews a preview made up
    for any link; fi.mau.double_puppet_source is a mark bridges act on).
    Until the thirtieth session every namespaced member was copied but
    those of a blocklist (Matrix's own, Element's, the adapter's
    org.causeway.: a peer's org.causeway.part on a message made a retry of
    its row miss the event it had sent, and send it again).  Mentions never
    ping: m.mentions is empty whatever the peer wrote."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    r = a.call("POST", f"/v1/rooms/{room}/messages",
               {"type": "message", "sender": a.user("wally"),
                "content": {"parts": [{"type": "text/plain", "body": "@room marked @alice:example.org"}],
                            "org.causeway.part": 0, "org.example.mood": "fine",
                            "m.mentions": {"room": True, "user_ids": [ALICE_MX]},
                            "com.beeper.per_message_profile": {"id": "alice", "displayname": "alice",
                                                               "avatar_url": "mxc://example.org/aaa"},
                            "fi.mau.double_puppet_source": "x",
                            "com.beeper.linkpreviews": [{"matched_url": "https://bank.example",
                                                         "og:title": "Your bank"}]}}, idem="mark-1")
    assert r.status_code == 202, r.text
    ghost = "@_cw_gk_wally:example.org"
    [ev] = wait_until(lambda: [e for rid in hs.rooms() for e in hs.events(rid)
                               if e["sender"] == ghost and e["type"] == "m.room.message"], what="delivery")
    assert ev["content"]["body"] == "@room marked @alice:example.org", ev["content"]
    assert ev["content"]["org.causeway.outbox_id"] > 0, ev["content"]
    assert sorted(ev["content"]) == ["body", "m.mentions", "msgtype", "org.causeway.outbox_id"], ev["content"]
    assert ev["content"]["m.mentions"] == {}, ev["content"]


def test_a_poll_reaches_the_peer_as_its_text_fallback(mx, hs, gk, pg, db_url):
    """A poll (m.poll.start of Matrix 1.7, or Element's unstable
    org.matrix.msc3381.poll.start) carries a text fallback: it reaches the
    peer as a message of that text. Before, every event type without a
    mapping of its own was dropped in silence. A call invite (no text)
    still goes nowhere."""
    a, srv = gk
    consent_alice(mx)
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    a.send(room, a.user("wally"), "lunch?")
    mx_room = wait_until(lambda: next(iter(hs.rooms()), None), what="the direct room")
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings", db_url) == "1", what="the binding")
    alice.join(mx_room)
    alice.send(mx_room, "org.matrix.msc3381.poll.start", {
        "org.matrix.msc3381.poll.start": {"kind": "org.matrix.msc3381.poll.disclosed", "max_selections": 1,
                                          "question": {"org.matrix.msc1767.text": "Where?"},
                                          "answers": [{"id": "p", "org.matrix.msc1767.text": "Pizza"},
                                                      {"id": "s", "org.matrix.msc1767.text": "Sushi"}]},
        "org.matrix.msc1767.text": "Where?\n1. Pizza\n2. Sushi"})
    alice.send(mx_room, "m.call.invite", {"call_id": "c1", "version": "1", "lifetime": 60000,
                                          "offer": {"type": "offer", "sdp": "v=0"}})
    alice.send(mx_room, "m.poll.start", {
        "m.poll": {"kind": "m.disclosed", "max_selections": 1, "question": {"m.text": [{"body": "When?"}]},
                   "answers": [{"m.id": "n", "m.text": [{"body": "Noon"}]}]},
        "m.text": [{"mimetype": "text/html", "body": "<b>When?</b>"}, {"body": "When?\n1. Noon"}]})
    got = srv.wait_events(3)  # her joining, then the two polls
    assert [e["type"] for e in got] == ["membership", "message", "message"], got
    assert [e["content"]["parts"][0]["body"] for e in got[1:]] == ["Where?\n1. Pizza\n2. Sushi", "When?\n1. Noon"]
    time.sleep(1)
    assert len(srv.events) == 3
    # Element edits a poll with an event of its type holding m.new_content
    # and the relation alone: an edit of the poll's text (until the
    # forty-sixth session, having no text of its own, it was dropped in
    # silence and the peer kept the old question).
    [first] = [e["event_id"] for e in hs.events(mx_room) if e["type"] == "org.matrix.msc3381.poll.start"]
    alice.send(mx_room, "org.matrix.msc3381.poll.start", {
        "m.new_content": {"org.matrix.msc3381.poll.start": {
            "kind": "org.matrix.msc3381.poll.disclosed", "max_selections": 1,
            "question": {"org.matrix.msc1767.text": "Where, then?"},
            "answers": [{"id": "p", "org.matrix.msc1767.text": "Pizza"}]},
            "org.matrix.msc1767.text": "Where, then?\n1. Pizza"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": first}})
    edit = srv.wait_events(4)[3]
    assert edit["type"] == "edit" and edit["content"]["replaces"] == got[1]["id"], edit
    assert edit["content"]["parts"] == [{"type": "text/plain", "body": "Where, then?\n1. Pizza"}]


def test_typing_and_read_receipts_reach_the_peer(mx, hs, gk, pg, db_url):
    a, srv = gk
    consent_alice(mx)
    _, alice_token = hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    sent = a.send(room, a.user("wally"), "are you there?").json()["id"]
    ghost = "@_cw_gk_wally:example.org"
    mx_room = wait_until(lambda: next((rid for rid in hs.rooms() if any(
        e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="delivery")
    mx_event = next(e["event_id"] for e in hs.events(mx_room) if e["sender"] == ghost and
                    e["type"] == "m.room.message")
    alice = hs.as_user(alice_token)
    alice.join(mx_room)
    alice.typing(mx_room, True)
    alice.typing(mx_room, False)
    alice.read_receipt(mx_room, mx_event)
    got = [e for e in srv.wait_events(4) if e["type"] != "membership"]  # her joining comes first
    kinds = [(e["type"], e["content"].get("state") or e["content"].get("receipt")) for e in got]
    assert kinds == [("typing", "start"), ("typing", "stop"), ("receipt", "read")], kinds
    assert got[2]["content"]["in_reply_to"] == sent and all(e["sender"] == ALICE for e in got)


def test_typing_in_two_rooms_in_one_transaction_reaches_both(mx, hs, gk, pg, db_url):
    """alice starts typing in her rooms with wally and with vera, and
    stops in both, each pair in one transaction (the homeserver batches
    what came while its last one was in flight). Each room's typing
    reaches the peer: a typing event's key is its content, its transaction
    and its room. Until the fifty-first session it left the room out, and
    the second room's start (and stop) was taken for the first's, sent
    again, and dropped."""
    a, srv = gk
    consent_alice(mx)
    consent_alice(mx, "mimi://wa.example/u/vera")
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    rooms = {}
    for who in ("wally", "vera"):
        room = a.create_room([a.user(who), ALICE]).json()["id"]
        a.send(room, a.user(who), f"hi from {who}")
        ghost = f"@_cw_gk_{who}:example.org"
        mx_room = wait_until(lambda: next((rid for rid in hs.rooms() if any(
            e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="delivery")
        alice.join(mx_room)
        rooms[room] = mx_room
    wait_until(lambda: len([e for e in list(srv.events) if e["type"] == "membership"]) == 2, what="her joins")
    typing = lambda: sorted((e["room_id"], e["content"]["state"]) for e in list(srv.events)  # noqa: E731
                            if e["type"] == "typing")
    for state in (True, False):
        n = len(hs.transactions)
        hs.stop_pushing()
        for mx_room in rooms.values():
            alice.typing(mx_room, state)
        hs.resume_pushing()
        wait_until(lambda: len(hs.transactions) > n and all(t["done"] for t in hs.transactions[n:]),
                   what="the transaction taken")
        assert any(len(t["ephemeral"]) == 2 for t in hs.transactions[n:]), hs.transactions[n:]
    want = sorted((room, state) for room in rooms for state in ("start", "stop"))
    wait_until(lambda: typing() == want, what="both rooms' typing at the peer")


def test_a_typing_stop_lost_with_a_failed_transaction_is_not_forgotten(mx, hs, gk, pg, db_url):
    """m.typing says who types now; who stopped is who was in the list before.
    The list before is what the last durable transaction said: a transaction
    whose write fails does not move it.  Synapse keeps no ephemeral data for a
    retry, so the stop of the failed transaction is gone; the next m.typing
    of the room (someone else starts) then still tells the peer that alice
    stopped."""
    a, srv = gk
    consent_alice(mx)
    _, alice_token = hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    a.send(room, a.user("wally"), "are you there?")
    ghost = "@_cw_gk_wally:example.org"
    mx_room = wait_until(lambda: next((rid for rid in hs.rooms() if any(
        e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="delivery")
    alice = hs.as_user(alice_token)
    alice.join(mx_room)
    typing = lambda: [(e["sender"], e["content"]["state"]) for e in srv.events if e["type"] == "typing"]  # noqa: E731
    alice.typing(mx_room, True)
    wait_until(lambda: typing() == [(ALICE, "start")], what="alice's start at the peer")
    # The next write of a typing stop fails once (a sequence: not undone by the rollback).
    pg.psql("CREATE SEQUENCE test_fail_once; "
            "CREATE FUNCTION test_fail_stop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            " IF NEW.type = 'typing' AND NEW.content->'content'->>'state' = 'stop' "
            "  AND nextval('test_fail_once') = 1 THEN RAISE EXCEPTION 'injected failure'; END IF; "
            " RETURN NEW; END $$; "
            "CREATE TRIGGER test_fail_stop BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION test_fail_stop()",
            db_url)
    n_txn = len(hs.transactions)
    alice.typing(mx_room, False)
    wait_until(lambda: len(hs.transactions) > n_txn and all(t["done"] for t in hs.transactions[n_txn:]),
               what="the transaction taken after its retry")
    failed = [t for t in hs.transactions[n_txn:] if t["tries"] > 1]
    assert failed and failed[0]["attempts"][0]["status"] != 200, hs.transactions[n_txn:]
    assert pg.psql("SELECT last_value FROM test_fail_once", db_url) == "1"
    assert typing() == [(ALICE, "start")]  # the retry came without its ephemeral data
    # (someone else in the room types: the ghost; a local user invited
    # into alice's direct room would make it a group instead)
    hs.appservice(ghost).typing(mx_room, True)
    wait_until(lambda: typing() == [(ALICE, "start"), (ALICE, "stop")], what="alice's stop at the peer")


def test_a_local_user_leaving_reaches_the_peer(mx, hs, gk):
    a, srv = gk
    room, mx_room, alice, ghost = wally_writes_to_alice(mx, hs, gk)
    alice.join(mx_room)
    alice.leave(mx_room)
    got = srv.wait_events(2)
    kinds = [(e["type"], e["content"].get("membership")) for e in got]
    assert kinds == [("membership", "join"), ("membership", "leave")], kinds
    assert all(e["sender"] == ALICE and e["content"]["target"] == ALICE for e in got)
    # The room she left is no longer the conversation's: the ghost leaves it,
    # and wally's next message opens a new direct room with a new invite.
    wait_until(lambda: hs.members(mx_room).get(ghost) == "leave", what="the ghost leaving")
    a.send(room, a.user("wally"), "still there?")
    new_room = wait_until(lambda: next((rid for rid in hs.rooms() if rid != mx_room and any(
        e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="a new room")
    assert hs.members(new_room).get(ALICE_MX) == "invite"
    assert [e["content"]["body"] for e in hs.events(new_room) if e["type"] == "m.room.message"] == ["still there?"]
    assert [e["content"]["body"] for e in hs.events(mx_room) if e["type"] == "m.room.message"] == ["hello"]


def alice_joined_and_fails(mx, hs, gk, pg, db_url, table, op, times, when="true"):
    """wally wrote to alice, who joined the room; then the database refuses
    the first `times` statements that `op` (DELETE, INSERT) a row of
    `table` for which `when` holds (a BEFORE trigger; its sequence
    test_fail counts them). Returns wally_writes_to_alice's (room, Matrix
    room, her client, ghost)."""
    _, srv = gk
    room, mx_room, alice, ghost = wally_writes_to_alice(mx, hs, gk)
    alice.join(mx_room)
    srv.wait_events(1)
    row = "OLD" if op == "DELETE" else "NEW"
    pg.psql("CREATE SEQUENCE test_fail; "
            "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f" IF ({when}) AND nextval('test_fail') <= {times} THEN RAISE EXCEPTION 'injected failure'; END IF; "
            f" RETURN {row}; END $$; "
            f"CREATE TRIGGER test_fail BEFORE {op} ON {table} FOR EACH ROW EXECUTE FUNCTION test_fail()", db_url)
    return room, mx_room, alice, ghost


def new_room_of(hs, old, ghost, timeout=10):
    """The room other than old where ghost wrote, once there is one."""
    return wait_until(lambda: next((rid for rid in hs.rooms() if rid != old and any(
        e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), timeout=timeout,
        what="a new room")


def bodies(hs, room):
    return [e["content"]["body"] for e in hs.events(room) if e["type"] == "m.room.message"]


def test_a_leave_whose_unbinding_fails_is_tried_again(mx, hs, gk, pg, db_url):
    """alice leaves her direct room with wally, and the bot's unbinding of
    it fails once (the database refuses the statement: a lock or
    statement timeout, a failover).  The room stays bound while it does,
    and the ghost in it: the homeserver takes its sends, which she never
    sees.  Until the forty-sixth session the bot's work was marked done
    all the same, and wally's next messages went on into the room she left,
    for good; now it is tried again, as work the homeserver did not take
    is, and wally's next message opens a new room."""
    a, _ = gk
    room, mx_room, alice, ghost = alice_joined_and_fails(mx, hs, gk, pg, db_url, "room_bindings", "DELETE", 1)
    alice.leave(mx_room)
    wait_until(lambda: hs.members(mx_room).get(ghost) == "leave", timeout=20, what="the ghost leaving")
    assert int(pg.psql("SELECT last_value FROM test_fail", db_url)) >= 2
    assert "cannot unbind a room its user left" in mx.log()
    a.send(room, a.user("wally"), "still there?")
    new_room = new_room_of(hs, mx_room, ghost)
    assert hs.members(new_room).get(ALICE_MX) == "invite"
    assert bodies(hs, mx_room) == ["hello"]


def test_a_message_between_her_leave_and_its_unbinding_waits_for_a_new_room(mx, hs, gk, pg, db_url):
    """alice leaves her direct room with wally, and the bot's unbinding of
    it fails (tried again 2 s, then 4 s later) until the test lets it go:
    wally's message written meanwhile waits for the unbinding, then opens a
    new room with a new invitation. Until the forty-seventh session it went
    into the room she had left while the room was still bound (the bot's
    next round, milliseconds, or its retries, seconds), and she never saw
    it. (Until the forty-ninth session the unbinding failed twice and the
    test looked a second later, and at the row's state as soon as the
    homeserver had the message: on a loaded machine the look could come
    after the unbinding, and the state before the daemon recorded it.)"""
    a, _ = gk
    room, mx_room, alice, ghost = alice_joined_and_fails(mx, hs, gk, pg, db_url, "room_bindings", "DELETE", 1000)
    alice.leave(mx_room)
    wait_until(lambda: "cannot unbind a room its user left" in mx.log(), what="the first unbinding failing")
    sent = a.send(room, a.user("wally"), "are you there?").json()["id"]
    state = ("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
             f"WHERE e.public_id = '{sent}' AND o.destination = 'matrix'")

    def failures():
        return int(pg.psql("SELECT last_value FROM test_fail", db_url))
    # the row is tried (and waits) while the room is still bound: as long
    # as a try of the unbinding after the message (2 s or 4 s later)
    tried = failures()
    wait_until(lambda: failures() > tried, timeout=30, what="the unbinding failing again")
    assert pg.psql("SELECT count(*) FROM room_bindings", db_url) == "1"
    assert pg.psql(state, db_url) in ("pending", "in_flight")
    assert bodies(hs, mx_room) == ["hello"]
    pg.psql("DROP TRIGGER test_fail ON room_bindings", db_url)  # its next try goes through
    new_room = new_room_of(hs, mx_room, ghost, timeout=40)
    assert bodies(hs, new_room) == ["are you there?"]
    assert hs.members(new_room).get(ALICE_MX) == "invite"
    assert bodies(hs, mx_room) == ["hello"]
    wait_until(lambda: pg.psql(state, db_url) == "delivered", timeout=20, what="the row delivered")


def auto_explained(pg, db_url):
    """The test database's statements' plans logged by auto_explain as run,
    with the buffers each read: the PostgreSQL log's path."""
    name = db_url.split("?")[0].rsplit("/", 1)[1]
    for setting in ("session_preload_libraries = 'auto_explain'", "auto_explain.log_min_duration = 0",
                    "auto_explain.log_analyze = on", "auto_explain.log_buffers = on",
                    "auto_explain.log_timing = off"):
        pg.psql(f'ALTER DATABASE "{name}" SET {setting}')
    return os.path.join(pg.dir, "postgresql.log")


def inbox_backlog(pg, db_url, membership, prev, stats):
    """5,000 member events (membership, after prev) of 1,000 other rooms
    waiting in the bot's inbox for a retry, as after a homeserver outage;
    the inbox's statistics taken before they came (stats "stale": a
    backlog under autovacuum's threshold) or after ("fresh")."""
    pg.psql("ALTER TABLE matrix_bot_inbox SET (autovacuum_enabled = false); ANALYZE matrix_bot_inbox", db_url)
    # realistic pushes (about 600 bytes), 5 per room, not due
    pg.psql("INSERT INTO matrix_bot_inbox (event_id, event, attempts, not_before) "
            "SELECT '$backlog' || g, jsonb_build_object('type', 'm.room.member', "
            " 'room_id', '!room' || g % 1000 || ':example.org', 'sender', '@someone' || g || ':example.org', "
            " 'state_key', '@someone' || g || ':example.org', 'event_id', '$backlog' || g || repeat('x', 40), "
            f" 'origin_server_ts', 1765000000000 + g, 'content', jsonb_build_object('membership', '{membership}', "
            " 'displayname', 'Someone Number ' || g, 'avatar_url', 'mxc://example.org/' || repeat('a', 24)), "
            " 'unsigned', jsonb_build_object('age', 1234, 'replaces_state', '$prev' || g || repeat('y', 40), "
            f" 'prev_content', jsonb_build_object('membership', '{prev}', 'displayname', 'Someone Number ' || g))), "
            " 3, now() + interval '1 hour' FROM generate_series(1, 5000) g"
            + ("; ANALYZE matrix_bot_inbox" if stats == "fresh" else ""), db_url)


def plans_logged(log, start):
    """The plans auto_explain logged in log from its offset start on."""
    time.sleep(0.5)  # the log's last lines written
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        return f.read().split("plan:")


def reads_its_rooms_rows(plan, what):
    """plan (auto_explain's) read its room's inbox rows alone: under 100
    buffers, by matrix_bot_inbox_room_idx, not matrix_bot_inbox_due_idx."""
    top = re.search(r"Buffers: shared (?:hit=(\d+))? ?(?:read=(\d+))?", plan)
    read = sum(int(x) for x in top.groups() if x) if top else 0
    assert read < 100, (what, read, plan)
    assert "matrix_bot_inbox_due_idx" not in plan, (what, plan)
    assert "matrix_bot_inbox_room_idx" in plan, (what, plan)


@pytest.mark.parametrize("stats", ["stale", "fresh"])
def test_a_batchs_look_for_a_waiting_leave_reads_only_its_rooms_rows_whatever_the_inbox_backlog(
        make_daemon, pg, db_url, hs, stats):
    """A delivery batch's look for a leave of a row's Matrix room waiting
    in the bot's inbox (batch_info_sql's last column: the row then waits
    for the room's unbinding) probes that room alone, by
    matrix_bot_inbox_room_idx (053), however many leaves of other rooms
    wait for a retry (5,000, as after a homeserver outage), the inbox's
    statistics taken before they came (stale) or after (fresh): wally's
    message goes into alice's direct room amid them, and once her own
    leave waits among them (the bot's unbinding of the room fails until
    the test lets it go), his next one waits for a new room.  Until the
    fifty-seventh session each batch read every unhandled leave of the
    inbox and parsed its event (over 400 buffers here, thousands during
    an outage).  The batches' plans, logged by auto_explain as run, with
    the buffers each read."""
    log = auto_explained(pg, db_url)
    d = start_mx(make_daemon, db_url, hs)
    a, srv = add_gk(d)
    try:
        room, mx_room, alice, ghost = wally_writes_to_alice(d, hs, (a, srv))
        alice.join(mx_room)
        srv.wait_events(1)
        inbox_backlog(pg, db_url, "leave", "join", stats)
        start = os.path.getsize(log)
        a.send(room, a.user("wally"), "still there?")
        wait_until(lambda: bodies(hs, mx_room) == ["hello", "still there?"], timeout=20,
                   what="the message delivered amid the other rooms' leaves")
        pg.psql("CREATE SEQUENCE test_fail; "
                "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                " PERFORM nextval('test_fail'); RAISE EXCEPTION 'injected failure'; END $$; "
                "CREATE TRIGGER test_fail BEFORE DELETE ON room_bindings FOR EACH ROW EXECUTE FUNCTION test_fail()",
                db_url)
        alice.leave(mx_room)
        wait_until(lambda: "cannot unbind a room its user left" in d.log(), what="the first unbinding failing")
        sent = a.send(room, a.user("wally"), "are you there?").json()["id"]
        state = ("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                 f"WHERE e.public_id = '{sent}' AND o.destination = 'matrix'")

        def failures():
            return int(pg.psql("SELECT last_value FROM test_fail", db_url))
        tried = failures()  # the row is tried (and waits) until a try of the unbinding after it
        wait_until(lambda: failures() > tried, timeout=30, what="the unbinding failing again")
        assert pg.psql(state, db_url) in ("pending", "in_flight")
        assert bodies(hs, mx_room) == ["hello", "still there?"]
        pg.psql("DROP TRIGGER test_fail ON room_bindings", db_url)
        new_room = new_room_of(hs, mx_room, ghost, timeout=40)
        assert bodies(hs, new_room) == ["are you there?"]
        plans = [p for p in plans_logged(log, start) if "WITH ORDINALITY AS x(ev, tg, o, k)" in p]
        assert len(plans) >= 3, plans  # the delivered row's, the waiting row's at least once, the new room's
        for p in plans:
            reads_its_rooms_rows(p, "a batch's look")
    finally:
        srv.close()


def test_a_leave_whose_user_the_database_did_not_give_is_tried_again(mx, hs, gk, pg, db_url):
    """alice leaves her direct room with wally, and the bot's look-up of her
    identity fails once (a statement refused on a live connection: a lock
    or statement timeout). The leave is tried again, as an unbinding the
    database refused is, and wally's next message opens a new room. Until
    the forty-seventh session only a connection that was down was tried
    again: the leave was marked done, the room stayed bound, and wally's
    messages went on into the room she had left, for good."""
    a, _ = gk
    room, mx_room, alice, ghost = alice_joined_and_fails(mx, hs, gk, pg, db_url, "identity_bindings", "INSERT", 1,
                                                         when=f"NEW.native_id = '{ALICE_MX}'")
    alice.leave(mx_room)
    wait_until(lambda: hs.members(mx_room).get(ghost) == "leave", timeout=20, what="the ghost leaving")
    assert "a local Matrix user's identity not stored" in mx.log()
    assert int(pg.psql("SELECT last_value FROM test_fail", db_url)) >= 2
    a.send(room, a.user("wally"), "still there?")
    new_room = new_room_of(hs, mx_room, ghost)
    assert hs.members(new_room).get(ALICE_MX) == "invite"
    assert bodies(hs, mx_room) == ["hello"]


def test_a_leave_tried_again_of_someone_else_in_a_group_leaves_its_room_as_it_is(mx, hs, gk, pg, db_url):
    """bob, another user of this server, joins alice's room of wally's group
    by himself (she made it public), is not put out (the homeserver
    refuses the kick), and leaves; the bot's look-up of his identity at his
    leave fails once (a lock or statement timeout), and the leave is tried
    again. bob had no binding there and no management room: the room is
    alice's, bound, and stays as it is, the bot in it. Until the
    fifty-third session a leave tried again that found neither the
    leaver's management room nor a binding of his had the bot leave the
    room (meant for a management room forgotten on the first try), and
    alice's room of the group lost the bot."""
    a, _ = gk
    bot, bob, wally = "@_cw_bot:example.org", "@bob:example.org", "@_cw_gk_wally:example.org"
    group, alice, mine, said, _ = alice_in_wallys_group(mx, hs, gk, pg, db_url, [])
    wait_until(lambda: hs.members(mine).get(bot) == "join", what="the bot in alice's room of the group")
    pg.psql("CREATE SEQUENCE test_fail; "
            "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f" IF NEW.native_id = '{bob}' AND nextval('test_fail') <= 1 THEN RAISE EXCEPTION 'injected failure'; "
            " END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER test_fail BEFORE INSERT ON identity_bindings FOR EACH ROW EXECUTE FUNCTION test_fail()",
            db_url)
    hs.appservice().state(mine, "m.room.join_rules", {"join_rule": "public"})
    hs.refuse = lambda method, path, user: 403 if path.endswith("/kick") else False
    bob_client = hs.as_user(hs.create_user("bob")[1])
    bob_client.join(mine)
    wait_until(lambda: "a member cannot be put out of a bridged room" in mx.log(), what="bob's kick refused")
    hs.refuse = None
    bob_client.leave(mine)
    wait_until(lambda: "a local Matrix user's identity not stored" in mx.log(), what="his leave's first try failing")
    wait_until(lambda: int(pg.psql("SELECT last_value FROM test_fail", db_url)) >= 2, timeout=20,
               what="his leave tried again")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               what="his leave's work done")
    time.sleep(0.5)  # a leave of the bot's on its way
    assert hs.members(mine).get(bot) == "join", member_events(hs, mine, bot)
    assert pg.psql("SELECT count(*) FROM room_bindings WHERE network = 'matrix' AND native_id = "
                   f"'{mine}'", db_url) == "1"
    assert a.send(group, a.user("wally"), "still here").status_code == 202
    wait_until(lambda: (wally, "still here") in said(mine), what="the group going on in alice's room")


def test_a_remote_user_in_the_ghosts_prefix_is_no_ghost(mx, hs, gk, pg, db_url):
    """The ghosts' namespace is @_cw_...:<this server>: a user of another
    server whose name starts the same is nobody of the gateway's. Until the
    thirtieth session the server part was not looked at, and alice's
    invitation of @_cw_gk_wally:other.org into her room was taken for an
    invitation of the ghost; now it is one of another user (the room is
    her own view: taken back, and she is told why)."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "first")
    srv.wait_events(1)
    foreign = "@_cw_gk_wally:other.org"
    hs.remote_user(foreign)
    alice.invite(room, foreign)
    wait_until(lambda: any("own view" in e["content"].get("body", "") for e in hs.events(room)
                           if e["type"] == "m.room.message"), what="the notice that nobody else joins")
    assert hs.members(room).get(foreign) == "leave"


@pytest.mark.parametrize("name", ["_cw_bot", "_cw_gk_mallory"])
def test_a_peer_cannot_name_the_gateways_own_matrix_users(mx, hs, gk, pg, db_url, name):
    """mimi://example.org/u/_cw_bot is the gateway's bot on Matrix, and
    .../u/_cw_gk_mallory a ghost's name: no user of this server. Until the
    thirtieth session a peer could name them as a member, and only the
    policy stopped the room; now the Matrix adapter refuses them itself."""
    a, srv = gk
    hs.create_user("alice")
    target = f"mimi://example.org/u/{name}"
    r = a.call("POST", "/v1/rooms", {"kind": "direct", "members": [a.user("wally"), target]})
    assert r.status_code == 400 and r.json()["code"] == "invalid_body", r.text
    assert target in r.json()["detail"] and "namespace" in r.json()["detail"], r.text
    room = a.create_room([a.user("wally"), a.user("eve"), ALICE]).json()["id"]
    r = a.call("POST", f"/v1/rooms/{room}/members", {"add": [target]})
    assert r.status_code == 400 and target in r.json()["detail"], r.text
    # The admin API refuses them as well (until the thirty-first session
    # an opt-in or a consent made them users).
    r = mx.admin("POST", "/optins", json={"user": target, "network": "peer:gk", "opted_in": True})
    assert r.status_code == 400 and "namespace" in r.json()["detail"], r.text
    r = mx.admin("POST", "/consents", json={"user": target, "subject_kind": "domain", "subject": "wa.example",
                                            "state": "allowed"})
    assert r.status_code == 400 and "namespace" in r.json()["detail"], r.text
    # Nor do a peer's block, consent update or consent request (until the
    # forty-first session each made the name a local user of its own).
    wally = a.user("wally")
    for path, body in (("/v1/blocks", {"blocker": wally, "blocked": target, "action": "block"}),
                       ("/v1/consent/updates", {"user": wally, "target": target, "consent": "revoked"}),
                       ("/v1/consent/requests", {"requester": wally, "target": target}),
                       # nor is it a report's subject (until the forty-eighth session
                       # stored as a report against a user of this provider)
                       ("/v1/reports", {"reporter": wally, "subject": target, "reason": "spam"})):
        r = a.call("POST", path, body)
        assert r.status_code == 400 and r.json()["code"] == "invalid_body", (path, r.text)
        assert target in r.json()["detail"] and "namespace" in r.json()["detail"], (path, r.text)
    assert pg.psql(f"SELECT count(*) FROM identities WHERE localpart = '{name}'", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM blocks", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM reports", db_url) == "0"


def wally_writes_to_alice(mx, hs, gk):
    """wally writes "hello" to alice, who consented: (the peer's room, the
    Matrix room the ghost made, her client, the ghost), she invited."""
    a, _ = gk
    consent_alice(mx)
    _, alice_token = hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    a.send(room, a.user("wally"), "hello")
    ghost = "@_cw_gk_wally:example.org"
    mx_room = wait_until(lambda: next((rid for rid in hs.rooms() if any(
        e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="delivery")
    alice = hs.as_user(alice_token)
    return room, mx_room, alice, ghost


def wally_writes_and_alice_declines(mx, hs, gk):
    """wally writes to alice; she turns down the ghost's invitation to the
    room it made.  Returns the peer's room, the Matrix room, her client and
    the ghost."""
    room, mx_room, alice, ghost = wally_writes_to_alice(mx, hs, gk)
    assert hs.members(mx_room).get(ALICE_MX) == "invite"
    alice.leave(mx_room)  # declines
    return room, mx_room, alice, ghost


def test_a_declined_invitation_does_not_reach_the_peer(mx, hs, gk):
    """Alice turning down the ghost's invitation is her decision: the peer
    must not hear of it (to wally she is as silent as an unknown user), while
    a join, and a leave after it, still reach the peer."""
    a, srv = gk
    room, mx_room, alice, ghost = wally_writes_and_alice_declines(mx, hs, gk)
    leave = [e for e in hs.events(mx_room) if e["type"] == "m.room.member" and e["state_key"] == ALICE_MX][-1]
    assert leave["unsigned"]["prev_content"]["membership"] == "invite"
    # The room is given up as after any leave: the ghost goes, and wally's
    # next message opens a new room, which she joins this time.
    wait_until(lambda: hs.members(mx_room).get(ghost) == "leave", what="the ghost leaving")
    a.send(room, a.user("wally"), "still there?")
    new_room = wait_until(lambda: next((rid for rid in hs.rooms() if rid != mx_room and any(
        e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="a new room")
    alice.join(new_room)
    alice.leave(new_room)

    def memberships():
        return [e["content"]["membership"] for e in srv.events if e["type"] == "membership"]
    # (rows of one room reach the peer in order: had the decline gone out,
    # it would come before the join)
    wait_until(lambda: len(memberships()) >= 2, what="the join and the leave at the peer")
    assert memberships() == ["join", "leave"], srv.events


def test_a_declined_invitation_told_without_prev_content_does_not_reach_the_peer(mx, hs, gk):
    """The specification makes unsigned.prev_content optional (given "only
    if the client has access to the previous content"): a homeserver that
    leaves it out tells a decline from a leave after a join by nothing in
    the event.  Causeway decides from what it stored: alice had done
    nothing through her room with wally since it was bound (no join
    carried, nothing written), so her leave is not carried (a decline,
    which the peer must not learn, as when prev_content says so); in the
    next room, after her join was carried, her leave is.  Until the
    fortieth session a leave without prev_content was always carried, and
    the peer learned she declined."""
    a, srv = gk
    hs.strip_prev_content = True
    room, mx_room, alice, ghost = wally_writes_and_alice_declines(mx, hs, gk)
    decline = [e for e in hs.events(mx_room) if e["type"] == "m.room.member" and e["state_key"] == ALICE_MX][-1]
    # The room is given up as after any leave.
    wait_until(lambda: hs.members(mx_room).get(ghost) == "leave", what="the ghost leaving")
    pushed = [e for t in hs.transactions for e in t.get("pushed", []) if e["event_id"] == decline["event_id"]]
    assert pushed and all("prev_content" not in e["unsigned"] for e in pushed), pushed
    a.send(room, a.user("wally"), "still there?")
    new_room = wait_until(lambda: next((rid for rid in hs.rooms() if rid != mx_room and any(
        e["sender"] == ghost and e["type"] == "m.room.message" for e in hs.events(rid))), None), what="a new room")
    alice.join(new_room)

    def memberships():
        return [e["content"]["membership"] for e in list(srv.events) if e["type"] == "membership"]
    wait_until(lambda: memberships(), what="the join at the peer")
    alice.leave(new_room)
    # (rows of one room reach the peer in order: had the decline gone out,
    # it would come before the join)
    wait_until(lambda: len(memberships()) >= 2, what="the leave at the peer")
    assert memberships() == ["join", "leave"], srv.events


def test_a_groups_room_told_without_prev_content_is_read_with_her_group_membership(mx, hs, gk, pg, db_url):
    """In a group's room the membership Causeway knows of is the group's:
    alice, whom gk put into a group (invited), declines its room, told
    without prev_content: the peer hears nothing.  Put into a second
    group, she joins its room (a join after an invitation, carried) and
    leaves it (a leave after a join: she is the group's member, carried),
    both told without prev_content."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    consent_alice(mx)
    alice = hs.as_user(hs.create_user("alice")[1])
    hs.strip_prev_content = True

    def room_of(group_name):
        return next((rid for rid in hs.rooms() if hs.state(rid, "m.room.create")
                     and hs.state(rid, "m.room.create")["sender"] == bot
                     and (hs.state(rid, "m.room.name") or {}).get("content", {}).get("name") == group_name), None)

    def memberships():
        return [e["content"]["membership"] for e in list(srv.events) if e.get("type") == "membership"]
    first = a.create_room([a.user("wally"), ALICE], kind="group", name="One").json()["id"]
    assert group_members(a, first)[ALICE] == "invited"
    assert a.send(first, a.user("wally"), "hello").status_code == 202
    one = wait_until(lambda: room_of("One"), what="her room of the first group")
    alice.leave(one)  # declines
    decline = [e for e in hs.events(one) if e["type"] == "m.room.member" and e["state_key"] == ALICE_MX][-1]
    wait_until(lambda: pg.psql("SELECT handled_at IS NOT NULL FROM matrix_bot_inbox WHERE event_id = "
                               f"'{decline['event_id']}'", db_url) == "t", what="the bot's look at her decline")
    second = a.create_room([a.user("wally"), ALICE], kind="group", name="Two").json()["id"]
    assert a.send(second, a.user("wally"), "hi").status_code == 202
    two = wait_until(lambda: room_of("Two"), what="her room of the second group")
    alice.join(two)
    wait_until(lambda: group_members(a, second)[ALICE] == "joined", what="alice joined")
    wait_until(lambda: memberships(), what="her join at the peer")
    alice.leave(two)
    # (had the decline gone out, it would have come before the join: the
    # peer's rows of one provider go in order)
    wait_until(lambda: len(memberships()) >= 2, what="her leave at the peer")
    assert memberships() == ["join", "leave"], list(srv.events)
    assert group_members(a, first)[ALICE] == "invited"


def test_a_profile_change_told_without_prev_content_is_no_join(mx, hs, gk, pg, db_url):
    """alice renames herself in her direct room with wally, and the
    homeserver leaves unsigned.prev_content out: a join after nothing, as
    far as the event says.  She made the room and wrote there (her join
    came before the room was bound: the peer never got one), so the join
    is her profile change, not carried; and the bot, which looks at a join
    of a bridged room (someone uninvited is put out), leaves her, the
    room's own user, in.  Her leave later, without prev_content too, is a
    leave after a join (she wrote there), and carried.  Until the fortieth
    session the peer got a join for the rename."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi")
    srv.wait_events(1)
    hs.strip_prev_content = True
    eid = alice.state(room, "m.room.member", {"membership": "join", "displayname": "Alice B"}, state_key=ALICE_MX)
    wait_until(lambda: pg.psql(f"SELECT handled_at IS NOT NULL FROM matrix_bot_inbox WHERE event_id = '{eid}'",
                               db_url) == "t", what="the bot's look at the join")
    alice.send_text(room, "marker")
    wait_until(lambda: any(e.get("type") == "message" and e["content"]["parts"][0]["body"] == "marker"
                           for e in list(srv.events)), what="the marker")
    assert hs.members(room)[ALICE_MX] == "join"
    assert not [e for e in list(srv.events) if e.get("type") == "membership"], list(srv.events)
    assert pg.psql("SELECT count(*) FROM events WHERE type = 'membership'", db_url) == "0"
    alice.leave(room)
    wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "membership"], what="the leave at the peer")
    assert [e["content"]["membership"] for e in list(srv.events) if e.get("type") == "membership"] == ["leave"]


def test_a_notice_refused_for_good_is_not_tried_again(mx, hs, gk, pg, db_url):
    """A notice for a room that was unbound (its user left, the ghost went)
    gets 403 M_FORBIDDEN on every try: it is given up at once instead of
    being tried for a day.  A homeserver that fails for now is still tried
    again."""
    _, mx_room, alice, ghost = wally_writes_to_alice(mx, hs, gk)
    alice.join(mx_room)
    alice.leave(mx_room)
    wait_until(lambda: hs.members(mx_room).get(ghost) == "leave", what="the ghost leaving")
    assert pg.psql("SELECT count(*) FROM room_bindings", db_url) == "0"
    # (a dead letter told late, say: the room was bound when it was written)
    hs.refuse = lambda method, path, user: "elsewhere" in path
    pg.psql(f"INSERT INTO matrix_notices (room_id, body) VALUES ('{mx_room}', 'Not delivered.'), "
            "('!elsewhere:example.org', 'Not delivered.'); NOTIFY causeway_matrix_bot", db_url)

    def sends(where):
        return [r["status"] for r in hs.requests if r["method"] == "PUT" and where in r["path"] and
                "/send/m.room.message/cwnotice-" in r["path"]]
    unbound = mx_room.split(":")[0][1:]  # as it appears in the (escaped) path
    wait_until(lambda: sends(unbound) and sends("elsewhere"), what="both tried")
    assert sends(unbound)[0] == 403
    wait_until(lambda: pg.psql(f"SELECT count(*) FROM matrix_notices WHERE room_id = '{mx_room}'", db_url) == "0",
               what="the refused notice given up")
    assert pg.psql("SELECT tries > 0 FROM matrix_notices WHERE room_id = '!elsewhere:example.org'", db_url) == "t"
    # The other one's next try (due 2 s after its first) is a later turn
    # of the same look, which tried the refused one no more.
    wait_until(lambda: len(sends("elsewhere")) >= 2, what="the failing notice tried again")
    assert len(sends(unbound)) == 1
    assert pg.psql("SELECT count(*) FROM matrix_notices", db_url) == "1"


def test_references_within_one_delivery_batch(mx, hs, gk, pg, db_url):
    """A message, its edit and a reaction to it, held for consent and then
    released together, go out in one dispatcher batch: the Matrix event ids
    are recorded once per batch, so the edit and the reaction must find the
    id the homeserver gave the message earlier in the same batch. Each
    row's event id goes in the row version that records its delivery: a
    row is updated twice, by its claim and by its outcome (until the
    fifty-fourth session a third time, its event id first)."""
    a, _ = gk
    pg.psql("CREATE TABLE test_outbox_updates (n bigserial, id bigint, state text); "
            "CREATE FUNCTION test_outbox_update() RETURNS trigger LANGUAGE plpgsql AS "
            "$$BEGIN INSERT INTO test_outbox_updates (id, state) VALUES (NEW.id, NEW.state); RETURN NEW; END$$; "
            "CREATE TRIGGER test_outbox_update BEFORE UPDATE ON outbox FOR EACH ROW "
            "WHEN (NEW.destination = 'matrix') EXECUTE FUNCTION test_outbox_update()", db_url)
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    m1 = a.send(room, a.user("wally"), "original").json()["id"]
    ed = {"type": "edit", "sender": a.user("wally"),
          "content": {"replaces": m1, "parts": [{"type": "text/plain", "body": "edited"}]}}
    assert a.call("POST", f"/v1/rooms/{room}/messages", ed, idem="ed-1").status_code == 202
    re = {"type": "reaction", "sender": a.user("wally"),
          "content": {"in_reply_to": m1, "disposition": "reaction", "parts": [{"type": "text/plain", "body": "\u2764"}]}}
    assert a.call("POST", f"/v1/rooms/{room}/messages", re, idem="re-1").status_code == 202
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' AND state = 'held'",
                               db_url) == "3", what="three held rows")
    assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "domain", "subject": "wa.example",
                                               "state": "allowed"}).ok
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' AND state = 'delivered'",
                               db_url) == "3", what="three deliveries")
    # One batch: the three rows share one delivery attempt's start time.
    assert pg.psql("SELECT count(DISTINCT started_at) FROM delivery_attempts a JOIN outbox o ON o.id = a.outbox_id "
                   "WHERE o.destination = 'matrix'", db_url) == "1"
    ghost = "@_cw_gk_wally:example.org"
    # The first row made the ghost and the direct room; the later rows of
    # the batch used them, and made no second room.
    assert sum(1 for rid in hs.rooms() if any(e["sender"] == ghost for e in hs.events(rid))) == 1
    mx_room = next(rid for rid in hs.rooms() if any(e["sender"] == ghost and e["type"] == "m.room.message"
                                                    for e in hs.events(rid)))
    evs = [e for e in hs.events(mx_room) if e["sender"] == ghost and e["type"] in ("m.room.message", "m.reaction")]
    assert [e["type"] for e in evs] == ["m.room.message", "m.room.message", "m.reaction"], evs
    orig = evs[0]["event_id"]
    assert evs[1]["content"]["m.relates_to"] == {"rel_type": "m.replace", "event_id": orig}
    assert evs[1]["content"]["m.new_content"]["body"] == "edited"
    assert evs[2]["content"]["m.relates_to"]["event_id"] == orig
    # Every row got its Matrix event id, and the event its native id.
    rows = pg.psql("SELECT o.remote_id FROM outbox o WHERE o.destination = 'matrix' ORDER BY o.id", db_url).split()
    assert rows == [e["event_id"] for e in evs]
    assert pg.psql("SELECT count(*) FROM event_native_ids WHERE network = 'matrix' AND kind = 'event_id' "
                   f"AND native_id IN ('{orig}', '{evs[1]['event_id']}', '{evs[2]['event_id']}')", db_url) == "3"
    # Updates of the rows from their release on: claimed, then delivered
    # with its event id (none between, nor after).
    assert pg.psql("SELECT string_agg(u.state, ',' ORDER BY u.n) FROM test_outbox_updates u "
                   "JOIN outbox o ON o.id = u.id WHERE u.state <> 'held' AND u.state <> 'pending' "
                   "GROUP BY u.id ORDER BY u.id", db_url).split() == ["in_flight,delivered"] * 3


def test_a_reply_in_the_batch_of_its_message_names_each_users_own_event(mx, hs, gk, pg, db_url):
    """wally's message to a group of alice's and carol's (each her own room
    of it) and his reply to it, queued behind a slow send, go out in one
    dispatcher batch: the message's rows, then the reply's. The message's
    Matrix event ids are recorded only after the batch, so each reply finds
    the one the homeserver gave earlier in the same batch, in its own
    user's room: alice's reply names the message's event in her room,
    carol's the one in hers (an event of another room is no reference:
    Synapse refuses a relation to it)."""
    a, _ = gk
    bot, ghost, wally = "@_cw_bot:example.org", "@_cw_gk_wally:example.org", a.user("wally")
    carol_uri, carol_mx = "mimi://example.org/u/carol", "@carol:example.org"
    consent_alice(mx)
    assert mx.admin("POST", "/optins", json={"user": carol_uri, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": carol_uri, "subject_kind": "user", "subject": wally,
                                              "state": "allowed"}).ok
    hs.create_user("alice")
    hs.create_user("carol")
    gid = a.create_room([wally, ALICE, carol_uri], kind="group").json()["id"]
    assert a.send(gid, wally, "hello").status_code == 202

    def portal(user):
        return next((rid for rid in hs.rooms() if hs.state(rid, "m.room.create")
                     and hs.state(rid, "m.room.create")["sender"] == bot
                     and hs.members(rid).get(user) in ("invite", "join")), None)

    def said(rid, body):
        return next((e for e in hs.events(rid) if e["type"] == "m.room.message" and e["sender"] == ghost
                     and e["content"].get("body") == body), None)

    rooms = [wait_until(lambda u=u: portal(u), what=f"{u}'s room of the group") for u in (ALICE_MX, carol_mx)]
    assert rooms[0] != rooms[1]
    for rid in rooms:
        wait_until(lambda rid=rid: said(rid, "hello"), what="wally's first message")
    held, go = [], threading.Event()

    def held_first_send(user):
        if user == ghost and not held:
            held.append(time.time())
            go.wait(8)  # within the adapter's request timeout
        return 0

    # one send held holds the delivery while the message and its reply
    # are queued: the next batch takes them all
    hs.send_latency = held_first_send
    assert a.send(gid, wally, "before").status_code == 202
    wait_until(lambda: held, what="the held send")
    m1 = a.send(gid, wally, "the message").json()["id"]
    reply = {"type": "message", "sender": wally,
             "content": {"in_reply_to": m1, "parts": [{"type": "text/plain", "body": "the reply"}]}}
    r = a.call("POST", f"/v1/rooms/{gid}/messages", reply, idem="reply-1")
    assert r.status_code == 202, r.text
    r1 = r.json()["id"]
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id "
                               f"WHERE o.destination = 'matrix' AND e.public_id IN ('{m1}', '{r1}') "
                               "AND o.state = 'pending'", db_url) == "4", what="the four rows queued")
    go.set()
    for rid in rooms:
        answer = wait_until(lambda rid=rid: said(rid, "the reply"), what="the reply")
        assert answer["content"].get("m.relates_to") == \
            {"m.in_reply_to": {"event_id": said(rid, "the message")["event_id"]}}, (rid, answer)
    hs.send_latency = 0.0
    # One batch: the four rows share one delivery attempt's start time.
    # Their attempts are recorded after the batch's sends, so waited for:
    # the replies show in the rooms first (this session's first CI, at load
    # 20, read none).
    attempts = ("SELECT count(*) || ' ' || count(DISTINCT a.started_at) FROM delivery_attempts a "
                "JOIN outbox o ON o.id = a.outbox_id JOIN events e ON e.id = o.event_id "
                f"WHERE o.destination = 'matrix' AND e.public_id IN ('{m1}', '{r1}')")
    wait_until(lambda: pg.psql(attempts, db_url).startswith("4 "), what="the four rows' attempts recorded")
    assert pg.psql(attempts, db_url) == "4 1"


def test_a_reaction_whose_answer_was_lost_long_ago_keeps_its_event(mx, hs, gk, pg, db_url):
    """wally's reaction reaches Matrix, but the answer is lost; before its
    retry more than 50 events come into the room (the retry's look among
    the room's last 50 finds nothing) and the homeserver has forgotten
    the transaction id (Synapse keeps it half an hour), so the retry is
    refused as the annotation the room has (400 M_DUPLICATE_ANNOTATION).
    The row's event is the one there, asked of the relations API: taking
    the reaction back takes it away in Matrix. Until the forty-seventh
    session the row was delivered without an event, and the reaction
    stayed in the room after wally took it back."""
    a, _ = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    wally, ghost = a.user("wally"), "@_cw_gk_wally:example.org"
    m1 = a.send(room, wally, "react to me").json()["id"]
    target = wait_until(lambda: next((e["event_id"] for e in hs.events(mx_room) if e["type"] == "m.room.message"
                                      and e["content"]["body"] == "react to me"), None), what="the message")
    lost = []

    def lose(method, path, user):
        if method == "PUT" and "/send/m.reaction/" in path and not lost:
            lost.append(path)
            # while the answer is held: the ghost's notices, more than the
            # retry's look at the room's last 50, then the transaction ids
            # forgotten
            for k in range(60):
                hs.appservice(ghost).send(mx_room, "m.room.message", {"msgtype": "m.notice", "body": f"filler {k}"})
            hs.forget_txn_ids()
            return True
        return False
    hs.lose_reply = lose
    r = a.call("POST", f"/v1/rooms/{room}/messages", {"type": "reaction", "sender": wally, "content": {
        "in_reply_to": m1, "disposition": "reaction", "parts": [{"type": "text/plain", "body": "\U0001f44d"}]}},
        idem="thumb-lost")
    assert r.status_code == 202, r.text
    thumb = r.json()["id"]
    row = ("SELECT o.state || ' ' || coalesce(o.remote_id, '-') FROM outbox o JOIN events e ON e.id = o.event_id "
           f"WHERE o.destination = 'matrix' AND e.public_id = '{thumb}'")
    wait_until(lambda: pg.psql(row, db_url).startswith("delivered"), timeout=30, what="the reaction delivered")
    hs.lose_reply = None
    [shown] = [e for e in hs.events(mx_room) if e["type"] == "m.reaction"]
    assert shown["content"]["m.relates_to"]["event_id"] == target
    assert [(x["status"], x["lost"]) for x in hs.requests if x["path"] == lost[0]] == [(200, True), (400, False)]
    assert pg.psql(row, db_url) == "delivered " + shown["event_id"]
    d = a.call("POST", f"/v1/rooms/{room}/messages", {"type": "delete", "sender": wally,
                                                      "content": {"replaces": thumb}}, idem="unthumb-lost")
    assert d.status_code == 202, d.text
    wait_until(lambda: "redacted_because" in hs.event(shown["event_id"]).get("unsigned", {}),
               timeout=30, what="the reaction taken away")


def test_a_reaction_the_homeserver_has_already_holds_nothing_back(mx, hs, gk, pg, db_url):
    """wally reacts with the same emoji to his message twice (a peer may
    send a reaction again without taking the first back): Synapse refuses
    the second as one it has (400 M_DUPLICATE_ANNOTATION), on every try.
    The room shows the reaction already: the row is delivered, its event
    the one there (so that taking either reaction back takes it away), and
    the room's next message goes at once.  Until the forty-sixth session
    the row was tried again for its whole retry budget (some 18 minutes by
    default), the room's later rows waiting behind it, then dead.  Twice:
    the repeat in the first reaction's delivery batch, then in a later
    one."""
    a, _ = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    wally, ghost = a.user("wally"), "@_cw_gk_wally:example.org"
    m1 = a.send(room, wally, "react to me").json()["id"]
    target = wait_until(lambda: next((e["event_id"] for e in hs.events(mx_room) if e["type"] == "m.room.message"
                                      and e["content"]["body"] == "react to me"), None), what="the message")

    thumb = {"type": "reaction", "sender": wally, "content": {
        "in_reply_to": m1, "disposition": "reaction", "parts": [{"type": "text/plain", "body": "\U0001f44d"}]}}

    def react(idem, key="\U0001f44d"):
        r = a.call("POST", f"/v1/rooms/{room}/messages", dict(thumb, content=dict(
            thumb["content"], parts=[{"type": "text/plain", "body": key}])), idem=idem)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def shown():
        return [e for e in hs.events(mx_room) if e["type"] == "m.reaction" and "redacted_because" not in
                e.get("unsigned", {})]

    def told(text):
        a.send(room, wally, text)
        wait_until(lambda: any(e["type"] == "m.room.message" and e["content"]["body"] == text
                               for e in hs.events(mx_room)), timeout=10, what=f"{text!r}, at once")

    rows = ("SELECT string_agg(o.state || ' ' || o.attempts, ',' ORDER BY o.id) FROM outbox o "
            "JOIN events e ON e.id = o.event_id WHERE o.destination = 'matrix' AND e.type = 'reaction'")
    uri = a.call("GET", f"/v1/rooms/{room}").json()["uri"]
    r = a.call("POST", "/v1/batch", {"events": [{"idempotency_key": f"thumb-{i}", "room": uri, "event": thumb}
                                                 for i in (1, 2)]})
    assert r.status_code == 200 and all(x["status"] == "accepted" for x in r.json()["results"]), r.text
    first, again = (x["id"] for x in r.json()["results"])
    told("after the reactions")
    [one] = shown()
    assert (one["sender"], one["content"]["m.relates_to"]["event_id"], one["content"]["m.relates_to"]["key"]) == \
        (ghost, target, "\U0001f44d"), one
    wait_until(lambda: pg.psql(rows, db_url) == "delivered 1,delivered 1", what="both rows delivered")
    remote = ("SELECT o.remote_id FROM outbox o JOIN events e ON e.id = o.event_id "
              "WHERE o.destination = 'matrix' AND e.public_id = '{}'")
    assert pg.psql(remote.format(again), db_url) == pg.psql(remote.format(first), db_url) == one["event_id"]
    # wally takes the repeat back: the reaction goes in Matrix too.
    d = a.call("POST", f"/v1/rooms/{room}/messages", {"type": "delete", "sender": wally,
                                                      "content": {"replaces": again}}, idem="unthumb-2")
    assert d.status_code == 202, d.text
    wait_until(lambda: not shown(), what="the reaction taken away")
    # Once more, the first reaction in Matrix, the repeat in a later batch;
    # a heart as text, then as the emoji: one key in Matrix, the emoji's
    # (as Matrix clients send it: mx_reaction_key).
    third = react("heart-1", "\u2764")
    wait_until(lambda: len(shown()) == 1, what="the heart")
    assert shown()[0]["content"]["m.relates_to"]["key"] == "\u2764\ufe0f"
    fourth = react("heart-2", "\u2764\ufe0f")
    told("after the repeat")
    assert len(shown()) == 1
    # The outcome is recorded after the batch: the later message may be
    # shown before the repeat's row has its remote id.
    wait_until(lambda: pg.psql(remote.format(fourth), db_url) == pg.psql(remote.format(third), db_url)
               == shown()[0]["event_id"], what="the repeat's row recorded with the reaction's event")


def test_a_row_never_overtakes_a_held_one_of_its_room(mx, hs, gk, pg, db_url):
    """Per-room order holds against the held rows too: a later message to
    the same user that became due first (two consent sweeps at once, or a
    message decided just after the consent) waits for the earlier one."""
    a, _ = gk
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    first = a.send(room, a.user("wally"), "first").json()["id"]
    second = a.send(room, a.user("wally"), "second").json()["id"]
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' AND state = 'held'",
                               db_url) == "2", what="two held rows")
    # The second alone made due, as a racing sweep would.
    pg.psql("UPDATE outbox o SET state = 'pending' FROM events e WHERE e.id = o.event_id "
            f"AND e.public_id = '{second}'; NOTIFY causeway_outbox", db_url)
    time.sleep(1.5)
    assert pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{second}'", db_url) == "pending"
    assert not any(e["type"] == "m.room.message" for rid in hs.rooms() for e in hs.events(rid))
    assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user",
                                               "subject": "mimi://wa.example/u/wally", "state": "allowed"}).ok
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' AND state = 'delivered'",
                               db_url) == "2", what="both delivered")
    bodies = [e["content"]["body"] for rid in hs.rooms() for e in hs.events(rid) if e["type"] == "m.room.message"]
    assert bodies == ["first", "second"], (bodies, first)


def test_rooms_are_delivered_side_by_side_and_a_failing_one_holds_no_other(mx, hs, gk, pg, db_url):
    """The dispatcher delivers several rooms at once, each in order.  A room
    whose rows fail (here: the homeserver is unavailable to its sender's
    ghost; until the twenty-fifth session a ghost id too long for Matrix,
    now a dead letter at once) fails alone: the other room's rows, released
    in the same batch, are delivered on their first attempt."""
    a, _ = gk
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    hs.create_user("alice")
    failing_sender = a.user("zed")
    hs.refuse = lambda method, path, user: user == "@_cw_gk_zed:example.org"
    room_a = a.create_room([failing_sender, ALICE]).json()
    room_b = a.create_room([a.user("wally"), ALICE]).json()
    items = []
    for i in range(3):
        for room, sender, tag in ((room_a, failing_sender, "a"), (room_b, a.user("wally"), "b")):
            items.append({"idempotency_key": f"side-{tag}-{i}", "room": room["uri"],
                          "event": {"type": "message", "sender": sender,
                                    "content": {"parts": [{"type": "text/plain", "body": f"{tag}{i}"}]}}})
    r = a.call("POST", "/v1/batch", {"events": items})
    assert r.status_code == 200 and all(x["status"] == "accepted" for x in r.json()["results"]), r.text
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' AND state = 'held'",
                               db_url) == "6", what="six held rows")
    assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "domain", "subject": "wa.example",
                                               "state": "allowed"}).ok
    b_rows = ("SELECT {} FROM outbox o JOIN rooms r ON r.id = o.room_id WHERE o.destination = 'matrix' "
              "AND r.public_id = '{}'")
    wait_until(lambda: pg.psql(b_rows.format("count(*) FILTER (WHERE o.state = 'delivered')", room_b["id"]),
                               db_url) == "3", what="room b delivered")
    assert pg.psql(b_rows.format("max(o.attempts)", room_b["id"]), db_url) == "1"
    bodies = [e["content"]["body"] for rid in hs.rooms() for e in hs.events(rid) if e["type"] == "m.room.message"]
    assert bodies == ["b0", "b1", "b2"], bodies
    # Room a's first row failed and says why; its two later rows wait
    # behind it untried, their attempts not counted (until the
    # forty-third session they failed with it, each try an attempt).
    # None is delivered after a failed one.
    rows_a = b_rows.format("string_agg(o.state || ':' || (o.attempts > 0) || ':' || "
                           "coalesce(o.last_error LIKE '%503%', false), ' ' ORDER BY o.id)", room_a["id"])
    wait_until(lambda: pg.psql(rows_a, db_url) == "pending:true:true pending:false:false pending:false:false",
               what="room a's first row failed, its others waiting")
    assert pg.psql(b_rows.format("count(*) FILTER (WHERE o.state IN ('delivered', 'dead'))", room_a["id"]),
                   db_url) == "0"


def test_twenty_rooms_messages_go_to_the_homeserver_at_once(mx, hs, gk, pg, db_url):
    """A batch's rooms are sent to side by side, up to 64 at once: until the sixtieth session 16, and of a
    batch of 20 rooms the last four waited for the first sixteen's sends (docs/performance.md, "Sixtieth
    session").  Each room's first message makes its room and ghost; the second round, one message a room in
    one claim, is sent with the homeserver answering each after 1.5 s: every send starts before any is
    answered."""
    a, _ = gk
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "domain", "subject": "wa.example",
                                               "state": "allowed"}).ok
    hs.create_user("alice")
    rooms = [a.create_room([a.user(f"w{k:02d}"), ALICE]).json() for k in range(20)]

    def send_round(tag):
        items = [{"idempotency_key": f"twenty-{tag}-{k}", "room": room["uri"],
                  "event": {"type": "message", "sender": a.user(f"w{k:02d}"),
                            "content": {"parts": [{"type": "text/plain", "body": f"{tag}{k}"}]}}}
                 for k, room in enumerate(rooms)]
        r = a.call("POST", "/v1/batch", {"events": items})
        assert r.status_code == 200 and all(x["status"] == "accepted" for x in r.json()["results"]), r.text

    delivered = "SELECT count(*) FROM outbox WHERE destination = 'matrix' AND state = 'delivered'"
    send_round("first")
    wait_until(lambda: pg.psql(delivered, db_url) == "20", timeout=30, what="the first round delivered")
    started = {}

    def latency(user):
        started.setdefault(user, time.monotonic())
        return 1.5

    hs.send_latency = latency
    send_round("second")
    wait_until(lambda: pg.psql(delivered, db_url) == "40", timeout=60, what="the second round delivered")
    assert len(started) == 20, started
    spread = max(started.values()) - min(started.values())
    assert spread < 1.0, f"the last room's send started {spread:.2f} s after the first's"
    bodies = [e["content"]["body"] for rid in hs.rooms() for e in hs.events(rid) if e["type"] == "m.room.message"]
    assert sorted(bodies) == sorted([f"first{k}" for k in range(20)] + [f"second{k}" for k in range(20)])


def broken_then_after_it(d, a, hs, pg, db_url):
    """wally (of the peer a) writes "broken", then "after it", to alice, who
    opted in but has not consented yet: the two messages' ids, once both
    rows are held."""
    assert d.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    ids = []
    for text in ("broken", "after it"):
        r = a.send(room, a.user("wally"), text)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' AND state = 'held'",
                               db_url) == "2", what="two held rows")
    return ids


def wait_for_after_it(hs):
    ghost = "@_cw_gk_wally:example.org"
    wait_until(lambda: any(e["sender"] == ghost and e["type"] == "m.room.message"
                           and e["content"]["body"] == "after it" for rid in hs.rooms() for e in hs.events(rid)),
               timeout=20, what="the next row delivered")


def test_a_row_no_matrix_event_can_be_made_of_is_dead_at_once(make_daemon, db_url, hs, pg):
    """A row that cannot be made into a Matrix event (here: its stored
    event lost its type and content) is a dead letter at once, its reason
    recorded, no retry (none could help), and the room's next row is
    delivered after it.  Until the twenty-fourth session it failed as a
    homeserver that is down does: it held the room's later rows, and once
    its retries were spent they were dead with it."""
    d = start_mx(make_daemon, db_url, hs,
                 dispatcher={"retry_budget": "2", "retry_base_ms": "20", "retry_max_ms": "50"})
    a, srv = add_gk(d)
    try:
        bad, _ = broken_then_after_it(d, a, hs, pg, db_url)
        pg.psql(f"UPDATE events SET content = '{{}}' WHERE public_id = '{bad}'", db_url)
        assert d.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user",
                                                  "subject": "mimi://wa.example/u/wally", "state": "allowed"}).ok
        wait_for_after_it(hs)
        row = (f"SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
               f"WHERE e.public_id = '{bad}' AND o.destination = 'matrix'")
        # the states are recorded once the whole batch is sent: after its last message arrived
        wait_until(lambda: pg.psql(row, db_url).split(" ")[0] != "in_flight" and pg.psql(row, db_url) != "pending 0",
                   what="the row's outcome")
        assert pg.psql(row, db_url) == "dead 1"
        dead = d.admin("GET", "/outbox?state=dead").json()["rows"]
        assert len(dead) == 1 and "not representable in Matrix" in dead[0]["last_error"], dead
        st = a.call("GET", f"/v1/messages/{bad}").json()
        assert [x["status"] for x in st["recipients"]] == ["not_delivered"], st
        # (not told in the chat: the notice would say the peer could not be
        # reached and a replay may help; the operator discards it)
        assert d.admin("POST", f"/outbox/{dead[0]['id']}/discard").json() == {"id": dead[0]["id"],
                                                                               "state": "dropped"}
    finally:
        srv.close()


# A row whose own facts no retry changes (docs/matrix.md): what is done to
# the database between its writing and its delivery, what its dead letter
# says.  Both rows go due in one statement, as one batch.
UNDELIVERABLE = {
    "no-local-user": (
        "UPDATE outbox SET target_identity_id = NULL WHERE id = {bad}",
        "a Matrix row names no local user"),
    "invalid-matrix-id": (
        "INSERT INTO identities (uri, domain, localpart, is_local, network) SELECT 'mimi://example.org/u/someone', "
        " domain, 'someone', true, network FROM identities WHERE uri = '" + ALICE + "'; "
        "INSERT INTO identity_bindings (identity_id, network, native_id) SELECT id, 'matrix', '@someone' "
        " FROM identities WHERE uri = 'mimi://example.org/u/someone'; "
        "UPDATE outbox SET target_identity_id = (SELECT id FROM identities "
        " WHERE uri = 'mimi://example.org/u/someone') WHERE id = {bad}",
        "the local user @someone has no valid Matrix id"),
    "matrix-id-too-long": (
        "INSERT INTO identities (uri, domain, localpart, is_local, network) SELECT 'mimi://example.org/u/someone', "
        " domain, 'someone', true, network FROM identities WHERE uri = '" + ALICE + "'; "
        "INSERT INTO identity_bindings (identity_id, network, native_id) SELECT id, 'matrix', "
        " '@' || repeat('s', 300) || ':example.org' FROM identities WHERE uri = 'mimi://example.org/u/someone'; "
        "UPDATE outbox SET target_identity_id = (SELECT id FROM identities "
        " WHERE uri = 'mimi://example.org/u/someone') WHERE id = {bad}",
        "the local user's Matrix id would be longer than 255 bytes"),
    "ghost-id-too-long": (
        "INSERT INTO identities (uri, domain, localpart, is_local, network, peer_id) "
        " SELECT 'mimi://wa.example/u/' || repeat('x', 300), domain, repeat('x', 300), false, network, peer_id "
        " FROM identities WHERE uri = 'mimi://wa.example/u/wally'; "
        "UPDATE events SET sender_id = (SELECT id FROM identities WHERE uri = 'mimi://wa.example/u/' || repeat('x', 300)) "
        " WHERE id = (SELECT event_id FROM outbox WHERE id = {bad})",
        "has no Matrix ghost id (too long)"),
    "attachment": (
        "UPDATE events SET content = jsonb_set(content, '{{content,attachments}}', '[{{\"url\": "
        " \"http://files.wa.example/a\"}}, {{\"url\": \"http://files.wa.example/b\", \"content_type\": "
        " \"image/png\"}}]') WHERE id = (SELECT event_id FROM outbox WHERE id = {bad})",
        "an attachment is not representable in Matrix: the message has no text and no attachment"),
}


@pytest.mark.parametrize("cause", sorted(UNDELIVERABLE))
def test_a_row_whose_own_facts_no_retry_changes_is_dead_at_once(make_daemon, db_url, hs, pg, cause):
    """A row the adapter can never deliver for a fact of its own (no local
    user, a recipient without a valid Matrix id, a sender whose ghost id
    would be too long, an attachment no Matrix event can be made of) is a
    dead letter at once, with why, as a row no event can be made of is
    (above); the room's next row, in the same batch, is delivered on its
    first attempt.  Until the twenty-fifth session such a row failed as a
    homeserver that is down does: retried with backoff, the room's later
    rows failing with it, and once its budget was spent they were dead
    with it."""
    d = start_mx(make_daemon, db_url, hs,
                 dispatcher={"retry_budget": "2", "retry_base_ms": "20", "retry_max_ms": "50"})
    a, srv = add_gk(d)
    try:
        bad, after = broken_then_after_it(d, a, hs, pg, db_url)
        row = ("SELECT o.id FROM outbox o JOIN events e ON e.id = o.event_id "
               "WHERE e.public_id = '{}' AND o.destination = 'matrix'")
        bad_id, after_id = pg.psql(row.format(bad), db_url), pg.psql(row.format(after), db_url)
        edit, reason = UNDELIVERABLE[cause]
        pg.psql(edit.format(bad=bad_id) + "; UPDATE outbox SET state = 'pending', next_attempt_at = now() "
                f"WHERE id IN ({bad_id}, {after_id}); NOTIFY causeway_outbox", db_url)
        wait_for_after_it(hs)
        state = "SELECT state || ' ' || attempts FROM outbox WHERE id = {}"
        # the states are recorded once the whole batch is sent: after its last
        # message arrived
        wait_until(lambda: pg.psql(state.format(after_id), db_url) == "delivered 1", what="delivered 1")
        wait_until(lambda: pg.psql(state.format(bad_id), db_url) == "dead 1", what="dead 1")
        dead = d.admin("GET", "/outbox?state=dead").json()["rows"]
        assert [x["id"] for x in dead] == [int(bad_id)] and reason in dead[0]["last_error"], dead
        # one attempt, never tried again, and nothing of it reached the homeserver
        assert not any(e["type"] == "m.room.message" and e["content"].get("body") == "broken"
                       for rid in hs.rooms() for e in hs.events(rid))
    finally:
        srv.close()


def test_an_edit_whose_original_the_database_could_not_look_up_is_tried_again(make_daemon, db_url, hs, pg):
    """An edit's look-up of its original's Matrix event id that the database
    did not answer (the connection cut) fails the row, to be tried again:
    it is not taken for an original that never reached Matrix.  Until the
    twenty-fifth session it was, and the edit went out for good as a
    message of its own ("* ..."; a delete, a reaction or a receipt as
    nothing at all)."""
    with PgProxy(db_url) as px:
        d = start_mx(make_daemon, px.url, hs,
                     dispatcher={"retry_budget": "5", "retry_base_ms": "20", "retry_max_ms": "50"})
        a, srv = add_gk(d)
        try:
            consent_alice(d)
            hs.create_user("alice")
            room = a.create_room([a.user("wally"), ALICE]).json()["id"]
            m1 = a.send(room, a.user("wally"), "original").json()["id"]
            ghost = "@_cw_gk_wally:example.org"

            def sent():
                return [e for rid in hs.rooms() for e in hs.events(rid)
                        if e["sender"] == ghost and e["type"] == "m.room.message"]
            wait_until(lambda: len(sent()) == 1, what="the original delivered")
            px.cut_statement(lambda t: "THEN e.origin_native_id END" in t)
            ed = {"type": "edit", "sender": a.user("wally"),
                  "content": {"replaces": m1, "parts": [{"type": "text/plain", "body": "edited"}]}}
            assert a.call("POST", f"/v1/rooms/{room}/messages", ed, idem="ed-cut").status_code == 202
            wait_until(lambda: len(sent()) == 2, timeout=20, what="the edit delivered")
            assert px.cuts == 1
            edit = sent()[1]
            assert edit["content"].get("m.relates_to") == {"rel_type": "m.replace",
                                                           "event_id": sent()[0]["event_id"]}, edit
            assert edit["content"]["m.new_content"]["body"] == "edited"
            # (its outcome is recorded once the send is answered)
            last = "SELECT state || ' ' || attempts FROM outbox WHERE destination = 'matrix' ORDER BY id DESC LIMIT 1"
            wait_until(lambda: pg.psql(last, db_url).split(" ")[0] not in ("pending", "in_flight"),
                       what="the edit's outcome")
            assert pg.psql(last, db_url) == "delivered 2"
        finally:
            srv.close()


def canonical_size(content):
    return len(json.dumps(content, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode())


def ghost_messages_in(hs, mx_room):
    return [e for e in hs.events(mx_room) if e["type"] == "m.room.message" and e["sender"] == "@_cw_gk_wally:example.org"]


def test_an_event_larger_than_matrix_takes_is_made_to_fit(mx, hs, gk, pg, db_url):
    """A peer's message within the neutral limits can make a Matrix event
    over the 65,536 bytes a homeserver takes (the HTML's escapes: each & is
    &amp;; an edit carries its text twice, with its HTML): it is made to
    fit, its HTML left out first, never refused.  Until the thirtieth
    session the homeserver's 413 M_TOO_LARGE was taken for a failure a
    retry may mend: the room's later rows waited behind it for the whole
    retry budget (some 10 minutes), then were dead with it."""
    a, _ = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    big = "&" * 16000
    r = a.call("POST", f"/v1/rooms/{room}/messages",
               {"type": "message", "sender": a.user("wally"),
                "content": {"parts": [{"type": "text/plain", "body": big}, {"type": "text/html", "body": big}]}},
               idem="big-1")
    assert r.status_code == 202, r.text
    first = a.send(room, a.user("wally"), "to be edited").json()["id"]
    text = "x" * 16300
    r = a.call("POST", f"/v1/rooms/{room}/messages",
               {"type": "edit", "sender": a.user("wally"),
                "content": {"replaces": first, "parts": [{"type": "text/plain", "body": text},
                                                         {"type": "text/html", "body": "<p>" + text + "</p>"}]}},
               idem="edit-big")
    assert r.status_code == 202, r.text
    assert a.send(room, a.user("wally"), "after the big ones").status_code == 202
    wait_until(lambda: any(m["content"]["body"] == "after the big ones" for m in ghost_messages_in(hs, mx_room)),
               what="the row after the large ones")
    got = {m["content"]["body"][:12]: m["content"] for m in ghost_messages_in(hs, mx_room)}
    large = got["&" * 12]
    assert large["body"] == big and "formatted_body" not in large and "format" not in large, large.keys()
    edit = got["* " + "x" * 10]
    assert edit["m.new_content"]["body"] == text and "formatted_body" not in edit["m.new_content"], edit.keys()
    assert edit["m.relates_to"]["rel_type"] == "m.replace", edit["m.relates_to"]
    assert all(canonical_size(c) < 65536 - 2048 for c in got.values())
    # a batch's outcomes are recorded once the whole batch is sent: after
    # its last message reached the homeserver
    wait_until(lambda: pg.psql("SELECT string_agg(DISTINCT state, ',') FROM outbox WHERE destination = 'matrix'",
                               db_url) == "delivered", what="every row delivered")


def test_a_homeserver_refusing_an_event_as_too_large_holds_no_later_row(mx, hs, gk, pg, db_url, monkeypatch):
    """A homeserver that takes smaller events than Matrix's 65,536 bytes
    answers 413 M_TOO_LARGE: the same answer on every try, so the row is a
    dead letter at once, with why, and the room's later rows go on (until
    the thirtieth session it was retried, the room held behind it)."""
    a, _ = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    monkeypatch.setattr(homeserver, "MAX_PDU_BYTES", 8000)
    big = a.send(room, a.user("wally"), "y" * 10000).json()["id"]
    assert a.send(room, a.user("wally"), "after the refused one").status_code == 202
    wait_until(lambda: any(m["content"]["body"] == "after the refused one" for m in ghost_messages_in(hs, mx_room)),
               what="the row after the refused one")
    row = (f"SELECT o.state || ' ' || o.attempts || ' ' || coalesce(o.last_error, '') FROM outbox o JOIN events e "
           f"ON e.id = o.event_id WHERE e.public_id = '{big}' AND o.destination = 'matrix'")
    # the states are recorded once the whole batch is sent: after its last message arrived
    wait_until(lambda: pg.psql(row, db_url).split(" ")[0] != "in_flight" and
               not pg.psql(row, db_url).startswith("pending 0"), what="the row's outcome")
    assert pg.psql(row, db_url) == "dead 1 homeserver answered 413 M_TOO_LARGE", pg.psql(row, db_url)
    st = a.call("GET", f"/v1/messages/{big}").json()
    assert [x["status"] for x in st["recipients"]] == ["not_delivered"], st


def test_a_request_the_homeserver_refuses_for_good_holds_no_later_row(mx, hs, gk, pg, db_url):
    """The homeserver refuses wally's read receipt as an invalid request
    (400 M_BAD_JSON), the same way on every try: the row is a dead
    letter at once, with why, and the room's later rows go on. Until the
    fifty-first session only a 413 was final: the receipt was tried again
    for its whole retry budget, the room's later rows behind it, then
    they went dead with it."""
    a, srv = gk
    room, mx_room, alice, ghost = wally_writes_to_alice(mx, hs, gk)
    wally = a.user("wally")
    alice.join(mx_room)
    alice.send_text(mx_room, "hi wally")
    hi = wait_until(lambda: next((e["id"] for e in list(srv.events) if e["type"] == "message" and
                                  e["sender"] == ALICE), None), what="alice's message at the peer")
    hs.refuse = lambda method, path, user: 400 if method == "POST" and "/receipt/m.read/" in path else None
    try:
        r = a.call("POST", f"/v1/rooms/{room}/receipts", {"type": "receipt", "sender": wally,
                                                          "content": {"receipt": "read", "in_reply_to": hi}})
        assert r.status_code == 202, r.text
        receipt = r.json()["id"]
        assert a.send(room, wally, "after the refused one").status_code == 202
        wait_until(lambda: "after the refused one" in bodies(hs, mx_room), what="the row after the refused one")
    finally:
        hs.refuse = None
    refused = [x for x in hs.requests if x["method"] == "POST" and "/receipt/m.read/" in x["path"]]
    assert [(x["status"], x["answer"]["errcode"]) for x in refused] == [(400, "M_BAD_JSON")], refused
    row = (f"SELECT o.state || ' ' || o.attempts || ' ' || coalesce(o.last_error, '') FROM outbox o JOIN events e "
           f"ON e.id = o.event_id WHERE e.public_id = '{receipt}' AND o.destination = 'matrix'")
    wait_until(lambda: pg.psql(row, db_url).split(" ")[0] not in ("in_flight", "pending"), what="the row's outcome")
    assert pg.psql(row, db_url) == "dead 1 homeserver answered 400 M_BAD_JSON", pg.psql(row, db_url)


def test_a_refusal_whose_errcode_says_nothing_of_the_request_is_tried_again(mx, hs, gk, pg, db_url):
    """The homeserver refuses wally's read receipt once as 400 M_UNKNOWN,
    then takes it: the specification's M_UNKNOWN is "an unknown error",
    nothing the request itself is wrong in (a homeserver answers it for a
    failure of its own too), so the row is tried again and delivered, not
    a dead letter at once as a 400 M_BAD_JSON is. Until the fifty-second
    session any 4xx with an errcode but 401, 403, 408 and 429 was final."""
    from homeserver import MatrixError
    a, srv = gk
    room, mx_room, alice, ghost = wally_writes_to_alice(mx, hs, gk)
    wally = a.user("wally")
    alice.join(mx_room)
    alice.send_text(mx_room, "hi wally")
    hi = wait_until(lambda: next((e["id"] for e in list(srv.events) if e["type"] == "message" and
                                  e["sender"] == ALICE), None), what="alice's message at the peer")
    refused = []

    def refuse(method, path, user):
        if method == "POST" and "/receipt/m.read/" in path and not refused:
            refused.append(path)
            return MatrixError(400, "M_UNKNOWN", "Internal error behind a 400")
        return None
    hs.refuse = refuse
    try:
        r = a.call("POST", f"/v1/rooms/{room}/receipts", {"type": "receipt", "sender": wally,
                                                          "content": {"receipt": "read", "in_reply_to": hi}})
        assert r.status_code == 202, r.text
        receipt = r.json()["id"]
        row = (f"SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e "
               f"ON e.id = o.event_id WHERE e.public_id = '{receipt}' AND o.destination = 'matrix'")
        wait_until(lambda: pg.psql(row, db_url).split(" ")[0] not in ("in_flight", "pending"), timeout=30,
                   what="the row's outcome")
    finally:
        hs.refuse = None
    assert pg.psql(row, db_url) == "delivered 2", pg.psql(row, db_url)
    tries = [(x["status"], (x["answer"] or {}).get("errcode")) for x in hs.requests
             if x["method"] == "POST" and "/receipt/m.read/" in x["path"]]
    assert tries == [(400, "M_UNKNOWN"), (200, None)], tries


def test_a_reference_to_a_message_of_a_room_the_user_left_names_none_of_it(mx, hs, gk, pg, db_url):
    """alice left her direct room with wally, and his next message opened
    a new one. His edit and reaction of a message delivered to the old
    room, and his read receipt of hers written there, name events of
    another room: Synapse refuses a relation to one (400 "Relations must
    be in the same room") and a receipt of one (404). They are taken as
    references to a message that never reached this room: the edit goes
    as a new message, the reaction and the receipt as nothing, and no row
    fails. Until the fifty-first session each named the old room's event,
    and was tried for the whole retry budget, the room's later rows
    behind it."""
    a, srv = gk
    room, mx_room, alice, ghost = wally_writes_to_alice(mx, hs, gk)
    wally = a.user("wally")
    alice.join(mx_room)
    m1 = a.send(room, wally, "react to me").json()["id"]
    wait_until(lambda: "react to me" in bodies(hs, mx_room), what="the message in the first room")
    alice.send_text(mx_room, "hi wally")
    hi = wait_until(lambda: next((e["id"] for e in list(srv.events) if e["type"] == "message" and
                                  e["sender"] == ALICE), None), what="alice's message at the peer")
    alice.leave(mx_room)
    wait_until(lambda: hs.members(mx_room).get(ghost) == "leave", what="the ghost leaving")
    a.send(room, wally, "still there?")
    new_room = new_room_of(hs, mx_room, ghost)
    n = len(hs.requests)
    ids = [a.call("POST", f"/v1/rooms/{room}/messages", {"type": "reaction", "sender": wally, "content": {
        "in_reply_to": m1, "disposition": "reaction", "parts": [{"type": "text/plain", "body": "\U0001f44d"}]}},
        idem="left-react"),
        a.call("POST", f"/v1/rooms/{room}/messages", {"type": "edit", "sender": wally, "content": {
            "replaces": m1, "parts": [{"type": "text/plain", "body": "edited"}]}}, idem="left-edit"),
        a.call("POST", f"/v1/rooms/{room}/receipts", {"type": "receipt", "sender": wally,
                                                      "content": {"receipt": "read", "in_reply_to": hi}})]
    assert all(r.status_code == 202 for r in ids), [r.text for r in ids]
    assert a.send(room, wally, "after them").status_code == 202
    wait_until(lambda: "after them" in bodies(hs, new_room), what="the message after them")
    assert bodies(hs, new_room) == ["still there?", "* edited", "after them"], bodies(hs, new_room)
    assert not [e for e in hs.events(new_room) if e["type"] == "m.reaction"]
    refused = [(x["method"], x["path"], x["status"]) for x in hs.requests[n:] if x["status"] >= 400]
    assert not refused, refused
    rows = ("SELECT string_agg(o.state, ' ' ORDER BY o.id) FROM outbox o JOIN events e ON e.id = o.event_id "
            "WHERE o.destination = 'matrix' AND e.public_id IN (" + ", ".join(f"'{r.json()['id']}'" for r in ids) + ")")
    wait_until(lambda: pg.psql(rows, db_url) == "delivered delivered delivered", what="the rows delivered")
    assert bodies(hs, mx_room) == ["hello", "react to me", "hi wally"]


def test_a_reference_to_a_message_of_the_room_a_new_direct_room_took_over_names_none_of_it(
        mx, hs, gk, pg, db_url):
    """alice opens a new direct room with wally's ghost while the old one
    is still bound: the binding moves to the new room, made then. wally's
    reaction and edit of a message delivered to the old room name an event
    of another room (Synapse: 400 "Relations must be in the same room"):
    the edit goes as a new message, the reaction as nothing, and no row
    fails. Until the fifty-second session the moved binding kept the old
    room's created_at, so the old room's event was named in the new one
    and each row was tried for its whole retry budget."""
    a, _ = gk
    room, mx_room, alice, ghost = wally_writes_to_alice(mx, hs, gk)
    wally = a.user("wally")
    alice.join(mx_room)
    m1 = a.send(room, wally, "react to me").json()["id"]
    wait_until(lambda: "react to me" in bodies(hs, mx_room), what="the message in the first room")
    bound = pg.psql("SELECT created_at FROM room_bindings WHERE network = 'matrix'", db_url)
    second = alice.create_dm(ghost)
    wait_until(lambda: hs.members(second).get(ghost) == "join", what="the ghost joins the second room")
    wait_until(lambda: hs.members(mx_room).get(ghost) == "leave", what="the ghost leaves the first room")
    n = len(hs.requests)
    ids = [a.call("POST", f"/v1/rooms/{room}/messages", {"type": "reaction", "sender": wally, "content": {
        "in_reply_to": m1, "disposition": "reaction", "parts": [{"type": "text/plain", "body": "\U0001f44d"}]}},
        idem="moved-react"),
        a.call("POST", f"/v1/rooms/{room}/messages", {"type": "edit", "sender": wally, "content": {
            "replaces": m1, "parts": [{"type": "text/plain", "body": "edited"}]}}, idem="moved-edit")]
    assert all(r.status_code == 202 for r in ids), [r.text for r in ids]
    assert a.send(room, wally, "after them").status_code == 202
    wait_until(lambda: "after them" in bodies(hs, second), what="the message after them")
    assert bodies(hs, second) == ["* edited", "after them"], bodies(hs, second)
    assert not [e for e in hs.events(second) if e["type"] == "m.reaction"]
    refused = [(x["method"], x["path"], x["status"]) for x in hs.requests[n:] if x["status"] >= 400]
    assert not refused, refused
    rows = ("SELECT string_agg(o.state, ' ' ORDER BY o.id) FROM outbox o JOIN events e ON e.id = o.event_id "
            "WHERE o.destination = 'matrix' AND e.public_id IN (" + ", ".join(f"'{r.json()['id']}'" for r in ids) + ")")
    wait_until(lambda: pg.psql(rows, db_url) == "delivered delivered", what="the rows delivered")
    assert "react to me" in bodies(hs, mx_room) and "* edited" not in bodies(hs, mx_room)
    assert pg.psql("SELECT native_id || ' ' || (created_at > '" + bound + "') FROM room_bindings "
                   "WHERE network = 'matrix'", db_url) == second + " true"


def test_a_row_whose_look_for_its_earlier_try_fails_is_not_sent_blind(mx, hs, gk, pg, db_url):
    """wally's message reaches the room but the answer is lost, and the
    homeserver forgets its txnId (a restart) before the retry, which
    first looks for the message among the room's last events; that look
    fails once (503). The row is tried again, not sent: the look after
    finds it, and alice sees the message once. Until the fifty-first
    session a failed look was taken for "not there" and the message went
    twice."""
    a, _ = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    lost, looks = [], []

    def lose(method, path, user):
        # (libcurl sends a request again at once when a kept-alive
        # connection closes unanswered: that one's answer is lost too)
        if method == "PUT" and "/send/m.room.message/" in path and not looks:
            lost.append(path)
            return True
        return False

    def refuse(method, path, user):
        if lost and method == "GET" and path.endswith("/messages"):
            looks.append(path)
            if len(looks) == 1:
                hs.forget_txn_ids()
                return True
        return False
    hs.lose_reply, hs.refuse = lose, refuse
    try:
        m = a.send(room, a.user("wally"), "only once").json()["id"]
        row = ("SELECT o.state || ' ' || coalesce(o.remote_id, '-') FROM outbox o JOIN events e ON e.id = o.event_id "
               f"WHERE o.destination = 'matrix' AND e.public_id = '{m}'")
        wait_until(lambda: pg.psql(row, db_url).startswith("delivered"), what="the row delivered")
    finally:
        hs.lose_reply = hs.refuse = None
    assert len(looks) == 2, looks
    shown = [e for e in hs.events(mx_room) if e["type"] == "m.room.message" and e["content"]["body"] == "only once"]
    assert len(shown) == 1, shown
    assert pg.psql(row, db_url) == "delivered " + shown[0]["event_id"]
    assert {(x["status"], x["lost"]) for x in hs.requests if x["path"] == lost[0]} == {(200, True)}


def rate_limited_homeserver():
    """A stand-in whose registration says rate_limited: true, and a notify
    server (the caller closes both)."""
    reg = registration()
    reg["rate_limited"] = True
    hs = Homeserver(server_name="example.org", registration=reg)
    hs.start()
    return hs, NotifyServer()


def limited_gateway(make_daemon, db_url, hs, srv, rc_message):
    """The daemon on hs, limited as Synapse's rc_message = (per second,
    burst), with a retry budget of 1 (a counted failure is a dead letter),
    and the push peer gk: (daemon, gk's client)."""
    hs.rc_message = rc_message
    d = start_mx(make_daemon, db_url, hs, dispatcher={"retry_budget": "1", "retry_base_ms": "10",
                                                      "retry_max_ms": "20"})
    srv.public_b64 = d.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    a = PeerClient(d.url, "gk", "wa.example")
    r = d.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "mode": "push",
                                       "push_url": srv.url, "public_key": a.signer.public_b64})
    a.token = r.json()["token"]
    return d, a


def test_a_rate_limiting_homeserver_is_waited_for(make_daemon, db_url, pg):
    """A homeserver that rate-limits the ghosts (a registration with
    rate_limited: true, Synapse's rc_message at 4 a second with a burst of
    2): each 429 M_LIMIT_EXCEEDED is waited out as long as it asks, the
    messages arrive once and in order, and the 429s are not counted
    against the retry budget (1 here: a counted failure is a dead letter)."""
    hs, srv = rate_limited_homeserver()
    try:
        d, a = limited_gateway(make_daemon, db_url, hs, srv, (4.0, 2))
        consent_alice(d)
        hs.create_user("alice")
        room = a.create_room([a.user("wally"), ALICE]).json()
        items = [{"idempotency_key": f"rl-{i}", "room": room["uri"],
                  "event": {"type": "message", "sender": a.user("wally"),
                            "content": {"parts": [{"type": "text/plain", "body": f"m{i}"}]}}} for i in range(6)]
        assert a.call("POST", "/v1/batch", {"events": items}).status_code == 200
        ghost = "@_cw_gk_wally:example.org"
        sent = lambda: [e["content"]["body"] for rid in hs.rooms() for e in hs.events(rid)  # noqa: E731
                        if e["type"] == "m.room.message" and e["sender"] == ghost]
        wait_until(lambda: len(sent()) == 6, timeout=20, what="six messages")
        assert sent() == [f"m{i}" for i in range(6)]
        # the rows' outcomes are recorded once the whole batch is sent: after the last one arrived
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' "
                                   "AND state IN ('pending', 'in_flight')", db_url) == "0", what="the outcomes")
        # The ghost's sends only: the bot's notices are limited too (per
        # user, as Synapse does), and one of them still waiting out its
        # 429 when the six have arrived has no next send yet.
        sends = [q for q in hs.requests if q["path"].startswith("/_matrix/client/v3/rooms/")
                 and "/send/m.room.message/" in q["path"] and q["user"] == ghost]
        limited = [k for k, q in enumerate(sends) if q["status"] == 429]
        assert limited, "the homeserver never limited: the test shows nothing"
        # After each 429, the next send came no sooner than the wait asked.
        for k in limited:
            asked = sends[k]["answer"]["retry_after_ms"] / 1000
            assert asked > 0 and sends[k + 1]["time"] - sends[k]["time"] >= asked, \
                (k, [(q["status"], q["time"], q["answer"]) for q in sends])
        rows = pg.psql("SELECT state, attempts FROM outbox WHERE destination = 'matrix' ORDER BY id", db_url)
        assert rows.splitlines() == ["delivered|1"] * 6, rows
        assert metrics_plain(d, "causeway_dispatch_rate_limited_total") >= len(limited)
        assert not hs.errors
    finally:
        srv.close()
        hs.close()


def test_a_rate_limited_room_creation_is_waited_for(make_daemon, db_url, pg):
    """Synapse limits POST /createRoom with the limiter of sends
    (rc_message): wally writes to alice and to bob, a new direct room
    each, made by wally's ghost in turn; the 429 on the second room's
    making is waited out as asked and not counted against the retry
    budget (1: a counted failure is a dead letter).  Until the twentieth
    session only a send's 429 was, and this one made a dead letter (a
    review's finding)."""
    hs, srv = rate_limited_homeserver()
    try:
        d, a = limited_gateway(make_daemon, db_url, hs, srv, (0.5, 1))  # one event, then one every 2 s
        for who in ("alice", "bob"):
            uri = f"mimi://example.org/u/{who}"
            assert d.admin("POST", "/optins", json={"user": uri, "network": "peer:gk", "opted_in": True}).ok
            assert d.admin("POST", "/consents", json={"user": uri, "subject_kind": "user",
                                                      "subject": a.user("wally"), "state": "allowed"}).ok
            hs.create_user(who)
        for who in ("alice", "bob"):
            room = a.create_room([a.user("wally"), f"mimi://example.org/u/{who}"]).json()["id"]
            assert a.send(room, a.user("wally"), f"hello {who}").status_code == 202
        rows = lambda: pg.psql("SELECT state, attempts FROM outbox WHERE destination = 'matrix' "  # noqa: E731
                               "ORDER BY id", db_url).splitlines()
        wait_until(lambda: rows() and all(r.split("|")[0] in ("delivered", "dead") for r in rows()),
                   timeout=30, what="both deliveries done")
        creates = [q["status"] for q in hs.requests if q["path"].endswith("/createRoom")]
        assert 429 in creates, f"the homeserver never limited a room's making: the test shows nothing ({creates})"
        assert rows() == ["delivered|1"] * 2, rows()
        assert metrics_plain(d, "causeway_dispatch_rate_limited_total") >= 1
    finally:
        srv.close()
        hs.close()


def test_a_rate_limited_bot_is_waited_for_too(make_daemon, db_url, pg):
    """Synapse exempts an application service's users, its bot too, only
    when the registration says rate_limited: false (as the gateway prints
    it); one that says true limits the bot like the ghosts (until the
    thirtieth session the stand-in never limited the bot, and a 429 to the
    bot's answer lost the answer). Alice's three commands in a row, at one
    event a second: each answered once, a limited answer queued and sent
    when the homeserver asks (since the thirty-first session; in the
    thirtieth the bot slept the 429s out)."""
    hs, srv = rate_limited_homeserver()
    try:
        d, a = limited_gateway(make_daemon, db_url, hs, srv, (1.0, 1))
        alice, mgmt, said = alice_and_the_bot(hs)
        # (in one transaction: alice herself is limited as much)
        now = int(time.time() * 1000)
        assert as_put(d, "three-commands", {"events": [
            {"event_id": f"$list{k}", "room_id": mgmt, "sender": ALICE_MX, "type": "m.room.message",
             "origin_server_ts": now + k, "content": {"msgtype": "m.text", "body": "list"}}
            for k in range(3)]}).status_code == 200
        wait_until(lambda: len([t for t in said() if t.startswith("Nothing yet")]) == 3, timeout=20,
                   what="three answers")
        limited = [q for q in hs.requests if q["user"] == "@_cw_bot:example.org" and q["status"] == 429]
        assert limited, "the homeserver never limited the bot: the test shows nothing"
        all_said(hs, pg, db_url)  # the limited answer's row sent and done: none to send again
        assert len([t for t in said() if t.startswith("Nothing yet")]) == 3
        # Each answer went under its command's transaction id, the queued
        # one too (until the thirty-second session a queued answer took the
        # notice row's, and a command run again after a crash before its
        # inbox mark was answered twice): three ids, each tried until taken.
        answers = [q for q in hs.requests if q["user"] == "@_cw_bot:example.org" and "/send/" in q["path"]
                   and (q.get("body") or {}).get("body", "").startswith("Nothing yet")]
        txns = {q["path"].rsplit("/", 1)[1] for q in answers}
        assert len(txns) == 3 and all(t.startswith("cwcmd-") for t in txns), sorted(txns)
        assert any(q["status"] == 429 for q in answers), "no answer was limited: the test shows nothing"
    finally:
        srv.close()
        hs.close()


def test_a_rate_limited_notice_is_given_back_not_waited_for(make_daemon, db_url, pg):
    """A notice row the homeserver answers 429 is given back, due again
    when the answer says (retry_after_ms), and the bot goes on with its
    other work meanwhile: until the thirty-first session it slept the
    wait out (up to 4 times 10 s) with every other row claimed in its
    batch, the inbox's commands and invitations waiting behind it. Each
    notice reaches the room once."""
    hs, srv = rate_limited_homeserver()
    try:
        d, a = limited_gateway(make_daemon, db_url, hs, srv, None)
        alice, mgmt, said = alice_and_the_bot(hs)
        bob = hs.as_user(hs.create_user("bob")[1])
        room2 = bob.create_room(preset="trusted_private_chat", is_direct=True)
        bot = "@_cw_bot:example.org"
        hs.rc_message = (0.2, 1)  # one event in 5 s for each sender, the bot's too
        texts = [f"A notice, number {k}." for k in range(3)]
        pg.psql("INSERT INTO matrix_notices (room_id, body) VALUES " +
                ", ".join(f"('{mgmt}', '{t}')" for t in texts) + "; NOTIFY causeway_matrix_bot", db_url)

        def notice_429s():
            return [q for q in hs.requests if q["user"] == bot and q["status"] == 429 and "/cwnotice-" in q["path"]]
        wait_until(lambda: notice_429s(), timeout=15, what="a notice limited")
        bob.invite(room2, bot)  # bob's management room
        wait_until(lambda: hs.members(room2).get(bot) == "join", what="the bot joining")
        # Before the limited notice's wait was over (a bot that slept it out
        # joins after it); not "within 2.5 s", which a loaded machine can
        # miss (session 35).
        first = notice_429s()[0]
        join = next(q for q in hs.requests if q["user"] == bot and q["path"].endswith("/join")
                    and room2 in urllib.parse.unquote(q["path"]))
        assert join["time"] < first["time"] + first["answer"]["retry_after_ms"] / 1000, \
            ("the bot's other work waited behind a limited notice", join["time"] - first["time"], first["answer"])
        wait_until(lambda: all(t in said() for t in texts), timeout=45, what="the notices")
        bobs = lambda: [e["content"]["body"] for e in hs.events(room2)  # noqa: E731
                        if e["type"] == "m.room.message" and e["sender"] == bot]
        wait_until(lambda: any("Commands" in n for n in bobs()), timeout=30, what="bob's help, limited")
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_notices WHERE done_at IS NULL", db_url) == "0",
                   what="the rows done")
        for t in texts:
            assert said().count(t) == 1, said()
        assert len(bobs()) == 1, bobs()
        assert any(q["user"] == bot and q["status"] == 429 and "/cwhelp-" in q["path"] for q in hs.requests), \
            "bob's help was not limited: the test shows nothing of a notice queued"
        # each try after a 429 came no sooner than the 429 asked
        paths = collections.defaultdict(list)
        for q in hs.requests:
            if q["user"] == bot and "/cwnotice-" in q["path"]:
                paths[q["path"]].append(q)
        for tries in paths.values():
            assert [q["status"] for q in tries].count(200) == 1, tries
            for q, nxt in zip(tries, tries[1:]):
                if q["status"] == 429:
                    assert nxt["time"] - q["time"] >= q["answer"]["retry_after_ms"] / 1000 - 0.1, tries
        # and a 429 stopped the batch: no other notice row was tried before
        # the time it asked (until the thirty-second session the rest of
        # the batch was tried at once, each limited in turn)
        rows = sorted((q for q in hs.requests if q["user"] == bot and "/cwnotice-" in q["path"]),
                      key=lambda q: q["time"])
        for q, nxt in zip(rows, rows[1:]):
            if q["status"] == 429:
                assert nxt["time"] - q["time"] >= q["answer"]["retry_after_ms"] / 1000 - 0.1, \
                    [(x["path"], x["status"], x["time"]) for x in rows]
    finally:
        srv.close()
        hs.close()


def test_one_limited_ghost_does_not_hold_up_the_bots_notices(make_daemon, db_url, pg):
    """A Matrix 429 is one sender's limit (Synapse's rc_message is a bucket
    per user; the stand-in's too, and the dispatcher says so: "a Matrix
    429 is one ghost's limit, not the homeserver's"). The notices of a
    ghost its homeserver limits must not hold up the bot's notice to
    another user, which the homeserver would take at once. Until the
    thirty-second session's review a 429 gave back the whole batch of
    notice rows, the bot's to other users with it (a review's finding)."""
    hs, srv = rate_limited_homeserver()
    try:
        d, a = limited_gateway(make_daemon, db_url, hs, srv, None)
        alice, mgmt, said = alice_and_the_bot(hs)
        bot = "@_cw_bot:example.org"
        ghost = "@_cw_gk_wally:example.org"
        with hs._lock:  # the ghost registered, as the daemon registers its ghosts
            hs._users[ghost] = {"displayname": "wally"}
        hs.rc_message = (0.2, 1)  # one event in 5 s for each sender
        time.sleep(5.5)  # the bot's bucket full again after its help
        # ten notices of one ghost (older rows) in another user's room, then
        # one of the bot's to alice (in one room notices keep their order,
        # whoever says them: test_notices_of_one_room_go_out_in_the_order_they_were_queued)
        bob = hs.as_user(hs.create_user("bob")[1])
        other = bob.create_room(preset="private_chat")
        rows = ", ".join(f"('{other}', 'ghost word {k}', '{ghost}', 'cwprobe-g{k}')"
                         for k in range(10))
        n0 = len(hs.requests)  # before the rows: the daemon may send some before psql returns
        pg.psql("INSERT INTO matrix_notices (room_id, body, sender, txn_id) VALUES " + rows +
                f", ('{mgmt}', 'the bot to alice', '{bot}', 'cwprobe-bot'); NOTIFY causeway_matrix_bot", db_url)
        # Waited for in the stand-in's record of requests, not in the room:
        # the stand-in stores the event before it records the request that
        # sent it, so a test that saw the notice in the room could read the
        # record a moment too early (stop 75's CI: min() of nothing).
        told = lambda: [q for q in hs.requests[n0:] if q["user"] == bot and q["status"] == 200  # noqa: E731
                        and "the bot to alice" in json.dumps(q["body"])]
        wait_until(told, timeout=120, what="the bot's notice")
        assert "the bot to alice" in said()
        # From the daemon's first send of the ghost's notices to its send of
        # the bot's, each when it came to the homeserver (its thread's
        # clock): not the test's around the NOTIFY and its polls of what
        # alice was told, which counted its own turns too.
        sent = hs.requests[n0:]
        first = min(q["time"] for q in sent if q["user"] == ghost)
        took = min(q["time"] for q in told()) - first
        ghost429 = [q for q in hs.requests if q["user"] == ghost and q["status"] == 429]
        bot429 = [q for q in hs.requests if q["user"] == bot and q["status"] == 429]
        print(f"the bot's notice took {took:.1f} s; ghost 429s {len(ghost429)}, bot 429s {len(bot429)}")
        assert ghost429, "the ghost was never limited: the probe shows nothing"
        assert not bot429, bot429
        assert took < 8, f"the bot's notice to alice waited {took:.1f} s behind a limited ghost's"
    finally:
        srv.close()
        hs.close()


def test_a_notice_before_a_leave_outlasts_a_long_429(make_daemon, db_url, pg):
    """What the bot says just before it leaves a room (here: invited into
    a room with others, it says where it takes commands) is not lost to a
    429 that asks for longer than the bot waits: it is queued, and the bot
    leaves once it is said, in that order. Until the thirty-second session
    a 429 asking more than 2 s lost it (logged), and the bot left in
    silence."""
    hs, srv = rate_limited_homeserver()
    try:
        d, a = limited_gateway(make_daemon, db_url, hs, srv, (0.1, 1))  # one event in 10 s for each sender
        bot = "@_cw_bot:example.org"
        alice, mgmt, said = alice_and_the_bot(hs)  # the bot's event of these 10 s: its help
        bob = hs.as_user(hs.create_user("bob")[1])
        hs.create_user("carol")
        shared = bob.create_room(preset="private_chat", invite=["@carol:example.org"])
        bob.invite(shared, bot)
        wait_until(lambda: hs.members(shared).get(bot) == "leave", timeout=30, what="the bot leaving")
        limited = [q for q in hs.requests if q["user"] == bot and q["status"] == 429 and shared in
                   urllib.parse.unquote(q["path"])]
        assert limited and limited[0]["answer"]["retry_after_ms"] > 2000, \
            "the bot's word was not limited for long: the test shows nothing"
        timeline = [(e["type"], e["sender"], e["content"].get("membership"), e["content"].get("body", ""))
                    for e in hs.events(shared) if e["sender"] == bot]
        said_there = [k for k, x in enumerate(timeline) if x[0] == "m.room.message"]
        left = [k for k, x in enumerate(timeline) if x[2] == "leave"]
        assert len(said_there) == 1 and "room of your own" in timeline[said_there[0]][3], timeline
        assert left and said_there[0] < left[0], timeline
        assert not hs.errors
    finally:
        srv.close()
        hs.close()


def test_an_xmpp_users_opt_in_beside_the_matrix_adapter_makes_her_an_xmpp_user(make_daemon, db_url, pg, hs,
                                                                              tmp_path):
    """Whether a local user an opt-in makes gets the network of the adapter
    she is a user of (the XMPP component shows consent requests only to
    local users of network xmpp): a daemon with both adapters does not
    start, and neither does a daemon of the other network on a database
    one network has (one local network per daemon and per database,
    docs/architecture-decisions.md 14; until the forty-first session it
    started); each network on a database of its own makes the users of its
    own domain with its own network, the other domain's refused. Looked at
    in the thirty-first session: no bug."""
    # One daemon with both: refused, before the database is touched.
    both = tmp_path / "both.ini"
    both.write_text(f"[database]\nurl = {db_url}\n[server]\ndomain = example.org\n"
                    f"[matrix]\nhomeserver_url = {hs.url}\nas_token = {AS_TOKEN}\nhs_token = {HS_TOKEN}\n"
                    "[xmpp]\ncomponents = gk.xmpp.example=gk\nsecret = s\n")
    r = subprocess.run([CAUSEWAYD, "--check-config", str(both)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "a daemon serves one local network" in r.stderr, r.stderr
    # Matrix users at example.org on this database; XMPP users at
    # xmpp.example on a database of their own (a second deployment).
    mx = start_mx(make_daemon, db_url, hs)
    add_gk(mx)[1].close()
    xmpp_opts = {"server": {"domain": "xmpp.example"},
                 "xmpp": {"components": "gk.xmpp.example=gk", "secret": "s", "server_port": str(free_port())}}
    other = make_daemon(db_url, options=xmpp_opts)
    other.start(wait_ready=False)
    rec = other.wait_for(lambda r: r.get("msg", "").startswith("refusing to start"), timeout=30)
    assert other.wait_exit() == 1 and rec["database_network"] == "matrix", rec
    xmpp_db = pg.new_database("t_xmpp_beside_matrix")
    xd = make_daemon(xmpp_db, options=xmpp_opts).start()
    add_gk(xd)[1].close()
    alice, bob = "mimi://xmpp.example/u/alice", "mimi://example.org/u/bob"
    for d, user in ((xd, alice), (mx, bob)):
        r = d.admin("POST", "/optins", json={"user": user, "network": "peer:gk", "opted_in": True})
        assert r.status_code == 200, r.text
    for d, user in ((mx, alice), (xd, bob)):
        r = d.admin("POST", "/optins", json={"user": user, "network": "peer:gk", "opted_in": True})
        assert r.status_code == 400 and "this provider's domain" in r.text, r.text
    got = [pg.psql("SELECT string_agg(uri || '=' || network || '/' || is_local, ',' ORDER BY uri) FROM identities "
                   "WHERE uri IN ('mimi://xmpp.example/u/alice', 'mimi://example.org/u/bob')", url)
           for url in (db_url, xmpp_db)]
    assert got == ["mimi://example.org/u/bob=matrix/true", "mimi://xmpp.example/u/alice=xmpp/true"], got


def metrics_plain(d, name):
    m = re.search(r"^" + name + r" (\S+)$", d.get("/metrics").text, re.M)
    return float(m.group(1)) if m else None


def test_sigterm_during_slow_delivery_stops_soon_and_nothing_is_lost(mx, hs, gk, pg, db_url):
    """A homeserver that takes a second a send, ten messages for one room:
    on SIGTERM the send in flight finishes and no other starts, so the
    daemon exits in about a second, not ten; the rest goes out after the
    restart, once each and in order."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()
    hs.send_latency = 1.0
    items = [{"idempotency_key": f"slow-{i}", "room": room["uri"],
              "event": {"type": "message", "sender": a.user("wally"),
                        "content": {"parts": [{"type": "text/plain", "body": f"slow {i}"}]}}} for i in range(10)]
    r = a.call("POST", "/v1/batch", {"events": items})
    assert r.status_code == 200 and all(x["status"] == "accepted" for x in r.json()["results"]), r.text
    wait_until(lambda: any(e["type"] == "m.room.message" for rid in hs.rooms() for e in hs.events(rid)),
               timeout=15, what="the first slow send")
    mx.signal(signal.SIGTERM)
    assert mx.wait_exit(timeout=30) == 0
    # on the daemon's clock (its "stopped" record), not the test's from the
    # signal to the exit, which counted the sanitizers' exit too
    assert stopped_in(mx) < 7, "the daemon waited for the whole batch"  # some 9 s left of it
    # What was not tried is pending again, its attempt not counted.
    left = pg.psql("SELECT count(*), count(*) FILTER (WHERE state = 'pending' AND attempts = 0 "
                   "AND last_error IS NULL) FROM outbox WHERE destination = 'matrix' AND state <> 'delivered'",
                   db_url).split("|")
    assert int(left[0]) > 0 and left[0] == left[1], left
    hs.send_latency = 0.0
    mx.start()
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' AND state = 'delivered'",
                               db_url) == "10", timeout=60, what="all ten delivered after the restart")
    bodies = [e["content"]["body"] for rid in hs.rooms() for e in hs.events(rid) if e["type"] == "m.room.message"]
    assert bodies == [f"slow {i}" for i in range(10)], bodies


def test_a_group_reaches_each_local_member_in_a_room_of_its_own(mx, hs, gk, pg, db_url):
    """A peer's group room reaches each local Matrix member as a room of
    their own (a portal, made by the bot): the remote members speak there
    as their ghosts, unlabelled; what the user writes there (a reply, a
    reaction) goes to the group; another local member's message is relayed
    by the bot after their name.  The policy still decides per user: a
    sender carol has not accepted waits for her, in her room only.
    Leaving the room is leaving the group."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    carol_uri = "mimi://example.org/u/carol"
    consent_alice(mx)
    consent_alice(mx, "mimi://wa.example/u/bob")
    assert mx.admin("POST", "/optins", json={"user": carol_uri, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": carol_uri, "subject_kind": "user",
                                               "subject": a.user("wally"), "state": "allowed"}).ok
    _, alice_token = hs.create_user("alice")
    _, carol_token = hs.create_user("carol")
    alice, carol = hs.as_user(alice_token), hs.as_user(carol_token)
    group = a.create_room([a.user("wally"), a.user("bob"), ALICE, carol_uri], kind="group", name="Lunch club").json()
    gid = group["id"]
    assert a.send(gid, a.user("wally"), "lunch at noon, everyone?").status_code == 202
    assert a.send(gid, a.user("bob"), "count me in").status_code == 202
    wally, bob = "@_cw_gk_wally:example.org", "@_cw_gk_bob:example.org"

    def portal(user):
        return next((rid for rid in hs.rooms() if hs.state(rid, "m.room.create")
                     and hs.state(rid, "m.room.create")["sender"] == bot
                     and hs.members(rid).get(user) in ("invite", "join")), None)

    def said(rid):
        return [(e["sender"], e["content"]["body"]) for e in hs.events(rid) if e["type"] == "m.room.message"]

    mine = wait_until(lambda: portal(ALICE_MX), what="alice's room of the group")
    wait_until(lambda: len(said(mine)) == 2, what="both messages in alice's room")
    assert said(mine) == [(wally, "lunch at noon, everyone?"), (bob, "count me in")]
    assert hs.members(mine) == {bot: "join", ALICE_MX: "invite", wally: "join", bob: "join"}, hs.members(mine)
    assert hs.state(mine, "m.room.name")["content"]["name"] == "Lunch club"
    # carol has her own room; bob, whom she has not accepted, waits for her.
    hers = wait_until(lambda: portal("@carol:example.org"), what="carol's room of the group")
    assert hers != mine
    wait_until(lambda: said(hers) == [(wally, "lunch at noon, everyone?")], what="carol's room")
    assert bob not in hs.members(hers)
    assert pg.psql("SELECT count(*) FROM room_bindings b JOIN rooms r ON r.id = b.room_id WHERE r.public_id = "
                   f"'{gid}' AND b.remote_identity_id IS NULL", db_url) == "2"
    # carol takes part: she joins her room, and is the group's member from
    # then on (until then invited: the peer put her in, she accepted
    # nothing, and the local members' messages were not relayed to her:
    # since the thirty-first session).
    assert {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]}[
        carol_uri] == "invited"
    carol.join(hers)
    wait_until(lambda: {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]}[
        carol_uri] == "joined", what="carol joined")
    # alice answers in her room: to the whole group, the reference kept.
    alice.join(mine)
    first = next(e for e in hs.events(mine) if e["type"] == "m.room.message")
    alice.send_text(mine, "I'll be there", reply_to=first["event_id"])
    alice.react(mine, first["event_id"], "👍")
    got = wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "message" and
                              e["content"]["parts"][0]["body"] == "I'll be there"] or None,
                     what="alice's answer at the peer")
    wally_msg = pg.psql("SELECT e.public_id FROM events e JOIN rooms r ON r.id = e.room_id "
                        f"WHERE r.public_id = '{gid}' ORDER BY e.id LIMIT 1", db_url)
    assert got[0]["room_id"] == gid and got[0]["content"]["in_reply_to"] == wally_msg, got[0]
    wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "reaction"
                        and e["content"].get("in_reply_to") == wally_msg], what="alice's reaction at the peer")
    # carol reads it in her room, from the bot, after alice's name; the bot
    # said before that alice joined.
    wait_until(lambda: (bot, "alice: I'll be there") in said(hers), what="alice's answer relayed to carol")
    assert said(hers).index((bot, "alice joined the group.")) < said(hers).index((bot, "alice: I'll be there"))
    # Her edit follows there as the bot's edit of the relayed message.
    relayed = next(e for e in hs.events(hers) if e["type"] == "m.room.message" and e["sender"] == bot
                   and e["content"]["body"] == "alice: I'll be there")
    mine_msg = next(e for e in hs.events(mine) if e["type"] == "m.room.message" and e["sender"] == ALICE_MX)
    alice.edit(mine, mine_msg["event_id"], "I'll be there at noon")
    edit = wait_until(lambda: next((e for e in hs.events(hers) if e["type"] == "m.room.message"
                                    and "m.new_content" in e["content"]), None), what="the edit relayed to carol")
    assert edit["sender"] == bot and edit["content"]["m.new_content"]["body"] == "alice: I'll be there at noon"
    assert edit["content"]["m.relates_to"] == {"rel_type": "m.replace", "event_id": relayed["event_id"]}, edit
    # carol invites bob, a member she has not accepted, into her room: he
    # joins (his messages still wait for her); a stranger to the group
    # invited there says so and leaves.
    carol.invite(hers, bob)
    wait_until(lambda: hs.members(hers).get(bob) == "join", what="bob joining carol's room")
    assert a.create_room([a.user("zed"), carol_uri]).status_code in (200, 201)
    zed = "@_cw_gk_zed:example.org"
    carol.invite(hers, zed)
    wait_until(lambda: hs.members(hers).get(zed) == "leave", what="a stranger leaving carol's room")
    assert any(who == zed and "not a member of the group" in body for who, body in said(hers)), said(hers)
    assert hs.members(hers).get(bob) == "join" and (bob, "count me in") not in said(hers)
    # Another user of this server invited into alice's room: taken back by
    # the bot (the room is alice's view; the peer's group takes members
    # from the peer), and not a member.
    hs.create_user("dave")
    alice.invite(mine, "@dave:example.org")
    wait_until(lambda: hs.members(mine).get("@dave:example.org") == "leave", what="dave's invitation taken back")
    # The kick comes first, the notice after it (mx_bot.c local_invited).
    wait_until(lambda: any(who == bot and "nobody else joins it" in body for who, body in said(mine)),
               what="the bot saying why")
    assert "mimi://example.org/u/dave" not in [m["user"] for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]]
    # The peer removes bob from the group: his ghost leaves the rooms.
    assert a.call("POST", f"/v1/rooms/{gid}/members", {"remove": [a.user("bob")]}).status_code == 200
    wait_until(lambda: hs.members(hers).get(bob) == "leave" and hs.members(mine).get(bob) == "leave",
               what="bob's ghost leaving the group's rooms")
    # Renamed: the portals follow without waiting for a message.
    assert a.call("PATCH", f"/v1/rooms/{gid}", {"name": "Dinner club"}).status_code == 200
    wait_until(lambda: hs.state(mine, "m.room.name")["content"]["name"] == "Dinner club",
               what="alice's room renamed")
    wait_until(lambda: hs.state(hers, "m.room.name")["content"]["name"] == "Dinner club",
               what="carol's room renamed")
    assert a.send(gid, a.user("wally"), "dinner instead?").status_code == 202
    wait_until(lambda: (wally, "dinner instead?") in said(mine), what="the message after the rename")
    # yves joins; what he writes waits for alice's consent.
    assert a.call("POST", f"/v1/rooms/{gid}/members", {"add": [a.user("yves")]}).status_code == 200
    yves_said = a.send(gid, a.user("yves"), "hello from yves").json()["id"]
    alices_row = (f"SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id JOIN identities t "
                  f"ON t.id = o.target_identity_id WHERE e.public_id = '{yves_said}' AND t.uri = '{ALICE}'")
    wait_until(lambda: pg.psql(alices_row, db_url) == "held", what="yves's message held for alice")
    # alice leaves her room: she has left the group; the bot and ghosts go.
    alice.leave(mine)
    wait_until(lambda: hs.members(mine).get(bot) == "leave" and hs.members(mine).get(wally) == "leave",
               what="the bot and ghosts leaving alice's room")
    assert pg.psql("SELECT m.membership FROM room_members m JOIN rooms r ON r.id = m.room_id JOIN identities i "
                   f"ON i.id = m.identity_id WHERE r.public_id = '{gid}' AND i.uri = '{ALICE}'", db_url) == "left"
    wait_until(lambda: (bot, "alice left the group.") in said(hers), what="the bot saying so to carol")
    assert [e["content"]["msgtype"] for e in hs.events(hers) if e["type"] == "m.room.message"
            and e["content"]["body"].startswith("alice ")] == ["m.notice", "m.notice"]
    assert a.send(gid, a.user("wally"), "see you all").status_code == 202
    wait_until(lambda: (wally, "see you all") in said(hers), what="the next message in carol's room")
    assert portal(ALICE_MX) is None
    assert (wally, "see you all") not in said(mine)
    # Her consent to yves comes after she left: what he wrote is not hers
    # any more, and no room of the group is made for her again.
    assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user", "subject": a.user("yves"),
                                               "state": "allowed"}).ok
    wait_until(lambda: pg.psql(alices_row, db_url) == "delivered", what="the row released, and done with")
    assert portal(ALICE_MX) is None


def alice_in_wallys_group(mx, hs, gk, pg, db_url, others):
    """A group of wally's with alice (who allowed wally) and others in it,
    wally's "hello group" in alice's room of it: alice (her client), her
    room, said(room) and state_to_alice(message id)."""
    a, _ = gk
    consent_alice(mx)
    _, alice_token = hs.create_user("alice")
    group = a.create_room([a.user("wally")] + others + [ALICE], kind="group").json()["id"]
    assert a.send(group, a.user("wally"), "hello group").status_code == 202

    def said(rid):
        return [(e["sender"], e["content"]["body"]) for e in hs.events(rid) if e["type"] == "m.room.message"]
    mine = wait_until(lambda: next((rid for rid in hs.rooms()
                                    if ("@_cw_gk_wally:example.org", "hello group") in said(rid)), None),
                      what="alice's room of the group")

    def state_to_alice(mid):
        return pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id JOIN identities t "
                       f"ON t.id = o.target_identity_id WHERE e.public_id = '{mid}' AND t.uri = '{ALICE}'", db_url)
    return group, hs.as_user(alice_token), mine, said, state_to_alice


def alice_writes(alice, mine, srv, text):
    alice.send_text(mine, text)
    wait_until(lambda: any(e.get("type") == "message" and e["content"]["parts"][0]["body"] == text
                           for e in list(srv.events)), what=f"alice's {text!r} at the peer")


def test_a_member_the_operator_removes_leaves_as_one_their_peer_removes(mx, hs, gk, pg, db_url):
    """POST /admin/v1/rooms/{id}/members with remove makes the same change
    as the peer's own removal: the ghost of the member leaves alice's room
    of the group, and the group goes on there without them. Until the
    twenty-fourth session the admin API had no member removal. The peer
    is told as of a member's leaving (a `membership` leave, ed its sender,
    once), and alice sees only the ghost's leaving, as when the peer
    removes him: nothing more is said in her room (since the twenty-fifth
    session; before, the peer was not told)."""
    a, srv = gk
    ed = a.user("ed")
    consent_alice(mx, ed)
    group, _, mine, said, _ = alice_in_wallys_group(mx, hs, gk, pg, db_url, [ed])
    ed_ghost, wally = "@_cw_gk_ed:example.org", "@_cw_gk_wally:example.org"
    assert a.send(group, ed, "ed here").status_code == 202
    wait_until(lambda: (ed_ghost, "ed here") in said(mine), what="ed's message in alice's room")
    assert hs.members(mine).get(ed_ghost) == "join"
    before = said(mine)
    r = mx.admin("POST", f"/rooms/{group}/members", json={"remove": [ed]})
    assert r.status_code == 200, r.text
    assert {m["uri"]: m["membership"] for m in r.json()["members"]}[ed] == "left"
    wait_until(lambda: hs.members(mine).get(ed_ghost) == "leave", what="ed's ghost leaving alice's room")
    told = wait_until(lambda: [e for e in list(srv.events) if e["type"] == "membership" and e["room_id"] == group
                               and e["content"].get("target") == ed] or None, what="ed's leaving at the peer")
    assert [(e["sender"], e["content"]) for e in told] == \
        [(ed, {"membership": "leave", "target": ed, "by": mx.options["server"]["domain"]})], told
    assert a.send(group, a.user("wally"), "without ed").status_code == 202
    wait_until(lambda: (wally, "without ed") in said(mine), what="the next message in alice's room")
    assert hs.members(mine).get(ed_ghost) == "leave"
    assert said(mine) == before + [(wally, "without ed")]
    assert srv.errors == [] and srv.duplicates == 0


def test_a_peer_users_own_leave_of_a_group_is_her_ghosts_leaving(mx, hs, gk, pg, db_url):
    """A `membership` leave a peer sends for its own user (POST
    /v1/rooms/{room}/messages, her sender and target) ends her membership
    as her peer's removal of her does (since the forty-first session), and
    alice sees it the same way: ed's ghost leaves alice's room of the
    group, nothing more is said there, and the group goes on without him.
    Until the forty-second session this had no test on the Matrix side."""
    a, srv = gk
    ed = a.user("ed")
    consent_alice(mx, ed)
    group, _, mine, said, _ = alice_in_wallys_group(mx, hs, gk, pg, db_url, [ed])
    ed_ghost, wally = "@_cw_gk_ed:example.org", "@_cw_gk_wally:example.org"
    assert a.send(group, ed, "ed here").status_code == 202
    wait_until(lambda: (ed_ghost, "ed here") in said(mine), what="ed's message in alice's room")
    assert hs.members(mine).get(ed_ghost) == "join"
    before = said(mine)
    r = a.call("POST", f"/v1/rooms/{group}/messages",
               {"type": "membership", "sender": ed, "content": {"membership": "leave", "target": ed}},
               idem="ed-leaves-" + group)
    assert r.status_code == 202, r.text
    assert ed not in [m["user"] for m in a.call("GET", f"/v1/rooms/{group}").json()["members"]]  # left
    assert pg.psql("SELECT m.membership FROM room_members m JOIN rooms r ON r.id = m.room_id JOIN identities i "
                   f"ON i.id = m.identity_id WHERE r.public_id = '{group}' AND i.uri = '{ed}'", db_url) == "left"
    wait_until(lambda: hs.members(mine).get(ed_ghost) == "leave", what="ed's ghost leaving alice's room")
    # His leaving is the ghost's own: no kick by the bot, no notice.
    leave = [e for e in hs.events(mine) if e["type"] == "m.room.member" and e["state_key"] == ed_ghost
             and e["content"]["membership"] == "leave"]
    assert len(leave) == 1 and leave[0]["sender"] == ed_ghost, member_events(hs, mine, ed_ghost)
    assert a.send(group, a.user("wally"), "without ed").status_code == 202
    wait_until(lambda: (wally, "without ed") in said(mine), what="the next message in alice's room")
    assert hs.members(mine).get(ed_ghost) == "leave"
    assert said(mine) == before + [(wally, "without ed")]
    assert srv.errors == [] and srv.duplicates == 0


def test_a_ghost_whose_leave_of_a_portal_fails_leaves_it_later(mx, hs, gk, pg, db_url):
    """The peer removes ed from the group while the homeserver does not
    take his ghost's leave of alice's room (503): the bot asks again,
    backing off, and once the homeserver takes it the ghost leaves, once.
    Until the forty-ninth session the bot counted the ghost out of the
    room (matrix_portal_members) before it asked, and a leave not taken
    left ed's ghost in alice's room for good, though he was gone."""
    a, srv = gk
    ed = a.user("ed")
    consent_alice(mx, ed)
    group, _, mine, said, _ = alice_in_wallys_group(mx, hs, gk, pg, db_url, [ed])
    ed_ghost = "@_cw_gk_ed:example.org"
    assert a.send(group, ed, "ed here").status_code == 202
    wait_until(lambda: (ed_ghost, "ed here") in said(mine), what="ed's message in alice's room")
    joined = member_events(hs, mine, ed_ghost)
    assert joined[-1] == (ed_ghost, "join"), joined

    def leaves():
        return [q for q in hs.requests if q["method"] == "POST" and q["path"].endswith("/leave")
                and q["user"] == ed_ghost]
    hs.refuse = lambda method, path, user: method == "POST" and path.endswith("/leave") and user == ed_ghost
    try:
        assert a.call("POST", f"/v1/rooms/{group}/members", {"remove": [ed]}).status_code == 200
        wait_until(lambda: len(leaves()) >= 2, timeout=20, what="the ghost's leave refused, and asked again")
        assert {q["status"] for q in leaves()} == {503}
        assert hs.members(mine).get(ed_ghost) == "join"
    finally:
        hs.refuse = None
    wait_until(lambda: hs.members(mine).get(ed_ghost) == "leave", timeout=20, what="ed's ghost leaving at last")
    time.sleep(1.5)  # the bot's next rounds ask nothing more
    assert [q["status"] for q in leaves()][-1] == 200 and len([q for q in leaves() if q["status"] == 200]) == 1
    assert member_events(hs, mine, ed_ghost) == joined + [(ed_ghost, "leave")]
    assert srv.errors == [] and srv.duplicates == 0


def test_a_ghosts_refused_leave_holds_up_no_other_departure(mx, hs, gk, pg, db_url):
    """The homeserver keeps refusing ed's ghost's leave of alice's room
    (503) while it takes fred's: the bot asks ed's again and again, backing
    off (2 s, 4 s, ...), and fred, removed from the group meanwhile, sees
    his ghost leave at the bot's next round.  Until the fiftieth session a
    refused leave backed off the whole round of departures: fred's waited
    for ed's next try (here 8 s; up to ten minutes)."""
    a, srv = gk
    ed, fred = a.user("ed"), a.user("fred")
    consent_alice(mx, ed)
    consent_alice(mx, fred)
    group, _, mine, said, _ = alice_in_wallys_group(mx, hs, gk, pg, db_url, [ed, fred])
    ed_ghost, fred_ghost = "@_cw_gk_ed:example.org", "@_cw_gk_fred:example.org"
    for who, ghost in ((ed, ed_ghost), (fred, fred_ghost)):
        assert a.send(group, who, "here").status_code == 202
        wait_until(lambda: (ghost, "here") in said(mine), what="the member's message in alice's room")

    def leaves(ghost):
        return [q for q in hs.requests if q["method"] == "POST" and q["path"].endswith("/leave")
                and q["user"] == ghost]
    hs.refuse = lambda method, path, user: method == "POST" and path.endswith("/leave") and user == ed_ghost
    try:
        assert a.call("POST", f"/v1/rooms/{group}/members", {"remove": [ed]}).status_code == 200
        wait_until(lambda: len(leaves(ed_ghost)) >= 3, timeout=20, what="ed's ghost's leave refused three times")
        removed = a.call("POST", f"/v1/rooms/{group}/members", {"remove": [fred]})
        assert removed.status_code == 200, removed.text
        wait_until(lambda: hs.members(mine).get(fred_ghost) == "leave", timeout=20, what="fred's ghost leaving")
        # From the removal answered (the daemon's access log) to the ghost's
        # leave at the homeserver (its thread's clock): not the test's
        # around its polls of the room, which counted its own turns too.
        answered = answered_at(mx, removed)
        took = min(q["time"] for q in leaves(fred_ghost)) - answered
        assert took < 3, took  # the bot's next round (500 ms); 5-8 s before
        assert {q["status"] for q in leaves(ed_ghost)} == {503} and hs.members(mine).get(ed_ghost) == "join"
    finally:
        hs.refuse = None
    wait_until(lambda: hs.members(mine).get(ed_ghost) == "leave", timeout=20, what="ed's ghost leaving at last")
    assert len([q for q in leaves(fred_ghost) if q["status"] == 200]) == 1
    assert srv.errors == [] and srv.duplicates == 0


def test_a_ghosts_leave_and_a_rename_answered_401_are_tried_again(mx, hs, gk, pg, db_url):
    """The homeserver answers ed's ghost's leave of alice's room, and the
    bot's rename of it, 401 M_UNKNOWN_TOKEN (its as_token not taken: a
    registration changed on one side, the operator's to fix): the bot asks
    again, backing off, and once the homeserver takes them again the
    ghost leaves and the room has the group's new name.  Until the
    fiftieth session a 401 counted as a refusal for good: the ghost was
    counted out of the room and stayed in it for good, and the name
    counted as given, never set."""
    a, srv = gk
    ed = a.user("ed")
    consent_alice(mx, ed)
    group, alice, mine, said, _ = alice_in_wallys_group(mx, hs, gk, pg, db_url, [ed])
    ed_ghost = "@_cw_gk_ed:example.org"
    assert a.send(group, ed, "ed here").status_code == 202
    wait_until(lambda: (ed_ghost, "ed here") in said(mine), what="ed's message in alice's room")
    alice.join(mine)  # a portal's name follows the group's once she is in
    wait_until(lambda: {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{group}").json()["members"]}[
        ALICE] == "joined", what="alice joined")

    def asked(what, user=None):
        return [q for q in hs.requests if q["method"] in ("POST", "PUT") and what in q["path"]
                and mine in urllib.parse.unquote(q["path"]) and (user is None or q["user"] == user)]

    def named():
        return (hs.state(mine, "m.room.name") or {}).get("content", {}).get("name")
    hs.refuse = lambda method, path, user: 401 if ((path.endswith("/leave") and user == ed_ghost)
                                                   or "/state/m.room.name" in path) else False
    try:
        assert a.call("POST", f"/v1/rooms/{group}/members", {"remove": [ed]}).status_code == 200
        assert a.call("PATCH", f"/v1/rooms/{group}", {"name": "Renamed 401"}).status_code == 200
        wait_until(lambda: len(asked("/leave", ed_ghost)) >= 2 and len(asked("/state/m.room.name")) >= 2,
                   timeout=20, what="the leave and the rename refused 401, and asked again")
        assert {q["status"] for q in asked("/leave", ed_ghost) + asked("/state/m.room.name")} == {401}
    finally:
        hs.refuse = None
    wait_until(lambda: hs.members(mine).get(ed_ghost) == "leave", timeout=20, what="ed's ghost leaving at last")
    wait_until(lambda: named() == "Renamed 401", timeout=20, what="the room renamed at last")
    assert srv.errors == [] and srv.duplicates == 0


def test_a_ghosts_refused_invitations_to_a_portal_are_logged_at_most_ten_a_second(mx, hs, gk, pg, db_url):
    """Forty members of a group each write to it once while the homeserver
    refuses the bot's invitations of their ghosts to alice's room of it
    (503): each row's failed invitation is a line a peer can multiply (one
    per member and message), so at most ten are written a second, the rest
    counted (`suppressed`). Until the forty-ninth session (this and the
    other lines of the makings of rooms and portals) each was written."""
    a, srv = gk
    flood = 40
    writers = [a.user(f"w{k:02d}") for k in range(flood)]
    assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "domain", "subject": "wa.example",
                                               "state": "allowed"}).ok
    group, _, mine, said, _ = alice_in_wallys_group(mx, hs, gk, pg, db_url, writers)
    bot = "@_cw_bot:example.org"
    hs.refuse = lambda method, path, user: user == bot and path.endswith("/invite")
    try:
        for w in writers:
            assert a.send(group, w, "hi from " + w).status_code == 202

        def lines():
            return [r for r in mx.records if r.get("msg") == "the bot cannot invite a ghost to a group"]

        def written():
            return [r for r in lines() if "room" in r]
        told = lambda: sum(int(r.get("suppressed", "0")) for r in lines())  # noqa: E731
        wait_until(lambda: len(written()) + told() >= flood, timeout=30, what="every refused invitation logged or counted")
    finally:
        hs.refuse = None
    per_second = collections.Counter(r["ts"][:19] for r in written())
    assert max(per_second.values()) <= 10 and told() > 0, (per_second, told())
    assert all(r["room"] == mine for r in written())


def member_events(hs, room, user):
    """(sender, membership) of each m.room.member event of user in room, in order."""
    return [(e["sender"], e["content"]["membership"]) for e in hs.events(room)
            if e["type"] == "m.room.member" and e["state_key"] == user]


def test_a_peer_users_leave_delivered_after_the_bot_made_her_ghost_leave_brings_it_back_no_more(
        make_daemon, db_url, hs, pg):
    """The row of a peer user's own leave of a group, to alice, is
    delivered after the bot's round has made her ghost leave alice's room
    (mx_bot.c departure_row: the two race, and the bot wins when the
    room's rows wait, here behind a message the homeserver refuses for a
    while): the ghost stays out. Until the forty-sixth session the row was
    prepared as one with something to say, so the ghost was invited and
    joined again, and the bot's next round made it leave again: alice saw
    ed leave twice (the test above failed so 1 run in 6 under load)."""
    mx = start_mx(make_daemon, db_url, hs, dispatcher={"retry_budget": "1000"})
    gk = add_gk(mx)
    a, srv = gk
    try:
        ed, wally = a.user("ed"), a.user("wally")
        consent_alice(mx, ed)
        group, _, mine, said, state_to_alice = alice_in_wallys_group(mx, hs, gk, pg, db_url, [ed])
        ed_ghost, wally_ghost = "@_cw_gk_ed:example.org", "@_cw_gk_wally:example.org"
        assert a.send(group, ed, "ed here").status_code == 202
        wait_until(lambda: (ed_ghost, "ed here") in said(mine), what="ed's message in alice's room")
        joined = member_events(hs, mine, ed_ghost)
        assert joined[-1] == (ed_ghost, "join"), joined
        # wally's next message fails until the homeserver takes sends again:
        # the room's later rows to alice wait behind it.
        hs.refuse_send = lambda path: True
        held = a.send(group, wally, "held back").json()["id"]
        tried = (f"SELECT o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
                 f"WHERE e.public_id = '{held}' AND o.state = 'pending'")
        wait_until(lambda: int(pg.psql(tried, db_url) or 0) >= 1, what="wally's message waiting for the homeserver")
        r = a.call("POST", f"/v1/rooms/{group}/messages",
                   {"type": "membership", "sender": ed, "content": {"membership": "leave", "target": ed}},
                   idem="ed-leaves-late-" + group)
        assert r.status_code == 202, r.text
        leave = r.json()["id"]
        wait_until(lambda: hs.members(mine).get(ed_ghost) == "leave", what="the bot making ed's ghost leave")
        assert state_to_alice(leave) in ("pending", "in_flight")  # his leave's row not delivered yet
        hs.refuse_send = None
        wait_until(lambda: state_to_alice(leave) == "delivered", what="ed's leave delivered to alice")
        assert member_events(hs, mine, ed_ghost) == joined + [(ed_ghost, "leave")]
        assert a.send(group, wally, "without ed").status_code == 202
        wait_until(lambda: (wally_ghost, "without ed") in said(mine), what="the next message in alice's room")
        assert member_events(hs, mine, ed_ghost) == joined + [(ed_ghost, "leave")]
        assert [t for _, t in said(mine)][-3:] == ["ed here", "held back", "without ed"]
        assert srv.errors == [] and srv.duplicates == 0
    finally:
        srv.close()


def test_a_members_message_delivered_after_her_leave_does_not_bring_her_ghost_back(make_daemon, db_url, hs, pg):
    """ed writes to a group, then leaves it, while his message to alice
    waits for the homeserver (which refuses sends for a while): his ghost
    stays in alice's room until the message is delivered there, then
    leaves, once. Until the forty-seventh session the bot's round made the
    ghost leave at once (mx_bot.c departure_row), and the message,
    delivered after, invited it and had it join again, write, and leave a
    second time at the bot's next round."""
    mx = start_mx(make_daemon, db_url, hs, dispatcher={"retry_budget": "1000"})
    gk = add_gk(mx)
    a, srv = gk
    try:
        ed = a.user("ed")
        consent_alice(mx, ed)
        group, _, mine, said, state_to_alice = alice_in_wallys_group(mx, hs, gk, pg, db_url, [ed])
        ed_ghost = "@_cw_gk_ed:example.org"
        assert a.send(group, ed, "ed here").status_code == 202
        wait_until(lambda: (ed_ghost, "ed here") in said(mine), what="ed's message in alice's room")
        joined = member_events(hs, mine, ed_ghost)
        assert joined[-1] == (ed_ghost, "join"), joined
        hs.refuse_send = lambda path: True
        late = a.send(group, ed, "last words").json()["id"]
        tried = ("SELECT o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
                 f"WHERE e.public_id = '{late}' AND o.state = 'pending'")
        wait_until(lambda: int(pg.psql(tried, db_url) or 0) >= 1, what="ed's message waiting for the homeserver")
        r = a.call("POST", f"/v1/rooms/{group}/messages",
                   {"type": "membership", "sender": ed, "content": {"membership": "leave", "target": ed}},
                   idem="ed-leaves-" + group)
        assert r.status_code == 202, r.text
        left = ("SELECT x.membership FROM room_members x JOIN identities i ON i.id = x.identity_id "
                f"JOIN rooms rm ON rm.id = x.room_id WHERE i.localpart = 'ed' AND rm.public_id = '{group}'")
        wait_until(lambda: pg.psql(left, db_url) == "left", what="ed out of the group")
        time.sleep(1.5)  # the bot's rounds (every 500 ms at least) while his message waits
        assert member_events(hs, mine, ed_ghost) == joined
        hs.refuse_send = None
        wait_until(lambda: state_to_alice(late) == "delivered", timeout=30, what="ed's message delivered")
        wait_until(lambda: hs.members(mine).get(ed_ghost) == "leave", what="ed's ghost leaving")
        time.sleep(1.5)  # the bot's next rounds bring nothing more
        assert member_events(hs, mine, ed_ghost) == joined + [(ed_ghost, "leave")]
        assert [t for _, t in said(mine)][-2:] == ["ed here", "last words"]
        assert srv.errors == [] and srv.duplicates == 0
    finally:
        srv.close()


def test_a_local_user_leaving_a_groups_room_waits_for_the_rooms_lock(mx, hs, gk, pg, db_url):
    """alice's leaving her room of a group (mx_bot.c left: the bot's work
    on the leave the appservice stored for it) marks her membership left
    under the room's lock of every write of events, as every other member
    change does: while another transaction holds that lock (a group write
    making its rows), she stays a member; once it commits, she has left,
    the bot and the ghosts leave her room, and the next message of the
    group makes no row to her. Until the twenty-sixth session the change
    took no lock, and a group write that had read her a member could
    still make her a row after she had left. The leave is put in the
    bot's inbox by hand: through the homeserver, the appservice's own
    write of the neutral leave (which takes the lock too) would wait
    first, and the bot's work would come only after it."""
    a, srv = gk
    group, _, mine, said, _ = alice_in_wallys_group(mx, hs, gk, pg, db_url, [])
    bot, wally = "@_cw_bot:example.org", "@_cw_gk_wally:example.org"
    key = int(pg.psql(f"SELECT id % 2147483647 FROM rooms WHERE public_id = '{group}'", db_url))
    membership = ("SELECT m.membership FROM room_members m JOIN rooms r ON r.id = m.room_id JOIN identities i "
                  f"ON i.id = m.identity_id WHERE r.public_id = '{group}' AND i.uri = '{ALICE}'")
    before = pg.psql(membership, db_url)
    assert before in ("joined", "invited"), before
    waiting = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1129796434 "
               f"AND objid = {key} AND objsubid = 2 AND NOT granted")
    leave = json.dumps({"type": "m.room.member", "event_id": "$alice-leaves-by-hand", "room_id": mine,
                        "sender": ALICE_MX, "state_key": ALICE_MX, "content": {"membership": "leave"}})
    held = HeldSession(db_url)
    try:
        held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, {key});")
        pg.psql("INSERT INTO matrix_bot_inbox (event_id, event) VALUES ('$alice-leaves-by-hand', "
                f"'{leave}'::jsonb); NOTIFY causeway_matrix_bot", db_url)
        wait_until(lambda: pg.psql(waiting, db_url) == "1" or pg.psql(membership, db_url) == "left",
                   what="the bot's leave waiting for the room's lock (or done without it)")
        assert pg.psql(membership, db_url) == before
        assert pg.psql(waiting, db_url) == "1"
    finally:
        held.end()  # commits
    wait_until(lambda: pg.psql(membership, db_url) == "left", what="alice's membership left")
    wait_until(lambda: hs.members(mine).get(bot) == "leave" and hs.members(mine).get(wally) == "leave",
               what="the bot and the ghost leaving alice's room")
    r = a.send(group, a.user("wally"), "after alice")
    assert r.status_code == 202, r.text
    assert pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id JOIN identities t "
                   f"ON t.id = o.target_identity_id WHERE e.public_id = '{r.json()['id']}' "
                   f"AND t.uri = '{ALICE}'", db_url) == "0"
    assert (wally, "after alice") not in said(mine)


@pytest.mark.parametrize("who", ["local", "ghost"])
def test_a_local_user_adding_a_member_to_a_group_waits_for_the_rooms_lock(mx, hs, gk, pg, db_url, who):
    """alice's inviting carol (another user here) or zed's ghost into her
    room of a group made here (mx_bot.c grow_group: the bot's work on the
    invitation) makes them a member under the room's lock of every write
    of events, taken first in the same transaction, as every other member
    change does: while another transaction holds that lock (a group write
    making its rows), they are no member; once it commits, carol is
    invited (zed joined), and the group's next message makes her a row.
    Until the twenty-sixth session the change took no lock, and a group
    write that had read the members before it could miss them. carol's
    invitation is put in the bot's inbox by hand, as in the leave's test
    above; zed's ghost must be invited for real (it joins the room before
    the bot's transaction)."""
    a, srv = gk
    consent_alice(mx)
    consent_alice(mx, a.user("bob"))
    a.create_room([a.user("bob"), "mimi://example.org/u/someone"])  # the peer introduced bob
    a.create_room([a.user("zed"), "mimi://example.org/u/someone"])  # and zed
    alice, room, wally = alice_writes_to_wally(hs, a)
    bob, zed = "@_cw_gk_bob:example.org", "@_cw_gk_zed:example.org"
    alice.invite(room, bob)
    wait_until(lambda: hs.members(room).get(bob) == "join", what="bob's ghost in")
    group = wait_until(lambda: pg.psql("SELECT public_id FROM rooms WHERE kind = 'group'", db_url), what="a group")
    hs.create_user("carol")
    new = "mimi://example.org/u/carol" if who == "local" else a.user("zed")
    key = int(pg.psql(f"SELECT id % 2147483647 FROM rooms WHERE public_id = '{group}'", db_url))
    membership = ("SELECT m.membership FROM room_members m JOIN rooms r ON r.id = m.room_id JOIN identities i "
                  f"ON i.id = m.identity_id WHERE r.public_id = '{group}' AND i.uri = '{new}'")
    assert pg.psql(membership, db_url) == ""
    waiting = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1129796434 "
               f"AND objid = {key} AND objsubid = 2 AND NOT granted")
    invite = json.dumps({"type": "m.room.member", "event_id": "$carol-invited-by-hand", "room_id": room,
                         "sender": ALICE_MX, "state_key": "@carol:example.org", "content": {"membership": "invite"}})
    held = HeldSession(db_url)
    try:
        held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, {key});")
        if who == "local":
            pg.psql("INSERT INTO matrix_bot_inbox (event_id, event) VALUES ('$carol-invited-by-hand', "
                    f"'{invite}'::jsonb); NOTIFY causeway_matrix_bot", db_url)
        else:
            alice.invite(room, zed)
            wait_until(lambda: hs.members(room).get(zed) == "join", what="zed's ghost joining the room")
        wait_until(lambda: pg.psql(waiting, db_url) == "1" or pg.psql(membership, db_url) != "",
                   what="the bot's invitation waiting for the room's lock (or done without it)")
        assert pg.psql(membership, db_url) == ""
        assert pg.psql(waiting, db_url) == "1"
    finally:
        held.end()  # commits
    wait_until(lambda: pg.psql(membership, db_url) == ("invited" if who == "local" else "joined"),
               what="the new member in the group")
    assert new in [m["user"] for m in a.call("GET", f"/v1/rooms/{group}").json()["members"]]


@pytest.mark.parametrize("how", ["pushed", "found"])
def test_an_invited_user_joining_waits_for_the_rooms_lock(mx, hs, gk, pg, db_url, how):
    """carol, invited into alice's group (alice invited her into her
    direct room with wally), joins the room the bot made her: her join
    marks her joined (matrix.c joins_of_invitees, on a reader before the
    transaction's write) under the group room's lock of every write of
    events, as every other member change does: while another transaction
    holds that lock (a group write making its rows), she stays invited;
    once it commits, she is joined, and her join reaches the peer once.
    So too when the bot finds her join itself (mx_deliver.c
    mx_mark_if_joined: here its look at members still invited a minute
    after the last, as after a join an older daemon took). Until the
    twenty-seventh session the mark took no lock, and a group write that
    had read her invited could commit after it."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi wally")
    srv.wait_events(1)
    carol = hs.as_user(hs.create_user("carol")[1])
    carol_mx, carol_uri, bot = "@carol:example.org", "mimi://example.org/u/carol", "@_cw_bot:example.org"
    alice.invite(room, carol_mx)
    group = wait_until(lambda: pg.psql("SELECT public_id FROM rooms WHERE kind = 'group'", db_url), what="the group")
    hers = wait_until(lambda: pg.psql("SELECT b.native_id FROM room_bindings b JOIN identities i "
                                      f"ON i.id = b.local_identity_id WHERE i.uri = '{carol_uri}'", db_url),
                      what="carol's room bound")
    # the bot's look at her room's members once it was bound: not joined
    wait_until(lambda: any(urllib.parse.unquote(q["path"]).endswith(f"/rooms/{hers}/members")
                           and q["status"] == 200 for q in hs.requests), what="the bot's first look")
    key = int(pg.psql(f"SELECT id % 2147483647 FROM rooms WHERE public_id = '{group}'", db_url))
    membership = ("SELECT m.membership FROM room_members m JOIN rooms r ON r.id = m.room_id JOIN identities i "
                  f"ON i.id = m.identity_id WHERE r.public_id = '{group}' AND i.uri = '{carol_uri}'")
    waiting = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1129796434 "
               f"AND objid = {key} AND objsubid = 2 AND NOT granted")
    assert pg.psql(membership, db_url) == "invited"

    def joins():
        return [e for e in list(srv.events) if e.get("type") == "membership" and e["room_id"] == group
                and e["content"]["membership"] == "join" and e["sender"] == carol_uri]
    if how == "found":
        carol.join(hers)
        wait_until(lambda: pg.psql(membership, db_url) == "joined" and joins(), what="carol joined")
    held = HeldSession(db_url)
    try:
        held.run(f"BEGIN; SELECT pg_advisory_xact_lock(1129796434, {key});")
        if how == "pushed":
            carol.join(hers)
        else:  # an older daemon took the join: still invited (set under the lock, before the bot looks)
            pg.psql("UPDATE room_members x SET membership = 'invited', updated_at = now() - interval '2 minutes' "
                    f"FROM identities i WHERE i.id = x.identity_id AND i.uri = '{carol_uri}'", db_url)
        wait_until(lambda: pg.psql(waiting, db_url) == "1" or pg.psql(membership, db_url) == "joined",
                   timeout=30, what="her join waiting for the room's lock (or marked without it)")
        assert pg.psql(membership, db_url) == "invited"
        assert pg.psql(waiting, db_url) == "1"
    finally:
        held.end()  # commits
    wait_until(lambda: pg.psql(membership, db_url) == "joined", what="carol joined")
    assert group_members(a, group) == {ALICE: "joined", a.user("wally"): "joined", carol_uri: "joined"}
    alice.send_text(room, "carol is with us")
    wait_until(lambda: any(e["type"] == "m.room.message" and e["sender"] == bot and
                           e["content"]["body"] == "alice: carol is with us" for e in hs.events(hers)),
               what="alice's message in carol's room")
    # (what reached carol's room says nothing of what reached the peer:
    # her join and, after it in the group's order, alice's message)
    wait_until(lambda: joins() and any(e.get("type") == "message" and e["content"]["parts"][0]["body"] ==
                                       "carol is with us" for e in list(srv.events)), what="both at the peer")
    assert len(joins()) == 1, joins()


def test_writing_in_a_group_lets_its_members_reach_the_writer_there_only(mx, hs, gk, pg, db_url):
    """spec/policy.md: a local user's message is consent to the remote user
    "for that conversation". alice (who allowed wally, not ed) writes in a
    group wally made with ed in it: from then on ed's messages in that
    group reach her (user_wrote_in_group), and it is no consent to ed: his
    first message in a direct room waits for her. Until the twenty-first session writing once in a
    group stored a consent and an opt-in for every remote member, good
    everywhere (a review's finding)."""
    a, srv = gk
    ed = a.user("ed")
    group, alice, mine, said, state_to_alice = alice_in_wallys_group(mx, hs, gk, pg, db_url, [ed])
    ed_ghost = "@_cw_gk_ed:example.org"
    alice.join(mine)
    alice_writes(alice, mine, srv, "hi all")
    # No consent to anyone, no opt-in: the fact is her membership's.
    assert pg.psql(f"SELECT count(*) FROM consents WHERE subject = '{ed}'", db_url) == "0"
    assert pg.psql("SELECT count(*) FROM consents WHERE source = 'outbound'", db_url) == "0"
    assert pg.psql("SELECT m.wrote_at IS NOT NULL FROM room_members m JOIN rooms r ON r.id = m.room_id JOIN "
                   f"identities i ON i.id = m.identity_id WHERE r.public_id = '{group}' AND i.uri = '{ALICE}'",
                   db_url) == "t"
    later = a.send(group, ed, "ed, after alice wrote").json()["id"]
    assert state_to_alice(later) != "held"
    wait_until(lambda: (ed_ghost, "ed, after alice wrote") in said(mine), what="ed's later message in her room")
    # Elsewhere ed is a first contact still; so is yves, whom gk adds to
    # the group after she wrote, until she writes there again.
    dm = a.create_room([ed, ALICE]).json()["id"]
    first = a.send(dm, ed, "psst, just us").json()["id"]
    assert state_to_alice(first) == "held"
    assert a.call("POST", f"/v1/rooms/{group}/members", {"add": [a.user("yves")]}).status_code == 200
    assert state_to_alice(a.send(group, a.user("yves"), "yves here").json()["id"]) == "held"
    alice_writes(alice, mine, srv, "welcome yves")
    assert state_to_alice(a.send(group, a.user("yves"), "thanks").json()["id"]) != "held"


def test_writing_in_a_group_releases_what_its_members_sent_before(mx, hs, gk, pg, db_url):
    """What ed sent in the group before alice wrote there waited for her
    (a first contact); her writing there is her consent to him in that
    group, so the sweep releases it (user_wrote_in_group, within
    policy.sweep_interval_ms) and what he sent after follows it, in order.
    Until the twenty-second session it waited for her answer to its
    consent request, and held his later messages to her behind it (per
    sender order). Her block of mal still wins: his held message is
    dropped, never shown."""
    a, srv = gk
    ed, mal = a.user("ed"), a.user("mal")
    group, alice, mine, said, state_to_alice = alice_in_wallys_group(mx, hs, gk, pg, db_url, [ed, mal])
    ed_ghost, mal_ghost = "@_cw_gk_ed:example.org", "@_cw_gk_mal:example.org"
    before = a.send(group, ed, "ed, before alice wrote").json()["id"]
    blocked = a.send(group, mal, "mal, before alice wrote").json()["id"]
    assert state_to_alice(before) == "held" and state_to_alice(blocked) == "held"
    # Her block of mal, and her consents, older than the periodic sweep's
    # ten minutes: the sweep that looks at her held rows now is the one of
    # her writing in the group.
    pg.psql("INSERT INTO consents (local_identity_id, subject_kind, subject, state, source) "
            f"SELECT id, 'user', '{mal}', 'blocked', 'admin' FROM identities WHERE uri = '{ALICE}'", db_url)
    pg.psql("UPDATE consents SET updated_at = now() - interval '1 hour'", db_url)
    alice.join(mine)
    alice_writes(alice, mine, srv, "hi all")
    after = a.send(group, ed, "ed, after alice wrote").json()["id"]
    wait_until(lambda: (ed_ghost, "ed, after alice wrote") in said(mine), timeout=30,
               what="ed's messages in her room")
    assert [m for m in said(mine) if m[0] == ed_ghost] == [(ed_ghost, "ed, before alice wrote"),
                                                           (ed_ghost, "ed, after alice wrote")], said(mine)
    why = mx.admin("GET", f"/messages/{before}/decision").json()
    hers = [r for r in why["recipients"] if r["recipient"] == ALICE]
    assert [(r["verdict"], r["reason"]) for r in hers] == [("allow", "user_wrote_in_group")], why
    assert [(d["verdict"], d["reason"], d["details"].get("by")) for d in why["decisions"]
            if d["recipient"] == ALICE][-1] == ("allow", "user_wrote_in_group", "sweep"), why
    # Her consent request for ed stays for her to answer: writing in the
    # group is no consent to him elsewhere.
    assert pg.psql("SELECT q.state FROM consent_requests q JOIN identities s ON s.id = q.remote_identity_id "
                   f"WHERE s.uri = '{ed}'", db_url) == "pending"
    wait_until(lambda: state_to_alice(blocked) == "dropped", what="mal's message dropped")
    assert mal_ghost not in [who for who, _ in said(mine)]
    wait_until(lambda: state_to_alice(after) == "delivered", what="ed's later message delivered")


def test_one_bot_answers_for_every_process(make_daemon, db_url, hs):
    """Two processes share the database: one bot acts (an advisory lock),
    so a user who invites it is joined and answered once, not once per
    process; when the holder stops, the other one's bot takes over."""
    bot = "@_cw_bot:example.org"
    first = start_mx(make_daemon, db_url, hs)
    port = free_port()
    second = make_daemon(db_url, options={
        "server": {"port": str(port)},
        "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN, "hs_token": HS_TOKEN}}).start()
    alice, mgmt, said = alice_and_the_bot(hs)
    time.sleep(1.5)  # both bots heard the invite's NOTIFY by now
    assert sum("Commands" in n for n in said()) == 1, said()
    joins = [e for e in hs.events(mgmt) if e["type"] == "m.room.member" and e.get("state_key") == bot
             and e["content"].get("membership") == "join"]
    assert len(joins) == 1
    # The holder (the first, started first) goes; the homeserver now
    # reaches the second, whose bot answers.
    first.stop()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    alice.send_text(mgmt, "list")
    wait_until(lambda: len(said()) >= 2, timeout=15, what="an answer from the second process's bot")
    time.sleep(1)
    assert len(said()) == 2, said()
    second.stop()


def test_a_local_user_a_peer_puts_in_a_group_gets_nothing_she_did_not_accept(mx, hs, gk, pg, db_url):
    """gk puts bob, who never opted in nor accepted anyone, into a group
    with alice: he is invited, not joined. alice's message there is not
    relayed to him and wally's is decided for him as any inbound one
    (dropped: not opted in), so he gets no room named by the peer. Once
    he accepts wally, wally's next message brings him his room; joining it
    makes him a member (and alice's messages reach him). carol, who
    accepted wally too, declines her room: the peer hears nothing of it
    and lists her invited still. Until the thirty-first session bob was
    joined at once, got a room with alice's messages, and his leaving was
    listed `left` (a review's finding)."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    bob_uri, carol_uri = "mimi://example.org/u/bob", "mimi://example.org/u/carol"
    consent_alice(mx)
    assert mx.admin("POST", "/optins", json={"user": carol_uri, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": carol_uri, "subject_kind": "user",
                                               "subject": a.user("wally"), "state": "allowed"}).ok
    _, alice_token = hs.create_user("alice")
    _, bob_token = hs.create_user("bob")
    _, carol_token = hs.create_user("carol")
    alice, bob, carol = hs.as_user(alice_token), hs.as_user(bob_token), hs.as_user(carol_token)
    gid = a.create_room([a.user("wally"), ALICE], kind="group", name="You won!").json()["id"]
    assert a.send(gid, a.user("wally"), "hello").status_code == 202

    def portal(user):
        return next((rid for rid in hs.rooms() if hs.state(rid, "m.room.create")
                     and hs.state(rid, "m.room.create")["sender"] == bot
                     and hs.members(rid).get(user) in ("invite", "join", "leave")), None)

    def said(rid):
        return [(e["sender"], e["content"]["body"]) for e in hs.events(rid) if e["type"] == "m.room.message"]

    def listed():
        return {m["user"]: m["membership"] for m in a.call("GET", f"/v1/rooms/{gid}").json()["members"]}

    mine = wait_until(lambda: portal(ALICE_MX), what="alice's room")
    alice.join(mine)
    wait_until(lambda: listed()[ALICE] == "joined", what="alice joined")
    r = a.call("POST", f"/v1/rooms/{gid}/members", {"add": [bob_uri, carol_uri]})
    assert r.status_code == 200 and {m["user"]: m["membership"] for m in r.json()["members"]}[bob_uri] == "invited"
    alice.send_text(mine, "hi all")
    wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "message"
                        and e["content"]["parts"][0]["body"] == "hi all"], what="alice's message at the peer")
    second = a.send(gid, a.user("wally"), "second").json()["id"]
    hers = wait_until(lambda: portal("@carol:example.org"), what="carol's room")
    wait_until(lambda: ("@_cw_gk_wally:example.org", "second") in said(hers), what="wally's message for carol")
    # bob: no row of alice's message, wally's dropped, no room.
    rows = pg.psql("SELECT string_agg(e.type || ' ' || o.state, ',' ORDER BY o.id) FROM outbox o "
                   "JOIN events e ON e.id = o.event_id JOIN identities t ON t.id = o.target_identity_id "
                   f"WHERE t.uri = '{bob_uri}'", db_url)
    assert rows == "message dropped", rows
    assert portal("@bob:example.org") is None
    assert ("@_cw_bot:example.org", "alice: hi all") not in said(hers)  # carol has not joined either
    # carol declines her room: nothing reaches the peer, she is listed invited.
    carol.leave(hers)
    wait_until(lambda: pg.psql("SELECT m.membership FROM room_members m JOIN identities i ON i.id = m.identity_id "
                               f"WHERE i.uri = '{carol_uri}'", db_url) == "left", what="carol's leaving stored")
    assert listed()[carol_uri] == "invited" and listed()[bob_uri] == "invited"
    # bob accepts wally: wally's next message brings his room; his join
    # makes him a member, and alice's messages reach him then.
    assert mx.admin("POST", "/optins", json={"user": bob_uri, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": bob_uri, "subject_kind": "user",
                                               "subject": a.user("wally"), "state": "allowed"}).ok
    wait_until(lambda: a.send(gid, a.user("wally"), "third").status_code == 202 and pg.psql(
        "SELECT count(*) FROM outbox o JOIN identities t ON t.id = o.target_identity_id "
        f"WHERE t.uri = '{bob_uri}' AND o.state <> 'dropped'", db_url) != "0", what="a message let through to bob")
    his = wait_until(lambda: portal("@bob:example.org"), what="bob's room")
    bob.join(his)
    wait_until(lambda: listed()[bob_uri] == "joined", what="bob joined")
    alice.send_text(mine, "welcome bob")
    wait_until(lambda: (bot, "alice: welcome bob") in said(his), what="alice's message relayed to bob")
    assert second  # wally's second message was the one dropped for bob
    leaves = [e for e in list(srv.events) if e.get("type") == "membership" and e.get("sender") == carol_uri]
    assert leaves == [], leaves


def bots_room_of(hs, user):
    """The room the bot made with user invited (their room of a group), or None."""
    bot = "@_cw_bot:example.org"
    return next((rid for rid in hs.rooms() if hs.state(rid, "m.room.create")
                 and hs.state(rid, "m.room.create")["sender"] == bot
                 and hs.members(rid).get(user) in ("invite", "join", "leave")), None)


def test_a_missed_join_of_a_user_a_peer_invited_is_found_by_the_bot(mx, hs, gk, pg, db_url):
    """bob, whom gk put into a group (invited, schema/037), accepted wally:
    wally's message brings him his room of the group, and his join makes
    him a member. A join the daemon missed (taken by an older daemon
    during a rolling restart) is found by the bot's look at members still
    invited a minute after its last look, as for one a local member
    invited. Until the thirty-second session that look asked for the
    member's Matrix identity binding, which a user a peer invited does not
    have (the bot never met her): she stayed invited for good."""
    a, srv = gk
    bob_uri = "mimi://example.org/u/bob"
    assert mx.admin("POST", "/optins", json={"user": bob_uri, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": bob_uri, "subject_kind": "user",
                                               "subject": a.user("wally"), "state": "allowed"}).ok
    bob = hs.as_user(hs.create_user("bob")[1])
    gid = a.create_room([a.user("wally"), bob_uri], kind="group", name="Quiz").json()["id"]
    assert group_members(a, gid)[bob_uri] == "invited"
    assert a.send(gid, a.user("wally"), "hello bob").status_code == 202
    his = wait_until(lambda: bots_room_of(hs, "@bob:example.org"), what="bob's room")
    bob.join(his)
    wait_until(lambda: group_members(a, gid)[bob_uri] == "joined", what="bob joined")
    assert pg.psql("SELECT count(*) FROM identity_bindings ib JOIN identities i ON i.id = ib.identity_id "
                   f"WHERE i.uri = '{bob_uri}' AND ib.network = 'matrix'", db_url) == "0", \
        "bob has a binding: the test shows nothing"
    # the join an older daemon took: he is still invited here
    # (checked by what the UPDATE returns: the bot may find the join again
    # before a look through the peer API, which failed the test under load)
    assert pg.psql("UPDATE room_members x SET membership = 'invited', peer_invited = true, "
                   "updated_at = now() - interval '2 minutes' FROM identities i "
                   f"WHERE i.id = x.identity_id AND i.uri = '{bob_uri}' RETURNING x.membership", db_url) == "invited"
    wait_until(lambda: group_members(a, gid)[bob_uri] == "joined", timeout=15, what="bob's join found by the bot")
    assert pg.psql("SELECT x.peer_invited FROM room_members x JOIN identities i ON i.id = x.identity_id "
                   f"WHERE i.uri = '{bob_uri}'", db_url) == "f"


def test_a_join_before_the_room_of_a_group_is_bound_makes_a_member(mx, hs, gk, pg, db_url):
    """bob, whom gk put into a group, joins his room of it as soon as it is
    made (an auto-joining client), before the daemon that made it bound it
    (the binding is held here by a lock on room_bindings): the homeserver's
    transaction with his join finds no bridged room and carries nothing.
    Once bound, the daemon asks the homeserver whether he joined, as the
    bot does of a room it makes, and he is a member at once, the peer told.
    Until the thirty-ninth session a room the delivery made (the one of a
    user a peer invited: the bot never makes his) was not asked about: he
    stayed invited for a minute, until the bot's look at members still
    invited (a test failed under load so)."""
    a, srv = gk
    bob_uri, bob_mx = "mimi://example.org/u/bob", "@bob:example.org"
    assert mx.admin("POST", "/optins", json={"user": bob_uri, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": bob_uri, "subject_kind": "user",
                                               "subject": a.user("wally"), "state": "allowed"}).ok
    bob = hs.as_user(hs.create_user("bob")[1])
    gid = a.create_room([a.user("wally"), bob_uri], kind="group", name="Quiz").json()["id"]
    assert group_members(a, gid)[bob_uri] == "invited"
    held = HeldSession(db_url)
    try:
        held.run("BEGIN; LOCK TABLE room_bindings IN SHARE MODE;")
        assert a.send(gid, a.user("wally"), "hello bob").status_code == 202
        his = wait_until(lambda: bots_room_of(hs, bob_mx), what="bob's room")
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND query LIKE 'INSERT INTO room_bindings%'", db_url) == "1",
                   timeout=30, what="the binding of bob's room waiting for the lock")
        bob.join(his)
        wait_until(lambda: any(t["done"] and any(e["type"] == "m.room.member" and e.get("state_key") == bob_mx
                                                 and e["content"]["membership"] == "join" for e in t["events"])
                               for t in hs.transactions), what="the transaction with bob's join taken")
        assert pg.psql("SELECT count(*) FROM room_bindings WHERE native_id = '" + his + "'", db_url) == "0"
        held.end()
    finally:
        held.end()
    wait_until(lambda: group_members(a, gid)[bob_uri] == "joined", what="bob joined")
    def joins():
        return [e for e in list(srv.events) if e.get("type") == "membership"
                and e["sender"] == bob_uri and e["content"]["membership"] == "join"]
    wait_until(joins, what="bob's join at the peer")
    assert pg.psql("SELECT x.peer_invited FROM room_members x JOIN identities i ON i.id = x.identity_id "
                   f"WHERE i.uri = '{bob_uri}'", db_url) == "f"
    wait_until(lambda: any(e["type"] == "m.room.message" and e["content"].get("body") == "hello bob"
                           for e in hs.events(his)), what="wally's message in bob's room")
    assert len(joins()) == 1, joins()  # the join is told once


def test_a_group_name_stored_with_controls_reaches_matrix_shown_clean(mx, hs, gk, pg, db_url):
    """A group's name stored before the thirty-first session may hold what
    the peer API refuses now (C1 controls, bidirectional overrides, or
    nothing visible at all): the bot names the portal with what of it
    shows (cw_utf8_name_shown, as a ghost's display name), or names it not
    at all when nothing does, both when it makes the room and when the
    group is renamed. A name that passes the check today goes as it is.
    Until the thirty-second session the stored name went to Matrix as it
    was: U+202E turned what followed round in every client."""
    a, srv = gk
    consent_alice(mx)
    alice = hs.as_user(hs.create_user("alice")[1])
    gid = a.create_room([a.user("wally"), ALICE], kind="group", name="Fine name").json()["id"]
    # stored before the check (written here as an old daemon would have)
    pg.psql("UPDATE rooms SET name = 'Quiz' || chr(8238) || 'evil' || chr(133) || 'night' "
            f"WHERE public_id = '{gid}'", db_url)
    assert a.send(gid, a.user("wally"), "hello").status_code == 202
    mine = wait_until(lambda: bots_room_of(hs, ALICE_MX), what="alice's room")
    name = lambda: (hs.state(mine, "m.room.name") or {}).get("content", {}).get("name")  # noqa: E731
    assert name() == "Quizevil night", name()
    alice.join(mine)  # the bot renames the rooms of members
    wait_until(lambda: group_members(a, gid)[ALICE] == "joined", what="alice joined")
    # renamed to nothing visible: the room's name goes
    pg.psql("UPDATE rooms SET name = chr(8203) || chr(10240) || ' ' WHERE public_id = "
            f"'{gid}'", db_url)
    wait_until(lambda: name() == "", what="the name taken away")
    # a valid name with invisible parts of its own (a ZWJ emoji) goes whole
    good = "Family \U0001F468\u200d\U0001F469\u200d\U0001F467"
    assert a.call("PATCH", f"/v1/rooms/{gid}", {"name": good}).status_code == 200
    wait_until(lambda: name() == good, what="the valid name, whole")


def test_a_rename_wakes_the_bot(mx, hs, gk, pg, db_url):
    """A peer's rename (PATCH /v1/rooms/{room}) of a group with Matrix
    portals notifies causeway_matrix_bot as it commits: the bot renames the
    portals at once instead of at its next round (until the forty-fifth
    session nothing woke it, and an idle bot looked every half second). A
    group without a portal wakes nothing."""
    a, srv = gk
    consent_alice(mx)
    alice = hs.as_user(hs.create_user("alice")[1])
    gid = a.create_room([a.user("wally"), ALICE], kind="group", name="First").json()["id"]
    other = a.create_room([a.user("wally"), a.user("bob")], kind="group", name="Peers only").json()["id"]
    assert a.send(gid, a.user("wally"), "hello").status_code == 202
    mine = wait_until(lambda: bots_room_of(hs, ALICE_MX), what="alice's room")
    alice.join(mine)
    wait_until(lambda: group_members(a, gid)[ALICE] == "joined", what="alice joined")
    got = []  # the bot is notified of other work too (an event pushed for it): the payload tells
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.add_notify_handler(lambda n: got.append(n.payload))
        conn.execute("LISTEN causeway_matrix_bot")
        assert a.call("PATCH", f"/v1/rooms/{other}", {"name": "Still peers"}).status_code == 200
        conn.execute("SELECT 1")
        assert "rename" not in got, got
        assert a.call("PATCH", f"/v1/rooms/{gid}", {"name": "Second"}).status_code == 200
        # the PATCH was answered once committed, its notification sent
        wait_until(lambda: conn.execute("SELECT 1") and "rename" in got, timeout=5, what="the bot notified")
    assert got.count("rename") == 1, got
    wait_until(lambda: (hs.state(mine, "m.room.name") or {}).get("content", {}).get("name") == "Second",
               what="alice's room renamed")


def test_a_rename_the_homeserver_fails_is_tried_again_later_not_every_round(mx, hs, gk, pg, db_url):
    """A portal's rename the homeserver does not take for now waits: after a
    429 as long as it asked (retry_after_ms, Retry-After), after a 5xx 2 s,
    4 s, ... and each failure is logged through a limiter. Until the
    forty-fifth session it was asked again every round of the bot's (about
    twice a second when idle), a warning each time, the 429's wait not
    kept. Once the homeserver takes it, the portal has the new name."""
    a, srv = gk
    consent_alice(mx)
    alice = hs.as_user(hs.create_user("alice")[1])
    gid = a.create_room([a.user("wally"), ALICE], kind="group", name="First").json()["id"]
    assert a.send(gid, a.user("wally"), "hello").status_code == 202
    mine = wait_until(lambda: bots_room_of(hs, ALICE_MX), what="alice's room")
    alice.join(mine)
    wait_until(lambda: group_members(a, gid)[ALICE] == "joined", what="alice joined")
    name = lambda: (hs.state(mine, "m.room.name") or {}).get("content", {}).get("name")  # noqa: E731
    assert name() == "First"

    def renames():
        return [r for r in hs.requests if r["method"] == "PUT" and "/state/m.room.name" in r["path"]]

    def refuse_renames(answer):
        hs.refuse = lambda method, path, user: answer if method == "PUT" and "/state/m.room.name" in path else False

    # A 429 asking 3 s: the next try comes no sooner.
    hs.refuse_retry_after_ms = 3000
    refuse_renames(429)
    before = len(renames())
    assert a.call("PATCH", f"/v1/rooms/{gid}", {"name": "Second"}).status_code == 200
    first = wait_until(lambda: renames()[before:] or None, what="the rename tried")[0]
    assert first["status"] == 429
    hs.refuse = None
    wait_until(lambda: name() == "Second", what="the portal renamed after the wait")
    taken = next(r for r in renames()[before:] if r["status"] == 200)
    assert taken["time"] - first["time"] >= 2.9, [(r["status"], r["time"] - first["time"]) for r in renames()[before:]]
    assert [r["status"] for r in renames()[before:]] == [429, 200]
    # 503 for 5 s: tried at 0 s, 2 s, then 6 s (not ten times).
    refuse_renames(True)
    before = len(renames())
    assert a.call("PATCH", f"/v1/rooms/{gid}", {"name": "Third"}).status_code == 200
    first = wait_until(lambda: renames()[before:] or None, what="the rename tried")[0]
    assert first["status"] == 503
    time.sleep(5)
    hs.refuse = None
    tried = renames()[before:]
    assert all(r["status"] == 503 for r in tried) and len(tried) <= 3, \
        [(r["status"], round(r["time"] - first["time"], 2)) for r in tried]
    wait_until(lambda: name() == "Third", what="the portal renamed once the homeserver takes it")
    warned = mx.log().count("cannot rename a group's room")
    assert 1 <= warned <= len(tried) + 1, warned



def test_a_portal_whose_making_is_rate_limited_waits_as_asked(mx, hs, gk, pg, db_url):
    """The bot's createRoom of the portal of a user invited into a group,
    answered 429 M_LIMIT_EXCEEDED, is tried again no sooner than the
    homeserver asked (retry_after_ms, Retry-After), as a portal's rename
    is; until the forty-fifth session's review it was tried again 2 s
    later whatever the 429 asked. Once the homeserver takes it, she has
    her room."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi wally")
    srv.wait_events(1)
    hs.create_user("carol")
    bot = "@_cw_bot:example.org"

    def makings():
        return [r for r in hs.requests if r["method"] == "POST" and r["path"].endswith("/createRoom")
                and r["user"] == bot]
    before = len(makings())
    hs.refuse_retry_after_ms = 5000
    hs.refuse = lambda method, path, user: 429 if method == "POST" and path.endswith("/createRoom") \
        and user == bot else False
    try:
        alice.invite(room, "@carol:example.org")
        first = wait_until(lambda: makings()[before:] or None, what="carol's room asked for")[0]
        assert first["status"] == 429
        time.sleep(4.5)
        tried = makings()[before:]
        assert len(tried) == 1, [(r["status"], round(r["time"] - first["time"], 2)) for r in tried]
    finally:
        hs.refuse = None
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings b JOIN identities i ON "
                               "i.id = b.local_identity_id WHERE i.uri = 'mimi://example.org/u/carol'",
                               db_url) == "1", timeout=20, what="carol's room made after the wait")
    taken = next(r for r in makings()[before:] if r["status"] == 200)
    assert taken["time"] - first["time"] >= 4.9, [(r["status"], r["time"] - first["time"]) for r in makings()]


@pytest.mark.parametrize("keep_alive", [True, False], ids=["kept-alive", "closed"])
def test_a_homeserver_not_answering_ends_the_round_of_portal_makings(mx, hs, gk, pg, db_url, keep_alive):
    """The bot's rounds that ask the homeserver something for each row (a
    portal's rename, the making of an invited user's portal) are one
    mechanism: the round backs off 2 s, 4 s, ... when a row failed, and a
    homeserver that did not answer (or answered 429) ends it, the next
    row would fare no better.  Until the forty-sixth session the makings
    went on after no answer: a homeserver that does not answer (each
    createRoom waits out its 10 s) held the bot's work (commands, notices,
    invitations) up 10 s for every user invited, up to 16 a round.
    A round is told by its time, its makings some milliseconds apart, the
    rounds the backoff's seconds: a making whose connection the
    homeserver closed unanswered may come twice (libcurl sends a request
    again, once, on a fresh connection when a kept-alive one it reused
    turns out closed).  Until the fiftieth session the test took any two
    makings for two rounds and wanted them to ask one user: it passed
    when they were libcurl's two of one round, as they mostly were, and
    failed when they were two rounds (one sending it once), the second
    asking the other user, as it should: one not answered goes to the
    back of the look (invitation_row).  Both ways here: the homeserver
    keeping its connections alive (a making twice a round) and closing
    each after its answer (once: the old test failed so every time)."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi wally")
    srv.wait_events(1)
    hs.create_user("carol")
    hs.create_user("dave")
    bot = "@_cw_bot:example.org"

    def makings(since):
        return [r for r in hs.requests if r["method"] == "POST" and r["path"].endswith("/createRoom")
                and r["user"] == bot and r["time"] > since]

    def invited(who):
        return pg.psql("SELECT x.membership FROM room_members x JOIN identities i ON i.id = x.identity_id "
                       f"WHERE i.uri = 'mimi://example.org/u/{who}'", db_url) == "invited"
    # refused and its connection closed: no answer, at once
    away = lambda method, path, user: method == "POST" and path.endswith("/createRoom") and user == bot  # noqa: E731
    hs.keep_alive = keep_alive
    hs.refuse = hs.lose_reply = away
    try:
        # The rounds counted from carol's invitation on: her first making
        # mostly comes before dave is invited.  Counted from his invitation
        # on (until the fifty-seventh session) they were mostly the second
        # to the fourth (2 s, 6 s and 14 s after the first), and the rooms
        # were made at the fifth, 30 s after the first: now at the fourth.
        since = time.time()
        alice.invite(room, "@carol:example.org")
        wait_until(lambda: invited("carol"), what="carol invited to the group")
        alice.invite(room, "@dave:example.org")
        wait_until(lambda: invited("dave"), what="dave invited to the group")

        def rounds():
            """The makings since `since` as rounds: (time, users asked)."""
            out = []
            for r in makings(since):
                if out and r["time"] - out[-1][0] < 1.0:
                    out[-1][1].add(r["body"]["invite"][0])
                else:
                    out.append((r["time"], {r["body"]["invite"][0]}))
            return out
        # the third round 2 s + 4 s after the first, a round on when the
        # last one's makings are 1 s old (and more rounds if dave's
        # invitation came after the second: both users asked)
        users = {"@carol:example.org", "@dave:example.org"}
        wait_until(lambda: len(rounds()) >= 3 and time.time() - rounds()[-1][0] > 1.0
                   and {u for _, us in rounds() for u in us} == users, timeout=30,
                   what="three rounds of makings, asking both users")
        done = rounds()
        assert all(len(us) == 1 for _, us in done), done  # each ended at its first making
        gaps = [b[0] - a[0] for a, b in zip(done, done[1:])]
        assert all(g >= 1.5 for g in gaps), done  # backed off: 2 s, 4 s, ...
        # neither holds the other up: the one not answered goes to the back
        assert {u for _, us in done for u in us} == users, done
    finally:
        hs.refuse = hs.lose_reply = None
        hs.keep_alive = True
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings b JOIN identities i ON i.id = b.local_identity_id "
                               "WHERE i.uri IN ('mimi://example.org/u/carol', 'mimi://example.org/u/dave')",
                               db_url) == "2", timeout=40, what="both rooms made once the homeserver answers")


def test_a_refused_portal_invitation_holds_up_no_one_elses(mx, hs, gk, pg, db_url):
    """The homeserver refuses for good the bot's invitation of sixteen
    users to their portals (403 M_FORBIDDEN, as Synapse answers when the
    invitee's server refuses it: after the room is made).  Each refused
    invitation ends as a decline does: the member is left (the peer is
    told nothing), asked once and not again, and the bot leaves the room
    its making left behind; zed, invited after them, gets his portal at
    once.  Until the forty-seventh session the refused
    rows stayed first in the bot's look (sixteen a round, in a fixed
    order), asked again for ever (a new room each time), and no other
    user's portal was made."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi wally")
    srv.wait_events(1)
    bot = "@_cw_bot:example.org"
    refused = [f"r{k:02d}" for k in range(16)]
    for u in refused + ["zed"]:
        hs.create_user(u)

    def makings(who):
        return [r for r in hs.requests if r["method"] == "POST" and r["path"].endswith("/createRoom")
                and r["user"] == bot and (r["body"] or {}).get("invite") == [f"@{who}:example.org"]]

    def membership(who):
        return pg.psql("SELECT x.membership FROM room_members x JOIN identities i ON i.id = x.identity_id "
                       f"WHERE i.uri = 'mimi://example.org/u/{who}'", db_url)
    hs.refuse_invite = lambda sender, target: sender == bot and target.split(":")[0][1:] in refused  # noqa: E731
    try:
        for u in refused:
            alice.invite(room, f"@{u}:example.org")
        wait_until(lambda: all(makings(u) for u in refused), timeout=20, what="every refused portal asked for")
        alice.invite(room, "@zed:example.org")
        wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings b JOIN identities i ON i.id = b.local_identity_id "
                                   "WHERE i.uri = 'mimi://example.org/u/zed'", db_url) == "1",
                   timeout=20, what="zed's portal made")
        wait_until(lambda: all(membership(u) == "left" for u in refused), what="the refused invitations ended")
        time.sleep(5)  # rounds of the bot's: none asks for them again
        assert [len(makings(u)) for u in refused] == [1] * 16
        # the rooms their makings left behind (Synapse's, made before the
        # invitation) are left by the bot, their aliases gone
        left_behind = [rid for rid in hs.rooms() if hs.members(rid).get(bot)
                       and not any(hs.members(rid).get(f"@{u}:example.org") for u in ["zed", "alice"])]
        assert len(left_behind) == 16 and all(hs.members(rid)[bot] == "leave" for rid in left_behind), left_behind
        with hs._lock:
            assert not [al for al, (rid, _) in hs._aliases.items() if rid in left_behind]
    finally:
        hs.refuse_invite = None
    assert not [e for e in list(srv.events) if e.get("type") == "membership"
                and e["content"].get("membership") == "leave"], list(srv.events)


def test_a_portal_made_before_its_failed_invitation_holds_up_no_one_elses(mx, hs, gk, pg, db_url):
    """The homeserver makes three users' portals but cannot send their
    invitations (502: their server not reached; Synapse's room is made,
    the createRoom fails).  Each retry finds the room made before by its
    alias and cannot finish it (the invitation fails again): the
    homeserver answered, so that is the row's own trouble and the round
    goes on; zed, invited after them, gets his portal in the same round
    as their retries.  Until the forty-seventh session that was taken
    for no answer: it ended the bot's round, one such row a round, each
    round backed off longer (2 s, 4 s, 8 s, ...), and zed waited for
    all of them."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi wally")
    srv.wait_events(1)
    bot = "@_cw_bot:example.org"
    away = ["s0", "s1", "s2"]
    for u in away + ["zed"]:
        hs.create_user(u)

    def makings(who):
        return [r for r in hs.requests if r["method"] == "POST" and r["path"].endswith("/createRoom")
                and r["user"] == bot and (r["body"] or {}).get("invite") == [f"@{who}:example.org"]]

    def bound(who):
        return pg.psql("SELECT count(*) FROM room_bindings b JOIN identities i ON i.id = b.local_identity_id "
                       f"WHERE i.uri = 'mimi://example.org/u/{who}'", db_url) == "1"
    hs.refuse_invite = lambda sender, target: 502 if sender == bot and target.split(":")[0][1:] in away else False  # noqa: E731
    try:
        for u in away:
            alice.invite(room, f"@{u}:example.org")
        # asked once, and once again: the retries find the rooms made
        wait_until(lambda: all(len(makings(u)) >= 2 for u in away), timeout=40, what="every portal asked again")
        alice.invite(room, "@zed:example.org")
        wait_until(lambda: bound("zed"), timeout=60, what="zed's portal made")
        zed = makings("zed")[0]["time"]
        nearest = [min(abs(r["time"] - zed) for r in makings(u)) for u in away]
        # the other rows of the look were asked in zed's round
        assert all(d < 1.5 for d in nearest), nearest
        assert not any(bound(u) for u in away)
        assert [pg.psql("SELECT x.membership FROM room_members x JOIN identities i ON i.id = x.identity_id "
                        f"WHERE i.uri = 'mimi://example.org/u/{u}'", db_url) for u in away] == ["invited"] * 3
    finally:
        hs.refuse_invite = None
    # once their server is reached, the rooms made before are finished
    wait_until(lambda: all(bound(u) for u in away), timeout=60, what="the three portals made")
    made = [rid for rid in hs.rooms() if hs.members(rid).get(bot) and rid != room
            and any(hs.members(rid).get(f"@{u}:example.org") for u in away)]
    assert len(made) == 3, made


def test_a_portal_whose_invitation_fails_for_now_then_for_good_leaves_no_room_behind(mx, hs, gk, pg, db_url):
    """The homeserver makes s0's portal but cannot send his invitation
    (502), then refuses it for good (403): the retry finds the first room
    by its alias, cannot finish it, and makes the portal anew, whose
    invitation is refused too; the invitation ends as his decline. The bot
    leaves both rooms. Until the forty-ninth session it left only the
    second (portal_refused): the first, its alias deleted as stale, kept
    the bot alone in it for good."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "hi wally")
    srv.wait_events(1)
    bot, s0 = "@_cw_bot:example.org", "@s0:example.org"
    hs.create_user("s0")

    def makings():
        return [r for r in hs.requests if r["method"] == "POST" and r["path"].endswith("/createRoom")
                and r["user"] == bot and (r["body"] or {}).get("invite") == [s0]]
    hs.refuse_invite = lambda sender, target: 502 if sender == bot and target == s0 else False  # noqa: E731
    try:
        alice.invite(room, s0)
        wait_until(lambda: len(makings()) >= 2, timeout=20, what="s0's portal asked again")
        hs.refuse_invite = lambda sender, target: sender == bot and target == s0  # noqa: E731
        wait_until(lambda: pg.psql("SELECT x.membership FROM room_members x JOIN identities i ON i.id = x.identity_id "
                                   "WHERE i.uri = 'mimi://example.org/u/s0'", db_url) == "left",
                   timeout=40, what="s0's refused invitation ended")
    finally:
        hs.refuse_invite = None
    made = [rid for rid in hs.rooms() if hs.members(rid).get(bot) and rid != room and s0 not in hs.members(rid)]
    assert len(made) == 2, made
    assert [hs.members(rid)[bot] for rid in made] == ["leave", "leave"], made
    with hs._lock:
        assert not [al for al, (rid, _) in hs._aliases.items() if rid in made]
    assert not [e for e in list(srv.events) if e.get("type") == "membership"
                and e["content"].get("membership") == "leave"], list(srv.events)


def test_a_refused_portal_invitation_of_a_user_a_peer_invited_ends_as_her_decline(mx, hs, gk, pg, db_url):
    """bob, whom gk put into a group (invited, schema/037), accepted wally:
    wally's message brings him his room of the group, but the homeserver
    refuses the bot's invitation for good (403, as Synapse answers when
    bob's server refuses it).  As the bot's own making of a portal (a
    user a local member invited) it ends as his decline would: he is left
    (peer_invited kept: gk goes on listing him invited, and hears nothing),
    the bot leaves the room the making left behind, its alias goes, and
    the next message makes no room.  Until the forty-seventh session each
    of the delivery's retries made the room again (a room left behind at
    each, the bot alone in it) until its retries were spent, and every
    later message of the group the same."""
    a, srv = gk
    bob_uri = "mimi://example.org/u/bob"
    bot = "@_cw_bot:example.org"
    assert mx.admin("POST", "/optins", json={"user": bob_uri, "network": "peer:gk", "opted_in": True}).ok
    assert mx.admin("POST", "/consents", json={"user": bob_uri, "subject_kind": "user",
                                               "subject": a.user("wally"), "state": "allowed"}).ok
    hs.create_user("bob")
    gid = a.create_room([a.user("wally"), bob_uri], kind="group", name="Quiz").json()["id"]
    assert group_members(a, gid)[bob_uri] == "invited"

    def makings():
        return [r for r in hs.requests if r["method"] == "POST" and r["path"].endswith("/createRoom")
                and r["user"] == bot and (r["body"] or {}).get("invite") == ["@bob:example.org"]]

    def member():
        return pg.psql("SELECT x.membership || ',' || x.peer_invited FROM room_members x "
                       f"JOIN identities i ON i.id = x.identity_id WHERE i.uri = '{bob_uri}'", db_url)
    hs.refuse_invite = lambda sender, target: sender == bot and target == "@bob:example.org"  # noqa: E731
    try:
        assert a.send(gid, a.user("wally"), "hello bob").status_code == 202
        wait_until(lambda: member() == "left,true", timeout=20, what="bob's refused invitation ended")
        assert a.send(gid, a.user("wally"), "still there?").status_code == 202
        # Both messages' deliveries to Matrix ended (a row that ended is
        # tried no more; the second's rows, if any, were written with it,
        # before the 202): past the moment a retry would have made the room
        # again.  Until the sixty-fourth session a sleep of five seconds
        # stood for this, and decided nothing.
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox o JOIN rooms r ON r.id = o.room_id "
                                   f"WHERE r.public_id = '{gid}' AND o.destination = 'matrix' "
                                   "AND o.state IN ('pending', 'in_flight', 'held')", db_url) == "0",
                   timeout=20, what="the group's deliveries to Matrix ended")
        assert pg.psql("SELECT count(*) FROM delivery_attempts x JOIN outbox o ON o.id = x.outbox_id "
                       f"JOIN rooms r ON r.id = o.room_id WHERE r.public_id = '{gid}' AND o.destination = 'matrix'",
                       db_url) == "1", pg.psql("SELECT * FROM delivery_attempts", db_url)
        assert len(makings()) == 1, makings()
    finally:
        hs.refuse_invite = None
    assert group_members(a, gid)[bob_uri] == "invited"
    left_behind = [rid for rid in hs.rooms() if hs.members(rid).get(bot) and "@bob:example.org" not in hs.members(rid)]
    assert len(left_behind) == 1 and hs.members(left_behind[0])[bot] == "leave", left_behind
    with hs._lock:
        assert not [al for al, (rid, _) in hs._aliases.items() if rid in left_behind]
    assert pg.psql("SELECT count(*) FROM outbox WHERE state NOT IN ('delivered')", db_url) == "0", \
        pg.psql("SELECT state, last_error FROM outbox", db_url)
    assert not [e for e in list(srv.events) if e.get("type") == "membership"], list(srv.events)


def _alice(hs):
    """A client of alice, whom wally_wrote_to_alice made."""
    with hs._lock:
        token = next(t for t, u in hs._tokens.items() if u == ALICE_MX)
    return hs.as_user(token)


def _messages(hs, room, sender):
    return [e["content"]["body"] for e in hs.events(room) if e["type"] == "m.room.message" and e["sender"] == sender]


def test_a_direct_room_upgraded_without_inviting_the_ghost_is_given_up(mx, hs, gk, pg, db_url):
    """A room upgrade (POST /rooms/{id}/upgrade: a new room version) makes a
    new room with none of the old one's members but its upgrader, and a
    tombstone in the old room, which clients then hide. The specification
    has the server invite nobody; a client may, or may not, invite the
    others. Until the thirty-sixth session the gateway did not look at the
    tombstone: wally's messages went on into the old room, which alice's
    client no longer shows, and what she wrote in the new one reached nobody.
    Now the tombstone gives the room up as her leave does: the binding goes,
    the ghost leaves, and wally's next message opens a new direct room with
    a new invite."""
    a, srv = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    ghost = "@_cw_gk_wally:example.org"
    alice = _alice(hs)
    alice.join(mx_room)
    new = alice.upgrade(mx_room)
    assert hs.state(mx_room, "m.room.tombstone")["content"]["replacement_room"] == new
    wait_until(lambda: hs.members(mx_room).get(ghost) == "leave", what="the ghost leaving the upgraded room")
    assert pg.psql("SELECT count(*) FROM room_bindings WHERE native_id = '%s'" % mx_room, db_url) == "0"
    a.send(room, a.user("wally"), "still there?")
    dm = wait_until(lambda: next((r for r in hs.rooms() if r not in (mx_room, new)
                                  and _messages(hs, r, ghost)), None), what="a new direct room")
    assert hs.members(dm).get(ALICE_MX) == "invite"
    assert _messages(hs, dm, ghost) == ["still there?"]
    assert _messages(hs, mx_room, ghost) == ["hello"]


def test_a_direct_room_upgraded_with_the_ghost_invited_goes_on_in_the_new_room(mx, hs, gk, pg, db_url):
    """Element's upgrade dialog invites the old room's members into the new
    room: the ghost joins it, and the conversation goes on there (the old
    room given up at its tombstone, the new one bound at the ghost's join)."""
    a, srv = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    ghost = "@_cw_gk_wally:example.org"
    alice = _alice(hs)
    alice.join(mx_room)
    new = alice.upgrade(mx_room)
    alice.invite(new, ghost)
    wait_until(lambda: hs.members(new).get(ghost) == "join", what="the ghost joining the new room")
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings WHERE native_id = '%s'" % new, db_url) == "1",
               what="the new room bound")
    alice.send_text(new, "upgraded hello")
    got = srv.wait_events(2)
    assert any(e["type"] == "message" and e["content"]["parts"][0]["body"] == "upgraded hello" for e in got), got
    a.send(room, a.user("wally"), "here too")
    wait_until(lambda: _messages(hs, new, ghost) == ["here too"], what="wally's message in the new room")
    assert "here too" not in _messages(hs, mx_room, ghost)
    assert hs.members(mx_room).get(ghost) == "leave"


def test_an_upgraded_management_room_is_forgotten_until_the_next(mx, hs, gk, pg, db_url):
    """A management room alice upgrades is forgotten as after her leave: the
    bot leaves it, and consent requests wait for the next management room
    she opens (until the thirty-sixth session they were shown, and counted
    shown, in the old room her client hides)."""
    alice, mgmt, said = alice_and_the_bot(hs)
    bot = "@_cw_bot:example.org"
    alice.upgrade(mgmt)
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot leaving the upgraded room")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0", what="the room forgotten")
    room2 = alice.create_dm(bot)
    wait_until(lambda: pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == room2, what="the next one")


def test_a_report_of_a_user_of_this_service_is_taken(make_daemon, db_url, hs, pg):
    """Another member of a group reaches a user through the gateway too
    (relayed by the bot, "bob: ..."), and her client can report only the
    bot for it: `report` takes a user of this provider's, as the admin API
    does (POST /admin/v1/reports takes any user), typed as the Matrix id
    of a user of this server or as an address of one of its domains (the
    XMPP domain's too), or picked in the client. Stored for the operator
    under the user's one address (mimi://<server.domain>/u/<local>, since
    the thirty-ninth session; until then as typed);
    no automatic limit (that is for remote senders: docs/policy.md). A
    Matrix user of another server is still refused (what she sends does
    not pass the gateway), and so is the user herself. Until the
    thirty-eighth session every such report was refused (a review's
    finding)."""
    d = start_mx(make_daemon, db_url, hs, xmpp={"domain": "chat.example.org"})
    assert d.admin("PATCH", "/settings", json={"policy.report_limit_threshold": 1}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")

    def answer_to(send):
        return bot_answer(said, send)
    for text in ("report @bob:example.org spam in the group", "report mimi://chat.example.org/u/dave rude"):
        assert answer_to(lambda: alice.send_text(mgmt, text)) == REPORTED
    assert answer_to(lambda: send_pill(alice, mgmt, "report", "@bob:example.org", "Bob", after=" again")) == \
        REPORTED
    assert pg.psql("SELECT string_agg(reporter_kind || ' ' || reporter || ' ' || subject_uri || ' ' || comment, ','"
                   " ORDER BY id) FROM reports", db_url) == \
        (f"local_user {ALICE} mimi://example.org/u/bob spam in the group,"
         f"local_user {ALICE} mimi://example.org/u/dave rude,"
         f"local_user {ALICE} mimi://example.org/u/bob again")
    assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'report.create' AND actor = 'user:' || "
                   f"'{ALICE}'", db_url) == "3"
    # no automatic limit for a user of this server (policy_report_store)
    assert pg.psql("SELECT count(*) FROM rules WHERE pattern = 'mimi://example.org/u/bob'", db_url) == "0"
    text = answer_to(lambda: alice.send_text(mgmt, "report @carol:elsewhere.example spam"))
    assert text.startswith("@carol:elsewhere.example is not someone from another network nor a user of this "
                           "service") and "client's ignore and report" in text, text
    # herself under the XMPP domain too: one address (since the thirty-ninth
    # session; until then stored as a report of another user)
    for me in (ALICE_MX, ALICE, "mimi://chat.example.org/u/alice"):
        assert answer_to(lambda: alice.send_text(mgmt, f"report {me} test")) == \
            "That is you: name the user you report."
    # accept and block of such a user stay refused (no consent is about her)
    text = answer_to(lambda: alice.send_text(mgmt, "block @bob:example.org"))
    assert text.startswith("@bob:example.org is not someone from another network: accept and block"), text
    assert pg.psql("SELECT count(*) FROM reports", db_url) == "3"
    assert pg.psql("SELECT count(*) FROM consents", db_url) == "0"


def test_a_long_report_reason_is_cut_at_a_whole_character(mx, hs, gk, pg, db_url):
    """A report's reason is the rest of its line, at most 1000 bytes, cut
    at a whole character. Until the thirty-eighth session a typed reason
    was cut at 299 bytes, in the middle of a character if one stood there:
    the database refused the text, and the report could not be stored
    however often it was sent (a review's finding)."""
    a, _ = gk
    wally = a.user("wally")
    alice, mgmt, said = alice_and_the_bot(hs)
    for reason, stored in (("é" * 600, "é" * 500), ("x" + "é" * 300, "x" + "é" * 300)):
        n = len(said())
        alice.send_text(mgmt, f"report {wally} {reason}\nsecond line")
        wait_until(lambda: len(said()) > n, what="the answer")
        assert said()[n] == REPORTED, said()[n]
        assert pg.psql("SELECT comment FROM reports ORDER BY id DESC LIMIT 1", db_url) == stored


def test_a_report_reason_with_a_control_character_is_refused(mx, hs, gk, pg, db_url):
    """A report's reason is its comment, shown to the operator as it is:
    one holding a control character or a bidirectional override is
    refused with an answer saying so, and nothing is stored (until the
    forty-eighth session it was stored as typed)."""
    a, _ = gk
    wally = a.user("wally")
    alice, mgmt, said = alice_and_the_bot(hs)
    for reason in ("ring\u0007", "invoice.pdf\u202egpj.exe", "x\ufffe"):
        n = len(said())
        alice.send_text(mgmt, f"report {wally} {reason}")
        wait_until(lambda: len(said()) > n, what="the answer")
        assert "control character" in said()[n] and "again" in said()[n], said()[n]
    assert pg.psql("SELECT count(*) FROM reports", db_url) == "0"
    n = len(said())
    alice.send_text(mgmt, f"report {wally} spam\tagain")
    wait_until(lambda: len(said()) > n, what="the answer")
    assert said()[n] == REPORTED, said()[n]
    assert pg.psql("SELECT comment = E'spam\\tagain' FROM reports", db_url) == "t"


def reports_evidence(d):
    """The evidence of each stored report, oldest report first, as the
    operator sees it (GET /admin/v1/reports)."""
    return [r["evidence"] for r in d.admin("GET", "/reports").json()["rows"]]


def test_a_report_takes_what_its_subject_sent_her_as_evidence(mx, hs, gk, pg, db_url):
    """A user's `report` goes to the operator with what its subject sent
    her: the public ids of his last 20 messages delivered to her, newest
    first, found at the report's store; a `report` that replies to one of
    them takes that one first (its Matrix event id, as the bridge stored
    its delivery to her). Only what reached her: not his message to bob,
    nor ed's message held for her consent, nor a message of someone else's
    her command replies to. The answer says how many went with it. Until
    the forty-eighth session a bot's report had no evidence at all (the
    spec's "stored with the evidence message ids" held only for peers and
    the admin API), and the operator saw a report and nothing of what was
    said."""
    a, _ = gk
    wally, ed = a.user("wally"), a.user("ed")
    alice, mgmt, said = alice_and_the_bot(hs)
    consent_alice(mx)
    room = a.create_room([wally, ALICE]).json()["id"]
    sent = []
    for i in range(23):
        r = a.send(room, wally, f"insult {i}")
        assert r.status_code == 202, r.text
        sent.append(r.json()["id"])
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id WHERE e.type = "
                               "'message' AND o.state = 'delivered'", db_url) == "23", what="wally's messages delivered")
    hs.create_user("bob")
    to_bob = a.create_room([wally, "mimi://example.org/u/bob"]).json()["id"]
    held = a.create_room([ed, ALICE]).json()["id"]
    others = [a.send(to_bob, wally, "to bob, not alice").json()["id"],
              a.send(held, ed, "held for her consent").json()["id"]]
    wait_until(lambda: pg.psql("SELECT string_agg(o.state, ',' ORDER BY o.id) FROM outbox o JOIN events e ON "
                               f"e.id = o.event_id WHERE e.public_id IN ('{others[0]}', '{others[1]}')", db_url)
               == "dropped,held", what="the message to bob dropped (no consent of his), ed's held for hers")
    wait_until(lambda: any(n.startswith(f"{ed} (network peer:gk) wants to write to you") for n in said()),
               what="ed's request told")
    newest = list(reversed(sent))

    def answer_to(text, reply_to=None):
        return bot_answer(said, lambda: alice.send_text(mgmt, text, reply_to=reply_to))
    assert answer_to(f"report {wally} insults") == \
        "Reported to the operator, with 20 message(s) of theirs to you as evidence. Thank you."
    assert reports_evidence(mx) == [newest[:20]]
    # a reply to his first message (in her room with his ghost) takes it first
    first = pg.psql("SELECT o.remote_id FROM outbox o JOIN events e ON e.id = o.event_id "
                    f"WHERE e.public_id = '{sent[0]}' AND o.destination = 'matrix'", db_url)
    assert first.startswith("$"), first
    assert answer_to(f"report {wally} this one", reply_to=first) == \
        "Reported to the operator, with 20 message(s) of theirs to you as evidence. Thank you."
    # ed's one message waits for her consent: she never saw it; the reply
    # is to wally's message, no evidence about ed
    assert answer_to(f"report {ed} spam", reply_to=first) == REPORTED
    assert reports_evidence(mx) == [newest[:20], [sent[0]] + newest[:19], []]
    assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'report.create' AND "
                   "jsonb_array_length(details->'evidence') = 20", db_url) == "2"


def test_list_shows_who_blocked_the_user_and_accept_says_so(mx, hs, gk, pg, db_url):
    """A peer's user may block a local user (POST /v1/blocks: the blocks
    table), which refuses what she writes to him (recipient_blocked_sender)
    and is no decision of hers. `list` shows it apart from her own
    decisions (her block of ed is "blocked: ..."), and an `accept` of
    someone who blocked her says that it does not lift his block. Until
    the thirty-eighth session list showed nothing of it, and her accept
    read as if she could now write to him (a review's finding)."""
    a, _ = gk
    wally, ed = a.user("wally"), a.user("ed")
    alice, mgmt, said = alice_and_the_bot(hs)

    def answer_to(text):
        return bot_answer(said, lambda: alice.send_text(mgmt, text))
    assert a.call("POST", "/v1/blocks", {"blocker": wally, "blocked": ALICE, "action": "block"}).status_code == 202
    assert answer_to(f"block {ed}").startswith(f"Blocked {ed}.")
    listed = answer_to("list").splitlines()
    assert f"blocked: {ed}" in listed, listed
    assert f"{wally} (peer:gk) blocked you: what you write to them is not delivered" in listed, listed
    assert not any(line.startswith("blocked: " + wally) or line.startswith("allowed: " + wally) for line in listed)
    assert answer_to(f"accept {wally}") == (f"Accepted {wally}. 0 waiting message(s) released. They blocked you, "
                                            "though: what you write to them is not delivered until they lift it.")
    assert answer_to(f"accept {ed}") == f"Accepted {ed}. 0 waiting message(s) released."
    listed = answer_to("list").splitlines()
    assert f"allowed: {wally}" in listed and f"{wally} (peer:gk) blocked you: what you write to them is not " \
        "delivered" in listed, listed
    # lifted: list and accept say nothing of it any more
    assert a.call("POST", "/v1/blocks", {"blocker": wally, "blocked": ALICE, "action": "unblock"}).status_code == 202
    listed = answer_to("list").splitlines()
    assert not any("blocked you" in line for line in listed), listed
    assert answer_to(f"accept {wally}") == f"Accepted {wally}. 0 waiting message(s) released."


def test_a_long_list_says_what_it_leaves_out(mx, hs, gk, pg, db_url):
    """A list longer than one notice takes ends with how many lines it
    leaves out; until the thirty-eighth session they were left out in
    silence (a peer making many requests could push a user's decisions out
    of sight). The bot reads at most 401 lines: past 400 the count is
    "at least"."""
    a, _ = gk
    alice, mgmt, said = alice_and_the_bot(hs)
    alice.send_text(mgmt, "list")
    wait_until(lambda: any(n.startswith("Nothing yet") for n in said()), what="the empty list")
    pg.psql("INSERT INTO consents (local_identity_id, subject_kind, subject, state, source) "
            "SELECT i.id, 'user', 'mimi://wa.example/u/user' || lpad(k::text, 3, '0'), 'blocked', 'user' "
            f"FROM identities i, generate_series(1, 150) k WHERE i.uri = '{ALICE}'", db_url)
    n = len(said())
    alice.send_text(mgmt, "list")
    wait_until(lambda: len(said()) > n, what="the list")
    lines = said()[n].splitlines()
    shown = [line for line in lines if line.startswith("blocked: ")]
    assert 50 < len(shown) < 150, len(shown)
    assert lines[-1] == f"... and {150 - len(shown)} more not shown here (ask the operator for all).", lines[-1]
    # Past 400 lines the bot reads no more (401, to know there are more;
    # until the forty-seventh session it read every line, here 2000, for
    # one notice): the count left out is then a floor.
    pg.psql("INSERT INTO consents (local_identity_id, subject_kind, subject, state, source) "
            "SELECT i.id, 'user', 'mimi://wa.example/u/more' || lpad(k::text, 4, '0'), 'allowed', 'user' "
            f"FROM identities i, generate_series(1, 1850) k WHERE i.uri = '{ALICE}'", db_url)
    n = len(said())
    alice.send_text(mgmt, "list")
    wait_until(lambda: len(said()) > n, what="the long list")
    lines = said()[n].splitlines()
    shown = lines[:-1]
    assert 50 < len(shown) < 400, len(shown)
    assert lines[-1] == (f"... and at least {401 - len(shown)} more not shown here (ask the operator for all)."), \
        lines[-1]


def test_notices_of_one_room_go_out_in_the_order_they_were_queued(make_daemon, db_url, pg):
    """Notices of one room go out in the order they were queued, whoever
    says them: a ghost's word waiting out a 429 holds back the bot's later
    word in that room (the bot, not limited, would otherwise pass it), and
    a word the bot says while an older one of its room waits after a
    failure of the moment (a 503) is queued behind it, not said at once.
    Until the thirty-eighth session both came first (a review's finding).
    Other rooms' notices are not held (test_one_limited_ghost_does_not_hold_up_the_bots_notices)."""
    hs, srv = rate_limited_homeserver()
    try:
        d, a = limited_gateway(make_daemon, db_url, hs, srv, None)
        alice, mgmt, said = alice_and_the_bot(hs)
        bot = "@_cw_bot:example.org"
        ghost = "@_cw_gk_wally:example.org"
        with hs._lock:  # the ghost registered, as the daemon registers its ghosts
            hs._users[ghost] = {"displayname": "wally"}
        # a room the bot and the ghost are both in (as in a group's room)
        room = hs.appservice().create_room(preset="private_chat", invite=[ghost])
        hs.appservice(ghost).join(room)
        hs.rc_message = (0.25, 1)  # one event in 4 s for each sender
        words = [(ghost, "ghost word 0"), (ghost, "ghost word 1"), (bot, "bot word 2"), (ghost, "ghost word 3"),
                 (bot, "bot word 4")]
        pg.psql("INSERT INTO matrix_notices (room_id, body, sender, txn_id) VALUES " +
                ", ".join(f"('{room}', '{t}', '{who}', 'cworder-{k}')" for k, (who, t) in enumerate(words)) +
                "; NOTIFY causeway_matrix_bot", db_url)
        said_there = lambda: [e["content"]["body"] for e in hs.events(room)  # noqa: E731
                              if e["type"] == "m.room.message"]
        wait_until(lambda: len(said_there()) == 5, timeout=60, what="the five words")
        assert said_there() == [t for _, t in words], said_there()
        assert any(q["user"] == ghost and q["status"] == 429 for q in hs.requests), "the ghost was never limited"
        # the bot's own word in the management room, queued after a 503,
        # and a command's answer after it
        hs.rc_message = None
        refusing = threading.Event()
        refusing.set()
        hs.refuse = lambda method, path, user: refusing.is_set() and "cworder-first" in path
        pg.psql(f"INSERT INTO matrix_notices (room_id, body, sender, txn_id) VALUES ('{mgmt}', 'the first word', "
                f"'{bot}', 'cworder-first'); NOTIFY causeway_matrix_bot", db_url)
        wait_until(lambda: any("cworder-first" in q["path"] and q["status"] == 503 for q in hs.requests),
                   what="the first word refused for now")
        alice.send_text(mgmt, "list")
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_notices WHERE room_id = "
                                   f"'{mgmt}' AND done_at IS NULL", db_url) == "2", what="the answer queued")
        assert not any(n.startswith("Nothing yet") for n in said()), said()
        refusing.clear()
        wait_until(lambda: any(n.startswith("Nothing yet") for n in said()), timeout=30, what="the answer")
        assert said()[-2:] == ["the first word", "Nothing yet: no requests, no decisions."], said()
    finally:
        srv.close()
        hs.close()


def test_someone_else_in_a_management_room_ends_it(mx, hs, gk, pg, db_url):
    """A management room is the user's and the bot's alone (what the bot
    shows there says who wants to reach her). Someone she invites into it
    later makes it hers no more: the bot says so and leaves, and her next
    consent request waits for the next room she opens with it. A ghost
    invited into it says that a conversation needs a room of its own, and
    leaves: bound, her commands there (a report of him) would have gone to
    the remote user as messages. Until the thirty-eighth session the bot
    went on showing her requests to whoever she invited, and a ghost
    invited there bound the room (a review's finding)."""
    a, _ = gk
    bot = "@_cw_bot:example.org"
    ghost = "@_cw_gk_wally:example.org"
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    a.create_room([a.user("wally"), "mimi://example.org/u/someone"])  # wally known: his ghost may be invited
    alice, mgmt, said = alice_and_the_bot(hs)
    alice.invite(mgmt, ghost)
    wait_until(lambda: hs.members(mgmt).get(ghost) == "leave", what="the ghost leaving")
    ghost_said = [e["content"]["body"] for e in hs.events(mgmt) if e["sender"] == ghost
                  and e["type"] == "m.room.message"]
    assert len(ghost_said) == 1 and "room with the gateway's bot" in ghost_said[0], ghost_said
    assert pg.psql("SELECT count(*) FROM room_bindings", db_url) == "0"
    assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == mgmt
    alice.send_text(mgmt, "list")  # still hers
    wait_until(lambda: any(n.startswith("opted in: peer:gk") for n in said()), what="the answer")
    hs.create_user("bob")
    alice.invite(mgmt, "@bob:example.org")
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot leaving")
    assert "Someone else is in this room now" in said()[-1], said()
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"
    room = a.create_room([a.user("ed"), ALICE]).json()["id"]
    a.send(room, a.user("ed"), "hi alice")
    wait_until(lambda: pg.psql("SELECT count(*) FROM consent_requests WHERE state = 'pending'", db_url) == "1",
               what="ed's request")
    time.sleep(1)
    assert not any("mimi://wa.example/u/ed" in n for n in said())
    mgmt2 = alice.create_dm(bot)
    wait_until(lambda: any("mimi://wa.example/u/ed" in e["content"].get("body", "") for e in hs.events(mgmt2)
                           if e["sender"] == bot), what="ed's request in her new room")


@contextlib.contextmanager
def her_list_held(alice, mgmt, pg, db_url):
    """alice's "list" sent in her management room mgmt, and the bot's
    answer waiting on a lock of blocks (a table the list reads), held in
    the block (its session, which end() ends: the lock freed) and at its
    end freed whatever came."""
    held = HeldSession(db_url)
    try:
        held.run("BEGIN; LOCK TABLE blocks IN ACCESS EXCLUSIVE MODE;")
        alice.send_text(mgmt, "list")
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND query LIKE '%FROM blocks%'", db_url) == "1",
                   timeout=30, what="her list waiting for the lock")
        yield held
    finally:
        held.end()


def bobs_member_event_handled(hs, pg, db_url):
    """The homeserver's transaction with bob's member event taken (the
    daemon keeps its events in the bot's inbox before it answers), and
    every row of the inbox handled: what the bot says for bob's coming in
    is said by then.  Until the sixty-fourth session a sleep of a second
    stood for this."""
    wait_until(lambda: any(t["done"] and any(e["type"] == "m.room.member" and e.get("state_key") == "@bob:example.org"
                                             for e in t["events"]) for t in hs.transactions),
               timeout=30, what="the transaction with bob's member event taken")
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               timeout=30, what="the bot's inbox handled")


def test_a_command_queued_before_someone_else_came_in_is_not_answered_to_them(mx, hs, gk, pg, db_url):
    """alice's "list" is in the bot's inbox before bob is invited into her
    management room; bob's member event comes after it, so the intruder's
    check ran after the command, and her consent list was said with bob
    in the room (until the fifty-second session, a review's finding).
    Here the command waits on a lock of a table its list reads while bob
    is invited: the bot, about to answer, finds him there, says what it
    says to an intruder, leaves, and forgets the room; the list is not
    said."""
    bot = "@_cw_bot:example.org"
    consent_alice(mx)
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")
    with her_list_held(alice, mgmt, pg, db_url) as held:
        alice.invite(mgmt, "@bob:example.org")
        wait_until(lambda: any(t["done"] and any(e["type"] == "m.room.member"
                                                 and e.get("state_key") == "@bob:example.org"
                                                 for e in t["events"]) for t in hs.transactions),
                   what="the transaction with bob's invitation taken")
        held.end()
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot leaving")
    bobs_member_event_handled(hs, pg, db_url)
    words = said()
    assert not any("mimi://wa.example/u/wally" in w or "opted in" in w for w in words), words
    assert len(words) == 2 and "Someone else is in this room now" in words[1], words
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"


def test_a_queued_notice_is_not_said_to_someone_else_who_came_in(mx, hs, gk, pg, db_url):
    """alice's "list" is answered, but the homeserver does not take the
    answer for now (a 503): it is queued (matrix_notices), as a report's
    answer always is, and sent by the bot's notices.  bob is invited
    before it goes out, his member event not pushed to the bot yet:
    until the fifty-second session the queued answer (her consent list)
    was said to him.  Now the bot, about to send it, finds him there,
    says what it says to an intruder, leaves, and forgets the room; the
    list is not said."""
    bot = "@_cw_bot:example.org"
    consent_alice(mx)
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")
    refusing = [True]
    refused = []

    def refuse(method, path, user):
        if refusing[0] and method == "PUT" and "/send/m.room.message/" in path and user == bot:
            refused.append(path)
            return True
        return False

    hs.refuse = refuse
    try:
        alice.send_text(mgmt, "list")
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_notices WHERE room_id = '%s' AND done_at IS NULL"
                                   % mgmt, db_url) == "1", what="her list's answer queued")
        hs.stop_pushing()
        try:
            alice.invite(mgmt, "@bob:example.org")
            refusing[0] = False
            wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_notices WHERE room_id = '%s' "
                                       "AND done_at IS NULL" % mgmt, db_url) == "0",
                       timeout=30, what="her list's queued answer done with")
        finally:
            hs.resume_pushing()
    finally:
        hs.refuse = None
    assert refused
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot leaving")
    bobs_member_event_handled(hs, pg, db_url)
    words = said()
    assert not any("mimi://wa.example/u/wally" in w or "opted in" in w for w in words), words
    assert len(words) == 2 and "Someone else is in this room now" in words[1], words
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"


@pytest.mark.parametrize("found_by", ["member_event", "notices", "hush_refused"])
def test_none_of_the_bots_queued_words_is_said_to_someone_else_who_came_in(mx, hs, gk, pg, db_url, found_by):
    """Two answers of alice's commands are queued (the homeserver does not
    take them for now), and bob comes in before they go out.  Whether the
    bot finds him by his member event (the room ended before the answers'
    turn) or when it is about to send the first answer (his member event
    not pushed yet), neither answer is said to him: the bot's words still
    queued for her there are done with, unsaid, when the room ends.  Until
    the fifty-third session's review only the word being sent when he was
    found was held back: the room no management room any more, the others
    went out as words of another room, before the bot's leave queued
    behind them.  hush_refused: the database refuses the words' being done
    with once, when bob's member event ends the room; the room's end and
    its words' go together (one statement), so the room is ended when the
    first answer's turn finds bob (until a review of the fifty-third
    session's change the room was ended, its words left to be said)."""
    bot = "@_cw_bot:example.org"
    consent_alice(mx)
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")
    refusing = [True]
    refused = []

    def refuse(method, path, user):
        if refusing[0] and method == "PUT" and "/send/m.room.message/" in path and user == bot:
            refused.append(path)
            return True
        return False

    queued = "SELECT count(*) FROM matrix_notices WHERE room_id = '%s' AND done_at IS NULL" % mgmt
    hs.refuse = refuse
    try:
        alice.send_text(mgmt, "list")
        wait_until(lambda: pg.psql(queued, db_url) == "1", what="her first list's answer queued")
        alice.send_text(mgmt, "list")
        wait_until(lambda: pg.psql(queued, db_url) == "2", what="her second list's answer queued")
        if found_by == "hush_refused":
            pg.psql("CREATE SEQUENCE test_fail; "
                    "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    " IF NEW.next_at = 'infinity' AND OLD.done_at IS NULL AND nextval('test_fail') <= 1 THEN "
                    " RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$; "
                    "CREATE TRIGGER test_fail BEFORE UPDATE ON matrix_notices FOR EACH ROW "
                    "EXECUTE FUNCTION test_fail()", db_url)
            alice.invite(mgmt, "@bob:example.org")
            wait_until(lambda: pg.psql("SELECT last_value FROM test_fail", db_url) == "1",
                       what="the words' end refused once")
            refusing[0] = False
            wait_until(lambda: hs.members(mgmt).get(bot) == "leave", timeout=60, what="the bot leaving")
        elif found_by == "member_event":
            alice.invite(mgmt, "@bob:example.org")
            wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0",
                       what="the room ended by bob's member event")
            refusing[0] = False
            wait_until(lambda: hs.members(mgmt).get(bot) == "leave", timeout=60, what="the bot leaving")
        else:
            hs.stop_pushing()
            try:
                alice.invite(mgmt, "@bob:example.org")
                refusing[0] = False
                wait_until(lambda: hs.members(mgmt).get(bot) == "leave", timeout=60, what="the bot leaving")
            finally:
                hs.resume_pushing()
    finally:
        hs.refuse = None
    assert refused
    bobs_member_event_handled(hs, pg, db_url)
    words = said()
    assert not any("mimi://wa.example/u/wally" in w or "opted in" in w for w in words), words
    assert len(words) == 2 and "Someone else is in this room now" in words[1], words
    assert pg.psql(queued, db_url) == "0"
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"


@pytest.mark.parametrize("meanwhile", ["gone", "moved"])
def test_a_word_is_not_said_where_someone_else_is_once_the_room_is_hers_no_more(mx, hs, pg, db_url, meanwhile):
    """Two words of the bot's are queued for alice's management room, and
    bob is in it (invited, his member event not pushed yet): the bot,
    about to send the first, reads the room's members and finds him.
    Meanwhile the room became hers no more (its row gone, or moved to
    another room of hers), so the bot's ending of it finds nothing to end
    (no word to an intruder: whatever changed the room says its own).
    Neither word is said: looked at again, the room would read as no
    management room, and a word be said as a word of another room, to
    bob.  The first is done with (hers_alone_of's -1 where the room was
    not ended by its look, not -2, "not known for now"); until the
    fifty-sixth session the second, held back from that batch only, was
    said to bob in the next (end_mgmt_room did not do with the room's
    words when it ended nothing)."""
    bot = "@_cw_bot:example.org"
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")
    change = {"gone": "DELETE FROM matrix_mgmt_rooms WHERE room_id = '%s'",
              "moved": "UPDATE matrix_mgmt_rooms SET room_id = '!elsewhere:example.org' WHERE room_id = '%s'"}
    changed = []

    # the room changes while the bot reads its members, between the
    # batch's look (its owner alice) and the room's end
    def refuse(method, path, user):
        if not changed and method == "GET" and user == bot and urllib.parse.unquote(path).endswith(mgmt + "/members"):
            pg.psql(change[meanwhile] % mgmt, db_url)
            changed.append(path)
        return False

    queued = "SELECT count(*) FROM matrix_notices WHERE room_id = '%s' AND body LIKE 'word %%' AND done_at IS NULL" % mgmt
    hs.stop_pushing()
    try:
        alice.invite(mgmt, "@bob:example.org")
        hs.refuse = refuse
        pg.psql("INSERT INTO matrix_notices (room_id, body) SELECT '%s', 'word ' || g FROM generate_series(1, 2) g "
                "ORDER BY g; NOTIFY causeway_matrix_bot" % mgmt, db_url)
        wait_until(lambda: changed and pg.psql(queued, db_url) == "0", timeout=30, what="the words done with")
        time.sleep(3)  # a word held back (2 s) would be tried again meanwhile
    finally:
        hs.refuse = None
        hs.resume_pushing()
    tried = [q["body"].get("body") for q in hs.requests
             if q["method"] == "PUT" and "/send/m.room.message/" in urllib.parse.unquote(q["path"])
             and mgmt in urllib.parse.unquote(q["path"]) and q.get("user") == bot]
    assert not [w for w in tried if (w or "").startswith("word ")], tried
    assert len(changed) == 1
    assert not any("Someone else is in this room now" in w for w in said()), said()


def test_a_commands_answer_is_not_said_where_someone_else_is_once_the_room_is_hers_no_more(mx, hs, gk, pg, db_url):
    """alice's "list" waits on a lock of a table its list reads; meanwhile
    bob is invited into her management room (his member event not pushed
    yet) and, as the bot reads the room's members before its answer, the
    room becomes hers no more (its row gone).  The bot finds bob there and
    nothing to end: the answer is not said (hers_alone_of's -1).  "Not
    known for now" (-2) would queue it, and the queued answer, looked at
    again in a room no longer a management room, would go out to bob as
    a word of another room."""
    bot = "@_cw_bot:example.org"
    consent_alice(mx)
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")
    changed = []

    def refuse(method, path, user):
        if not changed and method == "GET" and user == bot and urllib.parse.unquote(path).endswith(mgmt + "/members"):
            pg.psql("DELETE FROM matrix_mgmt_rooms WHERE room_id = '%s'" % mgmt, db_url)
            changed.append(path)
        return False

    try:
        with her_list_held(alice, mgmt, pg, db_url) as held:
            hs.stop_pushing()
            alice.invite(mgmt, "@bob:example.org")
            hs.refuse = refuse
            held.end()
            wait_until(lambda: changed, timeout=30, what="the members read before the answer")
            time.sleep(4)  # an answer queued would be sent meanwhile (2 s)
    finally:
        hs.refuse = None
        hs.resume_pushing()
    words = said()
    assert not any("mimi://wa.example/u/wally" in w or "opted in" in w for w in words), words
    assert pg.psql("SELECT count(*) FROM matrix_notices WHERE room_id = '%s'" % mgmt, db_url) == "0"


def members_reads_after_help(hs, room, last_word):
    """The GET /rooms/{room}/members the homeserver served after the bot
    said its help in room and before the bot's word for which last_word
    is true (the requests in the order they were served)."""
    bot = "@_cw_bot:example.org"
    reads, counting = 0, False
    for q in hs.requests:
        path = urllib.parse.unquote(q["path"])
        said = (q["method"] == "PUT" and "/send/m.room.message/" in path and room in path
                and q.get("user") == bot and q["status"] == 200)
        if said and "Commands" in q["body"].get("body", ""):
            counting = True
        elif counting and said and last_word(q["body"].get("body", "")):
            return reads
        elif counting and q["method"] == "GET" and path.endswith(room + "/members"):
            reads += 1
    raise AssertionError("the help or the last word not said in " + room)


def test_a_queued_word_is_not_sent_once_a_newcomers_member_event_is_in(mx, hs, pg, db_url):
    """Five of the bot's words are queued for alice's management room
    (matrix_notices, as a report's answers are) and go out in one batch;
    the homeserver is slow to take the first.  Meanwhile bob is invited,
    and his member event reaches the adapter (a transaction: stored in the
    bot's inbox, handled by the bot after the batch).  The first word's
    send began before anyone else was in; none after it may be sent: each
    word asks the database, right before its send, whether its row is
    still queued, the room still her management room and no member event
    of someone else waiting for the bot there.  Until the fifty-fourth
    session's review the batch took the room's first look for all its
    words (hers_alone_once), and the four others were said to bob.  Then
    the bot handles his member event: the words are done with unsaid, it
    says what it says to an intruder, and leaves."""
    bot = "@_cw_bot:example.org"
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")
    sending, slow, inbox, held = threading.Event(), [True], threading.Event(), []

    # the first word is answered once bob's member event is in the bot's
    # inbox (8 s at most, within the adapter's 10 s request timeout), not
    # after a fixed 4 s the event had to come within on a loaded machine
    def latency(user):
        if user == bot and slow[0]:
            slow[0] = False
            sending.set()
            held.append(inbox.wait(8))
        return 0.0

    hs.send_latency = latency
    try:
        pg.psql("INSERT INTO matrix_notices (room_id, body) SELECT '%s', 'word ' || g "
                "FROM generate_series(1, 5) g ORDER BY g; NOTIFY causeway_matrix_bot" % mgmt, db_url)
        assert sending.wait(30), "the first word not sent"
        alice.invite(mgmt, "@bob:example.org")
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox "
                                   "WHERE event->>'state_key' = '@bob:example.org'", db_url) == "1",
                   timeout=8, what="bob's invitation in the bot's inbox during the first send")
        inbox.set()
    finally:
        inbox.set()
        hs.send_latency = 0.0
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", timeout=30, what="the bot leaving")
    assert held == [True], "the first send answered before bob's invitation was in the bot's inbox"
    time.sleep(1)  # anything else the bot would send there
    tried = [q["body"].get("body") for q in hs.requests
             if q["method"] == "PUT" and "/send/m.room.message/" in urllib.parse.unquote(q["path"])
             and mgmt in urllib.parse.unquote(q["path"]) and q.get("user") == bot
             and q["body"].get("body", "").startswith("word ")]
    assert tried == ["word 1"], tried
    assert "Someone else is in this room now" in said()[-1], said()
    assert pg.psql("SELECT count(*) FROM matrix_notices WHERE room_id = '%s' AND body LIKE 'word %%' "
                   "AND done_at IS NULL" % mgmt, db_url) == "0"
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"


def test_a_consent_request_is_not_shown_once_a_newcomers_member_event_is_in(mx, hs, gk, pg, db_url):
    """Three consent requests wait for alice's management room; she opens
    one, and they go out in one batch, the homeserver slow to take the
    first.  Meanwhile bob is invited, and his member event reaches the
    adapter (stored in the bot's inbox, handled after the batch).  The
    first request's send began before he was in; the two others are not
    shown (request_still, at each send): until the fifty-fourth session's
    review the batch's first look stood for them and they were shown to
    bob.  They stay unshown, for her next management room."""
    a, _ = gk
    bot = "@_cw_bot:example.org"
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    hs.create_user("bob")
    for who in ("ed", "fay", "gus"):
        room = a.create_room([a.user(who), ALICE]).json()["id"]
        a.send(room, a.user(who), "hi alice")
    wait_until(lambda: pg.psql("SELECT count(*) FROM consent_requests WHERE state = 'pending'", db_url) == "3",
               what="the three requests")
    sending, sends, inbox, held = threading.Event(), [0], threading.Event(), []

    # as above: the first request answered once bob's member event is in
    # the bot's inbox, 8 s at most
    def latency(user):
        if user != bot:
            return 0.0
        sends[0] += 1
        if sends[0] == 2:  # the first request, after the help
            sending.set()
            held.append(inbox.wait(8))
        return 0.0

    hs.send_latency = latency
    try:
        mgmt = alice.create_dm(bot)
        assert sending.wait(30), "the first request not sent"
        alice.invite(mgmt, "@bob:example.org")
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox "
                                   "WHERE event->>'state_key' = '@bob:example.org'", db_url) == "1",
                   timeout=8, what="bob's invitation in the bot's inbox during the first send")
        inbox.set()
    finally:
        inbox.set()
        hs.send_latency = 0.0
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", timeout=30, what="the bot leaving")
    assert held == [True], "the first send answered before bob's invitation was in the bot's inbox"
    time.sleep(1)
    tried = [q["body"].get("body") for q in hs.requests
             if q["method"] == "PUT" and "/send/m.room.message/" in urllib.parse.unquote(q["path"])
             and mgmt in urllib.parse.unquote(q["path"]) and q.get("user") == bot
             and "wants to write" in q["body"].get("body", "")]
    assert len(tried) == 1, tried
    assert pg.psql("SELECT count(*) FROM consent_requests WHERE notified_at IS NULL", db_url) == "2"


def test_the_bots_queued_words_of_one_room_read_its_members_once(make_daemon, pg_planned, hs):
    """Ten of the bot's words queued for alice's management room (as a
    report's answers, answers the homeserver did not take at once,
    expiries are: matrix_notices) go out in one batch, each only while the
    room is hers alone (hers_alone: whose room it is, then its members).
    Until the fifty-fourth session each word asked again: ten reads of
    whose room it is, ten GET /rooms/{id}/members, for one room and one
    batch; now the batch's first word of the room asks and the others
    take its answer.  Since the fifty-fifth session whose room it is
    comes with the batch's words (the statement that takes them), and
    each send's look at the database confirms it: that first word no
    longer reads it on its own.  All ten are said, in order."""
    db_url = pg_planned.new_database("t_mx_words_one_look")
    start_mx(make_daemon, db_url, hs)
    alice, mgmt, said = alice_and_the_bot(hs)
    whose = "SELECT user_id FROM matrix_mgmt_rooms WHERE room_id = $1"
    asked0, _ = pg_planned.planned(db_url, whose)
    pg_planned.psql("INSERT INTO matrix_notices (room_id, body) SELECT '%s', 'word ' || g "
                    "FROM generate_series(1, 10) g ORDER BY g; NOTIFY causeway_matrix_bot" % mgmt, db_url)
    wait_until(lambda: sum(w.startswith("word ") for w in said()) == 10, timeout=30, what="the ten words")
    assert [w for w in said() if w.startswith("word ")] == ["word %d" % g for g in range(1, 11)], said()
    assert members_reads_after_help(hs, mgmt, lambda b: b == "word 10") == 1
    asked, _ = pg_planned.planned(db_url, whose)
    assert asked - asked0 == 0, (asked0, asked)
    wait_until(lambda: pg_planned.psql("SELECT count(*) FROM matrix_notices WHERE done_at IS NULL", db_url) == "0",
               what="the words done with")


def test_the_consent_requests_waiting_for_her_room_read_its_members_once(mx, hs, gk, pg, db_url):
    """Three consent requests wait for alice's management room (she has
    none yet); once she opens one, all three are shown in one batch, each
    only while the room is hers alone.  Until the fifty-fourth session
    each request read the room's members again (three GET
    /rooms/{id}/members after the bot's help); now one."""
    a, _ = gk
    bot = "@_cw_bot:example.org"
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    for who in ("ed", "fay", "gus"):
        room = a.create_room([a.user(who), ALICE]).json()["id"]
        a.send(room, a.user(who), "hi alice")
    wait_until(lambda: pg.psql("SELECT count(*) FROM consent_requests WHERE state = 'pending'", db_url) == "3",
               what="the three requests")
    mgmt = alice.create_dm(bot)
    shown = lambda: [e["content"]["body"] for e in hs.events(mgmt)  # noqa: E731
                     if e["type"] == "m.room.message" and e["sender"] == bot and "wants to write" in
                     e["content"].get("body", "")]
    wait_until(lambda: len(shown()) == 3, timeout=30, what="the three requests shown")
    for who in ("ed", "fay", "gus"):
        assert sum(f"mimi://wa.example/u/{who}" in w for w in shown()) == 1, shown()
    last = shown()[-1]
    # The room's requests in the order served, for a failure's message: it
    # failed once in CI under load (the sixty-first session) and never in
    # 19 runs of ours with the cores busy.  Two races of the test's with
    # what it reads, found in the sixty-second session, explain it: the
    # stand-in stored the last request's event before it recorded its
    # send (members_reads_after_help found no last word; the stand-in now
    # lists a request before its effect shows), and the bot marks a
    # request told (notified_at) only once the send is answered, after the
    # event is in the room (the count below was read at once; waited for).

    def line(q):
        body = q.get("body") if isinstance(q.get("body"), dict) else {}
        where = urllib.parse.unquote(q["path"]).rsplit(mgmt, 1)[-1][:40]
        return f'{q["method"]} {where} {q["status"]} {str(body.get("body", ""))[:30]!r}'
    served = "\n".join(line(q) for q in hs.requests if mgmt in urllib.parse.unquote(q["path"]))
    assert members_reads_after_help(hs, mgmt, lambda b: b == last) == 1, served
    wait_until(lambda: pg.psql("SELECT count(*) FROM consent_requests WHERE notified_at IS NULL", db_url) == "0",
               what="the three requests marked told")


def test_the_bots_refused_leave_of_a_management_room_she_left_is_tried_again(mx, hs, pg, db_url):
    """alice leaves her management room: the bot forgets it and leaves too.
    A leave the homeserver did not take for now (a 503, twice here) is
    tried again, backed off as the bot's other work is; until the
    fifty-second session the failure was logged and the bot stayed in
    the empty room for good."""
    bot = "@_cw_bot:example.org"
    alice, mgmt, said = alice_and_the_bot(hs)
    refused = []

    def refuse(method, path, user):
        if method == "POST" and path.endswith("/leave") and user == bot and len(refused) < 2:
            refused.append(path)
            return True
        return False

    hs.refuse = refuse
    try:
        alice.leave(mgmt)
        wait_until(lambda: len(refused) == 2, timeout=30, what="the bot's leave refused twice")
        assert hs.members(mgmt).get(bot) == "join"
        wait_until(lambda: hs.members(mgmt).get(bot) == "leave", timeout=30, what="the bot leaving at last")
    finally:
        hs.refuse = None
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               what="her leave's work done")


def test_the_bots_leave_of_a_management_room_she_left_refused_for_the_as_token_is_tried_again(mx, hs, pg, db_url):
    """As above, the bot's leave refused 401 M_UNKNOWN_TOKEN (the as_token
    refused: the bot's work waits for it, and runs again once it is
    taken): the run again, which finds her management room forgotten
    already, is a try again, and the bot leaves. Until the fifty-fourth
    session a row stopped by the as_token's refusal was not marked tried,
    and its run again took the room for someone else's: the row was done,
    the bot in her empty room for good."""
    bot = "@_cw_bot:example.org"
    alice, mgmt, said = alice_and_the_bot(hs)
    refused = []

    def refuse(method, path, user):
        if method == "POST" and path.endswith("/leave") and user == bot and not refused:
            refused.append(path)
            return 401
        return False

    hs.refuse = refuse
    try:
        alice.leave(mgmt)
        wait_until(lambda: refused, timeout=30, what="the bot's leave refused")
        wait_until(lambda: hs.members(mgmt).get(bot) == "leave", timeout=30, what="the bot leaving at last")
    finally:
        hs.refuse = None
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               what="her leave's work done")


@pytest.mark.parametrize("before", ["none", "another"])
def test_someone_invited_while_the_bot_sets_up_a_management_room_ends_it(mx, hs, pg, db_url, before):
    """The bot, invited by alice, joins, finds nobody else in the room, and
    records it as her management room; a transaction's member events are
    checked against that record.  carol, invited after the bot looked at
    the members but before the record was written (here: while a table
    lock holds the write), was seen by neither: the room became alice's
    management room with carol in it.  Since the fortieth session the bot
    looks at the members again once the record is written, and leaves; the
    management room she had before (if any) stays hers, told nothing."""
    bot = "@_cw_bot:example.org"
    carol = "@carol:example.org"
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")
    if before == "another":
        alice, old, said_old = alice_and_the_bot(hs)
    else:
        alice = hs.as_user(hs.create_user("alice")[1])
    hs.create_user("carol")
    held = HeldSession(db_url)
    try:
        held.run("BEGIN; LOCK TABLE matrix_mgmt_rooms IN SHARE ROW EXCLUSIVE MODE;")
        mgmt = alice.create_dm(bot)
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND query LIKE '%INSERT INTO matrix_mgmt_rooms%'", db_url) == "1",
                   timeout=30, what="the record of the management room waiting for the lock")
        assert hs.members(mgmt).get(bot) == "join"
        alice.invite(mgmt, carol)
        wait_until(lambda: any(t["done"] and any(e["type"] == "m.room.member" and e.get("state_key") == carol
                                                 for e in t["events"]) for t in hs.transactions),
                   what="the transaction with carol's invitation taken")
        held.end()
    finally:
        held.end()
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot leaving")
    said = [e["content"]["body"] for e in hs.events(mgmt) if e["type"] == "m.room.message" and e["sender"] == bot]
    assert len(said) == 1 and "others are in it" in said[0], said
    if before == "none":
        assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"
        return
    assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == old
    assert hs.members(old).get(bot) == "join"
    assert not any("new room" in n for n in said_old()), said_old()
    assert "Commands" not in bot_answer(said_old, lambda: alice.send_text(old, "list"))  # still hers


@pytest.mark.parametrize("how", ["join", "invite"])
def test_a_user_of_another_server_in_a_management_room_ends_it(mx, hs, gk, pg, db_url, how):
    """eve, of another server, joins alice's management room by herself
    (alice made it public, or a space's members may join it), or is
    invited by another such user alice gave the power to: the room is
    alice's no more, as when she invites someone. Until the thirty-ninth
    session only member events sent by users of this server were looked
    at, and the bot went on showing alice's requests with eve reading."""
    bot = "@_cw_bot:example.org"
    alice, mgmt, said = alice_and_the_bot(hs)
    assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == mgmt
    sender = "@eve:evil.example" if how == "join" else "@mod:evil.example"
    ev = {"event_id": f"$eve-{how}", "room_id": mgmt, "sender": sender, "type": "m.room.member",
          "state_key": "@eve:evil.example", "origin_server_ts": int(time.time() * 1000),
          "content": {"membership": how}}
    assert as_put(mx, f"eve-{how}", {"events": [ev]}).status_code == 200
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", what="the bot leaving")
    assert "Someone else is in this room now" in said()[-1], said()
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"


def test_an_expiry_is_told_late_after_a_stop_of_up_to_six_days(mx, hs, gk, pg, db_url):
    """A request that expired while no process ran the bot (every daemon
    stopped, or one without the Matrix adapter sweeping) is told when a
    bot starts, late, if its record is of the last six days
    (EXPIRY_LOOKBACK_DAYS: below the seven days a told expiry's notice is
    kept against telling it twice); an older one is never told. As
    docs/matrix.md says."""
    a, _ = gk
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    for who in ("wally", "eve"):
        room = a.create_room([a.user(who), ALICE]).json()["id"]
        assert a.send(room, a.user(who), f"may I? ({who})").status_code == 202
    wait_until(lambda: sum("wants to write to you" in n for n in said()) == 2, what="both requests shown")
    mx.stop()
    # both expired meanwhile, wally's three days ago, eve's seven (as the
    # policy's sweep records it: consent.expire)
    pg.psql("UPDATE matrix_mgmt_rooms SET created_at = now() - interval '8 days'", db_url)
    for who, days in (("eve", 7), ("wally", 3)):  # in the order of their records' ids
        pg.psql("WITH q AS (UPDATE consent_requests q SET state = 'expired' FROM identities i "
                f" WHERE i.id = q.remote_identity_id AND i.localpart = '{who}' RETURNING q.id, i.uri) "
                "INSERT INTO audit_log (actor, action, subject, details, at) SELECT 'policy', 'consent.expire', "
                f"q.uri, jsonb_build_object('request', q.id), now() - interval '{days} days' FROM q", db_url)
    mx.start()
    wait_until(lambda: any("expired" in n for n in said()), timeout=20, what="the late expiry")
    list_answered_after_a_look_for_expiries(alice, mgmt, hs, pg, db_url,
                                            lambda: any(n.startswith("opted in: peer:gk") for n in said()))
    expired = [n for n in said() if "expired" in n]
    assert len(expired) == 1 and "mimi://wa.example/u/wally" in expired[0], expired



@pytest.mark.parametrize("content_days", [2, 0])
def test_a_told_notices_text_goes_at_content_days_its_ids_at_seven(make_daemon, db_url, hs, pg, content_days):
    """A notice told (sent or given up) is kept seven days for its ids (a
    resent transaction tells it no twice: its event_id, its txn_id), but
    its text (whom she accepted or blocked, who wrote to her) only as long
    as retention.content_days keeps content: erased then, the row kept
    (schema/044); content_days 0 keeps it the seven days. Until the
    forty-fifth session's review the text stayed the seven days whatever
    content_days said. A notice not told yet keeps its text (it is still
    to be said)."""
    mx = start_mx(make_daemon, db_url, hs, retention={"content_days": str(content_days)})
    mx.stop()
    pg.psql("INSERT INTO matrix_notices (room_id, body, sender, txn_id, created_at, done_at, next_at) VALUES "
            "('!a:example.org', 'Accepted mimi://wa.example/u/wally.', '@_cw_bot:example.org', 'cwtest-3', "
            " now() - interval '3 days', now() - interval '3 days', 'infinity'), "
            "('!a:example.org', 'Blocked mimi://wa.example/u/zoe.', '@_cw_bot:example.org', 'cwtest-1', "
            " now() - interval '1 day', now() - interval '1 day', 'infinity'), "
            "('!a:example.org', 'an old word', '@_cw_bot:example.org', 'cwtest-8', "
            " now() - interval '8 days', now() - interval '8 days', 'infinity'); "
            "INSERT INTO matrix_notices (room_id, body, event_id, created_at, done_at, next_at) VALUES "
            "('!a:example.org', 'Not delivered: too long.', '$refused', now() - interval '4 days', "
            " now() - interval '4 days', 'infinity')", db_url)
    mx.start()
    rows = "SELECT string_agg(coalesce(txn_id, event_id) || '=' || coalesce(body, '-'), ',' ORDER BY id) " \
           "FROM matrix_notices"
    if content_days:
        wait_until(lambda: pg.psql(rows, db_url) == "cwtest-3=-,cwtest-1=Blocked mimi://wa.example/u/zoe.,"
                   "$refused=-", timeout=15, what="the old texts erased, the old row forgotten")
    else:
        wait_until(lambda: "cwtest-8" not in pg.psql(rows, db_url), timeout=15, what="the old row forgotten")
        assert pg.psql(rows, db_url) == "cwtest-3=Accepted mimi://wa.example/u/wally.,cwtest-1=Blocked " \
            "mimi://wa.example/u/zoe.,$refused=Not delivered: too long."
    # a text not told yet cannot be erased
    with pytest.raises(RuntimeError, match="matrix_notices_body_kept_check"):
        pg.psql("INSERT INTO matrix_notices (room_id, body) VALUES ('!a:example.org', NULL)", db_url)

def test_an_edited_command_is_carried_out_as_edited(mx, hs, gk, pg, db_url):
    """An edit of a command (m.replace) is the command as edited, its
    m.new_content, answered once as any: a typo fixed by an edit is carried
    out. Until the thirty-eighth session the edit's fallback body ("*
    block ...") was read, and every edit got the help."""
    a, _ = gk
    wally = a.user("wally")
    alice, mgmt, said = alice_and_the_bot(hs)
    n = len(said())
    first = alice.send_text(mgmt, f"blokc {wally}")
    wait_until(lambda: len(said()) > n, what="the answer to the typo")
    assert "Commands" in said()[n]
    n = len(said())
    alice.edit(mgmt, first, f"block {wally}")
    wait_until(lambda: len(said()) > n, what="the answer to the edit")
    assert said()[n].startswith(f"Blocked {wally}."), said()[n]
    assert pg.psql("SELECT subject || ' ' || state FROM consents", db_url) == f"{wally} blocked"
    # an edit without new content is no command
    alice.send(mgmt, "m.room.message", {"msgtype": "m.text", "body": "* help",
                                        "m.relates_to": {"rel_type": "m.replace", "event_id": first}})
    alice.send_text(mgmt, "list")
    wait_until(lambda: any(f"blocked: {wally}" in t for t in said()[n + 1:]), what="the list")
    assert len(said()) == n + 2, said()[n:]


def test_a_command_in_an_m_notice_is_not_answered(mx, hs, gk, pg, db_url):
    """The specification: an m.notice "must never be automatically
    responded to" (two automated clients would answer each other for
    ever). A notice in the management room, or an edit into one, is no
    command; until the forty-fourth session the bot carried it out and
    answered it as any."""
    a, _ = gk
    wally = a.user("wally")
    alice, mgmt, said = alice_and_the_bot(hs)
    n = len(said())
    first = alice.send(mgmt, "m.room.message", {"msgtype": "m.notice", "body": f"block {wally}"})
    alice.send(mgmt, "m.room.message", {"msgtype": "m.text", "body": f"* block {wally}",
                                        "m.new_content": {"msgtype": "m.notice", "body": f"block {wally}"},
                                        "m.relates_to": {"rel_type": "m.replace", "event_id": first}})
    alice.send_text(mgmt, "list")
    # the bot works its inbox in order: the notices came before the list
    wait_until(lambda: len(said()) > n, what="the answer to the list")
    assert said()[n:] == ["Nothing yet: no requests, no decisions."], said()[n:]
    assert pg.psql("SELECT count(*) FROM consents", db_url) == "0"


def test_a_message_that_is_no_text_is_no_command(mx, hs, gk, pg, db_url):
    """Only an m.text message is a command: an image, a file, an emote
    (or an edit into one) sent to the bot is carried out as nothing and
    answered with one line, not the help; until the forty-seventh session
    its body was read as a command (an image named "block ..." blocked,
    any other got the whole help)."""
    a, _ = gk
    wally = a.user("wally")
    alice, mgmt, said = alice_and_the_bot(hs)
    n = len(said())
    alice.send(mgmt, "m.room.message", {"msgtype": "m.image", "body": f"block {wally}", "url": "mxc://example.org/a",
                                        "info": {"mimetype": "image/png"}})
    alice.send(mgmt, "m.room.message", {"msgtype": "m.file", "body": "cat.pdf", "url": "mxc://example.org/b"})
    first = alice.send(mgmt, "m.room.message", {"msgtype": "m.emote", "body": "waves"})
    alice.send(mgmt, "m.room.message", {"msgtype": "m.text", "body": f"* accept {wally}",
                                        "m.new_content": {"msgtype": "m.emote", "body": f"accept {wally}"},
                                        "m.relates_to": {"rel_type": "m.replace", "event_id": first}})
    alice.send_text(mgmt, "list")
    # the bot works its inbox in order: the four came before the list
    wait_until(lambda: len(said()) >= n + 5, what="the answers")
    line = 'I read only text messages: write a command, or "help" for the list.'
    assert said()[n:] == [line] * 4 + ["Nothing yet: no requests, no decisions."], said()[n:]
    assert pg.psql("SELECT count(*) FROM consents", db_url) == "0"


def test_a_management_room_encrypted_from_its_start_is_left_with_a_word(mx, hs, gk, pg, db_url):
    """Clients on matrix-rust-sdk (Element X) make every direct room
    encrypted from its start: all alice writes to the bot there is
    m.room.encrypted, which it cannot read. The bot says so and leaves,
    the room no management room; until the forty-fourth session it said
    its help, took the room, and never answered a command there. A room
    without encryption is taken as before."""
    bot = "@_cw_bot:example.org"
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")
    _, alice_token = hs.create_user("alice")
    alice = hs.as_user(alice_token)
    room = alice.create_dm(bot, initial_state=[{"type": "m.room.encryption",
                                                "content": {"algorithm": "m.megolm.v1.aes-sha2"}}])
    wait_until(lambda: hs.members(room).get(bot) == "leave", what="the bot leaves")
    said = [e["content"]["body"] for e in hs.events(room) if e["sender"] == bot and e["type"] == "m.room.message"]
    assert len(said) == 1 and said[0].startswith("This room is end-to-end encrypted"), said
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"
    mgmt = alice.create_dm(bot)
    wait_until(lambda: any(e["sender"] == bot and "Commands" in e["content"].get("body", "")
                           for e in hs.events(mgmt)), what="the bot's help")
    assert pg.psql("SELECT room_id FROM matrix_mgmt_rooms", db_url) == mgmt


def test_a_management_room_turned_encrypted_is_left_with_a_word(mx, hs, gk, pg, db_url):
    """Encryption turned on in her management room: the bot can read no
    command there from now on, says so and leaves, the room hers no more
    (requests wait for the next room she opens with it, as after her
    leave). Until the forty-fourth session it stayed, silent."""
    alice, mgmt, said = alice_and_the_bot(hs)
    alice.state(mgmt, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    wait_until(lambda: hs.members(mgmt).get("@_cw_bot:example.org") == "leave", what="the bot leaves")
    assert said()[-1].startswith("This room is end-to-end encrypted"), said()
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"


def peer_consistent(got):
    """What a peer was pushed, checked for the order a reader needs: an
    edit or a delete names a message the peer got before it, nothing
    names a message after its delete, no message comes twice. Returns
    {body of the message: [types of what named it, in order]}."""
    seen, gone, named = {}, set(), {}
    for e in got:
        c = e["content"]
        if e["type"] == "message":
            assert e["id"] not in seen, ("a message pushed twice", e, got)
            seen[e["id"]] = c["parts"][0]["body"]
            named[seen[e["id"]]] = []
            continue
        target = c.get("replaces") or c.get("in_reply_to")
        assert target in seen, (f"a {e['type']} of a message the peer never got", e, got)
        assert target not in gone, (f"a {e['type']} after the delete of its message", e, got)
        if e["type"] == "delete":
            gone.add(target)
        named[seen[target]].append(e["type"] + (":" + c["parts"][0]["body"] if e["type"] == "edit" else ""))
    return named


def test_an_edit_or_redaction_racing_its_message_reaches_the_peer_after_it_or_not_at_all(mx, hs, gk, pg, db_url):
    """A Matrix user's message and its edit (m.replace) and redaction,
    in every interleaving of the appservice transactions that carry them
    (the homeserver stand-in's transactions played by hand): in one
    transaction, in two transactions in flight at once (two threads), and
    the edit's transaction while the message's is still being written (a
    trigger holds its write). The peer gets the message first and the
    edit and the delete after it, in that order, or (an edit or a
    redaction whose transaction was read before its message was stored:
    to the gateway, an event it does not know) not at all: never an edit
    or a delete of a message it never got, never the message after its
    delete (docs/matrix.md, "Transactions")."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    base = {"room_id": room, "sender": ALICE_MX}

    def msg(k):
        return dict(base, event_id=f"$m{k}", type="m.room.message", origin_server_ts=1700000000000 + 3 * k,
                    content={"msgtype": "m.text", "body": f"m{k}"})

    def edit(k):
        return dict(base, event_id=f"$e{k}", type="m.room.message", origin_server_ts=1700000000001 + 3 * k,
                    content={"msgtype": "m.text", "body": f"* e{k}", "m.new_content": {"msgtype": "m.text",
                                                                                       "body": f"e{k}"},
                             "m.relates_to": {"rel_type": "m.replace", "event_id": f"$m{k}"}})

    def redaction(k):
        return dict(base, event_id=f"$r{k}", type="m.room.redaction", origin_server_ts=1700000000002 + 3 * k,
                    redacts=f"$m{k}", content={"redacts": f"$m{k}"})

    def at_once(*bodies):
        """The transactions sent together, the later ones up to 40 ms
        behind the first (all at the same instant, the message's is
        nearly never stored when the others are read: the spread lets
        both outcomes happen)."""
        go, res = threading.Barrier(len(bodies)), [None] * len(bodies)

        def put(i, txn, body):
            go.wait()
            if i:
                time.sleep(random.uniform(0, 0.04))
            res[i] = as_put(mx, txn, body)
        threads = [threading.Thread(target=put, args=(i,) + b) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in res] == [200] * len(bodies), [r.text for r in res]

    rounds, expect = 36, {}
    for k in range(rounds):
        case = k % 6
        if case == 0:    # one transaction: the message, its edit, its redaction
            assert as_put(mx, f"race-{k}", {"events": [msg(k), edit(k), redaction(k)]}).status_code == 200
            expect[f"m{k}"] = [[f"edit:e{k}", "delete"]]
        elif case == 1:  # one transaction: the message and its redaction
            assert as_put(mx, f"race-{k}", {"events": [msg(k), redaction(k)]}).status_code == 200
            expect[f"m{k}"] = [["delete"]]
        elif case == 2:  # the message and its edit, two transactions at once
            at_once((f"race-{k}a", {"events": [msg(k)]}), (f"race-{k}b", {"events": [edit(k)]}))
            expect[f"m{k}"] = [[], [f"edit:e{k}"]]
        elif case == 3:  # the message and its redaction, two transactions at once
            at_once((f"race-{k}a", {"events": [msg(k)]}), (f"race-{k}b", {"events": [redaction(k)]}))
            expect[f"m{k}"] = [[], ["delete"]]
        elif case == 4:  # the message; its edit and its redaction, three at once
            at_once((f"race-{k}a", {"events": [msg(k)]}), (f"race-{k}b", {"events": [edit(k)]}),
                    (f"race-{k}c", {"events": [redaction(k)]}))
            expect[f"m{k}"] = [[], [f"edit:e{k}"], ["delete"], [f"edit:e{k}", "delete"]]
        else:            # the message and, after it, its edit and a second edit at once
            at_once((f"race-{k}a", {"events": [msg(k)]}), (f"race-{k}b", {"events": [edit(k)]}),
                    (f"race-{k}c", {"events": [dict(edit(k), event_id=f"$f{k}", content=dict(
                        edit(k)["content"], **{"m.new_content": {"msgtype": "m.text", "body": f"f{k}"}}))]}))
            expect[f"m{k}"] = [[], [f"edit:e{k}"], [f"edit:f{k}"], [f"edit:e{k}", f"edit:f{k}"],
                               [f"edit:f{k}", f"edit:e{k}"]]
    # The edit's and the redaction's transaction read while the message's
    # is being written: a trigger holds its insert.
    pg.psql("CREATE FUNCTION t_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.content::text LIKE '%slowly%' THEN PERFORM pg_sleep(2); END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER t_slow BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION t_slow()", db_url)
    for k in range(rounds, rounds + 4):
        slow = dict(msg(k), content={"msgtype": "m.text", "body": f"m{k} slowly"})
        done = {}
        writer = threading.Thread(target=lambda: done.update(r=as_put(mx, f"race-{k}a", {"events": [slow]})))
        writer.start()
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'", db_url)
                   == "1", what="the message's write asleep")
        later = [edit(k)] if k % 2 else [redaction(k)]
        assert as_put(mx, f"race-{k}b", {"events": later}).status_code == 200
        writer.join(60)
        assert done["r"].status_code == 200
        expect[f"m{k} slowly"] = [[]]
    pg.psql("DROP TRIGGER t_slow ON events", db_url)
    assert as_put(mx, "race-end", {"events": [dict(msg(999), content={"msgtype": "m.text", "body": "marker"})]}
                  ).status_code == 200
    wait_until(lambda: any(e["type"] == "message" and e["content"]["parts"][0]["body"] == "marker"
                           for e in list(srv.events)), timeout=60, what="the marker at the peer")
    named = peer_consistent(list(srv.events))
    for body_, allowed in expect.items():
        assert named.get(body_) in allowed, (body_, named.get(body_), allowed)
    # what the peer got is what was stored, and nothing was stored twice
    assert pg.psql("SELECT count(*) FROM events WHERE origin_network = 'matrix'", db_url) == \
        str(len(list(srv.events)))


@pytest.mark.parametrize("trouble", ["none", "slow", "failing"])
def test_a_peers_edit_or_delete_right_behind_its_message_reaches_matrix_after_it(make_daemon, hs, pg, db_url,
                                                                                  trouble):
    """A peer's message and, right behind it (its delivery to Matrix under
    way), its edit and its delete: in one batch, or in requests of their
    own at the same moment, or two edits at once; with the homeserver
    quick, slow (each send 0.1 s: the edit and the delete are queued
    while the message is sent) or failing each send's first try (500:
    the message is retried, and what names it waits). The homeserver gets
    the ghost's message first, then each edit taken (an m.replace naming
    that message's event id) and the redaction of that very event last;
    an edit the API refused (after the delete) never reaches it, and
    nothing names the message after its redaction."""
    mx = start_mx(make_daemon, db_url, hs, dispatcher={"retry_base_ms": "20", "retry_max_ms": "100"})
    a, srv = add_gk(mx)
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    if trouble == "slow":
        hs.send_latency = 0.1
    elif trouble == "failing":
        tried = set()

        def first_try(path):
            if path in tried:
                return False
            tried.add(path)
            return True
        hs.refuse_send = first_try
    wally = a.user("wally")
    uri = a.call("GET", f"/v1/rooms/{room}").json()["uri"]

    def edit(m, text):
        return {"type": "edit", "sender": wally,
                "content": {"replaces": m, "parts": [{"type": "text/plain", "body": text}]}}

    def delete(m):
        return {"type": "delete", "sender": wally, "content": {"replaces": m}}

    def single(ev):
        r = a.call("POST", f"/v1/rooms/{room}/messages", ev, idem="k" + str(time.monotonic_ns()))
        return r.status_code

    def batch(*evs):
        r = a.call("POST", "/v1/batch", {"events": [{"idempotency_key": "k" + str(time.monotonic_ns()) + str(i),
                                                      "room": uri, "event": ev} for i, ev in enumerate(evs)]})
        assert r.status_code == 200, r.text
        return [202 if x["status"] == "accepted" else x["http_status"] for x in r.json()["results"]]

    def at_once(*evs):
        go, res = threading.Barrier(len(evs)), [None] * len(evs)

        def run(i, ev):
            go.wait()
            res[i] = single(ev)
        threads = [threading.Thread(target=run, args=(i, ev)) for i, ev in enumerate(evs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return res

    rounds, sent = (32 if trouble == "none" else 16), []
    for k in range(rounds):
        m = a.send(room, wally, f"m{k}").json()["id"]
        case = k % 4
        if case == 0:
            evs = [edit(m, f"e{k}"), delete(m)]
            got = batch(*evs)
        elif case == 1:
            evs = [edit(m, f"e{k}"), delete(m)]
            got = at_once(*evs)
        elif case == 2:
            evs = [edit(m, f"e{k}"), edit(m, f"f{k}")]
            got = at_once(*evs)
        else:
            evs = [edit(m, f"e{k}"), edit(m, f"f{k}"), delete(m)]
            got = batch(*evs)
        # a delete and the edits of a batch before it are taken; an edit
        # sent with a delete at once, before or after it (400)
        assert got[-1] == 202 and all(s in ((202, 400) if case == 1 else (202,)) for s in got), (k, got)
        sent.append((m, [(ev, s) for ev, s in zip(evs, got)]))
    # Everything taken arrived: one Matrix event per neutral one delivered.
    want = sum(1 + sum(1 for _, s in evs if s == 202) for _, evs in sent)
    ghost = "@_cw_gk_wally:example.org"
    mine = lambda: [e for e in hs.events(mx_room) if e["sender"] == ghost and  # noqa: E731
                    e["type"] in ("m.room.message", "m.room.redaction")]
    wait_until(lambda: len(mine()) >= want + 1, timeout=90, what="everything at the homeserver")  # + "hello"
    # the Matrix event ids are recorded once a delivery batch is done,
    # after its last event reached the homeserver
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' "
                               "AND state IN ('pending', 'in_flight', 'failed')", db_url) == "0", what="the ids recorded")
    timeline = mine()
    assert len(timeline) == want + 1, (len(timeline), want)
    pos = {e["event_id"]: i for i, e in enumerate(timeline)}
    native = dict(x.split("|") for x in pg.psql(
        "SELECT e.public_id || '|' || n.native_id FROM event_native_ids n JOIN events e ON e.id = n.event_id "
        "WHERE n.kind = 'event_id'", db_url).splitlines())
    for k, (m, evs) in enumerate(sent):
        mid = native[m]
        edits = [e for e in timeline if e["type"] == "m.room.message" and
                 e["content"].get("m.relates_to", {}).get("event_id") == mid]
        reds = [e for e in timeline if e["type"] == "m.room.redaction" and e["redacts"] == mid]
        taken_edits = [ev["content"]["parts"][0]["body"] for ev, s in evs if s == 202 and ev["type"] == "edit"]
        assert sorted(e["content"]["m.new_content"]["body"] for e in edits) == sorted(taken_edits), (k, edits)
        assert all(pos[mid] < pos[e["event_id"]] for e in edits), (k, timeline)
        deleted = any(s == 202 and ev["type"] == "delete" for ev, s in evs)
        assert len(reds) == (1 if deleted else 0), (k, reds)
        if reds:
            assert all(pos[e["event_id"]] < pos[reds[0]["event_id"]] for e in edits), (k, timeline)
        # the edits arrive in the order the API stored them (the stored
        # ones' content is gone once the message is deleted: their ids)
        order = pg.psql("SELECT string_agg(e.public_id, ' ' ORDER BY e.id) FROM events e JOIN events t "
                        f"ON t.id = e.replaces_id WHERE t.public_id = '{m}' AND e.type = 'edit'", db_url)
        assert [e["event_id"] for e in edits] == [native[x] for x in order.split()], (k, edits, order)
    if trouble == "failing":
        assert len(tried) >= want - sum(1 for _, evs in sent for ev, s in evs if s == 202 and ev["type"] == "delete")
    srv.close()


def test_rows_queued_behind_a_failing_send_are_not_charged_its_tries(make_daemon, hs, pg, db_url):
    """The homeserver fails the sends of a room's first row for a while
    (500) and the room's later rows wait behind it: they are not tried,
    and their attempts are not counted (each try of the first one counted
    one for every row behind it until the forty-third session, and a
    busy room's backlog behind a homeserver failing now and then went to
    the dead letters untried). Once the first goes, all go, in order, each
    later row with one attempt, its delivery.  Two things hung on the
    load until the sixtieth session (a CI run under load failed so once, and a
    run of ten beside two CPU hogs once): the sends were refused as soon
    as the room was bound, and its "hello", sent just after the binding,
    could be refused too, the first row then waiting untried behind it (no
    "first row failing" in 15 s); and the first row's tries, one every
    100 ms while the test reads and writes, could reach the default budget
    (12) before the sends were taken again, the room's rows all dead with
    it.  The budget is out of reach here: a later row charged a try is
    still seen, as an attempts count above 1."""
    mx = start_mx(make_daemon, db_url, hs, dispatcher={"retry_base_ms": "20", "retry_max_ms": "100",
                                                       "retry_budget": "1000"})
    a, srv = add_gk(mx)
    try:
        room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
        wait_until(lambda: any(e["type"] == "m.room.message" and e["content"].get("body") == "hello"
                               for e in hs.events(mx_room)), what="hello delivered")
        wally = a.user("wally")
        failing = {"on": True}
        hs.refuse_send = lambda path: failing["on"]
        first = a.send(room, wally, "first").json()["id"]
        tries = f"SELECT o.attempts FROM outbox o JOIN events e ON e.id = o.event_id WHERE e.public_id = '{first}'"
        wait_until(lambda: int(pg.psql(tries, db_url) or 0) >= 2, what="the first row failing")
        later = [a.send(room, wally, f"later {i}").json()["id"] for i in range(4)]
        start = int(pg.psql(tries, db_url))
        # Four more tries done with, none under way: a try counts as it is
        # claimed, and one claimed before the sends are taken again but
        # sent after would be the delivery itself (the last assertion then
        # failed so once under load, in the forty-sixth session).
        done = tries + " AND o.state = 'pending'"
        wait_until(lambda: int(pg.psql(done, db_url) or 0) >= start + 4, timeout=30, what="four more tries of the first")
        failing["on"] = False
        ghost = "@_cw_gk_wally:example.org"
        said = lambda: [e["content"]["body"] for e in hs.events(mx_room)  # noqa: E731
                        if e["sender"] == ghost and e["type"] == "m.room.message"]
        wait_until(lambda: said()[-5:] == ["first"] + [f"later {i}" for i in range(4)], timeout=30,
                   what="all five in order")
        ids = ", ".join(f"'{x}'" for x in later)
        rows = lambda: pg.psql("SELECT string_agg(o.state || ':' || o.attempts || ':' || "  # noqa: E731
                               "(SELECT count(*) FROM delivery_attempts d WHERE d.outbox_id = o.id), ' ' "
                               f"ORDER BY o.id) FROM outbox o JOIN events e ON e.id = o.event_id "
                               f"WHERE e.public_id IN ({ids})", db_url)
        wait_until(lambda: "in_flight" not in rows(), what="the deliveries recorded")
        assert rows() == " ".join(["delivered:1:1"] * 4)
        assert int(pg.psql(tries, db_url)) >= start + 5
    finally:
        srv.close()


def test_a_row_out_of_retries_takes_the_untried_rows_behind_it_dead(make_daemon, hs, pg, db_url):
    """The rows waiting untried behind a failing one (above) still go dead
    with it when it runs out of retries, so that none overtakes it and a
    replay oldest first keeps the room's order: they are given back
    before its failure is recorded.  The sends are refused only once the
    room's "hello" is delivered, as in the test above since the sixtieth
    session: until the sixty-first here the hello, sent just after the
    binding, could be refused too and, out of its three tries, take the
    batch's rows dead behind it untried (none "dead:3")."""
    mx = start_mx(make_daemon, db_url, hs,
                  dispatcher={"retry_budget": "3", "retry_base_ms": "20", "retry_max_ms": "50"})
    a, srv = add_gk(mx)
    try:
        room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
        wait_until(lambda: any(e["type"] == "m.room.message" and e["content"].get("body") == "hello"
                               for e in hs.events(mx_room)), what="hello delivered")
        uri = a.call("GET", f"/v1/rooms/{room}").json()["uri"]
        hs.refuse_send = lambda path: True
        r = a.call("POST", "/v1/batch", {"events": [
            {"idempotency_key": f"dead-{i}", "room": uri,
             "event": {"type": "message", "sender": a.user("wally"),
                       "content": {"parts": [{"type": "text/plain", "body": f"d{i}"}]}}} for i in range(3)]})
        assert r.status_code == 200 and all(x["status"] == "accepted" for x in r.json()["results"]), r.text
        ids = ", ".join(f"'{x['id']}'" for x in r.json()["results"])
        rows = lambda: pg.psql("SELECT string_agg(o.state || ':' || o.attempts || ':' || "  # noqa: E731
                               "(o.last_error LIKE '%ran out of retries%'), ' ' ORDER BY o.id) FROM outbox o "
                               f"JOIN events e ON e.id = o.event_id WHERE e.public_id IN ({ids})", db_url)
        wait_until(lambda: rows().startswith("dead:3:false"), timeout=30, what="the first row dead")
        assert rows() == "dead:3:false dead:0:true dead:0:true"
        assert not [e for e in hs.events(mx_room) if e["content"].get("body", "").startswith("d")]
    finally:
        srv.close()


def test_the_bots_commands_are_those_matrix_md_lists():
    """The commands the bot carries out (the verbs adapters/matrix/mx_bot.c
    and mx_cmd.c compare, and help, its answer to anything else) are the
    ones its help text lists and the ones docs/matrix.md's table of the
    management room lists, no more and none left out; a report's reason is
    as long as the table says (MX_BOT_REASON_MAX)."""
    from harness import TOP_SRCDIR

    def read(*parts):
        with open(os.path.join(TOP_SRCDIR, *parts), encoding="utf-8") as f:
            return f.read()
    bot = read("adapters", "matrix", "mx_bot.c")
    code = set(re.findall(r'strcmp\((?:out->|cmd\.)?verb, "([a-z-]+)"\)', bot + read("adapters", "matrix", "mx_cmd.c")))
    assert {"accept", "list"} <= code and "answer(m, c, room, txn, help_text);" in bot, code
    code.add("help")
    help_text = re.search(r"help_text\[\]\s*=\s*(.*?);\n", bot, re.S)
    assert help_text, "help_text not found in mx_bot.c"
    helped = set(re.findall(r'"  ([a-z-]+)[ <]', help_text.group(1)))
    section = re.search(r"^## The management room\n(.*?)^## ", read("docs", "matrix.md"), re.S | re.M)
    assert section, "no management room section in docs/matrix.md"
    listed = {v for row in re.findall(r"^\| (`[^|]*`) \|", section.group(1), re.M)
              for v in re.findall(r"`([a-z-]+)[ `]", row)}
    assert helped == code and listed == code, {"help": sorted(helped ^ code), "matrix.md": sorted(listed ^ code)}
    reason = re.search(r"#define MX_BOT_REASON_MAX (\d+)", read("adapters", "matrix", "mx_cmd.h"))
    assert reason and f"the rest of the line, at most {reason.group(1)} bytes" in section.group(1)


def test_the_bots_looks_for_work_are_not_planned_at_each_round(make_daemon, pg_planned, hs):
    """The bot looks for its work twice a second, work or not (its inbox,
    requests to show, expiries, dead letters, notices, portals): each look
    is prepared on its connection, and planned a few times at most (a
    statement with parameters: five custom plans, then the generic one).
    Until the forty-fifth session every look was planned at each round,
    5-7 ms of the database's CPU a round under load (docs/performance.md)."""
    db_url = pg_planned.new_database("t_bot_looks_planned")
    start_mx(make_daemon, db_url, hs)
    looks = {"inbox": "SELECT id, event::text, attempts, command_allowed, change_allowed FROM matrix_bot_inbox",
             "requests": "SELECT q.id, mr.room_id, ri.uri",
             "expiries": "SELECT a.id, mr.room_id, ri.uri",
             "dead letters": "WITH dd AS (SELECT o.id, o.destination, o.attempts",
             "notices": "WITH d AS (SELECT id FROM matrix_notices x",
             "departures": "SELECT b.native_id, ib.native_id, pm.binding_id",
             "renames": "SELECT b.native_id, b.id, rm.name",
             "invitations": "SELECT x.room_id, rm.name, x.identity_id",
             "invitees": "SELECT x.room_id, x.identity_id, b.native_id"}
    wait_until(lambda: pg_planned.planned(db_url, looks["invitees"])[0] >= 16, timeout=30, what="16 rounds")
    for what, prefix in looks.items():
        calls, plans = pg_planned.planned(db_url, prefix)
        assert calls >= 15 and plans <= 6, (what, calls, plans)


def test_the_lookup_of_a_delivery_batch_is_not_planned_at_each_batch(make_daemon, pg_planned, hs):
    """What a batch of rows to Matrix needs is read in one statement,
    prepared on the lane's connection when first run there and run with
    its generic plan: planned once per lane.  Until the forty-fifth
    session it was sent whole, planned at each batch (1.4 ms, more than
    half of running it; docs/performance.md)."""
    db_url = pg_planned.new_database("t_mx_batch_planned")
    d = start_mx(make_daemon, db_url, hs, dispatcher={"lanes": "2"})
    a, srv = add_gk(d)
    try:
        room, _ = wally_wrote_to_alice(d, hs, a, pg_planned, db_url)
        undelivered = "SELECT count(*) FROM outbox WHERE state NOT IN ('delivered', 'dropped')"
        for i in range(12):
            assert a.send(room, a.user("wally"), f"one of twelve: {i}").status_code == 202
            wait_until(lambda: pg_planned.psql(undelivered, db_url) == "0", what=f"message {i} delivered")
        calls, plans = pg_planned.planned(db_url, "SELECT x.k - $")
        assert calls >= 12 and plans <= 3, (calls, plans)
    finally:
        srv.close()


def test_the_lookup_of_a_delivery_batch_reads_only_the_bots_work_still_to_do(make_daemon, pg_planned, hs):
    """A batch's lookup asks whether a leave of its rooms waits in the
    bot's inbox (its unbinding to come, since the forty-seventh session):
    it reads the rows not yet handled (an index of them), not the handled
    ones the inbox keeps for days: 20,000 of them change nothing of what
    a lookup reads."""
    db_url = pg_planned.new_database("t_mx_batch_inbox")
    d = start_mx(make_daemon, db_url, hs)
    a, srv = add_gk(d)
    try:
        room, _ = wally_wrote_to_alice(d, hs, a, pg_planned, db_url)
        undelivered = "SELECT count(*) FROM outbox WHERE state NOT IN ('delivered', 'dropped')"

        def pages_per_lookup(what):
            assert a.send(room, a.user("wally"), f"{what}: once planned").status_code == 202
            wait_until(lambda: pg_planned.psql(undelivered, db_url) == "0", what="the first message delivered")
            calls0, pages0 = pg_planned.pages_read(db_url, "SELECT x.k - $")
            for i in range(8):
                assert a.send(room, a.user("wally"), f"{what}: {i}").status_code == 202
                wait_until(lambda: pg_planned.psql(undelivered, db_url) == "0", what=f"message {i} delivered")
            calls1, pages1 = pg_planned.pages_read(db_url, "SELECT x.k - $")
            assert calls1 - calls0 >= 8, (calls0, calls1)
            return (pages1 - pages0) / (calls1 - calls0)
        before = pages_per_lookup("an inbox with nothing handled")
        pg_planned.psql("INSERT INTO matrix_bot_inbox (event_id, event, handled_at) SELECT '$done' || g, "
                        "'{\"type\": \"m.room.member\", \"content\": {\"membership\": \"leave\"}}', now() "
                        "FROM generate_series(1, 20000) g; ANALYZE matrix_bot_inbox", db_url)
        after = pages_per_lookup("20,000 handled")
        assert after < before + 5, (before, after)
    finally:
        srv.close()


def test_the_lookup_of_a_transaction_is_planned_once_and_reads_events_by_key(make_daemon, pg_planned, hs):
    """What a transaction's events need (the events they name, their rooms,
    their senders: mx_txn_lookup) is run with its generic plan, planned once
    on each reader's connection: PostgreSQL planned it again at about half
    of the transactions while events grew (1.3 ms a plan).  And each event
    named is found by its key: PostgreSQL hashed the whole events table for
    every transaction that named one (a reply, a reaction, a receipt) while
    the table was up to some tens of thousands of rows (both until the
    forty-sixth session; docs/performance.md)."""
    db_url = pg_planned.new_database("t_mx_lookup_planned")
    d = start_mx(make_daemon, db_url, hs)
    a, srv = add_gk(d)
    try:
        room, _, base = alice_wrote_first(hs, a, srv)
        # 5,000 events more, analyzed: hashed whole, some 300 pages a lookup
        pg_planned.psql("INSERT INTO events (public_id, room_id, sender_id, type, content, origin_network, "
                        "origin_native_id, ts) SELECT 'msg_fill' || g, e.room_id, e.sender_id, e.type, e.content, "
                        "e.origin_network, '$fill' || g, e.ts FROM events e, generate_series(1, 5000) g "
                        "WHERE e.id = (SELECT min(id) FROM events WHERE origin_network = 'matrix')", db_url)
        pg_planned.psql("ANALYZE events", db_url)
        lookup = "WITH d AS (SELECT $1::jsonb AS j) SELECT "  # its constants are $3, ... there
        calls0, pages0 = pg_planned.pages_read(db_url, lookup)
        for i in range(16):
            evs = [text_ev(base, f"$pl{i}", f"message {i}"), reaction_ev(base, f"$pr{i}", f"$fill{i + 1}", "x"),
                   dict(base, event_id=f"$pp{i}", type="m.room.message",
                        content={"msgtype": "m.text", "body": "a reply",
                                 "m.relates_to": {"m.in_reply_to": {"event_id": f"$pl{i}"}}})]
            assert as_put(d, f"pl-{i}", {"events": evs}).status_code == 200
        got = srv.wait_events(1 + 3 * 16)
        assert [e["type"] for e in got[1:4]] == ["message", "reaction", "message"]
        assert got[2]["content"]["in_reply_to"] == pg_planned.psql(
            "SELECT public_id FROM events WHERE origin_native_id = '$fill1'", db_url)
        calls, plans = pg_planned.planned(db_url, lookup)
        assert calls >= 17 and plans <= 4, (calls, plans)
        calls1, pages1 = pg_planned.pages_read(db_url, lookup)
        assert calls1 - calls0 >= 16 and (pages1 - pages0) / (calls1 - calls0) < 60, (calls1 - calls0, pages1 - pages0)
    finally:
        srv.close()


def test_a_transaction_of_messages_is_written_without_the_peers_checks(make_daemon, pg_planned, hs):
    """A transaction of plain messages in a direct room (no item from a
    peer) is written by the statement without the peers' keys, their
    nonces and the answers for them (WRITE_ITEMS_LOCAL): PostgreSQL set up
    and tore down those never-run parts at every call, some 2 us an event
    of the write's 40 (until the fifty-first session; docs/performance.md).
    Its items are the ten columns it reads ($1-$10) and its outbox rows
    four columns of a row each ($11-$14), not the thirty columns and three
    scalars of the other writes: each column is a tuplestore of
    PostgreSQL's (until the fifty-fifth session, the write's local calls
    named $15 to $33 too: wide, below).
    The same rows: every event stored once, in order, and delivered."""
    db_url = pg_planned.new_database("t_mx_write_local")
    d = start_mx(make_daemon, db_url, hs)
    a, srv = add_gk(d)
    writes = ("SELECT coalesce(sum(calls) FILTER (WHERE query LIKE '%signature_nonces%'), 0) || ' ' || "
              "coalesce(sum(calls) FILTER (WHERE query NOT LIKE '%signature_nonces%'), 0) || ' ' || "
              "coalesce(sum(calls) FILTER (WHERE query NOT LIKE '%signature_nonces%' AND query LIKE '%$15::text[]%'), 0) "
              "FROM pg_stat_statements "
              "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 't_mx_write_local') "
              "AND starts_with(query, 'WITH it AS (') AND query LIKE '%INSERT INTO events (public_id%'")
    try:
        room, _, base = alice_wrote_first(hs, a, srv)
        checked0, local0, wide0 = map(int, pg_planned.psql(writes).split())
        for t in range(3):
            evs = [text_ev(base, f"$wl{t}_{i}", f"message {t}.{i}") for i in range(5)]
            assert as_put(d, f"wl-{t}", {"events": evs}).status_code == 200
        # a retried transaction: stored once
        assert as_put(d, "wl-again", {"events": [text_ev(base, "$wl0_0", "message 0.0")]}).status_code == 200
        got = srv.wait_events(1 + 15)
        assert [e["content"]["parts"][0]["body"] for e in got[1:]] == [
            f"message {t}.{i}" for t in range(3) for i in range(5)]
        assert pg_planned.psql("SELECT count(*), count(DISTINCT origin_native_id) FROM events "
                               "WHERE origin_native_id LIKE '$wl%'", db_url) == "15|15"
        checked, local, wide = map(int, pg_planned.psql(writes).split())
        assert local - local0 >= 3 and checked == checked0, (checked0, local0, checked, local)
        assert wide == wide0, (wide0, wide)
    finally:
        srv.close()


def test_her_membership_before_a_member_event_without_prev_content_is_read_in_her_room_alone(
        make_daemon, pg_planned, hs):
    """A member event of her own told without unsigned.prev_content, in a
    direct room: her membership before it is read from her last event
    stored through Matrix in that room (mx_txn_lookup's 'prior' rows).
    100,000 events of another room came after her last one: they are not
    read.  Until the forty-sixth session PostgreSQL walked events backwards
    by key until it met hers, every event of the gateway since (some 3,200
    pages a lookup here, against 15)."""
    db_url = pg_planned.new_database("t_mx_prior_in_her_room")
    d = start_mx(make_daemon, db_url, hs)
    a, srv = add_gk(d)
    try:
        alice, room, _ = alice_writes_to_wally(hs, a)
        alice.send_text(room, "hi")
        srv.wait_events(1)
        # the room of wally and someone, busy since
        pg_planned.psql("INSERT INTO events (public_id, room_id, sender_id, type, content, origin_network, "
                        "origin_native_id, ts) SELECT 'msg_busy' || g, r.id, i.id, 'message', e.content, 'matrix', "
                        "'$busy' || g, e.ts FROM events e, generate_series(1, 100000) g, "
                        "(SELECT id FROM rooms WHERE id NOT IN (SELECT room_id FROM room_bindings)) r, "
                        "(SELECT id FROM identities WHERE NOT is_local ORDER BY id LIMIT 1) i "
                        "WHERE e.id = (SELECT max(id) FROM events WHERE origin_network = 'matrix')", db_url)
        pg_planned.psql("ANALYZE events", db_url)
        lookup = "WITH d AS (SELECT $1::jsonb AS j) SELECT "
        calls0, pages0 = pg_planned.pages_read(db_url, lookup)
        hs.strip_prev_content = True
        eid = alice.state(room, "m.room.member", {"membership": "join", "displayname": "Alice B"},
                          state_key=ALICE_MX)
        alice.send_text(room, "marker")
        wait_until(lambda: any(e.get("type") == "message" and e["content"]["parts"][0]["body"] == "marker"
                               for e in list(srv.events)), what="the marker")
        # read as her profile change (she wrote there: joined), not a join
        assert not [e for e in list(srv.events) if e.get("type") == "membership"], list(srv.events)
        assert any(e["event_id"] == eid and "prev_content" not in e["unsigned"]
                   for t in hs.transactions for e in t.get("pushed", [])), "the rename, without prev_content"
        calls1, pages1 = pg_planned.pages_read(db_url, lookup)
        # (a lookup planned again after the ANALYZE reads some 130 pages more)
        assert calls1 > calls0 and (pages1 - pages0) / (calls1 - calls0) < 1000, (calls1 - calls0, pages1 - pages0)
    finally:
        srv.close()


def test_a_stop_while_the_databases_address_swallows_reconnects_is_at_once(make_daemon, db_url, hs, pg):
    """Every connection of the daemon cut while the database's address takes
    new connections and never answers them (a dropped route, a firewall
    that drops): the daemon, with the bot's thread connecting anew, stops
    at once.  Until the forty-eighth session the bot's connect (and the
    dispatcher's lanes', the policy's) held the stop up to connect_timeout
    (5 s)."""
    from pgproxy import stop_while_connects_swallowed
    with PgProxy(db_url) as px:
        d = start_mx(make_daemon, px.url, hs)
        time.sleep(1.0)  # its threads connected
        stop_while_connects_swallowed(px, d, pg, db_url)


def test_a_consent_request_held_by_a_newcomers_waiting_member_event_does_not_read_the_room_each_round(
        mx, hs, gk, pg, db_url):
    """bob is invited into alice's management room; the bot's handling of
    his member event (which ends the room) fails in the database (its end
    refused: the row waits, backed off), and alice takes the invitation
    back, so that the room's members, read from the homeserver, show
    nobody else.  A consent request for her comes meanwhile: it is not
    shown while bob's member event waits in the bot's inbox.  Until the
    fifty-fifth session it was read again at each round of the bot (each
    half second at most), and the room's members with it (GET /members:
    some eight in four seconds here), until the bot handled the event;
    now such a room's requests are not read at all.  Once the event is
    handled, the room ends, the request unshown, for her next room."""
    a, _ = gk
    bot = "@_cw_bot:example.org"
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    hs.create_user("bob")
    pg.psql("CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'injected failure'; END $$; "
            "CREATE TRIGGER test_fail BEFORE DELETE ON matrix_mgmt_rooms FOR EACH ROW "
            "EXECUTE FUNCTION test_fail()", db_url)
    try:
        alice.invite(mgmt, "@bob:example.org")
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE attempts > 0 AND handled_at IS NULL "
                                   "AND event->>'state_key' = '@bob:example.org'", db_url) == "1",
                   what="the handling of bob's invitation failed once")
        alice.call("POST", f"/_matrix/client/v3/rooms/{urllib.parse.quote(mgmt, safe='')}/kick",
                   {"user_id": "@bob:example.org"})
        assert hs.members(mgmt).get("@bob:example.org") == "leave"
        room = a.create_room([a.user("ed"), ALICE]).json()["id"]
        a.send(room, a.user("ed"), "hi alice")
        wait_until(lambda: pg.psql("SELECT count(*) FROM consent_requests WHERE state = 'pending'", db_url) == "1",
                   what="ed's request")

        def reads():
            return sum(1 for q in hs.requests if q["method"] == "GET"
                       and urllib.parse.unquote(q["path"]).endswith(mgmt + "/members"))

        reads0 = reads()
        time.sleep(4)
        held = reads() - reads0
        assert pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL "
                       "AND event->>'state_key' = '@bob:example.org'", db_url) == "1", "bob's event handled meanwhile"
        assert held <= 1, held
        assert not [w for w in said() if "wants to write" in w], said()
    finally:
        pg.psql("DROP TRIGGER test_fail ON matrix_mgmt_rooms; DROP FUNCTION test_fail()", db_url)
    pg.psql("UPDATE matrix_bot_inbox SET not_before = now() WHERE handled_at IS NULL; "
            "NOTIFY causeway_matrix_bot", db_url)
    wait_until(lambda: hs.members(mgmt).get(bot) == "leave", timeout=30, what="the bot leaving")
    assert "Someone else is in this room now" in said()[-1], said()
    assert not [w for w in said() if "wants to write" in w], said()
    assert pg.psql("SELECT count(*) FROM consent_requests WHERE notified_at IS NULL", db_url) == "1"
    assert pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0"


@pytest.mark.parametrize("stats", ["stale", "fresh"])
def test_the_bots_look_for_a_newcomer_reads_only_its_rooms_rows_whatever_the_inbox_backlog(
        make_daemon, pg, db_url, hs, stats):
    """The bot's look for someone else's member event waiting in its inbox
    for a management room (INBOX_NEWCOMER: the round that reads the
    consent requests to show, and each send's look of a request or a
    word) reads that room's rows alone, by matrix_bot_inbox_room_idx
    (053), however many unhandled rows wait elsewhere: 5,000 member
    events of other rooms waiting for a retry (as after a homeserver
    outage), the inbox's statistics taken before they came (stale: a
    backlog under autovacuum's threshold) or after (fresh).  Until the
    fifty-sixth session each look read every unhandled row
    (matrix_bot_inbox_due_idx, or the whole table), and the round's
    planner, taking them for 2 or 3 rows, compared each with each request
    (half a second a round at 10,000 rows).  Their plans, logged by
    auto_explain as run, with the buffers each read."""
    log = auto_explained(pg, db_url)
    d = start_mx(make_daemon, db_url, hs)
    a, srv = add_gk(d)
    try:
        assert d.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
        alice, mgmt, said = alice_and_the_bot(hs)
        inbox_backlog(pg, db_url, "join", "invite", stats)
        start = os.path.getsize(log)
        for who in ("ed", "fay", "gus"):
            room = a.create_room([a.user(who), ALICE]).json()["id"]
            a.send(room, a.user(who), "hi alice")
        wait_until(lambda: sum("wants to write" in w for w in said()) == 3, timeout=30,
                   what="the three requests shown")
        pg.psql("INSERT INTO matrix_notices (room_id, body) VALUES ('%s', 'a word'); "
                "NOTIFY causeway_matrix_bot" % mgmt, db_url)
        wait_until(lambda: "a word" in said(), timeout=30, what="the word said")
        plans = plans_logged(log, start)
        looks = {"requests": "SELECT q.id, mr.room_id, ri.uri",
                 "request's send": "SELECT 1 FROM consent_requests q JOIN matrix_mgmt_rooms mr",
                 "word's send": "SELECT x.done_at IS NOT NULL, (SELECT mr.user_id"}
        for what, marker in looks.items():
            mine = [p for p in plans if marker in p and "matrix_bot_inbox" in p]
            assert mine, f"no plan of the {what} logged"
            if what == "requests":  # one round that read the requests at least
                assert any(re.search(r"\n\s*Limit .*actual rows=[1-9]", p) for p in mine), mine
            for p in mine:
                reads_its_rooms_rows(p, what)
    finally:
        srv.close()


@pytest.mark.parametrize("fails", ["send", "members"])
def test_a_management_room_failing_for_now_holds_up_only_its_own_requests(mx, hs, gk, pg, db_url, fails):
    """alice's management room fails the bot for now (the homeserver
    answers 503 to the send of her first request's notice, or to the read
    of the room's members before it): her twenty requests wait half a
    minute, and are then shown, once each, the first with the same
    transaction id. bob's request, made meanwhile, is shown at once,
    though alice's twenty, older, would fill the bot's batch (BOT_BATCH):
    her room is left out of its look while it waits. Until the
    fifty-ninth session the pause was one for every room: bob waited out
    alice's half minute, and every other user's requests waited as long
    as one room failed."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    bob = "mimi://example.org/u/bob"
    assert mx.admin("PATCH", "/settings", json={"policy.consent_requests_per_user_per_day": 0}).ok
    for user in (ALICE, bob):
        assert mx.admin("POST", "/optins", json={"user": user, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    _, bob_mgmt, bob_said = alice_and_the_bot(hs, name="bob")
    healed = threading.Event()

    def in_her_room(method, path):
        path = urllib.parse.unquote(path)
        if fails == "send":
            return method == "PUT" and f"/rooms/{mgmt}/send/m.room.message/cwreq-" in path
        return method == "GET" and path.endswith(f"/rooms/{mgmt}/members")
    since = len(hs.requests)
    tries = lambda: [q for q in hs.requests[since:]  # noqa: E731
                     if q["user"] == bot and in_her_room(q["method"], q["path"])]
    hs.refuse = lambda method, path, user: user == bot and in_her_room(method, path) and not healed.is_set()
    try:
        for k in range(20):
            room = a.create_room([a.user(f"s{k}"), ALICE]).json()["id"]
            assert a.send(room, a.user(f"s{k}"), f"may I? (s{k})").status_code == 202
        wait_until(lambda: tries(), what="alice's room failing")
        room = a.create_room([a.user("zoe"), bob]).json()["id"]
        asked = time.monotonic()
        assert a.send(room, a.user("zoe"), "may I? (zoe)").status_code == 202
        wait_until(lambda: any("wants to write to you" in n for n in bob_said()), timeout=15,
                   what="zoe's request shown to bob while alice's room fails")
        shown_in = time.monotonic() - asked
        assert [q["status"] for q in tries()] == [503], tries()  # her room not tried again meanwhile
        assert not any("wants to write to you" in n for n in said()), said()
    finally:
        healed.set()
        hs.refuse = None
    wait_until(lambda: sum("wants to write to you" in n for n in said()) == 20, timeout=45,
               what="her requests shown to alice once her room heals")
    time.sleep(1)
    assert sum("wants to write to you" in n for n in said()) == 20, said()
    assert "mimi://wa.example/u/s0 " in [n for n in said() if "wants to write to you" in n][0], said()
    assert sum("wants to write to you" in n for n in bob_said()) == 1, bob_said()
    first, again = tries()[0], tries()[1]
    assert again["status"] == 200 and again["time"] - first["time"] > 25, (first, again)
    if fails == "send":
        assert again["path"] == first["path"], (first, again)  # the same transaction id
    assert pg.psql("SELECT count(*) FROM consent_requests WHERE notified_at IS NOT NULL", db_url) == "21"
    print(f"bob's request shown {shown_in:.2f} s after it was made")


def test_management_rooms_failing_past_the_bound_make_everyone_wait_as_before(mx, hs, gk, pg, db_url):
    """65 management rooms fail the bot for now (the homeserver answers
    503 to the reads of their members), one request waiting in each: the
    bot keeps 64 rooms' pauses, and the 65th room's failure makes everyone
    wait, as before the fifty-ninth session, until the soonest of the 64
    pauses ends (logged once: "too many management rooms wait ..."). No
    room is read again meanwhile: the 65th is not tried at each of the
    bot's rounds for want of room to note it. Once they heal, bob's
    request, made meanwhile, is shown."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    bob = "mimi://example.org/u/bob"
    assert mx.admin("POST", "/optins", json={"user": bob, "network": "peer:gk", "opted_in": True}).ok
    _, bob_mgmt, bob_said = alice_and_the_bot(hs, name="bob")
    healed = threading.Event()
    fake = re.compile(r"/rooms/!fake\d+:example\.org/members$")
    hs.refuse = lambda method, path, user: (user == bot and method == "GET" and not healed.is_set()
                                            and bool(fake.search(urllib.parse.unquote(path))))
    since = len(hs.requests)
    reads = lambda: collections.Counter(urllib.parse.unquote(q["path"]) for q in hs.requests[since:]  # noqa: E731
                                        if q["user"] == bot and fake.search(urllib.parse.unquote(q["path"])))
    t0 = time.monotonic()
    try:
        pg.psql("INSERT INTO identities (uri, domain, localpart, is_local, network) "
                "SELECT 'mimi://example.org/u/f' || g, 'example.org', 'f' || g, true, 'matrix' "
                "FROM generate_series(1, 65) g; "
                "INSERT INTO identities (uri, domain, localpart, is_local, network) "
                "VALUES ('mimi://xmpp.example/u/wally', 'xmpp.example', 'wally', false, 'xmpp'); "
                "INSERT INTO matrix_mgmt_rooms (user_id, room_id, identity_id) "
                "SELECT '@f' || g || ':example.org', '!fake' || g || ':example.org', i.id "
                "FROM generate_series(1, 65) g JOIN identities i ON i.uri = 'mimi://example.org/u/f' || g; "
                "INSERT INTO consent_requests (local_identity_id, remote_identity_id, expires_at) "
                "SELECT f.id, w.id, now() + interval '1 day' FROM identities f, identities w "
                "WHERE f.localpart ~ '^f[0-9]+$' AND w.uri = 'mimi://xmpp.example/u/wally' ORDER BY f.id; "
                "NOTIFY causeway_matrix_bot", db_url)
        wait_until(lambda: any(r.get("msg", "").startswith("too many management rooms wait") for r in mx.records),
                   timeout=20, what="the bound reached")
        room = a.create_room([a.user("zoe"), bob]).json()["id"]
        assert a.send(room, a.user("zoe"), "may I? (zoe)").status_code == 202
        time.sleep(10)
        assert len(reads()) == 65 and set(reads().values()) == {1}, reads()
        # everyone waits: bob's request is not shown while the soonest pause (30 s from its room's
        # failure, which came after t0) has not ended (the review's addition: without it a 65th room
        # simply left untried, bob shown at once, passed)
        if time.monotonic() - t0 < 29:
            assert not any("wants to write to you" in n for n in bob_said()), bob_said()
    finally:
        healed.set()
        hs.refuse = None
    wait_until(lambda: any("wants to write to you" in n for n in bob_said()), timeout=45,
               what="zoe's request shown to bob")
    assert sum(r.get("msg", "").startswith("too many management rooms wait") for r in mx.records) == 1


def fake_management_rooms(pg, db_url, n):
    """n management rooms of users f1..fn that the stand-in does not know
    (!fake<k>:example.org), one consent request (from wally, of XMPP)
    waiting in each, the bot woken."""
    pg.psql("INSERT INTO identities (uri, domain, localpart, is_local, network) "
            "SELECT 'mimi://example.org/u/f' || g, 'example.org', 'f' || g, true, 'matrix' "
            f"FROM generate_series(1, {n}) g; "
            "INSERT INTO identities (uri, domain, localpart, is_local, network) "
            "VALUES ('mimi://xmpp.example/u/wally', 'xmpp.example', 'wally', false, 'xmpp'); "
            "INSERT INTO matrix_mgmt_rooms (user_id, room_id, identity_id) "
            "SELECT '@f' || g || ':example.org', '!fake' || g || ':example.org', i.id "
            f"FROM generate_series(1, {n}) g JOIN identities i ON i.uri = 'mimi://example.org/u/f' || g; "
            "INSERT INTO consent_requests (local_identity_id, remote_identity_id, expires_at) "
            "SELECT f.id, w.id, now() + interval '1 day' FROM identities f, identities w "
            "WHERE f.localpart ~ '^f[0-9]+$' AND w.uri = 'mimi://xmpp.example/u/wally' ORDER BY f.id; "
            "NOTIFY causeway_matrix_bot", db_url)


@pytest.mark.parametrize("how", ["unanswered", "down"])
def test_a_homeserver_that_does_not_answer_makes_every_room_wait_after_two_tries(mx, hs, pg, db_url, how):
    """Eight management rooms, a consent request waiting in each, while the
    homeserver gives the bot no answer at all: it closes the connection
    unanswered (unanswered), or it is down, its port refusing connections
    (down). Unanswered: the first room's read of its members gets no
    answer, the room waits, the second room's gets none either, and every
    room waits half a minute (the two tried a minute): no other room is
    tried meanwhile (logged: "the homeserver did not answer the bot"). Once
    the half minute is over, the homeserver back, each other room is read
    again, the two once their minute is. Down: the first room's connection
    refused is the homeserver's at once, every room waits half a minute
    (logged: "the homeserver is not reachable"), and then each is read
    again, the one tried among them: until the sixty-first session a
    refused connection was told apart from a silence by nothing, a second
    room was tried, and the two waited a minute, behind the others. Until
    the sixtieth session no answer was the room's, as a 503 still is: each
    of the eight rooms had its try (up to 64 rooms, every half minute, each
    10 s of the bot's thread when the homeserver took connections and
    answered none)."""
    bot = "@_cw_bot:example.org"
    fake = re.compile(r"/rooms/!fake\d+:example\.org/members$")
    n = 8
    hs.keep_alive = False  # no kept connection of the bot's outlives the homeserver's going down
    wait_until(lambda: hs.user_exists(bot), what="the bot registered")
    alice_and_the_bot(hs)  # a call or two of the bot's on a connection closed after it
    since = len(hs.requests)

    def reads(after=since):
        return [q for q in hs.requests[after:] if q["user"] == bot and q["method"] == "GET"
                and fake.search(urllib.parse.unquote(q["path"]))]

    def failed():
        return [r for r in mx.records if r.get("msg") == "cannot read a room"
                and r.get("room", "").startswith("!fake")]
    if how == "unanswered":
        hs.refuse = hs.lose_reply = lambda method, path, user: (  # noqa: E731
            user == bot and bool(fake.search(urllib.parse.unquote(path))))
    else:
        hs._httpd.shutdown()
        hs._httpd.server_close()
    t0, t0_wall = time.monotonic(), time.time()
    try:
        fake_management_rooms(pg, db_url, n)
        wait_until(lambda: failed(), timeout=20, what="a room's members not read")
        time.sleep(5)
        tried = {r["room"] for r in failed()}
        if how == "unanswered":
            assert len(tried) == 2, sorted(tried)  # a second room's silence: the homeserver's
            assert {urllib.parse.unquote(q["path"]) for q in reads()} == {
                f"/_matrix/client/v3/rooms/{t}/members" for t in tried}, reads()
            assert len(reads()) <= 4, reads()  # (libcurl may send each again once on a fresh connection)
            assert any(r.get("msg", "").startswith("the homeserver did not answer the bot") for r in mx.records)
        else:
            assert len(tried) == 1, sorted(tried)  # a refused connection: the homeserver's at once
            assert any(r.get("msg", "").startswith("the homeserver is not reachable") for r in mx.records)
            assert not any(r.get("msg", "").startswith("the homeserver did not answer the bot")
                           for r in mx.records)
        assert time.monotonic() - t0 < 29  # all of it within the half minute
    finally:
        hs.refuse = hs.lose_reply = None
        if how == "down":
            srv = type(hs._httpd)(("127.0.0.1", hs.port), hs._httpd.RequestHandlerClass)
            srv.daemon_threads = True
            hs._httpd = srv
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        healed = len(hs.requests)
    # each room read again once the half minute is over (the stand-in knows
    # none of them: the bot is refused there, and they are management rooms
    # no more)
    # the others once the half minute is over, the two tried once their
    # minute is (so that two rooms that never answer are not tried first
    # again at every pause's end)
    tried_paths = {f"/_matrix/client/v3/rooms/{t}/members" for t in tried}
    if how == "unanswered":
        wait_until(lambda: len({q["path"] for q in reads(healed)}) == n - 2, timeout=45,
                   what="the other rooms read again")
        first = min(q["time"] for q in reads(healed))
        assert first - t0_wall > 25, first - t0_wall  # the half minute waited out
        assert not tried_paths & {urllib.parse.unquote(q["path"]) for q in reads(healed)}, reads(healed)
    wait_until(lambda: len({q["path"] for q in reads(healed)}) == n, timeout=45, what="every room read again")
    first = min(q["time"] for q in reads(healed))
    assert first - t0_wall > 25, first - t0_wall  # the half minute waited out
    last = max(q["time"] for q in reads(healed) if urllib.parse.unquote(q["path"]) in tried_paths)
    if how == "unanswered":
        assert last - t0_wall > 55, last - t0_wall  # their minute waited out
    else:
        assert last - t0_wall < 50, last - t0_wall  # with the others, not held a minute
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_mgmt_rooms WHERE room_id LIKE '!fake%'", db_url) == "0",
               timeout=20, what="the fake rooms forgotten")


def test_a_management_room_id_past_255_bytes_waits_alone(mx, hs, gk, pg, db_url):
    """A management room whose id is 312 bytes long (no homeserver makes
    one, and the transactions refuse one: a row written by hand) fails the
    bot for now (503 to the read of its members), a request waiting
    there: it waits half a minute alone, as any room, and bob's request,
    made meanwhile, is shown at once. Until the sixtieth session its id
    did not fit the bot's note of a paused room (255 bytes), and it made
    everyone wait as 64 rooms failing at once do ("too many management
    rooms wait ..."): bob waited out its half minute."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    bob = "mimi://example.org/u/bob"
    long_room = "!" + "l" * 299 + ":example.org"
    assert mx.admin("POST", "/optins", json={"user": bob, "network": "peer:gk", "opted_in": True}).ok
    _, _, bob_said = alice_and_the_bot(hs, name="bob")
    since = len(hs.requests)
    reads = lambda: [q for q in hs.requests[since:]  # noqa: E731
                     if q["user"] == bot and long_room in urllib.parse.unquote(q["path"])]
    hs.refuse = lambda method, path, user: user == bot and long_room in urllib.parse.unquote(path)
    try:
        pg.psql("INSERT INTO identities (uri, domain, localpart, is_local, network) VALUES "
                "('mimi://example.org/u/lou', 'example.org', 'lou', true, 'matrix'), "
                "('mimi://xmpp.example/u/wally', 'xmpp.example', 'wally', false, 'xmpp'); "
                "INSERT INTO matrix_mgmt_rooms (user_id, room_id, identity_id) "
                f"SELECT '@lou:example.org', '{long_room}', id FROM identities WHERE localpart = 'lou'; "
                "INSERT INTO consent_requests (local_identity_id, remote_identity_id, expires_at) "
                "SELECT l.id, w.id, now() + interval '1 day' FROM identities l, identities w "
                "WHERE l.localpart = 'lou' AND w.localpart = 'wally'; NOTIFY causeway_matrix_bot", db_url)
        wait_until(lambda: reads(), what="the long room's members read")
        assert [q["status"] for q in reads()] == [503], reads()
        room = a.create_room([a.user("zoe"), bob]).json()["id"]
        asked = time.monotonic()
        assert a.send(room, a.user("zoe"), "may I? (zoe)").status_code == 202
        wait_until(lambda: any("wants to write to you" in n for n in bob_said()), timeout=15,
                   what="zoe's request shown to bob while the long room waits")
        assert time.monotonic() - asked < 10
        assert [q["status"] for q in reads()] == [503], reads()  # not tried again meanwhile
        assert not any(r.get("msg", "").startswith("too many management rooms wait") for r in mx.records)
    finally:
        hs.refuse = None


def test_a_command_run_again_after_its_handled_mark_was_lost_takes_one_token(mx, hs, pg, db_url):
    """Each of alice's 25 commands has its inbox row's handled mark lost
    once (a trigger skips the row's first update to handled: as a mark
    whose statement failed), so each runs again at once, answered once
    (its answer's transaction id is its event's). A run again takes no
    token of her commands bucket (31 a minute; the invitation took one),
    so her next command, a list, is answered. Until the sixtieth session
    each run again took one, 51 tokens for 26 commands, and her list was
    refused, unanswered, though she had given 26 commands."""
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, mgmt, said = alice_and_the_bot(hs)  # one token
    pg.psql("CREATE TABLE lost_marks (id bigint PRIMARY KEY); "
            "CREATE FUNCTION lose_mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            " IF NEW.handled_at IS NOT NULL AND OLD.handled_at IS NULL AND OLD.event->>'type' = 'm.room.message' "
            "  AND NOT EXISTS (SELECT 1 FROM lost_marks WHERE id = OLD.id) THEN "
            "  INSERT INTO lost_marks VALUES (OLD.id); RETURN NULL; END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER lose_mark BEFORE UPDATE ON matrix_bot_inbox FOR EACH ROW EXECUTE FUNCTION lose_mark()",
            db_url)
    try:
        for i in range(25):
            alice.send_text(mgmt, "help")
        # each ran twice (its mark lost once), and is handled
        wait_until(lambda: pg.psql("SELECT count(*) FROM lost_marks", db_url) == "25"
                   and pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
                   timeout=30, what="every command run twice and handled")
        alice.send_text(mgmt, "list")
        wait_until(lambda: "Nothing yet: no requests, no decisions." in said(), timeout=15,
                   what="her list answered")
        assert sum("Commands" in n for n in said()) == 26, said()  # each help said once
        assert not any(n.startswith("Slow down") for n in said()), said()
    finally:
        pg.psql("DROP TRIGGER lose_mark ON matrix_bot_inbox; DROP FUNCTION lose_mark(); DROP TABLE lost_marks",
                db_url)


def test_a_429_to_the_read_of_a_management_rooms_members_waits_as_asked(mx, hs, gk, pg, db_url):
    """The homeserver answers the bot's first read of alice's management
    room's members, before her consent request is shown, with 429
    M_LIMIT_EXCEEDED asking 3 s: the bot waits what it asked, as after a
    429 to a send (every room's requests wait: the limit is the bot's),
    and her request is shown at the read after it. Until the sixtieth
    session such a 429 was the room's alone and paused it the half
    minute of a failing room: her request waited some 30 s."""
    a, srv = gk
    bot = "@_cw_bot:example.org"
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    limited = []

    def members(method, path):
        return method == "GET" and urllib.parse.unquote(path).endswith(f"/rooms/{mgmt}/members")

    def refuse(method, path, user):
        if user == bot and members(method, path) and not limited:
            limited.append(time.monotonic())
            return 429
        return False
    since = len(hs.requests)
    hs.refuse_retry_after_ms = 3000
    hs.refuse = refuse
    try:
        room = a.create_room([a.user("s0"), ALICE]).json()["id"]
        assert a.send(room, a.user("s0"), "may I? (s0)").status_code == 202
        wait_until(lambda: limited, what="her room's members read, answered 429")
        wait_until(lambda: any("wants to write to you" in n for n in said()), timeout=20,
                   what="her request shown once the wait is over")
        shown_in = time.monotonic() - limited[0]
    finally:
        hs.refuse = None
        hs.refuse_retry_after_ms = 1000
    reads = [q for q in hs.requests[since:] if q["user"] == bot and members(q["method"], q["path"])]
    assert [q["status"] for q in reads][:2] == [429, 200], reads
    assert 2.5 < reads[1]["time"] - reads[0]["time"] < 15, reads
    # logged as what waited: until the sixty-first session "a command's answer is not said"
    unread = [r["msg"] for r in mx.records if "the room's members were not read" in r.get("msg", "")]
    assert unread == ["a consent request is not shown for now: the room's members were not read"], unread
    print(f"her request shown {shown_in:.2f} s after the 429")


def defer_marks_of(pg, db_url, verb):
    """The handled mark of each of the bot's inbox rows holding a command
    starting with verb is deferred once: the row kept unhandled, as after a
    mark lost, and not due for an hour, so that its run again waits for
    release_marks (after a restart). The first run's note stays on it."""
    pg.psql("CREATE TABLE IF NOT EXISTS deferred_marks (id bigint PRIMARY KEY); "
            "CREATE OR REPLACE FUNCTION defer_mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            " IF NEW.handled_at IS NOT NULL AND OLD.handled_at IS NULL "
            f"  AND OLD.event->'content'->>'body' LIKE '{verb} %' "
            "  AND NOT EXISTS (SELECT 1 FROM deferred_marks WHERE id = OLD.id) THEN "
            "  INSERT INTO deferred_marks VALUES (OLD.id); NEW := OLD; "
            "  NEW.not_before := now() + interval '1 hour'; END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER defer_mark BEFORE UPDATE ON matrix_bot_inbox FOR EACH ROW EXECUTE FUNCTION defer_mark()",
            db_url)


def release_marks(pg, db_url):
    """The rows defer_marks_of held made due, and waited for until handled."""
    pg.psql("UPDATE matrix_bot_inbox SET not_before = NULL WHERE id IN (SELECT id FROM deferred_marks); "
            "NOTIFY causeway_matrix_bot", db_url)
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
               timeout=20, what="the deferred commands run again and handled")
    assert pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE command_allowed IS NOT NULL "
                   "OR change_allowed IS NOT NULL", db_url) == "0"  # the notes cleared with the marks


def test_a_change_refused_before_a_restart_stays_refused_after_it(mx, hs, gk, pg, db_url):
    """alice may make one change a minute: her block of wally is carried
    out, her accept of him right after is refused ("too many changes"),
    and the accept's handled mark is lost; the daemon restarts before its
    run again. The run again takes the first run's refusal, noted on its
    inbox row, and wally stays blocked. Until the sixty-first session the
    note was in memory only, and the new process, its buckets full, carried
    the refused accept out."""
    a, _ = gk
    wally = a.user("wally")
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    defer_marks_of(pg, db_url, "accept")
    alice.send_text(mgmt, f"block {wally}")
    wait_until(lambda: any(n.startswith("Blocked " + wally) for n in said()), what="the block")
    alice.send_text(mgmt, f"accept {wally}")
    wait_until(lambda: any("too many changes" in n for n in said()), what="the accept refused")
    wait_until(lambda: pg.psql("SELECT count(*) FROM deferred_marks", db_url) == "1", what="its mark deferred")
    assert pg.psql("SELECT command_allowed::text || ' ' || change_allowed FROM matrix_bot_inbox "
                   "WHERE id IN (SELECT id FROM deferred_marks)", db_url) == "true -1"
    mx.stop()
    mx.start()
    release_marks(pg, db_url)
    assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == wally + " blocked"
    assert not any(n.startswith("Accepted") for n in said()), said()


def test_a_change_run_again_after_a_restart_takes_no_second_token(mx, hs, gk, pg, db_url):
    """alice may make one change a minute: her block of wally is carried
    out, its handled mark lost, and the daemon restarts before its run
    again. The run again takes the first run's answer, noted on its inbox
    row, and no token of the new process's bucket: her accept of wally
    right after is carried out. Until the sixty-first session the note was
    in memory only, the run again took the new process's one token, and
    her accept was refused ("too many changes")."""
    a, _ = gk
    wally = a.user("wally")
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    defer_marks_of(pg, db_url, "block")
    alice.send_text(mgmt, f"block {wally}")
    wait_until(lambda: any(n.startswith("Blocked " + wally) for n in said()), what="the block")
    wait_until(lambda: pg.psql("SELECT count(*) FROM deferred_marks", db_url) == "1", what="its mark deferred")
    mx.stop()
    mx.start()
    release_marks(pg, db_url)
    alice.send_text(mgmt, f"accept {wally}")
    wait_until(lambda: any(n.startswith("Accepted " + wally) or "too many changes" in n for n in said()),
               what="the accept answered")
    assert not any("too many changes" in n for n in said()), said()
    assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == wally + " allowed"


def test_a_change_that_failed_before_a_restart_is_charged_at_its_run_again(mx, hs, gk, pg, db_url):
    """alice may make one change a minute: her block of wally fails (its
    audit record refused, as when the database goes away), and so does
    any write after it of the row's note (the database still away); the
    block's handled mark is lost and the daemon restarts before its run
    again. Her accept of wally takes the new process's one token, and the
    block's run again is then refused as too many: the change's note is
    written inside its own transaction, rolled back with it, so the row
    says its token was given back. In the sixty-first session's first
    version the note said "allowed" before the change, the write of
    "given back" after its failure failed too, and the run again was
    carried out for free: wally blocked."""
    a, _ = gk
    wally = a.user("wally")
    assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    defer_marks_of(pg, db_url, "block")
    pg.psql("CREATE FUNCTION fail_block() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            " IF NEW.action = 'consent.block' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER fail_block BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION fail_block(); "
            "CREATE FUNCTION fail_given_back() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            " IF OLD.change_allowed = 1 AND NEW.change_allowed = 0 THEN RAISE EXCEPTION 'injected failure'; END IF; "
            " RETURN NEW; END $$; "
            "CREATE TRIGGER fail_given_back BEFORE UPDATE ON matrix_bot_inbox FOR EACH ROW "
            "EXECUTE FUNCTION fail_given_back()", db_url)
    alice.send_text(mgmt, f"block {wally}")
    wait_until(lambda: any("That did not work" in n for n in said()), what="the block failing")
    wait_until(lambda: pg.psql("SELECT count(*) FROM deferred_marks", db_url) == "1", what="its mark deferred")
    assert pg.psql("SELECT command_allowed::text || ' ' || change_allowed FROM matrix_bot_inbox "
                   "WHERE id IN (SELECT id FROM deferred_marks)", db_url) == "true 0"
    pg.psql("DROP TRIGGER fail_block ON audit_log; DROP TRIGGER fail_given_back ON matrix_bot_inbox", db_url)
    mx.stop()
    mx.start()
    alice.send_text(mgmt, f"accept {wally}")
    wait_until(lambda: any(n.startswith("Accepted " + wally) for n in said()), what="the accept")
    release_marks(pg, db_url)
    assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == wally + " allowed"
    assert not any(n.startswith("Blocked") for n in said()), said()


@contextlib.contextmanager
def bot_through_a_proxy(make_daemon, db_url, hs):
    """The daemon on a PgProxy (whose cuts lose the bot's answers), the
    peer gk added, alice allowed one change a minute and in her room with
    the bot: (the proxy, the daemon, wally's URI, alice's client, the room,
    said).  Until the sixty-fourth session each of the bot's lost-answer
    tests wrote these seven lines out."""
    with PgProxy(db_url) as px:
        mx = start_mx(make_daemon, px.url, hs)
        a, srv = add_gk(mx)
        try:
            assert mx.admin("PATCH", "/settings", json={"policy.user_updates_per_minute": 1}).ok
            alice, mgmt, said = alice_and_the_bot(hs)  # this daemon's bot: the lock's holder
            yield px, mx, a.user("wally"), alice, mgmt, said
        finally:
            srv.close()


def refused_at_its_commit(pg, db_url, times, table="audit_log", action="consent.block"):
    """The first `times` rows inserted into table (of action, for the
    audit log) refused at their transaction's COMMIT (a deferred check, a
    row each: a transaction inserting two such rows uses two; the bot's
    changes insert one); the sequence refused counts the checks."""
    pg.psql("CREATE SEQUENCE refused; CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$BEGIN IF nextval('refused') <= {times} THEN RAISE EXCEPTION 'refused at its commit'; END IF; "
            f"RETURN NULL; END$$; CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON {table} "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW " + (f"WHEN (NEW.action = '{action}') " if action else "") +
            "EXECUTE FUNCTION refuse_at_commit()", db_url)


def second_process(make_daemon, db_url, hs):
    """A second daemon on the database (not through the proxy), its own
    port: the homeserver keeps sending to the first (its registration's
    url), the inbox is shared, and whichever holds the bot's lock works it."""
    return make_daemon(db_url, options={
        "server": {"port": str(free_port())},
        "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN, "hs_token": HS_TOKEN}}).start()


def accept_answered(alice, mgmt, said, wally):
    """alice's accept of wally sent to the bot, and its answer (carried out
    or refused as too many changes) awaited."""
    alice.send_text(mgmt, f"accept {wally}")
    wait_until(lambda: any(n.startswith("Accepted") or "too many changes" in n for n in said()),
               timeout=20, what="the accept answered")


# The statement of a bot change's audit record (mx_bot.c): no other audit record's (an admin request's,
# a sweep's, written on other connections) is cut in its place.
BOT_AUDIT = "INSERT INTO audit_log (actor, action, subject) VALUES ('user:' || $1, $2, $3)"


@pytest.mark.parametrize("lost", ["commit", "audit"])
def test_a_change_whose_answer_was_lost_is_charged_once(make_daemon, db_url, hs, pg, lost):
    """alice may make one change a minute. Her block of wally loses its
    answer with the bot's connection (a proxy drops it and closes): its
    COMMIT's, the block stored ("commit"), or its audit record's, inside
    the transaction, which the server then rolls back ("audit"). After a
    lost COMMIT, stored or not, the bot cannot know: it keeps the token,
    reconnects and runs the command again, which takes no other; lost
    before the COMMIT was sent, the change is rolled back: its token is
    given back at once (since the sixty-second session's review) and the
    run again takes its own. Either way wally is blocked once (one
    consent, one audit record), alice is answered "Blocked" once and never
    "That did not work", and her accept of wally right after is refused as
    too many changes (charged once, not zero times), then her help is
    answered (the bot recovered). Until the sixty-first session's second
    review a lost COMMIT's token was given back, and the change stored with
    its answer lost was free (the row's note of it believed at the run
    again); until the sixty-second session no test cut a COMMIT of the
    bot's changes."""
    with bot_through_a_proxy(make_daemon, db_url, hs) as (px, mx, wally, alice, mgmt, said):
        if lost == "commit":
            # change_noted's UPDATE, the first statement after the change's BEGIN (a command's
            # own note, run before, is outside any transaction): counted complete, it arms the COMMIT
            px.on_complete = True
            px.cut_commit_matching(lambda t: "UPDATE matrix_bot_inbox SET command_allowed" in t)
        else:
            px.cut_statement(lambda t: t.startswith(BOT_AUDIT))
        alice.send_text(mgmt, f"block {wally}")
        wait_until(lambda: px.cuts == 1, timeout=20, what="the block's answer lost")
        wait_until(lambda: any(n.startswith(("Blocked", "You made too many", "That did not work")) for n in said()),
                   timeout=30, what="the block answered after the reconnect")
        assert [n for n in said() if "Commands" not in n][0].startswith("Blocked " + wally), said()
        assert any(r.get("msg") == "a bot command failed" for r in mx.records)  # the change's own answer lost
        assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == \
            wally + " blocked"
        assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'consent.block'", db_url) == "1"
        accept_answered(alice, mgmt, said, wally)
        alice.send_text(mgmt, "help")
        wait_until(lambda: sum("Commands" in n for n in said()) == 2, timeout=20, what="the help answered")
        answers = [n for n in said() if "Commands" not in n]
        assert len(answers) == 2 and answers[0].startswith("Blocked " + wally) and \
            answers[1].startswith("You made too many changes in a short time"), answers
        assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == \
            wally + " blocked"
        # the help's mark follows its answer (inbox: after command): waited for, not raced
        wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "0",
                   timeout=10, what="every command marked handled")


# A change's note with its transaction's id (change_noted): not the command's own note (command_run_note), the same
# UPDATE without RETURNING.
BOT_CHANGE_NOTE = "RETURNING txid_current()"


@pytest.mark.parametrize("lost", ["commit", "note", "report"])
def test_a_change_rolled_back_with_its_answer_lost_while_the_lock_moved_is_given_back(make_daemon, db_url, hs, pg,
                                                                                      lost):
    """Two processes share the database; the first (through a proxy) holds
    the bot's lock, and alice may make one change a minute. Her block of
    wally (her report of him: "report") is rolled back with the first's
    connection lost: at its COMMIT, which a deferred check refuses once and
    whose answer is lost ("commit", "report"), or at the change's note, the
    first statement after its BEGIN, whose answer is lost ("note"); and the
    first cannot connect again for a while: the lock goes with the
    connection to the second, whose bot runs the command again (the row
    says no token was taken) with a token of its own bucket. The first
    gives its token back: at once where the COMMIT was never sent, else
    once connected again and txid_status says the transaction was rolled
    back. When the lock comes back to it, her accept of wally, within the
    minute, is carried out. Until the sixty-second session the first kept
    the token whatever became of the change, and her accept was refused as
    too many changes; until that session's review a report, and a change
    lost before its COMMIT, still kept it (no transaction id asked)."""
    table, action = ("reports", None) if lost == "report" else ("audit_log", "consent.block")
    if lost != "note":
        refused_at_its_commit(pg, db_url, 1, table, action)
    with bot_through_a_proxy(make_daemon, db_url, hs) as (px, first, wally, alice, mgmt, said):
        second = None
        try:
            # The homeserver keeps sending to the first process (its registration's url): the inbox is shared,
            # and whichever holds the bot's lock works it.
            second = second_process(make_daemon, db_url, hs)
            if lost == "note":
                px.cut_statement(lambda t: BOT_CHANGE_NOTE in t)
            else:
                px.on_complete = True
                px.cut_commit_matching(lambda t: ("INSERT INTO reports" if lost == "report" else BOT_CHANGE_NOTE) in t)
            px.refuse()  # the first's connections open go on; it cannot connect again
            t0 = time.monotonic()
            done = "Reported" if lost == "report" else "Blocked"
            alice.send_text(mgmt, f"report {wally} spam" if lost == "report" else f"block {wally}")
            wait_until(lambda: px.cuts == 1, timeout=20, what="the change's answer lost")
            wait_until(lambda: any(n.startswith((done, "You made too many", "That did not work", "The report could"))
                                   for n in said()), timeout=30, what="the change answered by the second's bot")
            assert [n for n in said() if "Commands" not in n] == [n for n in said() if n.startswith(done)]
            px.thaw()
            if lost != "note":
                wait_until(lambda: any(r.get("msg", "").startswith("a change whose answer was lost was rolled back")
                                       for r in first.records), timeout=20, what="the first's token given back")
            second.stop()
            second = None
            accept_answered(alice, mgmt, said, wally)
            assert time.monotonic() - t0 < 50  # within the minute that refills the first's token
            assert not any("too many changes" in n for n in said()), said()
            assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == \
                wally + " allowed"
            if lost == "report":
                assert pg.psql("SELECT count(*) FROM reports", db_url) == "1"
            else:
                assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'consent.block'", db_url) == "1"
        finally:
            px.thaw()
            if second is not None:
                second.stop()


def sent_with_its_record_failing(a, hs, pg, db_url, room, mx_room):
    """wally's message "keep my id" sent to Matrix, the statement that
    records its delivery refused once by the database (a trigger): its id,
    its Matrix event's, and a subquery giving its outbox row's id."""
    pg.psql("CREATE SEQUENCE test_fail; "
            "CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            " IF nextval('test_fail') = 1 THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER test_fail BEFORE UPDATE ON outbox FOR EACH ROW "
            "WHEN (NEW.destination = 'matrix' AND OLD.state = 'in_flight' AND NEW.state = 'delivered') "
            "EXECUTE FUNCTION test_fail()", db_url)
    m1 = a.send(room, a.user("wally"), "keep my id").json()["id"]
    wait_until(lambda: pg.psql("SELECT is_called FROM test_fail", db_url) == "t", what="the record failing")
    [orig] = [e["event_id"] for e in hs.events(mx_room) if e["type"] == "m.room.message"
              and e["content"]["body"] == "keep my id"]
    return m1, orig, f"(SELECT o.id FROM outbox o JOIN events e ON e.id = o.event_id WHERE e.public_id = '{m1}')"


@pytest.mark.parametrize("how", ["look", "txn", "restart"])
def test_a_message_whose_record_failed_keeps_its_matrix_event(make_daemon, db_url, hs, pg, how):
    """wally's message reaches Matrix, and the statement that records its
    delivery fails (the database refuses it once: a trigger here; a lock
    or statement timeout, a failover).  Its row stays in flight until its
    claim runs out (claim_timeout_s, 5 s here), is tried again, and the
    retry finds the event sent: by the look at the room's last 50 events
    (the homeserver has forgotten its txnIds: "look"; or the daemon was
    restarted meanwhile and the homeserver forgot them too: "restart"), or
    by the txnId, whose answer repeats the event id (60 notices in the
    room, beyond the look: "txn").  Either way the row is delivered once
    with the event id it got first, and wally's edit and reply, queued
    behind it, name that event.  The sixty-second session pinned it (a
    long-standing item of the stop notes feared the ids lost)."""
    d = start_mx(make_daemon, db_url, hs, dispatcher={"claim_timeout_s": "5"})
    a, srv = add_gk(d)
    try:
        room, mx_room = wally_wrote_to_alice(d, hs, a, pg, db_url)
        wally, ghost = a.user("wally"), "@_cw_gk_wally:example.org"
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' "
                                   "AND state <> 'delivered'", db_url) == "0", what="hello delivered")
        m1, orig, row = sent_with_its_record_failing(a, hs, pg, db_url, room, mx_room)
        assert pg.psql(f"SELECT state || ' ' || coalesce(remote_id, '-') FROM outbox WHERE id = {row}",
                       db_url) == "in_flight -"
        put = f"/send/m.room.message/cw-{pg.psql(f'SELECT {row}', db_url)}"
        # queued behind it: its room has a row in flight
        ed = {"type": "edit", "sender": wally,
              "content": {"replaces": m1, "parts": [{"type": "text/plain", "body": "kept my id"}]}}
        assert a.call("POST", f"/v1/rooms/{room}/messages", ed, idem="ed-kept").status_code == 202
        reply = {"type": "message", "sender": wally,
                 "content": {"in_reply_to": m1, "parts": [{"type": "text/plain", "body": "the reply"}]}}
        assert a.call("POST", f"/v1/rooms/{room}/messages", reply, idem="reply-kept").status_code == 202
        if how == "txn":
            for k in range(60):
                hs.appservice(ghost).send(mx_room, "m.room.message", {"msgtype": "m.notice", "body": f"filler {k}"})
        else:
            hs.forget_txn_ids()
        if how == "restart":
            d.stop()
            d.start()
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' "
                                   "AND state <> 'delivered'", db_url) == "0", timeout=40, what="all delivered")
        msgs = [e for e in hs.events(mx_room) if e["type"] == "m.room.message" and e["sender"] == ghost
                and e["content"]["msgtype"] != "m.notice"]
        assert [e["content"]["body"] for e in msgs] == ["hello", "keep my id", "* kept my id", "the reply"], msgs
        assert msgs[1]["event_id"] == orig
        assert msgs[2]["content"].get("m.relates_to") == {"rel_type": "m.replace", "event_id": orig}
        assert msgs[3]["content"].get("m.relates_to") == {"m.in_reply_to": {"event_id": orig}}
        assert pg.psql(f"SELECT remote_id || ' ' || attempts FROM outbox WHERE id = {row}", db_url) == orig + " 2"
        assert pg.psql("SELECT count(*) FROM event_native_ids n JOIN outbox o ON o.event_id = n.event_id "
                       f"WHERE o.id = {row} AND n.network = 'matrix' AND n.native_id = '{orig}'", db_url) == "1"
        sends = [(x["status"], (x["answer"] or {}).get("event_id")) for x in hs.requests if x["path"].endswith(put)]
        assert sends == ([(200, orig)] * 2 if how == "txn" else [(200, orig)]), sends
    finally:
        srv.close()


def replayed_after_its_record_failed(make_daemon, db_url, hs, pg, before_replay=None, **sections):
    """wally's message to alice, whose record fails on its last try
    (retry_budget 1), dead though it is in her Matrix room, replayed by the
    operator once the homeserver has forgotten its txnIds (before_replay(d,
    row) first, row: a subquery giving its outbox row's id; sections: more
    configuration): the replay finds the event and records its id, wally's
    edit names it, and the message was sent once."""
    d = start_mx(make_daemon, db_url, hs, **{"dispatcher": {"claim_timeout_s": "5", "retry_budget": "1"},
                                             **sections})
    a, srv = add_gk(d)
    try:
        room, mx_room = wally_wrote_to_alice(d, hs, a, pg, db_url)
        wally, ghost = a.user("wally"), "@_cw_gk_wally:example.org"
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' "
                                   "AND state <> 'delivered'", db_url) == "0", what="hello delivered")
        m1, orig, row = sent_with_its_record_failing(a, hs, pg, db_url, room, mx_room)
        state = f"SELECT state || ' ' || coalesce(remote_id, '-') FROM outbox WHERE id = {row}"
        wait_until(lambda: pg.psql(state, db_url) == "dead -", timeout=30, what="the row dead")
        hs.forget_txn_ids()
        if before_replay:
            before_replay(d, row)
        row_id = pg.psql(f"SELECT {row}", db_url)
        assert d.admin("POST", f"/outbox/{row_id}/replay").status_code == 200
        wait_until(lambda: pg.psql(state, db_url).startswith("delivered"), timeout=30, what="the replay")
        assert pg.psql(state, db_url) == "delivered " + orig
        ed = {"type": "edit", "sender": wally,
              "content": {"replaces": m1, "parts": [{"type": "text/plain", "body": "kept my id"}]}}
        assert a.call("POST", f"/v1/rooms/{room}/messages", ed, idem="ed-kept").status_code == 202
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' "
                                   "AND state <> 'delivered'", db_url) == "0", timeout=30, what="the edit delivered")
        msgs = [e for e in hs.events(mx_room) if e["type"] == "m.room.message" and e["sender"] == ghost]
        assert [e["content"]["body"] for e in msgs] == ["hello", "keep my id", "* kept my id"], msgs
        assert msgs[2]["content"].get("m.relates_to") == {"rel_type": "m.replace", "event_id": orig}
        assert pg.psql("SELECT count(*) FROM event_native_ids n JOIN outbox o ON o.event_id = n.event_id "
                       f"WHERE o.id = {row} AND n.network = 'matrix' AND n.native_id = '{orig}'", db_url) == "1"
        sends = [x["status"] for x in hs.requests if x["method"] == "PUT"
                 and x["path"].endswith(f"/send/m.room.message/cw-{row_id}")]
        assert sends == [200], sends
    finally:
        srv.close()


def test_a_message_whose_record_failed_on_its_last_try_is_not_sent_again_by_its_replay(make_daemon, db_url, hs, pg):
    """As above, the record of wally's message fails, but on the row's last
    try (retry_budget 1): its claim runs out with the budget spent, and it
    is a dead letter, though its message is in the room.  The operator
    replays it after the homeserver has forgotten its txnIds: the replay
    (its attempts back to 0) looks for the event before sending, finds it
    and records its id, and wally's edit names it.  Until the sixty-second
    session only a counted try (attempts > 1) looked: the replay sent the
    message a second time, and the first event's id was lost."""
    replayed_after_its_record_failed(make_daemon, db_url, hs, pg)


def test_a_message_answered_429_is_not_looked_for_before_it_goes_again(mx, hs, gk, pg, db_url):
    """wally's message is answered 429 M_LIMIT_EXCEEDED (not made): its
    next try, not counted (attempts stays 1) but in delivery_attempts,
    sends it without first looking for it in the room, a request more of
    a homeserver that asked for a slower pace.  Since the sixty-second
    session a row with another try there (a replayed dead letter's) is
    looked for: this says the 429's stays apart."""
    a, _ = gk
    room, mx_room = wally_wrote_to_alice(mx, hs, a, pg, db_url)
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'matrix' "
                               "AND state <> 'delivered'", db_url) == "0", what="hello delivered")
    hs.refuse_retry_after_ms = 200
    limited, t0 = [], time.time()

    def refuse(method, path, user):
        if method == "PUT" and "/send/m.room.message/cw-" in path and not limited:
            limited.append(path)
            return 429
        return False
    hs.refuse = refuse
    m1 = a.send(room, a.user("wally"), "slower please").json()["id"]
    row = ("SELECT o.state || ' ' || o.attempts || ' ' || (SELECT count(*) FROM delivery_attempts d "
           f"WHERE d.outbox_id = o.id) FROM outbox o JOIN events e ON e.id = o.event_id WHERE e.public_id = '{m1}'")
    wait_until(lambda: pg.psql(row, db_url).startswith("delivered"), timeout=20, what="the message delivered")
    assert pg.psql(row, db_url) == "delivered 1 2"
    assert [x["status"] for x in hs.requests if x["path"] == limited[0]] == [429, 200]
    looks = [x["path"] for x in hs.requests if x["method"] == "GET" and x["path"].endswith("/messages")
             and x["time"] >= t0]
    assert looks == [], looks


@pytest.mark.parametrize("waits", [False, True], ids=["sent_at_once", "waiting_behind_its_room"])
def test_a_dead_letters_tries_outlive_attempts_days_for_its_replays_look(make_daemon, db_url, hs, pg, waits):
    """As test_a_message_whose_record_failed_on_its_last_try_is_not_sent_again_by_its_replay,
    but the dead letter is replayed after retention.attempts_days (30): its
    tries (and hello's, delivered) are made 40 days old and the sweep runs
    (hello's go: it ran) before the replay, which still finds the event in
    the room and sends nothing.  Until the sixty-third session retention
    deleted the tries whatever the row's state, and the replay, finding
    none, sent the message a second time (docs/operations.md,
    "Retention").  waits: the replayed row waits behind its room (hello's
    row pending again for 6 s, as a room backing off in the outage that
    made the dead letter) while the sweep runs each second: until the
    sixty-third session's review the tries were kept for a dead letter
    only, the replay's pending row lost them before its claim and was sent
    twice (reviewer RB's case)."""
    def aged_and_swept(d, row):
        pg.psql("UPDATE delivery_attempts SET started_at = started_at - interval '40 days', "
                "finished_at = finished_at - interval '40 days'", db_url)
        hello = ("SELECT count(*) FROM delivery_attempts d JOIN outbox o ON o.id = d.outbox_id "
                 f"WHERE o.destination = 'matrix' AND o.id <> {row}")
        wait_until(lambda: pg.psql(hello, db_url) == "0", timeout=20, what="hello's tries deleted by the sweep")
        assert pg.psql(f"SELECT count(*) FROM delivery_attempts WHERE outbox_id = {row}", db_url) != "0"
        if waits:
            pg.psql("UPDATE outbox SET state = 'pending', next_attempt_at = now() + interval '6 s' "
                    f"WHERE destination = 'matrix' AND id < ({row})", db_url)
    replayed_after_its_record_failed(make_daemon, db_url, hs, pg, before_replay=aged_and_swept,
                                     retention={"interval_s": "1"})


@pytest.mark.parametrize("fate", ["refused", "unknown"])
def test_a_change_whose_lost_answer_cannot_be_asked_keeps_its_token(make_daemon, db_url, hs, pg, fate):
    """As in the test above ("commit"), alice's block of wally is rolled
    back at its COMMIT (a deferred check refuses it once) and the answer is
    lost with the first process's connection; the bot's lock goes to the
    second process, whose bot runs the block again with a token of its
    own. Connected again, the first asks txid_status of the block's
    transaction, and the question is refused ("refused": the server says
    the id is in the future, as after a failover to a standby that lagged
    or a restore) or answered NULL ("unknown": older than the server keeps).
    Not knowing whether the change was stored, the first keeps its token
    (logged, WARN) and asks no more: once the lock is back, her accept of
    wally within the minute is refused as too many changes, and the
    question was asked once. txid_status is this database's own (a function
    of public before pg_catalog on its search_path: the real one, asked of
    an id 2^40 later, for "refused"). Until the sixty-second session's
    review a refused question was asked again every round, for ever; until
    the sixty-third session no test made one, and a NULL kept the token in
    silence."""
    answer = "pg_catalog.txid_status($1 + 1099511627776)" if fate == "refused" else "NULL"
    txid_status_of_the_test(pg, db_url, f"RETURN {answer};")
    refused_at_its_commit(pg, db_url, 1)
    with bot_through_a_proxy(make_daemon, db_url, hs) as (px, first, wally, alice, mgmt, said):
        second = None
        try:
            second = second_process(make_daemon, db_url, hs)
            px.on_complete = True
            px.cut_commit_matching(lambda t: BOT_CHANGE_NOTE in t)
            px.refuse()  # the first's connections open go on; it cannot connect again
            t0 = time.monotonic()
            alice.send_text(mgmt, f"block {wally}")
            wait_until(lambda: px.cuts == 1, timeout=20, what="the block's answer lost")
            wait_until(lambda: any(n.startswith(("Blocked", "You made too many", "That did not work"))
                                   for n in said()), timeout=30, what="the block answered by the second's bot")
            assert [n for n in said() if "Commands" not in n] == [n for n in said() if n.startswith("Blocked")]
            px.thaw()
            kept = "cannot ask whether a change whose answer was lost was stored: its token kept"
            wait_until(lambda: any(r.get("msg") == kept for r in first.records), timeout=20,
                       what="the first's question refused, its token kept")
            [warn] = [r for r in first.records if r.get("msg") == kept]
            assert ("is in the future" if fate == "refused" else "no longer known") in warn.get("detail", ""), warn
            second.stop()
            second = None
            accept_answered(alice, mgmt, said, wally)
            assert time.monotonic() - t0 < 50  # within the minute that refills the first's token
            assert any("too many changes" in n for n in said()), said()
            assert not any(n.startswith("Accepted") for n in said()), said()
            assert not any(r.get("msg", "").startswith("a change whose answer was lost was rolled back")
                           for r in first.records)
            assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == \
                wally + " blocked"
            assert pg.psql("SELECT last_value FROM txid_asked", db_url) == "1"  # asked once, not every round
        finally:
            px.thaw()
            if second is not None:
                second.stop()


def txid_status_of_the_test(pg, db_url, body):
    """txid_status, as the daemon's new sessions call it (unqualified), is
    this database's function public.txid_status(bigint) (public before
    pg_catalog on the database's search_path), whose plpgsql body is body
    (pg_catalog.txid_status the real one); each call counted in the
    sequence txid_asked."""
    dbname = urllib.parse.urlsplit(db_url).path.lstrip("/")
    pg.psql("CREATE SEQUENCE txid_asked; CREATE FUNCTION public.txid_status(bigint) RETURNS text LANGUAGE plpgsql "
            f"AS $$BEGIN PERFORM nextval('public.txid_asked'); {body} END$$; "
            f"ALTER DATABASE \"{dbname}\" SET search_path = \"$user\", public, pg_catalog", db_url)


def txid_status_in_progress_until_the_gate_opens(pg, db_url):
    """This database's txid_status says "in progress" (as when the server
    has not yet seen the connection end) while the table gate says shut,
    then the real one's answer (txid_status_of_the_test)."""
    pg.psql("CREATE TABLE gate (open boolean NOT NULL); INSERT INTO gate VALUES (false)", db_url)
    txid_status_of_the_test(pg, db_url, "IF NOT (SELECT open FROM public.gate) THEN RETURN 'in progress'; END IF; "
                            "RETURN pg_catalog.txid_status($1);")


def accept_carried_out_once_the_gate_opens(pg, db_url, mx, alice, mgmt, said, wally, t0):
    """The gate opened, alice's accept of wally within the minute (from
    t0) is carried out: the token her failed block's runs owned was given
    back by the last run's failure (not by an answer of txid_status, never
    "aborted" here), and no block was stored."""
    pg.psql("UPDATE gate SET open = true", db_url)
    accept_answered(alice, mgmt, said, wally)
    # within the minute that refills a token: else the accept would
    # pass whatever became of the kept one (review RC)
    assert time.monotonic() - t0 < 50
    assert not any("too many changes" in n for n in said()), said()
    assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == wally + " allowed"
    assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'consent.block'", db_url) == "0"
    assert not any(r.get("msg", "").startswith("a change whose answer was lost was rolled back")
                   for r in mx.records)


def test_a_run_again_that_owns_a_kept_token_gives_it_back_when_it_fails(make_daemon, db_url, hs, pg):
    """alice may make one change a minute. Her block of wally is rolled
    back at its COMMIT (a deferred check refuses it) and the answer is lost
    with the bot's connection (a proxy); connected again, the bot asks
    txid_status, which says "in progress" (as when the server has not yet
    seen the connection end: here this database's txid_status says so
    while a gate is shut), so the token is kept, and the block runs again:
    it takes no token and owns the kept one. Its own COMMIT is refused too,
    its connection intact: "That did not work", and the token it owns is
    given back, so that her accept of wally within the minute is carried
    out. Until the sixty-second session's review such a run again took the
    kept token as spent: her accept was refused as too many changes, for a
    change stored neither time; until the sixty-third session no test made
    a run again own a kept token."""
    refused_at_its_commit(pg, db_url, 2)
    txid_status_in_progress_until_the_gate_opens(pg, db_url)
    with bot_through_a_proxy(make_daemon, db_url, hs) as (px, mx, wally, alice, mgmt, said):
        px.on_complete = True
        px.cut_commit_matching(lambda t: BOT_CHANGE_NOTE in t)
        t0 = time.monotonic()
        alice.send_text(mgmt, f"block {wally}")
        wait_until(lambda: px.cuts == 1, timeout=20, what="the block's answer lost")
        wait_until(lambda: any(n.startswith(("Blocked", "That did not work", "You made too many"))
                               for n in said()), timeout=30, what="the block's run again answered")
        assert [n for n in said() if "Commands" not in n] == ["That did not work; try again in a moment."]
        assert int(pg.psql("SELECT last_value FROM txid_asked", db_url)) >= 1  # "in progress": kept, not settled
        assert pg.psql("SELECT last_value FROM refused", db_url) == "2"  # both COMMITs refused
        accept_carried_out_once_the_gate_opens(pg, db_url, mx, alice, mgmt, said, wally, t0)


@pytest.mark.parametrize("first", ["stored", "rolled back"])
def test_a_lost_commit_still_running_holds_the_run_again_until_it_ends(make_daemon, db_url, hs, pg, monkeypatch,
                                                                        first):
    """alice may make one change a minute. Her block of wally reaches its
    COMMIT, which the server holds (a deferred check waits for a gate: a
    slow fsync, a synchronous standby's wait), while the bot's side of the
    connection ends (the proxy closes it; the server goes on). The bot
    connects again and asks txid_status round after round ("in progress"),
    but runs nothing: the bot's lock is a session lock of the connection
    whose COMMIT still runs, and no session, of this process or another,
    takes it before that backend ends, after its transaction did. So no run
    again reads the row while the first transaction is undecided (the race
    a review of the sixty-second session feared: a run again reading the
    row before the first COMMIT ends, owning its token, failing with its
    connection intact and giving back the token of a change stored). The
    gate opens: "stored", the first committed, the run again reads its
    note, takes no token, and its block, a repeat, is answered "Blocked";
    her accept right after is refused as too many changes (charged once).
    "Rolled back", the first refused at its COMMIT: txid_status says
    aborted, the token is given back, the run again takes its own, its
    COMMIT is refused too ("That did not work"), gives it back, and her
    accept is carried out."""
    import socket
    import pgproxy
    conns = []

    class Tracked(pgproxy._Conn):
        def __init__(self, client, server):
            super().__init__(client, server)
            conns.append(self)
    monkeypatch.setattr(pgproxy, "_Conn", Tracked)
    pg.psql("CREATE TABLE gate (open boolean NOT NULL); INSERT INTO gate VALUES (false); CREATE SEQUENCE noted; "
            "CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$DECLARE n bigint := nextval('noted'); "
            "BEGIN IF n = 1 THEN WHILE NOT (SELECT open FROM gate) LOOP PERFORM pg_sleep(0.05); END LOOP; END IF; "
            + ("" if first == "stored" else "IF n <= 2 THEN RAISE EXCEPTION 'refused at its commit'; END IF; ") +
            "RETURN NULL; END$$; "
            "CREATE CONSTRAINT TRIGGER hold_commit AFTER UPDATE ON matrix_bot_inbox DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW WHEN (NEW.change_allowed = 1) EXECUTE FUNCTION hold_commit()", db_url)
    txid_status_of_the_test(pg, db_url, "RETURN pg_catalog.txid_status($1);")
    with bot_through_a_proxy(make_daemon, db_url, hs) as (px, mx, wally, alice, mgmt, said):
        sent = px.record()
        alice.send_text(mgmt, f"block {wally}")
        held = "SELECT pid FROM pg_stat_activity WHERE query = 'COMMIT' AND wait_event = 'PgSleep'"
        wait_until(lambda: pg.psql(held, db_url), timeout=20, what="the block's COMMIT held by the server")
        pid = pg.psql(held, db_url)
        [n] = {k for k, kind, text in list(sent) if kind == "B" and BOT_CHANGE_NOTE in text}
        [conn] = [c for c in conns if c.n == n]
        conn.client.shutdown(socket.SHUT_RDWR)  # the bot's side ends; the server's COMMIT goes on
        wait_until(lambda: int(pg.psql("SELECT last_value FROM txid_asked", db_url)) >= 3, timeout=20,
                   what="three rounds of the bot, connected again, asking")
        assert pg.psql(held, db_url) == pid  # still running
        # no statement of the bot's waits for the held transaction's row (another thread's may: the sweep's)
        waiting = pg.psql("SELECT string_agg(query, ' | ') FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                          "AND query LIKE '%matrix_bot_inbox%'", db_url)
        assert waiting == "", waiting
        assert pg.psql("SELECT string_agg(l.pid::text, ',') FROM pg_locks l WHERE l.locktype = 'advisory' "
                       "AND l.granted AND l.objid = (hashtextextended('causeway.matrix-bot', 0) & 4294967295)"
                       "::bigint::oid", db_url) == pid  # the bot's lock, its old session's
        assert pg.psql("SELECT count(*) FROM matrix_bot_inbox WHERE handled_at IS NULL", db_url) == "1"
        assert [n for n in said() if "Commands" not in n] == []
        pg.psql("UPDATE gate SET open = true", db_url)
        wait_until(lambda: any(n.startswith(("Blocked", "That did not work")) for n in said()), timeout=20,
                   what="the run again answered")
        accept_answered(alice, mgmt, said, wally)
        answers = [n for n in said() if "Commands" not in n]
        if first == "stored":
            assert len(answers) == 2 and answers[0].startswith("Blocked " + wally) and \
                answers[1].startswith("You made too many changes in a short time"), answers
            assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == \
                wally + " blocked"
            assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'consent.block'", db_url) == "1"
            # stored by the first COMMIT, not by a run again after a rollback (review RC)
            assert not any(r.get("msg", "").startswith("a change whose answer was lost was rolled back")
                           for r in mx.records)
        else:
            assert len(answers) == 2 and answers[0] == "That did not work; try again in a moment." and \
                answers[1].startswith("Accepted " + wally), answers
            assert any(r.get("msg", "").startswith("a change whose answer was lost was rolled back")
                       for r in mx.records)
            assert pg.psql("SELECT string_agg(subject || ' ' || state, ',') FROM consents", db_url) == \
                wally + " allowed"
            assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'consent.block'", db_url) == "0"


def test_a_run_again_that_owns_a_kept_token_and_loses_its_own_answer_passes_it_on(make_daemon, db_url, hs, pg):
    """alice may make one change a minute. Her block of wally is rolled
    back at its COMMIT (a deferred check), its answer lost with the bot's
    connection (a proxy, which then refuses the bot's new connections
    until the cut is armed again); txid_status says "in progress" (this
    database's, while a gate is shut), so the token is kept, and the run
    again owns it.  Its own COMMIT is refused too, and its answer lost as
    well: the token is kept again, unsure, for the run again's own
    transaction, and the next run again owns it in turn.  That one's COMMIT
    is refused with its connection intact: "That did not work", the token
    given back, and her accept of wally within the minute is carried out.
    Until the sixty-fourth session no test lost a run again's own answer
    (test_a_run_again_that_owns_a_kept_token_gives_it_back_when_it_fails
    lost the first's only): had the run again's loss kept the token for
    good, the last run would own nothing to give back, and her accept
    would be refused as too many changes, for a change stored never."""
    refused_at_its_commit(pg, db_url, 3)
    txid_status_in_progress_until_the_gate_opens(pg, db_url)
    with bot_through_a_proxy(make_daemon, db_url, hs) as (px, mx, wally, alice, mgmt, said):
        try:
            px.on_complete = True
            px.cut_commit_matching(lambda t: BOT_CHANGE_NOTE in t)
            px.refuse()  # the bot cannot connect again before the second cut is armed
            t0 = time.monotonic()
            alice.send_text(mgmt, f"block {wally}")
            wait_until(lambda: px.cuts == 1, timeout=20, what="the block's answer lost")
            px.cut_commit_matching(lambda t: BOT_CHANGE_NOTE in t)
            px.thaw()
            wait_until(lambda: px.cuts == 2, timeout=30, what="the run again's own answer lost")
            wait_until(lambda: any(n.startswith(("Blocked", "That did not work", "You made too many"))
                                   for n in said()), timeout=30, what="the second run again answered")
            assert [n for n in said() if "Commands" not in n] == ["That did not work; try again in a moment."]
            assert pg.psql("SELECT last_value FROM refused", db_url) == "3"  # the three COMMITs refused
            assert int(pg.psql("SELECT last_value FROM txid_asked", db_url)) >= 2  # each loss asked about
            accept_carried_out_once_the_gate_opens(pg, db_url, mx, alice, mgmt, said, wally, t0)
        finally:
            px.thaw()
