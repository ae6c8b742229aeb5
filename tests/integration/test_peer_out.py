"""Pushes to a peer whose answers are odd: a 2xx whose body never ends, a
redirect, a Retry-After given as an HTTP date (POST {push_url}/v1/notify,
adapters/peer/peer_out.c)."""
import email.utils
import socket
import threading
import time

from harness import wait_until
from peer import push_peers
from test_peer_api import room


class RawPeer:
    """A notify endpoint that answers as told, byte by byte: each request
    is read whole (headers and Content-Length body), counted, then answered
    with head (bytes) and, when hang, the connection kept open without a
    byte more until close()."""

    def __init__(self, head, hang=False):
        self.head = head
        self.hang = hang
        self.requests = []  # (time, request line)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closing.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        f = c.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    return
                length = 0
                while True:
                    h = f.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode().partition(":")
                    if k.strip().lower() == "content-length":
                        length = int(v.strip())
                f.read(length)
                with self.lock:
                    self.requests.append((time.time(), line.decode().strip()))
                c.sendall(self.head)
                if self.hang:
                    self.closing.wait()
                    return
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.closing.set()
        self.sock.close()


def test_a_2xx_whose_body_never_ends_is_an_acknowledgement(make_daemon, db_url, pg):
    """A peer that answers 200 and then sends its body slowly, or never
    all of it, took the batch when it said 200: the row is delivered after
    one request, not sent again and again into dead letters (a 2xx whose
    body is too long already counted so; one that stalled past
    dispatcher.http_timeout_ms counted as a failure, and each retry too)."""
    d = make_daemon(db_url, options={"dispatcher": {"http_timeout_ms": "1500", "retry_budget": "2",
                                                   "retry_base_ms": "50", "retry_max_ms": "100"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    raw = RawPeer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{",
                  hang=True)
    try:
        assert d.admin("PATCH", "/peers/tg", json={"push_url": raw.url}).status_code == 200
        rm = room(a, b)
        r = a.send(rm["id"], a.user("alice"), "acknowledged, then silence")
        assert r.status_code == 202, r.text
        q = "SELECT state || ' ' || attempts FROM outbox WHERE destination = 'peer:tg'"
        state = wait_until(lambda: (lambda s: s if s and not s.startswith(("pending", "in_flight")) else None)(
            pg.psql(q, db_url)), timeout=30, what="the outcome recorded")
        assert state == "delivered 1", (state, raw.requests)
        time.sleep(0.5)
        assert len(raw.requests) == 1, raw.requests
    finally:
        raw.close()
        for _, srv in made:
            srv.close()


def test_a_redirect_is_not_followed(make_daemon, db_url, pg):
    """A peer answering 3xx with a Location elsewhere (another host, an
    address inside the operator's network) is not followed: the push is
    a failure, retried at push_url, and the other address gets nothing."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2", "retry_base_ms": "50",
                                                   "retry_max_ms": "100"}}).start()
    (a, _), (b, sb) = made = push_peers(d)
    raw = RawPeer(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {sb.url}/v1/notify\r\n"
                  "Content-Length: 0\r\n\r\n".encode())
    try:
        assert d.admin("PATCH", "/peers/tg", json={"push_url": raw.url}).status_code == 200
        rm = room(a, b)
        assert a.send(rm["id"], a.user("alice"), "stay where you are").status_code == 202
        q = "SELECT state FROM outbox WHERE destination = 'peer:tg'"
        wait_until(lambda: pg.psql(q, db_url) == "dead", timeout=30, what="a dead letter")
        assert len(raw.requests) == 2 and sb.requests == 0, (raw.requests, sb.answers)
        err = pg.psql("SELECT code FROM delivery_attempts ORDER BY id LIMIT 1", db_url)
        assert err == "307", err
    finally:
        raw.close()
        for _, srv in made:
            srv.close()


def test_a_retry_after_given_as_a_date_is_obeyed(make_daemon, db_url, pg):
    """Retry-After as an HTTP date (RFC 9110) on a 503: the batch waits
    until then, as for the seconds form."""
    d = make_daemon(db_url).start()
    (a, _), (b, sb) = made = push_peers(d)
    try:
        sb.script = [(503, email.utils.formatdate(time.time() + 4, usegmt=True))]
        rm = room(a, b)
        assert a.send(rm["id"], a.user("alice"), "later").status_code == 202
        sb.wait_events(1, timeout=30)
        came = [t for t, _ in sb.answers]
        assert [st for _, st in sb.answers] == [503, 200], sb.answers
        assert came[1] - came[0] >= 2.5, sb.answers  # the date has a second's resolution
    finally:
        for _, srv in made:
            srv.close()

