/* The neutral interop API (spec/interop-api.md): the directory, request
 * signatures of peers, rooms and messages. */
#ifndef CW_PEER_API_H
#define CW_PEER_API_H

#include "app.h"
#include "event.h"
#include "peers.h"

/* The signature tag and covered components of this profile. */
#define PEER_SIG_COMPONENTS_WITH_BODY \
	{ "@method", "@target-uri", "content-digest", "content-type", NULL }

/* Checks the request signature of an authenticated peer (RFC 9421): false
 * after answering 401 bad_signature. */
bool peer_verify_request(struct cw_app *app, struct cw_req *req, struct peer_principal *p);
/* The header lines of a peer request, before its body is read: false
 * after answering 400 invalid_header when Content-Type or
 * Idempotency-Key comes more than once or a name is not a token (what
 * libmicrohttpd 0.9.75 makes of most folded lines). */
bool peer_headers_ok(struct cw_req *req);

/* False after answering 503 while server.domain is not set (the interop
 * API needs to know which users are local). */
bool peer_api_enabled(struct cw_app *app, struct cw_req *req);

/* Where peers reach this daemon: server.public_url (without its trailing
 * slashes), else http://listen_address:port (cw_http_local_url); false
 * when not known yet (port 0 and the HTTP front not started), or when it
 * does not fit in len bytes (CFG_PUBLIC_URL_MAX + 1 always does). */
bool peer_base_url(struct cw_app *app, char *out, size_t len);
/* The absolute URI a request's signature covers as @target-uri:
 * peer_base_url and the request's target as sent (path and query); false
 * when it does not fit in len bytes (buf then holds a part only). */
bool peer_target_uri(struct cw_app *app, struct cw_req *req, char *buf, size_t len);

/* The identity row (its id, as text, into out) of a user URI, made on
 * first contact with its network ("local", "peer:<name>") and peer id
 * (NULL for a local user). */
/* A user URI of this provider's domain as its local network names the
 * user: on XMPP, whose localparts are case-insensitive (RFC 7622: the
 * server folds them), a peer's "mimi://<domain>/u/Alice" is alice (u's id
 * and uri, MIMI_URI_MAX + 1 bytes, rewritten); else, and for other
 * domains, nothing changes. */
void peer_local_fold(const struct cw_app *app, struct mimi_uri *u, char *uri);
/* Why the user u (its URI uri) is one the local adapter cannot have, a
 * peer naming it as a member is refused (into why, returned): on Matrix,
 * one in the namespace of the gateway's own bot and ghosts
 * (matrix_local_refused).  NULL: it can be had, or is no local user. */
const char *peer_local_refused(const struct cw_app *app, const struct mimi_uri *u, const char *uri, char *why,
			       size_t len);
cw_err identity_id(PGconn *c, const struct mimi_uri *u, bool local, const char *network, const char *peer_id,
		   char *out, size_t outlen, cw_errmsg *e);

/* A room's membership update names at most this many users per list. */
#define ROOM_MEMBERS_MAX 256

/* A user named in a membership update, as parsed and folded. */
struct room_member_in {
	struct mimi_uri u;
	char uri[MIMI_URI_MAX + 1];
};

/* Reads arr, a JSON array of at most ROOM_MEMBERS_MAX user URIs (NULL: no
 * users), into out (each folded by peer_local_fold); what names the list
 * in the answer.  False after answering 400 invalid_body. */
bool peer_read_users(const struct cw_app *app, struct cw_req *req, json_t *arr, const char *what,
		     struct room_member_in *out, size_t *n);

/* The room of a membership update from r, the result (owned) of a
 * SELECT id, kind of at most one room locked FOR UPDATE: its row id into
 * room_id; or, with j->err_code set, 404 (code, detail) when r has no row,
 * 400 for a direct room, which keeps its two members. */
cw_err room_members_target(PGconn *c, struct app_job *j, PGresult *r, const char *code, const char *detail,
			   char room_id[24], cw_errmsg *e);

/* Takes the room public_id's lock of every write of events (ROOM_LOCK_SQL)
 * for a membership update, before its row's lock: a write of events
 * holds the first, and must not wait for the update's row lock while the
 * update waits for it.  Nothing when there is no such room. */
cw_err room_members_lock(PGconn *c, const char *public_id, cw_errmsg *e);

/* The n users of m leave the room of row room_id: their membership
 * becomes 'left', which the Matrix and XMPP adapters act on (their ghosts
 * leave; no more rows are written to them).  changed (NULL: not asked),
 * n entries: whether each one's membership changed (joined or invited:
 * yes; one who had left already, or is banned: no).  The one removal of the peer API's and the admin API's
 * member updates. */
cw_err room_members_remove(PGconn *c, const char *room_id, const struct room_member_in *m, size_t n, bool *changed,
			   cw_errmsg *e);

/* Who made a change of a room's members, for the events telling the peers. */
struct room_members_change {
	const char *room_id;     /* the room's row id */
	const char *by;          /* the domain of the provider that made it (content.by), or NULL: none */
	const char *origin;      /* the events' origin_network: "gateway", "peer:<name>" */
	const char *except_peer; /* the row id of a peer told nothing (the one that made it), or NULL */
};

/* Each of the n users of m (those with changed[i], or all when changed is
 * NULL) joining or leaving the room (membership: "join", "leave") is told
 * to every peer with members in it but ch->except_peer, as a membership
 * event {membership, target, by} with the user its sender, through the
 * outbox, in the caller's transaction; nothing at all when none changed
 * or no peer is to be told.  The caller holds room_members_lock.  The
 * one telling of the peer API's and the admin API's member updates. */
cw_err room_members_events(PGconn *c, const struct room_members_change *ch, const char *membership,
			   const struct room_member_in *m, size_t n, const bool *changed, cw_errmsg *e);

/* The audit record room.members of a membership update of the room
 * public_id by actor ("peer:<name>", "admin:<name>"). */
cw_err room_members_audit(PGconn *c, const char *actor, const char *public_id, const struct room_member_in *add,
			  size_t nadd, const struct room_member_in *remove, size_t nremove, cw_errmsg *e);

/* The queue that coalesces single-event submits (one per daemon). */
struct submit_queue *submit_queue_new(void);
void submit_queue_free(struct submit_queue *q);
/* The single submits waiting in q for the writer's next job to take them
 * (causeway_peer_submits_queued; 0 for NULL). */
size_t submit_queue_count(struct submit_queue *q);

/* The statements of the submit path: round 0's reads, prepared on every
 * store connection, and the writes of the later rounds, on the writer's
 * (store_opts.reader_stmts; until the fifty-eighth session all of them on
 * every reader too, which never ran the writes). */
extern const struct store_stmt peer_api_read_statements[];
extern const struct store_stmt peer_api_statements[];

void peer_api_directory(struct cw_req *req, void *ctx);
void peer_api_room_create(struct cw_req *req, void *ctx);
void peer_api_room_get(struct cw_req *req, void *ctx);
void peer_api_room_members(struct cw_req *req, void *ctx);
void peer_api_room_rename(struct cw_req *req, void *ctx);
void peer_api_message_submit(struct cw_req *req, void *ctx);
void peer_api_receipt_submit(struct cw_req *req, void *ctx);
void peer_api_typing_submit(struct cw_req *req, void *ctx);
void peer_api_message_status(struct cw_req *req, void *ctx);
void peer_api_batch(struct cw_req *req, void *ctx);

#endif
