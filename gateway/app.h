/* The daemon's context (passed to every handler; no globals) and the
 * gateway's own routes: health, readiness and metrics. */
#ifndef CW_APP_H
#define CW_APP_H

#include "conf.h"
#include "http.h"
#include "migrate.h"
#include "store.h"

#include <jansson.h>
#include <stdatomic.h>

#include <openssl/evp.h>

#include "policy.h"
#include "media.h"

struct peer_registry;
struct httpsig_replay;
struct dispatcher;
struct peer_pull;
struct submit_queue;
struct policy_live;
struct ratelimit;
struct admin_tokens;
struct admin_views;

struct cw_app {
	struct cw_config *cfg;
	struct cw_store *store;
	struct cw_http *http;
	struct migration_set migrations;
	int64_t started_wall_ms;
	struct peer_registry *peers;
	struct admin_tokens *admins;    /* admin API credentials */
	struct admin_views *views;      /* what the admin views keep */
	EVP_PKEY *signing_key;          /* Causeway's own Ed25519 key */
	char public_key_b64[64];
	struct httpsig_replay *replay;  /* nonces of peer signatures */
	struct policy_live *policy;     /* the rules and consent in force */
	struct ratelimit *limits;       /* the token buckets of rate limits */
	_Atomic unsigned long long decisions[4]; /* policy verdicts, by enum policy_verdict */
	struct dispatcher *dispatcher;
	struct peer_pull *pull;         /* the long-poll thread of GET /v1/events */
	struct submit_queue *submits;   /* coalesces single-event submits */
	struct matrix *matrix;          /* the Matrix adapter, or NULL */
	struct xmpp *xmpp;              /* the XMPP adapter, or NULL */
	unsigned char media_key[32];    /* of the media tokens offered to peers (media.h) */
	struct media_source media;      /* where local users' files come from (ctx NULL: nowhere) */
	struct cw_workers *fetchers;    /* the threads that fetch files (server.media_fetches; workers.h) */
	atomic_bool stopping;           /* set once the HTTP front has drained: long transfers end */
	atomic_int afters;              /* after hooks running on threads of their own, and probes pending (app_afters_wait) */
	struct app_probes *_Atomic probes; /* the deadlines of /readyz's and /metrics' reads (app.c) */
	atomic_size_t media_held;       /* bytes of fetched files whose answers are still being sent (peer_media.c) */
};

/* Waits until no job's after hook runs on a thread of its own (they use
 * the store, the policy and the adapters, and resume their requests):
 * called at the stop, before any of those goes.  Each hook's waits are
 * bounded by its own timeouts. */
void app_afters_wait(struct cw_app *app);
/* Ends the thread that keeps the deadlines of /readyz's and /metrics'
 * reads, once none is pending (after store_close), and frees what it kept. */
void app_probes_free(struct cw_app *app);

/* A database job on behalf of a request: the request is suspended, fn runs
 * on a store thread (inside the group-commit transaction for a write, and
 * then possibly more than once: it must start from the job's inputs each
 * time), and the request is answered and resumed when the outcome is known:
 * - the store failed (database away, deadline): 503 with Retry-After;
 * - fn set err_code: that problem answer (nothing it wrote is kept only if
 *   it wrote nothing: set err_code before writing);
 * - otherwise: status with body.
 * after (optional) runs on success, before the request is resumed. */
struct app_job;

/* A pipelined job's rounds (see store_pipe_ops). */
struct app_pipe_ops {
	cw_err (*send)(PGconn *c, struct app_job *j, int round, cw_errmsg *e);
	cw_err (*recv)(PGconn *c, struct app_job *j, int round, bool *more, cw_errmsg *e);
	const char *(*first_locks)(struct app_job *j); /* optional: store_pipe_ops.first_locks */
};

struct app_job {
	struct cw_app *app;
	struct cw_req *req;
	cw_err (*fn)(PGconn *c, struct app_job *j, cw_errmsg *e);
	const struct app_pipe_ops *pipe; /* instead of fn: a pipelined write */
	void (*after)(struct app_job *j);
	void *data;                 /* the handler's inputs */
	void (*data_free)(void *);
	bool matrix_errors;         /* answer errors as Matrix does ({"errcode", "error"}), not problem+json */
	bool no_write;              /* set by a prepare step: the answer is ready, nothing to write */
	bool after_waits;           /* after may wait (for a policy reload): run it, and answer, off the
	                             * store's thread (a writer held there would hold every write) */
	/* A job of the daemon's own, with no request (req NULL): told its
	 * outcome (rc, or CW_EINVAL when fn set err_code) instead of an answer,
	 * after after; the job is freed when it returns. */
	void (*finished)(struct app_job *j, cw_err rc);
	/* outputs, reset before each run of fn */
	int status;
	json_t *body;
	int err_status;
	const char *err_code;
	char err_detail[256];
	int64_t retry_after_ms;     /* with err_code: the answer's Retry-After (set here, not on
	                             * the request: fn may run again, and headers add up) */
};

struct app_job *app_job_new(struct cw_app *app, struct cw_req *req,
			    cw_err (*fn)(PGconn *, struct app_job *, cw_errmsg *));
/* Suspends the request and queues the job (write: group commit). */
void app_job_start(struct app_job *j, bool write);
/* The same for a pipelined write. */
void app_job_start_pipe(struct app_job *j, const struct app_pipe_ops *ops);
/* A pipelined write whose inputs need reading and work first: prepare runs
 * on a reader thread, off the group-commit writer (whose time every write
 * waits for), and the write is queued when it succeeds.  What prepare read
 * may be stale by the time the write runs: use it only where that is
 * harmless (a reference not found yet is what a later arrival would see). */
void app_job_start_prepared_pipe(struct app_job *j, cw_err (*prepare)(PGconn *, struct app_job *, cw_errmsg *),
				 const struct app_pipe_ops *ops);
/* app_job_new + data + app_job_start in one: takes ownership of data
 * (freed with data_free), and answers 503 itself when data is NULL or
 * memory runs out, so callers need not check their allocation. */
void app_job_run(struct cw_app *app, struct cw_req *req, cw_err (*fn)(PGconn *, struct app_job *, cw_errmsg *),
		 void *data, void (*data_free)(void *), bool write);

/* Sets a client error answer from inside fn. */
void app_job_fail(struct app_job *j, int status, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* The HTTP front's authorize hooks (see enum cw_auth): with the headers,
 * before the body is read, the bearer token (and for the admin API
 * everything: it needs no body); then, the body read, what needs it (a
 * peer's request signature covers its Content-Digest). */
bool app_authorize_headers(struct cw_req *req, enum cw_auth auth, void *ctx);
bool app_authorize(struct cw_req *req, enum cw_auth auth, void *ctx);

/* A timestamptz expression x as the admin API writes every time: RFC 3339
 * in UTC with milliseconds (2026-12-05T14:29:48.123Z), whatever the
 * session's TimeZone; NULL stays NULL.  A SQL fragment to splice into a
 * statement's text.  Until the forty-ninth session's review the lists
 * wrote three forms (this one, whole seconds, and PostgreSQL's own with
 * microseconds and +00:00), one delivery's created_at differing between
 * the outbox list and its trace. */
#define APP_SQL_TS(x) "to_char((" x ") AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* Admin lists: ?after= (a row id, 0 when absent) and ?limit= (1 to
 * APP_PAGE_MAX, 100 when absent); false after answering 400. */
#define APP_PAGE_MAX 500
#define APP_PAGE_DEFAULT 100
bool app_paging(struct cw_req *req, long long *after, long *limit);
/* The query parameters app_paging reads, for the route table (cw_route.query). */
#define APP_PAGING_QUERY "after limit"
/* A list of records (the audit log, the abuse reports) pages by row id,
 * and an id is drawn when its row is written but seen when it commits: a
 * transaction that drew a lower id and commits after another's page was
 * read would be behind the cursor, on no later page.  This gives into out
 * the id up to which every row of table (its id from the table's
 * sequence, drawn by an INSERT: the writer holds the table's
 * RowExclusiveLock from before the id is drawn until it ends) is committed
 * or never will be: the sequence's last id, once every transaction that
 * held that lock when it was read has ended (waited for up to
 * APP_HORIZON_WAIT_MS).  A page read after it and stopped at that id
 * holds every row it ever will below its last.  A writer open for longer
 * than app_stuck_write_ms (or of another database role, whose start is
 * not shown) is passed over; one younger still open after the wait makes
 * the job fail with 503 unavailable and Retry-After (out empty). */
#define APP_HORIZON_WAIT_MS 1000
cw_err app_list_horizon(PGconn *c, struct app_job *j, const char *table, char out[24], cw_errmsg *e);
/* How long a write of the daemon's may stay open before a reader that
 * waits for it (app_list_horizon; the XMPP component's reads of the audit
 * log, xa_open_write_wait_ms) takes it as stuck and passes over it: twice
 * database.statement_timeout_ms, APP_STUCK_WRITE_MIN_MS at least (an id
 * whose transaction rolled back never comes). */
#define APP_STUCK_WRITE_MIN_MS 60000
int64_t app_stuck_write_ms(const struct cw_config *cfg);
/* The path parameter name as a row id; false after answering 404 "no
 * <what> with that id". */
bool app_path_id(struct cw_req *req, const char *name, const char *what, char out[24]);

/* Adds Retry-After: ms rounded up to whole seconds. */
void app_retry_after(struct cw_req *req, int64_t ms);
/* This process's policy as /readyz and GET /admin/v1/adapters show it:
 * {status: current or stale, version, reload_failures, and when stale
 * (reloads failing for POLICY_STALE_AFTER_S or more) stale_for_s and
 * detail}; NULL without a policy thread.  in_public (/readyz, which needs
 * no credentials): a connection's failure in words of ours, not libpq's. */
json_t *app_policy_health(struct cw_app *app, bool in_public);
/* The answer for a store that refused or failed a job. */
void app_reply_store_error(struct cw_app *app, struct cw_req *req, cw_err rc, const char *why);
/* False after answering 415 when the body is not application/json. */
bool app_is_json(struct cw_req *req);
/* A short title for a problem answer's status. */
const char *app_status_title(int status);
/* The request body as a JSON object, or NULL after answering 400/415. */
json_t *app_json_body(struct cw_req *req);
/* False after answering 400 invalid_body when body has a member not in
 * known (NULL-terminated): a misspelt member would otherwise be ignored
 * and the change done without it. */
bool app_json_only_known(struct cw_req *req, json_t *body, const char *const *known);
/* Whether domain is one of this provider's own (server.domain, the Matrix
 * server name, the XMPP domain or a component's), which no peer may speak
 * for. */
bool app_domain_is_ours(struct cw_app *app, const char *domain);
/* The bearer token of the Authorization header, or NULL. */
const char *app_bearer(struct cw_req *req);
/* Answers 401 unauthenticated (WWW-Authenticate: Bearer) with detail. */
void app_unauthenticated(struct cw_req *req, const char *detail);
/* The detail of a request whose peer token is not (or no longer) valid. */
#define APP_PEER_TOKEN_REQUIRED "a valid peer bearer token is required"

/* The network of this provider's users: the local adapter that serves
 * them ("matrix" or "xmpp"), or "local" while there is none. */
const char *app_local_network(const struct cw_app *app);

/* Counts a policy decision (metrics). */
void policy_count(struct cw_app *app, const struct policy_decision *d);

/* The route table of the daemon. */
extern const struct cw_route app_routes[];
extern const size_t app_nroutes;
/* The GETs that change state, which HEAD does not run (cw_http_opts). */
extern const char *const app_no_head_routes[];

#endif
