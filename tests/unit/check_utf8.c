/* The shared UTF-8 cutting and counting of gateway/utf8.h (Matrix display
 * names, XMPP quotes and fallbacks, causewayctl's columns), by cases and
 * against a reference built from random code points. */
#include "config.h"
#include "utf8.h"
#include "unit.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* "aé€👍": characters of 1, 2, 3 and 4 bytes. */
#define MIXED "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x91\x8D"

START_TEST(count_cases)
{
	ck_assert_uint_eq(cw_utf8_count(""), 0);
	ck_assert_uint_eq(cw_utf8_count("abc"), 3);
	ck_assert_uint_eq(cw_utf8_count(MIXED), 4);
	ck_assert_uint_eq(strlen(MIXED), 10);
}
END_TEST

START_TEST(prefix_cases)
{
	size_t chars = 99;
	ck_assert_uint_eq(cw_utf8_prefix("", 5, &chars), 0);
	ck_assert_uint_eq(chars, 0);
	ck_assert_uint_eq(cw_utf8_prefix("abc", 0, &chars), 0);
	ck_assert_uint_eq(chars, 0);
	ck_assert_uint_eq(cw_utf8_prefix("abc", 2, &chars), 2);
	ck_assert_uint_eq(chars, 2);
	ck_assert_uint_eq(cw_utf8_prefix("abc", 3, &chars), 3);
	ck_assert_uint_eq(chars, 3);
	ck_assert_uint_eq(cw_utf8_prefix("abc", 80, &chars), 3);
	ck_assert_uint_eq(chars, 3);
	/* Whole sequences only. */
	size_t want[] = {0, 1, 3, 6, 10, 10};
	for (size_t max = 0; max < sizeof(want) / sizeof(want[0]); max++) {
		ck_assert_uint_eq(cw_utf8_prefix(MIXED, max, &chars), want[max]);
		ck_assert_uint_eq(chars, max < 4 ? max : 4);
	}
	ck_assert_uint_eq(cw_utf8_prefix(MIXED, 2, NULL), 3);
	/* One character: the length of the first sequence. */
	ck_assert_uint_eq(cw_utf8_prefix(MIXED + 1, 1, NULL), 2);
	ck_assert_uint_eq(cw_utf8_prefix(MIXED + 6, 1, NULL), 4);
}
END_TEST

START_TEST(cut_cases)
{
	/* Byte limits inside each sequence fall back to its start. */
	size_t want[] = {0, 1, 1, 3, 3, 3, 6, 6, 6, 6, 10, 10, 10};
	for (size_t max = 0; max < sizeof(want) / sizeof(want[0]); max++)
		ck_assert_msg(cw_utf8_cut(MIXED, max) == want[max], "max %zu: %zu", max, cw_utf8_cut(MIXED, max));
	ck_assert_uint_eq(cw_utf8_cut("", 0), 0);
	ck_assert_uint_eq(cw_utf8_cut("", 4), 0);
	ck_assert_uint_eq(cw_utf8_cut("abc", 2), 2);
	ck_assert_uint_eq(cw_utf8_cut("abc", SIZE_MAX), 3);
}
END_TEST

/* Checks that scrubbing s gives want and valid UTF-8. */
static void scrubs_to(const char *s, const char *want)
{
	char *got = cw_utf8_scrub(s);
	ck_assert_ptr_nonnull(got);
	ck_assert_str_eq(got, want);
	ck_assert(cw_utf8_valid(got, strlen(got)));
	free(got);
}

#define FFFD "\xEF\xBF\xBD"

START_TEST(scrub_cases)
{
	scrubs_to("", "");
	scrubs_to(MIXED, MIXED); /* valid text is kept as it is */
	/* A character cut in two at the end, as '%.64s' leaves it. */
	scrubs_to("member 'a\xC3'", "member 'a" FFFD "'");
	scrubs_to("\xF0\x9F\x91", FFFD FFFD FFFD);
	/* Bytes no UTF-8 has, overlong forms and surrogates, byte by byte. */
	scrubs_to("a\xFF" "b\x80", "a" FFFD "b" FFFD);
	scrubs_to("\xC0\x80", FFFD FFFD);
	scrubs_to("\xED\xA0\x80x", FFFD FFFD FFFD "x");
	/* A bad byte before a good sequence keeps the sequence. */
	scrubs_to("\xE2\xC3\xA9", FFFD "\xC3\xA9");
	/* The worst case: three bytes out for every byte in. */
	char bad[65], want[3 * 64 + 1] = "";
	memset(bad, 0xFE, 64);
	bad[64] = '\0';
	for (int i = 0; i < 64; i++)
		strcat(want, FFFD);
	scrubs_to(bad, want);
}
END_TEST

/* Deterministic (an LCG), so a failure repeats. */
static unsigned next(uint32_t *state)
{
	*state = *state * 1103515245u + 12345u;
	return *state >> 8;
}

/* Random valid UTF-8 strings: the functions agree with the character
 * boundaries the string was built from. */
/* Bidirectional controls (what reorders the text after it) and what
 * shows nothing: the ends of each range, and their neighbours. */
START_TEST(bidi_and_invisible_cases)
{
	static const struct {
		const char *s;
		bool bidi;
	} cases[] = {
		{ "invoice.pdf\xe2\x80\xaegpj.exe", true }, { "\xe2\x80\xaa", true }, { "\xe2\x81\xa6", true },
		{ "a\xe2\x81\xa9", true }, { "\xe2\x80\xa9", false }, { "\xe2\x80\xaf", false }, { "\xe2\x81\xa5", false },
		{ "\xe2\x81\xaa", false }, { "\xe2\x80\x8f", false }, { "\xd7\xa9\xd7\x9c", false }, { "", false },
		{ "\xe2\x80", false }, /* cut short: no control */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		ck_assert_msg(cw_utf8_has_bidi_control(cases[i].s, strlen(cases[i].s)) == cases[i].bidi, "case %zu", i);
	static const unsigned shows_nothing[] = { 0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x200B, 0x200D, 0x200E,
						  0x200F, 0x202A, 0x202E, 0x2060, 0x2064, 0x2066, 0x2069, 0xFEFF,
						  0x00AD, 0x061C, 0x034F, 0x180E };
	static const unsigned shows[] = { 'a', ' ', 0x00E9, 0x1161, 0x3165, 0x2801, 0x2065, 0x206A, 0x2010, 0x2029,
					  0x202F, 0xFEFE, 0x1F600 };
	for (size_t i = 0; i < sizeof(shows_nothing) / sizeof(shows_nothing[0]); i++)
		ck_assert_msg(cw_utf8_invisible(shows_nothing[i]), "U+%04X", shows_nothing[i]);
	for (size_t i = 0; i < sizeof(shows) / sizeof(shows[0]); i++)
		ck_assert_msg(!cw_utf8_invisible(shows[i]), "U+%04X", shows[i]);
	/* Unicode's Bidi_Control, what logs and causewayctl escape: the
	 * controls above and the marks, no neighbour of either */
	static const unsigned bidi[] = { 0x061C, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E,
					 0x2066, 0x2067, 0x2068, 0x2069 };
	static const unsigned not_bidi[] = { 'a', 0x061B, 0x061D, 0x200D, 0x2010, 0x2029, 0x202F, 0x2065, 0x206A,
					     0xFEFF, 0x0085, 0x05D0 };
	for (size_t i = 0; i < sizeof(bidi) / sizeof(bidi[0]); i++)
		ck_assert_msg(cw_utf8_bidi_format(bidi[i]) && cw_utf8_invisible(bidi[i]), "U+%04X", bidi[i]);
	for (size_t i = 0; i < sizeof(not_bidi) / sizeof(not_bidi[0]); i++)
		ck_assert_msg(!cw_utf8_bidi_format(not_bidi[i]), "U+%04X", not_bidi[i]);
	/* what logs escape and causewayctl defangs: the controls, those,
	 * and the line and paragraph separators; no neighbour of either */
	static const unsigned display_control[] = { 0x00, 0x0A, 0x1B, 0x1F, 0x7F, 0x80, 0x85, 0x9B, 0x9F,
						    0x061C, 0x200E, 0x202E, 0x2069, 0x2028, 0x2029 };
	static const unsigned not_display_control[] = { ' ', 'a', 0x7E, 0xA0, 0xE9, 0x2027, 0x202F, 0x2030,
							0x200D, 0x2065, 0x3000, 0xFEFF };
	for (size_t i = 0; i < sizeof(display_control) / sizeof(display_control[0]); i++)
		ck_assert_msg(cw_utf8_display_control(display_control[i]), "U+%04X", display_control[i]);
	for (size_t i = 0; i < sizeof(not_display_control) / sizeof(not_display_control[0]); i++)
		ck_assert_msg(!cw_utf8_display_control(not_display_control[i]), "U+%04X", not_display_control[i]);
}
END_TEST

/* What separates a command's words: white space of any kind (Unicode's
 * White_Space) and the zero-width characters (cw_utf8_zero_width), which
 * are no white space; cw_utf8_trim leaves them out at both ends (and keeps
 * what is between). */
START_TEST(space_and_trim_cases)
{
	static const unsigned space[] = { '\t', '\n', 0x0B, 0x0C, '\r', ' ', 0x85, 0xA0, 0x1680, 0x2000,
					  0x2007, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000 };
	static const unsigned none[] = { 0, 0x08, 0x0E, 0x1F, 'a', 0x7F, 0x84, 0x86, 0x9F, 0xA1, 0x1681, 0x1FFF,
					 0x200B, 0x200C, 0x2027, 0x202A, 0x202E, 0x2060, 0x2800, 0x3001, 0xFEFF,
					 0xFFA0, 0x3164 };
	for (size_t i = 0; i < sizeof(space) / sizeof(space[0]); i++)
		ck_assert_msg(cw_utf8_space(space[i]) && cw_utf8_blank(space[i]), "U+%04X", space[i]);
	for (size_t i = 0; i < sizeof(none) / sizeof(none[0]); i++)
		ck_assert_msg(!cw_utf8_space(none[i]), "U+%04X", none[i]);
	ck_assert_uint_eq(cw_utf8_space_at("\xc2\xa0x"), 2);
	ck_assert_uint_eq(cw_utf8_space_at("\xe3\x80\x80"), 3);
	ck_assert_uint_eq(cw_utf8_space_at("\tx"), 1);
	ck_assert_uint_eq(cw_utf8_space_at("x "), 0);
	ck_assert_uint_eq(cw_utf8_space_at(""), 0);
	ck_assert_uint_eq(cw_utf8_space_at("\xa0"), 0);     /* a continuation byte alone is none */
	ck_assert_uint_eq(cw_utf8_space_at("\xe3\x80"), 0); /* cut short */
	/* The zero-width characters separate too (none is white space): a
	 * zero-width space pasted between two words, until the forty-third
	 * session part of a word.  Other invisible characters do not. */
	static const unsigned zero[] = { 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF };
	static const unsigned not_zero[] = { 0x200A, 0x200E, 0x2061, 0x00AD, 0x3164, 0xFEFE, 0 };
	for (size_t i = 0; i < sizeof(zero) / sizeof(zero[0]); i++) {
		char buf[] = { (char)(0xE0 | zero[i] >> 12), (char)(0x80 | (zero[i] >> 6 & 0x3F)),
			       (char)(0x80 | (zero[i] & 0x3F)), 'x', '\0' };
		ck_assert_msg(cw_utf8_zero_width(zero[i]) && !cw_utf8_space(zero[i]) && cw_utf8_space_at(buf) == 3,
			      "U+%04X", zero[i]);
	}
	for (size_t i = 0; i < sizeof(not_zero) / sizeof(not_zero[0]); i++)
		ck_assert_msg(!cw_utf8_zero_width(not_zero[i]), "U+%04X", not_zero[i]);
	ck_assert_uint_eq(cw_utf8_space_at("\xe2\x80\x8e"), 0); /* the left-to-right mark */
	ck_assert_uint_eq(cw_utf8_space_at("\xe2\x80"), 0);     /* cut short */
	static const struct {
		const char *in, *out;
	} trims[] = {
		{ "", "" },
		{ " \t\xc2\xa0", "" },
		{ "wally@gk.xmpp.test", "wally@gk.xmpp.test" },
		{ "\xc2\xa0\xe2\x80\x83 wally@gk.xmpp.test\t\xe3\x80\x80\n", "wally@gk.xmpp.test" },
		{ " he\xc2\xa0spams \xc2\xa0", "he\xc2\xa0spams" }, /* within: kept */
		{ "\xc3\xa9\xc2\xa0", "\xc3\xa9" },
		{ "\xe2\x80\x8bx\xe2\x80\x8b", "x" },                          /* zero-width spaces */
		{ "\xef\xbb\xbf\xe2\x81\xa0 x\xe2\x80\x8dy\xe2\x80\x8c\xc2\xa0", "x\xe2\x80\x8dy" }, /* within: kept */
		{ "\xe2\x80\x8ex\xe2\x80\x8f", "\xe2\x80\x8ex\xe2\x80\x8f" }, /* marks: no separators */
		{ "x\xc2", "x\xc2" },                                       /* a cut sequence is no white space */
	};
	for (size_t i = 0; i < sizeof(trims) / sizeof(trims[0]); i++) {
		char buf[64];
		snprintf(buf, sizeof(buf), "%s", trims[i].in);
		cw_utf8_trim(buf);
		ck_assert_msg(strcmp(buf, trims[i].out) == 0, "case %zu: \"%s\"", i, buf);
	}
}
END_TEST

/* A name as shown with its network's mark after it (a Matrix ghost's, an
 * XMPP contact's vCard): what shows nothing left out, blanks one space,
 * none around, at most CW_NAME_SHOWN_MAX characters; not UTF-8 left out. */
START_TEST(name_shown_cases)
{
	static const struct {
		const char *name, *shown;
	} cases[] = {
		{ "Wally Wonka", "Wally Wonka" },
		{ "alice\xe3\x85\xa4\xe3\x85\xa4", "alice" }, /* Hangul fillers */
		{ "Causeway bot\xe2\x81\xa7", "Causeway bot" }, /* an isolate */
		{ "al\xe2\x80\x8bi\xe2\xa0\x80" "ce\xef\xbb\xbf\xe2\x80\xae", "alice" }, /* zero-width, BOM, ... */
		{ "  Wally \xc2\xa0 \xe2\x80\x83Wonka\xe3\x80\x80 ", "Wally Wonka" }, /* blanks of any kind */
		{ "\xe1\x85\x9f\xe1\x85\xa0\xe2\x80\x8d", "" }, /* nothing shows */
		{ "a\xff" "b\xe2\x80", "ab" }, /* not UTF-8 */
		{ "", "" },
	};
	char out[4 * 300 + 1];
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		cw_utf8_name_shown(cases[i].name, out, sizeof(out));
		ck_assert_msg(strcmp(out, cases[i].shown) == 0, "case %zu: %s", i, out);
	}
	char longer[200], want[200];
	memset(longer, 'x', 100);
	longer[100] = '\0';
	memset(want, 'x', CW_NAME_SHOWN_MAX - 1);
	strcpy(want + CW_NAME_SHOWN_MAX - 1, "\xe2\x80\xa6"); /* … */
	cw_utf8_name_shown(longer, out, sizeof(out));
	ck_assert_str_eq(out, want);
	memset(longer, 'x', CW_NAME_SHOWN_MAX);
	longer[CW_NAME_SHOWN_MAX] = '\0';
	cw_utf8_name_shown(longer, out, sizeof(out));
	ck_assert_str_eq(out, longer); /* exactly the cap: whole */
	memcpy(longer + CW_NAME_SHOWN_MAX - 2, " yz", 4); /* cut after a blank: none left before the "…" */
	cw_utf8_name_shown(longer, out, sizeof(out));
	strcpy(want + CW_NAME_SHOWN_MAX - 2, "\xe2\x80\xa6");
	ck_assert_str_eq(out, want);
}
END_TEST

/* Noncharacters: the ends of U+FDD0-U+FDEF and the last two code points
 * of a plane, and their neighbours. */
/* A group's name shown as it is (cw_utf8_name_ok, the peer API's check
 * since the thirty-first session) or not. */
START_TEST(name_ok_cases)
{
	static const struct {
		const char *name;
		bool ok;
	} cases[] = {
		{ "Dinner club", true },
		{ "Family \xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9", true }, /* a ZWJ inside: shows */
		{ "\xD7\xA9\xD7\x9C\xD7\x95\xD7\x9D\xE2\x80\x8F", true },           /* RLM after Hebrew */
		{ " x ", true },
		{ "", false },
		{ "   ", false },
		{ "\xE2\x80\x8B\xE2\xA0\x80", false },                               /* ZWSP, Braille blank */
		{ "Quiz\xE2\x80\xAE" "evil", false },                                     /* U+202E */
		{ "a\xC2\x85" "b", false },                                                 /* C1 NEL */
		{ "a\nb", false },
		{ "a\xE2\x80\xA8" "b", false },                                            /* U+2028 */
		{ "a\xEF\xBF\xBE", false },                                             /* U+FFFE */
		{ "a\xFF" "b", false },                                                     /* not UTF-8 */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		ck_assert_msg(cw_utf8_name_ok(cases[i].name, strlen(cases[i].name)) == cases[i].ok, "case %zu", i);
	ck_assert(!cw_utf8_name_ok("a\0b", 3));
}
END_TEST

START_TEST(noncharacter_cases)
{
	static const struct {
		const char *s;
		bool non;
	} cases[] = {
		{ "Lunch \xef\xbf\xbe club", true }, { "\xef\xbf\xbf", true }, { "\xef\xb7\x90", true },
		{ "\xef\xb7\xaf", true }, { "\xf0\x9f\xbf\xbe", true }, { "\xf4\x8f\xbf\xbf", true },
		{ "\xef\xb7\x8f", false }, { "\xef\xb7\xb0", false }, { "\xef\xbf\xbd", false },
		{ "\xf0\x9f\xbf\xbd", false }, { "Lunch club \xe2\x98\x95", false }, { "", false },
		{ "\xef\xbf", false }, /* cut short: no character */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		ck_assert_msg(cw_utf8_has_noncharacter(cases[i].s, strlen(cases[i].s)) == cases[i].non, "case %zu", i);
}
END_TEST

START_TEST(reference_property)
{
	uint32_t state = 1;
	for (int round = 0; round < 5000; round++) {
		char s[4 * 64 + 1];
		size_t at[64 + 1]; /* at[k]: the byte offset of character k */
		size_t nc = next(&state) % 64, len = 0;
		for (size_t k = 0; k < nc; k++) {
			static const unsigned base[] = {1, 0x80, 0x800, 0x10000};
			static const unsigned span[] = {0x7F, 0x780, 0xF800, 0x100000};
			unsigned w = next(&state) % 4, cp = base[w] + next(&state) % span[w];
			if (cp >= 0xD800 && cp <= 0xDFFF)
				cp = 'q';
			at[k] = len;
			len += unit_utf8_put(cp, (unsigned char *)s + len);
		}
		at[nc] = len;
		s[len] = '\0';
		ck_assert(cw_utf8_valid(s, len));
		ck_assert_uint_eq(cw_utf8_count(s), nc);
		for (size_t max = 0; max <= nc + 2; max++) {
			size_t chars;
			size_t want = max < nc ? at[max] : len;
			ck_assert_uint_eq(cw_utf8_prefix(s, max, &chars), want);
			ck_assert_uint_eq(chars, max < nc ? max : nc);
		}
		for (size_t max = 0; max <= len + 2; max++) {
			size_t want = 0; /* the last boundary at or before max */
			for (size_t k = 0; k <= nc && at[k] <= max; k++)
				want = at[k];
			ck_assert_uint_eq(cw_utf8_cut(s, max), want);
		}
	}
}
END_TEST

/* The console's copy of the list (gateway/console/console.js,
 * DISPLAY_CONTROL: a regular expression's class of \uXXXX and ranges of
 * them), which a browser has to have: the same code points, but the tab
 * and the line feed, which the console keeps (JSON shown in lines). */
START_TEST(console_display_control_is_the_same_list)
{
	char path[4096];
	const char *top = getenv("top_srcdir");
	snprintf(path, sizeof(path), "%s/gateway/console/console.js", top && *top ? top : ".");
	FILE *f = fopen(path, "r");
	ck_assert_msg(f != NULL, "%s", path);
	static char js[1 << 17];
	size_t n = fread(js, 1, sizeof(js) - 1, f);
	fclose(f);
	js[n] = '\0';
	const char *p = strstr(js, "const DISPLAY_CONTROL = /([");
	ck_assert_msg(p != NULL, "no DISPLAY_CONTROL in console.js");
	p += strlen("const DISPLAY_CONTROL = /([");
	static bool in[0x10000];
	memset(in, 0, sizeof(in));
	while (*p != ']') {
		unsigned lo, hi;
		ck_assert_msg(sscanf(p, "\\u%4x", &lo) == 1, "not a \\u escape: %.12s", p);
		p += 6;
		hi = lo;
		if (*p == '-') {
			ck_assert_msg(sscanf(p + 1, "\\u%4x", &hi) == 1, "not a \\u escape: %.12s", p + 1);
			p += 7;
		}
		for (unsigned cp = lo; cp <= hi; cp++)
			in[cp] = true;
	}
	for (unsigned cp = 0; cp < 0x110000; cp++) {
		bool want = cw_utf8_display_control(cp) && cp != '\t' && cp != '\n';
		ck_assert_msg((cp < 0x10000 && in[cp]) == want, "U+%04X: console.js %s it", cp,
			      want ? "lacks" : "adds");
	}
}
END_TEST

/* A report's comment (policy_report_fields_problem): text with line
 * breaks, tabs and right-to-left marks is one; controls, overrides and
 * isolates, noncharacters are none. */
START_TEST(text_problem_cases)
{
	static const char *const ok[] = { "", "spam", "line one\nline two\tend", "\xd7\xa9\xe2\x80\x8f!",
					  "\xc3\xa9\xe2\x80\x8b", "\xef\xbf\xbd" };
	static const char *const bad[] = { "a\x07", "\x1b[31m", "a\rb", "a\x7f", "a\xc2\x9b", "a\xc2\x85",
					   "x\xe2\x80\xaey", "x\xe2\x81\xa6y", "\xef\xbf\xbe",
					   "\xef\xb7\x90", "\xf0\x9f\xbf\xbf" };
	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
		ck_assert_msg(!cw_utf8_text_problem(ok[i], strlen(ok[i])), "ok[%zu]", i);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		ck_assert_msg(cw_utf8_text_problem(bad[i], strlen(bad[i])) != NULL, "bad[%zu]", i);
	/* the NUL a JSON string may hold: a control */
	ck_assert_ptr_nonnull(cw_utf8_text_problem("a\0b", 3));
}
END_TEST

/* What a bot's answer quotes of what a user typed (cw_utf8_echo): every
 * display control and every byte that is not UTF-8 a U+FFFD, at most
 * CW_UTF8_ECHO_MAX characters and the buffer's bytes, a cut one ending
 * with an ellipsis and never inside a character. */
START_TEST(echo_cases)
{
	char out[600];
	cw_utf8_echo("gk", out, sizeof(out));
	ck_assert_str_eq(out, "gk");
	cw_utf8_echo("", out, sizeof(out));
	ck_assert_str_eq(out, "");
	cw_utf8_echo("caf\xC3\xA9 \xE4\xB8\xAD", out, sizeof(out)); /* kept as typed */
	ck_assert_str_eq(out, "caf\xC3\xA9 \xE4\xB8\xAD");
	/* U+202E, U+2066, U+2069, U+200F, C0 (line feed, ESC), DEL, C1 (U+009B), U+2028 */
	cw_utf8_echo("a\xE2\x80\xAE" "b\xE2\x81\xA6" "c\xE2\x81\xA9" "d\xE2\x80\x8F"
		     "e\nf\x1B[2Jg\x7Fh\xC2\x9Bi\xE2\x80\xA8j", out, sizeof(out));
	ck_assert_str_eq(out, "a\xEF\xBF\xBD" "b\xEF\xBF\xBD" "c\xEF\xBF\xBD" "d\xEF\xBF\xBD" "e\xEF\xBF\xBD"
			      "f\xEF\xBF\xBD[2Jg\xEF\xBF\xBD" "h\xEF\xBF\xBD" "i\xEF\xBF\xBD" "j");
	/* bytes that are not UTF-8, one U+FFFD each; a character cut at the end */
	cw_utf8_echo("x\xFFy\xC3", out, sizeof(out));
	ck_assert_str_eq(out, "x\xEF\xBF\xBDy\xEF\xBF\xBD");
	/* at most CW_UTF8_ECHO_MAX characters */
	char longer[CW_UTF8_ECHO_MAX * 2 + 1];
	memset(longer, 'w', sizeof(longer) - 1);
	longer[sizeof(longer) - 1] = '\0';
	cw_utf8_echo(longer, out, sizeof(out));
	ck_assert_uint_eq(strlen(out), CW_UTF8_ECHO_MAX + 3);
	ck_assert_mem_eq(out + CW_UTF8_ECHO_MAX, "\xE2\x80\xA6", 3);
	longer[CW_UTF8_ECHO_MAX] = '\0'; /* exactly the most: no ellipsis */
	cw_utf8_echo(longer, out, sizeof(out));
	ck_assert_str_eq(out, longer);
	/* a small buffer: whole characters, the ellipsis within it */
	char small[9];
	cw_utf8_echo("\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9", small, sizeof(small));
	ck_assert_str_eq(small, "\xC3\xA9\xC3\xA9\xE2\x80\xA6");
	cw_utf8_echo("\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9", small, sizeof(small)); /* 8 bytes: fits */
	ck_assert_str_eq(small, "\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9");
	for (size_t cap = 4; cap <= sizeof(small); cap++) {
		cw_utf8_echo("\xE2\x80\xAE\xE2\x80\xAE\xE2\x80\xAE", small, cap);
		ck_assert_uint_lt(strlen(small), cap);
		ck_assert(cw_utf8_valid(small, strlen(small)));
		ck_assert(!cw_utf8_has_bidi_control(small, strlen(small)));
	}
}
END_TEST

int main(void)
{
	Suite *s = suite_create("utf8");
	TCase *tc = tcase_create("utf8");
	tcase_add_test(tc, count_cases);
	tcase_add_test(tc, prefix_cases);
	tcase_add_test(tc, cut_cases);
	tcase_add_test(tc, scrub_cases);
	tcase_add_test(tc, bidi_and_invisible_cases);
	tcase_add_test(tc, space_and_trim_cases);
	tcase_add_test(tc, name_shown_cases);
	tcase_add_test(tc, name_ok_cases);
	tcase_add_test(tc, noncharacter_cases);
	tcase_add_test(tc, reference_property);
	tcase_add_test(tc, console_display_control_is_the_same_list);
	tcase_add_test(tc, text_problem_cases);
	tcase_add_test(tc, echo_cases);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
