/* Retention: what a transit keeps no longer than it must (docs/operations.md,
 * "Retention").
 *
 * The content of an event accepted more than retention.content_days ago is
 * erased once no delivery of it is still open (pending, held, in flight,
 * failed or dead: a dead letter may still be replayed); its row, ids and
 * native ids stay, so replies, edits, statuses and traces still resolve.
 * Idempotency keys older than retention.idempotency_days and delivery
 * attempts older than retention.attempts_days are deleted, but a dead
 * letter's (its replay looks for what its tries sent).  Events are
 * deleted as families (a message with its edits, deletes, reactions and
 * the reactions' removals), each with its outbox rows, their attempts and
 * its native ids, once every member was accepted more than
 * retention.rows_days ago and no delivery of one, nor of a reply to one,
 * is open.  Audit records older than retention.audit_days are deleted,
 * but a consent change an XMPP component has not yet followed into its
 * rosters.  The record of a file re-hosted on the homeserver goes with
 * the content of the messages that name it, and at the latest
 * retention.content_days or retention.rows_days after it was made,
 * whichever is sooner (0: not that one).  A setting of 0 keeps that kind of data for ever.  Local
 * identities nothing refers to (names a peer made up) are forgotten
 * RETENTION_IDENTITY_DAYS after they were made.  Reports are deleted
 * retention.reports_days after the operator handled (or dismissed) them,
 * never while open; consent requests retention.consent_requests_days
 * after they were answered or expired, never while pending. */
#ifndef CW_RETENTION_H
#define CW_RETENTION_H

#include "conf.h"
#include "cw.h"

#include <libpq-fe.h>
#include <stdbool.h>

/* A statement's CTE (named mf) that forgets the files re-hosted for the
 * attachments of the events whose content goes (atts: a relation with a
 * column atts, their content.attachments before it goes): the rows of
 * media_rehosted of their URLs, by media_rehosted_key (network, source),
 * whoever they were fetched for.  What the row kept (the peer's URL of the
 * file, its digest and size, for whom, the mxc:// URI) is the message's
 * content, and goes with it: when it is erased (retention.content_days,
 * or its expiry) or deleted (retention.rows_days).  Until the forty-fifth
 * session it was kept for ever.  The file itself stays on the homeserver,
 * which has no client API to delete it (docs/security.md).  A later
 * message naming the same file fetches and uploads it again. */
#define RETENTION_FORGET_FILES(atts) \
	"mf AS (DELETE FROM media_rehosted r USING (SELECT DISTINCT a->>'url' AS url FROM " atts " c, " \
	"  jsonb_array_elements(CASE WHEN jsonb_typeof(c.atts) = 'array' THEN c.atts ELSE '[]'::jsonb END) a) u " \
	"  WHERE r.network = 'matrix' AND r.source = u.url)"

/* The attachments of an event's content (e: the event), as the column
 * atts RETENTION_FORGET_FILES reads. */
#define RETENTION_ATTS(e) e ".content->'content'->'attachments' AS atts"

/* Rows one statement of a sweep changes at most. */
#define RETENTION_BATCH 1000

/* Local identities nothing refers to are forgotten this many days after
 * they were made (retention.c, IDENTITY_UNUSED): names a peer made up,
 * in consent updates, blocks and consent requests.  Not a setting: such
 * a row holds nothing of anyone's (a user's rows are all kept), so there
 * is nothing for an operator to keep; the days keep a name a peer is
 * using now (a block and its end, a request) from being made and
 * forgotten over and over. */
#define RETENTION_IDENTITY_DAYS 30

/* Local identities a sweep looks at, at most, in one run (in id order,
 * from where the last run stopped, round the table). */
#define RETENTION_IDENTITY_SCAN 10000

/* Events a run of the content erasure (those whose content is due) or
 * of the events' deletion (the old ones) looks at, at most (in
 * accepted_at order, from where the last run stopped, round the table):
 * those kept (for an open delivery) are looked at again each turn, not
 * each run (retention.c, SCANNED).  The same bound for the old delivery
 * attempts (in started_at order), a dead letter's kept (since the
 * sixty-third session). */
#define RETENTION_CONTENT_SCAN 10000

/* A consent request answered or expired is kept at least this many days
 * after that, whatever retention.consent_requests_days says: the Matrix
 * bot, started again, looks back six days of consent.expire records for
 * the expiry notices it still owes (mx_bot.c, EXPIRY_LOOKBACK_DAYS), and
 * reads the request each names. */
#define RETENTION_REQUEST_MIN_DAYS 7

/* The kinds a sweep counts (below). */
#define RETENTION_KINDS 9

/* Where a scan of events goes on: the accepted_at (as PostgreSQL writes
 * it) and id of the last event looked at; "" and 0: from the oldest. */
struct retention_cursor {
	char at[48];
	int64_t id;
};

/* What a sweep keeps from one run to the next, and is told: where the
 * look for unused local identities goes on (0: from the first), where the
 * content erasure's and the events' deletion's (since the fifty-first
 * session) and the delivery attempts' (since the sixty-third), the
 * policy's consent_request_window_seconds (a request expired unanswered
 * within it still stands) and report_window_seconds (the reports made
 * within it count toward the automatic limit). */
struct retention_state {
	int64_t identity_cursor;
	struct retention_cursor content_cursor, rows_cursor, attempts_cursor;
	int64_t consent_window_s;
	int64_t report_window_s;
	/* Set by a sweep: more is due of what no count counts (the expiries
	 * brought forward, RETENTION_BATCH of them): run again a second
	 * later, as for a full batch counted. */
	bool again;
};

/* The kinds' names, in the order of the counts below (the metrics' and
 * the log's kind label). */
extern const char *const retention_kind_names[RETENTION_KINDS];

/* One bounded round on c (an idle connection): each statement its own
 * short transaction, rows chosen with SKIP LOCKED (two daemons on one
 * database never wait for each other).  counts: events whose content was
 * erased, idempotency keys deleted, delivery attempts deleted, events
 * deleted, audit records deleted, local identities forgotten (since the
 * forty-sixth session; always, RETENTION_IDENTITY_DAYS, whatever the
 * settings), records of re-hosted files no message's content took with
 * it (since the forty-eighth; at the sooner of content_days and
 * rows_days), handled reports (retention.reports_days) and answered or
 * expired consent requests (retention.consent_requests_days; both since
 * the forty-ninth); one of RETENTION_BATCH or more means
 * more may be due (run again: events come in families of any size, up to
 * RETENTION_BATCH families a run; st->again says the same of what no
 * count counts).  Each kind runs whatever became of the
 * others: one that fails is logged ("retention sweep failed", its kind),
 * marked in failed (its count 0), and the first failure returned. */
cw_err retention_sweep(PGconn *c, const struct cw_config *cfg, struct retention_state *st,
		       long counts[RETENTION_KINDS], bool failed[RETENTION_KINDS], cw_errmsg *e);

#endif
