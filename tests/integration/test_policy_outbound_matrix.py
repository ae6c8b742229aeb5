"""A Matrix user's own outbound limits (test_policy_outbound.py has the
XMPP side): past outbound_messages_per_minute_per_user her message is
refused (nothing of it stored, audited once) and she is told in the room,
by the ghost, with a notice naming the limit and the wait, once until the
wait is over however many more she sends meanwhile (matrix.c,
limit_notice_due); the homeserver's transaction is answered as any (it
needs no more)."""
import re
import time

import psycopg
import pytest

from harness import wait_until
from test_matrix import ALICE, alice_writes_to_wally, metrics
from test_matrix import gk, hs, mx  # noqa: F401  (the fixtures)
from test_policy_outbound import (BLOCKED_TEXT, CLOSED_TEXT, WAITING, close_wa, denials, dropped_by_his_block,
                                  limit_records, peer_blocks_alice, stored_lines, told_marks, waiting_tried)

TOO_MANY = re.compile(r"Not delivered: you sent more messages than this server allows in a minute; "
                      r"write again in (\d+) s\.")


def limited_room(mx, hs, gk, per_minute, scope="domain", pattern="wa.example"):
    """alice's direct room with wally under a rule (of wally's domain
    unless scope and pattern say) of per_minute messages: (alice, the
    room, the rule's id, her notices there, the texts at the peer, how
    many of her events were refused)."""
    a, srv = gk
    r = mx.admin("POST", "/rules", json={"scope": scope, "pattern": pattern,
                                        "limits": {"outbound_messages_per_minute_per_user": per_minute}})
    assert r.status_code == 201, r.text
    alice, room, ghost = alice_writes_to_wally(hs, a)

    def notices():
        return [e["content"]["body"] for e in hs.events(room)
                if e["sender"] == ghost and e["content"].get("msgtype") == "m.notice"]

    def texts():
        return [e["content"]["parts"][0]["body"] for e in list(srv.events) if e.get("type") == "message"]

    def refused():
        return metrics(mx, "causeway_matrix_events_total").get('result="refused"', 0)

    return alice, room, r.json()["id"], notices, texts, refused


def all_told(pg, db_url, notices, n):
    """Waits for n notices in the room and none left to send, then a moment
    for any more to come (there should be none): the notices."""
    wait_until(lambda: len(notices()) >= n and pg.psql("SELECT count(*) FROM matrix_notices WHERE done_at IS NULL",
                                                        db_url) == "0",
               what=f"{n} notice(s) sent")
    time.sleep(0.5)
    return notices()


def matrix_messages(pg, db_url):
    return pg.psql("SELECT count(*) FROM events WHERE origin_network = 'matrix' AND type = 'message'", db_url)


def test_a_matrix_users_messages_past_her_outbound_limit_are_refused_and_told(mx, hs, gk, pg, db_url):
    """The notice names the limit and the wait (as XMPP's error text does;
    until the twenty-sixth session it said "too many messages; write again
    in a moment")."""
    alice, room, rule, notices, texts, refused = limited_room(mx, hs, gk, 2)
    for i in range(2):
        alice.send_text(room, f"spam {i}")
        wait_until(lambda: len(texts()) == i + 1, what=f"message {i} at the peer")
    alice.send_text(room, "spam 2")
    wait_until(lambda: notices(), what="the notice")
    told = notices()
    assert len(told) == 1 and TOO_MANY.fullmatch(told[0]), told
    assert 0 < int(TOO_MANY.fullmatch(told[0]).group(1)) <= 30, told  # one of 2 a minute comes back in 30 s
    time.sleep(0.3)
    assert texts() == ["spam 0", "spam 1"]
    assert matrix_messages(pg, db_url) == "2"
    assert limit_records(pg, db_url) == \
        f"rate_limited_local_sender {rule} {ALICE} outbound message true true"


def test_a_flood_past_the_limit_is_told_once_until_the_wait_is_over(mx, hs, gk, pg, db_url):
    """Several messages refused in a row make one notice (each would be a
    request to the homeserver: a user flooding got a flood of notices,
    until the twenty-sixth session); once the wait the notice named is
    over, the next refusal is told again."""
    alice, room, _, notices, texts, refused = limited_room(mx, hs, gk, 12)  # one back every 5 s
    for i in range(12):
        alice.send_text(room, f"ok {i}")
    wait_until(lambda: len(texts()) == 12, what="the twelve at the peer")
    base = refused()
    for i in range(3):
        alice.send_text(room, f"spam {i}")
        wait_until(lambda: refused() == base + i + 1, what=f"refusal {i}")
    first_told = time.time()
    told = all_told(pg, db_url, notices, 1)
    assert len(told) == 1 and TOO_MANY.fullmatch(told[0]), told
    wait_s = int(TOO_MANY.fullmatch(told[0]).group(1))
    assert 0 < wait_s <= 5, told
    assert matrix_messages(pg, db_url) == "12"
    # The wait is over (time itself is the condition): one gets through,
    # the next is refused and told again.
    time.sleep(max(0.0, first_told + wait_s + 0.5 - time.time()))
    alice.send_text(room, "after the wait")
    wait_until(lambda: "after the wait" in texts(), what="a message after the wait")
    alice.send_text(room, "spam again")
    wait_until(lambda: refused() == base + 4, what="the next refusal")
    told = all_told(pg, db_url, notices, 2)
    assert len(told) == 2 and all(TOO_MANY.fullmatch(x) for x in told), told


def test_over_her_limit_to_a_closed_domain_she_is_told_to_wait(mx, hs, gk, pg, db_url):
    """As on XMPP (test_policy_outbound.py, the spec's precedence: rate
    limits (3) before a closed server (4), since the twenty-eighth
    session): within her limit a line to a closed domain is refused for
    good, she is told so, and it takes no token; over her limit she is
    told to wait, in the limit's notice, and nothing of it is stored or
    reaches the peer."""
    alice, room, rule, notices, texts, refused = limited_room(mx, hs, gk, 1, scope="network", pattern="peer:gk")
    closed = close_wa(mx)
    # Within her limit: refused for good.
    alice.send_text(room, "one")
    assert all_told(pg, db_url, notices, 1) == [CLOSED_TEXT]
    # It took no token: opened again, her next line goes.
    assert mx.admin("DELETE", f"/rules/{closed}").status_code == 200
    alice.send_text(room, "two")
    wait_until(lambda: texts() == ["two"], what="her line at the peer")
    # Closed again, her bucket now empty: the limit answers, a wait.
    close_wa(mx)
    base = refused()
    alice.send_text(room, "three")
    told = all_told(pg, db_url, notices, 2)
    assert len(told) == 2 and TOO_MANY.fullmatch(told[1]), told
    assert 0 < int(TOO_MANY.fullmatch(told[1]).group(1)) <= 60, told
    wait_until(lambda: refused() == base + 1, what="the refusal counted")
    assert limit_records(pg, db_url) == f"rate_limited_local_sender {rule} {ALICE} outbound message true true"
    assert denials(pg, db_url) == f"server_closed {closed}"
    assert texts() == ["two"]
    # Nothing of "three" is stored; "one", denied, is kept as a deny keeps
    # a message: its row dropped, its content not stored.
    wait_until(lambda: stored_lines(pg, db_url, "matrix") == "dropped -,delivered two", what="her lines as stored")


def test_two_lines_to_someone_new_in_one_transaction_start_one_conversation(mx, hs, gk, pg, db_url):
    """The consent her first line to a new contact writes is not in the
    policy's snapshot when the same transaction's second line is decided:
    the pipeline tells the policy that the request started the
    conversation already. Until a review of the twenty-sixth session the
    second line counted as a second new conversation, refused for an
    hour under a limit of one."""
    a, srv = gk
    r = mx.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                        "limits": {"outbound_new_conversations_per_hour_per_user": 1}})
    assert r.status_code == 201, r.text
    alice, room, ghost = alice_writes_to_wally(hs, a)
    n = len(hs.transactions)
    hs.stop_pushing()  # both lines in one transaction
    alice.send_text(room, "hi wally")
    alice.send_text(room, "are you there?")
    hs.resume_pushing()
    txn = wait_until(lambda: next((t for t in hs.transactions[n:]
                                   if any(e.get("content", {}).get("body") == "hi wally" for e in t["events"])), None),
                     what="the transaction")
    assert [e["content"]["body"] for e in txn["events"] if e.get("type") == "m.room.message"] == \
        ["hi wally", "are you there?"]
    wait_until(lambda: [e["content"]["parts"][0]["body"] for e in list(srv.events) if e.get("type") == "message"]
               == ["hi wally", "are you there?"], what="both lines at the peer")
    assert (limit_records(pg, db_url) or "") == ""
    assert not [e for e in hs.events(room) if e["sender"] == ghost and e["content"].get("msgtype") == "m.notice"]


def test_an_oversized_first_line_from_matrix_takes_no_new_conversation(mx, hs, gk, pg, db_url):
    """As on XMPP (test_policy_outbound.py): a first line to someone new
    that the size limits refuse takes no token of her new-conversation
    bucket, so her next, normal, line to them starts the one conversation
    the hour allows; only a line to a third person is refused by it."""
    a, srv = gk
    r = mx.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                        "limits": {"outbound_new_conversations_per_hour_per_user": 1,
                                                   "max_body_bytes": 100}})
    assert r.status_code == 201, r.text
    rule = r.json()["id"]
    alice, room, ghost = alice_writes_to_wally(hs, a)

    def notices(rm, g):
        return [e["content"]["body"] for e in hs.events(rm)
                if e["sender"] == g and e["content"].get("msgtype") == "m.notice"]

    def texts():
        return [e["content"]["parts"][0]["body"] for e in list(srv.events) if e.get("type") == "message"]

    alice.send_text(room, "x" * 200)
    assert all_told(pg, db_url, lambda: notices(room, ghost), 1) == \
        ["Not delivered: it is larger than this server allows to them."]
    assert denials(pg, db_url) == f"too_large {rule}"
    alice.send_text(room, "hi wally")
    wait_until(lambda: texts() == ["hi wally"], what="her normal line at the peer")
    # That used the hour's one: a first line to wanda is refused by the limit.
    a.create_room([a.user("wanda"), "mimi://example.org/u/someone"])
    wanda = "@_cw_gk_wanda:example.org"
    room2 = alice.create_dm(wanda)
    wait_until(lambda: hs.members(room2).get(wanda) == "join", what="wanda's ghost joins")
    alice.send_text(room2, "hi wanda")
    told = all_told(pg, db_url, lambda: notices(room2, wanda), 1)
    assert len(told) == 1 and told[0].startswith(
        "Not delivered: you started more new conversations than this server allows in an hour"), told
    assert limit_records(pg, db_url) == \
        f"rate_limited_local_sender_new_conversations {rule} {ALICE} outbound message true true"
    assert texts() == ["hi wally"]


def test_a_message_to_someone_who_blocked_her_says_so_on_matrix(mx, hs, gk, pg, db_url):
    """As on XMPP (test_policy_outbound.py): wally's block of her (POST
    /v1/blocks) refuses what she writes to him, and the ghost's notice says
    why, "Not delivered: this person blocked you." (the bot's list says so
    too). Until the thirty-eighth session it was "Not delivered." alone."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    peer_blocks_alice(mx, a, "block")
    alice.send_text(room, "are you there?")

    def notices():
        return [e["content"]["body"] for e in hs.events(room)
                if e["sender"] == ghost and e["content"].get("msgtype") == "m.notice"]
    assert all_told(pg, db_url, notices, 1) == [BLOCKED_TEXT]
    assert stored_lines(pg, db_url, "matrix") == "dropped -"
    peer_blocks_alice(mx, a, "unblock")
    alice.send_text(room, "hello again")
    wait_until(lambda: stored_lines(pg, db_url, "matrix") == "dropped -,delivered hello again",
               what="her second message delivered")
    assert [e["content"]["parts"][0]["body"] for e in list(srv.events) if e.get("type") == "message"] == \
        ["hello again"]
    assert notices() == [BLOCKED_TEXT]


def test_her_waiting_message_dropped_by_his_block_is_told_in_her_room(mx, hs, gk, pg, db_url):
    """Her message still waiting for his peer (down) when wally blocks her
    is dropped (test_policy_outbound.py); the ghost tells her in the room,
    once, as a dead letter is told, in the words of the refusal of what she
    writes after the block, quoting it though its content was erased with
    the drop.  A restart (whose reload walks her rows again) tells nothing
    twice, and a message refused as she writes is told once, by its own
    refusal.  Until the fifty-ninth session the dropped one went without a
    word: she believed it delivered or on its way."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    dropped_by_his_block(mx, gk, lambda text: alice.send_text(room, text), pg, db_url, "matrix")

    def notices():
        return [e["content"]["body"] for e in hs.events(room)
                if e["sender"] == ghost and e["content"].get("msgtype") == "m.notice"]
    told = "Not delivered \u201care you still there, wally?\u201d: this person blocked you."
    assert all_told(pg, db_url, notices, 1) == [told]
    assert told_marks(pg, db_url, "matrix") == "true false"
    assert mx.stop() == 0
    mx.start()
    alice.send_text(room, "hello?")
    assert all_told(pg, db_url, notices, 2) == [told, BLOCKED_TEXT]
    assert told_marks(pg, db_url, "matrix") == "true false,false false"
    srv.fail_next = 0
    time.sleep(1.0)  # past a retry's wait: nothing of hers reaches him
    assert [e["content"]["parts"][0]["body"] for e in list(srv.events) if e.get("type") == "message"] == ["before"]


def ghost_notices(hs, room, ghost):
    return lambda: [e["content"]["body"] for e in hs.events(room)
                    if e["sender"] == ghost and e["content"].get("msgtype") == "m.notice"]


def test_her_dropped_message_that_expires_is_told_without_its_text(mx, hs, gk, pg, db_url):
    """A message of hers that expires (content.expires), dropped by his
    block as it waited, is told without its text: "Not delivered: this
    person blocked you."  Her notice stays in her room for good, past the
    expiry, and the drop erased the content, so nothing would find the
    quote by the expiry to clear it.  Until the sixtieth session the drop
    kept its first 60 characters all the same (Matrix and XMPP write no
    such message: a peer's API does; here the waiting one is given an
    expiry a day off).  Her edit of it, waiting too, alike: an edit
    carries no expiry of its own (the expiry finds it by its message), and
    until a review of the sixtieth session its new text was quoted."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    later = int(time.time() * 1000) + 86400 * 1000
    sent = {}

    def write(text):
        sent[text] = alice.send_text(room, text)

    def expires():
        pg.psql("UPDATE events SET content = jsonb_set(content, '{content,expires}', "
                f"to_jsonb({later}::bigint)) WHERE origin_network = 'matrix' AND type = 'message' "
                f"AND content #>> '{{content,parts,0,body}}' = '{WAITING}'", db_url)
        alice.edit(room, sent[WAITING], "still there?")
        wait_until(lambda: pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id "
                                   "WHERE e.origin_network = 'matrix' AND e.type = 'edit' "
                                   "AND o.state IN ('pending', 'held')", db_url) == "1", what="her edit waiting")
    dropped_by_his_block(mx, gk, write, pg, db_url, "matrix", meanwhile=expires)
    wait_until(lambda: told_marks(pg, db_url, "matrix") == "true false,true false", timeout=20,
               what="her message and her edit dropped and told")
    assert all_told(pg, db_url, ghost_notices(hs, room, ghost), 2) == [BLOCKED_TEXT, BLOCKED_TEXT]


def her_drop_told(mx, hs, gk, pg, db_url):
    """Her waiting message dropped by wally's block and told in her room:
    (her notices, the notice's line), for the two tests after it."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    dropped_by_his_block(mx, gk, lambda text: alice.send_text(room, text), pg, db_url, "matrix")
    notices = ghost_notices(hs, room, ghost)
    told = f"Not delivered \u201c{WAITING}\u201d: this person blocked you."
    assert all_told(pg, db_url, notices, 1) == [told]
    return notices, told


def test_her_message_dropped_for_two_peers_at_once_is_told_once(mx, hs, gk, pg, db_url):
    """One message, one notice: the rows of one message of hers dropped for
    blocks before a look (a group's, one row a peer, each peer's members
    blocking her) are told as one notice, and all marked told.  Here her
    told row is owed again with a second peer's row of the same message,
    made in one statement so that one look finds both.  Until the sixtieth
    session each row was a notice of its own."""
    notices, told = her_drop_told(mx, hs, gk, pg, db_url)
    pg.psql("WITH o AS (UPDATE outbox x SET sender_told_at = NULL, sender_quote = 'once?' FROM events e "
            "WHERE e.id = x.event_id AND e.origin_network = 'matrix' AND x.state = 'dropped' RETURNING x.*) "
            "INSERT INTO outbox (event_id, destination, room_id, state, sender_quote) "
            "SELECT event_id, 'peer:tg', room_id, 'dropped', 'once?' FROM o", db_url)
    assert all_told(pg, db_url, notices, 2) == [told, "Not delivered \u201conce?\u201d: this person blocked you."]
    assert told_marks(pg, db_url, "matrix") == "true false,true false"


def test_a_second_peers_row_of_her_message_dropped_after_the_first_was_told_is_not_told(mx, hs, gk, pg, db_url):
    """One message, one notice whatever the timing: a row of her message
    dropped for a block after another row of it was told of its drop (a
    group's second peer, whose members blocked her later; or a row another
    transaction held at the first look) is marked told without a word.
    Here the second peer's row is made dropped and owed after the first
    notice.  Until the sixty-first session it was a second notice.  A row
    of her next message is told (the mark is the message's, not hers)."""
    notices, told = her_drop_told(mx, hs, gk, pg, db_url)
    ev = pg.psql("SELECT o.event_id FROM outbox o JOIN events e ON e.id = o.event_id "
                 "WHERE e.origin_network = 'matrix' AND o.state = 'dropped'", db_url)
    pg.psql("INSERT INTO outbox (event_id, destination, room_id, state, sender_quote) "
            f"SELECT event_id, 'peer:tg', room_id, 'dropped', 'twice?' FROM outbox WHERE event_id = {ev}", db_url)
    wait_until(lambda: told_marks(pg, db_url, "matrix") == "true false,true false", what="the second row marked told")
    time.sleep(0.5)  # a notice the look would have sent
    assert all_told(pg, db_url, notices, 1) == [told]
    # a second message of hers dropped alike is told: the mark is the message's
    ev2 = pg.psql("SELECT e.id FROM events e WHERE e.origin_network = 'matrix' AND e.type = 'message' "
                  f"AND e.id <> {ev} ORDER BY e.id LIMIT 1", db_url)
    pg.psql("INSERT INTO outbox (event_id, destination, room_id, state, sender_quote) "
            f"SELECT id, 'peer:tg', room_id, 'dropped', 'other?' FROM events WHERE id = {ev2}", db_url)
    assert all_told(pg, db_url, notices, 2) == [told, "Not delivered \u201cother?\u201d: this person blocked you."]


def test_a_row_of_her_message_held_elsewhere_at_the_look_is_not_told_after_it(mx, hs, gk, pg, db_url):
    """One message, one notice whatever the timing: a second peer's row of
    her message that another transaction holds (here a session of the
    test, FOR KEY SHARE) when a look tells the message is passed by then,
    and marked told without a word once let go: the first row's mark says
    the message was told.  Until the sixty-first session the next look
    told it: a second notice."""
    notices, told = her_drop_told(mx, hs, gk, pg, db_url)
    ev = pg.psql("SELECT o.event_id FROM outbox o JOIN events e ON e.id = o.event_id "
                 "WHERE e.origin_network = 'matrix' AND o.state = 'dropped'", db_url)
    second = pg.psql("INSERT INTO outbox (event_id, destination, room_id, state) "
                     f"SELECT event_id, 'peer:tg', room_id, 'dropped' FROM outbox WHERE event_id = {ev} RETURNING id",
                     db_url)
    held = "Not delivered \u201cheld?\u201d: this person blocked you."
    with psycopg.connect(db_url) as other:
        other.execute(f"SELECT 1 FROM outbox WHERE id = {second} FOR KEY SHARE")
        pg.psql(f"UPDATE outbox SET sender_told_at = NULL, sender_quote = 'held?' WHERE event_id = {ev}", db_url)
        assert all_told(pg, db_url, notices, 2) == [told, held]
        assert told_marks(pg, db_url, "matrix") == "true false,false true"
        other.rollback()
    wait_until(lambda: told_marks(pg, db_url, "matrix") == "true false,true false", what="the held row marked told")
    time.sleep(0.5)  # a notice the look would have sent
    assert all_told(pg, db_url, notices, 2) == [told, held]


def test_a_message_another_look_holds_is_not_told_by_this_one(mx, hs, gk, pg, db_url):
    """One message, one notice across looks at once (each XMPP component
    looks at its own peer's rows, each Matrix process at all): a look
    passes by a message whose lock another look holds (the event's
    transaction-level advisory lock, class "CWDN"), and tells it once
    that one lets go (here a session of the test holds it, as a look
    would while it tells).  Until a review of the sixtieth session each
    look skipped the other's locked row and told its own: two notices."""
    notices, told = her_drop_told(mx, hs, gk, pg, db_url)
    ev = pg.psql("SELECT o.event_id FROM outbox o JOIN events e ON e.id = o.event_id "
                 "WHERE e.origin_network = 'matrix' AND o.state = 'dropped'", db_url)
    with psycopg.connect(db_url) as other:
        other.execute(f"SELECT pg_advisory_xact_lock({int.from_bytes(b'CWDN', 'big')}, {ev})")
        pg.psql(f"UPDATE outbox SET sender_told_at = NULL, sender_quote = 'held?' WHERE event_id = {ev}", db_url)
        time.sleep(1.5)  # past three looks
        assert notices() == [told]
        assert told_marks(pg, db_url, "matrix") == "false true"
        other.rollback()
    assert all_told(pg, db_url, notices, 2) == [told, "Not delivered \u201cheld?\u201d: this person blocked you."]
    assert told_marks(pg, db_url, "matrix") == "true false"


def her_told_dead_letter_then_his_block(mx, hs, gk, pg, db_url):
    """Her waiting message made a dead letter (the peer down), she told
    "could not be reached", then wally blocks her: (a, the row, her
    notices, the first notice's lines), for the two tests after it."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    alice.send_text(room, "before")
    srv.wait_events(1)
    srv.fail_next = 1000000  # the peer down
    alice.send_text(room, WAITING)
    waiting_tried(pg, db_url, "matrix", 1)
    dead = ("WITH u AS (UPDATE outbox o SET state = 'dead' FROM events e WHERE e.id = o.event_id "
            "AND e.origin_network = 'matrix' AND o.state = 'pending' AND o.attempts > 0 RETURNING o.id) "
            "SELECT coalesce(max(id), 0) FROM u")
    row = wait_until(lambda: int(pg.psql(dead, db_url)), what="her waiting message made a dead letter")
    notices = ghost_notices(hs, room, ghost)
    unreached = all_told(pg, db_url, notices, 1)
    assert unreached[0].startswith(f"Not delivered \u201c{WAITING}\u201d: gk could not be reached"), unreached
    peer_blocks_alice(mx, a, "block")
    return a, row, notices, unreached


def test_her_dead_letter_replayed_after_his_block_is_told_the_block(mx, hs, gk, pg, db_url):
    """Her message a dead letter ("could not be reached ... The operator
    can send it again."), then wally blocks her: the admin's replay is
    refused (409) and drops it, and she is told that too, "this person
    blocked you", quoting it: what became of the resend her first notice
    promised.  The fifty-ninth session's review kept no quote for a row
    told already, and until the sixtieth session a refused replay told
    nothing."""
    a, row, notices, unreached = her_told_dead_letter_then_his_block(mx, hs, gk, pg, db_url)
    r = mx.admin("POST", f"/outbox/{row}/replay")
    assert r.status_code == 409 and "recipient_blocked_sender" in r.text, r.text
    assert all_told(pg, db_url, notices, 2) == unreached + [f"Not delivered \u201c{WAITING}\u201d: "
                                                            "this person blocked you."]
    assert told_marks(pg, db_url, "matrix") == "true false"


def test_her_told_dead_letter_dropped_by_a_pass_after_his_block_is_not_told_again(mx, hs, gk, pg, db_url):
    """Her message a dead letter she was told of ("could not be reached
    ... The operator can send it again."), then wally blocks her: the
    policy's whole pass (at every start of the daemon, after every change
    of the rules: here an unrelated rule) walks dead rows and drops it, and
    she is told nothing more, only the replay she was promised being worth
    a word.  The sixtieth session's first mend of the replay's notice
    quoted every told dead row a drop met, and she was told "this person
    blocked you" at the next pass, weeks after her message."""
    a, row, notices, unreached = her_told_dead_letter_then_his_block(mx, hs, gk, pg, db_url)
    r = mx.admin("POST", "/rules", json={"scope": "domain", "pattern": "elsewhere.example", "mode": "closed"})
    assert r.status_code == 201, r.text
    wait_until(lambda: pg.psql(f"SELECT state || ' ' || (sender_quote IS NULL) FROM outbox WHERE id = {row}",
                               db_url) == "dropped true", what="the pass's drop of her dead letter, no quote owed")
    assert all_told(pg, db_url, notices, 1) == unreached
    assert told_marks(pg, db_url, "matrix") == "true false"


def test_her_dropped_message_with_no_room_of_hers_is_told_in_her_management_room(mx, hs, gk, pg, db_url):
    """Her waiting message dropped by his block after she left their room
    (its binding gone: no room of hers to say it in) is told in her
    management room with the bot, naming to whom: "To mimi://...: Not
    delivered ...".  Until the sixtieth session it was marked told and said
    nowhere."""
    a, srv = gk
    alice, room, ghost = alice_writes_to_wally(hs, a)
    bot = "@_cw_bot:example.org"
    mgmt = alice.create_dm(bot)

    def said():
        return [e["content"]["body"] for e in hs.events(mgmt) if e["type"] == "m.room.message" and e["sender"] == bot]
    wait_until(lambda: any("Commands" in n for n in said()), what="the bot's help")

    def leaves():
        alice.leave(room)
        wait_until(lambda: pg.psql("SELECT count(*) FROM room_bindings WHERE network = 'matrix' "
                                   f"AND native_id = '{room}'", db_url) == "0", what="her room unbound")
    dropped_by_his_block(mx, gk, lambda text: alice.send_text(room, text), pg, db_url, "matrix", meanwhile=leaves)
    told = f"To {a.user('wally')}: Not delivered \u201c{WAITING}\u201d: this person blocked you."
    wait_until(lambda: told in said(), timeout=20, what="the notice in her management room")
    wait_until(lambda: told_marks(pg, db_url, "matrix") == "true false", what="the row marked told")
    time.sleep(1.0)  # past two more looks
    assert said().count(told) == 1, said()
    # no remote member of the room left to name (here taken out, and the
    # row owed again): the peer is, as a dead letter names it; until a
    # review of the sixtieth session the notice named no one
    pg.psql("DELETE FROM room_members m USING identities i WHERE i.id = m.identity_id AND NOT i.is_local; "
            "UPDATE outbox SET sender_told_at = NULL, sender_quote = 'who?' WHERE state = 'dropped'", db_url)
    wait_until(lambda: "To gk: Not delivered \u201cwho?\u201d: this person blocked you." in said(), timeout=20,
               what="the notice naming the peer")


@pytest.mark.parametrize("how", ["dropped", "dead"])
def test_her_group_message_with_no_room_of_hers_is_told_in_her_management_room(mx, hs, gk, pg, db_url, how):
    """Her message in a peer's group, waiting for its peer (down), then
    dropped by wally's block or made a dead letter after she left the
    group's room (its binding gone: no room of hers to say it in), is
    told in her management room with the bot, naming the group: "In the
    group Lunch club: Not delivered ...", once (the binding here taken out
    by SQL, as in a room upgraded away).  Until the sixtieth session
    it was marked told and said nowhere; until the sixty-first no test
    said so of a group (test_her_dropped_message_with_no_room_of_hers_is_told_in_her_management_room
    is of a direct conversation's)."""
    from test_matrix import ALICE_MX, consent_alice
    a, srv = gk
    bot = "@_cw_bot:example.org"
    consent_alice(mx)
    _, token = hs.create_user("alice")
    alice = hs.as_user(token)
    mgmt = alice.create_dm(bot)

    def said():
        return [e["content"]["body"] for e in hs.events(mgmt) if e["type"] == "m.room.message" and e["sender"] == bot]
    wait_until(lambda: any("Commands" in n for n in said()), what="the bot's help")
    gid = a.create_room([a.user("wally"), ALICE], kind="group", name="Lunch club").json()["id"]
    assert a.send(gid, a.user("wally"), "lunch at noon?").status_code == 202
    mine = wait_until(lambda: next((rid for rid in hs.rooms() if rid != mgmt and hs.state(rid, "m.room.create")
                                    and hs.state(rid, "m.room.create")["sender"] == bot
                                    and hs.members(rid).get(ALICE_MX) in ("invite", "join")), None),
                      what="alice's room of the group")
    alice.join(mine)
    srv.fail_next = 1000000  # the peer down
    alice.send_text(mine, WAITING)
    waiting_tried(pg, db_url, "matrix", 1)
    pg.psql(f"DELETE FROM room_bindings WHERE network = 'matrix' AND native_id = '{mine}'", db_url)
    if how == "dropped":
        peer_blocks_alice(mx, a, "block")
        wait_until(lambda: stored_lines(pg, db_url, "matrix") == "dropped -", timeout=20,
                   what="her group message dropped")
        told = f"In the group Lunch club: Not delivered \u201c{WAITING}\u201d: this person blocked you."
    else:
        dead = ("WITH u AS (UPDATE outbox o SET state = 'dead' FROM events e WHERE e.id = o.event_id "
                "AND e.origin_network = 'matrix' AND e.type = 'message' AND o.state = 'pending' "
                "AND o.attempts > 0 RETURNING o.attempts) SELECT coalesce(max(attempts), 0) FROM u")
        tries = wait_until(lambda: int(pg.psql(dead, db_url)), what="her group message made a dead letter")
        told = f"In the group Lunch club: Not delivered \u201c{WAITING}\u201d: gk could not be reached " \
            f"({tries} tries over the retry budget). The operator can send it again."
    wait_until(lambda: told in said(), timeout=20, what="the notice in her management room")
    wait_until(lambda: pg.psql("SELECT string_agg((o.sender_told_at IS NOT NULL)::text, ',') FROM outbox o "
                               "JOIN events e ON e.id = o.event_id WHERE e.origin_network = 'matrix' "
                               "AND e.type = 'message'", db_url) == "true", what="the row marked told")
    time.sleep(1.0)  # past two more looks
    assert said().count(told) == 1, said()
