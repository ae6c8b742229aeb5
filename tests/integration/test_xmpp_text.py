"""Text the XMPP adapter writes is XML 1.0 (since the thirty-first session).

A character XML does not allow (a C0 control, U+FFFE, U+FFFF) written to the
component's stream makes the server close it (not-well-formed); the adapter
wrote the stanzas of the seconds before the break again after the reconnect,
so one such stanza kept the component down for good.  Every text child the
adapter writes is filtered now (xa_text_child), and after the server found
the stream not well-formed the stanzas before the break are not written
again.  The names here were stored before the peer API refused them (or by
an older release): the API refuses them now (test_peer_api.py)."""
import contextlib
import socket
import socketserver
import threading

from harness import wait_until
from prosody import XmppClient
from test_xmpp import (prosody, xd, gk, alice, consent_alice, q, MUC, MUC_USER, ALICE, ALICE_JID,  # noqa: F401
                       WALLY_JID, body, message_from, component_state, connects, start_with_gk)

BAD = "\ufffe\uffff\x01"          # what XML 1.0 does not allow
SQL_BAD = "chr(65534) || chr(65535) || chr(1)"


def subject_of(el):
    s = el.find("{jabber:client}subject")
    return None if s is None else s.text


def test_the_peer_api_refuses_names_with_noncharacters(xd, gk, pg, db_url):
    """What the API takes now: a group's name, a rename, a display name
    with U+FFFE or U+FFFF (or another noncharacter) is refused, 400
    invalid_body, and nothing is stored."""
    a, _ = gk
    gid = a.create_room([a.user("wally"), ALICE], kind="group", name="Lunch club").json()["id"]
    for bad in ("Lunch \ufffe club", "x\uffff", "\ufdd0", "a\U0001fffe"):
        r = a.create_room([a.user("wally"), ALICE], kind="group", name=bad)
        assert r.status_code == 400 and r.json()["code"] == "invalid_body", (ascii(bad), r.text)
        r = a.call("PATCH", f"/v1/rooms/{gid}", {"name": bad})
        assert r.status_code == 400 and r.json()["code"] == "invalid_body", (ascii(bad), r.text)
        r = a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": bad})
        assert r.status_code == 400 and r.json()["code"] == "invalid_body", (ascii(bad), r.text)
        assert "noncharacter" in r.json()["detail"], r.text
    assert pg.psql("SELECT string_agg(coalesce(name, '-'), ',') FROM rooms", db_url) == "Lunch club"
    assert pg.psql("SELECT count(*) FROM identities WHERE display_name IS NOT NULL", db_url) == "0"
    # Their neighbours are fine.
    assert a.call("PATCH", f"/v1/rooms/{gid}", {"name": "Lunch \ufffd \ufdf0 club"}).status_code == 200
    assert a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": "Wally \ufffd"}).status_code == 200


def test_a_groups_name_with_characters_xml_forbids_reaches_the_subject_replaced(xd, gk, alice, pg, db_url):
    a, _ = gk
    consent_alice(xd)
    gid = a.create_room([a.user("wally"), a.user("zoe"), ALICE], kind="group", name="Lunch club").json()["id"]
    pg.psql(f"UPDATE rooms SET name = 'Lunch ' || {SQL_BAD} || ' club' WHERE public_id = '{gid}'", db_url)
    before = connects(xd)
    assert a.send(gid, a.user("wally"), "hi").status_code == 202
    room = alice.wait_for_message(lambda el: el.find(q(MUC_USER, "x")) is not None).get("from")
    start = alice.count()
    alice.send_presence(to=room + "/alice", payload=f"<x xmlns='{MUC}'><history maxstanzas='0'/></x>")
    got = alice.wait_for_message(lambda el: subject_of(el) is not None, start=start)
    # A name the API refuses now is shown as the portals show it (since the
    # fortieth session: the control left out, cw_utf8_name_shown); the
    # noncharacters it keeps are replaced where the text is written.
    assert subject_of(got).startswith("Lunch \ufffd\ufffd club (bridged from gk by Causeway"), subject_of(got)
    # Renamed (in storage) while she is in: the new subject, replaced as well.
    start = alice.count()
    pg.psql(f"UPDATE rooms SET name = 'Tea ' || {SQL_BAD} WHERE public_id = '{gid}'", db_url)
    got = alice.wait_for_message(lambda el: subject_of(el) is not None, start=start, timeout=20)
    assert subject_of(got).startswith("Tea \ufffd\ufffd (bridged from gk"), subject_of(got)
    # The stream never broke.
    assert connects(xd) == before and component_state(xd)["state"] == "up"


def test_a_display_name_with_characters_xml_forbids_reaches_the_vcard_replaced(xd, gk, alice, pg, db_url):
    a, _ = gk
    assert a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": "Wally"}).status_code == 200
    pg.psql(f"UPDATE identities SET display_name = 'Wally' || {SQL_BAD} WHERE localpart = 'wally'", db_url)
    before = connects(xd)
    v = alice.iq("get", WALLY_JID, "<vCard xmlns='vcard-temp'/>")
    card = v.find("{vcard-temp}vCard")
    fn, nick = card.find("{vcard-temp}FN").text, card.find("{vcard-temp}NICKNAME").text
    # The shown-name filter (cw_utf8_name_shown) leaves the control out;
    # the noncharacters it keeps are replaced where the text is written.
    assert fn == nick == "Wally\ufffd\ufffd (gk)", (fn, nick)
    assert not any(c in fn + nick for c in BAD)
    assert connects(xd) == before and component_state(xd)["state"] == "up"


NOT_WELL_FORMED = (b"<stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                   b"</stream:error></stream:stream>")


class PoisonProxy(socketserver.ThreadingTCPServer):
    """Relays the component's stream to the server; what the component
    writes with `marker` in it is not relayed: the component is answered
    not-well-formed and the stream closed, as Prosody does for a character
    XML forbids (the one way left to have a server refuse the stream)."""
    daemon_threads = True

    def __init__(self, port, marker):
        super().__init__(("127.0.0.1", 0), _Relay)
        self.port, self.marker = port, marker
        self.local_port = self.server_address[1]
        self.cuts = 0
        # serve_forever looks for close()'s shutdown() every poll_interval:
        # at its default, 0.5 s, each close waited 0.25 s on average
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


class _Relay(socketserver.BaseRequestHandler):
    def handle(self):
        client, proxy = self.request, self.server
        server = socket.create_connection(("127.0.0.1", proxy.port))
        lock = threading.Lock()
        down = threading.Thread(target=self._down, args=(client, server, lock), daemon=True)
        down.start()
        tail = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if proxy.marker in tail + data:
                    with lock:
                        proxy.cuts += 1
                        client.sendall(NOT_WELL_FORMED)
                    break
                tail = (tail + data)[-len(proxy.marker):]
                server.sendall(data)
        except OSError:
            pass
        self._close(client, server)
        down.join()
        server.close()

    def _down(self, client, server, lock):
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                with lock:
                    client.sendall(data)
        except OSError:
            pass
        self._close(client, server)

    @staticmethod
    def _close(*socks):
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_a_stream_the_server_found_not_well_formed_is_not_written_again(make_daemon, db_url, prosody, pg):
    """The stanzas of the seconds before a not-well-formed are not written
    again after the reconnect (one of them is what the server refused): the
    component stays up, and what comes later is delivered.  Before, the
    same stanzas were written after each reconnect, and the server closed
    the stream again, for ever."""
    proxy = PoisonProxy(prosody.component_port, b"poison-3f9a")
    d, a, srv = start_with_gk(make_daemon, db_url, prosody,
                              xmpp={"server_port": str(proxy.local_port), "resend_window_ms": "60000"})
    try:
        consent_alice(d)
        alice = XmppClient(ALICE_JID, "pw-alice", port=prosody.c2s_port)
        alice.connect()
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        assert a.send(room, a.user("wally"), "before").status_code == 202
        message_from(alice, WALLY_JID, lambda el: body(el) == "before")
        before = connects(d)
        start = len(d.records)
        assert a.send(room, a.user("wally"), "poison-3f9a").status_code == 202
        wait_until(lambda: proxy.cuts == 1, what="the server's not-well-formed")
        wait_until(lambda: connects(d) == before + 1 and component_state(d)["state"] == "up", timeout=30,
                   what="the reconnect")
        assert a.send(room, a.user("wally"), "after").status_code == 202
        message_from(alice, WALLY_JID, lambda el: body(el) == "after", timeout=20)
        # One break, said once; nothing written again.
        assert proxy.cuts == 1 and connects(d) == before + 1 and component_state(d)["state"] == "up"
        said = [r for r in d.records[start:] if "not well-formed" in r.get("msg", "")]
        assert len(said) == 1 and int(said[0]["stanzas"]) >= 1, said
        assert not [r for r in d.records[start:]
                    if r.get("msg", "").startswith("xmpp: stanzas of the seconds before the break")]
        alice.disconnect()
    finally:
        print("causewayd log:\n" + d.log())  # shown by pytest when the test failed
        srv.close()
        proxy.close()
