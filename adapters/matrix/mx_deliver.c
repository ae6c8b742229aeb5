/* The Matrix adapter's homeserver client: delivery of outbox rows as ghost
 * users in direct rooms, the start-up ping, and health. */
#include "config.h"
#include "matrix_int.h"
#include "dispatcher.h"
#include "peer/event.h"
#include "log.h"
#include "store.h"
#include "utf8.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

#define ANSWER_MAX (1 << 20)
#define MX_TIMEOUT_MS 10000L
/* Rooms delivered to at the same time (each with one request in flight,
 * on a connection of its own): a homeserver answers a send in
 * milliseconds, so one room after another would bound the whole gateway
 * by that latency.  Until the sixtieth session 16: a batch of 20 rooms
 * (tests/bench/matrix --rooms) went in two waves, its last four rooms
 * after the first sixteen, and its sends took 194-219 ms a batch of 250
 * where 64 took 147-174 (docs/performance.md, "Sixtieth session").  An
 * application service registered with rate_limited: false is held to no
 * rate by Synapse, which queues the making of events per room (at most 5
 * at once in a room: EventCreationHandler's limiter, a Linearizer keyed
 * by the room), not per sender, so 64 requests of 64 rooms are 64
 * connections it serves side by side. */
#define MX_ROOMS_IN_FLIGHT 64
/* The wait for the answer to a membership question that only words a
 * refused join's reason (join_refusal): it is asked while the delivery
 * waits, every room with it, and no answer words it as well as a late one
 * (the homeserver's refusal is said instead); the row is not delivered
 * either way. */
#define MX_MEMBER_TIMEOUT_MS 2000L

struct answer_buf {
	char *p;
	size_t n;
	bool too_big;
};

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *arg)
{
	struct answer_buf *b = arg;
	size_t n = size * nmemb;
	if (b->n + n > ANSWER_MAX) {
		b->too_big = true;
		return 0;
	}
	char *q = realloc(b->p, b->n + n + 1);
	if (!q)
		return 0;
	memcpy(q + b->n, ptr, n);
	b->p = q;
	b->n += n;
	b->p[b->n] = '\0';
	return n;
}

/* An escaped path segment (a user, room or event id). */
static char *seg(struct matrix *m, const char *s)
{
	(void)m;
	return curl_easy_escape(NULL, s, 0);
}

/* Whether the homeserver's refusal of a row's request (its status and
 * errcode) is for good: the same request is refused the same way on every
 * try, so that the row is a dead letter at once and its room's later rows
 * go on, not held behind it for the whole retry budget and then dead with
 * it.  A 413 (M_TOO_LARGE, whatever its errcode), and a 4xx (not 401, 403,
 * 408 or 429) whose errcode the specification (client-server API,
 * "Standard error response") gives for a request that is itself wrong:
 * permanent_errcodes.  Any other errcode is tried again for the budget:
 * M_UNKNOWN ("an unknown error has occurred") says nothing of the
 * request, and a homeserver answers it for a failure of its own too (a
 * worker or a database away behind a 400); a custom one (M_LIMIT_...,
 * a module's) is the homeserver's, not the specification's word.  Not a
 * 401 or 403 (a token not taken, a ghost not in the room: the operator or
 * the bot mends them, and health tells them: note_refusal; but a group's
 * row whose ghost is banned, or whose bot is out, is not delivered:
 * ask_portal), a 408 or a
 * 429 (a wait mends them), nor a 4xx without an errcode (a proxy's page,
 * not the homeserver's word).  Until the fifty-first session only a 413
 * was; until the fifty-second any errcode was, 400 M_UNKNOWN too.  The
 * peer API's final_4xx (peer_media.c) judges a file download's status,
 * not a row's request: a separate list on purpose (see there). */
static bool refused_for_good(long status, const json_t *answer)
{
	/* The request's own fault, as the specification describes them:
	 * malformed (M_NOT_JSON, M_BAD_JSON), a parameter missing or wrong
	 * (M_MISSING_PARAM, M_INVALID_PARAM), too large (M_TOO_LARGE), no such
	 * resource or endpoint (M_NOT_FOUND, M_UNRECOGNIZED), a state change
	 * that cannot be (M_BAD_STATE), a room version not supported
	 * (M_UNSUPPORTED_ROOM_VERSION, M_INCOMPATIBLE_ROOM_VERSION). */
	static const char *const permanent_errcodes[] = {
		"M_NOT_JSON", "M_BAD_JSON", "M_MISSING_PARAM", "M_INVALID_PARAM", "M_TOO_LARGE", "M_NOT_FOUND",
		"M_UNRECOGNIZED", "M_BAD_STATE", "M_UNSUPPORTED_ROOM_VERSION", "M_INCOMPATIBLE_ROOM_VERSION", NULL,
	};
	const char *code = json_string_value(json_object_get(answer, "errcode"));
	if (status == 413)
		return true;
	if (status < 400 || status >= 500 || status == 401 || status == 403 || status == 408 || status == 429 || !code)
		return false;
	for (size_t i = 0; permanent_errcodes[i]; i++)
		if (strcmp(code, permanent_errcodes[i]) == 0)
			return true;
	return false;
}

/* Whether a refusal is of the as_token itself: 401 M_UNKNOWN_TOKEN (the
 * registration's as_token is not the configured one: a token rotated on
 * one side) or M_MISSING_TOKEN.  Every call fares the same until the
 * operator mends it; a 401 without an errcode (a proxy's page) is not. */
static bool token_refusal(long status, const json_t *answer)
{
	const char *code = json_string_value(json_object_get(answer, "errcode"));
	return status == 401 && code && (strcmp(code, "M_UNKNOWN_TOKEN") == 0 || strcmp(code, "M_MISSING_TOKEN") == 0);
}

/* Whether one of this thread's calls was answered a token_refusal since
 * it was last cleared (the delivery clears it before a row's preparation). */
static _Thread_local bool token_refusal_seen;

/* The as_token refused (refused) or taken again (a call answered 2xx):
 * the hold of the delivery begins or ends, said once in the log.  Under
 * no lock. */
static void token_state(struct matrix *m, bool refused)
{
	if (atomic_load(&m->token_refused) == refused)
		return;
	pthread_mutex_lock(&m->mu);
	bool changed = atomic_load(&m->token_refused) != refused;
	if (changed) {
		atomic_store(&m->token_refused, refused);
		m->token_refused_ms = refused ? cw_wall_ms() : 0;
		pthread_cond_broadcast(&m->ping_cond); /* the ping's thread checks it again, later */
	}
	pthread_mutex_unlock(&m->mu);
	if (changed && refused)
		LOG_KV(CW_LOG_ERROR, "the homeserver refuses the as_token: Matrix delivery is held until it takes it",
		       "detail", "401 M_UNKNOWN_TOKEN or M_MISSING_TOKEN: matrix.as_token and the registration's as_token "
				 "differ");
	else if (changed)
		LOG_KV(CW_LOG_INFO, "the homeserver takes the as_token again: Matrix delivery resumes", "detail", "");
}

static void note_refusal(struct matrix *m, long status, json_t *answer)
{
	const char *code = json_string_value(json_object_get(answer, "errcode"));
	if (code && (strcmp(code, "M_FORBIDDEN") == 0 || strcmp(code, "M_UNKNOWN_TOKEN") == 0 ||
		     strcmp(code, "M_MISSING_TOKEN") == 0 || strcmp(code, "M_EXCLUSIVE") == 0)) {
		const char *why = json_string_value(json_object_get(answer, "error"));
		snprintf(m->last_error, sizeof(m->last_error), "%ld %s: %.180s", status, code, why ? why : "");
	}
}

/* One request to the homeserver, set up on an easy handle (mx_call runs
 * it at once; the delivery runs several at a time on a multi handle). */
struct mx_req {
	struct curl_slist *h;
	char *url, *text;
	struct answer_buf buf;
};

static void req_free(struct mx_req *rq)
{
	curl_slist_free_all(rq->h);
	free(rq->url);
	free(rq->text);
	free(rq->buf.p);
	memset(rq, 0, sizeof(*rq));
}

/* Sets c up for the call (see mx_call); body is taken. */
static cw_err req_setup(struct matrix *m, CURL *c, struct mx_req *rq, const char *method, const char *path,
			const char *user_id, const char *query, json_t *body, cw_errmsg *e)
{
	memset(rq, 0, sizeof(*rq));
	rq->text = body ? json_dumps(body, JSON_COMPACT) : NULL;
	json_decref(body);
	char *uid = user_id && c ? curl_easy_escape(c, user_id, 0) : NULL;
	size_t ulen = strlen(m->cfg->mx_homeserver_url) + strlen(path) + (query ? strlen(query) : 0) +
		      (uid ? strlen(uid) : 0) + 32;
	rq->url = malloc(ulen);
	char auth[600];
	snprintf(auth, sizeof(auth), "Authorization: Bearer %s", m->cfg->mx_as_token);
	struct curl_slist *h1 = rq->url ? curl_slist_append(NULL, auth) : NULL;
	rq->h = h1 ? curl_slist_append(h1, "Content-Type: application/json") : NULL;
	if (!rq->h)
		curl_slist_free_all(h1);
	if (!c || !rq->url || !rq->h || (body && !rq->text) || (user_id && !uid)) {
		curl_free(uid);
		req_free(rq);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	snprintf(rq->url, ulen, "%.*s%s%s%s%s%s%s", (int)mx_hs_base_len(m->cfg), m->cfg->mx_homeserver_url, path,
		 (uid || query) ? "?" : "", uid ? "user_id=" : "", uid ? uid : "", (uid && query) ? "&" : "",
		 query ? query : "");
	curl_free(uid);
	curl_easy_reset(c);
	curl_easy_setopt(c, CURLOPT_URL, rq->url);
	curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, rq->h);
	curl_easy_setopt(c, CURLOPT_POSTFIELDS, rq->text ? rq->text : (strcmp(method, "GET") == 0 ? NULL : "{}"));
	if (strcmp(method, "GET") == 0)
		curl_easy_setopt(c, CURLOPT_HTTPGET, 1L);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, &rq->buf);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, MX_TIMEOUT_MS);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
	if (m->cfg->ca_file && *m->cfg->ca_file)
		curl_easy_setopt(c, CURLOPT_CAINFO, m->cfg->ca_file);
	return CW_OK;
}

/* The last 429 M_LIMIT_EXCEEDED this thread was answered (req_done sets
 * it; a delivery clears it before preparing a row): a row whose
 * preparation met one (createRoom, a join, an upload: Synapse limits
 * them as it limits sends) waits as long as asked and is not counted
 * against the retry budget, as a send's 429 is (until the twentieth
 * session it failed as any error, and a limited homeserver made dead
 * letters: a review's finding). */
static _Thread_local struct {
	bool seen;
	long wait_ms; /* outbox_retry_after_ms */
} rate_limited;

long mx_rate_limited_wait_ms(void)
{
	return rate_limited.wait_ms;
}

void mx_rate_limited_note(long wait_ms)
{
	rate_limited.seen = true;
	rate_limited.wait_ms = wait_ms;
}

long mx_limit_wait_ms(CURL *c, const json_t *answer)
{
	/* the body's retry_after_ms or (Matrix 1.10 on) the Retry-After
	 * header: the longer */
	const json_t *ra = json_object_get(answer, "retry_after_ms");
	curl_off_t secs = 0;
	if (curl_easy_getinfo(c, CURLINFO_RETRY_AFTER, &secs) != CURLE_OK)
		secs = 0;
	return outbox_retry_after_ms(secs, json_is_integer(ra) ? json_integer_value(ra) : 0);
}

static _Thread_local atomic_bool *call_stop; /* mx_call_stop_on */
static _Thread_local CURLcode last_cc; /* mx_last_call_code */

CURLcode mx_last_call_code(void)
{
	return last_cc;
}

/* Whether this thread's calls end now: its stop is set.  A call that
 * failed then failed for the stop, not for the homeserver. */
static bool call_stopped(void)
{
	return call_stop && atomic_load(call_stop);
}

/* The outcome of a finished call; frees rq. */
static cw_err req_done(struct matrix *m, CURL *c, struct mx_req *rq, CURLcode cc, long *status, json_t **answer,
		       cw_errmsg *e)
{
	*status = 0;
	last_cc = cc;
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, status);
	cw_err rc = CW_OK;
	/* Read as a transaction is (mx_json_load): one event of a page (the
	 * room read back, its members) holding a NUL or an integer past 64
	 * bits is that event's trouble (txn_new), not the whole answer's. */
	json_error_t jerr;
	json_t *a = rq->buf.p ? mx_json_load(rq->buf.p, rq->buf.n, 0, &jerr) : NULL;
	if (cc != CURLE_OK) {
		const char *why = rq->buf.too_big ? "answer too large" : curl_easy_strerror(cc);
		if (cc == CURLE_ABORTED_BY_CALLBACK && call_stopped())
			why = "not answered before the stop"; /* not libcurl's "Callback aborted" */
		rc = cw_fail(e, CW_EUNAVAIL, "homeserver: %s", why);
		*status = 0;
	} else if (*status < 200 || *status > 299) {
		pthread_mutex_lock(&m->mu);
		note_refusal(m, *status, a);
		pthread_mutex_unlock(&m->mu);
		if (token_refusal(*status, a)) {
			token_refusal_seen = true;
			token_state(m, true);
		}
		const char *code = json_string_value(json_object_get(a, "errcode"));
		rc = cw_fail(e, CW_EIO, "homeserver answered %ld %s", *status, code ? code : "");
		if (*status == 429)
			mx_rate_limited_note(mx_limit_wait_ms(c, a));
	} else {
		token_state(m, false); /* answered as the appservice: the token is taken */
	}
	req_free(rq);
	if (answer)
		*answer = a;
	else
		json_decref(a);
	return rc;
}

void mx_call_stop_on(atomic_bool *stop)
{
	call_stop = stop;
}

static int call_progress(void *stop, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
	(void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
	return atomic_load((atomic_bool *)stop) ? 1 : 0; /* 1: CURLE_ABORTED_BY_CALLBACK */
}

/* mx_call, its answer awaited up to timeout_ms. */
static cw_err call_timed(struct matrix *m, const char *method, const char *path, const char *user_id, const char *query,
			 json_t *body, long timeout_ms, long *status, json_t **answer, cw_errmsg *e)
{
	*status = 0;
	if (answer)
		*answer = NULL;
	/* No code of curl's yet (mx_last_call_code): a call that fails
	 * before curl runs (out of memory, no client) is not read as the
	 * previous call's (a refusal of its connection: until the
	 * sixty-first session's review an out of memory read so paused
	 * every room's requests). */
	last_cc = CURLE_FAILED_INIT;
	/* One client per thread (kept alive between calls); no lock is held
	 * while the homeserver answers: it may call us meanwhile (the ping). */
	CURL *c = pthread_getspecific(m->curl_key);
	if (!c) {
		c = curl_easy_init();
		if (c)
			pthread_setspecific(m->curl_key, c);
	}
	struct mx_req rq;
	cw_err rc = req_setup(m, c, &rq, method, path, user_id, query, body, e);
	if (rc)
		return rc;
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, timeout_ms);
	if (call_stop) {
		curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, call_progress);
		curl_easy_setopt(c, CURLOPT_XFERINFODATA, (void *)call_stop);
		curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
	}
	return req_done(m, c, &rq, curl_easy_perform(c), status, answer, e);
}

cw_err mx_call(struct matrix *m, const char *method, const char *path, const char *user_id, const char *query,
	       json_t *body, long *status, json_t **answer, cw_errmsg *e)
{
	return call_timed(m, method, path, user_id, query, body, MX_TIMEOUT_MS, status, answer, e);
}

/* ------------------------------------------------------------ ping */

/* The first wait before trying the bot's registration and the ping again,
 * and the longest: the homeserver may come up after causewayd (the
 * specification asks the appservice not to fail entirely then). */
#define PING_RETRY_FIRST_MS 1000
#define PING_RETRY_MAX_MS 60000

/* The bot acts in management rooms: some homeservers (Conduit) want it
 * registered first, like any user of the namespace.  True when it is
 * (M_USER_IN_USE: it was before). */
bool mx_register_bot(struct matrix *m, cw_errmsg *e)
{
	long st;
	json_t *ans = NULL;
	cw_err rc = mx_call(m, "POST", "/_matrix/client/v3/register", NULL, NULL,
			    json_pack("{s:s, s:s, s:b}", "type", "m.login.application_service", "username",
				      m->cfg->mx_sender_localpart, "inhibit_login", 1), &st, &ans, e);
	const char *code = json_string_value(json_object_get(ans, "errcode"));
	if (rc && st == 400 && code && strcmp(code, "M_USER_IN_USE") == 0)
		rc = CW_OK;
	json_decref(ans);
	if (rc) /* the stop's doing (the ping thread's stop, mx_ping_stop): no warning */
		LOG_KV(call_stopped() ? CW_LOG_INFO : CW_LOG_WARN, "cannot register the bot", "detail", e->msg);
	return rc == CW_OK;
}

/* POST /_matrix/client/v1/appservice/{id}/ping.  Its 200 says that the
 * homeserver reached an appservice with the right hs_token at the
 * registration's url: this process or, behind one URL, another one.
 * True when nothing is to be tried again: it answered 200, or it has no
 * ping (404 M_UNRECOGNIZED, before Matrix 1.7). */
static bool ping_once(struct matrix *m)
{
	char path[300], txn[40];
	unsigned char raw[8];
	cw_random(raw, sizeof(raw));
	snprintf(txn, sizeof(txn), "cw-ping-");
	cw_hex(txn + 8, raw, sizeof(raw));
	char *id = curl_easy_escape(NULL, m->cfg->mx_id, 0);
	snprintf(path, sizeof(path), "/_matrix/client/v1/appservice/%s/ping", id ? id : "");
	curl_free(id);
	long status;
	json_t *answer;
	cw_errmsg e;
	cw_err rc = mx_call(m, "POST", path, NULL, NULL, json_pack("{s:s}", "transaction_id", txn), &status, &answer, &e);
	const char *code = json_string_value(json_object_get(answer, "errcode"));
	/* A homeserver without the ping works all the same: "unsupported",
	 * not "failed", which operators alert on (docs/operations.md; until
	 * the thirty-fourth session it was "failed" for as long as it ran). */
	bool unsupported = rc && status == 404 && code && strcmp(code, "M_UNRECOGNIZED") == 0;
	if (rc && call_stopped()) { /* ended by mx_ping_stop: the homeserver's state is not known */
		LOG_KV(CW_LOG_INFO, "matrix homeserver ping", "result", "stopped", "detail", e.msg);
		json_decref(answer);
		return false;
	}
	const char *state = rc == CW_OK ? "ok" : unsupported ? "unsupported" : "failed";
	pthread_mutex_lock(&m->mu);
	snprintf(m->ping_state, sizeof(m->ping_state), "%s", state);
	if (rc == CW_OK) {
		m->ping_ms = (long)json_integer_value(json_object_get(answer, "duration_ms"));
	} else {
		bool said = code && strstr(e.msg, code); /* the message names the errcode already */
		snprintf(m->last_error, sizeof(m->last_error), "ping: %.180s%s%.60s", e.msg, code && !said ? " " : "",
			 code && !said ? code : "");
	}
	pthread_mutex_unlock(&m->mu);
	LOG_KV(rc && !unsupported ? CW_LOG_WARN : CW_LOG_INFO, "matrix homeserver ping", "result", state, "detail",
	       rc ? e.msg : "");
	bool done = rc == CW_OK || unsupported;
	json_decref(answer);
	return done;
}

/* The thread registers the bot and pings the homeserver until both are
 * done, then stays: while the homeserver refuses the as_token (any call's
 * 401 M_UNKNOWN_TOKEN, token_state), it asks whether it takes it again
 * (GET /account/whoami as the bot: its 200, req_done, ends the hold of the
 * delivery), backing off as the ping does, 1 s to a minute.  Until the
 * fifty-first session it ended once both were done, and a token refused
 * later (a registration changed, a token rotated on one side) made every
 * Matrix row fail, spend its retry budget and go dead. */
static void *ping_main(void *arg)
{
	cw_thread_name("cw-mx-ping");
	struct matrix *m = arg;
	/* A homeserver that does not answer held the stop its 10 s a call
	 * (the registration's, then the ping's) until the fiftieth session's
	 * review; the bot's calls end so too (mx_bot.c, bot_main). */
	mx_call_stop_on(&m->ping_stop);
	bool registered = false, pinged = false;
	int64_t wait_ms = PING_RETRY_FIRST_MS;
	pthread_mutex_lock(&m->mu);
	while (!m->ping_stop) {
		pthread_mutex_unlock(&m->mu);
		cw_errmsg e;
		bool done = registered && pinged; /* else their calls are the check */
		if (!registered)
			registered = mx_register_bot(m, &e);
		if (!pinged && !m->ping_stop)
			pinged = ping_once(m);
		if (done && !m->ping_stop && atomic_load(&m->token_refused))
			mx_bot_taken(m); /* its 2xx ends the hold (token_state) */
		pthread_mutex_lock(&m->mu);
		if (registered && pinged && !atomic_load(&m->token_refused)) {
			/* nothing to do until a call is refused its token */
			while (!m->ping_stop && !atomic_load(&m->token_refused))
				pthread_cond_wait(&m->ping_cond, &m->mu);
			wait_ms = PING_RETRY_FIRST_MS; /* the first check after a second */
		}
		struct timespec until;
		cw_deadline_ts(&until, CLOCK_REALTIME, wait_ms * 1000);
		while (!m->ping_stop && pthread_cond_timedwait(&m->ping_cond, &m->mu, &until) == 0)
			;
		wait_ms = store_backoff_next(wait_ms, PING_RETRY_FIRST_MS, PING_RETRY_MAX_MS);
	}
	pthread_mutex_unlock(&m->mu);
	return NULL;
}

void matrix_ping_start(struct matrix *m)
{
	if (!m)
		return;
	m->ping_started = cw_thread_start(&m->ping_thread, ping_main, m);
	mx_bot_start(m);
	mx_media_start(m);
}

void mx_ping_stop(struct matrix *m)
{
	if (!m->ping_started)
		return;
	pthread_mutex_lock(&m->mu);
	m->ping_stop = true;
	pthread_cond_broadcast(&m->ping_cond);
	pthread_mutex_unlock(&m->mu);
	pthread_join(m->ping_thread, NULL);
	m->ping_started = false;
}

json_t *matrix_health(struct matrix *m)
{
	pthread_mutex_lock(&m->mu);
	bool held = atomic_load(&m->token_refused);
	json_t *o = json_pack("{s:s, s:s, s:s, s:s}", "homeserver", m->cfg->mx_homeserver_url, "ping", m->ping_state,
			      "last_error", m->last_error, "delivery", held ? "token_refused" : "up");
	if (o && held)
		json_object_set_new(o, "token_refused_since_ms", json_integer(m->token_refused_ms));
	pthread_mutex_unlock(&m->mu);
	return o;
}

bool matrix_ready(void *ctx)
{
	struct matrix *m = ctx;
	return !m || !atomic_load(&m->token_refused);
}

/* ------------------------------------------------------------ delivery */

struct lookup_ctx {
	PGconn *c;
	/* The batch's rows: those delivered before this one, their event ids
	 * (remote_id) not recorded yet, are looked for there (in_batch). */
	const struct outbox_row *rows;
	size_t n;
	int64_t target; /* the local user whose room the row goes to */
	struct matrix *m;
	const char *room, *actor; /* the row's Matrix room, and who sends into it (NULL: the bot) */
	char out[MX_ID_MAX + 1];
	bool failed;    /* a lookup could not be made (err says why): the row is tried again */
	cw_errmsg err;
};

/* msg_... -> its Matrix event id in the room of the row's local user: the
 * one it got when delivered to them (a group's message has one per
 * member's portal), or its own when that user sent it from Matrix. */
static const char *thread_root(struct lookup_ctx *l, const char *event_id);

/* The Matrix event id row got, delivered earlier in this batch (its id
 * not recorded yet: the dispatcher writes it with the outcome, after the
 * batch; note_event_id), or NULL.  The dispatcher clears remote_id and
 * outcome before the batch, so an id here is this batch's. */
static const char *in_batch(const struct outbox_row *row)
{
	return row->outcome == 1 && row->remote_id[0] ? row->remote_id : NULL;
}

static const char *to_native(void *arg, const char *msg_id)
{
	struct lookup_ctx *l = arg;
	if (msg_id[0] == '$')
		return thread_root(l, msg_id);
	/* Delivered earlier in this batch to the same user: her room's event
	 * (the outbox holds one row an event and user, outbox_event_dest_key) */
	for (size_t j = 0; j < l->n; j++) {
		const struct outbox_row *o = &l->rows[j];
		const char *pid, *eid;
		if (o->target_id == l->target && (eid = in_batch(o)) &&
		    (pid = json_string_value(json_object_get(o->event, "id"))) && strcmp(pid, msg_id) == 0) {
			snprintf(l->out, sizeof(l->out), "%s", eid);
			return l->out;
		}
	}
	char target[24];
	snprintf(target, sizeof(target), "%lld", (long long)l->target);
	const char *params[] = { msg_id, target, l->room ? l->room : "" };
	/* Only an event of the row's room: one delivered (or written by the
	 * user) before that room was bound is of another, an earlier direct
	 * room the user left, say.  Homeservers refuse a relation to an event
	 * of another room (Synapse: 400 "Relations must be in the same room")
	 * and a receipt of one (404), and a redaction there takes nothing
	 * away: the reference is taken for a message that never reached this
	 * room (an edit goes as a new message; a reaction, delete or receipt
	 * as nothing).  Until the fifty-first session it named the other
	 * room's event, and the row failed for its whole retry budget.  A
	 * row with an id and no delivered_at (the id was recorded before the
	 * outcome until the fifty-fourth session: a crash between them left
	 * such rows) counts as this room's. */
	PGresult *r = PQexecParams(l->c,
		"SELECT coalesce((SELECT o.remote_id FROM outbox o WHERE o.event_id = e.id AND o.destination = 'matrix' "
		" AND o.target_identity_id = $2::bigint AND o.remote_id IS NOT NULL "
		" AND NOT coalesce(o.delivered_at < b.created_at, false)), "
		" CASE WHEN e.origin_network = 'matrix' AND e.sender_id = $2::bigint "
		"  AND NOT coalesce(e.accepted_at < b.created_at, false) THEN e.origin_native_id END) "
		"FROM events e LEFT JOIN room_bindings b ON b.network = 'matrix' AND b.native_id = $3 "
		"WHERE e.public_id = $1",
		3, NULL, params, NULL, NULL, 0);
	/* A database that did not answer says nothing of the message: taken
	 * for unknown, an edit went as a new message and a delete, reaction
	 * or receipt as nothing, for good (until the twenty-fifth session). */
	if (store_check(l->c, r, PGRES_TUPLES_OK, &l->err)) { /* clears r */
		l->failed = true;
		return NULL;
	}
	const char *res = NULL;
	if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 0)) {
		snprintf(l->out, sizeof(l->out), "%s", PQgetvalue(r, 0, 0));
		res = l->out;
	}
	PQclear(r);
	return res;
}

/* $event (a Matrix event of the row's room: what a reply answers) -> the
 * root of the thread it is in, as the homeserver gives it to the row's
 * sender: its m.thread relation (mx_from_neutral puts the reply in that
 * thread, where Matrix wants a reply to a thread's event; until the
 * fiftieth session it went to the room's main timeline).  NULL when it is
 * in none, or the homeserver does not give it (4xx: not to be had); a
 * homeserver that did not answer (or 5xx, 429) fails the lookup, and the
 * row is tried again, as when the database did not answer. */
static const char *thread_root(struct lookup_ctx *l, const char *event_id)
{
	char *id = seg(l->m, event_id), what[3 * MX_ID_MAX + 16];
	if (!id) {
		cw_fail(&l->err, CW_ENOMEM, "out of memory");
		l->failed = true;
		return NULL;
	}
	snprintf(what, sizeof(what), "event/%s", id);
	curl_free(id);
	long status;
	json_t *ev = NULL;
	cw_errmsg e;
	if (mx_room_call(l->m, "GET", l->room, l->actor, what, NULL, NULL, &status, &ev, &e)) {
		json_decref(ev);
		if (status < 400 || status >= 500 || status == 429) {
			cw_fail(&l->err, CW_EIO, "cannot read the event a reply answers: %s", e.msg);
			l->failed = true;
		}
		return NULL;
	}
	const json_t *rel = json_object_get(json_object_get(ev, "content"), "m.relates_to");
	const char *rt = json_string_value(json_object_get(rel, "rel_type"));
	const char *root = json_string_value(json_object_get(rel, "event_id"));
	const char *res = NULL;
	if (rt && strcmp(rt, "m.thread") == 0 && root && strlen(root) < sizeof(l->out)) {
		snprintf(l->out, sizeof(l->out), "%s", root);
		res = l->out;
	}
	json_decref(ev);
	return res;
}

cw_err mx_room_call(struct matrix *m, const char *method, const char *room, const char *user, const char *what,
		    const char *query, json_t *body, long *status, json_t **answer, cw_errmsg *e)
{
	*status = 0;
	char path[700], *rs = seg(m, room);
	if (!rs) {
		json_decref(body);
		last_cc = CURLE_FAILED_INIT; /* no call made (call_timed) */
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/%s", rs, what);
	curl_free(rs);
	return mx_call(m, method, path, user, query, body, status, answer, e);
}

cw_err mx_room_post(struct matrix *m, const char *room, const char *user, const char *action, json_t *body,
		    long *status, cw_errmsg *e)
{
	return mx_room_call(m, "POST", room, user, action, NULL, body, status, NULL, e);
}

cw_err mx_room_action(struct matrix *m, const char *room, const char *user, const char *action, cw_errmsg *e)
{
	long status;
	return mx_room_post(m, room, user, action, json_object(), &status, e);
}

/* Synapse's longest display name, in characters (Python's: code points);
 * a longer one is refused with 400. */
#define MX_DISPLAYNAME_MAX 256

/* A ghost's display name, "<name> (<peer>)": the peer's name for its user
 * as cw_utf8_name_shown makes it, else (nothing of it shows) the user's
 * local part.
 * out: 4 * MX_DISPLAYNAME_MAX + 1 bytes (Synapse's limit, which the whole
 * never reaches now). */
static void ghost_name(char *out, size_t len, const char *display, const char *localpart, const char *peer)
{
	char name[4 * MX_DISPLAYNAME_MAX + 1]; /* a name (300 bytes) or local part (600), and "…" */
	cw_utf8_name_shown(display ? display : "", name, sizeof(name));
	if (!name[0])
		cw_utf8_name_shown(localpart, name, sizeof(name));
	size_t peer_chars;
	size_t pb = cw_utf8_prefix(peer, 80, &peer_chars);
	size_t nb = cw_utf8_prefix(name, MX_DISPLAYNAME_MAX - 3 - peer_chars, NULL);
	snprintf(out, len, "%.*s (%.*s)", (int)nb, name, (int)pb, peer);
}

/* Registers the ghost (M_USER_IN_USE is fine) and names it. */
cw_err mx_register_ghost(struct matrix *m, const char *peer, const char *localpart, const char *display,
			 const char *ghost, cw_errmsg *e)
{
	char *ghost_local = strndup(ghost + 1, strcspn(ghost + 1, ":"));
	long status;
	json_t *answer = NULL;
	cw_err rc = mx_call(m, "POST", "/_matrix/client/v3/register", NULL, NULL,
			    json_pack("{s:s, s:s, s:b}", "type", "m.login.application_service", "username",
				      ghost_local ? ghost_local : "", "inhibit_login", 1),
			    &status, &answer, e);
	free(ghost_local);
	const char *code = json_string_value(json_object_get(answer, "errcode"));
	if (rc && status == 400 && code && strcmp(code, "M_USER_IN_USE") == 0)
		rc = CW_OK; /* registered before (the binding was lost, or another process) */
	json_decref(answer);
	if (rc)
		return rc;
	char name[4 * MX_DISPLAYNAME_MAX + 1], path[600];
	ghost_name(name, sizeof(name), display, localpart, peer);
	char *g = seg(m, ghost);
	snprintf(path, sizeof(path), "/_matrix/client/v3/profile/%s/displayname", g ? g : "");
	curl_free(g);
	cw_errmsg e2;
	if (mx_call(m, "PUT", path, ghost, NULL, json_pack("{s:s}", "displayname", name), &status, NULL, &e2))
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot set a ghost's display name", "user", ghost, "detail", e2.msg);
	return CW_OK;
}

/* The ghost of a remote user (its id, mx_ghost_id): registered (once) with
 * a display name, and bound. */
static cw_err ensure_ghost(struct matrix *m, PGconn *c, const char *sender_id, const char *peer,
			   const char *localpart, const char *display, const char *ghost, cw_errmsg *e)
{
	cw_err rc = mx_register_ghost(m, peer, localpart, display, ghost, e);
	if (rc)
		return rc;
	const char *params[] = { sender_id, ghost };
	return store_command(c, "INSERT INTO identity_bindings (identity_id, network, native_id) VALUES ($1::bigint, 'matrix', $2) "
			  "ON CONFLICT DO NOTHING", 2, params, e);
}

/* The room's path (under /rooms/{roomId}/) of target's m.room.member
 * state event, into what. */
static void member_event(struct matrix *m, const char *target, char *what, size_t len)
{
	char *u = seg(m, target);
	snprintf(what, len, "state/m.room.member/%s", u ? u : "");
	curl_free(u);
}

/* The path of target's m.room.member state event in room (GET
 * /rooms/{roomId}/state/m.room.member/{stateKey}), into path; false when
 * out of memory. */
static bool member_path(struct matrix *m, const char *room, const char *target, char *path, size_t len)
{
	char what[600], *rs = seg(m, room);
	if (!rs)
		return false;
	member_event(m, target, what, sizeof(what));
	snprintf(path, len, "/_matrix/client/v3/rooms/%s/%s", rs, what);
	curl_free(rs);
	return true;
}

/* The membership an answer to member_path's GET (rc, answer) says, into
 * ms ("" when none); answer is taken. */
static void membership_of(cw_err rc, json_t *answer, char *ms, size_t mslen)
{
	const char *v = json_string_value(json_object_get(answer, "membership"));
	snprintf(ms, mslen, "%s", !rc && v ? v : "");
	json_decref(answer);
}

/* target's membership of room ("invite", "join", "leave", ...; "" when the
 * event has none) as user (NULL: the bot) sees it, into ms, its answer
 * awaited up to timeout_ms.  Fails with *status 404 when target has no
 * membership there at all. */
static cw_err member_state(struct matrix *m, const char *user, const char *room, const char *target, long timeout_ms,
			   char *ms, size_t mslen, long *status, cw_errmsg *e)
{
	char path[1400];
	*status = 0;
	if (!member_path(m, room, target, path, sizeof(path)))
		return cw_fail(e, CW_ENOMEM, "out of memory");
	json_t *answer = NULL;
	cw_err rc = call_timed(m, "GET", path, user, NULL, NULL, timeout_ms, status, &answer, e);
	membership_of(rc, answer, ms, mslen);
	return rc;
}

enum alias_room { ALIAS_ROOM, ALIAS_STALE, ALIAS_UNKNOWN };

/* A room found by its alias while invitee has no membership there: its
 * making has not reached, or never will reach, the invitations, which
 * createRoom sends last (after the room's state, as the specification
 * orders it; Synapse gives the alias to the room before all that).  Its
 * maker (user) finishes it: it sends the invitation createRoom would have
 * (is_direct in a direct room, which POST /invite cannot carry, hence the
 * state event).  One the homeserver still sends afterwards repeats it
 * and changes nothing, the user stays invited (inviting someone invited
 * is allowed: only a member or someone banned is refused, and Synapse
 * takes a repeat from the same sender with the same content as a no-op).
 * A room made anew instead would have left the first one's late
 * invitation to the user.  Until the nineteenth session
 * the retry waited for an invitation that never came when the making had
 * stopped half way, and the delivery held until its retries were spent.
 * ALIAS_STALE: refused for good (403: the maker may not invite there), the
 * room cannot be finished and is made anew. */
static enum alias_room finish_room(struct matrix *m, const char *user, const char *room, const char *invitee,
				   bool direct, long *status)
{
	char what[600];
	member_event(m, invitee, what, sizeof(what));
	cw_errmsg e;
	if (!mx_room_call(m, "PUT", room, user, what, NULL,
			  json_pack("{s:s, s:o*}", "membership", "invite", "is_direct", direct ? json_true() : NULL),
			  status, NULL, &e)) {
		LOG_KV_LIMITED(CW_LOG_INFO, "a room found by its alias without its invitation is finished", "room",
			       room);
		return ALIAS_ROOM;
	}
	LOG_KV_LIMITED(CW_LOG_WARN, "cannot invite to a room found by its alias", "room", room, "detail", e.msg);
	return *status == 403 ? ALIAS_STALE : ALIAS_UNKNOWN;
}

/* The room an alias of the appservice's names (into room), when invitee is
 * still invited to it or has joined it, or once invited to it (finish_room)
 * when they have no membership there yet.  ALIAS_STALE: the homeserver
 * says they are out of it (declined, left: a room made long ago and never
 * bound), or that the alias names nothing; the alias is deleted then, and
 * user leaves the room it named.
 * ALIAS_UNKNOWN: no answer that says (it is tried again later); *status
 * the homeserver's last answer then (0: none, the homeserver away).  A retry
 * after a createRoom that is slow (past MX_TIMEOUT_MS) finds the room
 * before its invitation: until the eighteenth session that was taken for
 * stale (the alias deleted and a second room made). */
static enum alias_room room_of_alias(struct matrix *m, const char *user, const char *alias, const char *invitee,
				     bool direct, char *room, size_t rlen, long *status_out)
{
	char dir[900], ms[16];
	long status = 0;
	json_t *answer = NULL;
	cw_errmsg e;
	*status_out = 0;
	if (!mx_alias_directory_path(alias, dir, sizeof(dir)))
		return ALIAS_UNKNOWN;
	cw_err rc = mx_call(m, "GET", dir, user, NULL, NULL, &status, &answer, &e);
	const char *id = json_string_value(json_object_get(answer, "room_id"));
	enum alias_room res = rc ? (status == 404 ? ALIAS_STALE : ALIAS_UNKNOWN)
				 : id && mx_room_id_valid(id) && strlen(id) < rlen ? ALIAS_ROOM : ALIAS_UNKNOWN;
	bool found = res == ALIAS_ROOM;
	if (found)
		snprintf(room, rlen, "%s", id);
	json_decref(answer);
	if (found) {
		/* 404: no membership there (another failure: asked again later) */
		if (member_state(m, user, room, invitee, MX_TIMEOUT_MS, ms, sizeof(ms), &status, &e))
			res = status == 404 ? finish_room(m, user, room, invitee, direct, &status) : ALIAS_UNKNOWN;
		else if (strcmp(ms, "invite") != 0 && strcmp(ms, "join") != 0)
			res = ALIAS_STALE;
	}
	if (res == ALIAS_STALE && mx_call(m, "DELETE", dir, user, NULL, NULL, &status, NULL, &e) && status != 404) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot delete a stale room alias", "alias", alias, "detail", e.msg);
		res = ALIAS_UNKNOWN;
	}
	/* The stale room itself, never bound (its alias goes once it is), is
	 * left by its maker: until the forty-ninth session it stayed, its
	 * maker alone in it for good (a portal whose invitation failed for
	 * now, then for good: the second room's making is left by
	 * portal_refused, the first was not). */
	if (res == ALIAS_STALE && found && mx_room_action(m, room, user, "leave", &e))
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot leave a stale room", "room", room, "detail", e.msg);
	*status_out = status;
	return res;
}

/* The alias a room made for key (who makes it for whom) is given while it
 * is not bound yet (forget_alias then), in the appservice's exclusive
 * namespace (matrix.alias_prefix): its localpart into local, the alias
 * into alias. */
static void alias_of(struct matrix *m, const char *key, char *local, size_t llen, char *alias, size_t alen)
{
	unsigned char h[32];
	char hex[33];
	cw_sha256(key, strlen(key), h);
	cw_hex(hex, h, 16);
	snprintf(local, llen, "%sroom_%s", m->cfg->mx_alias_prefix, hex);
	snprintf(alias, alen, "#%s:%s", local, mx_server_name(m->cfg));
}

/* POST /createRoom as user (NULL: the bot) with body (taken), inviting
 * invitee: the new room's id into room.  When the homeserver made the room
 * but its answer was lost (a timeout, a dropped connection), the retry
 * must not make a second one (a second invitation for the user): the room
 * gets an alias made from key, and a making refused because the alias is
 * taken (M_ROOM_IN_USE) is the earlier one's, found by it.  The alias is
 * the room's only until it is bound (forget_alias): it is not made its
 * canonical alias, which clients would show as its name.  *status: the
 * homeserver's last answer (0: none). */
static cw_err create_room(struct matrix *m, const char *user, json_t *body, const char *key, const char *invitee,
			  char *room, size_t rlen, long *status, cw_errmsg *e)
{
	char local[MX_ID_MAX + 1], alias[MX_ID_MAX + 1];
	alias_of(m, key, local, sizeof(local), alias, sizeof(alias));
	json_t *state = json_object_get(body, "initial_state");
	if (!state) {
		state = json_array();
		json_object_set_new(body, "initial_state", state);
	}
	if (json_object_set_new(body, "room_alias_name", json_string(local)) ||
	    json_array_append_new(state, json_pack("{s:s, s:s, s:{}}", "type", "m.room.canonical_alias", "state_key",
						   "", "content"))) {
		json_decref(body);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	json_t *answer = NULL;
	cw_err rc = mx_call(m, "POST", "/_matrix/client/v3/createRoom", user, NULL, json_incref(body), status, &answer, e);
	const char *code = json_string_value(json_object_get(answer, "errcode"));
	if (rc && *status == 400 && code && strcmp(code, "M_ROOM_IN_USE") == 0) {
		long last;
		enum alias_room found = room_of_alias(m, user, alias, invitee,
						      json_is_true(json_object_get(body, "is_direct")), room, rlen, &last);
		json_decref(answer);
		if (found != ALIAS_STALE) {
			json_decref(body);
			if (found == ALIAS_ROOM) {
				LOG_KV_LIMITED(CW_LOG_INFO, "a room made before, its answer lost, is taken", "room",
					       room);
				return CW_OK;
			}
			/* The homeserver answered (a 5xx: the invitee's server
			 * not reached): this making's trouble, not the
			 * homeserver's (CW_EUNAVAIL ends the bot's round, the
			 * other users' portals with it); a 429 keeps its wait
			 * (mx_ensure_portal).  Until the forty-seventh session
			 * any of them was CW_EUNAVAIL. */
			if (last == 429)
				*status = last;
			return last ? cw_fail(e, CW_EIO, "a room was made before, and cannot be found or finished "
							  "(the homeserver answered %ld)", last)
				    : cw_fail(e, CW_EUNAVAIL, "a room was made before, and cannot be found");
		}
		answer = NULL; /* a stale alias, deleted: made again */
		rc = mx_call(m, "POST", "/_matrix/client/v3/createRoom", user, NULL, json_incref(body), status, &answer,
			     e);
	} else if (rc && *status == 400 && code && strcmp(code, "M_EXCLUSIVE") == 0) {
		/* A registration from before the alias namespace: rooms are
		 * made as they were, without the alias. */
		LOG_KV_LIMITED(CW_LOG_WARN, "the registration reserves no room aliases (matrix.alias_prefix): a room "
			       "whose answer is lost may be made twice", "alias", alias);
		json_decref(answer);
		answer = NULL;
		json_object_del(body, "room_alias_name");
		rc = mx_call(m, "POST", "/_matrix/client/v3/createRoom", user, NULL, json_incref(body), status, &answer,
			     e);
	}
	json_decref(body);
	const char *id = json_string_value(json_object_get(answer, "room_id"));
	if (!rc && (!id || !mx_room_id_valid(id)))
		rc = cw_fail(e, CW_EIO, "the homeserver made a room without a valid room_id");
	if (!rc)
		snprintf(room, rlen, "%s", id);
	json_decref(answer);
	return rc;
}

/* The alias of a room made for key goes once the room is bound (or given
 * up as a spare): the next room for the same users, after this one is
 * left, gets it afresh. */
static void forget_alias(struct matrix *m, const char *user, const char *key)
{
	char local[MX_ID_MAX + 1], alias[MX_ID_MAX + 1], path[900];
	alias_of(m, key, local, sizeof(local), alias, sizeof(alias));
	long status;
	cw_errmsg e;
	if (!mx_alias_directory_path(alias, path, sizeof(path)))
		return; /* cannot be: an alias is at most 255 bytes, escaped 765 */
	if (mx_call(m, "DELETE", path, user, NULL, NULL, &status, NULL, &e) && status != 404) /* 404: made without */
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot delete the alias of a room made", "alias", alias, "detail", e.msg);
}

/* A room just made lost the race to be bound (the bot bound the user's
 * own room with the ghost meanwhile, or another process made one): the
 * binding that won, read in a statement of its own (one that tried the
 * insert sees the snapshot from before the winner's commit), takes its
 * place in room (its id into binding), and who made the spare one (ghost,
 * NULL: the bot) takes back its invitation of invitee (a /kick does: else
 * the user keeps an invitation to an empty room) and leaves it. */
static cw_err spare_room(struct matrix *m, PGconn *c, const char *ghost, bool portal, const char *local_id,
			 const char *other, const char *invitee, char *room, size_t rlen, char *binding, size_t blen,
			 cw_errmsg *e)
{
	/* other: the remote user's identity (a direct room), or the group's
	 * room (a portal) */
	const char *params[] = { local_id, other };
	PGresult *r = PQexecParams(c,
		portal ? "SELECT native_id, id FROM room_bindings WHERE network = 'matrix' AND local_identity_id = $1::bigint "
			 "AND room_id = $2::bigint AND remote_identity_id IS NULL"
		       : "SELECT native_id, id FROM room_bindings WHERE network = 'matrix' AND local_identity_id = $1::bigint "
			 "AND remote_identity_id = $2::bigint",
		2, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) != 1) {
		PQclear(r);
		return cw_fail(e, CW_EIO, "a room was made, but neither it nor another could be bound");
	}
	cw_errmsg e2;
	long status;
	if (strcmp(PQgetvalue(r, 0, 0), room) == 0) {
		/* the same room, found by its alias (create_room) by another
		 * delivery that bound it first: no spare */
		if (binding)
			snprintf(binding, blen, "%s", PQgetvalue(r, 0, 1));
		PQclear(r);
		return CW_OK;
	}
	if (invitee && mx_room_post(m, room, ghost, "kick",
				    json_pack("{s:s, s:s}", "user_id", invitee, "reason", "a room made twice"), &status,
				    &e2))
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot take back the invitation to a spare room", "room", room, "detail",
			       e2.msg);
	if (mx_room_action(m, room, ghost, "leave", &e2))
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot leave a spare room", "room", room, "detail", e2.msg);
	snprintf(room, rlen, "%s", PQgetvalue(r, 0, 0));
	if (binding)
		snprintf(binding, blen, "%s", PQgetvalue(r, 0, 1));
	PQclear(r);
	return CW_OK;
}

/* A room just made, bound by sql (an insert of its binding that returns
 * its id, or nothing on a conflict); a conflict: spare_room. */
static cw_err bind_room(struct matrix *m, PGconn *c, const char *sql, int n, const char *const *params,
			const char *ghost, bool portal, const char *local_id, const char *other, const char *invitee,
			char *room, size_t rlen, char *binding, size_t blen, cw_errmsg *e)
{
	PGresult *r = PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	bool bound = PQntuples(r) == 1;
	if (bound && binding)
		snprintf(binding, blen, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	return bound ? CW_OK : spare_room(m, c, ghost, portal, local_id, other, invitee, room, rlen, binding, blen, e);
}

/* The direct room of (local user, remote user): made by the ghost, with the
 * local user invited, the first time. */
static cw_err ensure_room(struct matrix *m, PGconn *c, const char *neutral_room, const char *target_id,
			  const char *sender_id, const char *ghost, const char *target_mxid, char *room, size_t rlen,
			  cw_errmsg *e)
{
	/* The preset makes the ghost an admin (100) like the user, and an
	 * admin may redact anyone's events.  The redact level above every
	 * member's keeps that from both: the ghost redacts only its own events
	 * (deletes from its remote user), so the homeserver itself refuses it
	 * the local user's messages, whatever the adapter were told.  Only the
	 * one key is overridden: the creator's level stays as the preset has it,
	 * so every homeserver can still send the room's initial state. */
	char key[2 * MX_ID_MAX + 8];
	long status;
	snprintf(key, sizeof(key), "dm|%s|%s", ghost, target_mxid);
	cw_err rc = create_room(m, ghost,
				json_pack("{s:s, s:b, s:[s], s:{s:i}}", "preset", "trusted_private_chat", "is_direct", 1,
					  "invite", target_mxid, "power_level_content_override", "redact", 101),
				key, target_mxid, room, rlen, &status, e);
	if (rc)
		return rc;
	/* Bound to a direct room of the two: the row's, or (a group's row) the
	 * pair's, made if need be (schema/012_direct_rooms.sql): what the
	 * user writes here goes to that one person, as the client shows. */
	const char *params[] = { neutral_room, room, target_id, sender_id, m->cfg->domain ? m->cfg->domain : "" };
	rc = bind_room(m, c,
		       "INSERT INTO room_bindings (room_id, network, native_id, local_identity_id, remote_identity_id) "
		       "VALUES (direct_room_of($1::bigint, $3::bigint, $4::bigint, $5), 'matrix', $2, $3::bigint, "
		       "$4::bigint) ON CONFLICT DO NOTHING RETURNING id",
		       5, params, ghost, false, target_id, sender_id, target_mxid, room, rlen, NULL, 0, e);
	if (!rc)
		forget_alias(m, ghost, key);
	return rc;
}

/* An invited user's join of their portal marks them joined when it comes
 * (matrix.c, joins_of_invitees), but only in a bound room, and only in a
 * daemon that knows invited members: one who joined before the portal was
 * bound (an auto-joining client, faster than the write of the binding,
 * or a createRoom answer lost and the room found by its alias on the
 * retry), or whose join an older daemon took during a rolling restart,
 * would have stayed invited, listed so to the peer and sent nothing.  The
 * homeserver is asked once their portal is bound (mx_ensure_portal, by
 * the bot or by a delivery), and by the bot now and then while they stay
 * invited (mx_bot.c, invitees_joined).  Their join event, read from the
 * room's members, is taken as a transaction of the homeserver's would be
 * (mx_backfill): it marks them joined and reaches the peer as the
 * membership event a pushed join makes (until the nineteenth session only
 * the member was marked, and the peer never heard of the join).  Once only: the event is stored under
 * its Matrix event id, so the same join pushed too, or found again, is
 * not sent twice.  False (still invited: asked again a minute later): not
 * joined, or not stored.  True: joined. */
bool mx_mark_if_joined(struct matrix *m, PGconn *c, const char *room, const char *neutral_room,
		       const char *target_id, const char *target_mxid)
{
	long status;
	cw_errmsg e;
	json_t *answer = NULL;
	/* not joined, or no answer: the join, when it comes, marks it */
	if (mx_room_call(m, "GET", room, NULL, "members", "membership=join", NULL, &status, &answer, &e)) {
		json_decref(answer);
		return false;
	}
	json_t *join = NULL;
	size_t i;
	json_t *ev;
	json_array_foreach(json_object_get(answer, "chunk"), i, ev) {
		/* membership=join is a filter a homeserver may ignore (Conduit
		 * answers every member event): an invitation read as the join
		 * marked an invited user joined (until the twentieth session, a
		 * review's finding) */
		const char *key = json_string_value(json_object_get(ev, "state_key"));
		const char *ms = json_string_value(json_object_get(json_object_get(ev, "content"), "membership"));
		if (json_is_object(ev) && key && strcmp(key, target_mxid) == 0 && ms && strcmp(ms, "join") == 0) {
			join = json_deep_copy(ev);
			break;
		}
	}
	json_decref(answer);
	if (!join)
		return false;
	/* the room asked about is the event's (txn_new checks the rest) */
	json_object_set_new(join, "room_id", json_string(room));
	/* Their member event now: after a change of their name or avatar it
	 * is a join whose previous content is a join, which a transaction
	 * takes for a profile change and carries not; here it stands for the
	 * join itself, which no transaction carried (until the nineteenth
	 * session the member was marked and the peer told nothing: a
	 * review's finding). */
	json_t *uns = json_object_get(join, "unsigned");
	if (json_is_object(uns))
		json_object_del(uns, "prev_content");
	json_t *events = json_array();
	json_array_append_new(events, join);
	cw_err rc = mx_backfill(m, events, MX_TIMEOUT_MS, &e);
	json_decref(events);
	if (rc) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot store the join of a user to their group's room", "room", room,
			       "detail", e.msg);
		return false;
	}
	/* The transaction path marked them (this finds nothing then); one
	 * whose join it did not take (its bindings changed meanwhile) is
	 * marked all the same, or the bot would ask about them every minute.
	 * Under the room's lock, as there (since the twenty-seventh session;
	 * before, this took none). */
	if (mx_mark_joined(c, neutral_room, target_id, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot mark a user who joined their group's room", "room", room, "detail",
			       e.msg);
		return false;
	}
	return true;
}

/* The mark takes the room's lock of every write of events (ROOM_LOCK_SQL),
 * as every other member change does: a group write holding it, which read
 * the members, commits first, and one waiting for it reads the member
 * joined.  In a transaction of its own, a short one, whatever the
 * connection is (a reader before a transaction's write, or the bot's):
 * the lock first (only when there is an invitation to end: a join after a
 * change of name, say, waits for nobody), then the change, in a statement
 * of its own so that it reads what the holder committed.  The lock is the
 * only one the transaction asks for, so it waits while holding none: it
 * cannot be one of a cycle of waits with the group writes, which take
 * their rooms' locks in id order, one job's after another's.  A
 * transaction-level lock, not a session-level one: released by the commit
 * or the rollback, or when the connection goes, never left held by a
 * failure on the way (a reader's connection holding a group's lock would
 * hold every write of the group). */
static cw_err mark_invited(PGconn *c, const char *room_id, const char *identity_id, bool joined, cw_errmsg *e)
{
	const char *params[] = { room_id, identity_id };
	cw_err rc = store_exec(c, "BEGIN", e);
	PGresult *r = NULL;
	if (!rc) {
		r = PQexecParams(c,
			"SELECT count(" ROOM_LOCK_SQL("room_id") ") FROM room_members "
			"WHERE room_id = $1::bigint AND identity_id = $2::bigint AND membership = 'invited'",
			2, NULL, params, NULL, NULL, 0);
		if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
			r = NULL; /* cleared */
	}
	/* "0": not invited (no lock was taken): nothing to mark */
	if (!rc && strcmp(PQgetvalue(r, 0, 0), "0") != 0)
		rc = store_command(c, joined ? "UPDATE room_members SET membership = 'joined', peer_invited = false, "
					       "updated_at = now() WHERE room_id = $1::bigint AND identity_id = $2::bigint "
					       "AND membership = 'invited'"
					     : "UPDATE room_members SET membership = 'left', updated_at = now() "
					       "WHERE room_id = $1::bigint AND identity_id = $2::bigint "
					       "AND membership = 'invited'",
				   2, params, e);
	PQclear(r);
	return store_end(c, rc, e);
}

cw_err mx_mark_joined(PGconn *c, const char *room_id, const char *identity_id, cw_errmsg *e)
{
	return mark_invited(c, room_id, identity_id, true, e);
}

/* Under the same lock: an invitation refused for good
 * (mx_portal_refusal_ends) ends as a decline does: left, peer_invited kept
 * (a peer's invitation declined is listed invited to the peers, schema/037). */
static cw_err mark_refused(PGconn *c, const char *room_id, const char *identity_id, cw_errmsg *e)
{
	return mark_invited(c, room_id, identity_id, false, e);
}

/* A group's name (NULL: none) as its portals show it: as it is when it
 * passes the peer API's check (cw_utf8_name_ok), else what of it shows
 * (cw_utf8_name_shown, as a ghost's display name: a name stored before the
 * thirty-first session may hold C1 controls, a bidirectional override
 * that turns what a client shows after it round, or nothing visible at
 * all), into out; NULL when nothing of it shows (clients then name the
 * room after its members).  Until the thirty-second session the stored
 * name went out as it was. */
static const char *portal_name(const char *name, char *out, size_t len)
{
	if (!name || cw_utf8_name_ok(name, strlen(name)))
		return name;
	cw_utf8_name_shown(name, out, len);
	return out[0] ? out : NULL;
}

/* The key of a portal's making (create_room): the group and its user. */
#define PORTAL_KEY_MAX (MX_ID_MAX + 64)
static void portal_key(const char *neutral_room, const char *target_mxid, char key[PORTAL_KEY_MAX])
{
	snprintf(key, PORTAL_KEY_MAX, "portal|%s|%s", neutral_room, target_mxid);
}

/* The portal of a group for one local user: a room made by the bot with
 * the user invited, bound to the group (a room binding with no remote
 * user, schema/017_group_portals.sql).  Per user, not one for all: the
 * policy decides for each recipient, so each room holds what was let
 * through for its user.  Named as the group is (POST /v1/rooms "name"),
 * else not: clients name it after its members. */
cw_err mx_ensure_portal(struct matrix *m, PGconn *c, const char *neutral_room, const char *name,
			const char *target_id, const char *target_mxid, char *room, size_t rlen, char *binding,
			size_t blen, long *wait_ms, long *status_out, cw_errmsg *e)
{
	/* As in a direct room, nobody may redact another's events (the bot
	 * included): a ghost deletes only its own remote user's messages. */
	char key[PORTAL_KEY_MAX], shown[4 * CW_NAME_SHOWN_MAX + 8];
	long status = 0;
	portal_key(neutral_room, target_mxid, key);
	cw_err rc = create_room(m, NULL,
				json_pack("{s:s, s:[s], s:s, s:{s:i}, s:s*}", "preset", "private_chat", "invite", target_mxid,
					  "topic",
					  "A group chat bridged by Causeway: what is written here reaches its members on other "
					  "networks, and encryption ends at the gateway.",
					  "power_level_content_override", "redact", 101, "name",
					  portal_name(name, shown, sizeof(shown))),
				key, target_mxid, room, rlen, &status, e);
	if (wait_ms)
		*wait_ms = rc && status == 429 ? mx_rate_limited_wait_ms() : 0;
	if (status_out)
		*status_out = status;
	if (rc)
		return rc;
	const char *params[] = { neutral_room, room, target_id, name };
	rc = bind_room(m, c,
		       "INSERT INTO room_bindings (room_id, network, native_id, local_identity_id, name_synced) "
		       "VALUES ($1::bigint, 'matrix', $2, $3::bigint, $4) ON CONFLICT DO NOTHING RETURNING id",
		       4, params, NULL, true, target_id, neutral_room, target_mxid, room, rlen, binding, blen, e);
	if (rc)
		return rc;
	forget_alias(m, NULL, key);
	/* A join that came before the binding found no bridged room and
	 * marked nothing: the homeserver is asked now that the binding is
	 * committed (a join after this answer finds it).  Whoever made the
	 * room: until the thirty-ninth session only the bot's own round
	 * (invitation_row) asked, and the delivery, which makes the room
	 * of a user a peer invited, did not: an auto-joining client left its
	 * user invited a minute, until invitees_joined (a test failed under
	 * load so). */
	mx_mark_if_joined(m, c, room, neutral_room, target_id, target_mxid);
	return CW_OK;
}

/* A portal whose invitation the homeserver refused for good
 * (invitation_row): Synapse makes the room, its state and its alias before
 * the invitation, whose failure fails the createRoom, the room left made.
 * The bot leaves that room, found by its alias, and the alias goes: else
 * it stayed, the bot alone in it, for ever. */
static void portal_refused(struct matrix *m, const char *neutral_room, const char *target_mxid)
{
	char key[PORTAL_KEY_MAX], local[MX_ID_MAX + 1], alias[MX_ID_MAX + 1], dir[900];
	portal_key(neutral_room, target_mxid, key);
	alias_of(m, key, local, sizeof(local), alias, sizeof(alias));
	if (!mx_alias_directory_path(alias, dir, sizeof(dir)))
		return;
	long status;
	json_t *answer = NULL;
	cw_errmsg e;
	if (mx_call(m, "GET", dir, NULL, NULL, NULL, &status, &answer, &e) == CW_OK) {
		const char *id = json_string_value(json_object_get(answer, "room_id"));
		if (id && mx_room_id_valid(id) && mx_room_action(m, id, NULL, "leave", &e))
			LOG_KV_LIMITED(CW_LOG_WARN, "the bot cannot leave a room made for a refused invitation", "room",
				       id, "detail", e.msg);
	}
	json_decref(answer);
	forget_alias(m, NULL, key);
}

bool mx_bot_taken(struct matrix *m)
{
	long status = 0;
	cw_errmsg e;
	return mx_call(m, "GET", "/_matrix/client/v3/account/whoami", NULL, NULL, NULL, &status, NULL, &e) == CW_OK;
}

/* Shared by the bot's making of a portal (invitation_row, a user a local
 * member invited) and the delivery's (prep_row, a user a peer invited):
 * until the forty-seventh session the delivery's went through the
 * delivery's retries, a room left behind at each, and every later
 * message of the group made more. */
bool mx_portal_refusal_ends(struct matrix *m, PGconn *c, const char *neutral_room, const char *target_id,
			    const char *target_mxid, cw_err rc, long status, const char *why)
{
	if (rc == CW_EUNAVAIL || (status != 403 && status != 404) || !mx_bot_taken(m))
		return false;
	char st[16];
	snprintf(st, sizeof(st), "%ld", status);
	LOG_KV_LIMITED(CW_LOG_WARN, "the homeserver refuses for good a user's invitation to a group: it ends", "user",
		       target_mxid, "status", st, "detail", why);
	portal_refused(m, neutral_room, target_mxid);
	cw_errmsg e;
	if (mark_refused(c, neutral_room, target_id, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot end a refused invitation", "user", target_mxid, "detail", e.msg);
		return false;
	}
	return true;
}

/* The portal's name, as the group's now is (NULL: none; shown as
 * portal_name makes it), set by the bot and recorded (the stored name:
 * what the next round compares).  False when the homeserver did not take
 * it for now (no answer, a 5xx, a 429: *status its answer, 0 for none;
 * *wait_ms the wait a 429 asked for, else 0): the caller tries again
 * later (rename_row: backed_off_round backs off).  A refusal (another 4xx: the user took
 * the bot's power away, say) would be refused again, so the name counts
 * as given.  Logged through a limiter: until the forty-fifth session a
 * homeserver failing a rename was asked every round of the bot's (twice
 * a second when idle), a line each time, and a 429's wait was not kept. */
bool mx_rename_portal(struct matrix *m, PGconn *c, const char *room, const char *binding, const char *name,
		      long *status, long *wait_ms)
{
	cw_errmsg e;
	char buf[4 * CW_NAME_SHOWN_MAX + 8];
	const char *shown = portal_name(name, buf, sizeof(buf));
	*wait_ms = 0;
	if (mx_room_call(m, "PUT", room, NULL, "state/m.room.name/", NULL, json_pack("{s:s}", "name", shown ? shown : ""),
			 status, NULL, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot rename a group's room", "room", room, "detail", e.msg);
		if (*status == 429)
			*wait_ms = mx_rate_limited_wait_ms();
		if (mx_for_now(*status))
			return false;
	}
	const char *params[] = { binding, name };
	if (store_command(c, "UPDATE room_bindings SET name_synced = $2 WHERE id = $1::bigint", 2, params, &e))
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot record a group room's name", "room", room, "detail", e.msg);
	return true;
}

/* Whether who (a ghost, or the bot) is out of the user's room of a group
 * room for as long as the room's admins want: banned, or the bot put out
 * (kicked).  The homeserver tells a departed user their membership (GET
 * /state/m.room.member: the state when they left, as the specification
 * has it); ms is its answer ("" for none), and no answer, or another
 * membership, is false.  True: why says who is out and what lets it in
 * again, of the rows the bot relays there, or (ghost_join) of a sender's
 * ghost the bot cannot let in.  The one reading of portal_answer and
 * join_refusal (out_of_room). */
static bool out_by(struct matrix *m, const char *who, const char *room, const char *ms, bool ghost_join, char *why,
		   size_t len)
{
	bool bot = strcmp(who, m->bot) == 0, banned = strcmp(ms, "ban") == 0;
	if (!banned && !(bot && strcmp(ms, "leave") == 0))
		return false;
	const char *was = banned ? "is banned from" : "was put out of";
	if (!bot)
		snprintf(why, len, "the recipient's room refuses the sender (banned there): their messages are not "
				   "delivered until the ban is lifted");
	else if (ghost_join)
		snprintf(why, len, "the gateway's bot %s the recipient's room of the group, so the sender's ghost "
				   "cannot be let in: their messages are not delivered there until %s",
			 was, banned ? "the ban is lifted and the bot invited again" : "the bot is invited again");
	else
		snprintf(why, len, "the gateway's bot %s the recipient's room of the group: what it relays there is "
				   "not delivered until %s",
			 was, banned ? "the ban is lifted and the bot invited again" : "it is invited again");
	LOG_KV_LIMITED(CW_LOG_WARN, "out of a user's room of a group: its rows there are not delivered", "room", room,
		       "user", who, "membership", ms);
	return true;
}

/* out_by, the homeserver asked at once (join_refusal's question, within a
 * row's preparation), its answer awaited MX_MEMBER_TIMEOUT_MS at most. */
static bool out_of_room(struct matrix *m, const char *who, const char *room, bool ghost_join, char *why, size_t len)
{
	char ms[16];
	long status = 0;
	cw_errmsg e;
	return !member_state(m, who, room, who, MX_MEMBER_TIMEOUT_MS, ms, sizeof(ms), &status, &e) &&
	       out_by(m, who, room, ms, ghost_join, why, len);
}

/* Why the homeserver refused (403) a ghost's join of a user's room of a
 * group, said in why for the row's last_error: the bot out of the room
 * (kicked or banned: it cannot invite the ghost, a new member's or one
 * kicked, so the join of an invite-only room is refused; inviting the bot
 * again lets it in), the ghost banned there (out_of_room), or else the
 * homeserver's answer (detail).  Until the fifty-third session every such
 * refusal said "banned there", the bot's being out too.  Its two questions
 * are asked within the row's preparation, while every other room of the
 * batch waits (as for the invitation and the join themselves): each
 * awaited MX_MEMBER_TIMEOUT_MS at most, not MX_TIMEOUT_MS, since they only
 * word the reason (the row is not delivered whatever they answer). */
static void join_refusal(struct matrix *m, const char *room, const char *ghost, const char *detail, char *why,
			 size_t len)
{
	if (out_of_room(m, m->bot, room, true, why, len) || out_of_room(m, ghost, room, true, why, len))
		return;
	/* the homeserver's answer cut whole characters only: why is stored
	 * (last_error) and kept as JSON text (the batch's refused joins) */
	size_t cut = 0, n = strlen(detail);
	for (size_t k; cut < n; cut += k)
		if (!(k = cw_utf8_seq((const unsigned char *)detail + cut, n - cut, NULL)) || cut + k > 400)
			break;
	snprintf(why, len, "the recipient's room of the group does not let the sender's ghost in: %.*s", (int)cut,
		 detail);
}

/* A remote member's ghost in a portal: invited by the bot, then joined
 * (both idempotent on a homeserver: an invite of a member is refused, and
 * the join that follows says whether it is in), and recorded.  *refused:
 * the join was forbidden (403: the user banned the ghost from their room,
 * the bot is out of it, or the room lets it in no more), an answer that
 * holds; e then says which (join_refusal). */
static cw_err ensure_portal_member(struct matrix *m, PGconn *c, const char *room, const char *binding,
				   const char *sender_id, const char *ghost, bool *refused, cw_errmsg *e)
{
	long status;
	cw_errmsg e2;
	*refused = false;
	if (mx_room_post(m, room, NULL, "invite", json_pack("{s:s}", "user_id", ghost), &status, &e2) &&
	    status != 403) /* 403: a member already (or the join below says why not) */
		LOG_KV_LIMITED(CW_LOG_WARN, "the bot cannot invite a ghost to a group", "room", room, "detail", e2.msg);
	cw_err rc = mx_room_post(m, room, ghost, "join", json_object(), &status, e);
	*refused = rc && status == 403;
	if (*refused) {
		char why[sizeof(e->msg)];
		join_refusal(m, room, ghost, e->msg, why, sizeof(why));
		cw_fail(e, rc, "%s", why);
	}
	if (rc)
		return rc;
	const char *params[] = { binding, sender_id };
	return store_command(c, "INSERT INTO matrix_portal_members (binding_id, identity_id) VALUES ($1::bigint, $2::bigint) "
			     "ON CONFLICT DO NOTHING", 2, params, e);
}

/* Whether an earlier attempt of this row reached the room after all (the
 * homeserver forgot the txnId after a restart): its outbox id is in the
 * content of one of the room's last events sent by ghost (NULL: the bot),
 * who sent the row (part >= 0: the event of that extra attachment, with
 * MX_PART_KEY; -1: the row's own event).  Anyone in the room may write
 * any key into their content (a client that forwards a message copies
 * it): an event of someone else's is not the row's.  A look the
 * homeserver did not answer (down, a 5xx, a 408 or 429) says nothing:
 * the error (e), and the row is tried again, not sent blind (until the
 * fifty-first session a failed look was taken for "not there", and a row
 * whose answer was lost went twice once the homeserver had forgotten its
 * txnId).  One it refuses (another 4xx: a homeserver that wants a from
 * token, say) can never be made: not there, as before, or the row would
 * never go. */
static cw_err already_sent(struct matrix *m, const char *room, const char *ghost, int64_t row_id, int part,
			   char *eid, size_t elen, bool *found, cw_errmsg *e)
{
	const char *actor = ghost ? ghost : m->bot;
	char path[600], *r = seg(m, room);
	snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/messages", r ? r : "");
	curl_free(r);
	long status;
	json_t *answer = NULL;
	*found = false;
	cw_errmsg ce;
	cw_err rc = mx_call(m, "GET", path, ghost, "dir=b&limit=50", NULL, &status, &answer, &ce);
	if (rc && (status == 0 || status == 408 || status == 429 || status >= 500))
		cw_fail(e, rc, "cannot look for an earlier try's event in the room: %s", ce.msg);
	else if (rc)
		rc = CW_OK; /* refused: never to be had */
	else {
		size_t i;
		json_t *ev;
		json_array_foreach(json_object_get(answer, "chunk"), i, ev) {
			json_t *mark = json_object_get(json_object_get(ev, "content"), MX_OUTBOX_KEY);
			json_t *p = json_object_get(json_object_get(ev, "content"), MX_PART_KEY);
			const char *sender = json_string_value(json_object_get(ev, "sender"));
			if (json_is_integer(mark) && json_integer_value(mark) == row_id && sender && strcmp(sender, actor) == 0 &&
			    (part < 0 ? !p : json_is_integer(p) && json_integer_value(p) == part) &&
			    json_is_string(json_object_get(ev, "event_id"))) {
				snprintf(eid, elen, "%s", json_string_value(json_object_get(ev, "event_id")));
				*found = true;
				break;
			}
		}
	}
	json_decref(answer);
	return rc;
}

/* batch_info's statement, prepared on the dispatcher's connection and run
 * with its generic plan (store_exec_generic_sql): sent whole, it was
 * planned at each batch (1.4 ms, more than half of running it; until the
 * forty-fifth session).
 *
 * Its last column (a leave of the row's Matrix room waiting in the bot's
 * inbox) probes that room alone (its portal's or its direct room's: db,
 * one of the two, as the room is a group or not) through
 * matrix_bot_inbox_room_idx (schema/053), as INBOX_NEWCOMER does in
 * mx_bot.c, and for the same reasons: OFFSET 0 keeps it a probe per row
 * (the planner may not make it a hashed subplan over all the leaves), and
 * "(handled_at IS NULL) IS TRUE" is a form matrix_bot_inbox_due_idx's
 * predicate cannot be proved from, so that stale statistics do not steer
 * it there.  Until the fifty-seventh session every unhandled leave, ban
 * and tombstone of the inbox was read, and its event parsed, at each
 * batch: those waiting for a retry are thousands during a homeserver
 * outage, when the batches are many (docs/performance.md, "Fifty-seventh
 * session"). */
static const char batch_info_sql[] =
	"SELECT x.k - 1, t.localpart, (SELECT native_id FROM identity_bindings WHERE identity_id = t.id AND network = 'matrix'), "
	" s.id, s.localpart, s.is_local, p.name, "
	" (SELECT native_id FROM identity_bindings WHERE identity_id = s.id AND network = 'matrix'), "
	" db.native_id, coalesce(s.display_name, ''), ev.room_id, ev.ts, s.avatar::text, "
	" s.profile_changed_at IS NOT NULL AND coalesce((SELECT profile_synced_at FROM identity_bindings "
	"  WHERE identity_id = s.id AND network = 'matrix'), '-infinity') < s.profile_changed_at, "
	" s.profile_changed_at::text, rm.kind, pb.native_id, pb.id, "
	" EXISTS (SELECT 1 FROM matrix_portal_members pm WHERE pm.binding_id = pb.id AND pm.identity_id = s.id), "
	" rm.name, rm.kind = 'group' AND NOT EXISTS (SELECT 1 FROM room_members x WHERE x.room_id = ev.room_id "
	"  AND x.identity_id = t.id AND (x.membership = 'joined' OR (x.membership = 'invited' AND x.peer_invited))), "
	" p.domain, "
	" EXISTS (SELECT 1 FROM matrix_bot_inbox b WHERE (b.handled_at IS NULL) IS TRUE "
	"  AND b.event->>'room_id' = coalesce(pb.native_id, db.native_id) AND ((b.event->>'type' = 'm.room.member' "
	"  AND b.event->'content'->>'membership' IN ('leave', 'ban')) OR b.event->>'type' = 'm.room.tombstone') OFFSET 0), "
	" EXISTS (SELECT 1 FROM delivery_attempts a WHERE a.outbox_id = x.o AND a.code IS DISTINCT FROM 429) "
	"FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) WITH ORDINALITY AS x(ev, tg, o, k) "
	"JOIN events ev ON ev.id = x.ev JOIN identities s ON s.id = ev.sender_id JOIN identities t ON t.id = x.tg "
	"JOIN rooms rm ON rm.id = ev.room_id LEFT JOIN peers p ON p.id = s.peer_id "
	"LEFT JOIN room_bindings pb ON rm.kind = 'group' AND pb.network = 'matrix' AND pb.room_id = ev.room_id "
	" AND pb.local_identity_id = t.id AND pb.remote_identity_id IS NULL "
	"LEFT JOIN room_bindings db ON rm.kind = 'direct' AND db.network = 'matrix' AND db.local_identity_id = t.id "
	" AND db.remote_identity_id = s.id "
	"ORDER BY x.k";

/* What the rows of a batch need, in one statement: per row (in the order
 * given, k = its index), the recipient's localpart and Matrix id, the
 * sender's identity, localpart, locality, peer, ghost and display name,
 * the direct room, the neutral room and the event's ts; the sender's
 * avatar, whether its profile changed since its ghost's was last set, and
 * when it changed; the kind of the event's room; for a group, the
 * recipient's portal (Matrix room, binding id), whether the sender's
 * ghost has joined it, and the group's name (for a portal made now);
 * whether the leave of the row's Matrix room (or its upgrade, or its ghost
 * put out) waits in the bot's inbox (its unbinding to come); whether the
 * row had a try other than a 429's (in delivery_attempts: see prep_row's
 * sent_before). */
static cw_err batch_info(PGconn *c, const struct outbox_row *rows, size_t n, PGresult **out, cw_errmsg *e)
{
	*out = NULL;
	struct cw_pg_ids a, b, o;
	bool ok_a = cw_pg_ids_begin(&a, NULL, n), ok_b = cw_pg_ids_begin(&b, NULL, n),
	     ok_o = cw_pg_ids_begin(&o, NULL, n);
	for (size_t i = 0; ok_a && ok_b && ok_o && i < n; i++) {
		cw_pg_ids_add(&a, (long long)rows[i].event_id);
		cw_pg_ids_add(&b, (long long)rows[i].target_id);
		cw_pg_ids_add(&o, (long long)rows[i].id);
	}
	char *evs = ok_a ? cw_pg_ids_end(&a) : NULL, *tgs = ok_b ? cw_pg_ids_end(&b) : NULL,
	     *ids = ok_o ? cw_pg_ids_end(&o) : NULL;
	if (!evs || !tgs || !ids) {
		free(evs);
		free(tgs);
		free(ids);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	const char *params[] = { evs, tgs, ids };
	PGresult *r = store_exec_generic_sql(c, "causeway_mx_batch", batch_info_sql, 3, params);
	free(evs);
	free(tgs);
	free(ids);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e); /* clears r on failure */
	if (!rc)
		*out = r;
	return rc;
}

/* Row k of the batch's info, or -1. */
static int info_row(PGresult *info, size_t k, int *from)
{
	for (int i = *from; i < PQntuples(info); i++)
		if ((size_t)atoll(PQgetvalue(info, i, 0)) == k) {
			*from = i + 1;
			return i;
		}
	return -1;
}

/* Notes the Matrix event id a row's event got: in the row, recorded with
 * its outcome (outbox_row's remote_id: outbox.remote_id and
 * event_native_ids, in cw_record), where later rows of the batch that
 * refer to it find it (in_batch).  Until the fifty-fifth session it was
 * also kept in a JSON array of the batch's deliveries, an object made
 * per delivered row (note_sent: 2.4 % of the dispatcher thread,
 * docs/performance.md, "Fifty-fourth session"), which said nothing the
 * rows do not.  An id that is none (the homeserver's answer, or an event
 * it listed: mx_event_id_valid) is not noted, with a line in the log:
 * until the forty-ninth session it was stored as the event's Matrix id,
 * and later replies, edits and deletes of the message named it. */
static void note_event_id(struct outbox_row *row, const char *eid)
{
	if (!mx_event_id_valid(eid)) {
		char id[24];
		snprintf(id, sizeof(id), "%lld", (long long)row->id);
		LOG_KV_LIMITED(CW_LOG_WARN, "the homeserver gave a sent event no valid event id: not recorded",
			       "outbox_id", id);
		return;
	}
	snprintf(row->remote_id, sizeof(row->remote_id), "%s", eid); /* mx_event_id_valid: at most MX_ID_MAX */
}

/* Remembers eid, the event of a file of row's message sent before the
 * row's own event (media_parts), so that a delete of the message redacts
 * it too (redact_parts): event_native_ids of kind 'part', its native id
 * "<outbox id>/<event id>" (the row says whose room it is in; the
 * message has one row, and such events, per user).  A failure is logged:
 * the message went, its delete will miss that file. */
static void note_part(PGconn *c, const struct outbox_row *row, const char *eid)
{
	char ev[24], id[MX_ID_MAX + 32];
	snprintf(ev, sizeof(ev), "%lld", (long long)row->event_id);
	snprintf(id, sizeof(id), "%lld/%s", (long long)row->id, eid);
	const char *p[] = { ev, id };
	cw_errmsg e;
	if (store_command(c, "INSERT INTO event_native_ids (event_id, network, kind, native_id) "
			     "VALUES ($1::bigint, 'matrix', 'part', $2) ON CONFLICT DO NOTHING", 2, p, &e))
		LOG_KV(CW_LOG_WARN, "cannot record the Matrix event of a file", "detail", e.msg);
}

/* A delete row's redactions of the files its message sent before its own
 * event (note_part), in the row's room, as actor (NULL: the bot): the
 * row's own redaction takes the last file and the text; until the
 * forty-sixth session the others stayed.  txnId cw-<row>-p<k>, the same
 * at each try. */
static cw_err redact_parts(struct matrix *m, PGconn *c, const struct outbox_row *row, const char *rs,
			   const char *actor, cw_errmsg *e)
{
	const char *msg = json_string_value(json_object_get(json_object_get(row->event, "content"), "replaces"));
	if (!msg)
		return CW_OK;
	char tg[24];
	snprintf(tg, sizeof(tg), "%lld", (long long)row->target_id);
	const char *p[] = { msg, tg };
	PGresult *r = PQexecParams(c,
		"SELECT substr(n.native_id, length(o.id::text) + 2) FROM events x "
		"JOIN outbox o ON o.event_id = x.id AND o.destination = 'matrix' AND o.target_identity_id = $2::bigint "
		"JOIN event_native_ids n ON n.event_id = x.id AND n.network = 'matrix' AND n.kind = 'part' "
		" AND starts_with(n.native_id, o.id::text || '/') "
		"WHERE x.public_id = $1 ORDER BY n.native_id",
		2, NULL, p, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e); /* clears r on failure */
	if (rc)
		return rc;
	for (int i = 0; !rc && i < PQntuples(r); i++) {
		char *tgt = seg(m, PQgetvalue(r, i, 0)), path[1400];
		snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/redact/%s/cw-%lld-p%d", rs, tgt ? tgt : "",
			 (long long)row->id, i);
		curl_free(tgt);
		long status;
		rc = mx_call(m, "PUT", path, actor, NULL, json_object(), &status, NULL, e);
	}
	PQclear(r);
	return rc;
}

/* Whether row was tried before (*tried): a try counted (attempts > 1),
 * or one that was not but is in delivery_attempts, a 429's (the
 * dispatcher's record gives the attempt back: a slower pace is no
 * failure).  A file's event sent before the row's own event was answered
 * 429 is in the room then, and a homeserver that has forgotten its txnId
 * (a restart; Synapse keeps them for a while, not for ever) makes another
 * of a PUT with the same one: until the fifty-second session only a
 * counted try looked for it (already_sent), and the file went twice. */
static cw_err tried_before(PGconn *c, const struct outbox_row *row, bool *tried, cw_errmsg *e)
{
	*tried = row->attempts > 1;
	if (*tried)
		return CW_OK;
	char id[24];
	snprintf(id, sizeof(id), "%lld", (long long)row->id);
	const char *p[] = { id };
	PGresult *r = PQexecParams(c, "SELECT 1 FROM delivery_attempts WHERE outbox_id = $1::bigint LIMIT 1", 1, NULL,
				   p, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e); /* clears r on failure */
	if (rc)
		return rc;
	*tried = PQntuples(r) > 0;
	PQclear(r);
	return CW_OK;
}

/* The row's attachments, re-hosted: each https:// file is fetched and
 * uploaded (mx_rehost), one that cannot be carried becomes a line saying
 * why, and so does a peer's mxc:// (signer: the sender's peer's domain,
 * NULL for a local sender).  A Matrix event holds one file, so with several the ones before
 * the last go first as events of their own (sent here, in order, as the
 * ghost: txnId cw-<row>-p<k>, MX_PART_KEY k, looked for before a retry
 * sends them again), and the row's own event carries the last file with
 * the text as its caption.  An edit changes that event alone: it carries
 * the last file, re-hosted, and the text (until the forty-sixth session an
 * edit's files were lines of its text, a peer's URL a bare link into its
 * store).  *out: the event to map instead of row->event (NULL: the row's
 * event as it is).  *never: the failure is the row's own, an attachment
 * no Matrix event can be made of (retrying cannot help). */
static cw_err media_parts(struct matrix *m, PGconn *c, struct outbox_row *row, const char *room, const char *ghost,
			  const char *signer, const char *ts, json_t **out, bool *wait, bool *never, cw_errmsg *e)
{
	*out = NULL;
	*wait = false;
	*never = false;
	const char *type = json_string_value(json_object_get(row->event, "type"));
	const json_t *atts = json_object_get(json_object_get(row->event, "content"), "attachments");
	bool edit = type && strcmp(type, "edit") == 0;
	size_t n = type && (strcmp(type, "message") == 0 || edit) ? json_array_size(atts) : 0;
	size_t first = edit && n > 1 ? n - 1 : 0; /* the files looked at */
	bool any = false;
	for (size_t k = first; k < n; k++) {
		const char *url = json_string_value(json_object_get(json_array_get(atts, k), "url"));
		any = any || (url && (strncmp(url, "https://", 8) == 0 || (signer && strncmp(url, "mxc://", 6) == 0)));
	}
	if (!any && n <= 1)
		return CW_OK;
	json_t *copy = json_deep_copy(row->event);
	json_t *list = json_object_get(json_object_get(copy, "content"), "attachments");
	if (!copy)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	for (size_t k = first; k < n; k++) {
		json_t *a = json_array_get(list, k);
		const char *url = json_string_value(json_object_get(a, "url"));
		if (url && signer && strncmp(url, "mxc://", 6) == 0) {
			/* a peer's content URI is no file it sent: any file of
			 * any Matrix server (of this one too) */
			json_object_set_new(a, "url", json_string("(not carried: a link into Matrix, not a file of the "
								  "sender's network)"));
			continue;
		}
		if (!url || strncmp(url, "https://", 8) != 0)
			continue;
		char mxc[300], why[160] = "", text[200];
		json_int_t size = -1;
		enum mx_rehost rh =
			mx_media_lookup(m, c, row->event_id, ghost, signer, a, mxc, sizeof(mxc), &size, why, sizeof(why), e);
		if (rh == MX_REHOST_RETRY) {
			json_decref(copy);
			return CW_EUNAVAIL;
		}
		if (rh == MX_REHOST_WAIT) { /* the worker fetches it: the room waits, the others go on */
			*wait = true;
			continue;
		}
		snprintf(text, sizeof(text), "(not carried: %s)", why);
		json_object_set_new(a, "url", json_string(rh == MX_REHOST_OK ? mxc : text));
		/* The file's size as fetched, which Matrix shows (info.size): the
		 * attachment's declaration is a bound, the file may be shorter
		 * (until the forty-sixth session Matrix showed the declared size,
		 * or none when the attachment declared none). */
		if (rh == MX_REHOST_OK && size >= 0)
			json_object_set_new(a, "size", json_integer(size));
	}
	if (*wait) {
		json_decref(copy);
		return CW_OK;
	}
	char *rs = seg(m, room);
	cw_err rc = rs ? CW_OK : cw_fail(e, CW_ENOMEM, "out of memory");
	bool tried = false;
	if (!rc && first + 1 < n)
		rc = tried_before(c, row, &tried, e);
	for (size_t k = first; !rc && k + 1 < n; k++) {
		char eid[MX_ID_MAX + 1];
		bool found = false;
		if (tried && (rc = already_sent(m, room, ghost, row->id, (int)k, eid, sizeof(eid), &found, e)))
			break;
		if (found) {
			note_part(c, row, eid);
			continue;
		}
		json_t *one = json_pack("{s:s, s:{s:[O]}}", "type", "message", "content", "attachments",
					json_array_get(list, k));
		struct mx_out o;
		char why[200] = "";
		memset(&o, 0, sizeof(o));
		if (!one) {
			rc = cw_fail(e, CW_ENOMEM, "out of memory");
		} else if (!mx_from_neutral(one, NULL, NULL, NULL, NULL, &o, why, sizeof(why)) || o.op != MX_OP_SEND) {
			*never = strcmp(why, MX_WHY_NOMEM) != 0;
			rc = cw_fail(e, *never ? CW_EINVAL : CW_ENOMEM, "an attachment is not representable in Matrix: %s",
				     why);
		} else {
			json_object_set_new(o.content, MX_OUTBOX_KEY, json_integer(row->id));
			json_object_set_new(o.content, MX_PART_KEY, json_integer((json_int_t)k));
			char path[1200], query[64];
			snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/send/m.room.message/cw-%lld-p%zu", rs,
				 (long long)row->id, k);
			snprintf(query, sizeof(query), "ts=%s", ts);
			long status;
			json_t *answer = NULL;
			rc = mx_call(m, "PUT", path, ghost, query, json_incref(o.content), &status, &answer, e);
			*never = rc && refused_for_good(status, answer); /* as the row's own event (matrix_deliver) */
			const char *sent_id = json_string_value(json_object_get(answer, "event_id"));
			if (!rc && sent_id && mx_event_id_valid(sent_id))
				note_part(c, row, sent_id);
			json_decref(answer);
		}
		mx_out_clear(&o);
		json_decref(one);
	}
	curl_free(rs);
	if (rc) {
		json_decref(copy);
		return rc;
	}
	/* The row's own event: the last file, and the text. */
	if (n > 1) {
		json_t *last = json_incref(json_array_get(list, n - 1));
		json_array_clear(list);
		json_array_append_new(list, last);
	}
	*out = copy;
	return CW_OK;
}

/* After a failure, a ghost's profile is tried again no sooner than this
 * (an avatar's store that hangs would otherwise cost every message of
 * that sender the fetch's timeout).  A fixed wait, not a backoff
 * (store_backoff_next): a try comes with a delivery of the sender, not
 * on a timer, and a failure's time is all that is kept of it. */
#define PROFILE_RETRY_MS (10 * 60 * 1000LL)

/* Brings a ghost's display name and avatar to its remote user's profile
 * (POST /v1/profiles) as of changed_at: the avatar re-hosted like any
 * file.  Recorded only when done, so that a failure is tried again with a
 * later delivery of the sender (PROFILE_RETRY_MS on); never fails the row
 * (a name is not worth a message's loss).  True when the avatar is being
 * fetched (the media worker, for event_id, the row's event: a message
 * that expires meanwhile has it left unfetched): the row waits for it,
 * so that the ghost has its face when its message appears. */
static bool sync_profile(struct matrix *m, PGconn *c, int64_t event_id, const char *sender_id, const char *peer,
			 const char *signer, const char *localpart, const char *display, const char *avatar,
			 const char *changed_at, const char *ghost)
{
	int64_t now = cw_wall_ms();
	pthread_mutex_lock(&m->mu);
	json_t *last = json_object_get(m->profile_failed, sender_id);
	bool later = last && now - json_integer_value(last) < PROFILE_RETRY_MS;
	pthread_mutex_unlock(&m->mu);
	if (later)
		return false;
	/* The avatar first: while the worker fetches it, nothing is set yet. */
	char mxc[300] = "", why[160];
	cw_errmsg e;
	bool avatar_ok = true;
	json_t *att = avatar ? json_loads(avatar, 0, NULL) : NULL;
	if (att) {
		enum mx_rehost rh =
			mx_media_lookup(m, c, event_id, ghost, signer, att, mxc, sizeof(mxc), NULL, why, sizeof(why), &e);
		json_decref(att);
		if (rh == MX_REHOST_WAIT) /* the message waits for its face */
			return true;
		if (rh == MX_REHOST_RETRY) {
			LOG_KV_LIMITED(CW_LOG_WARN, "cannot fetch a ghost's avatar", "user", ghost, "detail", e.msg);
			avatar_ok = false;
		} else if (rh == MX_REHOST_NOTICE) {
			LOG_KV_LIMITED(CW_LOG_INFO, "a ghost's avatar is not carried", "user", ghost, "why", why);
			mxc[0] = '\0';
		}
	}
	char name[4 * MX_DISPLAYNAME_MAX + 1], path[600];
	ghost_name(name, sizeof(name), display, localpart, peer);
	char *g = seg(m, ghost);
	long status;
	/* Each is set whatever became of the other: a name refused does not
	 * cost the ghost its face, nor the other way round. */
	bool name_ok = g != NULL;
	snprintf(path, sizeof(path), "/_matrix/client/v3/profile/%s/displayname", g ? g : "");
	if (name_ok && mx_call(m, "PUT", path, ghost, NULL, json_pack("{s:s}", "displayname", name), &status, NULL, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot set a ghost's display name", "user", ghost, "detail", e.msg);
		name_ok = false;
	}
	avatar_ok = avatar_ok && g != NULL;
	snprintf(path, sizeof(path), "/_matrix/client/v3/profile/%s/avatar_url", g ? g : "");
	if (avatar_ok && mx_call(m, "PUT", path, ghost, NULL, json_pack("{s:s}", "avatar_url", mxc), &status, NULL, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot set a ghost's avatar", "user", ghost, "detail", e.msg);
		avatar_ok = false;
	}
	curl_free(g);
	bool ok = name_ok && avatar_ok;
	const char *params[] = { sender_id, changed_at };
	if (ok && store_command(c, "UPDATE identity_bindings SET profile_synced_at = $2::timestamptz "
				   "WHERE identity_id = $1::bigint AND network = 'matrix'", 2, params, &e))
		LOG_KV(CW_LOG_WARN, "cannot record a ghost's profile", "user", ghost, "detail", e.msg);
	pthread_mutex_lock(&m->mu);
	if (ok)
		json_object_del(m->profile_failed, sender_id);
	else if (json_object_size(m->profile_failed) < 100000) /* bounded: a flood of failing senders */
		json_object_set_new(m->profile_failed, sender_id, json_integer(now));
	pthread_mutex_unlock(&m->mu);
	return false;
}

/* What one row needs to go out: the request made (1), nothing to send
 * (0: a receipt Matrix has no form for, or a retry whose event is in the
 * room already), a file being made ready or the room's unbinding to
 * come (2: the room waits a little),
 * refused for good by the user's room (3: the sender's ghost is banned
 * there; e says how), a row no Matrix event can be made of or that can
 * never be delivered for a fact of its own, such as a recipient without a
 * valid Matrix id (4: retrying cannot help; e says why), or a failure that
 * a retry may mend (-1: the homeserver's, the database's, memory; e says
 * why). */
enum prep { PREP_FAIL = -1, PREP_NOTHING = 0, PREP_SEND = 1, PREP_WAIT = 2, PREP_DROP = 3, PREP_DEAD = 4 };

/* The membership ("join", "leave", ...) of neutral membership event ev
 * when its sender changes their own (content.target is its sender); NULL
 * for another's (an invitation, a removal) or another kind of event. */
static const char *own_membership(const json_t *ev)
{
	const json_t *mc = json_object_get(ev, "content");
	const char *ms = json_string_value(json_object_get(mc, "membership"));
	const char *who = json_string_value(json_object_get(mc, "target"));
	const char *sender = json_string_value(json_object_get(ev, "sender"));
	return ms && who && sender && strcmp(who, sender) == 0 ? ms : NULL;
}

/* Where a row's event was sent, for its answer (finish_row): the room,
 * the sender (the bot's id for the bot) and the content (a send's); and,
 * for any request of a row of a group, the user's room of the group
 * (portal, "" for a direct room's row) and who acted there (by, the bot's
 * id for the bot): ask_portal's question after a 403. */
struct sent_to {
	char room[MX_ID_MAX + 1], actor[MX_ID_MAX + 1];
	json_t *content;
	char portal[MX_ID_MAX + 1], by[MX_ID_MAX + 1];
};

/* Resolves the row's ghost and direct room (making them the first time:
 * calls to the homeserver and writes, here on the dispatcher's thread),
 * maps the event, and sets up its request on h (a send's where in to). */
static enum prep prep_row(struct matrix *m, PGconn *c, const struct outbox_row *rows, size_t n,
			  struct outbox_row *row, PGresult *r, int i, json_t *made, CURL *h, struct mx_req *rq,
			  struct sent_to *to, cw_errmsg *e)
{
	to->room[0] = '\0';
	to->portal[0] = '\0';
	if (!row->target_id) {
		cw_fail(e, CW_EINVAL, "a Matrix row names no local user");
		return PREP_DEAD;
	}
	bool group = i >= 0 && strcmp(PQgetvalue(r, i, 15), "group") == 0;
	/* Whether the row's own event may be in the room already, to be
	 * looked for before it is sent again (already_sent): a try counted
	 * (attempts > 1), or one in delivery_attempts that is not counted
	 * now, a replayed dead letter's (the replay sets attempts to 0).
	 * Not after 429s alone: each refused the event (the files sent
	 * before it are media_parts's, tried_before), and a look would be a
	 * GET more of a homeserver that asks for a slower pace.  Until the
	 * sixty-second session only a counted try looked: a row whose
	 * delivery's record failed on its last try (its claim ran out, the
	 * budget spent: dead, though its message was in the room), or whose
	 * last try's answer was lost, went again when replayed, twice in the
	 * room once the homeserver had forgotten its txnId, and the first
	 * event's id was lost. */
	bool sent_before = row->attempts > 1 || (i >= 0 && PQgetvalue(r, i, 23)[0] == 't');
	/* Another user of this provider in the same group: relayed by the bot
	 * (an appservice can act only as its own users), named in the text. */
	bool relay = i >= 0 && PQgetvalue(r, i, 5)[0] == 't';
	if (i < 0 || (relay && !group) || (!relay && PQgetisnull(r, i, 6))) {
		cw_fail(e, CW_EINVAL, "only events of remote users (and, in a group, of its other members) are delivered "
				      "to Matrix");
		return PREP_DEAD;
	}
	if (group && PQgetvalue(r, i, 20)[0] == 't')
		return PREP_NOTHING; /* written before the user left the group: it is no longer theirs (and
					no new room of it is made for them) */
	/* The user left the row's room (or upgraded it, or put its ghost
	 * out), and the bot has not unbound it yet (mx_bot.c, left: its next
	 * round, or its retry when the database did not take it): the row
	 * waits for that, then goes into a new direct room (a group's: to
	 * nobody, she left the group).  Until the forty-seventh session it
	 * went into the room she had left, which she never sees. */
	if (PQgetvalue(r, i, 22)[0] == 't')
		return PREP_WAIT;
	const char *type = json_string_value(json_object_get(row->event, "type"));
	bool said = type && strcmp(type, "membership") == 0; /* a member came or went: the bot says so */
	if (relay && !said &&
	    (!type || (strcmp(type, "message") != 0 && strcmp(type, "edit") != 0 && strcmp(type, "delete") != 0)))
		return PREP_NOTHING; /* the bot reacting or typing would say nothing of who did */
	/* A remote member's own leave of a group has nothing to send: the
	 * bot's round makes their ghost leave the user's room of it
	 * (departure_row, mx_bot.c).  Until the forty-sixth session the
	 * row was prepared as one with something to say, whose ghost joins
	 * first: when the bot's round had come before it (the ghost gone, its
	 * membership of the room forgotten), the ghost was invited and joined
	 * again, and the next round made it leave again, so the user saw the
	 * member leave twice (a test failed so 1 run in 6 under load). */
	const char *own = said ? own_membership(row->event) : NULL;
	if (group && !relay && own && strcmp(own, "leave") == 0)
		return PREP_NOTHING;
	char target[24];
	snprintf(target, sizeof(target), "%lld", (long long)row->target_id);
	char target_mxid[MX_ID_MAX + 1], ghost[MX_ID_MAX + 1] = "", room[MX_ID_MAX + 1] = "", sender_id[24];
	char neutral_room[24], ts[24], binding[24] = "";
	int tl = PQgetisnull(r, i, 2) ? snprintf(target_mxid, sizeof(target_mxid), "@%s:%s", PQgetvalue(r, i, 1),
						 mx_server_name(m->cfg))
				      : snprintf(target_mxid, sizeof(target_mxid), "%s", PQgetvalue(r, i, 2));
	if (tl < 0 || (size_t)tl >= sizeof(target_mxid)) { /* cut short, it could name someone else */
		cw_fail(e, CW_EINVAL, "the local user's Matrix id would be longer than %d bytes", MX_ID_MAX);
		return PREP_DEAD;
	}
	snprintf(sender_id, sizeof(sender_id), "%s", PQgetvalue(r, i, 3));
	snprintf(neutral_room, sizeof(neutral_room), "%s", PQgetvalue(r, i, 10));
	snprintf(ts, sizeof(ts), "%s", PQgetvalue(r, i, 11));
	/* A ghost or room made for an earlier row of this batch is not in
	 * the info, read before: made remembers them, each kind under a
	 * letter of its own (g ghost, r direct room, o portal, b portal's
	 * binding, j ghost joined to a portal, f profile synced). */
	char gkey[40], rkey[64], bkey[64], jkey[80];
	snprintf(gkey, sizeof(gkey), "g%s", sender_id);
	if (group)
		snprintf(rkey, sizeof(rkey), "o%s/%s", neutral_room, target);
	else
		snprintf(rkey, sizeof(rkey), "r%s/%s", target, sender_id);
	snprintf(bkey, sizeof(bkey), "b%s/%s", neutral_room, target);
	const char *g_made = json_string_value(json_object_get(made, gkey));
	const char *r_made = json_string_value(json_object_get(made, rkey));
	const char *b_made = json_string_value(json_object_get(made, bkey));
	int room_col = group ? 16 : 8;
	bool have_ghost = relay || !PQgetisnull(r, i, 7) || g_made, have_room = !PQgetisnull(r, i, room_col) || r_made;
	if (have_ghost && !relay)
		snprintf(ghost, sizeof(ghost), "%s", g_made ? g_made : PQgetvalue(r, i, 7));
	if (have_room)
		snprintf(room, sizeof(room), "%s", r_made ? r_made : PQgetvalue(r, i, room_col));
	if (group && (b_made || !PQgetisnull(r, i, 17)))
		snprintf(binding, sizeof(binding), "%s", b_made ? b_made : PQgetvalue(r, i, 17));
	char peer[80], localpart[600], display[300];
	snprintf(peer, sizeof(peer), "%s", PQgetvalue(r, i, 6));
	/* The sender's peer's domain (NULL for a local sender): only its
	 * hosts get a file's fetch signed (mx_rehost). */
	const char *signer = PQgetisnull(r, i, 21) ? NULL : PQgetvalue(r, i, 21);
	snprintf(localpart, sizeof(localpart), "%s", PQgetvalue(r, i, 4));
	snprintf(display, sizeof(display), "%s", PQgetvalue(r, i, 9));
	if (!mx_user_id_parse(target_mxid, NULL, 0, NULL, 0)) {
		cw_fail(e, CW_EINVAL, "the local user %s has no valid Matrix id", target_mxid);
		return PREP_DEAD;
	}
	/* Its bot's or a ghost's: nobody of the homeserver's (a peer naming
	 * one is refused, peer_local_refused; a user met before the thirtieth
	 * session may be stored). */
	if (mx_in_ghost_namespace(m->cfg->mx_user_prefix, mx_server_name(m->cfg), target_mxid) ||
	    strcmp(target_mxid, m->bot) == 0) {
		cw_fail(e, CW_EINVAL, "the local user %s is in the namespace of the gateway's own bot and ghosts",
			target_mxid);
		return PREP_DEAD;
	}
	if (!have_ghost) {
		const char *server = mx_server_name(m->cfg);
		if (!mx_ghost_id(m->cfg->mx_user_prefix, peer, localpart, server, ghost, sizeof(ghost))) {
			cw_fail(e, CW_EINVAL, "the remote user %s has no Matrix ghost id (too long)", localpart);
			return PREP_DEAD;
		}
		if (ensure_ghost(m, c, sender_id, peer, localpart, display, ghost, e))
			return PREP_FAIL;
		json_object_set_new(made, gkey, json_string(ghost));
	}
	if (!have_room && group) {
		/* a refused invitation ends as a decline does: the rows of
		 * the batch after it are hers no more */
		char nkey[70];
		snprintf(nkey, sizeof(nkey), "n%s", rkey);
		if (json_object_get(made, nkey))
			return PREP_NOTHING;
		long st = 0;
		cw_err prc = mx_ensure_portal(m, c, neutral_room, PQgetisnull(r, i, 19) ? NULL : PQgetvalue(r, i, 19),
					      target, target_mxid, room, sizeof(room), binding, sizeof(binding), NULL,
					      &st, e);
		if (prc && mx_portal_refusal_ends(m, c, neutral_room, target, target_mxid, prc, st, e->msg)) {
			json_object_set_new(made, nkey, json_true());
			return PREP_NOTHING;
		}
		if (prc)
			return PREP_FAIL;
		json_object_set_new(made, rkey, json_string(room));
		json_object_set_new(made, bkey, json_string(binding));
	} else if (!have_room) {
		if (ensure_room(m, c, neutral_room, target, sender_id, ghost, target_mxid, room, sizeof(room), e))
			return PREP_FAIL;
		json_object_set_new(made, rkey, json_string(room));
	}
	/* The ghost of a group's remote member joins the user's portal the
	 * first time it has something for it. */
	snprintf(jkey, sizeof(jkey), "j%s/%s", binding, sender_id);
	if (group && !relay && !(have_room && PQgetvalue(r, i, 18)[0] == 't') && !json_object_get(made, jkey)) {
		char xkey[90];
		snprintf(xkey, sizeof(xkey), "x%s", jkey);
		const char *before = json_string_value(json_object_get(made, xkey));
		if (before) { /* refused before in this batch: why */
			cw_fail(e, CW_EIO, "%s", before);
			return PREP_DROP;
		}
		bool refused;
		if (ensure_portal_member(m, c, room, binding, sender_id, ghost, &refused, e)) {
			if (refused)
				json_object_set_new(made, xkey, json_string(e->msg));
			return refused ? PREP_DROP : PREP_FAIL;
		}
		json_object_set_new(made, jkey, json_true());
	}
	const char *actor = relay ? NULL : ghost; /* NULL: the bot */
	char pkey[40];
	snprintf(pkey, sizeof(pkey), "f%s", sender_id);
	if (!relay && PQgetvalue(r, i, 13)[0] == 't' && !json_object_get(made, pkey)) { /* once a batch */
		if (sync_profile(m, c, row->event_id, sender_id, peer, signer, localpart, display,
				 PQgetisnull(r, i, 12) ? NULL : PQgetvalue(r, i, 12), PQgetvalue(r, i, 14), ghost))
			return PREP_WAIT;
		json_object_set_new(made, pkey, json_true());
	}
	/* A peer's files go into the room re-hosted on the homeserver, not as
	 * links into the peer's store (media_parts). */
	json_t *copy = NULL;
	bool wait, never;
	/* The upload's owner: the ghost, or for a relay the bot (a NULL
	 * user_id crashed the media worker, for ever: a wait is no attempt). */
	if (media_parts(m, c, row, room, actor ? actor : m->bot, signer, ts, &copy, &wait, &never, e))
		return never ? PREP_DEAD : PREP_FAIL;
	if (wait)
		return PREP_WAIT;
	json_t *ev = copy ? copy : row->event;
	json_t *labelled = NULL; /* a relayed member's text says whose it is */
	if (relay && said) {
		if (!own || (strcmp(own, "join") != 0 && strcmp(own, "leave") != 0)) {
			json_decref(copy);
			return PREP_NOTHING; /* an invite, or one member acting on another */
		}
		char text[700];
		snprintf(text, sizeof(text), "%s %s the group.", localpart, strcmp(own, "join") == 0 ? "joined" : "left");
		const char *sender = json_string_value(json_object_get(row->event, "sender"));
		ev = labelled = json_pack("{s:s, s:s, s:{s:[{s:s, s:s}], s:s}}", "type", "message", "sender", sender,
					  "content", "parts", "type", "text/plain", "body", text, MX_MSGTYPE_KEY,
					  "m.notice");
	} else if (relay) {
		char text[660], html[700];
		/* a local part has no character HTML would read (event.h) */
		snprintf(text, sizeof(text), "%s: ", localpart);
		snprintf(html, sizeof(html), "<b>%s</b>: ", localpart);
		ev = labelled = event_label(ev, text, html);
	}
	struct lookup_ctx l = { .c = c, .rows = rows, .n = n, .target = row->target_id, .m = m, .room = room,
				.actor = actor };
	char marker[24];
	snprintf(marker, sizeof(marker), "%lld", (long long)row->id);
	struct mx_out out;
	char why[200] = "";
	memset(&out, 0, sizeof(out));
	bool mapped = mx_from_neutral(ev, to_native, &l, MX_OUTBOX_KEY, marker, &out, why, sizeof(why));
	json_decref(labelled);
	json_decref(copy);
	if (l.failed) {
		mx_out_clear(&out);
		cw_fail(e, CW_EIO, "cannot look up a message the row refers to: %s", l.err.msg);
		return PREP_FAIL;
	}
	if (!mapped) {
		mx_out_clear(&out);
		bool nomem = strcmp(why, MX_WHY_NOMEM) == 0;
		cw_fail(e, nomem ? CW_ENOMEM : CW_EINVAL, "not representable in Matrix: %s", why);
		return nomem ? PREP_FAIL : PREP_DEAD;
	}
	if (out.content && json_is_object(out.content) && json_is_string(json_object_get(out.content, MX_OUTBOX_KEY)))
		json_object_set_new(out.content, MX_OUTBOX_KEY, json_integer(row->id));
	char path[1200], query[64], eid[MX_ID_MAX + 1] = "";
	char *rs = seg(m, room);
	char txn[48];
	snprintf(txn, sizeof(txn), "cw-%lld", (long long)row->id);
	enum prep res = PREP_SEND;
	cw_err rc = CW_OK;
	if (group) {
		snprintf(to->portal, sizeof(to->portal), "%s", room);
		snprintf(to->by, sizeof(to->by), "%s", actor ? actor : m->bot);
	}
	switch (out.op) {
	case MX_OP_SEND: {
		bool found = false;
		if (sent_before && (rc = already_sent(m, room, actor, row->id, -1, eid, sizeof(eid), &found, e)))
			break;
		if (found) {
			note_event_id(row, eid);
			res = PREP_NOTHING;
			break;
		}
		char *ty = seg(m, out.event_type);
		snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/send/%s/%s", rs ? rs : "", ty ? ty : "", txn);
		curl_free(ty);
		snprintf(query, sizeof(query), "ts=%s", ts);
		rc = req_setup(m, h, rq, "PUT", path, actor, query, json_incref(out.content), e);
		snprintf(to->room, sizeof(to->room), "%s", room);
		snprintf(to->actor, sizeof(to->actor), "%s", actor ? actor : m->bot);
		json_decref(to->content);
		to->content = json_incref(out.content);
		break;
	}
	case MX_OP_REDACT: {
		if ((rc = redact_parts(m, c, row, rs ? rs : "", actor, e)))
			break;
		char *tg = seg(m, out.target);
		snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/redact/%s/%s", rs ? rs : "", tg ? tg : "", txn);
		curl_free(tg);
		rc = req_setup(m, h, rq, "PUT", path, actor, NULL, out.content ? json_incref(out.content) : json_object(), e);
		break;
	}
	case MX_OP_RECEIPT: {
		char *tg = seg(m, out.target);
		snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/receipt/m.read/%s", rs ? rs : "", tg ? tg : "");
		curl_free(tg);
		rc = req_setup(m, h, rq, "POST", path, actor, NULL, json_object(), e);
		break;
	}
	case MX_OP_TYPING: {
		char *g = seg(m, ghost);
		snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/typing/%s", rs ? rs : "", g ? g : "");
		curl_free(g);
		rc = req_setup(m, h, rq, "PUT", path, ghost, NULL,
			       out.typing ? json_pack("{s:b, s:i}", "typing", 1, "timeout", 30000) : json_pack("{s:b}", "typing", 0),
			       e);
		break;
	}
	case MX_OP_NONE:
		res = PREP_NOTHING;
		break;
	}
	curl_free(rs);
	mx_out_clear(&out);
	return rc ? PREP_FAIL : res;
}

/* Whether reaction keys x and y are one in Matrix (mx_reaction_key). */
static bool same_key(const char *x, const char *y)
{
	char a[MX_REACTION_KEY_MAX], b[MX_REACTION_KEY_MAX];
	if (!x || !y)
		return false;
	return strcmp(mx_reaction_key(x, a, sizeof(a)) ? a : x, mx_reaction_key(y, b, sizeof(b)) ? b : y) == 0;
}

/* The key of reaction ev, or NULL. */
static const char *reaction_key(const json_t *ev)
{
	const char *type = json_string_value(json_object_get(ev, "type"));
	const json_t *parts = json_object_get(json_object_get(ev, "content"), "parts");
	return type && strcmp(type, "reaction") == 0 ? json_string_value(json_object_get(json_array_get(parts, 0), "body"))
						      : NULL;
}

/* The Matrix event of the reaction row k of rows repeats (the same
 * sender's, to the same message, with the same key in Matrix, in the same
 * user's room): one delivered earlier in this batch (in_batch) or before.
 * Into eid; false when none is known. */
static bool repeated_reaction(PGconn *c, const struct outbox_row *rows, size_t n, size_t k, char *eid, size_t len)
{
	const json_t *ev = rows[k].event;
	const char *key = reaction_key(ev);
	const json_t *target = json_object_get(json_object_get(ev, "content"), "in_reply_to");
	if (!key || !json_is_string(target))
		return false;
	for (size_t j = 0; j < n; j++) {
		const json_t *other = rows[j].event;
		const char *id;
		if (j == k || !(id = in_batch(&rows[j])) || rows[j].target_id != rows[k].target_id ||
		    !json_equal(json_object_get(other, "sender"), json_object_get(ev, "sender")) ||
		    !json_equal(json_object_get(json_object_get(other, "content"), "in_reply_to"), target) ||
		    !same_key(reaction_key(other), key))
			continue;
		snprintf(eid, len, "%s", id);
		return true;
	}
	char id[24], tg[24];
	snprintf(id, sizeof(id), "%lld", (long long)rows[k].event_id);
	snprintf(tg, sizeof(tg), "%lld", (long long)rows[k].target_id);
	const char *p[] = { id, tg };
	PGresult *r = PQexecParams(c,
		"SELECT o.remote_id, x.content->'content'->'parts'->0->>'body' FROM events r "
		"JOIN events x ON x.in_reply_to_id = r.in_reply_to_id AND x.sender_id = r.sender_id "
		" AND x.type = 'reaction' AND x.id <> r.id "
		"JOIN outbox o ON o.event_id = x.id AND o.destination = 'matrix' AND o.target_identity_id = $2::bigint "
		" AND o.remote_id IS NOT NULL "
		"WHERE r.id = $1::bigint ORDER BY o.id DESC LIMIT 100",
		2, NULL, p, NULL, NULL, 0);
	bool found = false;
	for (int i = 0; PQresultStatus(r) == PGRES_TUPLES_OK && i < PQntuples(r) && !found; i++) {
		found = same_key(PQgetvalue(r, i, 1), key) && strlen(PQgetvalue(r, i, 0)) < len;
		if (found)
			snprintf(eid, len, "%s", PQgetvalue(r, i, 0));
	}
	PQclear(r);
	return found;
}

/* The annotation the homeserver has already of the reaction sent as to
 * (its 400 M_DUPLICATE_ANNOTATION): the sender's m.reaction to the same
 * event with the same key, asked of the relations API (Matrix 1.3: GET
 * /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/m.annotation/
 * m.reaction, newest first), up to MX_ANNOTATION_PAGES pages.  The
 * rows' own lookup (repeated_reaction) knows only the reactions whose
 * event ids it stored: not the row's own reaction sent before, its
 * answer lost, and found by the retry neither among the room's last 50
 * events (already_sent) nor under its transaction id, which a
 * homeserver remembers a while only (Synapse: half an hour).  Until the
 * forty-seventh session such a row was delivered without its event, and
 * a delete of the reaction left it in the room.  Into eid; false when
 * none is found. */
#define MX_ANNOTATION_PAGES 10

static bool annotation_of(struct matrix *m, const struct sent_to *to, char *eid, size_t len)
{
	const json_t *rel = json_object_get(to->content, "m.relates_to");
	const char *target = json_string_value(json_object_get(rel, "event_id"));
	const char *key = json_string_value(json_object_get(rel, "key"));
	if (!target || !key || !to->room[0])
		return false;
	char *rs = seg(m, to->room), *ts = seg(m, target);
	char path[1200];
	snprintf(path, sizeof(path), "/_matrix/client/v1/rooms/%s/relations/%s/m.annotation/m.reaction", rs ? rs : "",
		 ts ? ts : "");
	curl_free(rs);
	curl_free(ts);
	bool found = false;
	char *from = NULL;
	for (int page = 0; page < MX_ANNOTATION_PAGES && !found; page++) {
		char query[700];
		char *f = from ? seg(m, from) : NULL;
		int ql = snprintf(query, sizeof(query), "limit=100%s%s", f ? "&from=" : "", f ? f : "");
		bool lost = from && !f;
		curl_free(f);
		if (lost || ql < 0 || (size_t)ql >= sizeof(query))
			break; /* a token too long to send (read_back's rule), or no memory: cut or left out,
				* the request would ask for another page */
		long status;
		json_t *answer = NULL;
		cw_errmsg e;
		if (mx_call(m, "GET", path, to->actor, query, NULL, &status, &answer, &e)) {
			json_decref(answer);
			break;
		}
		size_t k;
		json_t *ev;
		json_array_foreach(json_object_get(answer, "chunk"), k, ev) {
			const json_t *r = json_object_get(json_object_get(ev, "content"), "m.relates_to");
			const char *sender = json_string_value(json_object_get(ev, "sender"));
			const char *id = json_string_value(json_object_get(ev, "event_id"));
			const char *rt = json_string_value(json_object_get(r, "rel_type"));
			const char *on = json_string_value(json_object_get(r, "event_id"));
			if (sender && id && rt && on && strcmp(sender, to->actor) == 0 && strcmp(rt, "m.annotation") == 0 &&
			    strcmp(on, target) == 0 && same_key(json_string_value(json_object_get(r, "key")), key) &&
			    strlen(id) < len) {
				snprintf(eid, len, "%s", id);
				found = true;
				break;
			}
		}
		const char *next = json_string_value(json_object_get(answer, "next_batch"));
		free(from);
		from = next && !found ? strdup(next) : NULL;
		json_decref(answer);
		if (!from)
			break;
	}
	free(from);
	return found;
}

/* The question whether a row of a group whose request the homeserver
 * refused with a 403 was refused because who acted there (to->by: the
 * sender's ghost, or the bot relaying) is out of the user's room of the
 * group for as long as the room's admins want: banned (a ghost or the
 * bot), or the bot put out (kicked).  Such a row is not delivered (outcome 4; why says who is out,
 * and what lets it in again), and the room's next rows go on: no retry
 * mends it.  Until the fifty-third session each such row was tried again
 * for its whole retry budget, then a dead letter that named no cause.  A
 * ghost merely kicked is not: its next try invites it again, as its next
 * message does once the kick's event is taken (ghost_removed, mx_bot.c).
 * The homeserver tells the departed user their membership too (GET
 * /state/m.room.member: the state when they left, as the specification
 * has it); no answer, or another membership (the room's power levels took
 * the right to speak away): portal_answer's false, the row is tried again
 * as before.  The question is the row's room's next request on the delivery's multi
 * handle (ask_portal sets it up on h, portal_answer reads its answer), so
 * that the other rooms' requests go on meanwhile: until the fifty-fourth
 * session it was asked at once, on the delivery thread, and a homeserver
 * slow to answer it held every other room in flight up to MX_TIMEOUT_MS.
 * False: no question to ask (a direct room's row), or out of memory. */
static bool ask_portal(struct matrix *m, CURL *h, struct mx_req *rq, const struct sent_to *to)
{
	char path[1400];
	cw_errmsg e;
	return to->portal[0] && member_path(m, to->portal, to->by, path, sizeof(path)) &&
	       req_setup(m, h, rq, "GET", path, to->by, NULL, NULL, &e) == CW_OK;
}

/* Whether the answer to ask_portal's question (cc, on h) says to->by is
 * out of the room (out_by: why says so then). */
static bool portal_answer(struct matrix *m, CURL *h, struct mx_req *rq, CURLcode cc, const struct sent_to *to,
			  char *why, size_t len)
{
	char ms[16];
	long status = 0;
	json_t *answer = NULL;
	cw_errmsg e;
	cw_err rc = req_done(m, h, rq, cc, &status, &answer, &e);
	membership_of(rc, answer, ms, sizeof(ms));
	return !rc && out_by(m, to->by, to->portal, ms, false, why, len);
}

/* The answer to a row's request: its Matrix event id is noted in the row.
 * *repeated: the homeserver has the reaction already (Synapse's 400
 * M_DUPLICATE_ANNOTATION: the same sender's annotation of the event with
 * the key, not redacted), which no retry changes and the room shows: the
 * row is delivered, its event the one there (the caller notes it).
 * *final: refused for good (refused_for_good). */
static cw_err finish_row(struct matrix *m, CURL *h, struct mx_req *rq, CURLcode cc, struct outbox_row *row,
			 long *code, bool *repeated, bool *final, cw_errmsg *e)
{
	long status = 0;
	json_t *answer = NULL;
	cw_err rc = req_done(m, h, rq, cc, &status, &answer, e);
	*code = status;
	*final = rc && refused_for_good(status, answer);
	const char *errcode = json_string_value(json_object_get(answer, "errcode"));
	*repeated = rc && status == 400 && errcode && strcmp(errcode, "M_DUPLICATE_ANNOTATION") == 0;
	if (*repeated)
		rc = CW_OK;
	const char *eid = json_string_value(json_object_get(answer, "event_id"));
	if (!rc && eid)
		note_event_id(row, eid);
	if (rc && status == 429) {
		/* M_LIMIT_EXCEEDED (rate_limited, set by req_done): the row's
		 * room waits that long; its other rooms go on. */
		row->retry_after_ms = rate_limited.wait_ms;
		cw_fail(e, CW_EIO, "homeserver rate limit (429 M_LIMIT_EXCEEDED): retry after %ld ms", row->retry_after_ms);
	}
	json_decref(answer);
	return rc;
}

/* One neutral room's rows of the batch: sent one after the other (a row
 * goes only once the one before it is acknowledged), while other rooms'
 * rows are in flight at the same time. */
struct room_run {
	int64_t room_id;       /* events.room_id (0: the row had no info) */
	size_t *idx;           /* the rows, in the batch's (id) order */
	size_t n, next;
	bool busy, failed;
	/* asking: its request in flight is the membership question after
	 * its next row's 403 (ask_portal), whose status and error are
	 * refused_code and refused_why (the row's failure, should the answer
	 * not say the sender is out) */
	bool asking;
	long refused_code;
	char refused_why[sizeof(((cw_errmsg *)0)->msg)];
	CURL *h;
	struct mx_req rq;
	struct sent_to to; /* the request's, a send's */
};

/* While the media worker fetches a file (mx_media_lookup), its row's room
 * is released, the attempt not counted, and claimed again after this. */
#define MX_MEDIA_WAIT_MS 300L

/* The rows of room r from its from-th on are given back untried, the
 * attempt not counted: outcome 2 (pending again), or 3 (due again after
 * wait_ms); the room goes no further in this batch.  Its next one on: they
 * wait for a file (3, MX_MEDIA_WAIT_MS), or for the homeserver to take the
 * as_token again (2: no try can fare better until the operator mends it,
 * and the dispatcher claims none meanwhile: matrix_ready, token_state). */
static void release_rest(struct room_run *r, struct outbox_row *rows, size_t from, int outcome, long wait_ms)
{
	r->failed = true;
	for (size_t k = from; k < r->n; k++) {
		rows[r->idx[k]].outcome = outcome;
		rows[r->idx[k]].retry_after_ms = wait_ms;
	}
}

/* Room r's next row fails with its error (an attempt counted, the backoff
 * after it); the room's later rows, never tried, are released (outcome 2:
 * pending again, the attempt not counted), and wait behind it, since the
 * claim takes no row of a room with one in flight or backing off (a row
 * that runs out of retries takes them with it, dead, as before).  Until
 * the forty-third session they failed with it, each an attempt: a
 * homeserver failing a send now and then charged every row queued behind
 * each failure, and a backlog of a busy room went to the dead letters
 * untried (a race test's finding: a message and its edits and redaction,
 * each send failing its first try, were dead after twelve failures of the
 * rows before them; the XMPP adapter already held such rows back). */
static void fail_rest(struct room_run *r, struct outbox_row *rows, long code, const char *why)
{
	r->failed = true;
	if (r->next >= r->n)
		return;
	struct outbox_row *row = &rows[r->idx[r->next]];
	row->outcome = -1;
	row->code = code;
	snprintf(row->why, sizeof(row->why), "%s", why);
	release_rest(r, rows, r->next + 1, 2, 0);
}

cw_err matrix_deliver(void *ctx, PGconn *c, const char *destination, struct outbox_row *rows, size_t n,
		      size_t *done, long *code, cw_errmsg *e)
{
	struct matrix *m = ctx;
	(void)destination;
	*done = 0;
	*code = 0;
	/* The Matrix event ids the homeserver gave are left in their rows
	 * (note_event_id: remote_id), where the batch's later rows that name
	 * an earlier one find them (in_batch), and which the dispatcher
	 * records with the outcome (cw_record).  Until then a crash loses the
	 * ids with the outcome: the rows are still in flight, go again, and
	 * their txnId or already_sent() finds the events sent. */
	json_t *made = json_object();
	struct room_run *runs = calloc(n, sizeof(*runs));
	size_t *idx = calloc(n, sizeof(*idx)), *run_of = calloc(n, sizeof(*run_of));
	int *info_of = calloc(n, sizeof(*info_of)); /* row k's line of info, or -1 */
	PGresult *info = NULL;
	cw_err rc = made && runs && idx && run_of && info_of ? CW_OK : cw_fail(e, CW_ENOMEM, "out of memory");
	if (!rc && !m->multi) {
		if (!(m->multi = curl_multi_init()))
			rc = cw_fail(e, CW_ENOMEM, "out of memory");
		else /* keep a connection per room in flight between batches */
			curl_multi_setopt(m->multi, CURLMOPT_MAXCONNECTS, (long)MX_ROOMS_IN_FLIGHT * 2);
	}
	if (!rc)
		rc = batch_info(c, rows, n, &info, e);
	if (rc) {
		json_decref(made);
		free(runs);
		free(idx);
		free(run_of);
		free(info_of);
		return rc;
	}
	/* Group the rows by room, keeping their order (rooms in the order of
	 * their first row; a row without info is a room of its own, to fail). */
	size_t nruns = 0;
	int from = 0;
	for (size_t k = 0; k < n; k++) {
		info_of[k] = info_row(info, k, &from);
		int64_t room = info_of[k] < 0 ? 0 : atoll(PQgetvalue(info, info_of[k], 10));
		size_t r = 0;
		while (r < nruns && (room == 0 || runs[r].room_id != room))
			r++;
		if (r == nruns)
			runs[nruns++].room_id = room;
		runs[r].n++;
		run_of[k] = r;
	}
	for (size_t r = 0, used = 0; r < nruns; r++) {
		runs[r].idx = idx + used;
		used += runs[r].n;
		runs[r].n = 0;
	}
	for (size_t k = 0; k < n; k++) {
		struct room_run *run = &runs[run_of[k]];
		run->idx[run->n++] = k;
	}

	int in_flight = 0;
	for (;;) {
		/* Start the next row of every idle room, up to the limit; none
		 * once the daemon is stopping or the homeserver refuses the
		 * as_token (what is in flight finishes, the rest is not tried
		 * and goes again). */
		bool stopping = (m->app && m->app->dispatcher && dispatcher_stopping(m->app->dispatcher)) ||
				atomic_load(&m->token_refused);
		for (size_t r = 0; r < nruns && in_flight < MX_ROOMS_IN_FLIGHT && !stopping; r++) {
			struct room_run *run = &runs[r];
			while (!run->busy && !run->failed && run->next < run->n) {
				size_t k = run->idx[run->next];
				cw_errmsg pe = { { 0 } };
				if (!run->h && !(run->h = curl_easy_init())) {
					fail_rest(run, rows, 0, "out of memory");
					break;
				}
				rate_limited.seen = false;
				token_refusal_seen = false;
				enum prep p = prep_row(m, c, rows, n, &rows[k], info, info_of[k], made, run->h, &run->rq,
						       &run->to, &pe);
				if (p == PREP_FAIL && token_refusal_seen) {
					release_rest(run, rows, run->next, 2, 0);
					break;
				}
				if (p == PREP_FAIL && rate_limited.seen) {
					/* a call of the preparation was limited: waited out,
					 * not counted */
					rows[k].retry_after_ms = rate_limited.wait_ms;
					char why[sizeof(pe.msg) + 64];
					snprintf(why, sizeof(why), "homeserver rate limit (429 M_LIMIT_EXCEEDED): %s", pe.msg);
					fail_rest(run, rows, 429, why);
					break;
				}
				if (p == PREP_DEAD) {
					/* dead at once, retries cannot help (outcome 5):
					 * the room's next rows go on */
					rows[k].outcome = 5;
					snprintf(rows[k].why, sizeof(rows[k].why), "%s", pe.msg);
					run->next++;
					continue;
				}
				if (p == PREP_FAIL) {
					fail_rest(run, rows, 0, pe.msg);
					break;
				}
				if (p == PREP_WAIT) {
					release_rest(run, rows, run->next, 3, MX_MEDIA_WAIT_MS);
					break;
				}
				if (p == PREP_NOTHING) {
					rows[k].outcome = 1;
					run->next++;
					continue;
				}
				if (p == PREP_DROP) {
					/* the user's room does not let that member in
					 * (banned, or the bot out: pe says which,
					 * join_refusal): its row goes as not delivered,
					 * the room's next rows go on */
					rows[k].outcome = 4;
					snprintf(rows[k].why, sizeof(rows[k].why), "%s", pe.msg);
					run->next++;
					continue;
				}
				curl_easy_setopt(run->h, CURLOPT_PRIVATE, run);
				if (curl_multi_add_handle(m->multi, run->h) != CURLM_OK) {
					req_free(&run->rq);
					fail_rest(run, rows, 0, "cannot start a request to the homeserver");
					break;
				}
				run->busy = true;
				in_flight++;
			}
		}
		if (in_flight == 0)
			break;
		int running = 0;
		curl_multi_perform(m->multi, &running);
		CURLMsg *msg;
		int left;
		bool any = false;
		while ((msg = curl_multi_info_read(m->multi, &left))) {
			if (msg->msg != CURLMSG_DONE)
				continue;
			struct room_run *run = NULL;
			curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&run);
			CURLcode cc = msg->data.result;
			curl_multi_remove_handle(m->multi, msg->easy_handle);
			in_flight--;
			any = true;
			if (!run)
				continue;
			run->busy = false;
			struct outbox_row *row = &rows[run->idx[run->next]];
			if (run->asking) {
				/* the membership question's answer (ask_portal):
				 * out of the room for as long as its admins want,
				 * the row is not delivered and the room's next rows
				 * go on; else the 403 fails it as any */
				run->asking = false;
				if (portal_answer(m, run->h, &run->rq, cc, &run->to, row->why, sizeof(row->why))) {
					row->outcome = 4;
					row->code = run->refused_code;
					run->next++;
				} else {
					fail_rest(run, rows, run->refused_code, run->refused_why);
				}
				continue;
			}
			long status = 0;
			bool repeated = false, final = false;
			cw_errmsg fe = { { 0 } };
			token_refusal_seen = false;
			if (finish_row(m, run->h, &run->rq, cc, row, &status, &repeated, &final, &fe) == CW_OK) {
				char eid[MX_ID_MAX + 1];
				/* a reaction the room has: its delete takes that one away */
				if (repeated && (repeated_reaction(c, rows, n, (size_t)(row - rows), eid, sizeof(eid)) ||
						 annotation_of(m, &run->to, eid, sizeof(eid))))
					note_event_id(row, eid);
				row->outcome = 1;
				row->code = status;
				run->next++;
			} else if (final) {
				/* refused for good (refused_for_good): say, a
				 * homeserver that takes smaller events than Matrix
				 * (the content is made to fit Matrix's limit) answers
				 * 413 M_TOO_LARGE on every try: dead at once (outcome
				 * 5), the room's next rows go on */
				char id[24];
				snprintf(id, sizeof(id), "%lld", (long long)row->id);
				if (status == 413)
					LOG_KV_LIMITED(CW_LOG_WARN, "the homeserver refused an event as too large",
						       "outbox_id", id, "detail", fe.msg);
				else
					LOG_KV_LIMITED(CW_LOG_WARN, "the homeserver refused a row's request for good",
						       "outbox_id", id, "detail", fe.msg);
				row->outcome = 5;
				row->code = status;
				snprintf(row->why, sizeof(row->why), "%s", fe.msg);
				run->next++;
			} else if (token_refusal_seen) {
				release_rest(run, rows, run->next, 2, 0);
			} else if (status == 403 && !stopping && ask_portal(m, run->h, &run->rq, &run->to)) {
				/* who acted there may be out of the room: asked
				 * while the other rooms go on (ask_portal); not
				 * once the daemon is stopping (the question could
				 * hold its stop up to the request's timeout): the
				 * row fails as any 403 and is asked after the
				 * start again */
				run->refused_code = status;
				snprintf(run->refused_why, sizeof(run->refused_why), "%s", fe.msg);
				curl_easy_setopt(run->h, CURLOPT_PRIVATE, run);
				if (curl_multi_add_handle(m->multi, run->h) != CURLM_OK) {
					req_free(&run->rq);
					fail_rest(run, rows, status, fe.msg);
				} else {
					run->busy = run->asking = true;
					in_flight++;
				}
			} else {
				fail_rest(run, rows, status, fe.msg);
			}
		}
		if (!any)
			curl_multi_poll(m->multi, NULL, 0, 1000, NULL);
	}
	for (size_t r = 0; r < nruns; r++) {
		if (runs[r].h)
			curl_easy_cleanup(runs[r].h);
		json_decref(runs[r].to.content);
	}
	for (size_t k = 0; k < n; k++)
		if (rows[k].outcome == 0)
			rows[k].outcome = 2; /* not tried: the daemon is stopping, or the token is refused */
	PQclear(info);
	json_decref(made);
	free(runs);
	free(idx);
	free(run_of);
	free(info_of);

	/* The rows' event ids (note_event_id) are recorded with their
	 * outcomes (cw_record), not here. */
	/* The outcome per row (rows[].outcome); *done and the return say the
	 * same of the first rows, for the log. */
	rc = CW_OK;
	while (*done < n && (rows[*done].outcome == 1 || rows[*done].outcome >= 4)) /* 4, 5: settled */
		(*done)++;
	if (*done < n) {
		*code = rows[*done].code;
		rc = cw_fail(e, CW_EIO, "%s", rows[*done].why[0] ? rows[*done].why : "not delivered");
	}
	return rc;
}
