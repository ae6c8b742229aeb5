"""The HTTP front (gateway/http.c) against what a client does on the wire:
a body sent to no route, a request head trickled a byte at a time."""
import json

import requests

from test_peer_auth import read_answer, send_head


def test_a_request_no_route_takes_is_answered_before_its_body(daemon):
    """A request to no route (404), a method its path does not take
    (405), or a path of the Matrix adapter's it does not know (its 404)
    that announces a body is answered from its headers: no 100 Continue
    for a client that asked for one (RFC 9110 10.1.1: a server that will
    refuse SHOULD NOT send it), and without Expect the answer comes while
    the announced body (900 KB, under the 1 MiB cap) has not been sent.
    Until the forty-ninth session the body was read to its end first
    (with a 100 Continue sent for it) before the 404."""
    cases = [("POST", "/v1/nowhere", 404, "not_found"),
             ("DELETE", "/v1/rooms", 405, "method_not_allowed"),
             ("PUT", "/_matrix/app/v1/nowhere", 404, "M_UNRECOGNIZED")]
    for method, path, want, code in cases:
        for framing in ("length", "chunked"):
            for expect in (True, False):
                h = [("Content-Type", "application/json")]
                h.append(("Content-Length", "900000") if framing == "length" else ("Transfer-Encoding", "chunked"))
                if expect:
                    h.append(("Expect", "100-continue"))
                s = send_head(daemon.port, method, path, h)
                try:
                    status, headers, body, interim = read_answer(s, 5)
                finally:
                    s.close()
                where = (method, path, framing, expect)
                assert status == want and interim == [], (where, status, interim, body)
                j = json.loads(body)
                assert code in (j.get("code"), j.get("errcode")), (where, j)
                if want == 405 and code == "method_not_allowed":
                    assert "POST" in headers["allow"], (where, headers)
    # Without a body the connection stays open for the next request.
    with requests.Session() as sess:
        r1 = sess.get(daemon.url + "/v1/nowhere", timeout=10)
        r2 = sess.get(daemon.url + "/healthz", timeout=10)
        assert r1.status_code == 404 and r2.status_code == 200, (r1.text, r2.text)
        assert r1.headers.get("Connection", "").lower() != "close", r1.headers
