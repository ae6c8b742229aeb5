/* Matrix identifiers and ghost user ids (see mx_id.h). */
#include "config.h"
#include "matrix/mx_id.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------ server names */

static bool is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static bool is_lower(char c)
{
	return c >= 'a' && c <= 'z';
}

static bool is_upper(char c)
{
	return c >= 'A' && c <= 'Z';
}

static bool is_hex(char c)
{
	return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* A dotted quad of 1-3 digit numbers, each 0-255 (len bytes at s). */
static bool ipv4_shape(const char *s, size_t len, bool *in_range)
{
	int parts = 0;
	size_t i = 0;
	*in_range = true;
	while (i < len) {
		size_t start = i;
		unsigned v = 0;
		while (i < len && is_digit(s[i])) {
			v = v * 10 + (unsigned)(s[i] - '0');
			i++;
		}
		if (i == start || i - start > 3)
			return false;
		if (v > 255)
			*in_range = false;
		parts++;
		if (i < len) {
			if (s[i] != '.' || parts == 4)
				return false;
			i++;
			if (i == len)
				return false;
		}
	}
	return parts == 4;
}

static bool dns_name_valid(const char *s, size_t len)
{
	if (len == 0 || len > 255)
		return false;
	bool label_empty = true;
	for (size_t i = 0; i < len; i++) {
		char c = s[i];
		if (c == '.') {
			if (label_empty)
				return false;
			label_empty = true;
		} else if (is_digit(c) || is_lower(c) || is_upper(c) || c == '-') {
			label_empty = false;
		} else {
			return false;
		}
	}
	return !label_empty;
}

static bool port_valid(const char *s, size_t len)
{
	if (len == 0 || len > 5)
		return false;
	unsigned long v = 0;
	for (size_t i = 0; i < len; i++) {
		if (!is_digit(s[i]))
			return false;
		v = v * 10 + (unsigned long)(s[i] - '0');
	}
	return v <= 65535;
}

static bool server_name_valid_n(const char *s, size_t len)
{
	if (len == 0)
		return false;
	size_t host_len;
	if (s[0] == '[') {
		const char *close = memchr(s, ']', len);
		if (!close)
			return false;
		size_t inner = (size_t)(close - s) - 1;
		if (inner < 2 || inner > 45)
			return false;
		char buf[46];
		for (size_t i = 0; i < inner; i++) {
			char c = s[1 + i];
			if (!is_hex(c) && c != ':' && c != '.')
				return false;
			buf[i] = c;
		}
		buf[inner] = '\0';
		unsigned char addr[16];
		if (inet_pton(AF_INET6, buf, addr) != 1)
			return false;
		host_len = inner + 2;
	} else {
		const char *colon = memchr(s, ':', len);
		host_len = colon ? (size_t)(colon - s) : len;
		bool in_range;
		if (ipv4_shape(s, host_len, &in_range)) {
			if (!in_range)
				return false;
		} else if (!dns_name_valid(s, host_len)) {
			return false;
		}
	}
	if (host_len == len)
		return true;
	if (s[host_len] != ':')
		return false;
	return port_valid(s + host_len + 1, len - host_len - 1);
}

bool mx_server_name_valid(const char *s)
{
	return s && server_name_valid_n(s, strlen(s));
}

/* ------------------------------------------------------------ ids */

static bool compliant_char(char c)
{
	return is_lower(c) || is_digit(c) || c == '.' || c == '_' || c == '=' || c == '-' || c == '/' || c == '+';
}

bool mx_localpart_compliant(const char *localpart)
{
	if (!localpart || !*localpart)
		return false;
	for (const char *p = localpart; *p; p++)
		if (!compliant_char(*p))
			return false;
	return true;
}

static bool copy_out(char *dst, size_t dlen, const char *src, size_t n)
{
	if (!dst)
		return dlen == 0;
	if (n + 1 > dlen)
		return false;
	memcpy(dst, src, n);
	dst[n] = '\0';
	return true;
}

bool mx_mxc_parse(const char *uri, char *server, size_t slen, const char **media_id)
{
	if (!uri || strncmp(uri, "mxc://", 6) != 0)
		return false;
	const char *srv = uri + 6, *slash = strchr(srv, '/');
	if (!slash || !server_name_valid_n(srv, (size_t)(slash - srv)) ||
	    !copy_out(server, slen, srv, (size_t)(slash - srv)))
		return false;
	size_t n = strlen(slash + 1);
	if (n == 0 || n > 255)
		return false;
	for (const char *p = slash + 1; *p; p++)
		if (!(is_lower(*p) || (*p >= 'A' && *p <= 'Z') || is_digit(*p) || *p == '_' || *p == '-'))
			return false;
	if (media_id)
		*media_id = slash + 1;
	return true;
}

/* sigil local ":" server with local valid UTF-8 (no ':' by construction). */
static bool split_id(const char *s, char sigil, bool allow_empty_local, const char **local, size_t *local_len,
		     const char **server)
{
	if (!s || s[0] != sigil)
		return false;
	size_t len = strlen(s);
	if (len > MX_ID_MAX)
		return false;
	const char *colon = strchr(s + 1, ':');
	if (!colon)
		return false;
	size_t ll = (size_t)(colon - s) - 1;
	if ((!ll && !allow_empty_local) || !cw_utf8_valid(s + 1, ll))
		return false;
	if (!server_name_valid_n(colon + 1, len - ll - 2))
		return false;
	*local = s + 1;
	*local_len = ll;
	*server = colon + 1;
	return true;
}

bool mx_user_id_parse(const char *s, char *localpart, size_t llen, char *server, size_t slen)
{
	const char *local, *srv;
	size_t ll;
	if (!split_id(s, '@', true, &local, &ll, &srv))
		return false;
	return copy_out(localpart, llen, local, ll) && copy_out(server, slen, srv, strlen(srv));
}

bool mx_room_alias_parse(const char *s, char *localpart, size_t llen, char *server, size_t slen)
{
	const char *local, *srv;
	size_t ll;
	if (!split_id(s, '#', false, &local, &ll, &srv))
		return false;
	return copy_out(localpart, llen, local, ll) && copy_out(server, slen, srv, strlen(srv));
}

bool mx_alias_directory_path(const char *alias, char *out, size_t outlen)
{
	char *a = alias ? curl_easy_escape(NULL, alias, 0) : NULL;
	int n = a ? snprintf(out, outlen, "/_matrix/client/v3/directory/room/%s", a) : -1;
	curl_free(a);
	bool ok = n >= 0 && (size_t)n < outlen;
	if (!ok && outlen)
		out[0] = '\0';
	return ok;
}

static bool b64_char(char c)
{
	return is_lower(c) || is_upper(c) || is_digit(c) || c == '+' || c == '/' || c == '-' || c == '_';
}

/* sigil + (opaque ":" server | base64 hash). */
static bool opaque_id_valid(const char *s, char sigil)
{
	if (!s || s[0] != sigil)
		return false;
	size_t len = strlen(s);
	if (len < 2 || len > MX_ID_MAX)
		return false;
	if (strchr(s, ':')) {
		const char *local, *srv;
		size_t ll;
		return split_id(s, sigil, false, &local, &ll, &srv);
	}
	for (const char *p = s + 1; *p; p++)
		if (!b64_char(*p))
			return false;
	return true;
}

bool mx_room_id_valid(const char *s)
{
	return opaque_id_valid(s, '!');
}

bool mx_event_id_valid(const char *s)
{
	return opaque_id_valid(s, '$');
}

/* ------------------------------------------------------------ ghosts */

static const char hexdig[] = "0123456789abcdef";

static int hexval(char c)
{
	if (is_digit(c))
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1; /* upper-case hex is not canonical */
}

/* Bytes that stand for themselves in esc(N). */
static bool net_plain(unsigned char c)
{
	return is_lower((char)c) || is_digit((char)c) || c == '.' || c == '-';
}

/* Bytes that stand for themselves in esc'(R). */
static bool remote_plain(unsigned char c)
{
	return is_lower((char)c) || is_digit((char)c) || c == '.' || c == '-' || c == '/';
}

/* Bytes that esc'(R) writes as "=xx". */
static bool remote_hexed(unsigned char c)
{
	return c != 0 && !remote_plain(c) && !is_upper((char)c) && c != '_';
}

struct out {
	char *p;
	size_t n, cap;
	bool ok;
};

static void put(struct out *o, const char *s, size_t n)
{
	if (!o->ok || o->n + n + 1 > o->cap) {
		o->ok = false;
		return;
	}
	memcpy(o->p + o->n, s, n);
	o->n += n;
	o->p[o->n] = '\0';
}

static void put_hex(struct out *o, unsigned char c)
{
	char h[3] = { '=', hexdig[c >> 4], hexdig[c & 15] };
	put(o, h, 3);
}

bool mx_ghost_id(const char *prefix, const char *network, const char *remote_local, const char *server,
		 char *out, size_t outlen)
{
	if (out && outlen)
		out[0] = '\0';
	if (!out || !mx_localpart_compliant(prefix) || !network || !*network || !remote_local || !*remote_local ||
	    !mx_server_name_valid(server))
		return false;
	char buf[MX_ID_MAX + 1];
	struct out o = { buf, 0, sizeof(buf), true };
	put(&o, "@", 1);
	put(&o, prefix, strlen(prefix));
	for (const unsigned char *p = (const unsigned char *)network; *p && o.ok; p++) {
		if (net_plain(*p))
			put(&o, (const char *)p, 1);
		else
			put_hex(&o, *p);
	}
	put(&o, "_", 1);
	for (const unsigned char *p = (const unsigned char *)remote_local; *p && o.ok; p++) {
		if (remote_plain(*p)) {
			put(&o, (const char *)p, 1);
		} else if (is_upper((char)*p)) {
			char e[2] = { '_', (char)(*p - 'A' + 'a') };
			put(&o, e, 2);
		} else if (*p == '_') {
			put(&o, "__", 2);
		} else {
			put_hex(&o, *p);
		}
	}
	put(&o, ":", 1);
	put(&o, server, strlen(server));
	if (!o.ok || o.n > MX_ID_MAX || o.n + 1 > outlen)
		return false;
	memcpy(out, buf, o.n + 1);
	return true;
}

/* "=xx" at s with canonical lower-case hex: the byte, or -1. */
static int unhex(const char *s)
{
	if (s[0] != '=')
		return -1;
	int hi = hexval(s[1]);
	if (hi < 0)
		return -1;
	int lo = hexval(s[2]);
	if (lo < 0)
		return -1;
	return hi * 16 + lo;
}

bool mx_ghost_parse(const char *prefix, const char *server, const char *user_id, char *network, size_t nlen,
		    char *remote_local, size_t rlen)
{
	if (network && nlen)
		network[0] = '\0';
	if (remote_local && rlen)
		remote_local[0] = '\0';
	if (!mx_localpart_compliant(prefix) || !mx_server_name_valid(server) || !user_id || user_id[0] != '@')
		return false;
	size_t len = strlen(user_id), plen = strlen(prefix), slen = strlen(server);
	if (len > MX_ID_MAX || len < 1 + plen + slen + 1 || strncmp(user_id + 1, prefix, plen) != 0)
		return false;
	const char *colon = user_id + len - slen - 1;
	if (*colon != ':' || strcmp(colon + 1, server) != 0 || memchr(user_id, ':', (size_t)(colon - user_id)))
		return false;
	const char *p = user_id + 1 + plen, *end = colon;

	char net[MX_ID_MAX + 1], rem[MX_ID_MAX + 1];
	size_t nn = 0, rn = 0;
	while (p < end && *p != '_') {
		if (net_plain((unsigned char)*p)) {
			net[nn++] = *p++;
			continue;
		}
		int v = end - p >= 3 ? unhex(p) : -1;
		if (v <= 0 || net_plain((unsigned char)v))
			return false;
		net[nn++] = (char)v;
		p += 3;
	}
	if (p == end || nn == 0)
		return false;
	p++; /* the separator */
	while (p < end) {
		unsigned char c = (unsigned char)*p;
		if (remote_plain(c)) {
			rem[rn++] = *p++;
		} else if (c == '_') {
			if (end - p < 2)
				return false;
			if (p[1] == '_')
				rem[rn++] = '_';
			else if (is_lower(p[1]))
				rem[rn++] = (char)(p[1] - 'a' + 'A');
			else
				return false;
			p += 2;
		} else {
			int v = end - p >= 3 ? unhex(p) : -1;
			if (v < 0 || !remote_hexed((unsigned char)v))
				return false;
			rem[rn++] = (char)v;
			p += 3;
		}
	}
	if (rn == 0)
		return false;
	return copy_out(network, nlen, net, nn) && copy_out(remote_local, rlen, rem, rn);
}

bool mx_in_ghost_namespace(const char *prefix, const char *server, const char *user_id)
{
	if (!user_id || user_id[0] != '@' || strncmp(user_id + 1, prefix, strlen(prefix)) != 0)
		return false;
	size_t n = strlen(user_id), pl = strlen(prefix), sl = strlen(server);
	return n >= 1 + pl + 1 + sl && user_id[n - sl - 1] == ':' && strcmp(user_id + n - sl, server) == 0;
}
