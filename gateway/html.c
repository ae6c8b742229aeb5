/* libxml2 HTML trees (see html.h). */
#include "config.h"
#include "html.h"

#include <libxml/parserInternals.h>

htmlParserCtxtPtr cw_html_context(const char *buf, size_t n, int options)
{
	htmlParserCtxtPtr ctxt = htmlCreateMemoryParserCtxt(buf, (int)n);
	if (!ctxt)
		return NULL;
	htmlCtxtUseOptions(ctxt, options);
	ctxt->options |= XML_PARSE_HUGE;
	xmlCharEncodingHandlerPtr utf8 = xmlFindCharEncodingHandler("UTF-8");
	if (utf8)
		xmlSwitchToEncoding(ctxt, utf8);
	return ctxt;
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
