"""Review rM (session 32) probes: media and attachments.  Each test states
what the docs or spec promise and fails on BASE_REV where the daemon does
otherwise."""
import hashlib
import os

import requests

from harness import wait_until
from peer import MediaServer
from prosody import XmppClient  # noqa: F401
from test_xmpp import (ALICE, MUC, MUC_USER, alice, body, consent_alice, prosody, q,  # noqa: F401
                       start_with_gk)

DOMAIN = "wa.localhost"
UPLOAD = "upload.localhost"  # alice's XMPP server's XEP-0363 upload service


# ---------------------------------------------------------------- Matrix
from test_matrix import ALICE as MX_ALICE  # noqa: E402
from test_matrix import consent_alice as mx_consent_alice  # noqa: E402
from test_matrix_media import attachment, ghost_messages, gk, hs, media, mx, send_file  # noqa: E402,F401


def test_a_files_earlier_refusal_is_not_the_answer_for_a_later_correct_attachment(mx, hs, gk, media):
    """The media worker remembers a file it could not carry by (signer,
    URL) alone (mx_media.c state_key), and mx_media_ask answers that
    memo's notice without fetching again.  The refusal was about the
    attachment (its declared sha256 or size), not the URL: a later message
    naming the same URL with the right sha256 and size must be carried
    (docs/matrix.md "Media": "a file that cannot be carried" is one whose
    bytes do not match what its attachment declares)."""
    a, _ = gk
    mx_consent_alice(mx)
    hs.create_user("alice")
    room = a.create_room([a.user("wally"), MX_ALICE]).json()["id"]
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
    url = media.put("/f/cat.png", "image/png", data)
    send_file(a, room, "first try", attachment(url, data, sha="0" * 64), "m1")
    [m] = ghost_messages(hs, 1)
    assert "not carried: it does not match its checksum" in m["content"]["body"], m["content"]
    fetched = [p for p, _ in media.requests].count("/f/cat.png")
    send_file(a, room, "second try", attachment(url, data), "m2")  # the right sha256 now
    ms = ghost_messages(hs, 2)
    print("second message:", ms[1]["content"])
    print("fetches of the file:", fetched, "->", [p for p, _ in media.requests].count("/f/cat.png"))
    assert ms[1]["content"]["msgtype"] == "m.image", ms[1]["content"]


from test_matrix import ALICE_MX, as_put  # noqa: E402
from test_matrix_media import matrix_dm  # noqa: E402


def test_a_deleted_messages_file_is_no_longer_served_to_the_peer(mx, hs, gk, pg, db_url):
    """A Matrix user's file reaches the peer as /v1/media/{token}: the
    token is the mxc:// source under an HMAC for that peer, with no expiry
    and no tie to the message (media.c media_token_make).  When alice
    deletes (redacts) her message the peer is sent a delete, but the token
    keeps serving the file, for ever (homeservers keep a redacted event's
    media): a photo sent by mistake and taken back stays fetchable through
    the gateway."""
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
    path = got["content"]["attachments"][0]["url"][len(mx.url):]
    red = {"event_id": "$red1", "room_id": mx_room, "sender": ALICE_MX, "type": "m.room.redaction",
           "origin_server_ts": 1700000001000, "redacts": "$photo1", "content": {"redacts": "$photo1"}}
    assert as_put(mx, "m2", {"events": [red]}).status_code == 200
    wait_until(lambda: next((e for e in srv.events if e.get("type") == "delete"), None),
               what="the delete at the peer")
    r = a.call("GET", path)
    print("after the delete, the peer's GET", path[:40], "...:", r.status_code, len(r.content), "bytes")
    assert r.status_code == 404, (r.status_code, r.text[:100])


import time  # noqa: E402

from test_matrix_media import add_peer  # noqa: E402


def test_one_peers_slow_store_does_not_hold_up_another_peers_files(mx, hs, gk, media):
    """docs/matrix.md "Media": the media worker is "a thread of its own, so
    that a slow file holds only its own room".  It is one thread for every
    peer, taking files one by one (mx_media.c media_main, a FIFO queue of
    up to 1,000): a peer whose store answers slowly (here 3 files of one
    message, 7 s each, under the 10 s low-speed cut) makes another peer's
    file, in another room, wait for all of them."""
    a, _ = gk
    mx_consent_alice(mx)
    hs.create_user("alice")
    room_w = a.create_room([a.user("wally"), MX_ALICE]).json()["id"]
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
        assert mx.admin("POST", "/optins", json={"user": MX_ALICE, "network": "peer:tg", "opted_in": True}).ok
        assert mx.admin("POST", "/consents", json={"user": MX_ALICE, "subject_kind": "user",
                                                   "subject": b.user("ed"), "state": "allowed"}).ok
        room_e = b.create_room([b.user("ed"), MX_ALICE]).json()["id"]
        quick = os.urandom(1500)
        t0 = time.time()
        r = b.call("POST", f"/v1/rooms/{room_e}/messages", {
            "type": "message", "sender": b.user("ed"),
            "content": {"attachments": [attachment(media.put("/f/quick.png", "image/png", quick), quick)]}},
            idem="q1")
        assert r.status_code == 202, r.text
        ed = "@_cw_tg_ed:example.org"
        wait_until(lambda: [e for rid in hs.rooms() for e in hs.events(rid)
                            if e["type"] == "m.room.message" and e["sender"] == ed] or None,
                   timeout=60, what="tg's file")
        took = time.time() - t0
    finally:
        srv.close()
    print(f"tg's quick file reached alice after {took:.1f} s")
    assert took < 5, f"another peer's quick file waited {took:.1f} s behind gk's slow store"
