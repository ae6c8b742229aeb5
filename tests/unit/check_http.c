/* The router (table-driven from tests/unit/data/route_cases.txt) and the
 * HTTP front on a real libmicrohttpd daemon, driven by libcurl. */
#include "config.h"
#include "app.h"
#include "http.h"
#include "log.h"
#include "media.h"
#include "unit.h"
#include <arpa/inet.h>

#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

static void noop(struct cw_req *r, void *ctx) { (void)r; (void)ctx; }

static const struct cw_route table[] = {
	{ "GET", "/healthz", noop, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/v1/rooms/{room}", noop, CW_AUTH_NONE, NULL, false, NULL },
	{ "POST", "/v1/rooms/{room}/messages", noop, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/v1/messages/{id}", noop, CW_AUTH_NONE, NULL, false, NULL },
	{ "POST", "/v1/rooms", noop, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/v1/rooms/{room}/members/{member}", noop, CW_AUTH_NONE, NULL, false, NULL },
};

START_TEST(routing_table)
{
	FILE *f = fopen(unit_data_path("route_cases.txt"), "r");
	ck_assert_ptr_nonnull(f);
	char line[512];
	int cases = 0;
	while (fgets(line, sizeof(line), f)) {
		if (line[0] == '#' || line[0] == '\n')
			continue;
		line[strcspn(line, "\n")] = '\0';
		char method[16], path[256], rest[256] = "";
		int want;
		int n = sscanf(line, "%15s %255s -> %d %255[^\n]", method, path, &want, rest);
		ck_assert_msg(n >= 3, "bad case line: %s", line);
		struct cw_route_params p;
		bool path_matched;
		int got = cw_route_match(table, CW_ARRAY_LEN(table), method, path, &p, &path_matched);
		if (want == 404 || want == 405) {
			ck_assert_msg(got == -1, "%s: matched route %d", line, got);
			ck_assert_msg(path_matched == (want == 405), "%s: path_matched is %d", line, path_matched);
		} else {
			ck_assert_msg(got == want, "%s: got route %d", line, got);
			int nparams = 0;
			for (char *tok = strtok(rest, " "); tok; tok = strtok(NULL, " ")) {
				char *eq = strchr(tok, '=');
				ck_assert_ptr_nonnull(eq);
				*eq = '\0';
				ck_assert_int_lt(nparams, p.n);
				ck_assert_uint_eq(p.name_lens[nparams], strlen(tok));
				ck_assert_msg(memcmp(p.names[nparams], tok, strlen(tok)) == 0, "%s: param name", line);
				ck_assert_str_eq(p.values[nparams], eq + 1);
				nparams++;
			}
			ck_assert_int_eq(nparams, p.n);
		}
		cases++;
	}
	fclose(f);
	ck_assert_int_ge(cases, 20);
}
END_TEST

START_TEST(overlong_segment_never_matches)
{
	char path[600] = "/v1/messages/";
	memset(path + strlen(path), 'a', 400);
	bool m;
	ck_assert_int_eq(cw_route_match(table, CW_ARRAY_LEN(table), "GET", path, NULL, &m), -1);
	/* The limit is the decoded value's: 255 bytes sent as 765 match, 256 do not. */
	char enc[1024] = "/v1/messages/";
	for (int i = 0; i < CW_ROUTE_PARAM_LEN - 1; i++)
		strcat(enc, "%41");
	struct cw_route_params p;
	ck_assert_int_eq(cw_route_match(table, CW_ARRAY_LEN(table), "GET", enc, &p, &m), 3);
	ck_assert_uint_eq(strlen(p.values[0]), CW_ROUTE_PARAM_LEN - 1);
	ck_assert_int_eq(p.values[0][0], 'A');
	strcat(enc, "%41");
	ck_assert_int_eq(cw_route_match(table, CW_ARRAY_LEN(table), "GET", enc, &p, &m), -1);
	ck_assert(!m);
}
END_TEST

/* ----------------------------------------------------- the live front */

static void h_hello(struct cw_req *r, void *ctx)
{
	cw_req_reply_json(r, 200, json_pack("{s:s}", "hello", cw_req_query(r, "name") ? cw_req_query(r, "name") : "?"));
}

static void h_echo(struct cw_req *r, void *ctx)
{
	size_t len;
	const char *body = cw_req_body(r, &len);
	char *copy = malloc(len + 1);
	memcpy(copy, body, len);
	cw_req_reply(r, 201, "application/octet-stream", copy, len);
}

static void *finish_later(void *arg)
{
	struct cw_req *r = arg;
	struct timespec ts = { 0, 20 * 1000000L };
	nanosleep(&ts, NULL);
	char *s = strdup("done");
	cw_req_reply(r, 202, "text/plain", s, 4);
	cw_req_resume(r);
	return NULL;
}

static void h_async(struct cw_req *r, void *ctx)
{
	cw_req_suspend(r);
	pthread_t t;
	ck_assert_int_eq(pthread_create(&t, NULL, finish_later, r), 0);
	pthread_detach(t);
}

static void h_silent(struct cw_req *r, void *ctx) { (void)r; }

/* The thread of the last request to /whoami. */
static pthread_t whoami;

static void h_whoami(struct cw_req *r, void *ctx)
{
	whoami = pthread_self();
	cw_req_reply_json(r, 200, json_pack("{}"));
}

/* jansson's allocations on this thread fail while json_fail_left > 0, one
 * less each (json_set_alloc_funcs, jansson's own hook): memory running out
 * where the daemon builds or encodes an answer. */
static _Thread_local int json_fail_left;
static void *json_alloc_or_fail(size_t n)
{
	if (json_fail_left > 0) {
		json_fail_left--;
		return NULL;
	}
	return malloc(n);
}

static void h_no_memory(struct cw_req *r, void *ctx) { cw_req_no_memory(r); }

/* A 400 whose problem document cannot be built. */
static void h_problem_no_memory(struct cw_req *r, void *ctx)
{
	json_fail_left = 1000;
	cw_req_problem(r, 400, "invalid_body", "Invalid body", "members must be an array");
	json_fail_left = 0;
}

/* A 200 whose JSON cannot be built: json_pack's allocations fail, and
 * the handler hands cw_req_reply_json the NULL it returns, as every
 * handler that answers cw_req_reply_json(req, 200, json_pack(...)) does. */
static void h_pack_no_memory(struct cw_req *r, void *ctx)
{
	json_fail_left = 1000;
	json_t *j = json_pack("{s:s}", "hello", "ada");
	json_fail_left = 0;
	cw_req_reply_json(r, 200, j);
}

/* A 200 whose JSON cannot be encoded: the HTTP thread encodes it after the
 * handler, and json_dumps's first allocation fails. */
static void h_dumps_no_memory(struct cw_req *r, void *ctx)
{
	cw_req_reply_json(r, 200, json_pack("{s:s}", "hello", "ada"));
	json_fail_left = 1;
}

/* The lines of X-Multi as cw_req_header_all joins them, asked twice. */
static void h_lines(struct cw_req *r, void *ctx)
{
	const char *all = cw_req_header_all(r, "x-MULTI");
	ck_assert_ptr_eq(cw_req_header_all(r, "X-Multi"), all); /* kept, not joined again */
	const char *first = cw_req_header(r, "X-Multi");
	cw_req_reply_json(r, 200, json_pack("{s:s?, s:s?, s:b}", "all", all, "first", first, "absent",
					    cw_req_header_all(r, "X-None") == NULL));
}

static atomic_int handled_bodies, header_checks;

/* Counts the bodies that reached a handler. */
static void h_counted(struct cw_req *r, void *ctx)
{
	atomic_fetch_add(&handled_bodies, 1);
	h_echo(r, ctx);
}

/* The header-time hook: X-Key must be "ok". */
static bool key_in_headers(struct cw_req *r, enum cw_auth auth, void *ctx)
{
	atomic_fetch_add(&header_checks, 1);
	const char *k = cw_req_header(r, "X-Key");
	if (k && strcmp(k, "ok") == 0)
		return true;
	cw_req_problem(r, 401, "unauthenticated", "Unauthenticated", "bad key");
	return false;
}

static bool allow_all(struct cw_req *r, enum cw_auth auth, void *ctx) { return true; }

/* The target and path the front gives the handler. */
static void h_target(struct cw_req *r, void *ctx)
{
	cw_req_reply_json(r, 200, json_pack("{s:s, s:s, s:s?}", "raw", cw_req_raw_target(r), "path",
					    cw_req_path(r), "name", cw_req_query(r, "name")));
}

/* Headers set twice on the way to an answer, and a file's type before a
 * problem replaced the file. */
static void h_doubled(struct cw_req *r, void *ctx)
{
	cw_req_add_header(r, "Retry-After", "1");
	cw_req_add_header(r, "Content-Type", "image/png");
	cw_req_add_header(r, "retry-after", "2");
	cw_req_reply(r, 200, NULL, strdup("png"), 3);
	cw_req_problem(r, 503, "unavailable", "Service unavailable", "later");
}

static const struct cw_route live_routes[] = {
	{ "GET", "/hello", h_hello, CW_AUTH_NONE, NULL, false, NULL },
	{ "POST", "/echo", h_echo, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/async", h_async, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/silent", h_silent, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/whoami", h_whoami, CW_AUTH_NONE, NULL, false, NULL },
	{ "POST", "/bare", h_hello, CW_AUTH_NONE, NULL, true, NULL },
	{ "GET", "/lines", h_lines, CW_AUTH_NONE, NULL, false, NULL },
	{ "POST", "/guarded", h_counted, CW_AUTH_PEER, NULL, false, NULL },
	{ "GET", "/queried", h_counted, CW_AUTH_PEER, NULL, false, "name limit" },
	{ "GET", "/no-memory", h_no_memory, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/problem-no-memory", h_problem_no_memory, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/dumps-no-memory", h_dumps_no_memory, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/pack-no-memory", h_pack_no_memory, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/target/{x}", h_target, CW_AUTH_NONE, NULL, false, NULL },
	{ "GET", "/doubled", h_doubled, CW_AUTH_NONE, NULL, false, NULL },
};

static struct cw_http *live;
static char base[64];
static int live_null = -1;
static unsigned live_threads = 2;

static void live_start(void)
{
	live_null = open("/dev/null", O_WRONLY);
	cw_log_set_fd(live_null); /* access log lines */
	struct cw_http_opts o = {
		.listen_address = "127.0.0.1", .port = 0, .threads = live_threads, .connection_limit = 64,
		.connection_timeout_s = 5, .max_body_bytes = 4096,
		.routes = live_routes, .nroutes = CW_ARRAY_LEN(live_routes),
		.authorize_headers = key_in_headers, .authorize = allow_all,
	};
	cw_errmsg e;
	ck_assert_msg(cw_http_start(&live, &o, &e) == CW_OK, "%s", e.msg);
	snprintf(base, sizeof(base), "http://127.0.0.1:%u", cw_http_port(live));
}

static void live_stop(void)
{
	cw_http_stop(live);
	live = NULL;
	cw_log_set_fd(2);
	close(live_null); /* one per start: 1000 starts below */
	live_null = -1;
}

struct resp {
	long status;
	char body[8192];
	size_t len;
	char ctype[128];
	char request_id[64];
	char allow[64];
	char retry_after[16];
};

static size_t on_body(char *p, size_t sz, size_t n, void *u)
{
	struct resp *r = u;
	size_t len = sz * n;
	if (r->len + len < sizeof(r->body)) {
		memcpy(r->body + r->len, p, len);
		r->len += len;
		r->body[r->len] = '\0';
	}
	return len;
}

static size_t on_header(char *p, size_t sz, size_t n, void *u)
{
	struct resp *r = u;
	size_t len = sz * n;
	char line[256];
	snprintf(line, sizeof(line), "%.*s", (int)(len < 255 ? len : 255), p);
	line[strcspn(line, "\r\n")] = '\0';
	if (strncasecmp(line, "X-Request-Id: ", 14) == 0)
		snprintf(r->request_id, sizeof(r->request_id), "%.63s", line + 14);
	if (strncasecmp(line, "Allow: ", 7) == 0)
		snprintf(r->allow, sizeof(r->allow), "%.63s", line + 7);
	if (strncasecmp(line, "Retry-After: ", 13) == 0)
		snprintf(r->retry_after, sizeof(r->retry_after), "%.15s", line + 13);
	return len;
}

static CURL *easy(const char *method, const char *path, const char *body, long len, bool chunked,
		  struct resp *out, struct curl_slist **hdrs)
{
	char url[256];
	snprintf(url, sizeof(url), "%s%s", base, path);
	CURL *c = curl_easy_init();
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
	curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(c, CURLOPT_HEADERDATA, out);
	curl_easy_setopt(c, CURLOPT_TIMEOUT, 10L);
	*hdrs = curl_slist_append(NULL, "Expect:");
	if (body) {
		curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
		if (chunked)
			*hdrs = curl_slist_append(*hdrs, "Transfer-Encoding: chunked");
		else
			curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, len);
	}
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, *hdrs);
	return c;
}

static struct resp request(const char *method, const char *path, const char *body, long len, bool chunked)
{
	struct resp out;
	memset(&out, 0, sizeof(out));
	struct curl_slist *h;
	CURL *c = easy(method, path, body, len, chunked, &out, &h);
	CURLcode rc = curl_easy_perform(c);
	ck_assert_msg(rc == CURLE_OK, "%s %s: %s", method, path, curl_easy_strerror(rc));
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &out.status);
	char *ct = NULL;
	curl_easy_getinfo(c, CURLINFO_CONTENT_TYPE, &ct);
	snprintf(out.ctype, sizeof(out.ctype), "%s", ct ? ct : "");
	curl_easy_cleanup(c);
	curl_slist_free_all(h);
	return out;
}

/* A connection of its own to the live front. */
static int raw_connect(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	ck_assert_int_ge(fd, 0);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)cw_http_port(live)) };
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	return fd;
}

/* Sends req (len bytes) on a connection of its own and reads until the
 * server closes it (or 5 s pass): the answer's bytes, NUL-ended, in out. */
static size_t raw_exchange(const char *req, size_t len, char *out, size_t size)
{
	int fd = raw_connect();
	ck_assert_int_eq(write(fd, req, len), (ssize_t)len);
	struct timeval tv = { 5, 0 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	size_t n = 0;
	ssize_t k;
	while (n + 1 < size && (k = read(fd, out + n, size - 1 - n)) > 0)
		n += (size_t)k;
	out[n] = '\0';
	close(fd);
	return n;
}

/* How many header lines of the answer in text are named name. */
static int header_lines(const char *text, const char *name)
{
	int count = 0;
	size_t nl = strlen(name);
	for (const char *p = text; p && *p && strncmp(p, "\r\n", 2) != 0;) {
		if (strncasecmp(p, name, nl) == 0 && p[nl] == ':')
			count++;
		p = strstr(p, "\r\n");
		if (p)
			p += 2;
	}
	return count;
}

#define RAW(req, out) raw_exchange(req, sizeof(req) - 1, out, sizeof(out))
/* The same, and the answer's status must be status. */
#define RAW_IS(req, out, status)                                                                   \
	do {                                                                                       \
		RAW(req, out);                                                                     \
		ck_assert_msg(strncmp(out, "HTTP/1.1 " #status " ", 13) == 0, "%s", out);          \
	} while (0)

/* A request target in absolute form, which a server MUST accept (RFC 9112
 * 3.2.2), is routed by its path: until the forty-eighth session it was
 * 404, the scheme and authority taken for part of the path. */
START_TEST(live_absolute_form)
{
	live_start();
	static char out[4096];
	RAW_IS("GET http://gw.example/target/a%2Fb?name=ada HTTP/1.1"
	       "\r\nHost: gw.example\r\nConnection: close\r\n\r\n", out, 200);
	ck_assert_ptr_nonnull(strstr(out, "{\"raw\":\"/target/a%2Fb?name=ada\",\"path\":\"/target/a/b\",\"name\":\"ada\"}"));
	ck_assert_int_eq(header_lines(out, "Content-Type"), 1);
	RAW_IS("GET HTTPS://gw.example:8443/target/x HTTP/1.1"
	       "\r\nHost: gw.example\r\nConnection: close\r\n\r\n", out, 200);
	ck_assert_ptr_nonnull(strstr(out, "{\"raw\":\"/target/x\",\"path\":\"/target/x\",\"name\":null}"));
	/* An empty path is "/"; a scheme not HTTP's stays a path of none. */
	RAW_IS("GET http://gw.example?name=x HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n", out, 404);
	RAW_IS("GET ftp://gw.example/target/x HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n", out, 404);
	live_stop();
}
END_TEST

/* A request whose header lines do not say where it ends, or say it two
 * ways, is refused (problem+json, the connection closed) before a byte of
 * its body is read: two Content-Length lines that differ (libmicrohttpd
 * read the first, and the rest of the body was taken for a second
 * request), Content-Length with chunked (RFC 9112 6.3), a coding other
 * than chunked (501: libmicrohttpd waited for the timeout and closed
 * without an answer), HTTP/1.1 without one Host line (RFC 9112 3.2). */
START_TEST(live_framing_refused)
{
	live_start();
	static char out[4096];
	static const struct {
		const char *req;
		const char *status;
	} cases[] = {
		{ "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 36\r\n\r\n"
		  "abcdeGET /hello HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 400 " },
		{ "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
		  "3\r\nabc\r\n0\r\n\r\n", "HTTP/1.1 400 " },
		{ "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", "HTTP/1.1 501 " },
		{ "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
		  "HTTP/1.1 501 " },
		{ "POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "HTTP/1.1 400 " },
		{ "GET /hello HTTP/1.1\r\n\r\n", "HTTP/1.1 400 " },
		{ "GET /hello HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "HTTP/1.1 400 " },
	};
	for (size_t i = 0; i < CW_ARRAY_LEN(cases); i++) {
		int64_t t0 = cw_now_us();
		raw_exchange(cases[i].req, strlen(cases[i].req), out, sizeof(out));
		ck_assert_msg(cw_now_us() - t0 < 3000000, "case %zu waited for the timeout", i);
		ck_assert_msg(strncmp(out, cases[i].status, strlen(cases[i].status)) == 0, "case %zu: %s", i, out);
		ck_assert_msg(strstr(out, "Content-Type: application/problem+json\r\n"), "case %zu: %s", i, out);
		ck_assert_int_eq(header_lines(out, "Connection"), 1);
		ck_assert_ptr_nonnull(strstr(out, "Connection: close\r\n"));
		/* one answer: nothing after the first was taken for a request */
		const char *cl = strstr(out, "Content-Length: "), *end = strstr(out, "\r\n\r\n");
		ck_assert(cl && end);
		ck_assert_msg(strlen(end + 4) == strtoul(cl + 16, NULL, 10), "case %zu: %s", i, out);
	}
	/* the same lines twice, one Host, chunked alone, HTTP/1.0 without Host: taken */
	RAW_IS("POST /echo HTTP/1.1"
	       "\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc", out, 201);
	RAW_IS("POST /echo HTTP/1.1"
	       "\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n", out, 201);
	RAW_IS("GET /hello HTTP/1.0\r\n\r\n", out, 200);
	live_stop();
}
END_TEST

/* An answer carries each header name once: one set again replaces the
 * first, and a problem's type the type added for the file it replaced
 * (until the forty-eighth session both lines went out). */
START_TEST(live_headers_once)
{
	live_start();
	static char out[4096];
	RAW_IS("GET /doubled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", out, 503);
	ck_assert_msg(header_lines(out, "Retry-After") == 1 && strstr(out, "\r\nRetry-After: 2\r\n"), "%s", out);
	ck_assert_msg(header_lines(out, "Content-Type") == 1 &&
		      strstr(out, "\r\nContent-Type: application/problem+json\r\n"), "%s", out);
	live_stop();
}
END_TEST

/* A chunked body past the limit is read and dropped for its 413 up to the
 * limit again (64 KiB at least), then the connection is closed: until the forty-eighth
 * session it was read to its end, however long, each chunk restarting
 * the idle timeout. */
START_TEST(live_chunked_body_far_past_the_cap)
{
	live_start();
	int fd = raw_connect();
	static const char head[] = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
	ck_assert_int_eq(send(fd, head, sizeof(head) - 1, MSG_NOSIGNAL), (ssize_t)sizeof(head) - 1);
	static char chunk[4096 + 16];
	int hl = snprintf(chunk, sizeof(chunk), "%x\r\n", 4096);
	memset(chunk + hl, 'c', 4096);
	memcpy(chunk + hl + 4096, "\r\n", 2);
	size_t clen = (size_t)hl + 4096 + 2, sent = 0, cap = 256u << 20; /* 256 MiB; the limit is 4 KiB */
	struct timeval tv = { 5, 0 };
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	int err = 0;
	for (size_t off = 0; sent < cap;) { /* off: into the chunk, after a partial send */
		ssize_t k = send(fd, chunk + off, clen - off, MSG_NOSIGNAL);
		if (k < 0) {
			err = errno;
			break;
		}
		sent += (size_t)k;
		off = (off + (size_t)k) % clen;
	}
	close(fd);
	ck_assert_msg(sent < cap, "the whole %zu bytes were taken", sent);
	/* closed by the server, not a front that stopped reading (the send
	 * timing out, EAGAIN, would pass the check above too) */
	ck_assert_msg(err == EPIPE || err == ECONNRESET, "after %zu bytes: %s", sent, strerror(err));
	/* a chunked body a little past it is still answered 413: live_body_cap */
	live_stop();
}
END_TEST

START_TEST(live_sync_and_errors)
{
	live_start();
	struct resp r = request("GET", "/hello?name=ada", NULL, 0, false);
	ck_assert_int_eq(r.status, 200);
	ck_assert_str_eq(r.body, "{\"hello\":\"ada\"}");
	ck_assert_str_eq(r.ctype, "application/json");
	ck_assert_uint_eq(strlen(r.request_id), 16);

	struct resp r2 = request("GET", "/hello", NULL, 0, false);
	ck_assert_str_ne(r.request_id, r2.request_id);

	r = request("GET", "/nowhere", NULL, 0, false);
	ck_assert_int_eq(r.status, 404);
	ck_assert_str_eq(r.ctype, "application/problem+json");
	ck_assert_ptr_nonnull(strstr(r.body, "\"code\":\"not_found\""));
	ck_assert_ptr_nonnull(strstr(r.body, "\"title\":\"Not Found\"")); /* the status phrase (RFC 9457) */

	r = request("DELETE", "/echo", NULL, 0, false);
	ck_assert_int_eq(r.status, 405);
	ck_assert_str_eq(r.allow, "POST");

	r = request("GET", "/silent", NULL, 0, false);
	ck_assert_int_eq(r.status, 500);
	ck_assert_ptr_nonnull(strstr(r.body, "\"code\":\"internal\""));
	live_stop();
}
END_TEST

/* Memory running out is one answer wherever it happens: 503 with
 * Retry-After: 1 and the problem document "unavailable", also when the
 * answer meant (a 400's problem, a 200's JSON) cannot be built or encoded.
 * Until the forty-fifth session those were a 500 "internal" without
 * Retry-After, and handlers answered 500, 503 or even 400 (a 200's JSON
 * that json_pack could not build, until the session's review). */
START_TEST(live_no_memory_is_one_answer)
{
	json_set_alloc_funcs(json_alloc_or_fail, free);
	live_start();
	static const char *const paths[] = { "/no-memory", "/problem-no-memory", "/dumps-no-memory",
					     "/pack-no-memory" };
	for (size_t i = 0; i < CW_ARRAY_LEN(paths); i++) {
		struct resp r = request("GET", paths[i], NULL, 0, false);
		ck_assert_msg(r.status == 503, "%s: %ld %s", paths[i], r.status, r.body);
		ck_assert_str_eq(r.retry_after, "1");
		ck_assert_str_eq(r.ctype, "application/problem+json");
		json_t *j = json_loads(r.body, 0, NULL);
		ck_assert_msg(j != NULL, "%s: %s", paths[i], r.body);
		ck_assert_str_eq(json_string_value(json_object_get(j, "code")), "unavailable");
		ck_assert_str_eq(json_string_value(json_object_get(j, "title")), "Service Unavailable");
		ck_assert_int_eq(json_integer_value(json_object_get(j, "status")), 503);
		ck_assert_str_eq(json_string_value(json_object_get(j, "type")), "about:blank");
		json_decref(j);
	}
	/* and what follows is answered as ever */
	struct resp r = request("GET", "/hello?name=ada", NULL, 0, false);
	ck_assert_int_eq(r.status, 200);
	ck_assert_str_eq(r.body, "{\"hello\":\"ada\"}");
	live_stop();
	json_set_alloc_funcs(malloc, free);
}
END_TEST

START_TEST(live_body_cap)
{
	live_start();
	static char big[10000];
	memset(big, 'b', sizeof(big));
	struct resp r = request("POST", "/echo", big, 4096, false);
	ck_assert_int_eq(r.status, 201);
	ck_assert_uint_eq(r.len, 4096);

	r = request("POST", "/echo", big, 4097, false);
	ck_assert_int_eq(r.status, 413);
	ck_assert_ptr_nonnull(strstr(r.body, "\"code\":\"too_large\""));

	/* Without a Content-Length the cap holds too. */
	big[sizeof(big) - 1] = '\0';
	r = request("POST", "/echo", big, -1, true);
	ck_assert_int_eq(r.status, 413);

	r = request("POST", "/echo", "small", -1, true);
	ck_assert_int_eq(r.status, 201);
	ck_assert_str_eq(r.body, "small");
	live_stop();
}
END_TEST

/* Several lines of one header: trimmed and joined with ", " in order
 * (RFC 9421 §2.1), an empty one too; the first line alone otherwise. */
START_TEST(live_header_lines_joined)
{
	live_start();
	struct resp out;
	memset(&out, 0, sizeof(out));
	struct curl_slist *h;
	CURL *c = easy("GET", "/lines", NULL, 0, false, &out, &h);
	h = curl_slist_append(h, "X-Multi:   one  ");
	h = curl_slist_append(h, "x-multi: two\t");
	h = curl_slist_append(h, "X-Multi;"); /* an empty value */
	h = curl_slist_append(h, "X-Multi: three");
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
	ck_assert_int_eq(curl_easy_perform(c), CURLE_OK);
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &out.status);
	curl_easy_cleanup(c);
	curl_slist_free_all(h);
	ck_assert_int_eq(out.status, 200);
	ck_assert_str_eq(out.body, "{\"all\":\"one, two, , three\",\"first\":\"one  \",\"absent\":true}");
	/* One line: itself, trimmed. */
	memset(&out, 0, sizeof(out));
	c = easy("GET", "/lines", NULL, 0, false, &out, &h);
	h = curl_slist_append(h, "X-Multi: solo ");
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
	ck_assert_int_eq(curl_easy_perform(c), CURLE_OK);
	curl_easy_cleanup(c);
	curl_slist_free_all(h);
	ck_assert_str_eq(out.body, "{\"all\":\"solo\",\"first\":\"solo \",\"absent\":true}");
	live_stop();
}
END_TEST

/* A route with credentials has them checked from the headers: refused,
 * the answer comes before the body is sent (no 100 Continue: libcurl
 * uploads nothing) and no handler sees it; taken, the body is read. */
START_TEST(live_credentials_before_the_body)
{
	live_start();
	atomic_store(&handled_bodies, 0);
	atomic_store(&header_checks, 0);
	static char big[4000];
	memset(big, 'k', sizeof(big));
	for (int good = 0; good < 2; good++) {
		struct resp out;
		memset(&out, 0, sizeof(out));
		struct curl_slist *h;
		CURL *c = easy("POST", "/guarded", big, sizeof(big), false, &out, &h);
		curl_slist_free_all(h);
		h = curl_slist_append(NULL, "Expect: 100-continue");
		h = curl_slist_append(h, good ? "X-Key: ok" : "X-Key: wrong");
		curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
		curl_easy_setopt(c, CURLOPT_EXPECT_100_TIMEOUT_MS, 5000L);
		ck_assert_int_eq(curl_easy_perform(c), CURLE_OK);
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &out.status);
		curl_off_t up = -1;
		curl_easy_getinfo(c, CURLINFO_SIZE_UPLOAD_T, &up);
		curl_easy_cleanup(c);
		curl_slist_free_all(h);
		if (good) {
			ck_assert_int_eq(out.status, 201);
			ck_assert_int_eq(up, (curl_off_t)sizeof(big));
		} else {
			ck_assert_int_eq(out.status, 401);
			ck_assert_ptr_nonnull(strstr(out.body, "\"detail\":\"bad key\""));
			ck_assert_int_eq(up, 0);
		}
	}
	ck_assert_int_eq(atomic_load(&header_checks), 2);
	ck_assert_int_eq(atomic_load(&handled_bodies), 1);
	/* Routes without credentials are not asked about. */
	struct resp r = request("POST", "/echo", "x", 1, false);
	ck_assert_int_eq(r.status, 201);
	ck_assert_int_eq(atomic_load(&header_checks), 2);
	live_stop();
}
END_TEST

/* A route's query names (cw_route.query), by position. */
START_TEST(route_query_names)
{
	ck_assert_int_eq(cw_route_query_index("after limit state", "after", 5), 0);
	ck_assert_int_eq(cw_route_query_index("after limit state", "limit", 5), 1);
	ck_assert_int_eq(cw_route_query_index("after limit state", "state", 5), 2);
	ck_assert_int_eq(cw_route_query_index("after limit state", "stat", 4), -1);
	ck_assert_int_eq(cw_route_query_index("after limit state", "states", 6), -1);
	ck_assert_int_eq(cw_route_query_index("after limit state", "after limit", 11), -1);
	ck_assert_int_eq(cw_route_query_index("after limit state", "", 0), -1);
	ck_assert_int_eq(cw_route_query_index(NULL, "after", 5), -1);
	ck_assert_int_eq(cw_route_query_index("", "", 0), -1);
}
END_TEST

/* An authenticated route takes the query parameters it names, each once;
 * another, or one twice, is 400 invalid_query naming it, and the handler
 * does not run. */
START_TEST(live_query_names_checked)
{
	live_start();
	atomic_store(&handled_bodies, 0);
	static const struct {
		const char *path;
		long status;
		const char *detail;
	} cases[] = {
		{ "/queried", 201, NULL },
		{ "/queried?name=a&limit=2", 201, NULL },
		{ "/queried?limit=2&name", 201, NULL },
		{ "/queried?&&name=a&&&limit=1&", 201, NULL },
		{ "/queried?=", 400, "unknown query parameter ''" },
		{ "/queried?nme=a", 400, "unknown query parameter 'nme'; this route takes name limit" },
		{ "/queried?name=a&name=b", 400, "the query parameter 'name' is given more than once" },
		{ "/queried?Name=a", 400, "unknown query parameter 'Name'" },
		{ "/queried?=a", 400, "unknown query parameter ''" },
		{ "/guarded?x=1", 400, "unknown query parameter 'x'; this route takes no query parameter" },
		/* text is checked in the same walk: a name's or a value's */
		{ "/queried?name=%FF", 400, "\"a query parameter is not valid UTF-8 or holds a NUL byte\"" },
		{ "/queried?limit=1&na%00me=a", 400, "\"a query parameter is not valid UTF-8 or holds a NUL byte\"" },
		{ "/queried?name=a&limit=%C3", 400, "\"a query parameter is not valid UTF-8 or holds a NUL byte\"" },
	};
	int ran = 0;
	for (size_t i = 0; i < CW_ARRAY_LEN(cases); i++) {
		struct resp out;
		memset(&out, 0, sizeof(out));
		struct curl_slist *h;
		bool post = strncmp(cases[i].path, "/guarded", 8) == 0;
		CURL *c = easy(post ? "POST" : "GET", cases[i].path, post ? "{}" : NULL, 2, false, &out, &h);
		h = curl_slist_append(h, "X-Key: ok");
		curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
		ck_assert_int_eq(curl_easy_perform(c), CURLE_OK);
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &out.status);
		curl_easy_cleanup(c);
		curl_slist_free_all(h);
		ck_assert_msg(out.status == cases[i].status, "%s: %ld %s", cases[i].path, out.status, out.body);
		if (cases[i].detail) {
			ck_assert_msg(strstr(out.body, cases[i].detail) && strstr(out.body, "\"code\":\"invalid_query\""),
				      "%s: %s", cases[i].path, out.body);
		} else
			ran++;
	}
	ck_assert_int_eq(atomic_load(&handled_bodies), ran);
	live_stop();
}
END_TEST

/* A route declared without a body takes none or {}; anything else is
 * refused before its handler runs. */
START_TEST(live_route_without_a_body)
{
	live_start();
	static const char *const taken[] = { "", "{}", " { } " };
	for (size_t i = 0; i < CW_ARRAY_LEN(taken); i++) {
		struct resp r = request("POST", "/bare", taken[i], (long)strlen(taken[i]), false);
		ck_assert_msg(r.status == 200, "'%s': %ld", taken[i], r.status);
	}
	static const char *const refused[] = { "{\"name\":\"keep\"}", "[]", "null", "{", "x", "{\"a\":1,\"a\":2}" };
	for (size_t i = 0; i < CW_ARRAY_LEN(refused); i++) {
		struct resp r = request("POST", "/bare", refused[i], (long)strlen(refused[i]), false);
		ck_assert_msg(r.status == 400, "'%s': %ld", refused[i], r.status);
		ck_assert_ptr_nonnull(strstr(r.body, "\"code\":\"invalid_body\""));
		ck_assert_ptr_nonnull(strstr(r.body, "takes no body"));
	}
	struct resp r = request("POST", "/bare", "{\"name\":\"keep\"}", -1, false);
	ck_assert_ptr_nonnull(strstr(r.body, "unknown member 'name'"));
	/* A route with a body is not concerned. */
	r = request("POST", "/echo", "{\"name\":\"keep\"}", -1, false);
	ck_assert_int_eq(r.status, 201);
	live_stop();
}
END_TEST

START_TEST(live_suspend_resume_many)
{
	live_start();
	enum { N = 48 };
	CURLM *m = curl_multi_init();
	static struct resp out[N];
	CURL *c[N];
	struct curl_slist *h[N];
	for (int i = 0; i < N; i++) {
		memset(&out[i], 0, sizeof(out[i]));
		c[i] = easy("GET", "/async", NULL, 0, false, &out[i], &h[i]);
		curl_multi_add_handle(m, c[i]);
	}
	int running = 1;
	while (running) {
		curl_multi_perform(m, &running);
		curl_multi_poll(m, NULL, 0, 100, NULL);
	}
	for (int i = 0; i < N; i++) {
		curl_easy_getinfo(c[i], CURLINFO_RESPONSE_CODE, &out[i].status);
		ck_assert_int_eq(out[i].status, 202);
		ck_assert_str_eq(out[i].body, "done");
		curl_multi_remove_handle(m, c[i]);
		curl_easy_cleanup(c[i]);
		curl_slist_free_all(h[i]);
	}
	curl_multi_cleanup(m);
	ck_assert(cw_http_drain(live, 1000));
	live_stop();
}
END_TEST

static void *slow_client(void *arg)
{
	struct resp *r = arg;
	*r = request("GET", "/async", NULL, 0, false);
	return NULL;
}

START_TEST(live_quiesce_finishes_in_flight)
{
	live_start();
	static struct resp r;
	pthread_t t;
	pthread_create(&t, NULL, slow_client, &r);
	while (cw_http_in_flight(live) == 0)
		usleep(1000);
	cw_http_quiesce(live);
	ck_assert(cw_http_drain(live, 5000));
	pthread_join(t, NULL);
	ck_assert_int_eq(r.status, 202);
	/* No new connection is taken. */
	char url[128];
	snprintf(url, sizeof(url), "%s/hello", base);
	CURL *c = curl_easy_init();
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_TIMEOUT, 2L);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
	struct resp sink;
	memset(&sink, 0, sizeof(sink));
	curl_easy_setopt(c, CURLOPT_WRITEDATA, &sink);
	ck_assert_int_ne(curl_easy_perform(c), CURLE_OK);
	curl_easy_cleanup(c);
	live_stop();
}
END_TEST

/* Holds the thread it interrupts 1.5 s: past the stop's grace for
 * connections that have sent nothing (http.c UNREAD_GRACE_MS). */
static void hold_thread(int sig)
{
	(void)sig;
	struct timespec ts = { 1, 500 * 1000 * 1000 };
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* A request sent before the stop is answered before the drain ends, even
 * when no worker takes it up within the grace for silent connections: here
 * the only worker is held 1.5 s (a loaded machine), with the connections
 * in the accept queue until the stop takes them.  Until the forty-ninth
 * session the drain knew a connection only once a worker had started it,
 * and gave up at the grace on one whose request was still unread: it ended
 * at once here, and the HTTP front's stop then reset the connections.  A
 * connection that sends nothing does not hold the drain. */
START_TEST(live_drain_waits_for_a_request_not_read_yet)
{
	live_threads = 1;
	live_start();
	live_threads = 2;
	ck_assert_int_eq(request("GET", "/whoami", NULL, 0, false).status, 200);
	struct sigaction sa = { .sa_handler = hold_thread }, old;
	sigemptyset(&sa.sa_mask);
	ck_assert_int_eq(sigaction(SIGUSR2, &sa, &old), 0);
	int silent = raw_connect();
	usleep(100 * 1000); /* taken up before the worker is held: the silent one is known */
	ck_assert_int_eq(pthread_kill(whoami, SIGUSR2), 0);
	enum { N = 8 };
	int fd[N];
	static const char req[] = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n";
	for (int i = 0; i < N; i++) {
		fd[i] = raw_connect();
		ck_assert_int_eq(write(fd[i], req, sizeof(req) - 1), (ssize_t)(sizeof(req) - 1));
	}
	cw_http_quiesce(live);
	int64_t t0 = cw_now_us();
	ck_assert(cw_http_drain(live, 20000));
	int64_t took_ms = (cw_now_us() - t0) / 1000;
	/* each answered by now: nothing more to wait for */
	for (int i = 0; i < N; i++) {
		char out[4096];
		ssize_t n = recv(fd[i], out, sizeof(out) - 1, MSG_DONTWAIT);
		out[n > 0 ? n : 0] = '\0';
		ck_assert_msg(strncmp(out, "HTTP/1.1 200 ", 13) == 0, "%d not answered when the drain ended: '%.40s'",
			      i, out);
		close(fd[i]);
	}
	ck_assert_msg(took_ms < 10000, "the silent connection held the drain %lld ms", (long long)took_ms);
	close(silent);
	live_stop();
	sigaction(SIGUSR2, &old, NULL);
}
END_TEST

/* Stopping while clients keep connecting, many times over: no stop may
 * abort the process.  (On epoll, libmicrohttpd 0.9.75's quiesce raced its
 * workers and MHD_PANICked within a few hundred of these.)  It runs in a
 * case of its own with a long timeout: its 1000 stops take about 4 s of a
 * sanitized build on an idle machine, but over 30 s (the live case's
 * timeout, a "Test timeout expired" in CI) with the core shared ten ways,
 * as `make check` beside the black-box tier's workers can share it. */
static volatile int hammering;
static char hammer_url[128];

static void *hammer(void *arg)
{
	(void)arg;
	CURL *c = curl_easy_init();
	struct resp sink;
	while (hammering) {
		memset(&sink, 0, sizeof(sink));
		curl_easy_setopt(c, CURLOPT_URL, hammer_url);
		curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 500L);
		curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
		curl_easy_setopt(c, CURLOPT_WRITEDATA, &sink);
		curl_easy_perform(c);
	}
	curl_easy_cleanup(c);
	return NULL;
}

START_TEST(live_quiesce_under_load_never_aborts)
{
	int stops = 0;
	for (int i = 0; i < 1000; i++) {
		live_start();
		snprintf(hammer_url, sizeof(hammer_url), "%s/hello", base);
		hammering = 1;
		pthread_t t[2];
		for (int k = 0; k < 2; k++)
			pthread_create(&t[k], NULL, hammer, NULL);
		usleep(1000 + (unsigned)(i % 7) * 500);
		cw_http_quiesce(live);
		hammering = 0;
		for (int k = 0; k < 2; k++)
			pthread_join(t[k], NULL);
		/* The clients are gone: what is left ends at once, but a
		 * loaded machine may take a while to run the workers. */
		ck_assert_msg(cw_http_drain(live, 10000), "stop %d: %ld requests still in flight after 10 s", i,
			      cw_http_in_flight(live));
		live_stop();
		stops++;
	}
	ck_assert_int_eq(stops, 1000);
}
END_TEST

START_TEST(local_urls)
{
	static const char *const cases[][2] = {
		{ "127.0.0.1", "http://127.0.0.1:8080" }, { "0.0.0.0", "http://127.0.0.1:8080" },
		{ "::", "http://[::1]:8080" },             { "::1", "http://[::1]:8080" },
		{ "fd00::5", "http://[fd00::5]:8080" },    { "10.1.2.3", "http://10.1.2.3:8080" },
	};
	char url[64];
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		cw_http_local_url(cases[i][0], 8080, url, sizeof(url));
		ck_assert_str_eq(url, cases[i][1]);
	}
}
END_TEST

/* The addresses a fetch of a peer-named URL may connect to (SSRF). */
/* Only a host of the naming peer's domain gets Causeway's signature
 * (media_fetch_peer): the domain itself or a name under it, on a label
 * boundary, case aside. */
START_TEST(media_hosts_in_a_domain)
{
	static const struct {
		const char *url, *domain;
		bool in;
	} cases[] = {
		{ "https://wa.example/f/1", "wa.example", true },
		{ "https://media.wa.example/f/1", "wa.example", true },
		{ "https://a.b.media.wa.example:8443/f/1?x=1", "wa.example", true },
		{ "https://MEDIA.WA.Example/f/1", "wa.example", true },
		{ "https://user:pw@media.wa.example/f", "wa.example", true },
		{ "https://evil-wa.example/f/1", "wa.example", false },
		{ "https://media.evilwa.example/f/1", "wa.example", false },
		{ "https://tg.example/f/1", "wa.example", false },
		{ "https://wa.example.evil.test/f/1", "wa.example", false },
		{ "https://example/f/1", "wa.example", false },
		{ "https://wa.example@evil.test/f/1", "wa.example", false },
		{ "https://evil.test/wa.example", "wa.example", false },
		{ "https://evil.test/?h=media.wa.example", "wa.example", false },
		{ "https://evil.test#.wa.example", "wa.example", false },
		{ "https://127.0.0.1/f/1", "wa.example", false },
		{ "https://media.wa.example/f/1", "", false },
		{ "https://media.wa.example/f/1", NULL, false },
		{ "not a url", "wa.example", false },
		{ NULL, "wa.example", false },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		ck_assert_msg(media_host_in_domain(cases[i].url, cases[i].domain) == cases[i].in, "%s in %s",
			      cases[i].url ? cases[i].url : "(null)", cases[i].domain ? cases[i].domain : "(null)");
}
END_TEST

/* The held-bytes budget every fetch of a file reserves from (peer_media.c,
 * xmpp_vcard.c): server.media_fetches x server.media_max_bytes, never
 * passed, given back as released. */
START_TEST(media_held_budget)
{
	struct cw_config cfg = { .media_fetches = 2, .media_max_bytes = 100 };
	struct cw_app app = { .cfg = &cfg };
	atomic_init(&app.media_held, 0);
	ck_assert(media_held_reserve(&app, 150));
	ck_assert(!media_held_reserve(&app, 51));
	ck_assert(media_held_reserve(&app, 50));
	ck_assert_uint_eq(atomic_load(&app.media_held), 200);
	ck_assert(!media_held_reserve(&app, 1));
	media_held_release(&app, 150);
	ck_assert(!media_held_reserve(&app, 201));
	ck_assert(!media_held_reserve(&app, (size_t)-1)); /* no wrap-around */
	ck_assert(media_held_reserve(&app, 150));
	media_held_release(&app, 200);
	ck_assert_uint_eq(atomic_load(&app.media_held), 0);
}
END_TEST

/* The table of what was refused lately (media_recent): a key noted is
 * there for ttl_ms from its first note, then is noted anew; a full table
 * forgets its oldest key, and never holds more than MEDIA_RECENT_MAX. */
START_TEST(media_recent_is_bounded_and_expires)
{
	static struct media_recent r = MEDIA_RECENT_INIT(1000);
	int64_t t = 5000;
	ck_assert(!media_recent_has(&r, "https://a.example/x", t));
	ck_assert(media_recent_note(&r, "https://a.example/x", t));
	ck_assert(media_recent_has(&r, "https://a.example/x", t));
	ck_assert(!media_recent_has(&r, "https://a.example/y", t));
	/* Within the interval: not the first note, and the time stays the first's. */
	ck_assert(!media_recent_note(&r, "https://a.example/x", t + 600));
	ck_assert(media_recent_has(&r, "https://a.example/x", t + 999));
	ck_assert(!media_recent_has(&r, "https://a.example/x", t + 1000));
	ck_assert(media_recent_note(&r, "https://a.example/x", t + 1000));
	ck_assert(media_recent_has(&r, "https://a.example/x", t + 1999));
	/* Full: each new key takes the oldest one's place, nothing grows. */
	t += 1000;
	char key[64];
	for (int i = 0; i < MEDIA_RECENT_MAX - 1; i++) {
		snprintf(key, sizeof(key), "k%d", i);
		ck_assert(media_recent_note(&r, key, t + 1 + i));
	}
	ck_assert(media_recent_has(&r, "https://a.example/x", t + 300));
	ck_assert(media_recent_has(&r, "k0", t + 300));
	ck_assert(media_recent_note(&r, "one more", t + 300));
	ck_assert(!media_recent_has(&r, "https://a.example/x", t + 300)); /* the oldest, forgotten */
	ck_assert(media_recent_has(&r, "k0", t + 300));
	ck_assert(media_recent_note(&r, "and another", t + 301));
	ck_assert(!media_recent_has(&r, "k0", t + 301));
	ck_assert(media_recent_has(&r, "k1", t + 301));
	ck_assert(media_recent_has(&r, "one more", t + 301));
	int held = 0;
	for (int i = 0; i < MEDIA_RECENT_MAX; i++)
		held += r.e[i].used;
	ck_assert_int_eq(held, MEDIA_RECENT_MAX);
	/* Stale keys make room before fresh ones are forgotten. */
	ck_assert(media_recent_note(&r, "late", t + 1250)); /* k1..k249 (t+2..t+250) are stale by now */
	ck_assert(media_recent_has(&r, "late", t + 1250));
	ck_assert(!media_recent_has(&r, "k249", t + 1250));
	ck_assert(media_recent_has(&r, "k250", t + 1250));
	ck_assert(media_recent_has(&r, "k254", t + 1250));
	ck_assert(media_recent_has(&r, "one more", t + 1250));
	ck_assert(media_recent_has(&r, "and another", t + 1250));
}
END_TEST

/* A URL the peer API takes (https://, visible ASCII) that libcurl cannot
 * read is refused for a fact of its URL (CW_EINVAL with b.refused), not
 * as a store away (CW_EUNAVAIL, tried again). */
START_TEST(media_fetch_refuses_a_url_libcurl_cannot_read)
{
	static const char *const urls[] = { "https://media.wa.example:99999/f/1", "https://[zz]/f/1",
					    "https://a:b@/f/1" };
	struct cw_config cfg = { .media_fetches = 1, .media_max_bytes = 1000 };
	struct cw_app app = { .cfg = &cfg };
	for (size_t i = 0; i < sizeof(urls) / sizeof(urls[0]); i++) {
		struct media_blob b = { .max = 1000 };
		long status = -1;
		cw_errmsg e = { { 0 } };
		ck_assert_int_eq(media_fetch_peer(&app, urls[i], NULL, 2000, &b, &status, &e), CW_EINVAL);
		ck_assert_msg(b.refused && strcmp(b.refused, "not a URL this gateway can fetch") == 0, "%s: %s", urls[i],
			      e.msg);
		ck_assert_int_eq(status, 0);
		media_blob_free(&b);
	}
}
END_TEST

/* A URL with a user or password (a redirect's, or a row's taken before
 * event_parse refused it) is not fetched: libcurl would send them as Basic
 * authentication.  The refusal does not quote the password. */
START_TEST(media_fetch_refuses_a_url_with_a_user_or_password)
{
	static const char *const urls[] = { "https://u:hunter2@127.0.0.1:1/f/1", "https://u@127.0.0.1:1/f/1",
					    "https://:hunter2@127.0.0.1:1/f/1" };
	struct cw_config cfg = { .media_fetches = 1, .media_max_bytes = 1000 };
	struct cw_app app = { .cfg = &cfg };
	for (size_t i = 0; i < sizeof(urls) / sizeof(urls[0]); i++) {
		struct media_blob b = { .max = 1000 };
		long status = -1;
		cw_errmsg e = { { 0 } };
		ck_assert_int_eq(media_fetch_peer(&app, urls[i], NULL, 2000, &b, &status, &e), CW_EINVAL);
		ck_assert_msg(b.refused && strcmp(b.refused, "its URL carries a user or password") == 0, "%s: %s",
			      urls[i], e.msg);
		ck_assert_msg(strstr(e.msg, "127.0.0.1") && !strstr(e.msg, "hunter2"), "%s", e.msg);
		ck_assert_int_eq(status, 0);
		media_blob_free(&b);
	}
}
END_TEST

START_TEST(media_addresses)
{
	static const struct {
		const char *addr;
		bool public_;
	} cases[] = {
		{ "93.184.216.34", true },   { "8.8.8.8", true },         { "127.0.0.1", false },
		{ "127.8.9.10", false },     { "10.1.2.3", false },       { "172.16.0.1", false },
		{ "172.31.255.255", false }, { "172.32.0.1", true },      { "192.168.1.1", false },
		{ "169.254.169.254", false }, { "100.64.0.1", false },    { "100.128.0.1", true },
		{ "0.0.0.0", false },        { "224.0.0.1", false },      { "255.255.255.255", false },
		{ "198.18.0.1", false },     { "192.0.0.8", false },      { "2606:4700::1111", true },
		{ "::1", false },            { "::", false },             { "::ffff:127.0.0.1", false },
		{ "::ffff:8.8.8.8", true },  { "::127.0.0.1", false },    { "fe80::1", false },
		{ "fd00::1", false },        { "fc00::1", false },        { "ff02::1", false },
		{ "64:ff9b::a9fe:a9fe", false }, { "64:ff9b::808:808", true }, { "2001:db8::1", false },
		/* local-use NAT64 (RFC 8215): a translator of the operator's own,
		 * whatever the IPv4 address and where it sits (until the
		 * forty-third session's review these passed as public) */
		{ "64:ff9b:1::7f00:1", false }, { "64:ff9b:1:a00:1:0:808:808", false }, { "64:ff9b:1::808:808", false },
		/* IPv4-translated (SIIT), 6to4, Teredo, discard-only, and the
		 * IPv4 documentation ranges (until the forty-seventh session's
		 * review these passed as public, whatever they carried) */
		{ "::ffff:0:127.0.0.1", false }, { "::ffff:0:a9fe:a9fe", false }, { "::ffff:0:8.8.8.8", true },
		{ "2002:7f00:1::1", false },     { "2002:a00:1::", false },      { "2002:a9fe:a9fe:1::1", false },
		{ "2002:808:808::1", true },     { "2001:0:4136:e378:8000:63bf:3fff:fdd2", false },
		{ "2001:4860:4860::8888", true }, { "100::1", false },
		{ "192.0.2.1", false },          { "198.51.100.7", false },      { "203.0.113.9", false },
		{ "192.88.99.1", false },        { "203.0.114.1", true },        { "3fff:fff::1", false },
		{ "3fff:1000::1", true },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct sockaddr_storage ss = { 0 };
		if (strchr(cases[i].addr, ':')) {
			struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
			a6->sin6_family = AF_INET6;
			ck_assert_int_eq(inet_pton(AF_INET6, cases[i].addr, &a6->sin6_addr), 1);
		} else {
			struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
			a4->sin_family = AF_INET;
			ck_assert_int_eq(inet_pton(AF_INET, cases[i].addr, &a4->sin_addr), 1);
		}
		ck_assert_msg(media_address_public((struct sockaddr *)&ss) == cases[i].public_, "%s", cases[i].addr);
	}
	struct sockaddr unix_sa = { .sa_family = AF_UNIX };
	ck_assert(!media_address_public(&unix_sa));
}
END_TEST

/* A detail that quotes outside input cut inside a character: the bad
 * bytes become U+FFFD, valid text is kept, and the answer serialises. */
START_TEST(problem_detail_scrubs)
{
	json_t *kept = cw_problem_detail("unknown member '\xC3\xA9'");
	ck_assert_ptr_nonnull(kept);
	ck_assert_str_eq(json_string_value(kept), "unknown member '\xC3\xA9'");
	json_decref(kept);
	json_t *cut = cw_problem_detail("unknown member 'a\xC3'");
	ck_assert_ptr_nonnull(cut);
	ck_assert_str_eq(json_string_value(cut), "unknown member 'a\xEF\xBF\xBD'");
	json_t *o = json_pack("{s:o}", "detail", cut);
	ck_assert_ptr_nonnull(o);
	char *text = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
	ck_assert_str_eq(text, "{\"detail\":\"unknown member 'a\\uFFFD'\"}");
	free(text);
	json_decref(o);
}
END_TEST

static int threads_now(void)
{
	int n = 0;
	DIR *d = opendir("/proc/self/task");
	ck_assert_ptr_nonnull(d);
	for (struct dirent *de; (de = readdir(d));)
		n += de->d_name[0] != '.';
	closedir(d);
	return n;
}

/* The threads a front of one worker starts with connection_timeout_s s. */
static int front_threads(unsigned s)
{
	struct cw_http_opts o = {
		.listen_address = "127.0.0.1", .port = 0, .threads = 1, .connection_limit = 8,
		.connection_timeout_s = s, .max_body_bytes = 4096,
		.routes = live_routes, .nroutes = CW_ARRAY_LEN(live_routes),
		.authorize_headers = key_in_headers, .authorize = allow_all,
	};
	int before = threads_now();
	struct cw_http *h = NULL;
	cw_errmsg e;
	ck_assert_msg(cw_http_start(&h, &o, &e) == CW_OK, "%s", e.msg);
	int n = threads_now() - before;
	cw_http_stop(h);
	ck_assert_int_eq(threads_now(), before);
	return n;
}

/* With no timeout (0) there is no head to time: the front starts no
 * reaper of slow heads (it did until the fiftieth session, waking every
 * half second to look at nothing), and stops as well without one. */
START_TEST(live_no_reaper_without_a_timeout)
{
	int timed = front_threads(5);
	int untimed = front_threads(0);
	ck_assert_int_eq(untimed, timed - 1);
}
END_TEST

int main(void)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
	Suite *s = suite_create("http");
	TCase *tc = tcase_create("router");
	tcase_add_test(tc, routing_table);
	tcase_add_test(tc, route_query_names);
	tcase_add_test(tc, overlong_segment_never_matches);
	tcase_add_test(tc, local_urls);
	tcase_add_test(tc, media_addresses);
	tcase_add_test(tc, media_hosts_in_a_domain);
	tcase_add_test(tc, media_held_budget);
	tcase_add_test(tc, media_recent_is_bounded_and_expires);
	tcase_add_test(tc, media_fetch_refuses_a_url_libcurl_cannot_read);
	tcase_add_test(tc, media_fetch_refuses_a_url_with_a_user_or_password);
	tcase_add_test(tc, problem_detail_scrubs);
	suite_add_tcase(s, tc);
	TCase *live_tc = tcase_create("live");
	tcase_set_timeout(live_tc, 30);
	tcase_add_test(live_tc, live_sync_and_errors);
	tcase_add_test(live_tc, live_absolute_form);
	tcase_add_test(live_tc, live_headers_once);
	tcase_add_test(live_tc, live_framing_refused);
	tcase_add_test(live_tc, live_body_cap);
	tcase_add_test(live_tc, live_chunked_body_far_past_the_cap);
	tcase_add_test(live_tc, live_no_memory_is_one_answer);
	tcase_add_test(live_tc, live_route_without_a_body);
	tcase_add_test(live_tc, live_query_names_checked);
	tcase_add_test(live_tc, live_header_lines_joined);
	tcase_add_test(live_tc, live_credentials_before_the_body);
	tcase_add_test(live_tc, live_suspend_resume_many);
	tcase_add_test(live_tc, live_quiesce_finishes_in_flight);
	tcase_add_test(live_tc, live_drain_waits_for_a_request_not_read_yet);
	tcase_add_test(live_tc, live_no_reaper_without_a_timeout);
	suite_add_tcase(s, live_tc);
	TCase *stops_tc = tcase_create("stops");
	tcase_set_timeout(stops_tc, 300);
	tcase_add_test(stops_tc, live_quiesce_under_load_never_aborts);
	suite_add_tcase(s, stops_tc);
	int rc = unit_run(s);
	curl_global_cleanup();
	return rc;
}
