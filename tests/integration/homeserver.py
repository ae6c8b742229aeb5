"""A Matrix homeserver stand-in for the tests of the Matrix adapter: the subset
of the Client-Server API an application service uses, and the homeserver's
side of the Application Service API (transactions, user and alias queries,
ping), written from the Matrix specification and held to its strictest
reading (and to Synapse's or Conduit's behaviour where the specification
leaves a choice): nothing here is more lenient than a real homeserver.

    hs = Homeserver(server_name="example.org", registration={...})
    hs.start()
    ...
    hs.close()

The choices made where the specification allows several behaviours:

- An application service acts as a user of its namespace (?user_id=) or as
  its bot only once that user is registered (POST /register): 403 M_FORBIDDEN
  otherwise, as Conduit does for the bot too (Synapse exempts the bot;
  Homeserver(bot_exists=True) emulates that). A user outside its namespaces:
  403 M_FORBIDDEN, the code the specification documents for /whoami.
- Namespace regexes are matched as Synapse matches them, with re.match:
  anchored at the start only, so a registration's regex without a final
  `$` claims more than it seems to (until the thirtieth session the
  stand-in used re.fullmatch, and the gateway's unanchored regex went
  unnoticed); only local users count.
- Events are pushed when the sender is the bot or in the user namespace, when
  an m.room.member event's state_key is, when the room ID or one of its local
  aliases is in a namespace, or when the bot or a namespaced user is JOINED
  to the room (invited is not enough), as the registration schema and Synapse
  say.
- The transaction-ID memory of PUT /send and /redact is keyed, as Synapse's
  is, on the request path and the access token: for the application service
  that is its as_token alone, whatever ?user_id= says, so two ghosts reusing
  one txnId in the same room and event type get the first one's event.
- A transaction that failed is retried as it was (same txnId, same events,
  each event's unsigned.age as it is then) but without its ephemeral data, and ephemeral data arriving while the
  application service is failing is dropped: Synapse keeps neither. A 2xx
  answer whose body is not a JSON object counts as a failure.
- Before an invite of an unknown user in the namespace (or of the bot), the
  application service is asked GET /users/{userId}; on 200 the user must then
  exist (the application service MUST register it while answering): if not,
  or on any other answer, the invite fails with 404 M_NOT_FOUND. Joins and
  GET /directory/room of an unknown alias in the alias namespace likewise
  ask GET /rooms/{alias}.
- Every POST and PUT needs a JSON object body (M_NOT_JSON / M_BAD_JSON);
  in room versions 6 and later event content may not hold floats or
  integers beyond 2**53 (M_BAD_JSON), as Synapse's strict canonical JSON
  (versions 1 to 5 take any number: until the thirtieth session the
  stand-in refused them in every version); an event over 65536 bytes is
  refused with 413 M_TOO_LARGE.
- A redaction of an event the server does not have (or of another room)
  is taken, 200, and redacts nothing, as Synapse does (until the
  thirtieth session 404 M_NOT_FOUND here).
- Rate limits as Synapse's rc_message, when a test sets rc_message =
  (per_second, burst_count): a token bucket per sender for PUT /send,
  /redact and POST /createRoom (Synapse's RoomCreationHandler.create_room
  takes from the same limiter; a repeated txnId is answered from memory
  first, unlimited). The
  application service's users, its sender_localpart among them, are exempt
  when its registration says rate_limited: false, as in Synapse (until the
  thirtieth session the sender_localpart always was here). Over the limit:
  429 M_LIMIT_EXCEEDED with retry_after_ms, and the Retry-After header (in
  seconds, rounded up) that Matrix 1.10 asks servers to send as well.
- GET /rooms/{id}/members applies its membership and not_membership
  filters, as Synapse does; members_filters = False answers every member
  event whatever they ask, as Conduit does (its get_member_events_route
  ignores them: the specification makes them filters, not promises).
- GET /rooms/{id}/messages and /event/{id} give only what the room's
  history visibility lets the requester read, as Synapse's
  filter_events_for_client (a page of hidden events is empty, with its
  end token); until the thirty-sixth session every event was given.
- Only /v3 client paths (not r0); room version 10 by default (redactions
  carry a top-level `redacts`; version 11 rooms carry it in content too).
  PUT /redact takes its body as the event's content, whole, as Synapse
  does: in versions 1-10 a `redacts` there is mere content, free to name
  another event; in 11 one that names another event than the path's is
  400 M_INVALID_PARAM.
- An older homeserver (legacy_paths=True or token_in_query=True) does not
  have the ping endpoint (added in Matrix 1.7): 404 M_UNRECOGNIZED.
- The content repository: POST /_matrix/media/v3/upload takes the raw body
  with its Content-Type (required here) up to max_upload_size (413
  M_TOO_LARGE); downloads are authenticated (Matrix 1.11,
  GET /_matrix/client/v1/media/download/...), and the unauthenticated
  /_matrix/media/v3/download answers 404 M_NOT_FOUND for them, as Synapse
  does once authenticated media is enforced.  authenticated_media=False is a
  homeserver from before 1.11: the /client/v1 path is unknown (404
  M_UNRECOGNIZED) and the old path serves the file.  A file of another
  server (mxc://other.server/...) is served as a homeserver serves it
  after fetching it over federation: the test puts it in with
  remote_media(); one it has not is 404 M_NOT_FOUND.  A test may have a
  download answered as the specification lets a homeserver answer it
  instead (a RawBody with headers, or a MatrixError): 307/308 with a
  Location where the file is (a CDN), 502 M_TOO_LARGE (a file larger than
  it serves), 504 M_NOT_YET_UPLOADED, 429 M_LIMIT_EXCEEDED; and as a
  broken proxy might, 204, a 206 part, a 3xx without Location.
"""
import base64
import copy
import http.server
import json
import math
import os
import re
import threading
import time
import traceback
import urllib.parse

import requests

MAX_EVENTS_PER_TXN = 100
MAX_EPHEMERAL_PER_TXN = 100
MAX_PDU_BYTES = 65536
SUPPORTED_ROOM_VERSIONS = {str(v): "stable" for v in range(1, 12)}
DEFAULT_ROOM_VERSION = "10"
SPEC_VERSIONS = ["r0.0.1", "r0.1.0", "r0.2.0", "r0.3.0", "r0.4.0", "r0.5.0", "r0.6.0", "r0.6.1",
                 "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
                 "v1.11", "v1.12"]
LEGACY_SPEC_VERSIONS = SPEC_VERSIONS[:SPEC_VERSIONS.index("v1.4") + 1]

LOCALPART_RE = re.compile(r"[a-z0-9._=\-/+]+")
USER_ID_RE = re.compile(r"@([\x21-\x39\x3b-\x7e]+):([A-Za-z0-9.\-]+(?::[0-9]{1,5})?)")
ALIAS_RE = re.compile(r"#([^:\x00]+):([A-Za-z0-9.\-]+(?::[0-9]{1,5})?)")
MXC_RE = re.compile(r"mxc://[A-Za-z0-9.\-]+(?::[0-9]{1,5})?/[A-Za-z0-9_\-]+")
PROFILE_KEY_RE = re.compile(r"avatar_url|displayname|[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
RECEIPT_TYPES = ("m.read", "m.read.private", "m.fully_read")

DEFAULT_POWER_EVENTS = {"m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
                        "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
                        "m.room.server_acl": 100, "m.room.encryption": 100}

# What the redaction algorithm keeps of an event's content (room versions 1-10; 11 below).
REDACT_KEEP = {"m.room.member": ("membership", "join_authorised_via_users_server"),
               "m.room.create": ("creator",),
               "m.room.join_rules": ("join_rule", "allow"),
               "m.room.power_levels": ("ban", "events", "events_default", "kick", "redact", "state_default",
                                       "users", "users_default"),
               "m.room.history_visibility": ("history_visibility",)}
REDACT_KEEP_V11 = dict(REDACT_KEEP, **{"m.room.create": None,  # None: everything
                                      "m.room.power_levels": REDACT_KEEP["m.room.power_levels"] + ("invite",),
                                      "m.room.redaction": ("redacts",)})
PREJOIN_STATE = ("m.room.create", "m.room.join_rules", "m.room.canonical_alias", "m.room.avatar",
                 "m.room.encryption", "m.room.name", "m.room.topic")


LOST = object()  # _dispatch's answer when the reply is to be lost (lose_reply)


class RawBody:
    """A non-JSON answer (a file of the content repository).  headers: more
    of them (a redirect's Location, a 206's Content-Range); a 204's or a
    304's data is not sent (RFC 9110: they have no content)."""

    def __init__(self, data, content_type, disposition, headers=None):
        self.data, self.content_type, self.disposition = data, content_type, disposition
        self.headers = dict(headers or {})


def now_ms():
    return int(time.time() * 1000)


def _random(n):
    return base64.urlsafe_b64encode(os.urandom(n)).decode().rstrip("=")


class MatrixError(Exception):
    """An error answered as the specification's standard error response."""

    def __init__(self, http_status, errcode, error, **extra):
        super().__init__(f"{http_status} {errcode}: {error}")
        self.status = http_status
        self.errcode = errcode
        self.error = error
        self.extra = extra

    def body(self):
        return dict({"errcode": self.errcode, "error": self.error}, **self.extra)


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw):
    """A request body as JSON, refusing what a homeserver refuses (M_NOT_JSON)."""
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        raise MatrixError(400, "M_NOT_JSON", "Content not JSON.")


def strict_canonical(version):
    """Whether the room version enforces canonical JSON's numbers (Synapse's strict_canonicaljson):
    versions 6 and later; 1 to 5 take any JSON number."""
    return int(version) >= 6


def check_canonical(value, where="content", version=DEFAULT_ROOM_VERSION):
    """Room versions 6 and later allow only integers in [-(2**53)+1, 2**53-1]; earlier ones any number a
    JSON encoder can write back (1e400 reads as infinity, which Synapse's encoder refuses)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, float):
        if strict_canonical(version) or not math.isfinite(value):
            raise MatrixError(400, "M_BAD_JSON", f"Bad JSON value in {where}: float")
        return
    if isinstance(value, int):
        if strict_canonical(version) and not -(2 ** 53) + 1 <= value <= 2 ** 53 - 1:
            raise MatrixError(400, "M_BAD_JSON", f"Bad JSON value in {where}: integer out of range")
        return
    if isinstance(value, list):
        for v in value:
            check_canonical(v, where, version)
        return
    if isinstance(value, dict):
        for v in value.values():
            check_canonical(v, where, version)


def canonical_size(event):
    return len(json.dumps(event, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode())


def field(body, key, kind, required=False, default=None):
    """body[key] checked for its JSON type: M_MISSING_PARAM when absent and required, M_BAD_JSON when of
    the wrong type. kind: str, bool, int, dict, list."""
    if key not in body:
        if required:
            raise MatrixError(400, "M_MISSING_PARAM", f"Missing parameter: {key}")
        return default
    v = body[key]
    ok = {str: isinstance(v, str), bool: isinstance(v, bool),
          int: isinstance(v, int) and not isinstance(v, bool),
          dict: isinstance(v, dict), list: isinstance(v, list)}[kind]
    if not ok:
        raise MatrixError(400, "M_BAD_JSON", f"'{key}' must be of type {kind.__name__}")
    return v


class Requester:
    def __init__(self, user_id, token, is_as):
        self.user_id = user_id
        self.token = token
        self.is_as = is_as


class Room:
    def __init__(self, room_id, version, creator):
        self.room_id = room_id
        self.version = version
        self.creator = creator
        self.timeline = []          # events in order (the stored, possibly redacted, copies)
        self.state = {}             # (type, state_key) -> event
        self.aliases = set()        # local aliases pointing here
        self.receipts = {}          # (user, receipt type) -> timeline index
        self.typing = {}            # user -> generation of its timer

    def membership(self, user_id):
        ev = self.state.get(("m.room.member", user_id))
        return ev["content"].get("membership") if ev else None

    def members(self, membership=None):
        return {k: ev["content"].get("membership") for (t, k), ev in self.state.items()
                if t == "m.room.member" and (membership is None or ev["content"].get("membership") == membership)}

    def power_levels(self):
        ev = self.state.get(("m.room.power_levels", ""))
        return ev["content"] if ev else {}

    def user_level(self, user_id):
        pl = self.power_levels()
        if not pl:
            return 100 if user_id == self.creator else 0
        return int(pl.get("users", {}).get(user_id, pl.get("users_default", 0)))

    def needed(self, what, default):
        return int(self.power_levels().get(what, default))

    def event_level(self, etype, is_state):
        pl = self.power_levels()
        if etype in pl.get("events", {}):
            return int(pl["events"][etype])
        return int(pl.get("state_default", 50) if is_state else pl.get("events_default", 0))

    def join_rule(self):
        ev = self.state.get(("m.room.join_rules", ""))
        return ev["content"].get("join_rule") if ev else "invite"


class _Server(http.server.ThreadingHTTPServer):
    """socketserver's listen backlog is 5: until the sixtieth session 64 clients connecting at once (the
    delivery's rooms in flight, each on a connection of its own) overflowed it, the connections dropped
    were tried again by the kernel after 1 s, 3 s, ..., and the stand-in answered 100 sends/s where it
    answers 2,000 (docs/performance.md, "Sixtieth session").  A homeserver's is larger (Synapse listens
    with Twisted's default of 50, a reverse proxy before it with 511), and the kernel bounds it by
    net.core.somaxconn."""
    request_queue_size = 128


class Homeserver:
    """The stand-in. registration is the appservice registration as a dict; it is kept by reference, so a
    test may change it (its url, say) while the server runs."""

    def __init__(self, server_name="example.org", registration=None, legacy_paths=False, token_in_query=False,
                 unstable_ephemeral=False, retry_base=0.05, retry_max=2.0, push_timeout=10.0, query_timeout=5.0,
                 ping_timeout=5.0, bot_exists=False, ping_supported=None, authenticated_media=True,
                 max_upload_size=50 * 1024 * 1024):
        self.server_name = server_name
        self.authenticated_media = authenticated_media
        self.max_upload_size = max_upload_size
        self._media = {}            # media id -> {"content_type", "data", "filename", "user"}
        self._remote = {}           # (server, media id) -> the same, other servers' files (remote_media)
        self.media_latency = 0.0    # seconds a download takes before it is answered
        self.downloads_started = 0  # downloads asked for (requests lists them once answered)
        self.upload_latency = 0.0   # seconds an upload takes before it is answered (a large file, a slow disk)
        # False: every answer closes its connection (Connection: close, as
        # some proxies do), so no client's request goes on a kept-alive one.
        self.keep_alive = True
        self.uploads_started = 0    # uploads taken in (requests lists them once answered)
        self.registration = registration if registration is not None else {}
        self.legacy_paths = legacy_paths
        self.token_in_query = token_in_query
        self.unstable_ephemeral = unstable_ephemeral
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.push_timeout = push_timeout
        self.query_timeout = query_timeout
        self.ping_timeout = ping_timeout
        self.ping_supported = (not (legacy_paths or token_in_query)) if ping_supported is None else ping_supported
        # Seconds a send takes before it is answered (outside the lock, so
        # sends to several rooms overlap): a real homeserver spends
        # milliseconds on each (auth rules, persisting, fan-out); 0 here
        # by default.  A callable: given the sender, its seconds.
        self.send_latency = 0.0
        # Seconds a GET of one state event takes before it is answered
        # (outside the lock, as send_latency). A callable: given the room,
        # the event type, the state key and the user asking, its seconds.
        self.state_latency = 0.0
        self.rc_message = None      # (per_second, burst_count): see the module's docstring
        self.members_filters = True  # False: GET /members ignores its filters (Conduit)
        self.refuse_send = None     # a test's predicate on a send's path: True answers it 500 M_UNKNOWN
        # A test's function on a send's event id (the event is sent as
        # usual): what the answer's event_id says instead (a homeserver
        # answering an id that is none, which a client must not take).
        self.answer_event_id = None
        # A test's predicate on any authenticated call (method, path, user):
        # True answers it 503 M_UNKNOWN (the homeserver unavailable for it,
        # as behind a proxy while it restarts), 401 answers M_UNKNOWN_TOKEN
        # (the as_token not taken), 403 answers M_FORBIDDEN,
        # 429 answers M_LIMIT_EXCEEDED with retry_after_ms
        # refuse_retry_after_ms (and its Retry-After header, as for any 429),
        # 400 answers M_BAD_JSON (the request refused as invalid), a
        # MatrixError answers as it says (400 M_UNKNOWN, say).
        self.refuse = None
        self.refuse_retry_after_ms = 1000
        # A test's predicate on a transaction pushed (its dict, as in
        # transactions, after the application service answered): True
        # takes the answer as lost (a connection dropped, a timeout), and
        # the same txnId is sent again, as the specification asks.
        self.lose_answer = None
        # True: the transactions pushed carry no unsigned.prev_content (nor
        # replaces_state, prev_sender): the specification has a homeserver
        # give them only when the client may see the previous content, so
        # a member event may come without them.
        self.strip_prev_content = False
        # A test's predicate on a request served (method, path, user): True
        # closes the connection instead of answering, once the request has
        # been carried out (an answer lost on its way: the client cannot
        # tell it from a request that never arrived).
        self.lose_reply = None
        # Seconds by which createRoom's invitations come after the rest of
        # the room (None: with it, at once). Synapse makes a room's alias
        # before it sends the room's events and sends the invitations last
        # (handlers/room.py, create_room), so another client can find a
        # room by its alias before the invitees are in it; here a room is
        # otherwise made whole under one lock.
        self.defer_invites = None
        # A test's predicate on a createRoom (the user making it): True
        # makes the room, its state and its alias as usual, then fails the
        # request (500 M_UNKNOWN) before the invitations, which are never
        # sent: a homeserver whose making of a room stopped half way.
        self.fail_invites = None
        # A test's predicate on an invitation (inviter, invitee): True
        # refuses it for good, 403 M_FORBIDDEN (a status instead, such as
        # 502: refused for now, the invitee's server not reached, in a
        # createRoom as in an invitation of its own), as Synapse answers when the
        # invitee's server refuses it over federation or a module's
        # user_may_invite says no; in a createRoom after the room, its
        # state and its alias are made (Synapse sends the invitations
        # last, and an invitation's failure fails the request, the room
        # left made: handlers/room.py, create_room).
        self.refuse_invite = None
        self._buckets = {}          # user_id -> (level, time): the rate limiter's
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._users = {}            # user_id -> profile dict
        self._tokens = {}           # access token -> user_id
        self._rooms = {}            # room_id -> Room (insertion ordered)
        self._events = {}           # event_id -> (Room, event)
        self._aliases = {}          # alias -> (room_id, creator)
        self._txn_memory = {}       # (path, scope) -> event_id
        self._requests = []
        # The request each of the server's threads is serving (its record,
        # not yet in _requests), and the ids of those records whose request
        # has already made an effect a test can see (an event stored, a
        # user registered, a profile or alias changed, a file kept, an EDU
        # queued): requests waits for those to be recorded.  Until the
        # sixty-second session a request was recorded only after its
        # handler had returned, so a test that saw the effect could read
        # requests a moment before the record was in (stop 75's CI).
        self._serving = threading.local()
        self._in_flight = set()     # ids of the records of the requests being served
        self._unrecorded = {}       # id -> record, of those
        self._transactions = []
        self._queue_events = []
        self._queue_ephemeral = []
        self.dropped_ephemeral = []  # ephemeral data dropped while the application service was failing
        self.errors = []            # tracebacks of the stand-in's own failures (a test should find none)
        self._next_txn = 1
        self._pushing = True
        self._as_down = False
        self._closing = False
        self._timers = []
        self._httpd = None
        self._pusher = None
        if bot_exists and self.registration.get("sender_localpart"):
            self._users[self.bot_id] = {"displayname": self.registration["sender_localpart"]}
        self._routes = self._make_routes()

    # ------------------------------------------------------------------ lifecycle
    def start(self):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

            def log_message(self, *a):
                pass

            def _any(self):
                body = b""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = outer._dispatch(self.command, self.path, self.headers, body)
                if answer is LOST:
                    self.close_connection = True
                    return
                if isinstance(answer, RawBody):
                    self.send_response(status)
                    if not outer.keep_alive:
                        self.send_header("Connection", "close")
                    for k, v in answer.headers.items():
                        self.send_header(k, v)
                    if status in (204, 304):
                        self.end_headers()
                        return
                    self.send_header("Content-Type", answer.content_type)
                    self.send_header("Content-Disposition", answer.disposition)
                    self.send_header("Content-Length", str(len(answer.data)))
                    self.end_headers()
                    self.wfile.write(answer.data)
                    return
                data = json.dumps(answer).encode()
                self.send_response(status)
                if not outer.keep_alive:
                    self.send_header("Connection", "close")
                if status == 429 and isinstance(answer.get("retry_after_ms"), int):
                    self.send_header("Retry-After", str(math.ceil(answer["retry_after_ms"] / 1000)))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS")
                self.send_header("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_HEAD = _any

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._pusher = threading.Thread(target=self._push_loop, daemon=True)
        self._pusher.start()
        return self

    def close(self):
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            for t in self._timers:
                t.cancel()
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._pusher:
            self._pusher.join(timeout=self.push_timeout + 1)

    # ------------------------------------------------------------------ the registration
    @property
    def bot_id(self):
        return f"@{self.registration.get('sender_localpart')}:{self.server_name}"

    def _namespace(self, kind):
        return [(re.compile(ns["regex"]), bool(ns.get("exclusive"))) for ns in
                (self.registration.get("namespaces") or {}).get(kind) or []]

    def _in_namespace(self, kind, value, exclusive_only=False):
        return any(rx.match(value) for rx, excl in self._namespace(kind) if excl or not exclusive_only)

    def is_local(self, user_id):
        m = USER_ID_RE.fullmatch(user_id or "")
        return bool(m) and m.group(2) == self.server_name

    def interested_in_user(self, user_id):
        """The bot, or a local user of the registration's user namespaces."""
        return self.is_local(user_id) and (user_id == self.bot_id or self._in_namespace("users", user_id))

    def _as_url(self):
        url = self.registration.get("url")
        return url.rstrip("/") if isinstance(url, str) and url else None

    def _ephemeral_enabled(self):
        key = "de.sorunome.msc2409.push_ephemeral" if self.unstable_ephemeral else "receive_ephemeral"
        return self.registration.get(key) is True

    # ------------------------------------------------------------------ helpers for tests
    def create_user(self, localpart, displayname=None):
        """A local (non-appservice) user and its access token, as an admin would make them."""
        user_id = f"@{localpart}:{self.server_name}"
        if not LOCALPART_RE.fullmatch(localpart):
            raise ValueError(f"M_INVALID_USERNAME: {localpart}")
        with self._lock:
            if self._in_namespace("users", user_id, exclusive_only=True) or user_id == self.bot_id:
                raise ValueError(f"M_EXCLUSIVE: {user_id} is in the application service's namespace")
            if user_id in self._users:
                raise ValueError(f"M_USER_IN_USE: {user_id}")
            self._users[user_id] = {"displayname": displayname or localpart}
            token = "syt_" + _random(24)
            self._tokens[token] = user_id
        return user_id, token

    def remote_user(self, user_id, displayname=None):
        """A user of another server, known as federation would make it (the stand-in has no federation):
        it can then be invited, and its membership is its own room state as any user's."""
        m = USER_ID_RE.fullmatch(user_id)
        assert m and m.group(2) != self.server_name, user_id
        with self._lock:
            self._users[user_id] = {"displayname": displayname or user_id[1:].split(":")[0]}

    def as_user(self, token, user_id=None):
        """A client of this server with that access token (an as_token with user_id to masquerade)."""
        return Client(self, token, user_id)

    def appservice(self, user_id=None):
        """A client with the registration's as_token, as the bot or as user_id."""
        return Client(self, self.registration["as_token"], user_id)

    def events(self, room_id):
        with self._lock:
            room = self._rooms.get(room_id)
            return copy.deepcopy(room.timeline) if room else []

    def event(self, event_id):
        with self._lock:
            found = self._events.get(event_id)
            return copy.deepcopy(found[1]) if found else None

    def rooms(self):
        with self._lock:
            return list(self._rooms)

    def members(self, room_id):
        """{user_id: membership} of the room's current state."""
        with self._lock:
            room = self._rooms.get(room_id)
            return room.members() if room else {}

    def state(self, room_id, etype, state_key=""):
        with self._lock:
            room = self._rooms.get(room_id)
            ev = room.state.get((etype, state_key)) if room else None
            return copy.deepcopy(ev) if ev else None

    def profile(self, user_id):
        with self._lock:
            p = self._users.get(user_id)
            return dict(p) if p is not None else None

    def user_exists(self, user_id):
        with self._lock:
            return user_id in self._users

    def alias(self, alias):
        with self._lock:
            a = self._aliases.get(alias)
            return a[0] if a else None

    @property
    def transactions(self):
        """What was pushed: txn_id, events, ephemeral, tries, status (of the last try: an HTTP status or
        an error string), done, attempts [{start, end, status, error}], url (the last one tried)."""
        with self._lock:
            return [dict(t, attempts=list(t["attempts"])) for t in self._transactions]

    def pushed_events(self):
        """The events of the transactions the application service acknowledged, in order."""
        return [e for t in self.transactions if t["done"] for e in t["events"]]

    @property
    def requests(self):
        """Every request served: method, path, query, user (acting), appservice (bool), status, body,
        answer, time (when it came), lost (its reply not sent: lose_reply).  Consistent with what the
        stand-in shows: a request whose effect (an event, a member, a profile, an alias, a file, an EDU)
        can already be seen is in the list, with its status and answer, once its handler has finished
        (which takes no sleep after the effect).  Uploads and downloads only begun (uploads_started,
        downloads_started) are not: those are listed once answered."""
        with self._cond:
            # Not from the server's own threads (a test's predicate, such
            # as lose_reply, reading the record): one would wait for
            # itself, or let go of the lock in the middle of a handler.
            # Only the effects made before this read are waited for (a
            # snapshot): under steady traffic whose answers are held a while
            # there is always some request marked, and waiting for none
            # waited the whole 30 s (the review of the sixty-second
            # session's change).  A record not in by then fails the test
            # here, where the cause is, naming the requests.
            if getattr(self._serving, "rec", None) is None:
                pending = set(self._unrecorded)
                deadline = time.monotonic() + 30
                while pending.intersection(self._unrecorded) and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                left = [self._unrecorded[k] for k in pending.intersection(self._unrecorded)]
                if left:
                    raise AssertionError("the stand-in: requests whose effect shows not recorded in 30 s: " +
                                         ", ".join(f'{r["method"]} {r["path"]}' for r in left))
            return list(self._requests)

    def _effect(self):
        """The request this thread serves has made an effect a test can see (lock held, in the same
        hold as the effect): requests waits for its record from now on.  Nothing from a thread serving
        none (a test's own call), nor for a request already recorded (createRoom's deferred
        invitations)."""
        rec = getattr(self._serving, "rec", None)
        if rec is not None and id(rec) in self._in_flight:
            self._unrecorded[id(rec)] = rec

    def wait_for(self, pred, timeout=10, interval=0.02, what="condition"):
        deadline = time.time() + timeout
        last = None
        while True:
            last = pred()
            if last:
                return last
            if time.time() >= deadline:
                raise AssertionError(f"{what} not reached in {timeout}s (last: {last!r})")
            time.sleep(interval)

    def stop_pushing(self):
        with self._cond:
            self._pushing = False

    def resume_pushing(self):
        with self._cond:
            self._pushing = True
            self._cond.notify_all()

    def forget_txn_ids(self):
        """Forgets the client transaction IDs (as a real homeserver does after a while or a restart)."""
        with self._lock:
            self._txn_memory.clear()

    def reset_txn_ids(self):
        """The next transaction pushed is numbered 1 again (as after a homeserver database reset)."""
        with self._lock:
            self._next_txn = 1

    def upload(self, user_id, data, content_type, filename=None):
        """A file uploaded by a user of this server (as its client would): its mxc:// URI."""
        media_id = _random(24)
        with self._lock:
            self._media[media_id] = {"content_type": content_type, "data": bytes(data), "filename": filename,
                                     "user": user_id}
            self._effect()  # an upload's (a test's own call serves no request)
        return f"mxc://{self.server_name}/{media_id}"

    def remote_media(self, server, data, content_type, filename=None):
        """A file of another server, as federation would bring it here: its mxc:// URI."""
        media_id = _random(24)
        with self._lock:
            self._remote[(server, media_id)] = {"content_type": content_type, "data": bytes(data),
                                                "filename": filename, "user": None}
        return f"mxc://{server}/{media_id}"

    def media(self, mxc):
        """What the content repository keeps under an mxc:// URI of this server, or None."""
        prefix = f"mxc://{self.server_name}/"
        with self._lock:
            m = self._media.get(mxc[len(prefix):]) if mxc.startswith(prefix) else None
            return dict(m) if m else None

    def uploaded(self):
        """The files uploaded to this server's content repository, their bytes."""
        with self._lock:
            return [m["data"] for m in self._media.values()]

    def delete_media(self, mxc):
        with self._lock:
            self._media.pop(mxc.rsplit("/", 1)[-1], None)

    # ------------------------------------------------------------------ content repository
    def _h_upload(self, req):
        ctype = req.headers.get("Content-Type")
        if not ctype or "/" not in ctype:
            raise MatrixError(400, "M_INVALID_PARAM", "Content-Type is required")
        if len(req.raw) > self.max_upload_size:
            raise MatrixError(413, "M_TOO_LARGE", "Cannot upload files larger than the configured limit")
        name = req.query.get("filename", [None])[0]
        with self._lock:
            self.uploads_started += 1
        if self.upload_latency:
            time.sleep(self.upload_latency)
        return 200, {"content_uri": self.upload(req.user_id, req.raw, ctype, name)}

    def _serve(self, server, media_id):
        with self._lock:
            self.downloads_started += 1
        if self.media_latency:
            time.sleep(self.media_latency)
        with self._lock:
            m = self._media.get(media_id) if server == self.server_name else self._remote.get((server, media_id))
            if m is None:
                raise MatrixError(404, "M_NOT_FOUND", "Not found")
            name = m["filename"] or media_id
            return 200, RawBody(m["data"], m["content_type"], f"attachment; filename={json.dumps(name)}")

    def _h_download(self, req, server, media_id, filename=None):
        return self._serve(server, media_id)

    def _h_download_legacy(self, req, server, media_id, filename=None):
        if self.authenticated_media:  # frozen: only media from before the switch would be served
            raise MatrixError(404, "M_NOT_FOUND", "Not found")
        return self._serve(server, media_id)

    # ------------------------------------------------------------------ HTTP dispatch
    def _make_routes(self):
        c3 = "/_matrix/client/v3"
        seg = r"([^/]+)"
        table = [
            ("GET", "/_matrix/client/versions", self._h_versions, None),
            ("GET", c3 + "/capabilities", self._h_capabilities, "user"),
            ("GET", c3 + "/account/whoami", self._h_whoami, "user"),
            ("POST", c3 + "/register", self._h_register, None),
            ("GET", c3 + "/profile/" + seg, self._h_profile_get_all, None),
            ("GET", c3 + "/profile/" + seg + "/" + seg, self._h_profile_get, None),
            ("PUT", c3 + "/profile/" + seg + "/" + seg, self._h_profile_put, "user"),
            ("POST", c3 + "/createRoom", self._h_create_room, "user"),
            ("GET", c3 + "/joined_rooms", self._h_joined_rooms, "user"),
            ("POST", c3 + "/rooms/" + seg + "/invite", self._h_invite, "user"),
            ("POST", c3 + "/rooms/" + seg + "/join", self._h_join_id, "user"),
            ("POST", c3 + "/join/" + seg, self._h_join, "user"),
            ("POST", c3 + "/rooms/" + seg + "/leave", self._h_leave, "user"),
            ("POST", c3 + "/rooms/" + seg + "/kick", self._h_kick, "user"),
            ("POST", c3 + "/rooms/" + seg + "/ban", self._h_ban, "user"),
            ("POST", c3 + "/rooms/" + seg + "/upgrade", self._h_upgrade, "user"),
            ("PUT", c3 + "/rooms/" + seg + "/send/" + seg + "/" + seg, self._h_send, "user"),
            ("GET", c3 + "/rooms/" + seg + "/state", self._h_state_all, "user"),
            ("GET", c3 + "/rooms/" + seg + "/state/" + seg + "(?:/([^/]*))?", self._h_state_get, "user"),
            ("PUT", c3 + "/rooms/" + seg + "/state/" + seg + "(?:/([^/]*))?", self._h_state_put, "user"),
            ("PUT", c3 + "/rooms/" + seg + "/redact/" + seg + "/" + seg, self._h_redact, "user"),
            ("POST", c3 + "/rooms/" + seg + "/receipt/" + seg + "/" + seg, self._h_receipt, "user"),
            ("PUT", c3 + "/rooms/" + seg + "/typing/" + seg, self._h_typing, "user"),
            ("GET", c3 + "/rooms/" + seg + "/joined_members", self._h_joined_members, "user"),
            ("GET", c3 + "/rooms/" + seg + "/members", self._h_members, "user"),
            ("GET", c3 + "/rooms/" + seg + "/messages", self._h_messages, "user"),
            ("GET", c3 + "/rooms/" + seg + "/event/" + seg, self._h_get_event, "user"),
            ("GET", "/_matrix/client/v1/rooms/" + seg + "/relations/" + seg + "(?:/([^/]+)(?:/([^/]+))?)?",
             self._h_relations, "user"),
            ("GET", c3 + "/directory/room/" + seg, self._h_alias_get, None),
            ("PUT", c3 + "/directory/room/" + seg, self._h_alias_put, "user"),
            ("DELETE", c3 + "/directory/room/" + seg, self._h_alias_delete, "user"),
            ("POST", "/_matrix/client/v1/appservice/" + seg + "/ping", self._h_ping, "as"),
            ("POST", "/_matrix/media/v3/upload", self._h_upload, "user"),
            ("GET", "/_matrix/media/v3/download/" + seg + "/" + seg + "(?:/([^/]+))?", self._h_download_legacy, None),
        ]
        if self.authenticated_media:
            table.append(("GET", "/_matrix/client/v1/media/download/" + seg + "/" + seg + "(?:/([^/]+))?",
                          self._h_download, "user"))
        return [(m, re.compile(p), fn, auth) for m, p, fn, auth in table]

    def _dispatch(self, method, target, headers, body):
        split = urllib.parse.urlsplit(target)
        path = split.path
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        rec = {"method": method, "path": path, "query": {k: v[0] for k, v in query.items()},
               "user": None, "appservice": False, "status": None, "body": None, "time": time.time()}
        self._serving.rec = rec
        with self._lock:
            self._in_flight.add(id(rec))
        rec["status"], rec["answer"], rec["lost"] = None, None, True  # until answered: none given
        lost = False
        # One try for the whole of it: whatever a test's hook raises (a
        # BaseException such as pytest.fail too), the record goes in and
        # the thread's mark is cleared, or every later read of requests
        # would wait for it (the review of the sixty-second session's
        # change).
        try:
            try:
                found, known = None, False
                for m, rx, fn, auth in self._routes:
                    mt = rx.fullmatch(path)
                    if mt:
                        known = True
                        if m == method:
                            found = (fn, auth, mt.groups())
                            break
                if found is None:
                    if known and method == "OPTIONS":
                        status, answer = 200, {}
                    elif known:
                        raise MatrixError(405, "M_UNRECOGNIZED", "Unrecognized request")
                    else:
                        raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
                else:
                    fn, auth, groups = found
                    req = Requester(None, None, False)
                    req.method, req.path, req.query, req.headers, req.raw = method, path, query, headers, body
                    if auth is not None:
                        self._authenticate(req, auth)
                        rec["user"], rec["appservice"] = req.user_id, req.is_as
                    req.body = None
                    if fn == self._h_upload:
                        rec["body"] = {"bytes": len(body)}
                    elif method in ("POST", "PUT"):
                        req.body = parse_json(body)
                        rec["body"] = req.body
                        if not isinstance(req.body, dict):
                            raise MatrixError(400, "M_BAD_JSON", "Content must be a JSON object.")
                    args = [urllib.parse.unquote(g) if g is not None else "" for g in groups]
                    refused = self.refuse(method, path, req.user_id) if self.refuse else False
                    if isinstance(refused, MatrixError):
                        raise refused
                    if refused == 401:  # the as_token not (or no longer) taken
                        raise MatrixError(401, "M_UNKNOWN_TOKEN", "Invalid application service token.")
                    if refused == 403:
                        raise MatrixError(403, "M_FORBIDDEN", "Refused by the test")
                    if refused == 429:
                        raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too Many Requests",
                                          retry_after_ms=self.refuse_retry_after_ms)
                    if refused == 400:  # the request itself refused, as invalid content is
                        raise MatrixError(400, "M_BAD_JSON", "Refused by the test")
                    if refused:
                        raise MatrixError(503, "M_UNKNOWN", "Service unavailable")
                    status, answer = fn(req, *args)
                    rec["user"], rec["appservice"] = req.user_id, req.is_as
            except MatrixError as e:
                status, answer = e.status, e.body()
            except Exception:  # the stand-in's own bug: recorded for the test to see
                self.errors.append(traceback.format_exc())
                status, answer = 500, {"errcode": "M_UNKNOWN", "error": "Internal server error"}
            rec["status"], rec["answer"] = status, answer
            lost = self.lose_reply is not None and self.lose_reply(method, path, rec["user"])
            rec["lost"] = bool(lost)  # a lose_reply that raised leaves it True: no answer goes
        finally:
            with self._cond:
                self._requests.append(rec)
                self._serving.rec = None
                self._in_flight.discard(id(rec))
                if self._unrecorded.pop(id(rec), None) is not None:
                    self._cond.notify_all()
        return (status, LOST) if lost else (status, answer)

    def _token(self, req):
        """The access token of a request (header or query, never both), or None."""
        header = req.headers.get("Authorization")
        qtoken = req.query.get("access_token", [None])[0]
        if header is not None and qtoken is not None:
            raise MatrixError(401, "M_MISSING_TOKEN", "Mixing Authorization headers and access_token query parameters.")
        if header is not None:
            parts = header.split(" ")
            if len(parts) != 2 or parts[0] != "Bearer" or not parts[1]:
                raise MatrixError(401, "M_MISSING_TOKEN", "Invalid Authorization header.")
            token = parts[1]
        else:
            token = qtoken
        return token or None

    def _authenticate(self, req, mode):
        token = self._token(req)
        if not token:
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token.")
        req.token = token
        if token == self.registration.get("as_token"):
            req.is_as = True
            if mode == "as":
                return
            user_id = req.query.get("user_id", [None])[0]
            if user_id is None:
                user_id = self.bot_id
            elif not USER_ID_RE.fullmatch(user_id):
                raise MatrixError(400, "M_INVALID_USERNAME", "Username is invalid.")
            if not self.interested_in_user(user_id):
                raise MatrixError(403, "M_FORBIDDEN", f"Application service cannot masquerade as this user ({user_id}).")
            with self._lock:
                if user_id not in self._users:
                    raise MatrixError(403, "M_FORBIDDEN", f"Application service has not registered this user ({user_id})")
            req.user_id = user_id
            return
        with self._lock:
            user_id = self._tokens.get(token)
        if user_id is None:
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unknown access token.", soft_logout=False)
        if mode == "as":
            raise MatrixError(403, "M_FORBIDDEN", "Provided access token is not the appservice's as_token")
        req.user_id = user_id

    # ------------------------------------------------------------------ server and account
    def _h_versions(self, req):
        legacy = self.legacy_paths or self.token_in_query
        return 200, {"versions": list(LEGACY_SPEC_VERSIONS if legacy else SPEC_VERSIONS), "unstable_features": {}}

    def _h_capabilities(self, req):
        return 200, {"capabilities": {
            "m.change_password": {"enabled": False},
            "m.room_versions": {"default": DEFAULT_ROOM_VERSION, "available": dict(SUPPORTED_ROOM_VERSIONS)},
            "m.set_displayname": {"enabled": True}, "m.set_avatar_url": {"enabled": True},
            "m.3pid_changes": {"enabled": False}}}

    def _h_whoami(self, req):
        answer = {"user_id": req.user_id, "is_guest": False}
        return 200, answer

    def _h_register(self, req):
        body = parse_json(req.raw)
        req.body = body
        if not isinstance(body, dict):
            raise MatrixError(400, "M_BAD_JSON", "Content must be a JSON object.")
        kind = req.query.get("kind", ["user"])[0]
        if kind not in ("user", "guest"):
            raise MatrixError(400, "M_UNRECOGNIZED", f"Do not understand membership kind: {kind}")
        if body.get("type") != "m.login.application_service":
            if kind == "guest":
                raise MatrixError(403, "M_FORBIDDEN", "Guest access is disabled")
            if req.headers.get("Authorization") or "access_token" in req.query:
                raise MatrixError(400, "M_UNKNOWN", "An access token should not be provided on requests to "
                                                    "/register (except if type is m.login.application_service)")
            raise MatrixError(403, "M_FORBIDDEN", "Registration has been disabled")
        token = self._token(req)  # 401 M_MISSING_TOKEN / M_UNKNOWN_TOKEN, as the specification says
        if not token:
            raise MatrixError(401, "M_MISSING_TOKEN", "Missing access token.")
        if token != self.registration.get("as_token"):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Invalid application service token.")
        req.token, req.is_as = token, True
        username = field(body, "username", str, required=True)
        inhibit = field(body, "inhibit_login", bool, default=False)
        field(body, "device_id", str)
        user_id = f"@{username}:{self.server_name}"
        if user_id != self.bot_id and not self._in_namespace("users", user_id):
            raise MatrixError(400, "M_EXCLUSIVE", "Invalid user localpart for this application service.")
        if not LOCALPART_RE.fullmatch(username) or len(user_id.encode()) > 255:
            raise MatrixError(400, "M_INVALID_USERNAME", "User ID can only contain characters a-z, 0-9, or '=_-./+'")
        with self._lock:
            if user_id in self._users:
                raise MatrixError(400, "M_USER_IN_USE", "User ID already taken.")
            self._users[user_id] = {"displayname": username}
            self._effect()
            answer = {"user_id": user_id, "home_server": self.server_name}
            if not inhibit:
                token = "syt_" + _random(24)
                self._tokens[token] = user_id
                answer.update(access_token=token, device_id=body.get("device_id") or _random(8).upper())
        req.user_id, req.is_as = None, True
        return 200, answer

    # ------------------------------------------------------------------ profiles
    def _check_user_id(self, user_id):
        if not USER_ID_RE.fullmatch(user_id):
            raise MatrixError(400, "M_INVALID_PARAM", f"Invalid user ID: {user_id}")

    def _optional_auth(self, req):
        if req.headers.get("Authorization") is not None or "access_token" in req.query:
            self._authenticate(req, "user")

    def _h_profile_get_all(self, req, user_id):
        self._optional_auth(req)
        self._check_user_id(user_id)
        with self._lock:
            p = self._users.get(user_id)
            if p is None:
                raise MatrixError(404, "M_NOT_FOUND", "Profile was not found")
            return 200, {k: v for k, v in p.items() if v is not None}

    def _h_profile_get(self, req, user_id, key):
        self._optional_auth(req)
        self._check_user_id(user_id)
        if not PROFILE_KEY_RE.fullmatch(key):
            raise MatrixError(400, "M_INVALID_PARAM", "Invalid profile key.")
        with self._lock:
            p = self._users.get(user_id)
            if p is None or p.get(key) is None:
                raise MatrixError(404, "M_NOT_FOUND", "Profile was not found")
            return 200, {key: p[key]}

    def _h_profile_put(self, req, user_id, key):
        self._check_user_id(user_id)
        if not PROFILE_KEY_RE.fullmatch(key):
            raise MatrixError(400, "M_INVALID_PARAM", "Invalid profile key.")
        if user_id != req.user_id:
            raise MatrixError(403, "M_FORBIDDEN", "Cannot set another user's profile")
        if key not in req.body:
            raise MatrixError(400, "M_MISSING_PARAM", f"Missing key '{key}'")
        value = req.body[key]
        if key == "displayname":
            if not isinstance(value, str):
                raise MatrixError(400, "M_BAD_JSON", "displayname must be a string")
            if len(value) > 256:
                raise MatrixError(400, "M_TOO_LARGE", "Displayname is too long (max 256)")
        elif key == "avatar_url":
            if not isinstance(value, str):
                raise MatrixError(400, "M_BAD_JSON", "avatar_url must be a string")
            if value and not MXC_RE.fullmatch(value):
                raise MatrixError(400, "M_INVALID_PARAM", "avatar_url must be an mxc:// URI")
        with self._lock:
            p = self._users[user_id]
            if p.get(key) == value:
                return 200, {}
            p[key] = value
            self._effect()
            if key in ("displayname", "avatar_url"):
                # As Synapse does: a new membership event in every room the user is joined to.
                for room in self._rooms.values():
                    if room.membership(user_id) == "join":
                        content = dict(room.state[("m.room.member", user_id)]["content"])
                        content[key] = value
                        if not value:
                            content.pop(key)
                        self._emit(room, user_id, "m.room.member", content, state_key=user_id)
        return 200, {}

    # ------------------------------------------------------------------ events
    def _room(self, room_id, status=404):
        room = self._rooms.get(room_id)
        if room is None:
            if status == 403:
                raise MatrixError(403, "M_FORBIDDEN", f"User is not in room {room_id}")
            raise MatrixError(404, "M_NOT_FOUND", f"Unknown room {room_id}")
        return room

    def _require_joined(self, room, user_id):
        if room.membership(user_id) != "join":
            raise MatrixError(403, "M_FORBIDDEN", f"User {user_id} not in room {room.room_id}")

    def _emit(self, room, sender, etype, content, state_key=None, ts=None, redacts=None, unsigned=None):
        """Makes, stores and (when the application service is interested) queues one event. The caller
        holds the lock."""
        ev = {"event_id": "$" + _random(32), "type": etype, "sender": sender, "room_id": room.room_id,
              "origin_server_ts": ts if ts is not None else now_ms(), "content": content,
              "unsigned": dict(unsigned or {})}
        if redacts is not None:
            ev["redacts"] = redacts
        if state_key is not None:
            ev["state_key"] = state_key
            prev = room.state.get((etype, state_key))
            if prev is not None:
                ev["unsigned"].update(replaces_state=prev["event_id"], prev_content=copy.deepcopy(prev["content"]),
                                      prev_sender=prev["sender"])
            room.state[(etype, state_key)] = ev
        room.timeline.append(ev)
        self._events[ev["event_id"]] = (room, ev)
        self._effect()
        if self._interested_in_event(room, ev):
            self._queue_events.append(copy.deepcopy(ev))
            self._cond.notify_all()
        return ev

    def _interested_in_room(self, room):
        if self._in_namespace("rooms", room.room_id):
            return True
        if any(self._in_namespace("aliases", a) for a in room.aliases):
            return True
        return any(self.interested_in_user(u) for u in room.members("join"))

    def _interested_in_event(self, room, ev):
        if self.interested_in_user(ev["sender"]):
            return True
        if ev["type"] == "m.room.member" and self.interested_in_user(ev.get("state_key")):
            return True
        return self._interested_in_room(room)

    def _queue_ephemeral_edu(self, room, edu, private_user=None):
        if not self._ephemeral_enabled() or not self._interested_in_room(room):
            return
        if private_user is not None and not self.interested_in_user(private_user):
            return
        if self._as_down:
            self.dropped_ephemeral.append(edu)
            return
        self._queue_ephemeral.append(edu)
        self._cond.notify_all()

    def _ts_param(self, req):
        """?ts= honoured for the application service only (ignored for others, as Synapse does)."""
        if not req.is_as or "ts" not in req.query:
            return None
        raw = req.query["ts"][0]
        if not re.fullmatch(r"[0-9]+", raw) or int(raw) > 2 ** 53 - 1:
            raise MatrixError(400, "M_INVALID_PARAM", "Query parameter 'ts' must be a valid timestamp")
        return int(raw)

    def _txn_scope(self, req):
        return ("appservice", self.registration.get("id")) if req.is_as else ("user", req.token)

    def _check_event(self, room, ev):
        check_canonical(ev["content"], version=room.version)
        if canonical_size(dict(ev, event_id="$" + "x" * 43)) > MAX_PDU_BYTES:
            raise MatrixError(413, "M_TOO_LARGE", "Event too large")

    @staticmethod
    def _check_power_levels(room, sender, content):
        """The authorization rules of an m.room.power_levels event (room versions 1 to 11, integers as
        version 10 on enforces them): no level the sender does not have may be given, and no level at or
        above the sender's (a user's but the sender's own, an action's, an event type's) changed."""
        plain = ("users_default", "events_default", "state_default", "ban", "redact", "kick", "invite")
        for k in plain:
            if k in content and (not isinstance(content[k], int) or isinstance(content[k], bool)):
                raise MatrixError(400, "M_BAD_JSON", f"{k} must be an integer")
        for k in ("events", "notifications", "users"):
            v = content.get(k, {})
            if not isinstance(v, dict) or any(not isinstance(x, int) or isinstance(x, bool) for x in v.values()):
                raise MatrixError(400, "M_BAD_JSON", f"{k} must be an object of integers")
        if any(not USER_ID_RE.fullmatch(u) for u in content.get("users", {})):
            raise MatrixError(400, "M_BAD_JSON", "users must be keyed by user IDs")
        old = room.power_levels()
        if not old:
            return
        mine = room.user_level(sender)

        def changed(before, after, user=None):
            if before == after:
                return
            if before is not None and (before > mine if user is None else before >= mine and user != sender):
                raise MatrixError(403, "M_FORBIDDEN", "You don't have permission to change that level")
            if after is not None and after > mine:
                raise MatrixError(403, "M_FORBIDDEN", "You don't have permission to give that level")
        for k in plain:
            changed(old.get(k), content.get(k))
        for k in ("events", "notifications"):
            before, after = old.get(k, {}), content.get(k, {})
            for key in set(before) | set(after):
                changed(before.get(key), after.get(key))
        before, after = old.get("users", {}), content.get("users", {})
        for user in set(before) | set(after):
            changed(before.get(user), after.get(user), user)

    def _h_send(self, req, room_id, etype, txn_id):
        if self.refuse_send and self.refuse_send(req.path):
            raise MatrixError(500, "M_UNKNOWN", "Internal server error (a test's)")
        key = (req.path, self._txn_scope(req))
        latency = self.send_latency(req.user_id) if callable(self.send_latency) else self.send_latency
        if latency:
            time.sleep(latency)
        with self._lock:
            if key in self._txn_memory:
                return 200, {"event_id": self._txn_memory[key]}
            self._ratelimit(req)
            content = req.body
            ts = self._ts_param(req)
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
            if not etype or len(etype) > 255:
                raise MatrixError(400, "M_INVALID_PARAM", "Invalid event type")
            if etype == "m.room.redaction":
                target = content.get("redacts")
                if not isinstance(target, str):
                    raise MatrixError(400, "M_BAD_JSON", "m.room.redaction needs 'redacts' in its content")
                content = dict(content)
                if room.version != "11":
                    content.pop("redacts", None)
                ev = self._redact(room, req.user_id, target, content, ts)
            else:
                self._check_annotation(room, req.user_id, etype, content)
                self._check_relation(room, content)
                self._check_event(room, {"type": etype, "sender": req.user_id, "room_id": room_id,
                                         "content": content, "origin_server_ts": 0})
                if room.user_level(req.user_id) < room.event_level(etype, False):
                    raise MatrixError(403, "M_FORBIDDEN", f"You don't have permission to send {etype}")
                ev = self._emit(room, req.user_id, etype, copy.deepcopy(content), ts=ts)
            self._txn_memory[key] = ev["event_id"]
            return 200, {"event_id": self.answer_event_id(ev["event_id"]) if self.answer_event_id else ev["event_id"]}

    def _ratelimit(self, req):
        """Synapse's Ratelimiter for events (rc_message), a leaky bucket per sender."""
        if self.rc_message is None:
            return
        # Synapse: the application service's requests (its bot's too) are
        # exempt only when its registration says rate_limited: false.
        if req.is_as and not self.registration.get("rate_limited", True):
            return
        rate, burst = self.rc_message
        now = time.monotonic()
        level, then = self._buckets.get(req.user_id, (0.0, now))
        level = max(0.0, level - (now - then) * rate)
        if level + 1 > burst:
            self._buckets[req.user_id] = (level, now)
            wait_ms = int(math.ceil((level + 1 - burst) / rate * 1000))
            raise MatrixError(429, "M_LIMIT_EXCEEDED", "Too Many Requests", retry_after_ms=wait_ms)
        self._buckets[req.user_id] = (level + 1, now)

    def _check_relation(self, room, content):
        """Synapse's check of a relation (handlers/message.py, _validate_event_relation): the event it
        relates to, when the server has it, must be of the same room (400, errcode M_UNKNOWN)."""
        rel = content.get("m.relates_to")
        if not isinstance(rel, dict) or not isinstance(rel.get("rel_type"), str) or \
                not isinstance(rel.get("event_id"), str):
            return
        found = self._events.get(rel["event_id"])
        if found is not None and found[0] is not room:
            raise MatrixError(400, "M_UNKNOWN", "Relations must be in the same room")

    def _check_annotation(self, room, sender, etype, content):
        rel = content.get("m.relates_to")
        if not isinstance(rel, dict) or rel.get("rel_type") != "m.annotation":
            return
        for ev in room.timeline:
            r = ev["content"].get("m.relates_to")
            if (ev["sender"] == sender and ev["type"] == etype and isinstance(r, dict)
                    and r.get("rel_type") == "m.annotation" and r.get("event_id") == rel.get("event_id")
                    and r.get("key") == rel.get("key")):
                raise MatrixError(400, "M_DUPLICATE_ANNOTATION", "Can't send same reaction twice")

    def _redact(self, room, sender, target_id, content, ts):
        found = self._events.get(target_id)
        # An event the server does not have (or of another room): the
        # redaction is taken all the same, 200, as Synapse takes it (it
        # would apply to the event were it to come); it redacts nothing.
        target = found[1] if found is not None and found[0] is room else None
        if room.user_level(sender) < room.event_level("m.room.redaction", False):
            raise MatrixError(403, "M_FORBIDDEN", "You don't have permission to redact events")
        if target is not None and target["sender"] != sender and room.user_level(sender) < room.needed("redact", 50):
            raise MatrixError(403, "M_FORBIDDEN", "You don't have permission to redact events of others")
        content = copy.deepcopy(content)
        if room.version == "11":
            content["redacts"] = target_id
        check_canonical(content, version=room.version)
        ev = self._emit(room, sender, "m.room.redaction", content, ts=ts, redacts=target_id)
        if target is None:
            return ev
        keep = (REDACT_KEEP_V11 if room.version == "11" else REDACT_KEEP).get(target["type"], ())
        if keep is not None:
            target["content"] = {k: v for k, v in target["content"].items() if k in keep}
        target["unsigned"] = {"redacted_because": copy.deepcopy(ev)}
        return ev

    def _h_redact(self, req, room_id, event_id, txn_id):
        key = (req.path, self._txn_scope(req))
        with self._lock:
            if key in self._txn_memory:
                return 200, {"event_id": self._txn_memory[key]}
            self._ratelimit(req)
            field(req.body, "reason", str)
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
            # The body is the event's content, whole, as Synapse's
            # RoomRedactEventRestServlet takes it: in room versions 1-10 a
            # "redacts" there is mere content (the top-level one, from the
            # path, is the target); from 11 it must name the path's event.
            content = req.body
            if room.version == "11" and "redacts" in content and content["redacts"] != event_id:
                raise MatrixError(400, "M_INVALID_PARAM",
                                  "Cannot provide a redacts value incoherent with the event_id of the URL parameter")
            ev = self._redact(room, req.user_id, event_id, content, None)
            self._txn_memory[key] = ev["event_id"]
            return 200, {"event_id": self.answer_event_id(ev["event_id"]) if self.answer_event_id else ev["event_id"]}

    def _h_state_put(self, req, room_id, etype, state_key):
        ts = self._ts_param(req)
        content = req.body
        if etype == "m.room.member":
            membership = field(content, "membership", str, required=True)
            if membership not in ("invite", "join", "leave", "ban"):
                raise MatrixError(400, "M_BAD_JSON", f"Unknown membership {membership}")
            self._check_user_id(state_key)
            if membership == "invite":
                self._ensure_user(state_key)
            extra = {k: v for k, v in content.items() if k != "membership"}
            with self._lock:
                room = self._room(room_id, status=403)
                ev = self._membership(room, req.user_id, state_key, membership, extra=extra, ts=ts,
                                      allow_noop=False)
                return 200, {"event_id": ev["event_id"]}
        with self._lock:
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
            if room.user_level(req.user_id) < room.event_level(etype, True):
                raise MatrixError(403, "M_FORBIDDEN", f"You don't have permission to send {etype}")
            if etype == "m.room.create":
                raise MatrixError(403, "M_FORBIDDEN", "m.room.create can't be changed")
            if state_key.startswith("@") and state_key != req.user_id:  # an authorisation rule of every room version
                raise MatrixError(403, "M_FORBIDDEN", "You can't set state with another user's ID as state_key")
            self._check_event(room, {"type": etype, "state_key": state_key, "sender": req.user_id,
                                     "room_id": room_id, "content": content, "origin_server_ts": 0})
            if etype == "m.room.power_levels":
                self._check_power_levels(room, req.user_id, content)
            if etype == "m.room.canonical_alias":
                for a in [content.get("alias")] + list(content.get("alt_aliases") or []):
                    if a is None:
                        continue
                    if not isinstance(a, str) or not ALIAS_RE.fullmatch(a):
                        raise MatrixError(400, "M_INVALID_PARAM", f"Invalid alias {a!r}")
                    if self._aliases.get(a, (None,))[0] != room_id:
                        raise MatrixError(400, "M_BAD_ALIAS", f"The alias '{a}' does not point to this room.")
            prev = room.state.get((etype, state_key))
            if prev is not None and prev["content"] == content and prev["sender"] == req.user_id:
                return 200, {"event_id": prev["event_id"]}  # Synapse does not repeat an identical state event
            ev = self._emit(room, req.user_id, etype, copy.deepcopy(content), state_key=state_key, ts=ts)
            return 200, {"event_id": ev["event_id"]}

    def _readable_state(self, room, user_id):
        """The room's state as user_id may read it (lock held), as the specification has GET /state: the
        current state for a member; for one who left or was banned (a kick is a leave), the state when they
        left (Synapse: check_user_in_room_or_world_readable with allow_departed_users); anyone else is
        refused. Until the fifty-third session one who had left was refused too."""
        membership = room.membership(user_id)
        if membership == "join":
            return room.state
        if membership not in ("leave", "ban"):
            self._require_joined(room, user_id)
        last = room.state[("m.room.member", user_id)]["event_id"]
        state = {}
        for ev in room.timeline:
            if "state_key" in ev:
                state[(ev["type"], ev["state_key"])] = ev
            if ev["event_id"] == last:
                break
        return state

    def _h_state_get(self, req, room_id, etype, state_key):
        latency = (self.state_latency(room_id, etype, state_key, req.user_id) if callable(self.state_latency)
                   else self.state_latency)
        if latency:
            time.sleep(latency)
        with self._lock:
            room = self._room(room_id, status=403)
            ev = self._readable_state(room, req.user_id).get((etype, state_key))
            if ev is None:
                raise MatrixError(404, "M_NOT_FOUND", "Event not found.")
            if req.query.get("format", ["content"])[0] == "event":
                return 200, copy.deepcopy(ev)
            return 200, copy.deepcopy(ev["content"])

    def _h_state_all(self, req, room_id):
        with self._lock:
            room = self._room(room_id, status=403)
            return 200, copy.deepcopy(list(self._readable_state(room, req.user_id).values()))

    def _h_get_event(self, req, room_id, event_id):
        with self._lock:
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
            found = self._events.get(event_id)
            if found is None or found[0] is not room or event_id not in self._visible(room, req.user_id):
                raise MatrixError(404, "M_NOT_FOUND", "Event not found.")
            return 200, self._for_client(found[1])

    def _h_relations(self, req, room_id, event_id, rel_type=None, event_type=None):
        """The child events of event_id (Matrix 1.3, GET /_matrix/client/v1/rooms/{roomId}/relations/
        {eventId}[/{relType}[/{eventType}]]): those whose content's m.relates_to names it (with rel_type,
        and of event_type, when given; a redacted one has lost its m.relates_to), in the room's order,
        newest first unless dir=f, limit at most 1000 (Synapse's cap), paginated by next_batch. The parent
        must be an event of the room the requester may see (else 404 M_NOT_FOUND); recurse is not read
        (Synapse's default, no recursion)."""
        rel_type, event_type = rel_type or None, event_type or None  # a segment not given comes as ""
        direction = req.query.get("dir", ["b"])[0]
        if direction not in ("b", "f"):
            raise MatrixError(400, "M_INVALID_PARAM", "dir must be 'b' or 'f'")
        limit = req.query.get("limit", ["5"])[0]
        if not re.fullmatch(r"[0-9]+", limit):
            raise MatrixError(400, "M_INVALID_PARAM", "limit must be an integer")
        limit = max(1, min(int(limit), 1000))
        frm = req.query.get("from", [None])[0]
        if frm is not None and not re.fullmatch(r"r[0-9]+", frm):
            raise MatrixError(400, "M_INVALID_PARAM", "Invalid 'from' token")
        with self._lock:
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
            visible = self._visible(room, req.user_id)
            found = self._events.get(event_id)
            if found is None or found[0] is not room or event_id not in visible:
                raise MatrixError(404, "M_NOT_FOUND", "Event not found.")
            children = []
            for pos, ev in enumerate(room.timeline):
                rel = ev["content"].get("m.relates_to")
                if (ev["event_id"] in visible and isinstance(rel, dict) and rel.get("event_id") == event_id
                        and (rel_type is None or rel.get("rel_type") == rel_type)
                        and (event_type is None or ev["type"] == event_type)):
                    children.append((pos, ev))
            if direction == "b":
                children.reverse()
                start = int(frm[1:]) if frm is not None else len(room.timeline)
                children = [(pos, ev) for pos, ev in children if pos < start]
            else:
                start = int(frm[1:]) if frm is not None else 0
                children = [(pos, ev) for pos, ev in children if pos >= start]
            page = children[:limit]
            answer = {"chunk": [self._for_client(ev) for _, ev in page]}
            if len(children) > limit:
                last = page[-1][0]
                answer["next_batch"] = f"r{last if direction == 'b' else last + 1}"
            return 200, answer

    HV_ORDER = ("world_readable", "shared", "invited", "joined")  # from the least restrictive

    def _visible(self, room, user_id):
        """The event ids of room that user_id may read by the room's history visibility, as Synapse's
        filter_events_for_client decides it (the requester is joined now: no peeking): the visibility and
        the user's membership in the state before each event (the user's own membership event counts with
        its new membership; a history visibility event with the more restrictive of the old and the new);
        joined: visible; world_readable and shared: visible; invited: visible while invited; joined: not.
        Until the thirty-sixth session every event was given, whatever the visibility."""
        hv, membership, out = "shared", None, set()
        for ev in room.timeline:
            seen_hv, seen_membership = hv, membership
            if ev["type"] == "m.room.history_visibility" and ev.get("state_key") == "":
                new = ev["content"].get("history_visibility")
                new = new if new in self.HV_ORDER else "shared"
                seen_hv = max(hv, new, key=self.HV_ORDER.index)
                hv = new
            if ev["type"] == "m.room.member" and ev.get("state_key") == user_id:
                membership = seen_membership = ev["content"].get("membership")
            if seen_membership == "join" or seen_hv in ("world_readable", "shared") or \
                    (seen_hv == "invited" and seen_membership == "invite"):
                out.add(ev["event_id"])
        return out

    def _for_client(self, ev):
        out = copy.deepcopy(ev)
        out["unsigned"]["age"] = max(0, now_ms() - ev["origin_server_ts"])
        return out

    def _h_joined_members(self, req, room_id):
        with self._lock:
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
            joined = {}
            for user in room.members("join"):
                c = room.state[("m.room.member", user)]["content"]
                joined[user] = {k2: c[k1] for k1, k2 in (("displayname", "display_name"), ("avatar_url", "avatar_url"))
                                if c.get(k1) is not None}
            return 200, {"joined": joined}

    def _h_members(self, req, room_id):
        """GET /rooms/{roomId}/members: the m.room.member events of the room's current state, filtered by
        membership (only those) and not_membership (all but those); the caller must be in the room (the
        spec lets a user who left read the list as it was when they left: not needed here). `at` is not
        supported: refused rather than ignored."""
        kinds = ("join", "invite", "knock", "leave", "ban")
        want, not_want = req.query.get("membership", [None])[0], req.query.get("not_membership", [None])[0]
        if not self.members_filters:
            want = not_want = None
        for name, v in (("membership", want), ("not_membership", not_want)):
            if v is not None and v not in kinds:
                raise MatrixError(400, "M_INVALID_PARAM", f"{name} must be one of {', '.join(kinds)}")
        if "at" in req.query:
            raise MatrixError(400, "M_UNRECOGNIZED", "at is not supported by this stand-in")
        with self._lock:
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
            chunk = [self._for_client(ev) for (t, _), ev in room.state.items() if t == "m.room.member"
                     and (want is None or ev["content"].get("membership") == want)
                     and (not_want is None or ev["content"].get("membership") != not_want)]
            return 200, {"chunk": chunk}

    def _h_joined_rooms(self, req):
        with self._lock:
            return 200, {"joined_rooms": [r for r, room in self._rooms.items()
                                          if room.membership(req.user_id) == "join"]}

    def _h_messages(self, req, room_id):
        direction = req.query.get("dir", [None])[0]
        if direction not in ("b", "f"):
            raise MatrixError(400, "M_MISSING_PARAM" if direction is None else "M_INVALID_PARAM",
                              "dir must be 'b' or 'f'")
        limit = req.query.get("limit", ["10"])[0]
        if not re.fullmatch(r"[0-9]+", limit):
            raise MatrixError(400, "M_INVALID_PARAM", "limit must be an integer")
        limit = min(int(limit), 1000)
        with self._lock:
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
            n = len(room.timeline)
            frm = req.query.get("from", [None])[0]
            if frm is not None:
                if not re.fullmatch(r"t[0-9]+", frm):
                    raise MatrixError(400, "M_INVALID_PARAM", "Invalid 'from' token")
                pos = min(int(frm[1:]), n)
            else:
                pos = n if direction == "b" else 0
            if direction == "b":
                chunk = list(reversed(room.timeline[max(0, pos - limit):pos]))
                end = max(0, pos - limit)
            else:
                chunk = room.timeline[pos:pos + limit]
                end = min(n, pos + limit)
            # filtered after the page is taken, as Synapse filters it: a page
            # of hidden events is empty, with its end token
            visible = self._visible(room, req.user_id)
            answer = {"chunk": [self._for_client(e) for e in chunk if e["event_id"] in visible],
                      "start": f"t{pos}"}
            if chunk:
                answer["end"] = f"t{end}"
            return 200, answer

    # ------------------------------------------------------------------ receipts and typing
    def _h_receipt(self, req, room_id, rtype, event_id):
        if rtype not in RECEIPT_TYPES:
            raise MatrixError(400, "M_INVALID_PARAM", f"Receipt type must be one of {', '.join(RECEIPT_TYPES)}")
        thread_id = field(req.body, "thread_id", str)
        with self._lock:
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
            found = self._events.get(event_id)
            if found is None or found[0] is not room:
                raise MatrixError(404, "M_NOT_FOUND", f"Unknown event {event_id}")
            if rtype == "m.fully_read":
                return 200, {}  # a read marker: account data, not an EDU
            index = room.timeline.index(found[1])
            old = room.receipts.get((req.user_id, rtype, thread_id))
            if old is not None and old >= index:
                return 200, {}  # not newer than the one it has: no EDU, as Synapse does
            room.receipts[(req.user_id, rtype, thread_id)] = index
            self._effect()
            receipt = {"ts": now_ms()}
            if thread_id is not None:
                receipt["thread_id"] = thread_id
            edu = {"type": "m.receipt", "room_id": room_id,
                   "content": {event_id: {rtype: {req.user_id: receipt}}}}
            self._queue_ephemeral_edu(room, edu, private_user=req.user_id if rtype == "m.read.private" else None)
            return 200, {}

    def _typing_edu(self, room):
        return {"type": "m.typing", "room_id": room.room_id, "content": {"user_ids": sorted(room.typing)}}

    def _h_typing(self, req, room_id, user_id):
        if user_id != req.user_id:
            raise MatrixError(403, "M_FORBIDDEN", "Cannot set another user's typing state")
        typing = field(req.body, "typing", bool, required=True)
        timeout = field(req.body, "timeout", int, required=typing)
        with self._lock:
            room = self._room(room_id, status=403)
            self._require_joined(room, user_id)
            was = user_id in room.typing
            self._effect()
            if typing:
                gen = room.typing.get(user_id, 0) + 1
                room.typing[user_id] = gen
                t = threading.Timer(max(timeout, 0) / 1000.0, self._typing_expired, (room, user_id, gen))
                t.daemon = True
                self._timers.append(t)
                t.start()
                if not was:
                    self._queue_ephemeral_edu(room, self._typing_edu(room))
            elif was:
                del room.typing[user_id]
                self._queue_ephemeral_edu(room, self._typing_edu(room))
        return 200, {}

    def _typing_expired(self, room, user_id, gen):
        with self._lock:
            if self._closing or room.typing.get(user_id) != gen:
                return
            del room.typing[user_id]
            self._queue_ephemeral_edu(room, self._typing_edu(room))

    # ------------------------------------------------------------------ rooms and membership
    def _new_room_id(self):
        return f"!{_random(13)}:{self.server_name}"

    def _member_content(self, target, membership, extra=None):
        content = {"membership": membership}
        if membership in ("join", "invite"):
            p = self._users.get(target) or {}
            for k in ("displayname", "avatar_url"):
                if p.get(k):
                    content[k] = p[k]
        content.update(extra or {})
        content["membership"] = membership
        return content

    def _stripped_state(self, room, sender):
        out = []
        for t in PREJOIN_STATE:
            ev = room.state.get((t, ""))
            if ev:
                out.append({k: ev[k] for k in ("type", "state_key", "content", "sender")})
        ev = room.state.get(("m.room.member", sender))
        if ev:
            out.append({k: ev[k] for k in ("type", "state_key", "content", "sender")})
        return out

    def _membership(self, room, sender, target, membership, extra=None, ts=None, allow_noop=True):
        """The room's authorisation rules for a membership change (lock held)."""
        cur = room.membership(target)
        s_cur = room.membership(sender)
        if membership == "join":
            if target != sender:
                raise MatrixError(403, "M_FORBIDDEN", "Cannot force another user to join.")
            if cur == "ban":
                raise MatrixError(403, "M_FORBIDDEN", "You are banned from this room")
            if cur == "join" and allow_noop:
                return room.state[("m.room.member", target)]
            if cur not in ("join", "invite") and room.join_rule() != "public":
                raise MatrixError(403, "M_FORBIDDEN", "You are not invited to this room.")
        elif membership == "invite":
            if s_cur != "join":
                raise MatrixError(403, "M_FORBIDDEN", f"{sender} is not in room {room.room_id}")
            if cur == "ban":
                raise MatrixError(403, "M_FORBIDDEN", f"{target} is banned from the room")
            if cur == "join":
                raise MatrixError(403, "M_FORBIDDEN", f"{target} is already in the room.")
            if room.user_level(sender) < room.needed("invite", 0):
                raise MatrixError(403, "M_FORBIDDEN", "You don't have permission to invite users")
            refused = self.refuse_invite(sender, target) if self.refuse_invite is not None else False
            if refused is True:
                raise MatrixError(403, "M_FORBIDDEN", f"The invitation of {target} was refused")
            if refused:
                # a status: the invitee's server not reached (Synapse
                # answers 502 when the federated invitation cannot be sent)
                raise MatrixError(refused, "M_UNKNOWN", f"Failed to send the invitation of {target}")
            if cur == "invite" and allow_noop:
                return room.state[("m.room.member", target)]
        elif membership == "leave":
            if target == sender:
                if cur not in ("join", "invite"):
                    raise MatrixError(403, "M_FORBIDDEN", f"{target} is not in room {room.room_id}")
            else:
                if s_cur != "join":
                    raise MatrixError(403, "M_FORBIDDEN", f"{sender} is not in room {room.room_id}")
                needed = room.needed("ban", 50) if cur == "ban" else room.needed("kick", 50)
                if cur not in ("join", "invite", "ban") or room.user_level(sender) < needed or \
                        room.user_level(sender) <= room.user_level(target):
                    raise MatrixError(403, "M_FORBIDDEN", "You cannot kick this user")
        elif membership == "ban":
            if s_cur != "join" or room.user_level(sender) < room.needed("ban", 50) or \
                    room.user_level(sender) <= room.user_level(target):
                raise MatrixError(403, "M_FORBIDDEN", "You cannot ban this user")
        content = self._member_content(target, membership, extra)
        check_canonical(content, version=room.version)
        unsigned = {"invite_room_state": self._stripped_state(room, sender)} if membership == "invite" else None
        return self._emit(room, sender, "m.room.member", content, state_key=target, ts=ts, unsigned=unsigned)

    def _ensure_user(self, user_id):
        """An invitee must exist; an unknown one in the namespace is asked of the application service,
        which MUST register it before answering 200. Called without the lock."""
        with self._lock:
            if user_id in self._users:
                return
        if self.is_local(user_id) and self.interested_in_user(user_id) and self._as_url():
            self._query("users", user_id)
            with self._lock:
                if user_id in self._users:
                    return
        raise MatrixError(404, "M_NOT_FOUND", f"Unknown user {user_id}")

    def _resolve_alias(self, alias):
        """room_id of a local alias, asking the application service for one in its namespace."""
        m = ALIAS_RE.fullmatch(alias)
        if not m or len(alias.encode()) > 255:
            raise MatrixError(400, "M_INVALID_PARAM", "Room alias invalid")
        with self._lock:
            if alias in self._aliases:
                return self._aliases[alias][0]
        if m.group(2) == self.server_name and self._in_namespace("aliases", alias) and self._as_url():
            self._query("rooms", alias)
            with self._lock:
                if alias in self._aliases:
                    return self._aliases[alias][0]
        raise MatrixError(404, "M_NOT_FOUND", f"Room alias {alias} not found.")

    def _h_create_room(self, req):
        with self._lock:
            self._ratelimit(req)  # Synapse: request_ratelimiter.ratelimit(requester), first
        body = req.body
        preset = field(body, "preset", str)
        visibility = field(body, "visibility", str, default="private")
        if visibility not in ("public", "private"):
            raise MatrixError(400, "M_INVALID_PARAM", "visibility must be 'public' or 'private'")
        if preset is None:
            preset = "public_chat" if visibility == "public" else "private_chat"
        if preset not in ("private_chat", "public_chat", "trusted_private_chat"):
            raise MatrixError(400, "M_INVALID_PARAM", f"Unknown preset {preset}")
        invite = field(body, "invite", list, default=[])
        for u in invite:
            if not isinstance(u, str) or not USER_ID_RE.fullmatch(u):
                raise MatrixError(400, "M_INVALID_PARAM", f"Invalid user_id in invite: {u!r}")
        name = field(body, "name", str)
        topic = field(body, "topic", str)
        is_direct = field(body, "is_direct", bool, default=False)
        initial_state = field(body, "initial_state", list, default=[])
        for s in initial_state:
            if not isinstance(s, dict) or not isinstance(s.get("type"), str) or \
                    not isinstance(s.get("content"), dict) or not isinstance(s.get("state_key", ""), str):
                raise MatrixError(400, "M_BAD_JSON", "initial_state items need type, content (and state_key)")
        version = field(body, "room_version", str, default=DEFAULT_ROOM_VERSION)
        if version not in SUPPORTED_ROOM_VERSIONS:
            raise MatrixError(400, "M_UNSUPPORTED_ROOM_VERSION", f"Your homeserver does not support {version}")
        for s in initial_state:
            check_canonical(s["content"], version=version)
        creation = field(body, "creation_content", dict, default={})
        override = field(body, "power_level_content_override", dict, default={})
        check_canonical(creation, version=version)
        check_canonical(override, version=version)
        alias = None
        if "room_alias_name" in body:
            alias = f"#{field(body, 'room_alias_name', str)}:{self.server_name}"
            self._check_alias_creation(req, alias)
        for u in invite:
            self._ensure_user(u)
        with self._lock:
            if alias is not None and alias in self._aliases:
                raise MatrixError(400, "M_ROOM_IN_USE", "Room alias already taken")
            user = req.user_id
            room = Room(self._new_room_id(), version, user)
            self._rooms[room.room_id] = room
            create = dict(creation, room_version=version)
            if version != "11":
                create["creator"] = user
            self._emit(room, user, "m.room.create", create, state_key="")
            self._emit(room, user, "m.room.member", self._member_content(user, "join"), state_key=user)
            users = {user: 100}
            if preset == "trusted_private_chat":
                users.update({u: 100 for u in invite})
            pl = {"users": users, "users_default": 0, "events": dict(DEFAULT_POWER_EVENTS), "events_default": 0,
                  "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0, "historical": 100}
            pl.update(override)
            self._emit(room, user, "m.room.power_levels", pl, state_key="")
            if alias is not None:
                self._aliases[alias] = (room.room_id, user)
                room.aliases.add(alias)
                self._emit(room, user, "m.room.canonical_alias", {"alias": alias}, state_key="")
            join_rule = "public" if preset == "public_chat" else "invite"
            self._emit(room, user, "m.room.join_rules", {"join_rule": join_rule}, state_key="")
            self._emit(room, user, "m.room.history_visibility", {"history_visibility": "shared"}, state_key="")
            self._emit(room, user, "m.room.guest_access",
                       {"guest_access": "forbidden" if preset == "public_chat" else "can_join"}, state_key="")
            for s in initial_state:
                if (s["type"] == "m.room.name" and name is not None) or (s["type"] == "m.room.topic" and topic is not None):
                    continue
                self._emit(room, user, s["type"], copy.deepcopy(s["content"]), state_key=s.get("state_key", ""))
            if name is not None:
                self._emit(room, user, "m.room.name", {"name": name}, state_key="")
            if topic is not None:
                self._emit(room, user, "m.room.topic", {"topic": topic}, state_key="")
            extra = {"is_direct": True} if is_direct else None
            if self.fail_invites is not None and self.fail_invites(user):
                raise MatrixError(500, "M_UNKNOWN", "Internal server error (the room is made, not its invitations)")
            if self.defer_invites is None:
                for u in invite:
                    self._membership(room, user, u, "invite", extra=extra)
            else:
                rec = self._serving.rec

                def invite_later():  # as part of the createRoom (should it not be recorded yet)
                    self._serving.rec = rec
                    with self._lock:
                        for u in invite:
                            self._membership(room, user, u, "invite", extra=extra)
                        self._cond.notify_all()
                threading.Timer(self.defer_invites, invite_later).start()
            return 200, {"room_id": room.room_id}

    def _check_alias_creation(self, req, alias):
        m = ALIAS_RE.fullmatch(alias)
        if not m or len(alias.encode()) > 255:
            raise MatrixError(400, "M_INVALID_PARAM", "Room alias invalid")
        if m.group(2) != self.server_name:
            raise MatrixError(400, "M_INVALID_PARAM", "Room alias must be local")
        if req.is_as:
            if not self._in_namespace("aliases", alias):
                raise MatrixError(400, "M_EXCLUSIVE", "This application service has not reserved this kind of alias.")
        elif self._in_namespace("aliases", alias, exclusive_only=True):
            raise MatrixError(400, "M_EXCLUSIVE", "This alias is reserved by an application service.")

    def _h_invite(self, req, room_id):
        target = field(req.body, "user_id", str, required=True)
        reason = field(req.body, "reason", str)
        self._check_user_id(target)
        with self._lock:
            room = self._room(room_id, status=403)
            self._require_joined(room, req.user_id)
        self._ensure_user(target)
        with self._lock:
            self._membership(room, req.user_id, target, "invite", extra={"reason": reason} if reason else None)
        return 200, {}

    def _join(self, req, room_id):
        reason = field(req.body, "reason", str)
        with self._lock:
            room = self._rooms.get(room_id)
            if room is None:
                raise MatrixError(404, "M_NOT_FOUND", f"No known servers for room {room_id}")
            self._membership(room, req.user_id, req.user_id, "join", extra={"reason": reason} if reason else None)
            return 200, {"room_id": room_id}

    def _h_join_id(self, req, room_id):
        return self._join(req, room_id)

    def _h_join(self, req, target):
        if target.startswith("#"):
            return self._join(req, self._resolve_alias(target))
        if not target.startswith("!"):
            raise MatrixError(400, "M_UNKNOWN", f"{target} was not legal room ID or room alias")
        return self._join(req, target)

    def _h_leave(self, req, room_id):
        reason = field(req.body, "reason", str)
        with self._lock:
            room = self._room(room_id, status=403)
            self._membership(room, req.user_id, req.user_id, "leave", extra={"reason": reason} if reason else None)
            if room.typing.pop(req.user_id, None) is not None:
                self._queue_ephemeral_edu(room, self._typing_edu(room))
            return 200, {}

    def _h_kick(self, req, room_id):
        target = field(req.body, "user_id", str, required=True)
        reason = field(req.body, "reason", str)
        with self._lock:
            room = self._room(room_id, status=403)
            if room.membership(target) not in ("join", "invite"):
                raise MatrixError(403, "M_FORBIDDEN", f"{target} is not in the room")
            self._membership(room, req.user_id, target, "leave", extra={"reason": reason} if reason else None)
            return 200, {}

    def _h_ban(self, req, room_id):
        target = field(req.body, "user_id", str, required=True)
        reason = field(req.body, "reason", str)
        with self._lock:
            room = self._room(room_id, status=403)
            self._membership(room, req.user_id, target, "ban", extra={"reason": reason} if reason else None)
            return 200, {}

    def _h_upgrade(self, req, room_id):
        """POST /rooms/{roomId}/upgrade as the specification's "Server behaviour" says (Synapse's
        RoomCreationHandler.upgrade_room does the same): the sender must be allowed to send
        m.room.tombstone; a new room is made with a predecessor in its m.room.create, the transferable
        state copied (membership is not: nobody is invited, nobody but the sender joins), local aliases
        moved, the tombstone sent into the old room, and the old room's events_default and invite raised
        to max(50, users_default + 1)."""
        version = field(req.body, "new_version", str, required=True)
        if version not in SUPPORTED_ROOM_VERSIONS:
            raise MatrixError(400, "M_UNSUPPORTED_ROOM_VERSION", f"Your homeserver does not support {version}")
        with self._lock:
            old = self._room(room_id, status=403)
            self._require_joined(old, req.user_id)
            user = req.user_id
            if old.user_level(user) < old.event_level("m.room.tombstone", True):
                raise MatrixError(403, "M_FORBIDDEN", "You don't have permission to upgrade the room")
            last = old.timeline[-1]["event_id"]
            room = Room(self._new_room_id(), version, user)
            self._rooms[room.room_id] = room
            create = {"room_version": version, "predecessor": {"room_id": room_id, "event_id": last}}
            if version != "11":
                create["creator"] = user
            self._emit(room, user, "m.room.create", create, state_key="")
            self._emit(room, user, "m.room.member", self._member_content(user, "join"), state_key=user)
            for t in ("m.room.power_levels", "m.room.join_rules", "m.room.history_visibility",
                      "m.room.guest_access", "m.room.name", "m.room.topic", "m.room.avatar",
                      "m.room.encryption", "m.room.server_acl"):
                ev = old.state.get((t, ""))
                if ev is not None:
                    self._emit(room, user, t, copy.deepcopy(ev["content"]), state_key="")
            for a in list(old.aliases):
                self._aliases[a] = (room.room_id, self._aliases[a][1])
                old.aliases.discard(a)
                room.aliases.add(a)
            self._emit(old, user, "m.room.tombstone",
                       {"body": "This room has been replaced", "replacement_room": room.room_id}, state_key="")
            pl = copy.deepcopy(old.power_levels())
            if pl:
                restricted = max(50, int(pl.get("users_default", 0)) + 1)
                changed = False
                for k in ("events_default", "invite"):
                    if int(pl.get(k, 0)) < restricted:
                        pl[k] = restricted
                        changed = True
                if changed:
                    self._emit(old, user, "m.room.power_levels", pl, state_key="")
            return 200, {"replacement_room": room.room_id}

    # ------------------------------------------------------------------ directory
    def _h_alias_get(self, req, alias):
        self._optional_auth(req)
        room_id = self._resolve_alias(alias)
        return 200, {"room_id": room_id, "servers": [self.server_name]}

    def _h_alias_put(self, req, alias):
        room_id = field(req.body, "room_id", str, required=True)
        self._check_alias_creation(req, alias)
        with self._lock:
            room = self._room(room_id)
            if not req.is_as:
                self._require_joined(room, req.user_id)
            if alias in self._aliases:
                raise MatrixError(409, "M_UNKNOWN", f"Room alias {alias} already exists.")
            self._aliases[alias] = (room_id, req.user_id)
            room.aliases.add(alias)
            self._effect()
            return 200, {}

    def _h_alias_delete(self, req, alias):
        if not ALIAS_RE.fullmatch(alias):
            raise MatrixError(400, "M_INVALID_PARAM", "Room alias invalid")
        with self._lock:
            if alias not in self._aliases:
                raise MatrixError(404, "M_NOT_FOUND", f"Room alias {alias} not found.")
            room_id, creator = self._aliases[alias]
            allowed = (req.is_as and self._in_namespace("aliases", alias)) or \
                (creator == req.user_id and not self._in_namespace("aliases", alias, exclusive_only=True))
            if not allowed:
                raise MatrixError(403, "M_FORBIDDEN", "You don't have permission to delete the alias.")
            del self._aliases[alias]
            self._rooms[room_id].aliases.discard(alias)
            self._effect()
            return 200, {}

    # ------------------------------------------------------------------ homeserver -> application service
    def _as_request(self, method, path, legacy_path, timeout, json_body=None, session=None):
        """One call to the application service with the hs_token (in the form this homeserver uses)."""
        url = self._as_url()
        target = url + (legacy_path if self.legacy_paths and legacy_path is not None else path)
        token = self.registration.get("hs_token")
        headers, params = {}, None
        if self.token_in_query:
            params = {"access_token": token}
        else:
            headers["Authorization"] = "Bearer " + token
        if json_body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(json_body).encode()
        else:
            data = None
        return (session or requests).request(method, target, params=params, data=data, headers=headers,
                                             timeout=timeout)

    def _query(self, kind, what):
        """GET /users/{userId} or /rooms/{alias}: True when the application service answered 200 with JSON."""
        enc = urllib.parse.quote(what, safe="")
        try:
            r = self._as_request("GET", f"/_matrix/app/v1/{kind}/{enc}", f"/{kind}/{enc}", self.query_timeout)
            r.json()
            return r.status_code == 200
        except (requests.RequestException, ValueError):
            return False

    def _h_ping(self, req, appservice_id):
        if not self.ping_supported:
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        if not req.is_as or appservice_id != self.registration.get("id"):
            raise MatrixError(403, "M_FORBIDDEN", "Provided access token is not the appservice's as_token")
        req.user_id = None
        txn = field(req.body, "transaction_id", str)
        if not self._as_url():
            raise MatrixError(400, "M_URL_NOT_SET", "Application service doesn't have a URL configured")
        start = time.monotonic()
        try:
            r = self._as_request("POST", "/_matrix/app/v1/ping", None, self.ping_timeout,
                                 json_body={"transaction_id": txn} if txn is not None else {})
        except requests.Timeout:
            raise MatrixError(504, "M_CONNECTION_TIMEOUT", "Connection to application service timed out")
        except requests.RequestException:
            raise MatrixError(502, "M_CONNECTION_FAILED", "Failed to connect to application service")
        duration = int((time.monotonic() - start) * 1000)
        try:
            ok = r.status_code == 200 and isinstance(r.json(), dict)
        except ValueError:
            ok = False
        if not ok:
            raise MatrixError(502, "M_BAD_STATUS", f"Ping returned status {r.status_code}",
                              status=r.status_code, body=r.text)
        return 200, {"duration_ms": duration}

    def _push_loop(self):
        session = requests.Session()
        while True:
            with self._cond:
                while not self._closing and not (self._pushing and self._as_url() and
                                                 (self._queue_events or self._queue_ephemeral)):
                    self._cond.wait(0.05)
                if self._closing:
                    return
                events = self._queue_events[:MAX_EVENTS_PER_TXN]
                del self._queue_events[:MAX_EVENTS_PER_TXN]
                ephemeral = self._queue_ephemeral[:MAX_EPHEMERAL_PER_TXN]
                del self._queue_ephemeral[:MAX_EPHEMERAL_PER_TXN]
                txn = {"txn_id": str(self._next_txn), "events": events, "ephemeral": ephemeral, "tries": 0,
                       "status": None, "done": False, "attempts": [], "url": None}
                self._next_txn += 1
                self._transactions.append(txn)
            self._deliver(txn, session)

    def _deliver(self, txn, session):
        """Sends one transaction until the application service takes it, backing off exponentially."""
        eph_key = "de.sorunome.msc2409.ephemeral" if self.unstable_ephemeral else "ephemeral"
        delay = self.retry_base
        while True:
            with self._cond:
                while not self._closing and not (self._pushing and self._as_url()):
                    self._cond.wait(0.05)
                if self._closing:
                    return
                now = now_ms()
                body = {"events": [dict(e, unsigned=dict({k: v for k, v in e["unsigned"].items()
                                                          if not self.strip_prev_content or
                                                          k not in ("prev_content", "replaces_state", "prev_sender")},
                                                         age=max(0, now - e["origin_server_ts"])))
                                   for e in txn["events"]]}
                txn["pushed"] = body["events"]  # as the application service got them
                if txn["ephemeral"] and txn["tries"] == 0:  # Synapse keeps no ephemeral data for retries
                    body[eph_key] = txn["ephemeral"]
                txn["tries"] += 1
                attempt = {"start": time.time(), "end": None, "status": None, "error": None}
                txn["attempts"].append(attempt)
                tid = urllib.parse.quote(txn["txn_id"], safe="")
            ok = False
            try:
                r = self._as_request("PUT", f"/_matrix/app/v1/transactions/{tid}", f"/transactions/{tid}",
                                     self.push_timeout, json_body=body, session=session)
                status = r.status_code
                try:
                    answer_ok = isinstance(r.json(), dict)
                except ValueError:
                    answer_ok = False
                ok = 200 <= status < 300 and answer_ok
                error = None if ok else (f"HTTP {status}" if answer_ok or status >= 300 else "answer not a JSON object")
                txn["url"] = r.request.url
            except requests.RequestException as ex:
                status, error = None, f"{type(ex).__name__}: {ex}"
            if ok and self.lose_answer and self.lose_answer(dict(txn, attempts=list(txn["attempts"]))):
                ok, error = False, "answer lost"
            with self._cond:
                attempt.update(end=time.time(), status=status, error=error)
                txn["status"] = status if status is not None else error
                if ok:
                    txn["done"] = True
                    self._as_down = False
                    self._cond.notify_all()
                    return
                if not self._as_down:  # Synapse keeps no ephemeral data while the service is down
                    self.dropped_ephemeral.extend(self._queue_ephemeral)
                    self._queue_ephemeral.clear()
                self._as_down = True
                deadline = time.time() + delay
                while not self._closing and time.time() < deadline:
                    self._cond.wait(max(0.0, deadline - time.time()))
                if self._closing:
                    return
            delay = min(delay * 2, self.retry_max)


class Client:
    """A client of the stand-in through its own HTTP API (so its rules apply)."""

    def __init__(self, hs, token, user_id=None):
        self.hs = hs
        self.token = token
        self.masquerade = user_id
        self._n = 0

    @property
    def user_id(self):
        return self.call("GET", "/_matrix/client/v3/account/whoami")["user_id"]

    def request(self, method, path, body=None, query=None, raw=None):
        """The raw requests.Response; path is under the server's root and is used as it is."""
        params = dict(query or {})
        if self.masquerade is not None:
            params["user_id"] = self.masquerade
        headers = {"Authorization": "Bearer " + self.token}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return requests.request(method, self.hs.url + path, params=params, data=data, headers=headers, timeout=10)

    def call(self, method, path, body=None, query=None):
        """The JSON answer; an AssertionError saying why when the answer is not 200."""
        if body is None and method in ("POST", "PUT"):
            body = {}
        r = self.request(method, path, body, query)
        assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def _txn(self):
        self._n += 1
        return f"t{time.time_ns()}.{self._n}"

    @staticmethod
    def q(s):
        return urllib.parse.quote(s, safe="")

    def send(self, room, etype, content, txn_id=None, ts=None):
        path = f"/_matrix/client/v3/rooms/{self.q(room)}/send/{self.q(etype)}/{self.q(txn_id or self._txn())}"
        return self.call("PUT", path, content, {"ts": str(ts)} if ts is not None else None)["event_id"]

    def send_text(self, room, body, formatted=None, reply_to=None, msgtype="m.text"):
        content = {"msgtype": msgtype, "body": body}
        if formatted is not None:
            content.update(format="org.matrix.custom.html", formatted_body=formatted)
        if reply_to is not None:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        return self.send(room, "m.room.message", content)

    def edit(self, room, event_id, body):
        new = {"msgtype": "m.text", "body": body}
        return self.send(room, "m.room.message", {"msgtype": "m.text", "body": "* " + body, "m.new_content": new,
                                                  "m.relates_to": {"rel_type": "m.replace", "event_id": event_id}})

    def react(self, room, event_id, key):
        return self.send(room, "m.reaction", {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id,
                                                                "key": key}})

    def redact(self, room, event_id, reason=None):
        path = f"/_matrix/client/v3/rooms/{self.q(room)}/redact/{self.q(event_id)}/{self._txn()}"
        return self.call("PUT", path, {"reason": reason} if reason is not None else {})["event_id"]

    def state(self, room, etype, content, state_key=""):
        path = f"/_matrix/client/v3/rooms/{self.q(room)}/state/{self.q(etype)}/{self.q(state_key)}"
        return self.call("PUT", path, content)["event_id"]

    def get_state(self, room, etype, state_key=""):
        path = f"/_matrix/client/v3/rooms/{self.q(room)}/state/{self.q(etype)}/{self.q(state_key)}"
        return self.call("GET", path)

    def invite(self, room, user_id):
        return self.call("POST", f"/_matrix/client/v3/rooms/{self.q(room)}/invite", {"user_id": user_id})

    def join(self, room_or_alias):
        return self.call("POST", f"/_matrix/client/v3/join/{self.q(room_or_alias)}", {})["room_id"]

    def leave(self, room):
        return self.call("POST", f"/_matrix/client/v3/rooms/{self.q(room)}/leave", {})

    def typing(self, room, typing=True, timeout=30000):
        body = {"typing": typing}
        if typing:
            body["timeout"] = timeout
        user = self.masquerade or self.user_id
        return self.call("PUT", f"/_matrix/client/v3/rooms/{self.q(room)}/typing/{self.q(user)}", body)

    def read_receipt(self, room, event_id, receipt_type="m.read"):
        return self.call("POST", f"/_matrix/client/v3/rooms/{self.q(room)}/receipt/{receipt_type}/{self.q(event_id)}", {})

    def create_room(self, **body):
        return self.call("POST", "/_matrix/client/v3/createRoom", body)["room_id"]

    def upgrade(self, room, new_version="10"):
        return self.call("POST", f"/_matrix/client/v3/rooms/{self.q(room)}/upgrade",
                         {"new_version": new_version})["replacement_room"]

    def create_dm(self, other_user_id, **extra):
        return self.create_room(preset="trusted_private_chat", is_direct=True, invite=[other_user_id], **extra)

    def set_displayname(self, name):
        user = self.masquerade or self.user_id
        return self.call("PUT", f"/_matrix/client/v3/profile/{self.q(user)}/displayname", {"displayname": name})

    def register(self, username):
        """POST /register as the application service (this client's token must be the as_token)."""
        return self.call("POST", "/_matrix/client/v3/register",
                         {"type": "m.login.application_service", "username": username, "inhibit_login": True})

    def joined_members(self, room):
        return self.call("GET", f"/_matrix/client/v3/rooms/{self.q(room)}/joined_members")["joined"]


__all__ = ["Homeserver", "Client", "MatrixError", "MAX_EVENTS_PER_TXN"]
