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
