/* Restricted XML (RFC 6120 §11.1) in libstrophe's parsers.
 *
 * An XMPP stream holds no DTD, entity declaration, comment or processing
 * instruction.  libstrophe (over expat) keeps its parser to itself and sets
 * only element and character handlers, so expat expanded the entities a
 * DOCTYPE in the server's prolog declared, and passed over comments and
 * processing instructions.  The process's expat parsers are all libstrophe's
 * (libxml2, for Matrix HTML, has a parser of its own), and libstrophe reaches
 * expat only through its exported functions: the ones below stand in for
 * them (this executable's definitions come first in the lookup, before
 * libexpat's), call the real ones (dlsym RTLD_NEXT) and give every parser
 * handlers for that markup, again after each reset (which clears handlers).
 * Such a handler stops the parser there: nothing after it, none of the
 * entities declared, reaches libstrophe's element handlers.  The stream's
 * parser (the one made by the component thread's xmpp_conn_new, see
 * xa_xml_watch) is suspended rather than failed, so that libstrophe, which
 * answers a failed parse with invalid-xml, takes it for a read without
 * stanzas; the thread then learns why (xa_xml_refused) and closes the
 * stream with restricted-xml.  It learns of a stream that is not
 * well-formed XML the same way.  Any other parser (that of
 * xmpp_stanza_new_from_string) fails: that function returns NULL.
 *
 * The stream's parser also has a size cap on its stanzas (docs/xmpp.md,
 * "Stanza size"): the element handlers libstrophe sets on it are wrapped
 * (XML_SetElementHandler and its two halves stand in front of expat's
 * too), count the depth and note where a stanza (a child of
 * <stream:stream>) starts, its '<' (XML_GetCurrentByteIndex).  Each read
 * is given to expat at most up to the cap's bytes of what it holds open:
 * the stanza in progress, the start tag still coming between stanzas, or
 * the stream header (from the stream's first byte to the '>' of
 * <stream:stream ...>, held to the cap on its own and counted in no
 * stanza).  A stanza still open there is larger than the cap: it is cut
 * (since the twenty-eighth session; before, the stream was closed, and
 * the server's escaping let any of its users grow a stanza past the cap):
 * libstrophe's handlers are given nothing more of it than the ends of
 * the elements they have open, the last one with xa_xml_cut() true, so
 * that the adapter refuses what libstrophe built, and parsing goes on.
 * Within a cut stanza, what expat holds open is the token still coming
 * (from the position of its last event).  A tag, or the header, still
 * open after the cap's bytes stops the parser without reading further
 * (expat would hold it whole), and the thread closes the stream with
 * policy-violation.  A read is cut only where the cap falls inside it.
 *
 * Expat keeps every distinct name it reads (elements, attributes,
 * prefixes) for its parser's life, a reset included, and the stream's
 * parser lives as long as the stream: since the twenty-ninth session the
 * watched parser (libstrophe's handle) reads nothing itself.  Its reads,
 * and what else is asked of it, go to "work", a parser of the guard's own
 * made with the same arguments, whose memory is counted (mm_*), and which
 * is renewed once it holds more than a bound: the end of a stanza stops
 * it (renew_after), a new one made with the encoding the stream declared
 * reads the stream's start tag again, as it came (kept when first read),
 * unseen by the handlers set, then the rest of the read (feed), and the
 * old one is freed with all it held (renew).  Within a long token, reads
 * without a '>' are held back (take), so that expat 2.5 scans it in
 * linear time.
 *
 * libstrophe must parse with expat for any of this: xa_xml_guards_libstrophe
 * says whether it does (causewayd refuses to start if not).  The markup
 * handlers fire on forbidden markup only; the cap costs a few
 * instructions per read and per stanza (docs/xmpp.md, "Stanza size"). */
#include "config.h"
#include "xmpp_int.h"
#include "buf.h"

#include <dlfcn.h>
#include <expat.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef XML_Parser (*create_fn)(const XML_Char *);
typedef XML_Parser (*create_ns_fn)(const XML_Char *, XML_Char);
typedef XML_Parser (*create_mm_fn)(const XML_Char *, const XML_Memory_Handling_Suite *, const XML_Char *);
typedef XML_Bool (*reset_fn)(XML_Parser, const XML_Char *);
typedef void (*free_fn)(XML_Parser);
typedef enum XML_Status (*parse_fn)(XML_Parser, const char *, int, int);
typedef enum XML_Status (*parse_buffer_fn)(XML_Parser, int, int);
typedef void (*set_element_fn)(XML_Parser, XML_StartElementHandler, XML_EndElementHandler);
typedef void (*set_start_fn)(XML_Parser, XML_StartElementHandler);
typedef void (*set_end_fn)(XML_Parser, XML_EndElementHandler);
typedef void (*set_chars_fn)(XML_Parser, XML_CharacterDataHandler);
typedef XML_Bool (*set_deferral_fn)(XML_Parser, XML_Bool);
typedef void (*set_user_fn)(XML_Parser, void *);
typedef enum XML_Error (*error_fn)(XML_Parser);
typedef XML_Index (*index_fn)(XML_Parser);
typedef int (*count_fn)(XML_Parser);
typedef XML_Size (*size_fn)(XML_Parser);
typedef enum XML_Status (*stop_fn)(XML_Parser, XML_Bool);
typedef enum XML_Status (*resume_fn)(XML_Parser);
typedef void *(*get_buffer_fn)(XML_Parser, int);
typedef void (*status_fn)(XML_Parser, XML_ParsingStatus *);
typedef const char *(*context_fn)(XML_Parser, int *, int *);

static struct {
	create_fn create;
	create_ns_fn create_ns;
	create_mm_fn create_mm;
	reset_fn reset;
	free_fn free;
	parse_fn parse;
	parse_buffer_fn parse_buffer;
	set_element_fn set_element;
	set_start_fn set_start;
	set_end_fn set_end;
	set_chars_fn set_chars;
	set_deferral_fn set_deferral; /* expat 2.6 and later only (NULL before) */
	set_user_fn set_user;
	error_fn error;
	index_fn index;
	count_fn count;
	size_fn line, column;
	stop_fn stop;
	resume_fn resume;
	get_buffer_fn get_buffer;
	status_fn status;
	context_fn context;
} real;
static pthread_once_t real_once = PTHREAD_ONCE_INIT;

static void *next_symbol(const char *name)
{
	void *f = dlsym(RTLD_NEXT, name);
	if (!f) { /* no expat after this executable: nothing could parse XMPP */
		fprintf(stderr, "causeway: expat's %s not found: %s\n", name, dlerror());
		abort();
	}
	return f;
}

static void find_real(void)
{
	*(void **)&real.create = next_symbol("XML_ParserCreate");
	*(void **)&real.create_ns = next_symbol("XML_ParserCreateNS");
	*(void **)&real.create_mm = next_symbol("XML_ParserCreate_MM");
	*(void **)&real.reset = next_symbol("XML_ParserReset");
	*(void **)&real.free = next_symbol("XML_ParserFree");
	*(void **)&real.parse = next_symbol("XML_Parse");
	*(void **)&real.parse_buffer = next_symbol("XML_ParseBuffer");
	*(void **)&real.set_element = next_symbol("XML_SetElementHandler");
	*(void **)&real.set_start = next_symbol("XML_SetStartElementHandler");
	*(void **)&real.set_end = next_symbol("XML_SetEndElementHandler");
	*(void **)&real.set_chars = next_symbol("XML_SetCharacterDataHandler");
	*(void **)&real.set_deferral = dlsym(RTLD_NEXT, "XML_SetReparseDeferralEnabled");
	*(void **)&real.set_user = next_symbol("XML_SetUserData");
	*(void **)&real.error = next_symbol("XML_GetErrorCode");
	*(void **)&real.index = next_symbol("XML_GetCurrentByteIndex");
	*(void **)&real.count = next_symbol("XML_GetCurrentByteCount");
	*(void **)&real.line = next_symbol("XML_GetCurrentLineNumber");
	*(void **)&real.column = next_symbol("XML_GetCurrentColumnNumber");
	*(void **)&real.stop = next_symbol("XML_StopParser");
	*(void **)&real.resume = next_symbol("XML_ResumeParser");
	*(void **)&real.get_buffer = next_symbol("XML_GetBuffer");
	*(void **)&real.status = next_symbol("XML_GetParsingStatus");
	*(void **)&real.context = next_symbol("XML_GetInputContext");
}

static __thread XML_Parser cur;      /* the parser this thread's XML_Parse runs */
static __thread XML_Parser watched;  /* this thread's stream's parser (libstrophe's handle) */
/* The parser the watched one's reads go to: the guard's own, made with
 * the same arguments, expat's memory of it counted (held), renewed
 * between stanzas (renew).  The watched parser itself reads nothing. */
static __thread XML_Parser work;
static __thread bool watch_next;     /* the next parser made is the stream's */
static __thread const char *refused; /* what stopped the watched parser, until read */
static __thread enum xa_xml_stop kind; /* and why */
static __thread bool halted;         /* the watched parser stopped: what comes after is not read */
/* The watched parser's stanza cap (0: none), set with the watch. */
static __thread long cap, cap_next;
static __thread XML_StartElementHandler their_start; /* the element handlers set on the watched parser */
static __thread XML_EndElementHandler their_end;
static __thread XML_CharacterDataHandler their_chars;
static __thread void *their_user; /* and its user data */
static __thread int depth;        /* its open elements: 1 inside <stream:stream>, 2 and more in a stanza */
static __thread XML_Index stanza_at; /* where the stanza in progress starts (its '<') */
static __thread XML_Index fed;       /* bytes given to work since it was made */
/* A stanza past the cap is cut: its elements open then (levels 2 to
 * cut_open; 0: none cut) are the ones the handlers set have; they are
 * given their ends and nothing else of it, and cut_ending is true while
 * the stanza's own end is handled (xa_xml_cut). */
static __thread int cut_open;
static __thread bool cut_ending;
/* The stanza being cut was cut for its depth (XA_STANZA_DEPTH_MAX), not
 * its size: until its end is handled (xa_xml_cut_deep). */
static __thread bool cut_deep;
static __thread bool ended; /* </stream:stream> was read: nothing is open */
/* What work is made with: the watched parser's encoding, memory
 * functions and namespace separator. */
static __thread char *made_encoding;
static __thread XML_Memory_Handling_Suite made_mem; /* a copy: the caller's may not outlive the call */
static __thread bool made_own_mem;                  /* made_mem set (else malloc's) */
static __thread XML_Char made_sep;
static __thread bool made_ns;
/* The encoding the stream's XML declaration named (a renewed work is made
 * with it, as it reads the header again without the declaration). */
static __thread char *decl_encoding;
/* The stream's start tag as it came (replayed into a renewed work), the
 * bytes expat holds for work, the bound past which it is renewed, the
 * renewals not yet told (xa_xml_renewed), and whether the header is being
 * replayed (the handlers set are not told). */
static __thread char *header;
static __thread int header_len;
static __thread long held, renew_at;
static __thread unsigned long renewals;
static __thread bool replaying;
/* A renewal due: work was stopped (suspended) at the end of a stanza, the
 * byte after which is renew_from; renew_inline: feed gives a read as
 * bytes of its own, which the stop may leave the rest of to a new work
 * (not so a read in expat's buffer, XML_ParseBuffer). */
static __thread bool renew_due, renew_inline;
static __thread XML_Index renew_from;
static __thread const char *renew_off; /* why renewal ended for this stream, until read */
/* Reads held back within a long token (take), and the bytes expat
 * scanned (xa_xml_scanned). */
static __thread struct cw_buf hold = { .max = INT_MAX }; /* feed takes an int */
static __thread long scanned;

/* ------------------------------------------------------------ work's memory */

/* Expat's memory for work goes through these: each block has its size in
 * front (MM_HEAD bytes, keeping malloc's alignment), added to held; the
 * blocks themselves come from the memory functions the watched parser
 * was made with (libstrophe's), else from malloc.  Work is made, used and
 * freed on its stream's thread only (the component thread). */
#define MM_HEAD 16

static void *mm_malloc(size_t n)
{
	if (n > SIZE_MAX - MM_HEAD)
		return NULL;
	char *b = made_own_mem ? made_mem.malloc_fcn(n + MM_HEAD) : malloc(n + MM_HEAD);
	if (!b)
		return NULL;
	*(size_t *)(void *)b = n;
	held += (long)n;
	return b + MM_HEAD;
}

static void *mm_realloc(void *q, size_t n)
{
	if (!q)
		return mm_malloc(n);
	if (n > SIZE_MAX - MM_HEAD)
		return NULL;
	char *b = (char *)q - MM_HEAD;
	size_t was = *(size_t *)(void *)b;
	b = made_own_mem ? made_mem.realloc_fcn(b, n + MM_HEAD) : realloc(b, n + MM_HEAD);
	if (!b)
		return NULL;
	*(size_t *)(void *)b = n;
	held += (long)n - (long)was;
	return b + MM_HEAD;
}

static void mm_free(void *q)
{
	if (!q)
		return;
	char *b = (char *)q - MM_HEAD;
	held -= (long)*(size_t *)(void *)b;
	if (made_own_mem)
		made_mem.free_fcn(b);
	else
		free(b);
}

static const XML_Memory_Handling_Suite counted = { mm_malloc, mm_realloc, mm_free };

static const char too_large[] = "a tag larger than the cap";
static const char header_too_large[] = "a stream header larger than the cap";
static const char too_deep[] = "elements nested deeper than the cap allows";

/* The watched parser stops: why is said once by xa_xml_refused. */
static void halt(enum xa_xml_stop k, const char *what)
{
	if (!refused) {
		refused = what;
		kind = k;
	}
	halted = true;
}

static void refuse(const char *what)
{
	if (!cur) /* cannot be: parsing starts in XML_Parse or XML_ParseBuffer below (libstrophe never resumes) */
		return;
	if (cur == work) {
		halt(XA_XML_RESTRICTED, what);
		XML_StopParser(cur, XML_TRUE);
	} else {
		XML_StopParser(cur, XML_FALSE);
	}
}

/* The element handlers of the watched parser, in front of the ones set on
 * it.  Only the watched parser has them, and its handlers run only inside
 * XML_Parse or XML_ParseBuffer below, so cur is that parser.  They count
 * the depth and note where a stanza starts; its size is not checked here:
 * the parser is never given more than the cap's bytes of what it holds
 * open (feed below), so a stanza whose end it sees uncut is within the
 * cap.  Of a cut stanza they pass on only the ends of the elements
 * libstrophe has open.  Once the parser is stopped, what expat still
 * calls back (such as the end of an empty element) does not reach
 * libstrophe. */
/* The stream's start tag, as it came, for a renewed work to read again
 * (expat hands it over whole; none without XML_CONTEXT_BYTES: no renewal
 * then). */
static void keep_header(void)
{
	int offset = 0, size = 0;
	const char *in = real.context(cur, &offset, &size);
	int n = real.count(cur);
	free(header);
	header = NULL;
	header_len = 0;
	if (!in || n <= 0 || offset < 0 || offset > size - n)
		return;
	header = malloc((size_t)n);
	if (header) {
		memcpy(header, in + offset, (size_t)n);
		header_len = n;
	}
}

static void XMLCALL on_start(void *u, const XML_Char *name, const XML_Char **atts)
{
	if (halted)
		return;
	if (depth == 0 && !replaying)
		keep_header();
	if (depth++ == 1)
		stanza_at = real.index(cur);
	/* Each open element takes some 36 bytes of expat's memory, and a cut
	 * stanza is read on to its end: the elements open are held to what a
	 * stanza within the cap can open (three bytes each, "<a>"), or a cut
	 * one could nest without end (a review: 20 MiB of "<a>", 1 GB). */
	if (cap && depth > cap / 3) {
		halt(XA_XML_TOO_LARGE, too_deep);
		XML_StopParser(cur, XML_TRUE);
		return;
	}
	/* An element nested more than XA_STANZA_DEPTH_MAX levels into its
	 * stanza (the stanza itself is level 1, depth 2) cuts the stanza as
	 * the size cap does: libstrophe builds, copies, serialises and frees
	 * a stanza recursively, and a message of some 120,000 nested <a>
	 * (840 KB, within the default cap) overflowed the component
	 * thread's stack (a review of the fortieth session: the daemon died
	 * of SIGSEGV).  No stanza XMPP defines nests anywhere near as deep. */
	if (!cut_open && !replaying && depth - 1 > XA_STANZA_DEPTH_MAX) {
		cut_open = depth - 1;
		cut_deep = true;
	}
	if (their_start && !cut_open && !replaying)
		their_start(u, name, atts);
}

/* At a stanza's end, once work holds more than its bound: work stops
 * there (resumable: expat suspends after this event), for feed to renew
 * it and give the rest of the read to the new one. */
static void renew_after(int level)
{
	if (level == 2 && renew_inline && !replaying && header && held > renew_at && !halted) {
		renew_due = true;
		renew_from = real.index(cur) + real.count(cur);
		real.stop(cur, XML_TRUE);
	}
}

static void XMLCALL on_end(void *u, const XML_Char *name)
{
	if (halted)
		return;
	int level = depth--; /* of the element ending: 1 the stream, 2 a stanza */
	ended = ended || level == 1;
	if (cut_open) {
		if (level > cut_open)
			return; /* begun after the cut: the handlers set never had it */
		cut_open = level - 1; /* the innermost of theirs */
		if (level == 2) {
			cut_open = 0;
			cut_ending = true;
		}
	}
	if (their_end)
		their_end(u, name);
	cut_ending = false;
	if (level == 2)
		cut_deep = false;
	renew_after(level);
}

static void XMLCALL on_chars(void *u, const XML_Char *s, int len)
{
	if (!halted && !cut_open && their_chars)
		their_chars(u, s, len);
}

/* Where what the watched parser holds open starts: the stream header (at
 * depth 0: from the stream's first byte, its XML declaration included, to
 * the '>' of <stream:stream ...>), the stanza in progress, or between
 * stanzas what expat holds unparsed (from the position of its last event:
 * a start tag still coming; the end of the bytes read when it holds
 * none). */
static XML_Index open_from(void)
{
	if (depth == 0)
		return ended ? fed : 0;
	if (depth >= 2 && !cut_open)
		return stanza_at;
	XML_Index at = real.index(work);
	return at >= 0 ? at : fed;
}

/* The watched parser is given a read (len bytes at s, or len bytes of its
 * own buffer) at most up to the cap's bytes of what it holds open: a
 * stanza still open there is larger than the cap, and is cut; a tag (or
 * the header) still open there stops the parser without reading further.
 * Whatever ends within those
 * bytes is within the cap (it started no earlier than what was open), so
 * a read is cut only where the cap falls inside it: of a stanza past the
 * cap, the handlers set on the parser (libstrophe's, which build it) are
 * given no more than its first cap bytes. */
static bool renew(void);

/* The bytes of a token p holds unfinished: from where its last event
 * ended to the end of what it was given. */
static XML_Index unfinished(XML_Parser p)
{
	XML_Index at = real.index(p);
	return at >= 0 && at <= fed ? fed - at : 0;
}

static enum XML_Status feed(XML_Parser p, const char *s, int len, int final, bool buffer)
{
	enum XML_Status st;
	for (;;) {
		int n = len;
		XML_Index room = cap ? open_from() + cap - fed : len;
		if (room < 0) /* cannot be: a piece reaching the cap is checked below */
			room = 0;
		if (room < n)
			n = (int)room;
		scanned += n + unfinished(p); /* expat scans again what it holds unfinished */
		renew_inline = !buffer;
		st = buffer ? real.parse_buffer(p, n, final && n == len) : real.parse(p, s, n, final && n == len);
		renew_inline = false;
		if (renew_due) { /* stopped at a stanza's end (renew_after): the rest to a new work */
			renew_due = false;
			XML_Index used = renew_from - fed;
			if (st == XML_STATUS_SUSPENDED && !halted && used >= 0 && used <= n && renew()) {
				p = work;
				s += used;
				len -= (int)used;
				if (len == 0) /* the end of the document, if it was, to the new one */
					return final ? real.parse(work, "", 0, XML_TRUE) : XML_STATUS_OK;
				continue;
			}
			if (st == XML_STATUS_SUSPENDED && !halted) /* not renewed (renew says why): read on */
				st = real.resume(p);
		}
		if (st == XML_STATUS_ERROR || halted)
			return st;
		fed += n;
		if (s)
			s += n;
		len -= n;
		if (cap && n == room && fed - open_from() >= cap) { /* still open after the cap's bytes */
			if (depth < 2 || cut_open) { /* the header, or a tag */
				halt(XA_XML_TOO_LARGE, depth == 0 ? header_too_large : too_large);
				return XML_STATUS_SUSPENDED;
			}
			cut_open = depth; /* a stanza: cut, and read on to its end */
		}
		if (st != XML_STATUS_OK || len == 0)
			return st;
	}
}

/* A read for the watched parser.  Expat 2.5 scans a token still coming
 * (a tag) from its start again at each read it is given: a tag of 1 MiB
 * in libstrophe's 4 KiB reads was scanned some 128 MB.  Within a token of
 * hold_from bytes or more, a read without a '>' is held back while, with
 * those held before it, it is shorter than what expat holds of the token,
 * so that each scan at least doubles what it has (the scanning of a token
 * is then linear, whatever the reads' sizes or times).  No tag, stanza,
 * header or markup XMPP forbids ends without a '>', so what is held can
 * end none of them: a read with a '>' is given at once, with what is held
 * before it, and nothing waits for a timer (a review of a first version,
 * which held any read and read what was held after 10 ms without one,
 * found that steady traffic after a long tag held every stanza back, and
 * that a slow link made the scanning quadratic again).  The server
 * escapes '>' in attribute values (Prosody does), so a long tag has
 * none before its end; one that did not would only cost the rescans.
 * The bytes held are fewer than what expat holds, itself within the cap
 * (their buffer, doubled as it grows, under twice that, and freed after
 * such a token).  Below hold_from a scan costs little.  What is held is
 * given by the next read: a tag past the cap, or bytes that are not XML,
 * held and followed by nothing, are told then. */
#define HOLD_FROM 16384
static __thread long hold_from = HOLD_FROM;

static bool hold_back(const char *s, int len) { return cw_buf_add(&hold, s, (size_t)len) == CW_OK; }

/* What was held is being given: none is held from now on (a flush from a
 * handler then finds nothing), and a buffer a long token grew is given
 * back after (the next such token grows one again). */
static int hold_given(void)
{
	int n = (int)hold.len;
	hold.len = 0;
	hold.overflow = false;
	return n;
}

static void hold_shrink(void)
{
	if (hold.alloc > 4 * HOLD_FROM)
		cw_buf_free(&hold);
}

static enum XML_Status take(const char *s, int len, int final)
{
	XML_Index open = unfinished(work);
	if (!final && open >= hold_from && (XML_Index)hold.len + len < open && !memchr(s, '>', (size_t)len) &&
	    hold_back(s, len))
		return XML_STATUS_OK;
	if (hold.len) { /* given with what is held, in one scan */
		bool with = hold_back(s, len);
		int n = hold_given();
		enum XML_Status st = feed(work, hold.p, n, with ? final : XML_FALSE, false);
		hold_shrink();
		if (with || st != XML_STATUS_OK || halted)
			return st; /* what follows is not read (halted), as after a stop */
		return feed(work, s, len, final, false);
	}
	return feed(work, s, len, final, false);
}

static void XMLCALL on_doctype(void *u, const XML_Char *name, const XML_Char *sysid, const XML_Char *pubid,
			       int internal_subset)
{
	refuse("a DOCTYPE");
}

static void XMLCALL on_entity(void *u, const XML_Char *name, int parameter, const XML_Char *value, int len,
			      const XML_Char *base, const XML_Char *sysid, const XML_Char *pubid,
			      const XML_Char *notation)
{
	refuse("an entity declaration");
}

static void XMLCALL on_comment(void *u, const XML_Char *data) { refuse("a comment"); }

static void XMLCALL on_pi(void *u, const XML_Char *target, const XML_Char *data)
{
	refuse("a processing instruction");
}

/* The stream's XML declaration: the encoding it names, for renew. */
static void XMLCALL on_decl(void *u, const XML_Char *version, const XML_Char *encoding, int standalone)
{
	free(decl_encoding);
	decl_encoding = encoding && strlen(encoding) < 64 ? strdup(encoding) : NULL;
}

static XML_Parser guard(XML_Parser p)
{
	if (!p)
		return NULL;
	XML_SetStartDoctypeDeclHandler(p, on_doctype);
	XML_SetEntityDeclHandler(p, on_entity);
	XML_SetCommentHandler(p, on_comment);
	XML_SetProcessingInstructionHandler(p, on_pi);
	if (p == work) { /* made, reset or renewed: nothing read */
		XML_SetXmlDeclHandler(p, on_decl);
		real.set_element(p, on_start, on_end);
		real.set_chars(p, on_chars);
		/* expat 2.6 may leave a token still coming unparsed for a few
		 * reads (reparse deferral): its events, and the position of
		 * what is open, would come late to the count.  No token is
		 * longer than the cap here, which bounds what parsing it again
		 * costs. */
		if (real.set_deferral && cap)
			real.set_deferral(p, XML_FALSE);
	}
	return p;
}

/* A new work, guarded, with nothing read. */
static XML_Parser make_work(void)
{
	work = real.create_mm(made_encoding ? made_encoding : decl_encoding, &counted, made_ns ? &made_sep : NULL);
	return guard(work);
}

/* The watched parser made or reset: a stream from its start, with no
 * handlers or user data set (as expat's reset leaves a parser). */
static void fresh_stream(void)
{
	their_start = NULL;
	their_end = NULL;
	their_chars = NULL;
	their_user = NULL;
	cut_open = 0;
	cut_ending = false;
	cut_deep = false;
	ended = false;
	depth = 0;
	stanza_at = fed = 0;
	free(header);
	header = NULL;
	header_len = 0;
	renewals = 0;
	hold_given();
	hold_shrink();
	renew_due = false;
	renew_off = NULL;
	free(decl_encoding);
	decl_encoding = NULL;
}

/* Work is renewed, stopped at a stanza's end (renew_after): a new one,
 * made with the encoding the stream declared, reads the stream's start
 * tag again (the handlers set are not told), and the old one is freed,
 * with every name it kept.  If the new one cannot be made, the old one
 * goes on (the next stanza's end tries again); if it cannot read the
 * header again (it read it once: a server that changed encodings, say),
 * renewal ends for this stream, and renew_off says why once. */
static bool renew(void)
{
	XML_Parser old = work;
	if (!make_work()) {
		work = old;
		return false;
	}
	cur = work;
	real.set_user(work, their_user);
	depth = 0;
	replaying = true;
	enum XML_Status st = real.parse(work, header, header_len, XML_FALSE);
	replaying = false;
	if (st != XML_STATUS_OK || halted || depth != 1) {
		bool no_memory = real.error(work) == XML_ERROR_NO_MEMORY;
		real.free(work);
		work = cur = old;
		depth = 1;
		halted = false;
		if (no_memory) /* the next stanza's end tries again */
			return false;
		free(header);
		header = NULL;
		renew_off = "the stream's start tag could not be read again";
		return false;
	}
	fed = header_len;
	real.free(old);
	renewals++;
	return true;
}

static long bound_for(long c)
{
	const long floor = 1L << 20;
	return c > floor / 2 ? 2 * c : floor;
}

/* The arguments a parser is made with, kept if it is to be watched. */
static void making(const XML_Char *encoding, const XML_Memory_Handling_Suite *mem, const XML_Char *sep)
{
	if (!watch_next)
		return;
	free(made_encoding);
	made_encoding = encoding ? strdup(encoding) : NULL;
	made_own_mem = mem != NULL;
	if (mem)
		made_mem = *mem;
	made_ns = sep != NULL;
	made_sep = sep ? *sep : 0;
}

static void forget_work(void)
{
	if (work)
		real.free(work);
	work = NULL;
	free(header);
	header = NULL;
	header_len = 0;
	cw_buf_free(&hold);
	free(decl_encoding);
	decl_encoding = NULL;
}

static XML_Parser made(XML_Parser p)
{
	if (p && watch_next) {
		watch_next = false;
		cap = cap_next;
		if (!make_work()) {
			real.free(p);
			return NULL;
		}
		watched = p;
		refused = NULL;
		halted = false;
		renew_at = bound_for(cap);
		fresh_stream();
	}
	return guard(p);
}

/* A stream that is not well-formed XML fails the parse (libstrophe then
 * answers invalid-xml, and would wait for the server to close): the
 * thread is told too, and closes it. */
static enum XML_Status parsed(XML_Parser p, enum XML_Status st)
{
	if (st == XML_STATUS_ERROR && p == work && !refused)
		halt(XA_XML_BROKEN, XML_ErrorString(real.error(p)));
	return st;
}

/* ------------------------------------------------------------ expat's, in front */

XML_Parser XML_ParserCreate(const XML_Char *encoding)
{
	pthread_once(&real_once, find_real);
	making(encoding, NULL, NULL);
	return made(real.create(encoding));
}

XML_Parser XML_ParserCreateNS(const XML_Char *encoding, XML_Char sep)
{
	pthread_once(&real_once, find_real);
	making(encoding, NULL, &sep);
	return made(real.create_ns(encoding, sep));
}

XML_Parser XML_ParserCreate_MM(const XML_Char *encoding, const XML_Memory_Handling_Suite *mem, const XML_Char *sep)
{
	pthread_once(&real_once, find_real);
	making(encoding, mem, sep);
	return made(real.create_mm(encoding, mem, sep));
}

XML_Bool XML_ParserReset(XML_Parser p, const XML_Char *encoding)
{
	pthread_once(&real_once, find_real);
	XML_Bool ok = real.reset(p, encoding);
	if (ok && p == watched) { /* a new work: nothing kept of the old one's */
		XML_Parser old = work;
		if (encoding) {
			free(made_encoding);
			made_encoding = strdup(encoding);
		}
		if (!make_work()) {
			work = old;
			return XML_FALSE;
		}
		real.free(old);
		halted = false;
		fresh_stream();
	}
	if (ok)
		guard(p);
	return ok;
}

void XML_ParserFree(XML_Parser p)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched) {
		forget_work();
		watched = NULL;
		refused = NULL;
		halted = false;
		free(made_encoding);
		made_encoding = NULL;
	}
	real.free(p);
}

/* The watched parser keeps its own element handlers, in front of the
 * ones set (the cap's depth). */
void XML_SetElementHandler(XML_Parser p, XML_StartElementHandler start, XML_EndElementHandler end)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched) {
		their_start = start;
		their_end = end;
	} else {
		real.set_element(p, start, end);
	}
}

void XML_SetStartElementHandler(XML_Parser p, XML_StartElementHandler start)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched)
		their_start = start;
	else
		real.set_start(p, start);
}

void XML_SetEndElementHandler(XML_Parser p, XML_EndElementHandler end)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched)
		their_end = end;
	else
		real.set_end(p, end);
}

void XML_SetCharacterDataHandler(XML_Parser p, XML_CharacterDataHandler chars)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched)
		their_chars = chars;
	else
		real.set_chars(p, chars);
}

/* What the server sends after the watched parser stopped (its closing
 * </stream:stream>, while refuse_stream waits for it to close) is taken
 * unread: fed to the stopped parser it would fail, and libstrophe would
 * write invalid-xml after the stream's end (a review's find). */
enum XML_Status XML_Parse(XML_Parser p, const char *s, int len, int final)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched && halted)
		return XML_STATUS_OK;
	XML_Parser outer = cur; /* a stanza handler may parse a string of its own */
	bool ours = p && p == watched;
	cur = ours ? work : p;
	enum XML_Status st = ours ? take(s, len, final) : real.parse(p, s, len, final);
	st = parsed(ours ? work : p, st); /* work may be a new one (renew) */
	cur = outer;
	return st;
}

enum XML_Status XML_ParseBuffer(XML_Parser p, int len, int final)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched && halted)
		return XML_STATUS_OK;
	XML_Parser outer = cur;
	bool ours = p && p == watched;
	cur = ours ? work : p;
	enum XML_Status st = ours ? feed(work, NULL, len, final, true) : real.parse_buffer(p, len, final);
	st = parsed(ours ? work : p, st);
	cur = outer;
	return st;
}

/* The rest of what may be asked of the watched parser is work's. */
static XML_Parser reads(XML_Parser p)
{
	pthread_once(&real_once, find_real);
	return p && p == watched ? work : p;
}

void XML_SetUserData(XML_Parser p, void *user)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched) {
		their_user = user;
		real.set_user(work, user);
	}
	real.set_user(p, user);
}

enum XML_Error XML_GetErrorCode(XML_Parser p) { return real.error(reads(p)); }
XML_Index XML_GetCurrentByteIndex(XML_Parser p) { return real.index(reads(p)); }
int XML_GetCurrentByteCount(XML_Parser p) { return real.count(reads(p)); }
XML_Size XML_GetCurrentLineNumber(XML_Parser p) { return real.line(reads(p)); }
XML_Size XML_GetCurrentColumnNumber(XML_Parser p) { return real.column(reads(p)); }
enum XML_Status XML_StopParser(XML_Parser p, XML_Bool resumable) { return real.stop(reads(p), resumable); }
enum XML_Status XML_ResumeParser(XML_Parser p) { return real.resume(reads(p)); }
void *XML_GetBuffer(XML_Parser p, int len)
{
	if (p && p == watched) /* what is held goes before what the buffer will hold */
		xa_xml_flush();
	return real.get_buffer(reads(p), len);
}
void XML_GetParsingStatus(XML_Parser p, XML_ParsingStatus *status) { real.status(reads(p), status); }
const char *XML_GetInputContext(XML_Parser p, int *offset, int *size) { return real.context(reads(p), offset, size); }

/* ------------------------------------------------------------ the adapter's */

void xa_xml_watch(bool on, long max_stanza_bytes)
{
	watch_next = on;
	cap_next = on ? max_stanza_bytes : 0;
}

bool xa_xml_cut(void) { return cut_ending; }

bool xa_xml_cut_deep(void) { return cut_ending && cut_deep; }

long xa_xml_held(void) { return work ? held : 0; }

long xa_xml_renew_bound(void) { return renew_at; }

void xa_xml_renew_at(long bytes) { renew_at = bytes; }

bool xa_xml_holding(void) { return hold.len > 0; }

void xa_xml_hold_from(long bytes) { hold_from = bytes > 0 ? bytes : HOLD_FROM; }

const char *xa_xml_renewal_off(void)
{
	const char *why = renew_off;
	renew_off = NULL;
	return why;
}

void xa_xml_flush(void)
{
	if (!hold.len || !work)
		return;
	XML_Parser outer = cur;
	cur = work;
	int n = hold_given();
	if (!halted)
		parsed(work, feed(work, hold.p, n, XML_FALSE, false));
	cur = outer;
}

long xa_xml_scanned(void)
{
	long n = scanned;
	scanned = 0;
	return n;
}

unsigned long xa_xml_renewed(void)
{
	unsigned long n = renewals;
	renewals = 0;
	return n;
}

const char *xa_xml_refused(enum xa_xml_stop *why)
{
	const char *r = refused;
	*why = kind;
	refused = NULL;
	kind = XA_XML_RESTRICTED;
	return r;
}

/* A stream's parser made and freed as the component thread makes it: it
 * comes through XML_ParserCreate* above only if libstrophe's parser is
 * this process's expat. */
bool xa_xml_guards_libstrophe(void)
{
	xmpp_ctx_t *ctx = xmpp_ctx_new(NULL, NULL);
	if (!ctx)
		return false;
	xa_xml_watch(true, 0);
	xmpp_conn_t *conn = xmpp_conn_new(ctx);
	xa_xml_watch(false, 0);
	bool ok = watched != NULL;
	if (conn)
		xmpp_conn_release(conn); /* and its parser: watched no more */
	xmpp_ctx_free(ctx);
	return ok;
}
