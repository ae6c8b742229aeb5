"""Probes of reviewer rW (session 32) on the admin API.  Each test states
what should hold; a failing test is a finding (see the review report)."""
import threading

from harness import HeldSession, wait_until
from test_xmpp import ALICE, WALLY_JID, body  # noqa: F401
from test_xmpp import alice, gk, prosody, xd  # noqa: F401  (the fixtures)


def test_two_operators_patching_one_rule_lose_no_change(daemon, pg, db_url):
    """Operator A (another daemon process, simulated by a session of its
    own doing what A's PATCH does) sets the rule's mode while operator B's
    PATCH of its limits is under way: B must not put the old mode back."""
    r = daemon.admin("POST", "/rules", json={"scope": "domain", "pattern": "spam.example", "mode": "open"})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    a = HeldSession(db_url)
    a.run("BEGIN; UPDATE rules SET mode = 'deny', updated_at = now() WHERE id = %d;" % rid)
    out = {}

    def patch_b():
        out["r"] = daemon.admin("PATCH", f"/rules/{rid}", json={"limits": {"messages_per_minute": 5}})

    t = threading.Thread(target=patch_b)
    t.start()
    # B's statement has started (its snapshot taken) and waits for A's row lock.
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                               "AND query LIKE 'WITH cur AS%'", db_url) == "1", what="B waiting for A's lock")
    a.end()  # A commits: mode deny
    t.join(30)
    assert out["r"].status_code == 200, out["r"].text
    rule = daemon.admin("GET", f"/rules/{rid}").json()
    assert rule["limits"] == {"messages_per_minute": 5}
    assert rule["mode"] == "deny", f"A's mode change was lost under B's limits change: {rule}"


def test_a_rule_naming_a_local_user_is_refused_or_matches(xd, gk, alice, pg, db_url):  # noqa: F811
    """A deny rule for a local user (or the provider's own domain) is
    stored and audited; the engine asks rules only about remote parties,
    so it must either be refused (as network rules naming matrix or xmpp
    are since the thirtieth session) or be in force."""
    a, srv = gk
    r = xd.admin("POST", "/rules", json={"scope": "user", "pattern": ALICE, "mode": "deny",
                                        "comment": "stop alice spamming the gatekeeper"})
    r2 = xd.admin("POST", "/rules", json={"scope": "domain", "pattern": "example.org", "mode": "deny"})
    if r.status_code == 400 and r2.status_code == 400:
        return
    assert r.status_code == 201 and r2.status_code == 201, (r.text, r2.text)
    alice.send_message(WALLY_JID, "still gets through")
    got = srv.wait_events(1)
    assert not got, f"the rules {r.json()['id']} and {r2.json()['id']} were stored (201) and never matched: " \
                    f"alice's message reached the peer: {got[0]['content']}"
