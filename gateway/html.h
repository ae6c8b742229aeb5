/* libxml2 HTML trees as the adapters read them: one way to parse (deep
 * inputs kept whole) and one walk (no recursion). */
#ifndef CW_HTML_H
#define CW_HTML_H

#include <libxml/HTMLparser.h>
#include <stdbool.h>
#include <stddef.h>

/* A parser of the n bytes at buf (UTF-8, whatever they declare) with
 * options and XML_PARSE_HUGE, or NULL without memory.  XML_PARSE_HUGE
 * lifts libxml2's depth limit of 256, past which it stops parsing and the
 * rest of the text would be lost; htmlReadMemory() drops that option, hence
 * the context by hand.  The caller runs cw_html_parse(), takes myDoc
 * and frees the context. */
htmlParserCtxtPtr cw_html_context(const char *buf, size_t n, int options);
/* What cw_html_context sets on a context it made (options, XML_PARSE_HUGE,
 * UTF-8), for one the caller made or reset itself (mx_map.c's kept one). */
void cw_html_context_set(htmlParserCtxtPtr ctxt, int options);

/* htmlParseDocument(ctxt) as the HTML Standard reads two end tags that
 * libxml2 2.9 drops when their element is not open: a stray </br> is a
 * <br>, and so is a stray </p> (the Standard's empty <p>, which libxml2
 * would read as the end of an open <b> or heading when the sanitised HTML
 * is read again); until the fifty-third session "one</br>two" was the
 * text "onetwo".  The thread's structured error
 * handler is the one it had before again afterwards (the parse's own is
 * set for this thread only: libxml2's error globals are per thread). */
void cw_html_parse(htmlParserCtxtPtr ctxt);

/* Visits every node of doc in document order without recursion (a tree
 * may be as deep as its input is long): enter() on the way down, true to
 * visit the node's children; leave() on the way up, after them (for every
 * node entered).  Stops early when stopped() says so. */
void cw_html_walk(xmlDoc *doc, bool (*enter)(void *arg, xmlNode *n), void (*leave)(void *arg, xmlNode *n),
		  bool (*stopped)(void *arg), void *arg);

/* v without the ASCII white space (tab, LF, FF, CR, space) at its ends,
 * as a browser reads a URL in an attribute (the URL Standard strips
 * leading and trailing C0 controls and spaces; the other C0 controls are
 * left for the caller to refuse): cut in place, the pointer moved past the
 * leading. */
char *cw_url_trim(char *v);

/* Whether the element named tag holds no message text: head, title,
 * script, style, template, noscript, iframe, object, embed, applet,
 * noembed, noframes.  Its whole content goes, from the text (cw_html_text)
 * and from a Matrix formatted_body (mx_map.h mx_sanitize_html) alike. */
bool cw_html_hidden(const char *tag);

/* The text of doc as a reader of plain text expects it, the body an
 * HTML-only message gets on a network of plain text (docs/xmpp.md
 * "HTML-only text", docs/matrix.md): line breaks for <br> and blocks (a
 * blank line around paragraphs, headings, pre, blockquote, tables and
 * outermost lists), list items with their markers ("• ", an ol's "n. "
 * from its start) indented per enclosing list, table cells separated by
 * " | ", a link's http, https or mailto target after its text unless the
 * text says it, image alt text, HTML white space collapsed outside <pre>;
 * nothing of head, script, style and the like, nor of the elements named
 * in skip (NULL-terminated; NULL: none).  Trimmed, at most max bytes (what
 * does not fit is left off).  malloc'd ("" when nothing shows), NULL
 * without memory.  The walk marks elements in their _private. */
char *cw_html_text(xmlDoc *doc, const char *const *skip, size_t max);

#endif
