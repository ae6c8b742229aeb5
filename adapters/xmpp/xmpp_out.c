/* The XMPP adapter, outbound: the dispatcher's rows of destination "xmpp"
 * (events of remote users for local users) as stanzas from the remote
 * user's JID.  One statement reads what every row of the batch needs (the
 * two JIDs, the conversation, the target of a reply, edit, delete,
 * reaction or receipt, with its XMPP ids); the stanzas are built here and
 * handed to the components' threads; a row counts as delivered once its
 * stanza is written (XEP-0114 acknowledges nothing: docs/xmpp.md). */
#include "config.h"
#include "xmpp_int.h"
#include "peer/event.h"
#include "log.h"
#include "peer/peer_media.h"
#include "peer/peers.h"
#include "store.h"
#include "buf.h"

#include <stdlib.h>
#include <string.h>

#define WRITE_TIMEOUT_MS 5000

/* Whether the user t has seen the event ev (an alias of events): hers, or
 * delivered to her (or on its way: a row of the same batch).  A reply's
 * or a correction's quote (columns 12 and 35) is given only then: until
 * the forty-ninth session it was given whatever became of the quoted
 * message for her, and a member's reply in a group quoted to her the
 * text of a message the policy had dropped for her (she had blocked its
 * writer).  The outbox row is probed by its event (outbox_event_dest_key)
 * as a scalar subquery, and only when there is an event: until the
 * sixty-first session it was an EXISTS, which PostgreSQL turned into a
 * hashed subplan built by a scan of the whole outbox's delivered and
 * in-flight rows, once a batch for each of the two quotes, and every
 * batch built it (a plain message has no target, its probe's event null,
 * and the OR still asked): 6-40 ms of a 250-row batch at 20,000 rows of
 * outbox in tests/bench/xmpp, the most of the lookup's time (its plan
 * chose the hash up to some tens of thousands of rows, kept delivered ones
 * counted; docs/performance.md, "Sixty-first session: the XMPP lookup's
 * outbox probes"). */
#define SEEN_BY(ev, t)                                                                                        \
	"(" ev ".id IS NOT NULL AND (" ev ".sender_id = " t " OR (SELECT true FROM outbox so "                \
	"WHERE so.event_id = " ev ".id AND so.target_identity_id = " t                                     \
	" AND so.state IN ('delivered', 'in_flight') LIMIT 1) IS NOT NULL))"

static const char batch_sql[] =
	"WITH x AS (SELECT (j->>0)::bigint AS i, (j->>1)::bigint AS ev_id, (j->>2)::bigint AS target "
	"  FROM jsonb_array_elements($1::jsonb) AS j), "
	"r AS (SELECT x.i, ev.id AS ev_id, ev.public_id, ev.room_id, ev.type, t.id AS t_id, t.localpart AS t_local, "
	"  t.is_local AS t_is_local, s.id AS s_id, s.localpart AS s_local, s.is_local AS s_is_local, p.name AS peer, "
	"  s.domain AS s_domain, "
	"  (SELECT native_id FROM identity_bindings WHERE identity_id = t.id AND network = 'xmpp') AS t_jid, "
	"  (SELECT native_id FROM room_bindings b WHERE b.network = 'xmpp' AND b.local_identity_id = t.id "
	"   AND b.remote_identity_id = s.id) AS room_native, "
	"  tg.id AS tg_id, tg.type AS tg_type, tg.in_reply_to_id AS tg_reply, "
	"  CASE WHEN ev.type = 'reaction' THEN ev.in_reply_to_id "
	"       WHEN ev.type = 'delete' AND tg.type = 'reaction' THEN tg.in_reply_to_id END AS rt_id "
	"  FROM x JOIN events ev ON ev.id = x.ev_id JOIN identities t ON t.id = x.target "
	"  JOIN identities s ON s.id = ev.sender_id LEFT JOIN peers p ON p.id = s.peer_id "
	"  LEFT JOIN events tg ON tg.id = coalesce(ev.replaces_id, CASE WHEN ev.type <> 'reaction' THEN ev.in_reply_to_id END)) "
	"SELECT r.i, r.t_local, r.t_jid, r.s_local, r.peer, r.room_native, r.t_is_local, r.s_is_local, "
	/* 8-13: the target (XMPP id, origin-id, is last of its sender, its
	 * content for a quote (a reply's or a correction's only: xm.c takes its
	 * text as the target's own body showed it; until the twenty-ninth
	 * session the text/plain part's body alone, and a reply to a message
	 * of HTML or markdown had no quote), is a reaction).  "Is last" only for an edit (a correction of the last
	 * message; others are quoted), and read from at most the room's next
	 * thousand events (more: taken as not last): until the nineteenth
	 * session every reply, edit and delete walked the room's events after
	 * its target, all of them when its writer had written nothing since
	 * (1.9 s in a room of 61,000 events, a review measured). */
	/* The XMPP ids of the target, the message reacted to and the one an
	 * edited reply answered (8-10, 14-16, 32-34) are probed only when there
	 * is one: until the sixty-first session each of the six probes ran for
	 * every row, a plain message's with a null key. */
	"  r.tg_id IS NOT NULL, "
	"  CASE WHEN r.tg_id IS NOT NULL THEN coalesce((SELECT substr(n.native_id, length(r.room_id::text) + 2) "
	"   FROM event_native_ids n WHERE n.event_id = r.tg_id AND n.network = 'xmpp' AND n.kind = 'id' "
	"   AND starts_with(n.native_id, r.room_id::text || '/') LIMIT 1), tg.public_id) END, "
	"  CASE WHEN r.tg_id IS NOT NULL THEN (SELECT substr(n.native_id, length(r.room_id::text) + 2) "
	"   FROM event_native_ids n WHERE n.event_id = r.tg_id AND n.network = 'xmpp' AND n.kind = 'origin_id' "
	"   AND starts_with(n.native_id, r.room_id::text || '/') LIMIT 1) END, "
	"  CASE WHEN r.type = 'edit' THEN (SELECT count(*) < 1000 "
	"   AND coalesce(NOT bool_or(w.sender_id = tg.sender_id AND w.type = 'message'), true) "
	"   FROM (SELECT l.sender_id, l.type FROM events l WHERE l.room_id = tg.room_id AND l.id > tg.id "
	"   ORDER BY l.id LIMIT 1000) w) END, "
	"  CASE WHEN r.type IN ('message', 'edit') AND " SEEN_BY("tg", "r.t_id") " THEN (tg.content->'content')::text END, "
	"  r.tg_type = 'reaction', "
	/* 14-17: the message reacted to (ids) and the sender's whole set on it
	 * ('[]' without one, as the aggregate of no rows gave, without its
	 * subplan and sort for every plain message until the sixty-first
	 * session) */
	"  r.rt_id IS NOT NULL, "
	"  CASE WHEN r.rt_id IS NOT NULL THEN coalesce((SELECT substr(n.native_id, length(r.room_id::text) + 2) "
	"   FROM event_native_ids n WHERE n.event_id = r.rt_id AND n.network = 'xmpp' AND n.kind = 'id' "
	"   AND starts_with(n.native_id, r.room_id::text || '/') LIMIT 1), rt.public_id) END, "
	"  CASE WHEN r.rt_id IS NOT NULL THEN (SELECT substr(n.native_id, length(r.room_id::text) + 2) "
	"   FROM event_native_ids n WHERE n.event_id = r.rt_id AND n.network = 'xmpp' AND n.kind = 'origin_id' "
	"   AND starts_with(n.native_id, r.room_id::text || '/') LIMIT 1) END, "
	"  CASE WHEN r.rt_id IS NULL THEN '[]' ELSE (SELECT coalesce(jsonb_agg(DISTINCT k.body), '[]'::jsonb)::text "
	"   FROM (SELECT rr.content->'content'->'parts'->0->>'body' AS body "
	"   FROM events rr WHERE rr.in_reply_to_id = r.rt_id AND rr.type = 'reaction' AND rr.sender_id = r.s_id "
	"   AND NOT EXISTS (SELECT 1 FROM events d WHERE d.type = 'delete' AND d.replaces_id = rr.id)) AS k "
	"   WHERE k.body IS NOT NULL) END, "
	"  r.t_id, r.s_id, r.room_id, rm.kind, "
	/* 22-26: a group's: its public id, the peer that made it (read for a
	 * group's row only: a 1:1 room's was looked up and never read until the
	 * sixty-first session), the public ids of
	 * the target and the message reacted to, whether the user was invited */
	"  rm.public_id, CASE WHEN rm.kind = 'group' THEN (SELECT name FROM peers WHERE id = rm.created_by_peer_id) END, "
	"  tg.public_id, rt.public_id, "
	"  rm.kind = 'group' AND EXISTS (SELECT 1 FROM room_bindings b WHERE b.network = 'xmpp' "
	"   AND b.room_id = r.room_id AND b.local_identity_id = r.t_id AND b.remote_identity_id IS NULL), "
	/* 27: a group made here: the room JID its first member has it under
	 * (the component it was made on) */
	"  CASE WHEN rm.kind = 'group' AND rm.created_by_peer_id IS NULL THEN (SELECT split_part(b.native_id, ' ', 2) "
	"   FROM room_bindings b WHERE b.network = 'xmpp' AND b.room_id = r.room_id AND b.remote_identity_id IS NULL "
	"   AND b.native_id NOT LIKE 'h:%' ORDER BY b.id LIMIT 1) END, "
	/* 28: a group's sender's nick in its room (NULL: not a group) */
	"  CASE WHEN rm.kind <> 'group' THEN NULL "
	MUC_NICK_OF("r.s_is_local", "r.s_local", "r.s_domain", "r.s_id", "r.room_id") ", "
	/* 29-30: who wrote the target (a reply's "to", XEP-0461 §3): the local
	 * user (1:1), its writer's nick (a group) */
	"  tg.sender_id = r.t_id, "
	"  CASE WHEN rm.kind <> 'group' OR ts.id IS NULL THEN NULL " MUC_NICK("ts", "r.room_id") ", "
	/* 31: the target is the event's sender's own (a receipt of it is none) */
	"  tg.sender_id = r.s_id, "
	/* 32-37: an edit's: the message the edited one answered (XEP-0308: a
	 * correction replaces the whole stanza, its reply too), as 8-10, 12,
	 * 29 and 30 have a reply's */
	"  rp.id IS NOT NULL, "
	"  CASE WHEN rp.id IS NOT NULL THEN coalesce((SELECT substr(n.native_id, length(r.room_id::text) + 2) "
	"   FROM event_native_ids n WHERE n.event_id = rp.id AND n.network = 'xmpp' AND n.kind = 'id' "
	"   AND starts_with(n.native_id, r.room_id::text || '/') LIMIT 1), rp.public_id) END, "
	"  CASE WHEN rp.id IS NOT NULL THEN (SELECT substr(n.native_id, length(r.room_id::text) + 2) "
	"   FROM event_native_ids n WHERE n.event_id = rp.id AND n.network = 'xmpp' AND n.kind = 'origin_id' "
	"   AND starts_with(n.native_id, r.room_id::text || '/') LIMIT 1) END, "
	"  CASE WHEN " SEEN_BY("rp", "r.t_id") " THEN (rp.content->'content')::text END, rp.sender_id = r.t_id, "
	"  CASE WHEN rm.kind <> 'group' OR rs.id IS NULL THEN NULL " MUC_NICK("rs", "r.room_id") ", "
	/* 38: a group's: the public id of the message the edited one answered */
	"  rp.public_id "
	"FROM r JOIN rooms rm ON rm.id = r.room_id LEFT JOIN events tg ON tg.id = r.tg_id "
	"LEFT JOIN identities ts ON ts.id = tg.sender_id "
	"LEFT JOIN events rp ON rp.id = tg.in_reply_to_id AND r.type = 'edit' AND tg.type = 'message' "
	"LEFT JOIN identities rs ON rs.id = rp.sender_id "
	"LEFT JOIN events rt ON rt.id = r.rt_id ORDER BY r.i";

/* The lookup, prepared on the dispatcher's connection the first time it
 * is missing there, and run with its generic plan (store_exec_generic).
 * Its one parameter (the rows, a JSON array) folds nothing: the custom
 * plans are the generic one, at the same cost.  But PostgreSQL takes the
 * generic plan only while it costs less than the average of the custom
 * plans made on the connection, and this one's estimate grows with
 * events (the edit's "is last" probe): while the table grew, the average
 * lagged and it planned the lookup again on most batches, 5.7 ms each
 * (315 plans in 498 calls in tests/bench/xmpp; docs/performance.md,
 * "Forty-fourth session").  Until the forty-fifth session the setting
 * took two round trips of its own (SET, RESET) around the lookup. */
static PGresult *batch_lookup(PGconn *c, const char *const *params)
{
	return store_exec_generic_sql(c, "causeway_xmpp_batch", batch_sql, 1, params);
}

static const char *col(PGresult *r, int row, int c)
{
	return PQgetisnull(r, row, c) ? NULL : PQgetvalue(r, row, c);
}

/* The JSON of column c, or NULL: when the column is null, when (*oom set)
 * memory ran out, or, with a log line, when it does not parse: a quoted
 * event stored before the thirtieth session with a number jansson cannot
 * read (1e19, kept by jsonb as 20 digits), which then goes without its
 * quote, as one whose content retention erased. */
static json_t *col_json(PGresult *r, int row, int c, bool *oom)
{
	json_error_t je;
	json_t *j = col(r, row, c) ? json_loads(col(r, row, c), 0, &je) : NULL;
	if (!j && col(r, row, c)) {
		if (json_error_code(&je) == json_error_out_of_memory)
			*oom = true;
		else
			LOG_KV(CW_LOG_WARN, "a quoted stored event does not parse as JSON: sent without the quote");
	}
	return j;
}

/* Appends buf (n bytes) to *text (malloc'd; *len its length). */
static bool append_bytes(const char *buf, size_t n, char **text, size_t *len)
{
	char *grown = realloc(*text, *len + n + 1);
	if (grown) {
		memcpy(grown + *len, buf, n);
		grown[*len + n] = '\0';
		*text = grown;
		*len += n;
	}
	return grown != NULL;
}

/* The component on (or, when NULL, the one that stands for peer), and
 * the local user's JID.  *never: a peer named that no component stands
 * for (xmpp.components, read at start only: no retry of this process
 * finds one). */
static bool comp_and_user(struct xmpp *x, PGresult *r, int k, struct xcomp *on, const char *peer, struct xcomp **xc,
			  char *jid, size_t len, bool *never, cw_errmsg *e)
{
	*xc = on ? on : peer ? xa_comp_by_peer(x, peer) : NULL;
	if (!*xc) {
		*never = peer != NULL;
		cw_fail(e, CW_EINVAL, "no XMPP component stands for the peer %s (xmpp.components)", peer ? peer : "");
		return false;
	}
	if (col(r, k, 2))
		cw_copy_cut(jid, len, col(r, k, 2));
	else
		snprintf(jid, len, "%s@%s", col(r, k, 1), x->local_domain);
	return true;
}

/* Why xm_from_neutral made no stanza (res: XM_OUT_INVALID or XM_OUT_NOMEM). */
static void not_made(enum xm_out_result res, const char *why, cw_errmsg *e)
{
	if (res == XM_OUT_INVALID)
		cw_fail(e, CW_EINVAL, "not representable in XMPP: %s", why);
	else
		cw_fail(e, CW_ENOMEM, "cannot make the stanza: %s", why);
}

/* A group's row (xmpp_muc.c): the room speaks for its sender (a remote
 * member, or another local one) to each resource of the local user that
 * is in it, as a groupchat with the room's stanza-id (the message's id);
 * none in it: nothing now (the history brings it when they join).  The
 * user's first row of the group invites them instead (the binding made
 * then). */
static bool build_group(struct xmpp *x, struct outbox_row *row, PGresult *r, int k, struct xcomp **xc, char **text,
			size_t *len, json_t *bind, bool *never, cw_errmsg *e)
{
	char local_jid[XJ_JID_MAX + 1], room[XJ_JID_MAX + 1];
	if (PQgetvalue(r, k, 6)[0] != 't') {
		*never = true;
		cw_fail(e, CW_EINVAL, "only local users get a group's events on XMPP");
		return false;
	}
	/* The room's component: the peer's that made the group; for a group
	 * made here, the one it was made on, else the sender's peer's (or the
	 * only one). */
	const char *made_on = col(r, k, 27) ? strchr(col(r, k, 27), '@') : NULL;
	struct xcomp *on = made_on ? xa_comp_by_domain(x, made_on + 1) : NULL;
	if (!col(r, k, 23) && !on && !col(r, k, 4) && x->ncomp == 1)
		on = &x->comp[0];
	if (!comp_and_user(x, r, k, on, col(r, k, 23) ? col(r, k, 23) : col(r, k, 4), xc, local_jid, sizeof(local_jid),
			   never, e)) {
		/* a group made here: another member's row may yet bind it to
		 * a component (col 27), whatever its sender's peer */
		if (!col(r, k, 23))
			*never = false;
		return false;
	}
	if (!xa_muc_room_jid(*xc, PQgetvalue(r, k, 22), room, sizeof(room))) {
		*never = true;
		cw_fail(e, CW_EINVAL, "the group has no room JID");
		return false;
	}
	xmpp_ctx_t *ctx = xa_thread_ctx(x);
	if (!ctx) {
		cw_fail(e, CW_ENOMEM, "out of memory");
		return false;
	}
	if (PQgetvalue(r, k, 26)[0] != 't') {
		char native[600], inviter[XJ_JID_MAX + 1];
		if (PQgetvalue(r, k, 7)[0] == 't' || !xa_remote_jid(*xc, col(r, k, 3), inviter, sizeof(inviter)))
			snprintf(inviter, sizeof(inviter), "%s", room);
		xa_room_native(local_jid, room, native, sizeof(native));
		json_array_append_new(bind, json_pack("[s, n, s, s, s]", PQgetvalue(r, k, 20), PQgetvalue(r, k, 18),
						      native, local_jid));
		if (!xa_muc_invite(*xc, ctx, room, local_jid, inviter, text, len)) {
			cw_fail(e, CW_ENOMEM, "out of memory");
			return false;
		}
		return true;
	}
	const char *type = json_string_value(json_object_get(row->event, "type"));
	const char *rk = json_string_value(json_object_get(json_object_get(row->event, "content"), "receipt"));
	if (type && strcmp(type, "receipt") == 0 && (!rk || strcmp(rk, "read") != 0))
		return true; /* XEP-0184 receipts are not for rooms; a read one is a XEP-0333 marker */
	if (type && strcmp(type, "receipt") == 0 && col(r, k, 31) && PQgetvalue(r, k, 31)[0] == 't')
		return true; /* a member's marker of her own message says nothing (see build) */
	json_t *occ = xa_muc_occupants(*xc, room, local_jid);
	const char *id = json_string_value(json_object_get(row->event, "id"));
	/* the reaction set not read (memory) is not taken as empty: a removed
	 * reaction would take all of them away */
	bool oom = false;
	json_t *set = col_json(r, k, 17, &oom), *quoted = col_json(r, k, 12, &oom);
	json_t *rquoted = col_json(r, k, 35, &oom);
	json_t *ev = peer_media_public(x->app, row->event);
	bool ok = occ != NULL && !oom;
	if (!ok)
		cw_fail(e, CW_ENOMEM, "out of memory");
	size_t i;
	json_t *o;
	/* the writer of the message, and of the one it answers, unless the
	 * user: nobody else speaks under the user's occupant's nick (a
	 * member the stream's holder has not announced yet, or a writer who
	 * left: it gives way first) */
	bool mine = strcmp(PQgetvalue(r, k, 18), PQgetvalue(r, k, 19)) == 0;
	bool target_mine = col(r, k, 29) && PQgetvalue(r, k, 29)[0] == 't';
	bool replied_mine = col(r, k, 36) && PQgetvalue(r, k, 36)[0] == 't';
	json_array_foreach(ok ? occ : NULL, i, o) {
		char from[XJ_JID_MAX + 300], author[XJ_JID_MAX + 300], own[256]; /* a nick: at most 255 bytes */
		char rauthor[XJ_JID_MAX + 300];
		snprintf(own, sizeof(own), "%s", json_string_value(json_array_get(o, 1)));
		if (((!mine && strcmp(PQgetvalue(r, k, 28), own) == 0) ||
		     (!target_mine && col(r, k, 30) && strcmp(col(r, k, 30), own) == 0)) &&
		    xa_muc_give_way(*xc, ctx, room, json_string_value(json_array_get(o, 0)), own))
			snprintf(own, sizeof(own), "%.*s", (int)strcspn(local_jid, "@"), local_jid);
		snprintf(from, sizeof(from), "%s/%s", room, PQgetvalue(r, k, 28));
		/* a reply to the user's own message names their occupant */
		snprintf(author, sizeof(author), "%s/%s", room, target_mine ? own : col(r, k, 30) ? col(r, k, 30) : "");
		snprintf(rauthor, sizeof(rauthor), "%s/%s", room, replied_mine ? own : col(r, k, 37) ? col(r, k, 37) : "");
		/* In a room, references name the room's ids (stanza-id): the
		 * messages' own. */
		struct xm_out_info info = {
			.from = from,
			.to = json_string_value(json_array_get(o, 0)),
			.id = id,
			.target = { .known = PQgetvalue(r, k, 8)[0] == 't', .id = col(r, k, 24), .origin_id = col(r, k, 24),
				    .is_last = PQgetvalue(r, k, 11)[0] == 't', .content = quoted,
				    .is_reaction = PQgetvalue(r, k, 13)[0] == 't', .author = col(r, k, 30) ? author : NULL },
			.reacted = { .known = PQgetvalue(r, k, 14)[0] == 't', .id = col(r, k, 25), .origin_id = col(r, k, 25) },
			.reaction_set = set,
			.replied = { .known = PQgetvalue(r, k, 32)[0] == 't', .id = col(r, k, 38), .origin_id = col(r, k, 38),
				     .content = rquoted, .author = replied_mine || col(r, k, 37) ? rauthor : NULL },
		};
		xmpp_stanza_t *st = NULL;
		char why[200] = "";
		enum xm_out_result res = xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why));
		if (res == XM_OUT_NONE)
			break;
		if (res != XM_OUT_STANZA) {
			if (st)
				xmpp_stanza_release(st);
			ok = false;
			*never = res == XM_OUT_INVALID;
			not_made(res, why, e);
			break;
		}
		st = xa_muc_groupchat(ctx, st);
		if (!st) {
			ok = false;
			cw_fail(e, CW_ENOMEM, "out of memory");
			break;
		}
		xa_muc_stanza_id(ctx, st, id, room);
		char *one = NULL;
		size_t n = 0;
		ok = xmpp_stanza_to_text(st, &one, &n) == XMPP_EOK && one;
		/* an occupant whose join is being looked at keeps it (or its
		 * history had it) */
		if (ok && xa_muc_route(*xc, room, info.to, id, one, n) == XA_MUC_NOW)
			ok = append_bytes(one, n, text, len);
		if (one)
			xmpp_free(ctx, one);
		xmpp_stanza_release(st);
		if (!ok) {
			cw_fail(e, CW_ENOMEM, "out of memory");
			break;
		}
	}
	json_decref(ev);
	json_decref(set);
	json_decref(quoted);
	json_decref(rquoted);
	json_decref(occ);
	if (!ok) {
		free(*text);
		*text = NULL;
	}
	return ok;
}

/* A stanza for row i, or *none; false with e filled when it cannot be made,
 * and *never set when no stanza can ever be made of it, for a fact of the
 * row's own: its event, its recipient not a local user, its sender not a
 * remote user, or one whose id makes no JID or whose peer no component
 * stands for (retrying cannot help).  Memory that ran out is not one.
 * *text is libstrophe's when *owner is set (xmpp_free with it), else
 * malloc's (a group's, several stanzas joined).  Until the sixtieth
 * session a chat's stanza was copied out of libstrophe's buffer with
 * strdup, and the queue's item copied it again (xa_enqueue): one copy,
 * one malloc and one free a message more than the item needs. */
static bool build(struct xmpp *x, struct outbox_row *row, PGresult *r, int k, struct xcomp **xc, char **text,
		  size_t *len, xmpp_ctx_t **owner, json_t *bind, bool *never, cw_errmsg *e)
{
	*text = NULL;
	*len = 0;
	*owner = NULL;
	*never = false;
	if (strcmp(PQgetvalue(r, k, 21), "group") == 0)
		return build_group(x, row, r, k, xc, text, len, bind, never, e);
	if (PQgetvalue(r, k, 6)[0] != 't' || PQgetvalue(r, k, 7)[0] == 't' || !col(r, k, 4)) {
		*never = true;
		cw_fail(e, CW_EINVAL, "only events of remote users for local users are delivered to XMPP");
		return false;
	}
	char local_jid[XJ_JID_MAX + 1], remote_jid[XJ_JID_MAX + 1];
	if (!comp_and_user(x, r, k, NULL, col(r, k, 4), xc, local_jid, sizeof(local_jid), never, e))
		return false;
	if (!xa_remote_jid(*xc, col(r, k, 3), remote_jid, sizeof(remote_jid))) {
		*never = true;
		cw_fail(e, CW_EINVAL, "the remote user's id has no JID");
		return false;
	}
	if (!col(r, k, 5) || !col(r, k, 2)) {
		char room[600];
		xa_room_native(local_jid, remote_jid, room, sizeof(room));
		json_array_append_new(bind, json_pack("[s, s, s, s, s]", PQgetvalue(r, k, 20), PQgetvalue(r, k, 19),
						      PQgetvalue(r, k, 18), room, local_jid));
	}
	/* A receipt in a chat is for a message the user sent (XEP-0184,
	 * XEP-0333): one of the contact's own message (or of nothing the
	 * user wrote) would name a message she never sent, and her client
	 * could mark another of that id; not sent, as one of a message XMPP
	 * does not know (until the thirty-sixth session it went out). */
	const char *etype = json_string_value(json_object_get(row->event, "type"));
	if (etype && strcmp(etype, "receipt") == 0 && PQgetvalue(r, k, 29)[0] != 't')
		return true;
	const char *id = json_string_value(json_object_get(row->event, "id"));
	char idbuf[40];
	if (!id) {
		snprintf(idbuf, sizeof(idbuf), "cw-%lld", (long long)row->id);
		id = idbuf;
	}
	bool oom = false;
	json_t *set = col_json(r, k, 17, &oom), *quoted = col_json(r, k, 12, &oom);
	json_t *rquoted = col_json(r, k, 35, &oom);
	if (oom) { /* as in build_group */
		json_decref(set);
		json_decref(quoted);
		json_decref(rquoted);
		cw_fail(e, CW_ENOMEM, "out of memory");
		return false;
	}
	struct xm_out_info info = {
		.from = remote_jid,
		.to = local_jid,
		.id = id,
		.target = { .known = PQgetvalue(r, k, 8)[0] == 't', .id = col(r, k, 9), .origin_id = col(r, k, 10),
			    .is_last = PQgetvalue(r, k, 11)[0] == 't', .content = quoted,
			    .is_reaction = PQgetvalue(r, k, 13)[0] == 't',
			    .author = PQgetvalue(r, k, 29)[0] == 't' ? local_jid : remote_jid },
		.reacted = { .known = PQgetvalue(r, k, 14)[0] == 't', .id = col(r, k, 15), .origin_id = col(r, k, 16) },
		.reaction_set = set,
		.replied = { .known = PQgetvalue(r, k, 32)[0] == 't', .id = col(r, k, 33), .origin_id = col(r, k, 34),
			     .content = rquoted, .author = PQgetvalue(r, k, 36)[0] == 't' ? local_jid : remote_jid },
	};
	xmpp_ctx_t *ctx = xa_thread_ctx(x);
	xmpp_stanza_t *st = NULL;
	char why[200] = "";
	/* A peer's files reach the user as links of Causeway's, which fetches
	 * them signed: the peer's store may not serve a bare link to anyone. */
	json_t *ev = peer_media_public(x->app, row->event);
	/* A plain message's stanza is the thread's kept one (xm_keep), changed
	 * in place: rendered and released below, before the next row's. */
	enum xm_out_result res =
		ctx ? xm_from_neutral_kept(ctx, xa_thread_keep(x), ev, &info, &st, why, sizeof(why)) : XM_OUT_NOMEM;
	json_decref(ev);
	json_decref(set);
	json_decref(quoted);
	json_decref(rquoted);
	if (res == XM_OUT_NONE)
		return true;
	if (res != XM_OUT_STANZA) {
		if (st)
			xmpp_stanza_release(st);
		*never = res == XM_OUT_INVALID;
		not_made(res, ctx ? why : "out of memory", e);
		return false;
	}
	char *buf = NULL;
	bool ok = xmpp_stanza_to_text(st, &buf, len) == XMPP_EOK && buf;
	if (ok) {
		*text = buf;
		*owner = ctx;
	} else if (buf) {
		xmpp_free(ctx, buf);
	}
	xmpp_stanza_release(st);
	if (!ok)
		cw_fail(e, CW_ENOMEM, "out of memory");
	return ok;
}

/* How soon a row whose component's stream is not up here is due again. */
#define NOT_UP_RETRY_MS 2000

/* Outcome 3 (dispatcher.h): not tried here, due again in a moment, the
 * attempt not counted. */
static void row_wait(struct outbox_row *row, const char *why)
{
	row->outcome = 3;
	row->retry_after_ms = NOT_UP_RETRY_MS;
	snprintf(row->why, sizeof(row->why), "%s", why);
}

/* Outcome 5: never deliverable, for a fact of its own (build's never):
 * dead at once, why recorded; the room's next rows go on. */
static void row_dead(struct outbox_row *row, const char *why)
{
	row->outcome = 5;
	snprintf(row->why, sizeof(row->why), "%s", why);
}

/* Outcome -1: tried and failed, an attempt counted (backoff, then a dead
 * letter the operator can replay). */
static void row_fail(struct outbox_row *row, const char *why)
{
	row->outcome = -1;
	row->code = 0;
	row->retry_after_ms = 0;
	snprintf(row->why, sizeof(row->why), "%s", why);
}

/* The room of row's event held: its later rows of the batch wait. */
static void hold_room(json_t *held_rooms, const struct outbox_row *row)
{
	const char *room = json_string_value(json_object_get(row->event, "room"));
	if (room)
		json_object_set_new(held_rooms, room, json_true());
}

cw_err xa_deliver(void *ctx, PGconn *c, const char *destination, struct outbox_row *rows, size_t n, size_t *done,
		    long *code, cw_errmsg *e)
{
	(void)destination;
	struct xmpp *x = ctx;
	*done = 0;
	*code = 0;
	/* The lookup's rows, [[i, event, target], ...]: printed, not built
	 * with jansson and dumped (3 % of the dispatcher's CPU). */
	struct cw_buf in;
	cw_buf_init(&in, SIZE_MAX / 2);
	bool oom = cw_buf_add(&in, "[", 1) != CW_OK;
	for (size_t i = 0; i < n && !oom; i++) {
		/* the three numbers without snprintf (until the fifty-ninth
		 * session: 0.8 % of the thread, docs/performance.md) */
		char one[72], *p = one;
		if (i)
			*p++ = ',';
		*p++ = '[';
		p += outbox_put_ll(p, (long long)i);
		*p++ = ',';
		p += outbox_put_ll(p, (long long)rows[i].event_id);
		*p++ = ',';
		p += outbox_put_ll(p, (long long)rows[i].target_id);
		*p++ = ']';
		oom = cw_buf_add(&in, one, (size_t)(p - one)) != CW_OK;
	}
	oom = oom || cw_buf_add(&in, "]", 1) != CW_OK;
	char *text = cw_buf_take(&in, NULL);
	if (oom || !text) {
		free(text);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	const char *params[] = { text };
	PGresult *r = batch_lookup(c, params);
	free(text);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	/* rows without a target (a whole room) find no line: refused below */
	int nr = PQntuples(r), k = 0;
	uint64_t *seqs = calloc(n, sizeof(*seqs));
	struct xcomp **comps = calloc(n, sizeof(*comps));
	size_t *binds = calloc(n, sizeof(*binds)); /* where row i's bindings start in bind (the next row's: end) */
	json_t *bind = json_array();
	if (!seqs || !comps || !binds || !bind) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	/* Each row has its own outcome (dispatcher.h): one that cannot be
	 * made fails alone, one whose component's stream is not up here (down,
	 * full, or held by another process) waits without losing an attempt,
	 * and the other components' rows go on; a room with a row not
	 * delivered keeps its later rows back, so none overtakes it.  Before,
	 * the first such row failed the whole rest of the batch, each row an
	 * attempt (a process on standby burned rows' budgets to dead letters). */
	json_t *held_rooms = json_object();
	if (!held_rooms) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		binds[i] = json_array_size(bind);
		/* Looked up only while a room is held: until the sixty-first
		 * session every row hashed its room twice (the event's member
		 * and held_rooms, empty but for a failure), and the rows'
		 * waits hashed their component's domain in broke: 0.13 µs of
		 * the dispatcher's 14 a message in tests/bench/xmpp
		 * (docs/performance.md). */
		const char *room = NULL;
		if (json_object_size(held_rooms) &&
		    (room = json_string_value(json_object_get(rows[i].event, "room"))) &&
		    json_object_get(held_rooms, room)) {
			row_wait(&rows[i], "an earlier message of its room waits");
			continue;
		}
		while (k < nr && (size_t)atol(PQgetvalue(r, k, 0)) < i)
			k++;
		if (k >= nr || (size_t)atol(PQgetvalue(r, k, 0)) != i) {
			/* no retry gives it one (until the twenty-fifth session
			 * it was retried, and held its room's later rows) */
			row_dead(&rows[i], "an XMPP row names no local user");
			continue;
		}
		char *st = NULL;
		size_t len = 0;
		struct xcomp *xc = NULL;
		xmpp_ctx_t *owner = NULL;
		cw_errmsg why = { { 0 } };
		bool never = false;
		bool made = build(x, &rows[i], r, k, &xc, &st, &len, &owner, bind, &never, &why);
		if (!made && never) {
			row_dead(&rows[i], why.msg); /* retries cannot help */
			continue;
		}
		if (!made) {
			row_fail(&rows[i], why.msg);
			hold_room(held_rooms, &rows[i]);
			continue;
		}
		if (st) {
			/* The thread is woken once, below, for the whole batch:
			 * one wake-up and one write instead of one each.  A
			 * stream that is not up refuses it (under the queue's
			 * lock: none slips in while the stream is given up). */
			bool ok = xa_enqueue(xc, st, len, &seqs[i], false);
			if (owner)
				xmpp_free(owner, st);
			else
				free(st);
			if (!ok) {
				pthread_mutex_lock(&xc->mu);
				bool up = xc->state == XC_UP;
				pthread_mutex_unlock(&xc->mu);
				char why_not[sizeof(rows[i].why)];
				snprintf(why_not, sizeof(why_not), "the stream of component %.400s is %s", xc->domain,
					 up ? "full" : "not up here");
				row_wait(&rows[i], why_not);
				hold_room(held_rooms, &rows[i]);
				continue;
			}
			comps[i] = xc;
		} else {
			rows[i].outcome = 1; /* nothing to send (XM_OUT_NONE): done */
		}
	}
	json_decref(held_rooms);
	struct xcomp *last = NULL;
	for (size_t i = n; i-- > 0;)
		if (comps[i] && comps[i] != last) {
			xa_wake(comps[i]);
			last = comps[i];
		}
	/* Written in order per component.  Once a stanza did not reach the
	 * wire (its stream broke), or its wait took the whole time (a server
	 * that reads slowly), the later ones of its component are not waited
	 * for: each counts as what it is now (xa_wait_written: written, or
	 * taken back from the queue and failed).  Until the fifty-first
	 * session they all failed, and those written went twice. */
	json_t *broke = json_object();
	for (size_t i = 0; i < n; i++) {
		if (!comps[i])
			continue;
		bool late = broke && json_object_size(broke) && json_object_get(broke, comps[i]->domain);
		int64_t t0 = cw_now_us();
		bool ok = xa_wait_written(comps[i], seqs[i], late ? 0 : WRITE_TIMEOUT_MS);
		if (broke && !late && (!ok || cw_now_us() - t0 >= (int64_t)WRITE_TIMEOUT_MS * 1000))
			json_object_set_new(broke, comps[i]->domain, json_true());
		if (!ok) {
			char why_not[sizeof(rows[i].why)];
			snprintf(why_not, sizeof(why_not),
				 "the stream of component %.400s broke before the stanza was written", comps[i]->domain);
			row_fail(&rows[i], why_not);
			continue;
		}
		rows[i].outcome = 1;
	}
	json_decref(broke);
	for (size_t i = 0; i < n; i++)
		if (rows[i].outcome == 1 || rows[i].outcome >= 4) /* 4, 5: settled */
			(*done)++;
	/* Only what was written binds: an invitation that did not go out is
	 * made again with the row's next attempt. */
	json_t *sent = json_array();
	for (size_t i = 0; sent && i < n; i++)
		if (rows[i].outcome == 1)
			for (size_t b = binds[i]; b < (i + 1 < n ? binds[i + 1] : json_array_size(bind)); b++)
				json_array_append(sent, json_array_get(bind, b));
	json_decref(bind);
	bind = sent;
	if (bind && json_array_size(bind)) {
		char *b = json_dumps(bind, JSON_COMPACT);
		/* Bound to a direct room of the two: the row's, or (a group's
		 * row) the pair's, made if need be (schema/012_direct_rooms.sql):
		 * what the user answers goes to that one person.  A group's
		 * room for a user (no remote user) is bound to the group. */
		const char *p2[] = { b ? b : "[]", x->cfg->domain ? x->cfg->domain : "" };
		cw_errmsg e2;
		if (store_command(c,
				  "WITH j AS (SELECT (x->>0)::bigint AS room, (x->>1)::bigint AS remote, (x->>2)::bigint AS local, "
				  " x->>3 AS native, x->>4 AS jid FROM jsonb_array_elements($1::jsonb) AS x), "
				  "rb AS (INSERT INTO room_bindings (room_id, network, native_id, local_identity_id, remote_identity_id) "
				  " SELECT DISTINCT ON (native) CASE WHEN remote IS NULL THEN room "
				  "  ELSE direct_room_of(room, local, remote, $2) END, 'xmpp', native, local, remote "
				  " FROM j ON CONFLICT DO NOTHING) "
				  "INSERT INTO identity_bindings (identity_id, network, native_id) "
				  " SELECT DISTINCT ON (local) local, 'xmpp', jid FROM j ON CONFLICT DO NOTHING",
				  2, p2, &e2))
			LOG_KV(CW_LOG_WARN, "cannot record XMPP bindings", "detail", e2.msg);
		free(b);
	}
out:
	PQclear(r);
	free(seqs);
	free(comps);
	free(binds);
	json_decref(bind);
	if (!rc && *done < n)
		rc = cw_fail(e, CW_EIO, "not delivered");
	return rc;
}

/* The JID of the group of row i of a dispatcher_dead_untold result, as its
 * writer has it: her binding's pair key holds it ("her-JID room-JID",
 * xa_room_native), or, hashed when the two were long, this component's
 * JID of the group's public id (column 11) when the pair of that JID and
 * hers (column 6) hashes to her key; else (she is in the group through
 * another component's JID) "the group " and its name (column 14: its
 * public id when it has none), as the Matrix bot names a group.  Until a
 * review of the sixtieth session a hashed key named this component's JID
 * of the group whatever she had joined. */
static bool group_jid(const struct xcomp *xc, const PGresult *r, int i, char *out, size_t len)
{
	const char *native = PQgetvalue(r, i, 4), *sp = strchr(native, ' ');
	if (strncmp(native, "h:", 2) != 0 && sp && strlen(sp + 1) < len) {
		snprintf(out, len, "%s", sp + 1);
		return true;
	}
	char pair[2 * XJ_JID_MAX + 2], hex[65];
	unsigned char h[32];
	if (strncmp(native, "h:", 2) == 0 && xa_muc_room_jid(xc, PQgetvalue(r, i, 11), out, len)) {
		/* as xa_room_native hashes a long pair */
		int k = snprintf(pair, sizeof(pair), "%s %s", PQgetvalue(r, i, 6), out);
		if (k > 0 && (size_t)k < sizeof(pair)) {
			cw_sha256(pair, (size_t)k, h);
			cw_hex(hex, h, 32);
			if (strcmp(native + 2, hex) == 0)
				return true;
		}
	}
	int n = snprintf(out, len, "the group %s", PQgetvalue(r, i, 14));
	return n > 0 && (size_t)n < len;
}

void xa_dead_letters(struct xcomp *xc, PGconn *c)
{
	char dest[PEER_NAME_MAX + 8];
	snprintf(dest, sizeof(dest), "peer:%s", xc->peer);
	cw_errmsg e;
	PGresult *r = dispatcher_dead_untold(c, "xmpp", dest, &e);
	if (!r) {
		LOG_KV(CW_LOG_WARN, "cannot look for dead letters to tell", "component", xc->domain, "detail", e.msg);
		return;
	}
	for (int i = 0; i < PQntuples(r); i++) {
		const char *type = PQgetvalue(r, i, 3);
		if ((strcmp(type, "message") != 0 && strcmp(type, "edit") != 0) || PQgetisnull(r, i, 4) ||
		    PQgetisnull(r, i, 6))
			continue; /* not a message, or no conversation to say it about */
		char remote[XJ_JID_MAX + 1], text[600];
		if (!PQgetisnull(r, i, 5)) {
			if (!xa_remote_jid(xc, PQgetvalue(r, i, 5), remote, sizeof(remote)))
				continue;
		} else if (strcmp(PQgetvalue(r, i, 10), "group") != 0 || !group_jid(xc, r, i, remote, sizeof(remote)))
			continue;
		dispatcher_dead_text(text, sizeof(text), r, i); /* a dead letter or a drop by a block */
		/* From the component, as a chat message: an error stanza would
		 * have to go to the full JID that sent the message (the server
		 * drops an error to a bare JID, RFC 6121), and that resource may
		 * be long gone. */
		xa_notice(xc, XA_NOW_KEPT, PQgetvalue(r, i, 6), "%s %s: %s", PQgetisnull(r, i, 5) ? "In" : "To", remote,
			  text); /* marked told below */
	}
	PQclear(r);
	/* Marked told once sent: a mark that did not commit leaves them to
	 * be told again (at least once, dispatcher_dead_untold). */
	if (dispatcher_dead_told(c, true, &e))
		LOG_KV(CW_LOG_WARN,
		       "the mark of dead letters told was not confirmed: if it did not commit, they are told again "
		       "at the next look",
		       "component", xc->domain, "detail", e.msg);
}
