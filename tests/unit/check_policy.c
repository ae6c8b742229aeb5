/* The policy engine (policy/policy.c) and its token buckets
 * (policy/ratelimit.c): the precedence table-driven from
 * tests/unit/data/policy_cases.txt, property checks over generated
 * snapshots and requests, builder validation, and the bucket table. */
#include "config.h"
#include "fnv.h"
#include "policy.h"
#include "policy_json.h"
#include "policy_live.h"
#include "ratelimit.h"
#include "unit.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define DEFAULT_NOW INT64_C(1700000000000)

/* ------------------------------------------------------------ case file */

/* The case files' escapes (unit_decode); "<empty>" is "", "<null>" NULL.
 * Returns a malloc'd string. */
static char *decode(const char *s, bool *is_null)
{
	*is_null = strcmp(s, "<null>") == 0;
	if (*is_null)
		return NULL;
	if (strcmp(s, "<empty>") == 0)
		return strdup("");
	size_t len;
	return unit_decode(s, &len);
}

struct line {
	char *text;
	int no;
};

struct section {
	char title[200];
	bool builder;          /* a builder section, else a snapshot section */
	struct line *lines;    /* everything but the "===" line */
	int nlines;
};

struct casefile {
	struct section *sec;
	int nsec;
};

static void trim(char *s)
{
	size_t n = strlen(s);
	while (n && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' || s[n - 1] == '\t'))
		s[--n] = '\0';
}

static void load_casefile(struct casefile *cf)
{
	const char *path = unit_data_path("policy_cases.txt");
	FILE *f = fopen(path, "r");
	ck_assert_msg(f != NULL, "cannot open %s", path);
	memset(cf, 0, sizeof(*cf));
	char *buf = NULL;
	size_t cap = 0;
	int no = 0;
	while (getline(&buf, &cap, f) != -1) {
		no++;
		trim(buf);
		if (buf[0] == '#' || buf[0] == '\0')
			continue;
		if (strncmp(buf, "=== ", 4) == 0) {
			cf->sec = realloc(cf->sec, sizeof(*cf->sec) * (size_t)(cf->nsec + 1));
			ck_assert_ptr_nonnull(cf->sec);
			struct section *s = &cf->sec[cf->nsec++];
			memset(s, 0, sizeof(*s));
			if (strncmp(buf + 4, "snapshot ", 9) == 0) {
				snprintf(s->title, sizeof(s->title), "%.199s", buf + 13);
			} else {
				ck_assert_msg(strncmp(buf + 4, "builder ", 8) == 0, "line %d: unknown section %s", no, buf);
				s->builder = true;
				snprintf(s->title, sizeof(s->title), "%.199s", buf + 12);
			}
			continue;
		}
		ck_assert_msg(cf->nsec > 0, "line %d: outside a section", no);
		struct section *s = &cf->sec[cf->nsec - 1];
		s->lines = realloc(s->lines, sizeof(*s->lines) * (size_t)(s->nlines + 1));
		ck_assert_ptr_nonnull(s->lines);
		s->lines[s->nlines].text = strdup(buf);
		s->lines[s->nlines++].no = no;
	}
	free(buf);
	fclose(f);
}

static void free_casefile(struct casefile *cf)
{
	for (int i = 0; i < cf->nsec; i++) {
		for (int j = 0; j < cf->sec[i].nlines; j++)
			free(cf->sec[i].lines[j].text);
		free(cf->sec[i].lines);
	}
	free(cf->sec);
}

/* Splits s in place on blanks; returns the count. */
static int split(char *s, char **tok, int max)
{
	int n = 0;
	for (char *p = strtok(s, " \t"); p; p = strtok(NULL, " \t")) {
		ck_assert_int_lt(n, max);
		tok[n++] = p;
	}
	return n;
}

struct alias {
	char name[32];
	char *uri, *network, *domain; /* NULL: a NULL string */
};

struct env {
	struct alias al[64];
	int nal;
	int64_t now;
};

static char *dash_dup(const char *s)
{
	return strcmp(s, "-") == 0 ? NULL : strdup(s);
}

/* The authority of a mimi:// URI (malloc'd), or NULL. */
static char *uri_domain(const char *uri)
{
	if (!uri || strncmp(uri, "mimi://", 7) != 0)
		return NULL;
	const char *a = uri + 7, *e = strchr(a, '/');
	return strndup(a, e ? (size_t)(e - a) : strlen(a));
}

static const char *user(const struct env *env, const char *s)
{
	for (int i = 0; i < env->nal; i++)
		if (strcmp(env->al[i].name, s) == 0)
			return env->al[i].uri;
	return s;
}

static void env_free(struct env *env)
{
	for (int i = 0; i < env->nal; i++) {
		free(env->al[i].uri);
		free(env->al[i].network);
		free(env->al[i].domain);
	}
	env->nal = 0;
}

static void parse_limit(const char *opt, struct policy_limits *l, int64_t *expires, int no)
{
	char name[32];
	const char *eq = strchr(opt, '=');
	ck_assert_msg(eq && (size_t)(eq - opt) < sizeof(name), "line %d: bad option %s", no, opt);
	memcpy(name, opt, (size_t)(eq - opt));
	name[eq - opt] = '\0';
	const char *v = eq + 1;
	unsigned long long n = strtoull(v, NULL, 10);
	if (!strcmp(name, "mpm")) {
		l->messages_per_minute = (uint32_t)n;
		l->set |= POLICY_LIM_MSG_MINUTE;
	} else if (!strcmp(name, "mpu")) {
		l->messages_per_minute_per_user = (uint32_t)n;
		l->set |= POLICY_LIM_MSG_MINUTE_USER;
	} else if (!strcmp(name, "ncu")) {
		l->new_conversations_per_hour = (uint32_t)n;
		l->set |= POLICY_LIM_NEW_CONV_HOUR;
	} else if (!strcmp(name, "cru")) {
		l->consent_requests_per_day = (uint32_t)n;
		l->set |= POLICY_LIM_CONSENT_REQ_DAY;
	} else if (!strcmp(name, "ncp")) {
		l->new_conversations_per_hour_per_user = (uint32_t)n;
		l->set |= POLICY_LIM_NEW_CONV_HOUR_USER;
	} else if (!strcmp(name, "crp")) {
		l->consent_requests_per_day_per_user = (uint32_t)n;
		l->set |= POLICY_LIM_CONSENT_REQ_DAY_USER;
	} else if (!strcmp(name, "omp")) {
		l->outbound_messages_per_minute_per_user = (uint32_t)n;
		l->set |= POLICY_LIM_OUT_MSG_MINUTE_USER;
	} else if (!strcmp(name, "onp")) {
		l->outbound_new_conversations_per_hour_per_user = (uint32_t)n;
		l->set |= POLICY_LIM_OUT_NEW_CONV_HOUR_USER;
	} else if (!strcmp(name, "body")) {
		l->max_body_bytes = n;
		l->set |= POLICY_LIM_MAX_BODY;
	} else if (!strcmp(name, "attach")) {
		l->max_attachment_bytes = n;
		l->set |= POLICY_LIM_MAX_ATTACH;
	} else if (!strcmp(name, "kinds")) {
		l->content_kinds = (strstr(v, "text") ? POLICY_KIND_TEXT : 0) | (strstr(v, "media") ? POLICY_KIND_MEDIA : 0);
		l->set |= POLICY_LIM_CONTENT_KINDS;
	} else if (!strcmp(name, "expires")) {
		*expires = (int64_t)strtoll(v, NULL, 10);
	} else if (!strcmp(name, "in_addition")) {
		l->in_addition = n != 0;
	} else {
		ck_abort_msg("line %d: unknown rule option %s", no, opt);
	}
}

static unsigned parse_kinds(const char *v)
{
	return (strstr(v, "text") ? POLICY_KIND_TEXT : 0) | (strstr(v, "media") ? POLICY_KIND_MEDIA : 0);
}

/* Builds the snapshot of a section (and its aliases and clock in env). */
static struct policy_snapshot *build_section(const struct section *sec, struct env *env)
{
	memset(env, 0, sizeof(*env));
	env->now = DEFAULT_NOW;
	struct policy_builder *b = policy_builder_new();
	ck_assert_ptr_nonnull(b);
	/* Aliases first: facts may name them before their line. */
	for (int pass = 0; pass < 2; pass++) {
		for (int i = 0; i < sec->nlines; i++) {
			const struct line *ln = &sec->lines[i];
			if (strncmp(ln->text, "case ", 5) == 0)
				continue;
			char *copy = strdup(ln->text), *t[24];
			int n = split(copy, t, 24);
			bool is_party = strcmp(t[0], "party") == 0;
			if (pass == 0 && is_party) {
				ck_assert_msg(n == 4 || n == 5, "line %d: party <alias> <uri> <network> [<domain>]", ln->no);
				ck_assert_int_lt(env->nal, 64);
				struct alias *a = &env->al[env->nal++];
				snprintf(a->name, sizeof(a->name), "%s", t[1]);
				a->uri = dash_dup(t[2]);
				a->network = dash_dup(t[3]);
				a->domain = n == 5 ? dash_dup(t[4]) : uri_domain(a->uri);
			} else if (pass == 1 && !is_party) {
				int rc = 0;
				if (!strcmp(t[0], "default")) {
					enum policy_mode m;
					ck_assert_msg(n == 3 && policy_mode_parse(t[1], &m), "line %d: bad default", ln->no);
					policy_builder_defaults(b, m, strcmp(t[2], "optin") == 0);
				} else if (!strcmp(t[0], "now")) {
					env->now = (int64_t)strtoll(t[1], NULL, 10);
				} else if (!strcmp(t[0], "rule")) {
					enum policy_scope sc;
					enum policy_mode m;
					ck_assert_msg(n >= 5 && policy_scope_parse(t[2], &sc) && policy_mode_parse(t[4], &m),
						      "line %d: bad rule", ln->no);
					struct policy_limits l = { 0 };
					int64_t exp = 0;
					for (int k = 5; k < n; k++)
						parse_limit(t[k], &l, &exp, ln->no);
					rc = policy_builder_rule(b, strtoll(t[1], NULL, 10), sc, t[3], m, &l, exp);
				} else if (!strcmp(t[0], "optin")) {
					ck_assert_msg(n == 4, "line %d: optin <local> <network> yes|no", ln->no);
					rc = policy_builder_optin(b, user(env, t[1]), t[2], strcmp(t[3], "yes") == 0);
				} else if (!strcmp(t[0], "allow") || !strcmp(t[0], "block")) {
					ck_assert_msg(n == 4, "line %d: allow|block user|domain <local> <subject>", ln->no);
					bool dom = strcmp(t[1], "domain") == 0;
					rc = policy_builder_consent(b, user(env, t[2]), dom, dom ? t[3] : user(env, t[3]),
								    strcmp(t[0], "allow") == 0);
				} else if (!strcmp(t[0], "remote_block")) {
					ck_assert_msg(n == 3, "line %d: remote_block <remote> <local>", ln->no);
					rc = policy_builder_remote_block(b, user(env, t[1]), user(env, t[2]));
				} else {
					ck_abort_msg("line %d: unknown line %s", ln->no, ln->text);
				}
				ck_assert_msg(rc == 0, "line %d: the builder refused: %s", ln->no, ln->text);
			}
			free(copy);
		}
	}
	struct policy_snapshot *s = policy_builder_finish(b, 7);
	ck_assert_ptr_nonnull(s);
	return s;
}

struct owned_party {
	struct policy_party p;
	char *mem[3];
};

static void resolve_party(const struct env *env, const char *tok, struct owned_party *op, bool *none)
{
	memset(op, 0, sizeof(*op));
	*none = false;
	if (strcmp(tok, "-") == 0) {
		*none = true;
		return;
	}
	for (int i = 0; i < env->nal; i++)
		if (strcmp(env->al[i].name, tok) == 0) {
			op->p.uri = env->al[i].uri;
			op->p.network = env->al[i].network;
			op->p.domain = env->al[i].domain;
			return;
		}
	char *copy = strdup(tok);
	char *bar = strchr(copy, '|');
	ck_assert_msg(bar != NULL, "party '%s' is neither an alias nor <uri>|<network>", tok);
	*bar = '\0';
	char *net = bar + 1, *dom = strchr(net, '|');
	if (dom)
		*dom++ = '\0';
	op->mem[0] = strdup(copy);
	op->mem[1] = strdup(net);
	op->mem[2] = dom ? strdup(dom) : uri_domain(copy);
	op->p.uri = op->mem[0];
	op->p.network = op->mem[1];
	op->p.domain = op->mem[2];
	free(copy);
}

static void free_party(struct owned_party *op)
{
	for (int i = 0; i < 3; i++)
		free(op->mem[i]);
}

/* Runs one case line; false with a message in err when it fails. */

/* n requests as prior, but with *uri (its sender's or recipient's) each
 * time another user of the same domain and network ("<uri>-other<i>"). */
static void decide_as_others(const struct policy_snapshot *s, struct policy_request *prior, const char **uri, int n)
{
	const char *mine = *uri;
	struct policy_decision d;
	for (int i = 0; i < n; i++) {
		char other[4096];
		snprintf(other, sizeof(other), "%s-other%d", mine ? mine : "", i);
		*uri = other;
		policy_decide(s, prior, &d);
	}
	*uri = mine;
}

static bool run_case(const struct policy_snapshot *s, const struct env *env, const struct line *ln, char *err,
		     size_t errlen)
{
	char *copy = strdup(ln->text + 5);
	char *arrow = strstr(copy, " => ");
	ck_assert_msg(arrow != NULL, "line %d: no ' => '", ln->no);
	*arrow = '\0';
	/* The name may hold ": ", the request never does. */
	char *colon = NULL;
	for (char *p = strstr(copy, ": "); p; p = strstr(p + 1, ": "))
		colon = p;
	ck_assert_msg(colon != NULL, "line %d: case <name>: ...", ln->no);
	*colon = '\0';
	const char *name = copy;
	char *t[24], *x[8];
	int n = split(colon + 2, t, 24), nx = split(arrow + 4, x, 8);
	ck_assert_msg(n >= 4 && (nx == 3 || nx == 4), "line %d: bad case line", ln->no);

	struct policy_request r = { 0 };
	if (!strcmp(t[0], "in"))
		r.direction = POLICY_INBOUND;
	else if (!strcmp(t[0], "out"))
		r.direction = POLICY_OUTBOUND;
	else if (!strcmp(t[0], "transit"))
		r.direction = POLICY_TRANSIT;
	else
		ck_abort_msg("line %d: bad direction %s", ln->no, t[0]);
	if (!strcmp(t[1], "new_room")) {
		r.action = POLICY_ACT_NEW_ROOM;
	} else if (!strcmp(t[1], "consent_request")) {
		r.action = POLICY_ACT_CONSENT_REQUEST;
	} else if (!strcmp(t[1], "first_contact")) {
		r.action = POLICY_ACT_FIRST_CONTACT;
	} else {
		r.action = POLICY_ACT_EVENT;
		r.event_type = t[1];
	}
	struct owned_party snd, rcp;
	bool none;
	resolve_party(env, t[2], &snd, &none);
	ck_assert_msg(!none, "line %d: a sender is needed", ln->no);
	resolve_party(env, t[3], &rcp, &none);
	r.sender = snd.p;
	r.recipient = rcp.p;
	r.content_kinds = POLICY_KIND_TEXT;
	r.now_ms = env->now;
	bool rate_on = true;
	int after = 0, others = 0, others_to = 0;
	/* What the prior requests (after=) carry, and whom they go to. */
	uint64_t prior_body = 0, prior_attach = 0;
	unsigned prior_kinds = POLICY_KIND_TEXT;
	struct owned_party prior_rcp = { 0 }, prior_snd = { 0 };
	bool prior_to = false, prior_from = false;
	for (int k = 4; k < n; k++) {
		if (!strncmp(t[k], "body=", 5))
			r.body_bytes = strtoull(t[k] + 5, NULL, 10);
		else if (!strncmp(t[k], "attach=", 7))
			r.attachment_bytes = strtoull(t[k] + 7, NULL, 10);
		else if (!strncmp(t[k], "kinds=", 6))
			r.content_kinds = parse_kinds(t[k] + 6);
		else if (!strncmp(t[k], "now=", 4))
			r.now_ms = (int64_t)strtoll(t[k] + 4, NULL, 10);
		else if (!strncmp(t[k], "after=", 6))
			after = atoi(t[k] + 6);
		else if (!strncmp(t[k], "others=", 7))
			others = atoi(t[k] + 7);
		else if (!strncmp(t[k], "others_to=", 10))
			others_to = atoi(t[k] + 10);
		else if (!strncmp(t[k], "prior_body=", 11))
			prior_body = strtoull(t[k] + 11, NULL, 10);
		else if (!strncmp(t[k], "prior_attach=", 13))
			prior_attach = strtoull(t[k] + 13, NULL, 10);
		else if (!strncmp(t[k], "prior_kinds=", 12))
			prior_kinds = parse_kinds(t[k] + 12);
		else if (!strncmp(t[k], "prior_to=", 9) && !prior_to) {
			resolve_party(env, t[k] + 9, &prior_rcp, &none);
			ck_assert_msg(!none, "line %d: prior_to needs a recipient", ln->no);
			prior_to = true;
		}
		else if (!strncmp(t[k], "prior_from=", 11) && !prior_from) {
			resolve_party(env, t[k] + 11, &prior_snd, &none);
			ck_assert_msg(!none, "line %d: prior_from needs a sender", ln->no);
			prior_from = true;
		}
		else if (!strcmp(t[k], "group"))
			r.group = true;
		else if (!strcmp(t[k], "started"))
			r.started_in_request = true;
		else if (!strcmp(t[k], "invite"))
			r.invitation = true;
		else if (!strcmp(t[k], "norate"))
			rate_on = false;
		else if (!strcmp(t[k], "wrote"))
			r.recipient_wrote_here = true;
		else
			ck_abort_msg("line %d: unknown option %s", ln->no, t[k]);
	}
	struct ratelimit *rl = ratelimit_new(4096);
	ck_assert_ptr_nonnull(rl);
	struct policy_rate rate = { ratelimit_policy_take, rl, ratelimit_policy_peek };
	r.rate = rate_on ? &rate : NULL;

	struct policy_decision d;
	struct policy_request prior = r;
	prior.body_bytes = prior_body;
	prior.attachment_bytes = prior_attach;
	prior.content_kinds = prior_kinds;
	if (prior_to)
		prior.recipient = prior_rcp.p;
	if (prior_from)
		prior.sender = prior_snd.p;
	decide_as_others(s, &prior, &prior.sender.uri, others);
	decide_as_others(s, &prior, &prior.recipient.uri, others_to);
	for (int i = 0; i < after; i++)
		policy_decide(s, &prior, &d);
	memset(&d, 0x5a, sizeof(d));
	policy_decide(s, &r, &d);

	int64_t want_rule = strtoll(x[2], NULL, 10);
	int64_t want_retry = -1;
	if (nx == 4) {
		ck_assert_msg(strncmp(x[3], "retry=", 6) == 0, "line %d: bad %s", ln->no, x[3]);
		want_retry = strtoll(x[3] + 6, NULL, 10);
	}
	bool ok = strcmp(policy_verdict_name(d.verdict), x[0]) == 0 && d.reason && strcmp(d.reason, x[1]) == 0 &&
		  d.rule_id == want_rule;
	if (d.verdict == POLICY_LIMIT)
		ok = ok && d.retry_after_ms > 0 && (want_retry < 0 || d.retry_after_ms == want_retry);
	else
		ok = ok && d.retry_after_ms == 0 && want_retry < 0;
	if (!ok)
		snprintf(err, errlen, "line %d '%s': expected %s %s %s%s%s, got %s %s %" PRId64 " retry=%" PRId64,
			 ln->no, name, x[0], x[1], x[2], nx == 4 ? " " : "", nx == 4 ? x[3] : "",
			 policy_verdict_name(d.verdict), d.reason ? d.reason : "(null)", d.rule_id, d.retry_after_ms);
	ratelimit_free(rl);
	free_party(&snd);
	free_party(&rcp);
	free_party(&prior_rcp);
	free_party(&prior_snd);
	free(copy);
	return ok;
}

/* Every "case" line of every snapshot section. */
START_TEST(policy_cases)
{
	struct casefile cf;
	load_casefile(&cf);
	int ncases = 0, failed = 0;
	bool seen_reason[64] = { false };
	for (int i = 0; i < cf.nsec; i++) {
		const struct section *sec = &cf.sec[i];
		if (sec->builder)
			continue;
		struct env env;
		struct policy_snapshot *s = build_section(sec, &env);
		for (int j = 0; j < sec->nlines; j++) {
			const struct line *ln = &sec->lines[j];
			if (strncmp(ln->text, "case ", 5) != 0)
				continue;
			ncases++;
			char err[1024];
			if (!run_case(s, &env, ln, err, sizeof(err))) {
				fprintf(stderr, "policy case failed: [%s] %s\n", sec->title, err);
				failed++;
			}
			const char *exp = strstr(ln->text, " => ");
			for (int k = 0; policy_reason_codes[k]; k++) {
				size_t rl = strlen(policy_reason_codes[k]);
				const char *p = strchr(exp + 4, ' ');
				if (p && (size_t)(strchr(p + 1, ' ') - (p + 1)) == rl && !strncmp(p + 1, policy_reason_codes[k], rl))
					seen_reason[k] = true;
			}
		}
		env_free(&env);
		policy_snapshot_free(s);
	}
	free_casefile(&cf);
	ck_assert_msg(failed == 0, "%d of %d policy cases failed (see stderr)", failed, ncases);
	ck_assert_int_ge(ncases, 70);
	/* The table covers every reason code. */
	for (int k = 0; policy_reason_codes[k]; k++)
		ck_assert_msg(seen_reason[k], "no case expects reason %s", policy_reason_codes[k]);
}
END_TEST

/* Every "check" line of every builder section, in order on one builder. */
START_TEST(builder_cases)
{
	struct casefile cf;
	load_casefile(&cf);
	int nchecks = 0;
	for (int i = 0; i < cf.nsec; i++) {
		const struct section *sec = &cf.sec[i];
		if (!sec->builder)
			continue;
		struct policy_builder *b = policy_builder_new();
		ck_assert_ptr_nonnull(b);
		for (int j = 0; j < sec->nlines; j++) {
			const struct line *ln = &sec->lines[j];
			char *copy = strdup(ln->text), *t[8];
			int n = split(copy, t, 8);
			ck_assert_msg(n >= 5 && !strcmp(t[0], "check") && !strcmp(t[n - 2], "=>"),
				      "line %d: check <scope> <pattern> [<mode>] => <rc>", ln->no);
			enum policy_scope sc;
			enum policy_mode m = POLICY_MODE_OPEN;
			ck_assert_msg(policy_scope_parse(t[1], &sc), "line %d: bad scope", ln->no);
			if (n == 6)
				ck_assert_msg(policy_mode_parse(t[3], &m), "line %d: bad mode", ln->no);
			bool is_null;
			char *pat = decode(t[2], &is_null);
			int rc = policy_builder_rule(b, ln->no, sc, pat, m, NULL, 0);
			ck_assert_msg(rc == atoi(t[n - 1]), "line %d [%s]: %s %s gave %d, expected %s", ln->no, sec->title,
				      t[1], t[2], rc, t[n - 1]);
			free(pat);
			free(copy);
			nchecks++;
		}
		struct policy_snapshot *s = policy_builder_finish(b, 1);
		ck_assert_ptr_nonnull(s);
		policy_snapshot_free(s);
	}
	free_casefile(&cf);
	ck_assert_int_ge(nchecks, 40);
}
END_TEST

/* ------------------------------------------------------------ helpers */

static uint64_t rng_state;

static uint64_t rnd(void)
{
	uint64_t x = rng_state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return rng_state = x;
}

static unsigned pick(unsigned n)
{
	return (unsigned)(rnd() % n);
}

static const char *const domains[] = { "a.example", "x.a.example", "y.x.a.example", "b.example", "c.org",
				       "d.net", "spam.example", "z.spam.example" };
static const char *const networks[] = { "matrix", "xmpp", "peer:gk", "peer:ab", "slack", "bridge:one" };
static const char *const locals[] = { "mimi://hub.example/u/l0", "mimi://hub.example/u/l1",
				      "mimi://hub.example/u/l2" };
#define NDOM (sizeof(domains) / sizeof(domains[0]))
#define NNET (sizeof(networks) / sizeof(networks[0]))
#define NLOC (sizeof(locals) / sizeof(locals[0]))
#define NUSR 3

struct gparty {
	char uri[128];
	const char *domain, *network;
};

static void gen_remote(struct gparty *p)
{
	p->domain = domains[pick(NDOM)];
	p->network = networks[pick(NNET)];
	snprintf(p->uri, sizeof(p->uri), "mimi://%s/u/u%u", p->domain, pick(NUSR));
}

static void gen_local(struct gparty *p)
{
	snprintf(p->uri, sizeof(p->uri), "%s", locals[pick(NLOC)]);
	p->domain = "hub.example";
	p->network = "local";
}

static struct policy_party as_party(const struct gparty *g)
{
	struct policy_party p = { g->uri, g->domain, g->network };
	return p;
}

static const enum policy_mode modes[] = { POLICY_MODE_NONE, POLICY_MODE_OPEN, POLICY_MODE_ALLOWLIST,
					  POLICY_MODE_CLOSED, POLICY_MODE_DENY };

static void gen_limits(struct policy_limits *l)
{
	memset(l, 0, sizeof(*l));
	l->set = (unsigned)rnd() & 0x7ff & (unsigned)rnd();
	l->messages_per_minute = 1 + pick(3);
	l->messages_per_minute_per_user = 1 + pick(3);
	l->new_conversations_per_hour = 1 + pick(3);
	l->consent_requests_per_day = 1 + pick(3);
	l->new_conversations_per_hour_per_user = 1 + pick(3);
	l->consent_requests_per_day_per_user = 1 + pick(3);
	l->outbound_messages_per_minute_per_user = 1 + pick(3);
	l->outbound_new_conversations_per_hour_per_user = 1 + pick(3);
	l->max_body_bytes = pick(2000);
	l->max_attachment_bytes = pick(2000);
	l->content_kinds = pick(4);
}

/* Random rules and facts; avoid_deny: no rule with mode deny. */
/* One consent fact of local user locals[local]: an opt-in, a decision
 * about a remote user or domain, or a remote user's block. */
struct gfact {
	int kind; /* 0 opt-in, 1 consent, 2 remote block */
	size_t local;
	bool domain;
	char subj[128];
	bool val;
};

static void gen_fact(struct gfact *f, size_t local)
{
	memset(f, 0, sizeof(*f));
	f->local = local;
	switch (f->kind = (int)pick(3)) {
	case 0:
		snprintf(f->subj, sizeof(f->subj), "%s", networks[pick(NNET)]);
		f->val = pick(2);
		break;
	case 1:
		if (pick(2)) {
			snprintf(f->subj, sizeof(f->subj), "mimi://%s/u/u%u", domains[pick(NDOM)], pick(NUSR));
		} else {
			f->domain = true;
			snprintf(f->subj, sizeof(f->subj), "%s", domains[pick(NDOM)]);
		}
		f->val = pick(2);
		break;
	default:
		snprintf(f->subj, sizeof(f->subj), "mimi://%s/u/u%u", domains[pick(NDOM)], pick(NUSR));
		break;
	}
}

static void put_gfact(struct policy_builder *b, const struct gfact *f)
{
	const char *l = locals[f->local];
	int rc = f->kind == 0 ? policy_builder_optin(b, l, f->subj, f->val)
		 : f->kind == 1 ? policy_builder_consent(b, l, f->domain, f->subj, f->val)
				: policy_builder_remote_block(b, f->subj, l);
	ck_assert_int_eq(rc, 0);
}

/* Defaults and up to 15 rules. */
static void gen_rules(struct policy_builder *b, bool avoid_deny, int64_t now)
{
	policy_builder_defaults(b, modes[1 + pick(3)], pick(2));
	int nrules = (int)pick(16);
	for (int i = 0; i < nrules; i++) {
		char pat[160];
		enum policy_scope sc = (enum policy_scope)pick(3);
		switch (sc) {
		case POLICY_SCOPE_DOMAIN:
			snprintf(pat, sizeof(pat), "%s%s", pick(2) ? "*." : "", domains[pick(NDOM)]);
			break;
		case POLICY_SCOPE_NETWORK: {
			const char *n = networks[pick(NNET)];
			const char *colon = strchr(n, ':');
			if (colon && pick(2))
				snprintf(pat, sizeof(pat), "%.*s:*", (int)(colon - n), n);
			else
				snprintf(pat, sizeof(pat), "%s", n);
			break;
		}
		default:
			snprintf(pat, sizeof(pat), "mimi://%s/u/u%u", domains[pick(NDOM)], pick(NUSR));
			break;
		}
		enum policy_mode m = modes[pick(avoid_deny ? 4 : 5)];
		struct policy_limits l;
		gen_limits(&l);
		int64_t exp = pick(3) == 0 ? now - 1 - pick(1000) : pick(2) ? 0 : now + 1 + pick(1000);
		int rc = policy_builder_rule(b, 100 + i, sc, pat, m, &l, exp);
		ck_assert_int_ne(rc, -2);
	}
}

static void gen_snapshot_body(struct policy_builder *b, bool avoid_deny, int64_t now)
{
	gen_rules(b, avoid_deny, now);
	int nfacts = (int)pick(40);
	for (int i = 0; i < nfacts; i++) {
		struct gfact f;
		gen_fact(&f, pick(NLOC));
		put_gfact(b, &f);
	}
}

static const char *const event_types[] = { "message", "edit", "delete", "reaction", "receipt", "typing",
					   "membership", "block" };

static void gen_request(struct policy_request *r, struct gparty *snd, struct gparty *rcp, bool *has_rcp)
{
	memset(r, 0, sizeof(*r));
	r->direction = (enum policy_direction)pick(3);
	r->action = pick(4) == 0 ? (enum policy_action)(1 + pick(2)) : POLICY_ACT_EVENT;
	r->event_type = r->action == POLICY_ACT_EVENT ? event_types[pick(8)] : NULL;
	if (r->direction == POLICY_OUTBOUND)
		gen_local(snd);
	else
		gen_remote(snd);
	if (r->direction == POLICY_INBOUND)
		gen_local(rcp);
	else
		gen_remote(rcp);
	*has_rcp = !(r->action == POLICY_ACT_NEW_ROOM && pick(2));
	r->sender = as_party(snd);
	if (*has_rcp)
		r->recipient = as_party(rcp);
	r->body_bytes = pick(3000);
	r->attachment_bytes = pick(3) ? 0 : pick(3000);
	r->content_kinds = 1 + pick(3);
	r->now_ms = DEFAULT_NOW;
	r->recipient_wrote_here = pick(4) == 0;
}

static bool known_reason(const char *reason)
{
	for (int k = 0; reason && policy_reason_codes[k]; k++)
		if (policy_reason_codes[k] == reason || strcmp(policy_reason_codes[k], reason) == 0)
			return true;
	return false;
}

static bool starts(const char *s, const char *prefix)
{
	return s && strncmp(s, prefix, strlen(prefix)) == 0;
}

/* The verdict a reason code goes with (docs/policy-reasons.md). */
static void check_consistent(const struct policy_request *r, const struct policy_decision *d, const char *what)
{
	ck_assert_msg(known_reason(d->reason), "%s: unknown reason %s", what, d->reason ? d->reason : "(null)");
	switch (d->verdict) {
	case POLICY_LIMIT:
		ck_assert_msg(starts(d->reason, "rate_limited_") && d->retry_after_ms > 0 && d->rule_id != 0,
			      "%s: limit %s", what, d->reason);
		/* outbound: only the local sender's own limits */
		ck_assert_msg((r->direction == POLICY_OUTBOUND) == starts(d->reason, "rate_limited_local_sender"),
			      "%s: %s limited %s", what, r->direction == POLICY_OUTBOUND ? "outbound" : "not outbound",
			      d->reason);
		break;
	case POLICY_HOLD:
		ck_assert_msg(!strcmp(d->reason, "no_consent_yet") && d->retry_after_ms == 0 && d->rule_id == 0,
			      "%s: hold %s", what, d->reason);
		ck_assert_msg(r->direction == POLICY_INBOUND, "%s: held but not inbound", what);
		break;
	case POLICY_ALLOW:
		ck_assert_msg(!strcmp(d->reason, "user_allowed_sender") || !strcmp(d->reason, "user_allowed_domain") ||
				      !strcmp(d->reason, "user_wrote_in_group") || !strcmp(d->reason, "outbound") || !strcmp(d->reason, "transit") ||
				      !strcmp(d->reason, "new_room"),
			      "%s: allow %s", what, d->reason);
		ck_assert_int_eq(d->retry_after_ms, 0);
		break;
	case POLICY_DENY:
		ck_assert_msg(!starts(d->reason, "rate_limited_") && strcmp(d->reason, "outbound") &&
				      strcmp(d->reason, "transit") && strcmp(d->reason, "new_room") &&
				      !starts(d->reason, "user_allowed_") && strcmp(d->reason, "user_wrote_in_group"),
			      "%s: deny %s", what, d->reason);
		ck_assert_int_eq(d->retry_after_ms, 0);
		if (starts(d->reason, "server_denied_") || !strcmp(d->reason, "too_large") ||
		    !strcmp(d->reason, "content_kind_disabled"))
			ck_assert_msg(d->rule_id != 0, "%s: %s without a rule", what, d->reason);
		break;
	default:
		ck_abort_msg("%s: unknown verdict %d", what, (int)d->verdict);
	}
}

/* ------------------------------------------------------------ properties */

/* A server deny rule matching a remote party denies, whatever else the
 * snapshot says about it. */
START_TEST(prop_server_deny_always_denies)
{
	rng_state = 0x9e3779b97f4a7c15ull;
	struct ratelimit *rl = ratelimit_new(4096);
	struct policy_rate rate = { ratelimit_policy_take, rl, ratelimit_policy_peek };
	for (int iter = 0; iter < 3000; iter++) {
		struct policy_request r;
		struct gparty snd, rcp, other;
		bool has_rcp;
		gen_request(&r, &snd, &rcp, &has_rcp);
		if (!has_rcp && r.direction == POLICY_OUTBOUND)
			continue; /* no remote party */
		r.rate = pick(2) ? &rate : NULL;
		/* The party to deny: a remote one. */
		const struct gparty *p = r.direction == POLICY_OUTBOUND ? &rcp
					 : r.direction == POLICY_TRANSIT && has_rcp && pick(2) ? &rcp
												: &snd;
		struct policy_builder *b = policy_builder_new();
		char pat[200];
		enum policy_scope sc;
		const char *dot = strchr(p->domain, '.'), *colon = strchr(p->network, ':');
		switch (pick(5)) {
		case 0: sc = POLICY_SCOPE_USER; snprintf(pat, sizeof(pat), "%s", p->uri); break;
		case 1: sc = POLICY_SCOPE_DOMAIN; snprintf(pat, sizeof(pat), "%s", p->domain); break;
		case 2: sc = POLICY_SCOPE_DOMAIN; snprintf(pat, sizeof(pat), "*.%s", dot ? dot + 1 : "nowhere"); break;
		case 3: sc = POLICY_SCOPE_NETWORK; snprintf(pat, sizeof(pat), "%s", p->network); break;
		default:
			sc = POLICY_SCOPE_NETWORK;
			snprintf(pat, sizeof(pat), "%.*s:*", colon ? (int)(colon - p->network) : 7,
				 colon ? p->network : "nowhere");
			break;
		}
		bool matches = !(strstr(pat, "nowhere"));
		ck_assert_int_eq(policy_builder_rule(b, 1, sc, pat, POLICY_MODE_DENY, NULL, pick(2) ? 0 : r.now_ms + 1), 0);
		/* Everything that could speak for the party. */
		for (size_t l = 0; l < NLOC; l++) {
			policy_builder_consent(b, locals[l], false, p->uri, true);
			policy_builder_consent(b, locals[l], true, p->domain, true);
			policy_builder_optin(b, locals[l], p->network, true);
		}
		gen_snapshot_body(b, false, r.now_ms);
		(void)other;
		struct policy_snapshot *s = policy_builder_finish(b, 1);
		ck_assert_ptr_nonnull(s);
		struct policy_decision d;
		policy_decide(s, &r, &d);
		check_consistent(&r, &d, "deny property");
		/* Inbound and in transit, an empty bucket of the sender's is
		 * answered first (limit), as for a block: never allowed or
		 * held. */
		if (matches)
			ck_assert_msg((d.verdict == POLICY_DENY && starts(d.reason, "server_denied_")) ||
					      (d.verdict == POLICY_LIMIT && r.direction != POLICY_OUTBOUND),
				      "iteration %d: %s %s not denied: %s %s", iter, policy_scope_name(sc), pat,
				      policy_verdict_name(d.verdict), d.reason);
		policy_snapshot_free(s);
	}
	ratelimit_free(rl);
}
END_TEST

/* A sender the local user allowed is never held; outbound is never held
 * nor limited; transit never held; every decision is consistent. */
START_TEST(prop_random_requests)
{
	rng_state = 0x243f6a8885a308d3ull;
	struct ratelimit *rl = ratelimit_new(4096);
	struct policy_rate rate = { ratelimit_policy_take, rl, ratelimit_policy_peek };
	int counts[4] = { 0 }, allowed_checked = 0;
	for (int snap = 0; snap < 300; snap++) {
		struct policy_builder *b = policy_builder_new();
		gen_snapshot_body(b, false, DEFAULT_NOW);
		/* Some local users allow a few senders outright. */
		struct gparty allowed[4];
		for (int i = 0; i < 4; i++) {
			gen_remote(&allowed[i]);
			policy_builder_consent(b, locals[i % NLOC], false, allowed[i].uri, true);
		}
		struct policy_snapshot *s = policy_builder_finish(b, (uint64_t)snap);
		ck_assert_ptr_nonnull(s);
		for (int iter = 0; iter < 100; iter++) {
			struct policy_request r;
			struct gparty snd, rcp;
			bool has_rcp;
			gen_request(&r, &snd, &rcp, &has_rcp);
			bool allowed_pair = false;
			if (r.direction == POLICY_INBOUND && pick(2)) {
				int i = (int)pick(4);
				snd = allowed[i];
				snprintf(rcp.uri, sizeof(rcp.uri), "%s", locals[i % NLOC]);
				r.sender = as_party(&snd);
				if (has_rcp) {
					r.recipient = as_party(&rcp);
					allowed_pair = true;
				}
			}
			r.rate = pick(4) ? &rate : NULL;
			r.now_ms += pick(100000);
			struct policy_decision d;
			policy_decide(s, &r, &d);
			counts[d.verdict]++;
			check_consistent(&r, &d, "random");
			if (allowed_pair) {
				allowed_checked++;
				ck_assert_msg(d.verdict != POLICY_HOLD, "an allowed sender held");
			}
			/* outbound limits: check_consistent (the local sender's own) */
			if (r.direction == POLICY_OUTBOUND)
				ck_assert_msg(d.verdict != POLICY_HOLD, "outbound %s", policy_verdict_name(d.verdict));
			if (r.direction == POLICY_TRANSIT)
				ck_assert_int_ne(d.verdict, POLICY_HOLD);
			/* Without buckets, decide is a function of its input. */
			if (!r.rate) {
				struct policy_decision d2;
				policy_decide(s, &r, &d2);
				ck_assert(d.verdict == d2.verdict && d.reason == d2.reason && d.rule_id == d2.rule_id);
			}
		}
		policy_snapshot_free(s);
	}
	/* The generator reaches every verdict. */
	for (int v = 0; v < 4; v++)
		ck_assert_msg(counts[v] > 0, "no %s verdict generated", policy_verdict_name((enum policy_verdict)v));
	ck_assert_int_gt(allowed_checked, 1000);
	ratelimit_free(rl);
}
END_TEST

/* An overlay (the current facts of some local users over a snapshot of
 * older ones) decides every request exactly as a snapshot built whole from
 * the same rules and facts, and reports the same facts. */
START_TEST(prop_overlay_decides_as_a_whole_rebuild)
{
	rng_state = 0x452821e638d01377ull;
	int compared = 0, differs_from_base = 0;
	for (int snap = 0; snap < 300; snap++) {
		struct policy_builder *bb = policy_builder_new(), *bw = policy_builder_new();
		uint64_t seed = rng_state;
		gen_rules(bb, false, DEFAULT_NOW);
		rng_state = seed;
		gen_rules(bw, false, DEFAULT_NOW); /* the same rules in both */
		struct gfact old[40], now[40];
		size_t nold = pick(40), nnow = pick(40);
		bool changed[NLOC];
		for (size_t l = 0; l < NLOC; l++)
			changed[l] = pick(2);
		for (size_t i = 0; i < nold; i++) {
			gen_fact(&old[i], pick(NLOC));
			put_gfact(bb, &old[i]);
			if (!changed[old[i].local])
				put_gfact(bw, &old[i]);
		}
		struct policy_snapshot *base = policy_builder_finish(bb, 1);
		ck_assert_ptr_nonnull(base);
		struct policy_builder *bo = policy_builder_overlay(base);
		ck_assert_ptr_nonnull(bo);
		for (size_t l = 0; l < NLOC; l++)
			if (changed[l])
				ck_assert_int_eq(policy_builder_user(bo, locals[l]), 0);
		for (size_t i = 0; i < nnow; i++) {
			size_t l = pick(NLOC);
			gen_fact(&now[i], l);
			if (changed[l]) {
				put_gfact(bo, &now[i]);
				put_gfact(bw, &now[i]);
			}
		}
		struct policy_snapshot *ov = policy_builder_finish(bo, 2), *whole = policy_builder_finish(bw, 2);
		ck_assert_ptr_nonnull(ov);
		ck_assert_ptr_nonnull(whole);
		ck_assert_ptr_eq(policy_snapshot_base(ov), base);
		ck_assert_uint_eq(policy_snapshot_rule_count(ov), policy_snapshot_rule_count(whole));
		/* each user's facts once: the overlay's for the users it names
		 * (until the forty-eighth session also their base's) */
		ck_assert_uint_eq(policy_snapshot_fact_count(ov), policy_snapshot_fact_count(whole));
		for (int iter = 0; iter < 100; iter++) {
			struct policy_request r;
			struct gparty snd, rcp;
			bool has_rcp;
			gen_request(&r, &snd, &rcp, &has_rcp);
			r.rate = NULL;
			struct policy_decision d1, d2, d0;
			policy_decide(ov, &r, &d1);
			policy_decide(whole, &r, &d2);
			policy_decide(base, &r, &d0);
			ck_assert_msg(d1.verdict == d2.verdict && d1.reason == d2.reason && d1.rule_id == d2.rule_id,
				      "snapshot %d: overlay %s %s, whole %s %s", snap, policy_verdict_name(d1.verdict),
				      d1.reason, policy_verdict_name(d2.verdict), d2.reason);
			differs_from_base += d0.verdict != d2.verdict || d0.reason != d2.reason;
			compared++;
		}
		for (size_t l = 0; l < NLOC; l++)
			for (size_t i = 0; i < nold + nnow; i++) {
				const struct gfact *f = i < nold ? &old[i] : &now[i - nold];
				if (f->kind == 0)
					ck_assert_int_eq(policy_optin_fact(ov, locals[l], f->subj),
							 policy_optin_fact(whole, locals[l], f->subj));
				if (f->kind == 1)
					ck_assert_int_eq(policy_consent_fact(ov, locals[l], f->domain, f->subj),
							 policy_consent_fact(whole, locals[l], f->domain, f->subj));
				if (f->kind == 2)
					ck_assert_int_eq(policy_remote_block_fact(ov, f->subj, locals[l]),
							 policy_remote_block_fact(whole, f->subj, locals[l]));
			}
		policy_snapshot_free(ov);
		policy_snapshot_free(whole);
		policy_snapshot_free(base);
	}
	ck_assert_int_eq(compared, 30000);
	/* The changes matter: decisions the base alone gets wrong were made. */
	ck_assert_int_gt(differs_from_base, 500);
}
END_TEST

START_TEST(overlay_edges)
{
	ck_assert_ptr_null(policy_builder_overlay(NULL));
	ck_assert_int_eq(policy_builder_user(NULL, "mimi://hub.example/u/l0"), -2);
	struct policy_builder *plain = policy_builder_new();
	ck_assert_int_eq(policy_builder_user(plain, "mimi://hub.example/u/l0"), -2); /* not an overlay */
	policy_builder_free(plain);
	struct policy_builder *b = policy_builder_new();
	policy_builder_consent(b, "mimi://hub.example/u/l0", false, "mimi://a.example/u/u1", true);
	struct policy_snapshot *base = policy_builder_finish(b, 1);
	/* A user named with no facts has none any more; a fact of a user not
	 * named is ignored; an overlay of an overlay is made over its base. */
	b = policy_builder_overlay(base);
	ck_assert_int_eq(policy_builder_user(b, "mimi://hub.example/u/l0"), 0);
	ck_assert_int_eq(policy_builder_user(b, ""), -1);
	policy_builder_consent(b, "mimi://hub.example/u/l1", false, "mimi://a.example/u/u1", true);
	struct policy_snapshot *ov = policy_builder_finish(b, 2);
	ck_assert_int_eq(policy_consent_fact(base, "mimi://hub.example/u/l0", false, "mimi://a.example/u/u1"), 1);
	ck_assert_int_eq(policy_consent_fact(ov, "mimi://hub.example/u/l0", false, "mimi://a.example/u/u1"), -1);
	ck_assert_int_eq(policy_consent_fact(ov, "mimi://hub.example/u/l1", false, "mimi://a.example/u/u1"), -1);
	ck_assert_uint_eq(policy_snapshot_fact_count(base), 1);
	ck_assert_uint_eq(policy_snapshot_fact_count(ov), 0); /* l0's none, l1's ignored */
	b = policy_builder_overlay(ov);
	struct policy_snapshot *ov2 = policy_builder_finish(b, 3);
	ck_assert_ptr_eq(policy_snapshot_base(ov2), base);
	ck_assert_int_eq(policy_consent_fact(ov2, "mimi://hub.example/u/l0", false, "mimi://a.example/u/u1"), 1);
	ck_assert_uint_eq(policy_snapshot_fact_count(ov2), 1);
	policy_snapshot_free(ov2);
	policy_snapshot_free(ov);
	policy_snapshot_free(base);
}
END_TEST

/* s == NULL: an empty snapshot (open, opted out); NULL strings anywhere. */
START_TEST(null_snapshot_and_null_strings)
{
	rng_state = 0x13198a2e03707344ull;
	struct policy_snapshot *empty = policy_builder_finish(policy_builder_new(), 1);
	ck_assert_ptr_nonnull(empty);
	for (int iter = 0; iter < 5000; iter++) {
		struct policy_request r;
		struct gparty snd, rcp;
		bool has_rcp;
		gen_request(&r, &snd, &rcp, &has_rcp);
		unsigned nulls = (unsigned)rnd();
		if (nulls & 1) r.sender.uri = NULL;
		if (nulls & 2) r.sender.domain = NULL;
		if (nulls & 4) r.sender.network = NULL;
		if (nulls & 8) r.recipient.domain = NULL;
		if (nulls & 16) r.recipient.network = NULL;
		if (nulls & 32) r.event_type = NULL;
		struct policy_decision d1, d2;
		policy_decide(NULL, &r, &d1);
		policy_decide(empty, &r, &d2);
		check_consistent(&r, &d1, "NULL snapshot");
		ck_assert(d1.verdict == d2.verdict && d1.reason == d2.reason && d1.rule_id == 0 && d2.rule_id == 0);
		bool local = r.direction == POLICY_INBOUND && r.recipient.uri;
		if (local) /* no facts: opted out by default, unless the recipient wrote in the group */
			ck_assert_str_eq(d1.reason, r.recipient_wrote_here ? "user_wrote_in_group" : "user_not_opted_in");
		else
			ck_assert_int_eq(d1.verdict, POLICY_ALLOW);
	}
	/* A snapshot with rules and facts, and requests made of NULLs. */
	struct policy_builder *b = policy_builder_new();
	policy_builder_defaults(b, POLICY_MODE_OPEN, true);
	struct policy_limits l = { .set = 0x7ff, .messages_per_minute = 1, .messages_per_minute_per_user = 1,
				   .new_conversations_per_hour = 1, .consent_requests_per_day = 1,
				   .new_conversations_per_hour_per_user = 1, .consent_requests_per_day_per_user = 1,
				   .outbound_messages_per_minute_per_user = 1,
				   .outbound_new_conversations_per_hour_per_user = 1,
				   .max_body_bytes = 10, .max_attachment_bytes = 10, .content_kinds = POLICY_KIND_TEXT };
	ck_assert_int_eq(policy_builder_rule(b, 1, POLICY_SCOPE_NETWORK, "peer:*", POLICY_MODE_NONE, &l, 0), 0);
	ck_assert_int_eq(policy_builder_rule(b, 2, POLICY_SCOPE_DOMAIN, "*.example", POLICY_MODE_NONE, &l, 0), 0);
	ck_assert_int_eq(policy_builder_consent(b, "mimi://hub.example/u/a", true, "x.example", true), 0);
	struct policy_snapshot *s = policy_builder_finish(b, 2);
	struct ratelimit *rl = ratelimit_new(512);
	struct policy_rate rate = { ratelimit_policy_take, rl, ratelimit_policy_peek };
	for (int dir = 0; dir < 3; dir++)
		for (int act = 0; act < 3; act++) {
			struct policy_request r = { .direction = (enum policy_direction)dir,
						    .action = (enum policy_action)act, .rate = &rate };
			struct policy_decision d;
			policy_decide(s, &r, &d);
			check_consistent(&r, &d, "all NULL");
			r.recipient.uri = "mimi://hub.example/u/a";
			policy_decide(s, &r, &d);
			check_consistent(&r, &d, "NULL but recipient");
		}
	ratelimit_free(rl);
	policy_snapshot_free(s);
	policy_snapshot_free(empty);
	ck_assert_uint_eq(policy_snapshot_rule_count(NULL), 0);
	ck_assert_uint_eq(policy_snapshot_fact_count(NULL), 0);
	ck_assert_uint_eq(policy_snapshot_version(NULL), 0);
	policy_snapshot_free(NULL);
	policy_builder_free(NULL);
	ck_assert_ptr_null(policy_builder_finish(NULL, 1));
}
END_TEST

/* ------------------------------------------------------------ bucket keys */

struct key_log {
	char keys[8][POLICY_RATE_KEY_MAX + 8];
	size_t lens[8];
	uint32_t caps[8];
	int64_t periods[8];
	int n;
	int64_t answer;
};

static int64_t log_take(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	struct key_log *kl = ctx;
	ck_assert_int_lt(kl->n, 8);
	kl->lens[kl->n] = strlen(key);
	ck_assert_uint_le(kl->lens[kl->n], POLICY_RATE_KEY_MAX);
	memcpy(kl->keys[kl->n], key, kl->lens[kl->n] + 1);
	kl->caps[kl->n] = capacity;
	kl->periods[kl->n++] = period_ms;
	return kl->answer;
}

/* The i-th bucket taken was key, of capacity cap per period. */
static void expect_take(const struct key_log *kl, int i, const char *key, uint32_t cap, int64_t period)
{
	ck_assert_str_eq(kl->keys[i], key);
	ck_assert_uint_eq(kl->caps[i], cap);
	ck_assert_int_eq(kl->periods[i], period);
}

START_TEST(bucket_keys)
{
	struct policy_builder *b = policy_builder_new();
	struct policy_limits mpm = { .set = POLICY_LIM_MSG_MINUTE | POLICY_LIM_MSG_MINUTE_USER,
				     .messages_per_minute = 10, .messages_per_minute_per_user = 3 };
	struct policy_limits conv = { .set = POLICY_LIM_NEW_CONV_HOUR | POLICY_LIM_CONSENT_REQ_DAY,
				      .new_conversations_per_hour = 4, .consent_requests_per_day = 5 };
	struct policy_limits one = { .set = POLICY_LIM_MSG_MINUTE, .messages_per_minute = 7 };
	struct policy_limits both = { .set = POLICY_LIM_NEW_CONV_HOUR | POLICY_LIM_CONSENT_REQ_DAY |
						 POLICY_LIM_NEW_CONV_HOUR_USER | POLICY_LIM_CONSENT_REQ_DAY_USER,
				      .new_conversations_per_hour = 6, .consent_requests_per_day = 8,
				      .new_conversations_per_hour_per_user = 2,
				      .consent_requests_per_day_per_user = 3 };
	ck_assert_int_eq(policy_builder_rule(b, 31, POLICY_SCOPE_DOMAIN, "*.lim.example", POLICY_MODE_NONE, &mpm, 0), 0);
	ck_assert_int_eq(policy_builder_rule(b, -5, POLICY_SCOPE_NETWORK, "peer:*", POLICY_MODE_NONE, &one, 0), 0);
	ck_assert_int_eq(policy_builder_rule(b, 9, POLICY_SCOPE_USER, "mimi://u.example/u/x", POLICY_MODE_NONE, &one, 0),
			 0);
	ck_assert_int_eq(policy_builder_rule(b, 12, POLICY_SCOPE_DOMAIN, "rooms.example", POLICY_MODE_OPEN, &conv, 0), 0);
	ck_assert_int_eq(policy_builder_rule(b, 13, POLICY_SCOPE_DOMAIN, "pu.example", POLICY_MODE_OPEN, &both, 0), 0);
	struct policy_limits out = { .set = POLICY_LIM_OUT_MSG_MINUTE_USER | POLICY_LIM_OUT_NEW_CONV_HOUR_USER,
				     .outbound_messages_per_minute_per_user = 30,
				     .outbound_new_conversations_per_hour_per_user = 4 };
	ck_assert_int_eq(policy_builder_rule(b, 14, POLICY_SCOPE_DOMAIN, "o.example", POLICY_MODE_NONE, &out, 0), 0);
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	struct key_log kl = { .answer = 0 };
	struct policy_rate rate = { log_take, &kl, NULL };
	struct policy_decision d;
	struct policy_request r = {
		.direction = POLICY_INBOUND, .action = POLICY_ACT_EVENT, .event_type = "message",
		.sender = { "mimi://a.b.lim.example/u/s", "a.b.lim.example", "matrix" },
		.recipient = { "mimi://hub.example/u/l", "hub.example", "local" },
		.now_ms = DEFAULT_NOW, .rate = &rate,
	};
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 2);
	ck_assert_str_eq(kl.keys[0], "mpm:31:*.lim.example");
	ck_assert_int_eq(kl.caps[0], 10);
	ck_assert_int_eq(kl.periods[0], 60000);
	ck_assert_str_eq(kl.keys[1], "mpu:31:mimi://a.b.lim.example/u/s");
	ck_assert_int_eq(kl.caps[1], 3);
	ck_assert_int_eq(kl.periods[1], 60000);

	kl.n = 0;
	r.sender = (struct policy_party){ "mimi://p.example/u/s", "p.example", "peer:gk" };
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 1);
	ck_assert_str_eq(kl.keys[0], "mpm:-5:peer:*");

	kl.n = 0;
	r.sender = (struct policy_party){ "mimi://u.example/u/x", "u.example", "peer:gk" };
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 1);
	ck_assert_str_eq(kl.keys[0], "mpm:9:mimi://u.example/u/x");
	ck_assert_int_eq(kl.caps[0], 7);

	kl.n = 0;
	r.sender = (struct policy_party){ "mimi://rooms.example/u/r", "rooms.example", "matrix" };
	r.action = POLICY_ACT_NEW_ROOM;
	r.recipient.uri = NULL;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 1);
	/* Like mpm: a domain rule's new conversations and consent requests
	 * are the domain's, whatever user names it rotates through. */
	ck_assert_str_eq(kl.keys[0], "ncu:12:rooms.example");
	ck_assert_int_eq(kl.caps[0], 4);
	ck_assert_int_eq(kl.periods[0], 3600000);
	kl.n = 0;
	r.action = POLICY_ACT_CONSENT_REQUEST;
	r.recipient.uri = "mimi://hub.example/u/l";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 1);
	ck_assert_str_eq(kl.keys[0], "cru:12:rooms.example");
	ck_assert_int_eq(kl.caps[0], 5);
	ck_assert_int_eq(kl.periods[0], 86400000);
	/* A first contact's request: the same limit, a bucket of its own. */
	kl.n = 0;
	r.action = POLICY_ACT_FIRST_CONTACT;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 1);
	ck_assert_str_eq(kl.keys[0], "crf:12:rooms.example");
	ck_assert_int_eq(kl.caps[0], 5);
	ck_assert_int_eq(kl.periods[0], 86400000);

	/* The per-user variants: the domain's bucket, then the sender's, as
	 * mpm's and mpu's; a first contact's apart from requestConsent's in
	 * both. */
	kl.n = 0;
	r.sender = (struct policy_party){ "mimi://pu.example/u/p", "pu.example", "matrix" };
	r.action = POLICY_ACT_NEW_ROOM;
	r.recipient.uri = NULL;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 2);
	ck_assert_str_eq(kl.keys[0], "ncu:13:pu.example");
	ck_assert_int_eq(kl.caps[0], 6);
	ck_assert_str_eq(kl.keys[1], "ncp:13:mimi://pu.example/u/p");
	ck_assert_int_eq(kl.caps[1], 2);
	ck_assert_int_eq(kl.periods[1], 3600000);
	kl.n = 0;
	r.action = POLICY_ACT_CONSENT_REQUEST;
	r.recipient.uri = "mimi://hub.example/u/l";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 2);
	ck_assert_str_eq(kl.keys[0], "cru:13:pu.example");
	ck_assert_int_eq(kl.caps[0], 8);
	ck_assert_str_eq(kl.keys[1], "crp:13:mimi://pu.example/u/p");
	ck_assert_int_eq(kl.caps[1], 3);
	ck_assert_int_eq(kl.periods[1], 86400000);
	kl.n = 0;
	r.action = POLICY_ACT_FIRST_CONTACT;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 2);
	ck_assert_str_eq(kl.keys[0], "crf:13:pu.example");
	ck_assert_str_eq(kl.keys[1], "cfp:13:mimi://pu.example/u/p");
	ck_assert_int_eq(kl.caps[1], 3);
	ck_assert_int_eq(kl.periods[1], 86400000);

	/* Outbound: only the outbound limits of the rules matching the
	 * recipient, a bucket per local sender: messages, then (a message
	 * in a direct room to a remote user she has no consent fact about)
	 * new conversations.  Typing and receipts take nothing. */
	kl.n = 0;
	r.direction = POLICY_OUTBOUND;
	r.action = POLICY_ACT_EVENT;
	r.event_type = "message";
	r.sender = (struct policy_party){ "mimi://hub.example/u/l", "hub.example", "local" };
	r.recipient = (struct policy_party){ "mimi://o.example/u/r", "o.example", "peer:gk" };
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 2);
	expect_take(&kl, 0, "omp:14:mimi://hub.example/u/l", 30, 60000);
	expect_take(&kl, 1, "onp:14:mimi://hub.example/u/l", 4, 3600000);
	kl.n = 0;
	r.group = true; /* a group's message starts no conversation */
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 1);
	ck_assert_str_eq(kl.keys[0], "omp:14:mimi://hub.example/u/l");
	r.group = false;
	kl.n = 0;
	r.event_type = "edit";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 1);
	kl.n = 0;
	r.event_type = "typing";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 0);
	r.event_type = "receipt";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 0);
	/* Nor are the inbound limits of the recipient's rules asked. */
	r.event_type = "message";
	r.recipient = (struct policy_party){ "mimi://a.lim.example/u/r", "a.lim.example", "matrix" };
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 0);
	ck_assert_str_eq(d.reason, "outbound");
	r.direction = POLICY_INBOUND;
	r.recipient = (struct policy_party){ "mimi://hub.example/u/l", "hub.example", "local" };

	/* A refusal is passed on as is; a zero or negative answer is a grant. */
	kl.n = 0;
	kl.answer = 1234;
	r.action = POLICY_ACT_EVENT;
	r.sender = (struct policy_party){ "mimi://u.example/u/x", "u.example", "matrix" };
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_LIMIT);
	ck_assert_str_eq(d.reason, "rate_limited_user");
	ck_assert_int_eq(d.retry_after_ms, 1234);
	ck_assert_int_eq(d.rule_id, 9);
	kl.n = 0;
	kl.answer = -1;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_DENY);
	ck_assert_str_eq(d.reason, "user_not_opted_in");

	/* A sender URI longer than a key: truncated, not overflowed. */
	size_t big = POLICY_RATE_KEY_MAX + 500;
	char *uri = malloc(big + 1);
	memcpy(uri, "mimi://x.lim.example/u/", 23);
	memset(uri + 23, 'q', big - 23);
	uri[big] = '\0';
	kl.n = 0;
	kl.answer = 0;
	r.sender = (struct policy_party){ uri, "x.lim.example", "matrix" };
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 2);
	ck_assert_str_eq(kl.keys[0], "mpm:31:*.lim.example");
	ck_assert_uint_eq(kl.lens[1], POLICY_RATE_KEY_MAX);
	ck_assert(strncmp(kl.keys[1], "mpu:31:mimi://x.lim.example/u/qqq", 33) == 0);
	free(uri);

	/* Outbound and rate NULL: no take at all. */
	kl.n = 0;
	r.direction = POLICY_OUTBOUND;
	r.sender = (struct policy_party){ "mimi://hub.example/u/l", "hub.example", "local" };
	r.recipient = (struct policy_party){ "mimi://a.lim.example/u/s", "a.lim.example", "matrix" };
	policy_decide(s, &r, &d);
	ck_assert_int_eq(kl.n, 0);
	ck_assert_str_eq(d.reason, "outbound");
	policy_snapshot_free(s);
}
END_TEST

/* ------------------------------------------------------------ builder, tables */

START_TEST(builder_facts_and_counts)
{
	struct policy_builder *b = policy_builder_new();
	const char *l = "mimi://hub.example/u/a";
	ck_assert_int_eq(policy_builder_optin(b, l, "matrix", true), 0);
	ck_assert_int_eq(policy_builder_optin(b, l, "matrix", false), 0); /* the later one wins */
	ck_assert_int_eq(policy_builder_optin(b, l, "peer:gk", true), 0);
	ck_assert_int_eq(policy_builder_consent(b, l, false, "mimi://x.example/u/b", true), 0);
	ck_assert_int_eq(policy_builder_consent(b, l, true, "mimi://x.example/u/b", false), 0); /* other kind */
	ck_assert_int_eq(policy_builder_remote_block(b, "mimi://x.example/u/b", l), 0);
	ck_assert_int_eq(policy_builder_remote_block(b, "mimi://x.example/u/b", l), 0);
	/* Malformed facts. */
	ck_assert_int_eq(policy_builder_optin(b, NULL, "matrix", true), -1);
	ck_assert_int_eq(policy_builder_optin(b, l, "", true), -1);
	ck_assert_int_eq(policy_builder_optin(b, "mimi://hub.example/u/a\x1fmatrix", "x", true), -1);
	ck_assert_int_eq(policy_builder_consent(b, l, false, NULL, true), -1);
	ck_assert_int_eq(policy_builder_consent(b, l, false, "a\x1f" "b", true), -1);
	ck_assert_int_eq(policy_builder_consent(b, "", true, "x.example", true), -1);
	ck_assert_int_eq(policy_builder_remote_block(b, NULL, l), -1);
	/* Malformed rules. */
	ck_assert_int_eq(policy_builder_rule(b, 1, (enum policy_scope)7, "a.example", POLICY_MODE_OPEN, NULL, 0), -1);
	ck_assert_int_eq(policy_builder_rule(b, 1, POLICY_SCOPE_DOMAIN, "a.example", (enum policy_mode)9, NULL, 0), -1);
	ck_assert_int_eq(policy_builder_rule(b, 1, POLICY_SCOPE_DOMAIN, "a.example", POLICY_MODE_OPEN, NULL, 0), 0);
	ck_assert_int_eq(policy_builder_rule(b, 2, POLICY_SCOPE_NETWORK, "matrix", POLICY_MODE_NONE, NULL, 0), 0);
	struct policy_snapshot *s = policy_builder_finish(b, 42);
	ck_assert_ptr_nonnull(s);
	ck_assert_uint_eq(policy_snapshot_version(s), 42);
	ck_assert_uint_eq(policy_snapshot_rule_count(s), 2);
	ck_assert_uint_eq(policy_snapshot_fact_count(s), 5);
	/* The facts as loaded, each by its own key. */
	ck_assert_int_eq(policy_optin_fact(s, l, "matrix"), 0);
	ck_assert_int_eq(policy_optin_fact(s, l, "peer:gk"), 1);
	ck_assert_int_eq(policy_optin_fact(s, l, "peer:tg"), -1);
	ck_assert_int_eq(policy_optin_fact(s, "mimi://hub.example/u/c", "matrix"), -1);
	ck_assert_int_eq(policy_optin_fact(s, NULL, "matrix"), -1);
	ck_assert_int_eq(policy_optin_fact(NULL, l, "matrix"), -1);
	/* The default for a network with no fact (the bots' answer to an
	 * accept of a domain says whether it takes effect). */
	ck_assert(!policy_optin_default(s));
	ck_assert(!policy_optin_default(NULL));
	struct policy_builder *bd = policy_builder_new();
	policy_builder_defaults(bd, POLICY_MODE_OPEN, true);
	struct policy_snapshot *sd = policy_builder_finish(bd, 43);
	ck_assert_ptr_nonnull(sd);
	ck_assert(policy_optin_default(sd));
	policy_snapshot_free(sd);
	ck_assert_int_eq(policy_consent_fact(s, l, false, "mimi://x.example/u/b"), 1);
	ck_assert_int_eq(policy_consent_fact(s, l, true, "mimi://x.example/u/b"), 0);
	/* A remote user's block of a local one (the recheck asks it of her
	 * waiting rows to his peer), one way only. */
	ck_assert(policy_remote_block_fact(s, "mimi://x.example/u/b", l));
	ck_assert(!policy_remote_block_fact(s, l, "mimi://x.example/u/b"));
	ck_assert(!policy_remote_block_fact(s, "mimi://x.example/u/c", l));
	ck_assert(!policy_remote_block_fact(s, NULL, l));
	ck_assert(!policy_remote_block_fact(s, "mimi://x.example/u/b", ""));
	ck_assert(!policy_remote_block_fact(NULL, "mimi://x.example/u/b", l));
	ck_assert_int_eq(policy_consent_fact(s, l, false, "mimi://x.example/u/c"), -1);
	ck_assert_int_eq(policy_consent_fact(s, l, true, "x.example"), -1);
	ck_assert_int_eq(policy_consent_fact(s, "mimi://x.example/u/b", false, l), -1); /* not the other way round */
	ck_assert_int_eq(policy_consent_fact(s, l, false, NULL), -1);
	ck_assert_int_eq(policy_consent_fact(NULL, l, false, "mimi://x.example/u/b"), -1);

	struct policy_request r = {
		.direction = POLICY_INBOUND, .action = POLICY_ACT_EVENT, .event_type = "message",
		.sender = { "mimi://x.example/u/b", "x.example", "matrix" }, .recipient = { l, "hub.example", "local" },
		.now_ms = DEFAULT_NOW,
	};
	struct policy_decision d;
	policy_decide(s, &r, &d);
	ck_assert_str_eq(d.reason, "user_not_opted_in"); /* opted out by the later fact */
	r.sender.network = "peer:gk";
	policy_decide(s, &r, &d);
	ck_assert_str_eq(d.reason, "user_allowed_sender");
	/* A part holding the separator cannot reach across parts. */
	r.recipient.uri = "mimi://hub.example/u/a\x1fu";
	policy_decide(s, &r, &d);
	ck_assert_str_eq(d.reason, "user_not_opted_in");
	policy_snapshot_free(s);

	/* A builder freed without finishing. */
	b = policy_builder_new();
	ck_assert_int_eq(policy_builder_rule(b, 1, POLICY_SCOPE_DOMAIN, "a.example", POLICY_MODE_OPEN, NULL, 0), 0);
	ck_assert_int_eq(policy_builder_consent(b, l, true, "a.example", true), 0);
	policy_builder_free(b);
	/* Builder calls on NULL (builder_new failed). */
	ck_assert_int_eq(policy_builder_rule(NULL, 1, POLICY_SCOPE_DOMAIN, "a.example", POLICY_MODE_OPEN, NULL, 0), -2);
	ck_assert_int_eq(policy_builder_optin(NULL, l, "matrix", true), -2);
	policy_builder_defaults(NULL, POLICY_MODE_OPEN, true);
}
END_TEST

/* Many keys: every one is found after the tables grew, nothing else is. */
START_TEST(large_tables)
{
	struct policy_builder *b = policy_builder_new();
	char pat[128], l[128], subj[128];
	for (int i = 0; i < 6000; i++) {
		snprintf(pat, sizeof(pat), "d%d.example", i);
		ck_assert_int_eq(policy_builder_rule(b, i + 1, POLICY_SCOPE_DOMAIN, pat, POLICY_MODE_DENY, NULL, 0), 0);
		snprintf(pat, sizeof(pat), "*.w%d.example", i);
		ck_assert_int_eq(policy_builder_rule(b, 100000 + i, POLICY_SCOPE_DOMAIN, pat, POLICY_MODE_CLOSED, NULL, 0), 0);
		snprintf(l, sizeof(l), "mimi://hub.example/u/l%d", i % 100);
		snprintf(subj, sizeof(subj), "mimi://s%d.example/u/u%d", i, i);
		ck_assert_int_eq(policy_builder_consent(b, l, false, subj, true), 0);
		ck_assert_int_eq(policy_builder_optin(b, l, "matrix", true), 0);
	}
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	ck_assert_uint_eq(policy_snapshot_rule_count(s), 12000);
	ck_assert_uint_eq(policy_snapshot_fact_count(s), 6000 + 100);
	char dom[128], uri[160];
	struct policy_request r = { .direction = POLICY_INBOUND, .action = POLICY_ACT_EVENT, .event_type = "message",
				    .now_ms = DEFAULT_NOW };
	struct policy_decision d;
	for (int i = 0; i < 6000; i++) {
		snprintf(dom, sizeof(dom), "d%d.example", i);
		snprintf(uri, sizeof(uri), "mimi://%s/u/x", dom);
		r.sender = (struct policy_party){ uri, dom, "matrix" };
		r.recipient = (struct policy_party){ "mimi://hub.example/u/l0", "hub.example", "local" };
		policy_decide(s, &r, &d);
		ck_assert_str_eq(d.reason, "server_denied_domain");
		ck_assert_int_eq(d.rule_id, i + 1);
		snprintf(dom, sizeof(dom), "q.r.w%d.example", i);
		policy_decide(s, &r, &d);
		ck_assert_str_eq(d.reason, "server_closed");
		ck_assert_int_eq(d.rule_id, 100000 + i);
		snprintf(dom, sizeof(dom), "s%d.example", i);
		snprintf(uri, sizeof(uri), "mimi://s%d.example/u/u%d", i, i);
		snprintf(l, sizeof(l), "mimi://hub.example/u/l%d", i % 100);
		r.recipient.uri = l;
		policy_decide(s, &r, &d);
		ck_assert_str_eq(d.reason, "user_allowed_sender");
		r.recipient.uri = "mimi://hub.example/u/l100"; /* not opted in */
		policy_decide(s, &r, &d);
		ck_assert_str_eq(d.reason, "user_not_opted_in");
		snprintf(dom, sizeof(dom), "e%d.example", i); /* unknown */
		snprintf(uri, sizeof(uri), "mimi://e%d.example/u/u%d", i, i);
		r.recipient.uri = l;
		policy_decide(s, &r, &d);
		ck_assert_str_eq(d.reason, "no_consent_yet");
	}
	policy_snapshot_free(s);
}
END_TEST

/* policy_snapshot_limits_content says whether a rule limits what a
 * message holds; a consent's release (policy_live.c's server_denials)
 * parses no held event without one.  Without one, the sizes and kinds a
 * request carries decide nothing: the same decision for a text of 5
 * bytes and for 100 MB of every kind, under rate limits, a deny, an
 * in_addition rule and the closed default. */
START_TEST(content_limits_are_known_from_the_rules)
{
	ck_assert(!policy_snapshot_limits_content(NULL));
	static const unsigned content[] = { POLICY_LIM_MAX_BODY, POLICY_LIM_MAX_ATTACH, POLICY_LIM_CONTENT_KINDS };
	for (int add = 0; add < 2; add++)
		for (size_t i = 0; i < sizeof(content) / sizeof(content[0]); i++) {
			struct policy_builder *b = policy_builder_new();
			struct policy_limits l = { .set = content[i] | POLICY_LIM_MSG_MINUTE, .messages_per_minute = 9,
						   .max_body_bytes = 10, .max_attachment_bytes = 10,
						   .content_kinds = POLICY_KIND_TEXT, .in_addition = add };
			ck_assert_int_eq(policy_builder_rule(b, 3, POLICY_SCOPE_DOMAIN, "wa.example", POLICY_MODE_NONE,
							     &l, 1), 0); /* expired long ago: still counted */
			struct policy_snapshot *s = policy_builder_finish(b, 1);
			ck_assert(policy_snapshot_limits_content(s));
			/* an overlay's rules are its base's */
			struct policy_builder *o = policy_builder_overlay(s);
			ck_assert_int_eq(policy_builder_user(o, "mimi://hub.example/u/l0"), 0);
			struct policy_snapshot *ov = policy_builder_finish(o, 2);
			ck_assert(policy_snapshot_limits_content(ov));
			policy_snapshot_free(ov);
			policy_snapshot_free(s);
		}
	for (int closed = 0; closed < 2; closed++) {
		struct policy_builder *b = policy_builder_new();
		policy_builder_defaults(b, closed ? POLICY_MODE_CLOSED : POLICY_MODE_OPEN, true);
		struct policy_limits rate = { .set = POLICY_LIM_MSG_MINUTE_USER | POLICY_LIM_NEW_CONV_HOUR,
					      .messages_per_minute_per_user = 1000,
					      .new_conversations_per_hour = 1000 };
		struct policy_limits more = { .set = POLICY_LIM_MSG_MINUTE, .messages_per_minute = 1000,
					      .in_addition = true };
		ck_assert_int_eq(policy_builder_rule(b, 1, POLICY_SCOPE_DOMAIN, "wa.example", POLICY_MODE_OPEN, &rate,
						     0), 0);
		ck_assert_int_eq(policy_builder_rule(b, 2, POLICY_SCOPE_DOMAIN, "*.wa.example", POLICY_MODE_NONE, &more,
						     0), 0);
		ck_assert_int_eq(policy_builder_rule(b, 4, POLICY_SCOPE_DOMAIN, "bad.example", POLICY_MODE_DENY, NULL,
						     0), 0);
		struct policy_snapshot *s = policy_builder_finish(b, 1);
		ck_assert(!policy_snapshot_limits_content(s));
		static const char *const from[] = { "wa.example", "x.wa.example", "bad.example", "other.example" };
		for (size_t f = 0; f < sizeof(from) / sizeof(from[0]); f++) {
			char uri[80];
			snprintf(uri, sizeof(uri), "mimi://%s/u/w", from[f]);
			struct policy_request r = {
				.direction = POLICY_INBOUND, .action = POLICY_ACT_EVENT, .event_type = "message",
				.sender = { uri, from[f], "peer:wa" },
				.recipient = { "mimi://hub.example/u/l", "hub.example", "local" },
				.now_ms = 1000000, .recipient_wrote_here = true,
			};
			struct policy_decision small, large;
			r.body_bytes = 5;
			r.content_kinds = POLICY_KIND_TEXT;
			policy_decide(s, &r, &small);
			r.body_bytes = 100u << 20;
			r.attachment_bytes = 100u << 20;
			r.content_kinds = POLICY_KIND_TEXT | POLICY_KIND_MEDIA;
			policy_decide(s, &r, &large);
			ck_assert_int_eq(small.verdict, large.verdict);
			ck_assert_str_eq(small.reason ? small.reason : "", large.reason ? large.reason : "");
			ck_assert_int_eq(small.rule_id, large.rule_id);
		}
		policy_snapshot_free(s);
	}
}
END_TEST

/* A content_kinds that refuses a message is told by the kinds it refused:
 * a text to a domain that allows media only is "text messages", not
 * "files" (until the thirty-ninth session every refusal said "(files)"). */
START_TEST(content_kind_refusal_names_the_kind)
{
	static const struct {
		unsigned allowed, sent, refused;
		const char *text;
	} t[] = {
		{ POLICY_KIND_MEDIA, POLICY_KIND_TEXT, POLICY_KIND_TEXT, "this server does not allow text messages to them" },
		{ POLICY_KIND_TEXT, POLICY_KIND_TEXT | POLICY_KIND_MEDIA, POLICY_KIND_MEDIA,
		  "this server does not allow files to them" },
		{ 0, POLICY_KIND_TEXT | POLICY_KIND_MEDIA, POLICY_KIND_TEXT | POLICY_KIND_MEDIA,
		  "this server does not allow text or files to them" },
		{ 0, POLICY_KIND_MEDIA, POLICY_KIND_MEDIA, "this server does not allow files to them" },
	};
	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		struct policy_builder *b = policy_builder_new();
		policy_builder_defaults(b, POLICY_MODE_OPEN, true);
		struct policy_limits l = { .set = POLICY_LIM_CONTENT_KINDS, .content_kinds = t[i].allowed };
		ck_assert_int_eq(policy_builder_rule(b, 7, POLICY_SCOPE_DOMAIN, "wa.example", POLICY_MODE_NONE, &l, 0), 0);
		struct policy_snapshot *s = policy_builder_finish(b, 1);
		struct policy_request r = {
			.direction = POLICY_OUTBOUND, .action = POLICY_ACT_EVENT, .event_type = "message",
			.sender = { "mimi://hub.example/u/l", "hub.example", "local" },
			.recipient = { "mimi://wa.example/u/w", "wa.example", "peer:wa" },
			.body_bytes = 5, .content_kinds = t[i].sent,
		};
		struct policy_decision d;
		policy_decide(s, &r, &d);
		ck_assert_int_eq(d.verdict, POLICY_DENY);
		ck_assert_str_eq(d.reason, "content_kind_disabled");
		ck_assert_int_eq(d.rule_id, 7);
		ck_assert_uint_eq(d.refused_kinds, t[i].refused);
		ck_assert_str_eq(policy_decision_text(&d), t[i].text);
		/* an allowed kind: no refused kinds left over */
		r.content_kinds = t[i].allowed & POLICY_KIND_TEXT;
		if (r.content_kinds) {
			policy_decide(s, &r, &d);
			ck_assert_int_eq(d.verdict, POLICY_ALLOW);
			ck_assert_uint_eq(d.refused_kinds, 0);
		}
		policy_snapshot_free(s);
	}
	/* other reasons: the reason's words; the kind unknown: no kind named */
	struct policy_decision d = { .verdict = POLICY_DENY, .reason = "server_closed" };
	ck_assert_str_eq(policy_decision_text(&d), policy_reason_text("server_closed"));
	ck_assert_str_eq(policy_reason_text("content_kind_disabled"),
			 "this server does not allow this kind of content to them");
	ck_assert_ptr_null(policy_decision_text(NULL));
}
END_TEST

START_TEST(names)
{
	for (int m = POLICY_MODE_NONE; m <= POLICY_MODE_DENY; m++) {
		enum policy_mode out;
		ck_assert(policy_mode_parse(policy_mode_name((enum policy_mode)m), &out));
		ck_assert_int_eq(out, m);
	}
	for (int sc = POLICY_SCOPE_DOMAIN; sc <= POLICY_SCOPE_USER; sc++) {
		enum policy_scope out;
		ck_assert(policy_scope_parse(policy_scope_name((enum policy_scope)sc), &out));
		ck_assert_int_eq(out, sc);
	}
	enum policy_mode m;
	enum policy_scope sc;
	ck_assert(!policy_mode_parse("Open", &m));
	ck_assert(!policy_mode_parse(NULL, &m));
	ck_assert(!policy_scope_parse("users", &sc));
	ck_assert_str_eq(policy_mode_name(POLICY_MODE_ALLOWLIST), "allowlist");
	ck_assert_str_eq(policy_scope_name(POLICY_SCOPE_NETWORK), "network");
	ck_assert_str_eq(policy_verdict_name(POLICY_HOLD), "hold");
	ck_assert_str_eq(policy_mode_name((enum policy_mode)99), "?");
	/* The reason list: no duplicates, 29 codes (the recipient's bound on
	 * consent requests is the write's since the forty-first session). */
	int n = 0;
	for (; policy_reason_codes[n]; n++)
		for (int k = 0; k < n; k++)
			ck_assert_str_ne(policy_reason_codes[k], policy_reason_codes[n]);
	ck_assert_int_eq(n, 29);
	/* Every reason that can stop a local user's message (outbound: the
	 * server's rules, the user's own blocks, the recipient's block of
	 * her) is told in words; an unknown code is not. */
	static const char *const told[] = { "server_denied_user", "server_denied_domain", "server_denied_network",
					    "user_blocked_recipient", "user_blocked_domain", "recipient_blocked_sender",
					    "too_large",
					    "content_kind_disabled", "server_closed", "server_not_allowlisted",
					    "rate_limited_local_sender", "rate_limited_local_sender_new_conversations" };
	for (size_t i = 0; i < sizeof(told) / sizeof(told[0]); i++)
		ck_assert_msg(policy_reason_text(told[i]) && *policy_reason_text(told[i]), "%s", told[i]);
	ck_assert_str_eq(policy_reason_text("recipient_blocked_sender"), "this person blocked you");
	ck_assert_ptr_null(policy_reason_text("rate_limited_sender")); /* a remote sender's: not a local user's */
	ck_assert_ptr_null(policy_reason_text("no_such_reason"));
	ck_assert_ptr_null(policy_reason_text(NULL));
	/* What a held message's release asks again of it besides the
	 * server's rules: its size and content kinds, not a rate limit nor
	 * a consent fact (gateway/policy_live.c, server_denials). */
	for (int i = 0; policy_reason_codes[i]; i++) {
		const char *c = policy_reason_codes[i];
		ck_assert_msg(policy_reason_is_content(c) ==
				      (strcmp(c, "too_large") == 0 || strcmp(c, "content_kind_disabled") == 0), "%s", c);
		ck_assert_msg(!(policy_reason_is_content(c) && policy_reason_is_servers(c)), "%s", c);
	}
	ck_assert(!policy_reason_is_content(NULL) && !policy_reason_is_content("no_such_reason"));
}
END_TEST

/* ------------------------------------------------------------ ratelimit */

START_TEST(rl_capacity_then_refusal)
{
	struct ratelimit *rl = ratelimit_new(0);
	ck_assert_ptr_nonnull(rl);
	bool first;
	for (int i = 0; i < 5; i++) {
		ck_assert_int_eq(ratelimit_take(rl, "k", 5, 1000, 0, &first), 0);
		ck_assert(!first);
	}
	ck_assert_int_eq(ratelimit_take(rl, "k", 5, 1000, 0, &first), 200);
	ck_assert(first);
	/* Another key is another bucket. */
	ck_assert_int_eq(ratelimit_take(rl, "k2", 5, 1000, 0, NULL), 0);
	/* Capacity 0: nothing, ever. */
	ck_assert_int_eq(ratelimit_take(rl, "zero", 0, 1000, 0, &first), 1000);
	ck_assert(first);
	ck_assert_int_eq(ratelimit_take(rl, "zero", 0, 1000, 5000, &first), 1000);
	ck_assert(!first);
	/* Through struct policy_rate. */
	ck_assert_int_eq(ratelimit_policy_take(rl, "p", 1, 60000, 0), 0);
	ck_assert_int_eq(ratelimit_policy_take(rl, "p", 1, 60000, 1), 59999);
	size_t used;
	uint64_t ev;
	ratelimit_stats(rl, &used, &ev);
	ck_assert_uint_eq(used, 4);
	ck_assert_uint_eq(ev, 0);
	ratelimit_free(rl);
	ratelimit_free(NULL);
}
END_TEST

/* A token given back is there again, never past the capacity; a bucket
 * not kept is not made.  (What a job took is given back through the rate
 * memo's ledger: rate_ledger_charges_a_write_once_whatever_its_runs.) */
START_TEST(rl_give_back)
{
	struct ratelimit *rl = ratelimit_new(0);
	bool first;
	ck_assert_int_eq(ratelimit_take(rl, "k", 2, 1000, 0, NULL), 0);
	ck_assert_int_eq(ratelimit_take(rl, "k", 2, 1000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "k", 2, 1000, 0, &first), 0);
	ck_assert(first);
	ratelimit_give(rl, "k", 2, 1000, 0);
	ck_assert_int_eq(ratelimit_take(rl, "k", 2, 1000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "k", 2, 1000, 0, NULL), 0);
	/* full: a give adds nothing past the capacity */
	ck_assert_int_eq(ratelimit_take(rl, "f", 1, 1000, 0, NULL), 0);
	ratelimit_give(rl, "f", 1, 1000, 5000);
	ratelimit_give(rl, "f", 1, 1000, 5000);
	ck_assert_int_eq(ratelimit_take(rl, "f", 1, 1000, 5000, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "f", 1, 1000, 5000, NULL), 0);
	/* not kept: not made */
	ratelimit_give(rl, "none", 1, 1000, 0);
	size_t used;
	ratelimit_stats(rl, &used, NULL);
	ck_assert_uint_eq(used, 2);
	ratelimit_free(rl);
}
END_TEST

START_TEST(rl_refill_timing)
{
	struct ratelimit *rl = ratelimit_new(512);
	int64_t t = 1000000;
	/* 3 per 1000 ms: one token every 333.33 ms. */
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(ratelimit_take(rl, "k", 3, 1000, t, NULL), 0);
	int64_t w = ratelimit_take(rl, "k", 3, 1000, t, NULL);
	ck_assert_int_eq(w, 334);
	ck_assert_int_eq(ratelimit_take(rl, "k", 3, 1000, t + w - 1, NULL), 1);
	ck_assert_int_eq(ratelimit_take(rl, "k", 3, 1000, t + w, NULL), 0);
	/* Continuous: after the grant at t+334 the bucket holds 2/1000 of a token. */
	w = ratelimit_take(rl, "k", 3, 1000, t + 334, NULL);
	ck_assert_int_eq(w, 333);
	ck_assert_int_eq(ratelimit_take(rl, "k", 3, 1000, t + 334 + w, NULL), 0);
	/* A long pause refills to capacity, no more. */
	t += 1000000;
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(ratelimit_take(rl, "k", 3, 1000, t, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "k", 3, 1000, t, NULL), 0);
	/* A clock going back does not refill nor break, and the wait it
	 * answers holds from the new time on: a wall clock set back 50 s
	 * (NTP, an operator) must not keep an empty bucket empty for 50 s
	 * more while "retry after 334 ms" is answered. */
	w = ratelimit_take(rl, "k", 3, 1000, t - 50000, NULL);
	ck_assert_int_eq(w, 334);
	ck_assert_int_eq(ratelimit_peek(rl, "k", 3, 1000, t - 50000 + w, NULL), 0);
	ck_assert_int_eq(ratelimit_take(rl, "k", 3, 1000, t - 50000 + w, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "k", 3, 1000, t - 50000 + w, NULL), 0);
	/* nor does the way back to the old time refill beyond its length */
	ck_assert_int_eq(ratelimit_take(rl, "k", 3, 1000, t - 50000 + w + 333, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "k", 3, 1000, t - 50000 + w + 333, NULL), 0);
	/* A peek alone after a step sees the refill from the new time. */
	for (int i = 0; i < 3; i++)
		ratelimit_take(rl, "p", 3, 1000, t, NULL);
	ck_assert_int_eq(ratelimit_peek(rl, "p", 3, 1000, t - 60000, NULL), 334);
	ck_assert_int_eq(ratelimit_peek(rl, "p", 3, 1000, t - 60000 + 334, NULL), 0);
	/* Readings out of order by less than a step (two threads) give no
	 * refill: the later time stays the bucket's. */
	for (int i = 0; i < 3; i++)
		ratelimit_take(rl, "o", 3, 1000, t, NULL);
	for (int i = 0; i < 10; i++) {
		ck_assert_int_gt(ratelimit_take(rl, "o", 3, 1000, t - 4000, NULL), 0);
		ck_assert_int_gt(ratelimit_take(rl, "o", 3, 1000, t + 300, NULL), 0);
	}
	/* Retry-after is right within 1 ms for assorted rates. */
	const uint32_t caps[] = { 1, 2, 7, 60, 1000 };
	const int64_t periods[] = { 1000, 60000, 3600000, 86400000 };
	for (size_t c = 0; c < 5; c++)
		for (size_t p = 0; p < 4; p++) {
			char key[32];
			snprintf(key, sizeof(key), "r%zu.%zu", c, p);
			int64_t now = 5000;
			for (uint32_t i = 0; i < caps[c]; i++)
				ck_assert_int_eq(ratelimit_take(rl, key, caps[c], periods[p], now, NULL), 0);
			w = ratelimit_take(rl, key, caps[c], periods[p], now, NULL);
			double exact = (double)periods[p] / caps[c];
			ck_assert_msg(w >= exact && w < exact + 1, "%u/%" PRId64 ": %" PRId64, caps[c], periods[p], w);
			ck_assert_int_gt(ratelimit_take(rl, key, caps[c], periods[p], now + w - 1, NULL), 0);
			ck_assert_int_eq(ratelimit_take(rl, key, caps[c], periods[p], now + w, NULL), 0);
		}
	/* A changed rule keeps the fill in proportion: half of 4 is half of 10. */
	ck_assert_int_eq(ratelimit_take(rl, "chg", 4, 1000, 0, NULL), 0);
	ck_assert_int_eq(ratelimit_take(rl, "chg", 4, 1000, 0, NULL), 0);
	for (int i = 0; i < 5; i++)
		ck_assert_int_eq(ratelimit_take(rl, "chg", 10, 1000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "chg", 10, 1000, 0, NULL), 0);
	ratelimit_free(rl);
}
END_TEST

START_TEST(rl_first_refusal_once_per_episode)
{
	struct ratelimit *rl = ratelimit_new(512);
	bool first = true;
	ck_assert_int_eq(ratelimit_take(rl, "f", 2, 1000, 0, &first), 0);
	ck_assert(!first);
	ck_assert_int_eq(ratelimit_take(rl, "f", 2, 1000, 0, &first), 0);
	int firsts = 0;
	for (int i = 0; i < 10; i++) {
		ck_assert_int_gt(ratelimit_take(rl, "f", 2, 1000, 10 * i, &first), 0);
		firsts += first;
		if (i == 0)
			ck_assert(first);
	}
	ck_assert_int_eq(firsts, 1);
	/* A grant ends the episode; the next refusal is a first again. */
	ck_assert_int_eq(ratelimit_take(rl, "f", 2, 1000, 500, &first), 0);
	ck_assert(!first);
	ck_assert_int_gt(ratelimit_take(rl, "f", 2, 1000, 500, &first), 0);
	ck_assert(first);
	ck_assert_int_gt(ratelimit_take(rl, "f", 2, 1000, 501, &first), 0);
	ck_assert(!first);
	ratelimit_free(rl);
}
END_TEST

/* A peek answers what a take would, and takes nothing (since the
 * twenty-eighth session: a local user's outbound limits asked of a
 * message step 4 refuses). */
START_TEST(rl_peek_never_changes_the_bucket)
{
	struct ratelimit *rl = ratelimit_new(512);
	bool first = true;
	size_t used;
	/* A bucket never used would start full; it is not made. */
	ck_assert_int_eq(ratelimit_peek(rl, "k", 3, 1000, 0, &first), 0);
	ck_assert(!first);
	ck_assert_int_eq(ratelimit_peek(rl, "zero", 0, 1000, 0, NULL), 1000);
	ratelimit_stats(rl, &used, NULL);
	ck_assert_uint_eq(used, 0);
	/* However often it is asked, each token is still there to take. */
	int64_t t = 1000000;
	for (int i = 0; i < 3; i++) {
		for (int j = 0; j < 5; j++)
			ck_assert_int_eq(ratelimit_peek(rl, "k", 3, 1000, t, NULL), 0);
		ck_assert_int_eq(ratelimit_take(rl, "k", 3, 1000, t, NULL), 0);
	}
	/* Empty: the wait a take answers, to the millisecond. */
	ck_assert_int_eq(ratelimit_peek(rl, "k", 3, 1000, t, NULL), 334);
	ck_assert_int_eq(ratelimit_peek(rl, "k", 3, 1000, t + 333, NULL), 1);
	ck_assert_int_eq(ratelimit_peek(rl, "k", 3, 1000, t + 334, NULL), 0);
	/* Peeks later in time refilled nothing, nor began an episode. */
	ck_assert_int_eq(ratelimit_take(rl, "k", 3, 1000, t, &first), 334);
	ck_assert(first);
	/* Asked with first_refusal, a peek's refusal is one of the episode:
	 * the first once, and a take's after it is none. */
	ck_assert_int_eq(ratelimit_take(rl, "e", 1, 1000, t, NULL), 0);
	ck_assert_int_eq(ratelimit_peek(rl, "e", 1, 1000, t, &first), 1000);
	ck_assert(first);
	ck_assert_int_eq(ratelimit_peek(rl, "e", 1, 1000, t + 1, &first), 999);
	ck_assert(!first);
	ck_assert_int_eq(ratelimit_take(rl, "e", 1, 1000, t + 1, &first), 999);
	ck_assert(!first);
	/* A changed rule: answered in proportion, the bucket's own kept.
	 * One token of 4 left is 2.5 of 10 and half of 2. */
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(ratelimit_take(rl, "chg", 4, 1000, 0, NULL), 0);
	ck_assert_int_eq(ratelimit_peek(rl, "chg", 10, 1000, 0, NULL), 0);
	ck_assert_int_eq(ratelimit_peek(rl, "chg", 2, 1000, 0, NULL), 250);
	ck_assert_int_eq(ratelimit_take(rl, "chg", 4, 1000, 0, NULL), 0);
	ck_assert_int_eq(ratelimit_peek(rl, "chg", 4, 1000, 0, NULL), 250);
	ck_assert_int_eq(ratelimit_policy_peek(rl, "chg", 4, 1000, 0), 250);
	ck_assert_int_eq(ratelimit_take(rl, "chg", 4, 1000, 0, NULL), 250);
	ratelimit_stats(rl, &used, NULL);
	ck_assert_uint_eq(used, 3);
	ratelimit_free(rl);
}
END_TEST

/* Where a key lands is each table's own (since the forty-fifth session):
 * with fixed hash starts a peer could pick sender names that share the
 * window of its domain's bucket and evict it. */
START_TEST(rl_windows_are_the_tables_own)
{
	struct ratelimit *a = ratelimit_new(512), *b = ratelimit_new(512);
	size_t same = 0;
	char key[64];
	for (int i = 0; i < 64; i++) {
		snprintf(key, sizeof(key), "mpu:1:mimi://e.example/u/%d", i);
		size_t w = ratelimit_window(a, key);
		ck_assert_uint_eq(w % 8, 0);
		ck_assert_uint_lt(w, 512);
		ck_assert_uint_eq(ratelimit_window(a, key), w); /* a table's own place is stable */
		same += ratelimit_window(b, key) == w;
	}
	/* 64 windows: by chance about 1 key of 64 lands alike */
	ck_assert_uint_lt(same, 16);
	ratelimit_free(a);
	ratelimit_free(b);
}
END_TEST

START_TEST(rl_eviction_many_keys)
{
	struct ratelimit *rl = ratelimit_new(512);
	char key[64];
	int64_t refused = 0;
	for (int i = 0; i < 200000; i++) {
		snprintf(key, sizeof(key), "mpu:1:mimi://e.example/u/%d", i % 20000);
		refused += ratelimit_take(rl, key, 2, 60000, i / 100, NULL) > 0;
	}
	size_t used;
	uint64_t ev;
	ratelimit_stats(rl, &used, &ev);
	ck_assert_uint_le(used, 512);
	ck_assert_uint_gt(used, 400);
	ck_assert_uint_gt(ev, 100000);
	/* A bucket in active use survives a flood of new keys in other windows
	 * often enough: here, the key used every time is never evicted. */
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(ratelimit_take(rl, "hot", 3, 60000, 10000, NULL), 0);
	for (int i = 0; i < 50000; i++) {
		snprintf(key, sizeof(key), "flood:%d", i);
		ratelimit_take(rl, key, 2, 60000, 10000, NULL);
		if (i % 4 == 0)
			ck_assert_int_gt(ratelimit_take(rl, "hot", 3, 60000, 10000, NULL), 0);
	}
	(void)refused;
	ratelimit_free(rl);
	/* Bigger tables round up to a power of two. */
	rl = ratelimit_new(65537);
	ck_assert_ptr_nonnull(rl);
	ratelimit_free(rl);
}
END_TEST

struct hammer {
	struct ratelimit *rl;
	int id;
	atomic_long *grants;
	atomic_long *own;
};

#define HAMMER_ITERS 40000

static void *hammer_thread(void *arg)
{
	struct hammer *h = arg;
	char key[32];
	for (int i = 0; i < HAMMER_ITERS; i++) {
		/* Each thread's clock runs on its own: 0..1999 ms. */
		int64_t now = i / 20;
		if (ratelimit_take(h->rl, "shared", 100, 1000, now, NULL) == 0)
			atomic_fetch_add(h->grants, 1);
		snprintf(key, sizeof(key), "own:%d:%d", h->id, i % 300);
		if (ratelimit_take(h->rl, key, 1000, 1000, now, NULL) == 0)
			atomic_fetch_add(h->own, 1);
	}
	return NULL;
}

START_TEST(rl_threads)
{
	struct ratelimit *rl = ratelimit_new(4096);
	atomic_long grants = 0, own = 0;
	pthread_t th[4];
	struct hammer h[4];
	for (int i = 0; i < 4; i++) {
		h[i] = (struct hammer){ rl, i, &grants, &own };
		ck_assert_int_eq(pthread_create(&th[i], NULL, hammer_thread, &h[i]), 0);
	}
	for (int i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	/* 100 at the start, plus 100 a second over at most 1999 ms. */
	long g = atomic_load(&grants);
	ck_assert_int_ge(g, 100);
	ck_assert_int_le(g, 100 + 199);
	/* Each thread's own keys never run dry (1000 per s, ~133 takes each). */
	ck_assert_int_eq(atomic_load(&own), 4 * HAMMER_ITERS);
	ratelimit_free(rl);
}
END_TEST

/* Decisions through the real bucket table: limits, then refills. */
START_TEST(decide_with_ratelimit_refill)
{
	struct policy_builder *b = policy_builder_new();
	policy_builder_defaults(b, POLICY_MODE_OPEN, true);
	struct policy_limits l = { .set = POLICY_LIM_MSG_MINUTE_USER, .messages_per_minute_per_user = 2 };
	ck_assert_int_eq(policy_builder_rule(b, 5, POLICY_SCOPE_NETWORK, "matrix", POLICY_MODE_OPEN, &l, 0), 0);
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	struct ratelimit *rl = ratelimit_new(512);
	struct policy_rate rate = { ratelimit_policy_take, rl, ratelimit_policy_peek };
	struct policy_request r = {
		.direction = POLICY_INBOUND, .action = POLICY_ACT_EVENT, .event_type = "message",
		.sender = { "mimi://a.example/u/s", "a.example", "matrix" },
		.recipient = { "mimi://hub.example/u/l", "hub.example", "local" }, .now_ms = 0, .rate = &rate,
	};
	struct policy_decision d;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_HOLD);
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_HOLD);
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_LIMIT);
	ck_assert_str_eq(d.reason, "rate_limited_sender");
	ck_assert_int_eq(d.rule_id, 5);
	ck_assert_int_eq(d.retry_after_ms, 30000);
	r.now_ms = 29999;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_LIMIT);
	ck_assert_int_eq(d.retry_after_ms, 1);
	r.now_ms = 30000;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_HOLD);
	ratelimit_free(rl);
	policy_snapshot_free(s);
}
END_TEST

/* A domain rule's consent_requests_per_day bounds the domain, in two
 * buckets: MIMI requestConsent's (answered 429) and its first contacts'
 * (held without asking), so that emptying one tells nothing of the other. */
START_TEST(domain_consent_buckets_shared_by_users_kept_apart_by_kind)
{
	struct policy_builder *b = policy_builder_new();
	policy_builder_defaults(b, POLICY_MODE_OPEN, true);
	struct policy_limits l = { .set = POLICY_LIM_CONSENT_REQ_DAY | POLICY_LIM_NEW_CONV_HOUR,
				   .consent_requests_per_day = 1, .new_conversations_per_hour = 1 };
	ck_assert_int_eq(policy_builder_rule(b, 7, POLICY_SCOPE_DOMAIN, "rot.example", POLICY_MODE_NONE, &l, 0), 0);
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	struct ratelimit *rl = ratelimit_new(512);
	struct policy_rate rate = { ratelimit_policy_take, rl, ratelimit_policy_peek };
	struct policy_request r = {
		.direction = POLICY_INBOUND, .action = POLICY_ACT_CONSENT_REQUEST,
		.sender = { "mimi://rot.example/u/a", "rot.example", "matrix" },
		.recipient = { "mimi://hub.example/u/l", "hub.example", "local" }, .now_ms = 0, .rate = &rate,
	};
	struct policy_decision d;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_HOLD);
	/* Another user name of the domain: the domain's bucket is empty. */
	r.sender.uri = "mimi://rot.example/u/b";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_LIMIT);
	ck_assert_str_eq(d.reason, "rate_limited_consent_requests");
	ck_assert_int_eq(d.rule_id, 7);
	/* A first contact draws on its own bucket, also the domain's. */
	r.action = POLICY_ACT_FIRST_CONTACT;
	r.sender.uri = "mimi://rot.example/u/c";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_HOLD);
	r.sender.uri = "mimi://rot.example/u/d";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_LIMIT);
	ck_assert_str_eq(d.reason, "rate_limited_consent_requests");
	/* New conversations: one bucket for the domain too. */
	r.action = POLICY_ACT_NEW_ROOM;
	r.recipient.uri = NULL;
	r.sender.uri = "mimi://rot.example/u/e";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_ALLOW);
	r.sender.uri = "mimi://rot.example/u/f";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_LIMIT);
	ck_assert_str_eq(d.reason, "rate_limited_new_conversations");
	ck_assert_int_eq(d.retry_after_ms, 3600000);
	ratelimit_free(rl);
	policy_snapshot_free(s);
}
END_TEST

/* A domain rule's consent_requests_per_day_per_user bounds each user of the
 * domain, in two buckets as the domain's limit: emptying a user's
 * requestConsent bucket tells nothing of that user's first contacts. */
START_TEST(per_user_consent_buckets_kept_apart_by_kind)
{
	struct policy_builder *b = policy_builder_new();
	policy_builder_defaults(b, POLICY_MODE_OPEN, true);
	struct policy_limits l = { .set = POLICY_LIM_CONSENT_REQ_DAY_USER, .consent_requests_per_day_per_user = 1 };
	ck_assert_int_eq(policy_builder_rule(b, 8, POLICY_SCOPE_DOMAIN, "pu.example", POLICY_MODE_NONE, &l, 0), 0);
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	struct ratelimit *rl = ratelimit_new(512);
	struct policy_rate rate = { ratelimit_policy_take, rl, ratelimit_policy_peek };
	struct policy_request r = {
		.direction = POLICY_INBOUND, .action = POLICY_ACT_CONSENT_REQUEST,
		.sender = { "mimi://pu.example/u/a", "pu.example", "matrix" },
		.recipient = { "mimi://hub.example/u/l", "hub.example", "local" }, .now_ms = 0, .rate = &rate,
	};
	struct policy_decision d;
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_HOLD);
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_LIMIT);
	ck_assert_str_eq(d.reason, "rate_limited_sender_consent_requests");
	ck_assert_int_eq(d.rule_id, 8);
	ck_assert_int_eq(d.retry_after_ms, 86400000);
	/* Another user of the domain: a bucket of its own. */
	r.sender.uri = "mimi://pu.example/u/b";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_HOLD);
	/* The first user's first contacts: not the requestConsent bucket. */
	r.action = POLICY_ACT_FIRST_CONTACT;
	r.sender.uri = "mimi://pu.example/u/a";
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_HOLD);
	ck_assert_str_eq(d.reason, "no_consent_yet");
	policy_decide(s, &r, &d);
	ck_assert_int_eq(d.verdict, POLICY_LIMIT);
	ck_assert_str_eq(d.reason, "rate_limited_sender_consent_requests");
	ratelimit_free(rl);
	policy_snapshot_free(s);
}
END_TEST

/* Every matching in_addition rule is charged, most specific first, then
 * the ordinary rules; the first refusal ends it, so that a refused
 * message takes nothing from the buckets after it (a reported user
 * refused by their own limit takes nothing from their domain's).  Until
 * the twenty-third session only the most specific in_addition rule that
 * set a limit applied: a user's lifted their domain's. */
/* A message from gk.example's troll to a local user, at time 0. */
static struct policy_request troll_message(const struct policy_rate *rate)
{
	return (struct policy_request){
		.direction = POLICY_INBOUND, .action = POLICY_ACT_EVENT, .event_type = "message",
		.sender = { "mimi://gk.example/u/troll", "gk.example", "peer:gk" },
		.recipient = { "mimi://hub.example/u/l", "hub.example", "local" }, .content_kinds = POLICY_KIND_TEXT,
		.now_ms = 0, .rate = rate,
	};
}

struct logged_rate {
	struct key_log log;
	struct ratelimit *rl;
};

static int64_t logged_take(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms)
{
	struct logged_rate *lr = ctx;
	lr->log.answer = ratelimit_policy_take(lr->rl, key, capacity, period_ms, now_ms);
	return log_take(&lr->log, key, capacity, period_ms, now_ms);
}

START_TEST(in_addition_rules_all_charged_most_specific_first)
{
	struct policy_builder *b = policy_builder_new();
	policy_builder_defaults(b, POLICY_MODE_OPEN, true);
	struct policy_limits add1 = { .set = POLICY_LIM_MSG_MINUTE, .messages_per_minute = 1, .in_addition = true };
	struct policy_limits add2 = { .set = POLICY_LIM_MSG_MINUTE, .messages_per_minute = 2, .in_addition = true };
	struct policy_limits add5 = { .set = POLICY_LIM_MSG_MINUTE, .messages_per_minute = 5, .in_addition = true };
	struct policy_limits ord = { .set = POLICY_LIM_MSG_MINUTE, .messages_per_minute = 3 };
	ck_assert_int_eq(policy_builder_rule(b, 1, POLICY_SCOPE_DOMAIN, "gk.example", POLICY_MODE_NONE, &add2, 0), 0);
	ck_assert_int_eq(policy_builder_rule(b, 2, POLICY_SCOPE_USER, "mimi://gk.example/u/troll", POLICY_MODE_NONE,
					     &add1, 0),
			 0);
	ck_assert_int_eq(policy_builder_rule(b, 3, POLICY_SCOPE_NETWORK, "peer:gk", POLICY_MODE_NONE, &ord, 0), 0);
	ck_assert_int_eq(policy_builder_rule(b, 4, POLICY_SCOPE_DOMAIN, "*.example", POLICY_MODE_NONE, &add5, 0), 0);
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	ck_assert_ptr_nonnull(s);
	struct logged_rate lr = { .rl = ratelimit_new(512) };
	struct policy_rate rate = { logged_take, &lr, NULL };
	struct policy_request r = troll_message(&rate);
	/* each message in turn (troll's, then nice's): the verdict, the rule,
	 * the buckets charged in order */
	static const struct {
		enum policy_verdict v;
		int64_t rule;
		const char *keys[4];
	} want[] = {
		{ POLICY_HOLD, 0, { "mpm:2:mimi://gk.example/u/troll", "mpm:1:gk.example", "mpm:4:*.example", "mpm:3:peer:gk" } },
		{ POLICY_LIMIT, 2, { "mpm:2:mimi://gk.example/u/troll" } },
		{ POLICY_HOLD, 0, { "mpm:1:gk.example", "mpm:4:*.example", "mpm:3:peer:gk" } },
		{ POLICY_LIMIT, 1, { "mpm:1:gk.example" } },
	};
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		struct policy_decision d;
		if (i == 2)
			r.sender.uri = "mimi://gk.example/u/nice";
		lr.log.n = 0;
		policy_decide(s, &r, &d);
		ck_assert_msg(d.verdict == want[i].v && d.rule_id == want[i].rule, "message %zu: %s %s %" PRId64, i,
			      policy_verdict_name(d.verdict), d.reason, d.rule_id);
		int n = 0;
		while (n < 4 && want[i].keys[n])
			n++;
		ck_assert_int_eq(lr.log.n, n);
		for (int k = 0; k < n; k++)
			ck_assert_str_eq(lr.log.keys[k], want[i].keys[k]);
	}
	ratelimit_free(lr.rl);
	policy_snapshot_free(s);
}
END_TEST

/* An in_addition rule (the automatic limit after abuse reports), as the
 * loader reads it: its bucket is charged before the domain's, so that the
 * messages it refuses take nothing from the bucket the domain's other
 * users share; its member is refused unless a boolean, and written back
 * only when true. */
START_TEST(in_addition_rule_charged_first)
{
	struct policy_builder *b = policy_builder_new();
	policy_builder_defaults(b, POLICY_MODE_OPEN, true);
	ck_assert_int_eq(policy_builder_rule_row(b, "1", "domain", "gk.example", "", "{\"messages_per_minute\": 2}", "0"),
			 0);
	ck_assert_int_eq(policy_builder_rule_row(b, "2", "user", "mimi://gk.example/u/troll", "",
						 "{\"messages_per_minute\": 1, \"in_addition\": true}", "0"),
			 0);
	ck_assert_int_eq(policy_builder_rule_row(b, "3", "user", "mimi://gk.example/u/x", "", "{\"in_addition\": 1}", "0"),
			 -1);
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	ck_assert_ptr_nonnull(s);
	struct ratelimit *rl = ratelimit_new(512);
	struct policy_rate rate = { ratelimit_policy_take, rl, ratelimit_policy_peek };
	struct policy_request r = troll_message(&rate);
	/* verdict, reason, rule of each message in turn: troll's, then nice's */
	static const struct {
		enum policy_verdict v;
		const char *reason;
		int64_t rule;
	} want[] = {
		{ POLICY_HOLD, "no_consent_yet", 0 },       { POLICY_LIMIT, "rate_limited_user", 2 },
		{ POLICY_LIMIT, "rate_limited_user", 2 },   { POLICY_LIMIT, "rate_limited_user", 2 },
		/* The domain's second token is still there for another user. */
		{ POLICY_HOLD, "no_consent_yet", 0 },       { POLICY_LIMIT, "rate_limited_domain", 1 },
	};
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		struct policy_decision d;
		if (i == 4)
			r.sender.uri = "mimi://gk.example/u/nice";
		policy_decide(s, &r, &d);
		ck_assert_msg(d.verdict == want[i].v && strcmp(d.reason, want[i].reason) == 0 && d.rule_id == want[i].rule,
			      "message %zu: %s %s %" PRId64, i, policy_verdict_name(d.verdict), d.reason, d.rule_id);
	}
	ratelimit_free(rl);
	policy_snapshot_free(s);

	struct policy_limits l;
	char err[400];
	json_t *in = json_pack("{s:i, s:b}", "messages_per_minute", 1, "in_addition", 1);
	ck_assert(policy_limits_from_json(in, &l, err, sizeof(err)) && l.in_addition);
	json_t *out = policy_limits_to_json(&l);
	ck_assert(json_equal(in, out));
	json_decref(out);
	json_object_set_new(in, "in_addition", json_false());
	ck_assert(policy_limits_from_json(in, &l, err, sizeof(err)) && !l.in_addition);
	out = policy_limits_to_json(&l);
	ck_assert_ptr_null(json_object_get(out, "in_addition"));
	json_decref(out);
	json_object_set_new(in, "in_addition", json_string("yes"));
	ck_assert(!policy_limits_from_json(in, &l, err, sizeof(err)));
	ck_assert_str_eq(err, "limits.in_addition must be true or false");
	json_decref(in);
}
END_TEST

/* A rule row whose limits the loader cannot read in full (a newer build's
 * member during a rolling restart, a value SQL wrote): a mode that refuses
 * is kept, and the limits this build knows apply.  Until the forty-fifth
 * session the whole row was skipped, and a deny of an abuser with it. */
START_TEST(rule_row_with_limits_not_understood_keeps_its_refusal)
{
	struct policy_builder *b = policy_builder_new();
	policy_builder_defaults(b, POLICY_MODE_OPEN, true);
	ck_assert_int_eq(policy_builder_rule_row(b, "1", "user", "mimi://gk.example/u/troll", "deny",
						 "{\"messages_per_minute_of_the_future\": 3}", "0"),
			 1);
	ck_assert_int_eq(policy_builder_rule_row(b, "2", "domain", "bad.example", "closed",
						 "{\"messages_per_minute\": 0}", "0"),
			 1);
	/* known members kept beside an unknown one */
	ck_assert_int_eq(policy_builder_rule_row(b, "3", "domain", "gk.example", "",
						 "{\"max_body_bytes\": 10, \"later_limit\": {\"x\": 1}}", "0"),
			 1);
	/* an open rule whose limits cannot be read lets nothing more through */
	ck_assert_int_eq(policy_builder_rule_row(b, "4", "domain", "open.example", "open",
						 "{\"max_body_bytes\": -1}", "0"),
			 -1);
	ck_assert_int_eq(policy_builder_rule_row(b, "5", "domain", "what.example", "", "not json", "0"), -1);
	ck_assert_int_eq(policy_builder_rule_row(b, "6", "domain", "fine.example", "deny", "{}", "0"), 0);
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	ck_assert_ptr_nonnull(s);
	ck_assert_uint_eq(policy_snapshot_rule_count(s), 4);
	struct policy_request r = troll_message(NULL);
	struct policy_decision d;
	policy_decide(s, &r, &d);
	ck_assert_str_eq(d.reason, "server_denied_user");
	ck_assert_int_eq(d.rule_id, 1);
	r.sender = (struct policy_party){ "mimi://bad.example/u/x", "bad.example", "peer:bad" };
	policy_decide(s, &r, &d);
	ck_assert_str_eq(d.reason, "server_closed");
	ck_assert_int_eq(d.rule_id, 2);
	r.sender = (struct policy_party){ "mimi://gk.example/u/nice", "gk.example", "peer:gk" };
	r.body_bytes = 11;
	policy_decide(s, &r, &d);
	ck_assert_str_eq(d.reason, "too_large");
	ck_assert_int_eq(d.rule_id, 3);
	policy_snapshot_free(s);

	/* The admin API's reading stays strict: an unknown member is refused. */
	struct policy_limits l;
	char err[400];
	json_t *in = json_pack("{s:i}", "later_limit", 1);
	ck_assert(!policy_limits_from_json(in, &l, err, sizeof(err)));
	json_decref(in);
}
END_TEST

/* The outbound limits as the admin API and the rules table give them. */
START_TEST(outbound_limits_json)
{
	struct policy_limits l;
	char err[400];
	json_t *in = json_pack("{s:i, s:i}", "outbound_messages_per_minute_per_user", 30,
			       "outbound_new_conversations_per_hour_per_user", 5);
	ck_assert_msg(policy_limits_from_json(in, &l, err, sizeof(err)), "%s", err);
	ck_assert_uint_eq(l.set, POLICY_LIM_OUT_MSG_MINUTE_USER | POLICY_LIM_OUT_NEW_CONV_HOUR_USER);
	ck_assert_uint_eq(l.outbound_messages_per_minute_per_user, 30);
	ck_assert_uint_eq(l.outbound_new_conversations_per_hour_per_user, 5);
	json_t *out = policy_limits_to_json(&l);
	ck_assert(json_equal(in, out));
	json_decref(out);
	const json_t *bad[] = { json_integer(0), json_integer(1000001), json_string("30"), json_real(2.5),
				json_integer(-1), json_null() };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		json_object_set(in, "outbound_messages_per_minute_per_user", (json_t *)bad[i]);
		ck_assert(!policy_limits_from_json(in, &l, err, sizeof(err)));
		ck_assert_str_eq(err, "limits.outbound_messages_per_minute_per_user must be a whole number from 1 to 1000000");
		json_decref((json_t *)bad[i]);
	}
	json_decref(in);
	/* The unknown member's message names them. */
	in = json_pack("{s:i}", "outbound_messages_per_minute", 3);
	ck_assert(!policy_limits_from_json(in, &l, err, sizeof(err)));
	ck_assert_msg(strstr(err, "outbound_messages_per_minute_per_user") &&
			      strstr(err, "outbound_new_conversations_per_hour_per_user"),
		      "%s", err);
	json_decref(in);
}
END_TEST

/* The per-event memo (gateway/policy_live.c) charges each bucket once
 * however many distinct buckets the event's decisions name: until the
 * twenty-seventh session it remembered 8, and a key past them (a group
 * whose recipients match more rules) was charged again on each decision. */
#define MEMO_KEYS 100
START_TEST(rate_memo_charges_each_key_once)
{
	struct ratelimit *rl = ratelimit_new(4096);
	ck_assert_ptr_nonnull(rl);
	struct policy_rate_memo m;
	policy_rate_memo_init(&m, rl);
	char key[64];
	/* Each key twice (interleaved, as a group's recipients ask): each
	 * one token of two is taken, the second ask answered from the memo. */
	for (int round = 0; round < 2; round++)
		for (int i = 0; i < MEMO_KEYS; i++) {
			snprintf(key, sizeof(key), "omp:%d:mimi://hub.example/u/alice", i);
			ck_assert_int_eq(m.rate.take(m.rate.ctx, key, 2, 60000, 0), 0);
		}
	ck_assert(!m.first_refusal);
	policy_rate_memo_finish(&m);
	for (int i = 0; i < MEMO_KEYS; i++) {
		snprintf(key, sizeof(key), "omp:%d:mimi://hub.example/u/alice", i);
		ck_assert_msg(ratelimit_take(rl, key, 2, 60000, 0, NULL) == 0, "key %d charged twice", i);
		ck_assert_int_gt(ratelimit_take(rl, key, 2, 60000, 0, NULL), 0);
	}
	/* A refusal is remembered as well: the next ask is refused again,
	 * once recorded as the episode's first. */
	policy_rate_memo_init(&m, rl);
	for (int i = 0; i < MEMO_KEYS; i++) {
		snprintf(key, sizeof(key), "x%d", i);
		ck_assert_int_eq(m.rate.take(m.rate.ctx, key, 1, 60000, 0), 0);
	}
	ck_assert_int_eq(ratelimit_take(rl, "y", 1, 60000, 0, NULL), 0);
	ck_assert(!m.first_refusal);
	ck_assert_int_eq(m.rate.take(m.rate.ctx, "y", 1, 60000, 0), 60000);
	ck_assert(m.first_refusal);
	ck_assert_int_eq(m.rate.take(m.rate.ctx, "y", 1, 60000, 0), 60000);
	bool first = true; /* the memo's refusal was the episode's first, and its only ask */
	ck_assert_int_eq(ratelimit_take(rl, "y", 1, 60000, 0, &first), 60000);
	ck_assert(!first);
	policy_rate_memo_finish(&m);
	policy_rate_memo_finish(&m); /* twice is harmless */
	ratelimit_free(rl);
}
END_TEST

/* Two keys the memo is asked for in one event are two buckets, even when
 * a peer chose them to share a hash: until the forty-eighth session the
 * memo told buckets apart by an unseeded FNV-1a of the key alone, so a
 * sender URI whose per-user key hashed as its domain's key of the same
 * event was answered with the domain's bucket, and its own never charged.
 * These two (a known FNV-1a-64 collision, kept by any common suffix) are
 * told apart as the table tells them (ratelimit_id). */
START_TEST(rate_memo_tells_apart_keys_of_one_fnv_hash)
{
	static const char *const sfx[] = { "@wa.example", "@wb.example", "@wc.example" };
	char a[3][64], b[3][64];
	for (int i = 0; i < 3; i++) {
		snprintf(a[i], sizeof(a[i]), "7mohtcOFVz%s", sfx[i]);
		snprintf(b[i], sizeof(b[i]), "c1E51sSEyx%s", sfx[i]);
		ck_assert_str_ne(a[i], b[i]);
		ck_assert_uint_eq(fnv1a(FNV1A_START, a[i], strlen(a[i])), fnv1a(FNV1A_START, b[i], strlen(b[i])));
	}
	struct ratelimit *rl = ratelimit_new(4096);
	ck_assert_ptr_nonnull(rl);
	ck_assert(!ratelimit_id_eq(ratelimit_id(rl, a[0]), ratelimit_id(rl, b[0])));
	ck_assert(ratelimit_id_eq(ratelimit_id(rl, a[0]), ratelimit_id(rl, a[0])));
	struct policy_rate_memo m;
	/* Both granted, each from its own bucket: both charged. */
	policy_rate_memo_init(&m, rl);
	ck_assert_int_eq(m.rate.take(m.rate.ctx, a[0], 1, 60000, 0), 0);
	ck_assert_int_eq(m.rate.take(m.rate.ctx, b[0], 1, 60000, 0), 0);
	policy_rate_memo_finish(&m);
	ck_assert_int_eq(ratelimit_peek(rl, a[0], 1, 60000, 0, NULL), 60000);
	ck_assert_msg(ratelimit_peek(rl, b[0], 1, 60000, 0, NULL) == 60000, "the second key's bucket not charged");
	/* The first refused: the second is still granted, from its own. */
	ck_assert_int_eq(ratelimit_take(rl, a[1], 1, 60000, 0, NULL), 0);
	policy_rate_memo_init(&m, rl);
	ck_assert_int_eq(m.rate.take(m.rate.ctx, a[1], 1, 60000, 0), 60000);
	ck_assert_int_eq(m.rate.take(m.rate.ctx, b[1], 1, 60000, 0), 0);
	policy_rate_memo_finish(&m);
	ck_assert_int_eq(ratelimit_peek(rl, b[1], 1, 60000, 0, NULL), 60000);
	/* A peek of the second after a take of the first asks its own bucket
	 * (empty: refused), not the first's answer. */
	ck_assert_int_eq(ratelimit_take(rl, b[2], 1, 60000, 0, NULL), 0);
	policy_rate_memo_init(&m, rl);
	ck_assert_int_eq(m.rate.take(m.rate.ctx, a[2], 1, 60000, 0), 0);
	ck_assert_int_eq(m.rate.peek(m.rate.ctx, b[2], 1, 60000, 0), 60000);
	ck_assert(m.first_refusal);
	policy_rate_memo_finish(&m);
	ratelimit_free(rl);
}
END_TEST

/* A memo's ledger (since the forty-third session): a write that runs
 * again gives back what its run before took (undo), and is charged once;
 * a give (policy_rate_ledger_give) gives back only a token the write took,
 * once; a first refusal a rolled-back run saw is a first again, once, for
 * the next run; the tokens of the run that commits stay taken. */
START_TEST(rate_ledger_charges_a_write_once_whatever_its_runs)
{
	struct ratelimit *rl = ratelimit_new(4096);
	ck_assert_ptr_nonnull(rl);
	struct policy_rate_ledger l = { .rl = rl };
	struct policy_rate_memo m;
	ck_assert_int_eq(ratelimit_take(rl, "full", 1, 60000, 0, NULL), 0); /* the episode's bucket, empty */
	for (int run = 0; run < 3; run++) {
		if (run)
			policy_rate_ledger_undo(&l, 0);
		policy_rate_memo_init(&m, rl);
		m.ledger = &l;
		ck_assert_int_eq(m.rate.take(m.rate.ctx, "a", 2, 60000, 0), 0);
		ck_assert_int_eq(m.rate.take(m.rate.ctx, "a", 2, 60000, 0), 0); /* the memo's: no take */
		ck_assert_int_eq(m.rate.take(m.rate.ctx, "b", 2, 60000, 0), 0);
		/* refused: each run's is its first (the run before was rolled back) */
		ck_assert_int_eq(m.rate.take(m.rate.ctx, "full", 1, 60000, 0), 60000);
		ck_assert(m.first_refusal);
		policy_rate_memo_finish(&m);
		policy_rate_memo_init(&m, rl); /* another decision of the run: no first */
		m.ledger = &l;
		ck_assert_int_eq(m.rate.take(m.rate.ctx, "full", 1, 60000, 0), 60000);
		ck_assert(!m.first_refusal);
		ck_assert_int_eq(m.rate.take(m.rate.ctx, "c", 2, 60000, 0), 0);
		policy_rate_memo_finish(&m);
	}
	/* "c" is given back once, "z" (never taken) not at all. */
	policy_rate_ledger_give(&l, "c", 2, 60000, 0);
	policy_rate_ledger_give(&l, "c", 2, 60000, 0);
	policy_rate_ledger_give(&l, "z", 2, 60000, 0);
	policy_rate_ledger_free(&l);
	ck_assert_ptr_null(l.g);
	/* one token each of a and b taken, however many runs; c's given back */
	ck_assert_int_eq(ratelimit_take(rl, "a", 2, 60000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "a", 2, 60000, 0, NULL), 0);
	ck_assert_int_eq(ratelimit_take(rl, "b", 2, 60000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "b", 2, 60000, 0, NULL), 0);
	ck_assert_int_eq(ratelimit_take(rl, "c", 2, 60000, 0, NULL), 0);
	ck_assert_int_eq(ratelimit_take(rl, "c", 2, 60000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "c", 2, 60000, 0, NULL), 0);
	/* A run whose bucket's refusal was owed, that does not meet it, owes
	 * it on; the next that meets it reports it once. */
	struct policy_rate_ledger k = { .rl = rl };
	policy_rate_memo_init(&m, rl);
	m.ledger = &k;
	ck_assert_int_eq(m.rate.take(m.rate.ctx, "full", 1, 60000, 0), 60000);
	ck_assert(!m.first_refusal); /* the episode's first was long ago */
	policy_rate_memo_finish(&m);
	ck_assert_int_eq(ratelimit_take(rl, "d", 1, 60000, 0, NULL), 0);
	policy_rate_memo_init(&m, rl);
	m.ledger = &k;
	ck_assert_int_eq(m.rate.take(m.rate.ctx, "d", 1, 60000, 0), 60000);
	ck_assert(m.first_refusal);
	policy_rate_memo_finish(&m);
	policy_rate_ledger_undo(&k, 0); /* d owed */
	policy_rate_ledger_undo(&k, 0); /* a run that met nothing: still owed */
	for (int i = 0; i < 2; i++) {
		policy_rate_memo_init(&m, rl);
		m.ledger = &k;
		ck_assert_int_eq(m.rate.peek(m.rate.ctx, "d", 1, 60000, 0), 60000);
		ck_assert(m.first_refusal == (i == 0));
		policy_rate_memo_finish(&m);
	}
	policy_rate_ledger_free(&k);
	ratelimit_free(rl);
}
END_TEST

/* Every first refusal a rolled-back run saw is owed to the next run, how
 * many are owed already: until the forty-fourth session the owed buckets
 * shared the capacity of the run's firsts, and a run's first refusal past
 * it (here e's, with four owed) was lost, its episode never recorded. */
START_TEST(rate_ledger_owes_every_first_refusal)
{
	struct ratelimit *rl = ratelimit_new(4096);
	ck_assert_ptr_nonnull(rl);
	struct policy_rate_ledger l = { .rl = rl };
	struct policy_rate_memo m;
	const char *full[] = { "q0", "q1", "q2", "q3", "e" };
	for (size_t i = 0; i < CW_ARRAY_LEN(full); i++)
		ck_assert_int_eq(ratelimit_take(rl, full[i], 1, 60000, 0, NULL), 0);
	policy_rate_memo_init(&m, rl);
	m.ledger = &l;
	for (size_t i = 0; i < 4; i++)
		ck_assert_int_eq(m.rate.take(m.rate.ctx, full[i], 1, 60000, 0), 60000);
	ck_assert(m.first_refusal);
	policy_rate_memo_finish(&m);
	policy_rate_ledger_undo(&l, 0); /* q0-q3 owed */
	policy_rate_memo_init(&m, rl);
	m.ledger = &l;
	ck_assert_int_eq(m.rate.take(m.rate.ctx, "e", 1, 60000, 0), 60000);
	ck_assert(m.first_refusal);
	policy_rate_memo_finish(&m);
	policy_rate_ledger_undo(&l, 0); /* e owed too */
	for (size_t i = 0; i < CW_ARRAY_LEN(full); i++) {
		policy_rate_memo_init(&m, rl);
		m.ledger = &l;
		ck_assert_int_eq(m.rate.peek(m.rate.ctx, full[i], 1, 60000, 0), 60000);
		ck_assert_msg(m.first_refusal, "%s's first refusal owed", full[i]);
		policy_rate_memo_finish(&m);
	}
	policy_rate_ledger_free(&l);
	ratelimit_free(rl);
}
END_TEST

/* An item's tokens (a memo's ledger_item, since the forty-third session):
 * given back when the write refuses the item, once however often; taken
 * again when a run again writes it after all (a bucket emptied meanwhile
 * is not charged, and the token is forgotten); a run again of the
 * decisions (undo) does not give back again what was given; a give by key
 * gives only the job's tokens, not an item's. */
START_TEST(rate_ledger_gives_back_a_refused_items_tokens)
{
	struct ratelimit *rl = ratelimit_new(4096);
	ck_assert_ptr_nonnull(rl);
	struct policy_rate_ledger l = { .rl = rl };
	struct policy_rate_memo m;
	for (size_t item = 0; item < 2; item++) {
		policy_rate_memo_init(&m, rl);
		m.ledger = &l;
		m.ledger_item = item;
		ck_assert_int_eq(m.rate.take(m.rate.ctx, "e", 2, 60000, 0), 0);
		ck_assert_int_eq(m.rate.take(m.rate.ctx, item ? "f" : "g", 1, 60000, 0), 0);
		policy_rate_memo_finish(&m);
	}
	policy_rate_ledger_give(&l, "e", 2, 60000, 0); /* an item's: not given by key */
	ck_assert_int_gt(ratelimit_take(rl, "e", 2, 60000, 0, NULL), 0);
	policy_rate_ledger_give_item(&l, 1, 0);
	policy_rate_ledger_give_item(&l, 1, 0); /* once */
	ck_assert_int_eq(ratelimit_take(rl, "e", 2, 60000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "e", 2, 60000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "g", 1, 60000, 0, NULL), 0); /* item 0's kept */
	/* a run again writes item 1 after all: "e" is empty now (not charged,
	 * forgotten), "f" has its token back (taken again) */
	policy_rate_ledger_take_item(&l, 1, 0);
	ck_assert_int_gt(ratelimit_take(rl, "f", 1, 60000, 0, NULL), 0);
	policy_rate_ledger_take_item(&l, 1, 0); /* nothing given back: nothing taken */
	/* refused again, and the decisions run again: f given back once */
	policy_rate_ledger_give_item(&l, 1, 0);
	policy_rate_ledger_undo(&l, 0);
	ck_assert_int_eq(ratelimit_take(rl, "f", 1, 60000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "f", 1, 60000, 0, NULL), 0);
	ck_assert_int_eq(ratelimit_take(rl, "g", 1, 60000, 0, NULL), 0); /* item 0's, by the undo */
	ck_assert_int_eq(ratelimit_take(rl, "e", 2, 60000, 0, NULL), 0); /* item 0's too */
	ck_assert_int_gt(ratelimit_take(rl, "e", 2, 60000, 0, NULL), 0);
	policy_rate_ledger_free(&l);
	ratelimit_free(rl);
}
END_TEST

/* A job's token given back (policy_rate_ledger_give: a first contact's
 * consent request the write held unasked) is taken again when a run again
 * of the write makes the request after all (policy_rate_ledger_retake),
 * once for each give; a bucket emptied meanwhile is not charged, and the
 * token is forgotten; a give after a retake gives it back again, and a
 * run again of the decisions (undo) never gives back what a give gave.
 * Until the forty-sixth session the give forgot the token: the request a
 * later run made cost its sender nothing. */
START_TEST(rate_ledger_takes_again_a_token_given_back)
{
	struct ratelimit *rl = ratelimit_new(4096);
	ck_assert_ptr_nonnull(rl);
	struct policy_rate_ledger l = { .rl = rl };
	struct policy_rate_memo m;
	policy_rate_memo_init(&m, rl);
	m.ledger = &l; /* its takes the job's (POLICY_LEDGER_JOB, as init leaves it) */
	ck_assert_int_eq(m.rate.take(m.rate.ctx, "c", 2, 60000, 0), 0);
	ck_assert_int_eq(m.rate.take(m.rate.ctx, "s", 1, 60000, 0), 0);
	policy_rate_memo_finish(&m);
	/* run 1 holds the pair unasked: both given back */
	policy_rate_ledger_give(&l, "c", 2, 60000, 0);
	policy_rate_ledger_give(&l, "s", 1, 60000, 0);
	policy_rate_ledger_give(&l, "c", 2, 60000, 0); /* once */
	/* run 2 makes the request: taken again, once */
	policy_rate_ledger_retake(&l, "c", 2, 60000, 0);
	policy_rate_ledger_retake(&l, "c", 2, 60000, 0);
	ck_assert_int_eq(ratelimit_take(rl, "c", 2, 60000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "c", 2, 60000, 0, NULL), 0); /* two taken: the job's and this */
	/* "s" emptied by someone else meanwhile: not charged, forgotten */
	ck_assert_int_eq(ratelimit_take(rl, "s", 1, 60000, 0, NULL), 0);
	policy_rate_ledger_retake(&l, "s", 1, 60000, 0);
	ck_assert_int_eq(ratelimit_take(rl, "s", 1, 60000, 60000, NULL), 0); /* refilled */
	policy_rate_ledger_give(&l, "s", 1, 60000, 60000); /* forgotten: nothing given */
	ck_assert_int_gt(ratelimit_take(rl, "s", 1, 60000, 60000, NULL), 0);
	/* run 3 holds it unasked again: "c" given back again; the decisions
	 * run again (undo): not given a second time */
	policy_rate_ledger_give(&l, "c", 2, 60000, 0);
	policy_rate_ledger_undo(&l, 0);
	ck_assert_int_eq(ratelimit_take(rl, "c", 2, 60000, 0, NULL), 0);
	ck_assert_int_gt(ratelimit_take(rl, "c", 2, 60000, 0, NULL), 0);
	policy_rate_ledger_free(&l);
	ratelimit_free(rl);
}
END_TEST

/* A peek through the memo (since the twenty-eighth session) sees the
 * event's own takes, and is not remembered: a later take takes. */
START_TEST(rate_memo_peek_sees_its_own_takes)
{
	struct ratelimit *rl = ratelimit_new(4096);
	ck_assert_ptr_nonnull(rl);
	struct policy_rate_memo m;
	policy_rate_memo_init(&m, rl);
	void *ctx = m.rate.ctx;
	/* A bucket the event took from answers as it did: the token is the
	 * event's, whoever else finds the bucket empty. */
	ck_assert_int_eq(m.rate.take(ctx, "a", 1, 60000, 0), 0);
	ck_assert_int_eq(m.rate.peek(ctx, "a", 1, 60000, 0), 0);
	ck_assert_int_eq(ratelimit_peek(rl, "a", 1, 60000, 0, NULL), 60000);
	/* A peek first: the event's take after it still takes. */
	ck_assert_int_eq(m.rate.peek(ctx, "b", 1, 60000, 0), 0);
	ck_assert_int_eq(ratelimit_peek(rl, "b", 1, 60000, 0, NULL), 0);
	ck_assert_int_eq(m.rate.take(ctx, "b", 1, 60000, 0), 0);
	ck_assert_int_eq(ratelimit_peek(rl, "b", 1, 60000, 0, NULL), 60000);
	/* Past the entries kept inline as well. */
	char key[64];
	for (int i = 0; i < MEMO_KEYS; i++) {
		snprintf(key, sizeof(key), "omp:%d:mimi://hub.example/u/alice", i);
		ck_assert_int_eq(m.rate.take(ctx, key, 1, 60000, 0), 0);
	}
	for (int i = 0; i < MEMO_KEYS; i++) {
		snprintf(key, sizeof(key), "omp:%d:mimi://hub.example/u/alice", i);
		ck_assert_msg(m.rate.peek(ctx, key, 1, 60000, 0) == 0, "key %d", i);
	}
	ck_assert(!m.first_refusal);
	policy_rate_memo_finish(&m);
	/* An empty bucket: the peek's refusal is the episode's first (a
	 * flood recorded once), the next event's refusals are not. */
	policy_rate_memo_init(&m, rl);
	ck_assert_int_eq(m.rate.peek(ctx, "a", 1, 60000, 0), 60000);
	ck_assert(m.first_refusal);
	policy_rate_memo_finish(&m);
	policy_rate_memo_init(&m, rl);
	ck_assert_int_eq(m.rate.peek(ctx, "a", 1, 60000, 1), 59999);
	ck_assert_int_eq(m.rate.take(ctx, "a", 1, 60000, 1), 59999);
	ck_assert(!m.first_refusal);
	policy_rate_memo_finish(&m);
	/* Without buckets, neither. */
	policy_rate_memo_init(&m, NULL);
	ck_assert_ptr_null(m.rate.take);
	ck_assert_ptr_null(m.rate.peek);
	policy_rate_memo_finish(&m);
	ratelimit_free(rl);
}
END_TEST

/* One outbound event to a group with a member at an open domain and one
 * at a closed domain, both under a network rule's outbound limit of one
 * message: the closed one's decision peeks (takes nothing), and sees the
 * event's own take (its token is the event's: server_closed, not limit),
 * in either order. */
START_TEST(outbound_group_event_closed_member_peeks)
{
	struct policy_builder *b = policy_builder_new();
	policy_builder_defaults(b, POLICY_MODE_OPEN, true);
	struct policy_limits l = { .set = POLICY_LIM_OUT_MSG_MINUTE_USER, .outbound_messages_per_minute_per_user = 1 };
	ck_assert_int_eq(policy_builder_rule(b, 1, POLICY_SCOPE_NETWORK, "peer:pc", POLICY_MODE_NONE, &l, 0), 0);
	ck_assert_int_eq(policy_builder_rule(b, 2, POLICY_SCOPE_DOMAIN, "closed.example", POLICY_MODE_CLOSED, NULL, 0),
			 0);
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	ck_assert_ptr_nonnull(s);
	const struct policy_party open = { "mimi://open.example/u/o", "open.example", "peer:pc" },
				  closed = { "mimi://closed.example/u/c", "closed.example", "peer:pc" };
	for (int order = 0; order < 2; order++) {
		struct ratelimit *rl = ratelimit_new(4096);
		struct policy_rate_memo m;
		policy_rate_memo_init(&m, rl);
		struct policy_request r = {
			.direction = POLICY_OUTBOUND, .action = POLICY_ACT_EVENT, .event_type = "message",
			.sender = { "mimi://hub.example/u/alice", "hub.example", "local" }, .group = true,
			.now_ms = 0, .rate = &m.rate,
		};
		struct policy_decision d;
		for (int k = 0; k < 2; k++) {
			bool to_closed = (k == 0) == (order == 1);
			r.recipient = to_closed ? closed : open;
			policy_decide(s, &r, &d);
			ck_assert_str_eq(d.reason, to_closed ? "server_closed" : "outbound");
		}
		ck_assert(!m.first_refusal);
		policy_rate_memo_finish(&m);
		/* One token was taken, by the open member's decision: the
		 * next event finds the bucket empty, for both. */
		policy_rate_memo_init(&m, rl);
		r.recipient = closed;
		policy_decide(s, &r, &d);
		ck_assert_str_eq(d.reason, "rate_limited_local_sender");
		ck_assert_int_eq(d.retry_after_ms, 60000);
		ck_assert(m.first_refusal);
		r.recipient = open;
		policy_decide(s, &r, &d);
		ck_assert_str_eq(d.reason, "rate_limited_local_sender");
		policy_rate_memo_finish(&m);
		/* Buckets that cannot be peeked are not asked of what step 4
		 * refuses. */
		struct policy_rate take_only = { ratelimit_policy_take, rl, NULL };
		r.rate = &take_only;
		r.recipient = closed;
		policy_decide(s, &r, &d);
		ck_assert_str_eq(d.reason, "server_closed");
		ratelimit_free(rl);
	}
	policy_snapshot_free(s);
}
END_TEST

/* The same through the policy: one outbound event to a group whose
 * recipients each match a rule of their own, each rule's bucket holding
 * one token, every recipient decided twice with the event's one memo (a
 * bucket the memo forgot would refuse the second ask). */
START_TEST(outbound_group_event_past_the_old_memo_charges_each_rule_once)
{
	struct policy_builder *b = policy_builder_new();
	policy_builder_defaults(b, POLICY_MODE_OPEN, true);
	struct policy_limits l = { .set = POLICY_LIM_OUT_MSG_MINUTE_USER, .outbound_messages_per_minute_per_user = 1 };
	char pat[64], uri[MEMO_KEYS][64], dom[MEMO_KEYS][64];
	for (int i = 0; i < MEMO_KEYS; i++) {
		snprintf(pat, sizeof(pat), "d%d.example", i);
		ck_assert_int_eq(policy_builder_rule(b, 1000 + i, POLICY_SCOPE_DOMAIN, pat, POLICY_MODE_NONE, &l, 0), 0);
		snprintf(dom[i], sizeof(dom[i]), "d%d.example", i);
		snprintf(uri[i], sizeof(uri[i]), "mimi://d%d.example/u/r", i);
	}
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	ck_assert_ptr_nonnull(s);
	struct ratelimit *rl = ratelimit_new(4096);
	struct policy_rate_memo m;
	policy_rate_memo_init(&m, rl);
	struct policy_request r = {
		.direction = POLICY_OUTBOUND, .action = POLICY_ACT_EVENT, .event_type = "message",
		.sender = { "mimi://hub.example/u/alice", "hub.example", "local" }, .group = true, .now_ms = 0,
		.rate = &m.rate,
	};
	struct policy_decision d;
	for (int round = 0; round < 2; round++)
		for (int i = 0; i < MEMO_KEYS; i++) {
			r.recipient = (struct policy_party){ uri[i], dom[i], "matrix" };
			policy_decide(s, &r, &d);
			ck_assert_msg(d.verdict == POLICY_ALLOW, "round %d, recipient %d: %s %s", round, i,
				      policy_verdict_name(d.verdict), d.reason);
		}
	policy_rate_memo_finish(&m);
	/* The next event is limited under each rule: each bucket was charged. */
	policy_rate_memo_init(&m, rl);
	for (int i = 0; i < MEMO_KEYS; i++) {
		r.recipient = (struct policy_party){ uri[i], dom[i], "matrix" };
		policy_decide(s, &r, &d);
		ck_assert_int_eq(d.verdict, POLICY_LIMIT);
		ck_assert_int_eq(d.rule_id, 1000 + i);
	}
	policy_rate_memo_finish(&m);
	ratelimit_free(rl);
	policy_snapshot_free(s);
}
END_TEST

/* The snapshot a policy load read under (pg_current_snapshot()'s text)
 * tells which transactions' changes it has: those below xmin, and those
 * below xmax not in progress then; a NOTIFY of one it has is not loaded
 * again (gateway/policy_live.c, heard).  Text that is not a snapshot
 * sees nothing, so every NOTIFY is loaded. */
START_TEST(xsnap_sees_what_committed_before_it)
{
	struct policy_xsnap x;
	ck_assert(policy_xsnap_parse("100:105:100,103", &x));
	ck_assert_uint_eq(x.nxip, 2);
	ck_assert(policy_xsnap_sees(&x, 3));
	ck_assert(policy_xsnap_sees(&x, 99));
	ck_assert(!policy_xsnap_sees(&x, 100)); /* in progress */
	ck_assert(policy_xsnap_sees(&x, 101));
	ck_assert(policy_xsnap_sees(&x, 102));
	ck_assert(!policy_xsnap_sees(&x, 103));
	ck_assert(policy_xsnap_sees(&x, 104));
	ck_assert(!policy_xsnap_sees(&x, 105)); /* not yet begun */
	ck_assert(!policy_xsnap_sees(&x, 0));   /* not known */
	ck_assert(!policy_xsnap_sees(&x, UINT64_MAX));
	policy_xsnap_free(&x);
	ck_assert(policy_xsnap_parse("748:748:", &x));
	ck_assert_uint_eq(x.nxip, 0);
	ck_assert(policy_xsnap_sees(&x, 747) && !policy_xsnap_sees(&x, 748));
	policy_xsnap_free(&x);
	ck_assert(policy_xsnap_parse("4294967296:4294967300:4294967297", &x)); /* an epoch past the first */
	ck_assert(policy_xsnap_sees(&x, 4294967296ULL) && !policy_xsnap_sees(&x, 4294967297ULL));
	ck_assert(!policy_xsnap_sees(&x, 4294967300ULL) && policy_xsnap_sees(&x, 4294967295ULL));
	policy_xsnap_free(&x);
	static const char *const bad[] = { "", "100", "100:", "100:105", ":105:", "105:100:", "100:105:99",
					   "100:105:105", "100:105:101,", "100:105:,101", "100:105:1x", "x:1:",
					   "-1:5:", "100:105:101 ", NULL };
	for (int i = 0; bad[i]; i++) {
		ck_assert_msg(!policy_xsnap_parse(bad[i], &x), "%s", bad[i]);
		ck_assert(!policy_xsnap_sees(&x, 1) && x.xip == NULL);
	}
}
END_TEST

/* The one FNV-1a (fnv.h) gives the published 64-bit FNV-1a values, in one
 * piece or in parts, and a field's NUL keeps neighbouring fields apart. */
START_TEST(fnv1a_vectors)
{
	ck_assert_uint_eq(fnv1a(FNV1A_START, "", 0), 0xcbf29ce484222325ull);
	ck_assert_uint_eq(fnv1a(FNV1A_START, "a", 1), 0xaf63dc4c8601ec8cull);
	ck_assert_uint_eq(fnv1a(FNV1A_START, "foobar", 6), 0x85944171f73967e8ull);
	ck_assert_uint_eq(fnv1a(fnv1a(FNV1A_START, "foo", 3), "bar", 3), 0x85944171f73967e8ull);
	ck_assert_uint_eq(fnv1a_field(FNV1A_START, "foobar"), fnv1a(FNV1A_START, "foobar", 7));
	ck_assert_uint_ne(fnv1a_field(fnv1a_field(FNV1A_START, "ab"), "c"),
			  fnv1a_field(fnv1a_field(FNV1A_START, "a"), "bc"));
}
END_TEST

int main(void)
{
	Suite *s = suite_create("policy");
	TCase *tc = tcase_create("policy");
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, policy_cases);
	tcase_add_test(tc, content_kind_refusal_names_the_kind);
	tcase_add_test(tc, content_limits_are_known_from_the_rules);
	tcase_add_test(tc, outbound_limits_json);
	tcase_add_test(tc, rule_row_with_limits_not_understood_keeps_its_refusal);
	tcase_add_test(tc, builder_cases);
	tcase_add_test(tc, prop_server_deny_always_denies);
	tcase_add_test(tc, prop_random_requests);
	tcase_add_test(tc, prop_overlay_decides_as_a_whole_rebuild);
	tcase_add_test(tc, overlay_edges);
	tcase_add_test(tc, null_snapshot_and_null_strings);
	tcase_add_test(tc, bucket_keys);
	tcase_add_test(tc, builder_facts_and_counts);
	tcase_add_test(tc, large_tables);
	tcase_add_test(tc, names);
	tcase_add_test(tc, decide_with_ratelimit_refill);
	tcase_add_test(tc, domain_consent_buckets_shared_by_users_kept_apart_by_kind);
	tcase_add_test(tc, per_user_consent_buckets_kept_apart_by_kind);
	tcase_add_test(tc, in_addition_rule_charged_first);
	tcase_add_test(tc, in_addition_rules_all_charged_most_specific_first);
	tcase_add_test(tc, rate_memo_charges_each_key_once);
	tcase_add_test(tc, rate_memo_tells_apart_keys_of_one_fnv_hash);
	tcase_add_test(tc, outbound_group_event_past_the_old_memo_charges_each_rule_once);
	tcase_add_test(tc, rate_memo_peek_sees_its_own_takes);
	tcase_add_test(tc, rate_ledger_charges_a_write_once_whatever_its_runs);
	tcase_add_test(tc, rate_ledger_gives_back_a_refused_items_tokens);
	tcase_add_test(tc, rate_ledger_takes_again_a_token_given_back);
	tcase_add_test(tc, rate_ledger_owes_every_first_refusal);
	tcase_add_test(tc, outbound_group_event_closed_member_peeks);
	suite_add_tcase(s, tc);
	TCase *rt = tcase_create("ratelimit");
	tcase_set_timeout(rt, 120);
	tcase_add_test(rt, rl_capacity_then_refusal);
	tcase_add_test(rt, rl_refill_timing);
	tcase_add_test(rt, rl_give_back);
	tcase_add_test(rt, rl_first_refusal_once_per_episode);
	tcase_add_test(rt, rl_peek_never_changes_the_bucket);
	tcase_add_test(rt, rl_eviction_many_keys);
	tcase_add_test(rt, rl_windows_are_the_tables_own);
	tcase_add_test(rt, rl_threads);
	tcase_add_test(rt, fnv1a_vectors);
	tcase_add_test(rt, xsnap_sees_what_committed_before_it);
	suite_add_tcase(s, rt);
	return unit_run(s);
}
