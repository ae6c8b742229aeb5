/* Numbered SQL migrations with checksums. */
#include "config.h"
#include "migrate.h"
#include "log.h"
#include "store.h"

#include <dirent.h>
#include <errno.h>
#include <openssl/evp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* An arbitrary constant key for pg_advisory_lock: "causeway" in ASCII. */
#define MIGRATE_LOCK_KEY "7161132091431352697"
#define MIGRATION_MAX_BYTES (16L << 20)
/* How long a migration's statement waits for a table lock another session
 * holds, and the longest pause before its file is tried again
 * (apply_waiting).  A statement waiting for a lock (an ALTER TABLE's
 * ACCESS EXCLUSIVE, an index build's SHARE) queues every later statement
 * on that table behind it, whatever they ask: without a bound, a
 * transaction left open or a pg_dump holding its ACCESS SHARE on events
 * for an hour stopped every daemon's reads and writes of events for that
 * hour, not only the migration (until the forty-seventh session).  Below
 * database.request_timeout_ms (5 s), so that the requests queued behind
 * a wait are answered in time. */
#define MIGRATE_LOCK_TIMEOUT "1s"
#define MIGRATE_RETRY_MAX_MS 30000

static int cmp_version(const void *a, const void *b)
{
	const struct migration *x = a, *y = b;
	return (x->version > y->version) - (x->version < y->version);
}

/* "001_core.sql" -> 1; -1 if the name does not fit NNN_[a-z0-9_]+.sql */
static int parse_name(const char *name)
{
	size_t len = strlen(name);
	if (len < 9 || strcmp(name + len - 4, ".sql") != 0)
		return -1;
	for (int i = 0; i < 3; i++)
		if (name[i] < '0' || name[i] > '9')
			return -1;
	if (name[3] != '_')
		return -1;
	for (size_t i = 4; i < len - 4; i++) {
		char ch = name[i];
		if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_'))
			return -1;
	}
	return (name[0] - '0') * 100 + (name[1] - '0') * 10 + (name[2] - '0');
}

static cw_err read_file(const char *path, char **out, size_t *len, cw_errmsg *e)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return cw_fail(e, CW_EIO, "%s: %s", path, strerror(errno));
	char *buf = NULL;
	size_t n = 0, cap = 0;
	for (;;) {
		if (n + 4096 + 1 > cap) {
			cap = cap ? cap * 2 : 8192;
			if (cap > (size_t)MIGRATION_MAX_BYTES) {
				free(buf);
				fclose(f);
				return cw_fail(e, CW_EINVAL, "%s: larger than %ld bytes", path, MIGRATION_MAX_BYTES);
			}
			char *p = realloc(buf, cap);
			if (!p) {
				free(buf);
				fclose(f);
				return cw_fail(e, CW_ENOMEM, "out of memory");
			}
			buf = p;
		}
		size_t r = fread(buf + n, 1, 4096, f);
		n += r;
		if (r < 4096)
			break;
	}
	bool err = ferror(f);
	fclose(f);
	if (err) {
		free(buf);
		return cw_fail(e, CW_EIO, "%s: read error", path);
	}
	buf[n] = '\0';
	*out = buf;
	*len = n;
	return CW_OK;
}

cw_err migration_set_load(struct migration_set *set, const char *dir, cw_errmsg *e)
{
	memset(set, 0, sizeof(*set));
	DIR *d = opendir(dir);
	if (!d)
		return cw_fail(e, CW_EINVAL, "schema directory %s: %s", dir, strerror(errno));
	struct dirent *de;
	cw_err rc = CW_OK;
	size_t cap = 0;
	while ((de = readdir(d))) {
		size_t len = strlen(de->d_name);
		if (len < 4 || strcmp(de->d_name + len - 4, ".sql") != 0)
			continue;
		int v = parse_name(de->d_name);
		if (v < 0 || len >= sizeof(set->m[0].name)) {
			rc = cw_fail(e, CW_EINVAL, "%s/%s: a migration is named NNN_lowercase_words.sql", dir, de->d_name);
			break;
		}
		if (set->n == cap) {
			cap = cap ? cap * 2 : 16;
			struct migration *m = realloc(set->m, cap * sizeof(*m));
			if (!m) {
				rc = cw_fail(e, CW_ENOMEM, "out of memory");
				break;
			}
			set->m = m;
		}
		struct migration *m = &set->m[set->n];
		memset(m, 0, sizeof(*m));
		m->version = v;
		snprintf(m->name, sizeof(m->name), "%s", de->d_name);
		char path[4096];
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		size_t flen = 0;
		if ((rc = read_file(path, &m->sql, &flen, e)))
			break;
		set->n++;
		unsigned char md[32];
		unsigned int mdlen = 0;
		EVP_Digest(m->sql, flen, md, &mdlen, EVP_sha256(), NULL);
		cw_hex(m->sha256, md, 32);
	}
	closedir(d);
	if (!rc) {
		if (set->n)
			qsort(set->m, set->n, sizeof(*set->m), cmp_version);
		for (size_t i = 1; i < set->n; i++)
			if (set->m[i].version == set->m[i - 1].version) {
				rc = cw_fail(e, CW_EINVAL, "%s: %s and %s have the same number", dir,
					     set->m[i - 1].name, set->m[i].name);
				break;
			}
		if (!rc && set->n == 0)
			rc = cw_fail(e, CW_EINVAL, "schema directory %s holds no NNN_name.sql migration", dir);
	}
	if (rc)
		migration_set_free(set);
	return rc;
}

void migration_set_free(struct migration_set *set)
{
	for (size_t i = 0; i < set->n; i++)
		free(set->m[i].sql);
	free(set->m);
	memset(set, 0, sizeof(*set));
}

/* PQexec, but a stop asked for while the statement runs cancels it
 * (PQcancel): a migration may rebuild a large table for minutes.  Returns
 * the last result, as PQexec does; *stopped tells whether it was asked. */
static PGresult *exec_stoppable(PGconn *c, const char *sql, migrate_stop_fn *stop, void *stop_arg,
				bool *stopped)
{
	*stopped = false;
	if (!PQsendQuery(c, sql))
		return NULL;
	return migrate_result_stoppable(c, stop, stop_arg, stopped);
}

PGresult *migrate_result_stoppable(PGconn *c, migrate_stop_fn *stop, void *stop_arg, bool *stopped)
{
	*stopped = false;
	while (PQisBusy(c)) {
		struct pollfd p = { .fd = PQsocket(c), .events = POLLIN };
		poll(&p, 1, 100);
		if (!*stopped && stop(stop_arg, 0)) {
			*stopped = true;
			char err[256];
			PGcancel *k = PQgetCancel(c);
			if (!k || !PQcancel(k, err, sizeof(err)))
				LOG_KV(CW_LOG_WARN, "cannot cancel the start's statement at the stop; it runs to its end",
				       "detail", k ? err : "out of memory");
			PQfreeCancel(k);
		}
		if (!PQconsumeInput(c))
			break;
	}
	PGresult *last = NULL, *r;
	while ((r = PQgetResult(c))) {
		PQclear(last);
		last = r;
	}
	return last;
}

/* Applies m in a transaction of its own; *busy: it failed waiting for a
 * lock another session holds (55P03, MIGRATE_LOCK_TIMEOUT), or lost a
 * deadlock with one (40P01: a migration that locks two tables a daemon's
 * transaction writes in the other order), rolled back, to be tried again.
 * Until the forty-seventh session a lost deadlock failed the migration,
 * and the daemon did not start. */
static cw_err apply_one(PGconn *c, const struct migration *m, migrate_stop_fn *stop, void *stop_arg, bool *busy,
			cw_errmsg *e)
{
	*busy = false;
	cw_err rc = store_exec(c, "BEGIN", e);
	if (rc)
		return rc;
	bool stopped;
	PGresult *r = exec_stoppable(c, m->sql, stop, stop_arg, &stopped);
	if (stopped || (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)) {
		cw_errmsg why;
		const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
		*busy = !stopped && state && (strcmp(state, "55P03") == 0 || strcmp(state, "40P01") == 0);
		rc = stopped ? cw_fail(&why, CW_ESHUTDOWN, "stopped while it ran; rolled back")
			     : store_result_err(c, r, &why);
		PQclear(r);
		store_end(c, rc, &why);
		return cw_fail(e, rc, "migration %s failed: %s", m->name, why.msg);
	}
	PQclear(r);
	char version[16];
	snprintf(version, sizeof(version), "%d", m->version);
	const char *params[] = { version, m->name, m->sha256 };
	r = PQexecParams(c, "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
			 3, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(r) != PGRES_COMMAND_OK) {
		rc = store_result_err(c, r, e);
		PQclear(r);
		return store_end(c, rc, e);
	}
	PQclear(r);
	return store_end(c, CW_OK, e);
}

/* apply_one, tried again while it fails waiting for a lock another
 * session holds (or losing a deadlock): after 1 s, 2 s, 4 s, ... at most MIGRATE_RETRY_MAX_MS
 * apart, each wait logged, until it is applied, fails otherwise, or a stop
 * is asked for.  Between the tries the sessions queued behind its wait go
 * on. */
static cw_err apply_waiting(PGconn *c, const struct migration *m, migrate_stop_fn *stop, void *stop_arg,
			    cw_errmsg *e)
{
	for (int tries = 1;; tries++) {
		bool busy;
		cw_err rc = apply_one(c, m, stop, stop_arg, &busy, e);
		if (!busy)
			return rc;
		int pause_ms = tries < 6 ? 1000 << (tries - 1) : MIGRATE_RETRY_MAX_MS;
		if (pause_ms > MIGRATE_RETRY_MAX_MS)
			pause_ms = MIGRATE_RETRY_MAX_MS;
		char n[16], ms[16];
		snprintf(n, sizeof(n), "%d", tries);
		snprintf(ms, sizeof(ms), "%d", pause_ms);
		LOG_KV(CW_LOG_WARN,
		       "a migration waits for a table lock another session holds (a long transaction, a backup), "
		       "or lost a deadlock with one: rolled back, tried again",
		       "file", m->name, "tries", n, "next_in_ms", ms, "detail", e->msg);
		for (int waited = 0; waited < pause_ms; waited += 250)
			if (stop(stop_arg, 250))
				return cw_fail(e, CW_ESHUTDOWN, "stopped while migration %s waited for a lock",
					       m->name);
	}
}

static cw_err check_and_apply(PGconn *c, const struct migration_set *set, bool apply, migrate_stop_fn *stop,
			      void *stop_arg, int *applied_now, int *pending, cw_errmsg *e)
{
	cw_err rc = store_exec(c, "CREATE TABLE IF NOT EXISTS schema_migrations ("
				  " version integer PRIMARY KEY,"
				  " name text NOT NULL,"
				  " checksum text NOT NULL,"
				  " applied_at timestamptz NOT NULL DEFAULT now())", e);
	if (rc)
		return rc;
	PGresult *r = PQexec(c, "SELECT version, name, checksum FROM schema_migrations ORDER BY version");
	if (PQresultStatus(r) != PGRES_TUPLES_OK) {
		rc = store_result_err(c, r, e);
		PQclear(r);
		return rc;
	}
	int rows = PQntuples(r);
	bool *done = calloc(set->n + 1, sizeof(bool));
	if (!done) {
		PQclear(r);
		return cw_fail(e, CW_ENOMEM, "out of memory");
	}
	for (int i = 0; i < rows && !rc; i++) {
		int v = atoi(PQgetvalue(r, i, 0));
		const char *name = PQgetvalue(r, i, 1), *sum = PQgetvalue(r, i, 2);
		size_t k = 0;
		while (k < set->n && set->m[k].version != v)
			k++;
		if (k == set->n)
			rc = cw_fail(e, CW_EINVAL, "the database has migration %03d (%s), which this build does not "
				     "have: is it an older Causeway than the one that migrated it?", v, name);
		else if (strcmp(sum, set->m[k].sha256) != 0)
			rc = cw_fail(e, CW_EINVAL, "migration %s was changed after it was applied (checksum %.12s "
				     "recorded, %.12s now): restore the file and add a new migration instead",
				     set->m[k].name, sum, set->m[k].sha256);
		else
			done[k] = true;
	}
	PQclear(r);
	/* A migration of this build not recorded below one that is: the
	 * database was migrated by a build without it (builds mixed, a branch's
	 * build), and applied now it would run after the later ones it was
	 * written before, on a schema it does not expect.  Refused, naming
	 * both (until the forty-seventh session it was applied after them in
	 * silence).  The rolling upgrade (docs/operations.md) never makes
	 * one: a newer build has all of an older build's migrations. */
	size_t newest = set->n;
	for (size_t k = 0; k < set->n; k++)
		if (done[k])
			newest = k;
	for (size_t k = 0; k < set->n && newest < set->n && k < newest && !rc; k++)
		if (!done[k])
			rc = cw_fail(e, CW_EINVAL, "migration %s is not applied, but the later %s is: the database was "
				     "migrated by a build without it (builds mixed?), and it is not applied out of order; "
				     "apply it by hand if it fits (docs/operations.md, \"Upgrades and migrations\")",
				     set->m[k].name, set->m[newest].name);
	for (size_t k = 0; k < set->n && !rc; k++) {
		if (done[k])
			continue;
		if (!apply) {
			(*pending)++;
			continue;
		}
		if (stop(stop_arg, 0)) {
			rc = cw_fail(e, CW_ESHUTDOWN, "stopped before migration %s", set->m[k].name);
			break;
		}
		int64_t t0 = cw_now_us();
		rc = apply_waiting(c, &set->m[k], stop, stop_arg, e);
		if (!rc) {
			(*applied_now)++;
			char ms[32];
			snprintf(ms, sizeof(ms), "%.1f", (double)(cw_now_us() - t0) / 1000.0);
			LOG_KV(CW_LOG_INFO, "migration applied", "file", set->m[k].name, "duration_ms", ms);
		}
	}
	free(done);
	return rc;
}

/* Tells of the invalid indexes of the daemon's schema: what a CREATE
 * INDEX CONCURRENTLY that failed or was interrupted leaves behind (an
 * index built first by hand, as docs/operations.md advises on a large
 * table), which no query uses but every write maintains.  The migration
 * that builds it (CREATE INDEX IF NOT EXISTS) takes it for built and is
 * applied in a moment, and the statements it was for read their table
 * whole, with nothing to say so (a review saw 029 "applied" in 12 ms over
 * one).  One still being built is listed too: its build ends it. */
static void warn_invalid_indexes(PGconn *c)
{
	PGresult *r = PQexec(c, "SELECT string_agg(x.relname, ',' ORDER BY x.relname) FROM pg_index i "
				"JOIN pg_class x ON x.oid = i.indexrelid "
				"WHERE NOT i.indisvalid AND x.relnamespace = ANY (SELECT oid FROM pg_namespace "
				" WHERE nspname = ANY (current_schemas(false)))");
	if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
		LOG_KV(CW_LOG_WARN,
		       "invalid indexes: a CREATE INDEX CONCURRENTLY that failed (or one still running); queries "
		       "do not use them, and a migration that builds one took it for built: drop each and build it "
		       "again (docs/operations.md, \"Upgrades and migrations\")",
		       "indexes", PQgetvalue(r, 0, 0));
	PQclear(r);
}

cw_err migrate_server_check(int server_version, cw_errmsg *e)
{
	if (server_version <= 0 || server_version >= MIGRATE_SERVER_MIN)
		return CW_OK; /* 0: not known (a connection lost), its statements will say */
	char v[32];
	if (server_version >= 100000)
		snprintf(v, sizeof(v), "%d.%d", server_version / 10000, server_version % 10000);
	else
		snprintf(v, sizeof(v), "%d.%d.%d", server_version / 10000, server_version / 100 % 100,
			 server_version % 100);
	return cw_fail(e, CW_EINVAL, "the database server is PostgreSQL %s; Causeway needs %d or later "
		       "(docs/operations.md)", v, MIGRATE_SERVER_MIN / 10000);
}

cw_err migrate(PGconn *c, const struct migration_set *set, bool apply, migrate_stop_fn *stop, void *stop_arg,
	       int *applied_now, int *pending, cw_errmsg *e)
{
	*applied_now = 0;
	*pending = 0;
	cw_err rc = migrate_server_check(PQserverVersion(c), e);
	if (rc)
		return rc;
	/* Not the daemon's statement timeout (database.statement_timeout_ms,
	 * made for a message's statements), nor the role's: until the
	 * twenty-fourth session an index build or key rebuild longer than it
	 * was cancelled, and the daemon refused to start on a large database.
	 * A wait for a table lock is bounded, and tried again
	 * (MIGRATE_LOCK_TIMEOUT, apply_waiting); the wait for another
	 * process's migrations is not (an advisory lock tried, below). */
	rc = store_exec(c, "SET statement_timeout = 0; SET lock_timeout = '" MIGRATE_LOCK_TIMEOUT "'", e);
	if (rc)
		return rc;
	/* Tried, not waited for in the server: a stop asked for meanwhile is
	 * seen between the tries. */
	bool told = false;
	for (;;) {
		PGresult *r = PQexec(c, "SELECT pg_try_advisory_lock(" MIGRATE_LOCK_KEY ")");
		if (PQresultStatus(r) != PGRES_TUPLES_OK) {
			rc = store_result_err(c, r, e);
			PQclear(r);
			return rc;
		}
		bool got = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
		PQclear(r);
		if (got)
			break;
		if (!told) {
			LOG_KV(CW_LOG_INFO, "waiting for the migrations of another process");
			told = true;
		}
		if (stop(stop_arg, 250))
			return cw_fail(e, CW_ESHUTDOWN, "stopped while waiting for the migrations of another process");
	}
	rc = check_and_apply(c, set, apply, stop, stop_arg, applied_now, pending, e);
	/* An unlock that fails fails a start that went well: since the
	 * fifty-ninth session this connection lives on as the policy thread's
	 * (main.c), and a lock left on it would hold every other process's
	 * migrations for as long as it does (the session's review); before,
	 * it was closed at the start's end.  On a connection still usable the
	 * unlock does not fail. */
	cw_errmsg ue;
	cw_err urc = store_exec(c, "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")", &ue);
	if (!rc && urc) {
		*e = ue;
		rc = urc;
	}
	if (!rc)
		warn_invalid_indexes(c);
	return rc;
}
