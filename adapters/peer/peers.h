/* Peers: the gatekeepers and other providers allowed to call the neutral
 * API.  An in-memory registry (an immutable snapshot, swapped whole when the
 * table changes) answers "which peer holds this bearer token" on every
 * request without a database round trip; the operator manages peers through
 * /admin/v1/peers. */
#ifndef CW_PEERS_H
#define CW_PEERS_H

#include "cw.h"
#include "peer/event.h"
#include "http.h"
#include "store.h"
#include "peer/httpsig.h"

#include <openssl/evp.h>

#define PEER_NAME_MAX 64
#define PEER_DOMAIN_MAX 256
#define PEER_URL_MAX 2048

/* What a request knows of the peer that called it (its principal). */
struct peer_principal {
	int64_t id;
	char name[PEER_NAME_MAX];
	char domain[PEER_DOMAIN_MAX];
	EVP_PKEY *key; /* a reference of its own */
	unsigned char token_hash[32]; /* the SHA-256 of the token it came with */
	uint64_t registry_gen; /* the registry's snapshot it was found in (peer_registry_current) */
	/* The request's verified signature: its nonce and created (set by
	 * peer_verify_request), for peer_nonce_claim. */
	char nonce[HTTPSIG_MAX_TOKEN + 1];
	int64_t created;
	/* The nonces of the peer's other signatures in the request (a peer
	 * rotating its key signs with both keys), claimed with nonce
	 * (httpsig_result.nonces). */
	char other_nonces[HTTPSIG_MAX_TRIES - 1][HTTPSIG_MAX_TOKEN + 1];
	int64_t other_created[HTTPSIG_MAX_TRIES - 1];
	size_t n_other_nonces;
};
void peer_principal_free(void *p);
/* The nonces of p's signatures, for the claims of a write (peer_nonce_claim,
 * peer_api.c's PEER_NONCES): i from 0 to p->n_other_nonces, the verified
 * one's first ("" when it has none), then the others'; *created: from when
 * the nonce is held. */
const char *peer_nonce_at(const struct peer_principal *p, size_t i, int64_t *created);
/* The created below which a peer's claimed nonces are forgotten (now_s
 * past the clock skew and a minute more): no signature that old is taken. */
int64_t peer_nonce_stale_before(int64_t now_s, int64_t skew_s);

/* Whether the peer row T (of the table peers) is still in force for a
 * request that came with the token whose SHA-256 is the hex text TH
 * (SQL): enabled, and not rotated since.  A peer's write asks it of the
 * table within its transaction, the row locked FOR KEY SHARE (not held up
 * by other changes of the row, waited for by a disable's FOR UPDATE and a
 * rotation's new token_hash, a key of the table), so that a peer disabled
 * or rotated writes nothing more through any daemon process, whenever
 * that process's registry reloads (peer_nonce_claim; peer_api.c's
 * PEER_KEYS for the pipelined submits).  Since the forty-seventh session:
 * before, another process took its writes until its pull thread reloaded
 * the registry (NOTIFY, or every 30 s). */
#define PEER_IN_FORCE_SQL(T, TH) T ".enabled AND " T ".token_hash = decode(" TH ", 'hex')"

/* Checks that p's peer is still in force (PEER_IN_FORCE_SQL: *in_force
 * false when not, and nothing claimed), then claims p's signature nonce,
 * and those of its other signatures, for every daemon process (the table
 * signature_nonces), inside the caller's write transaction: *fresh is
 * false when another request claimed one of them before (a replay).  One
 * statement.  Rows of the
 * peer older than now_s - skew_s - 60 are deleted on the way, those that
 * no other transaction holds (SKIP LOCKED: two processes' batches that
 * claim for two peers in opposite orders would otherwise wait on each
 * other, a deadlock; a row skipped goes with a later claim).  Used for
 * the state-changing requests that no idempotency key makes repeatable;
 * the in-memory replay cache stays the first check of every request. */
cw_err peer_nonce_claim(PGconn *c, const struct peer_principal *p, int64_t now_s, int64_t skew_s, bool *fresh,
			bool *in_force, cw_errmsg *e);
/* The nonces of p's signatures, the verified one's first, as the claims
 * take them (peer_nonce_claim, peer_api.c's PEER_NONCES): a JSON array
 * [{"nonce", "created"}], or NULL (out of memory); free() it. */
char *peer_nonces_json(const struct peer_principal *p);
/* The detail of the 401 bad_signature a replayed nonce gets, one text
 * wherever it is found: the in-memory cache (peer_verify_request), a
 * write's claim (gateway/app.c, job_write), a pull's (peer_pull.c). */
#define PEER_NONCE_REPLAYED "this signature's nonce was seen before (a replay)"

struct peer_registry;

struct peer_registry *peer_registry_new(void);
void peer_registry_free(struct peer_registry *r);
/* Replaces the snapshot with the peers table as c sees it. */
cw_err peer_registry_load(struct peer_registry *r, PGconn *c, cw_errmsg *e);
/* The enabled peer whose token hashes to token's SHA-256, as a new
 * principal the caller frees; NULL when none (compared in constant time
 * against every peer). */
struct peer_principal *peer_registry_by_token(struct peer_registry *r, const char *token);
/* Whether p's peer is still enabled and still holds the token p came with
 * (not disabled, not rotated since). */
bool peer_registry_still_valid(struct peer_registry *r, const struct peer_principal *p);
/* Whether p (from peer_registry_by_token) came from the snapshot in force:
 * then a lookup of its token now would find the same peer, key and all
 * (every change, an admin's or a reload, puts a new snapshot in force). */
bool peer_registry_current(struct peer_registry *r, const struct peer_principal *p);
size_t peer_registry_count(struct peer_registry *r);

/* The admin routes' handlers; ctx is the daemon's struct cw_app. */
void peer_admin_create(struct cw_req *req, void *ctx);
void peer_admin_list(struct cw_req *req, void *ctx);
void peer_admin_get(struct cw_req *req, void *ctx);
void peer_admin_disable(struct cw_req *req, void *ctx);
void peer_admin_enable(struct cw_req *req, void *ctx);
void peer_admin_rotate(struct cw_req *req, void *ctx);
/* PATCH /admin/v1/peers/{name}: {event_types, push_url}. */
void peer_admin_update(struct cw_req *req, void *ctx);
/* Whether a peer whose event_types column reads types ("{message,edit}";
 * NULL: every type) takes events of type. */
bool peer_event_type_wanted(const char *types, const char *type);

/* Validators, shared with the tests (peer_name_valid: peer/event.h). */
bool peer_domain_valid(const char *s);
bool peer_url_valid(const char *s);
/* The same, with what is wrong with s in e (the rule the admin API holds
 * push_url to: the dispatcher holds a push_url stored before it so too). */
cw_err peer_url_check(const char *s, cw_errmsg *e);
/* The same, and the notify URL pushes to s go to (peer_out_notify_url)
 * into notify (len: PEER_NOTIFY_URL_MAX): the dispatcher's one parse of a
 * push_url for a delivery. */
#define PEER_NOTIFY_URL_MAX (PEER_URL_MAX + 160)
cw_err peer_url_notify(const char *s, char *notify, size_t len, cw_errmsg *e);
/* Whether an Ed25519 public key's encoding is of a small-order point or
 * not canonical (y not below p): no peer may register it. */
bool peer_key_weak(const unsigned char key[32]);

#endif
