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
/* The URL of the notify endpoint of a peer whose push_url is push_url,
 * as it is requested and, but for a zone id, signed (@target-uri:
 * httpsig_target_uri): httpsig_request_url's normal form (libcurl's URL
 * parser, the scheme and host lower-case, the scheme's default port left
 * out), the path without its trailing slashes and "/v1/notify" (before a
 * query, kept).  CW_EINVAL (e naming push_url) for a URL libcurl does
 * not take as http or https with a host, one with a user or password,
 * or one longer than len. */
cw_err peer_out_notify_url(const char *push_url, char *out, size_t len, cw_errmsg *e);

/* The dispatcher's deliver_fn for "peer:<name>" destinations. */
cw_err peer_out_deliver(void *ctx, PGconn *c, const char *destination, struct outbox_row *rows, size_t n, size_t *done,
			long *code, cw_errmsg *e);

#endif
