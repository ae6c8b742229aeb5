/* Rule limits as JSON (rules.limits in PostgreSQL and the admin API):
 * {"messages_per_minute": 60, "messages_per_minute_per_user": 10,
 *  "new_conversations_per_hour": 20, "new_conversations_per_hour_per_user": 4,
 *  "consent_requests_per_day": 50, "consent_requests_per_day_per_user": 5,
 *  "outbound_messages_per_minute_per_user": 30,
 *  "outbound_new_conversations_per_hour_per_user": 10,
 *  "max_body_bytes": 4096, "max_attachment_bytes": 1048576,
 *  "content_kinds": ["text", "media"], "in_addition": true}.  Every member
 * is optional; unknown members are refused (a typo must not silently mean
 * "no limit").  in_addition: policy_limits.in_addition (these limits only
 * tighten those the ordinary rules set). */
#ifndef CW_POLICY_JSON_H
#define CW_POLICY_JSON_H

#include "policy.h"

#include <jansson.h>

/* False with a reason in err when o is not a valid limits object. */
bool policy_limits_from_json(const json_t *o, struct policy_limits *out, char *err, size_t errlen);
/* The limits as a new JSON object (only the members that are set). */
json_t *policy_limits_to_json(const struct policy_limits *l);

/* Adds one row of the rules table, as the snapshot loader reads it (text):
 * id, scope, pattern, mode ("" when the rule only sets limits), limits (JSON
 * text) and expires_ms ("0": never).  policy_builder_rule's return codes;
 * -1 also when a field is not understood (the loader skips such a row),
 * and 1 when the rule was added without some of its limits: members of
 * limits this build does not know (a newer build's) are passed over, the
 * others applied; limits it cannot read at all (a bad value) are dropped,
 * and the rule kept only for a mode that refuses (deny, closed,
 * allowlist), which must not be lost with them (an open rule, or one of
 * limits alone, is then -1). */
int policy_builder_rule_row(struct policy_builder *b, const char *id, const char *scope, const char *pattern,
			    const char *mode, const char *limits, const char *expires_ms);

#endif
