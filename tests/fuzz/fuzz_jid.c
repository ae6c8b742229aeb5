/* libFuzzer target: the XEP-0106 (+ capitals) escaping of remote ids and
 * JID splitting (adapters/xmpp/xj.h).  Properties checked on every input:
 *   - escape(id) succeeds for 1-255 bytes and unescape(escape(id)) == id;
 *   - when unescape(s) succeeds, escape of the result gives s back (the
 *     mapping is one-to-one);
 *   - xj_split never writes past its buffers (ASan) and its parts fit. */
#include "config.h"
#include "xmpp/xj.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char in[1200];
	if (size >= sizeof(in))
		size = sizeof(in) - 1;
	memcpy(in, data, size);
	in[size] = '\0';
	size_t n = strlen(in); /* the JID functions take C strings */

	char esc[4 * 255 + 1], back[300];
	if (xj_escape_local(in, esc, sizeof(esc))) {
		if (n == 0 || n > 255)
			abort(); /* escape accepted what it must refuse */
		if (!xj_unescape_local(esc, back, sizeof(back)) || strcmp(back, in) != 0)
			abort(); /* not reversible */
	} else if (n >= 1 && n <= 255) {
		abort(); /* every id of 1-255 bytes has a JID */
	}
	char id[300], again[4 * 255 + 1];
	if (xj_unescape_local(in, id, sizeof(id))) {
		if (!xj_escape_local(id, again, sizeof(again)) || strcmp(again, in) != 0)
			abort(); /* two JIDs for one id */
	}
	char local[XJ_PART_MAX + 1], domain[XJ_PART_MAX + 1], res[XJ_PART_MAX + 1];
	if (xj_split(in, local, sizeof(local), domain, sizeof(domain), res, sizeof(res))) {
		if (strlen(local) > XJ_PART_MAX || strlen(domain) > XJ_PART_MAX || strlen(res) > XJ_PART_MAX)
			abort();
	}
	return 0;
}
