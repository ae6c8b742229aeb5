/* The group-commit planner (from tests/unit/data/gc_plan_cases.txt), its
 * properties, the capped buffer, and the abortable connect against a
 * server that takes connections and never answers. */
#include "config.h"
#include "buf.h"
#include "store.h"
#include "unit.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

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

/* The pause before a write that lost a deadlock runs again: a few
 * milliseconds, growing with each retry, spread by the random byte (two
 * partners that deadlocked do not meet again at once), and never long. */
START_TEST(retry_pause_is_short_jittered_and_grows)
{
	int64_t prev_max = 0;
	for (int retry = 1; retry <= 3; retry++) {
		int64_t lo = store_retry_pause_us(retry, 0), hi = store_retry_pause_us(retry, 255);
		ck_assert_int_ge(lo, 1000);
		ck_assert_int_le(hi, 20000);
		ck_assert_int_ge(hi, lo * 2 - 1); /* half the range is jitter */
		ck_assert_int_ge(lo, prev_max);   /* grows: a retry's shortest is the last one's longest */
		int64_t last = lo;
		for (unsigned r = 0; r < 256; r++) {
			int64_t p = store_retry_pause_us(retry, (unsigned char)r);
			ck_assert_int_ge(p, lo);
			ck_assert_int_le(p, hi);
			ck_assert_int_ge(p, last);
			last = p;
		}
		prev_max = hi;
	}
	/* Out of range: as the nearest retry, never negative nor unbounded. */
	ck_assert_int_eq(store_retry_pause_us(0, 7), store_retry_pause_us(1, 7));
	ck_assert_int_eq(store_retry_pause_us(-5, 7), store_retry_pause_us(1, 7));
	ck_assert_int_le(store_retry_pause_us(1000, 255), 1000000);
}
END_TEST

/* A thread's own connection's pace (store_backoff): 250 ms, doubled up to
 * the most, from 250 ms again once reset; most <= 0 is 5 s. */
START_TEST(backoff_doubles_to_the_most_and_resets)
{
	struct store_backoff b = { 0, 0 };
	long want[] = { 250, 500, 1000, 2000, 3000, 3000 };
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		int64_t before = cw_now_us();
		ck_assert_int_eq(store_backoff_failed(&b, 3000), want[i]);
		ck_assert_int_ge(b.retry_at_us, before + want[i] * 1000LL);
		ck_assert_int_le(b.retry_at_us, cw_now_us() + want[i] * 1000LL);
	}
	store_backoff_reset(&b);
	ck_assert_int_eq(b.retry_at_us, 0);
	ck_assert_int_eq(store_backoff_failed(&b, 3000), 250);
	for (int i = 0; i < 10; i++)
		store_backoff_failed(&b, 0);
	ck_assert_int_eq(b.delay_us, 5000000);
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

/* A listening socket never accepted from: the kernel completes each
 * connection and nothing ever answers (a host that swallows them).  Its
 * URL in url. */
static int swallower(char *url, size_t n)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(fd, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	ck_assert_int_eq(listen(fd, 16), 0);
	socklen_t len = sizeof(a);
	ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	snprintf(url, n, "host=127.0.0.1 port=%d dbname=x user=x sslmode=disable gssencmode=disable connect_timeout=2",
		 ntohs(a.sin_port));
	return fd;
}

struct asked {
	int calls;
	int64_t after_us; /* give up from then on (0: never) */
};

static bool give_up_at(void *arg)
{
	struct asked *a = arg;
	a->calls++;
	return a->after_us && cw_now_us() >= a->after_us;
}

/* No answer: given up at the URL's connect_timeout (2 s), not for ever;
 * a wake that give_up lets pass does not make it spin (asked about every
 * 100 ms from then on, the fd left unread). */
START_TEST(abortable_connect_ends_at_the_timeout)
{
	char url[200];
	int fd = swallower(url, sizeof(url));
	int wake[2];
	ck_assert_int_eq(pipe(wake), 0);
	ck_assert_int_eq(write(wake[1], "x", 1), 1);
	struct asked a = { 0, 0 };
	cw_errmsg e;
	int64_t t0 = cw_now_us();
	PGconn *c = store_connect_abortable(url, 1000, wake[0], give_up_at, &a, &e);
	int64_t took = cw_now_us() - t0;
	ck_assert_ptr_null(c);
	ck_assert_msg(strstr(e.msg, "no answer within 2 s"), "%s", e.msg);
	ck_assert_msg(took >= 1900000 && took < 3500000, "took %lld us", (long long)took);
	ck_assert_msg(a.calls >= 5 && a.calls <= 40, "give_up asked %d times", a.calls);
	close(wake[0]);
	close(wake[1]);
	close(fd);
}
END_TEST

/* give_up ends it at once (asked within 100 ms), and a wake asks it then. */
START_TEST(abortable_connect_is_given_up)
{
	char url[200];
	int fd = swallower(url, sizeof(url));
	struct asked a = { 0, cw_now_us() + 300000 };
	cw_errmsg e;
	int64_t t0 = cw_now_us();
	PGconn *c = store_connect_abortable(url, 1000, -1, give_up_at, &a, &e);
	int64_t took = cw_now_us() - t0;
	ck_assert_ptr_null(c);
	ck_assert_msg(strstr(e.msg, "given up"), "%s", e.msg);
	ck_assert_msg(took >= 300000 && took < 700000, "took %lld us", (long long)took);

	int wake[2];
	ck_assert_int_eq(pipe(wake), 0);
	ck_assert_int_eq(write(wake[1], "x", 1), 1);
	a = (struct asked){ 0, 1 }; /* at the first asking */
	t0 = cw_now_us();
	c = store_connect_abortable(url, 1000, wake[0], give_up_at, &a, &e);
	took = cw_now_us() - t0;
	ck_assert_ptr_null(c);
	ck_assert_msg(strstr(e.msg, "given up"), "%s", e.msg);
	ck_assert_msg(took < 90000, "took %lld us", (long long)took);
	close(wake[0]);
	close(wake[1]);
	close(fd);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("store_plan");
	TCase *tc = tcase_create("plan");
	tcase_add_test(tc, plan_table);
	tcase_add_test(tc, plan_properties);
	tcase_add_test(tc, retry_pause_is_short_jittered_and_grows);
	tcase_add_test(tc, backoff_doubles_to_the_most_and_resets);
	tcase_add_test(tc, buf_cap_holds);
	tcase_add_test(tc, abortable_connect_ends_at_the_timeout);
	tcase_add_test(tc, abortable_connect_is_given_up);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
