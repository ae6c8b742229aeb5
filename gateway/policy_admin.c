/* /admin/v1 for the policy (see policy_admin.h).
 *
 * Each handler validates its input in C, then runs one statement that does
 * the change (if any) and builds the JSON answer in PostgreSQL.  A change
 * is then recorded in the audit log with the answer as its details, and
 * NOTIFY causeway_policy makes every daemon process reload its snapshot
 * (not for a report's handling or dismissal: the policy reads neither); a
 * consent change also runs the sweep for that user in the same
 * transaction, so the held messages are released (in order) or dropped
 * before the answer. */
#include "config.h"
#include "policy_admin.h"
#include "outbox_admin.h"
#include "app.h"
#include "admin_auth.h"
#include "event.h"
#include "peer_api.h"
#include "peers.h"
#include "policy_json.h"
#include "policy_live.h"
#include "store.h"
#include "utf8.h"
#include "log.h"
#include "xmpp/xmpp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAXP 16
#define COMMENT_MAX 1024

/* One statement, one row, one column: the answer as JSON text. */
struct aq {
	const char *sql;
	int n;
	char *p[MAXP];
	int status;           /* on success */
	int none_status;      /* when the statement returns no row (404, 409) */
	const char *none_detail;
	const char *action;   /* a change: the audit action */
	int subject;          /* the parameter naming the subject (-1: none) */
	int local;            /* the parameter holding a local user's URI, replaced by its id before the
			         statement (-1: none); the identity is made if it does not exist */
	bool consent;         /* a consent change (user $1, kind $2, subject $3, state $4, the user as
			         given $5): applied with policy_consent_apply, answered without a
			         statement (sql NULL) */
	char local_id[24];    /* the local user's id (local >= 0), once resolved */
	bool known_only;      /* local: a user not known is not made; the change is then a no-op */
	bool noop;            /* known_only and the user is not known, or a repeat (repeat_col; a
			         consent's: policy_consent_apply): answered, not audited, nothing
			         reloaded */
	bool repeat_col;      /* the statement's second column says whether it changed anything: false
			         is a repeat of the state stored (an opt-in or settings as they are),
			         answered as a change is, with no audit record and no NOTIFY, as a
			         token's or a peer's repeat is */
	bool rule_record;     /* a rule's change: its audit record names the rule (rule_id, the
			         answer's id) */
	bool not_policy;      /* a change of nothing the policy reads (a report's handling, a report
			         that made no limit): no NOTIFY, no wait for this process's reload */
	bool peer_subject;    /* consent: its subject ($3, kind $2) must be of a peer's domain, asked
			         before anything is made (policy_peer_of_domain) */
	bool peer_network;    /* opt-in: its network ($2, peer:<name>) must be a peer's, asked before
			         anything is made */
	const char *records;  /* a page of this table's records: the id up to which every row is
			         committed (app_list_horizon) is the statement's last parameter */
	char xid[POLICY_XID_LEN]; /* a change the policy reads: its transaction, for the sync ("": none) */
};

static void aq_free(void *arg)
{
	struct aq *q = arg;
	for (int i = 0; i < q->n; i++)
		free(q->p[i]);
	free(q);
}

static struct aq *aq_new(const char *sql)
{
	struct aq *q = calloc(1, sizeof(*q));
	if (q) {
		q->sql = sql;
		q->status = 200;
		q->none_status = 404;
		q->subject = -1;
		q->local = -1;
	}
	return q;
}

/* Appends a parameter (NULL: SQL NULL). */
static void aq_param(struct aq *q, const char *v)
{
	if (q->n < MAXP)
		q->p[q->n++] = v ? strdup(v) : NULL;
}

static void aq_num(struct aq *q, long long v)
{
	char b[32];
	snprintf(b, sizeof(b), "%lld", v);
	aq_param(q, b);
}

/* The id of the local user u into out, or "" when no such user is known
 * (none is made: see struct aq's known_only). */
static cw_err local_identity_known(PGconn *c, const struct mimi_uri *u, char *out, size_t outlen, cw_errmsg *e)
{
	char uri[MIMI_URI_MAX + 1];
	mimi_uri_format(u, uri, sizeof(uri), NULL); /* as identity_id stores it */
	const char *params[] = { uri };
	PGresult *r = PQexecParams(c, "SELECT id FROM identities WHERE uri = $1 AND is_local", 1, NULL, params, NULL,
				   NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	snprintf(out, outlen, "%s", PQntuples(r) ? PQgetvalue(r, 0, 0) : "");
	PQclear(r);
	return CW_OK;
}

/* Whether the consent subject (kind user: a user URI; domain) is of a
 * peer's domain; if not, the job is answered 422 unknown_peer_domain. */
static cw_err subject_of_peer(PGconn *c, struct app_job *j, const char *kind, const char *subject, bool *ok,
			      cw_errmsg *e)
{
	struct mimi_uri u;
	const char *domain = subject;
	if (strcmp(kind, "user") == 0) {
		if (mimi_uri_parse(subject, &u, e))
			return cw_fail(e, CW_EINVAL, "not a user URI");
		domain = u.domain;
	}
	char peer[PEER_NAME_MAX];
	cw_err rc = policy_peer_of_domain(c, domain, peer, sizeof(peer), e);
	if (rc)
		return rc;
	*ok = peer[0] != '\0';
	if (!*ok)
		app_job_fail(j, 422, "unknown_peer_domain",
			     "%s is the domain of no peer: a remote sender's domain is its peer's own, so a consent "
			     "of %s would match no one. Nothing was stored; create the peer first (POST "
			     "/admin/v1/peers)",
			     domain, subject);
	return CW_OK;
}

/* Whether network (peer:<name>) is a configured peer's, enabled or not;
 * if not, the job is answered 422 unknown_peer. */
static cw_err network_of_peer(PGconn *c, struct app_job *j, const char *network, bool *ok, cw_errmsg *e)
{
	const char *params[] = { network + 5 };
	PGresult *r = PQexecParams(c, "SELECT 1 FROM peers WHERE name = $1", 1, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	*ok = PQntuples(r) == 1;
	PQclear(r);
	if (!*ok)
		app_job_fail(j, 422, "unknown_peer",
			     "%s is the network of no peer: an opt-in for it would be asked of no sender. Nothing was "
			     "stored; create the peer first (POST /admin/v1/peers)",
			     network);
	return CW_OK;
}

static cw_err aq_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct aq *q = j->data;
	const char *params[MAXP + 1];
	char local_id[24] = "", upto[24];
	for (int i = 0; i < q->n; i++)
		params[i] = q->p[i];
	int n = q->n;
	if (q->records) {
		cw_err rc = app_list_horizon(c, j, q->records, upto, e);
		if (rc || j->err_code)
			return rc;
		params[n++] = upto;
	}
	if (q->peer_subject || q->peer_network) {
		bool ok;
		cw_err rc = q->peer_subject ? subject_of_peer(c, j, q->p[1], q->p[2], &ok, e)
					    : network_of_peer(c, j, q->p[1], &ok, e);
		if (rc || !ok)
			return rc;
	}
	if (q->local >= 0 && q->p[q->local]) {
		struct mimi_uri u;
		if (mimi_uri_parse(q->p[q->local], &u, e))
			return cw_fail(e, CW_EINVAL, "not a user URI");
		cw_err rc = q->known_only ? local_identity_known(c, &u, local_id, sizeof(local_id), e)
					  : identity_id(c, &u, true, app_local_network(j->app), NULL, local_id,
							sizeof(local_id), e);
		if (rc)
			return rc;
		q->noop = !local_id[0];
		params[q->local] = q->noop ? NULL : local_id;
		snprintf(q->local_id, sizeof(q->local_id), "%s", local_id);
	}
	long counts[3] = { 0, 0, 0 }, decided = 0;
	if (q->consent && local_id[0]) {
		/* a repeat (policy_consent_apply): q->noop */
		struct policy_view *v = policy_live_get(j->app->policy);
		cw_err crc = policy_consent_apply(c, v, local_id, params[1], params[2], params[3], "admin", counts,
						  &decided, &q->noop, e);
		policy_view_put(v);
		if (crc)
			return crc;
	}
	PGresult *r;
	cw_err rc;
	json_t *body;
	if (q->consent) {
		/* The answer says what was asked ($5 the user as given) and
		 * what it did: built here (until the fifty-fourth session a
		 * statement built it, json_build_object of its parameters, a
		 * round trip for nothing the database knew). */
		body = json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:I}", "user", q->p[4], "subject_kind", q->p[1],
				 "subject", q->p[2], "state", q->p[3], "released", (json_int_t)counts[0], "dropped",
				 (json_int_t)counts[1], "requests_decided", (json_int_t)decided);
		if (!body)
			return cw_fail(e, CW_ENOMEM, "out of memory");
	} else {
		r = PQexecParams(c, q->sql, n, NULL, params, NULL, NULL, 0);
		if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
			return rc;
		if (PQntuples(r) == 0 || PQgetisnull(r, 0, 0)) {
			PQclear(r);
			app_job_fail(j, q->none_status, q->none_status == 409 ? "conflict" : "not_found", "%s",
				     q->none_detail);
			return CW_OK;
		}
		body = json_loads(PQgetvalue(r, 0, 0), JSON_DECODE_ANY, NULL);
		if (q->repeat_col && PQnfields(r) > 1 && strcmp(PQgetvalue(r, 0, 1), "t") != 0)
			q->noop = true;
		PQclear(r);
		if (!body)
			return cw_fail(e, CW_EINTERNAL, "the database gave an answer that is not JSON");
	}
	if (json_is_string(body)) { /* the statement names what does not exist */
		app_job_fail(j, 404, "not_found", "no %s with that id", json_string_value(body));
		json_decref(body);
		return CW_OK;
	}
	if (q->action && !q->noop) {
		char *details = json_dumps(body, JSON_COMPACT), rule[24] = "";
		json_t *id = q->rule_record ? json_object_get(body, "id") : NULL;
		if (json_is_integer(id))
			snprintf(rule, sizeof(rule), "%lld", (long long)json_integer_value(id));
		/* A change of one local user's facts (opt-in, consent): every
		 * process reloads that user's alone; anything else, all ($6,
		 * NULL).  A consent's is sent by policy_consent_apply (until
		 * the fifty-first session a second pg_notify of the same
		 * payload followed it here: one round trip for nothing,
		 * PostgreSQL delivering one of the two), a change of nothing
		 * the policy reads sends none ($7 false). */
		bool notify = !q->not_policy && !q->consent;
		const char *ap[] = { q->action, q->subject >= 0 ? q->p[q->subject] : NULL, details ? details : "{}",
				     admin_actor(j->req), rule[0] ? rule : NULL,
				     q->local >= 0 && local_id[0] ? local_id : NULL, notify ? "t" : "f" };
		/* The record names the change's transaction too: the sync
		 * waits for a view that has it, and loads nothing for it when
		 * its NOTIFY's load has.  Until the fifty-third session a
		 * statement of its own read it after the NOTIFY
		 * (policy_change_xid): one round trip more for each change.
		 * The NOTIFY is the record's statement's (until the
		 * fifty-fourth session one of its own followed it:
		 * policy_notify_user). */
		r = PQexecParams(c, "WITH a AS (INSERT INTO audit_log (actor, action, subject, details, rule_id) "
				    "VALUES ($4, $1, $2, $3::jsonb, $5::bigint) RETURNING pg_current_xact_id()::text AS x) "
				    "SELECT a.x, CASE WHEN $7::boolean THEN " POLICY_NOTIFY_EXPR("$6::bigint") " END FROM a",
				 7, NULL, ap, NULL, NULL, 0);
		free(details);
		if ((rc = store_check(c, r, PGRES_TUPLES_OK, e))) {
			json_decref(body);
			return rc;
		}
		if (!q->not_policy)
			snprintf(q->xid, sizeof(q->xid), "%s", PQgetvalue(r, 0, 0));
		PQclear(r);
	}
	j->status = q->status;
	j->body = body;
	return CW_OK;
}

/* The answer to a change comes once this process has the change in
 * force (the others follow on the NOTIFY within milliseconds). */
static void poke_after(struct app_job *j)
{
	const struct aq *q = j->data;
	if (q && (q->noop || q->not_policy)) /* nothing the policy reads changed */
		return;
	/* A change of one user's facts: that user's alone (an overlay). */
	bool ok = q && q->local_id[0] ? policy_live_sync_user(j->app->policy, atoll(q->local_id), q->xid, 2000)
				      : policy_live_sync(j->app->policy, q ? q->xid : NULL, 2000);
	if (!ok)
		LOG_KV(CW_LOG_WARN, "the policy change is committed but not yet in force here (reload slow or failing)");
}

/* Runs fn on q (a change when write: answered once in force here). */
static void aq_start(struct cw_app *app, struct cw_req *req, struct aq *q,
		     cw_err (*fn)(PGconn *, struct app_job *, cw_errmsg *), bool write)
{
	struct app_job *j = app_job_new(app, req, fn);
	if (!j) {
		aq_free(q);
		app_job_run(app, req, aq_fn, NULL, NULL, false); /* answers 503 */
		return;
	}
	j->data = q;
	j->data_free = aq_free;
	if (write) {
		j->after = poke_after;
		j->after_waits = true;
	}
	app_job_start(j, write);
}

static void aq_run(struct cw_app *app, struct cw_req *req, struct aq *q)
{
	if (!q)
		app_job_run(app, req, aq_fn, NULL, NULL, false);
	else
		aq_start(app, req, q, aq_fn, q->action != NULL);
}

/* A page of a list: $1 after, $2 limit. */
static struct aq *aq_page(long long after, long limit, const char *sql)
{
	struct aq *q = aq_new(sql);
	if (q) {
		aq_num(q, after);
		aq_num(q, limit);
	}
	return q;
}

/* ------------------------------------------------------------ inputs */

static void bad_query(struct cw_req *req, const char *detail)
{
	cw_req_problem(req, 400, "invalid_query", "Invalid query", detail);
}

static void bad_body(struct cw_req *req, const char *detail)
{
	cw_req_problem(req, 400, "invalid_body", "Invalid body", detail);
}

/* A user URI; local: of this provider's domain.  NULL when valid. */
static const char *user_uri_problem(struct cw_app *app, const char *s, bool local)
{
	struct mimi_uri u;
	cw_errmsg e;
	if (!s || mimi_uri_parse(s, &u, &e) || u.kind != MIMI_USER)
		return "must be a user URI mimi://<domain>/u/<local>";
	if (local && strcmp(u.domain, app->cfg->domain ? app->cfg->domain : "") != 0)
		return "must be a user of this provider's domain";
	return NULL;
}

/* A local user's URI (user_uri_problem's, local) as the peer API takes
 * it, into out (MIMI_URI_MAX + 1 bytes): folded to lower case where the
 * local network is XMPP's alone (peer_local_fold), refused where it is
 * Matrix's and the name is the gateway's bot's or a ghost's
 * (peer_local_refused, the reason into why).  Until the thirty-first
 * session "mimi://<domain>/u/Alice" made a user of its own here, whose
 * opt-in and consents no message to alice ever met. */
static const char *local_user_fold(struct cw_app *app, const char *s, char *out, struct mimi_uri *u)
{
	const char *p = user_uri_problem(app, s, true);
	if (p)
		return p;
	cw_errmsg e;
	if (strlen(s) > MIMI_URI_MAX || mimi_uri_parse(s, u, &e))
		return "must be a user URI mimi://<domain>/u/<local>";
	snprintf(out, MIMI_URI_MAX + 1, "%s", s);
	peer_local_fold(app, u, out);
	return NULL;
}

static const char *local_user_problem(struct cw_app *app, const char *s, char *out, char *why, size_t len)
{
	struct mimi_uri u;
	const char *p = local_user_fold(app, s, out, &u);
	return p ? p : peer_local_refused(app, &u, out, why, len);
}

/* A list's ?user= filter (GET users, consent-requests, held): a local
 * user's URI folded as the writes fold it (local_user_fold), into out
 * (MIMI_URI_MAX + 1 bytes), *user pointing at it; NULL when there is no
 * filter.  False: refused with 400 (answered).  Until the thirty-ninth
 * session the filter was compared as typed, so that on an XMPP-only
 * deployment "mimi://<domain>/u/Alice" found nothing of the alice that
 * POST /optins made of the same spelling. */
static bool user_filter(struct cw_app *app, struct cw_req *req, char *out, const char **user)
{
	const char *s = cw_req_query(req, "user");
	struct mimi_uri u;
	*user = NULL;
	if (!s)
		return true;
	if (local_user_fold(app, s, out, &u)) {
		bad_query(req, "user must be a user URI of this provider");
		return false;
	}
	*user = out;
	return true;
}

/* A domain pattern of a rule, or a domain subject of a consent (no
 * wildcard), as an address's domain can be (mimi_domain_check); until the
 * twenty-first session "gk..example" and a name without a dot were stored
 * as subjects, and patterns no address can match as rules.  A wildcard
 * *.x covers the names <label>.x: x need be a domain only with a label
 * before it (*.example covers a.example).  A user pattern or subject is
 * a user URI whose domain is one so.
 *
 * Why s is no domain (user false; a wildcard *.x where wildcard) or user
 * URI (user true) an address can have, into why: the parser's reason,
 * and where the name is a spelling of one that is, what to write
 * instead: an internationalized domain in its ASCII form (xn--..., the
 * form every address carries, so that a rule or consent of bücher.example
 * would match no one), a domain without its final dot.  Until the
 * forty-eighth session the answer said only "must be a lower-case
 * domain", also of example.org. (lower case) and of bücher.example, and
 * left the operator guessing.  False when s is valid. */
static bool address_why(const char *s, bool user, bool wildcard, char *why, size_t len)
{
	cw_errmsg e;
	struct mimi_uri u;
	const char *d = s;
	size_t n;
	cw_err rc;
	if (!s) {
		snprintf(why, len, "it is missing or not a string");
		return true;
	}
	if (user) {
		rc = mimi_uri_parse(s, &u, &e);
		if (!rc && u.kind != MIMI_USER)
			rc = cw_fail(&e, CW_EINVAL, "it names a room (/r/), not a user (/u/)");
		d = strncmp(s, "mimi://", 7) == 0 ? s + 7 : s;
		n = strcspn(d, "/:?#");
	} else {
		n = strlen(s);
		char buf[MIMI_DOMAIN_MAX + 1];
		if (n > MIMI_DOMAIN_MAX) {
			rc = mimi_domain_check(s, n, &e); /* its "longer than" */
		} else {
			memcpy(buf, s, n + 1);
			if (wildcard && n >= 2 && s[0] == '*' && s[1] == '.')
				buf[0] = 'a';
			rc = mimi_domain_check(buf, n, &e);
		}
	}
	if (rc == CW_OK)
		return false;
	bool wide = false;
	for (size_t i = 0; i < n; i++)
		wide = wide || (unsigned char)d[i] >= 0x80;
	snprintf(why, len, "%s%s", e.msg,
		 wide ? " (an internationalized domain is written in its ASCII form, xn--..., as every address "
			"carries it)"
		 : n > 1 && d[n - 1] == '.' ? " (write the domain without its final dot)"
					    : "");
	return true;
}

static const char *str(json_t *o, const char *k)
{
	json_t *v = json_object_get(o, k);
	return json_is_string(v) ? json_string_value(v) : NULL;
}

/* ------------------------------------------------------------ rules */

/* A rule's expiry: 'infinity' and '-infinity', which SQL alone writes
 * (policy_live.c: no expiry; past), as that text. */
#define RULE_EXPIRY(x) "coalesce(" APP_SQL_TS(x) ", " x "::text)"

#define RULE_JSON \
	"json_build_object('id', id, 'scope', scope, 'pattern', pattern, 'mode', mode, 'limits', limits, " \
	" 'enabled', enabled, 'comment', comment, 'created_by', created_by, 'created_at', " APP_SQL_TS("created_at") ", " \
	" 'updated_at', " APP_SQL_TS("updated_at") ", 'expires_at', " RULE_EXPIRY("expires_at") ")"

/* The page wrapper: rows of x (which has an id) as JSON objects j. */
#define PAGE(JSON, FROM) \
	"SELECT json_build_object('rows', coalesce(json_agg(" JSON " ORDER BY x.id), '[]'::json), " \
	" 'next_after', CASE WHEN count(*) = $2::int THEN max(x.id) END)::text FROM " FROM

void policy_admin_rules_list(struct cw_req *req, void *ctx)
{
	long long after;
	long limit;
	if (!app_paging(req, &after, &limit))
		return;
	const char *scope = cw_req_query(req, "scope");
	enum policy_scope sc;
	if (scope && !policy_scope_parse(scope, &sc)) {
		bad_query(req, "scope must be domain, network or user");
		return;
	}
	struct aq *q = aq_page(after, limit, PAGE("json_build_object('id', x.id, 'scope', x.scope, 'pattern', x.pattern, "
				   "'mode', x.mode, 'limits', x.limits, 'enabled', x.enabled, 'comment', x.comment, "
				   "'created_by', x.created_by, 'created_at', " APP_SQL_TS("x.created_at") ", 'updated_at', " APP_SQL_TS("x.updated_at") ", "
				   "'expires_at', " RULE_EXPIRY("x.expires_at") ")",
				   "(SELECT * FROM rules WHERE id > $1::bigint AND ($3::text IS NULL OR scope = $3) "
				   "ORDER BY id LIMIT $2::int) x"));
	if (q) {
		aq_param(q, scope);
	}
	aq_run(ctx, req, q);
}

/* Checks a rule's pattern the way the engine will read it; why (len
 * bytes): the reason address_why gives for a domain or user pattern, ""
 * when it gives none. */
static bool pattern_valid(enum policy_scope scope, const char *pattern, char *why, size_t len)
{
	why[0] = '\0';
	struct policy_builder *b = policy_builder_new();
	if (!b)
		return false;
	int rc = policy_builder_rule(b, 1, scope, pattern, POLICY_MODE_OPEN, NULL, 0);
	policy_builder_free(b);
	if (scope == POLICY_SCOPE_DOMAIN || scope == POLICY_SCOPE_USER)
		return !address_why(pattern, scope == POLICY_SCOPE_USER, true, why, len) && rc == 0;
	if (rc != 0)
		return false;
	/* The engine asks the rules of the remote party, whose network is
	 * always a peer's (peer:<name>: every message from outside comes
	 * through a peer; matrix and xmpp are local users' networks), so a
	 * network rule names a peer by a name a peer can have, the rule of
	 * POST /admin/v1/peers, or is peer:* for every peer.  Until the
	 * twenty-fourth session the engine's looser instance took peer:GK or
	 * peer:gk.example, and until the thirtieth any network name (matrix,
	 * xmpp, a typo): stored, audited and never matched.  The database's
	 * check stays the vocabulary's shape (docs/schema.md). */
	if (strncmp(pattern, "peer:", 5) != 0)
		return false;
	return strcmp(pattern + 5, "*") == 0 || peer_name_valid(pattern + 5);
}

/* Whether s, a valid domain (user false) or user URI (user true), names an
 * XMPP component's domain, and then why it is no rule's pattern or
 * consent's subject, into why (len bytes).  A component's contact
 * (mimi://<component>/u/wally, the JID wally@<component>) stands for a
 * user of its peer, whose messages carry the address on the peer's own
 * domain: the policy asks about that one, so a rule or consent naming the
 * component's would match no one.  app_domain_is_ours counts the
 * component's domain among this provider's, and until the fiftieth
 * session the refusal said so ("this provider's own domain ... a local
 * user"), of what is a remote party; POST /reports takes the address and
 * stores it as the peer's user's (report_subject). */
static bool component_why(struct cw_app *app, const char *s, bool user, char *why, size_t len)
{
	struct mimi_uri u;
	cw_errmsg e;
	const char *d = s;
	if (user) {
		if (mimi_uri_parse(s, &u, &e) != CW_OK)
			return false;
		d = u.domain;
	}
	const char *peer = app->xmpp ? xa_component_peer(app->xmpp, d) : NULL;
	if (!peer)
		return false;
	if (user)
		snprintf(why, len,
			 "%s is the XMPP contact %s@%s, which stands for a user of peer:%s, whose messages carry "
			 "their address on that peer's own domain: name them by it, mimi://<the domain of peer "
			 "%s>/u/%s (GET /admin/v1/peers/%s gives the domain)",
			 s, u.id, d, peer, peer, u.id, peer);
	else
		snprintf(why, len,
			 "%s is the domain of the XMPP component that stands for peer:%s, whose users' addresses "
			 "carry that peer's own domain: name it (GET /admin/v1/peers/%s gives it)",
			 d, peer, peer);
	return true;
}

/* The domain of this provider's own (app_domain_is_ours) that a valid
 * pattern names, a user of its or the domain itself, into own; false when
 * it names a remote party's.  The engine asks the rules about the remote
 * party only (a peer's user, domain and network: peers may not have a
 * domain of this provider's), so such a rule would match nothing; until
 * the thirty-second session it was stored, audited and shown, and the
 * local user it was meant to stop went on.  A wildcard *.x matches the
 * names under x, which may be remote ones (*.org covers wa.org), never x
 * itself: it is taken. */
static bool pattern_ours(struct cw_app *app, enum policy_scope scope, const char *pattern, char *own, size_t len)
{
	struct mimi_uri u;
	cw_errmsg e;
	const char *d = NULL;
	if (scope == POLICY_SCOPE_DOMAIN)
		d = pattern;
	else if (scope == POLICY_SCOPE_USER && mimi_uri_parse(pattern, &u, &e) == CW_OK)
		d = u.domain;
	if (!d || !app_domain_is_ours(app, d))
		return false;
	snprintf(own, len, "%s", d);
	return true;
}

/* mode (string or null), limits, enabled, comment, expires_in_s of a rule
 * body into q's parameters $k.. (in that order); false after answering. */
static bool rule_fields(struct cw_req *req, json_t *body, struct aq *q, bool *has_mode, bool *mode_null,
			bool *has_limits, bool *limits_empty)
{
	json_t *mode = json_object_get(body, "mode"), *limits = json_object_get(body, "limits");
	json_t *enabled = json_object_get(body, "enabled"), *comment = json_object_get(body, "comment");
	json_t *exp = json_object_get(body, "expires_in_s");
	enum policy_mode m;
	struct policy_limits lim = { 0 };
	char why[512]; /* the longest: an unknown member and the list of the known ones (431) */
	if (mode && !json_is_null(mode) &&
	    (!json_is_string(mode) || !policy_mode_parse(json_string_value(mode), &m) || m == POLICY_MODE_NONE)) {
		bad_body(req, "mode must be open, allowlist, closed, deny, or null (a rule that only sets limits)");
		return false;
	}
	if (limits && !policy_limits_from_json(limits, &lim, why, sizeof(why))) {
		bad_body(req, why);
		return false;
	}
	if (enabled && !json_is_boolean(enabled)) {
		bad_body(req, "enabled must be true or false");
		return false;
	}
	if (comment && !json_is_null(comment) && (!json_is_string(comment) || json_string_length(comment) > COMMENT_MAX)) {
		bad_body(req, "comment must be a string of at most 1024 bytes, or null");
		return false;
	}
	/* Shown to every operator as it is (the rules list, a decision's
	 * rule, causewayctl rules), as a report's comment is: the same text
	 * check (until the fiftieth session a rule's comment took any control
	 * or bidirectional override, which a report's has refused since the
	 * forty-eighth). */
	const char *tp = json_is_string(comment) ? cw_utf8_text_problem(json_string_value(comment),
									 json_string_length(comment))
						 : NULL;
	if (tp) {
		snprintf(why, sizeof(why), "comment %s: it is shown to the operator as it is", tp);
		bad_body(req, why);
		return false;
	}
	if (exp && !json_is_null(exp) &&
	    (!json_is_integer(exp) || json_integer_value(exp) < 1 || json_integer_value(exp) > 10LL * 366 * 86400)) {
		bad_body(req, "expires_in_s must be a number of seconds from 1 to ten years, or null (never)");
		return false;
	}
	*has_mode = mode != NULL;
	*mode_null = !mode || json_is_null(mode);
	*has_limits = limits != NULL;
	/* in_addition alone is no limit: it says how the rule's limits
	 * combine, and a rule with it and no mode does nothing (until the
	 * thirty-sixth session such a rule was stored, audited and shown). */
	*limits_empty = !limits || lim.set == 0;
	char *lt = limits ? json_dumps(limits, JSON_COMPACT) : NULL;
	aq_param(q, mode ? "t" : "f");
	aq_param(q, json_is_string(mode) ? json_string_value(mode) : NULL);
	aq_param(q, limits ? "t" : "f");
	aq_param(q, lt);
	free(lt);
	aq_param(q, enabled ? "t" : "f");
	aq_param(q, json_is_true(enabled) ? "t" : "f");
	aq_param(q, comment ? "t" : "f");
	aq_param(q, json_is_string(comment) ? json_string_value(comment) : NULL);
	aq_param(q, exp ? "t" : "f");
	if (json_is_integer(exp))
		aq_num(q, (long long)json_integer_value(exp));
	else
		aq_param(q, NULL);
	return true;
}

static const char *const rule_members[] = { "scope", "pattern", "mode", "limits", "enabled", "comment",
					    "expires_in_s", NULL };

void policy_admin_rule_create(struct cw_req *req, void *ctx)
{
	json_t *body = app_json_body(req);
	if (!body)
		return;
	/* A rule of the same scope and pattern that has expired (an
	 * automatic limit after reports, or an operator's rule with
	 * expires_in_s) is in force no more: the new rule takes its place,
	 * answered (and audited) with it as it was, "replaced", locked while
	 * read (old is read before the insert, the insert's one-time filter:
	 * read after it, the row it updated would be skipped).  One in force, or not yet expired, is the 409 of an existing
	 * rule.  Until the forty-sixth session an expired rule was the 409
	 * too, and the operator had to delete what no longer applied first. */
	struct aq *q = aq_new(
		"WITH old AS (SELECT " RULE_JSON " AS j FROM rules WHERE scope = $1 AND pattern = $2 "
		" AND expires_at <= now() FOR UPDATE), "
		"ins AS (INSERT INTO rules (scope, pattern, mode, limits, enabled, comment, created_by, expires_at) "
		"SELECT $1, $2, $4, coalesce($6::jsonb, '{}'::jsonb), CASE WHEN $7::boolean THEN $8::boolean ELSE true END, "
		" $10, $13, CASE WHEN $12::bigint IS NULL THEN NULL ELSE now() + make_interval(secs => $12::bigint) END "
		"FROM (SELECT $3::boolean, $5::boolean, $9::boolean, $11::boolean) AS presence "
		"WHERE (SELECT count(*) FROM old) >= 0 ON CONFLICT (scope, pattern) DO UPDATE SET mode = excluded.mode, limits = excluded.limits, "
		" enabled = excluded.enabled, comment = excluded.comment, created_by = excluded.created_by, "
		" created_at = now(), updated_at = now(), expires_at = excluded.expires_at "
		" WHERE rules.expires_at <= now() RETURNING *) "
		"SELECT (" RULE_JSON "::jsonb || CASE WHEN EXISTS (SELECT 1 FROM old) "
		" THEN jsonb_build_object('replaced', (SELECT j FROM old)) ELSE '{}'::jsonb END)::text FROM ins");
	const char *scope = str(body, "scope"), *pattern = str(body, "pattern");
	enum policy_scope sc;
	bool has_mode, mode_null, has_limits, limits_empty;
	bool ok = false;
	char own[MIMI_DOMAIN_MAX + 1], why[2 * MIMI_URI_MAX + 400];
	if (!q)
		cw_req_no_memory(req); /* until the forty-fourth session without Retry-After */
	else if (!app_json_only_known(req, body, rule_members))
		;
	else if (!scope || !policy_scope_parse(scope, &sc))
		bad_body(req, "scope must be domain, network or user");
	else if (!pattern || !pattern_valid(sc, pattern, why, sizeof(why))) {
		char d[sizeof(why) + 300];
		bool said = pattern && why[0];
		snprintf(d, sizeof(d), "%s%s%s",
			 sc == POLICY_SCOPE_DOMAIN    ? "pattern must be a lower-case domain such as a.example or *.example"
			 : sc == POLICY_SCOPE_NETWORK ? "pattern must be a peer's network: peer:* (every peer) or peer:<name> "
							"with a peer's name (1 to 32 of a-z, 0-9, '_' and '-', starting with a "
							"letter or digit); senders from outside come from peers"
						      : "pattern must be a user URI mimi://<domain>/u/<local>",
			 said ? ": " : "", said ? why : "");
		bad_body(req, d);
	} else if (sc != POLICY_SCOPE_NETWORK && component_why(ctx, pattern, sc == POLICY_SCOPE_USER, why, sizeof(why))) {
		bad_body(req, why);
	} else if (pattern_ours(ctx, sc, pattern, own, sizeof(own))) {
		char d[MIMI_DOMAIN_MAX + 480];
		snprintf(d, sizeof(d),
			 "%s is this provider's own domain: rules apply only to remote parties (the users, "
			 "domains and networks of peers), so this rule would match nothing; a local user is "
			 "stopped at her own server (her Matrix or XMPP account there), and what local users send "
			 "to remote parties is bounded by the outbound_* limits of the rules matching those parties",
			 own);
		bad_body(req, d);
	} else {
		aq_param(q, scope);
		aq_param(q, pattern);
		ok = rule_fields(req, body, q, &has_mode, &mode_null, &has_limits, &limits_empty);
		if (ok && mode_null && limits_empty) {
			bad_body(req, "a rule needs a mode or at least one limit (in_addition alone sets none)");
			ok = false;
		}
	}
	json_decref(body);
	if (!ok) {
		if (q)
			aq_free(q);
		return;
	}
	/* the parameters: $1 scope, $2 pattern, then rule_fields' $3..$12, $13 who */
	aq_param(q, admin_actor(req));
	q->status = 201;
	q->none_status = 409;
	q->none_detail = "a rule with that scope and pattern exists and has not expired: change it (PATCH "
			 "/admin/v1/rules/{id}) or delete it first";
	q->action = "rule.create";
	q->rule_record = true;
	q->subject = 1;
	aq_run(ctx, req, q);
}

void policy_admin_rule_get(struct cw_req *req, void *ctx)
{
	char id[24];
	if (!app_path_id(req, "id", "rule", id))
		return;
	struct aq *q = aq_new("SELECT " RULE_JSON "::text FROM rules WHERE id = $1::bigint");
	if (q) {
		aq_param(q, id);
		q->none_detail = "no rule with that id";
	}
	aq_run(ctx, req, q);
}

void policy_admin_rule_update(struct cw_req *req, void *ctx)
{
	char id[24];
	if (!app_path_id(req, "id", "rule", id))
		return;
	json_t *body = app_json_body(req);
	if (!body)
		return;
	static const char *const members[] = { "mode", "limits", "enabled", "comment", "expires_in_s", NULL };
	/* The rule keeps a mode or a limit (in_addition alone is none): a
	 * change that would leave it with neither matches no row (answered 409 below, as the rule
	 * exists: checked in the statement).  Every field the request does
	 * not change, and that check, are read from the row as locked (r),
	 * never from the statement's snapshot: a change of another process
	 * committed while this one waited for the row's lock is kept, and
	 * checked.  Until the thirty-second session the mode and the limits
	 * were read before the wait and written back: of one operator's
	 * mode and another's limits at once, the mode was lost.  Whether the
	 * rule is there is asked of the row as locked too (cur takes the
	 * lock the update takes, FOR NO KEY UPDATE, and finds no row once a
	 * delete it waited for is committed): a rule deleted while this
	 * change waited is the 404 of one that never existed.  Until the
	 * thirty-third session cur read the statement's snapshot, which still
	 * held the rule, and such a change was answered 409. */
#define RULE_NEW_MODE "CASE WHEN $2::boolean THEN $3 ELSE r.mode END"
#define RULE_NEW_LIMITS "CASE WHEN $4::boolean THEN $5::jsonb ELSE r.limits END"
	struct aq *q = aq_new(
		"WITH cur AS (SELECT 1 FROM rules WHERE id = $1::bigint FOR NO KEY UPDATE), "
		"up AS (UPDATE rules r SET mode = " RULE_NEW_MODE ", limits = " RULE_NEW_LIMITS ", "
		"  enabled = CASE WHEN $6::boolean THEN $7::boolean ELSE r.enabled END, "
		"  comment = CASE WHEN $8::boolean THEN $9 ELSE r.comment END, "
		"  expires_at = CASE WHEN $10::boolean THEN (CASE WHEN $11::bigint IS NULL THEN NULL "
		"   ELSE now() + make_interval(secs => $11::bigint) END) ELSE r.expires_at END, updated_at = now() "
		"  WHERE r.id = $1::bigint AND (" RULE_NEW_MODE " IS NOT NULL OR (" RULE_NEW_LIMITS ") - 'in_addition' "
		"   <> '{}'::jsonb) "
		"  RETURNING r.*) "
		"SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM cur) THEN '\"rule\"' "
		" WHEN NOT EXISTS (SELECT 1 FROM up) THEN NULL "
		" ELSE (SELECT " RULE_JSON "::text FROM up) END");
#undef RULE_NEW_MODE
#undef RULE_NEW_LIMITS
	bool has_mode, mode_null, has_limits, limits_empty, ok = false;
	if (!q)
		cw_req_no_memory(req);
	else if (json_is_object(body) && json_object_size(body) == 0) /* as PATCH /settings and /peers/{name} answer it */
		cw_req_problem(req, 400, "invalid_body", "Invalid body", "nothing to change");
	else if (app_json_only_known(req, body, members)) {
		aq_param(q, id);
		ok = rule_fields(req, body, q, &has_mode, &mode_null, &has_limits, &limits_empty);
	}
	json_decref(body);
	if (!ok) {
		if (q)
			aq_free(q);
		return;
	}
	q->none_status = 409;
	q->none_detail = "the change would leave the rule with neither a mode nor a limit (in_addition alone sets none)";
	q->action = "rule.update";
	q->rule_record = true;
	q->subject = 0;
	aq_run(ctx, req, q);
}

void policy_admin_rule_delete(struct cw_req *req, void *ctx)
{
	char id[24];
	if (!app_path_id(req, "id", "rule", id))
		return;
	struct aq *q = aq_new("DELETE FROM rules WHERE id = $1::bigint RETURNING " RULE_JSON "::text");
	if (q) {
		aq_param(q, id);
		q->none_detail = "no rule with that id";
		q->action = "rule.delete";
		q->rule_record = true;
		q->subject = 0;
	}
	aq_run(ctx, req, q);
}

/* ------------------------------------------------------------ settings */

/* Every policy.* setting with its default (policy_settings_defaults), as
 * JSON text to free, or NULL (out of memory). */
static char *settings_defaults_json(void)
{
	struct policy_settings d;
	policy_settings_defaults(&d);
	json_t *o = json_pack("{s:s, s:b, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "policy.default_mode",
			      policy_mode_name(d.default_mode), "policy.optin_default", d.optin_default,
			      "policy.held_expiry_seconds", (json_int_t)d.held_expiry_s,
			      "policy.consent_request_window_seconds", (json_int_t)d.consent_window_s,
			      "policy.report_limit_threshold", (json_int_t)d.report_threshold,
			      "policy.report_window_seconds", (json_int_t)d.report_window_s,
			      "policy.report_limit_messages_per_minute", (json_int_t)d.report_limit_per_minute,
			      "policy.report_limit_seconds", (json_int_t)d.report_limit_s,
			      "policy.identifier_queries_per_minute", (json_int_t)d.identifier_queries_per_minute,
			      "policy.peer_updates_per_minute", (json_int_t)d.peer_updates_per_minute,
			      "policy.user_updates_per_minute", (json_int_t)d.user_updates_per_minute,
			      "policy.consent_requests_per_user_per_day", (json_int_t)d.user_requests_per_day);
	char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
	json_decref(o);
	return text;
}

/* The settings in force: each stored one, and the default of each never
 * set.  Until the thirty-fourth session only the stored ones were shown:
 * the three settings no migration seeds (policy.identifier_queries_per_minute,
 * policy.peer_updates_per_minute, policy.user_updates_per_minute) were
 * missing from the answer until an operator set them, though in force. */
void policy_admin_settings_get(struct cw_req *req, void *ctx)
{
	char *dflt = settings_defaults_json();
	struct aq *q = dflt ? aq_new("SELECT ($1::jsonb || coalesce(jsonb_object_agg(key, value), '{}'::jsonb))::text "
				     "FROM settings WHERE key LIKE 'policy.%'")
			    : NULL;
	if (q)
		aq_param(q, dflt);
	free(dflt);
	aq_run(ctx, req, q);
}

struct setting_def {
	const char *key;
	long long lo, hi; /* a whole number in [lo, hi]; lo > hi: something else */
};

static const struct setting_def setting_defs[] = {
	{ "policy.default_mode", 1, 0 },
	{ "policy.optin_default", 1, 0 },
	{ "policy.held_expiry_seconds", 60, 366LL * 86400 },
	{ "policy.consent_request_window_seconds", 0, 366LL * 86400 },
	{ "policy.report_limit_threshold", 0, 1000000 },
	{ "policy.report_window_seconds", 60, 366LL * 86400 },
	{ "policy.report_limit_messages_per_minute", 1, 1000000 },
	{ "policy.report_limit_seconds", 60, 366LL * 86400 },
	{ "policy.identifier_queries_per_minute", 1, 1000000 },
	{ "policy.peer_updates_per_minute", 1, 1000000 },
	{ "policy.user_updates_per_minute", 1, 1000000 },
	{ "policy.consent_requests_per_user_per_day", 0, 1000000 },
	{ NULL, 0, 0 },
};

void policy_admin_settings_update(struct cw_req *req, void *ctx)
{
	json_t *body = app_json_body(req);
	if (!body)
		return;
	const char *k;
	json_t *v;
	char d[200] = "";
	if (json_object_size(body) == 0)
		snprintf(d, sizeof(d), "nothing to change");
	json_object_foreach(body, k, v) {
		const struct setting_def *s = NULL;
		for (int i = 0; setting_defs[i].key; i++)
			if (strcmp(setting_defs[i].key, k) == 0)
				s = &setting_defs[i];
		if (!s)
			snprintf(d, sizeof(d), "unknown setting '%.64s'", k);
		else if (strcmp(k, "policy.default_mode") == 0) {
			const char *m = json_is_string(v) ? json_string_value(v) : "";
			if (strcmp(m, "open") != 0 && strcmp(m, "allowlist") != 0 && strcmp(m, "closed") != 0)
				snprintf(d, sizeof(d), "policy.default_mode must be open, allowlist or closed");
		} else if (strcmp(k, "policy.optin_default") == 0) {
			if (!json_is_boolean(v))
				snprintf(d, sizeof(d), "policy.optin_default must be true or false");
		} else if (!json_is_integer(v) || json_integer_value(v) < s->lo || json_integer_value(v) > s->hi) {
			snprintf(d, sizeof(d), "%s must be a whole number from %lld to %lld", k, s->lo, s->hi);
		}
		if (d[0])
			break;
	}
	if (d[0]) {
		bad_body(req, d);
		json_decref(body);
		return;
	}
	/* A setting given its stored value is not written (its updated_by
	 * and updated_at stay); none written at all is a repeat (repeat_col):
	 * answered as a change, no audit record, no reload.  Until the
	 * fiftieth session each repeat was audited and made every process
	 * reload.  A value equal to the default but not stored is written:
	 * stored, it no longer follows the default. */
	struct aq *q = aq_new(
		"WITH up AS (INSERT INTO settings (key, value, updated_by) SELECT key, value, $2 "
		" FROM jsonb_each($1::jsonb) ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
		" updated_by = excluded.updated_by, updated_at = now() "
		" WHERE settings.value IS DISTINCT FROM excluded.value RETURNING key, value) "
		"SELECT ($3::jsonb || (SELECT jsonb_object_agg(key, value) FROM (SELECT key, value FROM settings "
		" WHERE key LIKE 'policy.%' AND key NOT IN (SELECT key FROM up) UNION ALL SELECT key, value FROM up) s))::text, "
		" EXISTS (SELECT 1 FROM up)");
	char *text = json_dumps(body, JSON_COMPACT), *dflt = settings_defaults_json();
	json_decref(body);
	if (q && (!text || !dflt)) {
		aq_free(q);
		q = NULL;
	}
	if (q) {
		aq_param(q, text);
		aq_param(q, admin_actor(req));
		aq_param(q, dflt);
		q->action = "settings.update";
		q->repeat_col = true;
	}
	free(text);
	free(dflt);
	aq_run(ctx, req, q);
}

/* ------------------------------------------------------------ users */

/* A consent's peer: the name of the peer whose domain is its subject's
 * (a user subject's: mimi://<domain>/u/..., canonical, no port), null when
 * none is: such a consent matches no sender.  Stored before the
 * forty-first session (POST /consents took one; the Matrix bot and the
 * XMPP commands did until the fortieth), or of a user or domain of this
 * provider's stored before the thirty-fourth: shown, not hidden or
 * deleted, so that the operator sees it and forgets it (state none). */
void policy_admin_users_list(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	long long after;
	long limit;
	if (!app_paging(req, &after, &limit))
		return;
	char folded[MIMI_URI_MAX + 1];
	const char *user;
	if (!user_filter(app, req, folded, &user))
		return;
	struct aq *q = aq_page(after, limit, PAGE(
		"json_build_object('id', x.id, 'user', x.uri, 'network', x.network, 'discoverable', x.discoverable, "
		" 'optins', (SELECT coalesce(json_object_agg(o.network, o.opted_in), '{}'::json) FROM user_optin o "
		"  WHERE o.identity_id = x.id), "
		" 'consents', (SELECT coalesce(json_agg(json_build_object('subject_kind', c.subject_kind, 'subject', "
		"  c.subject, 'state', c.state, 'source', c.source, 'updated_at', " APP_SQL_TS("c.updated_at") ", "
		"  'peer', (SELECT p.name FROM peers p WHERE p.domain = CASE c.subject_kind WHEN 'domain' THEN c.subject "
		"  ELSE split_part(substr(c.subject, 8), '/', 1) END)) ORDER BY c.subject_kind, "
		"  c.subject), '[]'::json) FROM consents c WHERE c.local_identity_id = x.id), "
		" 'held', (SELECT count(*) FROM outbox h WHERE h.target_identity_id = x.id AND " OUTBOX_HELD("h") "), "
		" 'pending_requests', (SELECT count(*) FROM consent_requests r WHERE r.local_identity_id = x.id "
		"  AND r.state = 'pending'))",
		"(SELECT id, uri, network, discoverable FROM identities WHERE is_local AND id > $1::bigint "
		" AND ($3::text IS NULL OR uri = $3) ORDER BY id LIMIT $2::int) x"));
	if (q) {
		aq_param(q, user);
	}
	aq_run(ctx, req, q);
}

void policy_admin_optin_set(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	json_t *body = app_json_body(req);
	if (!body)
		return;
	static const char *const members[] = { "user", "network", "opted_in", NULL };
	const char *network = str(body, "network");
	json_t *opted = json_object_get(body, "opted_in");
	char user[MIMI_URI_MAX + 1], why[MIMI_URI_MAX + 300];
	const char *p;
	bool ok = false;
	if (!app_json_only_known(req, body, members))
		;
	else if ((p = local_user_problem(app, str(body, "user"), user, why, sizeof(why)))) {
		char d[MIMI_URI_MAX + 310];
		snprintf(d, sizeof(d), "user %s", p);
		bad_body(req, d);
	} else if (!network || strncmp(network, "peer:", 5) != 0 || !peer_name_valid(network + 5))
		/* Senders come from peers: an opt-in for any other name (matrix,
		 * a bare "peer") is never asked, and the user would believe
		 * themselves reachable.  The name is one a peer can have (until
		 * the twenty-third session peer:GK or peer:gk.example were
		 * stored, and never matched). */
		bad_body(req, "network must be a peer's network, peer:<name> (messages from outside come from peers)");
	else if (!json_is_boolean(opted))
		bad_body(req, "opted_in must be true or false");
	else
		ok = true;
	/* The opt-in the user has already is not written again (its
	 * updated_by and updated_at stay): a repeat (repeat_col), answered as
	 * a change, with no audit record and no reload (until the fiftieth
	 * session each repeat was audited and made every process reload). */
	struct aq *q = ok ? aq_new(
		"WITH up AS (INSERT INTO user_optin (identity_id, network, opted_in, updated_by) "
		" VALUES ($1::bigint, $2, $3::boolean, $5) ON CONFLICT (identity_id, network) DO UPDATE "
		" SET opted_in = excluded.opted_in, updated_by = excluded.updated_by, updated_at = now() "
		" WHERE user_optin.opted_in IS DISTINCT FROM excluded.opted_in RETURNING 1) "
		"SELECT json_build_object('user', $4::text, 'network', $2::text, 'opted_in', $3::boolean)::text, "
		" EXISTS (SELECT 1 FROM up)")
		: NULL;
	if (q) {
		aq_param(q, user);
		aq_param(q, network);
		aq_param(q, json_is_true(opted) ? "t" : "f");
		aq_param(q, user);
		aq_param(q, admin_actor(req));
		q->local = 0;
		q->action = "optin.set";
		q->repeat_col = true;
		q->subject = 3;
		/* An opt-in for a network no peer has is asked of no sender: the
		 * user would believe herself reachable (until the forty-sixth
		 * session it was stored and audited, while the Matrix bot and
		 * POST /consents refused the like).  An opt-out is taken: it
		 * keeps her out of a peer yet to come, whatever
		 * policy.optin_default says then. */
		q->peer_network = json_is_true(opted);
	}
	json_decref(body);
	if (ok)
		aq_run(ctx, req, q);
}

bool policy_consent_subject_ours(struct cw_app *app, const char *kind, const char *subject)
{
	if (strcmp(kind, "domain") == 0)
		return app_domain_is_ours(app, subject);
	struct mimi_uri u;
	cw_errmsg e;
	return mimi_uri_parse(subject, &u, &e) == CW_OK && app_domain_is_ours(app, u.domain);
}

cw_err policy_peer_of_domain(PGconn *c, const char *domain, char *name, size_t len, cw_errmsg *e)
{
	const char *params[] = { domain };
	PGresult *r = PQexecParams(c, "SELECT name FROM peers WHERE domain = $1", 1, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	snprintf(name, len, "%s", PQntuples(r) == 1 ? PQgetvalue(r, 0, 0) : "");
	PQclear(r);
	return CW_OK;
}

bool policy_local_user_canonical(struct cw_app *app, const char *uri, char *out)
{
	const struct cw_config *cfg = app->cfg;
	struct mimi_uri u;
	cw_errmsg e;
	if (!uri || !cfg->domain || mimi_uri_parse(uri, &u, &e) || u.kind != MIMI_USER)
		return false;
	const char *homes[] = { cfg->domain, cfg->mx_server_name, cfg->xmpp_domain };
	bool home = false;
	for (size_t i = 0; i < CW_ARRAY_LEN(homes) && !home; i++)
		home = homes[i] && strcmp(homes[i], u.domain) == 0;
	if (!home || (size_t)snprintf(u.domain, sizeof(u.domain), "%s", cfg->domain) >= sizeof(u.domain) ||
	    mimi_uri_format(&u, out, MIMI_URI_MAX + 1, &e))
		return false;
	peer_local_fold(app, &u, out);
	return true;
}

bool policy_same_local_user(struct cw_app *app, const char *a, const char *b)
{
	char ca[MIMI_URI_MAX + 1], cb[MIMI_URI_MAX + 1];
	return policy_local_user_canonical(app, a, ca) && policy_local_user_canonical(app, b, cb) &&
	       strcmp(ca, cb) == 0;
}

void policy_admin_consent_set(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	json_t *body = app_json_body(req);
	if (!body)
		return;
	static const char *const members[] = { "user", "subject_kind", "subject", "state", NULL };
	const char *kind = str(body, "subject_kind"), *subject = str(body, "subject");
	const char *state = str(body, "state");
	char user[MIMI_URI_MAX + 1], why[2 * MIMI_URI_MAX + 400];
	const char *p;
	bool ok = false;
	if (!app_json_only_known(req, body, members))
		;
	else if ((p = local_user_problem(app, str(body, "user"), user, why, sizeof(why)))) {
		char d[MIMI_URI_MAX + 310];
		snprintf(d, sizeof(d), "user %s", p);
		bad_body(req, d);
	} else if (!kind || (strcmp(kind, "user") != 0 && strcmp(kind, "domain") != 0))
		bad_body(req, "subject_kind must be user or domain");
	else if (address_why(subject, strcmp(kind, "user") == 0, false, why, sizeof(why))) {
		char d[sizeof(why) + 100];
		snprintf(d, sizeof(d), "%s: %s",
			 strcmp(kind, "user") == 0 ? "subject must be a user URI mimi://<domain>/u/<local>"
						   : "subject must be a lower-case domain such as gk.example",
			 why);
		bad_body(req, d);
	} else if (!state || (strcmp(state, "allowed") != 0 && strcmp(state, "blocked") != 0 && strcmp(state, "none") != 0))
		bad_body(req, "state must be allowed, blocked or none (forget the decision)");
	else if (strcmp(state, "none") != 0 && component_why(app, subject, strcmp(kind, "user") == 0, why, sizeof(why)))
		bad_body(req, why);
	else if (strcmp(state, "none") != 0 && policy_consent_subject_ours(app, kind, subject)) {
		/* The policy asks a user's consents of a remote sender only;
		 * what local users send one another is decided by nobody here
		 * (peer_api.c: "not the gateway's business").  Such a consent
		 * would match nothing: until the thirty-fourth session it was
		 * stored, audited and listed, and the user's "block" of a
		 * neighbour changed nothing.  none still forgets one stored
		 * before. */
		char d[MIMI_URI_MAX + 320];
		snprintf(d, sizeof(d),
			 "subject %s is of this provider's own domain: a user's consents decide what comes to her "
			 "from remote parties (the users and domains of peers), and what local users send one "
			 "another does not pass them",
			 subject);
		bad_body(req, d);
	} else
		ok = true;
	struct aq *q = ok ? aq_new(NULL) : NULL; /* the answer is aq_fn's (q->consent) */
	if (q) {
		aq_param(q, user);
		aq_param(q, kind);
		aq_param(q, subject);
		aq_param(q, state);
		aq_param(q, user);
		q->local = 0;
		q->action = "consent.set";
		q->subject = 4;
		q->consent = true;
		/* A decision about a domain of no peer, or an address on one,
		 * matches no sender: refused (422), as the Matrix bot and the
		 * XMPP commands refuse it.  none still forgets one stored
		 * before (GET /users shows them, peer null). */
		q->peer_subject = strcmp(state, "none") != 0;
		/* Forgetting the decision of a user not known changes nothing:
		 * no user is made of the name (until the thirtieth session a typo
		 * made a local user, listed in GET /users), nothing audited.  An
		 * allowed or blocked one makes the user known: it is in force
		 * for their first message. */
		q->known_only = strcmp(state, "none") == 0;
	}
	json_decref(body);
	if (ok)
		aq_run(ctx, req, q);
}

void policy_admin_consent_requests(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	long long after;
	long limit;
	if (!app_paging(req, &after, &limit))
		return;
	const char *state = cw_req_query(req, "state"), *user;
	char folded[MIMI_URI_MAX + 1];
	if (state && strcmp(state, "pending") != 0 && strcmp(state, "accepted") != 0 && strcmp(state, "blocked") != 0 &&
	    strcmp(state, "expired") != 0) {
		bad_query(req, "state must be pending, accepted, blocked or expired");
		return;
	}
	if (!user_filter(app, req, folded, &user))
		return;
	struct aq *q = aq_page(after, limit, PAGE(
		"json_build_object('id', x.id, 'user', l.uri, 'requester', r.uri, 'requester_network', r.network, "
		" 'state', x.state, 'created_at', " APP_SQL_TS("x.created_at") ", 'notified_at', " APP_SQL_TS("x.notified_at") ", "
		" 'decided_at', " APP_SQL_TS("x.decided_at") ", 'expires_at', " APP_SQL_TS("x.expires_at") ", 'held', (SELECT count(*) FROM outbox o JOIN events e "
		" ON e.id = o.event_id WHERE o.target_identity_id = x.local_identity_id AND " OUTBOX_HELD("o") " "
		" AND e.sender_id = x.remote_identity_id))",
		"(SELECT * FROM consent_requests WHERE id > $1::bigint AND ($3::text IS NULL OR state = $3) "
		" AND ($4::text IS NULL OR local_identity_id = (SELECT id FROM identities WHERE uri = $4)) "
		" ORDER BY id LIMIT $2::int) x JOIN identities l ON l.id = x.local_identity_id "
		" JOIN identities r ON r.id = x.remote_identity_id"));
	if (q) {
		aq_param(q, state);
		aq_param(q, user);
	}
	aq_run(ctx, req, q);
}

/* The held list's page of rows (x: id, event_id, target_identity_id,
 * created_at), all held rows after $1 in id order, as many as $2 ($3
 * NULL: no user asked).  No index holds them in that order
 * (outbox_held_age_idx is in created_at's; outbox_held_probe_idx by
 * user and room), and until the fiftieth session the page walked the
 * primary key through every row delivered since the first held one
 * (3,240 buffers, 18-37 ms a page at 190,000 delivered rows).
 * outbox_state_dest_idx (state, destination, id) holds them in id
 * order for each destination: the destinations that hold any (a
 * descent each, d; its last row is the NULL that ends it, which the
 * walk of a destination's rows must not be given: a plan walking the
 * primary key read it all for none) then a page of each from $1,
 * merged (a few destinations: local users' adapters).  Rather than an index more of
 * held rows (one more entry for every row held). */
#define HELD_ALL_PAGE                                                                                          \
	"(WITH RECURSIVE d AS ((SELECT destination FROM outbox WHERE state = 'held' ORDER BY destination LIMIT 1) " \
	"  UNION ALL SELECT (SELECT o.destination FROM outbox o WHERE o.state = 'held' "                           \
	"  AND o.destination > d.destination ORDER BY o.destination LIMIT 1) FROM d WHERE d.destination IS NOT NULL) " \
	" SELECT h.* FROM d CROSS JOIN LATERAL (SELECT id, event_id, target_identity_id, created_at FROM outbox o " \
	"  WHERE o.state = 'held' AND o.destination = d.destination AND o.id > $1::bigint AND $3::text IS NULL "   \
	"  ORDER BY o.id LIMIT $2::int) h WHERE d.destination IS NOT NULL ORDER BY h.id LIMIT $2::int) x "
/* One user's ($3): a descent of outbox_held_probe_idx by user. */
#define HELD_USER_PAGE                                                                                         \
	"(SELECT id, event_id, target_identity_id, created_at FROM outbox o WHERE " OUTBOX_HELD("o") " "            \
	" AND id > $1::bigint AND target_identity_id = (SELECT id FROM identities WHERE uri = $3::text) "           \
	" ORDER BY id LIMIT $2::int) x "
#define HELD_PAGE(X)                                                                                            \
	PAGE("json_build_object('id', x.id, 'message', e.public_id, 'user', t.uri, 'sender', s.uri, 'type', e.type, " \
	     " 'held_since', " APP_SQL_TS("x.created_at") ", "                                                      \
	     " 'expires_at', " APP_SQL_TS("x.created_at + make_interval(secs => $4::bigint)") ")",                  \
	     X "JOIN events e ON e.id = x.event_id "                                                                 \
	     " JOIN identities s ON s.id = e.sender_id JOIN identities t ON t.id = x.target_identity_id")

void policy_admin_held_list(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	long long after;
	long limit;
	if (!app_paging(req, &after, &limit))
		return;
	char folded[MIMI_URI_MAX + 1];
	const char *user;
	if (!user_filter(app, req, folded, &user))
		return;
	struct policy_view *v = policy_live_get(app->policy);
	long long expiry = (long long)v->set.held_expiry_s;
	policy_view_put(v);
	struct aq *q = aq_page(after, limit, user ? HELD_PAGE(HELD_USER_PAGE) : HELD_PAGE(HELD_ALL_PAGE));
	if (q) {
		aq_param(q, user);
		aq_num(q, expiry);
	}
	aq_run(ctx, req, q);
}

/* ------------------------------------------------------------ reports */

void policy_admin_reports_list(struct cw_req *req, void *ctx)
{
	long long after;
	long limit;
	if (!app_paging(req, &after, &limit))
		return;
	const char *open = cw_req_query(req, "open");
	if (open && strcmp(open, "true") != 0 && strcmp(open, "false") != 0) {
		bad_query(req, "open must be true or false");
		return;
	}
	struct aq *q = aq_page(after, limit, PAGE(
		"json_build_object('id', x.id, 'reporter_kind', x.reporter_kind, 'reporter', x.reporter, "
		" 'subject', x.subject_uri, 'reason', x.reason_code, 'evidence', to_json(x.evidence_public_ids), "
		" 'comment', x.comment, 'created_at', " APP_SQL_TS("x.created_at") ", 'handled_at', " APP_SQL_TS("x.handled_at") ", "
		" 'handled_by', x.handled_by, 'dismissed', x.dismissed, "
		" 'reports_against_subject', (SELECT count(*) FROM reports y "
		" WHERE y.subject_uri = x.subject_uri))",
		"(SELECT * FROM reports WHERE id > $1::bigint AND id <= $4::bigint AND ($3::boolean IS NULL OR "
		" (handled_at IS NULL) = $3::boolean) ORDER BY id LIMIT $2::int) x"));
	if (q) {
		aq_param(q, open ? (strcmp(open, "true") == 0 ? "t" : "f") : NULL);
		q->records = "reports";
	}
	aq_run(ctx, req, q);
}

/* A local user's report with no evidence of its own takes at most
 * REPORT_EVIDENCE_MAX messages, found among the last REPORT_EVIDENCE_SCAN
 * events of each room she shares with its subject (report_sql). */
#define REPORT_EVIDENCE_MAX "20"
#define REPORT_EVIDENCE_SCAN "10000"
/* Whether the message of alias X (an events row) is one of the subject's
 * (him) that reached the reporter (me): a message of his delivered to
 * her (an outbox row of hers, delivered).  Only what she saw is evidence
 * of hers: not what waits for her consent, was dropped, or went to a
 * room she was not in then.  Probed per message by outbox_event_dest_key
 * (OFFSET 0: not made a semi-join, which the planner hashed over every
 * delivered row of the outbox for the one message a reply names). */
#define REPORT_SEEN(X)                                                                                            \
	X ".sender_id = (SELECT id FROM him) AND " X ".type = 'message' AND EXISTS (SELECT 1 FROM outbox o "  \
	"WHERE o.event_id = " X ".id AND o.target_identity_id = me.id AND o.state = 'delivered' OFFSET 0)"
/* The evidence report_sql stores, a text[]: $6's ids as given, each once
 * in the order of its first mention (until the fiftieth session a
 * repeated id was stored and shown as often as it was given), or, for
 * a local user's report with no evidence of its own ($14 true, $6 NULL),
 * the public ids of the last REPORT_EVIDENCE_MAX messages the subject
 * sent her (REPORT_SEEN), the one her command points at first ($15,
 * $16, $17: its native id, a Matrix event id the bridge stored for its
 * delivery to her), the others newest first: found in each room they
 * share (both have a row in room_members, whatever the membership now)
 * among its last REPORT_EVIDENCE_SCAN events (events_room_idx
 * backwards: bounded however big the group and however long ago he
 * wrote in it).  Only what the database still holds
 * (retention.rows_days).  A subquery of the insert, so that the
 * statement's start, all pg_stat_activity shows of a long one, says
 * what it is. */
#define REPORT_EVIDENCE_SQL                                                                                       \
	"WITH me AS (SELECT id FROM identities WHERE uri = $2 AND $14::boolean AND $6::jsonb IS NULL), "            \
	"him AS (SELECT id FROM identities WHERE uri = $4), "                                                       \
	"seen AS (SELECT 0 AS k, e.id, e.public_id FROM me, event_native_ids n JOIN events e ON e.id = n.event_id " \
	"  WHERE n.network = $15 AND n.kind = $16 AND n.native_id = $17 AND " REPORT_SEEN("e") " "                  \
	"  UNION ALL SELECT 1, x.id, x.public_id FROM me JOIN room_members a ON a.identity_id = me.id "             \
	"  JOIN room_members b ON b.room_id = a.room_id AND b.identity_id = (SELECT id FROM him) "                 \
	"  CROSS JOIN LATERAL (SELECT r.id, r.public_id FROM (SELECT id, public_id, sender_id, type FROM events "   \
	"   WHERE room_id = a.room_id ORDER BY id DESC LIMIT " REPORT_EVIDENCE_SCAN ") r "                          \
	"   WHERE " REPORT_SEEN("r") " ORDER BY r.id DESC LIMIT " REPORT_EVIDENCE_MAX ") x) "                       \
	"SELECT CASE WHEN $6::jsonb IS NOT NULL THEN ARRAY(SELECT v FROM jsonb_array_elements_text($6::jsonb) "   \
	"  WITH ORDINALITY AS g(v, i) GROUP BY v ORDER BY min(i)) "                                                 \
	"  ELSE ARRAY(SELECT s.public_id FROM (SELECT DISTINCT ON (id) k, id, public_id FROM seen ORDER BY id, k) s " \
	"  ORDER BY s.k, s.id DESC LIMIT " REPORT_EVIDENCE_MAX ") END"
/* Every report, however it arrives, in one statement (so that a bot's
 * connection, outside any transaction, stores it whole): the report; the
 * reports against the subject within policy.report_window_seconds ($8)
 * counted, and their distinct reporters (this one included: the insert
 * is not visible to the other parts of the statement); at
 * policy.report_limit_threshold ($9) reporters against a remote user
 * ($12 false) the automatic user rule (policy.report_limit_*, $10 and
 * $11), made again over an expired one of its own (the limit alone: a
 * mode an operator gave it meanwhile, a deny say, is not brought back with
 * it, as it was until the thirty-ninth session; made now: its created_at
 * too, as an operator's rule over an expired one, since the fifty-first
 * session) and never over an operator's; the audit record (report.create, the answer as its
 * details) and, when a rule was made, the rule's own after it
 * (rule.create, rule_id the rule, the rule and the report's id as its
 * details, its actor system:reports, the rule's created_by, as an
 * operator's rule's record has the operator's name: until the fiftieth
 * session the rule was named in the report's details alone, and the
 * rule.* records of the audit log had no trace of it); and, when a rule
 * was made, NOTIFY causeway_policy (every process reloads).  Reporters,
 * not reports, reach the threshold: one user reporting again and again
 * must not be able to limit anyone.  A
 * report the operator dismissed (report_dismiss_fn) is not counted:
 * judged unfounded, it must not help limit anyone (until the fortieth
 * session there was no dismissal, and every report counted).  The
 * answer: {id, subject, reports_in_window, reporters_in_window,
 * limit_rule_id, evidence (the ids stored: REPORT_EVIDENCE_SQL)}.  The
 * rule is "in_addition" (docs/policy.md): charged on top of what the
 * sender's domain or network allows, so that a report only ever
 * tightens. */
static const char report_sql[] =
	"WITH rep AS (INSERT INTO reports (reporter_kind, reporter, peer_id, subject_uri, subject_identity_id, "
	"  reason_code, evidence_public_ids, comment) VALUES ($1, $2, $3::bigint, $4, "
	/* the subject's row locked as identity_id locks it: one the
	 * retention sweep is deleting is waited for and not found (the
	 * report then names her address alone); read unlocked until the
	 * forty-seventh session, the insert failed on the foreign key */
	"  (SELECT id FROM identities WHERE uri = $4 FOR KEY SHARE), $5, "
	"  (" REPORT_EVIDENCE_SQL "), $7) "
	"  RETURNING id, evidence_public_ids), "
	"cnt AS (SELECT count(*) AS n, count(DISTINCT (k, who)) AS who_n FROM ("
	"  SELECT reporter_kind AS k, reporter AS who FROM reports WHERE subject_uri = $4 "
	"  AND created_at > now() - make_interval(secs => $8::bigint) AND NOT dismissed "
	"  UNION ALL SELECT $1::text, $2::text) w), "
	"lim AS (INSERT INTO rules (scope, pattern, limits, created_by, comment, expires_at) "
	"  SELECT 'user', $4, jsonb_build_object('messages_per_minute', $10::int, 'in_addition', true), "
	"  'system:reports', 'automatic: abuse reports by ' || who_n || ' reporters', "
	"  now() + make_interval(secs => $11::bigint) "
	"  FROM cnt WHERE $9::bigint > 0 AND who_n >= $9::bigint AND NOT $12::boolean "
	"  ON CONFLICT (scope, pattern) DO UPDATE SET mode = NULL, limits = excluded.limits, "
	"  comment = excluded.comment, enabled = true, created_at = now(), updated_at = now(), "
	"  expires_at = excluded.expires_at "
	"  WHERE rules.created_by = 'system:reports' AND rules.expires_at <= now() RETURNING *), "
	"ans AS (SELECT json_build_object('id', (SELECT id FROM rep), 'subject', $4::text, "
	"  'reports_in_window', (SELECT n FROM cnt), 'reporters_in_window', (SELECT who_n FROM cnt), "
	"  'limit_rule_id', (SELECT id FROM lim), 'evidence', (SELECT to_json(evidence_public_ids) FROM rep)) AS a), "
	"aud AS (INSERT INTO audit_log (actor, action, rule_id, subject, details) "
	"  SELECT x.actor, x.action, x.rule_id, $4, x.d FROM ("
	"  SELECT 0 AS k, coalesce($13, 'user:' || $2) AS actor, 'report.create' AS action, NULL::bigint AS rule_id, "
	"  a::jsonb AS d FROM ans "
	"  UNION ALL SELECT 1, 'system:reports', 'rule.create', id, " RULE_JSON "::jsonb "
	"  || jsonb_build_object('report', (SELECT id FROM rep)) FROM lim) x ORDER BY x.k) "
	"SELECT a::text, (SELECT count(pg_notify('causeway_policy', 'x:' || pg_current_xact_id())) FROM lim), "
	"  pg_current_xact_id()::text FROM ans";

/* The subject a report is stored under, into out (MIMI_URI_MAX + 1
 * bytes), so that one person is one subject (the admin views' counts, the
 * automatic limit's reporters): a user of this provider's by her
 * canonical address (policy_local_user_canonical: mimi://xmpp.test/u/bob
 * is mimi://<server.domain>/u/bob), a component's contact by the address
 * of the peer's user it stands for (mimi://gk.xmpp.test/u/x, as the JID
 * x@gk.xmpp.test, is mimi://<the peer's domain>/u/x: no local user lives
 * under a component's domain), anyone else as given.  *local: a user of
 * this provider's (no automatic limit: only remote senders are rate
 * limited).  Until the thirty-ninth session the subject was stored as
 * typed: bob under two spellings was two subjects, and a component's
 * contact one of ours, never limited. */
static cw_err report_subject(PGconn *c, struct cw_app *app, const char *subject, char *out, bool *local,
			     cw_errmsg *e)
{
	struct mimi_uri u;
	cw_errmsg pe;
	if (policy_local_user_canonical(app, subject, out)) {
		*local = true;
		return CW_OK;
	}
	if (mimi_uri_parse(subject, &u, &pe) != CW_OK || u.kind != MIMI_USER)
		return cw_fail(e, CW_EINVAL, "a report's subject must be a user URI");
	const char *peer = app->xmpp ? xa_component_peer(app->xmpp, u.domain) : NULL;
	if (!peer) {
		snprintf(out, MIMI_URI_MAX + 1, "%s", subject);
		/* server.domain, the Matrix server name and the XMPP domain
		 * were taken above; kept for any domain of ours yet to come */
		*local = app_domain_is_ours(app, u.domain);
		return CW_OK;
	}
	const char *pp[] = { peer };
	PGresult *r = PQexecParams(c, "SELECT domain FROM peers WHERE name = $1", 1, NULL, pp, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) != 1 ||
	    (size_t)snprintf(u.domain, sizeof(u.domain), "%s", PQgetvalue(r, 0, 0)) >= sizeof(u.domain) ||
	    mimi_uri_format(&u, out, MIMI_URI_MAX + 1, &pe) != CW_OK)
		rc = cw_fail(e, CW_EINVAL, "%s names a contact of network peer:%s, which is not configured here", subject,
			     peer);
	PQclear(r);
	*local = false;
	return rc;
}

const char *policy_report_fields_problem(const json_t *reason, const json_t *evidence, const json_t *comment,
					 char *why, size_t len)
{
	const char *r = json_is_string(reason) ? json_string_value(reason) : "", *p;
	bool ok = json_string_length(reason) <= 64 && r[0] >= 'a' && r[0] <= 'z';
	for (const char *c = r; ok && *c; c++)
		ok = (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_';
	if (!ok)
		return "reason must be a reason code of 1 to 64 of a-z, 0-9 and '_', starting with a letter";
	if (evidence && (!json_is_array(evidence) || json_array_size(evidence) > REPORT_EVIDENCE_IDS_MAX))
		return "evidence must be an array of at most 100 message ids";
	for (size_t i = 0; evidence && i < json_array_size(evidence); i++) {
		const json_t *v = json_array_get(evidence, i);
		if (!json_is_string(v) || !message_id_valid(json_string_value(v)))
			return "every evidence entry must be a message id (msg_...)";
	}
	if (comment && (!json_is_string(comment) || json_string_length(comment) > REPORT_COMMENT_MAX))
		return "comment must be a string of at most 8192 bytes";
	if (comment && (p = cw_utf8_text_problem(json_string_value(comment), json_string_length(comment)))) {
		snprintf(why, len, "comment %s: it is shown to the operator as it is", p);
		return why;
	}
	return NULL;
}

cw_err policy_report_store(PGconn *c, struct cw_app *app, const struct policy_report *rep, json_t **answer,
			   char *xid, cw_errmsg *e)
{
	if (user_uri_problem(app, rep->subject, false))
		return cw_fail(e, CW_EINVAL, "a report's subject must be a user URI");
	/* Only remote senders are rate limited: no rule for a user of one of
	 * this provider's own domains (report_subject; until the
	 * thirty-eighth session server.domain alone, and a report naming a
	 * user under another of them could make an automatic rule, which no
	 * message ever met, as POST /admin/v1/rules refuses one naming them). */
	char subject[MIMI_URI_MAX + 1];
	bool local = false;
	cw_err src = report_subject(c, app, rep->subject, subject, &local, e);
	if (src)
		return src;
	struct policy_view *v = policy_live_get(app->policy);
	char nums[4][24];
	snprintf(nums[0], sizeof(nums[0]), "%lld", (long long)v->set.report_window_s);
	snprintf(nums[1], sizeof(nums[1]), "%lld", (long long)v->set.report_threshold);
	snprintf(nums[2], sizeof(nums[2]), "%lld", (long long)v->set.report_limit_per_minute);
	snprintf(nums[3], sizeof(nums[3]), "%lld", (long long)v->set.report_limit_s);
	policy_view_put(v);
	const char *params[] = { rep->reporter_kind, rep->reporter, rep->peer_id, subject, rep->reason,
				 rep->evidence ? rep->evidence : rep->gather ? NULL : "[]", rep->comment, nums[0], nums[1],
				 nums[2], nums[3], local ? "t" : "f", rep->actor, rep->gather ? "t" : "f",
				 rep->first_network, rep->first_kind, rep->first_native };
	PGresult *r = PQexecParams(c, report_sql, 17, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (answer) {
		*answer = PQntuples(r) == 1 ? json_loads(PQgetvalue(r, 0, 0), 0, NULL) : NULL;
		if (!*answer)
			rc = cw_fail(e, CW_EINTERNAL, "the database gave an answer that is not JSON");
	}
	if (xid)
		snprintf(xid, POLICY_XID_LEN, "%s", PQntuples(r) == 1 ? PQgetvalue(r, 0, 2) : "");
	PQclear(r);
	return rc;
}

void policy_report_evidence_words(const json_t *answer, char *out, size_t len)
{
	size_t n = json_array_size(json_object_get(answer, "evidence"));
	if (n)
		snprintf(out, len, "with %zu message(s) of theirs to you as evidence", n);
	else
		snprintf(out, len, "with no message of theirs: none that reached you is kept here");
}

static cw_err report_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct aq *q = j->data;
	const struct policy_report rep = { .reporter_kind = q->p[0], .reporter = q->p[1], .subject = q->p[2],
					   .reason = q->p[3], .evidence = q->p[4], .comment = q->p[5],
					   .actor = q->p[6] };
	cw_err rc = policy_report_store(c, j->app, &rep, &j->body, q->xid, e);
	if (rc == CW_EINVAL) {
		/* the subject names a contact of a network not configured
		 * (report_subject): nothing stored */
		app_job_fail(j, 400, "invalid_body", "subject: %s", e->msg);
		return CW_OK;
	}
	if (!rc) {
		j->status = 201;
		/* report_sql notifies every process of a limit it made; with
		 * none, no reload is waited for.  Its answer names its
		 * transaction (q->xid, for the sync): until the fifty-third
		 * session a statement of its own read it. */
		q->not_policy = json_is_null(json_object_get(j->body, "limit_rule_id"));
	}
	return rc;
}

/* A report made by the operator, or by the operator for a local user
 * (policy_report_store: the automatic limit). */
void policy_admin_report_create(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	json_t *body = app_json_body(req);
	if (!body)
		return;
	static const char *const members[] = { "reporter", "subject", "reason", "evidence", "comment", NULL };
	const char *subject = str(body, "subject"), *reason = str(body, "reason"), *p;
	json_t *evidence = json_object_get(body, "evidence"), *comment = json_object_get(body, "comment");
	/* The reporter is taken as POST /optins takes its user (local_user_problem):
	 * one person is one reporter toward the automatic limit's threshold,
	 * whichever spelling the operator typed.  Until the forty-sixth session
	 * it was stored as typed: on XMPP alone "Alice" and alice (her own
	 * report through her client) were two reporters, and a Matrix ghost's
	 * or the bot's name was taken as a local user's. */
	char folded[MIMI_URI_MAX + 1] = "", why[MIMI_URI_MAX + 300];
	bool has_reporter = json_object_get(body, "reporter") != NULL, ok = false;
	const char *reporter = has_reporter ? folded : NULL;
	if (!app_json_only_known(req, body, members))
		;
	else if (has_reporter && (p = local_user_problem(app, str(body, "reporter"), folded, why, sizeof(why)))) {
		char d[MIMI_URI_MAX + 400];
		snprintf(d, sizeof(d), "reporter %s (or absent: the operator reports)", p);
		bad_body(req, d);
	} else if (address_why(subject, true, false, why, sizeof(why))) {
		/* the parser's reason, as a rule's pattern or a consent's
		 * subject says it (since the forty-eighth session) */
		char d[sizeof(why) + 80];
		snprintf(d, sizeof(d), "subject must be a user URI mimi://<domain>/u/<local>: %s", why);
		bad_body(req, d);
	} else if (reporter && policy_same_local_user(app, reporter, subject))
		bad_body(req, "subject is the reporter herself (under another of this provider's domains, or spelt "
			      "otherwise): a user reports someone else");
	else if ((p = policy_report_fields_problem(json_object_get(body, "reason"), evidence, comment, why,
						   sizeof(why))))
		bad_body(req, p);
	else
		ok = true;
	/* No statement: the job's parameters (report_fn). */
	struct aq *q = ok ? aq_new(NULL) : NULL;
	if (q) {
		char *ev = evidence ? json_dumps(evidence, JSON_COMPACT) : NULL;
		aq_param(q, reporter ? "local_user" : "admin");
		aq_param(q, reporter ? reporter : admin_actor(req));
		aq_param(q, subject);
		aq_param(q, reason);
		aq_param(q, ev);
		aq_param(q, json_is_string(comment) ? json_string_value(comment) : NULL);
		aq_param(q, admin_actor(req));
		free(ev);
	}
	json_decref(body);
	if (q)
		aq_start(app, req, q, report_fn, true);
	else if (ok)
		aq_run(ctx, req, NULL); /* answers 503 */
}

/* A report handled already (an operator clicking twice, or two at once:
 * the second's UPDATE waits for the first's commit, then finds the report
 * handled) is 409 naming when and by whom, and audits nothing; 404 is
 * for no such report alone.  Until the thirty-sixth session both were
 * 404 "no open report with that id". */
/* After an UPDATE of a report that matched no row: 409 naming when and by
 * whom it was handled if the report is there in the state the UPDATE
 * excludes (`state`, a condition on reports), else the 404 stands. */
static cw_err report_conflict(PGconn *c, struct app_job *j, cw_errmsg *e, const char *sql, const char *what)
{
	const struct aq *q = j->data;
	cw_err rc = aq_fn(c, j, e);
	if (rc || !j->err_code || j->err_status != 404)
		return rc;
	const char *params[] = { q->p[0] };
	PGresult *r = PQexecParams(c, sql, 1, NULL, params, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	if (PQntuples(r) == 1)
		app_job_fail(j, 409, "conflict", "report %s was already %s at %s by %s", q->p[0], what,
			     PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1));
	PQclear(r);
	return CW_OK;
}

static cw_err report_handle_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	return report_conflict(c, j, e,
			       "SELECT " APP_SQL_TS("handled_at") ", handled_by FROM reports "
			       "WHERE id = $1::bigint AND handled_at IS NOT NULL",
			       "handled");
}

void policy_admin_report_handle(struct cw_req *req, void *ctx)
{
	char id[24];
	if (!app_path_id(req, "id", "report", id))
		return;
	struct aq *q = aq_new("UPDATE reports SET handled_at = now(), handled_by = $2 WHERE id = $1::bigint "
			      "AND handled_at IS NULL RETURNING json_build_object('id', id, 'handled_at', " APP_SQL_TS("handled_at") ", "
			      "'handled_by', handled_by)::text");
	if (!q) {
		aq_run(ctx, req, NULL); /* answers 503 */
		return;
	}
	aq_param(q, id);
	aq_param(q, admin_actor(req));
	q->none_detail = "no report with that id";
	q->action = "report.handle";
	q->subject = 0;
	q->not_policy = true;
	aq_start(ctx, req, q, report_handle_fn, true);
}

/* Dismissing a report: handled (if it was not), and judged unfounded, so
 * that it no longer counts toward the automatic limit (report_sql).  An
 * automatic limit already made stands until it expires
 * (policy.report_limit_seconds), even when the reports not dismissed are
 * now below the threshold: the answer names it (limit_rule_id, null for
 * none in force), and the operator deletes it (DELETE /rules/{id}) if the
 * dismissal should lift it.  A report already dismissed is 409 naming
 * when and by whom it was handled; 404 is for no such report alone.
 * Since the fortieth session. */
static cw_err report_dismiss_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	return report_conflict(c, j, e,
			       "SELECT " APP_SQL_TS("handled_at") ", handled_by FROM reports "
			       "WHERE id = $1::bigint AND dismissed",
			       "dismissed; it was handled");
}

void policy_admin_report_dismiss(struct cw_req *req, void *ctx)
{
	char id[24];
	if (!app_path_id(req, "id", "report", id))
		return;
	struct aq *q = aq_new("UPDATE reports SET handled_at = coalesce(handled_at, now()), "
			      "handled_by = coalesce(handled_by, $2), dismissed = true WHERE id = $1::bigint "
			      "AND NOT dismissed RETURNING json_build_object('id', id, 'handled_at', " APP_SQL_TS("handled_at") ", "
			      "'handled_by', handled_by, 'dismissed', dismissed, 'limit_rule_id', (SELECT r.id FROM rules r "
			      "WHERE r.scope = 'user' AND r.pattern = reports.subject_uri AND r.created_by = 'system:reports' "
			      "AND r.enabled AND (r.expires_at IS NULL OR r.expires_at > now())))::text");
	if (!q) {
		aq_run(ctx, req, NULL); /* answers 503 */
		return;
	}
	aq_param(q, id);
	aq_param(q, admin_actor(req));
	q->none_detail = "no report with that id";
	q->action = "report.dismiss";
	q->subject = 0;
	/* the limit it names stands (report_dismiss_fn): nothing to reload */
	q->not_policy = true;
	aq_start(ctx, req, q, report_dismiss_fn, true);
}

/* ------------------------------------------------------------ audit */

#define AUDIT_JSON \
	"json_build_object('id', x.id, 'at', " APP_SQL_TS("x.at") ", 'actor', x.actor, 'action', x.action, 'reason', x.reason_code, " \
	" 'rule_id', x.rule_id, 'message', (SELECT public_id FROM events WHERE id = x.event_id), " \
	" 'subject', x.subject, 'details', x.details)"

/* The audit list's other filters: $4 message, $5 actor; and $6, the id up
 * to which every record is committed (aq's records). */
#define AUDIT_MORE \
	"($4::text IS NULL OR event_id = (SELECT id FROM events WHERE public_id = $4)) " \
	" AND ($5::text IS NULL OR actor = $5) AND id <= $6::bigint"

void policy_admin_audit_list(struct cw_req *req, void *ctx)
{
	long long after;
	long limit;
	if (!app_paging(req, &after, &limit))
		return;
	const char *action = cw_req_query(req, "action"), *message = cw_req_query(req, "message");
	const char *actor = cw_req_query(req, "actor");
	if (action && (!*action || strlen(action) > 64)) {
		bad_query(req, "action must be an action (policy.hold) or a prefix ending in a dot (policy.)");
		return;
	}
	if (message && !message_id_valid(message)) {
		bad_query(req, "message must be a message id (msg_...)");
		return;
	}
	if (actor && (!*actor || strlen(actor) > 512)) {
		bad_query(req, "actor must be 1 to 512 bytes");
		return;
	}
	/* With an action or an actor, audit_log_action_id_idx or
	 * audit_log_actor_id_idx (028) gives its records in id order from the
	 * cursor on.  A prefix (policy.) matches a few actions: acts lists the
	 * log's distinct actions, one index probe each (all of them: the
	 * actions of a prefix are not a range in every collation), and each
	 * matching one gives its first records after the cursor; the page is
	 * the first of those by id.  Each action is compared as the range
	 * [action, action] and read in (action, id) order: for an equality
	 * with a value known only while running, the planner guesses an
	 * action's records from the number of actions, finds the primary key
	 * in id order cheaper, and walked the whole log for a rare action. */
	bool prefix = action && action[strlen(action) - 1] == '.';
	struct aq *q = aq_page(after, limit, prefix ? PAGE(AUDIT_JSON,
		"(WITH RECURSIVE acts(action) AS ("
		"  SELECT min(action) FROM audit_log "
		"  UNION ALL "
		"  SELECT (SELECT min(a.action) FROM audit_log a WHERE a.action > acts.action) "
		"  FROM acts WHERE acts.action IS NOT NULL) "
		" SELECT l.* FROM acts CROSS JOIN LATERAL (SELECT * FROM audit_log WHERE action >= acts.action "
		"  AND action <= acts.action AND id > $1::bigint AND " AUDIT_MORE " ORDER BY action, id LIMIT $2::int) l "
		" WHERE starts_with(acts.action, $3) ORDER BY l.id LIMIT $2::int) x")
		: PAGE(AUDIT_JSON, "(SELECT * FROM audit_log WHERE id > $1::bigint AND ($3::text IS NULL OR action = $3) "
				   " AND " AUDIT_MORE " ORDER BY id LIMIT $2::int) x"));
	if (q) {
		aq_param(q, action);
		aq_param(q, message);
		aq_param(q, actor);
		q->records = "audit_log";
	}
	aq_run(ctx, req, q);
}

/* "Why was this message held or denied?": each recipient's delivery with
 * the decision recorded for it (no record: allowed), and the record.  A
 * decision's recipient is its subject, or the local user it names in
 * details.user: a first contact's consent request refused by the limit is
 * the sender's (its subject, as a flood's), about that user. */
void policy_admin_decision(struct cw_req *req, void *ctx)
{
	const char *id = cw_req_param(req, "id");
	if (!message_id_valid(id)) {
		cw_req_problem(req, 404, "not_found", "Not found", "no message with that id");
		return;
	}
	struct aq *q = aq_new(
		"SELECT json_build_object('message', e.public_id, 'sender', s.uri, 'type', e.type, "
		" 'accepted_at', " APP_SQL_TS("e.accepted_at") ", 'content_deleted', e.content = '{}'::jsonb, "
		" 'recipients', (SELECT coalesce(json_agg(json_build_object('destination', o.destination, "
		"  'recipient', t.uri, 'state', o.state, 'attempts', o.attempts, 'last_error', o.last_error, "
		"  'verdict', " DELIVERY_VERDICT("a.action") ", 'reason', a.reason_code, "
		"  'rule_id', a.rule_id, 'decided_at', " APP_SQL_TS("a.at") ") ORDER BY o.id), '[]'::json) "
		"  FROM outbox o LEFT JOIN identities t ON t.id = o.target_identity_id "
		"  LEFT JOIN LATERAL (SELECT * FROM audit_log a WHERE a.event_id = e.id AND a.actor = 'policy' "
		"   AND " DELIVERY_DECISION " ORDER BY a.id DESC LIMIT 1) a ON true "
		"  WHERE o.event_id = e.id), "
		" 'decisions', (SELECT coalesce(json_agg(json_build_object('at', " APP_SQL_TS("a.at") ", 'verdict', "
		"  split_part(a.action, '.', 2), 'reason', a.reason_code, 'rule_id', a.rule_id, "
		"  'recipient', coalesce(a.details->>'user', a.subject), "
		"  'details', a.details) ORDER BY a.id), '[]'::json) FROM audit_log a WHERE a.event_id = e.id "
		"  AND a.actor = 'policy'))::text "
		"FROM events e JOIN identities s ON s.id = e.sender_id WHERE e.public_id = $1");
	if (q) {
		aq_param(q, id);
		q->none_detail = "no message with that id";
	}
	aq_run(ctx, req, q);
}
