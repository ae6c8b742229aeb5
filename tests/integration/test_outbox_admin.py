"""/admin/v1/outbox: rows by state, dead letters after the retry budget,
and their replay."""
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
    wait_until(lambda: d.admin("GET", f"/outbox?state=delivered").json()["rows"], what="delivered")
    # The trace keeps every attempt: the two before the replay and the one after.
    tries = wait_until(lambda: (lambda t: t if len(t) == 3 else None)(
        d.admin("GET", f"/messages/{ids[0]}").json()["deliveries"][0]["tries"]), what="three attempts")
    assert [(x["attempt"], x["ok"]) for x in tries] == [(1, False), (2, False), (3, True)]
    assert d.admin("POST", f"/outbox/{rows[0]['id']}/replay").status_code == 409
    assert d.admin("POST", "/outbox/999999/replay").status_code == 404
    assert d.admin("POST", "/outbox/abc/replay").status_code == 404
    assert pg.psql("SELECT count(*) FROM audit_log WHERE action = 'outbox.replay'", db_url) == "3"
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
