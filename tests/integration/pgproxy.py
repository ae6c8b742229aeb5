"""A PostgreSQL wire-protocol proxy on a Unix socket, for a fault a real
network has and a stopped server does not: a connection cut after a
statement reached the server and ran, before its answer came back.

The daemon is given `proxy.url` instead of the database's URL; every
connection is relayed byte for byte (protocol 3, the server's Unix socket,
so no TLS to negotiate) while the proxy reads the message boundaries
(a type byte and a length, after the untyped start-up message) to know
which statement a transaction ran.  Armed, it cuts once: a COMMIT after
a given statement returned a row (cut_commit_after, cut_commit_matching),
or one statement run outside a transaction block (cut_statement, and
cut_statement_with_rows for a run that returned a row).  Frozen (freeze),
it relays nothing more and closes nothing, and holds new connections
unanswered: a database host powered off, or a network partition, where
no reset ever comes.  Thawed (thaw), the partition heals: what was held
goes on, the new connections held are relayed.  Slowed (slow), the server
answers everything but late: a COMMIT (simple query) reaches it some time
late (a slow fsync, a synchronous standby), a new connection (a cancel
request, a ping) is relayed some time late (a loaded postmaster, a far
server).  Swallowing (swallow), it takes new connections and never
answers them while those open go on: a database host whose address is
routed nowhere, or a firewall that drops, for a client that connects
anew; refusing (refuse), it closes new connections at once, as a server
that is down.  Recording (record), it keeps the statements each
connection sends, to compare what two requests made the server do.
Cut before it (cut_commit_unsent), a COMMIT never reaches the server:
lost on its way, the transaction rolled back, or left running (hold) as
long as the server's side is kept open.
"""
import time
import os
import shutil
import socket
import struct
import tempfile
import threading
import urllib.parse


def _exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _message(sock):
    """One typed message: (type, whole bytes)."""
    head = _exact(sock, 5)
    (length,) = struct.unpack("!I", head[1:])
    return head[:1], head + _exact(sock, length - 4)


class _Conn:
    def __init__(self, client, server):
        self.client, self.server = client, server
        self.counting = False   # the armed statement's rows are coming
        self.rows = 0           # rows it returned in this transaction
        self.cut = False        # the COMMIT went; drop its answer and close
        self.binds = []         # per Bind sent, whether armed (pipelines: answered in order)
        self.unnamed = ""       # the text of the unnamed prepared statement (a Parse with no name)
        self.buffering = False  # rows_pred armed: hold the answer until Z
        self.buf = []
        self.buf_rows = 0
        self.auto = False       # an autocommit statement armed: drop its answer and close
        self.n = 0              # its number, in the order of connecting (record)


class PgProxy:
    def __init__(self, db_url):
        u = urllib.parse.urlsplit(db_url)
        q = urllib.parse.parse_qs(u.query)
        host, port = q["host"][0], q["port"][0]
        self.target = os.path.join(host, f".s.PGSQL.{port}")
        self.dir = tempfile.mkdtemp(prefix="pgproxy")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(os.path.join(self.dir, f".s.PGSQL.{port}"))
        self.listener.listen(64)
        query = "&".join("host=" + urllib.parse.quote(self.dir, safe="") if kv.startswith("host=") else kv
                         for kv in u.query.split("&"))
        self.url = db_url.split("?", 1)[0] + "?" + query   # urlunsplit would drop the empty authority's //
        self.lock = threading.Lock()
        self.statement = None   # arms the cut: see cut_commit_after
        self.cuts = 0
        self.closed = False
        self.held = []
        self.thawed = threading.Condition(self.lock)
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_commit_after(self, statement):
        """The next COMMIT, sent as a simple query, of a transaction in which
        the prepared statement named `statement` returned a row reaches the
        server; its answer is dropped and the connection closed (once)."""
        with self.lock:
            self.statement = statement

    def cut_commit_matching(self, pred):
        """As cut_commit_after, for any prepared statement whose name
        pred(name) accepts (its text, for the unnamed statement of
        PQexecParams).  Bind messages are matched with the server's
        BindComplete answers in order, so that one statement of a pipeline
        (the writer's batch: many Binds before the first answer) counts its
        own rows only."""
        with self.lock:
            self.statement = pred

    unsent = None   # cut_commit_unsent's: "close" or "hold"

    def cut_commit_unsent(self, pred, hold=False):
        """As cut_commit_matching, but the COMMIT never reaches the server:
        the client's side is closed in its place (once), a COMMIT lost on
        its way. The server's side is closed too, and the server rolls the
        transaction back; with hold, it stays open, as in a partition where
        no reset comes: the transaction runs on, idle, as long as
        release_held does not close it."""
        with self.lock:
            self.statement, self.unsent = pred, "hold" if hold else "close"

    def release_held(self):
        """The server's sides cut_commit_unsent(hold=True) kept open, closed:
        their transactions are rolled back."""
        with self.lock:
            kept, self.kept = getattr(self, "kept", []), []
        for s in kept:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut_statement_with_rows(self, pred):
        """As cut_statement, but only a run that returned a row is cut;
        runs that returned none go through and the cut stays armed."""
        with self.lock:
            self.rows_pred = pred

    rows_pred = None

    def cut_answer(self, lost, pred):
        """The answer lost where `lost` says: "look", the statement pred
        accepts, in a run that returned a row (cut_statement_with_rows);
        "commit", the COMMIT of its transaction (cut_commit_matching)."""
        assert lost in ("look", "commit"), lost
        if lost == "look":
            self.cut_statement_with_rows(pred)
        else:
            self.cut_commit_matching(pred)
    on_complete = False   # cut_commit_matching counts a statement that completed, rows or not

    def cut_statement(self, pred):
        """The next statement (Bind of a prepared one whose name, or
        Parse/Query whose text, pred accepts), on its own or inside a
        transaction block alike: it reaches the server and runs, its answer
        (all up to the next ReadyForQuery) is dropped and the connection
        closed (once).  Inside a block (the report's INSERT, a BEGIN) the
        close leaves the transaction uncommitted and the server rolls it
        back.  Until the sixty-third session this said "outside a
        transaction block", which the code never checked."""
        with self.lock:
            self.auto_pred = pred

    auto_pred = None

    recording = None

    def record(self):
        """From now on each statement sent is kept, in the order sent, in
        the list returned: (connection number, kind, text), kind "Q" a
        simple query, "B" the Bind of a prepared statement (its name, or
        the unnamed statement's text: PQexecParams), "S" a Sync (with each
        "Q", one round trip).  stop_recording() ends it."""
        with self.lock:
            self.recording = []
            return self.recording

    def stop_recording(self):
        with self.lock:
            self.recording = None

    def freeze(self):
        """From now on nothing is relayed, nothing closed; `stalled` counts
        the messages held since (a statement that waits for its answer)."""
        with self.lock:
            self.frozen = True

    frozen = False
    stalled = 0

    commit_delay = 0.0
    accept_delay = 0.0
    delayed_commits = 0

    def slow(self, commit=0.0, connect=0.0):
        """From now on a COMMIT sent as a simple query goes to the server
        commit s late, and a new connection is relayed connect s late
        (0: at once, the default); delayed_commits counts the COMMITs so
        held."""
        with self.lock:
            self.commit_delay, self.accept_delay = commit, connect

    swallowing = False
    refusing = False
    swallowed = 0   # new connections taken and held while swallowing
    refused = 0     # new connections closed at once while refusing

    def swallow(self):
        """From now on new connections are taken and held unanswered (until
        thaw, which relays them); those open go on."""
        with self.lock:
            self.swallowing, self.refusing = True, False

    def refuse(self):
        """From now on new connections are closed at once (until thaw);
        those open go on."""
        with self.lock:
            self.refusing, self.swallowing = True, False

    def thaw(self):
        """The end of freeze: the messages held go on, in order, and the
        connections taken meanwhile (a cancel request, say) are relayed
        now, as a partition that heals delivers what was sent into it."""
        with self.lock:
            self.frozen = self.swallowing = self.refusing = False
            held, self.held = self.held, []
            self.thawed.notify_all()
        for client in held:
            self._relay(client)

    def _hold(self):
        with self.lock:
            if not self.frozen:
                return
            self.stalled += 1
            while self.frozen:   # until thaw (for ever without: the thread is a daemon)
                self.thawed.wait()

    def close(self):
        self.closed = True
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.frozen or self.swallowing:   # taken, not answered until thaw (a cancel request, say)
                    self.swallowed += self.swallowing
                    self.held.append(client)
                    continue
                if self.refusing:
                    self.refused += 1
                    client.close()
                    continue
                delay = self.accept_delay
            if delay:
                threading.Timer(delay, self._relay, (client,)).start()
            else:
                self._relay(client)

    def _relay(self, client):
        server = socket.socket(socket.AF_UNIX)
        try:
            server.connect(self.target)
        except OSError:
            client.close()
            return
        c = _Conn(client, server)
        self.connections = getattr(self, "connections", 0) + 1
        c.n = self.connections
        threading.Thread(target=self._frontend, args=(c,), daemon=True).start()
        threading.Thread(target=self._backend, args=(c,), daemon=True).start()

    @staticmethod
    def _close(c):
        for s in (c.client, c.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _frontend(self, c):
        try:
            (length,) = struct.unpack("!I", _exact(c.client, 4))
            c.server.sendall(struct.pack("!I", length) + _exact(c.client, length - 4))
            while True:
                kind, msg = _message(c.client)
                self._hold()
                body = msg[5:]
                delay = 0
                unsent = None
                with self.lock:
                    if kind == b"B":   # Bind: portal name, statement name, ...
                        stmt = body.split(b"\0", 2)[1].decode()
                        if not stmt:   # the unnamed statement: its text
                            stmt = c.unnamed
                        c.binds.append(self.statement is not None and (
                            self.statement(stmt) if callable(self.statement) else stmt == self.statement))
                        if self.auto_pred is not None and self.auto_pred(stmt):
                            c.auto = True
                            self.auto_pred = None
                    elif kind == b"P":
                        name, text = [x.decode(errors="replace") for x in body.split(b"\0", 2)[:2]]
                        if not name:
                            c.unnamed = text
                    if self.rows_pred is not None and kind in (b"P", b"B") and not c.auto:
                        t = text if kind == b"P" else stmt
                        if self.rows_pred(t):
                            c.buffering = True
                    if kind == b"P" and self.auto_pred is not None:
                        if self.auto_pred(text):
                            c.auto = True
                            self.auto_pred = None
                    elif kind == b"Q":
                        text = body.rstrip(b"\0").decode(errors="replace").strip().upper()
                        if self.auto_pred is not None and self.auto_pred(body.rstrip(b"\0").decode(errors="replace")):
                            c.auto = True
                            self.auto_pred = None
                        if text == "COMMIT" and self.commit_delay:
                            self.delayed_commits += 1
                            delay = self.commit_delay
                        if text == "COMMIT" and c.rows and self.statement is not None:
                            c.cut = self.unsent is None
                            if self.unsent:   # cut_commit_unsent: the COMMIT goes nowhere
                                unsent, self.unsent = self.unsent, None
                                self.cuts += 1
                                if unsent == "hold":
                                    self.kept = getattr(self, "kept", []) + [c.server]
                            self.statement = None
                        elif text.startswith("BEGIN"):
                            c.rows = 0
                    if self.recording is not None and kind in (b"B", b"Q", b"S"):
                        self.recording.append((c.n, kind.decode(), stmt if kind == b"B" else
                                               body.rstrip(b"\0").decode(errors="replace") if kind == b"Q" else ""))
                if unsent:
                    for side in (c.client,) if unsent == "hold" else (c.client, c.server):
                        try:
                            side.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        side.close()
                    return
                if delay:
                    time.sleep(delay)
                c.server.sendall(msg)
        except (EOFError, OSError):
            self._close(c)

    def _backend(self, c):
        try:
            while True:
                kind, msg = _message(c.server)
                self._hold()
                with self.lock:
                    if kind == b"2" and c.binds:   # BindComplete, in the order of the Binds
                        c.counting = c.binds.pop(0)
                    elif c.counting and kind == b"D":
                        c.rows += 1
                    elif c.counting and kind in (b"C", b"E"):
                        if kind == b"C" and self.on_complete:
                            c.rows += 1
                        c.counting = False
                    if kind == b"E":   # the pipeline's rest is skipped until its Sync
                        c.binds.clear()
                    cut = c.cut or c.auto
                    held = None
                    if not cut and c.buffering:
                        c.buf.append(msg)
                        c.buf_rows += kind == b"D"
                        if kind == b"Z":
                            if c.buf_rows and self.rows_pred is not None:
                                self.rows_pred = None
                                self.cuts += 1
                                c.buffering = False
                                held = "cut"
                            else:
                                held = c.buf
                            c.buf, c.buf_rows, c.buffering = [], 0, False
                        else:
                            held = "wait"
                if held == "cut":
                    self._close(c)
                    return
                if held == "wait":
                    continue
                if held is not None:
                    for m in held:
                        c.client.sendall(m)
                    continue
                if cut:
                    if kind == b"Z":   # the COMMIT ran; its answer goes nowhere
                        with self.lock:
                            self.cuts += 1
                        self._close(c)
                        return
                    continue
                c.client.sendall(msg)
        except (EOFError, OSError):
            self._close(c)


def stop_while_connects_swallowed(px, d, pg, db_url, where="application_name = 'causewayd'", settle=1.0):
    """The daemon d (connected through px) has the backends that match where
    cut while px swallows new connections, so that its threads connect
    anew into the void; once they are at it (settle seconds after the
    first connect swallowed), d is stopped: the time it
    took (asserted under 3 s: no thread's connect may hold the stop for its
    connect_timeout, 5 s)."""
    from harness import wait_until
    px.swallow()
    s0 = px.swallowed
    cut = pg.psql(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {where}", db_url)
    assert int(cut) >= 1, cut
    wait_until(lambda: px.swallowed > s0, what="a connect, swallowed")
    time.sleep(settle)  # the others' too
    t0 = time.time()
    assert d.stop() == 0
    took = time.time() - t0
    px.thaw()
    assert took < 3, took
    return took
