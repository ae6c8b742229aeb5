/* Threads for blocking work that is not the database's: see workers.h. */
#include "config.h"
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>

struct job {
	cw_work_fn fn, then;
	void *arg;
};

struct cw_workers {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int n;
	pthread_t *threads;
	int started;
	char name[11];
	/* Jobs handed over and not yet taken: at most n - running, so that a
	 * job is only ever accepted when a thread is free for it. */
	struct job *ring;
	int head, queued, running;
	bool stopping;
	unsigned long long done, refused;
};

static void *worker_main(void *arg)
{
	struct cw_workers *w = arg;
	pthread_mutex_lock(&w->mu);
	int me = ++w->started;
	pthread_mutex_unlock(&w->mu);
	char tn[16]; /* the kernel's limit: 15 bytes and the NUL */
	snprintf(tn, sizeof(tn), "%.10s-%u", w->name, (unsigned)me % 1000u);
	cw_thread_name(tn);
	pthread_mutex_lock(&w->mu);
	for (;;) {
		while (!w->queued && !w->stopping)
			pthread_cond_wait(&w->cv, &w->mu);
		if (!w->queued)
			break; /* stopping, nothing handed over */
		struct job j = w->ring[w->head];
		w->head = (w->head + 1) % w->n;
		w->queued--;
		w->running++;
		pthread_mutex_unlock(&w->mu);
		j.fn(j.arg);
		pthread_mutex_lock(&w->mu);
		w->running--;
		w->done++;
		if (j.then) {
			/* Idle from here on: a job handed over meanwhile is
			 * this thread's (or another's) next. */
			pthread_mutex_unlock(&w->mu);
			j.then(j.arg);
			pthread_mutex_lock(&w->mu);
		}
	}
	pthread_mutex_unlock(&w->mu);
	return NULL;
}

cw_err cw_workers_start(struct cw_workers **out, int n, const char *name, cw_errmsg *e)
{
	*out = NULL;
	if (n < 1)
		return cw_fail(e, CW_EINVAL, "a worker pool needs a thread");
	struct cw_workers *w = calloc(1, sizeof(*w));
	if (!w)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	w->threads = calloc((size_t)n, sizeof(*w->threads));
	w->ring = calloc((size_t)n, sizeof(*w->ring));
	if (!w->threads || !w->ring) {
		free(w->threads);
		free(w->ring);
		free(w);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	snprintf(w->name, sizeof(w->name), "%s", name);
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
	for (int i = 0; i < n; i++) {
		if (!cw_thread_start(&w->threads[i], worker_main, w)) {
			cw_workers_free(w);
			return cw_fail(e, CW_ENOMEM, "cannot start a thread");
		}
		w->n = i + 1;
	}
	*out = w;
	return CW_OK;
}

bool cw_workers_run(struct cw_workers *w, cw_work_fn fn, void *arg)
{
	return cw_workers_run_then(w, fn, NULL, arg);
}

bool cw_workers_run_then(struct cw_workers *w, cw_work_fn fn, cw_work_fn then, void *arg)
{
	if (!w)
		return false;
	pthread_mutex_lock(&w->mu);
	bool ok = !w->stopping && w->running + w->queued < w->n;
	if (ok) {
		w->ring[(w->head + w->queued) % w->n] = (struct job){ fn, then, arg };
		w->queued++;
		pthread_cond_signal(&w->cv);
	} else {
		w->refused++;
	}
	pthread_mutex_unlock(&w->mu);
	return ok;
}

void cw_workers_get_stats(struct cw_workers *w, struct cw_workers_stats *st)
{
	*st = (struct cw_workers_stats){ 0 };
	if (!w)
		return;
	pthread_mutex_lock(&w->mu);
	st->threads = w->n;
	st->busy = w->running + w->queued;
	st->done = w->done;
	st->refused = w->refused;
	pthread_mutex_unlock(&w->mu);
}

void cw_workers_stop(struct cw_workers *w)
{
	if (!w)
		return;
	pthread_mutex_lock(&w->mu);
	bool first = !w->stopping;
	w->stopping = true;
	pthread_cond_broadcast(&w->cv);
	pthread_mutex_unlock(&w->mu);
	if (!first)
		return;
	/* The threads take what was handed over before they see stopping. */
	for (int i = 0; i < w->n; i++)
		pthread_join(w->threads[i], NULL);
}

void cw_workers_free(struct cw_workers *w)
{
	if (!w)
		return;
	cw_workers_stop(w);
	pthread_mutex_destroy(&w->mu);
	pthread_cond_destroy(&w->cv);
	free(w->threads);
	free(w->ring);
	free(w);
}
