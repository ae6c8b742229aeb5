/* The XMPP adapter's group chats (XEP-0045): a peer's group room is a
 * multi-user chat room served by the component, "#<x>@<component>" for the
 * public id "r_<x>", x escaped as a remote user's id is ('#' starts no
 * remote user's JID: their ids have no '#').  A local user who joins a
 * room nobody has makes a group hosted here ("#lunch" is "r_lunch").
 *
 * Each local member sees a view of their own, as in Matrix (docs/xmpp.md,
 * docs/architecture-decisions.md §18): the policy decides per recipient,
 * so what reaches alice's occupants is what was let through for alice.
 * The room's other members are occupants the component speaks for (a
 * remote member by their id, another local member by their local part);
 * the local user's own resources are the only real occupants, and only
 * they receive the room's presences and messages.
 *
 * The occupants (which full JIDs of which user are in which room, under
 * which nick) live in memory, in xc->muc under xc->mu, and are written to
 * xmpp_muc_occupants within a second of a change: a process that takes the
 * stream over (the holder crashed) reads them back, and the clients stay
 * in.  A daemon that stops tells them that the service is going (332);
 * what they missed comes with the history when they join again.
 *
 * A local member is invited (a mediated invitation, XEP-0045 §7.8.2) with
 * the group's first message for them; the room's binding for that user
 * (room_bindings: the pair key of the user and the room JID, no remote
 * user) is made then, or when they join first. */
#include "config.h"
#include "xmpp_int.h"
#include "log.h"
#include "peer/event.h"
#include "peer/peer_media.h"
#include "peer/pipeline.h"
#include "policy_live.h"
#include "xm.h"
#include "store.h"
#include "utf8.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NS_MUC "http://jabber.org/protocol/muc"
#define NS_MUC_USER "http://jabber.org/protocol/muc#user"
#define NS_MUC_OWNER "http://jabber.org/protocol/muc#owner"
#define NS_MUC_ADMIN "http://jabber.org/protocol/muc#admin"
#define NS_COMMANDS "http://jabber.org/protocol/commands"
#define NS_DATA "jabber:x:data"
#define NS_STANZAS "urn:ietf:params:xml:ns:xmpp-stanzas"
#define NS_DELAY "urn:xmpp:delay"
#define NS_SID "urn:xmpp:sid:0"
#define NS_DISCO_INFO "http://jabber.org/protocol/disco#info"
#define NS_DISCO_ITEMS "http://jabber.org/protocol/disco#items"
#define NS_PING "urn:xmpp:ping"

#define HISTORY_DEFAULT 20
#define HISTORY_MAX 50
#define NICK_MAX 255
#define OCCUPANTS_MAX 10000 /* of all rooms of a component: a bound on memory */
/* Of one user (her resources in rooms, all rooms of a component): so that
 * no one user takes the others' room (a review of the fortieth session:
 * one client joining 10,000 rooms of its own making, in 78 seconds, left
 * every other user's join refused). */
#define OCCUPANTS_PER_USER 500

bool xa_muc_room_jid(const struct xcomp *xc, const char *public_id, char *out, size_t len)
{
	char esc[4 * 128 + 1];
	/* a public id is "r_" and the room's own part: the JID holds the part */
	if (!room_public_id_valid(public_id) || !xj_escape_local(public_id + 2, esc, sizeof(esc)))
		return false;
	int n = snprintf(out, len, "#%s@%s", esc, xc->domain);
	return n > 0 && (size_t)n < len;
}

bool xa_muc_room(const struct xcomp *xc, const char *jid, char *public_id, size_t plen, char *bare, size_t blen,
		 char *nick, size_t nlen)
{
	char l[XJ_PART_MAX + 1], d[XJ_PART_MAX + 1], r[XJ_PART_MAX + 1];
	char part[EVENT_OPAQUE_ID_MAX + 1];
	if (!xj_split(jid, l, sizeof(l), d, sizeof(d), r, sizeof(r)) || strcmp(d, xc->domain) != 0 || l[0] != '#' ||
	    !xj_unescape_local(l + 1, part, sizeof(part)) || (size_t)snprintf(public_id, plen, "r_%s", part) >= plen ||
	    !room_public_id_valid(public_id))
		return false;
	int n = snprintf(bare, blen, "%s@%s", l, d);
	if (n <= 0 || (size_t)n >= blen || strlen(r) >= nlen)
		return false;
	snprintf(nick, nlen, "%s", r);
	return true;
}

/* ------------------------------------------------------------ occupants
 *
 * xc->muc: {room bare JID: {full JID: {"nick": s, "user": local bare JID,
 * "joining": true while the join is looked at, "kept": [[event id, stanza]]
 * meanwhile, "seen": {event id: true} of what the join's history gave
 * while it was still on its way}}}. */

#define KEPT_MAX 1000 /* stanzas kept for one occupant while its join is looked at */

static size_t occupants_count(json_t *muc)
{
	size_t n = 0;
	const char *k;
	json_t *v;
	json_object_foreach(muc, k, v)
		n += json_object_size(v);
	return n;
}

/* The occupants of user (her bare JID) in all rooms, under xc->mu. */
static size_t user_occupants_locked(const struct xcomp *xc, const char *user)
{
	size_t n = 0;
	const char *k, *full;
	json_t *v, *o;
	json_object_foreach(xc->muc, k, v)
		json_object_foreach(v, full, o) {
			const char *u = json_string_value(json_object_get(o, "user"));
			n += u && strcmp(u, user) == 0;
		}
	return n;
}

/* Whether full (of user) may be one more occupant of room: it is one
 * already, or its user has fewer than OCCUPANTS_PER_USER. */
static bool user_may_join(struct xcomp *xc, const char *room, const char *full, const char *user)
{
	pthread_mutex_lock(&xc->mu);
	bool ok = !xc->muc || json_object_get(json_object_get(xc->muc, room), full) ||
		  user_occupants_locked(xc, user) < OCCUPANTS_PER_USER;
	pthread_mutex_unlock(&xc->mu);
	return ok;
}

size_t xa_muc_count_locked(const struct xcomp *xc)
{
	return occupants_count(xc->muc);
}

/* full in room under nick; joining: its join is being looked at (what an
 * occupant had before, joining, kept and seen, stays).  The room is made
 * for the occupant it takes only: until the forty-ninth session a join
 * refused as the rooms were full (OCCUPANTS_MAX) left its room, empty,
 * in xc->muc for good. */
static bool occupant_put(struct xcomp *xc, const char *room, const char *full, const char *nick, const char *user,
			 bool joining)
{
	bool ok = false;
	pthread_mutex_lock(&xc->mu);
	if (!xc->muc)
		xc->muc = json_object();
	json_t *r = xc->muc ? json_object_get(xc->muc, room) : NULL;
	json_t *had = r ? json_object_get(r, full) : NULL;
	json_t *o = xc->muc && (had || occupants_count(xc->muc) < OCCUPANTS_MAX) ?
			    json_pack("{s:s, s:s}", "nick", nick, "user", user) : NULL;
	if (o && !r && json_object_set_new(xc->muc, room, json_object()) == 0)
		r = json_object_get(xc->muc, room);
	if (!r) {
		json_decref(o);
		o = NULL;
	}
	static const char *const keep[] = { "joining", "kept", "seen", "writers" };
	for (size_t i = 0; o && had && i < sizeof(keep) / sizeof(keep[0]); i++)
		if (json_object_get(had, keep[i]))
			json_object_set(o, keep[i], json_object_get(had, keep[i]));
	if (o && joining)
		json_object_set_new(o, "joining", json_true());
	if (o)
		ok = json_object_set_new(r, full, o) == 0;
	xc->muc_dirty = xc->muc_dirty || ok;
	pthread_mutex_unlock(&xc->mu);
	return ok;
}

/* full, while an occupant of room, under nick: one that went meanwhile
 * (its client left while its join was looked at) stays out.  Until the
 * forty-ninth session a join's answer giving the occupant another nick
 * put it back in (occupant_put), a gone client in for good. */
static void occupant_renick(struct xcomp *xc, const char *room, const char *full, const char *nick)
{
	pthread_mutex_lock(&xc->mu);
	json_t *o = xc->muc ? json_object_get(json_object_get(xc->muc, room), full) : NULL;
	if (o && json_object_set_new(o, "nick", json_string(nick)) == 0)
		xc->muc_dirty = true;
	pthread_mutex_unlock(&xc->mu);
}

/* Whether full is an occupant of room (its nick into nick). */
static bool occupant_get(struct xcomp *xc, const char *room, const char *full, char *nick, size_t nlen)
{
	pthread_mutex_lock(&xc->mu);
	json_t *o = xc->muc ? json_object_get(json_object_get(xc->muc, room), full) : NULL;
	if (o && nick)
		snprintf(nick, nlen, "%s", json_string_value(json_object_get(o, "nick")));
	pthread_mutex_unlock(&xc->mu);
	return o != NULL;
}

/* Whether full's join of room is still being looked at. */
static bool occupant_joining(struct xcomp *xc, const char *room, const char *full)
{
	pthread_mutex_lock(&xc->mu);
	json_t *o = xc->muc ? json_object_get(json_object_get(xc->muc, room), full) : NULL;
	bool joining = json_is_true(json_object_get(o, "joining"));
	pthread_mutex_unlock(&xc->mu);
	return joining;
}

static void occupant_del(struct xcomp *xc, const char *room, const char *full)
{
	pthread_mutex_lock(&xc->mu);
	json_t *r = xc->muc ? json_object_get(xc->muc, room) : NULL;
	if (r && json_object_del(r, full) == 0) {
		if (json_object_size(r) == 0)
			json_object_del(xc->muc, room);
		xc->muc_dirty = true;
	}
	pthread_mutex_unlock(&xc->mu);
}

bool xa_muc_is_occupant(struct xcomp *xc, const char *room, const char *full)
{
	return occupant_get(xc, room, full, NULL, 0);
}

enum xa_muc_route xa_muc_route(struct xcomp *xc, const char *room, const char *full, const char *id,
			       const char *text, size_t len)
{
	enum xa_muc_route to = XA_MUC_SKIP;
	pthread_mutex_lock(&xc->mu);
	json_t *o = xc->muc ? json_object_get(json_object_get(xc->muc, room), full) : NULL;
	if (o && json_is_true(json_object_get(o, "joining"))) {
		json_t *kept = json_object_get(o, "kept");
		if (!kept && json_object_set_new(o, "kept", json_array()) == 0)
			kept = json_object_get(o, "kept");
		/* past the bound (or without memory) it is left to the history */
		if (kept && json_array_size(kept) < KEPT_MAX &&
		    json_array_append_new(kept, json_pack("[s, s%]", id ? id : "", text, len)) == 0)
			to = XA_MUC_KEPT;
	} else if (o && !(id && json_object_get(json_object_get(o, "seen"), id))) {
		to = XA_MUC_NOW;
	}
	pthread_mutex_unlock(&xc->mu);
	return to;
}

json_t *xa_muc_occupants(struct xcomp *xc, const char *room, const char *user)
{
	json_t *out = json_array();
	pthread_mutex_lock(&xc->mu);
	const char *full;
	json_t *o;
	json_object_foreach(xc->muc ? json_object_get(xc->muc, room) : NULL, full, o)
		if (out && strcmp(json_string_value(json_object_get(o, "user")), user) == 0)
			json_array_append_new(out, json_pack("[s, s]", full, json_string_value(json_object_get(o, "nick"))));
	pthread_mutex_unlock(&xc->mu);
	return out;
}

/* st (released) to full, an occupant of room (id: the room's message it
 * is, or NULL), in its turn after its join's
 * answer (XEP-0045 §7.2: the others, the user's own presence, the history,
 * the subject, then what happens in the room): kept while the join is
 * looked at, as the room's messages are (xa_muc_route, joined), else
 * queued, behind an answer that may still be queued.  Until the
 * eighteenth session these were sent at once, ahead of the queue: a
 * presence the client sent while joining was answered before the others'
 * presences, and a member change could pass an answer not yet written. */
static void to_occupant(struct xcomp *xc, const char *room, const char *full, const char *id, xmpp_stanza_t *st)
{
	char *buf = NULL;
	size_t len = 0;
	xmpp_ctx_t *ctx = st ? xmpp_stanza_get_context(st) : NULL;
	if (st && xmpp_stanza_to_text(st, &buf, &len) == XMPP_EOK && buf &&
	    xa_muc_route(xc, room, full, id, buf, len) == XA_MUC_NOW)
		xa_enqueue(xc, buf, len, NULL, true);
	if (buf)
		xmpp_free(ctx, buf);
	if (st)
		xmpp_stanza_release(st);
}

/* ------------------------------------------------------------ stanzas */

xmpp_stanza_t *xa_muc_groupchat(xmpp_ctx_t *ctx, xmpp_stanza_t *st)
{
	xmpp_stanza_t *m = xmpp_message_new(ctx, "groupchat", xmpp_stanza_get_to(st), xmpp_stanza_get_id(st));
	if (m)
		xmpp_stanza_set_from(m, xmpp_stanza_get_from(st));
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); m && c; c = xmpp_stanza_get_next(c)) {
		const char *name = xmpp_stanza_get_name(c), *ns = xmpp_stanza_get_ns(c);
		if (name && ns && strcmp(name, "request") == 0 && strcmp(ns, "urn:xmpp:receipts") == 0)
			continue;
		xmpp_stanza_t *copy = xmpp_stanza_copy(c);
		if (!copy || xmpp_stanza_add_child(m, copy) != XMPP_EOK) {
			if (copy)
				xmpp_stanza_release(copy);
			xmpp_stanza_release(m);
			m = NULL;
			break;
		}
		xmpp_stanza_release(copy);
	}
	xmpp_stanza_release(st);
	return m;
}

void xa_muc_stanza_id(xmpp_ctx_t *ctx, xmpp_stanza_t *st, const char *id, const char *room)
{
	xmpp_stanza_t *sid = id && *id ? xa_child(ctx, st, "stanza-id", NS_SID) : NULL;
	if (sid) {
		xmpp_stanza_set_attribute(sid, "id", id);
		xmpp_stanza_set_attribute(sid, "by", room);
	}
}

/* <x xmlns='muc#user'><item affiliation='member' role=role/> + status codes. */
static void add_muc_user(xmpp_ctx_t *ctx, xmpp_stanza_t *p, const char *role, bool self)
{
	xmpp_stanza_t *x = xa_child(ctx, p, "x", NS_MUC_USER);
	xmpp_stanza_t *item = x ? xa_child(ctx, x, "item", NULL) : NULL;
	if (item) {
		xmpp_stanza_set_attribute(item, "affiliation", "member");
		xmpp_stanza_set_attribute(item, "role", role);
	}
	xmpp_stanza_t *st = self && x ? xa_child(ctx, x, "status", NULL) : NULL;
	if (st)
		xmpp_stanza_set_attribute(st, "code", "110");
}

static xmpp_stanza_t *occupant_presence(xmpp_ctx_t *ctx, const char *room, const char *nick, const char *to,
					bool self, bool gone)
{
	xmpp_stanza_t *p = xmpp_presence_new(ctx);
	if (!p)
		return NULL;
	char from[XJ_JID_MAX + NICK_MAX + 2];
	snprintf(from, sizeof(from), "%s/%s", room, nick);
	xmpp_stanza_set_from(p, from);
	xmpp_stanza_set_to(p, to);
	if (gone)
		xmpp_stanza_set_type(p, "unavailable");
	add_muc_user(ctx, p, gone ? "none" : "participant", self);
	return p;
}

/* An occupant's unavailable presence with a status code (XEP-0045's
 * registry): 321, out of the room because no longer a member (their
 * affiliation is none now); 332, because the service is shutting down
 * (the client joins again later). */
static xmpp_stanza_t *occupant_gone(xmpp_ctx_t *ctx, const char *room, const char *nick, const char *to, bool self,
				    const char *code)
{
	xmpp_stanza_t *p = occupant_presence(ctx, room, nick, to, self, true);
	xmpp_stanza_t *x = p ? xmpp_stanza_get_child_by_name_and_ns(p, "x", NS_MUC_USER) : NULL;
	xmpp_stanza_t *item = x ? xmpp_stanza_get_child_by_name(x, "item") : NULL;
	if (item && strcmp(code, "321") == 0)
		xmpp_stanza_set_attribute(item, "affiliation", "none");
	xmpp_stanza_t *st = x ? xa_child(ctx, x, "status", NULL) : NULL;
	if (st)
		xmpp_stanza_set_attribute(st, "code", code);
	return p;
}

/* A presence error answering a join (XEP-0045 §7.2.6: with the muc x). */
static xmpp_stanza_t *join_error(xmpp_ctx_t *ctx, const char *text, const char *type, const char *cond,
				 const char *why)
{
	xmpp_stanza_t *st = xmpp_stanza_new_from_string(ctx, text);
	xmpp_stanza_t *r = st ? xa_error_reply(st, type, cond, why) : NULL;
	if (r)
		xa_child(ctx, r, "x", NS_MUC);
	if (st)
		xmpp_stanza_release(st);
	return r;
}

static void stamp_of(int64_t ms, char *out, size_t len)
{
	time_t t = (time_t)(ms / 1000);
	struct tm tm;
	gmtime_r(&t, &tm);
	char base[32];
	strftime(base, sizeof(base), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(out, len, "%s.%03dZ", base, (int)(ms % 1000));
}

/* The room's subject: the group's name and what it is, sent last on
 * joining (a client counts the join done when it comes). */
static xmpp_stanza_t *subject(struct xcomp *xc, xmpp_ctx_t *ctx, const char *room, const char *name, const char *to)
{
	xmpp_stanza_t *m = xmpp_message_new(ctx, "groupchat", to, NULL);
	if (!m)
		return NULL;
	xmpp_stanza_set_from(m, room);
	/* A name the peer API would refuse now (stored before the
	 * thirty-first session: a bidirectional override that turns round
	 * what follows, a C1 control) as the Matrix portals show it
	 * (portal_name in mx_deliver.c): what of it shows.  Until the
	 * fortieth session it went out as stored. */
	char shown[4 * CW_NAME_SHOWN_MAX + 8];
	if (*name && !cw_utf8_name_ok(name, strlen(name))) {
		cw_utf8_name_shown(name, shown, sizeof(shown));
		name = shown;
	}
	char text[500];
	if (*name)
		snprintf(text, sizeof(text), "%s (bridged from %.60s by Causeway: encryption ends at the gateway)", name,
			 xc->peer);
	else
		snprintf(text, sizeof(text), "A group bridged from %.60s by Causeway (encryption ends at the gateway)",
			 xc->peer);
	xa_text_child(ctx, m, "subject", NULL, text);
	return m;
}

/* On the component's thread. */
static void subject_now(struct xcomp *xc, const char *room, const char *name, const char *to)
{
	to_occupant(xc, room, to, NULL, subject(xc, xc->ctx, room, name, to));
}

/* ------------------------------------------------------------ joining */

struct mjoin {
	struct xcomp *xc;
	char *text;                       /* the join presence, serialised */
	char public_id[EVENT_OPAQUE_ID_MAX + 1];
	char room[XJ_JID_MAX + 1];        /* the room's bare JID */
	char full[XJ_JID_MAX + 1];        /* the joining resource */
	char user[XJ_JID_MAX + 1];        /* its bare JID */
	char uri[MIMI_URI_MAX + 1];       /* the user's */
	char local[MIMI_LOCAL_MAX + 1];   /* their local part */
	char nick[NICK_MAX + 1];
	char name[256];                   /* the group's, "" for none */
	char native[600];                 /* the binding's pair key */
	int max;                          /* history: at most this many messages */
	char since[40];                   /* history: newer than this (ISO 8601), "" for any */
	/* the job's */
	bool member, created;              /* created: the room is new (made by this join) */
	bool limited;                     /* no such room, and the user made her day's groups */
	json_t *members;                  /* [nick] of the others */
	json_t *locals;                   /* [local part] of the others of this server */
	json_t *history;                  /* [[nick, event, ts ms, msg id, on its way]] oldest first
					     (event: as stored, with its last correction's parts) */
};

static void mjoin_free(struct mjoin *j)
{
	free(j->text);
	json_decref(j->members);
	json_decref(j->locals);
	json_decref(j->history);
	free(j);
}

/* How far back a join looks for its history: the room's last this many
 * events (of every type: the room's index has no other order).  The
 * history wants the newest maxstanzas (at most 50) the user may read, and
 * only the outbox says which those are, one probe per event: a member the
 * room sent nothing lately (a new one) had all the room's events read,
 * seconds of the component's writer in a busy room, every other stanza of
 * the component waiting.  An index of the outbox by its target would let
 * the query start from the user's rows, but every outbox row would pay for
 * it; room_members.updated_at is no join time (a role change moves it, and
 * a member who left and came back may read what came before), so the bound
 * is a number of events: enough for 50 messages among a busy room's
 * receipts, reactions and typing, a few milliseconds of probes. */
#define HISTORY_WINDOW "1000"

/* Whether the joining user may make one more group (the room she joins is
 * nobody's yet): xmpp.user_groups_per_day, counted from what is stored,
 * the groups she made within the last day: the group rooms whose first
 * binding is hers, made within the day (the join that makes a group binds
 * her to it in the statement that makes it; another's join, a Matrix
 * portal, a peer's room (created_by_peer_id) come after, or are not
 * counted).  Under her lock (XMPP_GROUP_LOCK_CLASS, store.h), taken in a
 * statement of its own before the count and held to the commit: two joins
 * of hers, in two daemon processes too, never both take the last one.  A
 * group made here is kept for good (its rows, its binding), and until the
 * fortieth session every join of an unused name made one: joining and
 * leaving, one user made 10,000 in 78 s (a review's finding).  Until the
 * forty-first session the bound was a token bucket in each process's
 * memory: full again after a restart, and N times the bound with N
 * processes.  Asked only of a name no room has. */
static cw_err may_make_group(PGconn *c, const struct mjoin *j, bool *ok, cw_errmsg *e)
{
	const char *p[] = { j->uri };
	PGresult *r = PQexecParams(c, "SELECT pg_advisory_xact_lock(" XMPP_GROUP_LOCK_CLASS ", hashtext($1))", 1, NULL, p,
				   NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	PQclear(r);
	r = PQexecParams(c,
		"SELECT count(*) FROM identities i JOIN room_bindings b ON b.network = 'xmpp' "
		"AND b.local_identity_id = i.id AND b.remote_identity_id IS NULL "
		"AND b.created_at > now() - interval '1 day' JOIN rooms x ON x.id = b.room_id AND x.kind = 'group' "
		"AND x.created_by_peer_id IS NULL WHERE i.uri = $1 AND i.is_local "
		"AND NOT EXISTS (SELECT 1 FROM room_bindings f WHERE f.room_id = b.room_id AND f.id < b.id)",
		1, NULL, p, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	*ok = atol(PQgetvalue(r, 0, 0)) < j->xc->x->cfg->xmpp_user_groups_per_day;
	PQclear(r);
	return CW_OK;
}

/* On the writer: the member check, the binding (made on a first join), the
 * other members and the history the user may read (what was delivered to
 * them, and their own messages) among the room's last HISTORY_WINDOW
 * events, each with the text of its last correction that was delivered to
 * them too (or is their own): until the forty-ninth session the last
 * correction of all, and one the policy dropped for them (they blocked
 * its writer since) came by the history.  A row to them still on its way counts as delivered: its stanza
 * may have been made before they were in (the group's first message: their
 * invitation), and reaches them here; if it is made after, xa_muc_route
 * skips it.  The window is a subquery with a LIMIT, so no plan reads
 * more of the room (newest first, the outbox probed no further than the
 * maxstanzas-th message found).  It must be read from events_room_idx: the
 * events' primary key, read backwards, passes every other room's newer
 * events, and the planner takes it when it thinks the room holds much of
 * the table (a few rooms).  With "room_id = x" the room's part of the
 * order (room_id, id) is a constant to the planner, and either index has
 * the rest; "BETWEEN x AND x" is the same rows and an order only
 * events_room_idx has.  The outbox is probed by event (its unique key)
 * for each event of the window: OFFSET 0 keeps the planner from hashing
 * the whole outbox's delivered rows instead (it did, a table scan, when it
 * guessed the probes dearer: 0.2 s at 180,000 rows). */
static cw_err join_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	struct mjoin *j = arg;
	/* A local user a peer or a member invited (schema/037, invite_fn)
	 * is marked joined (mk, below) under the room's lock of every write of events, taken first
	 * in a statement of its own, as the message paths and the Matrix
	 * mark take it (mx_mark_joined): a group write holding it, which read
	 * her invited, commits first (its message decided as for an invited
	 * user, before her join), and one waiting for it reads her joined;
	 * the mark's statement then reads what the holder committed.  Only
	 * when there is an invitation to end: a member's join (every client
	 * reconnecting joins its rooms) waits for nobody.  Until the
	 * thirty-second session the mark took no lock, and a message read
	 * with her invited could commit after she was joined. */
	const char *lp[] = { j->public_id, j->uri };
	PGresult *lr = PQexecParams(c,
		"SELECT count(" ROOM_LOCK_SQL("x.room_id") ") FROM room_members x JOIN rooms r ON r.id = x.room_id "
		"JOIN identities i ON i.id = x.identity_id WHERE r.public_id = $1 AND i.uri = $2 AND i.is_local "
		"AND x.membership = 'invited'", 2, NULL, lp, NULL, NULL, 0);
	cw_err lrc = store_check(c, lr, PGRES_TUPLES_OK, e);
	if (lrc)
		return lrc;
	PQclear(lr);
	/* A name no room has makes a group, within the user's bound; a
	 * refusal makes nothing (the statement below inserts only when
	 * $11 says so, and answers no row then: j->limited says why). */
	const char *np[] = { j->public_id };
	PGresult *nr = PQexecParams(c, "SELECT 1 FROM rooms WHERE public_id = $1", 1, NULL, np, NULL, NULL, 0);
	cw_err nrc = store_check(c, nr, PGRES_TUPLES_OK, e);
	if (nrc)
		return nrc;
	bool fresh = PQntuples(nr) == 0, may = true;
	PQclear(nr);
	if (fresh && (nrc = may_make_group(c, j, &may, e)))
		return nrc;
	j->limited = !may;
	char max[16];
	snprintf(max, sizeof(max), "%d", j->max);
	const char *domain = j->xc->x->cfg->domain ? j->xc->x->cfg->domain : "";
	const char *params[] = { j->public_id, j->uri, j->xc->peer, j->native, j->user, max, j->since, domain, j->local,
				 j->xc->domain, j->limited ? "false" : "true" };
	PGresult *r = PQexecParams(c,
		/* a room nobody has is made, hosted here, the user its first member */
		"WITH ex AS (SELECT id, kind FROM rooms WHERE public_id = $1), "
		"nr AS (INSERT INTO rooms (public_id, uri, hub_domain, kind) SELECT $1, 'mimi://' || $8 || '/r/' || $1, $8, "
		"  'group' WHERE NOT EXISTS (SELECT 1 FROM ex) AND $11::boolean ON CONFLICT DO NOTHING RETURNING id), "
		"r AS (SELECT id FROM ex WHERE kind = 'group' UNION ALL SELECT id FROM nr), "
		/* her row locked as identity_id locks it: one the retention
		 * sweep is deleting is waited for, not found, and made anew
		 * for a new group (a member's row the sweep never takes) */
		"u0 AS (SELECT id FROM identities WHERE uri = $2 AND is_local FOR KEY SHARE), "
		"u1 AS (INSERT INTO identities (uri, domain, localpart, is_local, network) SELECT $2, $8, $9, true, 'xmpp' "
		"  WHERE NOT EXISTS (SELECT 1 FROM u0) AND EXISTS (SELECT 1 FROM nr) ON CONFLICT DO NOTHING RETURNING id), "
		"u AS (SELECT id FROM u0 UNION ALL SELECT id FROM u1), "
		"nm AS (INSERT INTO room_members (room_id, identity_id, membership) SELECT nr.id, u.id, 'joined' FROM nr, u), "
		/* else a member, of a group of this component's peer, or of one
		 * made here, on this component (the room JID its members have it
		 * under: xmpp_out.c delivers there) */
		"ok AS (SELECT r.id AS room, u.id AS me FROM r, u WHERE r.id IN (SELECT id FROM nr) OR (EXISTS (SELECT 1 "
		"  FROM room_members x WHERE x.room_id = r.id AND x.identity_id = u.id AND x.membership IN ('joined', "
		"  'invited')) "
		"  AND (EXISTS (SELECT 1 FROM rooms x JOIN peers p ON p.id = x.created_by_peer_id WHERE x.id = r.id "
		"  AND p.name = $3) OR (EXISTS (SELECT 1 FROM rooms x WHERE x.id = r.id AND x.hub_domain = $8 "
		"  AND x.created_by_peer_id IS NULL) AND NOT EXISTS (SELECT 1 FROM room_bindings b WHERE b.room_id = r.id "
		"  AND b.network = 'xmpp' AND b.remote_identity_id IS NULL AND b.native_id NOT LIKE 'h:%' "
		"  AND split_part(split_part(b.native_id, ' ', 2), '@', 2) <> $10))))), "
		/* a local user a peer invited (schema/037) is a member once she
		 * joins the chat room her first message let through named, and
		 * one a member invited (invite_fn) once she joins its room */
		"mk AS (UPDATE room_members x SET membership = 'joined', peer_invited = false, updated_at = now() FROM ok "
		"  WHERE x.room_id = ok.room AND x.identity_id = ok.me AND x.membership = 'invited'), "
		"b AS (INSERT INTO room_bindings (room_id, network, native_id, local_identity_id) "
		"  SELECT room, 'xmpp', $4, me FROM ok ON CONFLICT DO NOTHING), "
		"ib AS (INSERT INTO identity_bindings (identity_id, network, native_id) SELECT me, 'xmpp', $5 FROM ok "
		"  ON CONFLICT DO NOTHING), "
		"h AS (SELECT e.id, e.public_id, CASE WHEN e.sender_id = ok.me THEN '' "
		MUC_NICK_JOINING("s", "ok.room", "ok.me") " AS localpart, "
		"  coalesce(jsonb_set(e.content, '{content,parts}', (SELECT x.content->'content'->'parts' FROM events x "
		"  WHERE x.type = 'edit' AND x.replaces_id = e.id AND x.sender_id = e.sender_id AND (x.sender_id = ok.me "
		"  OR EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = x.id AND o.target_identity_id = ok.me "
		"  AND o.state IN ('delivered', 'in_flight'))) ORDER BY x.id DESC LIMIT 1)), "
		"  e.content) AS ev, e.ts, EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id "
		"  AND o.target_identity_id = ok.me AND o.state = 'in_flight') AS going "
		"  FROM ok, (SELECT w.id, w.public_id, w.sender_id, w.type, w.content, w.ts, w.accepted_at FROM events w "
		"  WHERE w.room_id BETWEEN (SELECT room FROM ok) AND (SELECT room FROM ok) ORDER BY w.room_id DESC, w.id DESC "
		"  LIMIT " HISTORY_WINDOW ") e "
		"  JOIN identities s ON s.id = e.sender_id "
		"  WHERE e.type = 'message' AND ($7 = '' OR e.accepted_at > $7::timestamptz) "
		"  AND (e.sender_id = ok.me OR EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id "
		"  AND o.target_identity_id = ok.me AND o.state IN ('delivered', 'in_flight') OFFSET 0)) "
		"  AND NOT EXISTS (SELECT 1 FROM events d WHERE d.type = 'delete' AND d.replaces_id = e.id) "
		"  ORDER BY e.id DESC LIMIT $6::int) "
		"SELECT 'ok', (SELECT name FROM rooms WHERE id = ok.room), EXISTS (SELECT 1 FROM nr)::text, NULL, NULL FROM ok "
		"UNION ALL SELECT 'member', CASE " MUC_NICK_JOINING("i", "ok.room", "ok.me") ", "
		"  CASE WHEN i.is_local THEN i.localpart END, "
		"  NULL, NULL FROM ok, room_members x "
		"  JOIN identities i ON i.id = x.identity_id WHERE x.room_id = ok.room AND x.membership = 'joined' "
		"  AND i.id <> ok.me "
		"UNION ALL SELECT 'h', h.localpart, h.ev::text, h.ts::text || ' ' || h.public_id, h.going::text FROM (SELECT * FROM h "
		"  ORDER BY id) AS h",
		11, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	j->created = false;
	json_array_clear(j->members);
	json_array_clear(j->locals);
	json_array_clear(j->history);
	j->member = false;
	for (int i = 0; i < PQntuples(r); i++) {
		const char *kind = PQgetvalue(r, i, 0);
		if (strcmp(kind, "ok") == 0) {
			j->member = true;
			j->created = PQgetvalue(r, i, 2)[0] == 't';
			if (!PQgetisnull(r, i, 1))
				snprintf(j->name, sizeof(j->name), "%s", PQgetvalue(r, i, 1));
		} else if (strcmp(kind, "member") == 0) {
			json_array_append_new(j->members, json_string(PQgetvalue(r, i, 1)));
			if (!PQgetisnull(r, i, 2))
				json_array_append_new(j->locals, json_string(PQgetvalue(r, i, 2)));
		} else if (!PQgetisnull(r, i, 2)) {
			long long ts = atoll(PQgetvalue(r, i, 3));
			const char *id = strchr(PQgetvalue(r, i, 3), ' ');
			json_t *ev = json_loads(PQgetvalue(r, i, 2), 0, NULL);
			/* its id, which its files' links name (peer_media_public:
			 * served only while the message is there) */
			if (ev && id)
				json_object_set_new(ev, "id", json_string(id + 1));
			if (ev)
				json_array_append_new(j->history, json_pack("[s, o, I, s, b]", PQgetvalue(r, i, 1), ev,
									    (json_int_t)ts, id ? id + 1 : "",
									    PQgetvalue(r, i, 4)[0] == 't'));
		}
	}
	PQclear(r);
	return CW_OK;
}

/* A room's set of members (xc->muc_members) holds each member's nick,
 * "#name", and "#l:<local part>" for each member of this server: a
 * remote member's nick may be a local part too (the peer's alice is
 * "alice" once this server's alice is gone), so whether one of ours is
 * still a member, or a nick still names the same member, is told by the
 * "#l:" keys, not by the nicks.  Until the fortieth session the nicks
 * alone decided, and our alice, gone, stayed in her room when the
 * peer's alice took her nick (a review's finding). */
static bool local_key(const char *local, char *key, size_t len)
{
	int n = snprintf(key, len, "#l:%s", local);
	return n >= 0 && (size_t)n < len; /* a name too long is no local part */
}

static bool local_in(const json_t *set, const char *local)
{
	char key[MIMI_LOCAL_MAX + 8];
	return set && local_key(local, key, sizeof(key)) && json_object_get(set, key) != NULL;
}

/* The room's members as its occupants were last told (xc->muc_members:
 * {room: {local part: true}}, the joining user's own included), set by the
 * first join; xa_muc_members follows the changes. */
static void announce_first(struct xcomp *xc, const struct mjoin *j)
{
	pthread_mutex_lock(&xc->mu);
	if (!xc->muc_members)
		xc->muc_members = json_object();
	if (xc->muc_members && !json_object_get(xc->muc_members, j->room)) {
		json_t *set = json_object();
		size_t i;
		json_t *v;
		json_array_foreach(j->members, i, v)
			json_object_set_new(set, json_string_value(v), json_true());
		const char *at = strchr(j->uri, '/') ? strrchr(j->uri, '/') + 1 : j->uri;
		json_object_set_new(set, at, json_true());
		char key[MIMI_LOCAL_MAX + 8];
		if (local_key(at, key, sizeof(key)))
			json_object_set_new(set, key, json_true());
		json_array_foreach(j->locals, i, v)
			if (local_key(json_string_value(v), key, sizeof(key)))
				json_object_set_new(set, key, json_true());
		json_object_set_new(set, "#name", json_string(j->name)); /* '#' begins no local part */
		json_object_set_new(xc->muc_members, j->room, set);
	}
	pthread_mutex_unlock(&xc->mu);
}

/* st (released) serialised at the end of out. */
static void add_text(json_t *out, xmpp_stanza_t *st)
{
	char *buf = NULL;
	size_t len = 0;
	if (st && xmpp_stanza_to_text(st, &buf, &len) == XMPP_EOK && buf)
		json_array_append_new(out, json_stringn_nocheck(buf, len));
	if (buf)
		xmpp_free(xmpp_stanza_get_context(st), buf);
	if (st)
		xmpp_stanza_release(st);
}

/* The unavailable presence of full's occupant leaving had for nick
 * (XEP-0045 §7.6): 110, 303 naming the new nick, and the role it keeps
 * (participant: still in, example 53). */
static xmpp_stanza_t *nick_gone(xmpp_ctx_t *ctx, const char *room, const char *had, const char *nick,
				const char *full)
{
	xmpp_stanza_t *p = occupant_presence(ctx, room, had, full, true, true);
	xmpp_stanza_t *x = p ? xmpp_stanza_get_child_by_name_and_ns(p, "x", NS_MUC_USER) : NULL;
	xmpp_stanza_t *item = x ? xmpp_stanza_get_child_by_name(x, "item") : NULL;
	if (item) {
		xmpp_stanza_set_attribute(item, "nick", nick);
		xmpp_stanza_set_attribute(item, "role", "participant");
	}
	xmpp_stanza_t *code = x ? xa_child(ctx, x, "status", NULL) : NULL;
	if (code)
		xmpp_stanza_set_attribute(code, "code", "303");
	return p;
}

/* full's own presence (110) under nick, with 210 when the room gave it
 * that nick, not the one its client asked for (XEP-0045 §7.2.9). */
static xmpp_stanza_t *own_presence(xmpp_ctx_t *ctx, const char *room, const char *nick, const char *full,
				   bool assigned)
{
	xmpp_stanza_t *p = occupant_presence(ctx, room, nick, full, true, false);
	xmpp_stanza_t *x = p && assigned ? xmpp_stanza_get_child_by_name_and_ns(p, "x", NS_MUC_USER) : NULL;
	xmpp_stanza_t *code = x ? xa_child(ctx, x, "status", NULL) : NULL;
	if (code)
		xmpp_stanza_set_attribute(code, "code", "210");
	return p;
}

/* full told (queued, under xc->mu: the caller wakes the writer) that the
 * room moved its occupant from had to nick: a nick change (nick_gone)
 * the room made (210). */
static bool tell_moved_locked(struct xcomp *xc, xmpp_ctx_t *ctx, const char *room, const char *full, const char *had,
			      const char *nick)
{
	json_t *out = json_array();
	add_text(out, nick_gone(ctx, room, had, nick, full));
	add_text(out, own_presence(ctx, room, nick, full, true));
	bool ok = json_array_size(out) == 2;
	size_t i;
	json_t *v;
	json_array_foreach(ok ? out : NULL, i, v)
		ok = ok && xa_enqueue_locked(xc, json_string_value(v), json_string_length(v));
	json_decref(out);
	return ok;
}

/* The user's occupant never holds a nick under which the room speaks for
 * someone else in their view (a member, or the writer of a message it
 * shows): XEP-0045 clients take a stanza from their own occupant JID for
 * their own (a member added under it spoke "as" the user until the
 * thirtieth session).  When nick, someone else's, is the occupant full's
 * of room, it gives way (under xc->mu): it takes the user's local part,
 * which is nobody else's in their view (a remote namesake of a member is
 * "<local part>@<domain>": MUC_NICK), told as a nick change the room
 * made; a joining occupant is told after its join's answer (joined).
 * Whether it moved; *queued made false when what it is told did not fit
 * the queue (for the caller to say once xc->mu is released: a blocked
 * stderr must not hold the component's lock). */
static bool give_way_locked(struct xcomp *xc, xmpp_ctx_t *ctx, const char *room, const char *full, const char *nick,
			    bool *queued)
{
	json_t *o = xc->muc ? json_object_get(json_object_get(xc->muc, room), full) : NULL;
	const char *user = o ? json_string_value(json_object_get(o, "user")) : NULL;
	const char *had = o ? json_string_value(json_object_get(o, "nick")) : NULL;
	if (!user || !had || strcmp(had, nick) != 0)
		return false;
	char old[NICK_MAX + 1], local[XJ_JID_MAX + 1];
	snprintf(old, sizeof(old), "%s", had);
	snprintf(local, sizeof(local), "%.*s", (int)strcspn(user, "@"), user);
	if (strcmp(local, old) == 0 || json_object_set_new(o, "nick", json_string(local)) != 0)
		return false;
	xc->muc_dirty = true;
	if (json_is_true(json_object_get(o, "joining")))
		json_object_set_new(o, "moved", json_true());
	else if (!tell_moved_locked(xc, ctx, room, full, old, local))
		*queued = false;
	return true;
}

/* After give_way_locked (xc->mu released): what it could not queue. */
static void move_lost(const struct xcomp *xc, const char *room)
{
	LOG_KV(CW_LOG_WARN, "xmpp: an occupant's move did not fit the queue", "component", xc->domain, "room", room);
}

bool xa_muc_give_way(struct xcomp *xc, xmpp_ctx_t *ctx, const char *room, const char *full, const char *nick)
{
	bool queued = true;
	pthread_mutex_lock(&xc->mu);
	bool moved = give_way_locked(xc, ctx, room, full, nick, &queued);
	pthread_mutex_unlock(&xc->mu);
	if (!queued)
		move_lost(xc, room);
	if (moved)
		xa_wake(xc);
	return moved;
}

bool xa_muc_member_jid(struct xcomp *xc, const char *room, const char *nick, char *out, size_t len)
{
	pthread_mutex_lock(&xc->mu);
	const json_t *set = xc->muc_members ? json_object_get(xc->muc_members, room) : NULL;
	bool member = nick[0] != '#' && json_object_get(set, nick) != NULL, local = member && local_in(set, nick);
	pthread_mutex_unlock(&xc->mu);
	if (local) {
		int n = snprintf(out, len, "%s@%s", nick, xc->x->local_domain);
		return n > 0 && (size_t)n < len;
	}
	/* a remote member's nick: their id, or "<id>@<their domain>" beside
	 * one of ours of that name (MUC_NICK) */
	char id[MIMI_LOCAL_MAX + 1];
	return member && (size_t)snprintf(id, sizeof(id), "%.*s", (int)strcspn(nick, "@"), nick) < sizeof(id) &&
	       xa_remote_jid(xc, id, out, len);
}

/* The members of the set from (each set as xc->muc_members holds a
 * room's) that are not in the set to, as [sign, nick] at out's end: the
 * nick absent from to, or naming another member there (one of this
 * server's in one set, the peer's namesake in the other: told by the
 * "#l:" keys); the nick self (its first self_len bytes: the local part of
 * the occupant told) is nobody to tell of. */
static void members_not_in(json_t *out, const json_t *from, const json_t *to, const char *sign, const char *self,
			   size_t self_len)
{
	const char *who;
	json_t *x;
	json_object_foreach((json_t *)from, who, x) {
		bool same = strlen(who) == self_len && strncmp(who, self, self_len) == 0;
		if (who[0] != '#' && !same && (!json_object_get(to, who) || local_in(from, who) != local_in(to, who)))
			json_array_append_new(out, json_pack("[s, s]", sign, who));
	}
}

/* Who went and who came from the member set before to after, as
 * [["-" or "+", nick]], those who went first: a nick that names another
 * member after went and came. */
static json_t *members_diff(const json_t *before, const json_t *after, const char *self, size_t self_len)
{
	json_t *out = json_array();
	members_not_in(out, before, after, "-", self, self_len);
	members_not_in(out, after, before, "+", self, self_len);
	return out;
}

json_t *xa_muc_since(const json_t *told, const json_t *members, const json_t *locals, const char *own)
{
	/* the snapshot as a set: the nicks, and "#l:" for this server's */
	json_t *snap = json_object(), *v;
	size_t i;
	char key[MIMI_LOCAL_MAX + 8];
	json_array_foreach(members, i, v)
		json_object_set_new(snap, json_string_value(v), json_true());
	json_array_foreach(locals, i, v)
		if (local_key(json_string_value(v), key, sizeof(key)))
			json_object_set_new(snap, key, json_true());
	json_t *out = members_diff(snap, told, own, strlen(own));
	json_decref(snap);
	return out;
}

/* What the room's occupants were told of its members (told: the room's
 * set in xc->muc_members) that the join's answer, made from its own
 * snapshot, did not say: who came, who went, a new name. xa_muc_members
 * tells every occupant but the joining ones the changes from that set on,
 * so a change between the join's snapshot and its answer was missed by
 * the joining resource until the next one.  (A snapshot newer than the
 * set: the difference goes back to the set, and the next look brings the
 * change to everyone.) Under xc->mu. */
static json_t *members_since(struct xcomp *xc, xmpp_ctx_t *ctx, const struct mjoin *j, json_t *told)
{
	json_t *out = json_array();
	const char *own = strrchr(j->uri, '/') ? strrchr(j->uri, '/') + 1 : j->uri;
	json_t *diff = xa_muc_since(told, j->members, j->locals, own);
	size_t i;
	json_t *v;
	json_array_foreach(diff, i, v) {
		const char *nick = json_string_value(json_array_get(v, 1));
		if (strcmp(json_string_value(json_array_get(v, 0)), "+") == 0)
			add_text(out, occupant_presence(ctx, j->room, nick, j->full, false, false));
		else
			add_text(out, occupant_gone(ctx, j->room, nick, j->full, false, "321"));
	}
	json_decref(diff);
	const char *name = json_string_value(json_object_get(told, "#name"));
	if (name && strcmp(name, j->name) != 0)
		add_text(out, subject(xc, ctx, j->room, name, j->full));
	return out;
}

/* The join's answer (out) is queued and the occupant is in, under one
 * hold of xc->mu: what xa_muc_route lets go to it after is queued after
 * the answer, and so are the member changes the others were told while
 * the join was looked at (members_since).  What it kept meanwhile
 * follows, but for what the history gave (given); what the history gave
 * while it was on its way (going) is skipped when its stanza is made
 * later.  An occupant that went meanwhile gets nothing. */
static void joined(struct xcomp *xc, xmpp_ctx_t *ctx, const struct mjoin *j, json_t *out, json_t *given,
		   json_t *going)
{
	bool queued = true, move_queued = true;
	pthread_mutex_lock(&xc->mu);
	json_t *o = xc->muc ? json_object_get(json_object_get(xc->muc, j->room), j->full) : NULL;
	json_t *kept = o ? json_incref(json_object_get(o, "kept")) : NULL;
	if (o) {
		json_object_del(o, "kept");
		json_object_del(o, "joining");
		json_t *seen = json_object_get(o, "seen");
		if (json_object_size(going) && !seen && json_object_set_new(o, "seen", json_object()) == 0)
			seen = json_object_get(o, "seen");
		json_object_update(seen, going);
		size_t i;
		json_t *v;
		json_array_foreach(out, i, v)
			queued = queued && xa_enqueue_locked(xc, json_string_value(v), json_string_length(v));
		json_t *told = xc->muc_members ? json_object_get(xc->muc_members, j->room) : NULL;
		/* The room moved the occupant while its join was looked at
		 * (someone else's message under its nick: give_way_locked): told
		 * now; and a member the others were told of since the join's
		 * snapshot under its nick makes it give way, before that
		 * member's presence. */
		const char *now = json_string_value(json_object_get(o, "nick"));
		if (json_object_get(o, "moved") && now && strcmp(now, j->nick) != 0)
			queued = queued && tell_moved_locked(xc, ctx, j->room, j->full, j->nick, now);
		json_object_del(o, "moved");
		if (told && now && json_object_get(told, now))
			give_way_locked(xc, ctx, j->room, j->full, now, &move_queued);
		json_t *since = told ? members_since(xc, ctx, j, told) : NULL;
		json_array_foreach(since, i, v)
			queued = queued && xa_enqueue_locked(xc, json_string_value(v), json_string_length(v));
		json_decref(since);
		json_array_foreach(kept, i, v) {
			json_t *t = json_array_get(v, 1);
			if (!json_object_get(given, json_string_value(json_array_get(v, 0))))
				queued = queued && xa_enqueue_locked(xc, json_string_value(t), json_string_length(t));
		}
	}
	pthread_mutex_unlock(&xc->mu);
	json_decref(kept);
	xa_wake(xc);
	if (!move_queued)
		move_lost(xc, j->room);
	if (!queued)
		LOG_KV(CW_LOG_WARN, "xmpp: a join's answer did not fit the queue", "component", xc->domain, "room",
		       j->room);
}

/* Whether a nick is refused as taken (conflict), on joining and on a
 * nick change alike: one beginning with '#' (no member's local part does,
 * and the room's member sets keep the group's name under "#name"), or a
 * member's (a_members; the room speaks for the members under their local
 * parts) other than the user's own local part.  Until the twenty-third
 * session a join took a '#' nick, which a nick change refused. */
static bool nick_taken(const char *nick, const char *local, bool a_members)
{
	return nick[0] == '#' || (a_members && strcmp(nick, local) != 0);
}

static void join_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct mjoin *j = arg;
	struct xcomp *xc = j->xc;
	xmpp_ctx_t *ctx = xa_thread_ctx(xc->x);
	if (!ctx) {
		occupant_del(xc, j->room, j->full);
		mjoin_free(j);
		return;
	}
	bool a_members = false;
	for (size_t i = 0; i < json_array_size(j->members); i++)
		a_members = a_members || strcmp(json_string_value(json_array_get(j->members, i)), j->nick) == 0;
	bool taken = nick_taken(j->nick, j->local, a_members);
	if (rc || !j->member || taken) {
		occupant_del(xc, j->room, j->full);
		if (rc)
			LOG_KV(CW_LOG_WARN, "xmpp: a join could not be looked at", "component", xc->domain, "detail",
			       e ? e->msg : "");
		/* Not a member (or no such group): the same answer, item-not-found;
		 * no such group, and she may make no more for now: wait. */
		bool limited = !rc && !j->member && j->limited;
		const char *cond = rc ? "internal-server-error" : limited ? "resource-constraint"
					      : taken ? "conflict" : "item-not-found";
		xmpp_stanza_t *err = join_error(ctx, j->text, rc || limited ? "wait" : "cancel", cond,
						limited ? "You have made as many new groups as you may for now: "
							  "join one that exists, or try again later."
							: NULL);
		if (err)
			xa_enqueue_stanza(xc, err);
		mjoin_free(j);
		return;
	}
	/* A writer in the history under the nick asked for (not a member: a
	 * member's nick is a conflict): the user takes their local part
	 * instead, which the room gives nobody else (give_way_locked), and
	 * is told so (210). */
	size_t i;
	json_t *v;
	bool assigned = false;
	json_array_foreach(j->history, i, v)
		assigned = assigned || strcmp(json_string_value(json_array_get(v, 0)), j->nick) == 0;
	if (assigned && strcmp(j->nick, j->local) != 0) {
		snprintf(j->nick, sizeof(j->nick), "%s", j->local);
		occupant_renick(xc, j->room, j->full, j->nick);
	}
	/* The history's writers who are no members (gone since): the
	 * occupant's nick changes are refused theirs as its join was
	 * (nick_change); until the forty-ninth session only the members'
	 * were. */
	json_t *writers = json_object();
	json_array_foreach(j->history, i, v) {
		const char *w = json_string_value(json_array_get(v, 0));
		bool member = false;
		for (size_t m = 0; m < json_array_size(j->members); m++)
			member = member || strcmp(json_string_value(json_array_get(j->members, m)), w) == 0;
		if (writers && w[0] && strcmp(w, j->local) != 0 && !member)
			json_object_set_new(writers, w, json_true());
	}
	pthread_mutex_lock(&xc->mu);
	json_t *occ = xc->muc ? json_object_get(json_object_get(xc->muc, j->room), j->full) : NULL;
	if (occ && json_object_size(writers))
		json_object_set(occ, "writers", writers);
	pthread_mutex_unlock(&xc->mu);
	json_decref(writers);
	/* The answer, in order: the others, the user (110), the history, the
	 * subject (XEP-0045 §7.2). */
	json_t *out = json_array(), *given = json_object(), *going = json_object();
	json_array_foreach(j->members, i, v)
		add_text(out, occupant_presence(ctx, j->room, json_string_value(v), j->full, false, false));
	announce_first(xc, j);
	xmpp_stanza_t *me = own_presence(ctx, j->room, j->nick, j->full, assigned);
	xmpp_stanza_t *ux = me ? xmpp_stanza_get_child_by_name_and_ns(me, "x", NS_MUC_USER) : NULL;
	xmpp_stanza_t *created = j->created && ux ? xa_child(ctx, ux, "status", NULL) : NULL;
	if (created) /* XEP-0045 §10.1.1: a new room */
		xmpp_stanza_set_attribute(created, "code", "201");
	add_text(out, me);
	json_array_foreach(j->history, i, v) {
		const char *nick = json_string_value(json_array_get(v, 0)); /* "": the user's own */
		const char *id = json_string_value(json_array_get(v, 3));
		char from[XJ_JID_MAX + NICK_MAX + 2], stamp[40];
		snprintf(from, sizeof(from), "%s/%s", j->room, nick[0] ? nick : j->nick);
		/* as it was delivered (files as Causeway's links, a reply naming
		 * the room's id), with its last correction's text */
		json_t *ev = peer_media_public(xc->x->app, json_array_get(v, 1));
		const char *reply = json_string_value(json_object_get(json_object_get(ev, "content"), "in_reply_to"));
		/* a reply's "to" (XEP-0461 §3): its target's writer, when the
		 * history holds the target */
		char author[XJ_JID_MAX + NICK_MAX + 2] = "";
		size_t t;
		json_t *w;
		json_array_foreach(j->history, t, w) {
			const char *wnick = json_string_value(json_array_get(w, 0));
			if (reply && t < i && strcmp(json_string_value(json_array_get(w, 3)), reply) == 0) {
				snprintf(author, sizeof(author), "%s/%s", j->room, wnick[0] ? wnick : j->nick);
				break;
			}
		}
		struct xm_out_info info = { .from = from, .to = j->full, .id = id,
					    .target = { .known = reply != NULL, .id = reply, .origin_id = reply,
							.author = author[0] ? author : NULL } };
		xmpp_stanza_t *m = NULL;
		enum xm_out_result res = ev ? xm_from_neutral(ctx, ev, &info, &m, NULL, 0) : XM_OUT_INVALID;
		json_decref(ev);
		json_object_set_new(given, id, json_true());
		if (json_is_true(json_array_get(v, 4)))
			json_object_set_new(going, id, json_true());
		if (res != XM_OUT_STANZA) {
			if (m)
				xmpp_stanza_release(m);
			continue; /* nothing a room shows */
		}
		if (!(m = xa_muc_groupchat(ctx, m)))
			break;
		xa_muc_stanza_id(ctx, m, id, j->room);
		stamp_of(json_integer_value(json_array_get(v, 2)), stamp, sizeof(stamp));
		xmpp_stanza_t *d = xa_child(ctx, m, "delay", NS_DELAY);
		if (d) {
			xmpp_stanza_set_attribute(d, "stamp", stamp);
			xmpp_stanza_set_attribute(d, "from", j->room);
		}
		add_text(out, m);
	}
	add_text(out, subject(xc, ctx, j->room, j->name, j->full));
	joined(xc, ctx, j, out, given, going);
	json_decref(out);
	json_decref(given);
	json_decref(going);
	LOG_KV_LIMITED(CW_LOG_INFO, "xmpp: a user joined a group", "component", xc->domain, "room", j->room, "user", j->user);
	mjoin_free(j);
}

/* Whether s is a XEP-0082 DateTime, CCYY-MM-DDThh:mm:ss[.sss](Z|(+|-)hh:mm),
 * with its fields in range (PostgreSQL would refuse a 13th month or a
 * 25th hour, failing the join); if so, the time it names into *t, in
 * seconds since the epoch (the fraction dropped). */
static bool datetime_epoch(const char *s, time_t *t)
{
	static const char shape[] = "dddd-dd-ddTdd:dd:dd";
	for (size_t i = 0; i < sizeof(shape) - 1; i++)
		if (shape[i] == 'd' ? (s[i] < '0' || s[i] > '9') : s[i] != shape[i])
			return false;
	int y, mo, d, h, mi, sec, n = 0;
	if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &n) != 6 || n != 19 ||
	    mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || sec > 60 || y < 1 || h < 0 || mi < 0 || sec < 0)
		return false;
	static const int days[] = { 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
	bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
	if (d > days[mo - 1] || (mo == 2 && d == 29 && !leap))
		return false;
	const char *p = s + 19;
	if (*p == '.') {
		size_t digits = strspn(p + 1, "0123456789");
		if (digits == 0 || digits > 9)
			return false;
		p += 1 + digits;
	}
	int th = 0, tm = 0, m = 0;
	if (strcmp(p, "Z") != 0 &&
	    !((*p == '+' || *p == '-') && p[1] >= '0' && p[1] <= '9' && p[2] >= '0' && p[2] <= '9' && p[3] == ':' &&
	      p[4] >= '0' && p[4] <= '9' && p[5] >= '0' && p[5] <= '9' && !p[6] &&
	      sscanf(p + 1, "%2d:%2d%n", &th, &tm, &m) == 2 && m == 5 && th <= 14 && tm <= 59))
		return false;
	struct tm when = { .tm_year = y - 1900, .tm_mon = mo - 1, .tm_mday = d, .tm_hour = h, .tm_min = mi,
			   .tm_sec = sec };
	*t = timegm(&when) + (*p == '+' ? -1 : *p == '-' ? 1 : 0) * (time_t)(th * 3600 + tm * 60);
	return true;
}

/* The <history/> a join asks for (XEP-0045 §7.2.13), at now: maxstanzas,
 * seconds and since (into max and since, "" for any time); maxchars is
 * taken as "none" only when 0.  Both seconds and since: the messages that
 * meet both (§7.2.15), those after the later of the two; until the
 * forty-ninth session seconds alone was applied. */
void xa_muc_history_wanted(xmpp_stanza_t *st, time_t now, int *max, char *since, size_t len)
{
	*max = HISTORY_DEFAULT;
	since[0] = '\0';
	xmpp_stanza_t *x = xmpp_stanza_get_child_by_name_and_ns(st, "x", NS_MUC);
	xmpp_stanza_t *h = x ? xmpp_stanza_get_child_by_name(x, "history") : NULL;
	if (!h)
		return;
	const char *ms = xmpp_stanza_get_attribute(h, "maxstanzas");
	const char *mc = xmpp_stanza_get_attribute(h, "maxchars");
	const char *sec = xmpp_stanza_get_attribute(h, "seconds");
	const char *at = xmpp_stanza_get_attribute(h, "since");
	long long v;
	if (cw_decimal(ms, 0, 99999, false, &v))
		*max = (int)v;
	if (mc && strcmp(mc, "0") == 0)
		*max = 0;
	if (*max > HISTORY_MAX)
		*max = HISTORY_MAX;
	time_t at_t = 0;
	bool at_ok = at && strlen(at) < len && datetime_epoch(at, &at_t);
	if (at_ok)
		snprintf(since, len, "%s", at);
	if (cw_decimal(sec, 0, 999999999, false, &v) && !(at_ok && at_t >= now - (time_t)v)) {
		struct tm tm;
		time_t t = now - (time_t)v;
		gmtime_r(&t, &tm);
		strftime(since, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
	}
}

/* An occupant's new nick (XEP-0045 §7.6): a member's local part (other
 * than the user's own: the room speaks for the members under those), or
 * the nick of a writer in the history its join got, is a conflict; else the old nick goes with status 303 naming the new one,
 * and the caller sends the new one's presence.  False when refused
 * (answered). */
static bool nick_change(struct xcomp *xc, xmpp_stanza_t *st, const char *room, const char *from, const char *local,
			const char *had, const char *nick)
{
	pthread_mutex_lock(&xc->mu);
	json_t *set = xc->muc_members ? json_object_get(xc->muc_members, room) : NULL;
	json_t *o = xc->muc ? json_object_get(json_object_get(xc->muc, room), from) : NULL;
	bool taken = nick_taken(nick, local, json_object_get(set, nick) || json_object_get(json_object_get(o, "writers"), nick));
	pthread_mutex_unlock(&xc->mu);
	if (taken) {
		to_occupant(xc, room, from, NULL, xa_error_reply(st, "cancel", "conflict", NULL));
		return false;
	}
	to_occupant(xc, room, from, NULL, nick_gone(xc->ctx, room, had, nick, from));
	return true;
}

/* A join refused before it is looked at: with the muc x (XEP-0045
 * §7.2.6) and why (why: NULL for none), behind a join's answer that may
 * still be queued.  Until the forty-ninth session the refusal of a join
 * as the component's rooms were full (OCCUPANTS_MAX) had neither, and
 * went ahead of the queue. */
static void join_refused(struct xcomp *xc, xmpp_stanza_t *st, const char *type, const char *cond, const char *why)
{
	xmpp_stanza_t *err = xa_error_reply(st, type, cond, why);
	if (err)
		xa_child(xc->ctx, err, "x", NS_MUC);
	xa_enqueue_stanza(xc, err);
}

/* A refusal before anything is looked at (no room, no user of ours):
 * written at once, under the bound of what is written so (xa_send_now). */
static void muc_refused_now(struct xcomp *xc, xmpp_stanza_t *st, const char *type, const char *cond, const char *why)
{
	xmpp_stanza_t *err = xa_error_reply(st, type, cond, why);
	if (err)
		xa_child(xc->ctx, err, "x", NS_MUC);
	xa_send_now(xc, err);
}

static void join(struct xcomp *xc, xmpp_stanza_t *st, const char *room, const char *public_id, const char *nick,
		 const char *from, const char *user, const char *local)
{
	xmpp_ctx_t *ctx = xc->ctx;
	char have[NICK_MAX + 1];
	if (occupant_get(xc, room, from, have, sizeof(have)) && !xmpp_stanza_get_child_by_name_and_ns(st, "x", NS_MUC)) {
		/* in already: a presence update, or a new nick; a join again
		 * (with the muc x: the client thinks it is out) is answered in
		 * full, below */
		if (strcmp(have, nick) != 0 && !nick_change(xc, st, room, from, local, have, nick))
			return;
		occupant_put(xc, room, from, nick, user, false);
		to_occupant(xc, room, from, NULL, occupant_presence(ctx, room, nick, from, true, false));
		return;
	}
	/* A join again while the client's first is looked at (a client that
	 * sent it twice, or again as it heard nothing yet): the first's answer
	 * answers both.  Until the forty-ninth session each was looked at and
	 * answered in full (the history and the subject twice), and the first,
	 * failing, took the occupant the second had made out of the room, the
	 * second's answer then telling the client it was in. */
	if (occupant_joining(xc, room, from))
		return;
	if (!user_may_join(xc, room, from, user)) {
		/* nothing looked at, nothing made: the user's own bound */
		join_refused(xc, st, "wait", "resource-constraint",
			     "You are in too many group rooms (counting each of your clients in each room): "
			     "leave one first.");
		return;
	}
	if (nick_taken(nick, local, false)) {
		/* refused before the join is looked at, which may make the
		 * group (the members' nicks are checked with its answer) */
		join_refused(xc, st, "cancel", "conflict", NULL);
		return;
	}
	struct mjoin *j = calloc(1, sizeof(*j));
	char *text = NULL;
	size_t len;
	if (!j || xmpp_stanza_to_text(st, &text, &len) != XMPP_EOK || !text) {
		free(j);
		join_refused(xc, st, "wait", "resource-constraint", NULL);
		return;
	}
	j->text = strdup(text);
	xmpp_free(ctx, text);
	j->xc = xc;
	snprintf(j->public_id, sizeof(j->public_id), "%s", public_id);
	snprintf(j->room, sizeof(j->room), "%s", room);
	snprintf(j->full, sizeof(j->full), "%s", from);
	snprintf(j->user, sizeof(j->user), "%s", user);
	snprintf(j->nick, sizeof(j->nick), "%s", nick);
	snprintf(j->uri, sizeof(j->uri), "mimi://%s/u/%s", xc->x->cfg->domain ? xc->x->cfg->domain : "", local);
	snprintf(j->local, sizeof(j->local), "%s", local);
	xa_room_native(user, room, j->native, sizeof(j->native));
	xa_muc_history_wanted(st, time(NULL), &j->max, j->since, sizeof(j->since));
	j->members = json_array();
	j->locals = json_array();
	j->history = json_array();
	/* An occupant from now on, joining: what is delivered to it while the
	 * join is looked at is kept, and follows the join's answer
	 * (xa_muc_route, joined). */
	bool made = j->text && j->members && j->locals && j->history, full = false;
	if (made && !(made = occupant_put(xc, room, from, nick, user, true)))
		full = true; /* OCCUPANTS_MAX (or no memory) */
	if (!made || store_write(xc->x->app->store, join_fn, join_done, j) != CW_OK) {
		occupant_del(xc, room, from);
		mjoin_free(j);
		join_refused(xc, st, "wait", "resource-constraint",
			     full ? "This service's group rooms are full: try again later." : NULL);
	}
}

void xa_muc_presence(struct xcomp *xc, xmpp_stanza_t *st)
{
	const char *type = xmpp_stanza_get_type(st), *from = xmpp_stanza_get_from(st), *to = xmpp_stanza_get_to(st);
	char user[1100], local[MIMI_LOCAL_MAX + 1], public_id[EVENT_OPAQUE_ID_MAX + 1], room[XJ_JID_MAX + 1];
	char nick[XJ_PART_MAX + 1]; /* any resourcepart: one over NICK_MAX is refused below */
	if (type && strcmp(type, "error") == 0)
		return;
	if (!xa_muc_room(xc, to, public_id, sizeof(public_id), room, sizeof(room), nick, sizeof(nick))) {
		/* A name no group can have: no such room (XEP-0045 §7.2,
		 * RFC 6120 §8.3.3.7), the muc x echoed as on every refused
		 * join.  Until the fifty-second session the x was missing. */
		if (!type)
			muc_refused_now(xc, st, "cancel", "item-not-found", NULL);
		return;
	}
	if (!xa_local_user(xc->x, from, user, sizeof(user), local, sizeof(local))) {
		if (!type)
			muc_refused_now(xc, st, "cancel", "item-not-found", NULL);
		return;
	}
	if (type && strcmp(type, "unavailable") == 0) {
		char had[NICK_MAX + 1];
		if (occupant_get(xc, room, from, had, sizeof(had))) {
			occupant_del(xc, room, from);
			/* behind a join's answer that may still be queued */
			xa_enqueue_stanza(xc, occupant_presence(xc->ctx, room, had, from, true, true));
		}
		return;
	}
	if (type)
		return; /* the subscription decisions of a room: not answered (a subscribe or probe: xa_presence) */
	if (!nick[0]) { /* XEP-0045 §7.2.1: a join names a nick */
		join_refused(xc, st, "modify", "jid-malformed", NULL);
		return;
	}
	if (strlen(nick) > NICK_MAX) {
		/* A nick the room keeps no longer than NICK_MAX bytes: a JID
		 * (RFC 7622 allows 1023), so not jid-malformed, but one the
		 * room does not accept (RFC 6120 §8.3.3.12), which the user
		 * can change (modify).  A join's refusal echoes the muc x
		 * (XEP-0045 §7.2), a nick change's does not (§7.6).  Until the
		 * fifty-second session either was item-not-found, as if the
		 * room were not there. */
		char have[NICK_MAX + 1];
		bool change = occupant_get(xc, room, from, have, sizeof(have)) &&
			      !xmpp_stanza_get_child_by_name_and_ns(st, "x", NS_MUC);
		const char *why = "Your nickname is over 255 bytes long: choose a shorter one.";
		if (change)
			xa_enqueue_stanza(xc, xa_error_reply(st, "modify", "not-acceptable", why));
		else
			join_refused(xc, st, "modify", "not-acceptable", why);
		return;
	}
	join(xc, st, room, public_id, nick, from, user, local);
}

/* ------------------------------------------------------------ leaving */

/* A client leaves a room whenever it goes offline, so leaving the room is
 * not leaving the group.  A user leaves the group by giving up their
 * membership: setting their own affiliation to none (the member list
 * change of XEP-0045 §9.5, which only an admin may make for others), or
 * with the room's ad-hoc command "leave" (XEP-0050), which clients offer
 * in the room's menu. */
#define LEAVE_NODE "leave"

/* disco of the room's nodes: false for a node it has not (info). */
static bool leave_disco(struct xcomp *xc, xmpp_stanza_t *q, const char *room, const char *node, bool info)
{
	xmpp_ctx_t *ctx = xc->ctx;
	if (!q)
		return true;
	if (info && strcmp(node, NS_COMMANDS) == 0) {
		xa_disco_identity(ctx, q, "automation", "command-list", "Commands");
	} else if (!info && strcmp(node, NS_COMMANDS) == 0) {
		xmpp_stanza_t *it = xa_child(ctx, q, "item", NULL);
		if (it) {
			xmpp_stanza_set_attribute(it, "jid", room);
			xmpp_stanza_set_attribute(it, "node", LEAVE_NODE);
			xmpp_stanza_set_attribute(it, "name", "Leave this group");
		}
	} else if (info && strcmp(node, LEAVE_NODE) == 0) {
		static const char *const features[] = { NS_COMMANDS, NS_DATA, NULL };
		xa_disco_identity(ctx, q, "automation", "command-node", "Leave this group");
		xa_disco_features(ctx, q, features);
	} else if (info) {
		return false;
	}
	return true;
}

/* The command's first stage: what leaving means, to confirm. */
static void leave_form(struct xcomp *xc, xmpp_stanza_t *iq)
{
	xmpp_ctx_t *ctx = xc->ctx;
	xmpp_stanza_t *x;
	xmpp_stanza_t *r = xa_command_stage(xc, iq, LEAVE_NODE, &x);
	if (x) {
		xa_text_child(ctx, x, "title", NULL, "Leave this group");
		xmpp_stanza_t *f = xa_child(ctx, x, "field", NULL);
		if (f) {
			xmpp_stanza_set_attribute(f, "type", "fixed");
			xa_text_child(ctx, f, "value", NULL,
				      "You will no longer be a member: its messages stop, the other members see you "
				      "go, and only a member can add you again. If you were only invited (never "
				      "joined), this declines the invitation, and nobody is told.");
		}
	}
	xa_send_now(xc, r);
}

/* A local user a peer put into a group is invited until she joins
 * (docs/policy.md, "Local users a peer puts into a group"; schema/037),
 * and so, since the forty-third session, is one a member invited
 * (invite_fn).  Her leave (the command, her affiliation to none) or her
 * decline of the room's invitation (XEP-0045 §7.8.2) while invited
 * declines the group: kept (left; a peer's invitation keeps peer_invited,
 * so the peers go on listing her invited; a member's is listed left, as a
 * Matrix user's decline of a member's invitation) and told to nobody, as the Matrix portal's invitation refused
 * (mx_bot.c left; the decline itself is no event, mx_map.c).  Until the
 * thirty-second session her leave was refused (the pipeline takes a
 * membership event from joined members only: service-unavailable) and
 * she had no way to say no.  A member's leave goes on to the pipeline
 * (xa_in_leave): her membership event to the group. */
struct mdecline {
	struct xcomp *xc;
	char *text;                       /* the request, serialised */
	enum xa_leave how;                /* XA_LEAVE_NONE: a decline message */
	char room[XJ_JID_MAX + 1];        /* the room's bare JID */
	char user[1100];                  /* the user's bare JID */
	char local[MIMI_LOCAL_MAX + 1];
	char uri[MIMI_URI_MAX + 1];
	char native[600];                 /* her binding's pair key */
	bool declined;                    /* the job's */
};

/* Under the room's lock of every write of events (taken first, in a
 * statement of its own, as a join's mark does): a group write holding it
 * that read her invited commits first; one waiting for it reads her gone.
 * Only the room she has the invitation of here (her binding to the room
 * JID, made when it was sent), only while she is invited there. */
static cw_err decline_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	struct mdecline *d = arg;
	d->declined = false;
	const char *params[] = { d->native, d->uri };
#define DECLINE_ROWS \
	"room_bindings b, identities i WHERE b.network = 'xmpp' AND b.native_id = $1 " \
	"AND b.remote_identity_id IS NULL AND i.id = b.local_identity_id AND i.uri = $2 AND i.is_local " \
	"AND x.room_id = b.room_id AND x.identity_id = i.id AND x.membership = 'invited'"
	PGresult *r = PQexecParams(c, "SELECT count(" ROOM_LOCK_SQL("x.room_id") ") FROM room_members x, " DECLINE_ROWS,
				   2, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	bool invited = strcmp(PQgetvalue(r, 0, 0), "0") != 0;
	PQclear(r);
	if (!invited)
		return CW_OK;
	r = PQexecParams(c, "UPDATE room_members x SET membership = 'left', updated_at = now() FROM " DECLINE_ROWS
			    " RETURNING 1", 2, NULL, params, NULL, NULL, 0);
#undef DECLINE_ROWS
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	d->declined = PQntuples(r) > 0;
	PQclear(r);
	return CW_OK;
}

static void decline_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct mdecline *d = arg;
	struct xcomp *xc = d->xc;
	xmpp_ctx_t *ctx = xa_thread_ctx(xc->x);
	xmpp_stanza_t *st = ctx ? xmpp_stanza_new_from_string(ctx, d->text) : NULL;
	if (rc) {
		LOG_KV(CW_LOG_WARN, "xmpp: a decline could not be stored", "component", xc->domain, "detail",
		       e ? e->msg : "");
		if (st)
			xa_enqueue_stanza(xc, xa_error_reply(st, "wait", "internal-server-error", NULL));
	} else if (d->declined) {
		LOG_KV_LIMITED(CW_LOG_INFO, "an invited user declined the group", "component", xc->domain,
			       "room", d->room);
		if (d->how != XA_LEAVE_NONE)
			xa_muc_left(xc, d->text, d->how, true);
		/* a decline message is not answered, nor passed to the
		 * inviter (XEP-0045 §7.8.2 leaves that to the room): a peer's
		 * user has no event for it, who invited her is not stored,
		 * and the decline's `to` is the client's word (docs/xmpp.md,
		 * "Declining a group") */
	} else if (d->how != XA_LEAVE_NONE) {
		if (st)
			xa_in_leave(xc, st, d->how, d->room, d->user, d->local); /* a member's leave */
	} else if (st) {
		atomic_fetch_add(&xc->errors_out, 1);
		xa_enqueue_stanza(xc, xa_error_reply(st, "cancel", "item-not-found",
						     "No invitation to this group waits for you."));
	}
	if (st)
		xmpp_stanza_release(st);
	free(d->text);
	free(d);
}

/* On the stream's thread: st (a leave request, or a decline message) of
 * user (bare JID; local: its local part) about room (bare JID). */
static void decline_start(struct xcomp *xc, xmpp_stanza_t *st, enum xa_leave how, const char *room,
			  const char *user, const char *local)
{
	struct mdecline *d = calloc(1, sizeof(*d));
	char *text = NULL;
	size_t len = 0;
	if (d && xmpp_stanza_to_text(st, &text, &len) == XMPP_EOK && text) {
		d->text = strdup(text);
		xmpp_free(xc->ctx, text);
	}
	if (d && d->text) {
		d->xc = xc;
		d->how = how;
		snprintf(d->room, sizeof(d->room), "%s", room);
		snprintf(d->user, sizeof(d->user), "%s", user);
		snprintf(d->local, sizeof(d->local), "%s", local);
		snprintf(d->uri, sizeof(d->uri), "mimi://%s/u/%s", xc->x->cfg->domain ? xc->x->cfg->domain : "", local);
		xa_room_native(user, room, d->native, sizeof(d->native));
		if (store_write(xc->x->app->store, decline_fn, decline_done, d) == CW_OK)
			return;
	}
	if (d)
		free(d->text);
	free(d);
	xa_send_now(xc, xa_error_reply(st, "wait", "resource-constraint", NULL));
}

bool xa_muc_declines(struct xcomp *xc, xmpp_stanza_t *st)
{
	xmpp_stanza_t *x = xmpp_stanza_get_child_by_name_and_ns(st, "x", NS_MUC_USER);
	const char *to = xmpp_stanza_get_to(st), *from = xmpp_stanza_get_from(st);
	if (!x || !xmpp_stanza_get_child_by_name(x, "decline"))
		return false;
	char public_id[EVENT_OPAQUE_ID_MAX + 1], room[XJ_JID_MAX + 1], nick[NICK_MAX + 1];
	char user[1100], local[MIMI_LOCAL_MAX + 1];
	if (!xa_muc_room(xc, to, public_id, sizeof(public_id), room, sizeof(room), nick, sizeof(nick)) || nick[0] ||
	    !xa_local_user(xc->x, from, user, sizeof(user), local, sizeof(local))) {
		/* a decline goes to the room (XEP-0045 §7.8.2) */
		atomic_fetch_add(&xc->errors_out, 1);
		xa_send_now(xc, xa_error_reply(st, "modify", "bad-request", NULL));
		return true;
	}
	decline_start(xc, st, XA_LEAVE_NONE, room, user, local);
	return true;
}

static void leave_request(struct xcomp *xc, xmpp_stanza_t *iq, const char *room, bool command)
{
	char user[1100], local[MIMI_LOCAL_MAX + 1];
	const char *from = xmpp_stanza_get_from(iq);
	if (!xa_local_user(xc->x, from, user, sizeof(user), local, sizeof(local))) {
		xa_send_now(xc, xa_error_reply(iq, "auth", "forbidden", NULL));
		return;
	}
	if (command) {
		xmpp_stanza_t *cmd = xmpp_stanza_get_child_by_name_and_ns(iq, "command", NS_COMMANDS);
		const char *node = cmd ? xmpp_stanza_get_attribute(cmd, "node") : NULL;
		const char *action = cmd ? xmpp_stanza_get_attribute(cmd, "action") : NULL;
		xmpp_stanza_t *x = cmd ? xmpp_stanza_get_child_by_name_and_ns(cmd, "x", NS_DATA) : NULL;
		const char *xt = x ? xmpp_stanza_get_type(x) : NULL;
		if (!node || strcmp(node, LEAVE_NODE) != 0) {
			xa_send_now(xc, xa_error_reply(iq, "cancel", "item-not-found", NULL));
			return;
		}
		if (xa_command_bad_action(xc, iq, action, true))
			return;
		/* a form sent back as type cancel is cancelled too (XEP-0004
		 * §3.1): until the thirty-sixth session, with action complete
		 * it left the group */
		if ((action && strcmp(action, "cancel") == 0) || (xt && strcmp(xt, "cancel") == 0))
			xa_send_now(xc, xa_command_end(xc->ctx, iq, LEAVE_NODE, "canceled", NULL, NULL));
		else if ((xt && strcmp(xt, "submit") == 0) || (action && strcmp(action, "complete") == 0))
			decline_start(xc, iq, XA_LEAVE_COMMAND, room, user, local);
		else
			leave_form(xc, iq);
		return;
	}
	/* muc#admin: one item, the user's own affiliation to none (by JID or
	 * by their nick in the room); any other change is an admin's.  One
	 * item: the query's one element (the whitespace a client lays its
	 * XML out with is none: until the forty-ninth session a line break
	 * after the item was a second one, bad-request). */
	xmpp_stanza_t *q = xmpp_stanza_get_child_by_name_and_ns(iq, "query", NS_MUC_ADMIN), *item = NULL;
	int tags = 0;
	for (xmpp_stanza_t *c = q ? xmpp_stanza_get_children(q) : NULL; c; c = xmpp_stanza_get_next(c))
		if (xmpp_stanza_is_tag(c) && !tags++)
			item = c;
	const char *iname = item ? xmpp_stanza_get_name(item) : NULL;
	if (tags != 1 || !iname || strcmp(iname, "item") != 0) {
		xa_send_now(xc, xa_error_reply(iq, "modify", "bad-request", NULL));
		return;
	}
	const char *aff = xmpp_stanza_get_attribute(item, "affiliation");
	const char *jid = xmpp_stanza_get_attribute(item, "jid"), *nick = xmpp_stanza_get_attribute(item, "nick");
	char their[1100], tl[MIMI_LOCAL_MAX + 1], have[NICK_MAX + 1];
	bool self = false;
	if (jid)
		self = xa_local_user(xc->x, jid, their, sizeof(their), tl, sizeof(tl)) && strcmp(their, user) == 0;
	else if (nick)
		self = occupant_get(xc, room, from, have, sizeof(have)) && strcmp(have, nick) == 0;
	if (!aff || strcmp(aff, "none") != 0 || !self) {
		xa_send_now(xc, xa_error_reply(iq, "auth", "forbidden", NULL));
		return;
	}
	decline_start(xc, iq, XA_LEAVE_ADMIN, room, user, local);
}

void xa_muc_left(struct xcomp *xc, const char *iq_text, enum xa_leave how, bool declined)
{
	xmpp_ctx_t *ctx = xa_thread_ctx(xc->x);
	xmpp_stanza_t *iq = ctx ? xmpp_stanza_new_from_string(ctx, iq_text) : NULL;
	if (!iq)
		return;
	xmpp_stanza_t *r;
	if (how == XA_LEAVE_COMMAND) {
		r = xa_command_end(ctx, iq, LEAVE_NODE, "completed",
				   declined ? "You declined the invitation: nothing more of this group comes to you."
					    : "You left the group.",
				   "info");
	} else if ((r = xa_iq_result(iq))) {
		xmpp_stanza_set_from(r, xmpp_stanza_get_to(iq));
	}
	xa_enqueue_stanza(xc, r);
	xmpp_stanza_release(iq);
}

/* The key of full in room in xc->muc_gone and xc->muc_stored, "<room>
 * <full JID>" (a room's bare JID has no space), into k. */
#define OCCUPANT_KEY_MAX (XJ_JID_MAX * 2 + 2)
static void occupant_key(char *k, const char *room, const char *full)
{
	snprintf(k, OCCUPANT_KEY_MAX, "%s %s", room, full);
}

/* The stream is closing (the daemon stops, or gives the component up):
 * every occupant hears that the service is going (332), so that clients
 * join again when it is back instead of thinking they are in.  Their rows
 * go with the next write (xa_muc_sync), but the connection that writes
 * them may be what was lost: those told are kept (xc->muc_gone) for the
 * load that follows taking the component again (xa_muc_load). */
void xa_muc_shutdown(struct xcomp *xc)
{
	pthread_mutex_lock(&xc->mu);
	json_t *muc = xc->muc;
	xc->muc = NULL;
	json_decref(xc->muc_members);
	xc->muc_members = NULL;
	xc->muc_dirty = xc->muc_dirty || muc != NULL;
	if (muc && !xc->muc_gone)
		xc->muc_gone = json_object();
	const char *room, *full;
	json_t *occ, *o;
	json_object_foreach(muc, room, occ)
		json_object_foreach(occ, full, o) {
			char key[OCCUPANT_KEY_MAX];
			occupant_key(key, room, full);
			json_object_set_new(xc->muc_gone, key, json_true());
		}
	pthread_mutex_unlock(&xc->mu);
	json_object_foreach(muc, room, occ)
		json_object_foreach(occ, full, o)
			xa_send_now(xc, occupant_gone(xc->ctx, room, json_string_value(json_object_get(o, "nick")), full,
						      true, "332"));
	json_decref(muc);
}

/* The occupants written to xmpp_muc_occupants, on the stream's thread
 * within a second of a change: what changed since this process last wrote
 * them (xc->muc_stored), all of them the first time after taking the
 * component (xa_muc_load).  Until the forty-ninth session every change
 * deleted and wrote again every row: at 10,000 occupants 50-110 ms of
 * the stream's thread (no stanza read meanwhile) and 3.6 MB of WAL, each
 * second while people came and went. */
void xa_muc_sync(struct xcomp *xc, PGconn *c)
{
	pthread_mutex_lock(&xc->mu);
	if (!xc->muc_dirty) {
		pthread_mutex_unlock(&xc->mu);
		return;
	}
	json_t *now = json_object(), *put = json_array(), *del = json_array();
	const char *room, *full, *key;
	json_t *occ, *o;
	bool whole = !xc->muc_stored, ok = now && put && del;
	json_object_foreach(xc->muc, room, occ)
		json_object_foreach(occ, full, o) {
			char k[OCCUPANT_KEY_MAX];
			occupant_key(k, room, full);
			json_t *row = json_pack("[s, s, O, O]", room, full, json_object_get(o, "nick"),
						json_object_get(o, "user"));
			ok = ok && row && json_object_set(now, k, row) == 0;
			if (ok && (whole || !json_equal(row, json_object_get(xc->muc_stored, k))))
				ok = json_array_append(put, row) == 0;
			json_decref(row);
		}
	json_object_foreach(whole ? NULL : xc->muc_stored, key, o)
		if (ok && !json_object_get(now, key))
			ok = json_array_append(del, o) == 0;
	xc->muc_dirty = false;
	pthread_mutex_unlock(&xc->mu);
	char *pdoc = ok ? json_dumps(put, JSON_COMPACT) : NULL, *ddoc = ok ? json_dumps(del, JSON_COMPACT) : NULL;
	const char *params[] = { xc->domain, pdoc, ddoc };
	cw_errmsg e;
	cw_err rc = pdoc && ddoc ? store_exec(c, "BEGIN", &e) : cw_fail(&e, CW_ENOMEM, "out of memory");
	if (!rc && whole)
		rc = store_command(c, "DELETE FROM xmpp_muc_occupants WHERE component = $1", 1, params, &e);
	if (!rc && json_array_size(del))
		rc = store_command(c,
				   "DELETE FROM xmpp_muc_occupants WHERE component = $1 AND (room, full_jid) IN "
				   "(SELECT x->>0, x->>1 FROM jsonb_array_elements($2::jsonb) AS x)",
				   2, (const char *[]){ xc->domain, ddoc }, &e);
	if (!rc && json_array_size(put))
		rc = store_command(c,
				   "INSERT INTO xmpp_muc_occupants (component, room, full_jid, nick, user_jid) "
				   "SELECT $1, x->>0, x->>1, x->>2, x->>3 FROM jsonb_array_elements($2::jsonb) AS x "
				   "ON CONFLICT (component, room, full_jid) DO UPDATE SET nick = EXCLUDED.nick, "
				   "user_jid = EXCLUDED.user_jid",
				   2, params, &e);
	if (pdoc && ddoc)
		rc = store_end(c, rc, &e);
	free(pdoc);
	free(ddoc);
	json_decref(put);
	json_decref(del);
	pthread_mutex_lock(&xc->mu);
	if (rc) {
		xc->muc_dirty = true; /* the next round tries again */
	} else {
		json_decref(xc->muc_stored);
		xc->muc_stored = now;
		now = NULL;
	}
	pthread_mutex_unlock(&xc->mu);
	json_decref(now);
	if (rc)
		LOG_KV(CW_LOG_WARN, "xmpp: cannot write the rooms' occupants", "component", xc->domain, "detail", e.msg);
}

/* The rooms' occupants, as stored, when this process knows none: those
 * of a process that had the component and stopped without telling them
 * (a crash), or of this one's last stream.  Those this process told that
 * they were out (xa_muc_shutdown: the connection that would have written
 * that was lost) stay out; until the forty-ninth session they were
 * loaded back, clients told they were out sent the rooms' messages until
 * they joined again or one bounced. */
void xa_muc_load(struct xcomp *xc, PGconn *c)
{
	pthread_mutex_lock(&xc->mu);
	bool empty = occupants_count(xc->muc) == 0;
	json_t *gone = xc->muc_gone;
	xc->muc_gone = NULL;
	/* another process may have had the component: written whole next */
	json_decref(xc->muc_stored);
	xc->muc_stored = NULL;
	pthread_mutex_unlock(&xc->mu);
	if (!empty) {
		json_decref(gone);
		return; /* this process had the stream: what it knows is newer */
	}
	const char *params[] = { xc->domain };
	PGresult *r = PQexecParams(c, "SELECT room, full_jid, nick, user_jid FROM xmpp_muc_occupants WHERE component = $1 "
				      "ORDER BY room, full_jid LIMIT 10000", 1, NULL, params, NULL, NULL, 0);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) {
		LOG_KV(CW_LOG_WARN, "xmpp: cannot read the rooms' occupants", "component", xc->domain, "detail", e.msg);
		json_decref(gone);
		return;
	}
	int n = 0;
	for (int i = 0; i < PQntuples(r); i++) {
		char key[OCCUPANT_KEY_MAX];
		occupant_key(key, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1));
		if (!json_object_get(gone, key)) /* else left out: written without it (muc_dirty) */
			n += occupant_put(xc, PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 2),
					  PQgetvalue(r, i, 3), false);
	}
	PQclear(r);
	json_decref(gone);
	if (n) {
		char count[16];
		snprintf(count, sizeof(count), "%d", n);
		LOG_KV(CW_LOG_INFO, "xmpp: the rooms' occupants taken over", "component", xc->domain, "occupants", count);
	}
}

/* An error from an occupant's client to what the room sent it: the
 * resource is gone (XEP-0045 §18.1's "ghost" occupants), so it is no
 * longer in the room. */
void xa_muc_bounced(struct xcomp *xc, xmpp_stanza_t *st)
{
	const char *from = xmpp_stanza_get_from(st), *to = xmpp_stanza_get_to(st);
	char public_id[EVENT_OPAQUE_ID_MAX + 1], room[XJ_JID_MAX + 1], nick[NICK_MAX + 1];
	if (!from || !xa_muc_room(xc, to, public_id, sizeof(public_id), room, sizeof(room), nick, sizeof(nick)))
		return;
	/* the conditions that say the resource is not there (as Prosody's
	 * rooms count them); others say nothing of it */
	static const char *const gone[] = { "gone", "item-not-found", "jid-malformed", "recipient-unavailable",
					    "redirect", "remote-server-not-found", "remote-server-timeout",
					    "service-unavailable", NULL };
	xmpp_stanza_t *err = xmpp_stanza_get_child_by_name(st, "error");
	bool is_gone = false;
	for (xmpp_stanza_t *c = err ? xmpp_stanza_get_children(err) : NULL; c && !is_gone; c = xmpp_stanza_get_next(c)) {
		const char *name = xmpp_stanza_is_tag(c) ? xmpp_stanza_get_name(c) : NULL;
		const char *ns = name ? xmpp_stanza_get_ns(c) : NULL;
		for (const char *const *g = gone; name && ns && strcmp(ns, NS_STANZAS) == 0 && *g && !is_gone; g++)
			is_gone = strcmp(name, *g) == 0;
	}
	if (is_gone && occupant_get(xc, room, from, NULL, 0)) {
		occupant_del(xc, room, from);
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp: an occupant's client is gone", "room", room, "to", from);
	}
}

/* ------------------------------------------------------------ iq */

/* A field of a data form x (XEP-0004): its var, type and one value. */
static void form_field(xmpp_ctx_t *ctx, xmpp_stanza_t *x, const char *var, const char *type, const char *value)
{
	xmpp_stanza_t *f = xa_child(ctx, x, "field", NULL);
	if (!f)
		return;
	xmpp_stanza_set_attribute(f, "var", var);
	xmpp_stanza_set_attribute(f, "type", type);
	xa_text_child(ctx, f, "value", NULL, value);
}

bool xa_muc_iq(struct xcomp *xc, xmpp_stanza_t *st, const char *ns, bool get)
{
	const char *to = xmpp_stanza_get_to(st), *from = xmpp_stanza_get_from(st);
	char public_id[EVENT_OPAQUE_ID_MAX + 1], room[XJ_JID_MAX + 1], nick[NICK_MAX + 1];
	if (!xa_muc_room(xc, to, public_id, sizeof(public_id), room, sizeof(room), nick, sizeof(nick)))
		return false;
	xmpp_ctx_t *ctx = xc->ctx;
	if (ns && get && strcmp(ns, NS_PING) == 0 && nick[0]) {
		/* XEP-0410: a client asks whether it is still in: only its own
		 * nick, from its own resource, is. */
		char have[NICK_MAX + 1];
		bool in = occupant_get(xc, room, from, have, sizeof(have));
		if (in && strcmp(have, nick) == 0) {
			xmpp_stanza_t *r = xa_iq_result(st);
			if (r)
				xmpp_stanza_set_from(r, to);
			xa_send_now(xc, r);
		} else {
			/* Not in, or in under another nick: not-acceptable, which
			 * XEP-0410 §3.1 reads as "not joined", so that a client
			 * that missed its own nick change joins again (before, an
			 * occupant pinging another nick got service-unavailable,
			 * which reads as "joined"). */
			xa_send_now(xc, xa_error_reply(st, "cancel", "not-acceptable", NULL));
		}
		return true;
	}
	if (nick[0])
		return false; /* an occupant's: nothing else is served */
	if (ns && !get && (strcmp(ns, NS_MUC_ADMIN) == 0 || strcmp(ns, NS_COMMANDS) == 0)) {
		leave_request(xc, st, room, strcmp(ns, NS_COMMANDS) == 0);
		return true;
	}
	if (ns && get && strcmp(ns, NS_MUC_ADMIN) == 0) {
		/* An affiliation list is an admin's (XEP-0045 §9.5.1, §9.8):
		 * nobody here is one; every member is an occupant (their
		 * presences are the list). */
		xa_send_now(xc, xa_error_reply(st, "auth", "forbidden", NULL));
		return true;
	}
	if (ns && strcmp(ns, NS_MUC_OWNER) == 0) {
		/* Destroying the room (XEP-0045 §10.9) is not an owner's here:
		 * a group ends on its network; a user leaves it (the room's
		 * leave command).  Answered so, not acknowledged. */
		xmpp_stanza_t *qy = xmpp_stanza_get_child_by_ns(st, NS_MUC_OWNER);
		if (!get && qy && xmpp_stanza_get_child_by_name(qy, "destroy")) {
			xa_send_now(xc, xa_error_reply(st, "auth", "forbidden",
						       "a group ends on its network; to leave it, use the room's leave "
						       "command"));
			return true;
		}
		/* The configuration is an owner's (XEP-0045 §10.2: anyone
		 * else's request is forbidden). Nobody is one here, but the
		 * creator's client asks for it right after the join (§10.1.2),
		 * so an occupant is answered; anyone else is forbidden, in a
		 * room that does not exist too (as a join does not say which
		 * groups exist). Until the twenty-third session anyone got a
		 * result. */
		if (!occupant_get(xc, room, from, NULL, 0)) {
			xa_send_now(xc, xa_error_reply(st, "auth", "forbidden", NULL));
			return true;
		}
		/* A new room's configuration (XEP-0045 §10.1.2): there is
		 * nothing to configure; an instant room is accepted as it is. */
		xmpp_stanza_t *r = xa_iq_result(st);
		if (r)
			xmpp_stanza_set_from(r, to);
		xmpp_stanza_t *q = r && get ? xa_child(ctx, r, "query", NS_MUC_OWNER) : NULL;
		xmpp_stanza_t *x = q ? xa_child(ctx, q, "x", "jabber:x:data") : NULL;
		if (x) {
			xmpp_stanza_set_attribute(x, "type", "form");
			form_field(ctx, x, "FORM_TYPE", "hidden", "http://jabber.org/protocol/muc#roomconfig");
		}
		xa_send_now(xc, r);
		return true;
	}
	if (ns && get && strcmp(ns, NS_PING) == 0) {
		xmpp_stanza_t *r = xa_iq_result(st);
		if (r)
			xmpp_stanza_set_from(r, to);
		xa_send_now(xc, r);
		return true;
	}
	if (ns && get && (strcmp(ns, NS_DISCO_INFO) == 0 || strcmp(ns, NS_DISCO_ITEMS) == 0)) {
		xmpp_stanza_t *r = xa_iq_result(st);
		if (!r)
			return true;
		xmpp_stanza_set_from(r, to);
		bool info = strcmp(ns, NS_DISCO_INFO) == 0;
		xmpp_stanza_t *q = xa_child(ctx, r, "query", ns);
		xmpp_stanza_t *asked = xmpp_stanza_get_child_by_name(st, "query");
		const char *node = asked ? xmpp_stanza_get_attribute(asked, "node") : NULL;
		if (node) { /* the room's command (XEP-0050 §2.2) */
			if (q)
				xmpp_stanza_set_attribute(q, "node", node);
			if (leave_disco(xc, q, room, node, info)) {
				xa_send_now(xc, r);
			} else {
				xmpp_stanza_release(r);
				xa_send_now(xc, xa_error_reply(st, "cancel", "item-not-found", NULL));
			}
			return true;
		}
		static const char *const features[] = {
			NS_MUC, "muc_membersonly", "muc_persistent", "muc_hidden", "muc_semianonymous",
			"muc_unmoderated", "muc_unsecured", NS_SID, NS_PING, NS_COMMANDS, NULL,
		};
		if (info) {
			char name[120];
			snprintf(name, sizeof(name), "A group on %.60s", xc->peer);
			xa_disco_identity(ctx, q, "conference", "text", name);
			xa_disco_features(ctx, q, features);
			/* Extended information (XEP-0128, the muc#roominfo form): in
			 * a members-only room clients offer "invite" to a member
			 * (not a moderator) only when the room says it allows
			 * invitations, as Prosody's rooms say with this field; any
			 * member may invite here (invite_fn). */
			xmpp_stanza_t *x = q ? xa_child(ctx, q, "x", NS_DATA) : NULL;
			if (x) {
				xmpp_stanza_set_attribute(x, "type", "result");
				form_field(ctx, x, "FORM_TYPE", "hidden", "http://jabber.org/protocol/muc#roominfo");
				form_field(ctx, x, "muc#roomconfig_allowinvites", "boolean", "1");
			}
		}
		xa_send_now(xc, r);
		return true;
	}
	return false;
}

/* ------------------------------------------------------------ messages */

/* The room's mediated invitation (XEP-0045 §7.8.2) of user, naming the
 * inviter: to a member (the group's first message for her), or to one a
 * member invited (invite_done), who is not one until she joins. */
static bool invite_stanza(struct xcomp *xc, xmpp_ctx_t *ctx, const char *room, const char *user, const char *inviter,
			  bool member, char **text, size_t *len)
{
	xmpp_stanza_t *m = xmpp_message_new(ctx, NULL, user, NULL);
	if (!m)
		return false;
	xmpp_stanza_set_from(m, room);
	xmpp_stanza_t *x = xa_child(ctx, m, "x", NS_MUC_USER);
	xmpp_stanza_t *inv = x ? xa_child(ctx, x, "invite", NULL) : NULL;
	char reason[300];
	if (member)
		snprintf(reason, sizeof(reason), "A group on %.60s that you are a member of (bridged by Causeway: "
						  "encryption ends at the gateway)", xc->peer);
	else
		snprintf(reason, sizeof(reason), "A group bridged with %.60s (by Causeway: encryption ends at the "
						  "gateway): join the room to take part, or decline", xc->peer);
	if (inv) {
		xmpp_stanza_set_attribute(inv, "from", inviter);
		xa_text_child(ctx, inv, "reason", NULL, reason);
	}
	char *buf = NULL;
	bool ok = xmpp_stanza_to_text(m, &buf, len) == XMPP_EOK && buf;
	*text = ok ? strdup(buf) : NULL;
	if (buf)
		xmpp_free(ctx, buf);
	xmpp_stanza_release(m);
	return *text != NULL;
}

bool xa_muc_invite(struct xcomp *xc, xmpp_ctx_t *ctx, const char *room, const char *user, const char *inviter,
		   char **text, size_t *len)
{
	return invite_stanza(xc, ctx, room, user, inviter, true, text, len);
}

/* Whether c is a <stanza-id/> (XEP-0359) that names room as its giver. */
static bool room_stanza_id(xmpp_stanza_t *c, const char *room)
{
	const char *name = xmpp_stanza_get_name(c), *ns = xmpp_stanza_get_ns(c);
	const char *by = xmpp_stanza_get_attribute(c, "by");
	return xmpp_stanza_is_tag(c) && name && strcmp(name, "stanza-id") == 0 && ns && strcmp(ns, NS_SID) == 0 && by &&
	       strcmp(by, room) == 0;
}

/* The user's stanza m (released) without the <stanza-id by=room/> she
 * wrote into it herself: only the room gives its ids, and XEP-0359 §4 has
 * the giver override such an id and write at most one.  Until the
 * forty-third session hers went back to her clients before the room's,
 * and a client that reads the first took the id of another member's
 * message for her own.  NULL without memory. */
static xmpp_stanza_t *without_room_ids(xmpp_ctx_t *ctx, xmpp_stanza_t *m, const char *room)
{
	bool any = false;
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(m); c && !any; c = xmpp_stanza_get_next(c))
		any = room_stanza_id(c, room);
	if (!any)
		return m;
	xmpp_stanza_t *n = xmpp_stanza_new(ctx);
	int k = xmpp_stanza_get_attribute_count(m);
	const char **attrs = k > 0 ? calloc((size_t)k * 2, sizeof(*attrs)) : NULL;
	bool ok = n && xmpp_stanza_set_name(n, xmpp_stanza_get_name(m)) == XMPP_EOK && (k <= 0 || attrs);
	if (ok && k > 0) {
		int got = xmpp_stanza_get_attributes(m, attrs, k * 2);
		for (int i = 0; ok && i + 1 < got; i += 2)
			ok = xmpp_stanza_set_attribute(n, attrs[i], attrs[i + 1]) == XMPP_EOK;
	}
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(m); ok && c; c = xmpp_stanza_get_next(c)) {
		if (room_stanza_id(c, room))
			continue;
		xmpp_stanza_t *copy = xmpp_stanza_copy(c);
		ok = copy && xmpp_stanza_add_child(n, copy) == XMPP_EOK;
		if (copy)
			xmpp_stanza_release(copy);
	}
	free(attrs);
	xmpp_stanza_release(m);
	if (!ok && n) {
		xmpp_stanza_release(n);
		n = NULL;
	}
	return n;
}

bool xa_muc_reflect(struct xcomp *xc, const char *stanza_text, const char *room, const char *user,
		    const char *msg_id)
{
	xmpp_ctx_t *ctx = xa_thread_ctx(xc->x);
	json_t *occ = xa_muc_occupants(xc, room, user);
	size_t i;
	json_t *o;
	json_array_foreach(occ, i, o) {
		xmpp_stanza_t *m = ctx ? xmpp_stanza_new_from_string(ctx, stanza_text) : NULL;
		if (m)
			m = without_room_ids(ctx, m, room);
		if (!m)
			break;
		char from[XJ_JID_MAX + NICK_MAX + 2];
		snprintf(from, sizeof(from), "%s/%s", room, json_string_value(json_array_get(o, 1)));
		xmpp_stanza_set_from(m, from);
		xmpp_stanza_set_to(m, json_string_value(json_array_get(o, 0)));
		xa_muc_stanza_id(ctx, m, msg_id, room);
		to_occupant(xc, room, json_string_value(json_array_get(o, 0)), msg_id, m);
	}
	json_decref(occ);
	return true;
}

/* ------------------------------------------------------------ members */

void xa_muc_members(struct xcomp *xc, PGconn *c)
{
	/* The rooms someone is in, and what their occupants were told. */
	json_t *rooms = json_array(), *told = NULL;
	pthread_mutex_lock(&xc->mu);
	const char *room;
	json_t *v;
	json_object_foreach(xc->muc, room, v) {
		char pid[EVENT_OPAQUE_ID_MAX + 1], bare[XJ_JID_MAX + 1], nick[8];
		if (rooms && xa_muc_room(xc, room, pid, sizeof(pid), bare, sizeof(bare), nick, sizeof(nick)))
			json_array_append_new(rooms, json_pack("[s, s]", pid, room));
	}
	told = xc->muc_members ? json_deep_copy(xc->muc_members) : json_object();
	/* rooms nobody is in any more are forgotten */
	json_t *keep = json_object();
	json_object_foreach(told, room, v)
		if (keep && xc->muc && json_object_get(xc->muc, room))
			json_object_set(keep, room, v);
	json_decref(xc->muc_members);
	xc->muc_members = keep;
	pthread_mutex_unlock(&xc->mu);
	if (!rooms || json_array_size(rooms) == 0 || !told) {
		json_decref(rooms);
		json_decref(told);
		return;
	}
	char *doc = json_dumps(rooms, JSON_COMPACT);
	const char *params[] = { doc ? doc : "[]" };
	PGresult *r = PQexecParams(c,
		"SELECT x->>1, CASE " MUC_NICK("i", "rm.id") ", coalesce(rm.name, ''), "
		"CASE WHEN i.is_local THEN i.localpart END "
		"FROM jsonb_array_elements($1::jsonb) AS x "
		"JOIN rooms rm ON rm.public_id = x->>0 JOIN room_members m ON m.room_id = rm.id AND m.membership = 'joined' "
		"JOIN identities i ON i.id = m.identity_id",
		1, NULL, params, NULL, NULL, 0);
	free(doc);
	json_decref(rooms);
	cw_errmsg e;
	if (store_check(c, r, PGRES_TUPLES_OK, &e)) {
		LOG_KV(CW_LOG_WARN, "xmpp: cannot read the groups' members", "component", xc->domain, "detail", e.msg);
		json_decref(told);
		return;
	}
	json_t *now = json_object();
	for (int i = 0; now && i < PQntuples(r); i++) {
		json_t *set = json_object_get(now, PQgetvalue(r, i, 0));
		if (!set)
			json_object_set_new(now, PQgetvalue(r, i, 0), set = json_object());
		json_object_set_new(set, PQgetvalue(r, i, 1), json_true());
		json_object_set_new(set, "#name", json_string(PQgetvalue(r, i, 2)));
		if (!PQgetisnull(r, i, 3)) {
			char key[MIMI_LOCAL_MAX + 8];
			if (local_key(PQgetvalue(r, i, 3), key, sizeof(key)))
				json_object_set_new(set, key, json_true());
		}
	}
	PQclear(r);
	/* A room not told before (its occupants taken over from the last
	 * holder of the stream): as it is now, nothing to announce, but an
	 * occupant whose user left the group meanwhile is out.  An occupant
	 * whose join is being looked at is the join's to answer (the room
	 * may not even be stored yet: the join makes it); a room with only
	 * such occupants is told by the join (announce_first). */
	json_t *out = json_array();
	bool queued = true;
	char lost[XJ_JID_MAX + 1] = "";
	pthread_mutex_lock(&xc->mu);
	if (!xc->muc_members)
		xc->muc_members = json_object();
	json_object_foreach(xc->muc, room, v) {
		if (!xc->muc_members || json_object_get(xc->muc_members, room))
			continue;
		const char *full;
		json_t *o;
		bool settled = false;
		json_object_foreach(v, full, o)
			settled = settled || !json_is_true(json_object_get(o, "joining"));
		if (!settled)
			continue;
		json_t *set = json_object_get(now, room);
		json_object_set_new(xc->muc_members, room, set ? json_incref(set) : json_object());
		json_object_foreach(v, full, o) {
			if (json_is_true(json_object_get(o, "joining")))
				continue;
			const char *user = json_string_value(json_object_get(o, "user"));
			char local[XJ_JID_MAX + 1];
			snprintf(local, sizeof(local), "%.*s", (int)strcspn(user, "@"), user);
			if (!local_in(set, local)) /* not the nick: a namesake of the peer's may hold it */
				json_array_append_new(out, json_pack("[s, s, O]", room, full, json_object_get(o, "nick")));
			else if (json_object_get(set, json_string_value(json_object_get(o, "nick"))))
				give_way_locked(xc, xc->ctx, room, full, json_string_value(json_object_get(o, "nick")),
						&queued);
			if (!queued && !lost[0]) /* the first room of a lost move, said below */
				snprintf(lost, sizeof(lost), "%s", room);
		}
	}
	pthread_mutex_unlock(&xc->mu);
	if (lost[0])
		move_lost(xc, lost);
	xa_wake(xc); /* what an occupant that gave way was told */
	size_t oi;
	json_t *ov;
	json_array_foreach(out, oi, ov) {
		const char *oroom = json_string_value(json_array_get(ov, 0)), *ofull = json_string_value(json_array_get(ov, 1));
		/* queued (not kept: the occupant goes, and what it kept with it) */
		xa_enqueue_stanza(xc, occupant_gone(xc->ctx, oroom, json_string_value(json_array_get(ov, 2)), ofull,
						    true, "321"));
		occupant_del(xc, oroom, ofull);
	}
	json_decref(out);
	/* Each room told before: who came and who went, to each occupant. */
	json_t *before;
	json_object_foreach(told, room, before) {
		json_t *after = json_object_get(now, room);
		json_t *occ = json_array();
		pthread_mutex_lock(&xc->mu);
		const char *full;
		json_t *o;
		json_object_foreach(xc->muc ? json_object_get(xc->muc, room) : NULL, full, o)
			if (!json_is_true(json_object_get(o, "joining"))) /* the join's answer tells it */
				json_array_append_new(occ, json_pack("[s, O, O]", full, json_object_get(o, "nick"),
								     json_object_get(o, "user")));
		if (xc->muc_members && json_object_get(xc->muc_members, room))
			json_object_set_new(xc->muc_members, room, after ? json_incref(after) : json_object());
		pthread_mutex_unlock(&xc->mu);
		size_t k;
		json_t *oc;
		const char *name0 = json_string_value(json_object_get(before, "#name"));
		const char *name1 = json_string_value(json_object_get(after, "#name"));
		bool renamed = name0 && name1 && strcmp(name0, name1) != 0;
		json_array_foreach(occ, k, oc) {
			const char *to = json_string_value(json_array_get(oc, 0));
			const char *user = json_string_value(json_array_get(oc, 2));
			size_t ul = strcspn(user, "@");
			char local[XJ_JID_MAX + 1];
			snprintf(local, sizeof(local), "%.*s", (int)ul, user);
			/* by her "#l:" key, not by a nick: a peer's namesake takes
			 * her local part as its nick once she is gone */
			bool gone = local_in(before, local) && !local_in(after, local);
			if (gone) { /* the user is no longer a member: out of the room, and told nothing more */
				xa_enqueue_stanza(xc, occupant_gone(xc->ctx, room, json_string_value(json_array_get(oc, 1)),
								    to, true, "321"));
				occupant_del(xc, room, to);
				continue;
			}
			if (renamed) /* the group was renamed: its subject says so */
				subject_now(xc, room, name1, to);
			/* a member come under the occupant's nick (or a remote
			 * member's nick changed to it: a namesake came): it gives
			 * way first */
			const char *onick = json_string_value(json_array_get(oc, 1));
			if (after && json_object_get(after, onick))
				xa_muc_give_way(xc, xc->ctx, room, to, onick);
			/* who went and came (members_diff) */
			json_t *diff = members_diff(before, after, user, ul), *d;
			size_t di;
			json_array_foreach(diff, di, d) {
				const char *who = json_string_value(json_array_get(d, 1));
				to_occupant(xc, room, to, NULL,
					    strcmp(json_string_value(json_array_get(d, 0)), "-") == 0
						    ? occupant_gone(xc->ctx, room, who, to, false, "321")
						    : occupant_presence(xc->ctx, room, who, to, false, false));
			}
			json_decref(diff);
		}
		json_decref(occ);
	}
	json_decref(now);
	json_decref(told);
}

/* ------------------------------------------------------------ invitations */

#define INVITES_MAX 16

/* A member's mediated invitation (XEP-0045 §7.8.2) into a group hosted
 * here, by the same rules as a peer's add (docs/policy.md, "Local users a
 * peer puts into a group"; POST /v1/rooms/{room}/members):
 * - another user of this server is invited, not joined, until she takes
 *   part herself: she gets the room's invitation now, and is joined by her
 *   join of the room (join_fn); nothing of the group reaches her before
 *   (she is no recipient: a peer's RECIPIENT_MEMBER_SQL), and she declines
 *   it as a user a peer invited does (decline_fn: a decline of the
 *   invitation, the leave command, her affiliation to none), told to
 *   nobody.  One who left is invited again (not joined), one invited or
 *   joined already is no change;
 * - a user of the component's peer is joined at once, as the group's host
 *   adds a peer's users and as a Matrix member's invitation of a ghost
 *   joins it (mx_bot.c, grow_group); her peer learns of it from the
 *   group's next event and GET /v1/rooms/{room}, as for those.  One who
 *   left (her own leave, her peer's removal) is not brought back: that is
 *   hers, her own join or her peer's add (POST /v1/rooms/{room}/members);
 * - a banned user is no one's to bring back.
 * An invitation naming one who is not to be brought back is refused
 * whole (not-allowed, saying whom), nothing stored.  Until the
 * forty-third session every invitee was joined, and one who had left was
 * a member again without her say (a review's finding).
 *
 * Each invitation (at most INVITES_MAX invitees) takes a token of the
 * inviter's bucket of what she sends to the component's peer
 * (outbound_messages_per_minute_per_user of the rules matching the peer,
 * which counts an invitation: policy.c, outbound_limits_of), as a peer's
 * add takes one of its own (peer_api.c, change_limit): past it,
 * resource-constraint to the inviter, nothing stored, audited
 * (policy.limit, type member_add) once per episode.  Until the
 * forty-third session nothing bounded them: 50 stanzas made 800 made-up
 * identities and memberships (a review's finding). */
struct minvite {
	struct xcomp *xc;
	char *text;                      /* the message, serialised */
	char public_id[EVENT_OPAQUE_ID_MAX + 1];
	char uri[MIMI_URI_MAX + 1];      /* the inviter's */
	char inviter[1100];              /* the inviter's bare JID */
	char room[XJ_JID_MAX + 1];       /* the room's bare JID */
	json_t *who;                     /* [["r" remote | "l" local, local part, pair key, bare JID ("" remote)]] */
	/* the job's */
	enum { INV_DONE, INV_NOT_MEMBER, INV_REFUSED, INV_LIMITED, INV_FULL } result;
	char refused[MIMI_URI_MAX + 1];  /* INV_REFUSED: whom */
	json_t *invited;                 /* [bare JID] of the local users invited (to send the invitation to) */
	bool decided, first_refusal;     /* the limit's answer, from the job's first run */
	struct policy_decision d;
};

/* The token (once per job: a run again neither charges twice nor loses
 * the audit), with the inviter as the sender and the peer as the
 * recipient; only the limit is taken from the answer. */
static cw_err invite_limit(PGconn *c, struct minvite *v, const char *peer_domain, cw_errmsg *e)
{
	struct cw_app *app = v->xc->x->app;
	char network[XMPP_PEER_MAX + 8], peer_uri[MIMI_DOMAIN_MAX + 16];
	snprintf(network, sizeof(network), "peer:%s", v->xc->peer);
	snprintf(peer_uri, sizeof(peer_uri), "mimi://%s", peer_domain);
	if (!v->decided) {
		struct policy_view *view = policy_live_get(app->policy);
		struct policy_rate_memo memo;
		policy_rate_memo_init(&memo, app->limits);
		struct policy_request preq = {
			.direction = POLICY_OUTBOUND, .action = POLICY_ACT_EVENT, .event_type = "membership",
			.invitation = true, .group = true,
			.sender = { v->uri, v->xc->x->cfg->domain ? v->xc->x->cfg->domain : "", "xmpp" },
			.recipient = { peer_uri, peer_domain, network }, .now_ms = cw_wall_ms(), .rate = &memo.rate,
		};
		policy_decide(view->snap, &preq, &v->d);
		policy_rate_memo_finish(&memo);
		policy_view_put(view);
		v->first_refusal = memo.first_refusal;
		v->decided = true;
		if (v->d.verdict == POLICY_LIMIT)
			policy_count(app, &v->d);
	}
	if (v->d.verdict != POLICY_LIMIT)
		return CW_OK;
	v->result = INV_LIMITED;
	if (!v->first_refusal)
		return CW_OK;
	return peer_audit_write(c, &v->d, v->uri,
				json_pack("{s:s, s:s, s:s, s:s, s:I}", "sender", v->uri, "direction", "outbound", "type",
					  "member_add", "room", v->public_id, "retry_after_ms",
					  (json_int_t)v->d.retry_after_ms), e);
}

/* The invitees as URIs with their rows (want), for the statements below:
 * $1 the room's id, $2 the invitees (v->who), $3 this provider's domain,
 * $4 the peer's domain. */
#define INVITEES_SQL \
	"want AS (SELECT DISTINCT ON (uri) CASE WHEN x->>0 = 'r' THEN 'mimi://' || $4 || '/u/' || (x->>1) " \
	"  ELSE 'mimi://' || $3 || '/u/' || (x->>1) END AS uri, x->>0 AS kind, x->>1 AS local, x->>2 AS native, x->>3 AS bare " \
	"  FROM jsonb_array_elements($2::jsonb) AS x) "

static cw_err invite_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	struct minvite *v = arg;
	v->result = INV_DONE;
	v->refused[0] = '\0';
	json_array_clear(v->invited);
	const char *domain = v->xc->x->cfg->domain ? v->xc->x->cfg->domain : "";
	/* Only into a group hosted here (a peer's group takes members from
	 * the peer), by a member of it; under the room's lock of every write
	 * of events, taken first, as every member change takes it (a group
	 * write holding it commits first; one waiting for it reads the
	 * change).  Until the forty-third session an invitation took none. */
	const char *rp[] = { v->public_id, domain, v->xc->peer, v->uri };
#define HOSTED_GROUP "g.public_id = $1 AND g.kind = 'group' AND g.hub_domain = $2 AND g.created_by_peer_id IS NULL"
	PGresult *r = PQexecParams(c, "SELECT count(" ROOM_LOCK_SQL("g.id") ") FROM rooms g WHERE " HOSTED_GROUP, 2, NULL,
				   rp, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	PQclear(r);
	r = PQexecParams(c,
		"SELECT g.id, p.domain, p.id FROM rooms g, peers p WHERE " HOSTED_GROUP " AND p.name = $3 AND p.enabled "
		"AND EXISTS (SELECT 1 FROM room_members x JOIN identities i ON i.id = x.identity_id "
		"WHERE x.room_id = g.id AND i.uri = $4 AND x.membership = 'joined')", 4, NULL, rp, NULL, NULL, 0);
#undef HOSTED_GROUP
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	if (PQntuples(r) != 1) {
		PQclear(r);
		v->result = INV_NOT_MEMBER;
		return CW_OK;
	}
	char room_id[24], peer_domain[MIMI_DOMAIN_MAX + 1], peer_id[24];
	snprintf(room_id, sizeof(room_id), "%s", PQgetvalue(r, 0, 0));
	snprintf(peer_domain, sizeof(peer_domain), "%s", PQgetvalue(r, 0, 1));
	snprintf(peer_id, sizeof(peer_id), "%s", PQgetvalue(r, 0, 2));
	PQclear(r);
	char *who = json_dumps(v->who, JSON_COMPACT);
	if (!who)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const char *params[] = { room_id, who, domain, peer_domain, peer_id };
	/* One not to be brought back: a remote user who left, anyone banned. */
	r = PQexecParams(c,
		"WITH " INVITEES_SQL
		"SELECT w.uri FROM want w JOIN identities i ON i.uri = w.uri JOIN room_members x "
		"ON x.room_id = $1::bigint AND x.identity_id = i.id WHERE x.membership = 'banned' "
		"OR (x.membership = 'left' AND w.kind = 'r') ORDER BY 1 LIMIT 1", 4, NULL, params, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e))) {
		free(who);
		return rc;
	}
	if (PQntuples(r) == 1) {
		snprintf(v->refused, sizeof(v->refused), "%s", PQgetvalue(r, 0, 0));
		PQclear(r);
		free(who);
		v->result = INV_REFUSED;
		return CW_OK;
	}
	PQclear(r);
	/* A group as full as rooms.max_members takes nobody more (joined or
	 * invited, counted under the lock, as a peer's add is: peer_api.c,
	 * members_admit); nobody is invited.  Since the forty-sixth session. */
	r = PQexecParams(c,
		"WITH " INVITEES_SQL ", m AS (SELECT i.uri FROM room_members x JOIN identities i ON i.id = x.identity_id "
		"  WHERE x.room_id = $1::bigint AND x.membership IN ('joined', 'invited')) "
		"SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM (SELECT uri FROM m UNION SELECT uri FROM want) y)",
		4, NULL, params, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e))) {
		free(who);
		return rc;
	}
	long before = atol(PQgetvalue(r, 0, 0)), after = atol(PQgetvalue(r, 0, 1));
	PQclear(r);
	if (after > before && after > v->xc->x->cfg->rooms_max_members) {
		free(who);
		v->result = INV_FULL;
		return CW_OK;
	}
	if ((rc = invite_limit(c, v, peer_domain, e)) || v->result == INV_LIMITED) {
		free(who);
		return rc;
	}
	/* The members: a remote user joined (no change to one there), a
	 * local one invited (again after she left; no change to one
	 * invited or joined), with her binding to the room's JID, which
	 * her decline names (decline_fn) and her join uses. */
	r = PQexecParams(c,
		/* The rows there are, locked as identity_id locks them (ik),
		 * then the others made (ni, which reads ik, so after it): a
		 * local one the retention sweep is deleting is waited for, not
		 * found, and made anew (since the forty-sixth session; before,
		 * read unlocked, the invitation failed on its foreign key). */
		"WITH " INVITEES_SQL ", "
		"ik AS (SELECT i.id, i.uri FROM identities i JOIN want w ON w.uri = i.uri FOR KEY SHARE OF i), "
		"ni AS (INSERT INTO identities (uri, domain, localpart, is_local, network, peer_id) "
		"  SELECT w.uri, CASE WHEN w.kind = 'r' THEN $4 ELSE $3 END, w.local, w.kind = 'l', "
		"  CASE WHEN w.kind = 'r' THEN 'peer:' || (SELECT name FROM peers WHERE id = $5::bigint) ELSE 'xmpp' END, "
		"  CASE WHEN w.kind = 'r' THEN $5::bigint END FROM want w WHERE w.uri NOT IN (SELECT uri FROM ik) "
		"  ON CONFLICT DO NOTHING RETURNING id, uri), "
		"ids AS (SELECT ni.id, w.kind, w.local, w.native, w.bare FROM ni JOIN want w ON w.uri = ni.uri "
		"  UNION SELECT ik.id, w.kind, w.local, w.native, w.bare FROM ik JOIN want w ON w.uri = ik.uri), "
		"mb AS (INSERT INTO room_members (room_id, identity_id, membership) "
		"  SELECT $1::bigint, ids.id, CASE WHEN ids.kind = 'r' THEN 'joined' ELSE 'invited' END FROM ids "
		"  ON CONFLICT (room_id, identity_id) DO UPDATE SET membership = 'invited', updated_at = now() "
		"  WHERE room_members.membership = 'left' AND excluded.membership = 'invited' "
		"  RETURNING identity_id, membership), "
		"iv AS (SELECT ids.id, ids.bare, ids.native FROM ids WHERE ids.kind = 'l' AND (EXISTS (SELECT 1 FROM mb "
		"  WHERE mb.identity_id = ids.id AND mb.membership = 'invited') OR EXISTS (SELECT 1 FROM room_members x "
		"  WHERE x.room_id = $1::bigint AND x.identity_id = ids.id AND x.membership = 'invited'))), "
		"b AS (INSERT INTO room_bindings (room_id, network, native_id, local_identity_id) "
		"  SELECT $1::bigint, 'xmpp', iv.native, iv.id FROM iv ON CONFLICT DO NOTHING) "
		"SELECT bare FROM iv ORDER BY 1",
		5, NULL, params, NULL, NULL, 0);
	free(who);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	for (int i = 0; i < PQntuples(r); i++)
		json_array_append_new(v->invited, json_string(PQgetvalue(r, i, 0)));
	PQclear(r);
	LOG_KV_LIMITED(CW_LOG_INFO, "an XMPP member invited into a group", "component", v->xc->domain, "room", v->room);
	return CW_OK;
}

static void invite_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct minvite *v = arg;
	struct xcomp *xc = v->xc;
	xmpp_ctx_t *ctx = xa_thread_ctx(xc->x);
	xmpp_stanza_t *st = ctx ? xmpp_stanza_new_from_string(ctx, v->text) : NULL;
	xmpp_stanza_t *err = NULL;
	if (rc) {
		LOG_KV(CW_LOG_WARN, "xmpp: an invitation could not be stored", "component", xc->domain, "detail",
		       e ? e->msg : "");
		err = st ? xa_error_reply(st, "wait", "internal-server-error", NULL) : NULL;
	} else if (v->result == INV_NOT_MEMBER) {
		/* a peer's group, or not the inviter's: the hub decides who is in */
		err = st ? xa_error_reply(st, "cancel", "not-allowed", NULL) : NULL;
	} else if (v->result == INV_REFUSED) {
		char why[MIMI_URI_MAX + 200];
		snprintf(why, sizeof(why), "%s left this group (or was put out of it): only they can come back, "
					   "nobody was invited.", v->refused);
		err = st ? xa_error_reply(st, "cancel", "not-allowed", why) : NULL;
	} else if (v->result == INV_FULL) {
		char why[160];
		snprintf(why, sizeof(why), "This group has as many members as it may have here (%ld): nobody was invited.",
			 xc->x->cfg->rooms_max_members);
		err = st ? xa_error_reply(st, "cancel", "policy-violation", why) : NULL;
	} else if (v->result == INV_LIMITED) {
		err = st ? xa_error_reply(st, "wait", "resource-constraint",
					  "You have sent as many invitations and messages as you may for now: "
					  "nobody was invited; try again later.")
			 : NULL;
	} else if (ctx) {
		/* Each local user invited now gets the room's invitation
		 * (XEP-0045 §7.8.2), from the room, naming the inviter. */
		size_t i;
		json_t *l;
		json_array_foreach(v->invited, i, l) {
			char *text = NULL;
			size_t len;
			if (!invite_stanza(xc, ctx, v->room, json_string_value(l), v->inviter, false, &text, &len))
				continue;
			xmpp_stanza_t *inv = xmpp_stanza_new_from_string(ctx, text);
			free(text);
			if (inv)
				xa_enqueue_stanza(xc, inv);
		}
	}
	if (err) {
		atomic_fetch_add(&xc->errors_out, 1);
		xa_enqueue_stanza(xc, err);
	}
	/* The members' presences follow from the stream's housekeeping
	 * (xa_muc_members). */
	if (st)
		xmpp_stanza_release(st);
	free(v->text);
	json_decref(v->who);
	json_decref(v->invited);
	free(v);
}

bool xa_muc_invites(struct xcomp *xc, xmpp_stanza_t *st)
{
	const char *to = xmpp_stanza_get_to(st), *from = xmpp_stanza_get_from(st);
	xmpp_stanza_t *x = xmpp_stanza_get_child_by_name_and_ns(st, "x", NS_MUC_USER);
	char public_id[EVENT_OPAQUE_ID_MAX + 1], room[XJ_JID_MAX + 1], nick[NICK_MAX + 1];
	char user[1100], local[MIMI_LOCAL_MAX + 1];
	if (!x || !xmpp_stanza_get_child_by_name(x, "invite"))
		return false;
	if (!xa_muc_room(xc, to, public_id, sizeof(public_id), room, sizeof(room), nick, sizeof(nick)) || nick[0]) {
		/* A mediated invitation goes to the room (XEP-0045 §7.8.2): one
		 * to a user or an occupant is malformed, and refused before
		 * anything is stored (until the eighteenth session it passed
		 * as a message carrying nothing, unanswered). */
		xa_send_now(xc, xa_error_reply(st, "modify", "bad-request", NULL));
		return true;
	}
	if (!xa_local_user(xc->x, from, user, sizeof(user), local, sizeof(local)) ||
	    !xa_muc_is_occupant(xc, room, from)) {
		xa_send_now(xc, xa_error_reply(st, "modify", "not-acceptable", NULL));
		return true;
	}
	struct minvite *v = calloc(1, sizeof(*v));
	json_t *who = json_array(), *invited = json_array();
	bool bad = !v || !who || !invited;
	int n = 0;
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(x); c && !bad; c = xmpp_stanza_get_next(c)) {
		const char *name = xmpp_stanza_get_name(c), *jid = xmpp_stanza_get_attribute(c, "to");
		if (!name || strcmp(name, "invite") != 0)
			continue;
		char id[MIMI_LOCAL_MAX + 1], bare[XJ_JID_MAX + 1], l2[MIMI_LOCAL_MAX + 1];
		if (!jid || ++n > INVITES_MAX)
			bad = true;
		else if (xa_remote_user(xc, jid, id, sizeof(id), bare, sizeof(bare)))
			json_array_append_new(who, json_pack("[s, s, s, s]", "r", id, "", ""));
		else if (xa_local_user(xc->x, jid, bare, sizeof(bare), l2, sizeof(l2))) {
			char native[600];
			xa_room_native(bare, room, native, sizeof(native));
			json_array_append_new(who, json_pack("[s, s, s, s]", "l", l2, native, bare));
		} else
			bad = true; /* another component's users, or another server's */
	}
	char *text = NULL;
	size_t len;
	if (bad || xmpp_stanza_to_text(st, &text, &len) != XMPP_EOK || !text) {
		free(v);
		json_decref(who);
		json_decref(invited);
		xa_send_now(xc, xa_error_reply(st, "modify", "bad-request", NULL));
		return true;
	}
	v->text = strdup(text);
	xmpp_free(xc->ctx, text);
	v->xc = xc;
	v->who = who;
	v->invited = invited;
	snprintf(v->room, sizeof(v->room), "%s", room);
	snprintf(v->inviter, sizeof(v->inviter), "%s", user);
	snprintf(v->public_id, sizeof(v->public_id), "%s", public_id);
	snprintf(v->uri, sizeof(v->uri), "mimi://%s/u/%s", xc->x->cfg->domain ? xc->x->cfg->domain : "", local);
	if (!v->text || store_write(xc->x->app->store, invite_fn, invite_done, v) != CW_OK) {
		free(v->text);
		json_decref(who);
		json_decref(invited);
		free(v);
		xa_send_now(xc, xa_error_reply(st, "wait", "resource-constraint", NULL));
	}
	return true;
}
