/* gateway/html.h's text of an HTML tree (cw_html_text), the one both
 * adapters give a message whose only text is HTML: the mapping cases of
 * each adapter (tests/unit/data/xmpp_out.txt "html", matrix_map.txt "only
 * HTML", "an empty body") check it through them; these check what the
 * adapters choose: the elements left out, the cap. */
#include "config.h"
#include "html.h"
#include "unit.h"

#include <libxml/HTMLparser.h>
#include <string.h>

static xmlDoc *parse(const char *html)
{
	htmlParserCtxtPtr ctxt = cw_html_context(html, strlen(html), HTML_PARSE_NOERROR | HTML_PARSE_NOWARNING |
									      HTML_PARSE_NONET | HTML_PARSE_NODEFDTD);
	ck_assert_ptr_nonnull(ctxt);
	cw_html_parse(ctxt);
	xmlDoc *doc = ctxt->myDoc;
	ctxt->myDoc = NULL;
	htmlFreeParserCtxt(ctxt);
	ck_assert_ptr_nonnull(doc);
	return doc;
}

/* The text of html, skip and max as given. */
static char *text_of(const char *html, const char *const *skip, size_t max)
{
	xmlDoc *doc = parse(html);
	char *t = cw_html_text(doc, skip, max);
	xmlFreeDoc(doc);
	ck_assert_ptr_nonnull(t);
	return t;
}

static void expect(const char *html, const char *const *skip, size_t max, const char *want)
{
	char *t = text_of(html, skip, max);
	ck_assert_msg(strcmp(t, want) == 0, "%s:\n  got  [%s]\n  want [%s]", html, t, want);
	free(t);
}

#define BIG (1024 * 1024)

START_TEST(reader_text)
{
	/* links with their targets, lists with their markers */
	expect("<p>see <a href='https://x.example/a'>the site</a></p><ul><li>a</li><li>b<ol start='7'><li>c</li>"
	       "</ol></li></ul>after",
	       NULL, BIG, "see the site (https://x.example/a)\n\n\xE2\x80\xA2 a\n\xE2\x80\xA2 b\n  7. c\n\nafter");
	/* a link whose text is its target says it once; another scheme's
	 * target is not shown */
	expect("<a href='mailto:a@x.example'>a@x.example</a> <a href='javascript:x()'>run</a>", NULL, BIG,
	       "a@x.example run");
	/* white space collapsed, trimmed at both ends; pre kept */
	expect("  <p> a \n\t b </p><pre> x\n  y</pre>  ", NULL, BIG, "a b\n\n x\n  y");
	/* nothing shows: "" (not NULL) */
	expect("<script>x()</script><!-- c -->", NULL, BIG, "");
}
END_TEST

START_TEST(stray_end_tags)
{
	/* a stray </br> is a line break, as the HTML Standard reads it, and so
	 * is a stray </p> (libxml2 dropped both: "onetwo"); other stray end
	 * tags are dropped, their words kept in order */
	expect("<div>one</br>two</p>three</div>", NULL, BIG, "one\ntwo\nthree");
	expect("<ul><li>a</br>b</li></ul>", NULL, BIG, "\xE2\x80\xA2 a\nb");
	expect("a</b>b</div>c<b><i>x</b></i>y", NULL, BIG, "abcxy");
}
END_TEST

START_TEST(skip_leaves_out_the_callers_elements)
{
	static const char *const reply[] = { "mx-reply", NULL };
	const char *html = "<mx-reply><blockquote>earlier</blockquote></mx-reply><b>yes</b>";
	expect(html, NULL, BIG, "earlier\n\nyes");
	expect(html, reply, BIG, "yes");
	/* the adapter's list comes on top of the one of no text */
	expect("<title>t</title><mx-reply>r</mx-reply>x<style>s</style>", reply, BIG, "x");
}
END_TEST

START_TEST(max_keeps_what_fits)
{
	/* the text is at most max bytes: what does not fit is left off, never
	 * cut inside a word (or a character) */
	expect("<p>abc d\xC3\xA9" "f ghi</p>", NULL, 8, "abc d\xC3\xA9" "f");
	expect("<p>abc d\xC3\xA9" "f ghi</p>", NULL, 7, "abc");
	expect("<p>abc</p>", NULL, 3, "abc");
	expect("<p>abc</p>", NULL, 2, "");
}
END_TEST

START_TEST(elements_marked_are_unmarked)
{
	/* The walk keeps its marks in _private: none is left for the next
	 * walk of the same tree (the sanitiser's, say), and a second text is
	 * the first. */
	xmlDoc *doc = parse("<ol start='3'><li>a</li></ol><table><tr><td>1</td><td>2</td></tr></table>"
			    "<a href='https://x.example/'>x</a>");
	char *a = cw_html_text(doc, NULL, BIG), *b = cw_html_text(doc, NULL, BIG);
	ck_assert_ptr_nonnull(a);
	ck_assert_ptr_nonnull(b);
	ck_assert_str_eq(a, "3. a\n\n1 | 2\n\nx (https://x.example/)");
	ck_assert_str_eq(a, b);
	free(a);
	free(b);
	xmlFreeDoc(doc);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("html");
	TCase *tc = tcase_create("html");
	tcase_add_test(tc, reader_text);
	tcase_add_test(tc, stray_end_tags);
	tcase_add_test(tc, skip_leaves_out_the_callers_elements);
	tcase_add_test(tc, max_keeps_what_fits);
	tcase_add_test(tc, elements_marked_are_unmarked);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
