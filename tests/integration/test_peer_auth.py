"""The peer API's authentication: the signed target URI, the keys a peer
may register, the replay cache shared by the peers, the signature a
request carries among others."""
import base64
import json
import os
import socket
import time

import requests

from test_peer_pull import make_peers

URI_MAX = 8192  # HTTPSIG_MAX_FIELD: the longest @target-uri verified


def signed_get(peer, url, signed_for=None):
    h = {"Authorization": "Bearer " + peer.token}
    h.update(peer.signer.headers("GET", signed_for or url))
    return requests.get(url, headers=h, timeout=10)


def padded(peer, length, tail):
    """An events URL of exactly length bytes ending in tail."""
    head = peer.base + "/v1/events?after=0&pad="
    url = head + "x" * (length - len(head) - len(tail)) + tail
    assert len(url) == length
    return url


def test_a_long_target_uri_is_verified_whole_or_refused_414(daemon):
    """The @target-uri a signature is checked against is never cut: a
    request signed for ...&limit=1 and sent as ...&limit=1000 is refused
    401 whatever its length; one signed correctly is verified up to 8192
    bytes of URI (what the signature parser takes; then refused 400 for
    its padding, a parameter the route does not take), and a longer one is
    refused 414 uri_too_long (problem+json) before its signature is
    checked.  Until the thirty-first session the URI was cut silently at
    4095 bytes and what came after was not signed: the probe's limit=1000
    was honoured (a review's probe)."""
    a, b, rm, srv = make_peers(daemon)
    try:
        for i in range(3):
            a.send(rm["id"], a.user("alice"), f"m{i}")
        signed = padded(b, 4095, "&limit=1")
        r = signed_get(b, signed + "000", signed_for=signed)
        assert r.status_code == 401 and r.json()["code"] == "bad_signature", r.text
        for length in (4098, URI_MAX):
            # its signature verified (not 401), the query is read whole:
            # pad is no parameter of the route (refused since the
            # forty-seventh session; answered without it before)
            r = signed_get(b, padded(b, length, "&limit=2"))
            assert r.status_code == 400 and r.json()["code"] == "invalid_query", (length, r.text)
            assert "unknown query parameter 'pad'" in r.json()["detail"], r.text
        r = signed_get(b, padded(b, URI_MAX + 1, "&limit=2"))
        assert r.status_code == 414, r.text
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert r.json()["code"] == "uri_too_long" and str(URI_MAX) in r.json()["detail"], r.text
    finally:
        srv.close()


P_MINUS = [0xff] * 30 + [0x7f]
# The Ed25519 encodings of the 8 small-order points and of y = 0, 1 and
# -1 past p (libsodium's blocklist, compared with the sign bit cleared).
SMALL_ORDER = [bytes(32), bytes([1] + [0] * 31),
               bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
               bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
               bytes([0xec] + P_MINUS), bytes([0xed] + P_MINUS), bytes([0xee] + P_MINUS)]
WEAK = SMALL_ORDER + [k[:31] + bytes([k[31] | 0x80]) for k in SMALL_ORDER] + \
    [bytes([0xf0] + P_MINUS), bytes([0xff] + [0xff] * 31)]  # y >= p


def test_small_order_and_non_canonical_keys_are_refused_at_create_and_rotate(daemon, pg, db_url):
    """A public key that is a small-order point (the identity: any
    signature R = identity, S = 0 verifies with it), or whose y is not
    below p, is refused 400 invalid_body at creation and at rotation, and
    nothing is stored: the peer keeps its key and token.  Until the
    thirty-first session they were taken (a review's probe registered the
    identity and had a forged signature pass)."""
    import base64
    from peer import PeerClient
    for i, key in enumerate(WEAK):
        r = daemon.admin("POST", "/peers", json={"name": f"weak{i}", "domain": f"weak{i}.example", "mode": "pull",
                                                 "public_key": base64.b64encode(key).decode()})
        assert r.status_code == 400 and r.json()["code"] == "invalid_body", (key.hex(), r.text)
        assert "small-order" in r.json()["detail"], r.text
    assert pg.psql("SELECT count(*) FROM peers", db_url) == "0"
    good = PeerClient(daemon.url, "good", "good.example")
    r = daemon.admin("POST", "/peers", json={"name": "good", "domain": "good.example", "mode": "pull",
                                             "public_key": good.signer.public_b64})
    assert r.status_code == 201, r.text
    good.token = r.json()["token"]
    for key in WEAK:
        r = daemon.admin("POST", "/peers/good/rotate", json={"public_key": base64.b64encode(key).decode()})
        assert r.status_code == 400 and "small-order" in r.json()["detail"], (key.hex(), r.text)
    assert daemon.admin("GET", "/peers/good").json()["public_key"] == good.signer.public_b64
    assert good.call("GET", "/v1/events?after=0").status_code == 200
    # One stored before (written here by hand) is left out of the registry
    # at its next load, its requests 401, and the log names it.
    pg.psql(f"UPDATE peers SET ed25519_public_key = '\\x{WEAK[0].hex()}' WHERE name = 'good'", db_url)
    assert daemon.admin("POST", "/peers/good/disable").ok and daemon.admin("POST", "/peers/good/enable").ok
    assert good.call("GET", "/v1/events?after=0").status_code == 401
    # the log is read from the daemon's output by a thread of its own (session 35)
    from harness import wait_until
    wait_until(lambda: "peer good has a small-order or non-canonical public key" in daemon.log(), what="the log")


class IdentityForger:
    """A "private key" whose every signature is R = the identity, S = 0:
    it verifies over anything with the identity point as public key."""

    def sign(self, data):
        return SMALL_ORDER[1] + bytes(32)


def test_an_admin_change_puts_no_weak_key_into_the_registry(daemon, pg, db_url):
    """An admin change of a peer (here enable) puts the peer as the change
    left it into this process's registry at once; a weak key stored before
    the thirty-first session is left out of it there as at a reload.  Until
    the thirty-second session only the reload left it out, and in between
    (here held open: the reload waits for a lock on peers taken as the
    change commits) a signature forged for the identity key was taken."""
    import base64
    import threading
    from harness import HeldSession, wait_until
    from peer import PeerClient, Signer
    good = PeerClient(daemon.url, "good", "good.example")
    r = daemon.admin("POST", "/peers", json={"name": "good", "domain": "good.example", "mode": "pull",
                                             "public_key": good.signer.public_b64})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    forger = PeerClient(daemon.url, "good", "good.example", token=token, signer=Signer("good", key=IdentityForger()))
    assert forger.call("GET", "/v1/rooms/nothing").status_code == 401  # the registry has the good key
    # disabled first, so that the enable below is a change (an enable of an
    # enabled peer writes nothing since the thirty-sixth session)
    assert daemon.admin("POST", "/peers/good/disable").status_code == 200
    pg.psql(f"UPDATE peers SET ed25519_public_key = '\\x{SMALL_ORDER[1].hex()}' WHERE name = 'good'", db_url)

    def waiting(query):
        return pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                       f"AND query LIKE '{query}%'", db_url) == "1"

    audit = HeldSession(db_url)  # holds the change before its commit
    audit.run("BEGIN; LOCK TABLE audit_log IN EXCLUSIVE MODE;")
    out = []
    change = threading.Thread(target=lambda: out.append(daemon.admin("POST", "/peers/good/enable")))
    change.start()
    wait_until(lambda: waiting("INSERT INTO audit_log"), what="the change waiting for audit_log")
    peers = HeldSession(db_url)  # queued behind the change's lock on peers: has it as the change commits
    locked = threading.Thread(target=peers.run, args=("BEGIN; LOCK TABLE peers IN ACCESS EXCLUSIVE MODE;",))
    locked.start()
    try:
        wait_until(lambda: waiting("LOCK TABLE peers"), what="the lock on peers queued")
        audit.end()
        change.join(30)
        locked.join(30)
        assert out and out[0].status_code == 200, out
        r = forger.call("GET", "/v1/rooms/nothing")
        assert r.status_code == 401, f"a forged signature was taken after the change: {r.status_code} {r.text}"
    finally:
        peers.end()
    wait_until(lambda: "peer good has a small-order or non-canonical public key" in daemon.log(), what="the log")
    assert forger.call("GET", "/v1/rooms/nothing").status_code == 401
    # rotated to a good key, the peer is back at once
    r = daemon.admin("POST", "/peers/good/rotate", json={"public_key": good.signer.public_b64})
    assert r.status_code == 200, r.text
    good.token = r.json()["token"]
    assert good.call("GET", "/v1/events?after=0").status_code == 200
    assert base64.b64decode(daemon.admin("GET", "/peers/good").json()["public_key"]) != SMALL_ORDER[1]


def test_one_peers_volume_does_not_evict_anothers_nonces(make_daemon, db_url):
    """With the replay cache full (peer.replay_cache_entries, here 1000),
    the nonce pushed out is the oldest of the peer holding the most: peer
    B's 1000 signed pulls push out B's own, and A's captured request
    stays refused as a replay.  Until the thirty-first session the oldest
    of all went, and B's volume made A's request replayable (a review's
    probe)."""
    d = make_daemon(db_url, options={"peer": {"replay_cache_entries": "1000"}}).start()
    a, b, rm, srv = make_peers(d)
    try:
        url = a.base + f"/v1/rooms/{rm['id']}"
        h = {"Authorization": "Bearer " + a.token}
        h.update(a.signer.headers("GET", url))
        assert requests.get(url, headers=h, timeout=10).status_code == 200
        r = requests.get(url, headers=h, timeout=10)
        assert r.status_code == 401 and "replay" in r.json()["detail"], r.text
        s = requests.Session()
        pull = b.base + "/v1/events?after=0"
        for _ in range(1000):
            hb = dict(b.signer.headers("GET", pull), Authorization="Bearer " + b.token)
            assert s.get(pull, headers=hb, timeout=10).status_code == 200
        evicted = [line for line in d.get("/metrics").text.splitlines()
                   if line.startswith("causeway_signature_nonces_evicted_live_total")]
        assert evicted and float(evicted[0].split()[-1]) > 0, evicted  # the cache was full
        r = requests.get(url, headers=h, timeout=10)
        assert r.status_code == 401 and "replay" in r.json()["detail"], r.text
    finally:
        srv.close()


def test_the_signature_with_the_configured_tag_is_verified_among_others(daemon):
    """RFC 9421 §3.2: a message may carry several signatures, and the
    verifier picks the one its policy asks for: here the one whose tag is
    peer.signature_tag, wherever it stands among the Signature-Input
    members (another signer's, a proxy's say, before it is not looked
    at).  Until the thirty-first session only the first member was
    considered, and a request whose valid signature came second was
    refused 401 (a review's probe).  Without a member of that tag, the
    first is checked and refused as before (wrong tag)."""
    import time
    a, b, rm, srv = make_peers(daemon)
    try:
        url = b.base + "/v1/events?after=0"
        other_in = 'proxy=("@method");created=%d;keyid="edge";nonce="zz";tag="edge-proxy"' % int(time.time())
        other_sig = "proxy=:" + "A" * 86 + "==:"
        for proxy_first in (True, False):
            h = b.signer.headers("GET", url)
            ins, sigs = [other_in, h["Signature-Input"]], [other_sig, h["Signature"]]
            if not proxy_first:
                ins.reverse()
                sigs.reverse()
            r = requests.get(url, timeout=10, headers={"Authorization": "Bearer " + b.token,
                                                       "Signature-Input": ", ".join(ins),
                                                       "Signature": ", ".join(sigs)})
            assert r.status_code == 200, (proxy_first, r.text)
        r = requests.get(url, timeout=10, headers={"Authorization": "Bearer " + b.token,
                                                   "Signature-Input": other_in, "Signature": other_sig})
        assert r.status_code == 401 and "wrong tag" in r.json()["detail"], r.text
    finally:
        srv.close()


def test_another_signers_signature_with_component_parameters_stands_beside_the_peers(daemon):
    """RFC 9421 allows a component's parameters ("content-type";sf,
    "@query-param";name="after") and a byte sequence as a parameter's
    value, which Causeway does not take: another signer's member using
    them (a proxy's), before or after the peer's, leaves the peer's
    signature verified.  Until the fifty-second session such a member
    refused the whole request 401 "component parameters are not
    supported"; one of the peer's own tag using them, alone, still is."""
    import time
    a, b, rm, srv = make_peers(daemon)
    try:
        url = b.base + "/v1/events?after=0"
        now = int(time.time())
        proxies = ['proxy=("@method";req "@query-param";name="after" "content-type";sf);created=%d;'
                   'keyid="edge";nonce="zz";tag="edge-proxy"' % now,
                   'proxy=("@method");created=%d;keyid="edge";nonce="zz";key=:AAAA:;tag="edge-proxy"' % now]
        other_sig = "proxy=:" + "A" * 86 + "==:"
        for other_in in proxies:
            for proxy_first in (True, False):
                h = b.signer.headers("GET", url)
                ins, sigs = [other_in, h["Signature-Input"]], [other_sig, h["Signature"]]
                if not proxy_first:
                    ins.reverse()
                    sigs.reverse()
                r = requests.get(url, timeout=10, headers={"Authorization": "Bearer " + b.token,
                                                           "Signature-Input": ", ".join(ins),
                                                           "Signature": ", ".join(sigs)})
                assert r.status_code == 200, (other_in, proxy_first, r.text)
        own = proxies[0].replace('"edge-proxy"', '"%s"' % b.signer.tag).replace('"edge"', '"%s"' % b.signer.keyid)
        r = requests.get(url, timeout=10, headers={"Authorization": "Bearer " + b.token,
                                                   "Signature-Input": own, "Signature": other_sig})
        assert r.status_code == 401 and "component parameters are not supported" in r.json()["detail"], r.text
        assert r.headers["Content-Type"].startswith("application/problem+json"), r.headers
    finally:
        srv.close()


def read_answer(sock, timeout):
    """The first final answer on sock (interim 1xx answers collected):
    (status, lower-case headers, body, [interim statuses]); the socket
    times out after timeout seconds without a byte."""
    import socket as _socket
    sock.settimeout(timeout)
    buf, interim = b"", []
    while True:
        while b"\r\n\r\n" not in buf:
            try:
                got = sock.recv(65536)
            except _socket.timeout:
                raise AssertionError(f"no answer within {timeout} s (got {buf!r}, interim {interim})")
            assert got, f"connection closed (got {buf!r}, interim {interim})"
            buf += got
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if 100 <= status < 200:
            interim.append(status)
            continue
        n = int(headers.get("content-length", "0"))
        while len(buf) < n:
            got = sock.recv(65536)
            assert got, "connection closed inside the answer"
            buf += got
        return status, headers, buf[:n], interim


def send_head(port, method, path, headers):
    """Opens a connection to the daemon and sends only a request's head."""
    import socket as _socket
    s = _socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"] + [f"{k}: {v}" for k, v in headers]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return s


def test_a_wrong_token_is_refused_before_the_body_is_read(daemon):
    """A request to the peer or admin API whose bearer token is wrong is
    answered 401 from its headers, before a byte of its body is read:
    with Expect: 100-continue no 100 Continue is sent, and without it the
    401 comes while the announced body (900 KB, under the 1 MiB cap) has
    not been sent at all.  The answer is the one a wrong token always got
    (401 unauthenticated, the same detail, WWW-Authenticate: Bearer).
    Until the thirty-second session the daemon read and buffered the
    whole body first, so anyone could make it hold up to the body cap per
    connection without a credential."""
    a, b, rm, srv = make_peers(daemon)
    try:
        known = requests.post(daemon.url + "/v1/rooms", data=b"{}", timeout=10,
                              headers={"Authorization": "Bearer cwp_wrong", "Content-Type": "application/json"})
        assert known.status_code == 401, known.text
        cases = [("POST", "/v1/rooms", "Bearer cwp_wrong"), ("POST", f"/v1/rooms/{rm['id']}/messages", None),
                 ("POST", "/admin/v1/peers", "Bearer nope")]
        for method, path, auth in cases:
            for expect in (True, False):
                h = [("Content-Type", "application/json"), ("Content-Length", "900000")]
                if auth:
                    h.append(("Authorization", auth))
                if expect:
                    h.append(("Expect", "100-continue"))
                s = send_head(daemon.port, method, path, h)
                try:
                    status, headers, body, interim = read_answer(s, 5)
                finally:
                    s.close()
                assert status == 401 and interim == [], (path, expect, status, interim, body)
                assert headers["content-type"].startswith("application/problem+json"), headers
                assert headers["www-authenticate"] == "Bearer", headers
                j = json.loads(body)
                assert j["code"] == "unauthenticated", j
                if path.startswith("/v1/"):
                    assert j == known.json(), (j, known.json())
        # A right token still gets its 100 Continue and its body read.
        body = json.dumps({"kind": "direct", "members": [a.user("carol"), b.user("dave")]}).encode()
        url = a.base + "/v1/rooms"
        h = dict(a.signer.headers("POST", url, body=body), Authorization="Bearer " + a.token,
                 Expect="100-continue", **{"Content-Length": str(len(body))})
        s = send_head(daemon.port, "POST", "/v1/rooms", list(h.items()))
        try:
            s.settimeout(5)
            first = s.recv(64)
            assert first.startswith(b"HTTP/1.1 100"), first
            s.sendall(body)
            rest = first.partition(b"\r\n\r\n")[2]
            status, _, answer, _ = read_answer(_Prefixed(s, rest), 10)
        finally:
            s.close()
        assert status == 201, answer
    finally:
        srv.close()


class _Prefixed:
    """A socket whose first bytes read are prefix."""

    def __init__(self, sock, prefix):
        self.sock, self.prefix = sock, prefix

    def settimeout(self, t):
        self.sock.settimeout(t)

    def recv(self, n):
        if self.prefix:
            out, self.prefix = self.prefix, b""
            return out
        return self.sock.recv(n)


def send_lines(port, method, path, lines, body=b""):
    """A request whose header lines are sent as listed (a name may come
    several times): (status, the answer's JSON)."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.putrequest(method, path, skip_accept_encoding=True)
        for k, v in lines:
            c.putheader(k, v)
        if body:
            c.putheader("Content-Length", str(len(body)))
        c.endheaders(body or None)
        r = c.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data else None)
    finally:
        c.close()


def signed_lines(peer, method, url, fields, components, body=None):
    """Signature-Input and Signature over components, whose field values are
    fields[name] as the signer combined them (RFC 9421 §2.1)."""
    import base64
    import os
    import time
    from peer import content_digest, serialize_params, signature_base, TAG
    fields = dict(fields)
    if body is not None:
        fields["content-digest"] = content_digest(body)
    params = serialize_params(components, int(time.time()), peer.signer.keyid,
                              base64.urlsafe_b64encode(os.urandom(12)).decode(), TAG)
    sig = peer.signer.key.sign(signature_base(method, url, fields, components, params))
    return [("Signature-Input", "sig1=" + params), ("Signature", "sig1=:" + base64.b64encode(sig).decode() + ":")]


def test_a_covered_field_on_several_lines_is_verified_combined(daemon):
    """RFC 9421 §2.1: a covered field sent on several lines is covered as
    its values trimmed and joined with ", ", in order.  A signer who
    combined them so is answered; one who signed the first line alone
    while a second rides along is refused 401 (until the thirty-second
    session only the first line was looked at: the combined signature
    was refused and the other taken).  Signature-Input and Signature may
    come on several lines too (one signature a line)."""
    a, b, rm, srv = make_peers(daemon)
    try:
        path = "/v1/events?after=0"
        url = b.base + path
        auth = ("Authorization", "Bearer " + b.token)
        comps = ["@method", "@target-uri", "x-extra"]
        lines = [("X-Extra", "one  "), ("X-Extra", " two")]
        ok = send_lines(daemon.port, "GET", path,
                        [auth] + lines + signed_lines(b, "GET", url, {"x-extra": "one, two"}, comps))
        assert ok[0] == 200, ok
        st, j = send_lines(daemon.port, "GET", path,
                           [auth] + lines + signed_lines(b, "GET", url, {"x-extra": "one"}, comps))
        assert st == 401 and j["code"] == "bad_signature", (st, j)
        # Another signer's signature on a line of its own, ours on the next.
        h = b.signer.headers("GET", url)
        other_in = 'proxy=("@method");created=1;keyid="edge";nonce="zz";tag="edge-proxy"'
        st, j = send_lines(daemon.port, "GET", path,
                           [auth, ("Signature-Input", other_in), ("Signature-Input", h["Signature-Input"]),
                            ("Signature", "proxy=:" + "A" * 86 + "==:"), ("Signature", h["Signature"])])
        assert st == 200, (st, j)
    finally:
        srv.close()


def test_a_repeated_content_type_or_idempotency_key_is_refused(daemon, pg, db_url):
    """Content-Type and Idempotency-Key hold one value each (RFC 9110
    §8.3, an Idempotency-Key is one string): sent on two lines they are
    refused 400 invalid_header naming the field, from the headers (the
    body is not read), and nothing is stored, whatever the signature
    says: the handler reads one value, and which one a proxy in front
    took is not known.  A folded line is refused so too.
    Content-Digest, a dictionary, may come on two
    lines: the signature and the body check read the lines joined, every
    sha-256 and sha-512 member must match."""
    import base64
    import hashlib
    a, b, rm, srv = make_peers(daemon)
    try:
        path = f"/v1/rooms/{rm['id']}/messages"
        url = a.base + path
        body = json.dumps({"type": "message", "sender": a.user("alice"),
                           "content": {"parts": [{"type": "text/plain", "body": "hi"}]}}).encode()
        good = a.signer.headers("POST", url, body=body, idem="k1")
        before = pg.psql("SELECT count(*) FROM events", db_url)
        for name, extra in (("Content-Type", "text/plain"), ("Idempotency-Key", "k2"),
                            ("Content-Type", "application/json")):
            lines = [("Authorization", "Bearer " + a.token)] + list(good.items()) + [(name, extra)]
            st, j = send_lines(daemon.port, "POST", path, lines, body)
            assert st == 400 and j["code"] == "invalid_header", (name, st, j)
            assert name in j["detail"] and "more than once" in j["detail"], j
        # libmicrohttpd 0.9.75 glues a folded line (obs-fold) onto the
        # field's name: a name that is not a token is refused the same way.
        for name, value, why in (("Content-Type", "application/json\r\n charset=utf-8", "not a token"),
                                 ("X-Note", "a\r\n\tb c", "not a token")):
            lines = [("Authorization", "Bearer " + a.token)] + [
                (k, v) for k, v in good.items() if k != name] + [(name, value)]
            st, j = send_lines(daemon.port, "POST", path, lines, body)
            assert st == 400 and j["code"] == "invalid_header" and why in j["detail"], (name, st, j)
        assert pg.psql("SELECT count(*) FROM events", db_url) == before
        sha512 = "sha-512=:" + base64.b64encode(hashlib.sha512(body).digest()).decode() + ":"
        comps = ["@method", "@target-uri", "content-digest", "content-type", "idempotency-key"]
        fields = {"content-type": "application/json", "idempotency-key": "k3"}
        for second, want in ((sha512, 202), ("sha-512=:" + "A" * 86 + "==:", 401)):
            from peer import content_digest
            both = dict(fields, **{"content-digest": content_digest(body) + ", " + second})
            sig = signed_lines(a, "POST", url, both, comps)
            lines = [("Authorization", "Bearer " + a.token), ("Content-Type", "application/json"),
                     ("Idempotency-Key", "k3"), ("Content-Digest", content_digest(body)),
                     ("Content-Digest", second)] + sig
            st, j = send_lines(daemon.port, "POST", path, lines, body)
            assert st == want, (second, st, j)
            if want == 401:
                assert "sha-512 digest mismatch" in j["detail"], j
        st, j = send_lines(daemon.port, "POST", path,
                           [("Authorization", "Bearer " + a.token)] + list(good.items()), body)
        assert st == 202, (st, j)
    finally:
        srv.close()


def test_each_signature_with_the_tag_is_tried_up_to_four(daemon):
    """Of several signatures with peer.signature_tag (a peer rotating its
    key signs with both, a proxy may add its own), each is tried in
    order until one verifies, at most four: the right one fourth is
    answered, fifth refused 401 with the first one's reason.  Until the
    thirty-second session the first of the tag alone was tried."""
    from peer import Signer
    a, b, rm, srv = make_peers(daemon)
    try:
        url = b.base + "/v1/events?after=0"
        old = Signer(b.signer.keyid)  # a key not (or no longer) registered
        for pos, want in ((2, 200), (4, 200), (5, 401)):
            ins, sigs = [], []
            for i in range(pos):
                h = (b.signer if i == pos - 1 else old).headers("GET", url)
                label = f"s{i}"
                ins.append(label + h["Signature-Input"][len("sig1"):])
                sigs.append(label + h["Signature"][len("sig1"):])
            r = requests.get(url, timeout=10, headers={"Authorization": "Bearer " + b.token,
                                                       "Signature-Input": ", ".join(ins),
                                                       "Signature": ", ".join(sigs)})
            assert r.status_code == want, (pos, r.text)
            if want == 401:
                assert r.json()["detail"] == "signature 's0' does not verify with key 'tg'", r.text
    finally:
        srv.close()


def test_a_rotating_peers_request_replayed_with_its_new_keys_signature_alone_is_refused(daemon):
    """A peer rotating its key signs with the old and the new one, each
    signature with a nonce of its own.  A request captured while the old
    key was registered (its signature verified, its nonce spent), replayed
    after the rotation with the new key's signature alone and the new
    token (sent in every later request), must be refused as a replay: every
    nonce of the peer's signatures is spent, not only the verified one's.
    Until the forty-seventh session the replay was answered 200."""
    from peer import Signer
    a, b, rm, srv = make_peers(daemon)
    try:
        url = a.base + "/v1/rooms/" + rm["id"]
        new = Signer(a.signer.keyid)
        h_old, h_new = a.signer.headers("GET", url), new.headers("GET", url)
        assert h_old["Signature-Input"] != h_new["Signature-Input"]  # two nonces
        both = {"Signature-Input": "old" + h_old["Signature-Input"][len("sig1"):] + ", new"
                + h_new["Signature-Input"][len("sig1"):],
                "Signature": "old" + h_old["Signature"][len("sig1"):] + ", new" + h_new["Signature"][len("sig1"):]}
        r = requests.get(url, timeout=10, headers=dict(both, Authorization="Bearer " + a.token))
        assert r.status_code == 200, r.text
        r = daemon.admin("POST", "/peers/gk/rotate", json={"public_key": new.public_b64})
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        alone = {"Signature-Input": "new" + h_new["Signature-Input"][len("sig1"):],
                 "Signature": "new" + h_new["Signature"][len("sig1"):]}
        r = requests.get(url, timeout=10, headers=dict(alone, Authorization="Bearer " + token))
        assert r.status_code == 401, f"the replay was taken: {r.status_code} {r.text}"
        assert r.json()["detail"] == "this signature's nonce was seen before (a replay)", r.text
        # A fresh request with the new key is taken.
        a.signer, a.token = new, token
        h = dict(new.headers("GET", url), Authorization="Bearer " + token)
        r = requests.get(url, timeout=10, headers=h)
        assert r.status_code == 200, r.text
    finally:
        srv.close()


def _replayed_after_rotation(a, d1, d2, pg, db_url, path, raw, count):
    """A write signed with a's old and a new key at d1 (taken: count one
    more), a rotated to the new key there and d2 told, then the capture
    replayed to d2 with the new key's signature alone: 401 replay, the
    count unchanged.  The new Signer and token."""
    from harness import wait_until
    from peer import Signer
    new = Signer(a.signer.keyid)
    h_old, h_new = a.signer.headers("POST", a.base + path, raw), new.headers("POST", a.base + path, raw)
    both = dict(h_old, Authorization="Bearer " + a.token)
    both["Signature-Input"] = "old" + h_old["Signature-Input"][4:] + ", new" + h_new["Signature-Input"][4:]
    both["Signature"] = "old" + h_old["Signature"][4:] + ", new" + h_new["Signature"][4:]
    before = int(pg.psql(count, db_url))
    r = d1.request("POST", path, data=raw, headers=both)
    assert r.status_code == 202, r.text
    assert int(pg.psql(count, db_url)) == before + 1
    r = d1.admin("POST", "/peers/gk/rotate", json={"public_key": new.public_b64})
    assert r.status_code == 200, r.text
    token = r.json()["token"]

    def taken_by_d2():  # d2 has reloaded its peers (NOTIFY causeway_peers)
        url = a.base + "/v1/events?after=0"
        h = dict(new.headers("GET", url), Authorization="Bearer " + token)
        return d2.request("GET", "/v1/events?after=0", headers=h).status_code != 401
    wait_until(taken_by_d2, what="the rotation at the second process")
    alone = dict(h_new, Authorization="Bearer " + token)
    alone["Signature-Input"] = "new" + h_new["Signature-Input"][4:]
    alone["Signature"] = "new" + h_new["Signature"][4:]
    r = d2.request("POST", path, data=raw, headers=alone)
    assert r.status_code == 401 and "replay" in r.json()["detail"], f"replay taken: {r.status_code} {r.text}"
    assert int(pg.psql(count, db_url)) == before + 1
    return new, token, before


def test_a_rotating_peers_write_replayed_to_another_process_with_its_new_signature_is_refused(
        make_daemon, pg, db_url):
    """As above, for a write without an idempotency key replayed to another
    daemon process (behind one load balancer): every nonce of the peer's
    signatures is claimed in the database with the write, not only the
    verified one's.  Until the forty-seventh session the replay to the
    other process was taken (202) and stored again."""
    from peer import push_peers
    public = {"server": {"public_url": "https://gw.example.org"}}
    d1 = make_daemon(db_url, options=public).start()
    (a, srv), (_, srv2) = push_peers(d1)
    d2 = make_daemon(db_url, options=public).start()
    try:
        a.base = "https://gw.example.org"
        path = "/v1/reports"
        raw = json.dumps({"reporter": a.user("wally"), "subject": "mimi://example.org/u/alice",
                          "reason": "spam"}).encode()
        _replayed_after_rotation(a, d1, d2, pg, db_url, path, raw, "SELECT count(*) FROM reports")
    finally:
        srv.close()
        srv2.close()


def test_a_push_url_as_typed_is_signed_normalised(daemon):
    """A push_url written with an upper-case host (and a trailing slash)
    is requested and signed as the peer rebuilds its URI from the request
    it gets (RFC 9421 @target-uri): scheme and host lower-case, the
    default port left out (check_httpsig.c notify_url_normalised).  Until
    the thirty-second session the URL as typed was signed, and a peer
    verifying against its own URL refused every push."""
    from peer import NotifyServer, PeerClient
    key = daemon.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    srv = NotifyServer()
    srv.public_b64 = key
    srv.target_base = f"http://localhost:{srv.port}"
    a = PeerClient(daemon.url, "gk", "wa.example")
    r = daemon.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "mode": "push",
                                             "push_url": f"http://LOCALHOST:{srv.port}/",
                                             "public_key": a.signer.public_b64})
    assert r.status_code == 201, r.text
    a.token = r.json()["token"]
    b = PeerClient(daemon.url, "tg", "tg.example")
    b.token = daemon.admin("POST", "/peers", json={"name": "tg", "domain": "tg.example", "mode": "pull",
                                                   "public_key": b.signer.public_b64}).json()["token"]
    try:
        rm = b.create_room([b.user("bob"), a.user("alice")]).json()
        assert b.send(rm["id"], b.user("bob"), "hello").status_code == 202
        got = srv.wait_events(1)
        assert got[0]["content"]["parts"][0]["body"] == "hello", got
        assert srv.errors == [], srv.errors
    finally:
        srv.close()


# The header-time check (thirty-second session) and what it must not break;
# probes of the session's review (rA).

def _signed_message(a, room, text="hi"):
    body = json.dumps({"type": "message", "sender": a.user("alice"),
                       "content": {"parts": [{"type": "text/plain", "body": text}]}}).encode()
    path = f"/v1/rooms/{room}/messages"
    idem = base64.urlsafe_b64encode(os.urandom(9)).decode()
    h = dict(a.signer.headers("POST", a.base + path, body=body, idem=idem),
             Authorization="Bearer " + a.token, **{"Content-Length": str(len(body))})
    return path, h, body


def continued(s):
    """Reads the 100 Continue of a request sent with Expect: 100-continue,
    the sign that its head was read and its token checked (a fixed 0.5 s
    was, until the thirty-fifth session): the bytes read after it."""
    s.settimeout(10)
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(4096)
        assert got, f"connection closed (got {buf!r})"
        buf += got
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 100"), head
    return rest


def test_a_peer_disabled_while_its_body_is_on_the_way_is_refused(daemon):
    """The token is looked up from the headers; a peer the operator
    disables (or whose token she rotates) before the body has arrived must
    not have the request taken: before the thirty-second session the
    lookup was made with the whole body read, just before the handler."""
    a, b, rm, srv = make_peers(daemon)
    try:
        path, h, body = _signed_message(a, rm["id"])
        s = send_head(daemon.port, "POST", path, list(h.items()) + [("Expect", "100-continue")])
        try:
            rest = continued(s)  # the head is read and its token checked
            r = daemon.admin("POST", "/peers/gk/disable")
            assert r.status_code == 200, r.text
            s.sendall(body)
            status, _, answer, _ = read_answer(_Prefixed(s, rest), 10)
        finally:
            s.close()
        assert status == 401, f"a disabled peer's request was taken: {status} {answer!r}"
    finally:
        srv.close()


def test_a_peer_rotated_while_its_body_is_on_the_way_is_refused(daemon):
    """As above with a rotation (the old token and key stolen)."""
    a, b, rm, srv = make_peers(daemon)
    try:
        path, h, body = _signed_message(a, rm["id"])
        s = send_head(daemon.port, "POST", path, list(h.items()) + [("Expect", "100-continue")])
        try:
            rest = continued(s)
            from peer import Signer
            r = daemon.admin("POST", "/peers/gk/rotate", json={"public_key": Signer("gk").public_b64})
            assert r.status_code == 200, r.text
            s.sendall(body)
            status, _, answer, _ = read_answer(_Prefixed(s, rest), 10)
        finally:
            s.close()
        assert status == 401, f"a rotated peer's old credentials were taken: {status} {answer!r}"
    finally:
        srv.close()


def _sent_in_two(daemon, a, rm, text, between):
    """A signed message whose head is sent first, between() run once it is
    read (its token checked), then its body: (status, answer)."""
    path, h, body = _signed_message(a, rm["id"], text)
    s = send_head(daemon.port, "POST", path, list(h.items()) + [("Expect", "100-continue")])
    try:
        rest = continued(s)
        between()
        s.sendall(body)
        status, _, answer, _ = read_answer(_Prefixed(s, rest), 10)
    finally:
        s.close()
    return status, answer


def test_a_body_after_its_head_is_taken_with_the_registry_unchanged_or_not(daemon):
    """After the body the peer found from the headers is kept while the
    peer registry is the one it was found in, and looked up again when
    anything changed meanwhile (forty-fourth session: every signed request
    hashed its token and copied its peer twice).  Either way a request of
    a peer that nothing changed is taken and its message stored; the
    refusals of a peer disabled or rotated meanwhile are the two tests
    above."""
    a, b, rm, srv = make_peers(daemon)
    try:
        st, answer = _sent_in_two(daemon, a, rm, "registry unchanged", lambda: None)
        assert st == 202, (st, answer)

        def another_peer_added():
            from peer import Signer
            r = daemon.admin("POST", "/peers", json={"name": "zz", "domain": "zz.example", "mode": "pull",
                                                    "public_key": Signer("zz").public_b64})
            assert r.status_code == 201, r.text

        st, answer = _sent_in_two(daemon, a, rm, "another peer added", another_peer_added)
        assert st == 202, (st, answer)

        def another_peer_disabled():
            assert daemon.admin("POST", "/peers/zz/disable").status_code == 200

        st, answer = _sent_in_two(daemon, a, rm, "another peer disabled", another_peer_disabled)
        assert st == 202, (st, answer)
        got = b.call("GET", "/v1/events?after=0").json()["events"]
        bodies = [e["content"]["parts"][0]["body"] for e in got if e.get("type") == "message"]
        assert bodies == ["registry unchanged", "another peer added", "another peer disabled"], bodies
    finally:
        srv.close()


def test_a_wrong_token_with_its_body_sent_at_once_still_reads_the_401(daemon):
    """A client that sends head and body together (no Expect, as most do)
    with a wrong token must be able to read its 401: a close with unread
    bytes in the socket makes the kernel send RST, and the client then
    loses the answer."""
    body = b"x" * 900000
    lost = 0
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        head = (f"POST /v1/rooms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cwp_wrong\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        try:
            try:
                s.sendall(head + body)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                status, _, _, _ = read_answer(s, 5)
                assert status == 401
            except (ConnectionResetError, AssertionError) as ex:
                lost += 1
                print("lost:", repr(ex)[:200])
        finally:
            s.close()
    assert lost == 0, f"{lost} of 5 clients lost their 401"


def test_an_early_401_to_a_patch_does_not_read_its_body_as_a_request(daemon):
    """A refused PATCH's body, left unread, must not be taken as the next
    request on the connection (request smuggling behind a proxy)."""
    inner = b"GET /admin/v1/rules HTTP/1.1\r\nHost: x\r\n\r\n"
    head = (f"PATCH /admin/v1/rules/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(inner)}\r\n\r\n").encode()
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    try:
        s.sendall(head + inner)
        status, _, _, _ = read_answer(s, 5)
        assert status == 401
        s.settimeout(2)
        try:
            more = s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            more = b""
        assert not more, f"the body was answered as a request: {more[:200]!r}"
    finally:
        s.close()


def test_http10_and_chunked_with_a_right_token(daemon):
    """HTTP/1.0 and a chunked body with a right token are still served."""
    a, b, rm, srv = make_peers(daemon)
    try:
        path, h, body = _signed_message(a, rm["id"], "c")
        del h["Content-Length"]
        h["Transfer-Encoding"] = "chunked"
        s = send_head(daemon.port, "POST", path, list(h.items()))
        try:
            s.sendall(b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
            status, _, answer, _ = read_answer(s, 10)
        finally:
            s.close()
        assert status in (200, 201, 202), answer
        path, h, body = _signed_message(a, rm["id"], "d")
        s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        lines = [f"POST {path} HTTP/1.0", f"Host: 127.0.0.1:{daemon.port}"] + [f"{k}: {v}" for k, v in h.items()]
        try:
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            status, _, answer, _ = read_answer(s, 10)
        finally:
            s.close()
        assert status in (200, 201, 202), answer
    finally:
        srv.close()


def test_a_signed_request_line_in_absolute_form_is_served(daemon):
    """A request line in absolute form (POST http://host/v1/... HTTP/1.1),
    which RFC 9112 3.2.2 makes a server accept, is routed by its path and
    its signature checked over the same @target-uri as in origin form;
    another authority in it does not change what the signature must cover.
    Until the forty-eighth session every such request was 404."""
    a, b, rm, srv = make_peers(daemon)
    try:
        for authority in (daemon.url, "http://elsewhere.example"):
            path, h, body = _signed_message(a, rm["id"], "abs")
            s = send_head(daemon.port, "POST", authority + path, list(h.items()))
            try:
                s.sendall(body)
                status, _, answer, _ = read_answer(s, 10)
            finally:
                s.close()
            assert status in (200, 201, 202), (authority, status, answer)
        # signed for another authority than the gateway's: refused, as in origin form
        path, h, body = _signed_message(a, rm["id"], "abs")
        body_h = dict(h, **a.signer.headers("POST", "http://elsewhere.example" + path, body=body,
                                            idem=h["Idempotency-Key"]))
        s = send_head(daemon.port, "POST", "http://elsewhere.example" + path, list(body_h.items()))
        try:
            s.sendall(body)
            status, _, answer, _ = read_answer(s, 10)
        finally:
            s.close()
        assert status == 401, answer
    finally:
        srv.close()


def test_a_peer_disabled_or_rotated_writes_nothing_through_a_process_not_yet_reloaded(make_daemon, pg, db_url):
    """A peer disabled (its token leaked) or rotated is refused every write
    at once by every daemon process of the database, not only at the next
    reload of each one's registry: each write asks the table, within its
    transaction, whether the peer is still enabled with the token the
    request came with (PEER_IN_FORCE_SQL).  The change is made here in SQL,
    which tells no process (no NOTIFY): the second process's registry
    still holds the peer as it was until its periodic reload (30 s after
    its start), which is what a busy or reconnecting pull thread makes of
    an admin change.  Messages and receipts (the pipelined submit), a batch
    and a report (a job's write) are all 401 there, and nothing is stored.
    Until the forty-seventh session each was taken (202/200)."""
    import hashlib
    from peer import PeerClient, push_peers
    d1 = make_daemon(db_url).start()
    (a, srv), (b, srv2) = push_peers(d1)
    try:
        rm = a.create_room([a.user("alice"), b.user("bob")]).json()
        d2 = make_daemon(db_url).start()
        a2 = PeerClient(d2.url, a.name, a.domain, token=a.token, signer=a.signer)
        m = a2.send(rm["id"], a.user("alice"), "taken before")
        assert m.status_code == 202, m.text  # d2's registry has the peer
        events = "SELECT count(*) FROM events"
        reports = "SELECT count(*) FROM reports"

        def writes(c, what):
            before = (int(pg.psql(events, db_url)), int(pg.psql(reports, db_url)))
            got = [
                c.send(rm["id"], a.user("alice"), "after " + what),
                c.call("POST", f"/v1/rooms/{rm['id']}/receipts",
                       {"type": "receipt", "sender": a.user("alice"),
                        "content": {"receipt": "read", "in_reply_to": m.json()["id"]}}),
                c.call("POST", "/v1/batch", {"events": [
                    {"idempotency_key": "b-" + what, "room": rm["uri"],
                     "event": {"type": "message", "sender": a.user("alice"),
                               "content": {"parts": [{"type": "text/plain", "body": "batch " + what}]}}}]}),
                c.call("POST", "/v1/reports", {"reporter": a.user("alice"), "subject": "mimi://example.org/u/alice",
                                               "reason": "spam"}),
            ]
            for r in got:
                assert r.status_code == 401, f"{what}: {r.request.method} {r.request.url}: {r.status_code} {r.text}"
                assert r.json()["code"] == "unauthenticated", r.text
                assert r.headers.get("WWW-Authenticate") == "Bearer", r.headers
            assert (int(pg.psql(events, db_url)), int(pg.psql(reports, db_url))) == before, what

        pg.psql("UPDATE peers SET enabled = false, disabled_at = now() WHERE name = 'gk'", db_url)
        writes(a2, "disabled")
        token = "cwp_" + base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        pg.psql("UPDATE peers SET enabled = true, disabled_at = NULL, token_hash = '\\x"
                + hashlib.sha256(token.encode()).hexdigest() + "' WHERE name = 'gk'", db_url)
        writes(a2, "rotated")
        # d2 takes the new token once it reloads; d1 (told of nothing
        # either) takes the old one's writes no more.
        writes(a, "rotated-d1")
    finally:
        srv.close()
        srv2.close()


def test_a_rotating_peers_keyless_receipt_replayed_to_another_process_with_its_new_signature_is_refused(
        make_daemon, pg, db_url):
    """A receipt (or typing notification) sent without an Idempotency-Key
    gets a key made from its verified signature's nonce; a rotating peer
    signs with its old and its new key, and the capture, replayed to
    another daemon process after the rotation with the new key's signature
    alone, made another key there.  The write now claims the nonces of all
    the request's signatures, as a job's write does: the replay is 401
    bad_signature and nothing is stored again.  Until the forty-seventh
    session it was taken (202) and stored twice."""
    from peer import push_peers
    public = {"server": {"public_url": "https://gw.example.org"}}
    d1 = make_daemon(db_url, options=public).start()
    (a, srv), (b, srv2) = push_peers(d1)
    d2 = make_daemon(db_url, options=public).start()
    try:
        a.base = "https://gw.example.org"

        def signed(path, body, idem):
            data = json.dumps(body).encode()
            h = dict(a.signer.headers("POST", a.base + path, data, idem=idem), Authorization="Bearer " + a.token)
            return d1.request("POST", path, data=data, headers=h)
        rm = signed("/v1/rooms", {"kind": "direct", "members": [a.user("alice"), b.user("bob")]}, "rm1").json()
        m = signed(f"/v1/rooms/{rm['id']}/messages", {"type": "message", "sender": a.user("alice"), "content": {
            "parts": [{"type": "text/plain", "body": "read me"}]}}, "m1")
        assert m.status_code == 202, m.text
        path = f"/v1/rooms/{rm['id']}/receipts"
        raw = json.dumps({"type": "receipt", "sender": a.user("alice"),
                          "content": {"receipt": "read", "in_reply_to": m.json()["id"]}}).encode()
        count = "SELECT count(*) FROM events WHERE type = 'receipt'"
        new, token, before = _replayed_after_rotation(a, d1, d2, pg, db_url, path, raw, count)
        # A fresh keyless receipt signed with the new key is taken there.
        fresh = dict(new.headers("POST", a.base + path, raw), Authorization="Bearer " + token)
        r = d2.request("POST", path, data=raw, headers=fresh)
        assert r.status_code == 202, r.text
        assert int(pg.psql(count, db_url)) == before + 2
    finally:
        srv.close()
        srv2.close()


def test_a_rotated_peers_users_join_through_a_process_not_yet_reloaded_joins_nobody(make_daemon, pg, db_url):
    """A peer's user's own join of a group she left joins her in a statement
    before its event is written (submit_join): that statement asks the
    table too (PEER_IN_FORCE_SQL), so a peer rotated (here in SQL: no
    process is told) has its user's join through a process whose registry
    still holds the old token refused 401 with her membership unchanged.
    Until the forty-seventh session she was joined."""
    import hashlib
    from peer import PeerClient, push_peers
    d1 = make_daemon(db_url).start()
    (a, srv), (b, srv2) = push_peers(d1)
    try:
        eve = a.user("eve")
        gid = a.create_room([a.user("alice"), eve, b.user("bob")], kind="group").json()["id"]

        def own(membership):
            return {"type": "membership", "sender": eve, "content": {"membership": membership, "target": eve}}
        assert a.call("POST", f"/v1/rooms/{gid}/messages", own("leave"), idem="eve-leaves").status_code == 202
        eves = ("SELECT m.membership FROM room_members m JOIN identities i ON i.id = m.identity_id "
                f"JOIN rooms r ON r.id = m.room_id WHERE r.public_id = '{gid}' AND i.uri = '{eve}'")
        assert pg.psql(eves, db_url) == "left"
        d2 = make_daemon(db_url).start()
        a2 = PeerClient(d2.url, a.name, a.domain, token=a.token, signer=a.signer)
        assert a2.send(gid, a.user("alice"), "taken before").status_code == 202  # d2 has the peer
        token = "cwp_" + base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        pg.psql("UPDATE peers SET token_hash = '\\x" + hashlib.sha256(token.encode()).hexdigest()
                + "' WHERE name = 'gk'", db_url)
        r = a2.call("POST", f"/v1/rooms/{gid}/messages", own("join"), idem="eve-joins")
        assert r.status_code == 401, r.text
        assert pg.psql(eves, db_url) == "left"
    finally:
        srv.close()
        srv2.close()


def test_a_disabled_pull_peers_pull_through_a_process_not_yet_reloaded_is_refused(make_daemon, pg, db_url):
    """A pull acknowledges and hands out: its claim asks the table whether
    the peer is still in force (PEER_IN_FORCE_SQL) as a write does, so a
    pull peer disabled (here in SQL: no process is told) gets 401 from a
    process whose registry still holds it, and nothing is handed out.
    Until the forty-seventh session it was answered its events."""
    from peer import PeerClient
    d1 = make_daemon(db_url).start()
    a, b, rm, srv = make_peers(d1)
    try:
        d2 = make_daemon(db_url).start()
        b2 = PeerClient(d2.url, b.name, b.domain, token=b.token, signer=b.signer)
        assert b2.call("GET", "/v1/events?after=0").status_code == 200  # d2 has the peer
        assert a.send(rm["id"], a.user("alice"), "for bob").status_code == 202
        pg.psql("UPDATE peers SET enabled = false, disabled_at = now() WHERE name = 'tg'", db_url)
        r = b2.call("GET", "/v1/events?after=0")
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated", r.text
        pg.psql("UPDATE peers SET enabled = true, disabled_at = NULL WHERE name = 'tg'", db_url)
        r = b2.call("GET", "/v1/events?after=0")
        assert r.status_code == 200 and [e["content"]["parts"][0]["body"] for e in r.json()["events"]
                                         if e["type"] == "message"] == ["for bob"], r.text
    finally:
        srv.close()
