/* logfmt formatting and escaping, and the level check. */
#include "config.h"
#include "log.h"
#include "unit.h"

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

int main(void)
{
	Suite *s = suite_create("log");
	TCase *tc = tcase_create("log");
	tcase_add_test(tc, plain_record);
	tcase_add_test(tc, values_are_quoted_and_escaped);
	tcase_add_test(tc, control_characters_are_hex_escaped);
	tcase_add_test(tc, null_value_is_empty);
	tcase_add_test(tc, long_records_are_truncated_but_end_in_newline);
	tcase_add_test(tc, levels_parse_and_filter);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
