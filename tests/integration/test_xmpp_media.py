"""Which fetches of a peer's files carry Causeway's signature (docs/security.md
"Media"): Causeway's signature is its credential at every peer's store, so
a file a peer names is fetched signed only from a host of that peer's own
domain (or under it); any other host, another peer's or a look-alike, gets
a plain GET.  Until the nineteenth session every such fetch was signed,
whatever its host: a peer could have Causeway fetch another peer's private
file with Causeway's credentials and hand it to the users it reaches.

The stores here are names under "localhost", which libcurl resolves to
loopback by itself: the peer gk is of domain wa.localhost."""
import base64
import os
import threading
import time
import urllib.parse

import pytest
import requests

from harness import wait_until
from peer import MediaServer, verify_get
from test_xmpp import (ALICE, MUC, MUC_USER, WALLY_JID, alice, assert_no_avatar, avatar_logs,  # noqa: F401
                       consent_alice, give_avatar, held_bytes, link_mac, photo_link, profile_changes_read, prosody,
                       q, slow_reader, start_with_gk, vcard_photo)

DOMAIN = "wa.localhost"
HOSTS = ("wa.localhost", "media.wa.localhost", "cdn.media.wa.localhost", "media.evil-wa.localhost",
         "evilwa.localhost", "media.tg.localhost")
SIGNED = ("wa.localhost", "media.wa.localhost", "cdn.media.wa.localhost")
PLAIN = ("media.evil-wa.localhost", "evilwa.localhost", "media.tg.localhost")


def signed(headers):
    return "Signature" in headers or "Signature-Input" in headers


def start(make_daemon, db_url, prosody, tmp_path, **server):
    """The stores, the daemon with gk (server: more [server] options), and a
    room of wally's and alice's (she allowed him): (media, daemon, gk's
    client, its notify server, Causeway's public key, the room)."""
    media = MediaServer(tmp_path, hosts=HOSTS)
    d, a, srv = start_with_gk(make_daemon, db_url, prosody, domain=DOMAIN,
                              server={"ca_file": media.cert_file, "media_private_addresses": "true", **server})
    key = d.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    consent_alice(d, f"mimi://{DOMAIN}/u/wally")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    return media, d, a, srv, key, room


def test_a_link_is_fetched_signed_only_from_the_peers_own_hosts(make_daemon, db_url, prosody, alice, tmp_path):
    """An XMPP link (XEP-0066) to a file of the peer's domain or a name under
    it is followed with Causeway's signature; one to another peer's host or
    to a look-alike (evil-wa.localhost is not under wa.localhost) with none,
    and still served (a CDN's file needs no signature).  The link names the
    peer's domain (by=) under its MAC."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        for i, host in enumerate(SIGNED + PLAIN):
            data = os.urandom(700 + i)
            url = media.put(f"/f/{i}.jpg", "image/jpeg", data, host=host)
            _, link = photo_link(a, alice, room, url, data)
            assert urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["by"] == [DOMAIN], link
            got = requests.get(link, timeout=10)
            assert got.status_code == 200 and got.content == data, (host, got.status_code, got.text[:200])
            path, headers = media.requests[-1]
            assert path == f"/f/{i}.jpg" and headers["Host"].startswith(host + ":"), (host, headers)
            if host in SIGNED:
                verify_get("GET", url, headers, key)
            else:
                assert not signed(headers), (host, headers)
        assert len(media.requests) == len(SIGNED + PLAIN)
        # by= is under the MAC: another domain there is a forged link.
        forged = link.replace(f"by={DOMAIN}", "by=tg.localhost")
        r = requests.get(forged, timeout=10)
        assert r.status_code == 404 and r.json()["code"] == "unknown_media", r.text[:200]
        assert len(media.requests) == len(SIGNED + PLAIN)
    finally:
        srv.close()
        media.close()


def test_a_redirect_carries_the_signature_only_to_the_peers_own_hosts(make_daemon, db_url, prosody, alice,
                                                                      tmp_path):
    """Redirects are followed hop by hop, each signed (over its own URL) only
    when its host is the peer's: a file of the peer's store that redirects
    to another peer's host reaches that host unsigned."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        data = os.urandom(900)
        there = media.put("/tg/file.jpg", "image/jpeg", data, host="media.tg.localhost")
        back = media.put("/wa/back.jpg", "image/jpeg", data, host="cdn.media.wa.localhost")
        media.redirect["/wa/file.jpg"] = there
        media.redirect["/tg/next.jpg"] = back
        url = f"https://media.wa.localhost:{media.port}/wa/file.jpg"
        _, link = photo_link(a, alice, room, url, data)
        got = requests.get(link, timeout=10)
        assert got.status_code == 200 and got.content == data, (got.status_code, got.text[:200])
        [(p1, h1), (p2, h2)] = media.requests
        assert (p1, p2) == ("/wa/file.jpg", "/tg/file.jpg")
        verify_get("GET", url, h1, key)
        assert not signed(h2), h2
        # Another host's redirect back to the peer's: that hop is the
        # peer's, signed over its own URL.
        media.requests.clear()
        _, link2 = photo_link(a, alice, room, f"https://media.tg.localhost:{media.port}/tg/next.jpg", data)
        got = requests.get(link2, timeout=10)
        assert got.status_code == 200 and got.content == data, (got.status_code, got.text[:200])
        [(q1, g1), (q2, g2)] = media.requests
        assert (q1, q2) == ("/tg/next.jpg", "/wa/back.jpg") and not signed(g1), g1
        verify_get("GET", back, g2, key)
    finally:
        srv.close()
        media.close()


def test_a_link_made_before_it_named_its_peer_is_fetched_unsigned(make_daemon, db_url, prosody, alice, tmp_path):
    """A link made before the nineteenth session has no by=: its MAC still
    holds, and it is followed, but without a signature (nothing says which
    peer named it)."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        data = os.urandom(800)
        url = media.put("/f/old.jpg", "image/jpeg", data, host="media.wa.localhost")
        _, link = photo_link(a, alice, room, url, data)
        requests.get(link, timeout=10)
        verify_get("GET", url, media.requests[-1][1], key)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
        base = link.split("?")[0].rsplit("/", 1)[0]
        exp, size = query["exp"][0], str(len(data))
        scope = f"\npublic\n{size}\n{exp}"  # no by
        old = f"{base}/{link_mac(d, scope, url)}?src={query['src'][0]}&size={size}&exp={exp}"
        got = requests.get(old, timeout=10)
        assert got.status_code == 200 and got.content == data, (got.status_code, got.text[:200])
        assert len(media.requests) == 2 and not signed(media.requests[-1][1]), media.requests[-1]
    finally:
        srv.close()
        media.close()


def test_an_avatar_is_fetched_signed_only_from_the_peers_own_hosts(make_daemon, db_url, prosody, alice, tmp_path):
    """A remote user's avatar (the vCard's photo) is fetched as any file of
    its peer: signed from a host of the peer's domain (peers table), plain
    from another's."""
    media, d, a, srv, key, _ = start(make_daemon, db_url, prosody, tmp_path)
    try:
        for i, host in enumerate(("media.wa.localhost", "media.evil-wa.localhost", "media.tg.localhost")):
            face = b"\x89PNG\r\n\x1a\n" + os.urandom(1000 + i)
            url = media.put(f"/u/wally-{i}.png", "image/png", face, host=host)
            assert a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": "Wally", "avatar": {
                "content_type": "image/png", "url": url, "size": len(face)}}).status_code == 200

            def photo():
                v = alice.iq("get", WALLY_JID, "<vCard xmlns='vcard-temp'/>").find("{vcard-temp}vCard")
                binval = v.find("{vcard-temp}PHOTO/{vcard-temp}BINVAL")
                return binval is not None and base64.b64decode(binval.text) == face
            wait_until(photo, timeout=20, what=f"the avatar at {host} in the vCard")
            path, headers = media.requests[-1]
            assert path == f"/u/wally-{i}.png", media.requests
            if i == 0:
                verify_get("GET", url, headers, key)
            else:
                assert not signed(headers), (host, headers)
    finally:
        srv.close()
        media.close()


def test_an_avatar_fetch_counts_against_the_held_budget(make_daemon, db_url, prosody, alice, tmp_path):
    """An avatar's fetch reserves its cap (192 KiB here) from the bytes of
    fetched files held (server.media_fetches x server.media_max_bytes), as
    a link's fetch does: while a reader that never reads holds nearly all
    of it, the vCard comes without the photo, not fetched; once those bytes
    are given back, the next ask fetches it, and its bytes are given back
    too.  Until the nineteenth session the avatar's fetch reserved nothing."""
    media = MediaServer(tmp_path, hosts=HOSTS)
    d, a, srv = start_with_gk(make_daemon, db_url, prosody, domain=DOMAIN, server={
        "ca_file": media.cert_file, "media_private_addresses": "true", "media_fetches": "1",
        "media_max_bytes": str((6 << 20) + (64 << 10))})
    try:
        consent_alice(d, f"mimi://{DOMAIN}/u/wally")
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        data = os.urandom(6 << 20)  # leaves 64 KiB, under an avatar's cap
        _, link = photo_link(a, alice, room, media.put("/big.jpg", "image/jpeg", data, host="media.wa.localhost"),
                             data)
        slow = slow_reader(link)
        held = lambda: held_bytes(d)
        wait_until(lambda: held() == len(data), timeout=60, what="the slow reader's file held")
        # The avatar given now: nothing fetched it before the bytes were held.
        face = b"\x89PNG\r\n\x1a\n" + os.urandom(1500)
        give_avatar(a, media.put("/u/wally.png", "image/png", face, host="media.wa.localhost"), face)
        assert vcard_photo(alice) is None
        assert [p for p, _ in media.requests] == ["/big.jpg"]  # the avatar not fetched
        slow.close()
        wait_until(lambda: held() == 0, what="the bytes given back")
        wait_until(lambda: vcard_photo(alice) == face, what="the avatar once there is room")
        wait_until(lambda: held() == 0, what="the avatar's bytes given back")
    finally:
        srv.close()
        media.close()


def test_a_link_whose_fetch_is_refused_for_good_is_403_not_try_again(make_daemon, db_url, prosody, alice,
                                                                     tmp_path):
    """A link whose file this gateway refuses to fetch for a fact of its URL
    (a redirect to plain http, more than 3 redirects), which no retry
    changes, is answered 403 media_refused with why, without Retry-After;
    until the twenty-sixth session it was 503 "try again later", and a
    client tried again for ever.  A store that is away is still 503 with
    Retry-After: that may mend."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        data = os.urandom(600)
        media.redirect["/f/plain.jpg"] = "http://127.0.0.1:9/f/plain.jpg"
        media.redirect["/f/loop.jpg"] = f"https://media.wa.localhost:{media.port}/f/loop.jpg"
        for name, why in (("plain.jpg", "not over https"), ("loop.jpg", "too many redirects")):
            _, link = photo_link(a, alice, room, f"https://media.wa.localhost:{media.port}/f/{name}", data)
            r = requests.get(link, timeout=10)
            assert r.status_code == 403 and "Retry-After" not in r.headers, (name, r.status_code, r.text[:200])
            p = r.json()
            assert p["code"] == "media_refused" and p["title"] == "Forbidden" and why in p["detail"], p
        assert [p for p, _ in media.requests].count("/f/loop.jpg") == 4  # the first answer and 3 redirects
        # Away (the store answers 503): try again later, as before.
        url = media.put("/f/away.jpg", "image/jpeg", data, host="media.wa.localhost")
        media.status["/f/away.jpg"] = 503
        _, link = photo_link(a, alice, room, url, data)
        r = requests.get(link, timeout=10)
        assert r.status_code == 503 and r.json()["code"] == "unavailable", r.text[:200]
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        srv.close()
        media.close()


def test_a_link_whose_store_answers_no_file_for_good_is_403_not_try_again(make_daemon, db_url, prosody, alice,
                                                                          tmp_path):
    """A store whose last answer is a redirect that names no Location (or a
    304 to a plain GET), or a success other than 200 (204: nothing, 206:
    part of the file to a request for all of it), holds no file for the
    link however often it is asked: 403 media_refused with why, no
    Retry-After.  Until the fifty-first session's review it was 503 "try
    again later" with Retry-After, and an XMPP client followed the link
    again for ever."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        data = os.urandom(600)
        for status, why in ((302, "redirect"), (304, "redirect"), (204, "204"), (206, "part of the file"),
                            (203, "another success than 200")):
            url = media.put(f"/f/s{status}.jpg", "image/jpeg", data, host="media.wa.localhost")
            media.status[f"/f/s{status}.jpg"] = status
            _, link = photo_link(a, alice, room, url, data)
            r = requests.get(link, timeout=10)
            assert r.status_code == 403 and "Retry-After" not in r.headers, (status, r.status_code, r.text[:200])
            p = r.json()
            assert p["code"] == "media_refused" and why in p["detail"], (status, p)
        # The store asked once a follow, and the file served once it answers it.
        assert [p for p, _ in media.requests].count("/f/s203.jpg") == 1
        del media.status["/f/s203.jpg"]
        r = requests.get(link, timeout=10)
        assert r.status_code == 200 and r.content == data, (r.status_code, r.text[:200])
    finally:
        srv.close()
        media.close()


def test_an_avatar_is_carried_only_as_an_image_of_the_type_its_profile_names(make_daemon, db_url, pg, prosody,
                                                                             alice, tmp_path):
    """A remote user's avatar reaches XMPP clients only as a PNG, JPEG, GIF
    or WebP (XEP-0153 §3.1), and only when its bytes are a file of the
    type the profile names: an SVG (which runs scripts and loads what it
    links to in a client that renders it) is not fetched, and a file
    served as image/png that is an SVG is none (logged why), as an empty
    one is.  Until the fiftieth session any
    image/ type was carried, and the bytes as they came."""
    media, d, a, srv, key, _ = start(make_daemon, db_url, prosody, tmp_path)
    try:
        svg = b"<svg xmlns='http://www.w3.org/2000/svg'><image href='https://tracker.example/p.png'/></svg>"
        give_avatar(a, media.put("/u/face.svg", "image/svg+xml", svg, host="media.wa.localhost"), svg,
                    "image/svg+xml")
        profile_changes_read(pg, db_url)
        assert_no_avatar(alice)
        assert "/u/face.svg" not in [p for p, _ in media.requests]
        for i, data in enumerate((svg, b"")):
            give_avatar(a, media.put(f"/u/face{i}.png", "image/png", data, host="media.wa.localhost"), data)
            profile_changes_read(pg, db_url)
            assert_no_avatar(alice)
            assert f"/u/face{i}.png" in [p for p, _ in media.requests]
        assert any("not an image of the type its profile names" in r.get("detail", "") for r in avatar_logs(d)), \
            avatar_logs(d)
        face = b"\xff\xd8\xff\xe0" + os.urandom(1200)
        give_avatar(a, media.put("/u/face.jpg", "image/jpeg", face, host="media.wa.localhost"), face, "image/jpeg")
        wait_until(lambda: vcard_photo(alice) == face, timeout=20, what="the JPEG avatar in the vCard")
        v = alice.iq("get", WALLY_JID, "<vCard xmlns='vcard-temp'/>").find("{vcard-temp}vCard")
        assert v.find("{vcard-temp}PHOTO/{vcard-temp}TYPE").text == "image/jpeg"
    finally:
        srv.close()
        media.close()


def test_an_avatar_whose_fetch_is_refused_for_good_is_none_not_fetched_again(make_daemon, db_url, prosody, alice,
                                                                             tmp_path):
    """A remote user's avatar whose fetch is refused for a fact of its URL
    (here a redirect to plain http) is given up: the vCard has no photo,
    PEP says no avatar (an empty metadata, not "wait"), the reason is
    logged once, and asking again does not fetch it again (until the
    twenty-sixth session every ask fetched it anew).  A new avatar URL is
    fetched as usual."""
    media, d, a, srv, key, _ = start(make_daemon, db_url, prosody, tmp_path)
    try:
        host = f"https://media.wa.localhost:{media.port}"
        media.redirect["/u/plain.png"] = "http://127.0.0.1:9/u/plain.png"
        give_avatar(a, host + "/u/plain.png", b"x" * 100)
        for _ in range(3):
            assert_no_avatar(alice)
        assert [p for p, _ in media.requests] == ["/u/plain.png"]
        [gave_up] = avatar_logs(d)
        assert "not over https" in gave_up.get("detail", ""), gave_up
        # Another avatar: fetched.
        face = b"\x89PNG\r\n\x1a\n" + os.urandom(900)
        give_avatar(a, media.put("/u/wally.png", "image/png", face, host="media.wa.localhost"), face)
        wait_until(lambda: vcard_photo(alice) == face, timeout=20, what="the new avatar in the vCard")
    finally:
        srv.close()
        media.close()


def link_refusals(d):
    """The daemon's log records of links whose file it refused for good."""
    return [r for r in d.records if r.get("msg") == "a file for a link is refused for good"]


def test_a_refused_link_is_logged_once_however_often_it_is_followed(make_daemon, db_url, prosody, alice, tmp_path):
    """A link whose file is refused for good is 403 media_refused at every
    follow, but logged (at warn) once per link and hour, since the
    twenty-seventh session: until then every follow wrote a warn line, and
    anyone holding the link could fill the log.  Another link is logged on
    its own."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        data = os.urandom(600)
        links = []
        for name in ("one.jpg", "two.jpg"):
            media.redirect[f"/f/{name}"] = f"http://127.0.0.1:9/f/{name}"
            links.append(photo_link(a, alice, room, f"https://media.wa.localhost:{media.port}/f/{name}", data)[1])
        for _ in range(4):
            r = requests.get(links[0], timeout=10)
            assert r.status_code == 403 and r.json()["code"] == "media_refused", (r.status_code, r.text[:200])
        assert [p for p, _ in media.requests] == ["/f/one.jpg"] * 4  # still fetched: the answer is why
        r = requests.get(links[1], timeout=10)
        assert r.status_code == 403 and r.json()["code"] == "media_refused", (r.status_code, r.text[:200])
        # The log is in order: once the second link's line is there, every
        # line of the first link's follows is too.
        wait_until(lambda: any("/f/two.jpg" in x.get("detail", "") for x in link_refusals(d)),
                   what="the second link's refusal logged")
        logged = link_refusals(d)
        assert [x["level"] for x in logged] == ["warn", "warn"], logged
        assert "/f/one.jpg" in logged[0]["detail"] and "not over https" in logged[0]["detail"], logged
    finally:
        srv.close()
        media.close()


def test_a_link_to_a_url_libcurl_cannot_read_is_refused_for_good(make_daemon, db_url, prosody, alice, tmp_path):
    """An attachment URL the peer API takes (https://, visible ASCII) but
    libcurl cannot read (here a port past 65535) reaches the fetch and is
    refused for a fact of its URL: 403 media_refused, "not a URL this
    gateway can fetch", without Retry-After; nothing is asked of any store.
    So is a redirect to such a URL (an IPv6 literal that is none)."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        data = os.urandom(600)
        media.redirect["/f/hop.jpg"] = "https://[zz]/f/x.jpg"
        for url in ("https://media.wa.localhost:99999/f/x.jpg", f"https://media.wa.localhost:{media.port}/f/hop.jpg"):
            _, link = photo_link(a, alice, room, url, data)
            r = requests.get(link, timeout=10)
            assert r.status_code == 403 and "Retry-After" not in r.headers, (url, r.status_code, r.text[:200])
            p = r.json()
            assert p["code"] == "media_refused" and "not a URL this gateway can fetch" in p["detail"], p
        assert [p for p, _ in media.requests] == ["/f/hop.jpg"]  # only the redirect's first hop
    finally:
        srv.close()
        media.close()


def test_a_refused_avatar_stays_none_when_the_photo_cache_starts_over(make_daemon, db_url, pg, prosody, alice,
                                                                     tmp_path):
    """A remote user's avatar refused for good is none, and stays so when
    the kept photos start over (past 256 users or 8 MiB of base64): since
    the twenty-seventh session the refused URL is remembered apart (at most
    256 URLs, for an hour), so it is neither fetched nor logged again; until
    then the start-over forgot it, and the next ask fetched and logged it
    anew.  Here 33 users' avatars of 192 KiB (256 KiB of base64 each) make
    the cache start over."""
    media, d, a, srv, key, _ = start(make_daemon, db_url, prosody, tmp_path)
    try:
        host = f"https://media.wa.localhost:{media.port}"
        media.redirect["/u/plain.png"] = "http://127.0.0.1:9/u/plain.png"
        give_avatar(a, host + "/u/plain.png", b"x" * 100)
        faces = {}
        for i in range(33):
            faces[i] = b"\x89PNG\r\n\x1a\n" + os.urandom(192 * 1024 - 8)
            url = media.put(f"/u/u{i}.png", "image/png", faces[i], host="media.wa.localhost")
            assert a.call("POST", "/v1/profiles", {"user": a.user(f"u{i}"), "avatar": {
                "content_type": "image/png", "url": url, "size": len(faces[i])}}).status_code == 200
        # Each changed profile drops its kept photo once its change is read:
        # asked after that, what is kept stays kept.
        profile_changes_read(pg, db_url)
        assert_no_avatar(alice)
        assert [p for p, _ in media.requests] == ["/u/plain.png"]
        wait_until(lambda: len(avatar_logs(d)) == 1, what="the refusal logged")
        ps = "http://jabber.org/protocol/pubsub"
        for i in range(33):  # PEP's metadata: the photo fetched and kept, a small answer
            meta = alice.iq("get", f"u{i}@{WALLY_JID.split('@')[1]}",
                            f"<pubsub xmlns='{ps}'><items node='urn:xmpp:avatar:metadata'/></pubsub>")
            info = meta.find(f".//{{{ps}}}item/{{urn:xmpp:avatar:metadata}}metadata/{{urn:xmpp:avatar:metadata}}info")
            assert info is not None and info.get("bytes") == str(len(faces[i])), meta.xml
        assert len(media.requests) == 34
        assert_no_avatar(alice)
        assert [p for p, _ in media.requests].count("/u/plain.png") == 1  # not fetched again
        # The first user's photo was dropped by the start-over: fetched again.
        meta = alice.iq("get", f"u0@{WALLY_JID.split('@')[1]}",
                        f"<pubsub xmlns='{ps}'><items node='urn:xmpp:avatar:metadata'/></pubsub>")
        assert [p for p, _ in media.requests].count("/u/u0.png") == 2, "the cache did not start over"
        assert [x.get("msg") for x in avatar_logs(d)] == ["xmpp: an avatar is refused for good, shown as none"]
    finally:
        srv.close()
        media.close()


def test_a_links_file_must_match_its_declared_sha256(make_daemon, db_url, prosody, alice, tmp_path):
    """An attachment that declares its sha256 gets a link whose MAC covers
    it (sha256=, a changed one is a forged link, 404), and the file the
    link fetches must match it, as a re-hosted Matrix file and a vCard
    photo must: a file that does not is answered 502 media_mismatch and
    none of it is served.  Until the thirty-first session the link served
    whatever the store answered (a review's finding).  A file declaring no
    sha256 is served as before."""
    import hashlib
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        def link_of(url, data, sha256):
            start = alice.count()
            att = {"content_type": "image/jpeg", "url": url, "size": len(data)}
            if sha256:
                att["sha256"] = sha256
            r = a.call("POST", f"/v1/rooms/{room}/messages", {
                "type": "message", "sender": a.user("wally"),
                "content": {"parts": [{"type": "text/plain", "body": "a photo"}], "attachments": [att]}},
                idem=base64.urlsafe_b64encode(os.urandom(9)).decode())
            assert r.status_code == 202, r.text
            m = alice.wait_for_message(lambda el: el.get("from", "").split("/")[0] == WALLY_JID and el.find(
                "{jabber:x:oob}x") is not None, timeout=10, start=start)
            return m.find("{jabber:x:oob}x").find("{jabber:x:oob}url").text

        data = os.urandom(1000)
        good = hashlib.sha256(data).hexdigest()
        url = media.put("/f/right.jpg", "image/jpeg", data, host="media.wa.localhost")
        link = link_of(url, data, good)
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["sha256"] == [good], link
        got = requests.get(link, timeout=10)
        assert got.status_code == 200 and got.content == data, (got.status_code, got.text[:200])
        forged = link.replace(good, hashlib.sha256(b"other").hexdigest())
        r = requests.get(forged, timeout=10)
        assert r.status_code == 404 and r.json()["code"] == "unknown_media", r.text[:200]
        stripped = link.replace("&sha256=" + good, "")  # read as an older link's scope: its MAC fails
        assert stripped != link
        r = requests.get(stripped, timeout=10)
        assert r.status_code == 404 and r.json()["code"] == "unknown_media", r.text[:200]
        wrong = media.put("/f/wrong.jpg", "image/jpeg", data, host="media.wa.localhost")
        link = link_of(wrong, data, hashlib.sha256(data + b"x").hexdigest())
        r = requests.get(link, timeout=10)
        assert r.status_code == 502 and r.json()["code"] == "media_mismatch", (r.status_code, r.text[:200])
        assert data not in r.content and r.headers["Content-Type"].startswith("application/problem+json")
        none = media.put("/f/none.jpg", "image/jpeg", data, host="media.wa.localhost")
        link = link_of(none, data, None)
        assert "sha256" not in link
        got = requests.get(link, timeout=10)
        assert got.status_code == 200 and got.content == data, (got.status_code, got.text[:200])
    finally:
        srv.close()
        media.close()


def att_id(pg, db_url, url):
    """The public id of the one message whose attachment is at url."""
    return pg.psql("SELECT public_id FROM events WHERE content->'content'->'attachments' @> "
                   f"jsonb_build_array(jsonb_build_object('url', '{url}'::text))", db_url)


def oob_url(el):
    x = el.find("{jabber:x:oob}x")
    return None if x is None else x.find("{jabber:x:oob}url").text


def test_an_xmpp_users_file_declares_no_size_and_its_link_works(make_daemon, db_url, pg, prosody, alice, tmp_path):
    """An XMPP user's file (XEP-0066 OOB: a URL, no size) becomes an
    attachment without "size" (unknown), not "size": 0.  Until the
    thirty-second session it declared 0: the peer was told the file was
    empty (and a Causeway peer, which refuses a file longer than its
    declared size, never carried it), and the group's history turned the
    same event into a Causeway link with &size=0, which answered 413 for
    any real file (a review's finding).  The link now has no size and
    fetches the file up to server.media_max_bytes."""
    upload = "upload.localhost"  # alice's server's XEP-0363 upload service
    media = MediaServer(tmp_path, hosts=(upload, "media." + DOMAIN))
    d, a, srv = start_with_gk(make_daemon, db_url, prosody, domain=DOMAIN,
                              server={"ca_file": media.cert_file, "media_private_addresses": "true"})
    try:
        consent_alice(d, f"mimi://{DOMAIN}/u/wally")
        consent_alice(d, f"mimi://{DOMAIN}/u/zoe")
        gid = a.create_room([a.user("wally"), a.user("zoe"), ALICE], kind="group", name="Pics").json()["id"]
        assert a.send(gid, a.user("wally"), "hello").status_code == 202
        invite = alice.wait_for_message(lambda el: el.find(q(MUC_USER, "x")) is not None)
        room = invite.get("from")
        start = alice.count()
        alice.send_presence(to=room + "/alice", payload=f"<x xmlns='{MUC}'><history maxstanzas='0'/></x>")
        alice.wait_for_message(lambda el: el.find("{jabber:client}subject") is not None, start=start)
        data = os.urandom(5000)
        url = media.put("/up/cat.jpg", "image/jpeg", data, host=upload)
        alice.send_raw(f"<message to='{room}' type='groupchat' id='p1'><body>{url}</body>"
                       f"<x xmlns='jabber:x:oob'><url>{url}</url></x></message>")
        at_peer = wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "message"
                                      and e.get("content", {}).get("attachments")] or None,
                             what="alice's file at the peer")
        att = at_peer[0]["content"]["attachments"][0]
        assert att == {"content_type": "application/octet-stream", "url": url}, att
        # alice comes back: her own message is in the history, as a link.
        start = alice.count()
        alice.send_presence(to=room + "/alice", ptype="unavailable")
        alice.wait_for_presence(lambda el: el.get("type") == "unavailable", start=start)
        start = alice.count()
        alice.send_presence(to=room + "/alice", payload=f"<x xmlns='{MUC}'><history maxstanzas='10'/></x>")
        alice.wait_for_message(lambda el: el.find("{jabber:client}subject") is not None, start=start)
        hist = [el for el in alice.stanzas()[start:] if el.tag == "{jabber:client}message" and oob_url(el)]
        assert hist, "alice's file is in the history"
        link = oob_url(hist[-1])
        assert "size" not in urllib.parse.parse_qs(urllib.parse.urlsplit(link).query), link
        # it names its message, as a link sent live does (served while it is there)
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["ev"] == [att_id(pg, db_url, url)], link
        got = requests.get(link, timeout=10)
        assert got.status_code == 200 and got.content == data, (got.status_code, got.text[:200])
    finally:
        srv.close()
        media.close()


def test_a_links_file_ends_with_its_message(make_daemon, db_url, pg, prosody, alice, tmp_path):
    """A link in an XMPP message names its message (ev=, under the MAC) and
    serves the file only while that message is there: once the peer
    deletes it, its time comes (content.expires), its content is erased or
    its row is gone, the link is 404 unknown_media, as the peer API's media tokens are
    (docs/interop-api.md "Media"), and the store is not asked.  Until the
    forty-third session's review a link served its file until its own exp
    (7 days) whatever became of the message: an expired message's file was
    fetched and served through Causeway after the message was retracted."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)

    def retracted(at):
        return alice.wait_for_message(lambda el: el.get("from", "").split("/")[0] == WALLY_JID and el.find(
            "{urn:xmpp:message-retract:1}retract") is not None, timeout=15, start=at)

    try:
        links = {}
        for name in ("deleted", "expires", "erased", "purged", "kept"):
            data = os.urandom(800)
            url = media.put(f"/f/{name}.jpg", "image/jpeg", data, host="media.wa.localhost")
            at = alice.count()
            content = {"parts": [{"type": "text/plain", "body": name}],
                       "attachments": [{"content_type": "image/jpeg", "url": url, "size": len(data)}]}
            if name == "expires":
                content["expires"] = int(time.time() * 1000) + 600000
            r = a.call("POST", f"/v1/rooms/{room}/messages", {
                "type": "message", "sender": a.user("wally"), "content": content},
                idem=base64.urlsafe_b64encode(os.urandom(9)).decode())
            assert r.status_code == 202, r.text
            m = alice.wait_for_message(lambda el: el.get("from", "").split("/")[0] == WALLY_JID and el.find(
                "{jabber:x:oob}x") is not None, timeout=10, start=at)
            link = m.find("{jabber:x:oob}x").find("{jabber:x:oob}url").text
            assert urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["ev"] == [r.json()["id"]], link
            got = requests.get(link, timeout=10)
            assert got.status_code == 200 and got.content == data, (name, got.status_code, got.text[:200])
            links[name] = (r.json()["id"], link, data)
        # ev= is under the MAC: another message's id there is a forged link.
        forged = links["kept"][1].replace(links["kept"][0], links["deleted"][0])
        assert forged != links["kept"][1]
        r = requests.get(forged, timeout=10)
        assert r.status_code == 404 and r.json()["code"] == "unknown_media", r.text[:200]
        asked = len(media.requests)
        # wally deletes one
        at = alice.count()
        r = a.call("POST", f"/v1/rooms/{room}/messages", {
            "type": "delete", "sender": a.user("wally"), "content": {"replaces": links["deleted"][0]}},
            idem=base64.urlsafe_b64encode(os.urandom(9)).decode())
        assert r.status_code == 202, r.text
        retracted(at)
        # one's time comes
        at = alice.count()
        pg.psql("UPDATE events SET content = jsonb_set(content, '{content,expires}', "
                "to_jsonb((extract(epoch FROM now()) * 1000)::bigint)) "
                f"WHERE public_id = '{links['expires'][0]}'", db_url)
        retracted(at)
        # one's content is erased (retention.content_days)
        pg.psql(f"UPDATE events SET content = '{{}}'::jsonb WHERE public_id = '{links['erased'][0]}'", db_url)
        # one's row is gone (retention.rows_days)
        pg.psql(f"DELETE FROM events WHERE public_id = '{links['purged'][0]}'", db_url)
        for name in ("deleted", "expires", "erased", "purged"):
            r = requests.get(links[name][1], timeout=10)
            assert r.status_code == 404 and r.json()["code"] == "unknown_media", (name, r.status_code, r.text[:200])
            assert links[name][2] not in r.content
        assert len(media.requests) == asked, media.requests[asked:]
        got = requests.get(links["kept"][1], timeout=10)
        assert got.status_code == 200 and got.content == links["kept"][2], (got.status_code, got.text[:200])
    finally:
        srv.close()
        media.close()


def test_a_links_message_is_asked_about_while_every_fetcher_is_busy(make_daemon, db_url, prosody, alice, tmp_path):
    """With every fetcher busy (server.media_fetches, here one, held by a
    file its store is slow to give), a link whose message is gone is
    answered the 404 it gets when a fetcher is free, and a link whose
    message is there 503 "try again": the message is asked about before
    the fetchers are. Until the forty-third session (its own review) a
    link's message was asked about only on a fetcher, and a deleted
    message's link was told 503 while they were busy, 404 otherwise."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path, media_fetches="1")
    t = None
    try:
        links = {}
        for name in ("slow", "deleted", "kept"):
            data = os.urandom(900)
            url = media.put(f"/f/{name}.jpg", "image/jpeg", data, host="media.wa.localhost")
            at = alice.count()
            r = a.call("POST", f"/v1/rooms/{room}/messages", {
                "type": "message", "sender": a.user("wally"), "content": {
                    "parts": [{"type": "text/plain", "body": name}],
                    "attachments": [{"content_type": "image/jpeg", "url": url, "size": len(data)}]}},
                idem=base64.urlsafe_b64encode(os.urandom(9)).decode())
            assert r.status_code == 202, r.text
            m = alice.wait_for_message(lambda el: el.get("from", "").split("/")[0] == WALLY_JID and el.find(
                "{jabber:x:oob}x") is not None, timeout=10, start=at)
            links[name] = (r.json()["id"], m.find("{jabber:x:oob}x").find("{jabber:x:oob}url").text, data)
        at = alice.count()
        assert a.call("POST", f"/v1/rooms/{room}/messages", {
            "type": "delete", "sender": a.user("wally"), "content": {"replaces": links["deleted"][0]}},
            idem=base64.urlsafe_b64encode(os.urandom(9)).decode()).status_code == 202
        alice.wait_for_message(lambda el: el.find("{urn:xmpp:message-retract:1}retract") is not None,
                               timeout=15, start=at)
        free = requests.get(links["deleted"][1], timeout=10)
        assert free.status_code == 404 and free.json()["code"] == "unknown_media", free.text[:200]
        media.delay["/f/slow.jpg"] = 8.0
        asked, out = len(media.requests), {}
        t = threading.Thread(target=lambda: out.update(r=requests.get(links["slow"][1], timeout=30)))
        t.start()
        wait_until(lambda: len(media.requests) > asked, what="the slow fetch under way")
        r = requests.get(links["kept"][1], timeout=10)
        assert r.status_code == 503 and "too many files" in r.json()["detail"], (r.status_code, r.text[:200])
        for _ in range(3):
            r = requests.get(links["deleted"][1], timeout=10)
            assert (r.status_code, r.content) == (free.status_code, free.content), (r.status_code, r.text[:200])
        t.join(30)
        assert out["r"].status_code == 200 and out["r"].content == links["slow"][2], out
        assert len(media.requests) == asked + 1  # the deleted message's link fetched nothing
    finally:
        media.delay.clear()
        if t:
            t.join(30)
        srv.close()
        media.close()


def test_a_file_that_could_be_a_page_is_answered_to_save_not_to_show(make_daemon, db_url, prosody, alice, tmp_path):
    """A link's file is answered with the type its store gave, nosniff and a
    sandbox CSP, and since the forty-third session's review with
    Content-Disposition: inline only for images, audio, video and plain
    text (the types Matrix homeservers show inline); HTML, SVG, XML, PDF
    and any other type are "attachment", so a browser following the link
    saves it rather than showing someone else's page on this daemon's
    origin (the admin console's), where, inert under the sandbox, it could
    still show a fake login or refresh itself to another site."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        page = b"<html><meta http-equiv='refresh' content='0;url=https://evil.example/'><p>Sign in</p></html>"
        for i, (ctype, shown) in enumerate((("text/html", False), ("image/svg+xml", False),
                                            ("application/xhtml+xml", False), ("application/pdf", False),
                                            ("text/xml", False), ("application/octet-stream", False),
                                            ("image/jpeg", True), ("IMAGE/PNG", True), ("video/mp4", True),
                                            ("text/plain", True))):
            url = media.put(f"/f/{i}", ctype, page, host="media.wa.localhost")
            _, link = photo_link(a, alice, room, url, page)
            got = requests.get(link, timeout=10)
            assert got.status_code == 200 and got.content == page, (ctype, got.status_code, got.text[:200])
            assert got.headers["Content-Type"] == ctype, (ctype, got.headers)
            assert got.headers["Content-Disposition"] == ("inline" if shown else "attachment"), (ctype, got.headers)
            assert got.headers["X-Content-Type-Options"] == "nosniff"
            assert got.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    finally:
        srv.close()
        media.close()


def max_age(headers):
    """The max-age of a Cache-Control that is private (never a shared cache's)."""
    cc = [p.strip() for p in headers["Cache-Control"].split(",")]
    assert "private" in cc, headers
    return int(next(p for p in cc if p.startswith("max-age="))[len("max-age="):])


@pytest.mark.parametrize("lifetime,most", ((60, 60), (604800, 3600)))
def test_a_links_file_is_cached_no_longer_than_an_hour_nor_past_the_links_end(make_daemon, db_url, prosody, alice,
                                                                               tmp_path, lifetime, most):
    """A link's file is answered "private" (never a shared cache's) with a
    max-age of at most an hour and never past the link's exp: a client
    shows a cached copy without asking, so that is how long a file whose
    message was deleted (a retraction, an expiry) or whose link ended is
    still shown.  Until the forty-fifth session it was a day whatever the
    link's end: with server.media_link_lifetime_s = 60, a day after the
    link had turned 410."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path, media_link_lifetime_s=str(lifetime))
    try:
        data = os.urandom(900)
        url = media.put("/f/cached.jpg", "image/jpeg", data, host="media.wa.localhost")
        _, link = photo_link(a, alice, room, url, data)
        got = requests.get(link, timeout=10)
        assert got.status_code == 200 and got.content == data, got.text[:200]
        exp = int(urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["exp"][0])
        age, left = max_age(got.headers), exp - int(time.time())
        # an hour, or what is left of the link's 60 s (some of it spent getting here)
        assert (age == most) if lifetime > most else (0 < age <= min(most, left + 1)), (left, got.headers)
    finally:
        srv.close()
        media.close()


def test_one_peers_files_take_at_most_half_of_the_fetchers(make_daemon, db_url, prosody, alice, tmp_path):
    """The files of one peer (a link's by=) take at most half of the
    fetchers (server.media_fetches, here four: two), so that its store,
    slow to give them, cannot hold every fetcher while its links are
    followed and have every other file answered 503. A third of its
    links is told 503 "try again" while two are fetched; a link of another
    host, naming no peer (made before the nineteenth session), is fetched
    meanwhile, and the peer's link once one of its fetches ended. Until
    the forty-seventh session's review one peer's links took them all."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path, media_fetches="4")
    threads = []
    try:
        links = {}
        for name in ("slow1", "slow2", "third"):
            data = os.urandom(700)
            url = media.put(f"/f/{name}.jpg", "image/jpeg", data, host="media.wa.localhost")
            links[name] = (photo_link(a, alice, room, url, data)[1], data)
        other = os.urandom(600)
        url = media.put("/f/other.jpg", "image/jpeg", other, host="media.tg.localhost")
        link, _ = links["third"]
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
        base = link.split("?")[0].rsplit("/", 1)[0]
        exp = query["exp"][0]
        scope = f"\npublic\n{len(other)}\n{exp}"  # no by: its host's share
        src = base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")
        old = f"{base}/{link_mac(d, scope, url)}?src={src}&size={len(other)}&exp={exp}"
        media.delay["/f/slow1.jpg"] = media.delay["/f/slow2.jpg"] = 6.0
        asked, out = len(media.requests), {}
        for name in ("slow1", "slow2"):
            t = threading.Thread(target=lambda n=name: out.update({n: requests.get(links[n][0], timeout=30)}))
            t.start()
            threads.append(t)
        wait_until(lambda: len(media.requests) >= asked + 2, what="the two slow fetches under way")
        r = requests.get(links["third"][0], timeout=10)
        assert r.status_code == 503 and "same sender" in r.json()["detail"], (r.status_code, r.text[:200])
        assert r.headers.get("Retry-After"), r.headers
        got = requests.get(old, timeout=10)
        assert got.status_code == 200 and got.content == other, (got.status_code, got.text[:200])
        for t in threads:
            t.join(30)
        for name in ("slow1", "slow2"):
            assert out[name].status_code == 200 and out[name].content == links[name][1], out[name]
        r = requests.get(links["third"][0], timeout=10)
        assert r.status_code == 200 and r.content == links["third"][1], (r.status_code, r.text[:200])
    finally:
        media.delay.clear()
        for t in threads:
            t.join(30)
        srv.close()
        media.close()


def test_follows_of_a_link_being_fetched_wait_for_that_fetch(make_daemon, db_url, prosody, alice, tmp_path):
    """Clients that follow the same link while its file is being fetched
    (a group's members whose clients all fetch a new image at once) wait
    for that one fetch and get its file, without a fetcher or a request to
    the store of their own: here one fetcher, and three follows of a link
    whose store is slow all get the file, which the store gave once. Until
    the forty-seventh session's review each follow took a fetcher, and all
    but the first were told 503 "too many files"."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path, media_fetches="1")
    threads, out = [], {}
    try:
        data = os.urandom(1500)
        url = media.put("/f/group.jpg", "image/jpeg", data, host="media.wa.localhost")
        _, link = photo_link(a, alice, room, url, data)
        media.delay["/f/group.jpg"] = 4.0
        asked = len(media.requests)
        for i in range(3):
            t = threading.Thread(target=lambda i=i: out.update({i: requests.get(link, timeout=30)}))
            t.start()
            threads.append(t)
            if i == 0:
                wait_until(lambda: len(media.requests) > asked, what="the fetch under way")
        for t in threads:
            t.join(30)
        for i in range(3):
            r = out[i]
            assert r.status_code == 200 and r.content == data, (i, r.status_code, r.text[:200])
            assert r.headers["Content-Type"] == "image/jpeg" and r.headers["Content-Disposition"] == "inline"
        assert [p for p, _ in media.requests[asked:]] == ["/f/group.jpg"]  # fetched once
        media.delay.clear()
        wait_until(lambda: held_bytes(d) == 0, what="every answer's copy given back")
    finally:
        media.delay.clear()
        for t in threads:
            t.join(30)
        srv.close()
        media.close()


def test_a_follow_after_the_messages_delete_is_not_served_by_the_fetch_under_way(make_daemon, db_url, prosody,
                                                                               alice, tmp_path):
    """A follow of a link whose fetch is under way joins it only once its
    own message was asked about: one that comes after wally deleted the
    message (while the store is slow to give the file) gets the 404 any
    follow of a deleted message's link gets, and the follow that started
    the fetch before the delete its file as before. Until the
    forty-seventh session's review the later follow joined the fetch
    without asking, and was served the deleted message's file."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    t, out = None, {}
    try:
        data = os.urandom(1300)
        url = media.put("/f/gone.jpg", "image/jpeg", data, host="media.wa.localhost")
        _, link = photo_link(a, alice, room, url, data)
        ev = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["ev"][0]
        media.delay["/f/gone.jpg"] = 8.0
        asked = len(media.requests)
        t = threading.Thread(target=lambda: out.update(r=requests.get(link, timeout=30)))
        t.start()
        wait_until(lambda: len(media.requests) > asked, what="the fetch under way")
        at = alice.count()
        assert a.call("POST", f"/v1/rooms/{room}/messages", {
            "type": "delete", "sender": a.user("wally"), "content": {"replaces": ev}},
            idem=base64.urlsafe_b64encode(os.urandom(9)).decode()).status_code == 202
        alice.wait_for_message(lambda el: el.find("{urn:xmpp:message-retract:1}retract") is not None,
                               timeout=15, start=at)
        assert t.is_alive()  # the fetch is still under way
        r = requests.get(link, timeout=30)
        assert r.status_code == 404 and r.json()["code"] == "unknown_media", (r.status_code, r.text[:200])
        assert data not in r.content
        assert t.is_alive()  # answered without waiting for the fetch
        t.join(30)
        assert out["r"].status_code == 200 and out["r"].content == data, out
        media.delay.clear()
        again = requests.get(link, timeout=10)
        assert (again.status_code, again.content) == (r.status_code, r.content), (again.status_code, again.text)
        assert [p for p, _ in media.requests[asked:]] == ["/f/gone.jpg"]  # fetched once, by the first follow
        wait_until(lambda: held_bytes(d) == 0, what="every answer's copy given back")
    finally:
        media.delay.clear()
        if t:
            t.join(30)
        srv.close()
        media.close()


def test_a_links_file_behind_a_redirect_with_a_page_is_served(make_daemon, db_url, prosody, alice, tmp_path):
    """A link's fetch follows a redirect hop by hop: the redirect's own
    page (the short body of a web server's 302) is not the file and does
    not count against the size its attachment declared.  Until the
    fifty-first session's review it did, and a file declared smaller
    than that page was answered 413 too_large ("larger than its declared
    size").  A page longer than 64 KiB is not read to its end: 403
    media_refused, as for a redirect off https."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    try:
        page = b"<html><head><title>302 Found</title></head><body><h1>302 Found</h1><hr>nginx</body></html>\r\n" * 2
        data = b"\xff\xd8\xff" + os.urandom(20)
        real = media.put("/f/real.jpg", "image/jpeg", data, host="media.wa.localhost")
        host = f"https://media.wa.localhost:{media.port}"
        media.redirect["/f/moved.jpg"], media.redirect_body["/f/moved.jpg"] = real, page
        media.redirect["/f/endless.jpg"], media.redirect_body["/f/endless.jpg"] = real, b"x" * (64 * 1024 + 1)
        _, link = photo_link(a, alice, room, host + "/f/moved.jpg", data)
        got = requests.get(link, timeout=10)
        assert got.status_code == 200 and got.content == data, (got.status_code, got.text[:200])
        _, link = photo_link(a, alice, room, host + "/f/endless.jpg", data)
        r = requests.get(link, timeout=10)
        assert r.status_code == 403 and r.json()["code"] == "media_refused", (r.status_code, r.text[:200])
        assert "its redirect's page is longer than 64 KiB" in r.json()["detail"], r.text
    finally:
        srv.close()
        media.close()


def test_a_files_url_is_signed_as_the_store_rebuilds_it(make_daemon, db_url, prosody, alice, tmp_path):
    """A store checks Causeway's @target-uri against the URI it rebuilds
    from the request it receives: its own URL (the host in lower case, no
    default port, no zone id) and the path and query libcurl sent (dot
    segments resolved, no fragment).  The file's URL is requested and
    signed in that normal form, the one a push's URL has
    (docs/interop-api.md, "Media"), each redirect hop's as that hop goes
    out.  Until the fifty-second session it was signed as the peer spelled
    it, and a store checking its signature refused "https://Media.WA..."
    or ".../x/../f.jpg"."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    port = media.port
    own = {h: f"https://{h}:{port}" for h in SIGNED}  # each store host's own URL
    try:
        data = os.urandom(600)
        media.files["/f/caps.jpg"] = media.files["/f/dots.jpg"] = media.files["/f/frag.jpg"] = \
            ("image/jpeg", data)
        media.files["/cdn/there.jpg"] = ("image/jpeg", data)
        media.redirect["/f/moved.jpg"] = f"https://CDN.Media.WA.localhost:{port}/cdn/x/../there.jpg#z"
        cases = [  # (the URL the peer names, [(host, path) each hop requests])
            (f"https://Media.WA.Localhost:{port}/f/caps.jpg", [("media.wa.localhost", "/f/caps.jpg")]),
            (f"https://media.wa.localhost:{port}/f/x/../dots.jpg", [("media.wa.localhost", "/f/dots.jpg")]),
            (f"https://media.wa.localhost:{port}/f/frag.jpg#part", [("media.wa.localhost", "/f/frag.jpg")]),
            (f"https://MEDIA.wa.localhost:{port}/f/moved.jpg", [("media.wa.localhost", "/f/moved.jpg"),
                                                                ("cdn.media.wa.localhost", "/cdn/there.jpg")]),
        ]
        refused = []  # (URL, hop, why): every case is tried, all said at once
        for url, hops in cases:
            media.requests.clear()
            _, link = photo_link(a, alice, room, url, data)
            got = requests.get(link, timeout=10)
            assert got.status_code == 200 and got.content == data, (url, link, media.requests, got.text[:200])
            assert [p for p, _ in media.requests] == [p for _, p in hops], (url, media.requests)
            for (host, path), (_, headers) in zip(hops, media.requests):
                try:
                    verify_get("GET", own[host] + path, headers, key)
                except Exception as ex:  # noqa: BLE001 (InvalidSignature says nothing)
                    refused.append((url, path, repr(ex)))
                if headers["Host"] != f"{host}:{port}":
                    refused.append((url, path, "Host " + headers["Host"]))
        assert not refused, refused
    finally:
        srv.close()
        media.close()


def test_a_links_url_that_cannot_be_signed_is_refused_for_good(make_daemon, db_url, prosody, alice, tmp_path):
    """A hop on the peer's own hosts is signed; one whose URL httpsig_sign
    refuses (here a redirect's Location of 9000 bytes: a target URI is at
    most 8 KiB) is refused so at every try: 403 media_refused with why, no
    Retry-After, never asked for unsigned.  Until the fifty-second
    session's review every failure to sign was "out of memory", a 503 "try
    again later", and a client followed the link again for ever.  A
    Location with UTF-8 bytes and spaces is no such URL: it is followed
    percent-encoded, as libcurl follows a redirect itself and a browser
    does, and that is what is requested and signed.  Until then libcurl's
    CURLINFO_REDIRECT_URL was taken as it came, raw for an absolute
    Location: a space made it "not a URL this gateway can fetch" (403),
    and bytes that are not ASCII were refused by httpsig_sign (503)."""
    media, d, a, srv, key, room = start(make_daemon, db_url, prosody, tmp_path)
    port = media.port
    try:
        data = os.urandom(600)
        media.redirect["/f/long.jpg"] = f"https://cdn.media.wa.localhost:{port}/f/{'a' * 9000}.jpg"
        _, link = photo_link(a, alice, room, f"https://media.wa.localhost:{port}/f/long.jpg", data)
        for _ in range(2):
            r = requests.get(link, timeout=10)
            assert r.status_code == 403 and "Retry-After" not in r.headers, (r.status_code, r.text[:200])
            p = r.json()
            assert p["code"] == "media_refused" and "its URL cannot be signed" in p["detail"], p
        assert [p for p, _ in media.requests] == ["/f/long.jpg"] * 2, [p[:40] for p, _ in media.requests]
        # UTF-8 bytes and spaces in a Location (http.server sends the
        # header's text as Latin-1: these are the bytes of "café au lait").
        media.requests.clear()
        sent = "/f/caf%c3%a9%20au%20lait.jpg?w=%c3%a9+1"  # as libcurl encodes them (CURLU_URLENCODE)
        media.files[sent] = ("image/jpeg", data)
        media.redirect["/f/utf.jpg"] = \
            f"https://cdn.media.wa.localhost:{port}/f/caf\u00c3\u00a9 au lait.jpg?w=\u00c3\u00a9 1"
        _, link = photo_link(a, alice, room, f"https://media.wa.localhost:{port}/f/utf.jpg", data)
        got = requests.get(link, timeout=10)
        assert got.status_code == 200 and got.content == data, (got.status_code, got.text[:200], media.requests)
        [(p1, h1), (p2, h2)] = media.requests
        assert (p1, p2) == ("/f/utf.jpg", sent), media.requests
        verify_get("GET", f"https://media.wa.localhost:{port}/f/utf.jpg", h1, key)
        verify_get("GET", f"https://cdn.media.wa.localhost:{port}{sent}", h2, key)
    finally:
        srv.close()
        media.close()
