/* The operator's view of the outbox: rows by state and destination (paged
 * by id), and the replay of a dead letter. */
#ifndef CW_OUTBOX_ADMIN_H
#define CW_OUTBOX_ADMIN_H

#include "http.h"

void outbox_admin_list(struct cw_req *req, void *ctx);
void outbox_admin_replay(struct cw_req *req, void *ctx);

#endif
