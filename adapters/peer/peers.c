/* The peer registry and the /admin/v1/peers endpoints. */
#include "config.h"
#include "peers.h"
#include "peer_out.h"
#include "app.h"
#include "admin_auth.h"
#include "event.h"
#include "httpsig.h"
#include "log.h"

#include <openssl/crypto.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOKEN_PREFIX "cwp_"

struct peer_entry {
	int64_t id;
	char name[PEER_NAME_MAX];
	char domain[PEER_DOMAIN_MAX];
	unsigned char token_hash[32];
	EVP_PKEY *key;
	bool enabled;
};

struct snapshot {
	int refs; /* under the registry's mutex */
	uint64_t gen; /* which one (peer_registry_current) */
	size_t n;
	struct peer_entry *e;
};

struct peer_registry {
	pthread_mutex_t mu;
	struct snapshot *snap;
	uint64_t upserts; /* changes applied in-process; a load that overlaps one is redone */
	uint64_t gens;    /* snapshots put in force, the first included */
};

static void snapshot_unref(struct peer_registry *r, struct snapshot *s)
{
	if (!s)
		return;
	pthread_mutex_lock(&r->mu);
	bool last = --s->refs == 0;
	pthread_mutex_unlock(&r->mu);
	if (!last)
		return;
	for (size_t i = 0; i < s->n; i++)
		EVP_PKEY_free(s->e[i].key);
	free(s->e);
	free(s);
}

struct peer_registry *peer_registry_new(void)
{
	struct peer_registry *r = calloc(1, sizeof(*r));
	if (!r)
		return NULL;
	pthread_mutex_init(&r->mu, NULL);
	r->snap = calloc(1, sizeof(*r->snap));
	if (!r->snap) {
		free(r);
		return NULL;
	}
	r->snap->refs = 1;
	r->snap->gen = ++r->gens; /* never 0, which no principal found here holds */
	return r;
}

void peer_registry_free(struct peer_registry *r)
{
	if (!r)
		return;
	snapshot_unref(r, r->snap);
	pthread_mutex_destroy(&r->mu);
	free(r);
}

void peer_principal_free(void *p)
{
	struct peer_principal *pp = p;
	if (!pp)
		return;
	EVP_PKEY_free(pp->key);
	free(pp);
}

const char *peer_nonce_at(const struct peer_principal *p, size_t i, int64_t *created)
{
	*created = i ? p->other_created[i - 1] : p->created;
	return i ? p->other_nonces[i - 1] : p->nonce;
}

int64_t peer_nonce_stale_before(int64_t now_s, int64_t skew_s)
{
	return now_s - skew_s - 60;
}

char *peer_nonces_json(const struct peer_principal *p)
{
	json_t *a = json_array();
	for (size_t i = 0; a && i <= p->n_other_nonces; i++) {
		int64_t created;
		const char *nonce = peer_nonce_at(p, i, &created);
		if (nonce[0] && json_array_append_new(a, json_pack("{s:s, s:I}", "nonce", nonce, "created",
								   (json_int_t)created))) {
			json_decref(a);
			return NULL;
		}
	}
	char *text = a ? json_dumps(a, JSON_COMPACT) : NULL;
	json_decref(a);
	return text;
}

cw_err peer_nonce_claim(PGconn *c, const struct peer_principal *p, int64_t now_s, int64_t skew_s, bool *fresh,
			bool *in_force, cw_errmsg *e)
{
	*fresh = true;
	*in_force = true;
	char pid[24], stale[24], th[65];
	snprintf(pid, sizeof(pid), "%lld", (long long)p->id);
	snprintf(stale, sizeof(stale), "%lld", (long long)peer_nonce_stale_before(now_s, skew_s));
	cw_hex(th, p->token_hash, 32);
	char *nonces = peer_nonces_json(p);
	if (!nonces)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	/* Asks the table whether the peer is still enabled with the token p
	 * came with (PEER_IN_FORCE_SQL), and claims the nonces of all its
	 * signatures (none: the check alone), in one statement; until the
	 * forty-eighth session one statement a nonce, the stale rows'
	 * DELETE in each. */
	const char *params[] = { pid, nonces, stale, th };
	PGresult *r = PQexecParams(c,
				   "WITH pk AS MATERIALIZED (SELECT 1 FROM peers WHERE id = $1::bigint AND "
				   PEER_IN_FORCE_SQL("peers", "$4") " FOR KEY SHARE), "
				   "stale AS (DELETE FROM signature_nonces WHERE ctid = ANY (ARRAY(SELECT ctid "
				   "FROM signature_nonces WHERE peer_id = $1::bigint AND created < $3::bigint "
				   "FOR UPDATE SKIP LOCKED))), "
				   "ins AS (INSERT INTO signature_nonces (peer_id, nonce, created) "
				   "SELECT $1::bigint, x.nonce, x.created FROM pk, "
				   "json_to_recordset($2::json) AS x(nonce text, created bigint) "
				   "ON CONFLICT DO NOTHING RETURNING 1) "
				   "SELECT (SELECT count(*) FROM pk), (SELECT count(*) FROM ins) = json_array_length($2::json)",
				   4, NULL, params, NULL, NULL, 0);
	free(nonces);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	*in_force = strcmp(PQgetvalue(r, 0, 0), "1") == 0;
	/* not in force: not asked, refused for its token */
	*fresh = !*in_force || strcmp(PQgetvalue(r, 0, 1), "t") == 0;
	PQclear(r);
	return CW_OK;
}

/* The key the registry holds for a peer's stored public key (raw, 32
 * bytes), or NULL: the peer is then left out (its requests 401).  A key
 * stored before the thirty-first session refused weak ones at create
 * and rotate may be one, and any signature verifies with it.  Both ways
 * into the registry, a reload and an admin change of this process, take
 * the key here: until the thirty-second session the latter put the weak
 * key in, and a forged signature was taken until the next reload. */
static EVP_PKEY *registry_key(const char *name, const unsigned char raw[32])
{
	if (peer_key_weak(raw)) {
		log_error("peers: peer %s has a small-order or non-canonical public key, which any signature "
			  "verifies with; its requests are refused until its key is rotated (POST /admin/v1/peers/"
			  "{name}/rotate with a new public_key)",
			  name);
		return NULL;
	}
	EVP_PKEY *k = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, raw, 32);
	httpsig_key_prepare(k);
	return k;
}

static cw_err registry_load_once(struct peer_registry *r, PGconn *c, bool *raced, cw_errmsg *e)
{
	pthread_mutex_lock(&r->mu);
	uint64_t upserts_before = r->upserts;
	pthread_mutex_unlock(&r->mu);
	PGresult *res = PQexecParams(c, "SELECT id, name, domain, token_hash, ed25519_public_key, enabled "
					"FROM peers ORDER BY id", 0, NULL, NULL, NULL, NULL, 1);
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, res, e);
		PQclear(res);
		return rc;
	}
	int n = PQntuples(res);
	struct snapshot *s = calloc(1, sizeof(*s));
	struct peer_entry *entries = calloc((size_t)n + 1, sizeof(*entries));
	if (!s || !entries) {
		free(s);
		free(entries);
		PQclear(res);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	s->e = entries;
	s->refs = 1;
	for (int i = 0; i < n; i++) {
		struct peer_entry *p = &entries[s->n];
		/* Binary results: int8 in network order. */
		const unsigned char *idb = (const unsigned char *)PQgetvalue(res, i, 0);
		int64_t id = 0;
		for (int k = 0; k < 8; k++)
			id = (id << 8) | idb[k];
		p->id = id;
		snprintf(p->name, sizeof(p->name), "%.*s", PQgetlength(res, i, 1), PQgetvalue(res, i, 1));
		snprintf(p->domain, sizeof(p->domain), "%.*s", PQgetlength(res, i, 2), PQgetvalue(res, i, 2));
		if (PQgetlength(res, i, 3) != 32 || PQgetlength(res, i, 4) != 32)
			continue; /* the table's checks make this impossible */
		memcpy(p->token_hash, PQgetvalue(res, i, 3), 32);
		p->key = registry_key(p->name, (const unsigned char *)PQgetvalue(res, i, 4));
		p->enabled = PQgetvalue(res, i, 5)[0] != 0;
		if (p->key)
			s->n++;
	}
	PQclear(res);
	/* A change applied in-process while this SELECT ran may be missing
	 * from it (the SELECT began before that change committed): then this
	 * snapshot is older than the one in force, and the load is redone. */
	pthread_mutex_lock(&r->mu);
	*raced = r->upserts != upserts_before;
	struct snapshot *old = *raced ? s : r->snap;
	if (!*raced) {
		s->gen = ++r->gens;
		r->snap = s;
	}
	pthread_mutex_unlock(&r->mu);
	snapshot_unref(r, old);
	return CW_OK;
}

cw_err peer_registry_load(struct peer_registry *r, PGconn *c, cw_errmsg *e)
{
	for (int attempt = 0; attempt < 5; attempt++) {
		bool raced = false;
		cw_err rc = registry_load_once(r, c, &raced, e);
		if (rc || !raced)
			return rc;
	}
	return cw_fail(e, CW_ECONFLICT, "the peers kept changing during the reload");
}

static struct snapshot *snapshot_get(struct peer_registry *r)
{
	pthread_mutex_lock(&r->mu);
	struct snapshot *s = r->snap;
	s->refs++;
	pthread_mutex_unlock(&r->mu);
	return s;
}

size_t peer_registry_count(struct peer_registry *r)
{
	struct snapshot *s = snapshot_get(r);
	size_t n = s->n;
	snapshot_unref(r, s);
	return n;
}

struct peer_principal *peer_registry_by_token(struct peer_registry *r, const char *token)
{
	unsigned char h[32];
	cw_sha256(token, strlen(token), h);
	struct snapshot *s = snapshot_get(r);
	struct peer_principal *found = NULL;
	const struct peer_entry *match = NULL;
	/* Every entry is compared, so the time does not say which one matched. */
	for (size_t i = 0; i < s->n; i++)
		if (cw_ct_equal(h, s->e[i].token_hash, 32) && s->e[i].enabled)
			match = &s->e[i];
	if (match && (found = calloc(1, sizeof(*found)))) {
		found->id = match->id;
		memcpy(found->name, match->name, sizeof(found->name));
		memcpy(found->domain, match->domain, sizeof(found->domain));
		EVP_PKEY_up_ref(match->key);
		found->key = match->key;
		memcpy(found->token_hash, h, sizeof(h));
		found->registry_gen = s->gen;
	}
	snapshot_unref(r, s);
	return found;
}

bool peer_registry_current(struct peer_registry *r, const struct peer_principal *p)
{
	pthread_mutex_lock(&r->mu);
	bool same = r->snap->gen == p->registry_gen;
	pthread_mutex_unlock(&r->mu);
	return same;
}

bool peer_registry_still_valid(struct peer_registry *r, const struct peer_principal *p)
{
	struct snapshot *s = snapshot_get(r);
	bool valid = false;
	for (size_t i = 0; i < s->n; i++)
		if (s->e[i].id == p->id && s->e[i].enabled && cw_ct_equal(p->token_hash, s->e[i].token_hash, 32))
			valid = true;
	snapshot_unref(r, s);
	return valid;
}

/* Puts one peer, as a change just committed left it, into a new snapshot,
 * so that the change is in force for the next request of this process
 * (other processes pick it up on their next reload); one without a key
 * (registry_key refused it) is taken out, as a reload leaves it out. */
static void registry_upsert(struct peer_registry *r, const struct peer_entry *in)
{
	/* Built and swapped under the lock, so that a reload swapped in
	 * meanwhile is not lost under this change. */
	pthread_mutex_lock(&r->mu);
	struct snapshot *old = r->snap;
	struct snapshot *s = calloc(1, sizeof(*s));
	struct peer_entry *e = calloc(old->n + 1, sizeof(*e));
	if (!s || !e) {
		pthread_mutex_unlock(&r->mu);
		free(s);
		free(e);
		return;
	}
	s->e = e;
	s->refs = 1;
	for (size_t i = 0; i < old->n; i++) {
		if (old->e[i].id == in->id)
			continue;
		e[s->n] = old->e[i];
		EVP_PKEY_up_ref(e[s->n].key);
		s->n++;
	}
	if (in->key) {
		e[s->n] = *in;
		EVP_PKEY_up_ref(in->key);
		s->n++;
	}
	s->gen = ++r->gens;
	r->snap = s;
	r->upserts++;
	pthread_mutex_unlock(&r->mu);
	snapshot_unref(r, old); /* the registry's reference to the old one */
}

/* The registry entry of a row of PEER_COLUMNS; its key NULL when
 * registry_key refuses it (the peer is then taken out of the registry). */
static bool entry_from_row(PGresult *res, int i, struct peer_entry *p)
{
	unsigned char key[32];
	memset(p, 0, sizeof(*p));
	p->id = atoll(PQgetvalue(res, i, 9));
	snprintf(p->name, sizeof(p->name), "%s", PQgetvalue(res, i, 0));
	snprintf(p->domain, sizeof(p->domain), "%s", PQgetvalue(res, i, 1));
	p->enabled = PQgetvalue(res, i, 5)[0] == 't';
	if (!cw_unhex(PQgetvalue(res, i, 10), p->token_hash, 32) || !cw_unhex(PQgetvalue(res, i, 11), key, 32))
		return false;
	p->key = registry_key(p->name, key);
	return true;
}

/* ------------------------------------------------------------ validators */

/* As mimi:// URIs hold it: the peer's users are mimi://<domain>/u/...,
 * which the parser refuses for a domain mimi_domain_check does (until the
 * twenty-first session an IP address such as 192.0.2.1 was taken). */
bool peer_domain_valid(const char *s)
{
	cw_errmsg e;
	return mimi_domain_check(s, strlen(s), &e) == CW_OK;
}

cw_err peer_url_notify(const char *s, char *notify, size_t len, cw_errmsg *e)
{
	size_t n = strlen(s);
	if (n > PEER_URL_MAX)
		return cw_fail(e, CW_EINVAL, "push_url is longer than %d bytes", PEER_URL_MAX);
	if (strncmp(s, "https://", 8) != 0 && strncmp(s, "http://", 7) != 0)
		return cw_fail(e, CW_EINVAL, "push_url is not an http:// or https:// URL");
	const char *host = strstr(s, "://") + 3;
	if (!*host || *host == '/')
		return cw_fail(e, CW_EINVAL, "push_url has no host");
	for (const unsigned char *p = (const unsigned char *)s; *p; p++)
		if (*p <= ' ' || *p >= 0x7f || *p == '#')
			return cw_fail(e, CW_EINVAL, "push_url has %s at byte %zu (0x%02x)",
				       *p == '#' ? "a fragment ('#')" : "a byte that is not printable ASCII",
				       (size_t)(p - (const unsigned char *)s), *p);
	/* As the dispatcher will push to it: one it rebuilds (a host, a port
	 * up to 65535, no user or password, which a signed @target-uri
	 * cannot carry).  Until the thirty-sixth session such a URL was
	 * taken here and every push to the peer failed until its rows went
	 * dead, the user:password shown to every viewer meanwhile. */
	return peer_out_notify_url(s, notify, len, e);
}

cw_err peer_url_check(const char *s, cw_errmsg *e)
{
	char notify[PEER_NOTIFY_URL_MAX];
	return peer_url_notify(s, notify, sizeof(notify), e);
}

bool peer_url_valid(const char *s)
{
	cw_errmsg e;
	return peer_url_check(s, &e) == CW_OK;
}

/* ------------------------------------------------------------ admin API */

/* What peer_url_valid takes, as the create and the PATCH refuse it. */
#define PUSH_URL_RULE "push_url must be an http:// or https:// URL of at most 2048 bytes with a host " \
	"(a port up to 65535) and no user or password"

struct peer_input {
	char name[PEER_NAME_MAX];
	char domain[PEER_DOMAIN_MAX];
	char mode[8];
	char url[PEER_URL_MAX + 1];
	bool has_url;
	unsigned char key[32];
	bool has_key;
	char token[64];
	unsigned char token_hash[32];
	bool enable; /* for enable/disable */
	char types[128];  /* event_types as a text[] literal, "{message,edit}" */
	bool has_types;   /* event_types given (a list, or null: every type) */
	bool types_null;
};

static const char *const EVENT_TYPES[] = { "message", "edit", "delete", "reaction", "receipt", "typing",
					   "membership", "block" };

bool peer_event_type_wanted(const char *types, const char *type)
{
	if (!types)
		return true;
	size_t n = strlen(type);
	for (const char *t = types + (*types == '{'); *t && *t != '}';) {
		size_t m = strcspn(t, ",}");
		if (m == n && strncmp(t, type, n) == 0)
			return true;
		t += m + (t[m] == ',');
	}
	return false;
}

/* Reads event_types (absent: unchanged; null: every type; an array of
 * known types, "message" among them, each once); false after answering
 * 400. */
static bool read_types(struct cw_req *req, json_t *body, struct peer_input *in)
{
	json_t *v = json_object_get(body, "event_types");
	if (!v)
		return true;
	in->has_types = true;
	if (json_is_null(v)) {
		in->types_null = true;
		return true;
	}
	bool seen[CW_ARRAY_LEN(EVENT_TYPES)] = { false };
	size_t i, len = 0;
	json_t *t;
	const char *bad = json_is_array(v) && json_array_size(v) ? NULL : "event_types must be null or a non-empty array";
	json_array_foreach(v, i, t) {
		if (bad)
			break;
		size_t k = 0;
		while (k < CW_ARRAY_LEN(EVENT_TYPES) && !(json_is_string(t) && strcmp(json_string_value(t), EVENT_TYPES[k]) == 0))
			k++;
		if (k == CW_ARRAY_LEN(EVENT_TYPES))
			bad = "event_types may hold only message, edit, delete, reaction, receipt, typing, membership and block";
		else if (seen[k])
			bad = "event_types names a type twice";
		else {
			seen[k] = true;
			len += (size_t)snprintf(in->types + len, sizeof(in->types) - len, "%s%s", len ? "," : "{",
						EVENT_TYPES[k]);
		}
	}
	if (!bad && !seen[0])
		bad = "event_types must include message";
	if (bad) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body", bad);
		return false;
	}
	snprintf(in->types + len, sizeof(in->types) - len, "}");
	return true;
}

static void new_token(struct peer_input *in)
{
	unsigned char raw[32];
	cw_random(raw, sizeof(raw));
	memcpy(in->token, TOKEN_PREFIX, sizeof(TOKEN_PREFIX) - 1);
	cw_b64url_encode(in->token + sizeof(TOKEN_PREFIX) - 1, sizeof(in->token) - sizeof(TOKEN_PREFIX) + 1,
			 raw, sizeof(raw));
	cw_sha256(in->token, strlen(in->token), in->token_hash);
}

/* The Ed25519 encodings of small order (libsodium's blocklist,
 * ge25519_has_small_order): y = 0 (the two points of order 4), 1 (the
 * identity), the two y of the four points of order 8, p - 1 (order 2),
 * and p and p + 1 (0 and 1 encoded past p); compared with the sign bit
 * (x's) cleared, so that the eight small-order points and their
 * non-canonical encodings (x = 0 with the sign bit set) are all in.
 * OpenSSL takes them as keys (EVP_PKEY_new_raw_public_key decodes
 * nothing), and with the identity any signature R = identity, S = 0
 * verifies: anyone could sign as a peer registered with one. */
static const unsigned char small_order[][32] = {
	{ 0 },
	{ 0x01 },
	{ 0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98, 0xf0,
	  0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53, 0xfc, 0x05 },
	{ 0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67, 0x0f,
	  0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac, 0x03, 0x7a },
	{ 0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
	  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f },
	{ 0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
	  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f },
	{ 0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
	  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f },
};

bool peer_key_weak(const unsigned char key[32])
{
	for (size_t i = 0; i < CW_ARRAY_LEN(small_order); i++) {
		unsigned char diff = (unsigned char)((key[31] & 0x7f) ^ small_order[i][31]);
		for (int k = 0; k < 31; k++)
			diff |= key[k] ^ small_order[i][k];
		if (!diff)
			return true;
	}
	/* y >= p = 2^255 - 19: y's 255 bits are 0x7fff...ffed or above. */
	if ((key[31] & 0x7f) != 0x7f || key[0] < 0xed)
		return false;
	for (int k = 1; k < 31; k++)
		if (key[k] != 0xff)
			return false;
	return true;
}

/* Reads public_key (base64 of the raw 32-byte Ed25519 key) if present;
 * false after answering 400. */
/* Whether raw is the public half of this provider's own signing key
 * (peer.signing_key_file, which /.well-known/mimi-protocol-directory
 * publishes): a peer registered with it would be one whose requests this
 * provider could sign itself, and it is what an operator pastes by
 * mistake from the directory. */
static bool own_key(const struct cw_app *app, const unsigned char raw[32])
{
	unsigned char mine[32];
	size_t len = sizeof(mine);
	return app && app->signing_key && EVP_PKEY_get_raw_public_key(app->signing_key, mine, &len) == 1 &&
	       len == 32 && CRYPTO_memcmp(mine, raw, 32) == 0;
}

static bool read_key(struct cw_app *app, struct cw_req *req, json_t *body, struct peer_input *in, bool required)
{
	json_t *k = json_object_get(body, "public_key");
	if (!k && !required)
		return true;
	unsigned char raw[64];
	if (!json_is_string(k) || json_string_length(k) > 64 ||
	    cw_b64_decode(raw, sizeof(raw), json_string_value(k)) != 32) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body",
			       "public_key must be the base64 of a raw 32-byte Ed25519 public key");
		return false;
	}
	if (peer_key_weak(raw)) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body",
			       "public_key is a small-order or non-canonical Ed25519 point (y not below p): "
			       "with it a forged signature would verify");
		return false;
	}
	EVP_PKEY *pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, raw, 32);
	if (!pk) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body", "public_key is not an Ed25519 public key");
		return false;
	}
	EVP_PKEY_free(pk);
	if (own_key(app, raw)) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body",
			       "public_key is this provider's own (peer.signing_key_file, the key its directory "
			       "publishes): a peer signs with a key of its own");
		return false;
	}
	memcpy(in->key, raw, 32);
	in->has_key = true;
	return true;
}

static const char *str_field(json_t *body, const char *name)
{
	json_t *v = json_object_get(body, name);
	return json_is_string(v) ? json_string_value(v) : NULL;
}

/* Records the change and tells every daemon process to reload its peers. */
static cw_err audit(PGconn *c, struct app_job *j, const char *action, const char *subject, const char *details,
		    cw_errmsg *e)
{
	cw_err nrc = store_exec(c, "NOTIFY causeway_peers", e);
	if (nrc)
		return nrc;
	const char *params[] = { admin_actor(j->req), action, subject, details };
	PGresult *r = PQexecParams(c, "INSERT INTO audit_log (actor, action, subject, details) "
				      "VALUES ($1, $2, $3, $4::jsonb)", 4, NULL, params, NULL, NULL, 0);
	cw_err rc = PQresultStatus(r) == PGRES_COMMAND_OK ? CW_OK : store_result_err(c, r, e);
	PQclear(r);
	return rc;
}

static json_t *peer_row_json(PGresult *r, int i)
{
	json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:b, s:s}",
			      "name", PQgetvalue(r, i, 0), "domain", PQgetvalue(r, i, 1),
			      "mode", PQgetvalue(r, i, 2), "public_key", PQgetvalue(r, i, 4),
			      "enabled", PQgetvalue(r, i, 5)[0] == 't', "created_at", PQgetvalue(r, i, 6));
	json_object_set_new(o, "push_url", PQgetisnull(r, i, 3) ? json_null() : json_string(PQgetvalue(r, i, 3)));
	/* A push_url stored before its rule (peer_url_check) was held to,
	 * which nothing is pushed to (its rows wait): what is wrong with it.
	 * (The URL shown has its user information as ********: a URL with
	 * one is refused for it as the stored one is.) */
	cw_errmsg ue;
	bool bad = !PQgetisnull(r, i, 3) && strcmp(PQgetvalue(r, i, 2), "push") == 0 &&
		   peer_url_check(PQgetvalue(r, i, 3), &ue) != CW_OK;
	json_object_set_new(o, "push_url_problem", bad ? json_string(ue.msg) : json_null());
	json_object_set_new(o, "updated_at", json_string(PQgetvalue(r, i, 7)));
	json_object_set_new(o, "disabled_at", PQgetisnull(r, i, 8) ? json_null() : json_string(PQgetvalue(r, i, 8)));
	/* event_types: NULL (every type) or a text[] of bare words, "{a,b}". */
	json_t *types = json_null();
	if (!PQgetisnull(r, i, 12)) {
		types = json_array();
		const char *t = PQgetvalue(r, i, 12) + 1;
		while (*t && *t != '}') {
			size_t n = strcspn(t, ",}");
			json_array_append_new(types, json_stringn(t, n));
			t += n + (t[n] == ',');
		}
	}
	json_object_set_new(o, "event_types", types);
	return o;
}

/* push_url with any user information shown as ********: until the
 * thirty-sixth session a URL with a user and password was taken (such rows
 * stay), and every viewer read the password in the answers and in the
 * audit records that each disable, enable or rotation copied it into.
 * The authority ends at the first '/', '?' or '#'; its last '@' ends the
 * user information.  The row keeps it; the registry never reads it. */
#define PEER_PUSH_URL_SHOWN "regexp_replace(push_url, '^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@', '\\1********@')"

#define PEER_COLUMNS \
	"name, domain, mode, " PEER_PUSH_URL_SHOWN ", translate(encode(ed25519_public_key, 'base64'), E'\\n', ''), " \
	"enabled, " APP_SQL_TS("created_at") ", " APP_SQL_TS("updated_at") ", " APP_SQL_TS("disabled_at") ", " \
	"id, encode(token_hash, 'hex'), encode(ed25519_public_key, 'hex'), event_types::text"

struct admin_change {
	struct peer_input in;
	struct peer_entry entry; /* the row as committed, for the registry */
	bool has_entry;
};

/* A change's inputs; the input is the first member, so the two pointers are
 * one and the handlers can fill the input and hand over the change. */
static struct peer_input *new_change(void)
{
	struct admin_change *c = calloc(1, sizeof(*c));
	return c ? &c->in : NULL;
}

static void change_free(void *arg)
{
	struct admin_change *c = arg;
	if (c->has_entry)
		EVP_PKEY_free(c->entry.key);
	free(c);
}

/* Remembers the committed row (the job may run again: keep the last). */
static void keep_entry(struct app_job *j, PGresult *r)
{
	struct admin_change *c = j->data;
	if (c->has_entry)
		EVP_PKEY_free(c->entry.key);
	c->has_entry = entry_from_row(r, 0, &c->entry);
}

static void reload_after(struct app_job *j)
{
	struct admin_change *c = j->data;
	if (c->has_entry)
		registry_upsert(j->app->peers, &c->entry);
}

/* Queues a change's write (the registry is updated after it); answers 503
 * itself when memory runs out (cw_req_no_memory, as every change here
 * does: until the forty-fourth session's review a create or an update
 * answered 400 invalid_body "out of memory", the client's fault, and the
 * other changes 503 without Retry-After). */
static void start_change(struct cw_app *app, struct cw_req *req, struct peer_input *in,
			 cw_err (*fn)(PGconn *, struct app_job *, cw_errmsg *))
{
	struct app_job *j = app_job_new(app, req, fn);
	if (!j) {
		change_free(in);
		cw_req_no_memory(req);
		return;
	}
	j->data = in;
	j->data_free = change_free;
	j->after = reload_after;
	app_job_start(j, true);
}

/* A peer's domain covers the names under it: Causeway signs its fetch of
 * a file a peer names only on a host in that peer's domain
 * (media_host_in_domain), so a peer whose domain were under another's
 * (eu.wa.example under wa.example) would have its store's files fetched
 * with Causeway's signature at the other's word.  Domains never change
 * after creation: refused here, one under or above another cannot be
 * registered (until the nineteenth session it could). */
static const char nested_sql[] =
	"SELECT name, domain FROM peers WHERE right($1, length(domain) + 1) = '.' || domain "
	"OR right(domain, length($1) + 1) = '.' || $1 LIMIT 1";

/* The lock the changes of a peer's key take turns on
 * (pg_advisory_xact_lock), so that two at once cannot both find a key
 * free and store it: the other keys are migrate.c's, dispatcher.c's,
 * policy_live.c's and admin_auth.c's. */
#define PEER_KEY_LOCK_KEY "7161132091431352701"

/* One public key, one peer: a key that another peer has (enabled or
 * disabled: a disabled peer may be enabled again, its key with it) is
 * 409 conflict.  With two peers of one key, a request signed by the one
 * (keyid aside, which is the sender's own word) would verify as the
 * other's, and which party signed a message could no longer be told from
 * the key.  Not a unique index: peers stored before may share a key, and
 * such a migration would stop the daemon until an operator chose;
 * they stay, and any change of their key is checked.  Until the
 * forty-fifth session a create or a rotation took such a key.  True when
 * the key is free (the lock taken, held to the commit); false after
 * failing the job or with *rc set. */
/* sql's rows (the peers a key change would clash with) under the key lock
 * (PEER_KEY_LOCK_KEY, held to the commit); NULL with *rc set when either
 * failed. */
static PGresult *under_key_lock(PGconn *c, const char *sql, int n, const char *const *params, const int *lens,
				const int *fmts, cw_err *rc, cw_errmsg *e)
{
	*rc = store_exec(c, "SELECT pg_advisory_xact_lock(" PEER_KEY_LOCK_KEY ")", e);
	if (*rc)
		return NULL;
	PGresult *r = PQexecParams(c, sql, n, NULL, params, lens, fmts, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		*rc = store_result_err(c, r, e);
		PQclear(r);
		return NULL;
	}
	return r;
}

static bool key_free(PGconn *c, struct app_job *j, const struct peer_input *in, cw_err *rc, cw_errmsg *e)
{
	const char *params[] = { (const char *)in->key, in->name };
	const int lens[] = { 32, 0 };
	const int fmts[] = { 1, 0 };
	PGresult *r = under_key_lock(c,
				     "SELECT name, enabled FROM peers WHERE ed25519_public_key = $1 AND name <> $2 "
				     "ORDER BY name LIMIT 1",
				     2, params, lens, fmts, rc, e);
	if (!r)
		return false;
	bool free_ = PQntuples(r) == 0;
	if (!free_)
		app_job_fail(j, 409, "conflict", "public_key is peer %s's%s: each peer signs with a key of its own",
			     PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1)[0] == 't' ? "" : " (disabled: its key still counts)");
	PQclear(r);
	return free_;
}

static cw_err create_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct peer_input *in = &((struct admin_change *)j->data)->in;
	const char *dp[] = { in->domain };
	PGresult *nr = PQexecParams(c, nested_sql, 1, NULL, dp, NULL, NULL, 0);
	if (PQresultStatus(nr) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, nr, e);
		PQclear(nr);
		return rc;
	}
	if (PQntuples(nr) == 1) {
		app_job_fail(j, 409, "conflict",
			     "domain %s is %s peer %s's domain %s: a peer's domain covers the names under it "
			     "(docs/security.md, media fetches)",
			     in->domain, strlen(in->domain) > strlen(PQgetvalue(nr, 0, 1)) ? "under" : "above",
			     PQgetvalue(nr, 0, 0), PQgetvalue(nr, 0, 1));
		PQclear(nr);
		return CW_OK;
	}
	PQclear(nr);
	cw_err krc;
	if (!key_free(c, j, in, &krc, e))
		return krc;
	const char *params[] = { in->name, in->domain, in->mode, in->has_url ? in->url : NULL,
				 (const char *)in->key, (const char *)in->token_hash,
				 in->has_types && !in->types_null ? in->types : NULL };
	const int lens[] = { 0, 0, 0, 0, 32, 32, 0 };
	const int fmts[] = { 0, 0, 0, 0, 1, 1, 0 };
	PGresult *r = PQexecParams(c, "INSERT INTO peers (name, domain, mode, push_url, ed25519_public_key, token_hash, "
				      "event_types) VALUES ($1, $2, $3, $4, $5, $6, $7::text[]) ON CONFLICT DO NOTHING "
				      "RETURNING " PEER_COLUMNS,
				   7, NULL, params, lens, fmts, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	if (PQntuples(r) == 0) {
		PQclear(r);
		app_job_fail(j, 409, "conflict", "a peer with that name or domain exists");
		return CW_OK;
	}
	json_t *o = peer_row_json(r, 0);
	keep_entry(j, r);
	PQclear(r);
	json_object_set_new(o, "token", json_string(in->token));
	j->body = o;
	j->status = 201;
	char details[512];
	snprintf(details, sizeof(details), "{\"domain\": \"%s\", \"mode\": \"%s\"}", in->domain, in->mode);
	return audit(c, j, "peer.create", in->name, details, e);
}

void peer_admin_create(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	json_t *body = app_json_body(req);
	if (!body)
		return;
	struct peer_input *in = new_change();
	const char *name = str_field(body, "name"), *domain = str_field(body, "domain");
	const char *mode = str_field(body, "mode"), *url = str_field(body, "push_url");
	const char *bad = NULL;
	/* A misspelt member or a mode of another type was ignored until the
	 * twenty-first session: "event_type" made a peer of every type, a
	 * "mode" of 7 a push peer. */
	static const char *const members[] = { "name", "domain", "mode", "push_url", "public_key", "event_types",
					       NULL };
	if (!app_json_only_known(req, body, members)) {
		free(in);
		json_decref(body);
		return;
	}
	if (!in) {
		cw_req_no_memory(req);
		json_decref(body);
		return;
	}
	if (!name || !peer_name_valid(name))
		bad = "name must be 1 to 32 of a-z, 0-9, '_' and '-', starting with a letter or digit";
	else if (!domain || !peer_domain_valid(domain))
		bad = "domain must be a lower-case DNS name such as wa.example";
	else if (app_domain_is_ours(app, domain))
		bad = "domain is one of this provider's own (server.domain, the Matrix server name or an XMPP "
		      "domain): a peer may not speak for local users";
	else if (json_object_get(body, "mode") &&
		 (!mode || (strcmp(mode, "push") != 0 && strcmp(mode, "pull") != 0)))
		bad = "mode must be push or pull";
	else if ((!mode || strcmp(mode, "push") == 0) && !url)
		bad = "a push peer needs push_url";
	else if (json_object_get(body, "push_url") && !json_is_null(json_object_get(body, "push_url")) &&
		 (!url || !peer_url_valid(url)))
		bad = PUSH_URL_RULE;
	if (bad) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body", bad);
		free(in);
		json_decref(body);
		return;
	}
	if (!read_key(app, req, body, in, true) || !read_types(req, body, in)) {
		free(in);
		json_decref(body);
		return;
	}
	snprintf(in->name, sizeof(in->name), "%s", name);
	snprintf(in->domain, sizeof(in->domain), "%s", domain);
	snprintf(in->mode, sizeof(in->mode), "%s", mode ? mode : "push");
	if (url) {
		snprintf(in->url, sizeof(in->url), "%s", url);
		in->has_url = true;
	}
	json_decref(body);
	new_token(in);
	start_change(app, req, in, create_fn);
}

static cw_err list_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	const char *name = j->data;
	PGresult *r = name ? PQexecParams(c, "SELECT " PEER_COLUMNS " FROM peers WHERE name = $1", 1, NULL,
					  &name, NULL, NULL, 0)
			   : PQexec(c, "SELECT " PEER_COLUMNS " FROM peers ORDER BY name");
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	if (name) {
		if (PQntuples(r) == 0)
			app_job_fail(j, 404, "not_found", "no peer of that name");
		else
			j->body = peer_row_json(r, 0);
	} else {
		json_t *arr = json_array();
		for (int i = 0; i < PQntuples(r); i++)
			json_array_append_new(arr, peer_row_json(r, i));
		j->body = json_pack("{s:o}", "peers", arr);
	}
	PQclear(r);
	return CW_OK;
}

void peer_admin_list(struct cw_req *req, void *ctx)
{
	struct app_job *j = app_job_new(ctx, req, list_fn); /* no data: every peer */
	if (!j) {
		cw_req_no_memory(req);
		return;
	}
	app_job_start(j, false);
}

void peer_admin_get(struct cw_req *req, void *ctx)
{
	const char *name = cw_req_param(req, "name");
	if (!peer_name_valid(name)) {
		cw_req_problem(req, 404, "not_found", "Not found", "no peer of that name");
		return;
	}
	app_job_run(ctx, req, list_fn, strdup(name), free, false);
}

/* enable, disable, rotate and PATCH: one UPDATE each.  same_sql (or
 * NULL): when sql changed no row, the peer as it is ($1 its name), the
 * answer to a change it has already (no audit record, no NOTIFY). */
static cw_err update_fn(PGconn *c, struct app_job *j, cw_errmsg *e, const char *sql, const char *same_sql,
			const char *action, int nparams, const char *const *params, const int *lens, const int *fmts)
{
	struct peer_input *in = j->data;
	PGresult *r = PQexecParams(c, sql, nparams, NULL, params, lens, fmts, 0);
	bool same = false;
	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 0 && same_sql) {
		PQclear(r);
		r = PQexecParams(c, same_sql, 1, NULL, params, NULL, NULL, 0);
		same = true;
	}
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	if (PQntuples(r) == 0) {
		PQclear(r);
		app_job_fail(j, 404, "not_found", "no peer of that name");
		return CW_OK;
	}
	j->body = peer_row_json(r, 0);
	if (same) {
		PQclear(r);
		return CW_OK;
	}
	keep_entry(j, r);
	PQclear(r);
	/* What the peer is now, so the log shows a push URL redirected or
	 * a key replaced (never its token: that is added to a rotation's
	 * answer later). */
	json_t *d = json_pack("{s:O?, s:O?, s:O?, s:O?, s:O?}", "mode", json_object_get(j->body, "mode"), "push_url",
			      json_object_get(j->body, "push_url"), "event_types",
			      json_object_get(j->body, "event_types"), "enabled", json_object_get(j->body, "enabled"),
			      "public_key", json_object_get(j->body, "public_key"));
	char *details = d ? json_dumps(d, JSON_COMPACT) : NULL;
	json_decref(d);
	cw_err rc = audit(c, j, action, in->name, details ? details : "{}", e);
	free(details);
	return rc;
}

/* Whether the disabled peer in->name may be enabled: no other enabled
 * peer has its key (peers stored before the forty-fifth session may share
 * one, key_free).  A disabled peer is refused everything, so two peers of
 * one key are harmless while one of them is off; enabled together, a
 * request signed by the one would verify as the other's.  409 names the
 * other: rotate this one's key first (or disable the other).  True when
 * it may (the key lock taken, held to the commit); false after failing the
 * job or with *rc set.  Until the forty-fifth session such a peer was
 * enabled. */
static bool key_alone_enabled(PGconn *c, struct app_job *j, const char *name, cw_err *rc, cw_errmsg *e)
{
	const char *params[] = { name };
	PGresult *r = under_key_lock(c,
				     "SELECT o.name FROM peers p JOIN peers o ON o.ed25519_public_key = "
				     "p.ed25519_public_key AND o.name <> p.name AND o.enabled "
				     "WHERE p.name = $1 AND NOT p.enabled ORDER BY o.name LIMIT 1",
				     1, params, NULL, NULL, rc, e);
	if (!r)
		return false;
	bool alone = PQntuples(r) == 0;
	if (!alone)
		app_job_fail(j, 409, "conflict",
			     "peer %s's public_key is also enabled peer %s's: two enabled peers may not share a key "
			     "(a request signed by the one would verify as the other's); rotate %s's key first",
			     name, PQgetvalue(r, 0, 0), name);
	PQclear(r);
	return alone;
}

static cw_err enable_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct peer_input *in = &((struct admin_change *)j->data)->in;
	cw_err krc;
	if (in->enable && !key_alone_enabled(c, j, in->name, &krc, e))
		return krc;
	const char *params[] = { in->name, in->enable ? "t" : "f" };
	/* A peer disabled (enabled) already is answered as it is, its first
	 * disabled_at kept, with no audit record nor NOTIFY, as a token
	 * revoked already is (until the thirty-sixth session each repeat was
	 * audited again, moved updated_at and made every process reload). */
	/* FOR UPDATE: the disable waits for the peer's writes under way
	 * (their KEY SHARE, PEER_IN_FORCE_SQL of peers.h), and those that
	 * come after find the peer disabled; the UPDATE's own lock (no key
	 * changes) would not.  A rotation changes token_hash, a key. */
	return update_fn(c, j, e,
			 "WITH l AS (SELECT id AS lid FROM peers WHERE name = $1 AND enabled IS DISTINCT FROM "
			 "$2::boolean FOR UPDATE) "
			 "UPDATE peers SET enabled = $2::boolean, updated_at = now(), "
			 "disabled_at = CASE WHEN $2::boolean THEN NULL ELSE coalesce(disabled_at, now()) END "
			 "FROM l WHERE id = l.lid AND enabled IS DISTINCT FROM $2::boolean RETURNING " PEER_COLUMNS,
			 "SELECT " PEER_COLUMNS " FROM peers WHERE name = $1",
			 in->enable ? "peer.enable" : "peer.disable", 2, params, NULL, NULL);
}

static void set_enabled(struct cw_req *req, void *ctx, bool enable)
{
	const char *name = cw_req_param(req, "name");
	if (!peer_name_valid(name)) {
		cw_req_problem(req, 404, "not_found", "Not found", "no peer of that name");
		return;
	}
	struct peer_input *in = new_change();
	if (!in) {
		cw_req_no_memory(req);
		return;
	}
	snprintf(in->name, sizeof(in->name), "%s", name);
	in->enable = enable;
	start_change(ctx, req, in, enable_fn);
}

void peer_admin_disable(struct cw_req *req, void *ctx) { set_enabled(req, ctx, false); }
void peer_admin_enable(struct cw_req *req, void *ctx) { set_enabled(req, ctx, true); }

static cw_err rotate_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct peer_input *in = &((struct admin_change *)j->data)->in;
	/* The name first: a rotation of no peer is 404 whatever its key
	 * (until the forty-fifth session's review another peer's key made it
	 * 409, naming that peer). */
	const char *np[] = { in->name };
	PGresult *r = PQexecParams(c, "SELECT 1 FROM peers WHERE name = $1", 1, NULL, np, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		cw_err rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	bool exists = PQntuples(r) == 1;
	PQclear(r);
	if (!exists) {
		app_job_fail(j, 404, "not_found", "no peer of that name");
		return CW_OK;
	}
	cw_err krc;
	if (in->has_key && !key_free(c, j, in, &krc, e))
		return krc;
	const char *params[] = { in->name, (const char *)in->token_hash, in->has_key ? (const char *)in->key : NULL };
	const int lens[] = { 0, 32, 32 };
	const int fmts[] = { 0, 1, 1 };
	cw_err rc = update_fn(c, j, e,
			      "UPDATE peers SET token_hash = $2, ed25519_public_key = coalesce($3, ed25519_public_key), "
			      "updated_at = now() WHERE name = $1 RETURNING " PEER_COLUMNS,
			      NULL, "peer.rotate", 3, params, lens, fmts);
	if (!rc && j->body)
		json_object_set_new(j->body, "token", json_string(in->token));
	return rc;
}

void peer_admin_rotate(struct cw_req *req, void *ctx)
{
	const char *name = cw_req_param(req, "name");
	if (!peer_name_valid(name)) {
		cw_req_problem(req, 404, "not_found", "Not found", "no peer of that name");
		return;
	}
	struct peer_input *in = new_change();
	if (!in) {
		cw_req_no_memory(req);
		return;
	}
	snprintf(in->name, sizeof(in->name), "%s", name);
	size_t len;
	cw_req_body(req, &len);
	if (len) { /* a new public key is optional */
		static const char *const members[] = { "public_key", NULL };
		json_t *body = app_json_body(req);
		if (!body || !app_json_only_known(req, body, members) || !read_key(ctx, req, body, in, false)) {
			json_decref(body);
			free(in);
			return;
		}
		json_decref(body);
	}
	new_token(in);
	start_change(ctx, req, in, rotate_fn);
}

/* The rows a pull handed out to the peer $1 (its destination) and it did
 * not acknowledge, made due again for the push when the peer is switched
 * from pull to push (change_fn): until the fifty-second session they
 * stayed in flight until their hand-out ran out (10 minutes, peer_pull.c's
 * HANDOUT_S), and their rooms with them, for the push takes no row of a
 * room while one of its rows is in flight.  Not a try (the pull counts
 * none), as when a hand-out runs out (dispatcher.c, cw_take_back). */
static const char release_pulled_sql[] =
	"WITH r AS (UPDATE outbox SET state = 'pending', claimed_by = NULL, claimed_until = NULL, "
	" last_error = 'handed out to the peer''s pull and not acknowledged when the peer was switched to push: "
	"to be pushed (not a try: none counted)' "
	" WHERE destination = $1 AND state = 'in_flight' AND starts_with(claimed_by, 'pull#') RETURNING 1) "
	"SELECT count(*) FROM r";

/* A PATCH that gives a mode takes the peer's pull turn first (peer_pull.c's
 * pull_lock_sql, held to the commit), so that no pull of it hands rows out
 * across the switch: one after it sees the new mode. */
static cw_err change_fn(PGconn *c, struct app_job *j, cw_errmsg *e)
{
	struct peer_input *in = &((struct admin_change *)j->data)->in;
	char dest[PEER_NAME_MAX + 8];
	snprintf(dest, sizeof(dest), "peer:%s", in->name);
	const char *dp[] = { dest };
	bool was_pull = false;
	if (in->mode[0]) {
		PGresult *r = PQexecParams(c, "SELECT pg_advisory_xact_lock(hashtextextended('causeway.pull:' || $1, 0))",
					   1, NULL, dp, NULL, NULL, 0);
		cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
		if (rc)
			return rc;
		PQclear(r);
		const char *np[] = { in->name };
		r = PQexecParams(c, "SELECT mode, push_url IS NOT NULL FROM peers WHERE name = $1 FOR UPDATE", 1, NULL,
				 np, NULL, NULL, 0);
		if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
			return rc;
		if (PQntuples(r) == 0) {
			PQclear(r);
			app_job_fail(j, 404, "not_found", "no peer of that name");
			return CW_OK;
		}
		was_pull = strcmp(PQgetvalue(r, 0, 0), "pull") == 0;
		bool has_url = PQgetvalue(r, 0, 1)[0] == 't';
		PQclear(r);
		if (strcmp(in->mode, "push") == 0 && !in->has_url && !has_url) {
			app_job_fail(j, 400, "invalid_body", "a push peer needs a push_url: give one with mode push");
			return CW_OK;
		}
	}
	/* without event_types, $3 is no array at all ("" is not one) */
	const char *params[] = { in->name, in->has_types ? "t" : "f", in->has_types && !in->types_null ? in->types : NULL,
				 in->has_url ? in->url : NULL, in->mode[0] ? in->mode : NULL };
	cw_err rc = update_fn(c, j, e,
			      "UPDATE peers SET event_types = CASE WHEN $2::boolean THEN $3::text[] ELSE event_types END, "
			      "push_url = coalesce($4, push_url), mode = coalesce($5, mode), updated_at = now() "
			      "WHERE name = $1 RETURNING " PEER_COLUMNS,
			      NULL, "peer.update", 5, params, NULL, NULL);
	if (rc || j->err_code || !was_pull || strcmp(in->mode, "push") != 0)
		return rc;
	PGresult *r = PQexecParams(c, release_pulled_sql, 1, NULL, dp, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	bool some = strcmp(PQgetvalue(r, 0, 0), "0") != 0;
	PQclear(r);
	return some ? store_exec(c, "NOTIFY causeway_outbox", e) : CW_OK;
}

void peer_admin_update(struct cw_req *req, void *ctx)
{
	const char *name = cw_req_param(req, "name");
	if (!peer_name_valid(name)) {
		cw_req_problem(req, 404, "not_found", "Not found", "no peer of that name");
		return;
	}
	json_t *body = app_json_body(req);
	if (!body)
		return;
	struct peer_input *in = new_change();
	const char *key, *bad = NULL;
	json_t *v;
	json_object_foreach(body, key, v)
		if (strcmp(key, "event_types") != 0 && strcmp(key, "push_url") != 0 && strcmp(key, "mode") != 0)
			bad = "only event_types, push_url and mode can be changed (credentials: /rotate)";
	const char *url = str_field(body, "push_url"), *mode = str_field(body, "mode");
	if (!in) {
		cw_req_no_memory(req);
		json_decref(body);
		return;
	}
	if (!bad && json_object_size(body) == 0)
		bad = "nothing to change: give event_types, push_url or mode";
	else if (!bad && json_object_get(body, "push_url") && (!url || !peer_url_valid(url)))
		bad = PUSH_URL_RULE;
	else if (!bad && json_object_get(body, "mode") && (!mode || (strcmp(mode, "push") != 0 && strcmp(mode, "pull") != 0)))
		bad = "mode must be push or pull";
	if (bad) {
		cw_req_problem(req, 400, "invalid_body", "Invalid body", bad);
		free(in);
		json_decref(body);
		return;
	}
	if (!read_types(req, body, in)) {
		free(in);
		json_decref(body);
		return;
	}
	snprintf(in->name, sizeof(in->name), "%s", name);
	if (url) {
		snprintf(in->url, sizeof(in->url), "%s", url);
		in->has_url = true;
	}
	if (mode)
		snprintf(in->mode, sizeof(in->mode), "%s", mode);
	json_decref(body);
	start_change(ctx, req, in, change_fn);
}
