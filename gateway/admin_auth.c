/* Admin credentials and the /admin/v1/tokens routes (see admin_auth.h). */
#include "config.h"
#include "admin_auth.h"
#include "app.h"
#include "log.h"
#include "policy_live.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define TOKEN_PREFIX "cwa_"
#define TOUCH_INTERVAL_US (60 * 1000000LL)

struct token_entry {
	int64_t id;
	char name[ADMIN_NAME_MAX];
	bool can_change;
	unsigned char hash[32];
	int64_t touched_us; /* when last_used_at was last written by this process */
};

struct admin_tokens {
	pthread_mutex_t mu;
	bool has_config;
	unsigned char config_hash[32];
	size_t n;
	struct token_entry *e;
};

struct admin_tokens *admin_tokens_new(const unsigned char *config_hash)
{
	struct admin_tokens *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	pthread_mutex_init(&t->mu, NULL);
	if (config_hash) {
		t->has_config = true;
		memcpy(t->config_hash, config_hash, 32);
	}
	return t;
}

void admin_tokens_set_config(struct admin_tokens *t, const unsigned char *config_hash)
{
	pthread_mutex_lock(&t->mu);
	t->has_config = config_hash != NULL;
	if (config_hash)
		memcpy(t->config_hash, config_hash, 32);
	else
		memset(t->config_hash, 0, 32);
	pthread_mutex_unlock(&t->mu);
}

void admin_tokens_free(struct admin_tokens *t)
{
	if (!t)
		return;
	pthread_mutex_destroy(&t->mu);
	free(t->e);
	free(t);
}

cw_err admin_tokens_load(struct admin_tokens *t, PGconn *c, cw_errmsg *e)
{
	PGresult *r = PQexecParams(c, "SELECT id, name, role, encode(token_hash, 'hex') FROM admin_tokens "
				      "WHERE revoked_at IS NULL ORDER BY id", 0, NULL, NULL, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	int n = PQntuples(r);
	struct token_entry *fresh = calloc((size_t)n + 1, sizeof(*fresh));
	if (!fresh) {
		PQclear(r);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	for (int i = 0; i < n; i++) {
		fresh[i].id = atoll(PQgetvalue(r, i, 0));
		snprintf(fresh[i].name, sizeof(fresh[i].name), "%s", PQgetvalue(r, i, 1));
		fresh[i].can_change = strcmp(PQgetvalue(r, i, 2), "admin") == 0;
		cw_unhex(PQgetvalue(r, i, 3), fresh[i].hash, 32); /* the table's check: 32 bytes */
	}
	PQclear(r);
	pthread_mutex_lock(&t->mu);
	/* Keep when each token was last touched, so a reload does not make
	 * every token's last_used_at due again. */
	for (int i = 0; i < n; i++)
		for (size_t k = 0; k < t->n; k++)
			if (t->e[k].id == fresh[i].id)
				fresh[i].touched_us = t->e[k].touched_us;
	free(t->e);
	t->e = fresh;
	t->n = (size_t)n;
	pthread_mutex_unlock(&t->mu);
	return CW_OK;
}

void admin_tokens_forget(struct admin_tokens *t, const char *name)
{
	pthread_mutex_lock(&t->mu);
	for (size_t i = 0; i < t->n; i++)
		if (strcmp(t->e[i].name, name) == 0) {
			t->e[i] = t->e[--t->n];
			break;
		}
	pthread_mutex_unlock(&t->mu);
}

bool admin_tokens_known(struct admin_tokens *t, const char *name)
{
	pthread_mutex_lock(&t->mu);
	bool known = false;
	for (size_t i = 0; i < t->n && !known; i++)
		known = strcmp(t->e[i].name, name) == 0;
	pthread_mutex_unlock(&t->mu);
	return known;
}

bool admin_tokens_any(struct admin_tokens *t)
{
	pthread_mutex_lock(&t->mu);
	bool any = t->has_config || t->n > 0;
	pthread_mutex_unlock(&t->mu);
	return any;
}

struct admin_principal *admin_tokens_check(struct admin_tokens *t, const char *token, int64_t *touch_id)
{
	*touch_id = 0;
	unsigned char h[32];
	cw_sha256(token, strlen(token), h);
	struct admin_principal *p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	bool found = false;
	pthread_mutex_lock(&t->mu);
	/* Every entry is compared, so the time does not say which one matched. */
	if (t->has_config && cw_ct_equal(h, t->config_hash, 32)) {
		found = true;
		snprintf(p->name, sizeof(p->name), "config");
		p->can_change = true;
	}
	struct token_entry *match = NULL;
	for (size_t i = 0; i < t->n; i++)
		if (cw_ct_equal(h, t->e[i].hash, 32))
			match = &t->e[i];
	if (match && !found) {
		found = true;
		p->id = match->id;
		memcpy(p->name, match->name, sizeof(p->name));
		p->can_change = match->can_change;
		int64_t now = cw_now_us();
		if (!match->touched_us || now - match->touched_us >= TOUCH_INTERVAL_US) {
			match->touched_us = now;
			*touch_id = match->id;
		}
	}
	pthread_mutex_unlock(&t->mu);
	if (!found) {
		free(p);
		return NULL;
	}
	snprintf(p->actor, sizeof(p->actor), "admin:%s", p->name);
	return p;
}

cw_err admin_tokens_in_force(struct admin_tokens *t, PGconn *c, const struct admin_principal *p, bool *ok,
			     cw_errmsg *e)
{
	*ok = true;
	if (!p || p->id <= 0)
		return CW_OK;
	char id[24];
	snprintf(id, sizeof(id), "%lld", (long long)p->id);
	const char *params[] = { id };
	/* KEY SHARE: not held up by the last_used_at writes (no key
	 * changes), waited for by a revocation (FOR UPDATE). */
	PGresult *r = PQexecParams(c, "SELECT 1 FROM admin_tokens WHERE id = $1::bigint AND revoked_at IS NULL "
				      "FOR KEY SHARE", 1, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	*ok = PQntuples(r) == 1;
	PQclear(r);
	if (!*ok) /* revoked, and committed: names are never taken again */
		admin_tokens_forget(t, p->name);
	return CW_OK;
}

const char *admin_actor(const struct cw_req *req)
{
	const struct admin_principal *p = cw_req_principal(req);
	return p ? p->actor : "admin";
}

/* ------------------------------------------------------------- routes */

void admin_whoami(struct cw_req *req, void *ctx)
{
	(void)ctx;
	const struct admin_principal *p = cw_req_principal(req);
	cw_req_reply_json(req, 200, json_pack("{s:s, s:s}", "name", p ? p->name : "", "role",
					      p && p->can_change ? "admin" : "viewer"));
}

/* The lock token creates take turns on (pg_advisory_xact_lock): the other
 * keys are migrate.c's, dispatcher.c's, policy_live.c's and peers.c's. */
#define TOKEN_NAME_LOCK_KEY "7161132091431352700"

#define TOKEN_JSON                                                                                      \
	"json_build_object('id', id, 'name', name, 'role', role, 'created_at', " APP_SQL_TS("created_at") ", " \
	"'last_used_at', " APP_SQL_TS("last_used_at") ", 'revoked_at', " APP_SQL_TS("revoked_at") ")"

/* One statement whose one row and column is the answer (as JSON text). */
struct tok_job {
	const char *sql;
	int n;
	const char *p[4];
	char buf[3][ADMIN_NAME_MAX + 16];
	char token[64];      /* create: the new token, shown once */
	const char *action;  /* audit action */
	char actor[ADMIN_NAME_MAX + 8];
	int status;
	int none_status;
	const char *none_detail;
	const char *same_sql; /* sql changed no row: the row as it is, a repeat's answer (no audit, no NOTIFY) */
	const char *lock_sql; /* run before sql, a statement of its own (its lock held until the commit) */
	bool same;            /* answered by same_sql */
	char xid[POLICY_XID_LEN]; /* the change's transaction, for the sync */
};

static cw_err tok_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct tok_job *q = j->data;
	if (q->lock_sql) {
		cw_err rc = store_exec(c, q->lock_sql, e);
		if (rc)
			return rc;
	}
	PGresult *r = PQexecParams(c, q->sql, q->n, NULL, q->p, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	if (PQntuples(r) == 0 && q->same_sql) {
		/* A statement of its own, with a snapshot of its own: it sees
		 * the change another request committed while sql waited. */
		PQclear(r);
		r = PQexecParams(c, q->same_sql, q->n, NULL, q->p, NULL, NULL, 0);
		if (PQresultStatus(r) != PGRES_TUPLES_OK) {
			cw_err rc = store_result_err(c, r, e);
			PQclear(r);
			return rc;
		}
		q->same = PQntuples(r) > 0;
	}
	if (PQntuples(r) == 0) {
		PQclear(r);
		app_job_fail(j, q->none_status, q->none_status == 409 ? "conflict" : "not_found", "%s",
			     q->none_detail);
		return CW_OK;
	}
	json_t *body = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
	PQclear(r);
	if (!body)
		return cw_fail(e, CW_EINTERNAL, "the database gave an answer that is not JSON");
	if (q->action && !q->same) {
		char *details = json_dumps(body, JSON_COMPACT);
		const char *ap[] = { q->actor, q->action, json_string_value(json_object_get(body, "name")),
				     details ? details : "{}" };
		/* The record names the change's transaction, for the sync
		 * (until the fifty-third session a statement of its own), and
		 * NOTIFYs every process, which reloads its tokens (until the
		 * fifty-fourth session a statement of its own after it:
		 * policy_notify_user). */
		r = PQexecParams(c, "WITH a AS (INSERT INTO audit_log (actor, action, subject, details) "
				    "VALUES ($1, $2, $3, $4::jsonb) RETURNING pg_current_xact_id()::text AS x) "
				    "SELECT a.x, " POLICY_NOTIFY_EXPR("NULL::bigint") " FROM a", 4, NULL, ap, NULL, NULL, 0);
		free(details);
		cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
		if (!rc) {
			snprintf(q->xid, sizeof(q->xid), "%s", PQgetvalue(r, 0, 0));
			PQclear(r);
		}
		if (rc) {
			json_decref(body);
			return rc;
		}
	}
	if (q->token[0]) /* after the audit: the token itself is never recorded */
		json_object_set_new(body, "token", json_string(q->token));
	j->status = q->status;
	j->body = body;
	return CW_OK;
}

/* A change answers once this process has it in force (the policy thread
 * reloads the tokens on each of its reloads, whether or not the policy's
 * own load succeeds).  A revoked token is dropped here first, so that a
 * slow or failing reload cannot leave it working in the process that
 * answered. */
static void tok_after(struct app_job *j)
{
	struct tok_job *q = j->data;
	bool revoke = q->action && strcmp(q->action, "token.revoke") == 0;
	if (revoke)
		admin_tokens_forget(j->app->admins, q->buf[0]);
	if (q->same) /* nothing changed: no reload to wait for */
		return;
	/* The sync is the policy's: while the policy fails to load it times
	 * out though the reload read the tokens, and it succeeds though the
	 * tokens' read failed.  A new token held by then is in force, as a
	 * revoked one is once dropped (below): the warning is for a new token
	 * not held yet, whatever the sync says. */
	policy_live_sync(j->app->policy, q->xid, 2000);
	if (!revoke && !admin_tokens_known(j->app->admins, q->buf[0]))
		LOG_KV(CW_LOG_WARN, "the token change is committed but not yet in force here (reload slow or failing)");
	/* Again: a reload that read the tokens before the revocation
	 * committed may have put the token back meanwhile. */
	if (revoke)
		admin_tokens_forget(j->app->admins, q->buf[0]);
}

static void tok_run(struct cw_req *req, void *ctx, struct tok_job *q)
{
	struct app_job *j = q ? app_job_new(ctx, req, tok_fn) : NULL;
	if (!j) {
		free(q);
		app_job_run(ctx, req, tok_fn, NULL, NULL, false); /* answers 503 */
		return;
	}
	snprintf(q->actor, sizeof(q->actor), "%s", admin_actor(req));
	j->data = q;
	j->data_free = free;
	if (q->action) {
		j->after = tok_after;
		j->after_waits = true;
	}
	app_job_start(j, q->action != NULL);
}

static struct tok_job *tok_new(const char *sql)
{
	struct tok_job *q = calloc(1, sizeof(*q));
	if (q) {
		q->sql = sql;
		q->status = 200;
		q->none_status = 404;
		q->none_detail = "no token with that name";
	}
	return q;
}

void admin_tokens_list(struct cw_req *req, void *ctx)
{
	tok_run(req, ctx, tok_new("SELECT json_build_object('tokens', coalesce(json_agg(" TOKEN_JSON
				  " ORDER BY id), '[]'::json))::text FROM admin_tokens"));
}

static bool name_valid(const char *s)
{
	size_t n = strlen(s);
	if (n < 1 || n >= ADMIN_NAME_MAX || strcmp(s, "config") == 0)
		return false;
	for (size_t i = 0; i < n; i++) {
		char ch = s[i];
		bool alnum = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
		if (!alnum && (i == 0 || !strchr("._@-", ch)))
			return false;
	}
	return true;
}

void admin_tokens_create(struct cw_req *req, void *ctx)
{
	json_t *body = app_json_body(req);
	if (!body)
		return;
	const char *bad = NULL, *name = json_string_value(json_object_get(body, "name"));
	json_t *rolej = json_object_get(body, "role");
	const char *role = rolej ? json_string_value(rolej) : "admin";
	const char *key;
	json_t *v;
	json_object_foreach(body, key, v)
		if (strcmp(key, "name") != 0 && strcmp(key, "role") != 0)
			bad = "only name and role may be given";
	if (!bad && !name)
		bad = "name is required (a string)";
	else if (!bad && (!name_valid(name) || strcasecmp(name, "config") == 0))
		bad = "name must be 1 to 64 letters, digits and . _ @ - (starting with a letter or digit), "
		      "and not \"config\" in any case (the configuration's token, actor admin:config)";
	else if (!bad && (!role || (strcmp(role, "admin") != 0 && strcmp(role, "viewer") != 0)))
		bad = "role must be admin or viewer";
	if (bad) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body", bad);
		json_decref(body);
		return;
	}
	/* A name taken is no row, not an error: a failed statement would
	 * abort the group commit's transaction under the other writes of its
	 * batch.  A name is taken by one that differs from it only in case
	 * too: the audit log's actor (admin:<name>), the list and a revoke
	 * name a token by it, and "Ops" beside "ops" is two operators no one
	 * tells apart (until the thirty-eighth session both were made).  Rows
	 * stored before that differ so stay, and are revoked by their exact
	 * names.  The creates take turns (a lock until the commit), so that
	 * two processes making "Ops" and "ops" at once do not both find
	 * neither. */
	struct tok_job *q = tok_new("INSERT INTO admin_tokens (name, role, token_hash) "
				    "SELECT $1::text, $2::text, decode($3, 'hex') WHERE NOT EXISTS (SELECT 1 FROM "
				    "admin_tokens WHERE lower(name) = lower($1::text)) ON CONFLICT (name) DO NOTHING "
				    "RETURNING " TOKEN_JSON "::text");
	if (q) {
		unsigned char raw[32], h[32];
		cw_random(raw, sizeof(raw));
		memcpy(q->token, TOKEN_PREFIX, sizeof(TOKEN_PREFIX) - 1);
		cw_b64url_encode(q->token + sizeof(TOKEN_PREFIX) - 1, sizeof(q->token) - sizeof(TOKEN_PREFIX) + 1, raw,
				 sizeof(raw));
		cw_sha256(q->token, strlen(q->token), h);
		snprintf(q->buf[0], sizeof(q->buf[0]), "%s", name);
		snprintf(q->buf[1], sizeof(q->buf[1]), "%s", role);
		cw_hex(q->buf[2], h, 32);
		q->p[0] = q->buf[0];
		q->p[1] = q->buf[1];
		q->p[2] = q->buf[2];
		q->n = 3;
		q->status = 201;
		q->action = "token.create";
		q->none_status = 409;
		q->none_detail = "a token with that name exists, or one whose name differs from it only in case "
				 "(revoked tokens keep their name)";
		q->lock_sql = "SELECT pg_advisory_xact_lock(" TOKEN_NAME_LOCK_KEY ")";
	}
	json_decref(body);
	tok_run(req, ctx, q);
}

void admin_tokens_revoke(struct cw_req *req, void *ctx)
{
	const char *name = cw_req_param(req, "name");
	if (!name_valid(name)) {
		cw_req_problem(req, 404, "not_found", "Not found",
			       strcmp(name, "config") == 0 ? "the configuration's token is changed in the configuration"
							   : "no token with that name");
		return;
	}
	/* A token revoked already is answered as it is, its first
	 * revoked_at, with no audit record nor NOTIFY (until the thirtieth
	 * session each repeat was audited again and made every process
	 * reload). */
	/* FOR UPDATE: the revocation waits for the changes of the token
	 * under way (admin_tokens_in_force's KEY SHARE), and those that come
	 * after find it revoked; the UPDATE's own lock would not. */
	struct tok_job *q = tok_new("WITH l AS (SELECT id AS tid FROM admin_tokens WHERE name = $1 "
				    "AND revoked_at IS NULL FOR UPDATE) "
				    "UPDATE admin_tokens SET revoked_at = now() FROM l WHERE id = l.tid "
				    "RETURNING " TOKEN_JSON "::text");
	if (q) {
		q->same_sql = "SELECT " TOKEN_JSON "::text FROM admin_tokens WHERE name = $1";
		snprintf(q->buf[0], sizeof(q->buf[0]), "%s", name);
		q->p[0] = q->buf[0];
		q->n = 1;
		q->action = "token.revoke";
	}
	tok_run(req, ctx, q);
}
