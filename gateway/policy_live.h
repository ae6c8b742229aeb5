/* The policy in force: the snapshot loaded from PostgreSQL and swapped when
 * anything changes, and the sweep that applies consent to held messages.
 *
 * One thread per daemon process, with its own connection: it LISTENs on
 * causeway_policy (every rule, setting, opt-in, consent or block change
 * NOTIFYs it), reloads the whole snapshot when told (and at least every
 * policy.reload_interval_s), and every policy.sweep_interval_ms runs the
 * sweep: held rows whose local user has now allowed the sender are
 * released in order, those whose user blocked the sender are dropped, those
 * held past the expiry are expired, and the content of events nobody will
 * receive is deleted.  Readers take a counted reference to the current
 * view; a swap never waits for them. */
#ifndef CW_POLICY_LIVE_H
#define CW_POLICY_LIVE_H

#include "cw.h"
#include "policy.h"
#include "ratelimit.h"
#include "retention.h"

#include <libpq-fe.h>
#include <stdatomic.h>

/* Server-wide settings (the settings table, keys policy.*). */
struct policy_settings {
	enum policy_mode default_mode;
	bool optin_default;
	int64_t held_expiry_s;           /* held messages are deleted after this */
	int64_t consent_window_s;        /* one consent request per pair per window */
	int64_t report_threshold;        /* reports within report_window_s that limit a sender; 0: never */
	int64_t report_window_s;
	int64_t report_limit_per_minute; /* the automatic limit: messages per minute */
	int64_t report_limit_s;          /* and how long it lasts */
	int64_t identifier_queries_per_minute; /* each peer's POST /v1/identifiers/query */
	int64_t peer_updates_per_minute; /* each peer's consent updates, blocks and reports */
	int64_t user_updates_per_minute; /* each local user's consent changes, opt-ins and reports by command */
	int64_t user_requests_per_day;   /* first contacts' requests each local user gets from each remote
					  * domain a day; 0: unbounded */
	/* A hash of what the server's side of a decision reads for every
	 * row (the default mode and opt-in, the rules in force): when it
	 * changes, the rows not handed over yet are decided again
	 * (policy_recheck_rows).  An overlay's is its base's.  The users'
	 * opt-outs are not in it (policy_view.outs). */
	uint64_t fingerprint;
	/* Milliseconds from the load (the database's clock) to the first
	 * expiry of a rule with a mode in force, 0 for none: the policy
	 * thread reloads then, so that the rows waiting are decided again
	 * without it (docs/policy.md, "Consent and the sweep"). */
	int64_t mode_rule_expiry_in_ms;
	/* policy.default_mode's row could not be read (SQL wrote a value the
	 * admin API refuses): default_mode is then the mode in force before
	 * it, closed at the first load, never open by default. */
	bool default_mode_unreadable;
};

/* The settings as they are where none is stored (the settings table holds
 * only those set, and the migrations' seeds). */
void policy_settings_defaults(struct policy_settings *s);

/* The snapshot a load read the database under (pg_current_snapshot()):
 * whose changes it has.  A NOTIFY causeway_policy names the transaction
 * that made its change (policy_notify_user), and one whose change the
 * view in force has already read is not loaded again (until the
 * fifty-second session the process that made a change loaded it twice:
 * for its own sync, and again when it heard its own NOTIFY).  xmax 0:
 * none known (it sees no transaction). */
struct policy_xsnap {
	uint64_t xmin, xmax; /* every transaction below xmin ended; none from xmax on had */
	uint64_t *xip;       /* those between that had not (nxip, malloc'd) */
	size_t nxip;
};
/* Parses pg_snapshot text ("xmin:xmax:xip,..."): false (and *s none
 * known) when it is not one or memory runs out. */
bool policy_xsnap_parse(const char *text, struct policy_xsnap *s);
/* Whether the changes of transaction xid (xid8; 0: not known) committed
 * before s was taken: a NOTIFY comes only from a transaction that
 * committed, so ended before s is committed before it. */
bool policy_xsnap_sees(const struct policy_xsnap *s, uint64_t xid);
void policy_xsnap_free(struct policy_xsnap *s);
/* The length of a transaction id's text (xid8: 20 digits) and its 0. */
#define POLICY_XID_LEN 24

struct policy_view {
	struct policy_snapshot *snap;
	struct policy_xsnap xs; /* what the load read under (an overlay: its users' facts) */
	struct policy_settings set;
	int64_t loaded_ms;
	double load_ms;                  /* how long loading and compiling took */
	atomic_int refs;
	/* An overlay (policy_load_users): the full view its snapshot is made
	 * over (a reference held) and the local users it holds the facts of;
	 * NULL and 0 for a full view. */
	struct policy_view *base;
	int64_t *users;
	size_t nusers;
	/* One of those users opted out of a network (a full view: one
	 * opted out that the view before it had not: reload), or since the
	 * fifty-fifth session a remote user blocked one lately (a full view:
	 * a block of blocks_lately the view before it had not): a change for
	 * the dispatcher's claims (swap_in). */
	bool opted_out;
	/* A local user's fact as the two lists below hold it: her identity
	 * id and what it is about (an opt-out: the network's FNV-1a hash; a
	 * remote block: the blocker's identity id), each list in (id, about)
	 * order.  The opt-outs the load read (a full view: all; an overlay:
	 * its users'): a whole reload decides again the rows of the users it
	 * finds a new one of (their walk), not every waiting row
	 * (policy_live.c, facts_new); a walk reads her held, dead, failed
	 * and pending rows only when one of its users is listed here
	 * (has_fact). */
	struct policy_user_fact { int64_t id; uint64_t about; } *outs;
	size_t nouts;
	/* The remote users' blocks of local users (blocks) of the last
	 * minutes the load read: a whole reload decides again the rows to his
	 * peer of the users it finds a new one of (their walk), as a NOTIFY
	 * naming her does; a walk reads her rows to a blocker's peer only for
	 * a user listed here (policy_live.c, has_fact). */
	struct policy_user_fact *blocks_lately;
	size_t nblocks_lately;
	/* How recent, in seconds, a block is "of the last minutes": the
	 * remote ones in blocks_lately, and a local user's for the periodic
	 * sweep (policy_live.c, lately_s_of): policy.reload_interval_s and a
	 * margin, the longest a block can go unseen by a reload.  An
	 * overlay's is its base's. */
	long lately_s;
};

/* Loads rules, settings and consent facts in one read-only transaction on
 * c and compiles them (a new view with one reference).  prev (or NULL at
 * the first load): the view in force, whose default mode stays when the
 * settings' one cannot be read.  A rule row that cannot be read fails the
 * load (CW_EINVAL, naming the row): the rules in force stay whole.
 * lately_s: policy_view.lately_s. */
cw_err policy_load(PGconn *c, uint64_t version, const struct policy_view *prev, long lately_s,
		   struct policy_view **out, cw_errmsg *e);
/* An overlay of base (a full view, or an overlay whose base is taken): the
 * current facts of the n local users ids (identity ids) over everything
 * else of base (a new view with one reference, holding one on base). */
cw_err policy_load_users(PGconn *c, uint64_t version, struct policy_view *base, const int64_t *ids, size_t n,
			 struct policy_view **out, cw_errmsg *e);

/* How many local users an overlay holds at most: a change of more users
 * (or of anything else: rules, settings) reloads everything.  The NOTIFY
 * causeway_policy of a change of some users' facts says whose: payload
 * "u:<id>,<id>,..." (after "x:<xid8>;", policy_notify_user). */
#define POLICY_OVERLAY_MAX 256
/* Tells every process that local user local_id's facts changed (on c, in
 * the caller's transaction: sent at its commit); local_id NULL or "":
 * something else changed, reload everything.  The payload names the
 * transaction first, "x:<xid8>;u:<id>" (or "x:<xid8>"): a process whose
 * view in force has read it already loads nothing for it (policy_xsnap);
 * one without it (an operator's NOTIFY by hand) is loaded as before. */
cw_err policy_notify_user(PGconn *c, const char *local_id, cw_errmsg *e);
/* policy_notify_user's expression (a local user's id $1 or NULL), for a
 * statement that NOTIFYs with what else it does (an audit record's
 * INSERT: one round trip for both). */
#define POLICY_NOTIFY_EXPR(ID) "pg_notify('causeway_policy', 'x:' || pg_current_xact_id() || coalesce(';u:' || " ID ", ''))"
#define POLICY_NOTIFY_USER_SQL "SELECT " POLICY_NOTIFY_EXPR("$1::bigint")
void policy_view_put(struct policy_view *v);

/* Decides the outbox row outbox_id again, if it is not handed over yet
 * (pending, held, dead, failed), by the server rules of pl's view in
 * force, its user's opt-out
 * (what policy_reason_is_servers covers) and her block of the sender or
 * their domain (since the forty-third session): one they now refuse is
 * dropped as a block's sweep drops a row (content erased unless another
 * row still has it to come, policy.deny audited with {"by": "sweep"}).
 * *reason: the refusal's reason code (static), or NULL when the row stays
 * (allowed, handed over, or locked by another transaction).  The policy
 * thread does the same to every such row after a change of the rules, the
 * default mode or an opt-out (docs/policy.md).  Counted and logged as its
 * rechecks are (causeway_policy_rechecked_total,
 * causeway_policy_recheck_dropped_total; since the fifty-second session). */
struct policy_live;
cw_err policy_recheck_row(struct policy_live *pl, PGconn *c, const char *outbox_id, const char **reason,
			  cw_errmsg *e);

/* What the dispatcher asks so that no row waiting after a change of the
 * rules (what the recheck follows: policy_settings.fingerprint, a user's
 * opt-out) is delivered before it is decided under them.  The policy
 * thread decides the waiting rows in batches, and a row a dispatcher
 * claims in between, or holds in flight as the change comes and fails
 * back to waiting, escapes the pass (until the thirty-second session it
 * was delivered on its claim or its retry).  policy_live_stamp: a count
 * of this process's changes, which moves when a change is put in force
 * here (before the view that has it), and *unsettled: whether the
 * recheck of a change is not over yet (rows may wait that were not
 * decided under the rules in force).  A lane decides what it claims
 * while unsettled (or when the count moved during its claim); the pull
 * stream (adapters/peer/peer_pull.c) what it hands out, alike (since the
 * thirty-third session).  The rows of a claim a lane fails back to
 * waiting it decides by policy_live_facts alone, which moves with every
 * change this count does. */
struct policy_live;
uint64_t policy_live_stamp(struct policy_live *pl, bool *unsettled);
/* A count of the views put in force here (moved before each one is, and
 * after policy_live_stamp's count for the same view): a lane reads it
 * before its claim, and decides the rows of the claim it fails back to
 * waiting when it moved since (a change of the rules, or a view of a
 * user's block made while they were in flight: the screen drops what the
 * block now refuses, as the block's sweep, which passed over them in
 * flight, would have). */
uint64_t policy_live_facts(struct policy_live *pl);
/* Decides the outbox rows ids (n) again as policy_recheck_row does, with
 * the view in force: the waiting ones, and those in flight under
 * claimed_by (a lane's claim; one ending in '#': every claim that starts
 * with it, as the pull stream's "pull#" for its rows' "pull#<position>";
 * NULL: none); those refused are dropped (a row in flight too: its claim
 * ends).  In c's open transaction, else one
 * of its own.  gone[i] (n of them) tells which were dropped; *dropped how
 * many. */
cw_err policy_live_screen(struct policy_live *pl, PGconn *c, const int64_t *ids, size_t n, const char *claimed_by,
			  bool *gone, long *dropped, cw_errmsg *e);
/* The same, for a dispatcher lane's claim: uncounted[i] (NULL: none) tells
 * that the try of ids[i] its claim counted (outbox.attempts) was not made,
 * or does not count (a 429): dropped while in flight under claimed_by,
 * the row has it taken back, as the dispatcher's release or record of
 * the row would have: its attempts count the tries in delivery_attempts
 * that spend the retry budget (until the thirty-fourth session it kept the
 * claim's count, a try that no record showed). */
cw_err policy_live_screen_claim(struct policy_live *pl, PGconn *c, const int64_t *ids, size_t n,
				const char *claimed_by, const bool *uncounted, bool *gone, long *dropped,
				cw_errmsg *e);

/* A local user's decision (state allowed, blocked, or none: forget it)
 * about a remote user (kind "user", subject a URI) or domain, from source
 * (user, admin, peer, outbound): stored; the pending consent requests of
 * that pair decided; the user's held messages released in order or dropped
 * now; every process told (NOTIFY).  counts as the sweep's (held rows
 * released, dropped, expired); *decided: the consent requests decided.  *repeat: the decision is the one stored
 * (none: nothing stored) and no pending request of that pair is left to
 * decide; then nothing is done (counts and *decided 0, the consent's
 * source and updated_at kept), and the caller answers it as a change but
 * writes no audit record (the admin API, the Matrix bot, the XMPP
 * commands alike). */
cw_err policy_consent_apply(PGconn *c, const struct policy_view *v, const char *local_id, const char *kind,
			    const char *subject, const char *state, const char *source, long counts[3], long *decided,
			    bool *repeat, cw_errmsg *e);

/* After local_id's allow of kind ("user", "domain") subject: what of
 * hers still keeps the subject out, for the adapters' answers (mx_bot.c,
 * xmpp_cmd.c): a block of his domain, for a user; blocks of users of it,
 * for a domain (a block wins over an allow of the other kind: decide()'s
 * order, and consent_sql marks his request 'blocked').  A sentence,
 * starting with a space, into out; "" when nothing does.  Until the
 * forty-fifth session's review the answers said "Accepted" alone. */
cw_err policy_allow_blocked_note(PGconn *c, const char *local_id, const char *kind, const char *subject, char *out,
				 size_t len, cw_errmsg *e);

/* Whether the local user local_id (identities.id) is opted in to network
 * ("peer:<name>") as a decision will find it: her own choice as stored
 * (read here: the snapshot can be a moment behind a command she just
 * gave), else policy.optin_default of the snapshot in force.  *state: 1
 * opted in (hers or the default's), 0 not (no choice of hers, the
 * default off), -1 she opted out.  For the answers of the adapters'
 * accept of a whole domain (mx_bot.c, xmpp_cmd.c). */
cw_err policy_live_optin_state(struct policy_live *pl, PGconn *c, const char *local_id, const char *network,
			       int *state, cw_errmsg *e);

/* One line per fact of a local user's consent ($1: the identity id):
 * pending requests, decisions, opt-ins, (since the fortieth session) the
 * senders whose messages wait for her with no request pending (a limit on
 * requests held them unasked), and the remote users who blocked her; what
 * a user's "list" command shows in any network.  $2: the most lines read,
 * POLICY_USER_SUMMARY_ROWS + 1 (the union's branches in this order, the
 * later ones not at all once it is reached): more than one answer holds,
 * so the count of lines left out is exact up to POLICY_USER_SUMMARY_ROWS
 * and a floor ("at least") past it.  Until the forty-seventh session every
 * line was read, thousands for a user with as many decisions. */
extern const char POLICY_USER_SUMMARY_SQL[];
#define POLICY_USER_SUMMARY_ROWS 400
#define POLICY_USER_SUMMARY_LIMIT "401" /* the ROWS + 1, as a parameter */

struct policy_live;
struct cw_config;
struct policy_live_opts {
	const char *url;
	long statement_timeout_ms;
	long sweep_interval_ms;
	long reload_interval_s;
	long reconnect_max_ms; /* database.reconnect_max_ms: its connects' pace while the database is away */
	/* The retention settings (retention.*), run on this thread's sweep
	 * loop (gateway/retention.h); NULL: no retention sweep. */
	const struct cw_config *retention;
	/* Also run on each whole reload, on the thread's connection, whether
	 * or not the policy's load succeeded (other state that must follow
	 * changes as the policy does, and needs nothing of it: the admin
	 * tokens).  False: it failed, and is tried again as a failed load is
	 * (within a second, then less and less often), though the policy
	 * loaded. */
	bool (*on_reload)(PGconn *c, void *arg);
	void *reload_arg;
	/* A connection made by the caller, taken whatever policy_live_start
	 * answers: the thread's first, made ready as a new one is (the
	 * start's, since the fifty-ninth session); NULL: one is made. */
	PGconn *conn;
};
/* Loads the first snapshot (failing start-up if it cannot) and starts the
 * thread. */
cw_err policy_live_start(struct policy_live **out, const struct policy_live_opts *o, cw_errmsg *e);
void policy_live_stop(struct policy_live *pl);
void policy_live_free(struct policy_live *pl);
/* The view in force, with a reference for the caller (never NULL). */
struct policy_view *policy_live_get(struct policy_live *pl);
/* Asks the thread to reload now (a change made by this process; others
 * hear the NOTIFY). */
void policy_live_poke(struct policy_live *pl);

/* policy.user_updates_per_minute: whether local user localpart (its
 * identity mimi://<domain>/u/<localpart>) may make one more change of her
 * own by an adapter's command now (a token taken from her bucket: one per
 * user in this process, whichever adapter: the XMPP component's ad-hoc
 * commands and subscription decisions, the Matrix bot's commands).  Her
 * consent changes, opt-ins, opt-outs and reports share it.  notice (may be
 * NULL): on a refusal, whether it may be told (at most one notice a
 * minute a user, so that a flood of refused commands is not a flood of
 * notices).  rl NULL: no limit. */
struct ratelimit;
bool policy_user_update_allowed(struct policy_live *pl, struct ratelimit *rl, const char *localpart, bool *notice);
/* The token policy_user_update_allowed took, given back: the change it
 * was taken for changed nothing (a refusal only the database job could
 * decide, a decision she had made already). */
void policy_user_update_give(struct policy_live *pl, struct ratelimit *rl, const char *localpart);

/* Every command of local user localpart to an adapter's bot (the Matrix
 * bot's messages, list, help and what it does not understand included;
 * the XMPP component's commands run): whether she may give one more now.
 * Her bucket holds policy.user_updates_per_minute + POLICY_USER_COMMANDS_EXTRA
 * a minute (the changes her own limit allows, and as many others), one per
 * user in this process whichever adapter, apart from her changes' bucket.
 * notice (may be NULL): on a refusal, whether it may be told (at most one
 * notice a minute a user).  rl NULL: no limit.  Since the fifty-second
 * session: until then only changes were limited, and one user made the
 * bot send a notice (and list run a query) for every message she sent. */
#define POLICY_USER_COMMANDS_EXTRA 30
bool policy_user_command_allowed(struct policy_live *pl, struct ratelimit *rl, const char *localpart, bool *notice);

/* Rate limits for one decision (or the decisions of one event, one per
 * recipient): each bucket is charged at most once, however many the
 * decisions name, and first_refusal says whether a refusal was the first
 * of its bucket's episode (to record a flood once).  A peek (since the
 * twenty-eighth session) sees the event's own earlier takes (a bucket it
 * took from answers as then), else asks the bucket without taking; it is
 * not remembered, so a later take of the event does take, and its refusal
 * counts in the episode as a take's does.  rl NULL: no rate
 * limits.  The first POLICY_MEMO_INLINE buckets are remembered in the
 * struct (no allocation: one decision names at most a few); past them in
 * an array grown on the heap, which policy_rate_memo_finish frees: call
 * it once the event's decisions are made (after init, always).  Until
 * the twenty-seventh session only 8 were remembered, and a bucket past
 * them (a group whose recipients match more rules) was charged once per
 * decision naming it.  Buckets are told apart as the table does
 * (ratelimit_id: since the forty-eighth session, before which an unseeded
 * hash of the key let a peer choose a sender whose bucket was answered
 * with its domain's). */
#define POLICY_MEMO_INLINE 8
struct policy_memo_entry {
	struct ratelimit_id key; /* the bucket, as the table tells it apart (ratelimit_id) */
	int64_t result;
};
struct policy_rate_ledger;
struct policy_rate_memo {
	struct policy_rate rate;    /* pass &memo.rate in the request */
	struct ratelimit *rl;
	int n;                      /* of in */
	struct policy_memo_entry in[POLICY_MEMO_INLINE];
	struct policy_memo_entry *more; /* past in: nmore of cap (malloc'd) */
	size_t nmore, cap;
	bool first_refusal;
	struct policy_rate_ledger *ledger; /* NULL (init): none; else where the takes are recorded */
	size_t ledger_item;         /* whose the takes recorded are (POLICY_LEDGER_JOB: init) */
};
void policy_rate_memo_init(struct policy_rate_memo *m, struct ratelimit *rl);
void policy_rate_memo_finish(struct policy_rate_memo *m);

/* What the decisions of a write that may run again took (a memo's ledger,
 * set after policy_rate_memo_init): a group commit's pipelined job decides
 * in its round 0, which runs again with the batch (a lost deadlock, a
 * failed job of the batch), and until the forty-third session each run
 * took its tokens again (a message's, a join's member_add, a consent
 * request's).  Before it decides again the job gives back what the run
 * before took (policy_rate_ledger_undo), so that it is charged once,
 * for the decisions of the run that commits.  A bucket whose first
 * refusal of an episode a rolled-back run saw (its audit record rolled
 * back with it) answers the next run's first refusal of it as a first
 * again, once, so that the episode is recorded.  A token given back for
 * what the write then did not do is given only if the job took it
 * (policy_rate_ledger_give), and so are the tokens of an item the write
 * refused (a memo's ledger_item names whose its takes are: the job keeps
 * an item's apart, policy_rate_ledger_give_item).  Zero it to start (rl set); free with
 * policy_rate_ledger_free, which keeps the tokens taken. */
struct policy_rate_grant {
	char *key;
	uint32_t capacity;
	int64_t period_ms;
	size_t item;    /* the memo's ledger_item when it took it */
	bool back;      /* given back (policy_rate_ledger_give_item, policy_rate_ledger_give) */
};
/* A memo's ledger_item when its takes are the job's, not one item's (a
 * consent request's, given back per request: policy_rate_ledger_give). */
#define POLICY_LEDGER_JOB SIZE_MAX
/* A bucket (ratelimit_id, as a memo's) whose first refusal of an episode
 * this run saw, or (owed) a rolled-back run saw and this run has not
 * reported yet. */
struct policy_rate_first {
	struct ratelimit_id bucket;
	bool owed;
};
struct policy_rate_ledger {
	struct ratelimit *rl;
	struct policy_rate_grant *g;  /* the tokens taken: n of cap */
	size_t n, cap;
	struct policy_rate_first *f;  /* the first refusals: nf of capf */
	size_t nf, capf;
};
/* Gives back every token recorded, and forgets them; the first refusals
 * seen are owed to the next run. */
void policy_rate_ledger_undo(struct policy_rate_ledger *l, int64_t now_ms);
void policy_rate_ledger_free(struct policy_rate_ledger *l);
/* A struct policy_rate take (ctx: the ledger) that gives back one token
 * the ledger recorded for key as the job's (POLICY_LEDGER_JOB), and keeps
 * it recorded as given back (undo does not give it again); none recorded
 * (or each given back already): nothing.  Answers 0. */
int64_t policy_rate_ledger_give(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms);
/* The reverse, as a struct policy_rate take (ctx: the ledger): takes again
 * one of the job's tokens of key that policy_rate_ledger_give gave back,
 * for a run again of the write that did what the give was for after all
 * (a consent request made by the run that commits, where the run before
 * held its pair unasked: since the forty-sixth session; until then the
 * give forgot the token, and such a request cost its sender nothing).  A
 * bucket that has none left is not charged, and the token is forgotten.
 * Answers 0. */
int64_t policy_rate_ledger_retake(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms);
/* The tokens recorded for item (a memo's ledger_item) given back: what
 * the item paid for was not done (the write refused it: since the
 * forty-third session).  They stay recorded, as given back: undo does not
 * give them again, and policy_rate_ledger_take_item takes them again when
 * a run again of the write does it after all. */
void policy_rate_ledger_give_item(struct policy_rate_ledger *l, size_t item, int64_t now_ms);
/* Takes again the tokens of item given back (policy_rate_ledger_give_item);
 * a bucket that has none left is not charged, and forgets it. */
void policy_rate_ledger_take_item(struct policy_rate_ledger *l, size_t item, int64_t now_ms);

/* Asks for a reload and waits until a snapshot loaded after this call is
 * in force (a change this process just committed is then in effect here);
 * false after timeout_ms.  xid (NULL or "": not known) the transaction of
 * the change (pg_current_xact_id()::text, read by one of the change's own
 * statements: its audit record's RETURNING, since the fifty-third session;
 * the sync is called after its commit): a view in force that
 * has read it answers at once, with no load (the one its NOTIFY made, heard
 * first), and the load this sync makes answers that NOTIFY when it comes. */
bool policy_live_sync(struct policy_live *pl, const char *xid, long timeout_ms);
/* The same when only local user local_id's facts changed: that user's are
 * reloaded over the snapshot in force (an overlay), not everything. */
bool policy_live_sync_user(struct policy_live *pl, int64_t local_id, const char *xid, long timeout_ms);
/* The same for n local users (ids > 0) whose facts a reader found newer in
 * the database than in the snapshot in force (a change committed at
 * another process, or here, whose NOTIFY is not handled yet): counted in
 * the stats as a catch-up.  n 0: nothing is asked, false. */
bool policy_live_catch_up(struct policy_live *pl, const int64_t *ids, size_t n, long timeout_ms);

/* What the recheck drops, by refusal (policy_recheck_reasons: the server's
 * refusals, then a user's block of the sender or of his domain, then a
 * remote user's block of a local sender) and by
 * kind of row (policy_recheck_kinds: to a local user, from one to a peer,
 * from a peer to a peer). */
#define POLICY_RECHECK_REASONS 9
#define POLICY_RECHECK_KINDS 3
extern const char *const policy_recheck_reasons[POLICY_RECHECK_REASONS];
extern const char *const policy_recheck_kinds[POLICY_RECHECK_KINDS];

struct policy_live_stats {
	uint64_t version;
	uint64_t reloads, reload_failures;
	uint64_t user_reloads;               /* of those, overlays of some users' facts */
	size_t overlay_users;                /* the users the overlay in force holds (0: a full snapshot) */
	uint64_t catch_ups;                  /* decisions that waited for a snapshot behind the database */
	uint64_t released, dropped, expired; /* rows changed by sweeps */
	uint64_t retention_removed[RETENTION_KINDS], retention_failures[RETENTION_KINDS]; /* by kind (retention.h) */
	uint64_t rechecked, recheck_dropped; /* rows decided again after a change of the rules, and dropped */
	uint64_t recheck_dropped_by[POLICY_RECHECK_REASONS][POLICY_RECHECK_KINDS]; /* those dropped, by why and what */
	size_t rules, facts;
	double last_load_ms;
	/* When (cw_now_us) the first reload failed since the last whole one
	 * that succeeded, 0 when none did: the rules in force may be behind
	 * a change since then; and that failure's detail. */
	int64_t stale_since_us;
	char last_failure[sizeof(((cw_errmsg *)0)->msg)];
	cw_err last_failure_rc; /* CW_EUNAVAIL: the connection; its text is libpq's */
	bool default_mode_unreadable; /* the view in force's (policy_settings) */
	int default_mode_kept;        /* and the mode it kept (enum policy_mode) */
};
void policy_live_get_stats(struct policy_live *pl, struct policy_live_stats *st);

/* A process whose reloads have failed for this long reports its policy
 * stale (/readyz, GET /admin/v1/adapters, causeway_policy_stale_seconds):
 * a reload is retried 1 s after a failure, then 2, 4, ... up to
 * POLICY_RETRY_MAX_S apart (a change heard meanwhile tries at once). */
#define POLICY_STALE_AFTER_S 5
#define POLICY_RETRY_MAX_S 30

#endif
