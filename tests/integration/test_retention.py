"""Retention through the real daemon: the content of old messages whose
deliveries are all done is erased (ids, rows and statuses stay), old
idempotency keys and delivery attempts are deleted, older events whose
deliveries are all done are deleted with their rows, old audit records are
deleted, what is still owed to someone is kept, and a setting of 0 keeps
that kind for ever.  Data is made
through the peer API and made old with SQL; retention.interval_s is 1 here
(60 by default)."""
import concurrent.futures
import json
import os
import subprocess
import threading
import time

import pytest

from harness import HeldSession, wait_until
from test_peer_pull import make_peers
from test_policy import fill_outbox, logged_plans, plans_since, rows_read

OLD = "now() - interval '40 days'"  # past retention.content_days and attempts_days (30)
OLD_KEY = "now() - interval '8 days'"  # past retention.idempotency_days (7)
OLDER = "now() - interval '400 days'"  # past retention.rows_days (365 here)


def start(make_daemon, db_url, **retention):
    # rows_days is off by default (the operator's choice); on here, at a
    # year (the setting docs/operations.md suggests), unless a test sets it.
    opts = {"interval_s": "1", "rows_days": "365"}
    opts.update({k: str(v) for k, v in retention.items()})
    return make_daemon(db_url, options={"retention": opts}).start()


def peers(d):
    """A pushing peer gk (its notify server checks our signatures) and a
    pulling peer tg, in one room."""
    a, b, rm, srv = make_peers(d)
    srv.public_b64 = d.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    return a, b, rm, srv


def started_with_peers(make_daemon, db_url):
    d = start(make_daemon, db_url)
    return (d, *peers(d))


def contents(pg, db_url, ids):
    rows = pg.psql("SELECT public_id, content::text FROM events WHERE public_id IN (%s)"
                   % ",".join("'%s'" % i for i in ids), db_url)
    return dict(r.split("|", 1) for r in rows.splitlines())


def pull_and_ack(b, after=0):
    """Pulls everything after the cursor and acknowledges it (the next
    request's cursor): the rows are delivered."""
    got = b.call("GET", f"/v1/events?after={after}").json()
    b.call("GET", f"/v1/events?after={got['next']}")
    return got


def delivered(pg, db_url, msg):
    return pg.psql("SELECT bool_and(o.state = 'delivered') FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{msg}'", db_url) == "t"


def keys(pg, db_url):
    return set(pg.psql("SELECT key FROM idempotency_keys", db_url).splitlines())


def attempts_of(pg, db_url, msg):
    return int(pg.psql("SELECT count(*) FROM delivery_attempts d JOIN outbox o ON o.id = d.outbox_id "
                       f"JOIN events e ON e.id = o.event_id WHERE e.public_id = '{msg}'", db_url))


def age(pg, db_url, events=(), keys=(), attempts_of=(), older=()):
    """In one transaction: a sweep sees all of it or none."""
    sql = []
    for ids, when in ((events, OLD), (older, OLDER)):
        if ids:
            sql.append(f"UPDATE events SET accepted_at = {when} WHERE public_id IN (%s)"
                       % ",".join("'%s'" % i for i in ids))
    if keys:
        sql.append(f"UPDATE idempotency_keys SET created_at = {OLD_KEY} WHERE key IN (%s)"
                   % ",".join("'%s'" % k for k in keys))
    if attempts_of:
        sql.append("UPDATE delivery_attempts d SET started_at = d.started_at - interval '40 days', "
                   "finished_at = d.finished_at - interval '40 days' FROM outbox o JOIN events e "
                   "ON e.id = o.event_id WHERE o.id = d.outbox_id AND e.public_id IN (%s)"
                   % ",".join("'%s'" % i for i in attempts_of))
    pg.psql("; ".join(sql), db_url)


def test_old_delivered_content_is_erased_and_what_is_owed_is_kept(make_daemon, db_url, pg):
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    alice, bob = a.user("alice"), b.user("bob")
    # To the pull peer: pulled and acknowledged (delivered).
    old_done = a.send(rm["id"], alice, "old, delivered").json()["id"]
    young_done = a.send(rm["id"], alice, "young, delivered").json()["id"]
    # A message that expires later: the expiry takes it back then, by its
    # content (content.expires), and erases it.
    later = int(time.time() * 1000) + 100 * 86400 * 1000
    old_expiring = a.send(rm["id"], alice, "", content={
        "parts": [{"type": "text/plain", "body": "old, expires later"}], "expires": later}).json()["id"]
    cursor = pull_and_ack(b)["next"]
    wait_until(lambda: all(delivered(pg, db_url, m) for m in (old_done, young_done, old_expiring)),
               what="the pull ack")
    # Still owed: not pulled yet, and a dead letter (the admin may replay it).
    old_open = a.send(rm["id"], alice, "old, not pulled yet").json()["id"]
    old_dead = a.send(rm["id"], alice, "old, dead letter").json()["id"]
    pg.psql("UPDATE outbox SET state = 'dead' WHERE event_id = "
            f"(SELECT id FROM events WHERE public_id = '{old_dead}')", db_url)
    # To the push peer: delivered, with a delivery attempt each.
    old_pushed = b.send(rm["id"], bob, "old, pushed").json()["id"]
    young_pushed = b.send(rm["id"], bob, "young, pushed").json()["id"]
    # A reaction: its emoji is the sender's set on XMPP (XEP-0444 sends the
    # whole set, made from the stored reactions): kept while it stands.
    old_reaction = b.call("POST", f"/v1/rooms/{rm['id']}/messages", {
        "type": "reaction", "sender": bob, "content": {
            "in_reply_to": old_pushed, "disposition": "reaction",
            "parts": [{"type": "text/plain", "body": "\u2764"}]}}, idem="old-reaction").json()["id"]
    srv.wait_events(3)
    wait_until(lambda: delivered(pg, db_url, old_pushed) and delivered(pg, db_url, young_pushed)
               and delivered(pg, db_url, old_reaction)
               and attempts_of(pg, db_url, young_pushed) == 1, what="the pushes")
    assert attempts_of(pg, db_url, old_pushed) == 1
    # Room creations keep their idempotency keys.
    assert a.create_room([a.user("x"), b.user("y")], idem="room-old").status_code == 201
    assert a.create_room([a.user("z"), b.user("w")], idem="room-young").status_code == 201
    assert {"room-old", "room-young"} <= keys(pg, db_url)
    before = contents(pg, db_url, [old_done, young_done, old_expiring, old_open, old_dead, old_pushed,
                                   young_pushed, old_reaction])
    assert all(c != "{}" for c in before.values()), before

    age(pg, db_url, events=[old_done, old_expiring, old_open, old_dead, old_pushed, old_reaction],
        keys=["room-old"],
        attempts_of=[old_pushed])

    def swept():
        c = contents(pg, db_url, [old_done, old_pushed])
        return (c[old_done] == "{}" and c[old_pushed] == "{}" and "room-old" not in keys(pg, db_url)
                and attempts_of(pg, db_url, old_pushed) == 0)
    wait_until(swept, timeout=30, interval=0.2, what="the retention sweep")
    # The same statements kept what is young or still owed.
    after = contents(pg, db_url, [young_done, old_open, old_dead, young_pushed])
    assert after == {k: before[k] for k in after}
    # Of a message that expires later, only what its expiry needs (when
    # and from whom: the delete it sends); of a reaction, its emoji (XMPP's
    # sets are made from them).  Until the thirtieth session both were
    # kept whole: a far expiry, or a reaction's unknown members, kept a
    # peer's content for ever.
    trimmed = contents(pg, db_url, [old_expiring, old_reaction])
    assert json.loads(trimmed[old_expiring]) == {"type": "message", "sender": alice, "content": {"expires": later}}
    assert json.loads(trimmed[old_reaction]) == {"type": "reaction", "content": {
        "parts": [{"type": "text/plain", "body": "\u2764"}]}}
    assert "room-young" in keys(pg, db_url)
    assert attempts_of(pg, db_url, young_pushed) == 1
    # Rows stay: the senders still see the status, the trace resolves.
    assert pg.psql("SELECT count(*) FROM events", db_url) == "8"
    st = a.call("GET", f"/v1/messages/{old_done}")
    assert st.status_code == 200, st.text
    assert st.json()["recipients"] == [{"recipient": "mimi://tg.example", "status": "delivered"}]
    st = b.call("GET", f"/v1/messages/{old_pushed}").json()
    assert [r["status"] for r in st["recipients"]] == ["delivered"]
    tr = d.admin("GET", f"/messages/{old_done}")
    assert tr.status_code == 200 and tr.json()["content_deleted"] is True, tr.text
    # a run may log the key alone: age() committed between its content's statement and its keys'
    rec = d.wait_for(lambda r: r.get("msg") == "old data removed" and int(r.get("contents_erased", 0)) >= 1)
    assert int(rec["contents_erased"]) >= 1
    # The message still owed is pulled with its content; once acknowledged,
    # it is done, and its content goes too.
    got = pull_and_ack(b, cursor)
    assert [e["id"] for e in got["events"]][:1] == [old_open]
    assert got["events"][0]["content"]["parts"][0]["body"] == "old, not pulled yet"
    wait_until(lambda: contents(pg, db_url, [old_open])[old_open] == "{}", timeout=30, interval=0.2,
               what="the pulled message erased")
    assert contents(pg, db_url, [old_dead])[old_dead] == before[old_dead]
    srv.close()


def test_content_goes_at_content_days_whatever_its_expiry_and_rows_at_rows_days(make_daemon, db_url, pg):
    """A review (r4) kept content for ever: a message expiring in the year
    33658 kept its text past content_days and its row past rows_days, and
    a reaction its unknown members (60 KB).  Now content goes at whichever
    comes first, its expiry or content_days (what the expiry needs is
    kept: when, and from whom); a reaction keeps only its emoji; and a
    message whose expiry is still to come at rows_days is taken back then
    (its expiry brought forward), and deleted with its family."""
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    alice = a.user("alice")
    ctrl = a.send(rm["id"], alice, "control").json()["id"]
    far = a.send(rm["id"], alice, "", content={
        "parts": [{"type": "text/plain", "body": "kept for ever"}], "expires": 999999999999999}).json()["id"]
    fat = a.call("POST", f"/v1/rooms/{rm['id']}/messages", {
        "type": "reaction", "sender": alice, "x": {"blob": "x" * 30000}, "content": {
            "in_reply_to": ctrl, "disposition": "reaction", "blob": "x" * 30000,
            "parts": [{"type": "text/plain", "body": "\u2764", "lang": "x" * 100}]}}, idem="fat-reaction")
    assert fat.status_code == 202, fat.text
    fat = fat.json()["id"]
    pull_and_ack(b)
    wait_until(lambda: all(delivered(pg, db_url, m) for m in (ctrl, far, fat)), what="the pull ack")
    age(pg, db_url, events=[ctrl, far, fat])
    wait_until(lambda: contents(pg, db_url, [ctrl, far, fat]) == {
        ctrl: "{}",
        far: json.dumps({"type": "message", "sender": alice, "content": {"expires": 999999999999999}}),
        fat: json.dumps({"type": "reaction", "content": {"parts": [{"body": "\u2764", "type": "text/plain"}]}},
                        ensure_ascii=False)},
        timeout=30, interval=0.2, what="the contents erased")
    # Past rows_days: taken back (its expiry brought forward to now; no
    # local network here to take it back from), then deleted with the
    # rest of the family.
    age(pg, db_url, older=[ctrl, far, fat])
    wait_until(lambda: not any(event_exists(pg, db_url, m) for m in (ctrl, far, fat)), timeout=30, interval=0.2,
               what="the old events deleted")
    rec = d.wait_for(lambda r: r.get("msg") == "expired messages taken back")
    assert int(rec.get("messages", 1)) >= 1
    srv.close()


def rows_of(pg, db_url, msg):
    """The event's rows: itself, its outbox rows, their attempts, its native ids."""
    return [int(pg.psql(q % msg, db_url)) for q in (
        "SELECT count(*) FROM events WHERE public_id = '%s'",
        "SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id WHERE e.public_id = '%s'",
        "SELECT count(*) FROM delivery_attempts d JOIN outbox o ON o.id = d.outbox_id "
        "JOIN events e ON e.id = o.event_id WHERE e.public_id = '%s'",
        "SELECT count(*) FROM event_native_ids n JOIN events e ON e.id = n.event_id WHERE e.public_id = '%s'")]


def test_old_done_events_are_deleted_with_their_rows_and_what_is_owed_is_kept(make_daemon, db_url, pg):
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    alice, bob = a.user("alice"), b.user("bob")
    # To the pull peer, pulled and acknowledged: a message, one that a
    # younger reply names, and one with an old reply still owed.
    done = a.send(rm["id"], alice, "old, delivered").json()["id"]
    replied = a.send(rm["id"], alice, "old, replied to").json()["id"]
    reply = a.send(rm["id"], alice, "young reply", content={
        "parts": [{"type": "text/plain", "body": "young reply"}], "in_reply_to": replied}).json()["id"]
    owed_reply_to = a.send(rm["id"], alice, "old, its reply not pulled yet").json()["id"]
    cursor = pull_and_ack(b)["next"]
    wait_until(lambda: all(delivered(pg, db_url, m) for m in (done, replied, reply, owed_reply_to)),
               what="the pull ack")
    owed_reply = a.send(rm["id"], alice, "old reply, not pulled yet", content={
        "parts": [{"type": "text/plain", "body": "old reply, not pulled yet"}],
        "in_reply_to": owed_reply_to}).json()["id"]
    # Still owed: not pulled yet (pending), held, dead.
    pending = a.send(rm["id"], alice, "old, not pulled yet").json()["id"]
    held = a.send(rm["id"], alice, "old, held").json()["id"]
    dead = a.send(rm["id"], alice, "old, dead letter").json()["id"]
    for m, state in ((held, "held"), (dead, "dead")):
        pg.psql(f"UPDATE outbox SET state = '{state}' WHERE event_id = "
                f"(SELECT id FROM events WHERE public_id = '{m}')", db_url)
    # To the push peer: a message with a delivery attempt (younger than
    # attempts_days: it goes with its row), a reaction to it and an edit of
    # it (its family: they go with it, XMPP's sets of reactions and a
    # message's latest version are made from them).
    pushed = b.send(rm["id"], bob, "old, pushed").json()["id"]
    reaction = b.call("POST", f"/v1/rooms/{rm['id']}/messages", {
        "type": "reaction", "sender": bob, "content": {
            "in_reply_to": pushed, "disposition": "reaction",
            "parts": [{"type": "text/plain", "body": "\u2764"}]}}, idem="old-reaction").json()["id"]
    edit = b.call("POST", f"/v1/rooms/{rm['id']}/messages", {
        "type": "edit", "sender": bob, "content": {
            "replaces": pushed, "parts": [{"type": "text/plain", "body": "old, pushed (edited)"}]}},
        idem="old-edit").json()["id"]
    srv.wait_events(3)
    wait_until(lambda: all(delivered(pg, db_url, m) for m in (pushed, reaction, edit))
               and attempts_of(pg, db_url, pushed) == 1, what="the pushes")
    # A native id, as the Matrix adapter keeps one for a message it sent.
    pg.psql("INSERT INTO event_native_ids (event_id, network, kind, native_id) "
            f"SELECT id, 'matrix', 'event_id', '$old:hs.example' FROM events WHERE public_id = '{done}'", db_url)
    assert rows_of(pg, db_url, done) == [1, 1, 0, 1]
    assert rows_of(pg, db_url, pushed) == [1, 1, 1, 0]
    kept = [pending, held, dead, owed_reply, owed_reply_to]
    age(pg, db_url, older=[done, replied, owed_reply_to, owed_reply, pending, held, dead, pushed, reaction, edit])

    # The message, its reaction and its edit go (together, a family),
    # with their rows.
    wait_until(lambda: all(rows_of(pg, db_url, m) == [0, 0, 0, 0] for m in (done, replied, pushed, reaction, edit)),
               timeout=30, interval=0.2, what="the old events deleted")
    rec = d.wait_for(lambda r: r.get("msg") == "old data removed" and int(r.get("events_deleted", 0)) > 0)
    assert int(rec["events_deleted"]) >= 1
    # What is owed stays, with its rows; so does the message an owed reply names.
    for m in kept:
        assert rows_of(pg, db_url, m)[:2] == [1, 1], m
    assert pg.psql(f"SELECT string_agg(o.state, ',' ORDER BY o.id) FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id IN ('{pending}', '{held}', '{dead}')", db_url) == "pending,held,dead"
    # The young reply stays; its reference to the deleted message is cleared.
    assert pg.psql(f"SELECT in_reply_to_id IS NULL FROM events WHERE public_id = '{reply}'", db_url) == "t"
    assert pg.psql("SELECT count(*) FROM events WHERE id NOT IN (SELECT id FROM events) "
                   "OR replaces_id NOT IN (SELECT id FROM events) OR in_reply_to_id NOT IN (SELECT id FROM events)",
                   db_url) == "0"
    # A deleted message is as unknown as one never sent: to its sender, in
    # the trace, and as the target of a reply.
    st = a.call("GET", f"/v1/messages/{done}")
    assert st.status_code == 404 and st.json()["code"] == "unknown_message", st.text
    assert d.admin("GET", f"/messages/{done}").status_code == 404
    r = a.send(rm["id"], alice, "", content={"parts": [{"type": "text/plain", "body": "late reply"}],
                                             "in_reply_to": done})
    assert r.status_code == 400 and "in_reply_to names no message" in r.text, r.text
    # Once pulled, the owed messages are done, and go too.
    got = pull_and_ack(b, cursor)
    assert {pending, owed_reply} <= {e["id"] for e in got["events"]}
    wait_until(lambda: all(rows_of(pg, db_url, m)[0] == 0 for m in (pending, owed_reply, owed_reply_to)),
               timeout=30, interval=0.2, what="the pulled messages deleted")
    assert rows_of(pg, db_url, dead)[:2] == [1, 1] and rows_of(pg, db_url, held)[:2] == [1, 1]
    srv.close()


def event_exists(pg, db_url, msg):
    return pg.psql(f"SELECT count(*) FROM events WHERE public_id = '{msg}'", db_url) == "1"


def dangling(pg, db_url):
    """Events whose reference names an event that is not there."""
    return int(pg.psql("SELECT count(*) FROM events e WHERE (e.replaces_id IS NOT NULL AND NOT EXISTS "
                       "(SELECT 1 FROM events t WHERE t.id = e.replaces_id)) OR (e.in_reply_to_id IS NOT NULL "
                       "AND NOT EXISTS (SELECT 1 FROM events t WHERE t.id = e.in_reply_to_id))", db_url))


def react(peer, room, sender, target, body="\u2764"):
    return peer.call("POST", f"/v1/rooms/{room}/messages", {
        "type": "reaction", "sender": sender, "content": {
            "in_reply_to": target, "disposition": "reaction",
            "parts": [{"type": "text/plain", "body": body}]}}, idem=f"react-{target}").json()["id"]


def remove(peer, room, sender, target):
    return peer.call("POST", f"/v1/rooms/{room}/messages", {
        "type": "delete", "sender": sender, "content": {"replaces": target}}, idem=f"remove-{target}").json()["id"]


def written_while_deleted(pg, db_url, target, write):
    """write() (a request that writes events naming the event whose public
    id is target) while the retention sweep deletes target, as its answer.
    The sweep's transaction is played by a psql session, deterministically:
    it locks target as the sweep does (FOR UPDATE), write comes and, the
    writer locking what it names, waits for it; the session deletes target
    and commits."""
    sweep = subprocess.Popen(["psql", db_url, "-v", "ON_ERROR_STOP=1", "-qAt"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {}
    writer = None
    try:
        sweep.stdin.write(f"BEGIN;\nSELECT 'locked' FROM events WHERE public_id = '{target}' FOR UPDATE;\n")
        sweep.stdin.flush()
        assert sweep.stdout.readline().strip() == "locked"
        writer = threading.Thread(target=lambda: done.update(r=write()))
        writer.start()
        # The writer waits for the target's lock (without that lock, it
        # has answered already).
        wait_until(lambda: not writer.is_alive() or pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'", db_url) != "0", timeout=15, what="the writer")
        sweep.stdin.write(f"DELETE FROM outbox WHERE event_id = (SELECT id FROM events WHERE public_id = '{target}');\n"
                          f"DELETE FROM events WHERE public_id = '{target}';\nCOMMIT;\n")
        sweep.stdin.close()
        assert sweep.wait(30) == 0, sweep.stderr.read()
        writer.join(30)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        if writer:
            writer.join(30)
    return done["r"]


def test_a_reference_to_an_event_being_deleted_is_refused(make_daemon, db_url, pg):
    """A reply, edit or reaction written while the sweep deletes the event
    it names is refused as one naming an unknown message is (and so from
    Matrix and XMPP, which write through the same statement), not stored
    with a reference to the deleted event; the other items of its job are
    written.  The writer locks the target it names (FOR KEY SHARE): the
    sweep passes over a target so locked, and a writer that comes while
    the sweep holds the target waits for it and finds it gone.  Before,
    the writer took the target's id as it had read it earlier and stored
    it after the deletion (a review's finding)."""
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    alice = a.user("alice")
    target = a.send(rm["id"], alice, "old, being deleted").json()["id"]
    text = [{"type": "text/plain", "body": "late"}]
    items = [{"idempotency_key": f"late-{k}", "room": rm["uri"], "event": {"sender": alice, **ev}}
             for k, ev in enumerate([
                 {"type": "message", "content": {"parts": text, "in_reply_to": target}},
                 {"type": "edit", "content": {"parts": text, "replaces": target}},
                 {"type": "reaction", "content": {"parts": [{"type": "text/plain", "body": "\u2764"}],
                                                  "in_reply_to": target, "disposition": "reaction"}},
                 {"type": "message", "content": {"parts": text}}])]
    r = written_while_deleted(pg, db_url, target, lambda: a.call("POST", "/v1/batch", {"events": items}))
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [(x["status"], x.get("http_status"), x.get("code"), x.get("detail")) for x in got[:3]] == [
        ("refused", 400, "invalid_body", "content.in_reply_to names no message of this room"),
        ("refused", 400, "invalid_body", "content.replaces names no message of this room"),
        ("refused", 400, "invalid_body", "content.in_reply_to names no message of this room")], got
    assert got[3]["status"] == "accepted", got
    assert pg.psql("SELECT count(*) FROM events", db_url) == "1"
    assert dangling(pg, db_url) == 0
    srv.close()


def test_a_message_goes_only_with_its_whole_family(make_daemon, db_url, pg):
    """A message is deleted only with its reactions, edits and deletes
    (and the reactions' removals), as one unit, once every one of them is
    old enough and delivered: XMPP's reactions are whole sets named by the
    message's id (XEP-0444), and a message's latest version and whether it
    was deleted are made from its edits and deletes.  Before, a message
    went once its reactions' own rows were done, while a removal of one
    was still owed (a dead letter replayed later never reached XMPP,
    though its row was marked delivered), or a reaction was younger (a
    review's finding)."""
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    alice = a.user("alice")
    room = rm["id"]
    # m1: a reaction, and its removal still owed (a dead letter).
    m1 = a.send(room, alice, "old, a removal owed").json()["id"]
    r1 = react(a, room, alice, m1)
    d1 = remove(a, room, alice, r1)
    # m2: a younger reaction.
    m2 = a.send(room, alice, "old, a young reaction").json()["id"]
    r2 = react(a, room, alice, m2)
    # m3: a reaction, its removal and an edit, all old and delivered.
    m3 = a.send(room, alice, "old, all done").json()["id"]
    r3 = react(a, room, alice, m3)
    d3 = remove(a, room, alice, r3)
    e3 = a.call("POST", f"/v1/rooms/{room}/messages", {"type": "edit", "sender": alice, "content": {
        "replaces": m3, "parts": [{"type": "text/plain", "body": "old, all done (edited)"}]}},
        idem="e3").json()["id"]
    # A witness: old, on its own.
    w = a.send(room, alice, "old, alone").json()["id"]
    family1, family2, family3 = [m1, r1, d1], [m2, r2], [m3, r3, d3, e3]
    everything = family1 + family2 + family3 + [w]
    pull_and_ack(b)
    wait_until(lambda: all(delivered(pg, db_url, m) for m in everything), what="the pull ack")
    pg.psql("UPDATE outbox SET state = 'dead' WHERE event_id = "
            f"(SELECT id FROM events WHERE public_id = '{d1}')", db_url)
    age(pg, db_url, older=[m for m in everything if m != r2])

    # The run that deletes the witness decides the families too (one
    # statement, one snapshot): m3's goes whole, the others stay whole.
    wait_until(lambda: not event_exists(pg, db_url, w), timeout=30, interval=0.2, what="the witness deleted")
    assert [m for m in family3 if event_exists(pg, db_url, m)] == []
    assert [m for m in family1 + family2 if not event_exists(pg, db_url, m)] == []
    assert dangling(pg, db_url) == 0
    # The removal given up on (discarded), m1's family goes, whole.
    row = pg.psql("SELECT o.id FROM outbox o JOIN events e ON e.id = o.event_id "
                  f"WHERE e.public_id = '{d1}'", db_url)
    assert d.admin("POST", f"/outbox/{row}/discard").status_code == 200
    wait_until(lambda: not event_exists(pg, db_url, m1), timeout=30, interval=0.2, what="m1 deleted")
    assert [m for m in family1 if event_exists(pg, db_url, m)] == []
    # The young reaction grown old, m2's goes too.
    assert [m for m in family2 if not event_exists(pg, db_url, m)] == []
    age(pg, db_url, older=[r2])
    wait_until(lambda: not event_exists(pg, db_url, m2), timeout=30, interval=0.2, what="m2 deleted")
    assert not event_exists(pg, db_url, r2)
    assert pg.psql("SELECT count(*) FROM events", db_url) == "0"
    srv.close()


def add_old_attempt(pg, db_url):
    pg.psql("INSERT INTO delivery_attempts (outbox_id, attempt, started_at, finished_at, ok) "
            f"SELECT min(id), 99, {OLD}, {OLD}, true FROM outbox", db_url)


def old_attempt_gone(pg, db_url):
    return pg.psql("SELECT count(*) FROM delivery_attempts WHERE attempt = 99", db_url) == "0"


def add_old_key(pg, db_url):
    pg.psql("INSERT INTO idempotency_keys (scope, key, request_hash, created_at) "
            f"VALUES ('peer:gk', 'witness', sha256('w'::bytea), {OLD_KEY})", db_url)


@pytest.mark.parametrize("kept", ["content", "idempotency", "attempts", "rows"])
def test_a_setting_of_zero_keeps_that_kind_for_ever(make_daemon, db_url, pg, kept):
    d = start(make_daemon, db_url, **{f"{kept}_days": 0})
    a, b, rm, srv = peers(d)
    pulled = a.send(rm["id"], a.user("alice"), "pulled").json()["id"]
    pull_and_ack(b)
    pushed = b.send(rm["id"], b.user("bob"), "pushed").json()["id"]
    srv.wait_events(1)
    wait_until(lambda: delivered(pg, db_url, pulled) and attempts_of(pg, db_url, pushed) == 1,
               what="the deliveries")
    assert a.create_room([a.user("x"), b.user("y")], idem="room-old").status_code == 201
    before = contents(pg, db_url, [pulled, pushed])
    # Rows: past retention.rows_days too (which would delete them, and
    # their contents, keys and attempts with them, but for the 0).
    when = "older" if kept == "rows" else "events"
    age(pg, db_url, keys=["room-old"], attempts_of=[pushed], **{when: [pulled, pushed]})
    # The other kinds go ...
    gone = {"content": lambda: set(contents(pg, db_url, [pulled, pushed]).values()) == {"{}"},
            "idempotency": lambda: "room-old" not in keys(pg, db_url),
            "attempts": lambda: attempts_of(pg, db_url, pushed) == 0,
            "rows": lambda: contents(pg, db_url, [pulled, pushed]) == {}}
    wait_until(lambda: all(f() for k, f in gone.items() if k not in (kept, "rows")), timeout=30, interval=0.2,
               what="the other kinds removed")
    # ... and a witness made old after that goes too: a whole sweep ran
    # after the aging, and it kept the kind set to 0.
    if kept == "attempts":
        add_old_key(pg, db_url)
        wait_until(lambda: "witness" not in keys(pg, db_url), timeout=30, interval=0.2, what="the witness")
    else:
        add_old_attempt(pg, db_url)
        wait_until(lambda: old_attempt_gone(pg, db_url), timeout=30, interval=0.2, what="the witness")
    assert not gone[kept]()
    if kept == "content":
        assert contents(pg, db_url, [pulled, pushed]) == before
    if kept == "rows":
        assert pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id "
                       f"WHERE e.public_id IN ('{pulled}', '{pushed}')", db_url) == "2"
    srv.close()


def audit_ids(pg, db_url):
    return {int(i) for i in pg.psql("SELECT id FROM audit_log", db_url).split()}


def consent(d, peer, remote):
    r = d.admin("POST", "/consents", json={"user": "mimi://example.org/u/alice", "subject_kind": "user",
                                          "subject": peer.user(remote), "state": "blocked"})
    assert r.ok, r.text
    return int(d.admin("GET", "/audit?action=consent.set").json()["rows"][-1]["id"])


@pytest.mark.parametrize("days", [1, 0])
def test_old_audit_records_are_deleted(make_daemon, db_url, pg, days):
    """retention.audit_days: records older than that go, younger ones stay;
    a consent change an XMPP component has not yet followed into its
    rosters (its cursor in xmpp_roster_sync below the record) stays until
    it has, and so does a consent request's expiry (consent.expire, since
    the thirty-first session); 0 (the default) keeps the log for ever."""
    d = start(make_daemon, db_url, audit_days=days)
    a, b, rm, srv = peers(d)  # peer.create, twice
    assert d.admin("POST", "/rules", json={"scope": "domain", "pattern": "bad.example", "mode": "deny"}).ok
    followed = consent(d, a, "mallory")
    owed = consent(d, a, "trent")
    expiry = int(pg.psql("INSERT INTO audit_log (actor, action, subject, details) VALUES ('policy', "
                         "'consent.expire', 'mimi://example.org/u/alice', '{\"request\": 1}') RETURNING id",
                         db_url).split()[0])
    # A component that sent the first change's unsubscribes, not yet the
    # second's (its stream is down).
    pg.psql(f"INSERT INTO xmpp_roster_sync (component, audit_id) VALUES ('xmpp.example.org', {followed})", db_url)
    old = audit_ids(pg, db_url)
    assert {followed, owed, expiry} <= old and len(old) >= 6
    pg.psql("UPDATE audit_log SET at = now() - interval '2 days' WHERE id IN (%s)"
            % ",".join(str(i) for i in old), db_url)
    assert d.admin("POST", "/rules", json={"scope": "domain", "pattern": "worse.example", "mode": "deny"}).ok
    young = audit_ids(pg, db_url) - old
    assert len(young) == 1
    if days:
        wait_until(lambda: audit_ids(pg, db_url) == young | {owed, expiry}, timeout=30, interval=0.2,
                   what="the old records deleted")
        assert int(d.wait_for(lambda r: r.get("msg") == "old data removed")["audit_records"]) == len(old) - 2
        # Followed now: the change and the expiry go too.
        pg.psql(f"UPDATE xmpp_roster_sync SET audit_id = {expiry}", db_url)
        wait_until(lambda: audit_ids(pg, db_url) == young, timeout=30, interval=0.2,
                   what="the followed change deleted")
    else:
        # A witness made old after the aging goes: a whole sweep ran since.
        add_old_key(pg, db_url)
        wait_until(lambda: "witness" not in keys(pg, db_url), timeout=30, interval=0.2, what="the witness")
        assert audit_ids(pg, db_url) == old | young
    srv.close()


def retention_metric(d, name, kind):
    for line in d.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{kind="{kind}"}} '):
            return float(line.split()[-1])
    return None


def test_a_failing_kind_does_not_stop_the_others(make_daemon, db_url, pg):
    """The kinds ran as one chain that stopped at the first failure: one
    failing kind (here the events' deletion, then the idempotency keys')
    kept every later one from running, the erasure of old content (the
    privacy setting) among them (until the thirty-first session). Each
    now runs on its own, a failure is logged with its kind and counted."""
    d = start(make_daemon, db_url, audit_days=1)
    a, b, rm, srv = peers(d)
    pg.psql("CREATE FUNCTION test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF TG_TABLE_NAME = 'idempotency_keys' OR current_query() LIKE '%{content,expires}%' THEN "
            "RAISE EXCEPTION 'test: % refused', TG_TABLE_NAME; END IF; RETURN NULL; END $$; "
            "CREATE TRIGGER test_fail BEFORE UPDATE ON events FOR EACH STATEMENT EXECUTE FUNCTION test_fail(); "
            "CREATE TRIGGER test_fail BEFORE DELETE ON idempotency_keys FOR EACH STATEMENT "
            "EXECUTE FUNCTION test_fail()", db_url)
    msg = a.send(rm["id"], a.user("alice"), "old, delivered").json()["id"]
    pull_and_ack(b)
    wait_until(lambda: delivered(pg, db_url, msg), what="the pull ack")
    add_old_key(pg, db_url)
    pg.psql("UPDATE audit_log SET at = now() - interval '2 days'", db_url)
    age(pg, db_url, events=[msg])
    wait_until(lambda: contents(pg, db_url, [msg])[msg] == "{}", timeout=30, interval=0.2,
               what="the content erased after the events' kind failed")
    wait_until(lambda: pg.psql("SELECT count(*) FROM audit_log", db_url) == "0", timeout=30, interval=0.2,
               what="the audit records deleted after the keys' kind failed")
    assert "witness" in keys(pg, db_url)
    for kind in ("events", "idempotency_keys"):
        rec = d.wait_for(lambda r, k=kind: r.get("msg") == "retention sweep failed" and r.get("kind") == k)
        assert "refused" in rec["detail"], rec
    assert {r.get("kind") for r in d.records if r.get("msg") == "retention sweep failed"} == {
        "events", "idempotency_keys"}
    # a sweep's counts are added once all its kinds ran, after the audit's commit (session 35)
    wait_until(lambda: (retention_metric(d, "causeway_retention_removed_total", "audit") or 0) >= 1,
               what="the sweep counted")
    assert retention_metric(d, "causeway_retention_failures_total", "events") >= 1
    assert retention_metric(d, "causeway_retention_failures_total", "idempotency_keys") >= 1
    assert retention_metric(d, "causeway_retention_failures_total", "content") == 0
    assert retention_metric(d, "causeway_retention_removed_total", "content") >= 1
    assert retention_metric(d, "causeway_retention_removed_total", "audit") >= 1
    assert retention_metric(d, "causeway_retention_removed_total", "idempotency_keys") == 0
    srv.close()


def owed_backlog(make_daemon, db_url, pg, n, old, done_at, state="pending"):
    """n events accepted from old on (SQL), each owed to the pull peer (a
    row in state: pending, or in flight under the claim of a daemon gone
    for a day), and behind them msg_done1, accepted at done_at, whose
    deliveries are done (none)."""
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    alice = a.user("alice")
    owed = a.send(rm["id"], alice, "owed to the pull peer").json()["id"]
    assert pg.psql("SELECT count(*) FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{owed}' AND o.state = 'pending'", db_url) == "1"
    assert d.stop() == 0
    srv.close()
    # accepted a millisecond apart, as events come (a run reads the events
    # accepted at one instant whole: one transaction's, a batch of 1024 at most)
    pg.psql(copies(owed, "k", n, accepted_at=f"{old} + g * interval '1 millisecond'") + "; "
            "INSERT INTO outbox (event_id, destination, target_identity_id, room_id, state, claimed_by, "
            f"claimed_until) SELECT e.id, o.destination, o.target_identity_id, o.room_id, '{state}', "
            f"CASE WHEN '{state}' = 'in_flight' THEN 'gone' END, "
            f"CASE WHEN '{state}' = 'in_flight' THEN now() + interval '1 day' END FROM events e, outbox o "
            f"JOIN events s ON s.id = o.event_id WHERE s.public_id = '{owed}' AND e.public_id ~ '^msg_k[0-9]+$'; "
            + copies(owed, "done", 1, accepted_at=done_at), db_url)
    # analyzed once they are committed: until the fifty-eighth session the
    # ANALYZE ran in their transaction, their changes, counted at its
    # commit, were the table's changes since (n_mod_since_analyze: 40,001),
    # and autovacuum analyzed events again within its naptime (a minute),
    # in the middle of the test's runs
    pg.psql("ANALYZE", db_url)


def run_plans(make_daemon, db_url, pg, markers, runs=1, **retention):
    """The plans as run (auto_explain, JSON) of the statements containing
    one of markers in runs runs of the sweep at least by a daemon that
    starts and stops (one run: retention.interval_s an hour, nothing
    hurries a second; more: a run a second, each removing its witness);
    and the plans of the others, as (events' rows read, statement) read."""
    log = logged_plans(pg, db_url, analyze=True)
    pg.psql('ALTER DATABASE "%s" SET auto_explain.log_format = json' % db_url.split("?")[0].rsplit("/", 1)[1])
    start_at = os.path.getsize(log)
    add_old_key(pg, db_url)  # the first run's witness
    d = start(make_daemon, db_url, **({"interval_s": 3600} if runs == 1 else {}), **retention)
    for i in range(runs):
        if i:
            add_old_key(pg, db_url)
        wait_until(lambda: "witness" not in keys(pg, db_url), timeout=60, interval=0.2, what="the run")
    assert d.stop() == 0
    plans = [json.JSONDecoder().raw_decode(p, p.index("{"))[0] for p in plans_since(log, start_at, '"Plan"')]
    def mine(p):
        return any(m in p["Query Text"] for m in markers)
    others = [(rows_read(p["Plan"], "events"), p["Query Text"][:200]) for p in plans if not mine(p)]
    return [p["Plan"] for p in plans if mine(p)], [o for o in others if o[0]]


def test_content_behind_a_long_owed_backlog_is_erased(make_daemon, db_url, pg):
    """Each run of the content erasure read from the oldest event due,
    every one kept for an open delivery on the way (a pull peer that
    stopped pulling, dead letters): 100,000 such events took 0.34-0.63 s a
    run, some millions more than database.statement_timeout_ms, and then
    the statement failed every run and no one's content was erased any
    more (until the fifty-first session).  A run looks at 10,000 now, from
    where the last stopped, round the table.  Here 30,000 old events owed
    to the pull peer, and behind them one whose deliveries are done: one
    run (retention.interval_s an hour) reads fewer than half of them
    (before, it read them all); runs a second apart get to the one behind,
    erase it, and keep the owed ones.  The rows read are the content
    statement's own, from its plan as run (auto_explain): the table's
    counters (pg_stat_all_tables) took in the policy's re-check of the
    pending rows at start (policy_live.c) too: a first batch that read all
    of events, then batches of 500 for as long as the daemon ran, 17 to 42
    of them a run, so the difference of two runs failed 2 times in 3."""
    n = 30000
    owed_backlog(make_daemon, db_url, pg, n, OLD, "now() - interval '35 days'")
    plans, _ = run_plans(make_daemon, db_url, pg, ("UPDATE events e SET content = x.kept",), rows_days=0)
    runs = [rows_read(p, "events") for p in plans]
    assert len(runs) == 1 and runs[0] < n / 2, (runs, plans)  # the plans: how it read them
    d = start(make_daemon, db_url, rows_days=0)
    wait_until(lambda: contents(pg, db_url, ["msg_done1"])["msg_done1"] == "{}", timeout=60, interval=0.2,
               what="the content behind the backlog erased")
    assert pg.psql("SELECT count(*) FROM events WHERE public_id ~ '^msg_k[0-9]+$' AND content = '{}'::jsonb",
                   db_url) == "0"
    assert d.stop() == 0


def test_a_family_behind_a_long_owed_backlog_is_deleted(make_daemon, db_url, pg):
    """The events' deletion (retention.rows_days) found the families due
    oldest first, each run, every old event kept for an open delivery on
    the way (a pull peer that stopped pulling, dead letters): 100,000 such
    events took 0.7-1.3 s a run and 423,000 buffers, a million more than
    database.statement_timeout_ms, and then no row was deleted any more
    (until the fifty-first session).  A run looks at 10,000 old events
    now, from where the last stopped, round the table, as the content
    erasure does.  Here 40,000 events of 400 days, each owed to the pull
    peer (in flight under the claim of a daemon gone: no other part of
    the daemon reads them, as it reads pending rows and dead letters, a
    few thousand or more a run), and behind them one whose deliveries are
    done: one run (retention.interval_s an hour) reads fewer than 60% of
    them (the scan and the families due in it, 20,000; before, 120,000);
    runs a second apart get to the one behind and delete it, and keep the
    owed ones.  The rows read are the deletion's own, from its plan as run
    (auto_explain), as for the content erasure above: the table's
    counters (pg_stat_all_tables), less those of a run with rows_days
    off, once counted 54,533 on a loaded machine (a CI run of the
    fifty-seventh session's: something else read events then), where
    the plan reads 20,001, on an idle machine and on one kept busy."""
    n = 40000
    owed_backlog(make_daemon, db_url, pg, n, OLDER, "now() - interval '390 days'", state="in_flight")
    # the deletion's two statements: rows_lock_sql, then rows_sql if it locked any (here none is due)
    plans, others = run_plans(make_daemon, db_url, pg, ("fam(id, at) AS (SELECT id, accepted_at FROM c UNION",
                                                        "DELETE FROM events e USING x"), content_days=0)
    read = sum(rows_read(p, "events") for p in plans)
    print("events read by the deletion in one run:", read, "by other statements:", others)
    assert len(plans) == 1 and read < n * 0.6, (read, plans)
    assert event_exists(pg, db_url, "msg_done1")
    d = start(make_daemon, db_url, content_days=0)
    wait_until(lambda: not event_exists(pg, db_url, "msg_done1"), timeout=90, interval=0.2,
               what="the family behind the backlog deleted")
    assert pg.psql("SELECT count(*) FROM events WHERE public_id ~ '^msg_k[0-9]+$'", db_url) == str(n)
    assert d.stop() == 0


def rehosted(pg, db_url):
    return set(pg.psql("SELECT source FROM media_rehosted", db_url).splitlines())


@pytest.mark.parametrize("goes", ["content", "rows", "expiry"])
def test_a_files_rehosting_record_goes_with_its_messages_content(make_daemon, db_url, pg, goes):
    """A peer's file re-hosted on the Matrix homeserver is remembered in
    media_rehosted (its URL, digest, size, for whom, its mxc:// URI): the
    message's content, which goes when the message's does, at
    retention.content_days, at retention.rows_days (content_days 0) or at
    its expiry.  Until the forty-fifth session it was kept for ever.  The
    rows are made here with SQL as the Matrix adapter makes them
    (mx_media.c; the re-hosting itself is test_matrix_media.py's); a file
    of another message stays."""
    d = start(make_daemon, db_url, **({"content_days": 0} if goes == "rows" else {}))
    a, b, rm, srv = peers(d)
    alice = a.user("alice")
    files = {k: f"https://media.wa.example/f/{k}.png" for k in ("gone", "kept")}

    def att(k):
        return [{"content_type": "image/png", "url": files[k], "size": 10}]
    # an hour on, brought to now once the rows are made: expiring on its
    # own in seconds, it could go before they are, on a slow machine
    extra = {"expires": int(time.time() * 1000) + 3600000} if goes == "expiry" else {}
    msg = a.send(rm["id"], alice, "", content={"parts": [{"type": "text/plain", "body": "a file"}],
                                               "attachments": att("gone"), **extra}).json()["id"]
    other = a.send(rm["id"], alice, "", content={"parts": [{"type": "text/plain", "body": "another"}],
                                                 "attachments": att("kept")}).json()["id"]
    pull_and_ack(b)
    wait_until(lambda: all(delivered(pg, db_url, m) for m in (msg, other)) or goes == "expiry", what="the pull ack")
    pg.psql("INSERT INTO media_rehosted (network, source, sha256, native_uri, size, fetched_for) SELECT 'matrix', "
            "s, repeat('a', 64), 'mxc://hs.example/' || md5(s || f), 10, f FROM unnest(ARRAY['%s', '%s']) s, "
            "unnest(ARRAY['wa.example', '']) f" % (files["gone"], files["kept"]), db_url)
    assert rehosted(pg, db_url) == set(files.values())
    if goes == "content":
        age(pg, db_url, events=[msg])
    elif goes == "rows":
        age(pg, db_url, older=[msg])
    else:
        pg.psql("UPDATE events SET content = jsonb_set(content, '{content,expires}', "
                "to_jsonb((extract(epoch FROM clock_timestamp()) * 1000)::bigint)) WHERE public_id = '%s'" % msg,
                db_url)
    wait_until(lambda: rehosted(pg, db_url) == {files["kept"]}, timeout=30, interval=0.2,
               what="the file's record forgotten")
    # the message's content (or row) went in the same statement
    assert contents(pg, db_url, [msg]).get(msg, "{}") == "{}"
    assert int(pg.psql("SELECT count(*) FROM media_rehosted", db_url)) == 2  # the other's, for both signers
    assert json.loads(contents(pg, db_url, [other])[other])["content"]["attachments"] == att("kept")
    srv.close()


def test_a_files_rehosting_record_goes_when_its_message_is_dropped(make_daemon, db_url, pg):
    """A message dropped by the policy before it reached anyone (a deny
    rule of its sender's domain while it waited at the pulling peer) has
    its content deleted, and since the forty-seventh session's review the
    record of its file re-hosted on the homeserver (media_rehosted) goes
    with it, as it does at retention.content_days: before, the record (the
    sender's URL of the file, its digest, size, for whom) stayed for ever,
    its message gone. Another file's record stays."""
    d = start(make_daemon, db_url)
    a, b, rm, srv = peers(d)
    files = {k: f"https://media.wa.example/f/{k}.png" for k in ("dropped", "other")}
    msg = a.send(rm["id"], a.user("alice"), "", content={
        "parts": [{"type": "text/plain", "body": "a file"}],
        "attachments": [{"content_type": "image/png", "url": files["dropped"], "size": 10}]}).json()["id"]
    assert pg.psql("SELECT string_agg(o.state, ',') FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{msg}'", db_url) == "pending"  # tg has not pulled it
    pg.psql("INSERT INTO media_rehosted (network, source, sha256, native_uri, size, fetched_for) SELECT 'matrix', "
            "s, repeat('a', 64), 'mxc://hs.example/' || md5(s), 10, 'wa.example' FROM unnest(ARRAY['%s', '%s']) s"
            % (files["dropped"], files["other"]), db_url)
    assert rehosted(pg, db_url) == set(files.values())
    r = d.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example", "mode": "deny"})
    assert r.status_code == 201, r.text
    wait_until(lambda: contents(pg, db_url, [msg]).get(msg) == "{}", timeout=30, what="the message dropped")
    assert pg.psql("SELECT string_agg(o.state, ',') FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{msg}'", db_url) == "dropped"
    assert rehosted(pg, db_url) == {files["other"]}
    srv.close()


@pytest.mark.parametrize("days, age", [({}, 40), ({"content_days": 0}, 400), ({"rows_days": 10}, 12),
                                       ({"content_days": 0, "rows_days": 0}, 400)])
def test_a_files_rehosting_record_no_content_took_goes_at_content_days(make_daemon, db_url, pg, days, age):
    """A record of media_rehosted goes with the content of the messages
    naming its file; but the Matrix adapter's media worker writes it once
    the file is uploaded, and a message that expired (or was dropped)
    while its file was fetched had its content and records gone before:
    the record then written was named by no content, and nothing ever
    removed it (until the forty-eighth session's review), nor the records
    of messages whose content went before the forty-fifth session.  Such
    a record (here one whose message is gone, and a record from before
    schema/027, fetched_for NULL) now goes retention.content_days or
    rows_days after it was made, whichever is sooner (kept with both 0); a
    younger one stays."""
    d = start(make_daemon, db_url, **days)
    old = {"https://media.wa.example/f/orphan.png": "'wa.example'",
           "https://media.wa.example/f/legacy.png": "NULL"}
    young = "https://media.wa.example/f/young.png"
    ages = {u: f"{age} days" for u in old}
    pg.psql("; ".join(
        "INSERT INTO media_rehosted (network, source, sha256, native_uri, size, fetched_for, created_at) "
        f"VALUES ('matrix', '{u}', repeat('a', 64), 'mxc://hs.example/{i}', 10, {f}, now() - interval '{ages[u]}')"
        for i, (u, f) in enumerate(old.items()))
        + f"; INSERT INTO media_rehosted (network, source, sha256, native_uri, size, fetched_for, created_at) "
        f"VALUES ('matrix', '{young}', repeat('b', 64), 'mxc://hs.example/y', 10, 'wa.example', "
        "now() - interval '5 days')", db_url)
    if days.get("rows_days") == 0:
        # kept for ever: a whole sweep after they were made (its witness,
        # an old key, counted once all its kinds ran) leaves them
        add_old_key(pg, db_url)
        d.wait_for(lambda r: r.get("msg") == "old data removed" and r.get("idempotency_keys") == "1", timeout=30)
        assert rehosted(pg, db_url) == set(old) | {young}
        assert retention_metric(d, "causeway_retention_removed_total", "media") == 0
        return
    wait_until(lambda: rehosted(pg, db_url) == {young}, timeout=30, interval=0.2,
               what="the old records forgotten")
    rec = d.wait_for(lambda r: r.get("msg") == "old data removed" and r.get("media_records") != "0")
    assert rec["media_records"] == "2", rec
    assert retention_metric(d, "causeway_retention_removed_total", "media") == 2


def copies(src, name, n, accepted_at="accepted_at", trimmed="content_trimmed"):
    """SQL making n copies of event src (a public id), msg_<name>1 to
    msg_<name><n> (native ids <name>1...), accepted_at and content_trimmed
    as given (SQL: the source's own by default).  They are found by
    public_id ~ '^msg_<name>[0-9]+$': a LIKE 'msg_<name>%' found a message
    the daemon named as well when its id's first character (base64url) was
    <name>, one test run in 64 (stop 69's CI: the young message of
    test_a_backlog_of_expiries_is_brought_forward_a_batch_a_second counted
    as one of the 1500 never brought forward)."""
    return ("INSERT INTO events (public_id, room_id, sender_id, type, content, origin_network, origin_native_id, "
            f"ts, accepted_at, content_trimmed) SELECT 'msg_{name}' || g, room_id, sender_id, type, content, "
            f"origin_network, '{name}' || g, ts, {accepted_at}, {trimmed} FROM events, generate_series(1, {n}) g "
            f"WHERE public_id = '{src}'")


def test_a_run_reads_no_reaction_it_trimmed_before(make_daemon, db_url, pg):
    """The content sweep trims an old reaction to its emoji (XMPP's whole
    sets of reactions are made from them), and the event stayed in the
    index the sweep read (events_content_kept_idx, content <> '{}'): each
    run read every old reaction ever trimmed (with rows_days 0, the
    default, all of them, for ever) to find none due, computing each one's
    kept content: 300,000 took 4.7-4.9 s a run, once a minute (until the
    forty-eighth session's review).  The sweep marks what it trims now
    (content_trimmed, 048) and reads events_content_due_idx, which a
    trimmed event leaves; one trimmed before 048 is read once more and
    marked, its content unchanged.  Counted in the events' rows the
    sweep's statements read over three runs (their plans as run), against
    3000 old trimmed reactions: fewer than one run's walk."""
    d = start(make_daemon, db_url, rows_days=0)
    a, b, rm, srv = peers(d)
    alice = a.user("alice")
    msg = a.send(rm["id"], alice, "hi").json()["id"]
    r = react(a, rm["id"], alice, msg)
    pull_and_ack(b)
    wait_until(lambda: delivered(pg, db_url, msg) and delivered(pg, db_url, r), what="the pull ack")
    age(pg, db_url, events=[msg, r])
    wait_until(lambda: contents(pg, db_url, [msg])[msg] == "{}", timeout=30, interval=0.2, what="the erasure")
    # trimmed as before: its type and its part's type and body; marked
    kept = {"type": "reaction", "content": {"parts": [{"type": "text/plain", "body": "\u2764"}]}}
    assert json.loads(contents(pg, db_url, [r])[r]) == kept

    def marked(pattern):
        return pg.psql("SELECT string_agg(DISTINCT content_trimmed::text, ',') FROM events "
                       f"WHERE public_id ~ '{pattern}'", db_url)
    assert marked(f"^{r}$") == "true" and marked(f"^{msg}$") == "false"
    n = 3000
    # trimmed before 048: not marked
    pg.psql(copies(r, "l", 5, trimmed="false"), db_url)
    wait_until(lambda: marked("^msg_l[0-9]+$") == "true", timeout=30, interval=0.2, what="the old trimmed ones marked")
    assert {json.dumps(json.loads(c), sort_keys=True) for c in pg.psql(
        "SELECT content FROM events WHERE public_id ~ '^msg_l[0-9]+$'", db_url).splitlines()} == {
        json.dumps(kept, sort_keys=True)}
    pg.psql(copies(r, "t", n, trimmed="true") + "; ANALYZE events", db_url)
    assert d.stop() == 0
    srv.close()
    read = events_read_in_three_runs(make_daemon, db_url, pg, rows_days=0)
    assert read < n, read
    print("events read in one run:", read)


# The retention sweep's statements that read events (retention.c): the
# content erasure (content_sql), the expiries brought forward
# (expiry_due_sql), the deletion (rows_lock_sql, then rows_sql).
RETENTION_EVENTS = ("UPDATE events e SET content = x.kept", "jsonb_set(e.content, '{content,expires}'",
                    "fam(id, at) AS (SELECT id, accepted_at FROM c UNION", "DELETE FROM events e USING x")


def events_read_in_three_runs(make_daemon, db_url, pg, **retention):
    """The events' rows the retention sweep's statements read (their plans
    as run, auto_explain) over three runs at least of a daemon started
    (with retention) after one stopped.  Until the fifty-eighth session
    the events' rows the daemon fetched by index (pg_stat_all_tables),
    every statement of every part of it, the policy's start and its
    sweeps among them, as the deletion's test above
    counted before."""
    plans, others = run_plans(make_daemon, db_url, pg, RETENTION_EVENTS, runs=3, **retention)
    assert len(plans) >= 3, plans  # a statement a run at least (the erasure, or the expiries brought forward)
    print("events read by other statements:", others)
    return sum(rows_read(p, "events") for p in plans)


def test_a_run_reads_no_young_message_that_expires(make_daemon, db_url, pg):
    """With rows_days on, each run brings forward the expiry of a message
    still to expire rows_days after it was accepted (the expiry sweep then
    takes it back, and its row can go).  It found those by the expiry
    index (or the primary key) and read every message whose expiry was
    still to come, however young, to find the few old enough: 300,000
    young ones took 0.3-1.1 s a run, once a minute (until the
    forty-eighth session's review).  It reads events_expiring_idx now
    (schema/049), the messages that expire by age: counted in the events'
    rows the sweep's statements read over three runs (their plans as
    run), against 3000 young messages that expire, fewer than one run's
    walk; and an old one among them is still taken back and deleted."""
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    alice = a.user("alice")
    young = a.send(rm["id"], alice, "", content={
        "parts": [{"type": "text/plain", "body": "for a while"}], "expires": 999999999999999}).json()["id"]
    pull_and_ack(b)
    wait_until(lambda: delivered(pg, db_url, young), what="the pull ack")
    assert d.stop() == 0
    srv.close()
    n = 3000
    pg.psql(copies(young, "y", n) + "; " + copies(young, "old", 1, accepted_at=OLDER) + "; ANALYZE events", db_url)
    read = events_read_in_three_runs(make_daemon, db_url, pg)
    assert read < n, read
    print("events read in one run:", read)
    # the old one brought forward, taken back (its content erased), or gone already
    assert pg.psql("SELECT coalesce(min(content::text), 'gone') FROM events WHERE public_id = 'msg_old1'",
                   db_url) in ("{}", "gone")
    assert event_exists(pg, db_url, "msg_y1") and event_exists(pg, db_url, young)


def test_a_backlog_of_expiries_is_brought_forward_a_batch_a_second(make_daemon, db_url, pg):
    """With rows_days on, a run brings forward the expiry of 1000 old
    messages still to expire (then taken back, and their rows deleted at
    the next run).  A full batch of any other kind has the next run come a
    second later, but this one was counted by none: a backlog of them
    (rows_days turned on, their content long erased at content_days) came
    forward at 1000 a retention.interval_s (a minute by default), not a
    second (until the fifty-first session).  Here 1500 old ones and
    interval_s an hour: all brought forward within seconds."""
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    alice = a.user("alice")
    far = a.send(rm["id"], alice, "", content={
        "parts": [{"type": "text/plain", "body": "for a while"}], "expires": 999999999999999}).json()["id"]
    pull_and_ack(b)
    wait_until(lambda: delivered(pg, db_url, far), what="the pull ack")
    assert d.stop() == 0
    srv.close()
    pg.psql(copies(far, "x", 1500, accepted_at=OLDER) + "; ANALYZE events", db_url)

    def still_to_come():
        return int(pg.psql("SELECT count(*) FROM events WHERE public_id ~ '^msg_x[0-9]+$' "
                           "AND event_expires(content) > (extract(epoch FROM now()) * 1000)::bigint", db_url))
    d = start(make_daemon, db_url, content_days=0, interval_s=3600)
    wait_until(lambda: still_to_come() == 0, timeout=30, interval=0.2, what="every expiry brought forward")
    assert d.stop() == 0


LOCAL = "mimi://example.org/u/"


def local_ids(pg, db_url):
    """The local parts of this provider's identities."""
    return set(pg.psql("SELECT localpart FROM identities WHERE is_local", db_url).split())


def test_local_names_a_peer_made_up_are_forgotten_once_nothing_refers_to_them(make_daemon, db_url, pg):
    """A peer makes an identity of this provider's for any name it names in
    a revoking consent update or a block (the row stays when the block is
    lifted; a grant or an unblock alone makes none since the forty-eighth
    session), or in a consent request held for it (policy.optin_default
    on), at policy.peer_updates_per_minute; until the forty-sixth session
    nothing removed one, and a peer could grow the table for months. The
    sweep forgets a local identity nothing refers to, 30 days after it was
    made (with its consent requests expired unanswered longer ago than the
    request window), whatever the settings; everything a user of this
    provider has keeps hers (an opt-in, a consent, a native id, a room, a
    report about her, a block either way, a request pending or expired
    within the window, one answered, a withdrawal an XMPP component still
    owes her roster). And a forgotten name is as one never seen: a peer
    naming it again gets the same answer and makes the row again."""
    d = start(make_daemon, db_url)
    a, b, rm, srv = peers(d)
    assert d.admin("PATCH", "/settings", json={"policy.optin_default": True}).ok

    def update(name, consent="granted"):
        r = a.call("POST", "/v1/consent/updates", {"user": a.user("wally"), "target": LOCAL + name,
                                                    "consent": consent})
        assert r.status_code == 202, r.text

    def known(name):
        """the name made an identity row, with no block left"""
        update(name, "revoked")
        update(name)

    def block(name, action="block"):
        r = a.call("POST", "/v1/blocks", {"blocker": a.user("wally"), "blocked": LOCAL + name, "action": action})
        assert r.status_code == 202, r.text

    def ask(name, who="wally"):
        r = a.call("POST", "/v1/consent/requests", {"requester": a.user(who), "target": LOCAL + name})
        assert r.status_code == 202, r.text

    update("g-granted")
    block("g-lifted")
    block("g-lifted", "unblock")
    update("g-revoked-lifted", "revoked")
    update("g-revoked-lifted", "granted")
    ask("g-asked")                      # expired unanswered, long ago: goes with its request
    block("k-blocked")                  # the peer's user's block stands
    ask("k-pending")                    # still asked
    ask("k-recent")                     # expired unanswered within the window
    ask("k-answered")                   # answered: her decision
    assert d.admin("POST", "/consents", json={"user": LOCAL + "k-answered", "subject_kind": "user",
                                              "subject": a.user("wally"), "state": "blocked"}).ok
    assert d.admin("POST", "/consents", json={"user": LOCAL + "k-answered", "subject_kind": "user",
                                              "subject": a.user("wally"), "state": "none"}).ok
    ask("k-owed")                       # expired, its withdrawal owed to an XMPP roster
    assert d.admin("POST", "/optins", json={"user": LOCAL + "k-optin", "network": "peer:gk",
                                            "opted_in": True}).ok
    assert d.admin("POST", "/consents", json={"user": LOCAL + "k-consent", "subject_kind": "user",
                                              "subject": a.user("wally"), "state": "allowed"}).ok
    assert a.create_room([a.user("wally"), LOCAL + "k-member"]).status_code == 201
    assert a.call("POST", "/v1/reports", {"reporter": a.user("wally"), "subject": LOCAL + "k-reported",
                                          "reason": "spam"}).status_code == 202
    known("k-native")                   # a user who talked to the bot (an adapter's native id)
    pg.psql("INSERT INTO identity_bindings (identity_id, network, native_id) SELECT id, 'matrix', "
            "'@k-native:example.org' FROM identities WHERE localpart = 'k-native'", db_url)
    assert a.call("POST", "/v1/reports", {"reporter": a.user("wally"), "subject": LOCAL + "k-reported",
                                          "reason": "spam"}).status_code == 202
    known("k-reported")                 # made after the reports, then bound to them
    pg.psql("UPDATE reports r SET subject_identity_id = i.id FROM identities i "
            "WHERE i.uri = r.subject_uri AND i.localpart = 'k-reported'", db_url)
    known("k-young")                    # made today
    made = local_ids(pg, db_url)
    assert "g-granted" not in made, made  # a grant alone made nothing
    assert {"g-lifted", "g-revoked-lifted", "g-asked", "k-blocked", "k-young"} <= made, made
    remote = pg.psql("SELECT count(*) FROM identities WHERE NOT is_local", db_url)
    # Made 40 days ago; the requests expired (the sweep's state), g-asked's
    # and k-owed's made 2 days ago, k-recent's an hour ago (the window: a day).
    pg.psql("UPDATE identities SET created_at = now() - interval '40 days' WHERE is_local "
            "AND localpart <> 'k-young'; "
            "UPDATE consent_requests q SET state = 'expired', created_at = now() - "
            "(CASE WHEN l.localpart = 'k-recent' THEN '1 hour' ELSE '2 days' END)::interval "
            "FROM identities l WHERE l.id = q.local_identity_id AND l.localpart IN ('g-asked', 'k-recent', 'k-owed'); "
            "INSERT INTO audit_log (actor, action, subject, details) SELECT 'policy', 'consent.expire', l.uri, "
            "jsonb_build_object('request', q.id) FROM consent_requests q "
            "JOIN identities l ON l.id = q.local_identity_id WHERE l.localpart = 'k-owed'; "
            "INSERT INTO xmpp_roster_sync (component, audit_id) VALUES ('xmpp.example.org', 0)", db_url)
    gone = {"g-lifted", "g-revoked-lifted", "g-asked"}
    wait_until(lambda: not gone & local_ids(pg, db_url), timeout=30, interval=0.2, what="the made-up names forgotten")
    assert local_ids(pg, db_url) == made - gone
    assert pg.psql("SELECT count(*) FROM identities WHERE NOT is_local", db_url) == remote
    # the sweep's counts are added once all its kinds ran, after the
    # names' delete is seen, and logged after that: the log is waited for
    # first.  Until the sixty-third session the count was read at once,
    # and a sweep slower over its last kinds than the test's two reads
    # (a loaded machine) showed none yet
    assert int(d.wait_for(lambda r: r.get("msg") == "old data removed"
                          and r.get("identities_forgotten") != "0")["identities_forgotten"]) == 3
    assert retention_metric(d, "causeway_retention_removed_total", "identities") == 3
    # The component follows: the withdrawal is no longer owed, and k-owed goes.
    pg.psql("UPDATE xmpp_roster_sync SET audit_id = (SELECT max(id) FROM audit_log)", db_url)
    wait_until(lambda: "k-owed" not in local_ids(pg, db_url), timeout=30, interval=0.2, what="k-owed forgotten")
    assert local_ids(pg, db_url) == made - gone - {"k-owed"}
    # A forgotten name is as one never seen.
    update("g-revoked-lifted", "revoked")
    block("g-lifted")
    assert {"g-revoked-lifted", "g-lifted"} <= local_ids(pg, db_url)
    srv.close()


def test_a_name_named_while_the_sweep_forgets_it_is_made_anew(make_daemon, db_url, pg):
    """The sweep locks the unused identities it forgets (FOR UPDATE SKIP
    LOCKED), then deletes them. A peer's block of that name meanwhile
    waits for it, and makes the row anew: identity_id locks the row it
    finds (FOR KEY SHARE), so one being deleted is waited for and not
    found. Without that lock the block read the old row's id, its insert
    waited on the foreign key's lock and failed once the row was gone: 409
    conflict, for a request any other name is answered 202."""
    d = start(make_daemon, db_url)
    a, b, rm, srv = peers(d)
    body = {"blocker": a.user("wally"), "blocked": LOCAL + "ghost", "action": "unblock"}
    assert a.call("POST", "/v1/blocks", dict(body, action="block")).status_code == 202
    assert a.call("POST", "/v1/blocks", body).status_code == 202  # the row stays, no block
    old = pg.psql("SELECT id FROM identities WHERE localpart = 'ghost'", db_url)
    sweep = HeldSession(db_url)  # the sweep's transaction, as retention.c takes it
    sweep.run(f"BEGIN; SELECT id FROM identities WHERE id = {old} FOR UPDATE SKIP LOCKED;")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            blocked = ex.submit(a.call, "POST", "/v1/blocks", dict(body, action="block"))
            wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                       "AND wait_event_type = 'Lock'", db_url) == "1",
                       what="the block waiting for the sweep's lock")
            sweep.run(f"DELETE FROM identities WHERE id = {old};")
            sweep.end()
            r = blocked.result()
        assert r.status_code == 202, r.text
    finally:
        sweep.end()
    new = pg.psql("SELECT id FROM identities WHERE localpart = 'ghost'", db_url)
    assert new and new != old
    assert pg.psql(f"SELECT count(*) FROM blocks WHERE blocked_id = {new}", db_url) == "1"
    srv.close()


def report_ids(pg, db_url):
    return {int(i) for i in pg.psql("SELECT id FROM reports", db_url).split()}


@pytest.mark.parametrize("days", [1, 0])
def test_handled_reports_go_at_reports_days_and_open_ones_stay(make_daemon, db_url, pg, days):
    """Every report was kept for ever until the forty-ninth session (a
    peer or a user can file many, each with a comment of up to 8 KB).
    retention.reports_days: a report the operator handled or dismissed
    longer ago than that goes, and never one made within
    policy.report_window_seconds (it counts toward the automatic limit:
    here 3 days, longer than the setting); an open report stays however
    old; 0 keeps them all."""
    d = start(make_daemon, db_url, reports_days=days)
    assert d.admin("PATCH", "/settings", json={"policy.report_window_seconds": 3 * 86400}).ok

    def report(name):
        r = d.admin("POST", "/reports", json={"subject": f"mimi://wa.example/u/{name}", "reason": "spam",
                                              "comment": "a comment"})
        assert r.status_code in (200, 201), r.text
        return r.json()["id"]

    ids = {n: report(n) for n in ("open-old", "handled-old", "dismissed-old", "handled-in-window", "handled-young")}
    for n in ("handled-old", "handled-in-window", "handled-young"):
        assert d.admin("POST", f"/reports/{ids[n]}/handle").status_code == 200
    assert d.admin("POST", f"/reports/{ids['dismissed-old']}/dismiss").status_code == 200
    # Made 10 days ago, handled 9; in the window: made and handled 2 days ago.
    pg.psql("UPDATE reports SET created_at = CASE "
            f"WHEN id = {ids['handled-in-window']} THEN now() - interval '2 days' "
            f"WHEN id = {ids['handled-young']} THEN created_at ELSE now() - interval '10 days' END, "
            f"handled_at = CASE WHEN handled_at IS NULL THEN NULL "
            f"WHEN id = {ids['handled-in-window']} THEN now() - interval '2 days' "
            f"WHEN id = {ids['handled-young']} THEN handled_at ELSE now() - interval '9 days' END", db_url)
    kept = {ids[n] for n in ("open-old", "handled-in-window", "handled-young")}
    if days:
        wait_until(lambda: report_ids(pg, db_url) == kept, timeout=30, interval=0.2, what="the old handled reports")
        assert int(d.wait_for(lambda r: r.get("msg") == "old data removed"
                              and r.get("reports") != "0")["reports"]) == 2
        wait_until(lambda: retention_metric(d, "causeway_retention_removed_total", "reports") == 2,
                   what="the sweep counted")
        listed = {r["id"] for r in d.admin("GET", "/reports").json()["rows"]}
        assert listed == kept
        # The window passes: the one handled in it goes too.
        pg.psql("UPDATE reports SET created_at = now() - interval '4 days', handled_at = now() - interval '4 days' "
                f"WHERE id = {ids['handled-in-window']}", db_url)
        wait_until(lambda: report_ids(pg, db_url) == kept - {ids["handled-in-window"]}, timeout=30, interval=0.2,
                   what="the report handled before the window")
    else:
        add_old_key(pg, db_url)
        wait_until(lambda: "witness" not in keys(pg, db_url), timeout=30, interval=0.2, what="the witness")
        assert report_ids(pg, db_url) == set(ids.values())
        assert retention_metric(d, "causeway_retention_removed_total", "reports") == 0


def request_states(pg, db_url):
    rows = pg.psql("SELECT l.localpart, q.state FROM consent_requests q JOIN identities l "
                   "ON l.id = q.local_identity_id", db_url)
    return dict(r.split("|") for r in rows.splitlines())


def test_consent_requests_answered_or_expired_go_at_consent_requests_days(make_daemon, db_url, pg):
    """Every consent request was kept for ever until the forty-ninth
    session (who asked whom, and when), whatever became of it.
    retention.consent_requests_days (1 here: taken as 7, the least): a
    request answered or expired longer ago than that goes; a pending one
    stays however old, as does one closed within the week (the Matrix
    bot's look back for expiry notices) or within the request window, one
    an XMPP component has yet to withdraw from a roster (an expiry's
    record, an operator's accept past its cursor). The policy's expiry
    of a request sets its decided_at (when it closed) since then."""
    d = start(make_daemon, db_url, consent_requests_days=1)
    a, b, rm, srv = peers(d)
    assert d.admin("PATCH", "/settings", json={"policy.optin_default": True}).ok
    names = ("pending-old", "accepted-old", "blocked-old", "expired-old", "expired-legacy", "expired-week",
             "expired-window", "expired-owed", "accepted-owed", "expiring")
    for n in names:
        r = a.call("POST", "/v1/consent/requests", {"requester": a.user("wally"), "target": LOCAL + n})
        assert r.status_code == 202, r.text
    assert set(request_states(pg, db_url)) == set(names)

    def of(n):
        return f"(SELECT id FROM identities WHERE localpart = '{n}')"

    def close(n, state, ago, decided=True):
        return (f"UPDATE consent_requests SET state = '{state}', created_at = now() - interval '{ago} days' - "
                f"interval '1 hour', expires_at = now() - interval '{ago} days', decided_at = "
                + (f"now() - interval '{ago} days'" if decided else "NULL")
                + f" WHERE local_identity_id = {of(n)}")

    assert d.admin("PATCH", "/settings", json={"policy.consent_request_window_seconds": 15 * 86400}).ok
    sql = ["UPDATE consent_requests SET created_at = now() - interval '40 days' "
           f"WHERE local_identity_id = {of('pending-old')}"]
    for n, state in (("accepted-old", "accepted"), ("blocked-old", "blocked"), ("expired-old", "expired"),
                     ("expired-owed", "expired"), ("accepted-owed", "accepted")):
        sql.append(close(n, state, 20))
    sql.append(close("expired-legacy", "expired", 20, decided=False))  # expired before decided_at was set so
    sql.append(close("expired-week", "expired", 5))
    sql.append(close("expired-window", "expired", 12))
    # What an XMPP component still owes: the expiry's record, the
    # operator's accept (its time the accepted request's decided_at;
    # accepted-old's, the same time, is another user's).
    sql += ["INSERT INTO xmpp_roster_sync (component, audit_id) VALUES ('xmpp.example.org', "
            "(SELECT coalesce(max(id), 0) FROM audit_log))",
            "INSERT INTO audit_log (actor, action, subject, details) SELECT 'policy', 'consent.expire', "
            f"'{LOCAL}expired-owed', jsonb_build_object('request', q.id) FROM consent_requests q "
            f"WHERE q.local_identity_id = {of('expired-owed')}",
            "INSERT INTO audit_log (at, actor, action, subject, details) SELECT q.decided_at, 'admin:config', "
            f"'consent.set', '{LOCAL}accepted-owed', jsonb_build_object('user', '{LOCAL}accepted-owed', 'state', "
            "'allowed') FROM consent_requests q "
            f"WHERE q.local_identity_id = {of('accepted-owed')}",
            # the policy's sweep expires this one now
            "UPDATE consent_requests SET created_at = now() - interval '2 hours', expires_at = now() - interval "
            f"'1 hour' WHERE local_identity_id = {of('expiring')}"]
    pg.psql("; ".join(sql), db_url)
    # The window of 15 days keeps expired-window (closed 12 days ago) first.
    gone = {"accepted-old", "blocked-old", "expired-old", "expired-legacy"}
    wait_until(lambda: not gone & set(request_states(pg, db_url)), timeout=30, interval=0.2,
               what="the old closed requests deleted")
    assert set(request_states(pg, db_url)) == set(names) - gone
    wait_until(lambda: retention_metric(d, "causeway_retention_removed_total", "consent_requests") == len(gone),
               what="the sweep counted")
    assert int(d.wait_for(lambda r: r.get("msg") == "old data removed"
                          and r.get("consent_requests") != "0")["consent_requests"]) == len(gone)
    assert request_states(pg, db_url)["pending-old"] == "pending"
    wait_until(lambda: request_states(pg, db_url)["expiring"] == "expired", timeout=30, interval=0.2,
               what="the request expired by the policy's sweep")
    assert pg.psql("SELECT decided_at > now() - interval '1 minute' FROM consent_requests "
                   f"WHERE local_identity_id = {of('expiring')}", db_url) == "t"
    # The window shortened to a day, the component caught up: those go too.
    assert d.admin("PATCH", "/settings", json={"policy.consent_request_window_seconds": 86400}).ok
    pg.psql("UPDATE xmpp_roster_sync SET audit_id = (SELECT max(id) FROM audit_log)", db_url)
    gone |= {"expired-window", "expired-owed", "accepted-owed"}
    wait_until(lambda: not gone & set(request_states(pg, db_url)), timeout=30, interval=0.2,
               what="the requests no longer kept deleted")
    assert set(request_states(pg, db_url)) == set(names) - gone
    srv.close()


def test_a_kept_quote_goes_with_the_content_at_content_days_and_at_its_expiry(make_daemon, db_url, pg):
    """The quote a drop for a block keeps for its writer's notice
    (outbox.sender_quote, schema/054: its first 60 characters, until the
    adapters' look tells her) goes as the content would: at
    retention.content_days after the message was accepted, though the drop
    erased the content itself (content_sql never meets it), and at its
    expiry (content.expires), both leaving '' (the notice still owed, told
    without its text).  A young one stays.  Until the sixtieth session the
    quote stayed until the notice was told, with no process of her network
    running until rows_days (off by default).  The drops are made here with
    SQL, a peer's user's rows (no look tells them)."""
    d = start(make_daemon, db_url)
    a, b, rm, srv = peers(d)
    alice = a.user("alice")
    msgs = {k: a.send(rm["id"], alice, f"{k} quote").json()["id"] for k in ("old", "young", "expiring")}
    ids = ",".join(f"'{m}'" for m in msgs.values())
    pg.psql("UPDATE outbox o SET state = 'dropped', sender_quote = e.content #>> '{content,parts,0,body}' "
            f"FROM events e WHERE e.id = o.event_id AND e.public_id IN ({ids}); "
            f"UPDATE events SET content = '{{}}' WHERE public_id IN ('{msgs['old']}', '{msgs['young']}'); "
            f"UPDATE events SET accepted_at = {OLD} WHERE public_id = '{msgs['old']}'; "
            "UPDATE events SET content = jsonb_set(content, '{content,expires}', "
            f"to_jsonb((extract(epoch FROM now()) * 1000)::bigint)) WHERE public_id = '{msgs['expiring']}'", db_url)

    def quotes():
        rows = pg.psql("SELECT e.public_id, coalesce(o.sender_quote, 'NULL') FROM outbox o "
                       f"JOIN events e ON e.id = o.event_id WHERE e.public_id IN ({ids})", db_url)
        got = dict(r.split("|", 1) for r in rows.splitlines())
        return {k: got.get(m) for k, m in msgs.items()}
    wait_until(lambda: quotes() == {"old": "", "young": "young quote", "expiring": ""}, timeout=30,
               what="the old and the expired quotes emptied")
    assert contents(pg, db_url, [msgs["expiring"]]) == {msgs["expiring"]: "{}"}
    time.sleep(1.5)  # another run of each
    assert quotes() == {"old": "", "young": "young quote", "expiring": ""}
    srv.close()


def test_a_dead_letters_old_tries_are_kept_and_those_behind_them_deleted(make_daemon, db_url, pg):
    """A dead letter's tries are kept past retention.attempts_days while it
    is one: its replay (attempts back to 0) has the Matrix adapter look for
    its event in the room before sending it again only when a try of it is
    in delivery_attempts (test_matrix.py,
    test_a_dead_letters_tries_outlive_attempts_days_for_its_replays_look).
    Kept, they are the oldest of the index the deletion walks, and a walk
    from its start read them all each run: a run looks at 10,000 from
    where the last stopped (since the sixty-third session), as the content
    erasure does.  Here a dead letter with 50,000 tries of 40 days and
    behind them a delivered row's try of 35 days: one run (interval an
    hour) reads fewer than half of them (the walk, and its 10,000th read
    again for the cursor); runs a second apart get to the one behind and
    delete it, and keep the dead letter's, all of them.  Until the
    sixty-third session the dead letter's tries went first."""
    n = 50000
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    alice, bob = a.user("alice"), b.user("bob")
    dead = a.send(rm["id"], alice, "dead letter").json()["id"]
    pushed = b.send(rm["id"], bob, "pushed").json()["id"]
    wait_until(lambda: delivered(pg, db_url, pushed) and attempts_of(pg, db_url, pushed) == 1, what="the push")
    assert d.stop() == 0
    srv.close()
    pg.psql("UPDATE outbox SET state = 'dead' WHERE event_id = "
            f"(SELECT id FROM events WHERE public_id = '{dead}'); "
            "INSERT INTO delivery_attempts (outbox_id, attempt, started_at, finished_at, ok, code) "
            f"SELECT o.id, g, {OLD} + g * interval '1 millisecond', {OLD} + g * interval '1 millisecond', false, 503 "
            f"FROM outbox o JOIN events e ON e.id = o.event_id, generate_series(1, {n}) g "
            f"WHERE e.public_id = '{dead}'", db_url)
    age(pg, db_url, attempts_of=[pushed])
    pg.psql("UPDATE delivery_attempts d SET started_at = started_at + interval '5 days', "
            "finished_at = finished_at + interval '5 days' FROM outbox o JOIN events e ON e.id = o.event_id "
            f"WHERE o.id = d.outbox_id AND e.public_id = '{pushed}'; ANALYZE", db_url)
    plans, _ = run_plans(make_daemon, db_url, pg, ("DELETE FROM delivery_attempts d USING x",),
                         content_days=0, rows_days=0)
    read = [rows_read(p, "delivery_attempts") for p in plans]
    print("delivery attempts read by one run:", read)
    assert len(read) == 1 and read[0] < n / 2, (read, plans)  # the plans: how it read them
    d = start(make_daemon, db_url, content_days=0, rows_days=0)
    wait_until(lambda: attempts_of(pg, db_url, pushed) == 0, timeout=60, interval=0.2,
               what="the try behind the dead letter's deleted")
    assert attempts_of(pg, db_url, dead) == n
    assert d.stop() == 0


def test_an_old_events_delivery_attempts_go_with_its_outbox_rows(make_daemon, db_url, pg):
    """The deletion of old events (retention.rows_days) deletes their
    outbox rows' delivery_attempts in its statement: since the sixty-fourth
    session (schema/058) no foreign key cascades them (its check cost the
    dispatcher's record a lock of the outbox row for every try).  Here a
    pushed message with three tries younger than attempts_days (their own
    retention keeps them) goes at rows_days, and none of its tries is left
    naming its deleted row; 10,000 young rows' tries stay, and the
    deletion reads only the old row's (its plan as run, auto_explain: by
    delivery_attempts_key)."""
    n = 10000
    d, a, b, rm, srv = started_with_peers(make_daemon, db_url)
    bob = b.user("bob")
    old = b.send(rm["id"], bob, "old, pushed").json()["id"]
    young = b.send(rm["id"], bob, "young, pushed").json()["id"]
    srv.wait_events(2)
    wait_until(lambda: all(delivered(pg, db_url, m) and attempts_of(pg, db_url, m) == 1 for m in (old, young)),
               what="the pushes")
    assert d.stop() == 0
    srv.close()
    # Two tries more of the old one (a row retried before it was
    # delivered), and n young delivered rows with a try each.
    fill_outbox(pg, db_url, young, 0, n, "NULL")
    pg.psql("INSERT INTO delivery_attempts (outbox_id, attempt, started_at, finished_at, ok, code) "
            "SELECT o.id, g, now(), now(), false, 503 FROM outbox o JOIN events e ON e.id = o.event_id, "
            f"generate_series(2, 3) g WHERE e.public_id = '{old}' UNION ALL "
            "SELECT o.id, 1, now(), now(), true, 200 FROM outbox o JOIN events e ON e.id = o.event_id "
            "WHERE e.public_id LIKE 'msg_fill%'; ANALYZE delivery_attempts", db_url)
    rows = pg.psql("SELECT string_agg(o.id::text, ',') FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{old}'", db_url)
    assert rows and attempts_of(pg, db_url, old) == 3
    young_tries = int(pg.psql("SELECT count(*) FROM delivery_attempts", db_url)) - 3
    assert young_tries == n + 1

    def tries_of_old_rows():
        return int(pg.psql(f"SELECT count(*) FROM delivery_attempts WHERE outbox_id IN ({rows})", db_url))
    assert tries_of_old_rows() == 3
    log = logged_plans(pg, db_url, analyze=True)
    pg.psql('ALTER DATABASE "%s" SET auto_explain.log_format = json' % db_url.split("?")[0].rsplit("/", 1)[1])
    start_at = os.path.getsize(log)
    age(pg, db_url, older=[old])
    d = start(make_daemon, db_url)
    wait_until(lambda: not event_exists(pg, db_url, old), timeout=30, interval=0.2, what="the old event deleted")
    assert d.stop() == 0
    assert pg.psql(f"SELECT count(*) FROM outbox WHERE id IN ({rows})", db_url) == "0"
    assert tries_of_old_rows() == 0
    assert pg.psql("SELECT count(*) FROM delivery_attempts d WHERE NOT EXISTS "
                   "(SELECT 1 FROM outbox o WHERE o.id = d.outbox_id)", db_url) == "0"
    assert event_exists(pg, db_url, young) and int(pg.psql("SELECT count(*) FROM delivery_attempts", db_url)) \
        == young_tries
    plans = [json.JSONDecoder().raw_decode(p, p.index("{"))[0]
             for p in plans_since(log, start_at, '"Plan"')]
    plans = [p["Plan"] for p in plans if "DELETE FROM events e USING x" in p["Query Text"]]
    read = [rows_read(p, "delivery_attempts") for p in plans]
    assert len(read) == 1 and read[0] <= 3, (read, plans)
