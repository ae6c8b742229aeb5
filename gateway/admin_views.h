/* /admin/v1 views for the operator: rooms and their bindings, adapters'
 * health, the configuration in force (secrets masked) and the last hour's
 * statistics; and removing remote members from a group.  Shapes:
 * docs/admin-api.md. */
#ifndef CW_ADMIN_VIEWS_H
#define CW_ADMIN_VIEWS_H

#include "http.h"

/* What the views keep between requests (the statistics of the moment). */
struct admin_views;
struct admin_views *admin_views_new(void);
void admin_views_free(struct admin_views *av);

void admin_views_rooms_list(struct cw_req *req, void *ctx);
void admin_views_room_get(struct cw_req *req, void *ctx);
void admin_views_room_members(struct cw_req *req, void *ctx);
void admin_views_adapters(struct cw_req *req, void *ctx);
void admin_views_config(struct cw_req *req, void *ctx);
void admin_views_stats(struct cw_req *req, void *ctx);

#endif
