/* libFuzzer target: a neutral event as the XMPP adapter turns it into a
 * stanza (adapters/xmpp/xm.h: xm_from_neutral).  The first byte chooses
 * what the caller found (the target known or not, last or not, a reaction
 * or not; a reaction set); the rest is the event's JSON, which must first
 * pass the neutral API's validation (event_parse), as every event the
 * dispatcher hands the adapter did.  Properties: nothing crashes or leaks,
 * and every stanza written is well-formed XML that libstrophe parses back
 * into a <message/> (the adapter writes text to the stream as it is). */
#include "config.h"
#include "xmpp/xm.h"
#include "peer/event.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static xmpp_ctx_t *ctx;

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
			    .is_last = flags & 4, .text = (flags & 8) ? "an earlier <message> & text" : NULL,
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
		xmpp_stanza_release(back);
		xmpp_free(ctx, buf);
	}
	if (st)
		xmpp_stanza_release(st);
	json_decref(set);
	json_decref(ev);
	return 0;
}
