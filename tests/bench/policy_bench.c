/* A benchmark of the policy engine (a command, not a test):
 *
 *   policy_bench [DECISIONS]        (default 1000000)
 *
 * Builds a snapshot of 10,000 rules (exact and wildcard domains, users,
 * networks exact and wildcard; a fifth with limits) and 100,000 consent
 * facts plus two opt-ins per local user and some remote blocks, then times
 * policy_decide() on a fixed mix of requests (hits and misses; inbound,
 * outbound and transit; events, new rooms, consent requests) with the token
 * buckets of policy/ratelimit.c behind struct policy_rate.
 *
 * Timing: clock_gettime(CLOCK_MONOTONIC) around batches of 64 decisions,
 * so the clock's own cost (~20 ns) is spread over 64 calls; the figures are
 * per decision, from the batch means (the p99 is therefore the p99 of
 * 64-decision means, which hides single slow calls).  The baseline is the
 * same requests, timed the same way in the same run, on an empty snapshot.
 * The buckets are asked directly and (memo) through a per-event memo of
 * gateway/policy_live.c, one event a decision, as the gateway asks them.
 * Prints one "name value" line per figure. */
#include "config.h"
#include "policy.h"
#include "policy_live.h"
#include "ratelimit.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NRULES 10000
#define NLOCAL 10000
#define CONSENTS_PER_LOCAL 10
#define NREQ 8192 /* distinct requests, cycled */
#define BATCH 64

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static unsigned pick(unsigned n)
{
	return (unsigned)(rnd() % n);
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "policy_bench: %s\n", what);
	exit(1);
}

static void must(int rc, const char *what)
{
	if (rc != 0) {
		fprintf(stderr, "policy_bench: %s: %d\n", what, rc);
		exit(1);
	}
}

/* The rule population; a request picks from it to hit. */
enum { R_DOMAIN, R_WILD, R_USER, R_NET, R_NETWILD };

static int rule_kind(int i)
{
	/* 40% exact domains, 20% wildcard domains, 30% users, 9% networks,
	 * 1% network wildcards. */
	int m = i % 100;
	return m < 40 ? R_DOMAIN : m < 60 ? R_WILD : m < 90 ? R_USER : m < 99 ? R_NET : R_NETWILD;
}

static struct policy_snapshot *build(size_t *nfacts)
{
	struct policy_builder *b = policy_builder_new();
	if (!b)
		die("out of memory");
	policy_builder_defaults(b, POLICY_MODE_OPEN, false);
	char pat[256];
	for (int i = 0; i < NRULES; i++) {
		enum policy_scope sc;
		switch (rule_kind(i)) {
		case R_DOMAIN: sc = POLICY_SCOPE_DOMAIN; snprintf(pat, sizeof(pat), "d%d.example", i); break;
		case R_WILD: sc = POLICY_SCOPE_DOMAIN; snprintf(pat, sizeof(pat), "*.w%d.example", i); break;
		case R_USER: sc = POLICY_SCOPE_USER; snprintf(pat, sizeof(pat), "mimi://u%d.example/u/x%d", i, i); break;
		case R_NET: sc = POLICY_SCOPE_NETWORK; snprintf(pat, sizeof(pat), "peer:n%d", i); break;
		default: sc = POLICY_SCOPE_NETWORK; snprintf(pat, sizeof(pat), "br%d:*", i); break;
		}
		/* Mostly open; some closed, allowlist, deny, limits only. */
		static const enum policy_mode modes[] = { POLICY_MODE_OPEN, POLICY_MODE_OPEN, POLICY_MODE_OPEN,
							  POLICY_MODE_OPEN, POLICY_MODE_OPEN, POLICY_MODE_OPEN,
							  POLICY_MODE_CLOSED, POLICY_MODE_ALLOWLIST, POLICY_MODE_DENY,
							  POLICY_MODE_NONE };
		struct policy_limits l = { 0 };
		if (i % 5 == 0) {
			l.set = POLICY_LIM_MSG_MINUTE | POLICY_LIM_MSG_MINUTE_USER | POLICY_LIM_MAX_BODY |
				POLICY_LIM_NEW_CONV_HOUR | POLICY_LIM_CONSENT_REQ_DAY;
			l.messages_per_minute = 600;
			l.messages_per_minute_per_user = 60;
			l.new_conversations_per_hour = 20;
			l.consent_requests_per_day = 10;
			l.max_body_bytes = 65536;
			/* CW_BENCH_OUTBOUND_LIMITS=1: local senders' outbound
			 * limits too (twenty-sixth session), so that outbound
			 * decisions take their buckets; unset, the workload is
			 * the earlier sessions'. */
			if (getenv("CW_BENCH_OUTBOUND_LIMITS")) {
				l.set |= POLICY_LIM_OUT_MSG_MINUTE_USER | POLICY_LIM_OUT_NEW_CONV_HOUR_USER;
				l.outbound_messages_per_minute_per_user = 30;
				l.outbound_new_conversations_per_hour_per_user = 20;
			}
		}
		must(policy_builder_rule(b, i + 1, sc, pat, modes[i % 10], &l, i % 50 == 7 ? 1000 : 0), pat);
	}
	char local[128], subj[128];
	*nfacts = 0;
	for (int u = 0; u < NLOCAL; u++) {
		snprintf(local, sizeof(local), "mimi://hub.example/u/l%d", u);
		must(policy_builder_optin(b, local, "matrix", true), "optin");
		must(policy_builder_optin(b, local, "xmpp", u % 3 != 0), "optin");
		*nfacts += 2;
		for (int k = 0; k < CONSENTS_PER_LOCAL; k++) {
			/* Subjects: remote users r<u*10+k> of c<...>.example, some domains. */
			int id = u * CONSENTS_PER_LOCAL + k;
			if (k < 8) {
				snprintf(subj, sizeof(subj), "mimi://c%d.example/u/r%d", id % 5000, id);
				must(policy_builder_consent(b, local, false, subj, k != 7), "consent");
			} else {
				snprintf(subj, sizeof(subj), "c%d.example", (id * 7) % 5000);
				must(policy_builder_consent(b, local, true, subj, k == 8), "consent");
			}
			(*nfacts)++;
		}
		if (u % 10 == 0) {
			snprintf(subj, sizeof(subj), "mimi://c%d.example/u/r%d", u % 5000, u);
			must(policy_builder_remote_block(b, subj, local), "remote block");
			(*nfacts)++;
		}
	}
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	if (!s)
		die("out of memory");
	return s;
}

struct req_mem {
	char suri[160], sdom[96], snet[32];
	char ruri[160], rdom[96], rnet[32];
};

/* A remote party: a rule hit (any kind) half of the time, else unknown or
 * a consent subject. */
static void remote_party(char *uri, char *dom, char *net, int *consent_id)
{
	*consent_id = -1;
	strcpy(net, pick(2) ? "matrix" : "xmpp");
	unsigned what = pick(10);
	if (what < 5) {
		int i = (int)pick(NRULES);
		switch (rule_kind(i)) {
		case R_DOMAIN: sprintf(dom, "d%d.example", i); sprintf(uri, "mimi://%s/u/s%u", dom, pick(1000)); break;
		case R_WILD: sprintf(dom, "h%u.w%d.example", pick(9), i); sprintf(uri, "mimi://%s/u/s%u", dom, pick(1000)); break;
		case R_USER: sprintf(dom, "u%d.example", i); sprintf(uri, "mimi://%s/u/x%d", dom, i); break;
		case R_NET: sprintf(dom, "n%u.example", pick(100000)); sprintf(uri, "mimi://%s/u/s", dom); sprintf(net, "peer:n%d", i); break;
		default: sprintf(dom, "n%u.example", pick(100000)); sprintf(uri, "mimi://%s/u/s", dom); sprintf(net, "br%d:x", i); break;
		}
	} else if (what < 8) {
		/* A consent subject (the caller pairs it with its local user). */
		int id = (int)pick(NLOCAL * CONSENTS_PER_LOCAL);
		*consent_id = id;
		sprintf(dom, "c%d.example", id % 5000);
		sprintf(uri, "mimi://%s/u/r%d", dom, id);
	} else {
		sprintf(dom, "unknown%u.example", pick(100000));
		sprintf(uri, "mimi://%s/u/z%u", dom, pick(1000));
	}
}

static void make_requests(struct policy_request *rq, struct req_mem *m)
{
	static const char *const types[] = { "message", "message", "message", "message", "edit", "reaction",
					     "receipt", "typing" };
	for (int i = 0; i < NREQ; i++) {
		struct policy_request *r = &rq[i];
		struct req_mem *x = &m[i];
		memset(r, 0, sizeof(*r));
		unsigned d = pick(100);
		r->direction = d < 60 ? POLICY_INBOUND : d < 85 ? POLICY_OUTBOUND : POLICY_TRANSIT;
		unsigned a = pick(100);
		r->action = a < 90 ? POLICY_ACT_EVENT : a < 95 ? POLICY_ACT_NEW_ROOM : POLICY_ACT_CONSENT_REQUEST;
		r->event_type = r->action == POLICY_ACT_EVENT ? types[pick(8)] : NULL;
		int cid, cid2;
		char *lu, *ld, *ln_;
		if (r->direction == POLICY_INBOUND) {
			remote_party(x->suri, x->sdom, x->snet, &cid);
			lu = x->ruri, ld = x->rdom, ln_ = x->rnet;
		} else if (r->direction == POLICY_OUTBOUND) {
			remote_party(x->ruri, x->rdom, x->rnet, &cid);
			lu = x->suri, ld = x->sdom, ln_ = x->snet;
		} else {
			remote_party(x->suri, x->sdom, x->snet, &cid);
			remote_party(x->ruri, x->rdom, x->rnet, &cid2);
			lu = NULL, ld = NULL, ln_ = NULL;
		}
		if (lu) {
			/* The local user who has a fact about this subject, else anyone. */
			int u = cid >= 0 ? cid / CONSENTS_PER_LOCAL : (int)pick(NLOCAL + 1000);
			sprintf(lu, "mimi://hub.example/u/l%d", u);
			strcpy(ld, "hub.example");
			strcpy(ln_, "local");
		}
		r->sender = (struct policy_party){ x->suri, x->sdom, x->snet };
		r->recipient = (struct policy_party){ x->ruri, x->rdom, x->rnet };
		if (r->action == POLICY_ACT_NEW_ROOM && r->direction != POLICY_OUTBOUND && pick(2))
			r->recipient.uri = NULL;
		r->body_bytes = pick(100) == 0 ? 100000 : pick(4000);
		r->attachment_bytes = pick(10) == 0 ? pick(1 << 20) : 0;
		r->content_kinds = POLICY_KIND_TEXT | (r->attachment_bytes ? POLICY_KIND_MEDIA : 0);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

struct run {
	double median, p99, mean;
	long verdicts[4];
};

/* Times n decisions (rounded up to whole batches) over the requests; with
 * memo_rl, each decision through a memo of its own over that table (rate
 * is then not used). */
static struct run time_decisions(const struct policy_snapshot *s, struct policy_request *rq, long n,
				 const struct policy_rate *rate, int64_t wall0, struct ratelimit *memo_rl)
{
	long batches = (n + BATCH - 1) / BATCH;
	double *per = malloc(sizeof(double) * (size_t)batches);
	if (!per)
		die("out of memory");
	struct run out = { 0 };
	struct policy_decision d;
	int64_t total = 0;
	long k = 0;
	for (long b = 0; b < batches; b++) {
		/* The wall clock moves 1 ms per 16 decisions (buckets refill). */
		int64_t wall = wall0 + (b * BATCH) / 16;
		for (int i = 0; i < BATCH; i++) {
			struct policy_request *r = &rq[(k + i) % NREQ];
			r->now_ms = wall;
			r->rate = rate;
		}
		int64_t t0 = now_ns();
		for (int i = 0; i < BATCH; i++) {
			struct policy_rate_memo m;
			if (memo_rl) {
				policy_rate_memo_init(&m, memo_rl);
				rq[k % NREQ].rate = &m.rate;
			}
			policy_decide(s, &rq[k % NREQ], &d);
			if (memo_rl)
				policy_rate_memo_finish(&m);
			out.verdicts[d.verdict & 3]++;
			k++;
		}
		int64_t dt = now_ns() - t0;
		total += dt;
		per[b] = (double)dt / BATCH;
	}
	qsort(per, (size_t)batches, sizeof(double), cmp_double);
	out.median = per[batches / 2];
	out.p99 = per[(long)((double)batches * 0.99)];
	out.mean = (double)total / (double)(batches * BATCH);
	free(per);
	return out;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000000;
	if (n < BATCH)
		n = BATCH;

	int64_t t0 = now_ns();
	size_t facts_added;
	struct policy_snapshot *s = build(&facts_added);
	double build_ms = (double)(now_ns() - t0) / 1e6;
	struct policy_snapshot *empty = policy_builder_finish(policy_builder_new(), 0);
	if (!empty)
		die("out of memory");

	struct policy_request *rq = calloc(NREQ, sizeof(*rq));
	struct req_mem *mem = calloc(NREQ, sizeof(*mem));
	if (!rq || !mem)
		die("out of memory");
	make_requests(rq, mem);

	struct ratelimit *rl = ratelimit_new(65536);
	if (!rl)
		die("out of memory");
	struct policy_rate rate = { ratelimit_policy_take, rl, ratelimit_policy_peek };
	int64_t wall0 = INT64_C(1700000000000);

	/* Warm up both, then measure alternately so that frequency changes
	 * hit both alike. */
	time_decisions(s, rq, n / 10, &rate, wall0, NULL);
	time_decisions(empty, rq, n / 10, &rate, wall0, NULL);
	struct run base = time_decisions(empty, rq, n / 2, &rate, wall0, NULL);
	struct run full = time_decisions(s, rq, n / 2, &rate, wall0 + 3600000, NULL);
	struct run base2 = time_decisions(empty, rq, n - n / 2, &rate, wall0, NULL);
	struct run full2 = time_decisions(s, rq, n - n / 2, &rate, wall0 + 7200000, NULL);
	/* The better half of each pair (less disturbed). */
	if (base2.median < base.median)
		base = base2;
	for (int v = 0; v < 4; v++)
		full.verdicts[v] += full2.verdicts[v];
	double mean = (full.mean + full2.mean) / 2;
	if (full2.median < full.median) {
		full.median = full2.median;
		full.p99 = full2.p99;
	}

	/* The same without buckets: what the rate limits cost. */
	struct run norate = time_decisions(s, rq, n / 2, NULL, wall0, NULL);

	/* Through a memo a decision, as the gateway asks the buckets (the
	 * better of two runs). */
	struct run memo = time_decisions(s, rq, n / 2, NULL, wall0 + 10800000, rl);
	struct run memo2 = time_decisions(s, rq, n / 2, NULL, wall0 + 14400000, rl);
	double memo_mean = memo.mean < memo2.mean ? memo.mean : memo2.mean;
	if (memo2.median < memo.median)
		memo = memo2;

	size_t used;
	uint64_t ev;
	ratelimit_stats(rl, &used, &ev);
	printf("policy.snapshot.build_ms %.1f\n", build_ms);
	printf("policy.snapshot.rules %zu\n", policy_snapshot_rule_count(s));
	printf("policy.snapshot.facts %zu\n", policy_snapshot_fact_count(s));
	printf("policy.snapshot.consents %d\n", NLOCAL * CONSENTS_PER_LOCAL);
	printf("policy.decide.decisions %ld\n", n);
	printf("policy.decide.batch %d\n", BATCH);
	printf("policy.decide.median_ns %.1f\n", full.median);
	printf("policy.decide.p99_ns %.1f\n", full.p99);
	printf("policy.decide.mean_ns %.1f\n", mean);
	printf("policy.decide.per_s_one_core %.0f\n", 1e9 / mean);
	printf("policy.decide.memo.median_ns %.1f\n", memo.median);
	printf("policy.decide.memo.p99_ns %.1f\n", memo.p99);
	printf("policy.decide.memo.per_s_one_core %.0f\n", 1e9 / memo_mean);
	printf("policy.decide.no_rate.median_ns %.1f\n", norate.median);
	printf("policy.decide.no_rate.p99_ns %.1f\n", norate.p99);
	printf("policy.baseline.median_ns %.1f\n", base.median);
	printf("policy.baseline.p99_ns %.1f\n", base.p99);
	printf("policy.decide.ratio_vs_empty %.2f\n", full.median / base.median);
	printf("policy.decide.verdicts allow=%ld deny=%ld hold=%ld limit=%ld\n", full.verdicts[POLICY_ALLOW],
	       full.verdicts[POLICY_DENY], full.verdicts[POLICY_HOLD], full.verdicts[POLICY_LIMIT]);
	printf("policy.ratelimit.buckets_used %zu\n", used);
	printf("policy.ratelimit.evictions %" PRIu64 "\n", ev);
	(void)facts_added;

	ratelimit_free(rl);
	free(rq);
	free(mem);
	policy_snapshot_free(empty);
	policy_snapshot_free(s);
	return 0;
}
