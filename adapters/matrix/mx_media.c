/* The Matrix adapter's media (docs/matrix.md "Media"): a local user's file
 * (mxc:// of our homeserver, or of another server whose file the user
 * forwarded: our homeserver fetches it over federation) fetched through
 * the homeserver with the appservice's token when a
 * peer asks for it (GET /v1/media/{token}); a peer's file fetched and
 * uploaded to the homeserver as the remote user's ghost before the message
 * that carries it is sent. */
#include "config.h"
#include "matrix_int.h"
#include "log.h"
#include "media.h"
#include "peer/event.h"
#include "store.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

#define MEDIA_TIMEOUT_MS 30000L

/* mxc://<server>/<media id>: the server and the media id (false when url
 * is not a content URI).  Any server's: a user's homeserver serves its
 * own files and, to its users (and its appservice), other servers' too,
 * which it fetches over federation; a file a user forwarded from another
 * server is no bare link into a store the peer cannot reach. */
static bool mxc_split(const char *url, char *server, size_t slen, char *id, size_t len)
{
	const char *mid;
	if (!mx_mxc_parse(url, server, slen, &mid) || strlen(mid) >= len)
		return false;
	memcpy(id, mid, strlen(mid) + 1);
	return true;
}

bool matrix_media_owns(void *ctx, const char *url)
{
	(void)ctx;
	char server[256], id[256];
	return url && mxc_split(url, server, sizeof(server), id, sizeof(id));
}

/* One GET of the homeserver's media API into b. */
static CURLcode hs_get(struct matrix *m, CURL *h, const char *path, struct media_blob *b, long *status)
{
	char url[1400], auth[600];
	snprintf(url, sizeof(url), "%.*s%s", (int)mx_hs_base_len(m->cfg), m->cfg->mx_homeserver_url, path);
	snprintf(auth, sizeof(auth), "Authorization: Bearer %s", m->cfg->mx_as_token);
	struct curl_slist *hd = curl_slist_append(NULL, auth);
	media_blob_free(b);
	b->too_big = false;
	b->refused = NULL;
	b->cancel = &m->app->stopping;
	media_download_setup(h, url, hd, b, m->cfg->ca_file, MEDIA_TIMEOUT_MS);
	CURLcode cc = hd ? curl_easy_perform(h) : CURLE_OUT_OF_MEMORY;
	*status = 0;
	if (cc == CURLE_OK) {
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
		media_download_done(h, b);
	}
	curl_slist_free_all(hd);
	return cc;
}

/* The errcode of a Matrix error answer in b, into code. */
static void errcode_of(const struct media_blob *b, char *code, size_t len)
{
	code[0] = '\0';
	json_t *j = b->p ? json_loadb((const char *)b->p, b->n, 0, NULL) : NULL;
	const char *c = json_string_value(json_object_get(j, "errcode"));
	if (c)
		snprintf(code, len, "%s", c);
	json_decref(j);
}

/* Why the homeserver's answer (status, not 200, and errcode code) to a
 * download is no file however often it is asked, or NULL (a try later
 * may have it: a 502 or 504 without M_TOO_LARGE, a 429, a 401 of this
 * gateway's token; or a 4xx, which the peer's answer tells apart).  The
 * specification's download answers a file (200), a redirect to it (307,
 * 308: libcurl follows up to 3 hops, so a 3xx here names no other
 * place), 502 M_TOO_LARGE (a file larger than the homeserver serves),
 * 504 M_NOT_YET_UPLOADED, 429; a 2xx other than 200 holds no file or a
 * part of one (204, 206 to a request without Range), not to be given as
 * the whole.  Until the fifty-second session every one of them was
 * answered 503 "try again later", and the peer asked again for ever. */
static const char *hs_answer_for_good(long status, const char *code)
{
	if (strcmp(code, "M_TOO_LARGE") == 0)
		return "the homeserver will not serve a file this large (M_TOO_LARGE)";
	if (status / 100 == 3)
		return "the homeserver answers a redirect that names no other place";
	if (status == 204)
		return "the homeserver answers 204 No Content, not the file";
	if (status == 206)
		return "the homeserver answers a part of the file (206), not all of it";
	if (status / 100 == 2)
		return "the homeserver answers another success than 200 OK, not the file";
	return NULL;
}

/* Why a download the homeserver's redirects ended (cc) is no file
 * however often it is asked, or NULL.  The homeserver (or its CDN, where
 * a 307 or 308 sends the download) sends it round more than the 3 hops
 * libcurl follows (a loop, or a chain too long), or to a place not over
 * http or https (ftp://, file://): each try meets the same redirects.
 * Until the fifty-second session both were answered 503 "try again
 * later", and the peer asked again for ever. */
static const char *hs_transfer_for_good(CURLcode cc)
{
	if (cc == CURLE_TOO_MANY_REDIRECTS)
		return "the homeserver's download redirects more than 3 times (a loop, or a chain too long)";
	if (cc == CURLE_UNSUPPORTED_PROTOCOL)
		return "the homeserver's download redirects to a place not over http or https";
	return NULL;
}

cw_err matrix_media_fetch(void *ctx, const char *url, struct media_blob *b, long *status, cw_errmsg *e)
{
	struct matrix *m = ctx;
	char server[256], id[256], path[800], code[64];
	*status = 0;
	if (!mxc_split(url, server, sizeof(server), id, sizeof(id)))
		return cw_fail(e, CW_EINVAL, "not a content URI");
	CURL *h = curl_easy_init();
	if (!h)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	char *sv = curl_easy_escape(h, server, 0);
	/* Authenticated media (Matrix 1.11); a homeserver older than that
	 * does not know the path (404 M_UNRECOGNIZED) and serves the old one. */
	snprintf(path, sizeof(path), "/_matrix/client/v1/media/download/%s/%s", sv ? sv : "", id);
	CURLcode cc = hs_get(m, h, path, b, status);
	if (cc == CURLE_OK && (*status == 404 || *status == 405)) {
		errcode_of(b, code, sizeof(code));
		if (strcmp(code, "M_UNRECOGNIZED") == 0 || *status == 405) {
			snprintf(path, sizeof(path), "/_matrix/media/v3/download/%s/%s", sv ? sv : "", id);
			cc = hs_get(m, h, path, b, status);
		}
	}
	curl_free(sv);
	curl_easy_cleanup(h);
	if (cc == CURLE_FILESIZE_EXCEEDED)
		b->too_big = true;
	if (cc != CURLE_OK) {
		media_blob_free(b);
		b->refused = hs_transfer_for_good(cc);
		return cw_fail(e, b->refused ? CW_EINVAL : CW_EUNAVAIL, "homeserver: %s",
			       b->too_big ? "the file is too large" : curl_easy_strerror(cc));
	}
	if (*status != 200) {
		errcode_of(b, code, sizeof(code));
		media_blob_free(b);
		b->refused = hs_answer_for_good(*status, code);
		return cw_fail(e, b->refused ? CW_EINVAL : CW_EIO, "homeserver answered %ld %s", *status, code);
	}
	return CW_OK;
}

/* Uploads b as ghost; its mxc:// URI into mxc.  *too_large: the
 * homeserver refused it as too large (413, or M_TOO_LARGE under another
 * status: no later try takes it).  *limited_ms: after a 429 (Synapse
 * limits uploads as it limits sends), the wait it asked for
 * (mx_limit_wait_ms), else -1. */
static cw_err upload(struct matrix *m, const char *ghost, const struct media_blob *b, const char *ct,
		     const char *filename, char *mxc, size_t len, long *status, bool *too_large, long *limited_ms,
		     cw_errmsg *e)
{
	*status = 0;
	*too_large = false;
	*limited_ms = -1;
	CURL *h = curl_easy_init();
	char *g = h && ghost ? curl_easy_escape(h, ghost, 0) : NULL;
	char *f = h && filename ? curl_easy_escape(h, filename, 0) : NULL;
	/* The type whole (the peer API takes up to EVENT_CONTENT_TYPE_MAX
	 * bytes): until the fifty-first session's review 200 bytes here cut
	 * a type longer than 185 short, and the homeserver kept another type
	 * than the event named. */
	char url[1800], auth[600], ctype[sizeof("Content-Type: ") + EVENT_CONTENT_TYPE_MAX];
	snprintf(url, sizeof(url), "%.*s/_matrix/media/v3/upload?user_id=%s&filename=%s", (int)mx_hs_base_len(m->cfg),
		 m->cfg->mx_homeserver_url, g ? g : "", f ? f : "");
	snprintf(auth, sizeof(auth), "Authorization: Bearer %s", m->cfg->mx_as_token);
	snprintf(ctype, sizeof(ctype), "Content-Type: %s", ct);
	struct curl_slist *h1 = curl_slist_append(NULL, auth), *h2 = h1 ? curl_slist_append(h1, ctype) : NULL;
	struct curl_slist *hd = h2 ? curl_slist_append(h2, "Expect:") : NULL;
	struct media_blob answer = { .max = 64 * 1024, .cancel = &m->app->stopping };
	cw_err rc = CW_OK;
	if (!h || !g || !f || !hd) {
		curl_slist_free_all(h1); /* the list's head, whatever was appended */
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	media_download_setup(h, url, hd, &answer, m->cfg->ca_file, MEDIA_TIMEOUT_MS);
	curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(h, CURLOPT_POST, 1L);
	curl_easy_setopt(h, CURLOPT_POSTFIELDS, b->p ? (const char *)b->p : "");
	curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)b->n);
	CURLcode cc = curl_easy_perform(h);
	curl_slist_free_all(hd);
	if (cc != CURLE_OK) {
		rc = cw_fail(e, CW_EUNAVAIL, "homeserver: %s", curl_easy_strerror(cc));
		goto out;
	}
	curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
	json_t *j = answer.p ? json_loadb((const char *)answer.p, answer.n, 0, NULL) : NULL;
	const char *uri = json_string_value(json_object_get(j, "content_uri"));
	const char *code = json_string_value(json_object_get(j, "errcode"));
	*too_large = *status == 413 || (*status != 200 && code && strcmp(code, "M_TOO_LARGE") == 0);
	if (*status == 429) {
		*limited_ms = mx_limit_wait_ms(h, j);
		rc = cw_fail(e, CW_EIO, "homeserver rate limit on the upload (429 %s): retry after %ld ms",
			     code ? code : "", *limited_ms);
	} else if (*status != 200)
		rc = cw_fail(e, CW_EIO, "homeserver answered the upload %ld %s", *status, code ? code : "");
	else if (!uri || !mx_mxc_parse(uri, NULL, 0, NULL) || strlen(uri) >= len)
		rc = cw_fail(e, CW_EIO, "homeserver answered the upload without a valid content_uri");
	else
		snprintf(mxc, len, "%s", uri);
	json_decref(j);
out:
	media_blob_free(&answer);
	curl_free(g);
	curl_free(f);
	if (h)
		curl_easy_cleanup(h);
	return rc;
}

/* The size an attachment declares; server.media_max_bytes (max) when it
 * declares none (a peer's always does: adapters/peer/event.c). */
static json_int_t declared_size(const json_t *att, size_t max)
{
	const json_t *s = json_object_get(att, "size");
	return json_is_integer(s) && json_integer_value(s) >= 0 ? json_integer_value(s) : (json_int_t)max;
}

/* The file's mxc:// URI when it is on the homeserver already (and its
 * size, as fetched, into *stored unless NULL), fetched for the same signer (the sending peer's domain, NULL for a sender of no
 * peer: media_rehosted.fetched_for ''), and no larger than the attachment
 * declares (declared: its size; the policy's max_attachment_bytes judged
 * that, so a file re-hosted for an honest declaration is not reused for a
 * smaller one).  By signer: a file a store gave Causeway on one peer's
 * behalf (a signed fetch) is not another peer's to have by naming its
 * URL (until the twentieth session the lookup was by URL alone); rows
 * from before schema/027 (fetched_for NULL) match nothing. */
static cw_err cached(PGconn *c, const char *url, const char *signer, const char *want, json_int_t declared,
		     char *mxc, size_t len, bool *found, json_int_t *stored, cw_errmsg *e)
{
	*found = false;
	char size[24];
	snprintf(size, sizeof(size), "%lld", (long long)declared);
	const char *p[] = { url, want ? want : "", size, signer ? signer : "" };
	PGresult *r = PQexecParams(c, "SELECT native_uri, size FROM media_rehosted WHERE network = 'matrix' AND source = $1 "
				      "AND fetched_for = $4 AND ($2 = '' OR sha256 = $2) AND size <= $3::bigint "
				      "ORDER BY created_at DESC LIMIT 1",
				   4, NULL, p, NULL, NULL, 0);
	cw_err rc = store_check(c, r, PGRES_TUPLES_OK, e);
	if (rc)
		return rc;
	if (PQntuples(r) == 1 && strlen(PQgetvalue(r, 0, 0)) < len) {
		snprintf(mxc, len, "%s", PQgetvalue(r, 0, 0));
		*found = true;
		if (stored)
			*stored = (json_int_t)strtoll(PQgetvalue(r, 0, 1), NULL, 10);
	}
	PQclear(r);
	return CW_OK;
}

/* What the worker remembers of a file, by its URL and the domain that
 * may have it signed (a file fetched for one peer's user is not taken as
 * fetched, nor as unavailable, for another's, whose fetch is signed
 * differently), and by what its attachment declares, sha256 and size: a
 * file refused for not matching them is not refused for an attachment
 * that declares it right (until the thirty-second session the key was
 * the URL alone, and a correct attachment got an earlier wrong one's
 * notice without a fetch).  A refusal for a fact of the URL is then
 * remembered once per declaration: the memo saves fetches, and one more
 * costs nothing wrong. */
static void state_key(const char *signer, const json_t *att, size_t max, char *key, size_t len)
{
	const char *url = json_string_value(json_object_get(att, "url"));
	const char *sha = json_string_value(json_object_get(att, "sha256"));
	/* No domain, digest or number holds a line feed. */
	snprintf(key, len, "%s\n%s\n%lld\n%s", signer ? signer : "", sha ? sha : "",
		 (long long)declared_size(att, max), url ? url : "");
}

/* Empties the memo of what the worker found (files it could not carry):
 * each is asked for again when next sent.  The files queued or in the
 * workers' hands stay: forgotten, they would be queued again (until the
 * twentieth session the whole memo was cleared, and each reset queued
 * the same files anew).  They are at most MX_MEDIA_QUEUE_MAX and the
 * MX_MEDIA_WORKERS the workers hold, below MX_MEDIA_STATE_MAX. */
static void forget_answers(json_t *state)
{
	const char *key;
	json_t *v, *tmp;
	json_object_foreach_safe(state, tmp, key, v) {
		const char *s = json_string_value(json_object_get(v, "s"));
		if (!s || strcmp(s, "queued") != 0)
			json_object_del(state, key);
	}
}

enum mx_rehost mx_media_lookup(struct matrix *m, PGconn *c, int64_t event_id, const char *ghost, const char *signer,
			       const json_t *att, char *mxc, size_t len, json_int_t *size, char *why, size_t wlen,
			       cw_errmsg *e)
{
	const char *url = json_string_value(json_object_get(att, "url"));
	json_int_t declared = declared_size(att, (size_t)m->cfg->media_max_bytes);
	if (!url || !json_is_string(json_object_get(att, "content_type"))) {
		snprintf(why, wlen, "no URL");
		return MX_REHOST_NOTICE;
	}
	if (declared > (json_int_t)m->cfg->media_max_bytes) {
		snprintf(why, wlen, "larger than this gateway carries");
		return MX_REHOST_NOTICE;
	}
	bool found;
	if (cached(c, url, signer, json_string_value(json_object_get(att, "sha256")), declared, mxc, len, &found, size,
		   e))
		return MX_REHOST_RETRY;
	if (found)
		return MX_REHOST_OK;
	return mx_media_ask(m, event_id, ghost, signer, att, why, wlen, e);
}

/* The signer of a queued item ("" for none), the key of media_turns. */
static const char *signer_of(const json_t *item)
{
	const char *s = json_string_value(json_array_get(item, 2));
	return s ? s : "";
}

/* Under mu: the files of signer waiting in the queue. */
static size_t queued_of(struct matrix *m, const char *signer)
{
	size_t i, n = 0;
	json_t *item;
	json_array_foreach(m->media_queue, i, item)
		n += strcmp(signer_of(item), signer ? signer : "") == 0;
	return n;
}

enum mx_rehost mx_media_ask(struct matrix *m, int64_t event_id, const char *ghost, const char *signer,
			    const json_t *att, char *why, size_t wlen, cw_errmsg *e)
{
	enum mx_rehost res = MX_REHOST_WAIT;
	char key[2500];
	state_key(signer, att, (size_t)m->cfg->media_max_bytes, key, sizeof(key));
	pthread_mutex_lock(&m->mu);
	json_t *st = json_object_get(m->media_state, key);
	const char *s = json_string_value(json_object_get(st, "s"));
	const char *w = json_string_value(json_object_get(st, "why"));
	if (s && strcmp(s, "notice") == 0) {
		snprintf(why, wlen, "%s", w ? w : "not available");
		res = MX_REHOST_NOTICE;
	} else if (s && strcmp(s, "retry") == 0) {
		cw_fail(e, CW_EUNAVAIL, "%s", w ? w : "the file could not be fetched");
		/* The upload answered 429: the row waits as asked and its try is
		 * not counted, as after a 429 to any call of its own (until the
		 * fifty-second session's review the upload, made on the worker's
		 * thread, was a failed attempt, and a homeserver limiting
		 * uploads made dead letters of messages with files). */
		const json_t *lim = json_object_get(st, "limited_ms");
		if (json_is_integer(lim))
			mx_rate_limited_note((long)json_integer_value(lim));
		json_object_del(m->media_state, key);
		res = MX_REHOST_RETRY;
	} else if (!s && (json_array_size(m->media_queue) >= MX_MEDIA_QUEUE_MAX ||
			  queued_of(m, signer) >= MX_MEDIA_QUEUE_PER_SIGNER)) {
		/* A slow store must not grow the queue without bound: the row
		 * goes again later (counted, with its backoff), when the worker
		 * has caught up; until the twentieth session it had no cap.  Nor
		 * may one peer's files fill it for the others (since the
		 * thirty-second session). */
		cw_fail(e, CW_EUNAVAIL, "the media worker's queue is full (%d files, %d of one peer)",
			MX_MEDIA_QUEUE_MAX, MX_MEDIA_QUEUE_PER_SIGNER);
		res = MX_REHOST_RETRY;
	} else if (!s) {
		if (json_object_size(m->media_state) >= MX_MEDIA_STATE_MAX)
			forget_answers(m->media_state);
		json_array_append_new(m->media_queue, json_pack("[O, s?, s?, I]", att, ghost, signer, (json_int_t)event_id));
		json_object_set_new(m->media_state, key, json_pack("{s:s}", "s", "queued"));
		pthread_cond_broadcast(&m->media_cond);
	}
	pthread_mutex_unlock(&m->mu);
	return res;
}

/* Under mu: the index of the next file to take, or -1.  A signer with a
 * file in hand waits (at most one of a peer at a time: a slow store holds
 * one thread, not all), and of the others the one whose turn came
 * longest ago (or never) goes, its oldest file first: the signers are
 * served in turn, whatever their backlogs.  The queue is at most
 * MX_MEDIA_QUEUE_MAX items. */
static long next_file(struct matrix *m)
{
	long best = -1;
	json_int_t best_turn = 0;
	size_t i;
	json_t *item;
	json_array_foreach(m->media_queue, i, item) {
		const json_t *t = json_object_get(m->media_turns, signer_of(item));
		if (json_is_true(json_object_get(t, "busy")))
			continue;
		json_int_t turn = json_integer_value(json_object_get(t, "turn"));
		if (best < 0 || turn < best_turn) {
			best = (long)i;
			best_turn = turn;
		}
	}
	return best;
}

/* The workers' database connection, under media_db_mu (taken for a
 * statement or two, never across a fetch): NULL when it cannot be had (e
 * says why; the lock is not held then). */
static PGconn *db_take(struct matrix *m, cw_errmsg *e)
{
	pthread_mutex_lock(&m->media_db_mu);
	if (!m->media_db || PQstatus(m->media_db) != CONNECTION_OK) {
		PQfinish(m->media_db);
		m->media_db = store_connect(m->app->cfg->db_url, m->app->cfg->db_statement_timeout_ms, e);
	}
	if (!m->media_db)
		pthread_mutex_unlock(&m->media_db_mu);
	return m->media_db;
}

static void db_give(struct matrix *m)
{
	pthread_mutex_unlock(&m->media_db_mu);
}

static void *media_main(void *arg)
{
	cw_thread_name("cw-mx-media");
	struct matrix *m = arg;
	static atomic_llong turns; /* only their order matters */
	pthread_mutex_lock(&m->mu);
	while (!atomic_load(&m->media_stop)) {
		long at = next_file(m);
		if (at < 0) {
			pthread_cond_wait(&m->media_cond, &m->mu);
			continue;
		}
		json_t *item = json_incref(json_array_get(m->media_queue, (size_t)at));
		json_array_remove(m->media_queue, (size_t)at);
		char who[300];
		snprintf(who, sizeof(who), "%s", signer_of(item));
		json_int_t turn = (json_int_t)atomic_fetch_add(&turns, 1) + 1;
		json_object_set_new(m->media_turns, who, json_pack("{s:b, s:I}", "busy", 1, "turn", turn));
		pthread_mutex_unlock(&m->mu);
		const json_t *att = json_array_get(item, 0);
		const char *signer = json_string_value(json_array_get(item, 2));
		char mxc[300], why[160] = "", key[2500];
		state_key(signer, att, (size_t)m->cfg->media_max_bytes, key, sizeof(key));
		cw_errmsg e = { { 0 } };
		long limited_ms = -1;
		enum mx_rehost res = mx_rehost(m, (int64_t)json_integer_value(json_array_get(item, 3)),
					       json_string_value(json_array_get(item, 1)), signer, att, mxc, sizeof(mxc),
					       why, sizeof(why), &limited_ms, &e);
		pthread_mutex_lock(&m->mu);
		/* Carried, or no longer wanted by its message: forgotten, and a
		 * row of another message that waited for the same file asks
		 * again (and queues it for its own). */
		if (res == MX_REHOST_OK || res == MX_REHOST_UNWANTED)
			json_object_del(m->media_state, key);
		else if (res == MX_REHOST_RETRY && limited_ms >= 0)
			json_object_set_new(m->media_state, key,
					    json_pack("{s:s, s:s, s:I}", "s", "retry", "why", e.msg, "limited_ms",
						      (json_int_t)limited_ms));
		else
			json_object_set_new(m->media_state, key,
					    json_pack("{s:s, s:s}", "s", res == MX_REHOST_NOTICE ? "notice" : "retry", "why",
						      res == MX_REHOST_NOTICE ? why : e.msg));
		/* Its turn stays while it has files waiting; a signer with none
		 * is forgotten (the table holds only signers with files). */
		if (queued_of(m, who))
			json_object_set(json_object_get(m->media_turns, who), "busy", json_false());
		else
			json_object_del(m->media_turns, who);
		pthread_cond_broadcast(&m->media_cond); /* the signer's next file may go */
		json_decref(item);
	}
	pthread_mutex_unlock(&m->mu);
	return NULL;
}

void mx_media_start(struct matrix *m)
{
	m->media_turns = json_object();
	if (!m->media_turns)
		return;
	pthread_mutex_init(&m->media_db_mu, NULL);
	for (int i = 0; i < MX_MEDIA_WORKERS; i++)
		if (cw_thread_start(&m->media_threads[m->media_started], media_main, m))
			m->media_started++;
}

void mx_media_stop(struct matrix *m)
{
	if (!m->media_turns)
		return;
	pthread_mutex_lock(&m->mu);
	atomic_store(&m->media_stop, true);
	pthread_cond_broadcast(&m->media_cond);
	pthread_mutex_unlock(&m->mu);
	for (int i = 0; i < m->media_started; i++)
		pthread_join(m->media_threads[i], NULL);
	m->media_started = 0;
	PQfinish(m->media_db);
	m->media_db = NULL;
	pthread_mutex_destroy(&m->media_db_mu);
	json_decref(m->media_turns);
	m->media_turns = NULL;
}

/* The message (or edit) event $1 a file is fetched for still wants it:
 * its content is there and a row of it to Matrix is still owed (not
 * delivered, expired or dropped).  The worker may hold a file for a
 * long time (a slow store: up to the fetch's timeout, behind the
 * queue), and the message may expire, or the policy drop it, meanwhile,
 * its content and the records of its files going with it
 * (RETENTION_FORGET_FILES): until the forty-eighth session's review the
 * worker uploaded the file all the same and wrote a record nothing named
 * any more, kept until the retention sweep's media kind (schema/048). */
#define FILE_WANTED(e) \
	e ".id = $1::bigint AND " e ".content <> '{}'::jsonb AND EXISTS (SELECT 1 FROM outbox o " \
	"  WHERE o.event_id = " e ".id AND o.destination = 'matrix' " \
	"  AND o.state IN ('pending', 'held', 'in_flight', 'failed', 'dead'))"

/* Whether event_id still wants its file (FILE_WANTED), on the workers'
 * connection.  A failure says yes: the fetch goes on, as before. */
static bool file_wanted(struct matrix *m, int64_t event_id)
{
	char id[24];
	snprintf(id, sizeof(id), "%lld", (long long)event_id);
	const char *p[] = { id };
	cw_errmsg e;
	PGconn *c = db_take(m, &e);
	if (!c)
		return true;
	PGresult *r = PQexecParams(c, "SELECT 1 FROM events e WHERE " FILE_WANTED("e"), 1, NULL, p, NULL, NULL, 0);
	bool wanted = store_check(c, r, PGRES_TUPLES_OK, &e) != CW_OK || PQntuples(r) > 0;
	PQclear(r);
	db_give(m);
	return wanted;
}

/* The record of a file uploaded for event $1 ($2 source, $3 sha256, $4
 * mxc://, $5 size, $6 signer), written only while the event still wants
 * it, its row locked (FOR SHARE) until the record is in: an expiry or a
 * drop erasing its content meanwhile waits for this statement (the
 * expiry sweep passes over it, SKIP LOCKED, and takes it, record and
 * all, the next time), or, committed first, leaves nothing to lock. */
static const char record_sql[] =
	"WITH w AS (SELECT e.id FROM events e WHERE " FILE_WANTED("e") " FOR SHARE OF e) "
	"INSERT INTO media_rehosted (network, source, sha256, native_uri, size, fetched_for) "
	"SELECT 'matrix', $2, $3, $4, $5::bigint, $6 FROM w ON CONFLICT DO NOTHING";

enum mx_rehost mx_rehost(struct matrix *m, int64_t event_id, const char *ghost, const char *signer,
			 const json_t *att, char *mxc, size_t len, char *why, size_t wlen, long *limited_ms,
			 cw_errmsg *e)
{
	*limited_ms = -1;
	const char *url = json_string_value(json_object_get(att, "url"));
	const char *ct = json_string_value(json_object_get(att, "content_type"));
	const char *want = json_string_value(json_object_get(att, "sha256"));
	const char *name = json_string_value(json_object_get(att, "filename"));
	size_t max = (size_t)m->cfg->media_max_bytes;
	json_int_t declared = declared_size(att, max);
	if (!url || !ct) {
		snprintf(why, wlen, "no URL");
		return MX_REHOST_NOTICE;
	}
	if (declared > (json_int_t)max) {
		snprintf(why, wlen, "larger than this gateway carries");
		return MX_REHOST_NOTICE;
	}
	bool found;
	PGconn *c = db_take(m, e);
	if (!c)
		return MX_REHOST_RETRY;
	cw_err crc = cached(c, url, signer, want, declared, mxc, len, &found, NULL, e);
	db_give(m);
	if (crc)
		return MX_REHOST_RETRY;
	if (found)
		return MX_REHOST_OK;
	if (!file_wanted(m, event_id))
		return MX_REHOST_UNWANTED;

	/* Signed as Causeway, as every request to a peer is, when the file is
	 * on a host of the sender's peer (signer); another host's file is
	 * fetched plain: the peer must not lend Causeway's signature to it
	 * (until the nineteenth session every such fetch was signed).  At
	 * most the declared size: the policy's max_attachment_bytes judged
	 * that, and a longer file is refused as one that does not match its
	 * checksum is (until the seventeenth session the fetch took up to
	 * server.media_max_bytes whatever was declared, and a file declared
	 * 10 bytes passed a 1000-byte rule and was uploaded whole). */
	bool capped = declared < (json_int_t)max;
	struct media_blob b = { .max = capped ? (size_t)declared : max, .cancel = &m->app->stopping };
	long status = 0;
	cw_err frc = media_fetch_peer(m->app, url, signer, MEDIA_TIMEOUT_MS, &b, &status, e);
	enum mx_rehost res = MX_REHOST_RETRY;
	char got[65];
	if (b.too_big) {
		snprintf(why, wlen, capped ? "larger than its declared size" : "larger than this gateway carries");
		res = MX_REHOST_NOTICE;
	} else if (b.refused) {
		/* Refused for a fact of its URL (an address that is not public,
		 * not https, ...): no retry changes that, the message goes with a
		 * notice (since the twenty-sixth session; before, the row was
		 * tried again until its budget was spent, then dead). */
		snprintf(why, wlen, "%s", b.refused);
		res = MX_REHOST_NOTICE;
	} else if (frc) {
		; /* e says why: the row goes again */
	} else if (status == 408 || status == 429 || status >= 500) {
		cw_fail(e, CW_EUNAVAIL, "the attachment's server answered %ld", status);
	} else if (status != 200) {
		/* Gone, or not ours to have: the message goes with a notice. */
		snprintf(why, wlen, "not available from the sender's network (%ld)", status);
		res = MX_REHOST_NOTICE;
	} else if (media_sha256_hex(&b, got), want && strcmp(got, want) != 0) {
		snprintf(why, wlen, "it does not match its checksum");
		res = MX_REHOST_NOTICE;
	} else if (!file_wanted(m, event_id)) {
		res = MX_REHOST_UNWANTED; /* expired or dropped while it came: not uploaded */
	} else {
		long up = 0;
		bool too_large = false;
		if (upload(m, ghost, &b, ct, name && *name ? name : "file", mxc, len, &up, &too_large, limited_ms,
			   e) == CW_OK) {
			char size[24], id[24];
			snprintf(size, sizeof(size), "%zu", b.n);
			snprintf(id, sizeof(id), "%lld", (long long)event_id);
			const char *q[] = { id, url, got, mxc, size, signer ? signer : "" };
			cw_errmsg e2;
			c = db_take(m, &e2);
			if (!c || store_command(c, record_sql, 6, q, &e2))
				LOG_KV(CW_LOG_WARN, "cannot remember a re-hosted file", "detail", e2.msg);
			if (c)
				db_give(m);
			res = MX_REHOST_OK;
		} else if (too_large) {
			snprintf(why, wlen, "larger than the homeserver takes");
			res = MX_REHOST_NOTICE;
		}
	}
	media_blob_free(&b);
	return res;
}
