/* The daemon's context (passed to every handler; no globals) and the
 * gateway's own routes: health, readiness and metrics. */
#ifndef CW_APP_H
#define CW_APP_H

#include "conf.h"
#include "http.h"
#include "migrate.h"
#include "store.h"

struct cw_app {
	struct cw_config *cfg;
	struct cw_store *store;
	struct cw_http *http;
	struct migration_set migrations;
	int64_t started_wall_ms;
};

/* The route table of the daemon. */
extern const struct cw_route app_routes[];
extern const size_t app_nroutes;

#endif
