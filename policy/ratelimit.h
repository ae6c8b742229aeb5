/* Token buckets for the policy engine's rate limits: a fixed-size table
 * shared by every thread of the gateway (struct policy_rate's take and
 * peek).
 *
 * The table is allocated once (no allocation per call).  A key is hashed
 * into a set of 8 slots (the probe window); the bucket is found there by
 * two independent 64-bit hashes of the key (the key itself is not kept: a
 * copy would cost up to POLICY_RATE_KEY_MAX bytes a slot), each started
 * from a value drawn when the table is made, so that no peer can choose
 * keys that share a window or a bucket.  Two different keys share a
 * bucket only if both hashes collide, about 2^-64 per pair even for the
 * whole table, which is accepted: the worst case is that one sender
 * spends another's tokens.  When the window is full, the bucket used
 * least recently is evicted: it is forgotten, and starts full the next time
 * (so a table too small for the traffic errs on the side of delivering).
 * Locking: 64 mutexes, each guarding every 64th window. */
#ifndef CW_RATELIMIT_H
#define CW_RATELIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ratelimit;

/* A table of at least slots buckets (rounded up to a power of two, at least
 * 512, at most 2^30); NULL when out of memory. */
struct ratelimit *ratelimit_new(size_t slots);
void ratelimit_free(struct ratelimit *rl);

/* Takes a token from the bucket named key, which holds at most capacity
 * tokens and refills continuously capacity tokens per period_ms; a new
 * bucket starts full.  Returns 0 when a token was taken, else the
 * milliseconds until one will be available (at least 1; with capacity 0,
 * period_ms).  *first_refusal (may be NULL) is set to whether this refusal
 * is the first since the bucket last granted a token (false when granted).
 * A change of capacity or period keeps the bucket's fill level in
 * proportion.  now_ms is the wall clock: one gone back refills nothing,
 * and one gone back more than 5 s (a step, not two threads' readings out
 * of order) is the bucket's time from then on (peek too). */
int64_t ratelimit_take(struct ratelimit *rl, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms,
		       bool *first_refusal);

/* What ratelimit_take would answer now, without taking: 0 when a token is
 * there, else the milliseconds until one will be.  The bucket's tokens,
 * its rule and its place in the table are never changed, and a bucket not
 * kept is not made (it would start full).  first_refusal (may be NULL) is
 * as for ratelimit_take: when it is given, a refusal is one of the
 * bucket's episode (the next take's refusal is no first), which is all a
 * peek may change; NULL changes nothing.  Since the twenty-eighth session
 * (a local user's outbound limits, asked of a message refused anyway). */
int64_t ratelimit_peek(struct ratelimit *rl, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms,
		       bool *first_refusal);

/* Gives back a token a take granted and what it paid for was not done:
 * one token more in the bucket named key, never more than capacity; a
 * bucket not kept (evicted: it would start full) is not made.  The
 * bucket's episode is left as it is.  Since the forty-second session (a
 * first contact's consent request that the local user's own bound then
 * refused, adapters/peer/peer_api.c). */
void ratelimit_give(struct ratelimit *rl, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms);

/* What tells key's bucket apart in the table: its two hashes, from the
 * starts drawn in ratelimit_new (no peer can choose keys that share them).
 * Whoever keeps answers per bucket (the gateway's per-event memo,
 * gateway/policy_live.c) keys them on it: two keys it tells apart are two
 * buckets here too, and two it does not are one.  Since the forty-eighth
 * session: until then the memo keyed on an unseeded FNV-1a of the key, and
 * a peer could search out a sender whose per-user bucket's hash equalled
 * its domain's bucket's, so that the memo answered the user's limit with
 * the domain's and the user's bucket was never charged. */
struct ratelimit_id {
	uint64_t h1, h2;
};
struct ratelimit_id ratelimit_id(const struct ratelimit *rl, const char *key); /* key NULL: "" */

static inline bool ratelimit_id_eq(struct ratelimit_id a, struct ratelimit_id b)
{
	return a.h1 == b.h1 && a.h2 == b.h2;
}

/* ratelimit_take and ratelimit_peek of the bucket id (ratelimit_id of its
 * key): for a caller that has it already, so that the key is hashed once. */
int64_t ratelimit_take_id(struct ratelimit *rl, struct ratelimit_id id, uint32_t capacity, int64_t period_ms,
			  int64_t now_ms, bool *first_refusal);
int64_t ratelimit_peek_id(struct ratelimit *rl, struct ratelimit_id id, uint32_t capacity, int64_t period_ms,
			  int64_t now_ms, bool *first_refusal);

/* struct policy_rate's take and peek, with ctx a struct ratelimit *. */
int64_t ratelimit_policy_take(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms);
int64_t ratelimit_policy_peek(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms);

/* The first slot of the window key's bucket lives in (for tests: where a
 * key lands is the table's own, from starts drawn in ratelimit_new). */
size_t ratelimit_window(const struct ratelimit *rl, const char *key);

/* Buckets in use, and evictions so far (for metrics; takes every lock). */
void ratelimit_stats(struct ratelimit *rl, size_t *used, uint64_t *evictions);

#endif
