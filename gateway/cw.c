/* The error convention, clocks, randomness and small byte helpers. */
#include "config.h"
#include "cw.h"

#include <pthread.h>
#include <signal.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/rand.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

cw_err cw_fail(cw_errmsg *e, cw_err code, const char *fmt, ...)
{
	if (e) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
		va_end(ap);
	}
	return code;
}

const char *cw_strerror(cw_err code)
{
	switch (code) {
	case CW_OK: return "ok";
	case CW_EINVAL: return "invalid";
	case CW_ENOMEM: return "out of memory";
	case CW_ENOTFOUND: return "not found";
	case CW_ECONFLICT: return "conflict";
	case CW_EUNAVAIL: return "unavailable";
	case CW_ETIMEDOUT: return "timed out";
	case CW_ESHUTDOWN: return "shutting down";
	case CW_EIO: return "i/o error";
	case CW_EINTERNAL: return "internal error";
	case CW_ERETRY: return "transient conflict";
	}
	return "unknown error";
}

int64_t cw_now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void cw_deadline_ts(struct timespec *ts, clockid_t clock, int64_t wait_us)
{
	clock_gettime(clock, ts);
	ts->tv_sec += wait_us / 1000000;
	ts->tv_nsec += (wait_us % 1000000) * 1000;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

int64_t cw_wall_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

cw_err cw_random(void *buf, size_t n)
{
	/* Tokens, keys and ids come from here: if the CSPRNG fails, nothing
	 * made from it can be trusted, so the process stops rather than hand
	 * out a predictable token (as libsodium's randombytes does). */
	if (RAND_bytes(buf, (int)n) != 1) {
		fputs("causewayd: the random number generator failed; stopping\n", stderr);
		abort();
	}
	return CW_OK;
}

/* Ids take their bytes from a per-thread pool filled by cw_random a
 * kilobyte at a time: RAND_bytes costs about a microsecond a call whatever
 * the length, and a batch of 100 events needs 100 ids.  Each byte is used
 * once and wiped when taken.  Since the sixtieth session the writer's seed
 * of a group's key table (merged_send) is taken from it too: a RAND_bytes
 * a group was 0.26-0.5 % of the daemon's samples in tests/bench/single, with
 * OpenSSL's locks on the way, against its 1/128 of a kilobyte now. */
static __thread unsigned char id_pool[1024];
static __thread size_t id_pool_used = sizeof(id_pool);

void cw_random_pooled(void *buf, size_t n)
{
	if (n > sizeof(id_pool)) {
		cw_random(buf, n);
		return;
	}
	if (sizeof(id_pool) - id_pool_used < n) {
		cw_random(id_pool, sizeof(id_pool));
		id_pool_used = 0;
	}
	memcpy(buf, id_pool + id_pool_used, n);
	memset(id_pool + id_pool_used, 0, n);
	id_pool_used += n;
}

void cw_new_id(char *out, size_t len, const char *prefix)
{
	unsigned char raw[16];
	cw_random_pooled(raw, sizeof(raw));
	size_t n = strlen(prefix);
	memcpy(out, prefix, n);
	cw_b64url_encode(out + n, len - n, raw, sizeof(raw));
}

void cw_hex(char *out, const unsigned char *in, size_t n)
{
	static const char digits[] = "0123456789abcdef";
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 15];
	}
	out[2 * n] = '\0';
}

bool cw_unhex(const char *hex, unsigned char *out, size_t n)
{
	/* sscanf's %x alone would take " f", "-1" and "+f" for a byte */
	if (strlen(hex) != 2 * n || strspn(hex, "0123456789abcdefABCDEF") != 2 * n)
		return false;
	for (size_t i = 0; i < n; i++)
		if (sscanf(hex + 2 * i, "%2hhx", &out[i]) != 1)
			return false;
	return true;
}

bool cw_decimal(const char *s, long long lo, long long hi, bool canonical, long long *out)
{
	size_t n = s ? strlen(s) : 0;
	if (n < 1 || n > 18 || strspn(s, "0123456789") != n || (canonical && n > 1 && s[0] == '0'))
		return false;
	long long v = strtoll(s, NULL, 10); /* 18 digits: no overflow */
	if (v < lo || v > hi)
		return false;
	*out = v;
	return true;
}

bool cw_ct_equal(const void *a, const void *b, size_t n)
{
	return CRYPTO_memcmp(a, b, n) == 0;
}

size_t cw_b64_encode(char *out, size_t outlen, const unsigned char *in, size_t n)
{
	size_t need = 4 * ((n + 2) / 3) + 1;
	if (outlen < need || n > (size_t)1 << 30)
		return 0;
	return (size_t)EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

size_t cw_b64url_encode(char *out, size_t outlen, const unsigned char *in, size_t n)
{
	size_t len = cw_b64_encode(out, outlen, in, n);
	while (len && out[len - 1] == '=')
		out[--len] = '\0';
	for (size_t i = 0; i < len; i++)
		out[i] = out[i] == '+' ? '-' : out[i] == '/' ? '_' : out[i];
	return len;
}

bool cw_ascii_alnum(unsigned char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
}

bool cw_in_list(const char *s, const char *const *list)
{
	for (; *list; list++)
		if (s[0] == (*list)[0] && strcmp(s, *list) == 0)
			return true;
	return false;
}

size_t cw_copy_cut(char *dst, size_t len, const char *s)
{
	size_t n = strnlen(s, len - 1);
	memcpy(dst, s, n);
	dst[n] = '\0';
	return n;
}

size_t outbox_put_ll(char *p, long long v)
{
	char digits[20];
	unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
	size_t n = 0, k = 0;
	do {
		digits[n++] = (char)('0' + u % 10);
		u /= 10;
	} while (u);
	if (v < 0)
		p[k++] = '-';
	while (n)
		p[k++] = digits[--n];
	return k;
}

bool cw_pg_ids_begin(struct cw_pg_ids *a, char *buf, size_t n)
{
	*a = (struct cw_pg_ids){ buf, 0, n, !buf, false };
	if (!buf && (n > (SIZE_MAX - 3) / CW_PG_ID_MAX || !(a->s = malloc(CW_PG_IDS_SIZE(n)))))
		return false;
	a->s[a->len++] = '{';
	return true;
}

void cw_pg_ids_add(struct cw_pg_ids *a, long long id)
{
	if (!a->left) {
		a->refused = true;
		return;
	}
	a->left--;
	if (a->len > 1)
		a->s[a->len++] = ',';
	a->len += outbox_put_ll(a->s + a->len, id);
}

char *cw_pg_ids_end(struct cw_pg_ids *a)
{
	if (a->refused) {
		if (a->own)
			free(a->s);
		else
			a->s[0] = '\0'; /* a caller that sends it anyway sends "" (a
					  * malformed literal PostgreSQL refuses), never
					  * an unended "{1,2" read past its end */
		return a->s = NULL;
	}
	a->s[a->len++] = '}';
	a->s[a->len] = '\0';
	return a->s;
}

char *cw_pg_ids(const int64_t *ids, size_t n, const bool *pick)
{
	struct cw_pg_ids a;
	if (!cw_pg_ids_begin(&a, NULL, n))
		return NULL;
	for (size_t i = 0; i < n; i++)
		if (!pick || pick[i])
			cw_pg_ids_add(&a, ids[i]);
	return cw_pg_ids_end(&a);
}

char *cw_pg_texts(const char *const *s, size_t n)
{
	size_t size = 3;
	for (size_t k = 0; k < n; k++) {
		size_t len = s[k] ? strlen(s[k]) : 4;
		if (len > (SIZE_MAX - size - 3) / 2)
			return NULL;
		size += 2 * len + 3;
	}
	char *out = malloc(size), *o = out;
	if (!out)
		return NULL;
	*o++ = '{';
	for (size_t k = 0; k < n; k++) {
		if (k)
			*o++ = ',';
		if (!s[k]) {
			memcpy(o, "NULL", 4);
			o += 4;
			continue;
		}
		*o++ = '"';
		for (const char *c = s[k]; *c; c++) {
			if (*c == '"' || *c == '\\')
				*o++ = '\\';
			*o++ = *c;
		}
		*o++ = '"';
	}
	*o++ = '}';
	*o = '\0';
	return out;
}

long cw_b64_decode(unsigned char *out, size_t outlen, const char *in)
{
	size_t len = strlen(in);
	if (len == 0 || len % 4 != 0 || len > (size_t)1 << 30 || outlen < len / 4 * 3)
		return -1;
	for (size_t i = 0; i < len; i++) {
		char ch = in[i];
		bool ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
			  ch == '+' || ch == '/' || (ch == '=' && i >= len - 2);
		if (!ok || (i == len - 2 && ch == '=' && in[len - 1] != '='))
			return -1;
	}
	int n = EVP_DecodeBlock(out, (const unsigned char *)in, (int)len);
	if (n < 0)
		return -1;
	/* EVP_DecodeBlock counts padding as zero bytes. */
	if (in[len - 1] == '=')
		n--;
	if (in[len - 2] == '=')
		n--;
	return n;
}

/* SHA-256 as fetched from the provider, once for the process.  A digest
 * made with EVP_sha256() (the legacy method) fetches the provider's
 * implementation afresh each time, a lock and a name lookup: 0.2-0.4 us,
 * more than hashing a short input costs, and a peer's request hashes
 * several (its token, its event twice).  NULL if the fetch failed: then
 * EVP_sha256(), as before.  Never freed: it lives as long as the process. */
static EVP_MD *sha256_fetched;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;

static void sha256_fetch(void)
{
	sha256_fetched = EVP_MD_fetch(NULL, "SHA256", NULL);
}

const EVP_MD *cw_sha256_md(void)
{
	pthread_once(&sha256_once, sha256_fetch);
	return sha256_fetched ? sha256_fetched : EVP_sha256();
}

void cw_sha256(const void *in, size_t n, unsigned char out[32])
{
	unsigned int len = 0;
	EVP_Digest(in, n, out, &len, cw_sha256_md(), NULL);
}

bool cw_sha256_pair(const char *a, size_t alen, const char *b, size_t blen, unsigned char out[32])
{
	unsigned int len = 0;
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	bool ok = ctx && EVP_DigestInit_ex(ctx, cw_sha256_md(), NULL) && EVP_DigestUpdate(ctx, a, alen) &&
		  EVP_DigestUpdate(ctx, "\n", 1) && EVP_DigestUpdate(ctx, b, blen) && EVP_DigestFinal_ex(ctx, out, &len);
	if (!ok)
		memset(out, 0, 32);
	EVP_MD_CTX_free(ctx);
	return ok;
}

void cw_thread_name(const char *name)
{
	pthread_setname_np(pthread_self(), name);
}

bool cw_thread_start(pthread_t *t, void *(*fn)(void *), void *arg)
{
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	int rc = pthread_create(t, NULL, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return rc == 0;
}

bool cw_thread_detached(void *(*fn)(void *), void *arg)
{
	pthread_attr_t a;
	pthread_t t;
	if (pthread_attr_init(&a))
		return false;
	pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	int rc = pthread_create(&t, &a, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&a);
	return rc == 0;
}
