/* JIDs and the reversible remote-id <-> localpart escaping (see xj.h). */
#include "config.h"
#include "xmpp/xj.h"
#include "utf8.h"

#include <arpa/inet.h>
#include <string.h>

#define XJ_ID_MAX 255 /* bytes of a remote user's id */

/* Valid UTF-8 of 1..XJ_PART_MAX bytes without control characters
 * (U+0000-U+001F, U+007F) and, when forbidden is not NULL, without those
 * ASCII characters. */
static bool part_ok(const char *s, size_t n, const char *forbidden)
{
	if (n == 0 || n > XJ_PART_MAX)
		return false;
	const unsigned char *p = (const unsigned char *)s;
	while (n) {
		/* ASCII judged here, the same way (until the sixty-first
		 * session a call of cw_utf8_seq a byte: each message checks
		 * its two JIDs, xm_from_neutral_kept) */
		if (*p < 0x80) {
			if (*p < 0x20 || *p == 0x7F || (forbidden && strchr(forbidden, *p)))
				return false;
			p++;
			n--;
			continue;
		}
		/* a sequence of more than one byte: U+0080 or above (an
		 * overlong form of a lower one is refused, l 0), neither a
		 * control character nor one of the forbidden, all ASCII */
		size_t l = cw_utf8_seq(p, n, NULL);
		if (l == 0)
			return false;
		p += l;
		n -= l;
	}
	return true;
}

static bool ipv4_ok(const char *s, size_t n)
{
	char buf[16];
	unsigned char addr[4];
	if (n >= sizeof(buf))
		return false;
	memcpy(buf, s, n);
	buf[n] = '\0';
	return inet_pton(AF_INET, buf, addr) == 1; /* dotted quad, no leading zeros */
}

static bool ipv6_ok(const char *s, size_t n)
{
	char buf[64];
	unsigned char addr[16];
	if (n < 2 || s[0] != '[' || s[n - 1] != ']' || n - 2 >= sizeof(buf))
		return false;
	memcpy(buf, s + 1, n - 2);
	buf[n - 2] = '\0';
	return inet_pton(AF_INET6, buf, addr) == 1;
}

/* A lower-case DNS name (labels 1-63 of [a-z0-9-], not starting or ending
 * with '-', single dots, no trailing dot), an IPv4 literal or "[" IPv6 "]".
 * A name of digits and dots only must be an IPv4 literal. */
static bool domain_ok(const char *s, size_t n)
{
	if (n == 0 || n > XJ_PART_MAX)
		return false;
	if (s[0] == '[')
		return ipv6_ok(s, n);
	size_t label = 0;
	bool only_digits = true;
	for (size_t i = 0; i <= n; i++) {
		char c = i < n ? s[i] : '.';
		if (c == '.') {
			if (label == 0 || label > 63 || s[i - 1] == '-')
				return false;
			label = 0;
			continue;
		}
		bool alpha = c >= 'a' && c <= 'z', digit = c >= '0' && c <= '9';
		if (!alpha && !digit && c != '-')
			return false;
		if (c == '-' && label == 0)
			return false;
		if (!digit)
			only_digits = false;
		label++;
	}
	return !only_digits || ipv4_ok(s, n);
}

/* Copies n bytes of s into out as a string; out NULL: only validates. */
static bool put(char *out, size_t len, const char *s, size_t n)
{
	if (!out)
		return true;
	if (n + 1 > len)
		return false;
	memcpy(out, s, n);
	out[n] = '\0';
	return true;
}

static void clear(char *out, size_t len)
{
	if (out && len)
		out[0] = '\0';
}

bool xj_split(const char *jid, char *local, size_t llen, char *domain, size_t dlen, char *resource, size_t rlen)
{
	clear(local, llen);
	clear(domain, dlen);
	clear(resource, rlen);
	if (!jid)
		return false;
	size_t total = strnlen(jid, XJ_JID_MAX + 1);
	if (total == 0 || total > XJ_JID_MAX)
		return false;
	/* The resource starts at the first '/'; the localpart ends at the first
	 * '@' before it (RFC 7622 section 3.2). */
	const char *slash = memchr(jid, '/', total);
	size_t bare = slash ? (size_t)(slash - jid) : total;
	const char *at = memchr(jid, '@', bare);
	const char *dom = at ? at + 1 : jid;
	size_t ln = at ? (size_t)(at - jid) : 0;
	size_t dn = bare - (size_t)(dom - jid);
	size_t rn = slash ? total - bare - 1 : 0;
	if (at && !part_ok(jid, ln, "\"&'/:<>@ "))
		return false;
	if (!domain_ok(dom, dn))
		return false;
	if (slash && !part_ok(slash + 1, rn, NULL))
		return false;
	if (!put(local, llen, jid, ln) || !put(domain, dlen, dom, dn) ||
	    !put(resource, rlen, slash ? slash + 1 : "", rn)) {
		clear(local, llen);
		clear(domain, dlen);
		clear(resource, rlen);
		return false;
	}
	return true;
}

/* Whether xj_escape_local writes byte c as '\' + two hex digits. */
static bool escaped_byte(unsigned char c)
{
	return c < 0x20 || c >= 0x7F || (c >= 'A' && c <= 'Z') || strchr(" \"&'/:<>@\\", c) != NULL;
}

static const char hexdig[] = "0123456789abcdef";

bool xj_escape_local(const char *id, char *out, size_t len)
{
	clear(out, len);
	if (!id)
		return false;
	size_t n = strnlen(id, XJ_ID_MAX + 1);
	if (n == 0 || n > XJ_ID_MAX)
		return false;
	size_t o = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)id[i];
		size_t need = escaped_byte(c) ? 3 : 1;
		if (out && o + need + 1 > len) {
			clear(out, len);
			return false;
		}
		if (out) {
			if (need == 3) {
				out[o] = '\\';
				out[o + 1] = hexdig[c >> 4];
				out[o + 2] = hexdig[c & 0xF];
			} else {
				out[o] = (char)c;
			}
		}
		o += need;
	}
	if (out)
		out[o] = '\0';
	return true;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1; /* upper-case digits are not what xj_escape_local writes */
}

bool xj_unescape_local(const char *local, char *out, size_t len)
{
	clear(out, len);
	if (!local)
		return false;
	size_t o = 0;
	for (const char *p = local; *p; o++) {
		unsigned char c = (unsigned char)*p;
		if (c == '\\') {
			int hi = hexval(p[1]), lo = hi < 0 ? -1 : hexval(p[2]);
			if (lo < 0)
				goto fail;
			c = (unsigned char)(hi << 4 | lo);
			if (c == 0 || !escaped_byte(c))
				goto fail; /* \00 or an escape of a byte that stays as it is */
			p += 3;
		} else {
			if (escaped_byte(c))
				goto fail; /* a byte that would have been escaped */
			p++;
		}
		if (o >= XJ_ID_MAX || (out && o + 2 > len))
			goto fail;
		if (out)
			out[o] = (char)c;
	}
	if (o == 0)
		goto fail;
	if (out)
		out[o] = '\0';
	return true;
fail:
	clear(out, len);
	return false;
}
