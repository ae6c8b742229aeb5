/* The Matrix adapter: registration, the appservice API and transactions. */
#include "config.h"
#include "matrix.h"
#include "matrix_int.h"
#include "buf.h"
#include "log.h"
#include "pipeline.h"
#include "store.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ set-up */

static const char *or_default(const char *s, const char *dflt)
{
	return s && *s ? s : dflt;
}

const char *mx_server_name(const struct cw_config *cfg)
{
	return or_default(cfg->mx_server_name, or_default(cfg->domain, "localhost"));
}

size_t mx_hs_base_len(const struct cw_config *cfg)
{
	size_t hl = strlen(cfg->mx_homeserver_url);
	while (hl && cfg->mx_homeserver_url[hl - 1] == '/')
		hl--;
	return hl;
}

cw_err matrix_new(struct matrix **out, struct cw_app *app, cw_errmsg *e)
{
	*out = NULL;
	const struct cw_config *cfg = app->cfg;
	if (!cfg->mx_homeserver_url || !*cfg->mx_homeserver_url)
		return CW_OK; /* else cfg_load found both tokens set and good */
	struct matrix *m = calloc(1, sizeof(*m));
	if (!m)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	m->app = app;
	m->cfg = cfg;
	cw_sha256(cfg->mx_hs_token, strlen(cfg->mx_hs_token), m->hs_token_hash); /* compared in constant time */
	pthread_mutex_init(&m->mu, NULL);
	snprintf(m->ping_state, sizeof(m->ping_state), "pending");
	snprintf(m->bot, sizeof(m->bot), "@%s:%s", cfg->mx_sender_localpart, mx_server_name(cfg));
	m->typing = json_object();
	m->profile_failed = json_object();
	m->limit_told = json_object();
	m->media_queue = json_array();
	m->media_state = json_object();
	m->catching_up = json_object();
	m->joining = json_object();
	pthread_cond_init(&m->joining_cond, NULL);
	pthread_cond_init(&m->media_cond, NULL);
	pthread_cond_init(&m->ping_cond, NULL);
	if (!m->typing || !m->profile_failed || !m->limit_told || !m->media_queue || !m->media_state ||
	    !m->catching_up || !m->joining || pthread_key_create(&m->curl_key, mx_curl_release) != 0) {
		json_decref(m->catching_up);
		json_decref(m->joining);
		pthread_cond_destroy(&m->joining_cond);
		json_decref(m->typing);
		json_decref(m->profile_failed);
		json_decref(m->limit_told);
		json_decref(m->media_queue);
		json_decref(m->media_state);
		pthread_cond_destroy(&m->media_cond);
		pthread_cond_destroy(&m->ping_cond);
		pthread_mutex_destroy(&m->mu);
		free(m);
		return cw_fail(e, CW_ENOMEM, "cannot make a thread key");
	}
	app->media = (struct media_source){ .ctx = m, .owns = matrix_media_owns, .fetch = matrix_media_fetch };
	*out = m;
	return CW_OK;
}

/* The adapter's threads, before "stopped" is said (gateway/main.c): the
 * ping, the bot (its homeserver call in flight ends with its stop:
 * mx_call_stop_on), then the media workers, whose transfers end once
 * app->stopping is set (media.h), earlier in the stop, so that their wait
 * overlaps the bot's.  Until the fiftieth session's review the media
 * workers were stopped only in matrix_free, after "stopped": an upload in
 * flight held the process's exit up to a second past it, outside
 * shutdown_ms.  Nothing queues files after this: the dispatcher, which
 * alone does (mx_media_lookup), has stopped; a peer's download of a
 * Matrix file (matrix_media_fetch) is no worker's. */
void matrix_stop(struct matrix *m)
{
	if (m) {
		mx_ping_stop(m);
		mx_bot_stop(m);
		mx_media_stop(m);
	}
}

void matrix_free(struct matrix *m)
{
	if (!m)
		return;
	mx_bot_stop(m);
	mx_media_stop(m);
	mx_ping_stop(m);
	mx_curl_release(pthread_getspecific(m->curl_key)); /* this thread's, if any */
	pthread_setspecific(m->curl_key, NULL);
	pthread_key_delete(m->curl_key);
	if (m->multi)
		curl_multi_cleanup(m->multi); /* the dispatcher has stopped */
	json_decref(m->typing);
	json_decref(m->profile_failed);
	json_decref(m->limit_told);
	json_decref(m->media_queue);
	json_decref(m->media_state);
	json_decref(m->catching_up);
	json_decref(m->joining);
	pthread_cond_destroy(&m->joining_cond);
	pthread_cond_destroy(&m->media_cond);
	pthread_cond_destroy(&m->ping_cond);
	pthread_mutex_destroy(&m->mu);
	free(m);
}

void mx_curl_release(void *c)
{
	if (c)
		curl_easy_cleanup(c);
}

/* ------------------------------------------------------------ registration */

/* A regex matching s literally. */
static void regex_quote(const char *s, char *out, size_t len)
{
	size_t n = 0;
	for (; *s && n + 3 < len; s++) {
		if (strchr(".^$*+?()[]{}|\\/", *s))
			out[n++] = '\\';
		out[n++] = *s;
	}
	out[n] = '\0';
}

static void new_token(char out[65])
{
	unsigned char raw[32];
	cw_random(raw, sizeof(raw));
	cw_hex(out, raw, sizeof(raw));
}

/* s in YAML's double quotes (its escapes: the tokens are the operator's
 * strings, any printable character may be in them). */
static void yaml_quoted(FILE *out, const char *s)
{
	fputc('"', out);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(out, "\\%c", c);
		else if (c < 0x20 || c == 0x7f)
			fprintf(out, "\\x%02x", c);
		else
			fputc(c, out);
	}
	fputc('"', out);
}

int matrix_print_registration(const struct cw_config *cfg, FILE *out)
{
	char made_as[65], made_hs[65], server[600], user[300], alias[300], url[600];
	const char *as = cfg->mx_as_token, *hs = cfg->mx_hs_token;
	bool made = false;
	if (!as || !*as) {
		new_token(made_as);
		as = made_as;
		made = true;
	}
	if (!hs || !*hs) {
		new_token(made_hs);
		hs = made_hs;
		made = true;
	}
	cw_errmsg e;
	if (cfg_matrix_tokens_check(as, hs, &e)) {
		fprintf(stderr, "causewayd: %s\n", e.msg);
		return 1;
	}
	regex_quote(mx_server_name(cfg), server, sizeof(server));
	regex_quote(cfg->mx_user_prefix, user, sizeof(user));
	regex_quote(cfg->mx_alias_prefix, alias, sizeof(alias));
	if (cfg->mx_url && *cfg->mx_url) {
		snprintf(url, sizeof(url), "%s", cfg->mx_url);
	} else if (cfg->port == 0) {
		/* The url was http://127.0.0.1:0 (until the forty-fourth session),
		 * which no homeserver reaches: the port is known only once the
		 * daemon runs, and the registration is read before. */
		fprintf(stderr, "causewayd: server.port is 0 (any free port) and matrix.url is not set: the "
				"registration's url would name port 0; set matrix.url to where the homeserver reaches "
				"causewayd, or server.port\n");
		return 1;
	} else {
		cw_http_local_url(cfg->listen_address, (unsigned)cfg->port, url, sizeof(url));
	}
	fprintf(out, "# Causeway's application service registration (docs/matrix.md shows where each homeserver\n"
		     "# reads it).%s\n", made ? "  New tokens were made: put them in causewayd's configuration as\n"
						 "# [matrix] as_token and hs_token before starting it." : "");
	/* Every value is quoted: YAML reads the tokens and the URL as strings. */
	const char *keys[] = { "id", "url", "as_token", "hs_token", "sender_localpart" };
	const char *values[] = { cfg->mx_id, url, as, hs, cfg->mx_sender_localpart };
	for (size_t i = 0; i < sizeof(keys) / sizeof(*keys); i++) {
		fprintf(out, "%s: ", keys[i]);
		yaml_quoted(out, values[i]);
		fputc('\n', out);
	}
	fprintf(out, "rate_limited: false\nreceive_ephemeral: true\nde.sorunome.msc2409.push_ephemeral: true\n");
	/* Anchored at both ends: Synapse matches with re.match, at the start
	 * only; without the $ (until the thirtieth session) the namespace
	 * claimed @_cw_x:example.org.evil.com too. */
	fprintf(out, "namespaces:\n  users:\n    - exclusive: true\n      regex: '^@%s.*:%s$'\n"
		     "  aliases:\n    - exclusive: true\n      regex: '^#%s.*:%s$'\n  rooms: []\n",
		user, server, alias, server);
	return ferror(out) ? 1 : 0;
}

const char *matrix_local_refused(const struct cw_config *cfg, const char *uri, const char *localpart, char *why,
				 size_t len)
{
	char id[MX_ID_MAX + 1];
	const char *server = mx_server_name(cfg);
	int n = snprintf(id, sizeof(id), "@%s:%s", localpart, server);
	if (n < 0 || (size_t)n >= sizeof(id) ||
	    (!mx_in_ghost_namespace(cfg->mx_user_prefix, server, id) &&
	     strcmp(localpart, cfg->mx_sender_localpart) != 0))
		return NULL; /* one too long is the delivery's to refuse (mx_deliver.c) */
	snprintf(why, len,
		 "%s is no user of this server: its Matrix id %s is in the namespace of the gateway's own bot and "
		 "ghosts", uri, id);
	return why;
}

/* ------------------------------------------------------------ answers */

void mx_error(struct cw_req *req, int status, const char *errcode, const char *msg)
{
	cw_req_reply_json(req, status, json_pack("{s:s, s:s}", "errcode", errcode, "error", msg));
}

bool matrix_unmatched(struct cw_req *req, bool method_mismatch, void *ctx)
{
	const char *path = cw_req_path(req);
	if (strncmp(path, "/_matrix/", 9) != 0 && strncmp(path, "/transactions/", 14) != 0 &&
	    strncmp(path, "/users/", 7) != 0 && strncmp(path, "/rooms/", 7) != 0)
		return false;
	if (method_mismatch)
		mx_error(req, 405, "M_UNRECOGNIZED", "this endpoint does not take that method");
	else
		mx_error(req, 404, "M_UNRECOGNIZED", "unrecognized request");
	return true;
}

/* Whether token is the homeserver's (compared in constant time). */
static bool is_hs_token(struct cw_app *app, const char *token)
{
	unsigned char h[32];
	cw_sha256(token, strlen(token), h);
	return cw_ct_equal(h, app->matrix->hs_token_hash, 32);
}

/* The homeserver's token on req (Authorization: Bearer, or the legacy
 * access_token parameter): 0 it is, 401 none, 403 another, 404 no adapter.
 * With both, both must be it: the specification asks the appservice to
 * check that they match. */
static int hs_token_check(struct cw_req *req, struct cw_app *app)
{
	if (!app->matrix)
		return 404;
	const char *header = app_bearer(req), *query = cw_req_query(req, "access_token");
	if (!header && !query)
		return 401;
	bool ok = true;
	if (header)
		ok = is_hs_token(app, header) && ok;
	if (query)
		ok = is_hs_token(app, query) && ok;
	return ok ? 0 : 403;
}

/* False after answering 401/403 (or 404 with the adapter off: then these
 * paths do not exist).  The routes' check (CW_AUTH_HOMESERVER), made from
 * the headers, before the body is read, and again after it (app.c). */
bool matrix_hs_authorized(struct cw_req *req, struct cw_app *app)
{
	switch (hs_token_check(req, app)) {
	case 0:
		return true;
	case 404:
		mx_error(req, 404, "M_UNRECOGNIZED", "the Matrix adapter is not configured");
		return false;
	case 401:
		mx_error(req, 401, "M_MISSING_TOKEN", "the homeserver's token is required");
		return false;
	default:
		mx_error(req, 403, "M_FORBIDDEN", "the homeserver's token does not match");
		return false;
	}
}

bool matrix_large_body_ok(void *ctx, struct cw_req *req)
{
	return hs_token_check(req, ctx) == 0;
}

/* ------------------------------------------------------------ queries */

void matrix_as_ping(struct cw_req *req, void *ctx)
{
	(void)ctx;
	size_t len;
	const char *body = cw_req_body(req, &len);
	json_t *j = len ? json_loadb(body, len, 0, NULL) : json_object();
	if (!json_is_object(j)) {
		json_decref(j);
		mx_error(req, 400, "M_NOT_JSON", "the body must be a JSON object");
		return;
	}
	json_t *tid = json_object_get(j, "transaction_id");
	if (tid && !json_is_string(tid)) {
		json_decref(j);
		mx_error(req, 400, "M_BAD_JSON", "transaction_id must be a string");
		return;
	}
	json_decref(j);
	cw_req_reply_json(req, 200, json_object());
}

/* GET /users/{userId}: a ghost of a known remote user exists (it is
 * registered now if it was not), and so does the bot (registered at start,
 * and tried again while the homeserver refuses: until the thirty-fifth
 * session an invitation of the bot before then was refused as of an
 * unknown user); any other id does not. */
struct user_query {
	struct matrix *m;
	bool bot;
	char user_id[MX_ID_MAX + 1];
	char network[64];
	char local[MX_ID_MAX + 1];
	char display[300];
};

static cw_err user_query_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct user_query *q = j->data;
	if (q->bot) {
		j->body = json_object();
		return CW_OK;
	}
	char peer[80];
	snprintf(peer, sizeof(peer), "%s", q->network);
	const char *params[] = { peer, q->local };
	PGresult *r = PQexecParams(c,
		"SELECT coalesce(i.display_name, '') FROM identities i JOIN peers p ON p.id = i.peer_id "
		"WHERE p.name = $1 AND i.network = 'peer:' || p.name AND i.localpart = $2 AND i.domain = p.domain",
		2, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 0) {
		PQclear(r);
		app_job_fail(j, 404, "M_NOT_FOUND", "no such user");
		return CW_OK;
	}
	snprintf(q->display, sizeof(q->display), "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	j->body = json_object();
	return CW_OK;
}

/* The spec: a user the appservice says exists must exist when it answers,
 * so the ghost is registered before the 200; one that could not be is
 * not said to exist (503: the homeserver refuses the invitation now, and
 * asks again with the next, rather than take one the ghost can never
 * act on). */
static void user_query_after(struct app_job *j)
{
	struct user_query *q = j->data;
	cw_errmsg e;
	bool failed = q->bot ? !mx_register_bot(q->m, &e) /* logs its failure */
			     : mx_register_ghost(q->m, q->network, q->local, q->display, q->user_id, &e) != CW_OK;
	if (failed && !q->bot)
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot register a ghost the homeserver asked for", "user", q->user_id,
			       "detail", e.msg);
	if (failed) {
		json_decref(j->body);
		j->status = 503;
		j->body = json_pack("{s:s, s:s}", "errcode", "M_UNKNOWN", "error",
				    "the user could not be registered on the homeserver; try again");
	}
}

void matrix_as_user(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	struct user_query *q = calloc(1, sizeof(*q));
	const char *id = cw_req_param(req, "user");
	if (q && app->matrix && id && strcmp(id, app->matrix->bot) == 0)
		q->bot = true;
	else if (!q || !mx_ghost_parse(app->cfg->mx_user_prefix, mx_server_name(app->cfg), id, q->network,
				       sizeof(q->network), q->local, sizeof(q->local))) {
		free(q);
		mx_error(req, 404, "M_NOT_FOUND", "no such user");
		return;
	}
	q->m = app->matrix;
	snprintf(q->user_id, sizeof(q->user_id), "%s", id);
	struct app_job *j = app_job_new(app, req, user_query_fn);
	if (!j) {
		free(q);
		mx_error(req, 503, "M_UNKNOWN", "out of memory");
		return;
	}
	j->data = q;
	j->data_free = free;
	j->matrix_errors = true;
	j->after = user_query_after;
	j->after_waits = true; /* calls the homeserver: not on a store reader */
	app_job_start(j, false);
}

void matrix_as_room_alias(struct cw_req *req, void *ctx)
{
	(void)ctx;
	/* The gateway makes no rooms by alias (yet): none exists. */
	mx_error(req, 404, "M_NOT_FOUND", "no such room alias");
}

/* ------------------------------------------------------------ transactions */

struct txn {
	struct cw_app *app;
	struct matrix *m;
	json_t *events;       /* the room events to bridge (echoes dropped) */
	json_t *bot;          /* the events that may be for the bot (its invites, its rooms' messages) */
	json_t *ephemeral;    /* typing and receipts */
	json_t *refs;         /* Matrix event ids referred to, and local senders (round 0) */
	json_t *map;          /* Matrix event id -> msg_ id */
	json_t *ref_rooms;    /* Matrix event id -> the id of its neutral room */
	json_t *edits;        /* Matrix event ids of edits (stored, or of this transaction): map names their message */
	const char *cur_room; /* the neutral room of the event being converted */
	const char *cur_sender; /* and its sender (the one member it may name) */
	json_t *senders;      /* Matrix user id -> mimi URI (local users) */
	json_t *rooms;        /* Matrix room id -> its neutral room's id when bridged */
	json_t *mgmt;         /* Matrix room id -> the user whose management room it is */
	json_t *rejoins;      /* "<Matrix room> <user>": their join is no change (joins_of_invitees) */
	json_t *prior;        /* "<Matrix room> <user>" -> her membership as far as Causeway knows (txn_lookup, then
				 each member event of hers as txn_convert goes): for a member event without
				 unsigned.prev_content (with_prior) */
	json_t *joining;      /* the keys of m->joining this transaction holds (hold_joins), or NULL */
	json_t *bot_send;     /* of bot, those that are the bot's (txn_prepare) */
	json_t *typing;       /* room -> who types, as this transaction says (kept once it is durable) */
	struct item_room *item_rooms; /* per pipeline item: where a refusal's notice goes (txn_convert) */
	size_t n_item_rooms;  /* ... those set */
	struct cw_buf ir_text; /* their texts */
	json_t *refusals;     /* [[room, text, event id], ...]: events refused, told once durable (once per event) */
	json_t *nul;          /* events holding a NUL in a string (txn_new): refused, never stored */
	struct backfill_wait *wait; /* mx_backfill's: told the outcome */
	struct app_job *parked_next; /* the next transaction parked behind a catch-up */
	bool write;           /* the events need the write (submit_prepare said so) */
	size_t conv_invalid, conv_ignored; /* txn_convert's own (it may run again: reset each time) */
	struct submit *b;
	unsigned char key[32];
	char txn_id[MX_ID_MAX + 1];
	size_t invalid, ignored;
};

static void release_joins(struct txn *t);

/* Where item i's refusal is told: its Matrix room, its neutral type and
 * its Matrix event id (NULL: none), their texts copied into t->ir_text
 * (one block for the transaction).  Until the forty-eighth session a JSON
 * array an item holding strings of the parsed transaction: made on the
 * reader, and its eight blocks (the array, its table, three strings and
 * their texts) freed on the writer after the commit, the parsed
 * transaction being freed on the reader before (txn_prepare). */
struct item_room {
	size_t at[3]; /* offsets in ir_text, SIZE_MAX: NULL */
};

static cw_err item_room_set(struct txn *t, size_t i, const char *room, const char *type, const char *event_id)
{
	const char *v[3] = { room, type, event_id };
	for (size_t k = 0; k < 3; k++) {
		t->item_rooms[i].at[k] = v[k] ? t->ir_text.len : SIZE_MAX;
		if (v[k] && cw_buf_add(&t->ir_text, v[k], strlen(v[k]) + 1))
			return CW_ENOMEM;
	}
	t->n_item_rooms = i + 1;
	return CW_OK;
}

static void item_room_get(const struct txn *t, size_t i, const char **room, const char **type,
			  const char **event_id)
{
	const char **v[3] = { room, type, event_id };
	for (size_t k = 0; k < 3; k++) {
		size_t at = i < t->n_item_rooms ? t->item_rooms[i].at[k] : SIZE_MAX;
		*v[k] = at == SIZE_MAX ? NULL : t->ir_text.p + at;
	}
}

static void txn_free(void *arg)
{
	struct txn *t = arg;
	release_joins(t);
	json_decref(t->events);
	json_decref(t->bot);
	json_decref(t->ephemeral);
	json_decref(t->refs);
	json_decref(t->map);
	json_decref(t->ref_rooms);
	json_decref(t->edits);
	json_decref(t->senders);
	json_decref(t->rooms);
	json_decref(t->mgmt);
	json_decref(t->rejoins);
	json_decref(t->prior);
	json_decref(t->bot_send);
	json_decref(t->typing);
	free(t->item_rooms);
	cw_buf_free(&t->ir_text);
	json_decref(t->refusals);
	json_decref(t->nul);
	if (t->b)
		submit_free(t->b);
	free(t);
}

static const char *lookup_map(void *ctx, const char *id)
{
	json_t *v = json_object_get(ctx, id);
	return json_is_string(v) ? json_string_value(v) : NULL;
}

/* The mapper's lookup: a Matrix event id (its neutral id, when it is an
 * event of the neutral room of the event converted: a group's message
 * reaches the direct room with its sender, and a reply, reaction or
 * receipt there names it, but refers to a message of another room), or a
 * user id (a local user's URI, for membership changes): the event's own
 * sender only.  A member event of another's (an invitation, a kick) is the
 * bot's to act on (bot_wants), never a change the peer hears of; until the
 * thirty-ninth session any local user the transaction named was found, so
 * an invitee who typed elsewhere in the same transaction was invited into
 * the direct room at the peer. */
static const char *lookup_ref_or_user(void *ctx, const char *id)
{
	struct txn *t = ctx;
	if (id[0] == '@')
		return t->cur_sender && strcmp(id, t->cur_sender) == 0 ? lookup_map(t->senders, id) : NULL;
	const char *room = lookup_map(t->ref_rooms, id);
	return room && t->cur_room && strcmp(room, t->cur_room) == 0 ? lookup_map(t->map, id) : NULL;
}

struct id_set {
	json_t *list; /* what the statement gets, each id once */
	json_t *seen; /* the same ids as keys */
};

/* Adds id (a JSON string; anything else is not looked up) unless it is in
 * already: a transaction's events are mostly from one sender in one room,
 * and each lookup costs the statement as much as the first. */
static void add_id(struct id_set *s, json_t *id)
{
	const char *v = json_string_value(id);
	if (!v || json_object_get(s->seen, v))
		return;
	json_object_set(s->seen, v, json_true());
	json_array_append(s->list, id);
}

static void add_id_text(struct id_set *s, const char *v)
{
	json_t *id = json_string(v);
	add_id(s, id);
	json_decref(id);
}

/* The previous membership of a member event: unsigned.prev_content's, or
 * NULL (the specification makes it optional). */
static const char *prev_membership(const json_t *ev)
{
	return json_string_value(
		json_object_get(json_object_get(json_object_get(ev, "unsigned"), "prev_content"), "membership"));
}

/* Whether ev's membership says join after a join: a profile change, as
 * the homeserver tells it. */
static bool join_after_join(const json_t *ev, const char *ms)
{
	const char *prev = prev_membership(ev);
	return ms && prev && strcmp(ms, "join") == 0 && strcmp(prev, "join") == 0;
}

/* [Matrix room, user] of a join or leave of the sender's own that does
 * not say what her membership was before, or of a join after a join
 * (with_prior), each pair once. */
static void add_member(struct id_set *s, const json_t *ev)
{
	const char *type = json_string_value(json_object_get(ev, "type"));
	if (!type || strcmp(type, "m.room.member") != 0)
		return; /* before the other members' look-ups (joins_of_invitees) */
	const char *key = json_string_value(json_object_get(ev, "state_key"));
	const char *sender = json_string_value(json_object_get(ev, "sender"));
	const char *room = json_string_value(json_object_get(ev, "room_id"));
	const char *ms = json_string_value(json_object_get(json_object_get(ev, "content"), "membership"));
	if (!key || !sender || strcmp(key, sender) != 0 || !room ||
	    !ms || (strcmp(ms, "join") != 0 && strcmp(ms, "leave") != 0) || (prev_membership(ev) && !join_after_join(ev, ms)))
		return;
	json_t *pair = json_pack("[s, s]", room, key);
	char *text = pair ? json_dumps(pair, JSON_COMPACT) : NULL;
	if (text && !json_object_get(s->seen, text)) {
		json_object_set(s->seen, text, json_true());
		json_array_append(s->list, pair);
	}
	free(text);
	json_decref(pair);
}

/* The statement of txn_lookup, prepared on every store connection: sent
 * whole each time, its planning took ten times its running.  Run with its
 * generic plan (txn_lookup).  Each event named is found by its primary
 * key, one at a time (the LATERAL's LIMIT keeps the planner from joining
 * events whole): joined as a table, PostgreSQL hashed all of events for a
 * transaction naming any event (a reply, a reaction, a receipt) while the
 * table was some thousands to some 40,000 rows (14 ms a transaction at
 * 16,500, forty-sixth session). */
const struct store_stmt matrix_statements[] = {
	{ "mx_txn_lookup",
	  "WITH d AS (SELECT $1::jsonb AS j) "
	  "SELECT 'ref', x.id, CASE WHEN e.type = 'edit' AND e.replaces_id IS NOT NULL "
	  "  THEN (SELECT f.public_id FROM events f WHERE f.id = e.replaces_id) ELSE e.public_id END, e.room_id::text, "
	  "  e.type = 'edit' "
	  " FROM d CROSS JOIN jsonb_array_elements_text(d.j->'ids') AS x(id) "
	  " LEFT JOIN LATERAL (SELECT e.type, e.replaces_id, e.public_id, e.room_id FROM events e "
	  "  WHERE e.id = coalesce((SELECT n.event_id FROM event_native_ids n "
	  "  WHERE n.network = 'matrix' AND n.kind = 'event_id' AND n.native_id = x.id LIMIT 1), "
	  "  (SELECT f.id FROM events f WHERE f.origin_network = 'matrix' AND f.origin_native_id = x.id)) LIMIT 1) e "
	  " ON true "
	  "UNION ALL SELECT 'room', x.id, b.room_id::text, NULL, NULL "
	  " FROM d CROSS JOIN jsonb_array_elements_text(d.j->'rooms') AS x(id) "
	  " JOIN room_bindings b ON b.network = 'matrix' AND b.native_id = x.id "
	  "UNION ALL SELECT 'user', x.id, coalesce((SELECT i.uri FROM identity_bindings ib JOIN identities i "
	  "  ON i.id = ib.identity_id WHERE ib.network = 'matrix' AND ib.native_id = x.id AND i.is_local), "
	  "  (SELECT i.uri FROM identities i WHERE i.is_local AND i.localpart = split_part(substr(x.id, 2), ':', 1) "
	  "   AND x.id = '@' || i.localpart || ':' || $2)), NULL, NULL "
	  " FROM d, jsonb_array_elements_text(d.j->'users') AS x(id) "
	  "UNION ALL SELECT 'mgmt', m.room_id, m.user_id, NULL, NULL FROM matrix_mgmt_rooms m "
	  " WHERE m.room_id IN (SELECT jsonb_array_elements_text(d.j->'rooms') FROM d) "
	  /* her membership before a member event of hers without prev_content
	   * (with_prior), from what is stored: in a group's portal her
	   * membership of the group; in a direct room (both always members
	   * of it) joined when her last event stored through Matrix since
	   * the room was bound is not her leave (she joined, wrote, read);
	   * else nothing (NULL: not known).  Her last event is looked for
	   * in the room's events alone (events_room_idx): the room as a
	   * range and its order in the ORDER BY leave the primary key no
	   * way to give the order, which as an equality and events' order
	   * alone they did: the generic plan walked the primary key
	   * backwards, through every event of every room since hers
	   * (100,000 events of another room: 3,180 buffers, 82 ms; now 4
	   * buffers; until the forty-sixth session) */
	  "UNION ALL SELECT 'prior', (x->>0) || ' ' || (x->>1), CASE WHEN b.remote_identity_id IS NULL THEN "
	  "  (SELECT CASE m.membership WHEN 'joined' THEN 'join' WHEN 'invited' THEN 'invite' END FROM room_members m "
	  "   WHERE m.room_id = b.room_id AND m.identity_id = b.local_identity_id) "
	  " WHEN (SELECT NOT (e.type = 'membership' AND e.content->'content'->>'membership' = 'leave') FROM events e "
	  "  WHERE e.room_id BETWEEN b.room_id AND b.room_id AND e.sender_id = b.local_identity_id "
	  "  AND e.origin_network = 'matrix' AND e.accepted_at >= b.created_at ORDER BY e.room_id DESC, e.id DESC LIMIT 1) "
	  " THEN 'join' END, NULL, NULL "
	  " FROM d CROSS JOIN jsonb_array_elements(d.j->'members') AS x "
	  " JOIN room_bindings b ON b.network = 'matrix' AND b.native_id = x->>0 "
	  " JOIN identities li ON li.id = b.local_identity_id AND li.is_local "
	  " WHERE EXISTS (SELECT 1 FROM identity_bindings ib WHERE ib.identity_id = li.id AND ib.network = 'matrix' "
	  "  AND ib.native_id = x->>1) OR x->>1 = '@' || li.localpart || ':' || $2" },
	{ NULL, NULL },
};

/* Asks, in one statement, what the events need: the neutral ids of the
 * Matrix events they refer to (an edit stands for the message it edits:
 * references name first versions), which rooms are bridged, and the local
 * users who sent them.  Runs on a reader, before the write (see
 * txn_prepare). */
static cw_err txn_lookup(PGconn *c, struct txn *t, cw_errmsg *e)
{
	struct id_set ids = { json_array(), json_object() }, rooms = { json_array(), json_object() },
		      users = { json_array(), json_object() }, members = { json_array(), json_object() };
	size_t i;
	json_t *ev;
	json_array_foreach(t->events, i, ev) {
		const char *refs[8];
		size_t n = mx_event_refs(ev, refs, 8);
		for (size_t k = 0; k < n; k++)
			add_id_text(&ids, refs[k]);
		add_id(&rooms, json_object_get(ev, "room_id"));
		add_id(&users, json_object_get(ev, "sender"));
		add_member(&members, ev);
	}
	json_array_foreach(t->nul, i, ev) { /* whose writer is told */
		add_id(&rooms, json_object_get(ev, "room_id"));
		add_id(&users, json_object_get(ev, "sender"));
	}
	json_array_foreach(t->ephemeral, i, ev) {
		add_id(&rooms, json_object_get(ev, "room_id"));
		json_t *content = json_object_get(ev, "content");
		const char *target;
		json_t *readers;
		json_object_foreach(content, target, readers) { /* m.receipt: {event_id: {m.read: {user: ...}}} */
			if (!json_is_object(readers))
				continue;
			add_id_text(&ids, target);
			const char *who;
			json_t *x;
			json_object_foreach(json_object_get(readers, "m.read"), who, x)
				add_id_text(&users, who);
		}
		size_t k;
		json_t *u;
		json_array_foreach(json_object_get(content, "user_ids"), k, u) /* m.typing */
			add_id(&users, u);
		/* and those who were typing, whose stop this may be */
		json_t *before = mx_typing_before(t->m, json_string_value(json_object_get(ev, "room_id")));
		json_array_foreach(before, k, u)
			add_id(&users, u);
		json_decref(before);
	}
	json_decref(ids.seen);
	json_decref(rooms.seen);
	json_decref(users.seen);
	json_decref(members.seen);
	json_t *doc = json_pack("{s:o, s:o, s:o, s:o}", "ids", ids.list, "rooms", rooms.list, "users", users.list,
				"members", members.list);
	char *text = json_dumps(doc, JSON_COMPACT);
	json_decref(doc);
	if (!text)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const char *params[] = { text, mx_server_name(t->app->cfg) };
	/* Its generic plan: a custom one folds nothing (the parameters are a
	 * document and the server's name), yet PostgreSQL planned it again at
	 * half the calls while events grew (441 of 900 transactions of
	 * tests/bench/matrix, 1.3 ms each: some 6 us of PostgreSQL's CPU an
	 * event of 100). */
	PGresult *r = store_exec_generic(c, "mx_txn_lookup", 2, params);
	free(text);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	json_object_clear(t->map);
	json_object_clear(t->ref_rooms);
	json_object_clear(t->edits);
	json_object_clear(t->rooms);
	json_object_clear(t->senders);
	json_object_clear(t->mgmt);
	json_object_clear(t->prior);
	for (int k = 0; k < PQntuples(r); k++) {
		const char *kind = PQgetvalue(r, k, 0), *id = PQgetvalue(r, k, 1);
		if (PQgetisnull(r, k, 2))
			continue;
		json_t *dst = kind[0] == 'm'                    ? t->mgmt
			      : kind[0] == 'p'                   ? t->prior
			      : kind[0] == 'r' && kind[1] == 'e' ? t->map
			      : kind[0] == 'r'                   ? t->rooms
								 : t->senders;
		json_object_set_new(dst, id, json_string(PQgetvalue(r, k, 2)));
		if (dst == t->map && !PQgetisnull(r, k, 3))
			json_object_set_new(t->ref_rooms, id, json_string(PQgetvalue(r, k, 3)));
		if (dst == t->map && PQgetvalue(r, k, 4)[0] == 't')
			json_object_set_new(t->edits, id, json_true());
	}
	PQclear(r);
	return CW_OK;
}

/* Whether a room event is the bot's: an invite of the bot or of a ghost by
 * one of this provider's users, an encryption turned on in a bridged room,
 * or what a user says in their management room.  Decided here, after the
 * lookups, so that the write carries only these (the statement checks
 * them again, against what is committed then). */
static bool bot_wants(const struct txn *t, json_t *ev)
{
	const char *type = json_string_value(json_object_get(ev, "type"));
	const char *sender = json_string_value(json_object_get(ev, "sender"));
	const char *room = json_string_value(json_object_get(ev, "room_id"));
	const char *server = mx_server_name(t->app->cfg);
	size_t sl = sender ? strlen(sender) : 0, vl = strlen(server);
	bool local = sl >= vl + 2 && sender[sl - vl - 1] == ':' && strcmp(sender + sl - vl, server) == 0;
	if (!type || !room)
		return false;
	if (strcmp(type, "m.room.member") == 0) {
		const char *key = json_string_value(json_object_get(ev, "state_key"));
		const char *ms = json_string_value(json_object_get(json_object_get(ev, "content"), "membership"));
		if (!key)
			return false;
		bool ghost = mx_in_ghost_namespace(t->app->cfg->mx_user_prefix, server, key);
		/* Someone else invited into a management room, or joining it,
		 * whoever sent it (a user of another server joins a room its
		 * user made public by herself; until the thirty-ninth session
		 * only this server's users' events were looked at): it is the
		 * user's no more (mx_bot.c, intruded). */
		if (!ghost && strcmp(key, t->m->bot) != 0 && ms && (strcmp(ms, "invite") == 0 || strcmp(ms, "join") == 0)) {
			const char *owner = json_string_value(json_object_get(t->mgmt, room));
			if (owner && strcmp(owner, key) != 0)
				return true;
		}
		/* A ghost put out of a bridged room (a ghost leaving by itself
		 * is an echo, dropped before), whoever did it (a user of another
		 * server its user gave the power to, too: until the thirty-ninth
		 * session the room stayed bound then): the bot forgets it there
		 * (mx_bot.c, ghost_removed). */
		if (ghost && strcmp(key, t->m->bot) != 0 && ms && (strcmp(ms, "leave") == 0 || strcmp(ms, "ban") == 0))
			return json_object_get(t->rooms, room) != NULL;
		/* Someone joining a bridged room by themselves (no invitation:
		 * a room its user made public), whoever: put out unless it is
		 * the room's user (mx_bot.c, joined_uninvited).  A join after a
		 * join is a profile change.  One told without prev_content (it
		 * is optional) is the bot's too, a profile change included: it
		 * puts out only who is not the room's user, decided from the
		 * binding, not from the event, so the room's user is never put
		 * out of her own room by her rename
		 * (test_a_profile_change_told_without_prev_content_is_no_join);
		 * the statement (txn_bot_send) reads it the same way. */
		const char *prev = prev_membership(ev);
		if (!ghost && strcmp(key, t->m->bot) != 0 && ms && strcmp(ms, "join") == 0 && sender &&
		    strcmp(sender, key) == 0 && !(prev && strcmp(prev, "join") == 0) && json_object_get(t->rooms, room))
			return true;
		if (!local)
			return false; /* not one of this homeserver's users */
		/* A user leaving a bridged room (or removed from it): the bot
		 * unbinds it (mx_bot.c, left). */
		if (!ghost && strcmp(key, t->m->bot) != 0 && ms && (strcmp(ms, "leave") == 0 || strcmp(ms, "ban") == 0)) {
			const char *owner = json_string_value(json_object_get(t->mgmt, room));
			return json_object_get(t->rooms, room) != NULL || (owner && strcmp(owner, key) == 0);
		}
		/* Another user invited into a bridged room: the bot adds them
		 * to the group or says why not (mx_bot.c, local_invited). */
		if (!ghost && strcmp(key, t->m->bot) != 0 && ms && strcmp(ms, "invite") == 0 &&
		    json_object_get(t->rooms, room))
			return true;
		if (!ghost && strcmp(key, t->m->bot) != 0 && ms && (strcmp(ms, "invite") == 0 || strcmp(ms, "join") == 0))
			return false; /* no management room's intruder (above) */
		return strcmp(key, t->m->bot) == 0 || (ghost && ms && strcmp(ms, "invite") == 0);
	}
	if (!local)
		return false;
	/* Encryption turned on in a bridged room, or in a management room
	 * (mx_bot.c, encrypted: the bot cannot read the commands there any
	 * more; until the forty-fourth session it stayed, silent). */
	if (strcmp(type, "m.room.encryption") == 0)
		return json_object_get(t->rooms, room) != NULL || json_object_get(t->mgmt, room) != NULL;
	/* A bridged room its user upgraded: the bot gives it up (mx_bot.c,
	 * upgraded). */
	if (strcmp(type, "m.room.tombstone") == 0)
		return (json_object_get(t->rooms, room) != NULL || json_object_get(t->mgmt, room) != NULL) &&
		       json_is_string(json_object_get(ev, "state_key"));
	if (strcmp(type, "m.room.message") == 0) {
		const char *owner = json_string_value(json_object_get(t->mgmt, room));
		return owner && strcmp(owner, sender) == 0;
	}
	return false;
}

/* The bot's share, stored for it in the write's transaction (the
 * statement is sent only when there is one). */
static cw_err txn_bot_send(PGconn *c, struct txn *t, cw_errmsg *e)
{
	if (json_array_size(t->bot_send) == 0)
		return CW_OK;
	char *bot = json_dumps(t->bot_send, JSON_COMPACT);
	if (!bot)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	char ghosts[80];
	snprintf(ghosts, sizeof(ghosts), "@%s", t->app->cfg->mx_user_prefix);
	const char *p2[] = { bot, t->m->bot, mx_server_name(t->app->cfg), ghosts };
	int ok = PQsendQueryParams(c,
		"WITH ins AS (INSERT INTO matrix_bot_inbox (event_id, event) "
		" SELECT x->>'event_id', x FROM jsonb_array_elements($1::jsonb) AS x, "
		"  LATERAL (SELECT " MX_GHOST_SQL("(x->>'state_key')", "$4::text", "$3::text") " AS ghost) g "
		" WHERE (x->>'type' = 'm.room.member' AND NOT g.ghost AND x->>'state_key' <> $2 " /* an intruder, any sender's */
		"   AND x->'content'->>'membership' IN ('invite', 'join') "
		"   AND EXISTS (SELECT 1 FROM matrix_mgmt_rooms mm WHERE mm.room_id = x->>'room_id' "
		"    AND mm.user_id <> x->>'state_key')) "
		"  OR (x->>'type' = 'm.room.member' AND NOT g.ghost AND x->>'state_key' <> $2 " /* a join, anyone's */
		"   AND x->>'sender' = x->>'state_key' AND x->'content'->>'membership' = 'join' "
		"   AND coalesce(x->'unsigned'->'prev_content'->>'membership', '') <> 'join' " /* none: bot_wants */
		"   AND EXISTS (SELECT 1 FROM room_bindings b WHERE b.network = 'matrix' AND b.native_id = x->>'room_id')) "
		"  OR (x->>'type' = 'm.room.member' AND g.ghost " /* a ghost put out, by any sender */
		"   AND x->'content'->>'membership' IN ('leave', 'ban') "
		"   AND EXISTS (SELECT 1 FROM room_bindings b WHERE b.network = 'matrix' AND b.native_id = x->>'room_id')) "
		"  OR (x->>'sender' LIKE '%:' || $3 AND ((x->>'type' = 'm.room.member' AND (x->>'state_key' = $2 "
		"   OR (g.ghost AND x->'content'->>'membership' = 'invite') "
		"   OR (NOT g.ghost AND x->'content'->>'membership' = 'invite' "
		"    AND EXISTS (SELECT 1 FROM room_bindings b WHERE b.network = 'matrix' AND b.native_id = x->>'room_id')) "
		"   OR (NOT g.ghost AND x->'content'->>'membership' IN ('leave', 'ban') "
		"    AND (EXISTS (SELECT 1 FROM room_bindings b WHERE b.network = 'matrix' AND b.native_id = x->>'room_id') "
		"     OR EXISTS (SELECT 1 FROM matrix_mgmt_rooms mm WHERE mm.room_id = x->>'room_id' "
		"      AND mm.user_id = x->>'state_key'))))) "
		"  OR (x->>'type' IN ('m.room.encryption', 'm.room.tombstone') AND EXISTS (SELECT 1 FROM room_bindings b "
		"   WHERE b.network = 'matrix' AND b.native_id = x->>'room_id')) "
		"  OR (x->>'type' IN ('m.room.encryption', 'm.room.tombstone') AND EXISTS (SELECT 1 FROM matrix_mgmt_rooms m "
		"   WHERE m.room_id = x->>'room_id')) "
		"  OR (x->>'type' = 'm.room.message' AND EXISTS (SELECT 1 FROM matrix_mgmt_rooms m "
		"   WHERE m.room_id = x->>'room_id' AND m.user_id = x->>'sender')))) "
		" ON CONFLICT (event_id) DO NOTHING RETURNING 1) "
		"SELECT count(*), CASE WHEN count(*) > 0 THEN pg_notify('causeway_matrix_bot', '') END FROM ins",
		4, NULL, p2, NULL, NULL, 0);
	free(bot);
	return ok ? CW_OK : cw_fail(e, CW_EUNAVAIL, "cannot send: %s", PQerrorMessage(c));
}

/* The events as neutral ones, into the pipeline's items. */
/* What a local user is told where their event event_id was refused (why
 * NULL: not why).  Told once per event (mx_bot_notice): a transaction sent
 * again refuses it again. */
static void refusal(json_t *list, const char *room, const char *event_id, const char *why)
{
	char text[400];
	if (why)
		snprintf(text, sizeof(text), "Not delivered: %s.", why);
	else
		snprintf(text, sizeof(text), "Not delivered.");
	json_array_append_new(list, json_pack("[s, s, s?]", room, text, event_id));
}

/* The key of t->rejoins: a Matrix room and a user. */
#define REJOIN_KEY_MAX (2 * MX_ID_MAX + 2)
static const char *rejoin_key(char out[REJOIN_KEY_MAX], const char *room, const char *user)
{
	snprintf(out, REJOIN_KEY_MAX, "%s %s", room, user);
	return out;
}

/* Whether ev is a join joins_of_invitees found no change.  A leave (or
 * any other membership) of the same member before it in the transaction
 * makes their next join a change again. */
static bool is_rejoin(struct txn *t, json_t *ev)
{
	const char *key = json_string_value(json_object_get(ev, "state_key"));
	const char *sender = json_string_value(json_object_get(ev, "sender"));
	const char *ms = json_string_value(json_object_get(json_object_get(ev, "content"), "membership"));
	if (!key || !ms || strcmp(json_string_value(json_object_get(ev, "type")), "m.room.member") != 0 ||
	    json_object_size(t->rejoins) == 0)
		return false;
	char k[REJOIN_KEY_MAX];
	rejoin_key(k, json_string_value(json_object_get(ev, "room_id")), key);
	if (strcmp(ms, "join") != 0) {
		json_object_del(t->rejoins, k);
		return false;
	}
	return sender && strcmp(sender, key) == 0 && json_object_get(t->rejoins, k) != NULL;
}

/* A member event of a bridged room as the mapping is to read it: when it
 * is the member's own and says nothing of her membership before
 * (unsigned.prev_content is optional: a homeserver gives it only when the
 * client may see the previous content, and an event's unsigned may be
 * stripped on the way), a copy (held by copies) with the membership
 * Causeway knows of put in: the one of her member event before it in this
 * transaction, else what is stored (txn_lookup's 'prior' rows).  Nothing
 * known: the event as it is, and the mapping carries neither a leave
 * (which may be an invitation declined, which the far side must not
 * learn) nor takes a join for a profile change (mx_map.c, from_member;
 * a join already told stays untold: is_rejoin).  Until the fortieth
 * session only prev_content was read: a decline told without it reached
 * the peer as a leave, and a rename as a join.  Every member event of
 * the room is followed, whoever sent it (a kick ends a join). */
static json_t *with_prior(struct txn *t, json_t *ev, json_t *copies)
{
	const char *type = json_string_value(json_object_get(ev, "type"));
	if (!type || strcmp(type, "m.room.member") != 0)
		return ev; /* before the other members' look-ups (joins_of_invitees) */
	const char *key = json_string_value(json_object_get(ev, "state_key"));
	const char *sender = json_string_value(json_object_get(ev, "sender"));
	const char *room = json_string_value(json_object_get(ev, "room_id"));
	const char *ms = json_string_value(json_object_get(json_object_get(ev, "content"), "membership"));
	if (!key || !room || !ms)
		return ev;
	char k[REJOIN_KEY_MAX];
	rejoin_key(k, room, key);
	const char *known = json_string_value(json_object_get(t->prior, k));
	json_t *out = ev;
	/* Also a join after a join of a member Causeway knows invited (a
	 * group's portal): her join, which the homeserver pushed while the
	 * portal was bound to nothing, followed by her client's change of her
	 * name; taken for a profile change, it marked nothing, and the bot's
	 * look at the homeserver (mx_mark_if_joined) found that event stored
	 * and told the peer no join (a test failed under load so, in the
	 * forty-fifth session). */
	if (known && sender && strcmp(sender, key) == 0 &&
	    (!prev_membership(ev) || (join_after_join(ev, ms) && strcmp(known, "invite") == 0))) {
		json_t *copy = json_deep_copy(ev);
		json_t *uns = copy ? json_object_get(copy, "unsigned") : NULL;
		if (copy && !json_is_object(uns) && json_object_set_new(copy, "unsigned", uns = json_object()) != 0)
			uns = NULL;
		if (uns && json_object_set_new(uns, "prev_content", json_pack("{s:s}", "membership", known)) == 0 &&
		    json_array_append(copies, copy) == 0)
			out = copy;
		json_decref(copy);
	}
	json_object_set_new(t->prior, k, json_string(ms)); /* what the next event of hers follows */
	return out;
}

/* Whether a refusal of ev before the pipeline is told to its writer:
 * what a user writes (a message, a sticker, a poll: no state, no reaction,
 * no redaction), as the pipeline's refusals are told of messages and
 * edits only (txn_taken).  Until the thirtieth session any refused event
 * was told, a malformed reaction or member event too. */
static bool told_when_refused(const json_t *ev)
{
	const char *type = json_string_value(json_object_get(ev, "type"));
	return !json_object_get(ev, "state_key") && strcmp(type, "m.reaction") != 0 &&
	       strcmp(type, "m.room.redaction") != 0;
}

/* What the writer of a redaction of an edit is told.  Matrix takes back
 * that edit only (clients show the version before it); a neutral delete
 * names a message or a reaction, and an edit's reference stands for its
 * message (txn_lookup), so until the thirty-ninth session it deleted the
 * whole message at the peer. */
#define EDIT_REDACTED                                                                                            \
	"taking back an edit has no form on the other side, which still shows the message as edited (delete the " \
	"whole message to take it back there)"

/* Whether ev is a redaction of an edit of its room (t->cur_room), stored
 * or of this transaction. */
static bool redacts_an_edit(struct txn *t, json_t *ev)
{
	const char *type = json_string_value(json_object_get(ev, "type"));
	const char *target = type && strcmp(type, "m.room.redaction") == 0 ? mx_redaction_target(ev) : NULL;
	return target && json_object_get(t->edits, target) && lookup_ref_or_user(t, target);
}

/* Whether ev is an edit (m.replace) of a message Causeway never carried:
 * one it has not stored, nor converted in this transaction (the user
 * wrote it before the room was bridged, or it was refused).  It has no
 * neutral form (an edit names the message it edits), and its writer is
 * told (EDIT_UNKNOWN): until the forty-sixth session it was dropped in
 * silence, and she believed the other side had her correction.  (Read
 * while its message's transaction is still being written, which only two
 * transactions in flight at once make, it is told so too: the edit is
 * not carried either way.)  A redaction or a reaction of such a message
 * is no loss: nothing there is to be taken back or reacted to. */
#define EDIT_UNKNOWN                                                                                             \
	"an edit of a message the other side does not have (written before the conversation was bridged, or " \
	"not delivered itself): write it again as a new message"

static bool edits_unknown(struct txn *t, const json_t *ev)
{
	const char *target = mx_edit_target(ev);
	return target && !lookup_ref_or_user(t, target);
}

/* Whether ev is an edit of an edit of its room (stored, or of this
 * transaction).  Matrix forbids it (an m.replace's target must not be an
 * edit itself) and its clients ignore it, showing the message as it was;
 * the lookup lets an edit stand for its message (txn_lookup), so until
 * the fiftieth session it went to the peer as an edit of the message,
 * and the two sides showed different texts.  It is refused as invalid
 * and told to its writer (EDIT_OF_EDIT). */
#define EDIT_OF_EDIT                                                                                              \
	"an edit of an edit, which Matrix does not allow (its clients still show the message as it was): edit " \
	"the message itself"

static bool edits_an_edit(struct txn *t, const json_t *ev)
{
	const char *target = mx_edit_target(ev);
	return target && json_object_get(t->edits, target) && lookup_ref_or_user(t, target);
}

/* An event converted (txn_convert): its Matrix room, its native id (a
 * room event's Matrix id, borrowed from the event or its with_prior copy;
 * an ephemeral one's, in id), its sender's URI and its neutral body (a
 * reference); a room event's neutral message id in id.  Until the
 * sixtieth session each was a JSON array of five strings made by
 * json_pack, some 7 allocations an event and the reading of a format,
 * on the reader, only for txn_convert to read them back. */
struct conv_item {
	const char *room, *event_id, *uri; /* event_id NULL: an ephemeral event, its native id in id */
	json_t *neutral;
	char id[80];
};

struct conv {
	struct conv_item *v;
	size_t n, cap;
};

/* Appends an item, neutral's reference stolen (dropped when there is no
 * memory, or no neutral body, as the array's append of a json_pack that
 * failed dropped it). */
static void conv_add(struct conv *cv, const char *room, const char *event_id, const char *uri, json_t *neutral,
		     const char *id)
{
	if (!neutral)
		return;
	if (cv->n == cv->cap) {
		size_t cap = cv->cap ? 2 * cv->cap : 16;
		struct conv_item *v = realloc(cv->v, cap * sizeof(*v));
		if (!v) {
			json_decref(neutral);
			return;
		}
		cv->v = v;
		cv->cap = cap;
	}
	struct conv_item *it = &cv->v[cv->n++];
	it->room = room;
	it->event_id = event_id;
	it->uri = uri;
	it->neutral = neutral;
	cw_copy_cut(it->id, sizeof(it->id), id);
}

static void conv_free(struct conv *cv)
{
	for (size_t i = 0; i < cv->n; i++)
		json_decref(cv->v[i].neutral);
	free(cv->v);
}

/* One room event of the transaction into conv (as txn_convert says), or
 * counted as ignored or invalid (and its writer told, when that is
 * due). */
static void convert_event(struct txn *t, json_t *ev, struct conv *conv, json_t *copies)
{
	const char *room = json_string_value(json_object_get(ev, "room_id"));
	const char *sender = json_string_value(json_object_get(ev, "sender"));
	const char *uri = lookup_map(t->senders, sender);
	if (json_object_get(t->rooms, room))
		ev = with_prior(t, ev, copies);
	if (!json_object_get(t->rooms, room) || !uri) {
		t->conv_ignored++; /* not a bridged room, or not one of this provider's users */
		return;
	}
	if (is_rejoin(t, ev)) {
		t->conv_ignored++;
		return;
	}
	json_t *neutral = NULL;
	char why[200] = "";
	t->cur_room = json_string_value(json_object_get(t->rooms, room));
	t->cur_sender = sender;
	if (redacts_an_edit(t, ev)) {
		t->conv_invalid++;
		LOG_KV_LIMITED(CW_LOG_INFO, "matrix event refused", "event_id",
			       json_string_value(json_object_get(ev, "event_id")), "detail", "a redaction of an edit");
		refusal(t->refusals, room, json_string_value(json_object_get(ev, "event_id")), EDIT_REDACTED);
		return;
	}
	if (edits_an_edit(t, ev)) {
		t->conv_invalid++;
		LOG_KV_LIMITED(CW_LOG_INFO, "matrix event refused", "event_id",
			       json_string_value(json_object_get(ev, "event_id")), "detail", "an edit of an edit");
		refusal(t->refusals, room, json_string_value(json_object_get(ev, "event_id")), EDIT_OF_EDIT);
		return;
	}
	enum mx_in_result res = mx_to_neutral(ev, lookup_ref_or_user, t, &neutral, why, sizeof(why));
	if (res != MX_IN_OK) {
		if (res == MX_IN_INVALID) {
			t->conv_invalid++;
			LOG_KV_LIMITED(CW_LOG_INFO, "matrix event refused", "event_id",
				       json_string_value(json_object_get(ev, "event_id")), "detail", why);
			if (told_when_refused(ev))
				refusal(t->refusals, room, json_string_value(json_object_get(ev, "event_id")),
					why);
		} else if (edits_unknown(t, ev)) {
			t->conv_ignored++;
			LOG_KV_LIMITED(CW_LOG_INFO, "matrix event refused", "event_id",
				       json_string_value(json_object_get(ev, "event_id")), "detail", why);
			refusal(t->refusals, room, json_string_value(json_object_get(ev, "event_id")), EDIT_UNKNOWN);
		} else {
			t->conv_ignored++;
		}
		json_decref(neutral);
		return;
	}
	json_object_set_new(neutral, "sender", json_string(uri));
	/* Its neutral id now: a later event of this transaction (a
	 * reaction, an edit, a reply, a receipt) may name it. */
	const char *event_id = json_string_value(json_object_get(ev, "event_id"));
	char pid[80];
	cw_new_id(pid, sizeof(pid), "msg_");
	if (!json_object_get(t->map, event_id)) {
		/* An edit stands for the message it edits, as the
		 * lookup has it of stored ones (txn_lookup):
		 * references name first versions. */
		const char *type = json_string_value(json_object_get(neutral, "type"));
		json_t *first = json_object_get(json_object_get(neutral, "content"), "replaces");
		bool is_edit = type && strcmp(type, "edit") == 0 && json_is_string(first);
		json_object_set_new(t->map, event_id, is_edit ? json_copy(first) : json_string(pid));
		json_object_set_new(t->ref_rooms, event_id, json_string(t->cur_room));
		if (is_edit)
			json_object_set_new(t->edits, event_id, json_true());
	}
	conv_add(conv, room, event_id, uri, neutral, pid);
}

/* Whether ev names an event of its transaction not converted yet
 * (pending: Matrix event id -> true). */
static bool names_pending(const json_t *ev, const json_t *pending)
{
	if (json_object_get(ev, "state_key"))
		return false; /* member events go in their order (with_prior follows them) */
	const char *refs[8], *own = json_string_value(json_object_get(ev, "event_id"));
	size_t n = mx_event_refs(ev, refs, 8);
	for (size_t k = 0; k < n; k++)
		if (json_object_get(pending, refs[k]) && !(own && strcmp(own, refs[k]) == 0))
			return true;
	return false;
}

/* The room events in the order they are converted in: each in its place,
 * but one that names an event after it in the transaction (an edit, a
 * reaction, a reply, a redaction) after that event, which the reference
 * then finds converted.  A homeserver sends its stream's order, where
 * the event named comes first (Synapse refuses a client's relation to an
 * event it does not have), but the specification promises no order
 * within a transaction, and a redaction may name an event the server
 * gets later; until the forty-sixth session such an event was taken for
 * one naming an unknown event: an edit, a reaction or a redaction
 * dropped untold, a reply carried without what it answers.  Passes over
 * what is left until one puts nothing after another; what names one
 * another in a circle goes in its order then.  Member events keep their
 * place (nothing of theirs names an event). */
static void convert_events(struct txn *t, struct conv *conv, json_t *copies)
{
	json_t *pending = json_object(), *todo = json_copy(t->events), *ev;
	size_t i;
	if (!pending || !todo) { /* no memory to look ahead: each in its place */
		json_decref(pending);
		json_decref(todo);
		json_array_foreach(t->events, i, ev)
			convert_event(t, ev, conv, copies);
		return;
	}
	json_array_foreach(t->events, i, ev) {
		const char *id = json_string_value(json_object_get(ev, "event_id"));
		if (id)
			json_object_set(pending, id, json_true());
	}
	bool defer = true;
	while (todo && json_array_size(todo) > 0) {
		json_t *later = json_array();
		json_array_foreach(todo, i, ev) {
			if (defer && later && names_pending(ev, pending)) {
				json_array_append(later, ev);
				continue;
			}
			const char *id = json_string_value(json_object_get(ev, "event_id"));
			if (id)
				json_object_del(pending, id);
			convert_event(t, ev, conv, copies);
		}
		defer = json_array_size(later) < json_array_size(todo);
		json_decref(todo);
		todo = later;
	}
	json_decref(todo);
	json_decref(pending);
}

static cw_err txn_convert(struct txn *t, cw_errmsg *e)
{
	t->conv_invalid = t->conv_ignored = 0;
	free(t->item_rooms);
	t->item_rooms = NULL;
	t->n_item_rooms = 0;
	t->ir_text.len = 0;
	json_array_clear(t->refusals);
	size_t n = json_array_size(t->events);
	struct conv conv = { 0 };
	json_t *copies = json_array(); /* with_prior's (conv borrows their ids) */
	size_t i;
	json_t *ev;
	json_array_foreach(t->nul, i, ev) {
		const char *room = json_string_value(json_object_get(ev, "room_id"));
		/* else a NUL in a string or a key (mx_json_load) */
		bool big = mx_json_number_out_of_range(ev), deep = !big && mx_json_too_deep(ev),
		     dup = !big && !deep && mx_json_duplicate_key(ev, true);
		t->conv_invalid++;
		LOG_KV_LIMITED(CW_LOG_INFO, "matrix event refused", "event_id",
			       json_string_value(json_object_get(ev, "event_id")), "detail",
			       big ? "a number past a double's range" : deep ? "nested past 2048 levels"
				     : dup ? "an object holds a key twice" : "a string or a key holds a NUL");
		const char *sender = json_string_value(json_object_get(ev, "sender"));
		if (json_object_get(t->rooms, room) && lookup_map(t->senders, sender) && told_when_refused(ev))
			refusal(t->refusals, room, json_string_value(json_object_get(ev, "event_id")),
				big    ? "it holds a number too large for this gateway to read"
				: deep ? "it is nested deeper than this gateway can read"
				: dup  ? "it holds the same key twice in one object, and which value is meant "
					 "cannot be told"
				       : "it holds the character U+0000 (NUL), which this gateway cannot store");
	}
	convert_events(t, &conv, copies);
	json_object_clear(t->typing); /* this step may run again: from the stored state each time */
	json_array_foreach(t->ephemeral, i, ev) {
		const char *room = json_string_value(json_object_get(ev, "room_id"));
		if (!room || !json_object_get(t->rooms, room))
			continue;
		t->cur_room = json_string_value(json_object_get(t->rooms, room));
		t->cur_sender = NULL; /* ephemeral data names events only */
		json_t *list = mx_ephemeral_to_neutral(ev, lookup_ref_or_user, t);
		bool typing = strcmp(json_string_value(json_object_get(ev, "type")), "m.typing") == 0;
		if (typing) {
			/* m.typing lists who types now: who stopped is who is no
			 * longer in the list. */
			json_t *stopped = mx_typing_diff(t->m, t->typing, room,
							 json_object_get(json_object_get(ev, "content"), "user_ids"));
			size_t s2;
			json_t *who;
			json_array_foreach(stopped, s2, who)
				json_array_append_new(list, json_pack("{s:O, s:{s:s, s:{s:s}}}", "sender_mxid", who,
								      "event", "type", "typing", "content", "state",
								      "stop"));
			json_decref(stopped);
		}
		size_t k;
		json_t *x;
		json_array_foreach(list, k, x) {
			const char *who = json_string_value(json_object_get(x, "sender_mxid"));
			const char *uri = who ? lookup_map(t->senders, who) : NULL;
			json_t *neutral = json_object_get(x, "event");
			if (!uri || !json_is_object(neutral))
				continue;
			neutral = json_deep_copy(neutral);
			json_object_set_new(neutral, "sender", json_string(uri));
			/* No event id: the same content is the same event (a
			 * receipt); typing is the same only within one
			 * transaction (its retry), or a second "start" later
			 * would be lost, and in one room (its content names
			 * none: until the fifty-first session a start in a
			 * second room of the same transaction was taken for
			 * the first's and dropped). */
			char *text = json_dumps(neutral, JSON_COMPACT | JSON_SORT_KEYS);
			unsigned char h[32];
			char hex[65], native[120], scope[2 * MX_ID_MAX + 4] = "";
			if (typing)
				snprintf(scope, sizeof(scope), "%s %s", room, t->txn_id);
			cw_sha256_pair(text ? text : "", text ? strlen(text) : 0, scope, strlen(scope), h);
			free(text);
			cw_hex(hex, h, 16);
			snprintf(native, sizeof(native), "eph:%s", hex);
			conv_add(&conv, room, NULL, uri, neutral, native);
		}
		json_decref(list);
	}
	(void)n;
	size_t total = conv.n;
	cw_err rc = CW_OK;
	t->b = submit_new(total);
	if (!t->b) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	submit_setup(t->b, t->app, SUBMIT_ROOM_BY_NATIVE);
	struct event_limits lim = event_limits_default();
	t->item_rooms = calloc(total ? total : 1, sizeof(*t->item_rooms));
	if (!t->item_rooms) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	for (i = 0; i < total; i++) {
		const struct conv_item *x = &conv.v[i];
		json_t *neutral = x->neutral;
		const char *native = x->event_id ? x->event_id : x->id;
		if (item_room_set(t, i, x->room, json_string_value(json_object_get(neutral, "type")), native)) {
			rc = cw_fail(e, CW_ENOMEM, "out of memory");
			goto out;
		}
		struct event pev;
		struct event_error err;
		cw_err erc = event_from_json(neutral, &lim, 0, &pev, &err);
		if (erc == CW_ENOMEM) {
			rc = cw_fail(e, CW_ENOMEM, "out of memory");
			goto out;
		}
		if (erc) {
			LOG_KV_LIMITED(CW_LOG_INFO, "matrix event not representable", "event_id", native, "detail",
				       err.detail);
			t->conv_invalid++;
			const char *type = json_string_value(json_object_get(neutral, "type"));
			if (type && (strcmp(type, "message") == 0 || strcmp(type, "edit") == 0))
				refusal(t->refusals, x->room, native, err.detail);
			continue;
		}
		bool ok = submit_put_local(t->b, i, t->app, "matrix", x->room, native, x->uri, &pev,
					   x->event_id ? x->id : NULL);
		event_free(&pev);
		if (!ok) {
			rc = cw_fail(e, CW_ENOMEM, "out of memory");
			goto out;
		}
	}
out:
	conv_free(&conv);
	json_decref(copies);
	return rc;
}

static void txn_answer(struct txn *t, struct app_job *j);

/* How long a transaction's read of a member's stored membership waits for
 * another's write of a join of the same member in the same room.  A write
 * takes a group commit; past this (a write held by a lock, say) the read
 * goes ahead, as it did before the twenty-fifth session. */
#define JOIN_WAIT_MS 5000

/* Whether joins (from joins_of_invitees: [room, user, ...] each) is no
 * change is decided on what is stored (rejoins), on a reader, before the
 * write.  Two transactions that carry a join of the same member in the
 * same room, read at the same moment, both found no join stored and both
 * were written: the bot's late look at a join (mx_mark_if_joined, the
 * member event after a rename) and the homeserver's push of the first
 * join, and the peer got the join twice (a test that failed under load
 * showed it: two stored).  So a transaction holds its joins' keys from
 * this read to the end of its write (txn_free), and another's read of the
 * same keys waits for that write.  The keys are taken all at once, so no
 * two transactions wait for each other. */
static void hold_joins(struct txn *t, json_t *joins)
{
	struct matrix *m = t->m;
	if (!t->joining && !(t->joining = json_object()))
		return;
	struct timespec until;
	cw_deadline_ts(&until, CLOCK_REALTIME, (int64_t)JOIN_WAIT_MS * 1000);
	size_t i;
	json_t *x;
	char key[REJOIN_KEY_MAX];
	pthread_mutex_lock(&m->mu);
	for (;;) {
		bool busy = false;
		json_array_foreach(joins, i, x) {
			rejoin_key(key, json_string_value(json_array_get(x, 0)),
				   json_string_value(json_array_get(x, 1)));
			busy = busy || (!json_object_get(t->joining, key) && json_object_get(m->joining, key));
		}
		if (!busy || pthread_cond_timedwait(&m->joining_cond, &m->mu, &until) == ETIMEDOUT)
			break;
	}
	json_array_foreach(joins, i, x) {
		rejoin_key(key, json_string_value(json_array_get(x, 0)), json_string_value(json_array_get(x, 1)));
		/* recorded as the transaction's only once it holds it: release_joins
		 * must never delete a key another transaction holds */
		if (!json_object_get(m->joining, key) && json_object_set_new(m->joining, key, json_true()) == 0 &&
		    json_object_set_new(t->joining, key, json_true()) != 0)
			json_object_del(m->joining, key);
	}
	pthread_mutex_unlock(&m->mu);
}

static void release_joins(struct txn *t)
{
	if (!t->joining)
		return;
	struct matrix *m = t->m;
	const char *key;
	json_t *v;
	pthread_mutex_lock(&m->mu);
	json_object_foreach(t->joining, key, v)
		json_object_del(m->joining, key);
	if (json_object_size(t->joining))
		pthread_cond_broadcast(&m->joining_cond);
	pthread_mutex_unlock(&m->mu);
	json_decref(t->joining);
	t->joining = NULL;
}

/* A local user joining their portal of a group they were invited to
 * (mx_bot.c, local_invited and invitation_row) is the group's member
 * from now on: invited, the peer saw them as invited, not as a member.
 * Marked here, on the reader and before the pipeline reads who is a
 * member, so that the join itself and what they write in the same
 * transaction count as a member's; the homeserver's event is the truth,
 * so a write of the transaction that fails after this leaves them
 * joined, as they are (and its retry marks nothing more).  The mark takes
 * the group room's lock of every write of events, as every other member
 * change does (since the twenty-seventh session; before, it took none,
 * and a group write that had read them invited could commit after it):
 * mx_mark_joined, in a short transaction of its own on this reader, one
 * per member marked.  Not in the write, under the lock the write takes:
 * the pipeline's reading round, here on the reader, reads the member
 * joined, or what they write in the same transaction would be a
 * stranger's.  This job holds no lock of the database here (the reader is
 * in no transaction, and the write comes after), only its joins' keys in
 * this process (hold_joins), which another transaction's read waits for
 * at most JOIN_WAIT_MS. */
static cw_err joins_of_invitees(PGconn *c, struct txn *t, cw_errmsg *e)
{
	json_object_clear(t->rejoins); /* this step may run again: from the stored state each time */
	json_t *joins = json_array();
	size_t i;
	json_t *ev;
	json_array_foreach(t->events, i, ev) {
		/* The type first: until the sixtieth session the five other
		 * members were looked up in every event, a message too, some
		 * 3 % of the reader's samples in a transaction of messages. */
		if (strcmp(json_string_value(json_object_get(ev, "type")), "m.room.member") != 0)
			continue;
		const char *room = json_string_value(json_object_get(ev, "room_id"));
		const char *sender = json_string_value(json_object_get(ev, "sender"));
		const char *key = json_string_value(json_object_get(ev, "state_key"));
		const char *ms = json_string_value(json_object_get(json_object_get(ev, "content"), "membership"));
		if (key && ms && strcmp(ms, "join") == 0 && strcmp(key, sender) == 0 &&
		    json_object_get(t->rooms, room) && json_object_get(t->senders, sender))
			json_array_append_new(joins, json_pack("[s, s, s, s]", room, sender,
							       json_string_value(json_object_get(t->rooms, room)),
							       lookup_map(t->senders, sender)));
	}
	if (json_array_size(joins) == 0) {
		json_decref(joins);
		return CW_OK;
	}
	hold_joins(t, joins);
	char *text = json_dumps(joins, JSON_COMPACT);
	json_decref(joins);
	if (!text)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const char *params[] = { text };
	/* 'i' rows: the invitees to mark (above), their group and identity.
	 * 'r' rows: a join whose member's last membership event stored in the
	 * room is a join is no change: the far side has their join already.
	 * So when the same join reaches the pipeline as two Matrix events: the
	 * bot finds a join late and stores the member event it finds then
	 * (after a change of name, a join after the join, mx_deliver.c), and
	 * the homeserver's transaction brings the first join too.  Each was
	 * carried, and the peer got the join twice (a flaky test showed it).
	 * Decided on what is stored, not on room_members (which this function
	 * marks before the write: a retry after a failed write would find the
	 * member joined and carry their join never).  Two such events are not
	 * read at the same moment (hold_joins). */
	PGresult *r = PQexecParams(c,
		/* the user by her neutral URI (j->>3, as the transaction's
		 * senders have it): one a peer put into a group has no
		 * identity binding (schema/037) */
		"SELECT 'i', x.room_id::text, x.identity_id::text FROM jsonb_array_elements($1::jsonb) AS j, "
		" room_bindings b, identities li, room_members x "
		" WHERE b.network = 'matrix' AND b.native_id = j->>0 AND b.remote_identity_id IS NULL "
		" AND li.id = b.local_identity_id AND li.is_local AND li.uri = j->>3 "
		" AND x.room_id = b.room_id AND x.identity_id = b.local_identity_id AND x.membership = 'invited' "
		"UNION ALL SELECT 'r', j->>0, j->>1 FROM jsonb_array_elements($1::jsonb) AS j "
		"WHERE (SELECT e.content->'content'->>'membership' FROM events e "
		" WHERE e.room_id = (j->>2)::bigint AND e.type = 'membership' "
		" AND e.content->'content'->>'target' = j->>3 ORDER BY e.id DESC LIMIT 1) = 'join'",
		1, NULL, params, NULL, NULL, 0);
	free(text);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e); /* on failure r is cleared */
	if (rc)
		return rc;
	for (int k = 0; k < PQntuples(r) && !rc; k++) {
		char key[REJOIN_KEY_MAX];
		if (PQgetvalue(r, k, 0)[0] == 'i')
			rc = mx_mark_joined(c, PQgetvalue(r, k, 1), PQgetvalue(r, k, 2), e);
		else
			json_object_set_new(t->rejoins, rejoin_key(key, PQgetvalue(r, k, 1), PQgetvalue(r, k, 2)),
					    json_true());
	}
	PQclear(r);
	return rc;
}

/* On a reader, before the write: the lookups, then the mapping of every
 * event (HTML sanitising, validation), which used to run in the write's
 * first round and so on the group-commit writer's thread, the one every
 * write in the daemon waits for.  Synapse sends one transaction at a time,
 * so what was read here is what the write would have read. */
static cw_err txn_prepare(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct txn *t = j->data;
	if (t->b) {
		submit_free(t->b);
		t->b = NULL;
	}
	cw_err rc = txn_lookup(c, t, e);
	if (!rc)
		rc = joins_of_invitees(c, t, e);
	if (rc)
		return rc;
	json_array_clear(t->bot_send);
	size_t i;
	json_t *ev;
	json_array_foreach(t->bot, i, ev)
		if (bot_wants(t, ev))
			json_array_append(t->bot_send, ev);
	if ((rc = txn_convert(t, e)))
		return rc;
	/* The pipeline's reading round too, here: the writer only writes. */
	t->write = false;
	if (submit_count(t->b) > 0 && (rc = submit_prepare(c, t->b, &t->write, e)))
		return rc;
	if (!t->write && json_array_size(t->bot_send) == 0) {
		txn_answer(t, j);
		j->no_write = true;
	}
	/* What was parsed is not needed any more (a prepare that succeeded
	 * never runs again): freed here, not by the writer after its commit. */
	json_decref(t->events);
	json_decref(t->ephemeral);
	json_decref(t->bot);
	json_decref(t->map);
	json_decref(t->ref_rooms);
	json_decref(t->edits);
	json_decref(t->senders);
	json_decref(t->rooms);
	json_decref(t->mgmt);
	json_decref(t->rejoins);
	json_decref(t->prior);
	json_decref(t->nul);
	t->nul = NULL;
	t->prior = NULL;
	t->edits = NULL;
	t->events = t->ephemeral = t->bot = t->map = t->ref_rooms = t->senders = t->rooms = t->mgmt = NULL;
	t->rejoins = NULL;
	t->cur_room = NULL;
	t->cur_sender = NULL;
	return CW_OK;
}

/* The write, one round: the bot's share and the events (submit's round
 * 1; its round 0 ran in txn_prepare). */
static cw_err txn_send(PGconn *c, struct app_job *j, int round, cw_errmsg *e)
{
	struct txn *t = j->data;
	(void)round;
	cw_err rc = txn_bot_send(c, t, e);
	if (!rc && t->write)
		rc = submit_send(c, t->b, 1, e);
	return rc;
}

static cw_err txn_recv(PGconn *c, struct app_job *j, int round, bool *more, cw_errmsg *e)
{
	struct txn *t = j->data;
	cw_err rc;
	(void)round;
	*more = false;
	if (json_array_size(t->bot_send) > 0) {
		PGresult *r;
		if ((rc = store_pipe_result(c, PGRES_TUPLES_OK, &r, e))) /* the bot's inbox */
			return rc;
		PQclear(r);
	}
	if (t->write && (rc = submit_recv(c, t->b, 1, more, e)))
		return rc;
	txn_answer(t, j);
	return CW_OK;
}

/* How many rooms limit_told remembers: past it, the rooms whose wait is
 * over are forgotten, and if none is, all of them (a few notices more,
 * never more memory). */
#define MX_LIMIT_TOLD_MAX 10000

/* Whether a notice of a rate limit (the user's own outbound limit: which,
 * and when to write again) is to be told in room now: not while the wait
 * the last one there named (retry_ms from it) is not over, so that a user
 * who floods a room gets one notice, not one homeserver request per
 * refused message (since the twenty-sixth session).  In this process's
 * memory: another process, or a restart, tells it once more. */
static bool limit_notice_due(struct matrix *m, const char *room, int64_t retry_ms)
{
	int64_t now = cw_wall_ms();
	pthread_mutex_lock(&m->mu);
	json_t *until = json_object_get(m->limit_told, room);
	bool due = !until || json_integer_value(until) <= now;
	if (due && retry_ms > 0) {
		if (!until && json_object_size(m->limit_told) >= MX_LIMIT_TOLD_MAX) {
			const char *k;
			json_t *v;
			void *tmp;
			json_object_foreach_safe(m->limit_told, tmp, k, v)
				if (json_integer_value(v) <= now)
					json_object_del(m->limit_told, k);
			if (json_object_size(m->limit_told) >= MX_LIMIT_TOLD_MAX)
				json_object_clear(m->limit_told);
		}
		json_object_set_new(m->limit_told, room, json_integer(now + retry_ms));
	}
	pthread_mutex_unlock(&m->mu);
	return due;
}

/* What the homeserver hears once the events are durable (or when there
 * was nothing to store): 200 and an empty object; refusals only logged. */
static void txn_answer(struct txn *t, struct app_job *j)
{
	for (size_t i = 0; i < submit_count(t->b); i++) {
		const char *code, *detail;
		int st = submit_result(t->b, i, &code, &detail);
		if (st && st != 202)
			LOG_KV_LIMITED(CW_LOG_INFO, "matrix event not taken", "code", code ? code : "", "detail",
				       detail ? detail : "");
	}
	j->status = 200;
	j->body = json_object();
}

/* Once the transaction is durable (the job succeeded: after the commit; the
 * answer above is made before it), or at once when it has nothing to store:
 * a repeat is answered at once from now on, and its typing lists are the
 * rooms' lists; counted in the metrics.  Remembered any earlier, a
 * commit that failed would have the homeserver's retry answered 200 with
 * nothing stored. */
static void txn_taken(struct txn *t)
{
	mx_txn_remember(t->m, t->key);
	mx_typing_keep(t->m, t->typing);
	unsigned long long n[4] = { 0, 0, t->invalid + t->conv_invalid, t->ignored + t->conv_ignored };
	/* The user hears of a message of theirs that goes nowhere: refused
	 * here, or by the policy for every recipient (then stored as
	 * dropped), rather than believe it sent.  Messages and edits only
	 * (and before the pipeline what a user writes: txn_convert,
	 * told_when_refused): typing and receipts are not worth a notice; and
	 * a delete of another's message, which Matrix let them redact in
	 * their room but the peer keeps.  In a Matrix user's words, not the
	 * neutral API's. */
	for (size_t i = 0; t->b && i < submit_count(t->b); i++) {
		const char *code, *detail;
		int st = submit_result(t->b, i, &code, &detail);
		const char *denied = submit_denied(t->b, i);
		if (st == 202)
			n[MX_EV_ACCEPTED]++;
		else if (st)
			n[MX_EV_REFUSED]++;
		const char *room, *type, *event_id;
		item_room_get(t, i, &room, &type, &event_id);
		bool others = st == 400 && detail && strcmp(detail, SUBMIT_WHY_NOT_SENDERS) == 0;
		if (!room || !type ||
		    (strcmp(type, "message") != 0 && strcmp(type, "edit") != 0 &&
		     (strcmp(type, "delete") != 0 || !others)))
			continue;
		if (denied)
			refusal(t->refusals, room, event_id, submit_denied_text(t->b, i));
		else if (st == 429) {
			/* The pipeline's words: which limit, and the wait
			 * (peer_api.c); once until the wait is over. */
			if (limit_notice_due(t->m, room, submit_retry_after_ms(t->b, i)))
				refusal(t->refusals, room, event_id,
					detail && *detail ? detail : "too many messages; write again in a moment");
		} else if (others)
			refusal(t->refusals, room, event_id,
				strcmp(type, "delete") == 0 ? "you can delete only your own messages on the other side"
							    : "you can edit only your own messages");
		else if (st && st != 202)
			refusal(t->refusals, room, event_id, detail);
	}
	size_t r;
	json_t *x;
	json_array_foreach(t->refusals, r, x)
		mx_bot_notice(t->m, json_string_value(json_array_get(x, 0)), json_string_value(json_array_get(x, 1)),
			      json_string_value(json_array_get(x, 2)));
	if (!t->wait) /* a backfill is no transaction of the homeserver's */
		atomic_fetch_add(&t->m->txns, 1);
	for (int k = 0; k < 4; k++)
		atomic_fetch_add(&t->m->events[k], n[k]);
}

static void txn_after(struct app_job *j)
{
	txn_taken(j->data);
}

void matrix_metrics(struct matrix *m, struct cw_buf *b)
{
	char ping[16];
	pthread_mutex_lock(&m->mu);
	snprintf(ping, sizeof(ping), "%s", m->ping_state);
	pthread_mutex_unlock(&m->mu);
	static const char *const states[] = { "pending", "ok", "failed", "unsupported" };
	cw_buf_printf(b, "# HELP causeway_matrix_ping The start-up ping of the homeserver (1: its state now).\n"
			 "# TYPE causeway_matrix_ping gauge\n");
	for (int i = 0; i < 4; i++)
		cw_buf_printf(b, "causeway_matrix_ping{state=\"%s\"} %d\n", states[i], strcmp(ping, states[i]) == 0);
	cw_buf_printf(b, "# HELP causeway_matrix_token_refused 1 while the homeserver refuses the as_token (401 "
			 "M_UNKNOWN_TOKEN): Matrix delivery waits.\n"
			 "# TYPE causeway_matrix_token_refused gauge\n"
			 "causeway_matrix_token_refused %d\n",
		      atomic_load(&m->token_refused) ? 1 : 0);
	cw_buf_printf(b, "# HELP causeway_matrix_transactions_total Homeserver transactions answered: once durable "
			 "(taken), or again from memory (repeat).\n"
			 "# TYPE causeway_matrix_transactions_total counter\n"
			 "causeway_matrix_transactions_total{result=\"taken\"} %llu\n"
			 "causeway_matrix_transactions_total{result=\"repeat\"} %llu\n",
		      (unsigned long long)atomic_load(&m->txns), (unsigned long long)atomic_load(&m->txn_repeats));
	static const char *const results[] = { "accepted", "refused", "invalid", "ignored" };
	cw_buf_printf(b, "# HELP causeway_matrix_events_total Events of taken transactions (and of history read back "
			 "while a ghost joined): accepted (stored, now or before), "
			 "refused by the pipeline (policy, limits, unknown room), invalid, or ignored (not bridged, echoes).\n"
			 "# TYPE causeway_matrix_events_total counter\n");
	for (int k = 0; k < 4; k++)
		cw_buf_printf(b, "causeway_matrix_events_total{result=\"%s\"} %llu\n", results[k],
			      (unsigned long long)atomic_load(&m->events[k]));
}

static const struct app_pipe_ops txn_ops = { txn_send, txn_recv, NULL }; /* local senders: no user locks */

/* Whether the event is one of the gateway's own (a ghost's or the bot's). */
static bool own_echo(struct cw_app *app, const char *sender)
{
	char net[64], local[MX_ID_MAX + 1];
	return strcmp(sender, app->matrix->bot) == 0 ||
	       mx_ghost_parse(app->cfg->mx_user_prefix, mx_server_name(app->cfg), sender, net, sizeof(net), local,
			      sizeof(local));
}

/* Events (and ephemeral data) of a transaction, checked one by one: one
 * bad event never drops the others. NULL: out of memory. */
static struct txn *txn_new(struct cw_app *app, const char *txn_id, const unsigned char key[32], json_t *events,
			   json_t *eph)
{
	struct txn *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->app = app;
	t->m = app->matrix;
	snprintf(t->txn_id, sizeof(t->txn_id), "%s", txn_id);
	memcpy(t->key, key, sizeof(t->key));
	t->events = json_array();
	t->bot = json_array();
	t->ephemeral = json_array();
	t->map = json_object();
	t->ref_rooms = json_object();
	t->edits = json_object();
	t->rooms = json_object();
	t->senders = json_object();
	t->mgmt = json_object();
	t->rejoins = json_object();
	t->prior = json_object();
	t->bot_send = json_array();
	t->typing = json_object();
	cw_buf_init(&t->ir_text, SIZE_MAX / 2);
	t->refusals = json_array();
	t->nul = json_array();
	size_t i;
	json_t *ev;
	json_array_foreach(events, i, ev) {
		const char *id = json_string_value(json_object_get(ev, "event_id"));
		const char *room = json_string_value(json_object_get(ev, "room_id"));
		const char *sender = json_string_value(json_object_get(ev, "sender"));
		const char *type = json_string_value(json_object_get(ev, "type"));
		json_t *ts = json_object_get(ev, "origin_server_ts");
		if (!json_is_object(ev) || !id || !mx_event_id_valid(id) || !room || !mx_room_id_valid(room) || !sender ||
		    !mx_user_id_parse(sender, NULL, 0, NULL, 0) || !type || !json_is_integer(ts) ||
		    json_integer_value(ts) <= 0 || json_integer_value(ts) >= EVENT_TS_LIMIT ||
		    !json_is_object(json_object_get(ev, "content")) || mx_json_has_nul(json_object_get(ev, "event_id")) ||
		    mx_json_has_nul(json_object_get(ev, "room_id")) || mx_json_has_nul(json_object_get(ev, "sender")) ||
		    mx_json_has_nul(json_object_get(ev, "type")) || mx_json_has_nul(json_object_get(ev, "state_key"))) {
			t->invalid++;
			continue;
		}
		if (own_echo(app, sender)) {
			t->ignored++;
			continue;
		}
		/* A NUL elsewhere (the content: Synapse takes and sends it; in a
		 * key too), or a number past a double's range (mx_json_load):
		 * PostgreSQL stores no NUL, in jsonb or text, so the event is
		 * refused here, on its own, its writer told (txn_convert);
		 * nothing of it reaches a statement. */
		if (mx_json_has_nul(ev)) {
			json_array_append(t->nul, ev);
			continue;
		}
		if (strcmp(type, "m.room.member") == 0 || strcmp(type, "m.room.message") == 0 ||
		    strcmp(type, "m.room.encryption") == 0 || strcmp(type, "m.room.tombstone") == 0)
			json_array_append(t->bot, ev);
		json_array_append(t->events, ev);
	}
	json_array_foreach(eph, i, ev) {
		const char *type = json_string_value(json_object_get(ev, "type"));
		const char *room = json_string_value(json_object_get(ev, "room_id"));
		if (!json_is_object(ev) || !type || !room || !mx_room_id_valid(room) ||
		    !json_is_object(json_object_get(ev, "content")) || mx_json_has_nul(ev) ||
		    (strcmp(type, "m.typing") != 0 && strcmp(type, "m.receipt") != 0)) {
			t->ignored++;
			continue;
		}
		json_array_append(t->ephemeral, ev);
	}
	return t;
}

/* Nothing to store (the gateway's own echoes, the usual content of a
 * transaction while it delivers to Matrix, or events it does not read):
 * no trip to the database. */
static bool txn_empty(const struct txn *t)
{
	return json_array_size(t->events) == 0 && json_array_size(t->ephemeral) == 0 && json_array_size(t->nul) == 0;
}

/* ------------------------------------------------------------ catching up */

/* Whether t has events of a room being caught up with (under mu). */
static bool txn_waits(struct matrix *m, const struct txn *t)
{
	if (json_object_size(m->catching_up) == 0)
		return false;
	json_t *lists[] = { t->events, t->ephemeral };
	for (int k = 0; k < 2; k++) {
		size_t i;
		json_t *ev;
		json_array_foreach(lists[k], i, ev) {
			const char *room = json_string_value(json_object_get(ev, "room_id"));
			if (room && json_object_get(m->catching_up, room))
				return true;
		}
	}
	return false;
}

/* Parks j (its request suspended) when its transaction waits; false: it
 * does not, start it. */
static bool txn_park(struct matrix *m, struct app_job *j)
{
	struct txn *t = j->data;
	pthread_mutex_lock(&m->mu);
	bool wait = !m->parking_closed && txn_waits(m, t);
	if (wait) {
		cw_req_suspend(j->req);
		struct app_job **p = &m->parked;
		while (*p)
			p = &((struct txn *)(*p)->data)->parked_next;
		*p = j;
	}
	pthread_mutex_unlock(&m->mu);
	if (wait)
		LOG_KV(CW_LOG_DEBUG, "a transaction waits for a ghost's join", "txn", t->txn_id);
	return wait;
}

/* Takes out of the parked list the jobs that wait no more (all: every);
 * under mu. */
static struct app_job *unpark(struct matrix *m, bool every)
{
	struct app_job *go = NULL, **tail = &go;
	for (struct app_job **p = &m->parked; *p;) {
		struct txn *t = (*p)->data;
		if (!every && txn_waits(m, t)) {
			p = &t->parked_next;
			continue;
		}
		struct app_job *j = *p;
		*p = t->parked_next;
		t->parked_next = NULL;
		*tail = j;
		tail = &t->parked_next;
	}
	return go;
}

static void start_parked(struct app_job *j)
{
	while (j) {
		struct app_job *next = ((struct txn *)j->data)->parked_next;
		app_job_start_prepared_pipe(j, txn_prepare, &txn_ops);
		j = next;
	}
}

void mx_catch_up(struct matrix *m, const char *room, bool begin)
{
	struct app_job *go = NULL;
	pthread_mutex_lock(&m->mu);
	json_int_t n = json_integer_value(json_object_get(m->catching_up, room)) + (begin ? 1 : -1);
	if (n > 0)
		json_object_set_new(m->catching_up, room, json_integer(n));
	else
		json_object_del(m->catching_up, room);
	if (!begin)
		go = unpark(m, false);
	pthread_mutex_unlock(&m->mu);
	start_parked(go);
}

void matrix_stop_parking(struct matrix *m)
{
	if (!m)
		return;
	pthread_mutex_lock(&m->mu);
	m->parking_closed = true;
	struct app_job *go = unpark(m, true);
	pthread_mutex_unlock(&m->mu);
	start_parked(go);
}

const char *const matrix_transaction_routes[] = { "/_matrix/app/v1/transactions/{txn}", "/transactions/{txn}", NULL };

void matrix_as_transaction(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	const char *txn_id = cw_req_param(req, "txn");
	size_t len;
	const char *body = cw_req_body(req, &len);
	json_error_t jerr;
	/* An event holding what jansson reads only when asked or put right
	 * (a NUL, in a key too, a number past 64 bits or a double's range:
	 * mx_json_load) is that event's trouble (txn_new), not the
	 * transaction's: the homeserver sends a refused transaction again for
	 * ever, and every later one waits behind it. */
	json_t *doc = mx_json_load(body, len, JSON_REJECT_DUPLICATES, &jerr);
	/* A key twice in an event is that event's trouble (txn_new); twice
	 * in the transaction's own object (which "events"?), the body's. */
	if (!json_is_object(doc) || mx_json_duplicate_key(doc, false)) {
		json_decref(doc);
		mx_error(req, 400, "M_NOT_JSON", "the body must be a JSON object");
		return;
	}
	json_t *events = json_object_get(doc, "events");
	json_t *eph = json_object_get(doc, "ephemeral");
	if (!eph)
		eph = json_object_get(doc, "de.sorunome.msc2409.ephemeral");
	if (!json_is_array(events) || (eph && !json_is_array(eph))) {
		json_decref(doc);
		mx_error(req, 400, "M_BAD_JSON", "events (and ephemeral) must be arrays");
		return;
	}
	/* The fast path: this very transaction was answered before.  The key
	 * covers the body too: a homeserver whose database was reset starts
	 * its txnIds again, with other events.  The body's bytes as sent: a
	 * retry that serialises the same events otherwise only misses this
	 * path, and the events' own ids keep it a no-op in the store. */
	unsigned char key[32];
	if (!cw_sha256_pair(txn_id, strlen(txn_id), body, len, key)) {
		json_decref(doc);
		mx_error(req, 503, "M_UNKNOWN", "out of memory");
		return;
	}
	if (mx_txn_seen(app->matrix, key)) {
		atomic_fetch_add(&app->matrix->txn_repeats, 1);
		json_decref(doc);
		cw_req_reply_json(req, 200, json_object());
		return;
	}
	struct txn *t = txn_new(app, txn_id, key, events, eph);
	json_decref(doc);
	if (!t) {
		mx_error(req, 503, "M_UNKNOWN", "out of memory");
		return;
	}
	if (txn_empty(t)) {
		txn_taken(t);
		txn_free(t);
		cw_req_reply_json(req, 200, json_object());
		return;
	}
	struct app_job *j = app_job_new(app, req, NULL);
	if (!j) {
		txn_free(t);
		mx_error(req, 503, "M_UNKNOWN", "out of memory");
		return;
	}
	j->data = t;
	j->data_free = txn_free;
	j->after = txn_after;
	j->matrix_errors = true;
	if (!txn_park(app->matrix, j))
		app_job_start_prepared_pipe(j, txn_prepare, &txn_ops);
}

/* Events the homeserver never pushed (mx_bot.c: what a user wrote while a
 * ghost was joining), fetched by the bot: taken as a transaction of their
 * own would be (an event stored before is a no-op).  The waiter and the
 * job share the struct; the last one out frees it. */
struct backfill_wait {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int refs;
	bool done;
	cw_err rc;
};

static void backfill_release(struct backfill_wait *w)
{
	pthread_mutex_lock(&w->mu);
	bool last = --w->refs == 0;
	pthread_mutex_unlock(&w->mu);
	if (last) {
		pthread_cond_destroy(&w->cv);
		pthread_mutex_destroy(&w->mu);
		free(w);
	}
}

static void backfill_finished(struct app_job *j, cw_err rc)
{
	struct txn *t = j->data;
	struct backfill_wait *w = t->wait;
	pthread_mutex_lock(&w->mu);
	w->done = true;
	w->rc = rc;
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
	backfill_release(w);
}

cw_err mx_backfill(struct matrix *m, json_t *events, int timeout_ms, cw_errmsg *e)
{
	char *doc = json_dumps(events, JSON_COMPACT | JSON_SORT_KEYS);
	unsigned char key[32];
	bool keyed = doc && cw_sha256_pair("backfill", 8, doc, strlen(doc), key);
	free(doc);
	struct txn *t = keyed ? txn_new(m->app, "backfill", key, events, NULL) : NULL;
	if (t && txn_empty(t)) {
		txn_free(t);
		return CW_OK;
	}
	struct backfill_wait *w = t ? calloc(1, sizeof(*w)) : NULL;
	struct app_job *j = w ? app_job_new(m->app, NULL, NULL) : NULL;
	if (!j) {
		free(w);
		if (t)
			txn_free(t);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
	w->refs = 2;
	t->wait = w;
	j->data = t;
	j->data_free = txn_free;
	j->after = txn_after;
	j->finished = backfill_finished;
	app_job_start_prepared_pipe(j, txn_prepare, &txn_ops);
	struct timespec until;
	cw_deadline_ts(&until, CLOCK_REALTIME, (int64_t)timeout_ms * 1000);
	pthread_mutex_lock(&w->mu);
	while (!w->done && pthread_cond_timedwait(&w->cv, &w->mu, &until) == 0)
		;
	cw_err rc = w->done ? w->rc : CW_ETIMEDOUT;
	pthread_mutex_unlock(&w->mu);
	backfill_release(w);
	return rc ? cw_fail(e, rc, "the fetched events were not stored: %s", cw_strerror(rc)) : CW_OK;
}

/* ------------------------------------------------------------ typing */

json_t *mx_typing_before(struct matrix *m, const char *room)
{
	pthread_mutex_lock(&m->mu);
	json_t *v = room ? json_object_get(m->typing, room) : NULL;
	json_t *copy = json_is_array(v) ? json_copy(v) : json_array();
	pthread_mutex_unlock(&m->mu);
	return copy;
}

json_t *mx_typing_diff(struct matrix *m, json_t *seen, const char *room, json_t *now)
{
	json_t *stopped = json_array();
	json_t *before = json_object_get(seen, room);
	json_t *stored = before ? NULL : mx_typing_before(m, room);
	size_t i, k;
	json_t *a, *b;
	json_array_foreach(before ? before : stored, i, a) {
		bool still = false;
		json_array_foreach(now, k, b)
			still |= json_equal(a, b);
		if (!still)
			json_array_append(stopped, a);
	}
	json_decref(stored);
	json_t *list = json_array();
	json_array_foreach(now, k, b)
		if (json_is_string(b))
			json_array_append(list, b);
	json_object_set_new(seen, room, list);
	return stopped;
}

void mx_typing_keep(struct matrix *m, json_t *seen)
{
	const char *room;
	json_t *list;
	pthread_mutex_lock(&m->mu);
	json_object_foreach(seen, room, list) {
		if (json_array_size(list))
			json_object_set(m->typing, room, list);
		else
			json_object_del(m->typing, room);
	}
	if (json_object_size(m->typing) > 10000) /* bounded: forget the oldest knowledge wholesale */
		json_object_clear(m->typing);
	pthread_mutex_unlock(&m->mu);
}

/* ------------------------------------------------------------ recent transactions */

bool mx_txn_seen(struct matrix *m, const unsigned char key[32])
{
	pthread_mutex_lock(&m->mu);
	bool seen = false;
	for (int i = 0; i < TXN_RECENT_MAX && !seen; i++)
		seen = memcmp(m->recent[i], key, 32) == 0 && m->recent_used[i];
	pthread_mutex_unlock(&m->mu);
	return seen;
}

void mx_txn_remember(struct matrix *m, const unsigned char key[32])
{
	pthread_mutex_lock(&m->mu);
	memcpy(m->recent[m->recent_next], key, 32);
	m->recent_used[m->recent_next] = true;
	m->recent_next = (m->recent_next + 1) % TXN_RECENT_MAX;
	pthread_mutex_unlock(&m->mu);
}
