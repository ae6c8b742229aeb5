/* HTTP Message Signatures (RFC 9421) with Ed25519, Content-Digest (RFC 9530)
 * and a bounded replay cache: the authentication of every peer request.
 *
 * Pure code: no globals, no logging, no I/O except the key-file helpers at the
 * end.  Everything but the replay cache is stateless and thread-safe; the
 * replay cache has its own mutex.  Hostile input never crashes: every field
 * and every part of it has a bound (below), and every refusal says why in
 * e->msg and returns CW_EINVAL.
 *
 * Only the subset of RFC 8941 (Structured Field Values) that these three
 * fields need is implemented, stricter than RFC 8941 in two places: a label
 * or a parameter given twice is refused instead of "the last one wins", and
 * decimals and component parameters (;sf ;key ;bs ;req ;name) are refused. */
#ifndef CW_HTTPSIG_H
#define CW_HTTPSIG_H

#include "cw.h"

#include <openssl/evp.h>

#define HTTPSIG_MAX_FIELD 8192      /* a Signature-Input, Signature, Content-Digest or covered header value */
#define HTTPSIG_MAX_COMPONENTS 32   /* covered components in one signature */
#define HTTPSIG_MAX_TOKEN 256       /* a label, component name, parameter key or string value */
#define HTTPSIG_MAX_PARAMS 16       /* parameters of one signature */
#define HTTPSIG_MAX_MEMBERS 16      /* signatures (labels) in one field */
#define HTTPSIG_MAX_TRIES 4         /* signatures of the tag asked for verified, at most */
#define HTTPSIG_MAX_BASE 65536      /* a whole signature base */
#define HTTPSIG_ED25519_SIG_LEN 64

/* "sha-256=:" + 44 base64 characters + ":" and a NUL. */
#define HTTPSIG_DIGEST_HEADER_LEN 55

/* --- Content-Digest (RFC 9530) ------------------------------------------ */

/* Writes "sha-256=:BASE64:" for body into out (outlen >= HTTPSIG_DIGEST_HEADER_LEN). */
cw_err httpsig_content_digest(const void *body, size_t len, char *out, size_t outlen);

/* Checks a received Content-Digest value against body: a dictionary with at
 * least one sha-256 or sha-512 member; every such member must match (compared
 * in constant time); other algorithms are ignored, as RFC 9530 says. */
cw_err httpsig_check_content_digest(const char *header_value, const void *body, size_t len,
				    cw_errmsg *e);

/* --- the message --------------------------------------------------------- */

/* A read-only view of a request.  target_uri is absolute
 * ("https://host:port/path?query", no fragment, no userinfo) and must be the
 * URI the signer used: behind a reverse proxy, build it from the public base
 * URL, not from the socket.  header() returns the value of one field by its
 * lower-case name, or NULL when absent; several lines of one field must be
 * combined by the caller with ", " (RFC 9421 §2.1).  The value is trimmed
 * here; CR, LF, NUL, other controls and non-ASCII bytes are refused. */
struct httpsig_msg {
	const char *method;
	const char *target_uri;
	const char *(*header)(void *ctx, const char *lowercase_name);
	void *ctx;
};

/* Derived components: @method @target-uri @authority @scheme @path @query
 * @request-target.  Anything else not starting with '@' is a header name. */

/* --- the URI a request of ours goes to ------------------------------------- */

/* url as Causeway requests it and, but for a zone id (httpsig_target_uri),
 * signs it as @target-uri: in the normal form a peer rebuilds from the
 * request it receives (its own URL, the path and query sent).  libcurl's
 * URL parser reads it (dot segments resolved, as libcurl sends the path),
 * the scheme and host are lower-cased, the scheme's default port is left
 * out and so is a fragment (libcurl sends none); when append is not NULL,
 * the path without its trailing slashes and append after it (before a
 * query, kept).  The same text is then requested, so what is signed is
 * what is sent.  An IPv6 literal's zone id is kept (the request goes out
 * through that interface).  CW_EINVAL, e's message starting with what
 * ("push_url"), for a URL libcurl does not take as http or https with a
 * host, one with a user or password, or one longer than len.  One
 * function for every signed request of ours (a push's notify URL, a
 * peer's file and each of its redirects): since the fifty-second session
 * a file's URL too, signed as the peer spelled it before. */
cw_err httpsig_request_url(const char *url, const char *append, const char *what, char *out, size_t len,
			   cw_errmsg *e);
/* The @target-uri signed for a request to request_url (one of
 * httpsig_request_url's): the same without an IPv6 literal's zone id,
 * which libcurl leaves out of the Host header it sends ("[fe80::1]"), and
 * which names an interface of this host, not the peer's.  Into out (len
 * bytes, at least strlen(request_url) + 1 for the whole). */
void httpsig_target_uri(const char *request_url, char *out, size_t len);

/* --- signing --------------------------------------------------------------- */

/* Signature parameters.  Every member is optional: NULL / 0 leaves it out.
 * They are serialised in the order created, expires, nonce, alg, keyid, tag. */
struct httpsig_params {
	const char *label;   /* dictionary key; NULL means "sig1" */
	int64_t created;     /* seconds since the epoch; 0 omits it */
	int64_t expires;     /* 0 omits it */
	const char *nonce;
	const char *alg;     /* "ed25519" if given */
	const char *keyid;
	const char *tag;
};

/* The signature base (RFC 9421 §2.5) for the NULL-terminated list of covered
 * components and the parameters, NUL-terminated into out.  Exposed for tests
 * and for debugging a peer that disagrees with us. */
cw_err httpsig_signature_base(const struct httpsig_msg *m, const char *const *components,
			      const struct httpsig_params *p, char *out, size_t outlen,
			      cw_errmsg *e);

/* Signs m with the Ed25519 private key and writes the values of the
 * Signature-Input and Signature fields, e.g.
 *   sig1=("@method" "@target-uri");created=1618884473;keyid="k"
 *   sig1=:BASE64:
 * The key is borrowed.  Buffers of HTTPSIG_MAX_FIELD bytes are always enough
 * for what the verifier accepts. */
cw_err httpsig_sign(const struct httpsig_msg *m, const char *const *components, EVP_PKEY *key,
		    const struct httpsig_params *p, char *sig_input, size_t sig_input_len,
		    char *signature, size_t signature_len, cw_errmsg *e);

/* --- verifying ------------------------------------------------------------- */

struct httpsig_verify_opts {
	const char *label;                      /* NULL: the signatures of Signature-Input whose tag is
						 * tag (tag set; the first HTTPSIG_MAX_TRIES, in order),
						 * else the first */
	const char *const *required;            /* NULL-terminated: must be covered */
	const char *const *required_if_present; /* NULL-terminated: must be covered when the request has the header */
	bool require_created, require_keyid, require_nonce, require_tag;
	const char *tag;                        /* when set, the tag parameter must be present and equal */
	int64_t now;                            /* seconds since the epoch */
	int64_t max_skew_s;                     /* a created given must lie in [now - skew, now + skew]
						 * (0: exactly now); absent, only require_created refuses it */
	/* The verification key for a keyid (keyid is NULL when the signature has
	 * none), or NULL when unknown.  The verifier borrows the result and never
	 * frees it: it must stay valid until key_release is called with it (when
	 * key_release is set) or until httpsig_verify returns.  A key store that
	 * may rotate keys concurrently takes a reference in key_for
	 * (EVP_PKEY_up_ref) and drops it in key_release (EVP_PKEY_free). */
	EVP_PKEY *(*key_for)(void *ctx, const char *keyid);
	void (*key_release)(void *ctx, EVP_PKEY *key);
	void *key_ctx;
	/* When set, content-digest must be covered and match body (RFC 9530). */
	bool check_content_digest;
	const void *body;
	size_t body_len;
};

struct httpsig_result {
	char label[HTTPSIG_MAX_TOKEN + 1];
	char keyid[HTTPSIG_MAX_TOKEN + 1];  /* filled as soon as parsed, even on failure (for the log) */
	char nonce[HTTPSIG_MAX_TOKEN + 1];
	char tag[HTTPSIG_MAX_TOKEN + 1];
	char alg[HTTPSIG_MAX_TOKEN + 1];
	bool has_created, has_expires;
	int64_t created, expires;
	size_t ncomponents;
	/* After CW_OK: the distinct nonces of the signatures picked (those of
	 * the tag, o->label's, or the first) whose keyid is the one verified,
	 * nonce (the verified one's) first.  A replay check spends them all: a
	 * peer rotating its key signs with the old and the new, and a request
	 * captured while the old one verified, replayed after the rotation
	 * with the new one's signature alone, must not come with a nonce
	 * never seen (until the forty-seventh session only the verified one's
	 * was spent, and it did).  nonces_created[i]: the later of created
	 * and that signature's own created (at most o->now + o->max_skew_s),
	 * from when its nonce is to be held. */
	size_t nnonces;
	char nonces[HTTPSIG_MAX_TRIES][HTTPSIG_MAX_TOKEN + 1];
	int64_t nonces_created[HTTPSIG_MAX_TRIES];
};

/* Parses the two field values (NULL counts as empty), picks the signature by
 * o->label, else those whose tag is o->tag (at most HTTPSIG_MAX_TRIES, in
 * order), else the first one; for each in turn until one holds, checks its
 * parameters, the time window, the covered components, looks the key up,
 * rebuilds the signature base and verifies it (Ed25519, no prehash); then
 * the body digest, once, if asked.  CW_OK only when everything holds (out:
 * the signature that verified); otherwise CW_EINVAL with the reason the
 * first one tried was refused (out: what it said), CW_ENOMEM / CW_EIO for
 * resource or library failures.  The replay check is separate: feed
 * out->keyid / each of out->nonces / out->created to
 * httpsig_replay_check_and_add() after CW_OK.  out may be NULL. */
cw_err httpsig_verify(const struct httpsig_msg *m, const char *signature_input, const char *signature,
		      const struct httpsig_verify_opts *o, struct httpsig_result *out, cw_errmsg *e);

/* --- replay cache ------------------------------------------------------------ */

/* Remembers (keyid, nonce) pairs.
 *
 * Bounded in time: an entry is held until max(created, now at insertion) +
 * window_s, and a pair whose created is older than now - window_s is refused
 * (CW_EINVAL) without looking.  So expiry can never reopen a replay: a pair
 * is only accepted while created >= now - window_s, and all that time its
 * entry is held.  The verifier's skew check already refuses a signature
 * created more than skew ago, so with window_s >= 2 * skew (the setting to
 * use; also safe if expiry were counted from insertion time, where a
 * signature created up to skew in the future stays acceptable for 2 * skew)
 * that refusal never fires in practice.
 *
 * Bounded in size: when max_entries are held, the oldest entry of the keyid
 * holding the most goes (of several holding as many, the adding keyid's),
 * so that one peer's volume pushes out another's nonces only down to an
 * equal share of the cache, not below (since the thirty-first session;
 * before, the oldest of all went, and one peer could push out all of
 * another's).
 * Evicting an entry still inside its window lets that one nonce be replayed
 * (until its created leaves the skew), so size the cache for the peak rate
 * of signed requests times the window, and alert on
 * httpsig_replay_live_evictions() > 0.
 *
 * Thread-safe (one mutex; amortised O(1) per call, plus a scan of the
 * keyids holding entries: the peers).  Keys are a salted SHA-256 of
 * keyid and nonce, so hostile nonces cannot aim at one hash bucket. */
struct httpsig_replay;

/* NULL when max_entries is 0 or above 2^24, window_s is not in 1..10^9, or
 * out of memory. */
struct httpsig_replay *httpsig_replay_new(size_t max_entries, int64_t window_s);
/* CW_OK the first time, CW_ECONFLICT when the pair is held, CW_EINVAL for a
 * NULL, empty or over-long (> HTTPSIG_MAX_TOKEN) keyid or nonce or a created
 * older than the window, CW_EIO if hashing failed. */
cw_err httpsig_replay_check_and_add(struct httpsig_replay *r, const char *keyid, const char *nonce,
				    int64_t created, int64_t now);
size_t httpsig_replay_count(struct httpsig_replay *r);
/* Entries pushed out by the size bound while still inside their window. */
uint64_t httpsig_replay_live_evictions(struct httpsig_replay *r);
void httpsig_replay_free(struct httpsig_replay *r);

/* --- keys ------------------------------------------------------------------ */

/* Ed25519 public keys from 32 raw bytes or their base64 (standard alphabet,
 * padding optional).  NULL on bad input.  Caller frees with EVP_PKEY_free(). */
EVP_PKEY *httpsig_ed25519_public_from_raw(const unsigned char raw[32]);
EVP_PKEY *httpsig_ed25519_public_from_base64(const char *b64);
/* Sets up, once, the verification of signatures with the public key k
 * (httpsig_verify copies it for each signature instead of setting one up);
 * for a key kept to verify many, such as a peer's.  Without it, or when it
 * fails, each verification sets itself up as before. */
void httpsig_key_prepare(EVP_PKEY *k);
/* The base64 (44 characters, padded) of the public half of an Ed25519 key,
 * public or private; len >= 45. */
cw_err httpsig_ed25519_public_base64(EVP_PKEY *k, char *out, size_t len);

/* Loads an Ed25519 private key from a PEM file (PKCS#8, unencrypted: an
 * encrypted key fails, nothing prompts).  The file must be a regular file
 * (a symlink to one is fine), not writable by group or others and not
 * readable by others.  CW_ENOTFOUND when it does not exist.  On success *out
 * is the caller's (EVP_PKEY_free); on failure *out is NULL. */
cw_err httpsig_key_load(const char *path, EVP_PKEY **out, cw_errmsg *e);
/* Loads the key, or when path does not exist generates a new Ed25519 key
 * pair and writes it there: a temporary file created O_CREAT|O_EXCL with
 * mode 0600 in the same directory, fsync'ed, then link()ed to path, so that
 * a crash never leaves half a key and two processes racing end up with the
 * same key.  Ownership as httpsig_key_load. */
cw_err httpsig_key_load_or_create(const char *path, EVP_PKEY **out, cw_errmsg *e);

#endif
