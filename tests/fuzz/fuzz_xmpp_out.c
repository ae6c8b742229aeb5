/* libFuzzer target: a neutral event as the XMPP adapter turns it into a
 * stanza (adapters/xmpp/xm.h: xm_from_neutral).  The first byte chooses
 * what the caller found (the target known or not, last or not, a reaction
 * or not; a reaction set); the rest is the event's JSON, which must first
 * pass the neutral API's validation (event_parse), as every event the
 * dispatcher hands the adapter did.  Properties: nothing crashes or leaks,
 * every stanza written is well-formed XML that libstrophe parses back into
 * a <message/> (the adapter writes text to the stream as it is), and a
 * plain text message comes back through the inbound mapping (stanza ->
 * event, as a local user's client would send it) as a message with the
 * same text: what XMPP can represent survives the trip. */
#include "config.h"
#include "xmpp/xm.h"
#include "peer/event.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static xmpp_ctx_t *ctx;

/* The text of a message with one text/plain part and nothing else (no
 * reference, no attachment): what XMPP carries whole; else NULL. */
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

static void round_trip(const json_t *ev, xmpp_stanza_t *back)
{
	const char *text = plain_text(ev);
	if (!text)
		return;
	json_t *out = NULL;
	char why[200];
	enum xm_in_result r = xm_to_neutral(back, NULL, 1, &out, why, sizeof(why));
	const json_t *first = json_array_get(out, 0);
	const char *got = r == XM_IN_OK ? plain_text(first) : NULL;
	/* What XML cannot carry (XML 1.0, 2.2 and 2.11): every CR LF and lone
	 * CR arrives as LF; the other C0 controls, U+FFFE and U+FFFF are sent
	 * as U+FFFD. */
	char *want = malloc(3 * strlen(text) + 1), *w = want;
	for (const unsigned char *t = (const unsigned char *)text; *t; t++) {
		if (*t == '\r') {
			if (t[1] != '\n')
				*w++ = '\n';
		} else if ((*t < 0x20 && *t != '\t' && *t != '\n') ||
			   (t[0] == 0xEF && t[1] == 0xBF && (t[2] == 0xBE || t[2] == 0xBF))) {
			if (*t == 0xEF)
				t += 2;
			memcpy(w, "\xEF\xBF\xBD", 3);
			w += 3;
		} else {
			*w++ = (char)*t;
		}
	}
	*w = '\0';
	bool same = got && strcmp(got, want) == 0;
	free(want);
	if (!same) {
		fprintf(stderr, "round trip changed the message (%d, %s): %s -> %s\n", (int)r, why, text,
			got ? got : "(none)");
		abort();
	}
	json_decref(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	if (!ctx) {
		xmpp_initialize();
		ctx = xmpp_ctx_new(NULL, NULL);
	}
	unsigned flags = data[0];
	struct event_limits lim = event_limits_default();
	struct event pe;
	struct event_error err;
	if (event_parse((const char *)data + 1, size - 1, &lim, 0, &pe, &err) != CW_OK)
		return 0;
	event_free(&pe);
	json_t *ev = json_loadb((const char *)data + 1, size - 1, 0, NULL);
	if (!ev)
		return 0;
	json_t *set = json_pack("[s, s]", "\xF0\x9F\x91\x8D", (flags & 0x40) ? "<&>'\"" : "x");
	struct xm_out_info info = {
		.from = "wally@gk.example.org",
		.to = "alice@example.org",
		.id = "msg_out00000000000000001",
		.target = { .known = flags & 1, .id = "t-1", .origin_id = (flags & 2) ? "t-o" : NULL,
			    .is_last = flags & 4, .content = (flags & 8) ? json_object_get(ev, "content") : NULL,
			    .is_reaction = flags & 16 },
		.reacted = { .known = flags & 32, .id = "r-1", .origin_id = NULL },
		.reaction_set = (flags & 128) ? set : NULL,
	};
	xmpp_stanza_t *st = NULL;
	char why[200];
	if (xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why)) == XM_OUT_STANZA && st) {
		char *buf = NULL;
		size_t len = 0;
		if (xmpp_stanza_to_text(st, &buf, &len) != XMPP_EOK || !buf)
			abort();
		xmpp_stanza_t *back = xmpp_stanza_new_from_string(ctx, buf);
		const char *name = back ? xmpp_stanza_get_name(back) : NULL;
		if (!name || strcmp(name, "message") != 0) {
			fprintf(stderr, "a stanza that does not parse back: %s\n", buf);
			abort();
		}
		round_trip(ev, back);
		xmpp_stanza_release(back);
		xmpp_free(ctx, buf);
	}
	if (st)
		xmpp_stanza_release(st);
	json_decref(set);
	json_decref(ev);
	return 0;
}
