/* The policy in force: loading, swapping and the held-message sweep. */
#include "config.h"
#include "policy_live.h"
#include "dispatcher.h"
#include "event.h"
#include "fnv.h"
#include "log.h"
#include "policy_json.h"
#include "ratelimit.h"
#include "retention.h"
#include "store.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

bool policy_xsnap_parse(const char *text, struct policy_xsnap *s)
{
	*s = (struct policy_xsnap){ 0, 0, NULL, 0 };
	char *end;
	uint64_t xmin, xmax;
	size_t n = 0;
	if (*text < '0' || *text > '9')
		return false;
	xmin = strtoull(text, &end, 10);
	if (*end != ':' || end[1] < '0' || end[1] > '9')
		return false;
	xmax = strtoull(end + 1, &end, 10);
	if (*end != ':' || xmin > xmax)
		return false;
	const char *list = end + 1;
	for (const char *p = list; *p; p++)
		n += *p == ',';
	n += *list != '\0';
	uint64_t *xip = n ? malloc(n * sizeof(*xip)) : NULL;
	if (n && !xip)
		return false;
	const char *p = list;
	for (size_t i = 0; i < n; i++) {
		if (*p < '0' || *p > '9')
			goto bad;
		xip[i] = strtoull(p, &end, 10);
		if (xip[i] < xmin || xip[i] >= xmax || (*end != ',' && *end != '\0') || (*end == '\0') != (i + 1 == n))
			goto bad;
		p = end + 1;
	}
	*s = (struct policy_xsnap){ xmin, xmax, xip, n };
	return true;
bad:
	free(xip);
	return false;
}

bool policy_xsnap_sees(const struct policy_xsnap *s, uint64_t xid)
{
	if (xid == 0 || xid >= s->xmax)
		return false;
	if (xid < s->xmin)
		return true;
	for (size_t i = 0; i < s->nxip; i++)
		if (s->xip[i] == xid)
			return false;
	return true;
}

void policy_xsnap_free(struct policy_xsnap *s)
{
	free(s->xip);
	*s = (struct policy_xsnap){ 0, 0, NULL, 0 };
}

void policy_view_put(struct policy_view *v)
{
	if (v && atomic_fetch_sub(&v->refs, 1) == 1) {
		policy_xsnap_free(&v->xs);
		policy_snapshot_free(v->snap);
		policy_view_put(v->base); /* after: the overlay refers to it */
		free(v->users);
		free(v->outs);
		free(v->blocks_lately);
		free(v);
	}
}

static int64_t setting_int(const char *text, int64_t dflt, int64_t lo, int64_t hi)
{
	char *end;
	long long v = strtoll(text, &end, 10);
	return (*text && !*end && v >= lo && v <= hi) ? v : dflt;
}

void policy_settings_defaults(struct policy_settings *s)
{
	s->default_mode = POLICY_MODE_OPEN;
	s->optin_default = false;
	s->held_expiry_s = 7 * 86400;
	s->consent_window_s = 86400;
	s->report_threshold = 3;
	s->report_window_s = 86400;
	s->report_limit_per_minute = 1;
	s->report_limit_s = 86400;
	s->identifier_queries_per_minute = 60;
	s->peer_updates_per_minute = 600;
	s->user_updates_per_minute = 30;
	s->user_requests_per_day = 10;
	s->fingerprint = 0;
	s->mode_rule_expiry_in_ms = 0;
}

/* One settings row (value is JSON text).  A default mode it cannot read
 * (only SQL writes one: the admin API refuses it) is kept_mode, the mode
 * in force before, not the default open: until the fifty-second session
 * such a row opened the server, silently. */
static void setting_apply(struct policy_settings *s, const char *key, const char *value, enum policy_mode kept_mode)
{
	if (strcmp(key, "policy.default_mode") == 0) {
		enum policy_mode m;
		char name[32] = "", end = 0;
		if (sscanf(value, "\"%31[a-z]\"%c", name, &end) == 1 && policy_mode_parse(name, &m) &&
		    m != POLICY_MODE_NONE && m != POLICY_MODE_DENY) {
			s->default_mode = m;
			s->default_mode_unreadable = false;
		} else {
			s->default_mode = kept_mode;
			s->default_mode_unreadable = true;
		}
	} else if (strcmp(key, "policy.optin_default") == 0) {
		s->optin_default = strcmp(value, "true") == 0;
	} else if (strcmp(key, "policy.held_expiry_seconds") == 0) {
		s->held_expiry_s = setting_int(value, s->held_expiry_s, 1, 366 * 86400LL);
	} else if (strcmp(key, "policy.consent_request_window_seconds") == 0) {
		s->consent_window_s = setting_int(value, s->consent_window_s, 0, 366 * 86400LL);
	} else if (strcmp(key, "policy.report_limit_threshold") == 0) {
		s->report_threshold = setting_int(value, s->report_threshold, 0, 1000000);
	} else if (strcmp(key, "policy.report_window_seconds") == 0) {
		s->report_window_s = setting_int(value, s->report_window_s, 1, 366 * 86400LL);
	} else if (strcmp(key, "policy.report_limit_messages_per_minute") == 0) {
		s->report_limit_per_minute = setting_int(value, s->report_limit_per_minute, 1, 1000000);
	} else if (strcmp(key, "policy.report_limit_seconds") == 0) {
		s->report_limit_s = setting_int(value, s->report_limit_s, 1, 366 * 86400LL);
	} else if (strcmp(key, "policy.identifier_queries_per_minute") == 0) {
		s->identifier_queries_per_minute = setting_int(value, s->identifier_queries_per_minute, 1, 1000000);
	} else if (strcmp(key, "policy.peer_updates_per_minute") == 0) {
		s->peer_updates_per_minute = setting_int(value, s->peer_updates_per_minute, 1, 1000000);
	} else if (strcmp(key, "policy.user_updates_per_minute") == 0) {
		s->user_updates_per_minute = setting_int(value, s->user_updates_per_minute, 1, 1000000);
	} else if (strcmp(key, "policy.consent_requests_per_user_per_day") == 0) {
		s->user_requests_per_day = setting_int(value, s->user_requests_per_day, 0, 1000000);
	}
}

static cw_err query(PGconn *c, const char *sql, PGresult **out, cw_errmsg *e)
{
	*out = PQexec(c, sql);
	return store_check(c, *out, PGRES_TUPLES_OK, e);
}

static cw_err query_ids(PGconn *c, const char *sql, const char *ids, PGresult **out, cw_errmsg *e)
{
	const char *p[] = { ids };
	*out = PQexecParams(c, sql, 1, NULL, p, NULL, NULL, 0);
	return store_check(c, *out, PGRES_TUPLES_OK, e);
}

/* The opt-outs or the recent remote blocks a load read (policy_view.outs,
 * blocks_lately), as it reads them. */
struct fact_list {
	struct policy_user_fact *v;
	size_t n, cap;
};

/* A block is "of the last minutes" for policy_view.lately_s seconds: a
 * remote one is in a view's blocks_lately and has its user's walk read her
 * rows to his peer (RECHECK_BLOCKED_ROWS), a local user's has the periodic
 * sweep drop what a process let through with a view still without it
 * (BLOCKED_LATELY).  A block no NOTIFY named (made by SQL, one of more
 * users than an overlay holds is named, or while the connection was
 * away) is first seen by the next whole reload: the periodic one comes
 * policy.reload_interval_s after the last, the new connection's as it is
 * made.  A block older than the window at that reload was never applied:
 * her rows waiting went to his peer, and what a view without his block
 * let through to her was delivered.  Until the fifty-seventh session the
 * window was a fixed ten minutes, and policy.reload_interval_s may be an
 * hour.  The margin: the connection away, a load or a walk slow to come,
 * a block committed later than its created_at (docs/policy.md). */
#define LATELY_MARGIN_S 600
static long lately_s_of(long reload_interval_s)
{
	return reload_interval_s + LATELY_MARGIN_S;
}

static cw_err load_facts(PGconn *c, struct policy_builder *b, const char *ids, long lately_s,
			 struct fact_list *outs, struct fact_list *lately, cw_errmsg *e);

static int user_fact_cmp(const void *a, const void *b)
{
	const struct policy_user_fact *x = a, *y = b;
	if (x->id != y->id)
		return x->id < y->id ? -1 : 1;
	return x->about < y->about ? -1 : x->about > y->about;
}

struct load_all_arg {
	struct policy_settings set;
	struct fact_list outs, lately;
	long lately_s;              /* policy_view.lately_s */
	enum policy_mode kept_mode; /* for a default mode that cannot be read */
	char bad_mode[64];          /* that row's value, for the log */
};

/* Settings (into arg, a struct load_all_arg), rules and every fact. */
static cw_err load_all(PGconn *c, struct policy_builder *b, void *arg, cw_errmsg *e)
{
	struct load_all_arg *la = arg;
	struct policy_settings *set = &la->set;
	PGresult *r;
	cw_err rc = query(c, "SELECT key, value::text FROM settings WHERE key LIKE 'policy.%'", &r, e);
	if (rc)
		return rc;
	for (int i = 0; i < PQntuples(r); i++) {
		setting_apply(set, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), la->kept_mode);
		if (set->default_mode_unreadable && !la->bad_mode[0] &&
		    strcmp(PQgetvalue(r, i, 0), "policy.default_mode") == 0)
			snprintf(la->bad_mode, sizeof(la->bad_mode), "%s", PQgetvalue(r, i, 1));
	}
	PQclear(r);
	policy_builder_defaults(b, set->default_mode, set->optin_default);
	/* the settings' fingerprint (policy_settings.fingerprint): FNV-1a
	 * over strings, each ended by its 0 */
	uint64_t fp = fnv1a_field(FNV1A_START, policy_mode_name(set->default_mode));
	fp = fnv1a_field(fp, set->optin_default ? "t" : "f");

	/* An expiry of 'infinity' (only SQL writes one: the API takes
	 * seconds) is no expiry: until the thirty-seventh session its epoch
	 * (Infinity) failed the ::bigint cast, and with it every load of the
	 * policy until the row was mended; '-infinity' is past, not loaded. */
	if ((rc = query(c, "SELECT id, scope, pattern, coalesce(mode, ''), limits::text, "
			   " coalesce((extract(epoch FROM f.exp) * 1000)::bigint, 0), "
			   " ceil(extract(epoch FROM f.exp - now()) * 1000)::bigint "
			   "FROM rules, LATERAL (SELECT CASE WHEN isfinite(expires_at) THEN expires_at END AS exp) f "
			   "WHERE enabled AND (expires_at IS NULL OR expires_at > now())", &r, e)))
		return rc;
	set->mode_rule_expiry_in_ms = 0;
	for (int i = 0; i < PQntuples(r); i++) {
		/* A rule with a mode that expires changes the verdicts of the
		 * rows waiting (an open rule under a closed default, say): the
		 * reload after its expiry decides them again.  Until the
		 * thirty-fourth session that reload came with
		 * policy.reload_interval_s (a minute by default), and a row
		 * backing off was delivered meanwhile under a rule no longer in
		 * force.  Measured on the database's clock, as expires_at is. */
		if (PQgetvalue(r, i, 3)[0] && !PQgetisnull(r, i, 6)) {
			int64_t in = strtoll(PQgetvalue(r, i, 6), NULL, 10);
			if (in > 0 && (set->mode_rule_expiry_in_ms == 0 || in < set->mode_rule_expiry_in_ms))
				set->mode_rule_expiry_in_ms = in;
		}
		/* Only what a recheck's verdict reads: a rule with a mode (deny,
		 * closed, allowlist, open), not its limits.  A rule of limits
		 * alone (the automatic ones reports make, docs/policy.md) changes
		 * no verdict of a recheck and made every process read the whole
		 * waiting backlog again (a review of the session's change). */
		if (PQgetvalue(r, i, 3)[0]) {
			uint64_t h = FNV1A_START;
			for (int k = 0; k < 6; k++)
				if (k != 4)
					h = fnv1a_field(h, PQgetvalue(r, i, k));
			fp += h; /* a sum: the rows' order is not the hash's */
		}
		int brc = policy_builder_rule_row(b, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 2),
						  PQgetvalue(r, i, 3), PQgetvalue(r, i, 4), PQgetvalue(r, i, 5));
		if (brc == -2) {
			PQclear(r);
			return cw_fail(e, CW_ENOMEM, "out of memory");
		}
		if (brc == 1)
			LOG_KV(CW_LOG_WARN, "policy rule's limits partly not understood: its mode and the limits "
					    "understood apply", "rule_id", PQgetvalue(r, i, 0));
		else if (brc) {
			/* Not skipped: a rule of limits alone (or an open one) lost
			 * lets through what it bounds.  The load fails, the rules in
			 * force stay whole, and the failure is reported as a stale
			 * policy (until the fifty-second session the row was skipped
			 * with a warning, and its limits were off). */
			cw_err frc = cw_fail(e, CW_EINVAL,
				"policy rule %s cannot be read (scope %.16s, pattern %.200s, limits %.200s): "
				"the rules in force stay until it is mended or removed",
				PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), PQgetvalue(r, i, 4));
			PQclear(r);
			return frc;
		}
	}
	PQclear(r);
	/* The opt-outs are not in the fingerprint: until the fifty-third
	 * session they were, and every whole reload after a user's opt-out
	 * or opt-in (the periodic one, a NOTIFY without users, a new
	 * connection) decided again every waiting row, everyone's, where her
	 * walk had decided hers already (policy_view.outs). */
	set->fingerprint = fp;
	return load_facts(c, b, NULL, la->lately_s, &la->outs, &la->lately, e);
}

/* An entry more of list l; false out of memory. */
static bool fact_list_add(struct fact_list *l, struct policy_user_fact x)
{
	if (l->n == l->cap) {
		size_t cap = l->cap ? 2 * l->cap : 16;
		struct policy_user_fact *v = realloc(l->v, cap * sizeof(*v));
		if (!v)
			return false;
		l->v = v;
		l->cap = cap;
	}
	l->v[l->n++] = x;
	return true;
}

/* The facts of the local users ids (a PostgreSQL array text), or of all
 * (NULL); the opt-outs into outs, in (user, network) order; the remote
 * blocks of the last lately_s seconds into lately
 * (policy_view.blocks_lately), in (user, blocker) order. */
static cw_err load_facts(PGconn *c, struct policy_builder *b, const char *ids, long lately_s,
			 struct fact_list *outs, struct fact_list *lately, cw_errmsg *e)
{
	PGresult *r;
	cw_err rc;
	if ((rc = query_ids(c, "SELECT i.uri, o.network, o.opted_in, o.identity_id FROM user_optin o "
			   "JOIN identities i ON i.id = o.identity_id WHERE $1::bigint[] IS NULL "
			   "OR o.identity_id = ANY($1::bigint[])", ids, &r, e)))
		return rc;
	for (int i = 0; i < PQntuples(r); i++) {
		if (PQgetvalue(r, i, 2)[0] != 't' &&
		    !fact_list_add(outs, (struct policy_user_fact){ atoll(PQgetvalue(r, i, 3)),
								   fnv1a_field(FNV1A_START, PQgetvalue(r, i, 1)) }))
			goto oom;
		if (policy_builder_optin(b, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 2)[0] == 't') == -2)
			goto oom;
	}
	PQclear(r);
	if (outs->n > 1)
		qsort(outs->v, outs->n, sizeof(*outs->v), user_fact_cmp);

	if ((rc = query_ids(c, "SELECT i.uri, c.subject_kind = 'domain', c.subject, c.state = 'allowed' FROM consents c "
			   "JOIN identities i ON i.id = c.local_identity_id WHERE $1::bigint[] IS NULL "
			   "OR c.local_identity_id = ANY($1::bigint[])", ids, &r, e)))
		return rc;
	for (int i = 0; i < PQntuples(r); i++)
		if (policy_builder_consent(b, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1)[0] == 't', PQgetvalue(r, i, 2),
					   PQgetvalue(r, i, 3)[0] == 't') == -2)
			goto oom;
	PQclear(r);

	char secs[24];
	snprintf(secs, sizeof(secs), "%ld", lately_s);
	const char *bp[] = { ids, secs };
	/* A whole load asks first whether there is a block at all, and joins
	 * none when there is not.  Until the sixty-first session a blocks
	 * table never written (no page: the planner assumes ten, some 1,570
	 * rows) beside identities of local users alone (NOT is_local: one row
	 * estimated, none there) was joined from a sequential scan of every
	 * identity, 37-56 ms of every start's first load (and of every
	 * periodic reload) at 200,000 local users, a quarter of the 200 ms
	 * the start has; the same condition inside the join (a one-time
	 * filter) was not enough, the planner making it a parallel plan
	 * whose two workers were started before the filter said no, 11-33 ms
	 * on a loaded machine (docs/performance.md, "Sixty-first session"). */
	if (!ids) {
		r = PQexec(c, "SELECT EXISTS (SELECT 1 FROM blocks)");
		if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
			return rc;
		bool none = PQgetvalue(r, 0, 0)[0] != 't';
		PQclear(r);
		if (none)
			return CW_OK;
	}
	r = PQexecParams(c, "SELECT rb.uri, lb.uri, b.blocked_id, b.blocker_id, "
			 " b.created_at > now() - make_interval(secs => $2::bigint) FROM blocks b "
			 "JOIN identities rb ON rb.id = b.blocker_id "
			 "JOIN identities lb ON lb.id = b.blocked_id WHERE NOT rb.is_local AND lb.is_local "
			 "AND ($1::bigint[] IS NULL OR b.blocked_id = ANY($1::bigint[]))", 2, NULL, bp, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	for (int i = 0; i < PQntuples(r); i++) {
		if (policy_builder_remote_block(b, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1)) == -2)
			goto oom;
		if (PQgetvalue(r, i, 4)[0] == 't' &&
		    !fact_list_add(lately, (struct policy_user_fact){ atoll(PQgetvalue(r, i, 2)),
								  (uint64_t)atoll(PQgetvalue(r, i, 3)) }))
			goto oom;
	}
	PQclear(r);
	if (lately->n > 1)
		qsort(lately->v, lately->n, sizeof(*lately->v), user_fact_cmp);
	return CW_OK;
oom:
	PQclear(r);
	return cw_fail(e, CW_ENOMEM, "out of memory");
}

typedef cw_err (*fill_fn)(PGconn *c, struct policy_builder *b, void *arg, cw_errmsg *e);

/* Runs fill in one read-only transaction on c and compiles b (taken) into
 * a new view with one reference, timed from t0. */
static cw_err load_view(PGconn *c, uint64_t version, struct policy_builder *b, fill_fn fill, void *arg, int64_t t0,
			struct policy_view **out, cw_errmsg *e)
{
	struct policy_view *v = calloc(1, sizeof(*v));
	if (!v || !b) {
		free(v);
		policy_builder_free(b);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	/* The transaction's snapshot is taken by its first statement, which
	 * says what it is: the changes this view has (policy_xsnap).  One
	 * that does not parse sees nothing: each NOTIFY is loaded. */
	PGresult *r = PQexec(c, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_current_snapshot()");
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (!rc) {
		policy_xsnap_parse(PQgetvalue(r, 0, 0), &v->xs);
		PQclear(r);
		rc = store_end(c, fill(c, b, arg, e), e);
	} else if (PQtransactionStatus(c) == PQTRANS_INERROR) {
		store_end(c, rc, e); /* BEGIN went, the snapshot's statement failed: rolled back */
	}
	if (rc) {
		policy_builder_free(b);
		policy_xsnap_free(&v->xs);
		free(v);
		return rc;
	}
	v->snap = policy_builder_finish(b, version);
	if (!v->snap) {
		policy_xsnap_free(&v->xs);
		free(v);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	v->loaded_ms = cw_wall_ms();
	v->load_ms = (double)(cw_now_us() - t0) / 1000.0;
	atomic_init(&v->refs, 1);
	*out = v;
	return CW_OK;
}

cw_err policy_load(PGconn *c, uint64_t version, const struct policy_view *prev, long lately_s,
		   struct policy_view **out, cw_errmsg *e)
{
	struct load_all_arg la = { .kept_mode = prev ? prev->set.default_mode : POLICY_MODE_CLOSED,
				   .lately_s = lately_s };
	policy_settings_defaults(&la.set);
	cw_err rc = load_view(c, version, policy_builder_new(), load_all, &la, cw_now_us(), out, e);
	if (rc) {
		free(la.outs.v);
		free(la.lately.v);
		return rc;
	}
	(*out)->set = la.set;
	(*out)->outs = la.outs.v;
	(*out)->nouts = la.outs.n;
	(*out)->blocks_lately = la.lately.v;
	(*out)->nblocks_lately = la.lately.n;
	(*out)->lately_s = lately_s;
	/* Said once a run, when it starts (each reload reads it again). */
	if (la.set.default_mode_unreadable && !(prev && prev->set.default_mode_unreadable))
		LOG_KV(CW_LOG_ERROR, "policy.default_mode cannot be read (not \"open\", \"allowlist\" or "
				     "\"closed\"): the mode in force before it stays (closed when the daemon "
				     "starts) until it is set again",
		       "value", la.bad_mode, "mode", policy_mode_name(la.set.default_mode));
	else if (!la.set.default_mode_unreadable && prev && prev->set.default_mode_unreadable)
		LOG_KV(CW_LOG_INFO, "policy.default_mode is read again", "mode", policy_mode_name(la.set.default_mode));
	return rc;
}

/* The users of the array text ids, named in the overlay, and their facts;
 * whether one of them opted out of a network. */
struct users_fill {
	const char *ids;
	long lately_s;
	struct fact_list outs, lately;
};
static cw_err fill_users(PGconn *c, struct policy_builder *b, void *arg, cw_errmsg *e)
{
	struct users_fill *f = arg;
	PGresult *r;
	cw_err rc = query_ids(c, "SELECT uri FROM identities WHERE id = ANY($1::bigint[]) AND is_local", f->ids, &r, e);
	if (rc)
		return rc;
	for (int i = 0; !rc && i < PQntuples(r); i++)
		if (policy_builder_user(b, PQgetvalue(r, i, 0)) == -2)
			rc = cw_fail(e, CW_ENOMEM, "out of memory");
	PQclear(r);
	return rc ? rc : load_facts(c, b, f->ids, f->lately_s, &f->outs, &f->lately, e);
}

cw_err policy_load_users(PGconn *c, uint64_t version, struct policy_view *base, const int64_t *ids, size_t n,
			 struct policy_view **out, cw_errmsg *e)
{
	int64_t t0 = cw_now_us();
	if (base->base)
		base = base->base;
	char *arr = cw_pg_ids(ids, n, NULL);
	int64_t *users = malloc((n ? n : 1) * sizeof(*users));
	if (!arr || !users) {
		free(arr);
		free(users);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	memcpy(users, ids, n * sizeof(*users));
	struct users_fill f = { arr, base->lately_s, { NULL, 0, 0 }, { NULL, 0, 0 } };
	cw_err rc = load_view(c, version, policy_builder_overlay(base->snap), fill_users, &f, t0, out, e);
	free(arr);
	if (rc) {
		free(users);
		free(f.outs.v);
		free(f.lately.v);
		return rc;
	}
	struct policy_view *v = *out;
	v->set = base->set;
	atomic_fetch_add(&base->refs, 1);
	v->base = base;
	v->users = users;
	v->nusers = n;
	/* a remote block of the last minutes counts too: a lane's claim of
	 * one of her rows before her walk reaches it decides it again */
	v->opted_out = f.outs.n > 0 || f.lately.n > 0;
	v->outs = f.outs.v;
	v->nouts = f.outs.n;
	v->blocks_lately = f.lately.v;
	v->nblocks_lately = f.lately.n;
	v->lately_s = base->lately_s;
	return CW_OK;
}

/* The held rows a sweep looks at: one user's ($2), or (the periodic
 * sweep) those held past the expiry ($1 seconds), those whose user's
 * consents changed in the last minutes (a message decided with a
 * snapshot of before the change) and those of a group whose user wrote
 * there in the last minutes (WROTE_IN_GROUP: the write stamps
 * room_members.wrote_at, found in room_members_wrote_idx, so the next
 * periodic sweep releases what waited; one that arrived as she wrote is
 * seen by a later one).  The last minutes are policy_view.lately_s
 * seconds (LATELY_SINCE), as for a block (BLOCKED_LATELY): a process
 * whose view is still without her allow, or her writing in the group
 * (made on another process, or by SQL: no NOTIFY), holds what comes
 * until its next whole reload, up to policy.reload_interval_s later.  Until the fifty-eighth session
 * both windows were a fixed ten minutes, and a row held more than ten
 * minutes after her change waited for the expiry
 * (test_the_periodic_sweep_releases_what_was_held_after_her_consent_or_her_writing_within_the_reload_interval).
 * One user's rows are a descent of
 * outbox_held_probe_idx (OUTBOX_HELD: a custom plan folds the CASE into
 * its arm); the periodic sweep's generic plan keeps state = 'held' for
 * outbox_held_age_idx, whose range on created_at releasable_sql reads
 * (the rows not expired yet). */
#define SWEPT_HELD                                                                                      \
	"o.state = 'held' AND CASE WHEN $2::bigint IS NOT NULL THEN o.target_identity_id = $2::bigint "     \
	" AND " OUTBOX_HELD("o") " "                                                                          \
	" ELSE (o.created_at < now() - make_interval(secs => $1::bigint) OR o.target_identity_id IN "       \
	"  (SELECT local_identity_id FROM consents WHERE updated_at > " LATELY_SINCE ") "                   \
	"  OR (o.target_identity_id, o.room_id) IN (SELECT identity_id, room_id FROM room_members "         \
	"   WHERE wrote_at > " LATELY_SINCE ")) END"

/* The start of "the last minutes" of the periodic sweep's held rows
 * (SWEPT_HELD) and, since the fifty-ninth session, of its blocks
 * (BLOCKED_LATELY): policy_view.lately_s seconds ago, read from the policy
 * thread's connection's setting causeway.lately_s (conn_ready), not a
 * parameter.  The statements are prepared, and a generic plan cannot
 * estimate a parameter's range: with make_interval(secs => $5) it guessed
 * a third of consents and of the writers recent, where a stable
 * function's value is taken as it is planned (as now()'s was with the
 * fixed ten minutes).  With 100,000 consents, 50,000 writers and 5,000
 * held rows PostgreSQL then found the generic plan dearer than a custom
 * one and planned the sweep's two statements again at 20 of 39 sweeps
 * (none with the ten minutes), and the generic plan of releasable_sql
 * read the 50,000 identities at every sweep (16-87 ms, 1-5 ms with the
 * ten minutes; docs/performance.md, "Fifty-eighth session").  A
 * connection without the setting (not the policy thread's: only a
 * user's sweep, $2, whose custom plan drops the ELSE) finds no one
 * lately. */
#define LATELY_SINCE "now() - make_interval(secs => current_setting('causeway.lately_s', true)::bigint)"

/* The row o's user (who) blocked the sender s or its domain. */
#define BLOCKED_SENDER(who)                                                                             \
	"EXISTS (SELECT 1 FROM consents c WHERE c.local_identity_id = " who " AND c.state = 'blocked' "    \
	" AND ((c.subject_kind = 'user' AND c.subject = s.uri) OR (c.subject_kind = 'domain' "              \
	"  AND c.subject = s.domain)))"

/* The local users whose blocks a sweep applies to rows not held: $2 if it
 * blocks anyone, or (the periodic sweep) those whose block is of the last
 * minutes (a message let through with the snapshot of just before it).
 * An array, so that a row's probe of it is an index condition; most
 * sweeps find no one, and then no row either. */
#define BLOCKERS                                                                                        \
	"ARRAY(SELECT b.local_identity_id FROM consents b WHERE b.state = 'blocked' "                       \
	" AND (b.local_identity_id = $2::bigint OR ($2::bigint IS NULL AND " BLOCKED_LATELY ")))"
/* A block b of the last policy_view.lately_s seconds (BLOCKERS of the
 * periodic sweep; recent_blocks_sql asks whether there is one), from the
 * policy thread's connection's setting (LATELY_SINCE), as the held rows'
 * windows.  Until the fifty-ninth session the window was a parameter
 * (make_interval(secs => $5), $1 in recent_blocks_sql), and the generic
 * plans guessed a third of consents recent.  With 100,000 consents whose
 * updated_at is not in the table's order, the first of those guessed
 * thousands was cheaper to reach by a scan of the table than through
 * consents_updated_idx, and recent_blocks_sql's generic plan read all of
 * consents (1,137 buffers, 17.7 ms) at every periodic sweep that found no
 * recent block, most of them, where the index reads 2 (0.02 ms); and
 * while a block was of the last minutes, sweep_sql's generic plan, its
 * BLOCKERS costed at 2,676 against 17, was dearer than a custom one and
 * the statement was planned again at every sweep (41 plans of 41 sweeps,
 * 6 now; docs/performance.md, "Fifty-ninth session").  A connection
 * without the setting (a user's sweep, $2, on a request's connection:
 * its custom plan drops the arm) finds no one lately. */
#define BLOCKED_LATELY "b.updated_at > " LATELY_SINCE

/* A row of such a user (TO_BLOCKER), from a remote sender they blocked
 * (or its domain: FROM_BLOCKED), not the expiry's taking back of what
 * they were shown (origin gateway: it is the gateway's, after their
 * block as before it).  A row between two local users is not the
 * policy's at arrival, nor here. */
#define TO_BLOCKER "o.target_identity_id = ANY(" BLOCKERS ")"
#define FROM_BLOCKED                                                                                    \
	"NOT s.is_local AND e.origin_network <> 'gateway' AND " BLOCKED_SENDER("o.target_identity_id")

/* The rows a sweep decides: the held ones (SWEPT_HELD), and those not
 * handed to their destination yet whose user has since blocked their
 * sender (TO_BLOCKER, FROM_BLOCKED): pending ones (due, or backing off),
 * and dead letters and failures, which the operator could send again.
 * Until the twenty-third session only held rows were swept, and a block
 * let what waited for delivery through (a review's finding).  A row in
 * flight is not recalled: the far side may have it already.  Only a row
 * with a target is a user's (a local user's rows are theirs alone, also
 * in a group: a portal or chat room per member; a peer's row, no target,
 * is its users'); one user's block takes nothing from another.  Each
 * kind of row is found by index: pending ones in the rows of the
 * blockers' rooms (outbox_room_order_idx: no index more for every row
 * written), dead and failed ones in outbox_dead_target_idx (schema/033).
 * What is of the row alone comes first, apart from what is of its event
 * and sender (FROM_BLOCKED, which a held row needs not), so that it is
 * the scan's condition on outbox (SWEEP_SQL joins the event and sender
 * to each row it takes). */
#define SWEPT_ROWS                                                                                      \
	"((" SWEPT_HELD ") OR (o.state = 'pending' AND o.room_id = ANY(ARRAY(SELECT m.room_id "             \
	"  FROM room_members m WHERE m.identity_id = ANY(" BLOCKERS "))) AND " TO_BLOCKER ") "             \
	" OR (o.state IN ('dead', 'failed') AND " TO_BLOCKER ")) AND (o.state = 'held' OR (" FROM_BLOCKED "))"

/* The held row o, of the event e, is to a user who wrote in its group
 * since the sender became a member: what the policy's step 6
 * (user_wrote_in_group, recipient_wrote_here) lets through at arrival.
 * Both joined members; the row's room a group. */
#define WROTE_IN_GROUP                                                                                  \
	"EXISTS (SELECT 1 FROM rooms r JOIN room_members w ON w.room_id = r.id "                            \
	" JOIN room_members sm ON sm.room_id = r.id WHERE r.id = o.room_id AND r.kind = 'group' "           \
	" AND w.identity_id = o.target_identity_id AND w.membership = 'joined' "                            \
	" AND sm.identity_id = e.sender_id AND sm.membership = 'joined' AND sm.updated_at <= w.wrote_at)"

/* The most held rows one sweep releases (releasable_sql's LIMIT; the
 * sweep's $5 the last of them when it found that many): the rest wait for
 * the next batch, each its own transaction.  A consent's sweep releases
 * the first batch in the consent's transaction and NOTIFYs causeway_sweep
 * ("<her id>:<the batch's last id>:<the last to release>", the third
 * since the sixty-fourth session) when more may wait; a policy thread
 * that hears it queues her release, and releases the rest a batch a turn,
 * each from after the last id of the batch before (release_turn;
 * releasable_next_sql, sweep_next_sql).  Until the sixty-third session
 * its periodic sweep, which finds her rows among those of a consent of
 * the last minutes (SWEPT_HELD), ran at once and again at each turn
 * while it found a whole batch, reading all her held rows each time.
 * Until the sixty-second session a sweep released
 * every row it found in one statement: a consent that released 20,000
 * held rows held their row locks, and the writer's transaction, for the
 * whole statement (54-150 us a message in tests/bench/xmpp), and no row
 * of them reached a dispatcher before all were released
 * (docs/performance.md, "Sixty-second session"; docs/policy.md, "Consent
 * and the sweep").  The order of a room holds: the rows released are the
 * first to release in id order, and a later row of the same sender to the
 * same user waits for an earlier one still held (the claim's probe). */
#define SWEEP_BATCH 5000
#define SWEEP_BATCH_S "5000"

/* Of the held rows, the ones the sweep would release: their user allowed the
 * sender or its domain, or wrote in its group (column 8), and blocked
 * neither (the rules are asked again first: sweep); column 9 the
 * event's content, whose size and kinds are asked again (server_denials),
 * when $3 is true (a rule limits what a message holds:
 * policy_snapshot_limits_content), else NULL: PostgreSQL then reads none
 * of it (no detoasting) and libpq carries none to the writer, 20,000
 * contents for a consent that releases 20,000 rows (docs/performance.md,
 * "Fifty-third session: the XMPP delivery path's CPU").  One statement
 * for both: a custom plan folds the CASE, a generic one skips the column
 * per row.  Column 10 counts all the rows to release, this batch's and
 * the later ones' (read to sort them already: the window's count is taken
 * before the LIMIT), for a consent's answer (policy_sweep_with): from the
 * sixty-second session's batches to its mend the answer counted only the
 * first batch, "5,000 released" of 20,000.  Column 11 the last of all
 * the rows to release (their max(o.id), read with the count): the bound
 * of the later batches' reads (releasable_next_sql's $5), which a
 * consent's NOTIFY carries. */
/* The columns of releasable_sql and releasable_next_sql, but the last
 * (LAST), and the test after their rows' choice (the window, the
 * consent or the group, no block), written once for both. */
#define RELEASABLE_COLS(LAST)                                                                         \
	"SELECT o.id, s.uri, s.domain, s.network, t.uri, t.domain, t.network, e.type, g.gw, "          \
	" CASE WHEN $3::boolean THEN e.content END, " LAST " "
#define RELEASABLE_TEST                                                                               \
	"o.created_at >= now() - make_interval(secs => $1::bigint) "                                   \
	"AND (g.gw OR EXISTS (SELECT 1 FROM consents c WHERE c.local_identity_id = o.target_identity_id " \
	" AND c.state = 'allowed' AND ((c.subject_kind = 'user' AND c.subject = s.uri) "               \
	"  OR (c.subject_kind = 'domain' AND c.subject = s.domain)))) "                                \
	"AND NOT " BLOCKED_SENDER("o.target_identity_id") " ORDER BY o.id LIMIT " SWEEP_BATCH_S

static const char releasable_sql[] =
	RELEASABLE_COLS("count(*) OVER (), max(o.id) OVER ()")
	"FROM outbox o JOIN events e ON e.id = o.event_id JOIN identities s ON s.id = e.sender_id "
	"JOIN identities t ON t.id = o.target_identity_id "
	"CROSS JOIN LATERAL (SELECT " WROTE_IN_GROUP " AS gw) g "
	"WHERE " SWEPT_HELD " AND " RELEASABLE_TEST;

/* Rows not held that a block now stops (SWEPT_ROWS) are dropped as held
 * ones are, with the same reason and record.
 * Held rows whose local user has decided about the sender are released
 * (allowed, or the user wrote in the row's group since: gw) or dropped
 * (blocked: a block of the user or of the domain wins, as in decide(); or
 * a rule that now stops the sender, $3: [{id, reason, rule}]); rows held
 * past the expiry are expired, also when the user's consent came after it
 * but before a sweep saw it (the sender was shown not_delivered from the
 * expiry on).  Consent requests past their expiry are expired, each
 * recorded (consent.expire, the local user its subject): the XMPP
 * component withdraws those it showed from the user's roster
 * (xa_roster_sync, which follows the audit log).  Each release or drop is a decision of the policy's in the
 * audit log, so that "why" names it.
 * Locks are taken in id order and skipped when held by another sweep, so
 * two daemons never deadlock.  A pending row a dispatcher is claiming is
 * skipped too: it goes in flight (not recalled); one skipped for another
 * reason is seen by a periodic sweep while the block is of the last
 * minutes (BLOCKED_LATELY: policy_view.lately_s).  A pending
 * row is locked only if it is dropped (TO_BLOCKER), so a claim that passes
 * over it (SKIP LOCKED) and sends a later row of its room passes over a
 * row that is not sent (unless the sweep's transaction fails).  The
 * content of an event that no one will now receive is deleted; its rows
 * stay, so its sender still sees "not delivered".  The records of its
 * files re-hosted on the homeserver go with it (RETENTION_FORGET_FILES;
 * until the forty-seventh session's review they stayed for ever, the
 * peer's file URL, digest and size of a message whose content went). */
/* The record of consent requests expired (consent.expire, the local user
 * its subject, as the XMPP component and the Matrix bot read it), by the
 * sweep past their expiry or withdrawn by a rule (requests_withdraw_sql):
 * X a CTE of (id, local_identity_id, remote_identity_id, reason, rule),
 * the reason (also in details) and the rule NULL for an expiry.  Since
 * the forty-fourth session one statement's text for both. */
#define REQUESTS_EXPIRED_AUDIT(X) \
	"INSERT INTO audit_log (actor, action, reason_code, rule_id, subject, details) " \
	" SELECT 'policy', 'consent.expire', " X ".reason, " X ".rule, l.uri, " \
	"  jsonb_strip_nulls(jsonb_build_object('request', " X ".id, 'sender', r.uri, 'by', 'sweep', " \
	"  'reason', " X ".reason)) " \
	" FROM " X " JOIN identities l ON l.id = " X ".local_identity_id " \
	" JOIN identities r ON r.id = " X ".remote_identity_id ORDER BY " X ".id"

/* The consent requests past their expiry expired (when COND), a CTE's
 * body for REQUESTS_EXPIRED_AUDIT: the periodic sweep's (SWEEP_SQL, $2
 * NULL), or requests_expire_sql's while the periodic sweep of the held
 * rows waits for the releases (SWEEP_WAIT_RELEASES_US). */
#define REQUESTS_EXPIRE(COND) \
	"UPDATE consent_requests SET state = 'expired', decided_at = now() WHERE state = 'pending' " \
	" AND expires_at < now() AND " COND " RETURNING id, local_identity_id, remote_identity_id, " \
	" NULL::text AS reason, NULL::bigint AS rule"

/* The consent requests past their expiry expired and recorded, as the
 * periodic sweep does, on their own: while the periodic sweep of the held
 * rows waits for the releases (SWEEP_WAIT_RELEASES_US), up to 30 s, a
 * request's expiry does not (until the sixty-third session's mend it
 * waited with them). */
static const char requests_expire_sql[] =
	"WITH cr AS (" REQUESTS_EXPIRE("true") "), cra AS (" REQUESTS_EXPIRED_AUDIT("cr") ") SELECT count(*) FROM cr";

/* The row of TABLE (its alias A) where COND (its primary key
 * equal to a column of the rows before it), joined to each of them: a
 * descent of the primary key for each.  As a join the planner, on its
 * guess of how many rows a periodic sweep decides (half of the held ones:
 * 2,400 of 5,000, when it is none or ten), hashed the whole of events and
 * identities for them (docs/performance.md, "Fiftieth session: the
 * sweep's erase step and the held list").  Only the columns COLS: the
 * rows are locked (FOR UPDATE OF o), so each row of the subquery is
 * carried whole with o's (a copy for a recheck), and an event's whole row
 * is its content, read from TOAST and sorted (on disk: 7.5 MB of
 * temporary files for 40 messages of 190 KB) by a sweep that reads none
 * of it (until the fifty-third session, SELECT *:
 * test_a_consent_reads_no_held_content_when_no_rule_limits_it). */
#define BY_ID(TABLE, A, COLS, COND) \
	" CROSS JOIN LATERAL (SELECT " COLS " FROM " TABLE " " A " WHERE " COND " OFFSET 0) " A " "

/* The content of the events EVENTS (a query of their ids) erased when none
 * of their rows but those the statement decided (the CTE ch, in it as
 * they were before it) is still waiting or delivered: no one will now
 * receive them; their rows stay, so their sender still sees "not
 * delivered".  Then the records of their files re-hosted on the
 * homeserver (RETENTION_FORGET_FILES).  Each event is a descent of
 * events_pkey (the array) and its rows one of outbox_event_dest_key (the
 * subquery, kept one by OFFSET 0): until the fiftieth session, as joins
 * the planner made on its guess of how many rows a sweep decides, a
 * periodic sweep that expired ten rows read the whole of both tables. */
#define CONTENT_GONE(EVENTS) \
	"gone AS (UPDATE events e SET content = '{}'::jsonb WHERE e.id = ANY (ARRAY(" EVENTS ")) " \
	" AND NOT EXISTS (SELECT 1 FROM outbox x WHERE x.event_id = e.id AND x.id NOT IN (SELECT id FROM ch) " \
	"  AND x.state NOT IN ('dropped', 'expired') OFFSET 0) RETURNING e.id), " \
	RETENTION_FORGET_FILES("(SELECT " RETENTION_ATTS("f") " FROM events f WHERE f.id = ANY (ARRAY(SELECT id FROM gone)))")

/* The rows ch updates are found each by a descent of outbox_pkey for its
 * id (o.id = ANY (ARRAY[hd.id]): a one-element array, which no hash or
 * merge join can take, so the planner cannot hash the whole outbox for a
 * guess of many rows, as it did for o.id = hd.id, and none of the whole
 * array of them: from the fiftieth session to the fifty-first, o.id = ANY
 * (ARRAY(SELECT id FROM h)) AND o.id = hd.id, each descent went through
 * the whole array, and a consent that released 20,000 held rows took
 * 18-77 s (test_a_consent_that_releases_thousands_of_held_rows_reads_each_once).
 * $5, when not NULL, is the last of a whole batch of rows to release
 * (releasable_sql, SWEEP_BATCH): a row after it is taken (and locked)
 * only to be dropped or expired, so that the rows released are those the
 * rules were asked about, and the rows to release after them are neither
 * locked nor written in this batch (a lock writes the row); the last
 * column NOTIFYs causeway_sweep for the next batch ($4: a consent's;
 * $6, the last row the consent found to release, the NOTIFY's bound for
 * the later batches since the sixty-fourth session). */
#define SWEEP_SQL(ROWS, BOUND) \
	"WITH dn AS (SELECT * FROM jsonb_to_recordset($3::jsonb) AS d(id bigint, reason text, rule bigint)), " \
	"h AS (SELECT o.id, o.event_id, o.created_at, t.uri AS turi, " \
	"  (SELECT c.state FROM consents c WHERE c.local_identity_id = o.target_identity_id " \
	"    AND c.subject_kind = 'user' AND c.subject = s.uri) AS us, " \
	"  (SELECT c.state FROM consents c WHERE c.local_identity_id = o.target_identity_id " \
	"    AND c.subject_kind = 'domain' AND c.subject = s.domain) AS ds, " \
	"  " WROTE_IN_GROUP " AS gw " \
	" FROM outbox o " BY_ID("events", "e", "e.id, e.sender_id, e.origin_network", "e.id = o.event_id") \
	BY_ID("identities", "s", "s.uri, s.domain, s.is_local", "s.id = e.sender_id") \
	BY_ID("identities", "t", "t.uri", "t.id = o.target_identity_id") \
	" WHERE " ROWS " AND " BOUND " ORDER BY o.id FOR UPDATE OF o SKIP LOCKED), " \
	"hd AS (SELECT h.*, dn.reason AS rule_reason, NULLIF(dn.rule, 0) AS rule FROM h LEFT JOIN dn ON dn.id = h.id), " \
	"ch AS (UPDATE outbox o SET state = CASE WHEN hd.us = 'blocked' OR hd.ds = 'blocked' " \
	"   OR hd.rule_reason IS NOT NULL THEN 'dropped' " \
	"   WHEN hd.created_at < now() - make_interval(secs => $1::bigint) THEN 'expired' " \
	"   WHEN hd.us = 'allowed' OR hd.ds = 'allowed' OR hd.gw THEN 'pending' ELSE 'expired' END, " \
	"  next_attempt_at = now() " \
	" FROM hd WHERE o.id = ANY (ARRAY[hd.id]) " \
	"  AND (hd.us IS NOT NULL OR hd.ds IS NOT NULL OR hd.gw " \
	"  OR hd.created_at < now() - make_interval(secs => $1::bigint)) " \
	" RETURNING o.id, o.event_id, o.state, hd.turi, hd.rule, CASE WHEN hd.us = 'blocked' THEN 'user_blocked_sender' " \
	"  WHEN hd.ds = 'blocked' THEN 'user_blocked_domain' WHEN hd.rule_reason IS NOT NULL THEN hd.rule_reason " \
	"  WHEN o.state = 'expired' THEN NULL " \
	"  WHEN hd.us = 'allowed' THEN 'user_allowed_sender' WHEN hd.ds = 'allowed' THEN 'user_allowed_domain' " \
	"  WHEN hd.gw THEN 'user_wrote_in_group' END " \
	"  AS reason), " \
	"au AS (INSERT INTO audit_log (actor, action, reason_code, rule_id, event_id, subject, details) " \
	" SELECT 'policy', CASE ch.state WHEN 'pending' THEN 'policy.allow' ELSE 'policy.deny' END, ch.reason, ch.rule, " \
	" ch.event_id, ch.turi, '{\"by\": \"sweep\"}'::jsonb FROM ch WHERE ch.state IN ('pending', 'dropped') " \
	" ORDER BY ch.id), " \
	CONTENT_GONE("SELECT event_id FROM ch WHERE state <> 'pending' " \
	" EXCEPT SELECT event_id FROM ch WHERE state = 'pending'") ", " \
	"cr AS (" REQUESTS_EXPIRE("$2::bigint IS NULL") "), " \
	"cra AS (" REQUESTS_EXPIRED_AUDIT("cr") ") " \
	"SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'dropped'), " \
	" count(*) FILTER (WHERE state = 'expired'), CASE WHEN $4::boolean AND count(*) FILTER " \
	" (WHERE state = 'pending') > 0 THEN pg_notify('causeway_outbox', '') END, " \
	" CASE WHEN $4::boolean AND $5::bigint IS NOT NULL THEN pg_notify('causeway_sweep', " \
	"  coalesce($2::bigint::text, '') || ':' || $5::bigint || ':' || $6::bigint) END, " \
	" count(*) FILTER (WHERE state = 'pending' OR (state = 'dropped' AND id IN (SELECT id FROM dn))) FROM ch"

/* The bound of a sweep's rows past $5 (SWEEP_SQL): those after the
 * batch's last row are taken only to be dropped or expired. */
#define SWEEP_BOUND                                                                                     \
	"($5::bigint IS NULL OR o.id <= $5::bigint " \
	"  OR o.created_at < now() - make_interval(secs => $1::bigint) OR " BLOCKED_SENDER("o.target_identity_id") ")"

static const char sweep_sql[] = SWEEP_SQL(SWEPT_ROWS, SWEEP_BOUND);

/* The periodic sweep when no one blocked anyone in the last minutes
 * (recent_blocks_sql: BLOCKERS is empty, so SWEPT_ROWS' other arms take
 * no row): the held rows alone.  Until the forty-third session every
 * periodic sweep ran sweep_sql, and its generic plan, when it was made
 * while the statistics counted few pending rows, took the pending arm's
 * rows from outbox_due_idx (the arm's state implies that index's
 * predicate) instead of from the blockers' rooms: every sweep read all
 * pending rows to keep none, 60-80 ms a sweep at 120,000 of them, up to
 * 0.4 of a core with the test harness's 200 ms sweeps
 * (docs/performance.md, "Forty-third session").  A block now costs that
 * at most while it is of the last minutes (policy_view.lately_s: eleven
 * by default). */
static const char sweep_held_sql[] = SWEEP_SQL("(" SWEPT_HELD ")", SWEEP_BOUND);

/* A later batch of a user's release ($2), from the policy thread's queue
 * (struct release_due, release_turn): her held rows after $7 (the last
 * id of the batch before), in outbox_held_user_order_idx (schema/057),
 * up to the last row of this batch ($5, the last that releasable_next_sql
 * read, whole batch or not; the sweep does not run when it read none).
 * Until the sixty-third session's mend $5 was NULL for the last batch (less
 * than a whole one), and it took (FOR UPDATE) every row she still had
 * held past $6, those of senders she never allowed too: 16,001 released
 * and 20,000 of another sender held, its last batch read 21,001 rows
 * (test_a_release_s_last_batch_reads_no_held_row_past_its_own).  The
 * upper bound is a row comparison, which outbox_held_user_order_idx takes
 * as its index condition and outbox_pkey cannot: as o.id <= $5, on
 * statistics of before the rows came, the last batch took its rows from
 * a range of outbox_pkey, every user's rows in it, and
 * test_a_consent_that_releases_thousands_of_held_rows_reads_each_once saw
 * that scan.  Unlike a consent's own sweep, which takes every row
 * after its batch's last that it drops or expires (SWEEP_BOUND: a block
 * drops at once all that it stops, however many rows it releases), a
 * later batch reads nothing past its last row: the block's own sweep
 * dropped those, and the expiry is the periodic sweep's.  Until the
 * sixty-third session the later batches were the periodic sweep's, and
 * each read every row she still had held twice (its releasable_sql's
 * count and sort, its SWEEP_BOUND's probe of her blocks a row): 100,000
 * held rows released in 58 s (docs/performance.md, "Sixty-third
 * session: a release's batches in the order of an index"). */
static const char sweep_next_sql[] =
	SWEEP_SQL("o.target_identity_id = $2::bigint AND " OUTBOX_HELD("o") " AND o.id > $7::bigint",
		  "(o.target_identity_id, o.id) <= ($2::bigint, $5::bigint)");

/* The rows a later batch of a user's release would release (the columns
 * of releasable_sql, columns 10 and 11 NULL: the consent counted them):
 * her first SWEEP_BATCH after $4 in outbox_held_user_order_idx, up to
 * $5, the last row to release when her consent read them (releasable_sql's
 * column 11; the largest id when not known: a start's pass, or the NOTIFY
 * of an older daemon), each joined to its event and sender by a descent
 * of their keys (BY_ID), so that the batch reads its own rows and stops
 * at the last (test_a_release_reads_each_held_row_once_a_batch).  Until
 * the sixty-fourth session the last batch, less than a whole one, walked
 * every row she still had held after the batch before, each joined to
 * its event, sender and consents to be filtered out: with 20,000 held
 * rows of a sender she never allowed after the 16,001 she released, the
 * last batch's read passed 21,001 rows to its joins, 128,354 buffers in
 * 156 ms, against 1,001 rows and 8,354 buffers with the bound
 * (test_a_release_s_last_batch_reads_no_held_row_past_its_own;
 * docs/performance.md, "Sixty-fourth session").  A row held after her
 * consent's read is not the release's: decided at arrival by a view a
 * moment behind her consent, it is the periodic sweep's while her consent
 * is of the last minutes (SWEPT_HELD), as when her release was one batch.
 * The bound is a row comparison, outbox_held_user_order_idx's index
 * condition (sweep_next_sql's reason). */
static const char releasable_next_sql[] =
	RELEASABLE_COLS("NULL::bigint, NULL::bigint")
	"FROM outbox o " BY_ID("events", "e", "e.id, e.type, e.sender_id, e.content", "e.id = o.event_id")
	BY_ID("identities", "s", "s.uri, s.domain, s.network", "s.id = e.sender_id")
	BY_ID("identities", "t", "t.uri, t.domain, t.network", "t.id = o.target_identity_id")
	"CROSS JOIN LATERAL (SELECT " WROTE_IN_GROUP " AS gw) g "
	"WHERE o.target_identity_id = $2::bigint AND " OUTBOX_HELD("o") " AND o.id > $4::bigint "
	"AND (o.target_identity_id, o.id) <= ($2::bigint, $5::bigint) AND " RELEASABLE_TEST;

/* Whether BLOCKERS of the periodic sweep ($2 NULL) names anyone: its
 * condition, read in consents_updated_idx. */
static const char recent_blocks_sql[] =
	"SELECT EXISTS (SELECT 1 FROM consents b WHERE b.state = 'blocked' AND " BLOCKED_LATELY ")";

/* The periodic sweep's statements, prepared on the policy thread's
 * connection: sent whole, they were planned on every sweep, 1 ms each
 * (until the twentieth session).  Their generic plans are the periodic
 * sweep's custom plans ($2 NULL): both walk the held rows in an index of
 * them (EXPLAIN at 5,000 and 205,000 held rows).  A consent's sweep, on
 * a request's connection, sends them whole: only a custom plan folds
 * SWEPT_ROWS's CASE into a probe of the user's held rows.  expiry_sql
 * stays unprepared too: its generic plan takes every message due from a
 * bitmap and sorts them, where the custom plan walks the expiry index in
 * order and stops at its LIMIT (a backlog of expired messages would be
 * read whole on every sweep).  Without bitmap scans (tried in the
 * forty-sixth session) the generic plan walks that index in order, but
 * made while events is small it takes x's messages from the expiry index
 * too, every message due, sorted, instead of due's ids by key: 23,000
 * buffers a sweep for a backlog of 20,000 expired messages with rows in
 * flight (1,650 when planned after an ANALYZE), and the 40 large
 * messages of
 * test_the_periodic_sweep_reads_no_stored_message_to_find_those_that_expire
 * read from TOAST 480 times.  Its planning (3 ms a sweep under load) is
 * the cheaper cost. */
static const struct store_stmt sweep_stmts[] = {
	{ "cw_releasable", releasable_sql },
	{ "cw_sweep", sweep_sql },
	{ "cw_sweep_held", sweep_held_sql },
	{ "cw_recent_blocks", recent_blocks_sql },
	{ NULL, NULL },
};
static const struct store_stmt *const sweep_stmt_lists[] = { sweep_stmts, NULL };

/* The size and content kinds of a held row's event, from its stored
 * content (text, len bytes), into *q: read as the peer API reads an
 * arriving event (event_parse with the same limits: peer_api.c's
 * msg_input_from_event takes its request's from there), so a held
 * message meets a limit as it would arriving now.  jsonb's text spaces
 * out what came compact: its length was judged at arrival, and is not
 * here.  Content that does not parse (erased: '{}') carries none, as
 * nothing of it is left to deliver.  CW_ENOMEM when out of memory. */
static cw_err held_content(const char *text, size_t len, struct policy_request *q)
{
	struct event_limits lim = event_limits_default();
	lim.max_event_bytes = len;
	struct event ev;
	struct event_error err;
	/* EVENT_STORED: an attachment's content_type taken at arrival and
	 * refused by a stricter check since is still counted (until the
	 * fifty-second session such a message parsed as nothing here, and
	 * its size and kinds counted none against the rules). */
	cw_err rc = event_parse(text, len, &lim, EVENT_STORED, &ev, &err);
	if (rc == CW_OK) {
		q->body_bytes = ev.body_bytes;
		q->attachment_bytes = ev.attachment_bytes;
		q->content_kinds = ev.kinds;
		event_free(&ev);
	}
	return rc == CW_ENOMEM ? CW_ENOMEM : CW_OK;
}

/* What the server's rules (and the user's opt-in) say now of the rows
 * about to be released: those they stop, as sweep_sql's $3.  A row was
 * held under the rules of its arrival; a rule added since (deny: abuse
 * always wins; the server closed, or the sender's domain off the
 * allowlist), the user's opt-out, or a limit on the message itself (its
 * body or attachments' size, its content kinds) applies to it as to a
 * new message.  The user's own consent is the database's (the snapshot
 * may be a moment behind the change that runs this sweep); rate limits
 * were decided at arrival, when the message was counted. */
/* The rows of r (columns: id; sender uri, domain, network; recipient
 * uri, domain, network; event type; the event's stored content in
 * column content, -1: none) an inbound message of which the server's rules (or its
 * recipient's explicit opt-out) now refuse, as a JSON array
 * [{id, reason, rule}]; NULL when out of memory.  Each is decided as the
 * recheck decides a waiting row (recheck_refused: an opt-in missing
 * refuses only what comes, an explicit opt-out everything), but only
 * the server's side is listed: a block is the sweep's to read from
 * consents, and answers a consent request itself.  With its content, a
 * row's size and kinds are judged too (too_large, content_kind_disabled,
 * as for a message arriving now); a consent request (requests_turn) has
 * none: it asks about its sender, whom a limit on what a message holds
 * does not refuse.  Shared by the release's sweep (rule_denials) and the
 * walk of the pending consent requests (requests_turn). */
static json_t *server_denials(const struct policy_snapshot *snap, PGresult *r, int content)
{
	json_t *list = json_array();
	int64_t now = cw_wall_ms();
	for (int i = 0; list && i < PQntuples(r); i++) {
		struct policy_request q = {
			.direction = POLICY_INBOUND,
			.action = POLICY_ACT_EVENT,
			.event_type = PQgetvalue(r, i, 7),
			.sender = { PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), PQgetvalue(r, i, 3) },
			.recipient = { PQgetvalue(r, i, 4), PQgetvalue(r, i, 5), PQgetvalue(r, i, 6) },
			.now_ms = now,
			.recipient_wrote_here = true,
		};
		if (content >= 0 && !PQgetisnull(r, i, content) &&
		    held_content(PQgetvalue(r, i, content), (size_t)PQgetlength(r, i, content), &q)) {
			json_decref(list);
			return NULL;
		}
		struct policy_decision d;
		policy_decide(snap, &q, &d);
		bool refused = d.verdict == POLICY_DENY &&
			       (policy_reason_is_servers(d.reason) || policy_reason_is_content(d.reason));
		if (refused &&
		    json_array_append_new(list, json_pack("{s:s, s:s, s:I}", "id", PQgetvalue(r, i, 0), "reason",
							  d.reason, "rule", (json_int_t)d.rule_id))) {
			json_decref(list);
			list = NULL;
		}
	}
	return list;
}

/* The denials (sweep_sql's $3) of releasable_sql's result r, into *out. */
static cw_err rule_denials(const struct policy_view *v, PGresult *r, char **out, cw_errmsg *e)
{
	/* The row arrived opted in (else it was not held), and its user has
	 * just allowed its sender (or their domain), or wrote in its group:
	 * each is her opt-in for that conversation (server_denials decides
	 * it as though she wrote there).  Until the thirty-ninth session
	 * only writing in the group counted, and the snapshot, of just
	 * before the accept that runs this sweep, had no consent of hers:
	 * with policy.optin_default turned off since the row arrived, her
	 * accept dropped what it accepted (user_not_opted_in). */
	json_t *list = server_denials(v->snap, r, 9);
	*out = list ? json_dumps(list, JSON_COMPACT) : NULL;
	json_decref(list);
	return *out ? CW_OK : cw_fail(e, CW_ENOMEM, "out of memory");
}

/* sweep_stmts[k] as a statement of a pipeline (store_pipeline). */
static struct store_piped sweep_piped(bool prepared, int k, int n, const char *const *params)
{
	return (struct store_piped){ prepared ? NULL : sweep_stmts[k].sql, sweep_stmts[k].name, n, params, NULL };
}

/* Sweeps take turns (a transaction-level advisory lock): two at once would
 * each release part of a user's backlog (SKIP LOCKED), and the part that
 * commits first could be delivered before earlier messages still held by
 * the other.  (The dispatcher also never claims a row behind a held one of
 * the same room and user.)  In a transaction the caller's commit ends the
 * turn; on an idle connection the sweep is its own transaction. */
#define SWEEP_LOCK_KEY "7161132091431352699"

/* The sweep, its statements prepared on c (sweep_stmts) or not; with
 * after (a user's, target_id), a later batch of her release, of her held
 * rows after that id (releasable_next_sql, sweep_next_sql, never
 * prepared), *last_id the last id of a whole batch (0: not whole),
 * *skipped, of a later batch, the rows it found to release that it
 * neither released nor dropped by a rule (SWEEP_SQL's column 5: locked
 * by another transaction, SKIP LOCKED); until the sixty-third session's
 * second review the caller compared the rows found with all the rows the
 * sweep released or dropped, and a blocked sender's row dropped in the
 * batch's range (none of the rows found) hid a locked one.
 * A later batch that found none runs no sweep: it has nothing to release,
 * a block's own sweep dropped what the block stops, and the expiry is the
 * periodic sweep's.
 * Its statements go in two round trips (store_pipeline): the turn's lock
 * and the reads (the rows to release, for the rules to be asked again:
 * rule_denials; whether anyone blocked lately), then the sweep's
 * statement, whose $3 is the rules' answer.  first, when not NULL, is a
 * statement of the caller's sent before the lock in the first (its
 * result into first->r), then one sent after the sweep's statement in
 * the second; notify: the sweep's statement NOTIFYs the dispatchers when
 * it released a row.  Until the fifty-fourth session the lock, the reads
 * and the caller's statements were a round trip each: a consent's five
 * round trips are two. */
static cw_err sweep(PGconn *c, bool prepared, const struct policy_view *v, const char *target_id, const char *after,
		    const char *until, long counts[3], struct store_piped *first, struct store_piped *then, bool notify,
		    bool *more, long *later, int64_t *last_id, long *skipped, cw_errmsg *e)
{
	long found = 0;
	char secs[24], last[24], upto[24];
	snprintf(secs, sizeof(secs), "%lld", (long long)v->set.held_expiry_s);
	char *denials = NULL;
	const char *params[] = { secs, target_id, NULL, notify ? "t" : "f", NULL, NULL, after };
	*more = false;
	*later = 0;
	*last_id = 0;
	*skipped = 0;
	bool own = PQtransactionStatus(c) == PQTRANS_IDLE;
	cw_err rc = own ? store_exec(c, "BEGIN", e) : CW_OK;
	/* The content only when a rule limits it (releasable_sql's $3; NULL
	 * otherwise, which server_denials does not parse): its parse and check
	 * (event_parse) was most of a consent's CPU when none does, 3.5-5 µs of
	 * the daemon's a row released in tests/bench/xmpp (docs/performance.md,
	 * "Fifty-third session"), for sizes and kinds no rule reads. */
	const char *const rparams[] = { secs, target_id, policy_snapshot_limits_content(v->snap) ? "t" : "f", after,
					until };
	struct store_piped q[4];
	int n = 0, mine = first ? 1 : 0;
	if (first)
		q[n++] = *first;
	q[n++] = (struct store_piped){ "SELECT pg_advisory_xact_lock(" SWEEP_LOCK_KEY ")", NULL, 0, NULL, NULL };
	q[n++] = after ? (struct store_piped){ releasable_next_sql, NULL, 5, rparams, NULL }
		       : sweep_piped(prepared, 0, 3, rparams);
	if (!target_id)
		q[n++] = sweep_piped(prepared, 3, 0, NULL);
	if (!rc)
		rc = store_pipeline(c, q, n, e);
	int k = 1; /* sweep_sql; 2: sweep_held_sql */
	if (!rc) {
		if (first)
			first->r = q[0].r;
		rc = rule_denials(v, q[mine + 1].r, &denials, e);
		found = PQntuples(q[mine + 1].r);
		/* a whole batch to release: this one ends at its last row; a
		 * later batch's at its last always (sweep_next_sql) */
		if (found >= SWEEP_BATCH || (after && found > 0)) {
			snprintf(last, sizeof(last), "%s", PQgetvalue(q[mine + 1].r, PQntuples(q[mine + 1].r) - 1, 0));
			params[4] = last;
		}
		if (found >= SWEEP_BATCH) {
			*more = true;
			*later = after ? 0 : atol(PQgetvalue(q[mine + 1].r, 0, 10)) - PQntuples(q[mine + 1].r);
			*last_id = atoll(last);
			if (!after) { /* the last row to release of all: the later batches' bound */
				snprintf(upto, sizeof(upto), "%s", PQgetvalue(q[mine + 1].r, 0, 11));
				params[5] = upto;
			}
		}
		if (!target_id && strcmp(PQgetvalue(q[mine + 2].r, 0, 0), "t") != 0)
			k = 2;
		for (int i = mine; i < n; i++)
			PQclear(q[i].r);
	}
	params[2] = denials;
	if (!rc && after && !params[4] && !then) { /* a later batch that found nothing to release */
		counts[0] = counts[1] = counts[2] = 0;
		free(denials);
		return own ? store_end(c, rc, e) : rc;
	}
	if (!rc) {
		n = 0;
		q[n++] = after ? (struct store_piped){ sweep_next_sql, NULL, 7, params, NULL }
			       : sweep_piped(prepared, k, 6, params);
		if (then)
			q[n++] = *then;
		rc = store_pipeline(c, q, n, e);
	}
	free(denials);
	if (!rc) {
		for (int i = 0; i < 3; i++)
			counts[i] = atol(PQgetvalue(q[0].r, 0, i));
		if (after)
			*skipped = found - atol(PQgetvalue(q[0].r, 0, 5));
		PQclear(q[0].r);
		if (then)
			then->r = q[1].r;
	} else if (first) {
		PQclear(first->r);
		first->r = NULL;
	}
	return own ? store_end(c, rc, e) : rc;
}

/* The sweep of a user's rows (target_id) in the caller's transaction,
 * with the caller's statements first and then (sweep's) in its round
 * trips, NOTIFYing the dispatchers of the rows it released.  counts[0]
 * counts the rows to release after its batch too (releasable_sql's
 * column 10, SWEEP_BATCH), which the policy thread releases: the figure
 * of a consent's answer is all her held messages it releases (a rule
 * added in between could still stop one at its batch). */
static cw_err policy_sweep_with(PGconn *c, const struct policy_view *v, const char *target_id, long counts[3],
				struct store_piped *first, struct store_piped *then, cw_errmsg *e)
{
	bool more;
	long later;
	int64_t last;
	long skipped;
	cw_err rc = sweep(c, false, v, target_id, NULL, NULL, counts, first, then, true, &more, &later, &last,
			  &skipped, e);
	if (!rc)
		counts[0] += later;
	return rc;
}

/* ------------------------------------------------------------ recheck */

/* Rows not handed over yet are decided again after a change of what the
 * server's side of a decision reads (policy_settings.fingerprint: a rule
 * made, changed, deleted or expired, the default mode, an opt-out) and of
 * some users' facts (an opt-out: their rows; since the fifty-fifth
 * session a remote user's new block of a local one: her pending rows to
 * his peer, RECHECK_BLOCKED_ROWS).  Until the thirty-first
 * session only a held row's release asked the rules again (rule_denials),
 * and a row pending (backing off), dead or failed when the operator
 * denied its sender's domain was delivered after the deny, or on a replay
 * (a review's finding).  The rows come in batches (RECHECK_BATCH), each its
 * own transaction that locks only the rows it drops, so that a backlog of
 * 100,000 rows never holds the outbox long: the policy thread runs one
 * batch per turn.  Columns: 0 id, 1 destination, 2-4 the sender's uri,
 * domain, network, 5-7 the target's (NULL: a peer's row), 8 the type, 9
 * true when the row is not the policy's (the expiry's taking back, a
 * membership or block event, a local user's own event: her message, edit
 * or retraction to a peer is hers to send, and was decided when she
 * wrote, a remote block of her alone excepted, column 15; dropped here
 * it went without a word to her, its content erased,
 * a dead letter's notice owed to her lost with it — a review of the
 * session's change), 10 the sender is
 * local, 11 the peer's domain (a peer's row), 12 the peer's joined members
 * in the room (JSON), 13 the target's id, 14 the room's (a walk's cursor),
 * 15 true when the row is a local user's own event to a peer (of those
 * column 9 calls not the policy's, the ones a remote user's block of her
 * still stops: recheck_refused; not her retraction, a delete, of a message
 * he had before the block: it still goes); RECHECK_COLUMNS in (destination, id) order.  Each row of the batch (b)
 * takes its event, sender, user and peer by one descent of their keys
 * (LATERAL, OFFSET 0: not flattened into joins), whatever the planner
 * guesses of the batch: as joins, a batch of 500 hashed all of events
 * and identities (26,002 events and 5,003 users read, the tables
 * analyzed; until the fifty-second session: tests/integration/
 * test_policy.py, test_the_recheck_reads_only_its_batch_whatever_the_statistics).
 * The peer's joined members in the room (column 12) are read once for
 * each (room, destination) of the batch's peer rows (pm, materialized),
 * not once a row: a batch of 500 rows of a room of 3,003 members read
 * 1.5 million members and identities (until the fifty-second session:
 * test_the_recheck_reads_a_peers_members_of_a_room_once_a_batch).  The
 * peer itself (its id, for them, and its domain, column 11) is looked up
 * there too, once for each (room, destination): until the fifty-fifth
 * session pm looked it up for the members and a LATERAL of each row
 * again, a descent of peers_name_key a row more for the same peer.  The
 * statement that ends with b's CTE goes on with RECHECK_SELECT, which
 * starts with pm's. */
#define RECHECK_BATCH 500
#define RECHECK_SELECT                                                                                  \
	", pm AS MATERIALIZED (SELECT x.room_id, x.destination, p.id, p.domain, "                           \
	" (SELECT json_agg(i.uri ORDER BY i.id) FROM room_members m JOIN identities i ON i.id = m.identity_id " \
	"  WHERE m.room_id = x.room_id AND m.membership = 'joined' AND i.peer_id = p.id)::text AS members "   \
	" FROM (SELECT DISTINCT room_id, destination FROM b WHERE target_identity_id IS NULL "               \
	"  AND destination LIKE 'peer:%') x "                                                                \
	" LEFT JOIN LATERAL (SELECT p.id, p.domain FROM peers p WHERE p.name = substr(x.destination, 6) "     \
	"  OFFSET 0) p ON true) "                                                                            \
	"SELECT b.id, b.destination, s.uri, s.domain, s.network, t.uri, t.domain, t.network, e.type, "      \
	" (e.origin_network = 'gateway' OR e.type IN ('membership', 'block') OR (s.is_local AND t.is_local) " \
	"  OR (t.id IS NULL AND pm.id IS NULL) OR (t.id IS NOT NULL AND NOT t.is_local) "                    \
	"  OR s.is_local), s.is_local, pm.domain, pm.members, "                                              \
	" b.target_identity_id, b.room_id, "                                                                 \
	" (s.is_local AND pm.id IS NOT NULL AND e.origin_network <> 'gateway' "                              \
	"  AND e.type NOT IN ('membership', 'block', 'delete')) "                                            \
	"FROM b CROSS JOIN LATERAL (SELECT e.type, e.origin_network, e.sender_id FROM events e "            \
	"  WHERE e.id = b.event_id OFFSET 0) e "                                                            \
	"CROSS JOIN LATERAL (SELECT s.uri, s.domain, s.network, s.is_local FROM identities s "              \
	"  WHERE s.id = e.sender_id OFFSET 0) s "                                                           \
	"LEFT JOIN LATERAL (SELECT t.id, t.uri, t.domain, t.network, t.is_local FROM identities t "        \
	"  WHERE t.id = b.target_identity_id OFFSET 0) t ON true "                                          \
	"LEFT JOIN pm ON b.target_identity_id IS NULL AND pm.room_id = b.room_id "                          \
	" AND pm.destination = b.destination "
#define RECHECK_COLUMNS RECHECK_SELECT "ORDER BY b.destination, b.id"

/* One state's rows in outbox_state_dest_idx order, from after ($1, $2)
 * (destination, id), $3 of them: a range of that index, the state a literal so that
 * the partial index is the plan's (RECHECK_STATES lists them). */
#define RECHECK_STATE_SQL(state)                                                                        \
	"WITH b AS MATERIALIZED (SELECT id, destination, event_id, target_identity_id, room_id FROM outbox " \
	" WHERE state = '" state "' AND (destination, id) > ($1, $2::bigint) ORDER BY destination, id "      \
	" LIMIT $3::int) " RECHECK_COLUMNS
static const char *const recheck_state_sql[] = {
	RECHECK_STATE_SQL("pending"), RECHECK_STATE_SQL("held"), RECHECK_STATE_SQL("dead"),
	RECHECK_STATE_SQL("failed"),
};
#define RECHECK_STATES 4

/* Some local users' rows ($1, an array), of those who opted out of a
 * network (only an opt-out among a user's facts is the server's side of a
 * decision; most changes are consents of users who opted out of nothing:
 * no row is read, and since the fifty-sixth session none of these is
 * asked when the view holds no opt-out of the users: recheck_turn), one
 * kind after the other, each a walk in an index's order from after the
 * cursor ($2, $3, $4), $5 rows at a time: held ones in
 * outbox_held_probe_idx (OUTBOX_HELD) and dead and failed ones in
 * outbox_dead_target_order_idx (schema/039), by (user, room, id); pending
 * ones in outbox_room_order_idx, by (room, destination, id), as a block's
 * sweep finds them (no index on the pending rows' user: every row written
 * would pay for it): the users' rooms from the cursor's on, one at a time
 * (w), each read in order up to what the batch still lacks, so that a
 * batch stops where it is full (in one statement, all the rooms' rows
 * were read to keep the first 500).  Until the thirty-second session a
 * batch read all of the users' waiting rows and kept the 500 after the
 * last one's id: 70 ms a batch at 100,000 rows, a pass quadratic in one
 * user's backlog.  Each kind's result is in its walk's order: its last
 * row is the next cursor. */
#define RECHECK_OPTED_OUT                                                                               \
	" ou AS MATERIALIZED (SELECT array_agg(DISTINCT identity_id) AS a FROM user_optin "                 \
	" WHERE identity_id = ANY($1::bigint[]) AND NOT opted_in), "
#define RECHECK_USER_ROWS(cond)                                                                         \
	"WITH" RECHECK_OPTED_OUT "b AS MATERIALIZED (SELECT o.id, o.destination, o.event_id, "               \
	" o.target_identity_id, o.room_id FROM outbox o WHERE " cond                                         \
	" AND o.target_identity_id = ANY((SELECT a FROM ou)::bigint[]) "                                      \
	" AND (o.target_identity_id, o.room_id, o.id) > ($2::bigint, $3::bigint, $4::bigint) "               \
	" ORDER BY o.target_identity_id, o.room_id, o.id LIMIT $5::int) "                                      \
	RECHECK_SELECT "ORDER BY b.target_identity_id, b.room_id, b.id"
/* The last kind: the users' own rows to the peers of remote users who
 * blocked them lately (blocks: a peer's POST /v1/blocks, block event or
 * revoked consent, of the last policy_view.lately_s seconds, $6: an older block's rows were
 * walked when it came, and a NOTIFY naming her for another fact walks
 * nothing here, nor runs this statement when the view holds no such block
 * of the users: recheck_turn, has_fact), pending (in flight, a row is the lane's to decide if its
 * try fails, policy_live_screen_claim; not dead or failed: no index serves
 * them by room and destination, a dead letter dropped untold would lose
 * her "Not delivered" notice, and one comes back only by the admin's
 * replay, which decides it again, recheck_refused's column 15 too), in the
 * rooms each blocker is a member of (bu: one descent of blocks_blocked_idx
 * a user, of room_members_identity_idx a blocker; none for a user no one
 * blocked, most of those whose facts change), by (room, destination, id)
 * from after the cursor, each room's rows to that peer in outbox_room_order_idx
 * and outbox_state_dest_idx; of a group's rows only the blocked user's own
 * (her event's sender, a descent of events_pkey a row).  recheck_refused
 * decides them (column 15): dropped when every member of the peer in the
 * room blocked her.  Until the fifty-fifth session a remote block stopped
 * only what she wrote after it. */
#define RECHECK_BLOCKED_OF(state)                                                                       \
	"(SELECT o.id, o.destination, o.event_id, o.target_identity_id, o.room_id FROM outbox o "           \
	" WHERE " state " AND o.room_id = bu.room_id AND o.destination = bu.dest "                           \
	" AND o.target_identity_id IS NULL AND (o.room_id, o.destination, o.id) > ($2::bigint, $3, $4::bigint) " \
	" AND (SELECT e.sender_id FROM events e WHERE e.id = o.event_id) = bu.u ORDER BY o.id LIMIT $5::int)"
#define RECHECK_BLOCKED_ROWS                                                                            \
	"WITH bu AS MATERIALIZED (SELECT DISTINCT m.room_id, 'peer:' || p.name AS dest, b.blocked_id AS u " \
	" FROM blocks b JOIN identities i ON i.id = b.blocker_id AND NOT i.is_local "                        \
	" JOIN peers p ON p.id = i.peer_id JOIN room_members m ON m.identity_id = i.id "                     \
	" WHERE b.blocked_id = ANY($1::bigint[]) AND b.created_at > now() - make_interval(secs => $6::bigint) " \
	" AND m.room_id >= $2::bigint), "                                                                    \
	"b AS MATERIALIZED (SELECT o.id, o.destination, o.event_id, o.target_identity_id, o.room_id FROM bu " \
	" CROSS JOIN LATERAL " RECHECK_BLOCKED_OF("o.state = 'pending'") " o "                               \
	" ORDER BY o.room_id, o.destination, o.id LIMIT $5::int) "                                           \
	RECHECK_SELECT "ORDER BY b.room_id, b.destination, b.id"
static const char *const recheck_users_sql[] = {
	RECHECK_USER_ROWS(OUTBOX_HELD("o")),
	RECHECK_USER_ROWS("o.state IN ('dead', 'failed') AND o.target_identity_id IS NOT NULL"),
	"WITH RECURSIVE" RECHECK_OPTED_OUT
	"rm AS MATERIALIZED (SELECT coalesce(array_agg(DISTINCT m.room_id ORDER BY m.room_id), '{}') AS a "
	" FROM room_members m WHERE m.identity_id = ANY((SELECT a FROM ou)::bigint[]) AND m.room_id >= $2::bigint), "
	"w (k, got, ids) AS (SELECT 1, 0, '{}'::bigint[] UNION ALL "
	" SELECT w.k + 1, w.got + cardinality(x.ids), w.ids || x.ids FROM w CROSS JOIN rm CROSS JOIN LATERAL "
	"  (SELECT coalesce(array_agg(y.id ORDER BY y.destination, y.id), '{}') AS ids FROM (SELECT o.id, o.destination "
	"   FROM outbox o WHERE o.room_id = rm.a[w.k] AND o.state = 'pending' "
	"   AND o.target_identity_id = ANY((SELECT a FROM ou)::bigint[]) "
	"   AND (o.room_id, o.destination, o.id) > ($2::bigint, $3, $4::bigint) ORDER BY o.destination, o.id "
	"   LIMIT $5::int - w.got) y) x WHERE w.k <= cardinality(rm.a) AND w.got < $5::int), "
	"b AS MATERIALIZED (SELECT o.id, o.destination, o.event_id, o.target_identity_id, o.room_id FROM outbox o "
	" WHERE o.id = ANY((SELECT ids FROM w ORDER BY k DESC LIMIT 1)::bigint[])) "
	RECHECK_SELECT "ORDER BY b.room_id, b.destination, b.id",
	RECHECK_BLOCKED_ROWS,
};
#define RECHECK_USER_KINDS 4

/* Whether the kind-th kind of recheck_users_sql walks by (room,
 * destination, id), its cursor's second key a destination; the others by
 * (user, room, id). */
static bool users_by_room(int kind)
{
	return kind >= 2;
}

/* The rows $1 (an array of ids) in those states, or in flight under the
 * claim $2 (a dispatcher lane's: policy_live_screen; NULL: none).  A $2
 * ending in '#' names a family of claims, every one that starts with it:
 * the pull stream's rows are in flight each under its own position,
 * 'pull#<position>' (adapters/peer/peer_pull.c), screened as 'pull#'. */
#define RECHECK_WAITING                                                                                 \
	"(state IN ('pending', 'held', 'dead', 'failed') OR (state = 'in_flight' AND (claimed_by = $2 "    \
	" OR (right($2, 1) = '#' AND starts_with(claimed_by, $2)))))"
static const char recheck_ids_sql[] =
	"WITH b AS MATERIALIZED (SELECT id, destination, event_id, target_identity_id, room_id FROM outbox "
	" WHERE id = ANY($1::bigint[]) AND " RECHECK_WAITING ") " RECHECK_COLUMNS;

/* Drops the rows $1 ([{id, reason, rule, subject, kind}]) still not handed over
 * (or in flight under the claim $2: RECHECK_WAITING), as sweep_sql drops
 * a row: locked in id order, skipped when locked (a dispatcher claiming
 * it: it goes in flight, not recalled), the content of an event no one
 * will now receive erased, each drop audited as the policy's decision by
 * the sweep (the "why" of the message names it).  A row in flight whose
 * id is in $3 (an array; NULL: none) has the try its claim counted taken
 * back: the claim's lane never made it (or made one that does not count,
 * a 429), as its release would have (policy_live_screen_claim).  The
 * count of rows dropped, the reason of the first, their ids (JSON), the
 * ids of those not dropped (JSON: skipped as locked, or no longer
 * waiting), and how many were dropped of each reason and kind (JSON:
 * [[reason, kind, count], ...], kind an index of policy_recheck_kinds).
 * A local user's message or edit dropped for her recipient's block
 * (recipient_blocked_sender, outbound: it waited for his peer, decided
 * when she wrote) keeps the start of its text in sender_quote (schema/054,
 * '' when it has none), read before the content goes: the adapters' look
 * for dead letters tells her as it tells a dead letter
 * (dispatcher_dead_untold), "Not delivered ("quote"): this person blocked
 * you.", and clears it.  Until the fifty-ninth session such a row went
 * without a word to her, who believed it delivered or on its way; a row
 * refused as she wrote is dropped there, not here, and was told then.
 * Her retraction, reaction or receipt is no message to tell of: none.
 * Nor a row she was told of already (sender_told_at), but a dead letter
 * (or failed row) the admin's replay decides again and refuses ($4 true:
 * policy_recheck_row): told "could not be reached (...). The operator can
 * send it again.", she is told now what became of the resend he asked
 * for, "this person blocked you" (unless a row of the same message was
 * told of a drop already, the look's mark since the sixty-first session:
 * then the words would be that notice again, and she hears nothing
 * more).  The fifty-ninth session's review took
 * that second notice for a repeat and kept no quote for a row told
 * already, so a refused replay told nothing; the sixtieth session's first
 * mend quoted every dead or failed row told already, taking the replay
 * for the one path that drops one, but the whole pass walks dead and
 * failed rows too (recheck_state_sql), at every start of the daemon and
 * after every change of the rules: a dead letter she was told of weeks
 * before was told again, "this person blocked you", at the first pass
 * after his block, one notice a dead letter (a review of that session;
 * test_her_told_dead_letter_dropped_by_a_pass_after_his_block_is_not_told_again).
 * A dead row the dispatcher marked told without a notice (dispatcher.c,
 * dead_now and outbox_dead_unreadable: no replay can help it, and the
 * chat is told nothing) is quoted by a replay alone too.  A message that
 * expires (content.expires; an edit, of a message that does or did: the
 * expiry finds the edits by replaces_id, and an edit carries no expiry of
 * its own) keeps '' (told without its text) since the sixtieth session:
 * the quote, in her room
 * for good, would outlive the expiry, and once the drop erased the
 * content nothing finds the row by its expiry to clear it (the erasures
 * clear a quote: docs/policy.md, "Blocks travel"); until a review of that
 * session an edit of such a message was quoted all the same.  Nor an
 * edit whose message's content is gone ('{}': dropped in an earlier
 * statement, a batch of the pass before, its expiry then never found
 * again: the session's second review). */
/* The events of the rows $1 ([{id, ...}]) locked, in id order, before
 * recheck_drop_sql (in the same transaction). */
static const char recheck_lock_sql[] =
	"SELECT e.id FROM events e WHERE e.id IN (SELECT o.event_id FROM outbox o WHERE o.id IN "
	" (SELECT (d->>'id')::bigint FROM jsonb_array_elements($1::jsonb) d)) ORDER BY e.id FOR NO KEY UPDATE OF e";

static const char recheck_drop_sql[] =
	"WITH dn AS (SELECT * FROM jsonb_to_recordset($1::jsonb) AS d(id bigint, reason text, rule bigint, "
	"  subject text, kind int)), "
	"lk AS (SELECT o.id FROM outbox o WHERE o.id IN (SELECT id FROM dn) "
	"  AND " RECHECK_WAITING " ORDER BY o.id FOR UPDATE OF o SKIP LOCKED), "
	"ch AS (UPDATE outbox o SET state = 'dropped', next_attempt_at = now(), claimed_by = NULL, "
	"  claimed_until = NULL, attempts = CASE WHEN o.state = 'in_flight' AND o.id = ANY($3::bigint[]) "
	"  THEN greatest(o.attempts - 1, 0) ELSE o.attempts END, "
	"  sender_quote = CASE WHEN dn.reason = 'recipient_blocked_sender' AND dn.kind = 1 "
	"  AND (o.sender_told_at IS NULL OR ($4::boolean AND o.state IN ('dead', 'failed'))) THEN "
	"  (SELECT coalesce(CASE WHEN event_expires(e.content) IS NULL AND NOT e.expired "
	"   AND NOT EXISTS (SELECT 1 FROM events m WHERE m.id = e.replaces_id "
	"    AND (m.expired OR event_expires(m.content) IS NOT NULL OR m.content = '{}'::jsonb)) THEN "
	DISPATCHER_QUOTE("e.content") " END, '') "
	"   FROM events e WHERE e.id = o.event_id "
	"   AND e.type IN ('message', 'edit')) END "
	"  FROM dn WHERE o.id = dn.id AND o.id IN (SELECT id FROM lk) "
	"  RETURNING o.id, o.event_id, dn.reason, NULLIF(dn.rule, 0) AS rule, dn.subject, dn.kind), "
	"au AS (INSERT INTO audit_log (actor, action, reason_code, rule_id, event_id, subject, details) "
	" SELECT 'policy', 'policy.deny', ch.reason, ch.rule, ch.event_id, ch.subject, '{\"by\": \"sweep\"}'::jsonb "
	" FROM ch ORDER BY ch.id), "
	CONTENT_GONE("SELECT event_id FROM ch") " "
	"SELECT count(*), min(reason), coalesce(json_agg(id ORDER BY id), '[]')::text, "
	" (SELECT coalesce(json_agg(dn.id ORDER BY dn.id), '[]') FROM dn WHERE dn.id NOT IN (SELECT id FROM ch))::text, "
	" (SELECT coalesce(json_agg(json_build_array(x.reason, x.kind, x.n) ORDER BY x.reason, x.kind), '[]') "
	"  FROM (SELECT reason, kind, count(*) AS n FROM ch GROUP BY reason, kind) x)::text "
	"FROM ch";

/* Whether every one of the peer's joined members in the room of row i of a
 * RECHECK_COLUMNS result (a local user's own event to a peer: column 15)
 * blocked its sender (a peer's POST /v1/blocks, block event or revoked
 * consent): *d recipient_blocked_sender, *subject the first of them.  Her
 * message was decided when she wrote, and nothing else of that decision is
 * asked again; but one that waited for its peer (down, or its retry not
 * due) when her recipient blocked her was delivered after the block: until
 * the fifty-fifth session nothing decided it again.  In a group, as at the
 * write (docs/policy.md, "Groups"), one member's block does not take the
 * peer's row from the others: only when all of them blocked her.  No
 * member left (none joined): nothing to decide, the row stays. */
static bool recipients_blocked_her(const struct policy_snapshot *snap, PGresult *r, int i, struct policy_decision *d,
				   char *subject, size_t len)
{
	if (PQgetisnull(r, i, 12))
		return false;
	json_t *members = json_loads(PQgetvalue(r, i, 12), 0, NULL);
	size_t n = json_array_size(members);
	bool all = n > 0;
	for (size_t k = 0; all && k < n; k++)
		all = policy_remote_block_fact(snap, json_string_value(json_array_get(members, k)), PQgetvalue(r, i, 2));
	if (all) {
		*d = (struct policy_decision){ .verdict = POLICY_DENY, .reason = "recipient_blocked_sender" };
		snprintf(subject, len, "%s", json_string_value(json_array_get(members, 0)));
	}
	json_decref(members);
	return all;
}

/* Whether the server's rules (and an inbound row's user's opt-out or her
 * block of the sender) refuse row i of a RECHECK_COLUMNS result now: *d
 * the refusal, *subject whom it is about (the row's user; a peer's row:
 * the member refused).  An inbound row is decided as it arrived but as if
 * its user wrote in its room (an opt-in missing refuses only what comes;
 * an explicit opt-out refuses all, as at arrival); a peer's row as the
 * writer decides it (a server deny of any of the peer's members in the
 * room refuses it, another server refusal only of them all;
 * docs/policy.md "Groups"), by the peer's domain alone when none is left.
 * Sizes, rate limits and the users' consents but a block are not asked
 * again. */
static bool recheck_refused(const struct policy_snapshot *snap, PGresult *r, int i, int64_t now,
			    struct policy_decision *d, char *subject, size_t len)
{
	if (PQgetvalue(r, i, 9)[0] == 't')
		return PQgetvalue(r, i, 15)[0] == 't' && recipients_blocked_her(snap, r, i, d, subject, len);
	struct policy_request q = {
		.action = POLICY_ACT_EVENT,
		.event_type = PQgetvalue(r, i, 8),
		.sender = { PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4) },
		.now_ms = now,
		.recipient_wrote_here = true,
	};
	if (!PQgetisnull(r, i, 5)) {
		q.direction = POLICY_INBOUND;
		q.recipient = (struct policy_party){ PQgetvalue(r, i, 5), PQgetvalue(r, i, 6), PQgetvalue(r, i, 7) };
		policy_decide(snap, &q, d);
		snprintf(subject, len, "%s", PQgetvalue(r, i, 5));
		/* Her block of the sender (or their domain) too, as the block's
		 * sweep drops her rows (TO_BLOCKER, the same rows: a remote
		 * sender's, not the expiry's taking back, column 9): a row in
		 * flight as she blocked, its delivery failed, is decided here
		 * before it goes back to waiting (policy_live_facts).  Until the
		 * forty-third session it went back pending and its retry, due
		 * before the next periodic sweep, delivered it after her block
		 * (a review's probe). */
		return d->verdict == POLICY_DENY &&
		       (policy_reason_is_servers(d->reason) || strcmp(d->reason, "user_blocked_sender") == 0 ||
			strcmp(d->reason, "user_blocked_domain") == 0);
	}
	q.direction = PQgetvalue(r, i, 10)[0] == 't' ? POLICY_OUTBOUND : POLICY_TRANSIT;
	json_t *members = PQgetisnull(r, i, 12) ? NULL : json_loads(PQgetvalue(r, i, 12), 0, NULL);
	size_t n = json_array_size(members);
	bool all = true, any = false;
	struct policy_decision first = { .verdict = POLICY_ALLOW };
	for (size_t k = 0; k < (n ? n : 1); k++) {
		const char *uri = n ? json_string_value(json_array_get(members, k)) : "";
		q.recipient = (struct policy_party){ uri ? uri : "", PQgetvalue(r, i, 11), PQgetvalue(r, i, 1) };
		policy_decide(snap, &q, d);
		bool refused = d->verdict == POLICY_DENY && policy_reason_is_servers(d->reason);
		if (refused && strncmp(d->reason, "server_denied_", 14) == 0) {
			snprintf(subject, len, "%s", q.recipient.uri[0] ? q.recipient.uri : PQgetvalue(r, i, 11));
			json_decref(members);
			return true;
		}
		if (refused && !any) {
			first = *d;
			snprintf(subject, len, "%s", q.recipient.uri[0] ? q.recipient.uri : PQgetvalue(r, i, 11));
		}
		any = any || refused;
		all = all && refused;
	}
	json_decref(members);
	*d = first;
	return any && all;
}

const char *const policy_recheck_reasons[POLICY_RECHECK_REASONS] = {
	"server_denied_user", "server_denied_domain", "server_denied_network", "server_closed",
	"server_not_allowlisted", "user_not_opted_in", "user_blocked_sender", "user_blocked_domain",
	"recipient_blocked_sender",
};
const char *const policy_recheck_kinds[POLICY_RECHECK_KINDS] = { "inbound", "outbound", "transit" };

/* The rows a recheck dropped, by reason and kind (the indexes of
 * policy_recheck_reasons and policy_recheck_kinds; a reason not listed,
 * none today, is counted in none but the total). */
struct recheck_drops {
	long n[POLICY_RECHECK_REASONS][POLICY_RECHECK_KINDS];
};

/* The kind of row i of a RECHECK_COLUMNS result (policy_recheck_kinds):
 * to a local user (a target), from one (the sender local), a peer's. */
static int recheck_kind(PGresult *r, int i)
{
	if (!PQgetisnull(r, i, 5))
		return 0;
	return PQgetvalue(r, i, 10)[0] == 't' ? 1 : 2;
}

/* by from recheck_drop_sql's tally (JSON: [[reason, kind, count], ...]). */
static bool recheck_drops_parse(const char *text, struct recheck_drops *by)
{
	json_t *a = json_loads(text, 0, NULL);
	if (!json_is_array(a)) {
		json_decref(a);
		return false;
	}
	size_t i;
	json_t *row;
	json_array_foreach(a, i, row) {
		const char *why = json_string_value(json_array_get(row, 0));
		json_int_t kind = json_integer_value(json_array_get(row, 1));
		for (int k = 0; why && kind >= 0 && kind < POLICY_RECHECK_KINDS && k < POLICY_RECHECK_REASONS; k++)
			if (strcmp(why, policy_recheck_reasons[k]) == 0)
				by->n[k][kind] += (long)json_integer_value(json_array_get(row, 2));
	}
	json_decref(a);
	return true;
}

/* Decides the rows of r (RECHECK_COLUMNS) again with v and drops those
 * refused (recheck_drop_sql; claimed_by its $2, uncounted its $3,
 * replay its $4: the admin's replay of a dead letter, policy_recheck_row);
 * counts: rows decided, dropped; *reason: the first drop's (static), or NULL; *gone (NULL: not
 * wanted) the ids dropped, a JSON array (NULL: none); *kept (NULL: not
 * wanted) the ids refused and not dropped (another transaction held
 * them, or they were no longer waiting), a JSON array (NULL: none); by
 * (NULL: not wanted) the drops by reason and kind. */
static cw_err recheck(PGconn *c, const struct policy_view *v, PGresult *r, const char *claimed_by,
		      const char *uncounted, bool replay, long counts[2], const char **reason, json_t **gone,
		      json_t **kept, struct recheck_drops *by, cw_errmsg *e)
{
	if (by)
		memset(by, 0, sizeof(*by));
	json_t *list = json_array();
	int64_t now = cw_wall_ms();
	const char *first = NULL;
	for (int i = 0; list && i < PQntuples(r); i++) {
		struct policy_decision d;
		char subject[MIMI_URI_MAX + 1];
		if (!recheck_refused(v->snap, r, i, now, &d, subject, sizeof(subject)))
			continue;
		if (json_array_append_new(list, json_pack("{s:s, s:s, s:I, s:s, s:i}", "id", PQgetvalue(r, i, 0),
							  "reason", d.reason, "rule", (json_int_t)d.rule_id, "subject",
							  subject, "kind", recheck_kind(r, i)))) {
			json_decref(list);
			list = NULL;
		}
		if (!first)
			first = d.reason;
	}
	counts[0] = PQntuples(r);
	counts[1] = 0;
	*reason = NULL;
	if (gone)
		*gone = NULL;
	if (kept)
		*kept = NULL;
	if (!list)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	if (json_array_size(list) == 0) {
		json_decref(list);
		return CW_OK;
	}
	char *text = json_dumps(list, JSON_COMPACT);
	json_decref(list);
	if (!text)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const char *params[] = { text, claimed_by, uncounted, replay ? "t" : "f" };
	/* The rows' events first, in id order, as a statement of their own:
	 * two processes dropping rows of one event take turns, and the later
	 * one's drop (a snapshot of after the other's commit) sees the other's
	 * rows dropped and erases the content.  Read in one statement, each
	 * saw the other's row still waiting and neither erased it (a review
	 * of the session's change).  NO KEY UPDATE: what references an event
	 * (a key share) does not wait for it. */
	PGresult *lr = PQexecParams(c, recheck_lock_sql, 1, NULL, params, NULL, NULL, 0);
	cw_err lrc = store_check(c, lr, PGRES_TUPLES_OK, e);
	if (lrc) {
		free(text);
		return lrc;
	}
	PQclear(lr);
	PGresult *dr = PQexecParams(c, recheck_drop_sql, 4, NULL, params, NULL, NULL, 0);
	free(text);
	cw_err rc = store_check(c, dr, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	counts[1] = atol(PQgetvalue(dr, 0, 0));
	if (gone && counts[1] && !(*gone = json_loads(PQgetvalue(dr, 0, 2), 0, NULL)))
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
	if (!rc && kept && !(*kept = json_loads(PQgetvalue(dr, 0, 3), 0, NULL)))
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
	if (!rc && by && counts[1] && !recheck_drops_parse(PQgetvalue(dr, 0, 4), by))
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
	PQclear(dr);
	if (counts[1])
		*reason = first;
	return rc;
}

static void recheck_counted(struct policy_live *pl, const long counts[2], const struct recheck_drops *by,
			    const char *msg);

cw_err policy_recheck_row(struct policy_live *pl, PGconn *c, const char *outbox_id, const char **reason,
			  cw_errmsg *e)
{
	char arr[32];
	snprintf(arr, sizeof(arr), "{%s}", outbox_id);
	const char *params[] = { arr, NULL };
	*reason = NULL;
	PGresult *r = PQexecParams(c, recheck_ids_sql, 2, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	long counts[2] = { 0, 0 };
	struct recheck_drops by = { 0 };
	struct policy_view *v = policy_live_get(pl);
	rc = recheck(c, v, r, NULL, NULL, true, counts, reason, NULL, NULL, &by, e);
	policy_view_put(v);
	PQclear(r);
	/* counted as the policy thread's and the lanes' rechecks are (until
	 * the fifty-second session a replay's drop was in neither metric) */
	if (!rc)
		recheck_counted(pl, counts, &by, "a dead letter the server's rules now refuse dropped by its replay");
	return rc;
}

/* Messages whose content.expires has come (schema/014): the rows not yet
 * delivered expire, the message's and its edits' (xe); where one was
 * delivered to a local network (Matrix, XMPP), a delete event from the
 * same sender goes to the same recipients, which the adapters turn into a
 * redaction or a retraction; the stored content goes, the message's and
 * its edits'.  An edit's row left waiting would be sent with its content
 * erased, which no adapter can represent: until the twenty-fourth session
 * it stayed pending, failed, and took the delete row of its room's batch
 * down with it (the message was never taken back).  A message with a row
 * in flight, its own or an edit's, waits for the next sweep (that
 * delivery may yet succeed, and then needs the delete too; its content
 * must not be erased under it).  x reads "in flight" on the statement's
 * snapshot, before it waits for the rooms' locks: a row claimed meanwhile
 * is left alone by gone (in flight when gone comes to it), and is found
 * as one that gone should have taken and did not (raced): that message
 * waits for the next sweep too, its content kept and no delete made (its
 * other rows gone expired already, as the next sweep would).  Until the
 * thirty-fifth session the content was erased all the same: the raced
 * try, succeeding, showed the message for good (nothing found it to take
 * back), or, failing, left a row with nothing to send.  Peers are sent nothing: the message came
 * from one, whose own expiry applies there.  The delete events are a write
 * of events like any other: their rooms are locked first (rm, lk: the rooms
 * of the messages due, in room id order, before any row is locked or any
 * id drawn), so that their outbox ids follow the commit order of the rooms'
 * other events across processes (until the seventeenth session they took
 * no lock, and a later message of another process could go first).
 * Every step goes by index, whatever the planner guesses of how many
 * messages are due (until the nineteenth session, with a million events
 * and nothing due, a sweep took 0.7 s): due walks the expiry index in
 * expiry order (ordered by id, the planner walked the primary key and
 * computed every event's expiry looking for 200 due); x takes those
 * events by id; loc looks up their rows by event id (the LATERAL
 * subquery with OFFSET 0 is not flattened: as a join, the whole outbox
 * was scanned when nothing was due); xe finds the edits through their
 * index (an OR in the join scanned events).  What it expires is marked
 * (events.expired, schema/035): its content alone is what retention
 * leaves too, and an edit sent after the expiry is expired by the peer
 * API as it comes (submit_decide), not delivered.  A quote of it that a
 * drop for a block kept for its writer's notice (outbox.sender_quote,
 * schema/054) goes with the content (sq: '', the notice still owed is
 * told without its text): until the sixtieth session it stayed until the
 * notice was told, or for ever with no process of her network running
 * (the look only left it unsaid).
 * $1: now (ms). */
static const char expiry_sql[] =
	"WITH due AS MATERIALIZED (SELECT e.id, e.room_id FROM events e "
	"  WHERE event_expires(e.content) IS NOT NULL AND event_expires(e.content) <= $1::bigint "
	"  AND e.type = 'message' ORDER BY event_expires(e.content) LIMIT 200), "
	"rm AS MATERIALIZED (SELECT DISTINCT room_id FROM due), "
	"lk AS MATERIALIZED (" ROOM_LOCKS_SQL("SELECT room_id AS r FROM rm") "), "
	"x AS (SELECT e.id, e.room_id, e.sender_id, e.public_id, e.content->>'sender' AS sender_uri "
	"  FROM events e WHERE e.id IN (SELECT id FROM due) "
	"  AND event_expires(e.content) IS NOT NULL AND event_expires(e.content) <= $1::bigint "
	"  AND (SELECT n FROM lk) >= 0 "
	"  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id "
	"   AND o.state = 'in_flight') "
	"  AND NOT EXISTS (SELECT 1 FROM events ed JOIN outbox o ON o.event_id = ed.id "
	"   WHERE ed.replaces_id = e.id AND ed.type = 'edit' AND o.state = 'in_flight') "
	"  ORDER BY e.id FOR UPDATE OF e SKIP LOCKED), "
	"xe AS MATERIALIZED (SELECT id, id AS msg FROM x UNION ALL "
	"  SELECT ed.id, x.id FROM events ed JOIN x ON ed.replaces_id = x.id AND ed.type = 'edit'), "
	"gone AS (UPDATE outbox o SET state = 'expired', claimed_by = NULL, claimed_until = NULL FROM xe "
	"  WHERE o.event_id = xe.id AND o.state IN ('pending', 'held', 'failed', 'dead') RETURNING o.id), "
	"raced AS MATERIALIZED (SELECT DISTINCT xe.msg FROM xe JOIN outbox o ON o.event_id = xe.id "
	"  WHERE o.state IN ('pending', 'held', 'failed', 'dead') AND o.id NOT IN (SELECT id FROM gone)), "
	"done AS MATERIALIZED (SELECT x.* FROM x WHERE x.id NOT IN (SELECT msg FROM raced)), "
	"loc AS (SELECT x.id, x.room_id, x.sender_id, x.public_id, x.sender_uri, o.destination, o.target_identity_id "
	"  FROM done x CROSS JOIN LATERAL (SELECT d.destination, d.target_identity_id FROM outbox d "
	"   WHERE d.event_id = x.id AND d.state = 'delivered' AND d.destination NOT LIKE 'peer:%' OFFSET 0) o), "
	"dv AS (INSERT INTO events (public_id, room_id, sender_id, type, content, replaces_id, origin_network, ts) "
	"  SELECT " NEW_EVENT_ID_SQL ", "
	"  l.room_id, l.sender_id, 'delete', jsonb_build_object('type', 'delete', 'sender', l.sender_uri, "
	"  'ts', $1::bigint, 'content', jsonb_build_object('replaces', l.public_id)), l.id, 'gateway', $1::bigint "
	"  FROM (SELECT DISTINCT id, room_id, sender_id, public_id, sender_uri FROM loc) l ORDER BY l.id "
	"  RETURNING id, replaces_id, room_id), "
	"ob AS (INSERT INTO outbox (event_id, destination, target_identity_id, room_id, state) "
	"  SELECT dv.id, loc.destination, loc.target_identity_id, dv.room_id, 'pending' FROM dv "
	"  JOIN loc ON loc.id = dv.replaces_id ORDER BY dv.id RETURNING 1), "
	"wipe AS MATERIALIZED (SELECT id FROM xe WHERE msg NOT IN (SELECT msg FROM raced)), "
	"sc AS (UPDATE events e SET content = '{}'::jsonb, expired = true WHERE e.id IN (SELECT id FROM wipe)), "
	"sq AS (UPDATE outbox o SET sender_quote = '' FROM wipe WHERE o.event_id = wipe.id AND o.state = 'dropped' "
	"  AND o.sender_quote <> ''), "
	RETENTION_FORGET_FILES("(SELECT " RETENTION_ATTS("f") " FROM events f WHERE f.id IN (SELECT id FROM wipe))") " "
	"SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM ob), (SELECT count(*) FROM gone)";

/* counts: messages expired, delete rows made, rows that will not be
 * delivered.  In a transaction of its own that plans no sequential scan:
 * on a small events table the planner took every event in one, instead
 * of events_expires_idx, and computed each one's expiry from its content,
 * read from TOAST where a large one is kept (its cost is not the
 * planner's), on every sweep: 40 messages of 190 KB read every 2 s
 * (until the thirty-second session; tests/integration/test_policy.py,
 * test_the_periodic_sweep_reads_no_stored_message_to_find_those_that_expire).
 * Every step of expiry_sql goes by index as it is; a large table's plan
 * is the same. */
static cw_err expiry_sweep(PGconn *c, long counts[3], cw_errmsg *e)
{
	char now[24];
	snprintf(now, sizeof(now), "%lld", (long long)cw_wall_ms());
	const char *params[] = { now };
	cw_err rc = store_exec(c, "BEGIN; SET LOCAL enable_seqscan = off", e);
	PGresult *r = rc ? NULL : PQexecParams(c, expiry_sql, 1, NULL, params, NULL, NULL, 0);
	if (!rc && !(rc = store_check(c, r, PGRES_TUPLES_OK, e))) {
		for (int i = 0; i < 3; i++)
			counts[i] = atol(PQgetvalue(r, 0, i));
		PQclear(r);
	}
	return store_end(c, rc, e);
}

/* The first key of the consent changes' advisory locks (policy_consent_apply). */
#define CONSENT_LOCK_KEY "1668247156"

/* A consent change of local user $1 (kind $2, subject $3) to state $4
 * ('allowed', 'blocked', 'none': forgotten), by $5; its pending requests
 * are decided with it.  A request the allow answers is 'accepted' unless
 * her block of the other kind stands (an allow of a user under her block
 * of his domain, an allow of a domain of one of whose users she blocked):
 * that block wins (decide()'s step 2 before step 6, the spec's order), the
 * sweep drops what he sent, and the request is 'blocked', as what became
 * of his messages says (GET /admin/v1/messages/{id}/decision:
 * user_blocked_domain).  Until the forty-fifth session it was 'accepted'
 * while his messages were dropped.  Column 3 (rp) says whether the
 * change repeats what is stored: the state she has for that subject
 * (none: no consent stored), and no pending request of that pair for it
 * to decide; a repeat changes nothing here.  Until the fifty-fourth
 * session a statement of its own asked that first (policy_consent_apply). */
static const char consent_sql[] =
	"WITH old AS (SELECT state FROM consents WHERE local_identity_id = $1::bigint AND subject_kind = $2 "
	"  AND subject = $3), "
	"rp AS (SELECT coalesce((SELECT state FROM old), 'none') = $4 AND ($4 = 'none' OR NOT EXISTS (SELECT 1 "
	"  FROM consent_requests q JOIN identities r ON r.id = q.remote_identity_id "
	"  WHERE q.local_identity_id = $1::bigint AND q.state = 'pending' "
	"  AND (($2 = 'user' AND r.uri = $3) OR ($2 = 'domain' AND r.domain = $3)))) AS same), "
	"del AS (DELETE FROM consents WHERE $4 = 'none' AND NOT (SELECT same FROM rp) AND local_identity_id = $1::bigint "
	"  AND subject_kind = $2 AND subject = $3), "
	"up AS (INSERT INTO consents (local_identity_id, subject_kind, subject, state, source) "
	"  SELECT $1::bigint, $2, $3, $4, $5 WHERE $4 <> 'none' AND NOT (SELECT same FROM rp) "
	"  ON CONFLICT (local_identity_id, subject_kind, subject) DO UPDATE SET state = excluded.state, "
	"  source = excluded.source, updated_at = now()), "
	"rq AS (UPDATE consent_requests q SET state = CASE WHEN $4 = 'allowed' AND NOT EXISTS (SELECT 1 FROM consents b "
	"  WHERE b.local_identity_id = $1::bigint AND b.state = 'blocked' AND (($2 = 'user' AND b.subject_kind = 'domain' "
	"  AND b.subject = r.domain) OR ($2 = 'domain' AND b.subject_kind = 'user' AND b.subject = r.uri))) "
	"  THEN 'accepted' ELSE 'blocked' END, "
	"  decided_at = now() FROM identities r WHERE $4 <> 'none' AND NOT (SELECT same FROM rp) "
	"  AND q.state = 'pending' AND q.local_identity_id = $1::bigint AND r.id = q.remote_identity_id "
	"  AND (($2 = 'user' AND r.uri = $3) OR ($2 = 'domain' AND r.domain = $3)) RETURNING q.id) "
	"SELECT count(*), coalesce((SELECT state FROM old), 'none'), (SELECT same FROM rp) FROM rq";

/* A local user's block (or its end) of a peer's user travels to that peer
 * (spec: policy.md, "Blocks travel"): a block event from the local user,
 * content {target, action: block or unblock} as POST /v1/blocks takes it,
 * in each room the two share (stored as every event is: the whole event
 * document), delivered to the peer (push or pull) like any
 * event and in order with the room's messages, but only in a room where
 * the peer knows her already: a group she joined herself (not one a peer
 * only put her into: schema/037), a direct room in which something of
 * hers went to that peer (an event she sent, not dropped) or a message
 * was delivered to her (the peer's status shows it).  Elsewhere the
 * block event would be the first the peer learns of her: a peer can make
 * a direct room with any name, or put any name into a group, and an
 * unknown name never blocks, so a block there told it that she exists
 * and what she decided, which the spec's privacy rule forbids ("blocking
 * drops them and tells the sender only 'not delivered'"); until the
 * forty-sixth session it went there too.  An unblock goes where the
 * block went (the block is an event of hers in that room).
 * No shared room, no event:
 * the peer's user has no conversation to be told about (and a new one is
 * refused by the policy meanwhile).  The rooms are locked first (lk, as
 * every write of events does): in order with the room's messages means in
 * outbox id order across processes too (until the seventeenth session the
 * block took no lock, and a message of another process committed after it
 * could draw a smaller id and reach the peer first).  Ids as cw_new_id
 * makes them (NEW_EVENT_ID_SQL). */
static const char block_event_sql[] =
	"WITH r AS (SELECT i.id, i.uri, p.name, p.mode FROM identities i JOIN peers p ON p.id = i.peer_id "
	"  WHERE i.uri = $2 AND NOT i.is_local), "
	"l AS (SELECT id, uri, network, (extract(epoch FROM now()) * 1000)::bigint AS ts FROM identities "
	"  WHERE id = $1::bigint AND is_local), "
	"rm AS (SELECT DISTINCT a.room_id FROM room_members a JOIN rooms k ON k.id = a.room_id "
	"  JOIN room_members b ON b.room_id = a.room_id "
	"  JOIN r ON b.identity_id = r.id WHERE a.identity_id = $1::bigint AND a.membership = 'joined' "
	"  AND b.membership = 'joined' AND (k.kind = 'group' OR EXISTS (SELECT 1 FROM events e "
	"  JOIN outbox o ON o.event_id = e.id WHERE e.room_id = a.room_id AND ((e.sender_id = $1::bigint "
	"  AND o.destination = 'peer:' || r.name AND o.state NOT IN ('dropped', 'expired')) "
	"  OR (o.target_identity_id = $1::bigint AND o.state = 'delivered'))))), "
	"lk AS MATERIALIZED (" ROOM_LOCKS_SQL("SELECT room_id AS r FROM rm") "), "
	"ev AS (INSERT INTO events (public_id, room_id, sender_id, type, content, origin_network, ts) "
	"  SELECT " NEW_EVENT_ID_SQL ", "
	"  rm.room_id, l.id, 'block', jsonb_build_object('type', 'block', 'sender', l.uri, 'ts', l.ts, "
	"  'content', jsonb_build_object('target', r.uri, 'action', $3::text)), "
	"  CASE WHEN l.network ~ '^[a-z][a-z0-9_-]*$' THEN l.network ELSE 'local' END, l.ts "
	"  FROM rm, r, l WHERE (SELECT n FROM lk) >= 0 ORDER BY rm.room_id RETURNING id, room_id), "
	"ob AS (INSERT INTO outbox (event_id, destination, room_id, state) "
	"  SELECT ev.id, 'peer:' || r.name, ev.room_id, 'pending' FROM ev, r ORDER BY ev.id RETURNING 1) "
	"SELECT count(*), CASE WHEN count(*) > 0 THEN pg_notify(CASE WHEN (SELECT mode FROM r) = 'pull' "
	"  THEN 'causeway_pull' ELSE 'causeway_outbox' END, '') END FROM ob";

const char POLICY_USER_SUMMARY_SQL[] =
	"SELECT 'request from ' || i.uri || ' (' || i.network || ')' FROM consent_requests q "
	" JOIN identities i ON i.id = q.remote_identity_id WHERE q.local_identity_id = $1::bigint "
	" AND q.state = 'pending' "
	"UNION ALL SELECT c.state || ': ' || c.subject FROM consents c WHERE c.local_identity_id = $1::bigint "
	"UNION ALL SELECT CASE WHEN o.opted_in THEN 'opted in: ' ELSE 'opted out: ' END || o.network "
	" FROM user_optin o WHERE o.identity_id = $1::bigint "
	"UNION ALL SELECT 'held, not asked (too many requests): ' || i.uri || ' (' || i.network || ')' "
	" FROM identities i WHERE i.id IN (SELECT e.sender_id FROM outbox o JOIN events e ON e.id = o.event_id "
	" WHERE o.target_identity_id = $1::bigint AND " OUTBOX_HELD("o") ") AND NOT EXISTS (SELECT 1 "
	" FROM consent_requests q WHERE q.local_identity_id = $1::bigint AND q.remote_identity_id = i.id "
	" AND q.state = 'pending') "
	/* the remote users who blocked her (the blocks table: their peer's
	 * POST /v1/blocks, a block event, a consent revoked by POST
	 * /v1/consent/updates), which the policy reads for what she sends
	 * them (recipient_blocked_sender) and which is no decision of hers:
	 * until the thirty-eighth session list did not show it, and a user
	 * who had accepted such a sender read "allowed" and nothing else
	 * while every message of hers to him was refused; until the
	 * forty-fifth only the Matrix bot's list did (a query of its own). */
	"UNION ALL (SELECT i.uri || ' (' || i.network || ') blocked you: what you write to them is not delivered' "
	" FROM blocks b JOIN identities i ON i.id = b.blocker_id AND NOT i.is_local "
	" WHERE b.blocked_id = $1::bigint ORDER BY i.uri) LIMIT $2::int";

cw_err policy_notify_user(PGconn *c, const char *local_id, cw_errmsg *e)
{
	const char *np[] = { local_id && *local_id ? local_id : NULL };
	PGresult *r = PQexecParams(c, POLICY_NOTIFY_USER_SQL, 1, NULL, np, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (!rc)
		PQclear(r);
	return rc;
}

cw_err policy_consent_apply(PGconn *c, const struct policy_view *v, const char *local_id, const char *kind,
			    const char *subject, const char *state, const char *source, long counts[3], long *decided,
			    bool *repeat, cw_errmsg *e)
{
	/* One change of a pair at a time (every caller is in a transaction:
	 * the writer's batch, the Matrix bot's BEGIN): consent_sql reads the
	 * old decision before it writes, and two changes of the same pair on
	 * two connections (two processes, the Matrix bot's and the writer's)
	 * both read it before either committed, and each sent the peer a
	 * block event (until the thirty-ninth session).  The second now waits
	 * for the first's commit, and reads (a new statement: a new snapshot)
	 * the decision it made.  A transaction-level advisory lock of two keys
	 * (its own space, apart from the one-key locks of the sweep and the
	 * token names), taken before any room's lock (block_event_sql) and the
	 * sweep's, as nothing else takes it.  The lock and the change go in
	 * one round trip (store_pipeline): the change is still a statement of
	 * its own, which starts once the lock is held.
	 * A repeat changes nothing: no change, no block event, no sweep, no
	 * NOTIFY; its caller writes no audit record.  Read under the pair's
	 * lock (consent_sql's rp), so that of two identical changes at once
	 * the second is the repeat.  Until the fifty-first session only the
	 * admin API asked (before the lock: two at once were both changes),
	 * and a decision repeated through the Matrix bot or the XMPP commands
	 * was audited and reloaded again each time; until the fifty-fourth
	 * a statement of its own asked, between the lock and the change. */
	const char *params[] = { local_id, kind, subject, state, source };
	struct store_piped q[2] = {
		{ "SELECT pg_advisory_xact_lock(" CONSENT_LOCK_KEY ", hashtext($1 || ' ' || $2 || ' ' || $3))", NULL, 3,
		  params, NULL },
		{ consent_sql, NULL, 5, params, NULL },
	};
	cw_err rc = store_pipeline(c, q, 2, e);
	if (rc)
		return rc;
	PQclear(q[0].r);
	PGresult *r = q[1].r;
	*repeat = strcmp(PQgetvalue(r, 0, 2), "t") == 0;
	*decided = atol(PQgetvalue(r, 0, 0));
	bool was_blocked = strcmp(PQgetvalue(r, 0, 1), "blocked") == 0, blocked = strcmp(state, "blocked") == 0;
	PQclear(r);
	if (*repeat)
		return CW_OK;
	/* The block event (rooms' locks, before the sweep's), and after the
	 * sweep the NOTIFY of her facts (policy_notify_user), ride in the
	 * sweep's round trips; the sweep's own statement NOTIFYs the
	 * dispatchers when it released a row. */
	const char *bp[] = { local_id, subject, blocked ? "block" : "unblock" };
	struct store_piped block = { block_event_sql, NULL, 3, bp, NULL };
	const char *np[] = { local_id };
	struct store_piped note = { POLICY_NOTIFY_USER_SQL, NULL, 1, np, NULL };
	rc = policy_sweep_with(c, v, local_id, counts, strcmp(kind, "user") == 0 && was_blocked != blocked ? &block : NULL,
			       &note, e);
	if (!rc) {
		PQclear(block.r);
		PQclear(note.r);
	}
	return rc;
}

/* The domain of a mimi:// user address x (SQL), '' for another text. */
#define URI_DOMAIN_SQL(x) "CASE WHEN left(" x ", 7) = 'mimi://' THEN split_part(substr(" x ", 8), '/', 1) ELSE '' END"

cw_err policy_allow_blocked_note(PGconn *c, const char *local_id, const char *kind, const char *subject, char *out,
				 size_t len, cw_errmsg *e)
{
	out[0] = '\0';
	const char *params[] = { local_id, kind, subject };
	PGresult *r = PQexecParams(c,
		"SELECT b.subject, count(*) OVER () FROM consents b WHERE b.local_identity_id = $1::bigint "
		" AND b.state = 'blocked' AND (($2 = 'user' AND b.subject_kind = 'domain' "
		" AND b.subject = " URI_DOMAIN_SQL("$3") ") OR ($2 = 'domain' AND b.subject_kind = 'user' "
		" AND " URI_DOMAIN_SQL("b.subject") " = $3)) ORDER BY b.subject LIMIT 1",
		3, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 1) {
		long more = atol(PQgetvalue(r, 0, 1)) - 1;
		if (strcmp(kind, "user") == 0)
			snprintf(out, len, " Your block of their whole domain %s still stands, though: nothing of theirs "
					   "reaches you until you lift it.", PQgetvalue(r, 0, 0));
		else if (more == 0)
			snprintf(out, len, " Your block of %s still stands, though: nothing of theirs reaches you until "
					   "you lift it.", PQgetvalue(r, 0, 0));
		else
			snprintf(out, len, " Your blocks of %s and %ld other user(s) of %s still stand, though: nothing "
					   "of theirs reaches you until you lift them.", PQgetvalue(r, 0, 0), more, subject);
	}
	PQclear(r);
	return CW_OK;
}

/* ------------------------------------------------------------ rate memo */

/* Remembers a bucket's answer past the struct's entries, in the array on
 * the heap.  Out of memory that bucket is not remembered: a later
 * decision of the event may charge it again (the stricter error). */
static void memo_spill(struct policy_rate_memo *m, struct ratelimit_id h, int64_t r)
{
	if (m->nmore == m->cap) {
		size_t cap = m->cap ? 2 * m->cap : 2 * POLICY_MEMO_INLINE;
		struct policy_memo_entry *more = realloc(m->more, cap * sizeof(*more));
		if (!more) {
			LOG_KV(CW_LOG_WARN, "policy: out of memory remembering a rate limit's answer; "
					    "a later decision of the event may charge it again");
			return;
		}
		m->more = more;
		m->cap = cap;
	}
	m->more[m->nmore++] = (struct policy_memo_entry){ h, r };
}

/* The bucket's answer to this memo's earlier take (*r), if it took. */
static bool memo_find(const struct policy_rate_memo *m, struct ratelimit_id h, int64_t *r)
{
	for (int i = 0; i < m->n; i++)
		if (ratelimit_id_eq(m->in[i].key, h)) {
			*r = m->in[i].result;
			return true;
		}
	for (size_t i = 0; i < m->nmore; i++)
		if (ratelimit_id_eq(m->more[i].key, h)) {
			*r = m->more[i].result;
			return true;
		}
	return false;
}

/* Room for one more element of size in *p (n of *cap, doubled from
 * first): the array, moved or not, or NULL out of memory (*p as it was).
 * The ledger's arrays grow by it. */
static void *grow(void *p, size_t *cap, size_t n, size_t size, size_t first)
{
	if (n < *cap)
		return p;
	size_t c = *cap ? 2 * *cap : first;
	void *q = realloc(p, c * size);
	if (q)
		*cap = c;
	return q;
}

/* A token a memo with a ledger took: recorded, to be given back if the
 * write runs again.  Out of memory it is not (the run again takes it a
 * second time: the stricter error). */
static void ledger_grant(struct policy_rate_ledger *l, const char *key, uint32_t capacity, int64_t period_ms,
			 size_t item)
{
	struct policy_rate_grant *g = grow(l->g, &l->cap, l->n, sizeof(*g), 8);
	char *k = g ? strdup(key) : NULL;
	if (g)
		l->g = g;
	if (!k) {
		LOG_KV(CW_LOG_WARN, "policy: out of memory recording a rate limit's token; "
				    "a write that runs again may charge it again");
		return;
	}
	l->g[l->n++] = (struct policy_rate_grant){ k, capacity, period_ms, item, false };
}

/* A refusal of bucket h a memo with a ledger saw (first: as the bucket
 * answered): whether it is the first of its episode for this run, which
 * it is too when a rolled-back run saw the first (owed: once).  One array
 * (since the forty-fourth session: two, of one capacity, the owed ones
 * past it lost). */
static bool ledger_refusal(struct policy_rate_ledger *l, struct ratelimit_id h, bool first)
{
	struct policy_rate_first *f = NULL;
	for (size_t i = 0; i < l->nf && !f; i++)
		if (ratelimit_id_eq(l->f[i].bucket, h))
			f = &l->f[i];
	if (f) {
		if (!first && !f->owed)
			return false;
		f->owed = false; /* this run's */
		return true;
	}
	if (!first)
		return false;
	f = grow(l->f, &l->capf, l->nf, sizeof(*f), 4);
	if (f) { /* out of memory: a run again does not report it */
		l->f = f;
		l->f[l->nf++] = (struct policy_rate_first){ h, false };
	}
	return true;
}

void policy_rate_ledger_undo(struct policy_rate_ledger *l, int64_t now_ms)
{
	for (size_t i = 0; i < l->n; i++) {
		if (!l->g[i].back) /* else given back already */
			ratelimit_give(l->rl, l->g[i].key, l->g[i].capacity, l->g[i].period_ms, now_ms);
		free(l->g[i].key);
	}
	l->n = 0;
	for (size_t i = 0; i < l->nf; i++) /* the next run owes them all */
		l->f[i].owed = true;
}

void policy_rate_ledger_free(struct policy_rate_ledger *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->g[i].key);
	free(l->g);
	free(l->f);
	memset(l, 0, sizeof(*l));
}

/* The job's token of key (POLICY_LEDGER_JOB) given back (back) or not. */
static struct policy_rate_grant *job_grant(struct policy_rate_ledger *l, const char *key, bool back)
{
	for (size_t i = 0; i < l->n; i++)
		if (l->g[i].item == POLICY_LEDGER_JOB && l->g[i].back == back && strcmp(l->g[i].key, key) == 0)
			return &l->g[i];
	return NULL;
}

/* Grant g's token given back; g kept, as given back (undo does not give
 * it again, grant_retake may take it again). */
static void grant_give(struct policy_rate_ledger *l, struct policy_rate_grant *g, int64_t now_ms)
{
	ratelimit_give(l->rl, g->key, g->capacity, g->period_ms, now_ms);
	g->back = true;
}

/* Grant i, given back, taken again: false when its bucket had none left,
 * and then it is not charged, and forgotten (the last grant moved to i). */
static bool grant_retake(struct policy_rate_ledger *l, size_t i, int64_t now_ms)
{
	struct policy_rate_grant *g = &l->g[i];
	g->back = false;
	if (ratelimit_take(l->rl, g->key, g->capacity, g->period_ms, now_ms, NULL) <= 0)
		return true;
	free(g->key); /* none left: not taken, nothing to give back */
	*g = l->g[--l->n];
	return false;
}

int64_t policy_rate_ledger_give(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	(void)capacity;
	(void)period_ms;
	struct policy_rate_grant *g = job_grant(ctx, key, false);
	if (g) /* kept, as given back: a run again may take it again */
		grant_give(ctx, g, now_ms);
	return 0;
}

int64_t policy_rate_ledger_retake(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	(void)capacity;
	(void)period_ms;
	struct policy_rate_ledger *l = ctx;
	struct policy_rate_grant *g = job_grant(l, key, true);
	if (g)
		grant_retake(l, (size_t)(g - l->g), now_ms);
	return 0;
}

void policy_rate_ledger_give_item(struct policy_rate_ledger *l, size_t item, int64_t now_ms)
{
	for (size_t i = 0; i < l->n; i++)
		if (l->g[i].item == item && !l->g[i].back)
			grant_give(l, &l->g[i], now_ms);
}

void policy_rate_ledger_take_item(struct policy_rate_ledger *l, size_t item, int64_t now_ms)
{
	for (size_t i = 0; i < l->n;)
		if (!(l->g[i].item == item && l->g[i].back) || grant_retake(l, i, now_ms))
			i++;
}

static int64_t memo_take(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	struct policy_rate_memo *m = ctx;
	struct ratelimit_id h = ratelimit_id(m->rl, key);
	int64_t r;
	if (memo_find(m, h, &r))
		return r;
	bool first = false;
	r = ratelimit_take_id(m->rl, h, capacity, period_ms, now_ms, &first);
	if (r > 0 && m->ledger)
		first = ledger_refusal(m->ledger, h, first);
	else if (r == 0 && m->ledger)
		ledger_grant(m->ledger, key, capacity, period_ms, m->ledger_item);
	if (r > 0 && first)
		m->first_refusal = true;
	if (m->n < POLICY_MEMO_INLINE)
		m->in[m->n++] = (struct policy_memo_entry){ h, r };
	else
		memo_spill(m, h, r);
	return r;
}

/* A bucket this event took from answers as it did then (the event has its
 * token, or was refused); else the bucket itself, untouched, and nothing
 * is remembered: a later take of the event takes. */
static int64_t memo_peek(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	struct policy_rate_memo *m = ctx;
	struct ratelimit_id h = ratelimit_id(m->rl, key);
	int64_t r;
	if (memo_find(m, h, &r))
		return r;
	bool first = false;
	r = ratelimit_peek_id(m->rl, h, capacity, period_ms, now_ms, &first);
	if (r > 0 && m->ledger)
		first = ledger_refusal(m->ledger, h, first);
	if (r > 0 && first)
		m->first_refusal = true;
	return r;
}

void policy_rate_memo_init(struct policy_rate_memo *m, struct ratelimit *rl)
{
	m->rate.take = rl ? memo_take : NULL;
	m->rate.peek = rl ? memo_peek : NULL;
	m->rate.ctx = m;
	m->rl = rl;
	m->n = 0;
	m->more = NULL;
	m->nmore = m->cap = 0;
	m->first_refusal = false;
	m->ledger = NULL;
	m->ledger_item = POLICY_LEDGER_JOB;
}

void policy_rate_memo_finish(struct policy_rate_memo *m)
{
	if (!m->more)
		return;
	free(m->more);
	m->more = NULL;
	m->nmore = m->cap = 0;
}

/* ------------------------------------------------------------ the thread */

/* A user's release to go on (policy_live.releasing): her held rows after
 * id after and up to until (the last her consent found to release, the
 * NOTIFY's third figure; INT64_MAX from a start's pass or an older
 * daemon's NOTIFY: to the end), tried again from retry_at (µs, cw_now_us) after a failure,
 * backoff_us its wait (1 s doubling to POLICY_RETRY_MAX_S while it
 * fails).  skipped_after, when not -1, is the lowest after of a batch
 * that left rows it found locked by another transaction (SKIP LOCKED):
 * her release goes again from there before it ends, rounds times at
 * most (RELEASE_ROUNDS). */
struct release_due {
	int64_t user, after, until, retry_at, backoff_us, skipped_after;
	int rounds;
};

struct policy_live {
	struct policy_live_opts o;
	char *url;
	pthread_mutex_t mu;
	struct policy_view *cur;
	pthread_t thread;
	bool started;
	atomic_bool stop;
	atomic_bool poked;
	int wake[2];
	PGconn *c;
	bool sweep_slow; /* the last periodic sweep took SWEEP_REPLAN_US or more (replan_sweep) */
	bool sweep_asked; /* a NOTIFY causeway_sweep without a user heard (an older process's): a periodic sweep now */
	bool sweep_due;   /* a connection made: the next sweep turn queues every user with held rows due (sweep_due_all) */
	/* The users whose release goes on a batch a turn (release_turn), in
	 * turn: heard from a consent's NOTIFY causeway_sweep, or found at a
	 * connection's first sweep turn (sweep_due_all); each from after the
	 * last id of her batch before. */
	struct release_due *releasing;
	size_t nreleasing, releasing_cap, releasing_next;
	unsigned grown_known; /* bit i: grown_tables[i]'s statistics count what it holds (analyze_grown) */
	bool drop_conn;    /* c to be made again at the next turn (replan_sweep failed) */
	struct retention_state retention; /* the retention sweep's, from run to run */
	struct store_canceller cancel; /* c's statement, cancelled at a stop that waits for it */
	uint64_t version;
	struct policy_live_stats st; /* under mu */
	pthread_cond_t loaded;       /* signalled after each reload */
	uint64_t requested, done;    /* reload generations, under mu */
	/* Heard since the last reload (the thread's own): a change of these
	 * users' facts only, or of more (want_full). */
	int64_t pending[POLICY_OVERLAY_MAX];
	size_t npending;
	bool want_full;
	/* Asked by the syncs (under mu): a reload of these users (id; 0:
	 * everything) unless the view in force has the change of transaction
	 * xid (0: not known), or (asked_all) of everything. */
	struct { int64_t id; uint64_t xid; } asked[POLICY_OVERLAY_MAX];
	size_t nasked;
	bool asked_all;
	/* The thread's: what the syncs taken so far need loaded still (a
	 * whole load, or one of some users' facts), the load made for them
	 * having failed; none: they are answered (done). */
	bool owe_whole, owe_users;
	/* The recheck of the rows not handed over (recheck_turn): a pass over
	 * them all after a change of the fingerprint (fp; none known at the
	 * start: a pass, for what a process stopped mid-pass left), in state
	 * order (recheck_state; RECHECK_STATES: no pass), each state from
	 * after (recheck_dest, recheck_after); one more after the claims in
	 * flight at a pass's start are over (again_at_us, 0: none; again: this
	 * pass is it).  And the rows of the users whose facts changed
	 * (recheck_users), one kind after the other (users_kind;
	 * RECHECK_USER_KINDS: done), each from after its walk's cursor
	 * (users_key, recheck_users_sql).  A change during a
	 * pass lets it end and asks for one more (more): restarting it at
	 * each change starved the rows late in its order while changes kept
	 * coming (a review of the session's change). */
	bool fp_known, more;
	uint64_t fp;
	int recheck_state;
	char recheck_dest[300]; /* a destination: at most 32 + 1 + 253 bytes (schema/001) */
	long long recheck_after;
	int64_t again_at_us;
	bool again;
	int64_t recheck_users[POLICY_OVERLAY_MAX];
	size_t nrecheck_users;
	int users_kind;
	/* The walk passed over its first kinds, none of its users having an
	 * opt-out in the view it decided with (recheck_turn): asked after
	 * all once the view in force has one. */
	bool users_outs_skipped;
	/* A user of the walk named again (recheck_users_add: a load that
	 * changed her facts, her second opt-out say) while its cursor is past
	 * the start: her rows behind it were decided without that change, so
	 * the walk, at its end, starts again from its first kind (and the
	 * requests' walk) rather than ending.  Not at once: a stream of
	 * NOTIFYs naming her would keep it from ever reaching its last rows
	 * (as restarting a pass did: more).  Until the fifty-sixth session
	 * the walk ended, stored settled with the overlay counted, and a
	 * claim took her pending row to the network she had just left. */
	bool users_again;
	long long users_key1, users_key3;
	char users_key2[300]; /* a room id, or a destination */
	/* The rows a batch found refused and did not drop, another
	 * transaction holding them (SKIP LOCKED: an admin's change of the
	 * row, another process's write, a claim not committed yet), decided
	 * again every RECHECK_KEPT_RETRY_US (kept_turn) until none is left;
	 * until then the recheck is not over (settled), so a claim decides
	 * what it takes.  Until the forty-sixth session they were passed
	 * over: the pass ended with such a row pending, and the claim that
	 * took it once its lock went delivered it under the rule that
	 * refused it. */
	int64_t kept[RECHECK_BATCH];
	size_t nkept;
	int64_t kept_at_us;
	/* The pending consent requests decided again after such a change
	 * (requests_turn), in consent_requests_pending_expiry_idx's order
	 * from after (req_exp, req_after); req_pass: a walk is due or under
	 * way. */
	bool req_pass;
	char req_exp[48];
	long long req_after;
	/* For the dispatcher (policy_live_stamp): the changes the recheck
	 * follows put in force here (swap_in: a new fingerprint, an overlay of
	 * users among whom one opted out; 1 at the start, for the start's
	 * pass), and the count as of the recheck's last end (every row
	 * waiting then decided under it). */
	atomic_uint_fast64_t changes, settled;
	/* For the dispatcher (policy_live_facts): the views put in force
	 * here, each counted before it is (any of them may hold a user's
	 * new block). */
	atomic_uint_fast64_t facts;
};

static void add_pending(struct policy_live *pl, int64_t id)
{
	for (size_t i = 0; i < pl->npending; i++)
		if (pl->pending[i] == id)
			return;
	if (pl->npending == POLICY_OVERLAY_MAX)
		pl->want_full = true;
	else
		pl->pending[pl->npending++] = id;
}

/* Whether view v has read the change of transaction xid (0: not known) to
 * everything (n 0: its base's whole load did) or to the facts of the
 * users ids (n), which an overlay of them may have read since. */
static bool view_has(const struct policy_view *v, uint64_t xid, const int64_t *ids, size_t n)
{
	const struct policy_view *base = v->base ? v->base : v;
	if (policy_xsnap_sees(&base->xs, xid))
		return true;
	if (n == 0 || !v->base || !policy_xsnap_sees(&v->xs, xid))
		return false;
	for (size_t i = 0; i < n; i++) {
		size_t k = 0;
		while (k < v->nusers && v->users[k] != ids[i])
			k++;
		if (k == v->nusers)
			return false;
	}
	return true;
}

static void recheck_users_add(struct policy_live *pl, const int64_t *ids, size_t n);
static void recheck_whole(struct policy_live *pl);

/* User's release queued to go on from after id after up to until (the
 * one queued already from the lesser of the two afters and to the higher
 * of the two untils: a second consent's first batch may have ended
 * before the first's next, and found more to release).  False when out
 * of memory. */
static bool release_add(struct policy_live *pl, int64_t user, int64_t after, int64_t until)
{
	for (size_t i = 0; i < pl->nreleasing; i++)
		if (pl->releasing[i].user == user) {
			/* a new consent of hers: tried at once, with rounds of its
			 * own for rows skipped locked (the backoff of a failing
			 * batch goes on from where it was); until the sixty-third
			 * session's second review it waited for her failing
			 * batch's backoff, up to POLICY_RETRY_MAX_S */
			if (after < pl->releasing[i].after)
				pl->releasing[i].after = after;
			if (until > pl->releasing[i].until)
				pl->releasing[i].until = until;
			pl->releasing[i].retry_at = 0;
			pl->releasing[i].rounds = 0;
			return true;
		}
	if (pl->nreleasing == pl->releasing_cap) {
		size_t cap = pl->releasing_cap ? 2 * pl->releasing_cap : 16;
		struct release_due *m = realloc(pl->releasing, cap * sizeof(*m));
		if (!m)
			return false;
		pl->releasing = m;
		pl->releasing_cap = cap;
	}
	pl->releasing[pl->nreleasing++] = (struct release_due){ user, after, until, 0, 0, -1, 0 };
	return true;
}

/* A NOTIFY causeway_policy: "u:<id>,..." names the local users whose facts
 * changed; anything else (or more users than an overlay holds) asks for a
 * whole reload.  Either may start "x:<xid8>;" (or be "x:<xid8>" alone: a
 * change of more than users' facts), the transaction that made it
 * (policy_notify_user): a change the view in force has read already
 * (loaded for this process's own sync, or for another change heard
 * before) is not loaded again; its users' rows are decided again all the
 * same, as for a change loaded (recheck_users_add).  Called on the
 * thread, the only one that swaps pl->cur. */
static void heard(const char *channel, const char *payload, void *arg)
{
	struct policy_live *pl = arg;
	/* causeway_sweep "<user>:<last id>:<last to release>": her release's
	 * next batch (SWEEP_BATCH); without the third (an older daemon's
	 * NOTIFY) her later batches read to the end of her held rows */
	if (strcmp(channel, "causeway_sweep") == 0) {
		char *end;
		long long user = strtoll(payload, &end, 10), last = *end == ':' ? strtoll(end + 1, &end, 10) : 0;
		long long until = *end == ':' ? strtoll(end + 1, &end, 10) : INT64_MAX;
		if (user <= 0 || *end || !release_add(pl, user, last, until))
			pl->sweep_asked = true;
		return;
	}
	if (pl->want_full)
		return;
	uint64_t xid = 0;
	char *end;
	if (strncmp(payload, "x:", 2) == 0 && payload[2] >= '0' && payload[2] <= '9') {
		xid = strtoull(payload + 2, &end, 10);
		if (*end != ';' && *end != '\0') {
			pl->want_full = true;
			return;
		}
		payload = *end ? end + 1 : end;
		if (!*payload) { /* a change of more than users' facts */
			if (!view_has(pl->cur, xid, NULL, 0))
				pl->want_full = true;
			return;
		}
	}
	if (strncmp(payload, "u:", 2) != 0) {
		pl->want_full = true;
		return;
	}
	int64_t ids[POLICY_OVERLAY_MAX];
	size_t n = 0;
	for (const char *p = payload + 2; *p;) {
		long long id = strtoll(p, &end, 10);
		if (end == p || id <= 0 || (*end && *end != ',') || n == POLICY_OVERLAY_MAX) {
			pl->want_full = true;
			return;
		}
		ids[n++] = id;
		p = *end ? end + 1 : end;
	}
	if (n == 0) {
		pl->want_full = true;
		return;
	}
	if (view_has(pl->cur, xid, ids, n)) {
		recheck_users_add(pl, ids, n);
		return;
	}
	for (size_t i = 0; i < n; i++)
		add_pending(pl, ids[i]);
}

struct policy_view *policy_live_get(struct policy_live *pl)
{
	pthread_mutex_lock(&pl->mu);
	struct policy_view *v = pl->cur;
	atomic_fetch_add(&v->refs, 1);
	pthread_mutex_unlock(&pl->mu);
	return v;
}

static void swap_in(struct policy_live *pl, struct policy_view *v)
{
	pthread_mutex_lock(&pl->mu);
	struct policy_view *old = pl->cur;
	/* counted before it is in force (policy_live_stamp): a change of what
	 * the recheck reads, or an overlay of users among whom one opted out,
	 * or a whole view with an opt-out the one before had not (their rows
	 * are decided again: recheck_users_add) */
	if (old && (old->set.fingerprint != v->set.fingerprint || v->opted_out))
		atomic_fetch_add(&pl->changes, 1);
	/* after changes: a count of facts read before a change is counted
	 * is behind once it is (the dispatcher's screen_failed reads facts
	 * alone) */
	atomic_fetch_add(&pl->facts, 1);
	pl->cur = v;
	pl->st.version = policy_snapshot_version(v->snap);
	pl->st.reloads++;
	pl->st.user_reloads += v->base != NULL;
	pl->st.overlay_users = v->nusers;
	pl->st.rules = policy_snapshot_rule_count(v->snap);
	pl->st.facts = policy_snapshot_fact_count(v->snap);
	pl->st.last_load_ms = v->load_ms;
	pl->st.default_mode_unreadable = v->set.default_mode_unreadable; /* an overlay's is its base's */
	pl->st.default_mode_kept = (int)v->set.default_mode;
	bool was_stale = !v->base && pl->st.stale_since_us;
	if (!v->base) { /* a whole reload: current again (an overlay is over the rules it has) */
		pl->st.stale_since_us = 0;
		pl->st.last_failure[0] = '\0';
		pl->st.last_failure_rc = CW_OK;
	}
	pthread_mutex_unlock(&pl->mu);
	if (was_stale)
		LOG_KV(CW_LOG_INFO, "policy reloaded after failures; the rules in force are current");
	policy_view_put(old);
}

static void wake_thread(struct policy_live *pl)
{
	char b = 1;
	if (write(pl->wake[1], &b, 1) < 0) {
		/* full: the thread is awake anyway */
	}
}

void policy_live_poke(struct policy_live *pl)
{
	if (!pl)
		return;
	atomic_store(&pl->poked, true);
	wake_thread(pl);
}

/* The bucket of a user's own changes (its key in key) and its rate. */
static uint32_t user_update_bucket(struct policy_live *pl, const char *localpart, char *key, size_t size)
{
	struct policy_view *v = policy_live_get(pl);
	int64_t per_minute = v->set.user_updates_per_minute;
	policy_view_put(v);
	snprintf(key, size, "uup:%s", localpart);
	return (uint32_t)per_minute;
}

/* Each change makes every process reload the user's facts, and a block or
 * its end is an event to the peer in each room the two share, which skips
 * the outbound limits: until the thirtieth session a user toggling block
 * and accept sent the peer 100 events in 3 s (a review's finding), as a
 * peer itself cannot (policy.peer_updates_per_minute).  The key is the
 * localpart, so a user of both adapters (one identity) has one bucket. */
bool policy_user_update_allowed(struct policy_live *pl, struct ratelimit *rl, const char *localpart, bool *notice)
{
	if (notice)
		*notice = false;
	if (!rl)
		return true;
	char key[MIMI_LOCAL_MAX + 8];
	uint32_t per_minute = user_update_bucket(pl, localpart, key, sizeof(key));
	int64_t now = cw_wall_ms();
	if (ratelimit_take(rl, key, per_minute, 60000, now, NULL) <= 0)
		return true;
	if (notice) {
		key[2] = 'n';
		*notice = ratelimit_take(rl, key, 1, 60000, now, NULL) <= 0;
	}
	return false;
}

void policy_user_update_give(struct policy_live *pl, struct ratelimit *rl, const char *localpart)
{
	if (!rl)
		return;
	char key[MIMI_LOCAL_MAX + 8];
	uint32_t per_minute = user_update_bucket(pl, localpart, key, sizeof(key));
	ratelimit_give(rl, key, per_minute, 60000, cw_wall_ms());
}

bool policy_user_command_allowed(struct policy_live *pl, struct ratelimit *rl, const char *localpart, bool *notice)
{
	if (notice)
		*notice = false;
	if (!rl)
		return true;
	char key[MIMI_LOCAL_MAX + 8];
	uint32_t per_minute = user_update_bucket(pl, localpart, key, sizeof(key)) + POLICY_USER_COMMANDS_EXTRA;
	key[1] = 'c'; /* "ucp:": her changes' bucket is "uup:", its notice's "unp:" */
	int64_t now = cw_wall_ms();
	if (ratelimit_take(rl, key, per_minute, 60000, now, NULL) <= 0)
		return true;
	if (notice) {
		key[2] = 'n'; /* "ucn:" */
		*notice = ratelimit_take(rl, key, 1, 60000, now, NULL) <= 0;
	}
	return false;
}

void policy_live_get_stats(struct policy_live *pl, struct policy_live_stats *st)
{
	pthread_mutex_lock(&pl->mu);
	*st = pl->st;
	pthread_mutex_unlock(&pl->mu);
}

/* The periodic sweep's statements prepared on c; false with e set (the
 * statement named, then PostgreSQL's words) and *failed the name of the
 * one refused (store_prepare_each).  Logged by the callers, not as
 * store_prepare_all logs: the thread's reconnects try every 250 ms
 * doubling to database.reconnect_max_ms, and until the fifty-ninth session a refusal
 * that lasted (a table locked past the statement timeout, a column
 * renamed by hand) wrote an error line at every try, besides the once a
 * run of "policy cannot connect to the database" that did not name the
 * statement. */
static bool sweep_prepare(PGconn *c, const char **failed, cw_errmsg *e)
{
	cw_errmsg why;
	cw_err rc = store_prepare_each(c, sweep_stmt_lists, failed, &why);
	if (rc)
		cw_fail(e, rc, "cannot prepare the statement %s: %s", *failed, why.msg);
	return !rc;
}

/* A fresh connection of the policy thread made ready: it listens for
 * changes, has the length of "the last minutes" of its views (lately_s)
 * as its setting causeway.lately_s (LATELY_SINCE), and the periodic
 * sweep's statements prepared (*failed: the one refused, else NULL). */
static bool conn_ready(PGconn *c, long lately_s, const char **failed, cw_errmsg *e)
{
	char sql[96];
	*failed = NULL;
	snprintf(sql, sizeof(sql), "SELECT set_config('causeway.lately_s', '%ld', false)", lately_s);
	return !store_exec(c, "LISTEN causeway_policy", e) && !store_exec(c, "LISTEN causeway_sweep", e) &&
	       !store_exec(c, sql, e) && sweep_prepare(c, failed, e);
}

/* A periodic sweep that takes this long or longer has its statements
 * prepared again (replan_sweep). */
#define SWEEP_REPLAN_US 100000

/* The most a periodic sweep due waits while queued releases go on a
 * batch a turn (release_turn).  It finds the rows of a user whose
 * consent is of the last minutes, hers among them, and reads (and sorts)
 * all those still to release for its batch: at the default 2 s interval
 * during a release of 100,000 held rows it took 1-2.6 s at each of its
 * runs, a quarter of the release's time (docs/performance.md,
 * "Sixty-third session: a release's batches in the order of an index").
 * It waits for the release's end, but not more than this: what only it
 * does (the held rows' expiry, a block of the last minutes seen by a
 * process whose view was behind) is late by that much at most, however
 * long the releases.  The expiry of messages (expiry_sweep) and of
 * consent requests (requests_expire_sql) does not wait: until the
 * sixty-third session's mend they waited with it. */
#define SWEEP_WAIT_RELEASES_US 30000000

/* The periodic sweep's statements prepared again on the policy thread's
 * connection, after a sweep that took took_us: their next runs are
 * planned for the tables as they are.  PostgreSQL keeps a statement's
 * generic plan (made at its sixth run) until the statistics of a table it
 * reads change.  On a new database the sixth sweep comes before the first
 * message (025 analyzed the empty events table), its plan reads events
 * whole for each held row, and it was kept while the table grew until
 * autovacuum's first ANALYZE of it, a minute or two: 1-2 s a sweep with a
 * few thousand held rows and events, the sweep's lock held throughout, so
 * that a user's consent (its sweep waits for the lock) timed out
 * (docs/performance.md, "Forty-fourth session").  A sweep slow for its
 * backlog is planned each time (five custom plans before a generic one):
 * a few ms of planning beside 100 or more.  Failed: the connection is
 * made again at the next turn (ensure_conn), which prepares them. */
static void replan_sweep(struct policy_live *pl, int64_t took_us)
{
	if (!pl->sweep_slow) {
		char ms[24];
		snprintf(ms, sizeof(ms), "%lld", (long long)(took_us / 1000));
		LOG_KV(CW_LOG_INFO, "a periodic sweep was slow; its statements are planned again", "ms", ms);
	}
	char sql[256] = ""; /* four short names */
	for (const struct store_stmt *st = sweep_stmts; st->name; st++) {
		size_t len = strlen(sql);
		snprintf(sql + len, sizeof(sql) - len, "DEALLOCATE %s; ", st->name);
	}
	cw_errmsg e;
	const char *failed;
	if (store_exec(pl->c, sql, &e) || !sweep_prepare(pl->c, &failed, &e)) {
		LOG_KV(CW_LOG_WARN, "cannot plan the periodic sweep again; reconnecting", "detail", e.msg);
		pl->drop_conn = true;
	}
}

/* The tables whose generic plans are made while they are (nearly) empty
 * on a new database and kept as they grow: each is looked up one row at a
 * time by a per-message statement (events by id; outbox by destination and
 * state, the dispatcher's claim; event_native_ids by native id;
 * delivery_attempts by outbox row, cw_record).  Bit i of grown_known. */
static const char *const grown_tables[] = { "events", "outbox", "event_native_ids", "delivery_attempts" };
#define GROWN_ALL ((1u << (sizeof grown_tables / sizeof *grown_tables)) - 1)

/* For each of grown_tables, by its index: whether its statistics count a
 * thousand rows or more (never analyzed: -1), and whether it takes 1 MB or
 * more. */
static const char grown_sql[] =
	"SELECT t.i - 1, c.reltuples >= 1000, pg_relation_size(c.oid) >= 1048576 "
	"FROM unnest('{events,outbox,event_native_ids,delivery_attempts}'::regclass[]) WITH ORDINALITY t(oid, i) "
	"JOIN pg_class c ON c.oid = t.oid";

/* A table analyzed once it has grown, when its statistics still say it is
 * (nearly) empty: on a new database 025 analyzed events empty, and every
 * generic plan made before autovacuum's first ANALYZE of it (a minute or
 * more: a naptime, 50 rows changed) took it for empty and read it whole
 * where it looks one event up by id, plans kept while the table grew
 * because nothing changed its statistics: the dispatcher's claim 1.5 s a
 * batch of 250 at 90,000 events, the periodic sweep, a reader's round 0
 * (docs/performance.md, "Forty-third session" and "Forty-fourth
 * session").  Until the sixty-second session only events was looked at;
 * outbox, analyzed by no migration and first by autovacuum with a few
 * rows in it, had the same: the claim's generic plan (taken after five
 * custom plans, cheaper on a table so counted) scanned outbox whole for
 * every row it looked at, 45.7 s a claim at 100,000 rows against 66 ms
 * analyzed (a claim cancelled after 9 minutes in a review), and
 * delivery_attempts' cw_record look-up 32.7 ms against 0.008 ms
 * (docs/performance.md, "Sixty-second session").  ANALYZE invalidates
 * the plans in every session.  Asked at each periodic sweep until the
 * statistics of each table count a thousand rows (by autovacuum's
 * ANALYZE) or this one was tried for it, then never again: one look at
 * pg_class. */
static void analyze_grown(struct policy_live *pl)
{
	PGresult *r = PQexec(pl->c, grown_sql);
	unsigned grown = 0;
	if (PQresultStatus(r) == PGRES_TUPLES_OK) {
		for (int i = 0; i < PQntuples(r); i++) {
			unsigned bit = 1u << (atoi(PQgetvalue(r, i, 0)) & 31);
			if (PQgetvalue(r, i, 1)[0] == 't')
				pl->grown_known |= bit;
			else if (PQgetvalue(r, i, 2)[0] == 't' && !(pl->grown_known & bit))
				grown |= bit;
		}
	}
	PQclear(r);
	pl->grown_known |= grown; /* tried once: autovacuum does it too, later */
	for (size_t i = 0; i < sizeof grown_tables / sizeof *grown_tables; i++) {
		if (!(grown & (1u << i)))
			continue;
		char sql[64], msg[96];
		snprintf(sql, sizeof sql, "ANALYZE %s", grown_tables[i]);
		cw_errmsg e;
		if (store_exec(pl->c, sql, &e)) {
			snprintf(msg, sizeof msg, "cannot analyze the %s table", grown_tables[i]);
			LOG_KV(CW_LOG_WARN, msg, "detail", e.msg);
		} else {
			snprintf(msg, sizeof msg, "the %s table has grown since its statistics were taken; analyzed",
				grown_tables[i]);
			LOG_KV(CW_LOG_INFO, msg);
		}
	}
}

/* The rules in force may be behind the database from now on: the first
 * failure since the last whole reload starts the stale clock; its detail
 * and code are kept for /readyz and the admin API.  Returns whether this
 * is the first failure of the run. */
static bool note_failure(struct policy_live *pl, cw_err rc, const cw_errmsg *e, bool reload)
{
	pthread_mutex_lock(&pl->mu);
	pl->st.reload_failures += reload;
	bool first = !pl->st.stale_since_us;
	if (first)
		pl->st.stale_since_us = cw_now_us();
	memcpy(pl->st.last_failure, e->msg, sizeof(pl->st.last_failure)); /* as long: a whole message */
	pl->st.last_failure_rc = rc;
	pthread_mutex_unlock(&pl->mu);
	return first;
}

static bool policy_gives_up(void *arg)
{
	struct policy_live *pl = arg;
	return atomic_load(&pl->stop);
}

/* A connection that cannot be made is a failure to reload too: until the
 * forty-seventh session it was retried in silence, never reported stale
 * (a policy connection refused while the others stayed: the rules in
 * force fell behind every change, and nothing said so).  Logged at the
 * first failure of a run; the whole reload on the new connection logs
 * "policy reloaded after failures". */
static bool ensure_conn(struct policy_live *pl, bool *fresh)
{
	if (pl->c && PQstatus(pl->c) == CONNECTION_OK && !pl->drop_conn)
		return true;
	store_canceller_set(&pl->cancel, NULL);
	PQfinish(pl->c);
	pl->drop_conn = false;
	cw_errmsg e;
	/* Not blocking the daemon's stop while the database's host takes the
	 * connection and never answers (until the forty-eighth session: up to
	 * connect_timeout, 5 s); a poke meanwhile is taken at the next turn. */
	pl->c = store_connect_abortable(pl->url, pl->o.statement_timeout_ms, pl->wake[0], policy_gives_up, pl, &e);
	const char *failed = NULL;
	if (pl->c && !conn_ready(pl->c, lately_s_of(pl->o.reload_interval_s), &failed, &e)) {
		PQfinish(pl->c);
		pl->c = NULL;
	}
	pl->sweep_due = pl->sweep_due || pl->c;
	store_canceller_set(&pl->cancel, pl->c);
	*fresh = pl->c != NULL; /* changes may have been missed while away */
	/* Once a run, a statement the new connection could not prepare named */
	if (!pl->c && !atomic_load(&pl->stop) && note_failure(pl, CW_EUNAVAIL, &e, false)) {
		if (failed)
			LOG_KV(CW_LOG_WARN, "policy cannot connect to the database; the previous rules stay in force",
			       "statement", failed, "detail", e.msg);
		else
			LOG_KV(CW_LOG_WARN, "policy cannot connect to the database; the previous rules stay in force",
			       "detail", e.msg);
	}
	return pl->c != NULL;
}

/* A loaded view put in force; a failure logged and counted. */
static bool put_in_force(struct policy_live *pl, cw_err rc, struct policy_view *v, const cw_errmsg *e)
{
	if (rc) {
		LOG_KV(CW_LOG_WARN, "policy reload failed; the previous rules stay in force", "detail", e->msg);
		note_failure(pl, rc, e, true);
		return false;
	}
	swap_in(pl, v);
	return true;
}

/* A view's list of opt-outs (blocks false) or of remote blocks of the
 * last minutes (true), into *l, how many. */
static size_t view_list(const struct policy_view *v, bool blocks, const struct policy_user_fact **l)
{
	*l = blocks ? v->blocks_lately : v->outs;
	return blocks ? v->nblocks_lately : v->nouts;
}

/* The view of v whose lists hold local user id's facts: an overlay's own
 * for the users it holds, its base's for the others. */
static const struct policy_view *view_of(const struct policy_view *v, int64_t id)
{
	for (size_t k = 0; v->base && k < v->nusers; k++)
		if (v->users[k] == id)
			return v;
	return v->base ? v->base : v;
}

static int user_fact_id_cmp(const void *a, const void *b)
{
	const struct policy_user_fact *x = a, *y = b;
	return x->id < y->id ? -1 : x->id > y->id;
}

/* Whether one of the local users ids (n) has an opt-out (blocks false:
 * policy_view.outs) or a remote block of the last lately_s (true:
 * policy_view.blocks_lately) in v, as of v's load. */
static bool has_fact(const struct policy_view *v, bool blocks, const int64_t *ids, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		const struct policy_user_fact *l, key = { ids[i], 0 };
		size_t ln = view_list(view_of(v, ids[i]), blocks, &l);
		if (ln && bsearch(&key, l, ln, sizeof(*l), user_fact_id_cmp))
			return true;
	}
	return false;
}

/* The users with an opt-out (blocks false) or a remote block of the last
 * minutes (true) in v (a whole load) that the view in force, cur, has not
 * (its overlay's, for the users it holds; else its base's): their ids
 * into *ids (malloc'd), how many; -1 out of memory. */
static long facts_new(const struct policy_view *cur, const struct policy_view *v, bool blocks, int64_t **ids)
{
	const struct policy_user_fact *vl;
	size_t vn = view_list(v, blocks, &vl);
	long n = 0;
	*ids = vn ? malloc(vn * sizeof(**ids)) : NULL;
	if (vn && !*ids)
		return -1;
	for (size_t i = 0; i < vn; i++) {
		const struct policy_user_fact *ol;
		size_t on = view_list(view_of(cur, vl[i].id), blocks, &ol);
		if (on && bsearch(&vl[i], ol, on, sizeof(*ol), user_fact_cmp))
			continue;
		if (n == 0 || (*ids)[n - 1] != vl[i].id) /* in user order */
			(*ids)[n++] = vl[i].id;
	}
	return n;
}

/* False when the policy's load failed; *hook_ok false when the hook
 * failed.  A user's new opt-out it finds (one no NOTIFY named: a change
 * of more users than an overlay holds, one missed while the connection
 * was gone, SQL's) has her rows decided again, her walk
 * (recheck_users_add; too many users, a whole pass); the view counts as
 * a change for the dispatcher (swap_in: opted_out).  Since the
 * fifty-third session, not a pass over every waiting row: the opt-outs
 * were in the fingerprint, and every whole reload after one (the
 * periodic one too) made such a pass, where her walk had decided her
 * rows already. */
static bool reload(struct policy_live *pl, bool *hook_ok)
{
	struct policy_view *v = NULL;
	cw_errmsg e;
	struct policy_view *cur = policy_live_get(pl);
	cw_err rc = policy_load(pl->c, ++pl->version, cur->base ? cur->base : cur,
				lately_s_of(pl->o.reload_interval_s), &v, &e);
	int64_t *ids = NULL, *bids = NULL;
	long n = rc ? 0 : facts_new(cur, v, false, &ids);
	long nb = rc ? 0 : facts_new(cur, v, true, &bids);
	if (!rc)
		v->opted_out = n != 0 || nb != 0;
	policy_view_put(cur);
	bool ok = put_in_force(pl, rc, v, &e);
	if (ok && (n < 0 || nb < 0))
		recheck_whole(pl);
	if (ok && n > 0)
		recheck_users_add(pl, ids, (size_t)n);
	/* A remote user's new block of a local one (a block no NOTIFY named
	 * as hers: one of more users than an overlay holds, or missed while
	 * the connection was gone) has her rows to his peer decided again, as
	 * her NOTIFY's walk does (recheck_users_sql's last kind). */
	if (ok && nb > 0)
		recheck_users_add(pl, bids, (size_t)nb);
	free(ids);
	free(bids);
	/* The hook's state (the admin tokens) is read whether or not the
	 * policy loaded: it needs nothing of it.  Until the thirty-seventh
	 * session it followed only a load that succeeded, and while the
	 * policy could not be loaded (a rule row it cannot read, a query the
	 * database refuses) a token revoked on another process kept working
	 * here.  A failed load is tried again within a second (live_main), the
	 * hook with it.  A hook that failed is tried again so too, though
	 * the policy loaded: until the forty-third session it waited for the
	 * next periodic reload (policy.reload_interval_s), and a token revoked
	 * on another process while this one could not read the tokens kept
	 * working here until then. */
	*hook_ok = !pl->o.on_reload || pl->o.on_reload(pl->c, pl->o.reload_arg);
	return ok;
}

/* The facts of the pending users (and of those the overlay in force held)
 * over the full view in force; false when a whole reload is due instead
 * (too many users) or the load failed. */
static bool reload_users(struct policy_live *pl)
{
	struct policy_view *cur = policy_live_get(pl);
	for (size_t i = 0; i < cur->nusers; i++)
		add_pending(pl, cur->users[i]); /* too many: want_full */
	struct policy_view *v = NULL;
	cw_errmsg e;
	cw_err rc = pl->want_full ? CW_OK : policy_load_users(pl->c, ++pl->version, cur, pl->pending, pl->npending, &v, &e);
	policy_view_put(cur);
	return !pl->want_full && put_in_force(pl, rc, v, &e);
}

/* n 0: everything; xid the change's transaction (0: not known). */
static bool sync_request(struct policy_live *pl, const int64_t *ids, size_t n, uint64_t xid, long timeout_ms)
{
	if (!pl)
		return false;
	pthread_mutex_lock(&pl->mu);
	uint64_t want = ++pl->requested;
	if (pl->nasked + (n ? n : 1) > POLICY_OVERLAY_MAX)
		pl->asked_all = true;
	for (size_t i = 0; i < (n ? n : 1) && !pl->asked_all; i++) {
		pl->asked[pl->nasked].id = n ? ids[i] : 0;
		pl->asked[pl->nasked++].xid = xid;
	}
	pthread_mutex_unlock(&pl->mu);
	wake_thread(pl);
	struct timespec until;
	cw_deadline_ts(&until, CLOCK_REALTIME, (int64_t)timeout_ms * 1000);
	pthread_mutex_lock(&pl->mu);
	int rc = 0;
	/* a stopped thread loads nothing more: no wait for it (the stop) */
	while (pl->done < want && rc == 0 && !atomic_load(&pl->stop))
		rc = pthread_cond_timedwait(&pl->loaded, &pl->mu, &until);
	bool ok = pl->done >= want;
	pthread_mutex_unlock(&pl->mu);
	return ok;
}

/* A transaction id's text (pg_current_xact_id()::text), 0 when none or not one. */
static uint64_t xid_of(const char *xid)
{
	if (!xid || *xid < '0' || *xid > '9')
		return 0;
	char *end;
	uint64_t x = strtoull(xid, &end, 10);
	return *end ? 0 : x;
}

bool policy_live_sync(struct policy_live *pl, const char *xid, long timeout_ms)
{
	return sync_request(pl, NULL, 0, xid_of(xid), timeout_ms);
}

bool policy_live_sync_user(struct policy_live *pl, int64_t local_id, const char *xid, long timeout_ms)
{
	return sync_request(pl, &local_id, local_id > 0, xid_of(xid), timeout_ms);
}

bool policy_live_catch_up(struct policy_live *pl, const int64_t *ids, size_t n, long timeout_ms)
{
	if (!pl || n == 0)
		return false;
	pthread_mutex_lock(&pl->mu);
	pl->st.catch_ups++;
	pthread_mutex_unlock(&pl->mu);
	return sync_request(pl, ids, n, 0, timeout_ms);
}

/* The walk of the pending consent requests (requests_turn) is due, from
 * the start. */
static void requests_walk_from_start(struct policy_live *pl)
{
	pl->req_pass = true;
	snprintf(pl->req_exp, sizeof(pl->req_exp), "-infinity");
	pl->req_after = 0;
}

/* A pass of the recheck begins (again: the one after the claims in
 * flight at the last one's start); but for again, with the walk of the
 * pending consent requests. */
static void recheck_begin(struct policy_live *pl, bool again)
{
	pl->recheck_state = 0;
	pl->recheck_dest[0] = '\0';
	pl->recheck_after = 0;
	pl->again = again;
	if (!again) {
		pl->again_at_us = 0;
		requests_walk_from_start(pl);
	}
}

/* A whole pass is needed: now, or after the one in progress (which then
 * goes on with the snapshot in force for the rows ahead of it). */
static void recheck_whole(struct policy_live *pl)
{
	if (pl->recheck_state < RECHECK_STATES)
		pl->more = true;
	else
		recheck_begin(pl, false);
}

#define RECHECK_KEPT_RETRY_US 500000

/* The ids of kept (a JSON array) among the rows to decide again
 * (pl->kept); too many for the list, a whole pass (which finds them). */
static void recheck_kept_add(struct policy_live *pl, const json_t *kept)
{
	size_t i;
	json_t *id;
	json_array_foreach(kept, i, id) {
		int64_t v = (int64_t)json_integer_value(id);
		size_t k = 0;
		while (k < pl->nkept && pl->kept[k] != v)
			k++;
		if (k < pl->nkept)
			continue;
		if (pl->nkept == RECHECK_BATCH) {
			pl->nkept = 0;
			recheck_whole(pl);
			return;
		}
		if (pl->nkept == 0)
			pl->kept_at_us = cw_now_us() + RECHECK_KEPT_RETRY_US;
		pl->kept[pl->nkept++] = v;
	}
}

/* The users' walk at the start of its kind-th kind (recheck_users_sql):
 * before every key of its index. */
static void users_walk_from(struct policy_live *pl, int kind)
{
	pl->users_kind = kind;
	pl->users_outs_skipped = false;
	if (kind == 0)
		pl->users_again = false; /* anew: every user's rows are ahead of it */
	pl->users_key1 = pl->users_key3 = 0;
	snprintf(pl->users_key2, sizeof(pl->users_key2), "%s", users_by_room(kind) ? "" : "0");
}

/* The users' walk past its last kind: over, its users' rows all decided
 * (settled may be stored), unless one of them was named again while it
 * ran (users_again): then anew from its first kind, and the requests'
 * walk with it. */
static void users_walk_over(struct policy_live *pl)
{
	if (pl->users_again) {
		users_walk_from(pl, 0);
		requests_walk_from_start(pl);
	} else {
		pl->nrecheck_users = 0;
	}
}

/* The users whose facts changed (an opt-out among them, maybe, or a remote
 * user's block of them): their rows are decided again; too many for the
 * list, a whole pass. */
static void recheck_users_add(struct policy_live *pl, const int64_t *ids, size_t n)
{
	bool added = false;
	for (size_t i = 0; i < n; i++) {
		size_t k = 0;
		while (k < pl->nrecheck_users && pl->recheck_users[k] != ids[i])
			k++;
		if (k < pl->nrecheck_users) {
			/* in the walk already: again at its end, unless it has
			 * not moved yet (users_again) */
			if (pl->users_kind > 0 || pl->users_key1 || pl->users_key3)
				pl->users_again = true;
			continue;
		}
		if (pl->nrecheck_users == POLICY_OVERLAY_MAX) {
			pl->nrecheck_users = 0;
			recheck_whole(pl);
			return;
		}
		pl->recheck_users[pl->nrecheck_users++] = ids[i];
		added = true;
	}
	if (added) { /* the walk starts again: the new users' rows may be behind it */
		users_walk_from(pl, 0);
		requests_walk_from_start(pl); /* an opt-out: her requests of that network */
	}
}

/* The pending consent requests, in consent_requests_pending_expiry_idx's
 * order from after ($1, $2) (expires_at, id; -infinity: from the start), $3 of
 * them: the requester and the local user (uri, domain, network), as
 * server_denials reads a row (a request is about a message), and its
 * expiry (column 8). */
static const char requests_page_sql[] =
	"SELECT q.id, s.uri, s.domain, s.network, l.uri, l.domain, l.network, 'message', q.expires_at::text "
	"FROM consent_requests q JOIN identities l ON l.id = q.local_identity_id "
	"JOIN identities s ON s.id = q.remote_identity_id "
	"WHERE q.state = 'pending' AND (q.expires_at, q.id) > ($1::timestamptz, $2::bigint) "
	"ORDER BY q.expires_at, q.id LIMIT $3::int";

/* The requests $1 ([{id, reason, rule}]) still pending withdrawn: state
 * expired, as the sweep expires one, and recorded as the sweep records
 * that (consent.expire, subject the local user), with the reason and the
 * rule, so that the XMPP component takes it from the user's roster and
 * the Matrix bot tells her it is gone. */
static const char requests_withdraw_sql[] =
	"WITH d AS (SELECT * FROM jsonb_to_recordset($1::jsonb) AS d(id bigint, reason text, rule bigint)), "
	"x AS (UPDATE consent_requests q SET state = 'expired', decided_at = now() FROM d WHERE q.id = d.id "
	"  AND q.state = 'pending' "
	"  RETURNING q.id, q.local_identity_id, q.remote_identity_id, d.reason, NULLIF(d.rule, 0) AS rule), "
	"au AS (" REQUESTS_EXPIRED_AUDIT("x") ") "
	"SELECT count(*) FROM x";

/* One page of the walk of the pending consent requests after a change of
 * what the server's side of a decision reads (a rule, the default mode,
 * an opt-out): a request whose requester the server's rules (or the
 * user's explicit opt-out of their network) now refuse is withdrawn, as
 * the messages it asked about were dropped (recheck).  Decided as a
 * held row of hers is at its release (server_denials: the server's side
 * alone; her block of the requester is hers to answer, and answers the
 * request itself).  Until the forty-third
 * session it stayed pending for its week: the Matrix bot showed it to a
 * user who opened her management room after the operator denied its
 * sender (abuse: the deny always wins), her list named it, and on XMPP
 * the subscription request stood in her roster (a review's probe).
 * False when the page failed (tried again at the next turn). */
static bool requests_turn(struct policy_live *pl, const struct policy_view *v)
{
	char after[24], limit[16];
	snprintf(after, sizeof(after), "%lld", pl->req_after);
	snprintf(limit, sizeof(limit), "%d", RECHECK_BATCH);
	const char *params[] = { pl->req_exp, after, limit };
	cw_errmsg e;
	PGresult *r = PQexecParams(pl->c, requests_page_sql, 3, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(pl->c, r, PGRES_TUPLES_OK, &e);
	if (rc) {
		LOG_KV(CW_LOG_WARN, "policy recheck of pending consent requests failed; tried again", "detail", e.msg);
		return false;
	}
	int n = PQntuples(r);
	json_t *list = server_denials(v->snap, r, -1);
	if (n) {
		snprintf(pl->req_exp, sizeof(pl->req_exp), "%s", PQgetvalue(r, n - 1, 8));
		pl->req_after = atoll(PQgetvalue(r, n - 1, 0));
	}
	PQclear(r);
	if (!list) {
		LOG_KV(CW_LOG_WARN, "policy recheck of pending consent requests: out of memory; tried again");
		return false;
	}
	long withdrawn = 0;
	char *text = json_array_size(list) ? json_dumps(list, JSON_COMPACT) : NULL;
	json_decref(list);
	if (text) {
		const char *wp[] = { text };
		r = PQexecParams(pl->c, requests_withdraw_sql, 1, NULL, wp, NULL, NULL, 0);
		free(text);
		if ((rc = store_check(pl->c, r, PGRES_TUPLES_OK, &e))) {
			LOG_KV(CW_LOG_WARN, "withdrawing consent requests the server's rules now refuse failed; tried again",
			       "detail", e.msg);
			return false;
		}
		withdrawn = atol(PQgetvalue(r, 0, 0));
		PQclear(r);
	}
	if (withdrawn) {
		char w[24];
		snprintf(w, sizeof(w), "%ld", withdrawn);
		LOG_KV(CW_LOG_INFO, "pending consent requests the server's rules now refuse withdrawn", "withdrawn", w);
	}
	if (n < RECHECK_BATCH)
		pl->req_pass = false;
	return true;
}

/* The rows a dispatcher held in flight as a pass began were not decided
 * (SKIP LOCKED, or not in the states): one that fails goes back to pending.
 * The next pass, after their claims are over (the latest claimed_until,
 * by outbox_claim_expiry_idx), decides them.  Since the thirty-second
 * session a lane decides the rows it fails back itself when a change came
 * during its claim (policy_live_stamp); this pass is for those of a
 * process that had not loaded the change yet. */
static cw_err recheck_after_claims(struct policy_live *pl, cw_errmsg *e)
{
	/* NULL when none is in flight: no pass after this one (until the
	 * fifty-third session greatest(0, NULL), 0, made one a second after
	 * every pass, which read every waiting row again for nothing) */
	PGresult *r = PQexec(pl->c, "SELECT (extract(epoch FROM max(claimed_until) - now()) * 1000)::bigint "
				    "FROM outbox WHERE state = 'in_flight'");
	cw_err rc = store_check(pl->c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (!PQgetisnull(r, 0, 0)) {
		long long ms = atoll(PQgetvalue(r, 0, 0));
		pl->again_at_us = cw_now_us() + ((ms > 0 ? ms : 0) + 1000) * 1000LL;
	}
	PQclear(r);
	return CW_OK;
}

/* A recheck's figures (counts: rows decided, rows dropped; by: the drops
 * by reason and kind) into the metrics, and the drops into the log as
 * msg: how many, and how many of each reason and kind ("by":
 * reason/kind=count, ...).  Until the fifty-second session the log and
 * the metrics said how many rows went, not why nor whose: an operator
 * who denied a domain could not tell its drops from those of a user's
 * opt-out but by the audit log, a record a row. */
static void recheck_counted(struct policy_live *pl, const long counts[2], const struct recheck_drops *by,
			    const char *msg)
{
	pthread_mutex_lock(&pl->mu);
	pl->st.rechecked += (uint64_t)counts[0];
	pl->st.recheck_dropped += (uint64_t)counts[1];
	for (int k = 0; k < POLICY_RECHECK_REASONS; k++)
		for (int j = 0; j < POLICY_RECHECK_KINDS; j++)
			pl->st.recheck_dropped_by[k][j] += (uint64_t)by->n[k][j];
	pthread_mutex_unlock(&pl->mu);
	if (counts[1]) {
		char d[24], text[POLICY_RECHECK_REASONS * POLICY_RECHECK_KINDS * 48] = "";
		size_t len = 0;
		snprintf(d, sizeof(d), "%ld", counts[1]);
		for (int k = 0; k < POLICY_RECHECK_REASONS; k++)
			for (int j = 0; j < POLICY_RECHECK_KINDS; j++)
				if (by->n[k][j] && len < sizeof(text))
					len += (size_t)snprintf(text + len, sizeof(text) - len, "%s%s/%s=%ld", len ? "," : "",
								policy_recheck_reasons[k], policy_recheck_kinds[j],
								by->n[k][j]);
		LOG_KV(CW_LOG_INFO, msg, "dropped", d, "by", text);
	}
}

/* The rows a batch found refused and could not drop (pl->kept) decided
 * again with v, in a transaction of their own: those still waiting and
 * refused are dropped, or kept again if still held; the others
 * (delivered, in flight under a claim that decided them, allowed now)
 * leave the list.  Failed: the list stays, tried again later. */
static void kept_turn(struct policy_live *pl, const struct policy_view *v)
{
	pl->kept_at_us = cw_now_us() + RECHECK_KEPT_RETRY_US;
	cw_errmsg e;
	char *arr = cw_pg_ids(pl->kept, pl->nkept, NULL);
	cw_err rc = arr ? store_exec(pl->c, "BEGIN", &e) : cw_fail(&e, CW_ENOMEM, "out of memory");
	const char *params[] = { arr, NULL };
	PGresult *r = rc ? NULL : PQexecParams(pl->c, recheck_ids_sql, 2, NULL, params, NULL, NULL, 0);
	json_t *kept = NULL;
	long counts[2] = { 0, 0 };
	struct recheck_drops by = { 0 };
	if (!rc && !(rc = store_check(pl->c, r, PGRES_TUPLES_OK, &e))) {
		const char *reason;
		rc = recheck(pl->c, v, r, NULL, NULL, false, counts, &reason, NULL, &kept, &by, &e);
		PQclear(r);
	}
	if (arr)
		rc = store_end(pl->c, rc, &e);
	free(arr);
	if (rc) {
		LOG_KV(CW_LOG_WARN, "policy recheck of waiting rows failed; tried again", "detail", e.msg);
	} else {
		pl->nkept = 0;
		recheck_kept_add(pl, kept);
		counts[0] = 0; /* decided already: only the drops are new */
		recheck_counted(pl, counts, &by, "waiting rows the server's rules now refuse dropped once their lock went");
	}
	json_decref(kept);
}

/* One batch of the recheck, its own transaction (a backlog is never
 * locked long, and the thread's reloads and sweeps get their turns in
 * between): of the pass in progress, else of the users' rows.  True when
 * there is more to do now. */
static bool recheck_turn(struct policy_live *pl)
{
	/* the changes this turn knows of (they are counted on this thread
	 * before their view is in force): all decided once nothing is left */
	uint64_t changes = atomic_load(&pl->changes);
	struct policy_view *v = policy_live_get(pl);
	uint64_t fp = v->set.fingerprint;
	if (!pl->fp_known || fp != pl->fp) {
		if (!pl->fp_known)
			recheck_begin(pl, false);
		else
			recheck_whole(pl);
		pl->fp_known = true;
		pl->fp = fp;
	}
	if (pl->recheck_state == RECHECK_STATES && pl->more) {
		pl->more = false;
		recheck_begin(pl, false);
	}
	if (pl->recheck_state == RECHECK_STATES && pl->again_at_us && cw_now_us() >= pl->again_at_us) {
		pl->again_at_us = 0;
		recheck_begin(pl, true);
	}
	/* a page of the pending consent requests first, if due (their walk
	 * is not the rows' pass: the dispatcher's settled does not wait for
	 * it) */
	bool req_more = pl->req_pass && requests_turn(pl, v) && pl->req_pass; /* failed: next turn */
	if (pl->nkept && cw_now_us() >= pl->kept_at_us)
		kept_turn(pl, v);
	bool pass = pl->recheck_state < RECHECK_STATES;
	/* The walk's first kinds (her held rows, her dead and failed ones,
	 * her pending ones room after room) read only the rows of those of
	 * its users who opted out of a network (RECHECK_OPTED_OUT, the
	 * user_optin rows not opted in, as the view's outs lists them): for
	 * users none of whom has an opt-out in v, none is asked of the
	 * database.  Most walks (a consent's, an opt-in's, a block's) are of
	 * such users: three statements a walk found nothing until the
	 * fifty-sixth session.  No drop is lost: an opt-out v lacks was
	 * made after v's load, and its NOTIFY, or the whole reload that
	 * finds it, names her before her walk's next turn: her walk anew
	 * when this one is over, else this one, past its first kinds, has
	 * them asked at its next turn (users_outs_skipped, with the view
	 * that has it).  Until then a row they found for such an opt-out
	 * was decided under v, without it: the server's rules or her block
	 * of its sender alone, as for a user with no opt-out, whose rows no
	 * walk reads (a rule's change has every row decided by a pass, her
	 * block its own sweep).  Her held rows released by a consent are
	 * the sweep's, not the walk's: it only drops. */
	if (!pass && pl->nrecheck_users) {
		bool outs = has_fact(v, false, pl->recheck_users, pl->nrecheck_users);
		if (!outs && pl->users_kind < RECHECK_USER_KINDS - 1) {
			users_walk_from(pl, RECHECK_USER_KINDS - 1);
			pl->users_outs_skipped = true;
		} else if (outs && pl->users_outs_skipped) {
			users_walk_from(pl, 0); /* an opt-out loaded since: her walk anew */
			requests_walk_from_start(pl);
		}
	}
	/* The walk's last kind (RECHECK_BLOCKED_ROWS) is not asked of the
	 * database for users none of whom has a remote block of the last
	 * lately_s in v: most walks (a NOTIFY naming her for a consent,
	 * an opt-in) have none.  No drop is lost: a block v holds but not
	 * among its recent ones was older than lately_s at v's load,
	 * and the statement leaves it too; a row found for a block v does
	 * not hold is not dropped under v (recipients_blocked_her asks v),
	 * and that block's NOTIFY, or the whole reload that finds it, names
	 * her again and is loaded before her walk's next turn (her walk
	 * anew, or this one's last kind still to come).  Until the
	 * fifty-sixth session it ran at every walk: a statement for nothing. */
	if (!pass && pl->nrecheck_users && pl->users_kind == RECHECK_USER_KINDS - 1 &&
	    !has_fact(v, true, pl->recheck_users, pl->nrecheck_users))
		users_walk_over(pl); /* the last kind: the walk is over, or anew */
	if (!pass && pl->nrecheck_users == 0) {
		policy_view_put(v);
		if (!pl->nkept)
			atomic_store(&pl->settled, changes);
		return req_more;
	}
	cw_errmsg e;
	char after[24], limit[16], users[CW_PG_IDS_SIZE(POLICY_OVERLAY_MAX)];
	snprintf(limit, sizeof(limit), "%d", RECHECK_BATCH);
	PGresult *r = NULL;
	/* a pass's batch: its paths off with the BEGIN, one round trip
	 * (until the fifty-third session one of their own) */
	cw_err rc = store_exec(pl->c, pass ? "BEGIN; SET LOCAL enable_sort = off; "
					     "SET LOCAL enable_incremental_sort = off" : "BEGIN", &e);
	if (!rc && pass && !pl->again && pl->recheck_state == 0 && pl->recheck_after == 0 && !pl->recheck_dest[0])
		rc = recheck_after_claims(pl, &e); /* a max() of an index: no sort either way */
	if (!rc && pass) {
		/* The batch is a range of outbox_state_dest_idx read in its
		 * order, whatever the statistics (RECHECK_STATE_SQL): no sort of
		 * the state's rows, whole or incremental.  Without statistics
		 * of outbox (a table filled before autovacuum came: the start's
		 * pass, after a restore or a backlog's bulk load) the planner
		 * guessed a few hundred pending rows, and read all of them (a
		 * bitmap scan, or outbox_backing_off_idx in destination order)
		 * to sort them and keep 500: 50,000 rows for each batch of a
		 * pass, until the fifty-second session.  Only this statement:
		 * the drops' statements that follow are planned as ever (the
		 * session has no JIT to compile for the cost of a path turned
		 * off: store.c). */
		snprintf(after, sizeof(after), "%lld", pl->recheck_after);
		const char *params[] = { pl->recheck_dest, after, limit };
		r = PQexecParams(pl->c, recheck_state_sql[pl->recheck_state], 3, NULL, params, NULL, NULL, 0);
		cw_errmsg se;
		if (!rc && PQresultStatus(r) == PGRES_TUPLES_OK &&
		    (rc = store_exec(pl->c, "SET LOCAL enable_sort TO DEFAULT; SET LOCAL enable_incremental_sort TO DEFAULT",
				     &se))) {
			PQclear(r);
			r = NULL;
			e = se;
		}
	} else if (!rc) {
		struct cw_pg_ids a;
		cw_pg_ids_begin(&a, users, POLICY_OVERLAY_MAX);
		for (size_t i = 0; i < pl->nrecheck_users; i++)
			cw_pg_ids_add(&a, (long long)pl->recheck_users[i]);
		cw_pg_ids_end(&a);
		char key3[24];
		snprintf(after, sizeof(after), "%lld", pl->users_key1);
		snprintf(key3, sizeof(key3), "%lld", pl->users_key3);
		char lately[24];
		snprintf(lately, sizeof(lately), "%ld", v->lately_s);
		const char *params[] = { users, after, pl->users_key2, key3, limit, lately };
		/* $6 the last kind's alone (RECHECK_BLOCKED_ROWS) */
		r = PQexecParams(pl->c, recheck_users_sql[pl->users_kind], pl->users_kind == RECHECK_USER_KINDS - 1 ? 6 : 5,
				 NULL, params, NULL, NULL, 0);
	}
	if (!rc)
		rc = store_check(pl->c, r, PGRES_TUPLES_OK, &e);
	else
		PQclear(r);
	int n = 0;
	long counts[2] = { 0, 0 };
	struct recheck_drops by = { 0 };
	json_t *kept = NULL;
	/* the last row is the cursor (the walk's order): the pass's
	 * (destination, id), the users' walk's (user, room, id) or, of the
	 * pending rows, (room, destination, id) */
	char last_dest[sizeof(pl->recheck_dest)] = "";
	long long last = 0, key1 = 0;
	if (!rc) {
		n = PQntuples(r);
		if (n) {
			bool rooms = !pass && users_by_room(pl->users_kind);
			last = atoll(PQgetvalue(r, n - 1, 0));
			key1 = atoll(PQgetvalue(r, n - 1, rooms ? 14 : 13));
			snprintf(last_dest, sizeof(last_dest), "%s", PQgetvalue(r, n - 1, pass || rooms ? 1 : 14));
		}
		const char *reason;
		rc = recheck(pl->c, v, r, NULL, NULL, false, counts, &reason, NULL, &kept, &by, &e);
		PQclear(r);
	}
	rc = store_end(pl->c, rc, &e);
	policy_view_put(v);
	if (rc) {
		json_decref(kept);
		LOG_KV(CW_LOG_WARN, "policy recheck of waiting rows failed; tried again", "detail", e.msg);
		return false;
	}
	recheck_kept_add(pl, kept);
	json_decref(kept);
	if (pass && n == RECHECK_BATCH) {
		snprintf(pl->recheck_dest, sizeof(pl->recheck_dest), "%s", last_dest);
		pl->recheck_after = last;
	} else if (pass) {
		pl->recheck_state++;
		pl->recheck_dest[0] = '\0';
		pl->recheck_after = 0;
	} else if (n == RECHECK_BATCH) {
		pl->users_key1 = key1;
		snprintf(pl->users_key2, sizeof(pl->users_key2), "%s", last_dest);
		pl->users_key3 = last;
	} else if (pl->users_kind + 1 < RECHECK_USER_KINDS) {
		users_walk_from(pl, pl->users_kind + 1);
	} else {
		users_walk_over(pl);
	}
	recheck_counted(pl, counts, &by, "waiting rows the server's rules or a remote user's block now refuse dropped");
	if (pl->recheck_state == RECHECK_STATES && !pl->more && pl->nrecheck_users == 0 && !pl->nkept)
		atomic_store(&pl->settled, changes);
	return pl->recheck_state < RECHECK_STATES || pl->nrecheck_users || req_more;
}

uint64_t policy_live_stamp(struct policy_live *pl, bool *unsettled)
{
	uint64_t settled = atomic_load(&pl->settled); /* first: never ahead of the count read after */
	uint64_t changes = atomic_load(&pl->changes);
	*unsettled = settled < changes;
	return changes;
}

uint64_t policy_live_facts(struct policy_live *pl)
{
	return atomic_load(&pl->facts);
}

cw_err policy_live_screen(struct policy_live *pl, PGconn *c, const int64_t *ids, size_t n, const char *claimed_by,
			  bool *gone, long *dropped, cw_errmsg *e)
{
	return policy_live_screen_claim(pl, c, ids, n, claimed_by, NULL, gone, dropped, e);
}

cw_err policy_live_screen_claim(struct policy_live *pl, PGconn *c, const int64_t *ids, size_t n,
				const char *claimed_by, const bool *uncounted, bool *gone, long *dropped, cw_errmsg *e)
{
	*dropped = 0;
	for (size_t i = 0; i < n; i++)
		gone[i] = false;
	if (n == 0)
		return CW_OK;
	char *arr = cw_pg_ids(ids, n, NULL);
	char *back = uncounted ? cw_pg_ids(ids, n, uncounted) : NULL;
	if (!arr || (uncounted && !back)) {
		free(arr);
		free(back);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	struct policy_view *v = policy_live_get(pl);
	bool own = PQtransactionStatus(c) == PQTRANS_IDLE; /* the lock of the events lasts until its end */
	cw_err rc = own ? store_exec(c, "BEGIN", e) : CW_OK;
	const char *params[] = { arr, claimed_by };
	PGresult *r = rc ? NULL : PQexecParams(c, recheck_ids_sql, 2, NULL, params, NULL, NULL, 0);
	json_t *list = NULL;
	long counts[2] = { 0, 0 };
	struct recheck_drops by = { 0 };
	if (!rc && !(rc = store_check(c, r, PGRES_TUPLES_OK, e))) {
		const char *reason;
		rc = recheck(c, v, r, claimed_by, back, false, counts, &reason, &list, NULL, &by, e);
		PQclear(r);
	}
	if (own)
		rc = store_end(c, rc, e);
	policy_view_put(v);
	free(arr);
	free(back);
	if (!rc) {
		size_t k;
		json_t *id;
		json_array_foreach(list, k, id)
			for (size_t i = 0; i < n; i++)
				gone[i] = gone[i] || ids[i] == json_integer_value(id);
		*dropped = counts[1];
		recheck_counted(pl, counts, &by, "claimed rows the server's rules or a user's block now refuse dropped");
	}
	json_decref(list);
	return rc;
}

/* An INFO line of a sweep's three counts, named k0, k1, k2. */
static void log_counts(const char *msg, const char *k0, const char *k1, const char *k2, const long n[3])
{
	char a[24], b[24], d[24];
	snprintf(a, sizeof(a), "%ld", n[0]);
	snprintf(b, sizeof(b), "%ld", n[1]);
	snprintf(d, sizeof(d), "%ld", n[2]);
	LOG_KV(CW_LOG_INFO, msg, k0, a, k1, b, k2, d);
}

/* A sweep's released, dropped and expired held messages, logged (msg)
 * and added to the thread's counts, and the dispatchers NOTIFYed of the
 * rows released (the sweeps of the policy thread's connection do not
 * NOTIFY themselves): the periodic sweep's and a release's batch's,
 * where the sixty-second and sixty-third sessions wrote these lines at
 * each.  Nothing when all are 0. */
static void sweep_counted(struct policy_live *pl, const char *msg, const long counts[3])
{
	if (!counts[0] && !counts[1] && !counts[2])
		return;
	log_counts(msg, "released", "dropped", "expired", counts);
	pthread_mutex_lock(&pl->mu);
	pl->st.released += (uint64_t)counts[0];
	pl->st.dropped += (uint64_t)counts[1];
	pl->st.expired += (uint64_t)counts[2];
	pthread_mutex_unlock(&pl->mu);
	cw_errmsg e;
	if (counts[0] && store_exec(pl->c, "NOTIFY causeway_outbox", &e))
		LOG_KV(CW_LOG_WARN, "cannot notify the dispatchers", "detail", e.msg);
}

/* The local users who have held rows a consent of theirs (or their
 * writing in the row's group) now lets through, whenever it was made
 * (releasable_sql's test without its window): sweep_due_all's.  Asked of
 * each user, sender and room of the held rows once (o, e: WROTE_IN_GROUP
 * reads their columns), not of each row: a probe of her consents for each
 * of 20,000 held rows took 1.0-1.4 s at a start. */
static const char release_due_sql[] =
	"SELECT DISTINCT o.target_identity_id FROM (SELECT DISTINCT h.target_identity_id, h.room_id, x.sender_id "
	" FROM outbox h JOIN events x ON x.id = h.event_id WHERE h.state = 'held' "
	" AND h.created_at >= now() - make_interval(secs => $1::bigint)) o "
	"CROSS JOIN LATERAL (SELECT o.sender_id) e JOIN identities s ON s.id = e.sender_id "
	"WHERE (" WROTE_IN_GROUP " OR EXISTS (SELECT 1 FROM consents c WHERE c.local_identity_id = o.target_identity_id "
	" AND c.state = 'allowed' AND ((c.subject_kind = 'user' AND c.subject = s.uri) "
	"  OR (c.subject_kind = 'domain' AND c.subject = s.domain)))) "
	"AND NOT " BLOCKED_SENDER("o.target_identity_id");

/* The first sweep turn on a connection (the process's start, or a new
 * connection after the database was away) queues every user with held
 * rows a consent now lets through, whatever the age of the consent, for
 * release_turn to release each one's as her consent's own sweep does
 * (SWEEP_BATCH a transaction, in id order).  The periodic sweep finds a
 * user's held rows only while her consent is of the last minutes
 * (SWEPT_HELD: policy_view.lately_s), and a release is in batches since
 * the sixty-second session: a daemon stopped (or away from the database)
 * after a consent's first batch and started again after that window left
 * the rest held until the expiry took them, though she had consented
 * (test_a_release_interrupted_by_a_stop_is_finished_at_the_next_start,
 * docs/policy.md, "Consent and the sweep").  Its read, once a
 * connection: every held row not expired, with the probes of her
 * consents (docs/performance.md, "Sixty-second session: the release's
 * three mends").  Until the sixty-third session this turn released every
 * batch of every user itself, with no reload of the rules in between,
 * and one user's failure ended it.  True when done (false: tried again
 * at the next turn). */
static bool sweep_due_all(struct policy_live *pl)
{
	cw_errmsg e;
	struct policy_view *v = policy_live_get(pl);
	char secs[24];
	snprintf(secs, sizeof(secs), "%lld", (long long)v->set.held_expiry_s);
	policy_view_put(v);
	const char *params[] = { secs };
	PGresult *r = PQexecParams(pl->c, release_due_sql, 1, NULL, params, NULL, NULL, 0);
	bool ok = !store_check(pl->c, r, PGRES_TUPLES_OK, &e); /* r cleared when not */
	if (!ok) {
		LOG_KV(CW_LOG_WARN, "policy cannot read the held messages due at start", "detail", e.msg);
		return false;
	}
	for (int i = 0; ok && i < PQntuples(r); i++)
		ok = release_add(pl, atoll(PQgetvalue(r, i, 0)), 0, INT64_MAX);
	PQclear(r);
	if (!ok)
		LOG_KV(CW_LOG_WARN, "policy cannot queue the held messages due at start", "detail", "out of memory");
	return ok;
}

/* The most times a user's release goes again from the first batch that
 * left rows locked by another transaction (struct release_due), a second
 * apart; then those rows are the periodic sweep's (while her consent is
 * of the last minutes) or the next start's pass's. */
#define RELEASE_ROUNDS 3

/* One batch of a queued release (pl->releasing), the next user's in turn
 * whose retry is due: her held rows after the last of her batch before
 * (sweep's after: releasable_next_sql, sweep_next_sql), so that a batch
 * reads its own rows and not all those she still has held.  One batch a
 * turn of the thread, so that reloads, syncs and the other users'
 * releases go on in between; a batch that fails is tried again 1 s
 * later, then 2, 4, ... POLICY_RETRY_MAX_S (logged when the wait
 * changes), the others' going on meanwhile: until the sixty-third
 * session's mend it was every second for as long as it failed, a WARN
 * each.  Her release goes on while a batch is whole, and after the last
 * goes again (a second later) from the first batch that left rows locked
 * by another transaction (SKIP LOCKED: fewer decided than found), up to
 * RELEASE_ROUNDS times: until that mend such a row was passed over, and
 * with a consent older than the periodic sweep's window nothing found it
 * before the next start.  Until the sixty-third session the periodic
 * sweep released the later batches (a consent's NOTIFY had it run at
 * once, and again while it found a whole batch) and the start's pass all
 * of them in one turn.  True when a batch ran (the thread's next turn
 * comes at once while a user waits). */
static bool release_turn(struct policy_live *pl, int64_t now)
{
	size_t n = pl->nreleasing, i = 0;
	while (i < n && pl->releasing[(pl->releasing_next + i) % n].retry_at > now)
		i++;
	if (i == n)
		return false;
	size_t k = (pl->releasing_next + i) % n;
	struct release_due *u = &pl->releasing[k];
	char user[24], after[24], until[24];
	snprintf(user, sizeof(user), "%lld", (long long)u->user);
	snprintf(after, sizeof(after), "%lld", (long long)u->after);
	snprintf(until, sizeof(until), "%lld", (long long)u->until);
	struct policy_view *v = policy_live_get(pl);
	long counts[3], later, skipped;
	bool more;
	int64_t last;
	cw_errmsg e;
	cw_err rc = sweep(pl->c, false, v, user, after, until, counts, NULL, NULL, false, &more, &later, &last,
			  &skipped, &e);
	policy_view_put(v);
	pl->releasing_next = k + 1;
	if (rc) {
		int64_t was = u->backoff_us;
		u->backoff_us = store_backoff_next(was, 1000000, POLICY_RETRY_MAX_S * 1000000LL);
		if (u->backoff_us != was) {
			char wait[24];
			snprintf(wait, sizeof(wait), "%lld", (long long)(u->backoff_us / 1000000));
			LOG_KV(CW_LOG_WARN, "policy sweep failed", "user", user, "detail", e.msg, "retry_s", wait);
		}
		u->retry_at = now + u->backoff_us;
		return true;
	}
	u->backoff_us = 0;
	sweep_counted(pl, "held messages released", counts);
	/* rows found to release that were neither released nor dropped by a
	 * rule: skipped, locked by another transaction */
	if (skipped > 0 && (u->skipped_after < 0 || u->after < u->skipped_after))
		u->skipped_after = u->after;
	if (more) {
		u->after = last;
		u->retry_at = 0;
	} else if (u->skipped_after >= 0 && u->rounds < RELEASE_ROUNDS) {
		u->after = u->skipped_after;
		u->skipped_after = -1;
		u->rounds++;
		u->retry_at = now + 1000000;
	} else {
		if (u->skipped_after >= 0)
			LOG_KV(CW_LOG_INFO, "held messages locked by another transaction left to the periodic sweep",
			       "user", user);
		pl->releasing[k] = pl->releasing[--pl->nreleasing];
		pl->releasing_next = k;
	}
	return true;
}

static void *live_main(void *arg)
{
	cw_thread_name("cw-policy");
	struct policy_live *pl = arg;
	int64_t next_reload = cw_now_us() + pl->o.reload_interval_s * 1000000LL;
	int64_t next_sweep = cw_now_us();
	int64_t next_retention = cw_now_us();
	/* Its connects' pace while the database is away: as every thread's
	 * own connection's, 250 ms doubling to database.reconnect_max_ms
	 * (until the forty-ninth session 100 ms doubling to 5 s, whatever
	 * that said). */
	struct store_backoff reconnect = { 0, 0 };
	int64_t retry_us = 0; /* after a failed reload: the wait before the next try, doubled each time */
	int64_t held_wait = 0; /* when the periodic sweep of the held rows came due while a release ran (0: not) */
	while (!atomic_load(&pl->stop)) {
		bool fresh = false, want = false;
		if (!ensure_conn(pl, &fresh)) {
			/* Woken by a stop.  The pipe emptied: a poke (a sync) left
			 * in it made every poll return at once, and the thread
			 * tried to connect without a pause until the database was
			 * back (until the forty-ninth session); the poke itself is
			 * pl->poked, and the new connection reloads everything. */
			store_sleep_fd(pl->wake[0], (int)store_backoff_failed(&reconnect, pl->o.reconnect_max_ms));
			continue;
		}
		store_backoff_reset(&reconnect);
		/* A poke (a change of this process: sync) or a new connection
		 * (changes may have been missed) reloads everything, and so does
		 * a change of anything but some users' facts; those alone load
		 * an overlay of these users (policy_load_users). */
		want = fresh || atomic_exchange(&pl->poked, false);
		/* The syncs this turn answers (serving), and what they need
		 * loaded (owe_*): a sync whose change the view in force has
		 * read (its NOTIFY's load, heard first) needs nothing. */
		pthread_mutex_lock(&pl->mu);
		uint64_t serving = pl->requested;
		if (pl->asked_all)
			pl->want_full = pl->owe_whole = true;
		for (size_t i = 0; i < pl->nasked; i++) {
			int64_t id = pl->asked[i].id;
			if (view_has(pl->cur, pl->asked[i].xid, &id, id > 0))
				continue;
			if (id > 0) {
				add_pending(pl, id);
				pl->owe_users = true;
			} else {
				pl->want_full = pl->owe_whole = true;
			}
		}
		pl->nasked = 0;
		pl->asked_all = false;
		pthread_mutex_unlock(&pl->mu);
		store_notifies(pl->c, heard, pl);
		recheck_users_add(pl, pl->pending, pl->npending);
		int64_t now = cw_now_us();
		bool users = pl->npending > 0 && !want && !pl->want_full && now < next_reload && reload_users(pl);
		bool loaded = users, whole = false;
		if (!users && (want || pl->want_full || pl->npending || now >= next_reload)) {
			bool hook_ok;
			loaded = whole = reload(pl, &hook_ok);
			/* A whole load that failed (a query the database
			 * refuses) took the users heard this turn with it:
			 * until the forty-fifth session their new facts (a
			 * block) waited for the whole load to succeed, and
			 * this process kept writing rows to a user who had
			 * blocked their sender (rZ's finding).  Their overlay
			 * is loaded over the view in force all the same. */
			if (!loaded && pl->npending && !pl->want_full)
				users = reload_users(pl);
			/* Failed: soon, then less and less often (1 s, 2, 4, ... 30),
			 * so that a failure that lasts (a rule row it cannot read)
			 * does not load the database with a whole load a second;
			 * until the fortieth session it was every second, and
			 * nothing but the log and a counter told.  The hook's
			 * failure alike (reload). */
			bool again = !loaded || !hook_ok;
			retry_us = !again ? 0 : store_backoff_next(retry_us, 1000000, POLICY_RETRY_MAX_S * 1000000LL);
			next_reload = now + (again ? retry_us : pl->o.reload_interval_s * 1000000LL);
			if (loaded) {
				/* Just past the first expiry of a rule with a mode
				 * (mode_rule_expiry_in_ms): its reload finds the
				 * rule gone, and the changed fingerprint decides
				 * the waiting rows again. */
				struct policy_view *v = policy_live_get(pl);
				int64_t in = v->set.mode_rule_expiry_in_ms;
				policy_view_put(v);
				if (in > 0 && now + (in + 100) * 1000LL < next_reload)
					next_reload = now + (in + 100) * 1000LL;
			}
		}
		pl->npending = 0;
		pl->want_full = false;
		pthread_mutex_lock(&pl->mu);
		/* The syncs are answered once what they need is loaded: a
		 * whole load for one of everything, a whole load or an overlay
		 * for some users' (the users of a failed load are in the
		 * whole one retried); nothing for those the view in force had. */
		if (whole)
			pl->owe_whole = pl->owe_users = false;
		else if (users)
			pl->owe_users = false;
		if (!pl->owe_whole && !pl->owe_users && serving > pl->done)
			pl->done = serving;
		pthread_cond_broadcast(&pl->loaded);
		pthread_mutex_unlock(&pl->mu);
		if (pl->sweep_asked) {
			pl->sweep_asked = false;
			next_sweep = now;
		}
		if (pl->sweep_due && now >= next_sweep)
			pl->sweep_due = !sweep_due_all(pl);
		bool releasing = pl->nreleasing && !atomic_load(&pl->stop) && release_turn(pl, now);
		/* The periodic sweep of the held rows waits while a release
		 * ran a batch this turn, from when it was due (held_wait) for
		 * SWEEP_WAIT_RELEASES_US at most, and runs at the first turn
		 * without one; the expiry of messages and of consent requests
		 * does not wait (until the sixty-third session's mend both
		 * waited with it, up to 30 s, where interop-api.md promises a
		 * message's expiry within about two seconds). */
		bool due = now >= next_sweep;
		if (due && releasing && !held_wait)
			held_wait = now;
		bool held_now = held_wait ? !releasing || now >= held_wait + SWEEP_WAIT_RELEASES_US : due;
		bool held_more = false;
		if (due || held_now) {
			cw_errmsg e;
			if (pl->grown_known != GROWN_ALL)
				analyze_grown(pl);
			if (held_now) {
				struct policy_view *v = policy_live_get(pl);
				long counts[3], later, skipped;
				int64_t t0 = cw_now_us();
				int64_t last;
				held_wait = 0;
				cw_err src = sweep(pl->c, true, v, NULL, NULL, NULL, counts, NULL, NULL, false,
						   &held_more, &later, &last, &skipped, &e);
				int64_t took = cw_now_us() - t0;
				if (src) {
					LOG_KV(CW_LOG_WARN, "policy sweep failed", "detail", e.msg);
				} else {
					sweep_counted(pl, "held messages swept", counts);
				}
				policy_view_put(v);
				if (took >= SWEEP_REPLAN_US && PQstatus(pl->c) == CONNECTION_OK)
					replan_sweep(pl, took);
				pl->sweep_slow = took >= SWEEP_REPLAN_US;
				/* a whole batch released: the next at the next
				 * turn; not when it decided nothing (its rows locked
				 * by another transaction: no turn after turn until
				 * that one ends), nor while a release runs its
				 * batches (its own rows are among these) */
				held_more = !src && held_more && counts[0] + counts[1] + counts[2] > 0 && !releasing;
			} else if (due) { /* the requests' expiry, which the sweep's statement does (SWEEP_SQL) */
				PGresult *r = PQexec(pl->c, requests_expire_sql);
				if (store_check(pl->c, r, PGRES_TUPLES_OK, &e)) /* r cleared when not */
					LOG_KV(CW_LOG_WARN, "consent requests' expiry failed", "detail", e.msg);
				else
					PQclear(r);
			}
		}
		if (due) {
			cw_errmsg e;
			long ex[3];
			if (expiry_sweep(pl->c, ex, &e)) {
				LOG_KV(CW_LOG_WARN, "expiring messages sweep failed", "detail", e.msg);
			} else if (ex[0]) {
				log_counts("expired messages taken back", "messages", "deletes", "undelivered", ex);
				if (ex[1] && store_exec(pl->c, "NOTIFY causeway_outbox", &e))
					LOG_KV(CW_LOG_WARN, "cannot notify the dispatchers", "detail", e.msg);
			}
			next_sweep = now + pl->o.sweep_interval_ms * 1000LL;
		}
		if (held_more)
			next_sweep = now;
		/* Its own cadence: old data waits a minute more at no cost.  A
		 * full batch means a backlog (the first run after an upgrade, a
		 * setting lowered): it runs again a second later, a batch a
		 * second, so that months of backlog do not keep a backend busy
		 * for minutes on end; reloads and sweeps get their turns in
		 * between. */
		if (pl->o.retention && now >= next_retention) {
			long rt[RETENTION_KINDS];
			bool failed[RETENTION_KINDS];
			cw_errmsg e;
			bool more, any = false;
			/* each failed kind is logged by the sweep; the others counted */
			struct policy_view *rv = policy_live_get(pl);
			pl->retention.consent_window_s = rv->set.consent_window_s;
			pl->retention.report_window_s = rv->set.report_window_s;
			policy_view_put(rv);
			retention_sweep(pl->c, pl->o.retention, &pl->retention, rt, failed, &e);
			more = pl->retention.again;
			char n[RETENTION_KINDS][24];
			pthread_mutex_lock(&pl->mu);
			for (int i = 0; i < RETENTION_KINDS; i++) {
				snprintf(n[i], sizeof(n[i]), "%ld", rt[i]);
				any = any || rt[i];
				more = more || rt[i] >= RETENTION_BATCH;
				pl->st.retention_removed[i] += (uint64_t)rt[i];
				pl->st.retention_failures[i] += failed[i];
			}
			pthread_mutex_unlock(&pl->mu);
			if (any)
				LOG_KV(CW_LOG_INFO, "old data removed", "contents_erased", n[0],
				       "idempotency_keys", n[1], "delivery_attempts", n[2],
				       "events_deleted", n[3], "audit_records", n[4], "identities_forgotten", n[5],
				       "media_records", n[6], "reports", n[7], "consent_requests", n[8]);
			next_retention = now + (more ? 1000000LL : pl->o.retention->retention_interval_s * 1000000LL);
		}
		bool recheck_more = recheck_turn(pl);
		int64_t until = next_sweep < next_reload ? next_sweep : next_reload;
		if (pl->o.retention && next_retention < until)
			until = next_retention;
		for (size_t i = 0; i < pl->nreleasing; i++) /* a release's batch that failed, or goes again */
			if (pl->releasing[i].retry_at < until)
				until = pl->releasing[i].retry_at;
		int timeout = (int)((until - cw_now_us()) / 1000);
		if (pl->npending || pl->want_full || recheck_more || releasing)
			timeout = 0; /* heard during the sweep; or more rows to decide again, or to release */
		if (timeout < 0)
			timeout = 0;
		if (timeout > 1000)
			timeout = 1000;
		/* A change notified while the reload or the sweep ran is in
		 * libpq's queue, not on the socket: it is taken here, and the
		 * next turn reloads at once. */
		store_wait_notify(pl->c, pl->wake[0], timeout, heard, pl);
		char buf[64];
		while (read(pl->wake[0], buf, sizeof(buf)) > 0)
			;
	}
	store_canceller_set(&pl->cancel, NULL);
	PQfinish(pl->c);
	pl->c = NULL;
	return NULL;
}

cw_err policy_live_start(struct policy_live **out, const struct policy_live_opts *o, cw_errmsg *e)
{
	struct policy_live *pl = calloc(1, sizeof(*pl));
	if (!pl) {
		PQfinish(o->conn);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	pl->o = *o;
	pl->o.conn = NULL;
	pl->c = o->conn; /* policy_live_free finishes it */
	pl->url = strdup(o->url);
	pthread_mutex_init(&pl->mu, NULL);
	pthread_cond_init(&pl->loaded, NULL);
	store_canceller_init(&pl->cancel);
	pl->wake[0] = pl->wake[1] = -1;
	pl->recheck_state = RECHECK_STATES;
	atomic_init(&pl->changes, 1); /* the start's pass is due */
	atomic_init(&pl->settled, 0);
	atomic_init(&pl->facts, 0);
	if (!pl->url || pipe2(pl->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
		policy_live_free(pl);
		return cw_fail(e, CW_ENOMEM, "out of resources");
	}
	if (!pl->c)
		pl->c = store_connect(pl->url, o->statement_timeout_ms, e);
	/* Listening before the load: a change committed after the load's
	 * snapshot is heard.  The sweep's statements are prepared here too,
	 * before the daemon's "ready" (10-20 ms of a start on a loaded
	 * machine, the server's parse analysis): the fifty-eighth session
	 * left them to the thread, whose first sweep then came after a
	 * test's set-up made just after "ready" and read what the test
	 * counted (test_peer_api.py's claim test, in a CI run); a first
	 * sweep that comes at once is what operators and tests had. */
	const char *failed = NULL;
	pl->sweep_due = true;
	if (!pl->c || !conn_ready(pl->c, lately_s_of(pl->o.reload_interval_s), &failed, e)) {
		/* The start's one line of it, as store_prepare_all's before the
		 * fifty-ninth session; the daemon's "cannot load the policy"
		 * follows. */
		if (failed)
			LOG_KV(CW_LOG_ERROR, "cannot prepare a statement", "statement", failed, "detail", e->msg);
		policy_live_free(pl);
		return CW_EUNAVAIL;
	}
	struct policy_view *v;
	cw_err rc = policy_load(pl->c, ++pl->version, NULL, lately_s_of(pl->o.reload_interval_s), &v, e);
	if (rc) {
		policy_live_free(pl);
		return rc;
	}
	swap_in(pl, v);
	store_canceller_set(&pl->cancel, pl->c);
	if (!cw_thread_start(&pl->thread, live_main, pl)) {
		policy_live_free(pl);
		return cw_fail(e, CW_ENOMEM, "cannot start the policy thread");
	}
	pl->started = true;
	*out = pl;
	return CW_OK;
}

void policy_live_stop(struct policy_live *pl)
{
	if (!pl || !pl->started)
		return;
	atomic_store(&pl->stop, true);
	policy_live_poke(pl);
	/* a sweep blocked in the database (a lock) is cancelled after 2 s */
	struct timespec grace;
	store_grace(&grace, 2000);
	store_join_cancelling(pl->thread, &pl->cancel, &grace);
	pl->started = false;
	pthread_mutex_lock(&pl->mu); /* whoever waits for a load waits no more */
	pthread_cond_broadcast(&pl->loaded);
	pthread_mutex_unlock(&pl->mu);
}

void policy_live_free(struct policy_live *pl)
{
	if (!pl)
		return;
	policy_live_stop(pl);
	store_canceller_destroy(&pl->cancel);
	PQfinish(pl->c);
	policy_view_put(pl->cur);
	if (pl->wake[0] >= 0)
		close(pl->wake[0]);
	if (pl->wake[1] >= 0)
		close(pl->wake[1]);
	pthread_mutex_destroy(&pl->mu);
	pthread_cond_destroy(&pl->loaded);
	free(pl->releasing);
	free(pl->url);
	free(pl);
}

cw_err policy_live_optin_state(struct policy_live *pl, PGconn *c, const char *local_id, const char *network,
			       int *state, cw_errmsg *e)
{
	const char *p[] = { local_id, network };
	PGresult *r = PQexecParams(c, "SELECT opted_in FROM user_optin WHERE identity_id = $1::bigint AND network = $2",
				   2, NULL, p, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 1) {
		*state = PQgetvalue(r, 0, 0)[0] == 't' ? 1 : -1;
	} else {
		struct policy_view *v = policy_live_get(pl);
		*state = policy_optin_default(v->snap) ? 1 : 0;
		policy_view_put(v);
	}
	PQclear(r);
	return CW_OK;
}
