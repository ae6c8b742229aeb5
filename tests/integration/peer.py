"""A peer provider for the tests, written independently of the C code: an
RFC 9421 (Ed25519) signer and verifier, an API client, and a notify server
that verifies Causeway's signatures and deduplicates events by id."""
import base64
import hashlib
import http.server
import json
import os
import socket
import threading
import time
import types

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

TAG = "causeway-interop"


def content_digest(body):
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


def signature_base(method, url, fields, components, params):
    lines = []
    for c in components:
        if c == "@method":
            v = method
        elif c == "@target-uri":
            v = url
        else:
            v = fields[c]
        lines.append(f'"{c}": {v}')
    lines.append(f'"@signature-params": {params}')
    return "\n".join(lines).encode()


def serialize_params(components, created, keyid, nonce, tag):
    inner = "(" + " ".join(f'"{c}"' for c in components) + ")"
    return f'{inner};created={created};keyid="{keyid}";nonce="{nonce}";tag="{tag}"'


class Signer:
    def __init__(self, keyid, key=None, tag=TAG):
        self.key = key or Ed25519PrivateKey.generate()
        self.keyid = keyid
        self.tag = tag

    @property
    def public_b64(self):
        return base64.b64encode(self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()

    def headers(self, method, url, body=None, idem=None, created=None, nonce=None, tag=None,
                content_type="application/json", components=None):
        fields = {}
        if body is not None:
            fields["content-type"] = content_type
            fields["content-digest"] = content_digest(body)
        if idem is not None:
            fields["idempotency-key"] = idem
        if components is None:
            components = ["@method", "@target-uri"] + [c for c in ("content-digest", "content-type",
                                                                   "idempotency-key") if c in fields]
        params = serialize_params(components, int(created if created is not None else time.time()),
                                  self.keyid, nonce or base64.urlsafe_b64encode(os.urandom(12)).decode(),
                                  tag or self.tag)
        sig = self.key.sign(signature_base(method, url, fields, components, params))
        h = {"Signature-Input": "sig1=" + params,
             "Signature": "sig1=:" + base64.b64encode(sig).decode() + ":"}
        if body is not None:
            h["Content-Type"] = content_type
            h["Content-Digest"] = fields["content-digest"]
        if idem is not None:
            h["Idempotency-Key"] = idem
        return h


def verify(method, url, headers, body, public_b64, tag=TAG, max_skew=300):
    """Verifies a request Causeway signed; raises AssertionError saying why."""
    si = headers.get("Signature-Input")
    sg = headers.get("Signature")
    assert si and sg, "unsigned request"
    assert si.startswith("sig1=(") and sg.startswith("sig1=:") and sg.endswith(":"), (si, sg)
    params = si[len("sig1="):]
    inner, _, rest = params[1:].partition(")")
    components = [c.strip('"') for c in inner.split(" ") if c]
    p = dict(kv.split("=", 1) for kv in rest.strip(";").split(";"))
    assert p["tag"] == f'"{tag}"', p
    assert abs(int(p["created"]) - time.time()) <= max_skew
    assert {"@method", "@target-uri", "content-digest", "content-type"} <= set(components), components
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["content-digest"] == content_digest(body), "digest mismatch"
    fields = {c: lower[c] for c in components if not c.startswith("@")}
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64))
    key.verify(base64.b64decode(sg[len("sig1=:"):-1]), signature_base(method, url, fields, components, params))
    return p


class NotifyServer:
    """POST /v1/notify: verifies, records in order, deduplicates by event id."""

    def __init__(self, host="127.0.0.1"):
        self.events = []          # unique events in arrival order
        self.seen = set()         # their ids
        self.requests = 0
        self.duplicates = 0
        self.fail_next = 0        # answer 503 to that many requests
        self.answer_body = b""    # the body of every answer
        self.delay = 0.0          # seconds to wait before answering (outside the lock)
        self.script = []          # (status, Retry-After seconds or None): the next answers, in order
        self.answers = []         # (time the request came, status answered), in order
        self.errors = []
        self.public_b64 = None    # Causeway's key, from its directory
        self.target_base = None   # the URL this peer is reached at, for @target-uri (None: http://127.0.0.1:port)
        self.refuse = None        # a predicate on an event: a request with one it holds is answered 400
        self.refused = 0          # requests answered so
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *a):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if len(body) < length:
                    # the sender went away before its body was in (a
                    # process killed mid-request): nothing to answer, as a
                    # real peer's server drops an incomplete request
                    self.close_connection = True
                    return
                got = outer.handle(self.command, self.path, dict(self.headers), body, self.server.server_address[1])
                # (status, Retry-After), or a status alone (a subclass's handle)
                status, retry_after = got if isinstance(got, tuple) else (got, None)
                if outer.delay:
                    time.sleep(outer.delay)
                answer = outer.answer_body
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("Retry-After", str(retry_after))
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                try:
                    self.wfile.write(answer)
                except OSError:  # the daemon stopped reading (a cut-off answer)
                    pass

        server = http.server.ThreadingHTTPServer
        if ":" in host:  # an IPv6 address, such as "::1"
            server = type("V6Server", (server,), {"address_family": socket.AF_INET6})
        self.httpd = server((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        # serve_forever looks for a shutdown() every poll_interval: at its
        # default, 0.5 s, close() waited 0.25 s on average, twice in the
        # teardown of every test with push_peers' two servers
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def handle(self, method, path, headers, body, port, answer=None):
        """The status to answer, and the Retry-After header's value (None: none);
        answer(came): both, from the time the request came, instead of the script's
        or the server's own."""
        with self.lock:
            came = time.time()
            if answer or self.script:
                self.requests += 1
                status, retry_after = answer(came) if answer else self.script.pop(0)
            else:
                status, retry_after = self._handle(method, path, headers, body, port), None
            self.answers.append((came, status))
            return status, retry_after

    def _handle(self, method, path, headers, body, port):  # under self.lock
        self.requests += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            return 503
        if path != "/v1/notify":
            self.errors.append(f"unexpected path {path}")
            return 404
        try:
            verify(method, (self.target_base or f"http://127.0.0.1:{port}") + path, headers, body, self.public_b64)
        except Exception as ex:  # record, and refuse as a real peer would
            self.errors.append(f"signature: {ex!r}")
            return 401
        if self.refuse and any(self.refuse(ev) for ev in json.loads(body)["events"]):
            self.refused += 1
            return 400
        for ev in json.loads(body)["events"]:
            if ev["id"] in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(ev["id"])
                self.events.append(ev)
        self.cond.notify_all()
        return 200

    def hold(self, pick=None, count=None, bound=60.0, answer=None):
        """Holds the requests pick(events) picks (the request's events; None: every
        request), the first count of them (None: until released): each is handled as
        it comes (counted, its events recorded, its answer decided: answer(came), as
        in handle, or the server's own), then answered once release() is called or
        bound seconds passed (0: at once).  Whether a request is held, and what it
        carried noted, is one decision taken before it is handled: none is held
        unnoted, and none after the release.  Returns the hold: came (an Event set
        once the first held request was handled), answered (one set once a held
        request's answer was let go, by the release or the bound), carried() (the
        ids of the held requests' events), release() (answers those held, holds no
        more, and gives the server back its handler, as reaching count does)."""
        handle = self.handle
        mu = threading.Lock()
        ids = []
        held = types.SimpleNamespace(came=threading.Event(), n=0, done=threading.Event(),
                                     answered=threading.Event())

        def restore():  # under mu
            if self.__dict__.get("handle") is holding:
                self.handle = handle

        def holding(method, path, headers, body, port):
            try:
                events = json.loads(body).get("events", [])
            except (ValueError, AttributeError):
                events = []
            with mu:
                take = not held.done.is_set() and held.n != count and (pick is None or pick(events))
                if take:
                    held.n += 1
                    ids.extend(ev.get("id") for ev in events)
                    if held.n == count:
                        restore()
            if not take:
                return handle(method, path, headers, body, port)
            got = handle(method, path, headers, body, port, answer) if answer else handle(
                method, path, headers, body, port)
            held.came.set()
            held.done.wait(bound)
            held.answered.set()
            return got

        def carried():
            with mu:
                return list(ids)

        def release():
            with mu:
                held.done.set()
                restore()
        held.carried, held.release = carried, release
        self.handle = holding
        return held

    def wait_events(self, n, timeout=20):
        deadline = time.time() + timeout
        with self.cond:
            while len(self.events) < n:
                left = deadline - time.time()
                assert left > 0, f"{len(self.events)} of {n} events arrived; errors: {self.errors}"
                self.cond.wait(left)
            return list(self.events)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class PeerClient:
    """A peer's calls to Causeway's neutral API."""

    def __init__(self, base_url, name, domain, token=None, signer=None):
        self.base = base_url
        self.name = name
        self.domain = domain
        self.token = token
        self.signer = signer or Signer(name)

    def user(self, local):
        return f"mimi://{self.domain}/u/{local}"

    def call(self, method, path, body=None, idem=None, raw=None, headers=None, sign=True, token=None, **kw):
        url = self.base + path
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Authorization": "Bearer " + (token or self.token)}
        if sign:
            h.update(self.signer.headers(method, url, data, idem=idem, **kw))
        elif data is not None:
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        return requests.request(method, url, data=data, headers=h, timeout=10)

    def create_room(self, members, kind=None, idem=None, name=None):
        body = {"kind": kind or ("direct" if len(members) == 2 else "group"), "members": members}
        if name is not None:
            body["name"] = name
        return self.call("POST", "/v1/rooms", body, idem=idem)

    def assert_direct_room_of(self, room_id, members):
        """room_id is a direct room whose members are exactly members."""
        room = self.call("GET", f"/v1/rooms/{room_id}").json()
        assert room["kind"] == "direct", room
        assert sorted(m["user"] if isinstance(m, dict) else m for m in room["members"]) == sorted(members), room

    def send(self, room, sender, text, idem=None, **extra):
        body = {"type": "message", "sender": sender, "content": {"parts": [{"type": "text/plain", "body": text}]}}
        body.update(extra)
        return self.call("POST", f"/v1/rooms/{room}/messages", body,
                         idem=idem or base64.urlsafe_b64encode(os.urandom(9)).decode())


GK_TG = (("gk", "wa.example"), ("tg", "tg.example"))


def push_peers(daemon, specs=GK_TG):
    """Registers each (name, domain) as a push peer of the daemon, each with
    a notify server of its own: [(client, server), ...] in that order (the
    caller closes the servers)."""
    key = daemon.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    made = []
    for name, domain in specs:
        srv = NotifyServer()
        srv.public_b64 = key
        client = PeerClient(daemon.url, name, domain)
        r = daemon.admin("POST", "/peers", json={"name": name, "domain": domain, "mode": "push",
                                                 "push_url": srv.url, "public_key": client.signer.public_b64})
        assert r.status_code == 201, r.text
        client.token = r.json()["token"]
        made.append((client, srv))
    return made


def verify_get(method, url, headers, public_b64, tag=TAG, max_skew=300):
    """Verifies Causeway's signature of a request without a body (@method and
    @target-uri); raises AssertionError or InvalidSignature saying why."""
    si, sg = headers.get("Signature-Input"), headers.get("Signature")
    assert si and sg, "unsigned request"
    params = si[len("sig1="):]
    inner, _, rest = params[1:].partition(")")
    components = [c.strip('"') for c in inner.split(" ") if c]
    p = dict(kv.split("=", 1) for kv in rest.strip(";").split(";"))
    assert p["tag"] == f'"{tag}"' and abs(int(p["created"]) - time.time()) <= max_skew, p
    assert components == ["@method", "@target-uri"], components
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64))
    key.verify(base64.b64decode(sg[len("sig1=:"):-1]), signature_base(method, url, {}, components, params))


class MediaServer:
    """Where a peer keeps its users' files: HTTPS on 127.0.0.1 with a
    certificate of its own (cert_file, for the daemon's server.ca_file),
    for 127.0.0.1 and for each of hosts, names under "localhost" (which
    libcurl resolves to loopback by itself: a peer of domain wa.localhost
    keeps its files at media.wa.localhost); files[path] = (content type,
    bytes); status[path] = an answer instead; redirect[path] = a URL
    answered with a 302, with redirect_body[path] as its body (none when
    not given; a web server's redirect has a short page, as nginx's 154
    bytes); raw[path] = (status, headers, body) answered as it is (a 206
    part, a 204, a 3xx without Location); requests: (path, headers) in
    order."""

    def __init__(self, directory, hosts=()):
        import ssl
        from harness import self_signed_ca

        self.cert_file, key_file = self_signed_ca(directory, "peer media store test CA", hosts, ["127.0.0.1"])
        self.files, self.status, self.redirect, self.requests = {}, {}, {}, []
        self.redirect_body = {}
        self.raw = {}
        self.delay = {}  # path -> seconds before the answer
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append((self.path, dict(self.headers)))
                if self.path in outer.delay:
                    time.sleep(outer.delay[self.path])
                if self.path in outer.redirect:
                    self.send_response(302)
                    page = outer.redirect_body.get(self.path, b"")
                    self.send_header("Location", outer.redirect[self.path])
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                if self.path in outer.raw:
                    status, headers, body = outer.raw[self.path]
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    if status not in (204, 304):
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if status not in (204, 304):
                        self.wfile.write(body)
                    return
                status = outer.status.get(self.path)
                found = outer.files.get(self.path)
                if status is None and found is None:
                    status = 404
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                ctype, data = found
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, key_file)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def put(self, path, ctype, data, host=None):
        """The file's URL: at 127.0.0.1, or at host (one of hosts)."""
        self.files[path] = (ctype, data)
        return (f"https://{host}:{self.port}" if host else self.url) + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
