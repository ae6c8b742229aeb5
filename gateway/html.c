/* libxml2 HTML trees (see html.h). */
#include "config.h"
#include "html.h"

#include "buf.h"

#include <libxml/SAX2.h>
#include <libxml/globals.h>
#include <libxml/parserInternals.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

void cw_html_context_set(htmlParserCtxtPtr ctxt, int options)
{
	htmlCtxtUseOptions(ctxt, options);
	ctxt->options |= XML_PARSE_HUGE;
	xmlCharEncodingHandlerPtr utf8 = xmlFindCharEncodingHandler("UTF-8");
	if (utf8)
		xmlSwitchToEncoding(ctxt, utf8);
}

htmlParserCtxtPtr cw_html_context(const char *buf, size_t n, int options)
{
	htmlParserCtxtPtr ctxt = htmlCreateMemoryParserCtxt(buf, (int)n);
	if (ctxt)
		cw_html_context_set(ctxt, options);
	return ctxt;
}

/* libxml2 2.9 drops an end tag of an element that is not open; the HTML
 * Standard's parser reads a stray </br> as <br> and a stray </p> as an
 * empty <p>, so that "one</br>two" and "one</p>two" show on two lines,
 * where libxml2 glued the words: "onetwo".  Its error for such a tag
 * (XML_ERR_TAG_NAME_MISMATCH naming the tag alone, "Unexpected end tag")
 * is where a <br> goes, at the parser's current node, for either: an
 * empty <p> in a <b> or a heading would end it when read again (libxml2
 * closes those at a <p>), and sanitised HTML is read again. */
/* libxml2 2.12 made the handler's error const (xmlStructuredErrorFunc). */
#if LIBXML_VERSION >= 21200
static void stray_end_tag(void *arg, const xmlError *e)
#else
static void stray_end_tag(void *arg, xmlErrorPtr e)
#endif
{
	htmlParserCtxtPtr ctxt = arg;
	if (!e || e->code != XML_ERR_TAG_NAME_MISMATCH || !e->str1 || e->str2 || e->ctxt != (void *)ctxt ||
	    !ctxt->node || ctxt->disableSAX)
		return;
	if (strcmp(e->str1, "br") == 0 || strcmp(e->str1, "p") == 0) {
		xmlSAX2StartElement(ctxt, (const xmlChar *)"br", NULL);
		xmlSAX2EndElement(ctxt, (const xmlChar *)"br");
	}
}

void cw_html_parse(htmlParserCtxtPtr ctxt)
{
	xmlStructuredErrorFunc was = xmlStructuredError; /* the thread's */
	void *was_ctx = xmlStructuredErrorContext;
	xmlSetStructuredErrorFunc(ctxt, stray_end_tag);
	htmlParseDocument(ctxt);
	xmlSetStructuredErrorFunc(was_ctx, was);
}

void cw_html_walk(xmlDoc *doc, bool (*enter)(void *arg, xmlNode *n), void (*leave)(void *arg, xmlNode *n),
		  bool (*stopped)(void *arg), void *arg)
{
	xmlNode *top = (xmlNode *)doc;
	xmlNode *n = doc->children;
	while (n && !stopped(arg)) {
		if (enter(arg, n) && n->children) {
			n = n->children;
			continue;
		}
		leave(arg, n);
		while (n != top && !n->next) {
			n = n->parent;
			if (!n || n == top) {
				n = NULL;
				break;
			}
			leave(arg, n);
		}
		if (n)
			n = n->next;
	}
}

char *cw_url_trim(char *v)
{
	static const char ws[] = " \t\n\f\r";
	v += strspn(v, ws);
	size_t n = strlen(v);
	while (n && strchr(ws, v[n - 1]))
		v[--n] = '\0';
	return v;
}

/* ------------------------------------------------------------ text */

/* Elements whose content is not message text (docs/xmpp.md "HTML-only text"). */
static const char *const skipped_tags[] = {
	"head", "title", "script", "style", "template", "noscript", "iframe", "object", "embed", "applet",
	"noembed", "noframes", NULL,
};
/* Elements set off by a blank line (as a browser's margins do). */
static const char *const paragraph_tags[] = {
	"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "hr", "dl", "figure", NULL,
};
/* Elements on lines of their own. */
static const char *const line_tags[] = {
	"div", "li", "tr", "ul", "ol", "section", "article", "header", "footer", "nav", "aside", "main",
	"address", "caption", "details", "summary", "dt", "dd", "figcaption", "form", "fieldset", "legend",
	"center", "thead", "tbody", "tfoot", NULL,
};
#define LIST_INDENT_MAX 8 /* levels of list indented */
#define HREF_MAX 2048     /* bytes of a link's href shown */

bool cw_html_hidden(const char *tag)
{
	return cw_in_list(tag, skipped_tags);
}

struct tw {
	struct cw_buf out;
	int breaks;     /* line feeds wanted before the next text (1 or 2) */
	bool space;     /* white space seen since the last text */
	int pre;        /* open <pre> elements */
	int lists;      /* open <ul> and <ol> elements */
	bool marked;    /* a list item's marker is the last thing written */
	bool oom;
	const char *const *skip; /* the caller's elements of no text, or NULL */
};

static void tw_add(struct tw *w, const char *s, size_t n)
{
	if (!w->oom && !w->out.overflow && cw_buf_add(&w->out, s, n) == CW_ENOMEM)
		w->oom = true;
}

static bool tw_stopped(void *arg)
{
	const struct tw *w = arg;
	return w->oom || w->out.overflow;
}

/* Line feeds ending the text so far. */
static int tw_trailing_lf(const struct tw *w)
{
	int n = 0;
	while (n < 2 && (size_t)n < w->out.len && w->out.p[w->out.len - 1 - n] == '\n')
		n++;
	return n;
}

/* One line feed, unless the text already ends with a blank line. */
static void tw_lf(struct tw *w)
{
	if (tw_trailing_lf(w) < 2)
		tw_add(w, "\n", 1);
}

/* Writes what is due before text: the wanted line feeds (none at the
 * start), else the collapsed white space (none at a line's start). */
static void tw_flush(struct tw *w)
{
	if (w->out.len && w->breaks) {
		while (tw_trailing_lf(w) < w->breaks && !tw_stopped(w))
			tw_add(w, "\n", 1);
	} else if (w->space && w->out.len && w->out.p[w->out.len - 1] != '\n' && w->out.p[w->out.len - 1] != ' ') {
		tw_add(w, " ", 1);
	}
	w->breaks = 0;
	w->space = false;
	w->marked = false;
}

/* Wants n line feeds before the next text (a block's first line stays on
 * its list item's marker line). */
static void tw_break(struct tw *w, int n)
{
	if (!w->marked && w->breaks < n)
		w->breaks = n;
}

/* Text: HTML white space (space, tab, LF, FF, CR) collapsed outside <pre>. */
static void tw_text(struct tw *w, const char *s)
{
	while (*s && !tw_stopped(w)) {
		size_t n = strcspn(s, " \t\n\f\r");
		if (n) {
			tw_flush(w);
			tw_add(w, s, n);
			s += n;
		}
		size_t ws = strspn(s, " \t\n\f\r");
		if (!ws)
			continue;
		if (w->pre) {
			tw_flush(w);
			for (size_t i = 0; i < ws; i++)
				if (s[i] == '\n')
					tw_lf(w);
				else if (s[i] != '\r')
					tw_add(w, s[i] == '\f' ? " " : s + i, 1);
		} else {
			w->space = true;
		}
		s += ws;
	}
}

/* An absolute http, https or mailto URL without white space or control
 * characters, short enough to show. */
static bool href_shown(const char *v)
{
	size_t n = strlen(v);
	if (n > HREF_MAX || !(strncasecmp(v, "http://", 7) == 0 || strncasecmp(v, "https://", 8) == 0 ||
			      strncasecmp(v, "mailto:", 7) == 0))
		return false;
	for (; *v; v++)
		if ((unsigned char)*v <= 0x20 || *v == 0x7f)
			return false;
	return true;
}

/* Whether a link's text (from the byte at start) already says its href:
 * the href itself, or a mailto: href's address. */
static bool says_href(const struct tw *w, size_t start, const char *href)
{
	const char *t = w->out.len ? w->out.p + start : "";
	while (*t == ' ' || *t == '\n')
		t++;
	if (strncasecmp(href, "mailto:", 7) == 0 && strcmp(t, href + 7) == 0)
		return true;
	return strcmp(t, href) == 0;
}

/* The line feeds around an element: 2 for a paragraph or an outermost
 * list, 1 for another block, else 0. */
static int tw_block(const struct tw *w, const char *tag)
{
	if (cw_in_list(tag, paragraph_tags) || ((strcmp(tag, "ul") == 0 || strcmp(tag, "ol") == 0) && !w->lists))
		return 2;
	return cw_in_list(tag, line_tags) ? 1 : 0;
}

static const char *attr(xmlNode *n, const char *name, xmlChar **keep)
{
	*keep = xmlGetProp(n, (const xmlChar *)name);
	return (const char *)*keep;
}

/* Visits an element on the way down; true to walk its children. */
static bool tw_enter(struct tw *w, xmlNode *n)
{
	const char *tag = (const char *)n->name;
	const char *parent = n->parent && n->parent->type == XML_ELEMENT_NODE ? (const char *)n->parent->name : "";
	n->_private = NULL;
	if (cw_html_hidden(tag) || (w->skip && cw_in_list(tag, w->skip)))
		return false;
	if (strcmp(tag, "br") == 0) {
		w->space = false; /* no space at a line's end */
		tw_flush(w);
		tw_lf(w);
		return false;
	}
	xmlChar *keep = NULL;
	if (strcmp(tag, "img") == 0) {
		const char *alt = attr(n, "alt", &keep);
		if (alt)
			tw_text(w, alt);
	} else if (strcmp(tag, "a") == 0) {
		n->_private = (void *)(uintptr_t)(w->out.len + 1); /* where its text starts */
	} else if (strcmp(tag, "ol") == 0) {
		const char *start = attr(n, "start", &keep);
		long long first = 1;
		cw_decimal(start, 0, 999999999, false, &first); /* else 1 */
		n->_private = (void *)(uintptr_t)first; /* the next item's number */
	} else if ((strcmp(tag, "td") == 0 || strcmp(tag, "th") == 0) && strcmp(parent, "tr") == 0) {
		if (n->parent->_private)
			tw_text(w, " | ");
		n->parent->_private = n->parent;
	}
	xmlFree(keep);
	if (strcmp(tag, "pre") == 0)
		w->pre++;
	tw_break(w, tw_block(w, tag));
	if (strcmp(tag, "ul") == 0 || strcmp(tag, "ol") == 0)
		w->lists++;
	if (strcmp(tag, "li") == 0) {
		w->marked = false;
		tw_break(w, 1);
		tw_flush(w);
		int indent = w->lists > 1 ? w->lists - 1 : 0;
		if (indent > LIST_INDENT_MAX)
			indent = LIST_INDENT_MAX;
		for (int i = 0; i < indent; i++)
			tw_add(w, "  ", 2);
		if (strcmp(parent, "ol") == 0) {
			uintptr_t num = (uintptr_t)n->parent->_private;
			n->parent->_private = (void *)(num + 1);
			char mark[32];
			int len = snprintf(mark, sizeof(mark), "%lu.", (unsigned long)num);
			tw_add(w, mark, (size_t)len);
		} else {
			tw_add(w, "\xE2\x80\xA2", 3); /* • */
		}
		w->space = true;
		w->marked = true;
	}
	return true;
}

/* Visits an element on the way up (after its children). */
static void tw_leave(struct tw *w, xmlNode *n)
{
	const char *tag = (const char *)n->name;
	if (strcmp(tag, "a") == 0 && n->_private) {
		size_t start = (uintptr_t)n->_private - 1;
		xmlChar *keep = xmlGetProp(n, (const xmlChar *)"href");
		const char *href = keep ? cw_url_trim((char *)keep) : NULL;
		if (href && href_shown(href) && !says_href(w, start, href)) {
			bool text = w->out.len && strspn(w->out.p + start, " \n") < w->out.len - start;
			if (text)
				tw_text(w, " (");
			tw_text(w, href);
			if (text)
				tw_text(w, ")");
		}
		xmlFree(keep);
	}
	if (strcmp(tag, "pre") == 0 && w->pre)
		w->pre--;
	if ((strcmp(tag, "ul") == 0 || strcmp(tag, "ol") == 0) && w->lists)
		w->lists--;
	int lines = tw_block(w, tag);
	if (lines) {
		w->marked = false; /* what follows an item is on a line of its own */
		tw_break(w, lines);
	}
	n->_private = NULL;
}

static bool tw_enter_node(void *arg, xmlNode *n)
{
	struct tw *w = arg;
	if (n->type == XML_TEXT_NODE || n->type == XML_CDATA_SECTION_NODE) {
		/* Text right in <html> is the layout between head and body. */
		bool layout = n->parent && n->parent->name && strcmp((const char *)n->parent->name, "html") == 0;
		if (n->content && !layout)
			tw_text(w, (const char *)n->content);
		return false;
	}
	if (n->type == XML_ELEMENT_NODE && n->name)
		return tw_enter(w, n);
	return false; /* comments, processing instructions, DTDs */
}

static void tw_leave_node(void *arg, xmlNode *n)
{
	if (n->type == XML_ELEMENT_NODE && n->name)
		tw_leave(arg, n);
}

char *cw_html_text(xmlDoc *doc, const char *const *skip, size_t max)
{
	struct tw w = { .skip = skip };
	cw_buf_init(&w.out, max);
	cw_html_walk(doc, tw_enter_node, tw_leave_node, tw_stopped, &w);
	if (w.oom) {
		cw_buf_free(&w.out);
		return NULL;
	}
	size_t len; /* what fits is the text */
	char *s = cw_buf_take(&w.out, &len);
	if (!s)
		return NULL;
	size_t start = 0;
	while (len && strchr(" \t\r\n", s[len - 1]))
		s[--len] = '\0';
	while (s[start] && strchr(" \t\r\n", s[start]))
		start++;
	memmove(s, s + start, len - start + 1);
	return s;
}
