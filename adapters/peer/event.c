/* Validation of the neutral API's inputs: identifiers, event bodies, batches. */
#include "config.h"
#include "peer/event.h"
#include "cw.h"
#include "media.h"
#include "utf8.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ================================================================ identifiers */

static bool is_lower_alnum(unsigned char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9');
}

/* [A-Za-z0-9_-]: room ids and the opaque ids. */
static bool is_id_char(unsigned char ch)
{
	return cw_ascii_alnum(ch) || ch == '_' || ch == '-';
}

/* RFC 3986 unreserved plus '+' (E.164) and '='. */
static bool is_local_char(unsigned char ch)
{
	return cw_ascii_alnum(ch) || ch == '-' || ch == '.' || ch == '_' || ch == '~' || ch == '+' || ch == '=';
}

cw_err mimi_domain_check(const char *d, size_t len, cw_errmsg *e)
{
	if (len == 0)
		return cw_fail(e, CW_EINVAL, "the domain is empty");
	if (len > MIMI_DOMAIN_MAX)
		return cw_fail(e, CW_EINVAL, "the domain is longer than %d bytes", MIMI_DOMAIN_MAX);
	size_t label = 0, dots = 0;
	bool all_digits = true;
	for (size_t i = 0; i <= len; i++) {
		unsigned char ch = i < len ? (unsigned char)d[i] : '.';
		if (ch == '.') {
			if (label == 0)
				return cw_fail(e, CW_EINVAL, "the domain has an empty label");
			if (d[i - 1] == '-')
				return cw_fail(e, CW_EINVAL, "a domain label ends with '-'");
			if (i < len)
				dots++;
			else if (all_digits)
				return cw_fail(e, CW_EINVAL, "the domain's last label is all digits (IP addresses are not identifiers)");
			label = 0;
			all_digits = true;
			continue;
		}
		if (ch >= 'A' && ch <= 'Z')
			return cw_fail(e, CW_EINVAL, "the domain must be lower-case");
		if (!is_lower_alnum(ch) && ch != '-')
			return cw_fail(e, CW_EINVAL, "the domain holds a byte other than a-z, 0-9, '-' and '.'");
		if (label == 0 && ch == '-')
			return cw_fail(e, CW_EINVAL, "a domain label starts with '-'");
		if (++label > 63)
			return cw_fail(e, CW_EINVAL, "a domain label is longer than 63 bytes");
		if (ch < '0' || ch > '9')
			all_digits = false;
	}
	if (dots == 0)
		return cw_fail(e, CW_EINVAL, "the domain must have at least one dot");
	return CW_OK;
}

static cw_err check_local(const char *s, size_t len, cw_errmsg *e)
{
	if (len == 0)
		return cw_fail(e, CW_EINVAL, "the user local part is empty");
	if (len > MIMI_LOCAL_MAX)
		return cw_fail(e, CW_EINVAL, "the user local part is longer than %d bytes", MIMI_LOCAL_MAX);
	if ((len == 1 && s[0] == '.') || (len == 2 && s[0] == '.' && s[1] == '.'))
		return cw_fail(e, CW_EINVAL, "the user local part may not be '.' or '..'");
	for (size_t i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (is_local_char(ch))
			continue;
		if (ch == '/')
			return cw_fail(e, CW_EINVAL, "the user local part is followed by '/' (no trailing slash or sub-path)");
		if (ch == '?' || ch == '#')
			return cw_fail(e, CW_EINVAL, "the identifier has a query or fragment");
		if (ch == '%')
			return cw_fail(e, CW_EINVAL, "the user local part holds a percent-escape");
		return cw_fail(e, CW_EINVAL,
			       "the user local part holds a byte other than A-Z a-z 0-9 - . _ ~ + = (offset %zu)", i);
	}
	return CW_OK;
}

static cw_err check_room_id(const char *s, size_t len, cw_errmsg *e)
{
	if (len == 0)
		return cw_fail(e, CW_EINVAL, "the room id is empty");
	if (len > MIMI_ROOM_ID_MAX)
		return cw_fail(e, CW_EINVAL, "the room id is longer than %d bytes", MIMI_ROOM_ID_MAX);
	for (size_t i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (is_id_char(ch))
			continue;
		if (ch == '/')
			return cw_fail(e, CW_EINVAL, "the room id is followed by '/' (no trailing slash or sub-path)");
		if (ch == '?' || ch == '#')
			return cw_fail(e, CW_EINVAL, "the identifier has a query or fragment");
		return cw_fail(e, CW_EINVAL, "the room id holds a byte other than A-Z a-z 0-9 _ - (offset %zu)", i);
	}
	return CW_OK;
}

cw_err mimi_uri_parse(const char *s, struct mimi_uri *out, cw_errmsg *e)
{
	memset(out, 0, sizeof(*out));
	if (!s)
		return cw_fail(e, CW_EINVAL, "the identifier is missing");
	size_t total = strnlen(s, MIMI_URI_MAX + 1);
	if (total > MIMI_URI_MAX)
		return cw_fail(e, CW_EINVAL, "the identifier is longer than %d bytes", MIMI_URI_MAX);
	if (strncmp(s, "mimi://", 7) != 0)
		return cw_fail(e, CW_EINVAL, "the identifier does not start with mimi://");
	const char *host = s + 7;
	size_t hlen = strcspn(host, ":/?#");
	cw_err rc = mimi_domain_check(host, hlen, e);
	if (rc)
		return rc;
	const char *p = host + hlen;
	/* The spec's identifiers are mimi://<domain>/...: the domain alone
	 * names a provider (where it answers is its directory's business),
	 * and a stored identity or room is its URI without one.  A port was
	 * parsed once and then failed the tables' checks (409, "retry"). */
	if (*p == ':')
		return cw_fail(e, CW_EINVAL, "the identifier names a port: identifiers are mimi://<domain>/u/<local> "
					     "or mimi://<domain>/r/<id>, without one");
	if (*p != '/')
		return cw_fail(e, CW_EINVAL, "the identifier has no /u/<local> or /r/<id> path");
	enum mimi_kind kind;
	if (p[1] == 'u' && p[2] == '/')
		kind = MIMI_USER;
	else if (p[1] == 'r' && p[2] == '/')
		kind = MIMI_ROOM;
	else
		return cw_fail(e, CW_EINVAL, "the path is neither /u/<local> (a user) nor /r/<id> (a room)");
	const char *id = p + 3;
	size_t idlen = total - (size_t)(id - s);
	rc = kind == MIMI_USER ? check_local(id, idlen, e) : check_room_id(id, idlen, e);
	if (rc)
		return rc;
	out->kind = kind;
	memcpy(out->domain, host, hlen);
	out->domain[hlen] = '\0';
	memcpy(out->id, id, idlen);
	out->id[idlen] = '\0';
	return CW_OK;
}

cw_err mimi_uri_format(const struct mimi_uri *u, char *buf, size_t size, cw_errmsg *e)
{
	if (size > 0)
		buf[0] = '\0';
	size_t dlen = strnlen(u->domain, sizeof(u->domain));
	size_t idlen = strnlen(u->id, sizeof(u->id));
	if (dlen == sizeof(u->domain) || idlen == sizeof(u->id))
		return cw_fail(e, CW_EINVAL, "the identifier's components are not terminated");
	cw_err rc = mimi_domain_check(u->domain, dlen, e);
	if (!rc)
		rc = u->kind == MIMI_USER ? check_local(u->id, idlen, e)
		     : u->kind == MIMI_ROOM ? check_room_id(u->id, idlen, e)
		     : cw_fail(e, CW_EINVAL, "the identifier is neither a user nor a room");
	if (rc)
		return rc;
	if (u->port)
		return cw_fail(e, CW_EINVAL, "the identifier names a port (identifiers name none)");
	size_t n = 7 + dlen + 3 + idlen;
	if (n > MIMI_URI_MAX)
		return cw_fail(e, CW_EINVAL, "the identifier is longer than %d bytes", MIMI_URI_MAX);
	if (n >= size)
		return cw_fail(e, CW_EINVAL, "the identifier does not fit in %zu bytes", size);
	snprintf(buf, size, "mimi://%s/%c/%s", u->domain, u->kind == MIMI_USER ? 'u' : 'r', u->id);
	return CW_OK;
}

bool addr_fold_lower(char *s, const char *stop)
{
	bool folded = false;
	for (char *p = s; *p && !(stop && strchr(stop, *p)); p++)
		if (*p >= 'A' && *p <= 'Z') {
			*p = (char)(*p - 'A' + 'a');
			folded = true;
		}
	return folded;
}

void mimi_addr_fold(char *s)
{
	if (strncasecmp(s, "mimi://", 7) != 0)
		return;
	addr_fold_lower(s, "/");
	addr_fold_lower(s + 7, "/");
}

bool mimi_uri_equal(const struct mimi_uri *a, const struct mimi_uri *b)
{
	return a->kind == b->kind && a->port == b->port && strcmp(a->domain, b->domain) == 0 &&
	       strcmp(a->id, b->id) == 0;
}

static bool opaque_id_valid(const char *id, const char *prefix)
{
	if (!id)
		return false;
	size_t plen = strlen(prefix);
	if (strncmp(id, prefix, plen) != 0)
		return false;
	size_t i = 0;
	for (const char *p = id + plen; *p; p++, i++)
		if (i >= EVENT_OPAQUE_ID_MAX || !is_id_char((unsigned char)*p))
			return false;
	return i >= 1;
}

bool room_public_id_valid(const char *id)
{
	return opaque_id_valid(id, "r_");
}

bool message_id_valid(const char *id)
{
	return opaque_id_valid(id, "msg_");
}

bool idempotency_key_valid(const char *key)
{
	if (!key)
		return false;
	size_t i = 0;
	for (; key[i]; i++) {
		unsigned char ch = (unsigned char)key[i];
		if (i >= IDEMPOTENCY_KEY_MAX ||
		    !(cw_ascii_alnum(ch) || ch == '.' || ch == '_' || ch == ':' || ch == '-'))
			return false;
	}
	return i >= 1;
}

/* ================================================================ limits */

struct event_limits event_limits_default(void)
{
	return (struct event_limits){
		.max_event_bytes = 64 * 1024,
		.max_body_bytes = 16 * 1024,
		.max_parts = 4,
		.max_attachments = 8,
		.max_attachment_bytes = 100ull * 1024 * 1024,
		.max_batch = 256, /* the batch route and the directory take peer.max_batch */
		.max_batch_bytes = 256 * 64 * 1024,
		.part_types = EVENT_PART_ALL,
	};
}

/* ================================================================ JSON pointers */

/* An RFC 6901 pointer built while walking the document. A reference token
 * that does not fit is left out with everything below it, so the pointer
 * always names the offending member or one of its ancestors. */
struct jptr {
	char s[sizeof(((struct event_error *)0)->pointer)];
	size_t len;
	bool full;
};

/* What jptr_pop() needs to restore the pointer as it was before a push. */
typedef struct {
	size_t len;
	bool full;
} jptr_mark;

static jptr_mark jptr_push(struct jptr *p, const char *tok)
{
	jptr_mark m = { p->len, p->full };
	if (p->full)
		return m;
	char esc[sizeof(p->s)];
	size_t n = 0;
	esc[n++] = '/';
	for (const char *t = tok; *t; t++) {
		const char *rep = *t == '~' ? "~0" : *t == '/' ? "~1" : NULL;
		size_t add = rep ? 2 : 1;
		if (n + add >= sizeof(esc) || p->len + n + add >= sizeof(p->s)) {
			p->full = true;
			return m;
		}
		if (rep) {
			esc[n++] = rep[0];
			esc[n++] = rep[1];
		} else {
			esc[n++] = *t;
		}
	}
	if (p->len + n >= sizeof(p->s)) {
		p->full = true;
		return m;
	}
	memcpy(p->s + p->len, esc, n);
	p->len += n;
	p->s[p->len] = '\0';
	return m;
}

static jptr_mark jptr_push_index(struct jptr *p, size_t i)
{
	char tok[24];
	tok[outbox_put_ll(tok, (long long)i)] = '\0';
	return jptr_push(p, tok);
}

static void jptr_pop(struct jptr *p, jptr_mark m)
{
	p->len = m.len;
	p->full = m.full;
	p->s[p->len] = '\0';
}

/* ================================================================ validation */

struct vctx {
	const struct event_limits *lim;
	struct event_error *err;
	struct jptr ptr;
	bool counting; /* check_depth counts values (an event's) */
	int values;
	const char *what; /* what is counted: "event" unless said */
	bool stored; /* EVENT_STORED */
};

static void vctx_init(struct vctx *c, const struct event_limits *lim, struct event_error *err)
{
	memset(c, 0, sizeof(*c));
	c->lim = lim;
	c->err = err;
	c->what = "event";
}

/* Records the error at the current pointer; returns CW_EINVAL. After a
 * failure the pointer's push/pop balance no longer matters: the walk stops. */
__attribute__((format(printf, 3, 4)))
static cw_err vfail(struct vctx *c, const char *code, const char *fmt, ...)
{
	snprintf(c->err->code, sizeof(c->err->code), "%s", code);
	memcpy(c->err->pointer, c->ptr.s, c->ptr.len + 1);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(c->err->detail, sizeof(c->err->detail), fmt, ap);
	va_end(ap);
	return CW_EINVAL;
}

/* Whether a number survives the store: kept as PostgreSQL's jsonb keeps it
 * (numeric, written out in plain decimal) and read back by jansson as the
 * same value, in about as many bytes as it came in (event.h). */
static bool number_storable(json_t *v)
{
	if (json_is_integer(v)) {
		json_int_t i = json_integer_value(v);
		return i > -EVENT_TS_LIMIT && i < EVENT_TS_LIMIT;
	}
	double x = json_real_value(v), a = x < 0 ? -x : x;
	return a == 0 || (a >= EVENT_REAL_MIN && a < (double)EVENT_TS_LIMIT);
}

/* Refuses containers nested deeper than EVENT_MAX_DEPTH (v is at depth),
 * numbers the store would not keep as they are, and, when c->values is
 * counting (an event), more than EVENT_MAX_VALUES values in all. */
static cw_err check_depth(struct vctx *c, json_t *v, int depth)
{
	if (c->counting && ++c->values > EVENT_MAX_VALUES)
		return vfail(c, EVENT_ERR_TOO_LARGE, "The %s holds more than %d JSON values (objects, arrays, "
						      "strings, numbers, literals).", c->what, EVENT_MAX_VALUES);
	if (json_is_number(v) && !number_storable(v))
		return vfail(c, EVENT_ERR_INVALID, "A number is out of the range this API carries (RFC 7493, I-JSON): "
						   "an integer must be within +-(2^53 - 1), any other number zero or "
						   "between 1e-15 and 2^53 in magnitude.");
	if (!json_is_object(v) && !json_is_array(v))
		return CW_OK;
	if (depth > EVENT_MAX_DEPTH)
		return vfail(c, EVENT_ERR_INVALID, "Objects and arrays are nested more than %d levels deep.",
			     EVENT_MAX_DEPTH);
	if (json_is_object(v)) {
		const char *key;
		json_t *child;
		json_object_foreach(v, key, child) {
			jptr_mark m = jptr_push(&c->ptr, key);
			cw_err rc = check_depth(c, child, depth + 1);
			if (rc)
				return rc;
			jptr_pop(&c->ptr, m);
		}
	} else {
		size_t i;
		json_t *child;
		json_array_foreach(v, i, child) {
			jptr_mark m = jptr_push_index(&c->ptr, i);
			cw_err rc = check_depth(c, child, depth + 1);
			if (rc)
				return rc;
			jptr_pop(&c->ptr, m);
		}
	}
	return CW_OK;
}

cw_err event_json_value_check(json_t *v, const char *name, struct event_error *err)
{
	struct event_limits lim = event_limits_default();
	struct vctx c;
	memset(err, 0, sizeof(*err));
	vctx_init(&c, &lim, err);
	c.what = name;
	c.counting = true;
	jptr_push(&c.ptr, name);
	return check_depth(&c, v, 1);
}

static const char *json_type_phrase(json_type t)
{
	switch (t) {
	case JSON_OBJECT: return "an object";
	case JSON_ARRAY: return "an array";
	case JSON_STRING: return "a string";
	case JSON_INTEGER: return "an integer";
	case JSON_REAL: return "a number";
	case JSON_TRUE:
	case JSON_FALSE: return "a boolean";
	case JSON_NULL: return "null";
	}
	return "a value";
}

enum { M_REQUIRED = 1, M_NULLABLE = 2 };

/* Fetches obj[key] into *out and pushes key onto the pointer (the caller
 * pops with *mark). *out is NULL when the member is absent, or null and
 * M_NULLABLE. Fails when it is required and missing, or of another type. */
static cw_err member(struct vctx *c, json_t *obj, const char *key, json_type t, unsigned f, json_t **out,
		     jptr_mark *mark)
{
	*out = NULL;
	*mark = jptr_push(&c->ptr, key);
	json_t *v = json_object_get(obj, key);
	if (v && json_is_null(v) && (f & M_NULLABLE))
		v = NULL;
	if (!v) {
		if (f & M_REQUIRED)
			return vfail(c, EVENT_ERR_INVALID, "%s is required.", key);
		return CW_OK;
	}
	if (json_typeof(v) != t)
		return vfail(c, EVENT_ERR_INVALID, "%s must be %s%s, not %s.", key, json_type_phrase(t),
			     (f & M_NULLABLE) ? " or null" : "", json_type_phrase(json_typeof(v)));
	*out = v;
	return CW_OK;
}

/* A string member of at most max bytes (longer: too_large). */
static cw_err string_member(struct vctx *c, json_t *obj, const char *key, unsigned f, size_t max,
			    const char **out)
{
	json_t *v;
	jptr_mark m;
	*out = NULL;
	cw_err rc = member(c, obj, key, JSON_STRING, f, &v, &m);
	if (rc)
		return rc;
	if (v) {
		if (json_string_length(v) > max)
			return vfail(c, EVENT_ERR_TOO_LARGE, "%s is longer than %zu bytes.", key, max);
		*out = json_string_value(v);
	}
	jptr_pop(&c->ptr, m);
	return CW_OK;
}

/* A timestamp in milliseconds: 0 < ts < limit (limit_text, as the detail
 * says it); *out is 0 when absent. */
static cw_err ts_member(struct vctx *c, json_t *obj, const char *key, unsigned f, int64_t limit,
		       const char *limit_text, int64_t *out)
{
	json_t *v;
	jptr_mark m;
	*out = 0;
	cw_err rc = member(c, obj, key, JSON_INTEGER, f, &v, &m);
	if (rc)
		return rc;
	if (v) {
		json_int_t ts = json_integer_value(v);
		if (ts <= 0 || ts >= limit)
			return vfail(c, EVENT_ERR_INVALID,
				     "%s must be milliseconds since the epoch, above 0 and below %s.", key, limit_text);
		*out = (int64_t)ts;
	}
	jptr_pop(&c->ptr, m);
	return CW_OK;
}

static cw_err uri_member(struct vctx *c, json_t *obj, const char *key, unsigned f, enum mimi_kind kind,
			 struct mimi_uri *u, bool *has)
{
	json_t *v;
	jptr_mark m;
	*has = false;
	cw_err rc = member(c, obj, key, JSON_STRING, f, &v, &m);
	if (rc)
		return rc;
	if (v) {
		cw_errmsg e;
		if (mimi_uri_parse(json_string_value(v), u, &e))
			return vfail(c, EVENT_ERR_INVALID, "%s is not a valid mimi URI: %s.", key, e.msg);
		if (u->kind != kind)
			return vfail(c, EVENT_ERR_INVALID, "%s must be a %s URI (mimi://<domain>/%s), not a %s URI.", key,
				     kind == MIMI_USER ? "user" : "room", kind == MIMI_USER ? "u/<local>" : "r/<id>",
				     kind == MIMI_USER ? "room" : "user");
		*has = true;
	}
	jptr_pop(&c->ptr, m);
	return CW_OK;
}

/* null or a message id. */
static cw_err msgid_member(struct vctx *c, json_t *obj, const char *key, const char **out)
{
	json_t *v;
	jptr_mark m;
	*out = NULL;
	cw_err rc = member(c, obj, key, JSON_STRING, M_NULLABLE, &v, &m);
	if (rc)
		return rc;
	if (v) {
		if (!message_id_valid(json_string_value(v)))
			return vfail(c, EVENT_ERR_INVALID,
				     "%s must be null or a message id: msg_ and 1 to %d of A-Z a-z 0-9 _ -.", key,
				     EVENT_OPAQUE_ID_MAX);
		*out = json_string_value(v);
	}
	jptr_pop(&c->ptr, m);
	return CW_OK;
}

/* A required string that must be one of names; *out is its index. */
static cw_err enum_member(struct vctx *c, json_t *obj, const char *key, const char *const *names, size_t n,
			  const char *allowed, int *out)
{
	json_t *v;
	jptr_mark m;
	cw_err rc = member(c, obj, key, JSON_STRING, M_REQUIRED, &v, &m);
	if (rc)
		return rc;
	for (size_t i = 0; i < n; i++)
		if (strcmp(json_string_value(v), names[i]) == 0) {
			*out = (int)i;
			jptr_pop(&c->ptr, m);
			return CW_OK;
		}
	return vfail(c, EVENT_ERR_INVALID, "%s must be one of: %s.", key, allowed);
}

static const char *const part_type_names[] = { "text/plain", "text/markdown", "text/html" };

static cw_err check_parts(struct vctx *c, json_t *content, struct event *ev)
{
	json_t *parts, *part;
	jptr_mark m;
	size_t i;
	cw_err rc = member(c, content, "parts", JSON_ARRAY, 0, &parts, &m);
	if (rc || !parts) {
		jptr_pop(&c->ptr, m);
		return rc;
	}
	size_t n = json_array_size(parts);
	if (n == 0)
		return vfail(c, EVENT_ERR_INVALID, "parts must hold at least one part when present.");
	if (n > c->lim->max_parts)
		return vfail(c, EVENT_ERR_TOO_LARGE, "parts holds more than %zu parts.", c->lim->max_parts);
	json_array_foreach(parts, i, part) {
		jptr_mark pm = jptr_push_index(&c->ptr, i);
		if (!json_is_object(part))
			return vfail(c, EVENT_ERR_INVALID, "Each part must be an object with type and body.");
		const char *type, *body;
		rc = string_member(c, part, "type", M_REQUIRED, SIZE_MAX, &type);
		if (rc)
			return rc;
		size_t k = 0;
		while (k < CW_ARRAY_LEN(part_type_names) && strcmp(type, part_type_names[k]) != 0)
			k++;
		if (k == CW_ARRAY_LEN(part_type_names) || !(c->lim->part_types & (1u << k))) {
			jptr_push(&c->ptr, "type");
			char allowed[64] = "";
			for (size_t j = 0; j < CW_ARRAY_LEN(part_type_names); j++)
				if (c->lim->part_types & (1u << j))
					snprintf(allowed + strlen(allowed), sizeof(allowed) - strlen(allowed), "%s%s",
						 *allowed ? ", " : "", part_type_names[j]);
			return vfail(c, EVENT_ERR_INVALID, "A part's type must be one of: %s.", allowed);
		}
		rc = string_member(c, part, "body", M_REQUIRED, c->lim->max_body_bytes, &body);
		if (rc)
			return rc;
		if (!*body) {
			jptr_push(&c->ptr, "body");
			return vfail(c, EVENT_ERR_INVALID, "A part's body must not be empty.");
		}
		ev->body_bytes += strlen(body);
		jptr_pop(&c->ptr, pm);
	}
	ev->nparts = n;
	ev->kinds |= EVENT_KIND_TEXT;
	jptr_pop(&c->ptr, m);
	return CW_OK;
}

/* What is wrong with an attachment's url (NULL: nothing).  A user or
 * password before the host (https://user:password@host/...) is refused:
 * libcurl sends it as Basic authentication when the gateway fetches the
 * file, and a peer has no business making the gateway send credentials
 * anywhere (until the forty-seventh session's review it was taken). */
static const char *url_problem(const char *s)
{
	const char *rest;
	if (strncmp(s, "https://", 8) == 0)
		rest = s + 8;
	else if (strncmp(s, "mxc://", 6) == 0)
		rest = s + 6;
	else
		rest = NULL;
	if (!rest || strlen(s) > EVENT_URL_MAX)
		return "url must be an https:// or mxc:// URL of visible ASCII without spaces.";
	for (const unsigned char *p = (const unsigned char *)rest; *p; p++)
		if (*p <= 0x20 || *p >= 0x7f || strchr("\"<>\\^`{|}", *p))
			return "url must be an https:// or mxc:// URL of visible ASCII without spaces.";
	/* The authority ends at the first '/', '?' or '#' (RFC 3986 3.2), and
	 * holds a host before any port: "https://?x", "https://#x" and
	 * "https://:443/x" name none (until the fiftieth session's review only
	 * "https:///x" was refused, the others taken and fetched as nothing). */
	size_t authority = strcspn(rest, "/?#");
	if (memchr(rest, '@', authority))
		return "url must not carry a user name or password (user:password@ before the host): the gateway "
		       "fetches files without credentials.";
	if (authority == 0 || *rest == ':')
		return "url must name a host after https:// or mxc://.";
	return NULL;
}

bool event_url_valid(const char *s)
{
	return url_problem(s) == NULL;
}

static bool sha256_valid(const char *s)
{
	size_t i = 0;
	for (; s[i]; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
	return i == 64;
}

bool event_filename_valid(const char *s)
{
	size_t n = strlen(s);
	return n > 0 && n <= EVENT_FILENAME_MAX && strcmp(s, ".") != 0 && strcmp(s, "..") != 0 &&
	       !strpbrk(s, "/\\") && !cw_utf8_has_control(s, n) && !cw_utf8_has_bidi_control(s, n);
}

static cw_err check_attachment(struct vctx *c, json_t *a, struct event *ev)
{
	if (!json_is_object(a))
		return vfail(c, EVENT_ERR_INVALID, "Each attachment must be an object.");
	const char *s;
	/* Its length is part of its syntax (RFC 6838: a type and a subtype
	 * of at most 127 characters each), as a sha256's: a longer one is
	 * invalid_body, not too_large (413 until the fifty-first session's
	 * review). */
	cw_err rc = string_member(c, a, "content_type", M_REQUIRED, SIZE_MAX, &s);
	if (rc)
		return rc;
	if (strlen(s) > EVENT_CONTENT_TYPE_MAX || (!c->stored && !media_type_valid(s))) {
		jptr_push(&c->ptr, "content_type");
		return vfail(c, EVENT_ERR_INVALID,
			     "content_type must be a media type: type/subtype (RFC 6838: letters, digits, !#$&-^_.+, "
			     "each from a letter or digit, at most 127 bytes), then any ; name=value parameters "
			     "(RFC 9110: a token or a quoted string of ASCII), at most %d bytes.",
			     EVENT_CONTENT_TYPE_MAX);
	}
	rc = string_member(c, a, "url", M_REQUIRED, EVENT_URL_MAX, &s);
	if (rc)
		return rc;
	const char *bad = url_problem(s);
	if (bad) {
		jptr_push(&c->ptr, "url");
		return vfail(c, EVENT_ERR_INVALID, "%s", bad);
	}
	json_t *v;
	jptr_mark m;
	/* Optional since the thirty-second session: absent, the size is
	 * unknown (an XMPP user's file, XEP-0066, has none; it was declared
	 * 0 before, which told peers the file was empty).  An unknown size
	 * counts as the limit, so that a rule's max_attachment_bytes is not
	 * dodged by leaving it out. */
	rc = member(c, a, "size", JSON_INTEGER, 0, &v, &m);
	if (rc)
		return rc;
	json_int_t size = v ? json_integer_value(v) : (json_int_t)c->lim->max_attachment_bytes;
	if (size < 0)
		return vfail(c, EVENT_ERR_INVALID, "size must not be negative.");
	if ((uint64_t)size > c->lim->max_attachment_bytes)
		return vfail(c, EVENT_ERR_TOO_LARGE, "size is above the limit of %llu bytes.",
			     (unsigned long long)c->lim->max_attachment_bytes);
	jptr_pop(&c->ptr, m);
	ev->attachment_bytes += (uint64_t)size;
	/* Its length is part of its syntax, as an identifier's: 65 digits are
	 * invalid_body, not too_large (413 until the fiftieth session). */
	rc = string_member(c, a, "sha256", 0, SIZE_MAX, &s);
	if (rc)
		return rc;
	if (s && !sha256_valid(s)) {
		jptr_push(&c->ptr, "sha256");
		return vfail(c, EVENT_ERR_INVALID, "sha256 must be 64 lower-case hex digits.");
	}
	/* Its length is part of its syntax too (a name of at most 255 bytes,
	 * as file systems take): a longer one is invalid_body, not too_large
	 * (413 until the fifty-second session). */
	rc = string_member(c, a, "filename", 0, SIZE_MAX, &s);
	if (rc)
		return rc;
	if (s && !event_filename_valid(s)) {
		jptr_push(&c->ptr, "filename");
		return vfail(c, EVENT_ERR_INVALID,
			     "filename must be a non-empty name of at most %d bytes without '/', '\\', control "
			     "characters or bidirectional controls, not . or ..",
			     EVENT_FILENAME_MAX);
	}
	return CW_OK;
}

static cw_err check_attachments(struct vctx *c, json_t *content, struct event *ev)
{
	json_t *list, *a;
	jptr_mark m;
	size_t i;
	cw_err rc = member(c, content, "attachments", JSON_ARRAY, 0, &list, &m);
	if (rc || !list) {
		jptr_pop(&c->ptr, m);
		return rc;
	}
	size_t n = json_array_size(list);
	if (n > c->lim->max_attachments)
		return vfail(c, EVENT_ERR_TOO_LARGE, "attachments holds more than %zu attachments.",
			     c->lim->max_attachments);
	json_array_foreach(list, i, a) {
		jptr_mark am = jptr_push_index(&c->ptr, i);
		rc = check_attachment(c, a, ev);
		if (rc)
			return rc;
		jptr_pop(&c->ptr, am);
	}
	ev->nattachments = n;
	if (n)
		ev->kinds |= EVENT_KIND_MEDIA;
	jptr_pop(&c->ptr, m);
	return CW_OK;
}

static const char *const dispositions[] = {
	"unspecified", "render", "reaction", "profile", "inline", "icon", "attachment", "session", "preview",
};
#define DISPOSITIONS_TEXT "unspecified, render, reaction, profile, inline, icon, attachment, session, preview"

static const char *const type_names[EVENT_TYPE_COUNT] = {
	"message", "edit", "delete", "reaction", "receipt", "typing", "membership", "block",
};
#define TYPES_TEXT "message, edit, delete, reaction, receipt, typing, membership, block"

const char *event_type_name(enum event_type t)
{
	return (unsigned)t < EVENT_TYPE_COUNT ? type_names[t] : "unknown";
}

/* "a message", "an edit": for details. */
static const char *article(enum event_type t)
{
	return t == EVENT_EDIT ? "an" : "a";
}

/* Fails at /content/<key> (the caller's pointer is at /content). */
__attribute__((format(printf, 4, 5)))
static cw_err fail_in(struct vctx *c, const char *key, const char *code, const char *fmt, ...)
{
	jptr_push(&c->ptr, key);
	char detail[sizeof(c->err->detail)];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	return vfail(c, code, "%s", detail);
}

static cw_err check_type_rules(struct vctx *c, json_t *content, struct event *ev)
{
	enum event_type t = ev->type;
	const char *name = type_names[t];
	bool carries_content = t == EVENT_MESSAGE || t == EVENT_EDIT || t == EVENT_REACTION;
	cw_err rc;

	if (ev->replaces && t != EVENT_EDIT && t != EVENT_DELETE)
		return fail_in(c, "replaces", EVENT_ERR_INVALID,
			       "replaces is only for an edit or a delete, and this is %s %s.", article(t), name);
	if (ev->disposition && strcmp(ev->disposition, "reaction") == 0 && t != EVENT_REACTION)
		return fail_in(c, "disposition", EVENT_ERR_INVALID,
			       "The reaction disposition is only for a reaction event, and this is %s %s.",
			       article(t), name);
	if (!carries_content && json_object_get(content, "parts"))
		return fail_in(c, "parts", EVENT_ERR_INVALID, "A %s event carries no parts.", name);
	if (t != EVENT_MESSAGE && t != EVENT_EDIT && ev->nattachments)
		return fail_in(c, "attachments", EVENT_ERR_INVALID, "A %s event carries no attachments.", name);

	switch (t) {
	case EVENT_MESSAGE:
		if (!ev->nparts && !ev->nattachments)
			return fail_in(c, "parts", EVENT_ERR_INVALID,
				       "A message needs at least one part or one attachment.");
		break;
	case EVENT_EDIT:
		if (!ev->replaces)
			return fail_in(c, "replaces", EVENT_ERR_INVALID,
				       "An edit needs replaces: the id of the message's first version.");
		if (!ev->nparts)
			return fail_in(c, "parts", EVENT_ERR_INVALID, "An edit needs at least one part.");
		break;
	case EVENT_DELETE:
		if (!ev->replaces)
			return fail_in(c, "replaces", EVENT_ERR_INVALID,
				       "A delete needs replaces: the id of the message or reaction it removes.");
		break;
	case EVENT_REACTION:
		if (!ev->in_reply_to)
			return fail_in(c, "in_reply_to", EVENT_ERR_INVALID,
				       "A reaction needs in_reply_to: the id of the message it reacts to.");
		if (!ev->disposition || strcmp(ev->disposition, "reaction") != 0)
			return fail_in(c, "disposition", EVENT_ERR_INVALID,
				       "A reaction needs the disposition \"reaction\".");
		if (ev->nparts != 1)
			return fail_in(c, "parts", EVENT_ERR_INVALID, "A reaction has exactly one part.");
		if (ev->body_bytes > EVENT_REACTION_MAX) {
			jptr_push(&c->ptr, "parts");
			jptr_push(&c->ptr, "0");
			return fail_in(c, "body", EVENT_ERR_TOO_LARGE, "A reaction's body is longer than %d bytes.",
				       EVENT_REACTION_MAX);
		}
		break;
	case EVENT_RECEIPT: {
		static const char *const kinds[] = { "delivered", "read" };
		int k;
		if (!ev->in_reply_to)
			return fail_in(c, "in_reply_to", EVENT_ERR_INVALID,
				       "A receipt needs in_reply_to: the id of the message it acknowledges.");
		if ((rc = enum_member(c, content, "receipt", kinds, 2, "delivered, read", &k)))
			return rc;
		ev->receipt = k == 0 ? EVENT_RECEIPT_DELIVERED : EVENT_RECEIPT_READ;
		break;
	}
	case EVENT_TYPING: {
		static const char *const states[] = { "start", "stop" };
		int k;
		if ((rc = enum_member(c, content, "state", states, 2, "start, stop", &k)))
			return rc;
		ev->typing = k == 0 ? EVENT_TYPING_START : EVENT_TYPING_STOP;
		break;
	}
	case EVENT_MEMBERSHIP: {
		static const char *const ms[] = { "join", "leave", "invite" };
		int k;
		if ((rc = enum_member(c, content, "membership", ms, 3, "join, leave, invite", &k)))
			return rc;
		ev->membership = (enum event_membership)(EVENT_MEMBERSHIP_JOIN + k);
		if ((rc = uri_member(c, content, "target", M_REQUIRED, MIMI_USER, &ev->target, &ev->has_target)))
			return rc;
		break;
	}
	case EVENT_BLOCK: {
		if ((rc = uri_member(c, content, "target", M_REQUIRED, MIMI_USER, &ev->target, &ev->has_target)))
			return rc;
		/* POST /v1/blocks's action, for a block sent as an event */
		static const char *const actions[] = { "block", "unblock" };
		int k = 0;
		if (json_object_get(content, "action") &&
		    (rc = enum_member(c, content, "action", actions, 2, "block, unblock", &k)))
			return rc;
		ev->unblock = k == 1;
		break;
	}
	}
	return CW_OK;
}

static cw_err check_content(struct vctx *c, json_t *content, struct event *ev)
{
	cw_err rc;
	if ((rc = check_parts(c, content, ev)) || (rc = check_attachments(c, content, ev)) ||
	    (rc = msgid_member(c, content, "in_reply_to", &ev->in_reply_to)) ||
	    (rc = msgid_member(c, content, "replaces", &ev->replaces)) ||
	    (rc = string_member(c, content, "topic", M_NULLABLE, EVENT_TOPIC_MAX, &ev->topic)) ||
	    (rc = ts_member(c, content, "expires", M_NULLABLE, EVENT_EXPIRES_LIMIT, "10^15", &ev->expires)))
		return rc;
	json_t *v;
	jptr_mark m;
	if ((rc = member(c, content, "disposition", JSON_STRING, 0, &v, &m)))
		return rc;
	if (v) {
		size_t k = 0;
		while (k < CW_ARRAY_LEN(dispositions) && strcmp(json_string_value(v), dispositions[k]) != 0)
			k++;
		if (k == CW_ARRAY_LEN(dispositions))
			return vfail(c, EVENT_ERR_INVALID, "disposition must be one of: " DISPOSITIONS_TEXT ".");
		ev->disposition = json_string_value(v);
	}
	jptr_pop(&c->ptr, m);
	return check_type_rules(c, content, ev);
}

/* Validates one event object (root) into ev, without taking a reference. */
static cw_err check_event(struct vctx *c, json_t *root, unsigned flags, struct event *ev)
{
	if (!json_is_object(root))
		return vfail(c, EVENT_ERR_INVALID, "An event must be a JSON object, not %s.",
			     json_type_phrase(json_typeof(root)));
	c->stored = (flags & EVENT_STORED) != 0;
	c->counting = true;
	c->values = 0;
	cw_err rc = check_depth(c, root, 1);
	c->counting = false;
	if (rc)
		return rc;

	const char *type;
	if ((rc = string_member(c, root, "type", M_REQUIRED, SIZE_MAX, &type)))
		return rc;
	size_t t = 0;
	while (t < EVENT_TYPE_COUNT && strcmp(type, type_names[t]) != 0)
		t++;
	if (t == EVENT_TYPE_COUNT) {
		jptr_push(&c->ptr, "type");
		return vfail(c, EVENT_ERR_INVALID, "Unknown event type; type must be one of: " TYPES_TEXT ".");
	}
	ev->type = (enum event_type)t;

	if ((rc = uri_member(c, root, "sender", (flags & EVENT_REQUIRE_SENDER) ? M_REQUIRED : 0, MIMI_USER,
			     &ev->sender, &ev->has_sender)) ||
	    (rc = uri_member(c, root, "room", (flags & EVENT_REQUIRE_ROOM) ? M_REQUIRED : 0, MIMI_ROOM, &ev->room,
			     &ev->has_room)) ||
	    (rc = ts_member(c, root, "ts", 0, EVENT_TS_LIMIT, "2^53", &ev->ts)))
		return rc;
	if (c->lim->max_ts > 0 && ev->ts > c->lim->max_ts) {
		/* A time far ahead (up to 2^53: the year 287396) would be shown
		 * as the message's time by the local networks (Matrix's ?ts=)
		 * and sort it after everything to come. */
		jptr_push(&c->ptr, "ts");
		return vfail(c, EVENT_ERR_INVALID, "ts is more than a day ahead of this server's clock.");
	}

	json_t *content;
	jptr_mark m;
	if ((rc = member(c, root, "content", JSON_OBJECT, M_REQUIRED, &content, &m)))
		return rc;
	if ((rc = check_content(c, content, ev)))
		return rc;
	jptr_pop(&c->ptr, m);
	return CW_OK;
}

/* Parses body (len bytes, at most max) into *root; errors at pointer "". */
static cw_err load_json(struct vctx *c, const char *body, size_t len, size_t max, const char *what,
			json_t **root)
{
	*root = NULL;
	if (len > max)
		return vfail(c, EVENT_ERR_TOO_LARGE, "The %s is larger than %zu bytes.", what, max);
	if (!body || len == 0)
		return vfail(c, EVENT_ERR_INVALID, "The %s is empty.", what);
	if (memchr(body, '\0', len))
		return vfail(c, EVENT_ERR_INVALID, "The %s contains a NUL byte.", what);
	json_error_t je;
	*root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
	if (*root)
		return CW_OK;
	/* jansson's own text quotes the input ("near ..."): say it in our words. */
	switch (json_error_code(&je)) {
	case json_error_out_of_memory:
		snprintf(c->err->code, sizeof(c->err->code), "unavailable");
		snprintf(c->err->detail, sizeof(c->err->detail), "Out of memory while parsing the %s.", what);
		return CW_ENOMEM;
	case json_error_invalid_utf8:
		return vfail(c, EVENT_ERR_INVALID, "The %s is not valid UTF-8 (byte offset %d).", what, je.position);
	case json_error_null_character:
	case json_error_null_byte_in_key:
		return vfail(c, EVENT_ERR_INVALID, "A string in the %s contains \\u0000 (line %d, column %d).", what,
			     je.line, je.column);
	case json_error_duplicate_key:
		return vfail(c, EVENT_ERR_INVALID, "An object in the %s repeats a key (line %d, column %d).", what,
			     je.line, je.column);
	case json_error_numeric_overflow:
		return vfail(c, EVENT_ERR_INVALID, "A number in the %s is out of range (line %d, column %d).", what,
			     je.line, je.column);
	case json_error_stack_overflow:
		return vfail(c, EVENT_ERR_INVALID, "The %s nests objects and arrays too deeply.", what);
	case json_error_premature_end_of_input:
		return vfail(c, EVENT_ERR_INVALID, "The %s ends before its JSON text is complete.", what);
	case json_error_end_of_input_expected:
		return vfail(c, EVENT_ERR_INVALID, "The %s has more data after its JSON text (line %d, column %d).",
			     what, je.line, je.column);
	default:
		/* A \u escape of a surrogate alone (\uD800, or \uD800\u0041)
		 * is no character: jansson says so as a syntax error. */
		if (strncmp(je.text, "invalid Unicode", 15) == 0)
			return vfail(c, EVENT_ERR_INVALID,
				     "A string in the %s holds a \\u escape of a lone UTF-16 surrogate, which is no "
				     "character (line %d, column %d).", what, je.line, je.column);
		return vfail(c, EVENT_ERR_INVALID, "The %s is not valid JSON (line %d, column %d).", what, je.line,
			     je.column);
	}
}

cw_err event_parse(const char *body, size_t len, const struct event_limits *lim, unsigned flags,
		   struct event *out, struct event_error *err)
{
	struct vctx c;
	json_t *root;
	memset(out, 0, sizeof(*out));
	memset(err, 0, sizeof(*err));
	vctx_init(&c, lim, err);
	cw_err rc = load_json(&c, body, len, lim->max_event_bytes, "event body", &root);
	if (rc)
		return rc;
	rc = check_event(&c, root, flags, out);
	if (rc) {
		json_decref(root);
		memset(out, 0, sizeof(*out));
		return rc;
	}
	out->json = root;
	return CW_OK;
}

cw_err event_from_json(json_t *root, const struct event_limits *lim, unsigned flags, struct event *out,
		       struct event_error *err)
{
	char *text = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
	if (!text) {
		memset(out, 0, sizeof(*out));
		memset(err, 0, sizeof(*err));
		snprintf(err->code, sizeof(err->code), "unavailable");
		snprintf(err->detail, sizeof(err->detail), "Out of memory while serialising the event.");
		return CW_ENOMEM;
	}
	size_t len = strlen(text);
	cw_err rc;
	if (strstr(text, "\\u0000")) {
		/* A string holds a NUL (or the text "\u0000"): the parser
		 * tells them apart and says what is wrong. */
		rc = event_parse(text, len, lim, flags, out, err);
	} else {
		struct vctx c;
		memset(out, 0, sizeof(*out));
		memset(err, 0, sizeof(*err));
		vctx_init(&c, lim, err);
		if (len > lim->max_event_bytes)
			rc = vfail(&c, EVENT_ERR_TOO_LARGE, "The event body is larger than %zu bytes.", lim->max_event_bytes);
		else if ((rc = check_event(&c, root, flags, out)) == CW_OK)
			out->json = json_incref(root);
		if (rc)
			memset(out, 0, sizeof(*out));
	}
	if (rc) {
		free(text);
		return rc;
	}
	out->text = text;
	return CW_OK;
}

void event_free(struct event *ev)
{
	free(ev->text);
	json_decref(ev->json);
	memset(ev, 0, sizeof(*ev));
}

/* ================================================================ batches */

/* Members of obj other than skip must nest at most EVENT_MAX_DEPTH deep,
 * obj itself counting as 1. */
static cw_err check_other_depth(struct vctx *c, json_t *obj, const char *skip)
{
	const char *key;
	json_t *v;
	json_object_foreach(obj, key, v) {
		if (strcmp(key, skip) == 0)
			continue;
		jptr_mark m = jptr_push(&c->ptr, key);
		cw_err rc = check_depth(c, v, 2);
		if (rc)
			return rc;
		jptr_pop(&c->ptr, m);
	}
	return CW_OK;
}

static cw_err check_item(struct vctx *c, json_t *item, struct batch_item *it, const struct batch *b, size_t idx,
			 unsigned flags)
{
	if (!json_is_object(item))
		return vfail(c, EVENT_ERR_INVALID, "Each item of events must be an object with idempotency_key, room and event.");
	cw_err rc = check_other_depth(c, item, "event");
	if (rc)
		return rc;

	const char *key;
	if ((rc = string_member(c, item, "idempotency_key", M_REQUIRED, SIZE_MAX, &key)))
		return rc;
	jptr_mark km = jptr_push(&c->ptr, "idempotency_key");
	if (!idempotency_key_valid(key))
		return vfail(c, EVENT_ERR_INVALID, "idempotency_key must be 1 to %d of A-Z a-z 0-9 . _ : -.",
			     IDEMPOTENCY_KEY_MAX);
	/* The key is the item's from here on, refused or not: its result
	 * names it (a repeat's was null until the thirty-second session).
	 * Only a valid item holds its key for the rest of the batch: one
	 * refused here stores nothing, so its corrected copy under the same
	 * key is taken (until then it was refused as a repeat too). */
	snprintf(it->idempotency_key, sizeof(it->idempotency_key), "%s", key);
	for (size_t j = 0; j < idx; j++)
		if (b->items[j].rc == CW_OK && strcmp(b->items[j].idempotency_key, key) == 0)
			return vfail(c, EVENT_ERR_INVALID, "idempotency_key repeats the key of item %zu of this batch.", j);
	jptr_pop(&c->ptr, km);

	if ((rc = uri_member(c, item, "room", M_REQUIRED, MIMI_ROOM, &it->room, &it->has_room)))
		return rc;

	json_t *ev;
	jptr_mark m;
	if ((rc = member(c, item, "event", JSON_OBJECT, M_REQUIRED, &ev, &m)))
		return rc;
	/* Printed once, compact with sorted keys: its length is the size
	 * checked (the same as any compact print's), and the text is what the
	 * pipeline stores and hashes (ev.text). */
	char *text = json_dumps(ev, JSON_COMPACT | JSON_SORT_KEYS);
	if (!text) {
		snprintf(c->err->code, sizeof(c->err->code), "unavailable");
		snprintf(c->err->detail, sizeof(c->err->detail), "Out of memory while reading the batch.");
		return CW_ENOMEM;
	}
	if (strlen(text) > c->lim->max_event_bytes) {
		free(text);
		return vfail(c, EVENT_ERR_TOO_LARGE, "The event is larger than %zu bytes.", c->lim->max_event_bytes);
	}
	if ((rc = check_event(c, ev, flags, &it->ev))) {
		free(text);
		return rc;
	}
	if (it->ev.has_room && !mimi_uri_equal(&it->ev.room, &it->room)) {
		free(text);
		jptr_push(&c->ptr, "room");
		return vfail(c, EVENT_ERR_INVALID, "The event's room differs from the item's room.");
	}
	it->ev.json = json_incref(ev);
	it->ev.text = text;
	jptr_pop(&c->ptr, m);
	return CW_OK;
}

cw_err batch_parse(const char *body, size_t len, const struct event_limits *lim, unsigned flags,
		   struct batch *out, struct event_error *err)
{
	struct vctx c;
	json_t *root;
	memset(out, 0, sizeof(*out));
	memset(err, 0, sizeof(*err));
	vctx_init(&c, lim, err);
	cw_err rc = load_json(&c, body, len, lim->max_batch_bytes, "batch body", &root);
	if (rc)
		return rc;
	if (!json_is_object(root)) {
		rc = vfail(&c, EVENT_ERR_INVALID, "A batch must be a JSON object with an events array.");
		goto fail;
	}
	if ((rc = check_other_depth(&c, root, "events")))
		goto fail;
	json_t *events;
	jptr_mark m;
	if ((rc = member(&c, root, "events", JSON_ARRAY, M_REQUIRED, &events, &m)))
		goto fail;
	size_t n = json_array_size(events);
	if (n == 0) {
		rc = vfail(&c, EVENT_ERR_INVALID, "events must hold at least one event.");
		goto fail;
	}
	if (n > lim->max_batch) {
		rc = vfail(&c, EVENT_ERR_TOO_LARGE, "events holds more than %zu events.", lim->max_batch);
		goto fail;
	}
	out->items = calloc(n, sizeof(*out->items));
	if (!out->items) {
		snprintf(err->code, sizeof(err->code), "unavailable");
		snprintf(err->detail, sizeof(err->detail), "Out of memory while parsing the batch body.");
		rc = CW_ENOMEM;
		goto fail;
	}
	out->json = root;
	out->n = n;
	for (size_t i = 0; i < n; i++) {
		struct batch_item *it = &out->items[i];
		struct vctx ic;
		vctx_init(&ic, lim, &it->err);
		jptr_push(&ic.ptr, "events");
		jptr_push_index(&ic.ptr, i);
		it->rc = check_item(&ic, json_array_get(events, i), it, out, i, flags);
		if (it->rc) {
			memset(&it->ev, 0, sizeof(it->ev)); /* holds no reference: taken last */
			out->nfailed++;
		}
	}
	return CW_OK;

fail:
	json_decref(root);
	free(out->items);
	memset(out, 0, sizeof(*out));
	return rc;
}

void batch_free(struct batch *b)
{
	for (size_t i = 0; i < b->n; i++)
		event_free(&b->items[i].ev);
	free(b->items);
	json_decref(b->json);
	memset(b, 0, sizeof(*b));
}

json_t *event_label(json_t *ev, const char *text, const char *html)
{
	const char *type = json_string_value(json_object_get(ev, "type"));
	json_t *parts = json_object_get(json_object_get(ev, "content"), "parts");
	if (!type || (strcmp(type, "message") != 0 && strcmp(type, "edit") != 0) || !json_array_size(parts))
		return json_incref(ev);
	json_t *copy = json_deep_copy(ev);
	if (!copy)
		return json_incref(ev);
	size_t i;
	json_t *p;
	json_array_foreach(json_object_get(json_object_get(copy, "content"), "parts"), i, p) {
		const char *pt = json_string_value(json_object_get(p, "type"));
		const char *body = json_string_value(json_object_get(p, "body"));
		if (!pt || !body || strncmp(pt, "text/", 5) != 0)
			continue;
		const char *label = strcmp(pt, "text/html") == 0 ? html : text;
		size_t n = strlen(label) + strlen(body) + 1;
		char *t = malloc(n);
		if (t) {
			snprintf(t, n, "%s%s", label, body);
			json_object_set_new(p, "body", json_string(t));
			free(t);
		}
	}
	return copy;
}

/* The rule of a peer's name (event.h). */
bool peer_name_valid(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n > 32)
		return false;
	for (size_t i = 0; i < n; i++) {
		char ch = s[i];
		bool ok = (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || (i > 0 && (ch == '_' || ch == '-'));
		if (!ok)
			return false;
	}
	return true;
}
