/* The error convention, clocks, randomness and small byte helpers. */
#include "config.h"
#include "cw.h"

#include <openssl/crypto.h>
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
	}
	return "unknown error";
}

int64_t cw_now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t cw_wall_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

cw_err cw_random(void *buf, size_t n)
{
	return RAND_bytes(buf, (int)n) == 1 ? CW_OK : CW_EIO;
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

bool cw_ct_equal(const void *a, const void *b, size_t n)
{
	return CRYPTO_memcmp(a, b, n) == 0;
}
