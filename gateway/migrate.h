/* Schema migrations: schema/NNN_name.sql applied in order under an advisory
 * lock, each in its own transaction, recorded with its SHA-256 in
 * schema_migrations.  An applied file that has changed since is an error:
 * the daemon refuses to start rather than run on a schema it cannot know. */
#ifndef CW_MIGRATE_H
#define CW_MIGRATE_H

#include "cw.h"
#include <libpq-fe.h>

struct migration {
	int version;
	char name[128];     /* file name */
	char sha256[65];    /* hex */
	char *sql;
};

struct migration_set {
	struct migration *m;
	size_t n;
};

/* Reads every NNN_name.sql of dir, sorted by version.  Two files with one
 * version, or a name that does not fit the pattern but ends in .sql, are
 * errors.  Free with migration_set_free. */
cw_err migration_set_load(struct migration_set *set, const char *dir, cw_errmsg *e);
void migration_set_free(struct migration_set *set);

/* Asked while a migration waits for the lock of another process's
 * migrations or runs a statement: waits up to wait_ms (0: only looks) and
 * returns true when the process is to stop. */
typedef bool migrate_stop_fn(void *arg, int wait_ms);

/* Compares set with the database and, when apply is true, applies what is
 * missing.  *applied_now counts the files applied by this call, *pending
 * those still missing (when apply is false).  The connection is c's for the
 * call: migrations run without statement_timeout (an index build on a large
 * table takes minutes, and so may the wait for another process migrating),
 * set to 0 on it; a migration that waits for a table lock past lock_timeout
 * (set to 1 s on it: the sessions that queue behind the wait) is rolled
 * back and tried again, logged, until it is applied.  stop is asked
 * between tries of the lock and while a statement runs: when it says to
 * stop, the statement is cancelled, the file being applied rolled back, and
 * CW_ESHUTDOWN returned (files applied before stay).  CW_EINVAL: the
 * database's migrations do not match set; any other failure is the
 * database's (a migration's own names its file). */
cw_err migrate(PGconn *c, const struct migration_set *set, bool apply, migrate_stop_fn *stop, void *stop_arg,
	       int *applied_now, int *pending, cw_errmsg *e);

#endif
