/* A fixed set of threads for blocking work that is not the database's:
 * fetching a file from a peer's store or the homeserver (for a peer, for a
 * link in an XMPP message, for a vCard's photo), which can take as long as
 * its timeout and must not hold a store reader meanwhile.
 *
 * A job runs at once on an idle thread or is refused; nothing is queued.
 * A caller that is refused answers "busy, try again" (503 with Retry-After,
 * a stanza's resource-constraint), which is what a queue of waiting
 * downloads would come to anyway, without memory held for them. */
#ifndef CW_WORKERS_H
#define CW_WORKERS_H

#include "cw.h"

struct cw_workers;
typedef void (*cw_work_fn)(void *arg);

/* Starts n threads named name-1 .. name-n (name at most 10 characters). */
cw_err cw_workers_start(struct cw_workers **out, int n, const char *name, cw_errmsg *e);
/* Runs fn(arg) on an idle thread: true; false when all are busy, when w is
 * stopping, or w is NULL (fn is not called then: the caller keeps arg). */
bool cw_workers_run(struct cw_workers *w, cw_work_fn fn, void *arg);
/* cw_workers_run, and then(arg) on the same thread once fn has returned
 * and the thread counts as idle again (then may be NULL).  For a job that
 * answers someone: its answer goes in then, so that whoever got it and
 * asks again at once finds the thread free, not "busy" (since the
 * twenty-ninth session; before, a link followed right after its answer
 * could be refused by a fetcher still finishing that answer).  A job
 * accepted while then runs waits for it to return (then must be short). */
bool cw_workers_run_then(struct cw_workers *w, cw_work_fn fn, cw_work_fn then, void *arg);
struct cw_workers_stats {
	int threads, busy;
	unsigned long long done, refused;
};
void cw_workers_get_stats(struct cw_workers *w, struct cw_workers_stats *st);
/* Refuses new jobs, waits for the running ones and joins the threads.
 * Idempotent; w may be NULL. */
void cw_workers_stop(struct cw_workers *w);
/* cw_workers_stop, then frees w. */
void cw_workers_free(struct cw_workers *w);

#endif
