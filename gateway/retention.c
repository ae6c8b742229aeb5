/* Retention: old content erased, old idempotency keys and delivery attempts
 * deleted, a bounded batch at a time. */
#include "config.h"
#include "retention.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>

/* Events old enough whose deliveries are all closed (delivered, dropped,
 * expired, or none at all): their content goes, as for a held message no
 * one will receive (policy_live.c).  A message whose content.expires is
 * still to come keeps it: the expiry sweep (policy_live.c) finds it by
 * that content, takes it back from the local networks and erases it then.
 * A reaction keeps its emoji (a few bytes): XEP-0444 sends a user's whole
 * set of reactions to a message, which the XMPP adapter makes from the
 * stored reactions both ways; erased, an old one would drop out of the set
 * (removed from XMPP clients, never deleted at the peer: a review's
 * finding).
 * events_content_kept_idx (schema/025) holds only the events that still
 * have content, in accepted_at order: an erased event leaves it, so a run
 * reads the events due and those kept, never the erased bulk of the
 * table.  The outbox rows of each are found by outbox_event_dest_key
 * (event_id first).  The re-check under the lock skips an event another
 * statement erased meanwhile.  $1: days, $2: batch. */
static const char content_sql[] =
	"WITH x AS (SELECT e.id FROM events e "
	"  WHERE e.content <> '{}'::jsonb AND e.accepted_at < now() - make_interval(days => $1::int) "
	"  AND NOT (e.type = 'message' AND event_expires(e.content) IS NOT NULL) AND e.type <> 'reaction' "
	"  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id "
	"   AND o.state IN ('pending', 'held', 'in_flight', 'failed', 'dead')) "
	"  ORDER BY e.accepted_at LIMIT $2::int FOR UPDATE OF e SKIP LOCKED) "
	"UPDATE events e SET content = '{}'::jsonb FROM x WHERE e.id = x.id AND e.content <> '{}'::jsonb";

/* By idempotency_keys_created_idx.  A retry of the room creation after
 * this makes a new room: a peer's retries come within minutes. */
static const char keys_sql[] =
	"WITH x AS (SELECT scope, key FROM idempotency_keys "
	"  WHERE created_at < now() - make_interval(days => $1::int) ORDER BY created_at LIMIT $2::int "
	"  FOR UPDATE SKIP LOCKED) "
	"DELETE FROM idempotency_keys k USING x WHERE k.scope = x.scope AND k.key = x.key";

/* By delivery_attempts_started_idx (schema/025). */
static const char attempts_sql[] =
	"WITH x AS (SELECT id FROM delivery_attempts "
	"  WHERE started_at < now() - make_interval(days => $1::int) ORDER BY started_at LIMIT $2::int "
	"  FOR UPDATE SKIP LOCKED) "
	"DELETE FROM delivery_attempts d USING x WHERE d.id = x.id";

/* One statement, its own transaction on the idle connection: its locks
 * last as long as it runs.  days 0: kept for ever, nothing run. */
static cw_err run(PGconn *c, const char *sql, long days, long *count, cw_errmsg *e)
{
	*count = 0;
	if (days <= 0)
		return CW_OK;
	char d[24], n[24];
	snprintf(d, sizeof(d), "%ld", days);
	snprintf(n, sizeof(n), "%d", RETENTION_BATCH);
	const char *params[] = { d, n };
	PGresult *r = PQexecParams(c, sql, 2, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_COMMAND_OK, e);
	if (rc)
		return rc;
	*count = atol(PQcmdTuples(r));
	PQclear(r);
	return CW_OK;
}

cw_err retention_sweep(PGconn *c, const struct cw_config *cfg, long counts[3], cw_errmsg *e)
{
	counts[0] = counts[1] = counts[2] = 0;
	cw_err rc = run(c, content_sql, cfg->retention_content_days, &counts[0], e);
	if (!rc)
		rc = run(c, keys_sql, cfg->retention_idempotency_days, &counts[1], e);
	if (!rc)
		rc = run(c, attempts_sql, cfg->retention_attempts_days, &counts[2], e);
	return rc;
}
