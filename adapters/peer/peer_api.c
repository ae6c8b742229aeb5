/* The neutral interop API: directory, signatures, rooms, messages. */
#include "config.h"
#include "peer_api.h"
#include "policy_live.h"
#include "pipeline.h"
#include "event.h"
#include "httpsig.h"
#include "buf.h"
#include "log.h"
#include "matrix/matrix.h"
#include "utf8.h"
#include "ratelimit.h"
#include "fnv.h"

#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define ROOM_NAME_MAX 255 /* bytes of a group's name */

/* ------------------------------------------------------------ signatures */

bool peer_base_url(struct cw_app *app, char *out, size_t len)
{
	size_t n = cfg_public_url_len(app->cfg);
	if (n) /* at most CFG_PUBLIC_URL_MAX bytes; a buffer too small is refused, never cut */
		return (size_t)snprintf(out, len, "%.*s", (int)n, app->cfg->public_url) < len;
	/* The port configured, or (port 0: any) the one bound, once bound. */
	unsigned port = app->cfg->port ? (unsigned)app->cfg->port : app->http ? cw_http_port(app->http) : 0;
	if (!port)
		return false;
	cw_http_local_url(app->cfg->listen_address, port, out, len);
	return true;
}

/* Never from the request's Host header: a signature over @target-uri binds
 * the authority the peer meant to call (RFC 9421), and a URI rebuilt from
 * the Host the request carries would match whatever authority it was
 * signed for, another provider's gateway included (until the thirtieth
 * session it did, when server.public_url was empty). */
bool peer_target_uri(struct cw_app *app, struct cw_req *req, char *buf, size_t len)
{
	char base[CFG_PUBLIC_URL_MAX + 1];
	if (!peer_base_url(app, base, sizeof(base)))
		base[0] = '\0'; /* not listening yet: no request to verify */
	int n = snprintf(buf, len, "%s%s", base, cw_req_raw_target(req));
	return n >= 0 && (size_t)n < len;
}

/* A covered field as RFC 9421 §2.1 covers it: all its lines, trimmed and
 * joined with ", " in order (until the thirty-second session the first
 * line alone: a signer who joined them was refused, and a second line
 * rode along uncovered).  A field present whose lines could not be
 * joined (out of memory) is a DEL, which the verifier refuses, never
 * "absent". */
static const char *req_header(void *ctx, const char *name)
{
	const char *v = cw_req_header_all(ctx, name);
	return v ? v : cw_req_header(ctx, name) ? "\x7f" : NULL;
}

struct header_scan {
	const char *repeated; /* the first single-valued field seen twice */
	const char *bad;      /* why a line is refused */
	unsigned n[2];        /* lines of single_fields[i] */
};

/* The fields that hold one value (RFC 9110 §8.3; an Idempotency-Key is
 * one string): the handlers read one line, so a second is refused rather
 * than joined. */
static const char *const single_fields[] = { "Content-Type", "Idempotency-Key" };

static bool is_tchar(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       (c && strchr("!#$%&'*+-.^_`|~", c));
}

static bool scan_line(void *arg, const char *name, size_t name_len, const char *value, size_t value_len)
{
	(void)value;
	(void)value_len;
	struct header_scan *h = arg;
	if (!name_len) {
		h->bad = "a header line has no name";
		return false;
	}
	for (size_t i = 0; i < name_len; i++)
		if (!is_tchar((unsigned char)name[i])) {
			/* libmicrohttpd 0.9.75 glues an obs-fold continuation
			 * onto the name: this is most often one. */
			h->bad = "a header's name is not a token (a folded line? RFC 9112 §5.2 forbids folding)";
			return false;
		}
	for (size_t i = 0; i < CW_ARRAY_LEN(single_fields); i++)
		if (strlen(single_fields[i]) == name_len && strncasecmp(name, single_fields[i], name_len) == 0 &&
		    ++h->n[i] == 2) {
			h->repeated = single_fields[i];
			return false;
		}
	return true;
}

bool peer_headers_ok(struct cw_req *req)
{
	struct header_scan h = { 0 };
	cw_req_headers_each(req, scan_line, &h);
	if (h.repeated) {
		char detail[96];
		snprintf(detail, sizeof(detail), "the %s header is sent more than once (it holds one value)", h.repeated);
		cw_req_problem(req, 400, "invalid_header", "Invalid header", detail);
		return false;
	}
	if (h.bad) {
		cw_req_problem(req, 400, "invalid_header", "Invalid header", h.bad);
		return false;
	}
	return true;
}

struct key_ctx {
	struct peer_principal *p;
};

static EVP_PKEY *key_for(void *ctx, const char *keyid)
{
	struct key_ctx *k = ctx;
	return keyid && strcmp(keyid, k->p->name) == 0 ? k->p->key : NULL;
}

bool peer_verify_request(struct cw_app *app, struct cw_req *req, struct peer_principal *p)
{
	/* As long as the signature parser takes, and never cut: until the
	 * thirty-first session the URI was cut at 4095 bytes, and what a
	 * request carried past that was not covered by its signature. */
	char uri[HTTPSIG_MAX_FIELD + 1];
	if (!peer_target_uri(app, req, uri, sizeof(uri))) {
		char detail[96];
		snprintf(detail, sizeof(detail), "the request's absolute URI is longer than %d bytes", HTTPSIG_MAX_FIELD);
		cw_req_problem(req, 414, "uri_too_long", "URI Too Long", detail);
		return false;
	}
	struct httpsig_msg m = { .method = cw_req_method(req), .target_uri = uri, .header = req_header, .ctx = req };
	size_t blen;
	const char *body = cw_req_body(req, &blen);
	static const char *const with_body[] = PEER_SIG_COMPONENTS_WITH_BODY;
	static const char *const without_body[] = { "@method", "@target-uri", NULL };
	static const char *const if_present[] = { "idempotency-key", "content-type", "content-digest", NULL };
	struct key_ctx kc = { p };
	struct httpsig_verify_opts o = {
		.required = blen ? with_body : without_body,
		.required_if_present = if_present,
		.require_created = true, .require_keyid = true, .require_nonce = true, .require_tag = true,
		.tag = app->cfg->signature_tag,
		.now = cw_wall_ms() / 1000,
		.max_skew_s = app->cfg->max_clock_skew_s,
		.key_for = key_for, .key_ctx = &kc,
		.check_content_digest = blen > 0 || req_header(req, "content-digest") != NULL,
		.body = body, .body_len = blen,
	};
	struct httpsig_result res;
	cw_errmsg e = { { 0 } };
	/* Dictionaries, whose lines RFC 8941 §4.2 joins: one signature a line is fine. */
	cw_err rc = httpsig_verify(&m, req_header(req, "signature-input"), req_header(req, "signature"), &o, &res, &e);
	if (rc == CW_OK) {
		/* Every nonce of the peer's signatures is spent, not only the
		 * one verified's (httpsig_result.nonces). */
		for (size_t i = 0; rc == CW_OK && i < res.nnonces; i++)
			rc = httpsig_replay_check_and_add(app->replay, res.keyid, res.nonces[i], res.nonces_created[i],
							  o.now);
		snprintf(p->nonce, sizeof(p->nonce), "%s", res.nonce);
		p->created = res.created;
		p->n_other_nonces = 0;
		for (size_t i = 1; i < res.nnonces && p->n_other_nonces < CW_ARRAY_LEN(p->other_nonces); i++) {
			p->other_created[p->n_other_nonces] = res.nonces_created[i];
			snprintf(p->other_nonces[p->n_other_nonces++], sizeof(p->other_nonces[0]), "%s", res.nonces[i]);
		}
		if (rc == CW_ECONFLICT)
			cw_fail(&e, rc, "%s", PEER_NONCE_REPLAYED);
		else if (rc)
			cw_fail(&e, rc, "the signature's nonce or time is not acceptable");
	}
	if (rc) {
		LOG_KV_LIMITED(CW_LOG_INFO, "peer request signature refused", "peer", p->name, "detail", e.msg);
		cw_req_add_header(req, "WWW-Authenticate", "Bearer");
		cw_req_problem(req, 401, "bad_signature", "Bad signature", e.msg);
		return false;
	}
	return true;
}

/* ------------------------------------------------------------ helpers */

bool peer_api_enabled(struct cw_app *app, struct cw_req *req)
{
	if (app->cfg->domain && *app->cfg->domain)
		return true;
	cw_req_problem(req, 503, "unavailable", "Not configured", "the operator has not set server.domain");
	return false;
}

static void event_problem(struct cw_req *req, const struct event_error *err)
{
	if (strcmp(err->code, EVENT_ERR_TOO_LARGE) != 0 && strcmp(err->code, EVENT_ERR_INVALID) != 0) {
		cw_req_no_memory(req);
		return;
	}
	int status = strcmp(err->code, EVENT_ERR_TOO_LARGE) == 0 ? 413 : 400;
	char detail[420];
	if (err->pointer[0])
		snprintf(detail, sizeof(detail), "%s (at %s)", err->detail, err->pointer);
	else
		snprintf(detail, sizeof(detail), "%s", err->detail);
	cw_req_problem(req, status, err->code, status == 413 ? "Too large" : "Invalid body", detail);
}

static PGresult *exec(PGconn *c, const char *sql, int n, const char *const *params)
{
	return PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0);
}


/* Idempotency: a stored answer for (scope, key) is replayed when the request
 * is the same and refused when it differs.  Returns true when j is answered. */
static bool idem_replay(PGconn *c, struct app_job *j, const char *scope, const char *key,
			const unsigned char hash[32], const unsigned char hash_old[32], cw_err *rc, cw_errmsg *e)
{
	*rc = CW_OK;
	if (!key)
		return false;
	const char *params[] = { scope, key };
	PGresult *r = exec(c, "SELECT encode(request_hash, 'hex'), response_status, response::text "
			      "FROM idempotency_keys WHERE scope = $1 AND key = $2", 2, params);
	if ((*rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return true;
	if (PQntuples(r) == 0) {
		PQclear(r);
		return false;
	}
	char hex[65], hex_old[65];
	cw_hex(hex, hash, 32);
	cw_hex(hex_old, hash_old, 32);
	if (strcmp(hex, PQgetvalue(r, 0, 0)) != 0 && strcmp(hex_old, PQgetvalue(r, 0, 0)) != 0) {
		app_job_fail(j, 409, "conflict", "this Idempotency-Key was used with a different request");
	} else {
		j->status = atoi(PQgetvalue(r, 0, 1));
		j->body = json_loads(PQgetvalue(r, 0, 2), 0, NULL);
	}
	PQclear(r);
	return true;
}

static cw_err idem_store(PGconn *c, const char *scope, const char *key, const unsigned char hash[32],
			 const char *event_id, const char *room_id, int status, json_t *response, cw_errmsg *e)
{
	if (!key)
		return CW_OK;
	char hex[65], st[8];
	cw_hex(hex, hash, 32);
	snprintf(st, sizeof(st), "%d", status);
	char *resp = json_dumps(response, JSON_COMPACT);
	const char *params[] = { scope, key, hex, event_id, room_id, st, resp };
	PGresult *r = exec(c, "INSERT INTO idempotency_keys (scope, key, request_hash, event_id, room_id, "
			      "response_status, response) VALUES ($1, $2, decode($3, 'hex'), $4::bigint, $5::bigint, "
			      "$6::int, $7::jsonb)", 7, params);
	free(resp);
	cw_err rc = store_check(c, r, PGRES_COMMAND_OK, e);
	if (!rc)
		PQclear(r);
	return rc;
}

json_t *peer_audit_record(const struct policy_decision *d, const char *pid, const char *subject, json_t *details)
{
	char action[24];
	snprintf(action, sizeof(action), "policy.%s", policy_verdict_name(d->verdict));
	return json_pack("{s:s, s:s, s:I, s:s*, s:s, s:o}", "action", action, "reason", d->reason, "rule",
			 (json_int_t)d->rule_id, "pid", pid, "subject", subject, "details", details);
}

/* Writes one record of peer_audit_record's shape about no message. */
static cw_err audit_record_write(PGconn *c, const json_t *rec, cw_errmsg *e)
{
	char *text = rec ? json_dumps(rec, JSON_COMPACT) : NULL;
	if (!text)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const char *params[] = { text };
	cw_err rc = store_command(c, "INSERT INTO audit_log (actor, action, reason_code, rule_id, subject, details) "
				     "SELECT 'policy', a.action, a.reason, NULLIF(a.rule, 0), a.subject, a.details "
				     "FROM jsonb_to_record($1::jsonb) AS a(action text, reason text, rule bigint, "
				     "subject text, details jsonb)", 1, params, e);
	free(text);
	return rc;
}

cw_err peer_audit_write(PGconn *c, const struct policy_decision *d, const char *subject, json_t *details,
			cw_errmsg *e)
{
	json_t *rec = peer_audit_record(d, NULL, subject, details);
	cw_err rc = audit_record_write(c, rec, e);
	json_decref(rec);
	return rc;
}

void peer_local_fold(const struct cw_app *app, struct mimi_uri *u, char *uri)
{
	if (!app->xmpp || app->matrix || !app->cfg->domain || strcmp(u->domain, app->cfg->domain) != 0)
		return;
	if (addr_fold_lower(u->id, NULL))
		mimi_uri_format(u, uri, MIMI_URI_MAX + 1, NULL);
}

const char *peer_local_refused(const struct cw_app *app, const struct mimi_uri *u, const char *uri, char *why,
			       size_t len)
{
	if (!app->matrix || !app->cfg->domain || strcmp(u->domain, app->cfg->domain) != 0)
		return NULL;
	return matrix_local_refused(app->cfg, uri, u->id, why, len);
}

/* The identity row of a user URI, made on first contact.  One found is
 * locked FOR KEY SHARE until the transaction's end, as a foreign key's
 * check locks it: the retention sweep, which forgets a local identity
 * nothing refers to (gateway/retention.c), passes over it, and one the
 * sweep is deleting is waited for and made anew (the second attempt). */
cw_err identity_id(PGconn *c, const struct mimi_uri *u, bool local, const char *network,
			  const char *peer_id, char *out, size_t outlen, cw_errmsg *e)
{
	char uri[MIMI_URI_MAX + 1];
	mimi_uri_format(u, uri, sizeof(uri), NULL);
	const char *params[] = { uri, u->domain, u->id, local ? "t" : "f", network, peer_id };
	for (int attempt = 0; attempt < 2; attempt++) {
		PGresult *r = exec(c,
			"WITH ins AS (INSERT INTO identities (uri, domain, localpart, is_local, network, peer_id) "
			"VALUES ($1, $2, $3, $4::boolean, $5, $6::bigint) ON CONFLICT (uri) DO NOTHING RETURNING id), "
			"old AS (SELECT id FROM identities WHERE uri = $1 FOR KEY SHARE) "
			"SELECT id FROM ins UNION ALL SELECT id FROM old LIMIT 1", 6, params);
		cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
		if (rc)
			return rc;
		if (PQntuples(r) == 1) {
			snprintf(out, outlen, "%s", PQgetvalue(r, 0, 0));
			PQclear(r);
			return CW_OK;
		}
		PQclear(r); /* inserted concurrently by another transaction: look again */
	}
	return cw_fail(e, CW_EINTERNAL, "identity %s could not be resolved", uri);
}

/* ------------------------------------------------------------ directory */

/* The event limits of a batch: the operator's peer.max_batch events (256
 * by default; a constant until the twenty-first session), each up to
 * max_event_bytes. */
static struct event_limits batch_limits(const struct cw_app *app)
{
	struct event_limits lim = event_limits_default();
	lim.max_batch = (size_t)app->cfg->peer_max_batch;
	lim.max_batch_bytes = lim.max_batch * lim.max_event_bytes;
	return lim;
}

void peer_api_directory(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	if (!peer_api_enabled(app, req))
		return;
	struct event_limits lim = batch_limits(app);
	/* features: what this profile does beyond submitting messages, one
	 * name per endpoint (or delivery mode) that does it. */
	json_t *d = json_pack(
		"{s:s, s:s, s:{s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:s},"
		" s:[s,s,s], s:[s,s,s,s,s,s,s,s], s:[s,s,s,s,s,s,s,s,s,s,s],"
		" s:{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}, s:{s:s, s:s, s:s}, s:{s:s, s:[s,s,s,s,s], s:I}}",
		"profile", "causeway-mimi-json/1",
		"domain", app->cfg->domain,
		"endpoints",
		"rooms", "/v1/rooms",
		"room", "/v1/rooms/{room}",
		"members", "/v1/rooms/{room}/members",
		"receipts", "/v1/rooms/{room}/receipts",
		"typing", "/v1/rooms/{room}/typing",
		"messages", "/v1/rooms/{room}/messages",
		"message_status", "/v1/messages/{id}",
		"batch", "/v1/batch",
		"openapi", "/v1/openapi.json",
		"events", "/v1/events",
		"consent_requests", "/v1/consent/requests",
		"consent_updates", "/v1/consent/updates",
		"blocks", "/v1/blocks",
		"reports", "/v1/reports",
		"identifiers", "/v1/identifiers/query",
		"media", "/v1/media/{token}",
		"profiles", "/v1/profiles",
		"notify", "{push_url}/v1/notify",
		"content_types", "text/plain", "text/markdown", "text/html",
		"event_types", "message", "edit", "delete", "reaction", "receipt", "typing", "membership", "block",
		"features", "push", "pull", "batch", "receipts", "typing", "media", "consent", "blocks", "reports",
		"identifiers", "profiles",
		"limits",
		"max_event_bytes", (json_int_t)lim.max_event_bytes,
		"max_body_bytes", (json_int_t)lim.max_body_bytes,
		"max_parts", (json_int_t)lim.max_parts,
		"max_attachments", (json_int_t)lim.max_attachments,
		"max_batch_events", (json_int_t)lim.max_batch,
		"max_request_bytes", (json_int_t)app->cfg->max_body_bytes,
		"max_event_values", (json_int_t)EVENT_MAX_VALUES,
		"max_room_members", (json_int_t)app->cfg->rooms_max_members,
		"public_key", "alg", "ed25519", "keyid", app->cfg->domain, "key", app->public_key_b64,
		"signatures", "tag", app->cfg->signature_tag,
		"components", "@method", "@target-uri", "content-digest", "content-type", "idempotency-key",
		"max_clock_skew_s", (json_int_t)app->cfg->max_clock_skew_s);
	/* Published only when the operator set them: no made-up address. */
	if (d && app->cfg->policy_url && *app->cfg->policy_url)
		json_object_set_new(d, "policy_url", json_string(app->cfg->policy_url));
	if (d && app->cfg->abuse_contact && *app->cfg->abuse_contact)
		json_object_set_new(d, "abuse_contact", json_string(app->cfg->abuse_contact));
	cw_req_reply_json(req, 200, d);
}

/* ------------------------------------------------------------ rooms */

struct room_input {
	struct peer_principal *p; /* borrowed from the request, which outlives the job */
	char scope[PEER_NAME_MAX + 8];
	char *idem_key;
	unsigned char hash[32];
	unsigned char hash_old[32]; /* the same request as stored before the sixteenth session */
	char public_id[80];
	char uri[MIMI_URI_MAX + 1];
	char hub[MIMI_DOMAIN_MAX + 1];
	char domain[MIMI_DOMAIN_MAX + 1];
	const char *kind;
	char *policy;
	char *name;               /* a group's, or NULL */
	size_t n;
	struct room_member_in m[ROOM_MEMBERS_MAX];
	/* The policy's answer about the creator, from the job's first run: a
	 * run again (after a deadlock or serialization failure) neither
	 * charges the limits a second time nor loses the first refusal's
	 * audit record with the rolled-back transaction. */
	bool decided, first_refusal;
	struct policy_decision d;
	struct policy_rate_ledger ledger; /* the tokens it took: given back when it lost a race (room_create_fn) */
};

static void room_input_free(void *arg)
{
	struct room_input *in = arg;
	policy_rate_ledger_free(&in->ledger);
	free(in->idem_key);
	free(in->policy);
	free(in->name);
	free(in);
}

/* A room's stored policy as JSON.  PostgreSQL gives a jsonb number back in
 * plain decimal: one stored before the policy was held to an event's rules
 * (the forty-first session), such as 1e20, comes back as 21 digits that
 * jansson refuses as an integer, and the room's state was answered without
 * its policy, in silence.  Such a policy is read with its integers as
 * reals (1 is then 1.0); one that still cannot be read (a number past a
 * double's range) is {} and logged. */
static json_t *stored_policy(const char *room, const char *text)
{
	json_t *v = json_loads(text, 0, NULL);
	if (!v)
		v = json_loads(text, JSON_DECODE_INT_AS_REAL, NULL);
	if (!v) {
		LOG_KV_LIMITED(CW_LOG_WARN, "a room's stored policy cannot be read: answered as {}", "room", room);
		v = json_object();
	}
	return v;
}

static json_t *room_json(const char *public_id, const char *uri, const char *kind, const char *name, json_t *members)
{
	return json_pack("{s:s, s:s, s:s, s:s*, s:o}", "id", public_id, "uri", uri, "kind", kind, "name", name, "members",
			 members);
}

#define ROOM_NAME_RULE \
	"name must be a string of 1 to 255 bytes that shows something, without control characters (C0, DEL, C1), " \
	"bidirectional controls (U+202A-U+202E, U+2066-U+2069), line separators (U+2028, U+2029) or noncharacters " \
	"(U+FFFE, U+FFFF, ...)"

/* A group's name: 1-255 bytes of UTF-8 (jansson's strings are), shown as
 * the room's name on the local networks (Matrix's m.room.name, the XMPP
 * room's subject) as it is.  Since the thirty-first session without a
 * control character (C0, DEL and, newly, C1), a bidirectional control
 * (U+202E reversed what the subject says after the name), a noncharacter
 * (U+FFFE, U+FFFF, ...: an XMPP server closes the stream that carries
 * one) or a line or paragraph separator (U+2028, U+2029), and with at
 * least one character that shows (not only invisible ones and blanks,
 * cw_utf8_blank); before, only C0 and DEL were refused. */
static bool room_name_valid(const json_t *v)
{
	size_t n = json_string_length(v);
	/* The rules are cw_utf8_name_ok's, which the Matrix portal names are
	 * filtered by too (one copy, not two). */
	return json_is_string(v) && n >= 1 && n <= ROOM_NAME_MAX && cw_utf8_name_ok(json_string_value(v), n);
}

/* Where a member lives: this provider (network "local"), the calling peer,
 * or another enabled peer serving its domain. */
struct member_class {
	bool local;
	char network[PEER_NAME_MAX + 8];
	char peer_id[24];
};

/* Classifies n members; fails j with unknown_domain (and writes nothing)
 * when a member's domain is served by nobody. */
static cw_err classify_members(PGconn *c, struct app_job *j, const struct peer_principal *p, const char *our_domain,
			       const struct room_member_in *m, size_t n, struct member_class *out, cw_errmsg *e)
{
	for (size_t i = 0; i < n; i++) {
		const struct mimi_uri *u = &m[i].u;
		memset(&out[i], 0, sizeof(out[i]));
		if (strcmp(u->domain, our_domain) == 0) {
			out[i].local = true;
			snprintf(out[i].network, sizeof(out[i].network), "%s", app_local_network(j->app));
		} else if (strcmp(u->domain, p->domain) == 0) {
			snprintf(out[i].network, sizeof(out[i].network), "peer:%s", p->name);
			snprintf(out[i].peer_id, sizeof(out[i].peer_id), "%lld", (long long)p->id);
		} else {
			const char *params[] = { u->domain };
			PGresult *r = exec(c, "SELECT id, name FROM peers WHERE domain = $1 AND enabled", 1, params);
			cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
			if (rc)
				return rc;
			if (PQntuples(r) == 0) {
				PQclear(r);
				app_job_fail(j, 400, "unknown_domain",
					     "member %zu is in a domain that no peer of this provider serves", i);
				return CW_OK;
			}
			snprintf(out[i].peer_id, sizeof(out[i].peer_id), "%s", PQgetvalue(r, 0, 0));
			snprintf(out[i].network, sizeof(out[i].network), "peer:%s", PQgetvalue(r, 0, 1));
			PQclear(r);
		}
	}
	return CW_OK;
}

/* A new room's creator: its first member of the calling peer's domain
 * (peer_api_room_create makes sure there is one). */
static const struct room_member_in *room_creator(const struct room_input *in)
{
	for (size_t i = 0; i < in->n; i++)
		if (strcmp(in->m[i].u.domain, in->p->domain) == 0)
			return &in->m[i];
	return NULL;
}

/* A new conversation: server rules and the creator's rate limit; j's error
 * is set when refused, and the refusal audited (a limit once per episode,
 * as a message's).  Asked after the idempotent replay, so that a retry of
 * a room made gets it rather than a token less or a rule made since, and
 * after every other refusal (room_create_fn), so that a room refused takes
 * none.  The other remote members are asked by members_decide. */
static cw_err new_room_decide(PGconn *c, struct app_job *j, struct room_input *in, cw_errmsg *e)
{
	const struct room_member_in *creator = room_creator(in);
	if (!in->decided) {
		char network[PEER_NAME_MAX + 8];
		snprintf(network, sizeof(network), "peer:%s", in->p->name);
		struct policy_view *view = policy_live_get(j->app->policy);
		struct policy_rate_memo memo;
		policy_rate_memo_init(&memo, j->app->limits);
		in->ledger.rl = j->app->limits;
		if (in->ledger.rl)
			memo.ledger = &in->ledger;
		struct policy_request preq = {
			.direction = POLICY_INBOUND, .action = POLICY_ACT_NEW_ROOM,
			.sender = { creator->uri, in->p->domain, network }, .now_ms = cw_wall_ms(), .rate = &memo.rate,
		};
		policy_decide(view->snap, &preq, &in->d);
		policy_rate_memo_finish(&memo);
		policy_view_put(view);
		policy_count(j->app, &in->d);
		in->first_refusal = memo.first_refusal;
		in->decided = true;
	}
	const struct policy_decision d = in->d;
	if (d.verdict == POLICY_LIMIT) {
		j->retry_after_ms = d.retry_after_ms; /* not on j->req: this may run again */
		j->err_status = 429;
		j->err_code = "rate_limited";
		snprintf(j->err_detail, sizeof(j->err_detail), "too many new conversations from this sender; retry later");
		if (in->first_refusal)
			return peer_audit_write(c, &d, creator->uri,
						json_pack("{s:s, s:s, s:s, s:I}", "sender", creator->uri, "direction",
							  "inbound", "type", "new_room", "retry_after_ms",
							  (json_int_t)d.retry_after_ms), e);
	} else if (d.verdict == POLICY_DENY) {
		j->err_status = 403;
		j->err_code = "not_allowed";
		/* The reason is the operator's (spec: reasons only in the
		 * admin API): the log and the audit log have it, the peer gets
		 * one text. */
		snprintf(j->err_detail, sizeof(j->err_detail), "this provider does not take this conversation");
		LOG_KV_LIMITED(CW_LOG_INFO, "room creation refused by the server's rules", "reason", d.reason,
			       "creator", creator->uri);
		return peer_audit_write(c, &d, creator->uri,
					json_pack("{s:s, s:s, s:s}", "sender", creator->uri, "direction", "inbound",
						  "type", "new_room"), e);
	}
	return CW_OK;
}

/* A remote user in a room, new or added to a group, is let in as a room's
 * creator would be: the server's rules are asked as for a new conversation
 * from that user (a deny rule, a closed server or an allowlist without the
 * domain refuse it; spec: a server deny always wins), rate limits are not
 * (being in a room is not starting a conversation).  skip: a member
 * asked apart (a new room's creator: new_room_decide), or NULL; room: the room's public
 * id for the audit, or NULL (a room not made).  j's error is set, with one
 * text (the reason is the operator's, in the log and the audit log), and
 * the refusal audited.  Before the seventeenth session a new room asked
 * about its creator only, and a denied user got into a new group. */
static cw_err members_decide(PGconn *c, struct app_job *j, const struct room_member_in *m, size_t n,
			     const struct member_class *cls, const struct room_member_in *skip, const char *room,
			     cw_errmsg *e)
{
	struct policy_view *view = policy_live_get(j->app->policy);
	struct policy_decision d = { .verdict = POLICY_ALLOW };
	size_t i;
	for (i = 0; i < n; i++) {
		if (cls[i].local || &m[i] == skip)
			continue;
		struct policy_request preq = {
			.direction = POLICY_INBOUND, .action = POLICY_ACT_NEW_ROOM,
			.sender = { m[i].uri, m[i].u.domain, cls[i].network }, .now_ms = cw_wall_ms(),
		};
		policy_decide(view->snap, &preq, &d);
		policy_count(j->app, &d);
		if (d.verdict == POLICY_DENY)
			break;
	}
	policy_view_put(view);
	if (d.verdict != POLICY_DENY)
		return CW_OK;
	app_job_fail(j, 403, "not_allowed", "this provider takes no conversations with %s", m[i].uri);
	LOG_KV_LIMITED(CW_LOG_INFO, "member refused by the server's rules", "reason", d.reason, "member", m[i].uri);
	return peer_audit_write(c, &d, m[i].uri,
				json_pack("{s:s, s:s, s:s, s:s*}", "sender", m[i].uri, "direction", "inbound", "type",
					  room ? "member_add" : "new_room", "room", room), e);
}

/* The calling peer itself, for what it does to a group it has a member in
 * that no message carries (type: "rename", or "member_add" of local users
 * or its own): the server's rules are asked about its domain and network
 * as about a new conversation from them (steps 1 and 4: a deny rule, a
 * closed server, an allowlist without it; no user's consent, no rate
 * limit: it starts no conversation).  Refused, j's error is set with the
 * text a refused conversation gets (the reason is the operator's, in the
 * log and the audit log) and the refusal audited, subject the peer's
 * domain.  Until the thirty-first session a denied peer renamed the local
 * members' portals and rooms, and added local users to its groups. */
static cw_err caller_decide(PGconn *c, struct app_job *j, const struct peer_principal *p, const char *room,
			    const char *type, cw_errmsg *e)
{
	char network[PEER_NAME_MAX + 8];
	snprintf(network, sizeof(network), "peer:%s", p->name);
	struct policy_view *view = policy_live_get(j->app->policy);
	struct policy_request preq = {
		.direction = POLICY_INBOUND, .action = POLICY_ACT_NEW_ROOM,
		.sender = { NULL, p->domain, network }, .now_ms = cw_wall_ms(),
	};
	struct policy_decision d;
	policy_decide(view->snap, &preq, &d);
	policy_view_put(view);
	policy_count(j->app, &d);
	if (d.verdict != POLICY_DENY)
		return CW_OK;
	app_job_fail(j, 403, "not_allowed", "this provider does not take this conversation");
	LOG_KV_LIMITED(CW_LOG_INFO, "a peer's change of a group refused by the server's rules", "reason", d.reason,
		       "peer", p->name, "room", room);
	return peer_audit_write(c, &d, p->domain,
				json_pack("{s:s, s:s, s:s, s:s}", "peer", network, "direction", "inbound", "type", type,
					  "room", room), e);
}

#define ROOM_URI_TAKEN "a room with that uri exists"

/* The refusal of a change that would take a group past rooms.max_members
 * (413 too_large, as the other limits the directory announces; nothing
 * is changed): a room created with more members, an add, a peer's user's
 * own join.  Since the forty-sixth session (a review's finding: a peer
 * added 256 members a request, again and again, each of them a fan-out of
 * deliveries, Matrix invitations and XMPP presences, and GET
 * /v1/rooms/{room} listed them all). */
#define ROOM_MEMBERS_BOUND \
	"a group has at most %ld members here (the directory's limits.max_room_members); nobody was added"

/* A room the calling peer hosts (its uri given) whose uri is taken: j's
 * error set, 409.  The insert's ON CONFLICT says the same of one taken
 * meanwhile. */
static cw_err room_uri_free(PGconn *c, struct app_job *j, const char *uri, cw_errmsg *e)
{
	const char *params[] = { uri };
	PGresult *r = exec(c, "SELECT 1 FROM rooms WHERE uri = $1", 1, params);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r))
		app_job_fail(j, 409, "conflict", ROOM_URI_TAKEN);
	PQclear(r);
	return CW_OK;
}

static cw_err room_create_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct room_input *in = j->data;
	cw_err rc;
	if (idem_replay(c, j, in->scope, in->idem_key, in->hash, in->hash_old, &rc, e))
		return rc;
	/* More members than a group may have (after the replay: a room made
	 * before the bound was lowered is still its retry's answer). */
	if ((long)in->n > j->app->cfg->rooms_max_members) {
		app_job_fail(j, 413, "too_large", ROOM_MEMBERS_BOUND, j->app->cfg->rooms_max_members);
		return CW_OK;
	}
	/* Every refusal the room may get for its members (400 unknown_domain,
	 * 403) or its uri (409) before the creator's decision, which takes a
	 * token of her new_conversations_per_hour (new_room_decide): until the
	 * forty-sixth session it came first, and a peer sending again a
	 * creation refused for a member spent her allowance with it. */
	static _Thread_local struct member_class cls[ROOM_MEMBERS_MAX];
	if ((rc = classify_members(c, j, in->p, in->domain, in->m, in->n, cls, e)) || j->err_code)
		return rc;
	if ((rc = members_decide(c, j, in->m, in->n, cls, room_creator(in), NULL, e)) || j->err_code)
		return rc;
	if (strcmp(in->hub, in->domain) != 0 && ((rc = room_uri_free(c, j, in->uri, e)) || j->err_code))
		return rc;
	if ((rc = new_room_decide(c, j, in, e)) || j->err_code)
		return rc;
	char caller_id[24];
	snprintf(caller_id, sizeof(caller_id), "%lld", (long long)in->p->id);
	const char *params[] = { in->public_id, in->uri, in->hub, in->kind, in->policy, caller_id, in->name };
	PGresult *r = exec(c, "INSERT INTO rooms (public_id, uri, hub_domain, kind, policy, created_by_peer_id, name) "
			      "VALUES ($1, $2, $3, $4, $5::jsonb, $6::bigint, $7) ON CONFLICT (uri) DO NOTHING RETURNING id",
			   7, params);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	if (PQntuples(r) == 0) {
		PQclear(r);
		/* The uri was taken meanwhile: the insert waited for the
		 * transaction that took it, and a statement now sees what it
		 * committed.  This request made no room: the token it took is
		 * given back, as a creation refused for its uri before takes
		 * none.  When the room was made by this very request (the same
		 * Idempotency-Key, sent again to another process while the
		 * first was committing), its answer is this one's.  Until the
		 * forty-sixth session the retry was answered 409 "a room with
		 * that uri exists", final, for a room it had made, and spent a
		 * second token. */
		policy_rate_ledger_give_item(&in->ledger, POLICY_LEDGER_JOB, cw_wall_ms());
		if (idem_replay(c, j, in->scope, in->idem_key, in->hash, in->hash_old, &rc, e))
			return rc;
		app_job_fail(j, 409, "conflict", ROOM_URI_TAKEN);
		return CW_OK;
	}
	char room_id[24];
	snprintf(room_id, sizeof(room_id), "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	json_t *members = json_array();
	for (size_t i = 0; i < in->n; i++) {
		char ident[24];
		if ((rc = identity_id(c, &in->m[i].u, cls[i].local, cls[i].network,
				      cls[i].peer_id[0] ? cls[i].peer_id : NULL, ident, sizeof(ident), e))) {
			json_decref(members);
			return rc;
		}
		/* A local user in a peer's group is invited until she takes
		 * part (RECIPIENT_MEMBER_SQL); in a direct room the policy
		 * decides each message for her anyway. */
		bool invited = cls[i].local && strcmp(in->kind, "group") == 0;
		const char *mp[] = { room_id, ident, invited ? "invited" : "joined" };
		r = exec(c, "INSERT INTO room_members (room_id, identity_id, membership, peer_invited) VALUES ($1, $2, $3, "
			    "$3 = 'invited') ON CONFLICT DO NOTHING", 3, mp);
		if ((rc = store_check(c, r, PGRES_COMMAND_OK, e))) {
			json_decref(members);
			return rc;
		}
		PQclear(r);
		json_array_append_new(members, json_pack("{s:s, s:s, s:s}", "user", in->m[i].uri, "role", "member",
							 "membership", mp[2]));
	}
	j->status = 201;
	j->body = room_json(in->public_id, in->uri, in->kind, in->name, members);
	return idem_store(c, in->scope, in->idem_key, in->hash, NULL, room_id, 201, j->body, e);
}

void peer_api_room_create(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	if (!peer_api_enabled(app, req))
		return;
	struct peer_principal *p = cw_req_principal(req);
	const char *key = cw_req_header(req, "Idempotency-Key");
	if (key && !idempotency_key_valid(key)) {
		cw_req_problem(req, 400, "invalid_header", "Invalid header",
			       "Idempotency-Key must be 1 to 128 of A-Z a-z 0-9 . _ : -");
		return;
	}
	json_t *body = app_json_body(req);
	if (!body)
		return;
	struct room_input *in = calloc(1, sizeof(*in));
	if (!in) { /* until the forty-fifth session 400 invalid_body, the client's fault */
		json_decref(body);
		cw_req_no_memory(req);
		return;
	}
	const char *bad = NULL;
	json_t *kind = json_object_get(body, "kind"), *members = json_object_get(body, "members");
	json_t *policy = json_object_get(body, "policy"), *uri = json_object_get(body, "uri");
	json_t *name = json_object_get(body, "name");
	cw_errmsg e;
	char why[MIMI_URI_MAX + 300];
	struct event_error perr;
	char pdetail[sizeof(perr.detail) + sizeof(perr.pointer) + 8];
	if (!json_is_string(kind) || (strcmp(json_string_value(kind), "direct") != 0 &&
				      strcmp(json_string_value(kind), "group") != 0)) {
		bad = "kind must be direct or group";
	} else if (!json_is_array(members) || json_array_size(members) < 2 ||
		   json_array_size(members) > ROOM_MEMBERS_MAX) {
		bad = "members must be an array of 2 to 256 user URIs";
	} else if (strcmp(json_string_value(kind), "direct") == 0 && json_array_size(members) != 2) {
		bad = "a direct room has exactly two members";
	} else if (policy && !json_is_object(policy)) {
		bad = "policy must be an object";
	} else if (policy && event_json_value_check(policy, "policy", &perr) != CW_OK) {
		/* kept and handed back as it came (GET /v1/rooms/{room}): an
		 * event's rules for depth, size and numbers (until the forty-first
		 * session 1e20 was stored, jsonb gave it back as 21 digits and the
		 * room's state went out without its policy) */
		snprintf(pdetail, sizeof(pdetail), "%s (at %s)", perr.detail, perr.pointer);
		bad = pdetail;
	} else if (name && !json_is_null(name) && strcmp(json_string_value(kind), "group") != 0) {
		bad = "only a group has a name";
	} else if (name && !json_is_null(name) && !room_name_valid(name)) {
		bad = ROOM_NAME_RULE;
	}
	bool caller_member = false;
	for (size_t i = 0; !bad && i < json_array_size(members); i++) {
		json_t *m = json_array_get(members, i);
		if (!json_is_string(m) || mimi_uri_parse(json_string_value(m), &in->m[i].u, &e) ||
		    in->m[i].u.kind != MIMI_USER) {
			bad = "every member must be a user URI mimi://<domain>/u/<local>";
			break;
		}
		snprintf(in->m[i].uri, sizeof(in->m[i].uri), "%s", json_string_value(m));
		peer_local_fold(app, &in->m[i].u, in->m[i].uri);
		if ((bad = peer_local_refused(app, &in->m[i].u, in->m[i].uri, why, sizeof(why))))
			break;
		for (size_t k = 0; k < i; k++)
			if (strcmp(in->m[k].uri, in->m[i].uri) == 0)
				bad = "a member is listed twice";
		if (strcmp(in->m[i].u.domain, p->domain) == 0)
			caller_member = true;
		in->n = i + 1;
	}
	if (!bad && !caller_member)
		bad = "at least one member must be a user of the calling peer's domain";

	if (!bad && uri) {
		struct mimi_uri ru;
		if (!json_is_string(uri) || mimi_uri_parse(json_string_value(uri), &ru, &e) || ru.kind != MIMI_ROOM ||
		    strcmp(ru.domain, p->domain) != 0)
			bad = "uri must be a room URI in the calling peer's domain (or absent: this provider hosts it)";
	}
	if (bad) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body", bad);
		json_decref(body);
		room_input_free(in);
		return;
	}
	in->p = p;
	snprintf(in->scope, sizeof(in->scope), "peer:%s", p->name);
	in->idem_key = key ? strdup(key) : NULL;
	if (key)
		cw_req_set_retry_safe(req);
	/* The request for its Idempotency-Key: the body as JSON, keys sorted
	 * and compact, so that a retry serialised anew (another key order,
	 * other spacing) is the same request, as an event's is. */
	char *canon = json_dumps(body, JSON_COMPACT | JSON_SORT_KEYS);
	if (!canon) {
		json_decref(body);
		room_input_free(in);
		cw_req_no_memory(req);
		return;
	}
	cw_sha256(canon, strlen(canon), in->hash);
	free(canon);
	/* A key stored before the sixteenth session holds the hash of the raw
	 * body: a retry across the upgrade (a restart, a 503: when retries
	 * happen) is the same request in that form too, not a 409. */
	size_t blen;
	const char *raw = cw_req_body(req, &blen);
	cw_sha256(raw, blen, in->hash_old);
	cw_new_id(in->public_id, sizeof(in->public_id), "r_");
	snprintf(in->domain, sizeof(in->domain), "%s", app->cfg->domain);
	if (uri) { /* the peer hosts the room */
		snprintf(in->uri, sizeof(in->uri), "%s", json_string_value(uri));
		snprintf(in->hub, sizeof(in->hub), "%.253s", p->domain);
	} else {
		snprintf(in->uri, sizeof(in->uri), "mimi://%s/r/%s", app->cfg->domain, in->public_id);
		snprintf(in->hub, sizeof(in->hub), "%s", app->cfg->domain);
	}
	in->kind = strcmp(json_string_value(kind), "direct") == 0 ? "direct" : "group";
	in->policy = policy ? json_dumps(policy, JSON_COMPACT) : strdup("{}");
	in->name = json_is_string(name) ? strdup(json_string_value(name)) : NULL;
	json_decref(body);
	app_job_run(app, req, room_create_fn, in, room_input_free, true);
}

struct room_get_input {
	char public_id[80];
	int64_t peer_id;
};

/* A member's membership as the peers see it: a local user a peer put into
 * a group (room_members.peer_invited, schema/037) who declined or left
 * while only invited is listed invited, as one who never answered (or
 * does not exist) is: her choice is not the peer's to learn, as a block
 * tells nothing (docs/policy.md, "Local users a peer puts into a group"). */
#define PEER_VIEW_MEMBERSHIP(M) \
	"CASE WHEN " M ".membership = 'left' AND " M ".peer_invited THEN 'invited' ELSE " M ".membership END"

/* Sets j's answer to the room's state as peer peer_id may see it (404 when
 * none of its users is a member; joined: a member now, not one who left,
 * for GET: a peer whose users all left sees the room no more, its members
 * and renames included; the answer to a change of members, which may be
 * the peer's last user leaving, still shows what it did).  The members
 * listed are the room's now: joined, invited and banned, not those who
 * left (since the forty-sixth session: until then every row, and a group's
 * comings and goings grew its state without end), but the users named by
 * removed (a JSON array of their URIs, or NULL), whom the answer to their
 * removal shows left. */
static cw_err room_state(PGconn *c, struct app_job *j, const char *public_id, int64_t peer_id, bool joined,
			 const char *removed, cw_errmsg *e)
{
	char pid[24];
	snprintf(pid, sizeof(pid), "%lld", (long long)peer_id);
	const char *params[] = { public_id, pid, joined ? "t" : "f", removed };
	/* A peer sees the rooms its users are members of, nothing else; a
	 * local user a peer added who left before she took part is shown as
	 * still invited (PEER_VIEW_MEMBERSHIP), and so listed.  The room's
	 * row comes once without members when none is listed. */
	PGresult *r = exec(c,
		"SELECT r.public_id, r.uri, r.kind, r.policy::text, i.uri, m.role, " PEER_VIEW_MEMBERSHIP("m") ", r.name "
		"FROM rooms r LEFT JOIN (room_members m JOIN identities i ON i.id = m.identity_id) ON m.room_id = r.id "
		"AND (m.membership <> 'left' OR m.peer_invited OR i.uri IN (SELECT jsonb_array_elements_text($4::jsonb))) "
		"WHERE r.public_id = $1 AND EXISTS (SELECT 1 FROM room_members m2 JOIN identities i2 "
		"ON i2.id = m2.identity_id WHERE m2.room_id = r.id AND i2.peer_id = $2::bigint "
		"AND (NOT $3::boolean OR m2.membership = 'joined')) ORDER BY i.uri",
		4, params);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 0) {
		PQclear(r);
		app_job_fail(j, 404, "unknown_room", "no such room");
		return CW_OK;
	}
	json_t *members = json_array();
	for (int i = 0; i < PQntuples(r); i++)
		if (!PQgetisnull(r, i, 4))
			json_array_append_new(members, json_pack("{s:s, s:s, s:s}", "user", PQgetvalue(r, i, 4), "role",
								 PQgetvalue(r, i, 5), "membership", PQgetvalue(r, i, 6)));
	j->body = room_json(PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1), PQgetvalue(r, 0, 2),
			    PQgetisnull(r, 0, 7) ? NULL : PQgetvalue(r, 0, 7), members);
	json_object_set_new(j->body, "policy", stored_policy(PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 3)));
	PQclear(r);
	return CW_OK;
}

static cw_err room_get_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct room_get_input *in = j->data;
	return room_state(c, j, in->public_id, in->peer_id, true, NULL, e);
}

/* POST /v1/rooms/{room}/members: {"add": [user URIs], "remove": [user URIs]}
 * (MIMI's membership update).  A direct room keeps its two members. */
/* A change of a group by a peer, charged as its users' messages are
 * (change_limit): the rate limit's answer, from the job's first run (as a
 * new room's: a run again neither charges it twice nor loses its audit). */
struct change_charge {
	bool decided, first_refusal;
	struct policy_decision d;
};

/* A rename, or an add of members, is charged as a message of the calling
 * peer is (a rename since the thirty-first session, a review's finding:
 * 100 renames in 11 s made 23 room names in each portal; an add since the
 * thirty-sixth: each made membership events to the group's other peers
 * and presences to its XMPP occupants, unbounded): the server's rules'
 * messages_per_minute for its domain or network (the bucket its users'
 * messages take), and messages_per_minute_per_user with the peer's own
 * domain as the sender, a bucket of its changes.  Only the limit is taken
 * from the answer; limited: 429 rate_limited with Retry-After, audited
 * once per episode (type: "rename", "member_add"). */
static cw_err change_limit(PGconn *c, struct app_job *j, const struct peer_principal *p, const char *public_id,
			   const char *type, struct change_charge *ch, cw_errmsg *e)
{
	char network[PEER_NAME_MAX + 8], sender[MIMI_DOMAIN_MAX + 16];
	snprintf(network, sizeof(network), "peer:%s", p->name);
	snprintf(sender, sizeof(sender), "mimi://%s", p->domain);
	if (!ch->decided) {
		struct policy_view *view = policy_live_get(j->app->policy);
		struct policy_rate_memo memo;
		policy_rate_memo_init(&memo, j->app->limits);
		struct policy_request preq = {
			.direction = POLICY_INBOUND, .action = POLICY_ACT_EVENT, .event_type = type,
			.sender = { sender, p->domain, network }, .now_ms = cw_wall_ms(), .rate = &memo.rate,
		};
		policy_decide(view->snap, &preq, &ch->d);
		policy_rate_memo_finish(&memo);
		policy_view_put(view);
		ch->first_refusal = memo.first_refusal;
		ch->decided = true;
		if (ch->d.verdict == POLICY_LIMIT)
			policy_count(j->app, &ch->d);
	}
	if (ch->d.verdict != POLICY_LIMIT)
		return CW_OK;
	j->retry_after_ms = ch->d.retry_after_ms; /* not on j->req: this may run again */
	j->err_status = 429;
	j->err_code = "rate_limited";
	snprintf(j->err_detail, sizeof(j->err_detail), "too many changes from this provider; retry later");
	if (!ch->first_refusal)
		return CW_OK;
	return peer_audit_write(c, &ch->d, sender,
				json_pack("{s:s, s:s, s:s, s:s, s:I}", "sender", sender, "direction", "inbound", "type",
					  type, "room", public_id, "retry_after_ms", (json_int_t)ch->d.retry_after_ms), e);
}

struct members_input {
	struct peer_principal *p; /* borrowed from the request */
	struct change_charge charge; /* an add's (change_limit) */
	char public_id[80];
	char domain[MIMI_DOMAIN_MAX + 1];
	size_t nadd, nremove;
	struct room_member_in add[ROOM_MEMBERS_MAX];
	struct room_member_in remove[ROOM_MEMBERS_MAX];
	bool added[ROOM_MEMBERS_MAX], removed[ROOM_MEMBERS_MAX]; /* which made a change */
};

cw_err room_members_target(PGconn *c, struct app_job *j, PGresult *r, const char *code, const char *detail,
			   char room_id[24], cw_errmsg *e)
{
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 0) {
		PQclear(r);
		app_job_fail(j, 404, code, "%s", detail);
		return CW_OK;
	}
	snprintf(room_id, 24, "%s", PQgetvalue(r, 0, 0));
	bool direct = strcmp(PQgetvalue(r, 0, 1), "direct") == 0;
	PQclear(r);
	if (direct)
		app_job_fail(j, 400, "invalid_body", "a direct room keeps its two members");
	return CW_OK;
}

cw_err room_members_lock(PGconn *c, const char *public_id, cw_errmsg *e)
{
	const char *rp[] = { public_id };
	PGresult *r = exec(c, "SELECT count(" ROOM_LOCK_SQL("id") ") FROM rooms WHERE public_id = $1", 1, rp);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (!rc)
		PQclear(r);
	return rc;
}

cw_err room_members_remove(PGconn *c, const char *room_id, const struct room_member_in *m, size_t n, bool *changed,
			   cw_errmsg *e)
{
	for (size_t i = 0; i < n; i++) {
		const char *mp[] = { room_id, m[i].uri };
		/* One who left already is no change (since the twenty-fifth
		 * session: their row is not written again, no event tells of it);
		 * nor is one banned, who is not in the room (since the
		 * twenty-sixth session: before, the ban became left, and the
		 * peers were told of a leaving).  An invitation ends: its
		 * withdrawal is a leave, which the peers are told of as of a
		 * member's (they listed the invitee). */
		PGresult *r = exec(c, "UPDATE room_members SET membership = 'left', peer_invited = false, "
				      "updated_at = now() WHERE room_id = "
				      "$1::bigint AND identity_id = (SELECT id FROM identities WHERE uri = $2) "
				      "AND membership IN ('joined', 'invited') RETURNING 1", 2, mp);
		cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
		if (rc)
			return rc;
		if (changed)
			changed[i] = PQntuples(r) > 0;
		PQclear(r);
	}
	return CW_OK;
}

/* The members' joining or leaving ($3, the neutral membership: join,
 * leave), for the peers: a membership event {membership, target, by} whose
 * sender is the member, as a member's own joining or leaving is
 * (xmpp_in.c, the Matrix adapter), by ($4) the domain of the provider
 * that made the change (omitted: NULL), one per member in the order named
 * ($2, a JSON array of their URIs; one named twice once), origin $5, with
 * a row to every peer with a member in the room, joined or among those
 * named (a removed user's peer keeps no wrong view of the room; the
 * statement sees the rows the change left), but the peer of row id $6
 * (the one that made the change, which knows it; NULL: none).  No peer to
 * tell, no event.  Local members get no row: their adapters show the
 * change from room_members.  The caller holds the room's lock of every
 * write of events (room_members_lock, taken first), so the rows follow
 * the room's order; the dispatcher or the pull is woken at the commit.
 * $1: the room's id.  Until the twenty-fifth session the operator's
 * removal's own statement. */
static const char members_events_sql[] =
	"WITH t AS (SELECT i.id, i.uri, min(x.n) AS n FROM jsonb_array_elements_text($2::jsonb) WITH ORDINALITY "
	"  AS x(uri, n) JOIN identities i ON i.uri = x.uri GROUP BY i.id, i.uri), "
	"tm AS (SELECT (extract(epoch FROM now()) * 1000)::bigint AS ms), "
	"pd AS (SELECT DISTINCT p.name, p.mode FROM room_members m JOIN identities i ON i.id = m.identity_id "
	"  JOIN peers p ON p.id = i.peer_id WHERE m.room_id = $1::bigint "
	"  AND (m.membership = 'joined' OR i.id IN (SELECT id FROM t)) AND p.id IS DISTINCT FROM $6::bigint), "
	"ev AS (INSERT INTO events (public_id, room_id, sender_id, type, content, origin_network, ts) "
	"  SELECT " NEW_EVENT_ID_SQL ", $1::bigint, t.id, 'membership', jsonb_build_object('type', 'membership', "
	"  'sender', t.uri, 'ts', tm.ms, 'content', jsonb_strip_nulls(jsonb_build_object('membership', $3::text, "
	"  'target', t.uri, 'by', $4::text))), $5, tm.ms FROM t, tm WHERE EXISTS (SELECT 1 FROM pd) "
	"  ORDER BY t.n RETURNING id), "
	"ob AS (INSERT INTO outbox (event_id, destination, room_id, state) "
	"  SELECT ev.id, 'peer:' || pd.name, $1::bigint, 'pending' FROM ev, pd ORDER BY ev.id, pd.name RETURNING 1) "
	"SELECT (SELECT count(*) FROM ob), (SELECT count(pg_notify(CASE WHEN w.mode = 'pull' THEN 'causeway_pull' "
	"  ELSE 'causeway_outbox' END, '')) FROM (SELECT DISTINCT mode FROM pd) w WHERE EXISTS (SELECT 1 FROM ob))";

cw_err room_members_events(PGconn *c, const struct room_members_change *ch, const char *membership,
			   const struct room_member_in *m, size_t n, const bool *changed, cw_errmsg *e)
{
	json_t *uris = json_array();
	for (size_t i = 0; uris && i < n; i++)
		if ((!changed || changed[i]) && json_array_append_new(uris, json_string(m[i].uri))) {
			json_decref(uris);
			uris = NULL;
		}
	if (uris && json_array_size(uris) == 0) {
		json_decref(uris);
		return CW_OK; /* nothing changed: nothing to tell */
	}
	char *uj = uris ? json_dumps(uris, JSON_COMPACT) : NULL;
	json_decref(uris);
	if (!uj)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const char *params[] = { ch->room_id, uj, membership, ch->by, ch->origin, ch->except_peer };
	PGresult *r = exec(c, members_events_sql, 6, params);
	free(uj);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (!rc)
		PQclear(r);
	return rc;
}

/* The URIs of m as a JSON array (NULL: out of memory). */
static json_t *member_uris(const struct room_member_in *m, size_t n)
{
	json_t *a = json_array();
	for (size_t i = 0; a && i < n; i++)
		if (json_array_append_new(a, json_string(m[i].uri))) {
			json_decref(a);
			return NULL;
		}
	return a;
}

cw_err room_members_audit(PGconn *c, const char *actor, const char *public_id, const struct room_member_in *add,
			  size_t nadd, const struct room_member_in *remove, size_t nremove, cw_errmsg *e)
{
	/* The operator sees who changed a room's members. */
	json_t *details =
		json_pack("{s:o, s:o}", "add", member_uris(add, nadd), "remove", member_uris(remove, nremove));
	char *dj = details ? json_dumps(details, JSON_COMPACT) : NULL;
	json_decref(details);
	if (!dj)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const char *ap[] = { actor, public_id, dj };
	cw_err rc = store_command(c, "INSERT INTO audit_log (actor, action, subject, details) VALUES ($1, "
				     "'room.members', $2, $3::jsonb)", 3, ap, e);
	free(dj);
	return rc;
}

/* The room a peer changes the members of (id, kind): one where a user of
 * the peer ($2, its row id) is joined. */
#define MEMBER_ROOM_SQL \
	"SELECT r.id, r.kind FROM rooms r WHERE r.public_id = $1 AND EXISTS (SELECT 1 FROM room_members m " \
	"JOIN identities i ON i.id = m.identity_id WHERE m.room_id = r.id AND i.peer_id = $2::bigint " \
	"AND m.membership = 'joined')"

/* Whom a peer may add to a group: its own users always; in a group hosted
 * by a peer (rooms.hub_domain another provider's), that peer alone adds
 * users of other providers (this one's included), the others only their
 * own; in a group hosted here, the caller adds its own users and this
 * provider's (who are invited: RECIPIENT_MEMBER_SQL), not a third peer's,
 * who never asked to be in it (403 not_allowed; since the thirty-first
 * session, a review's finding: any member peer could add anyone, and run
 * another peer's group).  Asked after members_decide, whose refusals are
 * audited with their reason. */
static cw_err members_add_allowed(PGconn *c, struct app_job *j, const struct peer_principal *p, const char *room_id,
				  const char *our_domain, const struct room_member_in *m, size_t n,
				  const struct member_class *cls, cw_errmsg *e)
{
	const char *rp[] = { room_id };
	PGresult *r = exec(c, "SELECT hub_domain FROM rooms WHERE id = $1::bigint", 1, rp);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	bool caller_hub = PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), p->domain) == 0;
	bool here_hub = PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), our_domain) == 0;
	PQclear(r);
	for (size_t i = 0; i < n; i++) {
		if (strcmp(m[i].u.domain, p->domain) == 0 || caller_hub || (cls[i].local && here_hub))
			continue;
		app_job_fail(j, 403, "not_allowed", "%s: %s", m[i].uri,
			     cls[i].local ? "only the group's host adds this provider's users to it"
					  : "a peer adds only its own users to a group it does not host");
		LOG_KV_LIMITED(CW_LOG_INFO, "a peer's member added refused: not its own user", "peer", p->name, "member",
			       m[i].uri);
		return CW_OK;
	}
	return CW_OK;
}

/* An add is refused, before the charge and any write, under the room's
 * lock: when it names a user banned from the group (403 not_allowed
 * naming her: a ban is this provider's, made and lifted by its operator
 * alone, and no peer's add lifts it, as none of its removals does; since
 * the forty-sixth session: until then the add made her joined again, while
 * her own join was refused), and when it would take the group past
 * rooms.max_members (ROOM_MEMBERS_BOUND): counted, the members after the
 * change (joined or invited: the members now and the users added, less
 * the users removed) against the bound, and against the members before,
 * so that a change that shrinks a group above the bound (made before it,
 * or the bound lowered since) is taken. */
static cw_err members_admit(PGconn *c, struct app_job *j, const char *room_id, const struct members_input *in,
			    cw_errmsg *e)
{
	json_t *a = member_uris(in->add, in->nadd), *r = member_uris(in->remove, in->nremove);
	char *aj = a ? json_dumps(a, JSON_COMPACT) : NULL, *rj = r ? json_dumps(r, JSON_COMPACT) : NULL;
	json_decref(a);
	json_decref(r);
	cw_err rc = CW_OK;
	if (!aj || !rj) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	const char *params[] = { room_id, aj, rj };
	PGresult *res = exec(c,
		"WITH m AS (SELECT i.uri FROM room_members x JOIN identities i ON i.id = x.identity_id "
		"  WHERE x.room_id = $1::bigint AND x.membership IN ('joined', 'invited')) "
		"SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM (SELECT uri FROM m UNION "
		"  SELECT u FROM jsonb_array_elements_text($2::jsonb) AS a(u)) y "
		"  WHERE y.uri NOT IN (SELECT u FROM jsonb_array_elements_text($3::jsonb) AS r(u))), "
		"(SELECT i.uri FROM room_members x JOIN identities i ON i.id = x.identity_id WHERE x.room_id = $1::bigint "
		"  AND x.membership = 'banned' AND i.uri IN (SELECT u FROM jsonb_array_elements_text($2::jsonb) AS a(u)) "
		"  ORDER BY 1 LIMIT 1)", 3, params);
	if ((rc = store_check(c, res, PGRES_TUPLES_OK, e)))
		goto out;
	long before = atol(PQgetvalue(res, 0, 0)), after = atol(PQgetvalue(res, 0, 1));
	long max = j->app->cfg->rooms_max_members;
	if (!PQgetisnull(res, 0, 2)) {
		app_job_fail(j, 403, "not_allowed", "%s: banned from this group", PQgetvalue(res, 0, 2));
		LOG_KV_LIMITED(CW_LOG_INFO, "a peer's add refused: the member is banned from the group", "peer",
			       in->p->name, "room", in->public_id);
	}
	PQclear(res);
	if (!j->err_code && after > max && after > before) {
		app_job_fail(j, 413, "too_large", ROOM_MEMBERS_BOUND, max);
		LOG_KV_LIMITED(CW_LOG_INFO, "a peer's add refused: the group would pass rooms.max_members", "peer",
			       in->p->name, "room", in->public_id);
	}
out:
	free(aj);
	free(rj);
	return rc;
}

static cw_err members_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct members_input *in = j->data;
	char pid[24];
	snprintf(pid, sizeof(pid), "%lld", (long long)in->p->id);
	const char *rp[] = { in->public_id, pid };
	cw_err rc;
	if (in->nadd && ((rc = caller_decide(c, j, in->p, in->public_id, "member_add", e)) || j->err_code))
		return rc;
	/* The caller first, without the room's lock: a peer none of whose
	 * users is in the room (404, as for a room it cannot see) or a direct
	 * room (400) keeps none of the room's writers waiting (until the
	 * twenty-sixth session the lock came first, and any peer that named a
	 * group's id held its writes for a group commit).  Then the lock, and
	 * the same look again under it: the peer's last user may have left
	 * meanwhile (each statement reads what is committed when it starts). */
	char room_id[24];
	rc = room_members_target(c, j, exec(c, MEMBER_ROOM_SQL, 2, rp), "unknown_room", "no such room", room_id,
					e);
	if (rc || j->err_code || (rc = room_members_lock(c, in->public_id, e)))
		return rc;
	PGresult *r = exec(c, MEMBER_ROOM_SQL " FOR UPDATE", 2, rp);
	if ((rc = room_members_target(c, j, r, "unknown_room", "no such room", room_id, e)) || j->err_code)
		return rc;
	static _Thread_local struct member_class cls[ROOM_MEMBERS_MAX];
	if ((rc = classify_members(c, j, in->p, in->domain, in->add, in->nadd, cls, e)) || j->err_code)
		return rc;
	if ((rc = members_decide(c, j, in->add, in->nadd, cls, NULL, in->public_id, e)) || j->err_code)
		return rc;
	if ((rc = members_add_allowed(c, j, in->p, room_id, in->domain, in->add, in->nadd, cls, e)) || j->err_code)
		return rc;
	if (in->nadd && ((rc = members_admit(c, j, room_id, in, e)) || j->err_code))
		return rc;
	/* An add is charged (a remove alone is not: a peer takes its users
	 * out whatever the limits, and without adds it has no one to take
	 * out again). */
	if (in->nadd && ((rc = change_limit(c, j, in->p, in->public_id, "member_add", &in->charge, e)) || j->err_code))
		return rc;
	bool invited[ROOM_MEMBERS_MAX];
	for (size_t i = 0; i < in->nadd; i++) {
		char ident[24];
		if ((rc = identity_id(c, &in->add[i].u, cls[i].local, cls[i].network,
				      cls[i].peer_id[0] ? cls[i].peer_id : NULL, ident, sizeof(ident), e)))
			return rc;
		/* One joined already is no change (since the twenty-fifth
		 * session not written again, no event telling of it).  A local
		 * user is invited (RECIPIENT_MEMBER_SQL): no change either when
		 * she is invited already, or left while only invited (her
		 * decline is not the peer's to learn, not even by a change).
		 * One banned was refused (members_admit, under the room's
		 * lock); the statement keeps her out all the same. */
		const char *mp[] = { room_id, ident, cls[i].local ? "invited" : "joined" };
		r = exec(c, "INSERT INTO room_members (room_id, identity_id, membership, peer_invited) VALUES ($1::bigint, "
			    "$2::bigint, $3, $3 = 'invited') ON CONFLICT (room_id, identity_id) DO UPDATE SET "
			    "membership = $3, peer_invited = $3 = 'invited', updated_at = now() "
			    "WHERE room_members.membership NOT IN ('joined', 'banned') AND room_members.membership <> $3 "
			    "AND NOT (room_members.membership = 'left' AND room_members.peer_invited) RETURNING 1", 3, mp);
		if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
			return rc;
		in->added[i] = PQntuples(r) > 0;
		invited[i] = in->added[i] && cls[i].local;
		in->added[i] = in->added[i] && !cls[i].local;
		PQclear(r);
	}
	/* The group's other peers are told (this one knows what it did):
	 * each change as the member's membership event, by this peer's
	 * domain, joins (a local user's invitation: an invite) before leaves
	 * as made. */
	char actor[PEER_NAME_MAX + 8];
	snprintf(actor, sizeof(actor), "peer:%s", in->p->name);
	const struct room_members_change ch = { .room_id = room_id, .by = in->p->domain, .origin = actor,
						.except_peer = pid };
	if ((rc = room_members_events(c, &ch, "join", in->add, in->nadd, in->added, e)) ||
	    (rc = room_members_events(c, &ch, "invite", in->add, in->nadd, invited, e)) ||
	    (rc = room_members_remove(c, room_id, in->remove, in->nremove, in->removed, e)) ||
	    (rc = room_members_events(c, &ch, "leave", in->remove, in->nremove, in->removed, e)))
		return rc;
	if ((rc = room_members_audit(c, actor, in->public_id, in->add, in->nadd, in->remove, in->nremove, e)))
		return rc;
	json_t *removed = member_uris(in->remove, in->nremove);
	char *rj = removed ? json_dumps(removed, JSON_COMPACT) : NULL;
	json_decref(removed);
	rc = rj ? room_state(c, j, in->public_id, in->p->id, false, rj, e) : cw_fail(e, CW_ENOMEM, "out of memory");
	free(rj);
	return rc;
}

bool peer_read_users(const struct cw_app *app, struct cw_req *req, json_t *arr, const char *what,
		     struct room_member_in *out, size_t *n)
{
	*n = 0;
	if (!arr)
		return true;
	if (!json_is_array(arr) || json_array_size(arr) > ROOM_MEMBERS_MAX) {
		char d[96];
		snprintf(d, sizeof(d), "%s must be an array of at most %d user URIs", what, ROOM_MEMBERS_MAX);
		cw_req_problem(req, 400, "invalid_body", "Invalid body", d);
		return false;
	}
	for (size_t i = 0; i < json_array_size(arr); i++) {
		json_t *v = json_array_get(arr, i);
		cw_errmsg e;
		if (!json_is_string(v) || mimi_uri_parse(json_string_value(v), &out[i].u, &e) || out[i].u.kind != MIMI_USER) {
			char d[96];
			snprintf(d, sizeof(d), "every entry of %s must be a user URI mimi://<domain>/u/<local>", what);
			cw_req_problem(req, 400, "invalid_body", "Invalid body", d);
			return false;
		}
		snprintf(out[i].uri, sizeof(out[i].uri), "%s", json_string_value(v));
		peer_local_fold(app, &out[i].u, out[i].uri);
		char why[MIMI_URI_MAX + 300];
		if (peer_local_refused(app, &out[i].u, out[i].uri, why, sizeof(why))) {
			cw_req_problem(req, 400, "invalid_body", "Invalid body", why);
			return false;
		}
	}
	*n = json_array_size(arr);
	return true;
}

/* The body of a request about /v1/rooms/{room} (*room: its public id), or
 * NULL when it was answered (the API off, no such room id, not JSON). */
/* The room a /v1/rooms/{room} request names (answered, NULL, when the API
 * is off or the id is not one a room can have: as for an unknown room). */
static const char *room_param(struct cw_app *app, struct cw_req *req)
{
	if (!peer_api_enabled(app, req))
		return NULL;
	const char *room = cw_req_param(req, "room");
	if (!room_public_id_valid(room)) {
		cw_req_problem(req, 404, "unknown_room", "Unknown room", "no such room");
		return NULL;
	}
	return room;
}

static json_t *room_request(struct cw_app *app, struct cw_req *req, const char **room)
{
	*room = room_param(app, req);
	return *room ? app_json_body(req) : NULL;
}


void peer_api_room_members(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	const char *room;
	json_t *body = room_request(app, req, &room);
	if (!body)
		return;
	struct members_input *in = calloc(1, sizeof(*in));
	if (!in) {
		json_decref(body);
		cw_req_no_memory(req);
		return;
	}
	if (!peer_read_users(app, req, json_object_get(body, "add"), "add", in->add, &in->nadd) ||
	    !peer_read_users(app, req, json_object_get(body, "remove"), "remove", in->remove, &in->nremove)) {
		json_decref(body);
		free(in);
		return;
	}
	json_decref(body);
	if (in->nadd + in->nremove == 0) {
		free(in);
		cw_req_problem(req, 400, "invalid_body", "Invalid body", "add or remove at least one user");
		return;
	}
	in->p = cw_req_principal(req);
	/* A peer takes its own users out of a room, nobody else's: not this
	 * provider's, not another provider's (they leave through their own
	 * provider). */
	for (size_t i = 0; i < in->nremove; i++)
		if (strcmp(in->remove[i].u.domain, in->p->domain) != 0) {
			char d[MIMI_DOMAIN_MAX + 96];
			snprintf(d, sizeof(d), "remove may only name users of your own domain (%s)", in->p->domain);
			free(in);
			cw_req_problem(req, 400, "invalid_body", "Invalid body", d);
			return;
		}
	/* One user both added and removed is no change anyone can mean:
	 * until the fifty-first session it was taken, and the group's other
	 * peers were sent her join and then her leave. */
	for (size_t i = 0; i < in->nremove; i++)
		for (size_t k = 0; k < in->nadd; k++)
			if (strcasecmp(in->remove[i].u.domain, in->add[k].u.domain) == 0 &&
			    strcmp(in->remove[i].u.id, in->add[k].u.id) == 0) {
				char d[MIMI_URI_MAX + 64];
				snprintf(d, sizeof(d), "%s is in both add and remove", in->remove[i].uri);
				free(in);
				cw_req_problem(req, 400, "invalid_body", "Invalid body", d);
				return;
			}
	snprintf(in->public_id, sizeof(in->public_id), "%s", room);
	snprintf(in->domain, sizeof(in->domain), "%s", app->cfg->domain);
	app_job_run(app, req, members_fn, in, free, true);
}

void peer_api_room_get(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	const char *room = room_param(app, req);
	if (!room)
		return;
	struct room_get_input *in = calloc(1, sizeof(*in));
	if (!in) {
		cw_req_no_memory(req);
		return;
	}
	snprintf(in->public_id, sizeof(in->public_id), "%s", room);
	in->peer_id = ((struct peer_principal *)cw_req_principal(req))->id;
	app_job_run(app, req, room_get_fn, in, free, false);
}

/* PATCH /v1/rooms/{room}: {"name": "..." | null}, a group's new name (or
 * none), by a peer with a member in it; the local networks show it within
 * a second or so (the Matrix bot renames the portals, the XMPP rooms'
 * occupants get a new subject). */
struct rename_input {
	char public_id[80];
	char domain[MIMI_DOMAIN_MAX + 1]; /* this provider's */
	const struct peer_principal *p; /* borrowed from the request */
	char *name; /* NULL: none */
	struct change_charge charge;
};

static void rename_input_free(void *arg)
{
	struct rename_input *in = arg;
	free(in->name);
	free(in);
}

static cw_err rename_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct rename_input *in = j->data;
	cw_err rc = caller_decide(c, j, in->p, in->public_id, "rename", e);
	if (rc || j->err_code)
		return rc;
	char pid[24];
	snprintf(pid, sizeof(pid), "%lld", (long long)in->p->id);
	const char *params[] = { in->public_id, pid };
	/* The group, one with a user of the caller's joined, and its host. */
	PGresult *r = exec(c,
		"SELECT r.hub_domain FROM rooms r WHERE r.public_id = $1 AND r.kind = 'group' "
		"AND EXISTS (SELECT 1 FROM room_members m JOIN identities i ON i.id = m.identity_id "
		"WHERE m.room_id = r.id AND i.peer_id = $2::bigint AND m.membership = 'joined') FOR UPDATE",
		2, params);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	if (PQntuples(r) != 1) {
		PQclear(r);
		app_job_fail(j, 404, "unknown_room", "no such group");
		return CW_OK;
	}
	/* A group a peer hosts is that peer's to name (since the thirty-first
	 * session; before, any member peer renamed it: a review's finding). */
	bool allowed = strcmp(PQgetvalue(r, 0, 0), in->domain) == 0 || strcmp(PQgetvalue(r, 0, 0), in->p->domain) == 0;
	PQclear(r);
	if (!allowed) {
		app_job_fail(j, 403, "not_allowed", "only the provider that hosts this group renames it");
		return CW_OK;
	}
	if ((rc = change_limit(c, j, in->p, in->public_id, "rename", &in->charge, e)) || j->err_code)
		return rc;
	/* The Matrix bot, which renames the group's portals, is woken at the
	 * commit (since the forty-fifth session; before, it saw the rename at
	 * its next round, up to half a second later when idle); the payload
	 * says why, for whoever watches (the bot reads none). */
	const char *up[] = { in->public_id, in->name };
	r = exec(c,
		 "WITH u AS (UPDATE rooms SET name = $2, updated_at = now() WHERE public_id = $1 RETURNING id) "
		 "SELECT pg_notify('causeway_matrix_bot', 'rename') FROM u WHERE EXISTS (SELECT 1 FROM room_bindings b "
		 "WHERE b.room_id = u.id AND b.network = 'matrix')", 2, up);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	PQclear(r);
	return room_state(c, j, in->public_id, in->p->id, false, NULL, e);
}

void peer_api_room_rename(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	const char *room;
	json_t *body = room_request(app, req, &room);
	if (!body)
		return;
	json_t *name = json_object_get(body, "name");
	const char *bad = NULL;
	if (!name)
		bad = "name is required (a string, or null for none)";
	else if (!json_is_null(name) && !room_name_valid(name))
		bad = ROOM_NAME_RULE ", or null";
	struct rename_input *in = bad ? NULL : calloc(1, sizeof(*in));
	bool oom = !bad && (!in || (json_is_string(name) && !(in->name = strdup(json_string_value(name)))));
	json_decref(body);
	if (bad || oom) {
		if (in)
			rename_input_free(in);
		if (oom)
			cw_req_no_memory(req);
		else
			cw_req_problem(req, 400, "invalid_body", "Invalid body", bad);
		return;
	}
	snprintf(in->public_id, sizeof(in->public_id), "%s", room);
	in->p = cw_req_principal(req);
	snprintf(in->domain, sizeof(in->domain), "%s", app->cfg->domain);
	app_job_run(app, req, rename_fn, in, rename_input_free, true);
}

/* ------------------------------------------------------------ messages */

struct msg_input {
	struct peer_principal *p; /* borrowed from the request (peer submits) */
	int64_t caller_peer;          /* the submitting peer (its users are not sent the event back); 0: none */
	char sender_domain[256];
	char sender_network[PEER_NAME_MAX + 8];
	bool local_sender;            /* from a local adapter (Matrix, XMPP): outbound */
	char native_id[MX_NATIVE_MAX + 1]; /* the event's id on its network, or "" */
	char scope[PEER_NAME_MAX + 8];
	char *idem_key;
	char *nonces;                 /* a peer's item without an Idempotency-Key: its signatures' nonces,
				       claimed by the write (PEER_NONCES), JSON; else NULL */
	int64_t nonces_stale;         /* and the created below which the peer's claims are forgotten */
	unsigned char hash[32];
	unsigned char hash_old[32];   /* the same request as stored before the sixteenth session, once
				       hash_old_set (item_hash_old) */
	bool hash_old_set;
	unsigned char hash_spelled[32]; /* as stored in the forty-second session: its `by` respelled */
	bool spelled;                 /* hash_spelled is set (membership_by_spelled) */
	char room[MIMI_URI_MAX + 1]; /* public id, or URI in a batch */
	char body_room[MIMI_URI_MAX + 1]; /* the room the body names, if any */
	char msg_id[80];
	char sender[MIMI_URI_MAX + 1];
	char type[16];
	char *event_text;             /* the validated body, unknown members included: compact JSON, keys sorted */
	bool read_receipt;            /* a "read" receipt: marks the message read for its sender */
	bool invitation;              /* a membership event inviting someone */
	bool leave;                   /* a membership event of its sender's leaving (a peer's: leaves, submit_leave) */
	bool join;                    /* ... of her joining (a peer's who is not joined: joins, submit_join) */
	char block_target[MIMI_URI_MAX + 1]; /* a block: whom the sender blocks ("" for other types) */
	bool unblock;                 /* ... or no longer blocks */
	struct cw_req *req;           /* coalesced single submits: the request to answer */
	struct msg_input *next;       /* in the coalescing queue */
	char in_reply_to[80];
	char replaces[80];
	char ts[24];
	struct cw_app *app;
	size_t body_bytes;
	uint64_t attachment_bytes;
	unsigned kinds;
	int64_t expires;              /* content.expires (ms), 0: none */
};

static void msg_input_from_peer(struct msg_input *in, struct peer_principal *p)
{
	in->p = p;
	in->caller_peer = p->id;
	snprintf(in->sender_domain, sizeof(in->sender_domain), "%s", p->domain);
	snprintf(in->scope, sizeof(in->scope), "peer:%s", p->name);
	snprintf(in->sender_network, sizeof(in->sender_network), "peer:%s", p->name);
}

static void msg_input_free(void *arg)
{
	struct msg_input *in = arg;
	free(in->idem_key);
	free(in->nonces);
	free(in->event_text);
	free(in);
}

/* An item's request, for its Idempotency-Key: the event as sent (sorted,
 * compact).  The room is compared apart, resolved (submit_decide): a
 * request names it by public id (/messages) or URI (/batch), and the same
 * event sent both ways is the same request (before the sixteenth session
 * the room's spelling was in the hash, and that was a 409). */
static void request_hash(const char *text, unsigned char out[32])
{
	cw_sha256(text ? text : "", text ? strlen(text) : 0, out);
}

/* The same request as a key stored before the sixteenth session holds it
 * (the room as spelled, then the event): no migration rewrote those, and a
 * retry across the upgrade is the same request, not a 409. */
static void request_hash_old(const char *room, const char *text, unsigned char out[32])
{
	cw_sha256_pair(room, strlen(room), text ? text : "", text ? strlen(text) : 0, out);
}

/* An item's hash_old, made when first asked for: only a key answered
 * before (submit_decide) compares it, and until the sixtieth session every
 * item hashed its room and event a second time for it on the HTTP thread
 * (0.3 % of the daemon's samples in tests/bench/single).  Its room and
 * event as the request named and sent them: made at once where the item
 * keeps neither (msg_input_from_event, membership_by_spelled). */
static void item_hash_old_of(struct msg_input *in, const char *room)
{
	request_hash_old(room, in->event_text, in->hash_old);
	in->hash_old_set = true;
}

static const unsigned char *item_hash_old(struct msg_input *in)
{
	if (!in->hash_old_set)
		item_hash_old_of(in, in->room);
	return in->hash_old;
}

/* A typing notification as stored and sent: its type, sender, room, ts,
 * content.state and content.in_reply_to (one typing a reply to that
 * message), nothing else (NULL: out of memory).  It is a moment's state,
 * and every one is a row kept until retention.rows_days (off by default):
 * until the thirtieth session its unknown members were stored with it (20
 * of 30 KB each: 600 KB kept for ever, r4).  in_reply_to is checked as
 * every event's is (a message of the room, else 400) and stored as the
 * row's in_reply_to_id: until the forty-sixth session it was then left out
 * of the content, dropped in silence (a review's finding). */
static char *typing_text(const struct event *ev)
{
	static const char *const keep[] = { "type", "sender", "room", "ts" };
	json_t *t = json_object(), *c = json_object();
	for (size_t i = 0; t && i < CW_ARRAY_LEN(keep); i++) {
		json_t *v = json_object_get(ev->json, keep[i]);
		if (v)
			json_object_set(t, keep[i], v);
	}
	json_t *content = json_object_get(ev->json, "content");
	json_t *state = json_object_get(content, "state"), *reply = json_object_get(content, "in_reply_to");
	char *text = NULL;
	if (t && c && state && json_object_set(c, "state", state) == 0 &&
	    (!json_is_string(reply) || json_object_set(c, "in_reply_to", reply) == 0) &&
	    json_object_set(t, "content", c) == 0)
		text = json_dumps(t, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(c);
	json_decref(t);
	return text;
}

/* What every item takes from its validated event: the room as the request
 * names it (public id, URI or native id), the sender, and the event (a
 * typing notification's state only, typing_text), whose text it takes
 * over (ev->text is NULL after: every caller frees the event next, and
 * copying it was one allocation and copy an event for nothing); msg_id:
 * the message id its adapter gave it, or NULL for a new one. */
static void msg_input_from_event(struct msg_input *in, struct cw_app *app, const char *room, const char *sender,
				 struct event *ev, const char *msg_id)
{
	in->app = app;
	cw_copy_cut(in->room, sizeof(in->room), room);
	/* Serialised here, on the HTTP thread: the writer only splices it into
	 * its statement (NULL on allocation failure: the writer refuses it). */
	in->event_text = ev->text ? ev->text : json_dumps(ev->json, JSON_COMPACT | JSON_SORT_KEYS);
	ev->text = NULL;
	request_hash(in->event_text, in->hash);
	in->hash_old_set = false;
	if (ev->type == EVENT_TYPING || strlen(room) >= sizeof(in->room)) /* text replaced below; room cut */
		item_hash_old_of(in, room);
	if (ev->type == EVENT_TYPING && in->event_text) {
		free(in->event_text);
		in->event_text = typing_text(ev);
	}
	if (msg_id)
		cw_copy_cut(in->msg_id, sizeof(in->msg_id), msg_id);
	else
		cw_new_id(in->msg_id, sizeof(in->msg_id), "msg_");
	cw_copy_cut(in->sender, sizeof(in->sender), sender);
	cw_copy_cut(in->type, sizeof(in->type), event_type_name(ev->type));
	cw_copy_cut(in->in_reply_to, sizeof(in->in_reply_to), ev->in_reply_to ? ev->in_reply_to : "");
	cw_copy_cut(in->replaces, sizeof(in->replaces), ev->replaces ? ev->replaces : "");
	in->ts[outbox_put_ll(in->ts, (long long)(ev->ts ? ev->ts : cw_wall_ms()))] = '\0';
	in->body_bytes = ev->body_bytes;
	in->expires = ev->type == EVENT_MESSAGE ? ev->expires : 0;
	in->attachment_bytes = ev->attachment_bytes;
	in->kinds = ev->kinds;
	in->read_receipt = ev->type == EVENT_RECEIPT && ev->receipt == EVENT_RECEIPT_READ;
	in->invitation = ev->type == EVENT_MEMBERSHIP && ev->membership == EVENT_MEMBERSHIP_INVITE;
	in->leave = ev->type == EVENT_MEMBERSHIP && ev->membership == EVENT_MEMBERSHIP_LEAVE;
	in->join = ev->type == EVENT_MEMBERSHIP && ev->membership == EVENT_MEMBERSHIP_JOIN;
	in->block_target[0] = '\0';
	cw_errmsg ignored;
	if (ev->type == EVENT_BLOCK && ev->has_target) {
		struct mimi_uri target = ev->target;
		if (mimi_uri_format(&target, in->block_target, sizeof(in->block_target), &ignored) != CW_OK)
			in->block_target[0] = '\0';
		else
			peer_local_fold(app, &target, in->block_target); /* the content keeps the peer's spelling */
	}
	in->unblock = ev->unblock;
}

/* ------------------------------------------------------------ submitting
 *
 * Submitting events is a pipelined write (store_pipe_ops): round 0 reads,
 * for every event of the request, its room, the room's members, a stored
 * answer for its idempotency key and the events it refers to, in one
 * statement each; the policy then decides in C for each recipient; round 1
 * writes each accepted event with its outbox rows and idempotency key in
 * one statement.  So a batch of 100 events costs two round trips to the
 * database, plus BEGIN and COMMIT shared with the rest of the group commit. */

/* The outcome of one submitted event (a request, or an item of a batch). */
struct item_result {
	int status;
	const char *code;  /* NULL: accepted */
	char detail[256];
	json_t *body;      /* the accepted answer */
	int64_t retry_after_ms; /* 429 */
	const char *denied; /* a local user's item that reaches none of its recipients: the policy's reason */
	unsigned denied_kinds; /* and for content_kind_disabled, the kinds refused (policy_decision_text) */
};

/* The codes of a 409: the Idempotency-Key was used with another request
 * (for good: "conflict"), or a request with it was being written at the
 * same time (retry it: then it gets the first one's answer).  One code
 * for both until the thirtieth session. */
#define CONFLICT_RETRY "in_progress"

static void item_fail(struct item_result *res, int status, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static void item_fail(struct item_result *res, int status, const char *code, const char *fmt, ...)
{
	res->status = status;
	res->code = code;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(res->detail, sizeof(res->detail), fmt, ap);
	va_end(ap);
}

/* Who an item's pending rows are for. */
#define WAKE_DISPATCHER 0x1u /* push peers and local adapters */
#define WAKE_PULL 0x2u       /* pull peers (GET /v1/events) */

struct submit {
	struct cw_app *app;
	size_t n;
	struct msg_input **items;   /* NULL where an item was refused before the store */
	struct item_result *res;    /* n results */
	bool *write;                /* item i goes to round 1 */
	char (*room_id)[24];
	char (*sender_id)[24];
	char (*reply_id)[24];       /* the events' ids of the references, or "#j": item j of this job */
	char (*replaces_id)[24];
	json_t **dests, **targets;  /* per item, for its outbox rows */
	json_t **states;            /* per item: each row's state (pending, held, dropped) */
	json_t **held;              /* per item: local users to ask for consent (NULL: none) */
	json_t **ask;               /* per item: those of them it may make a new request of (NULL: none
				       stands): the write counts them against their bound, under
				       their locks (lock_users_send, CONSENT_ASK_SQL) */
	unsigned *given;            /* per item: the tokens of its sender's consent requests given
				       back, once each, for pairs the write held unasked (give_back;
				       kept across runs again of round 1, cleared with round 0's) */
	struct policy_rate_ledger ledger; /* the tokens round 0's decisions took: given back before
				       it runs again (items_send), so that a job is charged once;
				       an item's own (its memo's ledger_item: i) when the write
				       refuses it (refused_give_back) */
	bool *decided;              /* per item: round 0 decided it to be written (its tokens taken) */
	json_t **outbound;          /* per item: remote users a local sender wrote to (consent to their replies; NULL: none) */
	bool *wrote;                /* per item: a local sender's message to members of a group new to them (they may reply there) */
	bool *scrub;                /* per item: no recipient will get it (or an edit of an expired message): keep no content */
	unsigned char *wake;        /* per item: who its pending rows are for (WAKE_*) */
	bool *grp;                  /* per item: its room is a group (its members may change: GROUP_JM) */
	bool notified;              /* round 1 sent a NOTIFY */
	bool locked;                /* round 1 sent submit_lock_rooms first */
	bool left;                  /* round 1 sent submit_leave after the write (leaves_send) */
	bool joined;                /* round 1 sent submit_join before the write (joins_send) */
	bool *joins;                /* per item: its sender, not joined, joins the group with it (joins_send) */
	bool ulocked;               /* round 1 sent submit_lock_users first (before the rooms') */
	char *uids;                 /* the users' ids it sent (malloc'd) */
	char *first;                /* the users whose locks a run again takes first, before any
				       other of its transaction (store_pipe_ops.first_locks): one
				       was taken elsewhere while the transaction held others */
	json_t *audit;              /* the policy decisions to record (round 1) */
	int nfacts;                 /* round 0's result: its first nfacts rows are facts rows (n = -2) */
	enum submit_room_by room_by; /* how items name their rooms */
	bool no_answers;            /* a local adapter: it reads statuses, not the accepted answers */
	json_t *refused;            /* batch: per item, the problem object of a refused item, or null */
	json_t *keys;               /* batch: per item, its idempotency key, or null */
};

static void submit_clear_round(struct submit *b)
{
	for (size_t i = 0; i < b->n; i++) {
		json_decref(b->res[i].body);
		memset(&b->res[i], 0, sizeof(b->res[i]));
		json_decref(b->dests[i]);
		json_decref(b->targets[i]);
		json_decref(b->states[i]);
		json_decref(b->held[i]);
		json_decref(b->ask[i]);
		json_decref(b->outbound[i]);
		b->dests[i] = b->targets[i] = b->states[i] = b->held[i] = b->ask[i] = b->outbound[i] = NULL;
		b->write[i] = false;
		b->scrub[i] = false;
		b->wrote[i] = false;
		b->wake[i] = 0;
		b->grp[i] = false;
		b->joins[i] = false;
		b->given[i] = 0;
		b->decided[i] = false;
	}
	json_array_clear(b->audit);
}

void submit_free(void *arg)
{
	struct submit *b = arg;
	submit_clear_round(b);
	for (size_t i = 0; i < b->n; i++)
		if (b->items[i])
			msg_input_free(b->items[i]);
	free(b->items);
	free(b->res);
	free(b->write);
	free(b->room_id);
	free(b->sender_id);
	free(b->reply_id);
	free(b->replaces_id);
	free(b->dests);
	free(b->targets);
	free(b->states);
	free(b->held);
	free(b->ask);
	free(b->outbound);
	free(b->scrub);
	free(b->wrote);
	free(b->wake);
	free(b->grp);
	free(b->joins);
	free(b->given);
	free(b->decided);
	free(b->uids);
	free(b->first);
	policy_rate_ledger_free(&b->ledger); /* what the job took stays taken */
	json_decref(b->audit);
	json_decref(b->refused);
	json_decref(b->keys);
	free(b);
}

struct submit *submit_new(size_t n)
{
	struct submit *b = calloc(1, sizeof(*b));
	if (!b)
		return NULL;
	size_t m = n ? n : 1;
	b->n = n;
	b->items = calloc(m, sizeof(*b->items));
	b->res = calloc(m, sizeof(*b->res));
	b->write = calloc(m, sizeof(*b->write));
	b->room_id = calloc(m, sizeof(*b->room_id));
	b->sender_id = calloc(m, sizeof(*b->sender_id));
	b->reply_id = calloc(m, sizeof(*b->reply_id));
	b->replaces_id = calloc(m, sizeof(*b->replaces_id));
	b->dests = calloc(m, sizeof(*b->dests));
	b->targets = calloc(m, sizeof(*b->targets));
	b->states = calloc(m, sizeof(*b->states));
	b->held = calloc(m, sizeof(*b->held));
	b->ask = calloc(m, sizeof(*b->ask));
	b->outbound = calloc(m, sizeof(*b->outbound));
	b->scrub = calloc(m, sizeof(*b->scrub));
	b->wrote = calloc(m, sizeof(*b->wrote));
	b->wake = calloc(m, sizeof(*b->wake));
	b->grp = calloc(m, sizeof(*b->grp));
	b->joins = calloc(m, sizeof(*b->joins));
	b->given = calloc(m, sizeof(*b->given));
	b->decided = calloc(m, sizeof(*b->decided));
	b->audit = json_array();
	b->refused = json_array();
	b->keys = json_array();
	if (!b->items || !b->res || !b->write || !b->room_id || !b->sender_id || !b->reply_id || !b->replaces_id ||
	    !b->dests || !b->targets || !b->states || !b->held || !b->ask || !b->outbound || !b->scrub || !b->wrote || !b->wake ||
	    !b->grp || !b->joins || !b->given || !b->decided || !b->audit) {
		submit_free(b);
		return NULL;
	}
	return b;
}

/* The members an event of a room is decided for: the joined ones, and the
 * local users a peer put into a group who have not taken part yet (invited,
 * peer_invited: schema/037), for whom a remote sender's event is decided
 * as any inbound one (held, denied by her opt-in) and to whom a local
 * member's is not relayed (submit_decide); they send nothing (the sender
 * of an event must be joined: round 0, GROUP_SENDER_GONE).  Since the
 * thirty-first session; before, a peer's local members were joined at
 * once, and the others' messages reached them undecided. */
#define RECIPIENT_MEMBER_SQL(M) \
	"(" M ".membership = 'joined' OR (" M ".membership = 'invited' AND " M ".peer_invited))"

/* Round 0 reads every event of the job in one statement: its room, the
 * event already stored under its idempotency key (events.origin_native_id)
 * if any, and the events it refers to, one row per item (n >= 0, in item
 * order); and the joined members of each room named, once per room (n =
 * -1, first, by room and member id), not once per item: a batch is mostly
 * one room, and its members looked up and sent for each of its items were
 * most of the statement.  Shaped so that any plan, generic ones included
 * (prepared statements, a row count the planner cannot know), can only use
 * index lookups: the lookups are LATERAL subqueries fenced with
 * LIMIT/OFFSET so they are not flattened into hash joins over whole
 * tables, and a reference is found by its public id alone and its room
 * compared after.  A stored event is answered as it was the first time
 * (202, its id and acceptance time).  For the items of remote senders it
 * also reads each local member's opt-in to the sender's network and
 * consent to the sender and its domain (n = -2, first), for
 * facts_catch_up.  A member's row (n = -1) says since when they are a
 * member and, in a group, when they last wrote to members new to them
 * (room_members.wrote_at: the policy's recipient_wrote_here).  An item's
 * row also says when the message it replaces expires (0: it has expired,
 * events.expired; NULL: never), and, for an edit or a reaction (chk: the
 * id it names, content.replaces or content.in_reply_to; absent for every
 * other item, which pays nothing for it), whether that message was
 * deleted (a stored delete names it: events_replaces_idx), by a user: the
 * deletes the expiry sweep makes to take a disappearing message back from
 * the local networks it reached (origin 'gateway', policy_live.c) are not
 * counted, or an edit after the expiry, answered 202 as any edit
 * (late_edit), would tell the peer whether its message reached a local
 * user.  The item of a peer's user's own join (jn) also reads the id of
 * her identity (column 2), for her joining again (joins_send), and the
 * member rows of its room how many members (joined or invited) the room
 * has (column 10, on rooms a join item names only: the bound of
 * rooms.max_members, submit_decide). */
#define READ_ITEMS(ROOM_COND) \
	"WITH items AS (SELECT * FROM json_to_recordset($1::json) " \
	"  AS x(n int, room text, key text, reply text, replaces text, scope text, snd text, net text, dom text, " \
	"  win bigint, chk text, jn boolean)), " \
	"rm AS (SELECT it.room, it.scope, r.id, r.uri, r.kind FROM (SELECT DISTINCT room, scope FROM items) AS it " \
	"  LEFT JOIN LATERAL (SELECT id, uri, kind FROM rooms WHERE " ROOM_COND " LIMIT 1) r ON true) " \
	"SELECT it.n, rm.id, CASE WHEN it.jn THEN (SELECT i.id FROM identities i WHERE i.uri = it.snd) END, " \
	" NULL, NULL::boolean, NULL, NULL::bigint, NULL, NULL, " \
	" encode(k.request_hash, 'hex'), k.public_id, k.ms, " \
	" CASE WHEN it.reply <> '' THEN (SELECT CASE WHEN e.room_id = rm.id THEN e.id END FROM events e " \
	"  WHERE e.public_id = it.reply) END, " \
	" CASE WHEN it.replaces <> '' THEN (SELECT CASE WHEN e.room_id = rm.id THEN e.id END FROM events e " \
	"  WHERE e.public_id = it.replaces) END, " \
	" rm.uri, " \
	" CASE WHEN it.replaces <> '' THEN (SELECT s.uri FROM events e JOIN identities s ON s.id = e.sender_id " \
	"  WHERE e.public_id = it.replaces) END, " \
	" NULL, " \
	" CASE WHEN it.replaces <> '' THEN (SELECT e.type FROM events e WHERE e.public_id = it.replaces) END, " \
	" k.room_id, " \
	" CASE WHEN it.replaces <> '' THEN (SELECT CASE WHEN e.expired THEN 0 ELSE event_expires(e.content) END " \
	"  FROM events e WHERE e.public_id = it.replaces) END, " \
	" CASE WHEN it.chk <> '' THEN EXISTS (SELECT 1 FROM events t JOIN events d ON d.replaces_id = t.id " \
	"  WHERE t.public_id = it.chk AND d.type = 'delete' AND d.origin_network IS DISTINCT FROM 'gateway') END " \
	"FROM items it JOIN rm ON rm.room = it.room AND rm.scope IS NOT DISTINCT FROM it.scope " \
	" LEFT JOIN LATERAL (SELECT coalesce(request_hash, ''::bytea) AS request_hash, public_id, room_id, " \
	"  (extract(epoch FROM accepted_at) * 1000)::bigint AS ms FROM events " \
	"  WHERE origin_network = it.scope AND origin_native_id = it.key LIMIT 1) k ON true " \
	"UNION ALL " \
	"SELECT -1, rm.id, mem.id, mem.uri, mem.is_local, mem.network, mem.peer_id, mem.name, mem.domain, " \
	" mem.joined, rm.members, (extract(epoch FROM mem.updated_at) * 1000)::bigint, NULL, NULL, NULL, NULL, mem.mode, " \
	" CASE WHEN rm.kind = 'group' THEN coalesce(((extract(epoch FROM mem.wrote_at) * 1000)::bigint)::text, '') END, " \
	" NULL::bigint, NULL::bigint, NULL::boolean " \
	"FROM (SELECT x.id, x.kind, CASE WHEN EXISTS (SELECT 1 FROM items ij JOIN rm rj ON rj.room = ij.room " \
	"  AND rj.scope IS NOT DISTINCT FROM ij.scope WHERE ij.jn AND rj.id = x.id) THEN (SELECT count(*) " \
	"  FROM room_members c WHERE c.room_id = x.id AND c.membership IN ('joined', 'invited'))::text END AS members " \
	"  FROM (SELECT DISTINCT id, kind FROM rm WHERE id IS NOT NULL) x OFFSET 0) rm " \
	" JOIN LATERAL (SELECT i.id, i.uri, i.is_local, i.network, i.peer_id, p.name, i.domain, p.mode, m.updated_at, m.wrote_at, " \
	"  CASE WHEN m.membership = 'joined' THEN 't' ELSE 'f' END AS joined " \
	"  FROM room_members m JOIN identities i ON i.id = m.identity_id LEFT JOIN peers p ON p.id = i.peer_id " \
	"  WHERE m.room_id = rm.id AND " RECIPIENT_MEMBER_SQL("m") " OFFSET 0) mem ON true " \
	"UNION ALL " \
	"SELECT -2, rm.id, f.id, it.snd, NULL::boolean, f.uri, NULL::bigint, it.net, it.dom, " \
	" (SELECT CASE WHEN o.opted_in THEN 't' ELSE 'f' END FROM user_optin o " \
	"  WHERE o.identity_id = f.id AND o.network = it.net), " \
	" (SELECT c.state FROM consents c WHERE c.local_identity_id = f.id AND c.subject_kind = 'user' " \
	"  AND c.subject = it.snd), NULL::bigint, NULL::bigint, NULL::bigint, NULL, NULL, " \
	" (SELECT c.state FROM consents c WHERE c.local_identity_id = f.id AND c.subject_kind = 'domain' " \
	"  AND c.subject = it.dom), " \
	" CASE WHEN EXISTS (SELECT 1 FROM consent_requests q JOIN identities s ON s.id = q.remote_identity_id " \
	"  WHERE q.local_identity_id = f.id AND s.uri = it.snd " \
	"  AND " CONSENT_REQUEST_STANDS_SQL("q", "it.win") ") THEN 't' " \
	"  WHEN EXISTS (SELECT 1 FROM consent_requests q JOIN identities s ON s.id = q.remote_identity_id " \
	"  WHERE q.local_identity_id = f.id AND s.uri = it.snd " \
	"  AND " CONSENT_REQUEST_ANSWERED_SQL("q", "it.win") ") THEN 'r' ELSE 'f' END, " \
	" NULL::bigint, NULL::bigint, NULL::boolean " \
	"FROM (SELECT DISTINCT room, scope, snd, net, dom, win FROM items WHERE snd IS NOT NULL) it " \
	" JOIN rm ON rm.room = it.room AND rm.scope IS NOT DISTINCT FROM it.scope AND rm.id IS NOT NULL " \
	" JOIN LATERAL (SELECT i.id, i.uri FROM room_members m JOIN identities i ON i.id = m.identity_id " \
	"  WHERE m.room_id = rm.id AND " RECIPIENT_MEMBER_SQL("m") " AND i.is_local OFFSET 0) f ON true " \
	"ORDER BY 1, 2, 3"

/* Round 1 writes every accepted event of the job in one statement: the
 * events (ids in item order) with their idempotency keys and request
 * hashes, their contents (the texts the HTTP threads serialised, as they
 * are), and their outbox rows (ids in event
 * order, so per-room order holds) in the state the policy gave each
 * (pending, held for consent, dropped).  The full statement also marks
 * what a read receipt reads, asks for consent once per held (local user,
 * sender) pair unless a request is pending or was made within the window
 * and expired unanswered (CONSENT_REQUEST_STANDS_SQL; one she answered
 * and then had lifted asks again, cq.redo: no token of the sender's was
 * taken for it in round 0, may_ask, so none is given back),
 * records the consent that a local user's first outbound
 * message implies, records a block (or its end) that a peer's user sends
 * as a block event (the last one per pair in the job: all of the
 * statement's parts see the same snapshot), tells every process whose
 * facts changed (NOTIFY causeway_policy "x:<xid8>;u:<ids>", the
 * transaction first as policy_notify_user has it: they reload those users'
 * alone, and a process whose view read the change already nothing; a
 * block or its end names the local user blocked, as POST /v1/blocks does:
 * until the fortieth session it made every process reload everything;
 * above 64 users "x:<xid8>" alone, a whole reload where the view in force
 * has not read it; until the fifty-second session without the "x:", so
 * that the process that wrote it loaded it again after a whole load had
 * read it), and writes the audit records of
 * the decisions ($34: they
 * exist for refused items too); a job that needs none of that (the common
 * case: allowed messages) runs the plain statement, which is a third
 * cheaper.  The items are one array parameter per column ($1-$30, in
 * binary form: write_send), the policy's settings the same for every item
 * three scalars ($31-$33).  Round 0's item document ($1) is json, not
 * jsonb: a jsonb parameter is built into a sorted tree when it is bound,
 * which json_to_recordset does not need (a 100-item document: 0.53 ms as
 * json against 0.80 as jsonb, bind included). */
#define IT_ROWS \
	"SELECT x.n::int AS n, x.pid, x.room::bigint AS room, x.sender::bigint AS sender, x.type, " \
	"  x.content::jsonb AS content, x.replaces::bigint AS replaces, x.reply::bigint AS reply, x.ts::bigint AS ts, " \
	"  x.key, x.hash, x.dests, x.targets, x.states, x.held, x.ask, $31::bigint AS expiry, $32::bigint AS win, " \
	"  x.read::boolean AS read, x.scope, x.outbound::jsonb AS outbound, x.wrote::boolean AS wrote, x.bt, x.ba, " \
	"  x.dt::bigint AS dt, $33::bigint AS crl, x.grp::boolean AS grp, x.rpid, x.xpid, " \
	"  x.pp::bigint AS pp, x.pa, x.nn::json AS nn, x.st::bigint AS st " \
	"FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], " \
	"  $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], " \
	"  $16::text[], $17::text[], $18::text[], $19::text[], $20::text[], $21::text[], $22::text[], $23::text[], " \
	"  $24::text[], $25::text[], $26::text[], $27::text[], $28::text[], $29::text[], $30::text[]) AS x(n, pid, " \
	"  room, sender, type, content, replaces, reply, ts, key, hash, dests, targets, states, held, ask, read, scope, " \
	"  outbound, wrote, bt, ba, dt, grp, rpid, xpid, pp, pa, nn, st)"
/* pk: the peers of the job's peers' items (pp: the peer's id, pa: the hex
 * SHA-256 of the token its request came with; absent for a local
 * adapter's item) still in force (PEER_IN_FORCE_SQL of peers.h), their
 * rows locked until the commit FOR KEY SHARE, so that a disable or a
 * rotation waits for the write or the write for it; an item whose peer is
 * not among them is not written (PEER_OK, in ev) and answered 'peer' (401
 * as an unknown token: GONE_ROWS).  The table is asked, not this
 * process's registry, which another process's change reaches only at its
 * next reload: until the forty-seventh session a peer disabled because
 * its token leaked wrote on through the other processes meanwhile.  A
 * lookup by primary key per peer of the job (mostly one), no round trip
 * more. */
#define PEER_KEYS \
	"pk AS MATERIALIZED (SELECT p.id, y.pa AS th FROM (SELECT DISTINCT it.pp, it.pa FROM it " \
	"  WHERE it.pp IS NOT NULL) y JOIN peers p ON p.id = y.pp WHERE " PEER_IN_FORCE_SQL("p", "y.pa") \
	"  FOR KEY SHARE OF p), "
#define PEER_OK "(it.pp IS NULL OR EXISTS (SELECT 1 FROM pk WHERE pk.id = it.pp AND pk.th = it.pa))"
/* A peer's receipt or typing notification sent without an Idempotency-Key
 * (nn: the nonces of its request's signatures, [{nonce, created}]; st:
 * the created below which the peer's claims are forgotten) claims them
 * for every daemon process, as a job's write does (peer_nonce_claim of
 * peers.h: nd forgets the stale ones of its peers, those no other
 * transaction holds; nc claims), and is not written, answered 'replay'
 * (401 bad_signature), unless it claimed every one (NONCES_OK).  Its key,
 * made from the verified signature's nonce, makes a replay with that
 * signature the same request again; a rotating peer signs with two keys,
 * and until the forty-seventh session a capture replayed to another
 * process with the other signature alone made another key, and was
 * stored twice.  A job with no such item inserts and deletes nothing. */
#define PEER_NONCES \
	"nd AS (DELETE FROM signature_nonces WHERE ctid = ANY (ARRAY(SELECT s.ctid FROM signature_nonces s " \
	"  JOIN (SELECT it.pp, min(it.st) AS st FROM it WHERE it.nn IS NOT NULL GROUP BY it.pp) y " \
	"  ON s.peer_id = y.pp AND s.created < y.st FOR UPDATE OF s SKIP LOCKED))), " \
	"nc AS (INSERT INTO signature_nonces (peer_id, nonce, created) SELECT it.pp, x.nonce, x.created " \
	"  FROM it, json_to_recordset(it.nn) AS x(nonce text, created bigint) WHERE it.nn IS NOT NULL " \
	"  AND " PEER_OK " ON CONFLICT DO NOTHING RETURNING peer_id, nonce), "
#define NONCES_OK \
	"(it.nn IS NULL OR (SELECT count(*) FROM nc WHERE nc.peer_id = it.pp AND nc.nonce IN (SELECT x.nonce " \
	"  FROM json_to_recordset(it.nn) AS x(nonce text))) = json_array_length(it.nn))"
/* lk: the items' rooms are locked first, in id order, until the commit
 * (a transaction-level advisory lock per room, ROOM_LOCK_SQL of store.h): the
 * outbox ids of one room's rows then follow the order in which they were
 * committed, across daemon processes too, and the dispatcher's and the
 * pull's id order is the room's order (before, two processes writing one
 * room could commit a later id first, and a destination got the two
 * events out of order).  ev's one-time filter runs it before any row is
 * made or any outbox id drawn. */
/* rt: the stored events the items name, locked until the commit (FOR KEY
 * SHARE, as a foreign key's check would lock them: the keys of events'
 * references were dropped for speed, schema/005); gn: the items whose
 * reference is not among them, refused (their pid, and which reference).
 * Round 0 found the references by their public ids, before this
 * transaction: the retention sweep (gateway/retention.c) may have deleted
 * one since, and an item stored with it would name no event (before the
 * twenty-first session it was, and was accepted).  The sweep passes over a
 * row so locked (SKIP LOCKED), and a target it holds is waited for, then,
 * deleted, not returned.  A lookup by primary key per distinct target, in
 * the same statement: no round trip more. */
#define REF_GONE(col) "(it." col " IS NOT NULL AND it." col " NOT IN (SELECT id FROM rt))"
/* An edit or a reaction (dt: the stored message it edits or reacts to,
 * deleted_target; absent for every other item) whose message a user's
 * delete names now, refused in gn (ref 'deleted': 400 invalid_body, as
 * round 0 refuses one).  Round 0 checked it already, but against the
 * deletes committed before its read: a delete of the same message in
 * another request (a job before this one in the batch, a batch or a Matrix
 * transaction whose read ran on a reader, another process) could be
 * written in between, and both were taken, the edit stored and pushed
 * after the delete.  Checked again here, under the room's lock, which the
 * delete's write takes too (both name a message of one room), with a
 * snapshot taken after it: a job with such an item takes its rooms' locks
 * in a statement before the write (submit_lock_rooms, as one in a group
 * does; READ COMMITTED: the write's own snapshot is from before it waited
 * on lk).  A delete committed (or written earlier in this transaction)
 * before is seen, and the item refused; one written after waits for the
 * commit, and comes after the edit, as it would had it been sent later.
 * Since the thirty-eighth session.  dl: those of the items' targets that a
 * delete names, a probe of events_replaces_idx per distinct target, fenced
 * (LATERAL, LIMIT) as rt is: an EXISTS in gn's condition was planned as a
 * hashed subplan, a scan of the whole events table per job (a job of one
 * reaction took 1.5 ms on a table of a few thousand rows, and grew with
 * it).  A job of one reaction costs some 0.1 ms more (the lock statement
 * and the probe: 0.37 -> 0.50 ms, the statements alone), one of 100
 * reactions no more than the noise; a job with no edit or reaction of a
 * stored message pays nothing. */
#define DELETED_TARGETS \
	"dl AS MATERIALIZED (SELECT y.t FROM (SELECT DISTINCT it.dt AS t FROM it WHERE it.dt IS NOT NULL) y " \
	"  JOIN LATERAL (SELECT 1 FROM events d WHERE d.replaces_id = y.t AND d.type = 'delete' " \
	"  AND d.origin_network IS DISTINCT FROM 'gateway' LIMIT 1) x ON true), "
/* GN: the CTE's name (gn; GROUP_WRITE_EVENTS_REFS: gr, which its gn
 * reads); SG_CASE, SG_OR: for a job with items in groups (GROUP_*), its
 * items refused because their sender left; else empty. */
#define REFS_LOCKED_OF(GN, SG_CASE, SG_OR, GONE_MORE) \
	"rt AS MATERIALIZED (SELECT t.id FROM (SELECT it.replaces AS r FROM it UNION SELECT it.reply FROM it) y " \
	"  JOIN LATERAL (SELECT e.id FROM events e WHERE e.id = y.r FOR KEY SHARE) t ON true), " \
	DELETED_TARGETS GN " AS (SELECT it.pid, CASE WHEN " SG_CASE REF_GONE("reply") " THEN 'in_reply_to' WHEN " REF_GONE("replaces") \
	"  THEN 'replaces' ELSE 'deleted' END AS ref " \
	"  FROM it WHERE " SG_OR REF_GONE("replaces") " OR " REF_GONE("reply") " OR it.dt IN (SELECT t FROM dl)" GONE_MORE "), "
#define REFS_LOCKED(GONE_MORE) REFS_LOCKED_OF("gn", "", "", GONE_MORE)
/* A job none of whose items names a stored event (most: plain messages)
 * locks nothing and refuses nothing for it: its statements have an empty
 * gn instead (the lock's two CTEs were about a third of what the
 * twenty-first session's changes cost the end-to-end rate). */
#define REFS_NONE "gn AS (SELECT NULL::text AS pid, NULL::text AS ref WHERE false), "
/* Groups: the members may have changed since round 0 read them (an
 * operator's or a peer's removal, a member leaving through an adapter:
 * each takes the room's lock before it changes room_members, and commits
 * under it).  A job with items in groups takes its rooms' locks in a
 * statement of its own before the write (submit_lock_rooms, in the same
 * transaction and order as lk), so that the write's snapshot, taken after
 * (READ COMMITTED: a check in the write alone would have a snapshot from
 * before it waited on lk), sees every change committed under them; the
 * write then reads the joined members of the items' groups (jm), refuses
 * an item whose sender is no longer one (gn, reason 'sender': 403
 * not_allowed, as round 0 refuses one), and makes no row to a member
 * gone (a local target no longer joined; a peer none of whose users is).
 * Since the twenty-fifth session; before, a message decided before a
 * removal could be written after its leave event (from the removed user,
 * or to its peer).  A member added meanwhile gets nothing of what was
 * decided before they joined.  Direct rooms keep their two members: their
 * items (grp absent) pay nothing of it, and a job of direct rooms only
 * runs the statements without it. */
#define GROUP_JM \
	"jm AS MATERIALIZED (SELECT m.room_id, m.identity_id, p.name, m.membership = 'joined' AS joined " \
	"  FROM (SELECT DISTINCT it.room FROM it WHERE it.grp) g JOIN room_members m ON m.room_id = g.room " \
	"  AND " RECIPIENT_MEMBER_SQL("m") " " \
	"  JOIN identities i ON i.id = m.identity_id LEFT JOIN peers p ON p.id = i.peer_id), "
#define GROUP_SENDER_GONE \
	"(it.grp AND NOT EXISTS (SELECT 1 FROM jm WHERE jm.room_id = it.room AND jm.identity_id = it.sender " \
	"  AND jm.joined))"
#define GROUP_REFS_LOCKED_AS(GN, GONE_MORE) \
	REFS_LOCKED_OF(GN, GROUP_SENDER_GONE " THEN 'sender' WHEN ", GROUP_SENDER_GONE " OR ", GONE_MORE)
#define GROUP_REFS_LOCKED(GONE_MORE) GROUP_REFS_LOCKED_AS("gn", GONE_MORE)
#define GROUP_REFS_NONE "gn AS (SELECT it.pid, 'sender'::text AS ref FROM it WHERE " GROUP_SENDER_GONE "), "
#define GROUP_JOINED(ID) \
	"(it.grp IS NOT TRUE OR EXISTS (SELECT 1 FROM jm WHERE jm.room_id = it.room AND " ID "))"
#define GROUP_OB_WHERE \
	"WHERE " GROUP_JOINED("CASE WHEN d.target = '0' THEN 'peer:' || jm.name = d.dest " \
			      "ELSE jm.identity_id = d.target::bigint END") " "
#define GROUP_HELD_COND "AND " GROUP_JOINED("jm.identity_id = h.value::bigint") " "
/* The answer's rows: each written event (public id, acceptance time), and
 * each item refused in gn (its pid, NULL, the reference gone or 'sender'),
 * but those refused for their peer or a nonce (PEER_KEYS, PEER_NONCES),
 * which are answered so, once: a peer's user joining a group with her
 * event is not joined when her peer is not in force (JOIN_MEMBERS), and
 * gn has her event too, as a non-member's. */
#define PEERS_CHECKED PEER_KEYS PEER_NONCES
#define PEERS_OK PEER_OK " AND " NONCES_OK
#define PEER_REFUSED "NOT (" PEERS_OK ")"
#define GONE_ROWS " UNION ALL SELECT pid, NULL::bigint, ref FROM gn " \
	"WHERE pid NOT IN (SELECT it.pid FROM it WHERE " PEER_REFUSED ") UNION ALL SELECT it.pid, NULL::bigint, " \
	"CASE WHEN " PEER_OK " THEN 'replay' ELSE 'peer' END FROM it WHERE " PEER_REFUSED
/* WITH: "WITH" or "WITH RECURSIVE" (for GONE_MORE); IT: the items; PEERS,
 * ITEM_OK: PEERS_CHECKED and PEERS_OK, or for a job none of whose items
 * came from a peer (WRITE_ITEMS_LOCAL) empty and "true"; JM:
 * GROUP_JM or empty; REFS: REFS_LOCKED(GONE_MORE: more items of gn, naming
 * one of gn) or REFS_NONE (or their GROUP_ forms); ID_COL, ID: the
 * events' ids when the statement gives them; REPLACES, REPLY: the
 * references' event ids; OB_WHERE: GROUP_OB_WHERE or empty. */
#define WRITE_EVENTS_OF(WITH, IT, PEERS, ITEM_OK, JM, REFS, ID_COL, ID, REPLACES, REPLY, OB_WHERE) \
	WRITE_EVENTS_FROM_OF(WITH, IT, PEERS, ITEM_OK, JM, REFS, ID_COL, ID, REPLACES, REPLY, OB_ITEMS, OB_WHERE)
/* OB_FROM: where ob's rows come from, d(dest, target, state, dn) with
 * the item's it and ev: OB_ITEMS, each item's comma-separated lists, or
 * OB_LOCAL_ROWS (WRITE_ITEMS_LOCAL). */
#define OB_ITEMS \
	"it JOIN ev ON ev.public_id = it.pid, " \
	"  unnest(string_to_array(it.dests, ','), string_to_array(it.targets, ','), " \
	"   string_to_array(it.states, ',')) WITH ORDINALITY AS d(dest, target, state, dn) "
#define WRITE_EVENTS_FROM_OF(WITH, IT, PEERS, ITEM_OK, JM, REFS, ID_COL, ID, REPLACES, REPLY, OB_FROM, OB_WHERE) \
	WITH " " IT ", " \
	"lk AS MATERIALIZED (" ROOM_LOCKS_SQL("SELECT DISTINCT it.room AS r FROM it") "), " \
	PEERS JM REFS \
	"ev AS (INSERT INTO events (" ID_COL "public_id, room_id, sender_id, type, content, replaces_id, in_reply_to_id, " \
	"  origin_network, origin_native_id, request_hash, ts) SELECT " ID "it.pid, it.room, it.sender, it.type, it.content, " \
	"  " REPLACES ", " REPLY ", it.scope, it.key, decode(it.hash, 'hex'), it.ts FROM it " \
	"  WHERE (SELECT n FROM lk) >= 0 AND it.pid NOT IN (SELECT pid FROM gn) AND " ITEM_OK " ORDER BY it.n ON CONFLICT (origin_network, origin_native_id) WHERE origin_native_id IS NOT NULL DO NOTHING " \
	"  RETURNING id, public_id, room_id, (extract(epoch FROM accepted_at) * 1000)::bigint AS ms), " \
	"ob AS (INSERT INTO outbox (event_id, destination, target_identity_id, room_id, state) " \
	"  SELECT ev.id, d.dest, NULLIF(d.target::bigint, 0), ev.room_id, d.state FROM " OB_FROM \
	"  " OB_WHERE "ORDER BY ev.id, d.dn) "
#define WRITE_EVENTS_WITH_OF(JM, REFS, OB_WHERE) \
	WRITE_EVENTS_OF("WITH", "it AS (" IT_ROWS ")", PEERS_CHECKED, PEERS_OK, JM, REFS, "", "", "it.replaces", \
			"it.reply", OB_WHERE)
#define WRITE_EVENTS_WITH(REFS) WRITE_EVENTS_WITH_OF("", REFS, "")
#define WRITE_EVENTS WRITE_EVENTS_WITH(REFS_LOCKED(""))
#define WRITE_EVENTS_NOREFS WRITE_EVENTS_WITH(REFS_NONE)
#define GROUP_WRITE_EVENTS WRITE_EVENTS_WITH_OF(GROUP_JM, GROUP_REFS_LOCKED(""), GROUP_OB_WHERE)
#define GROUP_WRITE_EVENTS_NOREFS WRITE_EVENTS_WITH_OF(GROUP_JM, GROUP_REFS_NONE, GROUP_OB_WHERE)
/* Items that name earlier items of the job (rpid, xpid: their public ids):
 * each item's event id is drawn first, in the items' order (the column's
 * own sequence, as its default would), so that a reference can take it.
 * The CTE it is evaluated before lk, so the ids are drawn before the
 * statement takes the rooms' locks: such a job takes them in a statement
 * before this one (submit_lock_rooms, items_send), as a job in a group
 * does, so that its ids, like every other write's (drawn in ev, after
 * lk), follow the order in which the room's events are committed, across
 * daemon processes too.  Until the thirty-ninth session they were drawn before
 * the lock: another process's write of the room could take a later id
 * and commit first, and what reads a room's events in id order (an XMPP
 * occupant's history on joining, xmpp_muc.c, and its latest edit; an XMPP
 * correction's "is last", xmpp_out.c; which edit of a message is the
 * last, peer_media.c) saw them in another order than they were delivered
 * in (outbox ids are drawn in ob, after lk, and were never affected).
 * An item naming one refused in gn is refused too, and so on down the
 * chain (it would name an event never written). */
#define REFS_GONE_MORE \
	" UNION SELECT it.pid, CASE WHEN it.rpid = gn.pid THEN 'in_reply_to' ELSE 'replaces' END " \
	"FROM it JOIN gn ON gn.pid IN (it.rpid, it.xpid)"
#define WRITE_EVENTS_REFS_OF(JM, REFS, OB_WHERE) \
	WRITE_EVENTS_OF("WITH RECURSIVE", \
			"it AS MATERIALIZED (SELECT y.*, nextval(pg_get_serial_sequence('events', 'id')) AS eid " \
			"FROM (" IT_ROWS " ORDER BY x.n) y)", \
			PEERS_CHECKED, PEERS_OK, JM, REFS, "id, ", "it.eid, ", \
			"coalesce(it.replaces, (SELECT i2.eid FROM it i2 WHERE i2.pid = it.xpid))", \
			"coalesce(it.reply, (SELECT i2.eid FROM it i2 WHERE i2.pid = it.rpid))", OB_WHERE)
#define WRITE_EVENTS_REFS WRITE_EVENTS_REFS_OF("", REFS_LOCKED(REFS_GONE_MORE), "")
/* In a group, an item naming one refused because its sender left
 * ('sender', or down the chain 'sender:<reference>') is refused as that
 * one is, 403 not_allowed (ref 'sender:in_reply_to', 'sender:replaces'),
 * not as one naming an unknown message (400: until the twenty-sixth
 * session).  gr may hold an item twice (its own sender gone, and naming
 * one refused): gn keeps one row each, its sender's reason first, then a
 * referent's sender's, so the answer does not depend on the rows' order. */
#define GROUP_REFS_GONE_MORE \
	" UNION SELECT it.pid, CASE WHEN gr.ref LIKE 'sender%' THEN 'sender:' ELSE '' END || " \
	"CASE WHEN it.rpid = gr.pid THEN 'in_reply_to' ELSE 'replaces' END " \
	"FROM it JOIN gr ON gr.pid IN (it.rpid, it.xpid)"
#define GROUP_REFS_ONCE \
	"gn AS (SELECT DISTINCT ON (gr.pid) gr.pid, gr.ref FROM gr " \
	"  ORDER BY gr.pid, gr.ref <> 'sender', gr.ref NOT LIKE 'sender:%', gr.ref), "
#define GROUP_WRITE_EVENTS_REFS \
	WRITE_EVENTS_REFS_OF(GROUP_JM, \
			     GROUP_REFS_LOCKED_AS("gr", GROUP_REFS_GONE_MORE) GROUP_REFS_ONCE, GROUP_OB_WHERE)

#define EV_ROWS "SELECT public_id, ms, NULL::text FROM ev"
#define WRITE_ITEMS_PLAIN_ROWS EV_ROWS GONE_ROWS
#define WRITE_ITEMS_PLAIN WRITE_EVENTS WRITE_ITEMS_PLAIN_ROWS
#define WRITE_ITEMS_PLAIN_NOREFS WRITE_EVENTS_NOREFS WRITE_ITEMS_PLAIN_ROWS
/* A plain job in direct rooms naming no stored event, none of whose items
 * came from a peer (a local adapter's, Matrix or XMPP: pp and nn absent,
 * no peer's key to hold and no nonce to claim): WRITE_ITEMS_PLAIN_NOREFS
 * without pk, nd and nc, whose conditions each such item passes, and
 * without GONE_ROWS, which answer nothing for it (gn is empty).  The same
 * rows and the same answer.  PostgreSQL sets up and tears down the whole
 * plan of a statement at every call, its never-run parts included: these
 * were some 2 us an event of the write's 15-45 (fifty-first session,
 * docs/performance.md).  Its items are only the ten columns it reads
 * (IT_ROWS_LOCAL; LOCAL_COLS, in its order: write_send sends those alone,
 * $1-$10), not IT_ROWS' thirty and three scalars, and its outbox rows come
 * as four columns of a row each (OB_LOCAL_ROWS, $11-$14: the item's index,
 * the destination, the target, the state; write_send, from ob_rows_add),
 * not from each item's comma-separated lists.  PostgreSQL makes a
 * set-returning function's whole result before the scan reads it: each
 * unnest() column is a tuplestore of its own, and the columns such a job
 * leaves NULL (the peer's, the nonces', the consent asks', the
 * references: it names no stored event and no earlier item) cost as much
 * to make, store and read back as the others; and OB_ITEMS' unnest() of
 * three string_to_array()s is made again for every item, three arrays and
 * three tuplestores an item (fifty-fifth session, docs/performance.md).
 * The same rows in the same order: d.dn counts the rows of all the items
 * in the items' order, each item's in its lists' order. */
#define IT_ROWS_LOCAL \
	"SELECT x.n::int AS n, x.pid, x.room::bigint AS room, x.sender::bigint AS sender, x.type, " \
	"  x.content::jsonb AS content, x.ts::bigint AS ts, x.key, x.hash, x.scope " \
	"FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], " \
	"  $8::text[], $9::text[], $10::text[]) AS x(n, pid, room, sender, type, content, ts, key, hash, scope)"
#define OB_LOCAL_ROWS \
	"unnest($11::text[], $12::text[], $13::text[], $14::text[]) WITH ORDINALITY AS d(n, dest, target, state, dn) " \
	"  JOIN it ON it.n = d.n::int JOIN ev ON ev.public_id = it.pid "
#define WRITE_ITEMS_LOCAL \
	WRITE_EVENTS_FROM_OF("WITH", "it AS (" IT_ROWS_LOCAL ")", "", "true", "", REFS_NONE, "", "", "NULL::bigint", \
			     "NULL::bigint", OB_LOCAL_ROWS, "") \
	EV_ROWS

/* The consent requests of a job: cq, each pair (local user, sender) of its
 * items' ask lists (round 0 found no request of the pair standing, and the
 * policy let the sender ask: her lock is taken) whose request does not
 * stand yet, once, made with the first written item that holds the pair
 * (held: the item that asks, or a later one of the sender held for her,
 * which took no token of its own: may_ask; until the forty-third session
 * only the asking item made it, and when that one was not written, its
 * sender gone from its group or its key lost, the later ones were held
 * with nobody asked); a pair whose request stood in round 0
 * and no longer does asks with its next message, unlocked it is not);
 * ck, for each its rank among the job's new requests to that user from the
 * sender's domain (rk), and her requests of that domain stored within the
 * last day (had; the oldest's and the newest's times); cr, those within
 * her bound (it.crl: policy.consent_requests_per_user_per_day, 0 no
 * bound) made; cx, those past it, held with no request (answered, a row
 * "unasked" each with its item's index n in the second column: its
 * sender's token is given back, give_back); cn, the pairs of the ask lists
 * whose request neither cr made nor cx held ("unmade": made meanwhile by
 * another transaction, or no item holding it written: token given back);
 * ca, the audit record of the first refusal of
 * an episode: the first past the bound in this job, unless a refusal was
 * recorded since her latest request of that domain.  The count is exact
 * across restarts and daemon processes: submit_lock_users took her lock
 * (USER_ASK_LOCK_CLASS) in a statement before this one, so this
 * statement's snapshot holds every request another transaction made
 * before it let the lock go.  The request's created_at and the refusal's
 * at are this statement's start (statement_timestamp()), not the
 * transaction's (now()): it starts once the lock is held, so the times
 * follow the order the lock was held in, and a request and a refusal of
 * one statement have the same (the refusal counts as after the request):
 * "a refusal since her latest request" is true of the one written
 * before.  With now() a transaction that began first and waited on the
 * lock stamped its refusal before a request another had made meanwhile,
 * and the next refusal was recorded again (two daemons, CI of the
 * forty-first session; clock_timestamp() differs row by row within one
 * statement, and failed the same way).  Until the forty-first session the bound was
 * a token bucket in each process's memory: a restart filled it again, and
 * N processes allowed N times the bound.  Every stored request counts (a
 * MIMI requestConsent's too, which the bound never refuses). */
#define CONSENT_ASK_SQL(HELD_COND) \
	"c0 AS MATERIALIZED (SELECT DISTINCT ON (h.value::bigint, t.sender) h.value::bigint AS u, t.sender AS s, " \
	"  w.pid, w.n, w.expiry, coalesce(w.crl, 0) AS crl, sd.domain AS dom, sd.uri AS suri, t.win " \
	"  FROM it t JOIN identities sd ON sd.id = t.sender, unnest(string_to_array(t.ask, ',')) AS h(value), " \
	"  LATERAL (SELECT it.pid, it.n, it.expiry, it.crl FROM it JOIN ev ON ev.public_id = it.pid " \
	"   WHERE it.sender = t.sender AND it.n >= t.n AND h.value = ANY (string_to_array(it.held, ',')) " \
	"   " HELD_COND "ORDER BY it.n LIMIT 1) w " \
	"  WHERE NOT EXISTS (SELECT 1 FROM consent_requests q " \
	"   WHERE q.local_identity_id = h.value::bigint AND q.remote_identity_id = t.sender " \
	"   AND " CONSENT_REQUEST_STANDS_SQL("q", "t.win") ") " \
	"  ORDER BY h.value::bigint, t.sender, w.n), " \
	"cq AS MATERIALIZED (SELECT c0.*, EXISTS (SELECT 1 FROM consent_requests q WHERE q.local_identity_id = c0.u " \
	"  AND q.remote_identity_id = c0.s AND " CONSENT_REQUEST_ANSWERED_SQL("q", "c0.win") ") AS redo FROM c0), " \
	"ck AS MATERIALIZED (SELECT cq.*, row_number() OVER (PARTITION BY cq.u, cq.dom ORDER BY cq.n, cq.s) AS rk, " \
	"  w.had, w.old, w.last FROM cq, LATERAL (SELECT count(*) AS had, min(q.created_at) AS old, " \
	"  max(q.created_at) AS last FROM consent_requests q JOIN identities r ON r.id = q.remote_identity_id " \
	"  WHERE cq.crl > 0 AND q.local_identity_id = cq.u AND q.created_at > now() - interval '1 day' " \
	"  AND r.domain = cq.dom) w), " \
	"cr AS (INSERT INTO consent_requests (local_identity_id, remote_identity_id, created_at, expires_at) " \
	"  SELECT ck.u, ck.s, statement_timestamp(), statement_timestamp() + make_interval(secs => ck.expiry) FROM ck " \
	"  WHERE ck.crl = 0 OR ck.had + ck.rk <= ck.crl " \
	"  ON CONFLICT DO NOTHING RETURNING local_identity_id AS u, remote_identity_id AS s), " \
	"cx AS (SELECT * FROM ck WHERE ck.crl > 0 AND ck.had + ck.rk > ck.crl), " \
	"cn AS (SELECT it.n FROM it, unnest(string_to_array(it.ask, ',')) AS h(value) " \
	"  WHERE NOT EXISTS (SELECT 1 FROM cr WHERE cr.u = h.value::bigint AND cr.s = it.sender) " \
	"  AND NOT EXISTS (SELECT 1 FROM cx WHERE cx.u = h.value::bigint AND cx.s = it.sender) " \
	"  AND NOT EXISTS (SELECT 1 FROM consent_requests q WHERE q.local_identity_id = h.value::bigint " \
	"   AND q.remote_identity_id = it.sender AND " CONSENT_REQUEST_ANSWERED_SQL("q", "it.win") ")), " \
	"ca AS (INSERT INTO audit_log (at, actor, action, reason_code, event_id, subject, details) " \
	"  SELECT statement_timestamp(), 'policy', 'policy.limit', 'rate_limited_recipient_consent_requests', ev.id, cx.suri, " \
	"  jsonb_build_object('user', l.uri, 'type', 'consent_request', 'retry_after_ms', greatest(1, " \
	"  (extract(epoch FROM coalesce(cx.old, now()) + interval '1 day' - now()) * 1000)::bigint)) " \
	"  FROM cx JOIN ev ON ev.public_id = cx.pid JOIN identities l ON l.id = cx.u " \
	"  WHERE cx.rk = greatest(cx.crl - cx.had, 0) + 1 AND (cx.had < cx.crl OR NOT EXISTS (SELECT 1 " \
	"  FROM audit_log a WHERE a.action = 'policy.limit' AND a.at >= cx.last " \
	"  AND a.reason_code = 'rate_limited_recipient_consent_requests' AND a.details->>'user' = l.uri " \
	"  AND split_part(a.subject, '/', 3) = cx.dom))), "
#define CONSENT_UNASKED_ROWS \
	" UNION ALL SELECT NULL, cx.n::bigint, 'unasked' FROM cx WHERE NOT cx.redo " \
	" UNION ALL SELECT NULL, cn.n::bigint, 'unmade' FROM cn"

/* HELD_COND: GROUP_HELD_COND (no consent asked of a member gone) or empty;
 * AU_DETAILS: an audit record's details (GROUP_AU_DETAILS, or as given). */
#define WRITE_ITEMS_TAIL_OF(HELD_COND, AU_DETAILS) \
	", rd AS (UPDATE outbox o SET read_at = coalesce(o.read_at, now()) FROM it JOIN ev ON ev.public_id = it.pid " \
	"  WHERE it.read AND o.event_id = it.reply AND o.destination = it.scope AND o.state = 'delivered'), " \
	CONSENT_ASK_SQL(HELD_COND) \
	"oc AS (INSERT INTO consents (local_identity_id, subject_kind, subject, state, source) " \
	"  SELECT DISTINCT it.sender, 'user', o.value, 'allowed', 'outbound' " \
	"  FROM it JOIN ev ON ev.public_id = it.pid, jsonb_array_elements_text(it.outbound) AS o(value) " \
	"  ON CONFLICT DO NOTHING RETURNING local_identity_id AS u), " \
	"ou AS (SELECT u FROM oc), " \
	"ow AS (UPDATE room_members m SET wrote_at = now() FROM it JOIN ev ON ev.public_id = it.pid " \
	"  WHERE it.wrote AND m.room_id = it.room AND m.identity_id = it.sender), " \
	"bl AS (SELECT DISTINCT ON (it.sender, it.bt) it.sender, it.bt, it.ba FROM it JOIN ev ON ev.public_id = it.pid " \
	"  JOIN identities s ON s.id = it.sender AND NOT s.is_local WHERE it.bt IS NOT NULL " \
	"  ORDER BY it.sender, it.bt, it.n DESC), " \
	"bk AS (INSERT INTO blocks (blocker_id, blocked_id) SELECT bl.sender, t.id FROM bl " \
	"  JOIN identities t ON t.uri = bl.bt AND t.is_local WHERE bl.ba = 'block' ON CONFLICT DO NOTHING " \
	"  RETURNING blocked_id AS u), " \
	"ub AS (DELETE FROM blocks x USING bl, identities t WHERE bl.ba = 'unblock' AND t.uri = bl.bt AND t.is_local " \
	"  AND x.blocker_id = bl.sender AND x.blocked_id = t.id RETURNING x.blocked_id AS u), " \
	"nt AS (SELECT pg_notify('causeway_policy', 'x:' || pg_current_xact_id() || CASE WHEN count(*) > 64 " \
	"  THEN '' ELSE ';u:' || string_agg(f.u::text, ',') END) AS n " \
	"  FROM (SELECT u FROM ou UNION SELECT u FROM bk UNION SELECT u FROM ub) f HAVING count(*) > 0), " \
	"au AS (INSERT INTO audit_log (actor, action, reason_code, rule_id, event_id, subject, details) " \
	"  SELECT 'policy', a.action, a.reason, NULLIF(a.rule, 0), (SELECT id FROM ev WHERE ev.public_id = a.pid), " \
	"  a.subject, " AU_DETAILS " FROM jsonb_to_recordset($34::jsonb) " \
	"  AS a(action text, reason text, rule bigint, pid text, subject text, details jsonb)) " \
	"SELECT public_id, ms, NULL::text FROM ev, (SELECT count(*) FROM nt) AS n" GONE_ROWS CONSENT_UNASKED_ROWS
#define WRITE_ITEMS_TAIL WRITE_ITEMS_TAIL_OF("", "a.details")
#define WRITE_ITEMS WRITE_EVENTS WRITE_ITEMS_TAIL
#define WRITE_ITEMS_NOREFS WRITE_EVENTS_NOREFS WRITE_ITEMS_TAIL
#define WRITE_ITEMS_REFS WRITE_EVENTS_REFS WRITE_ITEMS_TAIL
/* A decision round 0 made for a member of a group (the record's subject,
 * not its sender) who left before the write: the record is kept (it was
 * decided), marked "recipient_left": true, as no row was written to them
 * (GROUP_OB_WHERE; for a peer's user, their peer's row may be, for its
 * users still there) and no consent asked (GROUP_HELD_COND).  Until the
 * twenty-sixth session it read as a delivery decision for a row that was
 * not written.  Only records about an item (pid) are looked at: a rate
 * limit's is about its sender. */
#define GROUP_AU_DETAILS \
	"CASE WHEN EXISTS (SELECT 1 FROM it JOIN identities s ON s.uri = a.subject WHERE it.pid = a.pid " \
	"  AND it.grp AND s.id <> it.sender AND NOT " GROUP_JOINED("jm.identity_id = s.id") ") " \
	"  THEN a.details || '{\"recipient_left\": true}'::jsonb ELSE a.details END"
#define GROUP_WRITE_ITEMS_TAIL WRITE_ITEMS_TAIL_OF(GROUP_HELD_COND, GROUP_AU_DETAILS)

/* The rooms' locks of a job with items in groups, in id order ($1: their
 * ids, comma-separated), before its write (see GROUP_JM). */
#define LOCK_ROOMS ROOM_LOCKS_SQL("SELECT DISTINCT x::bigint AS r FROM unnest(string_to_array($1, ',')) AS x")
/* The locks of the local users a job's held items may ask ($1: their
 * identity ids, comma-separated), in id order, before its write and its
 * rooms' locks (CONSENT_ASK_SQL); true when it holds them all.  Several
 * jobs share a transaction (group commit) and each takes its locks as it
 * comes, so the transaction may hold a room's lock (an earlier job's
 * write) or another user's when it comes to these: waiting then, while a
 * process holding this user's lock waits for that room's, was a deadlock
 * (PostgreSQL rolled one back after a second; until the forty-second
 * session).  A global order for the whole transaction (every user first,
 * then every room) cannot be had here: a job learns its locks in its own
 * rounds (a merged job's in the writer's transaction, after other jobs
 * took theirs), and plain jobs take rooms' locks before any.  So a
 * transaction waits for a user's lock only while it holds no advisory
 * lock (h, read before any of these is taken; within this statement it
 * then takes them in id order); holding one, it only tries, and a lock
 * taken elsewhere answers false: the job fails with CW_ERETRY (items_recv),
 * the transaction is rolled back, and its run again takes these locks
 * first, holding nothing (store_pipe_ops.first_locks, submit_first_locks).
 * No transaction then waits for a user's lock while holding another
 * advisory lock, except a lower user's in this statement, so no cycle of
 * waits goes through one: the deadlock is gone, not made rarer.  A job
 * of a transaction holding nothing (most: a first contact's is one
 * message) waits as before. */
#define LOCK_USERS \
	"WITH h AS MATERIALIZED (SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' " \
	"  AND pid = pg_backend_pid()) AS held) " \
	"SELECT coalesce(bool_and(pg_try_advisory_xact_lock(" USER_ASK_LOCK_CLASS ", (y.u % 2147483647)::int) " \
	"  OR (NOT h.held AND pg_advisory_xact_lock(" USER_ASK_LOCK_CLASS ", (y.u % 2147483647)::int)::text = '')), " \
	"  true) FROM (SELECT DISTINCT x::bigint AS u FROM unnest(string_to_array($1, ',')) AS x ORDER BY 1) y, h"

/* A peer's user's own leaving of a group (a membership event of hers,
 * membership_refused) ends her membership, as the peer's removal of her
 * does (POST /v1/rooms/{room}/members, room_members_remove): sent after the
 * write, in its transaction, under the rooms' locks its lk took, for the
 * items written ($1: their public ids, comma-separated; an item the write
 * refused made no event and changes nothing).  One who left already is no
 * change; a direct room keeps its two members.  The event itself is what
 * the group's other peers are told: nothing more is written for them.
 * Since the forty-first session; before, she stayed joined, wrote on and
 * was sent the group's events.  A leave that her own join written later
 * in the job undoes ($2: the public ids of the job's joining items,
 * joins_send; events' ids follow the items' order) ends nothing: the
 * items take effect in order, and she is joined after the two (since the
 * forty-second session; before, her join after it was refused). */
#define LEAVE_MEMBERS \
	"UPDATE room_members m SET membership = 'left', peer_invited = false, updated_at = now() " \
	"FROM events e JOIN rooms r ON r.id = e.room_id AND r.kind = 'group' " \
	"WHERE e.public_id = ANY (string_to_array($1, ',')) AND e.type = 'membership' " \
	"AND m.room_id = e.room_id AND m.identity_id = e.sender_id AND m.membership IN ('joined', 'invited') " \
	"AND NOT EXISTS (SELECT 1 FROM events j WHERE j.public_id = ANY (string_to_array($2, ',')) " \
	"AND j.room_id = e.room_id AND j.sender_id = e.sender_id AND j.id > e.id)"
/* Her own joining of a group she is not joined in (she left, or never was
 * in it: a user the server knows) is what the peer's adding of her does
 * (POST /v1/rooms/{room}/members: a peer adds its own users to any group
 * it has a member in): she is joined, before the write (whose check of its
 * senders, GROUP_JM, then finds her), in its transaction, under the rooms'
 * locks (submit_lock_rooms, sent first).  $1, $2: the rooms' and the
 * users' row ids, comma-separated, pair by pair, each pair once.  One
 * banned stays out (the write refuses her event: GROUP_SENDER_GONE).
 * Since the forty-first session; before, her join was refused, 403, as
 * any non-member's event.  $3: the pairs ("room:user") whose join follows
 * her own leave in the job, which is written after (LEAVE_MEMBERS, which
 * then leaves her joined): still joined here, she is a member anew, from
 * now on (updated_at: since when, for the policy's recipient_wrote_here),
 * as she is after a leave and a join sent apart.  $4: the peer of each
 * pair and the hash of the token its request came with ("id:hex"; "0:"
 * when not a peer's, which nothing more is asked of): a peer no longer in
 * force (PEER_IN_FORCE_SQL, as the write's PEER_KEYS, which
 * then refuses her event) joins nobody (since the forty-seventh session). */
#define JOIN_MEMBERS \
	"WITH jx AS (SELECT * FROM unnest(string_to_array($1, ','), string_to_array($2, ','), " \
	"  string_to_array($4, ',')) AS x(r, u, t)), " \
	"jp AS MATERIALIZED (SELECT y.t FROM (SELECT DISTINCT jx.t FROM jx) y JOIN peers p " \
	"  ON p.id = split_part(y.t, ':', 1)::bigint WHERE " PEER_IN_FORCE_SQL("p", "split_part(y.t, ':', 2)") \
	"  FOR KEY SHARE OF p) " \
	"INSERT INTO room_members (room_id, identity_id, membership) SELECT x.r::bigint, x.u::bigint, 'joined' " \
	"FROM jx x WHERE x.t = '0:' OR x.t IN (SELECT t FROM jp) " \
	"ON CONFLICT (room_id, identity_id) DO UPDATE SET membership = 'joined', peer_invited = false, " \
	"updated_at = now() WHERE room_members.membership = 'left' OR (room_members.membership = 'joined' " \
	"AND room_members.room_id || ':' || room_members.identity_id = ANY (string_to_array($3, ',')))"

/* Round 0 of a submit: on a reader (submit_prepare, the prepared pipes
 * of the interop API and of Matrix transactions) or on the writer (an
 * XMPP stanza's pipe). */
const struct store_stmt peer_api_read_statements[] = {
	{ "submit_read_by_id", READ_ITEMS("public_id = it.room") },
	{ "submit_read_by_uri", READ_ITEMS("uri = it.room") },
	{ "submit_read_by_native", READ_ITEMS("id = (SELECT b.room_id FROM room_bindings b WHERE b.network = it.scope "
					      "AND b.native_id = it.room LIMIT 1)") },
	{ NULL, NULL },
};

/* The later rounds: the writer's alone (store_write_pipe). */
const struct store_stmt peer_api_statements[] = {
	{ "submit_write", WRITE_ITEMS },
	{ "submit_write_plain", WRITE_ITEMS_PLAIN },
	{ "submit_write_norefs", WRITE_ITEMS_NOREFS },
	{ "submit_write_plain_norefs", WRITE_ITEMS_PLAIN_NOREFS },
	{ "submit_write_local", WRITE_ITEMS_LOCAL },
	{ "submit_write_refs", WRITE_ITEMS_REFS },
	{ "submit_lock_rooms", LOCK_ROOMS },
	{ "submit_lock_users", LOCK_USERS },
	{ "submit_leave", LEAVE_MEMBERS },
	{ "submit_join", JOIN_MEMBERS },
	{ "submit_write_g", GROUP_WRITE_EVENTS GROUP_WRITE_ITEMS_TAIL },
	{ "submit_write_plain_g", GROUP_WRITE_EVENTS WRITE_ITEMS_PLAIN_ROWS },
	{ "submit_write_norefs_g", GROUP_WRITE_EVENTS_NOREFS GROUP_WRITE_ITEMS_TAIL },
	{ "submit_write_plain_norefs_g", GROUP_WRITE_EVENTS_NOREFS WRITE_ITEMS_PLAIN_ROWS },
	{ "submit_write_refs_g", GROUP_WRITE_EVENTS_REFS GROUP_WRITE_ITEMS_TAIL },
	{ NULL, NULL },
};

/* Sends a prepared statement whose parameters are the texts first and mid
 * (if not NULL), then the JSON document doc2 (if not NULL). */
static cw_err send_text(PGconn *c, const char *stmt, const char *first, const char *mid, json_t *doc2, cw_errmsg *e)
{
	char *text2 = doc2 ? json_dumps(doc2, JSON_COMPACT) : NULL;
	if (doc2 && !text2)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const char *params[3] = { first };
	int n = 1;
	if (mid)
		params[n++] = mid;
	if (text2)
		params[n++] = text2;
	int ok = PQsendQueryPrepared(c, stmt, n, params, NULL, NULL, 0);
	free(text2);
	return ok ? CW_OK : cw_fail(e, CW_EUNAVAIL, "cannot send: %s", PQerrorMessage(c));
}

/* Round 1 runs when an item is to be written or a decision recorded. */
static bool round1_needed(const struct submit *b)
{
	if (json_array_size(b->audit))
		return true;
	for (size_t i = 0; i < b->n; i++)
		if (b->items[i] && b->write[i])
			return true;
	return false;
}

/* Appends s as a JSON string: as it is when no character needs escaping
 * (the usual case: ids, names, digits), else encoded by jansson.
 * CW_EINVAL: s is not UTF-8. */
static cw_err add_json_string(struct cw_buf *b, const char *s)
{
	size_t n = 0;
	for (const unsigned char *p = (const unsigned char *)s; *p; p++, n++)
		if (*p < 0x20 || *p == '"' || *p == '\\' || *p >= 0x7f)
			break;
	if (!s[n])
		return cw_buf_add(b, "\"", 1) || cw_buf_add(b, s, n) || cw_buf_add(b, "\"", 1) ? CW_ENOMEM : CW_OK;
	json_t *j = json_string(s);
	char *t = j ? json_dumps(j, JSON_ENCODE_ANY) : NULL;
	json_decref(j);
	cw_err rc = !j ? CW_EINVAL : t ? cw_buf_add(b, t, strlen(t)) : CW_ENOMEM;
	free(t);
	return rc;
}

/* Round 1's items go to the write as one array parameter per column
 * (IT_ROWS: unnest of text[]s, cast there to the columns' types), sent in
 * PostgreSQL's binary form of a one-dimensional text[] (array_recv): a
 * header (dimensions 1, flags, the element type text, the length, the
 * lower bound 1), then each element's length (-1: NULL) and bytes, as
 * they are: no quoting, no escaping, no JSON to parse.  Until the
 * forty-seventh session they were one JSON document read with
 * json_to_recordset, and the contents a second one, a jsonb array: their
 * parsing was 15 % of the writer's backend.  The values are the texts the
 * document held (ids, names, digits, the contents the HTTP threads
 * serialised), cast by the statement as json_to_recordset did (the
 * types' input functions). */
enum write_col {
	WC_N, WC_PID, WC_ROOM, WC_SENDER, WC_TYPE, WC_CONTENT, WC_REPLACES, WC_REPLY, WC_TS, WC_KEY, WC_HASH, WC_DESTS,
	WC_TARGETS, WC_STATES, WC_HELD, WC_ASK, WC_READ, WC_SCOPE, WC_OUTBOUND, WC_WROTE, WC_BT, WC_BA, WC_DT, WC_GRP,
	WC_RPID, WC_XPID, WC_PP, WC_PA, WC_NN, WC_ST, WC_COLS
};
/* The scalars after the columns ($31-$33: expiry, win, crl) and the audit
 * records ($34, the full statements only). */
#define WRITE_PARAMS (WC_COLS + 4)
/* The columns of WRITE_ITEMS_LOCAL (IT_ROWS_LOCAL), in its order, then
 * its outbox rows' (OB_LOCAL_ROWS), and no scalar. */
static const enum write_col LOCAL_COLS[] = { WC_N, WC_PID, WC_ROOM, WC_SENDER, WC_TYPE,
					     WC_CONTENT, WC_TS, WC_KEY, WC_HASH, WC_SCOPE };
#define LOCAL_COLS_N (sizeof(LOCAL_COLS) / sizeof(LOCAL_COLS[0]))
enum ob_col { OC_N, OC_DEST, OC_TARGET, OC_STATE, OC_COLS };
#define TEXT_OID 25

static void put_be32(char *p, uint32_t v)
{
	p[0] = (char)(v >> 24);
	p[1] = (char)(v >> 16);
	p[2] = (char)(v >> 8);
	p[3] = (char)v;
}

/* An array's header; its length (at 12) is set by text_array_end. */
static cw_err text_array_begin(struct cw_buf *a)
{
	char h[20];
	put_be32(h, 1);
	put_be32(h + 4, 0);
	put_be32(h + 8, TEXT_OID);
	put_be32(h + 12, 0);
	put_be32(h + 16, 1);
	return cw_buf_add(a, h, sizeof(h));
}

static void text_array_end(struct cw_buf *a, size_t n)
{
	put_be32(a->p + 12, (uint32_t)n);
}

/* An element: s (NULL: a NULL), len bytes. */
static cw_err text_array_add(struct cw_buf *a, const char *s, size_t len)
{
	char l[4];
	put_be32(l, s ? (uint32_t)len : UINT32_MAX);
	return cw_buf_add(a, l, 4) || (s && cw_buf_add(a, s, len)) ? CW_ENOMEM : CW_OK;
}

static cw_err text_array_str(struct cw_buf *a, const char *s)
{
	return text_array_add(a, s, s ? strlen(s) : 0);
}

/* An element: a JSON array of strings and integers as one text, its values
 * comma-separated (the statement splits it with string_to_array(), cheaper
 * than an array per column and item).  Its values (destinations, identity
 * ids, outbox states) have no commas. */
static cw_err text_array_joined(struct cw_buf *a, json_t *arr)
{
	size_t at = a->len, i;
	json_t *v;
	if (cw_buf_add(a, "\0\0\0\0", 4))
		return CW_ENOMEM;
	json_array_foreach(arr, i, v) {
		char num[24];
		const char *s = json_string_value(v);
		size_t n;
		if (json_is_integer(v)) {
			n = (size_t)snprintf(num, sizeof(num), "%lld", (long long)json_integer_value(v));
			s = num;
		} else {
			s = s ? s : "";
			n = strlen(s);
		}
		if ((i && cw_buf_add(a, ",", 1)) || cw_buf_add(a, s, n))
			return CW_ENOMEM;
	}
	put_be32(a->p + at, (uint32_t)(a->len - at - 4));
	return CW_OK;
}

/* An element: the value at x of a JSON array of strings and integers, as
 * text_array_joined writes it (an integer in decimal, anything else but a
 * string empty), or NULL past its end (as unnest() pads a shorter array). */
static cw_err text_array_at(struct cw_buf *a, json_t *arr, size_t x)
{
	json_t *v = json_array_get(arr, x);
	char num[24];
	if (json_is_integer(v)) {
		snprintf(num, sizeof(num), "%lld", (long long)json_integer_value(v));
		return text_array_str(a, num);
	}
	return text_array_str(a, !v ? NULL : json_string_value(v) ? json_string_value(v) : "");
}

/* The outbox rows of item n for OB_LOCAL_ROWS: a row per destination (its
 * target and state at the same place of their lists), *rows counted. */
static cw_err ob_rows_add(struct cw_buf *oc, const char *n, json_t *dests, json_t *targets, json_t *states,
			  size_t *rows)
{
	size_t k = json_array_size(dests);
	if (json_array_size(targets) > k)
		k = json_array_size(targets);
	if (json_array_size(states) > k)
		k = json_array_size(states);
	for (size_t x = 0; x < k; x++, (*rows)++)
		if (text_array_str(&oc[OC_N], n) || text_array_at(&oc[OC_DEST], dests, x) ||
		    text_array_at(&oc[OC_TARGET], targets, x) || text_array_at(&oc[OC_STATE], states, x))
			return CW_ENOMEM;
	return CW_OK;
}

/* The columns oc of the statement submit_write_local: the outbox rows of
 * each item round 1 writes (ob_rows_add), in its order. */
static cw_err ob_cols_build(const struct submit *b, struct cw_buf *oc)
{
	size_t rows = 0;
	for (size_t k = 0; k < OC_COLS; k++)
		if (text_array_begin(&oc[k]))
			return CW_ENOMEM;
	for (size_t i = 0; i < b->n; i++) {
		char n[24];
		if (!b->items[i] || !b->write[i])
			continue;
		snprintf(n, sizeof(n), "%zu", i);
		if (ob_rows_add(oc, n, b->dests[i], b->targets[i], b->states[i], &rows))
			return CW_ENOMEM;
	}
	for (size_t k = 0; k < OC_COLS; k++)
		text_array_end(&oc[k], rows);
	return CW_OK;
}

/* A reference in round 1's columns: the event's id in col, NULL; or (the
 * item names an earlier item of the job, "#j") NULL and in key_col that
 * item's public id; else both NULL. */
static cw_err ref_cols(struct cw_buf *cols, const struct submit *b, const char *ref, enum write_col col,
		       enum write_col key_col)
{
	const char *key = ref[0] == '#' ? b->items[strtoul(ref + 1, NULL, 10)]->msg_id : NULL;
	return text_array_str(&cols[col], ref[0] && !key ? ref : NULL) || text_array_str(&cols[key_col], key)
		       ? CW_ENOMEM
		       : CW_OK;
}

/* Sends round 1's write (IT_ROWS): its columns (binary text[]s), the
 * policy's held expiry, consent window and requests' bound, and the
 * audit records (if not NULL: the full statements); or, when oc is not
 * NULL (the statement submit_write_local), its columns LOCAL_COLS and
 * then its outbox rows' oc alone. */
static cw_err write_send(PGconn *c, const char *stmt, struct cw_buf *cols, struct cw_buf *oc, long long expiry,
			 long long win, long long bound, json_t *audit, cw_errmsg *e)
{
	for (size_t k = 0; k < WC_COLS; k++)
		if (cols[k].len > (size_t)INT_MAX) /* libpq's lengths are ints (PostgreSQL takes 1 GB a value) */
			return cw_fail(e, CW_EINVAL, "a write's column of %zu bytes is too large", cols[k].len);
	for (size_t k = 0; oc && k < OC_COLS; k++)
		if (oc[k].len > (size_t)INT_MAX)
			return cw_fail(e, CW_EINVAL, "a write's column of %zu bytes is too large", oc[k].len);
	char *text = audit ? json_dumps(audit, JSON_COMPACT) : NULL;
	if (audit && !text)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const char *params[WRITE_PARAMS];
	int lengths[WRITE_PARAMS] = { 0 }, formats[WRITE_PARAMS] = { 0 };
	char scalars[3][24];
	for (size_t k = 0; k < WC_COLS; k++) {
		params[k] = cols[k].p;
		lengths[k] = (int)cols[k].len;
		formats[k] = 1;
	}
	snprintf(scalars[0], sizeof(scalars[0]), "%lld", expiry);
	snprintf(scalars[1], sizeof(scalars[1]), "%lld", win);
	snprintf(scalars[2], sizeof(scalars[2]), "%lld", bound);
	for (size_t k = 0; k < 3; k++)
		params[WC_COLS + k] = scalars[k];
	params[WC_COLS + 3] = text;
	int n = WC_COLS + 3 + (text ? 1 : 0);
	if (oc) {
		for (size_t k = 0; k < LOCAL_COLS_N; k++) {
			params[k] = cols[LOCAL_COLS[k]].p;
			lengths[k] = (int)cols[LOCAL_COLS[k]].len;
		}
		for (size_t k = 0; k < OC_COLS; k++) {
			params[LOCAL_COLS_N + k] = oc[k].p;
			lengths[LOCAL_COLS_N + k] = (int)oc[k].len;
		}
		n = (int)(LOCAL_COLS_N + OC_COLS);
	}
	int ok = PQsendQueryPrepared(c, stmt, n, params, lengths, formats, 0);
	free(text);
	return ok ? CW_OK : cw_fail(e, CW_EUNAVAIL, "cannot send: %s", PQerrorMessage(c));
}

/* A sender who is not (or no longer) a member of the group: 403 not_allowed
 * (submit_decide in round 0, items_recv in round 1). */
#define NOT_MEMBER_DETAIL "the sender is not a member of this room"

/* Which reference of an item of this type names the message it may not
 * name once that was deleted (since the thirty-sixth session, a review's
 * finding: an edit after the delete was taken and pushed, and brought the
 * deleted text back wherever edits are applied): an edit's replaces, a
 * reaction's in_reply_to; "" for any other type.  The one place that
 * decides it: given the item's two references in whatever form the caller
 * holds them (the item's msg ids, their stored event ids, or the texts
 * saying why), it returns the one that counts.  A reply to a deleted
 * message is taken, as Matrix and XMPP take one to a redacted or retracted
 * message (their clients show "message deleted"), and so are a receipt of
 * it and another delete of it (they bring nothing back). */
static const char *deleted_ref(const char *type, const char *replaces, const char *in_reply_to)
{
	if (strcmp(type, "edit") == 0)
		return replaces;
	if (strcmp(type, "reaction") == 0)
		return in_reply_to;
	return "";
}

/* The message (msg id) an item may not name once it was deleted
 * (deleted_ref): content.replaces or content.in_reply_to, or "". */
static const char *deleted_target(const struct msg_input *in)
{
	return deleted_ref(in->type, in->replaces, in->in_reply_to);
}

/* Why an item naming a deleted message (deleted_target) is refused (400
 * invalid_body, alone or as a batch's item). */
static const char *deleted_why(const struct msg_input *in)
{
	return deleted_ref(in->type, "content.replaces names a message that was deleted",
			   "content.in_reply_to names a message that was deleted");
}

/* Item i's stored target that DELETED_TARGETS checks again in the write (its
 * event id, deleted_ref of replaces_id and reply_id), or NULL: it names
 * none (deleted_target), or names an earlier item of the job ("#j":
 * deleted_in_job checked it). */
static const char *checked_target(const struct submit *b, size_t i)
{
	const char *id = deleted_ref(b->items[i]->type, b->replaces_id[i], b->reply_id[i]);
	return id[0] && id[0] != '#' ? id : NULL;
}

/* id appended to a comma-separated list (the statements' $1 of ids):
 * CW_ENOMEM when it cannot be. */
static cw_err id_list_add(struct cw_buf *list, const char *id)
{
	return cw_buf_printf(list, "%s%s", list->len ? "," : "", id) ? CW_ENOMEM : CW_OK;
}

/* A job with items in groups (or with an item DELETED_TARGETS checks, or
 * with items naming earlier ones: WRITE_EVENTS_REFS_OF): the locks of the
 * rooms of every item it writes (direct ones too: the write's lk takes
 * them all, in id order, and this keeps that order), in a
 * statement before the write (see GROUP_JM).  Sets b->locked. */
static cw_err lock_rooms_send(PGconn *c, struct submit *b, cw_errmsg *e)
{
	struct cw_buf ids;
	cw_buf_init(&ids, SIZE_MAX / 2);
	cw_err rc = CW_OK;
	for (size_t i = 0; i < b->n && !rc; i++)
		if (b->items[i] && b->write[i])
			rc = id_list_add(&ids, b->room_id[i]);
	if (rc)
		rc = cw_fail(e, rc, "out of memory");
	else
		rc = send_text(c, "submit_lock_rooms", ids.p ? ids.p : "", NULL, NULL, e);
	cw_buf_free(&ids);
	b->locked = !rc;
	return rc;
}

/* The locks of the users the held items of the job may make a new request
 * of (CONSENT_ASK_SQL), when they have a bound: sent before the rooms' and
 * the write.  A held message whose sender's request stands asks no lock. */
static cw_err lock_users_send(PGconn *c, struct submit *b, long long bound, cw_errmsg *e)
{
	b->ulocked = false;
	if (bound <= 0)
		return CW_OK;
	struct cw_buf ids;
	cw_buf_init(&ids, SIZE_MAX / 2);
	cw_err rc = CW_OK;
	for (size_t i = 0; i < b->n && !rc; i++)
		if (b->items[i] && b->write[i])
			for (size_t x = 0; x < json_array_size(b->ask[i]) && !rc; x++)
				rc = id_list_add(&ids, json_string_value(json_array_get(b->ask[i], x)));
	if (rc)
		rc = cw_fail(e, rc, "out of memory");
	else if (ids.len)
		rc = send_text(c, "submit_lock_users", ids.p, NULL, NULL, e);
	b->ulocked = !rc && ids.len;
	free(b->uids);
	b->uids = b->ulocked ? strdup(ids.p) : NULL;
	cw_buf_free(&ids);
	if (b->ulocked && !b->uids)
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
	return rc;
}

/* The users whose locks a run again of the job takes first
 * (store_pipe_ops.first_locks: LOCK_USERS found one taken). */
static const char *submit_first_locks(const struct submit *b)
{
	return b ? b->first : NULL;
}

/* Whether item i is a peer's user's own leaving of a group, to be written
 * in round 1 (LEAVE_MEMBERS ends her membership with it). */
static bool leaves_group(const struct submit *b, size_t i)
{
	return b->items[i] && b->write[i] && b->grp[i] && b->items[i]->leave && !b->items[i]->local_sender;
}

/* Round 1's leaving of the group by the peers' users whose leave events it
 * writes (LEAVE_MEMBERS, with the joining items that may undo them), sent
 * after the write; nothing when there is none.  Sets b->left. */
static cw_err leaves_send(PGconn *c, struct submit *b, cw_errmsg *e)
{
	struct cw_buf ids, joins;
	cw_buf_init(&ids, SIZE_MAX / 2);
	cw_buf_init(&joins, SIZE_MAX / 2);
	cw_err rc = CW_OK;
	for (size_t i = 0; i < b->n && !rc; i++)
		if (leaves_group(b, i))
			rc = id_list_add(&ids, b->items[i]->msg_id);
		else if (b->items[i] && b->write[i] && b->joins[i])
			rc = id_list_add(&joins, b->items[i]->msg_id);
	if (!rc && cw_buf_add(&joins, "", 0)) /* "" when none */
		rc = CW_ENOMEM;
	if (rc)
		rc = cw_fail(e, rc, "out of memory");
	else if (ids.len)
		rc = send_text(c, "submit_leave", ids.p, joins.p, NULL, e);
	b->left = !rc && ids.len;
	cw_buf_free(&ids);
	cw_buf_free(&joins);
	return rc;
}

/* Whether item i (a joining item) and an earlier item j are of one sender
 * in one room. */
static bool same_member(const struct submit *b, size_t i, size_t j)
{
	return strcmp(b->room_id[i], b->room_id[j]) == 0 && strcmp(b->sender_id[i], b->sender_id[j]) == 0;
}

/* Round 1's joining of the groups by the peers' users whose own join
 * events it writes and who are not joined (JOIN_MEMBERS), sent after the
 * rooms' locks and before the write; nothing when there is none.  Sets
 * b->joined. */
static cw_err joins_send(PGconn *c, struct submit *b, cw_errmsg *e)
{
	struct cw_buf rooms, users, again, peers;
	cw_buf_init(&rooms, SIZE_MAX / 2);
	cw_buf_init(&users, SIZE_MAX / 2);
	cw_buf_init(&again, SIZE_MAX / 2);
	cw_buf_init(&peers, SIZE_MAX / 2);
	cw_err rc = CW_OK;
	for (size_t i = 0; i < b->n && !rc; i++) {
		if (!b->items[i] || !b->write[i] || !b->joins[i])
			continue;
		/* each pair once (one row may not be changed twice by one
		 * statement), and anew if any of her joins follows her leave */
		bool first = true, rejoin = false;
		for (size_t j = 0; j < i; j++)
			if (b->items[j] && b->write[j] && same_member(b, i, j)) {
				first = first && !b->joins[j];
				rejoin = rejoin || leaves_group(b, j);
			}
		if (first) {
			char pa[65] = "";
			const struct peer_principal *p = b->items[i]->p;
			if (p)
				cw_hex(pa, p->token_hash, 32);
			rc = id_list_add(&rooms, b->room_id[i]) || id_list_add(&users, b->sender_id[i]) ||
					     cw_buf_printf(&peers, "%s%lld:%s", peers.len ? "," : "",
							   (long long)(p ? p->id : 0), pa)
				     ? CW_ENOMEM
				     : CW_OK;
		}
		if (!rc && rejoin)
			rc = cw_buf_printf(&again, "%s%s:%s", again.len ? "," : "", b->room_id[i], b->sender_id[i])
				     ? CW_ENOMEM
				     : CW_OK;
	}
	if (!rc && cw_buf_add(&again, "", 0)) /* "" when none */
		rc = CW_ENOMEM;
	if (rc)
		rc = cw_fail(e, rc, "out of memory");
	else if (rooms.len) {
		const char *params[] = { rooms.p, users.p, again.p, peers.p };
		if (!PQsendQueryPrepared(c, "submit_join", 4, params, NULL, NULL, 0))
			rc = cw_fail(e, CW_EUNAVAIL, "cannot send: %s", PQerrorMessage(c));
	}
	b->joined = !rc && rooms.len;
	cw_buf_free(&rooms);
	cw_buf_free(&users);
	cw_buf_free(&again);
	cw_buf_free(&peers);
	return rc;
}

/* Round 0's document is written as text straight into a buffer: every
 * value is an id, a number or a name that needs no escaping
 * (add_json_string checks, and lets jansson encode what does); round 1's
 * columns are arrays of the texts as they are (write_send), the event
 * contents the texts the HTTP threads made.  Building them as jansson
 * trees and serialising those was most of the writer's time. */
static cw_err items_send(PGconn *c, struct submit *b, int round, cw_errmsg *e)
{
	if (round == 0) {
		/* Round 0 decides; a job whose round 0 runs again (a merged
		 * one, an XMPP write: the group commit's batch runs again
		 * after a lost deadlock or a failed job) gives back first what
		 * the run before took (its messages', a join's member_add, its
		 * consent requests' tokens), and is charged for the run that
		 * commits only.  Until the forty-third session each run took
		 * them again. */
		b->ledger.rl = b->app->limits;
		if (b->ledger.rl)
			policy_rate_ledger_undo(&b->ledger, cw_wall_ms());
		submit_clear_round(b);
	}
	b->locked = false;
	b->ulocked = false;
	b->left = false;
	b->joined = false;
	struct policy_view *v = policy_live_get(b->app->policy);
	long long bound = v->set.user_requests_per_day;
	long long expiry = v->set.held_expiry_s, win = v->set.consent_window_s;
	struct cw_buf doc, cols[WC_COLS], oc[OC_COLS];
	cw_buf_init(&doc, SIZE_MAX / 2);
	for (size_t k = 0; k < WC_COLS; k++)
		cw_buf_init(&cols[k], SIZE_MAX / 2);
	for (size_t k = 0; k < OC_COLS; k++)
		cw_buf_init(&oc[k], SIZE_MAX / 2);
	size_t items = 0;
	bool plain = json_array_size(b->audit) == 0; /* round 1: the plain statement will do */
	bool refs = false;                           /* round 1: an item names an earlier one */
	bool stored = false;                         /* round 1: an item names a stored event */
	bool group = false;                          /* round 1: an item is in a group */
	bool chk = false;                            /* round 1: an item is checked for a delete (DELETED_TARGETS) */
	bool local = true;                           /* round 1: no item from a peer (WRITE_ITEMS_LOCAL) */
	cw_err rc = round == 0 ? (cw_buf_add(&doc, "[", 1) ? CW_ENOMEM : CW_OK) : CW_OK;
	for (size_t k = 0; round == 1 && k < WC_COLS && !rc; k++)
		rc = text_array_begin(&cols[k]);
	for (size_t i = 0; i < b->n && !rc; i++) {
		struct msg_input *in = b->items[i];
		if (!in || (round == 1 && !b->write[i]))
			continue;
		if (round == 0 && items && cw_buf_add(&doc, ",", 1)) {
			rc = CW_ENOMEM;
			break;
		}
		items++;
		if (round == 0) {
			char num[24];
			size_t nl = outbox_put_ll(num, (long long)i);
			rc = cw_buf_add(&doc, "{\"n\":", 5) || cw_buf_add(&doc, num, nl) ||
				     cw_buf_add(&doc, ",\"room\":", 8) || add_json_string(&doc, in->room) ||
				     cw_buf_add(&doc, ",\"key\":", 7) || add_json_string(&doc, in->idem_key) ||
				     cw_buf_add(&doc, ",\"reply\":", 9) || add_json_string(&doc, in->in_reply_to) ||
				     cw_buf_add(&doc, ",\"replaces\":", 12) || add_json_string(&doc, in->replaces) ||
				     cw_buf_add(&doc, ",\"scope\":", 9) || add_json_string(&doc, in->scope) ||
				     (deleted_target(in)[0] &&
				      (cw_buf_add(&doc, ",\"chk\":", 7) || add_json_string(&doc, deleted_target(in)))) ||
				     (!in->local_sender &&
				      (cw_buf_add(&doc, ",\"snd\":", 7) || add_json_string(&doc, in->sender) ||
				       cw_buf_add(&doc, ",\"net\":", 7) || add_json_string(&doc, in->sender_network) ||
				       cw_buf_add(&doc, ",\"dom\":", 7) || add_json_string(&doc, in->sender_domain) ||
				       cw_buf_printf(&doc, ",\"win\":%lld", (long long)v->set.consent_window_s) ||
				       (in->join && cw_buf_add(&doc, ",\"jn\":true", 10)))) ||
				     cw_buf_add(&doc, "}", 1)
				     ? CW_EINVAL
				     : CW_OK;
			continue;
		}
		char hex[65], n[24], pa[65], pp[24], st[24];
		cw_hex(hex, in->hash, 32);
		if (in->p)
			cw_hex(pa, in->p->token_hash, 32);
		const char *dt = checked_target(b, i);
		const char *content = b->scrub[i] ? "{}" : in->event_text;
		char *outbound = json_array_size(b->outbound[i]) ? json_dumps(b->outbound[i], JSON_COMPACT) : NULL;
		n[outbox_put_ll(n, (long long)i)] = '\0';
		pp[outbox_put_ll(pp, in->p ? (long long)in->p->id : 0LL)] = '\0';
		st[outbox_put_ll(st, (long long)in->nonces_stale)] = '\0';
		rc = !content || (json_array_size(b->outbound[i]) && !outbound) || text_array_str(&cols[WC_N], n) ||
				     text_array_str(&cols[WC_PID], in->msg_id) ||
				     text_array_str(&cols[WC_ROOM], b->room_id[i]) ||
				     text_array_str(&cols[WC_SENDER], b->sender_id[i]) ||
				     text_array_str(&cols[WC_TYPE], in->type) || text_array_str(&cols[WC_CONTENT], content) ||
				     ref_cols(cols, b, b->replaces_id[i], WC_REPLACES, WC_XPID) ||
				     ref_cols(cols, b, b->reply_id[i], WC_REPLY, WC_RPID) ||
				     text_array_str(&cols[WC_TS], in->ts) || text_array_str(&cols[WC_KEY], in->idem_key) ||
				     text_array_add(&cols[WC_HASH], hex, 64) || text_array_joined(&cols[WC_DESTS], b->dests[i]) ||
				     text_array_joined(&cols[WC_TARGETS], b->targets[i]) ||
				     text_array_joined(&cols[WC_STATES], b->states[i]) ||
				     text_array_joined(&cols[WC_HELD], b->held[i]) ||
				     text_array_joined(&cols[WC_ASK], b->ask[i]) ||
				     text_array_str(&cols[WC_READ], in->read_receipt ? "t" : "f") ||
				     text_array_str(&cols[WC_SCOPE], in->scope) ||
				     text_array_str(&cols[WC_OUTBOUND], outbound ? outbound : "[]") ||
				     text_array_str(&cols[WC_WROTE], b->wrote[i] ? "t" : "f") ||
				     text_array_str(&cols[WC_BT], in->block_target[0] ? in->block_target : NULL) ||
				     text_array_str(&cols[WC_BA], !in->block_target[0] ? NULL
							  : in->unblock			 ? "unblock"
											 : "block") ||
				     text_array_str(&cols[WC_DT], dt) || text_array_str(&cols[WC_GRP], b->grp[i] ? "t" : NULL) ||
				     text_array_str(&cols[WC_PP], in->p ? pp : NULL) ||
				     text_array_str(&cols[WC_PA], in->p ? pa : NULL) ||
				     text_array_str(&cols[WC_NN], in->nonces) ||
				     text_array_str(&cols[WC_ST], in->nonces ? st : NULL)
				     ? CW_ENOMEM
				     : CW_OK;
		free(outbound);
		refs = refs || b->reply_id[i][0] == '#' || b->replaces_id[i][0] == '#';
		stored = stored || b->reply_id[i][0] || b->replaces_id[i][0];
		group = group || b->grp[i];
		chk = chk || dt;
		local = local && !in->p && !in->nonces;
		plain = plain && !in->read_receipt && !json_array_size(b->held[i]) && !json_array_size(b->outbound[i]) &&
			!b->wrote[i] && !in->block_target[0];
	}
	policy_view_put(v);
	/* Round 1's write is the statement submit_write_local (WRITE_ITEMS_LOCAL,
	 * its outbox rows the columns oc) for a plain job of local senders'
	 * items naming no event, in no group: decided here once, from the
	 * flags of all its items, for the rows, the statement and its
	 * parameters alike (until the fifty-sixth session in three spellings:
	 * the loop's, the statement's choice, and a strcmp of its name). */
	bool local_stmt = round == 1 && plain && local && !group && !stored && !refs;
	if (!rc && round == 0 && cw_buf_add(&doc, "]", 1))
		rc = CW_ENOMEM;
	for (size_t k = 0; round == 1 && k < WC_COLS && !rc; k++)
		text_array_end(&cols[k], items);
	if (!rc && local_stmt)
		rc = ob_cols_build(b, oc);
	if (rc)
		rc = cw_fail(e, rc, "cannot build the statement's parameters (out of memory, or an id not UTF-8)");
	else if (round == 0 && items)
		rc = send_text(c, b->room_by == SUBMIT_ROOM_BY_URI	? "submit_read_by_uri"
				  : b->room_by == SUBMIT_ROOM_BY_NATIVE ? "submit_read_by_native"
									: "submit_read_by_id",
			       doc.p, NULL, NULL, e);
	else if (round == 1) {
		/* a job with items in groups (and its statement's _g
		 * variant, GROUP_JM), with an item checked for a delete
		 * (DELETED_TARGETS) or with items naming earlier ones (its
		 * event ids drawn after the locks: WRITE_EVENTS_REFS_OF):
		 * its rooms' locks first */
		const char *w = refs	     ? "submit_write_refs"
				: local_stmt ? "submit_write_local"
				: plain	     ? (stored ? "submit_write_plain" : "submit_write_plain_norefs")
					     : (stored ? "submit_write" : "submit_write_norefs");
		char name[40];
		snprintf(name, sizeof(name), "%s%s", w, group ? "_g" : "");
		if ((plain || (rc = lock_users_send(c, b, bound, e)) == CW_OK) &&
		    (!(group || chk || refs) || (rc = lock_rooms_send(c, b, e)) == CW_OK) &&
		    (!group || (rc = joins_send(c, b, e)) == CW_OK))
			rc = write_send(c, name, cols, local_stmt ? oc : NULL, expiry, win, bound,
					plain && !refs ? NULL : b->audit, e);
		if (!rc)
			rc = leaves_send(c, b, e);
	}
	cw_buf_free(&doc);
	for (size_t k = 0; k < WC_COLS; k++)
		cw_buf_free(&cols[k]);
	for (size_t k = 0; k < OC_COLS; k++)
		cw_buf_free(&oc[k]);
	/* Who has rows to deliver now: the dispatcher (its channel wakes the
	 * pull stream too), or only the pull stream.  Held and dropped rows
	 * wake no one: a consent releases held rows and notifies then. */
	unsigned char wake = 0;
	for (size_t i = 0; round == 1 && i < b->n; i++)
		if (b->write[i])
			wake |= b->wake[i];
	b->notified = false;
	if (!rc && wake) {
		if (!PQsendQueryParams(c, wake & WAKE_DISPATCHER ? "SELECT pg_notify('causeway_outbox', '')"
								 : "SELECT pg_notify('causeway_pull', '')",
				       0, NULL, NULL, NULL, NULL, 0))
			rc = cw_fail(e, CW_EUNAVAIL, "cannot send: %s", PQerrorMessage(c));
		b->notified = true;
	}
	return rc;
}

/* The answer to an accepted event: when it is written, and again to a
 * retry with its idempotency key (made from the stored event). */
static json_t *accepted_answer(const char *public_id, const char *accepted_ms)
{
	return json_pack("{s:s, s:I, s:s}", "id", public_id, "accepted_ts", (json_int_t)atoll(accepted_ms), "status",
			 "accepted");
}

/* Whether an item before i was given msg_id (its index as "#j" into out). */
static bool earlier_item(const struct submit *b, size_t i, const char *msg_id, char *out, size_t len)
{
	for (size_t j = 0; j < i; j++)
		if (b->items[j] && strcmp(b->items[j]->msg_id, msg_id) == 0) {
			snprintf(out, len, "#%zu", j);
			return true;
		}
	return false;
}

/* What an edit or a delete may name (spec: "always the first version, as
 * in MIMI"): an edit a message, a delete a message or a reaction.  NULL
 * when target (an event type) is one of those, else why not. */
static const char *replaces_refused(const char *type, const char *target)
{
	if (strcmp(target, "message") == 0 || (strcmp(type, "delete") == 0 && strcmp(target, "reaction") == 0))
		return NULL;
	return strcmp(type, "edit") == 0 ? "content.replaces must name the message's first version (an edit names "
					   "a message, not another edit or event)"
					 : "content.replaces must name a message or a reaction (its first version), "
					   "not an edit or another event";
}

/* Whether an item before i, to be written, deletes the message item i
 * may not name once deleted (deleted_target): an edit or a reaction after
 * the delete in the same job is refused as one after a stored delete is,
 * one before it taken. */
static bool deleted_in_job(const struct submit *b, size_t i)
{
	const char *target = deleted_target(b->items[i]);
	if (!target[0])
		return false;
	for (size_t j = 0; j < i; j++)
		if (b->items[j] && b->write[j] && strcmp(b->items[j]->type, "delete") == 0 &&
		    strcmp(b->items[j]->replaces, target) == 0)
			return true;
	return false;
}

/* An item's reference to an earlier item of the job holds if that one is
 * written, in the same room, and (an edit or a delete) by the same
 * sender; else the item fails as one naming an unknown message does.  An
 * edit or a reaction naming a message an earlier item deletes fails too
 * (deleted_in_job).  In the items' order, so that what an item names is
 * decided for good before it (a delete refused here deletes nothing). */
static void intra_refs(struct submit *b)
{
	for (size_t i = 0; i < b->n; i++) {
		if (!b->items[i] || !b->write[i])
			continue;
		const char *why = NULL;
		if (b->reply_id[i][0] == '#' || b->replaces_id[i][0] == '#') {
			size_t rj = b->reply_id[i][0] == '#' ? strtoul(b->reply_id[i] + 1, NULL, 10) : i;
			size_t xj = b->replaces_id[i][0] == '#' ? strtoul(b->replaces_id[i] + 1, NULL, 10) : i;
			if (rj != i && (!b->write[rj] || strcmp(b->room_id[rj], b->room_id[i]) != 0))
				why = "content.in_reply_to names no message of this room";
			else if (xj != i && (!b->write[xj] || strcmp(b->room_id[xj], b->room_id[i]) != 0))
				why = "content.replaces names no message of this room";
			else if (xj != i && strcmp(b->items[xj]->sender, b->items[i]->sender) != 0)
				why = SUBMIT_WHY_NOT_SENDERS;
			else if (xj != i)
				why = replaces_refused(b->items[i]->type, b->items[xj]->type);
		}
		if (!why && deleted_in_job(b, i))
			why = deleted_why(b->items[i]);
		if (why) {
			b->write[i] = false;
			b->wake[i] = 0;
			json_decref(b->res[i].body);
			b->res[i].body = NULL;
			item_fail(&b->res[i], 400, "invalid_body", "%s", why);
		}
	}
}

/* Appends v (a new reference) to the array *a, made at the first value.
 * Round 0 leaves an item's lists that stay empty NULL (json_array_size and
 * json_array_foreach read NULL as empty): until the forty-eighth session
 * it made eight arrays an item, five of them nearly always empty, each two
 * allocations made on the reader and freed on the writer (a fifth of the
 * writer thread's samples were frees into the reader's arena). */
static void lazy_append(json_t **a, json_t *v)
{
	if (!*a)
		*a = json_array();
	json_array_append_new(*a, v); /* NULL (out of memory): v is freed, as an append to a full array */
}

/* Whether item i's message, held for local user local_id (its identity
 * id), may ask that user for consent.  Yes where a request of its sender
 * is pending or recent (the write asks once per window: this asks nothing
 * new) or an earlier item of the job asks; yes, and asked again without a
 * token, where the only recent one is a request she answered and then
 * had lifted ('r': the sender paid for this window's, and a token taken
 * now would tell his peer that she answered); else a new request would be
 * made, and it takes a token of the sender's consent_requests_per_day
 * (spec/policy.md: "consent requests per day", per remote user; each
 * request its own token, as a group's first message may ask several
 * users).  Without one the message is held unasked, as a held message
 * for an unknown user is: the sender sees what any held message shows,
 * and a later message asks once the bucket has refilled.  The refusal is
 * audited once per episode.  The local user's own bound on the requests
 * of each remote domain (policy.consent_requests_per_user_per_day, since
 * the fortieth session) is the write's (CONSENT_ASK_SQL): it counts what
 * is stored, under her lock; a pair it holds unasked gets its sender's
 * token back (give_back). */
static bool may_ask(struct submit *b, size_t i, PGresult *r, const struct policy_view *view,
		    const struct policy_request *held_req, const char *local_id, json_t **audit, json_t **ask)
{
	const struct msg_input *in = b->items[i];
	char stands = 'f';
	for (int k = 0; k < b->nfacts; k++)
		if (strcmp(PQgetvalue(r, k, 2), local_id) == 0 && strcmp(PQgetvalue(r, k, 3), in->sender) == 0) {
			stands = PQgetvalue(r, k, 17)[0];
			break;
		}
	if (stands == 't')
		return true;
	for (size_t j = 0; j < i; j++)
		if (b->items[j] && b->held[j] && strcmp(b->items[j]->sender, in->sender) == 0)
			for (size_t x = 0; x < json_array_size(b->held[j]); x++)
				if (strcmp(json_string_value(json_array_get(b->held[j], x)), local_id) == 0)
					return true;
	if (stands == 'r') { /* she answered this window's request, then lifted it: asked again, free */
		lazy_append(ask, json_string(local_id));
		return true;
	}
	struct policy_rate_memo memo;
	policy_rate_memo_init(&memo, b->app->limits);
	memo.ledger = &b->ledger;
	struct policy_request req = *held_req;
	req.action = POLICY_ACT_FIRST_CONTACT;
	req.rate = &memo.rate;
	struct policy_decision d;
	policy_decide(view->snap, &req, &d);
	policy_rate_memo_finish(&memo);
	if (d.verdict != POLICY_LIMIT) {
		lazy_append(ask, json_string(local_id));
		return true;
	}
	policy_count(b->app, &d);
	if (memo.first_refusal)
		lazy_append(audit, peer_audit_record(&d, in->msg_id, in->sender,
			json_pack("{s:s, s:s, s:I}", "user", req.recipient.uri, "type", "consent_request",
				  "retry_after_ms", (json_int_t)d.retry_after_ms)));
	return false;
}

/* Gives back the token of its consent_requests_per_day (and _per_user)
 * that item i's sender spent (may_ask) on a request the write then did
 * not make: the local user's own bound held the message unasked
 * (CONSENT_ASK_SQL's cx).  The sender's allowance counts the requests
 * made, not the messages held unasked (spec/policy.md: "consent requests
 * per day").  The same decision asked again with a take that gives
 * (policy_rate_ledger_give: only a token the job took, b->ledger, as the
 * job's: may_ask's memo records its takes for no item, the pair's token
 * going with whichever written item makes the request): its
 * buckets are named by the sender and the rules matching them alone, so
 * the recipient is not needed.  Round 1 may run again (a lost deadlock):
 * b->given keeps a pair from being given back twice for one take, and a
 * run again that makes a request the run before held unasked takes its
 * token again (retake; since the forty-sixth session: until then the
 * request cost its sender nothing); a job
 * whose round 0 runs again (a merged one) gives back what it took first
 * (items_send), takes again, and given is cleared with it.  Until the
 * forty-second session a sender held unasked twice had spent two requests
 * of the day that nobody was asked. */
static void ledger_pass(struct submit *b, size_t i,
			int64_t (*fn)(void *, const char *, uint32_t, int64_t, int64_t))
{
	const struct msg_input *in = b->items[i];
	if (!b->app->limits)
		return;
	struct policy_rate give = { fn, &b->ledger, NULL };
	struct policy_request req = {
		.direction = POLICY_INBOUND, .action = POLICY_ACT_FIRST_CONTACT,
		.sender = { in->sender, in->sender_domain, in->sender_network }, .now_ms = cw_wall_ms(), .rate = &give,
	};
	struct policy_view *view = policy_live_get(b->app->policy);
	struct policy_decision d;
	policy_decide(view->snap, &req, &d);
	policy_view_put(view);
}

static void give_back(struct submit *b, size_t i)
{
	ledger_pass(b, i, policy_rate_ledger_give);
}

/* A token give_back gave for item i taken again (policy_rate_ledger_retake). */
static void retake(struct submit *b, size_t i)
{
	ledger_pass(b, i, policy_rate_ledger_retake);
}

/* An earlier item of this job (round 0 decides them in index order) is
 * sender's first message to uri, allowed (its consent fact is written with
 * the job, after the policy's snapshot was taken): item i starts no
 * conversation with uri.  Until the twenty-sixth session's review, a
 * Matrix transaction carrying two lines to someone new counted two new
 * conversations. */
static bool job_started(const struct submit *b, size_t i, const char *sender, const char *uri)
{
	for (size_t j = 0; j < i; j++) {
		if (!json_array_size(b->outbound[j]) || !b->items[j] || strcmp(b->items[j]->sender, sender) != 0)
			continue;
		size_t x;
		json_t *u;
		json_array_foreach(b->outbound[j], x, u)
			if (strcmp(json_string_value(u), uri) == 0)
				return true;
	}
	return false;
}

/* Whether a member row of r (mfirst .. mfirst+nmembers-1) is a joined
 * user of peer peer_id (peer) or is uri (!peer). */
static bool joined_member(PGresult *r, int mfirst, int nmembers, bool peer, int64_t peer_id, const char *uri)
{
	for (int k = mfirst; k < mfirst + nmembers; k++)
		if (PQgetvalue(r, k, 9)[0] == 't' &&
		    (peer ? !PQgetisnull(r, k, 6) && atoll(PQgetvalue(r, k, 6)) == peer_id
			  : strcmp(PQgetvalue(r, k, 3), uri) == 0))
			return true;
	return false;
}

/* Round 0's answer for item i (row first of r; the members of its room are
 * rows mfirst .. mfirst+nmembers-1): the refusals, or the recipients. */
static void submit_decide(struct submit *b, size_t i, PGresult *r, int first, int mfirst, int nmembers)
{
	struct msg_input *in = b->items[i];
	struct item_result *res = &b->res[i];
	/* A room none of the calling peer's users is joined in is, to that
	 * peer, one that does not exist (GET /v1/rooms/{room} says the same),
	 * whatever the item names: the same 404, before its key, references or
	 * body are looked at.  Until the thirty-sixth session it was 403
	 * not_allowed, and a reference was checked first: a batch item naming
	 * a room another peer hosts under a guessable URI told whether it
	 * exists here, and 400 or 403 whether a message id was of that room.
	 * A retry of an item stored in this room is still answered as the
	 * first time (the peer knows the room: its user wrote there). */
	bool replay_here = !PQgetisnull(r, first, 9) && !PQgetisnull(r, first, 1) &&
			   strcmp(PQgetvalue(r, first, 18), PQgetvalue(r, first, 1)) == 0;
	if (PQgetisnull(r, first, 1) ||
	    (!in->local_sender && !replay_here && !joined_member(r, mfirst, nmembers, true, in->caller_peer, NULL))) {
		item_fail(res, 404, "unknown_room", "no such room");
		return;
	}
	if (!PQgetisnull(r, first, 9)) { /* this key answered before */
		char hex[65], hex_old[65], hex_spelled[65];
		cw_hex(hex, in->hash, 32);
		cw_hex(hex_old, item_hash_old(in), 32);
		cw_hex(hex_spelled, in->hash_spelled, 32);
		const char *stored = PQgetvalue(r, first, 9);
		if ((strcmp(hex, stored) != 0 && strcmp(hex_old, stored) != 0 &&
		     !(in->spelled && strcmp(hex_spelled, stored) == 0)) ||
		    strcmp(PQgetvalue(r, first, 18), PQgetvalue(r, first, 1)) != 0) {
			item_fail(res, 409, "conflict", "this Idempotency-Key was used with a different request");
		} else {
			res->status = 202;
			res->body = accepted_answer(PQgetvalue(r, first, 10), PQgetvalue(r, first, 11));
		}
		return;
	}
	if (in->body_room[0] && strcmp(in->body_room, PQgetvalue(r, first, 14)) != 0) {
		item_fail(res, 400, "invalid_body", "the room the body names is not the room of the URL");
		return;
	}
	/* The sender a member (a user of a peer with others in the room, a
	 * local user) before what the item names is looked at: as the job's
	 * earlier items leave her, when one of them is her own leaving or
	 * joining of the group (its change is written with the job:
	 * leaves_send, joins_send), else as round 0 read her. */
	const char *joiner = NULL; /* her identity's id, when she joins with this job */
	int in_job = 0;            /* 1: an earlier item joins her, -1: leaves her */
	/* Only an earlier item that joins or leaves counts, and that is looked
	 * at before its sender and room are compared: until the fifty-eighth
	 * session every earlier item's two strings were, the item's by item
	 * (4,950 pairs of strcmp in a Matrix transaction of 100 messages, 2 %
	 * of the reader thread's samples in tests/bench/matrix). */
	for (size_t j = 0; j < i; j++)
		if ((b->joins[j] || leaves_group(b, j)) && b->items[j] && b->write[j] &&
		    strcmp(b->items[j]->sender, in->sender) == 0 &&
		    strcmp(b->room_id[j], PQgetvalue(r, first, 1)) == 0) {
			if (leaves_group(b, j))
				in_job = -1;
			else if (b->joins[j]) {
				in_job = 1;
				joiner = b->sender_id[j];
			}
		}
	bool member = in_job ? in_job > 0 : joined_member(r, mfirst, nmembers, false, 0, in->sender);
	/* Her own join when she is not joined in a group (she left, by an
	 * earlier item of the job too, or was never in it; a user the server
	 * knows: column 2) joins her, as her peer's adding of her does (POST
	 * /v1/rooms/{room}/members): her peer has a member in it (above), and
	 * the server's rules are asked about her as about a member added
	 * (members_decide).  After her leave in the job she joins again
	 * (joins_send, LEAVE_MEMBERS): until the forty-second session that
	 * join was refused, 403, as a non-member's event. */
	bool joins = !member && in->join && !in->local_sender && !PQgetisnull(r, first, 2) && nmembers > 0 &&
		     !PQgetisnull(r, mfirst, 17);
	if (joins) {
		struct policy_view *view = policy_live_get(in->app->policy);
		struct policy_request preq = {
			.direction = POLICY_INBOUND, .action = POLICY_ACT_NEW_ROOM,
			.sender = { in->sender, in->sender_domain, in->sender_network }, .now_ms = cw_wall_ms(),
		};
		struct policy_decision d;
		policy_decide(view->snap, &preq, &d);
		policy_view_put(view);
		policy_count(in->app, &d);
		if (d.verdict == POLICY_DENY) {
			LOG_KV_LIMITED(CW_LOG_INFO, "member refused by the server's rules", "reason", d.reason, "member",
				       in->sender);
			json_array_append_new(b->audit, peer_audit_record(&d, NULL, in->sender,
				json_pack("{s:s, s:s, s:s, s:s}", "sender", in->sender, "direction", "inbound", "type",
					  "member_add", "room", PQgetvalue(r, first, 14))));
			item_fail(res, 403, "not_allowed", "this provider takes no conversations with %s", in->sender);
			return;
		}
		/* A group as full as rooms.max_members takes her no more than
		 * an add of her (members_admit): counted as round 0 read it,
		 * with the joins and the leaves of the job's earlier items (a
		 * peer's user is never invited: each of those changes the count
		 * by one).  Until the forty-sixth session's review the leaves
		 * were not counted, and a batch of a member's leave and her
		 * join again, or a leave and another's join, in a full group
		 * had its join refused. */
		long members = atol(PQgetvalue(r, mfirst, 10));
		for (size_t j = 0; j < i; j++)
			if (b->items[j] && b->write[j] && strcmp(b->room_id[j], PQgetvalue(r, first, 1)) == 0)
				members += b->joins[j] ? 1 : leaves_group(b, j) ? -1 : 0;
		if (members >= in->app->cfg->rooms_max_members) {
			item_fail(res, 413, "too_large", ROOM_MEMBERS_BOUND, in->app->cfg->rooms_max_members);
			return;
		}
		joiner = PQgetvalue(r, first, 2);
	}
	if (!member && !joins) {
		item_fail(res, 403, "not_allowed", NOT_MEMBER_DETAIL);
		return;
	}
	cw_copy_cut(b->room_id[i], sizeof(b->room_id[i]), PQgetvalue(r, first, 1));
	cw_copy_cut(b->sender_id[i], sizeof(b->sender_id[i]), joiner ? joiner : "");
	b->joins[i] = joins;
	/* A reference not stored may name an earlier item of this job
	 * (intra_refs checks it once every item is decided). */
	bool reply_unstored = in->in_reply_to[0] && PQgetisnull(r, first, 12);
	bool replaces_unstored = in->replaces[0] && PQgetisnull(r, first, 13);
	bool reply_here = reply_unstored &&
			  earlier_item(b, i, in->in_reply_to, b->reply_id[i], sizeof(b->reply_id[i]));
	bool replaces_here = replaces_unstored &&
			     earlier_item(b, i, in->replaces, b->replaces_id[i], sizeof(b->replaces_id[i]));
	if (reply_unstored && !reply_here) {
		item_fail(res, 400, "invalid_body", "content.in_reply_to names no message of this room");
		return;
	}
	if (replaces_unstored && !replaces_here) {
		item_fail(res, 400, "invalid_body", "content.replaces names no message of this room");
		return;
	}
	/* An edit or a delete is its sender's alone: another member (a peer's
	 * user, a local user through an adapter) may not rewrite or remove it. */
	if (in->replaces[0] && !replaces_here && strcmp(PQgetvalue(r, first, 15), in->sender) != 0) {
		item_fail(res, 400, "invalid_body", "%s", SUBMIT_WHY_NOT_SENDERS);
		return;
	}
	const char *why = in->replaces[0] && !replaces_here ? replaces_refused(in->type, PQgetvalue(r, first, 17)) : NULL;
	if (!why && !PQgetisnull(r, first, 20) && PQgetvalue(r, first, 20)[0] == 't')
		why = deleted_why(in); /* a stored delete names what it edits or reacts to */
	if (why) {
		item_fail(res, 400, "invalid_body", "%s", why);
		return;
	}
	if (!reply_here)
		cw_copy_cut(b->reply_id[i], sizeof(b->reply_id[i]), PQgetvalue(r, first, 12));
	if (!replaces_here)
		cw_copy_cut(b->replaces_id[i], sizeof(b->replaces_id[i]), PQgetvalue(r, first, 13));
	/* The recipients: the members other than the sender, except the
	 * sender's own peer (it has the message already).  The policy decides
	 * for each: allowed rows are pending, held ones wait for the local
	 * user's consent (who is asked once), denied ones are kept as dropped
	 * so that the sender sees "not delivered", never why. */
	char caller[24];
	caller[outbox_put_ll(caller, (long long)in->caller_peer)] = '\0';
	struct policy_view *view = policy_live_get(in->app->policy);
	struct policy_rate_memo memo;
	policy_rate_memo_init(&memo, in->app->limits);
	memo.ledger = &b->ledger; /* given back if round 0 runs again (items_send) */
	memo.ledger_item = i;     /* ... or if the write refuses it (refused_give_back) */
	/* A group's member rows say when each member last wrote to members
	 * new to them ('' never; a direct room's: NULL), and since when each
	 * is a member: writing is consent to those the writer wrote to, not
	 * to whoever a peer adds later. */
	bool group = nmembers > 0 && !PQgetisnull(r, mfirst, 17);
	long long sender_since = -1, newest_remote = 0;
	for (int k = mfirst; k < mfirst + nmembers; k++) {
		long long since = atoll(PQgetvalue(r, k, 11));
		if (strcmp(PQgetvalue(r, k, 3), in->sender) == 0)
			sender_since = since;
		else if (PQgetvalue(r, k, 4)[0] != 't' && since > newest_remote)
			newest_remote = since;
	}
	json_t *dests = json_array(), *targets = json_array(), *states = json_array();
	/* made when their first value comes (lazy_append): most items have none */
	json_t *held = NULL, *ask = NULL, *audit = NULL, *outbound = NULL, *refused = NULL;
	const char *deny_reason = NULL;
	unsigned deny_kinds = 0;
	int64_t now = cw_wall_ms();
	/* An edit of a message whose time has come (taken back by the
	 * sweep, or not yet) carries its new text: expired as it comes, as a
	 * message expired on arrival is, and its content not kept, as the
	 * sweep keeps none of the edits it finds (it finds none made after
	 * it; until the twenty-fourth session such an edit was delivered and
	 * kept).  The peer is answered as for any edit. */
	bool late_edit = strcmp(in->type, "edit") == 0 && !replaces_here && !PQgetisnull(r, first, 19) &&
			 atoll(PQgetvalue(r, first, 19)) <= now;
	bool expired = (in->expires && in->expires <= now) || late_edit;
	unsigned char wake = 0;
	struct policy_decision limited = { .verdict = POLICY_ALLOW };
	/* Her joining (b->joins[i]) is charged first as her peer's add of her
	 * is (change_limit: with the peer's domain as the sender, type
	 * member_add), in this event's memo, so that a bucket the two share
	 * (the domain's messages_per_minute) gives one token; past it the
	 * item is refused as an add is, 429, and no recipient is decided.
	 * Until the forty-second session only her own message buckets were
	 * charged, and a peer's users joining and leaving by their own events
	 * went round the limit its adds keep to. */
	char peer_sender[MIMI_DOMAIN_MAX + 16];
	memcpy(peer_sender, "mimi://", 7);
	cw_copy_cut(peer_sender + 7, sizeof(peer_sender) - 7, in->sender_domain);
	bool add_limited = false;
	if (b->joins[i]) {
		struct policy_request areq = {
			.direction = POLICY_INBOUND, .action = POLICY_ACT_EVENT, .event_type = "member_add",
			.sender = { peer_sender, in->sender_domain, in->sender_network }, .now_ms = now,
			.rate = &memo.rate,
		};
		struct policy_decision d;
		policy_decide(view->snap, &areq, &d);
		if (d.verdict == POLICY_LIMIT) {
			policy_count(in->app, &d);
			limited = d;
			add_limited = true;
		}
	}
	for (int k = mfirst; !add_limited && k < mfirst + nmembers; k++) {
		const char *peer_id = PQgetisnull(r, k, 6) ? NULL : PQgetvalue(r, k, 6);
		bool joined = PQgetvalue(r, k, 9)[0] == 't';
		if (strcmp(PQgetvalue(r, k, 3), in->sender) == 0) {
			if (!joined)
				continue; /* invited: not a member who writes (refused below) */
			cw_copy_cut(b->sender_id[i], sizeof(b->sender_id[i]), PQgetvalue(r, k, 2));
			/* A local member's message in a group to members it has
			 * not written to yet: from now on their messages reach
			 * them there (not elsewhere). */
			b->wrote[i] = in->local_sender && group && strcmp(in->type, "message") == 0 &&
				      (!PQgetvalue(r, k, 17)[0] || atoll(PQgetvalue(r, k, 17)) < newest_remote);
			continue;
		}
		if (peer_id && strcmp(peer_id, caller) == 0)
			continue;
		bool local = PQgetvalue(r, k, 4)[0] == 't';
		if (local && in->local_sender && !joined)
			continue; /* a peer put her in and she has not taken part: nothing of the others reaches her */
		if (local && in->local_sender) {
			/* between two users of this provider: not the gateway's business */
			json_array_append_new(dests, json_string(PQgetvalue(r, k, 5)));
			json_array_append_new(targets, json_integer(atoll(PQgetvalue(r, k, 2))));
			json_array_append_new(states, json_string("pending"));
			wake |= WAKE_DISPATCHER;
			continue;
		}
		struct policy_request preq = {
			.direction = in->local_sender ? POLICY_OUTBOUND : local ? POLICY_INBOUND : POLICY_TRANSIT,
			.action = POLICY_ACT_EVENT, .event_type = in->type,
			.sender = { in->sender, in->sender_domain, in->sender_network },
			.recipient = { PQgetvalue(r, k, 3), PQgetvalue(r, k, 8), PQgetvalue(r, k, 5) },
			.body_bytes = in->body_bytes, .attachment_bytes = in->attachment_bytes,
			.content_kinds = in->kinds, .now_ms = cw_wall_ms(), .rate = &memo.rate,
			/* the same condition as the sweep's WROTE_IN_GROUP
			 * (gateway/policy_live.c): change both or neither */
			.recipient_wrote_here = local && group && PQgetvalue(r, k, 17)[0] && sender_since >= 0 &&
						sender_since <= atoll(PQgetvalue(r, k, 17)),
			.group = group, /* outbound: a group's message starts no conversation */
			.started_in_request = in->local_sender && !group && job_started(b, i, in->sender, PQgetvalue(r, k, 3)),
			.invitation = in->invitation,
		};
		struct policy_decision d;
		policy_decide(view->snap, &preq, &d);
		policy_count(in->app, &d);
		if (d.verdict == POLICY_LIMIT) {
			if (limited.verdict != POLICY_LIMIT || d.retry_after_ms > limited.retry_after_ms)
				limited = d;
			continue;
		}
		const char *state = d.verdict == POLICY_ALLOW ? "pending" : d.verdict == POLICY_HOLD ? "held" : "dropped";
		/* Expired already (a disappearing message that came late): kept
		 * for the record, never shown (the sweep deletes its content). */
		if (expired && d.verdict != POLICY_DENY)
			state = "expired";
		/* A peer's users share its one row: the server's deny of one of
		 * them (a user or domain rule, precedence 1: abuse) refuses the
		 * row, or they would read the room through the others'. */
		bool refuses_row = peer_id && d.verdict == POLICY_DENY && strncmp(d.reason, "server_denied_", 14) == 0;
		if (d.verdict != POLICY_ALLOW) {
			json_t *details = json_pack("{s:s, s:s, s:s}", "sender", in->sender,
						"direction", in->local_sender ? "outbound" : local ? "inbound" : "transit",
						"type", in->type);
			if (refuses_row) /* whose deny kept the message from that peer's other users */
				json_object_set_new(details, "refuses_peer", json_string(PQgetvalue(r, k, 7)));
			lazy_append(&audit, peer_audit_record(&d, in->msg_id, PQgetvalue(r, k, 3), details));
		}
		if (d.verdict == POLICY_HOLD && !expired && /* no consent asked for what nobody will see */
		    may_ask(b, i, r, view, &preq, PQgetvalue(r, k, 2), &audit, &ask))
			lazy_append(&held, json_string(PQgetvalue(r, k, 2)));
		/* A local user's message to a remote one in a direct room is
		 * consent to the replies of that conversation, which also lets
		 * them past her missing opt-in to their network (policy.c, step
		 * 5; until the twenty-third session it also opted her in to the
		 * whole network).  Written only if missing, so a pair whose
		 * consent fact the policy already holds (any state: an existing
		 * row is never overwritten) needs no write: most messages of a
		 * conversation.  In a group it is consent to its members there
		 * only (b->wrote), not a consent to each of them everywhere. */
		if (d.verdict == POLICY_ALLOW && in->local_sender && !group && strcmp(in->type, "message") == 0 &&
		    policy_consent_fact(view->snap, in->sender, false, PQgetvalue(r, k, 3)) < 0)
			lazy_append(&outbound, json_string(PQgetvalue(r, k, 3)));
		if (d.verdict == POLICY_DENY && !deny_reason) {
			deny_reason = d.reason;
			deny_kinds = d.refused_kinds;
		}
		if (d.verdict == POLICY_ALLOW)
			wake |= peer_id && strcmp(PQgetvalue(r, k, 16), "pull") == 0 ? WAKE_PULL : WAKE_DISPATCHER;
		if (peer_id) {
			char dest[PEER_NAME_MAX + 8];
			memcpy(dest, "peer:", 5);
			cw_copy_cut(dest + 5, sizeof(dest) - 5, PQgetvalue(r, k, 7));
			size_t seen = SIZE_MAX, denied = SIZE_MAX;
			for (size_t x = 0; x < json_array_size(dests); x++)
				if (strcmp(json_string_value(json_array_get(dests, x)), dest) == 0)
					seen = x;
			for (size_t x = 0; x < json_array_size(refused); x++)
				if (strcmp(json_string_value(json_array_get(refused, x)), dest) == 0)
					denied = x;
			if (refuses_row && denied == SIZE_MAX)
				lazy_append(&refused, json_string(dest));
			if (seen != SIZE_MAX) {
				/* one row per peer: refused by a server deny of any of
				 * its users, else open if any of them may have it */
				if (refuses_row)
					json_array_set_new(states, seen, json_string("dropped"));
				else if (d.verdict == POLICY_ALLOW && !expired && denied == SIZE_MAX)
					json_array_set_new(states, seen, json_string("pending"));
				continue;
			}
			json_array_append_new(dests, json_string(dest));
			json_array_append_new(targets, json_integer(0));
		} else {
			json_array_append_new(dests, json_string(PQgetvalue(r, k, 5)));
			json_array_append_new(targets, json_integer(atoll(PQgetvalue(r, k, 2))));
		}
		json_array_append_new(states, json_string(state));
	}
	policy_view_put(view);
	policy_rate_memo_finish(&memo); /* first_refusal stays readable */
	json_decref(refused);
	bool any_open = false;
	for (size_t x = 0; x < json_array_size(states); x++)
		any_open |= strcmp(json_string_value(json_array_get(states, x)), "dropped") != 0;
	b->outbound[i] = outbound;
	if (limited.verdict == POLICY_LIMIT || !b->sender_id[i][0]) /* refused: it asks nobody */
		for (size_t x = 0; x < json_array_size(ask); x++)
			give_back(b, i);
	if (limited.verdict == POLICY_LIMIT) {
		/* Refused for now, nothing stored; a flood is recorded once
		 * per bucket and episode, not once per refused message. */
		if (memo.first_refusal) {
			char ra[24];
			snprintf(ra, sizeof(ra), "%lld", (long long)limited.retry_after_ms);
			LOG_KV_LIMITED(CW_LOG_INFO, "policy limit", "reason", limited.reason, "sender", in->sender,
				       "retry_after_ms", ra);
			json_t *details = json_pack("{s:s, s:s, s:I}", "sender", add_limited ? peer_sender : in->sender,
						    "type", add_limited ? "member_add" : in->type,
						    "retry_after_ms", (json_int_t)limited.retry_after_ms);
			if (in->local_sender) /* her own outbound limit (docs/policy.md) */
				json_object_set_new(details, "direction", json_string("outbound"));
			if (add_limited) { /* as change_limit records an add's, and whose */
				json_object_set_new(details, "direction", json_string("inbound"));
				json_object_set_new(details, "room", json_string(PQgetvalue(r, first, 14)));
				json_object_set_new(details, "member", json_string(in->sender));
			}
			const char *subject = add_limited ? peer_sender : in->sender;
			json_array_append_new(b->audit, peer_audit_record(&limited, NULL, subject, details));
		}
		json_decref(dests);
		json_decref(targets);
		json_decref(states);
		json_decref(held);
		json_decref(ask);
		json_decref(audit);
		/* A local user (Matrix, XMPP) is told which of her limits, in
		 * the words her adapter shows her ("Not delivered: ..."). */
		if (in->local_sender && policy_reason_text(limited.reason)) {
			/* seconds up to two minutes, then minutes (an hour's
			 * limit: "60 min", not "3600 s") */
			long long s = (limited.retry_after_ms + 999) / 1000;
			item_fail(res, 429, "rate_limited", "%s; write again in %lld %s", policy_reason_text(limited.reason),
				  s <= 120 ? s : (s + 59) / 60, s <= 120 ? "s" : "min");
		} else if (add_limited)
			item_fail(res, 429, "rate_limited", "too many changes from this provider; retry later");
		else
			item_fail(res, 429, "rate_limited", "too many messages from this sender or domain; retry later");
		res->retry_after_ms = limited.retry_after_ms;
		return;
	}
	if (!b->sender_id[i][0]) {
		json_decref(dests);
		json_decref(targets);
		json_decref(states);
		json_decref(held);
		json_decref(ask);
		json_decref(audit);
		item_fail(res, 403, "not_allowed", NOT_MEMBER_DETAIL);
		return;
	}
	if (audit)
		json_array_extend(b->audit, audit);
	json_decref(audit);
	b->dests[i] = dests;
	b->targets[i] = targets;
	b->states[i] = states;
	b->held[i] = held;
	b->ask[i] = ask;
	bool undelivered = json_array_size(dests) > 0 && !any_open;
	b->scrub[i] = undelivered || late_edit;
	res->denied = in->local_sender && undelivered ? deny_reason : NULL;
	res->denied_kinds = res->denied ? deny_kinds : 0;
	b->wake[i] = wake;
	b->grp[i] = group;
	b->write[i] = true;
	b->decided[i] = true;
}

/* A consent or opt-in fact as round 0 read it from the database: -1 no
 * row, 0 opted out / blocked, 1 opted in / allowed (policy_*_fact's). */
static int fact_read(PGresult *r, int row, int col)
{
	if (PQgetisnull(r, row, col))
		return -1;
	const char *v = PQgetvalue(r, row, col);
	return strcmp(v, "t") == 0 || strcmp(v, "allowed") == 0;
}

/* Round 0's facts rows (n = -2, the first nfacts): each local member's
 * opt-in to a remote sender's network and consent to the sender and its
 * domain, as committed before this request's read.  The snapshot in force
 * can be older: a change made a moment ago at another process (or here,
 * its NOTIFY not handled yet) — typically a local user's first message,
 * whose consent and opt-in an automated peer's instant reply depends on.
 * Where the two differ, the policy thread loads those users' facts now
 * and the decisions wait for it (bounded), so nothing the database
 * already says is decided against.  The facts agree on every other
 * message: this costs a comparison. */
static void facts_catch_up(struct submit *b, PGresult *r, int nfacts)
{
	/* As many users as an overlay holds (more: the policy thread reloads
	 * everything). */
	int64_t stale[POLICY_OVERLAY_MAX];
	size_t ns = 0;
	struct policy_view *v = policy_live_get(b->app->policy);
	for (int k = 0; k < nfacts && ns < POLICY_OVERLAY_MAX; k++) {
		const char *local = PQgetvalue(r, k, 5), *sender = PQgetvalue(r, k, 3);
		if (policy_optin_fact(v->snap, local, PQgetvalue(r, k, 7)) == fact_read(r, k, 9) &&
		    policy_consent_fact(v->snap, local, false, sender) == fact_read(r, k, 10) &&
		    policy_consent_fact(v->snap, local, true, PQgetvalue(r, k, 8)) == fact_read(r, k, 16))
			continue;
		int64_t id = atoll(PQgetvalue(r, k, 2));
		size_t x = 0;
		while (x < ns && stale[x] != id)
			x++;
		if (x == ns)
			stale[ns++] = id;
	}
	policy_view_put(v);
	if (ns && !policy_live_catch_up(b->app->policy, stale, ns, 1000))
		LOG_KV_LIMITED(CW_LOG_WARN, "policy: a local user's facts changed and the snapshot did not follow "
					    "within 1 s; deciding with the one in force");
}

/* Whether ref names ("#j") an item of the job that was to be written and
 * was not (409). */
static bool lost_item(const struct submit *b, const char *ref)
{
	if (ref[0] != '#')
		return false;
	size_t j = strtoul(ref + 1, NULL, 10);
	return j < b->n && b->write[j] && b->res[j].status == 409;
}

/* After the write: an item that lost a race for its Idempotency-Key (409,
 * no row) may be named by a later item of the job ("#j": a Matrix
 * transaction's reaction to its message), and the statement gave that one
 * the loser's event id, which no row has: it was stored naming nothing
 * (until the twenty-fourth session it stayed so, and was accepted).  Such
 * an item is refused as the item it names was (409, retry it), and so on
 * down the chain; then every loser is taken out of the write, and true
 * says the write must run again (the transaction is rolled back: what was
 * written is not undone otherwise) without them. */
static bool drop_lost_refs(struct submit *b)
{
	bool named = false;
	/* A reference names an earlier item: one pass in order follows a chain. */
	for (size_t i = 0; i < b->n; i++) {
		if (!b->items[i] || !b->write[i] || b->res[i].status != 202)
			continue;
		const char *ref = lost_item(b, b->reply_id[i]) ? "in_reply_to"
				  : lost_item(b, b->replaces_id[i]) ? "replaces" : NULL;
		if (!ref)
			continue;
		json_decref(b->res[i].body);
		b->res[i].body = NULL;
		item_fail(&b->res[i], 409, CONFLICT_RETRY,
			  "content.%s names an event of this request whose Idempotency-Key was being written "
			  "at the same time; retry it", ref);
		named = true;
	}
	for (size_t i = 0; named && i < b->n; i++)
		if (b->write[i] && b->res[i].status == 409) {
			b->write[i] = false;
			b->wake[i] = 0;
		}
	return named;
}

/* The tokens an item decided to be written took (its messages', a join's
 * member_add: submit_decide's memo, ledger_item i) given back when it is
 * refused after all and stores nothing: by intra_refs in round 0, or by
 * the write (its Idempotency-Key taken by another request meanwhile: 409
 * in_progress; its sender gone from the group: 403; what it names gone
 * or deleted: 400); taken again if a run again of the write writes it
 * after all (a request its key lost to that failed and left the batch).
 * Since the forty-third session: until then a peer's retry of a 409,
 * answered from the stored event, left the refused try's tokens spent,
 * and a sender taken out of a group meanwhile had paid for a message
 * nobody got.  Its consent requests' tokens are the pairs' (give_back:
 * the request is made with another written item, or given back).  An
 * item refused by a limit (429) keeps what the buckets charged before
 * the limit gave, as any decision a limit ends does (docs/policy.md). */
static void refused_give_back(struct submit *b, int round)
{
	if (!b->ledger.rl)
		return;
	int64_t now = cw_wall_ms();
	for (size_t i = 0; i < b->n; i++) {
		if (!b->decided[i])
			continue;
		if (b->write[i] && (round == 0 || b->res[i].status == 202))
			policy_rate_ledger_take_item(&b->ledger, i, now);
		else
			policy_rate_ledger_give_item(&b->ledger, i, now);
	}
}

static cw_err items_recv(PGconn *c, struct submit *b, int round, bool *more, cw_errmsg *e)
{
	bool sent = round == 1, any_write = false;
	for (size_t i = 0; i < b->n && !sent; i++)
		sent = b->items[i] != NULL;
	if (round == 1 && b->ulocked) { /* the users' locks (lock_users_send) */
		PGresult *r;
		b->ulocked = false;
		cw_err rc = store_pipe_result(c, PGRES_TUPLES_OK, &r, e);
		if (rc)
			return rc;
		bool taken = PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
		PQclear(r);
		if (!taken) {
			/* One was taken elsewhere while the transaction held
			 * other locks (LOCK_USERS): run again, these first (and
			 * those of an earlier run again: a merged job decides
			 * again, and may ask others). */
			char *first = b->first ? malloc(strlen(b->first) + strlen(b->uids) + 2) : b->uids;
			if (!first)
				return cw_fail(e, CW_ENOMEM, "out of memory");
			if (b->first) {
				sprintf(first, "%s,%s", b->first, b->uids);
				free(b->first);
				free(b->uids);
			}
			b->first = first;
			b->uids = NULL;
			return cw_fail(e, CW_ERETRY, "a local user's lock was taken elsewhere while the write held others; "
				       "run again with hers first");
		}
	}
	if (round == 1 && b->locked) { /* the rooms' locks (lock_rooms_send) */
		PGresult *r;
		b->locked = false;
		cw_err rc = store_pipe_result(c, PGRES_TUPLES_OK, &r, e);
		if (rc)
			return rc;
		PQclear(r);
	}
	if (round == 1 && b->joined) { /* the joinings (joins_send) */
		PGresult *r;
		b->joined = false;
		cw_err rc = store_pipe_result(c, PGRES_COMMAND_OK, &r, e);
		if (rc)
			return rc;
		PQclear(r);
	}
	if (sent) {
		PGresult *r;
		cw_err rc = store_pipe_result(c, PGRES_TUPLES_OK, &r, e);
		if (rc)
			return rc;
		int rows = PQntuples(r);
		if (round == 0) {
			/* The facts first (n = -2), then the members (n = -1, by
			 * room), then one row per item. */
			int facts = 0, members;
			while (facts < rows && atoi(PQgetvalue(r, facts, 0)) == -2)
				facts++;
			if (facts)
				facts_catch_up(b, r, facts);
			b->nfacts = facts;
			for (members = facts; members < rows && atoi(PQgetvalue(r, members, 0)) < 0;)
				members++;
			const char *last = NULL; /* the room of the previous item, whose members are mfirst, nm */
			int mfirst = 0, nm = 0;
			for (int k = members; k < rows; k++) {
				int n = atoi(PQgetvalue(r, k, 0));
				if ((size_t)n >= b->n || !b->items[n])
					continue;
				const char *room = PQgetvalue(r, k, 1);
				if (!last || strcmp(last, room) != 0) {
					for (mfirst = facts; mfirst < members && strcmp(PQgetvalue(r, mfirst, 1), room) != 0;)
						mfirst++;
					for (nm = 0; mfirst + nm < members && strcmp(PQgetvalue(r, mfirst + nm, 1), room) == 0;)
						nm++;
					last = room;
				}
				submit_decide(b, (size_t)n, r, k, mfirst, nm);
			}
			intra_refs(b);
			refused_give_back(b, 0);
			any_write = round1_needed(b);
		} else {
			/* The rows come in item order: the search starts after
			 * the previous match, so it is one step each (the items
			 * refused for a reference gone come last).  An item
			 * with no row lost a race for its Idempotency-Key (the
			 * insert does nothing on a key taken meanwhile, here or by
			 * another process): 409, the others written as they are
			 * (before, the unique violation failed the whole job, and
			 * every request merged into it, other peers' too). */
			for (size_t i = 0; i < b->n; i++)
				if (b->write[i] && b->res[i].status == 202)
					b->res[i].status = 0; /* a rerun of the write: answered again below */
			size_t from = 0;
			for (int k = 0; k < rows && b->n; k++)
				for (size_t s = 0; s < b->n; s++) {
					size_t i = (from + s) % b->n;
					if (b->write[i] && strcmp(b->items[i]->msg_id, PQgetvalue(r, k, 0)) == 0) {
						json_decref(b->res[i].body); /* a rerun of the write */
						b->res[i].body = NULL;
						const char *gone = PQgetisnull(r, k, 2) ? NULL : PQgetvalue(r, k, 2);
						if (gone && strcmp(gone, "replay") == 0) {
							/* A nonce of its signatures was
							 * claimed before (PEER_NONCES). */
							b->write[i] = false;
							b->wake[i] = 0;
							item_fail(&b->res[i], 401, "bad_signature", "%s", PEER_NONCE_REPLAYED);
						} else if (gone && strcmp(gone, "peer") == 0) {
							/* Its peer was disabled or rotated
							 * (PEER_KEYS): refused as a request
							 * with an unknown token is. */
							b->write[i] = false;
							b->wake[i] = 0;
							item_fail(&b->res[i], 401, "unauthenticated", "%s",
								  APP_PEER_TOKEN_REQUIRED);
						} else if (gone && strcmp(gone, "sender") == 0) {
							/* Its sender left the group since
							 * round 0 (GROUP_JM): refused as
							 * round 0 refuses one not a member. */
							b->write[i] = false;
							b->wake[i] = 0;
							item_fail(&b->res[i], 403, "not_allowed",
								  NOT_MEMBER_DETAIL);
						} else if (gone && strncmp(gone, "sender:", 7) == 0) {
							/* It names an item of the job refused
							 * so (GROUP_REFS_GONE_MORE): refused
							 * as that one is. */
							b->write[i] = false;
							b->wake[i] = 0;
							item_fail(&b->res[i], 403, "not_allowed",
								  "content.%s names an event of this request whose "
								  "sender is not a member of this room",
								  gone + 7);
						} else if (gone && strcmp(gone, "deleted") == 0) {
							/* What it edits or reacts to was
							 * deleted since round 0 read
							 * (DELETED_TARGETS): refused as round 0
							 * refuses it. */
							b->write[i] = false;
							b->wake[i] = 0;
							item_fail(&b->res[i], 400, "invalid_body", "%s",
								  deleted_why(b->items[i]));
						} else if (!PQgetisnull(r, k, 2)) {
							/* Its reference is gone (deleted since
							 * round 0): refused as one naming an
							 * unknown message is, and for good. */
							b->write[i] = false;
							b->wake[i] = 0;
							item_fail(&b->res[i], 400, "invalid_body",
								  "content.%s names no message of this room",
								  PQgetvalue(r, k, 2));
						} else {
							b->res[i].status = 202;
							b->res[i].body = b->no_answers ? NULL
									 : accepted_answer(b->items[i]->msg_id,
											   PQgetvalue(r, k, 1));
						}
						from = i + 1;
						break;
					}
				}
			/* Each first contact held past its user's bound with no
			 * request (CONSENT_ASK_SQL, "unasked"): a limit decision,
			 * counted as round 0 counts the policy's, and its
			 * sender's token given back (give_back); so is the token
			 * of each pair whose request the write did not make for
			 * another reason ("unmade": another transaction made it
			 * meanwhile, found standing or at the insert's ON
			 * CONFLICT; its item not written), since the forty-third
			 * session. */
			unsigned *unasked = NULL; /* per item, made at the first (most writes have none) */
			for (int k = 0; k < rows; k++)
				if (PQgetisnull(r, k, 0) && !PQgetisnull(r, k, 2) &&
				    (strcmp(PQgetvalue(r, k, 2), "unasked") == 0 ||
				     strcmp(PQgetvalue(r, k, 2), "unmade") == 0)) {
					if (strcmp(PQgetvalue(r, k, 2), "unasked") == 0)
						policy_count(b->app, &(struct policy_decision){
									     .verdict = POLICY_LIMIT,
									     .reason = "rate_limited_recipient_consent_requests" });
					size_t n = (size_t)atoll(PQgetvalue(r, k, 1));
					if (!unasked)
						unasked = calloc(b->n, sizeof(*unasked)); /* none given back without */
					if (unasked && n < b->n && b->items[n])
						unasked[n]++;
				}
			for (size_t i = 0; i < b->n; i++) {
				unsigned now_unasked = unasked ? unasked[i] : 0;
				for (; b->given[i] < now_unasked; b->given[i]++)
					give_back(b, i);
				/* a run before gave back more than this one holds
				 * unasked: its requests are made now */
				for (; b->given[i] > now_unasked && b->items[i]; b->given[i]--)
					retake(b, i);
			}
			free(unasked);
			for (size_t i = 0; i < b->n; i++)
				if (b->write[i] && b->res[i].status != 202) {
					json_decref(b->res[i].body);
					b->res[i].body = NULL;
					item_fail(&b->res[i], 409, CONFLICT_RETRY,
						  "a request with this Idempotency-Key was being written at the same time; "
						  "retry it");
				}
			if (drop_lost_refs(b)) {
				PQclear(r);
				return cw_fail(e, CW_ERETRY, "an item named one that lost a race for its key");
			}
			refused_give_back(b, 1);
			any_write = true;
		}
		PQclear(r);
	}
	if (round == 1 && sent && b->left) { /* the leavings (leaves_send) */
		PGresult *r;
		b->left = false;
		cw_err rc = store_pipe_result(c, PGRES_COMMAND_OK, &r, e);
		if (rc)
			return rc;
		PQclear(r);
	}
	if (round == 1 && sent && b->notified) { /* the NOTIFY */
		PGresult *r;
		cw_err rc = store_pipe_result(c, PGRES_TUPLES_OK, &r, e);
		if (rc)
			return rc;
		PQclear(r);
	}
	*more = round == 0 && any_write;
	return CW_OK;
}

cw_err submit_prepare(PGconn *c, struct submit *b, bool *write, cw_errmsg *e)
{
	cw_err rc = items_send(c, b, 0, e);
	return rc ? rc : items_recv(c, b, 0, write, e);
}

/* A refused item of a batch: its detail goes through the same scrub as a
 * problem's (cw_problem_detail), so that one that quotes outside input
 * never breaks the answer (until the twenty-fourth session it did not, and
 * only no detail repeating a caller's bytes kept it whole). */
static json_t *problem_item(json_t *key, int status, const char *code, const char *detail)
{
	return json_pack("{s:O, s:s, s:i, s:s, s:o}", "idempotency_key", key, "status", "refused", "http_status", status,
			 "code", code, "detail", cw_problem_detail(detail));
}

/* The answer to POST /v1/batch, one result per item; 401 as a whole when
 * the write found its peer disabled or rotated (PEER_KEYS: then none of
 * its items was written). */
static void batch_answer(struct app_job *j)
{
	struct submit *b = j->data;
	for (size_t i = 0; i < b->n; i++)
		if (b->items[i] && b->res[i].code && strcmp(b->res[i].code, "unauthenticated") == 0) {
			app_job_fail(j, 401, "unauthenticated", "%s", APP_PEER_TOKEN_REQUIRED);
			return;
		}
	json_t *results = json_array();
	for (size_t i = 0; i < b->n; i++) {
		json_t *key = json_array_get(b->keys, i);
		if (!b->items[i]) {
			json_array_append(results, json_array_get(b->refused, i));
		} else if (b->res[i].code) {
			json_t *o = problem_item(key, b->res[i].status, b->res[i].code, b->res[i].detail);
			if (o && b->res[i].status == 429)
				json_object_set_new(o, "retry_after_ms", json_integer((json_int_t)b->res[i].retry_after_ms));
			json_array_append_new(results, o);
		} else {
			json_t *o = json_copy(b->res[i].body); /* shallow: only a key is added */
			json_object_set(o, "idempotency_key", key);
			json_array_append_new(results, o);
		}
	}
	j->status = 200;
	j->body = json_pack("{s:o}", "results", results);
}

/* POST /v1/batch: one job per request.  The reading round runs on a
 * reader (batch_prepare), so the group-commit writer only writes: its
 * round 0 is the items' round 1. */
static cw_err batch_prepare(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	bool write = false;
	cw_err rc = submit_prepare(c, j->data, &write, e);
	if (!rc && !write) {
		batch_answer(j);
		j->no_write = true;
	}
	return rc;
}

static cw_err batch_send(PGconn *c, struct app_job *j, int round, cw_errmsg *e)
{
	return items_send(c, j->data, round + 1, e);
}

static cw_err batch_recv(PGconn *c, struct app_job *j, int round, bool *more, cw_errmsg *e)
{
	cw_err rc = items_recv(c, j->data, round + 1, more, e);
	if (!rc && !*more)
		batch_answer(j);
	return rc;
}

static const char *batch_first_locks(struct app_job *j)
{
	return submit_first_locks(j->data);
}

static const struct app_pipe_ops submit_ops = { batch_send, batch_recv, batch_first_locks };

/* ------------------------------------------------------------ for local adapters */

void submit_setup(struct submit *b, struct cw_app *app, enum submit_room_by room_by)
{
	b->app = app;
	b->room_by = room_by;
	b->no_answers = true;
}

size_t submit_count(const struct submit *b)
{
	return b->n;
}

bool submit_put_local(struct submit *b, size_t i, struct cw_app *app, const char *network, const char *room,
		      const char *native_id, const char *sender, struct event *ev, const char *msg_id)
{
	struct msg_input *in = calloc(1, sizeof(*in));
	if (!in)
		return false;
	in->app = app;
	in->local_sender = true;
	cw_copy_cut(in->sender_domain, sizeof(in->sender_domain), app->cfg->domain ? app->cfg->domain : "");
	cw_copy_cut(in->sender_network, sizeof(in->sender_network), network);
	cw_copy_cut(in->scope, sizeof(in->scope), network);
	cw_copy_cut(in->native_id, sizeof(in->native_id), native_id);
	in->idem_key = strdup(native_id);
	msg_input_from_event(in, app, room, sender, ev, msg_id);
	if (!in->idem_key || !in->event_text) {
		msg_input_free(in);
		return false;
	}
	if (b->items[i])
		msg_input_free(b->items[i]);
	b->items[i] = in;
	return true;
}

cw_err submit_send(PGconn *c, struct submit *b, int round, cw_errmsg *e)
{
	return items_send(c, b, round, e);
}

cw_err submit_recv(PGconn *c, struct submit *b, int round, bool *more, cw_errmsg *e)
{
	return items_recv(c, b, round, more, e);
}

cw_err submit_write_limits(PGconn *c, const struct submit *b, cw_errmsg *e)
{
	size_t i;
	json_t *rec;
	json_array_foreach(b->audit, i, rec) {
		const char *action = json_string_value(json_object_get(rec, "action"));
		cw_err rc;
		if (action && strcmp(action, "policy.limit") == 0 && !json_is_string(json_object_get(rec, "pid")) &&
		    (rc = audit_record_write(c, rec, e)))
			return rc;
	}
	return CW_OK;
}

const char *submit_denied(const struct submit *b, size_t i)
{
	return b->items[i] && b->res[i].status == 202 ? b->res[i].denied : NULL;
}

const char *submit_denied_text(const struct submit *b, size_t i)
{
	const char *reason = submit_denied(b, i);
	if (!reason)
		return NULL;
	struct policy_decision d = { .verdict = POLICY_DENY, .reason = reason, .refused_kinds = b->res[i].denied_kinds };
	return policy_decision_text(&d);
}

int64_t submit_retry_after_ms(const struct submit *b, size_t i)
{
	return b->items[i] && b->res[i].status == 429 ? b->res[i].retry_after_ms : 0;
}

int submit_result(const struct submit *b, size_t i, const char **code, const char **detail)
{
	*code = b->res[i].code;
	*detail = b->res[i].detail;
	return b->items[i] ? b->res[i].status : 0;
}

/* ------------------------------------------------------------ coalescing
 *
 * Single-event requests (messages, receipts, typing) are coalesced: a
 * request's item joins a queue, and one store job takes everything queued
 * when it starts, so thirty requests arriving during one commit cost two
 * statements in the next, not sixty.  Each request is answered and resumed
 * on its own when the job's outcome is known. */
struct submit_queue {
	pthread_mutex_t mu;
	struct msg_input *head, *tail;
	size_t n;          /* items between head and tail (the metric) */
	bool job_queued;   /* a job exists that has not taken the queue yet */
};

struct merged {
	struct cw_app *app;
	struct submit *b;  /* NULL until the job takes the queue */
};

struct submit_queue *submit_queue_new(void)
{
	struct submit_queue *q = calloc(1, sizeof(*q));
	if (q)
		pthread_mutex_init(&q->mu, NULL);
	return q;
}

void submit_queue_free(struct submit_queue *q)
{
	if (!q)
		return;
	pthread_mutex_destroy(&q->mu);
	free(q);
}

size_t submit_queue_count(struct submit_queue *q)
{
	if (!q)
		return 0;
	pthread_mutex_lock(&q->mu);
	size_t n = q->n;
	pthread_mutex_unlock(&q->mu);
	return n;
}

static struct msg_input *queue_take(struct submit_queue *q)
{
	pthread_mutex_lock(&q->mu);
	struct msg_input *list = q->head;
	q->head = q->tail = NULL;
	q->n = 0;
	q->job_queued = false;
	pthread_mutex_unlock(&q->mu);
	return list;
}

static void answer_item(struct cw_app *app, struct msg_input *in, const struct item_result *res, cw_err rc,
			const char *why)
{
	struct cw_req *req = in->req;
	if (rc)
		app_reply_store_error(app, req, rc, why);
	else if (res->code) {
		if (res->status == 429)
			app_retry_after(req, res->retry_after_ms);
		else if (res->status == 401)
			cw_req_add_header(req, "WWW-Authenticate", "Bearer");
		else if (strcmp(res->code, CONFLICT_RETRY) == 0)
			cw_req_add_header(req, "Retry-After", "1"); /* the other request's commit is near */
		cw_req_problem(req, res->status, res->code, app_status_title(res->status), res->detail);
	}
	else
		cw_req_reply_json(req, res->status, json_incref(res->body));
	cw_req_resume(req);
}

/* FNV-1a of a request's scope and idempotency key from seed, for
 * group_dup. */
static uint64_t idem_hash(uint64_t seed, const struct msg_input *x)
{
	return fnv1a(fnv1a_field(seed, x->scope), x->idem_key, strlen(x->idem_key));
}

/* Whether x has the scope and key of a request already in the group, whose
 * items are indexed (position + 1) by seen[], an open-addressed table of
 * mask + 1 slots at least twice the group hashed from seed (drawn for each
 * group: with a start a peer knows, keys chosen to share a slot made the
 * check quadratic again); if not, x's slot is *slot.
 * Until the forty-fourth session each request was compared with every
 * earlier one: 378 comparisons in a group of 28. */
static bool group_dup(const struct submit *b, const uint32_t *seen, size_t mask, uint64_t seed,
		      const struct msg_input *x, size_t *slot)
{
	size_t k = (size_t)idem_hash(seed, x) & mask;
	for (; seen[k]; k = (k + 1) & mask) {
		const struct msg_input *y = b->items[seen[k] - 1];
		if (strcmp(y->idem_key, x->idem_key) == 0 && strcmp(y->scope, x->scope) == 0)
			return true;
	}
	*slot = k;
	return false;
}

static cw_err merged_send(PGconn *c, void *arg, int round, cw_errmsg *e)
{
	struct merged *m = arg;
	if (!m->b) { /* first run: take what is queued (a rerun keeps the same items) */
		struct msg_input *list = queue_take(m->app->submits);
		size_t n = 0;
		for (struct msg_input *x = list; x; x = x->next)
			n++;
		size_t mask = 15;
		while (mask < 2 * n)
			mask = 2 * mask + 1;
		uint32_t *seen = n < UINT32_MAX / 2 ? calloc(mask + 1, sizeof(*seen)) : NULL;
		m->b = seen ? submit_new(n) : NULL;
		if (!m->b) {
			free(seen);
			for (struct msg_input *x = list, *next; x; x = next) {
				next = x->next;
				struct item_result none = { 0 };
				answer_item(m->app, x, &none, CW_ENOMEM, "out of memory");
				msg_input_free(x);
			}
			return cw_fail(e, CW_ENOMEM, "out of memory");
		}
		size_t i = 0;
		uint64_t seed;
		cw_random_pooled(&seed, sizeof(seed));
		for (struct msg_input *x = list, *next; x; x = next) {
			next = x->next;
			x->next = NULL;
			/* The same key twice in one group would collide at the
			 * write: the later one is answered as a conflict now. */
			size_t slot;
			if (group_dup(m->b, seen, mask, seed, x, &slot)) {
				struct item_result r = { .status = 409, .code = CONFLICT_RETRY };
				snprintf(r.detail, sizeof(r.detail), "a request with this Idempotency-Key is in progress; retry");
				answer_item(m->app, x, &r, CW_OK, NULL);
				msg_input_free(x);
				continue;
			}
			m->b->items[i++] = x;
			seen[slot] = (uint32_t)i;
		}
		free(seen);
		m->b->n = i;
		m->b->app = m->app;
	}
	return items_send(c, m->b, round, e);
}

static cw_err merged_recv(PGconn *c, void *arg, int round, bool *more, cw_errmsg *e)
{
	struct merged *m = arg;
	return items_recv(c, m->b, round, more, e);
}

static void merged_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct merged *m = arg;
	if (m->b) {
		for (size_t i = 0; i < m->b->n; i++)
			answer_item(m->app, m->b->items[i], &m->b->res[i], rc, e ? e->msg : "");
		submit_free(m->b);
	} else {
		/* The job ended before it ran (its deadline passed, the database
		 * went away): what waits in the queue gets its answer now. */
		for (struct msg_input *x = queue_take(m->app->submits), *next; x; x = next) {
			next = x->next;
			struct item_result none = { 0 };
			answer_item(m->app, x, &none, rc ? rc : CW_EINTERNAL, e ? e->msg : "");
			msg_input_free(x);
		}
	}
	free(m);
}

static const char *merged_first_locks(void *arg)
{
	struct merged *m = arg;
	return submit_first_locks(m->b);
}

static const struct store_pipe_ops merged_ops = { merged_send, merged_recv, merged_first_locks };

/* Queues one item (the request is suspended) and makes sure a job will
 * take it. */
static void submit_coalesced(struct cw_app *app, struct cw_req *req, struct msg_input *in)
{
	struct submit_queue *q = app->submits;
	in->req = req;
	cw_req_suspend(req);
	pthread_mutex_lock(&q->mu);
	if (q->tail)
		q->tail->next = in;
	else
		q->head = in;
	q->tail = in;
	q->n++;
	bool start = !q->job_queued;
	q->job_queued = true;
	pthread_mutex_unlock(&q->mu);
	if (!start)
		return;
	struct merged *m = calloc(1, sizeof(*m));
	cw_err rc = CW_ENOMEM;
	if (m) {
		m->app = app;
		rc = store_write_pipe(app->store, &merged_ops, merged_done, m);
	}
	if (rc) { /* refused (the database is away): answer everything queued */
		free(m);
		for (struct msg_input *x = queue_take(q), *next; x; x = next) {
			next = x->next;
			struct item_result none = { 0 };
			answer_item(app, x, &none, rc, cw_strerror(rc));
			msg_input_free(x);
		}
	}
}

/* Which event types an endpoint takes (a bit per enum event_type). */
#define TYPES_MESSAGES (~((1u << EVENT_RECEIPT) | (1u << EVENT_TYPING)))
#define TYPES_RECEIPTS (1u << EVENT_RECEIPT)
#define TYPES_TYPING (1u << EVENT_TYPING)

/* Why a peer's event is refused for its sender (403 not_allowed), NULL
 * when it is not: a user of another domain than the calling peer's.  An
 * event without a sender never gets here: the parser refuses it
 * (EVENT_REQUIRE_SENDER), 400 invalid_body "sender is required." at its
 * pointer, a batch item as any other invalid one, holding no key.  Until
 * the fiftieth session's review it was 403 not_allowed here, "sender must
 * be a user of the calling peer's domain", which did not say what was
 * missing; then for a while 400 from here, after the batch's parser had
 * given the item its key: its corrected copy later in the same batch was
 * refused as a repeat. */
static const char *sender_refused(const struct event *ev, const struct peer_principal *p)
{
	return strcmp(ev->sender.domain, p->domain) != 0 ? "sender must be a user of the calling peer's domain" : NULL;
}

/* A peer's `membership` event tells of its own user's joining or leaving
 * only: its target is its sender, and its `by`, when sent, the peer's own
 * domain.  A change of others' membership is made, and told to the group's
 * other peers (signed by this provider, `by` the domain that made it), by
 * POST /v1/rooms/{room}/members, where a peer takes out its own users
 * alone; until the thirty-sixth session a peer's event naming another
 * peer's user, or this provider's, as leaving "by" this provider was
 * accepted and pushed, signed, to the other peers, when nothing had
 * changed.  NULL when ev may be taken, else why not (403 not_allowed, in
 * a batch that item alone).  Its `by` is compared in any case (a DNS
 * name's case means nothing); membership_by_spelled respells it. */
static const char *membership_refused(const struct event *ev, const struct peer_principal *p)
{
	if (ev->type != EVENT_MEMBERSHIP)
		return NULL;
	if (!ev->has_target || !ev->has_sender || !mimi_uri_equal(&ev->target, &ev->sender))
		return "a membership event tells of its sender's own joining or leaving (content.target must be the "
		       "sender); a peer changes others' membership with POST /v1/rooms/{room}/members";
	json_t *by = json_object_get(json_object_get(ev->json, "content"), "by");
	if (!by)
		return NULL;
	if (!(json_is_string(by) && strcasecmp(json_string_value(by), p->domain) == 0))
		return "content.by of a peer's membership event, when sent, is the calling peer's own domain";
	return NULL;
}

/* A membership event's `by` (membership_refused took it: the calling
 * peer's domain in any case) is kept, and passed on to the other peers
 * and the local adapters, in the one spelling of the peer's domain (lower
 * case), so that none of them has to fold it to tell it from another
 * domain (until the forty-second session "WA.example" went on as sent).
 * After msg_input_from_event: the request's hash stays that of the event
 * as sent, as for every other member (a typing notification's too), so
 * that a retry of the same bytes is the same request whatever the daemon
 * that stored its key; in the forty-second session the hash was of the
 * respelled event, and a key stored before it, retried, was a 409.  A key
 * stored then (hash_spelled) is the same request too.  in->event_text is
 * NULL when out of memory. */
static void membership_by_spelled(struct msg_input *in, struct event *ev, const struct peer_principal *p)
{
	json_t *by = ev->type == EVENT_MEMBERSHIP ? json_object_get(json_object_get(ev->json, "content"), "by") : NULL;
	if (!in->event_text || !json_is_string(by) || strcmp(json_string_value(by), p->domain) == 0)
		return;
	item_hash_old(in); /* of the event as sent */
	free(in->event_text);
	in->event_text = json_string_set(by, p->domain) == 0 ? json_dumps(ev->json, JSON_COMPACT | JSON_SORT_KEYS)
							      : NULL;
	if (in->event_text) {
		request_hash(in->event_text, in->hash_spelled);
		in->spelled = true;
	}
}

/* Submits one event to the room of the URL.  key_required: the request
 * must carry an Idempotency-Key (otherwise one is made from the request's
 * signature, its created and nonce: a captured request replayed to another
 * daemon process, which has not seen the nonce, is then the same request
 * again and changes nothing, while each fresh signature is a new event;
 * and the nonces of all its signatures are claimed with the write,
 * PEER_NONCES, so that one replayed with another of them alone, which
 * makes another key, is refused there). */
static void submit_one(struct cw_req *req, struct cw_app *app, unsigned types, bool key_required)
{
	if (!peer_api_enabled(app, req))
		return;
	struct peer_principal *p = cw_req_principal(req);
	const char *room = cw_req_param(req, "room");
	if (!room_public_id_valid(room)) {
		cw_req_problem(req, 404, "unknown_room", "Unknown room", "no such room");
		return;
	}
	const char *key = cw_req_header(req, "Idempotency-Key");
	if (key)
		cw_req_set_retry_safe(req); /* a key made of the signature is not: a retry is signed anew */
	char made_key[64]; /* "sig-", then 43 of base64url (the padded form is encoded first) */
	bool claim = false; /* the key is made: the nonces are claimed */
	if (!key && !key_required) {
		char created[24];
		unsigned char md[32];
		snprintf(created, sizeof(created), "%lld", (long long)p->created);
		if (!cw_sha256_pair(created, strlen(created), p->nonce, strlen(p->nonce), md)) {
			cw_req_no_memory(req);
			return;
		}
		memcpy(made_key, "sig-", 4);
		cw_b64url_encode(made_key + 4, sizeof(made_key) - 4, md, sizeof(md));
		key = made_key;
		claim = p->nonce[0] != '\0';
	}
	if (!key || !idempotency_key_valid(key)) {
		cw_req_problem(req, 400, "invalid_header", "Invalid header",
			       "Idempotency-Key is required: 1 to 128 of A-Z a-z 0-9 . _ : -");
		return;
	}
	if (!app_is_json(req))
		return;
	size_t blen;
	const char *body = cw_req_body(req, &blen);
	struct event_limits lim = event_limits_default();
	lim.max_ts = cw_wall_ms() + EVENT_TS_AHEAD_MS;
	struct event ev;
	struct event_error err;
	if (event_parse(body, blen, &lim, EVENT_REQUIRE_SENDER, &ev, &err)) {
		event_problem(req, &err);
		return;
	}
	if (!(types & (1u << ev.type))) {
		char detail[160];
		snprintf(detail, sizeof(detail), "this endpoint does not take %s events%s", event_type_name(ev.type),
			 ev.type == EVENT_RECEIPT ? " (use /receipts)" : ev.type == EVENT_TYPING ? " (use /typing)" : "");
		event_free(&ev);
		cw_req_problem(req, 400, "invalid_body", "Invalid body", detail);
		return;
	}
	char sender[MIMI_URI_MAX + 1];
	const char *refused = sender_refused(&ev, p);
	if (!refused)
		refused = membership_refused(&ev, p);
	if (refused) {
		event_free(&ev);
		cw_req_problem(req, 403, "not_allowed", "Not allowed", refused);
		return;
	}
	mimi_uri_format(&ev.sender, sender, sizeof(sender), NULL);
	struct msg_input *in = calloc(1, sizeof(*in));
	if (in) {
		msg_input_from_peer(in, p);
		in->idem_key = strdup(key);
		if (claim) {
			in->nonces = peer_nonces_json(p);
			in->nonces_stale = peer_nonce_stale_before(cw_wall_ms() / 1000, app->cfg->max_clock_skew_s);
		}
		msg_input_from_event(in, app, room, sender, &ev, NULL);
		membership_by_spelled(in, &ev, p);
		if (ev.has_room)
			mimi_uri_format(&ev.room, in->body_room, sizeof(in->body_room), NULL);
	}
	event_free(&ev);
	if (!in || !in->idem_key || !in->event_text || (claim && !in->nonces)) {
		if (in)
			msg_input_free(in);
		cw_req_no_memory(req);
		return;
	}
	submit_coalesced(app, req, in);
}

void peer_api_message_submit(struct cw_req *req, void *ctx) { submit_one(req, ctx, TYPES_MESSAGES, true); }
void peer_api_receipt_submit(struct cw_req *req, void *ctx) { submit_one(req, ctx, TYPES_RECEIPTS, false); }
void peer_api_typing_submit(struct cw_req *req, void *ctx) { submit_one(req, ctx, TYPES_TYPING, false); }

struct status_input {
	char msg_id[80];
	int64_t peer_id;
	int64_t held_expiry_s;
};

/* What a peer may see of a delivery: never why it was not delivered.  To
 * a local user (local), a message that waits for their consent, one the
 * policy stopped (they blocked the sender, are not opted in, do not exist:
 * an unknown user is one not opted in) and one that expired unseen all
 * look alike: accepted while a held message would still wait (young:
 * younger than policy.held_expiry_seconds), then not_delivered.  Before,
 * a denied message showed not_delivered at once and a held one accepted
 * for days: "accepted" told that the user exists and is opted in. */
static const char *peer_visible_status(const char *state, bool read, bool local, bool young)
{
	if (strcmp(state, "delivered") == 0)
		return read ? "read" : "delivered";
	bool unseen = strcmp(state, "dropped") == 0 || strcmp(state, "expired") == 0 || strcmp(state, "held") == 0;
	if (local && unseen)
		return young ? "accepted" : "not_delivered";
	if (unseen || strcmp(state, "dead") == 0)
		return "not_delivered";
	return "accepted";
}

static cw_err message_status_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct status_input *in = j->data;
	char pid[24];
	snprintf(pid, sizeof(pid), "%lld", (long long)in->peer_id);
	char expiry[24];
	snprintf(expiry, sizeof(expiry), "%lld", (long long)in->held_expiry_s);
	const char *params[] = { in->msg_id, pid, expiry };
	/* The recipients in the order of their URIs (byte order, whatever the
	 * database's collation), not of their outbox rows: those follow the
	 * order of the members' identity rows, which is the order in which
	 * this provider first heard of each user.  A peer that added to a
	 * group a handle it made up and then the one it asked about read from
	 * the status of a typing notification whether that user was known
	 * before (until the thirty-second session). */
	/* A local user a peer put into a group who declined while invited
	 * (left, peer_invited: docs/policy.md) gets no row of what comes
	 * after, and is listed as a user who never answered (or does not
	 * exist) would be: her row as a dropped one, the event's time its
	 * age (the second part).  Until the forty-first session she was left
	 * out, and the status of the peer's next message told it that she
	 * exists and declined, while GET /v1/rooms/{room} still listed her
	 * invited.  Only for an event the peer submitted (its key in
	 * origin_native_id), which the group's invited members are decided
	 * for; not for one she declined after (her row is there), nor one
	 * from before she was in the group (her row's change is later). */
	PGresult *r = exec(c,
		"SELECT * FROM (SELECT (extract(epoch FROM ev.accepted_at) * 1000)::bigint AS ms, o.state, "
		"o.read_at IS NOT NULL, coalesce(t.uri, 'mimi://' || p.domain) AS who, r.public_id, "
		"coalesce(t.is_local, false), o.created_at > now() - make_interval(secs => $3::bigint) "
		"FROM events ev JOIN identities s ON s.id = ev.sender_id JOIN rooms r ON r.id = ev.room_id "
		"LEFT JOIN outbox o ON o.event_id = ev.id LEFT JOIN identities t ON t.id = o.target_identity_id "
		"LEFT JOIN peers p ON o.destination = 'peer:' || p.name "
		"WHERE ev.public_id = $1 AND s.peer_id = $2::bigint "
		"UNION ALL SELECT (extract(epoch FROM ev.accepted_at) * 1000)::bigint, 'dropped', false, i.uri, "
		"r.public_id, true, ev.accepted_at > now() - make_interval(secs => $3::bigint) "
		"FROM events ev JOIN identities s ON s.id = ev.sender_id JOIN rooms r ON r.id = ev.room_id "
		"JOIN room_members m ON m.room_id = ev.room_id AND m.membership = 'left' AND m.peer_invited "
		"AND m.updated_at < ev.accepted_at JOIN identities i ON i.id = m.identity_id AND i.is_local "
		"WHERE ev.public_id = $1 AND s.peer_id = $2::bigint AND ev.origin_native_id IS NOT NULL "
		"AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = ev.id AND o.target_identity_id = i.id)) x "
		"ORDER BY x.who COLLATE \"C\", x.state", 3, params);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 0) {
		PQclear(r);
		app_job_fail(j, 404, "unknown_message", "no such message");
		return CW_OK;
	}
	json_t *recipients = json_array();
	for (int i = 0; i < PQntuples(r); i++) {
		if (PQgetisnull(r, i, 1))
			continue; /* no recipient (all of them were the sender's own users) */
		json_array_append_new(recipients,
				      json_pack("{s:s, s:s}", "recipient", PQgetvalue(r, i, 3), "status",
						peer_visible_status(PQgetvalue(r, i, 1), PQgetvalue(r, i, 2)[0] == 't',
								    PQgetvalue(r, i, 5)[0] == 't',
								    PQgetvalue(r, i, 6)[0] == 't')));
	}
	j->body = json_pack("{s:s, s:s, s:I, s:o}", "id", in->msg_id, "room", PQgetvalue(r, 0, 4), "accepted_ts",
			    (json_int_t)atoll(PQgetvalue(r, 0, 0)), "recipients", recipients);
	PQclear(r);
	return CW_OK;
}

void peer_api_message_status(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	if (!peer_api_enabled(app, req))
		return;
	const char *id = cw_req_param(req, "id");
	if (!message_id_valid(id)) {
		cw_req_problem(req, 404, "unknown_message", "Unknown message", "no such message");
		return;
	}
	struct status_input *in = calloc(1, sizeof(*in));
	if (!in) {
		cw_req_no_memory(req);
		return;
	}
	snprintf(in->msg_id, sizeof(in->msg_id), "%s", id);
	in->peer_id = ((struct peer_principal *)cw_req_principal(req))->id;
	struct policy_view *v = policy_live_get(app->policy);
	in->held_expiry_s = v->set.held_expiry_s;
	policy_view_put(v);
	app_job_run(app, req, message_status_fn, in, free, false);
}

/* ------------------------------------------------------------ batch */

void peer_api_batch(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	if (!peer_api_enabled(app, req))
		return;
	struct peer_principal *p = cw_req_principal(req);
	if (!app_is_json(req))
		return;
	size_t blen;
	const char *body = cw_req_body(req, &blen);
	struct event_limits lim = batch_limits(app);
	lim.max_ts = cw_wall_ms() + EVENT_TS_AHEAD_MS;
	struct batch bt;
	struct event_error err;
	if (batch_parse(body, blen, &lim, EVENT_REQUIRE_SENDER, &bt, &err)) {
		event_problem(req, &err);
		return;
	}
	struct submit *b = submit_new(bt.n);
	if (!b) {
		batch_free(&bt);
		cw_req_no_memory(req);
		return;
	}
	b->room_by = SUBMIT_ROOM_BY_URI;
	b->app = app;
	for (size_t i = 0; i < bt.n; i++) {
		struct batch_item *it = &bt.items[i];
		json_t *key = it->idempotency_key[0] ? json_string(it->idempotency_key) : json_null();
		json_array_append(b->keys, key);
		if (it->rc == CW_ENOMEM) {
			json_decref(key);
			batch_free(&bt);
			submit_free(b);
			cw_req_no_memory(req);
			return;
		}
		if (it->rc) {
			char detail[420];
			snprintf(detail, sizeof(detail), "%s (at %s)", it->err.detail, it->err.pointer);
			json_array_append_new(b->refused, problem_item(key, strcmp(it->err.code, EVENT_ERR_TOO_LARGE) == 0
									      ? 413 : 400, it->err.code, detail));
			json_decref(key);
			continue;
		}
		const char *refused = sender_refused(&it->ev, p);
		if (!refused)
			refused = membership_refused(&it->ev, p);
		if (refused) {
			json_array_append_new(b->refused, problem_item(key, 403, "not_allowed", refused));
			json_decref(key);
			continue;
		}
		json_decref(key);
		json_array_append_new(b->refused, json_null());
		struct msg_input *in = calloc(1, sizeof(*in));
		if (in) {
			msg_input_from_peer(in, p);
			in->idem_key = strdup(it->idempotency_key);
			char room[MIMI_URI_MAX + 1], sender[MIMI_URI_MAX + 1];
			mimi_uri_format(&it->room, room, sizeof(room), NULL);
			mimi_uri_format(&it->ev.sender, sender, sizeof(sender), NULL);
			msg_input_from_event(in, app, room, sender, &it->ev, NULL);
			membership_by_spelled(in, &it->ev, p);
		}
		b->items[i] = in;
		if (!in || !in->idem_key || !in->event_text) {
			batch_free(&bt);
			submit_free(b);
			cw_req_no_memory(req);
			return;
		}
	}
	batch_free(&bt);
	struct app_job *j = app_job_new(app, req, NULL);
	if (!j) {
		submit_free(b);
		cw_req_no_memory(req);
		return;
	}
	j->data = b;
	j->data_free = submit_free;
	cw_req_set_retry_safe(req); /* every item has its key */
	app_job_start_prepared_pipe(j, batch_prepare, &submit_ops);
}
