/* The policy engine: a builder that compiles rules and consent facts into
 * an immutable snapshot of open-addressing hash tables, and policy_decide(),
 * which only looks things up in it (no I/O, no locks, no allocation).
 *
 * Tables: power-of-two capacity, load at most 0.5 (so every probe sequence
 * reaches an empty slot), linear probing, a 64-bit hash stored in the slot
 * (0 means empty).  Keys live in one arena; a key of several parts (the
 * local user's URI and a subject, say) is stored as the parts joined by the
 * byte 0x1f, which no part may contain.  decide() never joins them: it
 * hashes the parts one after the other with the separator in between and
 * compares part by part. */
#include "config.h"
#include "policy.h"

#include <stdlib.h>
#include <string.h>

#define SEP '\x1f'
#define MAX_USER_URI 2048
#define MAX_DOMAIN 253
#define NLIMITS 11 /* the POLICY_LIM_* bits */
#define LIM_ALL 0x7ffu

/* ------------------------------------------------------------------ hash */

/* A streaming word-at-a-time hash (8 bytes per multiply), finished with
 * the MurmurHash3 64-bit finaliser so that the low bits (the table index)
 * depend on every input bit.  Parts are fed one after the other with the
 * separator byte between them. */
#define HASH_SEED 0x243f6a8885a308d3ull
#define HASH_MUL 0x9e3779b97f4a7c15ull

static inline uint64_t hash_word(uint64_t h, uint64_t w)
{
	h = (h ^ w) * HASH_MUL;
	return h ^ (h >> 29);
}

static inline uint64_t hash_bytes(uint64_t h, const char *p, size_t n)
{
	while (n >= 8) {
		uint64_t w;
		memcpy(&w, p, 8);
		h = hash_word(h, w);
		p += 8;
		n -= 8;
	}
	uint64_t w = 0;
	for (size_t i = 0; i < n; i++)
		w |= (uint64_t)(unsigned char)p[i] << (8 * i);
	/* The tail's length is mixed in too: "a" and "a\0" differ. */
	return hash_word(h, w ^ ((uint64_t)n << 59));
}

static inline uint64_t hash_sep(uint64_t h)
{
	return hash_word(h, (uint64_t)(unsigned char)SEP | (1ull << 62));
}

static inline uint64_t hash_final(uint64_t h)
{
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdull;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ull;
	h ^= h >> 33;
	return h ? h : 1; /* 0 marks an empty slot */
}

struct part {
	const char *s;
	size_t n;
};

static inline uint64_t hash_parts(const struct part *p, int np)
{
	uint64_t h = HASH_SEED;
	for (int i = 0; i < np; i++) {
		if (i)
			h = hash_sep(h);
		h = hash_bytes(h, p[i].s, p[i].n);
	}
	return hash_final(h);
}

/* ------------------------------------------------------------------ tables */

struct slot {
	uint64_t hash;    /* 0: empty */
	uint32_t off;     /* the key in the arena */
	uint32_t len;
	uint32_t val;
};

struct table {
	struct slot *slots;
	size_t cap;       /* 0 or a power of two */
	size_t count;
};

struct arena {
	char *p;
	size_t len, cap;
};

/* The stored key k (parts joined by SEP) against the parts: a request part
 * that contains SEP can never match, since no stored part does. */
static inline bool key_eq(const char *k, size_t klen, const struct part *p, int np)
{
	size_t o = 0;
	for (int i = 0; i < np; i++) {
		if (i) {
			if (o >= klen || k[o] != SEP)
				return false;
			o++;
		}
		if (p[i].n > klen - o || memcmp(k + o, p[i].s, p[i].n) != 0)
			return false;
		o += p[i].n;
	}
	return o == klen;
}

/* The slot of the key, or NULL. */
static inline const struct slot *table_find(const struct table *t, const char *arena, const struct part *p, int np)
{
	if (t->count == 0)
		return NULL;
	uint64_t h = hash_parts(p, np);
	size_t mask = t->cap - 1;
	for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
		const struct slot *s = &t->slots[i];
		if (s->hash == 0)
			return NULL;
		if (s->hash == h && key_eq(arena + s->off, s->len, p, np))
			return s;
	}
}

static bool table_grow(struct table *t)
{
	size_t ncap = t->cap ? t->cap * 2 : 16;
	if (ncap > SIZE_MAX / sizeof(struct slot))
		return false;
	struct slot *ns = calloc(ncap, sizeof(*ns));
	if (!ns)
		return false;
	for (size_t i = 0; i < t->cap; i++) {
		if (!t->slots[i].hash)
			continue;
		size_t j = (size_t)t->slots[i].hash & (ncap - 1);
		while (ns[j].hash)
			j = (j + 1) & (ncap - 1);
		ns[j] = t->slots[i];
	}
	free(t->slots);
	t->slots = ns;
	t->cap = ncap;
	return true;
}

/* Finds or adds the key: *slot is the slot, *added whether it is new.
 * 0, or -2 out of memory. */
static int table_put(struct table *t, struct arena *a, const struct part *p, int np, struct slot **slot,
		     bool *added)
{
	if ((t->count + 1) * 2 > t->cap && !table_grow(t))
		return -2;
	uint64_t h = hash_parts(p, np);
	size_t mask = t->cap - 1, i;
	for (i = (size_t)h & mask; t->slots[i].hash; i = (i + 1) & mask) {
		struct slot *s = &t->slots[i];
		if (s->hash == h && key_eq(a->p + s->off, s->len, p, np)) {
			*slot = s;
			*added = false;
			return 0;
		}
	}
	size_t klen = 0;
	for (int k = 0; k < np; k++)
		klen += p[k].n + (k ? 1 : 0);
	if (klen > UINT32_MAX || a->len + klen > UINT32_MAX)
		return -2;
	if (a->len + klen > a->cap) {
		size_t ncap = a->cap ? a->cap : 4096;
		while (ncap < a->len + klen)
			ncap *= 2;
		char *np_ = realloc(a->p, ncap);
		if (!np_)
			return -2;
		a->p = np_;
		a->cap = ncap;
	}
	struct slot *s = &t->slots[i];
	s->hash = h;
	s->off = (uint32_t)a->len;
	s->len = (uint32_t)klen;
	s->val = 0;
	for (int k = 0; k < np; k++) {
		if (k)
			a->p[a->len++] = SEP;
		memcpy(a->p + a->len, p[k].s, p[k].n);
		a->len += p[k].n;
	}
	t->count++;
	*slot = s;
	*added = true;
	return 0;
}

/* ------------------------------------------------------------------ snapshot */

/* The rule tables, most specific first. */
enum { T_USER, T_DOMAIN, T_DOMAIN_WILD, T_NETWORK, T_NETWORK_WILD, T_RULES };

struct rule {
	int64_t id;
	int64_t expires_ms;
	char *pattern;      /* as given: the subject of its buckets (all but the per-user ones) */
	struct policy_limits lim;
	enum policy_scope scope;
	enum policy_mode mode;
};

struct policy_snapshot {
	uint64_t version;
	enum policy_mode default_mode;
	bool optin_default;
	struct rule *rules;
	size_t nrules;
	struct table rt[T_RULES];  /* pattern -> index in rules */
	struct table optins;       /* (local, network) -> opted in */
	struct table consents;     /* (local, "u"|"d", subject) -> allowed */
	struct table blocks;       /* (remote, local) */
	char *arena;
	/* An overlay (policy_builder_overlay): rules, defaults and the facts
	 * of the local users not in `users` are base's. */
	const struct policy_snapshot *base;
	struct table users;        /* (local): the users whose facts are here */
	struct table per_user;     /* (local) -> how many of the facts here are its */
	size_t nfacts;             /* policy_snapshot_fact_count (finish) */
};

struct policy_builder {
	struct policy_snapshot s;
	size_t rules_cap;
	struct arena a;
	bool failed;               /* out of memory once: finish fails */
};

static const struct policy_snapshot empty_snapshot = { .default_mode = POLICY_MODE_OPEN, .optin_default = false };

struct policy_builder *policy_builder_new(void)
{
	struct policy_builder *b = calloc(1, sizeof(*b));
	if (b) {
		b->s.default_mode = POLICY_MODE_OPEN;
		b->s.optin_default = false;
	}
	return b;
}

static void snapshot_release(struct policy_snapshot *s)
{
	for (size_t i = 0; i < s->nrules; i++)
		free(s->rules[i].pattern);
	free(s->rules);
	for (int i = 0; i < T_RULES; i++)
		free(s->rt[i].slots);
	free(s->optins.slots);
	free(s->users.slots);
	free(s->per_user.slots);
	free(s->consents.slots);
	free(s->blocks.slots);
}

void policy_builder_free(struct policy_builder *b)
{
	if (!b)
		return;
	snapshot_release(&b->s);
	free(b->a.p);
	free(b);
}

void policy_builder_defaults(struct policy_builder *b, enum policy_mode default_mode, bool optin_default)
{
	if (!b)
		return;
	switch (default_mode) {
	case POLICY_MODE_OPEN:
	case POLICY_MODE_ALLOWLIST:
	case POLICY_MODE_CLOSED:
		b->s.default_mode = default_mode;
		break;
	case POLICY_MODE_DENY: /* a default cannot be an abuse rule: closed */
		b->s.default_mode = POLICY_MODE_CLOSED;
		break;
	default:
		b->s.default_mode = POLICY_MODE_OPEN;
		break;
	}
	b->s.optin_default = optin_default;
}

static bool lower_alnum(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

/* Lower-case labels of [a-z0-9-] joined by single dots, starting and
 * ending with a letter or digit (as the rules table's check has it). */
static bool valid_domain(const char *p, size_t n)
{
	if (n == 0 || n > MAX_DOMAIN || !lower_alnum(p[0]) || !lower_alnum(p[n - 1]))
		return false;
	size_t label = 0;
	for (size_t i = 0; i < n; i++) {
		char c = p[i];
		if (c == '.') {
			if (label == 0)
				return false;
			label = 0;
		} else if (lower_alnum(c) || c == '-') {
			label++;
		} else {
			return false;
		}
	}
	return label > 0;
}

/* [a-z][a-z0-9_-]{0,31} */
static bool valid_network_name(const char *p, size_t n)
{
	if (n < 1 || n > 32 || !(p[0] >= 'a' && p[0] <= 'z'))
		return false;
	for (size_t i = 1; i < n; i++)
		if (!lower_alnum(p[i]) && p[i] != '_' && p[i] != '-')
			return false;
	return true;
}

/* [A-Za-z0-9._-]{1,253} */
static bool valid_network_instance(const char *p, size_t n)
{
	if (n < 1 || n > 253)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = p[i];
		if (!lower_alnum(c) && !(c >= 'A' && c <= 'Z') && c != '.' && c != '_' && c != '-')
			return false;
	}
	return true;
}

/* A fact's string: not empty, no control bytes (SEP among them). */
static bool valid_text(const char *s, size_t max)
{
	if (!s || !*s)
		return false;
	size_t n = 0;
	for (; s[n]; n++)
		if ((unsigned char)s[n] < 0x20 || s[n] == 0x7f || n >= max)
			return false;
	return true;
}

static bool valid_user(const char *s)
{
	if (!valid_text(s, MAX_USER_URI) || strncmp(s, "mimi://", 7) != 0)
		return false;
	const char *u = strstr(s + 7, "/u/");
	return u && u[3] != '\0';
}

int policy_builder_rule(struct policy_builder *b, int64_t id, enum policy_scope scope, const char *pattern,
			enum policy_mode mode, const struct policy_limits *limits, int64_t expires_ms)
{
	if (!b)
		return -2;
	if (!pattern || (unsigned)mode > POLICY_MODE_DENY)
		return -1;
	size_t n = strlen(pattern);
	struct part key = { pattern, n };
	int t;
	switch (scope) {
	case POLICY_SCOPE_DOMAIN:
		if (n >= 2 && pattern[0] == '*' && pattern[1] == '.') {
			key.s += 2;
			key.n -= 2;
			t = T_DOMAIN_WILD;
		} else {
			t = T_DOMAIN;
		}
		if (!valid_domain(key.s, key.n))
			return -1;
		break;
	case POLICY_SCOPE_NETWORK: {
		const char *colon = memchr(pattern, ':', n);
		if (!colon) {
			if (!valid_network_name(pattern, n))
				return -1;
			t = T_NETWORK;
		} else {
			size_t nn = (size_t)(colon - pattern), rest = n - nn - 1;
			if (!valid_network_name(pattern, nn))
				return -1;
			if (rest == 1 && colon[1] == '*') {
				key.n = nn;
				t = T_NETWORK_WILD;
			} else if (valid_network_instance(colon + 1, rest)) {
				t = T_NETWORK;
			} else {
				return -1;
			}
		}
		break;
	}
	case POLICY_SCOPE_USER:
		if (!valid_user(pattern))
			return -1;
		t = T_USER;
		break;
	default:
		return -1;
	}
	if (b->s.nrules == b->rules_cap) {
		size_t ncap = b->rules_cap ? b->rules_cap * 2 : 64;
		struct rule *nr = realloc(b->s.rules, ncap * sizeof(*nr));
		if (!nr) {
			b->failed = true;
			return -2;
		}
		b->s.rules = nr;
		b->rules_cap = ncap;
	}
	if (b->s.nrules >= UINT32_MAX)
		return -2;
	struct slot *slot;
	bool added;
	if (table_put(&b->s.rt[t], &b->a, &key, 1, &slot, &added) < 0) {
		b->failed = true;
		return -2;
	}
	if (!added)
		return -1;
	char *copy = strdup(pattern);
	if (!copy) {
		b->failed = true;
		return -2;
	}
	slot->val = (uint32_t)b->s.nrules;
	struct rule *r = &b->s.rules[b->s.nrules++];
	memset(r, 0, sizeof(*r));
	r->pattern = copy;
	r->id = id;
	r->scope = scope;
	r->mode = mode;
	r->expires_ms = expires_ms;
	if (limits) {
		r->lim = *limits;
		r->lim.set &= LIM_ALL;
	}
	return 0;
}

/* Adds or updates a fact, whose local user is p[local] (counted in
 * per_user when it is new; the overlay's users are put here too, with no
 * count). */
static int put_fact(struct policy_builder *b, struct table *t, const struct part *p, int np, int local,
		    uint32_t val)
{
	struct slot *slot, *per;
	bool added;
	if (table_put(t, &b->a, p, np, &slot, &added) < 0) {
		b->failed = true;
		return -2;
	}
	slot->val = val;
	if (added && t != &b->s.users) {
		if (table_put(&b->s.per_user, &b->a, &p[local], 1, &per, &added) < 0) {
			b->failed = true;
			return -2;
		}
		per->val++; /* 0 when added */
	}
	return 0;
}

int policy_builder_optin(struct policy_builder *b, const char *local_uri, const char *network, bool opted_in)
{
	if (!b)
		return -2;
	if (!valid_text(local_uri, MAX_USER_URI) || !valid_text(network, 512))
		return -1;
	struct part p[2] = { { local_uri, strlen(local_uri) }, { network, strlen(network) } };
	return put_fact(b, &b->s.optins, p, 2, 0, opted_in);
}

int policy_builder_consent(struct policy_builder *b, const char *local_uri, bool subject_is_domain,
			   const char *subject, bool allowed)
{
	if (!b)
		return -2;
	if (!valid_text(local_uri, MAX_USER_URI) || !valid_text(subject, MAX_USER_URI))
		return -1;
	struct part p[3] = { { local_uri, strlen(local_uri) }, { subject_is_domain ? "d" : "u", 1 },
			     { subject, strlen(subject) } };
	return put_fact(b, &b->s.consents, p, 3, 0, allowed);
}

int policy_builder_remote_block(struct policy_builder *b, const char *remote_uri, const char *local_uri)
{
	if (!b)
		return -2;
	if (!valid_text(remote_uri, MAX_USER_URI) || !valid_text(local_uri, MAX_USER_URI))
		return -1;
	struct part p[2] = { { remote_uri, strlen(remote_uri) }, { local_uri, strlen(local_uri) } };
	return put_fact(b, &b->s.blocks, p, 2, 1, 1);
}

struct policy_builder *policy_builder_overlay(const struct policy_snapshot *base)
{
	if (!base)
		return NULL;
	struct policy_builder *b = policy_builder_new();
	if (b) {
		b->s.base = policy_snapshot_base(base);
		b->s.default_mode = b->s.base->default_mode;
		b->s.optin_default = b->s.base->optin_default;
	}
	return b;
}

int policy_builder_user(struct policy_builder *b, const char *local_uri)
{
	if (!b || !b->s.base)
		return -2;
	if (!valid_text(local_uri, MAX_USER_URI))
		return -1;
	struct part p[1] = { { local_uri, strlen(local_uri) } };
	return put_fact(b, &b->s.users, p, 1, 0, 1);
}

/* How many of the facts in s are local user u's (its key in arena). */
static size_t facts_of_user(const struct policy_snapshot *s, const char *arena, const struct slot *u)
{
	struct part p = { arena + u->off, u->len };
	const struct slot *n = table_find(&s->per_user, s->arena, &p, 1);
	return n ? n->val : 0;
}

/* The facts in force in s: its own, and an overlay's base's but those of
 * the users the overlay names (whose facts are its own: those it holds of
 * a user it does not name are not in force).  Until the forty-eighth
 * session an overlay added all its own to all its base's, the users it
 * names counted twice (causeway_policy_facts too high while one is in
 * force). */
static size_t count_facts(const struct policy_snapshot *s)
{
	size_t n = s->optins.count + s->consents.count + s->blocks.count;
	if (!s->base)
		return n;
	size_t named = 0, gone = 0;
	for (size_t i = 0; i < s->users.cap; i++) {
		const struct slot *u = &s->users.slots[i];
		if (!u->hash)
			continue;
		named += facts_of_user(s, s->arena, u);
		gone += facts_of_user(s->base, s->arena, u);
	}
	return s->base->nfacts - gone + named;
}

struct policy_snapshot *policy_builder_finish(struct policy_builder *b, uint64_t version)
{
	if (!b)
		return NULL;
	if (b->failed) {
		policy_builder_free(b);
		return NULL;
	}
	struct policy_snapshot *s = malloc(sizeof(*s));
	if (!s) {
		policy_builder_free(b);
		return NULL;
	}
	*s = b->s;
	s->version = version;
	/* Shrink what was grown by doubling (a failure keeps the larger block). */
	if (b->a.len) {
		char *p = realloc(b->a.p, b->a.len);
		s->arena = p ? p : b->a.p;
	} else {
		free(b->a.p);
		s->arena = NULL;
	}
	s->nfacts = count_facts(s);
	if (s->nrules) {
		struct rule *r = realloc(s->rules, s->nrules * sizeof(*r));
		if (r)
			s->rules = r;
	}
	free(b);
	return s;
}

void policy_snapshot_free(struct policy_snapshot *s)
{
	if (!s)
		return;
	snapshot_release(s);
	free(s->arena);
	free(s);
}

uint64_t policy_snapshot_version(const struct policy_snapshot *s)
{
	return s ? s->version : 0;
}

size_t policy_snapshot_rule_count(const struct policy_snapshot *s)
{
	return s ? policy_snapshot_base(s)->nrules : 0;
}

bool policy_snapshot_limits_content(const struct policy_snapshot *s)
{
	const struct policy_snapshot *b = s ? policy_snapshot_base(s) : NULL;
	for (size_t i = 0; b && i < b->nrules; i++)
		if (b->rules[i].lim.set & (POLICY_LIM_MAX_BODY | POLICY_LIM_MAX_ATTACH | POLICY_LIM_CONTENT_KINDS))
			return true;
	return false;
}

size_t policy_snapshot_fact_count(const struct policy_snapshot *s)
{
	return s ? s->nfacts : 0;
}

const struct policy_snapshot *policy_snapshot_base(const struct policy_snapshot *s)
{
	return s && s->base ? s->base : s;
}

/* The snapshot that holds local user l's facts: an overlay for the users
 * it names, else its base. */
static inline const struct policy_snapshot *facts_of(const struct policy_snapshot *s, const struct part *l)
{
	if (!s->base)
		return s;
	return table_find(&s->users, s->arena, l, 1) ? s : s->base;
}

/* ------------------------------------------------------------------ decide */

/* The reasons policy_decide answers (rate_limited_recipient_consent_requests,
 * a first contact's request past the local user's own bound, is decided by
 * the write that would store the request since the forty-first session:
 * not here). */
const char *const policy_reason_codes[] = {
	"server_denied_user", "server_denied_domain", "server_denied_network",
	"user_blocked_sender", "user_blocked_domain", "user_blocked_recipient",
	"recipient_blocked_sender", "too_large", "content_kind_disabled",
	"server_closed", "server_not_allowlisted", "user_not_opted_in",
	"no_consent_yet",
	"rate_limited_domain", "rate_limited_network", "rate_limited_user",
	"rate_limited_sender", "rate_limited_new_conversations",
	"rate_limited_sender_new_conversations", "rate_limited_consent_requests",
	"rate_limited_sender_consent_requests",
	"rate_limited_local_sender", "rate_limited_local_sender_new_conversations",
	"user_allowed_sender", "user_allowed_domain", "user_wrote_in_group", "outbound", "transit",
	"new_room",
	NULL,
};

/* A party of the request with its lengths (NULL strings are empty). */
struct pparty {
	struct part uri, domain, network;
	bool present;
};

/* The in_addition rules that can match one party: one in each table but
 * the domain wildcards', one per suffix there.  A wildcard's suffix is a
 * valid domain (at most MAX_DOMAIN bytes, a letter or digit after each
 * dot), so the suffixes of one domain that can match start at least two
 * bytes apart: at most (MAX_DOMAIN + 1) / 2 of them. */
#define ADD_MAX (T_RULES - 1 + (MAX_DOMAIN + 1) / 2)

/* What the rules matching one remote party say: each the most specific
 * non-expired matching rule that denies, has a mode, sets each limit (of
 * the ordinary rules: lim); and every non-expired matching in_addition
 * rule with limits, most specific first (add; nadd of them, all applied).
 * add is last and not cleared: only its first nadd are ever read. */
struct peval {
	const struct rule *deny;
	const struct rule *mode;
	const struct rule *lim[NLIMITS];
	unsigned lim_set;
	int nadd;
	const struct rule *add[ADD_MAX];
};

static inline struct part mkpart(const char *s)
{
	struct part p = { s ? s : "", s ? strlen(s) : 0 };
	return p;
}

/* Whether remote user r blocked local user l: f holds l's facts
 * (facts_of).  Asked by the decision (outbound, step 2) and by
 * policy_remote_block_fact (the gateway's recheck of her waiting rows):
 * one lookup, so that the two never disagree.  An empty uri is no one. */
static inline bool remote_block(const struct policy_snapshot *f, const struct part *r, const struct part *l)
{
	if (r->n == 0 || l->n == 0)
		return false;
	struct part k[2] = { *r, *l };
	return table_find(&f->blocks, f->arena, k, 2) != NULL;
}

static inline void mkparty(struct pparty *pp, const struct policy_party *p, bool present)
{
	pp->present = present;
	pp->uri = mkpart(present ? p->uri : NULL);
	pp->domain = mkpart(present ? p->domain : NULL);
	pp->network = mkpart(present ? p->network : NULL);
}

static inline void consider(const struct policy_snapshot *s, int t, const struct part *key, int64_t now,
			    struct peval *e)
{
	if (key->n == 0)
		return;
	const struct slot *sl = table_find(&s->rt[t], s->arena, key, 1);
	if (!sl)
		return;
	const struct rule *r = &s->rules[sl->val];
	if (r->expires_ms != 0 && r->expires_ms <= now)
		return;
	if (r->mode == POLICY_MODE_DENY) {
		if (!e->deny)
			e->deny = r;
	} else if (r->mode != POLICY_MODE_NONE && !e->mode) {
		e->mode = r;
	}
	/* An in_addition rule does not stand in for the less specific
	 * ordinary rules: they still set the party's own limits.  Nor for
	 * the less specific in_addition rules: each of them only tightens,
	 * so each applies (a reported user's automatic rule must not lift
	 * their domain's in_addition limit). */
	if (r->lim.in_addition) {
		if (r->lim.set && e->nadd < ADD_MAX) /* always: ADD_MAX bounds the matches */
			e->add[e->nadd++] = r;
		return;
	}
	unsigned fresh = r->lim.set & ~e->lim_set;
	if (fresh) {
		for (int i = 0; i < NLIMITS; i++)
			if (fresh & (1u << i))
				e->lim[i] = r;
		e->lim_set |= fresh;
	}
}

/* Visits the rules that can match the party, most specific first. */
static void evaluate(const struct policy_snapshot *s, const struct pparty *p, int64_t now, struct peval *e)
{
	memset(e, 0, offsetof(struct peval, add));
	if (s->nrules == 0)
		return;
	consider(s, T_USER, &p->uri, now, e);
	consider(s, T_DOMAIN, &p->domain, now, e);
	if (s->rt[T_DOMAIN_WILD].count) {
		/* Every suffix after a '.', longest first. */
		for (size_t i = 0; i < p->domain.n; i++) {
			if (p->domain.s[i] != '.')
				continue;
			struct part suf = { p->domain.s + i + 1, p->domain.n - i - 1 };
			consider(s, T_DOMAIN_WILD, &suf, now, e);
		}
	}
	consider(s, T_NETWORK, &p->network, now, e);
	if (s->rt[T_NETWORK_WILD].count) {
		const char *colon = memchr(p->network.s, ':', p->network.n);
		if (colon) {
			struct part name = { p->network.s, (size_t)(colon - p->network.s) };
			consider(s, T_NETWORK_WILD, &name, now, e);
		}
	}
}

static inline int lim_index(unsigned bit)
{
	return __builtin_ctz(bit);
}

static inline void set(struct policy_decision *d, enum policy_verdict v, const char *reason, int64_t rule_id)
{
	d->verdict = v;
	d->reason = reason;
	d->rule_id = rule_id;
	d->retry_after_ms = 0;
	d->refused_kinds = 0;
}

/* Consent fact (local, kind, subject): -1 none, 0 blocked, 1 allowed. */
static inline int consent(const struct policy_snapshot *s, const struct pparty *l, const char *kind,
			  const struct part *subject)
{
	if (s->consents.count == 0 || l->uri.n == 0 || subject->n == 0)
		return -1;
	struct part p[3] = { l->uri, { kind, 1 }, *subject };
	const struct slot *sl = table_find(&s->consents, s->arena, p, 3);
	return sl ? (int)sl->val : -1;
}

/* Opt-in fact (local, network): -1 none, 0 opted out, 1 opted in. */
static inline int optin(const struct policy_snapshot *s, const struct part *local, const struct part *network)
{
	if (s->optins.count == 0 || local->n == 0 || network->n == 0)
		return -1;
	struct part k[2] = { *local, *network };
	const struct slot *sl = table_find(&s->optins, s->arena, k, 2);
	return sl ? (int)sl->val : -1;
}

/* Appends src to the key buffer, truncating at POLICY_RATE_KEY_MAX. */
static inline size_t key_append(char *buf, size_t n, const char *src, size_t len)
{
	if (len > POLICY_RATE_KEY_MAX - n)
		len = POLICY_RATE_KEY_MAX - n;
	memcpy(buf + n, src, len);
	return n + len;
}

static size_t key_append_id(char *buf, size_t n, int64_t id)
{
	char tmp[24];
	size_t k = sizeof(tmp);
	uint64_t v = id < 0 ? (uint64_t)0 - (uint64_t)id : (uint64_t)id;
	do {
		tmp[--k] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	if (id < 0)
		tmp[--k] = '-';
	return key_append(buf, n, tmp + k, sizeof(tmp) - k);
}

/* Takes a token from "<kind>:<rule id>:<subject>" (peek: asks whether one
 * is there, taking none); the ms to wait, or 0. */
static int64_t ask(const struct policy_request *r, bool peek, const char *kind, const struct rule *rule,
		   const struct part *subject, uint32_t capacity, int64_t period_ms)
{
	char key[POLICY_RATE_KEY_MAX + 1];
	size_t n = key_append(key, 0, kind, 3);
	n = key_append(key, n, ":", 1);
	n = key_append_id(key, n, rule->id);
	n = key_append(key, n, ":", 1);
	n = key_append(key, n, subject->s, subject->n);
	key[n] = '\0';
	int64_t wait = (peek ? r->rate->peek : r->rate->take)(r->rate->ctx, key, capacity, period_ms, r->now_ms);
	return wait > 0 ? wait : 0;
}

static inline int64_t take(const struct policy_request *r, const char *kind, const struct rule *rule,
			   const struct part *subject, uint32_t capacity, int64_t period_ms)
{
	return ask(r, false, kind, rule, subject, capacity, period_ms);
}

static inline bool limited(struct policy_decision *d, int64_t wait, const char *reason, const struct rule *rule)
{
	if (wait <= 0)
		return false;
	set(d, POLICY_LIMIT, reason, rule->id);
	d->retry_after_ms = wait;
	return true;
}

/* Step 3a: the sender's rate limits.  Each limit has one bucket for the
 * rule's whole subject (its pattern): every user of a domain, every
 * subdomain of a wildcard, every peer of "peer:*", the user of a user rule;
 * rotating user names or subdomains does not escape it (the spec's limits
 * are per remote domain and per remote user, and a domain's limit must
 * bound the domain).  Its "_per_user" variant has one bucket per sender
 * URI under whatever rule sets it.  The whole subject's is taken first. */
static bool rate_limits_of(const struct policy_request *r, const struct pparty *snd,
			   const struct rule *const lim[NLIMITS], struct policy_decision *d)
{
	const struct rule *rule;
	struct part subj;
	switch (r->action) {
	case POLICY_ACT_EVENT:
		if ((rule = lim[lim_index(POLICY_LIM_MSG_MINUTE)])) {
			subj = (struct part){ rule->pattern, strlen(rule->pattern) };
			const char *reason = rule->scope == POLICY_SCOPE_USER      ? "rate_limited_user"
					     : rule->scope == POLICY_SCOPE_NETWORK ? "rate_limited_network"
										   : "rate_limited_domain";
			if (limited(d, take(r, "mpm", rule, &subj, rule->lim.messages_per_minute, 60000), reason, rule))
				return true;
		}
		if ((rule = lim[lim_index(POLICY_LIM_MSG_MINUTE_USER)]) &&
		    limited(d, take(r, "mpu", rule, &snd->uri, rule->lim.messages_per_minute_per_user, 60000),
			    "rate_limited_sender", rule))
			return true;
		return false;
	case POLICY_ACT_NEW_ROOM:
		if ((rule = lim[lim_index(POLICY_LIM_NEW_CONV_HOUR)])) {
			subj = (struct part){ rule->pattern, strlen(rule->pattern) };
			if (limited(d, take(r, "ncu", rule, &subj, rule->lim.new_conversations_per_hour, 3600000),
				    "rate_limited_new_conversations", rule))
				return true;
		}
		if ((rule = lim[lim_index(POLICY_LIM_NEW_CONV_HOUR_USER)]) &&
		    limited(d, take(r, "ncp", rule, &snd->uri, rule->lim.new_conversations_per_hour_per_user, 3600000),
			    "rate_limited_sender_new_conversations", rule))
			return true;
		return false;
	case POLICY_ACT_CONSENT_REQUEST:
	case POLICY_ACT_FIRST_CONTACT: {
		/* Two buckets of each, not one: a shared one would tell a
		 * peer, from requestConsent's 429, which users its first
		 * contacts asked. */
		bool mimi = r->action == POLICY_ACT_CONSENT_REQUEST;
		if ((rule = lim[lim_index(POLICY_LIM_CONSENT_REQ_DAY)])) {
			subj = (struct part){ rule->pattern, strlen(rule->pattern) };
			if (limited(d, take(r, mimi ? "cru" : "crf", rule, &subj, rule->lim.consent_requests_per_day,
					    86400000),
				    "rate_limited_consent_requests", rule))
				return true;
		}
		if ((rule = lim[lim_index(POLICY_LIM_CONSENT_REQ_DAY_USER)]) &&
		    limited(d, take(r, mimi ? "crp" : "cfp", rule, &snd->uri, rule->lim.consent_requests_per_day_per_user,
				    86400000),
			    "rate_limited_sender_consent_requests", rule))
			return true;
		return false;
	}
	}
	return false;
}

static inline bool is(const char *s, const char *lit)
{
	return s && strcmp(s, lit) == 0;
}

/* Step 3a outbound: the local sender's own limits under one set of the
 * recipient's rules, each a bucket per local sender (since the
 * twenty-sixth session; before, nothing limited a local user), asked
 * after every other step (policy_decide), peek for an event step 4
 * refuses (no token taken).  The
 * events that add to the far side's view count (below); a message in a direct
 * room to a remote user she has no consent fact about (she never wrote to
 * them nor accepted them or their domain: cu, cd) starts a conversation,
 * a group's message none.  The messages' bucket first. */
static bool outbound_limits_of(const struct policy_request *r, const struct pparty *snd, bool known, bool peek,
			       const struct rule *const lim[NLIMITS], struct policy_decision *d)
{
	const struct rule *rule;
	/* What adds nothing to the remote side's view counts for no limit:
	 * typing and receipts (a client sends them by itself), her own joins
	 * and leaves (a refused leave would keep her a member: a review's
	 * find), deletes and blocks (they take back, never add).  An
	 * invitation brings someone in: it counts. */
	if (r->action != POLICY_ACT_EVENT || is(r->event_type, "typing") || is(r->event_type, "receipt") ||
	    (is(r->event_type, "membership") && !r->invitation) || is(r->event_type, "delete") ||
	    is(r->event_type, "block"))
		return false;
	if ((rule = lim[lim_index(POLICY_LIM_OUT_MSG_MINUTE_USER)]) &&
	    limited(d, ask(r, peek, "omp", rule, &snd->uri, rule->lim.outbound_messages_per_minute_per_user, 60000),
		    "rate_limited_local_sender", rule))
		return true;
	if (!known && !r->group && is(r->event_type, "message") &&
	    (rule = lim[lim_index(POLICY_LIM_OUT_NEW_CONV_HOUR_USER)]) &&
	    limited(d, ask(r, peek, "onp", rule, &snd->uri, rule->lim.outbound_new_conversations_per_hour_per_user,
			   3600000),
		    "rate_limited_local_sender_new_conversations", rule))
		return true;
	return false;
}

/* An in_addition rule's limits in the form of peval's lim: itself for each
 * limit it sets. */
static void rule_limits(const struct rule *rule, const struct rule *lim[NLIMITS])
{
	for (int i = 0; i < NLIMITS; i++)
		lim[i] = rule->lim.set & (1u << i) ? rule : NULL;
}

static bool add_rate_limits(const struct policy_request *r, const struct pparty *snd, const struct peval *e,
			    struct policy_decision *d)
{
	for (int i = 0; i < e->nadd; i++) {
		const struct rule *lim[NLIMITS];
		rule_limits(e->add[i], lim);
		if (rate_limits_of(r, snd, lim, d))
			return true;
	}
	return false;
}

/* The in_addition rules' buckets first, most specific first, then the
 * ordinary ones; the first refusal ends it (take() has no refund: the
 * buckets before it keep the token they gave, those after it are not
 * asked).  A sender an in_addition rule stops (a reported user) then
 * takes nothing from the buckets they share with others (their domain's),
 * which they would otherwise drain for everyone with messages refused
 * anyway.  Inline, with the loop apart: no cost without in_addition rules. */
static inline bool rate_limits(const struct policy_request *r, const struct pparty *snd, const struct peval *e,
			       struct policy_decision *d)
{
	return (e->nadd && add_rate_limits(r, snd, e, d)) || rate_limits_of(r, snd, e->lim, d);
}

/* The same for a local sender's outbound limits (the recipient's rules):
 * in_addition rules first, then the ordinary ones.  Nothing to do, and
 * no cost beyond a test, unless a rule matching the recipient sets one. */
#define LIM_OUTBOUND (POLICY_LIM_OUT_MSG_MINUTE_USER | POLICY_LIM_OUT_NEW_CONV_HOUR_USER)

static bool outbound_limits_slow(const struct policy_request *r, const struct pparty *snd, bool known, bool peek,
				 const struct peval *e, struct policy_decision *d)
{
	for (int i = 0; i < e->nadd; i++) {
		const struct rule *lim[NLIMITS];
		rule_limits(e->add[i], lim);
		if ((e->add[i]->lim.set & LIM_OUTBOUND) && outbound_limits_of(r, snd, known, peek, lim, d))
			return true;
	}
	return (e->lim_set & LIM_OUTBOUND) && outbound_limits_of(r, snd, known, peek, e->lim, d);
}

static inline bool outbound_limits(const struct policy_request *r, const struct pparty *snd, bool known, bool peek,
				   const struct peval *e, struct policy_decision *d)
{
	return (e->nadd || (e->lim_set & LIM_OUTBOUND)) && outbound_limits_slow(r, snd, known, peek, e, d);
}

/* An outbound event's local sender's limits, when there are buckets (and,
 * to peek, a peek); known: she has a consent fact about the recipient or
 * their domain (cu, cd), or the request started the conversation. */
static inline bool local_limits(const struct policy_request *r, const struct pparty *snd, int nremote, int cu, int cd,
				bool peek, const struct peval *e, struct policy_decision *d)
{
	return nremote == 1 && r->rate && r->rate->take && (!peek || r->rate->peek) &&
	       outbound_limits(r, snd, cu == 1 || cd == 1 || r->started_in_request, peek, e, d);
}

/* Step 3b: size and content kinds against one party's limits. */
static bool size_limits_of(const struct policy_request *r, const struct rule *const lim[NLIMITS],
			   struct policy_decision *d)
{
	const struct rule *rule;
	if ((rule = lim[lim_index(POLICY_LIM_MAX_BODY)]) && r->body_bytes > rule->lim.max_body_bytes) {
		set(d, POLICY_DENY, "too_large", rule->id);
		return true;
	}
	if ((rule = lim[lim_index(POLICY_LIM_MAX_ATTACH)]) && r->attachment_bytes > rule->lim.max_attachment_bytes) {
		set(d, POLICY_DENY, "too_large", rule->id);
		return true;
	}
	if ((rule = lim[lim_index(POLICY_LIM_CONTENT_KINDS)]) && (r->content_kinds & ~rule->lim.content_kinds)) {
		set(d, POLICY_DENY, "content_kind_disabled", rule->id);
		d->refused_kinds = r->content_kinds & ~rule->lim.content_kinds;
		return true;
	}
	return false;
}

static bool add_size_limits(const struct policy_request *r, const struct peval *e, struct policy_decision *d)
{
	for (int i = 0; i < e->nadd; i++) {
		const struct rule *lim[NLIMITS];
		rule_limits(e->add[i], lim);
		if (size_limits_of(r, lim, d))
			return true;
	}
	return false;
}

static inline bool size_limits(const struct policy_request *r, const struct peval *e, struct policy_decision *d)
{
	return (e->nadd && add_size_limits(r, e, d)) || size_limits_of(r, e->lim, d);
}

void policy_decide(const struct policy_snapshot *ov, const struct policy_request *r, struct policy_decision *d)
{
	/* s: the rules and defaults; f (below): the local user's facts. */
	const struct policy_snapshot *s = ov ? policy_snapshot_base(ov) : &empty_snapshot;
	struct pparty snd, rcp;
	d->refused_kinds = 0;
	mkparty(&snd, &r->sender, true);
	mkparty(&rcp, &r->recipient, r->recipient.uri != NULL);

	/* The remote parties (sender first) and the local one. */
	const struct pparty *remote[2];
	int nremote = 0;
	const struct pparty *local = NULL;
	enum policy_direction dir = r->direction;
	if (dir != POLICY_OUTBOUND && dir != POLICY_TRANSIT)
		dir = POLICY_INBOUND; /* an unknown direction gets the strictest path */
	switch (dir) {
	case POLICY_INBOUND:
		remote[nremote++] = &snd;
		local = rcp.present ? &rcp : NULL;
		break;
	case POLICY_OUTBOUND:
		if (rcp.present)
			remote[nremote++] = &rcp;
		local = &snd;
		break;
	case POLICY_TRANSIT:
		remote[nremote++] = &snd;
		if (rcp.present)
			remote[nremote++] = &rcp;
		break;
	}
	struct peval ev[2];
	for (int i = 0; i < nremote; i++)
		evaluate(s, remote[i], r->now_ms, &ev[i]);

	/* 1. Server deny rules.  Inbound and in transit, the sender's rate
	 * limits (3a) are charged and answered first, as for a block (step
	 * 2): a denied sender never limited would learn that it is denied.
	 * Until the thirty-ninth session only inbound: in a room hosted here
	 * between two peers' users, a denied sender (or one writing to a
	 * denied user) took no token and met 202 where anyone else met 429. */
	for (int i = 0; i < nremote; i++) {
		const struct rule *rule = ev[i].deny;
		if (rule) {
			if (dir != POLICY_OUTBOUND && r->rate && r->rate->take && rate_limits(r, &snd, &ev[0], d))
				return;
			set(d, POLICY_DENY,
			    rule->scope == POLICY_SCOPE_USER      ? "server_denied_user"
			    : rule->scope == POLICY_SCOPE_NETWORK ? "server_denied_network"
								  : "server_denied_domain",
			    rule->id);
			return;
		}
	}

	/* 2. The local user's blocks; outbound, the remote user's block.  The
	 * consent facts found are kept for step 6.  Inbound, the sender's rate
	 * limits (3a) are charged and answered first: a block answered 202
	 * where anyone else's answer is 429 would tell a sender with an
	 * empty bucket who blocked them (the spec's rule that a peer cannot
	 * tell a block from anything else wins over its order here; what
	 * happens to the message is the same: nothing reaches the user). */
	int cu = -1, cd = -1;
	const struct policy_snapshot *f = local && ov ? facts_of(ov, &local->uri) : s;
	if (local && dir != POLICY_TRANSIT && nremote == 1) {
		const struct pparty *p = remote[0];
		cu = consent(f, local, "u", &p->uri);
		cd = cu == 0 ? -1 : consent(f, local, "d", &p->domain);
		if (cu == 0 || cd == 0) {
			if (dir == POLICY_INBOUND && r->rate && r->rate->take && rate_limits(r, &snd, &ev[0], d))
				return;
			set(d, POLICY_DENY, cu == 0 ? (dir == POLICY_INBOUND ? "user_blocked_sender" : "user_blocked_recipient")
						    : "user_blocked_domain", 0);
			return;
		}
		if (dir == POLICY_OUTBOUND && remote_block(f, &p->uri, &local->uri)) {
			set(d, POLICY_DENY, "recipient_blocked_sender", 0);
			return;
		}
	}

	/* 3a. Rate limits of a remote sender, charged before the size and
	 * content limits judge the message (3b): a message those deny takes
	 * a token whoever it is for, as one to a user who blocked the sender
	 * does (step 2).  Until the twentieth session it took none unless the
	 * user had blocked the sender or the server denied them, so a peer
	 * sending oversized messages met 429 only there, and learnt who
	 * blocked it (a review's finding). */
	if (r->rate && r->rate->take && dir != POLICY_OUTBOUND && rate_limits(r, &snd, &ev[0], d))
		return;
	/* 3b. Size and content kinds. */
	if (r->action == POLICY_ACT_EVENT)
		for (int i = 0; i < nremote; i++)
			if (size_limits(r, &ev[i], d))
				return;

	/* 3a outbound: the local sender's own limits under the recipient's
	 * rules, asked after 3b and 4 so that only an event that goes takes
	 * a token: they bound what she sends to the far side, and an event
	 * refused anyway sends nothing (as typing counts for nothing).  One
	 * that 4 refuses only peeks at her buckets: an empty one answers
	 * limit, as the spec's order (3 before 4) says, else 4's deny.  Size
	 * and content (3b) come before them all: what they refuse is denied
	 * and asks no bucket.  Until the twenty-seventh session the buckets
	 * came before 3b and 4 and always took: an oversized first line to
	 * someone new took her new conversation (and the next line counted
	 * again), a message to a closed domain a token of the network's
	 * bucket; in the twenty-seventh they came after 4, and a message
	 * both over her limit and to a closed domain was denied
	 * server_closed (a review's finding: the spec's order). */

	/* 4. The remote parties' effective modes. */
	for (int i = 0; i < nremote; i++) {
		const struct rule *rule = ev[i].mode;
		enum policy_mode m = rule ? rule->mode : s->default_mode;
		if (m == POLICY_MODE_CLOSED || m == POLICY_MODE_ALLOWLIST) {
			set(d, POLICY_DENY, m == POLICY_MODE_CLOSED ? "server_closed" : "server_not_allowlisted",
			    rule ? rule->id : 0);
			if (dir == POLICY_OUTBOUND)
				local_limits(r, &snd, nremote, cu, cd, true, &ev[0], d); /* an empty bucket: the limit */
			return;
		}
	}

	if (dir == POLICY_OUTBOUND) {
		if (local_limits(r, &snd, nremote, cu, cd, false, &ev[0], d))
			return;
		set(d, POLICY_ALLOW, "outbound", 0);
		return;
	}
	if (dir == POLICY_TRANSIT) {
		set(d, POLICY_ALLOW, "transit", 0);
		return;
	}

	/* Inbound from here on. */
	if (local) {
		/* 5. Opt-in to the sender's network.  Without a fact for it,
		 * the user's own consent to this sender (she wrote to them
		 * first, or accepted them) or her writing in this group counts
		 * as one for that conversation only; an opt-out stays. */
		int fact = optin(f, &local->uri, &snd.network);
		bool opted = fact < 0 ? s->optin_default || r->recipient_wrote_here || cu == 1 : fact != 0;
		if (!opted) {
			set(d, POLICY_DENY, "user_not_opted_in", 0);
			return;
		}
		/* 6. The local user's allowed. */
		if (cu == 1) {
			set(d, POLICY_ALLOW, "user_allowed_sender", 0);
			return;
		}
		if (cd == 1) {
			set(d, POLICY_ALLOW, "user_allowed_domain", 0);
			return;
		}
		/* The recipient wrote in this group: consent "for that
		 * conversation" (spec), to its members, in it only. */
		if (r->recipient_wrote_here) {
			set(d, POLICY_ALLOW, "user_wrote_in_group", 0);
			return;
		}
	}

	/* 7. No decision yet. */
	if (r->action == POLICY_ACT_NEW_ROOM || !local)
		set(d, POLICY_ALLOW, "new_room", 0);
	else if (r->action == POLICY_ACT_EVENT && (is(r->event_type, "typing") || is(r->event_type, "receipt")))
		set(d, POLICY_DENY, "no_consent_yet", 0);
	else
		set(d, POLICY_HOLD, "no_consent_yet", 0);
}

/* ------------------------------------------------------------------ facts */

int policy_optin_fact(const struct policy_snapshot *s, const char *local_uri, const char *network)
{
	if (!s || !local_uri || !network)
		return -1;
	struct part l = mkpart(local_uri), n = mkpart(network);
	return optin(facts_of(s, &l), &l, &n);
}

bool policy_optin_default(const struct policy_snapshot *s)
{
	return s && s->optin_default;
}

int policy_consent_fact(const struct policy_snapshot *s, const char *local_uri, bool subject_is_domain,
			const char *subject)
{
	if (!s || !local_uri || !subject)
		return -1;
	struct pparty l = { .present = true, .uri = mkpart(local_uri) };
	struct part subj = mkpart(subject);
	return consent(facts_of(s, &l.uri), &l, subject_is_domain ? "d" : "u", &subj);
}

bool policy_remote_block_fact(const struct policy_snapshot *s, const char *remote_uri, const char *local_uri)
{
	if (!s || !remote_uri || !local_uri)
		return false;
	struct part l = mkpart(local_uri), r = mkpart(remote_uri);
	return remote_block(facts_of(s, &l), &r, &l);
}

/* ------------------------------------------------------------------ names */

const char *policy_reason_text(const char *reason)
{
	static const char *const texts[][2] = {
		{ "server_denied_user", "this server does not allow messages to this person" },
		{ "server_denied_domain", "this server does not allow messages to their domain" },
		{ "server_denied_network", "this server does not allow messages to their network" },
		{ "user_blocked_recipient", "you blocked this person" },
		{ "user_blocked_domain", "you blocked their domain" },
		/* theirs, but hers to know: the Matrix bot's list shows it
		 * ("... blocked you: what you write to them is not delivered");
		 * until the thirty-eighth session she read "Not delivered."
		 * alone */
		{ "recipient_blocked_sender", "this person blocked you" },
		{ "too_large", "it is larger than this server allows to them" },
		/* the kind unknown here: policy_decision_text names it
		 * (until the thirty-ninth session this said "(files)" of
		 * a text refused by a content_kinds without "text") */
		{ "content_kind_disabled", "this server does not allow this kind of content to them" },
		{ "server_closed", "this server does not exchange messages with their network" },
		{ "server_not_allowlisted", "this server exchanges messages only with the networks it lists" },
		{ "rate_limited_local_sender", "you sent more messages than this server allows in a minute" },
		{ "rate_limited_local_sender_new_conversations",
		  "you started more new conversations than this server allows in an hour" },
	};
	for (size_t i = 0; reason && i < sizeof(texts) / sizeof(texts[0]); i++)
		if (strcmp(reason, texts[i][0]) == 0)
			return texts[i][1];
	return NULL;
}

const char *policy_decision_text(const struct policy_decision *d)
{
	if (!d || !d->reason)
		return NULL;
	if (strcmp(d->reason, "content_kind_disabled") == 0) {
		bool text = d->refused_kinds & POLICY_KIND_TEXT, media = d->refused_kinds & POLICY_KIND_MEDIA;
		if (text && media)
			return "this server does not allow text or files to them";
		if (text)
			return "this server does not allow text messages to them";
		if (media)
			return "this server does not allow files to them";
	}
	return policy_reason_text(d->reason);
}

bool policy_reason_is_servers(const char *reason)
{
	static const char *const servers[] = { "server_denied_user", "server_denied_domain", "server_denied_network",
					       "server_closed", "server_not_allowlisted", "user_not_opted_in" };
	for (size_t i = 0; reason && i < sizeof(servers) / sizeof(servers[0]); i++)
		if (strcmp(reason, servers[i]) == 0)
			return true;
	return false;
}

bool policy_reason_is_content(const char *reason)
{
	return reason && (strcmp(reason, "too_large") == 0 || strcmp(reason, "content_kind_disabled") == 0);
}

const char *policy_verdict_name(enum policy_verdict v)
{
	switch (v) {
	case POLICY_ALLOW: return "allow";
	case POLICY_DENY: return "deny";
	case POLICY_HOLD: return "hold";
	case POLICY_LIMIT: return "limit";
	}
	return "?";
}

static const char *const mode_names[] = { "none", "open", "allowlist", "closed", "deny" };
static const char *const scope_names[] = { "domain", "network", "user" };

const char *policy_mode_name(enum policy_mode m)
{
	return (unsigned)m < sizeof(mode_names) / sizeof(mode_names[0]) ? mode_names[m] : "?";
}

const char *policy_scope_name(enum policy_scope s)
{
	return (unsigned)s < sizeof(scope_names) / sizeof(scope_names[0]) ? scope_names[s] : "?";
}

bool policy_mode_parse(const char *s, enum policy_mode *out)
{
	for (unsigned i = 0; s && i < sizeof(mode_names) / sizeof(mode_names[0]); i++)
		if (strcmp(s, mode_names[i]) == 0) {
			*out = (enum policy_mode)i;
			return true;
		}
	return false;
}

bool policy_scope_parse(const char *s, enum policy_scope *out)
{
	for (unsigned i = 0; s && i < sizeof(scope_names) / sizeof(scope_names[0]); i++)
		if (strcmp(s, scope_names[i]) == 0) {
			*out = (enum policy_scope)i;
			return true;
		}
	return false;
}
