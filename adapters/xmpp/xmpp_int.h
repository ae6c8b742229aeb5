/* The XMPP adapter's insides, shared by xmpp.c (streams, iq, presence),
 * xmpp_in.c (inbound messages), xmpp_out.c (delivery) and xmpp_cmd.c
 * (consent: subscriptions, ad-hoc commands, requests). */
#ifndef CW_XMPP_INT_H
#define CW_XMPP_INT_H

#include "xmpp.h"
#include "xmpp/xj.h"
#include "xmpp/xm.h"
#include "utf8.h"

#include <pthread.h>
#include <stdatomic.h>
#include <strophe.h>

#define XMPP_COMPONENTS_MAX 16
#define XMPP_PEER_MAX 63

enum xc_state {
	XC_STARTING,     /* not tried yet */
	XC_STANDBY,      /* another daemon process holds the component's lock */
	XC_CONNECTING,
	XC_UP,
	XC_DOWN,         /* lost or refused; retrying with backoff */
	XC_AUTH_FAILED,  /* the server refused the secret (retrying, slowly) */
};

/* A stanza waiting for the component's thread. */
struct xq_item {
	struct xq_item *next;
	uint64_t seq;        /* order of queueing (per component) */
	bool kept;           /* an answer to a user's stanza (xa_answer): no break drops it */
	size_t len;
	char text[];         /* serialised, NUL-terminated */
};

/* A stanza written recently: re-sent after a reconnect.  at_ms: when it
 * was last written (the server has it once a ping sent since then is
 * answered), first_ms: when it was first written (the re-send window is
 * counted from there). */
struct xr_item {
	int64_t at_ms, first_ms;
	char *text;
};
#define XMPP_RECENT_MAX 4096
#define XA_LOST_MAX 64 /* ranges of lost seqs remembered (struct xcomp) */
#define XMPP_RECENT_BYTES (16u << 20)

/* A member's nick in a group's room, as SQL: the tail of a CASE (after
 * its WHEN clauses, if any) whose member is the identity with the columns
 * IS_LOCAL, LOCALPART, DOMAIN and ID, in the room with id ROOM.  Their
 * local part, but a remote member's is "<local part>@<domain>" when
 * another member has the same local part (a local user and a peer's
 * user, or two peers' users, both "bob": one occupant, one name, before
 * the thirteenth session).  Local users' local parts are unique here, and
 * theirs stay as they are.  The join's members and history, the holder's
 * member look (xmpp_muc.c) and a group row's sender (xmpp_out.c) all say
 * it with this. */
#define MUC_NICK_OF(IS_LOCAL, LOCALPART, DOMAIN, ID, ROOM) MUC_NICK_IF(IS_LOCAL, LOCALPART, DOMAIN, ID, ROOM, \
	"y.membership = 'joined'")
#define MUC_NICK_IF(IS_LOCAL, LOCALPART, DOMAIN, ID, ROOM, JOINED) \
	"WHEN NOT " IS_LOCAL " AND EXISTS (SELECT 1 FROM room_members y JOIN identities o " \
	"ON o.id = y.identity_id WHERE y.room_id = " ROOM " AND " JOINED " AND o.localpart = " LOCALPART \
	" AND o.id <> " ID ") THEN " LOCALPART " || '@' || " DOMAIN " ELSE " LOCALPART " END"
/* The same of an identities row named WHO. */
#define MUC_NICK(WHO, ROOM) MUC_NICK_OF(WHO ".is_local", WHO ".localpart", WHO ".domain", WHO ".id", ROOM)
/* The same in a join's statement, the joining identity ME counted as
 * joined: an invited user's join makes her a member in that statement,
 * whose snapshot still has her invited.  Until the fiftieth session her
 * join's answer (its members; its history, for a message of the
 * namesake's delivered to her while invited) named a peer's namesake by
 * her own nick until the member look a second later, and the occupants
 * who joined next saw the namesake go and come back. */
#define MUC_NICK_JOINING(WHO, ROOM, ME) MUC_NICK_IF(WHO ".is_local", WHO ".localpart", WHO ".domain", WHO ".id", \
	ROOM, "(y.membership = 'joined' OR y.identity_id = " ME ")")

struct xin; /* xmpp_in.c */

/* XEP-0050 sessions the component gave (xmpp_cmd.c), at most this many
 * at once (the oldest goes first), this many of them one user's, each for
 * xmpp.command_session_lifetime_s. */
#define XA_SESSIONS_MAX 256
#define XA_SESSIONS_PER_USER 8
struct xa_session {
	char id[33];                    /* 32 hex digits; "" : a free slot */
	unsigned char owner[32];        /* SHA-256 of the requester's full JID, the command's JID and node */
	unsigned char user[32];         /* SHA-256 of the requester's bare JID */
	int64_t until_us;               /* cw_now_us() when it expires */
};

/* audit_log ids the roster sync waits for at once (xa_roster_sync) */
#define XA_AUDIT_GAPS 256

/* The bound of what the component writes at once while a stanza of the
 * server is served (xmpp.c's direct_room): libstrophe's send queue holds at
 * most XA_DIRECT_QUEUE_MAX pieces not yet begun, and of them at most
 * XA_DIRECT_BYTES_MAX bytes written at once.  libstrophe tells how many
 * pieces it has not begun (xmpp_conn_send_queue_len), not their bytes; it
 * writes them in order, so they are the newest handed: this ring keeps the
 * bytes of the newest XA_DIRECT_QUEUE_MAX pieces handed (0 for those
 * written of the thread's own accord), and their sum. */
#define XA_DIRECT_QUEUE_MAX 1024
#define XA_DIRECT_BYTES_MAX (1u << 20)
struct xa_direct {
	size_t len[XA_DIRECT_QUEUE_MAX];
	size_t head, n; /* the oldest kept, how many */
	size_t bytes;   /* the sum of len over the n kept */
};
/* A piece handed to libstrophe; len: its bytes if written at once within
 * the bound, else 0. */
void xa_direct_handed(struct xa_direct *d, size_t len);
/* Whether len more bytes fit while libstrophe holds queued pieces not
 * begun (the older ones are forgotten: written). */
bool xa_direct_fits(struct xa_direct *d, int queued, size_t len);

struct xcomp {
	struct xmpp *x;
	char domain[XJ_PART_MAX + 1];   /* the component's JID */
	char peer[XMPP_PEER_MAX + 1];   /* the peer whose users it stands for */
	int index;
	pthread_t thread;
	bool started;
	/* the queue (mu) */
	pthread_mutex_t mu;
	pthread_cond_t written;         /* signalled when the thread wrote up to written_seq */
	struct xq_item *head, *tail;
	size_t queued;
	bool woken;                     /* a wake-up was sent that the thread has not taken the queue for yet */
	uint64_t next_seq, written_seq;
	uint64_t handed_seq;            /* the newest seq handed to libstrophe (drain): written once its send queue is empty */
	/* seqs dropped from the queue when a stream broke (a ring of ranges,
	 * in rising order); lost_floor_from..lost_floor: the ranges the ring
	 * no longer holds, and what was written between them (0: none) */
	uint64_t lost_from[XA_LOST_MAX], lost_to[XA_LOST_MAX];
	unsigned lost_n;
	uint64_t lost_floor_from, lost_floor;
	enum xc_state state;
	char last_error[256];
	int64_t connected_since_ms;
	/* the thread's own: breaks in a row without a stable stream
	 * (XA_STABLE_MS) and the rate of their state lines (set_state) */
	unsigned short_breaks;
	unsigned long flap_unlogged;     /* state lines left out since the last one written */
	int64_t flap_log_next_ms;        /* monotonic: the next state line of a flapping stream not before */
	int wake_fd[2];                 /* a pipe that wakes the thread (not polled by libstrophe: checked each turn) */
	/* Inbound stanzas being stored (xmpp_in.c), under in_mu: the store
	 * runs each round of a batch's jobs before the next round of any, so
	 * a stanza that names another (a correction, a retraction, reactions,
	 * a reply) would not see one of its conversation stored in the same
	 * batch.  Such a stanza, and any after it in its conversation, waits
	 * until the earlier ones of that conversation are stored. */
	pthread_mutex_t in_mu;
	json_t *in_flight;              /* conversation (room native id) -> its stanzas being stored */
	struct xin *in_waiting;         /* those waiting, in arrival order */
	int sock_fd;                    /* the stream's socket (from libstrophe's sockopt callback), or -1 */
	int reserve_fd;                 /* a low descriptor kept for the stream's socket (see reserve_low_fd) */
	/* the thread's own */
	xmpp_ctx_t *ctx;
	/* ctx's logger (strophe_log), its own so that turn can take the
	 * handler away while libstrophe writes (see turn, xmpp.c) */
	xmpp_log_t log;
	xmpp_conn_t *conn;
	struct xr_item recent[XMPP_RECENT_MAX];
	size_t recent_head, recent_n;
	size_t recent_bytes;            /* their texts' sizes (bounded: XMPP_RECENT_BYTES) */
	/* The time (mono_ms, as every time of the re-send) before which
	 * everything written has reached the server: the sending of the last
	 * ping it answered (TCP keeps order), or the stream's start.  Until
	 * the forty-eighth session these times were the wall clock's, and a
	 * clock set back after a ping made the stanzas written after it look
	 * proven: a break then did not write them again. */
	int64_t proven_ms;
	bool resend_pending;            /* pending consent requests go out again after a (re)connect, */
	long long resend_after;         /* those with an id above this one still (xa_requests) */
	long long audit_seen;           /* the operator's consent changes up to this audit_log id are done (-1: none yet) */
	/* and every id up to audit_read was read, but those in audit_gaps:
	 * missing when read (a transaction that took the id had not committed,
	 * or rolled back), read again each turn until they are there or old
	 * (xa_roster_sync) */
	long long audit_read;
	struct xa_audit_gap {
		long long id;
		int64_t since_ms;       /* monotonic, when it was first missed */
	} audit_gaps[XA_AUDIT_GAPS];
	int audit_ngaps;
	/* the remote users' profile changes sent to their contacts up to this
	 * (profile_xid, id) (xa_profiles; profiles_xid -1: not read yet) */
	long long profiles_xid, profiles_id;
	/* the transaction still open whose changes (and all after them) wait,
	 * 0 none, since when (monotonic); those up to profiles_past were
	 * waited for long enough and are passed over */
	long long profiles_wait, profiles_past;
	int64_t profiles_wait_since_ms;
	bool up_event, dropped, auth_failed; /* set by libstrophe's connection handler */
	PGconn *lock;                   /* the connection that holds the component's lock (the thread's), or NULL */
	int64_t drop_ms;                /* when the last stream was given up (mono_ms), for the re-send */
	bool closing;                   /* the thread's own: the stream is being closed (stream_close) */
	bool unreadable;                /* it too: the server found the stream not well-formed (or invalid XML) */
	char drop_reason[200];
	char ping_id[40];               /* the keepalive ping to the server */
	int64_t ping_sent_ms, ping_next_ms;
	/* Remote users' vCards (xmpp_vcard.c): remote id -> {url, type, b64,
	 * sha1} of the avatar fetched last, under mu. */
	json_t *vcards;
	size_t vcard_bytes;             /* their photos' base64, bounded (xmpp_vcard.c), under mu */
	json_t *vcard_none;             /* remote id -> true: known to have no avatar (xmpp_vcard.c), under mu */
	/* The presences with a remote user's avatar hash not yet written
	 * (xa_fanout_add: [{from, to: [bare JID], at, photo}]), and how many
	 * recipients they have left, under mu. */
	json_t *fanouts;
	size_t fanout_left;
	/* While the thread writes a batch of them (xa_fanout_queue), the
	 * pairs whose roster was dropped meanwhile (xa_fanout_forget: "from
	 * to" -> true), left out of it; under mu.  And, the thread's own, when
	 * the next batch may be tried after the database did not answer. */
	bool fanout_taking;
	json_t *fanout_dropped;
	int64_t fanout_not_before_ms;
	/* the thread's own: pings sent and the last answered (counted), and
	 * the ping whose answer lets the next batch of them go (fanout_turn) */
	uint64_t pings_sent, pings_answered, fanout_gate;
	/* The group chats' occupants, and the members they were told of
	 * (xmpp_muc.c), under mu; muc_dirty: occupants changed since they
	 * were last written to xmpp_muc_occupants; muc_gone: those told
	 * that they are out (332) whose rows may still be stored (the
	 * connection that writes them was lost), "<room> <full JID>" keys;
	 * muc_stored: the rows as this process last wrote them, under the
	 * same keys (NULL: not known, the next write rewrites them all). */
	json_t *muc, *muc_members, *muc_gone, *muc_stored;
	bool muc_dirty;
	/* The ad-hoc commands' sessions, the stream thread's own (xmpp_cmd.c). */
	struct xa_session sessions[XA_SESSIONS_MAX];
	/* counters */
	atomic_ullong stanzas_in, stanzas_out, errors_out, connects;
	atomic_ullong restricted_xml;        /* streams closed for markup XMPP forbids (xmpp_xml.c) */
	atomic_ullong stanza_too_large;      /* streams closed for a tag or header over xmpp.max_stanza_bytes */
	atomic_ullong stanzas_cut;           /* stanzas over it, refused (xa_xml_cut) */
	atomic_ullong parser_renewals;       /* the stream parser renewed for what expat held (xa_xml_renewed) */
	atomic_long parser_bytes;            /* what expat holds for the stream's parser (xa_xml_held), after each turn */
	atomic_ullong answers_dropped;       /* stanzas to be written at once, dropped: the server did not read (direct_room) */
	/* the thread's own: the pieces handed to libstrophe, for the bound of
	 * what is written at once (xa_direct_fits), and whether the last was
	 * dropped */
	struct xa_direct direct;
	bool direct_full;
	bool serving;                        /* the thread's own: a stanza of the server is being served (on_stanza) */
};

struct xmpp {
	struct cw_app *app;
	const struct cw_config *cfg;
	char local_domain[XJ_PART_MAX + 1]; /* the XMPP domain of this provider's users */
	struct xcomp comp[XMPP_COMPONENTS_MAX];
	int ncomp;
	atomic_bool stop;
	pthread_key_t ctx_key;          /* each thread's own xmpp_ctx_t and kept chat stanza (stanzas are built off the stream thread) */
};

/* This thread's libstrophe context (for building and parsing stanzas). */
xmpp_ctx_t *xa_thread_ctx(struct xmpp *x);
/* The calling thread's kept chat stanza (xm_keep, in xa_thread_ctx's
 * context), or NULL without memory. */
struct xm_keep *xa_thread_keep(struct xmpp *x);
/* The component of a domain, or NULL. */
struct xcomp *xa_comp_by_domain(struct xmpp *x, const char *domain);
struct xcomp *xa_comp_by_peer(struct xmpp *x, const char *peer);
/* Queues a serialised stanza for the component's thread; *seq (may be
 * NULL) its place.  False when memory runs out or the component is
 * stopping, and, when seq is asked for (an outbox row, whose write is
 * waited for), when the stream is not up.  With wake false the thread is
 * left asleep: the caller queues more and then calls xa_wake() (one
 * wake-up, and one context switch, for many stanzas instead of one each). */
bool xa_enqueue(struct xcomp *xc, const char *text, size_t len, uint64_t *seq, bool wake);
void xa_wake(struct xcomp *xc);
/* The same with xc->mu held by the caller (who calls xa_wake after
 * unlocking): stanzas queued together with a change of the occupants. */
bool xa_enqueue_locked(struct xcomp *xc, const char *text, size_t len);
/* How many more stanzas the queue takes now (xc->mu held). */
size_t xa_queue_room_locked(const struct xcomp *xc);
/* Serialises and queues a stanza (released by the call). */
bool xa_enqueue_stanza(struct xcomp *xc, xmpp_stanza_t *st);
/* The same for an error answer to a user's stanza that was not stored
 * (from any thread): a break of the stream, or the stream given up while
 * another process may hold it, does not drop it, as it drops the rest of
 * the queue: it is written on the next stream.  Nothing else would tell
 * the user (her server routed the stanza to the component, and her client
 * shows it sent); until the forty-sixth session such answers were lost
 * when the database went (and took the component's lock with it) just as
 * the store answered, or while the stream was down. */
bool xa_answer(struct xcomp *xc, xmpp_stanza_t *st);
/* On the component's thread: the same, written now when the stream is up
 * and not being closed (xa_send_now's order), else queued (xa_answer): a
 * stanza read while the stream closes is answered on the next one. */
void xa_answer_now(struct xcomp *xc, xmpp_stanza_t *st);
/* Waits until the thread wrote the stanza of seq, or timeout_ms passed,
 * or the stream went down (what was queued is then dropped: it never
 * reached the wire, and its rows go again): true when written. */
bool xa_wait_written(struct xcomp *xc, uint64_t seq, long timeout_ms);
/* What is queued is dropped, never written: its seqs are remembered as lost
 * (xa_wait_written answers false for them), the answers kept for the next
 * stream stay. */
void xa_queue_drop(struct xcomp *xc);
/* On the component's thread: writes st now (released by the call). */
void xa_send_now(struct xcomp *xc, xmpp_stanza_t *st);
/* The same, and keeps it for a re-send after a break, as a queued
 * stanza is (xmpp.resend_window_ms): for what the component writes on
 * its own and marks as sent (a consent request's notice, the roster's
 * changes, a dead letter's telling), which nothing asks for again.  Since
 * the thirtieth session: a break just after lost them for good. */
void xa_send_kept(struct xcomp *xc, xmpp_stanza_t *st);
/* How the component writes a stanza of its own: queued (from any thread),
 * now (xa_send_now: an answer the user asks for again if it is lost), or
 * now and kept (xa_send_kept: what is then marked as sent). */
enum xa_write { XA_QUEUED, XA_NOW, XA_NOW_KEPT };
/* A notice: a chat message from the component's domain to a local user
 * (their bare JID, or the full JID that wrote), its text made of fmt
 * (up to 2 JIDs and 700 bytes more).  The component explaining itself,
 * a consent request's notice and the refusals said to the user
 * (xmpp_cmd.c), a dead letter's telling (xmpp_out.c). */
void xa_notice(struct xcomp *xc, enum xa_write how, const char *to, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* A peer user's name as the user's client shows it: the peer's name for
 * them as a Matrix ghost's shows it (cw_utf8_name_shown: nothing that
 * hides or turns round what follows, 64 characters at most), else their
 * id (fallback, may be NULL), then " (<peer>)"; "" when neither shows.
 * The vCard's FN and NICKNAME, a subscription request's nick (XEP-0172,
 * which clients offer as the roster's name). */
#define XA_PEER_NAME_MAX (4 * CW_NAME_SHOWN_MAX + 8 + XMPP_PEER_MAX + 4)
void xa_peer_name(const struct xcomp *xc, const char *name, const char *fallback, char *out, size_t len);
/* A new child element of parent (held by it; NULL when memory runs out). */
xmpp_stanza_t *xa_child(xmpp_ctx_t *ctx, xmpp_stanza_t *parent, const char *name, const char *ns);
/* XEP-0030 disco#info: an identity (name may be NULL) and features (a
 * NULL-terminated list) into the answer's query q (NULL: nothing). */
void xa_disco_identity(xmpp_ctx_t *ctx, xmpp_stanza_t *q, const char *category, const char *type, const char *name);
void xa_disco_features(xmpp_ctx_t *ctx, xmpp_stanza_t *q, const char *const *features);
/* <name xmlns=ns>text</name> added to parent (ns may be NULL; text NULL:
 * empty), text as xm_xml_text makes it (what XML 1.0 does not allow
 * replaced); the element, or NULL when memory runs out.  Every text child
 * the adapter writes outside xm.c is made here (a <body/> too, not with
 * xmpp_message_set_body). */
xmpp_stanza_t *xa_text_child(xmpp_ctx_t *ctx, xmpp_stanza_t *parent, const char *name, const char *ns,
			     const char *text);
/* A stanza error answering st (from and to swapped, from = to of st). */
xmpp_stanza_t *xa_iq_result(xmpp_stanza_t *iq);
/* (Its text, NULL for none, as xm_xml_text makes it.) */
xmpp_stanza_t *xa_error_reply(xmpp_stanza_t *st, const char *type, const char *condition, const char *text);

/* The conversation's native id (room_bindings) of (local user, remote user). */
void xa_room_native(const char *local_bare, const char *remote_bare, char *out, size_t len);

/* xmpp_in.c: a <message/> of a local user to a remote user's JID (on the
 * component's thread; the work is a store job). */
void xa_in_message(struct xcomp *xc, xmpp_stanza_t *st);
/* How many of the component's stanzas wait for an earlier one of their
 * conversation to be stored (/readyz, metrics; bounded: docs/xmpp.md). */
size_t xa_in_waiting(struct xcomp *xc);
/* How a user asked to leave a group: XEP-0045's affiliation set to none
 * (muc#admin), or the room's ad-hoc command (XEP-0050). */
enum xa_leave { XA_LEAVE_NONE, XA_LEAVE_ADMIN, XA_LEAVE_COMMAND };
/* Leaves the group of room (a room's bare JID) for the local user: their
 * membership event to the group's other members and their membership
 * ended, in one transaction; then xa_muc_left answers iq (any thread:
 * xmpp_muc.c calls it once it found the user no invitee to decline). */
void xa_in_leave(struct xcomp *xc, xmpp_stanza_t *iq, enum xa_leave how, const char *room, const char *local_bare,
		 const char *local);
/* The address of the local user whose localpart is local, as her identity
 * stores it (identities.uri), into uri (len: MIMI_URI_MAX + 1). */
cw_err xa_local_uri(const struct xmpp *x, const char *local, char *uri, size_t len, cw_errmsg *e);
/* The local user's bare JID and localpart of a full JID of local_domain, or false. */
bool xa_local_user(struct xmpp *x, const char *jid, char *bare, size_t blen, char *local, size_t llen);
/* The remote user's id (unescaped localpart) of a JID of the component, or false. */
bool xa_remote_user(struct xcomp *xc, const char *jid, char *id, size_t idlen, char *bare, size_t blen);
/* The inverse: the bare JID of the peer's user id at this component
 * (escaped localpart); false when the id has none or out is too small. */
bool xa_remote_jid(const struct xcomp *xc, const char *id, char *out, size_t len);

/* xmpp_cmd.c */
void xa_presence(struct xcomp *xc, xmpp_stanza_t *st);
/* An iq set/get of XEP-0050 (ad-hoc commands) to the component: true when handled. */
bool xa_command(struct xcomp *xc, xmpp_stanza_t *st);
/* disco#items of the commands node. */
void xa_command_items(struct xcomp *xc, xmpp_stanza_t *query);
/* disco#info of a node of the component (XEP-0050 §2.2, XEP-0030 §3.2):
 * the commands node (command-list), or a command's (command-node, with
 * the commands and data forms features); false for another node. */
bool xa_command_info(struct xcomp *xc, xmpp_stanza_t *query, const char *node);
/* Sends the consent requests not yet shown; while resend_pending, all
 * pending ones too, a page a call, until the last page is sent. */
void xa_requests(struct xcomp *xc, PGconn *c);
/* The roster follows the operator: a block or revoke made through the
 * admin API for a local user and a remote user of this component's peer
 * gets the remote JID's unsubscribe and unsubscribed, and so do the
 * user's contacts of the peer on a block of its whole domain; an accept
 * that decided requests shown to the user withdraws them (unsubscribe), and
 * so does the policy's expiry of a request shown (consent.expire).  Changes
 * made while no process held the stream are seen by the next holder, and
 * so is a record whose transaction committed after one of a higher id. */
void xa_roster_sync(struct xcomp *xc, PGconn *c);
/* How long (ms) the roster sync and the profiles' (xa_profiles) wait for
 * a write still open before they pass over it: a minute, or twice
 * database.statement_timeout_ms if that is longer (an audit id whose
 * transaction rolled back never comes; one open longer is stuck). */
int64_t xa_open_write_wait_ms(const struct xcomp *xc);
/* A stream that stayed up this long (ms) was a good one: its break is
 * reconnected after the first, shortest wait again. */
#define XA_STABLE_MS 30000
/* The wait (ms, before jitter) before the next connection attempt, after
 * a break that came after the wait prev (0: none yet): doubled from 250 ms
 * up to max, at least 5 s after the server refused the secret (auth), and
 * started again at 250 ms when the stream had stayed up XA_STABLE_MS
 * (up_ms: how long it was up; negative: it never came up). */
long xa_reconnect_backoff(long prev, int64_t up_ms, bool auth, long max);
/* A local user's message to this component's peer that became a dead
 * letter, or (since the fifty-ninth session) that waited and was dropped
 * by the remote user's block, is told to them in a chat message from the
 * component's domain (which remote user, what, why, what the operator can
 * do: dispatcher_dead_text); a group's, since the sixtieth session, naming
 * the group's JID ("In #...@...: ..."), until then marked told unsaid. */
void xa_dead_letters(struct xcomp *xc, PGconn *c);

/* XEP-0054 vcard-temp for a remote user's JID (an iq get, answered from a
 * store reader: the name and avatar the peer gave, POST /v1/profiles, the
 * avatar fetched signed). */
void xa_vcard(struct xcomp *xc, xmpp_stanza_t *iq, const char *remote_id);
/* XEP-0084: a pubsub items ask (an iq get holding pubsub) of a remote JID's
 * avatar nodes, urn:xmpp:avatar:metadata and urn:xmpp:avatar:data, answered
 * from the same photo as the vCard; another node is item-not-found.  The
 * presences that carry the hash are followed by the metadata as a PEP
 * notification (a headline). */
void xa_avatar_items(struct xcomp *xc, xmpp_stanza_t *iq, xmpp_stanza_t *pubsub, const char *remote_id);
/* The available presence of the remote JID remote_jid (of remote_id) that
 * answers the local bare JID to (her probe, her subscribe), with the
 * avatar's SHA-1 known for remote_id (XEP-0153 <x
 * xmlns='vcard-temp:x:update'>, and its XEP-0084 event) or, when it is
 * not known yet, without it, a presence with it following when there is
 * an avatar.  Queued as a fan-out's (xa_fanout_add), so that it goes only
 * if she does not block the contact (or his network), as the one with
 * the hash that follows it: until the fiftieth session it went at once,
 * and a probe of a contact she blocked showed it online, with its avatar
 * when that was kept.  Any thread. */
void xa_vcard_presence(struct xcomp *xc, const char *remote_id, const char *remote_jid, const char *to);
/* Housekeeping of the stream's holder: the peer's users whose profile
 * changed (POST /v1/profiles) since the component's cursor get their avatar
 * fetched again, and each local XMPP user who allowed them a presence with
 * the new hash (or an empty one: no avatar now), so that clients fetch the
 * vCard again.  Changes are taken once they are some seconds old (a
 * change's time is its transaction's start, and one that commits later
 * must not be passed over); a change left for want of a fetch slot is
 * taken on the next turn. */
void xa_profiles(struct xcomp *xc, PGconn *c);
/* A profile change's presences (and XEP-0084 events) from the remote JID
 * from (of remote_id) to each bare JID of to (a reference is taken), with
 * photo's hash: kept here and written a batch at a time by the stream's
 * thread (xa_fanout_queue), so that a remote user's 10,000 contacts do
 * not fill the queue ahead of the messages.  contacts: to are the remote
 * user's contacts (a profile change's); else users the presence answers
 * (a probe, a subscribe: xa_vcard_presence).  photo NULL: not known yet,
 * the presence without the hash (XEP-0153: no <x/>) and no event.  Any
 * thread. */
void xa_fanout_add(struct xcomp *xc, const char *from, const char *remote_id, bool contacts, json_t *to,
		   json_t *photo);
/* On the stream's thread: queues the presences and events of up to max
 * recipients, the oldest first (the caller writes the queue), but to
 * those no longer to be told (asked on c: no longer a contact of a
 * profile change's remote user, or blocking the remote user; a roster
 * drop while the batch is made, xa_fanout_forget); how many recipients
 * were done (0: none now, the queue full or the database not
 * answering: they wait). */
size_t xa_fanout_queue(struct xcomp *xc, PGconn *c, size_t max);
/* Its steps.  One recipient of a batch: */
struct xa_fan_pick {
	json_t *f;      /* its fan-out, a reference */
	const char *to; /* its bare JID (f's) */
	bool go;        /* still to be told (asked of the database) */
	char *text[2];  /* the presence and the avatar's event, serialised (xc->ctx's) */
	size_t len[2];
};
/* The next recipients, up to max, into picks (go false); from here until
 * xa_fanout_put a roster drop of one is noted (xa_fanout_forget).  How
 * many. */
size_t xa_fanout_take(struct xcomp *xc, struct xa_fan_pick *picks, size_t max);
/* The presences and events of the picks whose go is set queued, all or
 * none (the queue full), but those of the pairs forgotten since the
 * take; the picks' references released.  How many recipients were done
 * (n, or 0: none, they wait). */
size_t xa_fanout_put(struct xcomp *xc, struct xa_fan_pick *picks, size_t n);
/* A roster drop of the remote JID from on the local bare JID to (a block,
 * a consent taken back), before its presences are queued: the batch being
 * made leaves that pair out.  Any thread. */
void xa_fanout_forget(struct xcomp *xc, const char *from, const char *to);
/* The recipients not yet written, and forgetting them (a stream that may
 * be another process's next). */
size_t xa_fanout_left(struct xcomp *xc);
void xa_fanout_clear(struct xcomp *xc);
/* Wakes the stream's thread (whether or not anything is queued). */
void xa_wake_thread(struct xcomp *xc);

/* What a joining occupant, told the room's members as a snapshot had them
 * (members: their nicks, locals: the local parts of those of this
 * server), is not told of the set the room's other occupants were told
 * (told: xc->muc_members' set of the room; own: the joiner's local part):
 * [["+" or "-", nick]], who came, then who went, in order (xmpp_muc.c). */
json_t *xa_muc_since(const json_t *told, const json_t *members, const json_t *locals, const char *own);
/* The history a join (st, its <history/>) asks for at now: at most *max
 * messages, those after since (ISO 8601, "" for any; len its size). */
void xa_muc_history_wanted(xmpp_stanza_t *st, time_t now, int *max, char *since, size_t len);

/* xmpp_muc.c: group chats (XEP-0045).  A group is the room
 * "#<escaped public id>@<component>"; each local member has a view of
 * their own (docs/xmpp.md, "Group chats"). */
/* The room JID of a group's public id; false when it has none. */
bool xa_muc_room_jid(const struct xcomp *xc, const char *public_id, char *out, size_t len);
/* Whether jid is a room of the component: its public id, bare JID and the
 * resource (an occupant's nick, "" for the room itself). */
bool xa_muc_room(const struct xcomp *xc, const char *jid, char *public_id, size_t plen, char *bare, size_t blen,
		 char *nick, size_t nlen);
/* A presence to a room (join, leave, nick). */
void xa_muc_presence(struct xcomp *xc, xmpp_stanza_t *st);
/* An iq to a room or an occupant (disco, ping, XEP-0410 self-ping): true
 * when answered. */
bool xa_muc_iq(struct xcomp *xc, xmpp_stanza_t *st, const char *ns, bool get);
/* Whether full (a full JID) is in room. */
bool xa_muc_is_occupant(struct xcomp *xc, const char *room, const char *full);
/* The room's <stanza-id id by=room/> (XEP-0359) added to st (none when id
 * is NULL or ""): in a room, the message's neutral id. */
void xa_muc_stanza_id(xmpp_ctx_t *ctx, xmpp_stanza_t *st, const char *id, const char *room);
/* The chat message st (released) as a groupchat: the same, without a
 * receipt request (XEP-0184 §5.3: none in a room); NULL without memory. */
xmpp_stanza_t *xa_muc_groupchat(xmpp_ctx_t *ctx, xmpp_stanza_t *st);
/* The occupant full of room, when its nick is nick and someone else's
 * there (a member's, or a message's writer's: the user's own local part is
 * nobody else's), gives way: it takes the user's local part, told as a
 * nick change the room made (XEP-0045 303, then 110 and 210), before
 * anything comes from nick.  Whether it moved. */
bool xa_muc_give_way(struct xcomp *xc, xmpp_ctx_t *ctx, const char *room, const char *full, const char *nick);
/* The JID to write to the member the room speaks for under nick in room
 * (bare JID), into out: a member of this server's own, a remote member's
 * on the component; false when nick names no member. */
bool xa_muc_member_jid(struct xcomp *xc, const char *room, const char *nick, char *out, size_t len);
/* [[full JID, nick]] of user's resources in room (a new reference). */
json_t *xa_muc_occupants(struct xcomp *xc, const char *room, const char *user);
/* What becomes of a stanza (text, for the event id) to the occupant full
 * of room: an occupant whose join is being looked at keeps it until its
 * history has gone (XA_MUC_KEPT: it follows the history, unless the
 * history had it); one whose history gave the event already, or no
 * occupant, skips it; else it goes now (XA_MUC_NOW). */
enum xa_muc_route { XA_MUC_NOW, XA_MUC_KEPT, XA_MUC_SKIP };
enum xa_muc_route xa_muc_route(struct xcomp *xc, const char *room, const char *full, const char *id,
			       const char *text, size_t len);
/* The mediated invitation of user (bare JID) to room, serialised into
 * *text (malloc'd). */
bool xa_muc_invite(struct xcomp *xc, xmpp_ctx_t *ctx, const char *room, const char *user, const char *inviter,
		   char **text, size_t *len);
/* A local user's invitations (XEP-0045 §7.8.2, a message to the room with
 * <invite to=/>): the invited (remote users of this component, local
 * users) become members of a group hosted here; true when st was one, or
 * an invitation sent elsewhere than to a room (refused: bad-request). */
bool xa_muc_invites(struct xcomp *xc, xmpp_stanza_t *st);
/* Housekeeping of the stream's holder: members added to or removed from
 * a group since its occupants were told come or go as presences; a user
 * removed from the group is out of the room. */
void xa_muc_members(struct xcomp *xc, PGconn *c);
/* An ad-hoc command's action XEP-0050 does not define (malformed-action)
 * or that no stage here offers (prev: bad-action), or a sessionid that is
 * not one of this requester's for this command (bad-sessionid; its own
 * but expired: session-expired), or, for a staged command (a form, then
 * its submit), a later stage without a sessionid (a form, or action next
 * or complete: bad-sessionid): answered with the error, true; else
 * false.  A sessionid that passes has ended (each stage after the first
 * ends the session, or starts a new one).  The stream's thread. */
bool xa_command_bad_action(struct xcomp *xc, xmpp_stanza_t *iq, const char *action, bool staged);
/* XEP-0050 answers to the command iq (from its 'to'; ctx: the calling
 * thread's): the command ended (status completed or canceled; note: NULL
 * or a note of note_type), or its first stage, executing, with a form
 * (*form: where fields go; NULL without memory) and a new session,
 * remembered (the stream's thread). */
xmpp_stanza_t *xa_command_end(xmpp_ctx_t *ctx, xmpp_stanza_t *iq, const char *node, const char *status,
			      const char *note, const char *note_type);
xmpp_stanza_t *xa_command_stage(struct xcomp *xc, xmpp_stanza_t *iq, const char *node, xmpp_stanza_t **form);
/* The answer to a user's iq that left a group, or (declined) declined it
 * while a peer had her only invited (any thread). */
void xa_muc_left(struct xcomp *xc, const char *iq_text, enum xa_leave how, bool declined);
/* A local user's decline of a room's invitation (XEP-0045 §7.8.2, a
 * message to the room with <decline/>): while a peer has her only invited
 * to the group, it declines it (stored, told to nobody); true when st was
 * one. */
bool xa_muc_declines(struct xcomp *xc, xmpp_stanza_t *st);
/* The occupants into xmpp_muc_occupants, when they changed since the last
 * time (the stream's thread, on the lock's connection). */
void xa_muc_sync(struct xcomp *xc, PGconn *c);
/* How many occupants the rooms have (the caller holds xc->mu). */
size_t xa_muc_count_locked(const struct xcomp *xc);
/* A process new to the stream (nobody in memory) takes the occupants the
 * last holder wrote (the stream's thread). */
void xa_muc_load(struct xcomp *xc, PGconn *c);
/* Before the stream closes: each occupant is told the room is going (332)
 * and forgotten (the stream's thread). */
void xa_muc_shutdown(struct xcomp *xc);
/* A stanza error from a local user's resource to a room: an occupant whose
 * client is gone leaves the room (the stream's thread). */
void xa_muc_bounced(struct xcomp *xc, xmpp_stanza_t *st);
/* A local user's groupchat message (its text: a message, a reaction, a
 * retraction, a marker, a chat state) sent back to each of their
 * occupants, from their nick, with the room's stanza-id msg_id (NULL:
 * none). */
bool xa_muc_reflect(struct xcomp *xc, const char *stanza_text, const char *room, const char *user,
		    const char *msg_id);

/* Restricted XML (RFC 6120 §11.1; xmpp_xml.c): every expat parser of the
 * process stops at a DOCTYPE, an entity declaration, a comment or a
 * processing instruction.  With on, the next parser made on this thread
 * (by xmpp_conn_new: the stream's) is watched until it is freed: it is
 * suspended there instead of failed, and it stops too at a tag, or a
 * stream header, larger than max_stanza_bytes (0: no cap; a stanza
 * larger than it is cut: xa_xml_cut).
 * xa_xml_refused() then says what stopped it once, else NULL: *why
 * XA_XML_RESTRICTED with the markup ("a DOCTYPE", ...), XA_XML_BROKEN with
 * expat's error when the stream was not well-formed XML, or
 * XA_XML_TOO_LARGE. */
enum xa_xml_stop { XA_XML_RESTRICTED, XA_XML_BROKEN, XA_XML_TOO_LARGE };
void xa_xml_watch(bool on, long max_stanza_bytes);
const char *xa_xml_refused(enum xa_xml_stop *why);
/* Whether libstrophe's parsers are expat's, behind the guard (a stream
 * parser made by xmpp_conn_new comes through it): false for a libstrophe
 * built with libxml2, which nothing above would guard.  On a thread
 * without a stream of its own (it makes and frees one). */
bool xa_xml_guards_libstrophe(void);
/* True while the handlers set on the watched parser are given the end of a
 * stanza that was cut at max_stanza_bytes (libstrophe's stanza handlers
 * run then): what they built is its first part only, to be refused, not
 * taken.  Only a tag longer than the cap, or a stream header, stops the
 * parser (XA_XML_TOO_LARGE). */
bool xa_xml_cut(void);
/* The levels an element may nest into its stanza (the stanza is level 1):
 * a stanza with an element deeper is cut there, as one past the size cap
 * is (xa_xml_cut), and xa_xml_cut_deep() is true with xa_xml_cut() for
 * it.  libstrophe's stanza functions recurse per level. */
#define XA_STANZA_DEPTH_MAX 128
bool xa_xml_cut_deep(void);
/* Expat keeps every distinct name it reads (of elements, attributes,
 * prefixes) for its parser's life, a reset included: the watched
 * parser's reads go to a parser of the guard's own, renewed at a stanza's
 * end (the stream header read again, unseen by the handlers set) once
 * what it holds passes xa_xml_renew_bound(): twice the cap, at least
 * 1 MiB.  xa_xml_held: the bytes it holds now; xa_xml_renewed: the
 * renewals since last asked (a reset or free forgets them);
 * xa_xml_renew_at: another bound, for tests (1: at every stanza's end).
 * All of this thread's watched parser. */
long xa_xml_held(void);
long xa_xml_renew_bound(void);
unsigned long xa_xml_renewed(void);
void xa_xml_renew_at(long bytes);
/* Expat 2.5 scans a token still coming from its start again at each read:
 * within a long one (16 KiB or more, or xa_xml_hold_from's bytes: for
 * tests), reads without a '>' are held back until they add up to what
 * expat holds of it.  xa_xml_holding: some are held; xa_xml_flush gives
 * them to expat now; xa_xml_scanned: the bytes expat scanned since last
 * asked.  xa_xml_renewal_off: why renewal ended for this stream, once
 * (else NULL). */
bool xa_xml_holding(void);
void xa_xml_hold_from(long bytes);
void xa_xml_flush(void);
long xa_xml_scanned(void);
const char *xa_xml_renewal_off(void);

#endif
