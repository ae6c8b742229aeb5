/* The gateway's bot: a local user's management room (opt-in, consent,
 * reports) and the consent requests shown there.
 *
 * The appservice stores the bot's events in matrix_bot_inbox in the same
 * transaction that answers the homeserver; this thread works them off with
 * its own connection (woken by NOTIFY causeway_matrix_bot) and, each
 * round (at least every 500 ms, when a NOTIFY wakes it sooner), shows the
 * pending consent requests that were not shown yet. */
#include "config.h"
#include "matrix_int.h"
#include "fnv.h"
#include "matrix/mx_cmd.h"
#include "log.h"
#include "peer_api.h"
#include "policy_admin.h"
#include "policy_live.h"
#include "store.h"
#include "utf8.h"

#include <ctype.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The rows of one look for work: the inbox's (a parameter), the notices',
 * the consent requests' and their expiries' (the statements' LIMIT,
 * BOT_BATCH_SQL), and so of the arrays that note what became of each row
 * of a batch (notices, requests). */
#define BOT_BATCH 20
#define BOT_BATCH_SQL "20" /* BOT_BATCH, as the statements write it */
#define BOT_TRIES 12      /* an inbox row the homeserver could not take: tried this often */
#define BOT_RETRY_MAX_S 600 /* the longest wait between two tries (2 s, 4 s, ... 10 min: 37 min in all) */
#define BOT_HANDLED_KEEP_DAYS 7 /* a handled event's id is kept this long against the homeserver's resends */

/* The statements of the bot's rounds of looking for work (bot_stmts,
 * prepared on its connection when it connects): they run twice a second,
 * work or not, and planned at each call they cost the database 5-7 ms of
 * planning a round, more than running them (docs/performance.md,
 * "Forty-fifth session"). */
enum bot_look { BOT_INBOX, BOT_REQUESTS, BOT_EXPIRIES, BOT_EXPIRY_CURSOR, BOT_NOTICES, BOT_DEPARTURES, BOT_RENAMES, BOT_INVITATIONS, BOT_INVITEES, BOT_NOTICE_SAY, BOT_REQUEST_SAY, BOT_LOOKS };
static const struct store_stmt bot_stmts[BOT_LOOKS + 1];

static PGresult *bot_look(PGconn *c, enum bot_look k, int n, const char *const *params)
{
	return PQexecPrepared(c, bot_stmts[k].name, n, params, NULL, NULL, 0);
}

static const char help_text[] =
	"I am the gateway to other messaging networks. Commands:\n"
	"  list                      your pending requests and decisions\n"
	"  accept <who>              let someone write to you (or a whole domain, once you opt in to its network)\n"
	"  block <who>               refuse them; their waiting messages are dropped\n"
	"  opt-in <network>          receive messages from a network (e.g. peer:gk)\n"
	"  opt-out <network>         stop receiving from it\n"
	"  report <who> [reason]     report abuse to the operator\n"
	"  help                      this text\n"
	"<who> is an address such as mimi://wa.example/u/+4915112345678, the Matrix id of a bridged user, or a domain\n"
	"(report also takes a user of this server, such as a group's member whose words I relay);\n"
	"you may also pick the bridged user in your client (mention one user).\n"
	"Messages crossing the gateway are not end-to-end encrypted beyond it.";

static int room_encrypted(struct matrix *m, const char *room, const char *user);

/* What the bot says in an end-to-end encrypted room the user opened with
 * it (or turned encrypted), before it leaves: it reads no command there. */
static const char mgmt_encrypted_text[] =
	"This room is end-to-end encrypted, and I cannot read encrypted messages: I would never see your commands "
	"here. I leave; open a room with me without encryption to talk to me.";

/* The sender of the notices of the room named by the SQL expression room
 * (notices): the ghost of its remote user, NULL (the bot) where it has
 * none (a management room, a group's portal). */
#define NOTICE_SENDER_SQL(room)                                                                                  \
	"(SELECT ib.native_id FROM room_bindings b JOIN identity_bindings ib ON ib.identity_id = b.remote_identity_id " \
	" AND ib.network = 'matrix' WHERE b.network = 'matrix' AND b.native_id = " room " LIMIT 1)"

/* Says text in room as user (NULL: the bot), a notice, with transaction
 * id txn (NULL: a new one), once; false when the homeserver did not take
 * it (*status, unless NULL: its answer, 0 for none; *wait_ms, unless
 * NULL: after a 429 M_LIMIT_EXCEEDED the wait it asked for, else 0).
 *
 * A homeserver that rate-limits the appservice limits its bot too (a
 * registration that says rate_limited: true; Synapse exempts the bot only
 * as it exempts the ghosts).  A 429 is not waited out here: the bot is one
 * thread for all its work, and a wait (in the thirtieth session up to four
 * of 10 s each, for each notice of a batch) held up every command,
 * invitation and notice behind it.  The callers keep what was not taken
 * for when the homeserver asks (notices, requests, say_later). */
static bool say_txn(struct matrix *m, const char *room, const char *user, const char *text, const char *txn,
		    long *status, long *wait_ms)
{
	char path[600], fresh[48];
	if (!txn) {
		snprintf(fresh, sizeof(fresh), "cwbot-%llx", (unsigned long long)cw_now_us());
		txn = fresh;
	}
	char *r = curl_easy_escape(NULL, room, 0);
	snprintf(path, sizeof(path), "/_matrix/client/v3/rooms/%s/send/m.room.message/%s", r ? r : "", txn);
	curl_free(r);
	long st;
	cw_errmsg e;
	if (!status)
		status = &st;
	if (wait_ms)
		*wait_ms = 0;
	if (!mx_call(m, "PUT", path, user, NULL, json_pack("{s:s, s:s}", "msgtype", "m.notice", "body", text), status,
		     NULL, &e))
		return true;
	if (wait_ms && *status == 429)
		*wait_ms = mx_rate_limited_wait_ms() > 0 ? mx_rate_limited_wait_ms() : 1000;
	LOG_KV_LIMITED(CW_LOG_WARN, "cannot post a notice", "room", room, "detail", e.msg);
	return false;
}

/* The transaction id of one of the bot's (or a ghost's) words about the
 * Matrix event eid (what it answers: the inbox row's event) in room,
 * what naming which word it is ("help", "leave", ...): the same each time
 * that event's work runs again (a crash before its inbox row's mark, a
 * retry after a homeserver's refusal of the moment), so that the
 * homeserver, which answers a transaction id it has seen with its first
 * event, shows the word once (until the thirty-second session each try
 * made a new id).  The room is in it too: one event's work speaks in two
 * rooms (a management room taken over, a conversation moved). */
static void txn_for(char *out, size_t len, const char *what, const char *eid, const char *room)
{
	char key[2 * MX_ID_MAX + 8];
	snprintf(key, sizeof(key), "%s\n%s", eid ? eid : "", room ? room : "");
	unsigned char h[32];
	char hex[33];
	cw_sha256_pair(what, strlen(what), key, strlen(key), h);
	cw_hex(hex, h, 16);
	snprintf(out, len, "cw%s-%s", what, hex);
}

/* Whether room has notices queued and not sent yet (matrix_notices): 1
 * yes, 0 no, -1 the database did not say (taken as yes: the word is
 * queued, and goes out in its turn).  A word said at once while older
 * ones of its room wait would pass them: notices of one room go out in
 * the order they were queued, whoever says them (until the thirty-eighth
 * session a word said while an older one waited out a 429, or a failure
 * of the moment, came before it, as did a later row of the batch: a
 * review's finding). */
/* Notice row t not sent nor given up yet (one given up is done, its
 * next_at 'infinity'): what holds back the later words of its room, here,
 * in notices' turn and for consent requests (requests); found by
 * matrix_notices_waiting_room_idx (041). */
#define NOTICE_WAITS(t) t ".done_at IS NULL AND " t ".next_at < 'infinity'"

static int notices_waiting(PGconn *c, const char *room)
{
	const char *p[] = { room };
	PGresult *r = PQexecParams(c, "SELECT 1 FROM matrix_notices x WHERE x.room_id = $1 AND " NOTICE_WAITS("x")
				      " LIMIT 1", 1, NULL, p, NULL, NULL, 0);
	int n = PQresultStatus(r) == PGRES_TUPLES_OK ? PQntuples(r) > 0 : -1;
	PQclear(r);
	return n;
}

/* Queues text, said in room as user (NULL: the bot) with transaction id
 * txn, due in after_ms (the bot's thread sends it: notices; leave: the
 * sender leaves the room once it is said): false when the database did
 * not take it (logged: the word is lost). */
static bool queue_word(struct matrix *m, PGconn *c, const char *room, const char *user, const char *text,
		       const char *txn, bool leave, long after_ms)
{
	char ms[24];
	snprintf(ms, sizeof(ms), "%ld", after_ms);
	const char *p[] = { room, text, user ? user : m->bot, txn, leave ? "t" : "f", ms };
	cw_errmsg e;
	cw_err rc = store_command(c,
		"INSERT INTO matrix_notices (room_id, body, sender, txn_id, then_leave, next_at) "
		"VALUES ($1, $2, $3, $4, $5::boolean, now() + $6::bigint * interval '1 millisecond') "
		"ON CONFLICT DO NOTHING", 6, p, &e);
	if (!rc)
		rc = store_command(c, "NOTIFY causeway_matrix_bot", 0, NULL, &e);
	if (rc)
		LOG_KV_LIMITED(CW_LOG_WARN, "a notice the homeserver did not take is lost: the database did not take it",
			       "room", room, "detail", e.msg);
	return !rc;
}

/* Says text in room as user (NULL: the bot), with transaction id txn
 * (made from what it answers: txn_for, a command's).  What the homeserver
 * does not take for now (a 429, a 5xx, no answer) is queued
 * (matrix_notices, on c: in its transaction if one is open) with its
 * sender and txn, due when the homeserver asked (a 429) or in 2 s, so that
 * notices sends it once, with the same txn (until the thirty-second
 * session only a 429 was queued, with an id of the row's own, and only a
 * word of the room's own sender: a command run again after a crash before
 * its inbox mark was answered twice, and a ghost's word in a room it is
 * not the ghost of was lost).  leave: user leaves the room once it is said
 * (the queued row does it, after the word).  True when the text was said,
 * or is lost (refused for good, logged): the caller goes on as if said
 * (and leaves); false when it is queued. */
static bool say_later(struct matrix *m, PGconn *c, const char *room, const char *user, const char *text,
		      const char *txn, bool leave)
{
	long status = 0, wait = 0;
	int queued = notices_waiting(c, room);
	if (queued == 0 && (say_txn(m, room, user, text, txn, &status, &wait) || !mx_for_now(status)))
		return true;
	return !queue_word(m, c, room, user, text, txn, leave, queued ? 0L : status == 429 ? wait : 2000L);
}

static void say_as(struct matrix *m, PGconn *c, const char *room, const char *user, const char *text,
		   const char *txn)
{
	say_later(m, c, room, user, text, txn, false);
}

/* Says text in room as user (NULL: the bot), and leaves it: at once when
 * the homeserver took the word, else after it (the queued row leaves:
 * notices), so that what the user should read before the sender goes is
 * never lost (until the thirty-second session a 429 asking more than 2 s
 * lost it; a shorter one the bot slept out, holding up all its work). */
static void says_and_leaves(struct matrix *m, PGconn *c, const char *room, const char *user, const char *text,
			    const char *txn)
{
	if (!say_later(m, c, room, user, text, txn, true))
		return;
	cw_errmsg e;
	if (mx_room_action(m, room, user, "leave", &e))
		LOG_KV_LIMITED(CW_LOG_WARN, "a notice's sender cannot leave", "room", room, "sender",
			       user ? user : m->bot, "detail", e.msg);
}

/* A bridged room turned end-to-end encrypted: the gateway cannot read what
 * is said there from now on, and says so (in a direct room as the remote
 * user's ghost, who is in the room; in a group's portal, which has no one
 * remote user, as the bot) instead of failing silently. */
static void encrypted(struct matrix *m, PGconn *c, const char *room, const char *eid)
{
	const char *params[] = { room };
	PGresult *r = PQexecParams(c,
		"SELECT ib.native_id, ri.uri, ri.network FROM room_bindings b "
		"LEFT JOIN identities ri ON ri.id = b.remote_identity_id "
		"LEFT JOIN identity_bindings ib ON ib.identity_id = ri.id AND ib.network = 'matrix' "
		"WHERE b.network = 'matrix' AND b.native_id = $1", 1, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1) {
		char text[1200];
		if (PQgetisnull(r, 0, 1))
			snprintf(text, sizeof(text),
				 "This group's room is now end-to-end encrypted. The gateway cannot read encrypted "
				 "messages, so what is written here from now on will not reach the group's other "
				 "members.");
		else
			snprintf(text, sizeof(text),
				 "This conversation is now end-to-end encrypted. The gateway to %s cannot read "
				 "encrypted messages, so what is written here from now on will not reach %s. To go on "
				 "talking with them, start a new conversation without encryption.",
				 PQgetvalue(r, 0, 2), PQgetvalue(r, 0, 1));
		char txn[48];
		txn_for(txn, sizeof(txn), "enc", eid, room);
		say_as(m, c, room, PQgetisnull(r, 0, 0) ? NULL : PQgetvalue(r, 0, 0), text, txn);
		LOG_KV_LIMITED(CW_LOG_WARN, "a bridged Matrix room was encrypted", "room", room);
	} else if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 0) {
		/* A management room its user turned encrypted: the bot cannot
		 * read her commands from now on, so it is one no more (as
		 * after her leave: requests wait for the next room she opens
		 * with it), and the bot says so and leaves (until the
		 * forty-fourth session it stayed, silent to every command). */
		PGresult *d = PQexecParams(c, "DELETE FROM matrix_mgmt_rooms WHERE room_id = $1 RETURNING 1", 1, NULL,
					   params, NULL, NULL, 0);
		bool was = PQresultStatus(d) == PGRES_TUPLES_OK && PQntuples(d) > 0;
		PQclear(d);
		if (was) {
			char txn[48];
			txn_for(txn, sizeof(txn), "enc", eid, room);
			says_and_leaves(m, c, room, NULL, mgmt_encrypted_text, txn);
			LOG_KV_LIMITED(CW_LOG_INFO, "a management room was encrypted: the bot leaves", "room", room);
		}
	}
	PQclear(r);
}

/* What <who> is as a consent subject (subject_of). */
enum subject {
	SUBJECT_NONE,    /* none: "Whom?" */
	SUBJECT_TAKEN,   /* a peer's user or domain, or one of this provider's (the caller refuses it) */
	SUBJECT_NO_PEER, /* an address on, or a domain, of no peer: nobody who can reach the user */
	SUBJECT_FAILED,  /* the store failed: nothing decided, "try again" */
};

/* SUBJECT_TAKEN when domain is a peer's (policy_peer_of_domain: a
 * disabled one too, matched exactly), else SUBJECT_NO_PEER; a store error
 * is SUBJECT_FAILED (until the forty-first session it was taken, and a
 * failed look-up let through an address the rule refuses). */
static enum subject peer_domain(PGconn *c, const char *domain)
{
	char peer[PEER_NAME_MAX];
	cw_errmsg e;
	if (policy_peer_of_domain(c, domain, peer, sizeof(peer), &e) != CW_OK) {
		LOG_KV(CW_LOG_WARN, "a bot command failed", "detail", e.msg);
		return SUBJECT_FAILED;
	}
	return peer[0] ? SUBJECT_TAKEN : SUBJECT_NO_PEER;
}

/* <who> as a consent subject: a mimi:// user URI, a ghost's Matrix id, or a
 * domain as an address has it (mimi_domain_check, as POST
 * /admin/v1/consents takes one).  SUBJECT_NONE when it is none of these.  Until
 * the thirty-ninth session any lower-case name with a dot was a domain:
 * "block gk..example" or "block 10.0.0.1" was answered "Blocked" and
 * stored, and matched no sender.  A domain, an address's too, is taken in
 * any case and stored in lower case (DNS names are case-insensitive; a
 * remote user's id keeps its case): until the fortieth session
 * mimi://WA.Example/u/wally was "Whom?".  A user URI is one of this
 * provider's (the caller refuses it, or reports her) or of a peer's
 * domain (the peers table): another names nobody who can reach the user,
 * and is SUBJECT_NO_PEER, its address in subject (until the fortieth
 * session such a consent was stored and answered "Accepted", and matched
 * no sender, a report of it stored).  So is a domain typed alone that is
 * neither this provider's nor a peer's (the domain in subject): a
 * sender's domain is always the peer's own, matched exactly, so a consent
 * of another matched no one (until the fortieth session "block
 * nowhere.example" was "Blocked" and stored).  A store error in a look-up
 * is SUBJECT_FAILED (until the forty-first session a ghost's was "Whom?",
 * a peer domain's taken). */
static enum subject subject_of(struct matrix *m, PGconn *c, const char *who, char *kind, char *subject,
			       size_t slen)
{
	struct mimi_uri u;
	cw_errmsg e;
	char typed[MIMI_URI_MAX + 1];
	if ((size_t)snprintf(typed, sizeof(typed), "%s", who) < sizeof(typed)) {
		mimi_addr_fold(typed);
		if (strncmp(typed, "mimi://", 7) != 0 && !strpbrk(typed, "@:/"))
			addr_fold_lower(typed, NULL); /* a domain typed alone */
		who = typed;
	}
	if (mimi_uri_parse(who, &u, &e) == CW_OK && u.kind == MIMI_USER) {
		strcpy(kind, "user");
		snprintf(subject, slen, "%s", who);
		return policy_consent_subject_ours(m->app, "user", who) ? SUBJECT_TAKEN : peer_domain(c, u.domain);
	}
	char net[64], local[MX_ID_MAX + 1];
	if (mx_ghost_parse(m->cfg->mx_user_prefix, mx_server_name(m->cfg), who, net, sizeof(net), local, sizeof(local))) {
		const char *params[] = { net, local };
		PGresult *r = PQexecParams(c, "SELECT 'mimi://' || domain || '/u/' || $2 FROM peers WHERE name = $1", 2,
					   NULL, params, NULL, NULL, 0);
		enum subject of = SUBJECT_NONE;
		if (store_check(c, r, PGRES_TUPLES_OK, &e) != CW_OK) {
			LOG_KV(CW_LOG_WARN, "a bot command failed", "detail", e.msg);
			return SUBJECT_FAILED;
		}
		/* The ghost's name holds what no address may ('=40' is an '@',
		 * a '/' stands for itself): an address of nobody, "Whom?" (until
		 * the forty-seventh session "block @_cw_gk_wal=40ly:..." stored
		 * a consent about mimi://wa.example/u/wal@ly, and said
		 * "Blocked"). */
		if (PQntuples(r) == 1 && mimi_uri_parse(PQgetvalue(r, 0, 0), &u, &e) == CW_OK && u.kind == MIMI_USER) {
			strcpy(kind, "user");
			snprintf(subject, slen, "%s", PQgetvalue(r, 0, 0));
			of = SUBJECT_TAKEN;
		}
		PQclear(r);
		return of;
	}
	if (mimi_domain_check(who, strlen(who), &e) != CW_OK)
		return SUBJECT_NONE;
	strcpy(kind, "domain");
	snprintf(subject, slen, "%s", who);
	return policy_consent_subject_ours(m->app, "domain", who) ? SUBJECT_TAKEN : peer_domain(c, who);
}

/* The address (mimi://<server.domain>/u/<localpart>) of a Matrix id of
 * this server into uri, parsed into u.  False when the id is not one of
 * this server's, or makes no user address. */
static bool local_uri(const struct matrix *m, const char *mxid, char *uri, size_t urilen, struct mimi_uri *u)
{
	char localpart[MX_ID_MAX + 1], server[MX_ID_MAX + 1];
	cw_errmsg e;
	if (!mx_user_id_parse(mxid, localpart, sizeof(localpart), server, sizeof(server)) ||
	    strcmp(server, mx_server_name(m->cfg)) != 0)
		return false;
	snprintf(uri, urilen, "mimi://%s/u/%s", m->cfg->domain ? m->cfg->domain : "", localpart);
	return mimi_uri_parse(uri, u, &e) == CW_OK && u->kind == MIMI_USER;
}

/* The local user's identity id (made if new), from a Matrix id of this
 * server, bound to it.  False when the id is not one of this provider's
 * users (or the database did not take the row or its binding).  In one
 * transaction (the caller's, or its own), so that identity_id's lock on
 * the row holds until the binding is written: from then on the binding
 * keeps her from the retention sweep, which forgets a local identity
 * nothing refers to.  Until the forty-sixth session the lock ended with
 * identity_id's statement, and a sweep deleting the row before the
 * binding's statement left her an id of no row (the binding's failure
 * was not looked at): her management room, her opt-in, were refused by
 * their foreign keys. */
static bool local_identity(struct matrix *m, PGconn *c, const char *mxid, char *id, size_t idlen, char *uri,
			   size_t urilen)
{
	struct mimi_uri u;
	cw_errmsg e;
	if (!local_uri(m, mxid, uri, urilen, &u))
		return false;
	bool own = PQtransactionStatus(c) == PQTRANS_IDLE;
	cw_err rc = own ? store_exec(c, "BEGIN", &e) : CW_OK;
	if (!rc)
		rc = identity_id(c, &u, true, "matrix", NULL, id, idlen, &e);
	const char *params[] = { id, mxid };
	if (!rc)
		rc = store_command(c, "INSERT INTO identity_bindings (identity_id, network, native_id) VALUES "
				      "($1::bigint, 'matrix', $2) ON CONFLICT DO NOTHING", 2, params, &e);
	if (own)
		rc = store_end(c, rc, &e);
	if (rc)
		LOG_KV_LIMITED(CW_LOG_WARN, "a local Matrix user's identity not stored", "user", mxid, "detail", e.msg);
	return rc == CW_OK;
}

/* A command's answer, sent with the transaction id made from the command's
 * event (inbox, below): a command run again after a crash between its
 * effect and its inbox row's mark is answered once, the homeserver
 * answering the repeated txnId with its first event.  One the homeserver
 * did not take for now is queued (say_later) with the same transaction
 * id (since the thirty-second session; before, the row's own: a command
 * run again after a crash before its mark was answered twice). */
static int hers_alone(struct matrix *m, PGconn *c, const char *room, const char *txn);

static void answer(struct matrix *m, PGconn *c, const char *room, const char *txn, const char *text)
{
	int alone = hers_alone(m, c, room, txn);
	if (alone == 1) {
		say_as(m, c, room, NULL, text, txn);
	} else if (alone == 0) {
		LOG_KV_LIMITED(CW_LOG_INFO, "a command's answer is not said: the room is no management room now",
			       "room", room);
	} else if (alone == -2) {
		/* not known for now: queued, looked at again when sent
		 * (notices) */
		queue_word(m, c, room, NULL, text, txn, false, 2000L);
	}
}

/* The user's pending requests, decisions, opt-ins and the remote users
 * who blocked her (POLICY_USER_SUMMARY_SQL, the XMPP component's list's
 * too).  The lines that do not fit one notice are counted at its end
 * instead of left out in silence (until the thirty-eighth session they
 * were).  At most POLICY_USER_SUMMARY_ROWS + 1 lines are read. */
static void cmd_list(struct matrix *m, PGconn *c, const char *room, const char *txn, const char *local_id)
{
	const char *params[] = { local_id, POLICY_USER_SUMMARY_LIMIT };
	char text[4000] = "";
	size_t n = 0;
	long more = 0;
	PGresult *r = PQexecParams(c, POLICY_USER_SUMMARY_SQL, 2, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		PQclear(r);
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot read what list shows", "detail", PQerrorMessage(c));
		answer(m, c, room, txn, "That did not work; try again in a moment.");
		return;
	}
	int rows = PQntuples(r);
	for (int i = 0; i < rows; i++) {
		if (more || (size_t)PQgetlength(r, i, 0) + n + 100 >= sizeof(text)) {
			more++;
			continue;
		}
		n += (size_t)snprintf(text + n, sizeof(text) - n, "%s%s", n ? "\n" : "", PQgetvalue(r, i, 0));
	}
	PQclear(r);
	if (more)
		snprintf(text + n, sizeof(text) - n, "\n... and %s%ld more not shown here (ask the operator for all).",
			 rows > POLICY_USER_SUMMARY_ROWS ? "at least " : "", more);
	answer(m, c, room, txn, n || more ? text : "Nothing yet: no requests, no decisions.");
}

/* Whether the remote user subject (a mimi:// address) blocked the local
 * user local_id (the last lines of POLICY_USER_SUMMARY_SQL). */
static bool blocked_by(PGconn *c, const char *local_id, const char *subject)
{
	const char *params[] = { local_id, subject };
	PGresult *r = PQexecParams(c, "SELECT 1 FROM blocks b JOIN identities i ON i.id = b.blocker_id "
				      "AND NOT i.is_local WHERE b.blocked_id = $1::bigint AND i.uri = $2",
				   2, NULL, params, NULL, NULL, 0);
	bool yes = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0;
	PQclear(r);
	return yes;
}

/* Queues a notice on c (in its transaction, if one is open): the bot's
 * thread sends it (notices). */
static cw_err notice_queue(PGconn *c, const char *room, const char *body, const char *event_id, cw_errmsg *e)
{
	const char *p[] = { room, body, event_id };
	cw_err rc = store_command(c, "INSERT INTO matrix_notices (room_id, body, event_id) VALUES ($1, $2, $3) "
				     "ON CONFLICT (event_id) DO NOTHING", 3, p, e);
	return rc ? rc : store_command(c, "NOTIFY causeway_matrix_bot", 0, NULL, e);
}

/* Marks the bot's inbox row id handled (see inbox). */
static cw_err inbox_handled(PGconn *c, const char *id, cw_errmsg *e)
{
	const char *p[] = { id };
	return store_command(c, "UPDATE matrix_bot_inbox SET handled_at = now(), event = '{}', command_allowed = NULL, "
			     "change_allowed = NULL WHERE id = $1::bigint", 1, p, e);
}

/* policy.user_updates_per_minute (policy_user_update_allowed): whether
 * sender may make one more change (accept, block, opt-in, opt-out, report)
 * now; the bucket is her localpart's, shared with the XMPP component's
 * commands.  The first refusal in a minute is answered, the others are not:
 * a flood of commands must not become a flood of notices.  A refused
 * change takes no token of this bucket and keeps the one of her commands
 * bucket it took first (command_allowed), as the XMPP component's
 * commands do: it was read, its party looked up (a query, a homeserver's
 * answer for a reply) and the first refusal answered, which is what that
 * bucket bounds; given back, a user past her changes' limit would have the
 * bot look up a party for each message she sent, as fast as she sent them
 * (test_a_change_refused_by_her_changes_limit_counts_as_a_command). */
/* The buckets' answers to a command's first run (command_allowed,
 * change_allowed), kept for its runs again: a command whose inbox row's
 * handled mark was lost (its statement failed, or skipped, or the process
 * stopped between the command's effect and the mark) runs again from the
 * next look, answered once (its answer's transaction id is its event's),
 * and until the sixtieth session took a second token of her commands
 * bucket (and of her changes', for a change) at each run: 25 commands run
 * twice took 50 tokens of the 31 a minute, and her next command was
 * refused, unanswered
 * (test_a_command_run_again_after_its_handled_mark_was_lost_takes_one_token).
 * A run again takes the first run's answers, so that it is neither
 * charged again nor let through where the first was refused.  The note
 * is written to the command's inbox row (its command_allowed and
 * change_allowed, schema/056), and comes back with the row at its run
 * again (BOT_INBOX), whichever process runs it; the mark clears it
 * (inbox_handled: a handled row never runs again).  The commands
 * bucket's answer, and a change refused, are noted before anything else
 * is done (command_run_note, a statement of its own); a change allowed
 * is noted inside its effect's transaction, right after its BEGIN
 * (change_noted), so that the note is stored if and only if the change
 * is: a change that failed (its transaction rolled back) leaves the row's
 * change_allowed 0, and its run again takes a token of its own, as its
 * token was given back (change_back; kept, when the connection was lost
 * and whether the change was stored is not known, and then the run again
 * in this process takes none, until txid_status, asked once connected
 * again, says the change was rolled back: changes_resolved), and the
 * process stopped between
 * the change's COMMIT and the handled mark leaves 1, the run again free.
 * Until the sixty-first session it was in memory only, for the last
 * COMMAND_RUNS commands, and a restart, or the bot's lock taken by
 * another process, lost it: a change refused as too many was carried
 * out by its run after the restart, and a change allowed took a token of
 * the new process's bucket, the user's next change refused
 * (test_a_change_refused_before_a_restart_stays_refused_after_it,
 * test_a_change_run_again_after_a_restart_takes_no_second_token).  The
 * note in memory stays, for the last COMMAND_RUNS commands, for a run
 * again in the same process whose note's statement failed (the database
 * away a moment): it is taken first, but for a change the row says was
 * stored (command_run_of).  In the helper's first version of the
 * sixty-first session the change's note was written before the change,
 * on its own, and a failed change wrote a second note (0) from
 * change_back: a failure is mostly the database away, which took that
 * second write too, and the row kept 1, so that the run again after a
 * restart took no token and carried the change out for free (a review's
 * finding;
 * test_a_change_that_failed_before_a_restart_is_charged_at_its_run_again). */
#define COMMAND_RUNS 64

struct command_run {
	long long row;      /* its inbox row's id; 0: none */
	bool allowed;       /* command_allowed's answer */
	signed char change; /* change_allowed's: 1 allowed, -1 refused, 0 not asked (or its token given back) */
	bool took;          /* this run took change's token (not a run again's answer): change_back's to give */
	bool unsure;        /* its change's COMMIT answer lost, its token kept: changes_resolved's to ask */
	long long xid;      /* its change's transaction (change_noted): 0 not known */
	char who[MX_ID_MAX + 1]; /* unsure: the localpart whose token that is */
};

struct command_runs {
	int next; /* the slot the next first run takes, the oldest */
	struct command_run run[COMMAND_RUNS];
};

/* The note of the command of inbox row inbox_id: its first run's (*again),
 * from memory or, failing that, from the row (stored: its note as
 * BOT_INBOX read it, .row 0 for none), or, for a first run, a note cleared
 * for it.  A change the row says was allowed (change_allowed 1) is
 * taken from the row over memory: the row's 1 is written by the change's
 * own transaction (change_noted), the truth of whether it was stored
 * (written by another process that held the bot's lock, or by this one
 * before a restart of the bot's thread; a COMMIT whose answer was lost
 * keeps its token and says 1 in memory too, change_back).  Memory is
 * taken otherwise: its -1 or its commands' answer may be one whose
 * statement failed (command_run_note), the row's then 0 or NULL. */
static struct command_run *command_run_of(struct command_runs *runs, const char *inbox_id,
					  const struct command_run *stored, bool *again)
{
	long long row = atoll(inbox_id);
	for (int k = 0; k < COMMAND_RUNS && row > 0; k++)
		if (runs->run[k].row == row) {
			*again = true;
			if (stored->row == row && stored->change > 0) {
				runs->run[k].change = stored->change;
				/* the row's 1 is the change's own transaction's: committed,
				 * its kept token spent (changes_resolved's answer, read here) */
				runs->run[k].unsure = false;
			}
			return &runs->run[k];
		}
	struct command_run *run = &runs->run[runs->next];
	runs->next = (runs->next + 1) % COMMAND_RUNS;
	*again = row > 0 && stored->row == row;
	*run = *again ? *stored : (struct command_run){ .row = row };
	run->took = false; /* a token of another run's (or process's) */
	return run;
}

/* The note of run written to its inbox row (struct command_runs). */
static cw_err command_run_store(PGconn *c, const struct command_run *run, cw_errmsg *e)
{
	char id[24], change[8];
	snprintf(id, sizeof(id), "%lld", run->row);
	snprintf(change, sizeof(change), "%d", run->change);
	const char *p[] = { id, run->allowed ? "t" : "f", change };
	if (run->row <= 0)
		return CW_OK;
	return store_command(c, "UPDATE matrix_bot_inbox SET command_allowed = $2::boolean, change_allowed = $3::smallint "
			     "WHERE id = $1::bigint", 3, p, e);
}

/* The note of run, a statement of its own, before what it allowed (a
 * command) or refused is done.  Not written: logged; a run again in this
 * process has the note in memory, one after a restart asks her buckets
 * again, as before the sixty-first session: a command takes a token of
 * her commands bucket again, a change refused as too many may be let
 * through. */
static void command_run_note(PGconn *c, const struct command_run *run)
{
	cw_errmsg e;
	if (command_run_store(c, run, &e)) {
		char id[24];
		snprintf(id, sizeof(id), "%lld", run->row);
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot note a command's run: a run again after a restart asks her rate "
			       "limits again", "inbox_row", id, "detail", e.msg);
	}
}

/* The note of a change allowed (run->change 1), written inside the
 * change's transaction, after its BEGIN: stored with the change or not
 * at all (struct command_runs).  Its failure is the change's. */
static cw_err change_noted(PGconn *c, struct command_run *run, cw_errmsg *e)
{
	/* Its transaction's id too, asked of txid_status should the answer
	 * of its COMMIT be lost (changes_resolved). */
	char id[24], change[8];
	snprintf(id, sizeof(id), "%lld", run->row);
	snprintf(change, sizeof(change), "%d", run->change);
	const char *p[] = { id, run->allowed ? "t" : "f", change };
	run->xid = 0;
	if (run->row <= 0)
		return CW_OK;
	PGresult *r = PQexecParams(c, "UPDATE matrix_bot_inbox SET command_allowed = $2::boolean, change_allowed = "
				      "$3::smallint WHERE id = $1::bigint RETURNING txid_current()",
				   3, NULL, p, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc; /* r cleared by store_check (until the sixty-second session's review, a second time here) */
	if (PQntuples(r) == 1)
		run->xid = atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
	return CW_OK;
}

static bool change_allowed(struct matrix *m, PGconn *c, const char *room, const char *txn, const char *sender,
			   struct command_run *run)
{
	if (run->change) {
		/* its first run's token, spent on what it stored; or kept for it
		 * (change_back's unsure, the first's fate not known, the row not
		 * saying stored: command_run_of), which this run then owns, so
		 * that its own failure gives it back or, its own answer lost,
		 * asks txid_status of its own transaction.  Until the
		 * sixty-second session's review such a run took it as spent,
		 * and lost its own answer with nothing left to ask: kept for
		 * good, even where both were rolled back.
		 *
		 * The row this run read is the first run's last word, never a
		 * view taken while the first's COMMIT still ran on the server
		 * (a slow fsync, a synchronous standby's wait, the client's side
		 * of the connection gone): the bot's lock (bot_lock) is a
		 * session lock of the connection the change ran on, taken anew
		 * after a reconnect (mine false), and the server frees it only
		 * when that connection's backend ends, after its transaction
		 * did; no inbox is read, here or in another process, before.  So
		 * a run again that owns a kept token follows a first run rolled
		 * back (one stored leaves the row's 1, which command_run_of
		 * takes), and giving it back at its own failure is right.  The
		 * sixty-second session's review feared the contrary (a run again
		 * reading the row before the first COMMIT ended, failing with its
		 * connection intact, and giving back a stored change's token);
		 * the sixty-third session found the lock closes it
		 * (test_a_lost_commit_still_running_holds_the_run_again_until_it_ends:
		 * txid_status says "in progress" round after round, and nothing
		 * runs until the COMMIT ends), and added no check of its own.  It
		 * holds while the changes run on the lock's connection and the
		 * lock is a session lock: a change moved to another connection,
		 * or a transaction-level lock, opens the race again (and the
		 * note's UPDATE would then need "AND change_allowed IS DISTINCT
		 * FROM 1", which waits for the first's row and reads what it
		 * left). */
		run->took = run->unsure;
		run->unsure = false;
		return run->change > 0; /* a run again: its first run's answer (struct command_runs) */
	}
	char localpart[MX_ID_MAX + 1], server[MX_ID_MAX + 1];
	bool notice = false;
	run->change = 1;
	run->took = true;
	/* allowed: noted inside the change's transaction (change_noted) */
	if (!mx_user_id_parse(sender, localpart, sizeof(localpart), server, sizeof(server)) ||
	    policy_user_update_allowed(m->app->policy, m->app->limits, localpart, &notice))
		return true; /* not parsed: not a local user, who has no command (local_identity) */
	run->change = -1;
	run->took = false;
	command_run_note(c, run);
	if (notice)
		answer(m, c, room, txn, "You made too many changes in a short time: this command was not carried out, nor "
				     "are the next ones for a minute, and I will not say so again. Try again in a minute.");
	return false;
}

/* policy_user_command_allowed: whether sender may give the bot one more
 * command now (any: list, help, an image, what it does not understand),
 * before anything of it is read or answered; her localpart's bucket, shared
 * with the XMPP component's commands.  The first refusal in a minute is
 * answered, the others are not.  Until the fifty-second session only the
 * changes were limited (change_allowed): each list, help or unknown word
 * was a notice (and a list a query) as fast as she could send them. */
static bool command_allowed(struct matrix *m, PGconn *c, const char *room, const char *txn, const char *sender,
			    struct command_run *run, bool again)
{
	if (again)
		return run->allowed; /* its first run's answer (struct command_runs) */
	char localpart[MX_ID_MAX + 1], server[MX_ID_MAX + 1];
	bool notice = false;
	run->allowed = true;
	if (!mx_user_id_parse(sender, localpart, sizeof(localpart), server, sizeof(server)) ||
	    policy_user_command_allowed(m->app->policy, m->app->limits, localpart, &notice)) {
		command_run_note(c, run);
		return true; /* not parsed: not a local user, who has no command (local_identity) */
	}
	run->allowed = false;
	command_run_note(c, run);
	if (notice)
		answer(m, c, room, txn, "Slow down: you sent me too many commands in a short time. Those sent too "
				     "fast are neither carried out nor answered, and I will not say so again for a "
				     "minute. Wait a moment before the next one.");
	return false;
}

/* The token change_allowed took, given back: the command changed nothing
 * (its statements failed), as the XMPP component's commands give theirs
 * back (xmpp_cmd.c, token_back).  Until the forty-sixth session a failure
 * kept it: a few while the database was away, and her real change was
 * refused as too many.  commit_sent: the failure is store_end's COMMIT's
 * (its rc was CW_OK before store_end), whose answer, the connection lost,
 * does not say whether it was stored; a failure before it (BEGIN, the
 * note, the change's statements, its audit record) was rolled back,
 * whatever became of the connection. */
static void change_back(struct matrix *m, PGconn *c, const char *sender, struct command_run *run, bool commit_sent)
{
	char localpart[MX_ID_MAX + 1], server[MX_ID_MAX + 1];
	/* A run again that failed took nothing: its first run's statements
	 * were stored, and their token stays spent (a review's finding in the
	 * sixtieth session: it was given back, the change then free). */
	if (!run->took)
		return;
	run->took = false;
	/* The connection lost: whether the change was stored is not known (a
	 * COMMIT whose answer was lost, store_end's CW_EUNAVAIL).  The token
	 * is kept and the note in memory says allowed: a run again here takes
	 * no other, and pays with this one whether the row then says stored
	 * (1) or rolled back.  Until the sixty-first session's second review
	 * it was given back, and a change stored with its answer lost was
	 * carried out for nothing (the row's 1 believed at the run again).
	 * Since the sixty-second session the database is asked, once
	 * connected again, whether the change's transaction was committed
	 * (changes_resolved): rolled back, the token is given back then.
	 * The connection lost before the COMMIT was sent (a statement's
	 * answer lost, the server then rolling the transaction back), the
	 * token is given back at once: until the sixty-second session's
	 * review it was kept too, and for good (no transaction id known, or
	 * txid_status not asked). */
	if (commit_sent && c && PQstatus(c) != CONNECTION_OK) {
		run->change = 1;
		if (run->xid && mx_user_id_parse(sender, run->who, sizeof(run->who), server, sizeof(server)))
			run->unsure = true; /* asked once connected again (changes_resolved) */
		return;
	}
	run->change = 0; /* a run again takes its own: the row's note, rolled back with the change, says 0 too */
	if (mx_user_id_parse(sender, localpart, sizeof(localpart), server, sizeof(server)))
		policy_user_update_give(m->app->policy, m->app->limits, localpart);
}

/* The changes whose COMMIT's answer was lost (change_back's unsure),
 * asked of the database once connected again: txid_status says whether
 * each was committed.  Rolled back, its token is given back and the note
 * in memory says none was taken (a run again here takes its own, as the
 * row's 0 says); committed, the token stays spent; still in progress (the
 * server has not yet seen the connection end), asked again at the next
 * round; no longer known (older than the server keeps), kept.  Until the
 * sixty-second session the token was kept in every case, and when the
 * bot's lock went to another process meanwhile (it goes with the lost
 * connection) and the change had been rolled back, the other process ran
 * it again and took a token of its own bucket: the change charged twice,
 * once in each process, and this process's bucket, which her XMPP
 * commands share and her bot commands use again once the lock comes
 * back, one token short for a minute
 * (test_a_change_rolled_back_with_its_answer_lost_while_the_lock_moved_is_given_back). */
static void changes_resolved(struct matrix *m, PGconn *c, struct command_runs *runs)
{
	for (int k = 0; k < COMMAND_RUNS; k++) {
		struct command_run *run = &runs->run[k];
		if (!run->unsure)
			continue;
		char xid[24];
		snprintf(xid, sizeof(xid), "%lld", run->xid);
		const char *p[] = { xid };
		PGresult *r = PQexecParams(c, "SELECT txid_status($1::bigint)", 1, NULL, p, NULL, NULL, 0);
		bool asked = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;
		if (!asked && PQstatus(c) != CONNECTION_OK) {
			PQclear(r);
			return; /* the next round, connected again, asks again */
		}
		/* Refused for good (an id "in the future" after a failover or a
		 * restore; until the sixty-second session's review any failure
		 * asked again at the next round, the same failing statement every
		 * round, some 500 ms, for ever, and the other slots unasked), or
		 * NULL: older than the server keeps the transactions' fates (its
		 * commit log truncated; until the sixty-third session kept in
		 * silence): the token kept, and said so. */
		const char *status = !asked ? NULL : PQgetisnull(r, 0, 0) ? "" : PQgetvalue(r, 0, 0);
		if (!status || strcmp(status, "in progress") != 0) {
			run->unsure = false;
			if (status && strcmp(status, "aborted") == 0) {
				run->change = 0;
				policy_user_update_give(m->app->policy, m->app->limits, run->who);
				LOG_KV(CW_LOG_INFO, "a change whose answer was lost was rolled back: its token given back",
				       "xid", xid);
			} else if (!status || !status[0]) {
				LOG_KV_LIMITED(CW_LOG_WARN, "cannot ask whether a change whose answer was lost was stored: its "
					       "token kept", "xid", xid, "detail",
					       status ? "its transaction is no longer known" : PQresultErrorMessage(r));
			}
		}
		PQclear(r);
	}
}

/* Answers that who, the party of an accept, block or report, is none of
 * the remote parties the commands are about: a Matrix user (of this
 * server or another, mentioned or typed), one of this provider's own
 * users (a mimi:// address of one of its domains) or, domain, one of its
 * own domains (policy_consent_subject_ours).  The policy asks a user's
 * consents of remote senders only, and what reaches her from a Matrix
 * user or another local user passes no decision of the gateway: such a
 * consent would be stored and match nothing (until the thirty-fourth
 * session it was, "Accepted").  The answer is the same whether such a
 * user exists or not. */
static void not_remote(struct matrix *m, PGconn *c, const char *room, const char *txn, const char *who,
		       bool domain, bool report)
{
	char reply[1100], shown[CW_UTF8_ECHO_MAX * 4 + 4];
	cw_utf8_echo(who, shown, sizeof(shown)); /* what she typed, quoted (cw_utf8_echo) */
	who = shown;
	if (report)
		snprintf(reply, sizeof(reply), "%s is not someone from another network nor a user of this service: "
			 "what a Matrix user of another server sends you does not pass the gateway, and its operator "
			 "can do nothing about it. Use your client's ignore and report.",
			 who);
	else if (domain)
		snprintf(reply, sizeof(reply), "%s is a domain of this service, not another network: accept and block "
			 "are for the people who reach you through the gateway, and what users here send one another "
			 "does not pass it. For a user of your own server, use your client's ignore and report.",
			 who);
	else
		snprintf(reply, sizeof(reply), "%s is not someone from another network: accept and block are for the "
			 "people who reach you through the gateway (an address such as mimi://..., a bridged user's "
			 "Matrix id, or a domain), and what you exchange with a user of your own server or of Matrix "
			 "does not pass it. For them, use your client's ignore and report.",
			 who);
	answer(m, c, room, txn, reply);
}

/* The command in content (its body) of sender in room, from the bot's
 * inbox row inbox_id. */
/* An accept of a whole domain lets its users write to the user only
 * where she is opted in to its network (policy: user_not_opted_in; with
 * no opt-in of hers for it, policy.optin_default, and only those she
 * accepted one by one and the conversations she wrote in pass): into
 * out, what the answer adds when she is not, naming the network's
 * opt-in, so that she does not take the accept for one; "" when she is,
 * or when the look-up failed (the accept stands either way): as
 * policy_live_optin_state finds her.  Until the forty-third session
 * the answer was "Accepted wa.example" alone. */
static void domain_optin_hint(struct matrix *m, PGconn *c, const char *local_id, const char *domain, char *out,
			      size_t len)
{
	out[0] = '\0';
	char peer[PEER_NAME_MAX], net[PEER_NAME_MAX + 8];
	cw_errmsg e;
	if (policy_peer_of_domain(c, domain, peer, sizeof(peer), &e) != CW_OK || !peer[0])
		return;
	snprintf(net, sizeof(net), "peer:%s", peer);
	int state;
	if (policy_live_optin_state(m->app->policy, c, local_id, net, &state, &e) != CW_OK)
		return;
	if (state == 0)
		snprintf(out, len, " You are not opted in to %s, though: its users reach you only once you also "
				   "send \"opt-in %s\" (until then only those you accepted one by one, and the "
				   "conversations you wrote in, do).", net, net);
	else if (state < 0)
		snprintf(out, len, " You opted out of %s, though: nothing from it reaches you until you also send "
				   "\"opt-in %s\".", net, net);
}

static json_t *room_get(struct matrix *m, const char *room, const char *what, const char *user, const char *query);

/* The party of the consent request whose notice in room is the event
 * event_id, into party (len bytes, ""; left so when it is none): the event as
 * the homeserver gives it to the bot, said by the bot, whose text names
 * the request's party (mx_bot_request_party).  The reply's own quote of
 * it (its fallback) is not read: the user's client writes it, and the
 * event's sender and text are the homeserver's word.  The party is then
 * taken as if typed, checked as any. */
static void request_replied(struct matrix *m, const char *room, const char *event_id, char *party, size_t len)
{
	char *id = curl_easy_escape(NULL, event_id, 0), what[3 * MX_BOT_EVENT_ID_MAX + 16];
	if (!id)
		return;
	snprintf(what, sizeof(what), "event/%s", id);
	curl_free(id);
	json_t *ev = room_get(m, room, what, NULL, NULL);
	const char *sender = json_string_value(json_object_get(ev, "sender"));
	const char *type = json_string_value(json_object_get(ev, "type"));
	const char *body = json_string_value(json_object_get(json_object_get(ev, "content"), "body"));
	if (sender && strcmp(sender, m->bot) == 0 && type && strcmp(type, "m.room.message") == 0 && body)
		mx_bot_request_party(body, party, len); /* else party stays "" */
	json_decref(ev);
}

/* What she typed, as an answer quotes it (cw_utf8_echo): a control or a
 * bidirectional override turned the bot's words round in her room until
 * the fifty-second session. */
static const char *echo(const char *typed, char *out, size_t len)
{
	cw_utf8_echo(typed, out, len);
	return out;
}

static void command(struct matrix *m, PGconn *c, const char *room, const char *txn, const char *sender,
		    const json_t *content, const char *inbox_id, const struct command_run *stored,
		    struct command_runs *runs)
{
	/* An edit of a command (m.replace) is the command as edited, whose
	 * answer is the edit's own (its event's transaction id); a reply may
	 * start with the quote of what it answers; the party may be picked
	 * (mx_cmd.h). */
	const struct mx_bot_names names = { .bot = m->bot, .server = mx_server_name(m->cfg),
					    .prefix = m->cfg->mx_user_prefix };
	struct mx_bot_cmd cmd;
	if (!mx_bot_parse(content, sender, &names, &cmd))
		return;
	bool again;
	struct command_run *run = command_run_of(runs, inbox_id, stored, &again);
	if (!command_allowed(m, c, room, txn, sender, run, again))
		return;
	/* An image, a file, an emote...: no command, one line (not the help,
	 * which an image got until the forty-seventh session). */
	if (!cmd.text) {
		answer(m, c, room, txn, "I read only text messages: write a command, or \"help\" for the list.");
		return;
	}
	/* Her identity not read or stored (the database failed: a sender
	 * here is one of this server's users, bot_wants): said, as any
	 * failed command is (until the forty-seventh session the command was
	 * marked done with no answer at all). */
	char local_id[24], uri[600];
	if (!local_identity(m, c, sender, local_id, sizeof(local_id), uri, sizeof(uri))) {
		if (PQstatus(c) == CONNECTION_OK)
			answer(m, c, room, txn, "That did not work; try again in a moment.");
		return;
	}
	const char *verb = cmd.verb, *arg = cmd.party;
	bool report = strcmp(verb, "report") == 0;
	/* "accept" or "block" alone, in a reply to a request's notice: its
	 * party (request_replied; until the forty-seventh session "Whom?"). */
	if (!report && cmd.kind == MX_BOT_PARTY_SUBJECT && !cmd.party[0] && cmd.reply_to[0] &&
	    (strcmp(verb, "accept") == 0 || strcmp(verb, "block") == 0))
		request_replied(m, room, cmd.reply_to, cmd.party, sizeof(cmd.party));
	bool party_verb = strcmp(verb, "accept") == 0 || strcmp(verb, "block") == 0 || report;
	/* Several users mentioned: the command is not carried out for one
	 * of them. */
	if (cmd.kind == MX_BOT_PARTY_SEVERAL) {
		answer(m, c, room, txn, "Whom? Your message mentions more than one person: name one at a time.");
		return;
	}
	cw_errmsg e;
	char reply[1200];
	/* A Matrix user, typed or mentioned, or an address or domain of this
	 * provider's: no party of accept and block (not_remote), refused
	 * before the change is counted.  A report may name a user of this
	 * provider's (typed as her address or as the Matrix id of a user of
	 * this server, or picked), as the admin API takes one: another member
	 * of a group writes to the user through the gateway, relayed by the
	 * bot, and the user's client can report only the bot for it (until
	 * the thirty-eighth session such a report was refused, a review's
	 * finding).  A report of a Matrix user of another server is still
	 * refused: what she sends does not pass the gateway.  A pill was
	 * read as the display name the client wrote until the thirty-fourth
	 * session ("Whom?"). */
	char kind[8], subject[700];
	char shown[CW_UTF8_ECHO_MAX * 4 + 4], shown2[CW_UTF8_ECHO_MAX * 4 + 4]; /* what she typed, quoted */
	bool found = false, local_party = false;
	/* The bot itself (its id is in the ghosts' namespace with the
	 * default names, and was looked up as a ghost's until the fortieth
	 * session: "Whom?"). */
	if (cmd.kind == MX_BOT_PARTY_BOT) {
		snprintf(reply, sizeof(reply), "%s is me, this gateway's bot, not someone from another network: %s is "
			 "for the people who reach you through the gateway (an address such as mimi://..., a bridged "
			 "user's Matrix id%s). For a problem with me, tell the operator of this service.",
			 echo(arg, shown, sizeof(shown)), verb, report ? ", or a user of this server" : ", or a domain");
		answer(m, c, room, txn, reply);
		return;
	}
	if (cmd.kind == MX_BOT_PARTY_NOT_REMOTE) {
		not_remote(m, c, room, txn, arg, false, report);
		return;
	}
	if (cmd.kind == MX_BOT_PARTY_LOCAL) {
		struct mimi_uri u;
		strcpy(kind, "user");
		found = local_party = local_uri(m, arg, subject, sizeof(subject), &u);
	} else {
		enum subject of = party_verb ? subject_of(m, c, arg, kind, subject, sizeof(subject)) : SUBJECT_NONE;
		if (of == SUBJECT_FAILED) {
			/* nothing decided, nothing stored (as a failed store of
			 * the decision below) */
			answer(m, c, room, txn, "That did not work; try again in a moment.");
			return;
		}
		bool domain = of != SUBJECT_NONE && strcmp(kind, "domain") == 0;
		if (of == SUBJECT_NO_PEER && domain && !report) {
			snprintf(reply, sizeof(reply), "%s is the domain of no network this gateway is connected to: "
				 "nobody from it can reach you here. Nothing was stored. Give a connected network's "
				 "domain, an address on one (mimi://...) or a bridged user's Matrix id.",
				 echo(subject, shown, sizeof(shown)));
			answer(m, c, room, txn, reply);
			return;
		}
		if (of == SUBJECT_NO_PEER && !domain) {
			struct mimi_uri u;
			cw_errmsg pe;
			mimi_uri_parse(subject, &u, &pe);
			snprintf(reply, sizeof(reply), "%s is nobody who can reach you here: %s is the domain of no network "
				 "this gateway is connected to. Nothing was %s. Give an address on a connected network's "
				 "domain (mimi://...) or a bridged user's Matrix id.",
				 echo(subject, shown, sizeof(shown)), echo(u.domain, shown2, sizeof(shown2)),
				 report ? "reported" : "stored");
			answer(m, c, room, txn, reply);
			return;
		}
		found = of == SUBJECT_TAKEN; /* a report of a domain of no peer: "Whom?", as of any domain */
		if (found && policy_consent_subject_ours(m->app, kind, subject)) {
			if (!report) {
				not_remote(m, c, room, txn, subject, domain, false);
				return;
			}
			local_party = strcmp(kind, "user") == 0;
		}
	}
	if (strcmp(verb, "accept") == 0 || strcmp(verb, "block") == 0) {
		if (!found) {
			answer(m, c, room, txn, "Whom? Give an address (mimi://...), a bridged user's Matrix id, or a domain.");
			return;
		}
		if (!change_allowed(m, c, room, txn, sender, run))
			return;
		struct policy_view *v = policy_live_get(m->app->policy);
		long counts[3] = { 0, 0, 0 }, decided = 0;
		bool repeat = false;
		cw_err rc = store_exec(c, "BEGIN", &e);
		if (!rc)
			rc = change_noted(c, run, &e);
		if (!rc)
			rc = policy_consent_apply(c, v, local_id, kind, subject, verb[0] == 'a' ? "allowed" : "blocked",
						  "user", counts, &decided, &repeat, &e);
		policy_view_put(v);
		/* A repeat of her decision is answered as the change, not
		 * audited again (as the admin API's and the XMPP commands') */
		if (!rc && !repeat) {
			const char *ap[] = { sender, verb[0] == 'a' ? "consent.allow" : "consent.block", subject };
			rc = store_command(c, "INSERT INTO audit_log (actor, action, subject) VALUES ('user:' || $1, $2, $3)", 3, ap,
				     &e);
		}
		bool commit_sent = !rc;
		rc = store_end(c, rc, &e);
		if (rc) {
			change_back(m, c, sender, run, commit_sent);
			answer(m, c, room, txn, "That did not work; try again in a moment.");
			LOG_KV(CW_LOG_WARN, "a bot command failed", "detail", e.msg);
			return;
		}
		/* An accept lets them write to her; their own block of her
		 * stays theirs (said, so that she does not take the accept for
		 * a way to reach them). */
		char hint[400] = "", standing[400] = "";
		if (verb[0] == 'a' && strcmp(kind, "domain") == 0)
			domain_optin_hint(m, c, local_id, subject, hint, sizeof(hint));
		/* Her block of the other kind wins (the request is 'blocked'):
		 * said, so that "accepted" is not taken for a way in. */
		if (verb[0] == 'a' && policy_allow_blocked_note(c, local_id, kind, subject, standing, sizeof(standing), &e))
			LOG_KV(CW_LOG_WARN, "cannot tell whether a block still stands after an accept", "detail", e.msg);
		if (verb[0] == 'a')
			snprintf(reply, sizeof(reply), "Accepted %s. %ld waiting message(s) released.%s%s%s", subject,
				 counts[0], standing,
				 strcmp(kind, "user") == 0 && blocked_by(c, local_id, subject)
					 ? " They blocked you, though: what you write to them is not delivered until "
					   "they lift it."
					 : "",
				 hint);
		else
			snprintf(reply, sizeof(reply), "Blocked %s. %ld waiting message(s) dropped.", subject, counts[1]);
		answer(m, c, room, txn, reply);
	} else if (strcmp(verb, "opt-in") == 0 || strcmp(verb, "opt-out") == 0) {
		if (!arg[0] || strlen(arg) > 200) {
			answer(m, c, room, txn, "Which network? For example: opt-in peer:gk");
			return;
		}
		/* A peer's network, named with or without "peer:": an opt-in for
		 * a name no sender has would be stored and never asked, and the
		 * user would believe themselves reachable.  A disabled peer is
		 * one (its rows wait for it, the operator may enable it again)
		 * though the list offers the enabled ones only: an opt-in for it
		 * is taken and the answer says nothing comes from it meanwhile
		 * (until the thirty-fourth session it said nothing of it). */
		char net[220];
		snprintf(net, sizeof(net), "%s%s", strncmp(arg, "peer:", 5) == 0 ? "" : "peer:", arg);
		const char *np[] = { net + 5 };
		PGresult *pr = PQexecParams(c, "SELECT (SELECT enabled FROM peers WHERE name = $1), "
					       "(SELECT string_agg('peer:' || name, ', ' ORDER BY name) FROM peers WHERE enabled)",
					    1, NULL, np, NULL, NULL, 0);
		/* A look-up that failed is no unknown network (until the
		 * forty-seventh session "I know no network gk. No network is
		 * connected here yet."). */
		if (store_check(c, pr, PGRES_TUPLES_OK, &e)) {
			LOG_KV(CW_LOG_WARN, "a bot command failed", "detail", e.msg);
			answer(m, c, room, txn, "That did not work; try again in a moment.");
			return;
		}
		bool known = PQntuples(pr) == 1 && !PQgetisnull(pr, 0, 0);
		bool off = known && strcmp(PQgetvalue(pr, 0, 0), "f") == 0;
		if (!known) {
			bool listed = PQntuples(pr) == 1 && !PQgetisnull(pr, 0, 1);
			snprintf(reply, sizeof(reply), "I know no network %s. %s%s", echo(arg, shown, sizeof(shown)),
				 listed ? "The networks here: " : "No network is connected here yet.",
				 listed ? PQgetvalue(pr, 0, 1) : "");
			PQclear(pr);
			answer(m, c, room, txn, reply);
			return;
		}
		PQclear(pr);
		if (!change_allowed(m, c, room, txn, sender, run))
			return;
		/* The opt-in and the policy's word of it (which sweeps her
		 * held rows and requests) together or not at all, as accept and
		 * block: until the forty-seventh session each statement was its
		 * own, and a failure of the second left the change stored,
		 * unswept, and answered "That network name is not valid." (any
		 * failure was, the name checked above). */
		const char *params[] = { local_id, net, verb[4] == 'i' ? "t" : "f" };
		cw_err rc = store_exec(c, "BEGIN", &e);
		if (!rc)
			rc = change_noted(c, run, &e);
		if (!rc)
			rc = store_command(c, "INSERT INTO user_optin (identity_id, network, opted_in, updated_by) "
					      "VALUES ($1::bigint, $2, $3::boolean, 'user') ON CONFLICT (identity_id, network) DO "
					      "UPDATE SET opted_in = excluded.opted_in, updated_by = 'user', updated_at = now()",
					   3, params, &e);
		if (!rc)
			rc = policy_notify_user(c, local_id, &e);
		bool commit_sent = !rc;
		rc = store_end(c, rc, &e);
		if (rc) {
			change_back(m, c, sender, run, commit_sent);
			LOG_KV(CW_LOG_WARN, "a bot command failed", "detail", e.msg);
			answer(m, c, room, txn, "That did not work; try again in a moment.");
			return;
		}
		snprintf(reply, sizeof(reply), "You are now opted %s for %s.%s", verb[4] == 'i' ? "in" : "out", net,
			 off && verb[4] == 'i' ? " That network is switched off for now: nothing comes from it until the "
						 "operator turns it on again." : "");
		answer(m, c, room, txn, reply);
	} else if (report) {
		if (!found || strcmp(kind, "user") != 0) {
			answer(m, c, room, txn, "Whom? Give the address (mimi://...), the bridged user's Matrix id, or the "
						"Matrix id of a user of this server.");
			return;
		}
		/* herself under any of the domains this provider's users
		 * live under (policy_same_local_user; until the thirty-ninth
		 * session only as mimi://<server.domain>/u/<her>) */
		if (local_party && policy_same_local_user(m->app, subject, uri)) {
			answer(m, c, room, txn, "That is you: name the user you report.");
			return;
		}
		/* the reason is the report's comment, shown to the operator as
		 * it is (policy_report_fields_problem; until the forty-eighth
		 * session a control character or a bidirectional override was
		 * stored, and reached the console and causewayctl) */
		if (cw_utf8_text_problem(cmd.reason, strlen(cmd.reason))) {
			answer(m, c, room, txn, "Your reason holds a control character, a bidirectional control or a "
						"noncharacter, which the operator would not see as you typed it: send the "
						"report again without it.");
			return;
		}
		if (!change_allowed(m, c, room, txn, sender, run))
			return;
		/* What he sent her goes with it (policy_report_store), the
		 * message her command replies to first. */
		const struct policy_report rep = { .reporter_kind = "local_user", .reporter = uri, .subject = subject,
						   .reason = "abuse", .comment = cmd.reason[0] ? cmd.reason : NULL,
						   .gather = true, .first_network = cmd.reply_to[0] ? "matrix" : NULL,
						   .first_kind = cmd.reply_to[0] ? "event_id" : NULL,
						   .first_native = cmd.reply_to[0] ? cmd.reply_to : NULL };
		json_t *ans = NULL;
		char said[200], with[120];
		/* The report, the command's handled mark and the answer (a
		 * notice) are kept together or not at all: a report whose
		 * answer was lost with the connection is then one report, told
		 * by its notice when it was kept, else stored and told when
		 * the command runs again after the reconnect (until the
		 * twenty-third session alice was told it could not be stored,
		 * and the rerun stored a second one).  change_noted for its
		 * transaction's id (its note the mark, in this transaction, then
		 * clears, and a report stored never runs again; rolled back, the
		 * row keeps its 0): a report whose COMMIT's answer was lost is
		 * asked of txid_status as a change (changes_resolved).  Until
		 * the sixty-second session's review it was not noted, and its
		 * token was kept for good, even when the report was rolled back
		 * and run again by another process with a token of its own. */
		cw_err rc = store_exec(c, "BEGIN", &e);
		if (!rc)
			rc = change_noted(c, run, &e);
		if (!rc)
			rc = policy_report_store(c, m->app, &rep, &ans, NULL, &e);
		if (!rc)
			rc = inbox_handled(c, inbox_id, &e);
		if (!rc) {
			policy_report_evidence_words(ans, with, sizeof(with));
			snprintf(said, sizeof(said), "Reported to the operator, %s. Thank you.", with);
			rc = notice_queue(c, room, said, NULL, &e);
		}
		json_decref(ans);
		bool commit_sent = !rc;
		if (!store_end(c, rc, &e))
			return;
		change_back(m, c, sender, run, commit_sent); /* a run again takes its own */
		if (PQstatus(c) == CONNECTION_OK) /* else the command runs again, or its notice tells */
			answer(m, c, room, txn, "The report could not be stored; try again.");
	} else if (strcmp(verb, "list") == 0) {
		cmd_list(m, c, room, txn, local_id);
	} else {
		answer(m, c, room, txn, help_text);
	}
}

/* GET /rooms/{room}/<what>?query as user (NULL: the bot): the answer, or
 * NULL (logged). */
static json_t *room_get(struct matrix *m, const char *room, const char *what, const char *user, const char *query)
{
	long status;
	json_t *answer = NULL;
	cw_errmsg e;
	if (mx_room_call(m, "GET", room, user, what, query, NULL, &status, &answer, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot read a room", "room", room, "what", what, "detail", e.msg);
		json_decref(answer);
		return NULL;
	}
	return answer;
}

/* Whether room (which ghost is in; NULL: the bot) holds, joined or
 * invited, someone other than user, the bot and ghosts: 1 yes, 0 no, -1
 * the homeserver did not answer for now (ask again later).  A refusal
 * to say counts as yes (a room is bridged only when it is known to be
 * one user's). */
static int others_in_st(struct matrix *m, const char *room, const char *ghost, const char *user, long *refused);

static int others_in(struct matrix *m, const char *room, const char *ghost, const char *user)
{
	long refused;
	return others_in_st(m, room, ghost, user, &refused);
}

/* others_in, with *refused the homeserver's status when it did not say
 * (0 when it did). */
static int others_in_st(struct matrix *m, const char *room, const char *ghost, const char *user, long *refused)
{
	long status;
	json_t *answer = NULL;
	*refused = 0;
	cw_errmsg e;
	if (mx_room_call(m, "GET", room, ghost, "members", "not_membership=leave", NULL, &status, &answer, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot read a room", "room", room, "what", "members", "detail", e.msg);
		json_decref(answer);
		*refused = status;
		return mx_for_now(status) ? -1 : 1;
	}
	int others = !json_is_array(json_object_get(answer, "chunk"));
	size_t i;
	json_t *ev;
	json_array_foreach(json_object_get(answer, "chunk"), i, ev) {
		const char *who = json_string_value(json_object_get(ev, "state_key"));
		const char *ms = json_string_value(json_object_get(json_object_get(ev, "content"), "membership"));
		if (!who || !ms || (strcmp(ms, "join") != 0 && strcmp(ms, "invite") != 0))
			continue;
		if (strcmp(who, user) != 0 && strcmp(who, m->bot) != 0 &&
		    !mx_in_ghost_namespace(m->cfg->mx_user_prefix, mx_server_name(m->cfg), who))
			others = 1;
	}
	json_decref(answer);
	return others;
}

/* An invitation of the bot by one of this provider's users: join, and
 * make the room that user's management room (unless it is bridged or
 * others are in it).  True: the homeserver did not take the join for
 * now, try again later.  retry: this invitation was tried before (its
 * inbox row's attempts).
 *
 * Someone invited into the room (or joining it) after others_in read the
 * members is an intruder the transaction path hands to the bot (matrix.c,
 * bot_wants and txn_bot_send: intruded) only when the room's row in
 * matrix_mgmt_rooms is there when it reads it; the homeserver's
 * transactions are read and written on the HTTP side while this runs on
 * the bot's thread, in no order with it, so an invitation pushed between
 * the look at the members and the commit of the row was seen by neither
 * (until the fortieth session: test_someone_invited_while_the_bot_sets_up_
 * a_management_room_ends_it).  So the members are read again once the
 * row is committed: a member event the homeserver made after that second
 * read is pushed after it, and read by a transaction that finds the row;
 * one made before it is in what the second read answers.  The first read
 * stays, so that a room found shared never takes over the user's
 * management room; one the second finds shared (or cannot read for now)
 * gives it back. */
/* The bot's words (matrix_notices) still owed to the user of a
 * management room: not yet said, not its leave and last word, the room's
 * notices and the bot's own (bot: the statement's parameter naming it).
 * The words that go with her to a new room (invited) and those done with
 * when the room is hers no more (end_mgmt_room): one filter, so that the
 * two never differ. */
#define MGMT_WORDS_OWED(bot) "done_at IS NULL AND NOT then_leave AND (sender IS NULL OR sender = " bot ")"

static bool invited(struct matrix *m, PGconn *c, const char *room, const char *sender, const char *eid,
		    bool retry)
{
	static const char others_text[] = "I take commands in a room of your own with me (open a direct room with "
					  "me there); this one is a bridged conversation, or others are in it.";
	char local_id[24], uri[600];
	if (!local_identity(m, c, sender, local_id, sizeof(local_id), uri, sizeof(uri)))
		return false;
	cw_errmsg e;
	/* An invitation of the bot is a command (command_allowed's bucket,
	 * her localpart's): each is answered (the help, or why the room is
	 * none of hers), and takes the management room from the one she had,
	 * which is told so and left.  Past her limit it is declined, and
	 * nothing said: until the fifty-second session a user who invited
	 * the bot again and again (kicking it, opening new direct rooms with
	 * it) had a join, a help and a "moved" notice for each, uncounted.
	 * A try again of the same invitation (its inbox row: the join not
	 * taken for now, the members not read, or either refused for the
	 * as_token: held_tried) is not another: its token was taken at the
	 * first try (until the fifty-third session each try took one, and an
	 * invitation the homeserver was slow to take could be declined half
	 * way; until the fifty-fourth, each run again after the as_token's
	 * refusal). */
	char localpart[MX_ID_MAX + 1], server[MX_ID_MAX + 1];
	if (!retry && mx_user_id_parse(sender, localpart, sizeof(localpart), server, sizeof(server)) &&
	    !policy_user_command_allowed(m->app->policy, m->app->limits, localpart, NULL)) {
		LOG_KV_LIMITED(CW_LOG_INFO, "an invitation of the bot past the user's commands limit is declined", "user",
			       sender);
		if (mx_room_action(m, room, NULL, "leave", &e))
			LOG_KV_LIMITED(CW_LOG_WARN, "the bot cannot decline an invitation", "room", room, "detail", e.msg);
		return false;
	}
	long status;
	if (mx_room_post(m, room, NULL, "join", json_object(), &status, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "the bot cannot join", "room", room, "detail", e.msg);
		return mx_for_now(status);
	}
	/* A management room is the user's and the bot's alone: not a
	 * bridged conversation (what the user writes there would be both a
	 * message and a command), not a room others read (consent requests
	 * say who wants to reach the user). */
	const char *bp[] = { room };
	PGresult *br = PQexecParams(c, "SELECT remote_identity_id IS NULL FROM room_bindings WHERE network = 'matrix' "
				       "AND native_id = $1", 1, NULL, bp, NULL, NULL, 0);
	bool failed = PQresultStatus(br) != PGRES_TUPLES_OK, bound = !failed && PQntuples(br) > 0;
	bool group = bound && PQgetvalue(br, 0, 0)[0] == 't'; /* a room of a group: the bot relays there */
	PQclear(br);
	int others = failed || bound ? 1 : others_in(m, room, NULL, sender);
	if (others < 0)
		return true;
	if (others) {
		char txn[48];
		txn_for(txn, sizeof(txn), "leave", eid, room);
		if (group)
			say_as(m, c, room, NULL, others_text, txn);
		else
			says_and_leaves(m, c, room, NULL, others_text, txn);
		return false;
	}
	/* A user has one management room: a new one takes over.  The old
	 * one would otherwise stay a room with the bot in it where commands
	 * get no answer at all: the bot says where it went, and leaves.
	 * The bot's words still queued for her there (a command's or a
	 * report's answer the homeserver did not take at once, an expiry:
	 * its own, or the room's notices, as end_mgmt_room hushes them) go
	 * to the new room with the move, in the same statement: once the old
	 * room is no management room, notices could no longer tell them from
	 * words of another room (hers_alone's 0), and said them there,
	 * unlooked at, to whoever is in it (until the fifty-sixth session
	 * they were, before the "moved" word and the leave queued behind
	 * them).  Due at once there: what held one back (the old room's
	 * failed sends) is not the new room's.  Their ids come back (text,
	 * NULL for none): given back to the old room if the new one is
	 * given up below.  A word whose send in the old room was left
	 * unanswered (the homeserver may have it) is said here too: a
	 * transaction id is known for one room's path (docs/matrix.md
	 * says why that is kept). */
	const char *params[] = { sender, room, local_id, m->bot };
	PGresult *r = PQexecParams(c,
		"WITH old AS (SELECT room_id FROM matrix_mgmt_rooms WHERE user_id = $1 AND room_id <> $2), "
		"up AS (INSERT INTO matrix_mgmt_rooms (user_id, room_id, identity_id) VALUES ($1, $2, $3::bigint) "
		" ON CONFLICT (user_id) DO UPDATE SET room_id = excluded.room_id), "
		"moved AS (UPDATE matrix_notices SET room_id = $2, next_at = least(next_at, now()) "
		" WHERE room_id = (SELECT room_id FROM old) "
		" AND " MGMT_WORDS_OWED("$4") " RETURNING id) "
		"SELECT room_id, (SELECT array_agg(id ORDER BY id) FROM moved)::text FROM old",
		4, NULL, params, NULL, NULL, 0);
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) {
		LOG_KV(CW_LOG_WARN, "cannot record a management room", "detail", e.msg);
		return false;
	}
	/* An end-to-end encrypted room (clients on matrix-rust-sdk, such as
	 * Element X, make every direct room so) is no management room: all
	 * the user writes there is m.room.encrypted, which the bot cannot
	 * read, and her commands would get no answer at all (until the
	 * forty-fourth session the bot said its help there, took the room,
	 * and was silent from then on).  Asked once the row is committed,
	 * as the members are: an m.room.encryption sent after this answer is
	 * pushed after the commit, and read with the row (bot_wants:
	 * encrypted).  The members first: a room someone else is in is left
	 * whatever its encryption, so that is not asked then. */
	int enc = 0;
	if ((others = others_in(m, room, NULL, sender)) != 0 || (enc = room_encrypted(m, room, NULL)) != 0) {
		/* someone came in meanwhile, or the room is encrypted (or no
		 * answer for now): the old room, if any, is hers again, else
		 * she has none.  Her words moved with the room go back with
		 * it; where the old room is not hers again they are done with,
		 * unsaid, as an ended room's are: left in this room, they
		 * would be said before the bot's leave, as words of a room
		 * that is no management room, to whoever came in.  (This
		 * statement failing leaves the room hers, and its words
		 * looked at as hers: notices ends it if someone else is in.)
		 * Whether the old room is hers again is asked once (went), for
		 * the words' three columns and the delete. */
		bool had = PQntuples(r) == 1;
		const char *gp[] = { sender, room, had ? PQgetvalue(r, 0, 0) : NULL,
				     had && !PQgetisnull(r, 0, 1) ? PQgetvalue(r, 0, 1) : NULL };
		PGresult *g = PQexecParams(c,
			"WITH back AS (UPDATE matrix_mgmt_rooms SET room_id = $3::text "
			" WHERE user_id = $1 AND room_id = $2 AND $3::text IS NOT NULL "
			" AND NOT EXISTS (SELECT 1 FROM matrix_mgmt_rooms o WHERE o.room_id = $3::text) RETURNING 1), "
			"went AS (SELECT EXISTS (SELECT 1 FROM back) AS back), "
			"words AS (UPDATE matrix_notices SET room_id = CASE WHEN went.back THEN $3::text ELSE room_id END, "
			" done_at = CASE WHEN went.back THEN done_at ELSE now() END, "
			" next_at = CASE WHEN went.back THEN next_at ELSE 'infinity' END "
			" FROM went WHERE id = ANY ($4::bigint[]) AND room_id = $2 AND done_at IS NULL) "
			"DELETE FROM matrix_mgmt_rooms WHERE user_id = $1 AND room_id = $2 "
			" AND NOT (SELECT back FROM went)",
			4, NULL, gp, NULL, NULL, 0);
		cw_err grc = store_check(c, g, PGRES_COMMAND_OK, &e);
		PQclear(r);
		if (!grc)
			PQclear(g);
		else /* the bot leaves all the same: it says nothing in a room it left */
			LOG_KV(CW_LOG_WARN, "cannot give a management room up", "room", room, "detail", e.msg);
		if (others < 0 || (others == 0 && enc < 0))
			return true;
		char txn[48];
		if (others == 0) {
			LOG_KV_LIMITED(CW_LOG_INFO, "a room opened with the bot is encrypted: the bot leaves", "room",
				       room);
			txn_for(txn, sizeof(txn), "encrypted", eid, room);
			says_and_leaves(m, c, room, NULL, mgmt_encrypted_text, txn);
			return false;
		}
		LOG_KV_LIMITED(CW_LOG_INFO, "someone came into a management room as it was set up: the bot leaves",
			       "room", room);
		txn_for(txn, sizeof(txn), "leave", eid, room);
		says_and_leaves(m, c, room, NULL, others_text, txn);
		return false;
	}
	/* What the bot shows here from now on (who wants to reach her, what
	 * she decided) is hidden from whoever comes in later: the room's
	 * history visible to its members from their join on.  The bot leaves
	 * when someone else comes in (intruded), but a room made as clients
	 * make a direct one has its history "shared", and until the
	 * forty-seventh session the newcomer read every consent request
	 * shown before.  Where the bot has not the power (a room made with
	 * private_chat: the creator's alone), the room stays as it is. */
	long hs;
	cw_errmsg he;
	if (mx_room_call(m, "PUT", room, NULL, "state/m.room.history_visibility/", NULL,
			 json_pack("{s:s}", "history_visibility", "joined"), &hs, NULL, &he))
		LOG_KV_LIMITED(CW_LOG_INFO, "the bot cannot hide a management room's history from later members",
			       "room", room, "detail", he.msg);
	char txn[48];
	txn_for(txn, sizeof(txn), "help", eid, room);
	say_as(m, c, room, NULL, help_text, txn);
	if (PQntuples(r) == 1) {
		const char *old = PQgetvalue(r, 0, 0);
		txn_for(txn, sizeof(txn), "moved", eid, old);
		says_and_leaves(m, c, old, NULL, "You opened a new room with me: I take your commands there from now on, "
						 "and leave this one.", txn);
	}
	PQclear(r);
	return false;
}

/* The bot's word to her when someone else is in her management room
 * (ended: its row gone), and its leave; eid names what it answers.  The
 * bot's words still queued for her there (a command's or a report's
 * answer the homeserver did not take at once, an expiry) were done with,
 * unsaid, as the room was ended (end_mgmt_room): once the room is no
 * management room, notices can no
 * longer tell them from a word of another room (hers_alone's 0), and
 * said them to whoever came in, before the bot's leave queued behind
 * them (until the fifty-third session's review: the fifty-second's check
 * held back only the word being sent when the intruder was found). */
static void intruder_words(struct matrix *m, PGconn *c, const char *room, const char *eid)
{
	LOG_KV_LIMITED(CW_LOG_INFO, "someone else came into a management room: the bot leaves it", "room", room);
	char txn[48];
	txn_for(txn, sizeof(txn), "intruded", eid, room);
	says_and_leaves(m, c, room, NULL, "Someone else is in this room now, and what I show here (who wants to reach "
					  "you, what you decided) is for you alone: I leave, and take your commands in "
					  "a new direct room with me, which you may open any time.", txn);
}

/* Ends management room room, its user's (owner: user is she) or not
 * (owner false: user is the newcomer, the room is another's), and the
 * bot's words still queued for her there are done with, unsaid
 * (intruder_words) in the same statement: a failure between the two left
 * the room ended and its words to be said as words of a room that is no
 * management room (until a review of the fifty-third session's change).
 * Where the room is user's no more (owner, 0: ended, left, or moved to a
 * new room of hers since the caller read whose it was) and now no one's
 * management room, its words are done with all the same: someone else is
 * in it (hers_alone_of), and they would go out as words of a room that is
 * no management room (until the fifty-sixth session they did, but for the
 * one being sent).
 * 1: the room was ended; 0: it is no such management room; -1: the
 * database did not answer (nothing changed: the caller tries again). */
static int end_mgmt_room(struct matrix *m, PGconn *c, const char *room, const char *user, bool owner)
{
	const char *p[] = { room, user, owner ? "t" : "f", m->bot };
	PGresult *r = PQexecParams(c,
		"WITH gone AS (DELETE FROM matrix_mgmt_rooms WHERE room_id = $1 AND (user_id = $2) = $3::boolean "
		"RETURNING 1), hushed AS (UPDATE matrix_notices SET done_at = now(), next_at = 'infinity' "
		"WHERE room_id = $1 AND " MGMT_WORDS_OWED("$4") " "
		"AND (EXISTS (SELECT 1 FROM gone) OR ($3::boolean "
		"AND NOT EXISTS (SELECT 1 FROM matrix_mgmt_rooms WHERE room_id = $1)))) SELECT count(*) FROM gone",
		4, NULL, p, NULL, NULL, 0);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) { /* clears r */
		LOG_KV(CW_LOG_WARN, "cannot forget a management room someone else came into", "room", room, "detail",
		       e.msg);
		return -1;
	}
	int was = atoi(PQgetvalue(r, 0, 0)) > 0;
	PQclear(r);
	return was;
}

/* Someone other than its user (who, another user of this server or of
 * another, invited or joining) in a management room: the room is hers
 * and the bot's alone (invited, others_in), for what it shows there says
 * who wants to reach her and what she decided.  It is her management
 * room no more: the bot says so, and leaves; her consent requests wait
 * for the next room she opens with it (as after her leave).  Until the
 * thirty-eighth session the bot went on showing them to whoever she
 * invited (a review's finding).  0 when room is no management room of
 * another user's (the caller goes on); -1 when the database did not
 * answer (the member event is tried again: until a review of the
 * fifty-third session's change it was taken as no management room, and
 * the newcomer stayed in one until the bot's next word there). */
static int intruded(struct matrix *m, PGconn *c, const char *room, const char *who, const char *eid)
{
	int ended = end_mgmt_room(m, c, room, who, false);
	if (ended > 0)
		intruder_words(m, c, room, eid);
	return ended;
}

/* Whether a command's answer (her consent list, whom she accepted or
 * blocked...) may be said in management room room: it is still hers, and
 * nobody but her, the bot and ghosts is in it, joined or invited.  A
 * command queued before someone else came in is answered after they are
 * in (their member event comes later in the inbox, and intruded, which
 * ends the room, runs after the command): until the fifty-second session
 * her list was shown to them (a review's finding).  Someone else in it:
 * the room is ended as intruded ends it (the bot says so, leaves, and
 * forgets it; the later member event finds no management room), and the
 * answer is not said.  A room that is hers no more (left, moved, ended
 * meanwhile: the bot has left it) gets no answer either; nor does one
 * whose owner the database did not give (logged: her command was carried
 * out, and she may ask again).  One whose members the homeserver did not
 * give for now is queued, and looked at again when sent (answer,
 * notices).
 *
 * 1: hers alone; 0: no management room (answer says nothing there; a
 * queued notice, a word of another room, is sent: notices);
 * -1: someone else was in it (ended as said, or hers no more meanwhile:
 * hers_alone_of); -2: not known for now (the database or the homeserver
 * did not answer). */
static int hers_alone_of(struct matrix *m, PGconn *c, const char *room, const char *owner, const char *txn,
			 long *unread);

static int hers_alone(struct matrix *m, PGconn *c, const char *room, const char *txn)
{
	const char *p[] = { room };
	PGresult *r = PQexecParams(c, "SELECT user_id FROM matrix_mgmt_rooms WHERE room_id = $1", 1, NULL, p, NULL,
				   NULL, 0);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "a command's answer is not said: whose room it is was not read", "room",
			       room, "detail", e.msg);
		return -2;
	}
	char owner[MX_ID_MAX + 1] = "";
	if (PQntuples(r) == 1)
		snprintf(owner, sizeof(owner), "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	return hers_alone_of(m, c, room, owner[0] ? owner : NULL, txn, NULL);
}

/* hers_alone where whose room it is was read already (owner: her Matrix
 * id; NULL: no management room, 0): by the statement that took the
 * bot's words or requests of a batch (BOT_NOTICES, BOT_REQUESTS), whose
 * send asks again whether the room is still hers (notice_still,
 * request_still).  Until the fifty-fifth session the batch's first word
 * of a room read it again here, one query more.  *unread (unless NULL):
 * the homeserver's status when its members were not read for now (a -2
 * of the homeserver's: 0 no answer, a 5xx, a 408, a 429), else -1, so
 * that requests tells the homeserver's trouble from the room's (struct
 * request_pauses). */
static int hers_alone_of(struct matrix *m, PGconn *c, const char *room, const char *owner, const char *txn,
			 long *unread)
{
	if (unread)
		*unread = -1;
	if (!owner)
		return 0; /* no log here: for notices, a word of another room, said (answer logs) */
	long refused;
	int others = others_in_st(m, room, NULL, owner, &refused);
	/* The members not given because the homeserver refuses the bot (a
	 * 403, a 404: out of the room, or refused everywhere; a 401: the
	 * as_token refused) is no one else in it: the word is sent, and
	 * its send refused as well, handled as such a refusal is (queued
	 * for the as_token, the room ended only where the homeserver takes
	 * the bot elsewhere: mgmt_room_refuses). */
	if (others == 0 || refused == 401 || refused == 403 || refused == 404)
		return 1;
	if (others < 0) {
		/* Said by what waits (its transaction id's kind): until the
		 * sixty-first session every word was "a command's answer". */
		if (strncmp(txn, "cwcmd-", 6) == 0)
			LOG_KV_LIMITED(CW_LOG_WARN, "a command's answer is not said for now: the room's members were "
				       "not read", "room", room);
		else if (strncmp(txn, "cwreq-", 6) == 0)
			LOG_KV_LIMITED(CW_LOG_WARN, "a consent request is not shown for now: the room's members were "
				       "not read", "room", room);
		else
			LOG_KV_LIMITED(CW_LOG_WARN, "a notice is not said for now: the room's members were not read",
				       "room", room);
		if (unread)
			*unread = refused;
		return -2;
	}
	int ended = end_mgmt_room(m, c, room, owner, true);
	if (ended < 0)
		return -2; /* not ended: looked at again when sent */
	if (ended)
		intruder_words(m, c, room, txn);
	else
		/* Not ended by this look: the room is hers no more since
		 * owner was read (ended, left, moved to her new room, by
		 * whatever says its own word there), and someone else is in
		 * it all the same.  The word is hers: -1, not said (a notice
		 * done with, as the room's others are, end_mgmt_room; a
		 * request kept for her next room; a command's answer
		 * dropped: she may ask again).  -2 would look again when
		 * sent, find no management room (0), and say a notice or a
		 * command's answer queued as a word of another room, to
		 * whoever came in; and a request's -2 holds the room's
		 * requests 30 s (every user's until the fifty-ninth
		 * session: struct request_pauses). */
		LOG_KV_LIMITED(CW_LOG_INFO, "a word of the bot's is not said: someone else is in a room no longer "
			       "her management room", "room", room);
	return -1;
}

/* hers_alone's answers for the rooms of one batch of the bot's words
 * (notices, requests): a room's first word of the batch asks, its others
 * take that answer.  Until the fifty-fourth session each word asked
 * again (a query and a GET /members per word: ten answers queued in one
 * room, ten reads of its members).  The first word's look is made right
 * before its send, as before; a later word of the same room is sent
 * after it as it would have been, so someone let in after that look is
 * the race the look always had (the look before the send, never after
 * it), open now until the room's last word of the batch is sent, never
 * beyond the batch (BOT_BATCH words): the next batch looks again.  Each
 * word asks the database too, at its send (notice_still, request_still):
 * a newcomer whose member event causewayd stored meanwhile is not sent
 * the room's later words (the members read once, that race is the
 * homeserver's delay in pushing the event, no longer the batch's).  A
 * "not known for now" (-2) is not kept: the next word asks again, as
 * before (a failure is no steady cost).  Whose room it is (owner: NULL
 * for none) is the batch's statement's answer (hers_alone_of), which
 * each send's look confirms.  The room strings are the batch's
 * (PQgetvalue), alive as long as it is. */
struct alone_memo {
	int n;
	const char *room[BOT_BATCH];
	int alone[BOT_BATCH];
};

static int hers_alone_once(struct matrix *m, PGconn *c, struct alone_memo *memo, const char *room,
			   const char *owner, const char *txn, long *unread)
{
	if (unread)
		*unread = -1;
	for (int k = 0; k < memo->n; k++)
		if (strcmp(memo->room[k], room) == 0)
			return memo->alone[k];
	int alone = hers_alone_of(m, c, room, owner, txn, unread);
	if (alone != -2 && memo->n < BOT_BATCH) {
		memo->room[memo->n] = room;
		memo->alone[memo->n++] = alone;
	}
	return alone;
}

/* The batch's answer for room is no longer to be taken (the bot left it
 * after a word: then_leave): a later word there asks again. */
static void hers_alone_forget(struct alone_memo *memo, const char *room)
{
	for (int k = 0; k < memo->n; k++)
		if (strcmp(memo->room[k], room) == 0) {
			memo->room[k] = memo->room[--memo->n];
			memo->alone[k] = memo->alone[memo->n];
			return;
		}
}

/* The parameters of INBOX_NEWCOMER (the bot, the namespace's start, the
 * server name: $3-$5 of BOT_NOTICE_SAY and BOT_REQUEST_SAY, $1-$3 of
 * BOT_REQUESTS), into p[0..2]; ghosts holds the namespace's start. */
static void newcomer_params(const struct matrix *m, const char **p, char *ghosts, size_t size)
{
	snprintf(ghosts, size, "@%s", m->cfg->mx_user_prefix);
	p[0] = m->bot;
	p[1] = ghosts;
	p[2] = mx_server_name(m->cfg);
}

/* Whether the bot's word of notices' row id, about to be sent, is still
 * to be said: what the database knows at its send, one statement a word
 * (hers_alone_once's look is the batch's first word's of the room, and
 * the newcomer's member event, stored by the transaction path meanwhile,
 * waits in the bot's inbox until the batch is done: until the
 * fifty-fourth session's review the room's later words of the batch
 * were said to whoever came in during its first send).  owner: the
 * batch's look found the room the management room of this user, hers
 * alone (1), or (NULL) no management room (0: a word of another room);
 * the room must still be so.  1: to be sent; 0:
 * not now (the room is no longer what the look found, someone else's
 * member event there waits for the bot, or the database did not
 * answer): tried again later, after the inbox (intruded hushes it, if
 * someone else came in); -1: done with meanwhile (end_mgmt_room), or
 * gone: nothing to send nor mark. */
static int notice_still(struct matrix *m, PGconn *c, const char *id, const char *owner)
{
	char ghosts[80];
	const char *p[5] = { id, owner };
	newcomer_params(m, p + 2, ghosts, sizeof(ghosts));
	PGresult *r = bot_look(c, BOT_NOTICE_SAY, 5, p);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) { /* clears r */
		LOG_KV_LIMITED(CW_LOG_WARN, "a notice waits: whether it is still to be said was not read", "notice", id,
			       "detail", e.msg);
		return 0;
	}
	int still = PQntuples(r) != 1 || PQgetvalue(r, 0, 0)[0] == 't' ? -1 : PQgetvalue(r, 0, 1)[0] == 't' ? 0 : 1;
	PQclear(r);
	return still;
}

/* Whether consent request id is still to be shown in room, at its send,
 * as notice_still says of a word: still pending and not shown, room
 * still her management room, no member event of someone else there
 * waiting for the bot.  1: to be shown; 0: not (the request waits for
 * her next room, or the inbox's run); -2: not known for now. */
static int request_still(struct matrix *m, PGconn *c, const char *id, const char *room)
{
	char ghosts[80];
	const char *p[5] = { id, room };
	newcomer_params(m, p + 2, ghosts, sizeof(ghosts));
	PGresult *r = bot_look(c, BOT_REQUEST_SAY, 5, p);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) { /* clears r */
		LOG_KV_LIMITED(CW_LOG_WARN, "a consent request waits: whether it is still to be shown was not read",
			       "request", id, "detail", e.msg);
		return -2;
	}
	int still = PQntuples(r) == 1;
	PQclear(r);
	return still;
}

/* The ghost says why it goes (a notice), and leaves the room; the word's
 * transaction id is made of eid (what it answers: the invitation) and
 * what (which word). */
static void ghost_says_and_leaves(struct matrix *m, PGconn *c, const char *room, const char *ghost,
				  const char *why, const char *what, const char *eid)
{
	char txn[48];
	txn_for(txn, sizeof(txn), what, eid, room);
	says_and_leaves(m, c, room, ghost, why, txn);
}

struct notice_job {
	char room[256];
	char body[4096];
	char event_id[256]; /* "": none */
};

static cw_err notice_insert(PGconn *c, void *arg, cw_errmsg *e)
{
	struct notice_job *j = arg;
	return notice_queue(c, j->room, j->body, j->event_id[0] ? j->event_id : NULL, e);
}

static void notice_inserted(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct notice_job *j = arg;
	if (rc)
		LOG_KV(CW_LOG_WARN, "a notice for a Matrix user is lost: the database did not take it", "room", j->room,
		       "detail", e ? e->msg : "");
	free(j);
}

void mx_bot_notice(struct matrix *m, const char *room, const char *text, const char *event_id)
{
	struct notice_job *j = calloc(1, sizeof(*j));
	/* The texts are a few hundred bytes (refusal(), dispatcher_dead_text). */
	if (!j || !room || !*room || !text || !*text || strlen(room) >= sizeof(j->room) ||
	    strlen(text) >= sizeof(j->body) || (event_id && strlen(event_id) >= sizeof(j->event_id))) {
		free(j);
		return;
	}
	snprintf(j->room, sizeof(j->room), "%s", room);
	snprintf(j->body, sizeof(j->body), "%s", text);
	snprintf(j->event_id, sizeof(j->event_id), "%s", event_id ? event_id : "");
	if (store_write(m->app->store, notice_insert, notice_inserted, j) != CW_OK)
		notice_inserted(j, CW_EUNAVAIL, NULL);
}

/* A Matrix user's message that became a dead letter (its peer unreachable
 * for the whole retry budget), or since the fifty-ninth session that
 * waited for its peer and was dropped by her recipient's block
 * (dispatcher_dead_untold), is told to them in its room: the notice is
 * queued in the transaction that marks the row told, so either both are
 * kept or neither (the row is told at the next look).  A conversation
 * with no room of hers any more (she left it, put the ghost out, the room
 * was upgraded) is told since the sixtieth session in her management room
 * with the bot, if she has one, saying to whom ("To mimi://...: Not
 * delivered ..."; a group's "In the group ...: "): until then it was
 * marked told and said nowhere.  With no management room either there is
 * nowhere she reads the bot: marked told unsaid (the bot opens no room
 * unasked). */
static void dead_letters(PGconn *c)
{
	cw_errmsg e;
	PGresult *r = dispatcher_dead_untold(c, "matrix", NULL, &e);
	if (!r) {
		LOG_KV(CW_LOG_WARN, "cannot look for dead letters to tell", "detail", e.msg);
		return;
	}
	cw_err rc = CW_OK;
	for (int i = 0; i < PQntuples(r) && !rc; i++) {
		const char *type = PQgetvalue(r, i, 3);
		/* a room id longer than matrix_notices takes (none is, in
		 * Matrix) is passed over: refused, it would keep every other
		 * row from being told */
		int where = PQgetisnull(r, i, 4) ? 12 : 4;
		if ((strcmp(type, "message") != 0 && strcmp(type, "edit") != 0) || PQgetisnull(r, i, where) ||
		    PQgetlength(r, i, where) > 255)
			continue;
		char text[600], said[1200];
		dispatcher_dead_text(text, sizeof(text), r, i);
		if (where == 12 && strcmp(PQgetvalue(r, i, 10), "group") == 0)
			snprintf(said, sizeof(said), "In the group %s: %s",
				 PQgetvalue(r, i, 14), text);
		else if (where == 12 && !PQgetisnull(r, i, 13))
			snprintf(said, sizeof(said), "To %s: %s", PQgetvalue(r, i, 13), text);
		else if (where == 12 && strncmp(PQgetvalue(r, i, 1), "peer:", 5) == 0)
			/* no remote member of the room left: the peer, as a dead
			 * letter names it (until a review of the sixtieth session
			 * "...: this person blocked you." named no one) */
			snprintf(said, sizeof(said), "To %s: %s", PQgetvalue(r, i, 1) + 5, text);
		else
			snprintf(said, sizeof(said), "%s", text);
		rc = notice_queue(c, PQgetvalue(r, i, where), said, NULL, &e);
	}
	PQclear(r);
	cw_errmsg e2;
	cw_err end = dispatcher_dead_told(c, !rc, &e2);
	if (rc || end)
		LOG_KV(CW_LOG_WARN, "cannot tell dead letters now: told at the next look", "detail",
		       rc ? e.msg : e2.msg);
}

/* Who says notice row i of notices' batch r: the Matrix id of a ghost, or
 * NULL for the bot. */
static const char *notice_sender(const struct matrix *m, const PGresult *r, int i)
{
	return PQgetisnull(r, i, 4) || strcmp(PQgetvalue(r, i, 4), m->bot) == 0 ? NULL : PQgetvalue(r, i, 4);
}

/* The notices of ids (n of them: the rows of a batch) given back by the
 * statement sql, whose $1 is their ids (cw_pg_texts) and $2, unless NULL,
 * arg; why: the log's line when it failed. */
static void notices_give_back(PGconn *c, const char *sql, const char *const *ids, int n, const char *arg,
			      const char *why)
{
	if (n == 0)
		return;
	char *array = cw_pg_texts(ids, (size_t)n);
	const char *p[] = { array, arg };
	cw_errmsg e;
	if (!array)
		LOG_KV(CW_LOG_WARN, why, "detail", "out of memory");
	else if (store_command(c, sql, arg ? 2 : 1, p, &e))
		LOG_KV(CW_LOG_WARN, why, "detail", e.msg);
	free(array);
}

/* Row i of notices' batch r was not sent (and is due again later): the
 * batch's later rows of its room, whoever says them, are given back
 * untried, the try not counted, so that they do not pass it (their next
 * try waits for it: notices' NOT EXISTS). */
static void hold_room(PGconn *c, const PGresult *r, int i, int n_rows, bool *given_back)
{
	const char *ids[BOT_BATCH];
	int n = 0;
	for (int k = i + 1; k < n_rows && k < BOT_BATCH; k++) {
		if (given_back[k] || strcmp(PQgetvalue(r, k, 1), PQgetvalue(r, i, 1)) != 0)
			continue;
		given_back[k] = true;
		ids[n++] = PQgetvalue(r, k, 0);
	}
	notices_give_back(c, "UPDATE matrix_notices SET tries = tries - 1, next_at = now() "
			     "WHERE id = ANY ($1::bigint[])", ids, n, NULL,
			  "cannot give back a notice behind one not sent: tried again later");
}

/* The notices due (matrix_notices), each from its sender (the ghost of
 * its room, the bot where there is none, when the row names none), with
 * its transaction id (the row's own when it names none): taken for a
 * while (another try is due then, later after each failure), deleted once
 * the homeserver has them (one that names an event or a transaction id is
 * kept, done, a while: forget_handled), given up after a day, or at once
 * when the homeserver refuses it for good: a 403 (the room was unbound,
 * and its ghost or the bot is out of it) or a 404 (no such room) is the
 * same on every retry.  (A 401 is not final: a wrong as_token is the
 * operator's to fix.)  A row whose sender leaves after it (then_leave:
 * says_and_leaves) leaves once it is done.  A 429 gives the row back, due
 * when the homeserver asks, the try not counted (say_txn says why it is
 * not waited for), and the batch's later rows of the same sender with it:
 * they are limited as much (until the thirty-second session each was
 * tried in turn, and limited in turn).  The other senders' rows are
 * tried: a homeserver limits each sender on its own (Synapse's
 * rc_message, as the dispatcher counts on), and one limited ghost must
 * not hold up the bot's answers to other users (in the thirty-second
 * session a 429 gave back the whole batch, a review's finding). */
static void notices(struct matrix *m, PGconn *c)
{
	PGresult *r = bot_look(c, BOT_NOTICES, 0, NULL);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		PQclear(r);
		return;
	}
	int n_rows = PQntuples(r);
	bool given_back[BOT_BATCH] = { false }; /* the batch's rows of a sender limited, or behind one not sent */
	struct alone_memo memo = { 0 };
	for (int i = 0; i < n_rows && i < BOT_BATCH; i++) {
		if (given_back[i])
			continue;
		const char *id = PQgetvalue(r, i, 0), *room = PQgetvalue(r, i, 1);
		const char *user = notice_sender(m, r, i);
		bool stale = PQgetvalue(r, i, 3)[0] == 't';
		char txn[300];
		if (PQgetisnull(r, i, 5))
			snprintf(txn, sizeof(txn), "cwnotice-%s", id);
		else
			snprintf(txn, sizeof(txn), "%s", PQgetvalue(r, i, 5));
		/* A word of the bot's in a management room (a report's answer,
		 * a command's answer the homeserver did not take at once, an
		 * expiry) is said only while the room is still hers alone, as
		 * a command's answer is (hers_alone): one queued before
		 * someone else came in would be said to them, their member
		 * event not handled yet (until the fifty-second session it
		 * was).  Someone else there: the room is ended, and the row
		 * done, unsaid; not known for now: tried again later.  A word
		 * the bot leaves after (then_leave: to an intruder, to a room
		 * it moved from) is for whoever is there.  Looked at once for
		 * the batch's words of a room (hers_alone_once). */
		bool looked = !user && PQgetvalue(r, i, 6)[0] != 't';
		const char *owner = PQgetisnull(r, i, 7) ? NULL : PQgetvalue(r, i, 7);
		int alone = looked ? hers_alone_once(m, c, &memo, room, owner, txn, NULL) : 1;
		/* and, at its send, still queued, and the room still what the
		 * look found (notice_still); not now: as not known */
		if (looked && alone >= 0) {
			int still = notice_still(m, c, id, owner);
			if (still < 0)
				continue;
			if (still == 0)
				alone = -2;
		}
		long status = 0, wait = 0;
		bool sent = alone >= 0 && say_txn(m, room, user, PQgetvalue(r, i, 2), txn, &status, &wait);
		if (!sent && status == 429 && !stale) {
			/* this row and the batch's later ones of its sender, due
			 * when it asks (a stale one among them is given up at its
			 * next try, as any) */
			const char *ids[BOT_BATCH];
			char ms[24];
			int n = 0;
			for (int k = i; k < n_rows && k < BOT_BATCH; k++) {
				const char *other = notice_sender(m, r, k);
				if (given_back[k] || !(other == user || (other && user && strcmp(other, user) == 0)))
					continue;
				given_back[k] = true;
				ids[n++] = PQgetvalue(r, k, 0);
			}
			snprintf(ms, sizeof(ms), "%ld", wait);
			notices_give_back(c, "UPDATE matrix_notices SET tries = tries - 1, "
					     "next_at = now() + $2::bigint * interval '1 millisecond' WHERE id = ANY ($1::bigint[])",
					  ids, n, ms, "cannot give back a rate-limited notice: tried again later");
			hold_room(c, r, i, n_rows, given_back);
			continue;
		}
		if (!sent && status == 401 && atomic_load(&m->token_refused)) {
			/* the as_token refused: this row and the batch's later
			 * ones wait for it, due at once when it is taken again,
			 * the try not counted, none given up (bot_main does not
			 * look meanwhile) */
			const char *ids[BOT_BATCH];
			int n = 0;
			for (int k = i; k < n_rows && k < BOT_BATCH; k++) {
				if (given_back[k])
					continue;
				given_back[k] = true;
				ids[n++] = PQgetvalue(r, k, 0);
			}
			notices_give_back(c, "UPDATE matrix_notices SET tries = tries - 1, next_at = now() "
					     "WHERE id = ANY ($1::bigint[])", ids, n, NULL,
					  "cannot give back a notice the as_token's refusal held: tried again later");
			break;
		}
		bool refused = !sent && (status == 403 || status == 404 || alone == -1);
		if (!sent && !refused && !stale)
			hold_room(c, r, i, n_rows, given_back);
		if (alone == -1) {
			LOG_KV_LIMITED(CW_LOG_INFO, "a notice is not said: someone else came into the management room",
				       "room", room);
			/* the batch's later words of the bot's for her there:
			 * done with, unsaid (intruder_words), not to be sent
			 * as words of a room that is no management room */
			for (int k = i + 1; k < n_rows && k < BOT_BATCH; k++)
				if (!notice_sender(m, r, k) && PQgetvalue(r, k, 6)[0] != 't' &&
				    strcmp(PQgetvalue(r, k, 1), room) == 0)
					given_back[k] = true;
		}
		else if (refused)
			LOG_KV_LIMITED(CW_LOG_WARN, "a notice for a Matrix user is given up: the homeserver refuses it",
				       "room", room);
		else if (!sent && stale)
			LOG_KV_LIMITED(CW_LOG_WARN,
				       "a notice for a Matrix user is given up after a day of failed sends",
				       "room", room);
		if (sent || refused || stale) {
			const char *p[] = { id };
			cw_errmsg e;
			store_command(c, "WITH x AS (UPDATE matrix_notices SET done_at = now(), next_at = 'infinity' "
					 " WHERE id = $1::bigint AND (event_id IS NOT NULL OR txn_id IS NOT NULL) RETURNING 1) "
					 "DELETE FROM matrix_notices WHERE id = $1::bigint "
					 " AND NOT EXISTS (SELECT 1 FROM x)",
				      1, p, &e);
			if (PQgetvalue(r, i, 6)[0] == 't') {
				hers_alone_forget(&memo, room);
				if (mx_room_action(m, room, user, "leave", &e))
					LOG_KV_LIMITED(CW_LOG_WARN, "cannot leave a room after a notice", "room", room,
						       "detail", e.msg);
			}
		}
	}
	PQclear(r);
}

/* Takes the room's lock of every write of events (ROOM_LOCK_SQL) of the
 * group local_id's portal room is bound to, if it is one: a group's
 * members change under it, taken first in the transaction (as left and
 * the interop API's member changes do), so that a group write holding it,
 * which read the members, commits first, and one waiting for it reads the
 * change.  A direct room (a remote user in its binding) takes none: the
 * group grow_group makes of it is a new room, seen by nobody before the
 * commit.  The caller's transaction; a lock taken twice is held once.
 *
 * The binding is read before the lock, and the caller's change reads it
 * again after: a binding that moved onto another group in between would
 * have its member changed without the other group's lock.  None can
 * (looked at in the twenty-seventh session, after a review took two
 * invitations into one room handled at once for a way): a binding of a
 * Matrix room, once there, changes only in the bot's work (grow_group,
 * ghost_joins, left, ghost_removed), and one bot acts for all the
 * processes (bot_lock), one inbox row after another on this one
 * connection, so nothing changes it while its own transaction runs.  The
 * delivery threads only make bindings, of rooms they made; the bot's work
 * on such a room (a ghost invited into it at once) reads its binding
 * again in grow_group, under a lock taken then.  Were bots to work in
 * parallel, this would have to read the binding again under the lock and
 * lock the group it moved to. */
static cw_err portal_lock(PGconn *c, const char *room, const char *local_id, cw_errmsg *e)
{
	const char *params[] = { room, local_id };
	PGresult *r = PQexecParams(c,
		"SELECT count(" ROOM_LOCK_SQL("room_id") ") FROM room_bindings WHERE network = 'matrix' "
		"AND native_id = $1 AND local_identity_id = $2::bigint AND remote_identity_id IS NULL",
		2, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (!rc)
		PQclear(r);
	return rc;
}

/* One of this provider's users invited a ghost: a conversation with that
 * remote user.  This Matrix room is bound to the direct neutral room of the
 * two (the one there is, else a new one: direct_room_of), and the ghost
 * joins; what the user writes there then goes to the peer (the policy
 * decides, outbound).  When the two had a direct room in Matrix already,
 * the newest is where the user means to talk: the binding moves here, and
 * the ghost says so in the old room and leaves it (else the user's words
 * here would go nowhere, in silence).  A ghost invited into a room that is
 * already the conversation with someone else (another user's direct room,
 * or a stranger to a group a peer hosts, in that group's room) says so and
 * leaves; a member of a group invited into the user's room of it just
 * joins.  A second remote user invited into the user's own direct room
 * makes it a group hosted here, which the user then grows by inviting. */
/* Someone invited into the user's direct room makes it a group hosted
 * here of the three (made now: the room's binding moves onto it and it is
 * the user's portal), or, into their portal of a group made here, joins
 * the group (when the user is still a member of it); a remote member's
 * ghost counts as joined to the portal (it joins it next), another local
 * user is invited to the group (joined once they join the portal the bot
 * makes them: invitation_row; matrix.c, joins_of_invitees).  *portal: the
 * binding's id, left as it was when room is neither.  Runs in the
 * caller's transaction.
 *
 * *gone: the invitee is not to be brought back into the group of the
 * user's portal, and nothing was changed: a remote user (ghost) who left
 * it (her own leave, her peer's removal: hers, or her peer's, to undo by
 * her join or its add), or anyone banned from it, as an XMPP member's
 * invitation is refused (xmpp_muc.c, invite_fn).  Until the forty-third
 * session her membership was set back to joined.
 *
 * *full: the group, as many members (joined or invited) as
 * rooms.max_members, or more, takes the invitee no more than a peer's
 * add (peer_api.c, members_admit), and nothing was changed; a direct room
 * that would be a group of three is too when the bound is 2.  Since the
 * forty-sixth session. */
/* The binding of the user's ($2) room $1 that grows (b: its id, room
 * and remote user, a): the direct room with another than the invitee
 * ($3), or a portal of a group made here ($4: this provider's domain)
 * whose member the user is; the caller closes its parenthesis. */
#define GROW_BINDING \
	"b AS (SELECT b.id, b.room_id, b.remote_identity_id AS a FROM room_bindings b " \
	"  WHERE b.network = 'matrix' AND b.native_id = $1 AND b.local_identity_id = $2::bigint " \
	"  AND (b.remote_identity_id <> $3::bigint OR (b.remote_identity_id IS NULL AND EXISTS (SELECT 1 " \
	"  FROM rooms x WHERE x.id = b.room_id AND x.kind = 'group' AND x.hub_domain = $4 " \
	"  AND x.created_by_peer_id IS NULL) AND EXISTS (SELECT 1 FROM room_members x WHERE x.room_id = b.room_id " \
	"  AND x.identity_id = $2::bigint AND x.membership = 'joined')))"

static cw_err grow_group(struct matrix *m, PGconn *c, const char *room, const char *local_id, const char *new_id,
			 bool ghost, char *portal, size_t plen, bool *gone, bool *full, cw_errmsg *e)
{
	*gone = false;
	*full = false;
	/* The group's lock (since the twenty-sixth session; before, a group
	 * write that had read the members could miss the new one): first in
	 * local_invited's transaction; ghost_joins took it already. */
	cw_err lrc = portal_lock(c, room, local_id, e);
	if (lrc)
		return lrc;
	const char *gp[] = { room, local_id, new_id, ghost ? "t" : "f" };
	PGresult *g = PQexecParams(c,
		"SELECT 1 FROM room_bindings b JOIN room_members x ON x.room_id = b.room_id "
		"AND x.identity_id = $3::bigint WHERE b.network = 'matrix' AND b.native_id = $1 "
		"AND b.local_identity_id = $2::bigint AND b.remote_identity_id IS NULL "
		"AND (x.membership = 'banned' OR (x.membership = 'left' AND $4::boolean))",
		4, NULL, gp, NULL, NULL, 0);
	if ((lrc = store_check(c, g, PGRES_TUPLES_OK, e)))
		return lrc;
	*gone = PQntuples(g) > 0;
	PQclear(g);
	if (*gone)
		return CW_OK;
	/* The members now of the room the change is to (GROW_BINDING: a
	 * group's, or a direct room's, then 2 of a group of 3), and whether
	 * the invitee is one of them. */
	const char *domain = m->cfg->domain ? m->cfg->domain : "";
	const char *bp[] = { room, local_id, new_id, domain };
	g = PQexecParams(c,
		"WITH " GROW_BINDING ") SELECT CASE WHEN b.a IS NULL THEN (SELECT count(*) FROM room_members x "
		"  WHERE x.room_id = b.room_id AND x.membership IN ('joined', 'invited')) ELSE 2 END, "
		"  b.a IS NULL AND EXISTS (SELECT 1 FROM room_members x WHERE x.room_id = b.room_id "
		"  AND x.identity_id = $3::bigint AND x.membership IN ('joined', 'invited')) FROM b",
		4, NULL, bp, NULL, NULL, 0);
	if ((lrc = store_check(c, g, PGRES_TUPLES_OK, e)))
		return lrc;
	if (PQntuples(g) == 1) {
		long before = atol(PQgetvalue(g, 0, 0));
		long after = before + (PQgetvalue(g, 0, 1)[0] == 't' ? 0 : 1);
		*full = after > before && after > m->cfg->rooms_max_members;
	}
	PQclear(g);
	if (*full)
		return CW_OK;
	char pub[40];
	cw_new_id(pub, sizeof(pub), "r_");
	const char *params[] = { room, local_id, new_id, domain, pub, ghost ? "t" : "f" };
	PGresult *r = PQexecParams(c,
		"WITH " GROW_BINDING " FOR UPDATE), "
		"nr AS (INSERT INTO rooms (public_id, uri, hub_domain, kind) "
		"  SELECT $5, 'mimi://' || $4 || '/r/' || $5, $4, 'group' FROM b WHERE b.a IS NOT NULL RETURNING id), "
		"g AS (SELECT coalesce((SELECT id FROM nr), b.room_id) AS room FROM b), "
		"mb AS (INSERT INTO room_members (room_id, identity_id, membership) "
		"  SELECT g.room, x, CASE WHEN x = $3::bigint AND NOT $6::boolean THEN 'invited' ELSE 'joined' END "
		"  FROM g, b, unnest(ARRAY[$2::bigint, b.a, $3::bigint]) AS x "
		"  WHERE x IS NOT NULL ON CONFLICT (room_id, identity_id) DO UPDATE SET membership = "
		"  CASE WHEN room_members.membership = 'joined' THEN 'joined' ELSE excluded.membership END, "
		"  peer_invited = false, updated_at = now()), "
		"up AS (UPDATE room_bindings rb SET room_id = g.room, remote_identity_id = NULL FROM g, b "
		"  WHERE rb.id = b.id RETURNING rb.id), "
		"pm AS (INSERT INTO matrix_portal_members (binding_id, identity_id) SELECT up.id, x FROM up, b, "
		"  unnest(ARRAY[b.a, CASE WHEN $6::boolean THEN $3::bigint END]) AS x WHERE x IS NOT NULL "
		"  ON CONFLICT DO NOTHING) "
		"SELECT id FROM up",
		6, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 1) {
		snprintf(portal, plen, "%s", PQgetvalue(r, 0, 0));
		LOG_KV_LIMITED(CW_LOG_INFO, "a Matrix user made a group, or added to one", "room", room);
	}
	PQclear(r);
	return CW_OK;
}

/* A room the user made (or a ghost's direct room) that became their room
 * of a group: the bot, which relays the other local members' messages and
 * invites the new members' ghosts there, is brought in by a ghost that is
 * in it (inviting needs no power; an invitation of a member is refused,
 * and the join says whether the bot is in). */
static void bot_into(struct matrix *m, const char *room, const char *ghost)
{
	long status;
	cw_errmsg e;
	if (ghost && mx_room_post(m, room, ghost, "invite", json_pack("{s:s}", "user_id", m->bot), &status, &e) &&
	    status != 403)
		LOG_KV_LIMITED(CW_LOG_WARN, "a ghost cannot invite the bot into a group's room", "room", room, "detail",
			       e.msg);
	if (mx_room_action(m, room, NULL, "join", &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "the bot cannot join a group's room", "room", room, "detail", e.msg);
		return;
	}
	/* The ghost's power, when it has more, to the bot too (a direct room
	 * made with trusted_private_chat gives both its members the
	 * creator's): the bot names the room as the group is, and takes
	 * invitations back there. */
	json_t *pl = ghost ? room_get(m, room, "state/m.room.power_levels/", ghost, NULL) : NULL;
	json_t *users = json_object_get(pl, "users");
	json_int_t mine = json_integer_value(json_object_get(users, ghost));
	if (json_is_object(users) && mine > json_integer_value(json_object_get(users, m->bot)) &&
	    json_object_set_new(users, m->bot, json_integer(mine)) == 0) {
		if (mx_room_call(m, "PUT", room, ghost, "state/m.room.power_levels/", NULL, pl, &status, NULL, &e))
			LOG_KV_LIMITED(CW_LOG_WARN, "a ghost cannot give the bot power in a group's room", "room", room,
				       "detail", e.msg);
		pl = NULL; /* taken by the call */
	}
	json_decref(pl);
}

/* How far back the ghost reads a room it joined: pages of the room's
 * history (GET /messages), newest first. */
#define MISSED_PAGES 5
#define MISSED_PAGE_EVENTS 100

/* Reads room back to ghost's invitation; the user's events but state
 * (messages, stickers, reactions, redactions, ...) into mine, oldest
 * first.  False: the invitation was not
 * reached within MISSED_PAGES pages (some of the user's may be missing). */
static bool read_back(struct matrix *m, const char *room, const char *ghost, const char *user, json_t *mine)
{
	char query[600];
	snprintf(query, sizeof(query), "dir=b&limit=%d", MISSED_PAGE_EVENTS);
	for (int page = 0; page < MISSED_PAGES; page++) {
		json_t *answer = room_get(m, room, "messages", ghost, query);
		json_t *chunk = json_object_get(answer, "chunk");
		size_t i;
		json_t *ev;
		json_array_foreach(chunk, i, ev) { /* newest first, back to the invitation */
			const char *type = json_string_value(json_object_get(ev, "type"));
			const char *from = json_string_value(json_object_get(ev, "sender"));
			const char *key = json_string_value(json_object_get(ev, "state_key"));
			const char *ms = json_string_value(json_object_get(json_object_get(ev, "content"), "membership"));
			if (type && strcmp(type, "m.room.member") == 0 && key && strcmp(key, ghost) == 0 && ms &&
			    strcmp(ms, "invite") == 0) {
				json_decref(answer);
				return true;
			}
			/* Every event of the user's but state (the transaction
			 * path carries what it can: stickers, polls, ...). */
			if (type && from && strcmp(from, user) == 0 && json_is_string(json_object_get(ev, "event_id")) &&
			    !json_object_get(ev, "state_key"))
				json_array_insert(mine, 0, ev);
		}
		/* No end: the start of what the ghost may read (a room whose
		 * history is hidden from before its join: nothing more to
		 * find). */
		const char *end = json_string_value(json_object_get(answer, "end"));
		char *tok = end && json_array_size(chunk) ? curl_easy_escape(NULL, end, 0) : NULL;
		bool read = answer != NULL, more = tok && strlen(tok) < sizeof(query) - 64;
		if (more)
			snprintf(query, sizeof(query), "dir=b&limit=%d&from=%s", MISSED_PAGE_EVENTS, tok);
		curl_free(tok);
		json_decref(answer);
		if (!more)
			return read && !tok; /* read to the start, or a failure (or a token too long to send) */
	}
	return false;
}

/* What the user wrote in a room between inviting the ghost and the room
 * being bound never came, or came to a room not bound yet: a homeserver
 * sends an appservice the events of rooms its users are joined to, not
 * invited to (a client that makes a direct room with its first message
 * sends it at once).  Once the room is bound, the ghost reads the room
 * back to its invitation and hands the user's events to the transaction
 * path, as if they had been pushed (one pushed meanwhile is stored once:
 * events are deduplicated by id; and what the homeserver pushes of the
 * room while this runs waits for it: mx_catch_up).  If that fails, the
 * ghost says how many of the user's messages are not stored, so that the
 * user writes them again. */
static void missed_messages(struct matrix *m, PGconn *c, const char *room, const char *ghost, const char *user,
			    const char *eid)
{
	json_t *mine = json_array(); /* oldest first */
	if (!read_back(m, room, ghost, user, mine))
		LOG_KV_LIMITED(CW_LOG_WARN, "a room was not read back to the ghost's invitation", "room", room);
	size_t i;
	json_t *ev;
	if (json_array_size(mine) == 0) {
		json_decref(mine);
		return;
	}
	cw_errmsg e;
	if (mx_backfill(m, mine, 10000, &e) == CW_OK) {
		LOG_KV_LIMITED(CW_LOG_INFO, "what a user wrote while the ghost joined was fetched", "room", room);
		json_decref(mine);
		return;
	}
	LOG_KV_LIMITED(CW_LOG_WARN, "what a user wrote while the ghost joined could not be fetched", "room", room,
		       "detail", e.msg);
	json_t *ids = json_array();
	json_array_foreach(mine, i, ev)
		if (strcmp(json_string_value(json_object_get(ev, "type")), "m.room.message") == 0)
			json_array_append(ids, json_object_get(ev, "event_id"));
	json_decref(mine);
	char *doc = json_array_size(ids) ? json_dumps(ids, JSON_COMPACT) : NULL;
	json_decref(ids);
	if (!doc)
		return;
	const char *params[] = { doc };
	PGresult *r = PQexecParams(c,
		"SELECT count(*) FROM jsonb_array_elements_text($1::jsonb) AS x(id) WHERE NOT EXISTS (SELECT 1 FROM events f "
		" WHERE f.origin_network = 'matrix' AND f.origin_native_id = x.id)", 1, NULL, params, NULL, NULL, 0);
	free(doc);
	long lost = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 ? atol(PQgetvalue(r, 0, 0)) : 0;
	PQclear(r);
	if (lost > 0) {
		char text[300];
		snprintf(text, sizeof(text),
			 "%ld message%s you wrote here while I was joining did not reach me: please write %s again.",
			 lost, lost == 1 ? "" : "s", lost == 1 ? "it" : "them");
		char txn[48];
		txn_for(txn, sizeof(txn), "lost", eid, room);
		say_as(m, c, room, ghost, text, txn);
	}
}

/* Whether room is end-to-end encrypted (its state holds an
 * m.room.encryption event), asked as user, who is in it: 1 yes, 0 no (or
 * the homeserver refuses to say), -1 the homeserver did not answer for
 * now. */
static int room_encrypted(struct matrix *m, const char *room, const char *user)
{
	long status;
	json_t *answer = NULL;
	cw_errmsg e;
	cw_err rc = mx_room_call(m, "GET", room, user, "state/m.room.encryption/", NULL, NULL, &status, &answer, &e);
	json_decref(answer);
	if (rc == CW_OK)
		return 1;
	if (status != 404)
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot tell whether a room is encrypted", "room", room, "detail", e.msg);
	return mx_for_now(status) ? -1 : 0;
}

/* The ghost of a user not added to the group of room, the portal the
 * user invited it into: nothing stored changes.  The ghost declines the
 * invitation (or, joined already, leaves), and the bot, in the room as in
 * every portal, says why, text (a Matrix room cannot refuse an invitation
 * itself; the ghost, which speaks for the remote user, says nothing: she
 * did not decline).  True: the homeserver did not take the leave for now,
 * try again later (the notice's transaction id, made of what, is the same
 * each time). */
static bool turned_away(struct matrix *m, PGconn *c, const char *room, const char *ghost, const char *eid,
			const char *text, const char *what)
{
	char txn[48];
	txn_for(txn, sizeof(txn), what, eid, room);
	say_as(m, c, room, NULL, text, txn);
	long status;
	cw_errmsg e;
	if (mx_room_post(m, room, ghost, "leave", json_object(), &status, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "a ghost cannot decline a group's invitation", "room", room, "detail", e.msg);
		return mx_for_now(status);
	}
	LOG_KV_LIMITED(CW_LOG_INFO, "a Matrix user's invitation of a ghost into a group was declined", "room", room,
		       "why", what);
	return false;
}

/* Her user left the group, or was banned from it (grow_group, gone): she
 * is not brought back. */
static bool not_brought_back(struct matrix *m, PGconn *c, const char *room, const char *ghost, const char *eid)
{
	char text[MX_ID_MAX + 200];
	snprintf(text, sizeof(text), "%s left this group (or was put out of it): an invitation does not bring them "
				      "back, only they can come back. Nobody was added.", ghost);
	return turned_away(m, c, room, ghost, eid, text, "gone");
}

/* The text of an invitation into a group as full as rooms.max_members
 * (grow_group, full). */
static void group_full_text(const struct matrix *m, char *text, size_t len)
{
	snprintf(text, len, "This group has as many members as it may have here (%ld): nobody was added.",
		 m->cfg->rooms_max_members);
}

/* Whether remote_uri (a ghost's user) left the group of the user's
 * (local_id) portal room, or is banned from it: grow_group's question,
 * asked before the ghost joins, so that it declines the invitation rather
 * than joins and leaves (a database that does not answer: no, and
 * grow_group asks again in its transaction). */
static bool left_the_portals_group(PGconn *c, const char *room, const char *local_id, const char *remote_uri)
{
	const char *p[] = { room, local_id, remote_uri };
	PGresult *r = PQexecParams(c,
		"SELECT 1 FROM room_bindings b JOIN room_members x ON x.room_id = b.room_id "
		"JOIN identities i ON i.id = x.identity_id WHERE b.network = 'matrix' AND b.native_id = $1 "
		"AND b.local_identity_id = $2::bigint AND b.remote_identity_id IS NULL AND i.uri = $3 "
		"AND x.membership IN ('left', 'banned')", 3, NULL, p, NULL, NULL, 0);
	bool gone = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0;
	PQclear(r);
	return gone;
}

/* A ghost invited into a room; true: the homeserver did not take its
 * join for now, try again later. */
static bool ghost_joins(struct matrix *m, PGconn *c, const char *room, const char *sender, const char *ghost,
			const char *eid)
{
	char local_id[24], uri[600], net[64], remote_local[MX_ID_MAX + 1];
	if (!local_identity(m, c, sender, local_id, sizeof(local_id), uri, sizeof(uri)) ||
	    !mx_ghost_parse(m->cfg->mx_user_prefix, mx_server_name(m->cfg), ghost, net, sizeof(net), remote_local,
			    sizeof(remote_local)))
		return false;
	const char *pp[] = { net };
	PGresult *r = PQexecParams(c, "SELECT id, domain FROM peers WHERE name = $1 AND enabled", 1, NULL, pp, NULL,
				   NULL, 0);
	if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
		PQclear(r);
		return false;
	}
	char peer_id[24], remote_uri[800], network[80];
	snprintf(peer_id, sizeof(peer_id), "%s", PQgetvalue(r, 0, 0));
	snprintf(remote_uri, sizeof(remote_uri), "mimi://%s/u/%s", PQgetvalue(r, 0, 1), remote_local);
	snprintf(network, sizeof(network), "peer:%s", net);
	PQclear(r);
	struct mimi_uri ru;
	char remote_id[24];
	cw_errmsg e;
	if (mimi_uri_parse(remote_uri, &ru, &e) || ru.kind != MIMI_USER)
		return false;
	/* Into the user's portal of a group its user left: declined, not
	 * joined (grow_group asks again below, under the group's lock). */
	if (left_the_portals_group(c, room, local_id, remote_uri))
		return not_brought_back(m, c, room, ghost, eid);
	/* The ghost joins first: who else is in the room decides whether it
	 * is bridged at all (a room here is one user's view: what the policy
	 * let through for them), and a room the ghost could not join is
	 * bound to nothing. */
	long status;
	if (mx_room_post(m, room, ghost, "join", json_object(), &status, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "the ghost cannot join", "room", room, "detail", e.msg);
		return mx_for_now(status);
	}
	/* A management room is for commands: bound too, what the user writes
	 * there would be a command and a message to the remote user both (her
	 * "report" of him with it), and his messages would stand among the
	 * bot's words (until the thirty-eighth session it was bound, a
	 * review's finding). */
	const char *mp[] = { room };
	r = PQexecParams(c, "SELECT 1 FROM matrix_mgmt_rooms WHERE room_id = $1", 1, NULL, mp, NULL, NULL, 0);
	bool mgmt = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0;
	PQclear(r);
	if (mgmt) {
		ghost_says_and_leaves(m, c, room, ghost,
				      "This is your room with the gateway's bot, for your commands: nothing written here "
				      "reaches me. Open a direct room with me to write to me.", "leave", eid);
		return false;
	}
	int others = others_in(m, room, ghost, sender);
	if (others < 0)
		return true;
	if (others) {
		ghost_says_and_leaves(m, c, room, ghost,
				      "Other people of this server are in this room, and a bridged room shows one person "
				      "what reaches them: nothing written here reaches me. Open a direct room with me to "
				      "write to me; a group is made by inviting more of us into it.", "leave", eid);
		return false;
	}
	/* A room encrypted from its start (clients on matrix-rust-sdk make
	 * every direct room so): its m.room.encryption came before any ghost
	 * was in, so no transaction carried it, and all the user writes is
	 * m.room.encrypted, which the gateway cannot read.  Bound, it would
	 * swallow every message in silence. */
	int enc = room_encrypted(m, room, ghost);
	if (enc < 0)
		return true;
	if (enc > 0) {
		char text[600];
		snprintf(text, sizeof(text),
			 "This room is end-to-end encrypted, and the gateway to %s cannot read encrypted messages: "
			 "nothing written here reaches me. To write to me, open a direct room with me without "
			 "encryption.", network);
		ghost_says_and_leaves(m, c, room, ghost, text, "leave", eid);
		return false;
	}
	/* A direct room the user opened anew with the ghost takes the
	 * conversation over (mv): the binding is the new room's from now on,
	 * made now.  Its created_at says when the room was bound to what
	 * reads it (mx_deliver.c, to_native: an event delivered before is
	 * of another room; matrix.c, the 'prior' look: her events since the
	 * room was bound); until the fifty-second session the move kept the
	 * old room's, and a reaction or edit of a message delivered to the
	 * old room named its event in the new one (Synapse: 400 "Relations
	 * must be in the same room"), failing for its whole retry budget. */
	/* The lock of the group this may be a portal of, first (grow_group,
	 * below, may add the ghost's user to it): taken after the remote
	 * user's identity is made, it could wait for a group write that waits
	 * for that identity's row. */
	cw_err rc = store_exec(c, "BEGIN", &e);
	if (!rc)
		rc = portal_lock(c, room, local_id, &e);
	if (!rc)
		rc = identity_id(c, &ru, false, network, peer_id, remote_id, sizeof(remote_id), &e);
	bool other = false, group = false, gone = false, full = false;
	char old_room[MX_ID_MAX + 1] = "", portal[24] = "";
	if (!rc) {
		const char *params[] = { m->cfg->domain ? m->cfg->domain : "", room, local_id, remote_id, ghost };
		r = PQexecParams(c,
			"WITH same AS (SELECT 1 FROM room_bindings WHERE network = 'matrix' AND native_id = $2), "
			"old AS (SELECT native_id FROM room_bindings WHERE network = 'matrix' "
			"  AND local_identity_id = $3::bigint AND remote_identity_id = $4::bigint), "
			"mv AS (UPDATE room_bindings SET native_id = $2, created_at = now() WHERE network = 'matrix' "
			"  AND local_identity_id = $3::bigint AND remote_identity_id = $4::bigint "
			"  AND NOT EXISTS (SELECT 1 FROM same) RETURNING 1), "
			"rb AS (INSERT INTO room_bindings (room_id, network, native_id, local_identity_id, remote_identity_id) "
			"  SELECT direct_room_of(NULL, $3::bigint, $4::bigint, $1), 'matrix', $2, $3::bigint, $4::bigint "
			"  WHERE NOT EXISTS (SELECT 1 FROM same) AND NOT EXISTS (SELECT 1 FROM old) RETURNING 1), "
			"gb AS (INSERT INTO identity_bindings (identity_id, network, native_id) VALUES ($4::bigint, 'matrix', $5) "
			"  ON CONFLICT DO NOTHING) "
			"SELECT (SELECT count(*) FROM rb) + (SELECT count(*) FROM mv), "
			"  (SELECT native_id FROM old WHERE EXISTS (SELECT 1 FROM mv)), "
			"  EXISTS (SELECT 1 FROM room_bindings WHERE network = 'matrix' AND native_id = $2 "
			"   AND (local_identity_id IS DISTINCT FROM $3::bigint OR remote_identity_id IS DISTINCT FROM $4::bigint)), "
			"  (SELECT b.id FROM room_bindings b WHERE b.network = 'matrix' AND b.native_id = $2 "
			"   AND b.remote_identity_id IS NULL AND EXISTS (SELECT 1 FROM room_members x WHERE x.room_id = b.room_id "
			"   AND x.identity_id = $4::bigint AND x.membership = 'joined')), "
			"  EXISTS (SELECT 1 FROM room_bindings WHERE network = 'matrix' AND native_id = $2 "
			"   AND remote_identity_id IS NULL)",
			5, NULL, params, NULL, NULL, 0);
		rc = store_check(c, r, PGRES_TUPLES_OK, &e);
		if (!rc) {
			if (!PQgetisnull(r, 0, 1))
				snprintf(old_room, sizeof(old_room), "%s", PQgetvalue(r, 0, 1));
			other = PQgetvalue(r, 0, 2)[0] == 't';
			if (!PQgetisnull(r, 0, 3))
				snprintf(portal, sizeof(portal), "%s", PQgetvalue(r, 0, 3));
			group = PQgetvalue(r, 0, 4)[0] == 't';
			PQclear(r);
		}
	}
	if (!rc && (other || (group && !portal[0]))) {
		/* A second remote user invited into the user's direct room, or
		 * another into a group the user made that way. */
		rc = grow_group(m, c, room, local_id, remote_id, true, portal, sizeof(portal), &gone, &full, &e);
		if (!rc && portal[0])
			other = group = false;
	}
	rc = store_end(c, rc, &e);
	if (rc) {
		LOG_KV(CW_LOG_WARN, "cannot start a conversation from Matrix", "detail", e.msg);
		ghost_says_and_leaves(m, c, room, ghost, "This conversation could not be started here; invite me again "
						      "in a while.", "leave", eid);
		return false;
	}
	if (gone) /* she left between the look above and the lock */
		return not_brought_back(m, c, room, ghost, eid);
	if (full) { /* the ghost's user is not added: the group has its most members */
		char text[200];
		group_full_text(m, text, sizeof(text));
		return turned_away(m, c, room, ghost, eid, text, "full");
	}
	if (portal[0]) { /* a member of the group, into the user's room of it */
		const char *pp2[] = { portal, remote_id };
		if (store_command(c, "INSERT INTO matrix_portal_members (binding_id, identity_id) "
				     "VALUES ($1::bigint, $2::bigint) ON CONFLICT DO NOTHING", 2, pp2, &e))
			LOG_KV(CW_LOG_WARN, "cannot record a ghost in a group's room", "room", room, "detail", e.msg);
		bot_into(m, room, ghost);
	} else if (group) {
		ghost_says_and_leaves(m, c, room, ghost,
				      "I am not a member of the group this room stands for: nothing written here reaches me. "
				      "Open a direct room with me to write to me.", "leave", eid);
	} else if (other) {
		ghost_says_and_leaves(m, c, room, ghost,
				      "Only direct conversations are bridged, and this room is already one with someone "
				      "else: nothing written here reaches me. Open a direct room with me to write to me.",
				      "leave", eid);
	}
	if (!portal[0] && !group && !other)
		missed_messages(m, c, room, ghost, sender, eid);
	if (old_room[0])
		ghost_says_and_leaves(m, c, old_room, ghost,
				      "This conversation goes on in the new room you opened with me; what is written here "
				      "from now on is not bridged.", "moved", eid);
	return false;
}

/* The same, with what the homeserver pushes of the room meanwhile held
 * back until it is done: what the user writes once the room is bound
 * is stored after what missed_messages reads back from before. */
static bool ghost_invited(struct matrix *m, PGconn *c, const char *room, const char *sender, const char *ghost,
			  const char *eid)
{
	mx_catch_up(m, room, true);
	bool again = ghost_joins(m, c, room, sender, ghost, eid);
	mx_catch_up(m, room, false);
	return again;
}

/* Another user of the homeserver invited into a bridged room.  A room here
 * is one user's view (a direct room, or their portal of a group: what the
 * policy let through for them), so nobody else joins it: the invitation is
 * taken back.  Into the user's direct room, or their portal of a group
 * made here, the invitee is invited to the group (made now from the
 * direct room, as by a second ghost: grow_group) and to a portal of their
 * own (invitation_row, right after). */
static int take_out(struct matrix *m, PGconn *c, const char *room, const char *who, const char *text,
		    const char *eid, char *actor_out, size_t actor_len);

static void local_invited(struct matrix *m, PGconn *c, const char *room, const char *sender, const char *invitee,
			  const char *eid)
{
	char inviter_id[24], invitee_id[24], uri[600], invitee_uri[600], localpart[MX_ID_MAX + 1];
	if (!local_identity(m, c, sender, inviter_id, sizeof(inviter_id), uri, sizeof(uri)) ||
	    !mx_user_id_parse(invitee, localpart, sizeof(localpart), NULL, 0))
		return;
	bool local = local_identity(m, c, invitee, invitee_id, sizeof(invitee_id), invitee_uri, sizeof(invitee_uri));
	bool added = false, gone = false, full = false;
	if (local) {
		char portal[24] = "";
		cw_errmsg e;
		cw_err rc = store_exec(c, "BEGIN", &e);
		if (!rc)
			rc = grow_group(m, c, room, inviter_id, invitee_id, false, portal, sizeof(portal), &gone, &full,
					&e);
		rc = store_end(c, rc, &e);
		if (rc)
			LOG_KV(CW_LOG_WARN, "cannot add a member to a group", "room", room, "detail", e.msg);
		added = !rc && !gone && !full && portal[0];
		gone = !rc && gone;
		full = !rc && full;
	}
	char text[MX_ID_MAX + 400];
	if (gone) /* banned from the group: no one's to bring back */
		snprintf(text, sizeof(text), "%s was put out of this group: an invitation does not bring them back. "
					     "Nobody was added.", localpart);
	else if (full)
		group_full_text(m, text, sizeof(text));
	else if (added)
		snprintf(text, sizeof(text),
			 "%s is invited to the group, in a room of their own for it (each member's room shows what "
			 "reaches them), and is a member once they join it.", localpart);
	else
		snprintf(text, sizeof(text),
			 "This room is %s's own view of a bridged conversation, so nobody else joins it. People are "
			 "added to a group made here by inviting them into it; a group made elsewhere takes members "
			 "from there.", sender);
	char actor[MX_ID_MAX + 1];
	if (take_out(m, c, room, invitee, text, eid, actor, sizeof(actor)) == 1 && added)
		bot_into(m, room, actor); /* the room is a group's now */
	if (added)
		LOG_KV_LIMITED(CW_LOG_INFO, "a Matrix user added a member to a group", "room", room, "user", sender);
}

/* Puts who (invited, or joined by themselves) out of the bridged room
 * room, saying text there (its transaction id made of eid): 1 done by a
 * ghost (its id in actor), 0 by the bot, -1 by none.  Who may: in a
 * direct room its ghost (the bot is not in it); in a portal the bot, which
 * made it, or, in one the user made (a direct room that became a group), a
 * ghost in it (the creator's trusted invitees have the creator's power). */
static int take_out(struct matrix *m, PGconn *c, const char *room, const char *who, const char *text,
		    const char *eid, char *actor_out, size_t actor_len)
{
	const char *ap[] = { room };
	PGresult *ar = PQexecParams(c,
		"SELECT ib.native_id FROM room_bindings b JOIN identity_bindings ib ON ib.identity_id = b.remote_identity_id "
		" AND ib.network = 'matrix' WHERE b.network = 'matrix' AND b.native_id = $1 "
		"UNION ALL SELECT NULL FROM room_bindings b WHERE b.network = 'matrix' AND b.native_id = $1 "
		" AND b.remote_identity_id IS NULL "
		"UNION ALL SELECT * FROM (SELECT ib.native_id FROM room_bindings b JOIN matrix_portal_members pm "
		" ON pm.binding_id = b.id JOIN identity_bindings ib ON ib.identity_id = pm.identity_id AND ib.network = 'matrix' "
		" WHERE b.network = 'matrix' AND b.native_id = $1 ORDER BY pm.identity_id LIMIT 4) g",
		1, NULL, ap, NULL, NULL, 0);
	int n = PQresultStatus(ar) == PGRES_TUPLES_OK ? PQntuples(ar) : 0;
	int k = 0;
	cw_errmsg e;
	for (; k < n; k++) {
		long status;
		const char *actor = PQgetisnull(ar, k, 0) ? NULL : PQgetvalue(ar, k, 0);
		if (!mx_room_post(m, room, actor, "kick", json_pack("{s:s, s:s}", "user_id", who, "reason", text),
				  &status, &e))
			break;
	}
	int by = -1;
	if (k < n) {
		char txn[48];
		txn_for(txn, sizeof(txn), "kick", eid, room);
		say_as(m, c, room, PQgetisnull(ar, k, 0) ? NULL : PQgetvalue(ar, k, 0), text, txn);
		by = PQgetisnull(ar, k, 0) ? 0 : 1;
		if (by == 1)
			snprintf(actor_out, actor_len, "%s", PQgetvalue(ar, k, 0));
	}
	else
		LOG_KV_LIMITED(CW_LOG_WARN, "a member cannot be put out of a bridged room", "room", room, "user", who);
	PQclear(ar);
	return by;
}

/* Someone who joined a bridged room by themselves (no invitation: its user
 * made it public, or a space's members may join it), of this server or of
 * another: the room is its user's view, so they are put out, as an
 * invitation into it is taken back (local_invited).  The room's own
 * user's join is hers.  Until the thirty-ninth session only invitations
 * were looked at, and whoever joined read the conversation. */
static void joined_uninvited(struct matrix *m, PGconn *c, const char *room, const char *who, const char *eid)
{
	const char *p[] = { room, who, mx_server_name(m->cfg) };
	PGresult *r = PQexecParams(c,
		"SELECT NOT EXISTS (SELECT 1 FROM identities i WHERE i.id = b.local_identity_id AND i.is_local "
		" AND (EXISTS (SELECT 1 FROM identity_bindings ib WHERE ib.identity_id = i.id AND ib.network = 'matrix' "
		"  AND ib.native_id = $2) OR $2 = '@' || i.localpart || ':' || $3)) "
		"FROM room_bindings b WHERE b.network = 'matrix' AND b.native_id = $1",
		3, NULL, p, NULL, NULL, 0);
	bool stranger = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && PQgetvalue(r, 0, 0)[0] == 't';
	PQclear(r);
	if (!stranger)
		return;
	LOG_KV_LIMITED(CW_LOG_INFO, "someone joined a bridged room uninvited: put out", "room", room, "user", who);
	char actor[MX_ID_MAX + 1];
	take_out(m, c, room, who,
		 "This room is one person's own view of a bridged conversation, so nobody else joins it.", eid, actor,
		 sizeof(actor));
}

/* The bot leaves the management room its user left (forgotten already):
 * false when the homeserver did not take the leave for now (no answer, a
 * 5xx, a 429, a 401), so that the inbox row is tried again, backed off
 * and at most BOT_TRIES times (try_later; until the fifty-second session
 * the failure was logged and the bot stayed in the room for good).  A
 * refusal for good (a 403: the bot is not in the room) is taken as
 * left. */
static bool bot_leaves(struct matrix *m, const char *room)
{
	long status = 0;
	cw_errmsg e;
	if (!mx_room_post(m, room, NULL, "leave", json_object(), &status, &e))
		return true;
	LOG_KV_LIMITED(CW_LOG_WARN, "the bot cannot leave a management room its user left", "room", room, "detail",
		       e.msg);
	return !mx_for_now(status);
}

/* One of this provider's users left (or was removed from) a bridged direct
 * room, a group's portal, or their management room: the room is no longer
 * theirs to read, so its binding goes and the ghost (or the bot) leaves
 * it.  The remote user's next message opens a new direct room with a new
 * invite (the consent given stays), instead of going where nobody reads
 * it; a group's next message does not come: the user left the group.
 * True: the database did not take the unbinding, try again later (until
 * the forty-sixth session the work was marked done all the same, and the
 * room stayed bound: the ghost's sends went on into a room she had left,
 * taken by the homeserver, never seen). */
static bool left(struct matrix *m, PGconn *c, const char *room, const char *who, bool retry)
{
	char local_id[24], uri[600];
	struct mimi_uri u;
	/* One of this provider's users whose identity the database did not
	 * give (a lock or statement timeout, a failover): tried again.  Until
	 * the forty-seventh session only a connection that was down was, and
	 * a statement refused on a live one lost the unbinding for good. */
	if (!local_identity(m, c, who, local_id, sizeof(local_id), uri, sizeof(uri)))
		return local_uri(m, who, uri, sizeof(uri), &u);
	/* Their management room: the bot leaves it too; consent requests
	 * wait (not shown) until the user opens a new one. */
	const char *mp[] = { room, who };
	PGresult *mr = PQexecParams(c, "DELETE FROM matrix_mgmt_rooms WHERE room_id = $1 AND user_id = $2 RETURNING 1", 2,
				    NULL, mp, NULL, NULL, 0);
	/* A statement the database refused says nothing of the room: tried
	 * again (until the fifty-second session it was taken for no
	 * management room, and the room stayed hers, the bot in it, her
	 * consent requests shown where she no longer reads). */
	cw_errmsg me;
	if (store_check(c, mr, PGRES_TUPLES_OK, &me)) { /* clears mr */
		LOG_KV(CW_LOG_WARN, "cannot unbind a room its user left", "room", room, "detail", me.msg);
		return true;
	}
	bool was_mgmt = PQntuples(mr) == 1;
	PQclear(mr);
	if (was_mgmt)
		return !bot_leaves(m, room);
	/* A group's portal (no remote user in its binding): leaving it is
	 * leaving the group (the peer hears of it from the leave event
	 * itself); its ghosts and the bot leave too.  The membership changes
	 * under the room's lock of every write of events, taken first in the
	 * same transaction as every member change does (since the
	 * twenty-sixth session): a group write holding it, which read the user
	 * a member, commits first, and one waiting for it reads them gone. */
	const char *params[] = { room, local_id };
	cw_errmsg e;
	cw_err rc = store_exec(c, "BEGIN", &e);
	if (!rc)
		rc = portal_lock(c, room, local_id, &e);
	PGresult *r = NULL;
	if (!rc) {
		r = PQexecParams(c,
			"WITH b AS (DELETE FROM room_bindings b WHERE b.network = 'matrix' AND b.native_id = $1 "
			" AND b.local_identity_id = $2::bigint RETURNING b.id, b.room_id, b.remote_identity_id), "
			"u AS (UPDATE room_members x SET membership = 'left', updated_at = now() FROM b "
			" WHERE b.remote_identity_id IS NULL AND x.room_id = b.room_id AND x.identity_id = $2::bigint) "
			"SELECT (SELECT native_id FROM identity_bindings WHERE identity_id = b.remote_identity_id "
			" AND network = 'matrix'), b.remote_identity_id IS NULL FROM b "
			"UNION ALL SELECT ib.native_id, true FROM b JOIN matrix_portal_members pm ON pm.binding_id = b.id "
			" JOIN identity_bindings ib ON ib.identity_id = pm.identity_id AND ib.network = 'matrix'",
			2, NULL, params, NULL, NULL, 0);
		if ((rc = store_check(c, r, PGRES_TUPLES_OK, &e)))
			r = NULL; /* cleared */
	}
	rc = store_end(c, rc, &e);
	if (rc) {
		PQclear(r);
		LOG_KV(CW_LOG_WARN, "cannot unbind a room its user left", "room", room, "detail", e.msg);
		return true;
	}
	/* Neither her management room nor bound (any more): on a try again,
	 * one whose management room was forgotten on the first, and whose bot's
	 * leave the homeserver did not take.  Only a room bound to nobody and
	 * no one's management room is: a first try that failed before it
	 * forgot anything (her identity or the statement refused) tells
	 * nothing of the room, which may be someone else's (another user of
	 * this server who came into alice's room of a group by himself, and
	 * left it): until the fifty-third session the bot left it, and
	 * alice's room lost it. */
	if (PQntuples(r) == 0 && retry) {
		PQclear(r);
		const char *np[] = { room };
		PGresult *n = PQexecParams(c,
			"SELECT EXISTS (SELECT 1 FROM room_bindings WHERE network = 'matrix' AND native_id = $1) "
			"OR EXISTS (SELECT 1 FROM matrix_mgmt_rooms WHERE room_id = $1)",
			1, NULL, np, NULL, NULL, 0);
		if (store_check(c, n, PGRES_TUPLES_OK, &e)) { /* clears n */
			LOG_KV(CW_LOG_WARN, "cannot tell whether a room its user left is someone else's", "room", room,
			       "detail", e.msg);
			return true;
		}
		bool someones = PQgetvalue(n, 0, 0)[0] == 't';
		PQclear(n);
		return !someones && !bot_leaves(m, room);
	}
	bool portal = false;
	for (int k = 0; k < PQntuples(r); k++) {
		portal = portal || PQgetvalue(r, k, 1)[0] == 't';
		if (PQgetisnull(r, k, 0))
			continue;
		if (mx_room_action(m, room, PQgetvalue(r, k, 0), "leave", &e))
			LOG_KV_LIMITED(CW_LOG_WARN, "a ghost cannot leave a room its user left", "room", room, "detail",
				       e.msg);
	}
	if (portal && mx_room_action(m, room, NULL, "leave", &e))
		LOG_KV_LIMITED(CW_LOG_WARN, "the bot cannot leave a group its user left", "room", room, "detail",
			       e.msg);
	if (portal)
		LOG_KV_LIMITED(CW_LOG_INFO, "a user left a group's room: they left the group", "room", room, "user",
			       who);
	else if (PQntuples(r) == 1)
		LOG_KV_LIMITED(CW_LOG_INFO, "a user left a bridged room: the next message opens a new one", "room",
			       room, "user", who);
	PQclear(r);
	return false;
}

/* A ghost put out of a bridged room by its user (kicked or banned): in
 * their direct room, the conversation leaves the room (the binding goes,
 * as when the user leaves: the remote user's next message opens a new
 * one, and blocking is what stops them); in their room of a group, the
 * ghost is no longer counted in (matrix_portal_members): its next message
 * there invites it again (a ban refuses that: the user's to lift).  True:
 * the database did not take it, try again later (as left). */
static bool ghost_removed(PGconn *c, const char *room, const char *ghost)
{
	const char *params[] = { room, ghost };
	PGresult *r = PQexecParams(c,
		"WITH g AS (SELECT identity_id AS id FROM identity_bindings WHERE network = 'matrix' AND native_id = $2), "
		"d AS (DELETE FROM room_bindings b USING g WHERE b.network = 'matrix' AND b.native_id = $1 "
		" AND b.remote_identity_id = g.id RETURNING 1), "
		"p AS (DELETE FROM matrix_portal_members pm USING room_bindings b, g WHERE pm.binding_id = b.id "
		" AND b.network = 'matrix' AND b.native_id = $1 AND b.remote_identity_id IS NULL AND pm.identity_id = g.id "
		" RETURNING 1) "
		"SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM p)", 2, NULL, params, NULL, NULL, 0);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) {
		LOG_KV(CW_LOG_WARN, "cannot forget a ghost put out of a room", "room", room, "detail", e.msg);
		return true;
	}
	if (PQgetvalue(r, 0, 0)[0] != '0')
		LOG_KV_LIMITED(CW_LOG_INFO, "a ghost was put out of a direct room: the next message opens a new one",
			       "room", room);
	PQclear(r);
	return false;
}

/* A bridged direct room its user upgraded (an m.room.tombstone, sent by
 * one of this provider's users: POST /rooms/{id}/upgrade).  The homeserver
 * makes the new room with nobody in it but the upgrader (the specification
 * has it invite nobody), and clients hide the old room from then on: left
 * bound, the remote user's messages went on into a room the user no longer
 * sees, and what she wrote in the new one reached nobody (until the
 * thirty-sixth session).  The room is given up as after her leave: the
 * binding goes, the ghost leaves, and the remote user's next message opens
 * a new direct room with a new invite; a client that invites the ghost
 * into the new room (Element does) has it bound at the ghost's join
 * (ghost_joins).  A management room upgraded is forgotten as after her
 * leave (the bot leaves it): left, the consent requests were shown, and
 * counted shown, in a room her client hides; now they wait for the next
 * management room she opens (her client inviting the bot into the new
 * room opens it at once).  A group's portal (no remote user in its
 * binding) is left as it is: giving it up would take the user out of the
 * group. */
static bool upgraded(struct matrix *m, PGconn *c, const char *room)
{
	const char *params[] = { room };
	PGresult *mr = PQexecParams(c, "DELETE FROM matrix_mgmt_rooms WHERE room_id = $1 RETURNING 1", 1, NULL, params,
				    NULL, NULL, 0);
	bool was_mgmt = PQresultStatus(mr) == PGRES_TUPLES_OK && PQntuples(mr) > 0;
	PQclear(mr);
	if (was_mgmt) {
		cw_errmsg e;
		if (mx_room_action(m, room, NULL, "leave", &e))
			LOG_KV_LIMITED(CW_LOG_WARN, "the bot cannot leave an upgraded management room", "room", room,
				       "detail", e.msg);
		return false;
	}
	PGresult *r = PQexecParams(c,
		"WITH b AS (DELETE FROM room_bindings b WHERE b.network = 'matrix' AND b.native_id = $1 "
		" AND b.remote_identity_id IS NOT NULL RETURNING b.remote_identity_id) "
		"SELECT ib.native_id FROM b JOIN identity_bindings ib ON ib.identity_id = b.remote_identity_id "
		" AND ib.network = 'matrix'",
		1, NULL, params, NULL, NULL, 0);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) {
		LOG_KV(CW_LOG_WARN, "cannot unbind an upgraded room", "room", room, "detail", e.msg);
		return true; /* tried again (as left) */
	}
	for (int k = 0; k < PQntuples(r); k++) {
		if (mx_room_action(m, room, PQgetvalue(r, k, 0), "leave", &e))
			LOG_KV_LIMITED(CW_LOG_WARN, "a ghost cannot leave an upgraded room", "room", room, "detail",
				       e.msg);
	}
	if (PQntuples(r) > 0)
		LOG_KV_LIMITED(CW_LOG_INFO, "a bridged direct room was upgraded: the next message opens a new one",
			       "room", room);
	PQclear(r);
	return false;
}

/* An inbox row whose work the homeserver did not take for now: due
 * again after 2 s, 4 s, ... at most BOT_RETRY_MAX_S; after BOT_TRIES
 * tries it goes (false). */
static bool try_later(PGconn *c, const char *id)
{
	char tries[8], max[8];
	snprintf(tries, sizeof(tries), "%d", BOT_TRIES);
	snprintf(max, sizeof(max), "%d", BOT_RETRY_MAX_S);
	const char *params[] = { id, tries, max };
	PGresult *r = PQexecParams(c,
		"UPDATE matrix_bot_inbox SET attempts = attempts + 1, "
		" not_before = now() + least($3::int, 2 * power(2, attempts)) * interval '1 second' "
		"WHERE id = $1::bigint AND attempts + 1 < $2::int RETURNING attempts",
		3, NULL, params, NULL, NULL, 0);
	bool kept = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;
	PQclear(r);
	return kept;
}

/* An inbox row whose work stopped at the homeserver's refusal of the
 * as_token (inbox: it waits for the token, due at once): marked tried, so
 * that its run again once the token is taken is known as a try again (the
 * row's attempts, as try_later's): an invitation of the bot takes no
 * second token of her commands bucket (invited), a leave whose management
 * room was forgotten at the first run leaves all the same (left).  The try
 * that met the refusal counts as one (it was one), the wait for the token
 * none, however long: attempts is made 1 once, the not_before left.
 * Until the fifty-fourth session nothing was marked, and each run again
 * was a first: an invitation held ten times took eleven tokens and was
 * declined (test_an_invitation_of_the_bot_held_for_the_as_token_takes_
 * one_token), and the bot stayed in a management room its user had left
 * (test_the_bots_leave_of_a_management_room_she_left_refused_for_the_as_
 * token_is_tried_again). */
static void held_tried(PGconn *c, const char *id)
{
	const char *params[] = { id };
	cw_errmsg e;
	if (store_command(c, "UPDATE matrix_bot_inbox SET attempts = 1 WHERE id = $1::bigint AND attempts = 0", 1,
			  params, &e))
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot mark tried the bot's work held for the as_token: its run again "
			       "is taken for a first", "inbox_row", id, "detail", e.msg);
}

/* Works off the inbox's due rows; false when there were none. */
static bool inbox(struct matrix *m, PGconn *c, struct command_runs *runs)
{
	char lim[8];
	snprintf(lim, sizeof(lim), "%d", BOT_BATCH);
	const char *params[] = { lim };
	PGresult *r = bot_look(c, BOT_INBOX, 1, params);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		PQclear(r);
		return false;
	}
	int n = PQntuples(r);
	for (int i = 0; i < n; i++) {
		json_t *ev = json_loads(PQgetvalue(r, i, 1), 0, NULL);
		const char *type = json_string_value(json_object_get(ev, "type"));
		const char *room = json_string_value(json_object_get(ev, "room_id"));
		const char *sender = json_string_value(json_object_get(ev, "sender"));
		json_t *content = json_object_get(ev, "content");
		const char *key = json_string_value(json_object_get(ev, "state_key"));
		const char *eid = json_string_value(json_object_get(ev, "event_id"));
		bool again = false; /* the homeserver (or, unbinding, the database) did not take it for now */
		if (type && room && sender && key && strcmp(type, "m.room.member") == 0 &&
		    json_is_string(json_object_get(content, "membership")) &&
		    strcmp(json_string_value(json_object_get(content, "membership")), "invite") == 0) {
			if (strcmp(key, m->bot) == 0)
				again = invited(m, c, room, sender, eid, atoi(PQgetvalue(r, i, 2)) > 0);
			else if (mx_in_ghost_namespace(m->cfg->mx_user_prefix, mx_server_name(m->cfg), key))
				again = ghost_invited(m, c, room, sender, key, eid);
			else {
				int in = intruded(m, c, room, key, eid);
				if (in < 0)
					again = true;
				else if (in == 0)
					local_invited(m, c, room, sender, key, eid);
			}
		}
		else if (type && room && key && strcmp(type, "m.room.member") == 0 &&
			 json_is_string(json_object_get(content, "membership")) &&
			 strcmp(json_string_value(json_object_get(content, "membership")), "join") == 0 &&
			 strcmp(key, m->bot) != 0 && !mx_in_ghost_namespace(m->cfg->mx_user_prefix, mx_server_name(m->cfg), key)) {
			int in = intruded(m, c, room, key, eid);
			if (in < 0)
				again = true;
			else if (in == 0)
				joined_uninvited(m, c, room, key, eid);
		}
		else if (type && room && key && strcmp(type, "m.room.member") == 0 &&
			 json_is_string(json_object_get(content, "membership")) &&
			 (strcmp(json_string_value(json_object_get(content, "membership")), "leave") == 0 ||
			  strcmp(json_string_value(json_object_get(content, "membership")), "ban") == 0)) {
			if (strcmp(key, m->bot) == 0) {
				/* the bot put out of a room by its user: if it was their
				 * management room, it is one no more (requests wait for
				 * the next one they open).  A forgetting the database
				 * did not take is tried again: until the fifty-second
				 * session it was lost, and her consent requests went on
				 * to a room the bot was out of (refused, given up) */
				const char *bp[] = { room };
				cw_errmsg e;
				if (store_command(c, "DELETE FROM matrix_mgmt_rooms WHERE room_id = $1", 1, bp, &e)) {
					LOG_KV(CW_LOG_WARN, "cannot forget a management room the bot was put out of",
					       "room", room, "detail", e.msg);
					again = true;
				}
			} else if (mx_in_ghost_namespace(m->cfg->mx_user_prefix, mx_server_name(m->cfg), key)) {
				again = ghost_removed(c, room, key);
			} else {
				again = left(m, c, room, key, atoi(PQgetvalue(r, i, 2)) > 0);
			}
		}
		else if (type && room && strcmp(type, "m.room.encryption") == 0)
			encrypted(m, c, room, eid);
		else if (type && room && strcmp(type, "m.room.tombstone") == 0)
			again = upgraded(m, c, room);
		else if (type && room && sender && strcmp(type, "m.room.message") == 0 &&
			 json_is_string(json_object_get(content, "body"))) {
			unsigned char h[32];
			char hex[33], txn[48];
			cw_sha256_pair("cwcmd", 5, eid ? eid : "", eid ? strlen(eid) : 0, h);
			cw_hex(hex, h, 16);
			snprintf(txn, sizeof(txn), "cwcmd-%s", hex);
			/* its first run's note (struct command_runs), if any */
			struct command_run stored = { 0 };
			if (!PQgetisnull(r, i, 3)) {
				stored.row = atoll(PQgetvalue(r, i, 0));
				stored.allowed = PQgetvalue(r, i, 3)[0] == 't';
				stored.change = (signed char)(PQgetisnull(r, i, 4) ? 0 : atoi(PQgetvalue(r, i, 4)));
			}
			command(m, c, room, txn, sender, content, PQgetvalue(r, i, 0), &stored, runs);
		}
		json_decref(ev);
		const char *id[] = { PQgetvalue(r, i, 0) };
		/* Not taken because the homeserver refuses the as_token: the
		 * row, and the batch's later ones, wait for the token, the
		 * wait not counted (bot_main does not look meanwhile); the
		 * row is marked tried (held_tried). */
		if (again && atomic_load(&m->token_refused)) {
			held_tried(c, id[0]);
			break;
		}
		if (again && try_later(c, id[0]))
			continue;
		if (again)
			LOG_KV_LIMITED(CW_LOG_WARN, "the homeserver did not take the bot's work in 12 tries (some 40 "
				       "minutes): given up", "inbox_row", PQgetvalue(r, i, 0));
		/* Marked, not deleted: the homeserver sends a transaction whose
		 * answer it did not get again, and the event id kept here stops
		 * its events coming back into the inbox (the insert's ON
		 * CONFLICT) and a command running twice.  Its content is not
		 * needed for that. */
		cw_errmsg e;
		inbox_handled(c, id[0], &e);
	}
	PQclear(r);
	return n > 0;
}

/* A remote user's display name for a line of the bot's: at most 80 bytes
 * of whole UTF-8 sequences, a control character (a line break that would
 * start a line of its own) a space: the name is the peer's to choose, and
 * must not push out or imitate what the bot says after it. */
static void name_for_line(const char *name, char *out, size_t len)
{
	size_t n = 0, max = len - 1 < 80 ? len - 1 : 80;
	const unsigned char *p = (const unsigned char *)name;
	while (*p) {
		unsigned cp;
		size_t k = cw_utf8_seq(p, strlen((const char *)p), &cp);
		if (k == 0 || n + k > max)
			break;
		bool control = cp < 0x20 || (cp >= 0x7f && cp <= 0x9f) || cp == 0x2028 || cp == 0x2029;
		if (control)
			out[n++] = ' ';
		else
			memcpy(out + n, p, k), n += k;
		p += k;
	}
	out[n] = '\0';
}

/* A management room where the homeserver refuses the bot's words for
 * good (a 403: the bot is out of it, or its user took away its right to
 * speak there, as a room's power levels allow; a 404: no such room) is
 * one no more, as after the bot's kick: the bot forgets it and leaves it,
 * and the consent requests wait, unshown, for the next room the user
 * opens with it.  Until the forty-seventh session such a room's requests
 * stayed first in the bot's look (LIMIT BOT_BATCH, oldest first), refused every
 * half minute: twenty of them (one user's, who muted the bot, a few days
 * of first contacts) and no user's request was shown any more. */
static void mgmt_room_refuses(struct matrix *m, PGconn *c, const char *room, long status)
{
	const char *p[] = { room };
	PGresult *d = PQexecParams(c, "DELETE FROM matrix_mgmt_rooms WHERE room_id = $1 RETURNING 1", 1, NULL, p, NULL,
				   NULL, 0);
	bool was = PQresultStatus(d) == PGRES_TUPLES_OK && PQntuples(d) > 0;
	PQclear(d);
	if (!was)
		return;
	char st[16];
	snprintf(st, sizeof(st), "%ld", status);
	LOG_KV_LIMITED(CW_LOG_WARN, "the homeserver refuses the bot's words in a management room: it is one no more",
		       "room", room, "status", st);
	cw_errmsg e;
	if (status == 403 && mx_room_action(m, room, NULL, "leave", &e))
		LOG_KV_LIMITED(CW_LOG_WARN, "the bot cannot leave a management room that refuses it", "room", room,
			       "detail", e.msg);
}

/* The consent requests' pauses (requests): a room whose request was not
 * taken for now waits REQUEST_PAUSE_US, the others go on.  Until the
 * fifty-ninth session one time for every room held them all: one
 * management room whose members could not be read, or whose sends the
 * homeserver failed (a room in a bad state, a homeserver slow for it),
 * held every other user's requests half a minute at each of its tries,
 * that is for as long as it failed.  The paused rooms are left out of
 * the look (BOT_REQUESTS, $4), so that their requests, the oldest, do
 * not fill the batch (BOT_BATCH) and hold back the others'.  At most
 * REQUEST_PAUSES rooms: a room that fails when as many are paused
 * pauses everyone, as before, until the soonest of theirs ends (so no
 * longer than REQUEST_PAUSE_US): that many rooms failing at once is
 * rather the homeserver's trouble than theirs.  all_until: everyone's
 * pause (a 429, the bot's own rate limit; the bot refused everywhere;
 * no answer at all; a room past the bound: request_paused).  Each room
 * id is kept whole, whatever its length (malloc'd): until the sixtieth
 * session a room id longer than MX_ID_MAX, which no homeserver makes
 * (the transactions refuse one: matrix.c) but a row written by hand may
 * hold, was no room to the bound and paused everyone, with the "too many
 * management rooms" line (said now past the bound only, or when no
 * memory is found for the room's id).  In memory: a restart, or the
 * bot's lock taken by another process, tries the rooms at once (the
 * same transaction ids).  Weighed and kept so in the sixty-first
 * session, when the commands' notes went to the database (struct
 * command_runs): a restart tries each paused room once (at most
 * REQUEST_PAUSES), the homeserver's own trouble pausing everyone again
 * from the first or second room tried; stored, each pause would be a
 * write, and a table to trim, for a restart's one try a room. */
#define REQUEST_PAUSES 64
#define REQUEST_PAUSE_US (30 * 1000000LL)

struct request_pauses {
	int64_t all_until; /* on the monotonic clock, as the others */
	int n;
	int64_t until[REQUEST_PAUSES];
	char *room[REQUEST_PAUSES];
};

static void pauses_prune(struct request_pauses *ps, int64_t now)
{
	for (int k = 0; k < ps->n;)
		if (ps->until[k] <= now) {
			free(ps->room[k]);
			ps->n--;
			ps->until[k] = ps->until[ps->n];
			ps->room[k] = ps->room[ps->n];
		} else {
			k++;
		}
}

/* The pauses' rooms freed (the bot's stop). */
static void pauses_free(struct request_pauses *ps)
{
	for (int k = 0; k < ps->n; k++)
		free(ps->room[k]);
	ps->n = 0;
}

static void pause_all(struct request_pauses *ps, int64_t until)
{
	if (until > ps->all_until)
		ps->all_until = until;
}

static void pause_room(struct request_pauses *ps, const char *room, int64_t until)
{
	for (int k = 0; k < ps->n; k++)
		if (strcmp(ps->room[k], room) == 0) {
			if (until > ps->until[k])
				ps->until[k] = until;
			return;
		}
	if (ps->n < REQUEST_PAUSES && (ps->room[ps->n] = strdup(room)) != NULL) {
		ps->until[ps->n++] = until;
		return;
	}
	int64_t soonest = until;
	for (int k = 0; k < ps->n; k++)
		if (ps->until[k] < soonest)
			soonest = ps->until[k];
	LOG_KV_LIMITED(CW_LOG_WARN, "too many management rooms wait to be shown a consent request: every room waits",
		       "room", room);
	pause_all(ps, soonest);
}

/* A consent request of room not shown for now, status the homeserver's
 * answer to its send or to the read of the room's members (0: none, -1:
 * not the homeserver's, a database look not answered), wait_ms the wait
 * a 429 asked for: whose pause it is.  True when it is everyone's (the
 * batch's other requests are not tried).  No connection at all (refused,
 * the address not resolved: request_unreached) is the homeserver's at
 * once.  No answer at all (status 0: a connection closed unanswered, or
 * 10 s, MX_TIMEOUT_MS, without an answer) is the homeserver's, as a 429 is,
 * and the other rooms would fare no better (mx_all_refused, the line the
 * bot's other rounds draw: backed_off_round): a management room holds
 * the user and the bot, and reading its members or saying a notice there
 * is the homeserver's lightest work.  An answer for the room (a 5xx, a
 * 408) is the room's: the homeserver is up and may fail that room alone.
 * Until the sixtieth session no answer was the room's too, and while the
 * homeserver was down each management room with a request waiting had
 * its try (up to REQUEST_PAUSES, then everyone waited) every half
 * minute, where one try does: up to 64 connections refused, or 64
 * times 10 s of the bot's thread, which answers the commands, where the
 * homeserver took connections and answered none. */
/* The rooms of a round of requests() that had no answer at all. */
struct silence {
	int n;
	const char *first; /* the first one's id (the round's result holds it) */
};

/* Whether the last call of the bot's thread found no homeserver to ask
 * (mx_last_call_code): a connection refused, or its name or its proxy's
 * not resolved, at once; not a timeout (10 s) nor a connection closed
 * unanswered, which a homeserver in trouble with one room may give. */
static bool request_unreached(void)
{
	CURLcode cc = mx_last_call_code();
	return cc == CURLE_COULDNT_CONNECT || cc == CURLE_COULDNT_RESOLVE_HOST || cc == CURLE_COULDNT_RESOLVE_PROXY;
}

static bool request_paused(struct matrix *m, struct request_pauses *ps, const char *room, long status, long wait_ms,
			   struct silence *silent)
{
	if (status == 429) {
		pause_all(ps, cw_now_us() + wait_ms * 1000LL);
		return true; /* the others are the bot's too, limited as much */
	}
	if (status == 0 && request_unreached()) {
		/* No connection at all (refused, the name not resolved): the
		 * homeserver down or not reachable from here, whatever the
		 * room; everyone waits at once, the room no longer than the
		 * others (it was not its own trouble).  Until the sixty-first
		 * session it was told apart from a silence by nothing
		 * (mx_last_call_code): a second room was tried, and the two
		 * waited a minute, behind the others, once the homeserver was
		 * back. */
		if (!atomic_load(&m->bot_stop))
			LOG_KV_LIMITED(CW_LOG_WARN, "the homeserver is not reachable (connection refused, or its name "
				       "not resolved): every room's consent requests wait", "room", room);
		pause_all(ps, cw_now_us() + REQUEST_PAUSE_US);
		return true;
	}
	if (status == 0) {
		/* The room waits, and everyone once a second room of the round
		 * has had no answer either, the two rooms twice as long, so
		 * that the next round tries others first: a room whose own read
		 * never answers (past 10 s, an answer past ANSWER_MAX) waits
		 * alone, and two such rooms do not come first again at every
		 * pause's end, where the helper's first version made everyone
		 * wait at each try of one and held everyone's requests up for
		 * good (the session's reviews); with the homeserver down, two
		 * tries a half minute. */
		int64_t now = cw_now_us();
		if (silent->n++ == 0) {
			silent->first = room;
			pause_room(ps, room, now + REQUEST_PAUSE_US);
			return false;
		}
		if (!atomic_load(&m->bot_stop)) /* a read the stop ended is no silence */
			LOG_KV_LIMITED(CW_LOG_WARN,
				       "the homeserver did not answer the bot: every room's consent requests wait",
				       "room", room);
		pause_room(ps, silent->first, now + 2 * REQUEST_PAUSE_US);
		pause_room(ps, room, now + 2 * REQUEST_PAUSE_US);
		pause_all(ps, now + REQUEST_PAUSE_US);
		return true;
	}
	pause_room(ps, room, cw_now_us() + REQUEST_PAUSE_US);
	return false;
}

/* Shows pending consent requests that were not shown yet; one the
 * homeserver did not take for now stays unshown, and is tried again
 * half a minute later, with the same transaction id, as are the batch's
 * others of its room (ps: its room paused, the other rooms' requests
 * shown meanwhile: struct request_pauses); after a 429, when the
 * homeserver asks, everyone's, as after a refusal that is the bot's
 * everywhere (a 401; a 403 or a 404 while the homeserver does not take
 * the bot at all). One it refuses for good (a 403 or a 404, while it
 * takes the bot elsewhere: mx_bot_taken) waits for the user's next
 * management room (mgmt_room_refuses), as do the batch's others of that
 * room.
 *
 * The requests of a room where someone else's member event waits in the
 * bot's inbox (INBOX_NEWCOMER) are not read at all: request_still would
 * hold each back, and the bot's handling of that event ends the room.
 * Until the fifty-fifth session they were read, and the room's members
 * read from the homeserver (hers_alone), at every round of the bot (each
 * half second at most) until it handled the event; when its handling
 * failed (the room's end refused by the database), the event waited up
 * to BOT_RETRY_MAX_S between tries, each of the requests' rooms read
 * meanwhile twice a second; and such rooms' requests, the oldest, could
 * fill the batch (BOT_BATCH) and hold back every other user's. */
static void requests(struct matrix *m, PGconn *c, struct request_pauses *ps)
{
	int64_t now = cw_now_us();
	if (now < ps->all_until)
		return;
	pauses_prune(ps, now);
	char ghosts[80];
	const char *p[4];
	newcomer_params(m, p, ghosts, sizeof(ghosts));
	char *paused = cw_pg_texts((const char *const *)ps->room, (size_t)ps->n); /* BOT_REQUESTS's $4 */
	if (!paused)
		return;
	p[3] = paused;
	PGresult *r = bot_look(c, BOT_REQUESTS, 4, p);
	free(paused);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		PQclear(r);
		return;
	}
	bool done[BOT_BATCH] = { false }; /* the batch's rows whose room is done with (refused, paused) */
	struct silence silent = { 0, NULL }; /* rooms of the round that had no answer at all (request_paused) */
	struct alone_memo memo = { 0 };
	for (int i = 0; i < PQntuples(r) && i < BOT_BATCH; i++) {
		bool gone = false;
		for (int k = 0; k < i && !gone; k++)
			gone = done[k] && strcmp(PQgetvalue(r, k, 1), PQgetvalue(r, i, 1)) == 0;
		if (gone)
			continue;
		char text[2400], name[81];
		name_for_line(PQgetvalue(r, i, 4), name, sizeof(name));
		snprintf(text, sizeof(text),
			 "%s%s%s%s (network %s) wants to write to you. Their messages wait until you answer.\n"
			 MX_BOT_REQUEST_LINE "\n"
			 "The conversation is bridged: encryption ends at this gateway.",
			 name[0] ? "\"" : "", name, name[0] ? "\" " : "", PQgetvalue(r, i, 2), PQgetvalue(r, i, 3),
			 PQgetvalue(r, i, 2), PQgetvalue(r, i, 2));
		char txn[48];
		snprintf(txn, sizeof(txn), "cwreq-%s", PQgetvalue(r, i, 0));
		/* Shown only while the room is still hers alone (hers_alone,
		 * as a command's answer): someone else come in, their member
		 * event not handled yet, would read it (until the fifty-second
		 * session they did).  Ended so, or no management room now,
		 * the request waits for her next one, as the batch's others
		 * of the room do; not known for now: the room paused.  Looked
		 * at once for the batch's requests of a room (hers_alone_once). */
		long unread;
		int alone = hers_alone_once(m, c, &memo, PQgetvalue(r, i, 1), PQgetvalue(r, i, 5), txn, &unread);
		if (alone == 1) /* and at its send (request_still) */
			alone = request_still(m, c, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1));
		if (alone != 1) {
			done[i] = true;
			/* a 429 of the members' read: the wait it asked for, or a
			 * pause's when it named none (not a try a second) */
			long asked = mx_rate_limited_wait_ms() > 0 ? mx_rate_limited_wait_ms()
								   : (long)(REQUEST_PAUSE_US / 1000);
			if (alone == -2 && request_paused(m, ps, PQgetvalue(r, i, 1), unread, asked, &silent))
				break;
			continue;
		}
		long status, wait;
		if (!say_txn(m, PQgetvalue(r, i, 1), NULL, text, txn, &status, &wait)) {
			done[i] = true;
			if ((status == 403 || status == 404) && mx_bot_taken(m)) {
				mgmt_room_refuses(m, c, PQgetvalue(r, i, 1), status);
				continue;
			}
			if (status == 401 || status == 403 || status == 404) {
				pause_all(ps, cw_now_us() + REQUEST_PAUSE_US);
				break; /* the bot refused everywhere: the others would be */
			}
			if (status == 429 && mx_rate_limited_wait_ms() <= 0) /* a 429 naming no wait: a pause's */
				wait = (long)(REQUEST_PAUSE_US / 1000);
			if (request_paused(m, ps, PQgetvalue(r, i, 1), status, wait, &silent))
				break;
			continue;
		}
		const char *id[] = { PQgetvalue(r, i, 0) };
		cw_errmsg e;
		store_command(c, "UPDATE consent_requests SET notified_at = now() WHERE id = $1::bigint", 1, id, &e);
	}
	PQclear(r);
}

/* How far back (days) the bot looks for consent requests' expiries at its
 * start: below BOT_HANDLED_KEEP_DAYS, how long the notice of one told is
 * kept (forget_handled), so that nothing is told twice. */
#define EXPIRY_LOOKBACK_DAYS (BOT_HANDLED_KEEP_DAYS - 1)

/* A consent request shown to the user that expired without an answer (the
 * policy's sweep expires it with its held messages, whose content is
 * deleted, and records it: consent.expire, docs/policy.md) is withdrawn
 * in the user's management room: one notice, so that the request shown
 * there does not stand as if it could still be answered (until the
 * thirty-second session it did; the XMPP component withdraws it from the
 * roster, reading the same records).  Only in a management room the user
 * had when the request expired (one opened later is not told an old
 * expiry), when no newer request of the same sender stands (a pending one
 * is shown as any, a decided or expired one has its own answer), and when
 * the user has not decided about the sender since (a consent of theirs
 * about them or their domain newer than the record: told after an
 * "accept", the notice would be wrong).  The records are read by audit id
 * (audit_log_action_id_idx) from *seen on, a cursor in memory (-1: none
 * yet, at the start or once the bot's lock is taken again: from the
 * records of the last EXPIRY_LOOKBACK_DAYS days); each notice is queued
 * once (its transaction id, cwexpire-<audit id>, unique in
 * matrix_notices, where it is kept seven days once sent), and sent by
 * notices.  The cursor passes a record only when it is a minute old: a
 * sweep's transaction that took its id before another's, and committed
 * after it, is still read.  A record the cursor passed untold (no room
 * then, a newer request) fails those tests for good, so the look back
 * after a restart tells none of them late (until the thirty-second
 * session's review it told them, days late, after the user had accepted
 * the sender): the cursor needs no table of its own. */
static void expiries(struct matrix *m, PGconn *c, int64_t *seen)
{
	char from[24], days[8];
	snprintf(days, sizeof(days), "%d", EXPIRY_LOOKBACK_DAYS);
	if (*seen < 0) {
		const char *p[] = { days };
		PGresult *r = PQexecParams(c,
			"SELECT coalesce((SELECT id - 1 FROM audit_log WHERE at > now() - $1::int * interval '1 day' "
			" ORDER BY at LIMIT 1), (SELECT max(id) FROM audit_log), 0)", 1, NULL, p, NULL, NULL, 0);
		if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
			*seen = atoll(PQgetvalue(r, 0, 0));
		PQclear(r);
		if (*seen < 0)
			return;
	}
	snprintf(from, sizeof(from), "%lld", (long long)*seen);
	const char *p[] = { from };
	PGresult *r = bot_look(c, BOT_EXPIRIES, 1, p);
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		PQclear(r);
		return;
	}
	int n = PQntuples(r);
	for (int i = 0; i < n; i++) {
		char text[1200], name[81], txn[48];
		name_for_line(PQgetvalue(r, i, 4), name, sizeof(name));
		/* Withdrawn because the server's rules, or her opt-out of the
		 * network, now refuse the sender (its record names why, since
		 * the forty-third session): they will not be asked again. */
		const char *why = PQgetvalue(r, i, 5);
		snprintf(text, sizeof(text),
			 !why[0] ? "The request from %s%s%s%s (network %s) expired without an answer: their waiting messages "
				   "were deleted. If they write again, you will be asked again."
			 : strcmp(why, "user_not_opted_in") == 0
				 ? "The request from %s%s%s%s (network %s) was withdrawn: you opted out of that network, and "
				   "their waiting messages were deleted."
				 : "The request from %s%s%s%s (network %s) was withdrawn: this server no longer takes "
				   "messages from them, and their waiting messages were deleted.",
			 name[0] ? "\"" : "", name, name[0] ? "\" " : "", PQgetvalue(r, i, 2), PQgetvalue(r, i, 3));
		snprintf(txn, sizeof(txn), "cwexpire-%s", PQgetvalue(r, i, 0));
		const char *q[] = { PQgetvalue(r, i, 1), text, m->bot, txn };
		cw_errmsg e;
		if (store_command(c, "INSERT INTO matrix_notices (room_id, body, sender, txn_id) VALUES ($1, $2, $3, $4) "
				     "ON CONFLICT DO NOTHING", 4, q, &e))
			LOG_KV(CW_LOG_WARN, "cannot queue the notice of an expired request: queued at the next look",
			       "detail", e.msg);
	}
	PQclear(r);
	if (n == BOT_BATCH)
		return; /* more to queue: the cursor waits for them */
	r = bot_look(c, BOT_EXPIRY_CURSOR, 1, p);
	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
		*seen = atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
}

/* One bot acts for all the processes that share a database: the holder of
 * this session-level advisory lock (taken again by another process when
 * the holder's connection ends).  Without it each process's bot would read
 * the same inbox rows and pending requests and the user would be answered
 * once per process; and portal_lock, which reads a room's binding before
 * the group's lock, counts on no other bot changing the binding meanwhile. */
static bool bot_lock(PGconn *c)
{
	PGresult *r = PQexec(c, "SELECT pg_try_advisory_lock(hashtextextended('causeway.matrix-bot', 0))");
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && PQgetvalue(r, 0, 0)[0] == 't';
	PQclear(r);
	return ok;
}

/* The rows of one of the bot's rounds of looking for work (k: for what);
 * NULL, logged, when the database did not answer. */
static PGresult *look_for(PGconn *c, enum bot_look k, const char *what)
{
	PGresult *r = bot_look(c, k, 0, NULL);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) {
		LOG_KV(CW_LOG_WARN, "the bot cannot look for its work", "what", what, "detail", e.msg);
		return NULL;
	}
	return r;
}

/* A round of the bot's that asks the homeserver something for each row a
 * look finds (departure_row, rename_row, invitation_row), backing off
 * while the homeserver does not take it.  A homeserver that did not
 * answer, or answered 429, ends the round (the next row would fare no
 * better), and the whole round is tried again 2 s, 4 s, ... (at most
 * BOT_RETRY_MAX_S) later, or when the 429 asked if that is later.
 * Another failure (a 5xx, say) may be that row's alone: the round goes
 * on, and that row alone backs off the same way (its key, the row's
 * columns; in memory, forgotten once a whole round's look no longer
 * finds it).  The rows left wait in the database, not here.  Until the
 * forty-sixth session each round had a loop of its own, and the makings
 * of portals went on after no answer: a homeserver that did not answer
 * held the bot up its 10 s (MX_TIMEOUT_MS) for each user invited, up to
 * 16 a round (test_a_homeserver_not_answering_ends_the_round_of_portal_makings).
 * Until the fiftieth session a 5xx backed off the whole round: one room
 * whose leave the homeserver kept refusing held every later departure
 * (renamed group, invitation) up to BOT_RETRY_MAX_S
 * (test_a_ghosts_refused_leave_holds_up_no_other_departure). */

enum row_outcome {
	ROW_DONE,      /* taken (or refused for good: not asked again) */
	ROW_AGAIN,     /* not taken for now: the round goes on, that row backs off */
	ROW_AGAIN_ALL, /* no answer, or 429: the round ends, and backs off */
};

/* One row of a round: *wait_ms the wait a 429 asked for, else 0. */
typedef enum row_outcome (*row_fn)(struct matrix *m, PGconn *c, PGresult *r, int i, long *wait_ms);

/* The rows a look gives at most (the statements' LIMIT): a round's rows
 * backing off each fit, with those of the round before. */
#define BOT_ROUND_ROWS 64

struct bot_round {
	struct store_backoff all; /* the whole round's (no answer, a 429) */
	unsigned long looks;      /* its looks so far */
	int nrows;
	struct {
		uint64_t key;         /* row_key */
		unsigned long seen;   /* the last look that found it */
		struct store_backoff b;
	} rows[BOT_ROUND_ROWS];
};

/* A row's key: FNV-1a (fnv.h) of its columns, each a value and a byte
 * that ends it (NULL apart from ''), of which a look's rows have at most
 * BOT_ROUND_ROWS. */
static uint64_t row_key(PGresult *r, int i)
{
	uint64_t h = FNV1A_START;
	for (int f = 0; f < PQnfields(r); f++) {
		const unsigned char end = PQgetisnull(r, i, f) ? 0xfe : 0xff;
		h = fnv1a(h, PQgetvalue(r, i, f), (size_t)PQgetlength(r, i, f));
		h = fnv1a(h, &end, 1);
	}
	return h;
}

/* The slot of a row's own backoff (add: made if there is none and room
 * for it); -1: none. */
static int round_row(struct bot_round *s, uint64_t key, bool add)
{
	for (int k = 0; k < s->nrows; k++)
		if (s->rows[k].key == key)
			return k;
	if (!add || s->nrows == BOT_ROUND_ROWS)
		return -1;
	s->rows[s->nrows].key = key;
	s->rows[s->nrows].b = (struct store_backoff){ 0, 0 };
	return s->nrows++;
}

static void round_row_drop(struct bot_round *s, int k)
{
	s->rows[k] = s->rows[--s->nrows];
}

/* Backs b off: 2 s, 4 s, ..., or what a 429 asked (wait_ms) when longer. */
static void bot_back_off(struct store_backoff *b, long wait_ms)
{
	if (wait_ms * 1000LL > store_backoff_grow(b, 2000000, BOT_RETRY_MAX_S * 1000000LL, false))
		b->retry_at_us = cw_now_us() + wait_ms * 1000LL;
}

static void backed_off_round(struct matrix *m, PGconn *c, enum bot_look look, const char *what, struct bot_round *s,
			     row_fn fn)
{
	int64_t now = cw_now_us();
	if (now < s->all.retry_at_us)
		return;
	PGresult *r = look_for(c, look, what);
	if (!r)
		return;
	s->looks++;
	bool ended = false;
	long wait = 0;
	for (int i = 0; i < PQntuples(r) && !ended; i++) {
		uint64_t key = row_key(r, i);
		int k = round_row(s, key, false);
		if (k >= 0) {
			s->rows[k].seen = s->looks;
			if (now < s->rows[k].b.retry_at_us)
				continue;
		}
		long w = 0;
		enum row_outcome o = fn(m, c, r, i, &w);
		if (o == ROW_DONE) {
			if (k >= 0)
				round_row_drop(s, k);
		} else if (o == ROW_AGAIN_ALL || (k = round_row(s, key, true)) < 0) {
			ended = true; /* no room to note the row's own (not met: the LIMIT): the round's */
			wait = w;
		} else {
			s->rows[k].seen = s->looks;
			bot_back_off(&s->rows[k].b, w);
		}
	}
	PQclear(r);
	if (ended) {
		bot_back_off(&s->all, wait);
		return;
	}
	store_backoff_reset(&s->all);
	for (int k = s->nrows - 1; k >= 0; k--) /* rows the look found no more: done elsewhere, or gone */
		if (s->rows[k].seen != s->looks)
			round_row_drop(s, k);
}

/* Portals whose group was renamed (PATCH /v1/rooms/{room}, which wakes
 * the bot) since the bot last named them take the new name at its next
 * round (BOT_RENAMES: room, binding, name).  A rename the homeserver did
 * not take for now (no answer, a 5xx, a 429, a 401: mx_for_now) is tried
 * again as backed_off_round says.  Until the forty-fifth session a
 * failing homeserver was asked every round. */
static enum row_outcome rename_row(struct matrix *m, PGconn *c, PGresult *r, int i, long *wait_ms)
{
	long status;
	if (mx_rename_portal(m, c, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetisnull(r, i, 2) ? NULL : PQgetvalue(r, i, 2),
			     &status, wait_ms))
		return ROW_DONE;
	return mx_all_refused(status) ? ROW_AGAIN_ALL : ROW_AGAIN;
}

/* The ghosts of members who are no longer in a group (the peer removed
 * them: POST /v1/rooms/{room}/members) leave its rooms, so that the users
 * see them go; one who comes back joins again with their next message
 * (BOT_DEPARTURES: room, ghost, binding, member).  A ghost whose messages
 * written before (to that room's user) are still on their way stays until
 * they are delivered (or given up): until the forty-seventh session it
 * left at once, and such a message brought it back, the user seeing it
 * join, write and leave again.  The ghost counts as out of the room
 * (matrix_portal_members) once the homeserver took its leave, or refused
 * it for good (another 4xx: it is not in the room, the user put it out);
 * a leave not taken for now (no answer, a 5xx, a 429, a 401: mx_for_now) is tried again as
 * backed_off_round says.  Until the forty-ninth session the ghost was
 * counted out before its leave was asked, and a leave the homeserver did
 * not take left it in the user's room for good, the member gone
 * (test_a_ghost_whose_leave_of_a_portal_fails_leaves_it_later). */
static enum row_outcome departure_row(struct matrix *m, PGconn *c, PGresult *r, int i, long *wait_ms)
{
	long status = 0;
	cw_errmsg e;
	*wait_ms = 0;
	if (mx_room_post(m, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), "leave", json_object(), &status, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "a ghost cannot leave a group it left", "room", PQgetvalue(r, i, 0),
			       "detail", e.msg);
		if (status == 429)
			*wait_ms = mx_rate_limited_wait_ms();
		if (mx_all_refused(status))
			return ROW_AGAIN_ALL;
		if (mx_for_now(status))
			return ROW_AGAIN;
	}
	const char *params[] = { PQgetvalue(r, i, 2), PQgetvalue(r, i, 3) };
	if (store_command(c, "DELETE FROM matrix_portal_members WHERE binding_id = $1::bigint "
			  "AND identity_id = $2::bigint", 2, params, &e)) {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot record a ghost's leave of a group", "room", PQgetvalue(r, i, 0),
			       "detail", e.msg);
		return ROW_AGAIN;
	}
	return ROW_DONE;
}

/* Handled inbox rows, and the notices of refused events once done, are
 * kept BOT_HANDLED_KEEP_DAYS (a homeserver sends a transaction again until
 * it gets an answer: after a crash, once the daemon is back), then
 * forgotten; looked for once an hour.  What they are kept for is
 * their ids: an inbox row's event is emptied once handled (inbox_handled),
 * and a done notice's text (whom she accepted or blocked, who wrote to
 * her, her list) is erased content_days (retention.content_days, 0: never)
 * after it was queued, when that comes first (schema/044; until the
 * forty-fifth session's review it stayed the seven days whatever
 * content_days said). */
static void forget_handled(struct matrix *m, PGconn *c, int64_t *next_us)
{
	int64_t now = cw_now_us();
	if (now < *next_us)
		return;
	*next_us = now + 3600 * (int64_t)1000000;
	char days[8], content[24];
	snprintf(days, sizeof(days), "%d", BOT_HANDLED_KEEP_DAYS);
	const char *params[] = { days };
	cw_errmsg e;
	if (m->app->cfg->retention_content_days > 0) {
		snprintf(content, sizeof(content), "%ld", m->app->cfg->retention_content_days);
		const char *cp[] = { content };
		if (store_command(c, "UPDATE matrix_notices SET body = NULL WHERE done_at IS NOT NULL AND body IS NOT NULL "
				     "AND created_at < now() - $1::int * interval '1 day'", 1, cp, &e))
			LOG_KV(CW_LOG_WARN, "cannot erase the text of the notices told", "detail", e.msg);
	}
	if (store_command(c, "DELETE FROM matrix_bot_inbox WHERE handled_at < now() - $1::int * interval '1 day'", 1,
			  params, &e))
		LOG_KV(CW_LOG_WARN, "cannot forget the bot's handled events", "detail", e.msg);
	/* and the notices of refused events, kept as long (notice_queue) */
	if (store_command(c, "DELETE FROM matrix_notices WHERE done_at < now() - $1::int * interval '1 day'", 1,
			  params, &e))
		LOG_KV(CW_LOG_WARN, "cannot forget the notices told", "detail", e.msg);
}

/* A local user invited to a group (local_invited) is invited to a portal
 * of their own, made by the bot (BOT_INVITATIONS: group, its name, the
 * user's identity and Matrix id); they are the group's member once they
 * join it.  One that could not be made (the homeserver away) is tried
 * again as backed_off_round says: a homeserver may have made the room
 * before it failed, and a room each round would pile up.  Until the
 * forty-fifth session's review a 429's wait was not kept: a homeserver
 * asking 30 s was asked again after 2 s, 4 s, ...  An invitation the
 * homeserver refuses for good (a 403: the user's server refuses it, as
 * Synapse answers when a federated invitation is refused, or a server's
 * policy forbids it; a 404: no such user), while it takes the bot
 * (mx_bot_taken), ends as a decline does (mx_portal_refusal_ends): the member is marked left (the
 * peer is not told, as of a decline), with a line in the log, and the
 * room the making left behind is left (portal_refused); the peer may
 * invite them again.  One not taken for now goes to the back of the look
 * (its updated_at), behind the other invited users.  Until the forty-seventh session both stayed
 * first in the look (LIMIT 16, in a fixed order), asked again for ever,
 * and sixteen refused invitations held up every other user's portal
 * (test_a_refused_portal_invitation_holds_up_no_one_elses). */
static enum row_outcome invitation_row(struct matrix *m, PGconn *c, PGresult *r, int i, long *wait_ms)
{
	char room[MX_ID_MAX + 1], binding[24];
	cw_errmsg e;
	long status = 0;
	cw_err rc = mx_ensure_portal(m, c, PQgetvalue(r, i, 0), PQgetisnull(r, i, 1) ? NULL : PQgetvalue(r, i, 1),
				     PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), room, sizeof(room), binding, sizeof(binding),
				     wait_ms, &status, &e);
	if (rc == CW_OK)
		return ROW_DONE; /* a join that came before the binding: mx_ensure_portal asked */
	if (mx_portal_refusal_ends(m, c, PQgetvalue(r, i, 0), PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), rc, status,
				   e.msg))
		return ROW_DONE;
	const char *params[] = { PQgetvalue(r, i, 0), PQgetvalue(r, i, 2) };
	cw_errmsg e2;
	LOG_KV_LIMITED(CW_LOG_WARN, "cannot make the room of a user invited to a group", "user", PQgetvalue(r, i, 3),
		       "detail", e.msg);
	if (store_command(c, "UPDATE room_members SET updated_at = now() WHERE room_id = $1::bigint "
			  "AND identity_id = $2::bigint AND membership = 'invited'", 2, params, &e2))
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot put back a user invited to a group", "detail", e2.msg);
	/* CW_EUNAVAIL: no answer (mx_call), or no database */
	return *wait_ms > 0 || rc == CW_EUNAVAIL ? ROW_AGAIN_ALL : ROW_AGAIN;
}

/* Invited members whose portal is bound, still invited a minute after
 * their last look: the homeserver is asked whether they joined
 * (mx_mark_if_joined: a join the daemon missed, taken by an older daemon
 * during a rolling restart, say); one not joined is looked at again a
 * minute later (updated_at).  Their Matrix id is their identity binding's,
 * or, for a user a peer put into a group (schema/037), who has none (the
 * bot never met her), made of her localpart as her portal's invitation
 * made it (mx_deliver.c); until the thirty-second session only members
 * with a binding were looked at, and such a user's missed join was never
 * found. */
static void invitees_joined(struct matrix *m, PGconn *c)
{
	const char *server[] = { mx_server_name(m->cfg) };
	PGresult *r = bot_look(c, BOT_INVITEES, 1, server);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) {
		LOG_KV(CW_LOG_WARN, "the bot cannot look for its work", "what", "invited members who may have joined",
		       "detail", e.msg);
		return;
	}
	for (int i = 0; i < PQntuples(r); i++) {
		if (mx_user_id_parse(PQgetvalue(r, i, 3), NULL, 0, NULL, 0) &&
		    mx_mark_if_joined(m, c, PQgetvalue(r, i, 2), PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
				      PQgetvalue(r, i, 3)))
			continue;
		const char *params[] = { PQgetvalue(r, i, 0), PQgetvalue(r, i, 1) };
		if (store_command(c, "UPDATE room_members SET updated_at = now() WHERE room_id = $1::bigint "
				  "AND identity_id = $2::bigint AND membership = 'invited'", 2, params, &e))
			LOG_KV(CW_LOG_WARN, "cannot note a look at an invited member", "detail", e.msg);
	}
	PQclear(r);
}

/* A member event of someone other than management room mr's user and
 * the bot (and its ghosts: MX_GHOST_SQL, prefix the parameter of "@" and
 * the prefix, server the server name's; bot the bot's), invited or
 * joining, waiting in the bot's inbox (stored by the transaction path,
 * matrix.c txn_bot_send, for the bot to handle after the batch it is in:
 * intruded).
 *
 * The room's rows are found by matrix_bot_inbox_room_idx (schema/053), a
 * probe of mr's room alone, whatever the number of unhandled rows: those
 * waiting for a retry (the homeserver did not answer their handling) are
 * as many as the bot's events during an outage, thousands, and until the
 * fifty-sixth session every one was read (matrix_bot_inbox_due_idx, its
 * event parsed) for each look: BOT_REQUESTS, whose planner took the jsonb
 * conditions for 2 or 3 rows and compared each with each request read
 * (half a second a round at 10,000 rows), and each send's look (10-600
 * ms).  OFFSET 0 keeps the subquery a probe per room (the planner may not
 * make it an anti-join over all of them); "(handled_at IS NULL) IS TRUE"
 * says the same as "handled_at IS NULL" in a form the due index's
 * predicate cannot be proved from, so that stale statistics, which take
 * that index for empty, do not choose it (docs/performance.md,
 * "Fifty-sixth session"). */
#define INBOX_NEWCOMER(mr, bot, prefix, server)                                                                      \
	"EXISTS (SELECT 1 FROM matrix_bot_inbox b WHERE (b.handled_at IS NULL) IS TRUE "                               \
	" AND b.event->>'room_id' = " mr ".room_id "                                                                   \
	" AND b.event->>'type' = 'm.room.member' AND b.event->'content'->>'membership' IN ('invite', 'join') "         \
	" AND b.event->>'state_key' NOT IN (" mr ".user_id, " bot ") "                                                 \
	" AND NOT " MX_GHOST_SQL("(b.event->>'state_key')", prefix, server) " OFFSET 0)"

/* The looks of enum bot_look, each the statement of the function of its
 * name (inbox, requests, expiries, notices, invitees_joined;
 * BOT_DEPARTURES, BOT_RENAMES and BOT_INVITATIONS the rounds of
 * departure_row, rename_row and invitation_row), which says what it
 * looks for; BOT_NOTICE_SAY and BOT_REQUEST_SAY the checks at a send of
 * notice_still and request_still; and dead_letters'
 * (dispatcher_dead_stmts). */
static const struct store_stmt bot_stmts[BOT_LOOKS + 1] = {
	[BOT_INBOX] = { "mx_bot_inbox",
		"SELECT id, event::text, attempts, command_allowed, change_allowed FROM matrix_bot_inbox "
		"WHERE handled_at IS NULL "
		"AND (not_before IS NULL OR not_before <= now()) ORDER BY id LIMIT $1::int" },
	[BOT_REQUESTS] = { "mx_bot_requests",
		"SELECT q.id, mr.room_id, ri.uri, ri.network, coalesce(ri.display_name, ''), mr.user_id "
		"FROM consent_requests q "
		" JOIN matrix_mgmt_rooms mr ON mr.identity_id = q.local_identity_id "
		" JOIN identities ri ON ri.id = q.remote_identity_id "
		"WHERE q.state = 'pending' AND q.notified_at IS NULL AND NOT EXISTS (SELECT 1 FROM matrix_notices x "
		" WHERE x.room_id = mr.room_id AND " NOTICE_WAITS("x") ") "
		" AND NOT " INBOX_NEWCOMER("mr", "$1::text", "$2::text", "$3::text") " "
		" AND mr.room_id <> ALL ($4::text[]) "
		"ORDER BY q.id LIMIT " BOT_BATCH_SQL },
	[BOT_EXPIRIES] = { "mx_bot_expiries",
		"SELECT a.id, mr.room_id, ri.uri, ri.network, coalesce(ri.display_name, ''), "
		" coalesce(a.details->>'reason', '') FROM audit_log a "
		" JOIN consent_requests q ON q.id = (a.details->>'request')::bigint AND q.state = 'expired' "
		"  AND q.notified_at IS NOT NULL "
		" JOIN matrix_mgmt_rooms mr ON mr.identity_id = q.local_identity_id AND mr.created_at <= a.at "
		" JOIN identities ri ON ri.id = q.remote_identity_id "
		"WHERE a.action = 'consent.expire' AND a.actor = 'policy' AND a.id > $1::bigint "
		" AND NOT EXISTS (SELECT 1 FROM consent_requests n WHERE n.local_identity_id = q.local_identity_id "
		"  AND n.remote_identity_id = q.remote_identity_id AND n.id > q.id) "
		" AND NOT EXISTS (SELECT 1 FROM consents k WHERE k.local_identity_id = q.local_identity_id "
		"  AND k.updated_at > a.at AND ((k.subject_kind = 'user' AND k.subject = ri.uri) "
		"  OR (k.subject_kind = 'domain' AND k.subject = ri.domain))) "
		" AND NOT EXISTS (SELECT 1 FROM matrix_notices x WHERE x.txn_id = 'cwexpire-' || a.id) "
		"ORDER BY a.id LIMIT " BOT_BATCH_SQL },
	[BOT_EXPIRY_CURSOR] = { "mx_bot_expiry_cursor",
		"SELECT max(id) FROM audit_log WHERE action = 'consent.expire' AND id > $1::bigint "
		"AND at < now() - interval '1 minute'" },
	[BOT_NOTICES] = { "mx_bot_notices",
		"WITH d AS (SELECT id FROM matrix_notices x WHERE next_at <= now() AND done_at IS NULL "
		"  AND NOT EXISTS (SELECT 1 FROM matrix_notices y WHERE y.room_id = x.room_id AND y.id < x.id "
		"  AND y.next_at > now() AND " NOTICE_WAITS("y") ") "
		"  ORDER BY id LIMIT " BOT_BATCH_SQL " "
		"  FOR UPDATE SKIP LOCKED), "
		"t AS (UPDATE matrix_notices x SET tries = x.tries + 1, "
		"  next_at = now() + least(power(2, x.tries + 1), 600) * interval '1 second' FROM d WHERE x.id = d.id "
		"  RETURNING x.id, x.room_id, x.body, x.created_at < now() - interval '1 day' AS stale, x.sender, x.txn_id, "
		"  x.then_leave) "
		"SELECT t.id, t.room_id, t.body, t.stale, coalesce(t.sender, " NOTICE_SENDER_SQL("t.room_id") "), t.txn_id, "
		" t.then_leave, (SELECT mr.user_id FROM matrix_mgmt_rooms mr WHERE mr.room_id = t.room_id) "
		"FROM t ORDER BY t.id" },
	[BOT_DEPARTURES] = { "mx_bot_departures",
		"SELECT b.native_id, ib.native_id, pm.binding_id, pm.identity_id FROM matrix_portal_members pm "
		"JOIN room_bindings b ON b.id = pm.binding_id "
		"JOIN room_members x ON x.room_id = b.room_id AND x.identity_id = pm.identity_id "
		"JOIN identity_bindings ib ON ib.identity_id = pm.identity_id AND ib.network = 'matrix' "
		"WHERE x.membership <> 'joined' AND NOT EXISTS (SELECT 1 FROM outbox o "
		" JOIN events ev ON ev.id = o.event_id WHERE o.room_id = b.room_id AND o.destination = 'matrix' AND o.state IN ('pending', 'in_flight') "
		" AND o.target_identity_id = b.local_identity_id AND ev.sender_id = pm.identity_id "
		" AND ev.type <> 'membership') "
		"ORDER BY pm.binding_id, pm.identity_id LIMIT 64" },
	[BOT_RENAMES] = { "mx_bot_renames",
		"SELECT b.native_id, b.id, rm.name FROM room_bindings b JOIN rooms rm ON rm.id = b.room_id "
		"JOIN room_members x ON x.room_id = b.room_id AND x.identity_id = b.local_identity_id "
		"WHERE b.network = 'matrix' AND b.remote_identity_id IS NULL AND b.local_identity_id IS NOT NULL "
		" AND rm.kind = 'group' AND x.membership = 'joined' AND rm.name IS DISTINCT FROM b.name_synced "
		"ORDER BY b.id LIMIT 64" },
	[BOT_INVITATIONS] = { "mx_bot_invitations",
		"SELECT x.room_id, rm.name, x.identity_id, ib.native_id FROM room_members x "
		"JOIN rooms rm ON rm.id = x.room_id AND rm.kind = 'group' "
		"JOIN identities i ON i.id = x.identity_id AND i.is_local "
		"JOIN identity_bindings ib ON ib.identity_id = i.id AND ib.network = 'matrix' "
		"WHERE x.membership = 'invited' AND NOT x.peer_invited AND NOT EXISTS (SELECT 1 FROM room_bindings b "
		" WHERE b.network = 'matrix' AND b.room_id = x.room_id AND b.local_identity_id = x.identity_id) "
		"ORDER BY x.updated_at, x.room_id, x.identity_id LIMIT 16" },
	[BOT_INVITEES] = { "mx_bot_invitees",
		"SELECT x.room_id, x.identity_id, b.native_id, coalesce(ib.native_id, '@' || i.localpart || ':' || $1) "
		"FROM room_members x "
		"JOIN room_bindings b ON b.network = 'matrix' AND b.room_id = x.room_id "
		" AND b.local_identity_id = x.identity_id AND b.remote_identity_id IS NULL "
		"JOIN identities i ON i.id = x.identity_id AND i.is_local "
		"LEFT JOIN identity_bindings ib ON ib.identity_id = x.identity_id AND ib.network = 'matrix' "
		"WHERE x.membership = 'invited' AND x.updated_at < now() - interval '1 minute' "
		"ORDER BY x.updated_at LIMIT 16" },
	[BOT_NOTICE_SAY] = { "mx_bot_notice_say",
		"SELECT x.done_at IS NOT NULL, (SELECT mr.user_id FROM matrix_mgmt_rooms mr WHERE mr.room_id = x.room_id) "
		" IS DISTINCT FROM $2::text OR EXISTS (SELECT 1 FROM matrix_mgmt_rooms mr WHERE mr.room_id = x.room_id AND "
		INBOX_NEWCOMER("mr", "$3::text", "$4::text", "$5::text") ") FROM matrix_notices x WHERE x.id = $1::bigint" },
	[BOT_REQUEST_SAY] = { "mx_bot_request_say",
		"SELECT 1 FROM consent_requests q JOIN matrix_mgmt_rooms mr ON mr.identity_id = q.local_identity_id "
		" AND mr.room_id = $2 WHERE q.id = $1::bigint AND q.state = 'pending' AND q.notified_at IS NULL "
		" AND NOT " INBOX_NEWCOMER("mr", "$3::text", "$4::text", "$5::text") },
	[BOT_LOOKS] = { NULL, NULL },
};
static const struct store_stmt *const bot_stmt_lists[] = { bot_stmts, dispatcher_dead_stmts, NULL };

static bool bot_gives_up(void *arg)
{
	struct matrix *m = arg;
	return atomic_load(&m->bot_stop);
}

static void *bot_main(void *arg)
{
	cw_thread_name("cw-mx-bot");
	struct matrix *m = arg;
	/* A homeserver that does not answer held the stop its 10 s a call
	 * until the fiftieth session, each of the round's in turn. */
	mx_call_stop_on(&m->bot_stop);
	PGconn *c = NULL;
	bool mine = false;
	int64_t forget_after = 0, expired_seen = -1;
	struct request_pauses request_pauses = { 0 };
	struct command_runs command_runs = { 0 };
	struct bot_round invitations = { 0 }, renames = { 0 }, departures = { 0 };
	/* The pace of its connects while the database is away: 250 ms, then
	 * twice as long each time up to database.reconnect_max_ms (until the
	 * forty-eighth session every 500 ms, each attempt blocking the stop
	 * up to connect_timeout, 5 s, when the database's host took the
	 * connection and never answered). */
	struct store_backoff reconnect = { 0, 0 };
	while (!atomic_load(&m->bot_stop)) {
		if (!c || PQstatus(c) != CONNECTION_OK) {
			PQfinish(c);
			mine = false;
			expired_seen = -1;
			cw_errmsg e;
			c = store_connect_abortable(m->app->cfg->db_url, m->app->cfg->db_statement_timeout_ms,
						    m->bot_wake[0], bot_gives_up, m, &e);
			if (c && (store_exec(c, "LISTEN causeway_matrix_bot", &e) || !store_prepare_all(c, bot_stmt_lists, &e))) {
				PQfinish(c);
				c = NULL;
			}
			if (!c) {
				char in_ms[24];
				snprintf(in_ms, sizeof(in_ms), "%ld",
					 store_backoff_failed(&reconnect, m->app->cfg->db_reconnect_max_ms));
				if (!atomic_load(&m->bot_stop))
					LOG_KV(CW_LOG_WARN, "matrix bot cannot connect to the database", "detail", e.msg,
					       "retry_in_ms", in_ms);
				store_sleep_until(reconnect.retry_at_us, &m->bot_stop);
				continue;
			}
			store_backoff_reset(&reconnect);
		}
		changes_resolved(m, c, &command_runs); /* held or not: its tokens are this process's */
		/* Asked again once the lock is taken: the old session's backend,
		 * which held the lock, has ended its transaction, so the answer is
		 * final.  Until the sixty-third session's review a backend that
		 * ended between the question ("in progress") and the lock left
		 * the change unsure while its run again began: it owned the kept
		 * token, and "rolled back" was never said nor logged (a test's
		 * rare failure, review RC). */
		if (!mine && (mine = bot_lock(c)))
			changes_resolved(m, c, &command_runs);
		/* While the homeserver refuses the as_token (token_state) no
		 * call of the bot's can fare better: its work waits, untried
		 * and not counted, as the Matrix rows do (matrix_ready), until
		 * the ping's thread finds the token taken again (mx_bot_taken).
		 * Until the fifty-second session each inbox row spent its
		 * BOT_TRIES meanwhile (some 40 minutes) and was given up: an
		 * invitation of the bot never answered, a command never run;
		 * the notices backed off to 10 minutes a try. */
		if (mine) {
			bool held = atomic_load(&m->token_refused);
			while (!atomic_load(&m->bot_stop) && !atomic_load(&m->token_refused) &&
			       inbox(m, c, &command_runs))
				;
			if (!held) {
				requests(m, c, &request_pauses);
				expiries(m, c, &expired_seen);
			}
			dead_letters(c);
			if (!held && !atomic_load(&m->token_refused)) {
				notices(m, c);
				backed_off_round(m, c, BOT_DEPARTURES, "members who left a group", &departures,
						 departure_row);
				backed_off_round(m, c, BOT_RENAMES, "renamed groups", &renames, rename_row);
				backed_off_round(m, c, BOT_INVITATIONS, "users invited to a group", &invitations,
						 invitation_row);
				invitees_joined(m, c);
			}
			forget_handled(m, c, &forget_after);
		}
		/* Its stop writes to bot_wake (never read: the stop is for good).
		 * Until the fiftieth session nothing woke this wait: matrix_stop,
		 * after "stopped" is logged, held the process's exit up to 500 ms. */
		store_wait_notify(c, m->bot_wake[0], 500, NULL, NULL);
	}
	PQfinish(c);
	pauses_free(&request_pauses);
	return NULL;
}

static void mx_bot_wake_close(struct matrix *m)
{
	for (int k = 0; k < 2; k++) {
		if (m->bot_wake[k] >= 0)
			close(m->bot_wake[k]);
		m->bot_wake[k] = -1;
	}
}

void mx_bot_start(struct matrix *m)
{
	/* Without the pipe (-1) its waits still end, at their timeouts. */
	if (pipe2(m->bot_wake, O_NONBLOCK | O_CLOEXEC) != 0)
		m->bot_wake[0] = m->bot_wake[1] = -1;
	m->bot_started = cw_thread_start(&m->bot_thread, bot_main, m);
	if (!m->bot_started)
		mx_bot_wake_close(m);
}

void mx_bot_stop(struct matrix *m)
{
	if (!m->bot_started)
		return;
	store_sleepers_stop(&m->bot_stop);
	if (m->bot_wake[1] >= 0 && write(m->bot_wake[1], "x", 1) < 0) {
		/* never read: a first write cannot find it full */
	}
	pthread_join(m->bot_thread, NULL);
	m->bot_started = false;
	mx_bot_wake_close(m);
}
