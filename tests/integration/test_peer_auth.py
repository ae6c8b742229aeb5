"""The peer API's authentication: the signed target URI, the keys a peer
may register, the replay cache shared by the peers, the signature a
request carries among others."""
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
    401 whatever its length; one signed correctly is answered up to 8192
    bytes of URI (what the signature parser takes), and a longer one is
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
            r = signed_get(b, padded(b, length, "&limit=2"))
            assert r.status_code == 200, (length, r.text)
            assert len(r.json()["events"]) == 2, r.text
        r = signed_get(b, padded(b, URI_MAX + 1, "&limit=2"))
        assert r.status_code == 414, r.text
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert r.json()["code"] == "uri_too_long" and str(URI_MAX) in r.json()["detail"], r.text
    finally:
        srv.close()
