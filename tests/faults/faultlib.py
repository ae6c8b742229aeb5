"""Pieces of the fault suite (tests/faults/run): a restartable, verifying,
deduplicating peer sink; a way to stop an in-process HTTP server abruptly
(listening socket and open connections) and start it again on the same port;
the submitters that keep load on the peer API; and the audit.

Everything here is test code, written against the integration harness
(tests/integration: harness.py, peer.py, homeserver.py, prosody.py), which it
uses unchanged."""
import http.server
import json
import os
import random
import socket
import sys
import threading
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from peer import verify  # noqa: E402

T0 = time.time()


def say(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- abrupt HTTP servers
class AbruptServer:
    """Wraps a ThreadingHTTPServer so that it can be killed as a crashing
    process would be: the listening socket and every open connection are shut
    down at once (a request being handled loses its answer), then started
    again on the same port with the same handler."""

    def __init__(self, httpd):
        self.handler = httpd.RequestHandlerClass
        self.server_class = type(httpd)  # the stand-in's own (its listen backlog: homeserver.py's _Server)
        self.port = httpd.server_address[1]
        self.conns = set()
        self.lock = threading.Lock()
        self.httpd = None
        self._adopt(httpd)

    def _adopt(self, httpd):
        orig_process, orig_shutdown = httpd.process_request, httpd.shutdown_request

        def process_request(request, client_address):
            with self.lock:
                self.conns.add(request)
            orig_process(request, client_address)

        def shutdown_request(request):
            with self.lock:
                self.conns.discard(request)
            orig_shutdown(request)

        httpd.process_request = process_request
        httpd.shutdown_request = shutdown_request
        httpd.handle_error = lambda request, client_address: None  # a killed connection is expected here
        self.httpd = httpd

    @property
    def running(self):
        return self.httpd is not None

    def kill(self):
        """Stops serving: no more accepts, open connections reset."""
        httpd, self.httpd = self.httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self.lock:
            conns = list(self.conns)
            self.conns.clear()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def start(self):
        """Serves again on the same port, in a thread of its own; returns the new server."""
        deadline = time.time() + 10
        while True:
            try:
                httpd = self.server_class(("127.0.0.1", self.port), self.handler)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        httpd.daemon_threads = True
        self._adopt(httpd)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return httpd


# --------------------------------------------------------------------------- the peer sink
class PeerSink:
    """POST /v1/notify of the destination peer: verifies Causeway's signature,
    deduplicates by event id, keeps the first arrival of each event (time,
    room, id) in order. Can be killed and started again on the same port; what
    it has seen survives."""

    def __init__(self):
        self.lock = threading.Lock()
        self.arrivals = []        # (time, room_id, event id) of first arrivals, in order
        self.seen = set()
        self.duplicates = 0       # events that arrived again (absorbed here)
        self.requests = 0
        self.errors = []          # signature or body problems (must stay empty)
        self.public_b64 = None
        self.delay = 0.0          # answer latency (a remote peer's), after the events are recorded
        self.drop_answers = False # record the events, then close the connection without answering
        self.dropped = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = outer.handle(self.command, self.path, dict(self.headers), body,
                                      self.server.server_address[1])
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self.server = AbruptServer(httpd)
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle(self, method, path, headers, body, port):
        if path != "/v1/notify":
            with self.lock:
                self.errors.append(f"unexpected path {path}")
            return 404
        try:
            verify(method, f"http://127.0.0.1:{port}{path}", headers, body, self.public_b64)
            events = json.loads(body)["events"]
        except Exception as ex:  # a real peer refuses; the audit reports it
            with self.lock:
                self.errors.append(f"{type(ex).__name__}: {ex}")
            return 401
        now = time.time()
        with self.lock:
            self.requests += 1
            for ev in events:
                if ev["id"] in self.seen:
                    self.duplicates += 1
                else:
                    self.seen.add(ev["id"])
                    self.arrivals.append((now, ev.get("room_id"), ev["id"]))
            drop = self.drop_answers
            if drop:
                self.dropped += 1
        if self.delay:
            time.sleep(self.delay)
        if drop:   # as if the peer crashed after storing them: the daemon never learns they arrived
            raise ConnectionAbortedError("answer dropped on purpose")
        return 200

    def kill(self):
        self.server.kill()

    def start(self):
        self.server.start()

    def close(self):
        self.server.kill()

    def count(self):
        with self.lock:
            return len(self.arrivals)

    def first_arrival_after(self, t):
        """Time of the first new event that arrived at or after t (None: none yet)."""
        with self.lock:
            return next((ts for ts, _, _ in self.arrivals if ts >= t), None)

    def delivered(self):
        """{room_id: [event ids in order of first arrival]}."""
        out = {}
        with self.lock:
            for _, room, eid in self.arrivals:
                out.setdefault(room, []).append(eid)
        return out


# --------------------------------------------------------------------------- load
RETRYABLE = (409, 429, 503)


class Submitter(threading.Thread):
    """Keeps steady load on the peer API from one peer: either signed batches
    (POST /v1/batch, `batch` events over its rooms in turn) or single messages
    (POST /v1/rooms/{room}/messages with an Idempotency-Key). Every event is
    retried with the same key and the same body until it is accepted, as a
    real peer would; the next one waits (so the order of acceptance per room
    is the order of submission). Retries come after 0.1-0.2 s, not after
    Retry-After, so that the time to recover measures the daemon, not the
    client.

    Records, per room, the ids in the order they were accepted, the key of
    each id, and every answer (time sent, time answered, status, Retry-After
    present, events accepted)."""

    def __init__(self, base_url, peer_name, token, signer, sender, rooms, tag, mode="batch", rate=100.0,
                 batch=20, allowed=(200, 202, 409, 503), timeout=10.0):
        super().__init__(daemon=True, name=f"submit-{tag}")
        self.base = base_url
        self.peer_name = peer_name
        self.token = token
        self.signer = signer
        self.senders = sender if isinstance(sender, list) else [sender] * len(rooms)
        self.rooms = rooms                  # [{"id": r_..., "uri": mimi://...}]
        self.tag = tag
        self.mode = mode
        self.rate = rate
        self.batch = batch
        self.allowed = set(allowed)
        self.timeout = timeout
        self.lock = threading.Lock()
        self.accepted = {r["id"]: [] for r in rooms}
        self.key_of = {}                    # msg id -> idempotency key
        self.id_of = {}                     # key -> msg id
        self.answers = []                   # (t_sent, t_done, status or 'conn', retry_after, n_accepted)
        self.bad = []                       # answers outside `allowed` (with their text)
        self.refused = []                   # items refused for good (4xx other than 409/429)
        self.abandoned = []                 # keys still not accepted when the run ended
        self.stop_ev = threading.Event()
        self.hard_stop = None               # time after which retries are abandoned
        self.session = None

    # -- helpers
    def _headers(self, url, data, idem=None):
        h = {"Authorization": "Bearer " + self.token}
        h.update(self.signer.headers("POST", url, data, idem=idem))
        return h

    def _record(self, t_sent, status, ra, n, text=None):
        with self.lock:
            self.answers.append((t_sent, time.time(), status, ra, n))
            if status not in self.allowed and status != "conn":
                self.bad.append((t_sent, status, (text or "")[:300]))

    def _accept(self, room_id, mid, key):
        with self.lock:
            if key in self.id_of:   # an answer replayed for a key already counted (must be the same id)
                if self.id_of[key] != mid:
                    self.bad.append((time.time(), "idempotency", f"key {key}: {self.id_of[key]} then {mid}"))
                return
            self.accepted[room_id].append(mid)
            self.key_of[mid] = key
            self.id_of[key] = mid

    def _giving_up(self):
        return self.hard_stop is not None and time.time() > self.hard_stop

    def _pause(self):
        time.sleep(0.1 + random.random() * 0.1)

    def _post(self, url, data, idem=None):
        t = time.time()
        try:
            r = self.session.post(url, data=data, headers=self._headers(url, data, idem), timeout=self.timeout)
        except requests.RequestException:
            self.session.close()
            self.session = requests.Session()
            self._record(t, "conn", False, 0)
            return t, None
        return t, r

    # -- the two kinds of load
    def _item(self, r, seq):
        key = f"{self.tag}.{r}.{seq}"
        return r, key, {"type": "message", "sender": self.senders[r],
                        "content": {"parts": [{"type": "text/plain", "body": f"fault {key}"}]}}

    def _send_batch(self, items):
        url = self.base + "/v1/batch"
        todo = list(items)
        while todo:
            if self._giving_up():
                self.abandoned += [k for _, k, _ in todo]
                return
            data = json.dumps({"events": [{"idempotency_key": k, "room": self.rooms[r]["uri"], "event": ev}
                                          for r, k, ev in todo]}).encode()
            t, resp = self._post(url, data)
            if resp is None:
                self._pause()
                continue
            ra = "Retry-After" in resp.headers
            if resp.status_code != 200:
                self._record(t, resp.status_code, ra, 0, resp.text)
                self._pause()
                continue
            results = resp.json()["results"]
            again, n = [], 0
            for (r, k, ev), res in zip(todo, results):
                if res.get("status") == "accepted":
                    self._accept(self.rooms[r]["id"], res["id"], k)
                    n += 1
                elif res.get("http_status") in RETRYABLE:
                    again.append((r, k, ev))
                else:
                    with self.lock:
                        self.refused.append((k, res))
            self._record(t, 200, ra, n)
            todo = again
            if todo:
                self._pause()

    def _send_one(self, item):
        r, key, ev = item
        url = f"{self.base}/v1/rooms/{self.rooms[r]['id']}/messages"
        data = json.dumps(ev).encode()
        while True:
            if self._giving_up():
                self.abandoned.append(key)
                return
            t, resp = self._post(url, data, idem=key)
            if resp is None:
                self._pause()
                continue
            ra = "Retry-After" in resp.headers
            if resp.status_code == 202:
                self._accept(self.rooms[r]["id"], resp.json()["id"], key)
                self._record(t, 202, ra, 1)
                return
            self._record(t, resp.status_code, ra, 0, resp.text)
            if resp.status_code < 500 and resp.status_code not in RETRYABLE:
                with self.lock:
                    self.refused.append((key, resp.text[:300]))
                return
            self._pause()

    def run(self):
        self.session = requests.Session()
        seq = [0] * len(self.rooms)
        per = self.batch if self.mode == "batch" else 1
        interval = per / self.rate
        due = time.monotonic()
        i = 0
        while not self.stop_ev.is_set():
            items = []
            for _ in range(per):
                r = i % len(self.rooms)
                items.append(self._item(r, seq[r]))
                seq[r] += 1
                i += 1
            if self.mode == "batch":
                self._send_batch(items)
            else:
                self._send_one(items[0])
            due += interval
            left = due - time.monotonic()
            if left > 0:
                self.stop_ev.wait(left)
            elif left < -2:      # fell behind (an outage): do not burst to catch up
                due = time.monotonic()
        self.session.close()

    def finish(self, grace=60):
        """Stops submitting; the event in hand is retried for up to `grace` seconds more."""
        self.hard_stop = time.time() + grace
        self.stop_ev.set()
        self.join(grace + 15)

    # -- views
    def total(self):
        with self.lock:
            return sum(len(v) for v in self.accepted.values())

    def first_accept_after(self, t):
        """Time of the first answer accepting something, for a request sent at or after t."""
        with self.lock:
            return min((done for sent, done, st, _, n in self.answers if sent >= t and n > 0), default=None)

    def answers_between(self, t0, t1):
        with self.lock:
            return [a for a in self.answers if a[0] >= t0 and a[1] <= t1]


def merge_accepted(subs):
    out = {}
    key_of = {}
    for s in subs:
        with s.lock:
            for room, ids in s.accepted.items():
                out.setdefault(room, []).extend(ids)
            key_of.update(s.key_of)
    return out, key_of


# --------------------------------------------------------------------------- audit
def audit(accepted, delivered):
    """accepted, delivered: {room: [ids in order]} (delivered: first occurrences).
    Returns accepted, delivered (of the accepted), lost, unexpected and out_of_order
    (events delivered after one that was accepted later in the same room)."""
    acc_index = {}
    for room, ids in accepted.items():
        for i, mid in enumerate(ids):
            acc_index[mid] = (room, i)
    n_acc = len(acc_index)
    got = set()
    unexpected = []
    out_of_order = 0
    wrong_room = 0
    for room, ids in delivered.items():
        high = -1
        for mid in ids:
            where = acc_index.get(mid)
            if where is None:
                unexpected.append(mid)
                continue
            got.add(mid)
            if where[0] != room:
                wrong_room += 1
                continue
            if where[1] < high:
                out_of_order += 1
            high = max(high, where[1])
    lost = sorted(set(acc_index) - got)
    return {"accepted": n_acc, "delivered": len(got), "lost": lost, "unexpected": unexpected,
            "out_of_order": out_of_order, "wrong_room": wrong_room}


class Result:
    """One scenario's figures and verdict."""

    def __init__(self, name):
        self.name = name
        self.rounds = 0
        self.accepted = 0
        self.delivered = 0
        self.duplicates = 0
        self.lost = 0
        self.out_of_order = 0
        self.recovery = []            # seconds, one per round
        self.failures = []
        self.notes = []
        self.seconds = 0.0

    def fail(self, why):
        say(f"  FAIL {self.name}: {why}")
        self.failures.append(why)

    def check(self, cond, why):
        if not cond:
            self.fail(why)
        return cond

    def note(self, what):
        say(f"  {what}")
        self.notes.append(what)

    @property
    def passed(self):
        return not self.failures

    def take_audit(self, a, duplicates):
        self.accepted = a["accepted"]
        self.delivered = a["delivered"]
        self.lost = len(a["lost"])
        self.out_of_order = a["out_of_order"]
        self.duplicates = duplicates
        if a["lost"]:
            self.fail(f"{len(a['lost'])} accepted event(s) never delivered, e.g. {a['lost'][:5]}")
        if a["unexpected"]:
            self.fail(f"{len(a['unexpected'])} delivered event(s) that were never accepted, e.g. "
                      f"{a['unexpected'][:5]}")
        if a["out_of_order"]:
            self.fail(f"{a['out_of_order']} event(s) delivered out of per-room order")
        if a["wrong_room"]:
            self.fail(f"{a['wrong_room']} event(s) delivered into the wrong room")


def check_answers(res, subs, allowed_bad=(), conn_ok=False):
    """Every answer was an allowed status; every 503 carried Retry-After; no
    item refused for good; nothing abandoned; unless conn_ok (the daemon was
    killed), every request got an answer (no refused connection, no timeout)."""
    n503 = n503_no_ra = conn = 0
    statuses = {}
    for s in subs:
        with s.lock:
            for _, _, st, ra, _ in s.answers:
                statuses[st] = statuses.get(st, 0) + 1
                if st == 503:
                    n503 += 1
                    n503_no_ra += 0 if ra else 1
                if st == "conn":
                    conn += 1
            bad = [b for b in s.bad if b[1] not in allowed_bad]
            if bad:
                res.fail(f"{s.tag}: {len(bad)} answer(s) outside {sorted(s.allowed)}: "
                         + "; ".join(f"{st} {txt}" for _, st, txt in bad[:3]))
            if s.refused:
                res.fail(f"{s.tag}: {len(s.refused)} event(s) refused for good, e.g. {s.refused[:2]}")
            if s.abandoned:
                res.fail(f"{s.tag}: {len(s.abandoned)} event(s) still not accepted at the end "
                         f"(retried for a minute), e.g. {s.abandoned[:3]}")
    res.check(n503_no_ra == 0, f"{n503_no_ra} of {n503} 503 answers without Retry-After")
    res.check(conn_ok or conn == 0, f"{conn} request(s) got no answer (connection refused or reset, or a timeout)")
    res.note("answers: " + ", ".join(f"{k}={v}" for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))))
    return statuses


def fmt_s(x):
    return "-" if x is None else f"{x:.2f}"
