/* libFuzzer target: what a homeserver pushes (an appservice transaction's
 * JSON) as the Matrix adapter reads it (adapters/matrix: mx_event_refs,
 * mx_to_neutral and mx_edit_target for each room event,
 * mx_ephemeral_to_neutral for each ephemeral one), and the ghost ids:
 * mx_ghost_parse of every sender, and mx_ghost_id of the transaction's
 * text.  Properties: nothing crashes or leaks; every event mapped from
 * Matrix, with a sender added, is accepted by event_parse; an event mapped
 * to an edit is one mx_edit_target names a target of (the adapter's check
 * of an edit of an edit); a ghost id parses back to what built it. */
#include "config.h"
#include "matrix/mx_id.h"
#include "matrix/mx_map.h"
#include "peer/event.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Event ids starting with "$k" are known messages; users are known too. */
static const char *to_msg(void *ctx, const char *id)
{
	(void)ctx;
	if (id[0] == '@')
		return "mimi://example.org/u/alice";
	return strncmp(id, "$k", 2) == 0 ? "msg_known0000000000000000" : NULL;
}

static void check_valid(json_t *neutral)
{
	json_object_set_new(neutral, "sender", json_string("mimi://example.org/u/alice"));
	char *body = json_dumps(neutral, JSON_COMPACT);
	struct event_limits lim = event_limits_default();
	struct event pe;
	struct event_error err;
	if (!body || event_parse(body, strlen(body), &lim, 0, &pe, &err) != CW_OK) {
		fprintf(stderr, "the mapping's output was refused (%s: %s): %s\n", body ? err.code : "",
			body ? err.detail : "", body ? body : "(null)");
		abort();
	}
	event_free(&pe);
	free(body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* Read as matrix_as_transaction reads a transaction (mx_json_load), an
	 * event holding a NUL (or a mark of one) skipped as txn_new skips it. */
	json_error_t jerr;
	json_t *txn = mx_json_load((const char *)data, size, JSON_REJECT_DUPLICATES, &jerr);
	if (txn) {
		const char *lists[] = { "events", "ephemeral", "de.sorunome.msc2409.ephemeral" };
		for (int k = 0; k < 3; k++) {
			json_t *arr = json_object_get(txn, lists[k]), *ev;
			size_t i;
			if (!json_is_array(arr))
				continue;
			json_array_foreach(arr, i, ev) {
				if (mx_json_has_nul(ev))
					continue;
				if (k == 0) {
					const char *refs[8];
					if (mx_event_refs(ev, refs, 8) > 8)
						abort();
					json_t *out = NULL;
					char why[200];
					if (mx_to_neutral(ev, to_msg, NULL, &out, why, sizeof(why)) == MX_IN_OK) {
						check_valid(out);
						const char *type = json_string_value(json_object_get(out, "type"));
						if (type && strcmp(type, "edit") == 0 && !mx_edit_target(ev))
							abort(); /* an edit the adapter would not check */
					}
					json_decref(out);
				} else {
					json_t *items = mx_ephemeral_to_neutral(ev, to_msg, NULL), *it;
					size_t j;
					json_array_foreach(items, j, it) check_valid(json_object_get(it, "event"));
					json_decref(items);
				}
				const char *sender = json_string_value(json_object_get(ev, "sender"));
				char net[300], rl[300];
				if (sender)
					(void)mx_ghost_parse("_cw_", "example.org", sender, net, sizeof(net), rl, sizeof(rl));
			}
		}
		json_decref(txn);
	}
	/* Ghost ids: the input's first line is a network, the rest a remote id. */
	char *text = malloc(size + 1);
	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	char *nl = strchr(text, '\n');
	if (nl) {
		*nl = '\0';
		char id[MX_ID_MAX + 1], net[600], rl[600];
		if (mx_ghost_id("_cw_", text, nl + 1, "example.org", id, sizeof(id))) {
			if (!mx_ghost_parse("_cw_", "example.org", id, net, sizeof(net), rl, sizeof(rl)) ||
			    strcmp(net, text) != 0 || strcmp(rl, nl + 1) != 0)
				abort(); /* not reversible */
		}
	}
	free(text);
	return 0;
}
