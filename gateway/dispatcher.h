/* The dispatcher: claims due outbox rows and hands them, in order, to the
 * adapter of their destination; records the outcome (delivered, or a retry
 * with exponential backoff and jitter, dead after the retry budget). */
#ifndef CW_DISPATCHER_H
#define CW_DISPATCHER_H

#include "cw.h"
#include "store.h"
#include <jansson.h>
#include <libpq-fe.h>

/* The last_error of a typing notification expired unsent, older than
 * dispatcher.typing_stale_ms: a lane's expire() and a pull's answer
 * (peer_pull.c) write the same words. */
#define CW_TYPING_STALE_ERROR "typing notification too old to be shown: not sent"

struct cw_app;
struct dispatcher;
struct policy_live;

/* One claimed outbox row, with what an adapter needs to deliver it. */
struct outbox_row {
	int64_t id;
	char destination[300];
	int attempts;
	int64_t event_id;   /* events.id */
	int64_t target_id;  /* the recipient's identity for a per-user row, else 0 */
	json_t *event; /* the neutral event as the far side sees it (owned) */
	/* An adapter that delivers rows out of their order (rooms at the same
	 * time) says per row: 1 delivered, -1 not (code, why), 2 not tried
	 * (released: pending again, the attempt not counted), 3 not yet (the
	 * same, due again after retry_after_ms: the adapter is getting
	 * something ready for it), 4 refused for good by the recipient's side
	 * (dropped now, why recorded, never tried again: the rows after it go
	 * on), 5 never deliverable: no event of the destination's kind can
	 * be made of it (dead now, why recorded, the rows after it go on);
	 * 0 everywhere:
	 * *done tells, as for any adapter.  A failed row's later rows of the
	 * same room must fail too, or be given back untried (2, 3: the claim
	 * takes no row of a room with one in flight or backing off, so they
	 * wait behind it); the dispatcher never lets a room's row overtake
	 * an earlier one.  A row delivered (1) has code 0 or the 2xx that
	 * took it; one done without the far side (nothing to send it as),
	 * -1: it tells nothing of the far side's pace. */
	int outcome;
	long code;
	char why[512];  /* as long as a cw_errmsg */
	/* Not delivered: how long the far side asked to be left alone first
	 * (the Retry-After of a 429 or 503: outbox_retry_after_ms), in ms; 0:
	 * the usual backoff.  Set on each failed row (a whole-batch failure: on
	 * the rows from *done on).  A 429 (the far side is up and asks for
	 * less) is not counted against the retry budget. */
	long retry_after_ms;
	bool expired;   /* its event was expired (events.expired): expired, never sent */
	/* Its event's type is "typing", as the claim found it: the dispatcher
	 * asks for every row of a batch (stale_typing), and looked up in the
	 * event's tree, out of the cache by then, that was 1.8 % of the
	 * dispatcher thread on tests/bench/xmpp's release (docs/performance.md,
	 * "Fifty-first session"). */
	bool typing;
	/* When its event was accepted (ms), from the claim's column: read by
	 * stale_typing, which until the sixty-first session read the tree's
	 * accepted_ts, a member a destination may do without
	 * (dispatcher_opts.local_omits). */
	int64_t accepted_ms;
	/* Delivered (outcome 1, or among the *done rows): the id the far side
	 * gave it (a Matrix event id), "" if none.  The record of its outcome
	 * writes it, in the same statement and row version, to
	 * outbox.remote_id and to event_native_ids (its destination as the
	 * network, kind 'event_id': only the Matrix adapter, destination
	 * "matrix", sets it).  Until the fifty-fourth session matrix_deliver
	 * wrote both in a statement of its own before the record: each
	 * delivered row updated twice, a statement and a commit more a batch
	 * (docs/performance.md, "Fifty-fourth session"). */
	char remote_id[256];
};

/* The wait a far side asked for, given in seconds (a Retry-After header),
 * in milliseconds (Matrix's retry_after_ms), or both (the longer counts;
 * 0 or less: not given), as a row's retry_after_ms: at most an hour, so
 * that a mistaken or hostile answer does not park a backlog for days. */
long outbox_retry_after_ms(int64_t secs, int64_t ms);

/* The event as a peer receives it (pushed or pulled), from row `row` of r
 * whose columns from `col` on are: the event's public id, its content
 * (text), the room's URI, the room's public id, the sender's URI, the
 * acceptance time (ms) and the event's ts.  A new reference; NULL when
 * memory ran out, or (*unreadable set) when the stored content does not
 * parse: a number stored before the thirtieth session that jansson cannot
 * read (1e19, kept by jsonb as 20 digits).  Until then such an event went
 * out as a shell (ids, no content) and was marked delivered. */
json_t *outbox_event_json(PGresult *r, int row, int col, bool *unreadable);

/* The members of outbox_event_json's tree that a destination may do
 * without (dispatcher_opts.local_omits): the room's public id, the
 * acceptance time, and ts where the sender gave none.  id, room (the
 * dispatcher's order), sender and the stored event are always there. */
enum outbox_member { OUTBOX_ROOM_ID = 1, OUTBOX_ACCEPTED_TS = 2, OUTBOX_TS = 4 };
/* outbox_event_json without the members in omit (enum outbox_member). */
json_t *outbox_event_json_omit(PGresult *r, int row, int col, unsigned omit, bool *unreadable);

/* Makes outbox row `row` (its id), in flight to destination under
 * claimed_by, whose stored event (public id `event`, for the log line)
 * does not parse (outbox_event_json) a dead letter, with a log line: it
 * can never be sent (a replay fails the same way), and its room's later
 * rows go on.  Its sender is not told in the chat, as with the dispatcher's
 * other never-deliverable rows (marked told): dispatcher_dead_text's "the
 * operator can send it again" is not true of it.  Until the thirty-first
 * session the row was found by its event and destination.  Returns how
 * many rows it changed (0 or 1), -1 with e set if the database failed. */
long outbox_dead_unreadable(PGconn *c, const char *row, const char *event, const char *destination,
			    const char *claimed_by, cw_errmsg *e);

/* An adapter's delivery: rows are in order (per room) for one destination.
 * *done: how many rows, from the first, the far side acknowledged; CW_OK
 * when all of them, otherwise e says why the next one failed and *code
 * holds its HTTP status (0: no answer).  c is the delivering lane's own
 * connection (autocommit), for its lookups and its own records (rooms,
 * members); a delivered row's remote id goes in the row, and the
 * dispatcher records it with the outcome (cw_record).  Two
 * lanes may call a deliver_fn at once, never for the same destination. */
typedef cw_err (*deliver_fn)(void *ctx, PGconn *c, const char *destination, struct outbox_row *rows,
			     size_t n, size_t *done, long *code, cw_errmsg *e);

struct dispatcher_opts {
	const char *url;          /* database */
	const char *name;         /* host:pid:random; a lane's claimed_by adds /N */
	int batch_max;
	int lanes;                /* destinations delivered to at once, each on a thread and a connection */
	int retry_budget;
	long retry_base_ms;
	long retry_max_ms;
	long typing_stale_ms;     /* typing rows older than this are expired, not sent (0: never) */
	long claim_timeout_s;
	/* A lane's connection, lost, is tried again after 250 ms, then twice
	 * as long each time up to this (database.reconnect_max_ms; 0: 5 s). */
	long reconnect_max_ms;
	/* What one claim holds at most of its rows' stored events, in bytes
	 * (each counted as its text plus 512; always at least one row):
	 * server.max_body_bytes, as a pull answer (0: 1 MiB).  Since the
	 * thirtieth session; until then 250 rows of 60 KB were all held at
	 * once, per lane. */
	long claim_bytes;
	deliver_fn peer_deliver;  /* destinations "peer:*" */
	void *peer_ctx;
	deliver_fn local_deliver;  /* destination local_destination: the local adapter (NULL: none) */
	void *local_ctx;
	const char *local_destination; /* "matrix" or "xmpp" */
	/* The members of the claim's trees (enum outbox_member) the local
	 * adapter never reads: its rows' trees are made without them (0:
	 * all made).  Since the sixty-first session (the XMPP adapter's
	 * XA_CLAIM_OMITS): making, hashing and freeing them was some 0.3 µs
	 * of the 12 a message of tests/bench/xmpp (docs/performance.md). */
	unsigned local_omits;
	/* Whether the local adapter can deliver from this process now (NULL:
	 * always): while not, its rows are left to other processes, not
	 * claimed and refused (an XMPP process whose streams another process
	 * holds, or whose streams are down). */
	bool (*local_ready)(void *local_ctx);
	/* The policy in force (NULL: none), which decides again what a lane
	 * claims while the recheck of a change is not over, and what it puts
	 * back to waiting after a change came during its claim
	 * (policy_live_stamp). */
	struct policy_live *policy;
};

cw_err dispatcher_start(struct dispatcher **out, const struct dispatcher_opts *o, cw_errmsg *e);
/* Stops and joins the lanes' threads (idempotent; NULL is fine).  The stats stay
 * readable until dispatcher_free. */
void dispatcher_stop(struct dispatcher *d);
void dispatcher_free(struct dispatcher *d);
struct dispatcher_stats {
	uint64_t delivered;      /* outbox rows acknowledged by their destination */
	uint64_t retried;        /* rows whose attempt failed and will be tried again */
	uint64_t dead;           /* rows that ran out of attempts */
	uint64_t expired;        /* typing rows too old to be sent (best-effort) */
	uint64_t requests_ok;    /* delivery requests answered 2xx */
	uint64_t requests_failed;
	uint64_t claims;         /* claim transactions that found rows */
	uint64_t claim_tries;    /* claim transactions, whatever they found */
	uint64_t pauses;         /* destinations paused after a slow claim that found nothing */
	uint64_t renewals;       /* renewals of this process's claims during long deliveries */
	uint64_t rate_limited;   /* rows answered 429: tried again after the wait asked, not counted */
};
void dispatcher_get_stats(struct dispatcher *d, struct dispatcher_stats *st);

/* True while asked to stop (adapters abort long transfers on it). */
bool dispatcher_stopping(const struct dispatcher *d);

/* What a notice to a message's writer quotes of it: the first 60
 * characters of the text of the stored event E (SQL, its content column),
 * with an ellipsis when there was more; NULL when it has none.  The look
 * below takes it from a dead letter's event, and the recheck's drop of a
 * row for a block (gateway/policy_live.c, recheck_drop_sql) keeps it in
 * outbox.sender_quote before it erases the content: one text for both. */
#define DISPATCHER_QUOTE(E)                                                                      \
	"(SELECT CASE WHEN length(b) > 60 THEN left(b, 60) || '\u2026' ELSE b END FROM (SELECT " E \
	"->'content'->'parts'->0->>'body' AS b) x)"

/* The rows whose local sender, a user of network (matrix, xmpp), is owed a
 * notice and was not told yet, to destination (NULL: any), at most 50 of
 * each kind:
 * dead letters, and since the fifty-ninth session the rows the recheck
 * dropped as they waited because their remote recipient blocked her
 * (outbox.sender_quote, schema/054), until then dropped without a word.
 * Marked told in a transaction this begins (the quote kept for a drop
 * cleared; a drop's row, since the sixty-first session, with the time of
 * its drop, the mark that keeps a later row of its message from a second
 * notice), and locked, which the caller ends with dispatcher_dead_told
 * once it has told them (told at least once, by one process: a lost
 * answer leaves them to tell again).  Per row: outbox id, destination,
 * attempts, event type, the sender's native room of the conversation
 * (the binding of the event's room, NULL when there is none), the remote
 * user's local part there, the sender's native id, and the event's
 * native id on network (NULL: none), the first 60 characters of its text
 * (NULL: none), the row's state (dead, dropped), and since the sixtieth
 * session the room's kind (direct, group) and public id, and for a row
 * with no native room of hers (the first NULL) her Matrix management room
 * (NULL: none, or not Matrix) and, not in a group, the remote user's URI:
 * where and about whom to tell her instead; the room's name (its public
 * id when it has none).  NULL result on failure (e set).  c has
 * dispatcher_dead_stmts prepared (store_prepare_all): the look runs in
 * each adapter's loop (an XMPP component's once a second while its stream
 * is up), and its planning cost 3 ms. */
extern const struct store_stmt dispatcher_dead_stmts[];
PGresult *dispatcher_dead_untold(PGconn *c, const char *network, const char *destination, cw_errmsg *e);
/* Ends dispatcher_dead_untold's transaction: commits the rows' marks when
 * told (the telling queued or sent), else rolls them back. */
cw_err dispatcher_dead_told(PGconn *c, bool told, cw_errmsg *e);
/* What row i of a dispatcher_dead_untold result tells its writer (into
 * buf): "Not delivered ("quote"): <peer> could not be reached (...)" for a
 * dead letter, "Not delivered ("quote"): this person blocked you." for a
 * drop by a block, the words of the refusal of what she writes after it.
 * Until the fifty-ninth session it took the row's columns one by one. */
void dispatcher_dead_text(char *buf, size_t len, const PGresult *r, int i);

#endif
