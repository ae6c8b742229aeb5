/* logfmt formatting and escaping, and the level check. */
#include "config.h"
#include "log.h"
#include "utf8.h"
#include "unit.h"

#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

START_TEST(plain_record)
{
	char buf[512];
	const char *kv[] = { "port", "8480", NULL };
	size_t n = cw_log_format(buf, sizeof(buf), 1764300000123LL, CW_LOG_INFO, "ready", NULL, kv);
	ck_assert_str_eq(buf, "ts=2025-11-28T03:20:00.123Z level=info msg=ready port=8480\n");
	ck_assert_uint_eq(n, strlen(buf));
}
END_TEST

START_TEST(values_are_quoted_and_escaped)
{
	char buf[512];
	const char *kv[] = { "path", "/a b", "evil", "x\" level=error msg=\"forged\nts=", "empty", "", NULL };
	cw_log_format(buf, sizeof(buf), 0, CW_LOG_WARN, "two words", "r1", kv);
	ck_assert_str_eq(buf, "ts=1970-01-01T00:00:00.000Z level=warn msg=\"two words\" request_id=r1 "
			      "path=\"/a b\" evil=\"x\\\" level=error msg=\\\"forged\\nts=\" empty=\"\"\n");
	/* One record is one line, whatever the values hold. */
	ck_assert_ptr_eq(strchr(buf, '\n'), buf + strlen(buf) - 1);
}
END_TEST

START_TEST(control_characters_are_hex_escaped)
{
	char buf[512];
	const char *kv[] = { "v", "a\x01" "b\x7f" "c\\d\te", NULL };
	cw_log_format(buf, sizeof(buf), 0, CW_LOG_ERROR, "m", NULL, kv);
	ck_assert_ptr_nonnull(strstr(buf, "v=\"a\\x01b\\x7fc\\\\d\\te\""));
}
END_TEST

START_TEST(null_value_is_empty)
{
	char buf[512];
	const char *kv[] = { "k", NULL, NULL };
	cw_log_format(buf, sizeof(buf), 0, CW_LOG_DEBUG, "m", NULL, kv);
	ck_assert_ptr_nonnull(strstr(buf, "level=debug msg=m k=\"\"\n"));
}
END_TEST

START_TEST(long_records_are_truncated_but_end_in_newline)
{
	char big[3000];
	memset(big, 'x', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	const char *kv[] = { "big", big, NULL };
	char buf[256];
	size_t n = cw_log_format(buf, sizeof(buf), 0, CW_LOG_INFO, "m", NULL, kv);
	ck_assert_uint_lt(n, sizeof(buf));
	ck_assert_int_eq(buf[n - 1], '\n');
	ck_assert_int_eq(buf[n], '\0');
}
END_TEST

/* Whether line (without its newline) is whole logfmt: every quote closed,
 * no escape cut in two.  Until the thirty-first session a record cut at
 * the buffer's end left its last value's quote open (and could split an
 * escape), so a reader took the rest of the file for that value. */
static bool logfmt_whole(const char *line)
{
	bool quoted = false;
	for (const char *p = line; *p && *p != '\n'; p++) {
		if (!quoted) {
			if (*p == '"')
				quoted = true;
			continue;
		}
		if (*p == '"') {
			quoted = false;
		} else if (*p == '\\') {
			p++;
			if (*p == 'x') {
				if (!isxdigit((unsigned char)p[1]) || !isxdigit((unsigned char)p[2]))
					return false;
				p += 2;
			} else if (!*p || !strchr("\"\\nrt", *p)) {
				return false;
			}
		}
	}
	return !quoted;
}

START_TEST(a_cut_record_never_leaves_a_quote_open_or_an_escape_split)
{
	const char *kv[] = { "path", "/a b\"c\\d\ne\x01f", "status", "200", NULL };
	char full[512];
	size_t whole = cw_log_format(full, sizeof(full), 0, CW_LOG_INFO, "request", "r1", kv);
	ck_assert(logfmt_whole(full));
	for (size_t len = 3; len <= whole + 1; len++) {
		char buf[512];
		size_t n = cw_log_format(buf, len, 0, CW_LOG_INFO, "request", "r1", kv);
		ck_assert_uint_lt(n, len);
		ck_assert_int_eq(buf[n - 1], '\n');
		ck_assert_msg(logfmt_whole(buf), "cut at %zu: %s", len, buf);
		/* what is there is a prefix of the whole record's pairs, values perhaps shortened */
		ck_assert_int_eq(strncmp(buf, full, 10 < n - 1 ? 10 : n - 1), 0);
	}
	/* A pair whose key does not fit is left out, not half written. */
	char buf[64];
	const char *kv2[] = { "a", "1", "a_long_key_that_does_not_fit_at_all", "v", NULL };
	cw_log_format(buf, sizeof(buf), 0, CW_LOG_INFO, "m", NULL, kv2);
	ck_assert_str_eq(buf, "ts=1970-01-01T00:00:00.000Z level=info msg=m a=1\n");
}
END_TEST

/* Bytes that are not UTF-8, and C1 controls, are escaped; characters of
 * UTF-8 are written as they are, and a cut record never splits one.
 * Until the forty-fourth session the first were written raw: journalctl
 * shows a record that is not UTF-8 as "[N bytes blob data]". */
START_TEST(bytes_that_are_not_utf8_and_c1_controls_are_hex_escaped)
{
	char buf[512];
	const char *kv[] = { "path", "/x\xff\xfe", "c1", "a\xc2\x9b" "b", "cut", "\xc3", "over", "\xc0\xaf",
			     "ok", "caf\xc3\xa9", "ok2", "\xe2\x82\xac 1", NULL };
	cw_log_format(buf, sizeof(buf), 0, CW_LOG_INFO, "m", NULL, kv);
	ck_assert_str_eq(buf, "ts=1970-01-01T00:00:00.000Z level=info msg=m path=\"/x\\xff\\xfe\" c1=\"a\\xc2\\x9bb\" "
			      "cut=\"\\xc3\" over=\"\\xc0\\xaf\" ok=caf\xc3\xa9 ok2=\"\xe2\x82\xac 1\"\n");
	/* every cut of a record of whole characters is UTF-8 */
	const char *kv2[] = { "a", "\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac", "b", "\xe2\x82\xac \xe2\x82\xac", NULL };
	char full[256];
	size_t whole = cw_log_format(full, sizeof(full), 0, CW_LOG_INFO, "m", NULL, kv2);
	for (size_t len = 3; len <= whole + 1; len++) {
		size_t n = cw_log_format(buf, len, 0, CW_LOG_INFO, "m", NULL, kv2);
		ck_assert_msg(cw_utf8_valid(buf, n), "cut at %zu: %s", len, buf);
		ck_assert(logfmt_whole(buf));
	}
}
END_TEST

/* Bidirectional controls (Unicode's Bidi_Control: embeddings, overrides,
 * isolates, marks) are escaped as the bytes that are not UTF-8 are, each
 * byte \xHH; their neighbours are written as they are.  Until the
 * forty-fourth session's review they were written raw: a U+202E in a
 * request's path turned round what a terminal showed after it.  (Two of
 * the neighbours this test wrote raw, U+202F, a space, and U+200D, a
 * zero-width joiner, are escaped since the forty-eighth session:
 * invisible_characters_and_unicode_spaces_are_hex_escaped.) */
START_TEST(bidirectional_controls_are_hex_escaped)
{
	char buf[512];
	const char *kv[] = { "rlo", "invoice.pdf\xe2\x80\xaegpj.exe", "lre", "\xe2\x80\xaa", "pdi", "\xe2\x81\xa9",
			     "lri", "\xe2\x81\xa6", "lrm", "a\xe2\x80\x8e", "rlm", "\xe2\x80\x8f", "alm", "\xd8\x9c",
			     "near", "\xe2\x81\xa5\xe2\x81\xaa\xd8\x9b", NULL };
	cw_log_format(buf, sizeof(buf), 0, CW_LOG_INFO, "m", NULL, kv);
	ck_assert_str_eq(buf, "ts=1970-01-01T00:00:00.000Z level=info msg=m rlo=\"invoice.pdf\\xe2\\x80\\xaegpj.exe\" "
			      "lre=\"\\xe2\\x80\\xaa\" pdi=\"\\xe2\\x81\\xa9\" lri=\"\\xe2\\x81\\xa6\" "
			      "lrm=\"a\\xe2\\x80\\x8e\" rlm=\"\\xe2\\x80\\x8f\" alm=\"\\xd8\\x9c\" "
			      "near=\xe2\x81\xa5\xe2\x81\xaa\xd8\x9b\n");
	/* the message itself (cw_logf) likewise */
	cw_log_format(buf, sizeof(buf), 0, CW_LOG_INFO, "x\xe2\x80\xaey", NULL, NULL);
	ck_assert_str_eq(buf, "ts=1970-01-01T00:00:00.000Z level=info msg=\"x\\xe2\\x80\\xaey\"\n");
}
END_TEST

/* The line and paragraph separators (U+2028, U+2029) are escaped too: a
 * viewer that honours them (a browser's log view, an editor) shows a line
 * break there, and a path could start a forged record after it.  Until the
 * forty-fifth session they were written raw.  Their neighbours are not. */
START_TEST(line_and_paragraph_separators_are_hex_escaped)
{
	char buf[512];
	const char *kv[] = { "path", "/a\xe2\x80\xa8ts=1970-01-01T00:00:00.000Z level=error msg=forged",
			     "ps", "\xe2\x80\xa9", "near", "\xe2\x80\xa7\xe2\x80\xb0", NULL };
	cw_log_format(buf, sizeof(buf), 0, CW_LOG_INFO, "m", NULL, kv);
	ck_assert_str_eq(buf, "ts=1970-01-01T00:00:00.000Z level=info msg=m "
			      "path=\"/a\\xe2\\x80\\xa8ts=1970-01-01T00:00:00.000Z level=error msg=forged\" "
			      "ps=\"\\xe2\\x80\\xa9\" near=\xe2\x80\xa7\xe2\x80\xb0\n");
}
END_TEST

/* A character that shows nothing (a zero-width space or joiner, U+FEFF, a
 * filler: cw_utf8_invisible) is escaped as the controls are, each byte
 * \xHH: "alice\u200b" written raw looks like alice, another user, and a
 * path with one like the route it is not.  A white space that is not
 * ASCII (U+00A0, U+2003, U+3000...: cw_utf8_space) is escaped too: in a
 * value written without quotes it showed as the space between two fields,
 * and a path "/x<U+3000>admin" looked like a field of its own.  Until the
 * forty-eighth session's review both were written raw. */
START_TEST(invisible_characters_and_unicode_spaces_are_hex_escaped)
{
	char buf[512];
	const char *kv[] = { "user", "alice\xe2\x80\x8b", "bom", "\xef\xbb\xbfx", "zwj", "a\xe2\x80\x8d" "b",
			     "nbsp", "/x\xc2\xa0" "admin", "ideo", "/x\xe3\x80\x80" "admin", "em", "\xe2\x80\x83",
			     "filler", "\xe3\x85\xa4", "near", "\xe2\x80\xa7\xc2\xa1", NULL };
	cw_log_format(buf, sizeof(buf), 0, CW_LOG_INFO, "m", NULL, kv);
	ck_assert_str_eq(buf, "ts=1970-01-01T00:00:00.000Z level=info msg=m user=\"alice\\xe2\\x80\\x8b\" "
			      "bom=\"\\xef\\xbb\\xbfx\" zwj=\"a\\xe2\\x80\\x8db\" nbsp=\"/x\\xc2\\xa0admin\" "
			      "ideo=\"/x\\xe3\\x80\\x80admin\" em=\"\\xe2\\x80\\x83\" filler=\"\\xe3\\x85\\xa4\" "
			      "near=\xe2\x80\xa7\xc2\xa1\n");
}
END_TEST

START_TEST(levels_parse_and_filter)
{
	ck_assert_int_eq(cw_log_level_parse("warn"), CW_LOG_WARN);
	ck_assert_int_eq(cw_log_level_parse("DEBUG"), CW_LOG_DEBUG);
	ck_assert_int_eq(cw_log_level_parse("verbose"), -1);

	int p[2];
	ck_assert_int_eq(pipe(p), 0);
	cw_log_set_fd(p[1]);
	cw_log_set_level(CW_LOG_WARN);
	log_info("not written %d", 1);
	LOG_KV(CW_LOG_DEBUG, "not written either");
	log_warn("written %d", 2);
	cw_log_set_request_id("req-7");
	LOG_KV(CW_LOG_ERROR, "also written", "k", "v");
	cw_log_set_request_id(NULL);
	close(p[1]);
	char out[1024] = { 0 };
	ssize_t n = read(p[0], out, sizeof(out) - 1);
	close(p[0]);
	cw_log_set_fd(2);
	cw_log_set_level(CW_LOG_INFO);
	ck_assert_int_gt(n, 0);
	ck_assert_ptr_null(strstr(out, "not written"));
	ck_assert_ptr_nonnull(strstr(out, "level=warn msg=\"written 2\"\n"));
	ck_assert_ptr_nonnull(strstr(out, "level=error msg=\"also written\" request_id=req-7 k=v\n"));
}
END_TEST


/* ---------------------------------------------------------- rate limits */

/* The records' clock, set by the tests: each read moves it on by step. */
static _Atomic int64_t fake_ms;
static atomic_int fake_step;
static int64_t fake_clock(void) { return atomic_fetch_add(&fake_ms, atomic_load(&fake_step)); }

static FILE *capture;

static void capture_start(int64_t ms)
{
	atomic_store(&fake_ms, ms);
	atomic_store(&fake_step, 0);
	cw_log_set_clock(fake_clock);
	capture = tmpfile();
	ck_assert_ptr_nonnull(capture);
	cw_log_set_fd(fileno(capture));
}

/* What was written since capture_start, NUL-terminated; the caller frees it. */
static char *capture_end(void)
{
	cw_log_set_fd(2);
	cw_log_set_clock(NULL);
	long n = (long)lseek(fileno(capture), 0, SEEK_END);
	ck_assert_int_ge(n, 0);
	char *out = calloc(1, (size_t)n + 1);
	ck_assert_ptr_nonnull(out);
	ck_assert_int_eq(pread(fileno(capture), out, (size_t)n, 0), n);
	fclose(capture);
	return out;
}

static int count(const char *s, const char *what)
{
	int n = 0;
	for (const char *p = s; (p = strstr(p, what)); p += strlen(what))
		n++;
	return n;
}

/* Two sites of their own, as in the code: a limiter each. */
static void flood_site(int i)
{
	char v[16];
	snprintf(v, sizeof(v), "%d", i);
	LOG_KV_LIMITED_N(3, CW_LOG_WARN, "flood", "i", v);
}

static void other_site(void) { LOG_KV_LIMITED_N(1, CW_LOG_INFO, "other", "k", "v"); }

START_TEST(limited_site_writes_n_a_second_and_counts_the_rest)
{
	capture_start(1764300000000LL);
	for (int i = 0; i < 10; i++)
		flood_site(i);
	atomic_store(&fake_ms, 1764300000999LL); /* still the same second */
	flood_site(10);
	atomic_store(&fake_ms, 1764300001000LL);
	flood_site(11);
	flood_site(12);
	char *out = capture_end();
	ck_assert_str_eq(out, "ts=2025-11-28T03:20:00.000Z level=warn msg=flood i=0\n"
			      "ts=2025-11-28T03:20:00.000Z level=warn msg=flood i=1\n"
			      "ts=2025-11-28T03:20:00.000Z level=warn msg=flood i=2\n"
			      /* the next line written says how many were left out */
			      "ts=2025-11-28T03:20:01.000Z level=warn msg=flood i=11 suppressed=8\n"
			      "ts=2025-11-28T03:20:01.000Z level=warn msg=flood i=12\n");
	free(out);
}
END_TEST

START_TEST(flush_writes_a_count_once_its_second_has_passed)
{
	capture_start(1764300010000LL);
	for (int i = 0; i < 5; i++)
		flood_site(i);
	other_site();
	other_site();
	cw_log_limits_flush(); /* the second is not over: more may be left out */
	atomic_store(&fake_ms, 1764300010500LL);
	flood_site(5);
	cw_log_limits_flush();
	char *out = capture_end();
	ck_assert_int_eq(count(out, "suppressed"), 0);
	free(out);

	capture_start(1764300011000LL);
	cw_log_limits_flush(); /* every site's count, on a line of its own, once */
	cw_log_limits_flush();
	flood_site(6);
	out = capture_end();
	ck_assert_ptr_nonnull(strstr(out, "ts=2025-11-28T03:20:11.000Z level=warn msg=flood suppressed=3\n"));
	ck_assert_ptr_nonnull(strstr(out, "ts=2025-11-28T03:20:11.000Z level=info msg=other suppressed=1\n"));
	ck_assert_ptr_nonnull(strstr(out, "level=warn msg=flood i=6\n")); /* counted once: not again */
	ck_assert_int_eq(count(out, "\n"), 3);
	free(out);
}
END_TEST

START_TEST(stop_flush_writes_the_count_of_the_current_second)
{
	capture_start(1764300020000LL);
	for (int i = 0; i < 4; i++)
		flood_site(i);
	cw_log_limits_flush_all();
	char *out = capture_end();
	ck_assert_ptr_nonnull(strstr(out, "level=warn msg=flood suppressed=1\n"));
	free(out);
}
END_TEST

START_TEST(a_level_not_written_is_not_counted)
{
	capture_start(1764300030000LL);
	cw_log_set_level(CW_LOG_WARN);
	for (int i = 0; i < 5; i++)
		other_site();
	cw_log_set_level(CW_LOG_INFO);
	other_site();
	atomic_store(&fake_ms, 1764300031000LL);
	cw_log_limits_flush();
	char *out = capture_end();
	ck_assert_str_eq(out, "ts=2025-11-28T03:20:30.000Z level=info msg=other k=v\n");
	free(out);
}
END_TEST

/* A count taken at the site's level is written even if the level in
 * force has changed since (a reload): those lines happened (a review:
 * they were dropped). */
START_TEST(a_count_taken_is_written_whatever_the_level_now)
{
	capture_start(1764300040000LL);
	for (int i = 0; i < 5; i++)
		other_site();
	cw_log_set_level(CW_LOG_WARN);
	atomic_store(&fake_ms, 1764300041000LL);
	cw_log_limits_flush();
	cw_log_set_level(CW_LOG_INFO);
	char *out = capture_end();
	ck_assert_str_eq(out, "ts=2025-11-28T03:20:40.000Z level=info msg=other k=v\n"
			      "ts=2025-11-28T03:20:41.000Z level=info msg=other suppressed=4\n");
	free(out);
}
END_TEST

/* The log's own thread writes the counts each second: nobody else need
 * turn (the policy thread, which did until a review, may wait on the
 * database for as long as its statements may last). */
START_TEST(the_flusher_writes_counts_by_itself)
{
	capture_start(1764300050000LL);
	for (int i = 0; i < 7; i++)
		flood_site(i);
	cw_log_flusher_start();
	atomic_store(&fake_ms, 1764300051000LL);
	bool seen = false;
	for (int i = 0; i < 300 && !seen; i++) { /* up to 3 s: it wakes each second */
		usleep(10000);
		char buf[4096] = { 0 };
		ssize_t n = pread(fileno(capture), buf, sizeof(buf) - 1, 0);
		seen = n > 0 && strstr(buf, "msg=flood suppressed=4\n") != NULL;
	}
	cw_log_flusher_stop();
	char *out = capture_end();
	ck_assert_msg(seen, "%s", out);
	ck_assert_int_eq(count(out, "suppressed"), 1);
	free(out);
}
END_TEST

#define THREADS 4
#define LINES 2000
#define THREAD_PER_S 5

static void thread_site(void) { LOG_KV_LIMITED_N(THREAD_PER_S, CW_LOG_WARN, "threads", "k", "v"); }

static void *flood_thread(void *arg)
{
	(void)arg;
	for (int i = 0; i < LINES; i++)
		thread_site();
	return NULL;
}

/* The clock moving on as the threads write and flush: every line is
 * written or counted exactly once, and no second has more than its
 * share. */
START_TEST(threads_lose_no_count_and_keep_the_cap)
{
	capture_start(1764300040000LL);
	atomic_store(&fake_step, 3); /* 8000 lines: some 24 seconds */
	pthread_t t[THREADS];
	for (int i = 0; i < THREADS; i++)
		ck_assert_int_eq(pthread_create(&t[i], NULL, flood_thread, NULL), 0);
	for (int i = 0; i < 200; i++)
		cw_log_limits_flush();
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	atomic_store(&fake_step, 0);
	atomic_fetch_add(&fake_ms, 1000);
	cw_log_limits_flush();
	char *out = capture_end();
	long written = 0, told = 0;
	int per_second[64] = { 0 }; /* from 03:20:40 */
	for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
		ck_assert_ptr_nonnull(strstr(line, "msg=threads"));
		const char *s = strstr(line, "suppressed=");
		if (s)
			told += atol(s + strlen("suppressed="));
		if (!strstr(line, "k=v"))
			continue; /* a count alone */
		written++;
		int mm, ss;
		ck_assert_int_eq(sscanf(line, "ts=2025-11-28T03:%d:%d", &mm, &ss), 2);
		int i = (mm - 20) * 60 + ss - 40;
		ck_assert(i >= 0 && i < 64);
		per_second[i]++;
	}
	free(out);
	ck_assert_int_eq(written + told, THREADS * LINES);
	ck_assert_int_le(written, (24 + 2) * THREAD_PER_S);
	ck_assert_int_ge(written, 20 * THREAD_PER_S); /* each second took its share */
	for (int i = 0; i < 64; i++)
		ck_assert_int_le(per_second[i], THREAD_PER_S);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("log");
	TCase *tc = tcase_create("log");
	tcase_add_test(tc, plain_record);
	tcase_add_test(tc, values_are_quoted_and_escaped);
	tcase_add_test(tc, control_characters_are_hex_escaped);
	tcase_add_test(tc, bytes_that_are_not_utf8_and_c1_controls_are_hex_escaped);
	tcase_add_test(tc, bidirectional_controls_are_hex_escaped);
	tcase_add_test(tc, line_and_paragraph_separators_are_hex_escaped);
	tcase_add_test(tc, invisible_characters_and_unicode_spaces_are_hex_escaped);
	tcase_add_test(tc, null_value_is_empty);
	tcase_add_test(tc, long_records_are_truncated_but_end_in_newline);
	tcase_add_test(tc, a_cut_record_never_leaves_a_quote_open_or_an_escape_split);
	tcase_add_test(tc, levels_parse_and_filter);
	tcase_add_test(tc, limited_site_writes_n_a_second_and_counts_the_rest);
	tcase_add_test(tc, flush_writes_a_count_once_its_second_has_passed);
	tcase_add_test(tc, stop_flush_writes_the_count_of_the_current_second);
	tcase_add_test(tc, a_level_not_written_is_not_counted);
	tcase_add_test(tc, a_count_taken_is_written_whatever_the_level_now);
	tcase_add_test(tc, the_flusher_writes_counts_by_itself);
	tcase_add_test(tc, threads_lose_no_count_and_keep_the_cap);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
