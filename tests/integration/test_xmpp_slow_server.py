"""A server that reads the component's stream slowly (since the fifty-first
session).

The component's thread handed its whole queue (up to 20,000 stanzas) to
libstrophe at every turn, whose send queue has no bound, and counted each
stanza written as soon as it was handed: a server that stopped reading
grew that queue without limit, the stanzas' outbox rows counted as
delivered while they still sat in the daemon's memory, and a break lost
those handed before the newest 4,096 stanzas / 16 MiB (what is kept to be
written again after a reconnect).  Now a batch of 64 KiB at most is handed
once libstrophe has written the one before, a stanza counts as written once
libstrophe has written it, and a row whose wait for the stream passes its
time takes its stanza back when it was not handed yet."""
import contextlib
import re
import socket
import threading
import time

from harness import wait_until
from prosody import XmppClient
from test_xmpp import (prosody, ALICE, ALICE_JID, body, component_state, consent_alice,  # noqa: F401
                       start_with_gk)

SIZE = 16000  # a message's text (the peer API takes 16384 bytes)
COUNT = 1250  # 20 MB: past the 16 MiB written again after a break


class StallProxy:
    """Relays the component's stream to the server; while `stalled`, what
    the component writes is not read (the server's side still is): a
    server that does not keep up.  A small receive buffer keeps what the
    kernel holds for it small.  `received`: the bytes read from the
    component; cut() breaks the streams (what was not read is lost)."""

    def __init__(self, port):
        self.port, self.stalled, self.received, self.conns = port, False, 0, []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.local_port = self.sock.getsockname()[1]
        self.closed = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.port))
            except OSError:  # the server gone: the component is refused, as it would be
                client.close()
                continue
            self.conns.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, up):
        try:
            while True:
                if up and self.stalled:
                    time.sleep(0.05)
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if up:
                    self.received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self):
        self.stalled = False
        for pair in self.conns:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self):
        """Stops accepting, then cuts the streams.  Until the fifty-eighth
        session close() cut first and closed the listening socket from
        this thread, which does not wake an accept() under way in another:
        the daemon's reconnect after the cut was still accepted and
        relayed, or, the server's fixture gone, the relay's connect to it
        raised in the accepting thread ("Exception in thread").  Shut down,
        the socket's accept() returns at once (EINVAL)."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.acceptor.join(5)
        self.sock.close()
        self.cut()


def test_a_server_that_does_not_read_gets_no_stanza_counted_before_it_is_written(make_daemon, db_url, prosody,
                                                                                   pg):
    proxy = StallProxy(prosody.component_port)
    d, a, srv = start_with_gk(make_daemon, db_url, prosody, server={"max_body_bytes": "32MiB"},
                              xmpp={"server_port": str(proxy.local_port), "resend_window_ms": "600000"})
    alice = XmppClient(ALICE_JID, "pw-alice", port=prosody.c2s_port)
    delivered = ("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id "
                 "WHERE o.destination = 'xmpp' AND o.state = 'delivered'")
    try:
        consent_alice(d)
        alice.connect()
        room = a.create_room([a.user("wally"), ALICE]).json()
        assert a.send(room["id"], a.user("wally"), "first").status_code == 202
        wait_until(lambda: any(body(el) == "first" for el in alice.stanzas()), what="the first message")
        wait_until(lambda: pg.psql(delivered, db_url) == "1", what="the first row delivered")
        proxy.stalled = True
        texts = [f"m{i:04d}-" + "x" * SIZE for i in range(COUNT)]
        for k in range(0, COUNT, 250):
            items = [{"idempotency_key": f"slow-{i}", "room": room["uri"],
                      "event": {"type": "message", "sender": a.user("wally"),
                                "content": {"parts": [{"type": "text/plain", "body": texts[i]}]}}}
                     for i in range(k, min(k + 250, COUNT))]
            r = a.call("POST", "/v1/batch", {"events": items})
            assert r.status_code == 200, r.text
            assert all("id" in x for x in r.json()["results"]), r.json()["results"][:2]
        # The rows are tried while the server does not read, past a
        # write's wait (xmpp_out.c's WRITE_TIMEOUT_MS, 5 s): a stanza not
        # written then is taken back and its row failed (until the
        # fifty-seventh session a fixed 8 s were waited out).
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE destination = 'xmpp' AND last_error LIKE "
                                   "'%broke before the stanza was written%'", db_url) != "0",
                   timeout=60, what="a stanza not written within a write's wait")
        # What counts as delivered was read by the server, or is in the
        # kernel's buffers between the two (a few MB at most), or in the
        # one batch libstrophe was given last: not the whole 20 MB.
        n = int(pg.psql(delivered, db_url)) - 1
        assert n * SIZE <= proxy.received + (8 << 20), (n, proxy.received)
        assert component_state(d)["state"] == "up"
        # The stream breaks with what the server did not read lost; after
        # the reconnect every message reaches alice: what counted as
        # delivered was written again, the rest goes with its row's retry.
        proxy.cut()
        wait_until(lambda: pg.psql(delivered, db_url) == str(COUNT + 1), timeout=240,
                   what="every row delivered after the reconnect")

        def got():
            return {body(el)[:5] for el in alice.stanzas() if (body(el) or "").startswith("m")}
        wait_until(lambda: len(got()) == COUNT, timeout=120, what="every message at alice")
    except BaseException:
        print("delivered", pg.psql(delivered, db_url), "read by the server", proxy.received)
        print(pg.psql("SELECT state, attempts, left(last_error, 200), count(*) FROM outbox GROUP BY 1, 2, 3", db_url))
        raise
    finally:
        print("causewayd log:\n" + d.log()[-20000:])  # shown by pytest when the test failed
        alice.disconnect()
        srv.close()
        proxy.close()


def test_answers_to_a_flood_of_requests_from_a_server_that_does_not_read_are_bounded(make_daemon, db_url):
    """The component answers the server's requests (a ping, disco, an
    error) at once, outside the drain's batches.  A server that writes
    requests and reads nothing had every answer handed to libstrophe,
    whose send queue has no bound (until the fifty-second session): here
    100,000 pings, 100,000 answers held in the daemon.  Past the bound
    they are dropped and counted (answers_dropped); what the server reads
    once it reads again is the bound and what the kernel held, and the
    stream stays up and answers the next request."""
    from test_xmpp import HostileServer, SECRET, COMP, HOST, component_state as state
    srv = HostileServer(SECRET)
    srv.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    d = srv.daemon(make_daemon, db_url)
    try:
        srv.stream_up(d)
        # the component's first keepalive ping, answered: the next is a
        # minute away (one unanswered for 30 s breaks the stream)
        ping = srv._until(b"</iq>").decode()
        srv.send(f"<iq type='result' id='{re.search(r'id=.(cw-ping-[0-9a-f]+)', ping).group(1)}' "
                 f"from='{HOST}' to='{COMP}'/>")
        count, chunk = 100000, 5000
        for k in range(0, count, chunk):
            srv.send("".join(f"<iq type='get' id='f{i}' from='flood@{HOST}/r' to='{COMP}'>"
                             "<ping xmlns='urn:xmpp:ping'/></iq>" for i in range(k, k + chunk)))
        # every request read (the server's writes went through) and served
        wait_until(lambda: state(d)["stanzas_in"] >= count, timeout=120, what="the flood read")
        # the server reads again: what was handed is written, then nothing
        got = b""
        while True:
            more = srv.read_for(3)
            if not more:
                break
            got += more
        answers = got.count(b"type='result'") + got.count(b'type="result"')
        assert answers < count // 2, answers
        dropped = state(d).get("answers_dropped", 0)
        assert dropped > 0 and answers + dropped >= count, (answers, state(d))
        m = re.search(r'causeway_xmpp_stanzas_total\{component="%s",kind="dropped"\} (\d+)' % re.escape(COMP),
                      d.get("/metrics").text)
        assert m and int(m.group(1)) == dropped
        # and a request now is answered
        srv.send(f"<iq type='get' id='after' from='flood@{HOST}/r' to='{COMP}'><ping xmlns='urn:xmpp:ping'/></iq>")
        got = srv.read_for(3)
        assert b"id='after'" in got or b'id="after"' in got, got
        assert state(d)["state"] == "up"
    finally:
        print("causewayd log:\n" + d.log()[-8000:])
        d.stop()


def test_a_reconnect_with_a_thousand_http_connections_open_keeps_the_daemon(make_daemon, db_url):
    """libstrophe waits with select(), and glibc aborts on a descriptor at
    or past FD_SETSIZE (1024).  The stream's socket gets a low descriptor
    kept for it, but the scratch connection made first (give_sm_state) did
    not: with a thousand HTTP connections open the next reconnect aborted
    the daemon (until the fifty-second session)."""
    import os
    import resource
    from urllib.parse import urlparse
    from test_xmpp import HostileServer, SECRET, COMP, HOST, component_state as state
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        import pytest
        pytest.skip("needs 4096 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    srv = HostileServer(SECRET)
    d = srv.daemon(make_daemon, db_url, server={"domain": "example.org", "connection_limit": "3000"})
    held = []
    try:
        srv.stream_up(d)
        u = urlparse(d.url)
        for _ in range(1100):
            held.append(socket.create_connection((u.hostname, u.port)))
        pid = d.proc.pid
        wait_until(lambda: len(os.listdir(f"/proc/{pid}/fd")) > 1100, what="the daemon holding the connections")
        srv.conn.close()
        srv.conn = None
        srv.accept(timeout=30)
        wait_until(lambda: state(d)["state"] == "up", what="the stream up again")
        # served on the new stream (its stream-management state taken)
        srv.send(f"<iq type='get' id='again' from='a@{HOST}/r' to='{COMP}'><ping xmlns='urn:xmpp:ping'/></iq>")
        got = b""
        while b"'again'" not in got and b'"again"' not in got:
            more = srv.read_for(5)
            assert more, got
            got += more
        assert d.proc.poll() is None
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        print("causewayd log:\n" + d.log()[-8000:])
        d.stop()
