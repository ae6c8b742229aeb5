/* What the guard in front of expat (adapters/xmpp/xmpp_xml.c) costs a
 * stanza of the stream: a five-element message stanza (body, chat state,
 * receipt request, origin-id) fed N times to a parser watched as the
 * stream's is, one XML_Parse a stanza (as libstrophe's reads give them at
 * worst), with the cap (default 1 MiB) or without (0).  A command, not a
 * test; run it under callgrind and take the instructions of N stanzas
 * less those of none (docs/xmpp.md, "Stanza size"):
 *   valgrind --tool=callgrind tests/bench/xmlguard_bench N [CAP]
 *
 * And what a long tag costs (since the twenty-ninth session): one stanza
 * that is a single tag of SIZE bytes, in libstrophe's 4 KiB reads, to the
 * watched parser (reads within the tag held back, xmpp_xml.c take) and,
 * in the same run, to a plain expat parser (each read scans the tag from
 * its start again: what the stream had before) and to one given it in a
 * single read (the floor), with the time of each and their ratio:
 *   tests/bench/xmlguard_bench tag SIZE */
#include "config.h"
#include "xmpp/xmpp_int.h"

#include <expat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int depth;

static void XMLCALL on_start(void *u, const XML_Char *n, const XML_Char **a) { depth++; }

static void XMLCALL on_end(void *u, const XML_Char *n) { depth--; }

static void XMLCALL on_text(void *u, const XML_Char *s, int len) {}

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* The tag stanza fed to a parser (watched or not) in reads of rd bytes;
 * the seconds it took, and whether the stanza ended. */
static double one_tag(bool watched, const char *tag, int size, int rd, bool *ended)
{
	static const char root[] = "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
				   "xmlns='jabber:component:accept'>";
	xa_xml_watch(watched, 64L << 20);
	XML_Parser p = XML_ParserCreate_MM(NULL, NULL, "\x1f");
	xa_xml_watch(false, 0);
	if (!p)
		exit(1);
	depth = 0;
	XML_SetElementHandler(p, on_start, on_end);
	XML_Parse(p, root, (int)strlen(root), XML_FALSE);
	double t0 = now_s();
	for (int at = 0; at < size; at += rd)
		XML_Parse(p, tag + at, size - at < rd ? size - at : rd, XML_FALSE);
	xa_xml_flush();
	double t = now_s() - t0;
	*ended = depth == 1;
	XML_ParserFree(p);
	return t;
}

static int tag_bench(int size)
{
	char *tag = malloc((size_t)size + 1);
	if (!tag || size < 100)
		return 1;
	int h = snprintf(tag, 64, "<message a='");
	memset(tag + h, 'p', (size_t)(size - h - 3));
	memcpy(tag + size - 3, "'/>", 4);
	bool e1, e2, e3;
	double floor = one_tag(false, tag, size, size, &e1);
	double plain = one_tag(false, tag, size, 4096, &e2);
	xa_xml_scanned();
	double held = one_tag(true, tag, size, 4096, &e3);
	long scanned = xa_xml_scanned();
	printf("a tag of %d bytes in 4096-byte reads: guarded %.4f s (%ld bytes scanned), plain expat %.4f s, "
	       "one read %.4f s; guarded/plain %.3f, guarded/one read %.2f%s\n",
	       size, held, scanned, plain, floor, held / plain, held / floor, e1 && e2 && e3 ? "" : " (NOT PARSED)");
	free(tag);
	return e1 && e2 && e3 ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc > 2 && strcmp(argv[1], "tag") == 0)
		return tag_bench(atoi(argv[2]));
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
