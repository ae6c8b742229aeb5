/* The Matrix adapter: an application service (../shared/spec/adapters.md,
 * docs/matrix.md).
 *
 * Inbound, the homeserver pushes transactions to the appservice endpoints;
 * the events of local users in bridged rooms become neutral events through
 * the same pipeline as the neutral API (policy, outbox), deduplicated by
 * their Matrix event id.  Outbound, the dispatcher hands the rows of
 * destination "matrix" to matrix_deliver, which acts as ghost users (one
 * per remote user) in one direct room per (local user, remote user).
 * mx_id.h (identifiers, ghost escaping) and mx_map.h (content mapping) are
 * the pure parts. */
#ifndef CW_MATRIX_H
#define CW_MATRIX_H

#include "app.h"
#include "dispatcher.h"

#include <stdio.h>

struct matrix;

/* NULL in *out (and CW_OK) when matrix.homeserver_url is empty. */
cw_err matrix_new(struct matrix **out, struct cw_app *app, cw_errmsg *e);
void matrix_free(struct matrix *m);
/* The daemon is stopping: transactions parked behind a catch-up
 * (matrix_int.h) are started now, and none is parked any more, so that
 * none holds the drain or stays suspended when the HTTP front stops. */
void matrix_stop_parking(struct matrix *m);
/* Stops the adapter's threads, the bot's, the ping's and the media
 * workers' (matrix_free does too): before the store closes, since what
 * the bot fetches is stored through the store's threads, and before
 * "stopped" is said.  The dispatcher, which queues the workers' files,
 * has stopped before. */
void matrix_stop(struct matrix *m);

/* causewayd --matrix-registration: the registration YAML on out (tokens
 * made up when the configuration has none, with a note to set them). */
int matrix_print_registration(const struct cw_config *cfg, FILE *out);

/* Why the local user uri (of this provider's domain, its local part
 * localpart) can be nobody on Matrix: its Matrix id is in the gateway's
 * own namespace (its bot, its ghosts), where no user of the homeserver
 * is; into why, which is returned.  NULL: it can be someone. */
const char *matrix_local_refused(const struct cw_config *cfg, const char *uri, const char *localpart, char *why,
				 size_t len);

/* The appservice API (the handlers check the hs_token themselves, so that
 * every answer is a Matrix error). */
void matrix_as_transaction(struct cw_req *req, void *ctx);
/* The transaction routes' patterns (NULL-terminated): a homeserver's
 * transaction holds up to 100 events of up to 64 KiB and ephemeral data,
 * so they take bodies up to matrix.max_transaction_bytes. */
extern const char *const matrix_transaction_routes[];
/* Whether a request to those routes may send a body that large: only
 * the homeserver's (its token checked with the headers, before the body
 * is read). ctx: the cw_app. */
bool matrix_large_body_ok(void *ctx, struct cw_req *req);
/* The appservice routes' credentials (CW_AUTH_HOMESERVER): the
 * homeserver's hs_token, as Authorization: Bearer or the legacy
 * access_token parameter (both: both must be it); false after answering
 * 401 M_MISSING_TOKEN, 403 M_FORBIDDEN, or 404 M_UNRECOGNIZED with the
 * adapter off.  Checked from the headers, before the body is read, and
 * again after it: until the forty-ninth session the handlers checked it,
 * after anyone's body had been read (up to server.max_body_bytes). */
bool matrix_hs_authorized(struct cw_req *req, struct cw_app *app);
void matrix_as_user(struct cw_req *req, void *ctx);
void matrix_as_room_alias(struct cw_req *req, void *ctx);
void matrix_as_ping(struct cw_req *req, void *ctx);
/* 404/405 M_UNRECOGNIZED for unknown paths under /_matrix/ (and the legacy
 * appservice paths). */
bool matrix_unmatched(struct cw_req *req, bool method_mismatch, void *ctx);

/* The dispatcher's delivery for destination "matrix" (ctx: struct matrix). */
cw_err matrix_deliver(void *ctx, PGconn *c, const char *destination, struct outbox_row *rows, size_t n,
		      size_t *done, long *code, cw_errmsg *e);

/* Whether the Matrix rows are to be claimed now (the dispatcher's
 * local_ready): false while the homeserver refuses the as_token (401
 * M_UNKNOWN_TOKEN, M_MISSING_TOKEN): they wait, untried and not counted
 * against the retry budget, until it takes it again. */
bool matrix_ready(void *ctx);

/* Pings the homeserver (POST /_matrix/client/v1/appservice/{id}/ping) in the
 * background; the outcome is in matrix_health. */
void matrix_ping_start(struct matrix *m);
/* The adapter's metrics (Prometheus text): the start-up ping's state,
 * transactions and their events by outcome. */
struct cw_buf;
void matrix_metrics(struct matrix *m, struct cw_buf *b);
/* {"homeserver": ..., "ping": "ok"|"failed"|"pending"|"unsupported",
 * "last_error": ..., "delivery": "up"|"token_refused", and while the
 * token is refused "token_refused_since_ms"}. */
json_t *matrix_health(struct matrix *m);
/* The media source of this provider's users (app->media, media.h):
 * mxc:// URIs of the homeserver, fetched with the appservice's token. */
bool matrix_media_owns(void *ctx, const char *url);
cw_err matrix_media_fetch(void *ctx, const char *url, struct media_blob *b, long *status, cw_errmsg *e);
/* The adapter's statements, prepared on every store connection. */
extern const struct store_stmt matrix_statements[];

#endif
