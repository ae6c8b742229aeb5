/* /admin/v1 for the policy: rules, settings, users' opt-in and consent,
 * consent requests, held messages, abuse reports, the audit log, and
 * "why was this message held or denied?".  Every change is recorded in the
 * audit log and NOTIFYs causeway_policy, so every daemon process swaps in
 * a new snapshot (docs/policy.md). */
#ifndef CW_POLICY_ADMIN_H
#define CW_POLICY_ADMIN_H

#include "http.h"

#include <jansson.h>
#include <libpq-fe.h>

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
void policy_admin_report_dismiss(struct cw_req *req, void *ctx);

/* An abuse report, however it arrives: the admin API, a bot command, a
 * peer (POST /v1/reports). */
struct policy_report {
	const char *reporter_kind; /* admin, local_user or peer */
	const char *reporter;      /* a user URI (the operator: the admin actor) */
	const char *peer_id;       /* a peer's report: the peer's id; else NULL */
	const char *subject;       /* the user reported: a user URI */
	const char *reason;        /* a reason code */
	const char *evidence;      /* a JSON array of message ids, or NULL: none */
	const char *comment;       /* or NULL */
	const char *actor;         /* the audit log's actor; NULL: user:<reporter> (a local user's own) */
	/* A local user's own report (a bot command): with evidence NULL, the
	 * evidence is the public ids of the last 20 messages the subject sent
	 * her that were delivered to her (what she saw), found at the store;
	 * first (network, kind, native: all three or none) the one her command
	 * points at, by the native id its delivery to her has there (the
	 * Matrix event id of the message her command replies to), if it is
	 * one of those. */
	bool gather;
	const char *first_network, *first_kind, *first_native;
};
struct cw_app;
/* Stores rep on c with its audit record, and sets the automatic limit on
 * a remote subject reported by policy.report_limit_threshold distinct
 * reporters in policy.report_window_seconds (every process told).  Every
 * report path calls it, so the threshold holds however reports arrive.
 * The subject is stored as one address per person (a user of this
 * provider's by her canonical address, a component's contact as the
 * peer's user); CW_EINVAL when it names a contact of a component whose
 * peer is not configured (nothing stored).  answer (NULL: not wanted):
 * {id, subject (as stored), reports_in_window, reporters_in_window,
 * limit_rule_id, evidence (the message ids stored, an array)}.  xid
 * (NULL: not wanted; else POLICY_XID_LEN bytes): the id of c's
 * transaction, for the sync of the limit it made (policy_live_sync). */
cw_err policy_report_store(PGconn *c, struct cw_app *app, const struct policy_report *rep, json_t **answer,
			   char *xid, cw_errmsg *e);
/* Why a report's reason, evidence and comment (members of a JSON body,
 * NULL when absent; the reason is required) are none: NULL when they are
 * one, else the detail of a 400 invalid_body (a constant, or why, len
 * bytes).  The one check of POST /admin/v1/reports and of a peer's POST
 * /v1/reports: a reason code of 1 to 64 of [a-z0-9_] starting with a
 * letter, at most 100 message ids, a comment of at most 8192 bytes that
 * is text shown to the operator (cw_utf8_text_problem: since the
 * forty-eighth session no control but line feed and tab, no
 * bidirectional control, no noncharacter). */
#define REPORT_EVIDENCE_IDS_MAX 100 /* message ids a report cites */
#define REPORT_COMMENT_MAX 8192  /* bytes */
const char *policy_report_fields_problem(const json_t *reason, const json_t *evidence, const json_t *comment,
					 char *why, size_t len);
/* What went with a report, from policy_report_store's answer, for the
 * reporter's answer into out (len bytes): "with 3 message(s) of theirs to
 * you as evidence", or "with no message of theirs: none that reached you
 * is kept here". */
void policy_report_evidence_words(const json_t *answer, char *out, size_t len);
/* Whether a valid consent subject of kind user (a user URI) or domain
 * names one of this provider's own users or domains (app_domain_is_ours).
 * The policy asks a user's consents of remote senders only, so such a
 * consent would match nothing: the admin API and the users' commands (the
 * Matrix bot, the XMPP component) refuse it. */
bool policy_consent_subject_ours(struct cw_app *app, const char *kind, const char *subject);
/* The name of the peer whose domain is domain into name (len bytes; ""
 * when no peer has it), a disabled peer's too (its users are the senders
 * of that domain when it is enabled again).  Matched exactly: a remote
 * sender's domain is always its peer's own (the peer API refuses another,
 * docs/security.md), so a consent of any other domain, or of an address on
 * one, matches no one.  The one look-up of the admin API's consents, the
 * Matrix bot's and the XMPP component's commands; a store error is
 * returned, and each caller then stores nothing (fail closed). */
cw_err policy_peer_of_domain(PGconn *c, const char *domain, char *name, size_t len, cw_errmsg *e);
/* The canonical address of a user of this provider's into out
 * (MIMI_URI_MAX + 1 bytes), or false: uri is a user URI under a domain its
 * users live under (server.domain, the Matrix server name, the XMPP
 * domain: @alice:<server name> and alice@<XMPP domain> are both
 * mimi://<server.domain>/u/alice), made mimi://<server.domain>/u/<local>
 * with the local part folded as the peer API folds a local member's
 * (peer_local_fold).  A component's domain names its contacts, remote
 * users, not these: false, as for any other domain. */
bool policy_local_user_canonical(struct cw_app *app, const char *uri, char *out);
/* Whether a and b name the same user of this provider's: their canonical
 * addresses (policy_local_user_canonical) are one.  A report of herself
 * is refused by it however she is spelt (the Matrix bot, the XMPP
 * component, POST /admin/v1/reports). */
bool policy_same_local_user(struct cw_app *app, const char *a, const char *b);
void policy_admin_audit_list(struct cw_req *req, void *ctx);
void policy_admin_decision(struct cw_req *req, void *ctx);

#endif
