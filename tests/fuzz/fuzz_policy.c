/* libFuzzer target: the policy snapshot loader and decide.  The input is
 * the rows the loader reads, as text, one per line, fields split by tabs:
 *
 *   M <default mode> <optin default 0|1>
 *   R <id> <scope> <pattern> <mode or empty> <limits JSON> <expires ms>
 *   O <local uri> <network> <0|1>             an opt-in
 *   C <local uri> <is domain 0|1> <subject> <allowed 0|1>
 *   B <remote uri> <local uri>                a remote user's block
 *   D <direction i|o|t> <action e|n|c> <type> <sender uri> <sender domain>
 *     <sender network> <recipient uri> <recipient domain> <recipient network>
 *     <body bytes> <kinds>                    a decision to take
 *   U <local uri>                             a user of the overlay
 *
 * Properties: nothing crashes or leaks; every decision names a known reason
 * and a verdict; when every row was taken, the snapshot built from the rows
 * in reverse order decides exactly the same (precedence is by specificity,
 * never by the order rows come from the database); an overlay holding the
 * facts of the U users over a snapshot of the other rows decides exactly
 * as the snapshot of all rows; limits that parse give the same limits after
 * policy_limits_to_json and back. */
#include "config.h"
#include "policy.h"
#include "policy_json.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAXF 12
#define MAXL 64

struct line {
	int n;
	char *f[MAXF];
	bool skip; /* a later M line, or a fact whose key came before: the
		      database holds one row per key, so the loader never sees
		      two (and the builder keeps the last, which would make the
		      order matter) */
};

static bool same_key(const struct line *a, const struct line *b)
{
	if (a->f[0][0] != b->f[0][0])
		return false;
	int n = a->n < b->n ? a->n : b->n;
	switch (a->f[0][0]) {
	case 'M':
		return n >= 3;
	case 'O':
	case 'B':
		return n >= 3 && strcmp(a->f[1], b->f[1]) == 0 && strcmp(a->f[2], b->f[2]) == 0;
	case 'C':
		return n >= 4 && strcmp(a->f[1], b->f[1]) == 0 && (a->f[2][0] == '1') == (b->f[2][0] == '1') &&
		       strcmp(a->f[3], b->f[3]) == 0;
	}
	return false;
}

static int split(char *text, struct line *lines)
{
	int n = 0;
	for (char *save = NULL, *l = strtok_r(text, "\n", &save); l && n < MAXL; l = strtok_r(NULL, "\n", &save)) {
		struct line *x = &lines[n++];
		x->n = 0;
		char *p = l;
		while (x->n < MAXF) {
			x->f[x->n++] = p;
			char *tab = strchr(p, '\t');
			if (!tab)
				break;
			*tab = '\0';
			p = tab + 1;
		}
		x->skip = false;
		for (int k = 0; k < n - 1; k++)
			if (same_key(&lines[k], x))
				x->skip = true;
	}
	return n;
}

/* The local user a fact row is of (NULL: not a fact). */
static const char *fact_user(const struct line *x)
{
	char t = x->f[0][0];
	return (t == 'O' && x->n >= 4) || (t == 'C' && x->n >= 5) ? x->f[1] : t == 'B' && x->n >= 3 ? x->f[2] : NULL;
}

static bool overlay_user(const struct line *lines, int n, const char *uri)
{
	for (int k = 0; uri && k < n; k++)
		if (lines[k].f[0][0] == 'U' && lines[k].n >= 2 && strcmp(lines[k].f[1], uri) == 0)
			return true;
	return false;
}

enum part { ALL, NOT_OVERLAY, OVERLAY };

/* Builds the snapshot from the rows, forward or backward (ALL), from the
 * rows but the facts of the U users (NOT_OVERLAY), or (OVERLAY, over base)
 * from the facts of the U users alone; *all_taken: every row was accepted
 * by the builder. */
static struct policy_snapshot *build(struct line *lines, int n, bool reverse, enum part part,
				     const struct policy_snapshot *base, bool *all_taken)
{
	struct policy_builder *b = part == OVERLAY ? policy_builder_overlay(base) : policy_builder_new();
	if (!b)
		abort();
	*all_taken = true;
	for (int k = 0; part == OVERLAY && k < n; k++)
		if (lines[k].f[0][0] == 'U' && lines[k].n >= 2 && policy_builder_user(b, lines[k].f[1]) == -1)
			*all_taken = false;
	for (int k = 0; k < n; k++) {
		const struct line *x = &lines[reverse ? n - 1 - k : k];
		const char *t = x->f[0];
		int rc = 0;
		if (x->skip)
			continue;
		if (part != ALL && overlay_user(lines, n, fact_user(x)) != (part == OVERLAY))
			continue;
		if (part == OVERLAY && !fact_user(x))
			continue;
		if (t[0] == 'M' && x->n >= 3) {
			enum policy_mode m;
			if (policy_mode_parse(x->f[1], &m))
				policy_builder_defaults(b, m, x->f[2][0] == '1');
		} else if (t[0] == 'R' && x->n >= 7) {
			char *lim = strdup(x->f[5]);
			rc = policy_builder_rule_row(b, x->f[1], x->f[2], x->f[3], x->f[4], lim, x->f[6]);
			free(lim);
		} else if (t[0] == 'O' && x->n >= 4) {
			rc = policy_builder_optin(b, x->f[1], x->f[2], x->f[3][0] == '1');
		} else if (t[0] == 'C' && x->n >= 5) {
			rc = policy_builder_consent(b, x->f[1], x->f[2][0] == '1', x->f[3], x->f[4][0] == '1');
		} else if (t[0] == 'B' && x->n >= 3) {
			rc = policy_builder_remote_block(b, x->f[1], x->f[2]);
		}
		if (rc == -2)
			abort(); /* out of memory: not expected at these sizes */
		if (rc < 0) /* 1: a rule row added without some of its limits */
			*all_taken = false;
	}
	struct policy_snapshot *s = policy_builder_finish(b, 1);
	if (!s)
		abort();
	return s;
}

static bool known_reason(const char *r)
{
	for (int i = 0; r && policy_reason_codes[i]; i++)
		if (strcmp(policy_reason_codes[i], r) == 0)
			return true;
	return false;
}

static void decide(const struct policy_snapshot *s, const struct line *x, struct policy_decision *d)
{
	struct policy_request r = { 0 };
	r.direction = x->f[1][0] == 'o' ? POLICY_OUTBOUND : x->f[1][0] == 't' ? POLICY_TRANSIT : POLICY_INBOUND;
	r.action = x->f[2][0] == 'n' ? POLICY_ACT_NEW_ROOM : x->f[2][0] == 'c' ? POLICY_ACT_CONSENT_REQUEST
									 : POLICY_ACT_EVENT;
	r.event_type = x->f[3];
	r.sender = (struct policy_party){ x->f[4], x->f[5], x->f[6] };
	if (r.action != POLICY_ACT_NEW_ROOM)
		r.recipient = (struct policy_party){ x->f[7], x->f[8], x->f[9] };
	r.body_bytes = strtoull(x->f[10], NULL, 10);
	r.content_kinds = (unsigned)strtoul(x->f[11], NULL, 10) & 3u;
	r.now_ms = 1800000000000LL;
	policy_decide(s, &r, d);
	if (!known_reason(d->reason) || (unsigned)d->verdict > POLICY_LIMIT)
		abort();
}

static void limits_round_trip(const struct line *lines, int n)
{
	for (int k = 0; k < n; k++) {
		if (lines[k].f[0][0] != 'R' || lines[k].n < 7)
			continue;
		json_t *j = json_loads(lines[k].f[5], 0, NULL);
		struct policy_limits a, b;
		char why[256];
		if (j && policy_limits_from_json(j, &a, why, sizeof(why))) {
			json_t *back = policy_limits_to_json(&a);
			if (!back || !policy_limits_from_json(back, &b, why, sizeof(why)) || a.set != b.set ||
			    ((a.set & POLICY_LIM_MSG_MINUTE) && a.messages_per_minute != b.messages_per_minute) ||
			    ((a.set & POLICY_LIM_MSG_MINUTE_USER) &&
			     a.messages_per_minute_per_user != b.messages_per_minute_per_user) ||
			    ((a.set & POLICY_LIM_NEW_CONV_HOUR) &&
			     a.new_conversations_per_hour != b.new_conversations_per_hour) ||
			    ((a.set & POLICY_LIM_CONSENT_REQ_DAY) && a.consent_requests_per_day != b.consent_requests_per_day) ||
			    ((a.set & POLICY_LIM_NEW_CONV_HOUR_USER) &&
			     a.new_conversations_per_hour_per_user != b.new_conversations_per_hour_per_user) ||
			    ((a.set & POLICY_LIM_CONSENT_REQ_DAY_USER) &&
			     a.consent_requests_per_day_per_user != b.consent_requests_per_day_per_user) ||
			    ((a.set & POLICY_LIM_OUT_MSG_MINUTE_USER) &&
			     a.outbound_messages_per_minute_per_user != b.outbound_messages_per_minute_per_user) ||
			    ((a.set & POLICY_LIM_OUT_NEW_CONV_HOUR_USER) &&
			     a.outbound_new_conversations_per_hour_per_user !=
				     b.outbound_new_conversations_per_hour_per_user) ||
			    ((a.set & POLICY_LIM_MAX_BODY) && a.max_body_bytes != b.max_body_bytes) ||
			    ((a.set & POLICY_LIM_MAX_ATTACH) && a.max_attachment_bytes != b.max_attachment_bytes) ||
			    ((a.set & POLICY_LIM_CONTENT_KINDS) && a.content_kinds != b.content_kinds))
				abort();
			json_decref(back);
		}
		json_decref(j);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > 16384)
		return 0;
	char *text = malloc(size + 1);
	if (!text)
		abort();
	memcpy(text, data, size);
	text[size] = '\0';
	if (strlen(text) != size) { /* a NUL inside: rows are text */
		free(text);
		return 0;
	}
	static struct line lines[MAXL];
	int n = split(text, lines);
	bool taken_fwd, taken_back, taken_base, taken_ov;
	struct policy_snapshot *fwd = build(lines, n, false, ALL, NULL, &taken_fwd);
	struct policy_snapshot *back = build(lines, n, true, ALL, NULL, &taken_back);
	struct policy_snapshot *base = build(lines, n, false, NOT_OVERLAY, NULL, &taken_base);
	struct policy_snapshot *ov = build(lines, n, false, OVERLAY, base, &taken_ov);
	for (int k = 0; k < n; k++) {
		const struct line *x = &lines[k];
		if (x->f[0][0] != 'D' || x->n < 12)
			continue;
		struct policy_decision a, b, c;
		decide(fwd, x, &a);
		decide(back, x, &b);
		decide(ov, x, &c);
		if (taken_fwd && taken_back &&
		    (a.verdict != b.verdict || strcmp(a.reason, b.reason) != 0 || a.rule_id != b.rule_id))
			abort(); /* the order of rows changed a decision */
		if (taken_fwd && taken_base && taken_ov &&
		    (a.verdict != c.verdict || strcmp(a.reason, c.reason) != 0 || a.rule_id != c.rule_id))
			abort(); /* the overlay decided otherwise than the whole */
	}
	limits_round_trip(lines, n);
	policy_snapshot_free(ov);
	policy_snapshot_free(base);
	policy_snapshot_free(fwd);
	policy_snapshot_free(back);
	free(text);
	return 0;
}
