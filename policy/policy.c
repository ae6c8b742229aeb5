/* The decision function (rules arrive with the policy issue). */
#include "config.h"
#include "policy.h"

void policy_decide(const struct policy_snapshot *s, const struct policy_request *r, struct policy_decision *d)
{
	(void)s;
	(void)r;
	d->verdict = POLICY_ALLOW;
	d->reason = "no_rules";
	d->rule_id = 0;
	d->retry_after_ms = 0;
}

const char *policy_verdict_name(enum policy_verdict v)
{
	switch (v) {
	case POLICY_ALLOW: return "allow";
	case POLICY_DENY: return "deny";
	case POLICY_HOLD: return "hold";
	case POLICY_LIMIT: return "limit";
	}
	return "?";
}
