/* The group-commit planner (from tests/unit/data/gc_plan_cases.txt), its
 * properties, the capped buffer, and the abortable connect against a
 * server that takes connections and never answers. */
#include "config.h"
#include "buf.h"
#include "store.h"
#include "unit.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
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

typedef int64_t (*grow_fn)(struct store_backoff *b, int64_t first_us, int64_t most_us, bool jitter);

static int64_t failed_us(struct store_backoff *b, int64_t first_us, int64_t most_us, bool jitter)
{
	(void)first_us, (void)jitter; /* 250 ms, not jittered */
	return store_backoff_failed(b, (long)(most_us / 1000)) * 1000LL;
}

/* The waits of a backoff with its state, one a failure: each delay as
 * want says, the wait 50..100 % of it when jittered (else the delay), the
 * attempt due after it; reset, from the first again. */
static void check_waits(grow_fn grow, int64_t first, int64_t most, bool jitter, const int64_t *want, size_t n)
{
	struct store_backoff b = { 0, 0 };
	for (size_t i = 0; i < n; i++) {
		int64_t before = cw_now_us();
		int64_t wait = grow(&b, first, most, jitter);
		ck_assert_int_eq(b.delay_us, want[i]);
		ck_assert_int_ge(wait, jitter ? want[i] / 2 : want[i]);
		ck_assert_int_le(wait, want[i]);
		ck_assert_int_ge(b.retry_at_us, before + wait);
		ck_assert_int_le(b.retry_at_us, cw_now_us() + wait);
	}
	store_backoff_reset(&b);
	ck_assert_int_eq(b.delay_us, 0);
	ck_assert_int_eq(b.retry_at_us, 0);
	ck_assert_int_le(grow(&b, first, most, jitter), first);
	ck_assert_int_eq(b.delay_us, first);
}

/* A thread's own connection's pace (store_backoff_failed): 250 ms, doubled
 * up to the most, from 250 ms again once reset; most <= 0 is 5 s.  The
 * pool's (store_backoff_grow, jittered): 100 ms doubled up to the most. */
START_TEST(backoff_doubles_to_the_most_and_resets)
{
	static const int64_t own[] = { 250000, 500000, 1000000, 2000000, 3000000, 3000000 };
	check_waits(failed_us, 250000, 3000000, false, own, sizeof(own) / sizeof(own[0]));
	static const int64_t pool[] = { 100000, 200000, 400000, 800000, 1000000, 1000000 };
	check_waits(store_backoff_grow, 100000, 1000000, true, pool, sizeof(pool) / sizeof(pool[0]));
	struct store_backoff b = { 0, 0 };
	for (int i = 0; i < 10; i++)
		store_backoff_failed(&b, 0);
	ck_assert_int_eq(b.delay_us, 5000000);
}
END_TEST

/* The one backoff of the waits that grow (store_backoff_next/_nth): the
 * first wait, then twice the last, never above the most, whatever the
 * input (a most below the first, a last wait past the most or near the
 * top of int64_t); the n-th is the first grown n - 1 times. */
START_TEST(backoff_bounds_and_cap)
{
	ck_assert_int_eq(store_backoff_next(0, 250, 30000), 250);
	ck_assert_int_eq(store_backoff_next(-7, 250, 30000), 250);
	ck_assert_int_eq(store_backoff_next(250, 250, 30000), 500);
	ck_assert_int_eq(store_backoff_next(16000, 250, 30000), 30000);
	ck_assert_int_eq(store_backoff_next(30000, 250, 30000), 30000);
	ck_assert_int_eq(store_backoff_next(90000, 250, 30000), 30000); /* a most made smaller meanwhile */
	ck_assert_int_eq(store_backoff_next(0, 5000, 100), 100);         /* the first above the most */
	ck_assert_int_eq(store_backoff_next(INT64_MAX - 1, 1, INT64_MAX), INT64_MAX); /* no overflow */
	for (int64_t first = 1; first < 5000; first += 333)
		for (int64_t most = 1; most < 90000; most += 4099) {
			int64_t b = 0;
			for (int n = 1; n < 40; n++) {
				int64_t next = store_backoff_next(b, first, most);
				ck_assert_int_eq(store_backoff_nth(n, first, most), next);
				ck_assert_int_le(next, most);
				ck_assert_int_ge(next, first < most ? first : most);
				ck_assert(next == most || next == (b ? b * 2 : first));
				b = next;
			}
			ck_assert_int_eq(b, most);
		}
	ck_assert_int_eq(store_backoff_nth(0, 100, 1000), 100);
	ck_assert_int_eq(store_backoff_nth(-3, 100, 1000), 100);
	ck_assert_int_eq(store_backoff_nth(INT32_MAX, 100, 1000), 1000); /* at once: stops at the most */
}
END_TEST

/* The jitter: 50..100 % of the wait, growing with the random byte; drawn
 * by the helper, within the range and spread over it. */
START_TEST(jitter_range)
{
	int64_t waits[] = { 0, 1, 2, 255, 1000, 100000, 5000000, 3600000000LL };
	for (size_t i = 0; i < sizeof(waits) / sizeof(waits[0]); i++) {
		int64_t d = waits[i], last = -1;
		ck_assert_int_eq(store_jitter(d, 0), d / 2);
		ck_assert_int_le(store_jitter(d, 255), d);
		ck_assert_int_ge(store_jitter(d, 255), d - 1);
		for (unsigned r = 0; r < 256; r++) {
			int64_t j = store_jitter(d, (unsigned char)r);
			ck_assert_int_ge(j, d / 2);
			ck_assert_int_le(j, d);
			ck_assert_int_ge(j, last);
			last = j;
		}
	}
	int64_t lo = INT64_MAX, hi = 0;
	for (int i = 0; i < 2000; i++) {
		int64_t j = store_jittered(1000000);
		ck_assert_int_ge(j, 500000);
		ck_assert_int_le(j, 1000000);
		lo = j < lo ? j : lo;
		hi = j > hi ? j : hi;
	}
	ck_assert_int_lt(lo, 600000); /* 2000 draws of 256: both ends reached */
	ck_assert_int_gt(hi, 900000);
}
END_TEST

struct sleeper {
	atomic_bool stop;
	int64_t until_us, woke_us;
};

static void *sleeper_main(void *arg)
{
	struct sleeper *z = arg;
	store_sleep_until(z->until_us, &z->stop);
	z->woke_us = cw_now_us();
	return NULL;
}

/* A sleep ends at its time, and at once at a stop, wherever the stop
 * falls (until the forty-ninth session the flag was looked at every
 * 100 ms: a stop 10 ms into the sleep waited 90 ms more).  Each place
 * of the stop in a poll's period is tried three times and its fastest
 * counted: a machine loaded to 20 on two cores made one wake 58 ms late
 * (stop 76's first CI), where the old poll is late at every try. */
START_TEST(sleep_ends_at_its_time_and_at_once_at_a_stop)
{
	atomic_bool never = false;
	int64_t t0 = cw_now_us();
	store_sleep_until(t0 + 30000, &never);
	ck_assert_int_ge(cw_now_us() - t0, 30000);
	atomic_bool stopped = true;
	t0 = cw_now_us();
	store_sleep_until(t0 + 10000000, &stopped);
	ck_assert_int_lt(cw_now_us() - t0, 50000);
	int64_t worst = 0;
	for (int i = 0; i < 10; i++) {
		int64_t best = INT64_MAX;
		for (int k = 0; k < 3; k++) {
			struct sleeper z = { .until_us = cw_now_us() + 10000000 };
			atomic_init(&z.stop, false);
			pthread_t t;
			ck_assert_int_eq(pthread_create(&t, NULL, sleeper_main, &z), 0);
			struct timespec ts = { 0, (5 + 10 * i) * 1000000L }; /* 5..95 ms in: all along a poll's period */
			nanosleep(&ts, NULL);
			int64_t stop_us = cw_now_us();
			ck_assert(!store_sleepers_stop(&z.stop));
			ck_assert(store_sleepers_stop(&z.stop)); /* set already */
			pthread_join(t, NULL);
			int64_t took = z.woke_us - stop_us;
			best = took < best ? took : best;
		}
		worst = best > worst ? best : worst;
	}
	ck_assert_msg(worst < 40000, "a stop took %lld us to end a sleep", (long long)worst);
}
END_TEST

/* A sleep on a wake-up pipe: a wake-up ends it at once and is taken, so
 * the next sleep lasts its time (the policy thread's wait while the
 * database was away polled the pipe without reading it: a sync's wake-up
 * left there ended every wait at once, and it connected without a pause
 * until the database was back). */
START_TEST(sleep_fd_is_woken_once)
{
	int p[2];
	ck_assert_int_eq(pipe2(p, O_NONBLOCK | O_CLOEXEC), 0);
	ck_assert_int_eq(write(p[1], "xyz", 3), 3);
	int64_t t0 = cw_now_us();
	ck_assert(store_sleep_fd(p[0], 10000));
	ck_assert_int_lt(cw_now_us() - t0, 1000000);
	t0 = cw_now_us();
	ck_assert(!store_sleep_fd(p[0], 60));
	ck_assert_int_ge(cw_now_us() - t0, 60000);
	char c;
	ck_assert_int_eq(read(p[0], &c, 1), -1); /* nothing left */
	close(p[0]);
	close(p[1]);
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

/* Whether a failed connection's message lasts (the start ends) or is
 * waited for, from libpq 15's own texts (verbose: the SQLSTATE in it). */
START_TEST(connect_failure_lasts_only_when_every_host_answered)
{
	static const struct {
		const char *in;
		bool needs_password, lasting;
		const char *text; /* what msg starts with */
	} cases[] = {
		/* one host, one address refusing for good */
		{ "connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: FATAL:  3D000: database \"nodb\" "
		  "does not exist\nLOCATION:  InitPostgres, postinit.c:941\n",
		  false, true, "connection to server on socket \"/tmp/.s.PGSQL.5432\" failed: FATAL:  database" },
		/* starting up: waited for */
		{ "connection to server at \"db\" (10.0.0.5), port 5432 failed: FATAL:  57P03: the database system "
		  "is starting up\n",
		  false, false, "connection to server at \"db\"" },
		/* one host name, two addresses: ::1 refused over TCP, 127.0.0.1
		 * answered and refused the password: the host answered */
		{ "connection to server at \"localhost\" (::1), port 5432 failed: Connection refused\n\tIs the server "
		  "running on that host and accepting TCP/IP connections?\nconnection to server at \"localhost\" "
		  "(127.0.0.1), port 5432 failed: FATAL:  28P01: password authentication failed for user \"cw\"\n"
		  "LOCATION:  auth_failed, auth.c:326\n",
		  false, true, "connection to server at \"localhost\" (::1)" },
		/* two hosts: the first down, the second refusing for good */
		{ "connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running "
		  "on that host and accepting TCP/IP connections?\nconnection to server at \"127.0.0.1\", port 5432 "
		  "failed: FATAL:  3D000: database \"nodb\" does not exist\n",
		  false, false, "connection to server at \"127.0.0.1\", port 1" },
		/* the same two hosts the other way round: libpq stops at the
		 * one that answered */
		{ "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  3D000: database \"nodb\" does not "
		  "exist\n",
		  false, true, "connection to server at \"127.0.0.1\", port 5432" },
		/* a name not found, then a host refusing for good */
		{ "could not translate host name \"nohost\" to address: Name or service not known\nconnection to "
		  "server at \"127.0.0.1\", port 5432 failed: FATAL:  28000: no pg_hba.conf entry\n",
		  false, false, "could not translate host name" },
		/* a password needed and none given (no SQLSTATE) */
		{ "connection to server at \"127.0.0.1\", port 5432 failed: fe_sendauth: no password supplied\n", true,
		  true, "connection to server at" },
		/* down alone */
		{ "connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n", false, false,
		  "connection to server" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char msg[400];
		bool lasting = store_failure_text(cases[i].in, cases[i].needs_password, msg, sizeof(msg));
		ck_assert_msg(lasting == cases[i].lasting, "case %zu: lasting %d", i, lasting);
		ck_assert_msg(strncmp(msg, cases[i].text, strlen(cases[i].text)) == 0, "case %zu: %s", i, msg);
		ck_assert_msg(!strstr(msg, "LOCATION:") && !strstr(msg, "3D000") && !strstr(msg, "28P01"),
			      "case %zu: %s", i, msg);
	}
	/* a message longer than msg: read whole for its codes, cut to fit */
	char small[16];
	ck_assert(!store_failure_text(cases[3].in, false, small, sizeof(small)));
	ck_assert_uint_eq(strlen(small), sizeof(small) - 1);
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
	tcase_add_test(tc, backoff_bounds_and_cap);
	tcase_add_test(tc, jitter_range);
	tcase_add_test(tc, sleep_ends_at_its_time_and_at_once_at_a_stop);
	tcase_add_test(tc, sleep_fd_is_woken_once);
	tcase_add_test(tc, buf_cap_holds);
	tcase_add_test(tc, abortable_connect_ends_at_the_timeout);
	tcase_add_test(tc, abortable_connect_is_given_up);
	tcase_add_test(tc, connect_failure_lasts_only_when_every_host_answered);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
