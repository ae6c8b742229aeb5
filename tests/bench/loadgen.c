/* A load generator for the benchmarks: N keep-alive connections (libcurl
 * multi) send pre-built requests as fast as the server answers, then print
 * requests/s and latency percentiles.  Requests to the neutral API are
 * signed beforehand (RFC 9421, the same module the daemon uses), so the
 * generator spends no time signing while it measures.
 *
 *   loadgen get URL CONNS SECONDS
 *   loadgen messages BASE ROOM_ID TOKEN KEYFILE PEER SENDER CONNS COUNT [RATE]
 *   loadgen batch BASE ROOM_URI TOKEN KEYFILE PEER SENDER CONNS COUNT PER_BATCH
 *   loadgen put URL_PREFIX FIRST_ID TOKEN CONNS FILE EVENTS_PER_BODY
 * put: one PUT per line of FILE (a JSON body) to URL_PREFIX/<FIRST_ID + i>
 * with "Authorization: Bearer TOKEN", as a Matrix homeserver pushes
 * appservice transactions.
 * RATE: requests offered per second (open loop; latency from when each was
 * due); without it, as fast as the server answers (closed loop).
 * Prints one line: "requests=… seconds=… rps=… events_per_s=… p50_ms=… p99_ms=… errors=…". */
#include "config.h"
#include "cw.h"
#include "httpsig.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct req {
	char *url;
	const char *method; /* NULL: GET without a body, POST with one */
	char *body;
	struct curl_slist *headers;
	int events;
};

struct slot {
	CURL *h;
	int64_t start_us;
	struct req *r;
};

static size_t sink(char *p, size_t s, size_t n, void *u) { return s * n; }

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

struct sig_ctx {
	const char *ct, *digest, *idem;
};

static const char *hdr(void *ctx, const char *name)
{
	struct sig_ctx *c = ctx;
	if (!strcmp(name, "content-type"))
		return c->ct;
	if (!strcmp(name, "content-digest"))
		return c->digest;
	if (!strcmp(name, "idempotency-key"))
		return c->idem;
	return NULL;
}

static struct req make_signed(const char *url, char *body, const char *token, EVP_PKEY *key, const char *keyid,
			      const char *idem, int events)
{
	struct req r = { .url = strdup(url), .body = body, .events = events };
	char digest[HTTPSIG_DIGEST_HEADER_LEN], nonce[40], si[1024], sig[256], line[1200];
	httpsig_content_digest(body, strlen(body), digest, sizeof(digest));
	unsigned char rnd[18];
	cw_random(rnd, sizeof(rnd));
	cw_b64url_encode(nonce, sizeof(nonce), rnd, sizeof(rnd));
	struct sig_ctx c = { "application/json", digest, idem };
	struct httpsig_msg m = { "POST", url, hdr, &c };
	const char *comps[] = { "@method", "@target-uri", "content-digest", "content-type",
				idem ? "idempotency-key" : NULL, NULL };
	struct httpsig_params p = { .created = cw_wall_ms() / 1000, .keyid = keyid, .nonce = nonce,
				    .tag = "causeway-interop" };
	cw_errmsg e;
	if (httpsig_sign(&m, comps, key, &p, si, sizeof(si), sig, sizeof(sig), &e)) {
		fprintf(stderr, "sign: %s\n", e.msg);
		exit(1);
	}
	r.headers = curl_slist_append(NULL, "Expect:");
	r.headers = curl_slist_append(r.headers, "Content-Type: application/json");
	snprintf(line, sizeof(line), "Authorization: Bearer %s", token);
	r.headers = curl_slist_append(r.headers, line);
	snprintf(line, sizeof(line), "Content-Digest: %s", digest);
	r.headers = curl_slist_append(r.headers, line);
	snprintf(line, sizeof(line), "Signature-Input: %s", si);
	r.headers = curl_slist_append(r.headers, line);
	snprintf(line, sizeof(line), "Signature: %s", sig);
	r.headers = curl_slist_append(r.headers, line);
	if (idem) {
		snprintf(line, sizeof(line), "Idempotency-Key: %s", idem);
		r.headers = curl_slist_append(r.headers, line);
	}
	return r;
}

static void setup(CURL *h, struct req *r)
{
	curl_easy_setopt(h, CURLOPT_URL, r->url);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, sink);
	curl_easy_setopt(h, CURLOPT_TIMEOUT, 30L);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	if (r->body) {
		curl_easy_setopt(h, CURLOPT_POSTFIELDS, r->body);
		curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(r->body));
		curl_easy_setopt(h, CURLOPT_HTTPHEADER, r->headers);
		curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, r->method);
	} else {
		curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
	}
}

/* Runs reqs (or repeats reqs[0] for seconds when n is 0).  rate 0: each
 * connection sends its next request as soon as the last is answered (closed
 * loop).  rate > 0: request i is due at i / rate seconds (open loop, the
 * offered load); it starts when due and a connection is free, and its
 * latency runs from when it was due, so waiting for a connection counts. */
static void run(struct req *reqs, size_t n, int conns, double seconds, double rate)
{
	CURLM *m = curl_multi_init();
	curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, (long)conns);
	struct slot *slots = calloc((size_t)conns, sizeof(*slots));
	struct slot **idle = calloc((size_t)conns, sizeof(*idle));
	size_t cap = n ? n : 10000000, done = 0, next = 0, errors = 0, events = 0;
	int64_t *lat = malloc(cap * sizeof(int64_t));
	int64_t t0 = cw_now_us(), until = t0 + (int64_t)(seconds * 1e6);
	int active = 0, nidle = 0;
	for (int i = 0; i < conns; i++) {
		slots[i].h = curl_easy_init();
		curl_easy_setopt(slots[i].h, CURLOPT_PRIVATE, &slots[i]);
		idle[nidle++] = &slots[conns - 1 - i];
	}
	for (;;) {
		int64_t now = cw_now_us();
		/* Start what is due on the idle connections. */
		while (nidle > 0 && (n ? next < n : now < until)) {
			int64_t due = rate > 0 ? t0 + (int64_t)((double)next * 1e6 / rate) : now;
			if (due > now)
				break;
			struct slot *s = idle[--nidle];
			s->r = &reqs[n ? next : 0];
			next++;
			setup(s->h, s->r);
			s->start_us = due;
			curl_multi_add_handle(m, s->h);
			active++;
		}
		if (active == 0 && !(n ? next < n : now < until))
			break;
		int running;
		curl_multi_perform(m, &running);
		CURLMsg *msg;
		int left;
		while ((msg = curl_multi_info_read(m, &left))) {
			if (msg->msg != CURLMSG_DONE)
				continue;
			struct slot *s;
			curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&s);
			long code = 0;
			curl_easy_getinfo(s->h, CURLINFO_RESPONSE_CODE, &code);
			int64_t end = cw_now_us();
			if (msg->data.result != CURLE_OK || code < 200 || code > 299) {
				if (errors++ < 5)
					fprintf(stderr, "request failed: %s, status %ld\n",
						curl_easy_strerror(msg->data.result), code);
			} else {
				events += (size_t)s->r->events;
			}
			if (done < cap)
				lat[done] = end - s->start_us;
			done++;
			curl_multi_remove_handle(m, s->h);
			active--;
			idle[nidle++] = s;
		}
		int wait_ms = 50;
		if (rate > 0 && nidle > 0 && (n ? next < n : now < until)) {
			int64_t due = t0 + (int64_t)((double)next * 1e6 / rate), left_us = due - cw_now_us();
			wait_ms = left_us <= 0 ? 0 : left_us < 50000 ? (int)((left_us + 999) / 1000) : 50;
		} else if (nidle > 0 && rate <= 0 && (n ? next < n : now < until)) {
			wait_ms = 0;
		}
		if (wait_ms > 0 || active > 0)
			curl_multi_poll(m, NULL, 0, wait_ms, NULL);
	}
	double secs = (double)(cw_now_us() - t0) / 1e6;
	size_t nl = done < cap ? done : cap;
	qsort(lat, nl, sizeof(int64_t), cmp_i64);
	printf("requests=%zu seconds=%.2f rps=%.0f events_per_s=%.0f p50_ms=%.2f p99_ms=%.2f errors=%zu\n", done, secs,
	       (double)done / secs, (double)events / secs, nl ? (double)lat[nl / 2] / 1000 : 0,
	       nl ? (double)lat[nl * 99 / 100] / 1000 : 0, errors);
	for (int i = 0; i < conns; i++)
		curl_easy_cleanup(slots[i].h);
	curl_multi_cleanup(m);
	free(slots);
	free(idle);
	free(lat);
}

static int put(const char *prefix, long first, const char *token, int conns, const char *file, int events)
{
	FILE *f = fopen(file, "r");
	if (!f) {
		perror(file);
		return 1;
	}
	struct curl_slist *headers = curl_slist_append(NULL, "Expect:");
	headers = curl_slist_append(headers, "Content-Type: application/json");
	char auth[512];
	snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token);
	headers = curl_slist_append(headers, auth);
	size_t n = 0, cap = 0;
	struct req *reqs = NULL;
	char *line = NULL;
	size_t linecap = 0;
	ssize_t len;
	while ((len = getline(&line, &linecap, f)) > 0) {
		if (line[len - 1] == '\n')
			line[--len] = '\0';
		if (n == cap) {
			cap = cap ? 2 * cap : 256;
			reqs = realloc(reqs, cap * sizeof(*reqs));
		}
		char url[1024];
		snprintf(url, sizeof(url), "%s/%ld", prefix, first + (long)n);
		reqs[n++] = (struct req){ .url = strdup(url), .method = "PUT", .body = strdup(line),
					  .headers = headers, .events = events };
	}
	free(line);
	fclose(f);
	run(reqs, n, conns, 0, 0);
	for (size_t i = 0; i < n; i++) {
		free(reqs[i].url);
		free(reqs[i].body);
	}
	free(reqs);
	curl_slist_free_all(headers);
	curl_global_cleanup();
	return 0;
}

int main(int argc, char **argv)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
	if (argc == 5 && !strcmp(argv[1], "get")) {
		struct req r = { .url = argv[2], .events = 1 };
		run(&r, 0, atoi(argv[3]), atof(argv[4]), 0);
		return 0;
	}
	if (argc == 8 && !strcmp(argv[1], "put"))
		return put(argv[2], atol(argv[3]), argv[4], atoi(argv[5]), argv[6], atoi(argv[7]));
	bool batch = argc == 11 && !strcmp(argv[1], "batch");
	if (!batch && !((argc == 10 || argc == 11) && !strcmp(argv[1], "messages"))) {
		fprintf(stderr, "usage: see the top of tests/bench/loadgen.c\n");
		return 2;
	}
	const char *base = argv[2], *room = argv[3], *token = argv[4], *keyfile = argv[5], *peer = argv[6],
		   *sender = argv[7];
	int conns = atoi(argv[8]);
	size_t count = (size_t)atol(argv[9]);
	int per = batch ? atoi(argv[10]) : 1;
	double rate = !batch && argc == 11 ? atof(argv[10]) : 0;
	EVP_PKEY *key;
	cw_errmsg e;
	if (httpsig_key_load(keyfile, &key, &e)) {
		fprintf(stderr, "%s\n", e.msg);
		return 1;
	}
	struct req *reqs = calloc(count, sizeof(*reqs));
	char url[1024], idem[64], run_id[16];
	unsigned char rr[6];
	cw_random(rr, sizeof(rr));
	cw_b64url_encode(run_id, sizeof(run_id), rr, sizeof(rr));
	for (size_t i = 0; i < count; i++) {
		if (!batch) {
			snprintf(url, sizeof(url), "%s/v1/rooms/%s/messages", base, room);
			char *body = malloc(512);
			snprintf(body, 512, "{\"type\":\"message\",\"sender\":\"%s\",\"content\":{\"parts\":[{\"type\":"
					    "\"text/plain\",\"body\":\"benchmark message %zu\"}]}}", sender, i);
			snprintf(idem, sizeof(idem), "bench-%s-%zu", run_id, i);
			reqs[i] = make_signed(url, body, token, key, peer, idem, 1);
		} else {
			snprintf(url, sizeof(url), "%s/v1/batch", base);
			size_t cap = (size_t)per * 300 + 64, len = 0;
			char *body = malloc(cap);
			len += (size_t)snprintf(body + len, cap - len, "{\"events\":[");
			for (int k = 0; k < per; k++)
				len += (size_t)snprintf(body + len, cap - len,
							"%s{\"idempotency_key\":\"bb-%s-%zu-%d\",\"room\":\"%s\",\"event\":{"
							"\"type\":\"message\",\"sender\":\"%s\",\"content\":{\"parts\":[{"
							"\"type\":\"text/plain\",\"body\":\"batched message %d\"}]}}}",
							k ? "," : "", run_id, i, k, room, sender, k);
			snprintf(body + len, cap - len, "]}");
			reqs[i] = make_signed(url, body, token, key, peer, NULL, per);
		}
	}
	run(reqs, count, conns, 0, rate);
	for (size_t i = 0; i < count; i++) {
		free(reqs[i].url);
		free(reqs[i].body);
		curl_slist_free_all(reqs[i].headers);
	}
	free(reqs);
	EVP_PKEY_free(key);
	curl_global_cleanup();
	return 0;
}
