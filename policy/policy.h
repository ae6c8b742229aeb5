/* The policy engine's interface: decide(snapshot, request) -> decision.
 * Pure: no I/O, no locks, no allocation.  Until the policy issue lands, the
 * snapshot holds no rules and every request is allowed with reason
 * "no_rules"; the pipeline already calls it at the place the design puts it
 * (after resolution, before the durable write) and records non-allow
 * decisions. */
#ifndef CW_POLICY_H
#define CW_POLICY_H

#include <stddef.h>
#include <stdint.h>

enum policy_direction { POLICY_INBOUND, POLICY_OUTBOUND };
enum policy_verdict { POLICY_ALLOW, POLICY_DENY, POLICY_HOLD, POLICY_LIMIT };

struct policy_request {
	enum policy_direction direction;
	const char *event_type;       /* "message", "edit", ... */
	const char *sender_domain;
	const char *sender_uri;
	const char *recipient_domain;
	const char *recipient_uri;
	const char *network;          /* "peer:<name>", "matrix", "xmpp" */
	size_t body_bytes;
	unsigned content_kinds;       /* EVENT_KIND_* */
	int64_t now_ms;
};

struct policy_decision {
	enum policy_verdict verdict;
	const char *reason;           /* a stable reason code */
	int64_t rule_id;              /* 0: no rule decided */
	int64_t retry_after_ms;       /* for POLICY_LIMIT */
};

struct policy_snapshot {
	uint64_t version;
};

void policy_decide(const struct policy_snapshot *s, const struct policy_request *r, struct policy_decision *d);
const char *policy_verdict_name(enum policy_verdict v);

#endif
