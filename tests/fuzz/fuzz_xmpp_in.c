/* libFuzzer target: a <message/> stanza from a local user, as the XMPP
 * adapter maps it to neutral events (adapters/xmpp/xm.h: xm_message_ids,
 * xm_message_refs, xm_to_neutral).  The input is parsed by libstrophe (the
 * adapter gets stanzas from libstrophe's parser too).  Properties: nothing
 * crashes or leaks (ASan/UBSan/LeakSanitizer), and every event the mapping
 * outputs, with a sender added, is accepted by the neutral API's own
 * validation (event_parse): the adapter never hands the pipeline a body it
 * would refuse.
 *
 * The guard in front of expat (adapters/xmpp/xmpp_xml.c: restricted XML,
 * the stanza size cap) is linked in, as in causewayd: libstrophe's parse
 * goes through it, and the input is also fed, as the content of a stream,
 * to a parser watched as the stream's is, under a small cap, in reads cut
 * where its first byte says (its low six bits: the size of every read,
 * or with bit 7 set, of the first, each next one's size from the byte it
 * starts at, and reads within a token of 64 bytes or more held back as
 * within one of 16 KiB in the daemon, xa_xml_hold_from; bit 6: the parser
 * renewed at every stanza's end, xa_xml_renew_at, or never: the input is
 * far below the bound).  Properties, whatever the reads: no start
 * tag or text of a stanza (a child of the root) past its first cap bytes
 * reaches the handlers set on that parser (the ends of the elements they
 * have open do, of a stanza cut there), and a stanza ends there cut
 * (xa_xml_cut) exactly when it is larger than the cap. */
#include "config.h"
#include "xmpp/xm.h"
#include "xmpp/xmpp_int.h"
#include "peer/event.h"

#include <expat.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static xmpp_ctx_t *ctx;

/* Ids starting with 'k' are known messages; the others are not. */
static const char *to_msg(void *c, const char *id)
{
	(void)c;
	return id[0] == 'k' ? "msg_known0000000000000000" : NULL;
}

/* The sender's current reactions to the known message. */
static const json_t *reactions(void *c, const char *msg)
{
	(void)msg;
	return c;
}

enum { CAP = 300 };

struct stream {
	XML_Parser p;
	int depth, ends; /* ends: of stanzas and of the stream */
	XML_Index at; /* the stanza in progress's '<' */
};

/* Where the event in progress ends, from the stanza's '<'. */
static XML_Index into(const struct stream *s)
{
	return XML_GetCurrentByteIndex(s->p) + XML_GetCurrentByteCount(s->p) - s->at;
}

/* An event of the stanza in progress ending past its first CAP bytes. */
static void within(const struct stream *s, const char *what)
{
	XML_Index end = into(s) + s->at;
	if (s->depth >= 2 && end - s->at > CAP) {
		fprintf(stderr, "%s %lld bytes into a stanza passed the cap of %d\n", what, (long long)(end - s->at),
			CAP);
		abort();
	}
}

static void XMLCALL stream_start(void *u, const XML_Char *name, const XML_Char **atts)
{
	struct stream *s = u;
	if (s->depth++ == 1)
		s->at = XML_GetCurrentByteIndex(s->p);
	within(s, "a start tag");
}

static void XMLCALL stream_text(void *u, const XML_Char *text, int len)
{
	within(u, "text");
}

static void XMLCALL stream_end(void *u, const XML_Char *name)
{
	struct stream *s = u;
	if (s->depth == 2 && xa_xml_cut() != (into(s) > CAP)) {
		fprintf(stderr, "a stanza of %lld bytes ended %s under a cap of %d\n", (long long)into(s),
			xa_xml_cut() ? "cut" : "whole", CAP);
		abort();
	}
	if (s->depth <= 2)
		s->ends++;
	s->depth--;
}

/* The input as a stream's content: the first byte is the size of the
 * reads, and whether the parser is renewed. */
static void stream_parse(const uint8_t *data, size_t size)
{
	static const char root[] = "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
				   "xmlns='jabber:component:accept'>";
	if (size < 1)
		return;
	size_t step = (size_t)data[0] % 64 + 1;
	struct stream s = { 0 };
	xa_xml_watch(true, CAP);
	s.p = XML_ParserCreate_MM(NULL, NULL, "\x1f");
	xa_xml_watch(false, 0);
	if (!s.p)
		return;
	if (data[0] & 64)
		xa_xml_renew_at(1);
	xa_xml_hold_from(data[0] & 128 ? 64 : 0);
	XML_SetUserData(s.p, &s);
	XML_SetElementHandler(s.p, stream_start, stream_end);
	XML_SetCharacterDataHandler(s.p, stream_text);
	enum xa_xml_stop why;
	bool stopped = XML_Parse(s.p, root, (int)strlen(root), XML_FALSE) == XML_STATUS_ERROR;
	for (size_t i = 1; i < size && !stopped; i += step) {
		if ((data[0] & 128) && i > 1)
			step = (size_t)data[i] % 64 + 1;
		size_t n = size - i < step ? size - i : step;
		stopped = XML_Parse(s.p, (const char *)data + i, (int)n, XML_FALSE) == XML_STATUS_ERROR ||
			  xa_xml_refused(&why) != NULL;
	}
	/* What reads within a long token left held back can end nothing (it
	 * has no '>'): reading it now ends no stanza and not the stream. */
	int ends = s.ends;
	xa_xml_flush();
	if (s.ends != ends) {
		fprintf(stderr, "%d ends were in bytes held back\n", s.ends - ends);
		abort();
	}
	xa_xml_refused(&why);
	XML_ParserFree(s.p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	stream_parse(data, size);
	if (!ctx) {
		xmpp_initialize();
		ctx = xmpp_ctx_new(NULL, NULL);
	}
	char *text = malloc(size + 1);
	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	xmpp_stanza_t *st = xmpp_stanza_new_from_string(ctx, text);
	free(text);
	if (!st)
		return 0;
	char id[XM_ID_MAX + 1], oid[XM_ID_MAX + 1];
	xm_message_ids(st, id, oid);
	const char *refs[16];
	size_t nrefs = xm_message_refs(st, refs, 16);
	if (nrefs > 16)
		abort();
	json_t *set = json_pack("{s:s, s:s}", "\xF0\x9F\x91\x8D", "msg_rx000000000000000001", "x", "not-a-msg-id");
	struct xm_in_lookup l = { to_msg, reactions, set };
	json_t *out = NULL;
	char why[200];
	enum xm_in_result r = xm_to_neutral(st, &l, 1700000000000, &out, why, sizeof(why));
	if (r == XM_IN_OK) {
		struct event_limits lim = event_limits_default();
		size_t i;
		json_t *ev;
		json_array_foreach(out, i, ev) {
			json_object_set_new(ev, "sender", json_string("mimi://example.org/u/alice"));
			char *body = json_dumps(ev, JSON_COMPACT);
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
	}
	json_decref(out);
	json_decref(set);
	xmpp_stanza_release(st);
	return 0;
}
