/* HTTP Message Signatures (RFC 9421, Ed25519), Content-Digest (RFC 9530) and
 * the replay cache: see httpsig.h for the contract. */
#include "config.h"
#include "httpsig.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>

/* ------------------------------------------------------------------ errors */

__attribute__((format(printf, 3, 0)))
static cw_err vfail_in(cw_errmsg *e, const char *field, const char *fmt, va_list ap)
{
	if (e) {
		int n = field ? snprintf(e->msg, sizeof(e->msg), "%s: ", field) : 0;
		if (n < 0 || (size_t)n >= sizeof(e->msg))
			n = 0;
		vsnprintf(e->msg + n, sizeof(e->msg) - (size_t)n, fmt, ap);
	}
	return CW_EINVAL;
}

/* CW_EINVAL with "Field: reason". */
__attribute__((format(printf, 3, 4)))
static cw_err fail_in(cw_errmsg *e, const char *field, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	cw_err rc = vfail_in(e, field, fmt, ap);
	va_end(ap);
	return rc;
}

/* A library failure: the reason from OpenSSL's queue, which is then emptied
 * so that the next request on this thread starts clean. */
static cw_err ossl_fail(cw_errmsg *e, cw_err code, const char *what)
{
	char detail[256] = "no detail";
	unsigned long err = ERR_peek_last_error();
	if (err)
		ERR_error_string_n(err, detail, sizeof(detail));
	ERR_clear_error();
	return cw_fail(e, code, "%s: %s", what, detail);
}

/* ------------------------------------------------------- character classes */

static bool is_lcalpha(unsigned char c) { return c >= 'a' && c <= 'z'; }
static bool is_alpha(unsigned char c) { return is_lcalpha(c) || (c >= 'A' && c <= 'Z'); }
static bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static bool is_tchar(unsigned char c)
{
	return is_alpha(c) || is_digit(c) || (c && strchr("!#$%&'*+-.^_`|~", c));
}
static bool is_key_char(unsigned char c)
{
	return is_lcalpha(c) || is_digit(c) || c == '_' || c == '-' || c == '.' || c == '*';
}
static bool is_b64_char(unsigned char c) { return is_alpha(c) || is_digit(c) || c == '+' || c == '/'; }
static bool is_sf_string_char(unsigned char c) { return c >= 0x20 && c < 0x7f; }

/* Copies a string already bounded by HTTPSIG_MAX_TOKEN. */
static void copy_token(char dst[HTTPSIG_MAX_TOKEN + 1], const char *src)
{
	size_t n = strnlen(src, HTTPSIG_MAX_TOKEN);
	memcpy(dst, src, n);
	dst[n] = '\0';
}

/* ------------------------------------------------------------------ base64 */

#define B64_MAX_DECODED 96 /* the largest thing we decode: a 64-byte value */

/* Standard base64, padding optional (RFC 8941 asks parsers to accept its
 * absence); EVP_DecodeBlock wants whole quanta and counts the padding as
 * zero bytes, so both are handled here.  False on any malformation or when
 * the result would exceed cap. */
static bool b64_decode(const char *in, size_t len, unsigned char *out, size_t cap, size_t *outlen)
{
	size_t pad = 0;
	while (len > 0 && in[len - 1] == '=' && pad < 2) {
		len--;
		pad++;
	}
	for (size_t i = 0; i < len; i++)
		if (!is_b64_char((unsigned char)in[i]))
			return false;
	if (len % 4 == 1)
		return false;
	size_t missing = (4 - len % 4) % 4;
	if (pad && pad != missing)
		return false;
	size_t n = (len + missing) / 4 * 3 - missing;
	if (n > cap || n > B64_MAX_DECODED)
		return false;
	char quanta[B64_MAX_DECODED / 3 * 4 + 8];
	unsigned char raw[B64_MAX_DECODED + 3];
	memcpy(quanta, in, len);
	memset(quanta + len, '=', missing);
	if (len + missing == 0) {
		*outlen = 0;
		return true;
	}
	int got = EVP_DecodeBlock(raw, (const unsigned char *)quanta, (int)(len + missing));
	if (got < 0 || (size_t)got != n + missing) {
		ERR_clear_error();
		return false;
	}
	memcpy(out, raw, n);
	*outlen = n;
	return true;
}

/* ------------------------------------------- a growable buffer with a cap */

struct sbuf {
	char *p;
	size_t len, alloc, max;
	bool over, oom;
};

static void sb_init(struct sbuf *b, size_t max)
{
	memset(b, 0, sizeof(*b));
	b->max = max;
}

static void sb_add(struct sbuf *b, const char *d, size_t n)
{
	if (b->over || b->oom)
		return;
	if (n > b->max - b->len) {
		b->over = true;
		return;
	}
	if (b->len + n + 1 > b->alloc) {
		size_t a = b->alloc ? b->alloc : 256;
		while (a < b->len + n + 1)
			a *= 2;
		char *q = realloc(b->p, a);
		if (!q) {
			b->oom = true;
			return;
		}
		b->p = q;
		b->alloc = a;
	}
	memcpy(b->p + b->len, d, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void sb_str(struct sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

static void sb_lower(struct sbuf *b, const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (c >= 'A' && c <= 'Z')
			c = (char)(c - 'A' + 'a');
		sb_add(b, &c, 1);
	}
}

static void sb_free(struct sbuf *b)
{
	free(b->p);
	memset(b, 0, sizeof(*b));
}

static cw_err sb_check(const struct sbuf *b, const char *what, cw_errmsg *e)
{
	if (b->oom)
		return cw_fail(e, CW_ENOMEM, "out of memory building the %s", what);
	if (b->over)
		return cw_fail(e, CW_EINVAL, "%s longer than %zu bytes", what, b->max);
	return CW_OK;
}

/* ------------------------------------ RFC 8941: the subset these fields use */

enum sf_type { SF_INTEGER, SF_DECIMAL, SF_STRING, SF_TOKEN, SF_BOOLEAN, SF_BYTES };

struct sf_item {
	enum sf_type type;
	int64_t integer;
	bool boolean;
	size_t len;                       /* of str */
	char str[HTTPSIG_MAX_TOKEN + 1];  /* a string (unescaped) or a token */
	const char *bytes;                /* a byte sequence: its base64 text, in the field */
	size_t nbytes;
};

struct sf_param {
	char key[HTTPSIG_MAX_TOKEN + 1];
	struct sf_item v;
};

/* A cursor over one field value. */
struct sf {
	const char *start, *p, *end;
	const char *field; /* "Signature-Input", for the messages */
	cw_errmsg *e;
};

#define SF_OFF(s) ((long)((s)->p - (s)->start))

__attribute__((format(printf, 2, 3)))
static cw_err sf_fail(struct sf *s, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	cw_err rc = vfail_in(s->e, s->field, fmt, ap);
	va_end(ap);
	return rc;
}

static cw_err sf_unexpected(struct sf *s, const char *expected)
{
	if (s->p >= s->end)
		return sf_fail(s, "unexpected end, expected %s", expected);
	unsigned char c = (unsigned char)*s->p;
	if (c >= 0x80)
		return sf_fail(s, "non-ASCII byte 0x%02x at offset %ld, expected %s", c, SF_OFF(s), expected);
	if (c < 0x20 || c == 0x7f)
		return sf_fail(s, "control character 0x%02x at offset %ld, expected %s", c, SF_OFF(s), expected);
	return sf_fail(s, "unexpected '%c' at offset %ld, expected %s", c, SF_OFF(s), expected);
}

static cw_err sf_begin(struct sf *s, const char *field, const char *value, cw_errmsg *e)
{
	if (!value)
		value = "";
	size_t len = strnlen(value, HTTPSIG_MAX_FIELD + 1);
	s->field = field;
	s->e = e;
	s->start = s->p = value;
	s->end = value + len;
	if (len > HTTPSIG_MAX_FIELD)
		return sf_fail(s, "longer than %d bytes", HTTPSIG_MAX_FIELD);
	return CW_OK;
}

static bool sf_at(const struct sf *s, char c) { return s->p < s->end && *s->p == c; }

static void sf_skip_sp(struct sf *s)
{
	while (sf_at(s, ' '))
		s->p++;
}

static void sf_skip_ows(struct sf *s)
{
	while (sf_at(s, ' ') || sf_at(s, '\t'))
		s->p++;
}

static cw_err sf_key(struct sf *s, char *out)
{
	if (s->p >= s->end || !(is_lcalpha((unsigned char)*s->p) || *s->p == '*'))
		return sf_unexpected(s, "a key (lower-case letter or '*')");
	size_t n = 0;
	while (s->p < s->end && is_key_char((unsigned char)*s->p)) {
		if (n == HTTPSIG_MAX_TOKEN)
			return sf_fail(s, "key longer than %d bytes at offset %ld", HTTPSIG_MAX_TOKEN, SF_OFF(s));
		out[n++] = *s->p++;
	}
	out[n] = '\0';
	return CW_OK;
}

static cw_err sf_integer(struct sf *s, struct sf_item *it)
{
	bool neg = sf_at(s, '-');
	if (neg)
		s->p++;
	if (s->p >= s->end || !is_digit((unsigned char)*s->p))
		return sf_unexpected(s, "a digit");
	int64_t v = 0;
	int digits = 0;
	while (s->p < s->end && is_digit((unsigned char)*s->p)) {
		if (++digits > 15)
			return sf_fail(s, "integer longer than 15 digits at offset %ld", SF_OFF(s));
		v = v * 10 + (*s->p++ - '0');
	}
	it->type = SF_INTEGER;
	it->integer = neg ? -v : v;
	if (sf_at(s, '.')) {
		/* A decimal (RFC 8941 §3.3.2), parsed for its syntax: no
		 * value of ours is one, but another signer's parameter may be
		 * (its member then cannot be verified here). */
		if (digits > 12)
			return sf_fail(s, "decimal with more than 12 integer digits at offset %ld", SF_OFF(s));
		s->p++;
		int frac = 0;
		while (s->p < s->end && is_digit((unsigned char)*s->p)) {
			if (++frac > 3)
				return sf_fail(s, "decimal with more than 3 fraction digits at offset %ld", SF_OFF(s));
			s->p++;
		}
		if (!frac)
			return sf_unexpected(s, "a digit after the decimal point");
		it->type = SF_DECIMAL;
	}
	return CW_OK;
}

static cw_err sf_string(struct sf *s, struct sf_item *it)
{
	s->p++; /* the opening quote */
	size_t n = 0;
	for (;;) {
		if (s->p >= s->end)
			return sf_fail(s, "unterminated string");
		unsigned char c = (unsigned char)*s->p;
		if (c == '"') {
			s->p++;
			break;
		}
		if (c == '\\') {
			s->p++;
			if (s->p >= s->end)
				return sf_fail(s, "unterminated string");
			c = (unsigned char)*s->p;
			if (c != '"' && c != '\\')
				return sf_fail(s, "bad escape in string at offset %ld (only \\\" and \\\\)", SF_OFF(s));
		} else if (c >= 0x80) {
			return sf_fail(s, "non-ASCII byte 0x%02x in string at offset %ld", c, SF_OFF(s));
		} else if (!is_sf_string_char(c)) {
			return sf_fail(s, "control character 0x%02x in string at offset %ld", c, SF_OFF(s));
		}
		if (n == HTTPSIG_MAX_TOKEN)
			return sf_fail(s, "string longer than %d bytes at offset %ld", HTTPSIG_MAX_TOKEN, SF_OFF(s));
		it->str[n++] = (char)c;
		s->p++;
	}
	it->str[n] = '\0';
	it->len = n;
	it->type = SF_STRING;
	return CW_OK;
}

static cw_err sf_token(struct sf *s, struct sf_item *it)
{
	size_t n = 0;
	while (s->p < s->end) {
		unsigned char c = (unsigned char)*s->p;
		if (!is_tchar(c) && c != ':' && c != '/')
			break;
		if (n == HTTPSIG_MAX_TOKEN)
			return sf_fail(s, "token longer than %d bytes at offset %ld", HTTPSIG_MAX_TOKEN, SF_OFF(s));
		it->str[n++] = (char)c;
		s->p++;
	}
	it->str[n] = '\0';
	it->len = n;
	it->type = SF_TOKEN;
	return CW_OK;
}

static cw_err sf_bytes(struct sf *s, struct sf_item *it)
{
	s->p++; /* the opening colon */
	const char *b = s->p;
	while (s->p < s->end && *s->p != ':') {
		unsigned char c = (unsigned char)*s->p;
		if (!is_b64_char(c) && c != '=') {
			if (c >= 0x80 || c < 0x20 || c == 0x7f)
				return sf_fail(s, "bad base64: byte 0x%02x in byte sequence at offset %ld", c, SF_OFF(s));
			return sf_fail(s, "bad base64: '%c' in byte sequence at offset %ld", c, SF_OFF(s));
		}
		s->p++;
	}
	if (s->p >= s->end)
		return sf_fail(s, "unterminated byte sequence");
	it->type = SF_BYTES;
	it->bytes = b;
	it->nbytes = (size_t)(s->p - b);
	s->p++;
	return CW_OK;
}

static cw_err sf_bare_item(struct sf *s, struct sf_item *it)
{
	if (s->p >= s->end)
		return sf_unexpected(s, "a value");
	unsigned char c = (unsigned char)*s->p;
	if (c == '-' || is_digit(c))
		return sf_integer(s, it);
	if (c == '"')
		return sf_string(s, it);
	if (is_alpha(c) || c == '*')
		return sf_token(s, it);
	if (c == ':')
		return sf_bytes(s, it);
	if (c == '?') {
		s->p++;
		if (!sf_at(s, '0') && !sf_at(s, '1'))
			return sf_unexpected(s, "?0 or ?1");
		it->type = SF_BOOLEAN;
		it->boolean = *s->p++ == '1';
		return CW_OK;
	}
	return sf_unexpected(s, "a value");
}

/* Parameters (";key=value" …) into ps[HTTPSIG_MAX_PARAMS], or parsed and
 * dropped when ps is NULL.  A key given twice is refused. */
static cw_err sf_params(struct sf *s, struct sf_param *ps, size_t *np)
{
	struct sf_param scratch;
	size_t n = 0;
	while (sf_at(s, ';')) {
		s->p++;
		sf_skip_sp(s);
		struct sf_param *q = &scratch;
		if (ps) {
			if (n == HTTPSIG_MAX_PARAMS)
				return sf_fail(s, "more than %d parameters", HTTPSIG_MAX_PARAMS);
			q = &ps[n];
		}
		cw_err rc = sf_key(s, q->key);
		if (rc)
			return rc;
		for (size_t i = 0; ps && i < n; i++)
			if (strcmp(ps[i].key, q->key) == 0)
				return sf_fail(s, "parameter '%s' given twice", q->key);
		if (sf_at(s, '=')) {
			s->p++;
			rc = sf_bare_item(s, &q->v);
			if (rc)
				return rc;
		} else {
			q->v.type = SF_BOOLEAN;
			q->v.boolean = true;
		}
		if (ps)
			n++;
	}
	if (np)
		*np = n;
	return CW_OK;
}

/* Called for each dictionary member, the cursor just past its '='. */
typedef cw_err (*sf_member_fn)(struct sf *s, const char *key, void *ctx);

/* A dictionary whose members all have values (none of our fields has a
 * bare-key member).  A key given twice is refused. */
static cw_err sf_dictionary(struct sf *s, sf_member_fn fn, void *ctx)
{
	char keys[HTTPSIG_MAX_MEMBERS][HTTPSIG_MAX_TOKEN + 1];
	size_t n = 0;
	sf_skip_ows(s);
	while (s->end > s->p && (s->end[-1] == ' ' || s->end[-1] == '\t'))
		s->end--;
	if (s->p == s->end)
		return sf_fail(s, "empty");
	for (;;) {
		if (n == HTTPSIG_MAX_MEMBERS)
			return sf_fail(s, "more than %d members", HTTPSIG_MAX_MEMBERS);
		cw_err rc = sf_key(s, keys[n]);
		if (rc)
			return rc;
		for (size_t i = 0; i < n; i++)
			if (strcmp(keys[i], keys[n]) == 0)
				return sf_fail(s, "duplicate member '%s'", keys[n]);
		if (!sf_at(s, '='))
			return sf_fail(s, "member '%s' has no value", keys[n]);
		s->p++;
		rc = fn(s, keys[n], ctx);
		if (rc)
			return rc;
		n++;
		sf_skip_ows(s);
		if (s->p == s->end)
			return CW_OK;
		if (!sf_at(s, ','))
			return sf_unexpected(s, "',' between members");
		s->p++;
		sf_skip_ows(s);
		if (s->p == s->end)
			return sf_fail(s, "trailing comma");
	}
}

/* Serialises a string already known to be printable ASCII: its runs
 * without a quote or backslash copied whole.  Until the sixtieth session
 * one sb_add a byte: the nonce, keyid and tag of every signature verified,
 * 0.5-1 % of the daemon's samples in tests/bench/single (0.4 after). */
static void ser_string(struct sbuf *b, const char *str)
{
	sb_add(b, "\"", 1);
	for (const char *c = str; *c;) {
		size_t run = strcspn(c, "\"\\");
		sb_add(b, c, run);
		c += run;
		if (*c) {
			sb_add(b, "\\", 1);
			sb_add(b, c++, 1);
		}
	}
	sb_add(b, "\"", 1);
}

/* The inner list of covered components with its parameters, canonically
 * serialised (RFC 8941 §4.1.1.1): the value of "@signature-params" and of
 * the Signature-Input member. */
static void ser_signature_params(struct sbuf *b, const char *const *names, size_t n,
				 const struct sf_param *ps, size_t np)
{
	sb_add(b, "(", 1);
	for (size_t i = 0; i < n; i++) {
		if (i)
			sb_add(b, " ", 1);
		ser_string(b, names[i]);
	}
	sb_add(b, ")", 1);
	for (size_t i = 0; i < np; i++) {
		sb_add(b, ";", 1);
		sb_str(b, ps[i].key);
		char num[32];
		switch (ps[i].v.type) {
		case SF_INTEGER:
			snprintf(num, sizeof(num), "=%lld", (long long)ps[i].v.integer);
			sb_str(b, num);
			break;
		case SF_STRING:
			sb_add(b, "=", 1);
			ser_string(b, ps[i].v.str);
			break;
		case SF_TOKEN:
			sb_add(b, "=", 1);
			sb_str(b, ps[i].v.str);
			break;
		case SF_BOOLEAN:
			if (!ps[i].v.boolean)
				sb_str(b, "=?0");
			break;
		case SF_DECIMAL: /* a member with one is never verified (si->unsupported) */
		case SF_BYTES:
			break;
		}
	}
}

/* ---------------------------------------------------- the message and base */

static const char *const derived_components[] = {
	"@method", "@target-uri", "@authority", "@scheme", "@path", "@query", "@request-target",
};

/* A component name as RFC 9421 allows it here: a known derived component or
 * a lower-case field name. */
static cw_err check_component_name(const char *name, const char *field, cw_errmsg *e)
{
	if (!name[0])
		return fail_in(e, field, "empty component name");
	if (name[0] == '@') {
		if (strcmp(name, "@signature-params") == 0)
			return fail_in(e, field, "'@signature-params' cannot be a covered component");
		for (size_t i = 0; i < CW_ARRAY_LEN(derived_components); i++)
			if (strcmp(name, derived_components[i]) == 0)
				return CW_OK;
		return fail_in(e, field, "unsupported derived component '%s'", name);
	}
	for (const char *c = name; *c; c++)
		if (!is_tchar((unsigned char)*c) || (*c >= 'A' && *c <= 'Z'))
			return fail_in(e, field, "component name '%s' is not a lower-case field name", name);
	return CW_OK;
}

static cw_err check_component_list(const char *const *names, size_t n, const char *field, cw_errmsg *e)
{
	for (size_t i = 0; i < n; i++) {
		cw_err rc = check_component_name(names[i], field, e);
		if (rc)
			return rc;
		for (size_t j = 0; j < i; j++)
			if (strcmp(names[i], names[j]) == 0)
				return fail_in(e, field, "component '%s' is covered twice", names[i]);
	}
	return CW_OK;
}

struct uri {
	const char *s;
	size_t len;
	size_t scheme_len;    /* s[0 .. scheme_len) */
	const char *auth;
	size_t auth_len;
	const char *path;     /* "" when absent */
	size_t path_len;
	const char *query;    /* after the '?' */
	size_t query_len;
	bool has_query;
};

static cw_err uri_parse(const char *s, struct uri *u, cw_errmsg *e)
{
	if (!s || !*s)
		return cw_fail(e, CW_EINVAL, "target URI is empty");
	size_t len = strnlen(s, HTTPSIG_MAX_FIELD + 1);
	if (len > HTTPSIG_MAX_FIELD)
		return cw_fail(e, CW_EINVAL, "target URI longer than %d bytes", HTTPSIG_MAX_FIELD);
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c <= 0x20 || c >= 0x7f)
			return cw_fail(e, CW_EINVAL, "target URI has an invalid byte 0x%02x", c);
		if (c == '#')
			return cw_fail(e, CW_EINVAL, "target URI has a fragment");
	}
	memset(u, 0, sizeof(*u));
	u->s = s;
	u->len = len;
	size_t i = 0;
	if (!is_alpha((unsigned char)s[0]))
		return cw_fail(e, CW_EINVAL, "target URI is not absolute (no scheme)");
	while (i < len && (is_alpha((unsigned char)s[i]) || is_digit((unsigned char)s[i]) ||
			   s[i] == '+' || s[i] == '-' || s[i] == '.'))
		i++;
	if (len - i < 3 || memcmp(s + i, "://", 3) != 0)
		return cw_fail(e, CW_EINVAL, "target URI is not absolute (no \"://\")");
	u->scheme_len = i;
	i += 3;
	u->auth = s + i;
	while (i < len && s[i] != '/' && s[i] != '?')
		i++;
	u->auth_len = (size_t)(s + i - u->auth);
	if (u->auth_len == 0)
		return cw_fail(e, CW_EINVAL, "target URI has no authority");
	if (memchr(u->auth, '@', u->auth_len))
		return cw_fail(e, CW_EINVAL, "target URI has userinfo");
	u->path = s + i;
	while (i < len && s[i] != '?')
		i++;
	u->path_len = (size_t)(s + i - u->path);
	if (i < len) {
		u->has_query = true;
		u->query = s + i + 1;
		u->query_len = len - i - 1;
	} else {
		u->query = "";
	}
	return CW_OK;
}

static bool scheme_is(const struct uri *u, const char *name)
{
	return u->scheme_len == strlen(name) && strncasecmp(u->s, name, u->scheme_len) == 0;
}

/* @authority: host lower-cased, the scheme's default port dropped
 * (RFC 9421 §2.2.3, RFC 9110 §4.2.3). */
static void append_authority(struct sbuf *b, const struct uri *u)
{
	const char *a = u->auth;
	size_t n = u->auth_len, host_len = n;
	const char *port = NULL;
	size_t port_len = 0;
	for (size_t i = n; i-- > 0;) {
		if (a[i] == ']')
			break; /* an IPv6 literal without a port */
		if (a[i] == ':') {
			host_len = i;
			port = a + i + 1;
			port_len = n - i - 1;
			break;
		}
	}
	sb_lower(b, a, host_len);
	if (!port || port_len == 0)
		return;
	if ((scheme_is(u, "http") && port_len == 2 && memcmp(port, "80", 2) == 0) ||
	    (scheme_is(u, "https") && port_len == 3 && memcmp(port, "443", 3) == 0))
		return;
	sb_add(b, ":", 1);
	sb_add(b, port, port_len);
}

/* A header value as covered (RFC 9421 §2.1): trimmed, one line, ASCII. */
static cw_err append_header(struct sbuf *b, const struct httpsig_msg *m, const char *name, cw_errmsg *e)
{
	const char *v = m->header ? m->header(m->ctx, name) : NULL;
	if (!v)
		return cw_fail(e, CW_EINVAL, "covered component '%s' is absent from the request", name);
	size_t len = strnlen(v, HTTPSIG_MAX_FIELD + 1);
	if (len > HTTPSIG_MAX_FIELD)
		return cw_fail(e, CW_EINVAL, "header '%s' is longer than %d bytes", name, HTTPSIG_MAX_FIELD);
	while (len && (*v == ' ' || *v == '\t')) {
		v++;
		len--;
	}
	while (len && (v[len - 1] == ' ' || v[len - 1] == '\t'))
		len--;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)v[i];
		if (c >= 0x80)
			return cw_fail(e, CW_EINVAL, "header '%s' has a non-ASCII byte 0x%02x", name, c);
		if ((c < 0x20 && c != '\t') || c == 0x7f)
			return cw_fail(e, CW_EINVAL, "header '%s' has a control character 0x%02x", name, c);
	}
	sb_add(b, v, len);
	return CW_OK;
}

static cw_err append_component(struct sbuf *b, const struct httpsig_msg *m, const struct uri *u,
			       const char *name, cw_errmsg *e)
{
	sb_add(b, "\"", 1);
	sb_str(b, name);
	sb_add(b, "\": ", 3);
	if (strcmp(name, "@method") == 0) {
		sb_str(b, m->method);
	} else if (strcmp(name, "@target-uri") == 0) {
		sb_add(b, u->s, u->len);
	} else if (strcmp(name, "@authority") == 0) {
		append_authority(b, u);
	} else if (strcmp(name, "@scheme") == 0) {
		sb_lower(b, u->s, u->scheme_len);
	} else if (strcmp(name, "@path") == 0) {
		sb_add(b, u->path_len ? u->path : "/", u->path_len ? u->path_len : 1);
	} else if (strcmp(name, "@query") == 0) {
		sb_add(b, "?", 1);
		sb_add(b, u->query, u->query_len);
	} else if (strcmp(name, "@request-target") == 0) {
		sb_add(b, u->path_len ? u->path : "/", u->path_len ? u->path_len : 1);
		if (u->has_query) {
			sb_add(b, "?", 1);
			sb_add(b, u->query, u->query_len);
		}
	} else if (name[0] == '@') {
		return cw_fail(e, CW_EINVAL, "unsupported derived component '%s'", name);
	} else {
		cw_err rc = append_header(b, m, name, e);
		if (rc)
			return rc;
	}
	sb_add(b, "\n", 1);
	return CW_OK;
}

/* The signature base (RFC 9421 §2.5) into base; names already checked. */
static cw_err build_base(const struct httpsig_msg *m, const char *const *names, size_t n,
			 const struct sbuf *params, struct sbuf *base, cw_errmsg *e)
{
	if (!m->method || !*m->method)
		return cw_fail(e, CW_EINVAL, "the request has no method");
	for (const char *c = m->method; *c; c++)
		if (!is_tchar((unsigned char)*c) || c - m->method >= HTTPSIG_MAX_TOKEN)
			return cw_fail(e, CW_EINVAL, "the request method is not a token");
	struct uri u;
	cw_err rc = uri_parse(m->target_uri, &u, e);
	if (rc)
		return rc;
	sb_init(base, HTTPSIG_MAX_BASE);
	for (size_t i = 0; i < n; i++) {
		rc = append_component(base, m, &u, names[i], e);
		if (rc)
			return rc;
	}
	sb_str(base, "\"@signature-params\": ");
	sb_add(base, params->p, params->len);
	return sb_check(base, "signature base", e);
}

/* ---------------------------------------------- the URI a request goes to */

/* A peer verifies our @target-uri against the URI it rebuilds from the
 * request it receives: its own URL in its normal form (RFC 9110 §4.2.3)
 * and the path and query the request carries.  libcurl parses and
 * rebuilds the URL; the same text is then requested, so what is signed
 * is what is sent.  Pushes were signed so since the thirty-second
 * session; a peer's file, and each redirect of it, since the fifty-second
 * (until then as the peer spelled it: "https://Media.Peer.Example:443/a"
 * signed so, "/x/../a" signed with its dot segments, which libcurl
 * resolves before it sends the path, and a URL with a "#fragment" not
 * signed at all, the fetch failing as the store being away). */
cw_err httpsig_request_url(const char *url, const char *append, const char *what, char *out, size_t len,
			   cw_errmsg *e)
{
	CURLU *u = curl_url();
	char *host = NULL, *path = NULL, *user = NULL, *password = NULL, *full = NULL, *scheme = NULL, *zone = NULL;
	char *with = NULL; /* the path with append */
	cw_err rc = CW_OK;
	if (!u)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	CURLUcode uc = curl_url_set(u, CURLUPART_URL, url ? url : "", 0);
	if (uc != CURLUE_OK) {
		rc = cw_fail(e, CW_EINVAL, "%s is not a URL: %s", what, curl_url_strerror(uc));
		goto out;
	}
	if (curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
	    (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0)) {
		rc = cw_fail(e, CW_EINVAL, "%s is not an http or https URL", what);
		goto out;
	}
	if (curl_url_get(u, CURLUPART_USER, &user, 0) != CURLUE_NO_USER ||
	    curl_url_get(u, CURLUPART_PASSWORD, &password, 0) != CURLUE_NO_PASSWORD) {
		rc = cw_fail(e, CW_EINVAL, "%s has a user or password (a signed URI cannot)", what);
		goto out;
	}
	for (char *c = scheme; *c; c++)
		*c = (char)tolower((unsigned char)*c);
	if (curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || !*host) {
		rc = cw_fail(e, CW_EINVAL, "%s has no host", what);
		goto out;
	}
	for (char *c = host; *c; c++)
		*c = (char)tolower((unsigned char)*c);
	/* An IPv6 literal's zone id (a link-local target) is a part of its
	 * own, which setting the host clears: kept as typed, for the
	 * request; it is not signed (httpsig_target_uri). */
	if (curl_url_get(u, CURLUPART_ZONEID, &zone, 0) != CURLUE_OK)
		zone = NULL;
	if (curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	if (append) {
		size_t plen = strlen(path), alen = strlen(append);
		while (plen && path[plen - 1] == '/')
			plen--;
		with = malloc(plen + alen + 1);
		if (!with) {
			rc = cw_fail(e, CW_ENOMEM, "out of memory");
			goto out;
		}
		memcpy(with, path, plen);
		memcpy(with + plen, append, alen + 1);
	}
	/* The fragment is the client's own: libcurl sends none, and a target
	 * URI has none (RFC 9421 §2.2.2). */
	bool ok = curl_url_set(u, CURLUPART_SCHEME, scheme, 0) == CURLUE_OK &&
		  curl_url_set(u, CURLUPART_HOST, host, 0) == CURLUE_OK &&
		  (!zone || curl_url_set(u, CURLUPART_ZONEID, zone, 0) == CURLUE_OK) &&
		  (!with || curl_url_set(u, CURLUPART_PATH, with, 0) == CURLUE_OK) &&
		  curl_url_set(u, CURLUPART_FRAGMENT, NULL, 0) == CURLUE_OK &&
		  curl_url_get(u, CURLUPART_URL, &full, CURLU_NO_DEFAULT_PORT) == CURLUE_OK;
	free(with);
	if (!ok) {
		rc = cw_fail(e, CW_EINVAL, "%s cannot be rebuilt as a URL", what);
		goto out;
	}
	if (strlen(full) >= len)
		rc = cw_fail(e, CW_EINVAL, "%s is too long (%zu bytes%s%s)", what, strlen(full), append ? " with " : "",
			     append ? append : "");
	else
		memcpy(out, full, strlen(full) + 1);
out:
	curl_free(scheme);
	curl_free(host);
	curl_free(zone);
	curl_free(path);
	curl_free(user);
	curl_free(password);
	curl_free(full);
	curl_url_cleanup(u);
	return rc;
}

/* The request goes to the zone's interface (libcurl sets the address's
 * scope), but the Host header libcurl sends is the address without its
 * zone id ("[fe80::1]:8080"): the zone names an interface of this host,
 * which the peer neither knows nor sees, and the @target-uri it rebuilds
 * has none.  Until the fifty-second session the zone id was signed, and
 * every push to a link-local push_url such as http://[fe80::1%25eth0]
 * failed the peer's check of the signature. */
void httpsig_target_uri(const char *request_url, char *out, size_t len)
{
	if (!len)
		return;
	const char *host = strstr(request_url, "://");
	const char *open = host && host[3] == '[' ? host + 3 : NULL;
	const char *close = open ? strchr(open, ']') : NULL;
	const char *zone = close ? strstr(open, "%25") : NULL;
	if (!zone || zone > close) {
		snprintf(out, len, "%s", request_url);
		return;
	}
	snprintf(out, len, "%.*s%s", (int)(zone - request_url), request_url, close);
}

/* ------------------------------------------------------------------ signing */

static cw_err check_param_string(const char *what, const char *v, cw_errmsg *e)
{
	size_t len = strnlen(v, HTTPSIG_MAX_TOKEN + 1);
	if (len > HTTPSIG_MAX_TOKEN)
		return cw_fail(e, CW_EINVAL, "%s longer than %d bytes", what, HTTPSIG_MAX_TOKEN);
	for (size_t i = 0; i < len; i++)
		if (!is_sf_string_char((unsigned char)v[i]))
			return cw_fail(e, CW_EINVAL, "%s has a byte that is not printable ASCII", what);
	return CW_OK;
}

static cw_err add_string_param(struct sf_param *ps, size_t *n, const char *key, const char *v, cw_errmsg *e)
{
	if (!v)
		return CW_OK;
	cw_err rc = check_param_string(key, v, e);
	if (rc)
		return rc;
	struct sf_param *q = &ps[(*n)++];
	copy_token(q->key, key);
	q->v.type = SF_STRING;
	q->v.len = strlen(v);
	memcpy(q->v.str, v, q->v.len + 1);
	return CW_OK;
}

static cw_err add_int_param(struct sf_param *ps, size_t *n, const char *key, int64_t v, cw_errmsg *e)
{
	if (v == 0)
		return CW_OK;
	if (v < 0 || v > 999999999999999LL)
		return cw_fail(e, CW_EINVAL, "%s %lld out of range", key, (long long)v);
	struct sf_param *q = &ps[(*n)++];
	copy_token(q->key, key);
	q->v.type = SF_INTEGER;
	q->v.integer = v;
	return CW_OK;
}

/* What sign and signature_base share: the checked component list, the
 * serialised parameters and the base.  The caller frees both buffers. */
static cw_err prepare(const struct httpsig_msg *m, const char *const *components,
		      const struct httpsig_params *p, size_t *ncomp, struct sbuf *params,
		      struct sbuf *base, cw_errmsg *e)
{
	sb_init(params, HTTPSIG_MAX_FIELD);
	sb_init(base, HTTPSIG_MAX_BASE);
	if (!m || !components || !p)
		return cw_fail(e, CW_EINVAL, "httpsig: missing argument");
	size_t n = 0;
	while (components[n]) {
		if (n == HTTPSIG_MAX_COMPONENTS)
			return cw_fail(e, CW_EINVAL, "more than %d components", HTTPSIG_MAX_COMPONENTS);
		if (strnlen(components[n], HTTPSIG_MAX_TOKEN + 1) > HTTPSIG_MAX_TOKEN)
			return cw_fail(e, CW_EINVAL, "component name longer than %d bytes", HTTPSIG_MAX_TOKEN);
		n++;
	}
	cw_err rc = check_component_list(components, n, "components", e);
	if (rc)
		return rc;
	if (p->alg && strcmp(p->alg, "ed25519") != 0)
		return cw_fail(e, CW_EINVAL, "unsupported algorithm '%.64s'", p->alg);
	struct sf_param ps[6];
	size_t np = 0;
	if ((rc = add_int_param(ps, &np, "created", p->created, e)) ||
	    (rc = add_int_param(ps, &np, "expires", p->expires, e)) ||
	    (rc = add_string_param(ps, &np, "nonce", p->nonce, e)) ||
	    (rc = add_string_param(ps, &np, "alg", p->alg, e)) ||
	    (rc = add_string_param(ps, &np, "keyid", p->keyid, e)) ||
	    (rc = add_string_param(ps, &np, "tag", p->tag, e)))
		return rc;
	ser_signature_params(params, components, n, ps, np);
	if ((rc = sb_check(params, "Signature-Input", e)))
		return rc;
	*ncomp = n;
	return build_base(m, components, n, params, base, e);
}

static const char *label_of(const struct httpsig_params *p, cw_errmsg *e, cw_err *rc)
{
	*rc = CW_OK;
	if (!p || !p->label)
		return "sig1";
	const char *label = p->label;
	size_t len = strnlen(label, HTTPSIG_MAX_TOKEN + 1);
	if (len == 0 || len > HTTPSIG_MAX_TOKEN || !(is_lcalpha((unsigned char)label[0]) || label[0] == '*')) {
		*rc = cw_fail(e, CW_EINVAL, "label is not a structured-field key");
		return NULL;
	}
	for (const char *c = label; *c; c++)
		if (!is_key_char((unsigned char)*c)) {
			*rc = cw_fail(e, CW_EINVAL, "label is not a structured-field key");
			return NULL;
		}
	return label;
}

cw_err httpsig_signature_base(const struct httpsig_msg *m, const char *const *components,
			      const struct httpsig_params *p, char *out, size_t outlen, cw_errmsg *e)
{
	struct sbuf params, base;
	size_t n;
	cw_err rc = prepare(m, components, p, &n, &params, &base, e);
	if (!rc && (!out || base.len + 1 > outlen))
		rc = cw_fail(e, CW_EINVAL, "signature base buffer too small (%zu bytes needed)", base.len + 1);
	if (!rc)
		memcpy(out, base.p, base.len + 1);
	sb_free(&params);
	sb_free(&base);
	return rc;
}

cw_err httpsig_sign(const struct httpsig_msg *m, const char *const *components, EVP_PKEY *key,
		    const struct httpsig_params *p, char *sig_input, size_t sig_input_len,
		    char *signature, size_t signature_len, cw_errmsg *e)
{
	if (!key || EVP_PKEY_get_id(key) != EVP_PKEY_ED25519)
		return cw_fail(e, CW_EINVAL, "the signing key is not an Ed25519 key");
	if (!sig_input || !signature)
		return cw_fail(e, CW_EINVAL, "httpsig: missing output buffer");
	cw_err rc;
	const char *label = label_of(p, e, &rc);
	if (rc)
		return rc;
	struct sbuf params, base;
	size_t n;
	rc = prepare(m, components, p, &n, &params, &base, e);
	if (rc)
		goto out;

	unsigned char sig[HTTPSIG_ED25519_SIG_LEN];
	size_t siglen = sizeof(sig);
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	if (!ctx) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	if (EVP_DigestSignInit(ctx, NULL, NULL, NULL, key) != 1 ||
	    EVP_DigestSign(ctx, sig, &siglen, (const unsigned char *)base.p, base.len) != 1 ||
	    siglen != sizeof(sig)) {
		EVP_MD_CTX_free(ctx);
		rc = ossl_fail(e, CW_EIO, "Ed25519 signing failed");
		goto out;
	}
	EVP_MD_CTX_free(ctx);

	int w = snprintf(sig_input, sig_input_len, "%s=%s", label, params.p);
	if (w < 0 || (size_t)w >= sig_input_len) {
		rc = cw_fail(e, CW_EINVAL, "Signature-Input buffer too small (%d bytes needed)", w + 1);
		goto out;
	}
	char b64[4 * ((HTTPSIG_ED25519_SIG_LEN + 2) / 3) + 1];
	EVP_EncodeBlock((unsigned char *)b64, sig, (int)sizeof(sig));
	w = snprintf(signature, signature_len, "%s=:%s:", label, b64);
	if (w < 0 || (size_t)w >= signature_len)
		rc = cw_fail(e, CW_EINVAL, "Signature buffer too small (%d bytes needed)", w + 1);
out:
	sb_free(&params);
	sb_free(&base);
	return rc;
}

/* ---------------------------------------------------------------- verifying */

struct sig_input {
	char label[HTTPSIG_MAX_TOKEN + 1];
	char unsupported[HTTPSIG_MAX_TOKEN + 96]; /* why it cannot be verified here ("": it can) */
	size_t ncomp;
	char comp[HTTPSIG_MAX_COMPONENTS][HTTPSIG_MAX_TOKEN + 1];
	size_t nparams;
	struct sf_param params[HTTPSIG_MAX_PARAMS];
};

/* Notes the first reason si cannot be verified here. */
__attribute__((format(printf, 2, 3)))
static void si_unsupported(struct sig_input *si, const char *fmt, ...)
{
	if (si->unsupported[0])
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(si->unsupported, sizeof(si->unsupported), fmt, ap);
	va_end(ap);
}

/* One Signature-Input member: an inner list of strings with parameters.
 * What RFC 9421 allows but this verifier does not take (a component's
 * parameters, "content-type";sf or "@query-param";name="x", a byte
 * sequence or a decimal as a parameter's value, a component that is not
 * a string)
 * makes the member one that cannot be verified here (si->unsupported),
 * refused when it is tried: another signer's (a proxy's, RFC 9421 §3.2
 * and §4.3) stands beside ours.  Until the fifty-second session any such
 * member refused the whole request, a peer's valid signature with it. */
static cw_err parse_sig_input_member(struct sf *s, struct sig_input *si)
{
	if (!sf_at(s, '('))
		return sf_unexpected(s, "'(' opening the list of components");
	s->p++;
	si->ncomp = 0;
	si->unsupported[0] = '\0';
	struct sf_item it;
	for (;;) {
		sf_skip_sp(s);
		if (s->p >= s->end)
			return sf_fail(s, "unterminated list of components of '%s'", si->label);
		if (*s->p == ')') {
			s->p++;
			break;
		}
		if (si->ncomp == HTTPSIG_MAX_COMPONENTS)
			return sf_fail(s, "more than %d components in '%s'", HTTPSIG_MAX_COMPONENTS, si->label);
		cw_err rc = sf_bare_item(s, &it);
		if (rc)
			return rc;
		if (it.type != SF_STRING)
			si_unsupported(si, "Signature-Input: component %zu of '%s' is not a string", si->ncomp + 1,
				       si->label);
		if (sf_at(s, ';')) {
			si_unsupported(si, "Signature-Input: component parameters are not supported (on '%s')",
				       it.type == SF_STRING || it.type == SF_TOKEN ? it.str : "?");
			if ((rc = sf_params(s, NULL, NULL)))
				return rc;
		}
		if (it.type == SF_STRING)
			memcpy(si->comp[si->ncomp], it.str, it.len + 1);
		else
			si->comp[si->ncomp][0] = '\0';
		si->ncomp++;
		if (s->p < s->end && *s->p != ' ' && *s->p != ')')
			return sf_unexpected(s, "' ' or ')' after a component");
	}
	cw_err rc = sf_params(s, si->params, &si->nparams);
	if (rc)
		return rc;
	for (size_t i = 0; i < si->nparams; i++)
		if (si->params[i].v.type == SF_BYTES)
			si_unsupported(si, "Signature-Input: parameter '%s' of '%s' is a byte sequence (not supported)",
				       si->params[i].key, si->label);
		else if (si->params[i].v.type == SF_DECIMAL)
			si_unsupported(si, "Signature-Input: decimal numbers are not supported (parameter '%s' of '%s')",
				       si->params[i].key, si->label);
	return CW_OK;
}

/* The Signature-Input members to try, in order: the one labelled
 * o->label; else each whose tag is o->tag, up to HTTPSIG_MAX_TRIES (RFC
 * 9421 §3.2: the verifier picks the signatures its policy needs, among
 * others a proxy or another signer may have added; until the
 * thirty-first session the first member only, until the thirty-second
 * the first of the tag only, and a peer sending its new key's signature
 * after its old one's was refused); else the first member (refused for
 * its tag, when one is asked). */
struct si_pick {
	const char *want;          /* NULL: by tag (or the first) */
	const char *tag;           /* NULL: any */
	struct sig_input *cand[HTTPSIG_MAX_TRIES];
	size_t ncand;
	struct sig_input *first;   /* the first member not a candidate, or NULL */
	struct sig_input *scratch; /* for the next member; NULL until needed */
};

/* Each member is parsed into pk->scratch, allocated when needed and not
 * zeroed (17.7 KiB: six of them zeroed at every request were 106 KiB, a
 * microsecond and a half, until the forty-fourth session).  Nothing reads
 * past what the parse wrote: the label, ncomp names, nparams parameters,
 * each value's fields by its type.  A member kept moves its buffer to
 * cand[] or first (no copy); the next member gets a new one, so at most
 * HTTPSIG_MAX_TRIES + 2 exist, and one for a request signed once. */
static void si_pick_free(struct si_pick *pk)
{
	for (size_t i = 0; i < pk->ncand; i++)
		free(pk->cand[i]);
	free(pk->first);
	free(pk->scratch);
}

/* The string value of si's parameter key, or NULL (absent, not a string). */
static const char *si_string_param(const struct sig_input *si, const char *key)
{
	for (size_t i = 0; i < si->nparams; i++)
		if (strcmp(si->params[i].key, key) == 0)
			return si->params[i].v.type == SF_STRING ? si->params[i].v.str : NULL;
	return NULL;
}

static bool si_tag_is(const struct sig_input *si, const char *tag)
{
	const char *t = si_string_param(si, "tag");
	return t && strcmp(t, tag) == 0;
}

/* out->nonces: the verified signature's nonce, then those of the other
 * candidates of its keyid, each once (httpsig.h).  An other's created
 * counts up to now + skew, the latest a verified one may have: a replay
 * cache holds an entry from its created on, and one far ahead would be
 * held for as long (and hold up the expiry of those after it). */
static void spent_nonces(const struct si_pick *pk, const struct httpsig_verify_opts *o,
			 struct httpsig_result *out)
{
	out->nnonces = 0;
	if (out->nonce[0]) {
		out->nonces_created[0] = out->created;
		copy_token(out->nonces[out->nnonces++], out->nonce);
	}
	for (size_t i = 0; i < pk->ncand; i++) {
		const struct sig_input *si = pk->cand[i];
		const char *keyid = si_string_param(si, "keyid");
		const char *nonce = si_string_param(si, "nonce");
		if (!nonce || !*nonce || strcmp(keyid ? keyid : "", out->keyid) != 0)
			continue;
		int64_t created = out->created;
		for (size_t j = 0; j < si->nparams; j++)
			if (strcmp(si->params[j].key, "created") == 0 && si->params[j].v.type == SF_INTEGER &&
			    si->params[j].v.integer > created)
				created = si->params[j].v.integer;
		if (created > o->now + o->max_skew_s) /* out->created, verified, is not */
			created = o->now + o->max_skew_s;
		size_t j = 0;
		while (j < out->nnonces && strcmp(out->nonces[j], nonce) != 0)
			j++;
		if (j == out->nnonces) {
			if (j == HTTPSIG_MAX_TRIES)
				continue;
			copy_token(out->nonces[out->nnonces++], nonce);
			out->nonces_created[j] = created;
		} else if (created > out->nonces_created[j]) {
			out->nonces_created[j] = created;
		}
	}
}

/* Every member is parsed (and so checked); the candidates are kept. */
static cw_err si_member(struct sf *s, const char *key, void *ctx)
{
	struct si_pick *pk = ctx;
	if (!pk->scratch && !(pk->scratch = malloc(sizeof(*pk->scratch))))
		return cw_fail(s->e, CW_ENOMEM, "out of memory");
	struct sig_input *si = pk->scratch;
	copy_token(si->label, key);
	cw_err rc = parse_sig_input_member(s, si);
	if (rc)
		return rc;
	bool wanted = pk->want ? strcmp(key, pk->want) == 0 : !pk->tag || si_tag_is(si, pk->tag);
	size_t max = pk->want || !pk->tag ? 1 : HTTPSIG_MAX_TRIES;
	if (wanted && pk->ncand < max) {
		pk->cand[pk->ncand++] = si;
		pk->scratch = NULL;
	} else if (!pk->want && !pk->first) {
		pk->first = si;
		pk->scratch = NULL;
	}
	return CW_OK;
}

/* The members of Signature: labels and their base64 text (in the field). */
struct sig_all {
	size_t n;
	char label[HTTPSIG_MAX_MEMBERS][HTTPSIG_MAX_TOKEN + 1];
	const char *b64[HTTPSIG_MAX_MEMBERS];
	size_t b64_len[HTTPSIG_MAX_MEMBERS];
};

static cw_err sig_member(struct sf *s, const char *key, void *ctx)
{
	struct sig_all *all = ctx;
	struct sf_item it;
	cw_err rc = sf_bare_item(s, &it);
	if (rc)
		return rc;
	if (it.type != SF_BYTES)
		return sf_fail(s, "member '%s' is not a byte sequence", key);
	if ((rc = sf_params(s, NULL, NULL)))
		return rc;
	/* sf_dictionary allows HTTPSIG_MAX_MEMBERS, distinct */
	copy_token(all->label[all->n], key);
	all->b64[all->n] = it.bytes;
	all->b64_len[all->n] = it.nbytes;
	all->n++;
	return CW_OK;
}

static bool covers(const struct sig_input *si, const char *name)
{
	for (size_t i = 0; i < si->ncomp; i++)
		if (strcmp(si->comp[i], name) == 0)
			return true;
	return false;
}

/* The known signature parameters into out, typed as RFC 9421 §2.3 says. */
static cw_err read_params(const struct sig_input *si, struct httpsig_result *out, bool *has_keyid, cw_errmsg *e)
{
	static const struct { const char *key; size_t off; } strings[] = {
		{ "keyid", offsetof(struct httpsig_result, keyid) },
		{ "nonce", offsetof(struct httpsig_result, nonce) },
		{ "tag", offsetof(struct httpsig_result, tag) },
		{ "alg", offsetof(struct httpsig_result, alg) },
	};
	*has_keyid = false;
	for (size_t i = 0; i < si->nparams; i++) {
		const struct sf_param *q = &si->params[i];
		if (strcmp(q->key, "created") == 0 || strcmp(q->key, "expires") == 0) {
			if (q->v.type != SF_INTEGER || q->v.integer < 0)
				return fail_in(e, "Signature-Input", "parameter '%s' is not a non-negative integer", q->key);
			if (q->key[0] == 'c') {
				out->has_created = true;
				out->created = q->v.integer;
			} else {
				out->has_expires = true;
				out->expires = q->v.integer;
			}
			continue;
		}
		for (size_t j = 0; j < CW_ARRAY_LEN(strings); j++) {
			if (strcmp(q->key, strings[j].key) != 0)
				continue;
			if (q->v.type != SF_STRING)
				return fail_in(e, "Signature-Input", "parameter '%s' is not a string", q->key);
			memcpy((char *)out + strings[j].off, q->v.str, q->v.len + 1);
			if (j == 0)
				*has_keyid = true;
		}
	}
	return CW_OK;
}

static cw_err check_policy(const struct httpsig_msg *m, const struct sig_input *si,
			   const struct httpsig_verify_opts *o, const struct httpsig_result *r, cw_errmsg *e)
{
	if (r->alg[0] && strcmp(r->alg, "ed25519") != 0)
		return cw_fail(e, CW_EINVAL, "unsupported algorithm '%s'", r->alg);
	if (o->require_created && !r->has_created)
		return cw_fail(e, CW_EINVAL, "missing created parameter");
	if (o->require_keyid && !r->keyid[0])
		return cw_fail(e, CW_EINVAL, "missing keyid parameter");
	if (o->require_nonce && !r->nonce[0])
		return cw_fail(e, CW_EINVAL, "missing nonce parameter");
	if ((o->require_tag || o->tag) && !r->tag[0])
		return cw_fail(e, CW_EINVAL, "missing tag parameter");
	if (o->tag && strcmp(r->tag, o->tag) != 0)
		return cw_fail(e, CW_EINVAL, "wrong tag '%s' (expected '%s')", r->tag, o->tag);
	if (r->has_created) {
		if (r->created > o->now + o->max_skew_s)
			return cw_fail(e, CW_EINVAL, "created %lld is %lld s in the future (max skew %lld s)",
				       (long long)r->created, (long long)(r->created - o->now),
				       (long long)o->max_skew_s);
		if (r->created < o->now - o->max_skew_s)
			return cw_fail(e, CW_EINVAL, "signature expired: created %lld is %lld s old (max skew %lld s)",
				       (long long)r->created, (long long)(o->now - r->created),
				       (long long)o->max_skew_s);
	}
	if (r->has_expires && o->now > r->expires)
		return cw_fail(e, CW_EINVAL, "signature expired at %lld", (long long)r->expires);
	for (const char *const *q = o->required; q && *q; q++)
		if (!covers(si, *q))
			return cw_fail(e, CW_EINVAL, "required component '%s' is not covered", *q);
	for (const char *const *q = o->required_if_present; q && *q; q++)
		if (!covers(si, *q) && ((*q)[0] == '@' || (m->header && m->header(m->ctx, *q))))
			return cw_fail(e, CW_EINVAL, "component '%s' is present but not covered", *q);
	if (o->check_content_digest && !covers(si, "content-digest"))
		return cw_fail(e, CW_EINVAL, "content-digest is not covered by the signature");
	return CW_OK;
}

/* A key's verification, set up once.  EVP_DigestVerifyInit() fetches the
 * Ed25519 implementation from the provider for every signature (locks and
 * name lookups: 2-3 us, 2-3 % of a single submit's daemon CPU); a key
 * prepared by httpsig_key_prepare carries, in its extra data, a context
 * set up for its public bytes, which each verification copies instead.
 * That context holds a key of its own made from the same bytes: holding
 * the prepared key itself, it would keep it alive for ever. */
static int prepared_index = -1;
static pthread_once_t prepared_once = PTHREAD_ONCE_INIT;

static void prepared_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
	(void)parent;
	(void)ad;
	(void)idx;
	(void)argl;
	(void)argp;
	EVP_MD_CTX_free(ptr);
}

static void prepared_index_new(void)
{
	prepared_index = EVP_PKEY_get_ex_new_index(0, NULL, NULL, NULL, prepared_free);
}

static EVP_MD_CTX *prepared_of(EVP_PKEY *key)
{
	pthread_once(&prepared_once, prepared_index_new);
	return prepared_index >= 0 ? EVP_PKEY_get_ex_data(key, prepared_index) : NULL;
}

void httpsig_key_prepare(EVP_PKEY *key)
{
	if (!key || EVP_PKEY_get_id(key) != EVP_PKEY_ED25519 || prepared_of(key) || prepared_index < 0)
		return;
	unsigned char raw[32];
	size_t n = sizeof(raw);
	EVP_PKEY *own = EVP_PKEY_get_raw_public_key(key, raw, &n) == 1 && n == 32
				? EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, raw, 32)
				: NULL;
	EVP_MD_CTX *ctx = own ? EVP_MD_CTX_new() : NULL;
	if (!ctx || EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, own) != 1 ||
	    EVP_PKEY_set_ex_data(key, prepared_index, ctx) != 1) {
		EVP_MD_CTX_free(ctx); /* not prepared: verified as before */
		ERR_clear_error();
	}
	EVP_PKEY_free(own); /* the context holds a reference of its own */
}

/* One signature: its value in Signature, its parameters against our
 * policy, the key, the base and Ed25519.  out is filled as far as it got. */
static cw_err verify_one(const struct httpsig_msg *m, const struct sig_input *chosen, const struct sig_all *sigs,
			 const struct httpsig_verify_opts *o, struct httpsig_result *out, cw_errmsg *e)
{
	memset(out, 0, sizeof(*out));
	copy_token(out->label, chosen->label);
	out->ncomponents = chosen->ncomp;
	if (chosen->unsupported[0])
		return cw_fail(e, CW_EINVAL, "%s", chosen->unsupported);
	size_t k = 0;
	while (k < sigs->n && strcmp(sigs->label[k], chosen->label) != 0)
		k++;
	if (k == sigs->n)
		return fail_in(e, "Signature", "no signature labelled '%s'", chosen->label);
	unsigned char sig[B64_MAX_DECODED];
	size_t siglen;
	if (sigs->b64_len[k] > 4 * ((HTTPSIG_ED25519_SIG_LEN + 2) / 3))
		return fail_in(e, "Signature", "'%s' is too long for an Ed25519 signature", chosen->label);
	if (!b64_decode(sigs->b64[k], sigs->b64_len[k], sig, sizeof(sig), &siglen))
		return fail_in(e, "Signature", "bad base64 in '%s'", chosen->label);
	if (siglen != HTTPSIG_ED25519_SIG_LEN)
		return fail_in(e, "Signature", "'%s' is %zu bytes, not an Ed25519 signature (%d bytes)",
			       chosen->label, siglen, HTTPSIG_ED25519_SIG_LEN);

	/* Then what it says against our policy. */
	const char *names[HTTPSIG_MAX_COMPONENTS];
	for (size_t i = 0; i < chosen->ncomp; i++)
		names[i] = chosen->comp[i];
	bool has_keyid;
	cw_err rc;
	if ((rc = check_component_list(names, chosen->ncomp, "Signature-Input", e)) ||
	    (rc = read_params(chosen, out, &has_keyid, e)) || (rc = check_policy(m, chosen, o, out, e)))
		return rc;

	/* Then the cryptography. */
	if (!o->key_for)
		return cw_fail(e, CW_EINVAL, "httpsig: no key lookup configured");
	EVP_PKEY *key = o->key_for(o->key_ctx, has_keyid ? out->keyid : NULL);
	if (!key)
		return cw_fail(e, CW_EINVAL, "unknown key '%s'", out->keyid);
	struct sbuf params, base;
	sb_init(&params, HTTPSIG_MAX_FIELD);
	sb_init(&base, HTTPSIG_MAX_BASE);
	EVP_MD_CTX *ctx = NULL;
	if (EVP_PKEY_get_id(key) != EVP_PKEY_ED25519) {
		rc = cw_fail(e, CW_EINVAL, "key '%s' is not an Ed25519 key", out->keyid);
		goto out;
	}
	ser_signature_params(&params, names, chosen->ncomp, chosen->params, chosen->nparams);
	if ((rc = sb_check(&params, "Signature-Input", e)) ||
	    (rc = build_base(m, names, chosen->ncomp, &params, &base, e)))
		goto out;
	if (!(ctx = EVP_MD_CTX_new())) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	EVP_MD_CTX *prepared = prepared_of(key);
	if (prepared ? EVP_MD_CTX_copy_ex(ctx, prepared) != 1 : EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, key) != 1) {
		rc = ossl_fail(e, CW_EIO, "Ed25519 verification setup failed");
		goto out;
	}
	if (EVP_DigestVerify(ctx, sig, siglen, (const unsigned char *)base.p, base.len) != 1) {
		ERR_clear_error();
		rc = cw_fail(e, CW_EINVAL, "signature '%s' does not verify with key '%s'", chosen->label, out->keyid);
		goto out;
	}
out:
	if (o->key_release)
		o->key_release(o->key_ctx, key);
	EVP_MD_CTX_free(ctx);
	sb_free(&params);
	sb_free(&base);
	return rc;
}

cw_err httpsig_verify(const struct httpsig_msg *m, const char *signature_input, const char *signature,
		      const struct httpsig_verify_opts *o, struct httpsig_result *out, cw_errmsg *e)
{
	struct httpsig_result scratch_result, tried;
	if (!out)
		out = &scratch_result;
	memset(out, 0, sizeof(*out));
	if (!m || !o)
		return cw_fail(e, CW_EINVAL, "httpsig: missing argument");

	/* Signature's members: only n is read before it is written. */
	struct sig_all *sigs = malloc(sizeof(*sigs));
	struct si_pick pick = { .want = o->label, .tag = o->tag };
	cw_err rc;
	if (!sigs) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	sigs->n = 0;

	/* The syntax of both fields first. */
	struct sf s;
	if ((rc = sf_begin(&s, "Signature-Input", signature_input, e)) ||
	    (rc = sf_dictionary(&s, si_member, &pick)))
		goto out;
	if (!pick.ncand && pick.first) { /* none of the tag: the first, refused for its tag */
		pick.cand[pick.ncand++] = pick.first;
		pick.first = NULL;
	}
	if (!pick.ncand) {
		rc = fail_in(e, "Signature-Input", "no signature labelled '%s'", o->label);
		goto out;
	}
	if ((rc = sf_begin(&s, "Signature", signature, e)) || (rc = sf_dictionary(&s, sig_member, sigs)))
		goto out;

	/* Each candidate until one verifies; refused, the first one's reason
	 * (and what it said, in out). */
	for (size_t i = 0; i < pick.ncand; i++) {
		cw_errmsg later;
		rc = verify_one(m, pick.cand[i], sigs, o, i ? &tried : out, i ? &later : e);
		if (rc == CW_OK) {
			if (i)
				*out = tried;
			break;
		}
		if (rc != CW_EINVAL) { /* a resource or library failure: no more */
			if (i && e)
				*e = later;
			goto out;
		}
	}
	if (rc)
		goto out;
	spent_nonces(&pick, o, out);

	/* Last the body, now that we know the digest header is authentic. */
	if (o->check_content_digest) {
		const char *cd = m->header ? m->header(m->ctx, "content-digest") : NULL;
		rc = httpsig_check_content_digest(cd, o->body, o->body_len, e);
	}
out:
	si_pick_free(&pick);
	free(sigs);
	return rc;
}

/* ----------------------------------------------------------- Content-Digest */

cw_err httpsig_content_digest(const void *body, size_t len, char *out, size_t outlen)
{
	if (!out || outlen < HTTPSIG_DIGEST_HEADER_LEN || (!body && len))
		return CW_EINVAL;
	unsigned char md[32];
	unsigned int mdlen = 0;
	if (EVP_Digest(body ? body : "", len, md, &mdlen, cw_sha256_md(), NULL) != 1 || mdlen != 32) {
		ERR_clear_error();
		return CW_EIO;
	}
	memcpy(out, "sha-256=:", 9);
	EVP_EncodeBlock((unsigned char *)out + 9, md, 32);
	memcpy(out + 9 + 44, ":", 2);
	return CW_OK;
}

struct cd_pick {
	struct sf_item sha256, sha512;
	bool has256, has512;
};

static cw_err cd_member(struct sf *s, const char *key, void *ctx)
{
	struct cd_pick *pk = ctx;
	struct sf_item it;
	cw_err rc = sf_bare_item(s, &it);
	if (rc)
		return rc;
	if (it.type != SF_BYTES)
		return sf_fail(s, "member '%s' is not a byte sequence", key);
	if ((rc = sf_params(s, NULL, NULL)))
		return rc;
	if (strcmp(key, "sha-256") == 0) {
		pk->sha256 = it;
		pk->has256 = true;
	} else if (strcmp(key, "sha-512") == 0) {
		pk->sha512 = it;
		pk->has512 = true;
	}
	return CW_OK;
}

static cw_err cd_compare(const struct sf_item *it, const char *name, const EVP_MD *md, const void *body,
			 size_t len, cw_errmsg *e)
{
	unsigned char want[B64_MAX_DECODED], got[EVP_MAX_MD_SIZE];
	size_t want_len;
	unsigned int got_len = 0;
	if (!b64_decode(it->bytes, it->nbytes, want, sizeof(want), &want_len))
		return fail_in(e, "Content-Digest", "bad base64 in '%s'", name);
	if ((size_t)EVP_MD_get_size(md) != want_len)
		return fail_in(e, "Content-Digest", "'%s' is %zu bytes, expected %d", name, want_len,
			       EVP_MD_get_size(md));
	if (EVP_Digest(body ? body : "", len, got, &got_len, md, NULL) != 1)
		return ossl_fail(e, CW_EIO, "Content-Digest: hashing failed");
	if (!cw_ct_equal(got, want, want_len))
		return fail_in(e, "Content-Digest", "%s digest mismatch: the body is not the one digested", name);
	return CW_OK;
}

cw_err httpsig_check_content_digest(const char *header_value, const void *body, size_t len, cw_errmsg *e)
{
	if (!body && len)
		return cw_fail(e, CW_EINVAL, "httpsig: body is NULL");
	struct sf s;
	struct cd_pick pick;
	memset(&pick, 0, sizeof(pick));
	cw_err rc;
	if ((rc = sf_begin(&s, "Content-Digest", header_value, e)) || (rc = sf_dictionary(&s, cd_member, &pick)))
		return rc;
	if (!pick.has256 && !pick.has512)
		return fail_in(e, "Content-Digest", "no sha-256 or sha-512 member");
	if (pick.has256 && (rc = cd_compare(&pick.sha256, "sha-256", cw_sha256_md(), body, len, e)))
		return rc;
	if (pick.has512 && (rc = cd_compare(&pick.sha512, "sha-512", EVP_sha512(), body, len, e)))
		return rc;
	return CW_OK;
}

/* ------------------------------------------------------------- replay cache */

#define REPLAY_MAX_ENTRIES ((size_t)1 << 24)
#define REPLAY_MAX_WINDOW 1000000000LL
#define REPLAY_NONE UINT32_MAX

/* An entry is on two lists, both oldest first: every entry's (ALL, for
 * expiry) and its peer's (OWN, for eviction); a free entry is on the free
 * list (its ALL next). */
enum { ALL, OWN };

struct replay_link {
	uint32_t prev, next;
};

struct replay_list {
	uint32_t head, tail;
};

struct replay_entry {
	unsigned char id[16];     /* salted SHA-256 of keyid and nonce, truncated */
	int64_t basis;            /* max(created, now at insertion) */
	struct replay_link l[2];  /* on ALL and OWN */
	uint32_t peer;            /* index in peers */
};

/* A keyid's entries; a slot of no entries (n = 0) is taken by the next
 * new keyid. */
struct replay_peer {
	char keyid[HTTPSIG_MAX_TOKEN + 1];
	size_t n;
	struct replay_list own;
};

struct httpsig_replay {
	pthread_mutex_t mu;
	int64_t window;
	size_t cap, count;          /* entries held, at most cap */
	struct replay_entry *e;     /* cap entries */
	struct replay_list all;
	uint32_t free;              /* the free list */
	struct replay_peer *peers;
	size_t npeers, peers_cap;
	uint32_t *table;            /* linear probing; entry index + 1, 0 = empty */
	size_t mask;
	uint64_t live_evictions;
	unsigned char salt[16];
};

struct httpsig_replay *httpsig_replay_new(size_t max_entries, int64_t window_s)
{
	if (max_entries == 0 || max_entries > REPLAY_MAX_ENTRIES || window_s <= 0 || window_s > REPLAY_MAX_WINDOW)
		return NULL;
	struct httpsig_replay *r = calloc(1, sizeof(*r));
	if (!r)
		return NULL;
	size_t tsize = 16;
	while (tsize < 2 * max_entries)
		tsize *= 2;
	r->e = calloc(max_entries, sizeof(*r->e));
	r->table = calloc(tsize, sizeof(*r->table));
	if (!r->e || !r->table || cw_random(r->salt, sizeof(r->salt)) != CW_OK ||
	    pthread_mutex_init(&r->mu, NULL) != 0) {
		free(r->e);
		free(r->table);
		free(r);
		return NULL;
	}
	for (size_t i = 0; i < max_entries; i++)
		r->e[i].l[ALL].next = i + 1 < max_entries ? (uint32_t)(i + 1) : REPLAY_NONE;
	r->all = (struct replay_list){ REPLAY_NONE, REPLAY_NONE };
	r->free = 0;
	r->window = window_s;
	r->cap = max_entries;
	r->mask = tsize - 1;
	return r;
}

void httpsig_replay_free(struct httpsig_replay *r)
{
	if (!r)
		return;
	pthread_mutex_destroy(&r->mu);
	free(r->e);
	free(r->peers);
	free(r->table);
	free(r);
}

static size_t replay_home(const struct httpsig_replay *r, const unsigned char id[16])
{
	uint64_t h;
	memcpy(&h, id, sizeof(h));
	return (size_t)h & r->mask;
}

/* The table slot holding id (*found) or the empty slot where it would go. */
static size_t replay_find(const struct httpsig_replay *r, const unsigned char id[16], bool *found)
{
	size_t i = replay_home(r, id);
	while (r->table[i]) {
		if (memcmp(r->e[r->table[i] - 1].id, id, 16) == 0) {
			*found = true;
			return i;
		}
		i = (i + 1) & r->mask;
	}
	*found = false;
	return i;
}

/* Removes entry idx from the table, shifting back the entries after it
 * that would otherwise become unreachable (linear probing, no tombstones). */
static void replay_unlink(struct httpsig_replay *r, size_t idx)
{
	size_t i = replay_home(r, r->e[idx].id);
	while (r->table[i] != idx + 1)
		i = (i + 1) & r->mask;
	for (size_t j = (i + 1) & r->mask; r->table[j]; j = (j + 1) & r->mask) {
		size_t k = replay_home(r, r->e[r->table[j] - 1].id);
		/* The entry at j may fill the hole at i unless its home lies
		 * cyclically in (i, j]. */
		bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
		if (!stays) {
			r->table[i] = r->table[j];
			i = j;
		}
	}
	r->table[i] = 0;
}

static void list_append(struct httpsig_replay *r, struct replay_list *l, int k, uint32_t idx)
{
	r->e[idx].l[k] = (struct replay_link){ l->tail, REPLAY_NONE };
	if (l->tail != REPLAY_NONE)
		r->e[l->tail].l[k].next = idx;
	else
		l->head = idx;
	l->tail = idx;
}

static void list_remove(struct httpsig_replay *r, struct replay_list *l, int k, uint32_t idx)
{
	struct replay_link x = r->e[idx].l[k];
	*(x.prev != REPLAY_NONE ? &r->e[x.prev].l[k].next : &l->head) = x.next;
	*(x.next != REPLAY_NONE ? &r->e[x.next].l[k].prev : &l->tail) = x.prev;
}

/* Drops entry idx: from the table, both lists, onto the free list. */
static void replay_drop(struct httpsig_replay *r, uint32_t idx)
{
	struct replay_peer *p = &r->peers[r->e[idx].peer];
	replay_unlink(r, idx);
	list_remove(r, &r->all, ALL, idx);
	list_remove(r, &p->own, OWN, idx);
	p->n--;
	r->count--;
	r->e[idx].l[ALL].next = r->free;
	r->free = idx;
}

/* The index of keyid's peer slot, made (or an empty one taken) when
 * missing; REPLAY_NONE when out of memory.  A linear scan: keyids are the
 * peers' names (a signature verified before the nonce is looked at), and
 * a slot is held only while it has entries. */
static uint32_t replay_peer(struct httpsig_replay *r, const char *keyid)
{
	size_t empty = r->npeers;
	for (size_t i = 0; i < r->npeers; i++) {
		if (r->peers[i].n && strcmp(r->peers[i].keyid, keyid) == 0)
			return (uint32_t)i;
		if (!r->peers[i].n && empty == r->npeers)
			empty = i;
	}
	if (empty == r->npeers) {
		if (r->npeers == r->peers_cap) {
			size_t cap = r->peers_cap ? 2 * r->peers_cap : 8;
			struct replay_peer *x = realloc(r->peers, cap * sizeof(*x));
			if (!x)
				return REPLAY_NONE;
			r->peers = x;
			r->peers_cap = cap;
		}
		r->npeers++;
	}
	struct replay_peer *p = &r->peers[empty];
	snprintf(p->keyid, sizeof(p->keyid), "%s", keyid);
	p->n = 0;
	p->own = (struct replay_list){ REPLAY_NONE, REPLAY_NONE };
	return (uint32_t)empty;
}

/* The peer holding the most entries (there is one: the cache is full);
 * of several holding as many, keyid's own when it is one of them, so that
 * a peer adding more pushes out its own nonces, not another's of as many. */
static struct replay_peer *replay_largest(struct httpsig_replay *r, const char *keyid)
{
	struct replay_peer *most = NULL;
	for (size_t i = 0; i < r->npeers; i++) {
		struct replay_peer *p = &r->peers[i];
		if (!most || p->n > most->n ||
		    (p->n == most->n && p->n && strcmp(p->keyid, keyid) == 0))
			most = p;
	}
	return most;
}

cw_err httpsig_replay_check_and_add(struct httpsig_replay *r, const char *keyid, const char *nonce,
				    int64_t created, int64_t now)
{
	if (!r || !keyid || !nonce || !*nonce)
		return CW_EINVAL;
	size_t klen = strnlen(keyid, HTTPSIG_MAX_TOKEN + 1), nlen = strnlen(nonce, HTTPSIG_MAX_TOKEN + 1);
	if (klen > HTTPSIG_MAX_TOKEN || nlen > HTTPSIG_MAX_TOKEN || created < 0 || now < 0 ||
	    created > 999999999999999LL || now > 999999999999999LL)
		return CW_EINVAL;
	/* Older than the window: its entry may be gone already, so refuse. */
	if (created < now - r->window)
		return CW_EINVAL;

	unsigned char in[sizeof(r->salt) + 2 * HTTPSIG_MAX_TOKEN + 1], md[32];
	unsigned int mdlen = 0;
	memcpy(in, r->salt, sizeof(r->salt));
	memcpy(in + sizeof(r->salt), keyid, klen);
	in[sizeof(r->salt) + klen] = '\0';
	memcpy(in + sizeof(r->salt) + klen + 1, nonce, nlen);
	if (EVP_Digest(in, sizeof(r->salt) + klen + 1 + nlen, md, &mdlen, cw_sha256_md(), NULL) != 1) {
		ERR_clear_error();
		return CW_EIO;
	}
	int64_t basis = created > now ? created : now;

	pthread_mutex_lock(&r->mu);
	while (r->count && r->e[r->all.head].basis + r->window < now)
		replay_drop(r, r->all.head);
	bool found;
	size_t slot = replay_find(r, md, &found);
	if (found) {
		pthread_mutex_unlock(&r->mu);
		return CW_ECONFLICT;
	}
	/* Full: the oldest entry of the peer holding the most goes, so that
	 * one peer's volume pushes out its own nonces only (until the
	 * thirty-first session the oldest of all went, and one peer's flood
	 * made another's captured requests replayable). */
	if (r->count == r->cap) {
		struct replay_peer *most = replay_largest(r, keyid);
		if (r->e[most->own.head].basis + r->window >= now)
			r->live_evictions++;
		replay_drop(r, most->own.head);
		slot = replay_find(r, md, &found); /* the shift may have moved the hole */
	}
	uint32_t peer = replay_peer(r, keyid);
	if (peer == REPLAY_NONE) {
		pthread_mutex_unlock(&r->mu);
		return CW_ENOMEM;
	}
	struct replay_peer *p = &r->peers[peer];
	uint32_t idx = r->free;
	struct replay_entry *x = &r->e[idx];
	r->free = x->l[ALL].next;
	memcpy(x->id, md, 16);
	x->basis = basis;
	x->peer = peer;
	list_append(r, &r->all, ALL, idx);
	list_append(r, &p->own, OWN, idx);
	p->n++;
	r->count++;
	r->table[slot] = idx + 1;
	pthread_mutex_unlock(&r->mu);
	return CW_OK;
}

size_t httpsig_replay_count(struct httpsig_replay *r)
{
	pthread_mutex_lock(&r->mu);
	size_t n = r->count;
	pthread_mutex_unlock(&r->mu);
	return n;
}

uint64_t httpsig_replay_live_evictions(struct httpsig_replay *r)
{
	pthread_mutex_lock(&r->mu);
	uint64_t n = r->live_evictions;
	pthread_mutex_unlock(&r->mu);
	return n;
}

/* --------------------------------------------------------------------- keys */

EVP_PKEY *httpsig_ed25519_public_from_raw(const unsigned char raw[32])
{
	if (!raw)
		return NULL;
	EVP_PKEY *k = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, raw, 32);
	if (!k)
		ERR_clear_error();
	return k;
}

EVP_PKEY *httpsig_ed25519_public_from_base64(const char *b64)
{
	if (!b64)
		return NULL;
	size_t len = strnlen(b64, 64);
	unsigned char raw[32];
	size_t n;
	if (len >= 64 || !b64_decode(b64, len, raw, sizeof(raw), &n) || n != 32)
		return NULL;
	return httpsig_ed25519_public_from_raw(raw);
}

cw_err httpsig_ed25519_public_base64(EVP_PKEY *k, char *out, size_t len)
{
	if (!k || !out || len < 45 || EVP_PKEY_get_id(k) != EVP_PKEY_ED25519)
		return CW_EINVAL;
	unsigned char raw[32];
	size_t n = sizeof(raw);
	if (EVP_PKEY_get_raw_public_key(k, raw, &n) != 1 || n != 32) {
		ERR_clear_error();
		return CW_EIO;
	}
	EVP_EncodeBlock((unsigned char *)out, raw, 32);
	return CW_OK;
}

/* Never prompt on a terminal for a passphrase: an encrypted key just fails. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
	return 0;
}

#define KEY_FILE_MAX 16384

static cw_err key_from_fd(int fd, const char *path, EVP_PKEY **out, cw_errmsg *e)
{
	struct stat st;
	if (fstat(fd, &st) != 0)
		return cw_fail(e, CW_EIO, "cannot stat %s: %s", path, strerror(errno));
	if (!S_ISREG(st.st_mode))
		return cw_fail(e, CW_EINVAL, "%s is not a regular file", path);
	/* Readable only by the daemon (spec/quality.md): a group that may read
	 * it (0640, the ssl-cert habit) is refused too, since the twentieth
	 * session. */
	if (st.st_mode & (S_IRWXO | S_IRWXG))
		return cw_fail(e, CW_EINVAL,
			       "%s has mode %04o: a private key must be readable by the daemon's user alone "
			       "(chmod 600)",
			       path, (unsigned)(st.st_mode & 07777));
	if (st.st_size <= 0 || st.st_size > KEY_FILE_MAX)
		return cw_fail(e, CW_EINVAL, "%s is not a PEM key (%lld bytes)", path, (long long)st.st_size);
	char *buf = malloc(KEY_FILE_MAX);
	if (!buf)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	size_t n = 0;
	while (n < KEY_FILE_MAX) {
		ssize_t got = read(fd, buf + n, KEY_FILE_MAX - n);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0) {
			int err = errno;
			OPENSSL_cleanse(buf, KEY_FILE_MAX);
			free(buf);
			return cw_fail(e, CW_EIO, "cannot read %s: %s", path, strerror(err));
		}
		if (got == 0)
			break;
		n += (size_t)got;
	}
	BIO *bio = BIO_new_mem_buf(buf, (int)n);
	EVP_PKEY *k = bio ? PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL) : NULL;
	BIO_free(bio);
	OPENSSL_cleanse(buf, KEY_FILE_MAX);
	free(buf);
	if (!k) {
		char what[PATH_MAX + 64];
		snprintf(what, sizeof(what), "cannot read a private key from %s", path);
		return ossl_fail(e, CW_EINVAL, what);
	}
	if (EVP_PKEY_get_id(k) != EVP_PKEY_ED25519) {
		EVP_PKEY_free(k);
		return cw_fail(e, CW_EINVAL, "%s holds a private key that is not Ed25519", path);
	}
	*out = k;
	return CW_OK;
}

cw_err httpsig_key_load(const char *path, EVP_PKEY **out, cw_errmsg *e)
{
	if (!out)
		return cw_fail(e, CW_EINVAL, "httpsig: missing argument");
	*out = NULL;
	if (!path || !*path)
		return cw_fail(e, CW_EINVAL, "no key file given");
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0)
		return cw_fail(e, errno == ENOENT ? CW_ENOTFOUND : CW_EIO, "cannot open %s: %s", path,
			       strerror(errno));
	cw_err rc = key_from_fd(fd, path, out, e);
	close(fd);
	return rc;
}

static cw_err write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return CW_EIO;
		p += w;
		n -= (size_t)w;
	}
	return CW_OK;
}

static void fsync_parent(const char *path)
{
	char dir[PATH_MAX];
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if (slash == dir)
		dir[1] = '\0';
	else
		*slash = '\0';
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
}

cw_err httpsig_key_load_or_create(const char *path, EVP_PKEY **out, cw_errmsg *e)
{
	cw_err rc = httpsig_key_load(path, out, e);
	if (rc != CW_ENOTFOUND)
		return rc;

	char tmp[PATH_MAX];
	unsigned char rnd[8];
	char hex[17];
	if (cw_random(rnd, sizeof(rnd)) != CW_OK)
		return cw_fail(e, CW_EIO, "no randomness for a temporary file name");
	cw_hex(hex, rnd, sizeof(rnd));
	int w = snprintf(tmp, sizeof(tmp), "%s.tmp-%s", path, hex);
	if (w < 0 || (size_t)w >= sizeof(tmp))
		return cw_fail(e, CW_EINVAL, "key file path too long");

	EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
	if (!k)
		return ossl_fail(e, CW_EIO, "cannot generate an Ed25519 key");
	BIO *mem = BIO_new(BIO_s_secmem());
	char *pem = NULL;
	long pem_len = 0;
	if (!mem || PEM_write_bio_PrivateKey(mem, k, NULL, NULL, 0, NULL, NULL) != 1 ||
	    (pem_len = BIO_get_mem_data(mem, &pem)) <= 0) {
		BIO_free(mem);
		EVP_PKEY_free(k);
		return ossl_fail(e, CW_EIO, "cannot encode the new key");
	}

	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0) {
		rc = cw_fail(e, CW_EIO, "cannot create %s: %s", tmp, strerror(errno));
		goto fail;
	}
	if (write_all(fd, pem, (size_t)pem_len) != CW_OK || fsync(fd) != 0) {
		rc = cw_fail(e, CW_EIO, "cannot write %s: %s", tmp, strerror(errno));
		close(fd);
		unlink(tmp);
		goto fail;
	}
	close(fd);
	/* link() never replaces: if another process got there first, use its key. */
	if (link(tmp, path) != 0) {
		int err = errno;
		unlink(tmp);
		if (err == EEXIST) {
			BIO_free(mem);
			EVP_PKEY_free(k);
			return httpsig_key_load(path, out, e);
		}
		rc = cw_fail(e, CW_EIO, "cannot create %s: %s", path, strerror(err));
		goto fail;
	}
	unlink(tmp);
	fsync_parent(path);
	BIO_free(mem);
	*out = k;
	return CW_OK;
fail:
	BIO_free(mem);
	EVP_PKEY_free(k);
	return rc;
}
