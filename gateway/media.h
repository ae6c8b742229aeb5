/* Media that crosses the gateway (spec/adapters.md: "media crosses the
 * gateway re-hosted, never as a bare link into a private store"):
 * a bounded download into memory, and the capability tokens under which
 * Causeway offers a local user's media to one peer (GET /v1/media/{token},
 * docs/interop-api.md "Media").  No protocol here: the adapters say where
 * a file comes from and where it goes. */
#ifndef CW_MEDIA_H
#define CW_MEDIA_H

#include "cw.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <openssl/evp.h>

/* A file in memory, at most max bytes. */
struct media_blob {
	unsigned char *p;
	size_t n, max;
	bool too_big;           /* the far side sent more than max */
	const char *refused;    /* media_fetch_peer: why it refused the URL for good, or NULL */
	char content_type[128]; /* as answered, when it is a plain type/subtype */
	const atomic_bool *cancel; /* optional: the transfer ends when it turns true */
};

struct cw_app;

void media_blob_free(struct media_blob *b);

/* Sets h up (it is reset first) to GET url into b, with headers (may be
 * NULL; kept by the caller until the transfer ends), timeout_ms, and
 * ca_file (empty or NULL: the system's trust store).  At most 3
 * redirects, http and https only; ended early when *b->cancel turns true
 * (the daemon is stopping: CURLE_ABORTED_BY_CALLBACK). */
void media_download_setup(CURL *h, const char *url, struct curl_slist *headers, struct media_blob *b,
			  const char *ca_file, long timeout_ms);
/* After the transfer: the answer's content type into b (when valid). */
void media_download_done(CURL *h, struct media_blob *b);

/* Whether s is a media type as RFC 9110 8.3.1 writes it, its type and
 * subtype RFC 6838's restricted names (4.2: a letter or digit, then
 * letters, digits and !#$&-^_.+, at most 127 bytes each):
 *   media-type = type "/" subtype *( OWS ";" OWS [ parameter ] )
 *   parameter  = token "=" ( token / quoted-string )
 * ASCII only (no obs-text: a byte above 0x7e in a quoted string is
 * refused), so that it goes whole into a Content-Type header and never
 * carries a line break.  The one syntax check of every media type: a peer
 * API attachment's content_type (which adds its length, at most
 * EVENT_CONTENT_TYPE_MAX bytes), a Matrix file's mimetype mapped in, the
 * type a fetched file was answered with (its parameters cut first). */
bool media_type_valid(const char *s);

/* Headers that sign a GET of url as Causeway (RFC 9421: @method and
 * @target-uri, created, keyid, nonce, tag), as every request to a peer is:
 * a peer's media store may check them.  url is the URL requested, in
 * httpsig_request_url's normal form (the store rebuilds that form from the
 * request it receives); @target-uri is it without an IPv6 zone id
 * (httpsig_target_uri).  CW_OK with the headers in *out; CW_ENOMEM when
 * out of memory (another try may do); any other error (CW_EINVAL: e says
 * why) when url cannot be signed, which no later try changes (a target
 * URI over HTTPSIG_MAX_FIELD bytes, a byte that is not visible ASCII);
 * *out NULL then. */
cw_err media_signed_get(EVP_PKEY *key, const char *keyid, const char *tag, const char *url,
			struct curl_slist **out, cw_errmsg *e);

/* Whether url's host (as libcurl parses it) is domain or a name under it,
 * compared case-insensitively on a label boundary (media.wa.example is
 * under wa.example, evil-wa.example is not); false for a NULL or empty
 * domain, or a URL libcurl cannot parse. */
bool media_host_in_domain(const char *url, const char *domain);

/* url's host as libcurl reads it to connect, lower-case, into out (""
 * when libcurl cannot read one or it does not fit). */
void media_url_host(const char *url, char *out, size_t len);

/* A GET of a file a peer named (url: https://), trusting server.ca_file,
 * into b (b->max and b->cancel set by the caller).  Signed as Causeway
 * (media_signed_get: app's key, keyid its server.domain, its
 * server.signature_tag) only when the URL's host is under signer_domain
 * (media_host_in_domain), the domain of the peer that named the URL,
 * each hop requested and signed in httpsig_request_url's normal form (the
 * host in lower case, no default port, dot segments resolved, no
 * fragment: as a push's URL, since the fifty-second session);
 * plain otherwise, and always when signer_domain is NULL: Causeway's
 * signature is its credential at every peer, and a peer must not have it
 * lent to another's store (until the nineteenth session every such fetch
 * was signed, whatever its host).  Never through a proxy, whatever the
 * environment says (https_proxy, all_proxy: since the thirty-second
 * session).  Redirects: https only, at most 3,
 * each hop signed or not by its own host, a redirect's own body neither
 * kept nor counted against b->max, but read to 64 KiB at most (since the
 * fifty-first session; a longer one is refused for good, below); every connection's address is
 * checked (media_address_public) unless server.media_private_addresses
 * (loopback, private, link-local and other non-public addresses then
 * pass: the setting is read here, not by each caller, so that no fetch a
 * peer chose can miss it); timeout_ms covers every hop.  CW_OK with
 * *status the far side's status (the body is in b, whatever the status);
 * CW_EINVAL when the fetch was refused for a fact of the URL, which no
 * retry changes (b->refused says which, since the twenty-sixth session):
 * every address of its host not public, a hop not over https, too many
 * redirects, a redirect's page over 64 KiB, a hop to be signed whose URL
 * cannot be (media_signed_get's CW_EINVAL, since the fifty-second
 * session's review), a URL libcurl cannot read (one the peer API takes, https://
 * and visible ASCII, with a port past 65535, say); CW_EUNAVAIL when no answer came
 * (e says why; b->too_big when the cap cut it off). */
cw_err media_fetch_peer(const struct cw_app *app, const char *url, const char *signer_domain, long timeout_ms,
			struct media_blob *b, long *status, cw_errmsg *e);

/* What was refused for good lately, so as not to redo it at every ask: a
 * small table of keys (a URL, a link's MAC; only their SHA-256 is kept)
 * and when each was first noted, at most MEDIA_RECENT_MAX (fixed memory,
 * nothing allocated: a static table needs no freeing); a full table
 * forgets its oldest key for a new one.  A key older than ttl_ms counts
 * as never noted, so what was refused is tried (or logged) again after a
 * while: a host that became public is fetched.  Under its own lock (any
 * thread).  A static one: = MEDIA_RECENT_INIT(ttl_ms).  Since the
 * twenty-seventh session (xmpp_vcard.c's refused avatars, peer_media.c's
 * refused links' log lines). */
#define MEDIA_RECENT_MAX 256
struct media_recent {
	pthread_mutex_t mu;
	int64_t ttl_ms;
	struct media_recent_key {
		unsigned char sha[32];
		int64_t at_ms;
		bool used;
	} e[MEDIA_RECENT_MAX];
};
#define MEDIA_RECENT_INIT(ttl) { .mu = PTHREAD_MUTEX_INITIALIZER, .ttl_ms = (ttl) }

/* Whether key was noted less than r->ttl_ms before now_ms (milliseconds
 * of a monotonic clock, cw_now_us() / 1000). */
bool media_recent_has(struct media_recent *r, const char *key, int64_t now_ms);
/* Notes key at now_ms, unless it was noted less than r->ttl_ms before (its
 * time then stays: the interval runs from the first note); true when it
 * was not, the first note of the interval. */
bool media_recent_note(struct media_recent *r, const char *key, int64_t now_ms);

/* Whether a fetch a peer chose may connect to sa: not loopback,
 * unspecified, private (RFC 1918, RFC 4193), link-local (cloud metadata
 * at 169.254.169.254), shared (RFC 6598), multicast, reserved, nor an
 * IPv4-mapped, -compatible or NAT64 (64:ff9b::/96) IPv6 form of those,
 * nor any local-use NAT64 address (64:ff9b:1::/48). */
bool media_address_public(const struct sockaddr *sa);

/* The bytes of fetched files held in memory (app->media_held: a fetch's
 * cap from its start, then its file's size until its answer is sent),
 * within server.media_fetches x server.media_max_bytes: reserve adds n
 * unless that takes them past it (false: nothing added; compare-and-swap,
 * so two fetches starting at once cannot both take the last room);
 * release gives n back.  Every fetch of a file for a peer or a local
 * user reserves before it starts (peer_media.c, xmpp_vcard.c). */
bool media_held_reserve(struct cw_app *app, size_t n);
void media_held_release(struct cw_app *app, size_t n);

/* Where the files of this provider's users come from (set by the local
 * adapter that has them: Matrix's mxc:// of its homeserver): owns says
 * whether it can fetch url; fetch gets it into b (b->max set by the
 * caller; *status: the far side's HTTP status, 0 when none). */
struct media_source {
	void *ctx;
	bool (*owns)(void *ctx, const char *url);
	cw_err (*fetch)(void *ctx, const char *url, struct media_blob *b, long *status, cw_errmsg *e);
};

/* Lower-case hex SHA-256 of the blob. */
void media_sha256_hex(const struct media_blob *b, char out[65]);

/* The key of the tokens, derived from Causeway's Ed25519 private key (so
 * every process with that key file makes and opens the same tokens). */
bool media_key_derive(EVP_PKEY *signing_key, unsigned char key[32]);

/* "m1.<base64url source>.<base64url of 16 bytes of HMAC-SHA256(key, peer
 * LF source)>": the token of source offered to peer; false when it does
 * not fit in len. */
bool media_token_make(const unsigned char key[32], const char *peer, const char *source, char *out, size_t len);
/* The source of a token made for peer, into source; false for any token
 * not made by media_token_make with this key and peer. */
bool media_token_open(const unsigned char key[32], const char *peer, const char *token, char *source,
		      size_t len);

#endif
