/* Media that crosses the gateway: see media.h. */
#include "config.h"
#include "media.h"
#include "app.h"
#include "peer/httpsig.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <netinet/in.h>

#include <openssl/crypto.h>
#include <openssl/hmac.h>

#define TOKEN_MAC_LEN 16

void media_blob_free(struct media_blob *b)
{
	free(b->p);
	b->p = NULL;
	b->n = 0;
}

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *arg)
{
	struct media_blob *b = arg;
	size_t n = size * nmemb;
	if (n > b->max - b->n) {
		b->too_big = true;
		return 0; /* aborts the transfer */
	}
	unsigned char *q = realloc(b->p, b->n + n + 1);
	if (!q)
		return 0;
	memcpy(q + b->n, ptr, n);
	b->p = q;
	b->n += n;
	return n;
}

static int on_progress(void *arg, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
	(void)dt;
	(void)dn;
	(void)ut;
	(void)un;
	const struct media_blob *b = arg;
	return atomic_load(b->cancel) ? 1 : 0;
}

static bool v4_public(const unsigned char a[4])
{
	return !(a[0] == 0 || a[0] == 10 || a[0] == 127 || (a[0] == 100 && (a[1] & 0xc0) == 64) ||
		 (a[0] == 169 && a[1] == 254) || (a[0] == 172 && (a[1] & 0xf0) == 16) ||
		 (a[0] == 192 && a[1] == 168) || (a[0] == 192 && a[1] == 0 && a[2] == 0) ||
		 (a[0] == 198 && (a[1] & 0xfe) == 18) || a[0] >= 224 ||
		 /* documentation (RFC 5737) and the 6to4 relays' anycast
		  * (RFC 7526), until the forty-seventh session's review let
		  * through though docs/security.md named them */
		 (a[0] == 192 && a[1] == 0 && a[2] == 2) || (a[0] == 198 && a[1] == 51 && a[2] == 100) ||
		 (a[0] == 203 && a[1] == 0 && a[2] == 113) || (a[0] == 192 && a[1] == 88 && a[2] == 99));
}

bool media_address_public(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET)
		return v4_public((const unsigned char *)&((const struct sockaddr_in *)(const void *)sa)->sin_addr);
	if (sa->sa_family != AF_INET6)
		return false;
	const unsigned char *a = ((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr.s6_addr;
	static const unsigned char zero[16];
	static const unsigned char mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	static const unsigned char translated[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0 };
	if (memcmp(a, mapped, 12) == 0 || memcmp(a, zero, 12) == 0) /* ::ffff:a.b.c.d, ::a.b.c.d, ::1, :: */
		return v4_public(a + 12) && memcmp(a, zero, 12) != 0;
	/* The forms that carry an IPv4 address to a translator or a tunnel
	 * of this host's network (until the forty-seventh session's review
	 * they passed as public whatever they carried): IPv4-translated
	 * ::ffff:0:a.b.c.d (RFC 2765, SIIT), 6to4 2002:AABB:CCDD::/48
	 * (RFC 3056, the address in bits 16 to 47), and Teredo 2001::/32
	 * (RFC 4380: its client's address obfuscated, its server's in the
	 * clear; no store is reached that way, so refused whole). */
	if (memcmp(a, translated, 12) == 0)
		return v4_public(a + 12);
	if (a[0] == 0x20 && a[1] == 0x02)
		return v4_public(a + 2);
	if (a[0] == 0x20 && a[1] == 0x01 && a[2] == 0 && a[3] == 0)
		return false;
	if (a[0] == 0 && a[1] == 0x64 && a[2] == 0xff && a[3] == 0x9b && a[4] == 0 && a[5] == 1)
		return false; /* local-use NAT64 64:ff9b:1::/48 (RFC 8215): the operator's own translator,
			       * the IPv4 address anywhere in it (RFC 6052 prefixes /48 to /96) */
	if (a[0] == 0 && a[1] == 0x64 && a[2] == 0xff && a[3] == 0x9b) /* NAT64 64:ff9b::/96 */
		return v4_public(a + 12);
	return !((a[0] & 0xfe) == 0xfc ||                  /* fc00::/7 unique local */
		 (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) || /* fe80::/10 link-local */
		 (a[0] == 0xfe && (a[1] & 0xc0) == 0xc0) || /* fec0::/10 site-local */
		 a[0] == 0xff ||                            /* multicast */
		 (a[0] == 0x20 && a[1] == 0x01 && a[2] == 0x0d && a[3] == 0xb8) || /* documentation */
		 (a[0] == 0x3f && a[1] == 0xff && (a[2] & 0xf0) == 0) ||          /* documentation 3fff::/20 (RFC 9637) */
		 (a[0] == 0x01 && memcmp(a + 1, zero, 7) == 0)); /* discard-only 100::/64 (RFC 6666) */
}

/* What the connections of one hop of a peer-named fetch met. */
struct hop_addresses {
	bool refused; /* an address that is not public */
	bool opened;  /* a connection to a public one */
};

/* Every connection of a peer-named fetch, the redirects' too: refused
 * when its address is not public (checked on the address connected to,
 * so a name that resolves differently later changes nothing); arg is the
 * hop's struct hop_addresses. */
static curl_socket_t open_public(void *arg, curlsocktype purpose, struct curl_sockaddr *a)
{
	struct hop_addresses *seen = arg;
	if (purpose != CURLSOCKTYPE_IPCXN)
		return CURL_SOCKET_BAD;
	if (!media_address_public(&a->addr)) {
		seen->refused = true;
		return CURL_SOCKET_BAD;
	}
	seen->opened = true;
	return socket(a->family, a->socktype, a->protocol);
}

void media_download_setup(CURL *h, const char *url, struct curl_slist *headers, struct media_blob *b,
			  const char *ca_file, long timeout_ms)
{
	curl_easy_reset(h);
	curl_easy_setopt(h, CURLOPT_URL, url);
	curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
	if (headers)
		curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, b);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms < 5000 ? timeout_ms : 5000L);
	/* A store that trickles (under 1 KiB/s for 10 s) is given up, not
	 * waited on for the whole timeout: the fetchers and the Matrix
	 * re-hosting thread are shared by every peer. */
	curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1024L);
	curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, 10L);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
	curl_easy_setopt(h, CURLOPT_MAXREDIRS, 3L);
	/* A declared length over the cap ends the transfer before the body. */
	curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)b->max);
	if (ca_file && *ca_file)
		curl_easy_setopt(h, CURLOPT_CAINFO, ca_file);
	if (b->cancel) {
		curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
		curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
		curl_easy_setopt(h, CURLOPT_XFERINFODATA, b);
	}
}

/* RFC 9110 tchar. */
static bool is_tchar(unsigned char ch)
{
	return cw_ascii_alnum(ch) || (ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

/* RFC 6838 4.2 restricted-name: a letter or digit, then at most 126
 * letters, digits and !#$&-^_.+; the end of it in *end. */
static bool restricted_name(const char *s, const char **end)
{
	size_t n = 0;
	if (!cw_ascii_alnum((unsigned char)s[0]))
		return false;
	while (s[n] && (cw_ascii_alnum((unsigned char)s[n]) || strchr("!#$&-^_.+", s[n])))
		n++;
	*end = s + n;
	return n <= 127;
}

static const char *skip_ows(const char *s)
{
	while (*s == ' ' || *s == '\t')
		s++;
	return s;
}

/* The one check of a media type's syntax (media.h).  Until the
 * fifty-third session there were two: this one, the peer API's
 * (event.c), and media_type_ok here (a fetched file's type and a Matrix
 * file's mimetype), which took a type or subtype starting with a symbol
 * ("image/+png", "-x/y": not RFC 6838 names) and no parameter, and which
 * mx_map.c asked together with this one.  Until the fifty-second session
 * a type and a subtype were any RFC 9110 tokens ("image/x-'or'1", "*" +
 * "/" + "*", a name of 249 bytes) and no parameter was taken
 * ("text/plain; charset=utf-8" was refused). */
bool media_type_valid(const char *s)
{
	const char *p;
	if (!restricted_name(s, &p) || *p != '/' || !restricted_name(p + 1, &p))
		return false;
	for (;;) {
		if (*p == '\0')
			return true;
		p = skip_ows(p); /* white space only before a ';' */
		if (*p != ';')
			return false;
		p = skip_ows(p + 1);
		if (*p == ';' || *p == '\0')
			continue; /* an empty parameter: "[ parameter ]" */
		const char *name = p;
		while (is_tchar((unsigned char)*p))
			p++;
		if (p == name || *p != '=')
			return false;
		p++;
		if (*p == '"') {
			for (p++; *p != '"'; p++) {
				if (*p == '\\')
					p++; /* quoted-pair: HTAB, SP or VCHAR follows */
				if (*p != '\t' && (*p < 0x20 || *p > 0x7e))
					return false; /* the end, a control or a byte past ASCII */
			}
			p++;
		} else {
			const char *value = p;
			while (is_tchar((unsigned char)*p))
				p++;
			if (p == value)
				return false;
		}
	}
}

void media_download_done(CURL *h, struct media_blob *b)
{
	char *ct = NULL;
	b->content_type[0] = '\0';
	if (curl_easy_getinfo(h, CURLINFO_CONTENT_TYPE, &ct) != CURLE_OK || !ct)
		return;
	size_t n = strcspn(ct, "; \t");
	if (n >= sizeof(b->content_type))
		return;
	memcpy(b->content_type, ct, n);
	b->content_type[n] = '\0';
	/* The type without its parameters (cut above): a bare
	 * type/subtype, what the media is served as (peer_media.c). */
	if (!media_type_valid(b->content_type))
		b->content_type[0] = '\0';
}

void media_sha256_hex(const struct media_blob *b, char out[65])
{
	unsigned char d[32];
	cw_sha256(b->p ? (const void *)b->p : (const void *)"", b->n, d);
	cw_hex(out, d, sizeof(d));
}

bool media_key_derive(EVP_PKEY *signing_key, unsigned char key[32])
{
	unsigned char raw[64];
	size_t len = sizeof(raw);
	unsigned int out = 0;
	static const char label[] = "causeway media tokens v1";
	bool ok = signing_key && EVP_PKEY_get_raw_private_key(signing_key, raw, &len) == 1 &&
		  HMAC(EVP_sha256(), raw, (int)len, (const unsigned char *)label, sizeof(label) - 1, key, &out) &&
		  out == 32;
	OPENSSL_cleanse(raw, sizeof(raw));
	return ok;
}

static bool token_mac(const unsigned char key[32], const char *peer, const char *source,
		      unsigned char mac[32])
{
	size_t pl = strlen(peer), sl = strlen(source);
	char *msg = malloc(pl + sl + 2);
	if (!msg)
		return false;
	memcpy(msg, peer, pl);
	msg[pl] = '\n';
	memcpy(msg + pl + 1, source, sl + 1);
	unsigned int out = 0;
	bool ok = HMAC(EVP_sha256(), key, 32, (const unsigned char *)msg, pl + 1 + sl, mac, &out) && out == 32;
	free(msg);
	return ok;
}

bool media_token_make(const unsigned char key[32], const char *peer, const char *source, char *out, size_t len)
{
	unsigned char mac[32];
	size_t sl = strlen(source);
	if (!token_mac(key, peer, source, mac) || len < 4)
		return false;
	memcpy(out, "m1.", 3);
	size_t a = cw_b64url_encode(out + 3, len - 3, (const unsigned char *)source, sl);
	if (a == 0 || 3 + a + 1 + 23 > len)
		return false;
	out[3 + a] = '.';
	return cw_b64url_encode(out + 4 + a, len - 4 - a, mac, TOKEN_MAC_LEN) != 0;
}

/* Unpadded base64url into bytes; -1 for bad text or no room. */
static long b64url_decode(unsigned char *out, size_t outlen, const char *in, size_t n)
{
	if (n == 0 || n % 4 == 1 || n > 4096)
		return -1;
	char buf[4100];
	for (size_t i = 0; i < n; i++) {
		char c = in[i];
		if (c == '+' || c == '/' || c == '=')
			return -1;
		buf[i] = c == '-' ? '+' : c == '_' ? '/' : c;
	}
	size_t m = n;
	while (m % 4)
		buf[m++] = '=';
	buf[m] = '\0';
	return cw_b64_decode(out, outlen, buf);
}

/* Whether text (n characters) is exactly the unpadded base64url of the
 * bytes in (len). */
static bool canonical(const char *text, size_t n, const char *in, size_t len)
{
	size_t cap = (len + 2) / 3 * 4 + 1; /* what cw_b64url_encode wants: room for the padded form */
	char *enc = malloc(cap);
	bool ok = enc && cw_b64url_encode(enc, cap, (const unsigned char *)in, len) == n &&
		  memcmp(enc, text, n) == 0;
	free(enc);
	return ok;
}

bool media_token_open(const unsigned char key[32], const char *peer, const char *token, char *source,
		      size_t len)
{
	if (strncmp(token, "m1.", 3) != 0 || len < 2)
		return false;
	const char *s = token + 3, *dot = strchr(s, '.');
	if (!dot || strchr(dot + 1, '.'))
		return false;
	unsigned char mac[TOKEN_MAC_LEN + 3], want[32];
	long sl = b64url_decode((unsigned char *)source, len - 1, s, (size_t)(dot - s));
	if (sl <= 0 || b64url_decode(mac, sizeof(mac), dot + 1, strlen(dot + 1)) != TOKEN_MAC_LEN)
		return false;
	source[sl] = '\0';
	/* Only the spelling media_token_make writes: base64url leaves the last
	 * character's low bits unused, and a token that differs there must not
	 * open as the same one. */
	char again[32];
	if (strlen(source) != (size_t)sl || !cw_b64url_encode(again, sizeof(again), mac, TOKEN_MAC_LEN) ||
	    strcmp(again, dot + 1) != 0 || !canonical(s, (size_t)(dot - s), source, (size_t)sl) ||
	    !token_mac(key, peer, source, want) || !cw_ct_equal(mac, want, TOKEN_MAC_LEN)) {
		source[0] = '\0';
		return false;
	}
	return true;
}

bool media_held_reserve(struct cw_app *app, size_t n)
{
	size_t budget = (size_t)app->cfg->media_fetches * (size_t)app->cfg->media_max_bytes;
	size_t cur = atomic_load(&app->media_held);
	do {
		if (n > budget || cur > budget - n)
			return false;
	} while (!atomic_compare_exchange_weak(&app->media_held, &cur, cur + n));
	return true;
}

void media_held_release(struct cw_app *app, size_t n)
{
	atomic_fetch_sub(&app->media_held, n);
}

static bool recent_fresh(const struct media_recent *r, const struct media_recent_key *k, int64_t now_ms)
{
	return k->used && now_ms - k->at_ms < r->ttl_ms;
}

/* Under r->mu: key's entry, or NULL; *room: where a new key would go (an
 * unused or stale entry, else the oldest). */
static struct media_recent_key *recent_find(struct media_recent *r, const unsigned char sha[32], int64_t now_ms,
					    struct media_recent_key **room)
{
	struct media_recent_key *found = NULL;
	*room = &r->e[0];
	for (size_t i = 0; i < MEDIA_RECENT_MAX; i++) {
		struct media_recent_key *k = &r->e[i];
		if (k->used && memcmp(k->sha, sha, 32) == 0)
			found = k;
		if (!recent_fresh(r, *room, now_ms))
			continue; /* room found already */
		if (!recent_fresh(r, k, now_ms) || k->at_ms < (*room)->at_ms)
			*room = k;
	}
	return found;
}

/* Whether key was noted less than r->ttl_ms before now_ms; when it was
 * not and note is set, it is noted at now_ms. */
static bool recent_check(struct media_recent *r, const char *key, int64_t now_ms, bool note)
{
	unsigned char sha[32];
	struct media_recent_key *room;
	cw_sha256(key, strlen(key), sha);
	pthread_mutex_lock(&r->mu);
	struct media_recent_key *k = recent_find(r, sha, now_ms, &room);
	bool fresh = k && recent_fresh(r, k, now_ms);
	if (!fresh && note) {
		if (!k)
			k = room;
		memcpy(k->sha, sha, 32);
		k->at_ms = now_ms;
		k->used = true;
	}
	pthread_mutex_unlock(&r->mu);
	return fresh;
}

bool media_recent_has(struct media_recent *r, const char *key, int64_t now_ms)
{
	return recent_check(r, key, now_ms, false);
}

bool media_recent_note(struct media_recent *r, const char *key, int64_t now_ms)
{
	return !recent_check(r, key, now_ms, true);
}

static const char *no_header(void *ctx, const char *name)
{
	(void)ctx;
	(void)name;
	return NULL;
}

cw_err media_signed_get(EVP_PKEY *key, const char *keyid, const char *tag, const char *url,
			struct curl_slist **out, cw_errmsg *e)
{
	char nonce[32], sig_input[1024], sig[256], hd[2][1300];
	unsigned char rnd[16];
	*out = NULL;
	cw_random(rnd, sizeof(rnd));
	cw_b64url_encode(nonce, sizeof(nonce), rnd, sizeof(rnd));
	/* Without a zone id, which the Host header libcurl sends has not. */
	size_t cap = strlen(url) + 1;
	char *target = malloc(cap);
	if (!target)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	httpsig_target_uri(url, target, cap);
	struct httpsig_msg m = { .method = "GET", .target_uri = target, .header = no_header };
	static const char *const components[] = { "@method", "@target-uri", NULL };
	struct httpsig_params sp = { .created = cw_wall_ms() / 1000, .keyid = keyid, .nonce = nonce, .tag = tag };
	cw_err rc = httpsig_sign(&m, components, key, &sp, sig_input, sizeof(sig_input), sig, sizeof(sig), e);
	free(target);
	if (rc)
		return rc;
	snprintf(hd[0], sizeof(hd[0]), "Signature-Input: %s", sig_input);
	snprintf(hd[1], sizeof(hd[1]), "Signature: %s", sig);
	struct curl_slist *l = curl_slist_append(NULL, hd[0]), *l2 = l ? curl_slist_append(l, hd[1]) : NULL;
	if (!l2) {
		curl_slist_free_all(l);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	*out = l2;
	return CW_OK;
}

void media_url_host(const char *url, char *out, size_t len)
{
	CURLU *u = curl_url();
	char *host = NULL;
	out[0] = '\0';
	if (u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK && host && strlen(host) < len)
		for (size_t i = 0; i <= strlen(host); i++)
			out[i] = (char)tolower((unsigned char)host[i]);
	curl_free(host);
	curl_url_cleanup(u);
}

bool media_host_in_domain(const char *url, const char *domain)
{
	if (!url || !domain || !*domain)
		return false;
	/* The host as libcurl reads it to connect: the parser that decides
	 * where the request goes decides whether it is signed. */
	char host[256];
	media_url_host(url, host, sizeof(host));
	size_t hn = strlen(host), dn = strlen(domain);
	/* The domain itself, or a name under it: on a label boundary, so
	 * that evil-wa.example is not under wa.example. */
	return hn && (hn == dn ? strcasecmp(host, domain) == 0
			       : hn > dn && host[hn - dn - 1] == '.' && strcasecmp(host + hn - dn, domain) == 0);
}

#define MEDIA_REDIRECTS 3

/* One hop of a peer-named fetch as its answer comes: whether its body is
 * a redirect's page, read at each head's end from what libcurl parsed of
 * it (the status, the declared length: a 1xx head is followed by
 * another).  libcurl follows no redirect here (media_fetch_peer does, hop
 * by hop), so it hands a 3xx answer's body to the write callback and
 * holds its Content-Length to CURLOPT_MAXFILESIZE like a file's: a
 * redirect's page (nginx's is 154 bytes) counted against the file's cap,
 * and a file declared smaller than it (an icon, a line of text, an empty
 * file) was refused as "larger than its declared size" until the
 * fifty-first session's review.  Now a 3xx answer's body is neither kept
 * nor counted against the file's cap, but is held to REDIRECT_PAGE_MAX of
 * its own (a store must not have the gateway read a page without end: a
 * longer one is refused for good, b->refused), and a declared length over
 * the cap ends any other answer before its body, as CURLOPT_MAXFILESIZE
 * did. */
#define REDIRECT_PAGE_MAX (64 * 1024)
#define REDIRECT_PAGE_LONG "its redirect's page is longer than 64 KiB"
struct hop_answer {
	CURL *h;
	struct media_blob *b;
	bool page;     /* a 3xx answer: its body is no file */
	size_t page_n; /* of it, read */
};

static size_t hop_header(char *ptr, size_t size, size_t nmemb, void *arg)
{
	struct hop_answer *a = arg;
	size_t n = size * nmemb;
	if (n <= 2 && (ptr[0] == '\r' || ptr[0] == '\n')) { /* a head's end */
		long status = 0;
		curl_off_t length = -1; /* none declared */
		curl_easy_getinfo(a->h, CURLINFO_RESPONSE_CODE, &status);
		curl_easy_getinfo(a->h, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
		a->page = status / 100 == 3;
		a->page_n = 0;
		if (a->page && length > REDIRECT_PAGE_MAX) {
			a->b->refused = REDIRECT_PAGE_LONG;
			return 0; /* ends the transfer */
		}
		if (!a->page && status / 100 != 1 && length > (curl_off_t)a->b->max) {
			a->b->too_big = true;
			return 0;
		}
	}
	return n;
}

static size_t hop_data(char *ptr, size_t size, size_t nmemb, void *arg)
{
	struct hop_answer *a = arg;
	size_t n = size * nmemb;
	if (!a->page)
		return on_data(ptr, size, nmemb, a->b);
	if (n > REDIRECT_PAGE_MAX - a->page_n) {
		a->b->refused = REDIRECT_PAGE_LONG;
		return 0; /* aborts the transfer */
	}
	a->page_n += n;
	return n;
}

/* Whether a URL libcurl reads holds a user or a password, which it would
 * send as Basic authentication. */
static bool url_has_user(const char *url)
{
	CURLU *u = curl_url();
	char *user = NULL, *password = NULL;
	bool has = u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		   (curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK ||
		    curl_url_get(u, CURLUPART_PASSWORD, &password, 0) == CURLUE_OK);
	curl_free(user);
	curl_free(password);
	curl_url_cleanup(u);
	return has;
}

/* A redirect's Location as libcurl itself follows one (CURLU_URLENCODE,
 * CURLU_ALLOW_SPACE): spaces and bytes that are not ASCII percent-encoded
 * ("/f/caf\xc3\xa9 x" as "/f/caf%c3%a9%20x"), what is encoded already
 * kept, as a browser does.  libcurl 7.88 hands a relative Location on so
 * in CURLINFO_REDIRECT_URL, but an absolute one raw: until the
 * fifty-second session's review such a hop was refused for good as "not
 * a URL this gateway can fetch" (a space), or its raw bytes refused by
 * httpsig_sign (a hop to be signed) or sent as they were (one not).  A
 * Location libcurl cannot read is kept as it is, for libcurl to refuse as
 * before.  NULL when out of memory. */
static char *redirect_target(const char *next)
{
	CURLU *u = curl_url();
	char *enc = NULL, *out;
	if (u && curl_url_set(u, CURLUPART_URL, next, CURLU_URLENCODE | CURLU_ALLOW_SPACE) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_URL, &enc, 0) == CURLUE_OK)
		out = strdup(enc);
	else
		out = strdup(next);
	curl_free(enc);
	curl_url_cleanup(u);
	return out;
}

cw_err media_fetch_peer(const struct cw_app *app, const char *url, const char *signer_domain, long timeout_ms,
			struct media_blob *b, long *status, cw_errmsg *e)
{
	*status = 0;
	const struct cw_config *cfg = app->cfg;
	CURL *h = curl_easy_init();
	char *at = strdup(url); /* where this hop goes */
	char *req = NULL;       /* the same in its normal form, as requested */
	if (!h || !at) {
		curl_easy_cleanup(h);
		free(at);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	int64_t deadline_us = cw_now_us() + (int64_t)timeout_ms * 1000;
	CURLcode cc = CURLE_OK;
	cw_err rc = CW_OK;
	struct hop_addresses seen = { false, false };
	b->refused = NULL;
	/* Redirects are followed here, not by libcurl: each hop is signed
	 * only when its own host is in signer_domain (a signature is
	 * Causeway's credential: a peer's URL must not lend it to another
	 * host, nor its redirect carry it there), over its own URL. */
	for (int hop = 0;; hop++) {
		struct curl_slist *hd = NULL;
		/* A peer has no business making the gateway send credentials:
		 * event_parse refuses such a URL since the forty-seventh
		 * session's review; this one is a redirect's, or a row's taken
		 * before.  Not quoted: it holds the password. */
		if (url_has_user(at)) {
			char host[256];
			media_url_host(at, host, sizeof(host));
			b->refused = "its URL carries a user or password";
			*status = 0;
			rc = cw_fail(e, CW_EINVAL, "cannot fetch a file of %.200s: %s", host, b->refused);
			break;
		}
		/* The hop is requested and signed in the normal form a push's
		 * URL has (httpsig_request_url), the one the store rebuilds
		 * from the request it receives: until the fifty-second session
		 * it was signed as the peer (or its redirect) spelled it, and a
		 * store checking @target-uri refused "https://Media.Peer.
		 * Example:443/x" or "/a/../x".  A URL that has no normal form
		 * (not http or https, no host, one libcurl cannot read) is
		 * requested as it is and never signed: libcurl refuses it as
		 * before. */
		size_t cap = strlen(at) + 64; /* libcurl adds at most a "/" */
		free(req);
		req = malloc(cap);
		if (!req) {
			rc = cw_fail(e, CW_ENOMEM, "out of memory");
			break;
		}
		cw_errmsg ue;
		bool normal = httpsig_request_url(at, NULL, "the file's URL", req, cap, &ue) == CW_OK;
		const char *go = normal ? req : at;
		if (normal && media_host_in_domain(req, signer_domain)) {
			cw_errmsg se;
			cw_err src = media_signed_get(app->signing_key, cfg->domain ? cfg->domain : "",
						      cfg->signature_tag, req, &hd, &se);
			/* A URL httpsig_sign refuses (CW_EINVAL: a target URI
			 * over 8 KiB, a byte that is not visible ASCII) is
			 * refused so at every try: for good, not as memory
			 * running out, which until the fifty-second session's
			 * review every failure here was (a 503 "try again
			 * later" for a link, a Matrix row retried until its
			 * budget was spent).  Not fetched unsigned either: the
			 * store is the peer's, and checks it.  Memory or
			 * OpenSSL failing may mend: another try. */
			if (src && src != CW_EINVAL) {
				rc = cw_fail(e, src, "%s", se.msg);
				break;
			}
			if (src) {
				char host[256];
				media_url_host(req, host, sizeof(host));
				b->refused = "its URL cannot be signed";
				*status = 0;
				rc = cw_fail(e, CW_EINVAL, "cannot fetch a file of %.200s: %s (%s)", host, b->refused,
					     se.msg);
				break;
			}
		}
		long left_ms = (long)((deadline_us - cw_now_us()) / 1000);
		if (left_ms <= 0) {
			curl_slist_free_all(hd);
			cc = CURLE_OPERATION_TIMEDOUT;
			break;
		}
		media_blob_free(b);
		b->too_big = false;
		media_download_setup(h, go, hd, b, cfg->ca_file, left_ms);
		/* A redirect's page is no part of the file (hop_answer). */
		struct hop_answer ans = { .h = h, .b = b };
		curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)0);
		curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, hop_header);
		curl_easy_setopt(h, CURLOPT_HEADERDATA, &ans);
		curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, hop_data);
		curl_easy_setopt(h, CURLOPT_WRITEDATA, &ans);
		/* A URL a peer chose: https only, redirects included, and never
		 * to an address of this host or its private network (SSRF: the
		 * body comes back to users the peer can reach). */
		curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "https");
		curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
		/* Never through a proxy of the environment (https_proxy,
		 * all_proxy): the address check below would see the proxy's
		 * address, not the host's, and the proxy would reach any host
		 * for the peer (until the thirty-second session libcurl
		 * followed them).  "" turns every proxy off. */
		curl_easy_setopt(h, CURLOPT_PROXY, "");
		seen = (struct hop_addresses){ false, false };
		if (!cfg->media_private_addresses) {
			curl_easy_setopt(h, CURLOPT_OPENSOCKETFUNCTION, open_public);
			curl_easy_setopt(h, CURLOPT_OPENSOCKETDATA, &seen);
		}
		cc = curl_easy_perform(h);
		curl_slist_free_all(hd);
		if (cc != CURLE_OK)
			break;
		char *next = NULL;
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
		if (*status / 100 != 3 || curl_easy_getinfo(h, CURLINFO_REDIRECT_URL, &next) != CURLE_OK || !next) {
			media_download_done(h, b);
			break;
		}
		if (hop == MEDIA_REDIRECTS) {
			cc = CURLE_TOO_MANY_REDIRECTS;
			break;
		}
		free(at);
		at = redirect_target(next);
		if (!at) {
			rc = cw_fail(e, CW_ENOMEM, "out of memory");
			break;
		}
	}
	if (cc == CURLE_FILESIZE_EXCEEDED)
		b->too_big = true;
	curl_easy_cleanup(h);
	free(at);
	free(req);
	if (rc)
		return rc;
	if (cc != CURLE_OK) {
		*status = 0;
		/* Facts of the URL, the same at every try (a host whose every
		 * address was refused: one that was not, or a public one that
		 * did not answer, may answer later). */
		if (cc == CURLE_COULDNT_CONNECT && seen.refused && !seen.opened)
			b->refused = "its address is not public";
		else if (cc == CURLE_UNSUPPORTED_PROTOCOL)
			b->refused = "not over https";
		else if (cc == CURLE_TOO_MANY_REDIRECTS)
			b->refused = "too many redirects";
		else if (cc == CURLE_URL_MALFORMAT)
			b->refused = "not a URL this gateway can fetch";
		if (b->refused)
			return cw_fail(e, CW_EINVAL, "cannot fetch %.200s: %s", url, b->refused);
		return cw_fail(e, CW_EUNAVAIL, "cannot fetch %.200s: %s", url,
			       b->too_big ? "larger than this gateway carries" : curl_easy_strerror(cc));
	}
	return CW_OK;
}
