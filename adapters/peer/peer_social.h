/* The neutral API's endpoints about people rather than messages: consent
 * requests and updates (MIMI requestConsent/updateConsent), blocks, abuse
 * reports and identifier discovery.  They store what the peer says; the
 * policy engine gives consent and blocks their effect.  Every answer is the
 * same whether or not the local user exists. */
#ifndef CW_PEER_SOCIAL_H
#define CW_PEER_SOCIAL_H

#include "http.h"

void peer_api_consent_request(struct cw_req *req, void *ctx);
void peer_api_consent_update(struct cw_req *req, void *ctx);
void peer_api_block(struct cw_req *req, void *ctx);
void peer_api_report(struct cw_req *req, void *ctx);
void peer_api_identifier_query(struct cw_req *req, void *ctx);
/* POST /v1/profiles: {user, display_name, avatar} of the peer's user. */
void peer_api_profile(struct cw_req *req, void *ctx);

#endif
