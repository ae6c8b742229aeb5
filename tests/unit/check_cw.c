/* The small helpers of gateway/cw.h that read text from outside: decimal
 * numbers (query parameters, path ids, stanza attributes, causewayctl's
 * options) and hex; gateway/buf.h's printing of JSON into a buffer; and
 * the PostgreSQL array literals (cw_pg_ids, cw_pg_texts). */
#include "config.h"
#include "buf.h"
#include "cw.h"
#include "unit.h"

#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

START_TEST(decimal_cases)
{
	static const struct {
		const char *s;
		long long lo, hi;
		bool canonical, ok;
		long long v;
	} cases[] = {
		{ "0", 0, 10, false, true, 0 },
		{ "0", 0, 10, true, true, 0 },
		{ "7", 0, 10, true, true, 7 },
		{ "10", 0, 10, true, true, 10 },
		{ "11", 0, 10, false, false, 0 },   /* above hi */
		{ "0", 1, 10, false, false, 0 },    /* below lo */
		{ "007", 0, 10, false, true, 7 },   /* leading zeros: a number */
		{ "007", 0, 10, true, false, 0 },   /* ... but not the gateway's form */
		{ "00", 0, 10, true, false, 0 },
		{ "", 0, 10, false, false, 0 },
		{ "+1", 0, 10, false, false, 0 },   /* strtoll's sign */
		{ "-0", 0, 10, false, false, 0 },
		{ " 1", 0, 10, false, false, 0 },   /* strtoll's white space */
		{ "1 ", 0, 10, false, false, 0 },
		{ "1x", 0, 10, false, false, 0 },
		{ "1e3", 0, 10000, false, false, 0 },
		{ "0x10", 0, 100, false, false, 0 },
		{ "\xd9\xa1", 0, 10, false, false, 0 }, /* ARABIC-INDIC DIGIT ONE */
		{ "999999999999999999", 0, LLONG_MAX, true, true, 999999999999999999LL },
		{ "1000000000000000000", 0, LLONG_MAX, false, false, 0 }, /* 19 digits */
		{ "99999999999999999999", 0, LLONG_MAX, false, false, 0 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		long long v = -42;
		bool ok = cw_decimal(cases[i].s, cases[i].lo, cases[i].hi, cases[i].canonical, &v);
		ck_assert_msg(ok == cases[i].ok, "'%s': %d", cases[i].s, ok);
		ck_assert_msg(v == (cases[i].ok ? cases[i].v : -42), "'%s': %lld (unchanged when refused)", cases[i].s, v);
	}
	long long v = -42;
	ck_assert(!cw_decimal(NULL, 0, 10, false, &v));
	ck_assert_int_eq(v, -42);
}
END_TEST

START_TEST(unhex_cases)
{
	unsigned char b[2];
	ck_assert(cw_unhex("0aFf", b, 2));
	ck_assert_uint_eq(b[0], 0x0a);
	ck_assert_uint_eq(b[1], 0xff);
	/* what sscanf's %x alone takes for a byte */
	ck_assert(!cw_unhex(" f0a", b, 2));
	ck_assert(!cw_unhex("-10a", b, 2));
	ck_assert(!cw_unhex("+f0a", b, 2));
	ck_assert(!cw_unhex("0x0a", b, 2));
	ck_assert(!cw_unhex("0g0a", b, 2));
	ck_assert(!cw_unhex("0a0", b, 2));
	ck_assert(!cw_unhex("0a0a0", b, 2));
	char hex[5];
	cw_hex(hex, b, 2);
	ck_assert_str_eq(hex, "0aff");
}
END_TEST

/* The digest fetched once (cw.c, sha256_md) gives SHA-256's own values,
 * the first call and later ones alike, and cw_sha256_pair hashes "a\nb". */
START_TEST(sha256_cases)
{
	static const char *const abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
	static const char *const empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
	unsigned char md[32], md2[32];
	char hex[65];
	for (int i = 0; i < 3; i++) {
		cw_sha256("abc", 3, md);
		cw_hex(hex, md, 32);
		ck_assert_str_eq(hex, abc);
		cw_sha256("", 0, md);
		cw_hex(hex, md, 32);
		ck_assert_str_eq(hex, empty);
	}
	ck_assert(cw_sha256_pair("room", 4, "{\"a\":1}", 7, md));
	cw_sha256("room\n{\"a\":1}", 12, md2);
	ck_assert_mem_eq(md, md2, 32);
}
END_TEST

/* A value printed into a cw_buf (cw_buf_json, as a push's batch and a
 * pull's answer are made, fifty-third session) is jansson's text of it,
 * after what the buffer held; cw_buf_cut takes an event off again; a cap
 * passed fails the printing, never grows the buffer past it. */
/* cw_random_pooled (the sixtieth session): each draw fresh bytes, across
 * the pool's refills (draws of 24 bytes leave 16 of a kilobyte over, which
 * must not be handed out as part of the next), and a draw larger than the
 * pool whole. */
START_TEST(random_pooled_cases)
{
	enum { DRAWS = 200, SIZE = 24 };
	static unsigned char got[DRAWS][SIZE];
	static const unsigned char zero[SIZE];
	for (int i = 0; i < DRAWS; i++) {
		cw_random_pooled(got[i], SIZE);
		ck_assert_msg(memcmp(got[i], zero, SIZE) != 0, "draw %d is all zero", i);
		for (int j = 0; j < i; j++)
			ck_assert_msg(memcmp(got[i], got[j], SIZE) != 0, "draws %d and %d are the same", j, i);
	}
	static unsigned char big[3000];
	cw_random_pooled(big, sizeof(big));
	size_t zeros = 0;
	for (size_t i = 0; i < sizeof(big); i++)
		zeros += big[i] == 0;
	ck_assert_msg(zeros < 100, "%zu of 3000 bytes zero", zeros);
	char a[40], b[40];
	cw_new_id(a, sizeof(a), "msg_");
	cw_new_id(b, sizeof(b), "msg_");
	ck_assert_str_ne(a, b);
	ck_assert_uint_eq(strlen(a), 4 + 22);
}
END_TEST

START_TEST(buf_json_cases)
{
	json_t *j = json_pack("{s:s, s:f, s:[i, b]}", "body", "h\u00e9 \"x\"/", "r", 0.123456789, "l", 7, 1);
	ck_assert_ptr_nonnull(j);
	char *want = json_dumps(j, JSON_COMPACT);
	struct cw_buf b;
	cw_buf_init(&b, SIZE_MAX);
	ck_assert_int_eq(cw_buf_add(&b, "[", 1), CW_OK);
	ck_assert_int_eq(json_dump_callback(j, cw_buf_json, &b, JSON_COMPACT), 0);
	ck_assert_uint_eq(b.len, 1 + strlen(want));
	ck_assert_str_eq(b.p + 1, want);
	ck_assert_ptr_nonnull(strstr(b.p, "0.123456789"));
	size_t at = b.len;
	ck_assert_int_eq(cw_buf_add(&b, ",", 1), CW_OK);
	ck_assert_int_eq(json_dump_callback(j, cw_buf_json, &b, JSON_COMPACT), 0);
	cw_buf_cut(&b, at);
	ck_assert_uint_eq(b.len, at);
	ck_assert_str_eq(b.p + 1, want);
	cw_buf_cut(&b, b.len + 5); /* never longer */
	ck_assert_uint_eq(b.len, at);
	cw_buf_free(&b);
	cw_buf_init(&b, 8);
	ck_assert_int_eq(json_dump_callback(j, cw_buf_json, &b, JSON_COMPACT), -1);
	ck_assert(b.overflow && b.len <= 8);
	cw_buf_free(&b);
	free(want);
	json_decref(j);
}
END_TEST

/* The ids' literal (cw_pg_ids, the sixty-second session's one builder of
 * the ten that were): none is "{}" (whatever pick says), the extremes
 * fit the size promised with a byte to spare, a pick leaves its others
 * out, an id past those begun for is refused (the end NULL, the builder's
 * own buffer freed: the sanitizer's leak check), a count whose size
 * overflows is refused before any allocation, and a hundred thousand ids
 * read as snprintf prints them. */
START_TEST(pg_ids_cases)
{
	static const int64_t ids[] = { 7, INT64_MIN, 0, INT64_MAX, -1 };
	static const bool pick[] = { false, true, true, false, true }, none[5] = { false };
	static const struct {
		const int64_t *ids;
		size_t n;
		const bool *pick;
		const char *want;
	} cases[] = {
		{ NULL, 0, NULL, "{}" },
		{ ids, 5, NULL, "{7,-9223372036854775808,0,9223372036854775807,-1}" },
		{ ids, 5, pick, "{-9223372036854775808,0,-1}" },
		{ ids, 5, none, "{}" },
		{ ids, 1, NULL, "{7}" },
	};
	char *s;
	for (size_t i = 0; i < CW_ARRAY_LEN(cases); i++) {
		s = cw_pg_ids(cases[i].ids, cases[i].n, cases[i].pick);
		ck_assert_msg(s && strcmp(s, cases[i].want) == 0, "case %zu: %s", i, s ? s : "NULL");
		free(s);
	}

	/* a caller's buffer of exactly CW_PG_IDS_SIZE(n), n of the longest */
	enum { N = 4 };
	char buf[CW_PG_IDS_SIZE(N) + 8];
	memset(buf, 'x', sizeof(buf));
	struct cw_pg_ids a;
	ck_assert(cw_pg_ids_begin(&a, buf, N));
	for (int i = 0; i < N; i++)
		cw_pg_ids_add(&a, INT64_MIN);
	ck_assert_ptr_eq(cw_pg_ids_end(&a), buf);
	ck_assert_uint_eq(strlen(buf) + 1, CW_PG_IDS_SIZE(N) - 1);
	for (size_t i = CW_PG_IDS_SIZE(N); i < sizeof(buf); i++)
		ck_assert_msg(buf[i] == 'x', "byte %zu past the size written", i);
	ck_assert(cw_pg_ids_begin(&a, buf, 0));
	cw_pg_ids_add(&a, 1);
	ck_assert_ptr_null(cw_pg_ids_end(&a));
	ck_assert_msg(buf[0] == '\0', "a refused caller's buffer left as \"%.3s\"", buf);
	ck_assert(cw_pg_ids_begin(&a, NULL, 2));
	cw_pg_ids_add(&a, 1);
	cw_pg_ids_add(&a, 2);
	cw_pg_ids_add(&a, 3);
	ck_assert_ptr_null(cw_pg_ids_end(&a));

	/* more than a size_t can count: refused before malloc (whose own
	 * refusal the sanitizer turns into an abort) */
	ck_assert(!cw_pg_ids_begin(&a, NULL, (SIZE_MAX - 3) / CW_PG_ID_MAX + 1));
	ck_assert_ptr_null(cw_pg_ids(ids, SIZE_MAX / 2, NULL));

	enum { MANY = 100000 };
	int64_t *many = malloc(MANY * sizeof(*many));
	char *want = malloc(CW_PG_IDS_SIZE(MANY));
	ck_assert(many && want);
	size_t len = (size_t)sprintf(want, "{");
	for (int i = 0; i < MANY; i++) {
		many[i] = (int64_t)i * 92233720368547LL * (i % 2 ? -1 : 1);
		len += (size_t)sprintf(want + len, "%s%lld", i ? "," : "", (long long)many[i]);
	}
	sprintf(want + len, "}");
	s = cw_pg_ids(many, MANY, NULL);
	ck_assert_ptr_nonnull(s);
	ck_assert_str_eq(s, want);
	free(s);
	free(want);
	free(many);
}
END_TEST

/* The strings' literal (cw_pg_texts): each element quoted, so that a
 * comma, a brace, white space, an empty string and the word NULL are
 * elements as they are, '"' and '\' escaped; a NULL pointer is SQL's
 * NULL; none is "{}". */
START_TEST(pg_texts_cases)
{
	char *s = cw_pg_texts(NULL, 0);
	ck_assert_str_eq(s, "{}");
	free(s);
	const char *const v[] = { "!room:example.org", "", "NULL", "a,b", "{x}", " sp ", "q\"uo\\te", NULL, "\\\\" };
	s = cw_pg_texts(v, CW_ARRAY_LEN(v));
	ck_assert_str_eq(s, "{\"!room:example.org\",\"\",\"NULL\",\"a,b\",\"{x}\",\" sp \",\"q\\\"uo\\\\te\",NULL,"
			    "\"\\\\\\\\\"}");
	free(s);
	const char *const nul[] = { NULL };
	s = cw_pg_texts(nul, 1);
	ck_assert_str_eq(s, "{NULL}");
	free(s);
	/* the most a text takes: every byte escaped */
	char q[200];
	memset(q, '"', sizeof(q) - 1);
	q[sizeof(q) - 1] = '\0';
	const char *const qs[] = { q, q };
	s = cw_pg_texts(qs, 2);
	ck_assert_uint_eq(strlen(s), 2 + 2 * (2 + 2 * 199) + 1);
	free(s);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("cw");
	TCase *tc = tcase_create("cw");
	tcase_add_test(tc, decimal_cases);
	tcase_add_test(tc, unhex_cases);
	tcase_add_test(tc, sha256_cases);
	tcase_add_test(tc, random_pooled_cases);
	tcase_add_test(tc, buf_json_cases);
	tcase_add_test(tc, pg_ids_cases);
	tcase_add_test(tc, pg_texts_cases);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
