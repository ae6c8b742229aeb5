/* The group-commit planner (from tests/unit/data/gc_plan_cases.txt), its
 * properties, and the capped buffer. */
#include "config.h"
#include "buf.h"
#include "store.h"
#include "unit.h"

START_TEST(plan_table)
{
	FILE *f = fopen(unit_data_path("gc_plan_cases.txt"), "r");
	ck_assert_ptr_nonnull(f);
	char line[256];
	int cases = 0;
	while (fgets(line, sizeof(line), f)) {
		if (line[0] == '#' || line[0] == '\n')
			continue;
		long long queued, age, max, delay, take, wait;
		ck_assert_int_eq(sscanf(line, "%lld %lld %lld %lld -> %lld %lld", &queued, &age, &max, &delay,
					&take, &wait), 6);
		int64_t got_wait;
		size_t got = gc_plan((size_t)queued, age, (size_t)max, delay, &got_wait);
		ck_assert_msg((long long)got == take && got_wait == wait, "%s: got take %zu wait %lld", line, got,
			      (long long)got_wait);
		cases++;
	}
	fclose(f);
	ck_assert_int_ge(cases, 15);
}
END_TEST

/* Over a grid of inputs: never more than the cap nor than what is queued;
 * never waits with a full batch; never waits past the delay. */
START_TEST(plan_properties)
{
	for (size_t queued = 0; queued < 40; queued++)
		for (int64_t age = 0; age < 3000; age += 97)
			for (size_t max = 1; max < 35; max += 3)
				for (int64_t delay = 0; delay < 2500; delay += 311) {
					int64_t wait;
					size_t take = gc_plan(queued, age, max, delay, &wait);
					ck_assert_uint_le(take, queued);
					ck_assert_uint_le(take, max);
					if (queued >= max)
						ck_assert_uint_eq(take, max);
					if (queued > 0 && age >= delay)
						ck_assert_uint_gt(take, 0);
					if (take == 0 && queued > 0)
						ck_assert(wait > 0 && wait <= delay && age + wait == delay);
					if (take > 0 || queued == 0)
						ck_assert_int_eq(wait, -1);
				}
}
END_TEST

START_TEST(buf_cap_holds)
{
	struct cw_buf b;
	cw_buf_init(&b, 10);
	ck_assert_int_eq(cw_buf_add(&b, "hello", 5), CW_OK);
	ck_assert_int_eq(cw_buf_printf(&b, "%d", 1234), CW_OK);
	ck_assert_str_eq(b.p, "hello1234");
	ck_assert_int_eq(cw_buf_add(&b, "xy", 2), CW_EINVAL);
	ck_assert(b.overflow);
	/* Once overflowed, even what would fit is refused. */
	ck_assert_int_eq(cw_buf_add(&b, "", 0), CW_EINVAL);
	ck_assert_str_eq(b.p, "hello1234");
	cw_buf_free(&b);

	cw_buf_init(&b, 1 << 20);
	for (int i = 0; i < 10000; i++)
		ck_assert_int_eq(cw_buf_printf(&b, "%05d\n", i), CW_OK);
	size_t len;
	char *p = cw_buf_take(&b, &len);
	ck_assert_uint_eq(len, 60000);
	ck_assert(strncmp(p + 59994, "09999\n", 6) == 0);
	ck_assert_ptr_null(b.p);
	free(p);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("store_plan");
	TCase *tc = tcase_create("plan");
	tcase_add_test(tc, plan_table);
	tcase_add_test(tc, plan_properties);
	tcase_add_test(tc, buf_cap_holds);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
