/* Token buckets in a fixed, set-associative table (see ratelimit.h).
 *
 * A bucket's fill is kept in integer units: one token is period_ms units
 * and the bucket gains capacity units per millisecond, so refill is
 * continuous and exact (the wait for the next token is a ceiling division,
 * correct to the millisecond). */
#include "config.h"
#include "ratelimit.h"
#include "fnv.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define WINDOW 8           /* slots a key may live in */
#define STRIPES 64
#define MIN_SLOTS 512      /* STRIPES * WINDOW: every lock guards a window */
#define MAX_SLOTS ((size_t)1 << 30)
#define MAX_CAPACITY ((uint32_t)1 << 31)
#define MAX_PERIOD ((int64_t)1 << 31)

struct bucket {
	uint64_t h1, h2;   /* h1 0: empty */
	int64_t units;     /* tokens * period */
	int64_t last_ms;   /* of the last refill */
	int64_t period;
	uint64_t used;     /* the stripe's clock at the last use (LRU) */
	uint32_t capacity;
	uint32_t refusing; /* refused since the last grant */
};

struct stripe {
	pthread_mutex_t mu;
	uint64_t clock;
	uint64_t evictions;
	char pad[64];      /* keeps neighbouring stripes off each other's cache line */
};

struct ratelimit {
	struct bucket *b;
	size_t mask;
	uint64_t seed_a, seed_b; /* the table's own: see ratelimit_new */
	struct stripe stripes[STRIPES];
};

/* Two hashes of different families: a word-at-a-time multiply-xorshift
 * with a MurmurHash3 finaliser, and FNV-1a. */
static uint64_t hash_a(uint64_t seed, const char *p, size_t n)
{
	uint64_t h = seed ^ n;
	while (n >= 8) {
		uint64_t w;
		memcpy(&w, p, 8);
		h = (h ^ w) * 0x9e3779b97f4a7c15ull;
		h ^= h >> 29;
		p += 8;
		n -= 8;
	}
	uint64_t w = 0;
	for (size_t i = 0; i < n; i++)
		w |= (uint64_t)(unsigned char)p[i] << (8 * i);
	h = (h ^ w) * 0x9e3779b97f4a7c15ull;
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdull;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ull;
	h ^= h >> 33;
	return h;
}

static uint64_t hash_b(uint64_t seed, const char *p, size_t n)
{
	return fnv1a(seed, p, n);
}

struct ratelimit *ratelimit_new(size_t slots)
{
	size_t n = MIN_SLOTS;
	while (n < slots && n < MAX_SLOTS)
		n *= 2;
	struct ratelimit *rl = calloc(1, sizeof(*rl));
	if (!rl)
		return NULL;
	rl->b = calloc(n, sizeof(*rl->b));
	if (!rl->b) {
		free(rl);
		return NULL;
	}
	rl->mask = n - 1;
	/* Starts of the two hashes no peer can know.  With the constants
	 * they had until the forty-fifth session, a peer could choose sender
	 * names whose buckets share the window of its domain's shared bucket
	 * (eight of them evict it: it starts full again, a way round the
	 * domain's limit), or whose two hashes both equal another key's (the
	 * multiply-xorshift is undone a word at a time): its senders spending
	 * another's tokens.  The values are never stored or sent. */
	uint64_t seed[2];
	if (getrandom(seed, sizeof(seed), 0) != (ssize_t)sizeof(seed)) {
		struct timespec ts; /* no getrandom (a kernel before 3.17): still per process */
		clock_gettime(CLOCK_MONOTONIC, &ts);
		seed[0] = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)rl;
		seed[1] = (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)rl->b;
	}
	rl->seed_a = seed[0];
	rl->seed_b = seed[1] | 1; /* FNV-1a's start: any but 0 */
	for (int i = 0; i < STRIPES; i++)
		pthread_mutex_init(&rl->stripes[i].mu, NULL);
	return rl;
}

void ratelimit_free(struct ratelimit *rl)
{
	if (!rl)
		return;
	for (int i = 0; i < STRIPES; i++)
		pthread_mutex_destroy(&rl->stripes[i].mu);
	free(rl->b);
	free(rl);
}

/* The bucket for (h1, h2) in the window at w, found, or made in an empty
 * or the least recently used slot. */
static struct bucket *find(struct ratelimit *rl, struct stripe *st, size_t w, uint64_t h1, uint64_t h2,
			   uint32_t capacity, int64_t period, int64_t now_ms)
{
	struct bucket *victim = NULL;
	for (size_t i = 0; i < WINDOW; i++) {
		struct bucket *b = &rl->b[w + i];
		if (b->h1 == h1 && b->h2 == h2)
			return b;
		if (!victim || (victim->h1 && (!b->h1 || b->used < victim->used)))
			victim = b;
	}
	if (victim->h1)
		st->evictions++;
	victim->h1 = h1;
	victim->h2 = h2;
	victim->capacity = capacity;
	victim->period = period;
	victim->units = (int64_t)capacity * period;
	victim->last_ms = now_ms;
	victim->refusing = 0;
	return victim;
}

/* Where a key's bucket lives: its hashes, its window, the window's stripe. */
struct where {
	uint64_t h1, h2;
	size_t w;
	struct stripe *st;
};

/* The first hash of key (never 0, which marks a free slot) and the first
 * slot of the window it picks: lock_window's, and ratelimit_window's. */
static uint64_t first_hash(const struct ratelimit *rl, const char *key, size_t len)
{
	uint64_t h = hash_a(rl->seed_a, key, len);
	return h ? h : 1;
}

static size_t window_of(const struct ratelimit *rl, uint64_t h1)
{
	return (size_t)h1 & rl->mask & ~(size_t)(WINDOW - 1);
}

/* Finds where the bucket id (ratelimit_id) lives and takes its stripe's
 * lock; the arguments are brought within the table's bounds, and
 * *first_refusal (may be NULL) set false. */
static void lock_window(struct ratelimit *rl, struct ratelimit_id id, uint32_t *capacity, int64_t *period_ms,
			bool *first_refusal, struct where *at)
{
	if (first_refusal)
		*first_refusal = false;
	if (*period_ms < 1)
		*period_ms = 1;
	if (*period_ms > MAX_PERIOD)
		*period_ms = MAX_PERIOD;
	if (*capacity > MAX_CAPACITY)
		*capacity = MAX_CAPACITY;
	at->h1 = id.h1;
	at->h2 = id.h2;
	at->w = window_of(rl, at->h1);
	at->st = &rl->stripes[(at->w / WINDOW) % STRIPES];
	pthread_mutex_lock(&at->st->mu);
}

struct ratelimit_id ratelimit_id(const struct ratelimit *rl, const char *key)
{
	if (!key)
		key = "";
	size_t len = strlen(key);
	return (struct ratelimit_id){ first_hash(rl, key, len), hash_b(rl->seed_b, key, len) };
}

size_t ratelimit_window(const struct ratelimit *rl, const char *key)
{
	return window_of(rl, first_hash(rl, key, strlen(key)));
}

/* The bucket's fill (units) at now_ms under (capacity, period_ms), from
 * what it holds; b is not changed.  A change of the rule keeps the fill in
 * proportion; a clock going back refills nothing. */
static int64_t fill(const struct bucket *b, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	int64_t max = (int64_t)capacity * period_ms, units = b->units;
	if (b->capacity != capacity || b->period != period_ms) {
		int64_t old = (int64_t)b->capacity * b->period;
		units = old > 0 ? (int64_t)((double)units / (double)old * (double)max) : max;
	}
	if (now_ms > b->last_ms) {
		int64_t elapsed = now_ms - b->last_ms;
		if (elapsed >= period_ms || capacity == 0)
			units = max;
		else
			units += elapsed * (int64_t)capacity;
		if (units > max)
			units = max;
	}
	return units;
}

/* The milliseconds until a bucket of that fill holds a token; 0 if it
 * does. */
static int64_t wait_for(int64_t units, uint32_t capacity, int64_t period_ms)
{
	if (capacity > 0 && units >= period_ms)
		return 0;
	int64_t wait = capacity ? (period_ms - units + capacity - 1) / capacity : period_ms;
	return wait < 1 ? 1 : wait;
}

/* A clock gone back by more than this is a step (NTP, an operator), not
 * two threads' readings taken out of order (a request's clock read
 * before a statement, another's after). */
#define CLOCK_STEP_MS 5000

/* Whether now_ms is a clock stepped back from the bucket's time. */
static bool stepped_back(const struct bucket *b, int64_t now_ms) { return now_ms < b->last_ms - CLOCK_STEP_MS; }

/* The bucket's fill brought to now_ms, under (capacity, period_ms) from
 * now on.  A clock gone back refills nothing (fill); gone back by a step
 * (more than CLOCK_STEP_MS), its time is the bucket's from then on, and
 * the refill runs again from it, as the wait answered says.  Until the
 * forty-eighth session last_ms stayed at the later time whatever the
 * step, and a wall clock set back an hour kept every bucket that was not
 * full where it was for the hour: a sender at its limit refused for an
 * hour while "retry after" named a second.  Readings out of order (less
 * than a step) keep the later time: each rebase to an earlier one would
 * give the bucket the gap's refill again. */
static void refresh(struct bucket *b, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	b->units = fill(b, capacity, period_ms, now_ms);
	b->capacity = capacity;
	b->period = period_ms;
	if (now_ms > b->last_ms || stepped_back(b, now_ms))
		b->last_ms = now_ms;
}

/* The bucket kept for the key of at, or NULL (never used, or evicted:
 * it would start full); none is made. */
static struct bucket *kept(struct ratelimit *rl, const struct where *at)
{
	for (size_t i = 0; i < WINDOW; i++)
		if (rl->b[at->w + i].h1 == at->h1 && rl->b[at->w + i].h2 == at->h2)
			return &rl->b[at->w + i];
	return NULL;
}

int64_t ratelimit_take(struct ratelimit *rl, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms,
		       bool *first_refusal)
{
	return ratelimit_take_id(rl, ratelimit_id(rl, key), capacity, period_ms, now_ms, first_refusal);
}

int64_t ratelimit_take_id(struct ratelimit *rl, struct ratelimit_id id, uint32_t capacity, int64_t period_ms,
			  int64_t now_ms, bool *first_refusal)
{
	struct where at;
	lock_window(rl, id, &capacity, &period_ms, first_refusal, &at);
	struct bucket *b = find(rl, at.st, at.w, at.h1, at.h2, capacity, period_ms, now_ms);
	b->used = ++at.st->clock;
	refresh(b, capacity, period_ms, now_ms);
	int64_t wait = wait_for(b->units, capacity, period_ms);
	if (!wait) {
		b->units -= period_ms;
		b->refusing = 0;
	} else {
		if (first_refusal)
			*first_refusal = !b->refusing;
		b->refusing = 1;
	}
	pthread_mutex_unlock(&at.st->mu);
	return wait;
}

int64_t ratelimit_peek(struct ratelimit *rl, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms,
		       bool *first_refusal)
{
	return ratelimit_peek_id(rl, ratelimit_id(rl, key), capacity, period_ms, now_ms, first_refusal);
}

int64_t ratelimit_peek_id(struct ratelimit *rl, struct ratelimit_id id, uint32_t capacity, int64_t period_ms,
			  int64_t now_ms, bool *first_refusal)
{
	struct where at;
	lock_window(rl, id, &capacity, &period_ms, first_refusal, &at);
	struct bucket *b = kept(rl, &at);
	if (b && stepped_back(b, now_ms))
		b->last_ms = now_ms; /* a step back (refresh): the fill is as it was */
	/* A bucket not kept would start full. */
	int64_t wait = wait_for(b ? fill(b, capacity, period_ms, now_ms) : (int64_t)capacity * period_ms, capacity,
				period_ms);
	if (wait && b && first_refusal) {
		*first_refusal = !b->refusing;
		b->refusing = 1;
	}
	pthread_mutex_unlock(&at.st->mu);
	return wait;
}

void ratelimit_give(struct ratelimit *rl, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	struct where at;
	lock_window(rl, ratelimit_id(rl, key), &capacity, &period_ms, NULL, &at);
	struct bucket *b = kept(rl, &at);
	if (b) {
		refresh(b, capacity, period_ms, now_ms);
		b->units += period_ms;
		if (b->units > (int64_t)capacity * period_ms)
			b->units = (int64_t)capacity * period_ms;
	}
	pthread_mutex_unlock(&at.st->mu);
}

int64_t ratelimit_policy_take(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	return ratelimit_take(ctx, key, capacity, period_ms, now_ms, NULL);
}

int64_t ratelimit_policy_peek(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	return ratelimit_peek(ctx, key, capacity, period_ms, now_ms, NULL);
}

void ratelimit_stats(struct ratelimit *rl, size_t *used, uint64_t *evictions)
{
	size_t u = 0;
	uint64_t ev = 0;
	for (int s = 0; s < STRIPES; s++) {
		struct stripe *st = &rl->stripes[s];
		pthread_mutex_lock(&st->mu);
		for (size_t w = (size_t)s * WINDOW; w <= rl->mask; w += (size_t)STRIPES * WINDOW)
			for (size_t i = 0; i < WINDOW; i++)
				u += rl->b[w + i].h1 != 0;
		ev += st->evictions;
		pthread_mutex_unlock(&st->mu);
	}
	if (used)
		*used = u;
	if (evictions)
		*evictions = ev;
}
