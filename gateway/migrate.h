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

/* The result of the statement sent on c (PQsendQuery, PQsendQueryParams),
 * read as PQexec reads it (the last one), but a stop asked for while it
 * runs (stop, looked at every 100 ms) cancels it (PQcancel) and sets
 * *stopped: what the migrations run their files by, and since the sixtieth
 * session the start's move of local users, which runs without a statement
 * timeout as they do.  NULL if the connection broke before a result. */
PGresult *migrate_result_stoppable(PGconn *c, migrate_stop_fn *stop, void *stop_arg, bool *stopped);

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
/* The oldest PostgreSQL the schema runs on (PQserverVersion's form):
 * 001_core.sql's UNIQUE NULLS NOT DISTINCT is PostgreSQL 15's, 025's
 * statistics on an expression 14's.  Until the forty-seventh session
 * docs/operations.md said 13, and on 13 or 14 the daemon refused to start
 * with "syntax error at or near NULLS" in 001. */
#define MIGRATE_SERVER_MIN 150000
/* CW_EINVAL, saying which version the server is and which is needed, when
 * server_version (PQserverVersion's; 0: not known, taken) is older than
 * MIGRATE_SERVER_MIN.  migrate() asks it first. */
cw_err migrate_server_check(int server_version, cw_errmsg *e);

cw_err migrate(PGconn *c, const struct migration_set *set, bool apply, migrate_stop_fn *stop, void *stop_arg,
	       int *applied_now, int *pending, cw_errmsg *e);

#endif
