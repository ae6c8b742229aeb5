/* Retention: old content erased, old idempotency keys, delivery attempts,
 * events and audit records deleted, local identities nothing refers to
 * forgotten, a bounded batch at a time. */
#include "config.h"
#include "retention.h"
#include "store.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>

/* An outbox row still owed to someone (a dead letter may be replayed). */
#define OPEN "AND o.state IN ('pending', 'held', 'in_flight', 'failed', 'dead')"

/* What an erased event keeps of its content (e: the event): nothing, but
 * for two kinds.  A message that expires keeps when and from whom (type,
 * sender, content.expires): the expiry sweep (policy_live.c) finds it by
 * that, takes it back from the local networks (a delete event from its
 * sender) and erases the rest.  A reaction keeps its emoji (its first
 * part's type and body): XEP-0444 sends a user's whole set of reactions to
 * a message, which the XMPP adapter makes from the stored reactions both
 * ways (xmpp_in.c, xmpp_out.c read content.parts[0].body); erased, an old
 * one would drop out of the set (removed from XMPP clients, never deleted
 * at the peer: a review's finding).  Until the thirtieth session both kept
 * their whole content until their family was deleted (rows_days, off by
 * default), unknown members included: a far expiry (the year 33658) or a
 * 60 KB unknown member of a reaction kept a peer's content for ever. */
#define KEPT_CONTENT(e) \
	"CASE WHEN " e ".type = 'message' AND event_expires(" e ".content) IS NOT NULL " \
	" THEN jsonb_strip_nulls(jsonb_build_object('type', 'message', 'sender', " e ".content->'sender', " \
	"  'content', jsonb_build_object('expires', " e ".content->'content'->'expires'))) " \
	" WHEN " e ".type = 'reaction' AND jsonb_typeof(" e ".content->'content'->'parts'->0) = 'object' " \
	" THEN jsonb_build_object('type', 'reaction', 'content', jsonb_build_object('parts', jsonb_build_array(" \
	"  jsonb_strip_nulls(jsonb_build_object('type', " e ".content->'content'->'parts'->0->'type', " \
	"  'body', " e ".content->'content'->'parts'->0->'body'))))) " \
	" ELSE '{}'::jsonb END"

/* The events (e) by what is left of their content, each the predicate of
 * a partial index in accepted_at order: erased (events_erased_idx,
 * schema/029), due (still to be erased or trimmed:
 * events_content_due_idx, 048) and trimmed to what KEPT_CONTENT keeps
 * (events.content_trimmed, events_content_trimmed_idx, 048). */
#define ERASED "e.content = '{}'::jsonb"
#define CONTENT_DUE "e.content <> '{}'::jsonb AND NOT e.content_trimmed"
#define TRIMMED "e.content <> '{}'::jsonb AND e.content_trimmed"

/* A bounded scan of events (e) in (accepted_at, id) order, from a cursor
 * kept from run to run (struct retention_cursor): the content erasure's
 * and the events' deletion's.  Each read the events kept (for an open
 * delivery: a pull peer that stopped pulling, a dead letter) from the
 * oldest each run, to find those due behind them, until the fifty-first
 * session (docs/performance.md, "Fifty-first session").  AFTER_CURSOR:
 * after the cursor ($3, $4: the last looked at; -infinity, 0 at first).
 * SCANNED: the order and bound of a scan (a relation s, of columns id
 * and accepted_at) of at most $5 events after the cursor.  SCAN_NEXT:
 * the end of a statement that took its first $2 due (a relation c, the
 * same columns) from s: FROM and the columns of the cursor for the next
 * run: the last of c when it has $2, else the last of s when the scan
 * was full, else none (the next run starts from the oldest again).  An
 * event kept is looked at again each turn round the table, not each
 * run. */
#define AFTER_CURSOR_OF(at, id) \
	"AND " at " >= $3::timestamptz AND (" at ", " id ") > ($3::timestamptz, $4::bigint) "
#define AFTER_CURSOR(e) AFTER_CURSOR_OF(e ".accepted_at", e ".id")
#define SCANNED(e) AFTER_CURSOR(e) "ORDER BY " e ".accepted_at, " e ".id LIMIT $5::int"
#define SCAN_NEXT \
	"k.accepted_at::text, k.id FROM (SELECT 1) one LEFT JOIN LATERAL (" \
	"  SELECT c.accepted_at, c.id FROM c WHERE (SELECT count(*) FROM c) >= $2::int " \
	"  UNION ALL SELECT s.accepted_at, s.id FROM s WHERE (SELECT count(*) FROM c) < $2::int " \
	"  AND (SELECT count(*) FROM s) >= $5::int ORDER BY 1 DESC, 2 DESC LIMIT 1) k ON true"

/* Events old enough whose deliveries are all closed (delivered, dropped,
 * expired, or none at all): their content goes, but for what KEPT_CONTENT
 * keeps, as for a held message no one will receive (policy_live.c).
 * events_content_due_idx (schema/048) holds only the events whose
 * content is still to be erased or trimmed, in accepted_at order: an
 * erased or trimmed (content_trimmed) event leaves it, so a run reads the
 * events due and those kept for an open delivery, never the erased bulk
 * of the table nor the trimmed reactions (until the forty-eighth session
 * it read events_content_kept_idx, schema/025, where a trimmed event
 * stayed: every old reaction, each run).  An event trimmed before 048 is
 * read once more, and marked.
 *
 * A run looks at RETENTION_CONTENT_SCAN of them at most (s), in
 * (accepted_at, id) order after the cursor ($3, $4: where the last run
 * stopped; -infinity, 0 at first), and erases the first $2 of those whose
 * deliveries are closed (x).  Until the fifty-first session each run read
 * from the oldest, every event kept for an open delivery on the way (a
 * pull peer that stopped pulling, a dead letter): 100,000 such events took
 * 0.34-0.63 s a run, once a minute, and some millions more than
 * database.statement_timeout_ms (10 s): the statement failed every run,
 * and no content was erased any more, anyone's (docs/performance.md,
 * "Fifty-first session").  The outbox rows of each are found by
 * outbox_event_dest_key (event_id first).  The re-check under the lock
 * skips an event another statement erased meanwhile.  What an event keeps
 * is computed once (x.kept), from the version locked.  Each event's open
 * row is looked for by a probe of its own (the lateral LIMIT 1), and the
 * closed ones locked by events_pkey (the array): as a join, the planner
 * hashed every open row of the outbox, or read the whole of events.
 * Answers the events erased and the cursor for the next run: the last of
 * the $2 closed ones it took when it found $2, else the last one looked
 * at when the scan was full, else none (the next run starts from the
 * oldest again).  $1: days. */
static const char content_sql[] =
	"WITH s AS MATERIALIZED (SELECT e.id, e.accepted_at, o.open IS NULL AS closed FROM events e "
	"  LEFT JOIN LATERAL (SELECT 1 AS open FROM outbox o WHERE o.event_id = e.id " OPEN " LIMIT 1) o ON true "
	"  WHERE " CONTENT_DUE " AND e.accepted_at < now() - make_interval(days => $1::int) " SCANNED("e") "), "
	"c AS MATERIALIZED (SELECT s.id, s.accepted_at FROM s WHERE s.closed ORDER BY s.accepted_at, s.id LIMIT $2::int), "
	"x AS MATERIALIZED (SELECT e.id, " RETENTION_ATTS("e") ", " KEPT_CONTENT("e") " AS kept FROM events e "
	"  WHERE e.id = ANY (ARRAY(SELECT id FROM c)) AND " CONTENT_DUE " FOR UPDATE OF e SKIP LOCKED), "
	RETENTION_FORGET_FILES("x") ", "
	"u AS (UPDATE events e SET content = x.kept, content_trimmed = x.kept <> '{}'::jsonb "
	"  FROM x WHERE e.id = x.id AND " CONTENT_DUE " RETURNING 1) "
	"SELECT (SELECT count(*) FROM u), " SCAN_NEXT;

/* The quotes kept for a notice owed (outbox.sender_quote, schema/054: a
 * local user's message that waited and was dropped by her recipient's
 * block keeps its first 60 characters until the adapters' look tells her)
 * of events accepted more than content_days ($1) ago, emptied ('': the
 * notice still owed is told without its text), $2 a run, by
 * outbox_dropped_untold_idx (only the rows owed a notice).  By the age of
 * the event, not by content_sql's erasure of it: the drop itself erased
 * the content of a message no one else was to get, which content_sql
 * then never meets.  Until the sixtieth session a quote stayed until the
 * notice was told, and with no process of her network running the look,
 * until rows_days deleted the row (off by default: for ever), 60
 * characters of a message whose content retention had erased. */
static const char quotes_sql[] =
	"UPDATE outbox o SET sender_quote = '' WHERE o.id = ANY (ARRAY(SELECT q.id FROM outbox q "
	"  JOIN events e ON e.id = q.event_id WHERE q.sender_quote <> '' "
	"  AND e.accepted_at < now() - make_interval(days => $1::int) ORDER BY q.id LIMIT $2::int "
	"  FOR UPDATE OF q SKIP LOCKED))";

/* A message whose expiry is still to come rows_days ($1) after it was
 * accepted has it brought forward to now (the database's clock, in ms: a
 * daemon whose clock is behind it takes it back that much later): the
 * expiry sweep takes it back from the local networks within a second and
 * erases it, and the next run deletes it with its family (DUE waits for
 * an expiry to come: the sweep takes a message back by its stored content
 * and native ids).  Until the thirtieth session such a row waited for its
 * expiry, for ever for one in the year 33658.  By events_expiring_idx
 * (schema/049), the messages that expire in accepted_at order, oldest
 * first: a run reads the old ones (due, or expired and about to be
 * erased, which leaves the index), never the young.  Until the
 * forty-eighth session's review it went by events_expires_idx (014, in
 * expiry order), or the primary key, and read every message whose expiry
 * was still to come, young ones included, to find the few old enough:
 * 300,000 young ones took 0.3-1.1 s a run, once a minute.  A full batch
 * brought forward has the sweep run again a second later (st->again):
 * until the fifty-first session only the counts did, and a backlog (rows_days
 * turned on, the content long erased) came forward at 1000 a
 * retention.interval_s (a minute), not a second.  $2: batch. */
static const char expiry_due_sql[] =
	"WITH t AS (SELECT (extract(epoch FROM now()) * 1000)::bigint AS ms), "
	"x AS (SELECT e.id FROM events e WHERE e.type = 'message' AND event_expires(e.content) IS NOT NULL "
	"  AND e.accepted_at < now() - make_interval(days => $1::int) AND event_expires(e.content) > (SELECT ms FROM t) "
	"  ORDER BY e.accepted_at LIMIT $2::int FOR UPDATE OF e SKIP LOCKED) "
	"UPDATE events e SET content = jsonb_set(e.content, '{content,expires}', to_jsonb((SELECT ms FROM t))) FROM x "
	"WHERE e.id = x.id";

/* By idempotency_keys_created_idx.  A retry of the room creation after
 * this makes a new room: a peer's retries come within minutes. */
static const char keys_sql[] =
	"WITH x AS (SELECT scope, key FROM idempotency_keys "
	"  WHERE created_at < now() - make_interval(days => $1::int) ORDER BY created_at LIMIT $2::int "
	"  FOR UPDATE SKIP LOCKED) "
	"DELETE FROM idempotency_keys k USING x WHERE k.scope = x.scope AND k.key = x.key";

/* The delivery attempts started more than $1 days ago, but those of a
 * row still open (OPEN: pending, held, in flight, failed, dead): a dead
 * letter's tries are kept while it is one and, replayed, until it is
 * delivered or dropped.  Until the sixty-third session's review they
 * were kept for the dead and failed rows alone: a replay sets the row
 * pending, and it is looked for at its first claim, which waits while
 * its room backs off (minutes or hours in the homeserver outage that
 * made the dead letter); a retention run meanwhile deleted its tries,
 * and it was sent a second time.  A replay sets its
 * attempts back to 0, and the Matrix adapter looks for its event in the
 * room before sending it again only when it finds a try of it here
 * (mx_deliver.c, batch_info's last column and tried_before): until the
 * sixty-third session they went at 30 days whatever the row's state, and
 * a dead letter replayed after that, whose message had reached the room
 * (its record failed on its last try, or its answer was lost), was sent a
 * second time.  What is kept is bounded by the open rows, which
 * content_sql and rows_sql keep whole (OPEN) too: a row's tries are at
 * most dispatcher.retry_budget and the try its claim ran out on, the same
 * again for each replay that ended dead (a row still being tried after 30
 * days is one whose room backed off that long); once delivered, or
 * discarded or stopped (dropped, expired), they go at the next turn of
 * the scan.  The trace of a dead letter shows
 * every try of it, however old.
 *
 * By delivery_attempts_started_idx (schema/025), oldest first, as a scan
 * of at most $5 (RETENTION_CONTENT_SCAN) attempts from a cursor kept from
 * run to run ($3, $4, as content_sql's; the columns of SCAN_NEXT's
 * relations named alike): the kept tries are the oldest of the index,
 * and a walk from its start read them all each run before the first to
 * delete.  s is not materialized: c pulls it until it has $2 (the
 * common run, the attempts of a day or two: they are read once), and
 * only a run that took fewer reads it again, to its $5th (the cursor
 * when the scan was full; else none, and the next run starts from the
 * oldest again).  Answers the attempts deleted and the cursor for the
 * next run. */
static const char attempts_sql[] =
	"WITH s AS NOT MATERIALIZED (SELECT d.id, d.outbox_id, d.started_at AS accepted_at FROM delivery_attempts d "
	"  WHERE d.started_at < now() - make_interval(days => $1::int) " AFTER_CURSOR_OF("d.started_at", "d.id")
	"  ORDER BY d.started_at, d.id LIMIT $5::int), "
	"c AS MATERIALIZED (SELECT s.id, s.accepted_at FROM s WHERE NOT EXISTS (SELECT 1 FROM outbox o "
	"  WHERE o.id = s.outbox_id " OPEN ") ORDER BY s.accepted_at, s.id LIMIT $2::int), "
	"x AS (SELECT d.id FROM delivery_attempts d WHERE d.id = ANY (ARRAY(SELECT id FROM c)) "
	"  FOR UPDATE OF d SKIP LOCKED), "
	"u AS (DELETE FROM delivery_attempts d USING x WHERE d.id = x.id RETURNING 1) "
	"SELECT (SELECT count(*) FROM u), k.accepted_at::text, k.id FROM (SELECT 1) one LEFT JOIN LATERAL ("
	"  (SELECT c.accepted_at, c.id FROM c WHERE (SELECT count(*) FROM c) >= $2::int ORDER BY 1 DESC, 2 DESC LIMIT 1) "
	"  UNION ALL (SELECT s.accepted_at, s.id FROM s WHERE (SELECT count(*) FROM c) < $2::int "
	"  OFFSET $5::int - 1 LIMIT 1)) k ON true";

/* By audit_log_at_idx (schema/001), oldest first.  No decision is made
 * from an old record: the policy decides by rules, opt-ins, consents,
 * blocks and reports (their own tables; the report limit counts reports).
 * The one reader that acts on records is the XMPP roster sync
 * (adapters/xmpp/xmpp_cmd.c), which sends the unsubscribes of the
 * operator's consent changes (consent.set) and the withdrawals of
 * consent requests the policy expired (consent.expire) past its
 * component's cursor (xmpp_roster_sync): a change made while the
 * component's stream was down is sent when it is back, so a record some
 * component has not yet passed is kept until it has (the probe: a row
 * per component).  The views (the audit list, a message's "why", the
 * hour's statistics) show what is left.  $1: days, $2: batch. */
static const char audit_sql[] =
	"WITH x AS (SELECT a.id FROM audit_log a "
	"  WHERE a.at < now() - make_interval(days => $1::int) "
	"  AND NOT (a.action IN ('consent.set', 'consent.expire') "
	"   AND EXISTS (SELECT 1 FROM xmpp_roster_sync s WHERE s.audit_id < a.id)) "
	"  ORDER BY a.at LIMIT $2::int FOR UPDATE SKIP LOCKED) "
	"DELETE FROM audit_log d USING x WHERE d.id = x.id";

/* The records of files re-hosted on the homeserver (media_rehosted) made
 * more than $1 days ago, whatever message named them: the rows
 * RETENTION_FORGET_FILES did not find.  A record goes with the content of
 * the messages naming its URL, but one written after that content went
 * is named by none, and nothing found it again: the Matrix adapter's
 * media worker (mx_media.c) fetches and uploads a file while its message
 * waits, and writes the record once done; a message that expired, or
 * that the policy dropped, meanwhile (its content and records gone),
 * left its record for ever (the peer's URL of the file, its digest, size,
 * for whom; until the forty-eighth session's review), as did the records
 * of messages whose content went before the forty-fifth session.  Every
 * message that named a record's file was accepted before the record was
 * made, so its content is gone by this age unless a delivery of it is
 * still open (then a try fetches the file again: a cache's miss).  $1:
 * media_days (below).  By media_rehosted_created_idx (schema/048), oldest
 * first; by ctid, as fetched_for may be NULL (schema/027). */
static const char media_sql[] =
	"DELETE FROM media_rehosted WHERE ctid = ANY (ARRAY(SELECT r.ctid FROM media_rehosted r "
	"  WHERE r.created_at < now() - make_interval(days => $1::int) ORDER BY r.created_at LIMIT $2::int "
	"  FOR UPDATE SKIP LOCKED))";

/* Reports the operator handled (or dismissed) more than $1 days ago, and
 * more than $3 seconds ago (policy.report_window_seconds): a report made
 * within the window counts toward the automatic limit (report_sql,
 * policy_admin.c), and one handled before that was made before it.  An
 * open report is never deleted, however old: it waits for the operator.
 * Until the forty-ninth session every report was kept for ever (a peer's
 * or a user's, its comment of up to 8 KB among them): the handled ones
 * of years.  The audit records of a report (report.create, its handling)
 * are the audit log's, and go at audit_days.  By reports_handled_idx
 * (schema/051), oldest first.  $1: days, $2: batch, $3: the window. */
static const char reports_sql[] =
	"WITH x AS (SELECT r.id FROM reports r WHERE r.handled_at IS NOT NULL "
	"  AND r.handled_at < now() - greatest(make_interval(days => $1::int), make_interval(secs => $3::bigint)) "
	"  ORDER BY r.handled_at LIMIT $2::int FOR UPDATE SKIP LOCKED) "
	"DELETE FROM reports d USING x WHERE d.id = x.id";

/* When a consent request q stopped being pending: answered (accepted,
 * blocked) or expired (the policy's sweep or a withdrawal by a rule set
 * decided_at then, since the forty-ninth session; before, an expired one
 * had only its expires_at, which a withdrawal comes before).  The
 * expression of consent_requests_closed_idx (schema/051). */
#define REQUEST_CLOSED(q) "coalesce(" q ".decided_at, " q ".expires_at)"

/* The consent requests answered or expired more than $1 days ago (at
 * least RETENTION_REQUEST_MIN_DAYS: the caller's) and longer ago than the
 * request window ($3 seconds): what reads a request that no longer
 * stands reads a young one: one per pair and window
 * (CONSENT_REQUEST_STANDS_SQL, CONSENT_REQUEST_ANSWERED_SQL, store.h),
 * the user's daily bound (her requests of the last day, peer_api.c), the
 * Matrix bot's notice of an expiry (its look back: six days).  A
 * request's created_at comes before its closing: older still.  Kept
 * besides while an XMPP component has yet to withdraw it from the user's
 * roster (xmpp_cmd.c, xmpp_roster_sync, past the slowest component's
 * cursor: an expiry's consent.expire record names the request, an
 * operator's accept's consent.set record names her and has the time the
 * accept wrote as its decided_at).  A pending request is never
 * deleted.  Until the forty-ninth session every request was kept for
 * ever (who asked whom, and when), but those of a local identity
 * forgotten.  By consent_requests_closed_idx (schema/051), oldest first.
 * $1: days, $2: batch, $3: policy.consent_request_window_seconds. */
static const char requests_sql[] =
	"WITH ba AS MATERIALIZED (SELECT a.action, a.at, a.details->>'request' AS request, a.details->>'user' AS usr "
	"  FROM audit_log a "
	"  WHERE a.action IN ('consent.set', 'consent.expire') "
	"  AND a.id > (SELECT min(s.audit_id) FROM xmpp_roster_sync s)), "
	"x AS (SELECT q.id FROM consent_requests q WHERE q.state <> 'pending' "
	"  AND " REQUEST_CLOSED("q") " < now() "
	"   - greatest(make_interval(days => $1::int), make_interval(secs => $3::bigint)) "
	"  AND NOT EXISTS (SELECT 1 FROM ba WHERE ba.action = 'consent.expire' AND ba.request = q.id::text) "
	"  AND NOT (q.state = 'accepted' AND EXISTS (SELECT 1 FROM ba JOIN identities l ON l.uri = ba.usr "
	"   WHERE ba.action = 'consent.set' AND ba.at = q.decided_at AND l.id = q.local_identity_id)) "
	"  ORDER BY " REQUEST_CLOSED("q") " LIMIT $2::int FOR UPDATE OF q SKIP LOCKED) "
	"DELETE FROM consent_requests d USING x WHERE d.id = x.id";

/* Old enough for rows_days ($1). */
#define OLD_ROW(at) at " < now() - make_interval(days => $1::int)"

/* The members of a family, one step down from the events of f (a
 * recursive query's own name: f(id, at)): the edits and deletes that
 * name one (replaces_id) and its reactions (in_reply_to_id, reaction).
 * Down again from those: a reaction's removals. */
#define MEMBERS_OF(f) \
	"SELECT m.id, m.at FROM " f " JOIN LATERAL (SELECT r.id, r.accepted_at AS at FROM events r " \
	"  WHERE r.replaces_id = " f ".id UNION ALL SELECT r.id, r.accepted_at FROM events r " \
	"  WHERE r.in_reply_to_id = " f ".id AND r.type = 'reaction') m ON true"

/* Whether e (a family's first event: no event it replaces or reacts to
 * is there) may go with its family: itself and every member old enough,
 * none with an open outbox row, nor any reply to one of them (a reply
 * still owed to someone needs its target's native ids to be translated).
 * NOT_HELD: what else keeps a member (SQL starting with OR; "" for none). */
#define DUE(NOT_HELD) \
	OLD_ROW("e.accepted_at") " AND NOT (e.type = 'message' AND event_expires(e.content) IS NOT NULL) " \
	"  AND NOT EXISTS (SELECT 1 FROM events t WHERE t.id = e.replaces_id) " \
	"  AND NOT (e.type = 'reaction' AND EXISTS (SELECT 1 FROM events t WHERE t.id = e.in_reply_to_id)) " \
	"  AND NOT EXISTS (WITH RECURSIVE f(id, at) AS (SELECT e.id, e.accepted_at UNION " MEMBERS_OF("f") ") " \
	"   SELECT 1 FROM f WHERE NOT " OLD_ROW("f.at") NOT_HELD \
	"   OR EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = f.id " OPEN ") " \
	"   OR EXISTS (SELECT 1 FROM events r JOIN outbox o ON o.event_id = r.id WHERE r.in_reply_to_id = f.id " OPEN "))"

/* The old events of one kind of content (k: ERASED, CONTENT_DUE or
 * TRIMMED) a run looks at (SCANNED), by that kind's partial index. */
#define ROWS_SCAN(k) \
	"(SELECT e.id, e.accepted_at FROM events e WHERE " k " AND " OLD_ROW("e.accepted_at") " " SCANNED("e") ")"

/* The families due among those (up to the last of the scan, w) of one
 * kind of content of their first event, oldest first, by the same
 * index. */
#define ROWS_OF(k) \
	"(SELECT e.id, e.accepted_at FROM events e WHERE " k " AND " DUE("") " " AFTER_CURSOR("e") \
	"  AND e.accepted_at <= (SELECT at FROM w) AND (e.accepted_at, e.id) <= (SELECT at, id FROM w) " \
	"  ORDER BY e.accepted_at, e.id LIMIT $2::int)"

/* Old events whose deliveries are all closed go as families: a message
 * (or any event that names none it depends on) with its edits and
 * deletes, its reactions and their removals, deleted in one statement,
 * once every one of them is due (DUE): a message's latest version and
 * whether it was deleted are made from its edits and deletes, and XMPP's
 * reactions are whole sets named by the message's id (XEP-0444), made
 * from the stored reactions (above): a message deleted before its family
 * was done would have a reaction removed later, or a removal still owed
 * (a dead letter replayed), never reach XMPP, though its row is marked
 * delivered (before the twenty-first session it was: a review's finding).
 * With the events go their outbox rows and those rows' delivery_attempts
 * (da, probing delivery_attempts_key with the array of the rows deleted,
 * the form events_pkey is probed in below, whatever the planner guesses
 * of ob's rows; event_native_ids follow by their foreign key's cascade).
 * The foreign keys from outbox, idempotency_keys and events' own
 * references were dropped (schema/005), and delivery_attempts' to outbox
 * (058: its check, a FOR KEY SHARE of the outbox row for every try the
 * dispatcher records, was a quarter of the record's shared blocks,
 * docs/performance.md; until the sixty-fourth session its ON DELETE
 * CASCADE deleted the tries here): the statement deletes and clears them
 * itself.  No try is recorded for a row of a family deleted: the
 * dispatcher records only a row in flight under its claim, which keeps
 * the family (OPEN), and its commit, the row's new state with its try,
 * is seen whole by the snapshot that finds the row closed.  A try left
 * naming a row that is gone would be read by no one (the trace reads a
 * row's tries by its id, which is never given again) and attempts_sql
 * deletes it when it is old, its row not open (unless
 * retention.attempts_days is 0: kept for ever).  A
 * reply to a message that goes stays, its reference cleared (rf: not a
 * row the statement deletes, which one statement must not change twice).
 * Nothing derived is lost: consent given by writing first is a row of
 * consents (the writer records it), not read from old events.  A message
 * whose content.expires is still to come is kept for the expiry sweep,
 * which finds it by that content.
 *
 * Two statements in one transaction, the families first locked, then
 * checked again and deleted.  A writer storing an event that names one
 * (a reply, an edit, a reaction) locks it until its commit (FOR KEY
 * SHARE, adapters/peer/peer_api.c), which this lock (FOR UPDATE SKIP
 * LOCKED) passes over; a writer that comes later waits for this
 * transaction and finds the event gone.  But one that committed between
 * the first statement's snapshot and its lock is not in that snapshot,
 * and its event would be left naming a deleted one: the second
 * statement, with a snapshot taken after the locks, sees it, and keeps
 * the family (the new event's delivery is open).  It deletes a family
 * only if the first locked every member of it (a member another
 * statement holds, or one written since, keeps it for the next run).
 *
 * Found oldest first by three partial indexes, merged: events_erased_idx
 * (schema/029; old enough, an event's content is erased already),
 * events_content_due_idx and events_content_trimmed_idx (048; before,
 * the two were events_content_kept_idx, 025), so a run reads the events
 * due and those kept, never the young bulk (the brin index of 004 hands back every old
 * page, and every page once deleted rows' space is reused).  The members
 * and replies by events_replaces_idx and events_in_reply_to_idx, the
 * idempotency keys by idempotency_keys_event_idx, the outbox rows by
 * outbox_event_dest_key, the families' events locked by events_pkey (an
 * array of their ids: until the fifty-eighth session e.id IN (SELECT id
 * FROM fam), which the planner, guessing a recursive query's rows by the
 * thousand, hashed against the whole of a small events table, read
 * whenever a family was due: 3,002 rows to lock one family of one event
 * in test_a_run_reads_no_young_message_that_expires; at 40,000 events
 * it probed the key).  At most $2 families a
 * run, among at most $5 old events looked at (s, SCANNED: the three
 * indexes merged, from the cursor), the families due looked for up to
 * the last of those (w), so that no index is read further: until the
 * fifty-first session each run read from the oldest, every old event
 * kept (an open row of it, of a member or of a reply; an expiry to come;
 * an edit or a reaction whose target is there) checked on the way, its
 * family walked: 100,000 kept
 * took 0.7-1.3 s a run (docs/performance.md, "Fifty-first session"), a
 * million more than database.statement_timeout_ms, and then no row was
 * deleted any more.
 * rows_lock_sql: $1: days, $2: batch, $3 to $5 (SCANNED); the ids
 * locked, as an array, and the cursor for the next run (SCAN_NEXT).
 * rows_sql: $1: days, $2: those ids. */
static const char rows_lock_sql[] =
	"WITH RECURSIVE s AS MATERIALIZED (SELECT id, accepted_at FROM (" ROWS_SCAN(ERASED) " UNION ALL "
	ROWS_SCAN(CONTENT_DUE) " UNION ALL " ROWS_SCAN(TRIMMED) ") a ORDER BY accepted_at, id LIMIT $5::int), "
	"w AS MATERIALIZED (SELECT coalesce(l.accepted_at, 'infinity') AS at, coalesce(l.id, 0) AS id "
	"  FROM (SELECT 1) one LEFT JOIN (SELECT s.accepted_at, s.id FROM s WHERE (SELECT count(*) FROM s) >= $5::int "
	"  ORDER BY 1 DESC, 2 DESC LIMIT 1) l ON true), "
	"c AS MATERIALIZED (SELECT id, accepted_at FROM (" ROWS_OF(ERASED) " UNION ALL " ROWS_OF(CONTENT_DUE)
	" UNION ALL " ROWS_OF(TRIMMED) ") a ORDER BY accepted_at, id LIMIT $2::int), "
	"fam(id, at) AS (SELECT id, accepted_at FROM c UNION " MEMBERS_OF("fam") ") "
	"SELECT (SELECT array_agg(l.id)::text FROM (SELECT e.id FROM events e "
	"  WHERE e.id = ANY (ARRAY(SELECT id FROM fam)) FOR UPDATE OF e SKIP LOCKED) l), " SCAN_NEXT;
static const char rows_sql[] =
	"WITH RECURSIVE fam(id, at) AS (SELECT e.id, e.accepted_at FROM events e WHERE e.id = ANY($2::bigint[]) "
	"  AND " DUE(" OR f.id <> ALL($2::bigint[])") " UNION " MEMBERS_OF("fam") "), "
	"x AS MATERIALIZED (SELECT l.id FROM unnest($2::bigint[]) AS l(id) WHERE l.id IN (SELECT id FROM fam)), "
	"ob AS (DELETE FROM outbox o USING x WHERE o.event_id = x.id RETURNING o.id), "
	"da AS (DELETE FROM delivery_attempts d WHERE d.outbox_id = ANY (ARRAY(SELECT id FROM ob))), "
	"rf AS (UPDATE events r SET "
	"  replaces_id = CASE WHEN r.replaces_id IN (SELECT id FROM x) THEN NULL ELSE r.replaces_id END, "
	"  in_reply_to_id = CASE WHEN r.in_reply_to_id IN (SELECT id FROM x) THEN NULL ELSE r.in_reply_to_id END "
	"  FROM (SELECT f.id FROM events f JOIN x ON f.replaces_id = x.id "
	"   UNION SELECT f.id FROM events f JOIN x ON f.in_reply_to_id = x.id) y "
	"  WHERE r.id = y.id AND NOT EXISTS (SELECT 1 FROM x WHERE x.id = y.id)), "
	"ik AS (UPDATE idempotency_keys k SET event_id = NULL FROM x WHERE k.event_id = x.id), "
	RETENTION_FORGET_FILES("(SELECT " RETENTION_ATTS("f") " FROM events f JOIN x ON f.id = x.id)") " "
	"DELETE FROM events e USING x WHERE e.id = x.id";

/* In one transaction on the idle connection: lock_sql (nl parameters
 * lp), whose answer's first column is the ids it locked (an array, NULL
 * for none), then, when it locked any, del_sql with the nd parameters dp,
 * dp[ids_at] set to those ids.  count: the rows del_sql deleted; *answer:
 * the lock's answer when the transaction committed (the caller's to
 * clear), else NULL. */
static cw_err lock_then_delete(PGconn *c, const char *lock_sql, int nl, const char *const *lp, const char *del_sql,
			       int nd, const char **dp, int ids_at, long *count, PGresult **answer, cw_errmsg *e)
{
	*count = 0;
	*answer = NULL;
	cw_err rc = store_exec(c, "BEGIN", e);
	if (rc)
		return rc;
	PGresult *r = PQexecParams(c, lock_sql, nl, NULL, lp, NULL, NULL, 0);
	rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		r = NULL; /* cleared */
	else if (!PQgetisnull(r, 0, 0)) {
		dp[ids_at] = PQgetvalue(r, 0, 0);
		PGresult *x = PQexecParams(c, del_sql, nd, NULL, dp, NULL, NULL, 0);
		rc = store_check(c, x, PGRES_COMMAND_OK, e);
		if (!rc) {
			*count = atol(PQcmdTuples(x));
			PQclear(x);
		}
	}
	rc = store_end(c, rc, e);
	if (rc) {
		*count = 0;
		PQclear(r);
	} else {
		*answer = r;
	}
	return rc;
}

/* The parameters of a statement that scans events from a cursor
 * (SCANNED): $1 days, $2 the batch, $3 and $4 the cursor, $5 the scan. */
struct scan_params {
	char days[24], batch[24], id[24], scan[24];
	const char *p[5];
};

static const char *const *scan_params(struct scan_params *sp, long days, const struct retention_cursor *cur)
{
	snprintf(sp->days, sizeof(sp->days), "%ld", days);
	snprintf(sp->batch, sizeof(sp->batch), "%d", RETENTION_BATCH);
	snprintf(sp->id, sizeof(sp->id), "%lld", (long long)cur->id);
	snprintf(sp->scan, sizeof(sp->scan), "%d", RETENTION_CONTENT_SCAN);
	sp->p[0] = sp->days;
	sp->p[1] = sp->batch;
	sp->p[2] = cur->at[0] ? cur->at : "-infinity";
	sp->p[3] = sp->id;
	sp->p[4] = sp->scan;
	return sp->p;
}

/* The cursor for the next run from r's answer (SCAN_NEXT: its columns 1
 * and 2; NULL: from the oldest again). */
static void scan_next(struct retention_cursor *cur, const PGresult *r)
{
	bool at_end = PQgetisnull(r, 0, 1);
	snprintf(cur->at, sizeof(cur->at), "%s", at_end ? "" : PQgetvalue(r, 0, 1));
	cur->id = at_end ? 0 : atoll(PQgetvalue(r, 0, 2));
}

/* rows_lock_sql, then rows_sql (above), from cur, which it moves on.
 * count: the events deleted. */
static cw_err run_rows(PGconn *c, long days, struct retention_cursor *cur, long *count, cw_errmsg *e)
{
	*count = 0;
	if (days <= 0)
		return CW_OK;
	struct scan_params sp;
	const char *const *params = scan_params(&sp, days, cur);
	const char *dp[] = { sp.days, NULL };
	PGresult *r;
	cw_err rc = lock_then_delete(c, rows_lock_sql, 5, params, rows_sql, 2, dp, 1, count, &r, e);
	if (!rc) {
		scan_next(cur, r);
		PQclear(r);
	}
	return rc;
}

/* One statement, its own transaction on the idle connection: its locks
 * last as long as it runs.  days 0: kept for ever, nothing run.  win:
 * the statement's $3 (a policy window in seconds), or -1 for none. */
static cw_err run(PGconn *c, const char *sql, long days, int64_t win, long *count, cw_errmsg *e)
{
	*count = 0;
	if (days <= 0)
		return CW_OK;
	char d[24], n[24], w[24];
	snprintf(d, sizeof(d), "%ld", days);
	snprintf(n, sizeof(n), "%d", RETENTION_BATCH);
	snprintf(w, sizeof(w), "%lld", (long long)win);
	const char *params[] = { d, n, w };
	PGresult *r = PQexecParams(c, sql, win >= 0 ? 3 : 2, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_COMMAND_OK, e);
	if (rc)
		return rc;
	*count = atol(PQcmdTuples(r));
	PQclear(r);
	return CW_OK;
}

/* A scan's statement sql (content_sql, attempts_sql: their answer the
 * count and SCAN_NEXT's cursor), its own transaction, from cur, which it
 * moves on (back to the oldest when the scan came to the end).  A scan
 * that stopped short of the end goes on at the next run, at
 * retention.interval_s as ever (a full batch: a second later): a backlog
 * kept for ever (a pull peer gone, dead letters) would otherwise keep
 * every kind running each second. */
static cw_err run_scan(PGconn *c, const char *sql, long days, struct retention_cursor *cur, long *count,
		       cw_errmsg *e)
{
	*count = 0;
	if (days <= 0)
		return CW_OK;
	struct scan_params sp;
	PGresult *r = PQexecParams(c, sql, 5, NULL, scan_params(&sp, days, cur), NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	*count = atol(PQgetvalue(r, 0, 0));
	scan_next(cur, r);
	PQclear(r);
	return CW_OK;
}

/* content_sql (run_scan), then quotes_sql in a transaction of its own.
 * count: the events whose content went (not the quotes emptied). */
static cw_err run_content(PGconn *c, long days, struct retention_cursor *cur, long *count, cw_errmsg *e)
{
	cw_err rc = run_scan(c, content_sql, days, cur, count, e);
	long quotes;
	return rc || days <= 0 ? rc : run(c, quotes_sql, days, -1, &quotes, e);
}

/* A local identity (i) nothing refers to, made more than $days days ago
 * (and so, for a name a peer made up, never a user of this provider as
 * far as Causeway knows): a peer makes one for any name of this provider
 * it names in a consent update or a block (POST /v1/consent/updates,
 * /v1/blocks: either way, the row stays when the block is lifted) or a
 * consent request held for it (POST /v1/consent/requests under
 * policy.optin_default), at policy.peer_updates_per_minute, and until
 * the forty-sixth session nothing removed one: a peer could grow the
 * table for months.  What keeps a row is everything a user of this
 * provider has or does: a native id (identity_bindings: she wrote, or
 * talked to the bot), a room's membership (room_members: also every room
 * a peer made with the name, and so every event she sent or a delivery
 * to her, which need one), a room binding, an opt-in, a consent, a
 * report about her, a block either way (a peer's user's block of the
 * name stands until he lifts it), a Matrix portal's or management room's
 * row, her being discoverable or having a name or an avatar, and a
 * consent request but one expired unanswered longer ago than the request
 * window ($window seconds, a day at least) and the day of the user's
 * daily bound: such a request decides nothing more (it no longer stands,
 * CONSENT_REQUEST_STANDS_SQL, and counts for no bound), and goes with
 * her (its foreign key's cascade), unless an XMPP component has not yet
 * withdrawn it from her roster (its consent.expire record past the
 * slowest component's cursor: bh, behind).  A forgotten name is as one
 * never seen: a peer naming it again makes a row again, and every answer
 * is the same as before, as for any name (interop privacy rule).  The
 * events a local user sent and the deliveries to her need her membership
 * of their room, so they keep her through room_members (events and
 * outbox have no foreign key, schema/005). */
#define IDENTITY_UNUSED(i, days, win) \
	i ".is_local AND " i ".created_at < now() - make_interval(days => " days "::int) AND NOT " i ".discoverable " \
	" AND " i ".display_name IS NULL AND " i ".avatar IS NULL " \
	" AND NOT EXISTS (SELECT 1 FROM identity_bindings x WHERE x.identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM room_members x WHERE x.identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM room_bindings x WHERE x.local_identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM room_bindings x WHERE x.remote_identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM user_optin x WHERE x.identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM consents x WHERE x.local_identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM reports x WHERE x.subject_identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM blocks x WHERE x.blocker_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM blocks x WHERE x.blocked_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM matrix_portal_members x WHERE x.identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM matrix_mgmt_rooms x WHERE x.identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM consent_requests x WHERE x.remote_identity_id = " i ".id) " \
	" AND NOT EXISTS (SELECT 1 FROM consent_requests x WHERE x.local_identity_id = " i ".id " \
	"  AND NOT (x.state = 'expired' AND x.created_at < now() - make_interval(secs => greatest(" win "::bigint, 86400)))) " \
	" AND NOT EXISTS (SELECT 1 FROM bh WHERE bh.subject = " i ".uri)"

/* The users whose consent.expire records an XMPP component has not yet
 * followed into their rosters (xmpp_cmd.c, xmpp_roster_sync: it reads
 * the request by its id), read once a statement. */
#define IDENTITY_BEHIND \
	"bh AS MATERIALIZED (SELECT DISTINCT a.subject FROM audit_log a WHERE a.action = 'consent.expire' " \
	"  AND a.id > (SELECT min(s.audit_id) FROM xmpp_roster_sync s))"

/* The local identities after the cursor $1, at most $2 of them in id
 * order (identities_local_idx, schema/045), and of those the first $3
 * unused ones, locked (SKIP LOCKED: one a writer holds, naming it, is in
 * use).  Answers the ids locked (an array), the cursor for the next run
 * (the last unused one looked at when $3 were found, else the last
 * looked at, or 0 at the end: the next run starts again from the first)
 * and whether the scan found more.  Every row is looked at again each
 * turn round the table, since a row in use may be free the next time (a
 * block lifted).  $4: days, $5: the request window in seconds. */
static const char identities_lock_sql[] =
	"WITH " IDENTITY_BEHIND ", "
	"s AS MATERIALIZED (SELECT i.id, i.uri, i.is_local, i.created_at, i.discoverable, i.display_name, i.avatar "
	"  FROM identities i WHERE i.is_local AND i.id > $1::bigint ORDER BY i.id LIMIT $2::int), "
	"c AS MATERIALIZED (SELECT i.id FROM s i WHERE " IDENTITY_UNUSED("i", "$4", "$5") " ORDER BY i.id LIMIT $3::int), "
	"l AS (SELECT i.id FROM identities i WHERE i.id IN (SELECT id FROM c) FOR UPDATE OF i SKIP LOCKED) "
	"SELECT (SELECT array_agg(id)::text FROM l), "
	"  CASE WHEN (SELECT count(*) FROM c) >= $3::int THEN (SELECT max(id) FROM c) "
	"  WHEN (SELECT count(*) FROM s) >= $2::int THEN (SELECT max(id) FROM s) ELSE 0 END";
/* The same rows, looked at again with a snapshot taken after the locks:
 * a reference committed between the first statement's snapshot and its
 * lock keeps the row; a writer that comes later and names one (a
 * foreign key's share lock) waits for this transaction, and fails on a
 * row it deleted: a 409 (store.c runs again only a lost deadlock or
 * serialization), so the writers that name a local user lock her row
 * first, FOR KEY SHARE, and make it anew when the sweep took it
 * (identity_id, the XMPP component's statements, the Matrix bot's
 * local_identity).
 * $1: the ids, $2: days, $3: the request window. */
static const char identities_sql[] =
	"WITH " IDENTITY_BEHIND " "
	"DELETE FROM identities i WHERE i.id = ANY($1::bigint[]) AND " IDENTITY_UNUSED("i", "$2", "$3");

/* identities_lock_sql, then identities_sql (lock_then_delete).  count:
 * the rows deleted; *cursor moved on. */
static cw_err run_identities(PGconn *c, int64_t *cursor, int64_t window_s, long *count, cw_errmsg *e)
{
	char cur[24], scan[24], n[24], days[24], win[24];
	snprintf(cur, sizeof(cur), "%lld", (long long)*cursor);
	snprintf(scan, sizeof(scan), "%d", RETENTION_IDENTITY_SCAN);
	snprintf(n, sizeof(n), "%d", RETENTION_BATCH);
	snprintf(days, sizeof(days), "%d", RETENTION_IDENTITY_DAYS);
	snprintf(win, sizeof(win), "%lld", (long long)window_s);
	const char *params[] = { cur, scan, n, days, win }, *dp[] = { NULL, days, win };
	PGresult *r;
	cw_err rc = lock_then_delete(c, identities_lock_sql, 5, params, identities_sql, 3, dp, 0, count, &r, e);
	if (!rc) {
		*cursor = atoll(PQgetvalue(r, 0, 1));
		PQclear(r);
	}
	return rc;
}

const char *const retention_kind_names[RETENTION_KINDS] = { "content", "idempotency_keys", "delivery_attempts",
								"events", "audit", "identities", "media", "reports",
								"consent_requests" };

/* The age of the records of re-hosted files media_sql deletes: the
 * sooner of content_days and rows_days (a message's content goes at the
 * one or with its row at the other), 0 (kept) when both are 0. */
static long media_days(const struct cw_config *cfg)
{
	long c = cfg->retention_content_days, r = cfg->retention_rows_days;
	return c > 0 && (r <= 0 || c <= r) ? c : r;
}

cw_err retention_sweep(PGconn *c, const struct cw_config *cfg, struct retention_state *st,
		       long counts[RETENTION_KINDS], bool failed[RETENTION_KINDS], cw_errmsg *e)
{
	/* Each kind on its own: until the thirty-first session they ran as one
	 * chain that stopped at the first failure, and a kind that kept
	 * failing (the events' deletion, say) kept every later one from
	 * running, the erasure of old content among them.  Rows first: the
	 * content of what they delete is not erased first. */
	static const int order[RETENTION_KINDS] = { 3, 0, 1, 2, 4, 5, 6, 7, 8 };
	long req_days = cfg->retention_consent_requests_days;
	if (req_days > 0 && req_days < RETENTION_REQUEST_MIN_DAYS)
		req_days = RETENTION_REQUEST_MIN_DAYS;
	const struct {
		const char *sql;
		long days;
		int64_t win;
	} kinds[RETENTION_KINDS] = { { NULL, cfg->retention_content_days, -1 },
				     { keys_sql, cfg->retention_idempotency_days, -1 },
				     { NULL, cfg->retention_attempts_days, -1 },
				     { NULL, cfg->retention_rows_days, -1 },
				     { audit_sql, cfg->retention_audit_days, -1 },
				     { NULL, RETENTION_IDENTITY_DAYS, -1 },
				     { media_sql, media_days(cfg), -1 },
				     { reports_sql, cfg->retention_reports_days, st->report_window_s },
				     { requests_sql, req_days, st->consent_window_s } };
	cw_err first = CW_OK;
	st->again = false;
	for (int k = 0; k < RETENTION_KINDS; k++) {
		int i = order[k];
		cw_errmsg ke;
		long brought;
		cw_err rc;
		counts[i] = 0;
		if (kinds[i].sql)
			rc = run(c, kinds[i].sql, kinds[i].days, kinds[i].win, &counts[i], &ke);
		else if (i == 0)
			rc = run_content(c, kinds[i].days, &st->content_cursor, &counts[i], &ke);
		else if (i == 2)
			rc = run_scan(c, attempts_sql, kinds[i].days, &st->attempts_cursor, &counts[i], &ke);
		else if (i == 5)
			rc = run_identities(c, &st->identity_cursor, st->consent_window_s, &counts[i], &ke);
		else if (!(rc = run(c, expiry_due_sql, kinds[i].days, -1, &brought, &ke))) {
			st->again = st->again || brought >= RETENTION_BATCH;
			rc = run_rows(c, kinds[i].days, &st->rows_cursor, &counts[i], &ke);
		}
		failed[i] = rc != CW_OK;
		if (rc) {
			LOG_KV(CW_LOG_WARN, "retention sweep failed", "kind", retention_kind_names[i], "detail", ke.msg);
			if (!first) {
				first = rc;
				*e = ke;
			}
		}
	}
	return first;
}
