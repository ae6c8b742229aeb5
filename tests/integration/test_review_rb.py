"""Review probes (rB, session 32): the Matrix bot's notices."""
import time

from harness import wait_until
from test_matrix import alice_and_the_bot, gk, hs, limited_gateway, mx, rate_limited_homeserver  # noqa: F401 (fixtures)


def test_one_limited_ghost_does_not_hold_up_the_bots_notices(make_daemon, db_url, pg):
    """A Matrix 429 is one sender's limit (Synapse's rc_message is a bucket
    per user; the stand-in's too, and the dispatcher says so: "a Matrix
    429 is one ghost's limit, not the homeserver's"). The notices of a
    ghost its homeserver limits must not hold up the bot's notice to
    another user, which the homeserver would take at once."""
    hs, srv = rate_limited_homeserver()
    try:
        d, a = limited_gateway(make_daemon, db_url, hs, srv, None)
        alice, mgmt, said = alice_and_the_bot(hs)
        bot = "@_cw_bot:example.org"
        ghost = "@_cw_gk_wally:example.org"
        with hs._lock:  # the ghost registered, as the daemon registers its ghosts
            hs._users[ghost] = {"displayname": "wally"}
        hs.rc_message = (0.2, 1)  # one event in 5 s for each sender
        time.sleep(5.5)  # the bot's bucket full again after its help
        # ten notices of one ghost (older rows), then one of the bot's to alice
        rows = ", ".join(f"('{mgmt}', 'ghost word {k}', '{ghost}', 'cwprobe-g{k}')"
                         for k in range(10))
        pg.psql("INSERT INTO matrix_notices (room_id, body, sender, txn_id) VALUES " + rows +
                f", ('{mgmt}', 'the bot to alice', '{bot}', 'cwprobe-bot'); NOTIFY causeway_matrix_bot", db_url)
        t0 = time.monotonic()
        wait_until(lambda: "the bot to alice" in said(), timeout=120, what="the bot's notice")
        took = time.monotonic() - t0
        ghost429 = [q for q in hs.requests if q["user"] == ghost and q["status"] == 429]
        bot429 = [q for q in hs.requests if q["user"] == bot and q["status"] == 429]
        print(f"the bot's notice took {took:.1f} s; ghost 429s {len(ghost429)}, bot 429s {len(bot429)}")
        assert ghost429, "the ghost was never limited: the probe shows nothing"
        assert not bot429, bot429
        assert took < 8, f"the bot's notice to alice waited {took:.1f} s behind a limited ghost's"
    finally:
        srv.close()
        hs.close()


def test_an_expiry_not_told_is_not_told_days_later_by_a_restart(mx, hs, gk, pg, db_url):
    """A consent request's expiry the bot did not tell when it happened
    (here: alice had no management room then) is passed for good once its
    record is a minute old: told by neither process. A restart (or another
    process taking the bot's lock) looks six days back and tells it then,
    late, after alice has accepted the sender since: "expired without an
    answer ... if they write again, you will be asked again"."""
    from test_matrix import ALICE
    a, srv = gk
    assert mx.admin("POST", "/optins", json={"user": ALICE, "network": "peer:gk", "opted_in": True}).ok
    alice, mgmt, said = alice_and_the_bot(hs)
    room = a.create_room([a.user("wally"), ALICE]).json()["id"]
    assert a.send(room, a.user("wally"), "may I?").status_code == 202
    wait_until(lambda: any("wants to write to you" in n for n in said()), what="the request shown")
    alice.leave(mgmt)
    wait_until(lambda: pg.psql("SELECT count(*) FROM matrix_mgmt_rooms", db_url) == "0", what="no management room")
    pg.psql("UPDATE outbox o SET created_at = now() - interval '8 days' FROM events e JOIN identities s "
            "ON s.id = e.sender_id WHERE e.id = o.event_id AND s.localpart = 'wally'; "
            "UPDATE consent_requests q SET created_at = now() - interval '8 days', "
            "expires_at = now() - interval '1 s' FROM identities i "
            "WHERE i.id = q.remote_identity_id AND i.localpart = 'wally'", db_url)
    wait_until(lambda: pg.psql("SELECT count(*) FROM audit_log WHERE action = 'consent.expire'", db_url) == "1",
               timeout=30, what="the expiry")
    time.sleep(65)  # the bot's cursor passes the record
    bot = "@_cw_bot:example.org"
    mgmt2 = alice.create_dm(bot)
    said2 = lambda: [e["content"]["body"] for e in hs.events(mgmt2)  # noqa: E731
                     if e["type"] == "m.room.message" and e["sender"] == bot]
    wait_until(lambda: any("Commands" in n for n in said2()), what="the bot's help")
    alice.send_text(mgmt2, "accept mimi://wa.example/u/wally")
    wait_until(lambda: any("Accepted" in n for n in said2()), what="the accept")
    time.sleep(2)
    before = [n for n in said2() if "expired" in n]
    mx.stop()
    mx.start()
    alice.send_text(mgmt2, "list")
    wait_until(lambda: len([n for n in said2() if "request" in n.lower() or "Nothing" in n]) >= 1, what="list")
    time.sleep(3)
    after = [n for n in said2() if "expired" in n]
    print("before the restart:", before, "after:", after)
    assert after == before, f"told only after a restart, after alice accepted wally: {after}"
