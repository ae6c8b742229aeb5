/* Loading the migration files: order, names, checksums. (Applying them is
 * tested against a real PostgreSQL in tests/integration.) */
#include "config.h"
#include "migrate.h"
#include "unit.h"

#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

static char dir[64];

static void mkdir_tmp(void)
{
	snprintf(dir, sizeof(dir), "/tmp/cw_mig_XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void put(const char *name, const char *sql)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "w");
	ck_assert_ptr_nonnull(f);
	fputs(sql, f);
	fclose(f);
}

static void rm_tmp(void)
{
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	ck_assert_int_eq(system(cmd), 0);
}

START_TEST(sorted_by_number_with_checksums)
{
	mkdir_tmp();
	put("010_later.sql", "SELECT 10;");
	put("002_second.sql", "SELECT 2;");
	put("001_first.sql", "SELECT 1;");
	put("README", "not a migration");
	struct migration_set s;
	cw_errmsg e;
	ck_assert_msg(migration_set_load(&s, dir, &e) == CW_OK, "%s", e.msg);
	ck_assert_uint_eq(s.n, 3);
	ck_assert_int_eq(s.m[0].version, 1);
	ck_assert_int_eq(s.m[1].version, 2);
	ck_assert_int_eq(s.m[2].version, 10);
	ck_assert_str_eq(s.m[2].name, "010_later.sql");
	ck_assert_str_eq(s.m[0].sql, "SELECT 1;");
	/* sha256("SELECT 1;") */
	unsigned char md[32];
	unsigned int len;
	EVP_Digest("SELECT 1;", 9, md, &len, EVP_sha256(), NULL);
	char hex[65];
	cw_hex(hex, md, 32);
	ck_assert_str_eq(s.m[0].sha256, hex);
	migration_set_free(&s);
	rm_tmp();
}
END_TEST

START_TEST(bad_names_are_refused)
{
	static const char *const bad[] = { "1_short.sql", "001-dash.sql", "001_Upper.sql", "abc_x.sql", "001_.sql" };
	for (size_t i = 0; i < CW_ARRAY_LEN(bad); i++) {
		mkdir_tmp();
		put("001_ok.sql", "SELECT 1;");
		put(bad[i], "SELECT 2;");
		struct migration_set s;
		cw_errmsg e;
		ck_assert_msg(migration_set_load(&s, dir, &e) == CW_EINVAL, "%s was taken", bad[i]);
		ck_assert_ptr_nonnull(strstr(e.msg, bad[i]));
		rm_tmp();
	}
}
END_TEST

START_TEST(duplicate_numbers_are_refused)
{
	mkdir_tmp();
	put("003_a.sql", "SELECT 1;");
	put("003_b.sql", "SELECT 2;");
	struct migration_set s;
	cw_errmsg e;
	ck_assert_int_eq(migration_set_load(&s, dir, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "same number"));
	rm_tmp();
}
END_TEST

START_TEST(empty_or_missing_directory_is_refused)
{
	mkdir_tmp();
	struct migration_set s;
	cw_errmsg e;
	ck_assert_int_eq(migration_set_load(&s, dir, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "no NNN_name.sql"));
	rm_tmp();
	ck_assert_int_eq(migration_set_load(&s, "/nonexistent/schema", &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "/nonexistent/schema"));
}
END_TEST

START_TEST(the_tree_schema_loads)
{
	char path[4096];
	const char *top = getenv("top_srcdir");
	snprintf(path, sizeof(path), "%s/schema", top && *top ? top : ".");
	struct migration_set s;
	cw_errmsg e;
	ck_assert_msg(migration_set_load(&s, path, &e) == CW_OK, "%s", e.msg);
	ck_assert_int_eq(s.m[0].version, 1);
	for (size_t i = 0; i < s.n; i++)
		ck_assert_int_eq(s.m[i].version, (int)i + 1); /* numbered without gaps */
	migration_set_free(&s);
}
END_TEST

/* The schema needs PostgreSQL 15 (001's UNIQUE NULLS NOT DISTINCT): an
 * older server is refused by name before any migration, not with a syntax
 * error in 001; docs/operations.md said 13 until the forty-seventh
 * session. */
START_TEST(an_older_server_is_refused_by_name)
{
	cw_errmsg e;
	ck_assert_int_eq(migrate_server_check(140009, &e), CW_EINVAL);
	ck_assert_msg(strstr(e.msg, "PostgreSQL 14.9") && strstr(e.msg, "needs 15 or later"), "%s", e.msg);
	ck_assert_int_eq(migrate_server_check(130015, &e), CW_EINVAL);
	ck_assert_msg(strstr(e.msg, "PostgreSQL 13.15"), "%s", e.msg);
	ck_assert_int_eq(migrate_server_check(90624, &e), CW_EINVAL);
	ck_assert_msg(strstr(e.msg, "PostgreSQL 9.6.24"), "%s", e.msg);
	ck_assert_int_eq(migrate_server_check(150000, &e), CW_OK);
	ck_assert_int_eq(migrate_server_check(150014, &e), CW_OK);
	ck_assert_int_eq(migrate_server_check(170002, &e), CW_OK);
	ck_assert_int_eq(migrate_server_check(0, &e), CW_OK); /* not known: the statements say */
}
END_TEST

int main(void)
{
	Suite *s = suite_create("migrate");
	TCase *tc = tcase_create("load");
	tcase_add_test(tc, sorted_by_number_with_checksums);
	tcase_add_test(tc, bad_names_are_refused);
	tcase_add_test(tc, duplicate_numbers_are_refused);
	tcase_add_test(tc, empty_or_missing_directory_is_refused);
	tcase_add_test(tc, the_tree_schema_loads);
	tcase_add_test(tc, an_older_server_is_refused_by_name);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
