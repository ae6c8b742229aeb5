"""A local user's own outbound limits (since the twenty-sixth session): a
rule matched on the remote recipient's domain or network sets
outbound_messages_per_minute_per_user and
outbound_new_conversations_per_hour_per_user, a bucket per local sender.
Past them her message is refused (policy `limit`, audited once per
episode), nothing of it is stored, and she is told so: on XMPP a stanza
error `wait`/`resource-constraint` with a text, on Matrix a notice
(test_policy_outbound_matrix.py).  Through a real Prosody and real XMPP
clients (slixmpp)."""
import hashlib
import re
import time

import pytest
from harness import wait_until
from prosody import XmppClient
from test_xmpp import ALICE, ALICE_JID, COMP, HOST, WALLY_JID, body  # noqa: F401
from test_xmpp import alice, gk, prosody, xd  # noqa: F401  (the fixtures)

NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def stanza_error(client, sid):
    """(type, [conditions], text) of the error answering the message sid."""
    el = client.wait_for_message(lambda m: m.get("id") == sid and m.get("type") == "error")
    e = el.find("{jabber:client}error")
    conds = [c.tag.split("}")[1] for c in e if c.tag.startswith("{" + NS_STANZAS) and not c.tag.endswith("}text")]
    text = e.find(f"{{{NS_STANZAS}}}text")
    return e.get("type"), conds, text.text if text is not None else None


def limit_records(pg, db_url):
    return pg.psql("SELECT string_agg(reason_code || ' ' || rule_id || ' ' || subject || ' ' || "
                   "(details->>'direction') || ' ' || (details->>'type') || ' ' || "
                   "((details->>'retry_after_ms')::bigint > 0)::text || ' ' || (event_id IS NULL)::text, ',' "
                   "ORDER BY id) FROM audit_log WHERE action = 'policy.limit'", db_url)


def denials(pg, db_url):
    """The policy's denials audited: "reason rule", in order, comma-separated."""
    return pg.psql("SELECT string_agg(reason_code || ' ' || rule_id, ',' ORDER BY id) FROM audit_log "
                   "WHERE action = 'policy.deny'", db_url)


def stored_lines(pg, db_url, network):
    """Her stored messages of that network, in order, as "outbox state,
    body" ("-": its content not kept, as a deny leaves it), comma-separated."""
    return pg.psql("SELECT string_agg(coalesce(o.state, 'none') || ' ' || "
                   "coalesce(e.content #>> '{content,parts,0,body}', '-'), ',' ORDER BY e.id) "
                   f"FROM events e LEFT JOIN outbox o ON o.event_id = e.id WHERE e.origin_network = '{network}' "
                   "AND e.type = 'message'", db_url)


CLOSED_TEXT = "Not delivered: this server does not exchange messages with their network."


def close_wa(d):
    """A rule that closes wa.example (the peer gk's domain): its id."""
    r = d.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example", "mode": "closed"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def policy_facts(d):
    """causeway_policy_facts: the opt-ins, consents and remote blocks of the
    snapshot in force (a peer's block is taken in after a NOTIFY)."""
    m = re.search(r"^causeway_policy_facts (\S+)$", d.get("/metrics").text, re.M)
    assert m, "no causeway_policy_facts"
    return float(m.group(1))


def peer_blocks_alice(d, a, action):
    """wally (of the peer a) blocks alice, or lifts it (POST /v1/blocks),
    and the policy in force has taken it in."""
    before = policy_facts(d)
    r = a.call("POST", "/v1/blocks", {"blocker": a.user("wally"), "blocked": ALICE, "action": action})
    assert r.status_code == 202, r.text
    wait_until(lambda: policy_facts(d) == before + (1 if action == "block" else -1), timeout=30,
               what=f"wally's {action} in the policy")


BLOCKED_TEXT = "Not delivered: this person blocked you."


def xmpp_events(pg, db_url):
    return pg.psql("SELECT count(*) FROM events WHERE origin_network = 'xmpp' AND type = 'message'", db_url)


def test_an_xmpp_users_messages_past_her_outbound_limit_are_refused_and_told(xd, gk, alice, prosody, pg, db_url):
    a, srv = gk
    r = xd.admin("POST", "/rules", json={"scope": "network", "pattern": "peer:gk",
                                        "limits": {"outbound_messages_per_minute_per_user": 3}})
    assert r.status_code == 201, r.text
    rule = r.json()["id"]
    assert r.json()["limits"] == {"outbound_messages_per_minute_per_user": 3}
    assert xd.admin("GET", f"/rules/{rule}").json()["limits"] == {"outbound_messages_per_minute_per_user": 3}
    # The first three reach the peer, one after the other.
    for i in range(3):
        alice.send_message(WALLY_JID, f"spam {i}")
        got = srv.wait_events(i + 1)
        assert got[i]["sender"] == ALICE and got[i]["content"]["parts"][0]["body"] == f"spam {i}"
    # The fourth within the minute is refused: a wait, with why and when.
    sid = alice.send_message(WALLY_JID, "spam 3")
    etype, conds, text = stanza_error(alice, sid)
    assert (etype, conds) == ("wait", ["resource-constraint"]), (etype, conds, text)
    assert text is not None and text.startswith(
        "Not delivered: you sent more messages than this server allows in a minute; write again in "), text
    assert 1 <= int(text.rsplit("in ", 1)[1].split(" s.")[0]) <= 20, text
    # Another one is refused too; the flood is audited once.
    sid = alice.send_message(WALLY_JID, "spam 4")
    assert stanza_error(alice, sid)[1] == ["resource-constraint"]
    # Nothing of them is stored, nothing reaches the peer.
    assert xmpp_events(pg, db_url) == "3"
    assert pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id "
                   "WHERE e.origin_network = 'xmpp'", db_url) == "3"
    assert limit_records(pg, db_url) == \
        f"rate_limited_local_sender {rule} {ALICE} outbound message true true"
    # The limit is hers: bob, on the same server, still writes.
    bob = XmppClient("bob@" + HOST, "pw-bob", port=prosody.c2s_port)
    bob.connect()
    try:
        bob.send_message(WALLY_JID, "bob here")
        got = srv.wait_events(4)
        assert got[3]["sender"] == "mimi://example.org/u/bob"
    finally:
        bob.disconnect()
    time.sleep(0.3)
    assert len(srv.events) == 4
    # Lifted by the operator (no restart): she writes again at once.
    assert xd.admin("DELETE", f"/rules/{rule}").status_code == 200
    alice.send_message(WALLY_JID, "free again")
    got = srv.wait_events(5)
    assert got[4]["content"]["parts"][0]["body"] == "free again"


def test_new_conversations_past_her_outbound_limit_are_refused_and_told(xd, gk, alice, pg, db_url):
    """A message to a remote user she has no consent fact about (she never
    wrote to them nor accepted them) starts a conversation: one an hour
    here.  A user she wrote to is no new conversation."""
    a, srv = gk
    r = xd.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                        "limits": {"outbound_new_conversations_per_hour_per_user": 1}})
    assert r.status_code == 201, r.text
    rule = r.json()["id"]
    alice.send_message(WALLY_JID, "hi wally")
    srv.wait_events(1)
    sid = alice.send_message("wanda@" + COMP, "hi wanda")
    etype, conds, text = stanza_error(alice, sid)
    assert (etype, conds) == ("wait", ["resource-constraint"]), (etype, conds, text)
    assert text is not None and text.startswith(
        "Not delivered: you started more new conversations than this server allows in an hour; write again in "), \
        text
    assert 55 <= int(text.rsplit("in ", 1)[1].split(" min.")[0]) <= 60, text  # minutes, not 3600 s
    # Nothing of the refused first stanza stays: no identity, no room for wanda.
    assert pg.psql("SELECT count(*) FROM identities WHERE uri = 'mimi://wa.example/u/wanda'", db_url) == "0"
    assert xmpp_events(pg, db_url) == "1"
    assert limit_records(pg, db_url) == \
        f"rate_limited_local_sender_new_conversations {rule} {ALICE} outbound message true true"
    # Wally is no stranger now (her first message was consent): once that
    # consent is in force, she writes to him as before.
    assert pg.psql("SELECT state || ' ' || source FROM consents WHERE subject = 'mimi://wa.example/u/wally'",
                   db_url) == "allowed outbound"
    # The policy's snapshot follows that write within milliseconds (a
    # message decided before would count as a new conversation again).
    deadline = time.time() + 5
    while True:
        start = len(alice.stanzas())
        sid = alice.send_message(WALLY_JID, "again")
        wait_until(lambda: len(srv.events) == 2 or any(
            m.get("id") == sid and m.get("type") == "error" for m in alice.stanzas()[start:]), what="an answer")
        if len(srv.events) == 2:
            break
        assert time.time() < deadline, "her consent to wally never came into force"
    assert srv.events[1]["content"]["parts"][0]["body"] == "again"


def test_an_oversized_first_line_takes_no_new_conversation(xd, gk, alice, pg, db_url):
    """A message the size limits refuse cannot go: it takes no token of her
    outbound buckets (since the twenty-seventh session; until then the
    buckets came first, and an oversized first line to someone new used up
    her one new conversation, so that her next line to them was refused
    for an hour)."""
    a, srv = gk
    r = xd.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example",
                                        "limits": {"outbound_new_conversations_per_hour_per_user": 1,
                                                   "max_body_bytes": 100}})
    assert r.status_code == 201, r.text
    rule = r.json()["id"]
    # Her first line to wally is too large: refused, and she is told why.
    sid = alice.send_message(WALLY_JID, "x" * 200)
    etype, conds, text = stanza_error(alice, sid)
    assert (etype, conds, text) == \
        ("cancel", ["service-unavailable"], "Not delivered: it is larger than this server allows to them."), \
        (etype, conds, text)
    assert denials(pg, db_url) == f"too_large {rule}"
    # Her next, normal, line to him still starts the one conversation.
    alice.send_message(WALLY_JID, "hi wally")
    got = srv.wait_events(1)
    assert got[0]["sender"] == ALICE and got[0]["content"]["parts"][0]["body"] == "hi wally"
    # Which used the hour's one: a line to wanda is refused by the limit.
    sid = alice.send_message("wanda@" + COMP, "hi wanda")
    etype, conds, text = stanza_error(alice, sid)
    assert (etype, conds) == ("wait", ["resource-constraint"]), (etype, conds, text)
    assert text is not None and text.startswith(
        "Not delivered: you started more new conversations than this server allows in an hour"), text
    assert limit_records(pg, db_url) == \
        f"rate_limited_local_sender_new_conversations {rule} {ALICE} outbound message true true"
    assert len(srv.events) == 1


def test_a_leave_is_never_refused_by_the_outbound_limit(xd, gk, alice, prosody, pg, db_url):
    """A join or leave adds nothing to what the remote side sees: no limit
    counts it (a review found a leave refused 429 once the bucket was
    empty, the user kept a member of the group for good)."""
    from test_xmpp import MUC, MUC_USER, consent_alice, q
    a, srv = gk
    consent_alice(xd)
    gid = a.create_room([a.user("wally"), ALICE], kind="group").json()["id"]
    assert a.send(gid, a.user("wally"), "hello").status_code == 202
    room = alice.wait_for_message(lambda el: el.find(q(MUC_USER, "x")) is not None).get("from")
    start = alice.count()
    alice.send_presence(to=f"{room}/alice", payload=f"<x xmlns='{MUC}'/>")
    alice.wait_for_message(lambda el: el.find("{jabber:client}subject") is not None, start=start)
    r = xd.admin("POST", "/rules", json={"scope": "network", "pattern": "peer:gk",
                                        "limits": {"outbound_messages_per_minute_per_user": 1}})
    assert r.status_code == 201, r.text
    # Her bucket is empty: a message is refused (the rule is in force).
    def refused():
        sid = alice.send_message(room, "one more", mtype="groupchat")
        el = alice.wait_for_message(lambda m: m.get("id") == sid and m.get("type") in ("error", "groupchat"))
        return el.get("type") == "error"
    wait_until(refused, timeout=15, what="a message refused by the limit")
    # Her leave goes through all the same, and the peer is told.
    admin = "http://jabber.org/protocol/muc#admin"
    res = alice.iq("set", room, f"<query xmlns='{admin}'><item affiliation='none' nick='alice'/></query>")
    assert res.get("type") == "result", res.xml
    wait_until(lambda: pg.psql("SELECT m.membership FROM room_members m JOIN rooms r ON r.id = m.room_id "
                               "JOIN identities i ON i.id = m.identity_id WHERE r.public_id = "
                               f"'{gid}' AND i.uri = '{ALICE}'", db_url) == "left", what="her membership left")
    wait_until(lambda: any(e.get("type") == "membership" and e["room_id"] == gid and e["sender"] == ALICE
                           and e["content"].get("membership") == "leave" for e in list(srv.events)),
               what="the peer told of her leave")
    assert "membership" not in (pg.psql("SELECT string_agg(details->>'type', ',') FROM audit_log "
                                        "WHERE action = 'policy.limit'", db_url) or "")


def test_over_her_limit_to_a_closed_domain_she_is_told_to_wait(xd, gk, alice, pg, db_url):
    """The spec's precedence puts rate limits (3) before a closed server (4):
    a message to a closed domain only peeks at her outbound buckets (since
    the twenty-eighth session; in the twenty-seventh it was refused for
    good, server_closed, even over her limit).  Within her limit it is
    refused for good and takes no token; over it she is told to wait."""
    a, srv = gk
    r = xd.admin("POST", "/rules", json={"scope": "network", "pattern": "peer:gk",
                                        "limits": {"outbound_messages_per_minute_per_user": 1}})
    assert r.status_code == 201, r.text
    rule = r.json()["id"]
    closed = close_wa(xd)
    # Within her limit: refused for good.
    sid = alice.send_message(WALLY_JID, "one")
    etype, conds, text = stanza_error(alice, sid)
    assert (etype, conds, text) == ("cancel", ["service-unavailable"], CLOSED_TEXT), (etype, conds, text)
    # It took no token: opened again, her next message goes.
    assert xd.admin("DELETE", f"/rules/{closed}").status_code == 200
    alice.send_message(WALLY_JID, "two")
    got = srv.wait_events(1)
    assert got[0]["sender"] == ALICE and got[0]["content"]["parts"][0]["body"] == "two"
    # Closed again, her bucket now empty: the limit answers, a wait.
    close_wa(xd)
    sid = alice.send_message(WALLY_JID, "three")
    etype, conds, text = stanza_error(alice, sid)
    assert (etype, conds) == ("wait", ["resource-constraint"]), (etype, conds, text)
    assert text is not None and text.startswith(
        "Not delivered: you sent more messages than this server allows in a minute; write again in "), text
    assert limit_records(pg, db_url) == \
        f"rate_limited_local_sender {rule} {ALICE} outbound message true true"
    assert denials(pg, db_url) == f"server_closed {closed}"
    # Nothing of "three" is stored; "one", denied, is kept as a deny keeps
    # a message: its row dropped, its content not stored.
    wait_until(lambda: stored_lines(pg, db_url, "xmpp") == "dropped -,delivered two", what="her lines as stored")
    assert len(srv.events) == 1


def test_a_message_to_someone_who_blocked_her_says_so(xd, gk, alice, pg, db_url):
    """A remote user's block of her (POST /v1/blocks) refuses what she
    writes to him (recipient_blocked_sender): the stanza error is the
    uniform one, its text says why, as for this server's rules; she may
    know it (the Matrix bot's list shows it). Until the thirty-eighth
    session the error had no text, and she could not tell a block from a
    fault. Once he lifts it her message goes."""
    a, srv = gk
    peer_blocks_alice(xd, a, "block")
    sid = alice.send_message(WALLY_JID, "are you there?")
    assert stanza_error(alice, sid) == ("cancel", ["service-unavailable"], BLOCKED_TEXT)
    assert pg.psql("SELECT string_agg(reason_code || ' ' || subject || ' ' || (details->>'direction'), ',') "
                   "FROM audit_log WHERE action = 'policy.deny'", db_url) == \
        "recipient_blocked_sender mimi://wa.example/u/wally outbound"
    assert stored_lines(pg, db_url, "xmpp") == "dropped -"
    peer_blocks_alice(xd, a, "unblock")
    alice.send_message(WALLY_JID, "hello again")
    got = srv.wait_events(1)
    assert [e["content"]["parts"][0]["body"] for e in got if e.get("type") == "message"] == ["hello again"], got
    wait_until(lambda: stored_lines(pg, db_url, "xmpp") == "dropped -,delivered hello again",
               what="her second message delivered")


def test_her_messages_waiting_for_his_peer_when_he_blocks_her_are_never_delivered(xd, gk, alice, pg, db_url):
    """A remote user's block of her (POST /v1/blocks) stops what she wrote
    to him before it and is still waiting: his peer refused it (503, down),
    its retry pending (or in flight: a try that fails is decided again
    before it goes back to waiting).  The block drops it (not_delivered,
    recipient_blocked_sender in the admin API), and once the peer is back
    it is never delivered.  His unblock brings back nothing.  Until the
    fifty-fifth session a remote block stopped only what she wrote after
    it: the waiting messages reached him at the peer's next answer."""
    a, srv = gk
    wally = a.user("wally")
    alice.send_message(WALLY_JID, "before")
    srv.wait_events(1)
    srv.fail_next = 1000000  # the peer down
    for i in range(2):
        alice.send_message(WALLY_JID, f"waiting {i}")
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id "
                               "WHERE e.origin_network = 'xmpp' AND o.attempts > 0 AND o.state <> 'delivered'",
                               db_url) == "2", timeout=20, what="her two messages tried and refused")
    peer_blocks_alice(xd, a, "block")
    wait_until(lambda: stored_lines(pg, db_url, "xmpp") == "delivered before,dropped -,dropped -", timeout=20,
               what="her waiting messages dropped")
    assert pg.psql("SELECT string_agg(reason_code || ' ' || subject || ' ' || (details->>'by'), ',' ORDER BY id) "
                   "FROM audit_log WHERE action = 'policy.deny'", db_url) == \
        f"recipient_blocked_sender {wally} sweep,recipient_blocked_sender {wally} sweep"
    ids = pg.psql("SELECT string_agg(e.public_id, ' ' ORDER BY e.id) FROM events e "
                  "WHERE e.origin_network = 'xmpp' AND e.type = 'message'", db_url).split()
    for m in ids[1:]:
        r = xd.admin("GET", f"/messages/{m}/decision")
        assert r.status_code == 200, r.text
        got = [(x["destination"], x["state"], x["verdict"], x["reason"]) for x in r.json()["recipients"]]
        assert got == [("peer:gk", "dropped", "deny", "recipient_blocked_sender")], r.json()
    # The peer back: nothing of them reaches him, not after his unblock either.
    srv.fail_next = 0
    peer_blocks_alice(xd, a, "unblock")
    alice.send_message(WALLY_JID, "after")
    srv.wait_events(2)
    time.sleep(1.5)  # past the retries' longest wait (retry_max_ms)
    assert [e["content"]["parts"][0]["body"] for e in srv.events if e.get("type") == "message"] == \
        ["before", "after"], srv.events
    # "after" is marked delivered once the peer's answer is read, after
    # the peer has it: waited for, where until the sixty-third session it
    # was read after the sleep above alone (a loaded machine's record could
    # come later)
    wait_until(lambda: stored_lines(pg, db_url, "xmpp") == "delivered before,dropped -,dropped -,delivered after",
               what="her lines as stored, the last delivered")


def test_her_retraction_waiting_for_his_peer_when_he_blocks_her_still_goes(xd, gk, alice, pg, db_url):
    """Her retraction (XEP-0424: a delete) of a message he has, still
    waiting for his peer when he blocks her, is not dropped with her
    waiting messages: it takes back what he had before the block, and
    dropping it would leave her message shown to him.  Until the
    fifty-fifth session's review the recheck dropped it with them."""
    a, srv = gk
    a.user("wally")
    s1 = alice.send_message(WALLY_JID, "oops")
    srv.wait_events(1)
    srv.fail_next = 1000000  # the peer down
    alice.send_raw(f"<message to='{WALLY_JID}' type='chat' id='d1'><retract xmlns='urn:xmpp:message-retract:1' "
                   f"id='{s1}'/><body>retracted</body></message>")
    deletes = ("SELECT string_agg(o.state, ',') FROM outbox o JOIN events e ON e.id = o.event_id "
               "WHERE e.origin_network = 'xmpp' AND e.type = 'delete'%s")
    wait_until(lambda: pg.psql(deletes % " AND o.attempts > 0", db_url) == "pending", timeout=20,
               what="her retraction tried and refused")
    peer_blocks_alice(xd, a, "block")
    time.sleep(1.0)  # her walk (and a claim's screen) would have dropped it by now
    assert pg.psql(deletes % "", db_url) in ("pending", "in_flight")
    srv.fail_next = 0
    got = srv.wait_events(2)
    assert got[1]["type"] == "delete", got
    wait_until(lambda: pg.psql(deletes % "", db_url) == "delivered", what="her retraction delivered")


def waiting_tried(pg, db_url, network, n):
    """Waits until n of her messages of that network were tried and refused
    by the peer (down), still to be delivered."""
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id "
                               f"WHERE e.origin_network = '{network}' AND e.type = 'message' AND o.attempts > 0 "
                               "AND o.state <> 'delivered'", db_url) == str(n), timeout=20,
               what=f"{n} message(s) of hers tried and refused")


def told_marks(pg, db_url, network):
    """Her dropped rows of that network as "told quote-kept", in order."""
    return pg.psql("SELECT string_agg((o.sender_told_at IS NOT NULL)::text || ' ' || "
                   "(o.sender_quote IS NOT NULL)::text, ',' ORDER BY o.id) FROM outbox o "
                   f"JOIN events e ON e.id = o.event_id WHERE e.origin_network = '{network}' "
                   "AND o.state = 'dropped'", db_url)


WAITING = "are you still there, wally?"


def dropped_by_his_block(d, gk, write, pg, db_url, network, meanwhile=None):
    """The blocked-drop tests' set-up, on either network (write(text):
    alice writes it to wally there): "before" delivered, then, his peer
    down, WAITING tried and refused; meanwhile() (when given) while it
    waits; wally blocks her, and it is dropped.  Until the sixtieth session
    each network's test wrote these steps out."""
    a, srv = gk
    write("before")
    srv.wait_events(1)
    srv.fail_next = 1000000  # the peer down
    write(WAITING)
    waiting_tried(pg, db_url, network, 1)
    if meanwhile:
        meanwhile()
    peer_blocks_alice(d, a, "block")
    wait_until(lambda: stored_lines(pg, db_url, network) == "delivered before,dropped -", timeout=20,
               what="her waiting message dropped")


def test_her_waiting_message_dropped_by_his_block_is_told_by_the_component(xd, gk, alice, prosody, make_daemon, pg,
                                                                           db_url):
    """As on Matrix (test_policy_outbound_matrix.py): her message still
    waiting for his peer (down) when wally blocks her is dropped, and the
    component tells her once, in a chat message from its domain as it tells
    a dead letter, quoting it though its content was erased with the drop,
    in the words of the refusal of what she writes after the block.  A
    restart (whose reload walks her rows again) tells nothing twice; a
    message refused as she writes is told by its error alone.  Until the
    fifty-ninth session the dropped one went without a word."""
    from test_xmpp import component_state, daemon_options
    srv = gk[1]
    start = alice.count()
    dropped_by_his_block(xd, gk, lambda text: alice.send_message(WALLY_JID, text), pg, db_url, "xmpp")

    def told():
        return [body(el) for el in alice.stanzas()[start:] if el.tag == "{jabber:client}message"
                and el.get("from") == COMP]
    told_text = f"To {WALLY_JID}: Not delivered \u201care you still there, wally?\u201d: this person blocked you."
    wait_until(told, timeout=20, what="the telling")
    wait_until(lambda: told_marks(pg, db_url, "xmpp") == "true false", what="the row marked told")
    xd.stop()
    again = make_daemon(db_url, options=daemon_options(prosody)).start()
    wait_until(lambda: component_state(again)["state"] == "up", timeout=30, what="the component's stream again")
    sid = alice.send_message(WALLY_JID, "hello?")
    assert stanza_error(alice, sid) == ("cancel", ["service-unavailable"], BLOCKED_TEXT)
    alice.iq("get", COMP, "<ping xmlns='urn:xmpp:ping'/>")  # a round trip after any second telling
    time.sleep(1.5)  # past the component's next look (once a second)
    alice.iq("get", COMP, "<ping xmlns='urn:xmpp:ping'/>")
    assert told() == [told_text], told()
    assert told_marks(pg, db_url, "xmpp") == "true false,false false"
    srv.fail_next = 0
    time.sleep(1.0)  # past a retry's wait: nothing of hers reaches him
    assert [e["content"]["parts"][0]["body"] for e in srv.events if e.get("type") == "message"] == ["before"]


def her_groupchat_tried(xd, gk, alice, pg, db_url):
    """alice in a group of the peer gk with wally, its one member there,
    her groupchat WAITING tried and refused (the peer down): (the group's
    room JID, its public id, where her stanzas after the join start)."""
    from test_xmpp import MUC, MUC_USER, consent_alice, q
    a, srv = gk
    consent_alice(xd)
    gid = a.create_room([a.user("wally"), ALICE], kind="group").json()["id"]
    assert a.send(gid, a.user("wally"), "hello group").status_code == 202
    room = alice.wait_for_message(lambda el: el.find(q(MUC_USER, "x")) is not None).get("from")
    start = alice.count()
    alice.send_presence(to=f"{room}/alice", payload=f"<x xmlns='{MUC}'/>")
    alice.wait_for_message(lambda el: el.find("{jabber:client}subject") is not None, start=start)
    srv.fail_next = 1000000  # the peer down
    alice.send_message(room, WAITING, mtype="groupchat", id="g1")
    waiting_tried(pg, db_url, "xmpp", 1)
    return room, gid, start


@pytest.mark.parametrize("key", ["pair", "hashed", "hashed elsewhere"])
def test_her_waiting_group_message_dropped_by_his_block_is_told_naming_the_group(xd, gk, alice, pg, db_url, key):
    """Her groupchat still waiting for his peer (down) when wally, its one
    member there, blocks her is dropped, and the component tells her in a
    chat message from its domain naming the group's room: "In #...@...:
    Not delivered ...".  Until the sixtieth session a group's row was
    marked told and said nowhere (the component told a chat only).  Her
    binding's key hashed (a long pair of JIDs: set here), the room's JID
    is this component's when it hashes to her key, else the group is named
    ("In the group <name>: ", its public id when it has none): she may be
    in it by another component's JID, which until a review of the
    sixtieth session the notice named as this one's all the same."""
    a, srv = gk
    room, gid, start = her_groupchat_tried(xd, gk, alice, pg, db_url)
    if key != "pair":
        pair = f"{ALICE_JID} {room if key == 'hashed' else room.replace(COMP, 'elsewhere.' + HOST)}"
        hashed = "h:" + hashlib.sha256(pair.encode()).hexdigest()
        assert pg.psql(f"WITH u AS (UPDATE room_bindings SET native_id = '{hashed}' "
                       f"WHERE network = 'xmpp' AND native_id = '{ALICE_JID} {room}' RETURNING 1) "
                       "SELECT count(*) FROM u", db_url) == "1"
    peer_blocks_alice(xd, a, "block")
    wait_until(lambda: stored_lines(pg, db_url, "xmpp") == "dropped -", timeout=20, what="her groupchat dropped")

    def told():
        return [body(el) for el in alice.stanzas()[start:] if el.tag == "{jabber:client}message"
                and el.get("from") == COMP and el.get("type") != "groupchat"]
    text = f"In {room if key != 'hashed elsewhere' else 'the group ' + gid}: Not delivered \u201c{WAITING}\u201d: " \
        "this person blocked you."
    wait_until(lambda: text in told(), timeout=20, what="the telling")
    wait_until(lambda: told_marks(pg, db_url, "xmpp") == "true false", what="the row marked told")
    alice.iq("get", COMP, "<ping xmlns='urn:xmpp:ping'/>")
    time.sleep(1.5)  # past the component's next look (once a second)
    alice.iq("get", COMP, "<ping xmlns='urn:xmpp:ping'/>")
    assert told() == [text], told()


def test_her_group_message_a_dead_letter_is_told_naming_the_group(xd, gk, alice, pg, db_url):
    """Her groupchat whose peer stayed down past the retry budget (here made
    a dead letter at once) is told by the component as a drop for a block
    is (test_her_waiting_group_message_dropped_by_his_block_is_told_naming_the_group),
    in a chat message from its domain naming the group's room: "In
    #...@...: Not delivered "...": gk could not be reached (...). The
    operator can send it again.", once.  Until the sixtieth session a
    group's row was marked told and said nowhere; until the sixty-first
    no test said so of a dead letter."""
    room, gid, start = her_groupchat_tried(xd, gk, alice, pg, db_url)
    dead = ("WITH u AS (UPDATE outbox o SET state = 'dead' FROM events e WHERE e.id = o.event_id "
            "AND e.origin_network = 'xmpp' AND e.type = 'message' AND o.state = 'pending' AND o.attempts > 0 "
            "RETURNING o.attempts) SELECT coalesce(max(attempts), 0) FROM u")
    tries = wait_until(lambda: int(pg.psql(dead, db_url)), what="her groupchat made a dead letter")

    def told():
        return [body(el) for el in alice.stanzas()[start:] if el.tag == "{jabber:client}message"
                and el.get("from") == COMP and el.get("type") != "groupchat"]
    text = f"In {room}: Not delivered \u201c{WAITING}\u201d: gk could not be reached " \
        f"({tries} tries over the retry budget). The operator can send it again."
    wait_until(lambda: text in told(), timeout=20, what="the telling")
    assert pg.psql("SELECT string_agg(o.state || ' ' || (o.sender_told_at IS NOT NULL), ',') FROM outbox o "
                   "JOIN events e ON e.id = o.event_id WHERE e.origin_network = 'xmpp' AND e.type = 'message'",
                   db_url) == "dead true"
    alice.iq("get", COMP, "<ping xmlns='urn:xmpp:ping'/>")
    time.sleep(1.5)  # past the component's next look (once a second)
    alice.iq("get", COMP, "<ping xmlns='urn:xmpp:ping'/>")
    assert told() == [text], told()
