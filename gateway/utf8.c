/* UTF-8 decoding (see utf8.h). */
#include "config.h"
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

size_t cw_utf8_seq(const unsigned char *s, size_t n, unsigned *cp)
{
	if (n == 0)
		return 0;
	unsigned c = s[0], min;
	size_t len;
	if (c < 0x80) {
		if (cp)
			*cp = c;
		return 1;
	} else if (c >= 0xC2 && c <= 0xDF) {
		len = 2;
		c &= 0x1F;
		min = 0x80;
	} else if (c >= 0xE0 && c <= 0xEF) {
		len = 3;
		c &= 0x0F;
		min = 0x800;
	} else if (c >= 0xF0 && c <= 0xF4) {
		len = 4;
		c &= 0x07;
		min = 0x10000;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xC0) != 0x80)
			return 0;
		c = (c << 6) | (s[i] & 0x3Fu);
	}
	if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
		return 0;
	if (cp)
		*cp = c;
	return len;
}

bool cw_utf8_valid(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	while (n) {
		size_t l = cw_utf8_seq(p, n, NULL);
		if (!l)
			return false;
		p += l;
		n -= l;
	}
	return true;
}

bool cw_utf8_has_control(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	for (size_t i = 0; i < n; i++)
		if (p[i] < 0x20 || p[i] == 0x7f || (p[i] == 0xc2 && i + 1 < n && p[i + 1] >= 0x80 && p[i + 1] <= 0x9f))
			return true;
	return false;
}

static bool bidi_control(unsigned cp)
{
	return (cp >= 0x202A && cp <= 0x202E) || (cp >= 0x2066 && cp <= 0x2069);
}

/* Whether the n bytes at s hold a code point that is (bytes that start
 * no valid sequence are passed over). */
static bool has_cp(const char *s, size_t n, bool (*is)(unsigned cp))
{
	const unsigned char *p = (const unsigned char *)s;
	unsigned cp;
	for (size_t i = 0; i < n;) {
		size_t l = cw_utf8_seq(p + i, n - i, &cp);
		if (l == 0)
			l = 1;
		else if (is(cp))
			return true;
		i += l;
	}
	return false;
}

bool cw_utf8_has_bidi_control(const char *s, size_t n)
{
	return has_cp(s, n, bidi_control);
}

bool cw_utf8_bidi_format(unsigned cp)
{
	return bidi_control(cp) || cp == 0x200E || cp == 0x200F || cp == 0x061C;
}

bool cw_utf8_display_control(unsigned cp)
{
	return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cw_utf8_bidi_format(cp) || cp == 0x2028 || cp == 0x2029;
}

static bool noncharacter(unsigned cp)
{
	return (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE;
}

bool cw_utf8_has_noncharacter(const char *s, size_t n)
{
	return has_cp(s, n, noncharacter);
}

static bool text_control(unsigned cp)
{
	return cp != '\n' && cp != '\t' && (cp < 0x20 || (cp >= 0x7F && cp <= 0x9F));
}

const char *cw_utf8_text_problem(const char *s, size_t n)
{
	if (has_cp(s, n, text_control))
		return "may hold no control character but line feed and tab";
	if (cw_utf8_has_bidi_control(s, n))
		return "may hold no bidirectional control (U+202A-U+202E, U+2066-U+2069)";
	if (cw_utf8_has_noncharacter(s, n))
		return "may hold no noncharacter (U+FFFE, U+FFFF, U+FDD0-U+FDEF, ...)";
	return NULL;
}

bool cw_utf8_invisible(unsigned cp)
{
	return cw_utf8_bidi_format(cp) || (cp >= 0x200B && cp <= 0x200D) ||
	       (cp >= 0x2060 && cp <= 0x2064) || cp == 0xFEFF || cp == 0x00AD || cp == 0x034F || cp == 0x180E ||
	       cp == 0x115F || cp == 0x1160 || cp == 0x3164 || cp == 0xFFA0 || cp == 0x2800;
}

/* A character that shows as a blank (or, a control, should). */
bool cw_utf8_blank(unsigned cp)
{
	return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cw_utf8_space(cp);
}

bool cw_utf8_space(unsigned cp)
{
	return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
	       (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
	       cp == 0x3000;
}

bool cw_utf8_zero_width(unsigned cp)
{
	return (cp >= 0x200B && cp <= 0x200D) || cp == 0x2060 || cp == 0xFEFF;
}

size_t cw_utf8_space_at(const char *s)
{
	unsigned cp;
	size_t l = cw_utf8_seq((const unsigned char *)s, strnlen(s, 4), &cp);
	return l && (cw_utf8_space(cp) || cw_utf8_zero_width(cp)) ? l : 0;
}

void cw_utf8_trim(char *s)
{
	const char *p = s;
	for (size_t l; (l = cw_utf8_space_at(p));)
		p += l;
	size_t n = 0; /* the bytes up to the end of the last character that is no white space */
	for (size_t k = 0, l; p[k]; k += l) {
		size_t sp = cw_utf8_space_at(p + k);
		l = sp ? sp : 1;
		if (!sp)
			n = k + 1;
	}
	memmove(s, p, n);
	s[n] = '\0';
}

bool cw_utf8_name_ok(const char *s, size_t n)
{
	if (!cw_utf8_valid(s, n) || memchr(s, '\0', n) || cw_utf8_has_control(s, n) || cw_utf8_has_bidi_control(s, n) ||
	    cw_utf8_has_noncharacter(s, n))
		return false;
	const unsigned char *p = (const unsigned char *)s;
	bool shows = false;
	for (size_t i = 0, l; i < n; i += l) {
		unsigned cp = 0;
		l = cw_utf8_seq(p + i, n - i, &cp);
		if (cp == 0x2028 || cp == 0x2029)
			return false;
		shows = shows || (!cw_utf8_invisible(cp) && !cw_utf8_blank(cp));
	}
	return shows;
}

/* Until the thirty-first session this was the Matrix adapter's own
 * (mx_deliver.c), and XMPP showed the name as the peer gave it. */
void cw_utf8_name_shown(const char *name, char *out, size_t len)
{
	const unsigned char *p = (const unsigned char *)name;
	size_t n = strlen(name), o = 0;
	bool gap = false;
	for (size_t i = 0; i < n && o + 5 < len;) {
		unsigned cp;
		size_t l = cw_utf8_seq(p + i, n - i, &cp);
		if (l == 0) { /* not UTF-8 (the APIs take none): left out */
			i++;
			continue;
		}
		if (cw_utf8_blank(cp) || cw_utf8_invisible(cp)) {
			gap = gap || (cw_utf8_blank(cp) && o > 0);
		} else {
			if (gap)
				out[o++] = ' ';
			memcpy(out + o, p + i, l);
			o += l;
			gap = false;
		}
		i += l;
	}
	out[o] = '\0';
	if (cw_utf8_count(out) > CW_NAME_SHOWN_MAX) {
		o = cw_utf8_prefix(out, CW_NAME_SHOWN_MAX - 1, NULL);
		while (o && out[o - 1] == ' ')
			o--;
		memcpy(out + o, "\xe2\x80\xa6", 4); /* … */
	}
}

/* Whether byte c starts a character (is not a continuation byte). */
static bool starts(char c)
{
	return ((unsigned char)c & 0xC0) != 0x80;
}

size_t cw_utf8_count(const char *s)
{
	size_t n = 0;
	for (; *s; s++)
		n += starts(*s);
	return n;
}

size_t cw_utf8_prefix(const char *s, size_t max, size_t *chars)
{
	size_t i = 0, n = 0;
	for (; s[i]; i++)
		if (starts(s[i]) && n++ == max)
			break;
	if (chars)
		*chars = n > max ? max : n;
	return i;
}

size_t cw_utf8_cut(const char *s, size_t max)
{
	size_t n = strnlen(s, max);
	/* s[n] is the NUL or the byte after the limit: a continuation there
	 * means the last character would be split. */
	while (n && !starts(s[n]))
		n--;
	return n;
}

char *cw_utf8_scrub(const char *s)
{
	size_t n = strlen(s);
	char *out = malloc(n * 3 + 1); /* each byte at most U+FFFD's three */
	if (!out)
		return NULL;
	size_t o = 0;
	const unsigned char *p = (const unsigned char *)s;
	while (n) {
		size_t l = cw_utf8_seq(p, n, NULL);
		if (l) {
			memcpy(out + o, p, l);
			o += l;
		} else {
			memcpy(out + o, "\xEF\xBF\xBD", 3);
			o += 3;
			l = 1;
		}
		p += l;
		n -= l;
	}
	out[o] = '\0';
	return out;
}

/* cw_utf8_echo's step: the sanitized s into out (NULL: only counted), the
 * bytes it makes; with cut, at most max bytes and CW_UTF8_ECHO_MAX
 * characters, room kept for an ellipsis, and *whole set to whether all of
 * s went in. */
static size_t echo_put(const char *s, char *out, size_t max, bool cut, bool *whole)
{
	static const char repl[] = "\xEF\xBF\xBD";
	const unsigned char *p = (const unsigned char *)s;
	size_t n = 0, chars = 0, left = strlen(s);
	*whole = true;
	while (left) {
		unsigned cp = 0;
		size_t k = cw_utf8_seq(p, left, &cp);
		const char *put = (const char *)p;
		size_t put_len = k;
		if (k == 0 || cw_utf8_display_control(cp)) {
			put = repl;
			put_len = 3;
			k = k ? k : 1;
		}
		if (cut && (chars == CW_UTF8_ECHO_MAX || n + put_len + 3 > max)) {
			*whole = false;
			break;
		}
		if (out)
			memcpy(out + n, put, put_len);
		n += put_len;
		chars++;
		p += k;
		left -= k;
	}
	if (chars > CW_UTF8_ECHO_MAX)
		*whole = false;
	return n;
}

void cw_utf8_echo(const char *s, char *out, size_t len)
{
	out[0] = '\0';
	if (len < 4)
		return;
	bool whole;
	size_t n = echo_put(s, NULL, 0, false, &whole);
	if (whole && n <= len - 1) {
		echo_put(s, out, 0, false, &whole);
	} else {
		n = echo_put(s, out, len - 1, true, &whole); /* n + 3 <= len - 1 */
		memcpy(out + n, "\xE2\x80\xA6", 3);
		n += 3;
	}
	out[n] = '\0';
}
