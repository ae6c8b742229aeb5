/* Media for peers (docs/interop-api.md "Media"), and peers' files for
 * local users who can only follow a link.  A local user's file that
 * only this provider can fetch (an mxc:// URI of its homeserver, which
 * wants the appservice's token) is offered to a peer under a capability
 * URL of Causeway's, GET /v1/media/{token}, made for that peer alone; the
 * peer fetches it with its usual credentials and signature. */
#ifndef CW_PEER_MEDIA_H
#define CW_PEER_MEDIA_H

#include "app.h"

#include <jansson.h>

/* The event as peer may see it (a new reference): ev itself when it is
 * not a local user's or none of its attachments is a local network's
 * file, otherwise a copy whose attachment URLs are Causeway's media URLs
 * for peer, for this event (its "id") and until
 * server.media_link_lifetime_s from now ({token}?ev=<id>&exp=<unix s>). */
json_t *peer_media_offer(struct cw_app *app, const char *peer, json_t *ev);

/* GET /v1/media/{token}?ev=&exp=: 404 unknown_media for any token not
 * made for the calling peer, past its exp, or whose event is gone,
 * deleted or erased (read on the fetcher before the file is fetched). */
void peer_api_media(struct cw_req *req, void *ctx);

/* A peer's file (url: https://) for a local user whose client can only
 * follow a link (XMPP, XEP-0066): the capability URL
 * {public_url}/media/{token} under which Causeway fetches it and answers
 * it, as XEP-0363's GET URLs work, at most size bytes (the size its
 * attachment declares; negative: none declared, at most
 * server.media_max_bytes), until server.media_link_lifetime_s from now;
 * signed as Causeway only when its host is under by, the domain of the
 * peer that named it (NULL: never; media_fetch_peer); the file must
 * match sha256 (64 lower-case hex digits, its attachment's; NULL: none
 * declared); served only while the message ev (its public id; NULL:
 * none, served until the link's time) is there, not deleted, expired,
 * erased nor edited without the file (since the forty-third session's
 * review); false when it cannot be made (then the url stays as it is). */
bool peer_media_public_url(struct cw_app *app, const char *url, long long size, const char *by,
			   const char *sha256, const char *ev, char *out, size_t len);
/* The event with its https:// attachment URLs turned into such links (a
 * new reference: ev itself when it has none), by the domain of its
 * sender when that is a peer's, for the event's "id". */
json_t *peer_media_public(struct cw_app *app, json_t *ev);
/* GET /media/{token}: the capability is the token (no other credential);
 * 410 once its time has passed; 404 unknown_media once the message it
 * names (ev) is deleted, expired, erased or edited without the file, or
 * its row is gone; 403 media_refused when the source is one
 * media_fetch_peer refuses for a fact of its URL (no retry changes it;
 * logged at warn once an hour per link, since the twenty-seventh session)
 * or its store's last answer holds no file for good (a 3xx without
 * Location, a 2xx other than 200);
 * 503 with Retry-After when its store is away. */
void media_public_get(struct cw_req *req, void *ctx);

#endif
