/* /admin/v1/outbox: the outbox by state and destination, and replaying a
 * dead letter. */
#include "config.h"
#include "app.h"
#include "admin_auth.h"
#include "event.h"
#include "log.h"
#include "outbox_admin.h"
#include "policy_live.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct list_input {
	char state[16];
	char destination[300];
	char after[24];
	char limit[8];
};

static const char *const states[] = { "pending", "held", "in_flight", "delivered", "failed", "dead", "dropped",
				      "expired", NULL };

static bool state_valid(const char *s)
{
	for (int i = 0; states[i]; i++)
		if (strcmp(s, states[i]) == 0)
			return true;
	return false;
}

/* A page of the list: the rows of o, the page's outbox rows. */
#define LIST_SQL(O) \
	"SELECT o.id, ev.public_id, o.destination, t.uri, o.state, o.attempts, o.last_error, " \
	" " APP_SQL_TS("o.next_attempt_at") ", " APP_SQL_TS("o.created_at") ", " APP_SQL_TS("o.delivered_at") " " \
	"FROM " O " JOIN events ev ON ev.id = o.event_id LEFT JOIN identities t ON t.id = o.target_identity_id " \
	"ORDER BY o.id"

/* No state, or delivered (the bulk of the table, which no index but the
 * key holds): the key in order, filtered. */
static const char LIST_BY_ID_SQL[] = LIST_SQL(
	"(SELECT * FROM outbox WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR destination = $2) "
	" AND id > $3::bigint ORDER BY id LIMIT $4::int) o");

/* Any other state: a few rows among millions delivered, which the key in
 * order would pass over one by one.  outbox_state_dest_idx (state,
 * destination, id) holds them by destination, and destinations are few (a
 * peer, matrix, an XMPP component): d walks that state's destinations in
 * the index (one probe each; the given one alone), each gives its first
 * rows after the cursor in id order, and the page is the first of those.
 * Only ids come from the index (an index-only scan: the planner takes it
 * over a smaller partial index that would read all of a destination's
 * rows), the rows by key. */
static const char LIST_BY_DEST_SQL[] = LIST_SQL(
	"(WITH RECURSIVE d(destination) AS ("
	"  SELECT coalesce($2, (SELECT min(destination) FROM outbox WHERE state = $1)) "
	"  UNION ALL "
	"  SELECT (SELECT min(x.destination) FROM outbox x WHERE x.state = $1 AND x.destination > d.destination) "
	"  FROM d WHERE d.destination IS NOT NULL AND $2::text IS NULL) "
	" SELECT p.id FROM d CROSS JOIN LATERAL (SELECT x.id FROM outbox x WHERE x.state = $1 "
	"  AND x.destination = d.destination AND x.id > $3::bigint ORDER BY x.id LIMIT $4::int) p "
	" ORDER BY p.id LIMIT $4::int) k JOIN outbox o ON o.id = k.id");

static cw_err list_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct list_input *in = j->data;
	const char *params[] = { in->state[0] ? in->state : NULL, in->destination[0] ? in->destination : NULL,
				 in->after, in->limit };
	bool by_dest = in->state[0] && strcmp(in->state, "delivered") != 0;
	PGresult *r = PQexecParams(c, by_dest ? LIST_BY_DEST_SQL : LIST_BY_ID_SQL, 4, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	json_t *rows = json_array();
	for (int i = 0; i < PQntuples(r); i++) {
		json_t *o = json_pack("{s:I, s:s, s:s, s:s, s:i, s:s, s:s}", "id", (json_int_t)atoll(PQgetvalue(r, i, 0)),
				      "message", PQgetvalue(r, i, 1), "destination", PQgetvalue(r, i, 2),
				      "state", PQgetvalue(r, i, 4), "attempts", atoi(PQgetvalue(r, i, 5)),
				      "next_attempt_at", PQgetvalue(r, i, 7), "created_at", PQgetvalue(r, i, 8));
		json_object_set_new(o, "recipient", PQgetisnull(r, i, 3) ? json_null() : json_string(PQgetvalue(r, i, 3)));
		json_object_set_new(o, "last_error", PQgetisnull(r, i, 6) ? json_null() : json_string(PQgetvalue(r, i, 6)));
		json_object_set_new(o, "delivered_at",
				    PQgetisnull(r, i, 9) ? json_null() : json_string(PQgetvalue(r, i, 9)));
		json_array_append_new(rows, o);
	}
	int n = PQntuples(r);
	json_t *next = n == atoi(in->limit) ? json_integer(atoll(PQgetvalue(r, n - 1, 0))) : json_null();
	PQclear(r);
	j->body = json_pack("{s:o, s:o}", "rows", rows, "next_after", next);
	return CW_OK;
}

void outbox_admin_list(struct cw_req *req, void *ctx)
{
	long long a;
	long l;
	if (!app_paging(req, &a, &l))
		return;
	const char *state = cw_req_query(req, "state"), *dest = cw_req_query(req, "destination");
	const char *bad = NULL;
	if (state && !state_valid(state))
		bad = "state must be one of pending, held, in_flight, delivered, failed, dead, dropped, expired";
	else if (dest && (strlen(dest) == 0 || strlen(dest) >= sizeof(((struct list_input *)0)->destination)))
		bad = "destination is empty or too long";
	if (bad) {
		cw_req_problem(req, 400, "invalid_query", "Invalid query", bad);
		return;
	}
	/* Without memory app_job_run answers 503 with Retry-After, a failure
	 * of the daemon's own; until the forty-fourth session's review it was
	 * 400 invalid_query "out of memory", the client's fault. */
	struct list_input *in = calloc(1, sizeof(*in));
	if (in) {
		snprintf(in->state, sizeof(in->state), "%s", state ? state : "");
		snprintf(in->destination, sizeof(in->destination), "%s", dest ? dest : "");
		snprintf(in->after, sizeof(in->after), "%lld", a);
		snprintf(in->limit, sizeof(in->limit), "%ld", l);
	}
	app_job_run(ctx, req, list_fn, in, free, false);
}

/* A replay's and a discard's audit record: the row as it was (its state,
 * destination and message), from the CTE o of the row before and u of
 * the row changed ($1 the id, $2 the actor).  Until the thirtieth session
 * a replay's details were {} and a discard's only the state. */
#define OUTBOX_AUDIT(action)                                                                                   \
	"a AS (INSERT INTO audit_log (actor, action, subject, details) SELECT $2, '" action "', $1, "       \
	"  json_build_object('state', o.state, 'destination', o.destination, 'message', "                   \
	"  (SELECT public_id FROM events WHERE id = o.event_id))::jsonb FROM o JOIN u ON u.id = o.id) "

/* Runs a replay's or a discard's statement sql ($1 the row's id, $2 the
 * actor; its answer the row's state before, how many rows it changed and,
 * for a replay, the earliest dead letter of the row's room to its
 * destination before it, NULL for none) and answers: 404 for no such row,
 * 409 for a row that is no dead letter (verb: what cannot be done to it)
 * or one an earlier dead letter holds back, else the row's new state;
 * *done when it changed the row.  Only a dead letter is locked (by the
 * UPDATE that changes it): a lock on a pending row, held until the group
 * commit's batch ends, would make the dispatchers' claim (SKIP LOCKED)
 * pass it over and send the next row of its room first. */
static cw_err dead_letter_change(PGconn *c, struct app_job *j, const char *sql, const char *verb,
				 const char *new_state, bool *done, cw_errmsg *e)
{
	const char *id = j->data;
	const char *params[] = { id, admin_actor(j->req) };
	*done = false;
	PGresult *r = PQexecParams(c, sql, 2, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	const char *was = PQntuples(r) ? PQgetvalue(r, 0, 0) : "";
	bool dead = strcmp(was, "dead") == 0 || strcmp(was, "failed") == 0;
	if (PQntuples(r) == 0)
		app_job_fail(j, 404, "not_found", "no outbox row with that id");
	else if (strcmp(PQgetvalue(r, 0, 1), "0") == 0 && dead && PQnfields(r) > 2 && !PQgetisnull(r, 0, 2))
		app_job_fail(j, 409, "conflict",
			     "outbox row %s, an earlier message of this row's room to the same destination, is a dead "
			     "letter too: replay it (or discard it) first, so that the room's messages arrive in order",
			     PQgetvalue(r, 0, 2));
	else if (strcmp(PQgetvalue(r, 0, 1), "0") == 0)
		app_job_fail(j, 409, "conflict", "only a dead letter can be %s; this row is %s", verb, PQgetvalue(r, 0, 0));
	else
		*done = true;
	PQclear(r);
	if (*done)
		j->body = json_pack("{s:I, s:s}", "id", (json_int_t)atoll(id), "state", new_state);
	return CW_OK;
}

/* A replay asks the server's rules (and the user's opt-out) first, as the
 * policy thread's recheck does after a change of them: a dead letter they
 * now refuse is dropped (content erased, the reason audited) and the
 * replay refused, 409.  Until the thirty-first session a dead letter
 * replayed after a deny of its sender's domain was delivered.  Only a
 * dead letter: a row in another state is answered as one (409, "only a
 * dead letter can be replayed") whatever the rules say, and left to their
 * recheck; until the forty-sixth session a pending row they refused
 * (their recheck not there yet) was dropped by the replay, 409 "dropped".
 * The state is read without a lock (dead_letter_change says why): a row
 * that goes dead between the two statements is replayed without the
 * rules' word, as it would have gone out had a lane claimed it a moment
 * before.
 *
 * A dead letter whose room has an earlier one to the same destination (e)
 * is not replayed (409, naming it): pending, the claim would send it at
 * once, before the earlier one (a dead row holds no room back: the rows
 * written after it go on), and the peer would get the room's messages out
 * of order.  The dispatcher makes a room's later rows dead with its first
 * so that a replay oldest first keeps the order; until the forty-sixth
 * session nothing kept a replay to that order. */
static cw_err replay_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	const char *params[] = { j->data };
	PGresult *r = PQexecParams(c, "SELECT state IN ('dead', 'failed') FROM outbox WHERE id = $1::bigint", 1, NULL,
				   params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	bool dead = PQntuples(r) && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
	PQclear(r);
	const char *reason = NULL;
	if (dead) {
		rc = policy_recheck_row(j->app->policy, c, j->data, &reason, e);
		if (rc)
			return rc;
	}
	if (reason) {
		app_job_fail(j, 409, "conflict", "the server's rules now refuse this message (%s): dropped, not replayed",
			     reason);
		return CW_OK;
	}
	bool done;
	rc = dead_letter_change(c, j,
		"WITH o AS (SELECT id, state, destination, event_id, room_id FROM outbox WHERE id = $1::bigint), "
		"e AS (SELECT min(p.id) AS id FROM outbox p JOIN o ON p.destination = o.destination "
		"  AND p.room_id = o.room_id AND p.id < o.id WHERE p.state IN ('dead', 'failed')), "
		"u AS (UPDATE outbox x SET state = 'pending', attempts = 0, next_attempt_at = now(), "
		"  claimed_by = NULL, claimed_until = NULL, sender_told_at = NULL FROM o "
		"  WHERE x.id = o.id AND x.state IN ('dead', 'failed') AND (SELECT id FROM e) IS NULL RETURNING x.id), "
		OUTBOX_AUDIT("outbox.replay")
		"SELECT o.state, (SELECT count(*) FROM u), (SELECT id FROM e) FROM o",
		"replayed", "pending", &done, e);
	return rc || !done ? rc : store_exec(c, "NOTIFY causeway_outbox", e);
}

void outbox_admin_replay(struct cw_req *req, void *ctx)
{
	char id[24];
	if (app_path_id(req, "id", "outbox row", id))
		app_job_run(ctx, req, replay_fn, strdup(id), free, true);
}

/* Discarding a dead letter: the operator gives up on it; the row stays,
 * as dropped, so the message's status and trace still show it. */
static cw_err discard_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	bool done;
	return dead_letter_change(c, j,
		"WITH o AS (SELECT id, state, destination, event_id FROM outbox WHERE id = $1::bigint), "
		"u AS (UPDATE outbox x SET state = 'dropped', last_error = left('discarded by ' || $2 || "
		"  coalesce('; ' || x.last_error, ''), 4096), claimed_by = NULL, claimed_until = NULL "
		"  FROM o WHERE x.id = o.id AND x.state IN ('dead', 'failed') RETURNING x.id), "
		OUTBOX_AUDIT("outbox.discard")
		"SELECT o.state, (SELECT count(*) FROM u) FROM o",
		"discarded", "dropped", &done, e);
}

void outbox_admin_discard(struct cw_req *req, void *ctx)
{
	char id[24];
	if (app_path_id(req, "id", "outbox row", id))
		app_job_run(ctx, req, discard_fn, strdup(id), free, true);
}

/* The message trace: where the message came from, every policy decision
 * about it with its reason, and every delivery with each of its attempts,
 * built in one statement.  A decision's recipient as in the decision view
 * (policy_admin_decision): details.user when the row names one. */
static const char TRACE_SQL[] =
	"SELECT json_build_object('message', e.public_id, 'room', r.public_id, 'sender', s.uri, 'type', e.type, "
	" 'origin', json_build_object('network', e.origin_network, 'native_id', e.origin_native_id), "
	" 'accepted_at', " APP_SQL_TS("e.accepted_at") ", 'content_deleted', e.content = '{}'::jsonb, "
	" 'decisions', (SELECT coalesce(json_agg(json_build_object('at', " APP_SQL_TS("a.at") ", 'verdict', split_part(a.action, '.', 2), "
	"  'reason', a.reason_code, 'rule_id', a.rule_id, 'recipient', coalesce(a.details->>'user', a.subject), "
	"  'details', a.details) ORDER BY a.id), "
	"  '[]'::json) FROM audit_log a WHERE a.event_id = e.id AND a.actor = 'policy'), "
	" 'deliveries', (SELECT coalesce(json_agg(json_build_object('id', o.id, 'destination', o.destination, "
	"  'recipient', t.uri, 'state', o.state, 'attempts', o.attempts, 'next_attempt_at', " APP_SQL_TS("o.next_attempt_at") ", "
	"  'last_error', o.last_error, 'remote_id', o.remote_id, 'created_at', " APP_SQL_TS("o.created_at") ", "
	"  'delivered_at', " APP_SQL_TS("o.delivered_at") ", 'read_at', " APP_SQL_TS("o.read_at") ", "
	"  'verdict', " DELIVERY_VERDICT("d.action") ", 'reason', d.reason_code, "
	"  'tries', (SELECT coalesce(json_agg(json_build_object('attempt', x.attempt, 'started_at', " APP_SQL_TS("x.started_at") ", "
	"   'finished_at', " APP_SQL_TS("x.finished_at") ", 'ok', x.ok, 'code', x.code, 'error', x.error) ORDER BY x.attempt), "
	"   '[]'::json) FROM delivery_attempts x WHERE x.outbox_id = o.id)) ORDER BY o.id), '[]'::json) "
	"  FROM outbox o LEFT JOIN identities t ON t.id = o.target_identity_id "
	"  LEFT JOIN LATERAL (SELECT * FROM audit_log a WHERE a.event_id = e.id AND a.actor = 'policy' "
	"   AND " DELIVERY_DECISION " ORDER BY a.id DESC LIMIT 1) d ON true "
	"  WHERE o.event_id = e.id))::text "
	"FROM events e JOIN identities s ON s.id = e.sender_id JOIN rooms r ON r.id = e.room_id "
	"WHERE e.public_id = $1";

static cw_err trace_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	const char *params[] = { j->data };
	PGresult *r = PQexecParams(c, TRACE_SQL, 1, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 0) {
		PQclear(r);
		app_job_fail(j, 404, "not_found", "no message with that id");
		return CW_OK;
	}
	j->body = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
	PQclear(r);
	return j->body ? CW_OK : cw_fail(e, CW_EINTERNAL, "the database gave an answer that is not JSON");
}

void outbox_admin_trace(struct cw_req *req, void *ctx)
{
	const char *id = cw_req_param(req, "id");
	if (!message_id_valid(id)) {
		cw_req_problem(req, 404, "not_found", "Not found", "no message with that id");
		return;
	}
	app_job_run(ctx, req, trace_fn, strdup(id), free, false);
}
