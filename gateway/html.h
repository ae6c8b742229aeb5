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
 * the context by hand.  The caller runs htmlParseDocument(), takes myDoc
 * and frees the context. */
htmlParserCtxtPtr cw_html_context(const char *buf, size_t n, int options);

/* Visits every node of doc in document order without recursion (a tree
 * may be as deep as its input is long): enter() on the way down, true to
 * visit the node's children; leave() on the way up, after them (for every
 * node entered).  Stops early when stopped() says so. */
void cw_html_walk(xmlDoc *doc, bool (*enter)(void *arg, xmlNode *n), void (*leave)(void *arg, xmlNode *n),
		  bool (*stopped)(void *arg), void *arg);

#endif
