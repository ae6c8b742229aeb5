/* /admin/v1 views (see admin_views.h): rooms, adapters, the configuration
 * in force and the last hour's statistics; and the one change to a room,
 * removing remote members.
 *
 * The database views run one statement each on a store reader and build
 * their JSON answer in PostgreSQL; the configuration needs no database and
 * is answered at once.  Times are RFC 3339 in UTC whatever the session's
 * TimeZone, so they are formatted here rather than left to json_build_object. */
#include "config.h"
#include "admin_views.h"
#include "admin_auth.h"
#include "app.h"
#include "conf.h"
#include "dispatcher.h"
#include "event.h"
#include "matrix/matrix.h"
#include "peer_api.h"
#include "peers.h"
#include "xmpp/xmpp.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* "The last hour" of GET /admin/v1/stats. */
#define STATS_WINDOW_S 3600
/* The statistics scan an hour of the two biggest tables: one answer serves
 * every console (and causewayctl) asking within this time, so that open
 * dashboards do not keep the store's readers busy. */
#define STATS_CACHE_US (5 * 1000000LL)

/* A request for the statistics waiting for the one computing them. */
struct stats_waiter {
	struct cw_req *req;
	struct stats_waiter *next;
};

struct admin_views {
	pthread_mutex_t mu;
	char *stats;        /* the last statistics, as JSON text */
	int64_t stats_us;   /* when they were computed */
	bool computing;     /* a request's statement is on its way: the others wait for it */
	struct stats_waiter *waiters;
};

struct admin_views *admin_views_new(void)
{
	struct admin_views *av = calloc(1, sizeof(*av));
	if (av)
		pthread_mutex_init(&av->mu, NULL);
	return av;
}

void admin_views_free(struct admin_views *av)
{
	if (!av)
		return;
	pthread_mutex_destroy(&av->mu);
	free(av->stats);
	free(av);
}

/* ------------------------------------------------------- one-statement views */

#define VIEW_PARAMS 3
#define VIEW_PARAM_MAX 160

/* A statement returning one row with the answer as JSON text; no row (or
 * NULL) is a 404 saying "no <what> with that id". */
struct view {
	const char *sql;
	int n;
	char p[VIEW_PARAMS][VIEW_PARAM_MAX];
	const char *what;
	bool adapters; /* add what the process knows: dispatcher, Matrix, XMPP */
	bool cache;    /* keep the answer as the statistics of the moment, and answer the waiters */
	struct cw_app *app;     /* with cache */
	int64_t t0_us;          /* with cache: when the statement was asked for */
};

static struct view *view_new(const char *sql, const char *what)
{
	struct view *v = calloc(1, sizeof(*v));
	if (v) {
		v->sql = sql;
		v->what = what;
	}
	return v;
}

static void view_param(struct view *v, const char *s)
{
	if (v && v->n < VIEW_PARAMS)
		snprintf(v->p[v->n++], VIEW_PARAM_MAX, "%s", s);
}

static void view_num(struct view *v, long long n)
{
	char b[24];
	snprintf(b, sizeof(b), "%lld", n);
	view_param(v, b);
}

/* The process's own part of GET /admin/v1/adapters.  The counters are this
 * process's since it started (as in /metrics), not the cluster's. */
static void adapters_add_process(struct cw_app *app, json_t *body)
{
	json_t *d;
	if (app->dispatcher) {
		struct dispatcher_stats st;
		dispatcher_get_stats(app->dispatcher, &st);
		d = json_pack("{s:s, s:I, s:I, s:I, s:I, s:I, s:I}", "status",
			      dispatcher_stopping(app->dispatcher) ? "stopping" : "up",
			      "delivered", (json_int_t)st.delivered, "retried", (json_int_t)st.retried,
			      "dead", (json_int_t)st.dead, "requests_ok", (json_int_t)st.requests_ok,
			      "requests_failed", (json_int_t)st.requests_failed, "claims", (json_int_t)st.claims);
	} else {
		d = json_pack("{s:s}", "status", "off");
	}
	json_object_set_new(body, "dispatcher", d);
	/* Both are safe from any thread (readyz calls them from a store callback). */
	if (app->matrix)
		json_object_set_new(body, "matrix", matrix_health(app->matrix));
	if (app->xmpp)
		json_object_set_new(body, "xmpp", xa_health(app->xmpp));
	json_t *pol = app_policy_health(app, false);
	if (pol)
		json_object_set_new(body, "policy", pol);
}

/* The most peer names push_url_problem_peers lists. */
#define PUSH_PROBLEM_NAMES 20

/* The push peers whose stored push_url nothing is pushed to (as GET
 * /admin/v1/peers' push_url_problem finds them, peer_url_check: one stored
 * before the admin API checked it), counted into the adapters' "peer" part
 * with the first PUSH_PROBLEM_NAMES of their names: their rows wait,
 * untried, and until the fifty-second session only `causewayctl peers`
 * said so, not `status`.  In C: the rule is peer_url_check's, not SQL. */
static cw_err adapters_add_push_problems(PGconn *c, json_t *body, cw_errmsg *e)
{
	PGresult *r = PQexec(c, "SELECT name, push_url FROM peers WHERE mode = 'push' AND push_url IS NOT NULL "
				"ORDER BY name");
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	json_t *names = json_array();
	json_int_t n = 0;
	for (int i = 0; i < PQntuples(r); i++) {
		cw_errmsg ue;
		if (peer_url_check(PQgetvalue(r, i, 1), &ue) == CW_OK)
			continue;
		if (n++ < PUSH_PROBLEM_NAMES)
			json_array_append_new(names, json_string(PQgetvalue(r, i, 0)));
	}
	PQclear(r);
	json_t *peer = json_object_get(body, "peer");
	if (!json_is_object(peer)) {
		json_decref(names);
		return cw_fail(e, CW_EINTERNAL, "the adapters' statement gave no peer part");
	}
	if (!names || json_object_set_new(peer, "push_url_problems", json_integer(n)) ||
	    json_object_set_new(peer, "push_url_problem_peers", names))
		return cw_fail(e, CW_ENOMEM, "out of memory");
	return CW_OK;
}

static cw_err view_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct view *v = j->data;
	const char *params[VIEW_PARAMS];
	for (int i = 0; i < v->n; i++)
		params[i] = v->p[i];
	PGresult *r = PQexecParams(c, v->sql, v->n, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 0 || PQgetisnull(r, 0, 0)) {
		PQclear(r);
		app_job_fail(j, 404, "not_found", "no %s with that id", v->what);
		return CW_OK;
	}
	j->body = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
	char *text = v->cache && j->body ? strdup(PQgetvalue(r, 0, 0)) : NULL;
	PQclear(r);
	if (!j->body)
		return cw_fail(e, CW_EINTERNAL, "the database gave an answer that is not JSON");
	struct admin_views *av = j->app->views;
	if (text && av) {
		pthread_mutex_lock(&av->mu);
		free(av->stats);
		av->stats = text;
		av->stats_us = cw_now_us();
		pthread_mutex_unlock(&av->mu);
	} else {
		free(text);
	}
	if (v->adapters) {
		rc = adapters_add_push_problems(c, j->body, e);
		if (rc)
			return rc;
		adapters_add_process(j->app, j->body);
	}
	return CW_OK;
}

/* Answers 503 itself when v is NULL (out of memory). */
static void view_run(struct cw_app *app, struct cw_req *req, struct view *v)
{
	app_job_run(app, req, view_fn, v, free, false);
}

/* ------------------------------------------------------------------ rooms */

/* A room of x, as listed (the members counted are those joined now). */
#define ROOM_FIELDS \
	"'id', x.public_id, 'row', x.id, 'uri', x.uri, 'kind', x.kind, 'name', x.name, " \
	"'created_at', " APP_SQL_TS("x.created_at") ", " \
	"'member_count', (SELECT count(*) FROM room_members m WHERE m.room_id = x.id AND m.membership = 'joined'), " \
	"'bindings', (SELECT coalesce(json_agg(json_build_object('network', b.network, 'native_id', b.native_id, " \
	" 'created_at', " APP_SQL_TS("b.created_at") ") ORDER BY b.network, b.id), '[]'::json) " \
	" FROM room_bindings b WHERE b.room_id = x.id)"

static const char ROOMS_SQL[] =
	"SELECT json_build_object('rooms', coalesce(json_agg(json_build_object(" ROOM_FIELDS ") ORDER BY x.id), "
	" '[]'::json), 'next_after', CASE WHEN count(*) = $2::int THEN max(x.id) END)::text "
	"FROM (SELECT * FROM rooms WHERE id > $1::bigint ORDER BY id LIMIT $2::int) x";

/* One room with a page of its members, whatever their membership (left
 * and banned too), and whether they are local (a user of this server, whom
 * the operator does not remove).  The members are paged as the lists are
 * (app_paging), by their identity's row ($2: after, $3: limit), through the
 * primary key (room_id, identity_id): a gatekeeper's group of thousands
 * answered them all in one page, and the console built a row for each. */
static const char ROOM_SQL[] =
	"SELECT json_build_object(" ROOM_FIELDS ", 'members', coalesce(p.members, '[]'::json), "
	" 'next_after', p.next_after)::text "
	"FROM rooms x CROSS JOIN LATERAL (SELECT json_agg(json_build_object('row', m.identity_id, 'uri', m.uri, "
	"  'role', m.role, 'membership', m.membership, 'local', m.is_local) ORDER BY m.identity_id) AS members, "
	"  CASE WHEN count(*) = $3::int THEN max(m.identity_id) END AS next_after "
	" FROM (SELECT m.identity_id, i.uri, m.role, m.membership, i.is_local FROM room_members m "
	"  JOIN identities i ON i.id = m.identity_id WHERE m.room_id = x.id AND m.identity_id > $2::bigint "
	"  ORDER BY m.identity_id LIMIT $3::int) m) p "
	"WHERE x.public_id = $1";

void admin_views_rooms_list(struct cw_req *req, void *ctx)
{
	long long after;
	long limit;
	if (!app_paging(req, &after, &limit))
		return;
	struct view *v = view_new(ROOMS_SQL, "room");
	view_num(v, after);
	view_num(v, limit);
	view_run(ctx, req, v);
}


void admin_views_room_get(struct cw_req *req, void *ctx)
{
	const char *id = cw_req_param(req, "id");
	if (!room_public_id_valid(id)) {
		cw_req_problem(req, 404, "not_found", "Not found", "no room with that id");
		return;
	}
	long long after;
	long limit;
	if (!app_paging(req, &after, &limit))
		return;
	struct view *v = view_new(ROOM_SQL, "room");
	view_param(v, id);
	view_num(v, after);
	view_num(v, limit);
	view_run(ctx, req, v);
}

/* POST /admin/v1/rooms/{id}/members {"remove": [user URIs]}: the
 * operator takes remote members out of a group, as their peer would
 * (docs/policy.md: the remedy when a deny of one member keeps a group's
 * messages from the others of that peer).  Local users leave through
 * their own client: their leave is more than the row (the adapter that
 * sees it sends the group's members, the peers included, a membership
 * event), and changing the row alone would leave them in a room the
 * group no longer writes to, the others not told.
 *
 * The peers are told as of a member's leaving (room_members_events). */
struct remove_input {
	char public_id[80];
	char actor[ADMIN_NAME_MAX + 8];
	size_t n;
	struct room_member_in m[ROOM_MEMBERS_MAX];
};

static cw_err members_remove_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct remove_input *in = j->data;
	const char *rp[] = { in->public_id };
	/* The room's lock for writing events (room_members_events) first. */
	cw_err rc = room_members_lock(c, in->public_id, e);
	if (rc)
		return rc;
	PGresult *r = PQexecParams(c, "SELECT id, kind FROM rooms WHERE public_id = $1 FOR UPDATE", 1, NULL, rp, NULL, NULL, 0);
	char room_id[24];
	rc = room_members_target(c, j, r, "not_found", "no room with that id", room_id, e);
	if (rc || j->err_code)
		return rc;
	/* Every one named is checked before anything changes: the request is
	 * done whole or not at all. */
	for (size_t i = 0; i < in->n; i++) {
		const char *mp[] = { room_id, in->m[i].uri };
		r = PQexecParams(c, "SELECT 1 FROM room_members m JOIN identities i ON i.id = m.identity_id "
				    "WHERE m.room_id = $1::bigint AND i.uri = $2 AND m.membership = 'joined'",
				 2, NULL, mp, NULL, NULL, 0);
		if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
			return rc;
		bool joined = PQntuples(r) > 0;
		PQclear(r);
		if (!joined) {
			app_job_fail(j, 400, "invalid_body", "%.160s is not a member of the room", in->m[i].uri);
			return CW_OK;
		}
	}
	/* Each removed member's leaving is told to every peer with members in
	 * the room, the removed users' own included, the member its sender
	 * (origin gateway: no peer sent it), by this provider (server.domain):
	 * the removed user's peer can tell it from the user's own leaving. */
	const struct room_members_change ch = { .room_id = room_id, .by = j->app->cfg->domain, .origin = "gateway" };
	if ((rc = room_members_remove(c, room_id, in->m, in->n, NULL, e)) ||
	    (rc = room_members_events(c, &ch, "leave", in->m, in->n, NULL, e)) ||
	    (rc = room_members_audit(c, in->actor, in->public_id, NULL, 0, in->m, in->n, e)))
		return rc;
	/* The answer is the room as GET /admin/v1/rooms/{id} shows it now
	 * (its first page of members: app_paging's default limit). */
	char limit[24];
	snprintf(limit, sizeof(limit), "%d", APP_PAGE_DEFAULT);
	const char *gp[] = { in->public_id, "0", limit };
	r = PQexecParams(c, ROOM_SQL, 3, NULL, gp, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	j->body = PQntuples(r) == 1 ? json_loads(PQgetvalue(r, 0, 0), 0, NULL) : NULL;
	PQclear(r);
	return j->body ? CW_OK : cw_fail(e, CW_EINTERNAL, "the database gave an answer that is not JSON");
}

void admin_views_room_members(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	const char *id = cw_req_param(req, "id");
	if (!room_public_id_valid(id)) {
		cw_req_problem(req, 404, "not_found", "Not found", "no room with that id");
		return;
	}
	json_t *body = app_json_body(req);
	if (!body)
		return;
	static const char *const known[] = { "remove", NULL };
	struct remove_input *in = NULL;
	if (!app_json_only_known(req, body, known))
		goto out;
	in = calloc(1, sizeof(*in));
	if (!in) {
		app_job_run(app, req, members_remove_fn, NULL, NULL, true); /* answers 503 */
		goto out;
	}
	json_t *remove = json_object_get(body, "remove");
	if (!peer_read_users(app, req, remove, "remove", in->m, &in->n))
		goto out;
	if (in->n == 0) {
		char d[96];
		snprintf(d, sizeof(d), "remove must name 1 to %d user URIs", ROOM_MEMBERS_MAX);
		cw_req_problem(req, 400, "invalid_body", "Invalid body", d);
		goto out;
	}
	for (size_t i = 0; i < in->n; i++)
		if (app_domain_is_ours(app, in->m[i].u.domain)) {
			char d[MIMI_URI_MAX + 96];
			snprintf(d, sizeof(d), "%s is a user of this server: local users leave through their own client",
				 in->m[i].uri);
			cw_req_problem(req, 400, "invalid_body", "Invalid body", d);
			goto out;
		}
	snprintf(in->public_id, sizeof(in->public_id), "%s", id);
	snprintf(in->actor, sizeof(in->actor), "%s", admin_actor(req));
	app_job_run(app, req, members_remove_fn, in, free, true);
	in = NULL;
out:
	free(in);
	json_decref(body);
}

/* --------------------------------------------------------------- adapters */

/* The peers from the table (the registry of this process may lag a change
 * by its reload); their queue from the outbox (outbox_state_dest_idx). */
static const char ADAPTERS_SQL[] =
	"SELECT json_build_object('peer', json_build_object("
	" 'peers', (SELECT count(*) FROM peers), "
	" 'enabled', (SELECT count(*) FROM peers WHERE enabled), "
	" 'pending', (SELECT count(*) FROM outbox WHERE state = 'pending' AND destination LIKE 'peer:%'), "
	" 'dead', (SELECT count(*) FROM outbox WHERE state = 'dead' AND destination LIKE 'peer:%')))::text";

void admin_views_adapters(struct cw_req *req, void *ctx)
{
	struct view *v = view_new(ADAPTERS_SQL, "adapter");
	if (v)
		v->adapters = true;
	view_run(ctx, req, v);
}

/* ----------------------------------------------------------------- config */

/* The option's value as text, secrets masked, however long it is. */
static char *option_text(const struct cw_config *cfg, const struct cfg_option *o)
{
	for (size_t len = 1024; len <= (1u << 20); len *= 4) {
		char *b = malloc(len);
		if (!b)
			return NULL;
		cfg_value_text(cfg, o, true, b, len);
		if (strlen(b) < len - 1)
			return b;
		free(b);
	}
	return NULL;
}

/* Straight from the option table and the configuration in force; a secret
 * shows "********" when set and "" when not, its default likewise.
 * "pending": the value the file gave at the last reload to an option that
 * takes effect at a restart only, while it differs from the one in force
 * (null otherwise; until the fifty-first session only the log said so).
 * "changed": the value is not the default's, both written the same way
 * (the default as the table writes it may read otherwise: 1MiB for
 * 1048576; until the forty-ninth session the console compared those two
 * texts, and showed every size at its default as changed). */
void admin_views_config(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	json_t *options = json_array();
	bool ok = options != NULL;
	struct cw_config defaults;
	cfg_defaults(&defaults);
	for (size_t i = 0; ok && i < cfg_option_count; i++) {
		const struct cfg_option *o = &cfg_options[i];
		char *value = option_text(app->cfg, o), *dv = option_text(&defaults, o);
		char *pending = cfg_pending_text(app->cfg, o, true);
		const char *def = o->secret ? (*o->def ? "********" : "") : o->def;
		json_t *x = value && dv ? json_pack("{s:s, s:s, s:s, s:s, s:b, s:b, s:b, s:s, s:s?}", "section",
						    o->section, "name", o->name, "value", value, "default", def,
						    "changed", strcmp(value, dv) != 0, "reloadable", o->reloadable,
						    "secret", o->secret, "doc", o->doc, "pending", pending)
				  : NULL;
		free(value);
		free(dv);
		free(pending);
		ok = x && json_array_append_new(options, x) == 0;
	}
	cfg_free(&defaults);
	if (!ok) {
		json_decref(options);
		cw_req_no_memory(req);
		return;
	}
	cw_req_reply_json(req, 200, json_pack("{s:o}", "options", options));
}

/* ------------------------------------------------------------------ stats */

/* One statement over the window ($1 seconds):
 * - in: events by accepted_at (BRIN events_accepted_at_brin), by the
 *   adapter of their origin network (the part before ':': peer:gk -> peer);
 * - out: outbox rows delivered in the window (BRIN
 *   outbox_delivered_at_brin), by the adapter of their destination
 *   (peer:gk -> peer; xmpp, matrix and local are one each: an XMPP
 *   delivery's destination is xmpp, whatever its component); the same
 *   rows give the latency percentiles, so
 *   they are materialized (dl) rather than scanned twice;
 * - the queue now, by state (outbox_state_dest_idx: delivered rows, the
 *   bulk of the table, are not in it);
 * - policy decisions recorded in the audit log (audit_log_at_idx).
 * The rows are grouped by the whole network name and a minute from
 * date_bin (plain arithmetic, UTC-aligned); names are split only on the few
 * groups (a third cheaper than splitting every row). */
static const char STATS_SQL[] =
	"WITH dl AS MATERIALIZED (SELECT date_bin('1 minute', o.delivered_at, timestamptz 'epoch') AS m, "
	"   o.destination AS net, date_part('epoch', o.delivered_at - o.created_at) * 1000 AS ms FROM outbox o "
	"  WHERE o.state = 'delivered' AND o.delivered_at >= now() - make_interval(secs => $1::int)), "
	"tn AS (SELECT date_bin('1 minute', e.accepted_at, timestamptz 'epoch') AS m, e.origin_network AS net, "
	"   'in' AS direction, count(*) AS n "
	"  FROM events e WHERE e.accepted_at >= now() - make_interval(secs => $1::int) GROUP BY 1, 2 "
	" UNION ALL SELECT dl.m, dl.net, 'out', count(*) FROM dl GROUP BY 1, 2), "
	"tp AS (SELECT tn.m, split_part(tn.net, ':', 1) AS adapter, tn.direction, sum(tn.n)::bigint AS n FROM tn "
	"  GROUP BY 1, 2, 3) "
	"SELECT json_build_object('window_s', $1::int, 'now', " APP_SQL_TS("now()") ", "
	" 'throughput', (SELECT coalesce(json_agg(json_build_object("
	"   'minute', to_char(tp.m AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), 'adapter', tp.adapter, "
	"   'direction', tp.direction, 'count', tp.n) ORDER BY tp.m, tp.adapter, tp.direction), '[]'::json) FROM tp), "
	" 'totals', (SELECT coalesce(json_agg(json_build_object('adapter', t.adapter, 'direction', t.direction, "
	"   'count', t.n) ORDER BY t.adapter, t.direction), '[]'::json) "
	"  FROM (SELECT adapter, direction, sum(n)::bigint AS n FROM tp GROUP BY 1, 2) t), "
	" 'queue', (SELECT json_build_object('pending', count(*) FILTER (WHERE state = 'pending'), "
	"   'in_flight', count(*) FILTER (WHERE state = 'in_flight'), 'held', count(*) FILTER (WHERE state = 'held'), "
	"   'dead', count(*) FILTER (WHERE state = 'dead'), 'failed', count(*) FILTER (WHERE state = 'failed')) "
	"  FROM outbox WHERE state IN ('pending', 'in_flight', 'held', 'dead', 'failed')), "
	" 'latency_ms', (SELECT json_build_object('p50', round(p[1]::numeric, 1), 'p90', round(p[2]::numeric, 1), "
	"   'p99', round(p[3]::numeric, 1), 'count', n) "
	"  FROM (SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY dl.ms) AS p, count(*) AS n "
	"   FROM dl) l), "
	" 'decisions', (SELECT coalesce(json_agg(json_build_object('verdict', d.verdict, 'reason', d.reason, "
	"   'count', d.n) ORDER BY d.n DESC, d.verdict, d.reason), '[]'::json) "
	"  FROM (SELECT split_part(a.action, '.', 2) AS verdict, a.reason_code AS reason, count(*) AS n "
	"   FROM audit_log a WHERE a.at >= now() - make_interval(secs => $1::int) AND a.actor = 'policy' "
	"   AND a.action LIKE 'policy.%' GROUP BY 1, 2) d))::text";

/* The end of a statistics flight asked for at t0_us: the requests that
 * waited for it get the answer it stored, else a 503 to try again (the
 * failure itself, in its words, is the first request's answer: the
 * database away or too slow, the stop). */
static void stats_flight_end(struct cw_app *app, int64_t t0_us)
{
	struct admin_views *av = app->views;
	pthread_mutex_lock(&av->mu);
	struct stats_waiter *w = av->waiters;
	av->waiters = NULL;
	av->computing = false;
	bool stored = av->stats && av->stats_us >= t0_us;
	char *text = stored ? strdup(av->stats) : NULL;
	pthread_mutex_unlock(&av->mu);
	while (w) {
		struct stats_waiter *next = w->next;
		char *copy = text ? strdup(text) : NULL;
		if (copy) {
			cw_req_reply(w->req, 200, "application/json", copy, strlen(copy));
		} else if (stored) {
			cw_req_no_memory(w->req);
		} else {
			app_retry_after(w->req, app->cfg->db_retry_after_s * 1000);
			cw_req_problem(w->req, 503, "unavailable", "Service unavailable",
				       "the statistics could not be read; try again");
		}
		cw_req_resume(w->req);
		free(w);
		w = next;
	}
	free(text);
}

/* A statistics job's data_free: it ends the flight whatever the outcome. */
static void stats_view_free(void *arg)
{
	struct view *v = arg;
	stats_flight_end(v->app, v->t0_us);
	free(v);
}

/* Single flight: with no answer of the last STATS_CACHE_US, the first
 * request runs the statement and the others asking meanwhile wait for its
 * answer, never a staler copy (docs/admin-api.md): until the fiftieth
 * session N consoles opened at once ran N copies of the heaviest read. */
void admin_views_stats(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	struct admin_views *av = app->views;
	if (!av) {
		struct view *v = view_new(STATS_SQL, "statistics");
		view_num(v, STATS_WINDOW_S);
		view_run(ctx, req, v);
		return;
	}
	char *fresh = NULL;
	struct stats_waiter *w = NULL;
	pthread_mutex_lock(&av->mu);
	if (av->stats && cw_now_us() - av->stats_us < STATS_CACHE_US) {
		fresh = strdup(av->stats);
		if (!fresh) {
			pthread_mutex_unlock(&av->mu);
			cw_req_no_memory(req);
			return;
		}
	} else if (av->computing && (w = malloc(sizeof(*w)))) {
		*w = (struct stats_waiter){ .req = req, .next = av->waiters };
		av->waiters = w;
		cw_req_suspend(req); /* before the lock goes: the answer may come at once */
	}
	bool leader = !fresh && !w && !av->computing;
	if (leader)
		av->computing = true;
	pthread_mutex_unlock(&av->mu);
	if (fresh) {
		cw_req_reply(req, 200, "application/json", fresh, strlen(fresh));
		return;
	}
	if (w)
		return;
	if (!leader) { /* no memory to wait with */
		cw_req_no_memory(req);
		return;
	}
	struct view *v = view_new(STATS_SQL, "statistics");
	if (v) {
		v->cache = true;
		v->app = app;
		v->t0_us = cw_now_us();
		view_num(v, STATS_WINDOW_S);
		app_job_run(app, req, view_fn, v, stats_view_free, false);
		return;
	}
	stats_flight_end(app, INT64_MAX); /* no job: those who came to wait for it meanwhile try again */
	cw_req_no_memory(req);
}
