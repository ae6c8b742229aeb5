"""A Matrix user's own outbound limits (test_policy_outbound.py has the
XMPP side): past outbound_messages_per_minute_per_user her message is
refused (nothing of it stored, audited once) and she is told in the room,
by the ghost, with a notice; the homeserver's transaction is answered as
any (it needs no more)."""
import time

from harness import wait_until
from test_matrix import ALICE, alice_writes_to_wally
from test_matrix import gk, hs, mx  # noqa: F401  (the fixtures)
from test_policy_outbound import limit_records


def test_a_matrix_users_messages_past_her_outbound_limit_are_refused_and_told(mx, hs, gk, pg, db_url):
    a, srv = gk
    r = mx.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                        "limits": {"outbound_messages_per_minute_per_user": 2}})
    assert r.status_code == 201, r.text
    rule = r.json()["id"]
    alice, room, ghost = alice_writes_to_wally(hs, a)

    def notices():
        return [e["content"]["body"] for e in hs.events(room)
                if e["sender"] == ghost and e["content"].get("msgtype") == "m.notice"]

    def texts():
        return [e["content"]["parts"][0]["body"] for e in list(srv.events) if e.get("type") == "message"]

    for i in range(2):
        alice.send_text(room, f"spam {i}")
        wait_until(lambda: len(texts()) == i + 1, what=f"message {i} at the peer")
    alice.send_text(room, "spam 2")
    wait_until(lambda: notices(), what="the notice")
    assert notices() == ["Not delivered: too many messages; write again in a moment."], notices()
    time.sleep(0.3)
    assert texts() == ["spam 0", "spam 1"]
    assert pg.psql("SELECT count(*) FROM events WHERE origin_network = 'matrix' AND type = 'message'",
                   db_url) == "2"
    assert limit_records(pg, db_url) == \
        f"rate_limited_local_sender {rule} {ALICE} outbound message true true"
