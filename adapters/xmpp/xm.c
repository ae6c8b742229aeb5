/* XMPP <message/> stanzas <-> neutral events (see xm.h). */
#include "config.h"
#include "xmpp/xm.h"
#include "xmpp/xj.h"
#include "peer/event.h"
#include "utf8.h"
#include "buf.h"
#include "html.h"

#include <libxml/HTMLparser.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NS_REPLY      "urn:xmpp:reply:0"
#define NS_FALLBACK   "urn:xmpp:fallback:0"
#define NS_CORRECT    "urn:xmpp:message-correct:0"
#define NS_RETRACT    "urn:xmpp:message-retract:1"
#define NS_RETRACT0   "urn:xmpp:message-retract:0"
#define NS_FASTEN     "urn:xmpp:fasten:0"
#define NS_REACTIONS  "urn:xmpp:reactions:0"
#define NS_RECEIPTS   "urn:xmpp:receipts"
#define NS_MARKERS    "urn:xmpp:chat-markers:0"
#define NS_CHATSTATES "http://jabber.org/protocol/chatstates"
#define NS_SID        "urn:xmpp:sid:0"
#define NS_OOB        "jabber:x:oob"
#define NS_HINTS      "urn:xmpp:hints"

#define BODY_MAX (16 * 1024)   /* bytes of an inbound <body> */
#define KEYS_MAX 32            /* <reaction> elements read, keys written */
#define RECEIPTS_MAX 8         /* receipt and marker elements read */
#define RANGES_MAX 16          /* fallback <body/> ranges read */
#define QUOTE_MAX 200          /* bytes of a quoted target */
#define HTML_MAX (1024 * 1024) /* bytes of HTML turned into text */
/* Room left in an event for the sender and room URIs the caller adds. */
#define ENVELOPE_RESERVE (2 * MIMI_URI_MAX + 64)

static const char RETRACT_TEXT[] = "The sender retracted a previous message.";
static const char CORRECTION[] = "Correction: ";

/* ------------------------------------------------------------ small helpers */

__attribute__((format(printf, 3, 4)))
static void say(char *why, size_t whylen, const char *fmt, ...)
{
	if (!why || !whylen)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, whylen, fmt, ap);
	va_end(ap);
}

static bool eq(const char *a, const char *b)
{
	return a && b && strcmp(a, b) == 0;
}

/* An id the adapter stores and writes back into attributes: 1..XM_ID_MAX
 * bytes of UTF-8 without control characters (nor U+FFFE, U+FFFF). */
static bool id_ok(const char *s)
{
	if (!s)
		return false;
	size_t n = strnlen(s, XM_ID_MAX + 1);
	if (n == 0 || n > XM_ID_MAX)
		return false;
	const unsigned char *p = (const unsigned char *)s;
	while (n) {
		unsigned cp;
		size_t l = cw_utf8_seq(p, n, &cp);
		if (!l || cp < 0x20 || cp == 0x7F || cp == 0xFFFE || cp == 0xFFFF)
			return false;
		p += l;
		n -= l;
	}
	return true;
}

/* (xm.h.)  CR LF and lone CR become LF as an XML parser makes them, which
 * would move the fallback offsets otherwise. */
char *xm_xml_text(const char *s)
{
	size_t n = strlen(s);
	char *out = malloc(n * 3 + 1);
	if (!out)
		return NULL;
	size_t o = 0;
	const unsigned char *p = (const unsigned char *)s;
	while (n) {
		unsigned cp;
		size_t l = cw_utf8_seq(p, n, &cp);
		if (l == 1 && cp == '\r') {
			out[o++] = '\n';
			if (n > 1 && p[1] == '\n')
				l = 2;
		} else if (!l || (cp < 0x20 && cp != '\t' && cp != '\n') || cp == 0xFFFE || cp == 0xFFFF) {
			memcpy(out + o, "\xEF\xBF\xBD", 3);
			o += 3;
			l = l ? l : 1;
		} else {
			memcpy(out + o, p, l);
			o += l;
		}
		p += l;
		n -= l;
	}
	out[o] = '\0';
	return out;
}

/* The text of a stanza (its text children), malloc'd; NULL when it has none. */
static char *text_of(xmpp_stanza_t *st)
{
	char *t = xmpp_stanza_get_text(st);
	if (!t)
		return NULL;
	char *copy = strdup(t);
	xmpp_free(xmpp_stanza_get_context(st), t);
	return copy;
}

/* The namespaces a <message/>'s own children (body) may have. */
static bool content_ns(const char *ns)
{
	return !ns || strcmp(ns, "jabber:client") == 0 || strcmp(ns, "jabber:server") == 0 ||
	       strcmp(ns, "jabber:component:accept") == 0;
}

/* The first child element name in ns (NULL: a content namespace). */
static xmpp_stanza_t *child(xmpp_stanza_t *st, const char *name, const char *ns)
{
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); c; c = xmpp_stanza_get_next(c)) {
		if (!xmpp_stanza_is_tag(c) || !eq(xmpp_stanza_get_name(c), name))
			continue;
		const char *cns = xmpp_stanza_get_ns(c);
		if (ns ? eq(cns, ns) : content_ns(cns))
			return c;
	}
	return NULL;
}

/* Whether c is an element name of the extension ns (given, or inherited:
 * no xmlns of its own, as in a stanza built by hand). */
static bool inner(xmpp_stanza_t *c, const char *name, const char *ns)
{
	const char *cns = xmpp_stanza_get_ns(c);
	return xmpp_stanza_is_tag(c) && eq(xmpp_stanza_get_name(c), name) && (!cns || strcmp(cns, ns) == 0);
}

static xmpp_stanza_t *inner_child(xmpp_stanza_t *st, const char *name, const char *ns)
{
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); c; c = xmpp_stanza_get_next(c))
		if (inner(c, name, ns))
			return c;
	return NULL;
}

/* The id attribute when it is one the adapter stores, else NULL. */
static const char *id_attr(xmpp_stanza_t *st)
{
	const char *id = st ? xmpp_stanza_get_attribute(st, "id") : NULL;
	return id_ok(id) ? id : NULL;
}

/* The <apply-to xmlns='urn:xmpp:fasten:0'> that carries an old-style
 * retraction, or NULL. */
static xmpp_stanza_t *fastened_retract(xmpp_stanza_t *msg)
{
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(msg); c; c = xmpp_stanza_get_next(c))
		if (xmpp_stanza_is_tag(c) && eq(xmpp_stanza_get_name(c), "apply-to") && eq(xmpp_stanza_get_ns(c), NS_FASTEN) &&
		    child(c, "retract", NS_RETRACT0))
			return c;
	return NULL;
}

enum receipt_kind { RK_NONE, RK_DELIVERED, RK_READ };

static enum receipt_kind receipt_kind(xmpp_stanza_t *c)
{
	if (!xmpp_stanza_is_tag(c))
		return RK_NONE;
	const char *name = xmpp_stanza_get_name(c), *ns = xmpp_stanza_get_ns(c);
	if (eq(name, "received") && (eq(ns, NS_RECEIPTS) || eq(ns, NS_MARKERS)))
		return RK_DELIVERED;
	if ((eq(name, "displayed") || eq(name, "acknowledged")) && eq(ns, NS_MARKERS))
		return RK_READ;
	return RK_NONE;
}

/* ------------------------------------------------------------ ids */

void xm_message_ids(xmpp_stanza_t *msg, char id[XM_ID_MAX + 1], char origin_id[XM_ID_MAX + 1])
{
	id[0] = origin_id[0] = '\0';
	if (!msg)
		return;
	const char *v = id_attr(msg);
	if (v)
		memcpy(id, v, strlen(v) + 1);
	v = id_attr(child(msg, "origin-id", NS_SID));
	if (v)
		memcpy(origin_id, v, strlen(v) + 1);
}

static void add_ref(const char **ids, size_t *n, size_t max, const char *id)
{
	if (!id || *n >= max)
		return;
	for (size_t i = 0; i < *n; i++)
		if (strcmp(ids[i], id) == 0)
			return;
	ids[(*n)++] = id;
}

size_t xm_message_refs(xmpp_stanza_t *msg, const char **ids, size_t max)
{
	size_t n = 0;
	if (!msg || !ids)
		return 0;
	add_ref(ids, &n, max, id_attr(child(msg, "retract", NS_RETRACT)));
	add_ref(ids, &n, max, id_attr(fastened_retract(msg)));
	add_ref(ids, &n, max, id_attr(child(msg, "reactions", NS_REACTIONS)));
	add_ref(ids, &n, max, id_attr(child(msg, "replace", NS_CORRECT)));
	add_ref(ids, &n, max, id_attr(child(msg, "reply", NS_REPLY)));
	int seen = 0;
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(msg); c && seen < RECEIPTS_MAX; c = xmpp_stanza_get_next(c)) {
		if (receipt_kind(c) == RK_NONE)
			continue;
		seen++;
		add_ref(ids, &n, max, id_attr(c));
	}
	return n;
}

/* ------------------------------------------------------------ XMPP -> neutral */

struct in {
	const struct xm_in_lookup *l;
	int64_t ts;
	json_t *list;
	bool oom, too_large;
	bool long_reaction; /* a <reaction/> longer than EVENT_REACTION_MAX: the stanza is refused */
	const char *reason; /* why nothing came out, the first reason */
};

static void note(struct in *in, const char *reason)
{
	if (!in->reason)
		in->reason = reason;
}

/* The neutral message id of an XMPP id, copied into buf, or NULL. */
static const char *lookup_msg(const struct xm_in_lookup *l, const char *xmpp_id, char *buf, size_t size)
{
	if (!l || !l->to_msg || !id_ok(xmpp_id))
		return NULL;
	const char *r = l->to_msg(l->ctx, xmpp_id);
	if (!r || !message_id_valid(r) || strlen(r) >= size)
		return NULL;
	memcpy(buf, r, strlen(r) + 1);
	return buf;
}

/* Appends {type, ts, content} (content is stolen). */
static void push(struct in *in, const char *type, json_t *content)
{
	json_t *ev = content ? json_object() : NULL;
	if (!ev || json_object_set_new(ev, "type", json_string(type)) ||
	    (in->ts > 0 && in->ts < EVENT_TS_LIMIT && json_object_set_new(ev, "ts", json_integer(in->ts)))) {
		json_decref(content);
		json_decref(ev);
		in->oom = true;
		return;
	}
	if (json_object_set_new(ev, "content", content)) { /* stolen even on failure */
		json_decref(ev);
		in->oom = true;
		return;
	}
	/* Bodies whose characters JSON escapes at length (controls: six bytes
	 * each) could make an event longer than the API takes. */
	char *text = json_dumps(ev, JSON_COMPACT);
	if (!text) {
		json_decref(ev);
		in->oom = true;
		return;
	}
	size_t len = strlen(text);
	free(text);
	if (len > event_limits_default().max_event_bytes - ENVELOPE_RESERVE) {
		json_decref(ev);
		in->too_large = true;
		return;
	}
	if (json_array_append_new(in->list, ev))
		in->oom = true;
}

static json_t *text_parts(const char *text)
{
	return json_pack("[{s:s, s:s}]", "type", "text/plain", "body", text);
}

/* XEP-0424, either form; the first known target wins. */
static void in_retract(struct in *in, xmpp_stanza_t *msg)
{
	char buf[EVENT_OPAQUE_ID_MAX + 8];
	const char *target = lookup_msg(in->l, id_attr(child(msg, "retract", NS_RETRACT)), buf, sizeof(buf));
	if (!target)
		target = lookup_msg(in->l, id_attr(fastened_retract(msg)), buf, sizeof(buf));
	if (!target) {
		note(in, "the retraction is of a message the gateway does not know");
		return;
	}
	push(in, "delete", json_pack("{s:s}", "replaces", target));
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* XEP-0444: the difference between the stanza's set and the stored one. */
static void in_reactions(struct in *in, xmpp_stanza_t *r)
{
	/* A key longer than the neutral model takes is this gateway's
	 * restriction, and XEP-0444 §4.3 has an entity with one answer the
	 * payload with not-acceptable (its client then puts its reactions
	 * back as they were): the whole stanza is refused, whatever it
	 * reacts to.  Until the thirty-seventh session such a key was left
	 * out silently, and the user's client showed a reaction nobody got. */
	size_t read = 0;
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(r); c && read < KEYS_MAX; c = xmpp_stanza_get_next(c)) {
		if (!inner(c, "reaction", NS_REACTIONS))
			continue;
		read++;
		char *k = text_of(c); /* NULL: empty (left out below), or no memory */
		if (k && strlen(k) > EVENT_REACTION_MAX)
			in->long_reaction = true;
		free(k);
	}
	if (in->long_reaction)
		return;
	char buf[EVENT_OPAQUE_ID_MAX + 8];
	const char *target = lookup_msg(in->l, id_attr(r), buf, sizeof(buf));
	if (!target) {
		note(in, "the reactions are to a message the gateway does not know");
		return;
	}
	const json_t *stored = in->l->reactions ? in->l->reactions(in->l->ctx, target) : NULL;
	if (!json_is_object(stored))
		stored = NULL;
	char *keys[KEYS_MAX];
	size_t nkeys = 0, seen = 0;
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(r); c && seen < KEYS_MAX; c = xmpp_stanza_get_next(c)) {
		if (!inner(c, "reaction", NS_REACTIONS))
			continue;
		seen++;
		char *k = text_of(c);
		bool keep = k && *k && strlen(k) <= EVENT_REACTION_MAX && cw_utf8_valid(k, strlen(k));
		for (size_t i = 0; keep && i < nkeys; i++)
			keep = strcmp(keys[i], k) != 0;
		if (keep)
			keys[nkeys++] = k;
		else
			free(k);
	}
	size_t before = json_array_size(in->list);
	for (size_t i = 0; i < nkeys; i++) {
		if (stored && json_object_get(stored, keys[i]))
			continue;
		push(in, "reaction",
		     json_pack("{s:o, s:s, s:s}", "parts", text_parts(keys[i]), "disposition", "reaction", "in_reply_to",
			       target));
	}
	/* Deletes: stored keys no longer in the set, sorted by key. */
	size_t ns = stored ? json_object_size(stored) : 0;
	const char **gone = ns ? malloc(ns * sizeof(*gone)) : NULL;
	size_t ngone = 0;
	if (ns && !gone)
		in->oom = true;
	if (gone) {
		const char *k;
		json_t *v;
		json_object_foreach((json_t *)stored, k, v) {
			bool present = false;
			for (size_t i = 0; i < nkeys && !present; i++)
				present = strcmp(keys[i], k) == 0;
			if (!present && json_is_string(v) && message_id_valid(json_string_value(v)))
				gone[ngone++] = k;
		}
		qsort(gone, ngone, sizeof(*gone), cmp_str);
		for (size_t i = 0; i < ngone; i++)
			push(in, "delete",
			     json_pack("{s:s}", "replaces", json_string_value(json_object_get(stored, gone[i]))));
		free(gone);
	}
	for (size_t i = 0; i < nkeys; i++)
		free(keys[i]);
	if (json_array_size(in->list) == before)
		note(in, "the reactions are unchanged");
}

/* A decimal offset of at most 9 digits, or -1. */
static long offset(const char *s)
{
	if (!s || !*s || strlen(s) > 9)
		return -1;
	long v = 0;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		v = v * 10 + (*s - '0');
	}
	return v;
}

/* Removes the XEP-0428 fallback for ns from text (valid UTF-8), in place.
 * Nothing is removed when a range is invalid or when nothing would remain. */
static void strip_fallback(xmpp_stanza_t *msg, const char *ns, char *text)
{
	long range[RANGES_MAX][2];
	size_t nr = 0;
	long total = (long)cw_utf8_count(text);
	for (xmpp_stanza_t *f = xmpp_stanza_get_children(msg); f; f = xmpp_stanza_get_next(f)) {
		if (!xmpp_stanza_is_tag(f) || !eq(xmpp_stanza_get_name(f), "fallback") || !eq(xmpp_stanza_get_ns(f), NS_FALLBACK) ||
		    !eq(xmpp_stanza_get_attribute(f, "for"), ns))
			continue;
		bool has_part = false;
		for (xmpp_stanza_t *b = xmpp_stanza_get_children(f); b; b = xmpp_stanza_get_next(b)) {
			bool body = inner(b, "body", NS_FALLBACK);
			if (!body && !inner(b, "subject", NS_FALLBACK))
				continue;
			has_part = true;
			if (!body)
				continue;
			const char *s = xmpp_stanza_get_attribute(b, "start"), *e = xmpp_stanza_get_attribute(b, "end");
			long start = s || e ? offset(s) : 0, end = s || e ? offset(e) : total;
			if (start < 0 || end < 0 || start > end || end > total || nr == RANGES_MAX)
				return;
			range[nr][0] = start;
			range[nr][1] = end;
			nr++;
		}
		if (!has_part) { /* a <fallback/> without children: the whole body */
			if (nr == RANGES_MAX)
				return;
			range[nr][0] = 0;
			range[nr][1] = total;
			nr++;
		}
	}
	if (!nr)
		return;
	/* Whether anything remains: a body that is all fallback is kept. */
	bool any = false;
	for (long i = 0; i < total && !any; i++) {
		bool drop = false;
		for (size_t r = 0; r < nr && !drop; r++)
			drop = i >= range[r][0] && i < range[r][1];
		any = !drop;
	}
	if (!any)
		return;
	size_t o = 0;
	long i = 0;
	for (size_t p = 0; text[p]; i++) {
		size_t l = cw_utf8_prefix(text + p, 1, NULL);
		bool drop = false;
		for (size_t r = 0; r < nr && !drop; r++)
			drop = i >= range[r][0] && i < range[r][1];
		if (!drop) {
			memmove(text + o, text + p, l);
			o += l;
		}
		p += l;
	}
	text[o] = '\0';
}

/* XEP-0066 OOB urls as attachments (NULL when there are none). */
static json_t *oob_attachments(xmpp_stanza_t *msg)
{
	json_t *list = NULL;
	size_t seen = 0;
	size_t max = event_limits_default().max_attachments;
	for (xmpp_stanza_t *x = xmpp_stanza_get_children(msg); x && seen < max; x = xmpp_stanza_get_next(x)) {
		if (!xmpp_stanza_is_tag(x) || !eq(xmpp_stanza_get_name(x), "x") || !eq(xmpp_stanza_get_ns(x), NS_OOB))
			continue;
		seen++;
		xmpp_stanza_t *u = inner_child(x, "url", NS_OOB);
		char *url = u ? text_of(u) : NULL;
		if (!url)
			continue;
		/* surrounding white space is not part of the URL */
		char *s = url;
		while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
			s++;
		size_t n = strlen(s);
		while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r'))
			s[--n] = '\0';
		bool dup = false;
		size_t i;
		json_t *a;
		json_array_foreach(list, i, a)
			dup |= eq(json_string_value(json_object_get(a, "url")), s);
		/* An https URL event_parse takes: one with a user or password
		 * (which whoever fetches the file would send) stays in the
		 * text alone, as other URLs that are no attachment. */
		if (strncmp(s, "https://", 8) == 0 && event_url_valid(s) && !dup) {
			if (!list)
				list = json_array();
			/* No size: XEP-0066 says none, and an attachment without one
			 * is of unknown size (until the thirty-second session it
			 * said 0, and peers were told the file was empty). */
			json_array_append_new(list, json_pack("{s:s, s:s}", "content_type", "application/octet-stream",
							      "url", s));
		}
		free(url);
	}
	return list;
}

/* <body> (with <replace>, <reply>, OOB): an edit or a message. */
static void in_body(struct in *in, xmpp_stanza_t *msg, char *text)
{
	char ebuf[EVENT_OPAQUE_ID_MAX + 8], rbuf[EVENT_OPAQUE_ID_MAX + 8];
	const char *edit = lookup_msg(in->l, id_attr(child(msg, "replace", NS_CORRECT)), ebuf, sizeof(ebuf));
	const char *reply = lookup_msg(in->l, id_attr(child(msg, "reply", NS_REPLY)), rbuf, sizeof(rbuf));
	if (text && reply)
		strip_fallback(msg, NS_REPLY, text);
	if (edit) {
		if (!text) {
			note(in, "the correction has no body");
			return;
		}
		push(in, "edit", json_pack("{s:o, s:s}", "parts", text_parts(text), "replaces", edit));
		return;
	}
	json_t *content = json_object();
	json_t *atts = oob_attachments(msg);
	if (!content) {
		json_decref(atts);
		in->oom = true;
		return;
	}
	if (text)
		json_object_set_new(content, "parts", text_parts(text));
	if (reply)
		json_object_set_new(content, "in_reply_to", json_string(reply));
	if (atts)
		json_object_set_new(content, "attachments", atts);
	/* XEP-0201: the thread the message belongs to is MIMI's topic.  A
	 * malformed one (too long, not UTF-8) is metadata not worth refusing
	 * the message for: left out. */
	xmpp_stanza_t *th = child(msg, "thread", NULL);
	char *topic = th ? text_of(th) : NULL;
	if (topic && *topic && strlen(topic) <= EVENT_TOPIC_MAX && cw_utf8_valid(topic, strlen(topic)))
		json_object_set_new(content, "topic", json_string(topic));
	free(topic);
	if (!text && !atts) {
		json_decref(content);
		note(in, "the message has no text and no usable attachment");
		return;
	}
	push(in, "message", content);
}

/* XEP-0184 receipts and XEP-0333 markers, in document order. */
static void in_receipts(struct in *in, xmpp_stanza_t *msg)
{
	char done[RECEIPTS_MAX][EVENT_OPAQUE_ID_MAX + 8];
	enum receipt_kind kinds[RECEIPTS_MAX];
	size_t ndone = 0, seen = 0;
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(msg); c && seen < RECEIPTS_MAX; c = xmpp_stanza_get_next(c)) {
		enum receipt_kind k = receipt_kind(c);
		if (k == RK_NONE)
			continue;
		seen++;
		char buf[EVENT_OPAQUE_ID_MAX + 8];
		const char *target = lookup_msg(in->l, id_attr(c), buf, sizeof(buf));
		if (!target) {
			note(in, "the receipt is for a message the gateway does not know");
			continue;
		}
		bool dup = false;
		for (size_t i = 0; i < ndone && !dup; i++)
			dup = kinds[i] == k && strcmp(done[i], target) == 0;
		if (dup)
			continue;
		kinds[ndone] = k;
		memcpy(done[ndone++], target, strlen(target) + 1);
		push(in, "receipt",
		     json_pack("{s:s, s:s}", "receipt", k == RK_DELIVERED ? "delivered" : "read", "in_reply_to", target));
	}
}

static bool in_chat_state(struct in *in, xmpp_stanza_t *msg)
{
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(msg); c; c = xmpp_stanza_get_next(c)) {
		if (!xmpp_stanza_is_tag(c) || !eq(xmpp_stanza_get_ns(c), NS_CHATSTATES))
			continue;
		const char *n = xmpp_stanza_get_name(c);
		const char *state = eq(n, "composing") ? "start"
				    : eq(n, "paused") || eq(n, "active") || eq(n, "inactive") || eq(n, "gone") ? "stop"
				    : NULL;
		if (state) {
			push(in, "typing", json_pack("{s:s}", "state", state));
			return true;
		}
	}
	return false;
}

enum xm_in_result xm_to_neutral(xmpp_stanza_t *msg, const struct xm_in_lookup *l, int64_t ts, json_t **out,
				char *why, size_t whylen)
{
	if (why && whylen)
		why[0] = '\0';
	if (out)
		*out = NULL;
	if (!msg || !out || !xmpp_stanza_is_tag(msg) || !eq(xmpp_stanza_get_name(msg), "message")) {
		say(why, whylen, "not a <message/> stanza");
		return XM_IN_INVALID;
	}
	const char *type = xmpp_stanza_get_type(msg);
	if (eq(type, "error") || eq(type, "headline")) {
		say(why, whylen, "messages of type error and headline are not carried");
		return XM_IN_IGNORE;
	}
	/* The body first: a malformed one refuses the whole stanza. */
	xmpp_stanza_t *body = child(msg, "body", NULL);
	char *text = body ? text_of(body) : NULL;
	if (text && strlen(text) > BODY_MAX) {
		free(text);
		say(why, whylen, "the text is longer than %d bytes", BODY_MAX);
		return XM_IN_TOO_LONG;
	}
	if (text && !cw_utf8_valid(text, strlen(text))) {
		free(text);
		say(why, whylen, "the body is not valid UTF-8");
		return XM_IN_INVALID;
	}
	if (text && !*text) {
		free(text);
		text = NULL;
	}
	struct in in = { .l = l, .ts = ts, .list = json_array() };
	if (!in.list) {
		free(text);
		say(why, whylen, "out of memory");
		return XM_IN_INVALID;
	}
	xmpp_stanza_t *reactions = child(msg, "reactions", NS_REACTIONS);
	bool retract = child(msg, "retract", NS_RETRACT) || fastened_retract(msg);
	bool oob = child(msg, "x", NS_OOB) != NULL;
	bool replace = child(msg, "replace", NS_CORRECT) != NULL;
	if (retract)
		in_retract(&in, msg);
	else if (reactions)
		in_reactions(&in, reactions);
	else if (text || oob)
		in_body(&in, msg, text);
	else if (replace)
		note(&in, "the correction has no body");
	free(text);
	bool receipts = false;
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(msg); c && !receipts; c = xmpp_stanza_get_next(c))
		receipts = receipt_kind(c) != RK_NONE;
	if (receipts)
		in_receipts(&in, msg);
	/* A chat state only counts in a stanza that carries nothing else. */
	if (!body && !retract && !reactions && !oob && !replace && !receipts && !in_chat_state(&in, msg))
		note(&in, "the stanza carries nothing the gateway maps");
	if (in.oom || in.too_large || in.long_reaction) {
		json_decref(in.list);
		if (in.oom)
			say(why, whylen, "out of memory");
		else if (in.long_reaction)
			say(why, whylen, "a reaction is at most %d bytes (a single emoji)", EVENT_REACTION_MAX);
		else
			say(why, whylen, "the message is too large for a neutral event");
		return in.oom ? XM_IN_INVALID : XM_IN_TOO_LONG;
	}
	if (json_array_size(in.list) == 0) {
		json_decref(in.list);
		say(why, whylen, "%s", in.reason ? in.reason : "the stanza carries nothing the gateway maps");
		return XM_IN_IGNORE;
	}
	*out = in.list;
	return XM_IN_OK;
}

/* ------------------------------------------------------------ HTML */

static pthread_once_t xml_once = PTHREAD_ONCE_INIT;

static void xml_init(void)
{
	xmlInitParser();
}

/* libxml2's tree of the n bytes of html, or NULL (*oom set when the
 * parser could not be made; a parser that made no document is taken as
 * none). */
static htmlDocPtr html_parse(const char *html, size_t n, bool *oom)
{
	/* Deep inputs are parsed whole (the walk does not recurse). */
	htmlParserCtxtPtr ctxt = cw_html_context(html, n, HTML_PARSE_NOERROR | HTML_PARSE_NOWARNING | HTML_PARSE_NONET |
							       HTML_PARSE_NODEFDTD | HTML_PARSE_IGNORE_ENC);
	if (!ctxt) {
		*oom = true;
		return NULL;
	}
	cw_html_parse(ctxt);
	htmlDocPtr doc = ctxt->myDoc;
	ctxt->myDoc = NULL;
	htmlFreeParserCtxt(ctxt);
	return doc;
}

/* The text of an HTML fragment or document as a reader of plain text
 * expects it (cw_html_text, docs/xmpp.md "Mapping"), at most HTML_MAX
 * bytes.  malloc'd, NULL when there is none, or when memory ran out (*oom
 * set). */
static char *html_text(const char *html, bool *oom)
{
	size_t n = strlen(html);
	if (n == 0 || n > HTML_MAX)
		return NULL;
	pthread_once(&xml_once, xml_init);
	htmlDocPtr doc = html_parse(html, n, oom);
	if (!doc)
		return NULL;
	char *s = cw_html_text(doc, NULL, HTML_MAX);
	xmlFreeDoc(doc);
	if (!s)
		*oom = true;
	if (s && !*s) {
		free(s);
		s = NULL;
	}
	return s;
}

/* ------------------------------------------------------------ neutral -> XMPP */

struct ob {
	xmpp_ctx_t *ctx;
	xmpp_stanza_t *msg;
	bool oom;
};

/* A new child element of parent (NULL after a failure). */
static xmpp_stanza_t *el(struct ob *b, xmpp_stanza_t *parent, const char *name, const char *ns)
{
	if (b->oom || !parent)
		return NULL;
	xmpp_stanza_t *e = xmpp_stanza_new(b->ctx);
	if (!e || xmpp_stanza_set_name(e, name) != XMPP_EOK || (ns && xmpp_stanza_set_ns(e, ns) != XMPP_EOK) ||
	    xmpp_stanza_add_child_ex(parent, e, 0) != XMPP_EOK) {
		if (e)
			xmpp_stanza_release(e);
		b->oom = true;
		return NULL;
	}
	return e;
}

static void set_attr(struct ob *b, xmpp_stanza_t *e, const char *name, const char *value)
{
	if (e && xmpp_stanza_set_attribute(e, name, value) != XMPP_EOK)
		b->oom = true;
}

/* <name xmlns=ns>text</name> (text already XML-safe). */
static void text_el(struct ob *b, xmpp_stanza_t *parent, const char *name, const char *ns, const char *text)
{
	xmpp_stanza_t *e = el(b, parent, name, ns);
	if (!e)
		return;
	xmpp_stanza_t *t = xmpp_stanza_new(b->ctx);
	if (!t || xmpp_stanza_set_text(t, text) != XMPP_EOK || xmpp_stanza_add_child_ex(e, t, 0) != XMPP_EOK) {
		if (t)
			xmpp_stanza_release(t);
		b->oom = true;
	}
}

static void id_el(struct ob *b, const char *name, const char *ns, const char *id)
{
	set_attr(b, el(b, b->msg, name, ns), "id", id);
}

/* The XMPP id a reply or a reaction names: the origin-id, else the id. */
static const char *ref_id(const struct xm_target *t)
{
	return id_ok(t->origin_id) ? t->origin_id : t->id;
}

static bool target_ok(const struct xm_target *t)
{
	return t->known && id_ok(t->id);
}

static const char *str_member(const json_t *o, const char *k)
{
	return json_string_value(json_object_get(o, k));
}

/* The text of a neutral content as XMPP shows it: text/plain, else
 * text/markdown, else the text of text/html; XML-safe, malloc'd ("" when
 * there is none, NULL without memory).  A message's body is made of it,
 * and so is a reply's quote of that message (since the twenty-ninth
 * session: before, the quote was of a text/plain part only). */
static char *neutral_text(const json_t *content)
{
	const char *plain = NULL, *md = NULL, *html = NULL;
	size_t i;
	json_t *p;
	json_array_foreach(json_object_get(content, "parts"), i, p) {
		const char *type = str_member(p, "type"), *body = str_member(p, "body");
		if (!type || !body || !*body)
			continue;
		if (!plain && strcmp(type, "text/plain") == 0)
			plain = body;
		else if (!md && strcmp(type, "text/markdown") == 0)
			md = body;
		else if (!html && strcmp(type, "text/html") == 0)
			html = body;
	}
	char *derived = NULL;
	const char *text = plain ? plain : md;
	bool oom = false;
	if (!text && html)
		text = derived = html_text(html, &oom);
	if (oom) /* not a message without text (a dead letter until the twenty-fifth session) */
		return NULL;
	char *clean = xm_xml_text(text ? text : "");
	free(derived);
	return clean;
}

/* "> " before each line of the first QUOTE_MAX bytes of text (cut on a
 * character, "…" marks the cut), ending with a line feed; NULL when text
 * is empty or only white space (or no memory). */
static char *quote_of(const char *text)
{
	char *t = xm_xml_text(text);
	if (!t)
		return NULL;
	size_t n = strlen(t);
	bool cut = false;
	if (n > QUOTE_MAX) {
		n = cw_utf8_cut(t, QUOTE_MAX);
		cut = true;
	}
	while (n && strchr(" \t\n", t[n - 1]))
		n--;
	t[n] = '\0';
	if (!n) {
		free(t);
		return NULL;
	}
	size_t lines = 1;
	for (size_t i = 0; i < n; i++)
		lines += t[i] == '\n';
	char *q = malloc(n + 2 * lines + 3 + 2);
	if (!q) {
		free(t);
		return NULL;
	}
	size_t o = 0;
	q[o++] = '>';
	q[o++] = ' ';
	for (size_t i = 0; i < n; i++) {
		q[o++] = t[i];
		if (t[i] == '\n') {
			q[o++] = '>';
			q[o++] = ' ';
		}
	}
	if (cut) {
		memcpy(q + o, "\xE2\x80\xA6", 3);
		o += 3;
	}
	q[o++] = '\n';
	q[o] = '\0';
	free(t);
	return q;
}

/* Concatenates the non-NULL pieces (malloc'd). */
static char *concat(const char *a, const char *b, const char *c)
{
	size_t la = a ? strlen(a) : 0, lb = b ? strlen(b) : 0, lc = c ? strlen(c) : 0;
	char *s = malloc(la + lb + lc + 1);
	if (!s)
		return NULL;
	if (la)
		memcpy(s, a, la);
	if (lb)
		memcpy(s + la, b, lb);
	if (lc)
		memcpy(s + la + lb, c, lc);
	s[la + lb + lc] = '\0';
	return s;
}

/* origin-id, receipt request and markable: what every message and edit
 * carries. */
static void trackable(struct ob *b, const struct xm_out_info *info)
{
	id_el(b, "origin-id", NS_SID, info->id);
	el(b, b->msg, "request", NS_RECEIPTS);
	el(b, b->msg, "markable", NS_MARKERS);
}

/* A message's own text (XML-safe, malloc'd into *text_out): its parts' text and,
 * when with_attachments, the attachments' links but the first, which is
 * *oob (NULL when none); XM_OUT_STANZA, or XM_OUT_INVALID (b->oom when
 * memory ran out). */
static enum xm_out_result message_text(struct ob *b, const json_t *content, bool with_attachments, const char **oob_out,
				       char **text_out, char *why, size_t whylen)
{
	*text_out = NULL;
	*oob_out = NULL;
	char *text = neutral_text(content);
	if (!text) {
		b->oom = true;
		return XM_OUT_INVALID;
	}
	/* Attachments: the first as OOB, the others listed in the body. */
	const char *oob = NULL;
	char *list = NULL;
	if (with_attachments) {
		size_t i, len = 0;
		json_t *a;
		const json_t *atts = json_object_get(content, "attachments");
		json_array_foreach(atts, i, a)
			if (str_member(a, "url"))
				len += strlen(str_member(a, "url")) + 1;
		list = calloc(1, len + 1);
		if (!list) {
			free(text);
			b->oom = true;
			return XM_OUT_INVALID;
		}
		json_array_foreach(atts, i, a) {
			const char *url = str_member(a, "url");
			if (!url || !*url)
				continue;
			if (!oob) {
				oob = url;
				if (*text)
					continue; /* the OOB url alone is the body when there is no text */
			}
			if (*list || *text)
				strcat(list, "\n");
			strcat(list, url);
		}
	}
	/* text is clean already (neutral_text), and xm_xml_text changes
	 * nothing of what it made: only the links listed need it.  Until the
	 * fifty-ninth session the text of every message was copied and
	 * cleaned a second time, listed links or none. */
	char *main_text = text;
	if (list && *list) {
		char *raw = concat(text, list, NULL);
		free(text);
		main_text = raw ? xm_xml_text(raw) : NULL;
		free(raw);
	}
	free(list);
	if (!main_text) {
		b->oom = true;
		return XM_OUT_INVALID;
	}
	if (!*main_text) {
		free(main_text);
		say(why, whylen, "the message has no text and no attachment");
		return XM_OUT_INVALID;
	}
	*text_out = main_text;
	*oob_out = oob;
	return XM_OUT_STANZA;
}

/* A chat message: prefix + text, the reply to target (when known) with its
 * quote as fallback, attachments (when with_attachments), <active/> (when
 * active). */
static enum xm_out_result out_message(struct ob *b, const json_t *content, const struct xm_out_info *info,
				      const char *prefix, const struct xm_target *target, bool with_attachments,
				      bool active, char *why, size_t whylen)
{
	const char *oob;
	char *main_text;
	enum xm_out_result made = message_text(b, content, with_attachments, &oob, &main_text, why, whylen);
	if (made != XM_OUT_STANZA)
		return made;
	bool reply = target && target_ok(target);
	/* The quote is of the text the target's own body was made of. */
	char *quoted = reply && target->content ? neutral_text(target->content) : NULL;
	if (reply && target->content && !quoted) {
		free(main_text);
		b->oom = true;
		return XM_OUT_INVALID;
	}
	char *quote = quoted ? quote_of(quoted) : NULL;
	free(quoted);
	char *body = concat(quote, prefix, main_text);
	free(main_text);
	if (!body) {
		free(quote);
		b->oom = true;
		return XM_OUT_INVALID;
	}
	text_el(b, b->msg, "body", NULL, body);
	free(body);
	if (reply) {
		id_el(b, "reply", NS_REPLY, ref_id(target));
		if (target->author)
			set_attr(b, xmpp_stanza_get_child_by_ns(b->msg, NS_REPLY), "to", target->author);
		if (quote) {
			xmpp_stanza_t *f = el(b, b->msg, "fallback", NS_FALLBACK);
			set_attr(b, f, "for", NS_REPLY);
			xmpp_stanza_t *r = el(b, f, "body", NULL);
			char end[24];
			snprintf(end, sizeof(end), "%zu", cw_utf8_count(quote));
			set_attr(b, r, "start", "0");
			set_attr(b, r, "end", end);
		}
	}
	free(quote);
	/* MIMI's topic is the XEP-0201 thread. */
	const char *topic = str_member(content, "topic");
	if (topic && *topic) {
		char *t = xm_xml_text(topic);
		if (!t)
			b->oom = true;
		else if (*t)
			text_el(b, b->msg, "thread", NULL, t);
		free(t);
	}
	if (oob) {
		char *url = xm_xml_text(oob);
		if (!url)
			b->oom = true;
		else
			text_el(b, el(b, b->msg, "x", NS_OOB), "url", NULL, url);
		free(url);
	}
	trackable(b, info);
	if (active)
		el(b, b->msg, "active", NS_CHATSTATES);
	return XM_OUT_STANZA;
}

/* <reactions id=...> with the keys of set (strings, 1..64 bytes, at most
 * KEYS_MAX, each once) and extra when not NULL; <store/>. */
static void reactions_el(struct ob *b, const struct xm_target *reacted, const json_t *set, const char *extra)
{
	xmpp_stanza_t *r = el(b, b->msg, "reactions", NS_REACTIONS);
	set_attr(b, r, "id", ref_id(reacted));
	char *keys[KEYS_MAX];
	size_t n = 0, i;
	const json_t *all = json_is_array(set) ? set : NULL;
	for (i = 0; i <= json_array_size(all) && n < KEYS_MAX; i++) {
		const char *k = i < json_array_size(all) ? json_string_value(json_array_get(all, i)) : extra;
		if (!k || !*k || strlen(k) > EVENT_REACTION_MAX)
			continue;
		char *clean = xm_xml_text(k);
		if (!clean) {
			b->oom = true;
			break;
		}
		bool dup = false;
		for (size_t j = 0; j < n && !dup; j++)
			dup = strcmp(keys[j], clean) == 0;
		if (dup) {
			free(clean);
			continue;
		}
		keys[n++] = clean;
	}
	for (i = 0; i < n; i++) {
		text_el(b, r, "reaction", NULL, keys[i]);
		free(keys[i]);
	}
	el(b, b->msg, "store", NS_HINTS);
}

static enum xm_out_result none(char *why, size_t whylen, const char *what)
{
	say(why, whylen, "%s", what);
	return XM_OUT_NONE;
}

static enum xm_out_result invalid(char *why, size_t whylen, const char *what)
{
	say(why, whylen, "%s", what);
	return XM_OUT_INVALID;
}

static enum xm_out_result nomem(char *why, size_t whylen)
{
	say(why, whylen, "out of memory");
	return XM_OUT_NOMEM;
}

static enum xm_out_result build(struct ob *b, const char *type, const json_t *content, const struct xm_out_info *info,
				char *why, size_t whylen)
{
	if (strcmp(type, "message") == 0)
		return out_message(b, content, info, NULL, str_member(content, "in_reply_to") ? &info->target : NULL, true,
				   true, why, whylen);
	if (strcmp(type, "edit") == 0) {
		if (!str_member(content, "replaces"))
			return invalid(why, whylen, "an edit needs replaces");
		char *text = neutral_text(content);
		bool empty = text && !*text;
		free(text);
		if (!text) {
			b->oom = true;
			return XM_OUT_INVALID;
		}
		if (empty)
			return invalid(why, whylen, "the edit has no text");
		/* XEP-0308: the correction is the whole stanza again, only its
		 * id and text changed: the reply (XEP-0461) and its quote go
		 * with it, or a client that replaces the stanza loses them
		 * (until the thirty-seventh session they did). */
		if (target_ok(&info->target) && info->target.is_last) {
			id_el(b, "replace", NS_CORRECT, info->target.id);
			return out_message(b, content, info, NULL, &info->replied, false, false, why, whylen);
		}
		return out_message(b, content, info, CORRECTION, &info->target, false, true, why, whylen);
	}
	if (strcmp(type, "delete") == 0) {
		if (!str_member(content, "replaces"))
			return invalid(why, whylen, "a delete needs replaces");
		if (info->target.is_reaction) {
			if (!target_ok(&info->reacted))
				return none(why, whylen, "the removed reaction is on a message XMPP does not know");
			reactions_el(b, &info->reacted, info->reaction_set, NULL);
			return XM_OUT_STANZA;
		}
		if (!target_ok(&info->target))
			return none(why, whylen, "the deleted message is not known in XMPP");
		id_el(b, "retract", NS_RETRACT, info->target.id);
		set_attr(b, el(b, b->msg, "fallback", NS_FALLBACK), "for", NS_RETRACT);
		text_el(b, b->msg, "body", NULL, RETRACT_TEXT);
		el(b, b->msg, "store", NS_HINTS);
		return XM_OUT_STANZA;
	}
	if (strcmp(type, "reaction") == 0) {
		const char *key = str_member(json_array_get(json_object_get(content, "parts"), 0), "body");
		if (!str_member(content, "in_reply_to") || !key || !*key)
			return invalid(why, whylen, "a reaction needs in_reply_to and one part");
		if (!target_ok(&info->reacted))
			return none(why, whylen, "the reaction is to a message XMPP does not know");
		reactions_el(b, &info->reacted, info->reaction_set, key);
		return XM_OUT_STANZA;
	}
	if (strcmp(type, "receipt") == 0) {
		const char *kind = str_member(content, "receipt");
		bool read = eq(kind, "read");
		if (!str_member(content, "in_reply_to") || (!read && !eq(kind, "delivered")))
			return invalid(why, whylen, "a receipt needs in_reply_to and receipt read or delivered");
		if (!target_ok(&info->target))
			return none(why, whylen, "the receipt is for a message XMPP does not know");
		id_el(b, read ? "displayed" : "received", read ? NS_MARKERS : NS_RECEIPTS, info->target.id);
		return XM_OUT_STANZA;
	}
	if (strcmp(type, "typing") == 0) {
		const char *state = str_member(content, "state");
		if (!eq(state, "start") && !eq(state, "stop"))
			return invalid(why, whylen, "typing needs state start or stop");
		el(b, b->msg, eq(state, "start") ? "composing" : "active", NS_CHATSTATES);
		el(b, b->msg, "no-store", NS_HINTS);
		return XM_OUT_STANZA;
	}
	if (strcmp(type, "membership") == 0 || strcmp(type, "block") == 0)
		return none(why, whylen, "memberships and blocks are handled by the adapter, not sent as messages");
	return invalid(why, whylen, "unknown neutral event type");
}

/* A message whose stanza is xm_keep's shape: no reply (in_reply_to
 * makes one when its target is known), no non-empty topic (a <thread>),
 * no attachment (an <x> of OOB, links in the body). */
static bool plain_message(const char *type, const json_t *content)
{
	const char *topic = str_member(content, "topic");
	return strcmp(type, "message") == 0 && !str_member(content, "in_reply_to") && (!topic || !*topic) &&
	       json_array_size(json_object_get(content, "attachments")) == 0;
}

void xm_keep_drop(struct xm_keep *keep)
{
	if (keep && keep->msg)
		xmpp_stanza_release(keep->msg);
	if (keep)
		*keep = (struct xm_keep){ 0 };
}

/* The kept stanza made the next plain message's: its text as out_message
 * makes it (the same function), its attributes set again (the message's
 * id, to and from, the <origin-id>'s id: type and the xmlns stay).
 * libstrophe's attribute table puts a key set again at the head of its
 * bucket's chain and renders in the table's order; the keys set again
 * are those a new stanza gets last, so the chains, and the bytes, are a
 * new stanza's (check_xmpp's out_kept_same_bytes compares them). */
static enum xm_out_result from_kept(struct xm_keep *keep, const json_t *content, const struct xm_out_info *info,
				    xmpp_stanza_t **out, char *why, size_t whylen)
{
	struct ob b = { .ctx = keep->ctx };
	const char *oob;
	char *body;
	enum xm_out_result r = message_text(&b, content, true, &oob, &body, why, whylen);
	if (b.oom)
		return nomem(why, whylen);
	if (r != XM_OUT_STANZA)
		return r;
	bool ok = xmpp_stanza_set_id(keep->msg, info->id) == XMPP_EOK &&
		  xmpp_stanza_set_to(keep->msg, info->to) == XMPP_EOK &&
		  xmpp_stanza_set_from(keep->msg, info->from) == XMPP_EOK &&
		  xmpp_stanza_set_text(keep->text, body) == XMPP_EOK &&
		  xmpp_stanza_set_id(keep->origin, info->id) == XMPP_EOK;
	free(body);
	if (!ok) { /* half changed: made anew the next time */
		xm_keep_drop(keep);
		return nomem(why, whylen);
	}
	*out = xmpp_stanza_clone(keep->msg);
	return XM_OUT_STANZA;
}

/* A new plain message's stanza kept (keep's reference), when it has the
 * shape from_kept changes. */
static void keep_new(struct xm_keep *keep, xmpp_ctx_t *ctx, xmpp_stanza_t *msg)
{
	xmpp_stanza_t *body = xmpp_stanza_get_child_by_name(msg, "body");
	xmpp_stanza_t *text = body ? xmpp_stanza_get_children(body) : NULL;
	xmpp_stanza_t *origin = xmpp_stanza_get_child_by_ns(msg, NS_SID);
	if (!text || !xmpp_stanza_is_text(text) || !origin)
		return;
	xm_keep_drop(keep);
	*keep = (struct xm_keep){ .ctx = ctx, .msg = xmpp_stanza_clone(msg), .text = text, .origin = origin };
}

enum xm_out_result xm_from_neutral(xmpp_ctx_t *ctx, const json_t *event, const struct xm_out_info *info,
				   xmpp_stanza_t **out, char *why, size_t whylen)
{
	return xm_from_neutral_kept(ctx, NULL, event, info, out, why, whylen);
}

enum xm_out_result xm_from_neutral_kept(xmpp_ctx_t *ctx, struct xm_keep *keep, const json_t *event,
					const struct xm_out_info *info, xmpp_stanza_t **out, char *why, size_t whylen)
{
	if (why && whylen)
		why[0] = '\0';
	if (out)
		*out = NULL;
	if (!ctx || !out || !info)
		return invalid(why, whylen, "no context, output or addresses");
	const char *type = str_member(event, "type");
	const json_t *content = json_object_get(event, "content");
	if (!type || !json_is_object(content))
		return invalid(why, whylen, "a neutral event needs a type and a content object");
	if (!info->from || !info->to || !xj_split(info->from, NULL, 0, NULL, 0, NULL, 0) ||
	    !xj_split(info->to, NULL, 0, NULL, 0, NULL, 0) || !id_ok(info->id))
		return invalid(why, whylen, "the stanza needs valid from and to JIDs and an id");
	bool plain = keep && plain_message(type, content);
	if (plain && keep->msg && keep->ctx == ctx)
		return from_kept(keep, content, info, out, why, whylen);
	struct ob b = { .ctx = ctx };
	b.msg = xmpp_message_new(ctx, "chat", info->to, info->id);
	if (!b.msg || xmpp_stanza_set_from(b.msg, info->from) != XMPP_EOK) {
		if (b.msg)
			xmpp_stanza_release(b.msg);
		return nomem(why, whylen);
	}
	enum xm_out_result r = build(&b, type, content, info, why, whylen);
	/* Whatever build made of it, memory that ran out on the way made it:
	 * the same event may well go another time. */
	if (b.oom)
		r = nomem(why, whylen);
	if (r != XM_OUT_STANZA) {
		xmpp_stanza_release(b.msg);
		return r;
	}
	if (plain)
		keep_new(keep, ctx, b.msg);
	*out = b.msg;
	return r;
}
