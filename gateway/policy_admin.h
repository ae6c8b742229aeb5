/* /admin/v1 for the policy: rules, settings, users' opt-in and consent,
 * consent requests, held messages, abuse reports, the audit log, and
 * "why was this message held or denied?".  Every change is recorded in the
 * audit log and NOTIFYs causeway_policy, so every daemon process swaps in
 * a new snapshot (docs/policy.md). */
#ifndef CW_POLICY_ADMIN_H
#define CW_POLICY_ADMIN_H

#include "http.h"

void policy_admin_rules_list(struct cw_req *req, void *ctx);
void policy_admin_rule_create(struct cw_req *req, void *ctx);
void policy_admin_rule_get(struct cw_req *req, void *ctx);
void policy_admin_rule_update(struct cw_req *req, void *ctx);
void policy_admin_rule_delete(struct cw_req *req, void *ctx);
void policy_admin_settings_get(struct cw_req *req, void *ctx);
void policy_admin_settings_update(struct cw_req *req, void *ctx);
void policy_admin_users_list(struct cw_req *req, void *ctx);
void policy_admin_optin_set(struct cw_req *req, void *ctx);
void policy_admin_consent_set(struct cw_req *req, void *ctx);
void policy_admin_consent_requests(struct cw_req *req, void *ctx);
void policy_admin_held_list(struct cw_req *req, void *ctx);
void policy_admin_reports_list(struct cw_req *req, void *ctx);
void policy_admin_report_create(struct cw_req *req, void *ctx);
void policy_admin_report_handle(struct cw_req *req, void *ctx);
void policy_admin_audit_list(struct cw_req *req, void *ctx);
void policy_admin_decision(struct cw_req *req, void *ctx);

#endif
