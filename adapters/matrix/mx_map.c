/* Matrix events <-> neutral events, and the HTML sanitiser (see mx_map.h). */
#include "config.h"
#include "matrix/mx_map.h"
#include "matrix/mx_id.h"
#include "buf.h"
#include "html.h"
#include "peer/event.h"
#include "media.h"

#include <libxml/HTMLparser.h>
#include <libxml/SAX2.h>
#include <libxml/parserInternals.h>
#include <libxml/tree.h>
#include <libxml/uri.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HTML_INPUT_MAX (1024 * 1024)  /* bytes mx_sanitize_html takes */
#define HTML_DEPTH_MAX 100            /* the spec's nesting limit */
#define EPHEMERAL_MAX 1024            /* items of one ephemeral event */
/* Room left in an event for the sender and room URIs the caller adds. */
#define ENVELOPE_RESERVE (2 * MIMI_URI_MAX + 64)

static const char HTML_FORMAT[] = "org.matrix.custom.html";
static const char EDIT_NEEDS_NEW_CONTENT[] = "an edit (m.replace) needs m.new_content as an object";

/* ------------------------------------------------------------ small helpers */

__attribute__((format(printf, 3, 4)))
static void say(char *why, size_t whylen, const char *fmt, ...)
{
	if (!why || !whylen)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, whylen, fmt, ap);
	va_end(ap);
}

static bool starts_with(const char *s, const char *prefix)
{
	return strncmp(s, prefix, strlen(prefix)) == 0;
}

static const char *str_member(const json_t *obj, const char *key)
{
	return json_string_value(json_object_get(obj, key));
}

/* cw_buf appends that remember any failure (cap or memory) in overflow. */
static void add(struct cw_buf *b, const char *s, size_t n)
{
	if (!b->overflow && cw_buf_add(b, s, n) != CW_OK)
		b->overflow = true;
}

static void adds(struct cw_buf *b, const char *s)
{
	add(b, s, strlen(s));
}

static void add_escaped(struct cw_buf *b, const char *s, bool attr)
{
	const char *run = s;
	for (; *s; s++) {
		const char *rep = NULL;
		switch (*s) {
		case '&': rep = "&amp;"; break;
		case '<': rep = "&lt;"; break;
		case '>': rep = "&gt;"; break;
		case '"': rep = attr ? "&quot;" : NULL; break;
		default: break;
		}
		if (rep) {
			add(b, run, (size_t)(s - run));
			adds(b, rep);
			run = s + 1;
		}
	}
	add(b, run, (size_t)(s - run));
}

/* The content of b as a malloc'd string, or NULL after a failure. */
static char *take(struct cw_buf *b)
{
	if (b->overflow) {
		cw_buf_free(b);
		return NULL;
	}
	return cw_buf_take(b, NULL);
}

/* ------------------------------------------------------------ HTML */

static pthread_once_t xml_once = PTHREAD_ONCE_INIT;

/* The HTML parser context a thread keeps between parses (html_parse). */
static pthread_key_t html_ctxt_key;
static bool html_ctxt_keyed;

static void html_ctxt_release(void *ctxt)
{
	htmlFreeParserCtxt(ctxt);
}

static void xml_init(void)
{
	xmlInitParser();
	html_ctxt_keyed = pthread_key_create(&html_ctxt_key, html_ctxt_release) == 0;
}

/* What a fragment is parsed after, so that it is parsed as body content
 * (libxml2 would otherwise imply a <p> around leading text). */
static const char BODY_OPEN[] = "<html><body>";
#define BODY_OPEN_LEN (sizeof(BODY_OPEN) - 1)

/* The code points of numeric character references 0x80 to 0x9F as HTML
 * reads them (windows-1252; 0: left as it is). */
static const unsigned short c1_refs[32] = {
	0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039, 0x0152, 0, 0x017D, 0,
	0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178,
};

/* For the numeric character reference at p (n bytes, p[0..1] "&#"): into
 * rep what libxml2 is to read for it, as HTML reads it, and the bytes of
 * it replaced; 0 when it is read right as it is.  libxml2 2.9 drops a
 * "&#" without digits with the text after it up to a non-digit ("a &# b"
 * read "a  b", "&#xZZ" "ZZ", and an href "?a=1&#b" lost its "#b"), drops
 * the references to no character (0, surrogates, past U+10FFFF) or to C0
 * controls, and reads 0x80 to 0x9F as C1 controls, not as the characters
 * a browser shows ("&#150;" of a word processor's HTML is an en dash). */
static size_t numeric_ref(const unsigned char *p, size_t n, char *rep, size_t size)
{
	bool hex = n > 2 && (p[2] == 'x' || p[2] == 'X');
	size_t i = hex ? 3 : 2, start = i;
	unsigned long v = 0;
	for (; i < n; i++) {
		unsigned d;
		if (p[i] >= '0' && p[i] <= '9')
			d = p[i] - '0';
		else if (hex && (p[i] | 0x20) >= 'a' && (p[i] | 0x20) <= 'f')
			d = (unsigned)((p[i] | 0x20) - 'a' + 10);
		else
			break;
		v = v > 0x10FFFF ? v : v * (hex ? 16 : 10) + d;
	}
	if (i == start) { /* no digits: the '&' is text */
		snprintf(rep, size, "&amp;");
		return 1;
	}
	if (i < n && p[i] == ';')
		i++;
	if (v >= 0x80 && v <= 0x9F && c1_refs[v - 0x80])
		v = c1_refs[v - 0x80];
	else if (v == 0 || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF) || v == 0xFFFE || v == 0xFFFF ||
		 (v < 0x20 && v != '\t' && v != '\n' && v != '\r' && v != '\f'))
		v = 0xFFFD;
	else
		return 0;
	snprintf(rep, size, "&#x%lX;", v);
	return i;
}

/* BODY_OPEN, then s as valid UTF-8 without NUL and the characters XML/HTML
 * parsers refuse (C0 controls but tab, LF, CR; U+FFFE, U+FFFF): each bad
 * byte or character becomes U+FFFD; and each numeric character reference
 * as HTML reads it (numeric_ref).  Nothing is added after s: what an
 * unfinished construct at its end (an attribute value, a doctype) takes in
 * would show. */
static char *clean_input(const char *s, size_t n, size_t *outlen)
{
	struct cw_buf b;
	cw_buf_init(&b, n * 3 + BODY_OPEN_LEN + 1);
	add(&b, BODY_OPEN, BODY_OPEN_LEN);
	const unsigned char *p = (const unsigned char *)s, *run = p; /* run: the good bytes not added yet */
	while (n) {
		char rep[16];
		size_t r = n >= 2 && p[0] == '&' && p[1] == '#' ? numeric_ref(p, n, rep, sizeof(rep)) : 0;
		if (r) {
			add(&b, (const char *)run, (size_t)(p - run));
			adds(&b, rep);
			p += r;
			n -= r;
			run = p;
			continue;
		}
		size_t l = cw_utf8_seq(p, n, NULL);
		bool bad = l == 0 || (l == 1 && *p < 0x20 && *p != '\t' && *p != '\n' && *p != '\r') ||
			   (l == 3 && p[0] == 0xEF && p[1] == 0xBF && (p[2] == 0xBE || p[2] == 0xBF));
		if (bad) {
			add(&b, (const char *)run, (size_t)(p - run));
			add(&b, "\xEF\xBF\xBD", 3);
			l = l ? l : 1;
			run = p + l;
		}
		p += l;
		n -= l;
	}
	add(&b, (const char *)run, (size_t)(p - run));
	if (b.overflow) {
		cw_buf_free(&b);
		return NULL;
	}
	return cw_buf_take(&b, outlen);
}

static const char *const allowed_tags[] = {
	"del", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "p", "a", "ul", "ol", "sup", "sub", "li",
	"b", "i", "u", "strong", "em", "s", "code", "hr", "br", "div", "table", "thead", "tbody", "tr", "th",
	"td", "caption", "pre", "span", "details", "summary", NULL,
};
static const char *const void_tags[] = { "br", "hr", NULL };

static bool digits_ok(const char *v)
{
	size_t n = strlen(v);
	if (n == 0 || n > 9)
		return false;
	for (; *v; v++)
		if (*v < '0' || *v > '9')
			return false;
	return true;
}

static bool color_ok(const char *v)
{
	if (v[0] != '#' || strlen(v) != 7)
		return false;
	for (int i = 1; i < 7; i++) {
		char c = v[i];
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
			return false;
	}
	return true;
}

/* An absolute URL whose scheme is one a message link may have (v
 * cw_url_trim'd, clean_input having made every other C0 control U+FFFD:
 * until the forty-sixth session href=" https://x" lost its
 * href, which a browser follows). */
static bool href_ok(const char *v)
{
	static const char *const schemes[] = { "http", "https", "ftp", "mailto", "magnet", "matrix", NULL };
	char scheme[16];
	size_t i = 0;
	if (!((v[0] >= 'a' && v[0] <= 'z') || (v[0] >= 'A' && v[0] <= 'Z')))
		return false;
	while (v[i] && v[i] != ':') {
		char c = v[i];
		bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '+' ||
			  c == '-' || c == '.';
		if (!ok || i + 1 >= sizeof(scheme))
			return false;
		scheme[i] = (char)((c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c);
		i++;
	}
	if (v[i] != ':')
		return false;
	scheme[i] = '\0';
	return cw_in_list(scheme, schemes);
}

/* mxc://<server name>/<media id of [A-Za-z0-9_-]>. */
static bool mxc_ok(const char *v)
{
	char server[256];
	return mx_mxc_parse(v, server, sizeof(server), NULL);
}

static char *attr_value(xmlAttr *a)
{
	xmlChar *v = xmlNodeGetContent((xmlNode *)a);
	if (!v)
		return NULL;
	char *s = strdup((const char *)v);
	xmlFree(v);
	return s;
}

/* Writes one attribute, once per name (the first wins). */
static void emit_attr(struct cw_buf *b, const char *name, const char *value, char *seen, size_t seen_size)
{
	char key[40];
	snprintf(key, sizeof(key), "|%s|", name);
	if (strstr(seen, key))
		return;
	size_t l = strlen(seen);
	snprintf(seen + l, seen_size - l, "%s", key);
	add(b, " ", 1);
	adds(b, name);
	adds(b, "=\"");
	add_escaped(b, value, true);
	add(b, "\"", 1);
}

/* The language-* classes of a code element's class, or "" . */
static void language_classes(const char *v, char *out, size_t size)
{
	out[0] = '\0';
	size_t n = 0;
	while (*v) {
		while (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r' || *v == '\f')
			v++;
		const char *start = v;
		while (*v && *v != ' ' && *v != '\t' && *v != '\n' && *v != '\r' && *v != '\f')
			v++;
		size_t l = (size_t)(v - start);
		if (l > 9 && strncmp(start, "language-", 9) == 0) {
			bool ok = true;
			for (size_t i = 0; i < l; i++) {
				char c = start[i];
				if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
				      c == '_' || c == '+' || c == '#' || c == '.'))
					ok = false;
			}
			if (ok && n + l + 2 <= size) {
				if (n)
					out[n++] = ' ';
				memcpy(out + n, start, l);
				n += l;
				out[n] = '\0';
			}
		}
	}
}

/* The start tag of an allowed element with its permitted attributes. */
static void emit_start(struct cw_buf *b, xmlNode *n, const char *tag)
{
	const char *out_tag = strcmp(tag, "font") == 0 ? "span" : tag;
	struct cw_buf attrs;
	cw_buf_init(&attrs, 64 * 1024);
	char seen[512] = "";
	for (xmlAttr *a = n->properties; a; a = a->next) {
		const char *name = (const char *)a->name;
		char *v = attr_value(a);
		if (!v) {
			attrs.overflow = true;
			continue;
		}
		if (strcmp(tag, "span") == 0 || strcmp(tag, "font") == 0) {
			if ((strcmp(name, "data-mx-bg-color") == 0 || strcmp(name, "data-mx-color") == 0) && color_ok(v))
				emit_attr(&attrs, name, v, seen, sizeof(seen));
			else if (strcmp(tag, "font") == 0 && strcmp(name, "color") == 0 && color_ok(v))
				emit_attr(&attrs, "data-mx-color", v, seen, sizeof(seen));
			else if (strcmp(name, "data-mx-spoiler") == 0 || strcmp(name, "data-mx-maths") == 0)
				emit_attr(&attrs, name, v, seen, sizeof(seen));
		} else if (strcmp(tag, "a") == 0) {
			const char *href = strcmp(name, "href") == 0 ? cw_url_trim(v) : NULL;
			if (strcmp(name, "name") == 0 || strcmp(name, "target") == 0)
				emit_attr(&attrs, name, v, seen, sizeof(seen));
			else if (href && href_ok(href))
				emit_attr(&attrs, name, href, seen, sizeof(seen));
		} else if (strcmp(tag, "ol") == 0) {
			if (strcmp(name, "start") == 0 && digits_ok(v))
				emit_attr(&attrs, name, v, seen, sizeof(seen));
		} else if (strcmp(tag, "code") == 0) {
			char cls[256];
			if (strcmp(name, "class") == 0) {
				language_classes(v, cls, sizeof(cls));
				if (cls[0])
					emit_attr(&attrs, name, cls, seen, sizeof(seen));
			}
		} else if (strcmp(tag, "div") == 0) {
			if (strcmp(name, "data-mx-maths") == 0)
				emit_attr(&attrs, name, v, seen, sizeof(seen));
		}
		free(v);
	}
	add(b, "<", 1);
	adds(b, out_tag);
	if (attrs.overflow)
		b->overflow = true;
	else if (attrs.len)
		add(b, attrs.p, attrs.len);
	add(b, ">", 1);
	cw_buf_free(&attrs);
}

struct walker {
	struct cw_buf out;
	bool keep_reply;   /* mx-reply: keep its content (without the tag) */
	bool replied;      /* an mx-reply was met */
	int depth;         /* elements written and still open */
};

/* The name of the element written for n, or NULL (n->_private marks it). */
static const char *written_tag(xmlNode *n)
{
	if (!n->_private)
		return NULL;
	return strcmp((const char *)n->name, "font") == 0 ? "span" : (const char *)n->name;
}

/* Visits n on the way down; true to walk its children. */
static bool enter(void *arg, xmlNode *n)
{
	struct walker *w = arg;
	n->_private = NULL;
	if (n->type == XML_TEXT_NODE || n->type == XML_CDATA_SECTION_NODE) {
		/* Text right in <html> is the layout between a document's head
		 * and body (libxml2 puts any other text in an implied <p>). */
		bool layout = n->parent && n->parent->name && strcmp((const char *)n->parent->name, "html") == 0;
		if (n->content && !layout)
			add_escaped(&w->out, (const char *)n->content, false);
		return false;
	}
	if (n->type != XML_ELEMENT_NODE || !n->name)
		return false; /* comments, processing instructions, DTDs */
	const char *tag = (const char *)n->name;
	if (cw_html_hidden(tag))
		return false; /* the text's own list: until the fifty-first session noscript's content stayed */
	if (strcmp(tag, "mx-reply") == 0) {
		w->replied = true;
		return w->keep_reply;
	}
	if (strcmp(tag, "img") == 0) {
		xmlChar *alt = xmlGetProp(n, (const xmlChar *)"alt");
		if (alt)
			add_escaped(&w->out, (const char *)alt, false);
		xmlFree(alt);
		return false;
	}
	if ((cw_in_list(tag, allowed_tags) || strcmp(tag, "font") == 0) && w->depth < HTML_DEPTH_MAX) {
		emit_start(&w->out, n, tag);
		if (!cw_in_list(tag, void_tags)) {
			n->_private = (void *)n;
			w->depth++;
		}
	}
	return true;
}

/* Visits n on the way up (after its children). */
static void leave(void *arg, xmlNode *n)
{
	struct walker *w = arg;
	const char *tag = written_tag(n);
	if (tag) {
		add(&w->out, "</", 2);
		adds(&w->out, tag);
		add(&w->out, ">", 1);
		w->depth--;
		n->_private = NULL;
	}
}

static bool overflowed(void *arg)
{
	return ((struct walker *)arg)->out.overflow;
}

static const char AS_DOCUMENT = 'd', AS_FRAGMENT = 'f';

/* The startElement of a parse that implies no element: the first element
 * (the input's own, or a <p> around leading text) says whether the input is
 * a whole document, and a fragment's parse stops there. */
static void first_element(void *ctx, const xmlChar *name, const xmlChar **atts)
{
	htmlParserCtxtPtr ctxt = ctx;
	ctxt->sax->startElement = xmlSAX2StartElement;
	const char *tag = (const char *)name;
	if (strcmp(tag, "html") == 0 || strcmp(tag, "head") == 0 || strcmp(tag, "body") == 0) {
		ctxt->_private = (void *)&AS_DOCUMENT;
		xmlSAX2StartElement(ctx, name, atts);
	} else {
		ctxt->_private = (void *)&AS_FRAGMENT;
		xmlStopParser(ctxt);
	}
}

/* A kept context is let go rather than kept past these: its dictionary
 * holds every element and attribute name it has read (the documents' nodes
 * hold copies of their own: libxml2's HTML parser leaves the dictionary
 * out of the tree), and the names of entity references, processing
 * instructions and doctypes, of any length (libxml2 2.9's htmlParseName,
 * under XML_PARSE_HUGE), which a sender's made-up names would grow without
 * end; so it is bounded by its names and by the bytes of its string pools
 * (xmlDictGetUsage: the session's review found a bound of names alone let
 * a thousand names of up to an event's size stay, tens of MB a thread).
 * Its stacks are as deep as the deepest input it has read. */
#define HTML_CTXT_DICT_MAX 1024
#define HTML_CTXT_DICT_BYTES_MAX (64 * 1024)
#define HTML_CTXT_STACK_MAX 256
/* Kept only with the libxml2 it was tested with (Debian 12's 2.9.14):
 * reset and a new input reach into the parser's state (inputPush, the
 * options set back by hand), which later versions changed (2.12 the
 * parser's errors, later ones deprecate inputPush); from 2.10 on, a
 * context a parse, as before the fifty-ninth session. */
#define HTML_CTXT_KEPT (LIBXML_VERSION < 21000)

/* A parser context of the n bytes at buf with options, as cw_html_context
 * makes one: the thread's kept one (html_parse_done), reset there, with a
 * new input, or a new one.  Until the fifty-ninth session every parse made
 * and freed its own (a dictionary, its hash table and random seed, stacks,
 * buffers): some 5 % of the Matrix transaction reader's samples, a message
 * with formatted_body. */
static htmlParserCtxtPtr html_context(const char *buf, size_t n, int options)
{
#if !HTML_CTXT_KEPT
	return cw_html_context(buf, n, options);
#else
	htmlParserCtxtPtr ctxt = html_ctxt_keyed ? pthread_getspecific(html_ctxt_key) : NULL;
	if (!ctxt || n > INT_MAX)
		return cw_html_context(buf, n, options);
	pthread_setspecific(html_ctxt_key, NULL); /* in use */
	xmlParserInputBufferPtr in = xmlParserInputBufferCreateMem(buf, (int)n, XML_CHAR_ENCODING_NONE);
	xmlParserInputPtr stream = in ? xmlNewIOInputStream(ctxt, in, XML_CHAR_ENCODING_NONE) : NULL;
	if (!stream || inputPush(ctxt, stream) < 0) {
		if (stream)
			xmlFreeInputStream(stream);
		else if (in)
			xmlFreeParserInputBuffer(in);
		htmlFreeParserCtxt(ctxt);
		return cw_html_context(buf, n, options);
	}
	/* htmlCtxtUseOptions adds to the options it finds (2.9 sets no
	 * flag back): the last parse's HTML_PARSE_NOIMPLIED would stay. */
	ctxt->options = 0;
	cw_html_context_set(ctxt, options);
	return ctxt;
#endif
}

/* The parse of ctxt (html_context's) is over, its document taken: reset
 * (its input freed) and kept for the thread's next parse, or freed. */
static void html_parse_done(htmlParserCtxtPtr ctxt)
{
	ctxt->sax->startElement = xmlSAX2StartElement;
	ctxt->_private = NULL;
	if (!HTML_CTXT_KEPT || !html_ctxt_keyed || pthread_getspecific(html_ctxt_key) ||
	    xmlDictSize(ctxt->dict) > HTML_CTXT_DICT_MAX || xmlDictGetUsage(ctxt->dict) > HTML_CTXT_DICT_BYTES_MAX ||
	    ctxt->nodeMax > HTML_CTXT_STACK_MAX || ctxt->nameMax > HTML_CTXT_STACK_MAX ||
	    ctxt->spaceMax > HTML_CTXT_STACK_MAX) {
		htmlFreeParserCtxt(ctxt);
		return;
	}
	htmlCtxtReset(ctxt);
	if (pthread_setspecific(html_ctxt_key, ctxt) != 0)
		htmlFreeParserCtxt(ctxt);
}

size_t mx_map_kept_html_usage(void)
{
	htmlParserCtxtPtr ctxt = html_ctxt_keyed ? pthread_getspecific(html_ctxt_key) : NULL;
	return ctxt ? xmlDictGetUsage(ctxt->dict) : 0;
}

/* libxml2's tree of the n bytes at buf (UTF-8), or NULL (no memory, or
 * with only_document when the input is not a whole document). */
static htmlDocPtr html_parse(const char *buf, size_t n, bool only_document)
{
	/* Deep inputs are parsed whole (the walk keeps at most HTML_DEPTH_MAX
	 * levels of elements and all of the text). */
	htmlParserCtxtPtr ctxt =
		html_context(buf, n, HTML_PARSE_NOERROR | HTML_PARSE_NOWARNING | HTML_PARSE_NONET | HTML_PARSE_NODEFDTD |
					     HTML_PARSE_IGNORE_ENC | (only_document ? HTML_PARSE_NOIMPLIED : 0));
	if (!ctxt)
		return NULL;
	if (only_document)
		ctxt->sax->startElement = first_element;
	cw_html_parse(ctxt);
	htmlDocPtr doc = ctxt->myDoc;
	ctxt->myDoc = NULL;
	if (only_document && ctxt->_private != &AS_DOCUMENT) {
		xmlFreeDoc(doc);
		doc = NULL;
	}
	html_parse_done(ctxt);
	return doc;
}

/* Whether the n bytes at s may be a whole document: only a start tag
 * html, head or body can be its first element (libxml2 reads a tag's name
 * right after its '<' and in any case, and implies none with
 * HTML_PARSE_NOIMPLIED), so without "<html", "<head" or "<body" anywhere
 * it is a fragment, and the parse that would say so is spared (most
 * formatted bodies: the second of two parser contexts a message, some 2
 * us of the reader's, forty-sixth session). */
static bool may_be_document(const char *s, size_t n)
{
	static const char *const names[] = { "html", "head", "body" };
	for (const char *p = s; (p = memchr(p, '<', n - (size_t)(p - s))) && n - (size_t)(p - s) > 4; p++)
		for (size_t k = 0; k < CW_ARRAY_LEN(names); k++) {
			size_t i = 0;
			while (i < 4 && (p[1 + i] | 0x20) == names[k][i])
				i++;
			if (i == 4)
				return true;
		}
	return false;
}

/* libxml2's tree of the len bytes of html (at most HTML_INPUT_MAX, more
 * than 0), or NULL. */
static htmlDocPtr html_doc(const char *html, size_t len)
{
	pthread_once(&xml_once, xml_init);
	size_t blen;
	char *buf = clean_input(html, len, &blen);
	if (!buf)
		return NULL;
	/* A whole document (its first element is html, head or body) is parsed
	 * as one: its doctype, XML declaration and the comments around its
	 * <html> stay outside the element tree, its head is dropped by the walk,
	 * and what shows is its body's content.  Anything else is a fragment,
	 * parsed after BODY_OPEN as the content of a body (the first parse
	 * stopped at its first element). */
	htmlDocPtr doc = may_be_document(buf + BODY_OPEN_LEN, blen - BODY_OPEN_LEN)
				 ? html_parse(buf + BODY_OPEN_LEN, blen - BODY_OPEN_LEN, true)
				 : NULL;
	if (!doc)
		doc = html_parse(buf, blen, false);
	free(buf);
	return doc;
}

/* The sanitised HTML (NULL without memory or past HTML_INPUT_MAX); with
 * replied, whether an mx-reply was in it. */
static char *html_walk(const char *html, size_t len, bool keep_reply, bool *replied)
{
	if (len > HTML_INPUT_MAX)
		return NULL;
	if (len == 0)
		return calloc(1, 1);
	htmlDocPtr doc = html_doc(html, len);
	if (!doc)
		return NULL;
	struct walker w = { .keep_reply = keep_reply };
	cw_buf_init(&w.out, len * 6 + 64);
	cw_html_walk(doc, enter, leave, overflowed, &w);
	xmlFreeDoc(doc);
	if (replied)
		*replied = w.replied;
	return take(&w.out);
}

char *mx_sanitize_html(const char *html, size_t len)
{
	if (!html)
		return calloc(1, 1);
	return html_walk(html, len, false, NULL);
}

/* ------------------------------------------------------------ mentions */

/* The user id a link to a user names, into id: "https://matrix.to/#/" and
 * the id (percent-encoded as the spec's appendix "Matrix URIs" says, or
 * not, as clients long sent it), or "matrix:u/" and the id without its
 * "@", each with an optional "?query".  False for other links (rooms,
 * events, the web) and for what names no valid user id. */
static bool link_user(const char *href, char *id, size_t idlen)
{
	const char *rest;
	bool sigil;
	if (starts_with(href, "https://matrix.to/#/")) {
		rest = href + strlen("https://matrix.to/#/");
		sigil = true;
	} else if (starts_with(href, "matrix:u/")) {
		rest = href + strlen("matrix:u/");
		sigil = false;
	} else {
		return false;
	}
	size_t n = strcspn(rest, "?");
	if (n == 0 || n > 3 * MX_ID_MAX)
		return false;
	char *dec = xmlURIUnescapeString(rest, (int)n, NULL);
	if (!dec)
		return false;
	int w = snprintf(id, idlen, "%s%s", sigil ? "" : "@", dec);
	xmlFree(dec);
	return w > 0 && (size_t)w < idlen && strlen(id) == (size_t)w && mx_user_id_parse(id, NULL, 0, NULL, 0);
}

struct mentions {
	const char *const *skip;
	struct mx_mention *out;
	size_t max, n;
	bool labels_only; /* m.mentions named them: the links give their labels only */
};

/* Adds user id (with its link's text label, may be NULL) to m unless
 * skipped or there already. */
static void mention_add(struct mentions *m, const char *id, const char *label, bool add)
{
	for (const char *const *s = m->skip; s && *s; s++)
		if (strcmp(*s, id) == 0)
			return;
	size_t kept = m->n < m->max ? m->n : m->max;
	for (size_t i = 0; i < kept; i++) {
		if (strcmp(m->out[i].user_id, id) == 0) {
			if (label && !m->out[i].label[0] && strlen(label) < sizeof(m->out[i].label))
				strcpy(m->out[i].label, label);
			return;
		}
	}
	if (!add)
		return;
	if (m->n < m->max) {
		struct mx_mention *o = &m->out[m->n];
		snprintf(o->user_id, sizeof(o->user_id), "%s", id);
		o->label[0] = '\0';
		if (label && strlen(label) < sizeof(o->label))
			strcpy(o->label, label);
	}
	m->n++;
}

static bool mention_enter(void *arg, xmlNode *n)
{
	struct mentions *m = arg;
	if (n->type != XML_ELEMENT_NODE || !n->name)
		return false;
	if (strcmp((const char *)n->name, "mx-reply") == 0)
		return false; /* the reply fallback names whom it answers */
	if (strcmp((const char *)n->name, "a") != 0)
		return true;
	xmlChar *href = xmlGetProp(n, (const xmlChar *)"href");
	char id[MX_ID_MAX + 1];
	if (href && link_user((const char *)href, id, sizeof(id))) {
		xmlChar *text = xmlNodeGetContent(n);
		const char *t = text ? (const char *)text : "";
		size_t len = strlen(t);
		while (*t == ' ' || *t == '\t' || *t == '\n' || *t == '\r')
			t++, len--;
		while (len && (t[len - 1] == ' ' || t[len - 1] == '\t' || t[len - 1] == '\n' || t[len - 1] == '\r'))
			len--;
		char label[sizeof(((struct mx_mention *)0)->label)];
		bool fits = len < sizeof(label);
		if (fits) {
			memcpy(label, t, len);
			label[len] = '\0';
		}
		mention_add(m, id, fits && len ? label : NULL, !m->labels_only);
		xmlFree(text);
	}
	xmlFree(href);
	return false;
}

static void mention_leave(void *arg, xmlNode *n)
{
	(void)arg;
	(void)n;
}

static bool mention_stopped(void *arg)
{
	(void)arg;
	return false;
}

size_t mx_mentions(const json_t *c, const char *const *skip, struct mx_mention *out, size_t max)
{
	struct mentions m = { .skip = skip, .out = out, .max = max };
	json_t *ids = json_object_get(json_object_get(c, "m.mentions"), "user_ids");
	size_t i;
	json_t *v;
	json_array_foreach(ids, i, v) {
		const char *id = json_string_value(v);
		if (id && mx_user_id_parse(id, NULL, 0, NULL, 0))
			mention_add(&m, id, NULL, true);
	}
	m.labels_only = m.n > 0;
	const char *format = json_string_value(json_object_get(c, "format"));
	const char *html = json_string_value(json_object_get(c, "formatted_body"));
	if (!format || strcmp(format, "org.matrix.custom.html") != 0 || !html || strlen(html) > HTML_INPUT_MAX)
		return m.n;
	pthread_once(&xml_once, xml_init);
	size_t blen;
	char *buf = clean_input(html, strlen(html), &blen);
	htmlDocPtr doc = buf ? html_parse(buf, blen, false) : NULL;
	free(buf);
	if (doc) {
		cw_html_walk(doc, mention_enter, mention_leave, mention_stopped, &m);
		xmlFreeDoc(doc);
	}
	return m.n;
}

/* The text of HTML as a reader of plain text expects it (cw_html_text:
 * line breaks, list markers, link targets), the reply fallback's only when
 * keep_reply; "" when nothing shows, NULL without memory or when the HTML
 * is longer than HTML_INPUT_MAX.  Until the forty-sixth session it was the
 * text nodes alone, with line breaks: links lost their targets, list items
 * their markers, and white space was kept as written. */
static char *html_text(const char *html, bool keep_reply)
{
	static const char *const reply[] = { "mx-reply", NULL };
	size_t len = strlen(html);
	if (len > HTML_INPUT_MAX)
		return NULL;
	htmlDocPtr doc = len ? html_doc(html, len) : NULL;
	if (!doc)
		return len ? NULL : calloc(1, 1);
	char *t = cw_html_text(doc, keep_reply ? NULL : reply, HTML_INPUT_MAX);
	xmlFreeDoc(doc);
	return t;
}

/* Where the first line's text starts in sanitised HTML h: past the start
 * tags without attributes of the blocks it opens with (p, div, h1-h6),
 * whose first text is the message's first line.  An emote's "* " goes
 * there (until the fifty-first session it went before them, and before a
 * <p> it stood on a line of its own), and is taken from there. */
static size_t first_line_at(const char *h)
{
	static const char *const blocks[] = { "p", "div", "h1", "h2", "h3", "h4", "h5", "h6", NULL };
	size_t at = 0;
	while (h[at] == '<') {
		size_t n = strcspn(h + at + 1, " >");
		char name[8];
		if (n >= sizeof(name) || h[at + 1 + n] != '>')
			break;
		memcpy(name, h + at + 1, n);
		name[n] = '\0';
		if (!cw_in_list(name, blocks))
			break;
		at += n + 2;
	}
	return at;
}

/* Whether sanitised HTML shows nothing (only whitespace, no element). */
static bool html_blank(const char *h)
{
	for (; *h; h++)
		if (*h != ' ' && *h != '\n' && *h != '\t' && *h != '\r')
			return false;
	return true;
}

/* ------------------------------------------------------------ lookups */

/* to_msg(id) when it is a valid neutral message id, copied into buf. */
static const char *lookup_msg(mx_lookup_fn f, void *ctx, const char *id, char *buf, size_t size)
{
	if (!f || !id)
		return NULL;
	const char *r = f(ctx, id);
	if (!r || !message_id_valid(r) || strlen(r) >= size)
		return NULL;
	memcpy(buf, r, strlen(r) + 1);
	return buf;
}

/* to_native(id) when it is a valid Matrix event id, copied into buf. */
static const char *lookup_event(mx_lookup_fn f, void *ctx, const char *id, char *buf, size_t size)
{
	if (!f || !id)
		return NULL;
	const char *r = f(ctx, id);
	if (!r || !mx_event_id_valid(r) || strlen(r) >= size)
		return NULL;
	memcpy(buf, r, strlen(r) + 1);
	return buf;
}

/* ------------------------------------------------------------ Matrix -> neutral */

static void add_ref(const char **ids, size_t *n, size_t max, const char *id)
{
	if (!id || !mx_event_id_valid(id) || *n >= max)
		return;
	for (size_t i = 0; i < *n; i++)
		if (strcmp(ids[i], id) == 0)
			return;
	ids[(*n)++] = id;
}

size_t mx_event_refs(const json_t *ev, const char **ids, size_t max)
{
	size_t n = 0;
	if (!json_is_object(ev) || !ids)
		return 0;
	const json_t *content = json_object_get(ev, "content");
	const json_t *rel = json_object_get(content, "m.relates_to");
	if (json_is_object(rel)) {
		add_ref(ids, &n, max, str_member(json_object_get(rel, "m.in_reply_to"), "event_id"));
		add_ref(ids, &n, max, str_member(rel, "event_id"));
	}
	add_ref(ids, &n, max, str_member(content, "redacts"));
	add_ref(ids, &n, max, str_member(ev, "redacts"));
	return n;
}

/* What m.relates_to says, checked for shape. */
struct rel {
	const char *rel_type;   /* NULL when none */
	const char *event_id;   /* the relation's target */
	const char *reply_to;   /* m.in_reply_to.event_id */
	bool falling_back;      /* m.thread: the reply is only a fallback */
	const char *key;        /* m.annotation */
};

static enum mx_in_result parse_rel(const json_t *content, struct rel *r, char *why, size_t whylen)
{
	memset(r, 0, sizeof(*r));
	const json_t *rel = json_object_get(content, "m.relates_to");
	if (!rel)
		return MX_IN_OK;
	if (!json_is_object(rel)) {
		say(why, whylen, "m.relates_to must be an object");
		return MX_IN_INVALID;
	}
	const json_t *v = json_object_get(rel, "rel_type");
	if (v && !json_is_string(v)) {
		say(why, whylen, "m.relates_to.rel_type must be a string");
		return MX_IN_INVALID;
	}
	r->rel_type = json_string_value(v);
	v = json_object_get(rel, "event_id");
	if (v && !(json_is_string(v) && mx_event_id_valid(json_string_value(v)))) {
		say(why, whylen, "m.relates_to.event_id must be an event id");
		return MX_IN_INVALID;
	}
	r->event_id = json_string_value(v);
	if (r->rel_type && !r->event_id) {
		say(why, whylen, "m.relates_to with a rel_type needs an event_id");
		return MX_IN_INVALID;
	}
	v = json_object_get(rel, "m.in_reply_to");
	if (v) {
		const json_t *id = json_object_get(v, "event_id");
		if (!json_is_object(v) || !json_is_string(id) || !mx_event_id_valid(json_string_value(id))) {
			say(why, whylen, "m.relates_to.m.in_reply_to must be an object with an event_id");
			return MX_IN_INVALID;
		}
		r->reply_to = json_string_value(id);
	}
	r->falling_back = json_is_true(json_object_get(rel, "is_falling_back"));
	v = json_object_get(rel, "key");
	if (v && !json_is_string(v)) {
		say(why, whylen, "m.relates_to.key must be a string");
		return MX_IN_INVALID;
	}
	r->key = json_string_value(v);
	return MX_IN_OK;
}

size_t mx_reply_fallback_len(const char *body)
{
	/* The first line names the replied-to event's sender by her user id,
	 * "> <@alice:example.org> " (an emote's "> * <@...> "): a quote of
	 * the user's own that starts with a tag ("> <b> is bold") is her text
	 * (until the forty-sixth session "> <" was enough, and a reply
	 * without a fallback, as Matrix 1.13 wants it, lost such a quote). */
	const char *id = starts_with(body, "> <@") ? body + 3 : starts_with(body, "> * <@") ? body + 5 : NULL;
	const char *close = id ? strchr(id, '>') : NULL;
	char user[MX_ID_MAX + 1];
	if (!close || (size_t)(close - id) > MX_ID_MAX || !memchr(" \n", close[1], 3))
		return 0;
	memcpy(user, id, (size_t)(close - id));
	user[close - id] = '\0';
	if (!mx_user_id_parse(user, NULL, 0, NULL, 0))
		return 0;
	const char *p = body;
	while (starts_with(p, "> ") || strcmp(p, ">") == 0 || starts_with(p, ">\n")) {
		const char *nl = strchr(p, '\n');
		if (!nl)
			return strlen(body);
		p = nl + 1;
	}
	if (*p == '\n')
		p++;
	return (size_t)(p - body);
}

static const char *media_label(const char *msgtype)
{
	if (strcmp(msgtype, "m.image") == 0)
		return "image";
	if (strcmp(msgtype, "m.video") == 0)
		return "video";
	if (strcmp(msgtype, "m.audio") == 0)
		return "audio";
	if (strcmp(msgtype, "m.file") == 0)
		return "file";
	return NULL;
}

/* A part {"type": type, "body": the len bytes at p}, as json_pack's
 * "{s:s, s:s%}" made it (NULL when they are no UTF-8; see
 * neutral_event for why not json_pack). */
static json_t *text_part(const char *type, const char *p, size_t len)
{
	json_t *body = json_stringn(p, len), *part = body ? json_object() : NULL;
	if (part && json_object_set_new_nocheck(part, "type", json_string(type)) == 0 &&
	    json_object_set_new_nocheck(part, "body", json_incref(body)) == 0) {
		json_decref(body);
		return part;
	}
	json_decref(part);
	json_decref(body);
	return NULL;
}

/* Builds content.parts (and x.matrix.msgtype) from a message content c
 * (the event's content or an edit's m.new_content). */
static enum mx_in_result text_parts(const json_t *c, const char *msgtype, bool sticker, bool strip_reply,
				    bool keep_reply, json_t *content, char *why, size_t whylen)
{
	struct event_limits lim = event_limits_default();
	const char *body = str_member(c, "body");
	if (!body) {
		say(why, whylen, "body must be a string");
		return MX_IN_INVALID;
	}
	const json_t *fmt = json_object_get(c, "format");
	if (fmt && !json_is_string(fmt)) {
		say(why, whylen, "format must be a string");
		return MX_IN_INVALID;
	}
	const json_t *fb = json_object_get(c, "formatted_body");
	const char *formatted = NULL;
	if (fmt && strcmp(json_string_value(fmt), HTML_FORMAT) == 0 && fb) {
		if (!json_is_string(fb)) {
			say(why, whylen, "formatted_body must be a string");
			return MX_IN_INVALID;
		}
		formatted = json_string_value(fb);
	}
	/* HTML that cannot be sanitised (no memory) is left out: the text goes.
	 * An <img> is its alt text (a custom emoji's ":blobcat:"): its mxc://
	 * source is a file of the homeserver's store, which no peer can fetch
	 * (media crosses re-hosted, as attachments, never as a link into a
	 * store); until the fiftieth session the peer got the URI. */
	bool html_reply = false;
	char *clean = formatted ? html_walk(formatted, strlen(formatted), keep_reply, &html_reply) : NULL;
	if (clean) {
		if (html_blank(clean)) {
			free(clean);
			clean = NULL;
		}
	}
	/* A client that quotes the replied-to message in body quotes it in
	 * its HTML too (<mx-reply>): HTML that shows something without one
	 * says that the body's leading "> <@bob:example.org> ..." is the
	 * user's own quote (a reply without fallbacks, Matrix 1.13), which
	 * until the forty-eighth session was taken out as a fallback and
	 * lost. */
	if (strip_reply && (!clean || html_reply)) {
		size_t skip = mx_reply_fallback_len(body);
		if (skip < strlen(body))
			body += skip;
	}

	/* Capped at what a part may hold: overflow means too long. */
	struct cw_buf text, html;
	cw_buf_init(&text, lim.max_body_bytes);
	cw_buf_init(&html, lim.max_body_bytes);
	bool emote = strcmp(msgtype, "m.emote") == 0;
	if (emote) {
		adds(&text, "* ");
	}
	size_t empty = text.len;
	bool with_html = false, carried = false;
	const char *label = sticker ? "sticker" : media_label(msgtype);
	const char *url = str_member(c, "url"), *mime = str_member(json_object_get(c, "info"), "mimetype");
	const json_t *size = json_object_get(json_object_get(c, "info"), "size");
	if (label && !sticker && url && mxc_ok(url) && strlen(url) <= EVENT_URL_MAX && json_is_integer(size) &&
	    json_integer_value(size) >= 0 && (uint64_t)json_integer_value(size) <= lim.max_attachment_bytes) {
		/* The file itself goes as an attachment (its mxc:// URI, which
		 * only the adapter can fetch: the peer adapter offers it under a
		 * URL of Causeway's), and the text is the caption alone. */
		const char *filename = str_member(c, "filename");
		bool caption = filename && *filename && strcmp(filename, body) != 0 && *body;
		const char *name = caption ? filename : body;
		json_t *a = json_pack("{s:s, s:s, s:I}", "content_type", mime && strlen(mime) <= EVENT_CONTENT_TYPE_MAX && media_type_valid(mime) ? mime :
							     "application/octet-stream",
				      "url", url, "size", (json_int_t)json_integer_value(size));
		if (event_filename_valid(name))
			json_object_set_new(a, "filename", json_string(name));
		json_object_set_new(content, "attachments", json_pack("[o]", a));
		carried = true;
		if (caption) {
			adds(&text, body);
			if (clean) {
				adds(&html, clean);
				with_html = true;
			}
		}
	} else if (label) {
		/* Media: "[image: name]", and the caption when body is one. */
		const char *filename = str_member(c, "filename");
		bool caption = !sticker && filename && *filename && strcmp(filename, body) != 0 && *body;
		const char *name = caption ? filename : body;
		char head[32];
		snprintf(head, sizeof(head), *name ? "[%s: " : "[%s", label);
		adds(&text, head);
		adds(&text, name);
		adds(&text, "]");
		if (caption) {
			adds(&text, " ");
			adds(&text, body);
		}
		if (caption && clean) {
			adds(&html, head);
			add_escaped(&html, name, false);
			adds(&html, "] ");
			adds(&html, clean);
			with_html = true;
		}
	} else if (strcmp(msgtype, "m.location") == 0) {
		const char *geo = str_member(c, "geo_uri");
		adds(&text, "[location");
		if (*body) {
			adds(&text, ": ");
			adds(&text, body);
		}
		if (geo && *geo) {
			adds(&text, *body ? " " : ": ");
			adds(&text, geo);
		}
		adds(&text, "]");
	} else {
		if (*body) {
			adds(&text, body);
		} else if (clean) {
			char *t = html_text(formatted, keep_reply);
			if (t)
				adds(&text, t);
			free(t);
		}
		if (clean) {
			size_t at = emote ? first_line_at(clean) : 0;
			add(&html, clean, at);
			if (emote)
				adds(&html, "* ");
			adds(&html, clean + at);
			with_html = true;
		}
	}
	free(clean);
	enum mx_in_result res = MX_IN_OK;
	if (text.overflow) {
		say(why, whylen, "the body is longer than %zu bytes", lim.max_body_bytes);
		res = MX_IN_INVALID;
	} else if (text.len == empty && carried) {
		; /* a file without a caption: no parts */
	} else if (text.len == empty) {
		say(why, whylen, "the message is empty");
		res = MX_IN_INVALID;
	} else {
		json_t *parts = json_array();
		json_array_append_new(parts, text_part("text/plain", text.p, text.len));
		/* HTML longer than a part may be is left out: the text is there. */
		if (with_html && !html.overflow)
			json_array_append_new(parts, text_part("text/html", html.p, html.len));
		json_object_set_new(content, "parts", parts);
		if (strcmp(msgtype, "m.notice") == 0 || emote)
			json_object_set_new(content, MX_MSGTYPE_KEY, json_string(msgtype));
	}
	cw_buf_free(&text);
	cw_buf_free(&html);
	return res;
}

/* A neutral event of type, at ts, of content (its reference stolen, as
 * json_pack's "o" steals it, failing or not).  jansson's constructors,
 * not json_pack: a message's event and its parts were four json_pack
 * calls on the reader, whose reading of the format, key by key, was some
 * 4 % of the reader's samples in Matrix transactions until the sixtieth
 * session.  The same objects, their keys in the same order. */
static json_t *neutral_event(const char *type, json_int_t ts, json_t *content)
{
	json_t *ev = type && content ? json_object() : NULL;
	if (ev && json_object_set_new_nocheck(ev, "type", json_string(type)) == 0 &&
	    json_object_set_new_nocheck(ev, "ts", json_integer(ts)) == 0 &&
	    json_object_set_new_nocheck(ev, "content", json_incref(content)) == 0) {
		json_decref(content);
		return ev;
	}
	json_decref(ev);
	json_decref(content);
	return NULL;
}

/* What a message with relation r answers, into target (size bytes), or
 * NULL: a reply's target, or in a thread the closest known event.  *real:
 * a reply of the user's own (m.in_reply_to known and no thread's mere
 * fallback), whose reply fallback is taken out of the text. */
static const char *reply_target(const struct rel *r, mx_lookup_fn to_msg, void *ctx, char *target, size_t size,
				bool *real)
{
	const char *reply = NULL;
	bool thread = r->rel_type && strcmp(r->rel_type, "m.thread") == 0;
	*real = false;
	if (r->reply_to && !(thread && r->falling_back)) {
		reply = lookup_msg(to_msg, ctx, r->reply_to, target, size);
		*real = reply != NULL;
	}
	if (!reply && thread)
		reply = lookup_msg(to_msg, ctx, r->event_id, target, size);
	/* A thread whose root the gateway does not know (written before the
	 * room was bridged): the fallback's target, the thread's latest event,
	 * which is what a client without threads shows it in reply to (until
	 * the fiftieth session such a thread's messages lost every relation). */
	if (!reply && thread && r->reply_to && r->falling_back)
		reply = lookup_msg(to_msg, ctx, r->reply_to, target, size);
	return reply;
}

static enum mx_in_result from_message(const json_t *content, bool sticker, json_int_t ts,
				      mx_lookup_fn to_msg, void *ctx, json_t **out, char *why, size_t whylen)
{
	const char *msgtype = sticker ? "m.sticker" : str_member(content, "msgtype");
	if (!msgtype) {
		say(why, whylen, "msgtype must be a string");
		return MX_IN_INVALID;
	}
	if (!json_is_string(json_object_get(content, "body"))) {
		say(why, whylen, "body must be a string");
		return MX_IN_INVALID;
	}
	if (strcmp(msgtype, "m.key.verification.request") == 0) {
		say(why, whylen, "device verification requests are not messages to carry");
		return MX_IN_IGNORE;
	}
	struct rel r;
	enum mx_in_result res = parse_rel(content, &r, why, whylen);
	if (res != MX_IN_OK)
		return res;
	char target[EVENT_OPAQUE_ID_MAX + 8];
	json_t *nc = json_object();
	/* A sticker's edit (an m.sticker with m.replace, Matrix's rules of an
	 * edit being the same for every type) is one too: until the
	 * fifty-third session it went to the peer as a second sticker, its
	 * fallback "[sticker: * Landing]", beside the one it replaced. */
	if (r.rel_type && strcmp(r.rel_type, "m.replace") == 0) {
		const json_t *newc = json_object_get(content, "m.new_content");
		if (!json_is_object(newc)) {
			json_decref(nc);
			say(why, whylen, "%s", EDIT_NEEDS_NEW_CONTENT);
			return MX_IN_INVALID;
		}
		const json_t *nt = sticker ? NULL : json_object_get(newc, "msgtype");
		if (nt && !json_is_string(nt)) {
			json_decref(nc);
			say(why, whylen, "m.new_content.msgtype must be a string");
			return MX_IN_INVALID;
		}
		if (!lookup_msg(to_msg, ctx, r.event_id, target, sizeof(target))) {
			json_decref(nc);
			say(why, whylen, "an edit of a message the gateway does not know");
			return MX_IN_IGNORE;
		}
		res = text_parts(newc, nt ? json_string_value(nt) : msgtype, sticker, false, false, nc, why, whylen);
		if (res == MX_IN_OK && !json_object_get(nc, "parts")) {
			/* A file whose caption was taken away (Element X's "remove
			 * caption"): a neutral edit needs a text, and one made up
			 * would be a caption the user did not write.  Until the
			 * forty-sixth session such an edit failed later, at the
			 * event's check, and its writer was told in its words. */
			say(why, whylen, "taking a file's caption away has no form on the other side, which still "
					 "shows the old caption (write a new caption, or delete the message)");
			res = MX_IN_INVALID;
		}
		if (res != MX_IN_OK) {
			json_decref(nc);
			return res;
		}
		json_object_set_new(nc, "replaces", json_string(target));
		*out = neutral_event("edit", ts, nc);
		return MX_IN_OK;
	}
	bool from_reply;
	const char *reply = reply_target(&r, to_msg, ctx, target, sizeof(target), &from_reply);
	res = text_parts(content, msgtype, sticker, from_reply, !from_reply, nc, why, whylen);
	if (res != MX_IN_OK) {
		json_decref(nc);
		return res;
	}
	if (reply)
		json_object_set_new(nc, "in_reply_to", json_string(reply));
	*out = neutral_event("message", ts, nc);
	return MX_IN_OK;
}

static enum mx_in_result from_reaction(const json_t *content, json_int_t ts, mx_lookup_fn to_msg, void *ctx,
				       json_t **out, char *why, size_t whylen)
{
	struct rel r;
	enum mx_in_result res = parse_rel(content, &r, why, whylen);
	if (res != MX_IN_OK)
		return res;
	if (!r.rel_type || strcmp(r.rel_type, "m.annotation") != 0 || !r.key) {
		say(why, whylen, "a reaction needs m.relates_to with rel_type m.annotation, event_id and key");
		return MX_IN_INVALID;
	}
	if (!*r.key) {
		say(why, whylen, "a reaction's key must not be empty");
		return MX_IN_INVALID;
	}
	struct event_limits lim = event_limits_default();
	/* An image as the key (MSC4027, Element's custom reactions: an mxc://
	 * URI) is its shortcode (":partyparrot:", "shortcode" or the unstable
	 * MX_SHORTCODE_KEY), else "[reaction: an image]": the URI names a file
	 * of the homeserver's store, which a peer can neither show nor fetch
	 * (media crosses the gateway re-hosted, never as a link into a store;
	 * until the fiftieth session the URI was the peer's reaction). */
	const char *key = r.key;
	bool image = starts_with(key, "mxc://");
	if (image) {
		const char *sc = str_member(content, "shortcode");
		if (!sc)
			sc = str_member(content, MX_SHORTCODE_KEY);
		key = sc && *sc && !starts_with(sc, "mxc://") ? sc : NULL;
	}
	size_t klen = key ? strlen(key) : 0;
	if (klen + 16 > lim.max_body_bytes) {
		say(why, whylen, "a reaction's key is longer than %zu bytes", lim.max_body_bytes - 16);
		return MX_IN_INVALID;
	}
	char target[EVENT_OPAQUE_ID_MAX + 8];
	if (!lookup_msg(to_msg, ctx, r.event_id, target, sizeof(target))) {
		say(why, whylen, "a reaction to a message the gateway does not know");
		return MX_IN_IGNORE;
	}
	json_t *nc;
	if (key && klen <= EVENT_REACTION_MAX) {
		nc = json_pack("{s:[{s:s, s:s}], s:s, s:s}", "parts", "type", "text/plain", "body", key, "disposition",
			       "reaction", "in_reply_to", target);
		*out = neutral_event("reaction", ts, nc);
	} else {
		/* Longer than a neutral reaction may be (or an image without a
		 * name): said as a reply instead. */
		if (!key)
			key = "an image";
		size_t n = strlen(key) + 16;
		char *text = malloc(n);
		if (!text)
			return MX_IN_INVALID;
		snprintf(text, n, "[reaction: %s]", key);
		nc = json_pack("{s:[{s:s, s:s}], s:s}", "parts", "type", "text/plain", "body", text, "in_reply_to",
			       target);
		free(text);
		*out = neutral_event("message", ts, nc);
	}
	return MX_IN_OK;
}

const char *mx_redaction_target(const json_t *ev)
{
	const json_t *v = json_object_get(ev, "redacts");
	if (!v)
		v = json_object_get(json_object_get(ev, "content"), "redacts");
	const char *id = json_string_value(v);
	return id && mx_event_id_valid(id) ? id : NULL;
}

static enum mx_in_result from_redaction(const json_t *ev, json_int_t ts, mx_lookup_fn to_msg, void *ctx,
					json_t **out, char *why, size_t whylen)
{
	/* The top-level redacts: the one the homeserver authorised in room
	 * versions 1 to 10, where content.redacts is mere content (Synapse's
	 * /redact puts the request's body in as content, redacts and all:
	 * until the thirtieth session that was taken first, and a redaction
	 * of one message deleted another at the peer).  Room version 11 moved
	 * it into content, and servers copy it to the top level for clients
	 * (Synapse refuses a /redact whose body names another event): content
	 * is read only when the top level has none.  Two that differ: only
	 * in room versions 1 to 10 (in 11 the server copies content's, and
	 * Synapse refuses a body naming another), where the top level is the
	 * one redacted, so it counts (a user who deleted a message expects it
	 * gone at the peer too). */
	const char *v = mx_redaction_target(ev);
	if (!v) {
		say(why, whylen, "a redaction needs redacts: an event id");
		return MX_IN_INVALID;
	}
	char target[EVENT_OPAQUE_ID_MAX + 8];
	if (!lookup_msg(to_msg, ctx, v, target, sizeof(target))) {
		say(why, whylen, "a redaction of an event the gateway does not know");
		return MX_IN_IGNORE;
	}
	*out = neutral_event("delete", ts, json_pack("{s:s}", "replaces", target));
	return MX_IN_OK;
}

static enum mx_in_result from_member(const json_t *ev, const json_t *content, json_int_t ts, mx_lookup_fn to_msg,
				     void *ctx, json_t **out, char *why, size_t whylen)
{
	const char *who = str_member(ev, "state_key");
	if (!who || !mx_user_id_parse(who, NULL, 0, NULL, 0)) {
		say(why, whylen, "m.room.member needs a user id as state_key");
		return MX_IN_INVALID;
	}
	const char *m = str_member(content, "membership");
	if (!m) {
		say(why, whylen, "membership must be a string");
		return MX_IN_INVALID;
	}
	const char *prev = str_member(json_object_get(json_object_get(ev, "unsigned"), "prev_content"), "membership");
	const char *sender = str_member(ev, "sender");
	const char *neutral;
	if (strcmp(m, "join") == 0) {
		/* Without a previous membership (optional in the event) a
		 * join: the adapter puts in the one it knows of (matrix.c,
		 * with_prior), and a join already told is not told again
		 * (is_rejoin). */
		if (prev && strcmp(prev, "join") == 0) {
			say(why, whylen, "a profile change is not a membership change");
			return MX_IN_IGNORE;
		}
		neutral = "join";
	} else if (strcmp(m, "invite") == 0) {
		neutral = "invite";
	} else if (strcmp(m, "leave") == 0 && sender && strcmp(sender, who) == 0 &&
		   !(prev && strcmp(prev, "join") == 0)) {
		/* Her own leave, carried only after a join.  After an invitation
		 * it is the invitation turned down: what the invitee decided,
		 * which the far side must not learn (to it, this user stays as
		 * silent as one who does not exist); after a knock, a knock
		 * taken back (she was never in).  With no previous membership
		 * (unsigned.prev_content is optional: a homeserver gives it
		 * only when the client may see it) nothing tells a decline from
		 * a leave, and the far side is told nothing: the adapter puts
		 * in the membership it knows of when the event has none
		 * (matrix.c, with_prior).  Until the fortieth session only a
		 * leave after an invitation was kept back, and a decline told
		 * without prev_content reached the far side.  A leave by
		 * another (a kick, an invitation taken back) is a leave here;
		 * the adapter looks up only the sender's own (matrix.c,
		 * lookup_ref_or_user). */
		bool declined = prev && strcmp(prev, "invite") == 0;
		say(why, whylen, declined ? "a declined invitation is not carried"
					  : "a leave not known to follow a join is not carried");
		return MX_IN_IGNORE;
	} else if (strcmp(m, "leave") == 0 || strcmp(m, "ban") == 0) {
		neutral = "leave";
	} else {
		say(why, whylen, "this membership (knock or unknown) is not carried");
		return MX_IN_IGNORE;
	}
	const char *uri = to_msg ? to_msg(ctx, who) : NULL;
	struct mimi_uri u;
	cw_errmsg e;
	if (!uri || mimi_uri_parse(uri, &u, &e) != CW_OK || u.kind != MIMI_USER) {
		say(why, whylen, "the member has no neutral identity");
		return MX_IN_IGNORE;
	}
	*out = neutral_event("membership", ts, json_pack("{s:s, s:s}", "membership", neutral, "target", uri));
	return MX_IN_OK;
}

/* The text fallback of extensible events content c (MSC1767): an m.text
 * array's text/plain body, the unstable org.matrix.msc1767.text string,
 * or a plain body; NULL when there is none. */
static const char *fallback_text(const json_t *c)
{
	const json_t *b;
	size_t i;
	json_array_foreach(json_object_get(c, "m.text"), i, b) {
		const char *mt = str_member(b, "mimetype");
		if (str_member(b, "body") && (!mt || strcmp(mt, "text/plain") == 0))
			return str_member(b, "body");
	}
	const char *text = str_member(c, "org.matrix.msc1767.text");
	return text ? text : str_member(c, "body");
}

/* An event type without a mapping of its own that carries a text
 * fallback (fallback_text): a message of that text, so that a poll
 * (m.poll.start, or Element's org.matrix.msc3381.poll.start) or a poll's
 * end is not dropped in silence.  An edit of one (m.replace: Element edits
 * a poll with an event of the poll's type holding m.new_content and the
 * relation alone) is an edit of the text of its m.new_content (until the
 * forty-sixth session it had no text of its own and was dropped in
 * silence).  Without such a text: IGNORE. */
static enum mx_in_result from_fallback(const json_t *content, json_int_t ts, mx_lookup_fn to_msg, void *ctx,
				       json_t **out, char *why, size_t whylen)
{
	struct rel r;
	bool rel_ok = parse_rel(content, &r, NULL, 0) == MX_IN_OK;
	bool edit = rel_ok && r.rel_type && strcmp(r.rel_type, "m.replace") == 0;
	if (edit && !json_is_object(json_object_get(content, "m.new_content"))) {
		/* Not a new message of its fallback text ("* ..."): until the
		 * fiftieth session such an edit, which Matrix clients do not
		 * apply, became one at the peer. */
		say(why, whylen, "%s", EDIT_NEEDS_NEW_CONTENT);
		return MX_IN_INVALID;
	}
	const char *text = fallback_text(edit ? json_object_get(content, "m.new_content") : content);
	if (!text || !*text) {
		say(why, whylen, "events of this type are not carried");
		return MX_IN_IGNORE;
	}
	char target[EVENT_OPAQUE_ID_MAX + 8];
	if (edit && !lookup_msg(to_msg, ctx, r.event_id, target, sizeof(target))) {
		say(why, whylen, "an edit of a message the gateway does not know");
		return MX_IN_IGNORE;
	}
	/* A poll in reply or in a thread answers what a message there would,
	 * and a poll's end ("Ended poll", m.reference) the poll it ends
	 * (until the fiftieth session they named nothing). */
	bool real;
	const char *reply = rel_ok && !edit ? reply_target(&r, to_msg, ctx, target, sizeof(target), &real) : NULL;
	if (!reply && rel_ok && r.rel_type && strcmp(r.rel_type, "m.reference") == 0)
		reply = lookup_msg(to_msg, ctx, r.event_id, target, sizeof(target));
	json_t *plain = json_pack("{s:s, s:s}", "msgtype", "m.text", "body", text);
	json_t *nc = json_object();
	enum mx_in_result res = plain && nc ? text_parts(plain, "m.text", false, false, false, nc, why, whylen)
					    : MX_IN_INVALID;
	json_decref(plain);
	if (res != MX_IN_OK) {
		json_decref(nc);
		return res;
	}
	if (edit)
		json_object_set_new(nc, "replaces", json_string(target));
	else if (reply)
		json_object_set_new(nc, "in_reply_to", json_string(reply));
	*out = neutral_event(edit ? "edit" : "message", ts, nc);
	return MX_IN_OK;
}

/* Drops the HTML parts of a neutral event that is too long as JSON text. */
static enum mx_in_result fit(json_t *neutral, char *why, size_t whylen)
{
	struct event_limits lim = event_limits_default();
	json_t *parts = json_object_get(json_object_get(neutral, "content"), "parts");
	/* A JSON string is at most 6 bytes per byte of text (\u00XX): most
	 * events are far below the limit without writing them out.  An
	 * attachment's strings count too: its url, name and type may be
	 * 2.5 KB together, past the 1 KB the rest is given (until the fiftieth
	 * session a caption of controls with such a file was taken unmeasured,
	 * and the event failed its check once the caller added the sender). */
	size_t bound = 1024, i;
	json_t *p;
	json_array_foreach(parts, i, p)
		bound += 6 * json_string_length(json_object_get(p, "body")) + 64;
	json_array_foreach(json_object_get(json_object_get(neutral, "content"), "attachments"), i, p) {
		const char *k;
		json_t *v;
		json_object_foreach(p, k, v)
			bound += 6 * json_string_length(v) + 32;
	}
	if (bound + ENVELOPE_RESERVE <= lim.max_event_bytes)
		return MX_IN_OK;
	for (int round = 0; round < 2; round++) {
		char *text = json_dumps(neutral, JSON_COMPACT);
		size_t n = text ? strlen(text) : SIZE_MAX;
		free(text);
		if (n + ENVELOPE_RESERVE <= lim.max_event_bytes)
			return MX_IN_OK;
		if (round == 0 && json_array_size(parts) > 1)
			json_array_remove(parts, 1);
		else
			break;
	}
	say(why, whylen, "the event is longer than %zu bytes as neutral JSON", lim.max_event_bytes);
	return MX_IN_INVALID;
}

enum mx_in_result mx_to_neutral(const json_t *ev, mx_lookup_fn to_msg, void *ctx, json_t **out, char *why,
				size_t whylen)
{
	*out = NULL;
	if (why && whylen)
		why[0] = '\0';
	if (!json_is_object(ev)) {
		say(why, whylen, "the event is not a JSON object");
		return MX_IN_INVALID;
	}
	const char *type = str_member(ev, "type");
	if (!type) {
		say(why, whylen, "type must be a string");
		return MX_IN_INVALID;
	}
	const json_t *content = json_object_get(ev, "content");
	if (!json_is_object(content)) {
		say(why, whylen, "content must be an object");
		return MX_IN_INVALID;
	}
	if (strcmp(type, "m.room.encryption") == 0) {
		say(why, whylen, "the room turned on end-to-end encryption");
		return MX_IN_ENCRYPTED;
	}
	if (strcmp(type, "m.room.encrypted") == 0) {
		say(why, whylen, "an end-to-end encrypted event cannot be read by the gateway");
		return MX_IN_ENCRYPTED;
	}
	if (json_object_get(json_object_get(ev, "unsigned"), "redacted_because")) {
		say(why, whylen, "the event was redacted");
		return MX_IN_IGNORE;
	}
	const json_t *tsv = json_object_get(ev, "origin_server_ts");
	json_int_t ts = json_is_integer(tsv) ? json_integer_value(tsv) : 0;
	if (ts <= 0 || ts >= EVENT_TS_LIMIT) {
		say(why, whylen, "origin_server_ts must be a positive integer below 2^53");
		return MX_IN_INVALID;
	}
	bool state = json_object_get(ev, "state_key") != NULL;
	enum mx_in_result res;
	if (strcmp(type, "m.room.member") == 0) {
		res = from_member(ev, content, ts, to_msg, ctx, out, why, whylen);
	} else if (state) {
		say(why, whylen, "state events of this type are not carried");
		return MX_IN_IGNORE;
	} else if (strcmp(type, "m.room.message") == 0 || strcmp(type, "m.sticker") == 0) {
		res = from_message(content, strcmp(type, "m.sticker") == 0, ts, to_msg, ctx, out, why, whylen);
	} else if (strcmp(type, "m.reaction") == 0) {
		res = from_reaction(content, ts, to_msg, ctx, out, why, whylen);
	} else if (strcmp(type, "m.room.redaction") == 0) {
		res = from_redaction(ev, ts, to_msg, ctx, out, why, whylen);
	} else if ((res = from_fallback(content, ts, to_msg, ctx, out, why, whylen)) == MX_IN_IGNORE) {
		return res;
	}
	if (res == MX_IN_OK && !*out) {
		say(why, whylen, "out of memory");
		return MX_IN_INVALID;
	}
	if (res == MX_IN_OK && (res = fit(*out, why, whylen)) != MX_IN_OK) {
		json_decref(*out);
		*out = NULL;
	}
	return res;
}

const char *mx_edit_target(const json_t *ev)
{
	const char *type = str_member(ev, "type");
	const json_t *content = json_object_get(ev, "content");
	const json_t *rel = json_object_get(content, "m.relates_to");
	const json_t *newc = json_object_get(content, "m.new_content");
	const char *rt = str_member(rel, "rel_type"), *target = str_member(rel, "event_id");
	if (!type || !rt || strcmp(rt, "m.replace") != 0 || !target || !json_is_object(newc) ||
	    json_object_get(ev, "state_key") || json_object_get(json_object_get(ev, "unsigned"), "redacted_because"))
		return NULL;
	if (strcmp(type, "m.room.message") == 0 || strcmp(type, "m.sticker") == 0)
		return target;
	static const char *const own[] = { "m.reaction", "m.room.redaction", "m.room.encrypted", NULL };
	const char *text = cw_in_list(type, own) ? NULL : fallback_text(newc);
	return text && *text ? target : NULL;
}

/* ------------------------------------------------------------ ephemeral */

static json_t *item(const char *who, json_t *event)
{
	return json_pack("{s:s, s:o}", "sender_mxid", who, "event", event);
}

json_t *mx_ephemeral_to_neutral(const json_t *ev, mx_lookup_fn to_msg, void *ctx)
{
	json_t *list = json_array();
	if (!list)
		return NULL;
	const char *type = str_member(ev, "type");
	json_t *content = json_object_get(ev, "content");
	if (!type || !json_is_object(content))
		return list;
	if (strcmp(type, "m.typing") == 0) {
		json_t *ids = json_object_get(content, "user_ids"), *v;
		json_t *seen = json_object();
		size_t i;
		json_array_foreach(ids, i, v) {
			const char *who = json_string_value(v);
			if (!who || !mx_user_id_parse(who, NULL, 0, NULL, 0) || json_array_size(list) >= EPHEMERAL_MAX ||
			    json_object_get(seen, who))
				continue;
			json_object_set_new(seen, who, json_true());
			json_array_append_new(list, item(who, json_pack("{s:s, s:{s:s}}", "type", "typing", "content", "state",
									 "start")));
		}
		json_decref(seen);
	} else if (strcmp(type, "m.receipt") == 0) {
		const char *eid;
		json_t *rec;
		json_object_foreach(content, eid, rec) {
			json_t *reads = json_object_get(rec, "m.read");
			char target[EVENT_OPAQUE_ID_MAX + 8];
			if (!json_is_object(reads) || !mx_event_id_valid(eid) ||
			    !lookup_msg(to_msg, ctx, eid, target, sizeof(target)))
				continue;
			const char *who;
			json_t *info;
			json_object_foreach(reads, who, info) {
				if (!mx_user_id_parse(who, NULL, 0, NULL, 0) || json_array_size(list) >= EPHEMERAL_MAX)
					continue;
				json_t *e = json_pack("{s:s, s:{s:s, s:s}}", "type", "receipt", "content", "in_reply_to", target,
						      "receipt", "read");
				json_t *tsv = json_object_get(info, "ts");
				if (json_is_integer(tsv) && json_integer_value(tsv) > 0 &&
				    json_integer_value(tsv) < EVENT_TS_LIMIT)
					json_object_set_new(e, "ts", json_integer(json_integer_value(tsv)));
				json_array_append_new(list, item(who, e));
			}
		}
	}
	return list;
}

/* ------------------------------------------------------------ neutral -> Matrix */

void mx_out_clear(struct mx_out *o)
{
	if (!o)
		return;
	json_decref(o->content);
	memset(o, 0, sizeof(*o));
	o->op = MX_OP_NONE;
}

/* The text of a neutral message, as Matrix wants it. */
struct text {
	char msgtype[16];
	char *body;       /* malloc'd */
	char *html;       /* malloc'd sanitised HTML, or NULL */
};

static void text_free(struct text *t)
{
	free(t->body);
	free(t->html);
	t->body = t->html = NULL;
}

static const char *attachment_label(const char *content_type)
{
	if (starts_with(content_type, "image/"))
		return "image";
	if (starts_with(content_type, "video/"))
		return "video";
	if (starts_with(content_type, "audio/"))
		return "audio";
	return "file";
}

/* Collects body and HTML from the parts and the msgtype from the extension
 * member; with list_attachments, the attachments are listed in the text. */
static bool neutral_text(const json_t *content, bool list_attachments, struct text *t, char *why, size_t whylen)
{
	memset(t, 0, sizeof(*t));
	const char *mt = str_member(content, MX_MSGTYPE_KEY);
	snprintf(t->msgtype, sizeof(t->msgtype), "%s",
		 mt && (strcmp(mt, "m.notice") == 0 || strcmp(mt, "m.emote") == 0) ? mt : "m.text");
	const char *plain = NULL, *md = NULL, *html = NULL;
	const json_t *parts = json_object_get(content, "parts"), *p;
	size_t i;
	json_array_foreach(parts, i, p) {
		const char *type = str_member(p, "type"), *body = str_member(p, "body");
		if (!type || !body)
			continue;
		if (!plain && strcmp(type, "text/plain") == 0)
			plain = body;
		else if (!md && strcmp(type, "text/markdown") == 0)
			md = body;
		else if (!html && strcmp(type, "text/html") == 0)
			html = body;
	}
	bool emote = strcmp(t->msgtype, "m.emote") == 0;
	char *clean = NULL, *derived = NULL;
	if (html) {
		/* No <img>, its alt text instead: a peer's mxc:// is no file
		 * it sent (a relayed member's inline image goes the same way) */
		clean = mx_sanitize_html(html, strlen(html));
		if (!clean) { /* only memory, unless the part is larger than any event is */
			say(why, whylen, "%s",
			    strlen(html) > HTML_INPUT_MAX ? "the HTML part is too large" : MX_WHY_NOMEM);
			return false;
		}
		if (html_blank(clean)) {
			free(clean);
			clean = NULL;
		}
	}
	const char *text = plain ? plain : md;
	if (!text && html)
		text = derived = html_text(html, false);
	/* Matrix events are at most 64 KiB: a cap well above what fits. */
	struct cw_buf b, h;
	cw_buf_init(&b, 256 * 1024);
	cw_buf_init(&h, 256 * 1024);
	if (text)
		adds(&b, emote && starts_with(text, "* ") ? text + 2 : text);
	if (clean) {
		size_t at = emote ? first_line_at(clean) : 0;
		add(&h, clean, at);
		adds(&h, emote && starts_with(clean + at, "* ") ? clean + at + 2 : clean + at);
	}
	free(derived);
	free(clean);
	if (list_attachments) {
		const json_t *a;
		json_array_foreach(json_object_get(content, "attachments"), i, a) {
			const char *ct = str_member(a, "content_type"), *url = str_member(a, "url");
			const char *name = str_member(a, "filename");
			if (!ct || !url)
				continue;
			char head[300];
			snprintf(head, sizeof(head), "[%s: %s] ", attachment_label(ct), name ? name : "file");
			if (b.len)
				adds(&b, "\n");
			adds(&b, head);
			adds(&b, url);
			if (h.len) {
				adds(&h, "<br>");
				add_escaped(&h, head, false);
				add_escaped(&h, url, false);
			}
		}
	}
	if (b.overflow || h.overflow) {
		cw_buf_free(&b);
		cw_buf_free(&h);
		say(why, whylen, "the message is too large for Matrix");
		return false;
	}
	bool with_html = h.len > 0;
	t->body = cw_buf_take(&b, NULL);
	t->html = with_html ? cw_buf_take(&h, NULL) : NULL;
	cw_buf_free(&h);
	if (!t->body || (with_html && !t->html)) {
		text_free(t);
		say(why, whylen, MX_WHY_NOMEM);
		return false;
	}
	return true;
}

/* {msgtype, body[, format, formatted_body]} with prefix before both. */
static json_t *text_content(const struct text *t, const char *prefix)
{
	json_t *c = json_object();
	size_t pl = strlen(prefix);
	char *body = malloc(pl + strlen(t->body) + 1);
	if (!c || !body) {
		free(body);
		json_decref(c);
		return NULL;
	}
	memcpy(body, prefix, pl);
	strcpy(body + pl, t->body);
	json_object_set_new(c, "msgtype", json_string(t->msgtype));
	json_object_set_new(c, "body", json_string(body));
	free(body);
	if (t->html) {
		char *fb = malloc(pl + strlen(t->html) + 1);
		if (!fb) {
			json_decref(c);
			return NULL;
		}
		memcpy(fb, prefix, pl);
		strcpy(fb + pl, t->html);
		json_object_set_new(c, "format", json_string(HTML_FORMAT));
		json_object_set_new(c, "formatted_body", json_string(fb));
		free(fb);
	}
	return c;
}

/* Whether content's attachments are one file with an mxc:// url: a media
 * message's (or edit's), the text its caption. */
static bool one_mxc_file(const json_t *content)
{
	const json_t *atts = json_object_get(content, "attachments");
	const json_t *a = json_array_get(atts, 0);
	const char *url = str_member(a, "url");
	return json_array_size(atts) == 1 && url && mxc_ok(url) && str_member(a, "content_type");
}

/* A single mxc:// attachment (one_mxc_file): the media message's fields,
 * into c; without a caption, body is prefix and the file's name. */
static bool media_message(const json_t *content, bool caption, const char *prefix, json_t *c)
{
	if (!one_mxc_file(content))
		return false;
	const json_t *a = json_array_get(json_object_get(content, "attachments"), 0);
	const char *ct = str_member(a, "content_type"), *url = str_member(a, "url");
	const char *name = str_member(a, "filename");
	static const char *const types[][2] = {
		{ "image", "m.image" }, { "video", "m.video" }, { "audio", "m.audio" }, { "file", "m.file" },
	};
	const char *label = attachment_label(ct), *msgtype = "m.file";
	for (size_t i = 0; i < CW_ARRAY_LEN(types); i++)
		if (strcmp(label, types[i][0]) == 0)
			msgtype = types[i][1];
	if (!name)
		name = label;
	json_object_set_new(c, "msgtype", json_string(msgtype));
	json_object_set_new(c, "url", json_string(url));
	json_object_set_new(c, "filename", json_string(name));
	json_t *info = json_pack("{s:s}", "mimetype", ct);
	const json_t *size = json_object_get(a, "size");
	if (json_is_integer(size))
		json_object_set_new(info, "size", json_integer(json_integer_value(size)));
	json_object_set_new(c, "info", info);
	if (!caption) { /* body is the file name */
		size_t pl = strlen(prefix), nl = strlen(name);
		char *body = malloc(pl + nl + 1);
		if (!body)
			return false;
		memcpy(body, prefix, pl);
		memcpy(body + pl, name, nl + 1);
		json_object_set_new(c, "body", json_string(body));
		free(body);
		json_object_del(c, "format");
		json_object_del(c, "formatted_body");
	}
	return true;
}

/* Matrix takes an event (the whole PDU, as canonical JSON) of at most
 * 65,536 bytes: a homeserver refuses a larger one with 413 M_TOO_LARGE.
 * It adds the envelope (sender, room, ids, the room's previous and auth
 * events, hashes, signatures) and the adapter its marks (MX_OUTBOX_KEY,
 * MX_PART_KEY), so a content is kept under this. */
#define MX_CONTENT_MAX (65536 - 4096)
/* What ends a text cut to fit. */
static const char SHORTENED[] = "\xe2\x80\xa6 (message shortened)";
/* The start of an edit's text that its fallback body keeps, in bytes. */
#define EDIT_FALLBACK_MAX 100

static size_t content_size(const json_t *c)
{
	return json_dumpb(c, NULL, 0, JSON_COMPACT);
}

/* obj's member key: prefix, the start of s (at most keep bytes, cut on a
 * character), then suffix. */
static bool set_cut(json_t *obj, const char *key, const char *prefix, const char *s, size_t keep, const char *suffix)
{
	size_t pl = strlen(prefix), n = cw_utf8_cut(s, keep), sl = strlen(suffix);
	char *v = malloc(pl + n + sl + 1);
	if (!v)
		return false;
	memcpy(v, prefix, pl);
	memcpy(v + pl, s, n);
	memcpy(v + pl + n, suffix, sl + 1);
	bool ok = json_object_set_new(obj, key, json_string(v)) == 0;
	free(v);
	return ok;
}

/* Makes a message's (or an edit's) content fit in a Matrix event, step by
 * step, each only when the one before was not enough: the HTML left out
 * (the text stays); for an edit, its fallback body (for clients without
 * edits) made "* " and the text's start, m.new_content keeping the text;
 * then the text cut on a character, SHORTENED after it.  false: no
 * memory. */
static bool fit_content(json_t *c)
{
	size_t size = content_size(c); /* 0: no memory */
	if (size <= MX_CONTENT_MAX)
		return size != 0;
	json_t *nc = json_object_get(c, "m.new_content");
	json_object_del(c, "format");
	json_object_del(c, "formatted_body");
	json_object_del(nc, "format");
	json_object_del(nc, "formatted_body");
	if ((size = content_size(c)) <= MX_CONTENT_MAX)
		return size != 0;
	const char *text = json_string_value(json_object_get(nc, "body"));
	if (text) {
		const char *more = strlen(text) > EDIT_FALLBACK_MAX ? "\xe2\x80\xa6" : "";
		if (!set_cut(c, "body", "* ", text, EDIT_FALLBACK_MAX, more))
			return false;
		if ((size = content_size(c)) <= MX_CONTENT_MAX)
			return size != 0;
	}
	json_t *holder = nc ? nc : c;
	const char *was = json_string_value(json_object_get(holder, "body"));
	char *body = strdup(was ? was : "");
	/* The longest cut of the text that fits, found by halving [lo, hi):
	 * a byte of text is one to six of JSON (quotes, backslashes, controls
	 * are escaped), so what is over says little of how much to cut (cut
	 * once by it, a text of quotes kept nothing but the marker). */
	size_t lo = 0, hi = body ? strlen(body) : 0, best = SIZE_MAX;
	while (body && lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		size = set_cut(holder, "body", "", body, mid, SHORTENED) ? content_size(c) : 0;
		if (size == 0)
			break;
		if (size <= MX_CONTENT_MAX) {
			best = mid;
			lo = mid + 1;
		} else {
			hi = mid;
		}
	}
	if (body && size != 0)
		size = best == SIZE_MAX ? 0 : set_cut(holder, "body", "", body, best, SHORTENED) ? content_size(c) : 0;
	free(body);
	return size != 0 && size <= MX_CONTENT_MAX;
}

/* out: a send of c (taken), made to fit when it is a message's (an edit's). */
static bool finish_send(struct mx_out *out, const char *type, json_t *c, const char *marker_key,
			const char *marker_value)
{
	out->op = MX_OP_SEND;
	snprintf(out->event_type, sizeof(out->event_type), "%s", type);
	if (marker_key && marker_value)
		json_object_set_new(c, marker_key, json_string(marker_value));
	out->content = c;
	return strcmp(type, "m.room.message") != 0 || fit_content(c);
}

static bool none(struct mx_out *out, char *why, size_t whylen, const char *what)
{
	out->op = MX_OP_NONE;
	say(why, whylen, "%s", what);
	return true;
}

static bool fail(struct mx_out *out, char *why, size_t whylen, const char *what)
{
	mx_out_clear(out);
	say(why, whylen, "%s", what);
	return false;
}

/* The m.relates_to of a reply to the Matrix event target: in the thread
 * target is in, when to_native (asked for target itself) names its root:
 * a reply to a thread's event belongs in the thread (m.thread to the
 * root, not a fallback, m.in_reply_to target); until the fiftieth session
 * it went to the room's main timeline.  Else a plain reply. */
static json_t *reply_relation(mx_lookup_fn to_native, void *ctx, const char *target)
{
	char root[MX_ID_MAX + 1];
	if (lookup_event(to_native, ctx, target, root, sizeof(root)) && strcmp(root, target) != 0)
		return json_pack("{s:s, s:s, s:b, s:{s:s}}", "rel_type", "m.thread", "event_id", root, "is_falling_back",
				 0, "m.in_reply_to", "event_id", target);
	return json_pack("{s:{s:s}}", "m.in_reply_to", "event_id", target);
}

static bool out_message(const json_t *content, mx_lookup_fn to_native, void *ctx, const char *marker_key,
			const char *marker_value, struct mx_out *out, char *why, size_t whylen)
{
	bool media = one_mxc_file(content);
	struct text t;
	if (!neutral_text(content, !media, &t, why, whylen)) {
		mx_out_clear(out);
		return false;
	}
	bool caption = *t.body != '\0';
	if (!caption && !media) {
		text_free(&t);
		return fail(out, why, whylen, "the message has no text and no attachment");
	}
	json_t *c = text_content(&t, "");
	text_free(&t);
	if (!c || (media && !media_message(content, caption, "", c))) {
		json_decref(c);
		return fail(out, why, whylen, MX_WHY_NOMEM);
	}
	char target[MX_ID_MAX + 1];
	const char *reply = str_member(content, "in_reply_to");
	if (reply && lookup_event(to_native, ctx, reply, target, sizeof(target)))
		json_object_set_new(c, "m.relates_to", reply_relation(to_native, ctx, target));
	json_object_set_new(c, "m.mentions", json_object());
	if (!finish_send(out, "m.room.message", c, marker_key, marker_value))
		return fail(out, why, whylen, MX_WHY_NOMEM);
	return true;
}

static bool out_edit(const json_t *content, mx_lookup_fn to_native, void *ctx, const char *marker_key,
		     const char *marker_value, struct mx_out *out, char *why, size_t whylen)
{
	const char *replaces = str_member(content, "replaces");
	if (!replaces)
		return fail(out, why, whylen, "an edit needs replaces");
	/* The message's new version with its file (a caption changed, say):
	 * a media event's content, in m.new_content and the fallback both,
	 * as Matrix clients edit a caption (until the forty-sixth session the
	 * file became a line of the text, a peer's URL a bare link into its
	 * store, and the image in the room was replaced by that text). */
	bool media = one_mxc_file(content);
	struct text t;
	if (!neutral_text(content, !media, &t, why, whylen)) {
		mx_out_clear(out);
		return false;
	}
	bool caption = *t.body != '\0';
	if (!caption && !media) {
		text_free(&t);
		return fail(out, why, whylen, "the edit has no text");
	}
	json_t *c = text_content(&t, "* ");
	json_t *nc = text_content(&t, "");
	text_free(&t);
	if (!c || !nc ||
	    (media && (!media_message(content, caption, "* ", c) || !media_message(content, caption, "", nc)))) {
		json_decref(c);
		json_decref(nc);
		return fail(out, why, whylen, MX_WHY_NOMEM);
	}
	char target[MX_ID_MAX + 1];
	if (lookup_event(to_native, ctx, replaces, target, sizeof(target))) {
		json_object_set_new(nc, "m.mentions", json_object());
		json_object_set_new(c, "m.new_content", nc);
		json_object_set_new(c, "m.relates_to", json_pack("{s:s, s:s}", "rel_type", "m.replace", "event_id", target));
	} else {
		json_decref(nc); /* the original never reached Matrix: a new message */
	}
	json_object_set_new(c, "m.mentions", json_object());
	if (!finish_send(out, "m.room.message", c, marker_key, marker_value))
		return fail(out, why, whylen, MX_WHY_NOMEM);
	return true;
}

/* The characters that are an emoji with U+FE0F (VS16) after them and text
 * without (Unicode's emoji variation sequences of the characters whose
 * default presentation is text: RGI_Emoji holds "c FE0F", not "c"), from
 * ICU 72 (Unicode 15): later emoji are emoji by default. */
static const unsigned vs16_ranges[][2] = {
	{ 0x00A9, 0x00A9 }, { 0x00AE, 0x00AE }, { 0x203C, 0x203C }, { 0x2049, 0x2049 }, { 0x2122, 0x2122 },
	{ 0x2139, 0x2139 }, { 0x2194, 0x2199 }, { 0x21A9, 0x21AA }, { 0x2328, 0x2328 }, { 0x23CF, 0x23CF },
	{ 0x23ED, 0x23EF }, { 0x23F1, 0x23F2 }, { 0x23F8, 0x23FA }, { 0x24C2, 0x24C2 }, { 0x25AA, 0x25AB },
	{ 0x25B6, 0x25B6 }, { 0x25C0, 0x25C0 }, { 0x25FB, 0x25FC }, { 0x2600, 0x2604 }, { 0x260E, 0x260E },
	{ 0x2611, 0x2611 }, { 0x2618, 0x2618 }, { 0x261D, 0x261D }, { 0x2620, 0x2620 }, { 0x2622, 0x2623 },
	{ 0x2626, 0x2626 }, { 0x262A, 0x262A }, { 0x262E, 0x262F }, { 0x2638, 0x263A }, { 0x2640, 0x2640 },
	{ 0x2642, 0x2642 }, { 0x265F, 0x2660 }, { 0x2663, 0x2663 }, { 0x2665, 0x2666 }, { 0x2668, 0x2668 },
	{ 0x267B, 0x267B }, { 0x267E, 0x267E }, { 0x2692, 0x2692 }, { 0x2694, 0x2697 }, { 0x2699, 0x2699 },
	{ 0x269B, 0x269C }, { 0x26A0, 0x26A0 }, { 0x26A7, 0x26A7 }, { 0x26B0, 0x26B1 }, { 0x26C8, 0x26C8 },
	{ 0x26CF, 0x26CF }, { 0x26D1, 0x26D1 }, { 0x26D3, 0x26D3 }, { 0x26E9, 0x26E9 }, { 0x26F0, 0x26F1 },
	{ 0x26F4, 0x26F4 }, { 0x26F7, 0x26F9 }, { 0x2702, 0x2702 }, { 0x2708, 0x2709 }, { 0x270C, 0x270D },
	{ 0x270F, 0x270F }, { 0x2712, 0x2712 }, { 0x2714, 0x2714 }, { 0x2716, 0x2716 }, { 0x271D, 0x271D },
	{ 0x2721, 0x2721 }, { 0x2733, 0x2734 }, { 0x2744, 0x2744 }, { 0x2747, 0x2747 }, { 0x2763, 0x2764 },
	{ 0x27A1, 0x27A1 }, { 0x2934, 0x2935 }, { 0x2B05, 0x2B07 }, { 0x3030, 0x3030 }, { 0x303D, 0x303D },
	{ 0x3297, 0x3297 }, { 0x3299, 0x3299 }, { 0x1F170, 0x1F171 }, { 0x1F17E, 0x1F17F }, { 0x1F202, 0x1F202 },
	{ 0x1F237, 0x1F237 }, { 0x1F321, 0x1F321 }, { 0x1F324, 0x1F32C }, { 0x1F336, 0x1F336 }, { 0x1F37D, 0x1F37D },
	{ 0x1F396, 0x1F397 }, { 0x1F399, 0x1F39B }, { 0x1F39E, 0x1F39F }, { 0x1F3CB, 0x1F3CE }, { 0x1F3D4, 0x1F3DF },
	{ 0x1F3F3, 0x1F3F3 }, { 0x1F3F5, 0x1F3F5 }, { 0x1F3F7, 0x1F3F7 }, { 0x1F43F, 0x1F43F }, { 0x1F441, 0x1F441 },
	{ 0x1F4FD, 0x1F4FD }, { 0x1F549, 0x1F54A }, { 0x1F56F, 0x1F570 }, { 0x1F573, 0x1F579 }, { 0x1F587, 0x1F587 },
	{ 0x1F58A, 0x1F58D }, { 0x1F590, 0x1F590 }, { 0x1F5A5, 0x1F5A5 }, { 0x1F5A8, 0x1F5A8 }, { 0x1F5B1, 0x1F5B2 },
	{ 0x1F5BC, 0x1F5BC }, { 0x1F5C2, 0x1F5C4 }, { 0x1F5D1, 0x1F5D3 }, { 0x1F5DC, 0x1F5DE }, { 0x1F5E1, 0x1F5E1 },
	{ 0x1F5E3, 0x1F5E3 }, { 0x1F5E8, 0x1F5E8 }, { 0x1F5EF, 0x1F5EF }, { 0x1F5F3, 0x1F5F3 }, { 0x1F5FA, 0x1F5FA },
	{ 0x1F6CB, 0x1F6CB }, { 0x1F6CD, 0x1F6CF }, { 0x1F6E0, 0x1F6E5 }, { 0x1F6E9, 0x1F6E9 }, { 0x1F6F0, 0x1F6F0 },
	{ 0x1F6F3, 0x1F6F3 },
};

static bool wants_vs16(unsigned c)
{
	size_t lo = 0, hi = CW_ARRAY_LEN(vs16_ranges);
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (c < vs16_ranges[mid][0])
			hi = mid;
		else if (c > vs16_ranges[mid][1])
			lo = mid + 1;
		else
			return true;
	}
	return false;
}

bool mx_reaction_key(const char *key, char *out, size_t size)
{
	const unsigned char *p = (const unsigned char *)key;
	size_t n = strlen(key), o = 0;
	while (n) {
		unsigned c, next = 0;
		size_t l = cw_utf8_seq(p, n, &c);
		if (!l)
			return false;
		if (l < n)
			cw_utf8_seq(p + l, n - l, &next);
		/* After one of those, or before a keycap's U+20E3, unless a
		 * selector is there already or a skin tone follows (a modifier
		 * sequence takes none: "\u261D\U0001F3FD"). */
		bool keycap = next == 0x20E3 && ((c >= '0' && c <= '9') || c == '#' || c == '*');
		bool add = (wants_vs16(c) || keycap) && next != 0xFE0E && next != 0xFE0F && !(next >= 0x1F3FB && next <= 0x1F3FF);
		if (o + l + (add ? 3 : 0) >= size)
			return false;
		memcpy(out + o, p, l);
		o += l;
		if (add) {
			memcpy(out + o, "\xEF\xB8\x8F", 3);
			o += 3;
		}
		p += l;
		n -= l;
	}
	out[o] = '\0';
	return true;
}

static bool out_reaction(const json_t *content, mx_lookup_fn to_native, void *ctx, const char *marker_key,
			 const char *marker_value, struct mx_out *out, char *why, size_t whylen)
{
	const char *target_msg = str_member(content, "in_reply_to");
	const char *key = str_member(json_array_get(json_object_get(content, "parts"), 0), "body");
	if (!target_msg || !key || !*key)
		return fail(out, why, whylen, "a reaction needs in_reply_to and one part");
	char target[MX_ID_MAX + 1];
	if (!lookup_event(to_native, ctx, target_msg, target, sizeof(target)))
		return none(out, why, whylen, "a reaction to a message that is not in Matrix");
	/* Clients show a key that is an mxc:// URI as that file (MSC4027): one
	 * the peer did not send, of any Matrix server, as a peer's <img> is
	 * not carried either. */
	if (starts_with(key, "mxc://"))
		return none(out, why, whylen, "a reaction whose key is an mxc:// URI names no file the peer sent");
	/* As Matrix clients send an emoji ("\u2764\uFE0F"): a peer's "\u2764"
	 * would be a reaction of its own beside theirs, shown as text. */
	char emoji[MX_REACTION_KEY_MAX];
	json_t *c = json_pack("{s:{s:s, s:s, s:s}}", "m.relates_to", "rel_type", "m.annotation", "event_id", target,
			      "key", mx_reaction_key(key, emoji, sizeof(emoji)) ? emoji : key);
	if (!c)
		return fail(out, why, whylen, MX_WHY_NOMEM);
	finish_send(out, "m.reaction", c, marker_key, marker_value);
	return true;
}

bool mx_from_neutral(const json_t *neutral, mx_lookup_fn to_native, void *ctx, const char *marker_key,
		     const char *marker_value, struct mx_out *out, char *why, size_t whylen)
{
	memset(out, 0, sizeof(*out));
	out->op = MX_OP_NONE;
	if (why && whylen)
		why[0] = '\0';
	const char *type = str_member(neutral, "type");
	const json_t *content = json_object_get(neutral, "content");
	if (!type || !json_is_object(content))
		return fail(out, why, whylen, "a neutral event needs a type and a content object");
	char target[MX_ID_MAX + 1];
	if (strcmp(type, "message") == 0)
		return out_message(content, to_native, ctx, marker_key, marker_value, out, why, whylen);
	if (strcmp(type, "edit") == 0)
		return out_edit(content, to_native, ctx, marker_key, marker_value, out, why, whylen);
	if (strcmp(type, "reaction") == 0)
		return out_reaction(content, to_native, ctx, marker_key, marker_value, out, why, whylen);
	if (strcmp(type, "delete") == 0) {
		const char *replaces = str_member(content, "replaces");
		if (!replaces)
			return fail(out, why, whylen, "a delete needs replaces");
		if (!lookup_event(to_native, ctx, replaces, target, sizeof(target)))
			return none(out, why, whylen, "a delete of a message that is not in Matrix");
		out->op = MX_OP_REDACT;
		snprintf(out->target, sizeof(out->target), "%s", target);
		out->content = json_object();
		return true;
	}
	if (strcmp(type, "receipt") == 0) {
		const char *kind = str_member(content, "receipt"), *msg = str_member(content, "in_reply_to");
		if (!kind || !msg || (strcmp(kind, "read") != 0 && strcmp(kind, "delivered") != 0))
			return fail(out, why, whylen, "a receipt needs in_reply_to and receipt read or delivered");
		if (strcmp(kind, "delivered") == 0)
			return none(out, why, whylen, "Matrix has no delivery receipts");
		if (!lookup_event(to_native, ctx, msg, target, sizeof(target)))
			return none(out, why, whylen, "a receipt for a message that is not in Matrix");
		out->op = MX_OP_RECEIPT;
		snprintf(out->target, sizeof(out->target), "%s", target);
		return true;
	}
	if (strcmp(type, "typing") == 0) {
		const char *state = str_member(content, "state");
		if (!state || (strcmp(state, "start") != 0 && strcmp(state, "stop") != 0))
			return fail(out, why, whylen, "typing needs state start or stop");
		out->op = MX_OP_TYPING;
		out->typing = strcmp(state, "start") == 0;
		return true;
	}
	if (strcmp(type, "membership") == 0 || strcmp(type, "block") == 0)
		return none(out, why, whylen, "memberships and blocks are handled by the adapter, not sent as events");
	return fail(out, why, whylen, "unknown neutral event type");
}

/* ------------------------------------------------------------ reading JSON */

/* What mx_json_load puts in the place of what jansson cannot read: a
 * number past a double's range becomes this string (a NUL in it, so that
 * mx_json_has_nul finds it, and what follows telling it apart), a key that
 * holds a NUL a key of KEY_MARK and a number of its own (keys are C
 * strings in jansson, and must be unique in their object). */
#define NUMBER_MARK "\\u0000cw:number-out-of-range"
#define NUMBER_MARK_TEXT "\0cw:number-out-of-range"
/* An array or object nested past what jansson reads
 * (JSON_PARSER_MAX_DEPTH) becomes this string (patch_depth). */
#define DEPTH_MARK "\\u0000cw:nested-too-deep"
#define DEPTH_MARK_TEXT "\0cw:nested-too-deep"
#define KEY_MARK_NAME "cw:unreadable:"
#define KEY_MARK "\001" KEY_MARK_NAME
/* A key that is its object's second of that name becomes a key of
 * DUP_MARK and a number of its own (mx_json_duplicate_key). */
#define DUP_MARK_NAME "cw:duplicate:"
#define DUP_MARK "\001" DUP_MARK_NAME
#define LOAD_PATCHES_MAX 64
#define LOAD_READ_FACTOR 4
#define LOAD_READ_MIN (4u << 20)

/* Whether the key token that ends at end (after its closing quote) in
 * buf starts at *start (its opening quote): the first quote before it not
 * escaped (preceded by an even number of backslashes). */
static bool key_token(const char *buf, size_t end, size_t *start)
{
	if (end < 2 || buf[end - 1] != '"')
		return false;
	for (size_t i = end - 1; i-- > 0;) {
		if (buf[i] != '"')
			continue;
		size_t bs = 0;
		while (bs < i && buf[i - 1 - bs] == '\\')
			bs++;
		if (bs % 2 == 0) {
			*start = i;
			return true;
		}
	}
	return false;
}

/* Whether the JSON string token buf[start, end) names a key of KEY_MARK
 * (a mark of mx_json_load's, or a key written so). */
static bool key_is_mark(const char *buf, size_t start, size_t end)
{
	json_error_t e;
	json_t *k = json_loadb(buf + start, end - start, JSON_DECODE_ANY, &e);
	bool mark = json_is_string(k) && strncmp(json_string_value(k), KEY_MARK, strlen(KEY_MARK)) == 0;
	json_decref(k);
	return mark;
}

/* What takes the place of the token that jansson's error err (at its end,
 * err->position, in buf) is about: *start its beginning, with its new text
 * in out; false when the error is none of these (the body is refused). */
static bool patch_for(const char *buf, size_t n, const json_error_t *err, unsigned *marks, size_t *start, char *out,
		      size_t outlen)
{
	size_t end = (size_t)err->position;
	if (err->position < 0 || end > n)
		return false;
	switch (json_error_code(err)) {
	case json_error_numeric_overflow: { /* an integer past 64 bits, a number past a double's range */
		size_t s = end;
		while (s > 0 && strchr("0123456789+-.eE", buf[s - 1]))
			s--;
		if (s == end || !(buf[s] == '-' || (buf[s] >= '0' && buf[s] <= '9')))
			return false;
		*start = s;
		if (memchr(buf + s, '.', end - s) || memchr(buf + s, 'e', end - s) || memchr(buf + s, 'E', end - s) ||
		    end - s + 3 > outlen)
			snprintf(out, outlen, "\"%s\"", NUMBER_MARK);
		else /* the integer, as a real: the odd number alone read as one */
			snprintf(out, outlen, "%.*s.0", (int)(end - s), buf + s);
		return true;
	}
	case json_error_null_byte_in_key:
		break;
	case json_error_duplicate_key:
		/* A key of the mark's text, beside one mx_json_load made: another
		 * mark.  Any other: a key twice in one object, which RFC 8259
		 * allows (names only SHOULD be unique) and a homeserver that
		 * passes an event's raw content through may send (Dendrite);
		 * which value is meant cannot be told, so its event is refused
		 * alone (until the forty-second session the whole body was). */
		if (!key_token(buf, end, start))
			return false;
		if (!key_is_mark(buf, *start, end)) {
			snprintf(out, outlen, "\"\\u0001" DUP_MARK_NAME "%u\"", (*marks)++);
			return true;
		}
		break;
	default:
		return false;
	}
	if (!key_token(buf, end, start))
		return false;
	snprintf(out, outlen, "\"\\u0001" KEY_MARK_NAME "%u\"", (*marks)++);
	return true;
}

/* What jansson makes of the number token buf[0, n), by its lexer's rules:
 * a token without '.', 'e' or 'E' is an integer, read with strtoll, which
 * must not overflow (else AS_REAL: patch_for reads it as a real); any
 * other a real, read with strtod, which must not overflow (else MARK: the
 * number mark), an underflow read as 0.  An integer past a double's range
 * too is MARK.  (The C locale's decimal point, as the daemon keeps it.) */
enum number_read { NUMBER_READ, NUMBER_AS_REAL, NUMBER_MARKED };

static enum number_read number_read(const char *buf, size_t n)
{
	char small[64], *tok = n < sizeof(small) ? small : malloc(n + 1);
	if (!tok)
		return NUMBER_MARKED; /* no memory: its event's trouble alone */
	memcpy(tok, buf, n);
	tok[n] = '\0';
	enum number_read how = NUMBER_READ;
	errno = 0;
	double d = strtod(tok, NULL);
	if ((d == HUGE_VAL || d == -HUGE_VAL) && errno == ERANGE) {
		how = NUMBER_MARKED;
	} else if (!strpbrk(tok, ".eE")) {
		errno = 0;
		long long v = strtoll(tok, NULL, 10);
		if ((v == LLONG_MAX || v == LLONG_MIN) && errno == ERANGE)
			how = NUMBER_AS_REAL;
	}
	if (tok != small)
		free(tok);
	return how;
}

/* Past the end of the JSON string whose text starts at buf[i] (after its
 * opening quote): past the next quote that no backslash escapes, or n.
 * How patch_numbers, container_end and patch_depth step over strings. */
static size_t string_end(const char *buf, size_t n, size_t i)
{
	while (i < n && buf[i] != '"')
		i += buf[i] == '\\' && i + 1 < n ? 2 : 1;
	return i < n ? i + 1 : n;
}

/* The JSON text buf (n bytes) with every number token that jansson cannot
 * read patched at once, as patch_for patches one: an integer past 64 bits
 * as a real ("digits.0"), a number past a double's range the number mark.
 * A copy (*outn bytes, malloc'd); NULL without memory.  The last resort of
 * mx_json_load, past its readings allowed: one pass, where a reading for
 * each token reads the whole body again.  Only the tokens are told apart,
 * not the structure (jansson reads the copy, and refuses it when it is no
 * JSON): outside a string, a number starts with '-' or a digit and runs
 * on over digits, signs, '.', 'e' and 'E' (as patch_for reads one back
 * from its end); a string runs from a quote to the next quote that no
 * backslash escapes. */
static char *patch_numbers(const char *buf, size_t n, size_t *outn)
{
	struct cw_buf out;
	/* each token grows by the mark's text at most, and takes two bytes at
	 * least with what follows it */
	cw_buf_init(&out, n + (n / 2 + 1) * sizeof(NUMBER_MARK));
	bool failed = false;
	size_t i = 0, copied = 0;
	while (i < n && !failed) {
		char ch = buf[i];
		if (ch != '-' && !(ch >= '0' && ch <= '9')) {
			i = ch == '"' ? string_end(buf, n, i + 1) : i + 1;
			continue;
		}
		size_t e = i;
		while (e < n && buf[e] && strchr("0123456789+-.eE", buf[e]))
			e++;
		enum number_read how = number_read(buf + i, e - i);
		if (how != NUMBER_READ) {
			failed = cw_buf_add(&out, buf + copied, (how == NUMBER_AS_REAL ? e : i) - copied) ||
				 cw_buf_add(&out, how == NUMBER_AS_REAL ? ".0" : "\"" NUMBER_MARK "\"",
					    how == NUMBER_AS_REAL ? 2 : sizeof(NUMBER_MARK) + 1);
			copied = e;
		}
		i = e;
	}
	if (failed || cw_buf_add(&out, buf + copied, n - copied)) {
		cw_buf_free(&out);
		return NULL;
	}
	return cw_buf_take(&out, outn);
}

/* The end of the array or object that opens at buf[i]: past its closing
 * bracket (n when it has none).  Strings told apart as patch_numbers does. */
static size_t container_end(const char *buf, size_t n, size_t i)
{
	size_t depth = 0;
	while (i < n) {
		char ch = buf[i++];
		if (ch == '"')
			i = string_end(buf, n, i);
		else if (ch == '[' || ch == '{')
			depth++;
		else if ((ch == ']' || ch == '}') && --depth == 0)
			break;
	}
	return i < n ? i : n;
}

/* The JSON text buf (n bytes) with every array or object whose values
 * are past the depth jansson reads (JSON_PARSER_MAX_DEPTH, counted as
 * jansson counts it: every value, the body itself the first) replaced,
 * whole, by the depth
 * mark: a string with a NUL, so that its event is refused alone
 * (mx_json_has_nul; mx_json_too_deep tells it).  A copy (*outn bytes,
 * malloc'd); NULL without memory.  Only strings and brackets are told
 * apart (jansson reads what it makes, and refuses it if it is no JSON). */
static char *patch_depth(const char *buf, size_t n, size_t *outn)
{
	struct cw_buf out;
	cw_buf_init(&out, n + sizeof(DEPTH_MARK) + 2);
	bool failed = false;
	size_t i = 0, copied = 0, depth = 0;
	while (i < n && !failed) {
		char ch = buf[i];
		if (ch == '"') {
			i = string_end(buf, n, i + 1);
			continue;
		}
		if ((ch == '[' || ch == '{') && depth + 1 >= JSON_PARSER_MAX_DEPTH) {
			size_t e = container_end(buf, n, i);
			failed = cw_buf_add(&out, buf + copied, i - copied) ||
				 cw_buf_add(&out, "\"" DEPTH_MARK "\"", sizeof(DEPTH_MARK) + 1);
			copied = i = e;
			continue;
		}
		if (ch == '[' || ch == '{')
			depth++;
		else if ((ch == ']' || ch == '}') && depth > 0)
			depth--;
		i++;
	}
	if (failed || cw_buf_add(&out, buf + copied, n - copied)) {
		cw_buf_free(&out);
		return NULL;
	}
	return cw_buf_take(&out, outn);
}

json_t *mx_json_load(const char *body, size_t len, size_t flags, json_error_t *err)
{
	json_t *v = json_loadb(body, len, flags | JSON_ALLOW_NUL, err);
	char *buf = NULL;
	size_t n = len;
	unsigned marks = 0;
	/* Each reading is of the whole body: at most LOAD_PATCHES_MAX of them
	 * and LOAD_READ_FACTOR times the body (or LOAD_READ_MIN bytes) in all,
	 * so that a 16 MiB body costs a few readings, not 64. */
	size_t budget = len > LOAD_READ_MIN / LOAD_READ_FACTOR ? len * LOAD_READ_FACTOR : LOAD_READ_MIN, done = len;
	for (int k = 0; !v && k < LOAD_PATCHES_MAX; k++) {
		const char *cur = buf ? buf : body;
		if (json_error_code(err) == json_error_stack_overflow) {
			/* nested past jansson's depth: every such array or
			 * object at once (patch_depth), their events refused
			 * alone; until the thirty-ninth session the whole
			 * body was refused */
			size_t dn;
			char *next = patch_depth(cur, n, &dn);
			if (!next || done + dn > budget) {
				free(next);
				break;
			}
			free(buf);
			buf = next;
			n = dn;
			done += n;
			v = json_loadb(buf, n, flags | JSON_ALLOW_NUL, err);
			continue;
		}
		char with[2400];
		size_t start;
		/* an integer's digits past 2400 are past a double's range too: the mark */
		if (!patch_for(cur, n, err, &marks, &start, with, sizeof(with)))
			break;
		size_t end = (size_t)err->position, wn = strlen(with);
		if (done + n - (end - start) + wn > budget)
			break;
		char *next = malloc(n - (end - start) + wn);
		if (!next)
			break;
		memcpy(next, cur, start);
		memcpy(next + start, with, wn);
		memcpy(next + start + wn, cur + end, n - end);
		n = n - (end - start) + wn;
		free(buf);
		buf = next;
		done += n;
		v = json_loadb(buf, n, flags | JSON_ALLOW_NUL, err);
	}
	/* Past the readings allowed, numbers past what jansson reads are what
	 * a body can hold any number of (room versions 1 to 5): the rest of
	 * them patched at once, in one pass, as each would have been
	 * (patch_numbers), and the body read once more, every other number
	 * exactly.  Until the thirty-second session every number was read as
	 * a real then (an integer past 2^53 of another event lost its low
	 * bits), and a number past a double's range failed the whole body. */
	if (!v && json_error_code(err) == json_error_numeric_overflow) {
		size_t pn;
		char *all = patch_numbers(buf ? buf : body, n, &pn);
		if (all)
			v = json_loadb(all, pn, flags | JSON_ALLOW_NUL, err);
		free(all);
	}
	free(buf);
	return v;
}

/* Whether hit holds for v or anything in it, at any depth. */
static bool json_any(const json_t *v, bool (*hit)(const json_t *))
{
	size_t i;
	const char *k;
	json_t *x;
	if (hit(v))
		return true;
	if (json_is_object(v))
		json_object_foreach((json_t *)v, k, x)
			if (json_any(x, hit))
				return true;
	if (json_is_array(v))
		json_array_foreach(v, i, x)
			if (json_any(x, hit))
				return true;
	return false;
}

/* A string with a NUL, or an object with a key that held one (KEY_MARK)
 * or was a duplicate (DUP_MARK). */
static bool nul_here(const json_t *v)
{
	if (json_is_string(v))
		return strlen(json_string_value(v)) != json_string_length(v);
	const char *k;
	json_t *x;
	if (json_is_object(v))
		json_object_foreach((json_t *)v, k, x)
			if (strncmp(k, KEY_MARK, strlen(KEY_MARK)) == 0 || strncmp(k, DUP_MARK, strlen(DUP_MARK)) == 0)
				return true;
	return false;
}

/* An object with a key that was a duplicate (DUP_MARK). */
static bool dup_here(const json_t *v)
{
	const char *k;
	json_t *x;
	if (json_is_object(v))
		json_object_foreach((json_t *)v, k, x)
			if (strncmp(k, DUP_MARK, strlen(DUP_MARK)) == 0)
				return true;
	return false;
}

bool mx_json_duplicate_key(const json_t *v, bool deep)
{
	return deep ? json_any(v, dup_here) : dup_here(v);
}

static bool number_mark_here(const json_t *v)
{
	return json_is_string(v) && json_string_length(v) == sizeof(NUMBER_MARK_TEXT) - 1 &&
	       memcmp(json_string_value(v), NUMBER_MARK_TEXT, sizeof(NUMBER_MARK_TEXT) - 1) == 0;
}

static bool depth_mark_here(const json_t *v)
{
	return json_is_string(v) && json_string_length(v) == sizeof(DEPTH_MARK_TEXT) - 1 &&
	       memcmp(json_string_value(v), DEPTH_MARK_TEXT, sizeof(DEPTH_MARK_TEXT) - 1) == 0;
}

bool mx_json_too_deep(const json_t *v)
{
	return json_any(v, depth_mark_here);
}

bool mx_json_number_out_of_range(const json_t *v)
{
	return json_any(v, number_mark_here);
}

bool mx_json_has_nul(const json_t *v)
{
	return json_any(v, nul_here);
}
