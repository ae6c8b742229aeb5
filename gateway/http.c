/* HTTP front on libmicrohttpd (thread pool on epoll, suspend/resume). */
#include "config.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "utf8.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define REQ_MAX_HEADERS 10
/* The least of a body past its limit read and dropped for its 413. */
#define DISCARD_MIN ((size_t)64 * 1024)

struct cw_http {
	struct MHD_Daemon *d;
	struct cw_http_opts o;
	struct cw_metrics *metrics;
	unsigned port;
	atomic_long in_flight;
	atomic_bool access_log;
	atomic_uint_fast64_t next_id;
	char id_prefix[9];
	pthread_mutex_t mu;
	pthread_cond_t idle;
	bool quiesced;
	/* Under mu, for the stop's drain (cw_http_drain): the sockets taken
	 * from the accept queue at the stop that no worker has adopted yet
	 * (cw_http_quiesce: a worker starts them on its next pass); the
	 * connections it started are on conns, unread (struct conn_state)
	 * until their first request begins. */
	int *handed;
	size_t nhanded, handed_cap;
	/* The stop (main.c): from cw_http_quiesce every answer closes its
	 * connection; once a drain has ended, a request that comes on a
	 * connection still open is answered 503 at once (cw_http_drain). */
	atomic_bool stopping, drained;
	/* Under mu: the open connections (struct conn_state), for the reaper
	 * of request heads too slow (head_reaper) and the drain. */
	pthread_cond_t reaper_cv;
	struct conn_state *conns;
	bool reaper_stop;
	bool reaper_started; /* not with connection_timeout_s 0 */
	pthread_t reaper;
};

struct cw_req {
	struct cw_http *h;
	struct MHD_Connection *conn;
	bool first; /* the connection's first request */
	char *method;
	char *path;
	char *raw_target;
	void *principal;
	void (*principal_free)(void *);
	char id[32];
	int64_t start_us;
	int route;
	struct cw_route_params params;
	/* request body */
	char *body;
	size_t body_len, body_alloc;
	bool too_large;
	size_t discarded; /* bytes of a body past its limit, read and dropped */
	size_t limit;  /* the largest body its route takes */
	size_t expected; /* its Content-Length, or 0 */
	bool path_matched; /* no route, but the path is one's (405, not 404) */
	/* state */
	bool handled;
	bool retry_safe; /* cw_req_set_retry_safe */
	bool suspended;
	/* reply */
	bool replied;
	int status;
	const char *content_type;
	char *rbody;
	size_t rlen;
	void (*rdone)(void *arg); /* called when rbody is gone (cw_req_reply_then) */
	void *rdone_arg;
	json_t *rjson; /* a JSON answer not serialised yet: the HTTP thread does it */
	int nheaders;
	char *headers[REQ_MAX_HEADERS][2];
	struct joined *joined; /* cw_req_header_all's answers */
};

/* A header's lines joined (cw_req_header_all), kept until the request ends. */
struct joined {
	struct joined *next;
	char *name, *value;
};

/* ------------------------------------------------------------------ routing */

/* A segment of a raw path (len bytes at u, up to the next '/'),
 * percent-decoded into out (CW_ROUTE_PARAM_LEN bytes) as libmicrohttpd
 * decodes a path (MHD_http_unescape: "%zz" stays as it is): false when it
 * does not fit, or is no segment a route may take: one that decodes to a
 * NUL byte (it would cut the value short), to bytes that are not UTF-8,
 * or to a dot segment ("." or "..", RFC 3986 3.3, "%2E" included), which
 * is resolved into no other route: it matches none. */
static bool segment_decode(const char *u, size_t len, char out[CW_ROUTE_PARAM_LEN])
{
	char raw[3 * CW_ROUTE_PARAM_LEN]; /* each decoded byte is at most three */
	if (len >= sizeof(raw))
		return false;
	memcpy(raw, u, len);
	raw[len] = '\0';
	size_t n = MHD_http_unescape(raw);
	if (n >= CW_ROUTE_PARAM_LEN || memchr(raw, '\0', n) || !cw_utf8_valid(raw, n) ||
	    strcmp(raw, ".") == 0 || strcmp(raw, "..") == 0)
		return false;
	memcpy(out, raw, n + 1);
	return true;
}

int cw_route_match(const struct cw_route *routes, size_t n, const char *method,
		   const char *path, struct cw_route_params *params, bool *path_matched)
{
	if (path_matched)
		*path_matched = false;
	size_t plen = strcspn(path, "?"); /* the raw target's query is no part of its path */
	for (size_t i = 0; i < n; i++) {
		/* Segment by segment, split at the '/' sent: a "%2F" is part
		 * of its segment (a room alias's, an id's) and never ends
		 * one.  Until the forty-fifth session the path libmicrohttpd
		 * had decoded was matched, and "/messages/x%2Fdecision"
		 * reached the route of "/messages/{id}/decision". */
		const char *p = routes[i].pattern, *u = path, *uend = path + plen;
		/* Not zeroed whole: 1.1 KB for each route tried (the Matrix
		 * transactions' is the 33rd), and only its first n are read. */
		struct cw_route_params tmp;
		tmp.n = 0;
		bool ok;
		for (;;) {
			if (*p != '/' || u == uend || *u != '/') {
				ok = *p == '\0' && u == uend;
				break;
			}
			p++;
			u++;
			const char *slash = memchr(u, '/', (size_t)(uend - u));
			size_t pl = strcspn(p, "/"), ul = (size_t)((slash ? slash : uend) - u);
			bool param = pl >= 2 && p[0] == '{' && p[pl - 1] == '}';
			if (!param && !memchr(u, '%', ul)) {
				/* A literal against a segment with nothing to
				 * decode: the bytes as sent (a route's literal is
				 * plain ASCII and no dot segment, so the answer is
				 * segment_decode's).  Every route tried decoded
				 * the request's first segment again: 3 us of a
				 * Matrix transaction's, the 33rd route. */
				if (ul != pl || memcmp(u, p, pl) != 0) {
					ok = false;
					break;
				}
				p += pl;
				u += ul;
				continue;
			}
			char seg[CW_ROUTE_PARAM_LEN];
			if (!segment_decode(u, ul, seg)) {
				ok = false;
				break;
			}
			if (param) {
				if (seg[0] == '\0' || tmp.n >= CW_ROUTE_PARAMS_MAX) {
					ok = false;
					break;
				}
				tmp.names[tmp.n] = p + 1;
				tmp.name_lens[tmp.n] = pl - 2;
				memcpy(tmp.values[tmp.n], seg, strlen(seg) + 1);
				tmp.n++;
			} else if (strlen(seg) != pl || memcmp(seg, p, pl) != 0) {
				ok = false;
				break;
			}
			p += pl;
			u += ul;
		}
		if (!ok)
			continue;
		if (strcmp(routes[i].method, method) != 0) {
			if (path_matched)
				*path_matched = true;
			continue;
		}
		if (params) {
			params->n = tmp.n;
			for (int k = 0; k < tmp.n; k++) {
				params->names[k] = tmp.names[k];
				params->name_lens[k] = tmp.name_lens[k];
				memcpy(params->values[k], tmp.values[k], strlen(tmp.values[k]) + 1);
			}
		}
		return (int)i;
	}
	return -1;
}

int cw_route_query_index(const char *query, const char *name, size_t len)
{
	int i = 0;
	for (const char *p = query; p && *p; i++) {
		size_t n = strcspn(p, " ");
		if (n == len && memcmp(p, name, len) == 0)
			return i;
		p += n;
		p += *p == ' ';
	}
	return -1;
}

/* A request's query against its route's (query_known). */
struct query_check {
	const char *query;   /* the route's cw_route.query */
	unsigned long seen;  /* bit i: its i-th name was given */
	char bad[80];        /* the detail of a refusal ("" while none) */
	bool not_text;       /* refused as not UTF-8 or with a NUL (bad says so) */
};

/* Whether len bytes at s are UTF-8 without a NUL (percent-decoded: %00
 * and %FF arrive as bytes); NULL is. */
static bool query_text_ok(const char *s, size_t len)
{
	return !s || (!memchr(s, 0, len) && cw_utf8_valid(s, len));
}

/* MHD_KeyValueIteratorN: whether a query argument's name and value are
 * text (query_text_ok), and it is one the route takes and the first of
 * its name.  One walk checks both: until the forty-eighth session a
 * request's arguments were walked twice. */
static enum MHD_Result query_known(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_size,
				   const char *value, size_t value_size)
{
	(void)kind;
	struct query_check *q = cls;
	if (!query_text_ok(key, key_size) || !query_text_ok(value, value_size)) {
		snprintf(q->bad, sizeof(q->bad), "%s", "a query parameter is not valid UTF-8 or holds a NUL byte");
		q->not_text = true;
		return MHD_NO;
	}
	if (!key)
		key_size = 0;
	if (key_size == 0 && !value)
		return MHD_YES; /* an empty stretch ("a=1&&b=2"), no parameter (as URLSearchParams reads it) */
	int i = cw_route_query_index(q->query, key ? key : "", key_size);
	if (i >= 0 && i < (int)(sizeof(q->seen) * 8) && !(q->seen & (1UL << i))) {
		q->seen |= 1UL << i;
		return MHD_YES;
	}
	snprintf(q->bad, sizeof(q->bad), i >= 0 ? "the query parameter '%.*s' is given more than once"
						: "unknown query parameter '%.*s'",
		 (int)(key_size > 40 ? 40 : key_size), key ? key : "");
	return MHD_NO;
}

/* False after answering 400 invalid_query when a query argument is not
 * text (query_text_ok), or the request's query names a
 * parameter the route does not take, or one twice (cw_route.query). */
static bool query_only_known(struct cw_req *r, const struct cw_route *route)
{
	struct query_check q = { .query = route->query };
	MHD_get_connection_values_n(r->conn, MHD_GET_ARGUMENT_KIND, query_known, &q);
	if (!q.bad[0])
		return true;
	char d[256];
	if (q.not_text)
		snprintf(d, sizeof(d), "%s", q.bad);
	else if (route->query)
		snprintf(d, sizeof(d), "%s; this route takes %s", q.bad, route->query);
	else
		snprintf(d, sizeof(d), "%s; this route takes no query parameter", q.bad);
	cw_req_problem(r, 400, "invalid_query", "Invalid query", d);
	return false;
}

/* ------------------------------------------------------------ request API */

const char *cw_req_method(const struct cw_req *r) { return r->method; }
const char *cw_req_path(const struct cw_req *r) { return r->path; }
const char *cw_req_id(const struct cw_req *r) { return r->id; }
const char *cw_req_raw_target(const struct cw_req *r) { return r->raw_target ? r->raw_target : r->path; }
void *cw_req_principal(const struct cw_req *r) { return r->principal; }

void cw_req_set_retry_safe(struct cw_req *r) { r->retry_safe = true; }

bool cw_req_retry_safe(const struct cw_req *r) { return r->retry_safe; }

enum cw_auth cw_req_auth(const struct cw_req *r)
{
	return r->route >= 0 ? r->h->o.routes[r->route].auth : CW_AUTH_NONE;
}

void cw_req_set_principal(struct cw_req *r, void *principal, void (*free_fn)(void *))
{
	if (r->principal && r->principal_free)
		r->principal_free(r->principal);
	r->principal = principal;
	r->principal_free = free_fn;
}

const char *cw_req_param(const struct cw_req *r, const char *name)
{
	size_t len = strlen(name);
	for (int i = 0; i < r->params.n; i++)
		if (r->params.name_lens[i] == len && memcmp(r->params.names[i], name, len) == 0)
			return r->params.values[i];
	return NULL;
}

const char *cw_req_header(struct cw_req *r, const char *name)
{
	return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

struct join_ctx {
	const char *name;
	char *out;      /* NULL until a line is found */
	size_t len;
	bool oom;
};

/* MHD_KeyValueIteratorN: appends a line of the header asked for. */
static enum MHD_Result join_line(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_size,
				 const char *value, size_t value_size)
{
	(void)kind;
	struct join_ctx *j = cls;
	if (!key || strlen(j->name) != key_size || strncasecmp(key, j->name, key_size) != 0)
		return MHD_YES;
	if (!value)
		value_size = 0;
	while (value_size && (*value == ' ' || *value == '\t')) {
		value++;
		value_size--;
	}
	while (value_size && (value[value_size - 1] == ' ' || value[value_size - 1] == '\t'))
		value_size--;
	size_t sep = j->out ? 2 : 0;
	char *p = realloc(j->out, j->len + sep + value_size + 1);
	if (!p) {
		j->oom = true;
		return MHD_NO;
	}
	memcpy(p + j->len, ", ", sep);
	if (value_size) /* an empty line's value may be NULL */
		memcpy(p + j->len + sep, value, value_size);
	j->len += sep + value_size;
	p[j->len] = '\0';
	j->out = p;
	return MHD_YES;
}

const char *cw_req_header_all(struct cw_req *r, const char *name)
{
	for (struct joined *x = r->joined; x; x = x->next)
		if (strcasecmp(x->name, name) == 0)
			return x->value;
	struct join_ctx j = { .name = name };
	MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, join_line, &j);
	if (j.oom || !j.out) {
		/* Out of memory: what was joined would not be the field; absent
		 * refuses a covered one (never the first line alone). */
		free(j.out);
		return NULL;
	}
	struct joined *x = malloc(sizeof(*x));
	char *n = strdup(name);
	if (!x || !n) {
		free(x);
		free(n);
		free(j.out);
		return NULL;
	}
	*x = (struct joined){ r->joined, n, j.out };
	r->joined = x;
	return x->value;
}

struct each_ctx {
	bool (*fn)(void *arg, const char *name, size_t name_len, const char *value, size_t value_len);
	void *arg;
};

static enum MHD_Result each_line(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_size,
				 const char *value, size_t value_size)
{
	(void)kind;
	struct each_ctx *c = cls;
	return c->fn(c->arg, key ? key : "", key ? key_size : 0, value ? value : "", value ? value_size : 0) ? MHD_YES
														 : MHD_NO;
}

void cw_req_headers_each(struct cw_req *r,
			 bool (*fn)(void *arg, const char *name, size_t name_len, const char *value, size_t value_len),
			 void *arg)
{
	struct each_ctx c = { fn, arg };
	MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, each_line, &c);
}

const char *cw_req_query(struct cw_req *r, const char *name)
{
	return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name);
}

const char *cw_req_body(const struct cw_req *r, size_t *len)
{
	if (len)
		*len = r->body_len;
	return r->body ? r->body : "";
}

/* Frees the reply's body, and says so to whoever asked (cw_req_reply_then). */
static void drop_rbody(struct cw_req *r)
{
	free(r->rbody);
	r->rbody = NULL;
	if (r->rdone) {
		void (*done)(void *) = r->rdone;
		r->rdone = NULL;
		done(r->rdone_arg);
	}
}

void cw_req_reply_then(struct cw_req *r, int status, const char *content_type, char *body, size_t len,
		       void (*done)(void *arg), void *arg)
{
	cw_req_reply(r, status, content_type, body, len);
	r->rdone = done;
	r->rdone_arg = arg;
}

/* A body handed to libmicrohttpd with someone to tell when it is freed. */
struct sent_body {
	char *body;
	void (*done)(void *arg);
	void *arg;
};

static void sent_body_free(void *cls)
{
	struct sent_body *b = cls;
	free(b->body);
	b->done(b->arg);
	free(b);
}

/* The index of the header of that name the handler added
 * (cw_req_add_header), or -1. */
static int header_index(const struct cw_req *r, const char *name)
{
	for (int i = 0; i < r->nheaders; i++)
		if (r->headers[i][0] && strcasecmp(r->headers[i][0], name) == 0)
			return i;
	return -1;
}

static bool added_header(const struct cw_req *r, const char *name) { return header_index(r, name) >= 0; }

void cw_req_reply(struct cw_req *r, int status, const char *content_type, char *body, size_t len)
{
	/* A type given replaces one a handler added for an answer it meant
	 * before (a file's, then a problem): never two Content-Type lines. */
	int ct = content_type ? header_index(r, MHD_HTTP_HEADER_CONTENT_TYPE) : -1;
	if (ct >= 0) {
		free(r->headers[ct][0]);
		free(r->headers[ct][1]);
		r->headers[ct][0] = r->headers[ct][1] = NULL;
	}
	drop_rbody(r);
	json_decref(r->rjson);
	r->rjson = NULL;
	r->status = status;
	r->content_type = content_type;
	r->rbody = body;
	r->rlen = body ? len : 0;
	r->replied = true;
}

/* The answer is kept as it is and serialised when it is queued, on the
 * HTTP thread: a store thread that finishes a job (a batch's 256 results)
 * then spends no time on it. */
void cw_req_reply_json(struct cw_req *r, int status, json_t *j)
{
	if (!j) {
		/* A json_pack that failed: for want of memory (a bad argument,
		 * a NULL string, is a bug the tests find, logged here).  Until
		 * the forty-fifth session's review a 500, where every other
		 * answer memory ran out for is cw_req_no_memory's. */
		LOG_KV_LIMITED(CW_LOG_ERROR, "an answer could not be built", "path", r->path);
		cw_req_no_memory(r);
		return;
	}
	cw_req_reply(r, status, "application/json", NULL, 0);
	r->rjson = j;
}

/* With type about:blank the title is the status's phrase, the same for
 * every problem of that status (RFC 9457 4.2.1, 3.1.3); what went wrong
 * is in detail and code.  Until the twenty-first session each caller's
 * summary was the title, and one status had several ("Unauthenticated",
 * "Bad signature"). */
/* A detail repeats outside input, often cut to a length in bytes
 * ("unknown member '%.64s'"), which can end inside a character; JSON
 * strings are UTF-8, and until the twenty-third session such a detail made
 * the answer a bare 500.  Every detail passes here (a problem's, and since
 * the twenty-fourth session a batch item's), so here its bad bytes become
 * U+FFFD. */
json_t *cw_problem_detail(const char *text)
{
	if (cw_utf8_valid(text, strlen(text)))
		return json_string(text);
	char *scrubbed = cw_utf8_scrub(text);
	json_t *j = scrubbed ? json_string(scrubbed) : NULL;
	free(scrubbed);
	return j;
}

void cw_req_problem(struct cw_req *r, int status, const char *code, const char *summary, const char *detail)
{
	json_t *j = json_pack("{s:s, s:s, s:i, s:o, s:s}",
			      "type", "about:blank", "title", MHD_get_reason_phrase_for((unsigned)status),
			      "status", status, "detail", cw_problem_detail(detail ? detail : summary), "code", code);
	char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
	json_decref(j);
	if (!s) { /* until the forty-fifth session a 500 without Retry-After */
		cw_req_no_memory(r);
		return;
	}
	cw_req_reply(r, status, "application/problem+json", s, strlen(s));
}

void cw_req_add_header(struct cw_req *r, const char *name, const char *value)
{
	/* One line a name: a second (a Retry-After set twice on the way to
	 * an answer) replaces the first; until the forty-eighth session both
	 * were sent. */
	int i = header_index(r, name);
	if (i >= 0) {
		free(r->headers[i][1]);
		r->headers[i][1] = strdup(value);
		return;
	}
	if (r->nheaders >= REQ_MAX_HEADERS)
		return;
	r->headers[r->nheaders][0] = strdup(name);
	r->headers[r->nheaders][1] = strdup(value);
	r->nheaders++;
}

void cw_req_suspend(struct cw_req *r)
{
	if (r->suspended) /* a job parked before it started (matrix.c) */
		return;
	r->suspended = true;
	MHD_suspend_connection(r->conn);
}

void cw_req_resume(struct cw_req *r)
{
	MHD_resume_connection(r->conn);
}

bool cw_req_client_gone(struct cw_req *r)
{
	const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
	if (!ci || ci->connect_fd < 0)
		return false;
	struct pollfd fd = { .fd = ci->connect_fd, .events = POLLRDHUP };
	return poll(&fd, 1, 0) == 1 && (fd.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

/* ------------------------------------------------------------------ daemon */

static void free_req(struct cw_req *r)
{
	cw_req_set_principal(r, NULL, NULL);
	free(r->raw_target);
	free(r->method);
	free(r->path);
	free(r->body);
	drop_rbody(r);
	json_decref(r->rjson);
	for (int i = 0; i < r->nheaders; i++) {
		free(r->headers[i][0]);
		free(r->headers[i][1]);
	}
	while (r->joined) {
		struct joined *x = r->joined;
		r->joined = x->next;
		free(x->name);
		free(x->value);
		free(x);
	}
	free(r);
}

/* Whether content_type is a JSON answer's (the API's, a problem's). */
static bool json_answer(const char *content_type)
{
	static const char *const types[] = { "application/json", "application/problem+json" };
	for (size_t i = 0; content_type && i < CW_ARRAY_LEN(types); i++) {
		size_t n = strlen(types[i]);
		if (strncasecmp(content_type, types[i], n) == 0 && (content_type[n] == '\0' || content_type[n] == ';'))
			return true;
	}
	return false;
}

/* Until the forty-fifth session memory running out was answered 500 in
 * some places, 503 without Retry-After in others, and 400 (the client's
 * fault) by POST /v1/rooms. */
void cw_req_no_memory(struct cw_req *r)
{
	static const char doc[] = "{\"type\":\"about:blank\",\"title\":\"Service Unavailable\",\"status\":503,"
				  "\"detail\":\"out of memory; retry\",\"code\":\"unavailable\"}";
	if (!added_header(r, "Retry-After"))
		cw_req_add_header(r, "Retry-After", "1");
	char *s = strdup(doc);
	cw_req_reply(r, 503, "application/problem+json", s, s ? strlen(s) : 0);
}

/* Every answer says nosniff, and a JSON one (never a page) may load
 * nothing and be framed nowhere: a browser led to an API URL shows it as
 * data, whatever its text holds.  A handler's own (the console's pages,
 * a peer's file) stand.  Since the forty-fourth session: before, only the
 * console's pages and the files said so. */
static void add_safety_headers(const struct cw_req *r, struct MHD_Response *resp)
{
	if (!added_header(r, "X-Content-Type-Options"))
		MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
	if (json_answer(r->content_type) && !added_header(r, "Content-Security-Policy"))
		MHD_add_response_header(resp, "Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'");
}

static enum MHD_Result queue_reply(struct cw_req *r)
{
	if (!r->replied)
		cw_req_problem(r, 500, "internal", "Internal error", "the handler set no answer");
	if (r->rjson) {
		json_t *j = r->rjson;
		r->rjson = NULL;
		char *text = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(6));
		json_decref(j);
		if (text)
			cw_req_reply(r, r->status, "application/json", text, strlen(text));
		else /* json_dumps fails for want of memory only */
			cw_req_no_memory(r);
	}
	struct MHD_Response *resp;
	if (r->rdone) {
		struct sent_body *b = malloc(sizeof(*b));
		resp = b ? MHD_create_response_from_buffer_with_free_callback_cls(r->rlen, r->rbody, sent_body_free, b)
			 : NULL;
		if (!resp) {
			free(b);
			return MHD_NO; /* drop_rbody tells, when the request is freed */
		}
		*b = (struct sent_body){ r->rbody, r->rdone, r->rdone_arg };
		r->rdone = NULL;
	} else {
		resp = MHD_create_response_from_buffer(r->rlen, r->rbody, MHD_RESPMEM_MUST_FREE);
		if (!resp)
			return MHD_NO;
	}
	r->rbody = NULL; /* now the response's */
	if (r->content_type && !added_header(r, MHD_HTTP_HEADER_CONTENT_TYPE))
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r->content_type);
	MHD_add_response_header(resp, "X-Request-Id", r->id);
	for (int i = 0; i < r->nheaders; i++)
		if (r->headers[i][0] && r->headers[i][1])
			MHD_add_response_header(resp, r->headers[i][0], r->headers[i][1]);
	add_safety_headers(r, resp);
	/* A kept-alive connection would bring the stop more requests: its
	 * client opens a new one for the next, which is refused, and goes to
	 * another process or waits (until the forty-sixth session the
	 * connection stayed open to the end of the stop, took requests after
	 * the drain, and the stop cut some of them off unanswered). */
	if (atomic_load(&r->h->stopping) && !added_header(r, MHD_HTTP_HEADER_CONNECTION))
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
	enum MHD_Result ret = MHD_queue_response(r->conn, (unsigned)r->status, resp);
	MHD_destroy_response(resp);
	return ret;
}

/* A connection's socket context: whether it has begun a request yet.  The
 * stop's drain waits for such connections too (cw_http_drain): one taken
 * from the accept queue at the stop (cw_http_quiesce) has its request in
 * its socket buffer, unread, and closing it then would reset it.
 *
 * And its request: the one on_uri made, until on_completed ends it.
 * libmicrohttpd 0.9.75 can end a request after on_uri without calling
 * the completion: when the query's parameters overflow its per-connection
 * pool (a few hundred of them, 1-2 KB) it logs a 431 and closes the
 * connection, the request never handled nor completed.  Until the
 * thirtieth session such a request stayed in flight for good (every stop
 * then waited the whole drain timeout) and its memory leaked.  A request
 * still here at the connection's next on_uri or at its close is ended
 * then (end_req, as aborted).  All of one connection's callbacks run on
 * its worker thread. */
struct conn_state {
	bool unread;
	/* Under mu, while unread: its request had come into its socket by the
	 * stop (cw_http_quiesce), by its start after the stop (conn_start) or
	 * by a look of the drain (drain_waits), so the drain waits for it past
	 * the grace, until the request begins or the connection closes.  The
	 * socket's bytes alone do not tell: once the worker has read them they
	 * are in libmicrohttpd's buffer, not the socket, until on_uri; until
	 * the fifty-third session a drain that looked then ended with the
	 * request unanswered (check_http.c
	 * live_drain_waits_for_a_request_not_read_yet, 1 run in a loaded
	 * suite; every run with the worker slowed between the two). */
	bool pending;
	bool asked; /* a request came on it before */
	struct cw_req *req;
	/* On cw_http.conns (under mu), for head_reaper and the stop's
	 * drain; its socket (libmicrohttpd closes it only after the
	 * connection's NOTIFY_CLOSED, which takes it off the list first). */
	struct conn_state *prev, *next;
	int fd;
	atomic_llong since_us; /* its accept, or its last request's end (cw_now_us) */
	atomic_bool in_head;   /* false once the head of its request is whole, until the request ends */
	/* From the head's end until its body is whole (head_reaper's
	 * BODY_MIN_RATE): when that began, and the body's bytes since. */
	atomic_bool in_body;
	atomic_llong body_since_us, body_bytes;
	bool cut;              /* shut down by the reaper (under mu) */
};

/* Whether bytes wait in the socket, unread. */
static bool bytes_waiting(int fd)
{
	int n = 0;
	return fd >= 0 && ioctl(fd, FIONREAD, &n) == 0 && n > 0;
}

static void unread_done(struct cw_http *h, struct conn_state *cs)
{
	if (!cs || !cs->unread)
		return;
	pthread_mutex_lock(&h->mu);
	cs->unread = false;
	pthread_cond_broadcast(&h->idle); /* a drain may wait for it */
	pthread_mutex_unlock(&h->mu);
}

/* The sockets cw_http_quiesce hands to the workers (struct cw_http). */
static bool handed_note(struct cw_http *h, int fd)
{
	bool ok = true;
	pthread_mutex_lock(&h->mu);
	if (h->nhanded == h->handed_cap) {
		size_t cap = h->handed_cap ? 2 * h->handed_cap : 64;
		int *n = realloc(h->handed, cap * sizeof(*n));
		if (n) {
			h->handed = n;
			h->handed_cap = cap;
		} else {
			ok = false; /* out of memory: the rest are not waited for */
		}
	}
	if (ok)
		h->handed[h->nhanded++] = fd;
	pthread_mutex_unlock(&h->mu);
	return ok;
}

/* Under h->mu. */
static void handed_drop(struct cw_http *h, int fd)
{
	for (size_t i = 0; i < h->nhanded; i++)
		if (h->handed[i] == fd) {
			h->handed[i] = h->handed[--h->nhanded];
			return;
		}
}

static void handed_forget(struct cw_http *h, int fd)
{
	pthread_mutex_lock(&h->mu);
	handed_drop(h, fd);
	pthread_mutex_unlock(&h->mu);
}

/* A connection starts: on the list of connections, unread, its head's
 * time running, and no longer a socket handed over at the stop if it was
 * one (both at once, under mu: the drain sees it in one place or the
 * other).  After the stop, pending if its request is in its socket
 * already: the worker starting it has not read it yet. */
static void conn_start(struct cw_http *h, struct MHD_Connection *conn, struct conn_state *cs)
{
	const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
	cs->fd = ci ? ci->connect_fd : -1;
	atomic_init(&cs->since_us, cw_now_us());
	atomic_init(&cs->in_head, true);
	atomic_init(&cs->in_body, false);
	atomic_init(&cs->body_since_us, 0);
	atomic_init(&cs->body_bytes, 0);
	pthread_mutex_lock(&h->mu);
	cs->unread = true;
	cs->pending = atomic_load(&h->stopping) && bytes_waiting(cs->fd);
	handed_drop(h, cs->fd);
	cs->next = h->conns;
	if (h->conns)
		h->conns->prev = cs;
	h->conns = cs;
	pthread_mutex_unlock(&h->mu);
}

static struct conn_state *conn_state_of(struct MHD_Connection *conn)
{
	const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
	return ci ? ci->socket_context : NULL;
}

static void end_req(struct cw_http *h, struct MHD_Connection *conn, struct cw_req *r,
		    enum MHD_RequestTerminationCode toe);

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
			  enum MHD_ConnectionNotificationCode code)
{
	struct cw_http *h = cls;
	if (code == MHD_CONNECTION_NOTIFY_STARTED) {
		struct conn_state *cs = calloc(1, sizeof(*cs)); /* none: not waited for */
		if (cs)
			conn_start(h, conn, cs);
		*socket_context = cs;
	} else if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
		struct conn_state *cs = *socket_context;
		/* Out of the list before libmicrohttpd closes the socket
		 * (after this call): its number may be another's then; no
		 * longer unread (unread_done) in the same critical section,
		 * where until the fifty-second session the mutex was taken
		 * twice in a row for the two. */
		if (cs) {
			pthread_mutex_lock(&h->mu);
			if (cs->prev)
				cs->prev->next = cs->next;
			else
				h->conns = cs->next;
			if (cs->next)
				cs->next->prev = cs->prev;
			if (cs->unread) {
				cs->unread = false;
				pthread_cond_broadcast(&h->idle); /* a drain may wait for it */
			}
			pthread_mutex_unlock(&h->mu);
		}
		if (cs && cs->req)
			end_req(h, conn, cs->req, MHD_REQUEST_TERMINATED_WITH_ERROR);
		free(cs);
		*socket_context = NULL;
	}
}

/* The request target in origin form (path and query, RFC 9112 3.2.1):
 * one in absolute form ("http://host/v1/rooms?x", which a server MUST
 * accept, RFC 9112 3.2.2) without its scheme and authority, an empty path
 * as "/"; any other target as it is.  libmicrohttpd 0.9.75 passes the
 * absolute form on as it came, and until the forty-eighth session such a
 * request matched no route (404).  Malloc'ed; NULL when out of memory. */
static char *origin_form(const char *uri)
{
	size_t s = 0;
	if (strncasecmp(uri, "http", 4) == 0)
		s = (uri[4] == 's' || uri[4] == 'S') ? 5 : 4;
	if (!s || strncmp(uri + s, "://", 3) != 0)
		return strdup(uri);
	const char *path = uri + s + 3;
	path += strcspn(path, "/?#");
	if (*path == '/')
		return strdup(path);
	char *out = malloc(strlen(path) + 2);
	if (out) {
		out[0] = '/';
		strcpy(out + 1, path);
	}
	return out;
}

/* libmicrohttpd calls this once per request, before the headers are read,
 * with the raw request target; what it returns becomes the request's
 * con_cls, so the request object is made here. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
	struct cw_http *h = cls;
	struct conn_state *cs = conn_state_of(conn);
	/* none without its connection's state: out of memory when it
	 * connected, a request not tracked could leak */
	struct cw_req *r = cs ? calloc(1, sizeof(*r)) : NULL;
	/* In flight before it stops being unread: a drain (cw_http_drain),
	 * woken by unread_done, sees it one way or the other.  Until the
	 * forty-ninth session it counted in flight only after, and a drain
	 * woken in between found nothing to wait for (check_http.c
	 * live_drain_waits_for_a_request_not_read_yet failed 1 run in 5). */
	if (r)
		atomic_fetch_add(&h->in_flight, 1);
	unread_done(h, cs);
	if (!r)
		return NULL;
	if (cs->req) /* the connection's request before, never completed */
		end_req(h, conn, cs->req, MHD_REQUEST_TERMINATED_WITH_ERROR);
	r->h = h;
	r->conn = conn;
	r->first = !cs->asked;
	cs->asked = true;
	r->start_us = cw_now_us();
	r->route = -1;
	r->raw_target = origin_form(uri ? uri : "");
	uint_fast64_t n = atomic_fetch_add(&h->next_id, 1);
	snprintf(r->id, sizeof(r->id), "%s%08llx", h->id_prefix, (unsigned long long)n);
	cs->req = r;
	return r;
}

/* What the header lines that frame a request say (framing_line): one
 * walk of them, which also gives on_request the Content-Length and
 * whether a body is announced. */
struct framing {
	unsigned hosts, lengths, codings;
	const char *length;  /* the first Content-Length (NUL-ended, libmicrohttpd's) */
	size_t length_len;
	bool lengths_differ;
	bool chunked;        /* Transfer-Encoding is "chunked", alone */
	bool expect;         /* an Expect line (100-continue: the only expectation) */
};

/* MHD_KeyValueIteratorN: counts Host, Content-Length and Transfer-Encoding,
 * and notes an Expect. */
static enum MHD_Result framing_line(void *cls, enum MHD_ValueKind kind, const char *key, size_t key_size,
				    const char *value, size_t value_size)
{
	(void)kind;
	struct framing *f = cls;
	if (!value)
		value_size = 0;
	if (key_size == 4 && strncasecmp(key, "Host", 4) == 0) {
		f->hosts++;
	} else if (key_size == 14 && strncasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH, 14) == 0) {
		if (f->lengths++ == 0) {
			f->length = value;
			f->length_len = value_size;
		} else if (value_size != f->length_len || memcmp(value, f->length, value_size) != 0) {
			f->lengths_differ = true;
		}
	} else if (key_size == 17 && strncasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING, 17) == 0) {
		f->chunked = f->codings++ == 0 && value_size == 7 && strncasecmp(value, "chunked", 7) == 0;
	} else if (key_size == 6 && strncasecmp(key, MHD_HTTP_HEADER_EXPECT, 6) == 0) {
		f->expect = true;
	}
	return MHD_YES;
}

/* False after answering a request whose header lines do not say where it
 * ends, or that RFC 9112 makes a server refuse: two Content-Length lines
 * that differ (libmicrohttpd 0.9.75 reads the first; what a proxy in
 * front read by another would be a second request, smuggled), a
 * Content-Length with a Transfer-Encoding (RFC 9112 6.3: which one counts
 * is where such a request is smuggled), a Transfer-Encoding in HTTP/1.0
 * (RFC 9112 6.1: its framing is faulty), a transfer coding other than
 * "chunked" alone (501, RFC 9112 6.1: libmicrohttpd waited for the body
 * until the timeout, then closed without an answer), and an HTTP/1.1
 * request without one Host line (400, RFC 9112 3.2: libmicrohttpd took
 * it).  Each closes its connection: what follows on it cannot be told
 * from the body.  Until the forty-eighth session all were taken. */
static bool framing_ok(struct cw_req *r, const char *version, struct framing *f)
{
	*f = (struct framing){ 0 };
	MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, framing_line, f);
	const char *bad = NULL;
	if (f->lengths_differ)
		bad = "the request has Content-Length lines that differ";
	else if (f->codings && f->lengths)
		bad = "the request has both Content-Length and Transfer-Encoding";
	else if (f->codings && strcmp(version, MHD_HTTP_VERSION_1_0) == 0)
		bad = "an HTTP/1.0 request has no Transfer-Encoding";
	else if (strcmp(version, MHD_HTTP_VERSION_1_1) == 0 && f->hosts != 1)
		bad = f->hosts ? "the request has more than one Host line" : "an HTTP/1.1 request needs a Host line";
	else if (!f->codings || f->chunked)
		return true;
	cw_req_add_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
	if (bad)
		cw_req_problem(r, 400, "invalid_request", "Invalid request", bad);
	else
		cw_req_problem(r, 501, "not_implemented", "Not implemented",
			       "the only transfer coding taken is chunked");
	return false;
}

/* Whether pattern is one of the GETs that HEAD must not run (no_head_routes). */
static bool no_head(const struct cw_http *h, const char *pattern)
{
	for (const char *const *p = h->o.no_head_routes; p && *p; p++)
		if (strcmp(*p, pattern) == 0)
			return true;
	return false;
}

/* Appends method to an Allow header's list (dropped if it does not fit). */
static void allow_add(char *allow, size_t size, const char *method)
{
	size_t n = strlen(allow);
	if (n + 2 + strlen(method) < size)
		snprintf(allow + n, size - n, "%s%s", n ? ", " : "", method);
}

/* Whether the body of a route that takes none is empty or {}; false
 * after answering 400.  A member sent to such a route (a name to revoke,
 * "dry_run") was ignored until the twenty-third session, and the change
 * was made as if it had not been sent. */
static bool body_none(struct cw_req *r)
{
	size_t len;
	const char *body = cw_req_body(r, &len);
	if (len == 0)
		return true;
	json_t *j = json_loadb(body, len, JSON_REJECT_DUPLICATES, NULL);
	bool ok = json_is_object(j) && json_object_size(j) == 0;
	if (!ok) {
		char d[160];
		if (json_is_object(j))
			snprintf(d, sizeof(d), "unknown member '%.64s' (this route takes no body)",
				 json_object_iter_key(json_object_iter(j)));
		else
			snprintf(d, sizeof(d), "this route takes no body (none, or {})");
		cw_req_problem(r, 400, "invalid_body", "Invalid body", d);
	}
	json_decref(j);
	return ok;
}

static void dispatch(struct cw_req *r)
{
	struct cw_http *h = r->h;
	if (r->too_large) {
		char detail[96];
		snprintf(detail, sizeof(detail), "the body is larger than %zu bytes", r->limit);
		cw_req_problem(r, 413, "too_large", "Request body too large", detail);
		return;
	}
	bool path_matched = r->path_matched;
	if (r->route < 0) {
		/* A 405 names the methods the path takes (RFC 9110 15.5.6),
		 * the unmatched hook's too (the Matrix adapter's, which answered
		 * without until the forty-sixth session). */
		if (path_matched) {
			char allow[128] = "";
			for (size_t i = 0; i < h->o.nroutes; i++) {
				bool m;
				if (cw_route_match(&h->o.routes[i], 1, "", r->raw_target, NULL, &m) < 0 && m) {
					allow_add(allow, sizeof(allow), h->o.routes[i].method);
					if (strcmp(h->o.routes[i].method, "GET") == 0 && !no_head(h, h->o.routes[i].pattern))
						allow_add(allow, sizeof(allow), "HEAD"); /* taken as GET */
				}
			}
			cw_req_add_header(r, "Allow", allow);
		}
		if (h->o.unmatched && h->o.unmatched(r, path_matched, h->o.ctx))
			return;
		if (path_matched) {
			cw_req_problem(r, 405, "method_not_allowed", "Method not allowed", "this path does not take that method");
		} else {
			cw_req_problem(r, 404, "not_found", "Not found", "no such endpoint");
		}
		return;
	}
	cw_log_set_request_id(r->id);
	const struct cw_route *route = &h->o.routes[r->route];
	if (route->auth == CW_AUTH_NONE || (h->o.authorize && h->o.authorize(r, route->auth, h->o.ctx))) {
		/* The routes that authenticate here (the peer API, the admin
		 * API) answer problem+json; their handlers take query values
		 * as text for the database, which refuses bytes that are not
		 * UTF-8 (a 500 until the twentieth session: a review's
		 * finding), and a NUL would cut them short.  The Matrix
		 * adapter's routes check their own, with Matrix errors.  And
		 * they take only the parameters their route names, each once
		 * (query_only_known, which checks both). */
		if ((route->auth == CW_AUTH_NONE || route->auth == CW_AUTH_HOMESERVER || query_only_known(r, route)) &&
		    (!route->no_body || body_none(r)))
			route->handler(r, h->o.ctx);
	} else if (!r->replied)
		cw_req_problem(r, 401, "unauthenticated", "Unauthenticated", "credentials are required");
	cw_log_set_request_id(NULL);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
				  const char *method, const char *version, const char *upload_data,
				  size_t *upload_data_size, void **con_cls)
{
	struct cw_http *h = cls;
	struct cw_req *r = *con_cls;
	if (!r)
		return MHD_NO; /* on_uri could not allocate */
	if (!r->method) {
		r->method = strdup(method);
		if (!r->raw_target)
			return MHD_NO;
		/* url, libmicrohttpd's decoded path, keeps the scheme and
		 * authority of a target in absolute form: the path is then the
		 * origin form's, decoded as libmicrohttpd decodes one. */
		if (r->raw_target[0] == '/' && url[0] != '/') {
			r->path = strndup(r->raw_target, strcspn(r->raw_target, "?"));
			if (r->path)
				MHD_http_unescape(r->path);
		} else {
			r->path = strdup(url);
		}
		if (!r->method || !r->path)
			return MHD_NO;
		struct conn_state *cs = conn_state_of(conn);
		if (cs) {
			atomic_store(&cs->body_since_us, cw_now_us());
			atomic_store(&cs->body_bytes, 0);
			atomic_store(&cs->in_body, true);
			atomic_store(&cs->in_head, false);
		}
		struct framing f;
		if (!framing_ok(r, version, &f)) {
			r->handled = true;
			return queue_reply(r);
		}
		/* After the drain the daemon takes no more work on a connection
		 * it answered before (kept alive): what the rest of the stop
		 * would leave unanswered (or cut off when the HTTP front stops)
		 * is refused now, and the client sends it again later or
		 * elsewhere (the body is not read; the connection closes).  A
		 * connection's first request was sent before the stop (the
		 * listening socket is closed since, its backlog taken in):
		 * answered, as before the forty-sixth session's change (which
		 * refused those too when the drain ended before they were read,
		 * test_daemon.py::test_sigterm_answers_the_connections_waiting_to_be_accepted). */
		if (atomic_load(&h->drained) && !r->first) {
			cw_req_add_header(r, "Retry-After", "1");
			cw_req_problem(r, 503, "unavailable", "Service unavailable", "the daemon is stopping");
			r->handled = true;
			return queue_reply(r);
		}
		/* The route is known with the headers: its body limit applies
		 * before the body is read.  It is matched on the target as
		 * sent, url being libmicrohttpd's decoded path (which the
		 * access log shows): cw_route_match. */
		r->route = cw_route_match(h->o.routes, h->o.nroutes, r->method, r->raw_target, &r->params,
					  &r->path_matched);
		/* HEAD, which a server MUST support as it does GET (RFC 9110
		 * 9.1), is the GET of the path (a 405 until the twenty-first
		 * session): its handler answers as to a GET and libmicrohttpd
		 * sends the answer's headers without its body.  The method
		 * stays HEAD: a signature covers the method sent. */
		if (r->route < 0 && strcmp(r->method, "HEAD") == 0) {
			r->route = cw_route_match(h->o.routes, h->o.nroutes, "GET", r->raw_target, &r->params,
						  &r->path_matched);
			/* Except where the GET changes state (no_head_routes): a
			 * HEAD there ran the whole pull until the forty-fifth
			 * session, handing events out into an answer without a
			 * body, moving the peer's cursor and waiting up to a
			 * minute.  RFC 9110 9.3.2 makes HEAD the GET without its
			 * content, and 9.2.1 a safe method: 405, as for any method
			 * a path does not take (before the credentials). */
			if (r->route >= 0 && no_head(h, h->o.routes[r->route].pattern)) {
				r->route = -1;
				r->path_matched = true;
			}
		}
		r->limit = h->o.max_body_bytes;
		for (const char *const *p = h->o.large_body_routes; r->route >= 0 && p && *p; p++)
			if (strcmp(*p, h->o.routes[r->route].pattern) == 0 && h->o.max_large_body_bytes > r->limit &&
			    (!h->o.large_body_ok || h->o.large_body_ok(h->o.ctx, r)))
				r->limit = h->o.max_large_body_bytes;
		const char *cl = f.length;
		if (cl) {
			char *end;
			errno = 0;
			unsigned long long n = strtoull(cl, &end, 10);
			if (errno || *end || n > r->limit) {
				/* Answer before reading the body; MHD closes the connection after. */
				r->too_large = true;
				r->handled = true;
				dispatch(r);
				return queue_reply(r);
			}
			r->expected = (size_t)n; /* the buffer, at once and no larger */
		}
		/* A request no route takes (404, 405, the unmatched hook's) is
		 * answered from its headers when its client waits for a 100
		 * Continue (RFC 9110 10.1.1: a server that will refuse SHOULD
		 * NOT send it), or its body is chunked or larger than
		 * DISCARD_MIN: the body is left unread and libmicrohttpd closes
		 * the connection after the answer.  A smaller body is read and
		 * dropped, its connection kept alive for the client's next
		 * request.  Until the forty-ninth session every body was read,
		 * up to the cap (1 MiB), before the 404: work for nothing, and
		 * a client that had asked for 100 Continue was told to send it. */
		if (r->route < 0 && (f.codings || r->expected > DISCARD_MIN || (r->expected > 0 && f.expect))) {
			r->handled = true;
			dispatch(r);
			return queue_reply(r);
		}
		/* Then the credentials, from the headers: a request refused
		 * here never has its body read (no 100 Continue is sent, and
		 * libmicrohttpd closes the connection after the answer).
		 * Until the thirty-second session the body was read and held
		 * first, up to the cap, whoever sent it. */
		enum cw_auth auth = r->route >= 0 ? h->o.routes[r->route].auth : CW_AUTH_NONE;
		if (auth != CW_AUTH_NONE && h->o.authorize_headers) {
			cw_log_set_request_id(r->id);
			bool ok = h->o.authorize_headers(r, auth, h->o.ctx);
			cw_log_set_request_id(NULL);
			if (!ok) {
				if (!r->replied)
					cw_req_problem(r, 401, "unauthenticated", "Unauthenticated",
						       "credentials are required");
				r->handled = true;
				return queue_reply(r);
			}
		}
		return MHD_YES;
	}
	if (*upload_data_size) {
		size_t n = *upload_data_size;
		*upload_data_size = 0;
		struct conn_state *cs = conn_state_of(conn);
		if (cs)
			atomic_fetch_add(&cs->body_bytes, (long long)n);
		if (r->too_large || n > r->limit - r->body_len) {
			/* A body without a Content-Length (chunked) is found too
			 * large as it comes, and libmicrohttpd 0.9.75 queues no
			 * answer before the whole body is read: the rest is read
			 * and dropped for the 413, up to the limit again (64 KiB
			 * at least: DISCARD_MIN).  Past
			 * that the connection is closed without an answer: until
			 * the forty-eighth session a client could stream a chunked
			 * body for ever (each chunk restarts the idle timeout),
			 * holding a connection and a share of a worker. */
			if (r->too_large && (r->discarded += n) > (r->limit > DISCARD_MIN ? r->limit : DISCARD_MIN)) {
				LOG_KV_LIMITED(CW_LOG_WARN, "a body far past its limit: the connection is closed",
					       "request_id", r->id, "path", r->path);
				return MHD_NO;
			}
			r->too_large = true;
			free(r->body);
			r->body = NULL;
			r->body_len = r->body_alloc = 0;
			return MHD_YES;
		}
		if (r->body_len + n + 1 > r->body_alloc) {
			/* Doubling, but never past the limit: a body of 16 MiB
			 * must not take 32. */
			size_t a = r->body_alloc ? r->body_alloc : r->expected ? r->expected + 1 : 1024;
			while (a < r->body_len + n + 1)
				a *= 2;
			if (a > r->limit + 1)
				a = r->limit + 1;
			char *p = realloc(r->body, a);
			if (!p)
				return MHD_NO;
			r->body = p;
			r->body_alloc = a;
		}
		memcpy(r->body + r->body_len, upload_data, n);
		r->body_len += n;
		r->body[r->body_len] = '\0';
		return MHD_YES;
	}
	if (r->suspended) { /* resumed by the thread that finished the work */
		r->suspended = false;
		return queue_reply(r);
	}
	if (r->handled) /* the reply is already queued */
		return MHD_YES;
	r->handled = true;
	struct conn_state *cs = conn_state_of(conn);
	if (cs) /* the body is whole: the handler's time is not the client's */
		atomic_store(&cs->in_body, false);
	dispatch(r);
	if (r->suspended)
		return MHD_YES;
	return queue_reply(r);
}

/* The client's address as text in buf (INET6_ADDRSTRLEN bytes), or "-":
 * the peer of the socket, a reverse proxy's address behind one (no
 * X-Forwarded-For is trusted), no name looked up.  No allocation: it runs
 * for every request the access log records. */
static const char *client_address(struct MHD_Connection *conn, char *buf, socklen_t len)
{
	const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
	const struct sockaddr *sa = ci ? ci->client_addr : NULL;
	const void *a = NULL;
	if (sa && sa->sa_family == AF_INET)
		a = &((const struct sockaddr_in *)(const void *)sa)->sin_addr;
	else if (sa && sa->sa_family == AF_INET6)
		a = &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr;
	return a && inet_ntop(sa->sa_family, a, buf, len) ? buf : "-";
}

/* The longest path the access log writes: the rest of the record must fit
 * in a log line (4 KiB). */
#define ACCESS_LOG_PATH_MAX 1024

/* Counts, logs and frees a request, and takes it out of the in-flight
 * count: at its completion, or when libmicrohttpd ended it without one
 * (struct conn_state). */
static void end_req(struct cw_http *h, struct MHD_Connection *conn, struct cw_req *r,
		    enum MHD_RequestTerminationCode toe)
{
	struct conn_state *cs = conn_state_of(conn);
	if (cs && cs->req == r) {
		cs->req = NULL;
		atomic_store(&cs->since_us, cw_now_us()); /* the next request's head begins */
		atomic_store(&cs->in_body, false);
		atomic_store(&cs->in_head, true);
	}
	int64_t dur = cw_now_us() - r->start_us;
	int status = toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? r->status : 0;
	cw_metrics_http(h->metrics, r->route, status, dur);
	if (atomic_load_explicit(&h->access_log, memory_order_relaxed) && cw_log_enabled(CW_LOG_INFO)) {
		char st[16], ms[32], bytes[32], client[INET6_ADDRSTRLEN];
		snprintf(st, sizeof(st), "%d", status);
		snprintf(ms, sizeof(ms), "%.3f", (double)dur / 1000.0);
		snprintf(bytes, sizeof(bytes), "%zu", r->body_len);
		/* The path last, and cut at ACCESS_LOG_PATH_MAX (at a UTF-8
		 * character's start): a line is cut at 4 KiB, and a long path
		 * must not take the rest with it.  Until the thirty-first
		 * session it came before the status and was cut with the line. */
		char path[ACCESS_LOG_PATH_MAX + 1];
		const char *rp = r->path ? r->path : ""; /* none: libmicrohttpd ended it before a request line */
		size_t pl = strlen(rp);
		bool cut = pl > ACCESS_LOG_PATH_MAX;
		if (cut) {
			pl = ACCESS_LOG_PATH_MAX;
			while (pl > 0 && ((unsigned char)rp[pl] & 0xc0) == 0x80)
				pl--;
		}
		memcpy(path, rp, pl);
		path[pl] = '\0';
		LOG_KV(CW_LOG_INFO, "request", "request_id", r->id,
		       "client", client_address(conn, client, sizeof(client)), "method", r->method,
		       "status", st, "duration_ms", ms, "body_bytes", bytes,
		       "route", r->route >= 0 ? h->o.routes[r->route].pattern : "-",
		       "outcome", toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "ok" : "aborted", "path", path,
		       cut ? "path_truncated" : NULL, "true");
	}
	free_req(r);
	pthread_mutex_lock(&h->mu);
	if (atomic_fetch_sub(&h->in_flight, 1) == 1)
		pthread_cond_broadcast(&h->idle);
	pthread_mutex_unlock(&h->mu);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
			 enum MHD_RequestTerminationCode toe)
{
	struct cw_req *r = *con_cls;
	if (!r)
		return;
	*con_cls = NULL;
	end_req(cls, conn, r, toe);
}

/* What libmicrohttpd logs comes from what clients do (a connection past a
 * limit, a malformed request): at most ten of its messages are written a
 * second, the others counted (LOG_KV_LIMITED: the next one written says
 * how many were left out, or a line of its own once the second has
 * passed), so that a client reconnecting in a loop cannot fill the log
 * (until the twenty-eighth session each was written). */
static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
	(void)cls;
	if (!cw_log_enabled(CW_LOG_WARN))
		return;
	char msg[512];
	vsnprintf(msg, sizeof(msg), fmt, ap);
	size_t n = strlen(msg);
	while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
		msg[--n] = '\0';
	LOG_KV_LIMITED(CW_LOG_WARN, "libmicrohttpd", "detail", msg);
}

/* How long past server.connection_timeout_s a head may take before the
 * reaper closes its connection: libmicrohttpd's own idle timeout closes
 * an idle kept-alive connection first, and the reaper cuts only what
 * kept itself alive by trickling bytes. */
#define HEAD_GRACE_US 1000000LL
/* The least rate a request body is read at, past the head's time: a body
 * has connection_timeout_s (and HEAD_GRACE_US) from the end of its head,
 * and a second more for every BODY_MIN_RATE bytes of it received, as
 * Apache's mod_reqtimeout gives one by default (body=20,MinRate=500). */
#define BODY_MIN_RATE 500LL

/* The reaper of slow request heads and bodies (a thread of the front): a connection
 * whose request head is not whole server.connection_timeout_s (and
 * HEAD_GRACE_US) after it was accepted, or after its last request ended,
 * is shut down, and libmicrohttpd closes it.  libmicrohttpd 0.9.75 has
 * only an idle timeout, which each byte restarts: until the forty-ninth
 * session a client sending a header a byte every few seconds held its
 * connection for ever, and server.connection_limit of them (from as
 * many addresses, or one with no connection_limit_per_client) took
 * every connection the daemon had (slowloris).  A body is read at
 * the client's pace, capped (max_body_bytes), but not slower than
 * BODY_MIN_RATE past the head's time: until the fifty-second session it
 * was not timed at all, and a GET /healthz (no credentials) announcing a
 * body of 1 MiB and sending a byte of it every few seconds held its
 * connection for days, server.connection_limit of them every connection
 * the daemon had, as a slow head did before.  Not started
 * with connection_timeout_s 0 (no timeout: libmicrohttpd's, and so no
 * head's either; the configuration's least is 1 s): until the fiftieth
 * session it woke every half second then to look at nothing. */
static void *head_reaper(void *arg)
{
	cw_thread_name("cw-http-reaper");
	struct cw_http *h = arg;
	int64_t limit = (int64_t)h->o.connection_timeout_s * 1000000 + HEAD_GRACE_US;
	pthread_mutex_lock(&h->mu);
	while (!h->reaper_stop) {
		struct timespec ts;
		cw_deadline_ts(&ts, CLOCK_REALTIME, 500000);
		pthread_cond_timedwait(&h->reaper_cv, &h->mu, &ts);
		int64_t now = cw_now_us();
		unsigned cut = 0, cut_body = 0;
		for (struct conn_state *cs = h->conns; cs && !h->reaper_stop; cs = cs->next) {
			if (cs->cut || cs->fd < 0)
				continue;
			bool head = atomic_load(&cs->in_head) && now - atomic_load(&cs->since_us) > limit;
			bool body = !head && atomic_load(&cs->in_body) &&
				    now - atomic_load(&cs->body_since_us) >
					    limit + atomic_load(&cs->body_bytes) * 1000000LL / BODY_MIN_RATE;
			if (head || body) {
				cs->cut = true;
				shutdown(cs->fd, SHUT_RDWR); /* its worker sees the end and closes it */
				cut += head;
				cut_body += body;
			}
		}
		if (cut || cut_body) { /* the lock let go: connections come and go meanwhile */
			pthread_mutex_unlock(&h->mu);
			char n[16];
			if (cut) {
				snprintf(n, sizeof(n), "%u", cut);
				LOG_KV_LIMITED(CW_LOG_WARN, "a request head not whole within server.connection_timeout_s: "
					       "the connection is closed", "connections", n);
			}
			if (cut_body) {
				snprintf(n, sizeof(n), "%u", cut_body);
				LOG_KV_LIMITED(CW_LOG_WARN, "a request body read slower than 500 bytes a second past "
					       "server.connection_timeout_s: the connection is closed", "connections", n);
			}
			pthread_mutex_lock(&h->mu);
		}
	}
	pthread_mutex_unlock(&h->mu);
	return NULL;
}

cw_err cw_http_start(struct cw_http **out, const struct cw_http_opts *o, cw_errmsg *e)
{
	struct cw_http *h = calloc(1, sizeof(*h));
	if (!h)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	h->o = *o;
	atomic_init(&h->access_log, true);
	atomic_init(&h->stopping, false);
	atomic_init(&h->drained, false);
	pthread_mutex_init(&h->mu, NULL);
	pthread_cond_init(&h->idle, NULL);
	pthread_cond_init(&h->reaper_cv, NULL);
	unsigned char rnd[4];
	if (cw_random(rnd, sizeof(rnd))) {
		free(h);
		return cw_fail(e, CW_EIO, "no randomness for request ids");
	}
	cw_hex(h->id_prefix, rnd, sizeof(rnd));
	h->metrics = cw_metrics_new(o->routes, o->nroutes);
	if (!h->metrics) {
		free(h);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}

	struct addrinfo *ai = NULL;
	if (cw_listen_addrinfo(o->listen_address, o->port, &ai, e)) {
		cw_metrics_free(h->metrics);
		free(h);
		return CW_EINVAL;
	}
	/* poll(), not epoll: libmicrohttpd 0.9.75 (Debian 12) can abort the
	 * process in MHD_quiesce_daemon() on an epoll daemon with a thread
	 * pool.  Quiescing and a worker's own loop both take the listen
	 * socket out of the worker's epoll set, unlocked, and the loser's
	 * EPOLL_CTL_DEL fails with ENOENT, which MHD_PANICs ("Failed to
	 * remove listen FD from epoll set"): a SIGTERM killed the daemon with
	 * SIGABRT about once in a few hundred stops.  With poll() the quiesce
	 * goes through the inter-thread channel, which has no such race.  The
	 * price: each wake-up of a worker walks all its connections (a peer
	 * or homeserver keeps a few; server.connection_limit caps them). */
	unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_ALLOW_SUSPEND_RESUME |
			 MHD_USE_ERROR_LOG;
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	/* The limit per client is libmicrohttpd's count of each address's
	 * connections (one count for the pool), and its refusal: it closes
	 * the connection as it accepts it and logs, in 0.9.75, the words of
	 * the global limit; no callback of ours sees the refused connection.
	 * The listener is TCP (cw_listen_addrinfo: a numeric IPv4 or IPv6
	 * address, no Unix socket), so every client has an address it counts. */
	h->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, h,
				MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
				MHD_OPTION_SOCK_ADDR, ai->ai_addr,
				MHD_OPTION_THREAD_POOL_SIZE, (unsigned)o->threads,
				MHD_OPTION_CONNECTION_LIMIT, (unsigned)o->connection_limit,
				MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)o->connection_limit_per_client,
				MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)o->connection_timeout_s,
				MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
				MHD_OPTION_NOTIFY_CONNECTION, on_connection, h,
				MHD_OPTION_URI_LOG_CALLBACK, on_uri, h,
				MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)1,
				MHD_OPTION_END);
	freeaddrinfo(ai);
	if (!h->d) {
		cw_metrics_free(h->metrics);
		free(h);
		return cw_fail(e, CW_EIO, "cannot listen on %s port %u (in use, or not an address of this host)",
			       o->listen_address, o->port);
	}
	const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
	h->port = info ? info->port : o->port;
	int prc = o->connection_timeout_s ? pthread_create(&h->reaper, NULL, head_reaper, h) : 0;
	h->reaper_started = o->connection_timeout_s && !prc;
	if (prc) {
		MHD_stop_daemon(h->d);
		cw_metrics_free(h->metrics);
		free(h);
		return cw_fail(e, CW_EIO, "cannot start the HTTP front's reaper thread: %s", strerror(prc));
	}
	*out = h;
	return CW_OK;
}

void cw_http_local_url(const char *address, unsigned port, char *out, size_t len)
{
	const char *a = strcmp(address, "0.0.0.0") == 0 ? "127.0.0.1" : strcmp(address, "::") == 0 ? "::1" : address;
	bool v6 = strchr(a, ':') != NULL;
	snprintf(out, len, "http://%s%s%s:%u", v6 ? "[" : "", a, v6 ? "]" : "", port);
}

unsigned cw_http_port(const struct cw_http *h) { return h->port; }
long cw_http_in_flight(const struct cw_http *h) { return atomic_load(&((struct cw_http *)h)->in_flight); }
void cw_http_set_access_log(struct cw_http *h, bool on) { atomic_store(&h->access_log, on); }
struct cw_metrics *cw_http_metrics(struct cw_http *h) { return h->metrics; }

void cw_http_quiesce(struct cw_http *h)
{
	if (h->quiesced)
		return;
	h->quiesced = true;
	/* Stopping, and the requests come by now on connections not read
	 * yet noted (struct conn_state, pending), at once under mu: one a
	 * worker starts meanwhile is seen here or sees the stop itself. */
	pthread_mutex_lock(&h->mu);
	atomic_store(&h->stopping, true);
	for (struct conn_state *cs = h->conns; cs; cs = cs->next)
		if (cs->unread && bytes_waiting(cs->fd))
			cs->pending = true;
	pthread_mutex_unlock(&h->mu);
	MHD_socket s = MHD_quiesce_daemon(h->d);
	if (s == MHD_INVALID_SOCKET)
		return;
	/* The connections the kernel completed and queued on the socket
	 * are clients that connected before the stop: closing the socket
	 * would reset them.  They are taken now and handed to the workers
	 * (which may still take one of them themselves, until their poll()
	 * sees the quiesce), and the drain waits for their requests. */
	int fl = fcntl(s, F_GETFL);
	if (fl >= 0 && !(fl & O_NONBLOCK))
		fcntl(s, F_SETFL, fl | O_NONBLOCK);
	unsigned taken = 0, refused = 0;
	bool handing = true; /* room to note the sockets handed over */
	for (;;) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		int c = accept4(s, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			break; /* EAGAIN: the queue is empty (or out of descriptors) */
		}
		/* The worker it goes to starts it (NOTIFY_STARTED) on its next
		 * pass, which a loaded machine may delay past the drain's first
		 * look: until then the drain knows it by its socket, noted
		 * before a worker can start it.  (One libmicrohttpd drops
		 * before starting it, out of memory, stays noted: its number
		 * reused holds the drain only while bytes wait on it, up to
		 * the drain timeout.) */
		handing = handing && handed_note(h, c);
		/* Closed by libmicrohttpd when refused (past connection_limit,
		 * or its client's connection_limit_per_client). */
		if (MHD_add_connection(h->d, c, (struct sockaddr *)&ss, sl) == MHD_YES) {
			taken++;
		} else {
			refused++;
			handed_forget(h, c);
		}
	}
	if (refused) {
		char t[16], r[16];
		snprintf(t, sizeof(t), "%u", taken);
		snprintf(r, sizeof(r), "%u", refused);
		LOG_KV(CW_LOG_WARN, "connections queued at the stop were refused (server.connection_limit or "
		       "server.connection_limit_per_client)",
		       "taken", t, "refused", r);
	}
	/* Quiescing only asks the workers to drop the socket from their next
	 * poll(); one asleep in poll() holds a reference to it, so close()
	 * alone leaves it listening, and the kernel completing handshakes,
	 * until that worker wakes.  shutdown() stops the listening at once:
	 * a connection after "stopping" is refused, never left unanswered. */
	shutdown(s, SHUT_RDWR);
	close(s);
}

/* How long the drain waits for a connection that has sent nothing yet: one
 * taken from the accept queue at the stop has its request on the way (a
 * round trip at most), while one that connected to send nothing (a
 * browser's preconnect, an idle pool) would hold every stop for the whole
 * drain timeout (a review measured 6.2 s with the harness's 5 s timeout,
 * against well under a second before).  One whose request is in its socket
 * is waited for past it, up to the drain timeout (drain_waits). */
#define UNREAD_GRACE_MS 1000L
/* How often the drain looks again at such sockets once the requests in
 * flight have ended: a worker reads them on its next pass. */
#define UNREAD_POLL_MS 20L

static bool ts_passed(const struct timespec *t)
{
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	return now.tv_sec > t->tv_sec || (now.tv_sec == t->tv_sec && now.tv_nsec >= t->tv_nsec);
}

static const struct timespec *ts_min(const struct timespec *a, const struct timespec *b)
{
	return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec) ? a : b;
}

/* Under h->mu: whether the drain goes on waiting.  For the requests in
 * flight; for every connection with no request begun until the grace ends
 * (its request may be a round trip away); past it, for those whose request
 * has come, which a worker has not begun yet (pending: in their socket, or
 * read into libmicrohttpd's buffer since it was seen there): on a loaded machine
 * the workers may not run for a second and more, and the daemon promises
 * to answer what was sent before the stop (docs/operations.md).  Until the
 * forty-ninth session the drain gave up on them at the grace, and waited
 * for none a worker had not started yet: their requests were cut off
 * (test_daemon.py::test_sigterm_answers_the_connections_waiting_to_be_accepted
 * failed on a loaded CI machine; check_http.c::live_drain_waits_for_a_request_not_read_yet). */
static bool drain_waits(struct cw_http *h, bool grace_over)
{
	if (atomic_load(&h->in_flight) > 0)
		return true;
	bool waits = false;
	for (struct conn_state *cs = h->conns; cs; cs = cs->next) {
		if (!cs->unread)
			continue;
		/* each one looked at: one seen with its request stays waited
		 * for once a worker has read it */
		if (!cs->pending && bytes_waiting(cs->fd))
			cs->pending = true;
		if (!grace_over || cs->pending)
			waits = true;
	}
	if (waits)
		return true;
	for (size_t i = 0; i < h->nhanded; i++)
		if (!grace_over || bytes_waiting(h->handed[i]))
			return true;
	return false;
}

bool cw_http_drain(struct cw_http *h, long timeout_ms)
{
	struct timespec until, unread_until;
	cw_deadline_ts(&until, CLOCK_REALTIME, (int64_t)timeout_ms * 1000);
	cw_deadline_ts(&unread_until, CLOCK_REALTIME,
		       (int64_t)(timeout_ms < UNREAD_GRACE_MS ? timeout_ms : UNREAD_GRACE_MS) * 1000);
	pthread_mutex_lock(&h->mu);
	while (!ts_passed(&until)) {
		bool grace_over = ts_passed(&unread_until);
		if (!drain_waits(h, grace_over))
			break;
		/* woken by a request's end or an unread connection's first
		 * request (or close); else at the grace's end, to look again,
		 * and, with none in flight, soon after for unread requests */
		const struct timespec *t = &until;
		struct timespec soon;
		if (!grace_over) {
			t = &unread_until; /* never after until */
		} else if (atomic_load(&h->in_flight) == 0) {
			cw_deadline_ts(&soon, CLOCK_REALTIME, UNREAD_POLL_MS * 1000);
			t = ts_min(&soon, &until);
		}
		pthread_cond_timedwait(&h->idle, &h->mu, t);
	}
	/* A connection still silent past the grace is not a request left
	 * behind: it is closed with the daemon, as an idle keep-alive is. */
	bool idle = atomic_load(&h->in_flight) == 0;
	atomic_store(&h->drained, true);
	pthread_mutex_unlock(&h->mu);
	return idle;
}

void cw_http_stop(struct cw_http *h)
{
	if (!h)
		return;
	/* The reaper first: no socket is shut down while libmicrohttpd
	 * closes them. */
	pthread_mutex_lock(&h->mu);
	h->reaper_stop = true;
	pthread_cond_signal(&h->reaper_cv);
	pthread_mutex_unlock(&h->mu);
	if (h->reaper_started)
		pthread_join(h->reaper, NULL);
	MHD_stop_daemon(h->d);
	cw_metrics_free(h->metrics);
	pthread_cond_destroy(&h->reaper_cv);
	pthread_cond_destroy(&h->idle);
	pthread_mutex_destroy(&h->mu);
	free(h->handed);
	free(h);
}
