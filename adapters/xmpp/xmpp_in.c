/* The XMPP adapter, inbound: a local user's <message/> to a remote user's
 * JID becomes neutral events through the shared pipeline.
 *
 * The stanza is checked on the component's thread (addresses), then
 * serialised into a pipelined store job:
 *   round 0   one statement: the conversation's room (found, or made on
 *             first contact with both identities, their bindings and the
 *             room binding), the neutral ids of the XMPP ids the stanza
 *             refers to, and the sender's current reactions to them;
 *             then the stanza is mapped (xm_to_neutral); first-contact
 *             rows are rolled back when it is refused or carries nothing
 *   rounds    the pipeline's (policy, events, outbox)
 *   last      the message's XMPP ids (id and origin-id), for references;
 *             a leave's membership ended (undone if it was already)
 * and answered with a stanza error when refused (when the COMMIT's answer
 * was lost, by what a look-up finds stored: in_done).  Stanza ids are only
 * unique per sender (and stream), so they are stored as "<room id>/<id>"
 * for each message that has them, and a reference finds the sender's
 * own: another member of a group cannot take them over. */
#include "config.h"
#include "xmpp_int.h"
#include "log.h"
#include "peer/event.h"
#include "peer/pipeline.h"
#include "ratelimit.h"
#include "store.h"

#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#define BARE_MAX 1100
#define ROOM_NATIVE_MAX 500

static bool mimi_local_valid(const char *s)
{
	size_t n = strlen(s);
	if (n < 1 || n > MIMI_LOCAL_MAX || strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
		return false;
	for (const char *p = s; *p; p++) {
		char c = *p;
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
		      c == '_' || c == '~' || c == '+' || c == '='))
			return false;
	}
	return true;
}

bool xa_local_user(struct xmpp *x, const char *jid, char *bare, size_t blen, char *local, size_t llen)
{
	char l[XJ_PART_MAX + 1], d[XJ_PART_MAX + 1], r[XJ_PART_MAX + 1];
	if (!xj_split(jid, l, sizeof(l), d, sizeof(d), r, sizeof(r)) || strcmp(d, x->local_domain) != 0 ||
	    !mimi_local_valid(l))
		return false;
	int n = snprintf(bare, blen, "%s@%s", l, d);
	return n > 0 && (size_t)n < blen && (size_t)snprintf(local, llen, "%s", l) < llen;
}

bool xa_remote_user(struct xcomp *xc, const char *jid, char *id, size_t idlen, char *bare, size_t blen)
{
	char l[XJ_PART_MAX + 1], d[XJ_PART_MAX + 1], r[XJ_PART_MAX + 1];
	if (!xj_split(jid, l, sizeof(l), d, sizeof(d), r, sizeof(r)) || strcmp(d, xc->domain) != 0 || !l[0] ||
	    !xj_unescape_local(l, id, idlen) || !mimi_local_valid(id))
		return false;
	int n = snprintf(bare, blen, "%s@%s", l, d);
	return n > 0 && (size_t)n < blen;
}

/* The escaped localpart is written in place and the domain copied after
 * it: until the sixtieth session it was escaped into a buffer of its own
 * and joined with snprintf's "%s@%s", once for each message the
 * dispatcher's thread made a stanza of (0.8 % of that thread in
 * tests/bench/xmpp, docs/performance.md).  Same JID; out holds "" when it
 * does not fit (before, what snprintf's cut left: no caller reads it). */
bool xa_remote_jid(const struct xcomp *xc, const char *id, char *out, size_t len)
{
	if (!xj_escape_local(id, out, len))
		return false;
	size_t n = strlen(out), d = strlen(xc->domain);
	if (n + 1 + d >= len) {
		out[0] = '\0';
		return false;
	}
	out[n] = '@';
	memcpy(out + n + 1, xc->domain, d + 1);
	return true;
}

/* The native id of the conversation (local user, remote user): readable
 * when short, else a digest (the pipeline takes at most 512 bytes). */
void xa_room_native(const char *local_bare, const char *remote_bare, char *out, size_t len)
{
	if (strlen(local_bare) + 1 + strlen(remote_bare) <= ROOM_NATIVE_MAX) {
		snprintf(out, len, "%s %s", local_bare, remote_bare);
		return;
	}
	char buf[2 * BARE_MAX + 2];
	snprintf(buf, sizeof(buf), "%s %s", local_bare, remote_bare);
	unsigned char h[32];
	cw_sha256(buf, strlen(buf), h);
	char hex[65];
	cw_hex(hex, h, 32);
	snprintf(out, len, "h:%s", hex);
}

struct xin {
	struct xcomp *xc;
	char *text;                      /* the stanza, serialised */
	char local_bare[BARE_MAX], local[MIMI_LOCAL_MAX + 1];
	char remote_id[MIMI_LOCAL_MAX + 1], remote_bare[BARE_MAX];
	char room[ROOM_NATIVE_MAX + 1];
	char uri[MIMI_URI_MAX + 1];      /* the local user's */
	char new_room[40], new_room_uri[MIMI_URI_MAX + 1];
	char sid[XM_ID_MAX + 1], oid[XM_ID_MAX + 1];
	char base[40];                   /* the dedup key of the stanza, this run's (key_now or key_before):
					    in_recv decides it at each run's start, before any use */
	char key_now[40], key_before[40]; /* the dedup keys of this window and of the one before (dedup_keys) */
	bool group;                      /* a groupchat message to a group's room (remote_bare: the room) */
	enum xa_leave leave;             /* not XA_LEAVE_NONE: text is an iq asking to leave the group */
	char msg_id[EVENT_OPAQUE_ID_MAX + 1]; /* its first event's id, once stored */
	bool record_ids;                 /* a message or correction with ids: they are kept */
	bool texty;                      /* its first event is a message or a correction */
	json_t *refs;                    /* the XMPP ids it refers to */
	int64_t ts;
	/* one run's */
	json_t *map;                     /* XMPP id -> msg id */
	json_t *own;                     /* msg id -> true: the sender's own message */
	json_t *rx;                      /* msg id -> {key: reaction msg id} */
	char room_id[24];
	struct submit *b;
	int final_round;                 /* the round after the pipeline: ids kept, drops seen */
	const char *err_type, *err_cond;
	char err_text[300];              /* the error's text for the user ("" : none) */
	bool fresh;                      /* this run's round 0 made the chat's rows (first contact) */
	bool undone;                     /* refused at first contact, or a leave of one who left: undone on purpose */
	bool limited;                    /* refused by the local user's own limit (429) */
	bool stored;                     /* looked up after an unknown outcome: its first event is stored */
	int64_t doubt_us;                /* when its outcome was found unknown (in_done) */
	struct xin *next_waiting;        /* xc->in_waiting's next */
	size_t size;                     /* its bytes while it waits (in_start) */
};

static void xin_free(struct xin *in)
{
	free(in->text);
	json_decref(in->refs);
	json_decref(in->map);
	json_decref(in->own);
	json_decref(in->rx);
	if (in->b)
		submit_free(in->b);
	free(in);
}

static const char *to_msg(void *ctx, const char *id)
{
	json_t *v = json_object_get(((struct xin *)ctx)->map, id);
	return json_is_string(v) ? json_string_value(v) : NULL;
}

static const json_t *reactions(void *ctx, const char *msg)
{
	json_t *v = json_object_get(((struct xin *)ctx)->rx, msg);
	return json_is_object(v) && json_object_size(v) ? v : NULL;
}

static cw_err in_lookup_send(PGconn *c, struct xin *in, cw_errmsg *e)
{
	char *refs = json_dumps(in->refs, JSON_COMPACT);
	if (!refs)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	const struct cw_config *cfg = in->xc->x->cfg;
	char since[24];
	snprintf(since, sizeof(since), "%lld", (long long)(in->ts - cfg->xmpp_dedup_window_s * 1000));
	const char *params[] = { in->uri, cfg->domain ? cfg->domain : "", in->local, in->local_bare, in->xc->peer,
				 in->remote_id, in->remote_bare, in->room, in->new_room, in->new_room_uri, refs,
				 in->key_before, since };
	int ok = PQsendQueryParams(c,
		"WITH rb AS (SELECT room_id FROM room_bindings WHERE network = 'xmpp' AND native_id = $8), "
		"p AS (SELECT id, domain FROM peers WHERE name = $5 AND enabled AND $6 <> '' AND NOT EXISTS (SELECT 1 FROM rb)), "
		/* the local user's row locked as identity_id locks it (one the
		 * retention sweep is deleting is waited for, not found, and
		 * made anew), the remote user's as it is (the sweep forgets
		 * local rows only) */
		"li0 AS (SELECT i.id FROM identities i, p WHERE i.uri = $1 AND i.is_local FOR KEY SHARE OF i), "
		"li1 AS (INSERT INTO identities (uri, domain, localpart, is_local, network) "
		"  SELECT $1, $2, $3, true, 'xmpp' FROM p WHERE NOT EXISTS (SELECT 1 FROM li0) "
		"  ON CONFLICT DO NOTHING RETURNING id), "
		"li AS (SELECT id FROM li0 UNION ALL SELECT id FROM li1), "
		"ri0 AS (SELECT i.id FROM identities i, p WHERE i.uri = 'mimi://' || p.domain || '/u/' || $6 AND NOT i.is_local), "
		"ri1 AS (INSERT INTO identities (uri, domain, localpart, is_local, network, peer_id) "
		"  SELECT 'mimi://' || p.domain || '/u/' || $6, p.domain, $6, false, 'peer:' || $5, p.id FROM p "
		"  WHERE NOT EXISTS (SELECT 1 FROM identities WHERE uri = 'mimi://' || p.domain || '/u/' || $6) "
		"  ON CONFLICT DO NOTHING RETURNING id), "
		"ri AS (SELECT id FROM ri0 UNION ALL SELECT id FROM ri1), "
		/* a direct room of the two made before (by the peer) is bound, not made again */
		"ex AS (SELECT m1.room_id FROM li, ri, room_members m1 JOIN room_members m2 ON m2.room_id = m1.room_id "
		"  JOIN rooms r ON r.id = m1.room_id AND r.kind = 'direct' WHERE m1.identity_id = li.id "
		"  AND m2.identity_id = ri.id AND NOT EXISTS (SELECT 1 FROM room_bindings b WHERE b.room_id = r.id "
		"  AND b.network = 'xmpp') ORDER BY m1.room_id LIMIT 1), "
		"nr AS (INSERT INTO rooms (public_id, uri, hub_domain, kind) SELECT $9, $10, $2, 'direct' FROM li, ri "
		"  WHERE NOT EXISTS (SELECT 1 FROM ex) RETURNING id), "
		"mb AS (INSERT INTO room_members (room_id, identity_id, membership) SELECT nr.id, x.id, 'joined' "
		"  FROM nr, (SELECT id FROM li UNION ALL SELECT id FROM ri) x ON CONFLICT DO NOTHING), "
		"nb AS (INSERT INTO room_bindings (room_id, network, native_id, local_identity_id, remote_identity_id) "
		"  SELECT coalesce((SELECT room_id FROM ex), (SELECT id FROM nr)), 'xmpp', $8, li.id, ri.id FROM li, ri "
		"  ON CONFLICT DO NOTHING RETURNING room_id), "
		"lb AS (INSERT INTO identity_bindings (identity_id, network, native_id) SELECT id, 'xmpp', $4 FROM li "
		"  ON CONFLICT DO NOTHING), "
		"rib AS (INSERT INTO identity_bindings (identity_id, network, native_id) SELECT id, 'xmpp', $7 FROM ri "
		"  ON CONFLICT DO NOTHING), "
		"room AS (SELECT room_id FROM rb UNION ALL SELECT room_id FROM nb LIMIT 1), "
		/* a neutral id (a room's stanza-id, the id of what the gateway
		 * sent) is its own event's; else the sender's own XMPP id, its
		 * newest message with it (ids are only unique per sender, and
		 * per stream: until the twenty-third session any member's id
		 * came first, so a member could take another's message over) */
		"refs AS (SELECT x.id AS nid, (SELECT CASE WHEN e.type = 'edit' AND e.replaces_id IS NOT NULL "
		"  THEN (SELECT f.public_id FROM events f WHERE f.id = e.replaces_id) ELSE e.public_id END FROM events e "
		"  WHERE e.id = coalesce((SELECT f.id FROM events f, room WHERE f.public_id = x.id "
		"  AND f.room_id = room.room_id), (SELECT n.event_id FROM event_native_ids n JOIN events w "
		"  ON w.id = n.event_id, room WHERE n.network = 'xmpp' AND n.kind IN ('id', 'origin_id') "
		"  AND n.native_id = room.room_id || '/' || x.id AND w.sender_id = (SELECT id FROM identities "
		"  WHERE uri = $1) ORDER BY n.event_id DESC LIMIT 1))) AS msg "
		"  FROM jsonb_array_elements_text($11::jsonb) AS x(id)) "
		"SELECT 'room', (SELECT room_id::text FROM room), (SELECT 't' FROM p), (SELECT 't'::text FROM nb) "
		/* the 4th column: the message is the sender's own (no receipt is hers to give) */
		"UNION ALL SELECT 'ref', nid, msg, (SELECT 't'::text FROM events m WHERE m.public_id = refs.msg "
		"  AND m.sender_id = (SELECT id FROM identities WHERE uri = $1)) FROM refs WHERE msg IS NOT NULL "
		"UNION ALL SELECT 'rx', t.public_id, r.content->'content'->'parts'->0->>'body', r.public_id FROM refs "
		"  JOIN events t ON t.public_id = refs.msg JOIN events r ON r.in_reply_to_id = t.id AND r.type = 'reaction' "
		"  AND r.sender_id = (SELECT id FROM identities WHERE uri = $1) "
		"  AND NOT EXISTS (SELECT 1 FROM events d WHERE d.type = 'delete' AND d.replaces_id = r.id) "
		/* the same stanza taken in the window before this one's, and
		 * less than xmpp.dedup_window_s ago (dedup_keys) */
		"UNION ALL SELECT 'dup', NULL, (SELECT 't'::text FROM events WHERE origin_network = 'xmpp' "
		"  AND origin_native_id = $12 AND ts > $13::bigint), NULL",
		13, NULL, params, NULL, NULL, 0);
	free(refs);
	return ok ? CW_OK : cw_fail(e, CW_EUNAVAIL, "cannot send: %s", PQerrorMessage(c));
}

static void refuse(struct xin *in, const char *type, const char *cond)
{
	in->err_type = type;
	in->err_cond = cond;
	in->err_text[0] = '\0';
}

/* "Not delivered: <why>." for an error's text; why may end with its own
 * full stop (the neutral model's details do), which is not doubled. */
static void not_delivered(char *out, size_t len, const char *why)
{
	size_t n = strlen(why);
	while (n && why[n - 1] == '.')
		n--;
	snprintf(out, len, "Not delivered: %.*s.", (int)(n < 280 ? n : 280), why);
}

/* A stanza refused (or carrying nothing) on first contact stores nothing:
 * failing the job rolls its writes back, the identities and the chat's
 * rows round 0 made with them (until the eighteenth session they stayed).
 * in_answer tells this failure from the database's. */
static cw_err undo_first_contact(struct xin *in, cw_errmsg *e)
{
	in->undone = true;
	return cw_fail(e, CW_EINVAL, "refused on first contact: nothing stored");
}

/* The stanza's events into the pipeline's items; false (with err set, or
 * nothing to do) when there are none. */
static cw_err in_convert(struct xin *in, bool *any, cw_errmsg *e)
{
	*any = false;
	json_t *events = NULL;
	char why[200] = "";
	enum xm_in_result res = XM_IN_OK;
	if (in->leave) {
		/* the user's leaving, for the group's other members */
		events = json_pack("[{s:s, s:I, s:{s:s, s:s}}]", "type", "membership", "ts", (json_int_t)in->ts,
				   "content", "membership", "leave", "target", in->uri);
	} else {
		xmpp_ctx_t *ctx = xa_thread_ctx(in->xc->x);
		xmpp_stanza_t *st = ctx ? xmpp_stanza_new_from_string(ctx, in->text) : NULL;
		if (!st)
			return cw_fail(e, CW_ENOMEM, "cannot parse a stanza again");
		struct xm_in_lookup l = { to_msg, reactions, in };
		res = xm_to_neutral(st, &l, in->ts, &events, why, sizeof(why));
		xmpp_stanza_release(st);
	}
	if (!events && res == XM_IN_OK)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	if (res == XM_IN_INVALID) {
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp message refused", "component", in->xc->domain, "detail", why);
		refuse(in, "modify", "bad-request");
		if (why[0]) /* what is wrong with her own stanza: until the thirty-seventh session no text */
			not_delivered(in->err_text, sizeof(in->err_text), why);
		return CW_OK;
	}
	if (res == XM_IN_TOO_LONG) {
		/* content the neutral model refuses: not-acceptable, saying
		 * which limit (docs/xmpp.md "Errors") */
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp message not representable", "component", in->xc->domain, "detail",
			       why);
		refuse(in, "modify", "not-acceptable");
		not_delivered(in->err_text, sizeof(in->err_text), why);
		return CW_OK;
	}
	if (res != XM_IN_OK)
		return CW_OK;
	/* A receipt or marker is for a message its sender was sent: one that
	 * names her own message (by her own XMPP id, or its neutral id) would
	 * tell the others she received or read what she wrote, and is left
	 * out; until the thirty-sixth session it reached the peer. */
	for (size_t k = json_array_size(events); k-- > 0;) {
		json_t *ev = json_array_get(events, k);
		const char *t = json_string_value(json_object_get(ev, "type"));
		const char *to = json_string_value(json_object_get(json_object_get(ev, "content"), "in_reply_to"));
		if (t && strcmp(t, "receipt") == 0 && to && json_object_get(in->own, to))
			json_array_remove(events, k);
	}
	if (!json_array_size(events)) {
		json_decref(events);
		return CW_OK; /* nothing to carry, as for a receipt of a message not known */
	}
	size_t n = json_array_size(events);
	in->b = submit_new(n);
	if (!in->b) {
		json_decref(events);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	submit_setup(in->b, in->xc->x->app, SUBMIT_ROOM_BY_NATIVE);
	struct event_limits lim = event_limits_default();
	size_t i;
	json_t *ev;
	json_array_foreach(events, i, ev) {
		json_object_set_new(ev, "sender", json_string(in->uri));
		struct event pev;
		struct event_error err;
		cw_err rc = event_from_json(ev, &lim, 0, &pev, &err);
		if (rc == CW_ENOMEM) {
			json_decref(events);
			return cw_fail(e, CW_ENOMEM, "out of memory");
		}
		if (rc) {
			LOG_KV_LIMITED(CW_LOG_INFO, "xmpp message not representable", "component", in->xc->domain, "detail",
			       err.detail);
			refuse(in, "modify", "not-acceptable");
			not_delivered(in->err_text, sizeof(in->err_text), err.detail);
			json_decref(events);
			return CW_OK;
		}
		char native[48];
		snprintf(native, sizeof(native), i ? "%s#%zu" : "%s", in->base, i);
		bool ok = submit_put_local(in->b, i, in->xc->x->app, "xmpp", in->room, native, in->uri, &pev, NULL);
		event_free(&pev);
		if (!ok) {
			json_decref(events);
			return cw_fail(e, CW_ENOMEM, "out of memory");
		}
	}
	/* The ids of a message or correction are what later stanzas refer to. */
	const char *t0 = json_string_value(json_object_get(json_array_get(events, 0), "type"));
	in->texty = t0 && (strcmp(t0, "message") == 0 || strcmp(t0, "edit") == 0);
	in->record_ids = in->texty && (in->sid[0] || in->oid[0]);
	in->final_round = -1;
	json_decref(events);
	*any = n > 0;
	return CW_OK;
}

static cw_err in_send(PGconn *c, void *arg, int round, cw_errmsg *e)
{
	struct xin *in = arg;
	if (round == 0)
		return in_lookup_send(c, in, e);
	if (round == in->final_round) {
		/* The stanza's ids (what later stanzas refer to), and whether the
		 * policy dropped the event for every recipient: then the sender
		 * learns that it was not delivered, not why.  A user who leaves
		 * a group is no longer its member, whoever heard of it (but not
		 * when the event was refused: a limit, the database away). */
		const char *params[] = { in->base, in->room_id, in->sid, in->oid, in->record_ids ? "t" : "f",
					 in->leave && !in->err_cond ? "t" : "f", in->uri };
		return PQsendQueryParams(c,
			"WITH ins AS (INSERT INTO event_native_ids (event_id, network, kind, native_id) "
			" SELECT e.id, 'xmpp', k.kind, $2 || '/' || k.nid FROM events e, "
			" (VALUES ('id', $3), ('origin_id', $4)) AS k(kind, nid) WHERE $5::boolean "
			" AND e.origin_network = 'xmpp' AND e.origin_native_id = $1 AND k.nid <> '' "
			" ON CONFLICT DO NOTHING RETURNING 1), "
			"lv AS (UPDATE room_members SET membership = 'left', updated_at = now() WHERE $6::boolean "
			" AND room_id = $2::bigint AND identity_id = (SELECT id FROM identities WHERE uri = $7) "
			" AND membership = 'joined' RETURNING 1) "
			"SELECT count(*) > 0 AND count(*) FILTER (WHERE o.state <> 'dropped') = 0, "
			" (SELECT public_id FROM events WHERE origin_network = 'xmpp' AND origin_native_id = $1), "
			" (SELECT count(*) FROM lv) FROM events e "
			" JOIN outbox o ON o.event_id = e.id WHERE e.origin_network = 'xmpp' AND e.origin_native_id = $1",
			7, NULL, params, NULL, NULL, 0)
			       ? CW_OK
			       : cw_fail(e, CW_EUNAVAIL, "cannot send: %s", PQerrorMessage(c));
	}
	return submit_send(c, in->b, round - 1, e);
}

static cw_err in_recv(PGconn *c, void *arg, int round, bool *more, cw_errmsg *e)
{
	struct xin *in = arg;
	*more = false;
	if (round == 0) {
		PGresult *r;
		cw_err rc = store_pipe_result(c, PGRES_TUPLES_OK, &r, e);
		if (rc)
			return rc;
		/* a rerun starts again */
		json_object_clear(in->map);
		json_object_clear(in->own);
		json_object_clear(in->rx);
		if (in->b) {
			submit_free(in->b);
			in->b = NULL;
		}
		in->err_type = in->err_cond = NULL;
		in->final_round = 0;
		in->room_id[0] = '\0';
		in->fresh = in->undone = in->limited = false;
		snprintf(in->base, sizeof(in->base), "%s", in->key_now);
		for (int i = 0; i < PQntuples(r); i++) {
			const char *kind = PQgetvalue(r, i, 0), *k = PQgetvalue(r, i, 1);
			if (strcmp(kind, "room") == 0 && !PQgetisnull(r, i, 1)) {
				snprintf(in->room_id, sizeof(in->room_id), "%s", k);
				in->fresh = !PQgetisnull(r, i, 3);
			}
			else if (strcmp(kind, "ref") == 0) {
				json_object_set_new(in->map, k, json_string(PQgetvalue(r, i, 2)));
				if (!PQgetisnull(r, i, 3))
					json_object_set_new(in->own, PQgetvalue(r, i, 2), json_true());
			}
			else if (strcmp(kind, "dup") == 0 && !PQgetisnull(r, i, 2))
				snprintf(in->base, sizeof(in->base), "%s", in->key_before);
			else if (strcmp(kind, "rx") == 0 && !PQgetisnull(r, i, 2)) {
				json_t *set = json_object_get(in->rx, k);
				if (!set)
					json_object_set_new(in->rx, k, set = json_object());
				json_object_set_new(set, PQgetvalue(r, i, 2), json_string(PQgetvalue(r, i, 3)));
			}
		}
		bool peer_known = false;
		for (int i = 0; i < PQntuples(r) && !peer_known; i++)
			peer_known = strcmp(PQgetvalue(r, i, 0), "room") == 0 && !PQgetisnull(r, i, 2);
		PQclear(r);
		if (!in->room_id[0] && peer_known)
			/* The chat's binding was made by a concurrent transaction (the
			 * first delivery to this user) after this statement's
			 * snapshot: ON CONFLICT left it out here.  Run again: the
			 * rerun finds it (the store's retry, as for a deadlock). */
			return cw_fail(e, CW_ERETRY, "the chat was bound by a concurrent delivery");
		if (!in->room_id[0]) {
			/* the peer is unknown or disabled: as for an unknown account */
			refuse(in, "cancel", "service-unavailable");
			return CW_OK;
		}
		bool any;
		if ((rc = in_convert(in, &any, e)))
			return rc;
		if (in->fresh && (!any || in->err_cond))
			return undo_first_contact(in, e);
		*more = any && !in->err_cond;
		return CW_OK;
	}
	if (round == in->final_round) {
		PGresult *r;
		cw_err rc = store_pipe_result(c, PGRES_TUPLES_OK, &r, e);
		if (!rc && PQntuples(r) == 1 && PQgetvalue(r, 0, 0)[0] == 't' && !in->err_cond && !in->leave)
			refuse(in, "cancel", "service-unavailable");
		if (!rc && PQntuples(r) == 1 && !PQgetisnull(r, 0, 1))
			snprintf(in->msg_id, sizeof(in->msg_id), "%s", PQgetvalue(r, 0, 1));
		/* The membership ends in the statement that checks it (its row
		 * locked): a second request to leave, written with the first
		 * (one batch, or one waiting for the other's lock), finds it
		 * ended and is undone, answered as one made after it is; until
		 * the twenty-third session both passed the pipeline's check of
		 * membership and two leave events were stored. */
		bool gone = !rc && in->leave && !in->err_cond && PQntuples(r) == 1 &&
			    strcmp(PQgetvalue(r, 0, 2), "0") == 0;
		PQclear(r);
		if (gone) {
			refuse(in, "cancel", "service-unavailable");
			in->undone = true;
			return cw_fail(e, CW_EINVAL, "no longer a member: the leave is not stored");
		}
		return rc;
	}
	cw_err rc = submit_recv(c, in->b, round - 1, more, e);
	if (rc || *more)
		return rc;
	bool taken = true; /* no event refused outright (one the policy drops is stored) */
	for (size_t i = 0; i < submit_count(in->b); i++) {
		const char *code, *detail;
		int st = submit_result(in->b, i, &code, &detail);
		const char *denied = submit_denied(in->b, i);
		if (denied && i == 0 && in->texty) {
			/* The local user's message reaches none of its recipients
			 * (stored as dropped): the error stays the uniform one
			 * (below), with why in its text where she may know it
			 * (submit_denied_text: this server's rules, her own
			 * decisions and limits, the recipient's block of her). */
			refuse(in, "cancel", "service-unavailable");
			const char *why = submit_denied_text(in->b, i);
			if (why)
				not_delivered(in->err_text, sizeof(in->err_text), why);
			continue;
		}
		/* The key is the stanza's digest (dedup_key): a conflict is the
		 * same stanza again, stored before (only its time, read on
		 * arrival, differs), or the same stanza being written at the
		 * same time (in_progress, since the thirtieth session); until
		 * the twenty-third session a resend was answered with
		 * bad-request. */
		if (st == 202 || st == 0 ||
		    (st == 409 && code && (strcmp(code, "conflict") == 0 || strcmp(code, "in_progress") == 0)))
			continue;
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp message not taken", "component", in->xc->domain, "code", code ? code : "",
		       "detail", detail ? detail : "");
		/* RFC 6120: a denial looks like an unknown account; limits are
		 * resource-constraint. */
		if (st == 429) {
			refuse(in, "wait", "resource-constraint");
			in->limited = true;
			/* the local user's own outbound limit: which, and when
			 * to write again (docs/xmpp.md) */
			if (in->texty && detail && *detail)
				not_delivered(in->err_text, sizeof(in->err_text), detail);
		} else if (st == 403 || st == 404)
			refuse(in, "cancel", "service-unavailable");
		else if (st == 503)
			refuse(in, "wait", "internal-server-error");
		else {
			/* what the pipeline found wrong with the content (an edit
			 * of a message not hers, of one deleted…): said, as the
			 * peer API's detail says it; until the thirty-seventh
			 * session a bare bad-request.  A denial or an unknown
			 * room above says nothing of anyone. */
			refuse(in, "modify", "bad-request");
			if (detail && *detail)
				not_delivered(in->err_text, sizeof(in->err_text), detail);
		}
		taken = false;
		break;
	}
	if (!taken && in->fresh)
		return undo_first_contact(in, e);
	if (in->final_round == -1) {
		in->final_round = round + 1;
		*more = true;
	}
	return CW_OK;
}

static const struct store_pipe_ops in_ops = { in_send, in_recv, NULL }; /* local senders: no user locks */

static void in_done(void *arg, cw_err rc, const cw_errmsg *e);

/* Under xc->in_mu: the stanzas of room being stored, one more or less. */
static json_int_t in_flight_add(struct xcomp *xc, const char *room, json_int_t d)
{
	json_int_t n = json_integer_value(json_object_get(xc->in_flight, room)) + d;
	if (n > 0)
		json_object_set_new(xc->in_flight, room, json_integer(n));
	else
		json_object_del(xc->in_flight, room);
	return n;
}

static void in_finished(struct xcomp *xc, const char *room);
static void in_answer(struct xin *in, cw_err rc, const cw_errmsg *e);

/* What may wait (xcomp.in_waiting) at once: stanzas of one local user,
 * and of all the component's users, by count and by bytes (each its text
 * and its struct xin; in xmpp.max_stanza_bytes).  A waiting stanza is
 * handed to the store only when the one before it in its conversation is
 * stored, one at a time, and nothing bounded the list until the
 * forty-third session: one user writing corrections or reactions faster
 * than they were stored (each waits for the one before it) grew the
 * daemon's memory without end (a review's finding: 90 MB of stanzas
 * took 325 MB, and held it for minutes). */
#define WAITING_USER_MAX 256
#define WAITING_USER_CAPS 16
#define WAITING_MAX 4096
#define WAITING_CAPS 64

enum in_start_result {
	IN_STARTED,      /* handed to the store, or waiting */
	IN_REFUSED,      /* the store refused it (in is the caller's still) */
	IN_TOO_MANY,     /* too many wait already (WAITING_*; in is the caller's still) */
};

/* Hands in to the store now, or once the earlier stanzas of its
 * conversation are stored (xcomp.in_waiting): when it names another
 * message, or one before it waits. */
static enum in_start_result in_start(struct xin *in)
{
	struct xcomp *xc = in->xc;
	size_t cap = (size_t)xc->x->cfg->xmpp_max_stanza_bytes;
	in->size = sizeof(*in) + (in->text ? strlen(in->text) + 1 : 0);
	pthread_mutex_lock(&xc->in_mu);
	if (!xc->in_flight)
		xc->in_flight = json_object();
	bool behind = false;
	size_t n = 0, bytes = 0, user_n = 0, user_bytes = 0;
	struct xin **tail = &xc->in_waiting;
	for (; *tail; tail = &(*tail)->next_waiting) {
		behind |= strcmp((*tail)->room, in->room) == 0;
		n++;
		bytes += (*tail)->size;
		if (strcmp((*tail)->local_bare, in->local_bare) == 0) {
			user_n++;
			user_bytes += (*tail)->size;
		}
	}
	bool wait = behind || (json_array_size(in->refs) && json_object_get(xc->in_flight, in->room));
	if (wait && (user_n >= WAITING_USER_MAX || user_bytes + in->size > WAITING_USER_CAPS * cap ||
		     n >= WAITING_MAX || bytes + in->size > WAITING_CAPS * cap)) {
		pthread_mutex_unlock(&xc->in_mu);
		return IN_TOO_MANY;
	}
	if (wait)
		*tail = in;
	else
		in_flight_add(xc, in->room, 1);
	pthread_mutex_unlock(&xc->in_mu);
	if (wait || store_write_pipe(xc->x->app->store, &in_ops, in_done, in) == CW_OK)
		return IN_STARTED;
	pthread_mutex_lock(&xc->in_mu);
	in_flight_add(xc, in->room, -1);
	pthread_mutex_unlock(&xc->in_mu);
	return IN_REFUSED;
}

size_t xa_in_waiting(struct xcomp *xc)
{
	size_t n = 0;
	pthread_mutex_lock(&xc->in_mu);
	for (struct xin *w = xc->in_waiting; w; w = w->next_waiting)
		n++;
	pthread_mutex_unlock(&xc->in_mu);
	return n;
}

/* A stanza of room is stored (or failed): the next waiting one of that
 * conversation goes when none is being stored any more. */
static void in_finished(struct xcomp *xc, const char *room)
{
	for (;;) {
		pthread_mutex_lock(&xc->in_mu);
		struct xin *next = NULL;
		if (in_flight_add(xc, room, -1) <= 0) {
			for (struct xin **p = &xc->in_waiting; *p; p = &(*p)->next_waiting)
				if (strcmp((*p)->room, room) == 0) {
					next = *p;
					*p = next->next_waiting;
					next->next_waiting = NULL;
					in_flight_add(xc, room, 1);
					break;
				}
		}
		pthread_mutex_unlock(&xc->in_mu);
		if (!next || store_write_pipe(xc->x->app->store, &in_ops, in_done, next) == CW_OK)
			return;
		/* Refused by the store: answered, and the one after it goes,
		 * in this loop (through in_done it was a recursion as deep as
		 * the conversation's queue). */
		in_answer(next, CW_EUNAVAIL, NULL);
		xin_free(next);
	}
}

static void answer(struct xcomp *xc, const char *text, const char *type, const char *cond, const char *why)
{
	xmpp_ctx_t *ctx = xa_thread_ctx(xc->x);
	xmpp_stanza_t *st = ctx ? xmpp_stanza_new_from_string(ctx, text) : NULL;
	if (!st)
		return;
	atomic_fetch_add(&xc->errors_out, 1);
	xa_answer(xc, xa_error_reply(st, type, cond, why && *why ? why : NULL));
	xmpp_stanza_release(st);
}

/* What the user's client is told of in, and what follows its being taken. */
static void in_answer(struct xin *in, cw_err rc, const cw_errmsg *e)
{
	if (rc && !(rc == CW_EINVAL && in->undone)) {
		LOG_KV(CW_LOG_WARN, "xmpp message not stored", "component", in->xc->domain, "detail", e ? e->msg : "");
		answer(in->xc, in->text, "wait", "internal-server-error", NULL);
	} else if (rc && !in->err_cond) {
		/* nothing to carry, nothing stored: no answer, as for a known chat */
	} else if (in->err_cond) {
		answer(in->xc, in->text, in->err_type, in->err_cond, in->err_text);
	} else if (in->leave) {
		xa_muc_left(in->xc, in->text, in->leave, false);
	} else if (in->group) {
		/* A room sends every groupchat back to its sender's resources
		 * (XEP-0045 §7.4): a message is the client's sign that it is in,
		 * with the room's id; reactions, retractions, markers and chat
		 * states too, or the user's other clients would not follow. */
		xa_muc_reflect(in->xc, in->text, in->remote_bare, in->local_bare, in->msg_id[0] ? in->msg_id : NULL);
	}
}

/* Whether the write's first event is stored, by the key it was written
 * with (its message's id for a groupchat's reflection). */
static cw_err in_stored_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	struct xin *in = arg;
	const char *params[] = { in->base };
	PGresult *r = PQexecParams(c,
				   "SELECT public_id FROM events WHERE origin_network = 'xmpp' AND origin_native_id = $1",
				   1, NULL, params, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	in->stored = PQntuples(r) == 1;
	if (in->stored)
		snprintf(in->msg_id, sizeof(in->msg_id), "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	return CW_OK;
}

/* How long a stanza whose outcome is unknown waits for the database to
 * say whether it is stored: its look-up is tried again past each try's
 * deadline (`database.request_timeout_ms`) until then.  An error answered
 * while the database is away may be false (the stanza stored and on its
 * way: a resend reaches the peer twice); when the lock's connection
 * went with the database, so did the stream, and the answer waits for
 * the next one anyway.  Until the
 * fifty-first session the look-up gave up at the one deadline, shorter
 * than a PostgreSQL restart with its crash recovery on a loaded machine
 * (test_xmpp_messages_sent_as_postgresql_stops_are_stored_or_refused_never_lost
 * failed so: a message stored and refused). */
#define IN_DOUBT_MAX_US (300 * 1000000LL)

/* The look-up's answer: stored, the stanza is answered as its last run
 * (the one committed) had it, its refusal or reflection included;
 * otherwise, or when the database stayed away past IN_DOUBT_MAX_US (or
 * the daemon stops), as a write that failed. */
static void in_looked_up(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct xin *in = arg;
	if ((rc == CW_EUNAVAIL || rc == CW_ETIMEDOUT) && cw_now_us() - in->doubt_us < IN_DOUBT_MAX_US &&
	    store_read_patient(in->xc->x->app->store, in_stored_fn, in_looked_up, in) == CW_OK)
		return;
	if (!rc && in->stored) {
		LOG_KV(CW_LOG_INFO, "xmpp message stored: its commit's answer was lost", "component", in->xc->domain,
		       "id", in->msg_id);
		in_answer(in, CW_OK, NULL);
	} else {
		cw_errmsg why;
		snprintf(why.msg, sizeof(why.msg), "%s",
			 rc ? (e ? e->msg : "the database is unavailable") : "its commit's answer was lost: not stored");
		in_answer(in, CW_EUNAVAIL, &why);
	}
	xin_free(in);
}

/* A first contact refused by the local user's limit was undone whole, its
 * policy.limit record with it: written now, on its own (the stanza is
 * answered once it is). */
static cw_err in_limits_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	return submit_write_limits(c, ((struct xin *)arg)->b, e);
}

static void in_limits_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct xin *in = arg;
	if (rc)
		LOG_KV(CW_LOG_WARN, "xmpp limit not audited", "component", in->xc->domain, "detail", e ? e->msg : "");
	in_answer(in, CW_EINVAL, NULL);
	xin_free(in);
}

static void in_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct xin *in = arg;
	struct xcomp *xc = in->xc;
	char room[ROOM_NATIVE_MAX + 1];
	snprintf(room, sizeof(room), "%s", in->room);
	/* The COMMIT's answer lost with the connection: the stanza may well
	 * be stored and delivered, and its sender has no other way to learn
	 * it (a resend gets a new id, and the peer would get it twice): what
	 * is stored decides the answer, once the database answers.  Until
	 * the twenty-third session it was internal-server-error. */
	bool unknown = rc == CW_EUNAVAIL && e && strcmp(e->msg, STORE_OUTCOME_UNKNOWN) == 0;
	if (rc == CW_EINVAL && in->undone && in->limited && in->b &&
	    store_write(xc->x->app->store, in_limits_fn, in_limits_done, in) == CW_OK) {
		in_finished(xc, room);
		return;
	}
	if (unknown)
		in->doubt_us = cw_now_us();
	if (!unknown || store_read_patient(xc->x->app->store, in_stored_fn, in_looked_up, in) != CW_OK) {
		in_answer(in, rc, e);
		xin_free(in);
	}
	in_finished(xc, room);
}

static const char *no_msg(void *ctx, const char *id)
{
	(void)ctx;
	(void)id;
	return NULL;
}

static const json_t *no_reactions(void *ctx, const char *msg)
{
	(void)ctx;
	(void)msg;
	return NULL;
}

/* Whether a message of type type to `to` is to the component itself: its
 * bare JID, or a full JID of it (it has no resources) for a `chat` or a
 * `normal` message (no type, or one not understood, is `normal`: RFC 6121
 * §5.2.2).  For a user's full JID whose resource is gone RFC 6121
 * §8.5.3.2.1 takes a chat as one to the bare JID and lets a server
 * refuse the others; the component's JID is a domain, whose resources
 * are its own to define (RFC 6120 §10.5.2), and it does what its users'
 * server does (Prosody, as RFC 3921 §11.1 had it): a `normal` message is
 * taken as a chat is, so that what answers at the bare JID answers
 * there.  A `groupchat` or a `headline` there is refused, as a JID that
 * names nobody (§8.5.3.2.1: ignored or refused).  An iq or a subscribe
 * to a full JID of it is the component's too (on_iq, xa_presence).  Until
 * the thirty-seventh session a chat there was refused while the bare JID
 * answered, and until the thirty-eighth a `normal` one still was. */
static bool to_gateway(const struct xcomp *xc, const char *to, const char *type)
{
	size_t n = strlen(xc->domain);
	if (strncmp(to, xc->domain, n) != 0 || (to[n] != '\0' && to[n] != '/'))
		return false;
	return to[n] == '\0' || !type || (strcmp(type, "groupchat") != 0 && strcmp(type, "headline") != 0);
}

/* How often the component explains itself to one user: at most once in
 * this many milliseconds.  Every message with a body to its own JID was
 * answered until the fortieth session, so a client that answers every
 * message (an away auto-reply, a bot) and the component wrote to each
 * other without end (a review's finding); now the loop stops at the
 * first answer, and a user who writes again soon has had the text. */
#define EXPLAIN_PERIOD_MS 600000

/* The component itself was written to: it only explains itself, at most
 * once in EXPLAIN_PERIOD_MS to a user (local: her local part; a bucket of
 * the process's rate-limit table per component and user). */
static void to_component(struct xcomp *xc, xmpp_stanza_t *st, const char *local)
{
	if (!xmpp_stanza_get_child_by_name(st, "body"))
		return;
	struct ratelimit *rl = xc->x->app->limits;
	char key[XJ_PART_MAX + MIMI_LOCAL_MAX + 8];
	snprintf(key, sizeof(key), "xex:%s:%s", xc->domain, local);
	if (rl && ratelimit_take(rl, key, 1, EXPLAIN_PERIOD_MS, cw_wall_ms(), NULL) > 0)
		return;
	xa_notice(xc, XA_NOW, xmpp_stanza_get_from(st),
		  "This is the Causeway gateway to %s. Write to a contact as <their id>@%s. Your consent list "
		  "is in this service's commands (ad-hoc commands: list, accept, block, opt-in, opt-out, "
		  "report).",
		  xc->peer, xc->domain);
}

/* An error answer from the stream's own thread, at once. */
static void refuse_now(struct xcomp *xc, xmpp_stanza_t *st, const char *type, const char *cond)
{
	atomic_fetch_add(&xc->errors_out, 1);
	xa_answer_now(xc, xa_error_reply(st, type, cond, NULL));
}

/* A stanza past the bounds of what may wait to be stored (in_start):
 * refused as limits are, resource-constraint (wait), saying so; nothing
 * stored.  now: on the stream's thread (written at once, as refuse_now
 * does); else queued (xa_in_leave runs on a store's thread). */
static void too_many_waiting(struct xcomp *xc, xmpp_stanza_t *st, const char *user, bool now)
{
	LOG_KV_LIMITED(CW_LOG_WARN, "xmpp: a stanza refused: too many wait to be stored", "component", xc->domain,
		       "user", user);
	atomic_fetch_add(&xc->errors_out, 1);
	xmpp_stanza_t *r = xa_error_reply(st, "wait", "resource-constraint",
					  "Not delivered: too many messages wait to be stored before it. Send it again "
					  "in a moment.");
	if (now)
		xa_answer_now(xc, r);
	else
		xa_answer(xc, r);
}

/* The digest of (conversation, id, content): ids are unique only within
 * a stream (RFC 6120 §8.1.3), so the same id with other content is a new
 * message (until the twenty-third session it was refused with
 * bad-request and lost), while a resend of the same stanza, from another
 * resource or stamped with when it was first sent (XEP-0203), is the
 * same.  False: out of memory. */
static bool dedup_key(struct xcomp *xc, xmpp_stanza_t *st, const char *room, const char *id, unsigned char h[32])
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned int len;
	bool ok = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) && EVP_DigestUpdate(md, room, strlen(room) + 1) &&
		  EVP_DigestUpdate(md, id, strlen(id) + 1);
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); ok && c; c = xmpp_stanza_get_next(c)) {
		const char *name = xmpp_stanza_get_name(c), *ns = xmpp_stanza_get_ns(c);
		if (name && ns && strcmp(name, "delay") == 0 && strcmp(ns, "urn:xmpp:delay") == 0)
			continue;
		char *text = NULL;
		size_t n = 0;
		ok = xmpp_stanza_to_text(c, &text, &n) == XMPP_EOK && text && EVP_DigestUpdate(md, text, n + 1);
		if (text)
			xmpp_free(xc->ctx, text);
	}
	ok = ok && EVP_DigestFinal_ex(md, h, &len);
	EVP_MD_CTX_free(md);
	return ok;
}

/* "x" and the hex of the first 16 bytes of the digest h and, when
 * window >= 0, of the number of that window of xmpp.dedup_window_s. */
static void key_of(const unsigned char h[32], long long window, char *out, size_t len)
{
	unsigned char k[32];
	char buf[32 + 24], hex[33];
	memcpy(buf, h, 32);
	int n = window >= 0 ? snprintf(buf + 32, sizeof(buf) - 32, "%lld", window) : 0;
	if (n > 0)
		cw_sha256(buf, 32 + (size_t)n, k);
	cw_hex(hex, n > 0 ? k : h, 16);
	snprintf(out, len, "x%s", hex);
}

/* The keys in->base is one of: the same stanza twice (a client's
 * resend) is stored once.  A stanza id is unique only within a stream
 * (RFC 6120 §8.1.3): a client that counts its ids from 1 in each session
 * says "ok" as id 1 again in a later one, a new message.  So the key of
 * a stanza keyed by its id holds the number of the window of
 * xmpp.dedup_window_s it came in (key_now); one of the window before
 * (key_before) taken less than the window's length ago makes it a resend
 * too (in_recv decides, in its run's first statement, so the look-up
 * after a lost COMMIT (in_stored_fn) finds the key that run wrote).  An
 * origin-id (XEP-0359) is unique for good: its key has no time, and a
 * copy a client sends again hours later (its stream not resumed) is
 * still taken for the resend it is.  Until the thirty-seventh session the key had no time, and the
 * second "ok" was dropped as a resend, silently.  (Two copies sent at the
 * same instant on either side of a window's edge would both be taken;
 * copies sent that close are a client's bug, not a resend.) */
static void dedup_keys(struct xin *in, xmpp_stanza_t *st, const char *key)
{
	unsigned char h[32];
	if (!key[0] || !dedup_key(in->xc, st, in->room, key, h)) {
		cw_random(h, 16);
		key_of(h, -1, in->key_now, sizeof(in->key_now));
		snprintf(in->key_before, sizeof(in->key_before), "%s", in->key_now);
		return;
	}
	long long w = in->xc->x->cfg->xmpp_dedup_window_s * 1000LL;
	if (in->oid[0] || w <= 0) {
		key_of(h, -1, in->key_now, sizeof(in->key_now));
		snprintf(in->key_before, sizeof(in->key_before), "%s", in->key_now);
		return;
	}
	key_of(h, in->ts / w, in->key_now, sizeof(in->key_now));
	key_of(h, in->ts / w - 1, in->key_before, sizeof(in->key_before));
}

void xa_in_message(struct xcomp *xc, xmpp_stanza_t *st)
{
	struct xmpp *x = xc->x;
	const char *type = xmpp_stanza_get_type(st), *from = xmpp_stanza_get_from(st), *to = xmpp_stanza_get_to(st);
	if (type && strcmp(type, "error") == 0) {
		/* A bounce of ours (an unknown or blocking account): the row was
		 * written, and the server says no more. */
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp: a stanza of ours bounced", "component", xc->domain, "to", from,
		       "id", xmpp_stanza_get_id(st));
		xa_muc_bounced(xc, st);
		return;
	}
	struct xin *in = calloc(1, sizeof(*in));
	if (!in)
		return;
	in->xc = xc;
	if (!xa_local_user(x, from, in->local_bare, sizeof(in->local_bare), in->local, sizeof(in->local))) {
		free(in);
		/* not this provider's user (or a name the gateway cannot carry) */
		refuse_now(xc, st, "cancel", "service-unavailable");
		return;
	}
	if (to_gateway(xc, to, type)) {
		to_component(xc, st, in->local);
		free(in);
		return;
	}
	if (xa_muc_invites(xc, st) || xa_muc_declines(xc, st)) {
		free(in);
		return;
	}
	char public_id[EVENT_OPAQUE_ID_MAX + 1], nick[256];
	bool to_room = xa_muc_room(xc, to, public_id, sizeof(public_id), in->remote_bare, sizeof(in->remote_bare),
				   nick, sizeof(nick));
	if (to_room && (!type || strcmp(type, "groupchat") != 0) && nick[0]) {
		/* A private message to an occupant (XEP-0045 §7.5): not carried
		 * (a member's own view is the only real room here), and said
		 * so, with where to write instead; a chat state or marker
		 * without a body is let go. */
		if (xmpp_stanza_get_child_by_name(st, "body")) {
			char text[XJ_JID_MAX + 400], jid[XJ_JID_MAX + 1];
			/* a member of this server at her own JID (until the
			 * forty-ninth session the JID of a namesake on the peer) */
			if (!xa_muc_member_jid(xc, in->remote_bare, nick, jid, sizeof(jid)))
				snprintf(jid, sizeof(jid), "their address");
			snprintf(text, sizeof(text),
				 "Private messages are not carried in a bridged group: write to the member directly "
				 "(%s).", jid);
			atomic_fetch_add(&xc->errors_out, 1);
			xa_answer_now(xc, xa_error_reply(st, "cancel", "not-allowed", text));
		}
		free(in);
		return;
	}
	if (to_room && type && strcmp(type, "groupchat") == 0) {
		/* To a group's room: to the room itself (a groupchat to an
		 * occupant is bad-request, XEP-0045 §7.5), only from a
		 * resource that is in it (§7.4). */
		if (nick[0] || !xa_muc_is_occupant(xc, in->remote_bare, from)) {
			free(in);
			refuse_now(xc, st, "modify", nick[0] ? "bad-request" : "not-acceptable");
			return;
		}
		/* The subject is the group's name, which only its peer sets
		 * (there is no neutral rename event): a change is refused, as
		 * XEP-0045 §8.1 has it for an occupant without the privilege,
		 * rather than ignored.  A change is a <subject/> without a
		 * <body/> or a <thread/>: with one it is a message, §8.1 says,
		 * and carried as any (until the forty-ninth session it was
		 * refused, and lost). */
		if (xmpp_stanza_get_child_by_name(st, "subject") && !xmpp_stanza_get_child_by_name(st, "body") &&
		    !xmpp_stanza_get_child_by_name(st, "thread")) {
			free(in);
			atomic_fetch_add(&xc->errors_out, 1);
			xa_answer_now(xc, xa_error_reply(st, "auth", "forbidden",
							 "The subject is the group's name: only the network the group "
							 "lives on can change it."));
			return;
		}
		in->group = true;
	} else if (!xa_remote_user(xc, to, in->remote_id, sizeof(in->remote_id), in->remote_bare,
				   sizeof(in->remote_bare))) {
		free(in);
		refuse_now(xc, st, "cancel", "service-unavailable");
		return;
	}
	/* Malformed content is refused here, before anything is stored. */
	static const struct xm_in_lookup none = { no_msg, no_reactions, NULL };
	json_t *probe = NULL;
	char why[200] = "";
	enum xm_in_result pr = xm_to_neutral(st, &none, 1, &probe, why, sizeof(why));
	json_decref(probe);
	if (pr == XM_IN_INVALID || pr == XM_IN_TOO_LONG ||
	    (type && ((!in->group && strcmp(type, "groupchat") == 0) || strcmp(type, "headline") == 0))) {
		free(in);
		if (pr == XM_IN_INVALID) {
			LOG_KV_LIMITED(CW_LOG_INFO, "xmpp message refused", "component", xc->domain, "detail", why);
			refuse_now(xc, st, "modify", "bad-request");
		} else if (pr == XM_IN_TOO_LONG) {
			/* too long for the neutral model: not-acceptable with the
			 * limit, as the model's own refusals (in_convert); until
			 * the thirty-fourth session bad-request without a text */
			char text[300];
			not_delivered(text, sizeof(text), why);
			LOG_KV_LIMITED(CW_LOG_INFO, "xmpp message not representable", "component", xc->domain,
				       "detail", why);
			atomic_fetch_add(&xc->errors_out, 1);
			xa_answer_now(xc, xa_error_reply(st, "modify", "not-acceptable", text));
		} else {
			refuse_now(xc, st, "cancel", "service-unavailable");
		}
		return;
	}
	const struct cw_config *cfg = x->cfg;
	snprintf(in->uri, sizeof(in->uri), "mimi://%s/u/%s", cfg->domain ? cfg->domain : "", in->local);
	xa_room_native(in->local_bare, in->remote_bare, in->room, sizeof(in->room));
	cw_new_id(in->new_room, sizeof(in->new_room), "r_");
	snprintf(in->new_room_uri, sizeof(in->new_room_uri), "mimi://%s/r/%s", cfg->domain ? cfg->domain : "",
		 in->new_room);
	xm_message_ids(st, in->sid, in->oid);
	in->ts = cw_wall_ms();
	dedup_keys(in, st, in->oid[0] ? in->oid : in->sid);
	const char *refs[16];
	size_t n = xm_message_refs(st, refs, 16);
	in->refs = json_array();
	for (size_t i = 0; i < n; i++)
		json_array_append_new(in->refs, json_string(refs[i]));
	in->map = json_object();
	in->own = json_object();
	in->rx = json_object();
	char *buf = NULL;
	size_t len = 0;
	if (xmpp_stanza_to_text(st, &buf, &len) == XMPP_EOK && buf) {
		in->text = strdup(buf);
		xmpp_free(xc->ctx, buf);
	}
	enum in_start_result rs = IN_REFUSED;
	if (!in->text || !in->refs || !in->map || !in->own || !in->rx || (rs = in_start(in)) != IN_STARTED) {
		if (rs == IN_TOO_MANY)
			too_many_waiting(xc, st, in->local_bare, true);
		else
			refuse_now(xc, st, "wait", "internal-server-error");
		xin_free(in);
	}
}

void xa_in_leave(struct xcomp *xc, xmpp_stanza_t *iq, enum xa_leave how, const char *room, const char *local_bare,
		 const char *local)
{
	struct xin *in = calloc(1, sizeof(*in));
	if (!in) {
		xa_enqueue_stanza(xc, xa_error_reply(iq, "wait", "resource-constraint", NULL));
		return;
	}
	in->xc = xc;
	in->leave = how;
	in->group = true;
	snprintf(in->local_bare, sizeof(in->local_bare), "%s", local_bare);
	snprintf(in->local, sizeof(in->local), "%s", local);
	snprintf(in->remote_bare, sizeof(in->remote_bare), "%s", room);
	const struct cw_config *cfg = xc->x->cfg;
	snprintf(in->uri, sizeof(in->uri), "mimi://%s/u/%s", cfg->domain ? cfg->domain : "", local);
	xa_room_native(local_bare, room, in->room, sizeof(in->room));
	unsigned char h[16];
	char hex[33];
	cw_random(h, sizeof(h));
	cw_hex(hex, h, sizeof(h));
	snprintf(in->base, sizeof(in->base), "x%s", hex);
	snprintf(in->key_now, sizeof(in->key_now), "%s", in->base);
	snprintf(in->key_before, sizeof(in->key_before), "%s", in->base);
	in->refs = json_array();
	in->map = json_object();
	in->own = json_object();
	in->rx = json_object();
	in->ts = cw_wall_ms();
	char *buf = NULL;
	size_t len = 0;
	if (xmpp_stanza_to_text(iq, &buf, &len) == XMPP_EOK && buf) {
		in->text = strdup(buf);
		xmpp_free(xmpp_stanza_get_context(iq), buf);
	}
	enum in_start_result rs = IN_REFUSED;
	if (!in->text || !in->refs || !in->map || !in->own || !in->rx || (rs = in_start(in)) != IN_STARTED) {
		if (rs == IN_TOO_MANY)
			too_many_waiting(xc, iq, local_bare, false);
		else
			xa_enqueue_stanza(xc, xa_error_reply(iq, "wait", "internal-server-error", NULL));
		xin_free(in);
	}
}
