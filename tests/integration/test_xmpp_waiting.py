"""What waits to be stored is bounded (since the forty-third session).

A local user's stanza that names another message (a correction, a
retraction, reactions, a reply, a receipt), and every later one of its
conversation, waits until the earlier ones of that conversation are stored,
one at a time (xmpp_in.c, in_start).  Nothing bounded that list: one user
writing such stanzas faster than they were stored grew the daemon's memory
without end (a review's finding: 90 MB of reactions took 325 MB, held for
minutes).  Now a user's waiting stanzas are at most 256 and 16 times
xmpp.max_stanza_bytes, and the component's at most 4096 and 64 times it;
one past them is refused, resource-constraint, and nothing of it is
stored.  The database is held here (a lock on event_native_ids, which only
the stanzas' writes and the outbound look-up read) so that what comes
waits."""
import contextlib

from harness import HeldSession, wait_until
from prosody import NS_STANZAS, XmppClient
from test_xmpp import (prosody, ALICE, ALICE_JID, COMP, WALLY_JID, body, component_state,  # noqa: F401
                       consent_alice, message_from, start_with_gk)

NS_R = "urn:xmpp:reactions:0"
SLOW_DB = {"request_timeout_ms": "60000", "statement_timeout_ms": "120000"}


def reactions(mid, target, key, pad=""):
    return (f"<message to='{WALLY_JID}' type='chat' id='{mid}'><reactions xmlns='{NS_R}' id='{target}'>"
            f"<reaction>{key}</reaction></reactions>{pad}</message>")


def errors(client, start):
    """{id: (condition, text)} of the error messages the client got since start."""
    out = {}
    for el in client.stanzas()[start:]:
        if el.tag == "{jabber:client}message" and el.get("type") == "error":
            t = el.find(f".//{{{NS_STANZAS}}}text")
            out[el.get("id")] = (el.error_condition, t.text if t is not None else None)
    return out


@contextlib.contextmanager
def stores_held(db_url, rooms):
    """The writes of events into rooms (public ids) wait until the block
    ends: their rows are locked (an event's row checks its room's), and
    nothing else the component does waits for them."""
    held = HeldSession(db_url)
    try:
        ids = ", ".join(f"'{r}'" for r in rooms)
        held.run(f"BEGIN; SELECT id FROM rooms WHERE public_id IN ({ids}) FOR UPDATE;")
        yield
        held.run("COMMIT;")
    finally:
        held.end()


def write_waiting(pg, db_url):
    """Whether a write waits for the locks of stores_held."""
    return pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'", db_url) != "0"


def waiting(d):
    return component_state(d)["stanzas_waiting"]


def test_a_users_waiting_stanzas_are_at_most_256(make_daemon, db_url, prosody, pg):
    d, a, srv = start_with_gk(make_daemon, db_url, prosody, database=SLOW_DB)
    alice = bob = None
    try:
        bob_uri = "mimi://example.org/u/bob"
        consent_alice(d)
        consent_alice(d, user=bob_uri)
        alice = XmppClient(ALICE_JID, "pw-alice", port=prosody.c2s_port)
        alice.connect()
        bob = prosody.client("bob", "pw-bob")
        # alice's first stanza to wally binds their chat (its row waits for the room's lock)
        room = a.create_room([a.user("wally"), ALICE]).json()["id"]
        room2 = a.create_room([a.user("wally"), bob_uri]).json()["id"]
        w2 = a.send(room2, a.user("wally"), "to bob").json()["id"]
        message_from(bob, WALLY_JID, lambda el: body(el) == "to bob")
        with stores_held(db_url, [room]):
            alice.send_message(WALLY_JID, "first", id="s0")  # being stored: held
            wait_until(lambda: write_waiting(pg, db_url), what="the first stanza's write held")
            start = alice.count()
            # each names a message (unknown here: nothing to store), so each waits
            alice.send_raw("".join(reactions(f"w{i}", "nope", "A") for i in range(257)))
            err = alice.wait_for_message(lambda el: el.get("type") == "error" and el.get("id") == "w256",
                                         start=start, timeout=30)
            assert err.error_condition == "resource-constraint", err.xml
            assert err.find("{jabber:client}error").get("type") == "wait", err.xml
            assert waiting(d) == 256
            # the errors come in order: none before the 257th's
            assert errors(alice, start) == {"w256": ("resource-constraint",
                                                     "Not delivered: too many messages wait to be stored before it. "
                                                     "Send it again in a moment.")}
            # another user's stanzas still wait their turn (behind alice's first in the store)
            bob.send_message(WALLY_JID, "bob's", id="b0")
            bob.send_raw(f"<message to='{WALLY_JID}' type='chat' id='b1'><reactions xmlns='{NS_R}' id='{w2}'>"
                         f"<reaction>\U0001F44D</reaction></reactions></message>")
            bob.ping(COMP)
            assert waiting(d) == 257 and errors(bob, 0) == {}
        # Released: each is stored in turn, and what follows is taken.
        wait_until(lambda: waiting(d) == 0, timeout=60, what="the waiting stanzas stored")
        assert f'causeway_xmpp_stanzas_waiting{{component="{COMP}"}} 0' in d.get("/metrics").text
        alice.send_raw(f"<message to='{WALLY_JID}' type='chat' id='s1'><body>first!</body>"
                       f"<replace xmlns='urn:xmpp:message-correct:0' id='s0'/></message>")
        alice.send_raw(reactions("r1", "s0", "\U0001F389"))
        evs = srv.wait_events(5, timeout=60)
        by = {(e["sender"], e["type"]) for e in evs}
        assert by == {(ALICE, "message"), (ALICE, "edit"), (ALICE, "reaction"), (bob_uri, "message"),
                      (bob_uri, "reaction")}, evs
        assert d.wait_for(lambda r: r.get("msg") == "xmpp: a stanza refused: too many wait to be stored"
                          and r.get("user") == ALICE_JID)
        assert set(errors(alice, start)) == {"w256"} and errors(bob, 0) == {}
    finally:
        print("causewayd log:\n" + d.log())
        srv.close()
        for c in (alice, bob):
            if c:
                c.disconnect()


def test_waiting_stanzas_are_bounded_in_bytes_per_user_and_per_component(make_daemon, db_url, prosody, pg):
    """16 times xmpp.max_stanza_bytes a user, 64 times it for all: with the
    smallest cap (10000 bytes), a user's stanzas of 6 KB fill hers after a
    dozen or so, and four users' fill nearly all of the component's: the
    fifth has room for a few only."""
    users = ["alice", "bob", "carol", "dave", "erin"]
    for u in users[2:]:
        prosody.register(u, "pw-" + u)
    d, a, srv = start_with_gk(make_daemon, db_url, prosody, database=SLOW_DB, xmpp={"max_stanza_bytes": "10000"})
    clients = []
    try:
        for u in users:
            clients.append(prosody.client(u, "pw-" + u))
        pad = "<pad xmlns='urn:example:pad'>" + "x" * 6000 + "</pad>"
        rooms = [a.create_room([a.user("wally"), f"mimi://example.org/u/{u}"]).json()["id"] for u in users]
        taken = []
        with stores_held(db_url, rooms):
            for i, c in enumerate(clients):
                c.send_message(WALLY_JID, "first", id="s0")  # being stored (held), or queued for the store
                if i == 0:
                    wait_until(lambda: write_waiting(pg, db_url), what="the first stanza's write held")
                start = c.count()
                c.send_raw("".join(reactions(f"w{k}", "nope", "A", pad) for k in range(30)))
                c.wait_for_message(lambda el: el.get("type") == "error" and el.get("id") == "w29", start=start,
                                   timeout=30)
                refused = errors(c, start)
                assert {v[0] for v in refused.values()} == {"resource-constraint"}, refused
                n = 30 - len(refused)
                # the first n wait, every one after is refused
                assert set(refused) == {f"w{k}" for k in range(n, 30)}, refused
                taken.append(n)
            assert waiting(d) == sum(taken)
        a1 = taken[0]
        assert 8 <= a1 <= 25, taken  # 160,000 bytes of about 11 KB each (text and bookkeeping)
        assert all(abs(t - a1) <= 1 for t in taken[1:4]), taken  # each user's bound
        assert taken[4] <= 4, taken  # the component's: 4 times a user's, nearly all taken
        wait_until(lambda: waiting(d) == 0, timeout=60, what="the waiting stanzas stored")
    finally:
        print("causewayd log:\n" + d.log())
        srv.close()
        for c in clients:
            c.disconnect()
