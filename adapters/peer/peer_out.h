/* Outbound to peers: ordered batches of events pushed to
 * POST {push_url}/v1/notify, signed like every peer request (RFC 9421). */
#ifndef CW_PEER_OUT_H
#define CW_PEER_OUT_H

#include "dispatcher.h"
#include <openssl/evp.h>

struct peer_out;
struct cw_app;

/* key: Causeway's signing key (borrowed); keyid: our domain; app: for
 * server.ca_file and the media offered to peers (peer_media.h). */
struct peer_out *peer_out_new(struct cw_app *app, EVP_PKEY *key, const char *keyid, const char *tag,
			      long timeout_ms);
void peer_out_free(struct peer_out *p);
/* The dispatcher's deliver_fn for "peer:<name>" destinations. */
cw_err peer_out_deliver(void *ctx, PGconn *c, const char *destination, struct outbox_row *rows, size_t n, size_t *done,
			long *code, cw_errmsg *e);

#endif
