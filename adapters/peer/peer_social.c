/* Consent, blocks, reports and discovery for peers. */
#include "config.h"
#include "peer_social.h"
#include "app.h"
#include "event.h"
#include "utf8.h"
#include "peer_api.h"
#include "pipeline.h"
#include "peers.h"
#include "store.h"
#include "policy_admin.h"
#include "policy_live.h"
#include "ratelimit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>


/* What every job here needs: the two users, and a few strings. */
struct social_input {
	int64_t peer_id;
	char peer_network[PEER_NAME_MAX + 8];
	char remote[MIMI_URI_MAX + 1];  /* the peer's user */
	struct mimi_uri remote_u;
	char local[MIMI_URI_MAX + 1];   /* this provider's user */
	struct mimi_uri local_u;
	bool flag;                      /* granted / blocked */
	const char *action;             /* consent updates and blocks: the audit action */
	char reason[72];
	json_t *evidence;
	char *comment;
	char handle[MIMI_LOCAL_MAX + 1];
	struct policy_decision d;       /* consent requests: the policy's */
	char local_network[16];         /* the network of this provider's users */
	int64_t window_s, expiry_s;
	/* profiles: each given (has_), or null (a value of NULL: removed) */
	bool has_display, has_avatar;
	char *display, *avatar;
};

static void social_free(void *arg)
{
	struct social_input *in = arg;
	json_decref(in->evidence);
	free(in->comment);
	free(in->display);
	free(in->avatar);
	free(in);
}


static cw_err both(PGconn *c, struct social_input *in, char remote_id[24], char local_id[24], cw_errmsg *e)
{
	char pid[24];
	snprintf(pid, sizeof(pid), "%lld", (long long)in->peer_id);
	cw_err rc = identity_id(c, &in->remote_u, false, in->peer_network, pid, remote_id, 24, e);
	return rc ? rc : identity_id(c, &in->local_u, true, in->local_network, NULL, local_id, 24, e);
}

static void accepted(struct app_job *j)
{
	j->status = 202;
	j->body = json_pack("{s:s}", "status", "accepted");
}

/* Reads a user URI member; in the peer's domain (remote) or this
 * provider's (local).  False after answering 400/403. */
static bool user_member(const struct cw_app *app, struct cw_req *req, json_t *body, const char *name, bool remote,
			const char *domain, char *out, struct mimi_uri *u)
{
	json_t *v = json_object_get(body, name);
	cw_errmsg e;
	char d[200];
	if (!json_is_string(v) || mimi_uri_parse(json_string_value(v), u, &e) || u->kind != MIMI_USER) {
		snprintf(d, sizeof(d), "%s must be a user URI mimi://<domain>/u/<local>", name);
		cw_req_problem(req, 400, "invalid_body", "Invalid body", d);
		return false;
	}
	if (strcmp(u->domain, domain) != 0) {
		snprintf(d, sizeof(d), "%s must be a user of %s", name,
			 remote ? "the calling peer's domain" : "this provider's domain");
		cw_req_problem(req, remote ? 403 : 400, remote ? "not_allowed" : "invalid_body",
			       remote ? "Not allowed" : "Invalid body", d);
		return false;
	}
	snprintf(out, MIMI_URI_MAX + 1, "%s", json_string_value(v));
	if (remote)
		return true;
	peer_local_fold(app, u, out);
	/* The gateway's own Matrix users (its bot, the ghosts) are nobody's
	 * here, as POST /v1/rooms and the admin API's opt-ins and consents
	 * refuse them: until the forty-first session a block, a consent
	 * update or a consent request naming one made it a local user. */
	char why[MIMI_URI_MAX + 300];
	const char *refused = peer_local_refused(app, u, out, why, sizeof(why));
	if (refused) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body", refused);
		return false;
	}
	return true;
}

/* The common start: the API is on, the body is a JSON object of the
 * members known (a NULL-terminated list) alone, naming the peer's user
 * (known[0]) and a local user (local_name, or NULL).  A member not known
 * is 400 invalid_body, as POST /v1/identifiers/query refuses one: until
 * the forty-eighth session consent requests and updates, blocks and
 * reports dropped it unseen (a report's "comments" or "evidences", a
 * typo, was stored as a report without them, answered 202). */
static struct social_input *begin(struct cw_req *req, struct cw_app *app, json_t **body, const char *const *known,
				  const char *local_name)
{
	if (!peer_api_enabled(app, req))
		return NULL;
	struct peer_principal *p = cw_req_principal(req);
	*body = app_json_body(req);
	if (!*body)
		return NULL;
	if (!app_json_only_known(req, *body, known)) {
		json_decref(*body);
		return NULL;
	}
	const char *remote_name = known[0];
	struct social_input *in = calloc(1, sizeof(*in));
	if (!in || !user_member(app, req, *body, remote_name, true, p->domain, in->remote, &in->remote_u) ||
	    (local_name &&
	     !user_member(app, req, *body, local_name, false, app->cfg->domain, in->local, &in->local_u))) {
		if (!in)
			cw_req_no_memory(req);
		free(in);
		json_decref(*body);
		return NULL;
	}
	in->peer_id = p->id;
	snprintf(in->peer_network, sizeof(in->peer_network), "peer:%s", p->name);
	snprintf(in->local_network, sizeof(in->local_network), "%s", app_local_network(app));
	return in;
}

static void start(struct cw_req *req, struct cw_app *app, struct social_input *in,
		  cw_err (*fn)(PGconn *, struct app_job *, cw_errmsg *), bool write)
{
	app_job_run(app, req, fn, in, social_free, write);
}

/* Takes one from the calling peer's bucket prefix:<peer> of per_minute
 * (one token bucket per peer in each daemon process); false after
 * answering 429 with Retry-After. */
static bool peer_bucket(struct cw_app *app, struct cw_req *req, const char *prefix, int64_t per_minute,
			const char *what)
{
	struct peer_principal *p = cw_req_principal(req);
	char key[PEER_NAME_MAX + 16];
	snprintf(key, sizeof(key), "%s:%s", prefix, p->name);
	bool first = false;
	int64_t wait = ratelimit_take(app->limits, key, (uint32_t)per_minute, 60000, cw_wall_ms(), &first);
	if (wait <= 0)
		return true;
	char d[160];
	snprintf(d, sizeof(d), "too many %s from this peer; retry later", what);
	app_retry_after(req, wait);
	cw_req_problem(req, 429, "rate_limited", "Too many requests", d);
	return false;
}

/* policy.peer_updates_per_minute: consent updates, blocks and reports,
 * each of which changes what the policy holds (and makes every process
 * reload a user's facts) or stores a row. */
static bool peer_updates_allowed(struct cw_app *app, struct cw_req *req)
{
	struct policy_view *v = policy_live_get(app->policy);
	int64_t per_minute = v->set.peer_updates_per_minute;
	policy_view_put(v);
	return peer_bucket(app, req, "pup", per_minute, "consent updates, blocks and reports");
}

/* A peer's profile changes have a bucket of their own of the same
 * policy.peer_updates_per_minute: each stores a row and has the XMPP
 * component fetch the avatar and send every contact of the user a
 * presence; until the forty-first session they had no bound at all (a
 * peer changed a profile at the rate of its requests).  Their own bucket,
 * so that a peer's profile churn takes nothing from its users' blocks and
 * consent updates. */
static bool peer_profiles_allowed(struct cw_app *app, struct cw_req *req)
{
	struct policy_view *v = policy_live_get(app->policy);
	int64_t per_minute = v->set.peer_updates_per_minute;
	policy_view_put(v);
	return peer_bucket(app, req, "ppf", per_minute, "profile changes");
}

/* ------------------------------------------------------------ consent */

/* requestConsent: stored as a consent request for the local user when the
 * policy says the request waits for the user (hold); a denied one or one
 * from a sender the user allowed changes nothing.  The peer gets the same
 * answer in every case: whether the user exists, blocks the requester or
 * is not opted in is not its business.  Every decision is in the audit
 * log (the hold too; a limit once per episode: until the seventeenth
 * session only the deny was; the allow since the thirty-second).
 *
 * Nor does the time of the answer tell: every verdict but a limit (429,
 * answered as such) does the same work in the same round trips, one
 * statement taking the verdict as a parameter, which stores the request
 * only for a hold and always writes the audit record.  Until the
 * thirty-second session a hold ran one statement more (the request's
 * INSERT), an allow two fewer (no record either), and the target was
 * made an identity row first, known or not: a peer timing 300 requests
 * told held (4.19 ms), allowed (3.66) and unknown or denied users (3.9)
 * apart (rQ; tests/bench/privacy_timing).  The local user is made an
 * identity row only for a hold (policy.optin_default on holds for a user
 * never seen: her request is kept), not for every name a peer makes up.
 * The reads are every verdict's (st: whether a request stands, read for
 * an allow or a deny too); only the writes a hold needs differ.  A
 * request is stamped with the statement's start, as CONSENT_ASK_SQL
 * stamps the first contacts' and their refusals (whose once-per-episode
 * audit compares the times; not under the user's lock here, so close to
 * their order, not exactly in it).  The user's row, when there is one,
 * is locked FOR KEY SHARE (lk), as identity_id locks it: one the
 * retention sweep is forgetting is waited for, and then not found (the
 * request made as for a race, consent_request_raced). */
static const char consent_request_sql[] =
	"WITH li AS (INSERT INTO identities (uri, domain, localpart, is_local, network) "
	"  SELECT $1, $7, $8, true, $9 WHERE $5::boolean ON CONFLICT (uri) DO NOTHING RETURNING id), "
	"lk AS (SELECT id FROM identities WHERE uri = $1 AND is_local FOR KEY SHARE), "
	"l AS MATERIALIZED (SELECT id FROM li UNION ALL SELECT id FROM lk), "
	"st AS MATERIALIZED (SELECT l.id, EXISTS (SELECT 1 FROM consent_requests q WHERE q.local_identity_id = l.id "
	"  AND q.remote_identity_id = $2::bigint AND " CONSENT_REQUEST_STANDS_SQL("q", "$4::bigint") ") AS stands FROM l), "
	"cr AS (INSERT INTO consent_requests (local_identity_id, remote_identity_id, created_at, expires_at) "
	"  SELECT st.id, $2::bigint, statement_timestamp(), statement_timestamp() + make_interval(secs => $3::bigint) "
	"  FROM st WHERE $5::boolean "
	"  AND NOT st.stands ON CONFLICT DO NOTHING), "
	"au AS (INSERT INTO audit_log (actor, action, reason_code, rule_id, subject, details) "
	"  SELECT 'policy', a.action, a.reason, NULLIF(a.rule, 0), a.subject, a.details "
	"  FROM jsonb_to_record($6::jsonb) AS a(action text, reason text, rule bigint, subject text, details jsonb)) "
	"SELECT EXISTS (SELECT 1 FROM l), (SELECT count(*) FROM st WHERE st.stands)";

/* A hold whose user's identity row another transaction made meanwhile
 * (the statement's INSERT waited for it, its snapshot does not see it):
 * the request stored as before the thirty-second session, in a round
 * trip or two more (a race, once per user, not a trait of her). */
static cw_err consent_request_raced(PGconn *c, struct social_input *in, const char *rid, const char *exp,
				    const char *win, cw_errmsg *e)
{
	char lid[24];
	cw_err rc = identity_id(c, &in->local_u, true, in->local_network, NULL, lid, sizeof(lid), e);
	if (rc)
		return rc;
	const char *params[] = { lid, rid, exp, win };
	return store_command(c, "INSERT INTO consent_requests (local_identity_id, remote_identity_id, created_at, "
			     "expires_at) SELECT $1::bigint, $2::bigint, statement_timestamp(), "
			     "statement_timestamp() + make_interval(secs => $3::bigint) WHERE NOT EXISTS "
			     "(SELECT 1 FROM consent_requests q WHERE q.local_identity_id = $1::bigint AND "
			     "q.remote_identity_id = $2::bigint AND " CONSENT_REQUEST_STANDS_SQL("q", "$4::bigint")
			     ") ON CONFLICT DO NOTHING", 4, params, e);
}

static cw_err consent_request_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct social_input *in = j->data;
	json_t *details = json_pack("{s:s, s:s, s:s}", "sender", in->remote, "direction", "inbound", "type",
				    "consent_request");
	if (in->d.verdict == POLICY_LIMIT) { /* nothing stored but the record */
		j->retry_after_ms = in->d.retry_after_ms; /* not on j->req: this may run again */
		app_job_fail(j, 429, "rate_limited", "too many consent requests from this sender; retry later");
		json_object_set_new(details, "retry_after_ms", json_integer(in->d.retry_after_ms));
		return peer_audit_write(c, &in->d, in->local, details, e);
	}
	char pid[24], rid[24];
	snprintf(pid, sizeof(pid), "%lld", (long long)in->peer_id);
	cw_err rc = identity_id(c, &in->remote_u, false, in->peer_network, pid, rid, sizeof(rid), e);
	if (rc) {
		json_decref(details);
		return rc;
	}
	json_t *rec = peer_audit_record(&in->d, NULL, in->local, details);
	char *text = rec ? json_dumps(rec, JSON_COMPACT) : NULL;
	json_decref(rec);
	if (!text)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	char win[24], exp[24];
	snprintf(win, sizeof(win), "%lld", (long long)in->window_s);
	snprintf(exp, sizeof(exp), "%lld", (long long)in->expiry_s);
	bool hold = in->d.verdict == POLICY_HOLD;
	const char *params[] = { in->local, rid, exp, win, hold ? "t" : "f", text, in->local_u.domain, in->local_u.id,
				 in->local_network };
	PGresult *r = PQexecParams(c, consent_request_sql, 9, NULL, params, NULL, NULL, 0);
	free(text);
	rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	bool found = PQntuples(r) == 1 && PQgetvalue(r, 0, 0)[0] == 't';
	PQclear(r);
	if (hold && !found)
		rc = consent_request_raced(c, in, rid, exp, win, e);
	if (!rc)
		accepted(j);
	return rc;
}

void peer_api_consent_request(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	json_t *body;
	static const char *const known[] = { "requester", "target", NULL };
	struct social_input *in = begin(req, ctx, &body, known, "target");
	if (!in)
		return;
	json_decref(body);
	struct policy_view *v = policy_live_get(app->policy);
	struct policy_rate_memo memo;
	policy_rate_memo_init(&memo, app->limits);
	struct policy_request r = {
		.direction = POLICY_INBOUND, .action = POLICY_ACT_CONSENT_REQUEST,
		.sender = { in->remote, in->remote_u.domain, in->peer_network },
		.recipient = { in->local, in->local_u.domain, app_local_network(app) },
		.now_ms = cw_wall_ms(), .rate = &memo.rate,
	};
	policy_decide(v->snap, &r, &in->d);
	policy_rate_memo_finish(&memo);
	policy_count(app, &in->d);
	in->window_s = v->set.consent_window_s;
	in->expiry_s = v->set.held_expiry_s;
	policy_view_put(v);
	/* A limit's refusals after the first of an episode are answered
	 * here: only the first is recorded (consent_request_fn). */
	if (in->d.verdict == POLICY_LIMIT && !memo.first_refusal) {
		app_retry_after(req, in->d.retry_after_ms);
		cw_req_problem(req, 429, "rate_limited", "Too many requests",
			       "too many consent requests from this sender; retry later");
		social_free(in);
		return;
	}
	start(req, ctx, in, consent_request_fn, true);
}

/* A change of blocks (sql, its two params), whose statement tells every
 * daemon process of the local user whose facts it changed (a row of
 * pg_notify: policy_notify_user's payload, "x:<xid8>;u:<id>", so that a
 * process whose view has read the change already loads nothing for it)
 * and nobody when it changed nothing; whether it changed something into
 * *changed. */
static cw_err block_change(PGconn *c, const char *sql, const char *const params[2], bool *changed, cw_errmsg *e)
{
	PGresult *r = PQexecParams(c, sql, 2, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (!rc) {
		*changed = PQntuples(r) > 0;
		PQclear(r);
	}
	return rc;
}

/* A lift (granted, unblock) of the block of the two users named, if there
 * is one, and every daemon process told of it.  It makes neither user an
 * identity row: until the forty-eighth session it made both (both()), so
 * that a peer's "granted" for names it made up, which lifts nothing, made
 * each a user of this provider, listed in GET /admin/v1/users. */
static cw_err lift(PGconn *c, struct social_input *in, bool *changed, cw_errmsg *e)
{
	const char *params[] = { in->remote, in->local };
	return block_change(c,
		"WITH d AS (DELETE FROM blocks b USING identities x, identities y WHERE x.uri = $1 AND y.uri = $2 "
		"  AND y.is_local AND b.blocker_id = x.id AND b.blocked_id = y.id RETURNING b.blocked_id) "
		"SELECT pg_notify('causeway_policy', 'x:' || pg_current_xact_id() || ';u:' || blocked_id) FROM d",
		params, changed, e);
}

/* A block (revoked, block) of the local user by the remote one, and every
 * daemon process told of it, unless it is in force already: until the
 * forty-eighth session a peer repeating it had every process reload that
 * user's facts each time, and each wrote an audit record. */
static cw_err impose(PGconn *c, struct social_input *in, bool *changed, cw_errmsg *e)
{
	char rid[24], lid[24];
	cw_err rc = both(c, in, rid, lid, e);
	const char *params[] = { rid, lid };
	return rc ? rc : block_change(c,
		"WITH i AS (INSERT INTO blocks (blocker_id, blocked_id) VALUES ($1::bigint, $2::bigint) "
		"  ON CONFLICT DO NOTHING RETURNING blocked_id) "
		"SELECT pg_notify('causeway_policy', 'x:' || pg_current_xact_id() || ';u:' || blocked_id) FROM i",
		params, changed, e);
}

/* updateConsent: the peer's user grants or revokes consent to be contacted
 * by a local user.  Revoked is stored as that user blocking the local one
 * (the policy engine treats both alike; the block makes her an identity
 * row, a user never seen yet included, so that it holds when she first
 * writes); granted lifts it. */
static cw_err consent_update_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct social_input *in = j->data;
	bool changed = false;
	cw_err rc = in->flag ? lift(c, in, &changed, e) : impose(c, in, &changed, e);
	/* The operator sees who changed what, and every lift asked for (one
	 * of names made up included), but not a block already in force (the
	 * peer's answer is the same: no oracle). */
	if (!rc && (changed || in->flag)) {
		const char *ap[] = { in->peer_network, in->action, in->local, in->remote };
		rc = store_command(c, "INSERT INTO audit_log (actor, action, subject, details) "
				   "VALUES ($1, $2, $3, jsonb_build_object('user', $4::text))", 4, ap, e);
	}
	if (!rc)
		accepted(j);
	return rc;
}

static bool read_choice(struct cw_req *req, json_t *body, const char *name, const char *yes, const char *no,
			bool *out)
{
	json_t *v = json_object_get(body, name);
	if (json_is_string(v) && strcmp(json_string_value(v), yes) == 0)
		*out = true;
	else if (json_is_string(v) && strcmp(json_string_value(v), no) == 0)
		*out = false;
	else {
		char d[120];
		snprintf(d, sizeof(d), "%s must be \"%s\" or \"%s\"", name, yes, no);
		cw_req_problem(req, 400, "invalid_body", "Invalid body", d);
		return false;
	}
	return true;
}

void peer_api_consent_update(struct cw_req *req, void *ctx)
{
	json_t *body;
	static const char *const known[] = { "user", "target", "consent", NULL };
	struct social_input *in = begin(req, ctx, &body, known, "target");
	if (!in)
		return;
	bool ok = read_choice(req, body, "consent", "granted", "revoked", &in->flag);
	json_decref(body);
	if (!ok || !peer_updates_allowed(ctx, req)) {
		social_free(in);
		return;
	}
	in->action = in->flag ? "peer.consent.grant" : "peer.consent.revoke";
	start(req, ctx, in, consent_update_fn, true);
}

/* ------------------------------------------------------------ blocks */

static cw_err block_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct social_input *in = j->data;
	in->flag = !in->flag; /* block = revoke, unblock = grant */
	cw_err rc = consent_update_fn(c, j, e);
	in->flag = !in->flag; /* the job may run again */
	return rc;
}

void peer_api_block(struct cw_req *req, void *ctx)
{
	json_t *body;
	static const char *const known[] = { "blocker", "blocked", "action", NULL };
	struct social_input *in = begin(req, ctx, &body, known, "blocked");
	if (!in)
		return;
	bool ok = read_choice(req, body, "action", "block", "unblock", &in->flag);
	json_decref(body);
	if (!ok || !peer_updates_allowed(ctx, req)) {
		social_free(in);
		return;
	}
	in->action = in->flag ? "peer.block" : "peer.unblock";
	start(req, ctx, in, block_fn, true);
}

/* ------------------------------------------------------------ reports */

/* The first column of the first row sql ($1...: the n params) gives,
 * into out (len bytes), "" when it gives no row. */
static cw_err first_text(PGconn *c, const char *sql, int n, const char *const *params, char *out, size_t len,
			 cw_errmsg *e)
{
	PGresult *r = PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	snprintf(out, len, "%s", PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "");
	PQclear(r);
	return CW_OK;
}

/* The first evidence id (a JSON array, as text) that names a message kept
 * here the reporting peer was never party to, into bad; "" when none
 * does.  A message is the peer's when the reporter is (or was: one who
 * left still reports what she was sent) a member of its room, and the
 * peer sent it (origin_network, peer_network here) or was sent it: a row
 * of it to the peer that went out (delivered, in flight, or tried).  An
 * id of no message kept is taken as it comes: the message may have been
 * purged (docs/operations.md, "Retention"; its outbox rows go with it),
 * and a report keeps its ids as text for that reason.  Until the
 * forty-eighth session any id was stored, and a peer's report could cite
 * as its user's evidence a message of a conversation she never saw, which
 * the operator looking it up (GET /admin/v1/messages/{id}) read as what
 * the subject sent her; until the fifty-second session membership alone
 * was asked, in any state and at any time, so that a user taken out of a
 * group (or added to it late) cited what was written there while she was
 * not in it, and her peer never got. */
static cw_err foreign_evidence(PGconn *c, const char *evidence, const char *reporter, const char *peer_network,
			       char *bad, size_t len, cw_errmsg *e)
{
	const char *params[] = { evidence, reporter, peer_network };
	return first_text(c,
		"SELECT ev.public_id FROM jsonb_array_elements_text($1::jsonb) WITH ORDINALITY AS x(id, n) "
		"JOIN events ev ON ev.public_id = x.id WHERE NOT EXISTS (SELECT 1 FROM room_members m "
		"JOIN identities i ON i.id = m.identity_id WHERE m.room_id = ev.room_id AND i.uri = $2) "
		"OR (ev.origin_network <> $3 AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = ev.id "
		" AND o.destination = $3 AND (o.state IN ('delivered', 'in_flight', 'failed', 'dead') "
		" OR o.attempts > 0))) "
		"ORDER BY x.n LIMIT 1", 3, params, bad, len, e);
}

/* Whether the report is one of the same reporter's still open, the same
 * in every member (subject, reason, evidence in order, comment): a peer's
 * retry of a report whose answer it did not get (the routes take no
 * Idempotency-Key).  Until the forty-eighth session each was stored again,
 * a second open report in the operator's list and one more in the
 * subject's count.  The reporter's reports take turns (a transaction
 * lock, held to the commit, taken before the look, which then sees what
 * the one before committed): without it two sent at once to two daemon
 * processes both found none and both were stored. */
static cw_err report_open_already(PGconn *c, const struct policy_report *rep, bool *same, cw_errmsg *e)
{
	const char *params[] = { rep->reporter, rep->subject, rep->reason, rep->evidence, rep->comment };
	char t[2];
	*same = false;
	cw_err rc = first_text(c, "SELECT pg_advisory_xact_lock(hashtextextended('causeway.report:' || $1, 0))", 1,
			       params, t, sizeof(t), e);
	if (rc)
		return rc;
	rc = first_text(c,
		"SELECT EXISTS (SELECT 1 FROM reports WHERE reporter_kind = 'peer' AND reporter = $1 "
		"AND subject_uri = $2 AND reason_code = $3 AND handled_at IS NULL "
		"AND evidence_public_ids = ARRAY(SELECT jsonb_array_elements_text($4::jsonb)) "
		"AND comment IS NOT DISTINCT FROM $5)", 5, params, t, sizeof(t), e);
	*same = !rc && t[0] == 't';
	return rc;
}

static cw_err report_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct social_input *in = j->data;
	char pid[24], bad[MIMI_URI_MAX + 1] = "";
	snprintf(pid, sizeof(pid), "%lld", (long long)in->peer_id);
	char *evidence = json_dumps(in->evidence, JSON_COMPACT);
	const struct policy_report rep = { .reporter_kind = "peer", .reporter = in->remote, .peer_id = pid,
					   .subject = in->local, .reason = in->reason, .evidence = evidence,
					   .comment = in->comment, .actor = in->peer_network };
	bool same = false;
	cw_err rc = evidence ? foreign_evidence(c, evidence, in->remote, in->peer_network, bad, sizeof(bad), e)
			     : cw_fail(e, CW_ENOMEM, "out of memory");
	if (!rc && bad[0]) /* nothing stored */
		app_job_fail(j, 400, "invalid_body",
			     "evidence %s is no message of a conversation of the reporter's that her provider sent "
			     "or was sent", bad);
	else if (!rc && !(rc = report_open_already(c, &rep, &same, e)) && !same)
		rc = policy_report_store(c, j->app, &rep, NULL, NULL, e);
	free(evidence);
	if (!rc && !bad[0])
		accepted(j);
	return rc;
}

void peer_api_report(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	json_t *body;
	static const char *const known[] = { "reporter", "subject", "reason", "evidence", "comment", NULL };
	/* the subject read as every local user named here (user_member:
	 * until the forty-eighth session a name in the namespace of the
	 * gateway's own Matrix bot and ghosts, refused by every other
	 * call, was stored as a report against a user of this provider) */
	struct social_input *in = begin(req, ctx, &body, known, "subject");
	if (!in)
		return;
	json_t *reason = json_object_get(body, "reason");
	json_t *evidence = json_object_get(body, "evidence"), *comment = json_object_get(body, "comment");
	char why[200];
	const char *bad = policy_report_fields_problem(reason, evidence, comment, why, sizeof(why));
	if (bad)
		cw_req_problem(req, 400, "invalid_body", "Invalid body", bad);
	if (bad || !peer_updates_allowed(app, req)) {
		json_decref(body);
		social_free(in);
		return;
	}
	snprintf(in->reason, sizeof(in->reason), "%s", json_string_value(reason));
	in->evidence = evidence ? json_incref(evidence) : json_array();
	in->comment = comment ? strdup(json_string_value(comment)) : NULL;
	json_decref(body);
	if (!in->evidence || (comment && !in->comment)) {
		/* the report as sent or none: never stored without its comment
		 * (until the forty-sixth session a comment out of memory was
		 * stored as none, and the report answered 202) */
		social_free(in);
		cw_req_no_memory(req);
		return;
	}
	start(req, ctx, in, report_fn, true);
}

/* ------------------------------------------------------------ discovery */

static cw_err query_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct social_input *in = j->data;
	const char *params[] = { in->local };
	/* Exact match, discoverable users only: an unknown and a hidden user
	 * give the same empty answer. */
	PGresult *r = PQexecParams(c, "SELECT uri FROM identities WHERE uri = $1 AND is_local AND discoverable", 1, NULL,
				   params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	json_t *matches = json_array();
	for (int i = 0; i < PQntuples(r); i++)
		json_array_append_new(matches, json_string(PQgetvalue(r, i, 0)));
	PQclear(r);
	j->body = json_pack("{s:o}", "matches", matches);
	return CW_OK;
}

void peer_api_identifier_query(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	if (!peer_api_enabled(app, req))
		return;
	json_t *body = app_json_body(req);
	if (!body)
		return;
	json_t *handle = json_object_get(body, "handle");
	struct social_input *in = calloc(1, sizeof(*in));
	if (!in) { /* until the forty-sixth session 400 invalid_body, the client's fault */
		json_decref(body);
		cw_req_no_memory(req);
		return;
	}
	cw_errmsg e;
	/* Room for the longest domain and local part, which together are
	 * longer than an identifier may be (MIMI_URI_MAX): the parser says
	 * so.  Until the fifty-second session the text was cut at
	 * MIMI_URI_MAX bytes, and with a long server.domain a handle too long
	 * to be anyone's was looked up as its first bytes, another user. */
	char uri[sizeof("mimi://") + MIMI_DOMAIN_MAX + sizeof("/u/") + MIMI_LOCAL_MAX];
	bool ok = json_is_string(handle) && json_string_length(handle) <= MIMI_LOCAL_MAX &&
		  json_object_size(body) == 1;
	if (ok) {
		int w = snprintf(uri, sizeof(uri), "mimi://%s/u/%s", app->cfg->domain, json_string_value(handle));
		struct mimi_uri u;
		ok = w > 0 && (size_t)w < sizeof(uri) && mimi_uri_parse(uri, &u, &e) == CW_OK;
		if (ok)
			peer_local_fold(app, &u, uri);
	}
	json_decref(body);
	if (!ok) {
		free(in);
		cw_req_problem(req, 400, "invalid_body", "Invalid body",
			       "the body is {\"handle\": \"<local part>\"}: a user name or an E.164 number such as +4915112345678");
		return;
	}
	/* Each peer has policy.identifier_queries_per_minute: discovery by
	 * exact match is a lookup a peer could otherwise run through every
	 * phone number at the speed of its requests. */
	struct policy_view *v = policy_live_get(app->policy);
	int64_t per_minute = v->set.identifier_queries_per_minute;
	policy_view_put(v);
	if (!peer_bucket(app, req, "idq", per_minute, "identifier queries")) {
		free(in);
		return;
	}
	/* at most MIMI_URI_MAX bytes: the parser took it */
	size_t n = strnlen(uri, sizeof(in->local) - 1);
	memcpy(in->local, uri, n);
	in->local[n] = '\0';
	start(req, ctx, in, query_fn, false);
}

/* ------------------------------------------------------------ profiles */

#define DISPLAY_NAME_MAX 256

/* The peer's word on one of its users: name and avatar, as its local
 * network shows them (a Matrix ghost's).  Stored on the user's identity;
 * profile_changed_at moves only when something changed, and profile_xid
 * with it: the id of the transaction, the order in which the XMPP
 * component sends the changes (xa_profiles, schema/040). */
static cw_err profile_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct social_input *in = j->data;
	char pid[24], remote_id[24];
	snprintf(pid, sizeof(pid), "%lld", (long long)in->peer_id);
	cw_err rc = identity_id(c, &in->remote_u, false, in->peer_network, pid, remote_id, sizeof(remote_id), e);
	if (rc)
		return rc;
	const char *params[] = { remote_id, in->has_display ? "t" : "f", in->display, in->has_avatar ? "t" : "f",
				 in->avatar };
	PGresult *r = PQexecParams(c,
		"WITH n AS (SELECT CASE WHEN $2::boolean THEN $3 ELSE display_name END AS d, "
		"  CASE WHEN $4::boolean THEN $5::jsonb ELSE avatar END AS a FROM identities WHERE id = $1::bigint), "
		"u AS (UPDATE identities i SET display_name = n.d, avatar = n.a, profile_changed_at = now(), "
		"  profile_xid = pg_current_xact_id()::text::bigint FROM n "
		"  WHERE i.id = $1::bigint AND (i.display_name IS DISTINCT FROM n.d OR i.avatar IS DISTINCT FROM n.a)) "
		"SELECT n.d, n.a::text FROM n",
		5, NULL, params, NULL, NULL, 0);
	rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	j->status = 200;
	j->body = json_pack("{s:s, s:o, s:o}", "user", in->remote,
			    "display_name", PQgetisnull(r, 0, 0) ? json_null() : json_string(PQgetvalue(r, 0, 0)),
			    "avatar", PQgetisnull(r, 0, 1) ? json_null() : json_loads(PQgetvalue(r, 0, 1), 0, NULL));
	PQclear(r);
	return CW_OK;
}

/* Why display_name cannot be one (NULL: it can). */
static const char *display_bad(const json_t *v)
{
	if (!json_is_string(v) || json_string_length(v) < 1 || json_string_length(v) > DISPLAY_NAME_MAX)
		return "display_name must be null or a string of 1 to 256 bytes";
	if (cw_utf8_has_control(json_string_value(v), json_string_length(v)))
		return "display_name may not hold control characters";
	/* since the thirty-first session: an XMPP server closes the stream
	 * that carries U+FFFE or U+FFFF (xmpp_vcard.c writes the name) */
	if (cw_utf8_has_noncharacter(json_string_value(v), json_string_length(v)))
		return "display_name may not hold noncharacters (U+FFFE, U+FFFF, U+FDD0-U+FDEF, ...)";
	return NULL;
}

void peer_api_profile(struct cw_req *req, void *ctx)
{
	json_t *body;
	static const char *const known[] = { "user", "display_name", "avatar", NULL };
	struct social_input *in = begin(req, ctx, &body, known, NULL);
	if (!in)
		return;
	json_t *dn = json_object_get(body, "display_name"), *av = json_object_get(body, "avatar");
	const char *bad = NULL;
	char detail[300];
	if (!dn && !av)
		bad = "give display_name, avatar or both (null removes one)";
	if (!bad && dn && !json_is_null(dn))
		bad = display_bad(dn);
	if (!bad && av && !json_is_null(av)) {
		/* An avatar is an attachment (checked as one: the same limits)
		 * that is an image at an https:// URL. */
		struct event_limits lim = event_limits_default();
		struct event ev;
		struct event_error err;
		json_t *probe = json_pack("{s:s, s:{s:[O]}}", "type", "message", "content", "attachments", av);
		const char *ct = json_string_value(json_object_get(av, "content_type"));
		const char *url = json_string_value(json_object_get(av, "url"));
		if (!probe || event_from_json(probe, &lim, 0, &ev, &err) != CW_OK) {
			snprintf(detail, sizeof(detail), "avatar must be an attachment object: %s", probe ? err.detail : "");
			bad = detail;
		} else {
			event_free(&ev);
			if (strncmp(ct, "image/", 6) != 0 || strncmp(url, "https://", 8) != 0)
				bad = "avatar must be an image at an https:// URL";
		}
		json_decref(probe);
	}
	if (bad)
		cw_req_problem(req, 400, "invalid_body", "Invalid body", bad);
	if (bad || !peer_profiles_allowed(ctx, req)) {
		json_decref(body);
		social_free(in);
		return;
	}
	in->has_display = dn != NULL;
	in->has_avatar = av != NULL;
	in->display = dn && !json_is_null(dn) ? strdup(json_string_value(dn)) : NULL;
	in->avatar = av && !json_is_null(av) ? json_dumps(av, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
	bool lost = (dn && !json_is_null(dn) && !in->display) || (av && !json_is_null(av) && !in->avatar);
	json_decref(body); /* dn and av are gone with it */
	if (lost) {
		social_free(in);
		cw_req_no_memory(req);
		return;
	}
	start(req, ctx, in, profile_fn, true);
}

