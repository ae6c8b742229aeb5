"""The XMPP test harness (tests/integration/prosody.py) alone, against a real Prosody: users log in with
slixmpp and talk, subscribe, go offline; a raw XEP-0114 component authenticates (or not) and gets what
is addressed to its domain; restarts and crashes keep users, data and ports. No causewayd here."""
import os
import re
import signal
import socket

import pytest

from prosody import NS_STREAM, Prosody, RawComponent, XmppClient, XmppError

HOST = "xmpp.test"
COMP = "gk.xmpp.test"
SECRET = "component-secret-123"
ALICE = "alice@" + HOST
BOB = "bob@" + HOST


@pytest.fixture
def prosody(tmp_path):
    p = Prosody(tmp_path / "prosody", host=HOST, components={COMP: SECRET})
    try:
        p.start()
        p.register("alice", "pw-alice")
        p.register("bob", "pw-bob")
        yield p
    finally:
        p.close()
    assert not p.running


@pytest.fixture
def clients():
    """Makes XmppClients that are disconnected at the end, whatever happened."""
    made = []

    def make(jid, password, port, **kw):
        c = XmppClient(jid, password, port=port, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.disconnect()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_exposes_what_the_daemon_needs(prosody):
    assert prosody.host == HOST and prosody.address == "127.0.0.1"
    assert prosody.component_names == [COMP] and prosody.components == {COMP: SECRET}
    assert prosody.secret == SECRET
    assert prosody.c2s_port != prosody.component_port
    for port in (prosody.c2s_port, prosody.component_port):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    cfg = open(prosody.config_path).read()
    assert 'authentication = "internal_plain"' in cfg and f'Component "{COMP}"' in cfg
    assert "Prosody version 0.12" in prosody.log()
    # Nothing else listens: no s2s, no HTTP, no direct TLS.
    active = {name: where for name, where in re.findall(r"Activated service '(\w+)' on (.*)", prosody.log())}
    assert {name for name, where in active.items() if where != "no ports"} == {"c2s", "component"}, active
    assert active["c2s"] == f"[127.0.0.1]:{prosody.c2s_port}"
    assert active["component"] == f"[127.0.0.1]:{prosody.component_port}"


def test_message_between_two_users(prosody, clients):
    alice = clients(ALICE, "pw-alice", prosody.c2s_port).connect()
    bob = clients(BOB, "pw-bob", prosody.c2s_port).connect()
    assert alice.online and alice.jid.startswith(ALICE + "/")
    sid = alice.send_message(BOB, "hello <bob> & friends", receipt=True)
    m = bob.wait_for_message(lambda el: el.body is not None, timeout=5)
    assert m.get("id") == sid and m.get("type") == "chat" and m.get("from") == alice.jid
    assert m.body == "hello <bob> & friends"
    assert m.find("{urn:xmpp:sid:0}origin-id").get("id") == sid
    assert m.find("{urn:xmpp:receipts}request") is not None
    assert "<body>hello &lt;bob&gt; &amp; friends</body>" in m.xml
    xml, el = bob.wait_for(lambda e: e.get("id") == sid)
    assert xml == m.xml and el is m
    # Raw XML in: an element slixmpp has no plugin for arrives as it was sent.
    alice.send_raw(f"<message to='{BOB}' type='chat' id='raw1'><foo xmlns='urn:example:foo' a='1'>"
                   f"<bar/></foo></message>")
    m = bob.wait_for_message(lambda el: el.get("id") == "raw1", timeout=5)
    foo = m.find("{urn:example:foo}foo")
    assert foo.get("a") == "1" and foo.find("{urn:example:foo}bar") is not None and m.body is None
    bob.expect_no_message(lambda el: el.get("id") == "never", wait=0.1)


def test_presence_subscription_and_roster(prosody, clients):
    alice = clients(ALICE, "pw-alice", prosody.c2s_port).connect()
    bob = clients(BOB, "pw-bob", prosody.c2s_port).connect()
    assert alice.roster() == {}
    alice.send_presence(BOB, "subscribe")
    req = bob.wait_for_presence(lambda el: el.get("type") == "subscribe", timeout=5)
    assert req.get("from") == ALICE
    assert alice.roster()[BOB]["ask"] == "subscribe"
    bob.send_presence(ALICE, "subscribed")
    alice.wait_for_presence(lambda el: el.get("type") == "subscribed" and el.get("from") == BOB, timeout=5)
    # Once subscribed, alice sees bob's presence (the server probes it).
    alice.wait_for_presence(lambda el: el.get("from", "").startswith(BOB + "/") and el.get("type") is None,
                            timeout=5)
    assert alice.roster()[BOB]["subscription"] == "to"
    assert bob.roster()[ALICE]["subscription"] == "from"
    # And the other way: both.
    bob.send_presence(ALICE, "subscribe")
    alice.wait_for_presence(lambda el: el.get("type") == "subscribe" and el.get("from") == BOB, timeout=5)
    alice.send_presence(BOB, "subscribed")
    bob.wait_for_presence(lambda el: el.get("type") == "subscribed", timeout=5)
    assert alice.roster()[BOB]["subscription"] == "both" and bob.roster()[ALICE]["subscription"] == "both"
    # Unsubscribed takes it back.
    alice.send_presence(BOB, "unsubscribed")
    bob.wait_for_presence(lambda el: el.get("type") == "unsubscribed", timeout=5)
    assert alice.roster()[BOB]["subscription"] == "to"


def test_component_handshake(prosody):
    with RawComponent(COMP, prosody.component_port) as c:
        assert c.stream_id
        assert c.header.tag == "{%s}stream" % NS_STREAM and c.header.get("from") == COMP
        ans = c.handshake(SECRET)
        assert ans.tag == "{jabber:component:accept}handshake", ans.xml
    prosody.wait_for_log("External component successfully authenticated")


def test_component_wrong_secret(prosody):
    with RawComponent(COMP, prosody.component_port) as c:
        ans = c.handshake("wrong-secret")
        assert ans.tag == "{%s}error" % NS_STREAM, ans.xml
        assert ans.error_condition == "not-authorized", ans.xml
        with pytest.raises(AssertionError, match="stream closed|connection closed"):
            c.wait_for(lambda el: False, timeout=3)
        assert c.closed
    prosody.wait_for_log("Component authentication failed")


def test_messages_to_and_from_the_component(prosody, clients):
    alice = clients(ALICE, "pw-alice", prosody.c2s_port).connect()
    # The domain is unserved until a component connects: Prosody 0.12 bounces with remote-server-timeout.
    err = alice.iq("get", COMP, "<ping xmlns='urn:xmpp:ping'/>", expect_error=True)
    assert err.error_condition == "remote-server-timeout", err.xml
    with RawComponent(COMP, prosody.component_port) as c:
        assert c.handshake(SECRET).tag.endswith("}handshake")
        sid = alice.send_message("someone@" + COMP, "to the gateway")
        m = c.wait_for(lambda el: el.body == "to the gateway")
        assert m.tag == "{jabber:component:accept}message"
        assert m.get("to") == "someone@" + COMP and m.get("from") == alice.jid and m.get("id") == sid
        # And back: the component writes as someone@ its domain.
        c.send(f"<message from='someone@{COMP}/x' to='{ALICE}' type='chat' id='back1'><body>hi alice</body>"
               "</message>")
        back = alice.wait_for_message(lambda el: el.get("id") == "back1", timeout=5)
        assert back.get("from") == f"someone@{COMP}/x" and back.body == "hi alice"
        # An iq to the component is the component's to answer.
        alice_iq_id = "q1"
        alice.send_raw(f"<iq type='get' to='{COMP}' id='{alice_iq_id}'><query "
                       "xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        q = c.wait_for(lambda el: el.get("id") == alice_iq_id)
        c.send(f"<iq type='result' from='{COMP}' to='{q.get('from')}' id='{alice_iq_id}'>"
               "<query xmlns='http://jabber.org/protocol/disco#info'><identity category='gateway' type='mimi' "
               "name='test'/><feature var='urn:xmpp:ping'/></query></iq>")
        ans = alice.wait_for_iq(lambda el: el.get("id") == alice_iq_id, timeout=5)
        assert ans.get("type") == "result"
        assert ans.find(".//{http://jabber.org/protocol/disco#info}identity").get("category") == "gateway"


def test_iq_helpers_and_login_failure(prosody, clients):
    alice = clients(ALICE, "pw-alice", prosody.c2s_port).connect()
    assert alice.ping(HOST)
    idents, feats = alice.disco_info(HOST)
    assert ("server", "im", "Prosody") in idents and "urn:xmpp:ping" in feats
    ver = alice.iq("get", HOST, "<query xmlns='jabber:iq:version'/>")
    assert ver.find(".//{jabber:iq:version}name").text == "Prosody"
    err = alice.iq("get", HOST, "<query xmlns='urn:example:unknown'/>", expect_error=True)
    assert err.error_condition == "service-unavailable", err.xml
    with pytest.raises(XmppError) as ex:
        alice.iq("get", HOST, "<query xmlns='urn:example:unknown'/>")
    assert ex.value.stanza.get("type") == "error"
    with pytest.raises(XmppError, match="authentication failed"):
        clients(BOB, "wrong", prosody.c2s_port).connect(timeout=5)
    with pytest.raises(XmppError):
        clients("nobody@" + HOST, "x", prosody.c2s_port, sasl_mech="PLAIN").connect(timeout=5)
    # Disconnected, a client refuses to send; it may connect again (same resource asked, same lists).
    alice.disconnect()
    assert not alice.online
    with pytest.raises(XmppError, match="not connected"):
        alice.send_message(BOB, "lost")
    seen = alice.count()
    alice.connect()
    assert alice.ping(HOST) and alice.count() > seen
    # abort(): the TCP connection just drops, as a phone losing its network does.
    bob = clients(BOB, "pw-bob", prosody.c2s_port, resource="phone").connect()
    assert bob.jid == BOB + "/phone"
    bob.abort()
    alice.send_message(BOB, "after the drop")
    alice.ping(HOST)


def test_offline_messages_are_delivered_at_login(prosody, clients):
    alice = clients(ALICE, "pw-alice", prosody.c2s_port).connect()
    ids = [alice.send_message(BOB, f"while away {i}") for i in range(3)]
    alice.ping(HOST)  # a round trip: the messages are stored by now
    bob = clients(BOB, "pw-bob", prosody.c2s_port).connect()
    got = [bob.wait_for_message(lambda el, i=i: el.get("id") == i, timeout=5) for i in ids]
    assert [m.body for m in got] == [f"while away {i}" for i in range(3)]
    assert all(m.find("{urn:xmpp:delay}delay") is not None for m in got)
    assert [m.get("id") for m in bob.messages() if m.body and m.body.startswith("while away")] == ids


def test_restart_keeps_users_data_and_ports(prosody, clients):
    ports = (prosody.c2s_port, prosody.component_port)
    alice = clients(ALICE, "pw-alice", prosody.c2s_port).connect()
    alice.send_presence(BOB, "subscribe")
    alice.ping(HOST)
    pid = prosody.pid
    prosody.restart()
    assert prosody.pid != pid and not pid_alive(pid)
    assert (prosody.c2s_port, prosody.component_port) == ports
    # The client lost its stream (with a system-shutdown stream error, unless the TCP reset overtook it).
    alice.wait_offline(timeout=5)
    errs = [el.error_condition for el in alice.stanzas() if el.tag == "{%s}error" % NS_STREAM]
    assert errs in ([], ["system-shutdown"])
    alice.connect()  # the same client again
    assert alice.roster()[BOB]["ask"] == "subscribe"
    bob = clients(BOB, "pw-bob", prosody.c2s_port).connect()
    bob.wait_for_presence(lambda el: el.get("type") == "subscribe" and el.get("from") == ALICE, timeout=5)
    # A crash (SIGKILL) loses nothing that was stored either; a user registered while it is down works.
    bob.disconnect()
    sid = alice.send_message(BOB, "stored before the crash")
    alice.ping(HOST)
    assert prosody.kill() == -signal.SIGKILL
    prosody.register("carol", "pw-carol")
    prosody.start()
    assert (prosody.c2s_port, prosody.component_port) == ports
    bob = clients(BOB, "pw-bob", prosody.c2s_port).connect()
    assert bob.wait_for_message(lambda el: el.get("id") == sid, timeout=5).body == "stored before the crash"
    clients("carol@" + HOST, "pw-carol", prosody.c2s_port).connect()
    with RawComponent(COMP, prosody.component_port) as c:
        assert c.handshake(SECRET).tag.endswith("}handshake")


def test_two_instances_side_by_side(tmp_path, clients):
    with Prosody(tmp_path / "one", host=HOST, components=[COMP], secret="s1") as one, \
            Prosody(tmp_path / "two", host="other.test", components={"gw.other.test": "s2"}) as two:
        ports = {one.c2s_port, one.component_port, two.c2s_port, two.component_port}
        assert len(ports) == 4 and one.dir != two.dir
        assert one.secret == "s1" and one.components == {COMP: "s1"}
        one.register("alice", "a1")
        two.register("alice", "a2")
        a1 = clients("alice@xmpp.test", "a1", one.c2s_port).connect()
        a2 = clients("alice@other.test", "a2", two.c2s_port).connect()
        assert a1.jid.startswith("alice@xmpp.test/") and a2.jid.startswith("alice@other.test/")
        with pytest.raises(XmppError):
            clients("alice@other.test", "a1", two.c2s_port).connect(timeout=5)
        a1.disconnect()
        a2.disconnect()
        pids = [one.pid, two.pid]
    assert not any(pid_alive(p) for p in pids)
    assert not one.running and not two.running


def test_causeway_guard_refuses_what_prosody_would_write_past_its_limit(tmp_path, clients):
    """contrib/prosody/mod_causeway_guard on the component (here with
    causeway_guard_max_bytes = 2000): a stanza Prosody would write larger
    than that (700 apostrophes, 4,200 bytes escaped) is not forwarded, its
    sender gets policy-violation (an iq result or an error: nothing) and a
    warning is logged; stanzas within the limit reach the component."""
    p = Prosody(tmp_path / "prosody", host=HOST, components={COMP: SECRET},
                component_modules=["causeway_guard"], component_config="  causeway_guard_max_bytes = 2000")
    try:
        p.start()
        p.register("alice", "pw-alice")
        alice = clients(ALICE, "pw-alice", p.c2s_port).connect()
        with RawComponent(COMP, p.component_port) as c:
            assert c.handshake(SECRET).tag.endswith("}handshake")
            alice.send_message("someone@" + COMP, "x" * 1500, id="small")
            c.wait_for(lambda el: el.get("id") == "small")
            big = "'" * 700
            for raw in (f"<iq type='result' to='someone@{COMP}/r' id='res1'><x xmlns='urn:p'>{big}</x></iq>",
                        f"<message type='error' to='someone@{COMP}' id='err1'><body>{big}</body></message>",
                        f"<message type='chat' to='{COMP}' id='big1'><body>{big}</body></message>"):
                alice.send_raw(raw)
            err = alice.wait_for_message(lambda el: el.get("id") == "big1", timeout=5)
            assert err.get("type") == "error" and err.get("from") == COMP, err.xml
            assert err.error_condition == "policy-violation" and "type=\"modify\"" in err.xml, err.xml
            assert "too large for the gateway" in err.xml and "'''" not in err.xml, err.xml
            p.wait_for_log(r"Refused a message from alice@xmpp.test/\S+ to gk.xmpp.test: up to \d+ bytes")
            alice.send_message("someone@" + COMP, "after", id="after")
            c.wait_for(lambda el: el.get("id") == "after")
            assert [el.get("id") for el in c.stanzas if el.get("id") in ("small", "res1", "err1", "big1", "after")] \
                == ["small", "after"]
            assert [el.get("id") for el in alice.stanzas() if el.get("type") == "error"] == ["big1"]
            assert len(re.findall("Refused a", p.log())) == 3
    finally:
        p.close()
