"""Files across the Matrix adapter (docs/matrix.md "Media"; spec/adapters.md:
media crosses the gateway re-hosted, never as a bare link into a private
store).  A peer's file is fetched from where the peer keeps it, over HTTPS
(signed as Causeway when that is a host of the peer's own domain, plain
from any other), and uploaded to the homeserver as the remote user's
ghost; a Matrix user's file reaches the peer under a Causeway URL made for
that peer alone, fetched from the homeserver with the appservice's token."""
import hashlib
import json
import os
import re
import signal
import threading
import time

import pytest
import requests

from harness import answered_at, free_port, logged_at, stopped_in, thread_names, wait_until
from homeserver import Homeserver
from peer import MediaServer, NotifyServer, PeerClient, verify_get
from test_matrix import ALICE, ALICE_MX, AS_TOKEN, HS_TOKEN, as_put, consent_alice, registration

MAX = 64 * 1024  # server.media_max_bytes of these tests
GHOST = "@_cw_gk_wally:example.org"
# The stores' names: libcurl resolves names under "localhost" to loopback
# by itself, so a peer of domain wa.localhost keeps its files at
# media.wa.localhost (gk_local).
HOSTS = ("media.wa.localhost", "media.evil-wa.localhost", "media.tg.localhost")


@pytest.fixture
def hs(request):
    h = Homeserver(server_name="example.org", registration=registration(),
                   authenticated_media=getattr(request, "param", True))
    h.start()
    yield h
    h.close()


@pytest.fixture
def media(tmp_path):
    m = MediaServer(tmp_path, hosts=HOSTS)
    yield m
    m.close()


@pytest.fixture
def mx(make_daemon, db_url, hs, media):
    port = free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    d = make_daemon(db_url, options={"server": {"port": str(port), "ca_file": media.cert_file,
                                                "media_max_bytes": str(MAX), "media_private_addresses": "true"},
                                     "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN,
                                                "hs_token": HS_TOKEN}})
    return d.start()


def add_peer(mx, name, domain):
    srv = NotifyServer()
    srv.public_b64 = mx.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    client = PeerClient(mx.url, name, domain)
    r = mx.admin("POST", "/peers", json={"name": name, "domain": domain, "mode": "push", "push_url": srv.url,
                                        "public_key": client.signer.public_b64})
    assert r.status_code == 201, r.text
    client.token = r.json()["token"]
    return client, srv


@pytest.fixture
def gk(mx):
    client, srv = add_peer(mx, "gk", "wa.example")
    yield client, srv
    srv.close()


@pytest.fixture
def gk_local(mx):
    """gk of domain wa.localhost: its stores' names resolve to loopback."""
    client, srv = add_peer(mx, "gk", "wa.localhost")
    yield client, srv
    srv.close()


@pytest.fixture
def wally_room(mx, hs, gk_local):
    """A room of gk_local's wally and alice (she allowed him): (gk's client, the room)."""
    a, _ = gk_local
    consent_alice(mx, subject="mimi://wa.localhost/u/wally")
    hs.create_user("alice")
    return a, a.create_room([a.user("wally"), ALICE]).json()["id"]


def attachment(url, data, ctype="image/png", name="cat.png", size=None, sha=None):
    return {"content_type": ctype, "url": url, "size": len(data) if size is None else size,
            "sha256": sha or hashlib.sha256(data).hexdigest(), "filename": name}


def sent_at(hs, user):
    """When user's first event send came to the stand-in homeserver hs."""
    return min(q["time"] for q in hs.requests if q["user"] == user and q["method"] == "PUT" and "/send/" in q["path"])


def send_file(a, room, text, att, idem):
    content = {"attachments": [att]}
    if text:
        content["parts"] = [{"type": "text/plain", "body": text}]
    r = a.call("POST", f"/v1/rooms/{room}/messages", {"type": "message", "sender": a.user("wally"), "content": content},
               idem=idem)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def rules_in_force(d):
    """The rules of the policy snapshot in force in d (an admin change is
    answered once in force, or after 2 s without it when the reload is
    slow: the test waits for what it needs, not a fixed time)."""
    return float(re.search(r"^causeway_policy_rules (\S+)$", d.get("/metrics").text, re.M).group(1))


def ghost_messages_now(hs):
    return [e for rid in hs.rooms() for e in hs.events(rid) if e["type"] == "m.room.message" and e["sender"] == GHOST]


def ghost_messages(hs, n):
    def got():
        for rid in hs.rooms():
            ms = [e for e in hs.events(rid) if e["type"] == "m.room.message" and e["sender"] == GHOST]
            if len(ms) >= n:
                return ms
        return None
    return wait_until(got, timeout=20, what=f"{n} messages of the ghost")


def test_a_peers_file_is_rehosted_on_the_homeserver(mx, hs, wally_room, media):
    a, room = wally_room
    cat = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    url = media.put("/f/cat.png", "image/png", cat, host="media.wa.localhost")
    send_file(a, room, "a cat", attachment(url, cat), "f1")
    [m] = ghost_messages(hs, 1)
    c = m["content"]
    assert c["msgtype"] == "m.image" and c["body"] == "a cat" and c["filename"] == "cat.png", c
    assert c["info"] == {"mimetype": "image/png", "size": len(cat)}, c
    kept = hs.media(c["url"])
    assert kept and kept["data"] == cat and kept["user"] == GHOST and kept["content_type"] == "image/png"
    assert url not in json.dumps(m)  # no link into the peer's store
    # Fetched signed as Causeway (a peer's store may check it): the file is
    # on a host of the peer's domain.
    key = mx.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    [(path, headers)] = media.requests
    verify_get("GET", url, headers, key)
    # The same file again is not fetched or uploaded again.
    send_file(a, room, "", attachment(url, cat), "f2")
    ms = ghost_messages(hs, 2)
    assert ms[1]["content"]["url"] == c["url"] and ms[1]["content"]["body"] == "cat.png"
    assert len(media.requests) == 1
    assert sum(1 for q in hs.requests if q["path"] == "/_matrix/media/v3/upload") == 1


def test_a_peers_edit_keeping_its_file_edits_the_image_in_matrix(mx, hs, wally_room, media):
    """wally changes the caption of his image (a neutral edit is the whole
    new content: the text and the file it keeps): the edit reaches Matrix
    as an edit of the image, m.new_content an m.image of the file already
    re-hosted (not fetched or uploaded again), as Matrix clients edit a
    caption.  Of an edit with several files the last is kept: the row's
    own event, the one an edit of the message names, carries the last.
    Until the forty-sixth session the file became a line of the edited
    text, the peer's URL a bare link into its store, and the image in the
    room was replaced by that text."""
    a, room = wally_room
    cat = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
    url = media.put("/f/cat.png", "image/png", cat, host="media.wa.localhost")
    msg = send_file(a, room, "a cat", attachment(url, cat), "e1")
    [m] = ghost_messages(hs, 1)
    mxc = m["content"]["url"]
    dog = b"\x89PNG\r\n\x1a\n" + os.urandom(2100)
    other = media.put("/f/dog.png", "image/png", dog, host="media.wa.localhost")
    for idem, text, atts in (("e2", "my cat", [attachment(url, cat)]),
                             ("e3", "cat, then dog", [attachment(url, cat), attachment(other, dog, name="dog.png")])):
        r = a.call("POST", f"/v1/rooms/{room}/messages",
                   {"type": "edit", "sender": a.user("wally"),
                    "content": {"replaces": msg, "parts": [{"type": "text/plain", "body": text}], "attachments": atts}},
                   idem=idem)
        assert r.status_code == 202, r.text
    first, second = (e["content"] for e in ghost_messages(hs, 3)[1:])
    assert first["msgtype"] == "m.image" and first["body"] == "* my cat" and first["url"] == mxc, first
    assert first["m.relates_to"] == {"rel_type": "m.replace", "event_id": m["event_id"]}, first
    assert first["m.new_content"] == {"msgtype": "m.image", "body": "my cat", "url": mxc, "filename": "cat.png",
                                      "info": {"mimetype": "image/png", "size": len(cat)}, "m.mentions": {}}, first
    new = second["m.new_content"]
    assert second["msgtype"] == new["msgtype"] == "m.image" and new["body"] == "cat, then dog", second
    assert hs.media(new["url"])["data"] == dog and second["url"] == new["url"] and new["filename"] == "dog.png"
    assert url not in json.dumps(first) and other not in json.dumps(second)  # no link into the peer's store
    # the cat fetched and uploaded once, the dog once
    assert [p for p, _ in media.requests] == ["/f/cat.png", "/f/dog.png"]
    assert sum(1 for q in hs.requests if q["path"] == "/_matrix/media/v3/upload") == 2


def test_matrix_shows_the_size_of_the_file_as_fetched(mx, hs, wally_room, media):
    """An attachment's size is a bound (the policy judges it; the fetch
    takes no more): the file may be shorter, and the one re-hosted before
    for the same URL is reused for any declaration at least its size.
    Matrix shows the size of the file it has (info.size), never the
    declared one: until the forty-sixth session an m.image said 3500 bytes
    of a file of 3008, and a later declaration of 9999 said 9999."""
    a, room = wally_room
    cat = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    url = media.put("/f/short.png", "image/png", cat, host="media.wa.localhost")
    send_file(a, room, "a cat", attachment(url, cat, size=len(cat) + 492), "s1")
    [m] = ghost_messages(hs, 1)
    assert m["content"]["info"] == {"mimetype": "image/png", "size": len(cat)}, m["content"]
    assert hs.media(m["content"]["url"])["data"] == cat
    send_file(a, room, "again", attachment(url, cat, size=9999), "s2")
    ms = ghost_messages(hs, 2)
    assert ms[1]["content"]["url"] == m["content"]["url"], ms[1]["content"]  # reused, not fetched again
    assert ms[1]["content"]["info"] == {"mimetype": "image/png", "size": len(cat)}, ms[1]["content"]
    assert len(media.requests) == 1


def test_a_long_content_type_is_uploaded_whole(mx, hs, wally_room, media):
    """The peer API takes a content_type of up to 255 bytes; the upload to
    the homeserver carries it whole, as info.mimetype does.  Until the
    fifty-first session's review the upload's Content-Type header was
    written into 200 bytes, and a type longer than 185 was uploaded cut
    short: the homeserver kept (and served) another type than the one the
    event named.  Since the fifty-second session a subtype is at most 127
    bytes (RFC 6838): the 255 are made with a parameter."""
    a, room = wally_room
    ctype = "application/vnd." + "x" * (127 - len("vnd.")) + "; name="
    ctype += "y" * (255 - len(ctype))
    assert len(ctype) == 255
    data = os.urandom(1000)
    url = media.put("/f/long.bin", ctype, data, host="media.wa.localhost")
    send_file(a, room, "", attachment(url, data, ctype=ctype, name="long.bin"), "ct1")
    [m] = ghost_messages(hs, 1)
    assert m["content"]["info"]["mimetype"] == ctype, m["content"]
    kept = hs.media(m["content"]["url"])
    assert kept and kept["data"] == data and kept["content_type"] == ctype, kept and kept["content_type"]


def test_a_small_file_behind_a_redirect_with_a_page_is_carried(mx, hs, wally_room, media):
    """A redirect's own body (the short page a web server answers a 302
    with, nginx's 154 bytes) is not the file: it counts against neither
    the file's declared size nor server.media_max_bytes, and is not kept.
    Until the fifty-first session's review it counted (libcurl follows no
    redirect for a peer's file: media_fetch_peer does, hop by hop), and a
    file declared smaller than its redirect's page (an icon, a line of
    text, an empty file) was refused for good, "larger than its declared
    size".  A page is held to 64 KiB of its own: a store cannot have the
    gateway read one without end (refused for good, as a redirect off
    https is)."""
    a, room = wally_room
    page = b"<html>\r\n<head><title>302 Found</title></head>\r\n<body>\r\n<center><h1>302 Found</h1></center>\r\n" \
           b"<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    host = f"https://media.wa.localhost:{media.port}"
    tiny, empty, big = b"hello, world\n", b"", os.urandom(2000)
    cases = (("short", tiny, page), ("empty", empty, page), ("long", big, b"<!-- moved -->" * 4600),
             ("endless", big, b"<!-- moved -->" * 4700))
    for i, (name, data, body) in enumerate(cases):
        real = media.put(f"/f/{name}.bin", "application/octet-stream", data, host="media.wa.localhost")
        media.redirect[f"/f/{name}"] = real
        media.redirect_body[f"/f/{name}"] = body
        send_file(a, room, "", attachment(host + f"/f/{name}", data, ctype="application/octet-stream",
                                          name=f"{name}.bin"), f"rb{i}")
    ms = ghost_messages(hs, len(cases))
    for m, (name, data, body) in zip(ms, cases):
        if len(body) > 64 * 1024:
            assert m["content"]["body"] == f"[file: {name}.bin] (not carried: its redirect's page is longer than 64 KiB)", m
            continue
        assert m["content"]["msgtype"] == "m.file" and m["content"]["url"].startswith("mxc://"), (name, m["content"])
        assert hs.media(m["content"]["url"])["data"] == data


def test_a_rehosted_files_record_goes_when_its_message_expires(mx, hs, wally_room, media, pg, db_url):
    """What is remembered of a peer's file re-hosted on the homeserver
    (media_rehosted: the store's URL, digest, size, for whom, the mxc://
    URI) is the message's content, and goes with it: at its expiry here
    (retention.content_days and rows_days: test_retention.py).  Until the
    forty-fifth session it was kept for ever.  The redaction reaches the
    room; the file stays on the homeserver (no client API deletes it:
    docs/security.md)."""
    a, room = wally_room
    cat = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
    url = media.put("/f/expiring.png", "image/png", cat, host="media.wa.localhost")
    r = a.call("POST", f"/v1/rooms/{room}/messages", {
        "type": "message", "sender": a.user("wally"),
        "content": {"attachments": [attachment(url, cat)], "expires": int(time.time() * 1000) + 3600000}}, idem="x1")
    assert r.status_code == 202, r.text
    [m] = ghost_messages(hs, 1)
    assert pg.psql("SELECT source FROM media_rehosted", db_url) == url
    # its expiry brought to now once it is delivered and re-hosted: a few
    # seconds from the send could pass before either on a slow machine
    pg.psql("UPDATE events SET content = jsonb_set(content, '{content,expires}', "
            "to_jsonb((extract(epoch FROM clock_timestamp()) * 1000)::bigint)) WHERE public_id = '%s'"
            % r.json()["id"], db_url)
    wait_until(lambda: any(e["type"] == "m.room.redaction" and e.get("redacts") == m["event_id"]
                           for e in hs.events(m["room_id"])), timeout=20, what="the redaction")
    wait_until(lambda: pg.psql("SELECT count(*) FROM media_rehosted", db_url) == "0", timeout=10,
               what="the record forgotten")


def test_a_file_whose_message_expires_while_it_comes_is_neither_uploaded_nor_recorded(mx, hs, wally_room, media, pg,
                                                                                      db_url):
    """The media worker fetches a peer's file while its message waits; a
    message that expires meanwhile (its row expired, its content erased
    with the records of its files) no longer wants it.  Until the
    forty-eighth session's review the worker uploaded the file all the
    same and wrote its record (the peer's URL, digest, size, for whom),
    which nothing named any more: the file stayed on the homeserver for
    nobody.  The worker looks at the message again before the upload
    (and before the record, under the message's lock)."""
    a, room = wally_room
    cat = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    url = media.put("/f/slow-expiring.png", "image/png", cat, host="media.wa.localhost")
    media.delay["/f/slow-expiring.png"] = 8  # under the fetch's 10 s low-speed cut
    r = a.call("POST", f"/v1/rooms/{room}/messages", {
        "type": "message", "sender": a.user("wally"),
        "content": {"attachments": [attachment(url, cat)], "expires": int(time.time() * 1000) + 3600000}}, idem="x2")
    assert r.status_code == 202, r.text
    msg = r.json()["id"]
    wait_until(lambda: "/f/slow-expiring.png" in [p for p, _ in media.requests], what="the slow fetch under way")
    pg.psql("UPDATE events SET content = jsonb_set(content, '{content,expires}', "
            "to_jsonb((extract(epoch FROM clock_timestamp()) * 1000)::bigint)) WHERE public_id = '%s'" % msg, db_url)
    wait_until(lambda: pg.psql("SELECT string_agg(o.state, ',') || ' ' || e.content::text FROM outbox o "
                               f"JOIN events e ON e.id = o.event_id WHERE e.public_id = '{msg}' "
                               "GROUP BY e.content", db_url) == "expired {}", timeout=20, what="the expiry")
    # wally's next file comes after the slow one: the worker takes one
    # file of a peer at a time, so the slow one is done with by then
    dog = b"\x89PNG\r\n\x1a\n" + os.urandom(2500)
    send_file(a, room, "after", attachment(media.put("/f/dog.png", "image/png", dog, host="media.wa.localhost"),
                                           dog, name="dog.png"), "x3")
    [m] = ghost_messages(hs, 1)
    assert hs.media(m["content"]["url"])["data"] == dog
    assert hs.uploaded().count(cat) == 0  # not uploaded
    assert pg.psql(f"SELECT count(*) FROM media_rehosted WHERE source = '{url}'", db_url) == "0"


def test_a_file_or_avatar_on_another_host_is_fetched_unsigned(mx, hs, wally_room, media):
    """Causeway's signature is its credential at every peer's store: a file
    the peer names on a host outside its own domain (another peer's, a
    look-alike: evil-wa.localhost is not under wa.localhost) is fetched
    without it, and re-hosted all the same; so is a ghost's avatar.  Until
    the nineteenth session every such fetch was signed."""
    a, room = wally_room
    face = b"\x89PNG\r\n\x1a\n" + os.urandom(700)
    face_url = media.put("/u/wally.png", "image/png", face, host="media.tg.localhost")
    assert a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": "Wally", "avatar": {
        "content_type": "image/png", "url": face_url, "size": len(face)}}).status_code == 200
    files = []
    for i, host in enumerate(("media.evil-wa.localhost", "media.tg.localhost")):
        data = b"\x89PNG\r\n\x1a\n" + os.urandom(1000 + i)
        url = media.put(f"/f/{i}.png", "image/png", data, host=host)
        send_file(a, room, f"file {i}", attachment(url, data), f"o{i}")
        files.append(data)
    ms = ghost_messages(hs, 2)
    assert [hs.media(m["content"]["url"])["data"] for m in ms] == files
    wait_until(lambda: (hs.profile(GHOST) or {}).get("avatar_url"), what="the avatar")
    assert hs.media(hs.profile(GHOST)["avatar_url"])["data"] == face
    assert sorted(p for p, _ in media.requests) == ["/f/0.png", "/f/1.png", "/u/wally.png"]
    for path, headers in media.requests:
        assert "Signature" not in headers and "Signature-Input" not in headers, (path, headers)


def test_a_file_rehosted_for_one_peer_is_not_given_to_another_naming_its_url(mx, hs, wally_room, media):
    """A file re-hosted on the homeserver is remembered by who it was
    fetched for (the domain that had the fetch signed): another peer naming
    the very URL of a file fetched, signed, for the first peer's user gets
    no mxc:// of it; its own fetch is made (unsigned: the host is not in
    its domain) and fails as the private store refuses it, and its message
    goes with the notice.  Until the twentieth session media_rehosted was
    looked up by URL alone and the second peer got the first one's file
    through the gateway."""
    a, room = wally_room
    secret = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
    url = media.put("/f/private.png", "image/png", secret, host="media.wa.localhost")
    send_file(a, room, "mine", attachment(url, secret), "p1")
    [mine] = ghost_messages(hs, 1)
    assert hs.media(mine["content"]["url"])["data"] == secret
    assert [p for p, _ in media.requests] == ["/f/private.png"]
    # A's store gives the file only to a fetch signed for A, which B's is not.
    media.status["/f/private.png"] = 403
    b, srv = add_peer(mx, "tg", "tg.localhost")
    try:
        assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:tg", "opted_in": True}).ok
        assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user",
                                                   "subject": b.user("wally"), "state": "allowed"}).ok
        b_room = b.create_room([b.user("wally"), ALICE]).json()["id"]
        send_file(b, b_room, "yours?", attachment(url, secret), "p2")
        b_ghost = "@_cw_tg_wally:example.org"

        def b_messages():
            ms = [e for rid in hs.rooms() for e in hs.events(rid)
                  if e["type"] == "m.room.message" and e["sender"] == b_ghost]
            return ms or None
        [theirs] = wait_until(b_messages, timeout=20, what="the message of B's user")
    finally:
        srv.close()
    c = theirs["content"]
    assert c["msgtype"] == "m.text" and "url" not in c, c
    assert mine["content"]["url"] not in json.dumps(theirs)
    assert "not carried: not available from the sender's network (403)" in c["body"], c["body"]
    # B's fetch was made, unsigned: B cannot lend Causeway's signature to A's host.
    assert [p for p, _ in media.requests] == ["/f/private.png", "/f/private.png"]
    assert "Signature" not in media.requests[1][1]
    assert sum(1 for q in hs.requests if q["path"] == "/_matrix/media/v3/upload") == 1


def test_a_file_rehosted_before_its_signer_was_remembered_is_fetched_again(mx, hs, wally_room, media, pg, db_url):
    """A row of media_rehosted from before schema/027 does not say whom
    its file was fetched for (until the nineteenth session every fetch was
    signed): it is reused for no one, and the file is fetched again."""
    a, room = wally_room
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(1500)
    url = media.put("/f/old.png", "image/png", data, host="media.wa.localhost")
    pg.psql("INSERT INTO media_rehosted (network, source, sha256, native_uri, size) VALUES "
            f"('matrix', '{url}', '{hashlib.sha256(data).hexdigest()}', 'mxc://example.org/old', {len(data)})",
            db_url)
    send_file(a, room, "again", attachment(url, data), "old1")
    [m] = ghost_messages(hs, 1)
    assert m["content"]["url"] != "mxc://example.org/old" and hs.media(m["content"]["url"])["data"] == data
    assert [p for p, _ in media.requests] == ["/f/old.png"]


def test_a_file_that_cannot_be_carried_becomes_a_notice_and_a_failing_store_is_retried(mx, hs, gk, media):
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    small = os.urandom(2000)
    big = os.urandom(MAX + 1)
    cases = [
        ("gone.png", media.url + "/f/gone.png", attachment(media.url + "/f/gone.png", small, name="gone.png"),
         "not available from the sender's network (404)"),
        ("bad.png", media.put("/f/bad.png", "image/png", small),
         attachment(media.url + "/f/bad.png", small, name="bad.png", sha="0" * 64), "it does not match its checksum"),
        ("big.bin", media.put("/f/big.bin", "application/octet-stream", big),
         attachment(media.url + "/f/big.bin", big, ctype="application/octet-stream", name="big.bin"),
         "larger than this gateway carries"),
        ("lies.bin", media.put("/f/lies.bin", "application/octet-stream", big),
         attachment(media.url + "/f/lies.bin", big, ctype="application/octet-stream", name="lies.bin", size=10),
         "larger than its declared size"),
    ]
    for i, (_, _, att, _) in enumerate(cases):
        send_file(a, room, f"file {i}", att, f"c{i}")
    ms = ghost_messages(hs, len(cases))
    for m, (name, _, _, why) in zip(ms, cases):
        c = m["content"]
        assert c["msgtype"] == "m.text" and "url" not in c, c
        assert name in c["body"] and f"not carried: {why}" in c["body"], c["body"]
    # The declared size over the limit was not even fetched.
    assert "/f/big.bin" not in [p for p, _ in media.requests]
    assert not [q for q in hs.requests if q["path"] == "/_matrix/media/v3/upload"]
    # A store that fails for a while: the message waits (in order) and goes re-hosted.
    ok = media.put("/f/later.png", "image/png", small)
    media.status["/f/later.png"] = 503
    send_file(a, room, "later", attachment(ok, small), "c-later")
    wait_until(lambda: [p for p, _ in media.requests].count("/f/later.png") >= 2, timeout=20,
               what="a retry of the fetch")
    assert len(ghost_messages(hs, len(cases))) == len(cases)
    del media.status["/f/later.png"]
    m = ghost_messages(hs, len(cases) + 1)[-1]
    assert m["content"]["msgtype"] == "m.image" and hs.media(m["content"]["url"])["data"] == small


def test_a_stores_answer_that_is_no_whole_file_is_a_notice_and_nothing_is_uploaded(mx, hs, gk, media):
    """A peer's store answers a 206 part of the file (to a request without
    Range), a 204 or a 3xx that names no other place: none of them is the
    file, so none is uploaded as it, and no retry changes them: the
    message goes at once with a notice saying which answer came."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    data = os.urandom(3000)
    media.raw["/f/part.png"] = (206, {"Content-Type": "image/png", "Content-Range": f"bytes 0-999/{len(data)}"},
                                data[:1000])
    media.raw["/f/empty.png"] = (204, {}, b"")
    media.raw["/f/moved.png"] = (302, {"Content-Type": "text/html"}, b"<p>moved</p>")
    cases = [(name, status) for name, status in (("part.png", 206), ("empty.png", 204), ("moved.png", 302))]
    for i, (name, _) in enumerate(cases):
        send_file(a, room, f"file {i}", attachment(f"{media.url}/f/{name}", data, name=name), f"w{i}")
    ms = ghost_messages(hs, len(cases))
    for m, (name, status) in zip(ms, cases):
        c = m["content"]
        assert c["msgtype"] == "m.text" and "url" not in c, c
        assert name in c["body"] and f"not available from the sender's network ({status})" in c["body"], c["body"]
    assert not [q for q in hs.requests if q["path"] == "/_matrix/media/v3/upload"]
    assert not hs.uploaded()
    for name, _ in cases:  # each fetched once: refused for good, not retried
        assert [p for p, _ in media.requests].count(f"/f/{name}") == 1, (name, media.requests)


def test_an_upload_refused_as_too_large_is_a_notice_and_a_502_is_retried(mx, hs, gk, media):
    """The homeserver refuses an upload with M_TOO_LARGE (the spec's 413,
    or under another status, as a proxy or another homeserver may): no
    retry changes that, the message goes at once with a notice, after one
    upload.  A 502 is the homeserver away for now: the row is tried again
    (its backoff) and the file goes re-hosted.  Until the fifty-second
    session only a 413 was taken as too large."""
    from homeserver import MatrixError
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    big, later = os.urandom(2500), os.urandom(2600)
    answers = {"big.png": [MatrixError(400, "M_TOO_LARGE", "too large for this homeserver")],
               "later.png": [MatrixError(502, "M_UNKNOWN", "Bad gateway")]}

    def refuse(method, path, user):  # the file being sent's next answer instead, while it has one
        if method == "POST" and path == "/_matrix/media/v3/upload" and answers.get(refuse.name):
            return answers[refuse.name].pop(0)
        return None
    refuse.name = None
    hs.refuse = refuse
    try:
        refuse.name = "big.png"
        send_file(a, room, "big", attachment(media.put("/f/big.png", "image/png", big), big, name="big.png"), "u0")
        m = ghost_messages(hs, 1)[0]["content"]
        assert m["msgtype"] == "m.text" and "not carried: larger than the homeserver takes" in m["body"], m
        refuse.name = "later.png"
        send_file(a, room, "later", attachment(media.put("/f/later.png", "image/png", later), later,
                                               name="later.png"), "u1")
        m = ghost_messages(hs, 2)[1]["content"]
        assert m["msgtype"] == "m.image" and hs.media(m["url"])["data"] == later, m
    finally:
        hs.refuse = None
    ups = [(q["query"].get("filename"), q["status"]) for q in hs.requests if q["path"] == "/_matrix/media/v3/upload"]
    assert ups == [("big.png", 400), ("later.png", 502), ("later.png", 200)], ups


def test_an_upload_rate_limited_past_the_retry_budget_is_waited_out_and_the_file_goes_once(make_daemon, db_url, hs,
                                                                                           media, pg):
    """The homeserver answers the upload of a peer's file 429
    M_LIMIT_EXCEEDED with retry_after_ms, more times than the row's retry
    budget (3 here) would allow: as a 429 to any other call of the row's,
    each waits as long as asked and is not counted, and the file arrives
    once, its row delivered on its first counted attempt.  Until the
    fifty-second session's review the upload, made on the media worker's
    thread, was a failed attempt of the row: the message was a dead letter
    after 3 such answers, never shown."""
    port = free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    d = make_daemon(db_url, options={"server": {"port": str(port), "ca_file": media.cert_file,
                                                "media_max_bytes": str(MAX), "media_private_addresses": "true"},
                                     "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN,
                                                "hs_token": HS_TOKEN},
                                     "dispatcher": {"retry_budget": "3", "retry_base_ms": "20",
                                                    "retry_max_ms": "50"}}).start()
    a, srv = add_peer(d, "gk", "wa.example")
    try:
        consent_alice(d)
        hs.create_user("alice")
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        cat = os.urandom(2000)
        hs.refuse_retry_after_ms = 300
        limited = []

        def refuse(method, path, user):
            if method == "POST" and path == "/_matrix/media/v3/upload" and len(limited) < 5:
                limited.append(time.monotonic())
                return 429
            return False
        hs.refuse = refuse
        mid = send_file(a, room, "look", attachment(media.put("/f/limited.png", "image/png", cat), cat), "lim")
        [m] = ghost_messages(hs, 1)
        assert m["content"]["msgtype"] == "m.image" and hs.media(m["content"]["url"])["data"] == cat, m["content"]
        ups = [q["status"] for q in hs.requests if q["path"] == "/_matrix/media/v3/upload"]
        assert ups == [429] * 5 + [200], ups
        # each wait as asked (300 ms) before the file was asked for again
        gaps = [b - a_ for a_, b in zip(limited, limited[1:])]
        assert min(gaps) >= 0.25, gaps
        wait_until(lambda: pg.psql("SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e "
                                   f"ON e.id = o.event_id WHERE e.public_id = '{mid}' AND o.destination = 'matrix'",
                                   db_url) == "delivered 1", what="delivered 1")
        assert len(ghost_messages_now(hs)) == 1
    finally:
        hs.refuse = None
        srv.close()


def test_a_files_earlier_refusal_is_not_the_answer_for_a_later_correct_attachment(mx, hs, gk, media):
    """A file not carried for what its attachment declared (a sha256 or
    size its bytes do not match) is remembered with that declaration: a
    later message naming the same URL with the right sha256 and size is
    fetched and carried.  Until the thirty-second session the media
    worker remembered the refusal by (signer, URL) alone and answered the
    second message with the first one's notice, without a fetch (a
    review's finding)."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    url = media.put("/f/cat.png", "image/png", data)
    send_file(a, room, "wrong sum", attachment(url, data, sha="0" * 64), "m1")
    send_file(a, room, "too small", attachment(url, data, size=100), "m2")
    send_file(a, room, "right", attachment(url, data), "m3")
    ms = [m["content"] for m in ghost_messages(hs, 3)]
    assert "not carried: it does not match its checksum" in ms[0]["body"], ms[0]
    assert "not carried: larger than its declared size" in ms[1]["body"], ms[1]
    assert ms[2]["msgtype"] == "m.image" and hs.media(ms[2]["url"])["data"] == data, ms[2]
    assert [p for p, _ in media.requests].count("/f/cat.png") == 3
    # The same wrong declaration again: its refusal is remembered.
    send_file(a, room, "wrong again", attachment(url, data, sha="0" * 64), "m4")
    m = ghost_messages(hs, 4)[3]["content"]
    assert "not carried: it does not match its checksum" in m["body"], m
    assert [p for p, _ in media.requests].count("/f/cat.png") == 3


def test_a_peers_mxc_file_or_image_is_not_passed_through(mx, hs, gk, media):
    """A peer's content URI (mxc://, its attachment or an <img> of its
    HTML) is no file the gateway fetched: it is not carried, said so in
    the text, as for a file that cannot be fetched.  Until the thirtieth
    session it went into the Matrix event as it was (spec/adapters.md:
    media crosses re-hosted, never as a bare link), with the peer's type
    and name: a peer could show any file of any Matrix server (this one's
    too) as its user's.  A file name with a bidirectional control (which
    shows "invoice.pdf" U+202E "gpj.exe" as "invoice.pdfexe.jpg") is refused
    at the API."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    evil = {"content_type": "text/html", "url": "mxc://evil.example/abcdef", "size": 5, "filename": "invoice.pdf"}
    r = a.call("POST", f"/v1/rooms/{room}/messages",
               {"type": "message", "sender": a.user("wally"),
                "content": {"parts": [{"type": "text/plain", "body": "look"}],
                            "attachments": [dict(evil, filename="invoice.pdf\u202egpj.exe")]}}, idem="mxc-0")
    assert r.status_code == 400 and "filename" in r.text, r.text
    send_file(a, room, "look", evil, "mxc-1")
    r = a.call("POST", f"/v1/rooms/{room}/messages",
               {"type": "message", "sender": a.user("wally"),
                "content": {"parts": [{"type": "text/plain", "body": "see"},
                                      {"type": "text/html",
                                       "body": '<b>see</b> <img src="mxc://example.org/someones" alt="a cat">'}]}},
               idem="mxc-2")
    assert r.status_code == 202, r.text
    first, second = ghost_messages(hs, 2)
    c = first["content"]
    assert c["msgtype"] == "m.text" and "url" not in c and "info" not in c, c
    assert c["body"].startswith("look\n[file: invoice.pdf] (not carried: ") and "mxc://" not in c["body"], c
    c = second["content"]
    assert c["formatted_body"] == "<b>see</b> a cat" and "mxc://" not in json.dumps(c), c
    assert not [q for q in hs.requests if "/media/" in q["path"]]


def test_a_file_whose_fetch_is_refused_for_good_is_a_notice_at_once(make_daemon, db_url, hs, media, pg):
    """A file this gateway refuses to fetch for a fact of its URL, which no
    retry changes (here: its host's addresses are not public, and
    server.media_private_addresses is off, as it is by default), becomes a
    line of the text at once, as a file the store says is gone does
    ("[image: cat.png] (not carried: ...)", never silence); the store is
    never asked, the row is delivered on its first counted attempt, and the
    room's next message follows it. Until the twenty-sixth session the
    refusal failed as a store that is away does: retried until the row's
    budget was spent, then dead, the message never shown."""
    port = free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    d = make_daemon(db_url, options={"server": {"port": str(port), "ca_file": media.cert_file,
                                                "media_max_bytes": str(MAX)},
                                     "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN,
                                                "hs_token": HS_TOKEN},
                                     "dispatcher": {"retry_budget": "3", "retry_base_ms": "20",
                                                    "retry_max_ms": "50"}}).start()
    a, srv = add_peer(d, "gk", "wa.localhost")
    try:
        consent_alice(d, subject="mimi://wa.localhost/u/wally")
        hs.create_user("alice")
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        cat = os.urandom(2000)
        url = media.put("/f/private.png", "image/png", cat)
        mid = send_file(a, room, "look", attachment(url, cat), "private")
        assert a.send(room, a.user("wally"), "after it").status_code == 202
        ms = ghost_messages(hs, 2)
        c = ms[0]["content"]
        assert c["msgtype"] == "m.text" and "url" not in c, c
        assert "[image: cat.png]" in c["body"] and "(not carried: its address is not public)" in c["body"], c
        assert ms[1]["content"]["body"] == "after it"
        assert media.requests == []
        # the states are recorded once the whole batch is sent: after its last
        # message arrived
        wait_until(lambda: pg.psql("SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e "
                                   f"ON e.id = o.event_id WHERE e.public_id = '{mid}' AND o.destination = 'matrix'",
                                   db_url) == "delivered 1", what="delivered 1")
    finally:
        srv.close()


class RecordingProxy:
    """A listener that takes the place of an HTTP proxy: it notes what
    each connection asks first and answers 403."""

    def __init__(self):
        import socket
        self.asked = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(5)
                try:
                    self.asked.append(c.recv(4096).split(b"\r\n")[0].decode(errors="replace"))
                    c.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_a_peers_file_is_never_fetched_through_an_environment_proxy(make_daemon, db_url, hs, media):
    """The daemon's fetches of URLs a peer names never use a proxy from the
    environment (https_proxy, HTTPS_PROXY, all_proxy): the address check
    against SSRF (server.media_private_addresses off) is made on the
    address connected to, which through a proxy would be the proxy's, not
    the file's host's.  Until the thirty-second session libcurl followed
    the environment: with https_proxy set, every such fetch went through
    the proxy, to any host it would reach."""
    proxy = RecordingProxy()
    port = free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    d = make_daemon(db_url, options={"server": {"port": str(port), "ca_file": media.cert_file,
                                                "media_max_bytes": str(MAX), "media_private_addresses": "true"},
                                     "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN,
                                                "hs_token": HS_TOKEN}},
                    env={"https_proxy": proxy.url, "HTTPS_PROXY": proxy.url, "no_proxy": "", "NO_PROXY": ""}).start()
    a, srv = add_peer(d, "gk", "wa.localhost")
    try:
        consent_alice(d, subject="mimi://wa.localhost/u/wally")
        hs.create_user("alice")
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        cat = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
        send_file(a, room, "look", attachment(media.put("/f/direct.png", "image/png", cat), cat), "direct")
        [m] = ghost_messages(hs, 1)
        assert m["content"]["msgtype"] == "m.image" and hs.media(m["content"]["url"])["data"] == cat, m["content"]
        assert proxy.asked == [], proxy.asked
    finally:
        srv.close()
        proxy.close()


def test_a_file_behind_a_redirect_it_may_not_follow_is_a_notice(mx, hs, gk, media, pg, db_url):
    """The other refusals of a fetch for a fact of its URL: a redirect to
    plain http (a peer's file comes over https only) and a chain of
    redirects longer than 3 are lines of the text, not failures retried
    until the row is dead (until the twenty-sixth session they were)."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    cat = os.urandom(2000)
    media.redirect["/f/plain.png"] = "http://127.0.0.1:9/f/plain.png"
    media.redirect["/f/loop.png"] = media.url + "/f/loop.png"
    # libcurl would send the user and password as Basic authentication
    # (until the forty-seventh session's review it did)
    media.redirect["/f/cred.png"] = media.url.replace("https://", "https://u:hunter2@", 1) + "/f/real.png"
    cases = [("plain.png", "not over https"), ("loop.png", "too many redirects"),
             ("cred.png", "its URL carries a user or password")]
    ids = [send_file(a, room, f"file {name}", attachment(media.url + "/f/" + name, cat, name=name), name)
           for name, _ in cases]
    ms = ghost_messages(hs, len(cases))
    for m, (name, why) in zip(ms, cases):
        c = m["content"]
        assert c["msgtype"] == "m.text" and "url" not in c, c
        assert f"[image: {name}]" in c["body"] and f"(not carried: {why})" in c["body"], c["body"]
    for mid in ids:
        # the states are recorded once the whole batch is sent: after its last
        # message arrived
        wait_until(lambda: pg.psql("SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e "
                                   f"ON e.id = o.event_id WHERE e.public_id = '{mid}' AND o.destination = 'matrix'",
                                   db_url) == "delivered 1", what="delivered 1")
    # the loop was followed 3 times after its first answer, once
    assert [p for p, _ in media.requests].count("/f/loop.png") == 4
    assert "/f/real.png" not in [p for p, _ in media.requests]
    assert "hunter2" not in json.dumps(ms)


def test_a_file_whose_url_cannot_be_signed_is_a_notice_at_once(mx, hs, wally_room, media, pg, db_url):
    """A hop on the peer's own hosts is signed; a redirect there whose URL
    httpsig_sign refuses (a Location of 9000 bytes: a target URI is at most
    8 KiB) is refused for good: a line of the text, "not carried: its URL
    cannot be signed", delivered on its first attempt, the long URL never
    asked for.  Until the fifty-second session's review every failure to
    sign was "out of memory", and the row was retried until its budget was
    spent.  A Location with UTF-8 bytes and spaces is carried: followed
    percent-encoded, as libcurl follows one itself, and signed so (until
    then an absolute one was taken raw, and its space made the file "not a
    URL this gateway can fetch")."""
    a, room = wally_room
    cat = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
    host = f"https://media.wa.localhost:{media.port}"
    media.redirect["/f/long.png"] = f"{host}/f/{'a' * 9000}.png"
    sent = "/f/caf%c3%a9%20au%20lait.png"  # as libcurl encodes it
    media.files[sent] = ("image/png", cat)
    media.redirect["/f/utf.png"] = f"{host}/f/caf\u00c3\u00a9 au lait.png"
    mid = send_file(a, room, "", attachment(host + "/f/long.png", cat, name="long.png"), "long")
    send_file(a, room, "", attachment(host + "/f/utf.png", cat, name="utf.png"), "utf")
    [m1, m2] = ghost_messages(hs, 2)
    c = m1["content"]
    assert c["msgtype"] == "m.text" and "url" not in c, c
    assert "[image: long.png] (not carried: its URL cannot be signed)" in c["body"], c["body"]
    assert m2["content"]["msgtype"] == "m.image" and hs.media(m2["content"]["url"])["data"] == cat, m2["content"]
    wait_until(lambda: pg.psql("SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e "
                               f"ON e.id = o.event_id WHERE e.public_id = '{mid}' AND o.destination = 'matrix'",
                               db_url) == "delivered 1", what="delivered 1")
    paths = [p for p, _ in media.requests]
    assert paths == ["/f/long.png", "/f/utf.png", sent], [p[:40] for p in paths]
    key = mx.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    verify_get("GET", host + sent, media.requests[2][1], key)


def test_a_file_at_a_url_libcurl_cannot_read_is_a_notice(mx, hs, gk, media, pg, db_url):
    """An attachment URL the peer API takes (https://, visible ASCII) but
    libcurl cannot read (a port past 65535) is refused for a fact of its
    URL: a line of the text at once, "not carried: not a URL this gateway
    can fetch", delivered on its first attempt, no store asked."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    cat = os.urandom(2000)
    mid = send_file(a, room, "look", attachment("https://media.wa.localhost:99999/f/cat.png", cat), "badport")
    [m] = ghost_messages(hs, 1)
    c = m["content"]
    assert c["msgtype"] == "m.text" and "url" not in c, c
    assert "[image: cat.png]" in c["body"] and "(not carried: not a URL this gateway can fetch)" in c["body"], c
    assert media.requests == []
    # the states are recorded once the whole batch is sent: after its last
    # message arrived
    wait_until(lambda: pg.psql("SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e "
                               f"ON e.id = o.event_id WHERE e.public_id = '{mid}' AND o.destination = 'matrix'",
                               db_url) == "delivered 1", what="delivered 1")


def test_a_file_longer_than_declared_is_not_carried(mx, hs, gk, media):
    """A rule's max_attachment_bytes judges the sizes attachments declare;
    the file is fetched at most up to its declared size, and a longer one
    is refused as one that does not match its checksum is (the message
    goes with a notice). A file re-hosted before, for an honest
    declaration, is not reused for a smaller one. Until the seventeenth
    session the fetch took up to server.media_max_bytes whatever was
    declared: a file declared 10 bytes passed a 1000-byte rule and was
    uploaded whole."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(30000)
    url = media.put("/f/big.png", "image/png", data)
    send_file(a, room, "honest", attachment(url, data), "d1")
    [m] = ghost_messages(hs, 1)
    assert m["content"]["msgtype"] == "m.image" and hs.media(m["content"]["url"])["data"] == data
    r = mx.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                         "limits": {"max_attachment_bytes": 1000}})
    assert r.status_code == 201, r.text
    wait_until(lambda: rules_in_force(mx) == 1, what="the rule in force")
    other = media.put("/f/other.png", "image/png", data[::-1])
    send_file(a, room, "same file", attachment(url, data, size=10), "d2")
    send_file(a, room, "new file", attachment(other, data[::-1], size=10), "d3")
    ms = ghost_messages(hs, 3)
    for m in ms[1:]:
        c = m["content"]
        assert c["msgtype"] == "m.text" and "url" not in c, c
        assert "not carried: larger than its declared size" in c["body"], c["body"]
    assert sum(1 for q in hs.requests if q["path"] == "/_matrix/media/v3/upload") == 1


def test_a_file_that_declares_no_size_is_fetched_up_to_the_gateways_limit(mx, hs, gk, media, pg, db_url):
    """An attachment may leave its size out: unknown (an XMPP user's file,
    XEP-0066, has none; until the thirty-second session such a file was
    declared "size": 0, and a Causeway peer refused it as larger than
    declared).  It is fetched up to server.media_max_bytes; a longer one
    is not carried.  Against a rule's max_attachment_bytes an unknown size
    counts as the largest an attachment may declare: the rule is not
    dodged by leaving the size out."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(30000)
    big = os.urandom(MAX + 1)
    ok = attachment(media.put("/f/nosize.png", "image/png", data), data)
    del ok["size"]
    too_big = attachment(media.put("/f/nosize.bin", "application/octet-stream", big), big,
                         ctype="application/octet-stream", name="nosize.bin")
    del too_big["size"]
    send_file(a, room, "no size", ok, "n1")
    send_file(a, room, "no size, too big", too_big, "n2")
    first, second = (m["content"] for m in ghost_messages(hs, 2))
    assert first["msgtype"] == "m.image" and hs.media(first["url"])["data"] == data, first
    assert first["info"]["size"] == len(data), first  # the file's own, as fetched (before: none)
    assert second["msgtype"] == "m.text" and "not carried: larger than this gateway carries" in second["body"], second
    r = mx.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                         "limits": {"max_attachment_bytes": 1000}})
    assert r.status_code == 201, r.text
    wait_until(lambda: rules_in_force(mx) == 1, what="the rule in force")
    r = a.call("POST", f"/v1/rooms/{room}/messages", {"type": "message", "sender": a.user("wally"),
                                                      "content": {"attachments": [ok]}}, idem="n3")
    assert r.status_code == 202, r.text
    states = pg.psql("SELECT string_agg(o.state, ',') FROM outbox o JOIN events e ON e.id = o.event_id "
                     f"WHERE e.public_id = '{r.json()['id']}'", db_url)
    assert states == "dropped", states  # the rule's too_large
    a.send(room, a.user("wally"), "after the rule")
    ms = wait_until(lambda: (lambda ms: ms if len(ms) >= 3 else None)(ghost_messages_now(hs)), what="the text")
    assert [m["content"]["body"] for m in ms[2:]] == ["after the rule"], [m["content"] for m in ms]
    assert [p for p, _ in media.requests].count("/f/nosize.png") == 1


def matrix_dm(mx, hs, a, pg, db_url):
    """alice's direct room with wally (made by a first message of his)."""
    consent_alice(mx)
    _, token = hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    a.send(room, a.user("wally"), "hello")
    mx_room = wait_until(lambda: next(iter(hs.rooms()), None), what="the direct room")
    wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings", db_url) == "1", what="the binding")
    hs.as_user(token).join(mx_room)
    return room, mx_room


@pytest.mark.parametrize("hs", [True, False], ids=["authenticated-media", "before-matrix-1.11"], indirect=True)
def test_a_matrix_users_file_reaches_the_peer_under_a_causeway_url(mx, hs, gk, pg, db_url):
    a, srv = gk
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    photo = b"\xff\xd8\xff\xe0" + os.urandom(5000)
    mxc = hs.upload(ALICE_MX, photo, "image/jpeg", "photo.jpg")
    ev = {"event_id": "$photo1", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
          "origin_server_ts": 1700000000000,
          "content": {"msgtype": "m.image", "body": "photo.jpg", "url": mxc,
                      "info": {"mimetype": "image/jpeg", "size": len(photo)}}}
    assert as_put(mx, "m1", {"events": [ev]}).status_code == 200
    got = wait_until(lambda: next((e for e in srv.events if e.get("content", {}).get("attachments")), None),
                     what="the photo at the peer")
    [att] = got["content"]["attachments"]
    assert mxc not in json.dumps(got)  # no link into the homeserver's store
    assert att["url"].startswith(mx.url + "/v1/media/m1."), att
    assert att["content_type"] == "image/jpeg" and att["size"] == len(photo)
    path = att["url"][len(mx.url):]
    r = a.call("GET", path)
    assert r.status_code == 200 and r.content == photo, (r.status_code, r.text[:200])
    assert r.headers["Content-Type"] == "image/jpeg" and r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Disposition"] == "inline"  # an image; a page would be "attachment"
    # Never a shared cache's; a client's an hour at most (a day until the
    # forty-fifth session, shown so after its message was deleted).
    assert r.headers["Cache-Control"] == "private, max-age=3600", r.headers
    fetches = [q for q in hs.requests if "/download/" in q["path"] and q["status"] == 200]
    assert len(fetches) == 1 and fetches[0]["path"].startswith(
        "/_matrix/client/v1/media/download/" if hs.authenticated_media else "/_matrix/media/v3/download/")
    # Only that peer, signed, with that token.
    tg, tg_srv = add_peer(mx, "tg", "tg.example")
    try:
        r = tg.call("GET", path)
        assert r.status_code == 404 and r.json()["code"] == "unknown_media", r.text
    finally:
        tg_srv.close()
    assert a.call("GET", path, sign=False).status_code == 401
    token = path.rsplit("/", 1)[1]
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    r = a.call("GET", "/v1/media/" + forged)
    assert r.status_code == 404 and r.json()["code"] == "unknown_media"
    for junk in ("m1.x.y", "nope", "m1." + "A" * 200 + ".B", "m1..", "m1.%2F.AAAA", "m1.%00.AAAA"):
        r = a.call("GET", "/v1/media/" + junk)
        # a NUL is no parameter: no route (it cut the path short until the forty-fifth session)
        code = "not_found" if "%00" in junk else "unknown_media"
        assert r.status_code == 404 and r.json()["code"] == code, (junk, r.text)
    # A file deleted from the homeserver is gone for the peer too.
    hs.delete_media(mxc)
    r = a.call("GET", path)
    assert r.status_code == 404 and r.json()["code"] == "unknown_media"


def token_mac(d, scope, source):
    """The MAC of a token, made as Causeway makes it (media.c
    media_key_derive, media_token_make) with the daemon's own key."""
    import base64
    import hmac
    from cryptography.hazmat.primitives import serialization
    with open(d.options["peer"]["signing_key_file"], "rb") as f:
        raw = serialization.load_pem_private_key(f.read(), None).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    key = hmac.new(raw, b"causeway media tokens v1", hashlib.sha256).digest()
    mac = hmac.new(key, (scope + "\n" + source).encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def test_a_files_token_ends_with_its_message_and_its_time(mx, hs, gk, pg, db_url):
    """A Matrix user's file reaches the peer as /v1/media/{token}?ev=&exp=:
    the MAC covers the message's id and an expiry
    (server.media_link_lifetime_s after the event was sent), and the file
    is served only while the message is there: deleted (redacted), its
    content erased (retention, expiry) or the token past its time, it is
    404 unknown_media.  Until the thirty-second session the token was the
    source under a MAC for the peer alone: a photo sent by mistake and
    taken back stayed fetchable through the gateway for ever (a review's
    finding); such tokens are 404 now."""
    import base64
    import urllib.parse
    a, srv = gk
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    photos, paths = [], []
    for i in range(3):
        photo = b"\xff\xd8\xff\xe0" + os.urandom(3000 + i)
        mxc = hs.upload(ALICE_MX, photo, "image/jpeg", f"photo{i}.jpg")
        ev = {"event_id": f"$photo{i}", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
              "origin_server_ts": 1700000000000 + i,
              "content": {"msgtype": "m.image", "body": f"photo{i}.jpg", "url": mxc,
                          "info": {"mimetype": "image/jpeg", "size": len(photo)}}}
        assert as_put(mx, f"t{i}", {"events": [ev]}).status_code == 200
        got = wait_until(lambda: [e for e in srv.events if e.get("content", {}).get("attachments")][i:] or None,
                         what=f"photo {i} at the peer")[0]
        photos.append((photo, mxc, got["id"]))
        paths.append(got["content"]["attachments"][0]["url"][len(mx.url):])
    for (photo, _, msg), path in zip(photos, paths):
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        assert q["ev"] == [msg] and abs(int(q["exp"][0]) - (time.time() + 604800)) < 120, path
        r = a.call("GET", path)
        assert r.status_code == 200 and r.content == photo, (r.status_code, r.text[:200])
    # The message taken back: its file is no longer served.
    red = {"event_id": "$red0", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.redaction",
           "origin_server_ts": 1700000001000, "redacts": "$photo0", "content": {"redacts": "$photo0"}}
    assert as_put(mx, "red0", {"events": [red]}).status_code == 200
    wait_until(lambda: next((e for e in srv.events if e.get("type") == "delete"), None), what="the delete at the peer")
    r = a.call("GET", paths[0])
    assert r.status_code == 404 and r.json()["code"] == "unknown_media", (r.status_code, r.text[:200])
    # Its content erased (retention.content_days, an expiry): the same.
    pg.psql(f"UPDATE events SET content = '{{}}' WHERE public_id = '{photos[1][2]}'", db_url)
    r = a.call("GET", paths[1])
    assert r.status_code == 404 and r.json()["code"] == "unknown_media", (r.status_code, r.text[:200])
    # The third still is; not under another message's id, nor another time.
    photo, mxc, msg = photos[2]
    assert a.call("GET", paths[2]).status_code == 200
    for changed in (paths[2].replace("ev=" + msg, "ev=" + photos[1][2]),
                    re.sub(r"exp=(\d+)", lambda m: "exp=" + str(int(m.group(1)) + 1), paths[2]),
                    paths[2].split("?")[0]):
        r = a.call("GET", changed)
        assert r.status_code == 404 and r.json()["code"] == "unknown_media", (changed, r.text[:200])
    # Past its time (a token made as Causeway makes it, with the daemon's
    # key): 404; one made before the thirty-second session (no ev, no
    # exp; the MAC of the peer and the source alone): 404.
    src = base64.urlsafe_b64encode(mxc.encode()).decode().rstrip("=")
    for exp, status in ((int(time.time()) - 10, 404), (int(time.time()) + 100, 200)):
        mac = token_mac(mx, "\n".join(("gk", msg, str(exp))), mxc)
        r = a.call("GET", f"/v1/media/m1.{src}.{mac}?ev={msg}&exp={exp}")
        assert r.status_code == status, (exp, r.status_code, r.text[:200])  # in time: served
    assert r.content == photo
    r = a.call("GET", f"/v1/media/m1.{src}.{token_mac(mx, 'gk', mxc)}")
    assert r.status_code == 404 and r.json()["code"] == "unknown_media", r.text[:200]


def test_a_file_answered_with_a_type_that_is_no_media_type_is_served_as_octet_stream(mx, hs, gk, pg, db_url):
    """The type a file is served to the peer with is the one the homeserver
    answered, when it is a media type (media_type_valid: the peer API's
    check, RFC 6838 names).  Until the fifty-third session a fetched type
    had a laxer check of its own, which took a name from a symbol: a file
    answered as image/+png was served so."""
    a, srv = gk
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    data = os.urandom(300)
    for i, (answered, served) in enumerate((("image/+png", "application/octet-stream"),
                                            ("image/png; x=1", "image/png"))):
        mxc = hs.upload(ALICE_MX, data, answered, "f.bin")
        ev = {"event_id": f"$odd{i}", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
              "origin_server_ts": 1700000000000 + i,
              "content": {"msgtype": "m.file", "body": "f.bin", "url": mxc,
                          "info": {"mimetype": "image/png", "size": len(data)}}}
        assert as_put(mx, f"odd{i}", {"events": [ev]}).status_code == 200
        wait_until(lambda: len([e for e in srv.events if e.get("content", {}).get("attachments")]) == i + 1,
                   what="the file at the peer")  # noqa: B023 (waited for in the loop)
        att = [e for e in srv.events if e.get("content", {}).get("attachments")][i]["content"]["attachments"][0]
        r = a.call("GET", att["url"][len(mx.url):])
        assert r.status_code == 200 and r.content == data, (r.status_code, r.text[:200])
        assert r.headers["Content-Type"] == served, (answered, r.headers)


def test_a_file_of_a_long_content_uri_reaches_the_peer_as_a_link_it_can_fetch(mx, hs, gk, pg, db_url):
    """A valid content URI may have a media id of up to 255 characters
    (Matrix spec): its token, the source in base64 with the MAC, does not
    fit in one path segment (255 bytes), so it goes with its source in the
    query, /v1/media/m2.<MAC>?src=&ev=&exp=, and the peer fetches the
    file by it.  Until the fifty-second session a source over about 170
    bytes stayed an mxc:// URL the peer could not fetch.  Its source
    changed, or moved onto an m1 token, is the same 404 as a made-up one."""
    import urllib.parse
    a, srv = gk
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    photo = b"\xff\xd8\xff\xe0" + os.urandom(3000)
    media_id = "L" * 200 + "x" * 55
    with hs._lock:
        hs._media[media_id] = {"content_type": "image/jpeg", "data": photo, "filename": "long.jpg",
                               "user": ALICE_MX}
    mxc = f"mxc://example.org/{media_id}"
    ev = {"event_id": "$long", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
          "origin_server_ts": 1700000000000,
          "content": {"msgtype": "m.image", "body": "long.jpg", "url": mxc,
                      "info": {"mimetype": "image/jpeg", "size": len(photo)}}}
    assert as_put(mx, "tlong", {"events": [ev]}).status_code == 200
    got = wait_until(lambda: [e for e in srv.events if e.get("content", {}).get("attachments")] or None,
                     what="the photo at the peer")[0]
    url = got["content"]["attachments"][0]["url"]
    assert url.startswith(mx.url + "/v1/media/m2."), url
    path = url[len(mx.url):]
    assert len(urllib.parse.urlsplit(path).path.rsplit("/", 1)[1]) <= 255, path
    r = a.call("GET", path)
    assert r.status_code == 200 and r.content == photo, (r.status_code, r.text[:200])
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    src, mac = q["src"][0], urllib.parse.urlsplit(path).path.rsplit("/m2.", 1)[1]
    for bad in (path.replace("src=" + src, "src=" + src[:-4] + "AAAA"),
                path.replace("/m2.", "/m1."),
                path.split("?")[0] + f"?ev={q['ev'][0]}&exp={q['exp'][0]}",
                path.replace(f"exp={q['exp'][0]}", f"exp={int(q['exp'][0]) + 1}"),
                path.replace("/m2." + mac, "/m2." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BA"))):
        r = a.call("GET", bad)
        assert r.status_code == 404 and r.json()["code"] == "unknown_media", (bad, r.status_code, r.text[:200])


def alice_sends_photos(mx, hs, srv, mx_room, n, tag):
    """alice sends n photos ($<tag><i>) in mx_room: [(bytes, mxc, the peer's
    id, its token's path)] as the peer got them."""
    out = []
    for i in range(n):
        photo = b"\xff\xd8\xff\xe0" + os.urandom(2000 + i)
        mxc = hs.upload(ALICE_MX, photo, "image/jpeg", f"{tag}{i}.jpg")
        ev = {"event_id": f"${tag}{i}", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
              "origin_server_ts": 1700000000000 + i,
              "content": {"msgtype": "m.image", "body": f"{tag}{i}.jpg", "url": mxc,
                          "info": {"mimetype": "image/jpeg", "size": len(photo)}}}
        assert as_put(mx, f"{tag}-t{i}", {"events": [ev]}).status_code == 200
        got = wait_until(lambda: next((e for e in list(srv.events) if e.get("content", {}).get("attachments")
                                       and e["content"]["attachments"][0].get("filename") == f"{tag}{i}.jpg"),
                                      None), what=f"photo {i} at the peer")
        out.append((photo, mxc, got["id"], got["content"]["attachments"][0]["url"][len(mx.url):]))
    return out


def alice_edits(mx, srv, mx_room, target, event_id, new_content):
    """alice edits $target into new_content (as $event_id): the edit as the
    peer got it."""
    ev = {"event_id": event_id, "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
          "origin_server_ts": 1700000002000,
          "content": dict(new_content, body="* " + new_content["body"], **{
              "m.new_content": new_content, "m.relates_to": {"rel_type": "m.replace", "event_id": target}})}
    before = len([e for e in list(srv.events) if e.get("type") == "edit"])
    assert as_put(mx, "edit-" + event_id, {"events": [ev]}).status_code == 200
    return wait_until(lambda: [e for e in list(srv.events) if e.get("type") == "edit"][before:] or None,
                      what=f"the edit {event_id} at the peer")[0]


def test_a_file_the_homeserver_refuses_is_403_not_try_again(mx, hs, gk, pg, db_url, monkeypatch):
    """A token's file that the homeserver refuses (403 M_FORBIDDEN, or a 400)
    is refused for good: 403 media_refused, no Retry-After, as a link's
    file that the gateway will not fetch.  Until the fifty-first session's
    review it was 503 "try again later" with Retry-After, and the peer
    asked again for ever.  A homeserver that is away (its 502, 429) or that
    refuses this gateway's own token (401: the operator mends it) is still
    503 with Retry-After."""
    from homeserver import MatrixError
    a, srv = gk
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    [(photo, _, _, path)] = alice_sends_photos(mx, hs, srv, mx_room, 1, "refused")
    serve = hs._serve
    for status, errcode, code in ((403, "M_FORBIDDEN", 403), (400, "M_UNKNOWN", 403), (502, "M_UNKNOWN", 503),
                                  (429, "M_LIMIT_EXCEEDED", 503), (401, "M_UNKNOWN_TOKEN", 503)):
        def refuse(server, media_id, status=status, errcode=errcode):
            raise MatrixError(status, errcode, "no")
        monkeypatch.setattr(hs, "_serve", refuse)
        r = a.call("GET", path)
        assert r.status_code == code, (status, r.status_code, r.text[:200])
        if code == 403:
            assert "Retry-After" not in r.headers and r.json()["code"] == "media_refused", (status, r.text)
            assert "the homeserver refuses it" in r.json()["detail"], r.text
        else:
            assert r.json()["code"] == "unavailable" and int(r.headers["Retry-After"]) >= 1, (status, r.text)
    monkeypatch.setattr(hs, "_serve", serve)
    r = a.call("GET", path)
    assert r.status_code == 200 and r.content == photo, (r.status_code, r.text[:200])


def test_a_file_the_homeserver_will_never_serve_whole_is_403_and_a_redirect_is_followed(mx, hs, gk, pg, db_url,
                                                                                       media, monkeypatch):
    """The homeserver's download answers as the specification has them
    (Matrix 1.11 GET /_matrix/client/v1/media/download): 502 M_TOO_LARGE,
    a file larger than it serves, is so at every try: 403 media_refused
    with why, no Retry-After; a 502 without it, or 504
    M_NOT_YET_UPLOADED, is for now: 503 with Retry-After.  A 204, a 206
    part (to a request without Range) or a 3xx that names no other place
    is no file, and never given as one: 403 too.  A 307 to where the file
    is (a CDN) is followed.  Until the fifty-second session each of those
    refusals was 503 "try again later", for ever."""
    from homeserver import MatrixError, RawBody
    a, srv = gk
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    [(photo, _, _, path)] = alice_sends_photos(mx, hs, srv, mx_room, 1, "whole")
    serve = hs._serve
    part = RawBody(photo[:100], "image/jpeg", "inline", {"Content-Range": f"bytes 0-99/{len(photo)}"})
    cdn = media.put("/cdn/whole0.jpg", "image/jpeg", photo)
    cases = ((MatrixError(502, "M_TOO_LARGE", "too large"), 403, "M_TOO_LARGE"),
             (MatrixError(413, "M_TOO_LARGE", "too large"), 403, "M_TOO_LARGE"),
             (MatrixError(502, "M_UNKNOWN", "bad gateway"), 503, None),
             (MatrixError(504, "M_NOT_YET_UPLOADED", "not yet"), 503, None),
             ((204, RawBody(b"", "image/jpeg", "inline")), 403, "204"),
             ((206, part), 403, "206"),
             ((302, RawBody(b"<a>moved</a>", "text/html", "inline")), 403, "redirect"),
             ((307, RawBody(b"", "text/plain", "inline", {"Location": cdn})), 200, None))
    for answer, code, why in cases:
        def instead(server, media_id, answer=answer):
            if isinstance(answer, MatrixError):
                raise answer
            return answer
        monkeypatch.setattr(hs, "_serve", instead)
        r = a.call("GET", path)
        assert r.status_code == code, (answer, r.status_code, r.text[:200])
        if code == 403:
            assert "Retry-After" not in r.headers and r.json()["code"] == "media_refused", (answer, r.text)
            assert why in r.json()["detail"], (answer, r.text)
        elif code == 503:
            assert r.json()["code"] == "unavailable" and int(r.headers["Retry-After"]) >= 1, (answer, r.text)
        else:
            assert r.content == photo, (answer, len(r.content))
    assert [p for p, _ in media.requests].count("/cdn/whole0.jpg") == 1
    monkeypatch.setattr(hs, "_serve", serve)
    r = a.call("GET", path)
    assert r.status_code == 200 and r.content == photo, (r.status_code, r.text[:200])


def test_a_download_the_homeserver_redirects_for_ever_or_off_http_is_403(mx, hs, gk, pg, db_url, monkeypatch):
    """The homeserver's download (Matrix 1.11: it may answer 307 or 308 to
    where the file is, a CDN) redirects round a loop, more than the 3 hops
    the gateway follows, or to a place not over http or https (ftp://,
    file://): every try meets the same redirects, so the peer's answer is
    403 media_refused with why, no Retry-After.  Until the fifty-second
    session it was 503 "try again later", and the peer asked again for
    ever.  A chain of 3 hops, within the limit, is followed."""
    from homeserver import RawBody
    a, srv = gk
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    [(photo, mxc, _, path)] = alice_sends_photos(mx, hs, srv, mx_room, 1, "looped")
    serve = hs._serve
    loop = f"{hs.url}/_matrix/client/v1/media/download/example.org/looped"
    cases = (((307, RawBody(b"", "text/plain", "inline", {"Location": loop})), 403, "redirects more than 3 times"),
             ((308, RawBody(b"", "text/plain", "inline", {"Location": "ftp://127.0.0.1/looped.jpg"})), 403,
              "not over http or https"),
             ((307, RawBody(b"", "text/plain", "inline", {"Location": "file:///etc/hostname"})), 403,
              "not over http or https"),
             ("hops", 200, None))
    file_id = mxc.rsplit("/", 1)[-1]
    for answer, code, why in cases:
        asked = []

        def instead(server, media_id, answer=answer):
            asked.append(media_id)
            if answer != "hops":
                return answer
            if media_id in (file_id, "hop1", "hop2"):  # file -> hop1 -> hop2 -> hop3, which serves it
                nxt = {file_id: "hop1", "hop1": "hop2", "hop2": "hop3"}[media_id]
                return 307, RawBody(b"", "text/plain", "inline",
                                    {"Location": f"{hs.url}/_matrix/client/v1/media/download/example.org/{nxt}"})
            return serve(server, file_id)
        monkeypatch.setattr(hs, "_serve", instead)
        r = a.call("GET", path)
        assert r.status_code == code, (answer, r.status_code, r.text[:200])
        if code == 403:
            assert "Retry-After" not in r.headers and r.json()["code"] == "media_refused", (answer, r.text)
            assert why in r.json()["detail"], (answer, r.text)
            # the loop followed 3 times, then given up: 4 asks
            assert len(asked) == (4 if "3 times" in why else 1), (answer, asked)
        else:
            assert r.content == photo and asked == [file_id, "hop1", "hop2", "hop3"], (len(r.content), asked)
    monkeypatch.setattr(hs, "_serve", serve)
    r = a.call("GET", path)
    assert r.status_code == 200 and r.content == photo, (r.status_code, r.text[:200])


def test_an_edit_that_takes_the_file_out_ends_its_link(mx, hs, gk, pg, db_url):
    """alice edits an image into text: the file is no longer in her
    message, and its link at the peer ends there, as after a delete (404
    unknown_media).  An edit that keeps the file (its caption changed)
    ends nothing: the original's link and the edit's own are served until
    a later edit takes the file out, which ends both.  Until the
    thirty-third session the original's link was served until the message
    was deleted or the link's time passed: the original event still held
    the file."""
    a, srv = gk
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    (p0, _, msg0, path0), (p1, mxc1, msg1, path1) = alice_sends_photos(mx, hs, srv, mx_room, 2, "edited")
    assert a.call("GET", path0).content == p0 and a.call("GET", path1).content == p1
    # The first made text: its file is gone from the message.
    edit = alice_edits(mx, srv, mx_room, "$edited0", "$edit0", {"msgtype": "m.text", "body": "never mind"})
    assert edit["content"]["replaces"] == msg0 and not edit["content"].get("attachments"), edit
    r = a.call("GET", path0)
    assert r.status_code == 404 and r.json()["code"] == "unknown_media", (r.status_code, r.text[:200])
    # The second's caption changed, its file kept: both links are served.
    image = {"msgtype": "m.image", "body": "a cat", "filename": "edited1.jpg", "url": mxc1,
             "info": {"mimetype": "image/jpeg", "size": len(p1)}}
    edit = alice_edits(mx, srv, mx_room, "$edited1", "$edit1", image)
    [att] = edit["content"]["attachments"]
    kept = att["url"][len(mx.url):]
    assert f"ev={edit['id']}" in kept, kept
    for path in (path1, kept):
        r = a.call("GET", path)
        assert r.status_code == 200 and r.content == p1, (path, r.status_code, r.text[:200])
    # Then made text: the file is out, and neither link is served.
    alice_edits(mx, srv, mx_room, "$edited1", "$edit2", {"msgtype": "m.text", "body": "no cat"})
    for path in (path1, kept):
        r = a.call("GET", path)
        assert r.status_code == 404 and r.json()["code"] == "unknown_media", (path, r.status_code, r.text[:200])


def test_a_peer_no_longer_in_the_room_cannot_fetch_its_files(mx, hs, gk, pg, db_url):
    """alice sends a photo to a group; gk then takes its last user, wally,
    out of it: gk's token for the photo is answered 404, byte for byte the
    answer to a token that never was (a peer no longer in a room learns
    nothing of its messages, as GET /v1/rooms/{room} shows it no more).
    Until the thirty-third session the token served the file to a peer
    out of the room until the token's time passed."""
    a, srv = gk
    gid = a.create_room([a.user("wally"), ALICE], kind="group").json()["id"]
    rid = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{gid}'", db_url)
    pg.psql("INSERT INTO room_bindings (room_id, network, native_id, local_identity_id) SELECT "
            f"{rid}, 'matrix', '!portal:example.org', id FROM identities WHERE uri = '{ALICE}'", db_url)
    # alice has joined her portal (the peer put her in invited).
    pg.psql(f"UPDATE room_members SET membership = 'joined', peer_invited = false WHERE room_id = {rid}", db_url)
    hs.create_user("alice")
    [(photo, _, msg, path)] = alice_sends_photos(mx, hs, srv, "!portal:example.org", 1, "group")
    r = a.call("GET", path)
    assert r.status_code == 200 and r.content == photo, (r.status_code, r.text[:200])
    token = path.split("?")[0].rsplit("/", 1)[1]
    forged = path.replace(token, token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))
    unknown = a.call("GET", forged)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_media", unknown.text
    r = a.call("POST", f"/v1/rooms/{gid}/members", {"remove": [a.user("wally")]})
    assert r.status_code == 200, r.text
    assert a.call("GET", f"/v1/rooms/{gid}").status_code == 404  # the room, gk sees no more
    r = a.call("GET", path)
    assert r.status_code == 404, (r.status_code, r.text[:200])
    assert r.content == unknown.content and r.headers["Content-Type"] == unknown.headers["Content-Type"], r.text
    assert pg.psql(f"SELECT count(*) FROM events WHERE public_id = '{msg}'", db_url) == "1"  # still there


def test_a_stranger_is_answered_as_one_while_every_fetcher_is_busy(make_daemon, db_url, hs, pg):
    """With every fetcher busy (server.media_fetches, here one, held by a
    file the homeserver is slow to give), a member's token is answered 503
    "try again", and a token of a peer no longer in the room the same 404
    as a token that never was, byte for byte, as when a fetcher is free:
    whether the peer is a member is asked before it is told that files
    are busy. Until the thirty-fourth session the stranger was answered
    503 too, the one answer that told it from a token that never was."""
    port = free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    d = make_daemon(db_url, options={"server": {"port": str(port), "media_fetches": "1"},
                                     "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN,
                                                "hs_token": HS_TOKEN}}).start()
    a, srv = add_peer(d, "gk", "wa.example")
    t = None
    try:
        gid = a.create_room([a.user("wally"), ALICE], kind="group").json()["id"]
        rid = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{gid}'", db_url)
        pg.psql("INSERT INTO room_bindings (room_id, network, native_id, local_identity_id) SELECT "
                f"{rid}, 'matrix', '!portal:example.org', id FROM identities WHERE uri = '{ALICE}'", db_url)
        pg.psql(f"UPDATE room_members SET membership = 'joined', peer_invited = false WHERE room_id = {rid}",
                db_url)
        hs.create_user("alice")
        [(slow_photo, _, _, slow), (_, _, _, path)] = alice_sends_photos(d, hs, srv, "!portal:example.org", 2,
                                                                         "busy")
        token = path.split("?")[0].rsplit("/", 1)[1]
        unknown = a.call("GET", path.replace(token, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")))
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_media", unknown.text
        hs.media_latency = 6.0
        started, out = hs.downloads_started, {}
        t = threading.Thread(target=lambda: out.update(r=a.call("GET", slow)))
        t.start()
        wait_until(lambda: hs.downloads_started > started, what="the slow fetch under way")
        r = a.call("GET", path)
        assert r.status_code == 503 and r.json()["code"] == "unavailable", (r.status_code, r.text[:200])
        assert "too many files" in r.json()["detail"] and r.headers.get("Retry-After"), r.text
        assert a.call("POST", f"/v1/rooms/{gid}/members", {"remove": [a.user("wally")]}).status_code == 200
        for _ in range(3):
            r = a.call("GET", path)
            assert (r.status_code, r.content, r.headers["Content-Type"]) == (
                unknown.status_code, unknown.content, unknown.headers["Content-Type"]), (r.status_code, r.text[:200])
        assert hs.downloads_started == started + 1  # the stranger's token fetched nothing
        t.join(20)
        assert out["r"].status_code == 200 and out["r"].content == slow_photo, out
    finally:
        hs.media_latency = 0.0
        if t:
            t.join(20)
        srv.close()


def test_a_token_whose_message_row_is_gone_is_answered_as_one_that_never_was(mx, hs, gk, pg, db_url):
    """A message whose row is gone (retention.rows_days, which may be
    shorter than server.media_link_lifetime_s) leaves nothing to ask
    about, not even its room: its token is answered as one that never
    was, byte for byte, to every peer.  Before, it got a 404 of its own
    ("no such file (its message was deleted or edited, or is no longer
    kept)"), and a peer taken out of the room, answered as a stranger
    while the row was kept, learnt by the other bytes that the message
    was no longer kept, which the stranger rule says it must not (review
    rH, thirty-third session).  A member's token of a message still there
    but expired keeps that answer."""
    a, srv = gk
    gid = a.create_room([a.user("wally"), ALICE], kind="group").json()["id"]
    rid = pg.psql(f"SELECT id FROM rooms WHERE public_id = '{gid}'", db_url)
    pg.psql("INSERT INTO room_bindings (room_id, network, native_id, local_identity_id) SELECT "
            f"{rid}, 'matrix', '!portal:example.org', id FROM identities WHERE uri = '{ALICE}'", db_url)
    pg.psql(f"UPDATE room_members SET membership = 'joined', peer_invited = false WHERE room_id = {rid}", db_url)
    hs.create_user("alice")
    [(_, _, purged_msg, purged), (_, _, kept_msg, kept)] = alice_sends_photos(mx, hs, srv, "!portal:example.org",
                                                                              2, "rows")
    token = kept.split("?")[0].rsplit("/", 1)[1]
    unknown = a.call("GET", kept.replace(token, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")))
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_media", unknown.text
    same = lambda r: (r.status_code, r.content, r.headers["Content-Type"]) == (  # noqa: E731
        unknown.status_code, unknown.content, unknown.headers["Content-Type"])
    # what retention.rows_days does to a message (its rows cascade)
    pg.psql(f"DELETE FROM events WHERE public_id = '{purged_msg}'", db_url)
    r = a.call("GET", purged)
    assert same(r), ("a member, the row gone", r.status_code, r.text[:200])
    pg.psql(f"UPDATE events SET expired = true WHERE public_id = '{kept_msg}'", db_url)
    r = a.call("GET", kept)
    assert r.status_code == 404 and "no longer kept" in r.json()["detail"], ("a member, the row kept", r.text)
    assert a.call("POST", f"/v1/rooms/{gid}/members", {"remove": [a.user("wally")]}).status_code == 200
    r = a.call("GET", kept)
    assert same(r), ("a stranger, the row kept", r.status_code, r.text[:200])
    pg.psql(f"DELETE FROM events WHERE public_id = '{kept_msg}'", db_url)
    r = a.call("GET", kept)
    assert same(r), ("a stranger, the row gone", r.status_code, r.text[:200])


def test_a_file_forwarded_from_another_server_reaches_the_peer_too(mx, hs, gk, pg, db_url):
    """A file a local user forwards from another Matrix server
    (mxc://other.server/...) is fetched through the user's homeserver,
    which serves other servers' files over federation, and offered to the
    peer under a Causeway URL like the homeserver's own.  Before, the peer
    got the bare mxc:// link, which it cannot fetch.  A content URI a peer
    puts in its own event is not offered to another peer."""
    a, srv = gk
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    photo = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    mxc = hs.remote_media("elsewhere.example", photo, "image/png", "cat.png")
    ev = {"event_id": "$fwd1", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
          "origin_server_ts": 1700000000000,
          "content": {"msgtype": "m.image", "body": "cat.png", "url": mxc,
                      "info": {"mimetype": "image/png", "size": len(photo)}}}
    assert as_put(mx, "fwd1", {"events": [ev]}).status_code == 200
    got = wait_until(lambda: next((e for e in srv.events if e.get("content", {}).get("attachments")), None),
                     what="the forwarded photo at the peer")
    [att] = got["content"]["attachments"]
    assert mxc not in json.dumps(got) and att["url"].startswith(mx.url + "/v1/media/"), att
    r = a.call("GET", att["url"][len(mx.url):])
    assert r.status_code == 200 and r.content == photo, (r.status_code, r.text[:200])
    assert any(q["path"].endswith("/download/elsewhere.example/" + mxc.rsplit("/", 1)[1]) for q in hs.requests)
    # A peer's own event naming a content URI: passed on as it is, never
    # offered under a Causeway URL to another peer.
    tg, tg_srv = add_peer(mx, "tg", "tg.example")
    try:
        grp = a.create_room([a.user("wally"), tg.user("tom")], kind="group").json()["id"]
        r = a.call("POST", f"/v1/rooms/{grp}/messages", {
            "type": "message", "sender": a.user("wally"), "content": {
                "parts": [{"type": "text/plain", "body": "look"}],
                "attachments": [{"content_type": "image/png", "url": mxc, "size": len(photo)}]}}, idem="peer-mxc")
        assert r.status_code == 202, r.text
        seen = tg_srv.wait_events(1)
        assert seen[0]["content"]["attachments"][0]["url"] == mxc, seen
    finally:
        tg_srv.close()


def test_a_slow_homeserver_does_not_hold_up_the_shutdown(make_daemon, db_url, hs, media, pg):
    """A peer's fetch that the homeserver takes long to answer is cut off
    once the HTTP front has drained (server.drain_timeout_ms): SIGTERM still
    ends the daemon in bounded time, and the peer is answered 503."""
    port = free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    d = make_daemon(db_url, options={"server": {"port": str(port), "drain_timeout_ms": "1000"},
                                     "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN,
                                                "hs_token": HS_TOKEN}}).start()
    a, srv = add_peer(d, "gk", "wa.example")
    try:
        room, mx_room = matrix_dm(d, hs, a, pg, db_url)
        mxc = hs.upload(ALICE_MX, b"x" * 1000, "application/pdf", "a.pdf")
        ev = {"event_id": "$pdf", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
              "origin_server_ts": 1700000000000,
              "content": {"msgtype": "m.file", "body": "a.pdf", "url": mxc, "info": {"size": 1000}}}
        assert as_put(d, "s1", {"events": [ev]}).status_code == 200
        got = wait_until(lambda: next((e for e in srv.events if e.get("content", {}).get("attachments")), None),
                         what="the file at the peer")
        hs.media_latency = 30
        out = {}
        t = threading.Thread(target=lambda: out.update(r=a.call("GET", got["content"]["attachments"][0]["url"][
            len(d.url):])))
        t.start()
        wait_until(lambda: hs.downloads_started > 0, what="the fetch")
        time.sleep(0.3)
        d.signal(signal.SIGTERM)
        assert d.wait_exit(15) == 0
        # on the daemon's clock (its "stopped" record), not the test's from
        # the signal to the exit, which counted the sanitizers' exit too
        took = stopped_in(d)
        t.join(15)
        assert took < 6, took  # drain (1 s) and the cut, not the homeserver's 30 s
        assert out["r"].status_code == 503 and out["r"].json()["code"] == "unavailable", out
    finally:
        srv.close()


class ThreadWatch:
    """Looks at the threads of process pid, as often as it can, until
    stop(): looks, [(time.time() at the look's start, the names of the
    threads alive then)], a thread that has begun its exit not counted
    (harness.thread_names)."""

    def __init__(self, pid):
        self.pid, self.looks, self.done = pid, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.is_set():
            at = time.time()
            try:
                self.looks.append((at, thread_names(self.pid)))
            except OSError:
                return  # the process is gone
            time.sleep(0.005)

    def stop(self):
        self.done.set()
        self.thread.join(5)


def test_a_stop_while_a_file_is_uploaded_to_a_slow_homeserver_is_at_once(make_daemon, db_url, hs, media):
    """A peer's file is being uploaded to the homeserver, which takes 10 s
    to answer, when SIGTERM comes: the media worker's upload ends with the
    stop (its transfer looks at the stop at least once a second), the
    process exits at once, and the worker has ended before "stopped" is
    said, the last thing before the exit (the sanitizers' leak check off
    here, as in test_daemon.py::test_the_process_exits_at_once_after_stopped).
    Until the fiftieth session's review the media workers were stopped
    only after "stopped": an upload in flight kept the process alive past
    it, up to a second, outside shutdown_ms.  Since the fifty-eighth
    session the workers' end is looked at in the process's threads, not
    the exit's time on the test's clock (see below)."""
    env = {"ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0"}
    port = free_port()
    hs.registration["url"] = f"http://127.0.0.1:{port}"
    d = make_daemon(db_url, env=env,
                    options={"server": {"port": str(port), "ca_file": media.cert_file, "media_max_bytes": str(MAX),
                                        "media_private_addresses": "true"},
                             "matrix": {"homeserver_url": hs.url, "as_token": AS_TOKEN, "hs_token": HS_TOKEN}}).start()
    a, srv = add_peer(d, "gk", "wa.localhost")
    try:
        consent_alice(d, subject="mimi://wa.localhost/u/wally")
        hs.create_user("alice")
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        cat = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
        url = media.put("/f/cat.png", "image/png", cat, host="media.wa.localhost")
        hs.upload_latency = 10
        send_file(a, room, "a cat", attachment(url, cat), "f1")
        wait_until(lambda: hs.uploads_started > 0, what="the upload")
        time.sleep(0.3)
        watch = ThreadWatch(d.proc.pid)
        d.signal(signal.SIGTERM)
        assert d.wait_exit(30) == 0, d.log()[-3000:]
        exited = time.time()
        watch.stop()
        stopped = d.wait_for(lambda r: r.get("msg") == "stopped")
    finally:
        hs.upload_latency = 0
        srv.close()
    # not the homeserver's 10 s, nor the upload's 30 s timeout: on the
    # daemon's clock (the test's from the signal to the exit counted the
    # sanitizers' exit and its own wait for a processor too)
    assert float(stopped["shutdown_ms"]) < 3500, stopped
    # The workers ended before "stopped": none of their threads is alive
    # in a look at the process begun after that record's time (its ts
    # cut to the millisecond, hence the 2 ms), whatever the load; a worker
    # still in its upload was seen so (the fifty-eighth session, with
    # mx_media_stop left to matrix_free: 116 and 129 looks, to 0.79 s after it).
    # Until then the bound was the exit within 300 ms of "stopped" on the
    # test's clock, its own wait for a processor and the sanitizers' exit
    # counted (the exit stays checked below, widened for that reason).
    after = logged_at(stopped) + 0.002
    late = [(round(at - after, 3), names) for at, names in watch.looks if at > after and "cw-mx-media" in names]
    assert not late, f"a media worker was alive after \"stopped\": {late[:3]} ({len(late)} looks, to {late[-1][0]} s)"
    assert exited - logged_at(stopped) < 3, (exited - logged_at(stopped), stopped)
    assert not any(r.get("msg", "").startswith("the stop took too long") for r in d.records)
    assert ghost_messages_now(hs) == []  # the message waited for its file: it goes at the next start


def test_several_files_go_as_several_events_in_order_and_once(mx, hs, gk, media):
    """A Matrix event holds one file: the files before the last go first,
    each as an event of its own, and the row's event carries the last one
    with the text as its caption. A row retried after some of them went
    (the homeserver having forgotten its txnIds meanwhile) sends none
    twice."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    cat, dog = os.urandom(1500), os.urandom(1700)
    atts = [attachment(media.put("/f/cat.png", "image/png", cat), cat),
            attachment(media.url + "/f/gone.png", cat, name="gone.png"),
            attachment(media.put("/f/dog.png", "image/png", dog), dog, name="dog.png")]
    media.status["/f/dog.png"] = 503  # the last file's store is away at first
    refused = []

    def refuse(path):  # then the row's own event fails once, after the other two went
        if re.search(r"/send/m\.room\.message/cw-\d+$", path) and not refused:
            refused.append(path)
            hs.forget_txn_ids()
            return True
        return False
    hs.refuse_send = refuse
    r = a.call("POST", f"/v1/rooms/{room}/messages",
               {"type": "message", "sender": a.user("wally"),
                "content": {"parts": [{"type": "text/plain", "body": "album"}], "attachments": atts}}, idem="al")
    assert r.status_code == 202, r.text
    # a second try of the file: the row's first attempt is over (session 35: a fixed 0.3 s was)
    wait_until(lambda: [p for p, _ in media.requests].count("/f/dog.png") >= 2, what="a retry")
    assert not ghost_messages_now(hs)  # nothing went while a file could not be fetched
    del media.status["/f/dog.png"]
    wait_until(lambda: refused, what="the refused send")
    ghost_messages(hs, 3)
    # nothing more comes: the room's next message follows the row's last try (a fixed 1 s was, session 35)
    assert a.send(room, a.user("wally"), "after the album").status_code == 202
    ms = ghost_messages(hs, 4)
    assert [m["content"]["body"] for m in ms[3:]] == ["after the album"], [m["content"] for m in ms]
    ms = ms[:3]
    first, second, last = (m["content"] for m in ms)
    assert first["msgtype"] == "m.image" and hs.media(first["url"])["data"] == cat and first["body"] == "cat.png"
    assert first["org.causeway.part"] == 0
    assert second["msgtype"] == "m.text" and "gone.png" in second["body"] and "not carried" in second["body"]
    assert last["msgtype"] == "m.image" and hs.media(last["url"])["data"] == dog and last["body"] == "album"
    assert "org.causeway.part" not in last and last["filename"] == "dog.png"


def test_several_files_go_once_when_the_rows_event_is_rate_limited(mx, hs, gk, media, pg, db_url):
    """The row's own event, after its first file went as an event of its
    own, is answered 429 M_LIMIT_EXCEEDED, and the homeserver forgets its
    txnIds meanwhile (as after a restart): the row's next try, which a 429
    does not count (outbox.attempts stays 1), looks for the file's event
    before it sends it again, as after any other failure, and the room
    shows the file once.  Until the fifty-second session only a try
    counted past the first (attempts > 1) looked: the file went twice."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    cat, dog = os.urandom(1500), os.urandom(1700)
    atts = [attachment(media.put("/f/cat.png", "image/png", cat), cat),
            attachment(media.put("/f/dog.png", "image/png", dog), dog, name="dog.png")]
    hs.refuse_retry_after_ms = 200
    limited = []

    def refuse(method, path, user):
        if method == "PUT" and re.search(r"/send/m\.room\.message/cw-\d+$", path) and not limited:
            limited.append(path)
            hs.forget_txn_ids()
            return 429
        return False
    hs.refuse = refuse
    r = a.call("POST", f"/v1/rooms/{room}/messages",
               {"type": "message", "sender": a.user("wally"),
                "content": {"parts": [{"type": "text/plain", "body": "pair"}], "attachments": atts}}, idem="pair")
    assert r.status_code == 202, r.text
    wait_until(lambda: limited, what="the rate-limited send")
    ghost_messages(hs, 2)
    assert a.send(room, a.user("wally"), "after the pair").status_code == 202
    ms = ghost_messages(hs, 3)
    assert [m["content"]["body"] for m in ms] == ["cat.png", "pair", "after the pair"], [m["content"] for m in ms]
    assert hs.media(ms[0]["content"]["url"])["data"] == cat and hs.media(ms[1]["content"]["url"])["data"] == dog
    row = (f"SELECT o.state || ' ' || o.attempts FROM outbox o JOIN events e ON e.id = o.event_id "
           f"WHERE e.public_id = '{r.json()['id']}' AND o.destination = 'matrix'")
    assert pg.psql(row, db_url) == "delivered 1", pg.psql(row, db_url)  # the 429 was not counted


def test_a_delete_of_a_message_with_several_files_takes_every_file_away(mx, hs, gk, media, pg, db_url):
    """wally sends two files and a caption, the first as an event of its
    own (a Matrix event holds one file), then deletes the message: the
    ghost redacts both events, the file before the last too, once each,
    also when the delete is tried again.  Until the forty-sixth session
    only the row's own event (the last file) was redacted, and the first
    file stayed in the room after the sender took the message back."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    cat, dog = os.urandom(1500), os.urandom(1700)
    atts = [attachment(media.put("/f/cat.png", "image/png", cat), cat),
            attachment(media.put("/f/dog.png", "image/png", dog), dog, name="dog.png")]
    r = a.call("POST", f"/v1/rooms/{room}/messages",
               {"type": "message", "sender": a.user("wally"),
                "content": {"parts": [{"type": "text/plain", "body": "two"}], "attachments": atts}}, idem="two")
    assert r.status_code == 202, r.text
    first, last = ghost_messages(hs, 2)
    mx_room = first["room_id"]
    failed = []

    def refuse(method, path, user):  # the delete's own redaction fails once, after the first file's went
        if method == "PUT" and re.search(r"/redact/.*/cw-\d+$", path) and not failed:
            failed.append(path)
            return True
        return False
    hs.refuse = refuse
    d = a.call("POST", f"/v1/rooms/{room}/messages", {"type": "delete", "sender": a.user("wally"),
                                                      "content": {"replaces": r.json()["id"]}}, idem="two-del")
    assert d.status_code == 202, d.text

    def redactions():
        return [e for e in hs.events(mx_room) if e["type"] == "m.room.redaction"]
    wait_until(lambda: len(redactions()) >= 2 and failed, what="both files redacted")
    wait_until(lambda: pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                               f"WHERE e.public_id = '{d.json()['id']}'", db_url) == "delivered", what="the delete")
    reds = redactions()
    assert sorted(e.get("redacts", e["content"].get("redacts")) for e in reds) == \
        sorted([first["event_id"], last["event_id"]]), reds
    assert all(e["sender"] == GHOST for e in reds)
    assert hs.event(first["event_id"])["content"] == {} and hs.event(last["event_id"])["content"] == {}


def test_a_pull_peer_is_offered_the_file_too(mx, hs, pg, db_url):
    """The same offer when the peer pulls (GET /v1/events), for that peer."""
    a = PeerClient(mx.url, "gk", "wa.example")
    r = mx.admin("POST", "/peers", json={"name": "gk", "domain": "wa.example", "mode": "pull",
                                        "public_key": a.signer.public_b64})
    assert r.status_code == 201, r.text
    a.token = r.json()["token"]
    room, mx_room = matrix_dm(mx, hs, a, pg, db_url)
    doc = os.urandom(800)
    mxc = hs.upload(ALICE_MX, doc, "application/pdf", "a.pdf")
    ev = {"event_id": "$pdf1", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.message",
          "origin_server_ts": 1700000000000,
          "content": {"msgtype": "m.file", "body": "a.pdf", "url": mxc,
                      "info": {"mimetype": "application/pdf", "size": len(doc)}}}
    assert as_put(mx, "p1", {"events": [ev]}).status_code == 200

    def pulled():
        evs = a.call("GET", "/v1/events?after=0").json()["events"]
        return next((e for e in evs if e.get("content", {}).get("attachments")), None)
    got = wait_until(pulled, what="the file in the pull stream")
    [att] = got["content"]["attachments"]
    assert att["url"].startswith(mx.url + "/v1/media/m1.") and att["filename"] == "a.pdf", att
    r = a.call("GET", att["url"][len(mx.url):])
    assert r.status_code == 200 and r.content == doc and r.headers["Content-Type"] == "application/pdf"


def test_a_ghost_wears_its_users_profile(mx, hs, gk, media, pg, db_url):
    """POST /v1/profiles: the peer says its user's name and avatar; the
    ghost gets them (the avatar re-hosted) with its next delivery, the
    network named; a change comes the same way, the same profile again
    changes nothing; bad profiles are refused and store nothing."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    face = b"\x89PNG\r\n\x1a\n" + os.urandom(900)
    url = media.put("/u/wally.png", "image/png", face)
    avatar = {"content_type": "image/png", "url": url, "size": len(face), "sha256": hashlib.sha256(face).hexdigest()}
    r = a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": "Wally Wonka", "avatar": avatar})
    assert r.status_code == 200, r.text
    assert r.json() == {"user": a.user("wally"), "display_name": "Wally Wonka", "avatar": avatar}
    a.send(room, a.user("wally"), "hi")
    ghost_messages(hs, 1)
    wait_until(lambda: (hs.profile(GHOST) or {}).get("avatar_url"), what="the avatar")
    p = hs.profile(GHOST)
    assert p["displayname"] == "Wally Wonka (gk)" and hs.media(p["avatar_url"])["data"] == face, p
    # A new name: with the next message; the same profile again: nothing to do.
    a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": "Walter"})
    a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": "Walter"})
    a.send(room, a.user("wally"), "again")
    ghost_messages(hs, 2)
    wait_until(lambda: hs.profile(GHOST)["displayname"] == "Walter (gk)", what="the new name")
    a.send(room, a.user("wally"), "and again")
    ghost_messages(hs, 3)
    puts = [q for q in hs.requests if q["method"] == "PUT" and "/profile/" in q["path"]]
    assert len([q for q in puts if q["path"].endswith("/displayname")]) == 3, puts  # register, first sync, change
    assert len(media.requests) == 1  # the avatar fetched once
    # Removing the avatar.
    a.call("POST", "/v1/profiles", {"user": a.user("wally"), "avatar": None})
    a.send(room, a.user("wally"), "no face")
    wait_until(lambda: not hs.profile(GHOST).get("avatar_url"), what="the avatar removed")
    # Bad profiles: refused, nothing stored.
    before = pg.psql("SELECT display_name || ' ' || coalesce(avatar::text, '-') || ' ' || profile_changed_at "
                     "FROM identities WHERE uri = 'mimi://wa.example/u/wally'", db_url)
    for body, status in [({"user": "mimi://tg.example/u/x", "display_name": "x"}, 403),
                         ({"user": a.user("wally")}, 400),
                         ({"user": a.user("wally"), "display_name": ""}, 400),
                         ({"user": a.user("wally"), "display_name": "x" * 257}, 400),
                         ({"user": a.user("wally"), "display_name": "a\nb"}, 400),
                         ({"user": a.user("wally"), "display_name": 5}, 400),
                         ({"user": a.user("wally"), "nick": "w"}, 400),
                         ({"user": a.user("wally"), "avatar": dict(avatar, content_type="text/html")}, 400),
                         ({"user": a.user("wally"), "avatar": dict(avatar, url="mxc://a/b")}, 400),
                         ({"user": a.user("wally"), "avatar": {"url": url}}, 400),
                         ({"user": a.user("wally"), "avatar": "x"}, 400),
                         ({"user": "alice", "display_name": "x"}, 400)]:
        r = a.call("POST", "/v1/profiles", body)
        assert r.status_code == status, (body, r.text)
    after = pg.psql("SELECT display_name || ' ' || coalesce(avatar::text, '-') || ' ' || profile_changed_at "
                    "FROM identities WHERE uri = 'mimi://wa.example/u/wally'", db_url)
    assert after == before
    assert pg.psql("SELECT count(*) FROM identities WHERE uri LIKE 'mimi://tg.example/%'", db_url) == "0"


def test_an_avatar_store_that_fails_is_not_asked_with_every_message(mx, hs, gk, media):
    """A ghost's profile that could not be set (its avatar's store answers
    503) is tried again later, not with each message of the sender: the
    messages go on at once, the store is asked once."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    face = os.urandom(500)
    url = media.put("/u/face.png", "image/png", face)
    media.status["/u/face.png"] = 503
    r = a.call("POST", "/v1/profiles", {"user": a.user("wally"), "display_name": "Wally",
                                        "avatar": {"content_type": "image/png", "url": url, "size": len(face)}})
    assert r.status_code == 200, r.text
    for i in range(3):
        a.send(room, a.user("wally"), f"m{i}")
        ghost_messages(hs, i + 1)
    assert [p for p, _ in media.requests] == ["/u/face.png"]
    assert hs.profile(GHOST)["displayname"] == "Wally (gk)" and not hs.profile(GHOST).get("avatar_url")


def test_a_slow_file_holds_only_its_own_room(mx, hs, gk, media):
    """Files are fetched and uploaded by the adapter's media worker, off
    the delivery lane: while wally's file takes 9 s to come (under the
    fetch's 10 s low-speed cut), ed's messages to alice go on; wally's
    next message still comes after his file.  (With 5 s, ed's message,
    which crosses the daemon, the database and the homeserver, had 4 s
    on a loaded machine: session 35.)"""
    a, _ = gk
    consent_alice(mx)
    consent_alice(mx, subject="mimi://wa.example/u/ed")
    hs.create_user("alice")
    room_w = a.create_room([a.user("wally"), ALICE]).json()["id"]
    room_e = a.create_room([a.user("ed"), ALICE]).json()["id"]
    big = os.urandom(4000)
    media.delay["/f/slow.png"] = 9
    send_file(a, room_w, "slow", attachment(media.put("/f/slow.png", "image/png", big), big), "s1")
    a.send(room_w, a.user("wally"), "after the file")
    quick = a.send(room_e, a.user("ed"), "quick one")
    ed = "@_cw_gk_ed:example.org"

    def bodies(sender):
        return [e["content"]["body"] for rid in hs.rooms() for e in hs.events(rid)
                if e["type"] == "m.room.message" and e["sender"] == sender]
    wait_until(lambda: bodies(ed) == ["quick one"], what="ed's message")
    assert bodies(GHOST) == [], bodies(GHOST)  # not behind wally's file
    # nor behind its 9 s: from ed's message taken (the daemon's access log)
    # to its send at the homeserver (its thread's clock), not the test's
    # around the sends and its polls of the rooms
    took = sent_at(hs, ed) - answered_at(mx, quick)
    assert took < 8, took
    wait_until(lambda: len(bodies(GHOST)) == 2, timeout=20, what="wally's two")
    assert bodies(GHOST) == ["slow", "after the file"]


def test_one_peers_slow_store_does_not_hold_up_another_peers_files(mx, hs, gk, media):
    """The media worker's files wait per sending peer, each peer served in
    turn by a few threads, at most one file of a peer at a time: a peer
    whose store answers slowly (here 3 files of one message, 7 s each,
    under the 10 s low-speed cut) holds its own files, not another peer's
    in another room.  Until the thirty-second session one thread took
    every peer's files one by one from a single queue of up to 1,000, and
    the other peer's file waited for all of them (a review's finding)."""
    a, _ = gk
    consent_alice(mx)
    hs.create_user("alice")
    room_w = a.create_room([a.user("wally"), ALICE]).json()["id"]
    slow = [os.urandom(2000 + i) for i in range(3)]
    atts = []
    for i, data in enumerate(slow):
        media.delay[f"/f/slow{i}.png"] = 7
        atts.append(attachment(media.put(f"/f/slow{i}.png", "image/png", data), data, name=f"slow{i}.png"))
    r = a.call("POST", f"/v1/rooms/{room_w}/messages", {"type": "message", "sender": a.user("wally"),
                                                        "content": {"attachments": atts}}, idem="slow1")
    assert r.status_code == 202, r.text
    wait_until(lambda: "/f/slow0.png" in [p for p, _ in media.requests], what="the first slow fetch")
    b, srv = add_peer(mx, "tg", "tg.example")
    try:
        assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:tg", "opted_in": True}).ok
        assert mx.admin("POST", "/consents", json={"user": ALICE, "subject_kind": "user",
                                                   "subject": b.user("ed"), "state": "allowed"}).ok
        room_e = b.create_room([b.user("ed"), ALICE]).json()["id"]
        quick = os.urandom(1500)
        send = b.call("POST", f"/v1/rooms/{room_e}/messages", {
            "type": "message", "sender": b.user("ed"),
            "content": {"attachments": [attachment(media.put("/f/quick.png", "image/png", quick), quick)]}},
            idem="q1")
        assert send.status_code == 202, send.text
        ed = "@_cw_tg_ed:example.org"
        [m] = wait_until(lambda: [e for rid in hs.rooms() for e in hs.events(rid)
                                  if e["type"] == "m.room.message" and e["sender"] == ed] or None,
                         timeout=60, what="tg's file")
        # from the file taken (the daemon's access log) to its send at the
        # homeserver (its thread's clock): the test's around the call and
        # its polls of the rooms counted its own turns too
        took = sent_at(hs, ed) - answered_at(mx, send)
        assert m["content"]["msgtype"] == "m.image" and hs.media(m["content"]["url"])["data"] == quick
    finally:
        srv.close()
    # behind gk's three files it would wait some 20 s; 5 s was too little for a file to cross the
    # daemon, the database, the store and the homeserver on a loaded machine (session 35)
    assert took < 10, f"another peer's quick file waited {took:.1f} s behind gk's slow store"
    # gk's own files still come, in order.
    ms = wait_until(lambda: (lambda ms: ms if len(ms) >= 3 else None)(ghost_messages_now(hs)), timeout=40,
                    what="gk's three files")
    assert [hs.media(m["content"]["url"])["data"] for m in ms] == slow
