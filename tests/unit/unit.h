/* Shared scaffolding of the Check unit tests. */
#ifndef CW_UNIT_H
#define CW_UNIT_H

#include <check.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Path of a file under tests/unit/data in the source tree ($top_srcdir is
 * set by the test harness; the source tree when run by hand). */
static inline const char *unit_data_path(const char *name)
{
	static char path[4096];
	const char *top = getenv("top_srcdir");
	snprintf(path, sizeof(path), "%s/tests/unit/data/%s", top && *top ? top : ".", name);
	return path;
}

/* The canonical text of a JSON value (sorted keys, compact), for
 * whole-document comparison; the caller frees it. */
static inline char *unit_json_canon(const json_t *v)
{
	char *s = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
	ck_assert_ptr_nonnull(s);
	return s;
}

static inline void unit_assert_json_eq(const json_t *got, const json_t *want, const char *what)
{
	char *g = unit_json_canon(got), *w = unit_json_canon(want);
	ck_assert_msg(strcmp(g, w) == 0, "%s:\n  got  %s\n  want %s", what, g, w);
	free(g);
	free(w);
}

/* The UTF-8 bytes of code point cp (below U+110000, not a surrogate) in
 * out; their count. */
static inline size_t unit_utf8_put(unsigned cp, unsigned char out[4])
{
	if (cp < 0x80) {
		out[0] = (unsigned char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (unsigned char)(0xC0 | (cp >> 6));
		out[1] = (unsigned char)(0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (unsigned char)(0xE0 | (cp >> 12));
		out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
		out[2] = (unsigned char)(0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (unsigned char)(0xF0 | (cp >> 18));
	out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
	out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
	out[3] = (unsigned char)(0x80 | (cp & 0x3F));
	return 4;
}

/* Decodes the case files' escapes (event and policy cases): \xNN is the byte NN, \R{N:text} is text
 * repeated N times; "\\" (JSON's escaped backslash) is copied as a pair so
 * that "\\x41" stays JSON text. Everything else is copied. Returns a malloc'd
 * buffer (NUL-terminated, may hold NULs) and its length in *len. */
static inline char *unit_decode(const char *s, size_t *len)
{
	size_t cap = strlen(s) + 1, n = 0;
	char *out = malloc(cap);
	ck_assert_ptr_nonnull(out);
	while (*s) {
		const char *piece = s;
		size_t plen = 1, times = 1;
		char byte;
		if (s[0] == '\\' && s[1] == '\\') {
			plen = 2;
			s += 2;
		} else if (s[0] == '\\' && s[1] == 'x') {
			unsigned v;
			ck_assert_msg(sscanf(s + 2, "%2x", &v) == 1, "bad \\x escape near: %.20s", s);
			byte = (char)v;
			piece = &byte;
			s += 4;
		} else if (s[0] == '\\' && s[1] == 'R' && s[2] == '{') {
			char *colon;
			times = strtoul(s + 3, &colon, 10);
			ck_assert_msg(*colon == ':', "bad \\R escape near: %.20s", s);
			piece = colon + 1;
			const char *end = strchr(piece, '}');
			ck_assert_ptr_nonnull(end);
			plen = (size_t)(end - piece);
			s = end + 1;
		} else {
			s++;
		}
		while (n + plen * times + 1 > cap) {
			cap *= 2;
			out = realloc(out, cap);
			ck_assert_ptr_nonnull(out);
		}
		for (size_t i = 0; i < times; i++, n += plen)
			memcpy(out + n, piece, plen);
	}
	out[n] = '\0';
	*len = n;
	return out;
}

/* Runs one suite and turns its result into the exit status. */
static inline int unit_run(Suite *s)
{
	SRunner *sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

#endif
