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
 * The handlers fire on forbidden markup only: a stanza costs what it did,
 * plus a few instructions per read (docs/xmpp.md, "Restricted XML"). */
#include "config.h"
#include "xmpp_int.h"

#include <dlfcn.h>
#include <expat.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

typedef XML_Parser (*create_fn)(const XML_Char *);
typedef XML_Parser (*create_ns_fn)(const XML_Char *, XML_Char);
typedef XML_Parser (*create_mm_fn)(const XML_Char *, const XML_Memory_Handling_Suite *, const XML_Char *);
typedef XML_Bool (*reset_fn)(XML_Parser, const XML_Char *);
typedef void (*free_fn)(XML_Parser);
typedef enum XML_Status (*parse_fn)(XML_Parser, const char *, int, int);
typedef enum XML_Status (*parse_buffer_fn)(XML_Parser, int, int);

static struct {
	create_fn create;
	create_ns_fn create_ns;
	create_mm_fn create_mm;
	reset_fn reset;
	free_fn free;
	parse_fn parse;
	parse_buffer_fn parse_buffer;
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
}

static __thread XML_Parser cur;      /* the parser this thread's XML_Parse runs */
static __thread XML_Parser watched;  /* this thread's stream's parser */
static __thread bool watch_next;     /* the next parser made is the stream's */
static __thread const char *refused; /* what stopped the watched parser, until read */
static __thread bool broken;         /* that was not well-formed XML (expat's own error) */
static __thread bool halted;         /* the watched parser stopped: what comes after is not read */

static void refuse(const char *what)
{
	if (!cur) /* cannot be: parsing starts in XML_Parse or XML_ParseBuffer below (libstrophe never resumes) */
		return;
	if (cur == watched) {
		if (!refused)
			refused = what;
		halted = true;
		XML_StopParser(cur, XML_TRUE);
	} else {
		XML_StopParser(cur, XML_FALSE);
	}
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

static XML_Parser guard(XML_Parser p)
{
	if (!p)
		return NULL;
	XML_SetStartDoctypeDeclHandler(p, on_doctype);
	XML_SetEntityDeclHandler(p, on_entity);
	XML_SetCommentHandler(p, on_comment);
	XML_SetProcessingInstructionHandler(p, on_pi);
	return p;
}

static XML_Parser made(XML_Parser p)
{
	if (p && watch_next) {
		watched = p;
		watch_next = false;
		refused = NULL;
		broken = halted = false;
	}
	return guard(p);
}

/* A stream that is not well-formed XML fails the parse (libstrophe then
 * answers invalid-xml, and would wait for the server to close): the
 * thread is told too, and closes it. */
static enum XML_Status parsed(XML_Parser p, enum XML_Status st)
{
	if (st == XML_STATUS_ERROR && p == watched && !refused) {
		refused = XML_ErrorString(XML_GetErrorCode(p));
		broken = halted = true;
	}
	return st;
}

/* ------------------------------------------------------------ expat's, in front */

XML_Parser XML_ParserCreate(const XML_Char *encoding)
{
	pthread_once(&real_once, find_real);
	return made(real.create(encoding));
}

XML_Parser XML_ParserCreateNS(const XML_Char *encoding, XML_Char sep)
{
	pthread_once(&real_once, find_real);
	return made(real.create_ns(encoding, sep));
}

XML_Parser XML_ParserCreate_MM(const XML_Char *encoding, const XML_Memory_Handling_Suite *mem, const XML_Char *sep)
{
	pthread_once(&real_once, find_real);
	return made(real.create_mm(encoding, mem, sep));
}

XML_Bool XML_ParserReset(XML_Parser p, const XML_Char *encoding)
{
	pthread_once(&real_once, find_real);
	XML_Bool ok = real.reset(p, encoding);
	if (ok) {
		if (p == watched)
			halted = false;
		guard(p);
	}
	return ok;
}

void XML_ParserFree(XML_Parser p)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched) {
		watched = NULL;
		refused = NULL;
		broken = halted = false;
	}
	real.free(p);
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
	cur = p;
	enum XML_Status st = real.parse(p, s, len, final);
	cur = outer;
	return parsed(p, st);
}

enum XML_Status XML_ParseBuffer(XML_Parser p, int len, int final)
{
	pthread_once(&real_once, find_real);
	if (p && p == watched && halted)
		return XML_STATUS_OK;
	XML_Parser outer = cur;
	cur = p;
	enum XML_Status st = real.parse_buffer(p, len, final);
	cur = outer;
	return parsed(p, st);
}

/* ------------------------------------------------------------ the adapter's */

void xa_xml_watch(bool on)
{
	watch_next = on;
}

const char *xa_xml_refused(bool *not_well_formed)
{
	const char *r = refused;
	*not_well_formed = broken;
	refused = NULL;
	broken = false;
	return r;
}
