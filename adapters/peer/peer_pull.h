/* GET /v1/events?after=CURSOR&wait=SECONDS&limit=N: delivery by pulling,
 * for peers in pull mode.  The cursor is a position in what was handed out
 * to the peer (not an outbox id: a row with a lower id may commit after a
 * higher one was pulled): asking with it acknowledges what was handed out
 * up to it (those rows become delivered) and returns what follows: rows
 * handed out after it and not acknowledged, then rows not handed out yet,
 * whatever their id, in id order.  With nothing to return, the request
 * waits (long-poll) up to `wait` seconds for new events; waiting requests
 * are held, suspended, by one poller thread that LISTENs for new outbox
 * rows, so they cost no pool thread and no pool connection.
 * The same thread keeps the peer registry of this process in step with the
 * peers table, which other daemon processes may change. */
#ifndef CW_PEER_PULL_H
#define CW_PEER_PULL_H

#include "cw.h"
#include "http.h"

struct cw_app;

struct peer_pull;

struct peer_registry;

/* registry: reloaded by the poller thread when another process (or this
 * one) changes the peers table (NOTIFY causeway_peers), and every 30 s. */
cw_err peer_pull_start(struct peer_pull **out, struct cw_app *app, const char *db_url, long statement_timeout_ms,
		       struct peer_registry *registry, cw_errmsg *e);
/* Answers every waiting request (with what is there), then stops; later
 * requests are answered 503.  Idempotent. */
void peer_pull_stop(struct peer_pull *p);
/* Stops and frees (after the HTTP front has stopped). */
void peer_pull_free(struct peer_pull *p);
void peer_api_events(struct cw_req *req, void *ctx);

#endif
