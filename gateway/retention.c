/* Retention: old content erased, old idempotency keys, delivery attempts
 * and events deleted, a bounded batch at a time. */
#include "config.h"
#include "retention.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>

/* An outbox row still owed to someone (a dead letter may be replayed). */
#define OPEN "AND o.state IN ('pending', 'held', 'in_flight', 'failed', 'dead')"

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
	"  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id " OPEN ") "
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

/* The candidates of one kind of content (c: "<>" or "=" '{}'), oldest
 * first, by that kind's partial index. */
#define ROWS_OF(c) \
	"(SELECT e.id, e.accepted_at FROM events e WHERE e.content " c " '{}'::jsonb " \
	"  AND e.accepted_at < now() - make_interval(days => $1::int) " \
	"  AND NOT (e.type = 'message' AND event_expires(e.content) IS NOT NULL) " \
	"  AND NOT EXISTS (SELECT 1 FROM events t WHERE t.id = e.replaces_id) " \
	"  AND NOT (e.type = 'reaction' AND EXISTS (SELECT 1 FROM events t WHERE t.id = e.in_reply_to_id)) " \
	"  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id " OPEN ") " \
	"  AND NOT EXISTS (SELECT 1 FROM events r JOIN outbox o ON o.event_id = r.id " \
	"   WHERE r.replaces_id = e.id " OPEN ") " \
	"  AND NOT EXISTS (SELECT 1 FROM events r JOIN outbox o ON o.event_id = r.id " \
	"   WHERE r.in_reply_to_id = e.id " OPEN ") " \
	"  ORDER BY e.accepted_at LIMIT $2::int)"

/* Old events whose deliveries are all closed, and whose every referrer's
 * are too (a reply still owed to someone needs its target's native ids to
 * be translated), deleted with their outbox rows (delivery_attempts and
 * event_native_ids follow by their foreign keys' cascade).  The foreign
 * keys from outbox, idempotency_keys and events' own references were
 * dropped (schema/005): the statement deletes and clears them itself.
 * An edit, a delete or a reaction goes only once its target has gone (a
 * later run: the references are cleared then): a message's latest version
 * and whether it was deleted are made from its edits and deletes, and
 * XMPP's whole sets of reactions from the stored reactions (above);
 * deleted before the message, they would change what it shows.  A reply
 * to a message that goes stays, its reference cleared (rf: not a row the
 * statement deletes, which one statement must not change twice).  Nothing
 * derived is lost: consent given by writing first is a row of consents
 * (the writer records it), not read from old events.  A message whose
 * content.expires is still to come is kept for the expiry sweep, which
 * finds it by that content.
 * Found oldest first by two partial indexes, merged: events_erased_idx
 * (schema/029; old enough, an event's content is erased already) and
 * events_content_kept_idx (025), so a run reads the events due and those
 * kept, never the young bulk (the brin index of 004 hands back every old
 * page, and every page once deleted rows' space is reused).  The
 * references by events_replaces_idx, events_in_reply_to_idx and
 * idempotency_keys_event_idx, the outbox rows by outbox_event_dest_key.
 * The candidates are locked by their primary key (SKIP LOCKED): a row
 * another statement holds is left for the next run.
 * $1: days, $2: batch. */
static const char rows_sql[] =
	"WITH c AS (" ROWS_OF("=") " UNION ALL " ROWS_OF("<>") "), "
	"x AS MATERIALIZED (SELECT e.id FROM events e WHERE e.id IN (SELECT id FROM c ORDER BY accepted_at "
	"  LIMIT $2::int) FOR UPDATE OF e SKIP LOCKED), "
	"ob AS (DELETE FROM outbox o USING x WHERE o.event_id = x.id), "
	"rf AS (UPDATE events r SET "
	"  replaces_id = CASE WHEN r.replaces_id IN (SELECT id FROM x) THEN NULL ELSE r.replaces_id END, "
	"  in_reply_to_id = CASE WHEN r.in_reply_to_id IN (SELECT id FROM x) THEN NULL ELSE r.in_reply_to_id END "
	"  FROM (SELECT f.id FROM events f JOIN x ON f.replaces_id = x.id "
	"   UNION SELECT f.id FROM events f JOIN x ON f.in_reply_to_id = x.id) y "
	"  WHERE r.id = y.id AND NOT EXISTS (SELECT 1 FROM x WHERE x.id = y.id)), "
	"ik AS (UPDATE idempotency_keys k SET event_id = NULL FROM x WHERE k.event_id = x.id) "
	"DELETE FROM events e USING x WHERE e.id = x.id";

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

cw_err retention_sweep(PGconn *c, const struct cw_config *cfg, long counts[4], cw_errmsg *e)
{
	counts[0] = counts[1] = counts[2] = counts[3] = 0;
	/* Rows first: the content of what they delete is not erased first. */
	cw_err rc = run(c, rows_sql, cfg->retention_rows_days, &counts[3], e);
	if (!rc)
		rc = run(c, content_sql, cfg->retention_content_days, &counts[0], e);
	if (!rc)
		rc = run(c, keys_sql, cfg->retention_idempotency_days, &counts[1], e);
	if (!rc)
		rc = run(c, attempts_sql, cfg->retention_attempts_days, &counts[2], e);
	return rc;
}
