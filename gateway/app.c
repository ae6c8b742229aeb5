/* Health, readiness and metrics endpoints, and the route table. */
#include "config.h"
#include "app.h"
#include "workers.h"
#include "buf.h"
#include "log.h"
#include "dispatcher.h"
#include "httpsig.h"
#include "metrics.h"
#include "outbox_admin.h"
#include "peer_api.h"
#include "peer_media.h"
#include "peer_pull.h"
#include "peer_social.h"
#include "peers.h"
#include "matrix/matrix.h"
#include "xmpp/xmpp.h"
#include "policy_admin.h"
#include "policy_live.h"
#include "admin_auth.h"
#include "admin_views.h"
#include "console.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <strings.h>
#include <sys/resource.h>

#define METRICS_MAX_BYTES (4L << 20)

/* ------------------------------------------------------------------ openapi */

extern const char cw_openapi_json[];
extern const size_t cw_openapi_json_len;

extern const char cw_admin_openapi_json[];
extern const size_t cw_admin_openapi_json_len;

static void reply_static(struct cw_req *req, const char *doc, size_t len)
{
	char *copy = malloc(len);
	if (!copy) {
		cw_req_no_memory(req);
		return;
	}
	memcpy(copy, doc, len);
	cw_req_reply(req, 200, "application/json", copy, len);
}

static void h_openapi(struct cw_req *req, void *ctx)
{
	reply_static(req, cw_openapi_json, cw_openapi_json_len);
}

static void h_admin_openapi(struct cw_req *req, void *ctx)
{
	reply_static(req, cw_admin_openapi_json, cw_admin_openapi_json_len);
}

/* ------------------------------------------------------------------ healthz */

static void h_healthz(struct cw_req *req, void *ctx)
{
	cw_req_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

/* ------------------------------------------------------------ probe deadline */

/* /readyz and /metrics read the database, and a database that stopped
 * answering without closing anything (its host gone, a partition, a
 * SIGSTOP) holds that read, and the store's cancel of it, for a minute and
 * more: until the thirty-first session the probes waited as long, and a
 * prober saw a hung daemon rather than a database down.  A probe is now
 * answered by whichever comes first: the read's outcome, or its deadline
 * at database.request_timeout_ms (CW_ETIMEDOUT).  The deadlines are kept
 * by one timer thread for all the probes pending (struct app_probes; until
 * the fiftieth session a thread per probe, as many as a probe storm had
 * connections).  The read may still run at the deadline; the job is freed
 * once both the read and the timer have let go of it.  answer replies and
 * resumes the request (it must not read what the query fills unless rc is
 * CW_OK); release frees the job.  A probe counts in app->afters until it
 * is answered: the stop waits for it. */
struct probe {
	struct cw_app *app;
	void *job;
	store_fn query;
	store_done_fn answer;
	void (*release)(void *job);
	int64_t deadline_us;
	struct probe *prev, *next; /* on app_probes' list while listed */
	int refs;                  /* the read's callback, and the timer's (under app_probes.mu) */
	bool listed, answered;     /* under app_probes.mu */
};

/* The probes pending, in the order of their deadlines (each is
 * request_timeout_ms after its start, a setting read at start-up only:
 * the order they came in), and the thread that times them out, started
 * with the first probe and joined by app_probes_free. */
struct app_probes {
	pthread_mutex_t mu;
	pthread_cond_t cv; /* CLOCK_MONOTONIC: the thread waits on it */
	struct probe *head, *tail;
	bool started, stop;
	pthread_t thread;
};

static void probe_unlink(struct app_probes *ps, struct probe *p)
{
	*(p->prev ? &p->prev->next : &ps->head) = p->next;
	*(p->next ? &p->next->prev : &ps->tail) = p->prev;
	p->prev = p->next = NULL;
	p->listed = false;
}

static void probe_unref(struct probe *p)
{
	struct app_probes *ps = p->app->probes;
	pthread_mutex_lock(&ps->mu);
	bool last = --p->refs == 0;
	pthread_mutex_unlock(&ps->mu);
	if (!last)
		return;
	p->release(p->job);
	free(p);
}

/* The probe's outcome (the read's, or its deadline's): the first answers
 * it; the caller holds a reference, dropped here. */
static void probe_answer(struct probe *p, cw_err rc, const cw_errmsg *e)
{
	struct app_probes *ps = p->app->probes;
	pthread_mutex_lock(&ps->mu);
	bool first = !p->answered;
	p->answered = true;
	if (p->listed) { /* answered before its deadline: the timer lets go of it */
		probe_unlink(ps, p);
		p->refs--;
	}
	pthread_mutex_unlock(&ps->mu);
	if (first) {
		p->answer(p->job, rc, e);
		atomic_fetch_sub(&p->app->afters, 1);
	}
	probe_unref(p);
}

static cw_err probe_query(PGconn *c, void *arg, cw_errmsg *e)
{
	struct probe *p = arg;
	return p->query(c, p->job, e);
}

static void probe_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	probe_answer(arg, rc, e);
}

static void *probe_timer(void *arg)
{
	cw_thread_name("cw-probes");
	struct app_probes *ps = arg;
	pthread_mutex_lock(&ps->mu);
	while (!ps->stop) {
		struct probe *p = ps->head;
		if (!p) {
			pthread_cond_wait(&ps->cv, &ps->mu);
			continue;
		}
		if (p->deadline_us > cw_now_us()) {
			struct timespec until = { .tv_sec = p->deadline_us / 1000000,
						  .tv_nsec = (p->deadline_us % 1000000) * 1000 };
			pthread_cond_timedwait(&ps->cv, &ps->mu, &until);
			continue;
		}
		probe_unlink(ps, p); /* its listing's reference is the timer's now */
		pthread_mutex_unlock(&ps->mu);
		cw_errmsg e;
		cw_fail(&e, CW_ETIMEDOUT, "the database did not answer within database.request_timeout_ms");
		probe_answer(p, CW_ETIMEDOUT, &e);
		pthread_mutex_lock(&ps->mu);
	}
	pthread_mutex_unlock(&ps->mu);
	return NULL;
}

/* app->probes, made by the first probe (requests come on several threads). */
static struct app_probes *app_probes_get(struct cw_app *app)
{
	struct app_probes *ps = atomic_load(&app->probes);
	if (ps)
		return ps;
	ps = calloc(1, sizeof(*ps));
	if (!ps)
		return NULL;
	pthread_mutex_init(&ps->mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&ps->cv, &ca);
	pthread_condattr_destroy(&ca);
	struct app_probes *none = NULL;
	if (atomic_compare_exchange_strong(&app->probes, &none, ps))
		return ps;
	pthread_cond_destroy(&ps->cv);
	pthread_mutex_destroy(&ps->mu);
	free(ps);
	return none;
}

void app_probes_free(struct cw_app *app)
{
	struct app_probes *ps = atomic_exchange(&app->probes, NULL);
	if (!ps)
		return;
	pthread_mutex_lock(&ps->mu);
	ps->stop = true;
	pthread_cond_signal(&ps->cv);
	bool join = ps->started;
	pthread_mutex_unlock(&ps->mu);
	if (join)
		pthread_join(ps->thread, NULL);
	pthread_cond_destroy(&ps->cv);
	pthread_mutex_destroy(&ps->mu);
	free(ps);
}

/* Suspends req and runs query for job on a reader; answer is called once. */
static void probe_start(struct cw_app *app, struct cw_req *req, void *job, store_fn query, store_done_fn answer,
			void (*release)(void *job))
{
	cw_req_suspend(req);
	struct app_probes *ps = app_probes_get(app);
	struct probe *p = ps ? calloc(1, sizeof(*p)) : NULL;
	if (!p) {
		cw_errmsg e;
		cw_fail(&e, CW_ENOMEM, "out of memory");
		answer(job, CW_ENOMEM, &e);
		release(job);
		return;
	}
	*p = (struct probe){ .app = app, .job = job, .query = query, .answer = answer, .release = release, .refs = 1,
			     .deadline_us = cw_now_us() + (int64_t)app->cfg->db_request_timeout_ms * 1000 };
	atomic_fetch_add(&app->afters, 1);
	pthread_mutex_lock(&ps->mu);
	if (!ps->started) /* else the read's outcome alone (as before the thirty-first session), and the next tries again */
		ps->started = cw_thread_start(&ps->thread, probe_timer, ps);
	if (ps->started) {
		p->prev = ps->tail;
		*(ps->tail ? &ps->tail->next : &ps->head) = p;
		ps->tail = p;
		p->listed = true;
		p->refs = 2;
		if (ps->head == p) /* the list was empty: the thread waits for nothing */
			pthread_cond_signal(&ps->cv);
	}
	pthread_mutex_unlock(&ps->mu);
	cw_err rc = store_read(app->store, probe_query, probe_done, p);
	if (rc) {
		cw_errmsg e;
		cw_fail(&e, rc, "%s", cw_strerror(rc));
		probe_done(p, rc, &e);
	}
}

/* ------------------------------------------------------------------- readyz */

/* What /readyz, which needs no credentials, says of a read that failed:
 * never libpq's own text, which names the server's host, port, user and
 * database when a connection fails (the log's "database unreachable" has
 * it): an outage or a deadline in words of ours, else the server's error
 * about the read (a missing table, a permission refused), which the
 * operator acts on. */
static const char *readyz_failure(cw_err rc, const char *msg)
{
	if (rc == CW_EUNAVAIL)
		return "the database is unavailable (the log's \"database unreachable\" says why)";
	if (rc == CW_ETIMEDOUT)
		return "the database did not answer within database.request_timeout_ms";
	return msg && msg[0] ? msg : cw_strerror(rc);
}

/* A stale policy is reported, not a readiness condition: the process goes
 * on deciding with the rules it has (docs/operations.md, "A policy that
 * does not reload"), for a cause that lasts (a rule row the load cannot
 * read) is every process's, and a 503 would take them all out at once. */
json_t *app_policy_health(struct cw_app *app, bool in_public)
{
	if (!app->policy)
		return NULL;
	struct policy_live_stats ps;
	policy_live_get_stats(app->policy, &ps);
	int64_t behind_us = ps.stale_since_us ? cw_now_us() - ps.stale_since_us : 0;
	bool stale = behind_us >= POLICY_STALE_AFTER_S * 1000000LL;
	/* degraded: loaded, but a setting it could not read was replaced by
	 * the safe value (policy_settings.default_mode_unreadable) */
	bool degraded = !stale && ps.default_mode_unreadable;
	json_t *o = json_pack("{s:s, s:I, s:I}", "status", stale ? "stale" : degraded ? "degraded" : "current",
			      "version", (json_int_t)ps.version, "reload_failures", (json_int_t)ps.reload_failures);
	if (o && degraded) {
		char d[200];
		snprintf(d, sizeof(d), "policy.default_mode cannot be read (not open, allowlist or closed): %s, the "
				       "mode in force before it, stays until it is set again",
			 policy_mode_name((enum policy_mode)ps.default_mode_kept));
		json_object_set_new(o, "detail", json_string(d));
	}
	if (o && stale) {
		json_object_set_new(o, "stale_for_s", json_integer(behind_us / 1000000));
		const char *detail = ps.last_failure;
		if (in_public) /* libpq's words stay in the log (readyz_failure) */
			detail = ps.last_failure_rc == CW_EUNAVAIL
					 ? "the policy's database connection is unavailable (the log's \"policy cannot "
					   "connect\" or \"policy reload failed\" says why)"
					 : readyz_failure(ps.last_failure_rc, ps.last_failure);
		json_object_set_new(o, "detail", json_string(detail));
	}
	return o;
}

struct readyz_job {
	struct cw_app *app;
	struct cw_req *req;
	int applied;
	int matching; /* this build's migrations recorded with the same checksum */
	int unknown;  /* recorded migrations this build does not have, below its newest */
	json_t *newer; /* recorded versions above this build's newest: a newer build migrated */
	int64_t t0_us;
};

static cw_err readyz_query(PGconn *c, void *arg, cw_errmsg *e)
{
	struct readyz_job *j = arg;
	PGresult *r = PQexec(c, "SELECT version, checksum FROM schema_migrations ORDER BY version");
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	const struct migration_set *set = &j->app->migrations;
	int newest = set->n ? set->m[set->n - 1].version : 0; /* the set is sorted */
	j->applied = PQntuples(r);
	j->matching = 0;
	j->unknown = 0;
	json_decref(j->newer);
	j->newer = json_array();
	for (int i = 0; i < j->applied; i++) {
		int v = atoi(PQgetvalue(r, i, 0));
		size_t k = 0;
		while (k < set->n && set->m[k].version != v)
			k++;
		if (k < set->n)
			j->matching += strcmp(set->m[k].sha256, PQgetvalue(r, i, 1)) == 0;
		else if (v > newest)
			json_array_append_new(j->newer, json_integer(v));
		else
			j->unknown++;
	}
	PQclear(r);
	return CW_OK;
}

static void readyz_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct readyz_job *j = arg;
	const struct migration_set *set = &j->app->migrations;
	bool read = rc == CW_OK;
	/* And the store takes writes: a reader's connection may answer while
	 * the writer cannot connect (the server refusing new connections), and
	 * every write is refused then (503).  Until the forty-fourth session
	 * /readyz said ready meanwhile (and /metrics causeway_database_up 0). */
	struct store_stats st;
	store_get_stats(j->app->store, &st);
	bool db_up = read && st.db_up;
	/* Current: every migration of this build applied with the same checksum.
	 * Migrations of a newer build beyond them do not make it unready: the
	 * operator runs the newer build's --migrate before a rolling restart
	 * (docs/operations.md). Until the thirty-first session they did. */
	bool current = read && j->matching == (int)set->n && j->unknown == 0; /* read only when read (probe) */
	json_t *db = json_pack("{s:s, s:f}", "status", db_up ? "up" : "down", "latency_ms",
			       (double)((cw_now_us() - j->t0_us) / 10) / 100.0);
	if (!db_up)
		json_object_set_new(db, "detail", json_string(read ? "writes are refused: the database does not answer "
								     "the writer's connection (the log's \"database "
								     "unreachable\" says why)"
								   : readyz_failure(rc, e ? e->msg : NULL)));
	json_t *mig = json_pack("{s:s, s:i, s:i}", "status",
				!read ? "unknown" : current ? "current" : "not_current",
				"applied", read ? j->applied : 0, "expected", (int)set->n);
	if (read && j->newer && json_array_size(j->newer) > 0)
		json_object_set(mig, "newer", j->newer);
	json_t *adapters = json_object();
	if (j->app->matrix) /* reported, not a readiness condition: the homeserver may come later */
		json_object_set_new(adapters, "matrix", matrix_health(j->app->matrix));
	if (j->app->xmpp) /* reported, not a readiness condition: the XMPP server may come later */
		json_object_set_new(adapters, "xmpp", xa_health(j->app->xmpp));
	json_t *body = json_pack("{s:s, s:o, s:o, s:o}", "status", db_up && current ? "ready" : "not_ready",
				 "database", db, "migrations", mig, "adapters", adapters);
	json_t *pol = app_policy_health(j->app, true);
	if (body && pol)
		json_object_set_new(body, "policy", pol);
	else
		json_decref(pol);
	if (!(db_up && current))
		app_retry_after(j->req, j->app->cfg->db_retry_after_s * 1000);
	cw_req_reply_json(j->req, db_up && current ? 200 : 503, body);
	cw_req_resume(j->req);
}

static void readyz_release(void *arg)
{
	struct readyz_job *j = arg;
	json_decref(j->newer);
	free(j);
}

static void h_readyz(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	struct readyz_job *j = calloc(1, sizeof(*j));
	if (!j) {
		cw_req_no_memory(req);
		return;
	}
	j->app = app;
	j->req = req;
	j->t0_us = cw_now_us();
	probe_start(app, req, j, readyz_query, readyz_done, readyz_release);
}

/* ------------------------------------------------------------------ metrics */

/* The open states of the outbox gauge, as metrics_query counts them: one
 * list, which gives both the gauge's labels and the statement's IN list
 * (until the fifty-second session each spelled them, and a state added to
 * one and not the other would have been a gauge at 0 or a row counted
 * nowhere). */
#define OUTBOX_OPEN(X, SEP) X(pending) SEP X(held) SEP X(in_flight) SEP X(failed) SEP X(dead)
#define OUTBOX_NAME(s) #s
#define OUTBOX_SQL(s) "'" #s "'"
#define OUTBOX_COMMA ,
static const char *const outbox_states[] = { OUTBOX_OPEN(OUTBOX_NAME, OUTBOX_COMMA) };
#define OUTBOX_STATES (sizeof(outbox_states) / sizeof(outbox_states[0]))

struct metrics_job {
	struct cw_app *app;
	struct cw_req *req;
	long long outbox[OUTBOX_STATES];
	double oldest_due_s; /* causeway_outbox_oldest_due_seconds */
};

/* How long the oldest pending row that is due has been due (0: none is),
 * for an alert on deliveries that could go and do not (a dispatcher
 * stuck, every lane busy elsewhere, a destination paused).  Each
 * destination's oldest pending row is its first entry of
 * outbox_backing_off_idx (destination, next_attempt_at) WHERE state =
 * 'pending'; the destinations with pending rows are found in the same
 * index, one descent each (d: the next destination after the last, a
 * loose index scan), and the oldest of their first entries that has come
 * is the answer.  Until the forty-ninth session the statement read
 * outbox_due_idx (next_attempt_at, id) WHERE state = 'pending', which no
 * other statement read (the claim is per destination) and every pending
 * row paid an entry of (050 dropped it), and it read past every row of a
 * pull or disabled peer older than the first it counted (43 ms past
 * 100,000).  A row of a pull peer waits for that peer to pull it, and one
 * of a disabled peer for the operator: neither is the dispatcher's to
 * take, and their destinations are left out whole.  In a plain
 * statement, planned for the tables of the moment (a prepared
 * statement's generic plan can go stale: docs/performance.md,
 * "Forty-third session").  A row due behind an earlier row of its room
 * that is in flight or backing off, or behind a held row of its sender,
 * counts: the claim (dispatcher.c) tests that with probes per row, and
 * during a destination's outage every newer row of its rooms is such a
 * row, so testing it here would read the whole backlog on every scrape
 * (docs/operations.md says what the gauge then shows). */
static const char oldest_due_sql[] =
	"WITH RECURSIVE d (dest) AS ("
	" (SELECT o.destination FROM outbox o WHERE o.state = 'pending' ORDER BY o.destination LIMIT 1)"
	" UNION ALL SELECT (SELECT o.destination FROM outbox o WHERE o.state = 'pending' AND o.destination > d.dest"
	"  ORDER BY o.destination LIMIT 1) FROM d WHERE d.dest IS NOT NULL) "
	"SELECT coalesce(extract(epoch FROM now() - min(f.at)), 0) FROM d CROSS JOIN LATERAL "
	" (SELECT o.next_attempt_at AS at FROM outbox o WHERE o.state = 'pending' AND o.destination = d.dest"
	"  ORDER BY o.next_attempt_at LIMIT 1) f "
	"WHERE d.dest NOT IN (SELECT 'peer:' || p.name FROM peers p WHERE p.mode = 'pull' OR NOT p.enabled) "
	" AND f.at <= now()";

static cw_err metrics_query(PGconn *c, void *arg, cw_errmsg *e)
{
	struct metrics_job *j = arg;
	/* The gauge is about what is still to do (or waits for the operator):
	 * delivered, dropped and expired rows pile up, and counting them on
	 * every scrape grew with every message ever refused (0.27 s on both
	 * cores at 300,000 such rows, a review measured; until the nineteenth
	 * session).  The open states are each a range of
	 * outbox_state_dest_idx. */
	PGresult *r = PQexec(c, "SELECT state, count(*) FROM outbox "
				"WHERE state IN (" OUTBOX_OPEN(OUTBOX_SQL, ", ") ") GROUP BY state");
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	for (int i = 0; i < PQntuples(r); i++)
		for (size_t k = 0; k < OUTBOX_STATES; k++)
			if (strcmp(PQgetvalue(r, i, 0), outbox_states[k]) == 0)
				j->outbox[k] = atoll(PQgetvalue(r, i, 1));
	PQclear(r);
	r = PQexec(c, oldest_due_sql);
	if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	j->oldest_due_s = strtod(PQgetvalue(r, 0, 0), NULL);
	PQclear(r);
	return CW_OK;
}

/* A counter by retention kind (retention.h). */
static void retention_counter(struct cw_buf *b, const char *name, const char *help,
			      const uint64_t v[RETENTION_KINDS])
{
	cw_buf_printf(b, "# HELP %s %s\n# TYPE %s counter\n", name, help, name);
	for (int k = 0; k < RETENTION_KINDS; k++)
		cw_buf_printf(b, "%s{kind=\"%s\"} %llu\n", name, retention_kind_names[k], (unsigned long long)v[k]);
}

static void metrics_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct metrics_job *j = arg;
	struct cw_app *app = j->app;
	struct cw_buf b;
	cw_buf_init(&b, METRICS_MAX_BYTES);
	cw_metrics_sample(&b, "causeway_build_info", "gauge", "Version of the running daemon.",
			  "version=\"" PACKAGE_VERSION "\"", 1);
	cw_metrics_sample(&b, "causeway_start_time_seconds", "gauge", "When the daemon started (Unix time).",
			  NULL, (double)app->started_wall_ms / 1000.0);
	cw_metrics_render_http(cw_http_metrics(app->http), &b);
	cw_metrics_sample(&b, "causeway_http_requests_in_flight", "gauge", "Requests being served now.",
			  NULL, (double)cw_http_in_flight(app->http));

	struct store_stats st;
	store_get_stats(app->store, &st);
	/* and answered this scrape's read (probe): the store's own view stays
	 * up while a database that stopped answering keeps its connections */
	cw_metrics_sample(&b, "causeway_database_up", "gauge", "1 while the database answers.", NULL,
			  st.db_up && rc == CW_OK);
	cw_metrics_sample(&b, "causeway_db_pool_connections", "gauge", "Database connections of the pool.",
			  NULL, st.conns_total);
	cw_metrics_sample(&b, "causeway_db_pool_connections_up", "gauge", "Pool connections that are connected.",
			  NULL, st.conns_up);
	cw_metrics_sample(&b, "causeway_db_pool_readers_busy", "gauge", "Reader connections running a query.",
			  NULL, st.readers_busy);
	cw_metrics_sample(&b, "causeway_db_writes_queued", "gauge", "Writes waiting for the group-commit writer.",
			  NULL, (double)st.writes_queued);
	cw_metrics_sample(&b, "causeway_db_reads_queued", "gauge",
			  "Reads waiting for a reader connection, and those queued to be asked again later.", NULL,
			  (double)st.reads_queued);
	cw_metrics_sample(&b, "causeway_peer_submits_queued", "gauge",
			  "Single submits waiting to be coalesced into the writer's next job.", NULL,
			  (double)submit_queue_count(app->submits));
	cw_metrics_sample(&b, "causeway_db_commits_total", "counter", "Group-commit transactions committed.",
			  NULL, (double)st.batches);
	cw_metrics_sample(&b, "causeway_db_writes_committed_total", "counter", "Writes made durable.",
			  NULL, (double)st.writes_committed);
	cw_metrics_sample(&b, "causeway_db_writes_failed_total", "counter", "Writes that failed or timed out.",
			  NULL, (double)st.writes_failed);
	cw_metrics_sample(&b, "causeway_db_connects_total", "counter", "Database connections opened.",
			  NULL, (double)st.reconnects);
	cw_metrics_sample(&b, "causeway_db_write_retries_total", "counter",
			  "Writes run again after losing a deadlock or a serialization failure.", NULL,
			  (double)st.write_retries);
	struct cw_workers_stats ws;
	cw_workers_get_stats(app->fetchers, &ws);
	cw_metrics_sample(&b, "causeway_media_fetches_running", "gauge",
			  "Files being fetched now (for peers, XMPP links, vCard photos).", NULL, ws.busy);
	cw_metrics_sample(&b, "causeway_media_fetches_refused_total", "counter",
			  "File fetches refused because server.media_fetches were running (answered: try again).", NULL,
			  (double)ws.refused);
	cw_metrics_sample(&b, "causeway_media_held_bytes", "gauge",
			  "Bytes held for file links: server.media_max_bytes reserved by each fetch running, the size "
			  "of each fetched file whose answer is being sent (at most server.media_fetches x "
			  "server.media_max_bytes; past it new fetches are answered 503).",
			  NULL, (double)atomic_load(&app->media_held));
	if (rc == CW_OK) {
		cw_buf_printf(&b, "# HELP causeway_outbox_depth Outbox rows still to deliver or dead, by state.\n"
				  "# TYPE causeway_outbox_depth gauge\n");
		for (size_t k = 0; k < OUTBOX_STATES; k++)
			cw_buf_printf(&b, "causeway_outbox_depth{state=\"%s\"} %lld\n", outbox_states[k], j->outbox[k]);
		cw_metrics_sample(&b, "causeway_outbox_oldest_due_seconds", "gauge",
				  "How long the oldest pending outbox row that is due has been due, pull and disabled "
				  "peers' rows aside (0: none is due).",
				  NULL, j->oldest_due_s);
	}
	if (app->dispatcher) {
		struct dispatcher_stats ds;
		dispatcher_get_stats(app->dispatcher, &ds);
		cw_buf_printf(&b, "# HELP causeway_dispatch_rows_total Outbox rows after a delivery attempt, by outcome.\n"
				  "# TYPE causeway_dispatch_rows_total counter\n"
				  "causeway_dispatch_rows_total{outcome=\"delivered\"} %llu\n"
				  "causeway_dispatch_rows_total{outcome=\"retry\"} %llu\n"
				  "causeway_dispatch_rows_total{outcome=\"dead\"} %llu\n"
				  "causeway_dispatch_rows_total{outcome=\"expired\"} %llu\n",
			      (unsigned long long)ds.delivered, (unsigned long long)ds.retried,
			      (unsigned long long)ds.dead, (unsigned long long)ds.expired);
		cw_buf_printf(&b, "# HELP causeway_dispatch_requests_total Delivery requests to destinations, by outcome.\n"
				  "# TYPE causeway_dispatch_requests_total counter\n"
				  "causeway_dispatch_requests_total{outcome=\"ok\"} %llu\n"
				  "causeway_dispatch_requests_total{outcome=\"failed\"} %llu\n",
			      (unsigned long long)ds.requests_ok, (unsigned long long)ds.requests_failed);
		cw_metrics_sample(&b, "causeway_dispatch_claims_total", "counter",
				  "Claim transactions of the dispatcher, whether they found rows or not.", NULL,
				  (double)ds.claim_tries);
		cw_metrics_sample(&b, "causeway_dispatch_pauses_total", "counter",
				  "Destinations left alone for a while after a slow claim found nothing due (their backlog waits).",
				  NULL, (double)ds.pauses);
		cw_metrics_sample(&b, "causeway_dispatch_rate_limited_total", "counter",
				  "Rows a destination answered 429 (too many requests): tried again after the wait it asked "
				  "for, not counted against the retry budget.",
				  NULL, (double)ds.rate_limited);
		cw_metrics_sample(&b, "causeway_dispatch_claim_renewals_total", "counter",
				  "Renewals of this process's claims while a delivery outlasted a third of "
				  "dispatcher.claim_timeout_s.",
				  NULL, (double)ds.renewals);
	}
	if (app->policy) {
		struct policy_live_stats ps;
		policy_live_get_stats(app->policy, &ps);
		cw_buf_printf(&b, "# HELP causeway_policy_decisions_total Policy decisions, by verdict.\n"
				  "# TYPE causeway_policy_decisions_total counter\n");
		for (int k = 0; k < 4; k++)
			cw_buf_printf(&b, "causeway_policy_decisions_total{verdict=\"%s\"} %llu\n",
				      policy_verdict_name((enum policy_verdict)k), atomic_load(&app->decisions[k]));
		cw_metrics_sample(&b, "causeway_policy_version", "gauge", "Version of the policy snapshot in force.",
				  NULL, (double)ps.version);
		cw_metrics_sample(&b, "causeway_policy_rules", "gauge", "Rules in the snapshot in force.", NULL,
				  (double)ps.rules);
		cw_metrics_sample(&b, "causeway_policy_facts", "gauge",
				  "Consent facts (opt-ins, consents, remote blocks) in the snapshot in force.", NULL,
				  (double)ps.facts);
		cw_metrics_sample(&b, "causeway_policy_load_ms", "gauge", "How long the last snapshot took to load.",
				  NULL, ps.last_load_ms);
		cw_metrics_sample(&b, "causeway_policy_reload_failures_total", "counter", "Snapshot reloads that failed.",
				  NULL, (double)ps.reload_failures);
		cw_metrics_sample(&b, "causeway_policy_settings_unreadable", "gauge",
				  "Policy settings in the database the snapshot in force could not read (1: "
				  "policy.default_mode, whose mode in force before it stays).",
				  NULL, ps.default_mode_unreadable ? 1.0 : 0.0);
		cw_metrics_sample(&b, "causeway_policy_stale_seconds", "gauge",
				  "Seconds since the first reload that failed after the last whole one that succeeded "
				  "(0: the rules in force are current).",
				  NULL, ps.stale_since_us ? (double)((cw_now_us() - ps.stale_since_us) / 1000) / 1000.0 : 0.0);
		cw_buf_printf(&b, "# HELP causeway_policy_reloads_total Snapshots loaded: whole, or the facts of some users "
				  "over the last whole one.\n"
				  "# TYPE causeway_policy_reloads_total counter\n"
				  "causeway_policy_reloads_total{kind=\"whole\"} %llu\n"
				  "causeway_policy_reloads_total{kind=\"users\"} %llu\n",
			      (unsigned long long)(ps.reloads - ps.user_reloads), (unsigned long long)ps.user_reloads);
		cw_metrics_sample(&b, "causeway_policy_overlay_users", "gauge",
				  "Local users whose facts the snapshot in force holds over the last whole one.", NULL,
				  (double)ps.overlay_users);
		cw_metrics_sample(&b, "causeway_policy_catch_ups_total", "counter",
				  "Decisions that found a local user's facts newer in the database than in the snapshot "
				  "and waited for them.", NULL, (double)ps.catch_ups);
		cw_buf_printf(&b, "# HELP causeway_policy_held_swept_total Held outbox rows changed by the sweep.\n"
				  "# TYPE causeway_policy_held_swept_total counter\n"
				  "causeway_policy_held_swept_total{outcome=\"released\"} %llu\n"
				  "causeway_policy_held_swept_total{outcome=\"dropped\"} %llu\n"
				  "causeway_policy_held_swept_total{outcome=\"expired\"} %llu\n",
			      (unsigned long long)ps.released, (unsigned long long)ps.dropped,
			      (unsigned long long)ps.expired);
		retention_counter(&b, "causeway_retention_removed_total",
				  "Rows the retention sweeps removed (events: deleted; content: erased), by kind.",
				  ps.retention_removed);
		retention_counter(&b, "causeway_retention_failures_total",
				  "Retention sweeps in which a kind failed (the others still ran), by kind.",
				  ps.retention_failures);
		cw_buf_printf(&b, "# HELP causeway_policy_rechecked_total Waiting outbox rows decided again after a "
				  "change of the server's rules, an opt-out or a remote user's block of a local one, and of those "
				  "dropped.\n"
				  "# TYPE causeway_policy_rechecked_total counter\n"
				  "causeway_policy_rechecked_total{outcome=\"decided\"} %llu\n"
				  "causeway_policy_rechecked_total{outcome=\"dropped\"} %llu\n",
			      (unsigned long long)ps.rechecked, (unsigned long long)ps.recheck_dropped);
		cw_buf_printf(&b, "# HELP causeway_policy_recheck_dropped_total Waiting outbox rows the recheck "
				  "dropped, by the refusal and the kind of row (inbound: to a local user; outbound: "
				  "from one to a peer; transit: from a peer to a peer).\n"
				  "# TYPE causeway_policy_recheck_dropped_total counter\n");
		for (int k = 0; k < POLICY_RECHECK_REASONS; k++)
			for (int w = 0; w < POLICY_RECHECK_KINDS; w++)
				cw_buf_printf(&b, "causeway_policy_recheck_dropped_total{reason=\"%s\",kind=\"%s\"} %llu\n",
					      policy_recheck_reasons[k], policy_recheck_kinds[w],
					      (unsigned long long)ps.recheck_dropped_by[k][w]);
	}
	if (app->xmpp)
		xa_metrics(app->xmpp, &b);
	if (app->matrix)
		matrix_metrics(app->matrix, &b);
	if (app->replay) {
		cw_metrics_sample(&b, "causeway_signature_nonces", "gauge", "Request-signature nonces remembered.",
				  NULL, (double)httpsig_replay_count(app->replay));
		cw_metrics_sample(&b, "causeway_signature_nonces_evicted_live_total", "counter",
				  "Nonces pushed out of a full replay cache inside their window (raise peer.replay_cache_entries).",
				  NULL, (double)httpsig_replay_live_evictions(app->replay));
	}
	struct rusage ru;
	if (getrusage(RUSAGE_SELF, &ru) == 0) {
		cw_metrics_sample(&b, "process_cpu_seconds_total", "counter", "User and system CPU time.", NULL,
				  (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
					  (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
		cw_metrics_sample(&b, "process_max_resident_memory_bytes", "gauge", "Peak resident set size.", NULL,
				  (double)ru.ru_maxrss * 1024.0);
	}
	if (b.overflow) {
		cw_buf_free(&b);
		cw_req_problem(j->req, 500, "internal", "Internal error", "metrics larger than their cap");
	} else {
		size_t len;
		char *text = cw_buf_take(&b, &len);
		cw_req_reply(j->req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
	}
	(void)e;
	cw_req_resume(j->req);
}

static void h_metrics(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	struct metrics_job *j = calloc(1, sizeof(*j));
	if (!j) {
		cw_req_no_memory(req);
		return;
	}
	j->app = app;
	j->req = req;
	probe_start(app, req, j, metrics_query, metrics_done, free);
}

/* The sixth column: the route takes no body (a change its path names
 * whole), so one sent with members is refused, not ignored; the last: the
 * query parameters it takes, any other (or one twice) refused, not
 * ignored (http.h). */
const struct cw_route app_routes[] = {
	{ "GET", "/healthz", h_healthz, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/readyz", h_readyz, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/metrics", h_metrics, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/.well-known/mimi-protocol-directory", peer_api_directory, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/v1/openapi.json", h_openapi, CW_AUTH_NONE, NULL, false, NULL },
	{ "POST", "/v1/rooms", peer_api_room_create, CW_AUTH_PEER, NULL, false, NULL },
	{ "GET", "/v1/rooms/{room}", peer_api_room_get, CW_AUTH_PEER, NULL, false, NULL },
	{ "PATCH", "/v1/rooms/{room}", peer_api_room_rename, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/rooms/{room}/members", peer_api_room_members, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/rooms/{room}/messages", peer_api_message_submit, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/rooms/{room}/receipts", peer_api_receipt_submit, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/rooms/{room}/typing", peer_api_typing_submit, CW_AUTH_PEER, NULL, false, NULL },
	{ "GET", "/v1/messages/{id}", peer_api_message_status, CW_AUTH_PEER, NULL, false, NULL },
	{ "GET", "/v1/events", peer_api_events, CW_AUTH_PEER, NULL, false, "after wait limit" },
	{ "GET", "/v1/media/{token}", peer_api_media, CW_AUTH_PEER, NULL, false, "ev exp src" },
	{ "GET", "/media/{token}", media_public_get, CW_AUTH_NONE, NULL, false, NULL },
	{ "POST", "/v1/consent/requests", peer_api_consent_request, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/consent/updates", peer_api_consent_update, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/blocks", peer_api_block, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/reports", peer_api_report, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/identifiers/query", peer_api_identifier_query, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/profiles", peer_api_profile, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/v1/batch", peer_api_batch, CW_AUTH_PEER, NULL, false, NULL },
	{ "POST", "/admin/v1/peers", peer_admin_create, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "GET", "/admin/v1/peers", peer_admin_list, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "GET", "/admin/v1/peers/{name}", peer_admin_get, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "POST", "/admin/v1/peers/{name}/disable", peer_admin_disable, CW_AUTH_ADMIN, NULL, true, NULL },
	{ "POST", "/admin/v1/peers/{name}/enable", peer_admin_enable, CW_AUTH_ADMIN, NULL, true, NULL },
	{ "POST", "/admin/v1/peers/{name}/rotate", peer_admin_rotate, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "PATCH", "/admin/v1/peers/{name}", peer_admin_update, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "GET", "/admin/v1/outbox", outbox_admin_list, CW_AUTH_ADMIN_READ, NULL, false, APP_PAGING_QUERY " state destination" },
	{ "POST", "/admin/v1/outbox/{id}/replay", outbox_admin_replay, CW_AUTH_ADMIN, NULL, true, NULL },
	{ "PUT", "/_matrix/app/v1/transactions/{txn}", matrix_as_transaction, CW_AUTH_HOMESERVER, NULL, false, NULL },
	{ "PUT", "/transactions/{txn}", matrix_as_transaction, CW_AUTH_HOMESERVER, NULL, false, NULL },
	{ "GET", "/_matrix/app/v1/users/{user}", matrix_as_user, CW_AUTH_HOMESERVER, NULL, false, NULL },
	{ "GET", "/users/{user}", matrix_as_user, CW_AUTH_HOMESERVER, NULL, false, NULL },
	{ "GET", "/_matrix/app/v1/rooms/{alias}", matrix_as_room_alias, CW_AUTH_HOMESERVER, NULL, false, NULL },
	{ "GET", "/rooms/{alias}", matrix_as_room_alias, CW_AUTH_HOMESERVER, NULL, false, NULL },
	{ "POST", "/_matrix/app/v1/ping", matrix_as_ping, CW_AUTH_HOMESERVER, NULL, false, NULL },
	{ "GET", "/admin/v1/rules", policy_admin_rules_list, CW_AUTH_ADMIN_READ, NULL, false, APP_PAGING_QUERY " scope" },
	{ "POST", "/admin/v1/rules", policy_admin_rule_create, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "GET", "/admin/v1/rules/{id}", policy_admin_rule_get, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "PATCH", "/admin/v1/rules/{id}", policy_admin_rule_update, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "DELETE", "/admin/v1/rules/{id}", policy_admin_rule_delete, CW_AUTH_ADMIN, NULL, true, NULL },
	{ "GET", "/admin/v1/settings", policy_admin_settings_get, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "PATCH", "/admin/v1/settings", policy_admin_settings_update, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "GET", "/admin/v1/users", policy_admin_users_list, CW_AUTH_ADMIN_READ, NULL, false, APP_PAGING_QUERY " user" },
	{ "POST", "/admin/v1/optins", policy_admin_optin_set, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "POST", "/admin/v1/consents", policy_admin_consent_set, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "GET", "/admin/v1/consent-requests", policy_admin_consent_requests, CW_AUTH_ADMIN_READ, NULL, false, APP_PAGING_QUERY " state user" },
	{ "GET", "/admin/v1/held", policy_admin_held_list, CW_AUTH_ADMIN_READ, NULL, false, APP_PAGING_QUERY " user" },
	{ "GET", "/admin/v1/reports", policy_admin_reports_list, CW_AUTH_ADMIN_READ, NULL, false, APP_PAGING_QUERY " open" },
	{ "POST", "/admin/v1/reports", policy_admin_report_create, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "POST", "/admin/v1/reports/{id}/handle", policy_admin_report_handle, CW_AUTH_ADMIN, NULL, true, NULL },
	{ "POST", "/admin/v1/reports/{id}/dismiss", policy_admin_report_dismiss, CW_AUTH_ADMIN, NULL, true, NULL },
	{ "GET", "/admin/v1/audit", policy_admin_audit_list, CW_AUTH_ADMIN_READ, NULL, false, APP_PAGING_QUERY " action actor message" },
	{ "GET", "/admin/v1/messages/{id}/decision", policy_admin_decision, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "GET", "/admin/v1/messages/{id}", outbox_admin_trace, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "POST", "/admin/v1/outbox/{id}/discard", outbox_admin_discard, CW_AUTH_ADMIN, NULL, true, NULL },
	{ "GET", "/admin/v1/whoami", admin_whoami, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "GET", "/admin/v1/tokens", admin_tokens_list, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "POST", "/admin/v1/tokens", admin_tokens_create, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "POST", "/admin/v1/tokens/{name}/revoke", admin_tokens_revoke, CW_AUTH_ADMIN, NULL, true, NULL },
	{ "GET", "/admin/v1/rooms", admin_views_rooms_list, CW_AUTH_ADMIN_READ, NULL, false, APP_PAGING_QUERY },
	{ "GET", "/admin/v1/rooms/{id}", admin_views_room_get, CW_AUTH_ADMIN_READ, NULL, false, APP_PAGING_QUERY },
	{ "POST", "/admin/v1/rooms/{id}/members", admin_views_room_members, CW_AUTH_ADMIN, NULL, false, NULL },
	{ "GET", "/admin/v1/adapters", admin_views_adapters, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "GET", "/admin/v1/config", admin_views_config, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "GET", "/admin/v1/stats", admin_views_stats, CW_AUTH_ADMIN_READ, NULL, false, NULL },
	{ "GET", "/admin/v1/openapi.json", h_admin_openapi, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/admin", console_redirect, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/admin/", console_serve, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/admin/{file}", console_serve, CW_AUTH_NONE, NULL, false, NULL },
};
const size_t app_nroutes = CW_ARRAY_LEN(app_routes);

/* GET /v1/events acknowledges what its after names and hands out what
 * follows (adapters/peer/peer_pull.c): a HEAD there is 405, Allow: GET.
 * So are the appservice API's queries (405 M_UNRECOGNIZED): the user
 * query registers the ghost it answers for (matrix.c, matrix_as_user),
 * and the alias query is the specification's way to have a room made;
 * until the forty-sixth session a HEAD of the user query registered the
 * ghost. */
const char *const app_no_head_routes[] = { "/v1/events", "/_matrix/app/v1/users/{user}", "/users/{user}",
					   "/_matrix/app/v1/rooms/{alias}", "/rooms/{alias}", NULL };

/* ------------------------------------------------------------------ jobs */

void app_retry_after(struct cw_req *req, int64_t ms)
{
	char ra[24];
	snprintf(ra, sizeof(ra), "%lld", (long long)((ms + 999) / 1000));
	cw_req_add_header(req, "Retry-After", ra);
}

void app_reply_store_error(struct cw_app *app, struct cw_req *req, cw_err rc, const char *why)
{
	if (rc == CW_EUNAVAIL || rc == CW_ETIMEDOUT || rc == CW_ESHUTDOWN || rc == CW_ERETRY) {
		app_retry_after(req, app->cfg->db_retry_after_s * 1000);
		cw_req_problem(req, 503, "unavailable", "Service unavailable",
			       rc == CW_ESHUTDOWN ? "the daemon is stopping" :
			       rc == CW_ETIMEDOUT ? "the database did not answer in time" :
			       rc == CW_ERETRY ? "the write kept colliding with others; nothing was stored" :
			       why && strcmp(why, STORE_OUTCOME_UNKNOWN) == 0
				       ? (cw_req_retry_safe(req) ? STORE_OUTCOME_RETRY : STORE_OUTCOME_LOOK) :
			       "the database is unavailable; nothing was stored");
		return;
	}
	if (rc == CW_ENOMEM) { /* until the forty-fifth session a 500 */
		cw_req_no_memory(req);
		return;
	}
	if (rc == CW_ECONFLICT) {
		/* Two requests raced for one key (the same Idempotency-Key sent
		 * twice at once, say): the loser may simply retry, and
		 * Retry-After says so to a client that reads `conflict` as
		 * final (since the forty-fifth session). */
		cw_req_add_header(req, "Retry-After", "1");
		cw_req_problem(req, 409, "conflict", "Conflict",
			       "a concurrent request changed the same data; retry the request");
		return;
	}
	LOG_KV(CW_LOG_ERROR, "database job failed", "request_id", cw_req_id(req), "error", cw_strerror(rc),
	       "detail", why);
	cw_req_problem(req, 500, "internal", "Internal error", "the request could not be completed");
}

struct app_job *app_job_new(struct cw_app *app, struct cw_req *req,
			    cw_err (*fn)(PGconn *, struct app_job *, cw_errmsg *))
{
	struct app_job *j = calloc(1, sizeof(*j));
	if (j) {
		j->app = app;
		j->req = req;
		j->fn = fn;
	}
	return j;
}

void app_job_run(struct cw_app *app, struct cw_req *req, cw_err (*fn)(PGconn *, struct app_job *, cw_errmsg *),
		 void *data, void (*data_free)(void *), bool write)
{
	struct app_job *j = data ? app_job_new(app, req, fn) : NULL;
	if (!j) {
		if (data && data_free)
			data_free(data);
		cw_req_no_memory(req);
		return;
	}
	j->data = data;
	j->data_free = data_free;
	app_job_start(j, write);
}

void app_job_fail(struct app_job *j, int status, const char *code, const char *fmt, ...)
{
	j->err_status = status;
	j->err_code = code;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(j->err_detail, sizeof(j->err_detail), fmt, ap);
	va_end(ap);
}

/* Clears a job's outputs before (each) run of its work. */
static void job_reset(struct app_job *j)
{
	json_decref(j->body);
	j->body = NULL;
	j->status = 200;
	j->err_code = NULL;
	j->err_detail[0] = '\0';
	j->retry_after_ms = 0;
}

static cw_err job_run(PGconn *c, void *arg, cw_errmsg *e)
{
	struct app_job *j = arg;
	job_reset(j);
	return j->fn(c, j, e);
}

/* A write on behalf of a peer: its peer is asked of the table first,
 * still enabled with the token it came with, and its signature's nonce
 * claimed for every daemon process (peer_nonce_claim, one statement), so
 * that a peer disabled or rotated through another process changes nothing
 * here while this one's registry still holds it (401 as an unknown token;
 * until the forty-seventh session it did until this process's pull thread
 * reloaded the registry), and a request replayed to another process
 * behind a load balancer changes nothing.
 * (Messages and batches are pipelined, not run here: their idempotency
 * keys make a replay harmless.)  An operator's: its token is asked of
 * the table first (admin_tokens_in_force), so that one revoked by another
 * process changes nothing here while this one still holds it (until the
 * forty-sixth session it did until this process's next reload, which a
 * lock or a long sweep can hold up: a leaked token minted a new one). */
static cw_err job_write(PGconn *c, void *arg, cw_errmsg *e)
{
	struct app_job *j = arg;
	if (j->req && cw_req_auth(j->req) == CW_AUTH_PEER) {
		bool fresh, in_force;
		cw_err rc = peer_nonce_claim(c, cw_req_principal(j->req), cw_wall_ms() / 1000,
					     j->app->cfg->max_clock_skew_s, &fresh, &in_force, e);
		if (rc)
			return rc;
		if (!in_force) {
			job_reset(j);
			app_job_fail(j, 401, "unauthenticated", "%s", APP_PEER_TOKEN_REQUIRED);
			return CW_OK;
		}
		if (!fresh) {
			job_reset(j);
			app_job_fail(j, 401, "bad_signature", "%s", PEER_NONCE_REPLAYED);
			return CW_OK;
		}
	}
	if (j->req && cw_req_auth(j->req) == CW_AUTH_ADMIN) {
		bool in_force;
		cw_err rc = admin_tokens_in_force(j->app->admins, c, cw_req_principal(j->req), &in_force, e);
		if (rc)
			return rc;
		if (!in_force) {
			job_reset(j);
			app_job_fail(j, 401, "unauthenticated", "this admin token has been revoked; nothing was changed");
			return CW_OK;
		}
	}
	return job_run(c, arg, e);
}

static void job_done(void *arg, cw_err rc, const cw_errmsg *e);

static void *after_thread(void *arg)
{
	cw_thread_name("cw-after");
	struct cw_app *app = ((struct app_job *)arg)->app;
	job_done(arg, CW_OK, NULL);
	atomic_fetch_sub(&app->afters, 1);
	return NULL;
}

void app_afters_wait(struct cw_app *app)
{
	while (atomic_load(&app->afters) > 0) {
		struct timespec ts = { 0, 10 * 1000000L };
		nanosleep(&ts, NULL);
	}
}

static void job_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct app_job *j = arg;
	if (j->after_waits && j->req && !rc && !j->err_code && j->after) {
		/* Rare (admin changes, a ghost's registration): a thread of
		 * its own, counted, which the stop waits for (app_afters_wait)
		 * however long the HTTP front's drain lasts. */
		j->after_waits = false;
		atomic_fetch_add(&j->app->afters, 1);
		if (cw_thread_detached(after_thread, j))
			return;
		atomic_fetch_sub(&j->app->afters, 1);
	}
	if (!j->req) {
		if (!rc && !j->err_code && j->after)
			j->after(j);
		if (j->finished)
			j->finished(j, rc ? rc : j->err_code ? CW_EINVAL : CW_OK);
	} else if (j->matrix_errors && (rc || j->err_code)) {
		if (rc)
			app_retry_after(j->req, j->app->cfg->db_retry_after_s * 1000);
		else if (j->retry_after_ms > 0)
			app_retry_after(j->req, j->retry_after_ms);
		cw_req_reply_json(j->req, rc ? 503 : j->err_status,
				  json_pack("{s:s, s:s}", "errcode", rc ? "M_UNKNOWN" : j->err_code, "error",
					    rc ? "the database is unavailable; try again" : j->err_detail));
	} else if (rc) {
		app_reply_store_error(j->app, j->req, rc, e ? e->msg : "");
	} else if (j->err_code) {
		if (j->retry_after_ms > 0)
			app_retry_after(j->req, j->retry_after_ms);
		if (j->err_status == 401)
			cw_req_add_header(j->req, "WWW-Authenticate", "Bearer");
		cw_req_problem(j->req, j->err_status, j->err_code, app_status_title(j->err_status), j->err_detail);
	} else {
		if (j->after)
			j->after(j);
		cw_req_reply_json(j->req, j->status, j->body);
		j->body = NULL;
	}
	if (j->req)
		cw_req_resume(j->req);
	json_decref(j->body);
	if (j->data_free)
		j->data_free(j->data);
	free(j);
}

/* The store did not take the job (the database is away, or the daemon is
 * stopping): it is answered at once. */
static void job_refused(struct app_job *j, cw_err rc)
{
	cw_errmsg e;
	cw_fail(&e, rc, "%s", cw_strerror(rc));
	job_done(j, rc, &e);
}

static cw_err pipe_send(PGconn *c, void *arg, int round, cw_errmsg *e)
{
	struct app_job *j = arg;
	if (round == 0)
		job_reset(j);
	return j->pipe->send(c, j, round, e);
}

static cw_err pipe_recv(PGconn *c, void *arg, int round, bool *more, cw_errmsg *e)
{
	struct app_job *j = arg;
	return j->pipe->recv(c, j, round, more, e);
}

static const char *pipe_first_locks(void *arg)
{
	struct app_job *j = arg;
	return j->pipe->first_locks ? j->pipe->first_locks(j) : NULL;
}

static const struct store_pipe_ops app_pipe = { pipe_send, pipe_recv, pipe_first_locks };

void app_job_start_pipe(struct app_job *j, const struct app_pipe_ops *ops)
{
	j->pipe = ops;
	if (j->req)
		cw_req_suspend(j->req);
	cw_err rc = store_write_pipe(j->app->store, &app_pipe, job_done, j);
	if (rc)
		job_refused(j, rc);
}

/* The prepare step ran on a reader: on success the write follows. */
static void prepared(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct app_job *j = arg;
	if (rc || j->err_code || j->no_write) {
		job_done(j, rc, e);
		return;
	}
	rc = store_write_pipe(j->app->store, &app_pipe, job_done, j);
	if (rc)
		job_refused(j, rc);
}

void app_job_start_prepared_pipe(struct app_job *j, cw_err (*prepare)(PGconn *, struct app_job *, cw_errmsg *),
				 const struct app_pipe_ops *ops)
{
	j->fn = prepare;
	j->pipe = ops;
	if (j->req)
		cw_req_suspend(j->req);
	cw_err rc = store_read(j->app->store, job_run, prepared, j);
	if (rc)
		job_refused(j, rc);
}

void app_job_start(struct app_job *j, bool write)
{
	if (j->req)
		cw_req_suspend(j->req);
	cw_err rc = write ? store_write(j->app->store, job_write, job_done, j)
			  : store_read(j->app->store, job_run, job_done, j);
	if (rc)
		job_refused(j, rc);
}

const char *app_local_network(const struct cw_app *app)
{
	return app->matrix ? "matrix" : app->xmpp ? "xmpp" : "local";
}

void policy_count(struct cw_app *app, const struct policy_decision *d)
{
	if ((unsigned)d->verdict < 4)
		atomic_fetch_add(&app->decisions[d->verdict], 1);
}

bool app_paging(struct cw_req *req, long long *after, long *limit)
{
	const char *a = cw_req_query(req, "after"), *l = cw_req_query(req, "limit");
	*after = 0;
	*limit = APP_PAGE_DEFAULT;
	long long lim = *limit;
	/* digits only (cw_decimal): limit=%205, after=-0 were read as
	 * numbers until the thirtieth session */
	if (a && !cw_decimal(a, 0, LLONG_MAX, false, after)) {
		cw_req_problem(req, 400, "invalid_query", "Invalid query",
			       "after must be a row id (a non-negative whole number, in digits)");
		return false;
	}
	if (l && !cw_decimal(l, 1, APP_PAGE_MAX, false, &lim)) {
		cw_req_problem(req, 400, "invalid_query", "Invalid query", "limit must be 1 to 500, in digits");
		return false;
	}
	*limit = (long)lim;
	return true;
}

bool app_path_id(struct cw_req *req, const char *name, const char *what, char out[24])
{
	long long v;
	if (!cw_decimal(cw_req_param(req, name), 1, LLONG_MAX, false, &v)) {
		char d[80];
		snprintf(d, sizeof(d), "no %s with that id", what);
		cw_req_problem(req, 404, "not_found", "Not found", d);
		return false;
	}
	snprintf(out, 24, "%lld", v);
	return true;
}

const char *app_status_title(int status)
{
	switch (status) {
	case 400: return "Bad request";
	case 401: return "Unauthenticated";
	case 403: return "Not allowed";
	case 404: return "Not found";
	case 409: return "Conflict";
	case 413: return "Too large";
	case 415: return "Unsupported media type";
	case 429: return "Too many requests";
	case 503: return "Service unavailable";
	}
	return status >= 500 ? "Internal error" : "Request refused";
}

bool app_is_json(struct cw_req *req)
{
	const char *ct = cw_req_header(req, "Content-Type");
	if (!ct || strncasecmp(ct, "application/json", 16) != 0 || (ct[16] && ct[16] != ';' && ct[16] != ' ')) {
		cw_req_problem(req, 415, "unsupported_media_type", "Unsupported media type",
			       "the body must be application/json");
		return false;
	}
	return true;
}

json_t *app_json_body(struct cw_req *req)
{
	if (!app_is_json(req))
		return NULL;
	size_t len;
	const char *body = cw_req_body(req, &len);
	json_error_t err;
	json_t *j = json_loadb(body, len, JSON_REJECT_DUPLICATES, &err);
	if (!j || !json_is_object(j)) {
		char detail[300];
		if (j)
			snprintf(detail, sizeof(detail), "the body must be a JSON object");
		else
			snprintf(detail, sizeof(detail), "the body is not valid JSON: %s (at byte %d)", err.text,
				 err.position);
		json_decref(j);
		cw_req_problem(req, 400, "invalid_body", "Invalid body", detail);
		return NULL;
	}
	return j;
}

bool app_json_only_known(struct cw_req *req, json_t *body, const char *const *known)
{
	const char *k;
	json_t *v;
	json_object_foreach(body, k, v) {
		bool ok = false;
		for (int i = 0; known[i] && !ok; i++)
			ok = strcmp(known[i], k) == 0;
		if (!ok) {
			char d[120];
			snprintf(d, sizeof(d), "unknown member '%.64s'", k);
			cw_req_problem(req, 400, "invalid_body", "Invalid body", d);
			return false;
		}
	}
	return true;
}

bool app_domain_is_ours(struct cw_app *app, const char *domain)
{
	const struct cw_config *cfg = app->cfg;
	const char *own[] = { cfg->domain, cfg->mx_server_name, cfg->xmpp_domain };
	for (size_t i = 0; i < CW_ARRAY_LEN(own); i++)
		if (own[i] && strcmp(own[i], domain) == 0)
			return true;
	/* The components as the adapter read them from xmpp.components. */
	return app->xmpp && xa_serves_domain(app->xmpp, domain);
}

const char *app_bearer(struct cw_req *req)
{
	const char *h = cw_req_header(req, "Authorization");
	if (!h || strncasecmp(h, "Bearer ", 7) != 0)
		return NULL;
	h += 7;
	while (*h == ' ')
		h++;
	return *h ? h : NULL;
}

/* ------------------------------------------------------------- authorize */

void app_unauthenticated(struct cw_req *req, const char *detail)
{
	cw_req_add_header(req, "WWW-Authenticate", "Bearer");
	cw_req_problem(req, 401, "unauthenticated", "Unauthenticated", detail);
}

/* Records that a named admin token was used (at most once a minute per
 * token and process): a write of its own, whose outcome nobody waits for. */
static cw_err touch_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	char id[24];
	snprintf(id, sizeof(id), "%lld", (long long)*(int64_t *)arg);
	const char *p[] = { id };
	return store_command(c, "UPDATE admin_tokens SET last_used_at = now() WHERE id = $1::bigint", 1, p, e);
}

static void touch_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	(void)rc;
	(void)e;
	free(arg);
}

static void admin_touch(struct cw_app *app, int64_t id)
{
	int64_t *arg = malloc(sizeof(*arg));
	if (!arg)
		return;
	*arg = id;
	if (store_write(app->store, touch_fn, touch_done, arg))
		free(arg);
}

/* The admin API's check: a token of any role, or one allowed to change
 * things (auth); false after answering 401 or 403.  Made from the
 * headers, and again after the body (app_authorize). */
static bool admin_authorize(struct cw_app *app, struct cw_req *req, enum cw_auth auth)
{
	const char *token = app_bearer(req);
	if (!app->admins || !admin_tokens_any(app->admins)) {
		cw_req_problem(req, 403, "admin_disabled", "Admin API disabled",
			       "set admin.token_sha256 to enable the admin API");
		return false;
	}
	int64_t touch = 0;
	struct admin_principal *p = token && strlen(token) < 128 ? admin_tokens_check(app->admins, token, &touch) : NULL;
	if (!p) {
		app_unauthenticated(req, "a valid admin bearer token is required");
		return false;
	}
	cw_req_set_principal(req, p, free);
	if (touch)
		admin_touch(app, touch);
	if (auth == CW_AUTH_ADMIN && !p->can_change) {
		cw_req_problem(req, 403, "forbidden", "Not allowed", "this token has the viewer role: it may read, not change");
		return false;
	}
	return true;
}

/* The peer whose bearer token the request carries (the request's
 * principal), or NULL after answering 401 unauthenticated. */
static struct peer_principal *peer_of(struct cw_app *app, struct cw_req *req)
{
	struct peer_principal *p = cw_req_principal(req);
	if (p)
		return p;
	const char *token = app_bearer(req);
	p = token && strlen(token) < 128 ? peer_registry_by_token(app->peers, token) : NULL;
	if (!p) {
		app_unauthenticated(req, APP_PEER_TOKEN_REQUIRED);
		return NULL;
	}
	cw_req_set_principal(req, p, peer_principal_free);
	return p;
}

bool app_authorize_headers(struct cw_req *req, enum cw_auth auth, void *ctx)
{
	struct cw_app *app = ctx;
	switch (auth) {
	case CW_AUTH_NONE:
		return true;
	case CW_AUTH_ADMIN:
	case CW_AUTH_ADMIN_READ:
		/* Admin answers are never kept by a cache: said here, once for
		 * every answer, a refusal's too (until the fortieth session
		 * each of the two checks added it). */
		cw_req_add_header(req, "Cache-Control", "no-store");
		return admin_authorize(app, req, auth);
	case CW_AUTH_PEER:
		return peer_of(app, req) != NULL && peer_headers_ok(req);
	case CW_AUTH_HOMESERVER:
		return matrix_hs_authorized(req, app);
	}
	return false;
}

/* After the body: the token is looked up again, not taken from
 * app_authorize_headers' principal.  A body may take minutes to arrive
 * (sent a byte at a time within the idle timeout), and a token revoked,
 * a peer disabled or rotated meanwhile must not finish what it began: the
 * header-time check is an early refusal only (in the thirty-second
 * session's first version a revoked admin token could still mint a new
 * one that way).  A peer's principal is kept when the peer registry has
 * not changed since it was found (peer_registry_current: the same
 * snapshot, so the lookup would find the same peer and key); any change
 * or reload meanwhile, and it is looked up again.  Until the forty-fourth
 * session every signed request hashed its token and copied its peer twice. */
bool app_authorize(struct cw_req *req, enum cw_auth auth, void *ctx)
{
	struct cw_app *app = ctx;
	switch (auth) {
	case CW_AUTH_NONE:
		return true;
	case CW_AUTH_ADMIN:
	case CW_AUTH_ADMIN_READ:
		cw_req_set_principal(req, NULL, NULL);
		return admin_authorize(app, req, auth);
	case CW_AUTH_PEER: {
		struct peer_principal *p = cw_req_principal(req);
		if (!p || !peer_registry_current(app->peers, p)) {
			cw_req_set_principal(req, NULL, NULL);
			p = peer_of(app, req);
		}
		return p && peer_verify_request(app, req, p);
	}
	case CW_AUTH_HOMESERVER:
		return matrix_hs_authorized(req, app);
	}
	return false;
}

int64_t app_stuck_write_ms(const struct cw_config *cfg)
{
	int64_t ms = 2 * (int64_t)cfg->db_statement_timeout_ms;
	return ms > APP_STUCK_WRITE_MIN_MS ? ms : APP_STUCK_WRITE_MIN_MS;
}

/* The writers of $1 (RowExclusiveLock, taken before an INSERT draws its
 * id and held to the transaction's end), but this session and those open
 * for longer than $2 ms or whose start is not shown (another role's). */
#define HORIZON_WRITERS                                                                                        \
	"FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' "          \
	" AND l.relation = $1::regclass AND l.mode = 'RowExclusiveLock' AND l.granted "                           \
	" AND l.pid IS DISTINCT FROM pg_backend_pid() "                                                           \
	" AND coalesce(a.xact_start > clock_timestamp() - make_interval(secs => $2::bigint / 1000.0), false)"

cw_err app_list_horizon(PGconn *c, struct app_job *j, const char *table, char out[24], cw_errmsg *e)
{
	out[0] = '\0';
	/* The last id first, then the writers: one that drew an id up to it
	 * held the lock before, so it is among them unless it has ended. */
	const char *sp[] = { table };
	PGresult *r = PQexecParams(c,
				   "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence($1, 'id')::regclass), 0)", 1,
				   NULL, sp, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	char last[24];
	snprintf(last, sizeof(last), "%s", PQntuples(r) == 1 ? PQgetvalue(r, 0, 0) : "0");
	PQclear(r);
	char pass[24];
	snprintf(pass, sizeof(pass), "%lld", (long long)app_stuck_write_ms(j->app->cfg));
	const char *wp[] = { table, pass };
	r = PQexecParams(c, "SELECT coalesce(array_agg(l.virtualtransaction), '{}')::text " HORIZON_WRITERS, 2, NULL,
			 wp, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	char *writers = strdup(PQntuples(r) == 1 ? PQgetvalue(r, 0, 0) : "{}");
	PQclear(r);
	if (!writers)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	/* Then until none of them still writes (they end in milliseconds). */
	int64_t until = cw_now_us() + APP_HORIZON_WAIT_MS * 1000LL;
	long nap_us = 1000;
	bool open = strcmp(writers, "{}") != 0;
	while (open) {
		if (cw_now_us() >= until)
			break;
		struct timespec ts = { 0, nap_us * 1000 };
		nanosleep(&ts, NULL);
		nap_us = nap_us < 32000 ? nap_us * 2 : nap_us;
		const char *op[] = { table, pass, writers };
		r = PQexecParams(c,
				 "SELECT EXISTS (SELECT 1 " HORIZON_WRITERS " AND l.virtualtransaction = ANY ($3::text[]))", 3,
				 NULL, op, NULL, NULL, 0);
		if ((rc = store_check(c, r, PGRES_TUPLES_OK, e))) {
			free(writers);
			return rc;
		}
		open = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
		PQclear(r);
	}
	free(writers);
	if (open) {
		app_job_fail(j, 503, "unavailable",
			     "a write to the %s has been open for more than %d ms: the list waits for it, so as not to "
			     "page past a row it may still commit; try again",
			     table, APP_HORIZON_WAIT_MS);
		j->retry_after_ms = 1000;
		return CW_OK;
	}
	snprintf(out, 24, "%s", last);
	return CW_OK;
}
