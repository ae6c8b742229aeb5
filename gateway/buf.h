/* A growable byte buffer with a cap (like curl's dynbuf): appends past the
 * cap fail and leave the buffer marked, never grow without bound. */
#ifndef CW_BUF_H
#define CW_BUF_H

#include "cw.h"

struct cw_buf {
	char *p;      /* NUL-terminated while len < cap */
	size_t len;
	size_t alloc;
	size_t max;   /* the cap, in bytes of content */
	bool overflow;
};

void cw_buf_init(struct cw_buf *b, size_t max);
cw_err cw_buf_add(struct cw_buf *b, const void *data, size_t len);
cw_err cw_buf_printf(struct cw_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Drops the content past its first len bytes (len <= b->len). */
void cw_buf_cut(struct cw_buf *b, size_t len);
/* A json_dump_callback callback (data: the cw_buf) appending what jansson
 * prints: a value printed straight into the text it goes in. */
int cw_buf_json(const char *text, size_t len, void *data);
/* Hands the content to the caller (free() it); the buffer is reset. */
char *cw_buf_take(struct cw_buf *b, size_t *len);
void cw_buf_free(struct cw_buf *b);

#endif
