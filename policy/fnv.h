/* FNV-1a, 64 bits: the tree's one small hash of bytes for tables and
 * change detection inside one process (the policy's fingerprint,
 * the rate limiter's buckets, a batch's idempotency keys).  Nothing stores
 * its values or sends them to another process, so its start may change.
 * Until the forty-fifth session it was written out four times, two of
 * them with a start one digit short (1469598103934665603, not the offset
 * basis 14695981039346656037): still a valid start, as any but 0 is. */
#ifndef CW_FNV_H
#define CW_FNV_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FNV1A_START 0xcbf29ce484222325ull

/* h (FNV1A_START at first) on, over the n bytes at p. */
static inline uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
	for (const unsigned char *b = p, *end = b + n; b < end; b++)
		h = (h ^ *b) * 0x100000001b3ull;
	return h;
}

/* Over s and its NUL: strings hashed one after another stay apart ("ab",
 * "c" is not "a", "bc"). */
static inline uint64_t fnv1a_field(uint64_t h, const char *s)
{
	return fnv1a(h, s, strlen(s) + 1);
}

#endif
