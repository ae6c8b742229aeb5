/* The outbox dispatcher: its lanes, each a thread. */
#include "config.h"
#include "dispatcher.h"
#include "buf.h"
#include "log.h"
#include "policy_live.h"
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Serialises claims across daemon processes: together with the "no earlier
 * row of this room in flight or backing off" condition it keeps per-room
 * order however many processes dispatch. ("causeway" + 1) */
#define CLAIM_LOCK_KEY "7161132091431352698"

/* A lane delivers to one destination at a time, on a thread and a
 * database connection of its own.  Lanes never hold the same destination
 * at once (held, below), so a destination's rows keep their order as with
 * one thread, while a destination that answers slowly, or not at all until
 * the request times out, holds up only its own lane. */
struct lane {
	struct dispatcher *d;
	pthread_t thread;
	PGconn *c;
	struct store_canceller cancel; /* c's statement, cancelled at a stop that waits for it */
	unsigned next; /* where its next claim starts in the destination list */
	/* When its last claim began, or the keeper last renewed the rows it
	 * delivers (cw_now_us, read before the claim's or the renewal's
	 * statement): its rows are its own for claim_timeout_s after.  The
	 * lane writes it as a claim begins, the keeper after a renewal. */
	atomic_int_fast64_t claimed_us;
	bool started;
	/* claimed_by of its rows: the process's name and the lane's number,
	 * so that rows claimed by this lane alone can be told apart (see
	 * orphans) */
	char name[320];
	/* The ids of rows its last claim may have taken without knowing it
	 * (the claim's COMMIT sent, its answer lost), released before its
	 * next claim; NULL for none. */
	int64_t *orphans;
	size_t norphans;
	/* Whether it has connected before, and the dispatcher's count of
	 * reconnections when it last took back its own rows (adopt_own_rows). */
	bool connected_once;
	uint_fast64_t adopted_at;
	struct store_backoff backoff; /* the pace of its connects while the database is away */
	/* policy_live_facts's count as its last claim began (see
	 * screen_failed). */
	uint64_t facts;
	char held[sizeof(((struct outbox_row *)0)->destination)]; /* its destination, "" for none (under d->mu) */
	const struct outbox_row *rows; /* the rows it delivers, for the keeper (under d->mu) */
	size_t nrows;
	uint64_t gen; /* counts the lane's deliveries: which one a renewal was of (under d->mu) */
	uint64_t renewing; /* the keeper's: the delivery (gen) its renewal under way covers, 0 for none */
};

/* A destination whose last claim scanned long and found nothing: no lane
 * claims it again before until_us (see claim). */
struct pause {
	char dest[sizeof(((struct outbox_row *)0)->destination)];
	int64_t until_us;
};

/* A claim that finds nothing in at least this long pauses its destination
 * for PAUSE_FACTOR times as long, at most PAUSE_MAX_US. */
#define CLAIM_SLOW_US 2000
/* A claim's bound in bytes (dispatcher_opts.claim_bytes): each row counts
 * its stored event's text plus this, for what is added and held beside it. */
#define CLAIM_EVENT_OVERHEAD "512"
#define CLAIM_BYTES_DEFAULT (1024L * 1024)
/* The text of the stored event of id (an SQL expression: the claimed
 * row's event id) without the members that outbox_event_json and
 * claim_destination set from the row's columns whatever the text says
 * (id, room, room_id, sender, accepted_ts, and type where it is the
 * column's): the daemon parses each claimed event whole with jansson, at
 * a cost that goes with its members, and parsed those only to replace
 * them (in tests/bench/xmpp the sender's URI and the type, 55 of an
 * event's 136 bytes: 0.7 of the 2.3 µs a row took to parse, set and
 * free; docs/performance.md, "Forty-ninth session").  A stored event is
 * an object (events_content_check), which jsonb's "-" needs.  The stored
 * content is read once: the type is looked at in what the first "-"
 * made (OFFSET 0 keeps it one value); a second reference to the column
 * read a large event's TOAST twice (test_peer_api.py::
 * test_a_claim_reads_the_events_it_takes_not_every_due_one). */
#define CLAIM_EVENT_TEXT(id)                                                                                \
	"(SELECT (x.c - CASE WHEN x.c->>'type' = x.t THEN 'type' ELSE '' END)::text FROM (SELECT "            \
	"se.content - ARRAY['id', 'room', 'room_id', 'sender', 'accepted_ts'] AS c, se.type AS t FROM events se " \
	"WHERE se.id = " id " OFFSET 0) x)"
#define PAUSE_FACTOR 10
#define PAUSE_MAX_US 10000000
/* The longest wait a far side's Retry-After gets (outbox_retry_after_ms). */
#define RETRY_AFTER_MAX_MS 3600000L

/* A destination that answered 429 without a Retry-After, and how many
 * times in a row (slowdown). */
struct slow {
	char dest[sizeof(((struct outbox_row *)0)->destination)];
	int streak;
};

struct dispatcher {
	struct dispatcher_opts o;
	char *url, *name;
	atomic_bool stop;
	int wake[2]; /* a pipe, written by the stop alone: the lanes' waits on the database end at once */
	struct lane *lanes;
	int nlanes;
	pthread_mutex_t mu;
	atomic_int ndest; /* push destinations at the last claim (0: none yet) */
	atomic_int_fast64_t ndest_us; /* when that claim read them (cw_now_us) */
	int watcher;      /* the idle lane that waits for notifications, or -1 (under mu) */
	pthread_cond_t idle; /* the other idle lanes sleep on it until the watcher takes a destination */
	atomic_uint_fast64_t delivered, retried, dead, requests_ok, requests_failed, claims, claim_tries, npaused,
		rate_limited, expired;
	struct pause *pauses; /* under mu */
	int npauses, pauses_cap;
	struct slow *slows;   /* under mu */
	int nslows, slows_cap;
	/* The claims' keeper (keeper_main): renews this process's claims
	 * while a lane delivers (busy lanes, under mu). */
	pthread_t keeper;
	bool keeper_started;
	struct store_canceller keeper_cancel; /* its statement, cancelled at a stop that waits for it */
	pthread_cond_t keeper_cv;
	int busy;
	atomic_uint_fast64_t renewals;
	/* connections the lanes made again after losing theirs: each lane
	 * then takes back its own rows left in flight (adopt_own_rows) */
	atomic_uint_fast64_t reconnects;
};

/* Whether dest is paused now; drops the pauses that are over (under mu). */
static bool paused(struct dispatcher *d, const char *dest)
{
	int64_t now = cw_now_us();
	bool found = false;
	for (int i = 0; i < d->npauses;) {
		if (d->pauses[i].until_us <= now) {
			d->pauses[i] = d->pauses[--d->npauses];
			continue;
		}
		found = found || strcmp(d->pauses[i].dest, dest) == 0;
		i++;
	}
	return found;
}

/* No lane claims dest for the next us microseconds (a pause that cannot be
 * recorded, for want of memory, is skipped: the next claim scans again). */
static void pause_destination(struct dispatcher *d, const char *dest, int64_t us)
{
	pthread_mutex_lock(&d->mu);
	if (!paused(d, dest) && d->npauses == d->pauses_cap) {
		int cap = d->pauses_cap ? d->pauses_cap * 2 : 8;
		struct pause *p = realloc(d->pauses, (size_t)cap * sizeof(*p));
		if (p) {
			d->pauses = p;
			d->pauses_cap = cap;
		}
	}
	if (d->npauses < d->pauses_cap) {
		struct pause *p = &d->pauses[d->npauses++];
		snprintf(p->dest, sizeof(p->dest), "%s", dest);
		p->until_us = cw_now_us() + us;
	}
	pthread_mutex_unlock(&d->mu);
}

/* The wait before dest is tried again after a 429 that said nothing of
 * how long (limited), in ms: retry_base_ms doubling with each such answer
 * in a row, up to retry_max_ms, with 50-100 % jitter; 0, the streak
 * forgotten, when not limited (dest took a delivery).  The attempts, from
 * which the usual backoff grows, do not count a 429 (the peer is up and
 * asks for a slower pace; counted, a long burst would make dead letters),
 * so a streak of its own makes the pace slow down (until the thirtieth
 * session the same retry_base_ms for ever).  Kept in this process's
 * memory, as the pauses are; a streak that cannot be recorded, for want
 * of memory, counts as the first. */
static long slowdown(struct dispatcher *d, const char *dest, bool limited)
{
	int streak = 0;
	pthread_mutex_lock(&d->mu);
	int i = 0;
	while (i < d->nslows && strcmp(d->slows[i].dest, dest) != 0)
		i++;
	if (!limited) {
		if (i < d->nslows)
			d->slows[i] = d->slows[--d->nslows];
	} else {
		if (i == d->nslows && d->nslows == d->slows_cap) {
			int cap = d->slows_cap ? d->slows_cap * 2 : 8;
			struct slow *p = realloc(d->slows, (size_t)cap * sizeof(*p));
			if (p) {
				d->slows = p;
				d->slows_cap = cap;
			}
		}
		if (i == d->nslows && d->nslows < d->slows_cap) {
			snprintf(d->slows[i].dest, sizeof(d->slows[i].dest), "%s", dest);
			d->slows[i].streak = 0;
			d->nslows++;
		}
		streak = 1;
		if (i < d->nslows) {
			if (d->slows[i].streak < 30)
				d->slows[i].streak++;
			streak = d->slows[i].streak;
		}
	}
	pthread_mutex_unlock(&d->mu);
	if (!limited)
		return 0;
	return (long)store_jittered(store_backoff_nth(streak, d->o.retry_base_ms, d->o.retry_max_ms));
}

/* Takes dest for lane l (which holds none); false if another lane has it
 * or it is paused. */
static bool take_destination(struct lane *l, const char *dest)
{
	struct dispatcher *d = l->d;
	pthread_mutex_lock(&d->mu);
	bool ok = !paused(d, dest);
	for (int i = 0; i < d->nlanes && ok; i++)
		ok = strcmp(d->lanes[i].held, dest) != 0;
	if (ok)
		snprintf(l->held, sizeof(l->held), "%s", dest);
	pthread_mutex_unlock(&d->mu);
	return ok;
}

static void give_destination(struct lane *l)
{
	pthread_mutex_lock(&l->d->mu);
	l->held[0] = '\0';
	pthread_mutex_unlock(&l->d->mu);
}

/* How long all_taken trusts the destinations a claim counted. */
#define NDEST_FRESH_US 1000000

/* Whether every push destination is some lane's already: a claim could
 * only find nothing, and each would cost the database a transaction (with
 * one busy destination, every commit's notification woke all idle lanes).
 * The destinations are those a claim counted within NDEST_FRESH_US: a peer
 * enabled or added, or the local adapter ready again, since is claimed by
 * the next claim after that, at most one a second while every lane
 * known is busy.  Until the forty-sixth session the count of the last claim
 * held however old: with every destination it knew busy, no idle lane
 * claimed again, and the new one's rows waited until a busy lane's
 * delivery ended (minutes, for a peer's refused events searched or a
 * Matrix batch of one room). */
static bool all_taken(struct dispatcher *d)
{
	if (cw_now_us() - atomic_load(&d->ndest_us) > NDEST_FRESH_US)
		return false;
	int nd = atomic_load(&d->ndest), held = 0;
	pthread_mutex_lock(&d->mu);
	for (int i = 0; i < d->nlanes; i++)
		held += d->lanes[i].held[0] != '\0';
	pthread_mutex_unlock(&d->mu);
	return nd > 0 && held >= nd;
}

/* Whether the lane may be the one idle lane that waits for notifications
 * and claims on them (each notification then costs one claim, however many
 * lanes there are); if another lane is, sleeps until that one takes a
 * destination (or a second passes): then the lane watches in its stead if
 * no other took over, else answers false.  Taking over at once keeps the
 * notifications that came while it slept unread for the wait that follows:
 * one commit that makes two destinations due wakes the watcher, which
 * takes the first, and the second is the new watcher's at once.  Until the
 * thirty-second session the lane answered false and the caller read them
 * and threw them away: the second destination waited for the next
 * notification, or the wait's 200 ms. */
static bool watch(struct lane *l)
{
	struct dispatcher *d = l->d;
	int me = (int)(l - d->lanes);
	pthread_mutex_lock(&d->mu);
	if (d->watcher >= 0 && d->watcher != me) {
		if (!atomic_load(&d->stop)) {
			struct timespec ts;
			cw_deadline_ts(&ts, CLOCK_REALTIME, 1000000);
			pthread_cond_timedwait(&d->idle, &d->mu, &ts);
		}
		if (d->watcher >= 0 || atomic_load(&d->stop)) {
			pthread_mutex_unlock(&d->mu);
			return false;
		}
	}
	d->watcher = me;
	pthread_mutex_unlock(&d->mu);
	return true;
}

/* The lane stops watching (it took a destination, or stops): another idle
 * lane takes over. */
static void unwatch(struct lane *l)
{
	struct dispatcher *d = l->d;
	pthread_mutex_lock(&d->mu);
	if (d->watcher == (int)(l - d->lanes)) {
		d->watcher = -1;
		pthread_cond_signal(&d->idle);
	}
	pthread_mutex_unlock(&d->mu);
}

void dispatcher_get_stats(struct dispatcher *d, struct dispatcher_stats *st)
{
	st->delivered = atomic_load(&d->delivered);
	st->retried = atomic_load(&d->retried);
	st->dead = atomic_load(&d->dead);
	st->requests_ok = atomic_load(&d->requests_ok);
	st->requests_failed = atomic_load(&d->requests_failed);
	st->claims = atomic_load(&d->claims);
	st->claim_tries = atomic_load(&d->claim_tries);
	st->pauses = atomic_load(&d->npaused);
	st->rate_limited = atomic_load(&d->rate_limited);
	st->expired = atomic_load(&d->expired);
	st->renewals = atomic_load(&d->renewals);
}

bool dispatcher_stopping(const struct dispatcher *d) { return atomic_load(&((struct dispatcher *)d)->stop); }

/* A dead letter whose sender is not local (a peer's user: the peer sees
 * not_delivered in the message's status) has no one to tell: the look marks
 * it told as it passes (nl, a thousand a call), or every look of every
 * adapter would walk it again, forever (until the nineteenth session: 50,000
 * such rows, left by one long outage of a peer, cost 0.3 s a look, twice a
 * second, a review measured).
 *
 * The rows are marked told in a transaction the caller ends once it has
 * told them (dispatcher_dead_told): marked in a statement of their own,
 * a lost answer left them told and nobody telling (until the twenty-third
 * session).  Locked until then, they are still told by one process. */
/* The untold rows where COND, their quote QUOTE, at most 50 in id order:
 * a dead letter's (outbox_dead_untold_idx) and since the fifty-ninth
 * session a drop's for a block (outbox_dropped_untold_idx, schema/054)
 * each its own range of its own index.  As one look whose condition said
 * "dead untold OR dropped owed", the planner walked the whole outbox in
 * id order for the 50 (101 ms at 450,000 rows, against 0.1 ms, twice a
 * second in each adapter: docs/performance.md, "Fifty-ninth session").
 * A drop's quote is not said when its message expired meanwhile (its
 * sender's content.expires: the expiry erased the content, and its quote
 * would outlive it in her notice; since the sixtieth session the expiry
 * empties the quote too).  One message, one notice: the rows of one
 * event dropped for blocks (a group's, one row a peer, each peer's
 * members blocking her) are told as the first of them (DISTINCT ON), and
 * all of them marked told, those past the 50 too (sb: every dropped row
 * of those events, by outbox_event_dest_key); until the sixtieth session
 * each row was a notice, two for a group message to two peers.  Nor a
 * row dropped after its event was told of (the block of a second peer's
 * members, later; a row another transaction held at the look, which sb
 * skipped): marked told without a word.  A drop's row is marked told
 * with the time of its drop (next_attempt_at, which the drop set and
 * nothing changes after), which no other told row can have (a dead
 * letter told, then dropped by a pass: told before the drop set it), so
 * that a row of the event so marked says she was told of its drop (or
 * had nowhere to be told: a row marked told unsaid carries it too); sb
 * locks them, as a look that told them may have committed after this
 * statement's snapshot, and a locked row is read as it is now.  Until
 * the sixty-first session such a row was a notice again, and since then
 * a row told before it (no mark) still is, once.  Nor two
 * looks at once (each XMPP component's, of its peer's rows; two
 * processes'): each takes the event's lock (DEAD_NOTICE_LOCK_CLASS, a
 * transaction-level advisory lock, tried) with its first row of it, and
 * a look that cannot passes its rows by; the other's sb marks them told
 * (or, if it commits first, this look's locks find them told).  Until a
 * review of the sixtieth session each look skipped the other's locked
 * rows and told its own: two notices.  The lock is asked of the 50 rows
 * found first (dc, materialized, no lock) alone: by a condition on the
 * outbox row (its event_id), so that it can only be a filter of their
 * own scan, and behind their ids' test in a CASE, since a filter's
 * conditions run in the order of their costs and the lock's is the
 * cheaper (on a plan scanning outbox rather than looking the ids up it
 * would be tried for every owed row of every network: the session's
 * third review).  As a condition of the look itself (the session's first
 * mend) where it was asked hung on the plan, and a plan reading events
 * first or sorting before the LIMIT would have asked it of every owed
 * row or every event of her network's writers, tens of thousands of
 * locks, past the lock table (the second review). */
/* "CWDN": the class (the first key) of the locks of the events whose drop
 * notices a look tells (the second key: the event's id folded into an
 * int), beside store.h's classes ("CWSR", "CWCR") and the XMPP groups' ("CWXG"). */
#define DEAD_NOTICE_LOCK_CLASS "1129792590"
#define UNTOLD(COND, QUOTE)                                                                                  \
	"(SELECT o.id, o.destination, o.attempts, o.state, e.id AS ev, e.room_id, e.sender_id, e.type, " QUOTE \
	" AS quote FROM outbox o JOIN events e ON e.id = o.event_id JOIN identities s ON s.id = e.sender_id "   \
	" WHERE " COND " AND s.is_local AND s.network = $1 AND ($2::text IS NULL OR o.destination = $2) "      \
	" ORDER BY o.id LIMIT 50 FOR UPDATE OF o SKIP LOCKED)"
const struct store_stmt dispatcher_dead_stmts[] = {
	{ "cw_dead_untold",
		"WITH dd AS " UNTOLD("o.state = 'dead' AND o.sender_told_at IS NULL", DISPATCHER_QUOTE("e.content")) ", "
		"dc AS MATERIALIZED (SELECT o.id FROM outbox o JOIN events e ON e.id = o.event_id "
		"  JOIN identities s ON s.id = e.sender_id WHERE o.state = 'dropped' AND o.sender_quote IS NOT NULL "
		"  AND s.is_local AND s.network = $1 AND ($2::text IS NULL OR o.destination = $2) "
		"  ORDER BY o.id LIMIT 50), "
		"db AS (SELECT o.id, o.destination, o.attempts, o.state, e.id AS ev, e.room_id, e.sender_id, e.type, "
		"  CASE WHEN e.expired THEN NULL ELSE NULLIF(o.sender_quote, '') END AS quote "
		"  FROM outbox o JOIN events e ON e.id = o.event_id WHERE o.id = ANY (ARRAY(SELECT id FROM dc)) "
		"  AND o.state = 'dropped' AND o.sender_quote IS NOT NULL "
		"  AND CASE WHEN o.id = ANY (ARRAY(SELECT id FROM dc)) THEN pg_try_advisory_xact_lock("
		DEAD_NOTICE_LOCK_CLASS ", (o.event_id % 2147483647)::int) END "
		"  ORDER BY o.id FOR UPDATE OF o SKIP LOCKED), "
		"sb AS (SELECT x.id, x.event_id, x.sender_quote IS NOT NULL AS owed, x.sender_quote IS NULL "
		"  AND x.sender_told_at = x.next_attempt_at AS told FROM outbox x "
		"  WHERE x.event_id = ANY (ARRAY(SELECT ev FROM db)) AND x.state = 'dropped' "
		"  AND x.id NOT IN (SELECT id FROM db) FOR UPDATE SKIP LOCKED), "
		"d AS (SELECT * FROM dd UNION ALL (SELECT DISTINCT ON (ev) * FROM db "
		"  WHERE ev NOT IN (SELECT event_id FROM sb WHERE told) ORDER BY ev, id)), "
		"u AS (UPDATE outbox x SET sender_told_at = CASE WHEN x.state = 'dropped' THEN x.next_attempt_at "
		"  ELSE now() END, sender_quote = NULL "
		"  WHERE x.id = ANY (ARRAY(SELECT id FROM dd UNION ALL SELECT id FROM db "
		"  UNION ALL SELECT id FROM sb WHERE owed))), "
		"nl AS (UPDATE outbox x SET sender_told_at = now() FROM (SELECT o.id FROM outbox o "
		"  JOIN events e ON e.id = o.event_id JOIN identities s ON s.id = e.sender_id "
		"  WHERE o.state = 'dead' AND o.sender_told_at IS NULL AND NOT s.is_local "
		"  ORDER BY o.id LIMIT 1000 FOR UPDATE OF o SKIP LOCKED) n WHERE x.id = n.id) "
		"SELECT d.id, d.destination, d.attempts, d.type, b.native_id, ri.localpart, "
		"  (SELECT native_id FROM identity_bindings WHERE identity_id = d.sender_id AND network = $1), "
		"  (SELECT substr(n.native_id, length(d.room_id::text) + 2) FROM event_native_ids n "
		"   WHERE n.event_id = d.ev AND n.network = $1 AND n.kind = 'id' "
		"   AND starts_with(n.native_id, d.room_id::text || '/') LIMIT 1), d.quote, d.state, rm.kind, rm.public_id, "
		"  CASE WHEN b.native_id IS NULL AND $1 = 'matrix' THEN (SELECT g.room_id FROM matrix_mgmt_rooms g "
		"   WHERE g.identity_id = d.sender_id ORDER BY g.created_at DESC LIMIT 1) END, "
		"  CASE WHEN b.native_id IS NULL AND rm.kind <> 'group' THEN (SELECT i.uri FROM room_members m "
		"   JOIN identities i ON i.id = m.identity_id WHERE m.room_id = d.room_id AND NOT i.is_local "
		"   ORDER BY i.id LIMIT 1) END, coalesce(rm.name, rm.public_id) "
		"FROM d JOIN rooms rm ON rm.id = d.room_id LEFT JOIN room_bindings b ON b.room_id = d.room_id "
		"  AND b.network = $1 "
		"  AND b.local_identity_id = d.sender_id "
		"LEFT JOIN identities ri ON ri.id = b.remote_identity_id ORDER BY d.id" },
	{ NULL, NULL },
};

PGresult *dispatcher_dead_untold(PGconn *c, const char *network, const char *destination, cw_errmsg *e)
{
	if (store_exec(c, "BEGIN", e))
		return NULL;
	const char *p[] = { network, destination };
	PGresult *r = PQexecPrepared(c, dispatcher_dead_stmts[0].name, 2, p, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (!rc)
		return r;
	store_end(c, rc, e);
	return NULL;
}

cw_err dispatcher_dead_told(PGconn *c, bool told, cw_errmsg *e)
{
	return told ? store_end(c, CW_OK, e) : store_exec(c, "ROLLBACK", e);
}

void dispatcher_dead_text(char *buf, size_t len, const PGresult *r, int i)
{
	const char *destination = PQgetvalue(r, i, 1), *attempts = PQgetvalue(r, i, 2);
	const char *quote = PQgetisnull(r, i, 8) ? NULL : PQgetvalue(r, i, 8);
	bool q = quote && *quote;
	if (strcmp(PQgetvalue(r, i, 9), "dropped") == 0) {
		/* a drop by a block (schema/054): the refusal's words */
		snprintf(buf, len, "Not delivered%s%s%s: this person blocked you.", q ? " \u201c" : "", q ? quote : "",
			 q ? "\u201d" : "");
		return;
	}
	const char *peer = strncmp(destination, "peer:", 5) == 0 ? destination + 5 : destination;
	/* a row never tried went dead behind an earlier one of its room */
	bool tried = strcmp(attempts, "0") != 0;
	char why[120];
	if (tried)
		snprintf(why, sizeof(why), "%s tries over the retry budget", attempts);
	else
		snprintf(why, sizeof(why), "an earlier message of the conversation ran out of retries");
	snprintf(buf, len, "Not delivered%s%s%s: %s could not be reached (%s). The operator can send it again.",
		 q ? " \u201c" : "", q ? quote : "", q ? "\u201d" : "", peer, why);
}

/* The claim and the record of its outcome, prepared on each lane's
 * connection: sent whole, the claim was planned on every call, which took
 * longer than running it (0.6 ms of the backend's CPU on each wake-up).
 * Prepared, the record was still planned at every call (store_exec_generic
 * says why), its parameters $2 and $10 folding its failure's arms away so
 * that each custom plan cost less than the generic one (0.4-1 ms of
 * planning a batch): it runs with its generic plan since the forty-fifth
 * session (docs/performance.md; the claim, planned at 4 % of its calls in
 * tests/bench/xmpp and 40 % in tests/bench/matrix, is left to choose).
 *
 * The claim takes one destination at a time, so the scan is the
 * (destination, id) index of pending rows, in order, stopping at the
 * limit.  A room with a row in flight or backing off waits whole: rows of a
 * room are only ever claimed together and in order, and a failed batch
 * backs off together, so no earlier row of a room can be due behind a
 * blocked one (the blocked rooms are one set, not a probe per row; the
 * rows of blocked rooms are still walked past, see claim's pause).  The
 * rows backing off are one descent of outbox_backing_off_idx (046), the
 * one index with both of their tests as its conditions: until then the
 * planner read every pending row of the destination in
 * outbox_state_dest_idx to find them whenever the statistics counted
 * few pending rows (never analyzed, or analyzed before a release), 5-40
 * ms a claim of a backlog of 20,000 (docs/performance.md, "Forty-sixth
 * session").  Their ORDER BY, which that index gives and
 * outbox_state_dest_idx does not, is what makes it the cheaper where the
 * counts make both cost alike (a table never analyzed).  The rows in
 * flight are read so too: outbox_state_dest_idx is the one index that
 * gives their ORDER BY id with state and destination as its conditions
 * (its first columns, both equal).  Without it the planner took
 * outbox_room_order_idx, whose first column is the room, and read it
 * whole (every pending, held and in-flight row of every destination,
 * the destination a filter) in each of the twenty claims of
 * tests/bench/matrix --rooms: 6,700 of a claim's 17,100 buffers and 15
 * of the 16 ms it took to find its rows, until the sixty-first session
 * (docs/performance.md).  A row
 * also waits while an earlier row of its room from the same sender to the
 * same user is still held: a consent releases the held rows, but two
 * sweeps at once (SKIP LOCKED) or a message decided after the consent may
 * make a later row due first (a probe of the held rows' index, per row).
 * Only the same sender's: in a group, a member the user has not accepted
 * yet holds back their own messages, not the whole group's.  The probe
 * is one descent of outbox_held_probe_idx (047) whatever the statistics:
 * IS NOT DISTINCT FROM (state is NOT NULL: the same test as =) proves
 * that index's predicate and no other's, and the sender is a subquery,
 * not a join, so that no index's order of event_id is of use.  With
 * state = 'held' and a join the planner read a whole index per row
 * claimed (outbox_held_age_idx when the statistics counted no held row,
 * outbox_event_dest_key when they counted a backlog since released by a
 * consent): 0.4-12.6 s a claim of 250 rows (docs/performance.md,
 * "Forty-seventh session").  A claim
 * holds at most batch_max rows ($1) and about claim_bytes of their events
 * ($5, sized): its rows, their text and their JSON are all in memory at
 * once, in each lane (until the thirtieth session only the count bounded
 * it: 250 events of 60 KB of "abc" held 268 MB). */
static const struct store_stmt lane_stmts[] = {
	{ "cw_claim",
		"WITH RECURSIVE blocked AS ("
		" (SELECT room_id FROM outbox WHERE state = 'in_flight' AND destination = $4 ORDER BY id)"
		" UNION (SELECT room_id FROM outbox WHERE state = 'pending' AND next_attempt_at > now() AND destination = $4"
		"  ORDER BY next_attempt_at)), "
		"due AS ("
		" SELECT o.id, o.event_id FROM outbox o"
		" WHERE o.state = 'pending' AND o.destination = $4 AND o.next_attempt_at <= now()"
		"  AND o.room_id NOT IN (SELECT room_id FROM blocked)"
		"  AND (o.target_identity_id IS NULL OR NOT EXISTS (SELECT 1 FROM outbox h"
		"   WHERE " OUTBOX_HELD("h") " AND h.target_identity_id = o.target_identity_id"
		"   AND h.room_id = o.room_id AND h.id < o.id AND h.destination = o.destination"
		"   AND (SELECT he.sender_id FROM events he WHERE he.id = h.event_id)"
		"    = (SELECT oe.sender_id FROM events oe WHERE oe.id = o.event_id)))"
		" ORDER BY o.id LIMIT $1::int FOR UPDATE OF o SKIP LOCKED), "
		/* At most $5 bytes of stored events (their text, as read here,
		 * plus CLAIM_EVENT_OVERHEAD each), always one: the rows due
		 * first, so a room's rows left out wait behind its first
		 * (blocked, above) and keep their order.  walk reads them one at
		 * a time, in id order, and stops at the first that does not fit:
		 * a window over all of due (until the thirty-first session) made
		 * the text of every due row, batch_max of them, to take 17 of
		 * 58 KB (docs/performance.md).  OFFSET 0 keeps the text one
		 * value: the subquery pulled up, content::text was made twice,
		 * for its size and for itself.  A row whose event is gone walks
		 * on as empty text (the UPDATE's join leaves it, as the window's
		 * join did): the walk must not stop at it and hold its lane. */
		"q AS MATERIALIZED (SELECT array_agg(id ORDER BY id) AS ids, array_agg(event_id ORDER BY id) AS evs "
		" FROM due), "
		"walk (k, upto, content) AS (SELECT 0, 0::bigint, NULL::text "
		" UNION ALL SELECT w.k + 1, w.upto + coalesce(octet_length(t.content), 0) + " CLAIM_EVENT_OVERHEAD ", t.content "
		"  FROM walk w CROSS JOIN q CROSS JOIN LATERAL (SELECT " CLAIM_EVENT_TEXT("q.evs[w.k + 1]") " AS content OFFSET 0) t WHERE w.upto <= $5::bigint AND w.k < cardinality(q.ids)), "
		"take AS (SELECT q.ids[walk.k] AS id, walk.content FROM walk CROSS JOIN q "
		" WHERE walk.k >= 1 AND (walk.upto <= $5::bigint OR walk.k = 1)) "
		"UPDATE outbox o SET state = 'in_flight', claimed_by = $2, "
		" claimed_until = now() + make_interval(secs => $3::int), attempts = o.attempts + 1 "
		"FROM take, events ev, rooms r, identities s "
		"WHERE o.id = take.id AND ev.id = o.event_id AND r.id = o.room_id AND s.id = ev.sender_id "
		"RETURNING o.id, o.destination, o.attempts, ev.public_id, take.content, r.uri, r.public_id, "
		" s.uri, (extract(epoch FROM ev.accepted_at) * 1000)::bigint, ev.ts, ev.id, "
		" coalesce(o.target_identity_id, 0), ev.type, ev.expired" },
	/* The attempts are logged for the rows up moved, those still in
	 * flight under this claim: run again after its answer was lost
	 * (exec_claimed), it logs nothing (until the twenty-third session it
	 * logged every row's attempt a second time).  a reads up's RETURNING,
	 * the rows up holds locked: a take-back of the same rows (their claim
	 * ran out meanwhile) either changed them first, and up, checking the
	 * claim again, passes over them, or waits for this statement and
	 * finds them no longer in flight; no two tries of a row get one
	 * number, and the insert is a plain one.  One case is left to the
	 * key: a first run whose answer was lost, still waiting for a row's
	 * lock on the server while the run again recorded the row and the
	 * lane claimed it again (the same claimed_by), passes up's check
	 * and numbers its try as the run again did (max() as its statement
	 * began); delivery_attempts_key's violation rolls it back, where the
	 * speculative insert let it write its stale outcome over the new
	 * claim (both reproduced by the session's review).  Until the sixty-fourth
	 * session a read the rows again from outbox (a probe of its primary
	 * key and a heap visit a row) and its insert was speculative (ON
	 * CONFLICT DO NOTHING, from the first day, when the attempt was the
	 * row's count and a re-run wrote it again): a probe of
	 * delivery_attempts_key, a speculative token's lock and a WAL record
	 * more a row (docs/performance.md, "Sixty-fourth session"). */
	{ "cw_record",
		"WITH cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS v), "
		/* A row out of budget is dead, and so is every later row of its
		 * room to this destination (in the batch, or waiting): let
		 * through, they would arrive before it once it is replayed; dead
		 * with it, a replay oldest first keeps the room's order.  No row
		 * can die of a delivery or of a failure that spends no budget:
		 * behind's test of $10 and $2 is a one-time filter, without which
		 * every record read all of the destination's waiting rows (5 ms
		 * a batch of 500 with 1,000 waiting; until the nineteenth
		 * session). */
		/* A row whose event was expired while the row was in flight
		 * expires when its try fails: pending again, it would be tried
		 * with nothing to send until it was dead.  The expiry sweep
		 * leaves a message with a row in flight alone (expiry_sql's
		 * raced, since the thirty-fifth session; before, a row claimed
		 * under the sweep had its content erased so): a defence. */
		/* $13: the far side's ids of delivered rows (outbox_row's
		 * remote_id), an object by outbox id (jsonb's ->> finds a key
		 * by a binary search; NULL: none): written in the row version
		 * that says it is delivered, and kept for references to it
		 * (n).  Both commit with the outcome or not at all: a crash
		 * before leaves the row in flight, its claim runs out and the
		 * retry finds the event sent (the Matrix adapter's txnId and
		 * already_sent: docs/matrix.md), whose id is recorded then.
		 * Until the fifty-fourth session the Matrix adapter wrote them
		 * in a statement of its own, committed first: a second update
		 * of each row, and for want of an estimate of its
		 * jsonb_to_recordset a hash join over the whole outbox. */
		"up AS (UPDATE outbox SET claimed_by = NULL, claimed_until = NULL, "
		" remote_id = coalesce($13::jsonb ->> outbox.id::text, remote_id), "
		" attempts = CASE WHEN $2::boolean OR $10::boolean THEN attempts ELSE greatest(attempts - 1, 0) END, "
		" state = CASE WHEN $2::boolean THEN 'delivered' "
		"  WHEN EXISTS (SELECT 1 FROM events ev WHERE ev.id = outbox.event_id AND ev.expired) THEN 'expired' "
		"  WHEN $10::boolean AND (attempts >= $5::int OR EXISTS "
		"  (SELECT 1 FROM outbox e WHERE e.id = ANY($1::bigint[]) AND e.room_id = outbox.room_id AND e.id < outbox.id "
		"   AND e.attempts >= $5::int)) THEN 'dead' ELSE 'pending' END, "
		" delivered_at = CASE WHEN $2::boolean THEN now() END, "
		" last_error = CASE WHEN $2::boolean THEN NULL ELSE $4 END, "
		/* The backoff of store_backoff_nth and store_jitter (retry_base_ms
		 * doubling with each attempt up to retry_max_ms, 50-100 %), written
		 * again in SQL on purpose: each row of the batch by its own
		 * attempts, in the statement that records them. */
		" next_attempt_at = CASE WHEN $2::boolean THEN next_attempt_at ELSE now() + make_interval(secs => "
		"  greatest($9::bigint / 1000.0, least($7::bigint, $6::bigint * (1::bigint << least(attempts - 1, 30))) "
		"  / 1000.0 * (0.5 + random() / 2))) END "
		"FROM cfg WHERE id = ANY($1::bigint[]) AND state = 'in_flight' AND destination = $12 AND claimed_by = $11 "
		"RETURNING outbox.id, outbox.room_id, outbox.state, outbox.event_id, $13::jsonb ->> outbox.id::text AS rid), "
		"a AS (INSERT INTO delivery_attempts (outbox_id, attempt, started_at, finished_at, ok, code, error) "
		" SELECT up.id, coalesce((SELECT max(x.attempt) FROM delivery_attempts x WHERE x.outbox_id = up.id), 0) + 1, "
		"  to_timestamp($8::bigint / 1000.0), now(), $2::boolean, NULLIF($3::int, 0), $4 FROM up), "
		"n AS (INSERT INTO event_native_ids (event_id, network, kind, native_id) "
		" SELECT event_id, $12, 'event_id', rid FROM up WHERE rid IS NOT NULL ON CONFLICT DO NOTHING), "
		"behind AS (UPDATE outbox p SET state = 'dead', last_error = 'not sent: an earlier message of its room to '"
		" || $12 || ' ran out of retries (replay them oldest first)' "
		" FROM (SELECT room_id, min(id) AS id FROM up WHERE state = 'dead' GROUP BY room_id) d "
		" WHERE p.room_id = d.room_id AND p.id > d.id AND p.destination = $12 AND p.state = 'pending' "
		" AND p.id <> ALL($1::bigint[]) AND $10::boolean AND NOT $2::boolean RETURNING p.id, p.state) "
		"SELECT state, id FROM up UNION ALL SELECT state, id FROM behind" },
	/* The rows whose claim ran out ($1 the retry budget, $2 the claim's
	 * timeout), taken back in claim_open's transaction: their process
	 * stopped mid-delivery (a crash, an OOM kill, a watchdog's kill of a
	 * hung delivery), or lost the database for longer than the claim.
	 * The try the claim counted stays counted, and is logged: no outcome,
	 * started when the claim was made or last renewed (as far as this
	 * process's timeout tells), never finished.  A row whose tries have
	 * reached the budget is dead, and so are the later rows of its room to
	 * its destination, those taken back with it (t's after) and those
	 * waiting (behind), as in cw_record: until the thirty-second session
	 * only a recorded failure checked the budget, and a row its process
	 * never survived (a poison row) was claimed again every
	 * claim_timeout_s for ever, its attempts past the budget, and nothing
	 * the operator had (replay and discard act on dead letters) stopped
	 * it.  A room's rows in flight to a destination are one claim's (see
	 * cw_claim), so t's partition is cw_record's batch.  up checks the
	 * claim again: the keeper may have renewed it since t read it.  A row
	 * of an expired event (events.expired) is never dead, and takes no
	 * later row down: pending, it is expired when claimed (cw_claim's
	 * expired; until the thirty-fifth session its spent budget killed the
	 * room's later messages, a review's finding).  A row a peer's pull
	 * handed out (claimed_by 'pull#...', peer_pull.c) and did not
	 * acknowledge within its hand-out had no try (the pull counts none
	 * in attempts): it is due again with no entry in delivery_attempts
	 * and last_error saying so, is never spent and takes no row down.
	 * Until the forty-second session it got a "no outcome" try in the
	 * message's trace, started claim_timeout_s before a claim of 600 s
	 * ran out. */
	{ "cw_take_back",
		"WITH t AS (SELECT o.id, o.claimed_until, x.pull, o.attempts >= $1::int AND NOT x.expired AND NOT x.pull AS spent, "
		" coalesce(bool_or(o.attempts >= $1::int AND NOT x.expired AND NOT x.pull) OVER (PARTITION BY o.room_id, "
		"  o.destination ORDER BY o.id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false) AS after "
		" FROM outbox o CROSS JOIN LATERAL (SELECT coalesce((SELECT ev.expired FROM events ev "
		"  WHERE ev.id = o.event_id), false) AS expired, coalesce(starts_with(o.claimed_by, 'pull#'), false) AS pull) x "
		" WHERE o.state = 'in_flight' AND o.claimed_until < now()), "
		"up AS (UPDATE outbox o SET claimed_by = NULL, claimed_until = NULL, "
		" state = CASE WHEN t.spent OR t.after THEN 'dead' ELSE 'pending' END, "
		" last_error = CASE WHEN t.spent THEN 'the retry budget is spent: try ' || o.attempts "
		"  || ' ended with no outcome (the process delivering it stopped, a crash or a kill, or lost the "
		"database, until its claim ran out)' "
		"  WHEN t.after THEN 'not sent: an earlier message of its room to ' || o.destination "
		"  || ' ran out of retries (replay them oldest first)' "
		"  WHEN t.pull THEN 'handed out to the peer''s pull and not acknowledged within 10 minutes of its last pull: "
		"taken back, to be handed out again (not a try: none counted)' ELSE o.last_error END "
		" FROM t WHERE o.id = t.id AND o.state = 'in_flight' AND o.claimed_until < now() "
		" RETURNING o.id, o.room_id, o.destination, o.state, t.claimed_until, t.pull), "
		"a AS (INSERT INTO delivery_attempts (outbox_id, attempt, started_at, ok, error) "
		" SELECT up.id, coalesce((SELECT max(x.attempt) FROM delivery_attempts x WHERE x.outbox_id = up.id), 0) + 1, "
		"  least(up.claimed_until - make_interval(secs => $2::int), now()), false, "
		"  'no outcome: its claim ran out first (the process delivering it stopped, or lost the database)' FROM up "
		" WHERE NOT up.pull ON CONFLICT (outbox_id, attempt) DO NOTHING), "
		"behind AS (UPDATE outbox p SET state = 'dead', last_error = 'not sent: an earlier message of its room to '"
		" || p.destination || ' ran out of retries (replay them oldest first)' "
		" FROM (SELECT room_id, destination, min(id) AS id FROM up WHERE state = 'dead' GROUP BY room_id, destination) d "
		" WHERE p.room_id = d.room_id AND p.destination = d.destination AND p.id > d.id AND p.state = 'pending' "
		" RETURNING p.state) "
		"SELECT state, id FROM up UNION ALL SELECT state, NULL FROM behind" },
	/* claim_open's, run by EXECUTE in its one simple query: sent as text
	 * they were planned at every claim (0.1 ms for the first, about a
	 * tenth of that for the others; in tests/bench/xmpp some 130 ms of
	 * planning for 20,000 messages, until the forty-fifth session). */
	{ "cw_claim_lock", "SELECT pg_advisory_xact_lock(" CLAIM_LOCK_KEY ")" },
	{ "cw_claim_ran_out",
		"SELECT EXISTS (SELECT 1 FROM outbox WHERE state = 'in_flight' AND claimed_until < now())" },
	/* In the names' order: a lane's place in the list (lane.next) goes
	 * round it, and the table's order moves a peer to its end when its
	 * row is updated (a PATCH): the lane then served that peer again
	 * while another's rows waited a round (until the forty-sixth session). */
	{ "cw_push_peers", "SELECT 'peer:' || name FROM peers WHERE mode = 'push' AND enabled ORDER BY name" },
	{ NULL, NULL },
};
static const struct store_stmt *const lane_stmt_lists[] = { lane_stmts, NULL };

static void drop_conn(struct lane *l)
{
	store_canceller_set(&l->cancel, NULL);
	PQfinish(l->c);
	l->c = NULL;
}

static bool lane_gives_up(void *arg)
{
	struct dispatcher *d = arg;
	return atomic_load(&d->stop);
}

/* The lane's connection, made again when lost.  The connect does not hold
 * the daemon's stop (store_connect_abortable); while the database is away
 * it is tried at the pace of l->backoff (up to database.reconnect_max_ms
 * apart).  Until the forty-eighth session each attempt blocked up to
 * connect_timeout (5 s) when the database's host took the connection and
 * never answered, and so did a stop; failed ones were tried again every
 * second. */
static bool ensure_conn(struct lane *l)
{
	struct dispatcher *d = l->d;
	if (l->c && PQstatus(l->c) == CONNECTION_OK)
		return true;
	drop_conn(l);
	if (cw_now_us() < l->backoff.retry_at_us || atomic_load(&d->stop))
		return false;
	cw_errmsg e;
	l->c = store_connect_abortable(d->url, 30000, d->wake[0], lane_gives_up, d, &e);
	if (l->c) {
		store_canceller_set(&l->cancel, l->c);
		if (!store_prepare_all(l->c, lane_stmt_lists, &e) || store_exec(l->c, "LISTEN causeway_outbox", &e))
			drop_conn(l);
	}
	if (!l->c) {
		char in_ms[24];
		snprintf(in_ms, sizeof(in_ms), "%ld", store_backoff_failed(&l->backoff, d->o.reconnect_max_ms));
		if (!atomic_load(&d->stop))
			LOG_KV(CW_LOG_WARN, "dispatcher lane cannot connect to the database", "detail", e.msg,
			       "retry_in_ms", in_ms);
		return false;
	}
	store_backoff_reset(&l->backoff);
	if (l->connected_once)
		atomic_fetch_add(&d->reconnects, 1);
	l->connected_once = true;
	return true;
}

/* Sleeps until until_us (cw_now_us), cut short by a stop. */
static void nap_until(struct dispatcher *d, int64_t until_us)
{
	store_sleep_until(until_us, &d->stop);
}

/* The pace of a lane whose statement failed: a second, cut short by a stop. */
static void nap(struct dispatcher *d)
{
	nap_until(d, cw_now_us() + 1000000);
}

/* Whether the rows of the lane's last claim are still its own: its claim,
 * or the keeper's last renewal of it (claimed_us), was less than
 * claim_timeout_s ago. */
static bool claim_holds(const struct lane *l)
{
	return cw_now_us() < atomic_load(&l->claimed_us) + (int64_t)l->d->o.claim_timeout_s * 1000000;
}

/* A new connection for the lane, tried at its pace for as long as its
 * claim holds (claim_holds); false if the claim ran out first or the
 * daemon stops. */
static bool reconnect_within_claim(struct lane *l)
{
	struct dispatcher *d = l->d;
	drop_conn(l);
	while (!atomic_load(&d->stop) && claim_holds(l)) {
		nap_until(d, l->backoff.retry_at_us ? l->backoff.retry_at_us : cw_now_us() + 250000);
		if (!atomic_load(&d->stop) && ensure_conn(l))
			return claim_holds(l);
	}
	return false;
}

/* Runs an outcome statement on the lane's claimed rows (stmt, prepared,
 * run with its generic plan as lane_stmts says, or sql) expecting want;
 * the result, or NULL with e set.  The database
 * away (restarted while the rows were out), it runs again on a new
 * connection once it is back, as long as the claim holds: left unrecorded,
 * the rows stayed in flight until their claim ran out (a minute by
 * default), and every later row of their rooms waited behind them (until
 * the twenty-first session).  Running one twice (its commit came through,
 * its answer did not) changes nothing: every outcome statement changes
 * only rows still in flight under this process's claim. */
static PGresult *exec_claimed(struct lane *l, const char *stmt, const char *sql, int n, const char *const *params,
			      ExecStatusType want, cw_errmsg *e)
{
	for (;;) {
		if (!l->c && !reconnect_within_claim(l)) {
			cw_fail(e, CW_EUNAVAIL, "no database connection before the claim ran out");
			return NULL;
		}
		PGresult *r = stmt ? store_exec_generic(l->c, stmt, n, params)
				   : PQexecParams(l->c, sql, n, NULL, params, NULL, NULL, 0);
		cw_err rc = store_check(l->c, r, want, e);
		if (rc == CW_OK)
			return r;
		if (rc != CW_EUNAVAIL || !reconnect_within_claim(l))
			return NULL;
	}
}

static int cmp_row(const void *a, const void *b)
{
	const struct outbox_row *x = a, *y = b;
	return (x->id > y->id) - (x->id < y->id);
}

/* A column's text as a JSON string (its length from libpq: no strlen;
 * still checked as UTF-8, as json_string did). */
static json_t *col_string(PGresult *r, int row, int col)
{
	return json_stringn(PQgetvalue(r, row, col), (size_t)PQgetlength(r, row, col));
}

/* The members are set under their constant names unchecked
 * (json_object_set_new_nocheck: the names are ours, ASCII) and the columns'
 * texts with libpq's lengths, still checked as UTF-8 (col_string): until
 * the fifty-ninth session json_object_set_new checked each name as UTF-8
 * again, json_string measured each text, and json_loads measured the
 * stored event's text on its way through it (a small part of the
 * dispatcher's thread: docs/performance.md, "Fifty-ninth session").  Not
 * jansson 2.14's json_object_setn/getn, which the session first took:
 * configure accepts 2.13, which has neither (the session's review). */
json_t *outbox_event_json(PGresult *r, int row, int col, bool *unreadable)
{
	return outbox_event_json_omit(r, row, col, 0, unreadable);
}

json_t *outbox_event_json_omit(PGresult *r, int row, int col, unsigned omit, bool *unreadable)
{
	json_error_t je;
	json_t *ev = json_loadb(PQgetvalue(r, row, col + 1), (size_t)PQgetlength(r, row, col + 1), 0, &je);
	*unreadable = !ev && json_error_code(&je) != json_error_out_of_memory;
	if (!ev)
		return NULL;
	json_object_set_new_nocheck(ev, "id", col_string(r, row, col));
	json_object_set_new_nocheck(ev, "room", col_string(r, row, col + 2));
	if (!(omit & OUTBOX_ROOM_ID))
		json_object_set_new_nocheck(ev, "room_id", col_string(r, row, col + 3));
	json_object_set_new_nocheck(ev, "sender", col_string(r, row, col + 4));
	if (!(omit & OUTBOX_ACCEPTED_TS))
		json_object_set_new_nocheck(ev, "accepted_ts", json_integer(atoll(PQgetvalue(r, row, col + 5))));
	if (!(omit & OUTBOX_TS) && !json_object_get(ev, "ts")) /* the sender gave none: the time it was accepted */
		json_object_set_new_nocheck(ev, "ts", json_integer(atoll(PQgetvalue(r, row, col + 6))));
	return ev;
}

long outbox_dead_unreadable(PGconn *c, const char *row, const char *event, const char *destination,
			    const char *claimed_by, cw_errmsg *e)
{
	LOG_KV(CW_LOG_ERROR, "a stored event does not parse as JSON: its row is a dead letter", "row", row, "event",
	       event, "destination", destination);
	const char *params[] = { row, destination, claimed_by };
	PGresult *r = PQexecParams(c,
				   "UPDATE outbox SET state = 'dead', claimed_by = NULL, claimed_until = NULL, "
				   " sender_told_at = now(), last_error = 'its stored event does not parse as JSON (a "
				   "number stored before the thirtieth session?): not sent' WHERE id = $1::bigint "
				   " AND destination = $2 AND claimed_by = $3 AND state = 'in_flight'",
				   3, NULL, params, NULL, NULL, 0);
	long changed = store_check(c, r, PGRES_COMMAND_OK, e) == CW_OK ? atol(PQcmdTuples(r)) : -1;
	PQclear(r);
	return changed;
}

/* Claims due rows of one destination into rows[*n...]; false on failure.
 * A row whose stored event does not parse is made a dead letter in the
 * claim's transaction (counted in *dead, which the caller adds to the
 * dispatcher's once the claim commits); memory short for one fails the
 * claim (rolled back: a later row of its room must not go first). */
static bool claim_destination(struct lane *l, const char *dest, struct outbox_row **rows, int *n, int *cap,
			      long *dead, cw_errmsg *e)
{
	struct dispatcher *d = l->d;
	char limit[16], timeout[16], bytes[24];
	snprintf(limit, sizeof(limit), "%d", d->o.batch_max);
	snprintf(timeout, sizeof(timeout), "%ld", d->o.claim_timeout_s);
	snprintf(bytes, sizeof(bytes), "%ld", d->o.claim_bytes > 0 ? d->o.claim_bytes : CLAIM_BYTES_DEFAULT);
	const char *params[] = { limit, l->name, timeout, dest, bytes };
	PGresult *r = PQexecPrepared(l->c, "cw_claim", 5, params, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		store_result_err(l->c, r, e);
		PQclear(r);
		return false;
	}
	int got = PQntuples(r);
	if (*n + got > *cap) {
		int ncap = (*n + got) * 2;
		struct outbox_row *p = realloc(*rows, (size_t)ncap * sizeof(**rows));
		if (!p) {
			PQclear(r);
			cw_fail(e, CW_ENOMEM, "out of memory");
			return false;
		}
		*rows = p;
		*cap = ncap;
	}
	unsigned omit = d->o.local_deliver && strcmp(dest, d->o.local_destination) == 0 ? d->o.local_omits : 0;
	for (int i = 0; i < got; i++) {
		bool unreadable;
		json_t *ev = outbox_event_json_omit(r, i, 3, omit, &unreadable);
		long changed = 0;
		if (!ev && (!unreadable || (changed = outbox_dead_unreadable(l->c, PQgetvalue(r, i, 0),
									      PQgetvalue(r, i, 3), dest, l->name,
									      e)) < 0)) {
			if (!unreadable)
				cw_fail(e, CW_ENOMEM, "out of memory");
			PQclear(r);
			return false;
		}
		if (!ev) {
			*dead += changed;
			continue;
		}
		struct outbox_row *row = &(*rows)[(*n)++];
		memset(row, 0, sizeof(*row));
		row->id = atoll(PQgetvalue(r, i, 0));
		cw_copy_cut(row->destination, sizeof(row->destination), PQgetvalue(r, i, 1));
		row->attempts = atoi(PQgetvalue(r, i, 2));
		row->event = ev;
		row->event_id = atoll(PQgetvalue(r, i, 10));
		row->target_id = atoll(PQgetvalue(r, i, 11));
		json_t *stored = json_object_get(row->event, "type");
		if (!stored)
			json_object_set_new_nocheck(row->event, "type", col_string(r, i, 12));
		const char *type = stored ? json_string_value(stored) : PQgetvalue(r, i, 12);
		row->typing = type && strcmp(type, "typing") == 0;
		row->expired = PQgetvalue(r, i, 13)[0] == 't';
		row->accepted_ms = atoll(PQgetvalue(r, i, 8));
	}
	PQclear(r);
	return true;
}

/* The claim's opening, in one round trip: the transaction, the lock,
 * whether any claim ran out (a daemon died mid-delivery), and the peers'
 * push destinations (lane_stmts' cw_claim_lock, cw_claim_ran_out,
 * cw_push_peers).  The statements are constant text (several in one
 * simple query take no parameters): the local destination, which is
 * configuration, is added by the caller (*local, "" for none; until the
 * twentieth session it was quoted into the text).  Rows whose claim ran
 * out are then taken back (cw_take_back, a second round trip only when
 * there are some), due again or dead: how many of each in *pending and
 * *dead, for the caller to count once the claim commits; the ids of those
 * due again in *recovered (the caller frees it), for the policy's screen.
 * Returns the peers' destinations, or NULL with e set (the caller rolls
 * back). */
static PGresult *claim_open(struct lane *l, const char **local, long *pending, long *dead, PGresult **recovered,
			    cw_errmsg *e)
{
	struct dispatcher *d = l->d;
	*local = d->o.local_deliver && (!d->o.local_ready || d->o.local_ready(d->o.local_ctx)) ? d->o.local_destination
												 : "";
	if (!PQsendQuery(l->c, "BEGIN; SET LOCAL synchronous_commit = off; EXECUTE cw_claim_lock; "
			       "EXECUTE cw_claim_ran_out; EXECUTE cw_push_peers")) {
		cw_fail(e, CW_EUNAVAIL, "cannot send: %s", PQerrorMessage(l->c));
		return NULL;
	}
	/* One result per statement; after an error the server skips the rest.
	 * The fourth is whether a claim ran out. */
	PGresult *r, *last = NULL;
	bool failed = false, ran_out = false;
	*recovered = NULL;
	for (int k = 0; (r = PQgetResult(l->c)); k++) {
		ExecStatusType st = PQresultStatus(r);
		if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
			if (!failed)
				store_result_err(l->c, r, e);
			failed = true;
			PQclear(r);
			continue;
		}
		if (k == 3 && PQntuples(r) == 1)
			ran_out = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
		PQclear(last);
		last = r;
	}
	if (failed || !last || PQresultStatus(last) != PGRES_TUPLES_OK) {
		if (!failed)
			cw_fail(e, CW_EUNAVAIL, "the claim's opening answered nothing: %s", PQerrorMessage(l->c));
		PQclear(last);
		return NULL;
	}
	if (ran_out) {
		char budget[16], timeout[16];
		snprintf(budget, sizeof(budget), "%d", d->o.retry_budget);
		snprintf(timeout, sizeof(timeout), "%ld", d->o.claim_timeout_s);
		const char *params[] = { budget, timeout };
		r = PQexecPrepared(l->c, "cw_take_back", 2, params, NULL, NULL, 0);
		if (store_check(l->c, r, PGRES_TUPLES_OK, e)) {
			PQclear(last);
			return NULL;
		}
		for (int i = 0; i < PQntuples(r); i++)
			(*(strcmp(PQgetvalue(r, i, 0), "dead") == 0 ? dead : pending))++;
		*recovered = r;
	}
	return last;
}

/* The rows ids (n), in flight under the lane's claim or waiting, decided
 * again under the policy in force (policy_live_screen_claim): those it now
 * refuses are dropped, gone[i] set for each.  uncounted (NULL: none) marks
 * the rows whose try the claim counted but that was not made (untried:
 * never pushed, or put back while something is got ready) or does not
 * count (a 429): one of them dropped while in flight under the claim has
 * that try taken back, as release() and record() do of a row that goes
 * back to waiting, so that a dropped row's attempts are what its
 * delivery_attempts show.  Until the thirty-fourth session it kept the
 * claim's count: a row dropped before its push showed one attempt and no
 * try.  In the lane's open transaction, else one of its own. */
static cw_err screen(struct lane *l, const int64_t *ids, size_t n, const bool *uncounted, bool *gone, cw_errmsg *e)
{
	long dropped;
	return policy_live_screen_claim(l->d->o.policy, l->c, ids, n, l->name, uncounted, gone, &dropped, e);
}

/* n trues (none of the rows' tries was made), or NULL when out of memory. */
static bool *all_uncounted(size_t n)
{
	bool *u = malloc((n ? n : 1) * sizeof(*u));
	for (size_t i = 0; u && i < n; i++)
		u[i] = true;
	return u;
}

/* A claim's rows whose claim ran out and that are due again (recovered:
 * cw_take_back's rows, (state, id), those made dead left out), decided
 * again first in the claim's transaction: they were claimed, maybe,
 * before a change that their claimer, gone, never decided them under,
 * and any lane may take them at once. */
static cw_err screen_recovered(struct lane *l, PGresult *recovered, cw_errmsg *e)
{
	int rows = PQntuples(recovered);
	if (!l->d->o.policy || rows == 0)
		return CW_OK;
	int64_t *ids = malloc((size_t)rows * sizeof(*ids));
	bool *gone = malloc((size_t)rows * sizeof(*gone));
	cw_err rc = ids && gone ? CW_OK : cw_fail(e, CW_ENOMEM, "out of memory");
	int n = 0;
	for (int i = 0; !rc && i < rows; i++)
		if (strcmp(PQgetvalue(recovered, i, 0), "pending") == 0 && !PQgetisnull(recovered, i, 1))
			ids[n++] = atoll(PQgetvalue(recovered, i, 1));
	if (!rc && n > 0)
		rc = screen(l, ids, (size_t)n, NULL, gone, e); /* pending: their tries are logged (cw_take_back) */
	free(ids);
	free(gone);
	return rc;
}

/* Rows $1 of the lane's claim ($2) back to pending, due at once, the
 * attempt the claim counted taken back: untried (release) or never known
 * to be claimed (release_orphans). */
#define RELEASE_SQL \
	"UPDATE outbox SET state = 'pending', claimed_by = NULL, claimed_until = NULL, " \
	" attempts = greatest(attempts - 1, 0) WHERE id = ANY($1::bigint[]) AND state = 'in_flight' " \
	" AND claimed_by = $2"

/* A selection of a batch's rows: rows[at[0]], ..., rows[at[n - 1]], or
 * rows[0..n) for at NULL (record_outcomes picks its rows by index: until
 * the forty-seventh session it copied each whole row, 900 bytes, into a
 * selection of its own per outcome). */
#define ROW_AT(rows, at, i) (&(rows)[(at) ? (at)[i] : (i)])

/* Until the fifty-ninth session each id was printed with snprintf; until
 * the sixty-second the literal was built here (cw_pg_ids_begin). */
static char *id_array(const struct outbox_row *rows, const size_t *at, size_t n)
{
	struct cw_pg_ids a;
	if (!cw_pg_ids_begin(&a, NULL, n))
		return NULL;
	for (size_t i = 0; i < n; i++)
		cw_pg_ids_add(&a, (long long)ROW_AT(rows, at, i)->id);
	return cw_pg_ids_end(&a);
}

#define ORPHANS_SAID "rows of a claim whose commit was not answered are due again"

/* Puts back the rows of l->orphans still in flight under the lane's own
 * name: the lane delivers nothing between its claims, so they are no
 * one's (another lane's claim of them, once theirs ran out, bears another
 * name).  Due at once, their attempt not counted: none was made.  False
 * with e set if it could not (kept for the next claim). */
static bool release_orphans(struct lane *l, const char *said, cw_errmsg *e)
{
	/* decided again first (the claim that took them was not, see
	 * screen_claimed): any lane may take them once they are back */
	if (l->d->o.policy) {
		bool *gone = malloc(l->norphans * sizeof(*gone)), *untried = all_uncounted(l->norphans);
		if (!gone || !untried || screen(l, l->orphans, l->norphans, untried, gone, e)) {
			if (!gone || !untried)
				cw_fail(e, CW_ENOMEM, "out of memory");
			free(gone);
			free(untried);
			return false;
		}
		free(gone);
		free(untried);
	}
	char *ids = cw_pg_ids(l->orphans, l->norphans, NULL);
	if (!ids) {
		cw_fail(e, CW_ENOMEM, "out of memory");
		return false;
	}
	const char *params[] = { ids, l->name };
	PGresult *r = PQexecParams(l->c,
				   RELEASE_SQL, 2, NULL, params, NULL, NULL, 0);
	free(ids);
	bool ok = store_check(l->c, r, PGRES_COMMAND_OK, e) == CW_OK;
	if (ok) {
		if (atol(PQcmdTuples(r)) > 0)
			LOG_KV(CW_LOG_INFO, said, "rows", PQcmdTuples(r));
		free(l->orphans);
		l->orphans = NULL;
		l->norphans = 0;
	}
	PQclear(r);
	return ok;
}

/* After a lane of the process lost its connection and made it again
 * (the database restarted, or crashed): every row still in flight under
 * this lane's name, which delivers nothing between its claims (the lane
 * calls this between them), becomes an orphan and is released
 * (release_orphans).  Besides a claim whose COMMIT went unanswered, they
 * are deliveries whose recording a crash of PostgreSQL forgot: the
 * dispatcher's bookkeeping commits without waiting for the disk flush
 * (claim_open), so after the crash they are back in flight, claimed by
 * the lane that delivered them, which may be an idle one whose own
 * connection was not even used since.  Until the forty-sixth session
 * those waited for their claim to run out (a minute by default), every
 * later row of their rooms behind them.  False with e set if it could not
 * (tried again). */
static bool adopt_own_rows(struct lane *l, cw_errmsg *e)
{
	const char *params[] = { l->name };
	PGresult *r = PQexecParams(l->c, "SELECT id FROM outbox WHERE state = 'in_flight' AND claimed_by = $1", 1,
				   NULL, params, NULL, NULL, 0);
	if (store_check(l->c, r, PGRES_TUPLES_OK, e))
		return false;
	size_t n = (size_t)PQntuples(r);
	int64_t *ids = n ? malloc(n * sizeof(*ids)) : NULL;
	if (n && !ids) {
		PQclear(r);
		cw_fail(e, CW_ENOMEM, "out of memory");
		return false;
	}
	for (size_t i = 0; i < n; i++)
		ids[i] = strtoll(PQgetvalue(r, (int)i, 0), NULL, 10);
	PQclear(r);
	/* the orphans known before are among them, unless taken back since */
	bool known = l->orphans != NULL;
	free(l->orphans);
	l->orphans = ids;
	l->norphans = n;
	return !ids || release_orphans(l, known ? ORPHANS_SAID : "rows left in flight when the database went are due again "
				       "(their delivery's recording lost, or their claim's commit unanswered)", e);
}

static void release(struct lane *l, const struct outbox_row *rows, const size_t *at, size_t n);

/* The rows of a claim just committed, decided again under the policy in
 * force when this process's recheck of a change was not over as the
 * claim began or ended, or a change came meanwhile (policy_live_stamp):
 * the recheck goes in batches, and a row it had not reached when a lane
 * claimed it was delivered undecided (until the thirty-second session).
 * Those now refused are dropped (policy_live_screen) and taken out of
 * rows.  The rows left; -1 when the rows could not be decided (they are
 * put back, due at once: their next claim decides them). */
static int screen_claimed(struct lane *l, struct outbox_row *rows, int n)
{
	int64_t *ids = malloc((size_t)n * sizeof(*ids));
	bool *gone = malloc((size_t)n * sizeof(*gone)), *untried = all_uncounted((size_t)n);
	cw_errmsg e;
	cw_err rc = ids && gone && untried ? CW_OK : cw_fail(&e, CW_ENOMEM, "out of memory");
	for (int i = 0; !rc && i < n; i++)
		ids[i] = rows[i].id;
	if (!rc)
		rc = screen(l, ids, (size_t)n, untried, gone, &e); /* not sent yet */
	int k = 0;
	if (rc) {
		LOG_KV(CW_LOG_WARN, "deciding claimed rows again failed; they wait for the next claim", "detail", e.msg);
		release(l, rows, NULL, (size_t)n);
		for (int i = 0; i < n; i++)
			json_decref(rows[i].event);
		k = -1;
	} else {
		for (int i = 0; i < n; i++) {
			if (gone[i])
				json_decref(rows[i].event);
			else
				rows[k++] = rows[i];
		}
	}
	free(ids);
	free(gone);
	free(untried);
	return k;
}

/* Claims the due rows of one push destination that no other lane has:
 * the first, from where the lane's last claim left off, that has rows due.
 * Returns how many (rows are the caller's, and the destination stays the
 * lane's, in l->held, until it gives it back), or -1. */
static int claim(struct lane *l, struct outbox_row **out)
{
	struct dispatcher *d = l->d;
	*out = NULL;
	cw_errmsg e;
	struct outbox_row *rows = NULL;
	int n = 0, cap = 0;
	long dead = 0; /* rows made dead letters by the claim (unreadable events, run-out claims) */
	long back = 0; /* rows whose claim ran out, due again */
	atomic_fetch_add(&d->claim_tries, 1);
	if (l->orphans && !release_orphans(l, ORPHANS_SAID, &e))
		goto fail_rows;
	bool unsettled = false, unsettled_after = false;
	uint64_t stamp = d->o.policy ? policy_live_stamp(d->o.policy, &unsettled) : 0;
	uint64_t facts = d->o.policy ? policy_live_facts(d->o.policy) : 0;
	/* before the claim's own now(): its rows are ours at least until this + timeout */
	atomic_store(&l->claimed_us, cw_now_us());
	const char *local;
	long back_dead = 0;
	PGresult *recovered = NULL;
	PGresult *dr = claim_open(l, &local, &back, &back_dead, &recovered, &e);
	if (!dr)
		goto fail;
	dead += back_dead;
	cw_err src = recovered ? screen_recovered(l, recovered, &e) : CW_OK;
	PQclear(recovered);
	if (src) {
		PQclear(dr);
		goto fail;
	}
	int npeers = PQntuples(dr), nd = npeers + (local[0] != '\0');
	atomic_store(&d->ndest, nd);
	atomic_store(&d->ndest_us, cw_now_us());
	for (int k = 0; k < nd && n == 0; k++) {
		unsigned i = (l->next + (unsigned)k) % (unsigned)nd;
		const char *name = (int)i < npeers ? PQgetvalue(dr, (int)i, 0) : local;
		if (!take_destination(l, name))
			continue;
		int64_t t0 = cw_now_us();
		if (!claim_destination(l, name, &rows, &n, &cap, &dead, &e)) {
			PQclear(dr);
			goto fail;
		}
		int64_t took = cw_now_us() - t0;
		if (n) {
			l->next = i + 1;
		} else {
			give_destination(l);
			/* Nothing due, found slowly: a big backlog whose rooms all
			 * wait (a destination down for a while; the scan walks the
			 * backlog).  Every commit's notification would scan it
			 * again, a core of the database's spent on finding nothing,
			 * under the claim lock that every lane takes.  Paused so
			 * that such scans take at most a tenth of the time; new
			 * rows of a room that does not wait wait that long more. */
			if (took >= CLAIM_SLOW_US) {
				pause_destination(d, name, took * PAUSE_FACTOR < PAUSE_MAX_US ? took * PAUSE_FACTOR : PAUSE_MAX_US);
				atomic_fetch_add(&d->npaused, 1);
			}
		}
	}
	PQclear(dr);
	if (store_exec(l->c, "COMMIT", &e)) {
		/* Committed or not, the answer lost with the connection: if it
		 * was, the rows are in flight under this lane's name, and no
		 * one would send them before their claim ran out (a minute by
		 * default) while the rest of their rooms waited behind them. */
		if (n && (l->orphans = malloc((size_t)n * sizeof(*l->orphans)))) {
			for (int i = 0; i < n; i++)
				l->orphans[i] = rows[i].id;
			l->norphans = (size_t)n;
		}
		LOG_KV(CW_LOG_WARN, "outbox claim failed", "detail", e.msg);
		goto fail_rows;
	}
	atomic_fetch_add(&d->dead, (uint_fast64_t)dead);
	atomic_fetch_add(&d->retried, (uint_fast64_t)back);
	if (back || back_dead) {
		char again[24], gone[24];
		snprintf(again, sizeof(again), "%ld", back);
		snprintf(gone, sizeof(gone), "%ld", back_dead);
		LOG_KV(back_dead ? CW_LOG_WARN : CW_LOG_INFO,
		       "rows whose claim ran out (their process stopped mid-delivery?) were taken back", "due_again", again,
		       "dead", gone);
	}
	if (d->o.policy) {
		uint64_t after = policy_live_stamp(d->o.policy, &unsettled_after);
		if (n && (unsettled || unsettled_after || after != stamp) && (n = screen_claimed(l, rows, n)) <= 0) {
			free(rows);
			give_destination(l);
			return n;
		}
		l->facts = facts;
	}
	if (n)
		qsort(rows, (size_t)n, sizeof(*rows), cmp_row);
	*out = rows;
	return n;
fail:
	LOG_KV(CW_LOG_WARN, "outbox claim failed", "detail", e.msg);
	store_exec(l->c, "ROLLBACK", &e);
fail_rows:
	give_destination(l);
	for (int i = 0; i < n; i++)
		json_decref(rows[i].event);
	free(rows);
	return -1;
}

long outbox_retry_after_ms(int64_t secs, int64_t ms)
{
	if (secs > RETRY_AFTER_MAX_MS / 1000)
		return RETRY_AFTER_MAX_MS;
	if (secs > 0 && secs * 1000 > ms)
		ms = secs * 1000;
	return ms <= 0 ? 0 : ms > RETRY_AFTER_MAX_MS ? RETRY_AFTER_MAX_MS : (long)ms;
}

/* The rows a recording in several statements (record_outcomes) found
 * pending again, counted as retries at its end (retries_count): a later
 * statement's dead row may take one of them down (cw_record's behind), and
 * then its try ended dead, counted so and not also as a retry (until the
 * forty-fourth session it was counted as both).  ids: of cap, n of them
 * recorded, 0 for one taken down since. */
struct retries {
	int64_t *ids;
	size_t n, cap;
	bool sorted;
};

static int cmp_id(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

/* Row id, found pending again earlier in the recording, was taken down
 * since (dead): not a retry after all. */
static void retries_taken_down(struct retries *rt, int64_t id)
{
	if (!rt->n)
		return;
	if (!rt->sorted) {
		qsort(rt->ids, rt->n, sizeof(*rt->ids), cmp_id);
		rt->sorted = true;
	}
	int64_t *at = bsearch(&id, rt->ids, rt->n, sizeof(*rt->ids), cmp_id);
	if (at)
		*at = 0;
}

static void retries_count(struct dispatcher *d, const struct retries *rt)
{
	uint_fast64_t k = 0;
	for (size_t i = 0; i < rt->n; i++)
		k += rt->ids[i] != 0;
	atomic_fetch_add(&d->retried, k);
}

/* Records the attempt of rows and moves them on: delivered, or pending
 * again after the backoff (at least retry_after_ms), or dead once the retry
 * budget is spent.  A 429 is not an attempt that counts: the far side is
 * up and asked for a slower pace, which the wait gives it; counted, a long
 * burst would send messages to the dead letters.  rt: NULL, or where the
 * rows pending again go, counted later (struct retries). */
static void record(struct lane *l, const struct outbox_row *rows, const size_t *at, size_t n, bool ok, long code,
		   const char *why, int64_t started_ms, long retry_after_ms, struct retries *rt)
{
	struct dispatcher *d = l->d;
	char *ids = id_array(rows, at, n);
	if (!ids)
		return;
	char codes[16], budget[16], base[24], max[24], started[24], wait[24];
	snprintf(codes, sizeof(codes), "%ld", code);
	snprintf(budget, sizeof(budget), "%d", d->o.retry_budget);
	snprintf(base, sizeof(base), "%ld", d->o.retry_base_ms);
	snprintf(max, sizeof(max), "%ld", d->o.retry_max_ms);
	snprintf(started, sizeof(started), "%lld", (long long)started_ms);
	snprintf(wait, sizeof(wait), "%ld", outbox_retry_after_ms(0, retry_after_ms));
	bool limited = !ok && code == 429;
	/* The delivered rows' remote ids ($13: see cw_record), NULL when
	 * none has one (every adapter but Matrix's); out of memory, they
	 * are not recorded (nor are they when the statement fails), as a
	 * failed recording of them was only logged before. */
	char *remote = NULL;
	json_t *rid = NULL; /* made at the first row with an id: none on the XMPP and peers' paths */
	bool nomem = false;
	for (size_t i = 0; ok && !nomem && i < n; i++) {
		const struct outbox_row *row = ROW_AT(rows, at, i);
		if (!row->remote_id[0])
			continue;
		char key[24];
		snprintf(key, sizeof(key), "%lld", (long long)row->id);
		if (!rid && !(rid = json_object()))
			nomem = true;
		else
			json_object_set_new(rid, key, json_string(row->remote_id));
	}
	if (rid && json_object_size(rid))
		remote = json_dumps(rid, JSON_COMPACT);
	json_decref(rid);
	/* The destination is named (every row of a lane's batch has it): a
	 * generic plan may take the (state, destination, id) index, which
	 * without it walks every row in flight once per id (100 ms and more
	 * a batch of 500). */
	const char *params[] = { ids, ok ? "t" : "f", codes, why, budget, base, max, started, wait, limited ? "f" : "t",
				 l->name, ROW_AT(rows, at, 0)->destination, remote };
	/* One statement: the attempts are recorded and the rows move on.  Its
	 * commit does not wait for the WAL flush (set_config(..., true) holds
	 * for this statement's own transaction): see claim_open. */
	cw_errmsg e;
	PGresult *r = exec_claimed(l, "cw_record", NULL, 13, params, PGRES_TUPLES_OK, &e);
	if (r) {
		if (limited)
			atomic_fetch_add(&d->rate_limited, (uint64_t)PQntuples(r));
		for (int i = 0; i < PQntuples(r); i++) {
			const char *st = PQgetvalue(r, i, 0);
			int64_t id = strtoll(PQgetvalue(r, i, 1), NULL, 10);
			if (rt && strcmp(st, "pending") == 0 && rt->n < rt->cap) {
				rt->ids[rt->n++] = id;
				rt->sorted = false;
				continue;
			}
			if (rt && strcmp(st, "dead") == 0)
				retries_taken_down(rt, id);
			/* expired: its event was taken back meanwhile, not to be
			 * tried again (counted as the claim's expiry counts it) */
			atomic_fetch_add(strcmp(st, "delivered") == 0 ? &d->delivered
					 : strcmp(st, "dead") == 0    ? &d->dead
					 : strcmp(st, "expired") == 0 ? &d->expired
								      : &d->retried, 1);
		}
	} else {
		LOG_KV(CW_LOG_WARN, "recording a delivery failed; the claim will run out and the rows go again",
		       "detail", e.msg);
	}
	PQclear(r);
	free(remote);
	free(ids);
}

/* Runs sql, an UPDATE of claimed rows (rows, at: ROW_AT) whose ids are
 * $1 (and p2, when not NULL, $2); the rows it
 * changed, or -1 after logging that what failed (the claim then runs out
 * and the rows go again). */
static long update_claimed(struct lane *l, const struct outbox_row *rows, const size_t *at, size_t n,
			   const char *sql, const char *p2, const char *what)
{
	char *ids = id_array(rows, at, n);
	if (!ids)
		return -1;
	const char *params[] = { ids, l->name, p2 };
	cw_errmsg e;
	PGresult *r = exec_claimed(l, NULL, sql, p2 ? 3 : 2, params, PGRES_COMMAND_OK, &e);
	long changed = -1;
	if (r)
		changed = atol(PQcmdTuples(r));
	else
		LOG_KV(CW_LOG_WARN, what, "detail", e.msg);
	PQclear(r);
	free(ids);
	return changed;
}

/* Rows the adapter did not try (the daemon is stopping): back to pending
 * as they were, the attempt the claim counted taken back, due at once. */
static void release(struct lane *l, const struct outbox_row *rows, const size_t *at, size_t n)
{
	update_claimed(l, rows, at, n,
		       RELEASE_SQL, NULL,
		       "releasing untried rows failed; the claim will run out and the rows go again");
}

/* Rows the adapter is getting something ready for (outcome 3): pending
 * again, the attempt not counted, due after ms. */
static void release_after(struct lane *l, const struct outbox_row *rows, const size_t *at, size_t n, long ms)
{
	char wait[24];
	snprintf(wait, sizeof(wait), "%ld", ms);
	update_claimed(l, rows, at, n,
		       "UPDATE outbox SET state = 'pending', claimed_by = NULL, claimed_until = NULL, "
		       " attempts = greatest(attempts - 1, 0), next_attempt_at = now() + make_interval(secs => $3::bigint "
		       " / 1000.0) WHERE id = ANY($1::bigint[]) AND state = 'in_flight' AND claimed_by = $2", wait,
		       "releasing waiting rows failed; the claim will run out and the rows go again");
}

/* Rows the recipient's side refused for good (outcome 4: a Matrix user
 * banned the sender's ghost from their room): dropped, with why, as a
 * row the policy denied is (the sender sees "not delivered"). */
static void drop_refused(struct lane *l, const struct outbox_row *rows, const size_t *at, size_t n)
{
	const char *why = ROW_AT(rows, at, 0)->why;
	update_claimed(l, rows, at, n,
		       "UPDATE outbox SET state = 'dropped', claimed_by = NULL, claimed_until = NULL, last_error = $3 "
		       "WHERE id = ANY($1::bigint[]) AND state = 'in_flight' AND claimed_by = $2",
		       why[0] ? why : "refused by the recipient's side",
		       "dropping refused rows failed; the claim will run out and the rows go again");
}

/* Rows no event of the destination's kind can be made of (outcome 5: a
 * stored event with no type or content): dead now, with why, since no
 * retry can help.  Until the twenty-fourth session such a row failed as a
 * far side that is down does: it held its room's later rows through
 * every retry, then took them down with it.  Its sender is not told in
 * the chat (marked told): dispatcher_dead_text says the destination could
 * not be reached and a replay may help, neither true of it; the operator
 * sees it, with why, among the dead letters, and a peer's user sees it
 * not delivered. */
static void dead_now(struct lane *l, const struct outbox_row *rows, const size_t *at, size_t n)
{
	const char *why = ROW_AT(rows, at, 0)->why;
	long changed = update_claimed(l, rows, at, n,
				      "UPDATE outbox SET state = 'dead', claimed_by = NULL, claimed_until = NULL, "
				      "last_error = $3, sender_told_at = now() "
				      "WHERE id = ANY($1::bigint[]) AND state = 'in_flight' AND claimed_by = $2",
				      why[0] ? why : "no event of the destination's kind can be made of it",
				      "making rows dead failed; the claim will run out and the rows go again");
	if (changed > 0)
		atomic_fetch_add(&l->d->dead, (uint_fast64_t)changed);
}

static bool same_failure(const struct outbox_row *a, const struct outbox_row *b)
{
	return a->code == b->code && a->retry_after_ms == b->retry_after_ms && strcmp(a->why, b->why) == 0;
}

/* Whether a failed row's try spent the retry budget (a 429's does not:
 * cw_record's $10): cw_record makes it dead. */
static bool spent(const struct lane *l, const struct outbox_row *row)
{
	return row->code != 429 && row->attempts >= l->d->o.retry_budget;
}

/* dead[i]: whether failed row i (not taken) goes dead in this record:
 * spent, or failed for the same reason as an earlier spent row of its
 * room (cw_record makes it dead with that one, in the same statement).
 * room: n slots for the rows' rooms, each read from its event once
 * (until the forty-fourth session every earlier row's room was read again
 * for each row).  The comparisons stay pairwise, as the grouping of the
 * failures by reason below does (a batch is at most dispatcher.batch_max
 * rows). */
static void mark_dying(const struct lane *l, const struct outbox_row *rows, size_t n, const bool *taken, bool *dead,
		       const char **room)
{
	for (size_t i = 0; i < n; i++) {
		room[i] = json_string_value(json_object_get(rows[i].event, "room"));
		if (taken[i])
			continue;
		dead[i] = spent(l, &rows[i]);
		for (size_t x = 0; !dead[i] && room[i] && x < i; x++)
			dead[i] = rows[x].outcome <= 0 && spent(l, &rows[x]) && room[x] && strcmp(room[x], room[i]) == 0 &&
				  same_failure(&rows[x], &rows[i]);
	}
}

/* The rows' own outcomes: the delivered ones in one statement, the failed
 * ones in one per reason, the untried ones (2) released, the waiting ones
 * (3) released for a while, the refused ones (4) dropped, the
 * undeliverable ones (5) dead, one statement per reason.  The failed
 * rows that go dead (mark_dying) are recorded last: a dead row takes down its room's later rows that wait (cw_record's
 * behind), which by then include a later row of its room that failed for
 * another reason in the same batch (XMPP: the first one's stanza lost with
 * its stream, the second's not made), recorded pending before it.  Until
 * the forty-third session the failures were recorded in the batch's order
 * of reasons: such a later row, still in flight when the dead one was
 * recorded, went on, and was delivered before the dead one's replay.  The
 * tries that end pending are counted at the end (struct retries): such a
 * row's try ended dead. */
static void record_outcomes(struct lane *l, struct outbox_row *rows, size_t n, int64_t t0)
{
	size_t *sel = malloc(n * sizeof(*sel));
	bool *taken = calloc(n, sizeof(bool)), *dead = calloc(n, sizeof(bool));
	struct retries rt = { malloc(n * sizeof(int64_t)), 0, n, true };
	const char **room = malloc(n * sizeof(*room));
	if (!sel || !taken || !dead || !rt.ids || !room) {
		free(sel);
		free(taken);
		free(dead);
		free(rt.ids);
		free(room);
		return; /* the claim runs out and the rows go again */
	}
	size_t k = 0;
	for (size_t i = 0; i < n; i++)
		if (rows[i].outcome == 1) {
			sel[k++] = i;
			taken[i] = true;
		}
	if (k)
		record(l, rows, sel, k, true, 200, NULL, t0, 0, NULL);
	k = 0;
	for (size_t i = 0; i < n; i++)
		if (rows[i].outcome == 2) {
			sel[k++] = i;
			taken[i] = true;
		}
	if (k)
		release(l, rows, sel, k);
	k = 0;
	long wait = 0;
	for (size_t i = 0; i < n; i++)
		if (rows[i].outcome == 3) {
			sel[k++] = i;
			taken[i] = true;
			wait = rows[i].retry_after_ms > wait ? rows[i].retry_after_ms : wait;
		}
	if (k)
		release_after(l, rows, sel, k, wait);
	for (size_t i = 0; i < n; i++) {
		if (taken[i] || (rows[i].outcome != 4 && rows[i].outcome != 5))
			continue;
		k = 0;
		for (size_t x = i; x < n; x++)
			if (!taken[x] && rows[x].outcome == rows[i].outcome && strcmp(rows[x].why, rows[i].why) == 0) {
				sel[k++] = x;
				taken[x] = true;
			}
		if (rows[i].outcome == 4)
			drop_refused(l, rows, sel, k);
		else
			dead_now(l, rows, sel, k);
	}
	mark_dying(l, rows, n, taken, dead, room);
	for (int last = 0; last < 2; last++)
		for (size_t i = 0; i < n; i++) {
			if (taken[i] || dead[i] != last)
				continue;
			k = 0;
			for (size_t x = i; x < n; x++)
				if (!taken[x] && dead[x] == last && same_failure(&rows[x], &rows[i])) {
					sel[k++] = x;
					taken[x] = true;
				}
			record(l, rows, sel, k, false, rows[i].code, rows[i].why[0] ? rows[i].why : "not delivered", t0,
			       rows[i].retry_after_ms, &rt);
		}
	retries_count(l->d, &rt);
	free(sel);
	free(taken);
	free(dead);
	free(rt.ids);
	free(room);
}

/* Typing is best-effort (spec/interop-api.md): a notification accepted
 * longer ago than dispatcher.typing_stale_ms (its destination was down, a
 * backlog, a consent that came later) would show someone typing who
 * stopped long ago; it is expired instead of sent.  Matrix clients time
 * typing out after 30 s; an XMPP chat state lasts until the next one, so a
 * late "composing" would never end. */
static bool stale_typing(const struct outbox_row *row, int64_t now_ms, long stale_ms)
{
	if (!row->typing || stale_ms <= 0)
		return false;
	return now_ms - row->accepted_ms > stale_ms;
}

/* A row of an event the expiry sweep took back (events.expired: its
 * content erased) is never delivered: claimed (its process died mid-try
 * and the claim was taken back, say), it is expired.  Until the
 * thirty-fifth session such a row was handed to the adapter, which could
 * make nothing of the erased content: dead, "not representable" (a CI run
 * saw an edit's row so, left by the sweep's race with a claim, see
 * expiry_sql). */
static bool unsendable(const struct outbox_row *row, int64_t now_ms, long stale_ms)
{
	return row->expired || stale_typing(row, now_ms, stale_ms);
}

/* Expires the claimed rows (see unsendable). */
static void expire(struct lane *l, const struct outbox_row *rows, size_t n)
{
	long changed = update_claimed(l, rows, NULL, n,
		"UPDATE outbox SET state = 'expired', claimed_by = NULL, claimed_until = NULL, "
		" last_error = CASE WHEN (SELECT e.expired FROM events e WHERE e.id = outbox.event_id) "
		"  THEN 'its message expired before it was delivered: not sent' "
		"  ELSE '" CW_TYPING_STALE_ERROR "' END "
		"WHERE id = ANY($1::bigint[]) AND state = 'in_flight' AND claimed_by = $2", NULL,
		"expiring rows failed; the claim will run out and the rows go again");
	if (changed > 0)
		atomic_fetch_add(&l->d->expired, (uint64_t)changed);
}

/* Takes the unsendable rows (stale typing, an expired event) out of rows
 * (keeping the others' order) and expires them; the rows left.  rows are
 * the lane's l->rows, which the keeper reads under d->mu (their ids, to
 * renew their claims): they are moved, and l->nrows cut to the rows left,
 * under it too (the adapters write only the rows' other fields).  Unlocked until the thirty-second
 * session, the keeper could read an id while a row was copied over it (a
 * data race, a review's finding). */
static size_t drop_unsendable(struct lane *l, struct outbox_row *rows, size_t n)
{
	int64_t now = cw_wall_ms();
	long ms = l->d->o.typing_stale_ms;
	size_t stale = 0;
	for (size_t i = 0; i < n; i++)
		stale += unsendable(&rows[i], now, ms);
	if (!stale)
		return n;
	struct outbox_row *old = malloc(stale * sizeof(*old));
	if (!old)
		return n; /* sent late rather than not at all */
	size_t kept = 0, k = 0;
	pthread_mutex_lock(&l->d->mu);
	for (size_t i = 0; i < n; i++) {
		if (unsendable(&rows[i], now, ms))
			old[k++] = rows[i];
		else
			rows[kept++] = rows[i];
	}
	if (l->rows == rows)
		l->nrows = kept;
	pthread_mutex_unlock(&l->d->mu);
	expire(l, old, k);
	for (size_t i = 0; i < k; i++)
		json_decref(old[i].event);
	free(old);
	return kept;
}

/* The try of the rows a fail-back's screen dropped (gone[i] of ids[i],
 * rows[at[i]]), recorded as record() records a failed one: the push was
 * made, and the trace shows it (until the thirty-third session the drop
 * came first, and the recording, of the rows still in flight under the
 * claim, left them out).  Only the rows that were tried (per_row: outcome
 * -1 or 0, as record_outcomes records; else every row from the failure
 * on), each with its code and why (per_row) or the batch's. */
static cw_err record_dropped_tries(struct lane *l, const struct outbox_row *rows, const size_t *at, const bool *gone,
				   size_t k, bool per_row, long code, const char *why, int64_t started_ms, cw_errmsg *e)
{
	json_t *list = json_array();
	for (size_t i = 0; list && i < k; i++) {
		const struct outbox_row *row = &rows[at[i]];
		if (!gone[i] || (per_row && row->outcome >= 2 && row->outcome <= 5))
			continue;
		const char *w = per_row ? (row->why[0] ? row->why : "not delivered") : why;
		if (json_array_append_new(list, json_pack("{s:I, s:I, s:s}", "id", (json_int_t)row->id, "code",
							  (json_int_t)(per_row ? row->code : code), "error", w))) {
			json_decref(list);
			list = NULL;
		}
	}
	if (!list)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	cw_err rc = CW_OK;
	if (json_array_size(list)) {
		char *text = json_dumps(list, JSON_COMPACT), started[24];
		snprintf(started, sizeof(started), "%lld", (long long)started_ms);
		const char *params[] = { text, started };
		PGresult *r = text ? PQexecParams(l->c,
			"INSERT INTO delivery_attempts (outbox_id, attempt, started_at, finished_at, ok, code, error) "
			"SELECT t.id, coalesce((SELECT max(x.attempt) FROM delivery_attempts x WHERE x.outbox_id = t.id), 0) + 1, "
			" to_timestamp($2::bigint / 1000.0), now(), false, NULLIF(t.code, 0), t.error "
			"FROM jsonb_to_recordset($1::jsonb) AS t(id bigint, code int, error text) ORDER BY t.id "
			"ON CONFLICT (outbox_id, attempt) DO NOTHING", 2, NULL, params, NULL, NULL, 0) : NULL;
		rc = text ? store_check(l->c, r, PGRES_COMMAND_OK, e) : cw_fail(e, CW_ENOMEM, "out of memory");
		if (!rc)
			PQclear(r);
		free(text);
	}
	json_decref(list);
	return rc;
}

/* The rows of the claim not delivered (per_row: those whose outcome is
 * not 1; else those from ok on) go back to waiting: when a view was put
 * in force since the claim began (policy_live_facts moved from l->facts:
 * a change of the rules, a user's block), they are decided under it
 * first, and those refused dropped (the recording
 * after passes over them: no longer in flight), so that a retry does not
 * deliver what the new rules refuse.  Until the thirty-second session only
 * the recheck's one more pass, after the claims in flight at its start ran
 * out, decided them, and a retry before it delivered them.  The try of a
 * row dropped so is recorded in the same transaction as its drop
 * (record_dropped_tries; code and why: the batch's failure, started_ms
 * when the delivery began).  False when they could not be decided: they
 * stay in flight until their claim runs out, and the claim that takes
 * them back decides them (screen_recovered). */
static bool screen_failed(struct lane *l, const struct outbox_row *rows, size_t n, bool per_row, size_t ok, long code,
			  const char *why, int64_t started_ms)
{
	struct dispatcher *d = l->d;
	/* One count: every change policy_live_stamp counts is put in force
	 * with a view, counted after it (swap_in), and l->facts was read
	 * before l's claim, so it moved for any such change since.  Until the
	 * forty-fourth session both counts were compared. */
	if (!d->o.policy || policy_live_facts(d->o.policy) == l->facts)
		return true;
	int64_t *ids = malloc(n * sizeof(*ids));
	size_t *at = malloc(n * sizeof(*at));
	bool *gone = malloc(n * sizeof(*gone)), *uncounted = malloc(n * sizeof(*uncounted));
	size_t k = 0;
	cw_errmsg e;
	cw_err rc = ids && at && gone && uncounted ? CW_OK : cw_fail(&e, CW_ENOMEM, "out of memory");
	for (size_t x = 0; !rc && x < n; x++)
		if (per_row ? rows[x].outcome != 1 : x >= ok) {
			/* the tries record_outcomes would not count: the
			 * untried (2) and waiting (3) rows' (release,
			 * release_after) and a 429's (record) */
			int o = rows[x].outcome;
			uncounted[k] = per_row ? o == 2 || o == 3 || (o <= 0 && rows[x].code == 429) : code == 429;
			at[k] = x;
			ids[k++] = rows[x].id;
		}
	if (!rc && k) {
		rc = store_exec(l->c, "BEGIN", &e);
		if (!rc)
			rc = screen(l, ids, k, uncounted, gone, &e);
		if (!rc)
			rc = record_dropped_tries(l, rows, at, gone, k, per_row, code, why, started_ms, &e);
		rc = store_end(l->c, rc, &e);
	}
	if (rc)
		LOG_KV(CW_LOG_WARN, "deciding undelivered rows again failed; their claim will run out and they go again",
		       "detail", e.msg);
	free(ids);
	free(at);
	free(gone);
	free(uncounted);
	return rc == CW_OK;
}

/* The longest wait rows[from..n) were told (retry_after_ms: a far side's
 * Retry-After or the slowdown), bounded as outbox_retry_after_ms bounds
 * it; refused_only: of the rows not delivered that a 429 or 503 refused
 * (a per-row outcome), the others' waits being their own.  What deliver
 * pauses the destination for, after a whole batch's refusal and after
 * per-row ones alike. */
static long rows_wait(const struct outbox_row *rows, size_t from, size_t n, bool refused_only)
{
	long wait = 0;
	for (size_t x = from; x < n; x++)
		if ((!refused_only || (rows[x].outcome <= 0 && (rows[x].code == 429 || rows[x].code == 503))) &&
		    rows[x].retry_after_ms > wait)
			wait = rows[x].retry_after_ms;
	return outbox_retry_after_ms(0, wait);
}

/* Delivers the claimed rows (of the lane's destination, in id order, so in
 * order per room) and records the outcome. */
static void deliver(struct lane *l, struct outbox_row *rows, size_t n)
{
	struct dispatcher *d = l->d;
	const char *dest = l->held;
	long code = 0;
	cw_errmsg e = { { 0 } };
	int64_t t0 = cw_wall_ms();
	if ((n = drop_unsendable(l, rows, n)) == 0)
		return;
	for (size_t x = 0; x < n; x++) {
		rows[x].outcome = 0;
		rows[x].code = 0;
		rows[x].retry_after_ms = 0;
		rows[x].remote_id[0] = '\0';
	}
	bool local = d->o.local_deliver && strcmp(dest, d->o.local_destination) == 0;
	size_t done = 0;
	cw_err rc = local ? d->o.local_deliver(d->o.local_ctx, l->c, dest, rows, n, &done, &code, &e)
		       : d->o.peer_deliver(d->o.peer_ctx, l->c, dest, rows, n, &done, &code, &e);
	bool per_row = false;
	for (size_t x = 0; x < n && !per_row; x++)
		per_row = rows[x].outcome != 0;
	/* hold: the rows not delivered could not be decided again; left in
	 * flight (screen_failed) */
	bool hold = !screen_failed(l, rows, n, per_row, rc == CW_OK ? n : done > n ? n : done, code, e.msg, t0);
	/* Answered 429 without saying how long to wait: the destination
	 * slows down (slowdown); a delivery ends that.  A 429 that says
	 * (Retry-After) is waited out as it says and leaves the streak as it
	 * is (until a review of the thirtieth session's change it lengthened
	 * it, and the next 429 without one waited base x 2^n).  A delivery
	 * is a row the far side took (its code 0 or a 2xx), not one done
	 * without it (a peer's row of a type it does not take, carried in a
	 * batch the peer answered 503: code -1 or the status): until the
	 * fiftieth session's review such a row ended the streak, and a 503
	 * between 429s made the next one wait retry_base_ms again. */
	bool limited = false, took = !per_row && (rc == CW_OK || done > 0);
	for (size_t x = 0; x < n; x++) {
		limited = limited || (rows[x].retry_after_ms == 0 &&
				      (per_row ? rows[x].outcome == -1 && rows[x].code == 429
					       : rc != CW_OK && x >= done && code == 429));
		took = took || (per_row && rows[x].outcome == 1 &&
				(rows[x].code == 0 || (rows[x].code >= 200 && rows[x].code <= 299)));
	}
	if (limited || took) {
		long slow = slowdown(d, dest, limited);
		for (size_t x = 0; slow && x < n; x++)
			if (rows[x].retry_after_ms == 0 && (per_row ? rows[x].outcome == -1 && rows[x].code == 429 : true))
				rows[x].retry_after_ms = slow;
	}
	if (per_row && hold) {
		struct outbox_row *sel = malloc(n * sizeof(*sel));
		size_t k = 0;
		for (size_t x = 0; sel && x < n; x++)
			if (rows[x].outcome == 1)
				sel[k++] = rows[x];
		if (k)
			record_outcomes(l, sel, k, t0);
		free(sel); /* out of memory: nothing recorded, the claim runs out */
	} else if (per_row) {
		/* The rows' own waits (next_attempt_at), not the destination's:
		 * a Matrix 429 is one ghost's limit, not the homeserver's. */
		record_outcomes(l, rows, n, t0);
	} else {
		if (rc == CW_OK)
			done = n;
		if (done > n)
			done = n;
		if (done)
			record(l, rows, NULL, done, true, rc ? 200 : code, NULL, t0, 0, NULL);
		if (done < n) {
			/* The whole destination was told to wait (a peer's 429 or
			 * 503 answers for all its rooms): no lane claims it until
			 * then, so its other rooms' rows are not sent into the
			 * same refusal one batch after the other. */
			long wait = rows_wait(rows, done, n, false);
			if (!hold)
				record(l, rows + done, NULL, n - done, false, code, e.msg, t0, wait, NULL);
			if (wait > 0)
				pause_destination(d, dest, (int64_t)wait * 1000);
		}
	}
	if (per_row && !local) {
		/* A peer's 429 or 503 met while the events it refuses were
		 * searched (peer_out's smaller batches) answers for the whole
		 * peer, as one to the batch does (below): its wait pauses the
		 * destination, so that the rooms of the next batch are not sent
		 * into the same refusal.  Until the thirty-sixth session only the
		 * batch's own rows waited, and the next batch went at once. */
		long wait = rows_wait(rows, 0, n, true);
		if (wait > 0)
			pause_destination(d, dest, (int64_t)wait * 1000);
	}
	atomic_fetch_add(rc == CW_OK ? &d->requests_ok : &d->requests_failed, 1);
	char count[24], codes[24];
	snprintf(count, sizeof(count), "%zu", n);
	snprintf(codes, sizeof(codes), "%ld", code);
	if (rc)
		LOG_KV(CW_LOG_WARN, "delivery failed; will retry", "destination", dest, "events", count, "status", codes,
		       "detail", e.msg);
	else
		LOG_KV(CW_LOG_DEBUG, "delivered", "destination", dest, "events", count);
	for (size_t i = 0; i < n; i++)
		json_decref(rows[i].event);
}

static void *dispatcher_main(void *arg)
{
	cw_thread_name("cw-dispatcher");
	struct lane *l = arg;
	struct dispatcher *d = l->d;
	bool fresh = true; /* started, or delivered just now: claims before it waits */
	bool failed = false;
	while (!atomic_load(&d->stop)) {
		if (!ensure_conn(l)) {
			nap_until(d, l->backoff.retry_at_us);
			continue;
		}
		uint_fast64_t reconnects = atomic_load(&d->reconnects);
		if (l->adopted_at != reconnects) {
			cw_errmsg e;
			if (!adopt_own_rows(l, &e)) {
				/* quietly when its connection was one the restart broke, unused since */
				if (l->c && PQstatus(l->c) == CONNECTION_OK)
					LOG_KV(CW_LOG_WARN, "taking back rows left in flight failed; tried again", "detail",
					       e.msg);
				drop_conn(l);
				nap(d);
				continue;
			}
			l->adopted_at = reconnects;
		}
		if (!fresh) {
			/* Nothing was due that no other lane has: the watcher
			 * sleeps until a new row is notified, or a while (rows
			 * backing off become due without a notification); the
			 * other idle lanes until the watcher takes a destination. */
			if (!watch(l)) {
				/* Read what was notified meanwhile: left unread, the
				 * notifications fill the connection's buffers, its
				 * backend then waits to write them, and PostgreSQL
				 * cannot trim its notification queue past a listener
				 * that has not read (the queue grows on disk until
				 * every NOTIFY fails). */
				store_notifies(l->c, NULL, NULL);
				continue;
			}
			/* Waits for a NOTIFY (one that came while the claim ran
			 * returns at once), then reads every notification there is. */
			store_wait_notify(l->c, d->wake[0], failed ? 500 : 200, NULL, NULL);
		}
		fresh = false;
		if (all_taken(d))
			continue;
		struct outbox_row *rows;
		int n = claim(l, &rows);
		failed = n < 0;
		if (n > 0) {
			unwatch(l);
			atomic_fetch_add(&d->claims, 1);
			pthread_mutex_lock(&d->mu);
			l->rows = rows;
			l->nrows = (size_t)n;
			l->gen++;
			if (d->busy++ == 0)
				pthread_cond_signal(&d->keeper_cv);
			pthread_mutex_unlock(&d->mu);
			deliver(l, rows, (size_t)n);
			pthread_mutex_lock(&d->mu);
			l->rows = NULL;
			l->nrows = 0;
			d->busy--;
			pthread_mutex_unlock(&d->mu);
			free(rows);
			give_destination(l);
			fresh = true;
		}
	}
	unwatch(l);
	drop_conn(l);
	return NULL;
}

/* A claim holds for claim_timeout_s, after which any process may take
 * the rows back (claim_open): a delivery that takes longer (a slow peer,
 * a Matrix batch of many rows of one room, each a request) would have its
 * rows sent again by another lane while it still runs, and its outcome
 * recorded on nothing, over and over.  While any lane delivers, this
 * thread renews the claims of the rows the lanes deliver (those alone:
 * a row whose outcome could not be recorded, the database gone a moment,
 * must still come back when its claim runs out) every third of the
 * timeout, on a connection of its own.  A process that dies renews
 * nothing, so its rows still come back.  A renewal that fails is tried
 * again RENEW_RETRY_US later (or a third of the timeout, if that is
 * sooner), a connection refused or lost made again each time: until the
 * forty-sixth session the next try came a third of the timeout later, so
 * two failures in a row (a database restarting for 3.4 s under the
 * smallest timeout, 5 s) made the third try come as the claim ran out,
 * and the rows of a live delivery could be taken back and sent again. */
#define RENEW_RETRY_US 500000
static void *keeper_main(void *arg)
{
	cw_thread_name("cw-claims");
	struct dispatcher *d = arg;
	PGconn *c = NULL;
	int64_t period_us = d->o.claim_timeout_s * 1000000LL / 3;
	long failures = 0; /* renewals failed in a row */
	char timeout[24], prefix[sizeof(d->lanes[0].name)]; /* every lane's name begins with it */
	snprintf(timeout, sizeof(timeout), "%ld", d->o.claim_timeout_s);
	snprintf(prefix, sizeof(prefix), "%s/", d->name);
	pthread_mutex_lock(&d->mu);
	while (!atomic_load(&d->stop)) {
		if (!d->busy) {
			pthread_cond_wait(&d->keeper_cv, &d->mu);
			continue;
		}
		struct timespec ts;
		cw_deadline_ts(&ts, CLOCK_MONOTONIC, failures && RENEW_RETRY_US < period_us ? RENEW_RETRY_US : period_us);
		if (pthread_cond_timedwait(&d->keeper_cv, &d->mu, &ts) != ETIMEDOUT || !d->busy ||
		    atomic_load(&d->stop))
			continue;
		size_t nids = 0;
		for (int i = 0; i < d->nlanes; i++)
			nids += d->lanes[i].nrows;
		struct cw_pg_ids a;
		bool oom = !cw_pg_ids_begin(&a, NULL, nids);
		for (int i = 0; i < d->nlanes && !oom; i++) {
			struct lane *l = &d->lanes[i];
			l->renewing = l->nrows ? l->gen : 0;
			for (size_t k = 0; k < l->nrows; k++)
				cw_pg_ids_add(&a, (long long)l->rows[k].id);
		}
		char *ids = oom ? NULL : cw_pg_ids_end(&a);
		oom = !ids;
		pthread_mutex_unlock(&d->mu);
		cw_errmsg e;
		if (!c || PQstatus(c) != CONNECTION_OK) {
			store_canceller_set(&d->keeper_cancel, NULL);
			PQfinish(c);
			c = store_connect(d->url, 10000, &e);
			store_canceller_set(&d->keeper_cancel, c);
		}
		const char *params[] = { prefix, timeout, ids };
		int64_t began = cw_now_us(); /* before the statement's now() */
		PGresult *r = c && !oom ? PQexecParams(c, "UPDATE outbox SET claimed_until = now() + make_interval(secs => "
						    "$2::int) WHERE id = ANY($3::bigint[]) AND state = 'in_flight' AND "
						    "starts_with(claimed_by, $1)", 3, NULL, params, NULL, NULL, 0)
				       : NULL;
		if (r && PQresultStatus(r) == PGRES_COMMAND_OK) {
			atomic_fetch_add(&d->renewals, 1);
			if (failures) {
				char n[24];
				snprintf(n, sizeof(n), "%ld", failures);
				LOG_KV(CW_LOG_INFO, "the dispatcher's claims renewed again", "failed_tries", n);
			}
			failures = 0;
			/* The lanes still on the deliveries renewed (the same
			 * rows: not between two, when a lane writes claimed_us
			 * itself) hold their rows that much longer: a lane
			 * whose connection broke records the outcome on a new
			 * one until then (reconnect_within_claim).  Until the
			 * forty-sixth session it gave up claim_timeout_s after
			 * its claim began, renewals aside: after a delivery
			 * longer than that, a broken connection left the
			 * outcome unrecorded, and the rows, delivered, were
			 * sent again once their claim ran out. */
			pthread_mutex_lock(&d->mu);
			for (int i = 0; i < d->nlanes; i++)
				if (d->lanes[i].rows && d->lanes[i].renewing == d->lanes[i].gen &&
				    atomic_load(&d->lanes[i].claimed_us) < began)
					atomic_store(&d->lanes[i].claimed_us, began);
			pthread_mutex_unlock(&d->mu);
		} else if (failures++ == 0) /* the first of a run: then tried twice a second */
			LOG_KV(CW_LOG_WARN, "cannot renew the dispatcher's claims; trying again", "detail",
			       r ? PQresultErrorMessage(r) : oom ? "out of memory" : e.msg);
		PQclear(r);
		free(ids);
		pthread_mutex_lock(&d->mu);
	}
	pthread_mutex_unlock(&d->mu);
	store_canceller_set(&d->keeper_cancel, NULL);
	PQfinish(c);
	return NULL;
}

cw_err dispatcher_start(struct dispatcher **out, const struct dispatcher_opts *o, cw_errmsg *e)
{
	struct dispatcher *d = calloc(1, sizeof(*d));
	if (!d)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	d->o = *o;
	d->nlanes = o->lanes > 0 ? o->lanes : 1;
	d->url = strdup(o->url);
	d->name = strdup(o->name);
	d->lanes = calloc((size_t)d->nlanes, sizeof(*d->lanes));
	for (int i = 0; d->lanes && i < d->nlanes; i++)
		store_canceller_init(&d->lanes[i].cancel);
	store_canceller_init(&d->keeper_cancel);
	pthread_mutex_init(&d->mu, NULL);
	pthread_cond_init(&d->idle, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&d->keeper_cv, &ca);
	pthread_condattr_destroy(&ca);
	d->watcher = -1;
	/* Until the forty-ninth session the watcher's wait for a notification
	 * (200 or 500 ms) held the stop: 118 ms measured of a 126 ms stop.
	 * Without the pipe (-1) it still does. */
	if (pipe2(d->wake, O_NONBLOCK | O_CLOEXEC) != 0)
		d->wake[0] = d->wake[1] = -1;
	if (!d->url || !d->name || !d->lanes) {
		dispatcher_free(d);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	for (int i = 0; i < d->nlanes; i++) {
		struct lane *l = &d->lanes[i];
		l->d = d;
		snprintf(l->name, sizeof(l->name), "%s/%d", d->name, i);
		l->next = (unsigned)i; /* lanes start their claims at different destinations */
		if (pthread_create(&l->thread, NULL, dispatcher_main, l)) {
			dispatcher_free(d);
			return cw_fail(e, CW_EIO, "cannot start the dispatcher");
		}
		l->started = true;
	}
	if (pthread_create(&d->keeper, NULL, keeper_main, d)) {
		dispatcher_free(d);
		return cw_fail(e, CW_EIO, "cannot start the dispatcher");
	}
	d->keeper_started = true;
	*out = d;
	return CW_OK;
}

void dispatcher_stop(struct dispatcher *d)
{
	if (!d || store_sleepers_stop(&d->stop))
		return;
	if (d->wake[1] >= 0 && write(d->wake[1], "x", 1) < 0) {
		/* never read: a first write cannot find it full */
	}
	pthread_mutex_lock(&d->mu);
	pthread_cond_broadcast(&d->idle);
	pthread_cond_signal(&d->keeper_cv);
	pthread_mutex_unlock(&d->mu);
	/* A lane finishes its batch (its outcome recorded: not sent again by
	 * the next start); one blocked in the database (a lock) for 2 s has
	 * its statement cancelled, and its rows go again after their claim.
	 * So has the keeper's renewal (until the forty-sixth session it was
	 * waited for: a renewal held by a lock kept the stop for its
	 * statement timeout, 10 s, and the stop's deadline ended it, exit 1). */
	struct timespec grace; /* one for all the lanes and the keeper: blocked ones do not add up */
	store_grace(&grace, 2000);
	for (int i = 0; d->lanes && i < d->nlanes; i++)
		if (d->lanes[i].started)
			store_join_cancelling(d->lanes[i].thread, &d->lanes[i].cancel, &grace);
	if (d->keeper_started)
		store_join_cancelling(d->keeper, &d->keeper_cancel, &grace);
}

void dispatcher_free(struct dispatcher *d)
{
	if (!d)
		return;
	dispatcher_stop(d);
	for (int i = 0; d->lanes && i < d->nlanes; i++) {
		store_canceller_destroy(&d->lanes[i].cancel);
		free(d->lanes[i].orphans);
	}
	store_canceller_destroy(&d->keeper_cancel);
	free(d->lanes);
	free(d->pauses);
	free(d->slows);
	pthread_cond_destroy(&d->idle);
	pthread_cond_destroy(&d->keeper_cv);
	pthread_mutex_destroy(&d->mu);
	for (int k = 0; k < 2; k++)
		if (d->wake[k] >= 0)
			close(d->wake[k]);
	free(d->url);
	free(d->name);
	free(d);
}
