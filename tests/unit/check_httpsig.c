/* HTTP Message Signatures, Content-Digest and the replay cache: the RFC 9421
 * and RFC 9530 vectors, round trips, and the hostile cases of
 * tests/unit/data/httpsig_cases.txt. */
#include "config.h"
#include "peer/httpsig.h"
#include "peer/peer_out.h"
#include "peer/peers.h"
#include "media.h"
#include "unit.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------ a request */

#define REQ_MAX_HEADERS 16

struct req {
	char *method;
	char *uri;
	char *names[REQ_MAX_HEADERS];
	char *values[REQ_MAX_HEADERS];
	int n;
	char *body;
	size_t body_len;
};

static const char *req_header(void *ctx, const char *name)
{
	struct req *r = ctx;
	for (int i = 0; i < r->n; i++)
		if (strcmp(r->names[i], name) == 0)
			return r->values[i];
	return NULL;
}

static void set_str(char **slot, const char *v)
{
	free(*slot);
	*slot = strdup(v);
	ck_assert_ptr_nonnull(*slot);
}

static void req_set(struct req *r, const char *name, const char *value)
{
	for (int i = 0; i < r->n; i++)
		if (strcmp(r->names[i], name) == 0) {
			set_str(&r->values[i], value);
			return;
		}
	ck_assert_int_lt(r->n, REQ_MAX_HEADERS);
	r->names[r->n] = strdup(name);
	r->values[r->n] = NULL;
	set_str(&r->values[r->n++], value);
}

static void req_drop(struct req *r, const char *name)
{
	for (int i = 0; i < r->n; i++)
		if (strcmp(r->names[i], name) == 0) {
			free(r->names[i]);
			free(r->values[i]);
			r->names[i] = r->names[r->n - 1];
			r->values[i] = r->values[r->n - 1];
			r->n--;
			return;
		}
}

static void req_body(struct req *r, const char *body)
{
	set_str(&r->body, body);
	r->body_len = strlen(body);
}

static void req_free(struct req *r)
{
	for (int i = 0; i < r->n; i++) {
		free(r->names[i]);
		free(r->values[i]);
	}
	free(r->method);
	free(r->uri);
	free(r->body);
	memset(r, 0, sizeof(*r));
}

static struct httpsig_msg req_msg(struct req *r)
{
	return (struct httpsig_msg){ .method = r->method, .target_uri = r->uri, .header = req_header, .ctx = r };
}

/* ----------------------------------------------------------------- keys */

static EVP_PKEY *new_ed25519(void)
{
	EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
	ck_assert_ptr_nonnull(k);
	return k;
}

/* The public half only, through our own helpers. */
static EVP_PKEY *public_of(EVP_PKEY *k)
{
	char b64[64];
	ck_assert_int_eq(httpsig_ed25519_public_base64(k, b64, sizeof(b64)), CW_OK);
	ck_assert_int_eq(strlen(b64), 44);
	EVP_PKEY *pub = httpsig_ed25519_public_from_base64(b64);
	ck_assert_ptr_nonnull(pub);
	return pub;
}

struct keyring {
	const char *ids[4];
	EVP_PKEY *keys[4];
	int n;
	int lookups, releases;
};

static EVP_PKEY *keyring_find(void *ctx, const char *keyid)
{
	struct keyring *kr = ctx;
	for (int i = 0; keyid && i < kr->n; i++)
		if (strcmp(kr->ids[i], keyid) == 0) {
			kr->lookups++; /* counts the keys handed out, to match the releases */
			return kr->keys[i];
		}
	return NULL;
}

static void keyring_release(void *ctx, EVP_PKEY *k)
{
	struct keyring *kr = ctx;
	kr->releases++;
}

static EVP_PKEY *pem_private(const char *pem)
{
	BIO *b = BIO_new_mem_buf(pem, -1);
	EVP_PKEY *k = PEM_read_bio_PrivateKey(b, NULL, NULL, NULL);
	BIO_free(b);
	ck_assert_ptr_nonnull(k);
	return k;
}

static EVP_PKEY *pem_public(const char *pem)
{
	BIO *b = BIO_new_mem_buf(pem, -1);
	EVP_PKEY *k = PEM_read_bio_PUBKEY(b, NULL, NULL, NULL);
	BIO_free(b);
	ck_assert_ptr_nonnull(k);
	return k;
}

/* ------------------------------------------- RFC 9421 Appendix B.2.6 vector */

#define VEC_SECTIONS 16

struct vector {
	char *names[VEC_SECTIONS];
	char *texts[VEC_SECTIONS];
	int n;
};

static void vector_load(struct vector *v, const char *file)
{
	FILE *f = fopen(unit_data_path(file), "r");
	ck_assert_msg(f != NULL, "cannot open %s", unit_data_path(file));
	memset(v, 0, sizeof(*v));
	char line[4096];
	while (fgets(line, sizeof(line), f)) {
		if (line[0] == '[') {
			ck_assert_int_lt(v->n, VEC_SECTIONS);
			line[strcspn(line, "]")] = '\0';
			v->names[v->n] = strdup(line + 1);
			v->texts[v->n] = calloc(1, 8192);
			v->n++;
			continue;
		}
		if (v->n == 0)
			continue; /* the comments before the first section */
		char *t = v->texts[v->n - 1];
		ck_assert_int_lt(strlen(t) + strlen(line), 8191);
		strcat(t, line);
	}
	fclose(f);
	for (int i = 0; i < v->n; i++) {
		size_t len = strlen(v->texts[i]);
		if (len && v->texts[i][len - 1] == '\n')
			v->texts[i][len - 1] = '\0';
	}
}

static const char *vector_get(const struct vector *v, const char *name)
{
	for (int i = 0; i < v->n; i++)
		if (strcmp(v->names[i], name) == 0)
			return v->texts[i];
	ck_abort_msg("no section [%s]", name);
	return NULL;
}

static void vector_free(struct vector *v)
{
	for (int i = 0; i < v->n; i++) {
		free(v->names[i]);
		free(v->texts[i]);
	}
}

/* "METHOD URI\nname: value\n...\n\nbody" */
static void vector_request(const struct vector *v, struct req *r)
{
	memset(r, 0, sizeof(*r));
	char *text = strdup(vector_get(v, "request"));
	char *body = strstr(text, "\n\n");
	ck_assert_ptr_nonnull(body);
	*body = '\0';
	req_body(r, body + 2);
	char *save = NULL;
	char *line = strtok_r(text, "\n", &save);
	char *sp = strchr(line, ' ');
	*sp = '\0';
	set_str(&r->method, line);
	set_str(&r->uri, sp + 1);
	while ((line = strtok_r(NULL, "\n", &save))) {
		char *colon = strstr(line, ": ");
		ck_assert_ptr_nonnull(colon);
		*colon = '\0';
		req_set(r, line, colon + 2);
	}
	free(text);
}

/* Splits "a b c" into a NULL-terminated list (in place). */
static int split_words(char *s, const char **out, int max)
{
	int n = 0;
	char *save = NULL;
	for (char *w = strtok_r(s, " ", &save); w; w = strtok_r(NULL, " ", &save)) {
		ck_assert_int_lt(n, max - 1);
		out[n++] = w;
	}
	out[n] = NULL;
	return n;
}

START_TEST(rfc9421_b26_ed25519_vector)
{
	struct vector v;
	vector_load(&v, "httpsig_rfc9421_b26.txt");
	struct req r;
	vector_request(&v, &r);
	struct httpsig_msg m = req_msg(&r);
	char *comp_text = strdup(vector_get(&v, "components"));
	const char *comps[16];
	split_words(comp_text, comps, 16);
	struct httpsig_params p = {
		.label = vector_get(&v, "label"),
		.created = strtoll(vector_get(&v, "created"), NULL, 10),
		.keyid = vector_get(&v, "keyid"),
	};
	cw_errmsg e = { { 0 } };

	/* The signature base, byte for byte. */
	char base[4096];
	ck_assert_msg(httpsig_signature_base(&m, comps, &p, base, sizeof(base), &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(base, vector_get(&v, "signature-base"));

	/* Signing is deterministic with Ed25519: exactly the RFC's fields. */
	EVP_PKEY *priv = pem_private(vector_get(&v, "private-key"));
	char si[HTTPSIG_MAX_FIELD], sig[HTTPSIG_MAX_FIELD];
	ck_assert_msg(httpsig_sign(&m, comps, priv, &p, si, sizeof(si), sig, sizeof(sig), &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(si, vector_get(&v, "signature-input"));
	ck_assert_str_eq(sig, vector_get(&v, "signature"));

	/* The public key of B.1.4 is the one of the private key, in all forms. */
	char b64[64];
	ck_assert_int_eq(httpsig_ed25519_public_base64(priv, b64, sizeof(b64)), CW_OK);
	char x[64];
	snprintf(x, sizeof(x), "%s=", vector_get(&v, "public-key-jwk-x"));
	for (char *c = x; *c; c++)
		*c = *c == '-' ? '+' : *c == '_' ? '/' : *c;
	ck_assert_str_eq(b64, x);
	EVP_PKEY *pub = pem_public(vector_get(&v, "public-key"));
	ck_assert_int_eq(EVP_PKEY_eq(pub, priv), 1);

	/* Our verifier accepts the RFC's own header values. */
	struct keyring kr = { .ids = { "test-key-ed25519" }, .keys = { pub }, .n = 1 };
	const char *required[] = { "@method", "@authority", "@path", NULL };
	struct httpsig_verify_opts o = {
		.label = "sig-b26", .required = required, .require_created = true, .require_keyid = true,
		.now = p.created + 10, .max_skew_s = 60, .key_for = keyring_find, .key_release = keyring_release,
		.key_ctx = &kr,
	};
	struct httpsig_result res;
	ck_assert_msg(httpsig_verify(&m, vector_get(&v, "signature-input"), vector_get(&v, "signature"), &o,
				     &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(res.label, "sig-b26");
	ck_assert_str_eq(res.keyid, "test-key-ed25519");
	ck_assert(res.has_created);
	ck_assert_int_eq(res.created, 1618884473);
	ck_assert_int_eq(res.ncomponents, 6);
	ck_assert_int_eq(kr.lookups, 1);
	ck_assert_int_eq(kr.releases, 1);

	/* The request's Content-Digest (sha-512) is the body's. */
	ck_assert_msg(httpsig_check_content_digest(req_header(&r, "content-digest"), r.body, r.body_len, &e) == CW_OK,
		      "%s", e.msg);

	/* One byte of one covered header changed: refused. */
	req_set(&r, "date", "Tue, 20 Apr 2021 02:07:56 GMT");
	ck_assert_int_eq(httpsig_verify(&m, vector_get(&v, "signature-input"), vector_get(&v, "signature"), &o,
					&res, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "does not verify"));

	EVP_PKEY_free(priv);
	EVP_PKEY_free(pub);
	free(comp_text);
	req_free(&r);
	vector_free(&v);
}
END_TEST

START_TEST(rfc9530_example_digest)
{
	const char body[] = "{\"hello\": \"world\"}";
	char out[HTTPSIG_DIGEST_HEADER_LEN];
	ck_assert_int_eq(httpsig_content_digest(body, strlen(body), out, sizeof(out)), CW_OK);
	ck_assert_str_eq(out, "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:");
	cw_errmsg e;
	ck_assert_int_eq(httpsig_check_content_digest(out, body, strlen(body), &e), CW_OK);
	ck_assert_int_eq(httpsig_check_content_digest(out, body, strlen(body) - 1, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "digest mismatch"));
	ck_assert_int_eq(httpsig_content_digest(body, strlen(body), out, sizeof(out) - 1), CW_EINVAL);
	/* The empty body. */
	ck_assert_int_eq(httpsig_content_digest(NULL, 0, out, sizeof(out)), CW_OK);
	ck_assert_str_eq(out, "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:");
	ck_assert_int_eq(httpsig_check_content_digest(out, NULL, 0, &e), CW_OK);
}
END_TEST

/* ------------------------------------------------- our profile, round trips */

#define T0 1764300000

static const char *const our_components[] = {
	"@method", "@target-uri", "content-digest", "content-type", "idempotency-key", NULL,
};
static const char *const our_required[] = { "@method", "@target-uri", "content-digest", "content-type", NULL };
static const char *const our_if_present[] = { "idempotency-key", NULL };

static void baseline_request(struct req *r)
{
	memset(r, 0, sizeof(*r));
	set_str(&r->method, "POST");
	set_str(&r->uri, "https://causeway.example:8443/v1/rooms/r_8f3c/messages?after=5&limit=10");
	req_body(r, "{\"type\":\"message\",\"body\":\"hi\"}");
	char digest[HTTPSIG_DIGEST_HEADER_LEN];
	ck_assert_int_eq(httpsig_content_digest(r->body, r->body_len, digest, sizeof(digest)), CW_OK);
	req_set(r, "content-type", "application/json");
	req_set(r, "idempotency-key", "idem-42");
	req_set(r, "content-digest", digest);
}

static struct httpsig_params baseline_params(void)
{
	return (struct httpsig_params){ .created = T0, .keyid = "peer-a", .nonce = "n-0001", .tag = "causeway-v1" };
}

static struct httpsig_verify_opts baseline_opts(struct keyring *kr, const struct req *r)
{
	return (struct httpsig_verify_opts){
		.required = our_required, .required_if_present = our_if_present,
		.require_created = true, .require_keyid = true, .require_nonce = true, .require_tag = true,
		.tag = "causeway-v1", .now = T0, .max_skew_s = 300,
		.key_for = keyring_find, .key_release = keyring_release, .key_ctx = kr,
		.check_content_digest = true, .body = r->body, .body_len = r->body_len,
	};
}

START_TEST(round_trip_our_profile)
{
	EVP_PKEY *a = new_ed25519();
	EVP_PKEY *a_pub = public_of(a);
	struct keyring kr = { .ids = { "peer-a" }, .keys = { a_pub }, .n = 1 };
	struct req r;
	baseline_request(&r);
	struct httpsig_msg m = req_msg(&r);
	struct httpsig_params p = baseline_params();
	char si[HTTPSIG_MAX_FIELD], sig[HTTPSIG_MAX_FIELD];
	cw_errmsg e = { { 0 } };
	ck_assert_msg(httpsig_sign(&m, our_components, a, &p, si, sizeof(si), sig, sizeof(sig), &e) == CW_OK, "%s",
		      e.msg);
	ck_assert_str_eq(si, "sig1=(\"@method\" \"@target-uri\" \"content-digest\" \"content-type\" "
			     "\"idempotency-key\");created=1764300000;nonce=\"n-0001\";keyid=\"peer-a\";"
			     "tag=\"causeway-v1\"");
	ck_assert_int_eq(strncmp(sig, "sig1=:", 6), 0);
	ck_assert_int_eq(strlen(sig), 6 + 88 + 1);

	struct httpsig_verify_opts o = baseline_opts(&kr, &r);
	struct httpsig_result res;
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(res.label, "sig1");
	ck_assert_str_eq(res.keyid, "peer-a");
	ck_assert_str_eq(res.nonce, "n-0001");
	ck_assert_str_eq(res.tag, "causeway-v1");
	ck_assert_str_eq(res.alg, "");
	ck_assert(res.has_created && !res.has_expires);
	ck_assert_int_eq(res.created, T0);
	ck_assert_int_eq(res.ncomponents, 5);
	ck_assert_int_eq(kr.lookups, kr.releases);

	/* The base we sign, line by line (derived components of RFC 9421 §2.2). */
	const char *all[] = { "@method", "@target-uri", "@authority", "@scheme", "@path", "@query",
			      "@request-target", "content-type", NULL };
	char base[4096];
	ck_assert_int_eq(httpsig_signature_base(&m, all, &p, base, sizeof(base), &e), CW_OK);
	ck_assert_str_eq(base,
			 "\"@method\": POST\n"
			 "\"@target-uri\": https://causeway.example:8443/v1/rooms/r_8f3c/messages?after=5&limit=10\n"
			 "\"@authority\": causeway.example:8443\n"
			 "\"@scheme\": https\n"
			 "\"@path\": /v1/rooms/r_8f3c/messages\n"
			 "\"@query\": ?after=5&limit=10\n"
			 "\"@request-target\": /v1/rooms/r_8f3c/messages?after=5&limit=10\n"
			 "\"content-type\": application/json\n"
			 "\"@signature-params\": (\"@method\" \"@target-uri\" \"@authority\" \"@scheme\" \"@path\" "
			 "\"@query\" \"@request-target\" \"content-type\");created=1764300000;nonce=\"n-0001\";"
			 "keyid=\"peer-a\";tag=\"causeway-v1\"");
	/* The buffer must hold the whole base. */
	ck_assert_int_eq(httpsig_signature_base(&m, all, &p, base, 40, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "too small"));

	req_free(&r);
	EVP_PKEY_free(a);
	EVP_PKEY_free(a_pub);
}
END_TEST

/* A prepared key (httpsig_key_prepare: its verification set up once and
 * copied for each signature, forty-fourth session) verifies what the key
 * unprepared does, again and again, and refuses what it refuses: another
 * key's signature, a signature changed by one byte. */
START_TEST(prepared_keys_verify_as_unprepared)
{
	EVP_PKEY *a = new_ed25519(), *b = new_ed25519();
	EVP_PKEY *a_pub = public_of(a), *b_pub = public_of(b);
	httpsig_key_prepare(a_pub);
	httpsig_key_prepare(a_pub); /* once is kept */
	httpsig_key_prepare(b_pub);
	httpsig_key_prepare(NULL);
	struct keyring kr = { .ids = { "peer-a" }, .keys = { a_pub }, .n = 1 };
	struct req r;
	baseline_request(&r);
	struct httpsig_msg m = req_msg(&r);
	struct httpsig_params p = baseline_params();
	char si[HTTPSIG_MAX_FIELD], sig[HTTPSIG_MAX_FIELD];
	cw_errmsg e = { { 0 } };
	ck_assert_msg(httpsig_sign(&m, our_components, a, &p, si, sizeof(si), sig, sizeof(sig), &e) == CW_OK, "%s",
		      e.msg);
	struct httpsig_verify_opts o = baseline_opts(&kr, &r);
	struct httpsig_result res;
	for (int i = 0; i < 3; i++)
		ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	char bad[HTTPSIG_MAX_FIELD];
	snprintf(bad, sizeof(bad), "%s", sig);
	bad[20] = bad[20] == 'A' ? 'B' : 'A';
	ck_assert_int_eq(httpsig_verify(&m, si, bad, &o, &res, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "does not verify"));
	kr.keys[0] = b_pub; /* the same keyid, another (prepared) key */
	ck_assert_int_eq(httpsig_verify(&m, si, sig, &o, &res, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "does not verify"));
	kr.keys[0] = a_pub;
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_int_eq(kr.lookups, kr.releases);
	ck_assert_int_eq(ERR_peek_error(), 0);
	req_free(&r);
	EVP_PKEY_free(a);
	EVP_PKEY_free(b);
	EVP_PKEY_free(a_pub); /* its prepared context goes with it (the sanitizers' leak check) */
	EVP_PKEY_free(b_pub);
}
END_TEST

/* Appends ", member" (or member) to a field of HTTPSIG_MAX_FIELD bytes. */
static void append_member(char *field, const char *member)
{
	size_t n = strlen(field), m = strlen(member), sep = n ? 2 : 0;
	ck_assert_uint_lt(n + sep + m, HTTPSIG_MAX_FIELD);
	memcpy(field + n, ", ", sep);
	memcpy(field + n + sep, member, m + 1);
}

/* Signs r as label with key and keyid (tag causeway-v1), appending the
 * member to the two fields. */
static void add_signature_nonce(struct req *r, const char *label, EVP_PKEY *key, const char *keyid,
				const char *nonce, int64_t created, char *si, char *sig)
{
	struct httpsig_msg m = req_msg(r);
	struct httpsig_params p = baseline_params();
	p.label = label;
	p.keyid = keyid;
	if (nonce)
		p.nonce = nonce;
	if (created)
		p.created = created;
	char one_si[HTTPSIG_MAX_FIELD], one_sig[HTTPSIG_MAX_FIELD];
	cw_errmsg e = { { 0 } };
	ck_assert_msg(httpsig_sign(&m, our_components, key, &p, one_si, sizeof(one_si), one_sig, sizeof(one_sig), &e) ==
			      CW_OK,
		      "%s", e.msg);
	append_member(si, one_si);
	append_member(sig, one_sig);
}

static void add_signature(struct req *r, const char *label, EVP_PKEY *key, const char *keyid, char *si, char *sig)
{
	add_signature_nonce(r, label, key, keyid, NULL, 0, si, sig);
}

/* RFC 9421 §3.2: of several signatures with the tag asked for, each is
 * tried in order until one verifies (a peer rotating its key may send
 * both, a proxy may add one), but at most HTTPSIG_MAX_TRIES: a request
 * cannot make the verifier check sixteen.  Until the thirty-second
 * session the first of the tag alone was tried. */
START_TEST(several_signatures_of_the_tag_are_tried_in_order)
{
	EVP_PKEY *a = new_ed25519(), *b = new_ed25519();
	EVP_PKEY *a_pub = public_of(a);
	struct keyring kr = { .ids = { "peer-a" }, .keys = { a_pub }, .n = 1 };
	struct req r;
	baseline_request(&r);
	struct httpsig_msg m = req_msg(&r);
	struct httpsig_verify_opts o = baseline_opts(&kr, &r);
	struct httpsig_result res;
	cw_errmsg e = { { 0 } };
	static char si[HTTPSIG_MAX_FIELD], sig[HTTPSIG_MAX_FIELD];

	/* The old key's first (b, no longer registered as peer-a's), then the
	 * right one; and an unknown keyid first. */
	si[0] = sig[0] = '\0';
	add_signature(&r, "old", b, "peer-a", si, sig);
	add_signature(&r, "new", a, "peer-a", si, sig);
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(res.label, "new");
	ck_assert_str_eq(res.keyid, "peer-a");
	ck_assert_int_eq(kr.lookups, kr.releases);
	si[0] = sig[0] = '\0';
	add_signature(&r, "who", a, "peer-z", si, sig);
	add_signature(&r, "me", a, "peer-a", si, sig);
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(res.label, "me");

	/* None verifies: the first one's reason. */
	si[0] = sig[0] = '\0';
	add_signature(&r, "x1", b, "peer-a", si, sig);
	add_signature(&r, "x2", a, "peer-z", si, sig);
	ck_assert_int_eq(httpsig_verify(&m, si, sig, &o, &res, &e), CW_EINVAL);
	ck_assert_str_eq(e.msg, "signature 'x1' does not verify with key 'peer-a'");
	ck_assert_str_eq(res.label, "x1");

	/* The right one fourth is found; fifth it is not tried, and no more
	 * than four keys are looked up. */
	for (int pos = 4; pos <= 5; pos++) {
		si[0] = sig[0] = '\0';
		for (int i = 1; i < pos; i++) {
			char label[8];
			snprintf(label, sizeof(label), "bad%d", i);
			add_signature(&r, label, b, "peer-a", si, sig);
		}
		add_signature(&r, "good", a, "peer-a", si, sig);
		kr.lookups = kr.releases = 0;
		cw_err rc = httpsig_verify(&m, si, sig, &o, &res, &e);
		ck_assert_int_eq(kr.lookups, 4);
		ck_assert_int_eq(kr.releases, 4);
		if (pos == 4) {
			ck_assert_msg(rc == CW_OK, "%s", e.msg);
			ck_assert_str_eq(res.label, "good");
		} else {
			ck_assert_int_eq(rc, CW_EINVAL);
			ck_assert_str_eq(e.msg, "signature 'bad1' does not verify with key 'peer-a'");
		}
	}

	/* A label asked for is that one only. */
	si[0] = sig[0] = '\0';
	add_signature(&r, "old", b, "peer-a", si, sig);
	add_signature(&r, "new", a, "peer-a", si, sig);
	o.label = "old";
	ck_assert_int_eq(httpsig_verify(&m, si, sig, &o, &res, &e), CW_EINVAL);
	o.label = "new";
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);

	/* The body is checked once, after a signature verified: a wrong
	 * body is refused for its digest, not for every signature. */
	o.label = NULL;
	o.body = "{}";
	o.body_len = 2;
	ck_assert_int_eq(httpsig_verify(&m, si, sig, &o, &res, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "digest mismatch"));

	req_free(&r);
	EVP_PKEY_free(a);
	EVP_PKEY_free(b);
	EVP_PKEY_free(a_pub);
}
END_TEST

/* A peer rotating its key signs with the old and the new one, each
 * signature with a nonce of its own.  Every nonce of the peer's
 * signatures is reported (httpsig_result.nonces), the verified one's
 * first, each once, another keyid's not: a replay cache that spends them
 * all refuses the request captured while the old key was registered and
 * replayed, after the rotation, with the new key's signature alone.
 * Until the forty-seventh session only the verified signature's nonce
 * was reported and spent, and that replay was taken. */
START_TEST(every_nonce_of_the_peers_signatures_is_spent)
{
	EVP_PKEY *a = new_ed25519(), *b = new_ed25519();
	EVP_PKEY *a_pub = public_of(a), *b_pub = public_of(b);
	struct keyring before = { .ids = { "peer-a" }, .keys = { b_pub }, .n = 1 };
	struct keyring after = { .ids = { "peer-a" }, .keys = { a_pub }, .n = 1 };
	struct req r;
	baseline_request(&r);
	struct httpsig_msg m = req_msg(&r);
	struct httpsig_verify_opts o = baseline_opts(&before, &r);
	struct httpsig_result res;
	cw_errmsg e = { { 0 } };
	static char si[HTTPSIG_MAX_FIELD], sig[HTTPSIG_MAX_FIELD], si_new[HTTPSIG_MAX_FIELD],
		sig_new[HTTPSIG_MAX_FIELD];
	si[0] = sig[0] = si_new[0] = sig_new[0] = '\0';
	add_signature_nonce(&r, "old", b, "peer-a", "n-old", 0, si, sig);
	add_signature_nonce(&r, "edge", a, "peer-z", "n-edge", 0, si, sig);
	add_signature_nonce(&r, "new", a, "peer-a", "n-new", T0 + 30, si, sig);
	add_signature_nonce(&r, "again", a, "peer-a", "n-old", 0, si, sig);
	add_signature_nonce(&r, "new", a, "peer-a", "n-new", T0 + 30, si_new, sig_new);

	/* Before the rotation the old key's verifies: its nonce first. */
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(res.label, "old");
	ck_assert_str_eq(res.nonce, "n-old");
	ck_assert_uint_eq(res.nnonces, 2);
	ck_assert_str_eq(res.nonces[0], "n-old");
	ck_assert_str_eq(res.nonces[1], "n-new");
	/* Each held from its own signature's created on. */
	ck_assert_int_eq(res.nonces_created[0], T0);
	ck_assert_int_eq(res.nonces_created[1], T0 + 30);
	struct httpsig_replay *rp = httpsig_replay_new(100, 600);
	ck_assert_ptr_nonnull(rp);
	for (size_t i = 0; i < res.nnonces; i++)
		ck_assert_int_eq(httpsig_replay_check_and_add(rp, res.keyid, res.nonces[i], res.nonces_created[i], T0),
				 CW_OK);

	/* After it the new key's verifies, the old one's nonce still listed. */
	o = baseline_opts(&after, &r);
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(res.label, "new");
	ck_assert_uint_eq(res.nnonces, 2);
	ck_assert_str_eq(res.nonces[0], "n-new");
	ck_assert_str_eq(res.nonces[1], "n-old");

	/* The capture replayed with the new key's signature alone: verified,
	 * and its nonce already spent. */
	ck_assert_msg(httpsig_verify(&m, si_new, sig_new, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_uint_eq(res.nnonces, 1);
	ck_assert_str_eq(res.nonces[0], "n-new");
	ck_assert_int_eq(httpsig_replay_check_and_add(rp, res.keyid, res.nonces[0], res.created, T0 + 1),
			 CW_ECONFLICT);

	/* Another signature's created far ahead counts as now + skew at most. */
	si[0] = sig[0] = '\0';
	add_signature_nonce(&r, "new", a, "peer-a", "n-2", 0, si, sig);
	add_signature_nonce(&r, "odd", b, "peer-a", "n-3", T0 + 100000, si, sig);
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_uint_eq(res.nnonces, 2);
	ck_assert_str_eq(res.nonces[1], "n-3");
	ck_assert_int_eq(res.nonces_created[1], T0 + 300);

	httpsig_replay_free(rp);
	req_free(&r);
	EVP_PKEY_free(a);
	EVP_PKEY_free(b);
	EVP_PKEY_free(a_pub);
	EVP_PKEY_free(b_pub);
}
END_TEST

/* The URL Causeway requests and signs for a peer's push_url: normalised
 * as the peer rebuilds its @target-uri from what it receives (scheme and
 * host lower-case, the default port left out), its /v1/notify after the
 * path (trailing slashes dropped), before a query.  Until the
 * thirty-second session the push_url as the operator typed it was signed:
 * "https://Peer.Example:443" made a @target-uri no peer rebuilds. */
START_TEST(notify_url_normalised)
{
	static const char *const cases[][2] = {
		{ "https://Peer.EXAMPLE:443", "https://peer.example/v1/notify" },
		{ "https://peer.example:443/", "https://peer.example/v1/notify" },
		{ "https://peer.example", "https://peer.example/v1/notify" },
		{ "http://H.example:80/Base//", "http://h.example/Base/v1/notify" },
		{ "https://h.example:8443/a", "https://h.example:8443/a/v1/notify" },
		{ "http://h.example:443", "http://h.example:443/v1/notify" },
		{ "http://[::1]:80", "http://[::1]/v1/notify" },
		{ "http://[FE80::1%25eth0]:8080/x", "http://[fe80::1%25eth0]:8080/x/v1/notify" },
		{ "http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/notify" },
		{ "https://h.example/base?x=1", "https://h.example/base/v1/notify?x=1" },
	};
	char out[2200];
	cw_errmsg e = { { 0 } };
	for (size_t i = 0; i < CW_ARRAY_LEN(cases); i++) {
		ck_assert_msg(peer_out_notify_url(cases[i][0], out, sizeof(out), &e) == CW_OK, "%s: %s", cases[i][0],
			      e.msg);
		ck_assert_str_eq(out, cases[i][1]);
	}
	static const char *const bad[] = { "", "peer.example", "ftp://peer.example", "https://", "https://u:p@h.example" };
	for (size_t i = 0; i < CW_ARRAY_LEN(bad); i++) {
		ck_assert_msg(peer_out_notify_url(bad[i], out, sizeof(out), &e) != CW_OK, "%s taken", bad[i]);
		ck_assert_ptr_nonnull(strstr(e.msg, "push_url"));
	}
	ck_assert_int_eq(peer_out_notify_url("https://peer.example", out, 10, &e), CW_EINVAL);

	/* What is signed is what the peer rebuilds from the request. */
	EVP_PKEY *k = new_ed25519();
	EVP_PKEY *pub = public_of(k);
	struct keyring kr = { .ids = { "peer-a" }, .keys = { pub }, .n = 1 };
	struct req r;
	baseline_request(&r);
	ck_assert_int_eq(peer_out_notify_url("HTTPS://Peer.Example:443/", out, sizeof(out), &e), CW_OK);
	set_str(&r.uri, out);
	struct httpsig_msg m = req_msg(&r);
	struct httpsig_params p = baseline_params();
	char si[HTTPSIG_MAX_FIELD], sig[HTTPSIG_MAX_FIELD];
	ck_assert_int_eq(httpsig_sign(&m, our_components, k, &p, si, sizeof(si), sig, sizeof(sig), &e), CW_OK);
	set_str(&r.uri, "https://peer.example/v1/notify");
	m = req_msg(&r);
	struct httpsig_verify_opts o = baseline_opts(&kr, &r);
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, NULL, &e) == CW_OK, "%s", e.msg);

	/* A link-local push_url's zone id is requested (libcurl scopes the
	 * address by it) but not signed: the Host header libcurl sends has
	 * none, so neither has the @target-uri the peer rebuilds.  Until the
	 * fifty-second session "%25eth0" was signed and every such push
	 * failed the peer's check. */
	static const char *const zoned[][2] = {
		{ "http://[FE80::1%25eth0]:8080/x", "http://[fe80::1]:8080/x/v1/notify" },
		{ "https://[fe80::1%25eth0]", "https://[fe80::1]/v1/notify" },
		{ "http://[::1%25lo]:9/a?b=%25c]", "http://[::1]:9/a/v1/notify?b=%25c]" },
		{ "http://[::1]:9/a%25b]", "http://[::1]:9/a%25b]/v1/notify" },
		{ "http://h.example/a%25b]", "http://h.example/a%25b]/v1/notify" },
	};
	char target[2200];
	for (size_t i = 0; i < CW_ARRAY_LEN(zoned); i++) {
		ck_assert_msg(peer_out_notify_url(zoned[i][0], out, sizeof(out), &e) == CW_OK, "%s: %s", zoned[i][0],
			      e.msg);
		httpsig_target_uri(out, target, sizeof(target));
		ck_assert_str_eq(target, zoned[i][1]);
	}
	ck_assert_int_eq(peer_out_notify_url("http://[FE80::1%25eth0]:8080", out, sizeof(out), &e), CW_OK);
	ck_assert_str_eq(out, "http://[fe80::1%25eth0]:8080/v1/notify");
	httpsig_target_uri(out, target, sizeof(target));
	set_str(&r.uri, target);
	m = req_msg(&r);
	ck_assert_int_eq(httpsig_sign(&m, our_components, k, &p, si, sizeof(si), sig, sizeof(sig), &e), CW_OK);
	set_str(&r.uri, "http://[fe80::1]:8080/v1/notify");
	m = req_msg(&r);
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, NULL, &e) == CW_OK, "%s", e.msg);
	req_free(&r);
	EVP_PKEY_free(k);
	EVP_PKEY_free(pub);
}
END_TEST

/* A peer's file (and each redirect of it) is requested and signed in the
 * form a push's URL has, by the same function, without a path appended:
 * the host lower-case, no default port, dot segments resolved and no
 * fragment (libcurl sends neither), the zone id requested but not
 * signed.  Until the fifty-second session a file's URL was signed as the
 * peer spelled it. */
START_TEST(request_url_of_a_file_normalised)
{
	static const char *const cases[][3] = { /* URL, requested, signed */
		{ "https://Media.Peer.EXAMPLE:443/f/A.jpg", "https://media.peer.example/f/A.jpg",
		  "https://media.peer.example/f/A.jpg" },
		{ "https://media.peer.example:8443/f/x/../y/./A.jpg?v=1", "https://media.peer.example:8443/f/y/A.jpg?v=1",
		  "https://media.peer.example:8443/f/y/A.jpg?v=1" },
		{ "https://media.peer.example/f/A.jpg#part", "https://media.peer.example/f/A.jpg",
		  "https://media.peer.example/f/A.jpg" },
		{ "https://media.peer.example", "https://media.peer.example/", "https://media.peer.example/" },
		{ "https://media.peer.example?x=1#y", "https://media.peer.example/?x=1", "https://media.peer.example/?x=1" },
		{ "http://[FE80::1%25eth0]:80/f/", "http://[fe80::1%25eth0]/f/", "http://[fe80::1]/f/" },
		{ "https://media.peer.example/f/A%2Fb%25c", "https://media.peer.example/f/A%2Fb%25c",
		  "https://media.peer.example/f/A%2Fb%25c" },
	};
	char out[256], target[256];
	cw_errmsg e = { { 0 } };
	for (size_t i = 0; i < CW_ARRAY_LEN(cases); i++) {
		ck_assert_msg(httpsig_request_url(cases[i][0], NULL, "url", out, sizeof(out), &e) == CW_OK, "%s: %s",
			      cases[i][0], e.msg);
		ck_assert_str_eq(out, cases[i][1]);
		httpsig_target_uri(out, target, sizeof(target));
		ck_assert_str_eq(target, cases[i][2]);
	}
	static const char *const bad[] = { "", "media.peer.example/f", "ftp://media.peer.example/f", "https://",
					   "https://u@media.peer.example/f", "https://media.peer.example:99999/f" };
	for (size_t i = 0; i < CW_ARRAY_LEN(bad); i++) {
		ck_assert_msg(httpsig_request_url(bad[i], NULL, "the file's URL", out, sizeof(out), &e) == CW_EINVAL,
			      "%s taken", bad[i]);
		ck_assert_msg(strncmp(e.msg, "the file's URL ", 15) == 0, "%s: %s", bad[i], e.msg);
	}
	ck_assert_int_eq(httpsig_request_url("https://media.peer.example/f", NULL, "url", out, 28, &e), CW_EINVAL);
	ck_assert_int_eq(httpsig_request_url("https://media.peer.example/f", NULL, "url", out, 29, &e), CW_OK);
	ck_assert_str_eq(out, "https://media.peer.example/f");
}
END_TEST

/* Derived components on other URIs: default ports, case, no path, no query. */
START_TEST(derived_components_normalise)
{
	static const struct {
		const char *uri, *authority, *scheme, *path, *query, *target;
	} cases[] = {
		{ "http://Example.COM:80/a", "example.com", "http", "/a", "?", "/a" },
		{ "HTTPS://example.com:443", "example.com", "https", "/", "?", "/" },
		{ "https://example.com:80/x?", "example.com:80", "https", "/x", "?", "/x?" },
		{ "http://[2001:DB8::1]:8080/p?q=1", "[2001:db8::1]:8080", "http", "/p", "?q=1", "/p?q=1" },
		{ "http://[::1]/p", "[::1]", "http", "/p", "?", "/p" },
		{ "http://127.0.0.1:8480/v1/events?after=abc%2F", "127.0.0.1:8480", "http", "/v1/events",
		  "?after=abc%2F", "/v1/events?after=abc%2F" },
	};
	for (size_t i = 0; i < CW_ARRAY_LEN(cases); i++) {
		struct req r = { 0 };
		set_str(&r.method, "GET");
		set_str(&r.uri, cases[i].uri);
		struct httpsig_msg m = req_msg(&r);
		const char *comps[] = { "@authority", "@scheme", "@path", "@query", "@request-target", NULL };
		struct httpsig_params p = { 0 };
		char base[1024], want[1024];
		cw_errmsg e = { { 0 } };
		ck_assert_msg(httpsig_signature_base(&m, comps, &p, base, sizeof(base), &e) == CW_OK, "%s: %s",
			      cases[i].uri, e.msg);
		snprintf(want, sizeof(want),
			 "\"@authority\": %s\n\"@scheme\": %s\n\"@path\": %s\n\"@query\": %s\n"
			 "\"@request-target\": %s\n\"@signature-params\": (\"@authority\" \"@scheme\" \"@path\" "
			 "\"@query\" \"@request-target\")",
			 cases[i].authority, cases[i].scheme, cases[i].path, cases[i].query, cases[i].target);
		ck_assert_str_eq(base, want);
		req_free(&r);
	}
}
END_TEST

START_TEST(signing_refuses_bad_input)
{
	EVP_PKEY *a = new_ed25519();
	EVP_PKEY *ec = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
	ck_assert_ptr_nonnull(ec);
	struct req r;
	baseline_request(&r);
	struct httpsig_msg m = req_msg(&r);
	struct httpsig_params p = baseline_params();
	char si[HTTPSIG_MAX_FIELD], sig[HTTPSIG_MAX_FIELD];
	cw_errmsg e;

	ck_assert_int_eq(httpsig_sign(&m, our_components, ec, &p, si, sizeof(si), sig, sizeof(sig), &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "not an Ed25519 key"));

	const char *dup[] = { "@method", "content-type", "@method", NULL };
	ck_assert_int_eq(httpsig_sign(&m, dup, a, &p, si, sizeof(si), sig, sizeof(sig), &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "covered twice"));

	const char *absent[] = { "@method", "date", NULL };
	ck_assert_int_eq(httpsig_sign(&m, absent, a, &p, si, sizeof(si), sig, sizeof(sig), &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "'date' is absent"));

	struct httpsig_params bad = p;
	bad.nonce = "caf\xc3\xa9";
	ck_assert_int_eq(httpsig_sign(&m, our_components, a, &bad, si, sizeof(si), sig, sizeof(sig), &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "not printable ASCII"));

	ck_assert_int_eq(httpsig_sign(&m, our_components, a, &p, si, 20, sig, sizeof(sig), &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "Signature-Input buffer too small"));
	ck_assert_int_eq(httpsig_sign(&m, our_components, a, &p, si, sizeof(si), sig, 20, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "Signature buffer too small"));

	set_str(&r.method, "PO ST");
	m = req_msg(&r);
	ck_assert_int_eq(httpsig_sign(&m, our_components, a, &p, si, sizeof(si), sig, sizeof(sig), &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "method is not a token"));

	/* Escapes in strings survive the round trip. */
	set_str(&r.method, "POST");
	m = req_msg(&r);
	struct httpsig_params q = p;
	q.keyid = "we\"ird\\id";
	ck_assert_int_eq(httpsig_sign(&m, our_components, a, &q, si, sizeof(si), sig, sizeof(sig), &e), CW_OK);
	ck_assert_ptr_nonnull(strstr(si, "keyid=\"we\\\"ird\\\\id\""));
	EVP_PKEY *a_pub = public_of(a);
	struct keyring kr = { .ids = { "we\"ird\\id" }, .keys = { a_pub }, .n = 1 };
	struct httpsig_verify_opts o = baseline_opts(&kr, &r);
	struct httpsig_result res;
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(res.keyid, "we\"ird\\id");
	/* At either end and side by side too: the sixtieth session's
	 * ser_string copies the runs between them whole. */
	q.keyid = "\"\\\"x\\";
	ck_assert_int_eq(httpsig_sign(&m, our_components, a, &q, si, sizeof(si), sig, sizeof(sig), &e), CW_OK);
	ck_assert_ptr_nonnull(strstr(si, ";keyid=\"\\\"\\\\\\\"x\\\\\";"));
	kr.ids[0] = q.keyid;
	ck_assert_msg(httpsig_verify(&m, si, sig, &o, &res, &e) == CW_OK, "%s", e.msg);
	ck_assert_str_eq(res.keyid, q.keyid);

	req_free(&r);
	EVP_PKEY_free(a);
	EVP_PKEY_free(a_pub);
	EVP_PKEY_free(ec);
}
END_TEST

/* ------------------------------------------------- the table of hostile cases */

#define CASE_FIELDS 16

struct tcase {
	char name[200];
	char *keys[CASE_FIELDS];
	char *vals[CASE_FIELDS];
	int n;
};

static int load_cases(struct tcase *cases, int max)
{
	FILE *f = fopen(unit_data_path("httpsig_cases.txt"), "r");
	ck_assert_msg(f != NULL, "cannot open %s", unit_data_path("httpsig_cases.txt"));
	char line[16384];
	int n = -1;
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = '\0';
		if (strncmp(line, "=== ", 4) == 0) {
			ck_assert_int_lt(n + 1, max);
			n++;
			memset(&cases[n], 0, sizeof(cases[n]));
			snprintf(cases[n].name, sizeof(cases[n].name), "%.199s", line + 4);
			continue;
		}
		if (n < 0 || line[0] == '#' || line[0] == '\0')
			continue;
		char *colon = strchr(line, ':');
		ck_assert_msg(colon != NULL, "httpsig_cases.txt: bad line in '%s': %s", cases[n].name, line);
		*colon = '\0';
		const char *val = colon[1] == ' ' ? colon + 2 : colon + 1;
		struct tcase *k = &cases[n];
		ck_assert_int_lt(k->n, CASE_FIELDS);
		k->keys[k->n] = strdup(line);
		k->vals[k->n] = strdup(val);
		k->n++;
	}
	fclose(f);
	return n + 1;
}

static const char *case_get(const struct tcase *k, const char *key)
{
	for (int i = 0; i < k->n; i++)
		if (strcmp(k->keys[i], key) == 0)
			return k->vals[i];
	return NULL;
}

static void case_free(struct tcase *k)
{
	for (int i = 0; i < k->n; i++) {
		free(k->keys[i]);
		free(k->vals[i]);
	}
}

struct vars {
	const char *si, *sig, *list, *params, *b64, *b64nopad, *digest;
};

/* Expands $SI $SIG $LIST $PARAMS $B64 $B64NOPAD $DIGEST $NL $R{n}{text}; the caller frees. */
static char *expand(const char *in, const struct vars *v)
{
	size_t cap = 65536, len = 0;
	char *out = malloc(cap);
	ck_assert_ptr_nonnull(out);
	static const struct {
		const char *name;
		size_t off;
	} names[] = {
		/* longest first: $B64NOPAD before $B64, $SIG before $SI */
		{ "$B64NOPAD", offsetof(struct vars, b64nopad) }, { "$PARAMS", offsetof(struct vars, params) },
		{ "$DIGEST", offsetof(struct vars, digest) },     { "$LIST", offsetof(struct vars, list) },
		{ "$SIG", offsetof(struct vars, sig) },           { "$B64", offsetof(struct vars, b64) },
		{ "$SI", offsetof(struct vars, si) },
	};
	while (*in) {
		const char *add = NULL;
		size_t add_len = 0, skip = 1;
		char one = *in;
		if (*in == '$') {
			for (size_t i = 0; i < CW_ARRAY_LEN(names) && !add; i++)
				if (strncmp(in, names[i].name, strlen(names[i].name)) == 0) {
					add = *(const char *const *)((const char *)v + names[i].off);
					add_len = strlen(add);
					skip = strlen(names[i].name);
				}
			if (!add && strncmp(in, "$NL", 3) == 0) {
				one = '\n';
				skip = 3;
			} else if (!add && strncmp(in, "$R{", 3) == 0) {
				char *end;
				long times = strtol(in + 3, &end, 10);
				ck_assert(strncmp(end, "}{", 2) == 0);
				const char *text = end + 2, *close = strchr(text, '}');
				ck_assert_ptr_nonnull(close);
				for (long t = 0; t < times; t++) {
					ck_assert_uint_lt(len + (size_t)(close - text), cap - 1);
					memcpy(out + len, text, (size_t)(close - text));
					len += (size_t)(close - text);
				}
				in = close + 1;
				continue;
			}
		}
		if (!add) {
			add = &one;
			add_len = 1;
		}
		ck_assert_uint_lt(len + add_len, cap - 1);
		memcpy(out + len, add, add_len);
		len += add_len;
		in += skip;
	}
	out[len] = '\0';
	return out;
}

static void run_case(const struct tcase *k, EVP_PKEY *a, EVP_PKEY *other, struct keyring *kr)
{
	const char *expect = case_get(k, "expect");
	ck_assert_msg(expect != NULL, "case '%s' has no expect line", k->name);
	cw_errmsg e = { { 0 } };
	struct req r;
	baseline_request(&r);
	struct httpsig_msg m = req_msg(&r);

	/* Sign the baseline, as the case says. */
	struct httpsig_params p = baseline_params();
	const char *v;
	if ((v = case_get(k, "sign-tag")))
		p.tag = v;
	if ((v = case_get(k, "sign-keyid")))
		p.keyid = v;
	if ((v = case_get(k, "sign-label")))
		p.label = v;
	if ((v = case_get(k, "sign-alg")))
		p.alg = v;
	if ((v = case_get(k, "sign-nonce")))
		p.nonce = v;
	if ((v = case_get(k, "created-offset")))
		p.created = T0 + atoll(v);
	if ((v = case_get(k, "expires-offset")))
		p.expires = T0 + atoll(v);
	if ((v = case_get(k, "sign-omit"))) {
		if (strstr(v, "created"))
			p.created = 0;
		if (strstr(v, "keyid"))
			p.keyid = NULL;
		if (strstr(v, "nonce"))
			p.nonce = NULL;
		if (strstr(v, "tag"))
			p.tag = NULL;
	}
	char comp_text[512];
	const char *comps[HTTPSIG_MAX_COMPONENTS + 1];
	if ((v = case_get(k, "sign-components"))) {
		snprintf(comp_text, sizeof(comp_text), "%s", v);
		split_words(comp_text, comps, (int)CW_ARRAY_LEN(comps));
	} else {
		memcpy(comps, our_components, sizeof(our_components));
	}
	EVP_PKEY *signer = (v = case_get(k, "sign-key")) && strcmp(v, "other") == 0 ? other : a;
	char si[HTTPSIG_MAX_FIELD], sig[HTTPSIG_MAX_FIELD];
	cw_err rc = httpsig_sign(&m, comps, signer, &p, si, sizeof(si), sig, sizeof(sig), &e);
	if (strncmp(expect, "sign-error ", 11) == 0) {
		ck_assert_msg(rc == CW_EINVAL, "case '%s': signing should fail", k->name);
		ck_assert_msg(strstr(e.msg, expect + 11) != NULL, "case '%s': sign error '%s' lacks '%s'", k->name,
			      e.msg, expect + 11);
		req_free(&r);
		return;
	}
	ck_assert_msg(rc == CW_OK, "case '%s': signing failed: %s", k->name, e.msg);

	/* The substitutions. */
	char list[HTTPSIG_MAX_FIELD], b64[128], b64nopad[128];
	const char *eq = strchr(si, '=');
	snprintf(list, sizeof(list), "%s", eq + 1);
	char *close = strchr(list, ')');
	const char *params = strchr(si, ')') + 1;
	close[1] = '\0';
	snprintf(b64, sizeof(b64), "%s", strchr(sig, ':') + 1);
	b64[strcspn(b64, ":")] = '\0';
	snprintf(b64nopad, sizeof(b64nopad), "%s", b64);
	b64nopad[strcspn(b64nopad, "=")] = '\0';
	struct vars vars = { .si = si, .sig = sig, .list = list, .params = params, .b64 = b64,
			     .b64nopad = b64nopad, .digest = req_header(&r, "content-digest") };

	/* A Content-Digest case checks that function alone. */
	if ((v = case_get(k, "digest"))) {
		char *value = expand(v, &vars);
		rc = httpsig_check_content_digest(value, r.body, r.body_len, &e);
		free(value);
		goto check;
	}

	/* Change the request after signing. */
	if ((v = case_get(k, "method")))
		set_str(&r.method, v);
	if ((v = case_get(k, "uri")))
		set_str(&r.uri, v);
	if ((v = case_get(k, "body")))
		req_body(&r, v);
	if ((v = case_get(k, "header"))) {
		char *hv = expand(v, &vars);
		char *sep = strchr(hv, ':');
		ck_assert_ptr_nonnull(sep);
		*sep = '\0';
		req_set(&r, hv, sep[1] == ' ' ? sep + 2 : sep + 1);
		free(hv);
	}
	if ((v = case_get(k, "drop-header")))
		req_drop(&r, v);
	m = req_msg(&r);

	char *send_si = expand((v = case_get(k, "sig-input")) ? v : "$SI", &vars);
	char *send_sig = expand((v = case_get(k, "signature")) ? v : "$SIG", &vars);
	struct httpsig_verify_opts o = baseline_opts(kr, &r);
	o.label = case_get(k, "verify-label");
	if ((v = case_get(k, "verify-tag")))
		o.tag = strcmp(v, "-") == 0 ? NULL : v;
	if (o.tag == NULL)
		o.require_tag = false;
	if ((v = case_get(k, "now-offset")))
		o.now = T0 + atoll(v);
	if (case_get(k, "no-digest-check"))
		o.check_content_digest = false;
	char req_text[512];
	const char *required[HTTPSIG_MAX_COMPONENTS + 1] = { NULL };
	if ((v = case_get(k, "require"))) {
		snprintf(req_text, sizeof(req_text), "%s", strcmp(v, "-") == 0 ? "" : v);
		split_words(req_text, required, (int)CW_ARRAY_LEN(required));
		o.required = required;
	}
	kr->lookups = kr->releases = 0;
	struct httpsig_result res;
	rc = httpsig_verify(&m, send_si, send_sig, &o, &res, &e);
	ck_assert_msg(kr->lookups == kr->releases, "case '%s': %d lookups, %d releases", k->name, kr->lookups,
		      kr->releases);
	free(send_si);
	free(send_sig);
check:
	if (strcmp(expect, "ok") == 0) {
		ck_assert_msg(rc == CW_OK, "case '%s': expected ok, got: %s", k->name, e.msg);
	} else {
		ck_assert_msg(strncmp(expect, "error ", 6) == 0, "case '%s': bad expect line", k->name);
		ck_assert_msg(rc == CW_EINVAL, "case '%s': expected an error (%s), got %s", k->name, expect + 6,
			      rc == CW_OK ? "ok" : cw_strerror(rc));
		ck_assert_msg(strstr(e.msg, expect + 6) != NULL, "case '%s': error '%s' lacks '%s'", k->name, e.msg,
			      expect + 6);
	}
	req_free(&r);
}

START_TEST(table_driven_cases)
{
	static struct tcase cases[160];
	int n = load_cases(cases, (int)CW_ARRAY_LEN(cases));
	ck_assert_int_ge(n, 60);
	EVP_PKEY *a = new_ed25519(), *other = new_ed25519();
	EVP_PKEY *a_pub = public_of(a);
	struct keyring kr = { .ids = { "peer-a" }, .keys = { a_pub }, .n = 1 };
	int errors = 0;
	for (int i = 0; i < n; i++) {
		run_case(&cases[i], a, other, &kr);
		const char *x = case_get(&cases[i], "expect");
		errors += strcmp(x, "ok") != 0;
		case_free(&cases[i]);
	}
	ck_assert_int_ge(errors, 25);
	EVP_PKEY_free(a);
	EVP_PKEY_free(other);
	EVP_PKEY_free(a_pub);
}
END_TEST

/* Whether two Signature fields ("sig1=:<base64>:") carry the same bytes:
 * base64's last character has bits that decode to nothing, and RFC 8941
 * (4.2.7) tells parsers not to fail on them, so a mutation there changes
 * the text but not the signature. */
static bool same_signature_bytes(const char *a, const char *b)
{
	const char *pa = strchr(a, ':'), *pb = strchr(b, ':');
	if (!pa || !pb || pa - a != pb - b || strncmp(a, b, (size_t)(pa - a)) != 0)
		return false;
	char ta[HTTPSIG_MAX_FIELD], tb[HTTPSIG_MAX_FIELD];
	snprintf(ta, sizeof(ta), "%s", pa + 1);
	snprintf(tb, sizeof(tb), "%s", pb + 1);
	char *ea = strchr(ta, ':'), *eb = strchr(tb, ':');
	if (!ea || !eb || strcmp(ea, eb) != 0)
		return false;
	*ea = *eb = '\0';
	unsigned char da[128], db[128];
	long na = cw_b64_decode(da, sizeof(da), ta), nb = cw_b64_decode(db, sizeof(db), tb);
	return na > 0 && na == nb && memcmp(da, db, (size_t)na) == 0;
}

/* Random bytes into every field: no crash, no leak, never CW_OK for a
 * field that says anything else than the valid one. */
START_TEST(random_garbage_never_verifies)
{
	EVP_PKEY *a = new_ed25519();
	EVP_PKEY *a_pub = public_of(a);
	struct keyring kr = { .ids = { "peer-a" }, .keys = { a_pub }, .n = 1 };
	struct req r;
	baseline_request(&r);
	struct httpsig_msg m = req_msg(&r);
	struct httpsig_params p = baseline_params();
	char si[HTTPSIG_MAX_FIELD], sig[HTTPSIG_MAX_FIELD];
	cw_errmsg e;
	ck_assert_int_eq(httpsig_sign(&m, our_components, a, &p, si, sizeof(si), sig, sizeof(sig), &e), CW_OK);
	struct httpsig_verify_opts o = baseline_opts(&kr, &r);
	static const char alphabet[] = "sig1=(\"@method\" ;created=1764300000:AB+/=,)?*-\\\t\x80\xff";
	srand(12345);
	for (int round = 0; round < 3000; round++) {
		char fuzz_si[HTTPSIG_MAX_FIELD], fuzz_sig[HTTPSIG_MAX_FIELD];
		/* Either pure noise or one of the valid fields with a few bytes changed. */
		if (round % 2) {
			size_t len = (size_t)(rand() % 500);
			for (size_t i = 0; i < len; i++)
				fuzz_si[i] = alphabet[rand() % (int)(sizeof(alphabet) - 1)];
			fuzz_si[len] = '\0';
			snprintf(fuzz_sig, sizeof(fuzz_sig), "%s", sig);
		} else {
			snprintf(fuzz_si, sizeof(fuzz_si), "%s", si);
			snprintf(fuzz_sig, sizeof(fuzz_sig), "%s", sig);
			char *target = round % 4 ? fuzz_si : fuzz_sig;
			size_t len = strlen(target);
			for (int j = 0; j < 1 + rand() % 3; j++)
				target[rand() % (int)len] = alphabet[rand() % (int)(sizeof(alphabet) - 1)];
		}
		cw_err rc = httpsig_verify(&m, fuzz_si, fuzz_sig, &o, NULL, &e);
		if (rc == CW_OK) /* only if the mutation changed nothing the fields carry */
			ck_assert_msg(strcmp(fuzz_si, si) == 0 &&
					      (strcmp(fuzz_sig, sig) == 0 || same_signature_bytes(fuzz_sig, sig)),
				      "round %d verified: %s / %s", round, fuzz_si, fuzz_sig);
		httpsig_check_content_digest(fuzz_si, r.body, r.body_len, &e);
	}
	ck_assert_int_eq(kr.lookups, kr.releases);
	req_free(&r);
	EVP_PKEY_free(a);
	EVP_PKEY_free(a_pub);
}
END_TEST

/* ------------------------------------------------------------ replay cache */

START_TEST(replay_first_ok_second_refused)
{
	struct httpsig_replay *r = httpsig_replay_new(100, 600);
	ck_assert_ptr_nonnull(r);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "n1", T0, T0), CW_OK);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "n1", T0, T0 + 5), CW_ECONFLICT);
	/* The same nonce from another peer is another pair; keyid and nonce do not run together. */
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-b", "n1", T0, T0), CW_OK);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "n2", T0, T0), CW_OK);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-an", "2", T0, T0), CW_OK);
	ck_assert_int_eq(httpsig_replay_count(r), 4);
	/* Bad arguments. */
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "", T0, T0), CW_EINVAL);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", NULL, T0, T0), CW_EINVAL);
	char longer[HTTPSIG_MAX_TOKEN + 2];
	memset(longer, 'n', sizeof(longer) - 1);
	longer[sizeof(longer) - 1] = '\0';
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", longer, T0, T0), CW_EINVAL);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "n9", -1, T0), CW_EINVAL);
	httpsig_replay_free(r);
	ck_assert_ptr_null(httpsig_replay_new(0, 600));
	ck_assert_ptr_null(httpsig_replay_new(10, 0));
	ck_assert_ptr_null(httpsig_replay_new((size_t)1 << 30, 600));
}
END_TEST

START_TEST(replay_expires_with_time)
{
	struct httpsig_replay *r = httpsig_replay_new(100, 600);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "n1", T0, T0), CW_OK);
	/* Still held at the window's edge. */
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "n1", T0, T0 + 600), CW_ECONFLICT);
	/* Past it: the entry is dropped, and the pair is too old to come back. */
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "n2", T0 + 601, T0 + 601), CW_OK);
	ck_assert_int_eq(httpsig_replay_count(r), 1);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "n1", T0, T0 + 601), CW_EINVAL);
	/* An entry from the future (created ahead within the skew) lives from its created. */
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "f1", T0 + 1000, T0 + 700), CW_OK);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "f1", T0 + 1000, T0 + 1500), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_count(r), 1);
	ck_assert_int_eq(httpsig_replay_live_evictions(r), 0);
	httpsig_replay_free(r);
}
END_TEST

START_TEST(replay_bounded_in_size)
{
	struct httpsig_replay *r = httpsig_replay_new(4, 600);
	char nonce[32];
	for (int i = 0; i < 6; i++) {
		snprintf(nonce, sizeof(nonce), "n%d", i);
		ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", nonce, T0, T0), CW_OK);
		ck_assert_int_le(httpsig_replay_count(r), 4);
	}
	/* The oldest two went first, while still in their window. */
	ck_assert_int_eq(httpsig_replay_live_evictions(r), 2);
	for (int i = 2; i < 6; i++) {
		snprintf(nonce, sizeof(nonce), "n%d", i);
		ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", nonce, T0, T0), CW_ECONFLICT);
	}
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "n0", T0, T0), CW_OK);
	httpsig_replay_free(r);
}
END_TEST

/* A full cache evicts the oldest nonce of the peer (keyid) holding the
 * most: one peer's volume pushes out its own nonces, never another's.
 * Until the thirty-first session it pushed out the oldest of all, and a
 * flood of one authenticated peer made another's captured requests
 * replayable. */
START_TEST(replay_one_peer_evicts_only_its_own)
{
	struct httpsig_replay *r = httpsig_replay_new(4, 600);
	char nonce[32];
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "a0", T0, T0), CW_OK);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-c", "c0", T0, T0), CW_OK);
	for (int i = 0; i < 50; i++) {
		snprintf(nonce, sizeof(nonce), "b%d", i);
		ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-b", nonce, T0, T0), CW_OK);
		ck_assert_int_le(httpsig_replay_count(r), 4);
	}
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "a0", T0, T0 + 1), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-c", "c0", T0, T0 + 1), CW_ECONFLICT);
	/* B keeps its newest two; its older ones went (and are counted). */
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-b", "b49", T0, T0 + 1), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-b", "b48", T0, T0 + 1), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_live_evictions(r), 48);
	/* Now A sends more: the first takes B's oldest (B held the most),
	 * then A holds the most, and its own oldest go; B's and C's stay. */
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "a1", T0, T0 + 1), CW_OK);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "a2", T0, T0 + 1), CW_OK);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "a3", T0, T0 + 1), CW_OK);
	ck_assert_int_eq(httpsig_replay_count(r), 4);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-b", "b49", T0, T0 + 1), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "a3", T0, T0 + 1), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "a2", T0, T0 + 1), CW_ECONFLICT);
	/* Expiry still goes by age, whoever holds the entries. */
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-c", "c1", T0 + 700, T0 + 700), CW_OK);
	ck_assert_int_eq(httpsig_replay_count(r), 1);
	httpsig_replay_free(r);
	/* Of two holding as many, the adding peer's own goes: B's flood takes
	 * A down to an equal share (a0, held above it), not below. */
	r = httpsig_replay_new(4, 600);
	for (int i = 0; i < 3; i++) {
		snprintf(nonce, sizeof(nonce), "a%d", i);
		ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", nonce, T0, T0), CW_OK);
	}
	for (int i = 0; i < 3; i++) {
		snprintf(nonce, sizeof(nonce), "b%d", i);
		ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-b", nonce, T0, T0), CW_OK);
	}
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "a1", T0, T0 + 1), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-a", "a2", T0, T0 + 1), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-b", "b2", T0, T0 + 1), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_check_and_add(r, "peer-b", "b1", T0, T0 + 1), CW_ECONFLICT);
	ck_assert_int_eq(httpsig_replay_live_evictions(r), 2); /* a0, then b0 */
	httpsig_replay_free(r);
}
END_TEST

/* Many inserts through a small table: every held pair stays findable after
 * the backward-shift deletions, nothing evicted is still reported. */
START_TEST(replay_table_stays_consistent)
{
	enum { CAP = 257, TOTAL = 20000 };
	struct httpsig_replay *r = httpsig_replay_new(CAP, 1000000);
	char nonce[32];
	for (int i = 0; i < TOTAL; i++) {
		snprintf(nonce, sizeof(nonce), "%x", i * 2654435761u);
		ck_assert_int_eq(httpsig_replay_check_and_add(r, "k", nonce, T0, T0), CW_OK);
		if (i % 97 == 0) /* the last CAP are all held */
			for (int j = i; j >= 0 && j > i - CAP; j -= 13) {
				snprintf(nonce, sizeof(nonce), "%x", j * 2654435761u);
				ck_assert_int_eq(httpsig_replay_check_and_add(r, "k", nonce, T0, T0), CW_ECONFLICT);
			}
	}
	ck_assert_int_eq(httpsig_replay_count(r), CAP);
	ck_assert_int_eq(httpsig_replay_live_evictions(r), TOTAL - CAP);
	httpsig_replay_free(r);
}
END_TEST

struct replay_thread {
	struct httpsig_replay *r;
	int ok;
};

static void *replay_worker(void *arg)
{
	struct replay_thread *t = arg;
	char nonce[32];
	for (int i = 0; i < 2000; i++) {
		snprintf(nonce, sizeof(nonce), "n%d", i);
		if (httpsig_replay_check_and_add(t->r, "peer-a", nonce, T0, T0) == CW_OK)
			t->ok++;
	}
	return NULL;
}

START_TEST(replay_is_thread_safe)
{
	struct httpsig_replay *r = httpsig_replay_new(10000, 600);
	pthread_t th[4];
	struct replay_thread t[4];
	for (int i = 0; i < 4; i++) {
		t[i] = (struct replay_thread){ .r = r };
		ck_assert_int_eq(pthread_create(&th[i], NULL, replay_worker, &t[i]), 0);
	}
	int ok = 0;
	for (int i = 0; i < 4; i++) {
		pthread_join(th[i], NULL);
		ok += t[i].ok;
	}
	ck_assert_int_eq(ok, 2000); /* each nonce admitted exactly once */
	httpsig_replay_free(r);
}
END_TEST

/* ------------------------------------------------------------------- keys */

START_TEST(key_file_created_once_with_mode_0600)
{
	char dir[] = "/tmp/cw_httpsig_XXXXXX";
	ck_assert_ptr_nonnull(mkdtemp(dir));
	char path[256];
	snprintf(path, sizeof(path), "%s/causeway.key", dir);
	EVP_PKEY *k1 = NULL, *k2 = NULL;
	cw_errmsg e = { { 0 } };
	ck_assert_int_eq(httpsig_key_load(path, &k1, &e), CW_ENOTFOUND);
	ck_assert_msg(httpsig_key_load_or_create(path, &k1, &e) == CW_OK, "%s", e.msg);
	struct stat st;
	ck_assert_int_eq(stat(path, &st), 0);
	ck_assert_int_eq(st.st_mode & 0777, 0600);
	/* The second start loads the same key. */
	ck_assert_msg(httpsig_key_load_or_create(path, &k2, &e) == CW_OK, "%s", e.msg);
	ck_assert_int_eq(EVP_PKEY_eq(k1, k2), 1);
	EVP_PKEY_free(k2);
	/* No temporary file is left behind. */
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "test $(ls -A %s | wc -l) -eq 1", dir);
	ck_assert_int_eq(system(cmd), 0);

	/* A key that others can read is refused. */
	ck_assert_int_eq(chmod(path, 0644), 0);
	ck_assert_int_eq(httpsig_key_load(path, &k2, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "mode 0644"));
	ck_assert_ptr_null(k2);
	/* So is one that its group can read (spec/quality.md: readable only
	 * by the daemon). */
	ck_assert_int_eq(chmod(path, 0640), 0);
	ck_assert_int_eq(httpsig_key_load(path, &k2, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "mode 0640"));
	ck_assert_ptr_null(k2);
	ck_assert_int_eq(chmod(path, 0400), 0);
	ck_assert_int_eq(httpsig_key_load(path, &k2, &e), CW_OK);
	EVP_PKEY_free(k2);
	ck_assert_int_eq(chmod(path, 0600), 0);

	/* Something that is not a key. */
	char junk[256];
	snprintf(junk, sizeof(junk), "%s/junk.key", dir);
	FILE *f = fopen(junk, "w");
	fputs("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n", f);
	fclose(f);
	chmod(junk, 0600);
	ck_assert_int_eq(httpsig_key_load_or_create(junk, &k2, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "cannot read a private key"));
	/* An EC key is not ours. */
	EVP_PKEY *ec = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
	f = fopen(junk, "w");
	PEM_write_PrivateKey(f, ec, NULL, NULL, 0, NULL, NULL);
	fclose(f);
	ck_assert_int_eq(httpsig_key_load(junk, &k2, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "not Ed25519"));
	EVP_PKEY_free(ec);

	/* The public key round-trips through base64 and signs/verifies with k1. */
	char b64[64];
	ck_assert_int_eq(httpsig_ed25519_public_base64(k1, b64, sizeof(b64)), CW_OK);
	EVP_PKEY *pub = httpsig_ed25519_public_from_base64(b64);
	ck_assert_int_eq(EVP_PKEY_eq(pub, k1), 1);
	b64[43] = '\0'; /* unpadded is accepted too */
	EVP_PKEY *pub2 = httpsig_ed25519_public_from_base64(b64);
	ck_assert_int_eq(EVP_PKEY_eq(pub2, k1), 1);
	ck_assert_int_eq(httpsig_ed25519_public_base64(pub, b64, 44), CW_EINVAL);
	EVP_PKEY_free(pub);
	EVP_PKEY_free(pub2);
	EVP_PKEY_free(k1);

	unlink(junk);
	unlink(path);
	rmdir(dir);
}
END_TEST

/* The capability tokens of GET /v1/media/{token} (media.h): made for one
 * peer under a key derived from the signing key; every other peer, key,
 * or changed character fails. */
/* A principal's nonces as the write claims them (peer_nonce_claim,
 * PEER_NONCES): the verified signature's first, then the others', each
 * with its own created; the bound below which claims are forgotten is the
 * skew and a minute before now. */
START_TEST(principal_nonces_verified_first)
{
	struct peer_principal p = { .created = 1000, .n_other_nonces = 2 };
	snprintf(p.nonce, sizeof(p.nonce), "%s", "n-verified");
	snprintf(p.other_nonces[0], sizeof(p.other_nonces[0]), "%s", "n-old-key");
	snprintf(p.other_nonces[1], sizeof(p.other_nonces[1]), "%s", "n-third");
	p.other_created[0] = 1005;
	p.other_created[1] = 990;
	const char *want[] = { "n-verified", "n-old-key", "n-third" };
	const int64_t want_created[] = { 1000, 1005, 990 };
	for (size_t i = 0; i <= p.n_other_nonces; i++) {
		int64_t created = -1;
		ck_assert_str_eq(peer_nonce_at(&p, i, &created), want[i]);
		ck_assert_int_eq(created, want_created[i]);
	}
	ck_assert_int_eq(peer_nonce_stale_before(10000, 300), 10000 - 300 - 60);
}
END_TEST

START_TEST(media_tokens_open_for_their_peer_only)
{
	EVP_PKEY *k1 = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519"), *k2 = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
	unsigned char key[32], again[32], other[32];
	ck_assert(k1 && k2);
	ck_assert(media_key_derive(k1, key) && media_key_derive(k1, again) && media_key_derive(k2, other));
	ck_assert(memcmp(key, again, 32) == 0 && memcmp(key, other, 32) != 0);
	ck_assert(!media_key_derive(NULL, other));
	const char *src = "mxc://example.org/AbC_d-9";
	char tok[256], out[256];
	ck_assert(media_token_make(key, "gk", src, tok, sizeof(tok)));
	ck_assert_msg(strncmp(tok, "m1.", 3) == 0 && strlen(tok) < 120, "%s", tok);
	ck_assert(media_token_open(key, "gk", tok, out, sizeof(out)));
	ck_assert_str_eq(out, src);
	ck_assert(!media_token_open(key, "tg", tok, out, sizeof(out)));    /* another peer */
	ck_assert(!media_token_open(other, "gk", tok, out, sizeof(out)));  /* another key */
	ck_assert(!media_token_open(key, "gk", tok, out, 10));             /* no room for the source */
	/* Each character changed (to another of the alphabet) fails. */
	for (size_t i = 0; tok[i]; i++) {
		char t[256];
		snprintf(t, sizeof(t), "%s", tok);
		t[i] = t[i] == 'A' ? 'B' : 'A';
		ck_assert_msg(!media_token_open(key, "gk", t, out, sizeof(out)), "changed at %zu: %s", i, t);
	}
	static const char *const junk[] = { "", "m1.", "m1..", "m1.a.b", "m2.bXhjOi8vYQ.AAAAAAAAAAAAAAAAAAAAAA",
					    "m1.bXhjOi8vYQ", "m1.bXhjOi8vYQ.AAAA.AAAA", "m1.bXhj+i8vYQ.AAAAAAAAAAAAAAAAAAAAAA",
					    "m1.AA.AAAAAAAAAAAAAAAAAAAAAA", "m1.A.AAAAAAAAAAAAAAAAAAAAAA" };
	for (size_t i = 0; i < CW_ARRAY_LEN(junk); i++)
		ck_assert_msg(!media_token_open(key, "gk", junk[i], out, sizeof(out)), "%s", junk[i]);
	char big[300];
	memset(big, 'a', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	ck_assert(!media_token_make(key, "gk", big, tok, sizeof(tok))); /* too long for one path segment */
	EVP_PKEY_free(k1);
	EVP_PKEY_free(k2);
}
END_TEST

START_TEST(public_key_from_bad_base64)
{
	ck_assert_ptr_null(httpsig_ed25519_public_from_base64(NULL));
	ck_assert_ptr_null(httpsig_ed25519_public_from_base64(""));
	ck_assert_ptr_null(httpsig_ed25519_public_from_base64("AAAA"));
	ck_assert_ptr_null(httpsig_ed25519_public_from_base64("JrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=AAAA"));
	ck_assert_ptr_null(httpsig_ed25519_public_from_base64("JrQLj5P_89iXES9-vFgrIy29clF9CC_oPPsw3c5D0bs="));
	ck_assert_ptr_null(httpsig_ed25519_public_from_base64("JrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0b=="));
	EVP_PKEY *k = httpsig_ed25519_public_from_base64("JrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=");
	ck_assert_ptr_nonnull(k);
	EVP_PKEY_free(k);
	unsigned char raw[32] = { 0 };
	k = httpsig_ed25519_public_from_raw(raw);
	if (k) /* OpenSSL accepts any 32 bytes as a point encoding here */
		EVP_PKEY_free(k);
	ck_assert_int_eq(ERR_peek_error(), 0);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("httpsig");
	TCase *tc = tcase_create("httpsig");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, rfc9421_b26_ed25519_vector);
	tcase_add_test(tc, every_nonce_of_the_peers_signatures_is_spent);
	tcase_add_test(tc, rfc9530_example_digest);
	tcase_add_test(tc, round_trip_our_profile);
	tcase_add_test(tc, prepared_keys_verify_as_unprepared);
	tcase_add_test(tc, several_signatures_of_the_tag_are_tried_in_order);
	tcase_add_test(tc, notify_url_normalised);
	tcase_add_test(tc, request_url_of_a_file_normalised);
	tcase_add_test(tc, derived_components_normalise);
	tcase_add_test(tc, signing_refuses_bad_input);
	tcase_add_test(tc, table_driven_cases);
	tcase_add_test(tc, random_garbage_never_verifies);
	tcase_add_test(tc, replay_first_ok_second_refused);
	tcase_add_test(tc, replay_expires_with_time);
	tcase_add_test(tc, replay_bounded_in_size);
	tcase_add_test(tc, replay_one_peer_evicts_only_its_own);
	tcase_add_test(tc, replay_table_stays_consistent);
	tcase_add_test(tc, replay_is_thread_safe);
	tcase_add_test(tc, key_file_created_once_with_mode_0600);
	tcase_add_test(tc, media_tokens_open_for_their_peer_only);
	tcase_add_test(tc, principal_nonces_verified_first);
	tcase_add_test(tc, public_key_from_bad_base64);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
