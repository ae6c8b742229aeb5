/* HTTP counters and histograms, rendered in Prometheus text format 0.0.4. */
#include "config.h"
#include "metrics.h"

#include <stdatomic.h>
#include <stdlib.h>

/* Latency bucket bounds in microseconds (rendered in seconds). */
static const int64_t bucket_us[] = { 500, 1000, 2500, 5000, 10000, 25000, 50000,
				     100000, 250000, 500000, 1000000, 2500000, 5000000 };
#define NBUCKETS CW_ARRAY_LEN(bucket_us)
#define NSTATUS 500 /* 100..599 */

struct route_stats {
	atomic_uint_fast64_t status[NSTATUS];
	atomic_uint_fast64_t bucket[NBUCKETS + 1]; /* the last is +Inf */
	atomic_uint_fast64_t sum_us;
	atomic_uint_fast64_t count;
};

struct cw_metrics {
	const struct cw_route *routes;
	size_t nroutes;
	struct route_stats *stats; /* nroutes + 1: the last is "unmatched" */
};

struct cw_metrics *cw_metrics_new(const struct cw_route *routes, size_t nroutes)
{
	struct cw_metrics *m = calloc(1, sizeof(*m));
	if (!m)
		return NULL;
	m->stats = calloc(nroutes + 1, sizeof(*m->stats));
	if (!m->stats) {
		free(m);
		return NULL;
	}
	m->routes = routes;
	m->nroutes = nroutes;
	return m;
}

void cw_metrics_free(struct cw_metrics *m)
{
	if (!m)
		return;
	free(m->stats);
	free(m);
}

void cw_metrics_http(struct cw_metrics *m, int route, int status, int64_t duration_us)
{
	if (!m)
		return;
	struct route_stats *s = &m->stats[route >= 0 && (size_t)route < m->nroutes ? (size_t)route : m->nroutes];
	if (status >= 100 && status < 600)
		atomic_fetch_add_explicit(&s->status[status - 100], 1, memory_order_relaxed);
	size_t b = 0;
	while (b < NBUCKETS && duration_us > bucket_us[b])
		b++;
	atomic_fetch_add_explicit(&s->bucket[b], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&s->sum_us, (uint_fast64_t)(duration_us > 0 ? duration_us : 0), memory_order_relaxed);
	atomic_fetch_add_explicit(&s->count, 1, memory_order_relaxed);
}

static const char *route_label(const struct cw_metrics *m, size_t i)
{
	if (i == m->nroutes)
		return "unmatched";
	return m->routes[i].name ? m->routes[i].name : m->routes[i].pattern;
}

cw_err cw_metrics_render_http(struct cw_metrics *m, struct cw_buf *out)
{
	cw_buf_printf(out, "# HELP causeway_http_requests_total HTTP requests answered, by route and status.\n"
			   "# TYPE causeway_http_requests_total counter\n");
	for (size_t i = 0; i <= m->nroutes; i++) {
		const char *method = i < m->nroutes ? m->routes[i].method : "";
		for (int s = 0; s < NSTATUS; s++) {
			uint_fast64_t n = atomic_load_explicit(&m->stats[i].status[s], memory_order_relaxed);
			if (n)
				cw_buf_printf(out, "causeway_http_requests_total{route=\"%s\",method=\"%s\",status=\"%d\"} %llu\n",
					      route_label(m, i), method, s + 100, (unsigned long long)n);
		}
	}
	cw_buf_printf(out, "# HELP causeway_http_request_duration_seconds Time from a request's first byte to its answer.\n"
			   "# TYPE causeway_http_request_duration_seconds histogram\n");
	for (size_t i = 0; i <= m->nroutes; i++) {
		struct route_stats *s = &m->stats[i];
		uint_fast64_t count = atomic_load_explicit(&s->count, memory_order_relaxed);
		if (!count)
			continue;
		/* Labelled by method too, as the requests' counter is: routes of
		 * one pattern (GET and POST /admin/v1/rules) made the same series
		 * twice, which Prometheus refuses as a whole scrape (until the
		 * forty-fourth session). */
		const char *method = i < m->nroutes ? m->routes[i].method : "";
		uint_fast64_t cum = 0;
		for (size_t b = 0; b <= NBUCKETS; b++) {
			cum += atomic_load_explicit(&s->bucket[b], memory_order_relaxed);
			if (b < NBUCKETS)
				cw_buf_printf(out, "causeway_http_request_duration_seconds_bucket{route=\"%s\",method=\"%s\","
					      "le=\"%g\"} %llu\n", route_label(m, i), method, (double)bucket_us[b] / 1e6,
					      (unsigned long long)cum);
			else
				cw_buf_printf(out, "causeway_http_request_duration_seconds_bucket{route=\"%s\",method=\"%s\","
					      "le=\"+Inf\"} %llu\n", route_label(m, i), method, (unsigned long long)cum);
		}
		cw_buf_printf(out, "causeway_http_request_duration_seconds_sum{route=\"%s\",method=\"%s\"} %.6f\n",
			      route_label(m, i), method, (double)atomic_load(&s->sum_us) / 1e6);
		cw_buf_printf(out, "causeway_http_request_duration_seconds_count{route=\"%s\",method=\"%s\"} %llu\n",
			      route_label(m, i), method, (unsigned long long)cum);
	}
	return out->overflow ? CW_ENOMEM : CW_OK;
}

cw_err cw_metrics_sample(struct cw_buf *out, const char *name, const char *type,
			 const char *help, const char *labels, double value)
{
	return cw_buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n%s%s%s%s %.17g\n", name, help, name, type,
			     name, labels ? "{" : "", labels ? labels : "", labels ? "}" : "", value);
}
