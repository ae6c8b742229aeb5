/* Media for peers (docs/interop-api.md "Media"): a local user's file that
 * only this provider can fetch (an mxc:// URI of its homeserver, which
 * wants the appservice's token) is offered to a peer under a capability
 * URL of Causeway's, GET /v1/media/{token}, made for that peer alone; the
 * peer fetches it with its usual credentials and signature. */
#ifndef CW_PEER_MEDIA_H
#define CW_PEER_MEDIA_H

#include "app.h"

#include <jansson.h>

/* The event as peer may see it (a new reference): ev itself when none of
 * its attachments is a local file, otherwise a copy whose attachment URLs
 * are Causeway's media URLs for peer. */
json_t *peer_media_offer(struct cw_app *app, const char *peer, json_t *ev);

/* GET /v1/media/{token}. */
void peer_api_media(struct cw_req *req, void *ctx);

#endif
