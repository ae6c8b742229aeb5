/* The XMPP adapter's consent: a remote sender's first contact reaches the
 * local user as a presence subscription from its JID plus one notice; the
 * user's approval (subscribed) is accept, a refusal (unsubscribed) block;
 * and the same as XEP-0050 ad-hoc commands on the component (list, accept,
 * block, opt-in, opt-out, report), since a XEP-0191 block on the user's
 * server is invisible to a component.  The user's own presence is never
 * relayed anywhere. */
#include "config.h"
#include "xmpp_int.h"
#include "xmpp_cmdform.h"
#include "log.h"
#include "peer_api.h"
#include "policy_admin.h"
#include "policy_live.h"
#include "ratelimit.h"
#include "store.h"

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define NS_NICK "http://jabber.org/protocol/nick"


void xa_command_items(struct xcomp *xc, xmpp_stanza_t *query)
{
	for (size_t i = 0; i < xa_ncommands; i++) {
		xmpp_stanza_t *it = xa_child(xc->ctx, query, "item", NULL);
		if (!it)
			return;
		xmpp_stanza_set_attribute(it, "jid", xc->domain);
		xmpp_stanza_set_attribute(it, "node", xa_commands[i].node);
		xmpp_stanza_set_attribute(it, "name", xa_commands[i].name);
	}
}

bool xa_command_info(struct xcomp *xc, xmpp_stanza_t *query, const char *node)
{
	static const char *const features[] = { XA_NS_COMMANDS, XA_NS_DATA, NULL };
	if (strcmp(node, XA_NS_COMMANDS) == 0) {
		xa_disco_identity(xc->ctx, query, "automation", "command-list", "Commands");
		return true;
	}
	for (size_t i = 0; i < xa_ncommands; i++)
		if (strcmp(xa_commands[i].node, node) == 0) {
			xa_disco_identity(xc->ctx, query, "automation", "command-node", xa_commands[i].name);
			xa_disco_features(xc->ctx, query, features);
			return true;
		}
	return false;
}

/* A presence from one of the component's JIDs to a local user: written now
 * (on the stream's thread) or queued; nick (may be NULL): XEP-0172.  An
 * available one of a contact: xa_vcard_presence. */
static void presence_to(struct xcomp *xc, bool now, const char *from, const char *to, const char *type,
			const char *nick)
{
	xmpp_ctx_t *ctx = now ? xc->ctx : xa_thread_ctx(xc->x);
	xmpp_stanza_t *p = ctx ? xmpp_presence_new(ctx) : NULL;
	if (!p)
		return;
	xmpp_stanza_set_from(p, from);
	xmpp_stanza_set_to(p, to);
	if (type)
		xmpp_stanza_set_type(p, type);
	if (nick && *nick)
		xa_text_child(ctx, p, "nick", NS_NICK, nick);
	if (now)
		xa_send_kept(xc, p); /* a roster change or request is nothing the user asks for again */
	else
		xa_enqueue_stanza(xc, p);
}

/* policy.user_updates_per_minute (policy_user_update_allowed): the accept
 * and block commands, the subscription decisions, opt-ins, opt-outs and
 * reports; notice: whether a refusal may be told in a notice. */
static bool user_update_allowed(struct xcomp *xc, const char *local, bool *notice)
{
	return policy_user_update_allowed(xc->x->app->policy, xc->x->app->limits, local, notice);
}

/* The roster follows a block: the remote contact goes offline (RFC 6121
 * §3.2.2: before the unsubscribed, or the user's client keeps showing it
 * online) and unsubscribes both ways. */
static void roster_drop(struct xcomp *xc, bool now, const char *remote, const char *local_bare)
{
	xa_fanout_forget(xc, remote, local_bare); /* no profile presence of a batch under way after these */
	presence_to(xc, now, remote, local_bare, "unavailable", NULL);
	presence_to(xc, now, remote, local_bare, "unsubscribe", NULL);
	presence_to(xc, now, remote, local_bare, "unsubscribed", NULL);
}

/* ------------------------------------------------------------ the job */

/* V_SUBSCRIBE: the user's own subscribe to a contact, answered once its
 * consent is known (see xa_presence). */
enum verb { V_LIST, V_ACCEPT, V_BLOCK, V_OPTIN, V_OPTOUT, V_REPORT, V_SUBSCRIBE };

struct xconsent {
	struct xcomp *xc;
	enum verb verb;
	char local[MIMI_LOCAL_MAX + 1], local_bare[1100];
	char remote_id[MIMI_LOCAL_MAX + 1], remote_jid[1100];
	bool whole_domain;               /* the subject is the peer's domain */
	char addr_domain[MIMI_DOMAIN_MAX + 1]; /* a mimi:// address's domain (its local part in remote_id), neither
					  * this provider's nor a component's: whose it is, read in the job
					  * (peer_address); else "" */
	char address[MIMI_URI_MAX + 1];  /* that address, as taken */
	char own_subject[MIMI_URI_MAX + 1]; /* a report's subject when it is a user of this provider's, else "" */
	bool cancel_if_allowed;          /* an `unsubscribed`: see xa_presence */
	bool keep_blocked;               /* a `subscribed`: no unblock (see xa_presence) */
	char reason[XA_CMD_REASON_MAX + 1]; /* a report's: as long as the peer API's comment */
	char *iq;                        /* what the answer needs of the command (iq_skeleton), or NULL (a presence) */
	char node[16];
	/* outputs of the last run */
	char note[3000];
	bool done;
	bool kept;                       /* an `unsubscribed` that changed nothing: the contact is allowed */
	bool blocked;                    /* V_SUBSCRIBE, keep_blocked: the contact (or its network) is blocked */
	json_t *contacts;                /* remote ids: the requests an accept withdraws from the roster, or the
					  * contacts a whole network's block takes off it */
	long long xid;                   /* the last run's transaction (txid_current), 0 not known: asked of
					  * txid_status when its COMMIT's answer is lost (consent_done) */
	struct xconsent *next_waiting;   /* the next job waiting for the same look-up (struct fate_look) */
};

/* The remote ids of a local user's contacts of a peer, as far as the
 * gateway knows them (a consent request shown to her, a direct room
 * shared), but those she allowed one by one (a whole network's block
 * leaves them be); at most 100 (the others stay on the roster, their
 * messages refused).  lid: the local user's identity id, peer: the
 * peer's id (SQL expressions). */
#define NETWORK_CONTACTS_SQL(lid, peer) \
	"SELECT i.localpart FROM identities i WHERE i.id IN (SELECT q.remote_identity_id FROM consent_requests q " \
	" WHERE q.local_identity_id = " lid " AND q.notified_at IS NOT NULL UNION SELECT n.identity_id " \
	" FROM room_members m JOIN rooms r ON r.id = m.room_id AND r.kind = 'direct' JOIN room_members n " \
	" ON n.room_id = m.room_id AND n.identity_id <> m.identity_id WHERE m.identity_id = " lid ") " \
	" AND i.peer_id = " peer " AND NOT i.is_local AND NOT EXISTS (SELECT 1 FROM consents k " \
	" WHERE k.local_identity_id = " lid " AND k.subject_kind = 'user' AND k.subject = i.uri " \
	" AND k.state = 'allowed') ORDER BY i.id LIMIT 100"

/* At most this many requests an accept withdraws from the roster (a whole
 * network's: the others stay shown, and a refusal of one is told). */
#define WITHDRAW_MAX 100

/* Whether the local user's decision about the remote user subject (a
 * URI) is state: the contact's own decision, else its domain's, as the
 * policy reads them. */
static cw_err consent_is(PGconn *c, const char *local_id, const char *subject, const char *domain, const char *state,
			 bool *out, cw_errmsg *e)
{
	const char *cp[] = { local_id, subject, domain, state };
	PGresult *r = PQexecParams(c, "SELECT coalesce((SELECT state FROM consents WHERE local_identity_id = "
				      "$1::bigint AND subject_kind = 'user' AND subject = $2), (SELECT state FROM "
				      "consents WHERE local_identity_id = $1::bigint AND subject_kind = 'domain' AND "
				      "subject = $3)) IS NOT DISTINCT FROM $4",
				   4, NULL, cp, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	*out = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
	PQclear(r);
	return CW_OK;
}

/* The refusal of an accept or block of who, a contact of the network of
 * another component (of), on xc: its roster cannot follow them
 * (component_contact, peer_address). */
static void another_network(const struct xcomp *xc, const struct xcomp *of, const char *who, char *text,
			    size_t len)
{
	snprintf(text, len, "%s is a contact of another network (peer:%s), not of this one (peer:%s): accept and "
		 "block them with the commands of %s.",
		 who, of->peer, xc->peer, of->domain);
}

/* A report's store and answer (consent_fn's V_REPORT; peer_address's),
 * of subject by the local user whose address is uri. */
static cw_err report_run(PGconn *c, struct xconsent *j, const char *uri, const char *subject, cw_errmsg *e)
{
	const struct policy_report rep = { .reporter_kind = "local_user", .reporter = uri, .subject = subject,
					   .reason = "abuse", .comment = j->reason[0] ? j->reason : NULL, .gather = true };
	json_t *ans = NULL;
	cw_err rc = policy_report_store(c, j->xc->x->app, &rep, &ans, NULL, e);
	if (rc == CW_EINVAL) {
		/* the subject names a contact of another component whose
		 * peer is not configured (policy_report_store: nothing
		 * stored, as POST /admin/v1/reports answers 400); until the
		 * fortieth session "That did not work; try again" */
		snprintf(j->note, sizeof(j->note), "Not reported: %s. Nothing was stored; tell the operator.", e->msg);
		return CW_OK;
	}
	if (rc)
		return rc;
	/* the subject as stored (policy_report_store: a user of this
	 * provider's by her one address, a component's contact as the
	 * peer's user) */
	const char *stored = json_string_value(json_object_get(ans, "subject"));
	char with[120];
	policy_report_evidence_words(ans, with, sizeof(with));
	snprintf(j->note, sizeof(j->note), "Reported %s to the operator, %s. Thank you.", stored ? stored : subject,
		 with);
	json_decref(ans);
	j->done = true;
	return CW_OK;
}

/* An accept, block or report of mimi://<domain>/u/<id> (j->addr_domain,
 * j->remote_id) whose domain is not this component's peer's (consent_fn
 * asked that first): another peer's user, or nobody's.  The peers are
 * the table's, read here in the command's transaction.  A report of
 * another peer's user is taken as typed (as POST /admin/v1/reports takes
 * it); an accept or block is for this component's contacts only (its
 * roster), so refused, naming the component whose commands take it, or
 * saying that no component stands for that peer (its users reach nobody
 * on this XMPP server).  A domain of no peer names nobody who can reach
 * the user: refused.  Nothing stored but the report; the answer is an
 * error note.  Until the fortieth session any such address was a bare
 * bad-request, a peer's own domain too (mimi://wa.example/u/wally, where
 * wally@<component> was taken). */
static cw_err peer_address(PGconn *c, struct xconsent *j, cw_errmsg *e)
{
	struct xmpp *x = j->xc->x;
	const char *addr = j->address;
	char peer[PEER_NAME_MAX];
	cw_err rc = policy_peer_of_domain(c, j->addr_domain, peer, sizeof(peer), e);
	if (rc)
		return rc; /* consent_done: "That did not work; try again in a moment.", nothing stored */
	if (!peer[0]) {
		snprintf(j->note, sizeof(j->note),
			 "Not done: %s is the domain of no network this gateway is connected to, so %s is nobody who "
			 "can reach you here. Nothing was stored. Name a contact by their JID (name@%s) or their "
			 "address on this network's domain.",
			 j->addr_domain, addr, j->xc->domain);
		return CW_OK;
	}
	if (j->verb == V_REPORT) {
		char uri[MIMI_URI_MAX + 1];
		snprintf(uri, sizeof(uri), "mimi://%s/u/%s", x->cfg->domain ? x->cfg->domain : "", j->local);
		return report_run(c, j, uri, addr, e);
	}
	struct xcomp *of = xa_comp_by_peer(x, peer);
	char other[sizeof(j->note) - 32]; /* room for what the note says around it */
	if (of) {
		another_network(j->xc, of, addr, other, sizeof(other));
		snprintf(j->note, sizeof(j->note), "Not done: %s Nothing was stored.", other);
	} else
		snprintf(j->note, sizeof(j->note),
			 "Not done: %s is a user of network peer:%s, which no contact on this XMPP server stands for, "
			 "so nothing of theirs reaches you here. Nothing was stored.",
			 addr, peer);
	return CW_OK;
}

cw_err xa_local_uri(const struct xmpp *x, const char *local, char *uri, size_t len, cw_errmsg *e)
{
	char raw[MIMI_URI_MAX + 1];
	snprintf(raw, sizeof(raw), "mimi://%s/u/%s", x->cfg->domain ? x->cfg->domain : "", local);
	struct mimi_uri u;
	cw_err rc = mimi_uri_parse(raw, &u, e);
	if (!rc)
		mimi_uri_format(&u, uri, len, NULL); /* as identity_id stores it */
	return rc;
}

/* list: a read (store_read), as the Matrix bot's.  The user's identity is
 * looked up, not made: a user who has none has nothing to list.  Until
 * the forty-fifth session it ran as a write, which made her identity
 * (identity_id) and held the writer for the summary's query, and a flood
 * of list commands, which are not limited, cost the writer's time. */
static cw_err list_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	struct xconsent *j = arg;
	j->note[0] = '\0';
	j->done = false;
	char uri[MIMI_URI_MAX + 1];
	cw_err rc = xa_local_uri(j->xc->x, j->local, uri, sizeof(uri), e);
	if (rc)
		return rc;
	const char *ip[] = { uri };
	PGresult *r = PQexecParams(c, "SELECT id FROM identities WHERE uri = $1", 1, NULL, ip, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	char local_id[24] = "";
	if (PQntuples(r) == 1)
		snprintf(local_id, sizeof(local_id), "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	const char *params[] = { local_id, POLICY_USER_SUMMARY_LIMIT };
	r = local_id[0] ? PQexecParams(c, POLICY_USER_SUMMARY_SQL, 2, NULL, params, NULL, NULL, 0) : NULL;
	if (r && (rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	/* As many lines as fit, whole, then how many more there are:
	 * until the thirtieth session the rest was left out in silence. */
	size_t n = 0, room = sizeof(j->note) - 40; /* kept for the last line */
	int i, rows = r ? PQntuples(r) : 0;
	for (i = 0; i < rows; i++) {
		size_t len = (n ? 1 : 0) + strlen(PQgetvalue(r, i, 0));
		if (n + len >= room)
			break;
		n += (size_t)snprintf(j->note + n, sizeof(j->note) - n, "%s%s", n ? "\n" : "", PQgetvalue(r, i, 0));
	}
	if (i < rows)
		snprintf(j->note + n, sizeof(j->note) - n, "%s... and %s%d more.", n ? "\n" : "",
			 rows > POLICY_USER_SUMMARY_ROWS ? "at least " : "", rows - i);
	PQclear(r);
	if (!rows)
		snprintf(j->note, sizeof(j->note), "Nothing yet: no requests, no decisions.");
	j->done = true;
	return CW_OK;
}

static cw_err consent_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	struct xconsent *j = arg;
	struct xmpp *x = j->xc->x;
	j->note[0] = '\0';
	j->done = j->kept = j->blocked = false;
	json_decref(j->contacts);
	j->contacts = NULL;
	const char *dom = x->cfg->domain ? x->cfg->domain : "";
	char uri[MIMI_URI_MAX + 1], local_id[24];
	snprintf(uri, sizeof(uri), "mimi://%s/u/%s", dom, j->local);
	struct mimi_uri u;
	cw_err rc = mimi_uri_parse(uri, &u, e);
	if (rc)
		return rc;
	/* With the peer, the batch's transaction id, for the look-up of a
	 * COMMIT whose answer is lost (consent_done): no round trip more. */
	const char *pp[] = { j->xc->peer };
	PGresult *r = PQexecParams(c, "SELECT p.domain, p.enabled, x.id FROM (SELECT txid_current() AS id) x "
				      "LEFT JOIN peers p ON p.name = $1",
				   1, NULL, pp, NULL, NULL, 0);
	if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
		return rc;
	char peer_domain[300] = "";
	bool peer_off = false; /* the operator switched the peer off (POST /admin/v1/peers/{name}/disable) */
	j->xid = PQntuples(r) == 1 ? atoll(PQgetvalue(r, 0, 2)) : 0;
	if (PQntuples(r) == 1 && !PQgetisnull(r, 0, 0)) {
		snprintf(peer_domain, sizeof(peer_domain), "%s", PQgetvalue(r, 0, 0));
		peer_off = strcmp(PQgetvalue(r, 0, 1), "f") == 0;
	}
	PQclear(r);
	if (j->addr_domain[0] && strcmp(j->addr_domain, peer_domain) != 0)
		return peer_address(c, j, e);
	if (j->addr_domain[0] && !xa_remote_jid(j->xc, j->remote_id, j->remote_jid, sizeof(j->remote_jid))) {
		snprintf(j->note, sizeof(j->note), "%s names no contact this gateway can give a JID.", j->address);
		return CW_OK;
	}
	char subject[MIMI_URI_MAX + 1];
	if (j->own_subject[0])
		snprintf(subject, sizeof(subject), "%s", j->own_subject);
	else if (j->whole_domain)
		snprintf(subject, sizeof(subject), "%s", peer_domain);
	else
		snprintf(subject, sizeof(subject), "mimi://%s/u/%s", peer_domain, j->remote_id);
	if (j->verb != V_LIST && j->verb != V_OPTIN && j->verb != V_OPTOUT && !j->own_subject[0] && !peer_domain[0]) {
		/* the component's peer has no row (POST /admin/v1/peers): no
		 * contact of it is anyone known, nothing is stored */
		snprintf(j->note, sizeof(j->note),
			 "Not done: this gateway's network (peer:%s) is not configured here yet, so its contacts "
			 "are nobody known. Nothing was stored; tell the operator.",
			 j->xc->peer);
		return CW_OK;
	}
	if (j->verb == V_OPTIN && !peer_domain[0]) {
		/* An opt-in to a network no peer has is asked of no sender:
		 * refused, nothing stored (her identity not made either), as
		 * POST /admin/v1/optins answers 422 unknown_peer and the Matrix
		 * bot "I know no network".  Until the fiftieth session it was
		 * stored and answered "You are now opted in", and she believed
		 * herself reachable.  An opt-out is taken (it keeps her out of
		 * a peer yet to come, as the admin API's). */
		snprintf(j->note, sizeof(j->note),
			 "Not done: this gateway's network (peer:%s) is not configured here yet, so nothing can come "
			 "from it. Nothing was stored; tell the operator.",
			 j->xc->peer);
		return CW_OK;
	}
	/* A report is stored by her address (report_run), and may yet be
	 * refused (policy_report_store): it makes no identity. */
	if (j->verb == V_REPORT)
		return report_run(c, j, uri, subject, e); /* done unless refused */
	/* The user's identity, made if she has none, once the command is
	 * taken: until the forty-eighth session it was made first, and a
	 * command refused above (another network's contact, a name of no
	 * contact, a network not configured, a report refused) left a row
	 * behind. */
	if ((rc = identity_id(c, &u, true, "xmpp", NULL, local_id, sizeof(local_id), e)))
		return rc;
	switch (j->verb) {
	case V_SUBSCRIBE: {
		bool blocked = false;
		if ((rc = consent_is(c, local_id, subject, peer_domain, "blocked", &blocked, e)))
			return rc;
		j->blocked = blocked;
		break;
	}
	case V_ACCEPT:
	case V_BLOCK: {
		if (j->keep_blocked) {
			bool blocked = false;
			if ((rc = consent_is(c, local_id, subject, peer_domain, "blocked", &blocked, e)))
				return rc;
			if (blocked) {
				j->blocked = true;
				return CW_OK; /* not done: she is told (consent_done) */
			}
		}
		if (j->cancel_if_allowed) {
			bool allowed = false;
			if ((rc = consent_is(c, local_id, subject, peer_domain, "allowed", &allowed, e)))
				return rc;
			if (allowed) {
				j->kept = true;
				return CW_OK; /* not done: nothing changes, the roster needs nothing */
			}
		}
		if (j->verb == V_ACCEPT && j->iq) {
			/* The requests the user was shown that this accept decides:
			 * withdrawn from the roster once done (consent_done). */
			char max[16];
			snprintf(max, sizeof(max), "%d", WITHDRAW_MAX);
			const char *wp[] = { local_id, j->whole_domain ? "domain" : "user", subject, max };
			r = PQexecParams(c, "SELECT coalesce(json_agg(localpart), '[]') FROM (SELECT i.localpart "
					    "FROM consent_requests q JOIN identities i ON i.id = q.remote_identity_id "
					    "WHERE q.local_identity_id = $1::bigint AND q.state = 'pending' "
					    "AND q.notified_at IS NOT NULL AND (($2 = 'user' AND i.uri = $3) "
					    "OR ($2 = 'domain' AND i.domain = $3)) ORDER BY q.id LIMIT $4::int) w",
					 4, NULL, wp, NULL, NULL, 0);
			if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
				return rc;
			j->contacts = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
			PQclear(r);
		}
		struct policy_view *v = policy_live_get(x->app->policy);
		long counts[3] = { 0, 0, 0 }, decided = 0;
		bool repeat = false;
		rc = policy_consent_apply(c, v, local_id, j->whole_domain ? "domain" : "user", subject,
					  j->verb == V_ACCEPT ? "allowed" : "blocked", "user", counts, &decided, &repeat, e);
		policy_view_put(v);
		if (rc)
			return rc;
		/* A repeat of her decision is answered as the change, not
		 * audited again (as the admin API's and the Matrix bot's) */
		const char *ap[] = { j->local_bare, j->verb == V_ACCEPT ? "consent.allow" : "consent.block", subject };
		if (!repeat && (rc = store_command(c, "INSERT INTO audit_log (actor, action, subject) "
						   "VALUES ('user:' || $1, $2, $3)", 3, ap, e)))
			return rc;
		if (j->verb == V_BLOCK && j->whole_domain) {
			const char *np[] = { local_id, j->xc->peer };
			r = PQexecParams(c, "SELECT coalesce(json_agg(localpart), '[]') FROM (" NETWORK_CONTACTS_SQL(
					    "$1::bigint", "(SELECT id FROM peers WHERE name = $2)") ") w",
					 2, NULL, np, NULL, NULL, 0);
			if ((rc = store_check(c, r, PGRES_TUPLES_OK, e)))
				return rc;
			j->contacts = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
			PQclear(r);
		}
		/* The whole network accepted lets its users write to her only
		 * where she is opted in to it (policy: user_not_opted_in; with
		 * no opt-in of hers, policy.optin_default, and only those she
		 * accepted one by one and the conversations she wrote in
		 * pass): the note says so, naming the opt-in command, so that
		 * she does not take the accept for one (until the forty-third
		 * session it said "Accepted" alone, as the Matrix bot's
		 * answer did: mx_bot.c, domain_optin_hint; both ask
		 * policy_live_optin_state). */
		char hint[400] = "";
		if (j->verb == V_ACCEPT && j->whole_domain) {
			char net[PEER_NAME_MAX + 8];
			snprintf(net, sizeof(net), "peer:%s", j->xc->peer);
			int state;
			if ((rc = policy_live_optin_state(x->app->policy, c, local_id, net, &state, e)))
				return rc;
			if (state == 0)
				snprintf(hint, sizeof(hint),
					 " You are not opted in to %s, though: its users reach you only once you "
					 "also run this gateway's opt-in command (for %s; until then only those you "
					 "accepted one by one, and the conversations you wrote in, do).",
					 net, net);
			else if (state < 0)
				snprintf(hint, sizeof(hint),
					 " You opted out of %s, though: nothing from it reaches you until you also run "
					 "this gateway's opt-in command (for %s).", net, net);
		}
		/* Her block of the other kind wins (the request is 'blocked',
		 * policy_live.c): said, as the Matrix bot says it. */
		char standing[400] = "";
		if (j->verb == V_ACCEPT &&
		    (rc = policy_allow_blocked_note(c, local_id, j->whole_domain ? "domain" : "user", subject, standing,
						    sizeof(standing), e)))
			return rc;
		if (j->verb == V_ACCEPT)
			snprintf(j->note, sizeof(j->note), "Accepted %s. %ld waiting message(s) released.%s%s", subject,
				 counts[0], standing, hint);
		else
			snprintf(j->note, sizeof(j->note), "Blocked %s. %ld waiting message(s) dropped.", subject, counts[1]);
		break;
	}
	case V_OPTIN:
	case V_OPTOUT: {
		char net[80];
		snprintf(net, sizeof(net), "peer:%s", j->xc->peer);
		const char *params[] = { local_id, net, j->verb == V_OPTIN ? "t" : "f" };
		rc = store_command(c, "INSERT INTO user_optin (identity_id, network, opted_in, updated_by) "
				      "VALUES ($1::bigint, $2, $3::boolean, 'user') ON CONFLICT (identity_id, network) DO "
				      "UPDATE SET opted_in = excluded.opted_in, updated_by = 'user', updated_at = now()",
				   3, params, e);
		if (!rc)
			rc = policy_notify_user(c, local_id, e);
		if (rc)
			return rc;
		/* An opt-in to a network switched off says so, as the Matrix
		 * bot's does (mx_bot.c): until the fiftieth session she read
		 * "opted in" alone, and waited for contacts that could not
		 * come. */
		snprintf(j->note, sizeof(j->note), "You are now opted %s for %s.%s", j->verb == V_OPTIN ? "in" : "out",
			 net, j->verb == V_OPTIN && peer_off ? " That network is switched off for now: nothing comes "
							       "from it until the operator turns it on again." : "");
		break;
	}
	case V_REPORT: /* above */
	case V_LIST: /* list_fn */
		break;
	}
	j->done = true;
	return CW_OK;
}

/* ------------------------------------------------------------ sessions */

/* A stage's sessionid is the component's to give: it remembers the ones it
 * gave (in the stream thread's memory: only the process that holds the
 * component's stream is asked) and refuses any other (XEP-0050's
 * bad-sessionid).  Until the twenty-fourth session it remembered none,
 * and a submit with a sessionid it never gave ran as a new session. */

enum session_state { SESSION_OK, SESSION_UNKNOWN, SESSION_EXPIRED };

/* Whose a session is: owner, the requester's full JID with the command's
 * JID (the component, or a group's room) and node; user, the requester's
 * bare JID (one user's sessions are bounded, so that they cannot push
 * everyone else's out).  False when the iq lacks one or hashing failed. */
static bool session_owner(xmpp_stanza_t *iq, const char *node, unsigned char owner[32], unsigned char user[32])
{
	const char *from = xmpp_stanza_get_from(iq), *to = xmpp_stanza_get_to(iq);
	if (!from || !to || !node)
		return false;
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned int n1 = 0, n2 = 0;
	bool ok = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) && EVP_DigestUpdate(md, from, strlen(from) + 1) &&
		  EVP_DigestUpdate(md, to, strlen(to) + 1) && EVP_DigestUpdate(md, node, strlen(node) + 1) &&
		  EVP_DigestFinal_ex(md, owner, &n1) && EVP_DigestInit_ex(md, EVP_sha256(), NULL) &&
		  EVP_DigestUpdate(md, from, strcspn(from, "/")) && EVP_DigestFinal_ex(md, user, &n2);
	EVP_MD_CTX_free(md);
	return ok && n1 == 32 && n2 == 32;
}

/* A new session's id into sid (32 hex digits of 128 random bits, not to be
 * guessed), remembered for the requester of iq and node, for
 * xmpp.command_session_lifetime_s.  Its slot is a free one, else an
 * expired one, else the oldest session's, or the requester's own oldest
 * when they have XA_SESSIONS_PER_USER open: a session pushed out is
 * forgotten (its sessionid is then bad-sessionid, as one never given). */
static void session_give(struct xcomp *xc, xmpp_stanza_t *iq, const char *node, char sid[33])
{
	unsigned char raw[16], owner[32], user[32];
	cw_random(raw, sizeof(raw));
	cw_hex(sid, raw, sizeof(raw));
	if (!session_owner(iq, node, owner, user))
		return; /* not remembered: its next stage is refused, and the user starts again */
	int64_t now = cw_now_us();
	struct xa_session *use = NULL, *theirs = NULL;
	int mine = 0;
	for (size_t i = 0; i < XA_SESSIONS_MAX; i++) {
		struct xa_session *s = &xc->sessions[i];
		if (s->until_us > now && memcmp(s->user, user, sizeof(user)) == 0) {
			mine++;
			if (!theirs || s->until_us < theirs->until_us)
				theirs = s;
		}
		if (!use || s->until_us < use->until_us)
			use = s; /* a free slot's is 0 */
	}
	if (mine >= XA_SESSIONS_PER_USER)
		use = theirs;
	memcpy(use->id, sid, sizeof(use->id));
	memcpy(use->owner, owner, sizeof(owner));
	memcpy(use->user, user, sizeof(user));
	use->until_us = now + xc->x->cfg->xmpp_command_session_lifetime_s * 1000000LL;
}

/* The session sid of the requester of iq and node, ended (each stage
 * after the first ends it, or starts a new one).  Another user's session
 * is unknown to this one and stays. */
static enum session_state session_take(struct xcomp *xc, xmpp_stanza_t *iq, const char *node, const char *sid)
{
	unsigned char owner[32], user[32];
	if (strlen(sid) != 32 || !session_owner(iq, node, owner, user))
		return SESSION_UNKNOWN;
	for (size_t i = 0; i < XA_SESSIONS_MAX; i++) {
		struct xa_session *s = &xc->sessions[i];
		if (!s->id[0] || CRYPTO_memcmp(s->id, sid, 32) != 0 || CRYPTO_memcmp(s->owner, owner, sizeof(owner)) != 0)
			continue;
		bool expired = s->until_us <= cw_now_us();
		memset(s, 0, sizeof(*s));
		return expired ? SESSION_EXPIRED : SESSION_OK;
	}
	return SESSION_UNKNOWN;
}

/* <command status=... node sessionid><note type>text</note></command> as
 * the answer to the iq text. */
static void command_answer(struct xcomp *xc, const char *iq_text, const char *node, const char *note,
			   const char *note_type)
{
	xmpp_ctx_t *ctx = xa_thread_ctx(xc->x);
	xmpp_stanza_t *iq = ctx ? xmpp_stanza_new_from_string(ctx, iq_text) : NULL;
	if (iq) {
		xa_enqueue_stanza(xc, xa_command_end(ctx, iq, node, "completed", note, note_type));
		xmpp_stanza_release(iq);
	}
}

xmpp_stanza_t *xa_command_end(xmpp_ctx_t *ctx, xmpp_stanza_t *iq, const char *node, const char *status,
			      const char *note, const char *note_type)
{
	xmpp_stanza_t *r = xa_iq_result(iq);
	xmpp_stanza_t *cmd = r ? xa_child(ctx, r, "command", XA_NS_COMMANDS) : NULL;
	if (!cmd)
		return r;
	xmpp_stanza_set_from(r, xmpp_stanza_get_to(iq));
	xmpp_stanza_set_attribute(cmd, "node", node);
	xmpp_stanza_set_attribute(cmd, "status", status);
	xmpp_stanza_t *in = xmpp_stanza_get_child_by_name_and_ns(iq, "command", XA_NS_COMMANDS);
	const char *sid = in ? xmpp_stanza_get_attribute(in, "sessionid") : NULL;
	char fresh[40];
	if (!sid) {
		cw_new_id(fresh, sizeof(fresh), "s");
		sid = fresh;
	}
	xmpp_stanza_set_attribute(cmd, "sessionid", sid);
	xmpp_stanza_t *n = note ? xa_text_child(ctx, cmd, "note", NULL, note) : NULL;
	if (n)
		xmpp_stanza_set_attribute(n, "type", note_type);
	return r;
}

xmpp_stanza_t *xa_command_stage(struct xcomp *xc, xmpp_stanza_t *iq, const char *node, xmpp_stanza_t **form)
{
	*form = NULL;
	xmpp_stanza_t *r = xa_iq_result(iq);
	if (!r)
		return NULL;
	xmpp_stanza_set_from(r, xmpp_stanza_get_to(iq));
	xmpp_ctx_t *ctx = xc->ctx;
	xmpp_stanza_t *cmd = xa_child(ctx, r, "command", XA_NS_COMMANDS);
	char sid[33];
	session_give(xc, iq, node, sid);
	if (cmd) {
		xmpp_stanza_set_attribute(cmd, "node", node);
		xmpp_stanza_set_attribute(cmd, "status", "executing");
		xmpp_stanza_set_attribute(cmd, "sessionid", sid);
		xmpp_stanza_t *actions = xa_child(ctx, cmd, "actions", NULL);
		if (actions) {
			xmpp_stanza_set_attribute(actions, "execute", "complete");
			xa_child(ctx, actions, "complete", NULL);
		}
		xmpp_stanza_t *x = xa_child(ctx, cmd, "x", XA_NS_DATA);
		if (x)
			xmpp_stanza_set_type(x, "form");
		*form = x;
	}
	return r;
}

static void xconsent_free(struct xconsent *j)
{
	json_decref(j->contacts);
	free(j->iq);
	free(j);
}

/* The token of the user's bucket j's command or decision took
 * (user_update_allowed) given back. */
static void token_back(const struct xconsent *j)
{
	policy_user_update_give(j->xc->x->app->policy, j->xc->x->app->limits, j->local);
}

/* The answer of a change whose outcome stays unknown (consent_done). */
#define CONSENT_UNKNOWN_NOTE \
	"The gateway lost its database connection while this was being stored: it may have been done. Use the " \
	"list command to see before you repeat it."

/* The job's end, its outcome known (rc, the store's; or unknown: its
 * COMMIT's answer lost and txid_status could not tell, consent_done). */
static void consent_finish(struct xconsent *j, cw_err rc, const cw_errmsg *e, bool unknown)
{
	if (rc)
		LOG_KV(CW_LOG_WARN, "xmpp consent command failed", "component", j->xc->domain, "detail", e ? e->msg : "");
	const char *said = rc ? "That did not work; try again in a moment." : j->note;
	if (j->iq)
		command_answer(j->xc, j->iq, j->node, unknown ? CONSENT_UNKNOWN_NOTE : said,
			       rc || !j->done ? "error" : "info");
	/* The job changed nothing (refused in the database, as an address
	 * of no network's, a contact of a network not configured, or a
	 * decision that was no change): no reload and no event to the peer
	 * followed, which is what the bucket bounds, so its token goes
	 * back.  The Matrix bot decides such refusals before it takes one
	 * (mx_bot.c, change_allowed); here they are known only in the job.
	 * Until the forty-fifth session each counted, and a user who
	 * mistyped a few addresses was told to wait a minute before her
	 * real change.  A subscribe keeps its token (limited for the write
	 * it costs, xa_presence); a list took none.  A job that failed
	 * (rc: the database's error, its transaction rolled back; the
	 * user's own mistakes are refusals, above) changed nothing either,
	 * and the user is told to try again: its token goes back too,
	 * a subscribe's as well (until the forty-sixth session it was
	 * kept, and a few tries while the database was away cost her the
	 * minute after it came back).  A job whose COMMIT's answer was lost
	 * with the connection may have been stored: its token is kept unless
	 * the database, asked once it answers, says its transaction was
	 * rolled back (consent_done).  Until the sixty-second session it went
	 * back as any failure's, and a change stored with its answer lost was
	 * free (the hole the Matrix bot closed in the sixty-first). */
	if (unknown)
		; /* kept: charged once, stored or not */
	else if (rc ? j->verb != V_LIST : !j->done && j->verb != V_LIST && j->verb != V_SUBSCRIBE)
		token_back(j);
	/* The roster follows a block (roster_drop), of the contact or of the
	 * whole network (each of its contacts, j->contacts).  An accept by
	 * command withdraws the requests it decided from the roster (the
	 * contact cancels its request, RFC 6121 §3.3), so that the roster
	 * shows no request the user could still deny: a denial of an allowed
	 * contact is taken for the end of a subscription she approved, and
	 * changes nothing (until the thirtieth session the request stayed
	 * shown, and its denial was ignored in silence). */
	if (!rc && j->done && j->verb == V_BLOCK && !j->whole_domain)
		roster_drop(j->xc, false, j->remote_jid, j->local_bare);
	size_t i;
	json_t *id;
	json_array_foreach(!rc && j->done ? j->contacts : NULL, i, id) {
		char remote[XJ_JID_MAX + 1];
		if (!json_is_string(id) || !xa_remote_jid(j->xc, json_string_value(id), remote, sizeof(remote)))
			continue;
		if (j->verb == V_ACCEPT)
			presence_to(j->xc, false, remote, j->local_bare, "unsubscribe", NULL);
		else
			roster_drop(j->xc, false, remote, j->local_bare); /* a whole network's block */
	}
	if (j->verb == V_SUBSCRIBE && (rc || !j->blocked)) {
		/* The user adds the contact: it is there. */
		presence_to(j->xc, false, j->remote_jid, j->local_bare, "subscribed", NULL);
		xa_vcard_presence(j->xc, j->remote_id, j->remote_jid, j->local_bare); /* with the avatar */
	} else if (j->verb == V_SUBSCRIBE) {
		presence_to(j->xc, false, j->remote_jid, j->local_bare, "unsubscribed", NULL);
		xa_notice(j->xc, XA_QUEUED, j->local_bare,
			  "%s is blocked: adding it to your contacts does not unblock it, and its messages and yours "
			  "stay refused. To unblock it, use this gateway's accept command.",
			  j->remote_jid);
	}
	if (!rc && j->verb == V_ACCEPT && j->blocked) {
		/* an approval of a blocked contact: no unblock, and the
		 * subscription her server may have recorded is taken back */
		roster_drop(j->xc, false, j->remote_jid, j->local_bare);
		xa_notice(j->xc, XA_QUEUED, j->local_bare,
			  "%s is blocked: approving it in your contacts does not unblock it, and its messages and "
			  "yours stay refused. To unblock it, use this gateway's accept command.",
			  j->remote_jid);
	}
	if (!rc && j->kept)
		xa_notice(j->xc, XA_QUEUED, j->local_bare,
			  "%s stays accepted: removing a contact, or refusing it once accepted, does not block it. "
			  "To block it, use this gateway's block command.",
			  j->remote_jid);
	xconsent_free(j);
}

/* txid_status's answers (a look-up's fate). */
static const char FATE_COMMITTED[] = "committed", FATE_ABORTED[] = "aborted", FATE_UNKNOWN[] = "";

/* How long a look-up asks again of a transaction the server still runs
 * (it has not yet seen its connection end): this many looks, FATE_AGAIN_US
 * apart, each a read of its own queued for later, and all of them by the
 * look-up's until_us: its first look's deadline
 * (database.request_timeout_ms) and FATE_LOOKS × FATE_AGAIN_US more.
 * Until the sixty-third session's review each look queued again had a
 * deadline of its own (request_timeout_ms from its turn), and behind
 * saturated readers 20 looks could take ~100 s, their slot busy. */
#define FATE_LOOKS 20
#define FATE_AGAIN_US 100000

/* The look-ups of the batches whose COMMIT's answer was lost: one per
 * batch, by its transaction's id (which each of its consent jobs read,
 * consent_fn), with the batch's jobs that wait for it; its answer kept
 * until the slot is taken again, for a job of the batch the writer
 * answers after it came (the writer answers a batch's jobs one after the
 * other, and the look-up runs on a reader meanwhile).  FATE_SLOTS look-ups
 * at once: a lost batch needs a connection lost at its COMMIT, and the
 * writer sends one COMMIT at a time.  Under fates_mu but the look-up's own
 * fields (status, looks: fate_fn's, then fate_done's, one after the other
 * through the store's queue).  Until the sixty-third session each job of
 * a lost batch asked alone, and each slept 100 ms between its looks on
 * its reader thread, up to 2 s: two such jobs (two readers by default)
 * held every read of the gateway that long. */
#define FATE_SLOTS 8
struct fate_look {
	long long xid;            /* 0: a free slot */
	struct cw_store *store;
	const char *fate;         /* its answer, NULL: being looked up */
	int64_t answered_us;      /* when (a slot answered is taken again, the oldest first) */
	struct xconsent *waiting; /* the jobs waiting for the answer, in the writer's order (next_waiting) */
	const char *status;       /* the last look's: an answer, or NULL (in progress) */
	int looks;                /* asked so far */
	int64_t until_us;         /* no look after this (cw_now_us's clock): the look-up's bound */
};
static pthread_mutex_t fates_mu = PTHREAD_MUTEX_INITIALIZER;
static struct fate_look fates[FATE_SLOTS];

/* Whether the batch's transaction (f->xid) was committed: one look,
 * never a wait (fate_done asks again later). */
static cw_err fate_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	struct fate_look *f = arg;
	char xid[24];
	snprintf(xid, sizeof(xid), "%lld", f->xid);
	const char *p[] = { xid };
	PGresult *r = PQexecParams(c, "SELECT txid_status($1::bigint)", 1, NULL, p, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	const char *st = PQntuples(r) == 1 && !PQgetisnull(r, 0, 0) ? PQgetvalue(r, 0, 0) : "";
	f->looks++;
	if (strcmp(st, "committed") == 0)
		f->status = FATE_COMMITTED;
	else if (strcmp(st, "aborted") == 0)
		f->status = FATE_ABORTED;
	else if (strcmp(st, "in progress") == 0)
		f->status = NULL;
	else
		f->status = FATE_UNKNOWN; /* no longer known: older than the server keeps */
	PQclear(r);
	return CW_OK;
}

/* The job's end by its batch's fate: committed, as stored (its answer, its
 * token spent); rolled back, as any failure, and its WARN says so (not
 * "may have been stored", which only the unknown fate is). */
static void fate_end(struct xconsent *j, const char *fate)
{
	static const cw_errmsg aborted = { .msg = "the connection was lost at the commit; the transaction was rolled back" };
	static const cw_errmsg unknown = { .msg = STORE_OUTCOME_UNKNOWN };
	if (fate == FATE_COMMITTED)
		consent_finish(j, CW_OK, NULL, false);
	else
		consent_finish(j, CW_EUNAVAIL, fate == FATE_ABORTED ? &aborted : &unknown, fate != FATE_ABORTED);
}

static void fate_told(const char *component, long long id, const char *fate, int jobs, int looks, const char *detail)
{
	char xid[24], n[16], k[16];
	snprintf(xid, sizeof(xid), "%lld", id);
	snprintf(n, sizeof(n), "%d", jobs);
	snprintf(k, sizeof(k), "%d", looks);
	LOG_KV(CW_LOG_INFO, "an xmpp consent command whose COMMIT's answer was lost, looked up", "component",
	       component, "xid", xid,
	       "outcome", fate == FATE_COMMITTED ? "committed" : fate == FATE_ABORTED ? "rolled back" : "unknown",
	       "commands", n, "looks", k, "detail", detail);
}

/* The look-up's answer, given to each job of the batch waiting for it. */
static void fate_answer(struct fate_look *f, const char *fate, const char *detail)
{
	pthread_mutex_lock(&fates_mu);
	f->fate = fate;
	f->answered_us = cw_now_us();
	struct xconsent *waiting = f->waiting;
	f->waiting = NULL;
	long long xid = f->xid;
	int looks = f->looks, jobs = 0;
	pthread_mutex_unlock(&fates_mu);
	for (struct xconsent *j = waiting; j; j = j->next_waiting)
		jobs++;
	fate_told(waiting ? waiting->xc->domain : "", xid, fate, jobs, looks, detail);
	for (struct xconsent *j = waiting, *next; j; j = next) {
		next = j->next_waiting;
		fate_end(j, fate);
	}
}

/* A look's outcome: a transaction the server still runs is asked again
 * FATE_AGAIN_US later, queued in the store meanwhile (no reader held),
 * up to FATE_LOOKS looks and while that look can come before the
 * look-up's until_us (its deadline capped there); otherwise the batch's
 * jobs have their answer ("not known" for a transaction still running). */
static void fate_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct fate_look *f = arg;
	bool running = !rc && !f->status;
	bool in_time = cw_now_us() + FATE_AGAIN_US < f->until_us;
	if (running && f->looks < FATE_LOOKS && in_time &&
	    store_read_patient_after(f->store, FATE_AGAIN_US, f->until_us, fate_fn, fate_done, f) == CW_OK)
		return;
	fate_answer(f, rc || !f->status ? FATE_UNKNOWN : f->status,
		    rc && e ? e->msg : running && !in_time ? "still running at the look-up's time limit" : "");
}

/* j, whose batch's COMMIT lost its answer, waits for the look-up of its
 * transaction (j->xid): the batch's one, joined if under way, taken if
 * answered (j ended with it), else started.  False when none can start
 * (every slot being looked up): j ends as not known. */
static bool fate_wait(struct xconsent *j)
{
	pthread_mutex_lock(&fates_mu);
	struct fate_look *f = NULL, *slot = NULL;
	for (size_t i = 0; i < FATE_SLOTS && !f; i++) {
		if (fates[i].xid == j->xid)
			f = &fates[i];
		else if ((!fates[i].xid || fates[i].fate) && (!slot || fates[i].answered_us < slot->answered_us))
			slot = &fates[i]; /* a free one (answered_us 0), else the one answered first */
	}
	if (f && f->fate) {
		const char *fate = f->fate;
		int looks = f->looks;
		pthread_mutex_unlock(&fates_mu);
		fate_told(j->xc->domain, j->xid, fate, 1, looks, "answered already, for its batch");
		fate_end(j, fate);
		return true;
	}
	if (f) {
		struct xconsent **tail = &f->waiting;
		while (*tail)
			tail = &(*tail)->next_waiting;
		j->next_waiting = NULL;
		*tail = j;
		pthread_mutex_unlock(&fates_mu);
		return true;
	}
	if (!slot) {
		pthread_mutex_unlock(&fates_mu);
		LOG_KV_LIMITED(CW_LOG_WARN, "too many xmpp consent look-ups of lost COMMITs at once: one not asked",
			       "component", j->xc->domain);
		return false;
	}
	j->next_waiting = NULL;
	/* The first look's deadline (store_read_patient: request_timeout_ms
	 * from now) and the time its looks again may take after it. */
	int64_t until_us = cw_now_us() + (int64_t)j->xc->x->cfg->db_request_timeout_ms * 1000 +
			   (int64_t)FATE_LOOKS * FATE_AGAIN_US;
	*slot = (struct fate_look){ .xid = j->xid, .store = j->xc->x->app->store, .waiting = j, .until_us = until_us };
	pthread_mutex_unlock(&fates_mu);
	if (store_read_patient(slot->store, fate_fn, fate_done, slot) != CW_OK)
		fate_answer(slot, FATE_UNKNOWN, "the store took no read"); /* stopping: j and any joined since */
	return true;
}

/* The job's outcome, from the store.  When the connection was lost at its
 * COMMIT (STORE_OUTCOME_UNKNOWN) the change may have been stored: the
 * database is asked, once it answers, whether the batch's transaction
 * (j->xid, read in consent_fn) was committed (txid_status, as the Matrix
 * bot's changes_resolved), once for the whole batch (fate_wait):
 * committed, the job ends as stored (its answer, its roster's following,
 * its token spent); rolled back, as any failure (its token given back,
 * "try again"); not known (the look-up failed or timed out, the
 * transaction too old, or still running at its 20th look or at the
 * look-up's bound, request_timeout_ms + 2 s: fate_done), the token kept and
 * the user told it may have been done.  The iq is answered then.  Until
 * the sixty-second session every failure gave the token back, a lost
 * COMMIT's too, and a change stored with its answer lost was free (and
 * answered "That did not work"). */
static void consent_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct xconsent *j = arg;
	bool unknown = rc == CW_EUNAVAIL && e && strcmp(e->msg, STORE_OUTCOME_UNKNOWN) == 0 && j->verb != V_LIST;
	if (unknown && j->xid && fate_wait(j))
		return;
	consent_finish(j, rc, e, unknown);
}

static void consent_start(struct xconsent *j)
{
	struct cw_store *st = j->xc->x->app->store;
	if ((j->verb == V_LIST ? store_read(st, list_fn, consent_done, j) : store_write(st, consent_fn, consent_done, j)) !=
	    CW_OK) {
		if (j->verb != V_LIST)
			token_back(j); /* not run: as a job that failed (consent_done) */
		if (j->iq)
			command_answer(j->xc, j->iq, j->node, "The gateway's database is away; try again later.", "error");
		if (j->verb == V_SUBSCRIBE) /* answered as before the check */
			presence_to(j->xc, false, j->remote_jid, j->local_bare, "subscribed", NULL);
		xconsent_free(j);
	}
}

/* ------------------------------------------------------------ presence */

/* A subscribe or probe to a JID of the component that names nobody (no
 * remote id maps to it; a group's room, which is no contact): answered
 * `unsubscribed` from that JID, as a server answers for a contact that
 * does not exist (RFC 6121 §3.1.3, §4.3.2, §8.5.1), or the user's client
 * shows the request pending for ever (it did until the thirty-sixth
 * session).  Told by the JID's text alone: it says nothing of anyone.
 * A stranger's subscribe or probe is answered so whatever the JID names
 * (xa_presence). */
static void to_nobody(struct xcomp *xc, const char *to, const char *user_bare, const char *type)
{
	size_t n = strcspn(to, "/"); /* the contact's bare JID (§3.1.3 takes a full one as its bare) */
	char jid[XJ_JID_MAX + 1];
	if (!type || (strcmp(type, "subscribe") != 0 && strcmp(type, "probe") != 0) || n >= sizeof(jid))
		return; /* the other types: silently ignored (§8.5.1) */
	memcpy(jid, to, n);
	jid[n] = '\0';
	presence_to(xc, true, jid, user_bare, "unsubscribed", NULL);
}

static bool subscribe_or_probe(const char *type)
{
	return type && (strcmp(type, "subscribe") == 0 || strcmp(type, "probe") == 0);
}

void xa_presence(struct xcomp *xc, xmpp_stanza_t *st)
{
	const char *type = xmpp_stanza_get_type(st), *from = xmpp_stanza_get_from(st), *to = xmpp_stanza_get_to(st);
	char bare[1100], local[MIMI_LOCAL_MAX + 1];
	if (type && strcmp(type, "error") == 0)
		return;
	if (to[0] == '#' && !subscribe_or_probe(type))
		return xa_muc_presence(xc, st); /* a group chat's room */
	if (!xa_local_user(xc->x, from, bare, sizeof(bare), local, sizeof(local))) {
		/* Another server's user (over s2s), or a name the gateway
		 * cannot carry: the component's contacts, and the gateway as
		 * one, are this server's users' only.  A subscribe or probe is
		 * answered as for a contact that does not exist, whatever the
		 * JID names (a remote user or nobody, a room, the gateway), so
		 * the answer says nothing of anyone; the other types are
		 * ignored (to_nobody).  Until the thirty-seventh session none
		 * was answered, and a stranger's subscribe stayed pending in
		 * her client for ever. */
		char l[XJ_PART_MAX + 1], d[XJ_PART_MAX + 1], r[XJ_PART_MAX + 1];
		if (xj_split(from, l, sizeof(l), d, sizeof(d), r, sizeof(r)) &&
		    (size_t)snprintf(bare, sizeof(bare), "%s%s%s", l, l[0] ? "@" : "", d) < sizeof(bare))
			to_nobody(xc, to, bare, type); /* to her bare JID, as a contact's server answers */
		return;
	}
	size_t to_bare = strcspn(to, "/");
	if (to_bare == strlen(xc->domain) && strncmp(to, xc->domain, to_bare) == 0) {
		/* the gateway itself as a contact (a full JID of it taken as
		 * its bare one, RFC 6121 §3.1.3: not nobody, to_nobody) */
		if (type && strcmp(type, "subscribe") == 0)
			presence_to(xc, true, xc->domain, bare, "subscribed", NULL);
		if (type && (strcmp(type, "subscribe") == 0 || strcmp(type, "probe") == 0))
			presence_to(xc, true, xc->domain, bare, NULL, NULL);
		if (type && strcmp(type, "unsubscribe") == 0)
			presence_to(xc, true, xc->domain, bare, "unavailable", NULL); /* gone: see below */
		return;
	}
	struct xconsent *j = calloc(1, sizeof(*j));
	if (!j)
		return;
	if (!xa_remote_user(xc, to, j->remote_id, sizeof(j->remote_id), j->remote_jid, sizeof(j->remote_jid))) {
		free(j);
		to_nobody(xc, to, bare, type); /* before the limit: nothing is written */
		return;
	}
	if (type && strcmp(type, "unsubscribe") == 0) {
		/* The user drops the contact (not a block): as the contact's
		 * server, the component says it is gone (RFC 6121 §3.3.3 step 3:
		 * "unavailable" from each of the contact's available resources to
		 * the user), or the user's clients keep showing it online (until
		 * the twentieth session they did: a review's finding). */
		presence_to(xc, true, j->remote_jid, bare, "unavailable", NULL);
		free(j);
		return;
	}
	if (!type || strcmp(type, "unavailable") == 0) {
		free(j); /* the user's own presence stays here */
		return;
	}
	if (strcmp(type, "probe") == 0) {
		/* The user asks how the contact is: it is there. */
		xa_vcard_presence(xc, j->remote_id, j->remote_jid, bare); /* available, with the avatar; none if blocked */
		free(j);
		return;
	}
	bool add = strcmp(type, "subscribe") == 0;
	if (!add && strcmp(type, "subscribed") != 0 && strcmp(type, "unsubscribed") != 0) {
		free(j);
		return;
	}
	/* A subscribe costs a write too (her identity, her consents read in
	 * the writer's transaction): limited as the decisions are, since the
	 * thirty-first session.  Past the limit nothing is recorded (a
	 * subscribe is not answered: `subscribed` would not know whether the
	 * contact is blocked), and that is said (a presence error to the bare
	 * JID the user's server stamped would be dropped). */
	bool notice = false;
	if (!user_update_allowed(xc, local, &notice)) {
		if (notice && add)
			xa_notice(xc, XA_NOW_KEPT, bare,
				  "You made too many contact changes in a short time: your adding of %s was not "
				  "answered (it stays asked for in your contacts). Remove it and add it again in a "
				  "minute.",
				  j->remote_jid);
		else if (notice)
			xa_notice(xc, XA_NOW_KEPT, bare,
				  "You made too many contact decisions in a short time: your %s of %s was not "
				  "recorded. Try again in a minute.",
				  type[0] == 's' ? "approval" : "refusal", j->remote_jid);
		free(j);
		return;
	}
	j->xc = xc;
	snprintf(j->local, sizeof(j->local), "%s", local);
	snprintf(j->local_bare, sizeof(j->local_bare), "%s", bare);
	if (add) {
		/* The user adds the contact: it is there, unless she blocked it
		 * (or its network): then `unsubscribed` and a notice, as a
		 * roster action undoes no block (consent_done).  Until the
		 * thirtieth session a blocked contact was answered `subscribed`
		 * and available, and her messages to it then bounced. */
		j->verb = V_SUBSCRIBE;
		consent_start(j);
		return;
	}
	/* `unsubscribed` denies a request (RFC 6121 §3.1.4), or cancels a
	 * subscription the user had approved (§3.2), which is also what the
	 * user's server sends when the user removes the contact from the roster
	 * (§2.5.2; Prosody sends only that when the user had not subscribed to
	 * the contact too). Only a denial is a block: a contact the user
	 * allowed stays allowed (the `block` command blocks it). Until the
	 * twenty-third session every `unsubscribed` blocked, and tidying the
	 * roster silently dropped the contact's next messages. */
	j->verb = type[0] == 's' ? V_ACCEPT : V_BLOCK;
	j->cancel_if_allowed = j->verb == V_BLOCK;
	/* `subscribed` approves a request (RFC 6121 §3.1.5); one with no
	 * request is a pre-approval (§3.4), which the user's server should
	 * keep to itself: Prosody 0.12 does, ejabberd 23.01 passes it on.
	 * A contact she blocked (or its network) is asked for nothing (the
	 * block decided its request, and the roster dropped it), so an
	 * approval of it is never an answer: it leaves the block (as her
	 * subscribe does), and she is told to use the accept command.  Until
	 * the fortieth session it unblocked, and a client restoring its
	 * roster through ejabberd undid her blocks unseen (a review's
	 * finding). */
	j->keep_blocked = j->verb == V_ACCEPT;
	consent_start(j);
}

/* ------------------------------------------------------------ commands */

/* Whether who, the party typed in a report, is a user of this provider's:
 * a JID of the XMPP domain (its localpart in any case: the user's server
 * keeps it in lower case, RFC 7622 §3.3) or a mimi:// address of a user
 * of one of its domains, as the Matrix bot's report takes one (and POST
 * /admin/v1/reports); if so her address into out.  A mimi:// address
 * under another component's domain is taken here too, as typed: it names
 * that component's contact, and the report's store makes it the peer's
 * user (policy_report_store), as the JID name@<component> is (until the
 * thirty-ninth session it was stored as a user of ours, never limited);
 * under this component's, it is its contact (component_contact, asked
 * first).  Another member of a
 * group writes to the user through the gateway, relayed by the
 * component, and her client can report only the component's JID for it.
 * Read from the text alone: the same whether the user exists or not. */
static bool own_user(struct xcomp *xc, const char *who, char *out, size_t len)
{
	struct xmpp *x = xc->x;
	struct mimi_uri u;
	cw_errmsg e;
	if (strncmp(who, "mimi://", 7) == 0)
		return mimi_uri_parse(who, &u, &e) == CW_OK && u.kind == MIMI_USER &&
		       policy_consent_subject_ours(x->app, "user", who) && (size_t)snprintf(out, len, "%s", who) < len;
	char jid[1100], bare[1100], local[MIMI_LOCAL_MAX + 1];
	if (strlen(who) >= sizeof(jid))
		return false;
	snprintf(jid, sizeof(jid), "%s", who);
	addr_fold_lower(jid, "@/");
	if (!strchr(jid, '@') || !xa_local_user(x, jid, bare, sizeof(bare), local, sizeof(local)))
		return false;
	int n = snprintf(out, len, "mimi://%s/u/%s", x->cfg->domain ? x->cfg->domain : "", local);
	return n > 0 && (size_t)n < len && mimi_uri_parse(out, &u, &e) == CW_OK && u.kind == MIMI_USER;
}

/* Whether who, the party typed in an accept, block or report, is one of
 * this provider's own users (a JID of one of its domains but the
 * components', or a mimi:// address of one: policy_consent_subject_ours)
 * or, *domain, one of its own domains; if so, the answer's text into
 * text.  The component's accept and block are about the contacts of its
 * network, and the policy asks a user's consents of remote senders only:
 * what local users send one another passes no decision (the admin API
 * refuses such a consent, 400).  Until the thirty-fourth session it was a
 * bare bad-request that said nothing.  A report takes a user of this
 * provider's (own_user, tried first): what is left here for it is a
 * domain, or a JID of one of the other domains (the Matrix server name,
 * server.domain where it is not the XMPP domain), which names no user of
 * the XMPP server; until the thirty-eighth session every user of this
 * provider's was refused (a review's finding).  Read from the text alone:
 * the same answer whether the user exists or not. */
static bool own_party(struct xcomp *xc, const char *who, bool report, char *text, size_t len)
{
	struct xmpp *x = xc->x;
	char l[XJ_PART_MAX + 1], d[XJ_PART_MAX + 1], r[XJ_PART_MAX + 1];
	bool domain;
	if (strncmp(who, "mimi://", 7) == 0) {
		if (!policy_consent_subject_ours(x->app, "user", who))
			return false;
		domain = false;
	} else if (xj_split(who, l, sizeof(l), d, sizeof(d), r, sizeof(r)) && !xa_comp_by_domain(x, d) &&
		   policy_consent_subject_ours(x->app, "domain", d)) {
		domain = !l[0];
	} else
		return false;
	if (report && domain)
		snprintf(text, len, "%s is a domain of this service, not a user: report names one user, a contact on "
			 "another network (name@%s) or a user of your own server (name@%s).",
			 who, xc->domain, x->local_domain);
	else if (report)
		snprintf(text, len, "%s is no user of your own server nor a contact on another network: report a user "
			 "of your server by their JID (name@%s) or address (mimi://%s/u/name), a contact by theirs "
			 "(name@%s).",
			 who, x->local_domain, x->cfg->domain ? x->cfg->domain : "", xc->domain);
	else if (domain)
		snprintf(text, len, "%s is a domain of this service, not another network: this gateway's accept and "
			 "block are for the contacts of other networks only, and what users of your server send one "
			 "another does not pass it. To block a user of your server, use your own client's blocking.",
			 who);
	else
		snprintf(text, len, "%s is a user of your own server, not a contact on another network: this gateway's "
			 "accept and block are for the contacts of other networks only, and what users of your "
			 "server send one another does not pass it. To block them, use your own client's blocking.",
			 who);
	return true;
}

/* Whether who, the party typed in an accept, block or report, is a
 * mimi:// address under a component's domain, mimi://<component>/u/<id>:
 * a contact of that component's network, as the JID <id>@<component> is
 * (no local user lives under a component's domain: its domain stands for
 * the peer's users; policy_report_store stores such a report so), or the
 * JID of another component's contact.  1: this component's contact, its
 * id and JID into j (decided as the JID is), or a report of another
 * component's contact by JID, its address into j->own_subject; -1:
 * another component's, of an accept or block, which this component's
 * roster cannot follow: the refusal's text into text; 0: neither (a
 * report of another component's contact by address is taken as typed:
 * own_user).  Until the fortieth session an accept or block of one was
 * refused as "a user of your own server", nothing stored. */
static int component_contact(struct xcomp *xc, const char *who, struct xconsent *j, char *text, size_t len)
{
	struct mimi_uri u;
	cw_errmsg e;
	if (strncmp(who, "mimi://", 7) != 0) {
		/* The JID of another component's contact, <id>@<component>,
		 * as its address is (until the forty-seventh session refused
		 * as "not a contact of this network", a report too, though
		 * the address was taken): a report is of its address (taken
		 * as typed, as own_user takes that), an accept or block
		 * refused naming that component.  This component's own
		 * contacts by JID are xa_command's (xa_remote_user). */
		char l[XJ_PART_MAX + 1], d[XJ_PART_MAX + 1], r[XJ_PART_MAX + 1], id[MIMI_LOCAL_MAX + 1], bare[1100];
		struct xcomp *of = xj_split(who, l, sizeof(l), d, sizeof(d), r, sizeof(r)) && l[0]
					   ? xa_comp_by_domain(xc->x, d) : NULL;
		if (!of || of == xc || !xa_remote_user(of, who, id, sizeof(id), bare, sizeof(bare)))
			return 0;
		if (j->verb != V_REPORT) {
			another_network(xc, of, bare, text, len);
			return -1;
		}
		int n = snprintf(j->own_subject, sizeof(j->own_subject), "mimi://%s/u/%s", of->domain, id);
		if (n < 0 || (size_t)n >= sizeof(j->own_subject) || mimi_uri_parse(j->own_subject, &u, &e) != CW_OK) {
			j->own_subject[0] = '\0';
			snprintf(text, len, "%s names no contact this gateway can give an address.", who);
			return -1;
		}
		return 1;
	}
	if (mimi_uri_parse(who, &u, &e) != CW_OK || u.kind != MIMI_USER)
		return 0;
	struct xcomp *of = xa_comp_by_domain(xc->x, u.domain);
	if (!of || (of != xc && j->verb == V_REPORT))
		return 0;
	if (of != xc) {
		another_network(xc, of, who, text, len);
		return -1;
	}
	if ((size_t)snprintf(j->remote_id, sizeof(j->remote_id), "%s", u.id) >= sizeof(j->remote_id) ||
	    !xa_remote_jid(xc, u.id, j->remote_jid, sizeof(j->remote_jid))) {
		snprintf(text, len, "%s names no contact this gateway can give a JID.", who);
		return -1;
	}
	return 1;
}

/* Whether who, the party typed in an accept, block or report, is a
 * mimi:// user address that none of the above took (not this provider's,
 * not under a component's domain): if so its domain and local part into
 * j (addr_domain, remote_id), whose it is decided in the command's job
 * (peer_address: the peers are the database's); a peer's own domain,
 * mimi://wa.example/u/wally, is the component's contact as
 * wally@<component> is.  Else the refusal's text into text: an address
 * that does not parse (why), a room's, or no address at all (until the
 * fortieth session all of these were a bare bad-request). */
static bool other_address(struct xcomp *xc, const char *who, struct xconsent *j, char *text, size_t len)
{
	struct mimi_uri u;
	cw_errmsg e;
	if (strncmp(who, "mimi://", 7) != 0) {
		if (j->verb == V_REPORT)
			snprintf(text, len, "%s is not a contact of this network: name one by their JID (name@%s) or "
				 "address (mimi://<their domain>/u/name).", who, xc->domain);
		else
			snprintf(text, len, "%s is not a contact of this network: name one by their JID (name@%s) or "
				 "address (mimi://<their domain>/u/name), or the whole network by %s.",
				 who, xc->domain, xc->domain);
		return false;
	}
	if (mimi_uri_parse(who, &u, &e) != CW_OK) {
		snprintf(text, len, "%s is not an address: %s. A contact's address is mimi://<their domain>/u/name.", who,
			 e.msg);
		return false;
	}
	if (u.kind != MIMI_USER) {
		snprintf(text, len, "%s is a room, not a user: name one contact, by their JID (name@%s) or address "
			 "(mimi://<their domain>/u/name).", who, xc->domain);
		return false;
	}
	snprintf(j->addr_domain, sizeof(j->addr_domain), "%s", u.domain);
	snprintf(j->remote_id, sizeof(j->remote_id), "%s", u.id);
	snprintf(j->address, sizeof(j->address), "%s", who); /* parsed: it fits */
	return true;
}

/* The first stage of accept, block and report: the form. */
static void command_form(struct xcomp *xc, xmpp_stanza_t *iq, const char *node, bool reason)
{
	xmpp_ctx_t *ctx = xc->ctx;
	xmpp_stanza_t *x;
	xmpp_stanza_t *r = xa_command_stage(xc, iq, node, &x);
	xmpp_stanza_t *f = x ? xa_child(ctx, x, "field", NULL) : NULL;
	if (f) {
		char label[2 * XJ_PART_MAX + 100];
		if (reason) /* a report: one user, of that network or of this server */
			snprintf(label, sizeof(label), "Contact (name@%s), or a user of your server (name@%s)",
				 xc->domain, xc->x->local_domain);
		else
			snprintf(label, sizeof(label), "Contact (name@%s), or %s for everyone of that network",
				 xc->domain, xc->domain);
		xmpp_stanza_set_attribute(f, "var", "jid");
		xmpp_stanza_set_attribute(f, "type", "jid-single");
		xmpp_stanza_set_attribute(f, "label", label);
		xa_child(ctx, f, "required", NULL);
	}
	if (x && reason && (f = xa_child(ctx, x, "field", NULL))) {
		xmpp_stanza_set_attribute(f, "var", "reason");
		xmpp_stanza_set_attribute(f, "type", "text-single");
		xmpp_stanza_set_attribute(f, "label", "What happened (optional)");
	}
	xa_send_now(xc, r);
}

/* A command's error answer: the RFC 6120 condition of type, XEP-0050's
 * (cmd_cond, may be NULL) beside it, and text (may be NULL). */
static void command_error(struct xcomp *xc, xmpp_stanza_t *iq, const char *type, const char *cond,
			  const char *cmd_cond, const char *text)
{
	xmpp_stanza_t *r = xa_error_reply(iq, type, cond, text);
	xmpp_stanza_t *err = r && cmd_cond ? xmpp_stanza_get_child_by_name(r, "error") : NULL;
	if (err)
		xa_child(xc->ctx, err, cmd_cond, XA_NS_COMMANDS);
	xa_send_now(xc, r);
}

/* A submitted form refused for what it names (a party no command here
 * takes): bad-request with XEP-0050's bad-payload, as xa_cmd_read's
 * refusals of the form itself (until the forty-seventh session a bare
 * bad-request). */
static void payload_refused(struct xcomp *xc, xmpp_stanza_t *iq, const char *text)
{
	command_error(xc, iq, "modify", "bad-request", "bad-payload", text);
}

/* XEP-0050: action is execute, cancel, prev, next or complete; no
 * command here has a stage that offers prev (a form's only action is
 * complete).  Until the twentieth session any other value ran the
 * command (a review's finding).  Then the session (see above): XEP-0050
 * errors bad-sessionid and session-expired; a staged command's later
 * stage without a sessionid is bad-sessionid too (until the twenty-fifth
 * session it ran as a new session, the form skipped). */
bool xa_command_bad_action(struct xcomp *xc, xmpp_stanza_t *iq, const char *action, bool staged)
{
	const char *why = xa_cmd_action_problem(action);
	xmpp_stanza_t *cmd = xmpp_stanza_get_child_by_name_and_ns(iq, "command", XA_NS_COMMANDS);
	const char *sid = cmd ? xmpp_stanza_get_attribute(cmd, "sessionid") : NULL;
	enum session_state state = SESSION_OK;
	if (!why && sid)
		state = session_take(xc, iq, xmpp_stanza_get_attribute(cmd, "node"), sid);
	else if (!why && staged && cmd && xa_cmd_later_stage(cmd, action))
		state = SESSION_UNKNOWN;
	if (!why && state == SESSION_OK)
		return false;
	bool expired = state == SESSION_EXPIRED;
	command_error(xc, iq, expired ? "cancel" : "modify", expired ? "not-allowed" : "bad-request",
		      why ? why : expired ? "session-expired" : "bad-sessionid", NULL);
	return true;
}

/* What the answer to a command needs of it (xa_command_end: its id,
 * addresses and sessionid), as text for the job to keep: not the whole
 * iq, whose form may hold a report's reason of 8 KB (until the thirtieth
 * session the whole iq was kept).  NULL when memory runs out. */
static char *iq_skeleton(xmpp_ctx_t *ctx, xmpp_stanza_t *iq, xmpp_stanza_t *cmd)
{
	xmpp_stanza_t *s = xmpp_iq_new(ctx, "set", xmpp_stanza_get_id(iq));
	xmpp_stanza_t *c = s ? xa_child(ctx, s, "command", XA_NS_COMMANDS) : NULL;
	char *text = NULL, *buf = NULL;
	size_t len = 0;
	if (c) {
		xmpp_stanza_set_from(s, xmpp_stanza_get_from(iq));
		xmpp_stanza_set_to(s, xmpp_stanza_get_to(iq));
		const char *sid = xmpp_stanza_get_attribute(cmd, "sessionid");
		if (sid)
			xmpp_stanza_set_attribute(c, "sessionid", sid);
		if (xmpp_stanza_to_text(s, &buf, &len) == XMPP_EOK && buf) {
			text = strdup(buf);
			xmpp_free(ctx, buf);
		}
	}
	if (s)
		xmpp_stanza_release(s);
	return text;
}

bool xa_command(struct xcomp *xc, xmpp_stanza_t *iq)
{
	xmpp_stanza_t *cmd = xmpp_stanza_get_child_by_name_and_ns(iq, "command", XA_NS_COMMANDS);
	struct xconsent *j = calloc(1, sizeof(*j));
	struct xa_cmd_req *req = j ? malloc(sizeof(*req)) : NULL; /* 9 KB: not on the stream thread's stack */
	if (!req) {
		free(j);
		return false;
	}
	j->xc = xc;
	/* Anyone but a local user learns nothing, not even whether a command
	 * exists: service-unavailable, as for any stranger (docs/security.md;
	 * until the thirtieth session forbidden, after item-not-found for a
	 * node not there).  Then what the request is, read from the stanza
	 * alone (xa_cmd_read): a command without a node, or asked with get
	 * (XEP-0050 runs them with set), is malformed: bad-request (RFC 6120
	 * §8.3.3.1; until then service-unavailable); a node not there
	 * item-not-found; an action XEP-0050 has not bad-request. */
	if (!xa_local_user(xc->x, xmpp_stanza_get_from(iq), j->local_bare, sizeof(j->local_bare), j->local,
			   sizeof(j->local))) {
		free(req);
		free(j);
		xa_send_now(xc, xa_error_reply(iq, "cancel", "service-unavailable", NULL));
		return true;
	}
	xa_cmd_read(iq, req);
	if (req->what == XA_CMD_REFUSED) {
		command_error(xc, iq, req->error_type, req->error, req->cmd_error, NULL);
		free(req);
		free(j);
		return true;
	}
	const char *node = req->node;
	size_t k = (size_t)req->command;
	snprintf(j->node, sizeof(j->node), "%s", node);
	/* the session (a later stage's), before anything of the stage is
	 * answered */
	if (xa_command_bad_action(xc, iq, req->action, xa_commands[k].staged)) {
		free(req);
		free(j);
		return true;
	}
	static const enum verb verbs[] = { V_LIST, V_ACCEPT, V_BLOCK, V_OPTIN, V_OPTOUT, V_REPORT }; /* xa_commands' */
	j->verb = verbs[k];
	switch (req->what) {
	case XA_CMD_CANCEL:
		/* action cancel, or the form sent back as cancel (XEP-0004
		 * §3.1: the requester cancelled it; its session is ended,
		 * xa_command_bad_action): canceled.  Until the thirty-sixth
		 * session the latter was given the form again, in a new
		 * session. */
		free(req);
		free(j);
		xa_send_now(xc, xa_command_end(xc->ctx, iq, node, "canceled", NULL, NULL));
		return true;
	case XA_CMD_FORM:
		free(req);
		command_form(xc, iq, node, j->verb == V_REPORT);
		free(j);
		return true;
	case XA_CMD_BAD_FORM:
		/* one contact a time (until the thirty-sixth session the first
		 * of two was decided alone, and the user told only of it), a
		 * reason of at most 8192 bytes */
		command_error(xc, iq, req->error_type, req->error, req->cmd_error, req->text);
		free(req);
		free(j);
		return true;
	case XA_CMD_REFUSED:
	case XA_CMD_RUN:
	case XA_CMD_SUBMIT:
		break;
	}
	if (req->what == XA_CMD_SUBMIT) {
		const char *jid = req->jid;
		memcpy(j->reason, req->reason, sizeof(j->reason));
		char own[sizeof(req->jid) + 3 * XJ_PART_MAX + 400];
		int contact = component_contact(xc, jid, j, own, sizeof(own));
		if (contact < 0) {
			free(req);
			free(j);
			payload_refused(xc, iq, own);
			return true;
		} else if (contact > 0) {
			; /* this component's contact, as its JID (component_contact) */
		} else if (strcmp(jid, xc->domain) == 0 && j->verb != V_REPORT) {
			j->whole_domain = true;
		} else if (j->verb == V_REPORT && own_user(xc, jid, j->own_subject, sizeof(j->own_subject))) {
			/* the user herself, under any of the domains this
			 * provider's users live under (policy_same_local_user:
			 * until the thirty-ninth session only as
			 * mimi://<server.domain>/u/<her>): no report (as the
			 * Matrix bot's) */
			const char *dom = xc->x->cfg->domain ? xc->x->cfg->domain : "";
			char me[MIMI_URI_MAX + 1];
			snprintf(me, sizeof(me), "mimi://%s/u/%s", dom, j->local);
			if (policy_same_local_user(xc->x->app, j->own_subject, me)) {
				free(req);
				free(j);
				payload_refused(xc, iq, "That is you: name the user you report.");
				return true;
			}
		} else if (own_party(xc, jid, j->verb == V_REPORT, own, sizeof(own))) {
			free(req);
			free(j);
			payload_refused(xc, iq, own);
			return true;
		} else if (xa_remote_user(xc, jid, j->remote_id, sizeof(j->remote_id), j->remote_jid,
					    sizeof(j->remote_jid))) {
			; /* this component's contact by JID */
		} else if (!other_address(xc, jid, j, own, sizeof(own))) {
			free(req);
			free(j);
			payload_refused(xc, iq, own);
			return true;
		}
	}
	free(req);
	/* What the answer needs, before a token is taken: until the
	 * fiftieth session it was made after, and a command that found
	 * memory short kept the user's token. */
	if (!(j->iq = iq_skeleton(xc->ctx, iq, cmd))) {
		free(j);
		return false;
	}
	/* Every command run (list too, a query each), apart from her changes'
	 * bucket (policy_user_command_allowed, shared with the Matrix bot's
	 * commands); an iq is answered either way, so each refusal is one
	 * error and nothing more.  Until the fifty-second session list was
	 * not limited at all. */
	if (!policy_user_command_allowed(xc->x->app->policy, xc->x->app->limits, j->local, NULL)) {
		xconsent_free(j);
		xa_send_now(xc, xa_error_reply(iq, "wait", "resource-constraint",
					       "Too many commands in a short time; try again in a minute."));
		return true;
	}
	/* Refused here, it keeps the commands token above (as the Matrix
	 * bot's refused changes do: mx_bot.c, change_allowed): it was run as
	 * far as this, and answered. */
	if (j->verb != V_LIST && !user_update_allowed(xc, j->local, NULL)) {
		xconsent_free(j);
		xa_send_now(xc, xa_error_reply(iq, "wait", "resource-constraint",
					       "Too many changes in a short time; try again in a minute."));
		return true;
	}
	consent_start(j);
	return true;
}

/* ------------------------------------------------------------ requests */

#define REQUESTS_PAGE 100 /* consent requests sent in one housekeeping turn */

void xa_requests(struct xcomp *xc, PGconn *c)
{
	/* After a (re)connect every pending request goes again, a page a
	 * turn (the thread's loop stays responsive), in the order of their
	 * ids from resend_after on; new ones go whenever they come. */
	char after[24], page[16];
	snprintf(after, sizeof(after), "%lld", xc->resend_after);
	snprintf(page, sizeof(page), "%d", REQUESTS_PAGE);
	const char *params[] = { xc->peer, xc->resend_pending ? "t" : "f", xc->x->local_domain, after, page };
	PGresult *r = PQexecParams(c,
		"SELECT q.id, coalesce(lb.native_id, li.localpart || '@' || $3), ri.localpart, coalesce(ri.display_name, ''), "
		" ri.uri, q.notified_at IS NULL FROM consent_requests q "
		" JOIN identities li ON li.id = q.local_identity_id AND li.is_local AND li.network = 'xmpp' "
		" JOIN identities ri ON ri.id = q.remote_identity_id JOIN peers p ON p.id = ri.peer_id AND p.name = $1 "
		" LEFT JOIN identity_bindings lb ON lb.identity_id = li.id AND lb.network = 'xmpp' "
		"WHERE q.state = 'pending' AND (q.notified_at IS NULL OR ($2::boolean AND q.id > $4::bigint)) "
		"ORDER BY q.id LIMIT $5::int",
		5, NULL, params, NULL, NULL, 0);
	/* The requests whose notice goes now (a bigint[] literal,
	 * cw_pg_ids_begin): marked sent in one statement after the page
	 * (until the fiftieth session one UPDATE a request, a hundred round
	 * trips of the stream's lock connection for a page of new requests).
	 * No memory: the page on the next turn. */
	struct cw_pg_ids shown;
	if (PQresultStatus(r) != PGRES_TUPLES_OK || !cw_pg_ids_begin(&shown, NULL, (size_t)PQntuples(r))) {
		PQclear(r);
		return;
	}
	/* The page holds every pending request with an id above the cursor
	 * up to its last one: the next page starts there (never back: new
	 * requests of lower ids, not yet shown, may come first).  A short
	 * page was the last. */
	if (xc->resend_pending) {
		long long last = PQntuples(r) ? atoll(PQgetvalue(r, PQntuples(r) - 1, 0)) : 0;
		if (PQntuples(r) < REQUESTS_PAGE)
			xc->resend_pending = false;
		else if (last > xc->resend_after)
			xc->resend_after = last;
	}
	size_t nshown = 0;
	for (int i = 0; i < PQntuples(r); i++) {
		char remote[XJ_JID_MAX + 1];
		if (!xa_remote_jid(xc, PQgetvalue(r, i, 2), remote, sizeof(remote)))
			continue;
		/* The nick (which clients offer as the roster's name) and the
		 * notice's name as the vCard's (xa_peer_name): until the
		 * thirty-first session both were the peer's name as it gave it,
		 * so that "Causeway bot" and a bidirectional control hid the
		 * "(<peer>)" in the user's roster. */
		const char *local = PQgetvalue(r, i, 1);
		char nick[XA_PEER_NAME_MAX];
		xa_peer_name(xc, PQgetvalue(r, i, 3), PQgetvalue(r, i, 2), nick, sizeof(nick));
		presence_to(xc, true, remote, local, "subscribe", nick);
		if (PQgetvalue(r, i, 5)[0] == 't') {
			/* now: kept for a re-send, for it is marked sent below */
			xa_notice(xc, XA_NOW_KEPT, local,
				  "%s%s%s (%s, network %s) wants to write to you. Their messages wait until you answer: "
				  "approve their contact request to accept them, deny it to block them (or use this "
				  "gateway's commands). The conversation is bridged: end-to-end encryption ends at "
				  "this gateway.",
				  nick, *nick ? " " : "", remote, PQgetvalue(r, i, 4), xc->peer);
			cw_pg_ids_add(&shown, atoll(PQgetvalue(r, i, 0)));
			nshown++;
		}
	}
	PQclear(r);
	char *text = cw_pg_ids_end(&shown);
	if (nshown && text) {
		const char *ids[] = { text };
		PGresult *u = PQexecParams(c, "UPDATE consent_requests SET notified_at = now() WHERE id = ANY ($1::bigint[])",
					   1, NULL, ids, NULL, NULL, 0);
		PQclear(u);
	}
	free(text);
}

/* Where the component's roster sync stands (xmpp_roster_sync), or -1 when
 * it never ran; -2 when it cannot be read now. */
static long long roster_cursor(struct xcomp *xc, PGconn *c)
{
	const char *params[] = { xc->domain };
	PGresult *r = PQexecParams(c, "SELECT audit_id FROM xmpp_roster_sync WHERE component = $1", 1, NULL, params,
				   NULL, NULL, 0);
	long long at = PQresultStatus(r) != PGRES_TUPLES_OK ? -2 : PQntuples(r) ? atoll(PQgetvalue(r, 0, 0)) : -1;
	PQclear(r);
	return at;
}

static bool roster_cursor_set(struct xcomp *xc, PGconn *c, long long at)
{
	char v[24];
	snprintf(v, sizeof(v), "%lld", at);
	const char *params[] = { xc->domain, v };
	PGresult *r = PQexecParams(c,
		"INSERT INTO xmpp_roster_sync (component, audit_id) VALUES ($1, $2::bigint) "
		"ON CONFLICT (component) DO UPDATE SET audit_id = excluded.audit_id, updated_at = now()",
		2, NULL, params, NULL, NULL, 0);
	bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
	PQclear(r);
	return ok;
}

/* The roster sync reads the audit log by id.  An id is taken when a
 * record is written and seen when its transaction commits: a record may
 * commit after one of a higher id was read (the first transaction
 * committed last).  Until the thirty-second session the cursor went past
 * it (max(id)), and that change never reached the roster (an expired
 * request stayed shown).  Now an id missing below what was read (a gap) is
 * read again each turn until its record is there, and given up after
 * app_stuck_write_ms (a minute, or twice database.statement_timeout_ms if
 * that is longer: a rolled-back transaction's id never comes); the stored
 * cursor stays below the lowest gap. */
#define AUDIT_SPAN 20000 /* ids read in one turn: a holder far behind catches up a page a second */

int64_t xa_open_write_wait_ms(const struct xcomp *xc)
{
	return app_stuck_write_ms(xc->x->cfg);
}

/* The gaps as a bigint[] literal ("{1,2}") in out. */
static void audit_gaps_text(const struct xcomp *xc, char out[CW_PG_IDS_SIZE(XA_AUDIT_GAPS)])
{
	struct cw_pg_ids a;
	cw_pg_ids_begin(&a, out, XA_AUDIT_GAPS);
	for (int i = 0; i < xc->audit_ngaps; i++)
		cw_pg_ids_add(&a, xc->audit_gaps[i].id);
	cw_pg_ids_end(&a);
}

/* The new gaps from missing (ids, highest first, up to XA_AUDIT_GAPS + 1
 * rows: more than the list holds), those missed before keeping the time
 * they were first missed; old ones (and the lowest of too many) given up. */
static void audit_gaps_update(struct xcomp *xc, PGresult *missing, int64_t now)
{
	struct xa_audit_gap kept[XA_AUDIT_GAPS];
	int n = 0;
	long long gave_up = 0;
	for (int i = 0; i < PQntuples(missing); i++) {
		long long id = atoll(PQgetvalue(missing, i, 0));
		int64_t since = now;
		for (int k = 0; k < xc->audit_ngaps; k++)
			if (xc->audit_gaps[k].id == id)
				since = xc->audit_gaps[k].since_ms;
		if (n == XA_AUDIT_GAPS || now - since >= xa_open_write_wait_ms(xc)) {
			gave_up = id;
			continue;
		}
		kept[n].id = id;
		kept[n++].since_ms = since;
	}
	if (gave_up) {
		char v[24];
		snprintf(v, sizeof(v), "%lld", gave_up);
		LOG_KV_LIMITED(CW_LOG_INFO,
			       "xmpp roster sync: an audit log id missing for long (a rolled-back transaction's) is "
			       "passed over",
			       "component", xc->domain, "audit_id", v);
	}
	memcpy(xc->audit_gaps, kept, (size_t)n * sizeof(kept[0]));
	xc->audit_ngaps = n;
}

void xa_roster_sync(struct xcomp *xc, PGconn *c)
{
	PGresult *r;
	if (xc->audit_seen < 0) {
		/* This process just took the stream: it goes on from where the
		 * last holder stopped (changes made while nobody held it are sent
		 * now), or, the first time ever, from now on. */
		r = PQexec(c, "SELECT coalesce(max(id), 0) FROM audit_log");
		if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
			PQclear(r);
			return;
		}
		long long top = atoll(PQgetvalue(r, 0, 0));
		PQclear(r);
		long long at = roster_cursor(xc, c);
		if (at == -2)
			return; /* tried again in a second */
		if ((at == -1 || at > top) && !roster_cursor_set(xc, c, top))
			return;
		xc->audit_seen = xc->audit_read = at == -1 || at > top ? top : at;
		xc->audit_ngaps = 0;
	}
	/* One snapshot: what is missing is what the rows read do not hold. */
	cw_errmsg e;
	if (store_exec(c, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", &e))
		return;
	r = PQexec(c, "SELECT coalesce(max(id), 0) FROM audit_log");
	if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
		PQclear(r);
		store_end(c, CW_EIO, &e);
		return;
	}
	long long top = atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
	if (top <= xc->audit_read && !xc->audit_ngaps) {
		store_end(c, CW_OK, &e);
		return;
	}
	long long upto = top < xc->audit_read ? xc->audit_read
		       : top - xc->audit_read > AUDIT_SPAN ? xc->audit_read + AUDIT_SPAN : top;
	char seen[24], upto_s[24], gaps[CW_PG_IDS_SIZE(XA_AUDIT_GAPS)], limit[16];
	snprintf(seen, sizeof(seen), "%lld", xc->audit_read);
	snprintf(upto_s, sizeof(upto_s), "%lld", upto);
	snprintf(limit, sizeof(limit), "%d", XA_AUDIT_GAPS + 1);
	audit_gaps_text(xc, gaps);
	const char *mparams[] = { seen, upto_s, gaps, limit };
	PGresult *missing = PQexecParams(c,
		"SELECT s.g FROM (SELECT generate_series($1::bigint + 1, $2::bigint) UNION SELECT unnest($3::bigint[])) s(g) "
		"WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.id = s.g) "
		/* The gaps already waited for first: cut off by the limit
		 * behind newer ones, they were passed over before their time,
		 * unlogged (the session's review, rC). */
		"ORDER BY s.g = ANY ($3::bigint[]) DESC, 1 DESC LIMIT $4::int",
		4, NULL, mparams, NULL, NULL, 0);
	if (PQresultStatus(missing) != PGRES_TUPLES_OK) {
		PQclear(missing);
		store_end(c, CW_EIO, &e);
		return; /* tried again in a second */
	}
	const struct cw_config *cfg = xc->x->cfg;
	const char *params[] = { seen, upto_s, xc->peer, xc->x->local_domain, cfg->domain ? cfg->domain : "", gaps };
/* the records read this turn: those above the cursor and the gaps' */
#define AUDIT_READ_SQL "(a.id > $1::bigint AND a.id <= $2::bigint OR a.id = ANY ($6::bigint[]))"
	r = PQexecParams(c,
		"SELECT coalesce(lb.native_id, substr(a.details->>'user', length('mimi://' || $5 || '/u/') + 1) "
		" || '@' || $4), substr(a.details->>'subject', length('mimi://' || p.domain || '/u/') + 1), a.id, 'drop' "
		"FROM audit_log a JOIN peers p ON p.name = $3 "
		" AND starts_with(a.details->>'subject', 'mimi://' || p.domain || '/u/') "
		" LEFT JOIN identities li ON li.uri = a.details->>'user' AND li.is_local "
		" LEFT JOIN identity_bindings lb ON lb.identity_id = li.id AND lb.network = 'xmpp' "
		"WHERE " AUDIT_READ_SQL " AND (a.actor = 'admin' OR starts_with(a.actor, 'admin:')) AND a.action = 'consent.set' "
		" AND starts_with(a.details->>'user', 'mimi://' || $5 || '/u/') "
		" AND a.details->>'subject_kind' = 'user' AND a.details->>'state' IN ('blocked', 'none') "
		/* a whole network's block: the user's contacts of it (since the
		 * thirtieth session) */
		"UNION ALL SELECT coalesce(lb.native_id, li.localpart || '@' || $4), c.localpart, a.id, 'drop' "
		"FROM audit_log a JOIN peers p ON p.name = $3 AND a.details->>'subject' = p.domain "
		" JOIN identities li ON li.uri = a.details->>'user' AND li.is_local "
		" LEFT JOIN identity_bindings lb ON lb.identity_id = li.id AND lb.network = 'xmpp' "
		" CROSS JOIN LATERAL (" NETWORK_CONTACTS_SQL("li.id", "p.id") ") c "
		"WHERE " AUDIT_READ_SQL " AND (a.actor = 'admin' OR starts_with(a.actor, 'admin:')) "
		" AND a.action = 'consent.set' AND starts_with(a.details->>'user', 'mimi://' || $5 || '/u/') "
		" AND a.details->>'subject_kind' = 'domain' AND a.details->>'state' = 'blocked' "
		/* an accept (of a contact, or a whole network) that decided
		 * requests shown to the user: withdrawn from the roster, as the
		 * accept command does (decided in the audit record's
		 * transaction: its now()) */
		"UNION ALL SELECT coalesce(lb.native_id, li.localpart || '@' || $4), ri.localpart, a.id, 'withdraw' "
		"FROM audit_log a JOIN peers p ON p.name = $3 "
		" JOIN identities li ON li.uri = a.details->>'user' AND li.is_local "
		" LEFT JOIN identity_bindings lb ON lb.identity_id = li.id AND lb.network = 'xmpp' "
		" JOIN consent_requests q ON q.local_identity_id = li.id AND q.state = 'accepted' AND q.decided_at = a.at "
		"  AND q.notified_at IS NOT NULL "
		" JOIN identities ri ON ri.id = q.remote_identity_id AND ri.peer_id = p.id "
		"WHERE " AUDIT_READ_SQL " AND (a.actor = 'admin' OR starts_with(a.actor, 'admin:')) "
		" AND a.action = 'consent.set' AND starts_with(a.details->>'user', 'mimi://' || $5 || '/u/') "
		" AND a.details->>'state' = 'allowed' AND a.details->>'requests_decided' <> '0' "
		/* a request shown to the user that expired (the policy's sweep
		 * records it, consent.expire): withdrawn the same way, unless a
		 * new request of the pair is pending (since the thirty-first
		 * session) */
		"UNION ALL SELECT coalesce(lb.native_id, li.localpart || '@' || $4), ri.localpart, a.id, 'withdraw' "
		"FROM audit_log a JOIN consent_requests q ON q.id = (a.details->>'request')::bigint "
		"  AND q.state = 'expired' AND q.notified_at IS NOT NULL "
		" JOIN identities li ON li.id = q.local_identity_id AND li.is_local AND li.network = 'xmpp' "
		" LEFT JOIN identity_bindings lb ON lb.identity_id = li.id AND lb.network = 'xmpp' "
		" JOIN identities ri ON ri.id = q.remote_identity_id JOIN peers p ON p.id = ri.peer_id AND p.name = $3 "
		"WHERE " AUDIT_READ_SQL " AND a.actor = 'policy' AND a.action = 'consent.expire' "
		" AND NOT EXISTS (SELECT 1 FROM consent_requests n WHERE n.local_identity_id = q.local_identity_id "
		"  AND n.remote_identity_id = q.remote_identity_id AND n.state = 'pending') ORDER BY 3",
		6, NULL, params, NULL, NULL, 0);
#undef AUDIT_READ_SQL
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		PQclear(r);
		PQclear(missing);
		store_end(c, CW_EIO, &e);
		return; /* tried again in a second */
	}
	store_end(c, CW_OK, &e); /* read only: what was read stands */
	for (int i = 0; i < PQntuples(r); i++) {
		char remote[XJ_JID_MAX + 1];
		if (!xa_remote_jid(xc, PQgetvalue(r, i, 1), remote, sizeof(remote)))
			continue;
		if (PQgetvalue(r, i, 3)[0] == 'w')
			presence_to(xc, true, remote, PQgetvalue(r, i, 0), "unsubscribe", NULL);
		else
			roster_drop(xc, true, remote, PQgetvalue(r, i, 0));
	}
	PQclear(r);
	audit_gaps_update(xc, missing, cw_now_us() / 1000);
	PQclear(missing);
	xc->audit_read = upto;
	long long done = upto;
	for (int i = 0; i < xc->audit_ngaps; i++)
		if (xc->audit_gaps[i].id <= done)
			done = xc->audit_gaps[i].id - 1;
	/* Kept for the next holder of the stream; if that fails, this process
	 * goes on from memory and the next holder sends the pairs again
	 * (harmless: the roster is already out of step with nothing); so it
	 * does with those read above a gap. */
	if (done != xc->audit_seen && roster_cursor_set(xc, c, done))
		xc->audit_seen = done;
}
