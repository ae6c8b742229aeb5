/* Rule limits to and from JSON. */
#include "config.h"
#include "policy_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct limit_field {
	const char *name;
	unsigned bit;
	uint64_t max;
};

static const struct limit_field fields[] = {
	{ "messages_per_minute", POLICY_LIM_MSG_MINUTE, 1000000 },
	{ "messages_per_minute_per_user", POLICY_LIM_MSG_MINUTE_USER, 1000000 },
	{ "new_conversations_per_hour", POLICY_LIM_NEW_CONV_HOUR, 1000000 },
	{ "consent_requests_per_day", POLICY_LIM_CONSENT_REQ_DAY, 1000000 },
	{ "new_conversations_per_hour_per_user", POLICY_LIM_NEW_CONV_HOUR_USER, 1000000 },
	{ "consent_requests_per_day_per_user", POLICY_LIM_CONSENT_REQ_DAY_USER, 1000000 },
	{ "outbound_messages_per_minute_per_user", POLICY_LIM_OUT_MSG_MINUTE_USER, 1000000 },
	{ "outbound_new_conversations_per_hour_per_user", POLICY_LIM_OUT_NEW_CONV_HOUR_USER, 1000000 },
	{ "max_body_bytes", POLICY_LIM_MAX_BODY, (uint64_t)1 << 40 },
	{ "max_attachment_bytes", POLICY_LIM_MAX_ATTACH, (uint64_t)1 << 50 },
};

static void set_value(struct policy_limits *l, unsigned bit, uint64_t v)
{
	switch (bit) {
	case POLICY_LIM_MSG_MINUTE: l->messages_per_minute = (uint32_t)v; break;
	case POLICY_LIM_MSG_MINUTE_USER: l->messages_per_minute_per_user = (uint32_t)v; break;
	case POLICY_LIM_NEW_CONV_HOUR: l->new_conversations_per_hour = (uint32_t)v; break;
	case POLICY_LIM_CONSENT_REQ_DAY: l->consent_requests_per_day = (uint32_t)v; break;
	case POLICY_LIM_NEW_CONV_HOUR_USER: l->new_conversations_per_hour_per_user = (uint32_t)v; break;
	case POLICY_LIM_CONSENT_REQ_DAY_USER: l->consent_requests_per_day_per_user = (uint32_t)v; break;
	case POLICY_LIM_OUT_MSG_MINUTE_USER: l->outbound_messages_per_minute_per_user = (uint32_t)v; break;
	case POLICY_LIM_OUT_NEW_CONV_HOUR_USER: l->outbound_new_conversations_per_hour_per_user = (uint32_t)v; break;
	case POLICY_LIM_MAX_BODY: l->max_body_bytes = v; break;
	case POLICY_LIM_MAX_ATTACH: l->max_attachment_bytes = v; break;
	}
	l->set |= bit;
}

static uint64_t get_value(const struct policy_limits *l, unsigned bit)
{
	switch (bit) {
	case POLICY_LIM_MSG_MINUTE: return l->messages_per_minute;
	case POLICY_LIM_MSG_MINUTE_USER: return l->messages_per_minute_per_user;
	case POLICY_LIM_NEW_CONV_HOUR: return l->new_conversations_per_hour;
	case POLICY_LIM_CONSENT_REQ_DAY: return l->consent_requests_per_day;
	case POLICY_LIM_NEW_CONV_HOUR_USER: return l->new_conversations_per_hour_per_user;
	case POLICY_LIM_CONSENT_REQ_DAY_USER: return l->consent_requests_per_day_per_user;
	case POLICY_LIM_OUT_MSG_MINUTE_USER: return l->outbound_messages_per_minute_per_user;
	case POLICY_LIM_OUT_NEW_CONV_HOUR_USER: return l->outbound_new_conversations_per_hour_per_user;
	case POLICY_LIM_MAX_BODY: return l->max_body_bytes;
	case POLICY_LIM_MAX_ATTACH: return l->max_attachment_bytes;
	}
	return 0;
}

/* lenient: a member this build does not know is passed over (*skipped
 * set), not refused; a known member's bad value is refused either way. */
static bool limits_parse(const json_t *o, struct policy_limits *out, char *err, size_t errlen, bool lenient,
			 bool *skipped)
{
	memset(out, 0, sizeof(*out));
	if (!json_is_object(o)) {
		snprintf(err, errlen, "limits must be an object");
		return false;
	}
	const char *key;
	json_t *v;
	json_object_foreach((json_t *)o, key, v) {
		const struct limit_field *f = NULL;
		for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
			if (strcmp(fields[i].name, key) == 0)
				f = &fields[i];
		if (f) {
			if (!json_is_integer(v) || json_integer_value(v) < 1 ||
			    (uint64_t)json_integer_value(v) > f->max) {
				snprintf(err, errlen, "limits.%s must be a whole number from 1 to %llu", key,
					 (unsigned long long)f->max);
				return false;
			}
			set_value(out, f->bit, (uint64_t)json_integer_value(v));
		} else if (strcmp(key, "content_kinds") == 0) {
			if (!json_is_array(v)) {
				snprintf(err, errlen, "limits.content_kinds must be an array of \"text\" and \"media\"");
				return false;
			}
			size_t i;
			json_t *k;
			json_array_foreach(v, i, k) {
				const char *s = json_is_string(k) ? json_string_value(k) : "";
				if (strcmp(s, "text") == 0)
					out->content_kinds |= POLICY_KIND_TEXT;
				else if (strcmp(s, "media") == 0)
					out->content_kinds |= POLICY_KIND_MEDIA;
				else {
					snprintf(err, errlen,
						 "limits.content_kinds must be an array of \"text\" and \"media\"");
					return false;
				}
			}
			out->set |= POLICY_LIM_CONTENT_KINDS;
		} else if (strcmp(key, "in_addition") == 0) {
			if (!json_is_boolean(v)) {
				snprintf(err, errlen, "limits.in_addition must be true or false");
				return false;
			}
			out->in_addition = json_is_true(v);
		} else if (lenient) {
			*skipped = true;
		} else {
			snprintf(err, errlen,
				 "limits has an unknown member '%.64s' (known: messages_per_minute, "
				 "messages_per_minute_per_user, new_conversations_per_hour, "
				 "new_conversations_per_hour_per_user, consent_requests_per_day, "
				 "consent_requests_per_day_per_user, outbound_messages_per_minute_per_user, "
				 "outbound_new_conversations_per_hour_per_user, max_body_bytes, max_attachment_bytes, "
				 "content_kinds, in_addition)", key);
			return false;
		}
	}
	return true;
}

bool policy_limits_from_json(const json_t *o, struct policy_limits *out, char *err, size_t errlen)
{
	return limits_parse(o, out, err, errlen, false, NULL);
}

json_t *policy_limits_to_json(const struct policy_limits *l)
{
	json_t *o = json_object();
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
		if (l->set & fields[i].bit)
			json_object_set_new(o, fields[i].name, json_integer((json_int_t)get_value(l, fields[i].bit)));
	if (l->set & POLICY_LIM_CONTENT_KINDS) {
		json_t *a = json_array();
		if (l->content_kinds & POLICY_KIND_TEXT)
			json_array_append_new(a, json_string("text"));
		if (l->content_kinds & POLICY_KIND_MEDIA)
			json_array_append_new(a, json_string("media"));
		json_object_set_new(o, "content_kinds", a);
	}
	if (l->in_addition)
		json_object_set_new(o, "in_addition", json_true());
	return o;
}

int policy_builder_rule_row(struct policy_builder *b, const char *id, const char *scope, const char *pattern,
			    const char *mode, const char *limits, const char *expires_ms)
{
	enum policy_scope sc;
	enum policy_mode m = POLICY_MODE_NONE;
	struct policy_limits lim;
	char why[512];
	bool skipped = false;
	if (!policy_scope_parse(scope, &sc) || (*mode && !policy_mode_parse(mode, &m)))
		return -1;
	json_t *lj = json_loads(limits, 0, NULL);
	bool understood = lj && limits_parse(lj, &lim, why, sizeof(why), true, &skipped);
	json_decref(lj);
	/* Limits it cannot read take the rule's mode with them only where
	 * the mode lets more through than its absence would (open): a deny,
	 * closed or allowlist rule keeps stopping what it stops, without its
	 * limits.  Until the forty-fifth session any limit not understood
	 * (a newer build's member during a rolling restart, a value written
	 * by SQL) dropped the whole rule, and an abuser's deny with it. */
	if (!understood) {
		if (m != POLICY_MODE_DENY && m != POLICY_MODE_CLOSED && m != POLICY_MODE_ALLOWLIST)
			return -1;
		memset(&lim, 0, sizeof(lim));
		skipped = true;
	}
	int rc = policy_builder_rule(b, atoll(id), sc, pattern, m, &lim, atoll(expires_ms));
	return rc == 0 && skipped ? 1 : rc;
}
