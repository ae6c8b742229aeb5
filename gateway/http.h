/* The HTTP front: libmicrohttpd with its thread pool on epoll, a route table,
 * request ids, a body cap, an access log, and suspend/resume so that a
 * handler hands database work to the store instead of blocking a pool
 * thread. */
#ifndef CW_HTTP_H
#define CW_HTTP_H

#include "cw.h"
#include <jansson.h>

struct cw_http;
struct cw_req;
struct cw_metrics;

/* Who may call a route.  The daemon's authorize hook checks it before the
 * handler runs (and sets a problem answer when it refuses). */
enum cw_auth {
	CW_AUTH_NONE = 0,
	CW_AUTH_ADMIN_READ,  /* an admin token (any role) */
	CW_AUTH_ADMIN,       /* an admin token allowed to change things */
	CW_AUTH_PEER,        /* a peer's bearer token and request signature */
	CW_AUTH_HOMESERVER,  /* the Matrix homeserver's hs_token: its refusals are Matrix
				errors, and its query is the adapter's (access_token) */
};

typedef void (*cw_handler)(struct cw_req *req, void *ctx);

struct cw_route {
	const char *method;
	const char *pattern; /* "/v1/rooms/{room}/messages": {name} matches one segment */
	cw_handler handler;
	enum cw_auth auth;
	const char *name;    /* metrics label; defaults to the pattern */
	/* The route takes no body: one with a member (or that is not a
	 * JSON object) is refused with 400 invalid_body before the handler,
	 * which would otherwise ignore it; none, or {}, is taken. */
	bool no_body;
	/* The query parameters the route takes, their names separated by
	 * single spaces; NULL: none.  On a route whose auth is not NONE (the
	 * peer API, the admin API) a request naming any other, or one of them
	 * more than once (a handler reads the first alone), is refused with
	 * 400 invalid_query naming it, before the handler: a misspelt filter
	 * (?actr= for ?actor=) was ignored until the forty-seventh session,
	 * and the whole list answered as if it were the filtered one. */
	const char *query;
};

/* The position of name (len bytes) among the names of a route's query
 * (cw_route.query), or -1 when it is not one of them (or query is NULL). */
int cw_route_query_index(const char *query, const char *name, size_t len);

#define CW_ROUTE_PARAMS_MAX 4
#define CW_ROUTE_PARAM_LEN 256

struct cw_route_params {
	int n;
	const char *names[CW_ROUTE_PARAMS_MAX]; /* point into the pattern (not NUL-ended at '}') */
	size_t name_lens[CW_ROUTE_PARAMS_MAX];
	char values[CW_ROUTE_PARAMS_MAX][CW_ROUTE_PARAM_LEN];
};

/* Pure matcher: the index of the route for method and path, or -1.  When
 * the path matches a route but not its method, *path_matched is set (405
 * rather than 404).  path is the request target as sent (percent-encoded;
 * a '?' ends it), split into segments at its '/' before each segment is
 * decoded: "%2F" is part of a parameter, never a separator, and params
 * hold the decoded values.  A segment that decodes to more than
 * CW_ROUTE_PARAM_LEN-1 bytes, to a NUL byte, to bytes that are not UTF-8,
 * or to "." or ".." (a dot segment, RFC 3986 3.3) matches nothing. */
int cw_route_match(const struct cw_route *routes, size_t n, const char *method,
		   const char *path, struct cw_route_params *params, bool *path_matched);

struct cw_http_opts {
	const char *listen_address;
	unsigned port;             /* 0: any free port */
	unsigned threads;
	unsigned connection_limit;
	/* The most connections open at once from one client address (0: no
	 * limit but connection_limit); libmicrohttpd counts them across the
	 * pool and closes a connection past it as soon as it is accepted. */
	unsigned connection_limit_per_client;
	/* The idle timeout of a connection, and the most a request's head
	 * (request line and header lines) may take as a whole, from the
	 * connection's accept or its last request's end (a second more:
	 * head_reaper in http.c).  0: neither. */
	unsigned connection_timeout_s;
	size_t max_body_bytes;
	/* The routes (by pattern, NULL-terminated) that take bodies up to
	 * max_large_body_bytes instead (a homeserver's transactions); a
	 * value below max_body_bytes counts as that. */
	const char *const *large_body_routes;
	size_t max_large_body_bytes;
	/* Whether this request of those routes may (its credentials, checked
	 * with the headers before the body is read; ctx below); NULL: all. */
	bool (*large_body_ok)(void *ctx, struct cw_req *r);
	/* The GET routes (by pattern, NULL-terminated) whose answer changes
	 * state (a pull hands events out and acknowledges them): HEAD, which
	 * is the GET of every other path, is 405 there, and their Allow does
	 * not list it. */
	const char *const *no_head_routes;
	const struct cw_route *routes;
	size_t nroutes;
	void *ctx;                 /* passed to every handler */
	/* Called with the headers alone, before a byte of the body is read,
	 * for a route whose auth is not NONE: false after setting the answer
	 * (401, 400 …), which is sent at once, the body left unread (and the
	 * connection closed after it).  What needs no body (a bearer token)
	 * is checked here, so that a client without credentials cannot make
	 * the daemon read and hold a body up to the cap.  NULL: none. */
	bool (*authorize_headers)(struct cw_req *r, enum cw_auth auth, void *ctx);
	/* Called before the handler of a route whose auth is not NONE, the
	 * body read; returns false after setting the answer (401, 403 …) to
	 * refuse. */
	bool (*authorize)(struct cw_req *r, enum cw_auth auth, void *ctx);
	/* Optional: a request that matched no route (method_mismatch: the path
	 * exists with other methods); true when it answered it, otherwise the
	 * front answers 404 or 405 as problem+json. */
	bool (*unmatched)(struct cw_req *r, bool method_mismatch, void *ctx);
};

cw_err cw_http_start(struct cw_http **out, const struct cw_http_opts *o, cw_errmsg *e);
/* CW_EINVAL unless cw_http_start can listen on listen_address: a numeric
 * IPv4 or IPv6 address (no name is looked up).  cfg_load checks
 * server.listen_address with it. */
cw_err cw_http_listen_address_check(const char *listen_address, cw_errmsg *e);
/* The socket address of listen_address and port (*ai: freeaddrinfo), or
 * CW_EINVAL: only a numeric address, no name looked up (conf_check.c). */
struct addrinfo;
cw_err cw_listen_addrinfo(const char *listen_address, unsigned port, struct addrinfo **ai, cw_errmsg *e);
/* The port really bound (useful with port 0). */
unsigned cw_http_port(const struct cw_http *h);
/* The URL of a front listening on address and port as this machine
 * reaches it: "http://", an IPv6 address in brackets, a wildcard address
 * (0.0.0.0, ::) as the loopback address; no trailing slash. */
void cw_http_local_url(const char *address, unsigned port, char *out, size_t len);
/* Stops accepting new connections; requests in flight go on, and every
 * answer from now on closes its connection (Connection: close). */
void cw_http_quiesce(struct cw_http *h);
/* Waits until no request is in flight or timeout_ms passed; true if idle.
 * Then the front takes no more requests: one that comes on a connection
 * still open is answered 503 (Retry-After) at once. */
bool cw_http_drain(struct cw_http *h, long timeout_ms);
/* Stops the daemon and frees h. Every suspended request must be resumed. */
void cw_http_stop(struct cw_http *h);
void cw_http_set_access_log(struct cw_http *h, bool on);
/* The HTTP metrics (requests by route and status, latency). */
struct cw_metrics *cw_http_metrics(struct cw_http *h);
/* Requests currently between their first byte and their completion. */
long cw_http_in_flight(const struct cw_http *h);

/* --- the request, for handlers --- */
const char *cw_req_method(const struct cw_req *r);
/* The path libmicrohttpd decoded ("%2F" is a '/' there): for logs and
 * prefixes, not to route on (cw_route_match takes the raw target). */
const char *cw_req_path(const struct cw_req *r);
const char *cw_req_id(const struct cw_req *r);
/* Route parameter by name, or NULL. */
const char *cw_req_param(const struct cw_req *r, const char *name);
/* Header or query argument; valid only inside the handler call. */
const char *cw_req_header(struct cw_req *r, const char *name);
const char *cw_req_query(struct cw_req *r, const char *name);
/* Every line of the header name (any case), each trimmed of spaces and
 * tabs, joined in order with ", " (RFC 9110 §5.3, as RFC 9421 §2.1
 * covers a field), or NULL when absent (or out of memory); kept by the
 * request until it ends.  cw_req_header is the first line alone.
 * libmicrohttpd 0.9.75 has already cut a value at a NUL byte, as it
 * does for cw_req_header. */
const char *cw_req_header_all(struct cw_req *r, const char *name);
/* Calls fn for every header line in order, name and value with their
 * lengths, until it returns false. */
void cw_req_headers_each(struct cw_req *r,
			 bool (*fn)(void *arg, const char *name, size_t name_len, const char *value, size_t value_len),
			 void *arg);
/* The request target exactly as the client sent it (path and query, not
 * decoded), as needed for @target-uri in request signatures; one sent in
 * absolute form ("http://host/path?query") without its scheme and
 * authority, which @target-uri takes from server.public_url. */
const char *cw_req_raw_target(const struct cw_req *r);
/* Who the authorize hook found (a peer, an admin token); owned by the
 * request, freed with free_fn when the request ends. */
void cw_req_set_principal(struct cw_req *r, void *principal, void (*free_fn)(void *));
void *cw_req_principal(const struct cw_req *r);
/* The handler honours the request's idempotency key(s): the same request
 * again is not done twice, which an answer of an unknown outcome may say. */
void cw_req_set_retry_safe(struct cw_req *r);
bool cw_req_retry_safe(const struct cw_req *r);
/* The authentication of the route the request matched (CW_AUTH_NONE
 * when none matched). */
enum cw_auth cw_req_auth(const struct cw_req *r);

/* The whole body (NUL-terminated; may contain NULs, use len). */
const char *cw_req_body(const struct cw_req *r, size_t *len);

/* Sets the reply.  Takes ownership of body (malloc'ed); content_type is
 * kept by pointer (a string literal; NULL: none, or one set with
 * cw_req_add_header). */
void cw_req_reply(struct cw_req *r, int status, const char *content_type, char *body, size_t len);
/* The same, and done(arg) is called once the body is gone: sent, or the
 * connection closed, or replaced by another reply (a large body's bytes
 * can be counted while a slow reader holds them). */
void cw_req_reply_then(struct cw_req *r, int status, const char *content_type, char *body, size_t len,
		       void (*done)(void *arg), void *arg);
/* Sets a JSON reply; steals the reference to j. */
void cw_req_reply_json(struct cw_req *r, int status, json_t *j);
/* application/problem+json (RFC 9457) with a stable code; its title is
 * the status's HTTP phrase, summary the detail when detail is NULL. */
void cw_req_problem(struct cw_req *r, int status, const char *code, const char *summary,
		    const char *detail);
/* The one answer when this process's memory ran out, on /v1 and /admin
 * alike: 503 "unavailable" with Retry-After: 1 (a failure of the daemon's
 * own, never the client's; the request may be sent again), its problem
 * document a fixed text, copied (no JSON is built; without memory for
 * even the copy the 503 goes with an empty body).  cw_req_problem, and
 * cw_req_reply_json given NULL, answer it too when they cannot build
 * their own. */
void cw_req_no_memory(struct cw_req *r);
/* A problem's detail (cw_req_problem's, a batch item's) as a JSON string:
 * a detail may repeat outside input cut to a length in bytes, and its
 * invalid UTF-8 becomes U+FFFD.  NULL only when out of memory. */
json_t *cw_problem_detail(const char *text);
/* An extra response header (copied); at most a few per reply.  One of a
 * name added before (any case) has its value replaced: an answer never
 * carries a name twice (nor Content-Type twice: a reply given a type
 * drops one added). */
void cw_req_add_header(struct cw_req *r, const char *name, const char *value);

/* Suspends the connection: call before handing r to another thread, which
 * sets the reply and then calls cw_req_resume exactly once. */
void cw_req_suspend(struct cw_req *r);
void cw_req_resume(struct cw_req *r);
/* Whether the client of a suspended request closed its side of the
 * connection (a poll of its socket, not waiting): nobody is left to take
 * an answer.  False when it cannot tell. */
bool cw_req_client_gone(struct cw_req *r);

#endif
