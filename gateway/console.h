/* The web console (/admin/): static files compiled into the daemon
 * (tools/embed) and served with a strict Content-Security-Policy, ETags
 * and no-cache revalidation.  The console is a client of /admin/v1 like
 * any other: it holds no privilege of its own. */
#ifndef CW_CONSOLE_H
#define CW_CONSOLE_H

#include <stddef.h>

struct cw_asset {
	const char *name;         /* base name: index.html, console.js, ... */
	const char *content_type;
	const char *body;
	size_t len;
	const char *etag;         /* quoted, strong */
};

extern const struct cw_asset cw_console_assets[];
extern const size_t cw_console_nassets;

struct cw_req;
/* GET /admin: redirect to /admin/. */
void console_redirect(struct cw_req *req, void *ctx);
/* GET /admin/ and /admin/{file}. */
void console_serve(struct cw_req *req, void *ctx);

#endif
