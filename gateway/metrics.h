/* Metrics in Prometheus text format: HTTP requests by route and status,
 * latency histograms by route, plus whatever the caller appends (database
 * pool, outbox depth, build info). Counters are lock-free atomics. */
#ifndef CW_METRICS_H
#define CW_METRICS_H

#include "buf.h"
#include "http.h"

struct cw_metrics;

/* Keeps a pointer to routes (which must outlive the metrics). */
struct cw_metrics *cw_metrics_new(const struct cw_route *routes, size_t nroutes);
void cw_metrics_free(struct cw_metrics *m);

/* route: index into the table, or -1 for requests that matched none. */
void cw_metrics_http(struct cw_metrics *m, int route, int status, int64_t duration_us);

/* Appends the HTTP families to out. */
cw_err cw_metrics_render_http(struct cw_metrics *m, struct cw_buf *out);

/* Appends "# HELP/# TYPE" and one sample of a gauge or counter. */
cw_err cw_metrics_sample(struct cw_buf *out, const char *name, const char *type,
			 const char *help, const char *labels, double value);

#endif
