/* The XMPP adapter: external components (XEP-0114) of the provider's XMPP
 * server, one per remote network (../shared/spec/adapters.md, docs/xmpp.md).
 *
 * Each component has a thread of its own that holds the stream (libstrophe,
 * its own xmpp_ctx_t and loop) while this daemon process holds the
 * component's PostgreSQL advisory lock: exactly one process serves a
 * component; another takes over when it dies.  Other threads never touch
 * the stream: they hand the thread serialised stanzas through a queue it
 * drains between loop turns.
 *
 * Inbound, a local user's <message/> to a remote user's JID becomes neutral
 * events through the shared pipeline (policy, outbox); presence
 * subscriptions and ad-hoc commands carry the user's consent.  Outbound,
 * the dispatcher hands rows of destination "xmpp" to xa_deliver, which
 * writes them as stanzas from the remote user's JID.  xj.h (JIDs) and xm.h
 * (stanza mapping) are the pure parts. */
#ifndef CW_XMPP_H
#define CW_XMPP_H

#include "app.h"
#include "dispatcher.h"

struct xmpp;

/* Reads xmpp.components, DOMAIN=PEER pairs apart by spaces, commas or
 * tabs: each DOMAIN a JID's domain, each PEER a name a peer can have
 * (peer_name_valid, the rule of POST /admin/v1/peers).  Hands each pair
 * to each when it is not NULL, in order; CW_EINVAL naming the first bad
 * pair, or each's error. */
typedef cw_err (*xa_component_fn)(void *arg, const char *domain, const char *peer, cw_errmsg *e);
cw_err xa_components_parse(const char *list, xa_component_fn each, void *arg, cw_errmsg *e);

/* The [xmpp] options as the adapter takes them, CW_OK when
 * xmpp.components is empty (the adapter off): the list
 * (xa_components_parse) with each domain and peer once, at most 16, none
 * the users' own domain; that domain (xmpp.domain, or server.domain) a
 * JID's domain, copied to local (local_len bytes; NULL: not wanted);
 * xmpp.secret set.  Each pair goes to each (NULL: none).  cfg_load checks
 * the configuration with it, so that --check-config, the start and a
 * reload refuse what xa_new cannot take (until the twenty-fourth session
 * only xa_new did, after the migrations). */
cw_err xa_config_check(const struct cw_config *cfg, char *local, size_t local_len, xa_component_fn each, void *arg,
		       cw_errmsg *e);

/* NULL in *out (and CW_OK) when xmpp.components is empty; CW_EINVAL when
 * the [xmpp] options are invalid. */
cw_err xa_new(struct xmpp **out, struct cw_app *app, cw_errmsg *e);
/* Starts the component threads (early: their sockets get low descriptors). */
void xa_start(struct xmpp *x);
/* Stops and joins the threads (idempotent); then xa_free. */
void xa_stop(struct xmpp *x);
void xa_free(struct xmpp *x);

/* Whether a component's stream is up in this process (ctx: struct xmpp):
 * the dispatcher claims rows for "xmpp" only then. */
bool xa_ready(void *ctx);
/* The members of the claim's trees (dispatcher.h, enum outbox_member)
 * that xa_deliver never reads: the XMPP path reads a row's id, room,
 * sender (peer_media_public) and its stored type and content (xm.c), and
 * never its room_id, accepted_ts or ts (no stanza of xm.c carries the
 * event's time).  check_xmpp's out_without_omitted makes every stanza of
 * its cases with and without them. */
#define XA_CLAIM_OMITS (OUTBOX_ROOM_ID | OUTBOX_ACCEPTED_TS | OUTBOX_TS)
/* The dispatcher's delivery for destination "xmpp" (ctx: struct xmpp). */
cw_err xa_deliver(void *ctx, PGconn *c, const char *destination, struct outbox_row *rows, size_t n,
		    size_t *done, long *code, cw_errmsg *e);

/* {"components": {domain: {"state": ..., "peer": ..., "last_error": ...,
 *  "connected_since_ms": ..., "stanzas_in": n, "stanzas_out": n}}}. */
json_t *xa_health(struct xmpp *x);
/* Whether domain is the users' XMPP domain or one of the components'. */
bool xa_serves_domain(struct xmpp *x, const char *domain);
/* The name of the peer whose users the component of domain stands for
 * (its addresses, name@domain and mimi://domain/u/name, are that peer's
 * users'), or NULL: no component has that domain. */
const char *xa_component_peer(struct xmpp *x, const char *domain);
/* Whether every component's stream is up (readyz reports, does not fail). */
bool xa_all_up(struct xmpp *x);
/* The causeway_xmpp_* families, appended to the metrics text. */
struct cw_buf;
void xa_metrics(struct xmpp *x, struct cw_buf *b);

#endif
