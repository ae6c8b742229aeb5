/* The option table and the loader, driven by tests/unit/data/config_cases.txt. */
#include "config.h"
#include "conf.h"
#include "log.h"
#include "unit.h"

#include <fcntl.h>
#include <unistd.h>

static const char *no_env(const char *name) { return NULL; }

struct ccase {
	char name[200];
	char expect[300];   /* "ok" or "error <substring>" */
	char checks[8][200];
	int nchecks;
	char ini[2048];
};

static int load_cases(struct ccase *cases, int max)
{
	FILE *f = fopen(unit_data_path("config_cases.txt"), "r");
	ck_assert_msg(f != NULL, "cannot open %s", unit_data_path("config_cases.txt"));
	char line[1024];
	int n = -1;
	bool in_ini = false;
	while (fgets(line, sizeof(line), f)) {
		if (strncmp(line, "=== ", 4) == 0) {
			ck_assert_int_lt(n + 1, max);
			n++;
			memset(&cases[n], 0, sizeof(cases[n]));
			snprintf(cases[n].name, sizeof(cases[n].name), "%.199s", line + 4);
			cases[n].name[strcspn(cases[n].name, "\n")] = '\0';
			in_ini = false;
			continue;
		}
		if (n < 0 || (!in_ini && (line[0] == '#' || line[0] == '\n')))
			continue;
		if (in_ini) {
			strncat(cases[n].ini, line, sizeof(cases[n].ini) - strlen(cases[n].ini) - 1);
		} else if (strncmp(line, "expect: ", 8) == 0) {
			snprintf(cases[n].expect, sizeof(cases[n].expect), "%.299s", line + 8);
			cases[n].expect[strcspn(cases[n].expect, "\n")] = '\0';
		} else if (strncmp(line, "check: ", 7) == 0) {
			ck_assert_int_lt(cases[n].nchecks, 8);
			char *c = cases[n].checks[cases[n].nchecks++];
			snprintf(c, 200, "%.199s", line + 7);
			c[strcspn(c, "\n")] = '\0';
		} else if (strcmp(line, "---\n") == 0) {
			in_ini = true;
		} else {
			ck_abort_msg("config_cases.txt: unexpected line in case %s: %s", cases[n].name, line);
		}
	}
	fclose(f);
	return n + 1;
}

static const struct cfg_option *option_named(const char *full)
{
	for (size_t i = 0; i < cfg_option_count; i++) {
		char name[128];
		snprintf(name, sizeof(name), "%s.%s", cfg_options[i].section, cfg_options[i].name);
		if (strcmp(name, full) == 0)
			return &cfg_options[i];
	}
	return NULL;
}

START_TEST(table_driven_cases)
{
	static struct ccase cases[128];
	int n = load_cases(cases, 128);
	ck_assert_int_ge(n, 20);
	for (int i = 0; i < n; i++) {
		struct ccase *k = &cases[i];
		char path[] = "/tmp/cw_conf_XXXXXX";
		int fd = mkstemp(path);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(write(fd, k->ini, strlen(k->ini)), (ssize_t)strlen(k->ini));
		close(fd);
		struct cw_config c;
		cw_errmsg e = { { 0 } };
		cw_err rc = cfg_load(&c, path, no_env, &e);
		unlink(path);
		if (strcmp(k->expect, "ok") == 0) {
			ck_assert_msg(rc == CW_OK, "case '%s': expected ok, got: %s", k->name, e.msg);
			for (int j = 0; j < k->nchecks; j++) {
				char key[128], want[128];
				ck_assert_int_eq(sscanf(k->checks[j], "%127s = %127[^\n]", key, want), 2);
				const struct cfg_option *o = option_named(key);
				ck_assert_msg(o != NULL, "case '%s': no option %s", k->name, key);
				char got[256];
				cfg_value_text(&c, o, false, got, sizeof(got));
				ck_assert_msg(strcmp(got, want) == 0, "case '%s': %s is '%s', expected '%s'",
					      k->name, key, got, want);
			}
			cfg_free(&c);
		} else {
			ck_assert_msg(strncmp(k->expect, "error ", 6) == 0, "case '%s': bad expect line", k->name);
			ck_assert_msg(rc == CW_EINVAL, "case '%s': expected an error, got ok", k->name);
			ck_assert_msg(strstr(e.msg, k->expect + 6) != NULL, "case '%s': error '%s' lacks '%s'",
				      k->name, e.msg, k->expect + 6);
		}
	}
}
END_TEST

static const char *fake_env(const char *name)
{
	if (strcmp(name, "CAUSEWAY_DATABASE_URL") == 0)
		return "postgresql://from-env/db";
	if (strcmp(name, "CAUSEWAY_SERVER_PORT") == 0)
		return "9999";
	return NULL;
}

START_TEST(environment_overrides_file)
{
	char path[] = "/tmp/cw_conf_XXXXXX";
	int fd = mkstemp(path);
	const char ini[] = "[server]\nport = 1234\nhttp_threads = 3\n";
	ck_assert_int_eq(write(fd, ini, sizeof(ini) - 1), (ssize_t)(sizeof(ini) - 1));
	close(fd);
	struct cw_config c;
	cw_errmsg e;
	ck_assert_int_eq(cfg_load(&c, path, fake_env, &e), CW_OK);
	unlink(path);
	ck_assert_int_eq(c.port, 9999);
	ck_assert_int_eq(c.http_threads, 3);
	ck_assert_str_eq(c.db_url, "postgresql://from-env/db");
	cfg_free(&c);
}
END_TEST

static const char *bad_env(const char *name)
{
	return strcmp(name, "CAUSEWAY_SERVER_PORT") == 0 ? "http" : NULL;
}

START_TEST(bad_environment_value_names_the_variable)
{
	struct cw_config c;
	cw_errmsg e;
	ck_assert_int_eq(cfg_load(&c, NULL, bad_env, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "CAUSEWAY_SERVER_PORT"));
}
END_TEST

/* server.public_url of CFG_PUBLIC_URL_MAX bytes is taken, one more is
 * refused at load (the buffers that hold it are sized from the limit;
 * until the thirty-first session any length was taken, and cut). */
static char long_url[CFG_PUBLIC_URL_MAX + 2];

static const char *long_url_env(const char *name)
{
	if (strcmp(name, "CAUSEWAY_DATABASE_URL") == 0)
		return "postgresql://from-env/db";
	return strcmp(name, "CAUSEWAY_SERVER_PUBLIC_URL") == 0 ? long_url : NULL;
}

START_TEST(public_url_is_bounded)
{
	struct cw_config c;
	cw_errmsg e;
	memset(long_url, 'p', CFG_PUBLIC_URL_MAX);
	memcpy(long_url, "https://causeway.example.org/", 29);
	long_url[CFG_PUBLIC_URL_MAX] = '\0';
	ck_assert_int_eq(cfg_load(&c, NULL, long_url_env, &e), CW_OK);
	ck_assert_uint_eq(cfg_public_url_len(&c), CFG_PUBLIC_URL_MAX);
	cfg_free(&c);
	long_url[CFG_PUBLIC_URL_MAX] = 'p';
	ck_assert_int_eq(cfg_load(&c, NULL, long_url_env, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "server.public_url must be an absolute http or https URL"));
}
END_TEST

/* matrix.id of 255 bytes is taken, one more is refused (the registration's
 * id and the ping's path segment; an INI line cannot hold either, the
 * environment can). */
static char long_id[258];

static const char *long_id_env(const char *name)
{
	if (strcmp(name, "CAUSEWAY_DATABASE_URL") == 0)
		return "postgresql://from-env/db";
	return strcmp(name, "CAUSEWAY_MATRIX_ID") == 0 ? long_id : NULL;
}

START_TEST(matrix_id_is_bounded)
{
	struct cw_config c;
	cw_errmsg e;
	memset(long_id, 'a', 255);
	long_id[255] = '\0';
	ck_assert_int_eq(cfg_load(&c, NULL, long_id_env, &e), CW_OK);
	ck_assert_uint_eq(strlen(c.mx_id), 255);
	cfg_free(&c);
	strcat(long_id, "a");
	ck_assert_int_eq(cfg_load(&c, NULL, long_id_env, &e), CW_EINVAL);
	ck_assert_msg(strstr(e.msg, "matrix.id must be 1 to 255 bytes"), "%s", e.msg);
}
END_TEST

/* cfg_load of len bytes of INI text (NUL bytes included). */
static cw_err load_bytes(struct cw_config *c, const char *ini, size_t len, const char *(*env)(const char *),
			 cw_errmsg *e)
{
	char path[] = "/tmp/cw_conf_XXXXXX";
	int fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, ini, len), (ssize_t)len);
	close(fd);
	cw_err rc = cfg_load(c, path, env, e);
	unlink(path);
	return rc;
}

/* A file with a NUL byte, a UTF-16 one most likely, is refused as such:
 * until the forty-seventh session's review it was "line longer than 199
 * bytes", for fgets's string ended at the NUL, before the newline. */
START_TEST(a_nul_byte_is_refused_as_such)
{
	static const struct {
		const char *ini;
		size_t len;
		int line;
	} cases[] = {
		/* "[database]\nurl = x\n" saved as UTF-16LE, with its byte order mark */
		{ "\xFF\xFE[\0d\0a\0t\0a\0b\0a\0s\0e\0]\0\n\0u\0r\0l\0 \0=\0 \0x\0\n\0", 40, 1 },
		{ "[database]\nurl = postgresql:///x\n; a\0b\n[server]\n", 48, 3 },
		{ "[database]\nurl = postgresql:///x\n[server]\nport = 1\0", 51, 4 }, /* the last line */
	};
	for (size_t i = 0; i < CW_ARRAY_LEN(cases); i++) {
		struct cw_config c;
		cw_errmsg e;
		char want[64];
		ck_assert_int_eq(load_bytes(&c, cases[i].ini, cases[i].len, no_env, &e), CW_EINVAL);
		snprintf(want, sizeof(want), ":%d: the line holds a NUL byte: is the file UTF-16?", cases[i].line);
		ck_assert_msg(strstr(e.msg, want) && strstr(e.msg, "save it as UTF-8"), "case %zu: %s", i, e.msg);
	}
	/* a line of 199 bytes, the most libinih reads, is still read whole */
	char ini[300];
	int n = snprintf(ini, sizeof(ini), "[database]\nurl = postgresql:///x?application_name=%0*d\n", 160, 0);
	struct cw_config c;
	cw_errmsg e;
	ck_assert_int_eq(load_bytes(&c, ini, (size_t)n, no_env, &e), CW_OK);
	ck_assert_uint_eq(strlen("url = ") + strlen(c.db_url), 199);
	cfg_free(&c);
}
END_TEST

static const char *secret_env(const char *name)
{
	if (strcmp(name, "CAUSEWAY_XMPP_SECRET") == 0)
		return "from-env";
	if (strcmp(name, "CAUSEWAY_SERVER_DOMAIN") == 0)
		return "example.org";
	return strcmp(name, "CAUSEWAY_DATABASE_URL") == 0 ? "postgresql://cw@h/db" : NULL;
}

/* The first secret the file itself holds, whatever the environment sets
 * (main.c warns of it when every user may read the file). */
START_TEST(the_file_secret_is_the_files)
{
	static const struct {
		const char *ini;
		const char *secret; /* "section.name", NULL: none */
	} cases[] = {
		{ "[database]\nurl = postgresql:///x\n", NULL },
		{ "[database]\nurl = postgresql://cw:pw@h/x\n", "database.url" },
		{ "[database]\nurl = host=h password=pw\n", "database.url" },
		{ "[admin]\ntoken_sha256 = " "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n", NULL },
		{ "[xmpp]\ncomponents = gk.example.org=gk\nsecret =\n", NULL },
		{ "[xmpp]\ncomponents = gk.example.org=gk\nsecret = s\n", "xmpp.secret" },
		{ "[xmpp]\ncomponents = gk.example.org=gk\nsecret = s\n[server]\ndomain = example.org\n"
		  "[database]\nurl = postgresql://cw:pw@h/x\n",
		  "xmpp.secret" },
	};
	for (size_t i = 0; i < CW_ARRAY_LEN(cases); i++)
		for (int env = 0; env < 2; env++) {
			struct cw_config c;
			cw_errmsg e;
			const char *(*getenv_fn)(const char *) = env ? secret_env : no_env;
			if (!env && !strstr(cases[i].ini, "[database]"))
				continue; /* database.url is required */
			ck_assert_msg(load_bytes(&c, cases[i].ini, strlen(cases[i].ini), getenv_fn, &e) == CW_OK,
				      "case %zu: %s", i, e.msg);
			char got[64] = "";
			if (c.file_secret)
				snprintf(got, sizeof(got), "%s.%s", c.file_secret->section, c.file_secret->name);
			ck_assert_msg(strcmp(got, cases[i].secret ? cases[i].secret : "") == 0, "case %zu env %d: %s", i,
				      env, got);
			cfg_free(&c);
		}
}
END_TEST

static const char *upper_domain_env(const char *name)
{
	return strcmp(name, "CAUSEWAY_SERVER_DOMAIN") == 0 ? "Env.example.org" : NULL;
}

/* A check of the options together (here server.domain's) says where the
 * value it refuses came from, as a single option's check does: the
 * file's line, or the environment's variable that won over it; a
 * default's refusal says neither.  Until the fiftieth session's review
 * it named neither, and the log did not tell which to mend. */
START_TEST(a_refusal_says_where_the_value_came_from)
{
	const char ini[] = "[database]\nurl = x\n\n[server]\ndomain = File.example.org\n";
	struct cw_config c;
	cw_errmsg e;
	ck_assert_int_eq(load_bytes(&c, ini, strlen(ini), no_env, &e), CW_EINVAL);
	const char *at = strstr(e.msg, ":5: server.domain must be");
	ck_assert_msg(at && at > e.msg && strstr(e.msg, "File.example.org"), "%s", e.msg);
	ck_assert_int_eq(load_bytes(&c, ini, strlen(ini), upper_domain_env, &e), CW_EINVAL);
	ck_assert_msg(strncmp(e.msg, "environment CAUSEWAY_SERVER_DOMAIN: server.domain must be", 57) == 0 &&
		      strstr(e.msg, "Env.example.org"), "%s", e.msg);
	/* set empty in the file: that line */
	const char empty_url[] = "[database]\nurl =\n";
	ck_assert_int_eq(load_bytes(&c, empty_url, strlen(empty_url), no_env, &e), CW_EINVAL);
	ck_assert_msg(strstr(e.msg, ":2: database.url is not set"), "%s", e.msg);
	ck_assert_int_eq(cfg_load(&c, NULL, no_env, &e), CW_EINVAL);
	ck_assert_msg(strncmp(e.msg, "database.url is not set", 23) == 0, "%s", e.msg);
}
END_TEST

START_TEST(missing_file_is_an_error)
{
	struct cw_config c;
	cw_errmsg e;
	ck_assert_int_eq(cfg_load(&c, "/nonexistent/causeway.ini", no_env, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "cannot open"));
}
END_TEST

static const char *homeserver_env(const char *name)
{
	if (strcmp(name, "CAUSEWAY_DATABASE_URL") == 0)
		return "postgresql:///x";
	return strcmp(name, "CAUSEWAY_MATRIX_HOMESERVER_URL") == 0 ? "http://127.0.0.1:8008" : NULL;
}

/* --matrix-registration makes the tokens a configuration without them
 * lacks: that check is left out for it (and database.url's being set:
 * tests/integration/test_config.py). */
START_TEST(registration_takes_a_homeserver_without_tokens)
{
	struct cw_config c;
	cw_errmsg e;
	ck_assert_int_eq(cfg_load(&c, NULL, homeserver_env, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "matrix.as_token or matrix.hs_token is not"));
	ck_assert_int_eq(cfg_load_registration(&c, NULL, homeserver_env, &e), CW_OK);
	cfg_free(&c);
	ck_assert_int_eq(cfg_matrix_tokens_check("as", "hs", &e), CW_OK);
	ck_assert_int_eq(cfg_matrix_tokens_check("as", "as", &e), CW_EINVAL);
	ck_assert_int_eq(cfg_matrix_tokens_check("a s", "hs", &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "matrix.as_token has a space"));
}
END_TEST

START_TEST(env_names_follow_section_and_option)
{
	char buf[128];
	cfg_env_name(option_named("database.url"), buf, sizeof(buf));
	ck_assert_str_eq(buf, "CAUSEWAY_DATABASE_URL");
	cfg_env_name(option_named("server.max_body_bytes"), buf, sizeof(buf));
	ck_assert_str_eq(buf, "CAUSEWAY_SERVER_MAX_BODY_BYTES");
}
END_TEST

START_TEST(table_is_well_formed)
{
	for (size_t i = 0; i < cfg_option_count; i++) {
		const struct cfg_option *o = &cfg_options[i];
		ck_assert_msg(o->doc && strlen(o->doc) > 10, "%s.%s has no doc line", o->section, o->name);
		ck_assert_msg(o->def != NULL, "%s.%s has no default", o->section, o->name);
		for (size_t j = 0; j < i; j++)
			ck_assert_msg(strcmp(o->name, cfg_options[j].name) || strcmp(o->section, cfg_options[j].section),
				      "%s.%s listed twice", o->section, o->name);
		if (o->type == CFG_INT || o->type == CFG_SIZE)
			ck_assert_int_le(o->min, o->max);
	}
	/* Every default is valid (cfg_defaults aborts otherwise). */
	struct cw_config c;
	cfg_defaults(&c);
	cfg_free(&c);
}
END_TEST

/* Every number takes both ends of its range (docs/configuration.md's
 * range column, from --list-options) and refuses one past either, naming
 * the option and the range. */
START_TEST(numbers_take_their_range_and_nothing_past_it)
{
	for (size_t i = 0; i < cfg_option_count; i++) {
		const struct cfg_option *o = &cfg_options[i];
		if (o->type != CFG_INT && o->type != CFG_SIZE)
			continue;
		const long values[] = { o->min, o->max, o->min - 1, o->max + 1 };
		for (size_t k = 0; k < 4; k++) {
			struct cw_config c;
			cfg_defaults(&c);
			char v[32], want[160];
			snprintf(v, sizeof(v), "%ld", values[k]);
			cw_errmsg e = { 0 };
			cw_err rc = cfg_set(&c, o->section, o->name, v, &e);
			if (k < 2) {
				ck_assert_msg(rc == CW_OK, "%s.%s = %s refused: %s", o->section, o->name, v, e.msg);
				ck_assert_int_eq(*(const long *)((const char *)&c + o->offset), values[k]);
			} else {
				snprintf(want, sizeof(want), "%s.%s: %ld is out of range %ld..%ld", o->section, o->name,
					 values[k], o->min, o->max);
				ck_assert_msg(rc == CW_EINVAL && strstr(e.msg, want), "%s.%s = %s: %s", o->section,
					      o->name, v, e.msg);
			}
			cfg_free(&c);
		}
	}
}
END_TEST

START_TEST(secrets_are_masked)
{
	struct cw_config c;
	cfg_defaults(&c);
	cw_errmsg e;
	ck_assert_int_eq(cfg_set(&c, "database", "url", "postgresql://u:hunter2@db/x", &e), CW_OK);
	char buf[256];
	cfg_value_text(&c, option_named("database.url"), true, buf, sizeof(buf));
	ck_assert_str_eq(buf, "********");
	cfg_value_text(&c, option_named("database.url"), false, buf, sizeof(buf));
	ck_assert_str_eq(buf, "postgresql://u:hunter2@db/x");
	cfg_free(&c);
}
END_TEST

/* An option's name in the environment is upper case (cfg_env_name); one in
 * another case (CAUSEWAY_server_port) is refused, naming the name it looks
 * like, as a typo is.  Until the thirty-sixth session it was neither
 * applied nor refused, and the default stayed in force without a word.
 * Names of no section of the table stay the tools' (causeway_url). */
START_TEST(an_option_not_in_upper_case_is_refused)
{
	struct cw_config c;
	cw_errmsg e;
	setenv("CAUSEWAY_DATABASE_URL", "postgresql://from-env/db", 1);
	setenv("causeway_url", "http://127.0.0.1:8480", 1);
	setenv("causeway_admin_token", "t", 1);
	ck_assert_int_eq(cfg_load(&c, NULL, NULL, &e), CW_OK);
	cfg_free(&c);
	static const char *const cases[][2] = {
		{ "CAUSEWAY_server_port", "CAUSEWAY_SERVER_PORT" },
		{ "causeway_log_level", "CAUSEWAY_LOG_LEVEL" },
		{ "Causeway_Matrix_As_Token", "CAUSEWAY_MATRIX_AS_TOKEN" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		setenv(cases[i][0], "9000", 1);
		ck_assert_int_eq(cfg_load(&c, NULL, NULL, &e), CW_EINVAL);
		ck_assert_msg(strstr(e.msg, cases[i][0]) && strstr(e.msg, cases[i][1]) && strstr(e.msg, "upper case"),
			      "%s: %s", cases[i][0], e.msg);
		unsetenv(cases[i][0]);
	}
	/* A name of no option in another case is an unknown option, as it is
	 * in upper case. */
	setenv("causeway_server_prot", "9000", 1);
	ck_assert_int_eq(cfg_load(&c, NULL, NULL, &e), CW_EINVAL);
	ck_assert_msg(strstr(e.msg, "environment causeway_server_prot: unknown option"), "%s", e.msg);
	unsetenv("causeway_server_prot");
	ck_assert_int_eq(cfg_load(&c, NULL, NULL, &e), CW_OK);
	cfg_free(&c);
	unsetenv("causeway_url");
	unsetenv("causeway_admin_token");
	unsetenv("CAUSEWAY_DATABASE_URL");
}
END_TEST

START_TEST(reload_takes_only_reloadable_options)
{
	int fd = open("/dev/null", O_WRONLY); /* the restart warnings */
	cw_log_set_fd(fd);
	struct cw_config cur, next;
	cw_errmsg e;
	cfg_defaults(&cur);
	cfg_defaults(&next);
	ck_assert_int_eq(cfg_set(&next, "log", "level", "debug", &e), CW_OK);
	ck_assert_int_eq(cfg_set(&next, "log", "access_log", "false", &e), CW_OK);
	ck_assert_int_eq(cfg_set(&next, "server", "port", "1", &e), CW_OK);
	ck_assert_int_eq(cfg_apply_reload(&cur, &next), 2);
	ck_assert_int_eq(cur.log_level, CW_LOG_DEBUG);
	ck_assert(!cur.access_log);
	ck_assert_int_eq(cur.port, 8480);
	cfg_free(&cur);
	cfg_free(&next);
	cw_log_set_fd(2);
	close(fd);
}
END_TEST

/* The log written while f runs (cw_log to a temporary file), malloc'd. */
static char *log_of(void (*f)(void *), void *arg)
{
	char path[] = "/tmp/check_conf_log.XXXXXX";
	int fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	unlink(path);
	cw_log_set_fd(fd);
	f(arg);
	cw_log_set_fd(2);
	off_t n = lseek(fd, 0, SEEK_END);
	char *text = calloc(1, (size_t)n + 1);
	ck_assert_ptr_nonnull(text);
	ck_assert_int_eq(pread(fd, text, (size_t)n, 0), n);
	close(fd);
	return text;
}

struct reload_case {
	struct cw_config *cur, *next;
	int changed;
};

static void do_reload(void *arg)
{
	struct reload_case *r = arg;
	r->changed = cfg_apply_reload(r->cur, r->next);
}

/* A string option is compared whole: until the forty-fourth session's
 * review only its first 1023 bytes were, so a restart-only one changed
 * after them got no "takes effect after a restart", and a reloadable one
 * changed only there was not taken (and one changed before would have
 * been taken cut to 1023 bytes). */
START_TEST(reload_compares_long_strings_whole)
{
	char v1[2000], v2[2000];
	memcpy(v1, "https://abuse.example/", 22);
	memset(v1 + 22, 'a', sizeof(v1) - 23);
	v1[sizeof(v1) - 1] = '\0';
	memcpy(v2, v1, sizeof(v1));
	v2[1500] = 'b';
	struct cw_config cur, next;
	cw_errmsg e;
	cfg_defaults(&cur);
	cfg_defaults(&next);
	ck_assert_int_eq(cfg_set(&cur, "server", "abuse_contact", v1, &e), CW_OK);
	ck_assert_int_eq(cfg_set(&next, "server", "abuse_contact", v1, &e), CW_OK);
	struct reload_case r = { &cur, &next, -1 };
	char *log = log_of(do_reload, &r); /* the same: nothing said */
	ck_assert_int_eq(r.changed, 0);
	ck_assert_str_eq(log, "");
	free(log);
	ck_assert_int_eq(cfg_set(&next, "server", "abuse_contact", v2, &e), CW_OK);
	log = log_of(do_reload, &r);
	ck_assert_int_eq(r.changed, 0);
	ck_assert_msg(strstr(log, "takes effect after a restart\" option=abuse_contact section=server\n"), "%s", log);
	ck_assert_str_eq(cur.abuse_contact, v1);
	free(log);
	/* A reloadable string (the only one, admin.token_sha256, is 64 hex
	 * digits when the file is checked: set here without the check) is
	 * taken whole, also when it changed only past byte 1023. */
	ck_assert_int_eq(cfg_set(&next, "server", "abuse_contact", v1, &e), CW_OK);
	ck_assert_int_eq(cfg_set(&cur, "admin", "token_sha256", v1, &e), CW_OK);
	ck_assert_int_eq(cfg_set(&next, "admin", "token_sha256", v2, &e), CW_OK);
	log = log_of(do_reload, &r);
	ck_assert_int_eq(r.changed, 1);
	ck_assert_str_eq(cur.admin_token_sha256, v2);
	ck_assert_msg(strstr(log, "msg=\"option reloaded\" section=admin option=token_sha256 value=********\n"), "%s",
		      log);
	free(log);
	cfg_free(&cur);
	cfg_free(&next);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("conf");
	TCase *tc = tcase_create("conf");
	tcase_add_test(tc, table_driven_cases);
	tcase_add_test(tc, environment_overrides_file);
	tcase_add_test(tc, a_nul_byte_is_refused_as_such);
	tcase_add_test(tc, the_file_secret_is_the_files);
	tcase_add_test(tc, bad_environment_value_names_the_variable);
	tcase_add_test(tc, public_url_is_bounded);
	tcase_add_test(tc, missing_file_is_an_error);
	tcase_add_test(tc, a_refusal_says_where_the_value_came_from);
	tcase_add_test(tc, matrix_id_is_bounded);
	tcase_add_test(tc, env_names_follow_section_and_option);
	tcase_add_test(tc, table_is_well_formed);
	tcase_add_test(tc, numbers_take_their_range_and_nothing_past_it);
	tcase_add_test(tc, secrets_are_masked);
	tcase_add_test(tc, reload_takes_only_reloadable_options);
	tcase_add_test(tc, reload_compares_long_strings_whole);
	tcase_add_test(tc, an_option_not_in_upper_case_is_refused);
	tcase_add_test(tc, registration_takes_a_homeserver_without_tokens);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
