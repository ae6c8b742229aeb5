/* /admin/v1/outbox: the outbox by state and destination, and replaying a
 * dead letter. */
#include "config.h"
#include "app.h"
#include "log.h"
#include "outbox_admin.h"

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

static cw_err list_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct list_input *in = j->data;
	const char *params[] = { in->state[0] ? in->state : NULL, in->destination[0] ? in->destination : NULL,
				 in->after, in->limit };
	PGresult *r = PQexecParams(c,
		"SELECT o.id, ev.public_id, o.destination, t.uri, o.state, o.attempts, o.last_error, "
		" to_char(o.next_attempt_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "
		" to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "
		" to_char(o.delivered_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') "
		"FROM outbox o JOIN events ev ON ev.id = o.event_id LEFT JOIN identities t ON t.id = o.target_identity_id "
		"WHERE ($1::text IS NULL OR o.state = $1) AND ($2::text IS NULL OR o.destination = $2) "
		" AND o.id > $3::bigint ORDER BY o.id LIMIT $4::int",
		4, NULL, params, NULL, NULL, 0);
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
	struct list_input *in = calloc(1, sizeof(*in));
	const char *state = cw_req_query(req, "state"), *dest = cw_req_query(req, "destination");
	const char *bad = NULL;
	if (!in)
		bad = "out of memory";
	else if (state && !state_valid(state))
		bad = "state must be one of pending, held, in_flight, delivered, failed, dead, dropped, expired";
	else if (dest && (strlen(dest) == 0 || strlen(dest) >= sizeof(in->destination)))
		bad = "destination is empty or too long";
	if (bad) {
		cw_req_problem(req, 400, "invalid_query", "Invalid query", bad);
		free(in);
		return;
	}
	snprintf(in->state, sizeof(in->state), "%s", state ? state : "");
	snprintf(in->destination, sizeof(in->destination), "%s", dest ? dest : "");
	snprintf(in->after, sizeof(in->after), "%lld", a);
	snprintf(in->limit, sizeof(in->limit), "%ld", l);
	app_job_run(ctx, req, list_fn, in, free, false);
}

static cw_err replay_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	const char *id = j->data;
	const char *params[] = { id };
	PGresult *r = PQexecParams(c, "SELECT state FROM outbox WHERE id = $1::bigint FOR UPDATE", 1, NULL, params, NULL,
				   NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	if (PQntuples(r) == 0) {
		PQclear(r);
		app_job_fail(j, 404, "not_found", "no outbox row with that id");
		return CW_OK;
	}
	bool dead = strcmp(PQgetvalue(r, 0, 0), "dead") == 0 || strcmp(PQgetvalue(r, 0, 0), "failed") == 0;
	char state[16];
	snprintf(state, sizeof(state), "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	if (!dead) {
		app_job_fail(j, 409, "conflict", "only a dead letter can be replayed; this row is %s", state);
		return CW_OK;
	}
	r = PQexecParams(c, "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = now(), "
			    "claimed_by = NULL, claimed_until = NULL WHERE id = $1::bigint", 1, NULL, params, NULL, NULL, 0);
	cw_err rc = PQresultStatus(r) == PGRES_COMMAND_OK ? CW_OK : store_result_err(c, r, e);
	PQclear(r);
	if (rc)
		return rc;
	r = PQexecParams(c, "INSERT INTO audit_log (actor, action, subject, details) VALUES ('admin', "
			    "'outbox.replay', $1, '{}')", 1, NULL, params, NULL, NULL, 0);
	rc = PQresultStatus(r) == PGRES_COMMAND_OK ? CW_OK : store_result_err(c, r, e);
	PQclear(r);
	if (rc)
		return rc;
	j->body = json_pack("{s:I, s:s}", "id", (json_int_t)atoll(id), "state", "pending");
	return store_exec(c, "NOTIFY causeway_outbox", e);
}

void outbox_admin_replay(struct cw_req *req, void *ctx)
{
	char id[24];
	if (app_path_id(req, "id", "outbox row", id))
		app_job_run(ctx, req, replay_fn, strdup(id), free, true);
}
