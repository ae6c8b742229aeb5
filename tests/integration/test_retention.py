"""Retention through the real daemon: the content of old messages whose
deliveries are all done is erased (ids, rows and statuses stay), old
idempotency keys and delivery attempts are deleted, what is still owed to
someone is kept, and a setting of 0 keeps that kind for ever.  Data is made
through the peer API and made old with SQL; retention.interval_s is 1 here
(60 by default)."""
import time

import pytest

from harness import wait_until
from test_peer_pull import make_peers

OLD = "now() - interval '40 days'"  # past retention.content_days and attempts_days (30)
OLD_KEY = "now() - interval '8 days'"  # past retention.idempotency_days (7)


def start(make_daemon, db_url, **retention):
    opts = {"interval_s": "1"}
    opts.update({k: str(v) for k, v in retention.items()})
    return make_daemon(db_url, options={"retention": opts}).start()


def peers(d):
    """A pushing peer gk (its notify server checks our signatures) and a
    pulling peer tg, in one room."""
    a, b, rm, srv = make_peers(d)
    srv.public_b64 = d.get("/.well-known/mimi-protocol-directory").json()["public_key"]["key"]
    return a, b, rm, srv


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


def age(pg, db_url, events=(), keys=(), attempts_of=()):
    """In one transaction: a sweep sees all of it or none."""
    sql = []
    if events:
        sql.append(f"UPDATE events SET accepted_at = {OLD} WHERE public_id IN (%s)"
                   % ",".join("'%s'" % i for i in events))
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
    d = start(make_daemon, db_url)
    a, b, rm, srv = peers(d)
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
    after = contents(pg, db_url, [young_done, old_expiring, old_open, old_dead, young_pushed, old_reaction])
    assert after == {k: before[k] for k in after}
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
    rec = d.wait_for(lambda r: r.get("msg") == "old data removed")
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


def add_old_attempt(pg, db_url):
    pg.psql("INSERT INTO delivery_attempts (outbox_id, attempt, started_at, finished_at, ok) "
            f"SELECT min(id), 99, {OLD}, {OLD}, true FROM outbox", db_url)


def old_attempt_gone(pg, db_url):
    return pg.psql("SELECT count(*) FROM delivery_attempts WHERE attempt = 99", db_url) == "0"


def add_old_key(pg, db_url):
    pg.psql("INSERT INTO idempotency_keys (scope, key, request_hash, created_at) "
            f"VALUES ('peer:gk', 'witness', sha256('w'::bytea), {OLD_KEY})", db_url)


@pytest.mark.parametrize("kept", ["content", "idempotency", "attempts"])
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
    age(pg, db_url, events=[pulled, pushed], keys=["room-old"], attempts_of=[pushed])
    # The other kinds go ...
    gone = {"content": lambda: set(contents(pg, db_url, [pulled, pushed]).values()) == {"{}"},
            "idempotency": lambda: "room-old" not in keys(pg, db_url),
            "attempts": lambda: attempts_of(pg, db_url, pushed) == 0}
    wait_until(lambda: all(f() for k, f in gone.items() if k != kept), timeout=30, interval=0.2,
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
    srv.close()
