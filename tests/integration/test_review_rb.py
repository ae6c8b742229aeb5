"""Review probes (rB, session 32): the Matrix bot's notices."""
import time

from harness import wait_until
from test_matrix import alice_and_the_bot, limited_gateway, rate_limited_homeserver


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
