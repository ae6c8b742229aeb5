/* Serving the web console's files (see console.h). */
#include "config.h"
#include "console.h"
#include "http.h"

#include <stdlib.h>
#include <string.h>

/* Only the daemon's own files: no inline script or style, no other origin,
 * no framing, no plugins, forms only back to the daemon. */
#define CONSOLE_CSP                                                                                       \
	"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " \
	"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

void console_redirect(struct cw_req *req, void *ctx)
{
	(void)ctx;
	cw_req_add_header(req, "Location", "/admin/");
	char *body = strdup("");
	cw_req_reply(req, 301, NULL, body, 0);
}

static const struct cw_asset *find(const char *name)
{
	for (size_t i = 0; i < cw_console_nassets; i++)
		if (strcmp(cw_console_assets[i].name, name) == 0)
			return &cw_console_assets[i];
	return NULL;
}

/* Whether an If-None-Match list names the ETag (or is "*"). */
static bool etag_matches(const char *inm, const char *etag)
{
	size_t n = strlen(etag);
	for (const char *p = inm; p && *p;) {
		p += strspn(p, " \t,");
		if (strncmp(p, "W/", 2) == 0)
			p += 2;
		if (*p == '*' || (strncmp(p, etag, n) == 0 && (p[n] == '\0' || p[n] == ',' || p[n] == ' ')))
			return true;
		p = strchr(p, ',');
	}
	return false;
}

void console_serve(struct cw_req *req, void *ctx)
{
	(void)ctx;
	const char *file = cw_req_param(req, "file");
	const struct cw_asset *a = find(file && *file ? file : "index.html");
	if (!a) {
		cw_req_problem(req, 404, "not_found", "Not found", "no such file in the console");
		return;
	}
	cw_req_add_header(req, "Content-Security-Policy", CONSOLE_CSP);
	cw_req_add_header(req, "X-Content-Type-Options", "nosniff");
	cw_req_add_header(req, "Referrer-Policy", "no-referrer");
	cw_req_add_header(req, "X-Frame-Options", "DENY");
	/* Revalidated on every load: a new daemon's console is seen at once. */
	cw_req_add_header(req, "Cache-Control", "no-cache");
	cw_req_add_header(req, "ETag", a->etag);
	const char *inm = cw_req_header(req, "If-None-Match");
	if (inm && etag_matches(inm, a->etag)) {
		cw_req_reply(req, 304, NULL, strdup(""), 0);
		return;
	}
	char *body = malloc(a->len + 1);
	if (!body) {
		cw_req_no_memory(req);
		return;
	}
	memcpy(body, a->body, a->len + 1);
	cw_req_reply(req, 200, a->content_type, body, a->len);
}
