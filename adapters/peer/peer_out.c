/* Signed, batched notify requests to push-mode peers (libcurl). */
#include "config.h"
#include "peer_out.h"
#include "buf.h"
#include "httpsig.h"
#include "log.h"
#include "peer_media.h"
#include "peers.h"
#include "store.h"

#include <ctype.h>
#include <curl/curl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define RESPONSE_MAX 65536
#define IDLE_MAX 16

struct peer_out {
	struct cw_app *app;
	EVP_PKEY *key;
	char *keyid, *tag;
	long timeout_ms;
	/* Handles between requests, reused for keep-alive to each peer (the
	 * multi handle keeps the connections).  The dispatcher's lanes deliver
	 * to different peers at once: each request takes a pair of its own. */
	pthread_mutex_t mu;
	struct handle {
		CURL *e;
		CURLM *m;
	} idle[IDLE_MAX];
	int nidle;
};

struct peer_out *peer_out_new(struct cw_app *app, EVP_PKEY *key, const char *keyid, const char *tag,
			      long timeout_ms)
{
	struct peer_out *p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	p->app = app;
	p->key = key;
	p->keyid = strdup(keyid);
	p->tag = strdup(tag);
	p->timeout_ms = timeout_ms;
	pthread_mutex_init(&p->mu, NULL);
	if (!p->keyid || !p->tag) {
		peer_out_free(p);
		return NULL;
	}
	return p;
}

void peer_out_free(struct peer_out *p)
{
	if (!p)
		return;
	for (int i = 0; i < p->nidle; i++) {
		curl_multi_cleanup(p->idle[i].m);
		curl_easy_cleanup(p->idle[i].e);
	}
	pthread_mutex_destroy(&p->mu);
	free(p->keyid);
	free(p->tag);
	free(p);
}

struct hdrs {
	const char *content_type, *digest;
};

static const char *sign_header(void *ctx, const char *name)
{
	struct hdrs *h = ctx;
	if (strcmp(name, "content-type") == 0)
		return h->content_type;
	if (strcmp(name, "content-digest") == 0)
		return h->digest;
	return NULL;
}

static bool take_handle(struct peer_out *p, struct handle *h)
{
	pthread_mutex_lock(&p->mu);
	bool had = p->nidle > 0;
	if (had)
		*h = p->idle[--p->nidle];
	pthread_mutex_unlock(&p->mu);
	if (had)
		return true;
	h->e = curl_easy_init();
	h->m = curl_multi_init();
	if (h->e && h->m)
		return true;
	curl_easy_cleanup(h->e);
	curl_multi_cleanup(h->m);
	return false;
}

static void give_handle(struct peer_out *p, struct handle h)
{
	pthread_mutex_lock(&p->mu);
	bool kept = p->nidle < IDLE_MAX;
	if (kept)
		p->idle[p->nidle++] = h;
	pthread_mutex_unlock(&p->mu);
	if (!kept) {
		curl_multi_cleanup(h.m);
		curl_easy_cleanup(h.e);
	}
}

/* What a transfer has read of the answer: its body's bytes so far, those
 * of a 4xx kept (body: its problem says what was refused), and whether
 * the head of the final answer (not a 1xx's) is in whole. */
struct answer {
	CURL *e;
	size_t got;
	char *body; /* a 4xx's body, got bytes of it and a NUL; NULL: none kept */
	bool head_done;
};

static size_t take_body(char *ptr, size_t size, size_t n, void *u)
{
	struct answer *a = u;
	size_t len = size * n, at = a->got;
	a->got += len;
	if (a->got > RESPONSE_MAX)
		return 0; /* a huge answer aborts the transfer */
	long code = 0;
	if (curl_easy_getinfo(a->e, CURLINFO_RESPONSE_CODE, &code) != CURLE_OK || code < 400 || code > 499)
		return len; /* only a refusal's body is read */
	if (!a->body && (at > 0 || !(a->body = malloc(RESPONSE_MAX + 1))))
		return len; /* not read: the status alone says what it can */
	memcpy(a->body + at, ptr, len);
	a->body[a->got] = '\0';
	return len;
}

/* The blank line that ends a head: the final answer's (its status 200 or
 * more) is all that is read of it, its status and its Retry-After. */
static size_t head_line(char *ptr, size_t size, size_t n, void *u)
{
	struct answer *a = u;
	size_t len = size * n;
	long code = 0;
	if ((len == 2 && ptr[0] == '\r' && ptr[1] == '\n') || (len == 1 && ptr[0] == '\n'))
		if (curl_easy_getinfo(a->e, CURLINFO_RESPONSE_CODE, &code) == CURLE_OK && code >= 200)
			a->head_done = true;
	return len;
}

/* Runs h's transfer on its multi handle, looking every STOP_POLL_MS
 * whether the daemon is stopping: a push in flight then is cut off (*cut
 * set; its rows are released untried, the peer deduplicates if it took
 * them), so that a slow peer cannot hold the stop for
 * dispatcher.http_timeout_ms.  (The architecture's "one multi handle per
 * thread": here one per handle pair, so that a lane's next request to
 * the same peer reuses the connection the multi handle keeps.)
 *
 * The answer's body (only a 4xx's is read, for its problem's code) gets
 * BODY_GRACE_MS after its head (a: head_done) to end, then the transfer
 * ends (its connection with it): the status and the Retry-After are in.  Until the fiftieth
 * session a peer whose body stalled after its head (a 200 whose
 * Content-Length never came) held the lane, and every batch to it, for
 * dispatcher.http_timeout_ms (10 s by default) each. */
#define STOP_POLL_MS 200
#define BODY_GRACE_MS 1000
static CURLcode perform(struct handle h, const struct cw_app *app, const struct answer *a, bool *cut)
{
	*cut = false;
	if (curl_multi_add_handle(h.m, h.e) != CURLM_OK)
		return CURLE_FAILED_INIT;
	CURLcode cc = CURLE_OK;
	bool done = false;
	int64_t head_at = -1; /* when the head was seen in (ms, monotonic) */
	for (;;) {
		int running = 0, left;
		if (curl_multi_perform(h.m, &running) != CURLM_OK) {
			cc = CURLE_FAILED_INIT;
			break;
		}
		CURLMsg *msg;
		while ((msg = curl_multi_info_read(h.m, &left)))
			if (msg->msg == CURLMSG_DONE && msg->easy_handle == h.e) {
				cc = msg->data.result;
				done = true;
			}
		if (done || !running)
			break;
		if (app && app->dispatcher && dispatcher_stopping(app->dispatcher)) {
			*cut = true;
			break;
		}
		int wait = STOP_POLL_MS;
		if (a->head_done) {
			int64_t now = cw_now_us() / 1000;
			if (head_at < 0)
				head_at = now;
			if (now - head_at >= BODY_GRACE_MS) {
				cc = CURLE_OPERATION_TIMEDOUT; /* the answer is known: its status counts */
				done = true;
				break;
			}
			if (BODY_GRACE_MS - (now - head_at) < wait)
				wait = (int)(BODY_GRACE_MS - (now - head_at));
		}
		if (curl_multi_poll(h.m, NULL, 0, wait, NULL) != CURLM_OK) {
			cc = CURLE_FAILED_INIT;
			break;
		}
	}
	if (!done && !*cut && cc == CURLE_OK)
		cc = CURLE_GOT_NOTHING;
	curl_multi_remove_handle(h.m, h.e);
	return cc;
}

/* A peer verifies our @target-uri against the URI it rebuilds from the
 * request it receives (its own public URL and the request target): the
 * push_url as typed ("https://Peer.Example:443") is not that, and until
 * the thirty-second session it was signed as typed.  The normal form is
 * httpsig_request_url's, the one every signed request of ours has. */
cw_err peer_out_notify_url(const char *push_url, char *out, size_t len, cw_errmsg *e)
{
	return httpsig_request_url(push_url, "/v1/notify", "push_url", out, len, e);
}

/* How long rows wait when the peer's address could not be read, and when
 * the push_url read cannot be pushed to. */
#define DB_RETRY_MS 1000L
#define BAD_URL_RETRY_MS 10000L

/* The push URL as a failure's reason names it: at most URL_SHOWN bytes of
 * it, "..." after a longer one's cut.  A reason is a cw_errmsg (512
 * bytes, as outbox.last_error, delivery_attempts.error and the log's
 * detail keep it); a push_url may have 2048: until the fiftieth session
 * such a URL filled the reason, and the status or libcurl's error after
 * it ("answered 503") was cut off, the operator told nothing but where. */
#define URL_SHOWN 240
struct url_shown {
	char s[URL_SHOWN + 4];
};

static struct url_shown url_shown(const char *url)
{
	struct url_shown u;
	size_t n = strlen(url);
	if (n <= URL_SHOWN)
		memcpy(u.s, url, n + 1);
	else
		snprintf(u.s, sizeof(u.s), "%.*s...", URL_SHOWN, url);
	return u;
}

/* The `code` of a refusal's problem (RFC 9457, as the interop API's
 * errors have one: docs/interop-api.md, "Errors"), into problem ("" when
 * the body is not a JSON object with a code of at most PROBLEM_CODE_MAX
 * - 1 letters, digits, '_', '.' and '-': nothing else is shown in a
 * reason). */
#define PROBLEM_CODE_MAX 48
static void problem_code(const char *body, size_t len, char problem[PROBLEM_CODE_MAX])
{
	*problem = '\0';
	json_t *j = body ? json_loadb(body, len, 0, NULL) : NULL;
	const char *c = json_string_value(json_object_get(j, "code"));
	size_t n = c ? strlen(c) : 0;
	bool ok = n > 0 && n < PROBLEM_CODE_MAX;
	for (size_t i = 0; ok && i < n; i++)
		ok = isalnum((unsigned char)c[i]) || c[i] == '_' || c[i] == '.' || c[i] == '-';
	if (ok)
		memcpy(problem, c, n + 1);
	json_decref(j);
}

/* One signed POST of text (len bytes, {"events":[...]}) to url (of the peer name): CW_OK on a 2xx, else e
 * says why, *code holds the status (0: no answer), problem the code of a
 * 4xx's problem ("": none), *wait_s the Retry-After of a 429 or 503 (0:
 * none) and *stopped whether the daemon's stop cut it off. */
static cw_err post_events(struct peer_out *p, const char *name, const char *url, const char *text, size_t len,
			  long *code, char problem[PROBLEM_CODE_MAX], curl_off_t *wait_s, bool *stopped, cw_errmsg *e)
{
	*code = 0;
	*problem = '\0';
	*wait_s = 0;
	*stopped = false;

	char digest[HTTPSIG_DIGEST_HEADER_LEN], nonce[32], sig_input[1024], sig[256];
	httpsig_content_digest(text, len, digest, sizeof(digest));
	unsigned char rnd[16];
	cw_random(rnd, sizeof(rnd));
	cw_b64url_encode(nonce, sizeof(nonce), rnd, sizeof(rnd));
	struct hdrs h = { "application/json", digest };
	char target[PEER_NOTIFY_URL_MAX];
	httpsig_target_uri(url, target, sizeof(target));
	struct httpsig_msg m = { .method = "POST", .target_uri = target, .header = sign_header, .ctx = &h };
	static const char *const components[] = { "@method", "@target-uri", "content-digest", "content-type", NULL };
	struct httpsig_params sp = { .created = cw_wall_ms() / 1000, .keyid = p->keyid, .nonce = nonce, .tag = p->tag };
	cw_errmsg se;
	cw_err rc = httpsig_sign(&m, components, p->key, &sp, sig_input, sizeof(sig_input), sig, sizeof(sig), &se);
	if (rc) {
		/* named: until the fiftieth session's review "target URI has
		 * an invalid byte 0xc3" said neither whose nor which */
		return cw_fail(e, rc, "peer %s: the push cannot be signed: %.400s", name, se.msg);
	}
	char hd[4][1200];
	snprintf(hd[0], sizeof(hd[0]), "Content-Type: application/json");
	snprintf(hd[1], sizeof(hd[1]), "Content-Digest: %s", digest);
	snprintf(hd[2], sizeof(hd[2]), "Signature-Input: %s", sig_input);
	snprintf(hd[3], sizeof(hd[3]), "Signature: %s", sig);
	struct curl_slist *list = curl_slist_append(NULL, "Expect:");
	for (int i = 0; i < 4; i++)
		list = curl_slist_append(list, hd[i]);
	struct handle hh;
	if (!take_handle(p, &hh)) {
		curl_slist_free_all(list);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	CURL *cu = hh.e;
	curl_easy_reset(cu);
	curl_easy_setopt(cu, CURLOPT_URL, url);
	curl_easy_setopt(cu, CURLOPT_POST, 1L);
	curl_easy_setopt(cu, CURLOPT_POSTFIELDS, text);
	curl_easy_setopt(cu, CURLOPT_POSTFIELDSIZE, (long)len);
	curl_easy_setopt(cu, CURLOPT_HTTPHEADER, list);
	curl_easy_setopt(cu, CURLOPT_TIMEOUT_MS, p->timeout_ms);
	curl_easy_setopt(cu, CURLOPT_CONNECTTIMEOUT_MS, p->timeout_ms < 3000 ? p->timeout_ms : 3000L);
	curl_easy_setopt(cu, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(cu, CURLOPT_PROTOCOLS_STR, "http,https");
	struct answer ans = { .e = cu };
	curl_easy_setopt(cu, CURLOPT_WRITEFUNCTION, take_body);
	curl_easy_setopt(cu, CURLOPT_WRITEDATA, &ans);
	curl_easy_setopt(cu, CURLOPT_HEADERFUNCTION, head_line);
	curl_easy_setopt(cu, CURLOPT_HEADERDATA, &ans);
	if (p->app && p->app->cfg->ca_file && *p->app->cfg->ca_file)
		curl_easy_setopt(cu, CURLOPT_CAINFO, p->app->cfg->ca_file);
	CURLcode cc = perform(hh, p->app, &ans, stopped);
	curl_slist_free_all(list);
	/* The status is read whatever became of the transfer after it (0: no
	 * status line came): a 2xx is the peer's acknowledgement, whatever it
	 * wrote after it, an answer cut off for its size, one whose body
	 * stalled until dispatcher.http_timeout_ms or broke off, or one the
	 * daemon's stop cut short.  Until the thirty-sixth session only the
	 * first counted so: a peer whose 200 came with a body that never
	 * ended had each try counted a failure, and its rows, which it had
	 * taken, were sent again until they were dead letters. */
	if (curl_easy_getinfo(cu, CURLINFO_RESPONSE_CODE, code) != CURLE_OK)
		*code = 0;
	bool acked = *code >= 200 && *code <= 299;
	if (acked)
		*stopped = false;
	/* A 429 or 503 may say when to come back (Retry-After, seconds or a
	 * date: libcurl reads both): the batch waits at least that long. */
	if ((*code == 429 || *code == 503) && curl_easy_getinfo(cu, CURLINFO_RETRY_AFTER, wait_s) != CURLE_OK)
		*wait_s = 0;
	give_handle(p, hh);
	if (!acked && ans.body && ans.got <= RESPONSE_MAX)
		problem_code(ans.body, ans.got, problem);
	free(ans.body);
	struct url_shown us = url_shown(url);
	const char *shown = us.s;
	if (*stopped)
		return cw_fail(e, CW_ESHUTDOWN, "%s: cut off, the daemon is stopping", shown);
	if (cc != CURLE_OK && !acked && *code == 0)
		return cw_fail(e, CW_EUNAVAIL, "%s: %s", shown, curl_easy_strerror(cc));
	if (!acked) {
		if (*wait_s > 0)
			return cw_fail(e, CW_EUNAVAIL, "%s answered %ld (retry after %lld s)", shown, *code,
				       (long long)*wait_s);
		return cw_fail(e, CW_EUNAVAIL, "%s answered %ld%s%s", shown, *code, *problem ? " " : "", problem);
	}
	return CW_OK;
}

/* Whether a refusal may be of some events of the batch only, which a
 * smaller batch would tell: a 4xx but the ones about the request as a
 * whole (the credentials or their rights, the URL, the connection or the
 * protocol, a header, a timeout, a pace: a wrong push_url answering 404
 * to everything made each try up to 33 requests, until a review of the
 * thirtieth session's change; a proxy answering 421 Misdirected Request,
 * 426 Upgrade Required or 431 to everything did the same until the
 * forty-fourth session's review).  The events go in the body alone, so
 * only an answer about the body is searched. */
static bool refusal_of_events(long code, const char *problem)
{
	static const long whole[] = {
		401, 403, 404, 405, 406, 407, 408, 410, 411, 412, 414, 417, 421, 425, 426, 428, 429, 431,
	};
	/* A problem's code about the request as a whole: a header, the
	 * request's framing or content type, its signature or credentials,
	 * the route, a pace, the peer's own trouble (the codes a peer that
	 * runs Causeway answers so, docs/interop-api.md).  Until the
	 * fiftieth session's review the body was not read, and a 400
	 * invalid_header (a header the peer will not take, on every request)
	 * made each try of a batch up to 33 requests, as a 404 once did. */
	static const char *const of_request[] = {
		"invalid_header", "invalid_request", "unsupported_media_type", "unauthenticated", "bad_signature",
		"not_found", "method_not_allowed", "uri_too_long", "rate_limited", "unavailable", "not_implemented",
	};
	if (code < 400 || code > 499)
		return false;
	for (size_t i = 0; i < CW_ARRAY_LEN(whole); i++)
		if (code == whole[i])
			return false;
	for (size_t i = 0; i < CW_ARRAY_LEN(of_request); i++)
		if (strcmp(problem, of_request[i]) == 0)
			return false;
	return true;
}

/* Requests one delivery may add to find the events a peer refuses: a
 * single refused event among 250 rooms takes about 2 x log2(250) = 16. */
#define ISOLATE_REQUESTS 32

/* Where a row's event is in the text of its batch, as it is sent
 * (compact JSON, printed once: peer_out_deliver): n == 0 when it is not
 * sent (a type the peer does not take). */
struct ev_text {
	size_t at, n;
};

/* The body of a push of rows idx[0..k), their events as printed in text:
 * {"events":[...]} (NULL: out of memory). */
static char *batch_body(const char *text, const struct ev_text *evs, const size_t *idx, size_t k, size_t *len)
{
	static const char head[] = "{\"events\":[", tail[] = "]}";
	size_t n = sizeof(head) - 1 + sizeof(tail) - 1 + (k ? k - 1 : 0);
	for (size_t x = 0; x < k; x++)
		n += evs[idx[x]].n;
	char *b = malloc(n + 1), *o = b;
	if (!b)
		return NULL;
	memcpy(o, head, sizeof(head) - 1);
	o += sizeof(head) - 1;
	for (size_t x = 0; x < k; x++) {
		if (x > 0)
			*o++ = ',';
		memcpy(o, text + evs[idx[x]].at, evs[idx[x]].n);
		o += evs[idx[x]].n;
	}
	memcpy(o, tail, sizeof(tail));
	*len = n;
	return b;
}

/* The search for the refused events of a batch (isolate). */
struct iso {
	struct peer_out *p;
	const char *name, *url;
	struct outbox_row *rows;
	const char *text;  /* the events as printed (peer_out_deliver) */
	const struct ev_text *evs; /* per row: where its event is in text */
	int left;          /* requests it may still make */
	bool halted;       /* a request failed for another reason than its events: no more */
	long code;         /* the last failure's status, reason and wait */
	char why[sizeof(((struct outbox_row *)0)->why)];
	long retry_after_ms;
	bool stopped;
};

static const char *room_of(const struct iso *s, size_t i)
{
	const char *r = json_string_value(json_object_get(s->rows[i].event, "room_id"));
	return r ? r : "";
}

static void fail_rows(struct iso *s, const size_t *idx, size_t k, long code, const char *why, long retry_after_ms)
{
	for (size_t x = 0; x < k; x++) {
		struct outbox_row *r = &s->rows[idx[x]];
		r->outcome = s->stopped ? 2 : -1;
		r->code = code;
		r->retry_after_ms = retry_after_ms;
		snprintf(r->why, sizeof(r->why), "%s", why);
	}
}

static void isolate(struct iso *s, size_t *idx, size_t k);

/* Sends rows idx[0..k) (in order) as one batch and sets their outcomes:
 * delivered, or refused (then searched further, while it may be some of
 * them only), or failed as the request did. */
static void try_rows(struct iso *s, size_t *idx, size_t k)
{
	if (s->halted || s->left <= 0) {
		fail_rows(s, idx, k, s->code, s->why, s->retry_after_ms);
		return;
	}
	s->left--;
	/* Joined from the events as printed for the whole batch: none is
	 * printed again (until the fifty-third session each smaller batch
	 * printed its events anew). */
	size_t len;
	char *text = batch_body(s->text, s->evs, idx, k, &len);
	long code = 0;
	char problem[PROBLEM_CODE_MAX] = "";
	curl_off_t wait_s = 0;
	cw_errmsg e = { { 0 } };
	cw_err rc = text ? post_events(s->p, s->name, s->url, text, len, &code, problem, &wait_s, &s->stopped, &e)
			 : cw_fail(&e, CW_ENOMEM, "out of memory");
	free(text);
	if (rc == CW_OK) {
		for (size_t x = 0; x < k; x++)
			s->rows[idx[x]].outcome = 1;
		return;
	}
	s->code = code;
	snprintf(s->why, sizeof(s->why), "%s", e.msg);
	s->retry_after_ms = wait_s > 0 ? outbox_retry_after_ms(wait_s, 0) : 0;
	if (!refusal_of_events(code, problem)) {
		s->halted = true; /* the peer is away or asks for less: not a question of these events */
		fail_rows(s, idx, k, s->code, s->why, s->retry_after_ms);
		return;
	}
	isolate(s, idx, k);
}

/* Rows idx[0..k), which the peer refused as one batch (s->code, s->why),
 * split to find the ones it refuses: rooms apart (half the rooms, then
 * the other half: a room's rows stay together and in order), a room's
 * rows in two (the first half alone; the second after it only if the
 * first went through: a row never overtakes an earlier one of its room,
 * which fails it with the earlier one's reason).  A single row refused is
 * failed; so is what is left when the requests allowed run out. */
static void isolate(struct iso *s, size_t *idx, size_t k)
{
	long code = s->code, ra = s->retry_after_ms;
	char why[sizeof(s->why)];
	snprintf(why, sizeof(why), "%s", s->why);
	if (k <= 1 || s->halted || s->left <= 0) {
		fail_rows(s, idx, k, code, why, ra);
		return;
	}
	/* The rooms, in the order of their first rows. */
	size_t nrooms = 0;
	for (size_t x = 0; x < k; x++) {
		bool seen = false;
		for (size_t y = 0; y < x && !seen; y++)
			seen = strcmp(room_of(s, idx[y]), room_of(s, idx[x])) == 0;
		nrooms += !seen;
	}
	size_t *a = malloc(k * sizeof(*a));
	if (!a) {
		fail_rows(s, idx, k, code, why, ra);
		return;
	}
	size_t na = 0, nb = 0;
	if (nrooms > 1) {
		/* The first half of the rooms to a, in order; the rest to b. */
		size_t want = nrooms / 2, taken = 0;
		size_t *b = a + k; /* filled from the end, reversed below */
		for (size_t x = 0; x < k; x++) {
			bool first = true, in_a = false;
			for (size_t y = 0; y < x && first; y++)
				if (strcmp(room_of(s, idx[y]), room_of(s, idx[x])) == 0) {
					first = false;
					for (size_t z = 0; z < na && !in_a; z++)
						in_a = a[z] == idx[y];
				}
			if (first && taken < want) {
				in_a = true;
				taken++;
			}
			if (in_a)
				a[na++] = idx[x];
			else
				*--b = idx[x];
		}
		nb = k - na;
		/* b holds the rest reversed at a[na..k): put them in order into idx */
		size_t *rest = a + na;
		for (size_t x = 0; x < nb / 2; x++) {
			size_t t = rest[x];
			rest[x] = rest[nb - 1 - x];
			rest[nb - 1 - x] = t;
		}
		memcpy(idx, a, k * sizeof(*idx));
		free(a);
		try_rows(s, idx, na);
		try_rows(s, idx + na, nb);
		return;
	}
	free(a);
	na = k / 2;
	try_rows(s, idx, na);
	size_t bad = na;
	for (size_t x = 0; x < na && bad == na; x++)
		if (s->rows[idx[x]].outcome != 1)
			bad = x;
	if (bad == na) {
		try_rows(s, idx + na, k - na);
		return;
	}
	const struct outbox_row *first = &s->rows[idx[bad]];
	char fwhy[sizeof(first->why)];
	snprintf(fwhy, sizeof(fwhy), "%s", first->why);
	fail_rows(s, idx + na, k - na, first->code, fwhy, first->retry_after_ms);
}

cw_err peer_out_deliver(void *ctx, PGconn *c, const char *destination, struct outbox_row *rows, size_t n, size_t *done,
			long *code, cw_errmsg *e)
{
	struct peer_out *p = ctx;
	*code = 0;
	*done = 0; /* all or nothing: the peer acknowledges the whole batch */
	const char *name = destination + 5; /* "peer:" */
	PGresult *r = PQexecParams(c, "SELECT push_url, event_types::text FROM peers WHERE name = $1 AND mode = 'push' "
				      "AND enabled", 1, NULL, &name, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		/* The database failed, not the peer: nothing was tried, so the
		 * rows go back untried for a second (the attempt not counted,
		 * the dispatcher's statements reconnect within the claim).  It
		 * used to be recorded as an attempt that found no push URL. */
		cw_fail(e, CW_EUNAVAIL, "cannot read peer %s: %s", name, r ? PQresultErrorMessage(r) : PQerrorMessage(c));
		PQclear(r);
		for (size_t i = 0; i < n; i++) {
			rows[i].outcome = 3;
			rows[i].retry_after_ms = DB_RETRY_MS;
		}
		return CW_EUNAVAIL;
	}
	if (PQntuples(r) != 1) {
		/* Disabled (or no longer in push mode) since the claim read
		 * it: nothing was tried, so the rows go back untried, the
		 * attempt not counted, to wait for the peer as a disabled
		 * peer's rows do (or for its pull).  Until the thirty-sixth
		 * session the try was counted a failure: a peer disabled
		 * under a claim had rows at the end of their budget made dead
		 * letters, and its senders told "not delivered". */
		PQclear(r);
		for (size_t i = 0; i < n; i++) {
			rows[i].outcome = 3;
			rows[i].retry_after_ms = DB_RETRY_MS;
		}
		return cw_fail(e, CW_ENOTFOUND, "peer %s has no push URL (disabled or pull mode)", name);
	}
	char url[PEER_NOTIFY_URL_MAX];
	cw_errmsg ue;
	if (peer_url_notify(PQgetvalue(r, 0, 0), url, sizeof(url), &ue) != CW_OK) {
		/* A push_url stored before the admin API held it to the rule
		 * it holds one to now (a user and password, a byte that is not
		 * ASCII): nothing can be sent, so nothing is tried, and the
		 * rows wait, untried, no attempt counted, never dead, as a
		 * disabled peer's do, until the operator gives it a push_url
		 * (GET /admin/v1/peers says what is wrong: push_url_problem).
		 * Until the fiftieth session's review each claim counted a
		 * failed try, and the rows went dead though nothing was sent
		 * (a URL that was not ASCII failed at its signing, "target URI
		 * has an invalid byte 0xc3", naming no peer).  Answered CW_OK,
		 * as the XMPP component's rows waiting for its stream are: the
		 * dispatcher's line for a failed delivery, one per claim of a
		 * busy peer's new rows, would not be rate-limited.  (ue apart:
		 * until the fiftieth session e->msg was both the format's
		 * argument and its output.) */
		PQclear(r);
		LOG_KV_LIMITED(CW_LOG_WARN, "a push peer's push_url cannot be pushed to: its rows wait, untried",
			       "peer", name, "detail", ue.msg);
		for (size_t i = 0; i < n; i++) {
			rows[i].outcome = 3;
			rows[i].retry_after_ms = BAD_URL_RETRY_MS;
			snprintf(rows[i].why, sizeof(rows[i].why), "peer %s: %.400s", name, ue.msg);
		}
		return CW_OK;
	}
	/* Events of a type the peer does not take are not sent (and count as
	 * done: there is nothing to send them as), so that they never cost
	 * the peer's refusal of a batch with messages in it. */
	char types[160] = "";
	bool all_types = PQgetisnull(r, 0, 1);
	snprintf(types, sizeof(types), "%s", PQgetvalue(r, 0, 1));
	PQclear(r);

	cw_err rc = CW_OK;
	struct ev_text *evs = calloc(n ? n : 1, sizeof(*evs));
	size_t *idx = malloc((n ? n : 1) * sizeof(*idx));
	struct cw_buf text;
	cw_buf_init(&text, SIZE_MAX);
	if (!evs || !idx || cw_buf_add(&text, "{\"events\":[", sizeof("{\"events\":[") - 1)) {
		free(evs);
		free(idx);
		cw_buf_free(&text);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	/* The batch as it is sent (compact JSON), each event printed once,
	 * straight into it: the claim's bound (dispatcher_opts.claim_bytes)
	 * counts the stored events, but a local user's file goes as a link of
	 * Causeway's (peer_media_offer), longer than its source, and a batch
	 * of such messages passed server.max_body_bytes, which the peer holds
	 * a body to as Causeway does (until the fifty-second session: by some
	 * 40 %, as a pull answer did).  The bound is of these bytes, the
	 * batch's "]}" counted in; the event that would pass it is cut off
	 * again, and the rows from it on are given back untried (outcome 2:
	 * pending again, due at once, the attempt not counted) for the next
	 * batch, in order; the first event goes whatever its size.  Until the
	 * fifty-third session each event was printed twice, once to be
	 * measured and again in the body. */
	size_t all = n, bound = p->app ? (size_t)p->app->cfg->max_body_bytes : 1024 * 1024;
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		const char *type = json_string_value(json_object_get(rows[i].event, "type"));
		if (all_types || !type || peer_event_type_wanted(types, type)) {
			json_t *ev = peer_media_offer(p->app, name, rows[i].event);
			size_t at = text.len;
			bool printed = ev && (k == 0 || cw_buf_add(&text, ",", 1) == CW_OK) &&
				       json_dump_callback(ev, cw_buf_json, &text, JSON_COMPACT) == 0;
			json_decref(ev);
			if (!printed) {
				rc = cw_fail(e, CW_ENOMEM, "out of memory");
				goto out;
			}
			if (k > 0 && text.len + sizeof("]}") - 1 > bound) {
				cw_buf_cut(&text, at);
				n = i;
				break;
			}
			evs[i].at = at + (k > 0); /* past its comma */
			evs[i].n = text.len - evs[i].at;
			idx[k++] = i;
		}
	}
	if (k == 0) {
		for (size_t i = 0; i < n; i++) { /* done, nothing sent (dispatcher.h) */
			rows[i].outcome = 1;
			rows[i].code = -1;
		}
		goto out;
	}
	curl_off_t wait_s = 0;
	bool stopped;
	char problem[PROBLEM_CODE_MAX];
	if (cw_buf_add(&text, "]}", sizeof("]}") - 1)) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	rc = post_events(p, name, url, text.p, text.len, code, problem, &wait_s, &stopped, e);
	if (stopped) {
		for (size_t i = 0; i < n; i++)
			rows[i].outcome = 2;
		goto out;
	}
	if (rc && wait_s > 0)
		for (size_t i = 0; i < n; i++)
			rows[i].retry_after_ms = outbox_retry_after_ms(wait_s, 0);
	if (rc && k > 1 && refusal_of_events(*code, problem)) {
		/* The peer refused the batch (a 4xx about its content): most
		 * likely one event it will not take.  Found by smaller batches,
		 * it alone (and the later rows of its room) waits and, after
		 * the retry budget, goes dead; every other room's rows are
		 * delivered (until the thirtieth session they went dead with it). */
		struct iso s = { .p = p, .name = name, .url = url, .rows = rows, .text = text.p, .evs = evs,
				 .left = ISOLATE_REQUESTS, .code = *code };
		snprintf(s.why, sizeof(s.why), "%s", e->msg);
		for (size_t i = 0; i < n; i++) {
			rows[i].outcome = evs[i].n ? 0 : 1;
			rows[i].code = evs[i].n ? 0 : -1; /* done, nothing sent (dispatcher.h) */
			rows[i].retry_after_ms = 0;
		}
		isolate(&s, idx, k);
		rc = CW_OK;
		for (size_t i = 0; i < n && !rc; i++)
			if (rows[i].outcome != 1)
				rc = cw_fail(e, CW_EUNAVAIL, "%s", rows[i].why);
	} else if (rc && k < n) {
		/* The rows not sent (a type the peer does not take) are done
		 * whatever became of the request, as they are when it went
		 * through: only the rows sent failed.  Until the fiftieth
		 * session a batch's failure was every row's, and a peer away
		 * for a while made its receipts, reactions and blocks dead
		 * letters (and the later rows of their rooms with them) that
		 * it would never have been sent. */
		for (size_t i = 0; i < n; i++) {
			rows[i].outcome = evs[i].n ? -1 : 1;
			rows[i].code = evs[i].n ? *code : -1; /* done, nothing sent (dispatcher.h) */
			snprintf(rows[i].why, sizeof(rows[i].why), "%s", e->msg);
		}
	}
out:
	if (n < all) {
		/* Each row's outcome of its own (dispatcher.h): the rows sent
		 * as the request went, those past the bound untried. */
		for (size_t i = 0; i < n; i++) {
			if (rows[i].outcome != 0)
				continue;
			if (rc == CW_OK) {
				rows[i].outcome = 1;
				rows[i].code = evs[i].n ? *code : -1; /* done, nothing sent (dispatcher.h) */
			} else {
				rows[i].outcome = -1;
				rows[i].code = *code;
				snprintf(rows[i].why, sizeof(rows[i].why), "%s", e->msg);
			}
		}
		for (size_t i = n; i < all; i++) {
			rows[i].outcome = 2;
			rows[i].retry_after_ms = 0;
		}
	}
	free(evs);
	free(idx);
	cw_buf_free(&text);
	return rc;
}
