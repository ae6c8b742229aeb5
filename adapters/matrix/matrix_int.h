/* The Matrix adapter's insides, shared by matrix.c (appservice API) and
 * mx_deliver.c (the homeserver client and delivery). */
#ifndef CW_MATRIX_INT_H
#define CW_MATRIX_INT_H

#include "matrix.h"
#include "matrix/mx_id.h"
#include "matrix/mx_map.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>

#ifndef MX_ID_MAX
#define MX_ID_MAX 255
#endif
#define TXN_RECENT_MAX 64
#define MX_OUTBOX_KEY "org.causeway.outbox_id"
/* With MX_OUTBOX_KEY, on the extra events of a row with several files. */
#define MX_PART_KEY "org.causeway.part"

#define MX_MEDIA_WORKERS 4 /* the media worker's threads (mx_media.c) */

struct matrix {
	struct cw_app *app;
	const struct cw_config *cfg;
	char bot[MX_ID_MAX + 1];
	unsigned char hs_token_hash[32]; /* sha256 of matrix.hs_token */
	pthread_mutex_t mu;          /* the recent transactions, the health */
	pthread_key_t curl_key;      /* each thread's HTTP client to the homeserver */
	CURLM *multi;                /* the dispatcher's deliveries, several rooms at a time (its thread only) */
	unsigned char recent[TXN_RECENT_MAX][32];
	bool recent_used[TXN_RECENT_MAX];
	int recent_next;
	/* health */
	char ping_state[16];         /* pending, ok, failed, unsupported */
	long ping_ms;
	char last_error[256];        /* the homeserver's last refusal (M_FORBIDDEN, M_UNKNOWN_TOKEN, ...) */
	pthread_t ping_thread;
	bool ping_started;
	/* The homeserver refused the as_token (401 M_UNKNOWN_TOKEN or
	 * M_MISSING_TOKEN, to any call): the delivery is held (matrix_ready
	 * false, its rows wait untried and uncounted) until a call is answered
	 * 2xx again, which the ping's thread asks for (ping_main).  Set and
	 * cleared under mu (signalled on ping_cond), read anywhere;
	 * token_refused_ms: since when (wall ms), under mu. */
	atomic_bool token_refused;
	int64_t token_refused_ms;
	/* Set under mu (and signalled with ping_cond): the daemon is stopping,
	 * nothing is tried again, and the call in flight ends (mx_call_stop_on). */
	atomic_bool ping_stop;
	pthread_cond_t ping_cond;
	json_t *typing;              /* room -> who types there now (m.typing gives the whole list) */
	json_t *profile_failed;      /* sender identity id -> when its ghost's profile last failed (ms), under mu */
	/* Matrix room -> until when (wall ms) no more notice of a rate limit
	 * is told there (matrix.c, limit_notice_due), at most
	 * MX_LIMIT_TOLD_MAX rooms; under mu. */
	json_t *limit_told;
	/* The media worker (mx_media.c): peers' files fetched and uploaded off
	 * the delivery lane by MX_MEDIA_WORKERS threads, at most one file of a
	 * signer at a time, the signers in turn; its queue and what it knows,
	 * under mu. */
	pthread_t media_threads[MX_MEDIA_WORKERS];
	int media_started;           /* threads started */
	atomic_bool media_stop;
	pthread_cond_t media_cond;
	json_t *media_queue;         /* [[attachment, ghost, signer], ...], at most MX_MEDIA_QUEUE_MAX */
	json_t *media_turns;         /* signer ("" for none) -> {"busy", "turn"}: whose file is in hand, whose turn was last */
	pthread_mutex_t media_db_mu; /* the workers' one database connection (media_db), taken briefly */
	PGconn *media_db;
	json_t *media_state;         /* state_key (signer, sha256, size, URL) -> {"s": "queued" | "notice" | "retry", "why"} */
	pthread_t bot_thread;
	bool bot_started;
	atomic_bool bot_stop;
	int bot_wake[2];             /* a pipe, written by mx_bot_stop alone: the bot's waits end at once */
	/* Rooms a ghost is joining (mx_bot.c: what the user wrote meanwhile
	 * is read back from the homeserver and stored): a transaction with
	 * events of one is parked, its request suspended, until the
	 * catch-up is over, so that what the user wrote later is stored
	 * later.  Under mu. */
	json_t *catching_up;         /* Matrix room -> how many catch-ups run there */
	/* "<Matrix room> <user>" of the joins a transaction carries, from its
	 * read of the member's stored membership to the end of its write
	 * (matrix.c, hold_joins).  Under mu, signalled on joining_cond. */
	json_t *joining;
	pthread_cond_t joining_cond;
	struct app_job *parked;      /* in arrival order (linked through their txn) */
	bool parking_closed;         /* the daemon is stopping: nothing waits */
	/* transactions answered once durable, and repeats answered from memory;
	 * their events by outcome (MX_EV_*) */
	atomic_ullong txns, txn_repeats, events[4];
};

enum { MX_EV_ACCEPTED, MX_EV_REFUSED, MX_EV_INVALID, MX_EV_IGNORED };

/* SQL: whether the Matrix id key (an expression of text) is a ghost's,
 * in the namespace as mx_in_ghost_namespace reads it: prefix is a
 * parameter holding "@" and matrix.user_prefix, server one holding the
 * server name (each as the statement spells it, "$4" or "$4::text").
 * One spelling for the transaction path's (matrix.c, txn_bot_send) and
 * the bot's (mx_bot.c, INBOX_NEWCOMER): until the fifty-fifth session
 * each wrote its own, with its own parameter numbers. */
#define MX_GHOST_SQL(key, prefix, server)                                                                    \
	"(starts_with(" key ", " prefix ") AND length(" key ") >= length(" prefix ") + length(" server ") + 1 " \
	"AND right(" key ", length(" server ") + 1) = ':' || " server ")"

const char *mx_server_name(const struct cw_config *cfg);
/* The length of matrix.homeserver_url without its trailing slashes: every
 * request's URL is that prefix and an absolute path. */
size_t mx_hs_base_len(const struct cw_config *cfg);
/* The destructor of a thread's homeserver client. */
void mx_curl_release(void *c);
void mx_error(struct cw_req *req, int status, const char *errcode, const char *msg);
bool mx_txn_seen(struct matrix *m, const unsigned char key[32]);
void mx_txn_remember(struct matrix *m, const unsigned char key[32]);
/* Stops the thread registering the bot and pinging the homeserver (which
 * tries again until both are done); waits for it. */
void mx_ping_stop(struct matrix *m);
bool mx_rename_portal(struct matrix *m, PGconn *c, const char *room, const char *binding, const char *name,
		      long *status, long *wait_ms);
/* Whether target (an invited member of the group neutral_room, bound to
 * their portal room) has joined it, as the homeserver says: their join
 * event taken as a pushed one (mx_backfill: marked joined, the peer told
 * once), true then. */
bool mx_mark_if_joined(struct matrix *m, PGconn *c, const char *room, const char *neutral_room,
		       const char *target_id, const char *target_mxid);
/* Marks identity_id, invited to the group room_id (row ids), joined, under
 * the room's lock of every write of events, in a short transaction of its
 * own on c (which must be in none): the one mark of an invitee's join. */
cw_err mx_mark_joined(PGconn *c, const char *room_id, const char *identity_id, cw_errmsg *e);
/* Whether the homeserver takes the bot at all (GET /account/whoami as
 * the bot answers 200): a 403 in one room is that room's only then. */
bool mx_bot_taken(struct matrix *m);
/* After mx_ensure_portal failed (rc, its *status): when the homeserver
 * refused the portal's invitation for good (403/404, while it takes the
 * bot), it ends as a decline does: the member (neutral_room, target_id)
 * marked left, the room the making left behind left, its alias deleted;
 * true then.  why: the failure's text, for the log. */
bool mx_portal_refusal_ends(struct matrix *m, PGconn *c, const char *neutral_room, const char *target_id,
			    const char *target_mxid, cw_err rc, long status, const char *why);
/* The portal of group neutral_room (its id) for the local user target_id
 * (Matrix id target_mxid): made by the bot with the user invited, bound;
 * its room id and binding id out.  Made once: a portal bound meanwhile
 * takes the new one's place.  Once bound, the homeserver is asked whether
 * the user joined it already (mx_mark_if_joined: a join before the
 * binding marked nothing).  *wait_ms (unless NULL): after a createRoom
 * answered 429 M_LIMIT_EXCEEDED, the wait it asked for, else 0; *status
 * (unless NULL): the homeserver's last answer to the making (0: none). */
cw_err mx_ensure_portal(struct matrix *m, PGconn *c, const char *neutral_room, const char *name,
			const char *target_id, const char *target_mxid, char *room, size_t rlen, char *binding,
			size_t blen, long *wait_ms, long *status, cw_errmsg *e);
/* POST /rooms/{room}/<action> ("join" or "leave", no body) as user (NULL:
 * the bot). */
cw_err mx_room_action(struct matrix *m, const char *room, const char *user, const char *action, cw_errmsg *e);
/* The same with a body (taken) and the answer's status ("invite", "kick"). */
cw_err mx_room_post(struct matrix *m, const char *room, const char *user, const char *action, json_t *body,
		    long *status, cw_errmsg *e);
/* Any call on /rooms/{room}/<what> (e.g. "members", "state/m.room.name/"):
 * method, query (may be NULL), body (may be NULL; taken), *answer (may be
 * NULL) as mx_call's. */
cw_err mx_room_call(struct matrix *m, const char *method, const char *room, const char *user, const char *what,
		    const char *query, json_t *body, long *status, json_t **answer, cw_errmsg *e);
/* Registers the bot with the homeserver: true when it is (or was before). */
bool mx_register_bot(struct matrix *m, cw_errmsg *e);
/* Registers (and names) the ghost of a remote user (its binding is written
 * when it first delivers). */
cw_err mx_register_ghost(struct matrix *m, const char *peer, const char *localpart, const char *display,
			 const char *ghost, cw_errmsg *e);
/* Who typed in room at the last m.typing of a stored transaction (a copy).
 * mx_typing_diff: who stopped, from the list in seen (room -> list: what
 * this transaction saw so far) or else the stored one, to now's list, which
 * it puts in seen; mx_typing_keep stores seen once the transaction is
 * durable (after its commit), so a transaction that fails, or a step that runs again, sees the
 * same starting point. */
json_t *mx_typing_before(struct matrix *m, const char *room);
json_t *mx_typing_diff(struct matrix *m, json_t *seen, const char *room, json_t *now);
void mx_typing_keep(struct matrix *m, json_t *seen);
/* Events the homeserver did not push, fetched from it (a room's
 * /messages), taken as a transaction of them would be; waits at most
 * timeout_ms for them to be stored (matrix.c). */
cw_err mx_backfill(struct matrix *m, json_t *events, int timeout_ms, cw_errmsg *e);
/* A catch-up of room begins (begin) or ends; at its end the transactions
 * parked for it are started (matrix.c). */
void mx_catch_up(struct matrix *m, const char *room, bool begin);

/* The bot's thread (mx_bot.c). */
void mx_bot_start(struct matrix *m);
void mx_bot_stop(struct matrix *m);
/* A notice to a local user in a bridged room, from the room's ghost: what
 * they wrote there was not delivered, and why.  Stored (matrix_notices,
 * a write of its own) and sent by the bot's thread until the homeserver
 * takes it.  event_id (NULL: none) is the Matrix event it tells of: one
 * notice per event, however often its transaction comes. */
void mx_bot_notice(struct matrix *m, const char *room, const char *text, const char *event_id);

/* One call to the homeserver's client-server API as the appservice
 * (as_token), acting as user_id (NULL: the bot).  path is already escaped;
 * query may be NULL; body may be NULL (taken: released by the call).  *status is the HTTP status (0: no
 * answer); *answer the parsed JSON answer (may be NULL). */
cw_err mx_call(struct matrix *m, const char *method, const char *path, const char *user_id, const char *query,
	       json_t *body, long *status, json_t **answer, cw_errmsg *e);
/* This thread's mx_call calls end (no answer: status 0) once *stop is set
 * (NULL: never; libcurl asks at least once a second while it waits), so
 * that a homeserver that does not answer holds its stop a second, not its
 * MX_TIMEOUT_MS, 10 s, per call (the bot's thread: mx_bot_stop; the
 * ping's: mx_ping_stop).  Such a call fails "not answered before the stop". */
void mx_call_stop_on(atomic_bool *stop);
/* libcurl's code for this thread's last call (CURLE_OK: answered, with
 * whatever status), which tells apart the calls of status 0: a connection
 * refused or a name not resolved (CURLE_COULDNT_CONNECT,
 * CURLE_COULDNT_RESOLVE_HOST: the homeserver down, or not reachable from
 * here) from an answer not come in time (CURLE_OPERATION_TIMEDOUT) or a
 * connection closed unanswered (CURLE_GOT_NOTHING); CURLE_FAILED_INIT
 * for a call that failed before libcurl ran (out of memory).  Since the
 * sixty-first session (mx_bot.c, request_paused). */
CURLcode mx_last_call_code(void);
/* The wait (ms) the last 429 answer of this thread's calls asked for: its
 * retry_after_ms or Retry-After header, the longer (0: it said none). */
long mx_rate_limited_wait_ms(void);
/* The wait (ms) a 429 answer (answer: its body, c: its handle, which
 * holds its Retry-After) asks for: its retry_after_ms or Retry-After, the
 * longer (0: it said none). */
long mx_limit_wait_ms(CURL *c, const json_t *answer);
/* This thread's calls met a 429 asking wait_ms, as if one of its own
 * calls had been answered it (mx_rate_limited_wait_ms, and a delivery's
 * row is not counted against its retry budget): the media worker's upload
 * answered 429, told to the delivery lane that asks for the file. */
void mx_rate_limited_note(long wait_ms);
/* Whether a failed call's status (0: no answer) is the homeserver's of
 * the moment, the work to be tried again: no answer, a 5xx, a 429, a 408
 * (a timeout) or a 401 (M_UNKNOWN_TOKEN, M_MISSING_TOKEN: the as_token not
 * taken, the operator's to fix; the same for every call: mx_all_refused).
 * Another 4xx (403 M_FORBIDDEN: not in the room, banned; 404) is its
 * answer, the same on every try.  Until the fiftieth session a ghost's
 * leave of a group and a portal's rename answered 401 counted as done. */
static inline bool mx_for_now(long status)
{
	return status < 400 || status >= 500 || status == 401 || status == 408 || status == 429;
}
/* Whether the next call would fare no better (no answer, 429, 401). */
static inline bool mx_all_refused(long status)
{
	return status == 0 || status == 401 || status == 429;
}

/* Media (mx_media.c). */
enum mx_rehost { MX_REHOST_OK, MX_REHOST_NOTICE, MX_REHOST_RETRY, MX_REHOST_WAIT, MX_REHOST_UNWANTED };
#define MX_MEDIA_STATE_MAX 10000 /* what the worker remembers of files (media_state) */
#define MX_MEDIA_QUEUE_MAX 1000  /* files queued for the worker (media_queue); below MX_MEDIA_STATE_MAX */
#define MX_MEDIA_QUEUE_PER_SIGNER 250 /* of those, one signer's: the others still find room */
/* A peer's attachment (the neutral attachment object, https://) on the
 * homeserver, uploaded as ghost once, fetched signed only when its host is
 * under signer, the domain of the peer whose user sent it (NULL: never;
 * media_fetch_peer): its mxc:// URI into mxc (OK); or why
 * it cannot be carried, for the text that goes instead (NOTICE: too large,
 * gone, a wrong checksum); or RETRY, e says why (the peer's server or the
 * homeserver is away: the row goes again later); or UNWANTED: event_id,
 * the event whose row asked for it, no longer wants it (expired, dropped,
 * its content gone: nothing uploaded, nothing recorded).  *limited_ms:
 * with RETRY after the homeserver answered the upload 429 M_LIMIT_EXCEEDED,
 * the wait it asked for (mx_limit_wait_ms: 0 when it said none), else -1. */
enum mx_rehost mx_rehost(struct matrix *m, int64_t event_id, const char *ghost, const char *signer,
			 const json_t *att, char *mxc, size_t len, char *why, size_t wlen, long *limited_ms,
			 cw_errmsg *e);
/* The same answer without waiting on a far side (for the delivery lane):
 * OK when the file is on the homeserver already (its size as fetched into
 * *size unless NULL: at most what att declares, maybe less), NOTICE or RETRY when the
 * worker found so (a RETRY is forgotten once told: the next asks again),
 * or when its queue is full (MX_MEDIA_QUEUE_MAX, or MX_MEDIA_QUEUE_PER_SIGNER
 * of the signer's; a RETRY of an upload answered 429 is noted as this
 * thread's 429, mx_rate_limited_note), WAIT when the worker
 * has it queued now (and queues it if not: for event_id, the event of
 * the row that asks, which the worker looks at again before it fetches
 * and uploads the file and records it: mx_rehost). */
enum mx_rehost mx_media_lookup(struct matrix *m, PGconn *c, int64_t event_id, const char *ghost, const char *signer,
			       const json_t *att, char *mxc, size_t len, json_int_t *size, char *why, size_t wlen,
			       cw_errmsg *e);
/* mx_media_lookup's answer for a file not on the homeserver: what the
 * worker found of att (an https:// URL), or WAIT when it has it queued
 * now (and queues it if not).  Under no lock; takes mu. */
enum mx_rehost mx_media_ask(struct matrix *m, int64_t event_id, const char *ghost, const char *signer,
			    const json_t *att, char *why, size_t wlen, cw_errmsg *e);
void mx_media_start(struct matrix *m);
/* Stops the media workers and waits for them (a transfer in flight ends
 * within a second once app->stopping is set); again: nothing. */
void mx_media_stop(struct matrix *m);

#endif
