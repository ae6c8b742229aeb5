"""/admin/v1/outbox: rows by state, dead letters after the retry budget,
and their replay."""
import re

from harness import wait_until
from peer import push_peers


def test_dead_letters_are_listed_and_replayed(make_daemon, db_url, pg):
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2", "retry_base_ms": "20",
                                                    "retry_max_ms": "50"}}).start()
    peers = push_peers(d)
    (a, _), (b, sb) = peers
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    sb.fail_next = 1000  # B is down
    ids = [a.send(room, a.user("alice"), f"m{i}").json()["id"] for i in range(3)]

    def dead_rows():
        r = d.admin("GET", "/outbox?state=dead&destination=peer:tg")
        assert r.status_code == 200
        return r.json()["rows"] if len(r.json()["rows"]) == 3 else None
    rows = wait_until(dead_rows, what="three dead letters")
    assert [x["message"] for x in rows] == ids
    # the first ran out of tries; the later ones ran out too, or went dead
    # with it having tried less (when written after its first try)
    assert rows[0]["attempts"] == 2 and "503" in rows[0]["last_error"], rows
    assert all(x["attempts"] <= 2 and ("503" in x["last_error"] or "earlier message" in x["last_error"])
               for x in rows), rows
    # Paging.
    page = d.admin("GET", "/outbox?state=dead&limit=2").json()
    assert len(page["rows"]) == 2 and page["next_after"] == rows[1]["id"]
    rest = d.admin("GET", f"/outbox?state=dead&limit=2&after={page['next_after']}").json()
    assert [x["id"] for x in rest["rows"]] == [rows[2]["id"]] and rest["next_after"] is None
    # Bad queries.
    for q in ("state=lost", "limit=0", "limit=501", "after=-1", "after=x"):
        r = d.admin("GET", "/outbox?" + q)
        assert r.status_code == 400 and r.json()["code"] == "invalid_query", q
    assert d.request("GET", "/admin/v1/outbox").status_code == 401
    # B comes back; the operator replays in order.
    sb.fail_next = 0
    for x in rows:
        r = d.admin("POST", f"/outbox/{x['id']}/replay")
        assert r.status_code == 200 and r.json()["state"] == "pending", r.text
    got = sb.wait_events(3)
    assert [e["id"] for e in got] == ids
    wait_until(lambda: d.admin("GET", "/outbox?state=delivered").json()["rows"], what="delivered")
    # The trace keeps every attempt: the two before the replay and the one after.
    tries = wait_until(lambda: (lambda t: t if len(t) == 3 else None)(
        d.admin("GET", f"/messages/{ids[0]}").json()["deliveries"][0]["tries"]), what="three attempts")
    assert [(x["attempt"], x["ok"]) for x in tries] == [(1, False), (2, False), (3, True)]
    assert d.admin("POST", f"/outbox/{rows[0]['id']}/replay").status_code == 409
    assert d.admin("POST", "/outbox/999999/replay").status_code == 404
    assert d.admin("POST", "/outbox/abc/replay").status_code == 404
    # Each replay is audited with what the row was: its state, destination
    # and message (until the thirtieth session with {}).
    audited = pg.psql("SELECT string_agg(subject || ' ' || (details->>'state') || ' ' || (details->>'destination') "
                      "|| ' ' || (details->>'message'), ',' ORDER BY id) FROM audit_log "
                      "WHERE action = 'outbox.replay'", db_url)
    assert audited == ",".join(f"{x['id']} dead peer:tg {x['message']}" for x in rows), audited
    for _, srv in peers:
        srv.close()


def test_later_messages_go_dead_with_their_rooms_dead_letter(make_daemon, db_url, pg):
    """Messages written while the peer is down start their retries later
    than the room's first: when it runs out of them, the later ones of its
    room go dead with it, so a replay oldest first keeps the room's order.
    They went on pending and were delivered when the peer came back, and
    the replayed first messages arrived after them (a review's finding)."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_base_ms": "1000", "retry_max_ms": "1000",
                                                    "retry_budget": "4"}}).start()
    peers = push_peers(d)
    (a, _), (b, sb) = peers
    sb.fail_next = 10 ** 9  # B is down
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    other = a.create_room([a.user("carol"), b.user("bob")]).json()["id"]
    ids = [a.send(room, a.user("alice"), "m0").json()["id"]]
    wait_until(lambda: int(pg.psql("SELECT attempts FROM outbox WHERE destination = 'peer:tg' ORDER BY id LIMIT 1",
                                   db_url)) >= 2, what="the first message tried twice")
    for i in range(1, 6):  # written after: their tries start later
        ids.append(a.send(room, a.user("alice"), f"m{i}").json()["id"])

    def dead():
        rows = d.admin("GET", "/outbox?state=dead&destination=peer:tg").json()["rows"]
        return rows if len(rows) == 6 else None
    rows = wait_until(dead, timeout=30, what="the room's six messages dead")
    assert [x["message"] for x in rows] == ids
    assert rows[0]["attempts"] == 4 and rows[-1]["attempts"] < 4, rows  # dead with the first, not by their own
    sb.fail_next = 0  # B is back: another room's message goes, this room's wait for the operator
    elsewhere = a.send(other, a.user("carol"), "elsewhere").json()["id"]
    assert [e["id"] for e in sb.wait_events(1)] == [elsewhere]
    for x in rows:  # replayed oldest first (docs/operations.md)
        assert d.admin("POST", f"/outbox/{x['id']}/replay").status_code == 200
    got = sb.wait_events(7)
    assert [e["id"] for e in got[1:]] == ids
    for _, srv in peers:
        srv.close()


def admin_pages(d, path, limit, after=0):
    """Every row of the admin list path (with its query), page by page,
    checking each page's size and cursor on the way."""
    got = []
    while True:
        r = d.admin("GET", f"{path}{'&' if '?' in path else '?'}limit={limit}&after={after}")
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["rows"]) <= limit
        got += page["rows"]
        if page["next_after"] is None:
            assert len(page["rows"]) < limit, page
            return got
        assert len(page["rows"]) == limit and page["next_after"] == page["rows"][-1]["id"], page
        after = page["next_after"]


def test_a_state_without_a_destination_pages_across_destinations(make_daemon, db_url, pg):
    """?state= without a destination: that state's rows in id order,
    whatever their destination, the same rows as the unfiltered list shows.
    Since the twentieth session the list reads each destination's rows of
    that state by id and merges them (docs/admin-api.md); this guards the
    merge: ids interleaved across four destinations, every page size, a
    cursor that is not a row of the state."""
    d = make_daemon(db_url).start()
    peers = push_peers(d)
    (a, _), (b, sb) = peers
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    ids = [a.send(room, a.user("alice"), f"m{i}").json()["id"] for i in range(8)]
    sb.wait_events(8)
    wait_until(lambda: pg.psql("SELECT count(*) FROM outbox WHERE state <> 'delivered'", db_url) == "0",
               what="every delivery done")
    # The eight messages' rows to four more destinations, written in a
    # shuffled order so that the ids of each state and destination interleave.
    # Terminal states only: nothing in the daemon changes them (a dead
    # letter's sender is told already).
    pg.psql("INSERT INTO outbox (event_id, destination, room_id, state, last_error, delivered_at, sender_told_at) "
            "SELECT e.id, t.dst, e.room_id, s.st, 'test', CASE WHEN s.st = 'delivered' THEN now() END, now() "
            "FROM events e, unnest(ARRAY['matrix', 'peer:p3', 'xmpp:x.example', 'peer:zz']) WITH ORDINALITY t(dst, k), "
            " LATERAL (SELECT (ARRAY['dead', 'dropped', 'expired', 'delivered'])[1 + (e.id + t.k) % 4] AS st) s "
            "WHERE e.public_id IN ('" + "', '".join(ids) + "') ORDER BY md5(e.public_id || t.dst)", db_url)
    everything = admin_pages(d, "/outbox", 500)
    assert len(everything) >= 40
    for state in ("dead", "dropped", "expired", "delivered"):
        want = [x for x in everything if x["state"] == state]
        assert len({x["destination"] for x in want}) >= 4, want
        for limit in (1, 3, 500):
            assert admin_pages(d, f"/outbox?state={state}", limit) == want, (state, limit)
        # From a cursor in the middle, on another state's row.
        cursor = next(x["id"] for x in everything[len(everything) // 2:] if x["state"] != state)
        assert admin_pages(d, f"/outbox?state={state}", 2, after=cursor) == [x for x in want if x["id"] > cursor]
        for dest in ("matrix", "peer:zz"):
            assert admin_pages(d, f"/outbox?state={state}&destination={dest}", 2) == [
                x for x in want if x["destination"] == dest]
    assert admin_pages(d, "/outbox?destination=peer:p3", 3) == [x for x in everything
                                                              if x["destination"] == "peer:p3"]
    assert admin_pages(d, "/outbox?state=held", 3) == []
    assert admin_pages(d, "/outbox?state=pending&destination=nowhere", 3) == []
    for _, srv in peers:
        srv.close()



def test_a_database_failure_reading_the_peer_is_no_attempt(make_daemon, db_url, pg):
    """The database failing when the dispatcher reads where a peer is
    pushed to is not the peer's failure: the rows go back untried and are
    delivered once the database answers again.  It used to be recorded as
    an attempt that found "no push URL", spending the retry budget (here:
    the whole of it).  The failure is made by taking the daemon's right to
    read the column (the daemon runs as a role that is not a superuser):
    the claim, which reads the peers' names, goes on; the read of the
    address fails, every time until the right is back."""
    role = "cw_lim_peer_read"
    pg.psql(f"DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN "
            f"CREATE ROLE {role} LOGIN; END IF; END$$", db_url)
    pg.psql(f"GRANT CREATE ON SCHEMA public TO {role}; GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; "
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}", db_url)
    d = make_daemon(db_url + f"&user={role}", options={"dispatcher": {"retry_budget": "1", "retry_base_ms": "20",
                                                                      "retry_max_ms": "50"}}).start()
    peers = push_peers(d)
    (a, _), (b, sb) = peers
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    sb.fail_next = 1000  # B is down: the message goes dead after its one try
    mid = a.send(room, a.user("alice"), "m").json()["id"]
    row = wait_until(lambda: (lambda r: r[0] if r else None)(
        d.admin("GET", "/outbox?state=dead&destination=peer:tg").json()["rows"]), what="a dead letter")
    sb.fail_next = 0
    others = pg.psql("SELECT string_agg(quote_ident(column_name), ', ') FROM information_schema.columns "
                     "WHERE table_name = 'peers' AND column_name <> 'push_url'", db_url)
    pg.psql(f"REVOKE SELECT ON peers FROM {role}; GRANT SELECT ({others}) ON peers TO {role}", db_url)
    assert d.admin("POST", f"/outbox/{row['id']}/replay").status_code == 200
    # Tried twice at least (the row came back, its budget not spent), then the right is back.
    wait_until(lambda: d.log().count("cannot read peer tg") >= 2, what="two failed reads")
    pg.psql(f"GRANT SELECT ON peers TO {role}", db_url)
    assert [e["id"] for e in sb.wait_events(1)] == [mid]
    tries = wait_until(lambda: (lambda t: t if t and t[-1]["ok"] else None)(
        d.admin("GET", f"/messages/{mid}").json()["deliveries"][0]["tries"]), what="the delivery recorded")
    # The failed reads were no attempts: the try before the replay, then the one that delivered.
    assert [(x["attempt"], x["ok"]) for x in tries] == [(1, False), (2, True)], tries
    assert not any("push URL" in (x["error"] or "") for x in tries), tries
    for _, srv in peers:
        srv.close()


def test_an_unreadable_stored_event_is_a_dead_letter_counted_as_one(make_daemon, db_url, pg):
    """A row whose stored event does not parse (a number stored before the
    thirtieth session that jansson cannot read) becomes a dead letter: the
    row itself, by its id (until the thirty-first session by its event and
    destination), counted with the other dead letters (the dispatcher's
    count in /admin/v1/adapters and /metrics, which left it out), listed
    among them, and its sender not told in the chat (a replay fails the
    same way: "the operator can send it again" would not be true)."""
    d = make_daemon(db_url).start()
    peers = push_peers(d)
    (a, _), (b, sb) = peers
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    assert d.admin("POST", "/peers/tg/disable").status_code == 200
    bad = a.send(room, a.user("alice"), "stored before the fix").json()["id"]
    after = a.send(room, a.user("alice"), "after it").json()["id"]
    pg.psql("UPDATE events SET content = jsonb_set(content, '{x}', '10000000000000000000'::jsonb) "
            f"WHERE public_id = '{bad}'", db_url)
    row_id = int(pg.psql("SELECT o.id FROM outbox o JOIN events e ON e.id = o.event_id "
                         f"WHERE e.public_id = '{bad}' AND o.destination = 'peer:tg'", db_url))
    assert d.admin("POST", "/peers/tg/enable").status_code == 200
    assert [e["id"] for e in sb.wait_events(1)] == [after]
    rec = d.wait_for(lambda r: r.get("msg", "").startswith("a stored event does not parse"))
    assert (rec["row"], rec["event"], rec["destination"]) == (str(row_id), bad, "peer:tg"), rec
    rows = d.admin("GET", "/outbox?state=dead").json()["rows"]
    assert [(x["id"], x["message"], x["destination"]) for x in rows] == [(row_id, bad, "peer:tg")], rows
    assert "does not parse" in rows[0]["last_error"]
    ad = d.admin("GET", "/adapters").json()
    assert ad["dispatcher"]["dead"] == 1 and ad["peer"]["dead"] == 1, ad
    assert wait_until(lambda: d.admin("GET", "/stats").json()["queue"]["dead"] == 1, what="the stats' dead")
    metrics = d.get("/metrics").text
    assert 'causeway_dispatch_rows_total{outcome="dead"} 1\n' in metrics
    assert 'causeway_outbox_depth{state="dead"} 1\n' in metrics
    assert pg.psql(f"SELECT sender_told_at IS NOT NULL FROM outbox WHERE id = {row_id}", db_url) == "t"
    for _, srv in peers:
        srv.close()


def test_a_claimed_event_takes_its_members_from_the_rows_whatever_its_stored_text(make_daemon, db_url, pg):
    """The claim reads a stored event without the members the dispatcher
    sets from the rows anyway (id, room, room_id, sender, accepted_ts, and
    its type where it is the row's), which the daemon parsed only to
    replace (the forty-ninth session): a stored text naming others still
    goes out with the rows' own, and its other members with it."""
    d = make_daemon(db_url).start()
    peers = push_peers(d)
    (a, _), (b, sb) = peers
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    assert d.admin("POST", "/peers/tg/disable").status_code == 200
    plain = a.send(room, a.user("alice"), "plain").json()["id"]
    doctored = a.send(room, a.user("alice"), "doctored").json()["id"]
    pg.psql("UPDATE events SET content = content || jsonb_build_object('id', 'bogus', 'room', 'mimi://x.invalid/r/z', "
            "'room_id', 'bogus', 'sender', 'mimi://x.invalid/u/mallory', 'accepted_ts', 1, 'extra', 'kept') "
            f"WHERE public_id = '{doctored}'", db_url)
    assert d.admin("POST", "/peers/tg/enable").status_code == 200
    got = sb.wait_events(2)
    assert [e["id"] for e in got] == [plain, doctored], got
    own = ("id", "ts", "accepted_ts", "content")
    want = {k: v for k, v in got[0].items() if k not in own}
    have = {k: v for k, v in got[1].items() if k not in own + ("extra",)}
    assert have == want and want["sender"] == a.user("alice") and want["type"] == "message", (want, have)
    assert 0 <= got[1]["accepted_ts"] - got[0]["accepted_ts"] < 600000, (got[0], got[1])
    assert got[1].get("extra") == "kept", got[1]
    for _, srv in peers:
        srv.close()


def test_a_replay_waits_for_the_earlier_dead_letters_of_its_room(make_daemon, db_url, pg):
    """A dead letter whose room has an earlier dead letter to the same
    destination is not replayed before it: 409 naming that row, nothing
    changed.  Replayed first, the later message would reach the peer before
    the earlier one.  Discarded (given up), the earlier one no longer holds
    it.  Until the forty-sixth session any dead letter was replayed at
    once, and the room's order held only if the operator replayed oldest
    first."""
    d = make_daemon(db_url, options={"dispatcher": {"retry_budget": "2", "retry_base_ms": "20",
                                                    "retry_max_ms": "50"}}).start()
    peers = push_peers(d)
    (a, _), (b, sb) = peers
    room = a.create_room([a.user("alice"), b.user("bob")]).json()["id"]
    other = a.create_room([a.user("carol"), b.user("bob")]).json()["id"]
    sb.fail_next = 10 ** 9  # B is down
    ids = [a.send(room, a.user("alice"), f"m{i}").json()["id"] for i in range(3)]
    elsewhere = a.send(other, a.user("carol"), "elsewhere").json()["id"]

    def dead_rows():
        rows = d.admin("GET", "/outbox?state=dead&destination=peer:tg").json()["rows"]
        return rows if len(rows) == 4 else None
    rows = wait_until(dead_rows, timeout=30, what="four dead letters")
    mine = [x for x in rows if x["message"] in ids]
    assert [x["message"] for x in mine] == ids, rows
    [lone] = [x for x in rows if x["message"] == elsewhere]
    sb.fail_next = 0
    r = d.admin("POST", f"/outbox/{mine[1]['id']}/replay")
    assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
    assert str(mine[0]["id"]) in r.json()["detail"] and "first" in r.json()["detail"], r.text
    state = pg.psql(f"SELECT state || ' ' || attempts FROM outbox WHERE id = {mine[1]['id']}", db_url)
    assert state == f"dead {mine[1]['attempts']}", state
    assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'outbox.replay'", db_url) == "0"
    # Another room's dead letter has nothing before it.
    assert d.admin("POST", f"/outbox/{lone['id']}/replay").status_code == 200
    assert [e["id"] for e in sb.wait_events(1)] == [elsewhere]
    # The first given up, the second goes; the third waits for it no more.
    assert d.admin("POST", f"/outbox/{mine[0]['id']}/discard").status_code == 200
    assert d.admin("POST", f"/outbox/{mine[1]['id']}/replay").status_code == 200
    assert d.admin("POST", f"/outbox/{mine[2]['id']}/replay").status_code == 200
    got = sb.wait_events(3)
    assert [e["id"] for e in got[1:]] == ids[1:]
    for _, srv in peers:
        srv.close()


def rechecked(d):
    """(decided, dropped): the rows the policy's rechecks decided again."""
    text = d.get("/metrics").text
    return tuple(int(re.search(r'^causeway_policy_rechecked_total\{outcome="%s"\} (\d+)' % k, text, re.M).group(1))
                 for k in ("decided", "dropped"))


def test_a_replay_of_a_row_that_is_no_dead_letter_is_refused_whatever_the_rules_say(make_daemon, db_url, pg):
    """A replay of a pending row is 409 "only a dead letter can be
    replayed", and changes nothing, even when the server's rules now refuse
    the row (their recheck of the waiting rows has not reached it yet: here
    it was locked while the recheck passed, which skips a locked row).
    Until the forty-sixth session a replay asked the rules first, whatever
    the row's state: such a row was dropped (its content erased, a deny
    audited) by the replay, and answered 409 "dropped, not replayed"."""
    from harness import HeldSession
    from test_peer_pull import make_peers
    d = make_daemon(db_url).start()
    a, b, rm, srv = make_peers(d)  # tg pulls: its row waits, pending, until it asks
    try:
        mid = a.send(rm["id"], a.user("alice"), "waiting").json()["id"]
        oid = pg.psql("SELECT o.id FROM outbox o JOIN events e ON e.id = o.event_id "
                      f"WHERE e.public_id = '{mid}' AND o.destination = 'peer:tg' AND o.state = 'pending'", db_url)
        assert oid, "the pull peer's row pending"
        held = HeldSession(db_url)
        try:
            held.run(f"BEGIN; SELECT id FROM outbox WHERE id = {oid} FOR UPDATE;")
            before = rechecked(d)
            r = d.admin("POST", "/rules", json={"scope": "domain", "pattern": "wa.example", "mode": "deny"})
            assert r.status_code == 201, r.text
            # the recheck's pass over the waiting rows has come to this one, locked
            wait_until(lambda: rechecked(d)[0] > before[0], what="the recheck's pass")
            assert rechecked(d)[1] == before[1]
        finally:
            held.end()
        assert pg.psql(f"SELECT state FROM outbox WHERE id = {oid}", db_url) == "pending"
        r = d.admin("POST", f"/outbox/{oid}/replay")
        assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
        assert r.json()["detail"] == "only a dead letter can be replayed; this row is pending", r.text
        assert pg.psql(f"SELECT state FROM outbox WHERE id = {oid}", db_url) == "pending"
        assert pg.psql(f"SELECT content <> '{{}}'::jsonb FROM events WHERE public_id = '{mid}'", db_url) == "t"
        assert pg.psql("SELECT count(*) FROM audit_log WHERE action IN ('outbox.replay', 'policy.deny')",
                       db_url) == "0"
    finally:
        srv.close()
