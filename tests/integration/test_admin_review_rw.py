"""Probes of reviewer rW (session 32) on the admin API.  Each test states
what should hold; a failing test is a finding (see the review report)."""
import threading

from harness import ADMIN_TOKEN as ADMIN, HeldSession, wait_until
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


def test_every_admin_answer_matches_the_document(daemon, pg, db_url):
    """Each admin route's answers (status and, for 2xx, body) are what
    docs/admin-openapi.json says: a body past server.max_body_bytes is 413
    too_large (http.c dispatch), and each 2xx body fits its schema."""
    import json as _json
    import os
    from harness import TOP_SRCDIR
    from peer import PeerClient
    from test_openapi import check_schema
    with open(os.path.join(TOP_SRCDIR, "docs", "admin-openapi.json"), encoding="utf-8") as f:
        doc = _json.load(f)
    faults = []

    def check(method, path, template, r):
        op = doc["paths"][template][method.lower()]
        code = str(r.status_code)
        if code not in op["responses"]:
            faults.append(f"{method} {path}: {code} not documented ({r.text[:80]})")
            return
        resp = op["responses"][code]
        while "$ref" in resp:
            resp = doc["components"]["responses"][resp["$ref"].rsplit("/", 1)[1]]
        content = resp.get("content", {})
        if r.status_code < 300 and "application/json" in content:
            faults.extend(f"{method} {path}: {x}" for x in
                          check_schema(doc, content["application/json"]["schema"], r.json()))

    big = {"comment": "x" * (2 << 20)}
    for method, template in [("POST", "/admin/v1/rules"), ("PATCH", "/admin/v1/settings"),
                             ("POST", "/admin/v1/peers"), ("POST", "/admin/v1/tokens")]:
        check(method, template, template, daemon.request(method, template, json=big,
                                                         headers={"Authorization": "Bearer " + ADMIN}))
    pc = PeerClient(daemon.url, "gk", "wa.example")
    calls = [
        ("POST", "/admin/v1/peers", "/admin/v1/peers", {"name": "gk", "domain": "wa.example", "mode": "pull",
                                                        "public_key": pc.signer.public_b64}),
        ("GET", "/admin/v1/peers", "/admin/v1/peers", None),
        ("GET", "/admin/v1/peers/gk", "/admin/v1/peers/{name}", None),
        ("PATCH", "/admin/v1/peers/gk", "/admin/v1/peers/{name}", {"event_types": ["message"]}),
        ("POST", "/admin/v1/peers/gk/disable", "/admin/v1/peers/{name}/disable", None),
        ("POST", "/admin/v1/peers/gk/enable", "/admin/v1/peers/{name}/enable", None),
        ("POST", "/admin/v1/peers/gk/rotate", "/admin/v1/peers/{name}/rotate", None),
        ("POST", "/admin/v1/rules", "/admin/v1/rules", {"scope": "domain", "pattern": "x.example", "mode": "deny",
                                                        "limits": {"messages_per_minute": 3}}),
        ("GET", "/admin/v1/rules", "/admin/v1/rules", None),
        ("GET", "/admin/v1/rules/1", "/admin/v1/rules/{id}", None),
        ("PATCH", "/admin/v1/rules/1", "/admin/v1/rules/{id}", {"comment": "c"}),
        ("GET", "/admin/v1/settings", "/admin/v1/settings", None),
        ("PATCH", "/admin/v1/settings", "/admin/v1/settings", {"policy.default_mode": "open"}),
        ("POST", "/admin/v1/optins", "/admin/v1/optins", {"user": "mimi://example.org/u/alice",
                                                          "network": "peer:gk", "opted_in": True}),
        ("POST", "/admin/v1/consents", "/admin/v1/consents", {"user": "mimi://example.org/u/alice",
                                                              "subject_kind": "domain", "subject": "wa.example",
                                                              "state": "allowed"}),
        ("GET", "/admin/v1/users", "/admin/v1/users", None),
        ("GET", "/admin/v1/consent-requests", "/admin/v1/consent-requests", None),
        ("GET", "/admin/v1/held", "/admin/v1/held", None),
        ("POST", "/admin/v1/reports", "/admin/v1/reports", {"subject": "mimi://wa.example/u/wally",
                                                            "reason": "spam", "comment": "c"}),
        ("GET", "/admin/v1/reports", "/admin/v1/reports", None),
        ("POST", "/admin/v1/reports/1/handle", "/admin/v1/reports/{id}/handle", None),
        ("GET", "/admin/v1/audit", "/admin/v1/audit", None),
        ("GET", "/admin/v1/outbox", "/admin/v1/outbox", None),
        ("GET", "/admin/v1/rooms", "/admin/v1/rooms", None),
        ("GET", "/admin/v1/adapters", "/admin/v1/adapters", None),
        ("GET", "/admin/v1/config", "/admin/v1/config", None),
        ("GET", "/admin/v1/stats", "/admin/v1/stats", None),
        ("GET", "/admin/v1/whoami", "/admin/v1/whoami", None),
        ("POST", "/admin/v1/tokens", "/admin/v1/tokens", {"name": "ops", "role": "viewer"}),
        ("GET", "/admin/v1/tokens", "/admin/v1/tokens", None),
        ("POST", "/admin/v1/tokens/ops/revoke", "/admin/v1/tokens/{name}/revoke", None),
        ("DELETE", "/admin/v1/rules/1", "/admin/v1/rules/{id}", None),
    ]
    for method, path, template, body in calls:
        kw = {"json": body} if body is not None else {}
        r = daemon.request(method, path, headers={"Authorization": "Bearer " + ADMIN}, **kw)
        assert r.status_code < 300, (method, path, r.text)
        check(method, path, template, r)
    assert not faults, "\n".join(faults)
