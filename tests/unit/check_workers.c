/* The file fetchers' thread pool (gateway/workers.c): a job runs at once on
 * an idle thread or is refused, and stopping waits for the running ones. */
#include "config.h"
#include "workers.h"
#include "unit.h"

#include <pthread.h>
#include <unistd.h>

/* A job that holds its thread until released. */
struct gate {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int started, finished;
	bool open;
};

static void held(void *arg)
{
	struct gate *g = arg;
	pthread_mutex_lock(&g->mu);
	g->started++;
	pthread_cond_broadcast(&g->cv);
	while (!g->open)
		pthread_cond_wait(&g->cv, &g->mu);
	g->finished++;
	pthread_cond_broadcast(&g->cv);
	pthread_mutex_unlock(&g->mu);
}

static void gate_init(struct gate *g)
{
	memset(g, 0, sizeof(*g));
	pthread_mutex_init(&g->mu, NULL);
	pthread_cond_init(&g->cv, NULL);
}

static void wait_count(struct gate *g, int *field, int want)
{
	pthread_mutex_lock(&g->mu);
	while (*field < want)
		pthread_cond_wait(&g->cv, &g->mu);
	pthread_mutex_unlock(&g->mu);
}

static void open_gate(struct gate *g)
{
	pthread_mutex_lock(&g->mu);
	g->open = true;
	pthread_cond_broadcast(&g->cv);
	pthread_mutex_unlock(&g->mu);
}

START_TEST(runs_up_to_n_at_once_then_refuses)
{
	struct cw_workers *w;
	cw_errmsg e;
	ck_assert_int_eq(cw_workers_start(&w, 3, "t", &e), CW_OK);
	struct gate g;
	gate_init(&g);
	for (int i = 0; i < 3; i++)
		ck_assert(cw_workers_run(w, held, &g));
	/* Refused at once while the three are busy, whether or not they
	 * have started yet. */
	ck_assert(!cw_workers_run(w, held, &g));
	wait_count(&g, &g.started, 3);
	ck_assert(!cw_workers_run(w, held, &g));
	struct cw_workers_stats st;
	cw_workers_get_stats(w, &st);
	ck_assert_int_eq(st.threads, 3);
	ck_assert_int_eq(st.busy, 3);
	ck_assert_uint_eq(st.refused, 2);
	open_gate(&g);
	wait_count(&g, &g.finished, 3);
	/* Free again: taken (the counters settle right after each job). */
	for (int tries = 0; tries < 1000; tries++) {
		cw_workers_get_stats(w, &st);
		if (st.busy == 0)
			break;
		usleep(1000);
	}
	ck_assert_int_eq(st.busy, 0);
	ck_assert_uint_eq(st.done, 3);
	ck_assert(cw_workers_run(w, held, &g));
	cw_workers_free(w);
	ck_assert_int_eq(g.finished, 4);
}
END_TEST

static void *opener_main(void *arg)
{
	usleep(50 * 1000);
	open_gate(arg);
	return NULL;
}

START_TEST(stop_waits_for_running_jobs_and_refuses_new_ones)
{
	struct cw_workers *w;
	cw_errmsg e;
	ck_assert_int_eq(cw_workers_start(&w, 2, "t", &e), CW_OK);
	struct gate g;
	gate_init(&g);
	ck_assert(cw_workers_run(w, held, &g));
	wait_count(&g, &g.started, 1);
	pthread_t opener;
	/* The job ends a moment after stop began: stop returns after it. */
	ck_assert_int_eq(pthread_create(&opener, NULL, opener_main, &g), 0);
	cw_workers_stop(w);
	ck_assert_int_eq(g.finished, 1);
	ck_assert(!cw_workers_run(w, held, &g));
	cw_workers_stop(w); /* again: nothing */
	pthread_join(opener, NULL);
	cw_workers_free(w);
	ck_assert(!cw_workers_run(NULL, held, &g));
}
END_TEST

/* What a job's then step found: the pool's busy count, and whether a job
 * handed over right then was taken (its answer's reader asking again). */
struct then_seen {
	struct cw_workers *w;
	struct gate next; /* the job handed over from then */
	int busy;
	bool taken, done;
};

static void nothing(void *arg)
{
	(void)arg;
}

static void answered(void *arg)
{
	struct then_seen *t = arg;
	struct cw_workers_stats st;
	cw_workers_get_stats(t->w, &st);
	bool taken = cw_workers_run(t->w, held, &t->next);
	pthread_mutex_lock(&t->next.mu);
	t->busy = st.busy;
	t->taken = taken;
	t->done = true;
	pthread_cond_broadcast(&t->next.cv);
	pthread_mutex_unlock(&t->next.mu);
}

START_TEST(a_job_is_idle_before_its_then_step)
{
	/* One thread: a job's answer (its then step) is given when the thread
	 * is free again, so that its reader, asking again at once, is not
	 * refused (until the twenty-ninth session the answer was given from
	 * the job itself, and a link followed right after its answer could be
	 * told that too many files were being fetched). */
	struct cw_workers *w;
	cw_errmsg e;
	ck_assert_int_eq(cw_workers_start(&w, 1, "t", &e), CW_OK);
	struct then_seen t = { .w = w };
	gate_init(&t.next);
	ck_assert(cw_workers_run_then(w, nothing, answered, &t));
	pthread_mutex_lock(&t.next.mu);
	while (!t.done)
		pthread_cond_wait(&t.next.cv, &t.next.mu);
	pthread_mutex_unlock(&t.next.mu);
	ck_assert_int_eq(t.busy, 0);
	ck_assert(t.taken);
	/* The job taken meanwhile runs once then has returned, on that thread. */
	wait_count(&t.next, &t.next.started, 1);
	struct cw_workers_stats st;
	cw_workers_get_stats(w, &st);
	ck_assert_int_eq(st.busy, 1);
	ck_assert_uint_eq(st.refused, 0);
	open_gate(&t.next);
	cw_workers_free(w);
	ck_assert_int_eq(t.next.finished, 1);
	/* then may be NULL: cw_workers_run. */
	ck_assert_int_eq(cw_workers_start(&w, 1, "t", &e), CW_OK);
	struct gate g;
	gate_init(&g);
	open_gate(&g);
	ck_assert(cw_workers_run_then(w, held, NULL, &g));
	cw_workers_free(w);
	ck_assert_int_eq(g.finished, 1);
}
END_TEST

START_TEST(no_threads_is_an_error)
{
	struct cw_workers *w = (struct cw_workers *)1;
	cw_errmsg e;
	ck_assert_int_eq(cw_workers_start(&w, 0, "t", &e), CW_EINVAL);
	ck_assert_ptr_null(w);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("workers");
	TCase *tc = tcase_create("workers");
	tcase_add_test(tc, runs_up_to_n_at_once_then_refuses);
	tcase_add_test(tc, stop_waits_for_running_jobs_and_refuses_new_ones);
	tcase_add_test(tc, a_job_is_idle_before_its_then_step);
	tcase_add_test(tc, no_threads_is_an_error);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
