/* libFuzzer target: a neutral event as the Matrix adapter sends it
 * (adapters/matrix/mx_map.h: mx_from_neutral), and back.  The input is a
 * flag byte (unused; the corpus is shared with xmpp_out) and the event's
 * JSON, which must first pass the neutral API's validation (event_parse),
 * as every event the dispatcher hands the adapter did.  Properties: nothing
 * crashes or leaks; a send's content is a JSON object with a body; its
 * formatted_body (a peer's HTML part, sanitised) holds no script, style,
 * image, event handler or link of another scheme than the subset's
 * (html_safe); and a
 * plain text message, read back by the inbound mapping (mx_to_neutral, as
 * the homeserver would push a local user's event with that content), is a
 * message with the same text: what Matrix can represent survives the trip. */
#include "config.h"
#include "matrix/mx_map.h"
#include "peer/event.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *no_native(void *ctx, const char *id)
{
	(void)ctx;
	(void)id;
	return NULL;
}

static const char *to_msg(void *ctx, const char *id)
{
	(void)ctx;
	return id[0] == '@' ? "mimi://example.org/u/alice" : NULL;
}

/* The text of a message with one text/plain part and nothing else. */
static const char *plain_text(const json_t *ev)
{
	const json_t *c = json_object_get(ev, "content");
	const json_t *parts = json_object_get(c, "parts");
	if (strcmp(json_string_value(json_object_get(ev, "type")) ?: "", "message") != 0 || json_object_size(c) != 1 ||
	    json_array_size(parts) != 1)
		return NULL;
	const json_t *p = json_array_get(parts, 0);
	if (strcmp(json_string_value(json_object_get(p, "type")) ?: "", "text/plain") != 0)
		return NULL;
	return json_string_value(json_object_get(p, "body"));
}

/* Whether sanitised HTML h is in the subset as a browser reads it (mx_map.h
 * mx_sanitize_html): no '<' or '>' but a tag's; tags of no element of
 * script, style or media, their attributes name="value" (the value without
 * '"', '<' or '>'), none an event handler, a style or a source, an href
 * only of a scheme the subset has. */
static bool html_safe(const char *h)
{
	static const char *const elements[] = { "script", "style", "img", "iframe", "svg", "math", "object",
						"embed", "template", "title", "textarea", "xmp", "noscript", NULL };
	static const char *const schemes[] = { "http:", "https:", "ftp:", "mailto:", "magnet:", "matrix:", NULL };
	for (const char *p = strpbrk(h, "<>"); p; p = strpbrk(p, "<>")) {
		if (*p++ == '>')
			return false;
		p += *p == '/';
		size_t n = strspn(p, "abcdefghijklmnopqrstuvwxyz0123456789-");
		for (const char *const *e = elements; *e; e++)
			if (n == strlen(*e) && strncmp(p, *e, n) == 0)
				return false;
		for (p += n; *p == ' '; ) {
			const char *name = ++p;
			p += strcspn(p, "=\"<> ");
			if (p[0] != '=' || p[1] != '"' || strncasecmp(name, "on", 2) == 0 ||
			    strncasecmp(name, "style=", 6) == 0 || strncasecmp(name, "src=", 4) == 0)
				return false;
			const char *v = p + 2, *end = v + strcspn(v, "\"<>");
			bool known = strncmp(name, "href=", 5) != 0;
			for (const char *const *sc = schemes; *sc && !known; sc++)
				known = strncasecmp(v, *sc, strlen(*sc)) == 0;
			if (*end != '"' || !known)
				return false;
			p = end + 1;
		}
		if (*p++ != '>')
			return false;
	}
	return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	struct event_limits lim = event_limits_default();
	struct event pe;
	struct event_error err;
	if (event_parse((const char *)data + 1, size - 1, &lim, 0, &pe, &err) != CW_OK)
		return 0;
	event_free(&pe);
	json_t *ev = json_loadb((const char *)data + 1, size - 1, 0, NULL);
	if (!ev)
		return 0;
	struct mx_out out = { 0 };
	char why[200];
	if (mx_from_neutral(ev, no_native, NULL, "org.causeway.outbox_id", "42", &out, why, sizeof(why)) &&
	    out.op == MX_OP_SEND) {
		if (!json_is_object(out.content) || !json_is_string(json_object_get(out.content, "body")))
			abort(); /* a send without a body: clients would show nothing */
		const char *fb = json_string_value(json_object_get(out.content, "formatted_body"));
		if (fb && !html_safe(fb)) {
			fprintf(stderr, "formatted_body not in the subset: %s\n", fb);
			abort();
		}
		const char *text = plain_text(ev);
		if (text && strcmp(out.event_type, "m.room.message") == 0) {
			json_t *mx = json_pack("{s:s, s:O, s:s, s:s, s:s, s:I}", "type", out.event_type, "content",
					       out.content, "sender", "@alice:example.org", "event_id", "$ev1",
					       "room_id", "!room:example.org", "origin_server_ts", (json_int_t)1);
			json_t *back = NULL;
			enum mx_in_result r = mx_to_neutral(mx, to_msg, NULL, &back, why, sizeof(why));
			const char *got = r == MX_IN_OK ? plain_text(back) : NULL;
			if (!got || strcmp(got, text) != 0) {
				fprintf(stderr, "round trip changed the message (%d, %s): %s -> %s\n", (int)r, why, text,
					got ? got : "(none)");
				abort();
			}
			json_decref(back);
			json_decref(mx);
		}
	}
	mx_out_clear(&out);
	json_decref(ev);
	return 0;
}
