/* The pull stream and its long-poll thread. */
#include "config.h"
#include "peer_pull.h"
#include "app.h"
#include "dispatcher.h"
#include "log.h"
#include "peers.h"
#include "peer_media.h"
#include "policy_live.h"
#include "buf.h"
#include "store.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WAIT_MAX_S 60
#define LIMIT_MAX 1000

struct waiter {
	struct cw_req *req;
	const struct peer_principal *principal; /* the request's (it lives as long) */
	char destination[PEER_NAME_MAX + 8];
	long long after;
	int limit;
	int64_t deadline_us;
	bool counted; /* a long poll, counted in its peer's polls (n) */
	bool quick;   /* one without wait, counted in its peer's polls (quick) */
	bool claimed; /* its signature's nonce claimed (claim_nonce) */
	struct waiter *next;
};

/* A pull peer's pulls open in this process (counted below): n long
 * polls, quick ones without wait (queued for the poller or being
 * answered), each kind up to peer.max_long_polls. */
struct polls {
	char destination[PEER_NAME_MAX + 8];
	int n, quick;
};

struct peer_pull {
	char *url;
	long statement_timeout_ms;
	pthread_t thread;
	pthread_mutex_t mu;
	struct waiter *incoming;  /* handed over by HTTP threads */
	struct polls *polls;      /* long polls open per peer (under mu) */
	int npolls, polls_cap;
	atomic_bool stop;
	int wake[2];              /* a pipe: wakes the thread for incoming requests */
	PGconn *c;
	struct peer_registry *registry;
	struct cw_app *app;
	int64_t next_reload_us;
	/* A new connection was made and nothing asked since: what was
	 * notified while there was none (its LISTEN not yet made) reached no
	 * one, so the waiting polls are asked again as on a notification. */
	bool reconnected;
	/* Whether the poller has had a connection (ensure_conn: a connect
	 * after it, or after a failed attempt, is a reconnect, logged). */
	bool was_connected;
	/* While the database is away: the pace of attempts to connect (ensure_conn). */
	struct store_backoff backoff;
	int64_t connect_started_us; /* of the attempt under way (give_up_connect) */
	int64_t waiting_due_us;     /* the earliest deadline of the waiting polls (give_up_connect) */
};

/* How long a connect that has not come through goes on while pulls wait
 * to be answered (give_up_connect). */
#define CONNECT_PULLS_WAIT_US 1000000LL

#define REGISTRY_RELOAD_US (30 * 1000000LL)

/* How long a handed-out row stays in flight without the peer coming back.
 * A peer that pulls keeps its rows' claim fresh; one that stops (or was
 * switched to push) has them put back to pending by any dispatcher's
 * recovery of run-out claims, to be handed out (or pushed) again. */
#define HANDOUT_S 600

/* The pull's hand-out, in one statement under the peer's lock (below).
 * A row handed out is in flight with claimed_by 'pull#<position>': the
 * position is taken from the outbox id sequence when the row is first
 * handed out, so positions grow in the order rows were handed out, and
 * every one is above any outbox id an older cursor could be.  The cursor
 * is a position, not an outbox id: ids are taken when a transaction
 * writes, and a transaction that took a lower id may commit after a
 * higher one was pulled; acknowledging by id would mark that row
 * delivered without ever sending it.  after acknowledges the handed-out
 * rows at or below it (their last_error cleared, as a push's delivery
 * clears it: the note of a hand-out taken back, cw_take_back, or of a
 * failed push does not stay on a delivered row); those above it come again (the peer did not get
 * that answer, or asks again from an older cursor), before any row not
 * handed out yet, which follow in id order whatever their id.  An answer
 * is so always the positions just after `after`, in order: a peer that
 * keeps any cursor it was given acknowledges exactly what it got.  It
 * ends, too, where its events' size would pass $5 bytes (but has at least
 * one): the rows handed out past that are in flight above the answer's
 * cursor, so the next answer starts with them.  The size is the stored
 * content's plus PULL_EVENT_OVERHEAD for what the answer adds (ids, room,
 * sender, times): without the bound, one answer of 1000 events of 64 KiB
 * was 64 MiB, held in memory several times over (the query result, the
 * JSON, its text).
 * A cursor above every position this server has given (past the end of
 * the outbox id sequence, which every position is drawn from: no answer
 * had it) acknowledges nothing and hands nothing out (cur): the answer is
 * one row of nulls, which try_answer refuses 400.  Until the forty-sixth
 * session it acknowledged every row handed out to the peer, those of an
 * answer it never got too, and came back as the answer's next.
 * A peer no longer in pull mode (switched to push) is handed nothing,
 * neither rows not handed out yet nor those in flight above its cursor
 * (mode): its cursor still acknowledges what it was handed while it
 * pulled, and the rest runs out of its hand-out and goes by the push.
 * Until the fifty-first session's review such a peer pulling from an
 * older cursor was handed them again and their claim renewed, for as
 * long as it pulled: their rooms, which the push does not take while a
 * row of theirs is in flight, waited as long.
 * A typing notification accepted longer ago than $6 milliseconds
 * (dispatcher.typing_stale_ms; 0: never) is stale (the last column): the
 * answer leaves it out and try_answer expires its row, as a lane expires
 * one it claims (stale_typing in gateway/dispatcher.c).
 * $1 destination, $2 after, $3 limit, $4 claim seconds, $5 bytes, $6 the
 * typing's staleness; column 11 is the outbox row's id (for
 * outbox_dead_unreadable), 12 whether it is a stale typing notification. */
#define PULL_EVENT_OVERHEAD "512"
#define PULL_POS "CASE WHEN starts_with(claimed_by, 'pull#') THEN substr(claimed_by, 6)::bigint END"
static const char pull_sql[] =
	"WITH cur AS MATERIALIZED (SELECT $2::bigint <= coalesce(pg_sequence_last_value("
	" pg_get_serial_sequence('outbox', 'id')::regclass), 0) AS ok), "
	"mode AS MATERIALIZED (SELECT EXISTS (SELECT 1 FROM peers p WHERE p.name = substr($1, 6) "
	" AND p.mode = 'pull' AND p.enabled) AS pull), "
	"ack AS (UPDATE outbox SET state = 'delivered', delivered_at = now(), claimed_by = NULL, "
	" claimed_until = NULL, last_error = NULL WHERE destination = $1 AND state = 'in_flight' AND " PULL_POS " <= $2::bigint "
	" AND (SELECT ok FROM cur)), "
	"sent AS (SELECT id, " PULL_POS " AS pos FROM outbox WHERE destination = $1 "
	" AND state = 'in_flight' AND " PULL_POS " > $2::bigint AND (SELECT ok FROM cur) AND (SELECT pull FROM mode)), "
	"kept AS (UPDATE outbox o SET claimed_until = now() + make_interval(secs => $4::int) FROM sent "
	" WHERE o.id = sent.id AND o.state = 'in_flight' AND o.claimed_by = 'pull#' || sent.pos "
	" RETURNING o.id, sent.pos, o.event_id, o.room_id), "
	"fresh AS MATERIALIZED (SELECT f.id, nextval(pg_get_serial_sequence('outbox', 'id')) AS pos "
	" FROM (SELECT id FROM outbox WHERE destination = $1 AND state = 'pending' AND (SELECT ok FROM cur) "
	"  AND (SELECT pull FROM mode) "
	"  AND room_id NOT IN (SELECT b.room_id FROM outbox b WHERE b.destination = $1 AND b.state = 'in_flight' "
	"   AND NOT starts_with(b.claimed_by, 'pull#')) ORDER BY id "
	"  LIMIT greatest($3::int - (SELECT count(*) FROM sent), 0)) f), "
	"took AS (UPDATE outbox o SET state = 'in_flight', claimed_by = 'pull#' || fresh.pos, "
	" claimed_until = now() + make_interval(secs => $4::int) FROM fresh "
	" WHERE o.id = fresh.id AND o.state = 'pending' RETURNING o.id, fresh.pos, o.event_id, o.room_id), "
	"h AS (SELECT * FROM kept UNION ALL SELECT * FROM took) "
	"SELECT * FROM (SELECT h.pos, ev.public_id, t.content, rm.uri, rm.public_id, s.uri, "
	" (extract(epoch FROM ev.accepted_at) * 1000)::bigint, ev.ts, "
	" (SELECT p.event_types IS NULL OR ev.type = ANY (p.event_types) FROM peers p "
	"  WHERE p.name = substr($1, 6)), "
	" sum(octet_length(t.content) + " PULL_EVENT_OVERHEAD ") OVER (ORDER BY h.pos) AS upto, "
	" row_number() OVER (ORDER BY h.pos) AS n, h.id, "
	" ev.type = 'typing' AND $6::bigint > 0 AND ev.accepted_at < now() - $6::bigint * interval '1 millisecond' "
	"FROM h JOIN events ev ON ev.id = h.event_id CROSS JOIN LATERAL (SELECT ev.content::text AS content) t "
	"JOIN rooms rm ON rm.id = h.room_id "
	"JOIN identities s ON s.id = ev.sender_id ORDER BY h.pos LIMIT $3::int) a "
	"WHERE a.upto <= $5::bigint OR a.n = 1 "
	"UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL "
	"FROM cur WHERE NOT cur.ok "
	"ORDER BY 1";

/* The rows of stale typing notifications of an answer (pull_sql's last
 * column), $1 their ids comma-separated, expired with the words a lane's
 * expire() writes: they are in flight at positions the answer's next
 * passes, and would be acknowledged as delivered.  Until the forty-sixth
 * session a pull handed them out however late (a peer away for an hour
 * showed its users someone typing), while a push expired them. */
static const char pull_expire_sql[] =
	"UPDATE outbox SET state = 'expired', claimed_by = NULL, claimed_until = NULL, "
	" last_error = '" CW_TYPING_STALE_ERROR "' "
	"WHERE id = ANY (string_to_array($1, ',')::bigint[]) AND destination = $2 AND state = 'in_flight' "
	" AND starts_with(claimed_by, 'pull#')";

/* The detail of a pull's 400 when its cursor is past the end (pull_sql). */
#define PULL_PAST_END \
	"after is above every cursor this server has given (an answer's next, or 0): nothing was " \
	"acknowledged or handed out; pull again from the last next you were given, or from 0"

/* The detail of a pull's 503 when the database failed it. */
#define PULL_UNAVAILABLE "the database is unavailable; pull again from the same position (after)"

/* The turn of one peer's pulls (see try_answer). */
static const char pull_lock_sql[] = "SELECT pg_advisory_xact_lock(hashtextextended('causeway.pull:' || $1, 0))";

/* The rows in flight to the peer $1 above the cursor $2, in id order:
 * those of the answer just made, and those handed out past its size
 * bound (screen_handed). */
static const char pull_handed_sql[] =
	"SELECT id FROM outbox WHERE destination = $1 AND state = 'in_flight' AND " PULL_POS " > $2::bigint "
	"ORDER BY id";

static const struct store_stmt pull_stmts[] = {
	{ "cw_pull", pull_sql },
	{ "cw_pull_handed", pull_handed_sql },
	{ NULL, NULL },
};
static const struct store_stmt *const pull_stmt_lists[] = { pull_stmts, NULL };

static int cmp_id(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

/* The rows in flight to w's peer above after (what the answer just made
 * holds, and what it handed out past its size bound) decided again under
 * the policy in force (policy_live_screen), as a dispatcher's lane decides
 * what it claims (screen_claimed in gateway/dispatcher.c): the recheck of a
 * change goes in batches and passes over rows in flight, and until the
 * thirty-third session a row the pull handed out before the pass reached
 * it went to the peer undecided.  In a transaction of its own that takes
 * the peer's turn first, so that no other pull of the peer (another
 * process's) hands the rows out meanwhile.  Those refused are dropped (the
 * cursor's acknowledgement passes over them: no longer in flight): their
 * ids in *gone (sorted, *ngone of them; the caller frees it). */
static cw_err screen_handed(struct peer_pull *p, const struct waiter *w, const char *after, int64_t **gone,
			    size_t *ngone, cw_errmsg *e)
{
	*gone = NULL;
	*ngone = 0;
	const char *params[] = { w->destination, after };
	cw_err rc = store_exec(p->c, "BEGIN", e);
	PGresult *r = NULL;
	if (!rc) {
		PGresult *lock = PQexecParams(p->c, pull_lock_sql, 1, NULL, params, NULL, NULL, 0);
		if (!(rc = store_check(p->c, lock, PGRES_TUPLES_OK, e)))
			PQclear(lock);
	}
	if (!rc) {
		r = PQexecPrepared(p->c, "cw_pull_handed", 2, params, NULL, NULL, 0);
		rc = store_check(p->c, r, PGRES_TUPLES_OK, e);
		if (rc)
			r = NULL;
	}
	int n = r ? PQntuples(r) : 0;
	int64_t *ids = n ? malloc((size_t)n * sizeof(*ids)) : NULL;
	bool *dropped = n ? malloc((size_t)n * sizeof(*dropped)) : NULL;
	if (!rc && n && (!ids || !dropped))
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
	for (int i = 0; !rc && i < n; i++)
		ids[i] = atoll(PQgetvalue(r, i, 0));
	long count = 0;
	if (!rc && n)
		rc = policy_live_screen(p->app->policy, p->c, ids, (size_t)n, "pull#", dropped, &count, e);
	rc = store_end(p->c, rc, e);
	size_t k = 0;
	for (int i = 0; !rc && i < n; i++)
		if (dropped[i])
			ids[k++] = ids[i]; /* in id order still */
	PQclear(r);
	free(dropped);
	if (rc || k == 0) {
		free(ids);
		return rc;
	}
	*gone = ids;
	*ngone = k;
	return CW_OK;
}

/* Acknowledges up to after, then hands out what follows; sets the answer
 * and returns true when there is something to say (rows, or a failure).
 * Pulls of one peer take turns (a transaction-level advisory lock named
 * after it): two at once, in two daemon processes, would each hand out
 * rows, and the peer could acknowledge the one answer's position while
 * the other answer, with rows below it, was lost.  The lock and the
 * hand-out go as one pipeline, one round trip and one implicit
 * transaction up to the sync (an error rolls it back); the hand-out's
 * snapshot is taken after the lock, so it sees what the previous turn
 * committed. */
/* An answer is no larger than a request this daemon takes (about: see
 * pull_sql), so that a peer sized alike can hold it. */
static long answer_bytes(const struct peer_pull *p)
{
	return p->app ? p->app->cfg->max_body_bytes : 1024L * 1024;
}

/* A pull the database failed: 503, and why (PostgreSQL's message, which
 * may quote stored data, a table's or a key's) to the log, not to the
 * peer; until the forty-fourth session the answer's detail was that
 * message ("the database did not answer in time: ERROR: canceling
 * statement due to statement timeout").  Retry-After is
 * database.retry_after_s, as every 503 of the database's (app.c,
 * app_reply_store_error); until the forty-fourth session's review a
 * pull's was 2 whatever it said. */
static void unavailable(const struct peer_pull *p, struct waiter *w, const cw_errmsg *e)
{
	LOG_KV(CW_LOG_WARN, "a pull failed: the database", "request_id", cw_req_id(w->req), "detail", e->msg);
	app_retry_after(w->req, (p->app ? p->app->cfg->db_retry_after_s : 2) * 1000LL);
	cw_req_problem(w->req, 503, "unavailable", "Service unavailable", PULL_UNAVAILABLE);
}

/* A pull acknowledges what it names and hands out what follows: it changes
 * something, and its signature's nonce is claimed for every daemon process
 * (peer_nonce_claim), as a write's is (gateway/app.c, job_write), once per
 * request (a long poll asks again and again).  A request captured on its
 * way to one process and replayed to another is 401 bad_signature there,
 * and nothing is handed out (until the forty-first session the replay was
 * answered the peer's events: those in flight above its cursor, and any
 * new ones).  The peer is asked of the table with it (PEER_IN_FORCE_SQL):
 * one disabled or rotated through another process is 401, as an unknown
 * token, whenever this process's registry reloads (since the
 * forty-seventh session).  False after answering (a replay, a peer no
 * longer in force: 401; the database away: 503, which a retry, signed
 * anew, gets past). */
static bool claim_nonce(struct peer_pull *p, struct waiter *w)
{
	if (w->claimed || !p->app || !w->principal)
		return true;
	bool fresh = true, in_force = true;
	cw_errmsg e;
	if (peer_nonce_claim(p->c, w->principal, cw_wall_ms() / 1000, p->app->cfg->max_clock_skew_s, &fresh,
			     &in_force, &e)) {
		unavailable(p, w, &e);
		return false;
	}
	if (!in_force) { /* disabled or rotated, this process's registry not reloaded yet */
		app_unauthenticated(w->req, APP_PEER_TOKEN_REQUIRED);
		return false;
	}
	if (!fresh) {
		cw_req_add_header(w->req, "WWW-Authenticate", "Bearer");
		cw_req_problem(w->req, 401, "bad_signature", "Bad signature", PEER_NONCE_REPLAYED);
		return false;
	}
	w->claimed = true;
	return true;
}

/* One hand-out (try_answer): true after answering; false when there is
 * nothing to answer yet (not final), *passed when rows were handed out
 * and all passed over (pass_over: then w->after is past them). */
static bool hand_out(struct peer_pull *p, struct waiter *w, bool final, bool pass_over, bool *passed)
{
	char after[24];
	snprintf(after, sizeof(after), "%lld", w->after);
	cw_errmsg e;
	PGresult *r = NULL;
	int64_t *gone = NULL; /* rows the policy's screen dropped (screen_handed) */
	size_t ngone = 0;
	/* policy_live_stamp, as a lane's claim reads it (gateway/dispatcher.c) */
	struct policy_live *pl = p->app ? p->app->policy : NULL;
	bool unsettled = false, unsettled_after = false;
	uint64_t stamp = pl ? policy_live_stamp(pl, &unsettled) : 0;
	if (PQstatus(p->c) != CONNECTION_OK) {
		cw_fail(&e, CW_EUNAVAIL, "the database is unavailable");
		goto fail;
	}
	if (!claim_nonce(p, w))
		return true;
	char limit[16], secs[16], bytes[24], stale[24];
	snprintf(limit, sizeof(limit), "%d", w->limit);
	snprintf(secs, sizeof(secs), "%d", HANDOUT_S);
	snprintf(bytes, sizeof(bytes), "%ld", answer_bytes(p));
	snprintf(stale, sizeof(stale), "%ld", p->app ? p->app->cfg->typing_stale_ms : 0L);
	const char *lp[] = { w->destination };
	const char *pp[] = { w->destination, after, limit, secs, bytes, stale };
	/* Pipeline mode: two parameterized statements in one round trip, one
	 * implicit transaction up to the sync (until the twentieth session one
	 * query string with the destination quoted into it). */
	bool entered = PQenterPipelineMode(p->c);
	bool synced = entered &&
		      PQsendQueryParams(p->c, pull_lock_sql, 1, NULL, lp, NULL, NULL, 0) &&
		      PQsendQueryPrepared(p->c, "cw_pull", 6, pp, NULL, NULL, 0) && PQpipelineSync(p->c);
	bool failed = !synced;
	if (failed) {
		cw_fail(&e, CW_EUNAVAIL, "cannot send: %s", PQerrorMessage(p->c));
	} else {
		PGresult *lock = NULL, *rest = NULL;
		cw_errmsg ignored;
		if (store_pipe_result(p->c, PGRES_TUPLES_OK, &lock, &e)) {
			failed = true;
			store_pipe_result(p->c, PGRES_TUPLES_OK, &rest, &ignored); /* aborted */
		} else if (store_pipe_result(p->c, PGRES_TUPLES_OK, &r, &e)) {
			failed = true;
		}
		PQclear(lock);
		PQclear(rest);
		synced = store_pipe_drain(p->c);
	}
	if (entered && (!synced || !PQexitPipelineMode(p->c))) {
		/* Results left unread: the connection cannot be used again. */
		PQfinish(p->c);
		p->c = NULL;
		if (!failed)
			cw_fail(&e, CW_EUNAVAIL, "the database connection was lost");
		failed = true;
	}
	if (failed || !r || PQnfields(r) < 13) {
		if (!failed)
			cw_fail(&e, CW_EUNAVAIL, "the pull answered nothing");
		goto fail;
	}
	int n = PQntuples(r);
	if (n && PQgetisnull(r, 0, 0)) { /* past the end: nothing done (pull_sql) */
		PQclear(r);
		cw_req_problem(w->req, 400, "invalid_query", "Invalid query", PULL_PAST_END);
		return true;
	}
	if (n == 0 && !final) {
		PQclear(r);
		return false;
	}
	/* While this process's recheck of a change is not over (or a change
	 * came during the hand-out), what is handed out is decided under the
	 * rules in force first.  Not decided (the database away): 503, the
	 * rows stay in flight and come again, decided then. */
	if (n && pl) {
		uint64_t now = policy_live_stamp(pl, &unsettled_after);
		if ((unsettled || unsettled_after || now != stamp) && screen_handed(p, w, after, &gone, &ngone, &e))
			goto fail;
	}
	struct cw_buf expired; /* the stale typing notifications' rows (pull_expire_sql) */
	cw_buf_init(&expired, 24 * (size_t)n + 1);
	/* The answer as it is sent, each event printed once, straight into it
	 * (compact JSON, as a push's): pull_sql's bound counts the stored
	 * content, but a local user's file goes as a link of Causeway's
	 * (peer_media_offer), a third longer than its source and then some,
	 * and an answer of such events passed the bound by half (until the
	 * fifty-second session).  The bound is of these bytes, the answer's
	 * end counted in (its next: no more digits than the last row's); the
	 * event that would pass it is cut off again, and the rows from it on
	 * are left in flight above the answer's next, as pull_sql leaves
	 * those past its bound: the next answer starts with them.  The first
	 * event goes whatever its size.  Until the fifty-third session each
	 * event was printed twice, once to be measured and again in the
	 * answer, and that second printing, the HTTP thread's of every JSON
	 * answer, gave a number 6 significant digits where a push gives 17
	 * (docs/interop-api.md, "Unknown members and numbers"): 0.123456789
	 * was pulled as 0.123457. */
	struct cw_buf body;
	cw_buf_init(&body, SIZE_MAX);
	size_t end = sizeof("],\"next\":\"\"}") - 1 + (n ? strlen(PQgetvalue(r, n - 1, 0)) : 0),
	       bound = (size_t)answer_bytes(p);
	int sent = 0; /* the events in the answer */
	if (cw_buf_add(&body, "{\"events\":[", sizeof("{\"events\":[") - 1)) {
		cw_fail(&e, CW_ENOMEM, "out of memory");
		goto fail;
	}
	int upto = n; /* the rows this answer passes (its next is the last one's) */
	for (int i = 0; i < n; i++) {
		/* A type the peer does not take is passed over (and acknowledged
		 * with the rest by the next request's after); so is a row the
		 * screen dropped. */
		int64_t id = atoll(PQgetvalue(r, i, 11));
		if (PQgetvalue(r, i, 8)[0] == 'f' || (ngone && bsearch(&id, gone, ngone, sizeof(*gone), cmp_id)))
			continue;
		if (PQgetvalue(r, i, 12)[0] == 't') {
			if (cw_buf_printf(&expired, "%s%s", expired.len ? "," : "", PQgetvalue(r, i, 11))) {
				cw_buf_free(&body);
				cw_buf_free(&expired);
				cw_fail(&e, CW_ENOMEM, "out of memory");
				goto fail;
			}
			continue;
		}
		bool unreadable;
		json_t *ev = outbox_event_json(r, i, 1, &unreadable);
		if (!ev && !unreadable) {
			cw_buf_free(&body);
			cw_buf_free(&expired);
			cw_fail(&e, CW_ENOMEM, "out of memory");
			goto fail;
		}
		if (!ev) {
			/* Never a shell without content (until the thirtieth
			 * session): a dead letter, which the cursor does not
			 * acknowledge (it acknowledges rows in flight only).  Not
			 * made one (the database away): 503, for the answer's
			 * next would have the peer's next cursor acknowledge it
			 * as delivered. */
			char by[32];
			snprintf(by, sizeof(by), "pull#%s", PQgetvalue(r, i, 0));
			if (outbox_dead_unreadable(p->c, PQgetvalue(r, i, 11), PQgetvalue(r, i, 1), w->destination, by,
						   &e) < 0) {
				cw_buf_free(&body);
				cw_buf_free(&expired);
				goto fail;
			}
			continue;
		}
		json_t *out = p->app ? peer_media_offer(p->app, w->destination + 5, ev) : json_incref(ev);
		json_decref(ev);
		size_t at = body.len;
		bool printed = out && (sent == 0 || cw_buf_add(&body, ",", 1) == CW_OK) &&
			       json_dump_callback(out, cw_buf_json, &body, JSON_COMPACT) == 0;
		json_decref(out);
		if (!printed) {
			cw_buf_free(&body);
			cw_buf_free(&expired);
			cw_fail(&e, CW_ENOMEM, "out of memory");
			goto fail;
		}
		if (sent > 0 && body.len + end > bound) {
			cw_buf_cut(&body, at);
			upto = i;
			break;
		}
		sent++;
	}
	/* Not expired (the database away): 503, as for an unreadable row. */
	if (expired.len) {
		const char *ep[] = { expired.p, w->destination };
		cw_err erc = store_command(p->c, pull_expire_sql, 2, ep, &e);
		if (erc) {
			cw_buf_free(&body);
			cw_buf_free(&expired);
			goto fail;
		}
	}
	cw_buf_free(&expired);
	char next[24];
	snprintf(next, sizeof(next), "%s", upto ? PQgetvalue(r, upto - 1, 0) : after);
	PQclear(r);
	free(gone);
	/* Nothing to give (rows of types the peer does not take, stale
	 * typing, rows the screen dropped): a long poll waits on from the
	 * answer's next, which its next hand-out acknowledges (those rows
	 * were never to be sent), instead of being answered an empty list at
	 * once: until the forty-eighth session every typing notification
	 * ended the long polls of a peer that takes no typing. */
	if (sent == 0 && !final && pass_over) {
		cw_buf_free(&body);
		w->after = atoll(next);
		*passed = true;
		return false;
	}
	if (cw_buf_printf(&body, "],\"next\":\"%s\"}", next)) {
		cw_buf_free(&body);
		cw_req_no_memory(w->req);
		return true;
	}
	size_t len;
	char *text = cw_buf_take(&body, &len);
	cw_req_reply(w->req, 200, "application/json", text, len);
	return true;
fail:
	PQclear(r);
	free(gone);
	unavailable(p, w, &e);
	return true;
}

/* How many hand-outs in a row one request may pass over wholly (a
 * backlog of rows the peer does not take, a limit of 1): then it is
 * answered the empty list and its next, as a pull without wait is, so
 * that the poller, which answers every pull peer, does not spend itself
 * on one. */
#define PASS_OVER_MAX 8

/* Acknowledges up to w->after, then hands out what follows: true after
 * answering (rows, or a failure), false while there is nothing for a
 * request that is not final.  A hand-out whose rows were all passed over
 * (hand_out) is followed by the next at once: rows beyond its limit or
 * its size bound may be waiting, and no notification would come for
 * them. */
static bool try_answer(struct peer_pull *p, struct waiter *w, bool final)
{
	for (int i = 1;; i++) {
		bool passed = false;
		if (hand_out(p, w, final, i < PASS_OVER_MAX, &passed))
			return true;
		if (!passed)
			return false;
	}
}

/* The entry of destination in p->polls, made when missing (NULL: out of
 * memory); under p->mu. */
static struct polls *polls_of(struct peer_pull *p, const char *destination)
{
	for (int i = 0; i < p->npolls; i++)
		if (strcmp(p->polls[i].destination, destination) == 0)
			return &p->polls[i];
	if (p->npolls == p->polls_cap) {
		int cap = p->polls_cap ? p->polls_cap * 2 : 8;
		struct polls *x = realloc(p->polls, (size_t)cap * sizeof(*x));
		if (!x)
			return NULL;
		p->polls = x;
		p->polls_cap = cap;
	}
	struct polls *e = &p->polls[p->npolls++];
	snprintf(e->destination, sizeof(e->destination), "%s", destination);
	e->n = e->quick = 0;
	return e;
}

static void finish(struct peer_pull *p, struct waiter *w)
{
	if (w->counted || w->quick) {
		pthread_mutex_lock(&p->mu);
		struct polls *e = polls_of(p, w->destination); /* there: made when counted */
		if (e && w->counted && e->n > 0)
			e->n--;
		if (e && w->quick && e->quick > 0)
			e->quick--;
		pthread_mutex_unlock(&p->mu);
	}
	cw_req_resume(w->req);
	free(w);
}

/* Whether a hand-out at after for destination was found empty in this
 * round (empty[0..n)): then so is every one at a cursor at or above it
 * (nothing handed out above the lower cursor, nothing pending), and the
 * waiters of one peer cost one query per notification, not one each. */
struct empty {
	const char *destination;
	long long after;
};

static bool known_empty(const struct empty *empty, int n, const struct waiter *w)
{
	for (int i = 0; i < n; i++)
		if (strcmp(empty[i].destination, w->destination) == 0 && w->after >= empty[i].after)
			return true;
	return false;
}

/* The connect under way (ensure_conn) is given up when the daemon stops,
 * once it has taken CONNECT_PULLS_WAIT_US while pulls came in (those
 * are answered 503 then, not after connect_timeout, 5 s), and when a
 * waiting long poll's wait is over: answered then (503: no database),
 * not held up to connect_timeout past it, as it was until the fifty-first
 * session's review. */
static bool give_up_connect(void *arg)
{
	struct peer_pull *p = arg;
	char buf[64];
	while (read(p->wake[0], buf, sizeof(buf)) > 0)
		; /* the pulls come in through p->incoming, looked at below */
	pthread_mutex_lock(&p->mu);
	bool waiting = p->incoming != NULL;
	pthread_mutex_unlock(&p->mu);
	int64_t now = cw_now_us();
	return atomic_load(&p->stop) || now >= p->waiting_due_us ||
	       (waiting && now - p->connect_started_us >= CONNECT_PULLS_WAIT_US);
}

/* The poller's connection, made again when lost.  The connect does not
 * block the poller, which answers every pull peer, beyond a second while
 * pulls wait, nor the daemon's stop (store_connect_abortable); while the
 * database is away it is tried again after 250 ms, then twice as long
 * each time up to database.reconnect_max_ms, and from 250 ms again once
 * connected.  Until the
 * forty-eighth session it was tried every 250 ms, each attempt blocking
 * up to connect_timeout (5 s) when the database's host took the
 * connection and never answered (a dropped route, a firewall that
 * drops): every pull waited as long, and so did a stop. */
static bool ensure_conn(struct peer_pull *p)
{
	if (p->c && PQstatus(p->c) == CONNECTION_OK)
		return true;
	PQfinish(p->c);
	p->c = NULL;
	int64_t now = cw_now_us();
	if (now < p->backoff.retry_at_us || atomic_load(&p->stop))
		return false;
	cw_errmsg e;
	p->connect_started_us = now;
	p->c = store_connect_abortable(p->url, p->statement_timeout_ms, p->wake[0], give_up_connect, p, &e);
	if (p->c && (store_exec(p->c, "LISTEN causeway_outbox", &e) || store_exec(p->c, "LISTEN causeway_pull", &e) ||
		     store_exec(p->c, "LISTEN causeway_peers", &e) || !store_prepare_all(p->c, pull_stmt_lists, &e))) {
		PQfinish(p->c);
		p->c = NULL;
	}
	if (p->c) {
		/* Once a reconnect, at info, as the pool's connections say
		 * "database connection established": until the fifty-eighth
		 * session the poller logged each failed attempt and nothing
		 * when it was back, and a test could only tell it by pulling
		 * until a pull was answered, on its own clock. */
		if (p->was_connected || p->backoff.delay_us)
			LOG_KV(CW_LOG_INFO, "pull poller connected to the database again");
		p->was_connected = true;
		p->next_reload_us = 0; /* changes may have been missed while away */
		p->reconnected = true;
		store_backoff_reset(&p->backoff);
		return true;
	}
	long delay_ms = store_backoff_failed(&p->backoff, p->app ? p->app->cfg->db_reconnect_max_ms : 0);
	char in_ms[24];
	snprintf(in_ms, sizeof(in_ms), "%ld", delay_ms);
	if (!atomic_load(&p->stop))
		LOG_KV(CW_LOG_WARN, "pull poller cannot connect to the database", "detail", e.msg, "retry_in_ms", in_ms);
	return false;
}

struct heard {
	bool events, peers;
};

static void noted(const char *channel, const char *payload, void *arg)
{
	(void)payload;
	struct heard *h = arg;
	if (strcmp(channel, "causeway_peers") == 0)
		h->peers = true;
	else
		h->events = true;
}

/* Answers, as a fresh request with their token would be (401), the
 * waiting long polls whose peer was disabled or whose token was rotated
 * since they came: until the thirty-first session they waited on (up to
 * 60 s) and were handed the events that came meanwhile.  Run each round
 * of the poller, after the registry's reload when there is one. */
static void refuse_stale(struct peer_pull *p, struct waiter **waiting)
{
	for (struct waiter **wp = waiting; *wp;) {
		struct waiter *w = *wp;
		if (peer_registry_still_valid(p->registry, w->principal)) {
			wp = &w->next;
			continue;
		}
		*wp = w->next;
		app_unauthenticated(w->req, APP_PEER_TOKEN_REQUIRED);
		finish(p, w);
	}
}

/* Ends the waiting long polls whose client closed the connection,
 * handing nothing out (no one would get it): until the forty-second
 * session such a poll waited for its deadline (up to a minute), held one
 * of its peer's peer.max_long_polls, so that the peer's next polls were
 * refused 429, and was handed the events that came meanwhile, sent into
 * the closed connection (they came again from the cursor, not lost). */
static void drop_gone(struct peer_pull *p, struct waiter **waiting)
{
	for (struct waiter **wp = waiting; *wp;) {
		struct waiter *w = *wp;
		if (!cw_req_client_gone(w->req)) {
			wp = &w->next;
			continue;
		}
		*wp = w->next;
		cw_req_problem(w->req, 503, "unavailable", "Service unavailable", "the client closed the connection");
		finish(p, w);
	}
}

static void *poller_main(void *arg)
{
	cw_thread_name("cw-pull");
	struct peer_pull *p = arg;
	struct waiter *waiting = NULL;
	struct heard heard = { 0 };
	for (;;) {
		bool stopping = atomic_load(&p->stop);
		p->waiting_due_us = INT64_MAX;
		for (const struct waiter *w = waiting; w; w = w->next)
			if (w->deadline_us < p->waiting_due_us)
				p->waiting_due_us = w->deadline_us;
		ensure_conn(p);
		pthread_mutex_lock(&p->mu);
		struct waiter *in = p->incoming;
		p->incoming = NULL;
		pthread_mutex_unlock(&p->mu);
		/* New requests whose peer was disabled or rotated since they were
		 * let in are refused first: answered, they could have been sent
		 * again what was already handed out above their cursor. */
		if (p->registry)
			refuse_stale(p, &in);
		/* New requests are answered at once when there is something. */
		while (in) {
			struct waiter *next = in->next;
			if (try_answer(p, in, stopping || in->deadline_us <= cw_now_us()))
				finish(p, in);
			else {
				in->next = waiting;
				waiting = in;
			}
			in = next;
		}
		/* Waiting ones: on a notification, at their deadline, or at stop. */
		if (p->c)
			store_notifies(p->c, noted, &heard);
		/* Until the forty-second session a poll waiting as the
		 * connection was lost waited for its deadline (up to a minute)
		 * when the rows for it came before the new LISTEN. */
		bool notified = heard.events || p->reconnected, peers_changed = heard.peers;
		heard = (struct heard){ 0 };
		p->reconnected = false;
		int64_t now = cw_now_us();
		if (p->c && p->registry && (peers_changed || now >= p->next_reload_us)) {
			cw_errmsg e;
			if (peer_registry_load(p->registry, p->c, &e))
				LOG_KV(CW_LOG_WARN, "peer registry reload failed", "detail", e.msg);
			p->next_reload_us = now + REGISTRY_RELOAD_US;
		}
		/* Checked each round, not only after a reload: the registry also
		 * changes in-process (an admin change of this process), and the
		 * pass over the waiting polls is cheap (capped per peer). */
		if (p->registry)
			refuse_stale(p, &waiting);
		drop_gone(p, &waiting);
		struct empty empty[32];
		int nempty = 0;
		for (struct waiter **wp = &waiting; *wp;) {
			struct waiter *w = *wp;
			bool due = stopping || w->deadline_us <= now;
			bool ask = due || (notified && !known_empty(empty, nempty, w));
			if (ask && try_answer(p, w, due)) {
				*wp = w->next;
				finish(p, w);
			} else {
				if (ask && nempty < (int)(sizeof(empty) / sizeof(empty[0])))
					empty[nempty++] = (struct empty){ w->destination, w->after };
				wp = &w->next;
			}
		}
		if (stopping) {
			pthread_mutex_lock(&p->mu);
			bool more = p->incoming != NULL;
			pthread_mutex_unlock(&p->mu);
			if (!more && !waiting)
				break;
			continue;
		}
		/* What was notified while the answers' queries ran waits in
		 * libpq's queue: store_wait_notify returns at once with it. */
		if (p->c) {
			store_wait_notify(p->c, p->wake[0], 250, noted, &heard);
		} else {
			struct pollfd fd = { .fd = p->wake[0], .events = POLLIN };
			poll(&fd, 1, 250);
		}
		char buf[64];
		while (read(p->wake[0], buf, sizeof(buf)) > 0)
			;
	}
	PQfinish(p->c);
	p->c = NULL;
	return NULL;
}

cw_err peer_pull_start(struct peer_pull **out, struct cw_app *app, const char *db_url, long statement_timeout_ms,
		       struct peer_registry *registry, cw_errmsg *e)
{
	struct peer_pull *p = calloc(1, sizeof(*p));
	if (!p)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	p->app = app;
	p->registry = registry;
	p->next_reload_us = cw_now_us() + REGISTRY_RELOAD_US;
	p->url = strdup(db_url);
	p->statement_timeout_ms = statement_timeout_ms;
	pthread_mutex_init(&p->mu, NULL);
	if (!p->url || pipe2(p->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
		free(p->url);
		free(p);
		return cw_fail(e, CW_EIO, "cannot set up the pull poller");
	}
	if (pthread_create(&p->thread, NULL, poller_main, p)) {
		close(p->wake[0]);
		close(p->wake[1]);
		free(p->url);
		free(p);
		return cw_fail(e, CW_EIO, "cannot start the pull poller");
	}
	*out = p;
	return CW_OK;
}

void peer_pull_stop(struct peer_pull *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	bool was = atomic_exchange(&p->stop, true);
	pthread_mutex_unlock(&p->mu);
	if (was)
		return;
	if (write(p->wake[1], "x", 1) < 0) {
		/* the poller wakes within its poll timeout anyway */
	}
	pthread_join(p->thread, NULL);
}

void peer_pull_free(struct peer_pull *p)
{
	if (!p)
		return;
	peer_pull_stop(p);
	close(p->wake[0]);
	close(p->wake[1]);
	pthread_mutex_destroy(&p->mu);
	free(p->polls);
	free(p->url);
	free(p);
}

void peer_api_events(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	struct peer_principal *pp = cw_req_principal(req);
	const char *after = cw_req_query(req, "after"), *wait = cw_req_query(req, "wait"), *limit = cw_req_query(req, "limit");
	long long a = 0, wt = 0, l = 100;
	/* digits only, a cursor in the one form an answer's `next` has
	 * (cw_decimal): after=+1 and after=01 were read as 1 until the
	 * forty-second session */
	if ((after && !cw_decimal(after, 0, (1LL << 62), true, &a)) ||
	    (wait && !cw_decimal(wait, 0, WAIT_MAX_S, false, &wt)) ||
	    (limit && !cw_decimal(limit, 1, LIMIT_MAX, false, &l))) {
		cw_req_problem(req, 400, "invalid_query", "Invalid query",
			       "after is a cursor from an earlier answer (or 0), wait 0 to 60 seconds, limit 1 to 1000");
		return;
	}
	struct waiter *w = calloc(1, sizeof(*w));
	if (!w) {
		cw_req_no_memory(req);
		return;
	}
	w->req = req;
	w->principal = pp;
	snprintf(w->destination, sizeof(w->destination), "peer:%s", pp->name);
	w->after = a;
	w->limit = (int)l;
	w->deadline_us = cw_now_us() + wt * 1000000;
	pthread_mutex_lock(&app->pull->mu);
	if (atomic_load(&app->pull->stop)) { /* the daemon is stopping */
		pthread_mutex_unlock(&app->pull->mu);
		free(w);
		cw_req_add_header(req, "Retry-After", "2");
		cw_req_problem(req, 503, "unavailable", "Service unavailable", "the daemon is stopping");
		return;
	}
	/* A long poll is counted against the peer's cap: held by one
	 * thread, each costs a hand-out per notification while it waits,
	 * and one peer holding hundreds slowed every pull peer (until the
	 * thirtieth session).  One without wait is answered at once, but by
	 * the same thread, one after the other: those are capped alike, in a
	 * count of their own (until the forty-eighth session they were not,
	 * and one peer's 40 pulls at once, each a hand-out of its backlog,
	 * made another pull peer's waiting poll answer a new event 2 s late
	 * instead of 0.01 s; a peer's pulls take turns anyway, pull_lock_sql). */
	long cap = app->cfg->peer_max_long_polls;
	struct polls *e = polls_of(app->pull, w->destination);
	if (!e || (wt > 0 ? e->n : e->quick) >= cap) {
		pthread_mutex_unlock(&app->pull->mu);
		free(w);
		cw_req_add_header(req, "Retry-After", "1");
		char detail[200];
		snprintf(detail, sizeof(detail),
			 wt > 0 ? "%ld long polls of this peer are waiting already, the most there may be; "
				  "ask again once one is answered"
				: "%ld pulls of this peer without wait are being answered already, the most there may "
				  "be; ask again once one is answered",
			 cap);
		if (e)
			cw_req_problem(req, 429, "rate_limited", "Too many requests", detail);
		else
			cw_req_no_memory(req);
		return;
	}
	if (wt > 0) {
		e->n++;
		w->counted = true;
	} else {
		e->quick++;
		w->quick = true;
	}
	cw_req_suspend(req);
	w->next = app->pull->incoming;
	app->pull->incoming = w;
	pthread_mutex_unlock(&app->pull->mu);
	if (write(app->pull->wake[1], "x", 1) < 0) {
		/* the pipe is full: the poller is awake already */
	}
}
