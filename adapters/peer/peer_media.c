/* Media for peers: see peer_media.h. */
#include "config.h"
#include "peer_media.h"
#include "peer_api.h"
#include "peers.h"
#include "event.h"
#include "log.h"
#include "store.h"
#include "workers.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MEDIA_URL_MAX 2048 /* what event validation allows an attachment URL */
#define TOKEN_MAX 255      /* one path segment (CW_ROUTE_PARAM_LEN - 1) */

/* The scope of public tokens: no peer name holds a line feed, so a token
 * made for a peer never opens as public, nor the reverse. */
#define PUBLIC_SCOPE "\npublic"
#define FETCH_TIMEOUT_MS 30000L
/* A public link's scope: seven lines (public_scope), a domain of up to
 * 253 characters and an event id of up to 68 among them. */
#define SCOPE_MAX 520

static bool decimal(const char *s)
{
	return *s && strlen(s) <= 19 && strspn(s, "0123456789") == strlen(s);
}

/* The scope of a public token for a file of a declared size (size: its
 * decimal digits; NULL: none declared) that may be followed until exp
 * (unix seconds, decimal), named by the peer of domain by (NULL: none,
 * the fetch is never signed): the MAC covers all three, so the link caps
 * the fetch at what the policy's max_attachment_bytes judged, ends after
 * server.media_link_lifetime_s, and lends Causeway's signature to no
 * other host than by's (media_fetch_peer).  A link made before the
 * nineteenth session has no by and opens as one with none.  exp NULL: the
 * scope of a link made before the eighteenth session (no expiry;
 * "\npublic" or "\npublic\n<size>"), only to tell such a link from a
 * forged one.  The digits and a domain hold no line feed, so this scope
 * is no peer's nor another size's, time's or domain's.  sha256 (since
 * the thirty-first session; NULL: none declared, or a link made before)
 * is the attachment's declared digest, which the fetched file must
 * match: with it the scope has a line of by (empty for none) and one of
 * the digest, six lines, so no scope of fewer lines.  ev (since the
 * forty-third session's review; NULL: a link made before) is the public
 * id of the message that carried the file, which must still be there
 * for the file to be served (event_holds): with it the scope has a line
 * of by, one of the digest (each empty for none) and one of ev, seven
 * lines, so no scope of fewer. */
static bool public_scope(const char *size, const char *exp, const char *by, const char *sha256, const char *ev,
			 char *out, size_t len)
{
	if ((size && !decimal(size)) || (exp && !decimal(exp)) || (by && (!exp || !peer_domain_valid(by))) ||
	    (sha256 && (!exp || strlen(sha256) != 64 || strspn(sha256, "0123456789abcdef") != 64)) ||
	    (ev && (!exp || !message_id_valid(ev))))
		return false;
	if (!exp)
		return (size_t)snprintf(out, len, "%s%s%s", PUBLIC_SCOPE, size ? "\n" : "", size ? size : "") < len;
	if (ev)
		return (size_t)snprintf(out, len, "%s\n%s\n%s\n%s\n%s\n%s", PUBLIC_SCOPE, size ? size : "", exp,
					by ? by : "", sha256 ? sha256 : "", ev) < len;
	if (sha256)
		return (size_t)snprintf(out, len, "%s\n%s\n%s\n%s\n%s", PUBLIC_SCOPE, size ? size : "", exp,
					by ? by : "", sha256) < len;
	return (size_t)snprintf(out, len, "%s\n%s\n%s%s%s", PUBLIC_SCOPE, size ? size : "", exp, by ? "\n" : "",
				by ? by : "") < len;
}

/* A peer's URL may be long (a CDN's signed link): the source goes in the
 * query, the MAC in the path,
 * /media/<MAC>?src=<base64url source>[&size=<n>]&exp=<unix seconds>[&by=<domain>][&sha256=<hex>][&ev=<id>]. */
bool peer_media_public_url(struct cw_app *app, const char *url, long long size, const char *by,
			   const char *sha256, const char *ev, char *out, size_t len)
{
	char base[CFG_PUBLIC_URL_MAX + 1], token[3 * MEDIA_URL_MAX], digits[24], exp[24], scope[SCOPE_MAX], tail[480];
	snprintf(digits, sizeof(digits), "%lld", size);
	snprintf(exp, sizeof(exp), "%lld", (long long)(cw_wall_ms() / 1000) + (long long)app->cfg->media_link_lifetime_s);
	if (strncmp(url, "https://", 8) != 0 || !peer_base_url(app, base, sizeof(base)) ||
	    !public_scope(size >= 0 ? digits : NULL, exp, by, sha256, ev, scope, sizeof(scope)) ||
	    !media_token_make(app->media_key, scope, url, token, sizeof(token)))
		return false;
	char *dot = strrchr(token, '.');
	*dot = '\0';
	/* A domain and an event id are of URL-safe characters
	 * (peer_domain_valid, message_id_valid). */
	snprintf(tail, sizeof(tail), "exp=%s%s%s%s%s%s%s", exp, by ? "&by=" : "", by ? by : "",
		 sha256 ? "&sha256=" : "", sha256 ? sha256 : "", ev ? "&ev=" : "", ev ? ev : "");
	if (size < 0)
		return (size_t)snprintf(out, len, "%s/media/%s?src=%s&%s", base, dot + 1, token + 3, tail) < len;
	return (size_t)snprintf(out, len, "%s/media/%s?src=%s&size=%s&%s", base, dot + 1, token + 3, digits,
				tail) < len;
}

json_t *peer_media_public(struct cw_app *app, json_t *ev)
{
	const json_t *atts = json_object_get(json_object_get(ev, "content"), "attachments");
	if (!json_array_size(atts))
		return json_incref(ev);
	/* The peer that named the files: the sender's domain, which the peer
	 * API makes the calling peer's (peer_api.c refuses "sender must be a
	 * user of the calling peer's domain" on every way an event of a peer
	 * comes in).  A local user's files (the domain is ours) or an event
	 * without a sender: no peer, never signed. */
	const char *sender = json_string_value(json_object_get(ev, "sender"));
	/* The message that carries the files: a link serves its file only
	 * while that message is there (event_holds).  An event without a
	 * valid id gets links bound to none, as before. */
	const char *id = json_string_value(json_object_get(ev, "id"));
	if (id && !message_id_valid(id))
		id = NULL;
	struct mimi_uri su;
	cw_errmsg e;
	const char *by = sender && !mimi_uri_parse(sender, &su, &e) && !app_domain_is_ours(app, su.domain) &&
				 peer_domain_valid(su.domain)
			 ? su.domain
			 : NULL;
	json_t *copy = json_deep_copy(ev), *a;
	size_t i;
	json_array_foreach(json_object_get(json_object_get(copy, "content"), "attachments"), i, a) {
		const char *url = json_string_value(json_object_get(a, "url"));
		const json_t *size = json_object_get(a, "size");
		char link[3 * MEDIA_URL_MAX]; /* the source's base64 is 4/3 of it, with the base and the MAC */
		/* The digest as event validation took it (64 lower-case hex
		 * digits), or none. */
		const char *sha256 = json_string_value(json_object_get(a, "sha256"));
		if (url && peer_media_public_url(app, url, json_is_integer(size) ? (long long)json_integer_value(size) : -1,
						 by, sha256, id, link, sizeof(link)))
			json_object_set_new(a, "url", json_string(link));
	}
	return copy ? copy : json_incref(ev);
}

/* The scope of a token offered to peer for a file of the event ev (its
 * public id) until exp (unix seconds, decimal): "peer LF ev LF exp".  No
 * peer name, event id or number holds a line feed, so this is no other
 * peer's, event's or time's scope, nor the bare peer name a token made
 * before the thirty-second session was made for. */
static bool offer_scope(const char *peer, const char *ev, const char *exp, char *out, size_t len)
{
	return ev && exp && message_id_valid(ev) && decimal(exp) &&
	       (size_t)snprintf(out, len, "%s\n%s\n%s", peer, ev, exp) < len;
}

json_t *peer_media_offer(struct cw_app *app, const char *peer, json_t *ev)
{
	const json_t *atts = json_object_get(json_object_get(ev, "content"), "attachments");
	size_t i;
	json_t *a;
	bool any = false;
	if (app->media.owns)
		json_array_foreach(atts, i, a) {
			const char *url = json_string_value(json_object_get(a, "url"));
			if (url && app->media.owns(app->media.ctx, url))
				any = true;
		}
	char base[CFG_PUBLIC_URL_MAX + 1];
	if (!any || !peer_base_url(app, base, sizeof(base)))
		return json_incref(ev);
	/* Only a local user's files (asked only of an event that has such a
	 * file: most have none): a peer naming a content URI in its own
	 * event must not have Causeway fetch it (through the homeserver,
	 * which fetches other servers' files too) for another peer. */
	const char *sender = json_string_value(json_object_get(ev, "sender"));
	struct mimi_uri su;
	cw_errmsg e;
	if (!sender || mimi_uri_parse(sender, &su, &e) || strcmp(su.domain, app->cfg->domain) != 0)
		return json_incref(ev);
	/* The token is the event's (its public id) and ends after
	 * server.media_link_lifetime_s: the file is served only while the
	 * event is there, not deleted nor erased, and that long (until the
	 * thirty-second session a token served its source for ever, after
	 * the user had deleted the message too). */
	const char *id = json_string_value(json_object_get(ev, "id"));
	char exp[24], scope[320];
	snprintf(exp, sizeof(exp), "%lld",
		 (long long)(cw_wall_ms() / 1000) + (long long)app->cfg->media_link_lifetime_s);
	if (!offer_scope(peer, id, exp, scope, sizeof(scope)))
		return json_incref(ev);
	json_t *copy = json_deep_copy(ev);
	if (!copy)
		return json_incref(ev);
	json_array_foreach(json_object_get(json_object_get(copy, "content"), "attachments"), i, a) {
		const char *url = json_string_value(json_object_get(a, "url"));
		char token[3 * MEDIA_URL_MAX], link[4 * MEDIA_URL_MAX];
		if (!url || !app->media.owns(app->media.ctx, url))
			continue;
		/* The id is of URL-safe characters (message_id_valid).  A token
		 * too long for one path segment (a source over about 170 bytes:
		 * a valid content URI has a server name and a media id of up to
		 * 255 each) goes as the public links do, its source in the
		 * query: /v1/media/m2.<MAC>?src=<base64url source>&ev=&exp=
		 * (peer_api_media puts it together again).  Until the
		 * fifty-second session it stayed an mxc:// URL the peer could
		 * not fetch. */
		if (!media_token_make(app->media_key, scope, url, token, sizeof(token)))
			continue;
		int w;
		if (strlen(token) <= TOKEN_MAX) {
			w = snprintf(link, sizeof(link), "%s/v1/media/%s?ev=%s&exp=%s", base, token, id, exp);
		} else {
			char *dot = strrchr(token, '.');
			*dot = '\0';
			w = snprintf(link, sizeof(link), "%s/v1/media/m2.%s?src=%s&ev=%s&exp=%s", base, dot + 1, token + 3,
				     id, exp);
		}
		if (w < 0 || (size_t)w >= sizeof(link))
			continue;
		json_object_set_new(a, "url", json_string(link));
	}
	return copy;
}

struct media_job {
	struct cw_app *app;
	struct cw_req *req;
	bool public;                /* a peer's file for a link (GET /media/...) */
	char source[MEDIA_URL_MAX + 4]; /* + the room base64 decoding wants for its padding */
	char signer[256];           /* a link's by: the domain whose hosts get the fetch signed ("": none) */
	char mac[32];               /* a link's MAC, its id (a peer's file for a link) */
	char sha256[65];            /* the digest a link's file must have ("": none declared) */
	char event[80];             /* a token's or link's event: served only while it is there ("": a link without) */
	char peer_id[24];           /* a token's peer (its row id): served only while it has a member in the room */
	long long exp;              /* a token's or link's end (unix seconds): no cache keeps its file past it */
	bool gone;                  /* that event is gone, deleted, erased or edited without the file: not fetched */
	bool asked;                 /* a link's event asked about before it joins a fetch of its link (flight_join) */
	bool stranger;              /* the peer has no member in the event's room now: not fetched */
	struct media_blob b;
	size_t reserved;            /* of app->media_held, from the start of the transfer */
	bool over;                  /* no room for it in the budget: not fetched */
	char share[300];            /* whose share of the fetchers it takes (share_take) */
	bool shared;                /* it holds one of share's fetchers */
	bool crowded;               /* share holds its part of the fetchers: not fetched */
	bool leading;               /* a link's fetch that others of the same link wait for (flights) */
	struct media_job *next_flight; /* the next such fetch under way */
	struct media_job *waiters;  /* the follows of the same link that wait for it */
	struct media_job *next_waiter;
	int nwaiters;
	bool capped;                /* b.max is the declared size, under server.media_max_bytes */
	long status;
	cw_err rc;
	cw_errmsg err;
};

static void fetched(void *arg);

/* The fetches under way by whose they are (a job's share): the files of
 * one peer (a link's by), of one host (a link that names no peer: an
 * XMPP user's, one made before the nineteenth session) or asked for by
 * one peer (its tokens) take at most half of the fetchers, at least one,
 * so that one peer's store that trickles (under the 30 s timeout, over
 * the low-speed limit) cannot hold every fetcher while its links are
 * followed (clients that fetch every image at once) and have every other
 * peer's links, tokens and the vCard photos answered 503.  Until the
 * forty-seventh session's review nothing was counted by whose: four
 * followed links of one peer's slow store held the four fetchers.  At
 * most SHARES shares at once (more fetches than server.media_fetches'
 * most are never under way; a full table refuses as a busy share). */
#define SHARES 128
static struct {
	pthread_mutex_t mu;
	struct share {
		char key[300];
		int n;
	} e[SHARES];
} shares = { .mu = PTHREAD_MUTEX_INITIALIZER };

static int share_most(const struct cw_app *app)
{
	return app->cfg->media_fetches / 2 > 1 ? app->cfg->media_fetches / 2 : 1;
}

/* key's entry (under shares.mu), or NULL; *free_e (if not NULL): the
 * first unused entry, or NULL. */
static struct share *share_find(const char *key, struct share **free_e)
{
	if (free_e)
		*free_e = NULL;
	for (size_t i = 0; i < SHARES; i++) {
		if (shares.e[i].n == 0) {
			if (free_e && !*free_e)
				*free_e = &shares.e[i];
		} else if (strcmp(shares.e[i].key, key) == 0) {
			return &shares.e[i];
		}
	}
	return NULL;
}

/* Takes one of key's fetchers: false when it holds share_most already. */
static bool share_take(const struct cw_app *app, const char *key)
{
	struct share *free_e;
	bool ok = false;
	pthread_mutex_lock(&shares.mu);
	struct share *at = share_find(key, &free_e);
	if (!at && free_e) {
		at = free_e;
		snprintf(at->key, sizeof(at->key), "%s", key);
	}
	if (at && at->n < share_most(app)) {
		at->n++;
		ok = true;
	}
	pthread_mutex_unlock(&shares.mu);
	return ok;
}

static void share_give(const char *key)
{
	pthread_mutex_lock(&shares.mu);
	struct share *at = share_find(key, NULL);
	if (at)
		at->n--;
	pthread_mutex_unlock(&shares.mu);
}

/* A link's share: "by" and its peer's domain, else "host" and its
 * source's host (as libcurl reads it, lower-case). */
static void link_share(struct media_job *j)
{
	if (j->signer[0]) {
		snprintf(j->share, sizeof(j->share), "by\n%s", j->signer);
		return;
	}
	char host[256];
	media_url_host(j->source, host, sizeof(host));
	snprintf(j->share, sizeof(j->share), "host\n%s", host);
}

/* A link's fetches under way (after their message was asked about and
 * their budget taken), by MAC: a follow of a link that is being fetched
 * waits for that fetch and is answered what it is, without a fetcher nor
 * a request to the store of its own, so that the members of a group whose
 * clients all fetch a new image at once are not all but a few told 503
 * (until the forty-seventh session's review every follow took a fetcher
 * of its own and fetched the file again).  A follow of a link that names
 * its message (asks_event) joins only once that message was asked about
 * for it (j->asked, on a reader): the fetch asked (fetch) for the
 * follow that started it, up to its 30 s before, and a follow that comes
 * after the message was deleted (or edited without the file) meanwhile
 * is answered 404 as at any other time (until the forty-seventh
 * session's review it was served the file).  At most FLIGHT_WAITERS wait
 * for one fetch; more follow as before. */
#define FLIGHT_WAITERS 64
static struct {
	pthread_mutex_t mu;
	struct media_job *flying;
} flights = { .mu = PTHREAD_MUTEX_INITIALIZER };

static bool asks_event(const struct media_job *j);

/* Whether j (a link's, not started) waits for a fetch of its link; *ask
 * set when there is one, but j's message is to be asked about first. */
static bool flight_join(struct media_job *j, bool *ask)
{
	bool joined = false;
	*ask = false;
	pthread_mutex_lock(&flights.mu);
	for (struct media_job *l = flights.flying; l && !joined; l = l->next_flight)
		if (strcmp(l->mac, j->mac) == 0 && l->nwaiters < FLIGHT_WAITERS) {
			*ask = asks_event(j) && !j->asked;
			if (*ask)
				break;
			j->next_waiter = l->waiters;
			l->waiters = j;
			l->nwaiters++;
			joined = true;
		}
	pthread_mutex_unlock(&flights.mu);
	return joined;
}

/* j's fetch starts: others of its link may wait for it. */
static void flight_begin(struct media_job *j)
{
	pthread_mutex_lock(&flights.mu);
	j->next_flight = flights.flying;
	flights.flying = j;
	j->leading = true;
	pthread_mutex_unlock(&flights.mu);
}

/* j's fetch ended: the jobs that waited for it (none join it after). */
static struct media_job *flight_end(struct media_job *j)
{
	if (!j->leading)
		return NULL;
	pthread_mutex_lock(&flights.mu);
	for (struct media_job **at = &flights.flying; *at; at = &(*at)->next_flight)
		if (*at == j) {
			*at = j->next_flight;
			break;
		}
	struct media_job *w = j->waiters;
	j->waiters = NULL;
	j->leading = false;
	pthread_mutex_unlock(&flights.mu);
	return w;
}

/* The answer to a token that does not open for this peer, to one of a
 * room the peer has no member in any more and to one whose message's row
 * is gone: the same bytes, so that a peer taken out of a room learns
 * nothing of its messages from them. */
#define NO_SUCH_TOKEN "no file with that token for this peer"

/* Whether the token's event is still there with the file among its
 * attachments: not deleted (no delete names it, or the message an edit
 * replaces), nor erased (its content gone: retention.content_days, a
 * content.expires that came), nor expired, nor edited since into a
 * version without the file (an edit of the same message after it, the
 * message's newer version, whose attachments lack it: the user took the
 * file out, as a delete takes the whole message; until the thirty-third
 * session the original's link was served until a delete or its exp);
 * the row itself gone (retention.rows_days) finds nothing and is
 * answered as a stranger is, to every peer: no room is left to ask about
 * (until the thirty-third session's review it had the "no longer kept"
 * answer, and a peer taken out of the room told a purged message from a
 * kept one by its bytes).  And whether
 * the peer still has a member in the event's room (a user joined, as
 * GET /v1/rooms/{room} asks): one taken out of the room, or whose users
 * all left, is a stranger to it and is answered as for a token that
 * never was (until the thirty-third session it was served the file
 * until the token's time passed).  By events_public_id_key, the
 * replaces_id of the deletes and edits, and the room's members.  A
 * link's (j->public: GET /media/..., whose holder is no peer) asks the
 * same of its event but the members (never a stranger): its row gone
 * is gone. */
static cw_err event_holds(PGconn *c, void *arg, cw_errmsg *e)
{
	struct media_job *j = arg;
	const char *p[] = { j->event, j->source, j->public ? NULL : j->peer_id };
	PGresult *r = PQexecParams(c,
		"WITH f AS (SELECT jsonb_build_array(jsonb_build_object('url', $2::text)) AS att) "
		"SELECT EXISTS (SELECT 1 FROM room_members m JOIN identities i ON i.id = m.identity_id "
		"  WHERE m.room_id = e.room_id AND i.peer_id = $3::bigint AND m.membership = 'joined'), "
		" e.type IN ('message', 'edit') AND NOT e.expired "
		" AND coalesce(e.content->'content'->'attachments' @> f.att, false) "
		" AND NOT EXISTS (SELECT 1 FROM events d WHERE d.replaces_id = coalesce(e.replaces_id, e.id) "
		"  AND (d.type = 'delete' OR (d.type = 'edit' AND d.id > e.id "
		"   AND NOT coalesce(d.content->'content'->'attachments' @> f.att, false)))) "
		"FROM events e, f WHERE e.public_id = $1",
		3, NULL, p, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	/* no row: no room to ask about, a stranger to every peer */
	j->stranger = !j->public && (PQntuples(r) == 0 || PQgetvalue(r, 0, 0)[0] != 't');
	j->gone = PQntuples(r) == 0 || PQgetvalue(r, 0, 1)[0] != 't';
	PQclear(r);
	return CW_OK;
}

/* The answer to a token whose event (event_holds) the peer may not have
 * or that is gone, whoever asks when: true when answered. */
/* Whether j's fetch asks about its message first (event_holds): a token
 * always, a link when it names one (since the forty-third session). */
static bool asks_event(const struct media_job *j)
{
	return !j->public || j->event[0];
}

static bool answer_not_there(struct cw_req *req, const struct media_job *j)
{
	if (j->stranger)
		cw_req_problem(req, 404, "unknown_media", "Not found", NO_SUCH_TOKEN);
	else if (j->gone)
		cw_req_problem(req, 404, "unknown_media", "Not found",
			       "no such file (its message was deleted or edited, or is no longer kept)");
	return j->stranger || j->gone;
}

/* The links whose file was refused for good lately, by MAC: logged once an
 * hour each (a follow of such a link is answered at every one, but anyone
 * holding it could fill the log; until the twenty-seventh session every
 * follow wrote a warn line).  Bounded: MEDIA_RECENT_MAX links. */
#define REFUSED_LOG_MS (3600 * 1000L)
static struct media_recent refused_links = MEDIA_RECENT_INIT(REFUSED_LOG_MS);

/* Why a store's final answer status (not 200) is no file however often
 * it is asked, or NULL (a 4xx or 5xx: answer tells gone from away).  A
 * 3xx that media_fetch_peer did not follow names no Location (or is a
 * 304 to a request that asked nothing conditional), and a 2xx other than
 * 200 holds no file or part of one (204, 206 to a request without
 * Range): until the fifty-first session's review they were answered 503
 * "try again later", and a client followed the link again for ever. */
static const char *store_answer_for_good(long status)
{
	if (status / 100 == 3)
		return "its store answers a redirect that names no other place";
	if (status == 204)
		return "its store answers 204 No Content, not the file";
	if (status == 206)
		return "its store answers a part of the file (206), not all of it";
	if (status / 100 == 2)
		return "its store answers another success than 200 OK, not the file";
	return NULL;
}

/* On a fetcher (workers.h): the far side answers within its timeout.  The
 * budget is taken here, on the fetcher: a fetch refused because every
 * fetcher is busy is still counted as such (workers.h), not as over the
 * budget that those busy fetchers reserved.  The answer is fetched's, the
 * job's then step: given once the fetcher is free again (and the
 * reservation becomes the file's size only then), so that whoever got it
 * and follows a link at once is not told that too many files are being
 * fetched (until the twenty-ninth session the answer went from here, and
 * could be). */
static void fetch(void *arg)
{
	struct media_job *j = arg;
	struct cw_app *app = j->app;
	/* As much as any fetch may take, server.media_max_bytes (a link's cap,
	 * its declared size, may be smaller; reserving it would make the gauge
	 * show a file as held before it has come, and the sizes are alike). */
	size_t most = (size_t)app->cfg->media_max_bytes;
	if (asks_event(j)) {
		/* A read on this fetcher (it may block: workers.h), before the
		 * budget is asked and the homeserver (or a link's store) is: a
		 * stranger to the room is answered as for a token that never
		 * was, never 503 because other files hold the budget; a link
		 * whose message is gone fetches nothing. */
		j->rc = store_read_wait(app->store, event_holds, j, &j->err);
		if (j->rc || j->gone || j->stranger) {
			j->rc = j->rc ? CW_EUNAVAIL : CW_ENOTFOUND;
			return;
		}
	}
	if (!media_held_reserve(app, most)) {
		j->over = true;
		j->rc = CW_EUNAVAIL;
		return;
	}
	j->reserved = most;
	if (j->public)
		flight_begin(j);
	if (!j->public) {
		j->rc = app->media.fetch(app->media.ctx, j->source, &j->b, &j->status, &j->err);
	} else {
		j->rc = media_fetch_peer(app, j->source, j->signer[0] ? j->signer : NULL, FETCH_TIMEOUT_MS, &j->b,
					 &j->status, &j->err);
		if (!j->rc && j->status != 200) {
			j->b.refused = store_answer_for_good(j->status);
			j->rc = cw_fail(&j->err, j->b.refused ? CW_EINVAL : CW_EIO, "the peer's store answered %ld",
					j->status);
		}
	}
}

/* A fetched file's bytes, held until its answer is sent (a slow reader
 * keeps them): counted, so that the fetches' memory stays within
 * server.media_fetches x server.media_max_bytes however slowly the
 * answers are read (before, a reader that never read kept its file:
 * 24 such readers of a 19 MiB file took 485 MB).  A fetch reserves
 * server.media_max_bytes when it starts (media_held_reserve) and keeps its file's
 * real size once it has it: until the seventeenth session fetches running reserved nothing, and
 * fetches that started together all passed the check. */
struct held {
	struct cw_app *app;
	size_t n;
};

static void released(void *arg)
{
	struct held *h = arg;
	media_held_release(h->app, h->n);
	free(h);
}

/* Whether a browser may show a file of type ct (as answered: type/subtype,
 * media_type_valid) in its window: images, audio, video and plain text that
 * run nothing (the list Matrix's homeservers serve inline, spec 1.11
 * "Content-Disposition").  Any other, HTML, SVG, XML and PDF among them,
 * is answered as an attachment, to save rather than show: someone
 * else's page on this daemon's origin (the admin console's), inert
 * under the sandbox but still a page that can show a fake login or
 * refresh itself to another site. */
static bool shown_inline(const char *ct)
{
	static const char *const safe[] = {
		"text/css", "text/plain", "text/csv", "application/json", "application/ld+json", "image/jpeg",
		"image/gif", "image/png", "image/apng", "image/webp", "image/avif", "video/mp4", "video/webm",
		"video/ogg", "video/quicktime", "audio/mp4", "audio/webm", "audio/aac", "audio/mpeg", "audio/ogg",
		"audio/wave", "audio/wav", "audio/x-wav", "audio/x-pn-wav", "audio/flac", "audio/x-flac", NULL,
	};
	for (size_t i = 0; safe[i]; i++)
		if (strcasecmp(ct, safe[i]) == 0)
			return true;
	return false;
}

/* The longest a client's cache may show a file (seconds) once it has it:
 * the server stops serving it when its message is deleted, erased or
 * edited without it, or its token or link ends, but a cached copy is
 * shown until its max-age passes, without asking.  Until the forty-fifth
 * session it was a day whatever the token's end: a link of
 * server.media_link_lifetime_s = 60 was shown from a browser's cache a
 * day long, and a file whose message was deleted (a retraction, an
 * expiry) as long. */
#define MEDIA_CACHE_S 3600LL

/* The Cache-Control of a file served until exp (unix seconds) into out:
 * "private" (the answer of a capability, or of a peer's signed request:
 * never a shared cache's), for at most MEDIA_CACHE_S and never past exp. */
static const char *cache_control(long long exp, char *out, size_t len)
{
	long long left = exp - (long long)(cw_wall_ms() / 1000);
	snprintf(out, len, "private, max-age=%lld", left < 0 ? 0 : left < MEDIA_CACHE_S ? left : MEDIA_CACHE_S);
	return out;
}

static void answer(struct media_job *j, bool mismatch, const char *got);

/* What the fetch of l came to, for w, which waited for it (flight_join):
 * its file copied, counted in the held budget as its own (no room: 503 as
 * for a fetch that found none). */
static void follow(const struct media_job *l, struct media_job *w)
{
	w->rc = l->rc;
	w->err = l->err;
	w->status = l->status;
	w->b.too_big = l->b.too_big;
	w->b.refused = l->b.refused;
	w->capped = l->capped;
	memcpy(w->b.content_type, l->b.content_type, sizeof(w->b.content_type));
	if (w->rc != CW_OK)
		return;
	if (!media_held_reserve(w->app, l->b.n)) {
		w->over = true;
		w->rc = CW_EUNAVAIL;
		return;
	}
	w->reserved = l->b.n;
	w->b.p = malloc(l->b.n ? l->b.n : 1);
	if (!w->b.p) {
		w->rc = cw_fail(&w->err, CW_ENOMEM, "out of memory");
		return;
	}
	if (l->b.n)
		memcpy(w->b.p, l->b.p, l->b.n);
	w->b.n = l->b.n;
}

static void fetched(void *arg)
{
	struct media_job *j = arg;
	/* The whole file is here (nothing is streamed before): checked
	 * against its declared digest, as a re-hosted Matrix file and a
	 * vCard photo are (until the thirty-first session a link served
	 * whatever the store answered). */
	char got[65] = "";
	bool mismatch = j->rc == CW_OK && j->sha256[0] && (media_sha256_hex(&j->b, got), strcmp(got, j->sha256) != 0);
	if (mismatch) {
		media_blob_free(&j->b);
		j->rc = cw_fail(&j->err, CW_EIO, "the file does not match its declared sha256");
	}
	struct media_job *w = flight_end(j), *next;
	if (w && j->rc == CW_OK) {
		/* Its reservation becomes its file's size before the copies
		 * reserve theirs (answer keeps it so). */
		media_held_release(j->app, j->reserved - j->b.n);
		j->reserved = j->b.n;
	}
	for (; w; w = next) {
		next = w->next_waiter;
		follow(j, w);
		answer(w, mismatch, got);
	}
	answer(j, mismatch, got);
}

/* Whether a 4xx status is the far side's answer at every later try too
 * (not 408 Request Timeout nor 429 Too Many Requests).  Not the Matrix
 * adapter's refused_for_good (mx_deliver.c), and not to be one list with
 * it (the fifty-second session's review looked): this judges the HTTP
 * status of a file's store, a peer's or any web server with no Matrix
 * errcode to read, and of the homeserver's download, where 403 is the
 * file refused; that one judges the errcode of the homeserver's answer to
 * a row's send, where 403 is a ghost not (yet) in the room, which the bot
 * mends, and where "for good" makes the row a dead letter, never tried
 * again, while here it is only this answer: the peer may ask later. */
static bool final_4xx(long status)
{
	return status >= 400 && status < 500 && status != 408 && status != 429;
}

/* The answer to j once its file is fetched (or not), then j freed. */
static void answer(struct media_job *j, bool mismatch, const char *got)
{
	struct cw_req *req = j->req;
	struct held *h = j->rc == CW_OK ? malloc(sizeof(*h)) : NULL;
	if (j->rc == CW_OK && !h) {
		media_blob_free(&j->b);
		j->rc = cw_fail(&j->err, CW_ENOMEM, "out of memory");
	}
	if (j->rc == CW_OK) {
		unsigned char *body = j->b.p ? j->b.p : malloc(1);
		j->b.p = NULL;
		if (!body) {
			cw_req_no_memory(req);
		} else {
			/* The type as a header (copied): cw_req_reply keeps its
			 * content type by pointer, and j is gone before the answer
			 * is queued. */
			const char *ct = j->b.content_type[0] ? j->b.content_type : "application/octet-stream";
			cw_req_add_header(req, "Content-Type", ct);
			/* Since the forty-third session's review: before, every
			 * type was answered for showing (no Content-Disposition). */
			cw_req_add_header(req, "Content-Disposition", shown_inline(ct) ? "inline" : "attachment");
			char cache[48];
			cw_req_add_header(req, "Cache-Control", cache_control(j->exp, cache, sizeof(cache)));
			cw_req_add_header(req, "X-Content-Type-Options", "nosniff");
			/* Someone else's file on this daemon's origin (the admin
			 * console's too): never a page that runs there. */
			cw_req_add_header(req, "Content-Security-Policy", "default-src 'none'; sandbox");
			/* The reservation becomes the file's size (n <= max):
			 * what released gives back. */
			*h = (struct held){ j->app, j->b.n };
			media_held_release(j->app, j->reserved - h->n);
			j->reserved = 0;
			cw_req_reply_then(req, 200, NULL, (char *)body, j->b.n, released, h);
			h = NULL;
		}
	} else if (mismatch) {
		LOG_KV_LIMITED(CW_LOG_WARN, "a file for a link does not match its declared sha256", "request_id",
			       cw_req_id(req), "got", got);
		cw_req_problem(req, 502, "media_mismatch", "Bad gateway",
			       "the file the sender's store answered does not match the sha256 its attachment declared");
	} else if (answer_not_there(req, j)) {
		/* a stranger, or the event gone: answered */
	} else if (j->over) {
		app_retry_after(req, 5000);
		cw_req_problem(req, 503, "unavailable", "Service unavailable",
			       "too many files are being sent now; try again later");
	} else if (j->b.too_big) {
		cw_req_problem(req, 413, "too_large", "Content too large",
			       j->capped ? "the file is larger than its declared size"
					 : "the file is larger than this gateway carries (server.media_max_bytes)");
	} else if (j->rc == CW_EINVAL && j->b.refused) {
		/* Refused for a fact of the source's URL (media_fetch_peer: its
		 * host's addresses not public, a redirect off https, too many
		 * redirects): no later try changes it, so not 503 "try again"
		 * (until the twenty-sixth session it was, and a client followed
		 * the link again for ever) but 403 with why, which a client does
		 * not repeat (RFC 9110 15.5.4); not 502, which invites retries.
		 * Logged at warn once an hour per link (at most ten a second
		 * of all links: a peer can make many), at debug the other
		 * times. */
		char why[160];
		snprintf(why, sizeof(why), "this gateway does not fetch this file: %s", j->b.refused);
		if (media_recent_note(&refused_links, j->mac, cw_now_us() / 1000))
			LOG_KV_LIMITED(CW_LOG_WARN, "a file for a link is refused for good", "request_id",
				       cw_req_id(req), "detail", j->err.msg);
		else
			LOG_KV(CW_LOG_DEBUG, "a file for a link is refused for good", "request_id", cw_req_id(req),
			       "detail", j->err.msg);
		cw_req_problem(req, 403, "media_refused", "Forbidden", why);
	} else if (j->status == 404 || j->status == 410 || (j->public && final_4xx(j->status))) {
		cw_req_problem(req, 404, "unknown_media", "Not found", "no such file (it may have been deleted)");
	} else if (!j->public && final_4xx(j->status) && j->status != 401) {
		/* A token's file the homeserver refuses (403 M_FORBIDDEN, any
		 * 4xx but its 401, which is this gateway's token and mends
		 * when the operator fixes it, 408 and 429): no later try
		 * changes it, so 403 media_refused as for a link refused for
		 * good, no Retry-After (until the fifty-first session's review
		 * 503 "try again later", and the peer asked again for ever). */
		LOG_KV_LIMITED(CW_LOG_WARN, "the homeserver refuses a file for a peer", "request_id", cw_req_id(req),
			       "detail", j->err.msg);
		char why[96];
		snprintf(why, sizeof(why), "this gateway cannot serve this file: the homeserver refuses it (%ld)",
			 j->status);
		cw_req_problem(req, 403, "media_refused", "Forbidden", why);
	} else {
		LOG_KV_LIMITED(CW_LOG_WARN, "cannot fetch a file for a peer", "request_id", cw_req_id(req), "detail",
			       j->err.msg);
		app_retry_after(req, 5000);
		cw_req_problem(req, 503, "unavailable", "Service unavailable",
			       "the file cannot be fetched from where it is kept now; try again later");
	}
	media_held_release(j->app, j->reserved); /* no answer holds it */
	if (j->shared)
		share_give(j->share);
	free(h);
	media_blob_free(&j->b);
	cw_req_resume(req);
	free(j);
}

static void start_fetch(struct cw_app *app, struct cw_req *req, struct media_job *j, size_t max);

void peer_api_media(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	struct peer_principal *p = cw_req_principal(req);
	const char *token = cw_req_param(req, "token");
	struct media_job *j = calloc(1, sizeof(*j));
	if (!j) {
		cw_req_no_memory(req);
		return;
	}
	/* Every failure to open the token is the same 404: a token of another
	 * peer's, a forged one, one with its event or time changed, one made
	 * before the thirty-second session (no ev, no exp: it served its
	 * source for ever) and a source no longer served look alike. */
	const char *ev = cw_req_query(req, "ev"), *exp = cw_req_query(req, "exp"), *src = cw_req_query(req, "src");
	char scope[320], whole[3 * MEDIA_URL_MAX];
	/* m2.<MAC>?src=: a long source's token (peer_media_offer), its
	 * source in the query; any other token takes no src. */
	if (token && strncmp(token, "m2.", 3) == 0) {
		if (!src || (size_t)snprintf(whole, sizeof(whole), "m1.%s.%s", src, token + 3) >= sizeof(whole))
			token = NULL;
		else
			token = whole;
	} else if (src) {
		token = NULL;
	}
	if (!p || !token || !app->media.fetch || !offer_scope(p->name, ev, exp, scope, sizeof(scope)) ||
	    !media_token_open(app->media_key, scope, token, j->source, sizeof(j->source)) ||
	    !app->media.owns(app->media.ctx, j->source)) {
		free(j);
		cw_req_problem(req, 404, "unknown_media", "Not found", NO_SUCH_TOKEN);
		return;
	}
	/* Past its time: the event's file is offered again, under a new
	 * token, only with the event (a replay), so no later try helps. */
	if (strtoll(exp, NULL, 10) < cw_wall_ms() / 1000) {
		free(j);
		cw_req_problem(req, 404, "unknown_media", "Not found", "the token has expired");
		return;
	}
	snprintf(j->event, sizeof(j->event), "%s", ev); /* message_id_valid: at most 68 */
	j->exp = strtoll(exp, NULL, 10);
	snprintf(j->peer_id, sizeof(j->peer_id), "%lld", (long long)p->id);
	snprintf(j->share, sizeof(j->share), "token\n%.280s", p->name);
	cw_req_suspend(req);
	start_fetch(app, req, j, (size_t)app->cfg->media_max_bytes);
}

/* Why a fetch was not started: every fetcher busy, or its share's. */
static const char *busy_detail(const struct media_job *j)
{
	return j->crowded ? "too many files of the same sender or host are being fetched now"
			  : "too many files are being fetched now";
}

/* The answer to a token while every fetcher is busy, once event_holds
 * ran on a reader (rc its outcome): a stranger to the room, or a token
 * whose event is gone, gets the answer it gets when a fetcher is free;
 * anyone else is told to try again.  On a store thread. */
static void busy_answer(void *arg, cw_err rc, const cw_errmsg *e)
{
	(void)e;
	struct media_job *j = arg;
	if (rc || !answer_not_there(j->req, j)) {
		app_retry_after(j->req, 1000);
		cw_req_problem(j->req, 503, "unavailable", "Service unavailable", busy_detail(j));
	}
	cw_req_resume(j->req);
	free(j);
}

static void begin_fetch(struct media_job *j);

/* Runs j's fetch on a fetcher (server.media_fetches at once), at most max
 * bytes (at most server.media_max_bytes); req suspended by the caller.
 * Every fetcher busy, a token's peer is first asked about as a fetcher
 * asks (event_holds), on a reader: a peer with no member in the room is
 * answered 404 as for a token that never was, whatever the fetchers are
 * doing (until the thirty-fourth session it was told 503 "too many files"
 * then, the one answer that told it from a token that never was), and a
 * link whose message is gone 404 as when a fetcher is free (a link named
 * no message before the forty-third session).  Only when refused: a fetch
 * that a fetcher takes reads there as before. */
static void start_fetch(struct cw_app *app, struct cw_req *req, struct media_job *j, size_t max)
{
	j->app = app;
	j->req = req;
	j->b.max = max < (size_t)app->cfg->media_max_bytes ? max : (size_t)app->cfg->media_max_bytes;
	j->capped = j->b.max < (size_t)app->cfg->media_max_bytes;
	j->b.cancel = &app->stopping;
	begin_fetch(j);
}

/* A follow of a link being fetched once its message was asked about for
 * it (flight_join; rc the read's outcome): gone, answered 404 as when a
 * fetcher is free (the store unreachable: 503, as a fetcher's read
 * that fails); there, it joins that fetch, or starts its own if that one
 * ended meanwhile.  On a store thread. */
static void follow_asked(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct media_job *j = arg;
	if (rc || j->gone) {
		if (rc && e)
			j->err = *e;
		j->rc = rc ? CW_EUNAVAIL : CW_ENOTFOUND;
		answer(j, false, "");
		return;
	}
	j->asked = true;
	begin_fetch(j);
}

/* j joins a fetch of its link (its message asked about first), or takes
 * a fetcher of its own, or is answered that every one is busy. */
static void begin_fetch(struct media_job *j)
{
	struct cw_app *app = j->app;
	struct cw_req *req = j->req;
	bool ask = false;
	if (j->public && flight_join(j, &ask))
		return;
	/* The read refused (the database known away): its own fetch asks. */
	if (ask && store_read(app->store, event_holds, follow_asked, j) == CW_OK)
		return;
	j->shared = share_take(app, j->share);
	j->crowded = !j->shared;
	if (j->shared && cw_workers_run_then(app->fetchers, fetch, fetched, j))
		return;
	if (j->shared)
		share_give(j->share);
	j->shared = false;
	if (asks_event(j) && store_read(app->store, event_holds, busy_answer, j) == CW_OK)
		return;
	app_retry_after(req, 1000);
	cw_req_problem(req, 503, "unavailable", "Service unavailable", busy_detail(j));
	free(j);
	cw_req_resume(req);
}

void media_public_get(struct cw_req *req, void *ctx)
{
	struct cw_app *app = ctx;
	const char *mac = cw_req_param(req, "token"), *src = cw_req_query(req, "src"), *size = cw_req_query(req, "size");
	const char *exp = cw_req_query(req, "exp"), *by = cw_req_query(req, "by"), *sha256 = cw_req_query(req, "sha256");
	const char *ev = cw_req_query(req, "ev");
	char token[3 * MEDIA_URL_MAX], scope[SCOPE_MAX];
	struct media_job *j = calloc(1, sizeof(*j));
	if (!j) {
		cw_req_no_memory(req);
		return;
	}
	/* A link without a size is one of a file that declared none (at most
	 * server.media_max_bytes).  The MAC is checked first: a changed size
	 * or time is the same 404 as a made-up link. */
	if (!mac || !src || (size_t)snprintf(token, sizeof(token), "m1.%s.%s", src, mac) >= sizeof(token) ||
	    !public_scope(size, exp, by, sha256, ev, scope, sizeof(scope)) ||
	    !media_token_open(app->media_key, scope, token, j->source, sizeof(j->source)) ||
	    strncmp(j->source, "https://", 8) != 0) {
		free(j);
		cw_req_problem(req, 404, "unknown_media", "Not found", "no file with that token");
		return;
	}
	/* A link is a capability anyone who sees it holds (a chat's archive, a
	 * forwarded message): it ends after server.media_link_lifetime_s.  One
	 * made before the eighteenth session has no end written in it and is
	 * refused alike (docs/security.md), rather than followed forever. */
	if (!exp || strtoll(exp, NULL, 10) < cw_wall_ms() / 1000) {
		free(j);
		cw_req_problem(req, 410, "expired_media", "Gone",
			       exp ? "the link has expired" : "the link was made without an expiry and is no longer served");
		return;
	}
	j->public = true;
	j->exp = strtoll(exp, NULL, 10);
	snprintf(j->signer, sizeof(j->signer), "%s", by ? by : "");
	snprintf(j->mac, sizeof(j->mac), "%s", mac); /* 22 characters: media_token_open took it */
	snprintf(j->sha256, sizeof(j->sha256), "%s", sha256 ? sha256 : ""); /* 64: public_scope took it */
	/* The message that carried it (message_id_valid, at most 68: public_scope
	 * took it): the file is served only while it is there (event_holds,
	 * on the fetcher, before the store is asked).  A link made before the
	 * forty-third session's review names none and is served as before,
	 * until its exp. */
	snprintf(j->event, sizeof(j->event), "%s", ev ? ev : "");
	link_share(j);
	/* The declared size, as the MAC vouches for it: a longer file is
	 * refused (413) as it is on Matrix (until the seventeenth session the
	 * link fetched up to server.media_max_bytes whatever was declared). */
	cw_req_suspend(req);
	start_fetch(app, req, j, size ? (size_t)strtoull(size, NULL, 10) : (size_t)app->cfg->media_max_bytes);
}
