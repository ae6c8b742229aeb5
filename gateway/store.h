/* The store: every database access of the daemon goes through here.
 *
 * - One group-commit writer thread with its own connection turns queued
 *   writes into one transaction per batch (bounded by a count and a delay),
 *   so that durability does not cost one fsync per request.
 * - A few reader threads, each with its own connection, run queued reads.
 * - Connections reconnect by themselves with exponential backoff; while the
 *   database is away, writes are refused at once (CW_EUNAVAIL: the API
 *   answers 503) and nothing is reported durable that is not.
 * - Every queued job has a deadline, so a suspended HTTP request is always
 *   resumed. */
#ifndef CW_STORE_H
#define CW_STORE_H

#include "cw.h"
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>

struct cw_store;

/* The reason (cw_errmsg) of a write whose connection was lost at COMMIT:
 * it may have been stored; the caller says so, not "nothing was stored"
 * (and, answering a request, how to retry it: STORE_OUTCOME_RETRY or
 * STORE_OUTCOME_LOOK). */
#define STORE_OUTCOME_UNKNOWN \
	"the database connection was lost while the write was committed: it may have been stored"
#define STORE_OUTCOME_RETRY STORE_OUTCOME_UNKNOWN "; retry it (with the same Idempotency-Key, it is not done twice)"
#define STORE_OUTCOME_LOOK \
	STORE_OUTCOME_UNKNOWN "; look before you repeat it: no Idempotency-Key of this request makes a repeat " \
			      "safe (it may be refused as existing, or done twice)"

/* Every write of events takes, in room id order and until its commit, a
 * transaction-level advisory lock per room (class ROOM_LOCK_CLASS, "CWSR",
 * the letters its value spells; until the sixty-first session this comment
 * said "CWRR", which no value spells): the outbox ids of one room's rows then
 * follow the order in which they were committed, across daemon processes
 * too.  ROOM_LOCK_SQL(room) takes the lock of one room, room being an SQL
 * expression of its id (bigint, folded into the int key); the statements
 * share it so that their keys cannot drift apart. */
#define ROOM_LOCK_CLASS "1129796434"
#define ROOM_LOCK_SQL(room) "pg_advisory_xact_lock(" ROOM_LOCK_CLASS ", (" room " % 2147483647)::int)"
/* The locks of several rooms, in room id order (so that two writes never
 * wait for each other), as one row (n): rooms is a query of their ids as
 * column r, each once. */
#define ROOM_LOCKS_SQL(rooms) "SELECT count(" ROOM_LOCK_SQL("y.r") ") AS n FROM (" rooms " ORDER BY 1) y"

/* Two daily bounds of a local user counted from what is stored, each under
 * a transaction-level advisory lock of the user taken in a statement before
 * the count (whose snapshot then holds whatever another process committed
 * before letting the lock go), until the commit: two transactions never
 * both pass the last slot.  USER_ASK_LOCK_CLASS ("CWCR"), keyed by her
 * identity id: the consent requests she is asked
 * (policy.consent_requests_per_user_per_day, peer_api.c); XMPP_GROUP_LOCK_CLASS
 * ("CWXG"), keyed by hashtext of her URI: the groups she makes
 * (xmpp.user_groups_per_day, xmpp_muc.c).  Their own classes: they wait
 * for no room's lock holder. */
#define USER_ASK_LOCK_CLASS "1129792338"
/* Her locks, taken in id order (waiting for each): $1 their identity ids,
 * comma-separated (store_pipe_ops.first_locks). */
#define USER_LOCKS_FIRST_SQL \
	"SELECT count(pg_advisory_xact_lock(" USER_ASK_LOCK_CLASS ", (y.u % 2147483647)::int)) FROM " \
	"(SELECT DISTINCT x::bigint AS u FROM unnest(string_to_array($1, ',')) AS x ORDER BY 1) y"
#define XMPP_GROUP_LOCK_CLASS "1129797703"

/* Outbox row o (its alias) is held, said so that outbox_held_probe_idx
 * ((target_identity_id, room_id, id) WHERE state IS NOT DISTINCT FROM
 * 'held', schema/047) is the only index of held rows the planner can read
 * for it (state is NOT NULL: the same test as state = 'held').  Every
 * statement that finds a user's held rows by user (and room) says it so:
 * the dispatcher's probe (047: with state = 'held', stale statistics
 * planned it on another index of held rows, read whole for each row
 * claimed), a consent's sweep, the opt-out's recheck, the user summary,
 * the admin counts and the held list of one user.  Until the fiftieth
 * session all but the probe said state = 'held' and read outbox_held_idx,
 * the same rows and key, which 052 dropped: one index entry fewer to
 * write for every row held. */
#define OUTBOX_HELD(o) o ".state IS NOT DISTINCT FROM 'held'"

/* A new event's public id made in SQL, as cw_new_id makes one ("msg_" and
 * 16 random bytes, base64url): gen_random_uuid() is PostgreSQL's strong
 * random.  For the events the gateway writes itself. */
#define NEW_EVENT_ID_SQL "'msg_' || rtrim(translate(encode(uuid_send(gen_random_uuid()), 'base64'), '+/', '-_'), '=')"

/* Whether consent_requests row q (its alias) still stands for its pair:
 * pending, or made within the last win seconds (an SQL expression, the
 * policy's consent_window) and expired unanswered.  One request per pair
 * and window: the statements that make one and the one that tells the
 * policy whether one would be made (a new request takes a rate-limit
 * token) share it.  A request the user answered (accepted, blocked) does
 * not stand: her answer decides the sender's messages while it holds, and
 * once she lifts it (her block, or her allow, forgotten: "none") his next
 * message asks her again at once, as she expects, not a window after the
 * request she answered (since the forty-sixth session: until then such a
 * sender's messages waited unasked for the rest of the day).  Such a
 * re-ask takes no token of the sender's (CONSENT_REQUEST_ANSWERED_SQL):
 * his bucket must not tell his peer that she answered and changed her
 * mind, which an unknown name never does. */
#define CONSENT_REQUEST_STANDS_SQL(q, win) \
	"(" q ".state = 'pending' OR (" q ".state = 'expired' AND " q ".created_at > now() - make_interval(secs => " \
	win ")))"
/* Whether consent_requests row q is one the user answered within the last
 * win seconds: a request it would have stood for until the forty-sixth
 * session, so the sender paid for this window's already; asking her again
 * after she lifted her answer costs him nothing. */
#define CONSENT_REQUEST_ANSWERED_SQL(q, win) \
	"(" q ".state IN ('accepted', 'blocked') AND " q ".created_at > now() - make_interval(secs => " win "))"

/* A statement prepared on every connection of the store when it connects,
 * so hot statements are parsed and planned once per connection rather than
 * once per call (PQsendQueryPrepared / PQexecPrepared by name). */
struct store_stmt {
	const char *name;
	const char *sql;
};

struct store_opts {
	const char *url;
	int readers;              /* reader connections */
	int batch_max;            /* most writes in one transaction */
	int64_t batch_delay_us;   /* how long a batch may wait to fill */
	int64_t deadline_us;      /* a job not started by then fails CW_ETIMEDOUT */
	long statement_timeout_ms;
	long reconnect_max_ms;
	/* statements prepared on every connection: lists (each NULL-terminated
	 * by name) in a NULL-terminated array; may be NULL */
	const struct store_stmt *const *stmts;
	/* the readers' instead, when not NULL: those of stmts a read job runs.
	 * Each is parsed and analysed by the server on each connection (the
	 * writer's 19 took 50-130 ms on a loaded machine, docs/performance.md,
	 * fifty-eighth session), at a reader's first job. */
	const struct store_stmt *const *reader_stmts;
};

/* A unit of work run on a connection.  A write runs inside the batch's
 * transaction and may run more than once (when another write of the batch
 * fails, the batch is rolled back and run again without it): only the
 * effects of its last run are committed, so it must not keep state between
 * runs.  Returns CW_OK or an error with e filled. */
typedef cw_err (*store_fn)(PGconn *c, void *arg, cw_errmsg *e);
/* Called exactly once per accepted job, from a store thread, when the job's
 * outcome is known (for a write: after COMMIT). e->msg says why on failure. */
typedef void (*store_done_fn)(void *arg, cw_err rc, const cw_errmsg *e);

/* A pipelined write (libpq pipeline mode), for work that would otherwise
 * cost many round trips: it runs in rounds.  In each round the writer calls
 * send for every pipelined job of the batch that is still going (queue the
 * round's statements with PQsendQueryParams, do not wait), sends them all
 * at once, then calls recv for each job in the same order (read exactly
 * the results of what send queued, with store_pipe_result); recv sets
 * *more when the job wants another round.  So a batch of jobs that each
 * need a read and then a write costs two round trips, however many jobs.
 * As with store_fn, a job may run again from round 0 (when another job of
 * the batch failed) and must start from its inputs each time. */
struct store_pipe_ops {
	cw_err (*send)(PGconn *c, void *arg, int round, cw_errmsg *e);
	cw_err (*recv)(PGconn *c, void *arg, int round, bool *more, cw_errmsg *e);
	/* Optional: local users' identity ids (comma-separated; NULL or ""
	 * none) whose USER_ASK_LOCK_CLASS locks the job is to hold before any
	 * lock of its transaction.  Asked at the start of each run of the
	 * batch; the writer takes them all, in id order, right after BEGIN
	 * (USER_LOCKS_FIRST_SQL).  A job that found such a lock taken while
	 * its transaction held others (and so did not wait for it: peer_api.c,
	 * LOCK_USERS) names it here and fails with CW_ERETRY: its run again
	 * then waits for it holding nothing. */
	const char *(*first_locks)(void *arg);
};

/* store_pipe_result's want for a statement of either kind: rows
 * (PGRES_TUPLES_OK) or a command's (PGRES_COMMAND_OK), as store_pipeline
 * takes each of its statements.  It is PGRES_EMPTY_QUERY, which no
 * statement here wants (an empty query's result is refused). */
#define STORE_ROWS_OR_COMMAND PGRES_EMPTY_QUERY
/* In recv: the result of the next queued statement into *out (the caller
 * PQclear()s it); an error (and *out NULL) if it failed or its status is not
 * want (STORE_ROWS_OR_COMMAND: either): CW_ECONFLICT for a key taken or
 * removed (store_result_err), CW_EUNAVAIL for a lost connection, CW_EIO
 * for a statement not run as an earlier one of the pipeline failed,
 * CW_EINTERNAL for one that ran with another status than want, or when
 * no result is left to read on a good connection (more read than sent). */
cw_err store_pipe_result(PGconn *c, ExecStatusType want, PGresult **out, cw_errmsg *e);
/* Reads what is left up to the pipeline's sync point (PQpipelineSync);
 * false if the connection was lost first. */
bool store_pipe_drain(PGconn *c);

/* Starts the threads; does not need the database to be up. */
/* Why a connection failed, from libpq's message (PQerrorMessage) and
 * PQconnectionNeedsPassword, into msg; true if it lasts (not worth
 * waiting for: store.c says when).  For store.c and its tests. */
bool store_failure_text(const char *in, bool needs_password, char *msg, size_t size);
cw_err store_open(struct cw_store **out, const struct store_opts *o, cw_errmsg *e);
/* Fails every queued job with CW_ESHUTDOWN, finishes the batch in hand and
 * joins the threads; later jobs are refused with CW_ESHUTDOWN.  Idempotent. */
void store_stop(struct cw_store *s);
/* store_stop, then frees s. */
void store_close(struct cw_store *s);

/* Queues a job.  CW_OK: done will be called.  Otherwise (the database is
 * known to be away, or the store is closing) done is not called. */
cw_err store_write(struct cw_store *s, store_fn fn, store_done_fn done, void *arg);
cw_err store_read(struct cw_store *s, store_fn fn, store_done_fn done, void *arg);
cw_err store_write_pipe(struct cw_store *s, const struct store_pipe_ops *ops, store_done_fn done, void *arg);
/* store_read for a look-up after a write whose outcome is unknown
 * (STORE_OUTCOME_UNKNOWN: its connection lost at COMMIT): while the
 * database is away, the read is tried again at the reconnection's pace
 * until the job's deadline (database.request_timeout_ms from now) rather
 * than failing at once, since the answer (was it stored?) is only there
 * once the database answers.  It holds its reader meanwhile. */
cw_err store_read_patient(struct cw_store *s, store_fn fn, store_done_fn done, void *arg);
/* store_read_patient, handed to the readers delay_us from now (its
 * deadline counted from then, but never past until_us, cw_now_us's clock,
 * unless 0): a look-up asked again a moment later (a transaction the
 * server still runs) waits in the store meanwhile, not on a reader that
 * sleeps, and its looks end by until_us however long the readers' queue
 * (until the sixty-third session's review each look had a deadline of its
 * own, and 20 of them behind busy readers up to ~100 s).  Failed
 * CW_ESHUTDOWN if the store stops first. */
cw_err store_read_patient_after(struct cw_store *s, int64_t delay_us, int64_t until_us, store_fn fn, store_done_fn done,
				void *arg);
/* store_read, waiting for the outcome (fn's, or the store's: database away,
 * deadline, stopping), for a thread of its own that may block (a worker,
 * workers.h).  Never from a store thread or an HTTP thread. */
cw_err store_read_wait(struct cw_store *s, store_fn fn, void *arg, cw_errmsg *e);

struct store_stats {
	bool db_up;
	int conns_total;
	int conns_up;
	int readers_busy;
	long writes_queued;
	long reads_queued;
	uint64_t batches;          /* committed transactions */
	uint64_t writes_committed;
	uint64_t writes_failed;
	uint64_t reads_done;
	uint64_t reconnects;
	uint64_t write_retries;    /* runs again of a write that lost a deadlock */
	uint64_t retry_pause_us;   /* the time paused before them, in all */
};
void store_get_stats(struct cw_store *s, struct store_stats *st);

/* The group-commit decision, pure so that it can be tested alone: how many
 * of the queued jobs to take now, or 0 and *wait_us (how long to wait before
 * asking again; -1: until something is queued). */
size_t gc_plan(size_t queued, int64_t oldest_age_us, size_t batch_max, int64_t delay_us,
	       int64_t *wait_us);

/* The pause before the retry-th run again (1 first) of a write that lost a
 * deadlock, jittered by the random byte r: 2-4 ms, then 4-8, then 8-16 (a
 * retry past the sixth as the sixth, 64-128 ms).  Pure, for the same reason. */
int64_t store_retry_pause_us(int retry, unsigned char r);

/* Connects with the daemon's session settings; NULL and e filled on failure.
 * For start-up work (migrations) outside the pool. */
/* CW_EINVAL when libpq cannot parse url (the message never quotes it). */
cw_err store_check_url(const char *url, cw_errmsg *e);
/* Whether a URL store_check_url took carries a password (password= or
 * postgresql://user:PASSWORD@...). */
bool store_url_has_password(const char *url);
PGconn *store_connect(const char *url, long statement_timeout_ms, cw_errmsg *e);
/* store_connect for a thread that must not block on it: a server that
 * takes the connection and never answers it (a host gone without a reset,
 * a firewall that drops) holds the attempt until the URL's connect_timeout
 * (5 s unless it says) at most, and give_up(arg) (NULL: never) ends it
 * sooner: it is asked whenever wake_fd (-1: none; not read here) becomes
 * readable, and every 100 ms.  libpq's non-blocking connect
 * (PQconnectStartParams, PQconnectPoll); the session's settings as
 * store_connect's.  NULL and e filled on failure (refused, no answer
 * in time: "no answer within N s"; given up: "... given up"); CW_EINVAL
 * for a refusal that trying again does not mend (a wrong password, a
 * role or database that does not exist, no pg_hba.conf entry; a
 * password needed and none given), CW_EUNAVAIL for one that may.  A host
 * name is still resolved blocking, by libpq (hostaddr= avoids it). */
PGconn *store_connect_abortable(const char *url, long statement_timeout_ms, int wake_fd,
				bool (*give_up)(void *arg), void *arg, cw_errmsg *e);
/* store_connect_abortable, and why it failed in *why (CW_OK when it did
 * not): CW_EINVAL, a refusal that lasts, is the start-up's end
 * (main.c, connect_at_start). */
PGconn *store_connect_abortable_why(const char *url, long statement_timeout_ms, int wake_fd,
				    bool (*give_up)(void *arg), void *arg, cw_err *why, cw_errmsg *e);

/* Backing off: the one mechanism of every wait that grows while what it
 * waits for fails (a connection, a peer, a homeserver, a deadlocked write).
 * A wait starts at first, is twice the last one at each failure after, and
 * never more than most (first more than most: most); with jitter, what is
 * waited is 50..100 % of it, so that many that failed together do not try
 * again together.  Pure, for the tests: */
/* The wait after prev (0 or less: none yet, the first failure). */
int64_t store_backoff_next(int64_t prev, int64_t first, int64_t most);
/* The n-th wait (n <= 1: the first). */
int64_t store_backoff_nth(int n, int64_t first, int64_t most);
/* 50..100 % of d by the random byte r (0: half, 255: whole). */
int64_t store_jitter(int64_t d, unsigned char r);
/* store_jitter with a random byte of its own. */
int64_t store_jittered(int64_t d);

/* A backoff that keeps its own state: an attempt is due once retry_at_us
 * (cw_now_us) has passed (0: at once); store_backoff_reset (a success)
 * starts it again from its first wait. */
struct store_backoff {
	int64_t delay_us, retry_at_us;
};
/* Notes a failure: the wait after it (store_backoff_next, jittered if
 * asked), in microseconds, and retry_at_us set. */
int64_t store_backoff_grow(struct store_backoff *b, int64_t first_us, int64_t most_us, bool jitter);
/* A thread's own connection while the database is away: 250 ms, then
 * twice as long each time up to database.reconnect_max_ms (most_ms; <= 0:
 * 5 s), not jittered (one connection a thread: none to spread; the pool's
 * connections are, conn_ensure).  The new delay, in milliseconds. */
long store_backoff_failed(struct store_backoff *b, long most_ms);
static inline void store_backoff_reset(struct store_backoff *b)
{
	b->delay_us = b->retry_at_us = 0;
}
/* Sleeps until until_us (cw_now_us), cut short at once once *stop is set
 * by store_sleepers_stop (a condition variable, not a poll: set with
 * atomic_store alone, the flag is seen only at until_us). */
void store_sleep_until(int64_t until_us, const atomic_bool *stop);
/* Sets *stop and wakes every store_sleep_until; whether it was set already. */
bool store_sleepers_stop(atomic_bool *stop);
/* The same for a thread woken by a pipe (its stop writes to it): sleeps up
 * to ms (< 0: until woken), or until wake_fd (the pipe's non-blocking read
 * end) is readable, and empties the pipe: a wake-up left in it would end
 * every later sleep at once.  Whether it was woken. */
bool store_sleep_fd(int wake_fd, int ms);

/* Prepares every statement of lists (as store_opts.stmts) on c; false with
 * e set (and logged) when one fails. */
bool store_prepare_all(PGconn *c, const struct store_stmt *const *lists, cw_errmsg *e);
/* The same, not logged: the code of the first refusal, e PostgreSQL's
 * words and *failed its statement's name (the policy thread logs its own,
 * once a run of its reconnects). */
cw_err store_prepare_each(PGconn *c, const struct store_stmt *const *lists, const char **failed, cw_errmsg *e);

/* PQexecPrepared(c, name, n, params) with the statement's generic plan.
 * PostgreSQL plans a prepared statement again for its parameters (a
 * custom plan) while the custom plans' average cost is below the generic
 * plan's: on every call when a parameter folds part of it away, or while
 * its estimate grows with a table (docs/performance.md, "Forty-fourth
 * session", "Forty-fifth session").  plan_cache_mode is set for this
 * statement alone, in one round trip: the setting (local to the
 * statement's own transaction; in a transaction block of the caller's,
 * set and reset after it) and the statement are pipelined before one
 * Sync, and a failure takes the setting back with it.  The generic plan
 * is made again whenever the statistics of a table it reads change (an
 * ANALYZE).  Returns the statement's result, or the first error among
 * them (one made by libpq, without SQLSTATE, when the connection failed;
 * NULL when memory ran out).  As store_pipeline, not for a connection in
 * pipeline mode or with results unread: nothing is sent, and the result
 * is a failure made by libpq (PGRES_FATAL_ERROR, without SQLSTATE), which
 * store_check and store_result_err answer CW_EINTERNAL (a bug). */
PGresult *store_exec_generic(PGconn *c, const char *name, int n, const char *const *params);
/* store_exec_generic of sql, prepared on c as name the first time it is
 * missing there (SQLSTATE 26000): for an adapter's statements run on the
 * dispatcher's connections, which prepare only their own.  Outside a
 * transaction block only (the run that finds it missing would abort it). */
PGresult *store_exec_generic_sql(PGconn *c, const char *name, const char *sql, int n, const char *const *params);

/* One statement of store_pipeline: sql sent whole, or (sql NULL) the
 * statement prepared on the connection as name. */
struct store_piped {
	const char *sql;
	const char *name;
	int n;
	const char *const *params;
	PGresult *r; /* its result (rows or a command's), which the caller PQclear()s */
};
/* Sends the n statements at once (libpq pipeline mode) and reads their
 * results: one round trip for them all, each still a statement of its
 * own, whose snapshot is taken when it starts (after the statements
 * before it: a lock one of them took is held by then).  For statements
 * none of whose parameters is read from an earlier one's answer.  On a
 * failure the results are cleared and the first failed statement's error
 * returned (store_result_err's code): those after it did not run, and a
 * transaction block is aborted, as by one statement that failed.  Outside
 * a transaction block the n statements are one transaction (PostgreSQL's
 * implicit one, up to the Sync): a failure undoes those before it too,
 * where one statement at a time would have kept them.  Not for a
 * connection in pipeline mode already (a pipelined job's send: its
 * statements would join the job's pipeline) nor one whose last results
 * were not read: the call fails (CW_EINTERNAL, a bug) and sends nothing.  Until
 * the fifty-fifth session it fell back to one statement at a time: which
 * libpq refuses in pipeline mode, and which dropped the unread results. */
cw_err store_pipeline(PGconn *c, struct store_piped *q, int n, cw_errmsg *e);
/* Runs a command without results; a failure is store_result_err's code
 * (CW_EUNAVAIL: the connection lost, CW_ECONFLICT: a key taken or
 * removed, ...). */
cw_err store_exec(PGconn *c, const char *sql, cw_errmsg *e);
/* Ends the transaction a BEGIN on c opened: ROLLBACK when rc is a failure
 * (rc returned, e left as the failure wrote it), else COMMIT.  A COMMIT
 * that does not commit is the failure it is: refused (a deferred check:
 * CW_ECONFLICT; a lost connection: CW_EUNAVAIL, the outcome unknown), or
 * answered with ROLLBACK because a statement had failed unseen
 * (CW_EINTERNAL, a bug of the caller's). */
cw_err store_end(PGconn *c, cw_err rc, cw_errmsg *e);
/* Runs a command with text parameters and no result rows. */
cw_err store_command(PGconn *c, const char *sql, int n, const char *const *params, cw_errmsg *e);
/* CW_OK when r has status st; otherwise r's error, and r is cleared: for
 * a statement that ran well with another status (its text and the code
 * disagree) CW_EINTERNAL, the message naming both statuses. */
cw_err store_check(PGconn *c, PGresult *r, ExecStatusType st, cw_errmsg *e);
/* The cw_err for a failed PGresult (NULL: the connection's state): a
 * unique, foreign-key or exclusion violation CW_ECONFLICT (a race), any
 * other integrity violation (CHECK, NOT NULL) CW_EINTERNAL; a connection
 * lost CW_EUNAVAIL; a result that is no error (a status other than its
 * caller's wanted, on a good connection) CW_EINTERNAL. */
cw_err store_result_err(PGconn *c, const PGresult *r, cw_errmsg *e);

/* A listener's notifications.  libpq reads a NOTIFY that arrives while a
 * statement runs into its own queue: the socket then has nothing more to
 * say, and a loop that polls the socket before it asks PQnotifies() sleeps
 * its whole timeout with the notification unread (the policy snapshot
 * reloaded up to a second late, after the change was answered).
 *
 * store_notifies takes every notification there is without waiting (the
 * queued ones and all the socket holds: libpq reads some 32 KB a call, and
 * a listener that reads less than it is sent falls behind for good); each
 * (may be NULL) sees each one's channel and payload.  The count, or -1 when the
 * connection is broken and nothing was taken. */
int store_notifies(PGconn *c, void (*each)(const char *channel, const char *payload, void *arg), void *arg);
/* Returns at once with the queued notifications if there are any, else
 * waits up to timeout_ms for one on the socket or for wake_fd (-1: none)
 * to be readable (the caller empties it), and takes them: as above, 0 when
 * none came, -1 for a broken connection (after the wait all the same, so
 * that the caller's loop does not spin). */
int store_wait_notify(PGconn *c, int wake_fd, int timeout_ms,
		      void (*each)(const char *channel, const char *payload, void *arg), void *arg);

/* What stops a thread's statement from another thread: a background thread
 * (a dispatcher lane, the policy thread) blocked in the database (a lock a
 * migration holds) would hold the daemon's stop for its statement_timeout.
 * store_canceller_set names the thread's connection (NULL before it
 * finishes it); store_join_cancelling joins the thread, and past grace_until
 * (CLOCK_REALTIME; one deadline for all the threads a stop joins, so that
 * blocked threads do not add up their grace) cancels its statement, then
 * joins.  The cancel request (PQcancel, a new connection to the server) is
 * sent from a thread of its own: a server that stopped answering answers it
 * no more than the statement, and the stop's deadline (main.c) must still
 * come.  store_grace sets a deadline grace_ms from now. */
struct store_cancel;
struct store_canceller {
	pthread_mutex_t mu; /* over cur only: never held across a cancel request */
	struct store_cancel *cur;
};
void store_canceller_init(struct store_canceller *k);
void store_canceller_set(struct store_canceller *k, PGconn *c);
void store_canceller_destroy(struct store_canceller *k);
void store_grace(struct timespec *until, long grace_ms);
void store_join_cancelling(pthread_t t, struct store_canceller *k, const struct timespec *grace_until);

#endif
