/* The write pipeline of events, shared by the neutral API (peer submits,
 * POST /v1/batch) and the local adapters (Matrix transactions): validated
 * events go through room resolution, the policy (per recipient) and one
 * group-committed statement that writes events, outbox rows, idempotency
 * keys, consent requests and audit records.  It runs as a pipelined store
 * job in two rounds (read, write); a caller may put rounds of its own
 * before them (see store_pipe_ops). */
#ifndef CW_PIPELINE_H
#define CW_PIPELINE_H

#include "app.h"
#include "event.h"

#define MX_NATIVE_MAX 255 /* a native event id (Matrix event id) */

enum submit_room_by {
	SUBMIT_ROOM_BY_ID,      /* the room's public id (the URL's) */
	SUBMIT_ROOM_BY_URI,     /* its mimi:// URI (a batch) */
	SUBMIT_ROOM_BY_NATIVE,  /* its native id on the item's network (room_bindings) */
};

struct submit;
struct msg_input;

/* A job for n items (set each with submit_put). */
struct submit *submit_new(size_t n);
void submit_free(void *b);
void submit_setup(struct submit *b, struct cw_app *app, enum submit_room_by room_by);
size_t submit_count(const struct submit *b);

/* An event of a local user from a local adapter: network is the adapter's
 * ("matrix"), room its native room id, native_id the event's native id
 * (the idempotency key: the same native id twice is stored once), sender
 * the user's mimi:// URI; ev a validated event (event_parse), whose
 * references (in_reply_to, replaces) are already neutral message ids, and
 * whose text the item takes over (ev->text is NULL after; event_free it);
 * msg_id the id it gets ("msg_..."), or NULL for a new one.  A reference
 * may name an earlier item of the same job by the msg_id given it (a
 * Matrix transaction that holds a message and a reaction to it): the two
 * are written by one statement, in order.  False when out of memory. */
bool submit_put_local(struct submit *b, size_t i, struct cw_app *app, const char *network, const char *room,
		      const char *native_id, const char *sender, struct event *ev, const char *msg_id);

/* The two rounds (round 0 reads, round 1 writes; *more as store_pipe_ops). */
/* Round 0 on its own, on any connection (a reader's, outside a
 * transaction): then only round 1 is left for the writer, and *write says
 * whether it is needed.  What it read may be stale by the write: a key
 * written meanwhile fails the write as a conflict (retry), a room or
 * identity is never deleted, a group's member who left in between (under
 * the room's lock) is as if they left just before (the write refuses their
 * events and makes no rows to them: peer_api.c, GROUP_JM; since the
 * twenty-fifth session), and a member added or a consent that changed in
 * between is as if it changed just after. */
cw_err submit_prepare(PGconn *c, struct submit *b, bool *write, cw_errmsg *e);
cw_err submit_send(PGconn *c, struct submit *b, int round, cw_errmsg *e);
cw_err submit_recv(PGconn *c, struct submit *b, int round, bool *more, cw_errmsg *e);

/* The detail of an item refused as an edit or a delete of another
 * sender's message (400 invalid_body): an adapter tells its user in its
 * own words (matrix.c). */
#define SUBMIT_WHY_NOT_SENDERS                                                                                   \
	"content.replaces names a message of another sender: only its sender may edit or delete it"

/* Item i's outcome after the job: 202 (accepted; also for a replay), or the
 * HTTP status it was refused with (code and detail say why); 0 when the
 * item was never set. */
int submit_result(const struct submit *b, size_t i, const char **code, const char **detail);
/* Item i of a local user, accepted but refused by the policy for every
 * recipient (stored as dropped): the first recipient's deny reason (a
 * policy reason code, static); NULL otherwise. */
const char *submit_denied(const struct submit *b, size_t i);
/* Its words for the local user (policy_decision_text: for
 * content_kind_disabled, the kinds the rule refused), NULL when
 * submit_denied is NULL or the reason is not hers to know. */
const char *submit_denied_text(const struct submit *b, size_t i);
/* Item i's Retry-After in ms where it was refused with 429 (a rate
 * limit's wait); 0 otherwise. */
int64_t submit_retry_after_ms(const struct submit *b, size_t i);

/* The rate limits' records (policy.limit, about no message) of a job that
 * was then undone as a whole (an XMPP first contact a limit refused rolls
 * back all it made, those records with it): written on their own, in a
 * transaction of their own, so that such a limit is audited as any
 * other.  CW_OK when there are none. */
cw_err submit_write_limits(PGconn *c, const struct submit *b, cw_errmsg *e);

/* A policy decision that is not a plain allow, as the audit log keeps it
 * (actor 'policy'): action policy.<verdict>, the reason and the deciding
 * rule, the message it is about (pid: its msg_ id, or NULL), the subject
 * (the local user it was for; with none, the remote party) and details,
 * which it takes (sender, direction, type; retry_after_ms for a limit).
 * The write pipeline records its items' decisions in this shape; NULL when
 * out of memory. */
struct policy_decision;
json_t *peer_audit_record(const struct policy_decision *d, const char *pid, const char *subject, json_t *details);
/* One such record written on its own (a room, a member, a consent
 * request: decisions outside the write pipeline); takes details. */
cw_err peer_audit_write(PGconn *c, const struct policy_decision *d, const char *subject, json_t *details,
			cw_errmsg *e);

#endif
