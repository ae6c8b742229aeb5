/* causewayd: start-up, signals, reload and graceful shutdown. */
#include "config.h"
#include "app.h"
#include "admin_auth.h"
#include "admin_views.h"
#include "log.h"
#include "dispatcher.h"
#include "matrix/matrix.h"
#include "xmpp/xmpp.h"
#include "policy_live.h"
#include "ratelimit.h"
#include "httpsig.h"
#include "peer_out.h"
#include "peer_pull.h"
#include "workers.h"

#include <curl/curl.h>
#include "peer_api.h"
#include "peers.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: causewayd [--config FILE]        run the daemon\n"
		"       causewayd --check-config FILE   validate a configuration file and exit\n"
		"       causewayd --migrate [--config FILE]  apply the schema migrations and exit\n"
		"       causewayd --list-options        print the option table and exit\n"
		"       causewayd --new-admin-token     print a new admin token and its admin.token_sha256\n"
		"       causewayd --matrix-registration [--config FILE]  print the Matrix appservice registration\n"
		"       causewayd --version | --help\n"
		"Every option can also be set by the environment: CAUSEWAY_<SECTION>_<NAME>,\n"
		"e.g. CAUSEWAY_DATABASE_URL. The configuration file may also be named by\n"
		"CAUSEWAY_CONFIG.\n");
}

/* The stop's deadline.  A stop takes the drain (server.drain_timeout_ms)
 * and a few seconds more (the 2 s graces of the threads blocked in the
 * database, the final drain's second); but a database that stops answering
 * without closing anything (its host powered off, a network partition)
 * answers neither the statements nor the cancel requests (PQcancel) sent
 * to it, and until the twenty-fourth session the stop waited for ever.
 * Past the drain plus STOP_REST_MS this thread says what the stop still
 * waits for and exits 1: what that leaves is recovered as after a crash
 * (claimed outbox rows go again when their claim runs out, a request left
 * unanswered is retried under its Idempotency-Key).  10 s: the three 2 s
 * graces and the final drain with 3 s to spare, so that with the default
 * drain (10 s) the daemon is gone within 20 s, under the documented unit's
 * TimeoutStopSec=30 (docs/operations.md).  A second SIGTERM or SIGINT
 * during the stop exits at once: the signals are still blocked in every
 * thread, and this one takes them (sigtimedwait). */
#define STOP_REST_MS 10000

struct stop_guard {
	pthread_t thread;
	bool started;
	sigset_t sigs;
	int64_t until_us;
	_Atomic(const char *) waiting_for; /* the step of the stop under way */
};

/* The guard waits in sigtimedwait alone, and the stop's end cancels it
 * there (stop_guard_end): until the fiftieth session's review it looked
 * at a done flag every 200 ms, and every exit waited up to that for the
 * guard's join, after "stopped" (198-212 ms measured).  Cancelled only in
 * that wait: not while it logs (the log's lock). */
static void *stop_guard_main(void *arg)
{
	cw_thread_name("cw-stop-guard");
	struct stop_guard *g = arg;
	pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
	for (;;) {
		int64_t left = g->until_us - cw_now_us();
		if (left <= 0) {
			LOG_KV(CW_LOG_ERROR, "the stop took too long: exiting without finishing it",
			       "waiting_for", atomic_load(&g->waiting_for));
			_exit(1);
		}
		struct timespec ts = { .tv_sec = (time_t)(left / 1000000), .tv_nsec = (long)(left % 1000000) * 1000 };
		pthread_setcancelstate(PTHREAD_CANCEL_ENABLE, NULL);
		int sig = sigtimedwait(&g->sigs, NULL, &ts);
		pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, NULL);
		if (sig == SIGTERM || sig == SIGINT) {
			LOG_KV(CW_LOG_WARN, "a second signal during the stop: exiting at once", "signal",
			       sig == SIGTERM ? "SIGTERM" : "SIGINT", "waiting_for", atomic_load(&g->waiting_for));
			_exit(1);
		}
	}
	return NULL;
}

static void stop_guard_start(struct stop_guard *g, const sigset_t *sigs, long drain_timeout_ms)
{
	g->sigs = *sigs;
	g->until_us = cw_now_us() + ((int64_t)drain_timeout_ms + STOP_REST_MS) * 1000;
	atomic_store(&g->waiting_for, "the requests in flight");
	g->started = pthread_create(&g->thread, NULL, stop_guard_main, g) == 0;
	if (!g->started)
		LOG_KV(CW_LOG_WARN, "cannot start the stop's guard: the stop has no deadline");
}

static void stop_step(struct stop_guard *g, const char *what)
{
	atomic_store(&g->waiting_for, what);
}

static void stop_guard_end(struct stop_guard *g)
{
	if (!g->started)
		return;
	pthread_cancel(g->thread);
	pthread_join(g->thread, NULL);
	g->started = false;
}

static struct stop_guard stop_guard;

/* Prints a random admin token and the hash that goes into the config. */
static int new_admin_token(void)
{
	unsigned char raw[32], h[32];
	char token[64], hex[65];
	if (cw_random(raw, sizeof(raw))) {
		fprintf(stderr, "causewayd: no randomness\n");
		return 1;
	}
	memcpy(token, "cwa_", 4);
	cw_b64url_encode(token + 4, sizeof(token) - 4, raw, sizeof(raw));
	cw_sha256(token, strlen(token), h);
	cw_hex(hex, h, sizeof(h));
	printf("token = %s\n[admin]\ntoken_sha256 = %s\n", token, hex);
	return 0;
}

/* SIGTERM and SIGINT, blocked from the start (before any thread is made:
 * every thread inherits the mask).  Start-up takes them with sigtimedwait
 * while it waits (for the database, for another process's migrations, for
 * a migration's statement), so that a stop asked for then ends it at once;
 * until the twenty-fourth session they waited in the kernel until "ready"
 * (up to database.startup_timeout_ms), and a daemon whose database came
 * meanwhile started, then stopped.  After "ready", sigwait takes them. */
static sigset_t stop_sigs;
static int stopped_at_start; /* the signal that stopped start-up, or 0 */

/* migrate_stop_fn: waits up to wait_ms for SIGTERM or SIGINT. */
static bool stop_asked(void *arg, int wait_ms)
{
	(void)arg;
	if (stopped_at_start)
		return true;
	struct timespec ts = { wait_ms / 1000, (long)(wait_ms % 1000) * 1000000L };
	int sig = sigtimedwait(&stop_sigs, NULL, &ts);
	if (sig > 0)
		stopped_at_start = sig;
	return stopped_at_start != 0;
}

static const char *stop_signal_name(int sig)
{
	return sig == SIGINT ? "SIGINT" : "SIGTERM";
}

/* store_connect_abortable's give_up: a stop asked for. */
static bool stop_asked_now(void *arg)
{
	return stop_asked(arg, 0);
}

/* Connects, retrying until the start-up timeout, so that the daemon and its
 * database may start together.  A refusal that lasts (a wrong password, a
 * role or database that does not exist: store_connect_abortable's
 * CW_EINVAL) is not retried: until the fifty-second session it was, for
 * database.startup_timeout_ms (30 s, up to an hour), a daemon restarted by
 * its supervisor meanwhile saying only "waiting for the database". */
static PGconn *connect_at_start(const struct cw_config *cfg, cw_errmsg *e)
{
	int64_t until = cw_now_us() + cfg->db_startup_timeout_ms * 1000;
	bool told = false;
	for (;;) {
		cw_err why;
		PGconn *c = store_connect_abortable_why(cfg->db_url, cfg->db_statement_timeout_ms, -1, stop_asked_now,
							NULL, &why, e);
		if (!c && stopped_at_start) {
			cw_fail(e, CW_ESHUTDOWN, "stopped by %s while waiting for the database",
				stop_signal_name(stopped_at_start));
			return NULL;
		}
		if (!c && why == CW_EINVAL) {
			char m[sizeof(e->msg)];
			snprintf(m, sizeof(m), "%s", e->msg);
			cw_fail(e, CW_EINVAL, "%s (not retried: check database.url, its user, password and "
				"database name)", m);
			return NULL;
		}
		if (c || cw_now_us() >= until)
			return c;
		if (!told) {
			LOG_KV(CW_LOG_WARN, "waiting for the database", "detail", e->msg);
			told = true;
		}
		if (stop_asked(NULL, 250)) {
			cw_fail(e, CW_ESHUTDOWN, "stopped by %s while waiting for the database",
				stop_signal_name(stopped_at_start));
			return NULL;
		}
	}
}

/* The local network the configuration gives this daemon: that of its
 * adapter (matrix_new and xa_new make one on the same options), or NULL
 * for a daemon of the peer API alone. */
static const char *configured_network(const struct cw_config *cfg)
{
	if (cfg->mx_homeserver_url && *cfg->mx_homeserver_url)
		return "matrix";
	if (cfg->xmpp_components && *cfg->xmpp_components)
		return "xmpp";
	return NULL;
}

/* Whether a daemon of net may serve a database whose record is rec (NULL:
 * none) and whose local users are of the networks seen (comma-separated,
 * "" none); false after saying why. */
static bool network_allowed(const char *net, const char *rec, const char *seen)
{
	bool ok = false;
	/* No record: the local users found are another network's, or several */
	bool recorded = rec != NULL;
	if (!recorded)
		rec = seen;
	if (!recorded && strchr(seen, ','))
		LOG_KV(CW_LOG_ERROR,
		       "refusing to start: the database has local users of several networks, and one database "
		       "serves one (a local user is one row per address); record the one it serves "
		       "(docs/operations.md, \"One local network per database\") and give the other a deployment "
		       "with its own database",
		       "network", net, "local_users_of", seen);
	else if (strcmp(rec, net) != 0)
		LOG_KV(CW_LOG_ERROR,
		       "refusing to start: this database serves another local network, and two on one database "
		       "are not supported (a local user is one row per address: alice of one network would be "
		       "alice of the other); run this network as a second deployment with its own database, or, "
		       "for a deployment that switched networks before it had local users, change the record "
		       "(docs/operations.md, \"One local network per database\")",
		       "network", net, "database_network", *rec ? rec : "(none: the record vanished, try again)");
	else
		ok = true;
	return ok;
}

/* The database's recorded local network into rec (64 bytes; *recorded),
 * and, only while there is no record, the networks of its local users into
 * seen (comma-separated, "" none): once recorded, the start scans no
 * identities.  False after saying why. */
static bool local_network_read(PGconn *c, char *rec, bool *recorded, char *seen)
{
	PGresult *r = PQexec(c, "SELECT (SELECT value #>> '{}' FROM settings WHERE key = 'instance.local_network'), "
			     "(SELECT coalesce(string_agg(DISTINCT network, ',' ORDER BY network), '') FROM identities "
			     " WHERE is_local AND network <> 'local' "
			     " AND NOT EXISTS (SELECT 1 FROM settings WHERE key = 'instance.local_network'))");
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		LOG_KV(CW_LOG_ERROR, "cannot read the database's local network", "detail", PQresultErrorMessage(r));
		PQclear(r);
		return false;
	}
	*recorded = !PQgetisnull(r, 0, 0);
	snprintf(rec, 64, "%s", *recorded ? PQgetvalue(r, 0, 0) : "");
	snprintf(seen, 64, "%s", PQgetvalue(r, 0, 1));
	PQclear(r);
	return true;
}

/* Before the migrations (run_migrations): a daemon of another network is
 * refused before it changes the database at all.  A newer build of the
 * other network, pointed at it by mistake, applied its migrations before
 * local_network_claim refused it, and the database's own daemons (an
 * older build) then refused to start on a migration they do not know
 * (until the forty-first session's review).  Read only: the record, or
 * the local users' networks of a database older than it; nothing on a
 * database without the tables yet (a new one: the claim records). */
static bool local_network_precheck(PGconn *c, const char *net)
{
	if (!net)
		return true;
	PGresult *r = PQexec(c, "SELECT to_regclass('settings') IS NOT NULL AND to_regclass('identities') IS NOT NULL");
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		LOG_KV(CW_LOG_ERROR, "cannot read the database's local network", "detail", PQresultErrorMessage(r));
		PQclear(r);
		return false;
	}
	bool tables = PQgetvalue(r, 0, 0)[0] == 't';
	PQclear(r);
	if (!tables)
		return true;
	char rec[64], seen[64];
	bool recorded;
	if (!local_network_read(c, rec, &recorded, seen))
		return false;
	/* Not recorded, and no local user of another network: the claim
	 * (after the migrations) records it. */
	return (!recorded && !seen[0]) || network_allowed(net, recorded ? rec : NULL, seen);
}

/* net: the configured local network (configured_network), asked of the
 * database before any migration (local_network_precheck), --migrate's
 * too.  The migrations are checked (and applied) on a connection of their
 * own; with keep, that connection is handed to the caller when they succeed,
 * its session as a fresh connection's (migrate's timeouts undone): until
 * the fifty-eighth session the start made another one at once for the
 * peers, the admin tokens and the local network, and a third for the move
 * of the local users, 3-20 ms each on a loaded machine (a backend forked,
 * its catalog caches cold). */
static int run_migrations(const struct cw_config *cfg, const struct migration_set *set, bool apply, const char *net,
			  PGconn **keep)
{
	cw_errmsg e;
	PGconn *c = connect_at_start(cfg, &e);
	if (!c) {
		if (!stopped_at_start)
			LOG_KV(CW_LOG_ERROR, "database unreachable", "detail", e.msg);
		return 1;
	}
	if (!local_network_precheck(c, net)) {
		PQfinish(c);
		return 1;
	}
	int applied = 0, pending = 0;
	cw_err rc = migrate(c, set, apply, stop_asked, NULL, &applied, &pending, &e);
	if (!rc && keep) {
		/* migrate's SET statement_timeout = 0 and lock_timeout undone:
		 * store_connect's own again.  Not a restatement of the connect's
		 * (the fifty-ninth session's question): without it the peers'
		 * load waited on a locked table until it was released
		 * (test_daemon.py::test_the_start_connection_keeps_the_statement_
		 * timeout_after_the_migrations). */
		char sql[128];
		snprintf(sql, sizeof(sql), "SET statement_timeout = %ld; RESET lock_timeout",
			 cfg->db_statement_timeout_ms);
		if (store_exec(c, sql, &e)) {
			LOG_KV(CW_LOG_ERROR, "database unreachable", "detail", e.msg);
			PQfinish(c);
			return 1;
		}
		*keep = c;
	} else {
		PQfinish(c);
	}
	/* A migration that failed is not a schema that does not match: until
	 * the twenty-fourth session both were told as the latter. */
	if (rc == CW_EINVAL)
		LOG_KV(CW_LOG_ERROR, "refusing to start: the schema does not match", "detail", e.msg);
	else if (rc == CW_ESHUTDOWN)
		LOG_KV(CW_LOG_INFO, "migrations interrupted", "detail", e.msg);
	else if (rc)
		LOG_KV(CW_LOG_ERROR, "migration failed", "detail", e.msg);
	if (rc)
		return 1;
	char a[16], n[16];
	snprintf(a, sizeof(a), "%d", applied);
	snprintf(n, sizeof(n), "%zu", set->n);
	LOG_KV(CW_LOG_INFO, "schema current", "applied_now", a, "migrations", n);
	return 0;
}

/* The local users met before the adapter was configured (network
 * "local") and the rows waiting for them, moved to the adapter's network
 * net, MOVE_BATCH rows a statement, each statement its own transaction.
 * Run to its end, as the migrations are (statement_timeout 0 on the
 * start's connection for the move, set back after it), a wait for a lock
 * bounded by the statement timeout: a one-off rewrite of every such user,
 * under database.statement_timeout_ms until the sixtieth session, was
 * cancelled past some hundred thousand of them (200,000 took 5-9 s on a
 * loaded machine, once past the 10 s default: tests/bench/startup
 * --adapters), and the start failed at every try
 * (test_daemon.py::test_a_move_of_local_users_longer_than_the_statement_
 * timeout_runs_to_its_end).  Until the sixty-first session the move was
 * one statement, which held the row lock of every user it moved for those
 * seconds (a user's profile or block written meanwhile waited, or timed
 * out); a batch holds those of MOVE_BATCH users for 0.15-0.6 s there, and
 * the move in all takes as long (docs/performance.md, "Sixty-first
 * session").  A user's waiting rows move in her batch's statement, with
 * her: moved after every user's batch (as the batches were first
 * written), a row another process wrote meanwhile for her new network was
 * sent before her older one still waiting for "local", the order of her
 * room broken for seconds (a review).  A room's rows (no one recipient)
 * and rows written for "local" meanwhile move after the users.
 * The batches go by id, a range (after, hi] a statement, hi the
 * MOVE_BATCH-th row left to move: an UPDATE of that range by the partial
 * index (migration 055) is as fast a row as the one statement, where one
 * joined to the batch's ids was planned as a hash join over every
 * identity, 300 ms a batch.  A row of the range another process moved
 * meanwhile is waited for, then passed (the UPDATE's own condition, read
 * again on the row committed), so that processes starting together move
 * each row once, and none says "ready" before every row is moved
 * (test_daemons_of_one_network_started_together_move_each_local_user_once).
 * A stop asked for cancels the batch running (as it cancels a migration)
 * or comes between two: the batches committed stay moved, the next start
 * moves the rest (test_a_stop_during_the_move_of_local_users_ends_the_start,
 * test_a_stop_between_two_batches_of_the_move_keeps_the_first).  False after
 * saying why, or stopped (stopped_at_start set). */
#define MOVE_BATCH 20000
static const char *const move_sql[] = {
	"WITH b AS MATERIALIZED (SELECT count(*) AS n, max(id) AS hi FROM (SELECT id FROM identities "
	" WHERE is_local AND network = 'local' AND id > $2::bigint ORDER BY id LIMIT $3::int) x), "
	"u AS (UPDATE identities SET network = $1, updated_at = now() WHERE is_local AND network = 'local' "
	" AND id > $2::bigint AND id <= (SELECT hi FROM b) RETURNING id), "
	"o AS (UPDATE outbox SET destination = $1 WHERE destination = 'local' AND state IN ('pending', 'held') "
	" AND target_identity_id IN (SELECT id FROM u) RETURNING 1) "
	"SELECT (SELECT n FROM b), (SELECT coalesce(hi, 0) FROM b), (SELECT count(*) FROM u), "
	" (SELECT count(*) FROM o)",
	/* after the users: a room's row (no one recipient), and a row written
	 * for one of them meanwhile by another process (for "local", the
	 * user's network then), are met */
	"WITH b AS MATERIALIZED (SELECT count(*) AS n, max(id) AS hi FROM (SELECT id FROM outbox "
	" WHERE destination = 'local' AND state IN ('pending', 'held') AND id > $2::bigint ORDER BY id "
	" LIMIT $3::int) x), "
	"u AS (UPDATE outbox SET destination = $1 WHERE destination = 'local' AND state IN ('pending', 'held') "
	" AND id > $2::bigint AND id <= (SELECT hi FROM b) RETURNING 1) "
	"SELECT (SELECT n FROM b), (SELECT coalesce(hi, 0) FROM b), (SELECT count(*) FROM u)",
};
static bool move_local_users(PGconn *c, const char *net, long statement_timeout_ms)
{
	char sql[128];
	long long moved[2] = { 0, 0 };
	int batches = 0;
	snprintf(sql, sizeof(sql), "SET statement_timeout = 0; SET lock_timeout = %ld", statement_timeout_ms);
	PGresult *r = PQexec(c, sql);
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
	PQclear(r);
	for (int k = 0; ok && k < 2; k++) {
		char after[24] = "0", limit[16];
		snprintf(limit, sizeof(limit), "%d", MOVE_BATCH);
		for (;;) {
			if (stop_asked(NULL, 0))
				break;
			const char *params[] = { net, after, limit };
			bool stopped = false;
			r = PQsendQueryParams(c, move_sql[k], 3, NULL, params, NULL, NULL, 0)
				    ? migrate_result_stoppable(c, stop_asked, NULL, &stopped)
				    : NULL;
			if (stopped) {
				/* cancelled: this batch rolled back, the earlier ones
				 * stay; or the stop came as the batch committed (its
				 * answer read after it), moved then and counted */
				if (PQresultStatus(r) == PGRES_TUPLES_OK) {
					moved[k] += atoll(PQgetvalue(r, 0, 2));
					if (k == 0)
						moved[1] += atoll(PQgetvalue(r, 0, 3));
				}
				PQclear(r);
				break;
			}
			if (!(ok = PQresultStatus(r) == PGRES_TUPLES_OK)) {
				PQclear(r);
				break;
			}
			/* the rows found, the last of them, those moved */
			long long found = atoll(PQgetvalue(r, 0, 0));
			snprintf(after, sizeof(after), "%s", PQgetvalue(r, 0, 1));
			moved[k] += atoll(PQgetvalue(r, 0, 2));
			if (k == 0) /* her rows, moved with her */
				moved[1] += atoll(PQgetvalue(r, 0, 3));
			PQclear(r);
			batches++;
			if (found < MOVE_BATCH)
				break;
		}
		if (stopped_at_start)
			break;
	}
	char users[24], rows[24], nb[16];
	snprintf(users, sizeof(users), "%lld", moved[0]);
	snprintf(rows, sizeof(rows), "%lld", moved[1]);
	snprintf(nb, sizeof(nb), "%d", batches);
	if (ok && stopped_at_start) {
		if (moved[0] || moved[1])
			LOG_KV(CW_LOG_INFO, "the move of local users to the local adapter stopped; the next start "
					    "moves the rest", "network", net, "users", users, "waiting_rows", rows);
		return false;
	}
	if (ok) {
		/* the connection's own timeouts again, for the policy thread that takes it */
		snprintf(sql, sizeof(sql), "SET statement_timeout = %ld; RESET lock_timeout", statement_timeout_ms);
		r = PQexec(c, sql);
		ok = PQresultStatus(r) == PGRES_COMMAND_OK;
		PQclear(r);
	}
	if (!ok) {
		LOG_KV(CW_LOG_ERROR, "cannot move local users to the local adapter", "detail", PQerrorMessage(c),
		       "users_moved", users, "waiting_rows_moved", rows);
		return false;
	}
	if (moved[0] || moved[1])
		LOG_KV(CW_LOG_INFO, "local users now served by the local adapter", "network", net, "users", users,
		       "waiting_rows", rows, "batches", nb);
	return true;
}

/* Every process of one database must sign with the same key: peers pin
 * the one the directory shows, and a file link made by one process opens
 * only in a process of the same key (its MAC key is derived from it).  A
 * process started with a key of its own (a second host without a copy of
 * peer.signing_key_file) would have its pushes refused by every peer, and
 * retried until another process took them.  The key last started with is
 * kept in settings (peer.signing_public_key); a different one is told in
 * the log, not refused: replacing the key on purpose looks the same. */
static void key_compare(PGconn *c, const char *public_b64)
{
	const char *params[] = { public_b64 };
	PGresult *r = PQexecParams(c,
				   "WITH old AS (SELECT value #>> '{}' AS k FROM settings WHERE key = 'peer.signing_public_key'), "
				   "up AS (INSERT INTO settings (key, value, updated_by) "
				   " VALUES ('peer.signing_public_key', to_jsonb($1::text), 'causewayd') "
				   " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_by = excluded.updated_by, "
				   " updated_at = now() WHERE settings.value IS DISTINCT FROM excluded.value RETURNING 1) "
				   "SELECT (SELECT k FROM old), (SELECT count(*) FROM up)",
				   1, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK)
		LOG_KV(CW_LOG_WARN, "cannot compare the signing key with the other processes'", "detail",
		       PQresultErrorMessage(r));
	else if (!PQgetisnull(r, 0, 0) && strcmp(PQgetvalue(r, 0, 0), public_b64) != 0)
		LOG_KV(CW_LOG_WARN,
		       "this process signs with another key than the last one started on this database: peers "
		       "refuse what it signs until they are told its key; give every process the same "
		       "peer.signing_key_file (a key replaced on purpose: tell every peer, docs/operations.md)",
		       "public_key", public_b64, "previous_key", PQgetvalue(r, 0, 0));
	PQclear(r);
}

/* One local network per database (docs/architecture-decisions.md §14): a
 * local user's identity is one row per address, so alice of Matrix and
 * alice of XMPP would be one user, with one set of consents and rooms.
 * The first daemon with a local network records it in settings
 * (instance.local_network); on a database that has local users already (a
 * deployment older than the record) that is the first daemon of their
 * network, and one that has local users of two networks starts no daemon
 * of either until the operator records one (docs/operations.md, "One
 * local network per database").  A daemon of another network is refused
 * before it writes anything, the record too (local_network_precheck, before
 * the migrations).  INSERT ... ON CONFLICT DO NOTHING,
 * then a read in a statement of its own (a snapshot taken after the
 * insert): processes of one network starting together all find the row
 * the first of them wrote.  A daemon without a local network records
 * nothing and is not refused.  Until the forty-first session nothing
 * stopped a daemon of either network on the other's database. */
static bool local_network_claim(PGconn *c, const char *net)
{
	if (!net)
		return true;
	const char *params[] = { net };
	PGresult *r = PQexecParams(c,
				   "WITH seen AS (SELECT string_agg(DISTINCT network, ',' ORDER BY network) AS n, "
				   " count(DISTINCT network) AS k FROM identities WHERE is_local AND network <> 'local' "
				   " AND NOT EXISTS (SELECT 1 FROM settings WHERE key = 'instance.local_network')) "
				   "INSERT INTO settings (key, value, updated_by) "
				   "SELECT 'instance.local_network', to_jsonb(COALESCE(n, $1::text)), 'causewayd' FROM seen "
				   "WHERE (k = 0 OR n = $1) "
				   "AND NOT EXISTS (SELECT 1 FROM settings WHERE key = 'instance.local_network') "
				   "ON CONFLICT (key) DO NOTHING RETURNING value #>> '{}', (SELECT n FROM seen) IS NOT NULL",
				   1, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		LOG_KV(CW_LOG_ERROR, "cannot record the database's local network", "detail", PQresultErrorMessage(r));
		PQclear(r);
		return false;
	}
	if (PQntuples(r) == 1)
		LOG_KV(CW_LOG_INFO, "the database's local network recorded", "network", PQgetvalue(r, 0, 0),
		       "local_users", PQgetvalue(r, 0, 1)[0] == 't' ? "some" : "none");
	PQclear(r);
	/* a statement of its own: its snapshot sees the row another process wrote */
	char rec[64], seen[64];
	bool recorded;
	if (!local_network_read(c, rec, &recorded, seen))
		return false;
	return network_allowed(net, recorded ? rec : NULL, seen);
}


/* The policy thread's reload hook: the admin tokens follow the policy. */
static bool reload_admins(PGconn *c, void *arg)
{
	cw_errmsg e;
	if (!admin_tokens_load(arg, c, &e))
		return true;
	LOG_KV(CW_LOG_WARN, "admin token reload failed; the previous tokens stay in force", "detail", e.msg);
	return false;
}

/* The directory in which the start would create a missing key file: there,
 * and writable by this user (--check-config runs as the daemon's user).
 * Until the thirty-first session --check-config passed a key file in a
 * directory that did not exist, and the start failed. */
static cw_err key_dir_check(const char *file, cw_errmsg *e)
{
	char dir[4096];
	const char *slash = strrchr(file, '/');
	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if ((size_t)(slash - file) >= sizeof(dir))
		return cw_fail(e, CW_EINVAL, "its directory's name is too long");
	else
		snprintf(dir, sizeof(dir), "%.*s", slash == file ? 1 : (int)(slash - file), file);
	struct stat st;
	if (stat(dir, &st) != 0)
		return cw_fail(e, CW_EINVAL, "its directory %s %s (the start creates the key there)", dir,
			       errno == ENOENT ? "does not exist" : strerror(errno));
	if (!S_ISDIR(st.st_mode))
		return cw_fail(e, CW_EINVAL, "%s is not a directory", dir);
	if (access(dir, W_OK | X_OK) != 0)
		return cw_fail(e, CW_EINVAL, "its directory %s is not writable by this user (the start creates the key "
			       "there): %s", dir, strerror(errno));
	return CW_OK;
}

/* What the start reads besides the file, as it would read it: the
 * migrations of database.schema_dir, and peer.signing_key_file (state,
 * not configuration: the start creates it when it is missing, so only one
 * it cannot read, or whose directory it cannot write, is refused).  The
 * error names the option (until the thirty-fourth session --check-config
 * left it unnamed).  *migrations (when not NULL): how many were found.
 * --check-config and a reload (SIGHUP) both ask it. */
static cw_err start_files_check(const struct cw_config *c, size_t *migrations, cw_errmsg *e)
{
	cw_errmsg why;
	struct migration_set set;
	if (migration_set_load(&set, c->schema_dir, &why))
		return cw_fail(e, CW_EINVAL, "database.schema_dir: %s", why.msg);
	if (migrations)
		*migrations = set.n;
	migration_set_free(&set);
	EVP_PKEY *key = NULL;
	cw_err krc = httpsig_key_load(c->signing_key_file, &key, &why);
	EVP_PKEY_free(key);
	if (krc == CW_ENOTFOUND && key_dir_check(c->signing_key_file, &why))
		krc = CW_EINVAL;
	if (krc && krc != CW_ENOTFOUND)
		return cw_fail(e, CW_EINVAL, "peer.signing_key_file: %s", why.msg);
	return CW_OK;
}

/* Into dir the first directory above path (from its own up to the root)
 * that every user may write and that has no sticky bit, and its mode:
 * false if there is none.  A relative path is taken from the working
 * directory; the directories' own links are followed. */
static bool open_dir_above(const char *path, char *dir, size_t len, unsigned *mode)
{
	char cwd[PATH_MAX];
	bool rel = path[0] != '/';
	if (rel && !getcwd(cwd, sizeof(cwd)))
		return false;
	int n = snprintf(dir, len, "%s%s%s", rel ? cwd : "", rel ? "/" : "", path);
	if (n < 0 || (size_t)n >= len)
		return false;
	for (char *slash; (slash = strrchr(dir, '/'));) {
		bool root = slash == dir;
		slash[root] = '\0';
		struct stat st;
		if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode) && (st.st_mode & S_IWOTH) && !(st.st_mode & S_ISVTX)) {
			*mode = (unsigned)(st.st_mode & 07777);
			return true;
		}
		if (root)
			return false;
	}
	return false;
}

/* The configuration file's mode.  spec/quality.md: the secrets the daemon
 * uses itself live in files readable only by it, as peer.signing_key_file
 * must be (httpsig.c refuses it otherwise); until the forty-fourth session
 * the file that holds matrix.as_token, hs_token, xmpp.secret or the
 * database's password was read whatever its mode, without a word.  A file
 * every user may write is refused: anyone on the host could give it their
 * own admin.token_sha256 (in force at the next reload) or another
 * database.  One every user may read is told (a warning, not a refusal: a
 * container's mounted file is often 0644, and the host's other users may
 * be none), naming the first secret it holds (cw_config.file_secret),
 * even one the environment sets too (CAUSEWAY_<SECTION>_<NAME>, which
 * wins): until the forty-seventh session's review that was not said, and
 * the file still gave the secret away.
 * A file in a directory every user may write, without the sticky bit
 * (o+w, not +t), or under one, or a link into such a place (or in one),
 * is refused as well: any user may rename it, or the directory it is in,
 * and put their own in its place, as good as writing it; until the
 * fiftieth session's review only the file's own mode was looked at.
 * The group is left alone: root:causeway 0640 is the usual install.
 * Returns 0, or 1 after filling why with the warning, or 2 with the
 * refusal. */
static int config_file_mode(const char *path, const struct cw_config *c, char *why, size_t len)
{
	struct stat st;
	if (!path || stat(path, &st) != 0)
		return 0; /* cfg_load read it; gone since, the next read says so */
	unsigned mode = (unsigned)(st.st_mode & 07777);
	if (st.st_mode & S_IWOTH) {
		snprintf(why, len, "%s has mode %04o: every user of the host may change it (the database, the admin "
			 "token's hash); chmod o-w, and keep it readable by the daemon alone when it holds secrets "
			 "(chmod 600)", path, mode);
		return 2;
	}
	char real[PATH_MAX], dir[PATH_MAX];
	unsigned dir_mode;
	bool in_link = false;
	if (open_dir_above(path, dir, sizeof(dir), &dir_mode) ||
	    (in_link = realpath(path, real) && open_dir_above(real, dir, sizeof(dir), &dir_mode))) {
		snprintf(why, len, "%.100s%s%.100s is in %.100s, mode %04o: every user of the host may put another file "
			 "in its place (the database, the admin token's hash); chmod o-w (or +t) that directory, or keep "
			 "the file elsewhere", path, in_link ? ", a link to " : "", in_link ? real : "", dir, dir_mode);
		return 2;
	}
	const struct cfg_option *o = c->file_secret;
	if (!(st.st_mode & S_IROTH) || !o)
		return 0;
	char env[128];
	cfg_env_name(o, env, sizeof(env));
	bool in_env = getenv(env) != NULL;
	snprintf(why, len, "%s has mode %04o: every user of the host may read it, and it holds %s.%s%s; chmod o-r (600, "
		 "or 640 with the daemon's group), or %s (%s)%s", path, mode, o->section, o->name,
		 strcmp(o->section, "database") == 0 ? "'s password" : "",
		 in_env ? "take it out of the file: the environment sets it too" : "set it by the environment", env,
		 in_env ? ", and wins" : "");
	return 1;
}

/* A file the start would refuse is refused whole, the running
 * configuration kept: cfg_load's checks, and the start's reading of
 * database.schema_dir and peer.signing_key_file (start_files_check).  Both
 * are restart-only, so a usable new value waits for the restart (as every
 * such option's: cfg_apply_reload says so); an unusable one was taken
 * until the thirty-sixth session, said "takes effect after a restart",
 * and the restart then failed. */
static void reload(struct cw_app *app, const char *path)
{
	struct cw_config next;
	cw_errmsg e;
	if (cfg_load(&next, path, NULL, &e)) {
		LOG_KV(CW_LOG_ERROR, "reload refused: configuration invalid; keeping the running one", "detail", e.msg);
		return;
	}
	char why[512];
	int exposed = config_file_mode(path, &next, why, sizeof(why));
	if (exposed == 2) {
		LOG_KV(CW_LOG_ERROR, "reload refused: configuration invalid; keeping the running one", "detail", why);
		cfg_free(&next);
		return;
	}
	if (exposed == 1)
		LOG_KV(CW_LOG_WARN, "the configuration file is readable by every user", "detail", why);
	if (start_files_check(&next, NULL, &e)) {
		LOG_KV(CW_LOG_ERROR, "reload refused: configuration invalid; keeping the running one", "detail", e.msg);
		cfg_free(&next);
		return;
	}
	int n = cfg_apply_reload(app->cfg, &next);
	cfg_free(&next);
	cw_log_set_level((int)app->cfg->log_level);
	cw_http_set_access_log(app->http, app->cfg->access_log);
	/* The bootstrap token follows admin.token_sha256 (checked by
	 * cfg_load: empty, or 64 hex digits; empty turns it off): a leaked
	 * one is replaced by a reload of every process, not a restart (until
	 * the fortieth session the option waited for one). */
	unsigned char h[32];
	bool set = app->cfg->admin_token_sha256 && cw_unhex(app->cfg->admin_token_sha256, h, sizeof(h));
	admin_tokens_set_config(app->admins, set ? h : NULL);
	char cnt[16];
	snprintf(cnt, sizeof(cnt), "%d", n);
	LOG_KV(CW_LOG_INFO, "configuration reloaded", "changed", cnt);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "check-config", required_argument, NULL, 'C' },
		{ "migrate", no_argument, NULL, 'm' },
		{ "list-options", no_argument, NULL, 'L' },
		{ "new-admin-token", no_argument, NULL, 'T' },
		{ "matrix-registration", no_argument, NULL, 'R' },
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *config_path = getenv("CAUSEWAY_CONFIG");
	const char *check_path = NULL;
	bool only_migrate = false, registration = false;
	/* First of all: until the thirty-first session they were blocked only
	 * after the configuration and the migrations were read, and a SIGHUP
	 * in those milliseconds (a reload sent as the service started) killed
	 * the daemon.  Held now, they are taken as below: TERM and INT stop
	 * the start-up (stop_asked), a HUP is a reload once ready (to
	 * --migrate and the one-shot commands it is nothing). */
	sigemptyset(&stop_sigs);
	sigaddset(&stop_sigs, SIGTERM);
	sigaddset(&stop_sigs, SIGINT);
	sigset_t early = stop_sigs;
	sigaddset(&early, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &early, NULL);
	int opt;
	while ((opt = getopt_long(argc, argv, "c:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 'c': config_path = optarg; break;
		case 'C': check_path = optarg; break;
		case 'm': only_migrate = true; break;
		case 'R': registration = true; break;
		case 'L': cfg_list_options(stdout); return 0;
		case 'T': return new_admin_token();
		case 'V': printf("causewayd %s\n", PACKAGE_VERSION); return 0;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		usage(stderr);
		return 2;
	}
	if (config_path && !*config_path)
		config_path = NULL;

	struct cw_config cfg;
	cw_errmsg e;
	if (check_path) {
		if (cfg_load(&cfg, check_path, NULL, &e)) {
			fprintf(stderr, "causewayd: %s\n", e.msg);
			return 1;
		}
		char why[512];
		int exposed = config_file_mode(check_path, &cfg, why, sizeof(why));
		if (exposed) {
			fprintf(stderr, "causewayd: %s%s\n", exposed == 1 ? "warning: " : "", why);
			if (exposed == 2) {
				cfg_free(&cfg);
				return 1;
			}
		}
		size_t n;
		if (start_files_check(&cfg, &n, &e)) {
			fprintf(stderr, "causewayd: %s\n", e.msg);
			cfg_free(&cfg);
			return 1;
		}
		printf("%s: configuration valid (%zu migrations in %s)\n", check_path, n, cfg.schema_dir);
		cfg_free(&cfg);
		return 0;
	}

	if (registration) {
		if (cfg_load_registration(&cfg, config_path, NULL, &e)) {
			fprintf(stderr, "causewayd: %s\n", e.msg);
			return 1;
		}
		int rc = matrix_print_registration(&cfg, stdout);
		cfg_free(&cfg);
		return rc;
	}

	int64_t t0 = cw_now_us();
	curl_global_init(CURL_GLOBAL_DEFAULT);
	if (cfg_load(&cfg, config_path, NULL, &e)) {
		LOG_KV(CW_LOG_ERROR, "configuration invalid", "detail", e.msg);
		return 1;
	}
	{
		char why[512];
		int exposed = config_file_mode(config_path, &cfg, why, sizeof(why));
		if (exposed == 2) {
			LOG_KV(CW_LOG_ERROR, "configuration invalid", "detail", why);
			cfg_free(&cfg);
			return 1;
		}
		if (exposed == 1)
			LOG_KV(CW_LOG_WARN, "the configuration file is readable by every user", "detail", why);
	}
	cw_log_set_level((int)cfg.log_level);
	cw_log_flusher_start(); /* the counts of limited lines (LOG_KV_LIMITED), each second; it takes no signal */

	struct cw_app app = { .cfg = &cfg, .started_wall_ms = cw_wall_ms() };
	if (migration_set_load(&app.migrations, cfg.schema_dir, &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot read the migrations", "option", "database.schema_dir", "detail", e.msg);
		cfg_free(&cfg);
		return 1;
	}
	if (only_migrate) {
		/* Stopped, it exits 1: the schema is not current. */
		int rc = run_migrations(&cfg, &app.migrations, true, configured_network(&cfg), NULL);
		if (stopped_at_start)
			LOG_KV(CW_LOG_INFO, "stopped before the schema was current", "signal",
			       stop_signal_name(stopped_at_start));
		migration_set_free(&app.migrations);
		cfg_free(&cfg);
		return rc;
	}

	/* Signals go to this thread only, through sigwait; every other thread
	 * is started with them blocked. */
	sigset_t sigs = stop_sigs;
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);

	int exit_code = 1;
	/* The start's connection: the migrations', then the peers', the admin
	 * tokens', the local network's, the key's and the local users' move's;
	 * then the policy thread's. */
	PGconn *start_conn = NULL;
	/* Before the migrations: a key file that cannot be read stops the
	 * start before it changes the database (until the twenty-fourth
	 * session it was read after them). */
	if (httpsig_key_load_or_create(cfg.signing_key_file, &app.signing_key, &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot load or create the signing key", "file", cfg.signing_key_file,
		       "detail", e.msg);
		goto out_migrations;
	}
	httpsig_ed25519_public_base64(app.signing_key, app.public_key_b64, sizeof(app.public_key_b64));
	if (!media_key_derive(app.signing_key, app.media_key)) {
		LOG_KV(CW_LOG_ERROR, "cannot derive the media token key from the signing key", "file",
		       cfg.signing_key_file);
		goto out_migrations;
	}
	if (run_migrations(&cfg, &app.migrations, true, configured_network(&cfg), &start_conn))
		goto out_migrations;
	{
		unsigned char h[32];
		/* conf.c checked it: empty, or 64 hex digits */
		bool set = cfg.admin_token_sha256 && cw_unhex(cfg.admin_token_sha256, h, sizeof(h));
		app.views = admin_views_new();
		if (!(app.admins = admin_tokens_new(set ? h : NULL)) || !app.views) {
			LOG_KV(CW_LOG_ERROR, "out of memory");
			goto out_migrations;
		}
	}
	/* The replay window covers a signature's whole life: twice the skew. */
	app.replay = httpsig_replay_new((size_t)cfg.replay_cache_entries, 2 * cfg.max_clock_skew_s);
	if (!cfg.domain || !*cfg.domain)
		LOG_KV(CW_LOG_WARN, "server.domain is not set: the interop API answers 503 until it is");
	app.peers = peer_registry_new();
	app.submits = submit_queue_new();
	/* Each made before anything is served: a replay cache that could not
	 * be had (peer.replay_cache_entries past the memory the process may
	 * take) started "ready" all the same, and refused every peer's signed
	 * request (until the forty-seventh session's review). */
	if (!app.replay || !app.peers || !app.submits) {
		LOG_KV(CW_LOG_ERROR, "out of memory", "detail",
		       !app.replay  ? "the signatures' replay cache (peer.replay_cache_entries)"
		       : !app.peers ? "the peer registry"
				    : "the submit queue");
		goto out_migrations;
	}
	/* The adapters are made (no thread, no connection yet) before the
	 * start's connection serves the move of the local users to theirs,
	 * which it does before the policy thread starts (below). */
	if (matrix_new(&app.matrix, &app, &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot start the Matrix adapter", "detail", e.msg);
		goto out_migrations;
	}
	if (xa_new(&app.xmpp, &app, &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot start the XMPP adapter", "detail", e.msg);
		goto out_migrations;
	}
	{
		PGconn *c = start_conn;
		if (peer_registry_load(app.peers, c, &e) || admin_tokens_load(app.admins, c, &e)) {
			LOG_KV(CW_LOG_ERROR, "cannot load the peers and admin tokens", "detail", e.msg);
			goto out_migrations;
		}
		/* Before anything this process writes (key_compare, the policy
		 * thread's sweeps, the move of local users below). */
		if (!local_network_claim(c, configured_network(&cfg)))
			goto out_migrations;
		key_compare(c, app.public_key_b64);
		if (app.matrix || app.xmpp) {
			/* This provider's users met before the adapter was configured
			 * ("local": no adapter) are its users now, and what waits for
			 * them goes there: moved before the policy thread's first
			 * load and sweep, which see them moved. */
			if (!move_local_users(c, app_local_network(&app), cfg.db_statement_timeout_ms))
				goto out_migrations;
		}
	}
	/* Handed to the policy thread, its first connection (LISTEN, the
	 * sweep's statements prepared, the load), not left idle: until the
	 * fifty-ninth session the move above came after the policy thread's
	 * start (10-50 ms, or as long as a lock on a table it reads is held)
	 * and the adapters', this connection idle meanwhile, so that an
	 * idle_session_timeout shorter than that, or a PostgreSQL restart in
	 * that window, failed the move and the start (exit 1), where the
	 * fifty-seventh session's fresh connection had not.  The policy thread
	 * made a connection of its own besides (docs/performance.md,
	 * "Fifty-ninth session"). */
	app.limits = ratelimit_new((size_t)cfg.policy_rate_buckets);
	if (!app.limits) {
		LOG_KV(CW_LOG_ERROR, "cannot load the policy", "detail", "out of memory");
		goto out_migrations;
	}
	struct policy_live_opts po = {
		.url = cfg.db_url, .statement_timeout_ms = cfg.db_statement_timeout_ms,
		.sweep_interval_ms = cfg.policy_sweep_interval_ms, .reload_interval_s = cfg.policy_reload_interval_s,
		.reconnect_max_ms = cfg.db_reconnect_max_ms,
		.retention = &cfg, .on_reload = reload_admins, .reload_arg = app.admins,
		.conn = start_conn, /* taken */
	};
	start_conn = NULL;
	if (policy_live_start(&app.policy, &po, &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot load the policy", "detail", e.msg);
		goto out_migrations;
	}

	static const struct store_stmt *const stmt_lists[] = { peer_api_read_statements, peer_api_statements,
							       matrix_statements, NULL };
	static const struct store_stmt *const reader_lists[] = { peer_api_read_statements, matrix_statements, NULL };
	struct store_opts so = {
		.url = cfg.db_url,
		.readers = (int)cfg.db_pool_size,
		.batch_max = (int)cfg.db_batch_max,
		.batch_delay_us = cfg.db_batch_delay_us,
		.deadline_us = cfg.db_request_timeout_ms * 1000,
		.statement_timeout_ms = cfg.db_statement_timeout_ms,
		.reconnect_max_ms = cfg.db_reconnect_max_ms,
		.stmts = stmt_lists,
		.reader_stmts = reader_lists,
	};
	if (store_open(&app.store, &so, &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot start the store", "detail", e.msg);
		goto out_migrations;
	}
	if (cw_workers_start(&app.fetchers, (int)cfg.media_fetches, "cw-fetch", &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot start the file fetchers", "detail", e.msg);
		goto out_store;
	}
	xa_start(app.xmpp); /* early: its sockets get low descriptors (libstrophe uses select()) */
	if (peer_pull_start(&app.pull, &app, cfg.db_url, cfg.db_statement_timeout_ms, app.peers, &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot start the pull stream", "detail", e.msg);
		goto out_store;
	}
	struct peer_out *pout = peer_out_new(&app, app.signing_key, cfg.domain ? cfg.domain : "", cfg.signature_tag,
					     cfg.http_timeout_ms);
	char dname[300], host[256] = "localhost";
	gethostname(host, sizeof(host) - 1);
	/* host:pid and a random part: a process restarted in a container has
	 * its predecessor's hostname and pid, and must not take the rows that
	 * one claimed for its own (they come back when their claims run out). */
	uint32_t nonce = 0;
	cw_random(&nonce, sizeof(nonce));
	snprintf(dname, sizeof(dname), "%.200s:%d:%08x", host, (int)getpid(), (unsigned)nonce);
	struct dispatcher_opts dopt = {
		.url = cfg.db_url, .name = dname, .batch_max = (int)cfg.dispatch_batch_max, .lanes = (int)cfg.dispatch_lanes,
		.claim_bytes = (long)cfg.max_body_bytes,
		.retry_budget = (int)cfg.retry_budget, .retry_base_ms = cfg.retry_base_ms,
		.retry_max_ms = cfg.retry_max_ms, .claim_timeout_s = cfg.claim_timeout_s, .reconnect_max_ms = cfg.db_reconnect_max_ms,
		.typing_stale_ms = cfg.typing_stale_ms,
		.peer_deliver = peer_out_deliver, .peer_ctx = pout,
		.local_deliver = app.matrix ? matrix_deliver : app.xmpp ? xa_deliver : NULL,
		.local_ctx = app.matrix ? (void *)app.matrix : (void *)app.xmpp,
		.local_destination = app_local_network(&app),
		.local_omits = app.matrix ? 0 : app.xmpp ? XA_CLAIM_OMITS : 0,
		.local_ready = app.matrix ? matrix_ready : app.xmpp ? xa_ready : NULL,
		.policy = app.policy,
	};
	if (!pout || dispatcher_start(&app.dispatcher, &dopt, &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot start the dispatcher", "detail", pout ? e.msg : "out of memory");
		peer_out_free(pout);
		goto out_store;
	}
	struct cw_http_opts ho = {
		.listen_address = cfg.listen_address,
		.port = (unsigned)cfg.port,
		.threads = (unsigned)cfg.http_threads,
		.connection_limit = (unsigned)cfg.connection_limit,
		.connection_limit_per_client = (unsigned)cfg.connection_limit_per_client,
		.connection_timeout_s = (unsigned)cfg.connection_timeout_s,
		.max_body_bytes = (size_t)cfg.max_body_bytes,
		.large_body_routes = matrix_transaction_routes,
		.large_body_ok = matrix_large_body_ok,
		.no_head_routes = app_no_head_routes,
		.max_large_body_bytes = app.matrix ? (size_t)cfg.mx_max_txn_bytes : 0,
		.routes = app_routes,
		.nroutes = app_nroutes,
		.ctx = &app,
		.authorize_headers = app_authorize_headers,
		.authorize = app_authorize,
		.unmatched = matrix_unmatched,
	};
	if (cw_http_start(&app.http, &ho, &e)) {
		LOG_KV(CW_LOG_ERROR, "cannot start the HTTP front", "detail", e.msg);
		dispatcher_free(app.dispatcher);
		peer_out_free(pout);
		goto out_store;
	}
	cw_http_set_access_log(app.http, cfg.access_log);
	matrix_ping_start(app.matrix); /* the homeserver pings back: the HTTP front must be up */

	char url[300], ms[32], port[16], pid[16];
	cw_http_local_url(cfg.listen_address, cw_http_port(app.http), url, sizeof(url));
	snprintf(ms, sizeof(ms), "%.1f", (double)(cw_now_us() - t0) / 1000.0);
	snprintf(port, sizeof(port), "%u", cw_http_port(app.http));
	snprintf(pid, sizeof(pid), "%d", (int)getpid());
	LOG_KV(CW_LOG_INFO, "ready", "url", url, "port", port, "startup_ms", ms, "version", PACKAGE_VERSION,
	       "pid", pid);

	int stop_signal = SIGTERM;
	for (;;) {
		int sig = 0;
		if (sigwait(&sigs, &sig) != 0)
			continue;
		if (sig == SIGHUP) {
			if (config_path)
				reload(&app, config_path);
			else
				LOG_KV(CW_LOG_WARN, "SIGHUP ignored: no configuration file to reload");
			continue;
		}
		stop_signal = sig;
		break;
	}

	/* Stop taking connections (before saying so: "stopping" in the log
	 * means new connections are refused), let the requests in flight
	 * finish, then fail whatever still waits on the database so that every
	 * suspended request is resumed before libmicrohttpd stops. */
	int64_t t_stop = cw_now_us();
	stop_guard_start(&stop_guard, &sigs, cfg.drain_timeout_ms);
	cw_http_quiesce(app.http);
	LOG_KV(CW_LOG_INFO, "stopping", "signal", stop_signal == SIGTERM ? "SIGTERM" : "SIGINT");
	peer_pull_stop(app.pull); /* long-polls answer now: they would hold the drain */
	matrix_stop_parking(app.matrix); /* and so would transactions parked behind a ghost's join */
	bool idle = cw_http_drain(app.http, cfg.drain_timeout_ms);
	app_afters_wait(&app); /* the requests they resume are not abandoned: they use what stops below */
	atomic_store(&app.stopping, true); /* file transfers still running end now (media.h) */
	stop_step(&stop_guard, "the dispatcher");
	dispatcher_stop(app.dispatcher);
	stop_step(&stop_guard, "the XMPP component");
	xa_stop(app.xmpp);
	/* The Matrix adapter's threads (the bot, the ping, the media
	 * workers) stop before "stopped" is said, and while the store still
	 * takes the jobs they may be finishing: until the fiftieth session's
	 * review they were stopped after it (out_store, matrix_free), and a
	 * thread inside a homeserver request (an upload) kept the process
	 * alive past "stopped", its time not in shutdown_ms and the stop's
	 * guard naming "the last clean-up". */
	stop_step(&stop_guard, "the Matrix adapter");
	matrix_stop(app.matrix);
	stop_step(&stop_guard, "the fetchers");
	cw_workers_stop(app.fetchers); /* their requests are answered: before the HTTP front stops */
	stop_step(&stop_guard, "the policy thread");
	policy_live_stop(app.policy);
	stop_step(&stop_guard, "the deliveries to peers");
	peer_out_free(pout);
	stop_step(&stop_guard, "the store");
	store_stop(app.store);
	/* A job the stop of the store finished may have started its after
	 * hook only now (job_done): its request is answered before the HTTP
	 * front stops, which it may not find suspended. */
	stop_step(&stop_guard, "the requests in flight");
	app_afters_wait(&app);
	if (!idle)
		idle = cw_http_drain(app.http, 1000);
	char left[16];
	snprintf(left, sizeof(left), "%ld", cw_http_in_flight(app.http));
	stop_step(&stop_guard, "the HTTP front");
	cw_http_stop(app.http);
	dispatcher_free(app.dispatcher);
	stop_step(&stop_guard, "the last clean-up");
	cw_log_flusher_stop();
	cw_log_limits_flush_all(); /* no line comes after to tell them */
	snprintf(ms, sizeof(ms), "%.1f", (double)(cw_now_us() - t_stop) / 1000.0);
	LOG_KV(CW_LOG_INFO, "stopped", "drained", idle ? "true" : "false", "abandoned_requests", left,
	       "shutdown_ms", ms);
	exit_code = 0;
out_store:
	xa_stop(app.xmpp); /* its jobs use the store */
	matrix_stop(app.matrix); /* and so do the bot's (stopped already after "ready") */
	cw_workers_free(app.fetchers); /* and so do the fetchers' */
	peer_pull_free(app.pull);
	store_close(app.store);
	app_probes_free(&app); /* every probe answered: the store's reads are done */
out_migrations:
	PQfinish(start_conn); /* a start that failed before its end */
	if (stopped_at_start) {
		/* A stop asked for during start-up is a stop: exit 0, as after "ready". */
		LOG_KV(CW_LOG_INFO, "stopped before ready", "signal", stop_signal_name(stopped_at_start));
		exit_code = 0;
	}
	matrix_free(app.matrix);
	xa_free(app.xmpp);
	policy_live_free(app.policy);
	ratelimit_free(app.limits);
	submit_queue_free(app.submits);
	peer_registry_free(app.peers);
	admin_tokens_free(app.admins);
	admin_views_free(app.views);
	httpsig_replay_free(app.replay);
	EVP_PKEY_free(app.signing_key);
	migration_set_free(&app.migrations);
	cfg_free(&cfg);
	curl_global_cleanup();
	cw_log_flusher_stop(); /* stopped already, unless start-up failed */
	cw_log_limits_flush_all();
	stop_guard_end(&stop_guard);
	return exit_code;
}
