"""The XMPP adapter with Debian's ejabberd 23.01 instead of Prosody
(tests/integration/ejabberd.py): the component's handshake, disco and ping,
consent by a subscription request, messages and a correction both ways, an
oversize stanza refused, a group's room (join, groupchat, the leave command),
a wrong secret reported, and namespaced attributes written as they came
(unlike Prosody). test_xmpp.py covers
every feature against Prosody; this checks that the second server the issue
names behaves the same on the paths where servers differ (handshake,
routing of presence and errors)."""
import socket
import time

import pytest

from ejabberd import Ejabberd
from harness import wait_until
from peer import NotifyServer, PeerClient
from prosody import RawComponent, XmppClient

HOST = "ej.test"
COMP = "gk.example.net"
SECRET = "ej-component-secret"
ALICE = "mimi://example.org/u/alice"


@pytest.fixture(scope="module")
def ejabberd():
    ej = Ejabberd(host=HOST, components={COMP: SECRET})
    try:
        ej.start()
        ej.register("alice", "pw-alice")
    except BaseException:
        ej.close()  # a failed set-up left the node running past the tier (the fifty-ninth session saw one)
        raise
    yield ej
    ej.close()


def options(ej, secret=SECRET):
    return {"xmpp": {"components": f"{COMP}=gk", "server_port": str(ej.component_port), "secret": secret,
                     "domain": HOST, "reconnect_max_ms": "1000"}}


def state(d):
    return d.get("/readyz").json()["adapters"]["xmpp"]["components"][COMP]


def test_messages_and_consent_through_ejabberd(make_daemon, db_url, ejabberd):
    d = make_daemon(db_url, options=options(ejabberd)).start()
    wait_until(lambda: state(d)["state"] == "up", what="the component's stream with ejabberd")
    srv = NotifyServer()
    srv.public_b64 = d.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    a = PeerClient(d.url, "gk", "wa.example")
    r = d.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "mode": "push", "push_url": srv.url,
                                       "public_key": a.signer.public_b64})
    a.token = r.json()["token"]
    alice = XmppClient("alice@" + HOST, "pw-alice", port=ejabberd.c2s_port)
    alice.connect()
    try:
        info = alice.iq("get", COMP, "<query xmlns='http://jabber.org/protocol/disco#info'/>")
        assert info.find(".//{http://jabber.org/protocol/disco#info}identity").get("category") == "gateway"
        assert alice.iq("get", COMP, "<ping xmlns='urn:xmpp:ping'/>").get("type") == "result"
        # A first contact waits for alice's answer to the subscription request.
        assert d.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        mid = a.send(room, a.user("wally"), "held until alice answers").json()["id"]
        wally = "wally@" + COMP
        alice.wait_for_presence(lambda el: el.get("from", "").startswith(wally) and el.get("type") == "subscribe")
        alice.send_presence(wally, "subscribed")
        m = alice.wait_for_message(lambda el: el.get("id") == mid)
        assert m.body == "held until alice answers"
        # alice -> the peer: a message and its correction, in the same room.
        sid = alice.send_message(wally, "hello from ejabberd")
        ev = srv.wait_events(1)[0]
        assert ev["sender"] == ALICE and ev["room_id"] == room
        assert ev["content"]["parts"][0]["body"] == "hello from ejabberd"
        alice.send_raw(f"<message to='{wally}' type='chat' id='c1'><body>hello from ejabberd!</body>"
                       f"<replace xmlns='urn:xmpp:message-correct:0' id='{sid}'/></message>")
        ed = srv.wait_events(2)[1]
        assert ed["type"] == "edit" and ed["content"]["replaces"] == ev["id"]
        # An oversize body is refused with a stanza error, through ejabberd's routing.
        alice.send_raw(f"<message to='{wally}' type='chat' id='big'><body>{'x' * 20000}</body></message>")
        err = alice.wait_for_message(lambda el: el.get("id") == "big" and el.get("type") == "error")
        assert err.error_condition == "not-acceptable"  # too long for the neutral model (docs/xmpp.md "Errors")
        text = err.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}text")
        assert text is not None and text.text == "Not delivered: the text is longer than 16384 bytes.", err.xml
    finally:
        print("causewayd log:\n" + d.log())  # shown by pytest when the test failed
        alice.disconnect()
        srv.close()


def test_an_approval_through_ejabberd_does_not_unblock(make_daemon, db_url, ejabberd, pg):
    """ejabberd 23.01 passes on a `subscribed` that answers no request (a
    pre-approval, RFC 6121 §3.4, which Prosody 0.12 keeps to itself): to a
    contact alice blocked it undoes nothing, the contact's subscription
    is taken back and she is told to use the accept command; to a contact
    she never decided on it still accepts. Until the fortieth session it
    unblocked, so a client restoring its roster undid her blocks unseen (a
    review's finding)."""
    d = make_daemon(db_url, options=options(ejabberd)).start()
    wait_until(lambda: state(d)["state"] == "up", what="the component's stream with ejabberd")
    a = PeerClient(d.url, "gk", "wa.example")
    r = d.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "mode": "push",
                                       "push_url": "http://127.0.0.1:9/", "public_key": a.signer.public_b64})
    assert r.status_code == 201, r.text
    assert d.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    assert d.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user", "subject": a.user("wally"),
                                             "state": "blocked"}).ok

    def consent(remote):
        return pg.psql("SELECT coalesce((SELECT c.state FROM consents c JOIN identities i ON i.id = "
                       "c.local_identity_id WHERE i.uri = '" + ALICE + "' AND c.subject = '" + a.user(remote) +
                       "'), 'none')", db_url)

    alice = XmppClient("alice@" + HOST, "pw-alice", port=ejabberd.c2s_port)
    alice.connect()
    try:
        start = alice.count()
        alice.send_presence("wally@" + COMP, "subscribed")
        note = alice.wait_for_message(lambda el: el.get("from") == COMP and "is blocked" in (el.body or ""),
                                      start=start)
        assert "use this gateway's accept command" in note.body, note.body
        # nothing of it in her roster: wally does not see her presence
        item = alice.roster().get("wally@" + COMP)
        assert item is None or item["subscription"] in ("none", "to"), item
        assert consent("wally") == "blocked"
        # a contact she never decided on: her approval accepts it
        alice.send_presence("zoe@" + COMP, "subscribed")
        wait_until(lambda: consent("zoe") == "allowed", what="zoe accepted")
        assert consent("wally") == "blocked"
    finally:
        print("causewayd log:\n" + d.log())  # shown by pytest when the test failed
        alice.disconnect()


def test_wrong_secret_with_ejabberd(make_daemon, db_url, ejabberd):
    d = make_daemon(db_url, options=options(ejabberd, secret="not-the-secret")).start()
    wait_until(lambda: state(d)["state"] == "auth_failed", what="ejabberd's refusal")
    assert "not-authorized" in state(d)["last_error"]


def test_a_group_room_through_ejabberd(make_daemon, db_url, ejabberd):
    """A peer's group as the component's room, through ejabberd's routing of
    directed presence, groupchat and commands: the invitation, the join
    (members, self, subject), a live message, alice's groupchat to the
    group reflected to her, and leaving the group with the room's
    command."""
    muc, muc_user = "http://jabber.org/protocol/muc", "http://jabber.org/protocol/muc#user"
    d = make_daemon(db_url, options=options(ejabberd)).start()
    wait_until(lambda: state(d)["state"] == "up", what="the component's stream with ejabberd")
    srv = NotifyServer()
    srv.public_b64 = d.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    a = PeerClient(d.url, "gk", "wa.example")
    r = d.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "mode": "push", "push_url": srv.url,
                                       "public_key": a.signer.public_b64})
    a.token = r.json()["token"]
    assert d.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    assert d.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user", "subject": a.user("wally"),
                                             "state": "allowed"}).ok
    alice = XmppClient("alice@" + HOST, "pw-alice", port=ejabberd.c2s_port)
    alice.connect()
    try:
        gid = a.create_room([a.user("wally"), ALICE], kind="group", name="Tea").json()["id"]
        assert a.send(gid, a.user("wally"), "tea at four?").status_code == 202
        room = alice.wait_for_message(lambda el: el.find("{%s}x" % muc_user) is not None).get("from")
        assert room.startswith("#") and room.endswith("@" + COMP)
        start = alice.count()
        alice.send_presence(to=room + "/alice", payload=f"<x xmlns='{muc}'/>")
        subject = alice.wait_for_message(lambda el: el.find("{jabber:client}subject") is not None, start=start)
        assert subject.find("{jabber:client}subject").text.startswith("Tea (bridged")
        got = alice.stanzas()[start:]
        assert [el.get("from") for el in got if el.tag == "{jabber:client}presence"] == [room + "/wally",
                                                                                          room + "/alice"]
        assert [el.body for el in got if el.tag == "{jabber:client}message" and el.body] == ["tea at four?"]
        assert a.send(gid, a.user("wally"), "green or black?").status_code == 202
        live = alice.wait_for_message(lambda el: el.body == "green or black?" and el.get("type") == "groupchat")
        assert live.get("from") == room + "/wally"
        alice.send_message(room, "green", mtype="groupchat", id="g1")
        alice.wait_for_message(lambda el: el.get("id") == "g1" and el.get("from") == room + "/alice")
        ev = wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "message"] or None,
                        what="alice's message at the peer")
        assert ev[0]["room_id"] == gid and ev[0]["content"]["parts"][0]["body"] == "green"
        cmd = "http://jabber.org/protocol/commands"
        form = alice.iq("set", room, f"<command xmlns='{cmd}' node='leave' action='execute'/>")
        sid = form.find("{%s}command" % cmd).get("sessionid")
        done = alice.iq("set", room, f"<command xmlns='{cmd}' node='leave' action='complete' sessionid='{sid}'/>")
        assert done.find("{%s}command" % cmd).get("status") == "completed"
        wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "membership"], what="the leave at the peer")
        alice.wait_for_presence(lambda el: el.get("from") == room + "/alice" and el.get("type") == "unavailable",
                                start=start)
    finally:
        print("causewayd log:\n" + d.log())  # shown by pytest when the test failed
        alice.disconnect()
        srv.close()


def test_ejabberd_writes_namespaced_attributes_as_they_came(ejabberd):
    """Prosody writes each namespaced attribute with a namespace
    declaration of its own, so a review's 205,920-byte message (19,016
    attributes in one 1,000-character namespace) reached the component as
    a 19.6 MB tag (docs/xmpp.md, "Stanza size"). ejabberd 23.01 writes the
    prefix and its one declaration as they came: the component (a raw one
    here) reads the message at about the size alice sent."""
    attrs = " ".join(f"p:a{i}=''" for i in range(19016))
    raw = f"<message to='wally@{COMP}' type='chat' id='ns1'><x xmlns:p='urn:{'n' * 996}' {attrs}/></message>"
    alice = XmppClient("alice@" + HOST, "pw-alice", port=ejabberd.c2s_port)
    alice.connect()
    try:
        with RawComponent(COMP, ejabberd.component_port) as c:
            assert c.handshake(SECRET).tag.endswith("}handshake")
            alice.send_raw(raw)
            # (send_raw follows a long stanza with whitespace: expat's reparse deferral)
            got = b""
            c.sock.settimeout(1)
            deadline = time.time() + 30
            while b"</message>" not in got and time.time() < deadline:
                try:
                    chunk = c.sock.recv(1 << 20)
                except socket.timeout:
                    continue
                assert chunk, got[:300]
                got += chunk
            assert b"id='ns1'" in got and got.rstrip().endswith(b"</message>"), got[:300]
            assert got.count(b"xmlns:p=") == 1 and b"p:a19015=''" in got, got[:300]
            assert len(raw) < len(got) < len(raw) + 500, (len(raw), len(got))
    finally:
        alice.disconnect()
