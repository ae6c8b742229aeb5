/* libpq connections, the group-commit writer and the reader threads. */
#include "config.h"
#include "store.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct job {
	store_fn fn;                     /* plain job, or */
	const struct store_pipe_ops *pipe; /* pipelined job */
	bool going;                      /* pipelined: wants another round */
	store_done_fn done;
	void *arg;
	int64_t enqueued_us;
	int64_t deadline_us;
	cw_err rc;
	cw_errmsg err;
	int retries;                     /* runs again after a deadlock (CW_ERETRY) */
	int64_t pause_us;                /* to wait before the next (set by retry_job, taken by run_batch) */
	bool patient;                    /* a read that waits for the database (store_read_patient) */
	int64_t not_before_us;           /* a read queued for later: not run before (store_read_patient_after) */
	int64_t until_us;                /* its deadline's cap, 0: none (store_read_patient_after's until_us) */
	struct job *next;
};

/* How often a write that lost a deadlock is run again (with its batch)
 * before it fails: two transactions that insert the same new keys in
 * different orders (a user's first message and the first delivery to
 * them, say) deadlock, PostgreSQL rolls one back, and its second run finds
 * the other's rows.  Each run again comes after a short pause
 * (store_retry_pause_us, retry_pause). */
#define STORE_RETRIES 3

/* Whether j's failure rc is one to run again: a lost deadlock (counted,
 * and paused for), or a statement the watchdog cancelled (cancelled: at
 * the batch's first deadline, which may be another job's; a job whose own
 * deadline has passed is failed before the batch runs again). */
static bool retry_job(struct job *j, cw_err rc, bool cancelled)
{
	if (rc == CW_ETIMEDOUT && cancelled) {
		j->err.msg[0] = '\0';
		return true;
	}
	if (rc != CW_ERETRY || j->retries >= STORE_RETRIES)
		return false;
	j->retries++;
	j->err.msg[0] = '\0';
	unsigned char r = 0;
	cw_random(&r, 1);
	j->pause_us = store_retry_pause_us(j->retries, r);
	return true;
}

struct queue {
	struct job *head, *tail;
	long n;
};

struct conn {
	PGconn *c;
	const char *name;              /* "writer", "reader": for the log */
	struct store_canceller cancel; /* c's statement, cancelled at a stop that waits for it */
	/* Under watch_mu, the watchdog's look at c (watch_arm): until when
	 * its statements may run (0: not watched); when the watchdog cancels
	 * the one running next (the deadline, then again every
	 * WATCH_AGAIN_US; 0: no cancels, kill_only or the watch ending);
	 * since when a cancel request of the watchdog's is on its way (0:
	 * none); whether one was sent since watch_arm; and whether the
	 * watchdog shut c's socket down (killed: c is finished, never used
	 * again), and whether for a server that did not answer (dead; not:
	 * a statement that ran on past its deadline while it answered).  A
	 * kill_only watch past its time asks the server with a ping (probe:
	 * the one on its way, since probe_sent_us; the next at probe_next_us;
	 * probe_told: the wait was logged).  fd is a duplicate of c's socket (-1: none), the one shut
	 * down: it stays open until c is finished, so that its number never
	 * names another file that took a closed one's.  watch_cv: the owner
	 * waits there for a cancel on its way (watch_disarm). */
	pthread_mutex_t watch_mu;
	pthread_cond_t watch_cv;
	int64_t watch_until_us, watch_us, cancel_sent_us;
	bool kill_only, watch_fired, killed, dead;
	struct store_probe *probe;
	int64_t probe_sent_us, probe_next_us;
	bool probe_told;
	int fd;
	struct store_backoff backoff; /* its connects' pace while the database is away */
	int failures;
	bool was_up;
	bool unprepared; /* connected, its statements not prepared yet (conn_ensure_to) */
};

struct reader {
	struct cw_store *s;
	pthread_t thread;
	struct conn conn;
};

struct cw_store {
	struct store_opts o;
	char *url;
	pthread_mutex_t mu;
	pthread_cond_t wcond;   /* the writer waits on it */
	pthread_cond_t rcond;   /* the readers wait on it */
	pthread_cond_t dcond;   /* the watchdog waits on it */
	int64_t watch_wake_us;  /* when the watchdog looks next (under mu) */
	bool watch_stop;        /* under mu: the watchdog ends (after the threads it watches) */
	bool watchdog_started;
	pthread_t watchdog;
	struct queue wq, rq;
	struct queue dq;        /* reads queued for later (store_read_patient_after), in no order: the watchdog
				 * moves each to rq at its time (delayed_due) */
	size_t last_batch;      /* writes in the writer's last batch, 0 before the first (under mu) */
	bool stopping;
	pthread_t writer;
	struct conn wconn;
	struct reader *readers;
	atomic_bool db_up;
	atomic_int conns_up;
	atomic_int readers_busy;
	atomic_uint_fast64_t batches, writes_committed, writes_failed, reads_done, reconnects;
	atomic_uint_fast64_t write_retries, retry_pause_us;
};

/* ------------------------------------------------------------ the planner */

size_t gc_plan(size_t queued, int64_t oldest_age_us, size_t batch_max, int64_t delay_us, int64_t *wait_us)
{
	*wait_us = -1;
	if (queued == 0)
		return 0;
	if (queued >= batch_max)
		return batch_max;
	if (oldest_age_us >= delay_us)
		return queued;
	*wait_us = delay_us - oldest_age_us;
	return 0;
}

int64_t store_retry_pause_us(int retry, unsigned char r)
{
	return store_jitter(store_backoff_nth(retry, 4000, 128000), r); /* from the sixth on, 64-128 ms */
}

/* ---------------------------------------------------------------- queues */

static void q_push(struct queue *q, struct job *j)
{
	j->next = NULL;
	if (q->tail)
		q->tail->next = j;
	else
		q->head = j;
	q->tail = j;
	q->n++;
}

/* Pushes j into q (the readers' queue) by its deadline: after the last job
 * whose deadline is not later, so that the deadlines still follow the
 * queue's order (expire_queue) when j's was capped (its until_us) below
 * those of jobs queued before it. */
static void q_push_by_deadline(struct queue *q, struct job *j)
{
	if (!q->tail || q->tail->deadline_us <= j->deadline_us) {
		q_push(q, j);
		return;
	}
	struct job **at = &q->head;
	while (*at && (*at)->deadline_us <= j->deadline_us)
		at = &(*at)->next;
	j->next = *at;
	*at = j;
	q->n++;
}

/* Detaches the first n jobs as a list. */
static struct job *q_take(struct queue *q, size_t n)
{
	struct job *first = q->head, *last = NULL;
	for (size_t i = 0; i < n && q->head; i++) {
		last = q->head;
		q->head = q->head->next;
		q->n--;
	}
	if (last)
		last->next = NULL;
	if (!q->head)
		q->tail = NULL;
	return first;
}

static void finish(struct job *j)
{
	j->done(j->arg, j->rc, &j->err);
	free(j);
}

static void finish_list(struct job *j)
{
	while (j) {
		struct job *next = j->next;
		finish(j);
		j = next;
	}
}

static void fail_list(struct job *j, cw_err rc, const char *why)
{
	for (struct job *k = j; k; k = k->next) {
		k->rc = rc;
		snprintf(k->err.msg, sizeof(k->err.msg), "%s", why);
	}
	finish_list(j);
}

/* ----------------------------------------------------------- connections */

/* The error for r, whose status is not the caller's want (its name, or
 * NULL: not known here); piped: r is a pipelined statement's, read by
 * store_pipe_result (the connection in pipeline mode, as it should be). */
static cw_err result_err(PGconn *c, const PGresult *r, const char *want, bool piped, cw_errmsg *e)
{
	if (PQstatus(c) != CONNECTION_OK)
		return cw_fail(e, CW_EUNAVAIL, "database connection lost: %s", PQerrorMessage(c));
	/* A statement that ran well, with another status than its caller
	 * wanted (rows where a command was asked for, or none where rows
	 * were: the statement's text and the code reading it disagree): a
	 * bug, which the same request meets again.  Such a result has no
	 * SQLSTATE, and until the fifty-sixth session was taken below for
	 * libpq's own error: "database connection lost", CW_EUNAVAIL, on
	 * which a reader drops its good connection and runs the read again,
	 * a patient one until its deadline, and the client is told 503. */
	ExecStatusType got = PQresultStatus(r);
	if (r && got != PGRES_FATAL_ERROR && got != PGRES_NONFATAL_ERROR && got != PGRES_BAD_RESPONSE &&
	    got != PGRES_PIPELINE_ABORTED)
		return want ? cw_fail(e, CW_EINTERNAL, "a statement's result is %s where %s was wanted", PQresStatus(got),
				      want)
			    : cw_fail(e, CW_EINTERNAL, "a statement's result (%s) is not the one its caller wanted",
				      PQresStatus(got));
	/* A statement not run as an earlier one of its pipeline failed,
	 * read as if it were a statement's own result: answered as
	 * store_pipe_result answers it (it has no SQLSTATE, and was taken
	 * below for a lost connection). */
	if (got == PGRES_PIPELINE_ABORTED)
		return cw_fail(e, CW_EIO, "an earlier statement of the pipeline failed");
	const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
	const char *msg = r ? PQresultErrorMessage(r) : PQerrorMessage(c);
	/* No SQLSTATE on a good connection that is in pipeline mode, or has
	 * a statement's results unread, under a statement of its caller's
	 * own: libpq refused it ("synchronous command execution functions
	 * are not allowed in pipeline mode", a NULL result), or
	 * store_exec_generic did ("cannot enter pipeline mode"), or could not
	 * send it and left its pipeline.  The caller's mistake, which the
	 * same request meets again: not "database connection lost" (below),
	 * on which a reader dropped the connection and ran the read again,
	 * and the client was told 503 to retry. */
	if (!piped && !state &&
	    (PQpipelineStatus(c) != PQ_PIPELINE_OFF || PQtransactionStatus(c) == PQTRANS_ACTIVE))
		return cw_fail(e, CW_EINTERNAL,
			       "a statement was run on a connection in pipeline mode or with results unread: %s", msg);
	/* 23505 unique, 23503 foreign key, 23P01 exclusion: a key another
	 * request's commit took or removed between the checks and the
	 * write, a race a retry settles.  The rest of class 23 (a CHECK,
	 * NOT NULL) is a value the code's own checks let through: the same
	 * request would be refused again for ever, so it is no conflict
	 * (until the forty-fifth session all of class 23 was one, and
	 * answered "retry"). */
	if (state && (strcmp(state, "23505") == 0 || strcmp(state, "23503") == 0 || strcmp(state, "23P01") == 0))
		return cw_fail(e, CW_ECONFLICT, "%s", msg);
	if (state && strncmp(state, "23", 2) == 0)
		return cw_fail(e, CW_EINTERNAL, "a value the checks let through was refused by the database: %s", msg);
	/* 40P01 deadlock_detected, 40001 serialization_failure: the server
	 * rolled this transaction back so that another could go on; the same
	 * work run again succeeds (docs/architecture-decisions.md). */
	if (state && (strcmp(state, "40P01") == 0 || strcmp(state, "40001") == 0))
		return cw_fail(e, CW_ERETRY, "%s", msg);
	/* 08: connection exception, 57P: operator intervention (shutdown),
	 * 53: insufficient resources (disk full): the database is away. */
	if (state && (strncmp(state, "08", 2) == 0 || strncmp(state, "57P", 3) == 0 ||
		      strncmp(state, "53", 2) == 0))
		return cw_fail(e, CW_EUNAVAIL, "database unavailable: %s", msg);
	/* The statement waited past statement_timeout (57014) or lock_timeout
	 * (55P03): a lock held by a migration, say.  Answered 503 as for a
	 * database away, but the connection is good: not dropped, not tried
	 * again on a fresh one (a reader does that for CW_EUNAVAIL), and the
	 * database not reported down. */
	if (state && (strcmp(state, "57014") == 0 || strcmp(state, "55P03") == 0))
		return cw_fail(e, CW_ETIMEDOUT, "the database did not answer in time: %s", msg);
	/* No SQLSTATE: libpq's own error, not the server's ("server closed
	 * the connection unexpectedly" comes before the connection is marked
	 * bad when it is noticed on a write).  The database is away. */
	if (!state)
		return cw_fail(e, CW_EUNAVAIL, "database connection lost: %s", msg);
	return cw_fail(e, CW_EIO, "database error %s: %s", state ? state : "", msg);
}

cw_err store_result_err(PGconn *c, const PGresult *r, cw_errmsg *e)
{
	return result_err(c, r, NULL, false, e);
}

cw_err store_prepare_each(PGconn *c, const struct store_stmt *const *lists, const char **failed, cw_errmsg *e)
{
	for (; *lists; lists++)
		for (const struct store_stmt *st = *lists; st->name; st++) {
			PGresult *r = PQprepare(c, st->name, st->sql, 0, NULL);
			if (PQresultStatus(r) != PGRES_COMMAND_OK) {
				cw_err rc = store_result_err(c, r, e);
				PQclear(r);
				*failed = st->name;
				return rc;
			}
			PQclear(r);
		}
	return CW_OK;
}

bool store_prepare_all(PGconn *c, const struct store_stmt *const *lists, cw_errmsg *e)
{
	const char *failed;
	if (!store_prepare_each(c, lists, &failed, e))
		return true;
	LOG_KV(CW_LOG_ERROR, "cannot prepare a statement", "statement", failed, "detail", e->msg);
	return false;
}

cw_err store_command(PGconn *c, const char *sql, int n, const char *const *params, cw_errmsg *e)
{
	PGresult *r = PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_COMMAND_OK, e);
	if (!rc)
		PQclear(r);
	return rc;
}

cw_err store_check(PGconn *c, PGresult *r, ExecStatusType st, cw_errmsg *e)
{
	if (PQresultStatus(r) == st)
		return CW_OK;
	cw_err rc = result_err(c, r, PQresStatus(st), false, e);
	PQclear(r);
	return rc;
}

PGresult *store_exec_generic(PGconn *c, const char *name, int n, const char *const *params)
{
	/* Outside a transaction block the statements before the Sync are one
	 * transaction, which a local setting does not outlive; in a caller's
	 * block it would, so it is set and reset. */
	bool block = PQtransactionStatus(c) != PQTRANS_IDLE;
	/* In pipeline mode already PQenterPipelineMode succeeds doing nothing
	 * (the statements would join the caller's pipeline); it fails with
	 * results unread, its message saying so.  A caller's mistake either
	 * way: answered as a failure, nothing sent. */
	if (PQpipelineStatus(c) != PQ_PIPELINE_OFF || !PQenterPipelineMode(c))
		return PQmakeEmptyPGresult(c, PGRES_FATAL_ERROR);
	PGresult *first[3] = { NULL, NULL, NULL }; /* each query's first result */
	int nq = block ? 3 : 2;
	if (PQsendQueryParams(c, block ? "SET plan_cache_mode = force_generic_plan"
				       : "SELECT set_config('plan_cache_mode', 'force_generic_plan', true)",
			      0, NULL, NULL, NULL, NULL, 0) &&
	    PQsendQueryPrepared(c, name, n, params, NULL, NULL, 0) &&
	    (!block || PQsendQueryParams(c, "RESET plan_cache_mode", 0, NULL, NULL, NULL, NULL, 0)) &&
	    PQpipelineSync(c)) {
		/* Each query's results end with a NULL; the Sync's comes last. */
		for (int q = 0; q <= nq;) {
			PGresult *r = PQgetResult(c);
			if (!r) {
				if (PQstatus(c) != CONNECTION_OK)
					break;
				q++;
				continue;
			}
			if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
				PQclear(r);
				break;
			}
			if (q < nq && !first[q])
				first[q] = r;
			else
				PQclear(r);
		}
	}
	PQexitPipelineMode(c); /* fails only with results unread: a connection lost */
	PGresult *out = NULL;
	ExecStatusType st = first[1] ? PQresultStatus(first[1]) : PGRES_FATAL_ERROR;
	bool ran = st != PGRES_FATAL_ERROR && st != PGRES_PIPELINE_ABORTED && st != PGRES_NONFATAL_ERROR;
	if (ran && (!block || (first[2] && PQresultStatus(first[2]) == PGRES_COMMAND_OK))) {
		out = first[1];
		first[1] = NULL;
	} else {
		/* the first error: a statement after it was not run */
		for (int q = 0; q < nq && !out; q++)
			if (first[q] && PQresultStatus(first[q]) == PGRES_FATAL_ERROR) {
				out = first[q];
				first[q] = NULL;
			}
	}
	for (int q = 0; q < 3; q++)
		PQclear(first[q]);
	return out ? out : PQmakeEmptyPGresult(c, PGRES_FATAL_ERROR);
}

PGresult *store_exec_generic_sql(PGconn *c, const char *name, const char *sql, int n, const char *const *params)
{
	PGresult *r = store_exec_generic(c, name, n, params);
	const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
	if (PQresultStatus(r) != PGRES_FATAL_ERROR || !state || strcmp(state, "26000") != 0)
		return r; /* 26000: no such prepared statement */
	PQclear(r);
	r = PQprepare(c, name, sql, n, NULL);
	if (PQresultStatus(r) != PGRES_COMMAND_OK)
		return r;
	PQclear(r);
	return store_exec_generic(c, name, n, params);
}

cw_err store_pipeline(PGconn *c, struct store_piped *q, int n, cw_errmsg *e)
{
	for (int i = 0; i < n; i++)
		q[i].r = NULL;
	/* As store_exec_generic: a caller's mistake, nothing sent; a bug
	 * (CW_EINTERNAL), not the database away (CW_EUNAVAIL until the
	 * fifty-seventh session: a reader dropped its connection, the same
	 * mistake met again on the next). */
	if (PQpipelineStatus(c) != PQ_PIPELINE_OFF)
		return cw_fail(e, CW_EINTERNAL, "not allowed in pipeline mode");
	if (!PQenterPipelineMode(c))
		return cw_fail(e, CW_EINTERNAL, "cannot enter pipeline mode: %s", PQerrorMessage(c));
	cw_err rc = CW_OK;
	int sent = 0;
	while (sent < n && (q[sent].sql ? PQsendQueryParams(c, q[sent].sql, q[sent].n, NULL, q[sent].params, NULL,
							    NULL, 0)
					: PQsendQueryPrepared(c, q[sent].name, q[sent].n, q[sent].params, NULL, NULL, 0)))
		sent++;
	if (sent < n)
		rc = cw_fail(e, CW_EUNAVAIL, "a statement could not be sent: %s", PQerrorMessage(c));
	if (!PQpipelineSync(c)) {
		if (!rc)
			rc = cw_fail(e, CW_EUNAVAIL, "the pipeline could not be sent: %s", PQerrorMessage(c));
	} else {
		/* The first failure is the one reported: the results after it
		 * (PGRES_PIPELINE_ABORTED, the statements not run) are read up
		 * to the Sync unseen. */
		for (int i = 0; i < sent && !rc; i++)
			rc = store_pipe_result(c, STORE_ROWS_OR_COMMAND, &q[i].r, e);
		if (!store_pipe_drain(c) && !rc)
			rc = cw_fail(e, CW_EUNAVAIL, "the connection was lost: %s", PQerrorMessage(c));
	}
	PQexitPipelineMode(c); /* fails only with results unread: a connection lost */
	if (rc)
		for (int i = 0; i < n; i++) {
			PQclear(q[i].r);
			q[i].r = NULL;
		}
	return rc;
}

cw_err store_exec(PGconn *c, const char *sql, cw_errmsg *e)
{
	PGresult *r = PQexec(c, sql);
	ExecStatusType st = PQresultStatus(r);
	cw_err rc = CW_OK;
	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
		rc = store_result_err(c, r, e);
	PQclear(r);
	return rc;
}

cw_err store_end(PGconn *c, cw_err rc, cw_errmsg *e)
{
	if (rc) {
		cw_errmsg ignored; /* out of the failed transaction; on a lost connection, moot */
		store_exec(c, "ROLLBACK", &ignored);
		return rc;
	}
	PGresult *r = PQexec(c, "COMMIT");
	if (PQresultStatus(r) != PGRES_COMMAND_OK)
		rc = store_result_err(c, r, e); /* PostgreSQL ended the transaction */
	else if (strcmp(PQcmdStatus(r), "ROLLBACK") == 0)
		rc = cw_fail(e, CW_EINTERNAL, "the transaction was rolled back: one of its statements had failed");
	PQclear(r);
	return rc;
}

int store_notifies(PGconn *c, void (*each)(const char *channel, const char *payload, void *arg), void *arg)
{
	int n = 0;
	for (int i = 0; i < 1024; i++) {
		bool ok = PQconsumeInput(c);
		PGnotify *nt;
		while ((nt = PQnotifies(c))) {
			if (each)
				each(nt->relname, nt->extra, arg);
			PQfreemem(nt);
			n++;
		}
		if (!ok)
			return n ? n : -1;
		struct pollfd p = { .fd = PQsocket(c), .events = POLLIN };
		if (p.fd < 0 || poll(&p, 1, 0) <= 0)
			break;
	}
	return n;
}

int store_wait_notify(PGconn *c, int wake_fd, int timeout_ms,
		      void (*each)(const char *channel, const char *payload, void *arg), void *arg)
{
	int n = store_notifies(c, each, arg);
	if (n > 0)
		return n;
	/* A broken connection still waits (for wake_fd or the timeout): the
	 * caller's loop reconnects at its own pace, it does not spin. */
	struct pollfd fds[2] = { { .fd = n < 0 ? -1 : PQsocket(c), .events = POLLIN },
				 { .fd = wake_fd, .events = POLLIN } };
	if (poll(fds, 2, timeout_ms) > 0 && fds[0].fd >= 0 && fds[0].revents)
		return store_notifies(c, each, arg);
	return fds[0].fd < 0 ? -1 : 0;
}

/* Server notices ("table does not exist, skipping") go to the log, not to
 * stderr unformatted. */
static void on_notice(void *arg, const char *message)
{
	char msg[512];
	snprintf(msg, sizeof(msg), "%s", message);
	msg[strcspn(msg, "\n")] = '\0';
	LOG_KV(CW_LOG_DEBUG, "database notice", "detail", msg);
}

/* The connect_timeout url sets (seconds; 0: none, or "wait for ever"). */
static long url_connect_timeout(const char *url)
{
	char *err = NULL;
	PQconninfoOption *opts = PQconninfoParse(url, &err);
	PQfreemem(err);
	long t = 0;
	for (PQconninfoOption *o = opts; o && o->keyword; o++)
		if (strcmp(o->keyword, "connect_timeout") == 0 && o->val)
			t = strtol(o->val, NULL, 10);
	PQconninfoFree(opts);
	return t > 0 ? t : 0;
}

/* The keywords and values every connection of the daemon is made with:
 * our defaults first; whatever the operator's URL says overrides them
 * (expand_dbname).  A database host that goes without a reset (powered
 * off, a network partition) leaves a statement waiting for ever, and a
 * cancel request (PQcancel, which since libpq 15 uses the connection's
 * keepalives and tcp_user_timeout) with it: TCP keepalives find an idle
 * connection dead within 10 + 3 x 5 s, and data left unacknowledged 10 s
 * ends it (the connection is lost, its jobs answer 503).  A statement
 * that merely runs long is not affected: the server's kernel acknowledges
 * all the same.  Ignored on a Unix socket.  Until the twenty-fourth
 * session the kernel's defaults applied: no keepalives, some 15 minutes
 * of retransmissions.  keys[8]/vals[8] are left free for a connect_timeout
 * over the URL's (connect_by). */
struct conn_params {
	const char *keys[10];
	const char *vals[10];
	char in_time[24];
};

static void conn_params_init(struct conn_params *cp, const char *url)
{
	static const char *const keys[] = { "application_name", "connect_timeout", "keepalives", "keepalives_idle",
					    "keepalives_interval", "keepalives_count", "tcp_user_timeout", "dbname" };
	static const char *const vals[] = { "causewayd", "5", "1", "10", "5", "3", "10000", NULL };
	memset(cp, 0, sizeof(*cp));
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		cp->keys[i] = keys[i];
		cp->vals[i] = vals[i] ? vals[i] : url;
	}
}

/* The SQLSTATEs of a server's refusal of a connection that trying again
 * does not mend: a wrong password (28P01), a role that does not exist or
 * no pg_hba.conf entry for it (28000), a database that does not exist
 * (3D000).  A server starting up, shutting down or full (57P03, 57P01,
 * 53300) refuses for a while only. */
static bool sqlstate_lasting(const char *code)
{
	return strncmp(code, "28P01", 5) == 0 || strncmp(code, "28000", 5) == 0 || strncmp(code, "3D000", 5) == 0;
}

/* The host (and port) a failure line of libpq names, "connection to
 * server at \"h\" (addr), port p failed: ..." or "... on socket \"s\"
 * failed: ...", into key: the quoted name and the port, without the
 * address (the addresses of one host name are one host). */
static void failure_host(const char *line, char *key, size_t size)
{
	size_t eol = strcspn(line, "\n");
	const char *q = memchr(line, '"', eol);
	const char *q2 = q ? memchr(q + 1, '"', eol - (size_t)(q + 1 - line)) : NULL;
	const char *port = q2 ? strstr(q2, ", port ") : NULL;
	int np = q2 ? (int)(q2 - q - 1) : 0;
	int pp = port && port < line + eol ? (int)strspn(port + 7, "0123456789") : 0;
	snprintf(key, size, "%.*s:%.*s", np, q ? q + 1 : "", pp, pp ? port + 7 : "");
}

/* Why a connection failed (in: libpq's PQerrorMessage, needs_password:
 * its PQconnectionNeedsPassword), into msg (size bytes, one line per
 * host tried, its trailing newline cut), and whether that lasts
 * (sqlstate_lasting, or a password needed and none given).  A server's
 * refusal carries its SQLSTATE only in a verbose message
 * (PQERRORS_VERBOSE, set by store_connect_abortable before the first
 * PQconnectPoll: "FATAL:  3D000: database ... does not exist", and a
 * "LOCATION:" line): the code is taken out of the text, and the LOCATION
 * line dropped, so that the message reads as libpq's default one.  The
 * severity before it may be translated, the code is not.  Several hosts
 * tried (database.url's host=a,b): libpq writes one failure per address,
 * each beginning "connection to server " (the daemon does not set a
 * locale, so libpq's messages are not translated), and the whole is
 * lasting only if every host answered and refused for good; the addresses
 * of one host name are one host (failure_host: "localhost" as ::1 refused
 * over TCP, then 127.0.0.1 refusing the password, is a host that answered;
 * until a review of the fifty-third session's change such a start waited
 * for ::1).  One that could not be reached (no SQLSTATE: refused over
 * TCP, a time-out, a name not found) may come up, and the start waits
 * for it: until the fifty-third session one host refusing for good ended the start while
 * the other was down.  A password needed and none given is told without a
 * SQLSTATE too; PQconnectionNeedsPassword says so of the last host
 * tried only (libpq resets it per host), so that one failure is not
 * counted unreached, and one of an earlier host is (the start waits). */
bool store_failure_text(const char *in, bool needs_password, char *msg, size_t size)
{
	static const char host_failed[] = "connection to server ";
	size_t n = 0;
	int lasting = 0, passing = 0, uncoded = 0;
	bool coded = false, begun = false; /* of the host whose failures are read */
	char host[300] = "";
	/* the whole message is read for its codes, what fits is copied */
	for (const char *start = in; *in;) {
		bool line_start = in == start || in[-1] == '\n';
		if (line_start && strncmp(in, host_failed, sizeof(host_failed) - 1) == 0) {
			char key[sizeof(host)];
			failure_host(in, key, sizeof(key));
			if (strcmp(key, host) != 0) { /* another host: the one before ends */
				if (begun && !coded)
					uncoded++;
				coded = false;
				snprintf(host, sizeof(host), "%s", key);
			}
		}
		begun = true;
		if (line_start && strncmp(in, "LOCATION:", 9) == 0) {
			in += strcspn(in, "\n");
			in += *in == '\n';
			continue;
		}
		if (strncmp(in, ":  ", 3) == 0 && strspn(in + 3, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") == 5 &&
		    strncmp(in + 8, ": ", 2) == 0) {
			if (sqlstate_lasting(in + 3))
				lasting++;
			else
				passing++;
			coded = true;
			if (n + 3 < size) {
				memcpy(msg + n, ":  ", 3);
				n += 3;
			}
			in += 10;
			continue;
		}
		if (n + 1 < size)
			msg[n++] = *in;
		in++;
	}
	while (n && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
		n--;
	if (size)
		msg[n] = '\0';
	if (begun && !coded)
		uncoded++;
	int unreached = uncoded - (needs_password ? 1 : 0);
	return !passing && unreached <= 0 && (lasting || needs_password);
}

static bool connect_failure_text(PGconn *c, char *msg, size_t size)
{
	return store_failure_text(PQerrorMessage(c), PQconnectionNeedsPassword(c), msg, size);
}

/* A connection libpq made (or failed to make) given its session settings:
 * c is taken (finished on failure). */
static PGconn *connect_finish(PGconn *c, long statement_timeout_ms, cw_err *why, cw_errmsg *e)
{
	if (!c) {
		*why = cw_fail(e, CW_ENOMEM, "out of memory");
		return NULL;
	}
	if (PQstatus(c) != CONNECTION_OK) {
		char msg[400];
		bool lasting = connect_failure_text(c, msg, sizeof(msg));
		*why = cw_fail(e, lasting ? CW_EINVAL : CW_EUNAVAIL, "cannot connect to the database: %s", msg);
		PQfinish(c);
		return NULL;
	}
	PQsetErrorVerbosity(c, PQERRORS_DEFAULT); /* store_connect_abortable's verbose, for the above */
	PQsetNoticeProcessor(c, on_notice, NULL);
	/* No JIT: its compile time (tens of ms for the adapters' batched
	 * lookups, whose estimated cost passes jit_above_cost) dwarfs the
	 * millisecond statements of a message path.  TimeZone UTC: the admin
	 * API's times are UTC (docs/admin-api.md), and json_build_object
	 * writes a timestamptz in the session's zone, which is the database's
	 * or the server's (the host's since initdb) unless set; until the
	 * twenty-first session such a database's answers had its offset.
	 * Every connection of the daemon is made here. */
	char sql[128];
	snprintf(sql, sizeof(sql), "SET statement_timeout = %ld; SET jit = off; SET TimeZone = 'UTC'",
		 statement_timeout_ms);
	if ((*why = store_exec(c, sql, e))) {
		PQfinish(c);
		return NULL;
	}
	return c;
}

/* store_connect; a connection made on a job's time (until_us, 0: none)
 * gives up near the job's deadline rather than at connect_timeout (5 s
 * unless the URL sets it): a server that stopped answering takes the
 * connection and never answers it, and the job's request would wait as
 * long.  libpq's connect_timeout is whole seconds, at least 2: a job with
 * less time left waits up to 2 s. The URL's own, if shorter, stays.
 * libpq's blocking connect keeps its own handling of several hosts
 * (each tried for the timeout). */
static PGconn *connect_by(const char *url, long statement_timeout_ms, int64_t until_us, cw_errmsg *e)
{
	if (store_check_url(url, e))
		return NULL;
	struct conn_params cp;
	conn_params_init(&cp, url);
	if (until_us) {
		int64_t left = until_us - cw_now_us();
		long t = left > 2000000 ? (long)((left + 999999) / 1000000) : 2;
		long own = url_connect_timeout(url);
		if (own > 0 && own < t)
			t = own;
		snprintf(cp.in_time, sizeof(cp.in_time), "%ld", t);
		cp.keys[8] = "connect_timeout"; /* after dbname: over the URL's (expand_dbname) */
		cp.vals[8] = cp.in_time;
	}
	cw_err why;
	return connect_finish(PQconnectdbParams(cp.keys, cp.vals, 1), statement_timeout_ms, &why, e);
}

PGconn *store_connect(const char *url, long statement_timeout_ms, cw_errmsg *e)
{
	return connect_by(url, statement_timeout_ms, 0, e);
}

/* How often store_connect_abortable asks give_up without a wake. */
#define ABORTABLE_SLICE_MS 100

PGconn *store_connect_abortable(const char *url, long statement_timeout_ms, int wake_fd,
				bool (*give_up)(void *arg), void *arg, cw_errmsg *e)
{
	cw_err why;
	return store_connect_abortable_why(url, statement_timeout_ms, wake_fd, give_up, arg, &why, e);
}

PGconn *store_connect_abortable_why(const char *url, long statement_timeout_ms, int wake_fd,
				    bool (*give_up)(void *arg), void *arg, cw_err *why, cw_errmsg *e)
{
	if ((*why = store_check_url(url, e)))
		return NULL;
	/* libpq leaves connect_timeout to the caller of PQconnectPoll: the
	 * URL's (5 s by default) for the whole attempt, every host of it. */
	long t = url_connect_timeout(url);
	int64_t until_us = cw_now_us() + (t > 0 ? t : 5) * 1000000LL;
	struct conn_params cp;
	conn_params_init(&cp, url);
	PGconn *c = PQconnectStartParams(cp.keys, cp.vals, 1);
	if (!c)
		return connect_finish(NULL, statement_timeout_ms, why, e);
	/* A refusal's SQLSTATE in its message (connect_failure_text), for
	 * the start-up's connect_at_start, which gives up at once on a
	 * refusal that lasts. */
	PQsetErrorVerbosity(c, PQERRORS_VERBOSE);
	PostgresPollingStatusType st = PGRES_POLLING_WRITING; /* as libpq's docs begin it */
	bool watch_wake = wake_fd >= 0;
	while (PQstatus(c) != CONNECTION_BAD && st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
		int64_t left = until_us - cw_now_us();
		if (left <= 0) {
			PQfinish(c);
			*why = cw_fail(e, CW_EUNAVAIL, "cannot connect to the database: no answer within %ld s",
				       t > 0 ? t : 5);
			return NULL;
		}
		struct pollfd fds[2] = { { .fd = PQsocket(c), .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT },
					 { .fd = watch_wake ? wake_fd : -1, .events = POLLIN } };
		int ms = left > ABORTABLE_SLICE_MS * 1000LL ? ABORTABLE_SLICE_MS : (int)((left + 999) / 1000);
		int n = poll(fds, 2, ms);
		if (n < 0 && errno != EINTR) {
			PQfinish(c);
			*why = cw_fail(e, CW_EIO, "cannot connect to the database: poll failed");
			return NULL;
		}
		if (give_up && give_up(arg)) {
			PQfinish(c);
			*why = cw_fail(e, CW_ESHUTDOWN, "the connection to the database was given up");
			return NULL;
		}
		/* A wake give_up let pass is not watched again (the caller reads
		 * its fd): give_up is asked each slice from then on. */
		if (n > 0 && fds[1].revents)
			watch_wake = false;
		if (fds[0].fd < 0 || (n > 0 && fds[0].revents))
			st = PQconnectPoll(c);
	}
	return connect_finish(c, statement_timeout_ms, why, e);
}

int64_t store_backoff_next(int64_t prev, int64_t first, int64_t most)
{
	int64_t b = prev <= 0 ? first : prev > most / 2 ? most : prev * 2;
	return b > most ? most : b;
}

int64_t store_backoff_nth(int n, int64_t first, int64_t most)
{
	int64_t b = store_backoff_next(0, first, most);
	for (int k = 1; k < n && b < most; k++)
		b = store_backoff_next(b, first, most);
	return b;
}

int64_t store_jitter(int64_t d, unsigned char r)
{
	return d / 2 + d / 2 * r / 255;
}

int64_t store_jittered(int64_t d)
{
	unsigned char r = 255;
	cw_random(&r, 1);
	return store_jitter(d, r);
}

int64_t store_backoff_grow(struct store_backoff *b, int64_t first_us, int64_t most_us, bool jitter)
{
	b->delay_us = store_backoff_next(b->delay_us, first_us, most_us);
	int64_t wait = jitter ? store_jittered(b->delay_us) : b->delay_us;
	b->retry_at_us = cw_now_us() + wait;
	return wait;
}

long store_backoff_failed(struct store_backoff *b, long most_ms)
{
	return (long)(store_backoff_grow(b, 250000, most_ms > 0 ? most_ms * 1000LL : 5000000LL, false) / 1000);
}

/* The sleepers of store_sleep_until, woken by store_sleepers_stop.  One
 * for the whole process: a stop is rare, and a sleeper a stop that is not
 * its own wakes goes back to sleep.  Until the forty-ninth session they
 * polled their flag every 100 ms: a stop waited up to that per sleeper,
 * and a sleeper woke ten times a second for nothing. */
static pthread_mutex_t sleep_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sleep_cv;
static pthread_once_t sleep_once = PTHREAD_ONCE_INIT;

static void sleep_init(void)
{
	pthread_condattr_t a;
	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC); /* cw_now_us's */
	pthread_cond_init(&sleep_cv, &a);
	pthread_condattr_destroy(&a);
}

void store_sleep_until(int64_t until_us, const atomic_bool *stop)
{
	pthread_once(&sleep_once, sleep_init);
	pthread_mutex_lock(&sleep_mu);
	while (!atomic_load(stop)) {
		int64_t left = until_us - cw_now_us();
		if (left <= 0)
			break;
		struct timespec ts;
		cw_deadline_ts(&ts, CLOCK_MONOTONIC, left);
		pthread_cond_timedwait(&sleep_cv, &sleep_mu, &ts);
	}
	pthread_mutex_unlock(&sleep_mu);
}

bool store_sleepers_stop(atomic_bool *stop)
{
	pthread_once(&sleep_once, sleep_init);
	/* Set under the mutex: a sleeper between its look at the flag and
	 * its wait cannot miss the broadcast. */
	pthread_mutex_lock(&sleep_mu);
	bool was = atomic_exchange(stop, true);
	pthread_cond_broadcast(&sleep_cv);
	pthread_mutex_unlock(&sleep_mu);
	return was;
}

bool store_sleep_fd(int wake_fd, int ms)
{
	struct pollfd p = { .fd = wake_fd, .events = POLLIN };
	if (poll(&p, 1, ms) <= 0)
		return false;
	char buf[256];
	while (read(wake_fd, buf, sizeof(buf)) > 0)
		;
	return true;
}

static void watch_arm(struct cw_store *s, struct conn *sc, int64_t until_us, bool kill_only);
static bool watch_disarm(struct conn *sc);
static void probe_put(struct store_probe *p);

static void conn_lost(struct cw_store *s, struct conn *sc)
{
	if (sc->c) {
		store_canceller_set(&sc->cancel, NULL);
		PQfinish(sc->c);
		sc->c = NULL;
	}
	pthread_mutex_lock(&sc->watch_mu);
	if (sc->fd >= 0)
		close(sc->fd);
	sc->fd = -1;
	sc->killed = false;
	sc->dead = false;
	pthread_mutex_unlock(&sc->watch_mu);
	sc->unprepared = false;
	if (sc->was_up) {
		sc->was_up = false;
		atomic_fetch_sub(&s->conns_up, 1);
	}
}

/* Whether the watchdog shut sc's connection down (watch_check). */
static bool conn_killed(struct conn *sc)
{
	pthread_mutex_lock(&sc->watch_mu);
	bool killed = sc->killed;
	pthread_mutex_unlock(&sc->watch_mu);
	return killed;
}

/* Whether it did so because the server did not answer (not a statement
 * that ran on past its deadline while the server answered). */
static bool conn_dead(struct conn *sc)
{
	pthread_mutex_lock(&sc->watch_mu);
	bool dead = sc->killed && sc->dead;
	pthread_mutex_unlock(&sc->watch_mu);
	return dead;
}

/* Writes are refused from now on (enqueue): the writer, perhaps idle,
 * must come to check its own connection and take them again once the
 * database answers it. */
static void db_down(struct cw_store *s)
{
	if (atomic_exchange(&s->db_up, false)) {
		pthread_mutex_lock(&s->mu);
		pthread_cond_signal(&s->wcond);
		pthread_mutex_unlock(&s->mu);
	}
}

/* The deadline of the writer's first prepare, left by store_open to its
 * thread (writer_main), whatever database.request_timeout_ms: until the
 * fifty-eighth session store_open prepared them, before the watchdog
 * ran, without any deadline; with a request timeout of a second, as an
 * operator may set, a loaded server (their parse analysis 100-500 ms)
 * would have the writer give up and reconnect from its start on (a
 * review's finding).  A server that does not answer at all still does
 * not keep it for ever. */
#define FIRST_PREPARE_MIN_US 10000000

/* Prepares the store's statements on sc's connection, within within_us;
 * false (e set, the connection dropped) when that fails. */
static bool conn_prepare(struct cw_store *s, struct conn *sc, int64_t within_us, cw_errmsg *e)
{
	sc->unprepared = false;
	const struct store_stmt *const *stmts = sc != &s->wconn && s->o.reader_stmts ? s->o.reader_stmts : s->o.stmts;
	if (!stmts)
		return true;
	/* Watched as a job's statements are, a deadline of their own: a
	 * server that stops answering here (or a lock that a statement's
	 * table waits for) does not keep the thread past it. */
	watch_arm(s, sc, cw_now_us() + within_us, false);
	bool ok = store_prepare_all(sc->c, stmts, e);
	if (watch_disarm(sc) && ok) {
		cw_fail(e, CW_ETIMEDOUT, "the database did not answer in time");
		ok = false;
	}
	if (!ok)
		conn_lost(s, sc);
	return ok;
}

/* True when sc has a usable connection, connecting if its backoff allows;
 * a connection made for a job gives up near its deadline (until_us, 0:
 * none; connect_by).  One the watchdog shut down is finished here.  With
 * prepare false (store_open's connection of the writer), the statements
 * are left to the next call, which prepares them first. */
static bool conn_ensure_to(struct cw_store *s, struct conn *sc, int64_t until_us, bool prepare)
{
	const char *who = sc->name;
	cw_errmsg e;
	if (sc->c && PQstatus(sc->c) == CONNECTION_OK && !conn_killed(sc)) {
		if (!sc->unprepared || !prepare)
			return true;
		/* connected, not prepared: store_open's connection of the writer */
		if (conn_prepare(s, sc, s->o.deadline_us > FIRST_PREPARE_MIN_US ? s->o.deadline_us : FIRST_PREPARE_MIN_US,
				 &e))
			return true;
	} else {
		conn_lost(s, sc);
		int64_t now = cw_now_us();
		if (now < sc->backoff.retry_at_us)
			return false;
		PGconn *c = connect_by(s->url, s->o.statement_timeout_ms, until_us, &e);
		if (c) {
			sc->c = c;
			store_canceller_set(&sc->cancel, c);
			int fd = fcntl(PQsocket(c), F_DUPFD_CLOEXEC, 0);
			pthread_mutex_lock(&sc->watch_mu);
			sc->fd = fd;
			pthread_mutex_unlock(&sc->watch_mu);
			sc->unprepared = true;
			if (prepare)
				conn_prepare(s, sc, s->o.deadline_us, &e);
		}
	}
	if (!sc->c) {
		/* Jittered: the pool's connections fail together (until the
		 * forty-ninth session no more than 102 s apart, whatever
		 * reconnect_max_ms said). */
		store_backoff_grow(&sc->backoff, 100000, (int64_t)s->o.reconnect_max_ms * 1000, true);
		if (sc->failures++ == 0 || atomic_load(&s->db_up))
			LOG_KV(CW_LOG_WARN, "database unreachable", "connection", who, "detail", e.msg);
		db_down(s);
		return false;
	}
	if (sc->failures || atomic_load(&s->reconnects))
		LOG_KV(CW_LOG_INFO, "database connection established", "connection", who);
	atomic_fetch_add(&s->reconnects, 1);
	sc->failures = 0;
	store_backoff_reset(&sc->backoff);
	sc->was_up = true;
	atomic_fetch_add(&s->conns_up, 1);
	atomic_store(&s->db_up, true);
	return true;
}

static bool conn_ensure(struct cw_store *s, struct conn *sc, int64_t until_us)
{
	return conn_ensure_to(s, sc, until_us, true);
}

/* ------------------------------------------------------- cancel requests */

/* A connection's cancel key, shared by its canceller and the cancels on
 * their way: a cancel request outlives the connection when the server does
 * not answer it. */
struct store_cancel {
	atomic_int refs;
	atomic_bool sending; /* a cancel request of the stop's is on its way */
	atomic_bool watching; /* one of the watchdog's */
	atomic_bool told;    /* one came through (logged once) */
	PGcancel *pc;
};

static struct store_cancel *cancel_get(struct store_canceller *k)
{
	pthread_mutex_lock(&k->mu);
	struct store_cancel *x = k->cur;
	if (x)
		atomic_fetch_add(&x->refs, 1);
	pthread_mutex_unlock(&k->mu);
	return x;
}

static void cancel_put(struct store_cancel *x)
{
	if (x && atomic_fetch_sub(&x->refs, 1) == 1) {
		PQfreeCancel(x->pc);
		free(x);
	}
}

static void conn_init(struct conn *sc, const char *name)
{
	sc->name = name;
	sc->fd = -1;
	store_canceller_init(&sc->cancel);
	pthread_mutex_init(&sc->watch_mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&sc->watch_cv, &ca);
	pthread_condattr_destroy(&ca);
}

static void conn_destroy(struct conn *sc)
{
	probe_put(sc->probe);
	sc->probe = NULL;
	store_canceller_destroy(&sc->cancel);
	if (sc->fd >= 0)
		close(sc->fd);
	pthread_cond_destroy(&sc->watch_cv);
	pthread_mutex_destroy(&sc->watch_mu);
}

/* ----------------------------------------------------------- the watchdog */

/* A job's statement still running at the job's deadline (blocked by a
 * lock, say) is cancelled there, so that the request is answered near
 * database.request_timeout_ms and not statement_timeout_ms after it: the
 * statement fails with 57014 (CW_ETIMEDOUT: 503, the connection kept) and a
 * write's transaction is rolled back.  The store's threads arm their
 * connection around the jobs' statements; the watchdog thread cancels
 * (PQcancel) those armed past their deadline.  A cancel that reaches the
 * server between two statements is ignored there, so it is sent again
 * every WATCH_AGAIN_US while the connection stays armed.  A COMMIT is never
 * cancelled: cancelled, its outcome would be unknown to the client.
 *
 * A server that stopped answering without closing anything (its host
 * gone, a partition, a SIGSTOP) answers neither the statement nor the
 * cancel request, a new connection to it: over a Unix socket nothing ends
 * them, over TCP tcp_user_timeout after 10 s (store_connect).  Until the
 * thirty-third session the watchdog sent the cancel itself and waited for
 * it, and the request waited a minute and more.  Now the cancel request
 * goes from a thread of its own (watch_cancel), and one not answered
 * within WATCH_KILL_US tells the watchdog that the server is not
 * answering: it shuts the connection's socket down (shutdown(2)), the
 * blocked libpq call fails at once, the job answers 503 (CW_ETIMEDOUT) and
 * the connection is finished, never used again (conn_ensure); a new one is
 * made once the server answers.  WATCH_KILL_US is 2 s, libpq's shortest
 * connect_timeout: a server that takes a new connection in 1.5 s (loaded,
 * far away) is slow, not gone; the session's first watchdog, at 1 s,
 * dropped such a server's connections and reported it down.
 *
 * A statement whose cancels are answered but which runs on (its backend
 * stuck on a hung disk, or SIGSTOPped, its server answering) has its
 * connection shut down WATCH_LATE_US past its deadline: the server is not
 * reported down for it (conn_dead), the job answers 503 then.
 *
 * A watch that cancels nothing (kill_only: a BEGIN, a ROLLBACK, a COMMIT)
 * is not ended on time alone: past its time the
 * watchdog asks the server whether it answers at all, with a ping (a new
 * connection, PQpingParams, on a thread of its own as the cancel, so that
 * it touches no backend's statement), again every WATCH_PROBE_US while it
 * answers.  While the server answers, the statement is waited for, as it
 * was before the thirty-third session (a slow fsync, a synchronous
 * standby: the COMMIT is stored, and answered 202 late); a ping not
 * answered within WATCH_KILL_US (or refused) shuts the connection down: a
 * COMMIT so ended has its outcome unknown, as one whose connection was
 * lost.  The session's first watchdog shut them down 1 s past their time
 * whatever: a slow COMMIT of a healthy server was answered "may have been
 * stored" although it was, and writes refused until the writer
 * reconnected.  The watchdog's own thread never waits for the server. */
#define WATCH_AGAIN_US 200000
#define WATCH_KILL_US 2000000
#define WATCH_LATE_US 5000000
#define WATCH_PROBE_US 1000000

/* From now until watch_disarm, sc's statements are cancelled once
 * until_us (0: never) has passed, or with kill_only the connection shut
 * down then.  Not while a cancel of the watchdog's is on its way (after
 * watch_disarm, none is). */
static void watch_arm(struct cw_store *s, struct conn *sc, int64_t until_us, bool kill_only)
{
	pthread_mutex_lock(&sc->watch_mu);
	sc->watch_until_us = until_us;
	sc->watch_us = kill_only ? 0 : until_us;
	sc->kill_only = kill_only;
	sc->watch_fired = false;
	probe_put(sc->probe); /* a ping of an earlier watch's: its answer is not this one's */
	sc->probe = NULL;
	sc->probe_next_us = until_us;
	sc->probe_told = false;
	pthread_mutex_unlock(&sc->watch_mu);
	if (!until_us)
		return;
	pthread_mutex_lock(&s->mu);
	if (until_us < s->watch_wake_us) {
		s->watch_wake_us = until_us;
		pthread_cond_signal(&s->dcond);
	}
	pthread_mutex_unlock(&s->mu);
}

/* Whether the watchdog has cancelled sc's statement since watch_arm (asked
 * after a statement failed: the flag is set, under watch_mu, before the
 * cancel request is sent). */
static bool watch_fired(struct conn *sc)
{
	pthread_mutex_lock(&sc->watch_mu);
	bool fired = sc->watch_fired;
	pthread_mutex_unlock(&sc->watch_mu);
	return fired;
}

/* Whether the watchdog's cancel request for sc is still on its way (under
 * watch_mu); forgets one that has come back. */
static bool cancel_going(struct conn *sc)
{
	if (!sc->cancel_sent_us)
		return false;
	struct store_cancel *x = cancel_get(&sc->cancel);
	bool going = x && atomic_load(&x->watching);
	cancel_put(x);
	if (!going)
		sc->cancel_sent_us = 0;
	return going;
}

/* Ends the watch; true when the watchdog shut the connection down (the
 * caller finishes it: conn_lost).  A cancel of the watchdog's on its way is
 * waited for (PQcancel returns once the server has signalled the
 * backend): it hits the statement it was meant for or nothing, never the
 * next one (a COMMIT).  One the server does not answer ends in the
 * connection shut down, WATCH_KILL_US after it was sent, and then there is
 * no next statement on it. */
static bool watch_disarm(struct conn *sc)
{
	pthread_mutex_lock(&sc->watch_mu);
	sc->watch_us = 0; /* no more cancels; still watched for the shutdown */
	while (!sc->killed && cancel_going(sc)) {
		/* The cancel's thread does not know sc (it may outlive it):
		 * looked at every few ms, the shutdown signalled. */
		struct timespec ts;
		cw_deadline_ts(&ts, CLOCK_MONOTONIC, 2000);
		pthread_cond_timedwait(&sc->watch_cv, &sc->watch_mu, &ts);
	}
	bool killed = sc->killed;
	sc->watch_until_us = 0;
	probe_put(sc->probe); /* its thread ends on its own */
	sc->probe = NULL;
	pthread_mutex_unlock(&sc->watch_mu);
	return killed;
}

static void *watch_cancel_main(void *arg)
{
	cw_thread_name("cw-cancel");
	struct store_cancel *x = arg;
	char err[256];
	if (!PQcancel(x->pc, err, sizeof(err)))
		LOG_KV(CW_LOG_WARN, "cannot cancel a statement past its deadline", "detail", err);
	atomic_store(&x->watching, false);
	cancel_put(x);
	return NULL;
}

/* What the watchdog has to say of a connection, gathered under watch_mu
 * and written once it is released: a blocked stderr (a full pipe to the
 * journal) must not hold the lock the connection's own thread takes to end
 * its watch (watch_disarm).  At most one line of each kind a look. */
struct watch_notes {
	const char *probe_answered, *killed, *fired; /* the killed one's detail; set: said */
	char cancel_err[256];                        /* set: a cancel request not sent */
};

static void watch_notes_write(const struct watch_notes *w, const char *conn)
{
	if (w->probe_answered)
		LOG_KV(CW_LOG_INFO, "a statement runs on past its deadline; the database answers, so it is waited for",
		       "connection", conn);
	if (w->killed)
		LOG_KV(CW_LOG_WARN, "the database stopped answering: a connection is dropped", "connection", conn,
		       "detail", w->killed);
	if (w->fired)
		LOG_KV(CW_LOG_INFO, "a statement still running at its job's deadline is cancelled", "connection", conn);
	if (w->cancel_err[0])
		LOG_KV(CW_LOG_WARN, "cannot cancel a statement past its deadline", "connection", conn, "detail",
		       w->cancel_err);
}

/* Sends a cancel request for sc's statement from a detached thread (under
 * watch_mu); true when one is on its way.  Without a thread, it is sent
 * here and waited for, as before the thirty-third session (its failure
 * into w). */
static bool watch_cancel(struct conn *sc, struct watch_notes *w)
{
	struct store_cancel *x = cancel_get(&sc->cancel);
	if (!x)
		return false;
	if (atomic_exchange(&x->watching, true)) { /* not expected: the last one is still going */
		cancel_put(x);
		return true;
	}
	if (cw_thread_detached(watch_cancel_main, x))
		return true;
	if (!PQcancel(x->pc, w->cancel_err, sizeof(w->cancel_err)) && !w->cancel_err[0])
		snprintf(w->cancel_err, sizeof(w->cancel_err), "%s", "unknown");
	atomic_store(&x->watching, false);
	cancel_put(x);
	return false;
}

/* A ping of the server (a kill_only watch past its time): a new
 * connection made and ended on a thread of its own, which touches no
 * backend's statement.  Shared by the watch and the thread: a server that
 * does not answer keeps the thread past the watch (at most libpq's
 * connect_timeout, 2 s). */
enum { PROBE_GOING, PROBE_ANSWERED, PROBE_UNANSWERED };

struct store_probe {
	atomic_int refs;
	atomic_int state;
	char url[];
};

static void probe_put(struct store_probe *p)
{
	if (p && atomic_fetch_sub(&p->refs, 1) == 1)
		free(p);
}

static void *probe_main(void *arg)
{
	cw_thread_name("cw-ping");
	struct store_probe *p = arg;
	/* connect_timeout after dbname: over the URL's (expand_dbname); its
	 * own application_name, so that a ping is not taken for one of the
	 * daemon's sessions. */
	const char *keys[] = { "application_name", "dbname", "connect_timeout", NULL };
	const char *vals[] = { "causewayd-ping", p->url, "2", NULL };
	PGPing r = PQpingParams(keys, vals, 1);
	/* Rejected (too many connections, say) is an answer all the same. */
	atomic_store(&p->state, r == PQPING_OK || r == PQPING_REJECT ? PROBE_ANSWERED : PROBE_UNANSWERED);
	probe_put(p);
	return NULL;
}

/* A ping on its way (under watch_mu), or NULL when no thread could be
 * started (tried again later: no answer is not taken from it). */
static struct store_probe *probe_start(const char *url)
{
	size_t n = strlen(url) + 1;
	struct store_probe *p = malloc(sizeof(*p) + n);
	if (!p)
		return NULL;
	memcpy(p->url, url, n);
	atomic_init(&p->refs, 2);
	atomic_init(&p->state, PROBE_GOING);
	if (!cw_thread_detached(probe_main, p)) {
		free(p);
		return NULL;
	}
	return p;
}

/* A kill_only watch past its time (under watch_mu): takes the answer of
 * the ping on its way, and sends the next one when due; true when the
 * server did not answer one (refused, or not within its connect_timeout). */
static bool probe_look(struct cw_store *s, struct conn *sc, int64_t now, struct watch_notes *w)
{
	if (sc->probe) {
		int st = atomic_load(&sc->probe->state);
		if (st == PROBE_GOING)
			return false;
		probe_put(sc->probe);
		sc->probe = NULL;
		if (st == PROBE_UNANSWERED)
			return true;
		if (!sc->probe_told) {
			sc->probe_told = true;
			w->probe_answered = "";
		}
		sc->probe_next_us = now + WATCH_PROBE_US;
	}
	if (now >= sc->probe_next_us) {
		sc->probe = probe_start(s->url);
		sc->probe_sent_us = now;
		if (!sc->probe)
			sc->probe_next_us = now + WATCH_AGAIN_US;
	}
	return false;
}

/* Cancels sc's statement if its watch has passed, or shuts its connection
 * down (above); when to look again (INT64_MAX: not armed). */
static int64_t watch_check(struct cw_store *s, struct conn *sc, int64_t now)
{
	struct watch_notes w = { 0 };
	pthread_mutex_lock(&sc->watch_mu);
	int64_t next = INT64_MAX;
	if (sc->watch_until_us && !sc->killed) {
		bool going = cancel_going(sc);
		/* dead_at: a question to the server (a cancel request, a ping)
		 * unanswered for WATCH_KILL_US; late_at: a statement that ran
		 * on, cancelled, while the server answered. */
		int64_t dead_at = going ? sc->cancel_sent_us + WATCH_KILL_US : INT64_MAX;
		int64_t late_at = sc->kill_only ? INT64_MAX : sc->watch_until_us + WATCH_LATE_US;
		bool pinged = false;
		if (sc->kill_only && now >= sc->watch_until_us) {
			if (probe_look(s, sc, now, &w))
				dead_at = now;
			else if (sc->probe && sc->probe_sent_us + WATCH_KILL_US < dead_at)
				dead_at = sc->probe_sent_us + WATCH_KILL_US;
			pinged = true;
		}
		if (now >= dead_at || now >= late_at) {
			if (sc->fd >= 0)
				shutdown(sc->fd, SHUT_RDWR);
			sc->killed = true;
			sc->dead = now >= dead_at;
			pthread_cond_broadcast(&sc->watch_cv);
			w.killed = pinged ? "no answer by its deadline, nor to a ping"
				   : going ? "a cancel request at its deadline was not answered"
					   : "its statement ran on past its deadline, cancelled";
		} else {
			if (sc->watch_us && now >= sc->watch_us) {
				if (!sc->watch_fired)
					w.fired = "";
				sc->watch_fired = true; /* before it is sent: watch_fired */
				if (!going && watch_cancel(sc, &w))
					sc->cancel_sent_us = now;
				sc->watch_us = now + WATCH_AGAIN_US;
			}
			next = dead_at < late_at ? dead_at : late_at;
			if (sc->watch_us && sc->watch_us < next)
				next = sc->watch_us;
			if (sc->kill_only) {
				/* its time, a ping's answer looked for, the next ping */
				int64_t look = now < sc->watch_until_us ? sc->watch_until_us
					       : sc->probe		 ? now + WATCH_AGAIN_US / 4
									 : sc->probe_next_us;
				if (look < next)
					next = look;
			}
		}
	}
	pthread_mutex_unlock(&sc->watch_mu);
	watch_notes_write(&w, sc->name); /* a name of the code's: not sc's to free */
	return next;
}

/* Detaches from q the jobs at its head whose deadline has passed (under
 * mu), as a list into *out, and returns their count; the first deadline still to come into *next.  The
 * deadlines of a queue follow its order (enqueue: one delay for all), so
 * a job behind one still in time is not looked at. */
static size_t expire_queue(struct queue *q, int64_t now, struct job **out, int64_t *next)
{
	size_t n = 0;
	for (struct job *j = q->head; j && now > j->deadline_us; j = j->next)
		n++;
	*out = n ? q_take(q, n) : NULL;
	if (q->head && q->head->deadline_us + 1 < *next)
		*next = q->head->deadline_us + 1;
	return n;
}

/* Answers the queued jobs whose deadline passed before a thread took
 * them: they never ran (nothing sent, nothing stored).  A writer held by
 * a COMMIT the server answers pings through (a slow fsync, a synchronous
 * standby gone, which may wait for ever) or a reader held by its
 * statement no longer holds the requests queued behind it past their
 * deadline: until the forty-fourth session they waited for it, however
 * long, and the queue grew with every write sent meanwhile.  When to look
 * again into *next. */
static void expire_queued(struct cw_store *s, int64_t now, int64_t *next)
{
	struct job *writes, *reads;
	pthread_mutex_lock(&s->mu);
	size_t nw = expire_queue(&s->wq, now, &writes, next);
	size_t nr = expire_queue(&s->rq, now, &reads, next);
	pthread_mutex_unlock(&s->mu);
	if (nw)
		atomic_fetch_add(&s->writes_failed, nw);
	if (nr)
		atomic_fetch_add(&s->reads_done, nr);
	fail_list(writes, CW_ETIMEDOUT, "the database did not take the write in time");
	fail_list(reads, CW_ETIMEDOUT, "the database did not take the read in time");
}

/* The reads queued for later (dq) whose time has come, moved to the
 * readers' queue, their deadline counted from now as a read queued now,
 * or their until_us if sooner (pushed by deadline then: rq's deadlines
 * stay in its order, expire_queue); the first time still
 * to come into *next.  None once the store stops (the watchdog fails them
 * as it ends, on its own thread as a reader would).
 * A read asked again a moment later waits here, not on a reader thread
 * that sleeps: until the sixty-third session the XMPP consent commands'
 * look-up of a lost COMMIT slept 100 ms between its looks on its reader,
 * up to 2 s, and two of them held both readers (xmpp_cmd.c, fate_fn). */
static void delayed_due(struct cw_store *s, int64_t *next)
{
	pthread_mutex_lock(&s->mu);
	/* Read now, after the watch_checks: a deadline counted from the time
	 * the watchdog's turn began would come before those of reads queued
	 * meanwhile, out of rq's order (the review of the sixty-third
	 * session's delayed reads). */
	int64_t now = cw_now_us();
	struct job *j = s->dq.head;
	bool moved = false;
	s->dq.head = s->dq.tail = NULL;
	s->dq.n = 0;
	while (j) {
		struct job *later = j->next;
		if (!s->stopping && j->not_before_us <= now) {
			j->enqueued_us = now;
			j->deadline_us = now + s->o.deadline_us;
			if (j->until_us && j->until_us < j->deadline_us)
				j->deadline_us = j->until_us;
			q_push_by_deadline(&s->rq, j);
			moved = true;
		} else {
			if (j->not_before_us < *next)
				*next = j->not_before_us;
			q_push(&s->dq, j);
		}
		j = later;
	}
	if (moved)
		pthread_cond_broadcast(&s->rcond);
	pthread_mutex_unlock(&s->mu);
}

static void *watchdog_main(void *arg)
{
	cw_thread_name("cw-watchdog");
	struct cw_store *s = arg;
	/* With nothing armed it looks again a job's deadline later all the
	 * same: the jobs armed until then have later deadlines and need not
	 * wake it (watch_arm), so that it costs no wake-up per job. */
	int64_t idle_us = s->o.deadline_us > 100000 ? s->o.deadline_us : 100000;
	pthread_mutex_lock(&s->mu);
	while (!s->watch_stop) {
		/* An arm during the look lowers watch_wake_us again. */
		s->watch_wake_us = INT64_MAX;
		pthread_mutex_unlock(&s->mu);
		int64_t now = cw_now_us(), next = now + idle_us;
		int64_t w = watch_check(s, &s->wconn, now);
		if (w < next)
			next = w;
		for (int i = 0; i < s->o.readers; i++) {
			int64_t r = watch_check(s, &s->readers[i].conn, now);
			if (r < next)
				next = r;
		}
		delayed_due(s, &next);
		expire_queued(s, now, &next);
		pthread_mutex_lock(&s->mu);
		if (next < s->watch_wake_us)
			s->watch_wake_us = next;
		if (s->watch_stop)
			break;
		int64_t wait_us = s->watch_wake_us - cw_now_us();
		if (wait_us > 0) {
			struct timespec ts;
			cw_deadline_ts(&ts, CLOCK_MONOTONIC, wait_us);
			pthread_cond_timedwait(&s->dcond, &s->mu, &ts);
		}
	}
	size_t nlater = s->dq.n;
	struct job *later = q_take(&s->dq, nlater); /* queued for later, never run: the store stops */
	pthread_mutex_unlock(&s->mu);
	if (nlater)
		atomic_fetch_add(&s->reads_done, nlater); /* as the reads expired in rq are (expire_queued) */
	fail_list(later, CW_ESHUTDOWN, "the daemon is stopping");
	return NULL;
}

/* ------------------------------------------------------------- the writer */

enum batch_outcome { BATCH_DONE, BATCH_CONN_LOST_BEFORE_COMMIT, BATCH_CONN_LOST_AT_COMMIT };

cw_err store_pipe_result(PGconn *c, ExecStatusType want, PGresult **out, cw_errmsg *e)
{
	*out = NULL;
	PGresult *r = PQgetResult(c);
	/* Each statement's results end with a NULL in pipeline mode. */
	PGresult *extra;
	while (r && (extra = PQgetResult(c)))
		PQclear(extra);
	if (!r && PQstatus(c) != CONNECTION_OK)
		return cw_fail(e, CW_EUNAVAIL, "database connection lost: %s", PQerrorMessage(c));
	/* A connection lost comes as a result (PGRES_FATAL_ERROR, the
	 * connection bad) before the NULLs.  A NULL on a good connection:
	 * nothing left to read, up to and past the pipeline's sync point (its
	 * caller read more results than it sent statements, or read outside
	 * pipeline mode): its mistake.  Until the fifty-seventh session
	 * "no result: " with an empty message, CW_EUNAVAIL. */
	if (!r)
		return cw_fail(e, CW_EINTERNAL,
			       "no statement's result left to read: more results read than statements sent");
	cw_err rc = CW_OK;
	ExecStatusType st = PQresultStatus(r);
	if (st == PGRES_PIPELINE_ABORTED)
		rc = cw_fail(e, CW_EIO, "an earlier statement of the pipeline failed");
	else if (want == STORE_ROWS_OR_COMMAND ? st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK : st != want)
		rc = result_err(c, r, want == STORE_ROWS_OR_COMMAND ? "PGRES_TUPLES_OK or PGRES_COMMAND_OK" : PQresStatus(want),
				true, e);
	if (rc) {
		PQclear(r);
		return rc;
	}
	*out = r;
	return CW_OK;
}

bool store_pipe_drain(PGconn *c)
{
	for (int nulls = 0; nulls < 100000;) {
		PGresult *r = PQgetResult(c);
		if (!r) {
			if (PQstatus(c) != CONNECTION_OK)
				return false;
			nulls++;
			continue;
		}
		ExecStatusType st = PQresultStatus(r);
		PQclear(r);
		if (st == PGRES_PIPELINE_SYNC)
			return true;
	}
	return false;
}

enum pipe_outcome { PIPE_OK, PIPE_JOB_FAILED, PIPE_CONN_LOST };

/* Runs the pipelined jobs of list, round by round, inside the open
 * transaction.  On a job's failure, sets its rc and returns PIPE_JOB_FAILED
 * (the transaction is then aborted). */
static enum pipe_outcome run_pipelined(struct conn *sc, struct job *list, cw_errmsg *e)
{
	PGconn *c = sc->c;
	bool any = false;
	for (struct job *j = list; j; j = j->next) {
		j->going = j->pipe && !j->rc;
		any |= j->going;
	}
	if (!any)
		return PIPE_OK;
	if (!PQenterPipelineMode(c)) {
		cw_fail(e, CW_EUNAVAIL, "cannot enter pipeline mode: %s", PQerrorMessage(c));
		return PIPE_CONN_LOST;
	}
	enum pipe_outcome out = PIPE_OK;
	for (int round = 0; any && out == PIPE_OK; round++) {
		for (struct job *j = list; j; j = j->next) {
			if (!j->going)
				continue;
			cw_err rc = j->pipe->send(c, j->arg, round, &j->err);
			if (rc) {
				if (!retry_job(j, rc, false))
					j->rc = rc;
				out = PQstatus(c) == CONNECTION_OK ? PIPE_JOB_FAILED : PIPE_CONN_LOST;
				break;
			}
		}
		if (!PQpipelineSync(c)) {
			out = PIPE_CONN_LOST;
			break;
		}
		if (out != PIPE_OK) {
			store_pipe_drain(c);
			break;
		}
		any = false;
		bool drained = false;
		for (struct job *j = list; j; j = j->next) {
			if (!j->going)
				continue;
			bool more = false;
			cw_err rc = j->pipe->recv(c, j->arg, round, &more, &j->err);
			if (rc) {
				if (PQstatus(c) != CONNECTION_OK) {
					out = PIPE_CONN_LOST;
					cw_fail(e, CW_EUNAVAIL, "%s", j->err.msg);
				} else {
					if (!retry_job(j, rc, watch_fired(sc)))
						j->rc = rc; /* else the batch runs again, this job with it */
					out = PIPE_JOB_FAILED;
				}
				drained = store_pipe_drain(c);
				break;
			}
			/* The round's sync point is still to be read, so libpq
			 * reports a command in progress: a recv that read it too
			 * (more results than its send queued) leaves the
			 * connection idle in its transaction.  Its mistake,
			 * which it makes again: it fails alone (CW_EINTERNAL),
			 * where until the fifty-seventh session the drain below
			 * found no sync point and the batch was failed as a
			 * connection lost (the connection dropped, writes
			 * refused a moment, each job answered 503). */
			if (PQtransactionStatus(c) != PQTRANS_ACTIVE && PQstatus(c) == CONNECTION_OK) {
				LOG_KV(CW_LOG_ERROR, "a pipelined write read past its round's sync point; failing it");
				j->rc = cw_fail(&j->err, CW_EINTERNAL,
						"a pipelined write read more results than its statements sent");
				out = PIPE_JOB_FAILED;
				drained = true;
				break;
			}
			j->going = more;
			any |= more;
		}
		if (out == PIPE_OK && !drained && !store_pipe_drain(c))
			out = PIPE_CONN_LOST;
	}
	if (!PQexitPipelineMode(c) && out == PIPE_OK)
		out = PIPE_CONN_LOST;
	if (out == PIPE_CONN_LOST && !e->msg[0])
		cw_fail(e, CW_EUNAVAIL, "database connection lost: %s", PQerrorMessage(c));
	return out;
}

/* Before a batch runs again after a job lost a deadlock: the transaction
 * that won, granted its lock when ours was rolled back, may not have run
 * yet on a busy machine, and a run again at once took the key first and
 * deadlocked with it again.  A short pause (store_retry_pause_us: growing,
 * jittered so that two partners do not meet again) lets it go on; never
 * past until (the batch's first deadline), and cut short by a stop, after
 * which the batch runs again at once as before.  The writer waits as it
 * does between batches, on wcond. */
static void retry_pause(struct cw_store *s, struct job *list, int64_t until)
{
	int64_t pause = 0;
	for (struct job *j = list; j; j = j->next) {
		if (j->pause_us > pause)
			pause = j->pause_us;
		j->pause_us = 0;
	}
	if (pause <= 0)
		return;
	int64_t start = cw_now_us(), now = start, end = start + pause;
	if (end > until)
		end = until;
	pthread_mutex_lock(&s->mu);
	while (!s->stopping && now < end) {
		struct timespec ts;
		cw_deadline_ts(&ts, CLOCK_MONOTONIC, end - now);
		pthread_cond_timedwait(&s->wcond, &s->mu, &ts);
		now = cw_now_us();
	}
	pthread_mutex_unlock(&s->mu);
	atomic_fetch_add(&s->write_retries, 1);
	atomic_fetch_add(&s->retry_pause_us, (uint64_t)(now - start));
}

/* The local users' locks the live pipelined jobs of list ask to hold
 * first (store_pipe_ops.first_locks), all in one statement, in id order,
 * before any other statement of the transaction: waiting for them then
 * holds nothing up, so no other transaction can wait for this one while
 * it waits (a job of a group commit waiting for a user's lock while an
 * earlier job held a room's deadlocked with a process holding the user's
 * and waiting for the room's, until the forty-second session).  CW_OK
 * when none asks.  *asker: a job that asked (to be failed, or run again,
 * if the statement fails). */
static cw_err take_first_locks(PGconn *c, struct job *list, struct job **asker, cw_errmsg *e)
{
	char *ids = NULL;
	size_t len = 0;
	*asker = NULL;
	for (struct job *j = list; j; j = j->next) {
		const char *u = !j->rc && j->pipe && j->pipe->first_locks ? j->pipe->first_locks(j->arg) : NULL;
		if (!u || !u[0])
			continue;
		size_t n = strlen(u);
		char *p = realloc(ids, len + n + 2);
		if (!p) {
			free(ids);
			return cw_fail(e, CW_ENOMEM, "out of memory");
		}
		ids = p;
		if (len)
			ids[len++] = ',';
		memcpy(ids + len, u, n + 1);
		len += n;
		*asker = j;
	}
	if (!ids)
		return CW_OK;
	const char *params[] = { ids };
	PGresult *r = PQexecParams(c, USER_LOCKS_FIRST_SQL, 1, NULL, params, NULL, NULL, 0);
	free(ids);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (!rc)
		PQclear(r);
	return rc;
}

/* Runs the live jobs of list in one transaction: the plain ones one by one,
 * then the pipelined ones in rounds.  A job that fails is taken out (its rc
 * set) and the others are run again from the start. */
static enum batch_outcome run_batch(struct cw_store *s, PGconn *c, struct job *list, cw_errmsg *e)
{
	for (;;) {
		/* A run again after a failed job (one that waited out its
		 * statement timeout, say) does not take the others past their
		 * deadline: they are answered (503) rather than run. */
		int64_t now = cw_now_us(), until = 0;
		for (struct job *j = list; j; j = j->next) {
			if (!j->rc && now > j->deadline_us)
				j->rc = cw_fail(&j->err, CW_ETIMEDOUT, "the database did not take the write in time");
			if (!j->rc && (!until || j->deadline_us < until))
				until = j->deadline_us;
		}
		if (!until)
			return BATCH_DONE; /* every job answered: nothing to commit */
		/* BEGIN, ROLLBACK and COMMIT are not cancelled; past the
		 * deadline (or a moment past their start) the watchdog pings the
		 * server, and shuts the connection down only when it does not
		 * answer. */
		watch_arm(s, &s->wconn, until, true);
		cw_err begun = store_exec(c, "BEGIN", e);
		if (watch_disarm(&s->wconn) || begun)
			return BATCH_CONN_LOST_BEFORE_COMMIT;
		/* The jobs' statements are cancelled at the first of their
		 * deadlines (the watchdog): the batch then runs again without
		 * the jobs past theirs.  Not the COMMIT. */
		watch_arm(s, &s->wconn, until, false);
		struct job *failed = NULL;
		bool lost = false;
		struct job *asker;
		cw_err first = take_first_locks(c, list, &asker, e);
		if (first && PQstatus(c) != CONNECTION_OK) {
			lost = true;
		} else if (first) {
			/* Every job that asked runs again (a statement the watchdog
			 * cancelled) or fails with it. */
			for (struct job *j = list; j; j = j->next) {
				const char *u = !j->rc && j->pipe && j->pipe->first_locks ? j->pipe->first_locks(j->arg) : NULL;
				if (u && u[0] && !retry_job(j, first, watch_fired(&s->wconn)))
					j->rc = cw_fail(&j->err, first, "%s", e->msg);
			}
			e->msg[0] = '\0';
			failed = asker;
		}
		for (struct job *j = list; j && !failed && !lost; j = j->next) {
			if (j->rc || !j->fn)
				continue;
			cw_err rc = j->fn(c, j->arg, &j->err);
			PGTransactionStatusType ts = PQtransactionStatus(c);
			if (rc == CW_OK && PQstatus(c) == CONNECTION_OK && ts != PQTRANS_INTRANS) {
				/* A job that took a failed statement for an answer
				 * (a bug): the transaction is aborted, and the
				 * other jobs' writes with it, which COMMIT would
				 * turn into a silent ROLLBACK.  Or one that ended
				 * the batch's transaction itself (a ROLLBACK or
				 * COMMIT of its own, a bug too): the jobs after it
				 * would run outside any transaction, each statement
				 * committed alone, and the earlier jobs' writes be
				 * reported committed whatever it did with them
				 * (until the forty-seventh session).  It fails
				 * alone; the others run again. */
				LOG_KV(CW_LOG_ERROR,
				       ts == PQTRANS_INERROR ? "a write job left its transaction aborted; failing it"
							     : "a write job ended its batch's transaction; failing it",
				       "detail", ts == PQTRANS_INERROR ? PQerrorMessage(c) : "");
				rc = cw_fail(&j->err, CW_EINTERNAL, "a statement of the write failed");
			}
			if (rc == CW_OK)
				continue;
			if (PQstatus(c) != CONNECTION_OK) {
				cw_fail(e, CW_EUNAVAIL, "%s", j->err.msg);
				lost = true;
				break;
			}
			if (!retry_job(j, rc, watch_fired(&s->wconn)))
				j->rc = rc; /* else the batch runs again, this job with it */
			failed = j;
			break;
		}
		if (!failed && !lost) {
			enum pipe_outcome po = run_pipelined(&s->wconn, list, e);
			lost = po == PIPE_CONN_LOST;
			if (po == PIPE_JOB_FAILED)
				failed = list; /* any non-NULL: a job has its rc set, or is to run again */
		}
		if (watch_disarm(&s->wconn) && !lost) {
			/* Shut down with its statements answered: not committed. */
			cw_fail(e, CW_EUNAVAIL, "the database did not answer in time; its connection was dropped");
			lost = true;
		}
		if (lost)
			return BATCH_CONN_LOST_BEFORE_COMMIT;
		int64_t end_by = until > cw_now_us() + WATCH_AGAIN_US ? until : cw_now_us() + WATCH_AGAIN_US;
		if (failed) {
			cw_errmsg ignored;
			watch_arm(s, &s->wconn, end_by, true);
			cw_err rolled = store_exec(c, "ROLLBACK", &ignored);
			if (watch_disarm(&s->wconn) || (rolled && PQstatus(c) != CONNECTION_OK))
				return BATCH_CONN_LOST_BEFORE_COMMIT;
			retry_pause(s, list, until);
			continue;
		}
		watch_arm(s, &s->wconn, end_by, true);
		PGresult *r = PQexec(c, "COMMIT");
		watch_disarm(&s->wconn); /* shut down after its answer: committed all the same (conn_ensure finishes it) */
		if (PQresultStatus(r) != PGRES_COMMAND_OK) {
			store_result_err(c, r, e);
			PQclear(r);
			if (PQstatus(c) != CONNECTION_OK)
				return BATCH_CONN_LOST_AT_COMMIT; /* the outcome is unknown */
			/* Refused at COMMIT (a deferred check) on a good
			 * connection: rolled back, nothing stored. */
			LOG_KV(CW_LOG_WARN, "a write batch's COMMIT was refused", "detail", e->msg);
			for (struct job *j = list; j; j = j->next)
				if (!j->rc)
					j->rc = cw_fail(&j->err, CW_EUNAVAIL, "the commit was refused; nothing was stored");
			return BATCH_DONE;
		}
		if (strcmp(PQcmdStatus(r), "ROLLBACK") == 0) {
			/* An aborted transaction that no job reported (a bug):
			 * nothing was written, and no job may say it was. */
			LOG_KV(CW_LOG_ERROR, "a write batch's COMMIT rolled back (a statement failed unreported)");
			for (struct job *j = list; j; j = j->next)
				if (!j->rc)
					j->rc = cw_fail(&j->err, CW_EINTERNAL, "the write was rolled back");
		}
		PQclear(r);
		return BATCH_DONE;
	}
}

static void write_batch(struct cw_store *s, struct job *list)
{
	/* Jobs past their deadline are answered now, not run; failed writes
	 * as those the watchdog answers in the queue (expire_queued) are
	 * (until the forty-fourth session's review these were not counted). */
	int64_t now = cw_now_us();
	struct job *live = NULL, **tail = &live, *expired = NULL;
	uint64_t late = 0;
	for (struct job *j = list, *next; j; j = next) {
		next = j->next;
		if (now > j->deadline_us) {
			j->rc = CW_ETIMEDOUT;
			snprintf(j->err.msg, sizeof(j->err.msg), "the database did not take the write in time");
			j->next = expired;
			expired = j;
			late++;
		} else {
			j->next = NULL;
			*tail = j;
			tail = &j->next;
		}
	}
	if (late)
		atomic_fetch_add(&s->writes_failed, late);
	finish_list(expired);
	if (!live)
		return;

	for (int attempt = 0;; attempt++) {
		/* A run again on a fresh connection (below) is for the jobs
		 * still within their deadline, and connects by the first of
		 * them: a server that stopped answering keeps none past it. */
		int64_t until = 0;
		now = cw_now_us();
		for (struct job *j = live; j; j = j->next) {
			if (j->rc)
				continue;
			if (now > j->deadline_us)
				j->rc = cw_fail(&j->err, CW_ETIMEDOUT, "the database did not take the write in time");
			else if (!until || j->deadline_us < until)
				until = j->deadline_us;
		}
		if (!until)
			break;
		if (!conn_ensure(s, &s->wconn, until)) {
			for (struct job *j = live; j; j = j->next)
				if (!j->rc)
					j->rc = cw_fail(&j->err, CW_EUNAVAIL, "the database is unavailable");
			break;
		}
		cw_errmsg e = { { 0 } };
		enum batch_outcome out = run_batch(s, s->wconn.c, live, &e);
		if (out == BATCH_DONE)
			break;
		LOG_KV(CW_LOG_WARN, "database connection lost during a write batch", "detail", e.msg);
		conn_lost(s, &s->wconn);
		atomic_store(&s->db_up, false);
		/* Nothing was committed before COMMIT was sent: one immediate
		 * retry on a fresh connection (a restarted server may be back).
		 * After COMMIT the outcome is unknown, so the jobs fail and the
		 * client retries with its idempotency key. */
		if (out == BATCH_CONN_LOST_AT_COMMIT || attempt > 0) {
			for (struct job *j = live; j; j = j->next)
				if (j->rc == CW_OK) {
					j->rc = CW_EUNAVAIL;
					snprintf(j->err.msg, sizeof(j->err.msg), "%s",
						 out == BATCH_CONN_LOST_AT_COMMIT ? STORE_OUTCOME_UNKNOWN
										   : "the database connection was lost");
				}
			break;
		}
	}
	uint64_t ok = 0, bad = 0;
	for (struct job *j = live; j; j = j->next)
		j->rc == CW_OK ? ok++ : bad++;
	if (ok)
		atomic_fetch_add(&s->batches, 1);
	atomic_fetch_add(&s->writes_committed, ok);
	atomic_fetch_add(&s->writes_failed, bad);
	finish_list(live);
}

/* While writes are refused (db_up false, set by whichever connection
 * failed), the writer checks its own: reconnects it, or asks one that
 * looks fine (a reader may have failed alone, or the server restarted
 * under an idle connection) with a cheap query; a connection that answers
 * takes writes again.  A failure leaves the backoff of conn_ensure. */
static void writer_check(struct cw_store *s)
{
	bool had = s->wconn.c && PQstatus(s->wconn.c) == CONNECTION_OK && !conn_killed(&s->wconn);
	/* Within a job's deadline, as if one waited (a server that stopped
	 * answering would keep the writer, and a stop, its connect_timeout
	 * or for ever). */
	if (!conn_ensure(s, &s->wconn, cw_now_us() + s->o.deadline_us))
		return;
	cw_errmsg e;
	if (had) {
		/* Cancelled at its deadline as a job's statement is (not a
		 * kill_only watch, which waits while the server answers a ping:
		 * a writer's backend stuck alone would keep writes refused). */
		watch_arm(s, &s->wconn, cw_now_us() + s->o.deadline_us, false);
		cw_err rc = store_exec(s->wconn.c, "SELECT 1", &e);
		if (watch_disarm(&s->wconn) || rc) {
			conn_lost(s, &s->wconn);
			return;
		}
	}
	if (had && !atomic_load(&s->db_up))
		LOG_KV(CW_LOG_INFO, "database answers the writer again");
	atomic_store(&s->db_up, true);
}

static void *writer_main(void *arg)
{
	cw_thread_name("cw-writer");
	struct cw_store *s = arg;
	/* store_open's connection: until the fifty-eighth session its 19
	 * statements were prepared there, before the daemon's "ready" (some
	 * 50 ms of a start of 110 ms in a plain build on a loaded machine,
	 * the server's parse analysis, not round trips: docs/performance.md);
	 * now here, while the HTTP front starts, as each reader prepares its
	 * own on its first job.  A write that comes meanwhile waits for them
	 * in the queue, as it would have waited for "ready".  Failed, it is
	 * the writer's connection lost: the reconnects of writer_check. */
	if (s->wconn.unprepared)
		conn_ensure(s, &s->wconn, cw_now_us() + s->o.deadline_us);
	pthread_mutex_lock(&s->mu);
	for (;;) {
		if (s->stopping) {
			struct job *rest = q_take(&s->wq, (size_t)s->wq.n);
			pthread_mutex_unlock(&s->mu);
			fail_list(rest, CW_ESHUTDOWN, "the daemon is stopping");
			break;
		}
		int64_t now = cw_now_us();
		int64_t wait_us;
		/* The delay lets a batch fill, except after a batch of a single
		 * write: writes that come one at a time, as a homeserver's one
		 * transaction in flight, would only wait it out every time.  (The
		 * first batch waits: nothing is known yet.) */
		size_t n = gc_plan((size_t)s->wq.n, s->wq.head ? now - s->wq.head->enqueued_us : 0,
				   (size_t)s->o.batch_max, s->last_batch != 1 ? s->o.batch_delay_us : 0, &wait_us);
		if (n) {
			s->last_batch = n;
			struct job *batch = q_take(&s->wq, n);
			pthread_mutex_unlock(&s->mu);
			write_batch(s, batch);
			pthread_mutex_lock(&s->mu);
			continue;
		}
		/* While the database is away, come back to reconnect even with
		 * nothing queued, so that writes are taken again soon after. */
		if (!atomic_load(&s->db_up)) {
			int64_t until = s->wconn.backoff.retry_at_us - now;
			if (until <= 0) {
				pthread_mutex_unlock(&s->mu);
				writer_check(s);
				pthread_mutex_lock(&s->mu);
				continue;
			}
			if (wait_us < 0 || until < wait_us)
				wait_us = until;
		}
		if (wait_us < 0) {
			pthread_cond_wait(&s->wcond, &s->mu);
		} else {
			struct timespec ts;
			cw_deadline_ts(&ts, CLOCK_MONOTONIC, wait_us);
			pthread_cond_timedwait(&s->wcond, &s->mu, &ts);
		}
	}
	conn_lost(s, &s->wconn);
	return NULL;
}

/* ------------------------------------------------------------ the readers */

/* After j's read: a read that left a transaction open on the reader's
 * connection (a BEGIN whose error path did not end it: a bug of the
 * caller's) has it rolled back here.  Left open, every later read on that
 * connection failed "current transaction is aborted" (25P02), or read the
 * snapshot of the first, for as long as the connection lived: the server
 * answered, so nothing dropped it.  A read that took a failed statement for
 * an answer fails (CW_EINTERNAL), as a write does (run_batch).  False when
 * the ROLLBACK lost the connection (finished here). */
static bool read_left_idle(struct cw_store *s, struct reader *rd, struct job *j)
{
	PGconn *c = rd->conn.c;
	/* One that left its connection in pipeline mode: libpq refuses every
	 * later statement on it, a caller's mistake (result_err) that is not
	 * the next read's, and which no retry on the same connection mends.
	 * It fails, and the connection is dropped, a fresh one for the next
	 * read. */
	if (PQstatus(c) == CONNECTION_OK && PQpipelineStatus(c) != PQ_PIPELINE_OFF) {
		LOG_KV(CW_LOG_ERROR, "a read job left its connection in pipeline mode; dropped");
		if (!j->rc)
			j->rc = cw_fail(&j->err, CW_EINTERNAL, "the read left its connection in pipeline mode");
		conn_lost(s, &rd->conn);
		return false;
	}
	PGTransactionStatusType ts = PQtransactionStatus(c);
	if (PQstatus(c) != CONNECTION_OK || ts == PQTRANS_IDLE)
		return true;
	LOG_KV(CW_LOG_ERROR, "a read job left its transaction open; rolled back", "detail",
	       ts == PQTRANS_INERROR ? "its transaction was aborted" : "its transaction was still going");
	if (!j->rc && ts == PQTRANS_INERROR)
		j->rc = cw_fail(&j->err, CW_EINTERNAL, "a statement of the read failed");
	int64_t now = cw_now_us();
	watch_arm(s, &rd->conn, j->deadline_us > now + WATCH_AGAIN_US ? j->deadline_us : now + WATCH_AGAIN_US, true);
	cw_errmsg ignored;
	cw_err rolled = store_exec(c, "ROLLBACK", &ignored);
	if (watch_disarm(&rd->conn) || rolled || PQtransactionStatus(c) != PQTRANS_IDLE) {
		conn_lost(s, &rd->conn);
		return false;
	}
	return true;
}

/* Runs j's read on rd's connection, its statements cancelled at j's
 * deadline (the watchdog: CW_ETIMEDOUT, the connection kept), and ends a
 * transaction it left open (read_left_idle); false when the connection is
 * finished here: that ROLLBACK lost it, or the watchdog shut it down, and
 * when the server did not answer the cancel either, writes are refused
 * until the writer finds the database answering again (not for a statement
 * that ran on while the server answered: a backend stuck alone). */
static bool read_run(struct cw_store *s, struct reader *rd, struct job *j)
{
	watch_arm(s, &rd->conn, j->deadline_us, false);
	j->rc = j->fn(rd->conn.c, j->arg, &j->err);
	if (!watch_disarm(&rd->conn))
		return read_left_idle(s, rd, j);
	if (j->rc)
		j->rc = cw_fail(&j->err, CW_ETIMEDOUT, "the database did not answer in time; its connection was dropped");
	bool dead = conn_dead(&rd->conn);
	conn_lost(s, &rd->conn);
	if (dead)
		db_down(s);
	return false;
}

static void read_once(struct cw_store *s, struct reader *rd, struct job *j)
{
	if (!conn_ensure(s, &rd->conn, j->deadline_us)) {
		j->rc = cw_fail(&j->err, CW_EUNAVAIL, "the database is unavailable");
		return;
	}
	if (!read_run(s, rd, j))
		return;
	if (j->rc && (j->rc == CW_EUNAVAIL || PQstatus(rd->conn.c) != CONNECTION_OK) && cw_now_us() < j->deadline_us) {
		/* Retry once on a fresh connection, within the job's deadline:
		 * a read has no side effect. */
		conn_lost(s, &rd->conn);
		rd->conn.backoff.retry_at_us = 0;
		if (conn_ensure(s, &rd->conn, j->deadline_us)) {
			j->err.msg[0] = '\0';
			read_run(s, rd, j);
		} else {
			j->rc = cw_fail(&j->err, CW_EUNAVAIL, "the database is unavailable");
		}
	}
}

/* A patient read's pause before it tries again (the reconnection's
 * backoff decides whether a try connects): false once its deadline has
 * passed or the store stops. */
static bool patient_nap(struct cw_store *s, int64_t deadline_us)
{
	int64_t left = deadline_us - cw_now_us();
	if (left <= 0)
		return false;
	struct timespec ts = { 0, (long)(left < 100000 ? left : 100000) * 1000L };
	nanosleep(&ts, NULL);
	pthread_mutex_lock(&s->mu);
	bool stopping = s->stopping;
	pthread_mutex_unlock(&s->mu);
	return !stopping && cw_now_us() < deadline_us;
}

static void *reader_main(void *arg)
{
	cw_thread_name("cw-reader");
	struct reader *rd = arg;
	struct cw_store *s = rd->s;
	for (;;) {
		pthread_mutex_lock(&s->mu);
		while (!s->stopping && !s->rq.head)
			pthread_cond_wait(&s->rcond, &s->mu);
		if (s->stopping) {
			struct job *rest = q_take(&s->rq, (size_t)s->rq.n);
			pthread_mutex_unlock(&s->mu);
			fail_list(rest, CW_ESHUTDOWN, "the daemon is stopping");
			break;
		}
		struct job *j = q_take(&s->rq, 1);
		pthread_mutex_unlock(&s->mu);

		atomic_fetch_add(&s->readers_busy, 1);
		if (cw_now_us() > j->deadline_us) {
			j->rc = cw_fail(&j->err, CW_ETIMEDOUT, "the database did not take the read in time");
		} else {
			read_once(s, rd, j);
			while (j->patient && j->rc == CW_EUNAVAIL && patient_nap(s, j->deadline_us)) {
				j->err.msg[0] = '\0';
				read_once(s, rd, j);
			}
		}
		atomic_fetch_sub(&s->readers_busy, 1);
		atomic_fetch_add(&s->reads_done, 1);
		finish(j);
	}
	conn_lost(s, &rd->conn);
	return NULL;
}

/* -------------------------------------------------------------- public API */

static cw_err enqueue(struct cw_store *s, bool write, store_fn fn, const struct store_pipe_ops *pipe,
		      store_done_fn done, void *arg, bool patient, int64_t delay_us, int64_t until_us)
{
	if (write && !atomic_load(&s->db_up))
		return CW_EUNAVAIL;
	struct job *j = calloc(1, sizeof(*j));
	if (!j)
		return CW_ENOMEM;
	j->fn = fn;
	j->pipe = pipe;
	j->done = done;
	j->arg = arg;
	j->patient = patient;
	j->enqueued_us = cw_now_us();
	j->deadline_us = j->enqueued_us + s->o.deadline_us;
	pthread_mutex_lock(&s->mu);
	if (s->stopping) {
		pthread_mutex_unlock(&s->mu);
		free(j);
		return CW_ESHUTDOWN;
	}
	if (!write && delay_us > 0) {
		/* for later: the watchdog hands it to the readers (delayed_due),
		 * which sets its deadline then; none is read while it waits */
		j->not_before_us = j->enqueued_us + delay_us;
		j->until_us = until_us;
		q_push(&s->dq, j);
		if (j->not_before_us < s->watch_wake_us) {
			s->watch_wake_us = j->not_before_us;
			pthread_cond_signal(&s->dcond);
		}
	} else if (write) {
		q_push(&s->wq, j);
		/* Wake the writer only when the plan may change: first job, or a
		 * full batch. */
		if (s->wq.n == 1 || s->wq.n >= s->o.batch_max)
			pthread_cond_signal(&s->wcond);
	} else {
		q_push(&s->rq, j);
		pthread_cond_signal(&s->rcond);
	}
	pthread_mutex_unlock(&s->mu);
	return CW_OK;
}

cw_err store_write(struct cw_store *s, store_fn fn, store_done_fn done, void *arg)
{
	return enqueue(s, true, fn, NULL, done, arg, false, 0, 0);
}

cw_err store_write_pipe(struct cw_store *s, const struct store_pipe_ops *ops, store_done_fn done, void *arg)
{
	return enqueue(s, true, NULL, ops, done, arg, false, 0, 0);
}

cw_err store_read(struct cw_store *s, store_fn fn, store_done_fn done, void *arg)
{
	return enqueue(s, false, fn, NULL, done, arg, false, 0, 0);
}

cw_err store_read_patient(struct cw_store *s, store_fn fn, store_done_fn done, void *arg)
{
	return enqueue(s, false, fn, NULL, done, arg, true, 0, 0);
}

cw_err store_read_patient_after(struct cw_store *s, int64_t delay_us, int64_t until_us, store_fn fn, store_done_fn done,
				void *arg)
{
	return enqueue(s, false, fn, NULL, done, arg, true, delay_us, until_us);
}

struct read_wait {
	store_fn fn;
	void *arg;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool done;
	cw_err rc;
	cw_errmsg *e;
};

/* The job's one argument is the wait: fn gets the caller's. */
static cw_err read_wait_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	struct read_wait *w = arg;
	return w->fn(c, w->arg, e);
}

static void read_waited(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct read_wait *w = arg;
	pthread_mutex_lock(&w->mu);
	w->rc = rc;
	if (rc && e)
		*w->e = *e;
	w->done = true;
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
}

cw_err store_read_wait(struct cw_store *s, store_fn fn, void *arg, cw_errmsg *e)
{
	struct read_wait w = { .fn = fn, .arg = arg, .e = e };
	pthread_mutex_init(&w.mu, NULL);
	pthread_cond_init(&w.cv, NULL);
	cw_err rc = enqueue(s, false, read_wait_fn, NULL, read_waited, &w, false, 0, 0);
	if (rc) {
		cw_fail(e, rc, "the store is not taking work");
	} else {
		/* Every job is finished (its deadline, the store's stop): this
		 * wait ends. */
		pthread_mutex_lock(&w.mu);
		while (!w.done)
			pthread_cond_wait(&w.cv, &w.mu);
		pthread_mutex_unlock(&w.mu);
		rc = w.rc;
	}
	pthread_cond_destroy(&w.cv);
	pthread_mutex_destroy(&w.mu);
	return rc;
}

cw_err store_open(struct cw_store **out, const struct store_opts *o, cw_errmsg *e)
{
	struct cw_store *s = calloc(1, sizeof(*s));
	if (!s)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	s->o = *o;
	s->url = strdup(o->url);
	s->readers = calloc((size_t)o->readers, sizeof(*s->readers));
	if (!s->url || !s->readers) {
		free(s->url);
		free(s->readers);
		free(s);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	pthread_mutex_init(&s->mu, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&s->wcond, &ca);
	pthread_cond_init(&s->rcond, &ca);
	pthread_cond_init(&s->dcond, &ca);
	pthread_condattr_destroy(&ca);
	s->watch_wake_us = INT64_MAX;
	conn_init(&s->wconn, "writer");
	for (int i = 0; i < o->readers; i++)
		conn_init(&s->readers[i].conn, "reader");

	/* Connected here, so that db_up is true from the start (the daemon's
	 * "ready" says the database is connected); its statements are
	 * prepared by the writer thread, first thing (writer_main). */
	conn_ensure_to(s, &s->wconn, 0, false);
	if (pthread_create(&s->writer, NULL, writer_main, s)) {
		conn_lost(s, &s->wconn);
		conn_destroy(&s->wconn);
		for (int i = 0; i < o->readers; i++)
			conn_destroy(&s->readers[i].conn);
		free(s->url);
		free(s->readers);
		free(s);
		return cw_fail(e, CW_EIO, "cannot start the writer thread");
	}
	for (int i = 0; i < o->readers; i++) {
		s->readers[i].s = s;
		if (pthread_create(&s->readers[i].thread, NULL, reader_main, &s->readers[i])) {
			for (int k = i; k < o->readers; k++)
				conn_destroy(&s->readers[k].conn);
			s->o.readers = i;
			store_close(s);
			return cw_fail(e, CW_EIO, "cannot start a reader thread");
		}
	}
	/* Last: it looks at the connections of all the others. */
	if (pthread_create(&s->watchdog, NULL, watchdog_main, s)) {
		store_close(s);
		return cw_fail(e, CW_EIO, "cannot start the watchdog thread");
	}
	s->watchdog_started = true;
	*out = s;
	return CW_OK;
}

void store_stop(struct cw_store *s)
{
	pthread_mutex_lock(&s->mu);
	bool was = s->stopping;
	s->stopping = true;
	pthread_cond_broadcast(&s->wcond);
	pthread_cond_broadcast(&s->rcond);
	pthread_mutex_unlock(&s->mu);
	if (was)
		return;
	/* A statement blocked in the database (a lock) is cancelled after 2 s:
	 * its jobs answer 503, nothing half-stored (docs/faults.md). */
	struct timespec grace;
	store_grace(&grace, 2000);
	store_join_cancelling(s->writer, &s->wconn.cancel, &grace);
	for (int i = 0; i < s->o.readers; i++)
		store_join_cancelling(s->readers[i].thread, &s->readers[i].conn.cancel, &grace);
	/* The jobs' deadlines held until the last of them was answered. */
	if (s->watchdog_started) {
		pthread_mutex_lock(&s->mu);
		s->watch_stop = true;
		pthread_cond_signal(&s->dcond);
		pthread_mutex_unlock(&s->mu);
		pthread_join(s->watchdog, NULL);
	}
}

void store_close(struct cw_store *s)
{
	if (!s)
		return;
	store_stop(s);
	conn_destroy(&s->wconn);
	for (int i = 0; i < s->o.readers; i++)
		conn_destroy(&s->readers[i].conn);
	pthread_cond_destroy(&s->wcond);
	pthread_cond_destroy(&s->rcond);
	pthread_cond_destroy(&s->dcond);
	pthread_mutex_destroy(&s->mu);
	free(s->readers);
	free(s->url);
	free(s);
}

void store_get_stats(struct cw_store *s, struct store_stats *st)
{
	pthread_mutex_lock(&s->mu);
	st->writes_queued = s->wq.n;
	st->reads_queued = s->rq.n + s->dq.n; /* the reads queued for later too (dq) */
	pthread_mutex_unlock(&s->mu);
	st->db_up = atomic_load(&s->db_up);
	st->conns_total = s->o.readers + 1;
	st->conns_up = atomic_load(&s->conns_up);
	st->readers_busy = atomic_load(&s->readers_busy);
	st->batches = atomic_load(&s->batches);
	st->writes_committed = atomic_load(&s->writes_committed);
	st->writes_failed = atomic_load(&s->writes_failed);
	st->reads_done = atomic_load(&s->reads_done);
	st->reconnects = atomic_load(&s->reconnects);
	st->write_retries = atomic_load(&s->write_retries);
	st->retry_pause_us = atomic_load(&s->retry_pause_us);
}

/* ------------------------------------------------------------ cancelling */

void store_canceller_init(struct store_canceller *k)
{
	pthread_mutex_init(&k->mu, NULL);
	k->cur = NULL;
}

void store_canceller_set(struct store_canceller *k, PGconn *c)
{
	struct store_cancel *next = c ? calloc(1, sizeof(*next)) : NULL;
	if (next) {
		next->pc = PQgetCancel(c);
		atomic_init(&next->refs, 1);
		if (!next->pc) {
			free(next);
			next = NULL;
		}
	}
	pthread_mutex_lock(&k->mu);
	struct store_cancel *old = k->cur;
	k->cur = next;
	pthread_mutex_unlock(&k->mu);
	cancel_put(old);
}

void store_canceller_destroy(struct store_canceller *k)
{
	store_canceller_set(k, NULL);
	pthread_mutex_destroy(&k->mu);
}

void store_grace(struct timespec *until, long grace_ms)
{
	cw_deadline_ts(until, CLOCK_REALTIME, (int64_t)grace_ms * 1000);
}

static void *cancel_main(void *arg)
{
	cw_thread_name("cw-cancel");
	struct store_cancel *x = arg;
	char err[256];
	if (!PQcancel(x->pc, err, sizeof(err)))
		LOG_KV(CW_LOG_WARN, "cannot cancel a statement at the stop", "detail", err);
	else if (!atomic_exchange(&x->told, true))
		LOG_KV(CW_LOG_INFO, "a statement still running at the stop was cancelled");
	atomic_store(&x->sending, false);
	cancel_put(x);
	return NULL;
}

/* Sends a cancel request for k's statement from a detached thread of its
 * own, unless one is still on its way (a server that does not answer
 * would otherwise collect one thread per try). */
static void cancel_in_background(struct store_canceller *k)
{
	struct store_cancel *x = cancel_get(k);
	if (!x)
		return;
	if (atomic_exchange(&x->sending, true)) {
		cancel_put(x);
		return;
	}
	if (!cw_thread_detached(cancel_main, x)) {
		LOG_KV(CW_LOG_WARN, "cannot cancel a statement at the stop", "detail", "cannot start a thread");
		atomic_store(&x->sending, false);
		cancel_put(x);
	}
}

void store_join_cancelling(pthread_t t, struct store_canceller *k, const struct timespec *grace_until)
{
	struct timespec until = *grace_until;
	/* Cancelled, a thread may still have a statement or two to run before
	 * it sees the stop (each blocked the same way): cancelled again.  The
	 * caller waits for the thread only (until the stop's deadline, main.c),
	 * never for a cancel request. */
	while (pthread_timedjoin_np(t, NULL, &until) != 0) {
		cancel_in_background(k);
		cw_deadline_ts(&until, CLOCK_REALTIME, 200 * 1000);
	}
}
