/* Admin credentials: the bootstrap token of the configuration and the
 * named tokens of the admin_tokens table, each with a role (admin: may
 * change; viewer: may only read), and the /admin/v1 routes that manage
 * them (docs/admin-api.md).
 *
 * Every process keeps the named tokens in memory (reloaded by the policy
 * thread on NOTIFY causeway_policy and at least every reload interval), so
 * that checking a token never waits for the database.  Only SHA-256
 * hashes are stored or held; the raw token is shown once, when made. */
#ifndef CW_ADMIN_AUTH_H
#define CW_ADMIN_AUTH_H

#include "cw.h"
#include "http.h"

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

#define ADMIN_NAME_MAX 65

/* Who made an admin request (the request's principal on admin routes). */
struct admin_principal {
	int64_t id;                  /* admin_tokens.id; 0 for the bootstrap token */
	char name[ADMIN_NAME_MAX];   /* "config" for the bootstrap token */
	bool can_change;             /* role admin */
	char actor[ADMIN_NAME_MAX + 8]; /* "admin:<name>", as the audit log writes it */
};

struct admin_tokens;
/* config_hash: the bootstrap token's SHA-256, or NULL when none is set. */
struct admin_tokens *admin_tokens_new(const unsigned char *config_hash);
void admin_tokens_free(struct admin_tokens *t);
/* Replaces the bootstrap token's SHA-256 (config_hash NULL: none), under
 * the lock the checks take: a reload (SIGHUP) of admin.token_sha256. */
void admin_tokens_set_config(struct admin_tokens *t, const unsigned char *config_hash);
/* Replaces the named tokens with the table's live (unrevoked) ones. */
cw_err admin_tokens_load(struct admin_tokens *t, PGconn *c, cw_errmsg *e);
/* Drops a named token at once (revoked by this process). */
void admin_tokens_forget(struct admin_tokens *t, const char *name);
/* Whether a named token is held (in force in this process). */
bool admin_tokens_known(struct admin_tokens *t, const char *name);
/* Whether any credential exists at all (else the admin API is off). */
bool admin_tokens_any(struct admin_tokens *t);
/* The token's principal (caller frees), or NULL; every entry is compared
 * in constant time.  *touch_id is set to the token's row id when its
 * last_used_at is due for an update (at most once a minute), else 0. */
struct admin_principal *admin_tokens_check(struct admin_tokens *t, const char *token, int64_t *touch_id);

/* Whether the named token of p (the configured one has no row: always) is
 * still unrevoked, asked of its row in the transaction of a change (c),
 * whose lock (FOR KEY SHARE) a revocation's (FOR UPDATE) waits for: a
 * token revoked by any process changes nothing from the revocation's
 * commit on, though this process still holds it until its next reload
 * (dropped at once when found revoked). */
cw_err admin_tokens_in_force(struct admin_tokens *t, PGconn *c, const struct admin_principal *p, bool *ok,
			     cw_errmsg *e);

/* The actor of an admin request ("admin:<name>"), for the audit log. */
const char *admin_actor(const struct cw_req *req);

void admin_whoami(struct cw_req *req, void *ctx);
void admin_tokens_list(struct cw_req *req, void *ctx);
void admin_tokens_create(struct cw_req *req, void *ctx);
void admin_tokens_revoke(struct cw_req *req, void *ctx);

#endif
