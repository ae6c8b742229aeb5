/* The operator's view of the outbox: rows by state and destination (paged
 * by id), the replay or discard of a dead letter, and the trace of one
 * message (decisions, deliveries, attempts). */
#ifndef CW_OUTBOX_ADMIN_H
#define CW_OUTBOX_ADMIN_H

#include "http.h"

/* SQL condition: the policy record a (audit_log) that decided delivery o
 * (outbox, its recipient t from identities): the recipient's own record;
 * for a peer's one row (no recipient), when it is closed, the record of
 * one of that peer's users (the row is dropped or held when all of them
 * were), or of the peer's domain (the recheck's drop of a row none of
 * whose members is left in the room, policy_live.c recheck_refused; until
 * the thirty-ninth session not matched, and the row shown allowed). */
#define DELIVERY_DECISION                                                                              \
	"(a.subject = t.uri OR (o.target_identity_id IS NULL AND o.state IN ('dropped', 'held', 'expired') " \
	"AND (EXISTS (SELECT 1 FROM identities ai WHERE ai.uri = a.subject AND ai.network = o.destination) " \
	"OR EXISTS (SELECT 1 FROM peers ap WHERE ap.domain = a.subject AND o.destination = 'peer:' || ap.name))))"

/* A delivery's verdict: its last policy decision (DELIVERY_DECISION's
 * action, ACTION), or with none recorded, allow (allow is recorded only
 * when a held message is released) unless the row is held. */
#define DELIVERY_VERDICT(ACTION) \
	"coalesce(split_part(" ACTION ", '.', 2), CASE o.state WHEN 'held' THEN 'hold' ELSE 'allow' END)"

void outbox_admin_list(struct cw_req *req, void *ctx);
void outbox_admin_replay(struct cw_req *req, void *ctx);
void outbox_admin_discard(struct cw_req *req, void *ctx);
void outbox_admin_trace(struct cw_req *req, void *ctx);

#endif
