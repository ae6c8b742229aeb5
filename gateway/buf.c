/* Capped growable buffer. */
#include "config.h"
#include "buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void cw_buf_init(struct cw_buf *b, size_t max)
{
	memset(b, 0, sizeof(*b));
	b->max = max;
}

static cw_err reserve(struct cw_buf *b, size_t extra)
{
	if (b->overflow || extra > b->max - b->len) {
		b->overflow = true;
		return CW_EINVAL;
	}
	size_t need = b->len + extra + 1;
	if (need <= b->alloc)
		return CW_OK;
	size_t n = b->alloc ? b->alloc : 256;
	while (n < need)
		n *= 2;
	char *p = realloc(b->p, n);
	if (!p)
		return CW_ENOMEM;
	b->p = p;
	b->alloc = n;
	return CW_OK;
}

cw_err cw_buf_add(struct cw_buf *b, const void *data, size_t len)
{
	cw_err rc = reserve(b, len);
	if (rc)
		return rc;
	memcpy(b->p + b->len, data, len);
	b->len += len;
	b->p[b->len] = '\0';
	return CW_OK;
}

cw_err cw_buf_printf(struct cw_buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return CW_EINVAL;
	cw_err rc = reserve(b, (size_t)n);
	if (rc)
		return rc;
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
	return CW_OK;
}

void cw_buf_cut(struct cw_buf *b, size_t len)
{
	if (len < b->len) {
		b->len = len;
		b->p[len] = '\0';
	}
}

int cw_buf_json(const char *text, size_t len, void *data)
{
	return cw_buf_add(data, text, len) == CW_OK ? 0 : -1;
}

char *cw_buf_take(struct cw_buf *b, size_t *len)
{
	char *p = b->p;
	if (len)
		*len = b->len;
	if (!p)
		p = calloc(1, 1);
	size_t max = b->max;
	cw_buf_init(b, max);
	return p;
}

void cw_buf_free(struct cw_buf *b)
{
	free(b->p);
	cw_buf_init(b, b->max);
}
