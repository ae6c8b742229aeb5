/* What the guard in front of expat (adapters/xmpp/xmpp_xml.c) costs a
 * stanza of the stream: a five-element message stanza (body, chat state,
 * receipt request, origin-id) fed N times to a parser watched as the
 * stream's is, one XML_Parse a stanza (as libstrophe's reads give them at
 * worst), with the cap (default 1 MiB) or without (0).  A command, not a
 * test; run it under callgrind and take the instructions of N stanzas
 * less those of none (docs/xmpp.md, "Stanza size"):
 *   valgrind --tool=callgrind tests/bench/xmlguard_bench N [CAP] */
#include "config.h"
#include "xmpp/xmpp_int.h"

#include <expat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int depth;

static void XMLCALL on_start(void *u, const XML_Char *n, const XML_Char **a) { depth++; }

static void XMLCALL on_end(void *u, const XML_Char *n) { depth--; }

static void XMLCALL on_text(void *u, const XML_Char *s, int len) {}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 200000, cap = argc > 2 ? atol(argv[2]) : 1048576;
	static const char root[] = "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
				   "xmlns='jabber:component:accept'>";
	static const char m[] = "<message from='alice@example.org/phone' to='wally@gk.example.org' type='chat' id='m1'>"
				"<body>Hello there, how are you?</body>"
				"<active xmlns='http://jabber.org/protocol/chatstates'/>"
				"<request xmlns='urn:xmpp:receipts'/><origin-id xmlns='urn:xmpp:sid:0' id='m1'/></message>";
	xa_xml_watch(true, cap);
	XML_Parser p = XML_ParserCreate_MM(NULL, NULL, "\x1f");
	xa_xml_watch(false, 0);
	if (!p)
		return 1;
	XML_SetElementHandler(p, on_start, on_end);
	XML_SetCharacterDataHandler(p, on_text);
	int ok = XML_Parse(p, root, (int)strlen(root), XML_FALSE) == XML_STATUS_OK;
	for (long i = 0; ok && i < n; i++)
		ok = XML_Parse(p, m, (int)strlen(m), XML_FALSE) == XML_STATUS_OK;
	XML_ParserFree(p);
	printf("%ld stanzas of %zu bytes, cap %ld: %s\n", n, strlen(m), cap, ok && depth == 1 ? "parsed" : "refused");
	return ok ? 0 : 1;
}
