/* Common definitions: the one error convention of the whole tree. */
#ifndef CW_H
#define CW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

/* Every fallible function returns a cw_err; CW_OK is 0, so `if (rc)` reads as
 * "on failure".  The human-readable reason goes into a cw_errmsg the caller
 * owns (like curl's failf into an error buffer). */
typedef enum {
	CW_OK = 0,
	CW_EINVAL,     /* bad input from outside or from the configuration */
	CW_ENOMEM,
	CW_ENOTFOUND,
	CW_ECONFLICT,  /* a constraint or an idempotency conflict */
	CW_EUNAVAIL,   /* a dependency (the database) is away: retry later */
	CW_ETIMEDOUT,  /* a deadline passed before the work was done */
	CW_ESHUTDOWN,  /* the daemon is stopping */
	CW_EIO,        /* a system call or library failed */
	CW_EINTERNAL,  /* a bug: an invariant did not hold */
	CW_ERETRY,     /* two transactions collided (deadlock, serialization): run it again */
} cw_err;

typedef struct {
	char msg[512];
} cw_errmsg;

/* Formats the reason into e (if not NULL) and returns code, so that
 * `return cw_fail(e, CW_EINVAL, "port %d out of range", p);` reads well. */
cw_err cw_fail(cw_errmsg *e, cw_err code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
const char *cw_strerror(cw_err code);

/* Monotonic and wall clocks, in microseconds. */
int64_t cw_now_us(void);
int64_t cw_wall_ms(void);
/* *ts: wait_us from now on clock (the clock of the condition variable it
 * is for: CLOCK_REALTIME by default), for pthread_cond_timedwait. */
void cw_deadline_ts(struct timespec *ts, clockid_t clock, int64_t wait_us);

/* Fills buf with n cryptographically random bytes (OpenSSL); aborts the
 * process if the generator fails (always CW_OK otherwise). */
cw_err cw_random(void *buf, size_t n);
/* The same bytes by way of a per-thread pool that cw_random fills a
 * kilobyte at a time (each byte handed out once, and wiped from the pool):
 * for the many small draws of a busy thread (ids, a table's seed). */
void cw_random_pooled(void *buf, size_t n);
/* A new opaque id: prefix + 22 base64url characters (128 random bits);
 * len must hold them and the NUL. */
void cw_new_id(char *out, size_t len, const char *prefix);
/* Writes 2*n lower-case hex digits and a NUL into out (size >= 2n+1). */
void cw_hex(char *out, const unsigned char *in, size_t n);
/* The reverse: exactly 2n hex digits into n bytes; false (out undefined)
 * for any other text. */
bool cw_unhex(const char *hex, unsigned char *out, size_t n);
/* An ASCII letter or digit, whatever the locale (isalnum follows it): the
 * one test of the grammars that allow these (media types, tokens, ids). */
bool cw_ascii_alnum(unsigned char ch);
/* Whether s is one of the strings of the NULL-ended list (the first
 * bytes compared first: most entries differ there, and strcmp is a call;
 * until the fifty-ninth session a copy in gateway/html.c and one in
 * adapters/matrix/mx_map.c, whose HTML walk spent some 2 % of the Matrix
 * transaction reader in it). */
bool cw_in_list(const char *s, const char *const *list);
/* s copied into dst of len bytes (len > 0) and NUL-ended, cut at len - 1
 * bytes as snprintf's "%s" cuts it, without its format's parse (the
 * dispatcher's rows and the XMPP JIDs of a batch, since the fifty-ninth
 * session; since the sixty-fourth the strings of a submit job's items
 * put by msg_input_from_event, submit_put_local and submit_decide, which
 * snprintf copied some twenty times an event, 6-8 % of the Matrix
 * transaction reader's samples with the numbers below; a peer's items'
 * domain and "peer:" names, msg_input_from_peer's, are still snprintf's);
 * the bytes copied. */
size_t cw_copy_cut(char *dst, size_t len, const char *s);
/* v in decimal at p, without a NUL; how many characters (at most 20).
 * snprintf's "%lld" without the format's parse, for the ids a batch
 * prints per row (docs/performance.md, "Fifty-ninth session"): the
 * dispatcher's outcomes (id_array) and the XMPP lookup's rows
 * (xa_deliver), and since the sixty-second session every id of an array
 * literal (cw_pg_ids_add), since the sixty-fourth the submit path's
 * numbers (an item's ts and index, its caller's and peer's ids, a JSON
 * pointer's index).  Declared in dispatcher.h and defined in
 * dispatcher.c until the sixty-first session, though nothing of it is the
 * dispatcher's; its name kept. */
size_t outbox_put_ll(char *p, long long v);

/* PostgreSQL array literals: the text form of a $n::bigint[] or
 * $n::text[] parameter (peers.c's event types, known words written
 * unquoted into a fixed buffer, left as they were).  Until the
 * sixty-second session ten places built
 * their own (the dispatcher's batches, orphans and claim renewal, the
 * policy's users, user walk and rechecks, the Matrix batch's info, the
 * bot's rooms and notices, the XMPP requests shown and audit gaps), each
 * with its own size sum, loop and closing brace, eight of them a printf
 * an id.
 *
 * Ids, one after the other: begun on a buffer of CW_PG_IDS_SIZE(n) bytes
 * for at most n ids (buf NULL: malloc'd here), an id added at a time (a
 * call past those n is refused, and makes the end fail: never a write past
 * the buffer), ended into "{1,2,3}" ("{}" for none).  begin is false when
 * out of memory or n too large for a size_t; end NULL when an add was
 * refused (a buffer of the builder's own freed then, a caller's left
 * the empty string). */
#define CW_PG_ID_MAX 21 /* "-9223372036854775808" and its comma */
#define CW_PG_IDS_SIZE(n) (3 + (size_t)(n) * CW_PG_ID_MAX)
struct cw_pg_ids {
	char *s;
	size_t len, left; /* ids that may still come */
	bool own, refused;
};
bool cw_pg_ids_begin(struct cw_pg_ids *a, char *buf, size_t n);
void cw_pg_ids_add(struct cw_pg_ids *a, long long id);
char *cw_pg_ids_end(struct cw_pg_ids *a);
/* The whole list ids[0..n), or those for which pick[i] is true (pick
 * NULL: all), malloc'd; NULL when out of memory. */
char *cw_pg_ids(const int64_t *ids, size_t n, const bool *pick);
/* The n strings s as a text[] literal, each quoted ('"' and '\\' escaped
 * within: whatever it holds, commas, braces, white space, an empty string
 * or the word NULL, is one element as it is), an s[i] NULL as SQL NULL;
 * malloc'd, NULL when out of memory.  mx_bot.c's pg_array (the bot's
 * one since the sixtieth session) until the sixty-second. */
char *cw_pg_texts(const char *const *s, size_t n);

/* A whole number from outside written as decimal digits and nothing else
 * (no sign, no white space, no exponent), 1 to 18 of them, from lo to hi
 * into *out; canonical: only in the one form the gateway writes, without
 * leading zeros ("0" itself aside).  False (*out unchanged) for NULL and
 * any other text.  strtol alone takes "+1", " 1" and "1x"; the query
 * parameters, path ids and stanza attributes read with it took them until
 * the thirtieth to forty-third sessions. */
bool cw_decimal(const char *s, long long lo, long long hi, bool canonical, long long *out);

/* Base64 (RFC 4648 §4, padded) and base64url (§5, unpadded).  encode
 * writes a NUL-terminated string and returns its length, or 0 if out is too
 * small; decode returns the byte count, or -1 for bad input or no room. */
size_t cw_b64_encode(char *out, size_t outlen, const unsigned char *in, size_t n);
size_t cw_b64url_encode(char *out, size_t outlen, const unsigned char *in, size_t n);
long cw_b64_decode(unsigned char *out, size_t outlen, const char *in);

/* SHA-256 as fetched from the provider once for the process (EVP_sha256()
 * if that fetch failed), for EVP_Digest*() where a failure must be seen:
 * EVP_sha256() fetches the implementation again at every digest. */
struct evp_md_st; /* OpenSSL's EVP_MD */
const struct evp_md_st *cw_sha256_md(void);
/* SHA-256 of n bytes into out[32]. */
void cw_sha256(const void *in, size_t n, unsigned char out[32]);
/* SHA-256 of a, a newline, then b (two parts of a key, without joining
 * them in memory first).  False (out zeroed) when OpenSSL fails (memory). */
bool cw_sha256_pair(const char *a, size_t alen, const char *b, size_t blen, unsigned char out[32]);

/* Constant-time equality of two byte strings of equal length. */
bool cw_ct_equal(const void *a, const void *b, size_t n);

#define CW_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Names the calling thread (at most 15 characters), for top -H, ps -L,
 * gdb and perf. */
void cw_thread_name(const char *name);

/* pthread_create with every signal blocked in the new thread (the main
 * thread takes them with sigwait); true when it started. */
#include <pthread.h>
bool cw_thread_start(pthread_t *t, void *(*fn)(void *), void *arg);

/* The same, detached (nobody joins it: it frees what it holds itself);
 * true when it started. */
bool cw_thread_detached(void *(*fn)(void *), void *arg);

#endif
