/* Remote users' vCards (XEP-0054 vcard-temp) and avatars in presence
 * (XEP-0153): what a peer says of its user (POST /v1/profiles: a display
 * name and an avatar) shown to XMPP clients, as the Matrix adapter shows it
 * on the ghost.  The avatar is fetched from the peer's store (signed only
 * when its host is in the domain of the peer the user belongs to, as
 * every file of a peer is: media_fetch_peer), at most VCARD_PHOTO_MAX bytes and
 * server.media_max_bytes (until the eighteenth session that setting was not
 * heeded here), on one of the
 * file fetchers (app->fetchers, server.media_fetches: shared with the
 * peers' file fetches), never on the stream's thread; the profile is read
 * from there on a store reader.  The last avatar of each remote user is
 * kept in memory (its URL, type, base64 and SHA-1), so a client's repeated
 * asks cost nothing. */
#include "config.h"
#include "xmpp_int.h"
#include "log.h"
#include "media.h"
#include "peer/event.h"
#include "store.h"
#include "utf8.h"
#include "workers.h"

#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define NS_VCARD "vcard-temp"
#define NS_VCARD_UPDATE "vcard-temp:x:update"
#define NS_PUBSUB "http://jabber.org/protocol/pubsub"
#define NS_PUBSUB_EVENT "http://jabber.org/protocol/pubsub#event"
#define NS_AVATAR_META "urn:xmpp:avatar:metadata"
#define NS_AVATAR_DATA "urn:xmpp:avatar:data"
#define VCARD_PHOTO_MAX (192 * 1024) /* base64 in one stanza: under Prosody's 512 KiB for components */
#define VCARD_CACHE_MAX 256
#define VCARD_CACHE_BYTES (8u << 20) /* of base64: a peer's 256 large avatars would be 64 MiB */
#define VCARD_NONE_MAX 4096 /* remote users known to have no avatar (none_put) */
/* Recipients of presences waiting to be written (xa_fanout_left) past
 * which a presence that answers a user (xa_vcard_presence) is not
 * queued: a client that probes faster than they are written costs no
 * more memory than this (a profile change's fan-out stops being read at
 * FANOUT_BACKLOG, below). */
#define ANSWERS_BACKLOG 40000
#define VCARD_TIMEOUT_MS 5000L
#define VCARD_REFUSED_MS (3600 * 1000L)

/* What a job answers: a vCard, or (XEP-0084, the remote JID as its own
 * PEP service) the avatar's metadata or data node. */
enum vask { VASK_VCARD, VASK_META, VASK_DATA };

struct vjob {
	struct xcomp *xc;
	char *iq;                        /* the request to answer, or NULL (presences to follow) */
	enum vask ask;
	char item[64];                   /* VASK_DATA: the item asked for ("": the current one) */
	char remote_id[MIMI_LOCAL_MAX + 1], remote_jid[XJ_JID_MAX + 1];
	json_t *to;                      /* the bare JIDs the presence goes to (iq NULL) */
	bool changed;                    /* a profile change: the presence goes even without an avatar */
	/* found */
	char name[1100];                 /* the display name the peer gave, or "" */
	char *avatar;                    /* the avatar object the peer gave (JSON text), or NULL */
	char peer_domain[256];           /* the domain of that peer (peers table): its hosts get the fetch signed */
	json_t *photo;                   /* {url, type, b64, sha1}; url "" and no b64: none */
	cw_err rc;                       /* the read's, for the answer */
	cw_errmsg err;
};

/* The avatar URLs whose fetch was refused for good (a fact of the URL,
 * media_fetch_peer) in the last hour, apart from the kept photos: they
 * outlive the cache's start-over (and a profile change's drop), so such an
 * avatar is neither fetched nor logged again for an hour, whoever's it is
 * and whichever component asks; then it is tried again (a host that
 * became public is fetched).  Bounded: MEDIA_RECENT_MAX URLs, the oldest
 * forgotten first.  Until the twenty-seventh session the refusal was kept
 * only as a cached photo, and the cache's start-over (256 users, 8 MiB)
 * had it fetched and logged again. */
static struct media_recent refused_avatars = MEDIA_RECENT_INIT(VCARD_REFUSED_MS);

/* The cached photo of remote_id whose source is url (NULL: any), with a
 * reference, or NULL. */
static json_t *cache_get(struct xcomp *xc, const char *remote_id, const char *url)
{
	pthread_mutex_lock(&xc->mu);
	json_t *p = xc->vcards ? json_object_get(xc->vcards, remote_id) : NULL;
	const char *had = json_string_value(json_object_get(p, "url"));
	if (p && (!url || (had && strcmp(had, url) == 0)))
		json_incref(p);
	else
		p = NULL;
	pthread_mutex_unlock(&xc->mu);
	return p;
}

static size_t photo_bytes(const json_t *photo)
{
	return json_string_length(json_object_get(photo, "b64"));
}

static void cache_drop(struct xcomp *xc, const char *remote_id)
{
	pthread_mutex_lock(&xc->mu);
	if (xc->vcards) {
		xc->vcard_bytes -= photo_bytes(json_object_get(xc->vcards, remote_id));
		json_object_del(xc->vcards, remote_id);
	}
	json_object_del(xc->vcard_none, remote_id);
	pthread_mutex_unlock(&xc->mu);
}

/* The remote users whose profile has no avatar (none, or one of a type
 * not carried: photo_of), kept apart from the photos (xc->vcard_none:
 * a name each, at most VCARD_NONE_MAX, then started again, as when the
 * photos start again: cache_put; earlier in the fiftieth session kept
 * inside xc->vcards, under the key ""), until their profile changes
 * (cache_drop), so that a presence of theirs says at once that there is
 * none (xa_vcard_presence).  Until the fiftieth session nothing was kept of
 * them, and each presence that answered a probe of one of them took a
 * file fetcher and a read of the database: a client loading a roster of
 * contacts without avatars took every fetcher for it, the peers' files
 * refused meanwhile (causeway_media_fetches_refused_total, which said to
 * raise server.media_fetches). */
static void none_put(struct xcomp *xc, const char *remote_id)
{
	pthread_mutex_lock(&xc->mu);
	if (!xc->vcard_none || json_object_size(xc->vcard_none) >= VCARD_NONE_MAX) {
		json_decref(xc->vcard_none);
		xc->vcard_none = json_object();
	}
	if (xc->vcard_none)
		json_object_set_new(xc->vcard_none, remote_id, json_true());
	pthread_mutex_unlock(&xc->mu);
}

static bool none_has(struct xcomp *xc, const char *remote_id)
{
	pthread_mutex_lock(&xc->mu);
	bool has = json_object_get(xc->vcard_none, remote_id) != NULL;
	pthread_mutex_unlock(&xc->mu);
	return has;
}

/* At most VCARD_CACHE_MAX photos and VCARD_CACHE_BYTES: past either, the
 * cache starts again (the photos are fetched again when asked for). */
static void cache_put(struct xcomp *xc, const char *remote_id, json_t *photo)
{
	size_t n = photo_bytes(photo);
	pthread_mutex_lock(&xc->mu);
	if (xc->vcards) {
		xc->vcard_bytes -= photo_bytes(json_object_get(xc->vcards, remote_id));
		json_object_del(xc->vcards, remote_id);
	}
	json_object_del(xc->vcard_none, remote_id);
	if (!xc->vcards || json_object_size(xc->vcards) >= VCARD_CACHE_MAX || xc->vcard_bytes + n > VCARD_CACHE_BYTES) {
		json_decref(xc->vcards);
		xc->vcards = json_object();
		xc->vcard_bytes = 0;
	}
	if (xc->vcards && json_object_set(xc->vcards, remote_id, photo) == 0)
		xc->vcard_bytes += n;
	pthread_mutex_unlock(&xc->mu);
}

/* The types of image an avatar is carried as (XEP-0153 §3.1: "image/gif,
 * image/jpeg, or image/png"; XEP-0084's PNG, and WebP, which clients
 * show too), each with the bytes its files begin with; type: the peer's
 * (RFC 6838 §4.2: in any case).  The type as named here, or NULL for any
 * other: an SVG runs scripts and loads what it links to in a client that
 * renders it (the user's address and presence to whoever serves it), and
 * a TIFF or a BMP is what few clients show.  Until the fiftieth session
 * any image/ type the peer named was carried. */
static const char *photo_type(const char *type)
{
	static const char *const types[] = { "image/png", "image/jpeg", "image/gif", "image/webp" };
	for (size_t i = 0; type && i < sizeof(types) / sizeof(types[0]); i++)
		if (strcasecmp(type, types[i]) == 0)
			return types[i];
	return NULL;
}

/* Whether the n bytes at p are a file of type (photo_type's): a peer
 * that names one type and serves another (an SVG or a page as
 * image/png) gets no avatar, as one that serves another file than its
 * sha256 says.  Until the fiftieth session the bytes were carried as
 * they came, whatever they were, to clients that may tell an image's
 * type from its bytes. */
static bool photo_is(const char *type, const unsigned char *p, size_t n)
{
	if (strcmp(type, "image/png") == 0)
		return n >= 8 && memcmp(p, "\x89PNG\r\n\x1a\n", 8) == 0;
	if (strcmp(type, "image/jpeg") == 0)
		return n >= 3 && p[0] == 0xFF && p[1] == 0xD8 && p[2] == 0xFF;
	if (strcmp(type, "image/gif") == 0)
		return n >= 6 && (memcmp(p, "GIF87a", 6) == 0 || memcmp(p, "GIF89a", 6) == 0);
	return n >= 12 && memcmp(p, "RIFF", 4) == 0 && memcmp(p + 8, "WEBP", 4) == 0; /* image/webp */
}

/* The avatar of the profile (JSON text) as a photo: from the cache when its
 * URL is the same, else fetched; NULL when it cannot be had now (nothing is
 * cached then: the next ask tries again). */
static json_t *photo_of(struct vjob *j, const char *avatar_text)
{
	struct cw_app *app = j->xc->x->app;
	json_t *av = avatar_text ? json_loads(avatar_text, 0, NULL) : NULL;
	const char *url = json_string_value(json_object_get(av, "url"));
	const char *type = photo_type(json_string_value(json_object_get(av, "content_type")));
	const char *want = json_string_value(json_object_get(av, "sha256"));
	if (!url || strncmp(url, "https://", 8) != 0 || !type) {
		json_decref(av);
		none_put(j->xc, j->remote_id);
		return json_pack("{s:s}", "url", ""); /* no avatar */
	}
	json_t *cached = cache_get(j->xc, j->remote_id, url);
	if (cached) {
		json_decref(av);
		return cached;
	}
	if (media_recent_has(&refused_avatars, url, cw_now_us() / 1000)) {
		/* refused for good lately: none, as when it was (logged then) */
		json_t *none = json_pack("{s:s}", "url", url);
		json_decref(av);
		if (none)
			cache_put(j->xc, j->remote_id, none);
		return none;
	}
	/* No more than any file of a peer this gateway carries (an operator's
	 * server.media_max_bytes may be below a vCard's own cap). */
	size_t most = (size_t)app->cfg->media_max_bytes;
	struct media_blob b = { .max = most < VCARD_PHOTO_MAX ? most : VCARD_PHOTO_MAX, .cancel = &app->stopping };
	/* Counted with the other fetches' files (media_held_reserve), for as
	 * long as its bytes are held here: the fetchers are shared, and until
	 * the nineteenth session an avatar's fetch took memory past the
	 * budget the others kept to.  No room now: as away, asked again
	 * later. */
	if (!media_held_reserve(app, b.max)) {
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp: an avatar could not be had", "component", j->xc->domain, "detail",
		       "too many files are being fetched now");
		json_decref(av);
		return NULL;
	}
	long status = 0;
	cw_errmsg e;
	cw_err rc = media_fetch_peer(app, url, j->peer_domain[0] ? j->peer_domain : NULL, VCARD_TIMEOUT_MS, &b,
				     &status, &e);
	char got[65];
	json_t *photo = NULL;
	if (rc == CW_EINVAL && b.refused) {
		/* Refused for a fact of its URL (its host's addresses not public,
		 * a redirect off https, too many redirects, a URL libcurl cannot
		 * read): given up, as no avatar, kept so for this URL (logged
		 * once: later asks find it in the cache, or, once the cache has
		 * started over, in refused_avatars; a new URL is fetched anew).
		 * Until the twenty-sixth session it was as away, fetched again at
		 * every ask, and a PEP ask was answered "wait". */
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp: an avatar is refused for good, shown as none", "component", j->xc->domain,
		       "detail", e.msg);
		media_recent_note(&refused_avatars, url, cw_now_us() / 1000);
		photo = json_pack("{s:s}", "url", url);
	} else if (rc || status != 200 || b.too_big ||
		   (media_sha256_hex(&b, got), want && strcmp(got, want) != 0) || !photo_is(type, b.p, b.n)) {
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp: an avatar could not be had", "component", j->xc->domain, "detail",
		       b.too_big ? "larger than a vCard carries" : rc ? e.msg : status != 200 ? "not 200"
		       : want && strcmp(got, want) != 0 ? "checksum" : "not an image of the type its profile names");
		/* Too large, or not this file: as none (and kept so); away: later.
		 * A fetch cut short as too large fails (rc): until the eighteenth
		 * session such a photo was fetched again at every ask. */
		if (b.too_big || (!rc && (status == 200 || status == 404 || status == 410)))
			photo = json_pack("{s:s}", "url", url);
	} else {
		size_t n64 = 4 * ((b.n + 2) / 3) + 1;
		char *b64 = malloc(n64);
		unsigned char sha1[20];
		char hex[41];
		unsigned int sl = 0;
		if (b64 && EVP_EncodeBlock((unsigned char *)b64, b.p, (int)b.n) >= 0 &&
		    EVP_Digest(b.p, b.n, sha1, &sl, EVP_sha1(), NULL) == 1 && sl == 20) {
			cw_hex(hex, sha1, 20);
			photo = json_pack("{s:s, s:s, s:s, s:s, s:I}", "url", url, "type", type, "b64", b64, "sha1", hex,
					  "bytes", (json_int_t)b.n);
		}
		free(b64);
	}
	media_blob_free(&b);
	media_held_release(app, b.max);
	json_decref(av);
	if (photo)
		cache_put(j->xc, j->remote_id, photo);
	return photo;
}

static cw_err vcard_fn(PGconn *c, void *arg, cw_errmsg *e)
{
	struct vjob *j = arg;
	const char *p[] = { j->xc->peer, j->remote_id };
	PGresult *r = PQexecParams(c, "SELECT coalesce(i.display_name, ''), i.avatar::text, p.domain FROM identities i "
				      "JOIN peers p ON p.id = i.peer_id WHERE p.name = $1 AND i.localpart = $2 "
				      "AND NOT i.is_local",
				   2, NULL, p, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	free(j->avatar);
	j->avatar = NULL;
	if (PQntuples(r) == 1) {
		snprintf(j->name, sizeof(j->name), "%s", PQgetvalue(r, 0, 0));
		j->avatar = PQgetisnull(r, 0, 1) ? NULL : strdup(PQgetvalue(r, 0, 1));
		snprintf(j->peer_domain, sizeof(j->peer_domain), "%s", PQgetvalue(r, 0, 2));
	}
	PQclear(r);
	return CW_OK;
}

/* <x xmlns='vcard-temp:x:update'><photo>SHA-1</photo></x>, or an empty
 * photo for none. */
static void add_update(xmpp_ctx_t *ctx, xmpp_stanza_t *presence, const json_t *photo)
{
	xmpp_stanza_t *x = xa_child(ctx, presence, "x", NS_VCARD_UPDATE);
	const char *sha1 = json_string_value(json_object_get(photo, "sha1"));
	if (x)
		xa_text_child(ctx, x, "photo", NULL, sha1 ? sha1 : "");
}

static void vjob_free(struct vjob *j)
{
	json_decref(j->to);
	json_decref(j->photo);
	free(j->avatar);
	free(j->iq);
	free(j);
}

/* XEP-0084's metadata item for photo (no avatar: an empty <metadata/>)
 * under parent. */
static void add_metadata(xmpp_ctx_t *ctx, xmpp_stanza_t *parent, const json_t *photo)
{
	const char *sha1 = json_string_value(json_object_get(photo, "sha1"));
	xmpp_stanza_t *item = xa_child(ctx, parent, "item", NULL);
	if (!item)
		return;
	xmpp_stanza_set_attribute(item, "id", sha1 ? sha1 : "none");
	xmpp_stanza_t *md = xa_child(ctx, item, "metadata", NS_AVATAR_META);
	xmpp_stanza_t *info = md && sha1 ? xa_child(ctx, md, "info", NULL) : NULL;
	if (info) {
		char n[24];
		snprintf(n, sizeof(n), "%lld", (long long)json_integer_value(json_object_get(photo, "bytes")));
		xmpp_stanza_set_attribute(info, "bytes", n);
		xmpp_stanza_set_attribute(info, "id", sha1);
		xmpp_stanza_set_attribute(info, "type", json_string_value(json_object_get(photo, "type")));
	}
}

/* The remote user's avatar as a PEP notification (XEP-0084 4.3, a headline
 * from their JID), so that clients that read avatars from PEP only fetch
 * it: sent with the presences that carry the hash. */
static xmpp_stanza_t *avatar_event(xmpp_ctx_t *ctx, const char *from, const char *to, const json_t *photo)
{
	xmpp_stanza_t *msg = xmpp_message_new(ctx, "headline", to, NULL);
	if (!msg)
		return NULL;
	xmpp_stanza_set_from(msg, from);
	xmpp_stanza_t *ev = xa_child(ctx, msg, "event", NS_PUBSUB_EVENT);
	xmpp_stanza_t *items = ev ? xa_child(ctx, ev, "items", NULL) : NULL;
	if (items) {
		xmpp_stanza_set_attribute(items, "node", NS_AVATAR_META);
		add_metadata(ctx, items, photo);
	}
	return msg;
}

/* The answer to a pubsub items ask of the avatar's nodes (into r, a
 * result), or an error stanza instead (the item asked for is not the
 * current one). */
static xmpp_stanza_t *pubsub_answer(struct vjob *j, xmpp_ctx_t *ctx, xmpp_stanza_t *iq, xmpp_stanza_t *r)
{
	const char *sha1 = json_string_value(json_object_get(j->photo, "sha1"));
	const char *b64 = json_string_value(json_object_get(j->photo, "b64"));
	if (j->ask == VASK_DATA && (!sha1 || !b64 || (j->item[0] && strcmp(j->item, sha1) != 0))) {
		xmpp_stanza_release(r);
		return xa_error_reply(iq, "cancel", "item-not-found", NULL);
	}
	xmpp_stanza_t *ps = xa_child(ctx, r, "pubsub", NS_PUBSUB);
	xmpp_stanza_t *items = ps ? xa_child(ctx, ps, "items", NULL) : NULL;
	if (!items)
		return r;
	xmpp_stanza_set_attribute(items, "node", j->ask == VASK_DATA ? NS_AVATAR_DATA : NS_AVATAR_META);
	if (j->ask == VASK_META) {
		add_metadata(ctx, items, j->photo);
	} else {
		xmpp_stanza_t *item = xa_child(ctx, items, "item", NULL);
		if (item) {
			xmpp_stanza_set_attribute(item, "id", sha1);
			xa_text_child(ctx, item, "data", NS_AVATAR_DATA, b64);
		}
	}
	return r;
}

static void vcard_done(void *arg, cw_err rc, const cw_errmsg *e)
{
	struct vjob *j = arg;
	struct xcomp *xc = j->xc;
	xmpp_ctx_t *ctx = xa_thread_ctx(xc->x);
	if (rc) /* limited: one a contact of every roster a client loads while the database is away */
		LOG_KV_LIMITED(CW_LOG_WARN, "xmpp: a vCard could not be read", "component", xc->domain, "detail",
			       e ? e->msg : "");
	if (ctx && j->iq) {
		xmpp_stanza_t *iq = xmpp_stanza_new_from_string(ctx, j->iq);
		/* A photo that cannot be had now: a vCard without it, a pubsub
		 * ask answered "wait" (its hash is not known). */
		bool fail = rc || (j->ask != VASK_VCARD && !j->photo);
		xmpp_stanza_t *r = iq ? (fail ? xa_error_reply(iq, "wait", "internal-server-error", NULL) : xa_iq_result(iq))
				      : NULL;
		if (r && !fail && j->ask != VASK_VCARD) {
			xmpp_stanza_set_from(r, xmpp_stanza_get_to(iq));
			r = pubsub_answer(j, ctx, iq, r);
		} else if (r && !fail) {
			xmpp_stanza_set_from(r, xmpp_stanza_get_to(iq));
			xmpp_stanza_t *v = xa_child(ctx, r, "vCard", NS_VCARD);
			/* FN and NICKNAME: the peer's name for its user as a Matrix
			 * ghost's shows it (nothing that hides or turns round the
			 * "(<peer>)" after it, 64 characters at most), else their
			 * id, then "(<peer>)".  Until the thirty-first session both
			 * were the name as the peer gave it, NICKNAME without the
			 * peer's. */
			char fn[XA_PEER_NAME_MAX];
			xa_peer_name(xc, j->name, j->remote_id, fn, sizeof(fn));
			if (v) {
				xa_text_child(ctx, v, "FN", NULL, fn);
				xa_text_child(ctx, v, "NICKNAME", NULL, fn);
			}
			const char *b64 = json_string_value(json_object_get(j->photo, "b64"));
			xmpp_stanza_t *ph = v && b64 ? xa_child(ctx, v, "PHOTO", NULL) : NULL;
			if (ph) {
				xa_text_child(ctx, ph, "TYPE", NULL, json_string_value(json_object_get(j->photo, "type")));
				xa_text_child(ctx, ph, "BINVAL", NULL, b64);
			}
		}
		if (r)
			xa_enqueue_stanza(xc, r);
		if (iq)
			xmpp_stanza_release(iq);
	} else if (ctx && !rc && j->photo && (j->changed || json_string_value(json_object_get(j->photo, "sha1")))) {
		/* A presence that was sent without the hash: now with it.  A
		 * changed profile: the new hash, or an empty one (no avatar). */
		xa_fanout_add(xc, j->remote_jid, j->remote_id, j->changed, j->to, j->photo);
	}
	vjob_free(j);
}

/* On a fetcher: the profile (on a reader), the photo. */
static void vcard_work(void *arg)
{
	struct vjob *j = arg;
	j->rc = store_read_wait(j->xc->x->app->store, vcard_fn, j, &j->err);
	if (!j->rc)
		j->photo = photo_of(j, j->avatar);
}

/* Then the answer, the fetcher counted free again: a client asking for
 * the next vCard at once is not told that every fetcher is busy by the
 * one finishing this answer (as the media fetches, since the
 * twenty-ninth session). */
static void vcard_then(void *arg)
{
	struct vjob *j = arg;
	vcard_done(j, j->rc, &j->err);
}

/* Runs j on a fetcher; false (j left to the caller) when they are all
 * busy. */
static bool vcard_start(struct vjob *j)
{
	return cw_workers_run_then(j->xc->x->app->fetchers, vcard_work, vcard_then, j);
}

/* Answers iq (kept as text: the stanza is the stream thread's) from a
 * fetcher. */
static void ask_start(struct xcomp *xc, xmpp_stanza_t *iq, const char *remote_id, enum vask ask, const char *item)
{
	struct vjob *j = calloc(1, sizeof(*j));
	char *text = NULL;
	size_t len;
	if (!j || xmpp_stanza_to_text(iq, &text, &len) != XMPP_EOK || !text) {
		free(j);
		return;
	}
	j->iq = strdup(text);
	xmpp_free(xc->ctx, text);
	j->xc = xc;
	j->ask = ask;
	snprintf(j->item, sizeof(j->item), "%s", item ? item : "");
	snprintf(j->remote_id, sizeof(j->remote_id), "%s", remote_id);
	if (!j->iq || !vcard_start(j)) {
		/* files are being fetched up to the budget: ask again later */
		xa_send_now(xc, xa_error_reply(iq, "wait", "resource-constraint", NULL));
		vjob_free(j);
	}
}

void xa_vcard(struct xcomp *xc, xmpp_stanza_t *iq, const char *remote_id)
{
	ask_start(xc, iq, remote_id, VASK_VCARD, NULL);
}

void xa_avatar_items(struct xcomp *xc, xmpp_stanza_t *iq, xmpp_stanza_t *pubsub, const char *remote_id)
{
	xmpp_stanza_t *items = xmpp_stanza_get_child_by_name_and_ns(pubsub, "items", NS_PUBSUB);
	if (!items)
		items = xmpp_stanza_get_child_by_name(pubsub, "items");
	const char *node = items ? xmpp_stanza_get_attribute(items, "node") : NULL;
	xmpp_stanza_t *item = items ? xmpp_stanza_get_child_by_name(items, "item") : NULL;
	const char *id = item ? xmpp_stanza_get_attribute(item, "id") : NULL;
	if (!node) {
		xa_send_now(xc, xa_error_reply(iq, "cancel", "feature-not-implemented", NULL));
		return;
	}
	bool meta = strcmp(node, NS_AVATAR_META) == 0, data = strcmp(node, NS_AVATAR_DATA) == 0;
	if ((!meta && !data) || (id && strlen(id) >= 64)) {
		xa_send_now(xc, xa_error_reply(iq, "cancel", "item-not-found", NULL));
		return;
	}
	ask_start(xc, iq, remote_id, meta ? VASK_META : VASK_DATA, id);
}

void xa_vcard_presence(struct xcomp *xc, const char *remote_id, const char *remote_jid, const char *to)
{
	json_t *photo = cache_get(xc, remote_id, NULL);
	bool known = photo || none_has(xc, remote_id);
	if (!photo && known)
		photo = json_pack("{s:s}", "url", ""); /* XEP-0153 §3.2: an empty photo, no avatar */
	json_t *recipient = json_pack("[s]", to);
	if (recipient && xa_fanout_left(xc) <= ANSWERS_BACKLOG)
		xa_fanout_add(xc, remote_jid, remote_id, false, recipient, photo);
	else if (recipient)
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp: a contact's presence was not answered: too many presences wait",
			       "component", xc->domain);
	json_decref(recipient);
	json_decref(photo);
	if (known)
		return;
	/* Not known yet: the presence goes without it (XEP-0153: no <x/>, not
	 * ready to say), and one with it follows when there is an avatar. */
	struct vjob *j = calloc(1, sizeof(*j));
	if (!j)
		return;
	j->xc = xc;
	snprintf(j->remote_id, sizeof(j->remote_id), "%s", remote_id);
	snprintf(j->remote_jid, sizeof(j->remote_jid), "%s", remote_jid);
	j->to = json_pack("[s]", to);
	if (!vcard_start(j))
		vjob_free(j); /* the fetchers are busy: the next probe asks again */
}

/* A profile change is found by its transaction: identities.profile_xid
 * (schema/040), the id of the transaction that made it, ascending as
 * transactions begin, not as they commit.  The cursor is the (profile_xid,
 * id) of the last change sent, and a change is read only below the oldest
 * transaction still open (pg_current_snapshot(): every one below it has
 * ended, so no change will ever come there again): one that began before
 * another but commits after it is read in its turn, never passed over.
 * Until the thirty-third session the cursor was the change's time
 * (profile_changed_at, its transaction's start) and a change was read once
 * 3 seconds old: a transaction of another process open longer (its writer
 * waiting for a lock) committed a change older than one already sent, and
 * it never reached the contacts.  A transaction open for long (as the
 * roster sync's audit id that never comes, xa_open_write_wait_ms) holds
 * back the changes after it no longer: it is passed over, and a change it
 * commits after that is lost as before. */
#define OPEN_XMIN "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
/* The first id this server has not given yet: every change a read sees
 * was committed below it.  An id above it was given by another server:
 * the database was moved (pg_dump/pg_restore, logical replication), and
 * the new server's ids began again low (review rH, thirty-third session:
 * until then the cursor stayed above every change made after the move,
 * and none was announced until the new ids passed the old ones). */
#define NEXT_XID "pg_snapshot_xmax(pg_current_snapshot())::text::bigint"

/* The stored cursor of the profiles (xmpp_roster_sync), or, the first
 * time, at the oldest transaction still open, stored at once
 * (changes committed before were never announced: clients ask for the
 * hash when they probe; later ones are announced by whichever process
 * holds the stream next); so too when the stored one is another
 * server's (above NEXT_XID: the changes made between the move and now
 * are not announced, the contacts' next probe gets them); false when it
 * cannot be read.  o, read in the statement's snapshot, is the row as it
 * was before u. */
static bool profiles_cursor(struct xcomp *xc, PGconn *c)
{
	const char *p[] = { xc->domain };
	PGresult *r = PQexecParams(c,
		"WITH s AS MATERIALIZED (SELECT " OPEN_XMIN " AS lo, " NEXT_XID " AS hi), "
		"o AS (SELECT profiles_xid FROM xmpp_roster_sync WHERE component = $1), "
		"u AS (UPDATE xmpp_roster_sync x SET "
		"  profiles_xid = CASE WHEN x.profiles_xid IS NULL OR x.profiles_xid > s.hi THEN s.lo "
		"   ELSE x.profiles_xid END, "
		"  profiles_xid_id = CASE WHEN x.profiles_xid IS NULL OR x.profiles_xid > s.hi THEN 0 "
		"   ELSE coalesce(x.profiles_xid_id, 0) END "
		"  FROM s WHERE x.component = $1 RETURNING x.profiles_xid, x.profiles_xid_id) "
		"SELECT coalesce((SELECT profiles_xid FROM u), s.lo), coalesce((SELECT profiles_xid_id FROM u), 0), "
		" (SELECT profiles_xid FROM o WHERE profiles_xid > s.hi) FROM s",
		1, NULL, p, NULL, NULL, 0);
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1;
	if (ok) {
		xc->profiles_xid = atoll(PQgetvalue(r, 0, 0));
		xc->profiles_id = atoll(PQgetvalue(r, 0, 1));
		xc->profiles_wait = xc->profiles_past = 0;
		if (!PQgetisnull(r, 0, 2))
			LOG_KV(CW_LOG_WARN,
			       "xmpp profiles: the cursor is another database server's (the database was moved?): "
			       "profile changes are announced from now on",
			       "component", xc->domain, "xid", PQgetvalue(r, 0, 2), "now", PQgetvalue(r, 0, 0));
	}
	PQclear(r);
	return ok;
}

/* Whether changes wait for the open transaction w (0: none), the one the
 * read stopped below: waited for up to xa_open_write_wait_ms, then passed
 * over.  Which one was passed over is kept here (profiles_past), and in
 * the stored cursor once a change after it is read: a change is read
 * only below the oldest open transaction not passed over, so one still
 * open below the cursor is one that this process, or the stream's
 * holder before it, passed over, and the read does not stop below it
 * again (the cursor's own id, the oldest open one when it was first
 * stored, may be open and is waited for).  Until the thirty-fourth
 * session it was known in memory only: a transaction left open for ever
 * (an orphaned PREPARE TRANSACTION, a session idle in one) held the
 * changes back another minute after every reconnection. */
static void profiles_waiting(struct xcomp *xc, long long w)
{
	int64_t now = cw_now_us() / 1000;
	if (w != xc->profiles_wait) {
		xc->profiles_wait = w;
		xc->profiles_wait_since_ms = now;
	} else if (w && now - xc->profiles_wait_since_ms >= xa_open_write_wait_ms(xc)) {
		char v[24];
		snprintf(v, sizeof(v), "%lld", w);
		LOG_KV_LIMITED(CW_LOG_INFO,
			       "xmpp profiles: a transaction open for long holds back profile changes no longer",
			       "component", xc->domain, "xid", v);
		xc->profiles_past = w;
		xc->profiles_wait = 0;
	}
}

/* ------------------------------------------------------------ fan-out */

/* Recipients of profile presences waiting to be written past which no
 * more changes are read (the cursor waits: xa_profiles). */
#define FANOUT_BACKLOG 20000

void xa_fanout_add(struct xcomp *xc, const char *from, const char *remote_id, bool contacts, json_t *to,
		   json_t *photo)
{
	json_t *f = json_pack("{s:s, s:s, s:b, s:O, s:i, s:O?}", "from", from, "id", remote_id, "contacts", contacts,
			      "to", to, "at", 0, "photo", photo);
	pthread_mutex_lock(&xc->mu);
	if (!xc->fanouts)
		xc->fanouts = json_array();
	if (f && xc->fanouts && json_array_append(xc->fanouts, f) == 0)
		xc->fanout_left += json_array_size(to);
	pthread_mutex_unlock(&xc->mu);
	json_decref(f);
	xa_wake_thread(xc);
}

size_t xa_fanout_left(struct xcomp *xc)
{
	pthread_mutex_lock(&xc->mu);
	size_t n = xc->fanout_left;
	pthread_mutex_unlock(&xc->mu);
	return n;
}

void xa_fanout_clear(struct xcomp *xc)
{
	pthread_mutex_lock(&xc->mu);
	json_array_clear(xc->fanouts);
	xc->fanout_left = 0;
	pthread_mutex_unlock(&xc->mu);
}

/* The key of the pair (from, to) in xc->fanout_dropped. */
static void pair_key(char *key, size_t len, const char *from, const char *to)
{
	snprintf(key, len, "%s %s", from, to); /* no JID has a space */
}

void xa_fanout_forget(struct xcomp *xc, const char *from, const char *to)
{
	char key[2 * (XJ_JID_MAX + 1)];
	pair_key(key, sizeof(key), from, to);
	pthread_mutex_lock(&xc->mu);
	if (xc->fanout_taking && !xc->fanout_dropped)
		xc->fanout_dropped = json_object();
	if (xc->fanout_taking)
		json_object_set_new(xc->fanout_dropped, key, json_true());
	pthread_mutex_unlock(&xc->mu);
}

/* Whether each recipient of picks (n) is still to be told, into go: of
 * a profile change, still a contact of the remote user (she allowed
 * them, as the change's read in xa_profiles found her); of a presence
 * that answers the user (a probe, her subscribe: xa_vcard_presence), not
 * blocking them (her own decision, else about their network, as
 * xmpp_cmd.c's consent_is reads it; her identity by her binding, else by
 * her address: until the fiftieth session by her binding alone, and a
 * user who had only probed and blocked by command was never found to
 * block anyone).  Her decisions are read each by
 * its own scalar subquery, an index's look-up whatever the statistics
 * say: as an EXISTS, or as joins, the planner hashed every contact of the
 * remote user when it guessed few rows, 40 ms a batch for 9,000 of them.
 * False when the database did not answer. */
static bool fanout_check(struct xcomp *xc, PGconn *c, struct xa_fan_pick *picks, size_t n)
{
	json_t *asked = json_array();
	for (size_t i = 0; asked && i < n; i++) {
		/* her address too, for a presence that answers her: she may
		 * have no binding yet (only commands and presences of hers
		 * came, which make none) */
		json_t *contacts = json_object_get(picks[i].f, "contacts");
		char bare[XJ_JID_MAX + 1], local[MIMI_LOCAL_MAX + 1], uri[MIMI_URI_MAX + 1] = "";
		cw_errmsg e;
		if (!json_is_true(contacts) && xa_local_user(xc->x, picks[i].to, bare, sizeof(bare), local, sizeof(local)) &&
		    xa_local_uri(xc->x, local, uri, sizeof(uri), &e))
			uri[0] = '\0';
		if (json_array_append_new(asked, json_pack("{s:O, s:s, s:O, s:s}", "r", json_object_get(picks[i].f, "id"), "b",
							   picks[i].to, "c", contacts, "l", uri))) {
			json_decref(asked);
			asked = NULL;
		}
	}
	char *text = asked ? json_dumps(asked, JSON_COMPACT) : NULL;
	json_decref(asked);
	if (!text || !c) {
		free(text);
		return false;
	}
	const char *p[] = { xc->peer, text };
	PGresult *r = PQexecParams(c,
		"SELECT t.n FROM jsonb_array_elements($2::jsonb) WITH ORDINALITY t(p, n) JOIN peers pe ON pe.name = $1 "
		"CROSS JOIN LATERAL (SELECT coalesce((SELECT lb.identity_id FROM identity_bindings lb "
		"  WHERE lb.network = 'xmpp' AND lb.native_id = t.p->>'b'), "
		" (SELECT li.id FROM identities li WHERE li.uri = nullif(t.p->>'l', ''))) AS id) l "
		"CROSS JOIN LATERAL (SELECT "
		" (SELECT k.state FROM consents k WHERE k.local_identity_id = l.id "
		"  AND k.subject_kind = 'user' AND k.subject = 'mimi://' || pe.domain || '/u/' || (t.p->>'r')) AS u, "
		" (SELECT k.state FROM consents k WHERE k.local_identity_id = l.id "
		"  AND k.subject_kind = 'domain' AND k.subject = pe.domain) AS d) s "
		"WHERE CASE WHEN (t.p->>'c')::boolean THEN s.u IS NOT DISTINCT FROM 'allowed' "
		" ELSE coalesce(s.u, s.d) IS DISTINCT FROM 'blocked' END",
		2, NULL, p, NULL, NULL, 0);
	free(text);
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;
	for (int i = 0; ok && i < PQntuples(r); i++) {
		long k = atol(PQgetvalue(r, i, 0));
		if (k >= 1 && (size_t)k <= n)
			picks[k - 1].go = true;
	}
	if (!ok)
		LOG_KV_LIMITED(CW_LOG_WARN, "xmpp profiles: whether the contacts are still contacts could not be read; "
					    "their presences wait", "component", xc->domain, "detail", PQerrorMessage(c));
	PQclear(r);
	return ok;
}

/* st (released) serialised into pick's text[k] (NULL: out of memory). */
static void pick_text(struct xa_fan_pick *pick, int k, xmpp_stanza_t *st)
{
	if (st && xmpp_stanza_to_text(st, &pick->text[k], &pick->len[k]) != XMPP_EOK)
		pick->text[k] = NULL;
	if (st)
		xmpp_stanza_release(st);
}

/* Under mu: the first k recipients of the fan-outs (those of picks, in
 * order) done: the fan-outs they finish removed, the next one's place
 * moved on. */
static void fanouts_advance_locked(struct xcomp *xc, const struct xa_fan_pick *picks, size_t k)
{
	size_t i = 0;
	while (i < k) {
		json_t *f = json_array_get(xc->fanouts, 0);
		size_t at = (size_t)json_integer_value(json_object_get(f, "at")), n = json_array_size(json_object_get(f, "to"));
		size_t take = 0;
		while (i + take < k && picks[i + take].f == f)
			take++;
		if (!f || take == 0)
			break; /* not the fan-outs picked (cleared meanwhile: never, the thread's own) */
		if (at + take >= n)
			json_array_remove(xc->fanouts, 0);
		else
			json_object_set_new(f, "at", json_integer((json_int_t)(at + take)));
		i += take;
	}
	xc->fanout_left -= xc->fanout_left < k ? xc->fanout_left : k;
}

/* Under mu: no batch is being made (xa_fanout_take) any more. */
static void taking_end_locked(struct xcomp *xc)
{
	xc->fanout_taking = false;
	json_object_clear(xc->fanout_dropped);
}

size_t xa_fanout_take(struct xcomp *xc, struct xa_fan_pick *picks, size_t max)
{
	/* Their lists never change once added, and only this thread takes
	 * them, so they are read after. */
	size_t n = 0;
	pthread_mutex_lock(&xc->mu);
	for (size_t e = 0; n < max && e < json_array_size(xc->fanouts); e++) {
		json_t *f = json_array_get(xc->fanouts, e), *to = json_object_get(f, "to");
		for (size_t i = (size_t)json_integer_value(json_object_get(f, "at")); n < max && i < json_array_size(to);
		     i++) {
			picks[n] = (struct xa_fan_pick){ .f = json_incref(f), .to = json_string_value(json_array_get(to, i)) };
			n++;
		}
	}
	xc->fanout_taking = n > 0;
	pthread_mutex_unlock(&xc->mu);
	return n;
}

size_t xa_fanout_put(struct xcomp *xc, struct xa_fan_pick *picks, size_t n)
{
	size_t want = 0, done = 0;
	for (size_t i = 0; i < n; i++) {
		if (!picks[i].go)
			continue;
		const char *from = json_string_value(json_object_get(picks[i].f, "from"));
		json_t *photo = json_object_get(picks[i].f, "photo");
		xmpp_stanza_t *p = xmpp_presence_new(xc->ctx);
		bool known = !json_is_null(photo); /* else no <x/> and no event (xa_fanout_add) */
		if (p) {
			xmpp_stanza_set_from(p, from);
			xmpp_stanza_set_to(p, picks[i].to);
			if (known)
				add_update(xc->ctx, p, photo);
		}
		pick_text(&picks[i], 0, p);
		if (known)
			pick_text(&picks[i], 1, avatar_event(xc->ctx, from, picks[i].to, photo));
		want += known ? 2 : 1;
	}
	/* Queued together, or not at all (the queue full: they wait for the
	 * next turn, as the recipients not taken yet do; until the
	 * forty-sixth session those the queue did not take were lost); a
	 * pair whose roster was dropped meanwhile is left out, its drop's
	 * presences queued after this (xa_fanout_forget). */
	pthread_mutex_lock(&xc->mu);
	if (n && xa_queue_room_locked(xc) >= want) {
		for (size_t i = 0; i < n; i++) {
			char key[2 * (XJ_JID_MAX + 1)];
			pair_key(key, sizeof(key), json_string_value(json_object_get(picks[i].f, "from")), picks[i].to);
			if (!picks[i].go || json_object_get(xc->fanout_dropped, key))
				continue;
			for (int k = 0; k < 2; k++)
				if (picks[i].text[k])
					xa_enqueue_locked(xc, picks[i].text[k], picks[i].len[k]);
		}
		fanouts_advance_locked(xc, picks, n);
		done = n;
	}
	taking_end_locked(xc);
	pthread_mutex_unlock(&xc->mu);
	if (n && !done)
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp profiles: the queue is full; profile presences wait for it", "component",
			       xc->domain);
	for (size_t i = 0; i < n; i++) {
		for (int k = 0; k < 2; k++)
			if (picks[i].text[k])
				xmpp_free(xc->ctx, picks[i].text[k]);
		json_decref(picks[i].f);
	}
	return done;
}

size_t xa_fanout_queue(struct xcomp *xc, PGconn *c, size_t max)
{
	int64_t now = cw_now_us() / 1000;
	if (now < xc->fanout_not_before_ms)
		return 0;
	struct xa_fan_pick *picks = calloc(max ? max : 1, sizeof(*picks));
	if (!picks)
		return 0;
	size_t n = xa_fanout_take(xc, picks, max);
	size_t done = 0;
	if (!n || fanout_check(xc, c, picks, n)) {
		done = xa_fanout_put(xc, picks, n);
	} else {
		/* the database did not answer: none goes, again in a second */
		xc->fanout_not_before_ms = now + 1000;
		pthread_mutex_lock(&xc->mu);
		taking_end_locked(xc);
		pthread_mutex_unlock(&xc->mu);
		for (size_t i = 0; i < n; i++)
			json_decref(picks[i].f);
	}
	free(picks);
	return done;
}

void xa_profiles(struct xcomp *xc, PGconn *c)
{
	/* The contacts of the changes read are not all written yet: the
	 * next changes wait (their cursor with them), so that what is kept
	 * for them stays bounded. */
	if (xa_fanout_left(xc) > FANOUT_BACKLOG)
		return;
	if (xc->profiles_xid < 0 && !profiles_cursor(xc, c))
		return; /* tried again on the next turn */
	char xid[24], id[24], past[24];
	snprintf(xid, sizeof(xid), "%lld", xc->profiles_xid);
	snprintf(id, sizeof(id), "%lld", xc->profiles_id);
	snprintf(past, sizeof(past), "%lld", xc->profiles_past);
	const char *p[] = { xc->peer, xid, id, past };
	/* Column 0 the open transaction the read stops below (NULL: none,
	 * or none holds a change back; those up to $4 passed over, and those
	 * below the cursor: see profiles_waiting), then the
	 * changes, if any (one row of NULLs: none), then whether the cursor
	 * is another server's (NEXT_XID).  A change above NEXT_XID is
	 * another server's too, from before the database was moved: not
	 * read (it would take the cursor above this server's ids again), it
	 * is announced once this server's ids pass it, or never if a change
	 * made here comes first. */
#define PEER_CHANGES "FROM identities i JOIN peers pe ON pe.id = i.peer_id AND pe.name = $1 " \
	"WHERE i.profile_xid IS NOT NULL AND NOT i.is_local AND (i.profile_xid, i.id) > ($2::bigint, $3::bigint) " \
	"AND i.profile_xid < h.hi "
	PGresult *r = PQexecParams(c,
		"WITH h AS MATERIALIZED (SELECT (SELECT x::text::bigint FROM pg_snapshot_xip(pg_current_snapshot()) x "
		"  WHERE x::text::bigint > $4::bigint AND x::text::bigint >= $2::bigint ORDER BY 1 LIMIT 1) AS w, "
		NEXT_XID " AS hi) "
		"SELECT CASE WHEN EXISTS (SELECT 1 " PEER_CHANGES " AND i.profile_xid > h.w) THEN h.w END, "
		" n.localpart, n.profile_xid, n.id, n.contacts, $2::bigint > h.hi FROM h LEFT JOIN LATERAL ("
		/* The contacts: the local users who allowed the remote user and
		 * have used XMPP (their binding is their bare JID). */
		" SELECT i.localpart, i.profile_xid, i.id, "
		"  (SELECT coalesce(json_agg(lb.native_id), '[]') FROM consents k JOIN identity_bindings lb "
		"   ON lb.identity_id = k.local_identity_id AND lb.network = 'xmpp' "
		"   WHERE k.subject_kind = 'user' AND k.subject = i.uri AND k.state = 'allowed') AS contacts "
		" " PEER_CHANGES " AND (h.w IS NULL OR i.profile_xid < h.w) "
		" ORDER BY i.profile_xid, i.id LIMIT 64) n ON true",
		4, NULL, p, NULL, NULL, 0);
#undef PEER_CHANGES
	if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) < 1) {
		PQclear(r);
		return;
	}
	if (PQgetvalue(r, 0, 5)[0] == 't') {
		/* This process's cursor is another server's: the database was
		 * moved under it (its connections went to the new server) */
		PQclear(r);
		xc->profiles_xid = -1;
		profiles_cursor(xc, c);
		return;
	}
	profiles_waiting(xc, PQgetisnull(r, 0, 0) ? 0 : atoll(PQgetvalue(r, 0, 0)));
	int i, n = PQgetisnull(r, 0, 1) ? 0 : PQntuples(r);
	for (i = 0; i < n; i++) {
		const char *remote_id = PQgetvalue(r, i, 1);
		char remote_jid[XJ_JID_MAX + 1];
		json_t *to = json_loads(PQgetvalue(r, i, 4), 0, NULL);
		cache_drop(xc, remote_id); /* whoever asks next gets the new one */
		if (json_array_size(to) && xa_remote_jid(xc, remote_id, remote_jid, sizeof(remote_jid))) {
			struct vjob *j = calloc(1, sizeof(*j));
			if (!j) {
				json_decref(to);
				break;
			}
			j->xc = xc;
			j->changed = true;
			j->to = to;
			snprintf(j->remote_id, sizeof(j->remote_id), "%s", remote_id);
			snprintf(j->remote_jid, sizeof(j->remote_jid), "%s", remote_jid);
			if (!vcard_start(j)) {
				vjob_free(j);
				break; /* the fetchers are busy: this one on the next turn */
			}
			to = NULL;
		}
		json_decref(to);
		xc->profiles_xid = atoll(PQgetvalue(r, i, 2));
		xc->profiles_id = atoll(PQgetvalue(r, i, 3));
	}
	PQclear(r);
	if (i == 0)
		return;
	snprintf(xid, sizeof(xid), "%lld", xc->profiles_xid);
	snprintf(id, sizeof(id), "%lld", xc->profiles_id);
	const char *q[] = { xc->domain, xid, id };
	/* Kept for the next holder of the stream; the roster sync made the
	 * row (if that failed, this process goes on from memory). */
	r = PQexecParams(c, "UPDATE xmpp_roster_sync SET profiles_xid = $2::bigint, profiles_xid_id = $3::bigint "
			    "WHERE component = $1", 3, NULL, q, NULL, NULL, 0);
	PQclear(r);
}
