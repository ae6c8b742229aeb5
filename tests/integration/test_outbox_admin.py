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
    assert all(x["attempts"] == 2 and "503" in x["last_error"] for x in rows)
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
