/* causewayctl: the operator's command-line client of /admin/v1 (docs/causewayctl.md). */
#include "config.h"
#include "cw.h"
#include "ini_lines.h"
#include "utf8.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <ini.h>
#include <jansson.h>
#include <limits.h>
#include <locale.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <wchar.h>

#define DEFAULT_URL "http://127.0.0.1:8480"
#define CONNECT_TIMEOUT_S 5L
#define TOTAL_TIMEOUT_S 30L
#define BODY_MAX (16L * 1024 * 1024) /* an answer larger than this is refused, not read */
#define PAGE_MAX 500                 /* the API's largest page */
#define LIST_MAX 100000              /* rows one list command gathers when --limit is not given */
#define LIST_BYTES_MAX (32L * 1024 * 1024) /* the rows of a list's pages held at once, as compact JSON */
#define CELL_MAX 64                  /* columns shown of one table cell (--json shows all) */
#define TOKEN_LINE_MAX 512           /* a token file's first line; tokens are under 128 bytes */
#define DESTINATION_MAX 299           /* an outbox destination's bytes (GET /admin/v1/outbox) */
#define QUERY_MAX 8                  /* name=value pairs of one request */
#define COLS_MAX 10
#define KEY_WIDTH 13                 /* the key column of status and trace */
#define READ_TRIES 4                 /* a read answered 503/429 with Retry-After: asked up to this often */
#define RETRY_WAIT_MAX_S 10          /* the longest Retry-After waited for; a longer one is a refusal */
/* The daemon writes reals with 6 significant digits; 15 prints every such
 * number back as it came (jansson's default 17 turns 8.1 into 8.0999…). */
#define JSON_OUT_FLAGS (JSON_INDENT(2) | JSON_REAL_PRECISION(15))

/* Every fallible function returns the exit status it leads to, since that
 * is what scripts read (docs/causewayctl.md); the reason goes into
 * ctl->err, like cw_err and cw_errmsg in the daemon. */
enum ctl_rc {
	CTL_OK = 0,
	CTL_EREFUSED = 1,    /* the API refused, or gave an answer that cannot be used */
	CTL_EUSAGE = 2,      /* the command line, the environment or a settings file is wrong */
	CTL_EUNREACHABLE = 3 /* no answer: refused connection, unknown host, timeout */
};

/* Options a command accepts besides the global ones. */
enum {
	OPT_ROLE = 1 << 0,   /* --role */
	OPT_FILTER = 1 << 1, /* --action, --actor, --message */
	OPT_PAGE = 1 << 2,   /* --limit, --after */
	OPT_KEY = 1 << 3,    /* --key */
	OPT_PEER = 1 << 4,   /* --push-url, --pull, --event-types */
	OPT_RULE = 1 << 5,   /* --mode, --limits, --comment, --expires-in */
	OPT_OPEN = 1 << 6,   /* --open */
	OPT_OUTBOX = 1 << 7, /* --state, --destination */
};
/* The options of each OPT_* bit, for "takes no ..." (in bit order). */
static const char *const opt_names[] = { "--role", "--action, --actor or --message", "--limit or --after", "--key",
					 "--push-url, --pull or --event-types",
					 "--mode, --limits, --comment or --expires-in", "--open",
					 "--state or --destination" };

struct ctl {
	char *url;       /* the base URL, without a trailing '/'; owned (curl_free) */
	char *shown_url; /* the same without any user:password, for messages; owned (curl_free) */
	bool plain;      /* the URL is http://: asked directly, never through a proxy */
	bool clear;      /* plain, to a host not on this machine's loopback: warned of once */
	char *token;     /* owned; never printed */
	char *ca_file;   /* owned; NULL: the system's CAs only */
	bool json;
	unsigned given;  /* the command options given (OPT_*) */
	const char *role, *action, *actor, *message;
	const char *key, *push_url, *event_types; /* peers add, peers rotate */
	bool pull;
	bool open;                           /* reports: the open ones only */
	const char *state, *destination;     /* outbox */
	const char *mode, *limits, *comment; /* rules add */
	json_t *types_json, *limits_json;    /* --event-types, --limits as read by the command's check; owned */
	long long expires_in;                /* rules add; 0: never */
	long limit;      /* 0: every row (up to LIST_MAX) */
	long long after;
	CURL *curl;
	char *err; /* the reason of a failure, as long as it is; owned; NULL: none, or no memory for it */
};

/* An answer of the daemon, whatever its status. */
struct answer {
	long status;
	long retry_after; /* its Retry-After in seconds (a date made a delay by libcurl); 0: none */
	char *location;   /* a redirect's target (never followed: the token would go along), whole; owned; NULL if none */
	json_t *body;     /* NULL when the answer was empty or not a JSON object; the caller frees with json_decref */
	bool not_json;    /* the body was not empty, and not a JSON object (a proxy's page, say) */
};

static void defang(char *s);

/* fmt formatted, as long as it is; NULL when out of memory.  The caller
 * frees it. */
__attribute__((format(printf, 1, 0))) static char *vformat(const char *fmt, va_list ap)
{
	va_list again;
	va_copy(again, ap);
	int n = vsnprintf(NULL, 0, fmt, ap);
	char *s = n >= 0 ? malloc((size_t)n + 1) : NULL;
	if (s)
		vsnprintf(s, (size_t)n + 1, fmt, again);
	va_end(again);
	return s;
}

/* Formats the reason into c->err, whole, and returns rc.  Control
 * characters become '?', as the reason may quote what the daemon said:
 * the C0 and C1 ones, DEL and the bidirectional overrides, by defang, as
 * in a table cell (until the fortieth session only C0 and DEL were).
 * Until the fiftieth session's review the reason was cut at 511 bytes
 * without a mark, and a refusal's at 399: a long detail or redirect
 * target lost its end unseen. */
__attribute__((format(printf, 3, 4))) static enum ctl_rc fail(struct ctl *c, enum ctl_rc rc, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	free(c->err);
	c->err = vformat(fmt, ap); /* NULL: main says "out of memory" */
	va_end(ap);
	for (unsigned char *p = (unsigned char *)c->err; p && *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			*p = '?';
	if (c->err)
		defang(c->err);
	return rc;
}

/* ------------------------------------------------------------ settings */

/* url, token, token_file and ca_file from one source (flags, environment or file). */
struct source {
	char *url, *token, *token_file, *ca_file; /* owned */
};

static void source_free(struct source *s)
{
	free(s->url);
	free(s->token);
	free(s->token_file);
	free(s->ca_file);
}

struct file_parse {
	struct source *s;
	const char *path; /* the file's: its token_file and ca_file are relative to its directory */
	char bad[160];    /* the first unknown setting */
	unsigned seen;    /* the settings met, by their slot's bit */
};

static int ini_entry(void *user, const char *section, const char *name, const char *value)
{
	struct file_parse *f = user;
	char **slot = NULL;
	if (strcmp(section, "causewayctl") == 0) {
		if (strcmp(name, "url") == 0)
			slot = &f->s->url;
		else if (strcmp(name, "token") == 0)
			slot = &f->s->token;
		else if (strcmp(name, "token_file") == 0)
			slot = &f->s->token_file;
		else if (strcmp(name, "ca_file") == 0)
			slot = &f->s->ca_file;
	}
	if (!slot) {
		if (!f->bad[0])
			snprintf(f->bad, sizeof(f->bad), "unknown setting '%.40s' in [%.40s] (known: [causewayctl] "
				 "url, token, token_file, ca_file)", name, section);
		return 0;
	}
	/* A setting given twice (a url pasted below the first): which one
	 * was meant is a guess, and the last one won until the forty-seventh
	 * session's review, as the daemon's own file did until its
	 * thirty-second. */
	unsigned bit = 1u << (slot == &f->s->url ? 0 : slot == &f->s->token ? 1 : slot == &f->s->token_file ? 2 : 3);
	if (f->seen & bit) {
		if (!f->bad[0])
			snprintf(f->bad, sizeof(f->bad), "'%s' is set twice; keep one", name);
		return 0;
	}
	f->seen |= bit;
	free(*slot);
	/* A relative file is the settings file's neighbour, not one of the
	 * working directory, which may be anyone's (/tmp): a ca_file found
	 * there would trust their CA (until the forty-fifth session's review
	 * token_file was looked for there). */
	const char *dir_end = strrchr(f->path, '/');
	int dir_len = dir_end ? (int)(dir_end - f->path) + 1 : 0;
	if (*value && *value != '/' && (slot == &f->s->token_file || slot == &f->s->ca_file) && dir_len) {
		size_t n = (size_t)dir_len + strlen(value) + 1;
		if ((*slot = malloc(n)))
			snprintf(*slot, n, "%.*s%s", dir_len, f->path, value);
	} else {
		*slot = *value ? strdup(value) : NULL;
	}
	if (*value && !*slot)
		snprintf(f->bad, sizeof(f->bad), "out of memory");
	return !*value || *slot;
}

/* A secret should be the operator's alone; say so rather than refuse, as
 * some setups share a group on purpose. */
static void warn_if_shared(const char *path, const char *what)
{
	struct stat st;
	if (stat(path, &st) == 0 && (st.st_mode & 077))
		fprintf(stderr, "causewayctl: warning: %s holds %s and other users may read it (chmod 600 %s)\n", path,
			what, path);
}

/* The settings file: the explicit one must exist; the default one may not. */
static enum ctl_rc read_file(struct ctl *c, const char *path, bool explicit, struct source *s)
{
	struct stat st;
	if (stat(path, &st) != 0) {
		if (!explicit && errno == ENOENT)
			return CTL_OK;
		return fail(c, CTL_EUSAGE, "cannot read %s: %s", path, strerror(errno));
	}
	/* libinih reads a directory as an empty file: its settings were
	 * ignored without a word (until the forty-first session). */
	if (S_ISDIR(st.st_mode))
		return fail(c, CTL_EUSAGE, "cannot read %s: %s", path, strerror(EISDIR));
	/* Its lines are read as the daemon reads its configuration's
	 * (ini_lines.h): until the forty-seventh session's review a line past
	 * libinih's 200 bytes was read as two, an indented line as more of the
	 * one above, and what followed "[causewayctl]" on its line was
	 * dropped ("[causewayctl] url = ..." left the default URL). */
	FILE *in = fopen(path, "r");
	if (!in)
		return fail(c, CTL_EUSAGE, "cannot read %s: %s", path, strerror(errno));
	struct file_parse f = { .s = s, .path = path };
	struct ini_lines lines = { .f = in };
	int line = ini_parse_stream(ini_lines_read, &lines, ini_entry, &f);
	fclose(in);
	if (lines.read_errno)
		return fail(c, CTL_EUSAGE, "cannot read %s: %s", path, strerror(lines.read_errno));
	if (lines.refusal && line == 0) /* an error before that line is said below */
		return fail(c, CTL_EUSAGE, "%s:%d: %s", path, lines.line,
			    lines.refusal == INI_LINE_OVERLONG ? "the line is longer than the INI parser (libinih) reads"
			    : lines.refusal == INI_LINE_AFTER_SECTION ? "text after the section's ']': put each setting "
									"on a line of its own"
			    : lines.refusal == INI_LINE_NUL ? INI_LINE_NUL_HINT
			    : "';' after a space starts a comment here and would cut the value");
	if (line < 0)
		return fail(c, CTL_EUSAGE, "cannot read %s: out of memory", path);
	if (line > 0)
		return fail(c, CTL_EUSAGE, "%s:%d: %s", path, line, f.bad[0] ? f.bad : "not an INI line");
	if (s->token)
		warn_if_shared(path, "a token");
	/* Whoever may write it may set url to a host of theirs, and be sent
	 * the token, from wherever it comes (until the fortieth session this
	 * went unsaid). */
	if (st.st_mode & 022)
		fprintf(stderr, "causewayctl: warning: %s may be changed by other users, and with it where the token "
			"is sent (chmod 600 %s)\n", path, path);
	/* Its owner may change it whatever its mode (until the forty-fifth
	 * session's review only the mode was looked at); root may anyway. */
	else if (st.st_uid != geteuid() && st.st_uid != 0)
		fprintf(stderr, "causewayctl: warning: %s belongs to another user (uid %lu), who may change it and "
			"with it where the token is sent\n", path, (unsigned long)st.st_uid);
	return CTL_OK;
}

static enum ctl_rc default_config(struct ctl *c, char **out)
{
	const char *xdg = getenv("XDG_CONFIG_HOME"), *home = getenv("HOME");
	*out = NULL;
	/* The XDG base directory spec: a relative XDG_CONFIG_HOME is ignored. */
	const char *base = xdg && xdg[0] == '/' ? xdg : home && *home ? home : NULL;
	if (!base)
		return CTL_OK;
	const char *rest = base == xdg ? "/causeway/causewayctl.ini" : "/.config/causeway/causewayctl.ini";
	size_t n = strlen(base) + strlen(rest) + 1;
	if (!(*out = malloc(n)))
		return fail(c, CTL_EREFUSED, "out of memory");
	snprintf(*out, n, "%s%s", base, rest);
	return CTL_OK;
}

/* The first line of path, without the line end and trailing blanks, and
 * without a UTF-8 byte order mark before it (an editor's, which no token
 * has; the settings file's is skipped alike, by libinih): until the
 * fiftieth session's review the token was refused as having "blanks or
 * control characters", naming neither the file nor the mark.  A file
 * saved as UTF-16 is refused, saying so. */
static enum ctl_rc read_token_file(struct ctl *c, const char *path, char **out)
{
	FILE *f = fopen(path, "r");
	if (!f)
		return fail(c, CTL_EUSAGE, "cannot read the token file %s: %s", path, strerror(errno));
	char line[TOKEN_LINE_MAX];
	errno = 0;
	bool got = fgets(line, sizeof(line), f) != NULL;
	int err = !got && ferror(f) ? (errno ? errno : EIO) : 0; /* a directory: EISDIR */
	fclose(f);
	if (err)
		return fail(c, CTL_EUSAGE, "cannot read the token file %s: %s", path, strerror(err));
	size_t n = got ? strlen(line) : 0;
	if (n == sizeof(line) - 1 && line[n - 1] != '\n')
		return fail(c, CTL_EUSAGE, "the token file %s: the first line is too long for a token", path);
	if (n >= 2 && (memcmp(line, "\xff\xfe", 2) == 0 || memcmp(line, "\xfe\xff", 2) == 0))
		return fail(c, CTL_EUSAGE, "the token file %s is UTF-16 text (it starts with a UTF-16 byte order "
			    "mark): save it as UTF-8 or ASCII", path);
	size_t bom = n >= 3 && memcmp(line, "\xef\xbb\xbf", 3) == 0 ? 3 : 0;
	while (n > bom && strchr(" \t\r\n", line[n - 1]))
		line[--n] = '\0';
	if (n == bom)
		return fail(c, CTL_EUSAGE, "the token file %s holds no token on its first line", path);
	warn_if_shared(path, "a token");
	if (!(*out = strdup(line + bom)))
		return fail(c, CTL_EREFUSED, "out of memory");
	return CTL_OK;
}

/* One source's token: the token itself or its file, not both. */
static enum ctl_rc source_token(struct ctl *c, const struct source *s, const char *where, char **out)
{
	*out = NULL;
	if (s->token && s->token_file)
		return fail(c, CTL_EUSAGE, "%s gives both a token and a token file: keep one", where);
	if (s->token_file)
		return read_token_file(c, s->token_file, out);
	if (s->token && !(*out = strdup(s->token)))
		return fail(c, CTL_EREFUSED, "out of memory");
	return CTL_OK;
}

/* A token goes into a header: it must be one visible ASCII word. */
static bool token_valid(const char *t)
{
	for (; *t; t++)
		if (*t < 0x21 || *t > 0x7e)
			return false;
	return true;
}

/* "http://h/base/" -> "http://h/base", as the API paths are appended. */
static void chop_slashes(char *s)
{
	size_t n = s ? strlen(s) : 0;
	while (n && s[n - 1] == '/')
		s[--n] = '\0';
}

/* host (as libcurl gives it: an IPv6 address in brackets) names this
 * machine's loopback: localhost or a name under it (RFC 6761), 127.0.0.0/8,
 * ::1.  Any other host is reached over a network. */
static bool host_is_loopback(const char *host)
{
	size_t n = strlen(host);
	if (strcasecmp(host, "localhost") == 0 || (n > 10 && strcasecmp(host + n - 10, ".localhost") == 0))
		return true;
	if (strcmp(host, "[::1]") == 0)
		return true;
	struct in_addr a;
	return inet_pton(AF_INET, host, &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

/* The base URL: http or https, no query or fragment. */
static enum ctl_rc set_url(struct ctl *c, const char *url, const char *where)
{
	CURLU *u = curl_url();
	char *scheme = NULL, *query = NULL, *frag = NULL;
	enum ctl_rc rc = CTL_OK;
	if (!u)
		return fail(c, CTL_EREFUSED, "out of memory");
	if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
	    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
	    (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0))
		rc = fail(c, CTL_EUSAGE, "%s: '%s' is not an http:// or https:// URL", where, url);
	else if (curl_url_get(u, CURLUPART_QUERY, &query, 0) == CURLUE_OK ||
		 curl_url_get(u, CURLUPART_FRAGMENT, &frag, 0) == CURLUE_OK)
		rc = fail(c, CTL_EUSAGE, "%s: the daemon's URL takes no ?query or #fragment", where);
	else if (curl_url_get(u, CURLUPART_URL, &c->url, 0) != CURLUE_OK ||
		 curl_url_set(u, CURLUPART_USER, NULL, 0) != CURLUE_OK ||
		 curl_url_set(u, CURLUPART_PASSWORD, NULL, 0) != CURLUE_OK ||
		 curl_url_get(u, CURLUPART_URL, &c->shown_url, 0) != CURLUE_OK)
		rc = fail(c, CTL_EREFUSED, "out of memory");
	if (!rc)
		c->plain = strcmp(scheme, "http") == 0;
	if (!rc && c->plain) {
		char *host = NULL;
		if (curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK)
			c->clear = !host_is_loopback(host);
		curl_free(host);
	}
	curl_free(scheme);
	curl_free(query);
	curl_free(frag);
	curl_url_cleanup(u);
	chop_slashes(c->url);
	chop_slashes(c->shown_url);
	return rc;
}

/* The CA file an https:// daemon's certificate must chain to instead of
 * the system's bundle (a private CA of the reverse proxy): checked here,
 * as libcurl would say only "cannot reach". */
static enum ctl_rc pick_ca_file(struct ctl *c, const char *path)
{
	struct stat st;
	if (!path)
		return CTL_OK;
	FILE *f = fopen(path, "r");
	int err = !f ? errno : fstat(fileno(f), &st) != 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
	if (f)
		fclose(f);
	if (err)
		return fail(c, CTL_EUSAGE, "cannot read the CA file %s: %s", path, strerror(err));
	if (!(c->ca_file = strdup(path)))
		return fail(c, CTL_EREFUSED, "out of memory");
	return CTL_OK;
}

/* The URL and the token: flags, else the environment, else the file. */
static enum ctl_rc resolve(struct ctl *c, struct source *flags, const char *config)
{
	struct source env = { 0 }, file = { 0 };
	char *path = NULL, *t_flag = NULL, *t_env = NULL, *t_file = NULL;
	const char *e;
	enum ctl_rc rc = CTL_OK;
	if ((e = getenv("CAUSEWAY_URL")) && *e && !(env.url = strdup(e)))
		rc = fail(c, CTL_EREFUSED, "out of memory");
	if (!rc && (e = getenv("CAUSEWAY_ADMIN_TOKEN")) && *e && !(env.token = strdup(e)))
		rc = fail(c, CTL_EREFUSED, "out of memory");
	if (!rc && (e = getenv("CAUSEWAY_CA_FILE")) && *e && !(env.ca_file = strdup(e)))
		rc = fail(c, CTL_EREFUSED, "out of memory");
	if (!rc && !config)
		rc = default_config(c, &path);
	if (!rc && (config || path))
		rc = read_file(c, config ? config : path, config != NULL, &file);
	const char *where = config ? config : path;
	if (!rc)
		rc = source_token(c, flags, "the command line", &t_flag);
	if (!rc && !t_flag)
		rc = source_token(c, &env, "the environment", &t_env);
	if (!rc)
		rc = pick_ca_file(c, flags->ca_file ? flags->ca_file : env.ca_file ? env.ca_file : file.ca_file);
	if (!rc && !t_flag && !t_env)
		rc = source_token(c, &file, where, &t_file);
	if (!rc) {
		const char *url = flags->url ? flags->url : env.url ? env.url : file.url ? file.url : DEFAULT_URL;
		const char *from = flags->url ? "--url" : env.url ? "CAUSEWAY_URL" : file.url ? where : "the default";
		rc = set_url(c, url, from);
	}
	if (!rc) {
		char **chosen = t_flag ? &t_flag : t_env ? &t_env : &t_file;
		c->token = *chosen; /* taken over; the others are freed below */
		*chosen = NULL;
		if (!c->token)
			rc = fail(c, CTL_EUSAGE, "no admin token: give --token-file FILE (or --token), set "
				  "CAUSEWAY_ADMIN_TOKEN, or put token_file = FILE in %s",
				  where ? where : "~/.config/causeway/causewayctl.ini");
		else if (!token_valid(c->token))
			rc = fail(c, CTL_EUSAGE, "the admin token has characters no token has (blanks or control "
				  "characters)");
	}
	free(t_flag);
	free(t_env);
	free(t_file);
	free(path);
	source_free(&env);
	source_free(&file);
	return rc;
}

/* ------------------------------------------------------------ HTTP */

/* The answer's body, read up to BODY_MAX. */
struct sink {
	char *p;
	size_t len, cap;
	bool too_large, no_memory;
};

static size_t sink_write(char *data, size_t size, size_t n, void *arg)
{
	struct sink *s = arg;
	size_t add = size * n; /* curl passes size 1 */
	if (add > (size_t)BODY_MAX - s->len) {
		s->too_large = true;
		return 0;
	}
	if (s->len + add + 1 > s->cap) {
		size_t cap = s->cap ? s->cap : 16384;
		while (cap < s->len + add + 1)
			cap *= 2;
		char *p = realloc(s->p, cap);
		if (!p) {
			s->no_memory = true;
			return 0;
		}
		s->p = p;
		s->cap = cap;
	}
	memcpy(s->p + s->len, data, add);
	s->len += add;
	s->p[s->len] = '\0';
	return add;
}

/* path (escaped already) under the base URL, with the query pairs of q
 * (name, value, ..., NULL; a NULL value leaves its pair out) encoded by
 * curl.  The caller frees *out with curl_free. */
static enum ctl_rc make_url(struct ctl *c, const char *path, const char *const *q, char **out)
{
	*out = NULL;
	size_t n = strlen(c->url) + strlen(path) + 1;
	char *full = malloc(n);
	CURLU *u = curl_url();
	enum ctl_rc rc = CTL_OK;
	if (!full || !u) {
		rc = fail(c, CTL_EREFUSED, "out of memory");
		goto out;
	}
	snprintf(full, n, "%s%s", c->url, path);
	if (curl_url_set(u, CURLUPART_URL, full, 0) != CURLUE_OK) {
		rc = fail(c, CTL_EUSAGE, "cannot make a URL of %s and %s", c->shown_url, path);
		goto out;
	}
	for (int i = 0; q && q[i]; i += 2) {
		if (!q[i + 1])
			continue;
		size_t m = strlen(q[i]) + strlen(q[i + 1]) + 2;
		char *pair = malloc(m);
		if (!pair) {
			rc = fail(c, CTL_EREFUSED, "out of memory");
			goto out;
		}
		snprintf(pair, m, "%s=%s", q[i], q[i + 1]);
		CURLUcode uc = curl_url_set(u, CURLUPART_QUERY, pair, CURLU_APPENDQUERY | CURLU_URLENCODE);
		free(pair);
		if (uc != CURLUE_OK) {
			rc = fail(c, CTL_EREFUSED, "cannot add %s to the URL: %s", q[i], curl_url_strerror(uc));
			goto out;
		}
	}
	if (curl_url_get(u, CURLUPART_URL, out, 0) != CURLUE_OK)
		rc = fail(c, CTL_EREFUSED, "out of memory");
out:
	curl_url_cleanup(u);
	free(full);
	return rc;
}

/* A change that was sent and got no answer of the daemon (why: what came
 * instead): it may have been done (docs/causewayctl.md, exit status 3). */
static enum ctl_rc unanswered(struct ctl *c, const char *method, const char *path, const char *why)
{
	return fail(c, CTL_EUNREACHABLE, "no answer to %s %s from %s (%s): it was sent and may have been done; look "
		    "before you repeat it (causewayctl audit shows what was done)", method, path, c->shown_url, why);
}

/* One request: CTL_OK with the answer, whatever its status.  auth: send
 * the bearer token (every route but /readyz). */
static enum ctl_rc http_call(struct ctl *c, const char *method, const char *path, const char *const *q,
			     const json_t *send, bool auth, struct answer *a)
{
	a->status = 0;
	a->retry_after = 0;
	a->location = NULL;
	a->body = NULL;
	a->not_json = false;
	char *url = NULL, *body = NULL;
	struct curl_slist *headers = NULL, *h;
	struct sink s = { 0 };
	enum ctl_rc rc = make_url(c, path, q, &url);
	if (rc)
		return rc;
	if (send && !(body = json_dumps(send, JSON_COMPACT))) {
		rc = fail(c, CTL_EREFUSED, "out of memory");
		goto out;
	}
	headers = curl_slist_append(NULL, "Accept: application/json, application/problem+json");
	if (headers && send) {
		/* NULL when out of memory, with the list left as it was */
		if (!(h = curl_slist_append(headers, "Content-Type: application/json")))
			curl_slist_free_all(headers);
		headers = h;
	}
	if (!headers) {
		rc = fail(c, CTL_EREFUSED, "out of memory");
		goto out;
	}
	CURL *k = c->curl;
	curl_easy_reset(k); /* keeps the connection for the next request */
	curl_easy_setopt(k, CURLOPT_URL, url);
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(k, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	curl_easy_setopt(k, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	/* Over http:// a proxy of the environment (http_proxy, all_proxy,
	 * which libcurl follows by default) would get the bearer token in
	 * clear: another party, which may log it.  Until the fortieth session
	 * the token went to one even for the loopback default URL.  Over
	 * https:// a proxy only tunnels (CONNECT) and sees the host. */
	if (c->plain)
		curl_easy_setopt(k, CURLOPT_PROXY, "");
	if (c->ca_file) /* the CA bundle (the peer and its name are verified: libcurl's default) */
		curl_easy_setopt(k, CURLOPT_CAINFO, c->ca_file);
	curl_easy_setopt(k, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(k, CURLOPT_CONNECTTIMEOUT, CONNECT_TIMEOUT_S);
	curl_easy_setopt(k, CURLOPT_TIMEOUT, TOTAL_TIMEOUT_S);
	curl_easy_setopt(k, CURLOPT_USERAGENT, "causewayctl/" PACKAGE_VERSION);
	curl_easy_setopt(k, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(k, CURLOPT_WRITEFUNCTION, sink_write);
	curl_easy_setopt(k, CURLOPT_WRITEDATA, &s);
	curl_easy_setopt(k, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)BODY_MAX);
	if (auth && c->clear) {
		/* Until the forty-first session said only in docs/causewayctl.md:
		 * a token sent so can be read (and used) by anyone on the way. */
		fprintf(stderr,
			"causewayctl: warning: %s is http:// to another machine: the admin token crosses the "
			"network in clear; use https:// (docs/causewayctl.md)\n",
			c->shown_url);
		c->clear = false; /* once */
	}
	if (auth) {
		curl_easy_setopt(k, CURLOPT_HTTPAUTH, CURLAUTH_BEARER);
		curl_easy_setopt(k, CURLOPT_XOAUTH2_BEARER, c->token);
	}
	if (strcmp(method, "POST") == 0) {
		curl_easy_setopt(k, CURLOPT_POSTFIELDSIZE, body ? (long)strlen(body) : 0L);
		curl_easy_setopt(k, CURLOPT_POSTFIELDS, body ? body : "");
	} else if (strcmp(method, "GET") != 0) {
		curl_easy_setopt(k, CURLOPT_CUSTOMREQUEST, method);
	}
	CURLcode cr = curl_easy_perform(k);
	if (s.too_large || cr == CURLE_FILESIZE_EXCEEDED) {
		rc = fail(c, CTL_EREFUSED, "the answer to %s %s is larger than %ld MiB", method, path, BODY_MAX >> 20);
		goto out;
	}
	if (s.no_memory) {
		rc = fail(c, CTL_EREFUSED, "out of memory");
		goto out;
	}
	if (cr != CURLE_OK) {
		/* A change whose request went out may have been done though no
		 * answer came (the daemon stopped, a proxy or the total timeout
		 * gave up): saying "cannot reach" sent the operator to repeat it,
		 * and a token made so is never shown (a repeat is 409).  Until
		 * the thirty-sixth session every such failure was "cannot
		 * reach". */
		long sent = 0;
		if (strcmp(method, "GET") != 0 && curl_easy_getinfo(k, CURLINFO_REQUEST_SIZE, &sent) == CURLE_OK &&
		    sent > 0)
			rc = unanswered(c, method, path, curl_easy_strerror(cr));
		else
			rc = fail(c, CTL_EUNREACHABLE, "cannot reach %s: %s%s", c->shown_url, curl_easy_strerror(cr),
				  cr == CURLE_PEER_FAILED_VERIFICATION ? " (its certificate is not of a CA trusted here, "
				  "or not for this host name; --ca-file FILE names a CA of your own)" : "");
		goto out;
	}
	curl_easy_getinfo(k, CURLINFO_RESPONSE_CODE, &a->status);
	char *to = NULL;
	if (curl_easy_getinfo(k, CURLINFO_REDIRECT_URL, &to) == CURLE_OK && to && !(a->location = strdup(to))) {
		rc = fail(c, CTL_EREFUSED, "out of memory");
		goto out;
	}
	curl_off_t wait = 0;
	if (curl_easy_getinfo(k, CURLINFO_RETRY_AFTER, &wait) == CURLE_OK && wait > 0)
		a->retry_after = wait > LONG_MAX ? LONG_MAX : (long)wait;
	if (s.len) {
		json_error_t je;
		a->body = json_loadb(s.p, s.len, 0, &je);
		if (!a->body || !json_is_object(a->body)) {
			json_decref(a->body);
			a->body = NULL;
			a->not_json = true;
			/* A refusal without a problem document (a proxy's 502 page, say)
			 * is still a refusal, described by its status. */
			if (a->status >= 200 && a->status <= 299)
				rc = fail(c, CTL_EREFUSED, "the answer to %s %s (HTTP %ld) is not a JSON object: is %s "
					  "causewayd?", method, path, a->status, c->shown_url);
		}
	}
out:
	if (rc) {
		free(a->location);
		a->location = NULL;
	}
	curl_slist_free_all(headers);
	curl_free(url);
	free(body);
	free(s.p);
	return rc;
}

static const char *jstr(const json_t *o, const char *key)
{
	return json_string_value(json_object_get(o, key));
}

/* The string member, or "?" when it is not one. */
static const char *jstr_or(const json_t *o, const char *key)
{
	const char *s = jstr(o, key);
	return s ? s : "?";
}

/* The length of what defang replaces at p (NUL-terminated; 0: nothing),
 * *cp its code point: a character cw_utf8_display_control names, the
 * list log.c escapes too (a C0 control or DEL, 1 byte; a C1 control, 2; a
 * bidirectional control or mark, 2 or 3; until the forty-fourth session's
 * review the marks U+200E, U+200F and U+061C were not among them here,
 * until the forty-fifth the line and paragraph separators). */
static size_t control_at(const unsigned char *p, unsigned *cp)
{
	size_t n = cw_utf8_seq(p, strnlen((const char *)p, 4), cp);
	return n && cw_utf8_display_control(*cp) ? n : 0;
}

/* --json: the answer as it is, for scripts, but what could drive the
 * terminal or reorder what it shows is written as a \u escape (jansson
 * escapes the C0 controls only): the same JSON once parsed.  Such
 * characters can only be in a string (the rest of the text is ASCII), where
 * the escape means them.  Until the forty-third session a rule's comment,
 * a delivery's last error or a report's comment went out raw here. */
static void print_json(const json_t *j)
{
	char *s = json_dumps(j, JSON_OUT_FLAGS);
	if (!s)
		return;
	for (const unsigned char *p = (const unsigned char *)s; *p;) {
		unsigned cp;
		size_t n = *p == '\n' ? 0 : control_at(p, &cp);
		if (!n) {
			putchar(*p++);
			continue;
		}
		printf("\\u%04x", cp);
		p += n;
	}
	putchar('\n');
	free(s);
}

/* A refusal in one line, whole ("401 unauthenticated: a valid admin
 * bearer ..."), then more (after "", " (asked 4 times ...)"): into c->err
 * as fail does, returning CTL_EREFUSED.  Until the fiftieth session's
 * review it was cut at 399 bytes without a mark, a redirect's target at
 * 200: the URL to give with --url was shown cut. */
static enum ctl_rc refusal(struct ctl *c, const struct answer *a, const char *prefix, const char *more)
{
	const char *code = jstr(a->body, "code"), *detail = jstr(a->body, "detail");
	if (code && detail)
		return fail(c, CTL_EREFUSED, "%s%ld %s: %s%s", prefix, a->status, code, detail, more);
	if (a->location) /* an http:// URL a proxy sends to https://, say */
		return fail(c, CTL_EREFUSED, "%s%ld: %s redirects to %s, which causewayctl does not follow (the token "
			    "would go along); if that is the daemon, give its URL with --url%s", prefix, a->status,
			    c->shown_url, a->location, more);
	return fail(c, CTL_EREFUSED, "%s%ld without a problem document: is %s causewayd?%s", prefix, a->status,
		    c->shown_url, more);
}

static void answer_free(struct answer *a)
{
	json_decref(a->body);
	free(a->location);
}

/* A call that must succeed: a refusal becomes CTL_EREFUSED with the
 * problem's status, code and detail as the reason (and, with --json, the
 * problem document on stdout for scripts).  *out is the answer's object;
 * the caller frees it with json_decref. */
static enum ctl_rc api(struct ctl *c, const char *method, const char *path, const char *const *q, const json_t *send,
		       json_t **out)
{
	struct answer a;
	*out = NULL;
	enum ctl_rc rc;
	int tries = 1;
	/* A read the daemon cannot answer yet (503 with Retry-After: a list of
	 * records waiting for a writer of its table, the database away; 429)
	 * is asked again after the wait it names, a few times: one such
	 * answer failed a whole export of the audit log (until the
	 * forty-fifth session's review).  A change is never repeated so: it
	 * may have been done. */
	for (;; tries++) {
		if ((rc = http_call(c, method, path, q, send, true, &a)))
			return rc;
		if (strcmp(method, "GET") != 0 || (a.status != 503 && a.status != 429) || !a.retry_after ||
		    a.retry_after > RETRY_WAIT_MAX_S || tries == READ_TRIES)
			break;
		answer_free(&a);
		sleep((unsigned)a.retry_after);
	}
	/* A gateway's 502 or 504 without the daemon's problem document (a
	 * reverse proxy whose upstream timed out or went away) is no answer
	 * of the daemon: a change it passed on may have been done, as when
	 * the connection closes unanswered (http_call).  Until the
	 * forty-seventh session's review it was exit 1, "is URL causewayd?",
	 * and the operator repeated a change that had been made (a token
	 * made so is never shown). */
	if (strcmp(method, "GET") != 0 && (a.status == 502 || a.status == 504) && !jstr(a.body, "code")) {
		char why[64];
		snprintf(why, sizeof(why), "a gateway answered %ld", a.status);
		answer_free(&a);
		return unanswered(c, method, path, why);
	}
	if (a.status < 200 || a.status > 299) {
		char more[80] = "";
		if (tries > 1)
			snprintf(more, sizeof(more), " (asked %d times, as Retry-After said)", tries);
		else if (strcmp(method, "GET") == 0 && (a.status == 503 || a.status == 429) &&
			 a.retry_after > RETRY_WAIT_MAX_S)
			snprintf(more, sizeof(more), " (Retry-After %ld s, longer than causewayctl waits)",
				 a.retry_after);
		if (c->json && a.body)
			print_json(a.body);
		rc = refusal(c, &a, "", more);
		answer_free(&a);
		return rc;
	}
	free(a.location);
	if (!a.body)
		return fail(c, CTL_EREFUSED, "the answer to %s %s (HTTP %ld) is empty", method, path, a.status);
	*out = a.body;
	return CTL_OK;
}

/* The pages of a list from c->after on, following next_after until the
 * last page or c->limit rows (LIST_MAX without --limit).  The result has
 * the shape of one page: {"rows": every row, "next_after": the last page's},
 * so that --json prints what the API would give for one large page.
 *
 * Every row is held until the end (a table's columns are as wide as its
 * widest cell, and --json prints one document or none), so what is held
 * is bounded: LIST_BYTES_MAX of rows (some ten times that in memory), a
 * refusal past it.  Until the forty-fifth session's review only each
 * answer was (16 MiB), and 100,000 rows by default or --limit 10,000,000
 * could hold gigabytes.  A page with more rows than asked for is refused,
 * not shown past --limit: its next_after would skip the rows cut. */
static enum ctl_rc fetch_pages(struct ctl *c, const char *path, const char *const *filters, json_t **out)
{
	json_t *rows = json_array(), *next = json_null();
	long long after = c->after;
	long want = c->limit ? c->limit : LIST_MAX, got = 0;
	size_t held = 0;
	enum ctl_rc rc = CTL_OK;
	*out = NULL;
	if (!rows)
		return fail(c, CTL_EREFUSED, "out of memory");
	for (;;) {
		char a[24], l[24];
		const char *q[2 * QUERY_MAX + 1];
		int n = 0;
		for (int i = 0; filters && filters[i] && n < 2 * (QUERY_MAX - 2); i += 2) {
			q[n++] = filters[i];
			q[n++] = filters[i + 1]; /* NULL: that filter is not given */
		}
		snprintf(a, sizeof(a), "%lld", after);
		long ask = want - got < PAGE_MAX ? want - got : PAGE_MAX;
		snprintf(l, sizeof(l), "%ld", ask);
		q[n++] = "after";
		q[n++] = a;
		q[n++] = "limit";
		q[n++] = l;
		q[n] = NULL;
		json_t *page;
		if ((rc = api(c, "GET", path, q, NULL, &page)))
			break;
		json_t *r = json_object_get(page, "rows"), *na = json_object_get(page, "next_after");
		if (!json_is_array(r)) {
			json_decref(page);
			rc = fail(c, CTL_EREFUSED, "the answer to GET %s has no rows", path);
			break;
		}
		if (json_array_size(r) > (size_t)ask) {
			json_decref(page);
			rc = fail(c, CTL_EREFUSED, "the answer to GET %s has %zu rows, more than the %ld asked for", path,
				  json_array_size(r), ask);
			break;
		}
		held += json_dumpb(r, NULL, 0, JSON_COMPACT); /* its size, nothing written */
		if (held > (size_t)LIST_BYTES_MAX) {
			json_decref(page);
			rc = fail(c, CTL_EREFUSED,
				  "the list is larger than %ld MiB after %ld rows: ask for fewer with --limit, and for the "
				  "next with --after %lld",
				  LIST_BYTES_MAX >> 20, got, after);
			break;
		}
		json_array_extend(rows, r);
		got += (long)json_array_size(r);
		json_decref(next);
		next = na ? json_incref(na) : json_null();
		json_decref(page);
		/* A next_after that does not move on would loop for ever. */
		if (!json_is_integer(next) || got >= want || json_integer_value(next) <= after)
			break;
		after = json_integer_value(next);
	}
	if (!rc && !c->limit && got >= LIST_MAX && json_is_integer(next))
		fprintf(stderr, "causewayctl: showing the first %d rows; more may follow (--after %lld goes on)\n",
			LIST_MAX, (long long)json_integer_value(next));
	if (!rc && !(*out = json_pack("{s:O, s:O}", "rows", rows, "next_after", next)))
		rc = fail(c, CTL_EREFUSED, "out of memory");
	json_decref(rows);
	json_decref(next);
	return rc;
}

/* ------------------------------------------------------------ display */

/* Replaces what could drive the terminal (C0 and C1 controls, DEL) or
 * reorder what it shows (the bidirectional controls) with '?': the daemon
 * relays text from remote networks (errors, subjects, user ids).  So is a
 * byte of no UTF-8 character: what a message's "%.40s" left of a character
 * it cut, or an argument that is not UTF-8 quoted back (until the
 * forty-ninth session's review they went out raw). */
static void defang(char *s)
{
	unsigned char *p = (unsigned char *)s;
	while (*p) {
		unsigned cp;
		size_t bad = control_at(p, &cp); /* bytes to replace from p */
		if (bad == 1 && (*p == '\n' || *p == '\t'))
			*p++ = ' ';
		else if (bad)
			p = (unsigned char *)memset(p, '?', bad) + bad;
		else if (!(bad = cw_utf8_seq(p, strnlen((const char *)p, 4), NULL)))
			*p++ = '?';
		else
			p += bad; /* a character shown as it is */
	}
}

/* The columns of a terminal the longest prefix of s that fits in max
 * columns takes, *bytes (if not NULL) its length: a wide character (CJK,
 * most emoji) takes two, a combining or zero-width one none (wcwidth of
 * the C.UTF-8 locale main sets), anything else one.  Until the forty-ninth
 * session's review a column was as wide as its cells' characters: a cell
 * of CJK text pushed the columns after it out of line, and one cut at 64
 * characters took 128 columns. */
static size_t columns_upto(const char *s, size_t max, size_t *bytes)
{
	size_t cols = 0, i = 0, len = strlen(s);
	while (i < len) {
		unsigned cp;
		size_t n = cw_utf8_seq((const unsigned char *)s + i, len - i, &cp);
		int w = n ? wcwidth((wchar_t)cp) : 1;
		if (w < 0)
			w = 1;
		if (cols + (size_t)w > max)
			break;
		cols += (size_t)w;
		i += n ? n : 1;
	}
	if (bytes)
		*bytes = i;
	return cols;
}

static size_t columns(const char *s)
{
	return columns_upto(s, SIZE_MAX, NULL);
}

/* Cuts s to max columns of a terminal, the last three being "...". */
static void clip(char *s, size_t max)
{
	size_t keep;
	if (columns(s) <= max)
		return;
	columns_upto(s, max - 3, &keep);
	strcpy(s + keep, "...");
}

/* An RFC 3339 time as "2026-11-29 06:01:00Z" (ms: "06:01:00.123Z"), UTC
 * as Z; what is not such a time is shown as it is. */
static void short_time(const char *in, bool ms, char *out, size_t len)
{
	size_t n = strlen(in);
	if (n < 19 || in[4] != '-' || in[10] != 'T' || in[13] != ':') {
		snprintf(out, len, "%s", in);
		return;
	}
	const char *zone = in + 19, *digits = in + 20;
	int nd = 0; /* digits of the fraction of a second */
	if (*zone == '.')
		for (zone++; *zone >= '0' && *zone <= '9'; zone++)
			nd++;
	char frac[8] = "";
	if (ms) /* three digits: those there are, then zeros */
		snprintf(frac, sizeof(frac), ".%.*s%.*s", nd < 3 ? nd : 3, digits, nd < 3 ? 3 - nd : 0, "000");
	if (strcmp(zone, "+00:00") == 0 || strcmp(zone, "Z") == 0)
		zone = "Z";
	snprintf(out, len, "%.10s %.8s%s%s", in, in + 11, frac, zone);
}

enum cell_kind {
	CELL_TEXT,     /* a string, number, boolean (yes/no), null (-), or compact JSON */
	CELL_TIME,     /* an RFC 3339 time, shortened to the second */
	CELL_TIME_MS,  /* the same to the millisecond (attempts, which take milliseconds) */
	CELL_OPTINS,   /* {"network": true, ...} */
	CELL_CONSENTS, /* [{"subject", "state", ...}, ...] */
};

/* The text of one value, malloc'd (NULL: out of memory), defanged and
 * clipped to max characters (0: not clipped). */
static char *cell_text(const json_t *v, enum cell_kind kind, size_t max)
{
	char buf[64], *s = NULL;
	if (!v || json_is_null(v) || (json_is_string(v) && !json_string_length(v))) {
		s = strdup("-"); /* an empty cell would break the columns for the eye and for awk */
	} else if ((kind == CELL_TIME || kind == CELL_TIME_MS) && json_is_string(v)) {
		short_time(json_string_value(v), kind == CELL_TIME_MS, buf, sizeof(buf));
		s = strdup(buf);
	} else if (json_is_string(v)) {
		s = strdup(json_string_value(v));
	} else if (json_is_boolean(v)) {
		s = strdup(json_is_true(v) ? "yes" : "no");
	} else if (json_is_integer(v)) {
		snprintf(buf, sizeof(buf), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
		s = strdup(buf);
	} else if (json_is_real(v)) {
		snprintf(buf, sizeof(buf), "%g", json_real_value(v));
		s = strdup(buf);
	} else if (kind == CELL_OPTINS && json_is_object(v)) {
		const char *k;
		json_t *x;
		size_t n = 2;
		json_object_foreach((json_t *)v, k, x)
			n += strlen(k) + 6;
		if ((s = malloc(n)))
			s[0] = '\0';
		json_object_foreach((json_t *)v, k, x)
			if (s)
				snprintf(s + strlen(s), n - strlen(s), "%s%s:%s", s[0] ? ", " : "", k,
					 json_is_true(x) ? "in" : "out");
		if (s && !s[0])
			strcpy(s, "-");
	} else if (kind == CELL_CONSENTS && json_is_array(v)) {
		size_t n = 2, i;
		json_t *x;
		/* " (no peer)": no peer has the subject's domain (GET /users'
		 * peer null), so it matches no one; a daemon from before the
		 * forty-first session sends no peer, and nothing is said. */
		json_array_foreach(v, i, x)
			n += strlen(jstr_or(x, "subject")) + strlen(jstr_or(x, "state")) + 4 + sizeof(" (no peer)");
		if ((s = malloc(n)))
			s[0] = '\0';
		json_array_foreach(v, i, x)
			if (s)
				snprintf(s + strlen(s), n - strlen(s), "%s%s %s%s", s[0] ? ", " : "",
					 jstr_or(x, "subject"), jstr_or(x, "state"),
					 json_is_null(json_object_get(x, "peer")) ? " (no peer)" : "");
		if (s && !s[0])
			strcpy(s, "-");
	} else {
		s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(15));
	}
	if (s) {
		defang(s);
		if (max)
			clip(s, max);
	}
	return s;
}

/* Rows of cells printed in aligned columns. */
struct table {
	size_t ncols, nrows, cap;
	const char *head[COLS_MAX];
	char **cell; /* nrows * ncols, each owned */
	bool no_memory;
};

static void table_free(struct table *t)
{
	for (size_t i = 0; i < t->nrows * t->ncols; i++)
		free(t->cell[i]);
	free(t->cell);
}

/* Takes ownership of vals[0..ncols-1] (NULL: out of memory, noted). */
static void table_add(struct table *t, char **vals)
{
	bool ok = !t->no_memory;
	for (size_t i = 0; i < t->ncols; i++)
		ok = ok && vals[i];
	if (ok && t->nrows == t->cap) {
		size_t cap = t->cap ? t->cap * 2 : 32;
		char **p = realloc(t->cell, cap * t->ncols * sizeof(*p));
		if (p) {
			t->cell = p;
			t->cap = cap;
		}
		ok = p != NULL;
	}
	if (!ok) {
		t->no_memory = true;
		for (size_t i = 0; i < t->ncols; i++)
			free(vals[i]);
		return;
	}
	memcpy(t->cell + t->nrows * t->ncols, vals, t->ncols * sizeof(*vals));
	t->nrows++;
}

static void pad(size_t n)
{
	while (n--)
		putchar(' ');
}

static void table_print(const struct table *t, size_t indent)
{
	size_t w[COLS_MAX];
	for (size_t j = 0; j < t->ncols; j++) {
		w[j] = columns(t->head[j]);
		for (size_t i = 0; i < t->nrows; i++)
			if (columns(t->cell[i * t->ncols + j]) > w[j])
				w[j] = columns(t->cell[i * t->ncols + j]);
	}
	for (size_t i = 0; i <= t->nrows; i++) {
		pad(indent);
		for (size_t j = 0; j < t->ncols; j++) {
			const char *s = i ? t->cell[(i - 1) * t->ncols + j] : t->head[j];
			fputs(s, stdout);
			if (j + 1 < t->ncols)
				pad(w[j] - columns(s) + 2);
		}
		putchar('\n');
	}
}

/* A column of a list: its head and the member of each row it shows. */
struct column {
	const char *head;
	const char *key;
	enum cell_kind kind;
};

/* rows as a table of cols (NULL-terminated), or "none" if empty. */
static enum ctl_rc print_rows(struct ctl *c, const json_t *rows, const struct column *cols, const char *none,
			      size_t indent)
{
	struct table t = { 0 };
	size_t i;
	json_t *row;
	for (; cols[t.ncols].head && t.ncols < COLS_MAX; t.ncols++)
		t.head[t.ncols] = cols[t.ncols].head;
	if (!json_array_size(rows)) {
		pad(indent);
		puts(none);
		return CTL_OK;
	}
	json_array_foreach(rows, i, row) {
		char *vals[COLS_MAX];
		for (size_t j = 0; j < t.ncols; j++)
			vals[j] = cell_text(json_object_get(row, cols[j].key), cols[j].kind, CELL_MAX);
		table_add(&t, vals);
	}
	if (!t.no_memory)
		table_print(&t, indent);
	table_free(&t);
	return t.no_memory ? fail(c, CTL_EREFUSED, "out of memory") : CTL_OK;
}

/* "key          value" lines of status and trace, the value as long as it
 * is: until the forty-ninth session's review it was cut at 1023 bytes
 * without a word. */
static void kv(const char *key, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void kv(const char *key, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	char *v = vformat(fmt, ap);
	va_end(ap);
	if (v)
		defang(v);
	printf("%-*s%s\n", KEY_WIDTH, key, v ? v : "? (out of memory)");
	free(v);
}

/* The members one line shows, each whole: tx() keeps the last TEXTS_HELD
 * it made, and TEXTS() frees them when its block ends.  Until the
 * forty-ninth session's review each was cut at 299 bytes without a word:
 * a sender or recipient of trace (a user URI of up to 512 bytes) was shown
 * as another user's, and a remote id as one that does not exist. */
#define TEXTS_HELD 8
struct texts {
	char *b[TEXTS_HELD];
	unsigned n;
};

static void texts_done(struct texts *t)
{
	for (unsigned i = 0; i < TEXTS_HELD; i++)
		free(t->b[i]);
}

#define TEXTS(t) struct texts t __attribute__((cleanup(texts_done))) = { .n = 0 }

/* A member of o as text (as in a table cell, not clipped) for kv and
 * printf; valid until TEXTS_HELD more are asked for. */
static const char *tx(struct texts *t, const json_t *o, const char *key, enum cell_kind kind)
{
	char **slot = &t->b[t->n++ % TEXTS_HELD];
	free(*slot);
	*slot = cell_text(json_object_get(o, key), kind, 0);
	return *slot ? *slot : "?";
}

/* ------------------------------------------------------------ commands */

static const struct column peer_cols[] = {
	{ "NAME", "name", CELL_TEXT },       { "DOMAIN", "domain", CELL_TEXT },
	{ "MODE", "mode", CELL_TEXT },       { "ENABLED", "enabled", CELL_TEXT },
	{ "PUSH URL", "push_url", CELL_TEXT }, { "EVENT TYPES", "event_types", CELL_TEXT },
	{ "CREATED", "created_at", CELL_TIME }, { NULL, NULL, CELL_TEXT },
};

static const struct column rule_cols[] = {
	{ "ID", "id", CELL_TEXT },         { "SCOPE", "scope", CELL_TEXT },
	{ "PATTERN", "pattern", CELL_TEXT }, { "MODE", "mode", CELL_TEXT },
	{ "LIMITS", "limits", CELL_TEXT }, { "ENABLED", "enabled", CELL_TEXT },
	{ "EXPIRES", "expires_at", CELL_TIME }, { "COMMENT", "comment", CELL_TEXT },
	{ NULL, NULL, CELL_TEXT },
};

static const struct column user_cols[] = {
	{ "ID", "id", CELL_TEXT },           { "USER", "user", CELL_TEXT },
	{ "NETWORK", "network", CELL_TEXT }, { "OPT-INS", "optins", CELL_OPTINS },
	{ "CONSENTS", "consents", CELL_CONSENTS }, { "HELD", "held", CELL_TEXT },
	{ "REQUESTS", "pending_requests", CELL_TEXT },
	{ NULL, NULL, CELL_TEXT },
};

static const struct column held_cols[] = {
	{ "ID", "id", CELL_TEXT },         { "MESSAGE", "message", CELL_TEXT },
	{ "USER", "user", CELL_TEXT },     { "SENDER", "sender", CELL_TEXT },
	{ "TYPE", "type", CELL_TEXT },     { "HELD SINCE", "held_since", CELL_TIME },
	{ "EXPIRES", "expires_at", CELL_TIME },
	{ NULL, NULL, CELL_TEXT },
};

static const struct column dead_cols[] = {
	{ "ID", "id", CELL_TEXT },             { "MESSAGE", "message", CELL_TEXT },
	{ "DESTINATION", "destination", CELL_TEXT }, { "RECIPIENT", "recipient", CELL_TEXT },
	{ "ATTEMPTS", "attempts", CELL_TEXT }, { "CREATED", "created_at", CELL_TIME },
	{ "LAST ERROR", "last_error", CELL_TEXT },
	{ NULL, NULL, CELL_TEXT },
};

static const struct column outbox_cols[] = {
	{ "ID", "id", CELL_TEXT },             { "MESSAGE", "message", CELL_TEXT },
	{ "DESTINATION", "destination", CELL_TEXT }, { "RECIPIENT", "recipient", CELL_TEXT },
	{ "STATE", "state", CELL_TEXT },       { "ATTEMPTS", "attempts", CELL_TEXT },
	{ "NEXT ATTEMPT", "next_attempt_at", CELL_TIME }, { "CREATED", "created_at", CELL_TIME },
	{ "LAST ERROR", "last_error", CELL_TEXT },
	{ NULL, NULL, CELL_TEXT },
};

static const struct column token_cols[] = {
	{ "ID", "id", CELL_TEXT },              { "NAME", "name", CELL_TEXT },
	{ "ROLE", "role", CELL_TEXT },          { "CREATED", "created_at", CELL_TIME },
	{ "LAST USED", "last_used_at", CELL_TIME }, { "REVOKED", "revoked_at", CELL_TIME },
	{ NULL, NULL, CELL_TEXT },
};

static const struct column audit_cols[] = {
	{ "ID", "id", CELL_TEXT },           { "AT", "at", CELL_TIME },
	{ "ACTOR", "actor", CELL_TEXT },     { "ACTION", "action", CELL_TEXT },
	{ "SUBJECT", "subject", CELL_TEXT }, { "REASON", "reason", CELL_TEXT },
	{ "MESSAGE", "message", CELL_TEXT }, { "DETAILS", "details", CELL_TEXT },
	{ NULL, NULL, CELL_TEXT },
};

static const struct column decision_cols[] = {
	{ "AT", "at", CELL_TIME },           { "VERDICT", "verdict", CELL_TEXT },
	{ "REASON", "reason", CELL_TEXT },   { "RULE", "rule_id", CELL_TEXT },
	{ "RECIPIENT", "recipient", CELL_TEXT },
	{ NULL, NULL, CELL_TEXT },
};

static const struct column report_cols[] = {
	{ "ID", "id", CELL_TEXT },           { "CREATED", "created_at", CELL_TIME },
	{ "REPORTER", "reporter", CELL_TEXT }, { "SUBJECT", "subject", CELL_TEXT },
	{ "REASON", "reason", CELL_TEXT },   { "COMMENT", "comment", CELL_TEXT },
	{ "HANDLED", "handled_at", CELL_TIME }, { "BY", "handled_by", CELL_TEXT },
	{ "DISMISSED", "dismissed", CELL_TEXT },
	{ NULL, NULL, CELL_TEXT },
};

static const struct column try_cols[] = {
	{ "ATTEMPT", "attempt", CELL_TEXT }, { "STARTED", "started_at", CELL_TIME_MS },
	{ "FINISHED", "finished_at", CELL_TIME_MS }, { "OK", "ok", CELL_TEXT },
	{ "CODE", "code", CELL_TEXT },       { "ERROR", "error", CELL_TEXT },
	{ NULL, NULL, CELL_TEXT },
};

/* A list the API answers in one document ({"peers": [...]}); then, if
 * given, what after says of its rows (the table clips a cell). */
static enum ctl_rc show_whole(struct ctl *c, const char *path, const char *key, const struct column *cols,
			      const char *none, void (*after)(const json_t *rows))
{
	json_t *body;
	enum ctl_rc rc = api(c, "GET", path, NULL, NULL, &body);
	if (rc)
		return rc;
	if (c->json)
		print_json(body);
	else if (!json_is_array(json_object_get(body, key)))
		rc = fail(c, CTL_EREFUSED, "the answer to GET %s has no %s", path, key);
	else if (!(rc = print_rows(c, json_object_get(body, key), cols, none, 0)) && after)
		after(json_object_get(body, key));
	json_decref(body);
	return rc;
}

/* A line, whole, for each push peer whose stored push_url nothing is
 * pushed to (GET /admin/v1/peers' push_url_problem: one stored before the
 * admin API checked it): its rows wait, untried, until a good one is
 * given.  Until the fiftieth session's review nothing here said so, and
 * the peer looked as well as any other. */
static void peer_problems(const json_t *rows)
{
	size_t i;
	json_t *p;
	json_array_foreach(rows, i, p) {
		if (!json_is_string(json_object_get(p, "push_url_problem")))
			continue;
		TEXTS(t);
		printf("\npeer '%s': push URL problem: %s\n  nothing is pushed to it; its rows wait, untried, until a "
		       "good push_url is given (PATCH /admin/v1/peers/%s)\n",
		       tx(&t, p, "name", CELL_TEXT), tx(&t, p, "push_url_problem", CELL_TEXT),
		       tx(&t, p, "name", CELL_TEXT));
	}
}

/* A list the API pages ({"rows": [...], "next_after"}). */
static enum ctl_rc show_paged(struct ctl *c, const char *path, const char *const *filters, const struct column *cols,
			      const char *none)
{
	json_t *body;
	enum ctl_rc rc = fetch_pages(c, path, filters, &body);
	if (rc)
		return rc;
	if (c->json)
		print_json(body);
	else
		rc = print_rows(c, json_object_get(body, "rows"), cols, none, 0);
	json_decref(body);
	return rc;
}

static enum ctl_rc cmd_peers(struct ctl *c, char **argv)
{
	return show_whole(c, "/admin/v1/peers", "peers", peer_cols, "no peers", peer_problems);
}

static enum ctl_rc cmd_rules(struct ctl *c, char **argv)
{
	return show_paged(c, "/admin/v1/rules", NULL, rule_cols, "no rules");
}

static enum ctl_rc cmd_users(struct ctl *c, char **argv)
{
	return show_paged(c, "/admin/v1/users", NULL, user_cols, "no local users");
}

static enum ctl_rc cmd_held(struct ctl *c, char **argv)
{
	return show_paged(c, "/admin/v1/held", NULL, held_cols, "no held messages");
}

static enum ctl_rc cmd_deadletters(struct ctl *c, char **argv)
{
	static const char *const q[] = { "state", "dead", NULL };
	return show_paged(c, "/admin/v1/outbox", q, dead_cols, "no dead letters");
}

/* --state and --destination as GET /admin/v1/outbox takes them
 * (docs/admin-openapi.json: OutboxStateFilter's enum, a destination of 1
 * to 299 bytes), checked before the token is looked for: until the
 * fiftieth session's review a state mistyped was sent, and refused by the
 * daemon as exit 1, not as the usage error it is (exit 2). */
static enum ctl_rc check_outbox(struct ctl *c)
{
	static const char *const states[] = { "pending", "held", "in_flight", "delivered", "failed", "dead",
					      "dropped", "expired" };
	bool known = !c->state;
	for (size_t i = 0; !known && i < sizeof(states) / sizeof(states[0]); i++)
		known = strcmp(c->state, states[i]) == 0;
	if (!known)
		return fail(c, CTL_EUSAGE, "--state takes pending, held, in_flight, delivered, failed, dead, dropped "
			    "or expired, not '%.40s'", c->state);
	if (c->destination && (!*c->destination || strlen(c->destination) > DESTINATION_MAX))
		return fail(c, CTL_EUSAGE, "--destination takes a destination of 1 to %d bytes (peer:NAME, matrix or "
			    "xmpp), not one of %zu", DESTINATION_MAX, strlen(c->destination));
	return CTL_OK;
}

static enum ctl_rc cmd_outbox(struct ctl *c, char **argv)
{
	const char *q[] = { "state", c->state, "destination", c->destination, NULL };
	return show_paged(c, "/admin/v1/outbox", q, outbox_cols, "no deliveries");
}

static enum ctl_rc cmd_audit(struct ctl *c, char **argv)
{
	const char *q[] = { "action", c->action, "actor", c->actor, "message", c->message, NULL };
	return show_paged(c, "/admin/v1/audit", q, audit_cols, "no audit records");
}

static enum ctl_rc cmd_reports(struct ctl *c, char **argv)
{
	const char *q[] = { "open", c->open ? "true" : NULL, NULL };
	return show_paged(c, "/admin/v1/reports", q, report_cols, c->open ? "no open reports" : "no reports");
}

static enum ctl_rc cmd_token_list(struct ctl *c, char **argv)
{
	return show_whole(c, "/admin/v1/tokens", "tokens", token_cols, "no named tokens (only the configuration's)",
			  NULL);
}

/* "/admin/v1/<a>/<escaped b><c>" into a malloc'd string. */
static enum ctl_rc path_with(struct ctl *c, const char *a, const char *b, const char *rest, char **out)
{
	/* Escaping leaves '.' as it is, and libcurl, as a proxy would, takes
	 * "." and ".." for the segments they name: "token revoke .." was sent
	 * as POST /admin/v1/revoke, "trace ." as GET /admin/v1/messages/ (until
	 * the forty-fifth session's review).  No name or id is empty or dots. */
	*out = NULL;
	if (!*b || strcmp(b, ".") == 0 || strcmp(b, "..") == 0)
		return fail(c, CTL_EUSAGE, "'%s' cannot be a name or id: it would change the request's path", b);
	char *e = curl_easy_escape(c->curl, b, 0);
	size_t n = e ? strlen(a) + strlen(e) + strlen(rest) + 1 : 0;
	*out = e ? malloc(n) : NULL;
	if (*out)
		snprintf(*out, n, "%s%s%s", a, e, rest);
	curl_free(e);
	return *out ? CTL_OK : fail(c, CTL_EREFUSED, "out of memory");
}

/* api() on "<a><escaped b><rest>" (path_with). */
static enum ctl_rc api_at(struct ctl *c, const char *method, const char *a, const char *b, const char *rest,
			  const json_t *send, json_t **out)
{
	char *path;
	enum ctl_rc rc = path_with(c, a, b, rest, &path);
	if (rc)
		return rc;
	rc = api(c, method, path, NULL, send, out);
	free(path);
	return rc;
}

/* A row id as the API takes it (what: which, for the message). */
static enum ctl_rc parse_id(struct ctl *c, const char *s, const char *what)
{
	long long v;
	if (!cw_decimal(s, 1, LLONG_MAX, false, &v))
		return fail(c, CTL_EUSAGE, "'%.40s' is not %s", s, what);
	return CTL_OK;
}

static enum ctl_rc outbox_change(struct ctl *c, const char *id, const char *verb, const char *what)
{
	json_t *body;
	enum ctl_rc rc = parse_id(c, id, "an outbox row id (the ID column of causewayctl deadletters)");
	if (!rc)
		rc = api_at(c, "POST", "/admin/v1/outbox/", id, verb, NULL, &body);
	if (rc)
		return rc;
	if (c->json) {
		print_json(body);
	} else {
		TEXTS(t);
		printf("outbox row %s: %s (%s)\n", id, tx(&t, body, "state", CELL_TEXT), what);
	}
	json_decref(body);
	return CTL_OK;
}

/* reports handle ID, reports dismiss ID. */
static enum ctl_rc report_change(struct ctl *c, const char *id, bool dismiss)
{
	json_t *body;
	enum ctl_rc rc = parse_id(c, id, "a report id (the ID column of causewayctl reports)");
	if (!rc)
		rc = api_at(c, "POST", "/admin/v1/reports/", id, dismiss ? "/dismiss" : "/handle", NULL, &body);
	if (rc)
		return rc;
	if (c->json) {
		print_json(body);
	} else {
		TEXTS(t);
		printf("%s the report %s (handled at %s by %s)%s\n", dismiss ? "Dismissed" : "Handled", id,
		       tx(&t, body, "handled_at", CELL_TIME), tx(&t, body, "handled_by", CELL_TEXT),
		       dismiss ? ": it no longer counts toward an automatic limit" : ".");
		json_t *limit = json_object_get(body, "limit_rule_id");
		if (dismiss && json_is_integer(limit))
			printf("The automatic limit on its subject stays in force: causewayctl rules delete %s lifts it.\n",
			       tx(&t, body, "limit_rule_id", CELL_TEXT));
	}
	json_decref(body);
	return CTL_OK;
}

static enum ctl_rc cmd_report_handle(struct ctl *c, char **argv) { return report_change(c, argv[0], false); }
static enum ctl_rc cmd_report_dismiss(struct ctl *c, char **argv) { return report_change(c, argv[0], true); }

static enum ctl_rc cmd_replay(struct ctl *c, char **argv)
{
	return outbox_change(c, argv[0], "/replay", "it will be sent again");
}

static enum ctl_rc cmd_discard(struct ctl *c, char **argv)
{
	return outbox_change(c, argv[0], "/discard", "given up on; the trace keeps it");
}

/* The request's JSON could not be made: jansson takes UTF-8 text only. */
static enum ctl_rc pack_failed(struct ctl *c)
{
	return fail(c, CTL_EUSAGE, "the arguments must be UTF-8 text");
}

static enum ctl_rc cmd_token_create(struct ctl *c, char **argv)
{
	/* Without --role the API's default (admin) applies. */
	json_t *send = c->role ? json_pack("{s:s, s:s}", "name", argv[0], "role", c->role)
			       : json_pack("{s:s}", "name", argv[0]), *body;
	if (!send) /* a name that is not UTF-8 (until the forty-seventh session's review: exit 1, out of memory) */
		return pack_failed(c);
	enum ctl_rc rc = api(c, "POST", "/admin/v1/tokens", NULL, send, &body);
	json_decref(send);
	if (rc)
		return rc;
	const char *token = jstr(body, "token");
	if (c->json) {
		print_json(body);
	} else if (!token || !token_valid(token)) {
		rc = fail(c, CTL_EREFUSED, "the answer to POST /admin/v1/tokens holds no token");
	} else {
		TEXTS(t);
		printf("Made the token '%s' (role %s). Here it is, shown only this once:\n\n    %s\n\n"
		       "Keep it now: the daemon stores only its SHA-256 and cannot show it again.\n",
		       tx(&t, body, "name", CELL_TEXT), tx(&t, body, "role", CELL_TEXT), token);
	}
	json_decref(body);
	return rc;
}

static enum ctl_rc cmd_token_revoke(struct ctl *c, char **argv)
{
	json_t *body;
	enum ctl_rc rc = api_at(c, "POST", "/admin/v1/tokens/", argv[0], "/revoke", NULL, &body);
	if (rc)
		return rc;
	if (c->json) {
		print_json(body);
	} else {
		TEXTS(t);
		printf("Revoked the token '%s' (at %s): it is refused from now on.\n",
		       tx(&t, body, "name", CELL_TEXT), tx(&t, body, "revoked_at", CELL_TIME));
	}
	json_decref(body);
	return CTL_OK;
}

/* A peer's bearer token in an answer (peers add, peers rotate), shown
 * once, as token create shows an admin token. */
static enum ctl_rc show_peer_token(struct ctl *c, const json_t *body, const char *path, const char *what)
{
	const char *token = jstr(body, "token");
	if (!token || !*token || !token_valid(token))
		return fail(c, CTL_EREFUSED, "the answer to POST %s holds no token", path);
	TEXTS(t);
	const char *mode = tx(&t, body, "mode", CELL_TEXT);
	printf("%s the peer '%s' (%s, %s%s%s). Its bearer token, shown only this once:\n\n    %s\n\n"
	       "Give it to the peer's operator over a channel others cannot read; the daemon stores only its\n"
	       "SHA-256 and cannot show it again (causewayctl peers rotate %s makes a new one).\n",
	       what, tx(&t, body, "name", CELL_TEXT), tx(&t, body, "domain", CELL_TEXT), mode,
	       strcmp(mode, "push") == 0 ? " to " : "", strcmp(mode, "push") == 0 ? tx(&t, body, "push_url", CELL_TEXT) : "",
	       token, tx(&t, body, "name", CELL_TEXT));
	return CTL_OK;
}

/* --event-types a,b,c as a JSON array (the API checks the names). */
static json_t *type_list(const char *s)
{
	json_t *a = *s ? json_array() : NULL;
	for (const char *p = s; a && *p;) {
		size_t n = strcspn(p, ",");
		if (n == 0 || json_array_append_new(a, json_stringn(p, n)) != 0) {
			json_decref(a);
			return NULL;
		}
		p += n;
		if (*p == ',' && !*++p) { /* a trailing comma */
			json_decref(a);
			return NULL;
		}
	}
	return a;
}

/* What peers add needs besides its arguments, checked before the token is
 * looked for (a usage error is said first). */
static enum ctl_rc check_peer_add(struct ctl *c)
{
	if (!c->key)
		return fail(c, CTL_EUSAGE, "peers add needs --key: the peer's Ed25519 public key, base64 of its 32 bytes");
	if (c->pull == (c->push_url != NULL))
		return fail(c, CTL_EUSAGE, "peers add needs either --push-url URL (the peer is pushed to) or --pull "
			    "(it pulls GET /v1/events), not both");
	if (c->event_types && !(c->types_json = type_list(c->event_types)))
		return fail(c, CTL_EUSAGE, "--event-types takes event types separated by commas "
			    "(message,edit,delete), not '%.60s'", c->event_types);
	return CTL_OK;
}

static enum ctl_rc cmd_peer_add(struct ctl *c, char **argv)
{
	json_t *send = json_pack("{s:s, s:s, s:s, s:s, s:s*, s:O*}", "name", argv[0], "domain", argv[1], "mode",
				 c->pull ? "pull" : "push", "public_key", c->key, "push_url", c->push_url,
				 "event_types", c->types_json), *body;
	if (!send)
		return pack_failed(c);
	enum ctl_rc rc = api(c, "POST", "/admin/v1/peers", NULL, send, &body);
	json_decref(send);
	if (rc)
		return rc;
	if (c->json)
		print_json(body);
	else
		rc = show_peer_token(c, body, "/admin/v1/peers", "Made");
	json_decref(body);
	return rc;
}

static enum ctl_rc peer_switch(struct ctl *c, const char *name, bool enable)
{
	json_t *body;
	enum ctl_rc rc = api_at(c, "POST", "/admin/v1/peers/", name, enable ? "/enable" : "/disable", NULL, &body);
	if (rc)
		return rc;
	if (c->json) {
		print_json(body);
	} else {
		TEXTS(t);
		if (enable)
			printf("The peer '%s' is enabled: its requests are taken and it is sent its rows.\n",
			       tx(&t, body, "name", CELL_TEXT));
		else
			printf("The peer '%s' is disabled (since %s): its requests are refused (401) and its rows wait.\n",
			       tx(&t, body, "name", CELL_TEXT), tx(&t, body, "disabled_at", CELL_TIME));
	}
	json_decref(body);
	return CTL_OK;
}

static enum ctl_rc cmd_peer_disable(struct ctl *c, char **argv) { return peer_switch(c, argv[0], false); }
static enum ctl_rc cmd_peer_enable(struct ctl *c, char **argv) { return peer_switch(c, argv[0], true); }

static enum ctl_rc cmd_peer_rotate(struct ctl *c, char **argv)
{
	json_t *send = c->key ? json_pack("{s:s}", "public_key", c->key) : NULL, *body = NULL;
	if (c->key && !send)
		return pack_failed(c);
	enum ctl_rc rc = api_at(c, "POST", "/admin/v1/peers/", argv[0], "/rotate", send, &body);
	json_decref(send);
	if (!rc && c->json)
		print_json(body);
	else if (!rc)
		rc = show_peer_token(c, body, "/admin/v1/peers/NAME/rotate",
				     c->key ? "Rotated the token and key of" : "Rotated the token of");
	json_decref(body);
	return rc;
}

/* What rules add needs besides its arguments (before the token is looked for). */
static enum ctl_rc check_rule_add(struct ctl *c)
{
	if (!c->mode && !c->limits)
		return fail(c, CTL_EUSAGE, "rules add needs --mode (open, allowlist, closed, deny) or --limits JSON, "
			    "or both");
	c->limits_json = c->limits ? json_loads(c->limits, JSON_REJECT_DUPLICATES, NULL) : NULL;
	if (c->limits && !json_is_object(c->limits_json))
		return fail(c, CTL_EUSAGE, "--limits takes a JSON object ('{\"messages_per_minute\": 30}', "
			    "docs/policy.md \"Rate limits\"), not '%.60s'", c->limits);
	return CTL_OK;
}

static enum ctl_rc cmd_rule_add(struct ctl *c, char **argv)
{
	json_t *body, *send = json_pack("{s:s, s:s, s:s*, s:O*, s:s*}", "scope", argv[0], "pattern", argv[1], "mode",
					c->mode, "limits", c->limits_json, "comment", c->comment);
	if (send && c->expires_in && json_object_set_new(send, "expires_in_s", json_integer(c->expires_in))) {
		json_decref(send);
		return fail(c, CTL_EREFUSED, "out of memory");
	}
	if (!send)
		return pack_failed(c);
	enum ctl_rc rc = api(c, "POST", "/admin/v1/rules", NULL, send, &body);
	json_decref(send);
	if (rc)
		return rc;
	if (c->json) {
		print_json(body);
	} else {
		TEXTS(t);
		json_t *rows = json_pack("[O]", body);
		printf("Made the rule %s; every daemon process applies it within about a second.\n",
		       tx(&t, body, "id", CELL_TEXT));
		rc = rows ? print_rows(c, rows, rule_cols, "", 0) : fail(c, CTL_EREFUSED, "out of memory");
		json_decref(rows);
	}
	json_decref(body);
	return rc;
}

static enum ctl_rc cmd_rule_delete(struct ctl *c, char **argv)
{
	json_t *body;
	enum ctl_rc rc = parse_id(c, argv[0], "a rule id (the ID column of causewayctl rules)");
	if (!rc)
		rc = api_at(c, "DELETE", "/admin/v1/rules/", argv[0], "", NULL, &body);
	if (rc)
		return rc;
	if (c->json) {
		print_json(body);
	} else {
		TEXTS(t);
		printf("Deleted the rule %s (%s %s); every daemon process drops it within about a second.\n",
		       tx(&t, body, "id", CELL_TEXT), tx(&t, body, "scope", CELL_TEXT), tx(&t, body, "pattern", CELL_TEXT));
	}
	json_decref(body);
	return CTL_OK;
}

static void print_delivery(struct ctl *c, const json_t *d, enum ctl_rc *rc)
{
	TEXTS(t);
	/* A delivery to a peer is for the room (no recipient); a local one for a user. */
	printf("  #%s  to %s%s%s\n", tx(&t, d, "id", CELL_TEXT), tx(&t, d, "destination", CELL_TEXT),
	       jstr(d, "recipient") ? ", for " : "", jstr(d, "recipient") ? tx(&t, d, "recipient", CELL_TEXT) : "");
	printf("      state %s after %s attempt(s); verdict %s, reason %s\n", tx(&t, d, "state", CELL_TEXT),
	       tx(&t, d, "attempts", CELL_TEXT), tx(&t, d, "verdict", CELL_TEXT), tx(&t, d, "reason", CELL_TEXT));
	printf("      created %s, delivered %s, read %s, remote id %s\n", tx(&t, d, "created_at", CELL_TIME),
	       tx(&t, d, "delivered_at", CELL_TIME), tx(&t, d, "read_at", CELL_TIME),
	       tx(&t, d, "remote_id", CELL_TEXT));
	char *err = cell_text(json_object_get(d, "last_error"), CELL_TEXT, 0);
	if (err && strcmp(err, "-") != 0)
		printf("      last error: %s\n", err);
	free(err);
	json_t *tries = json_object_get(d, "tries");
	if (json_array_size(tries) && !*rc)
		*rc = print_rows(c, tries, try_cols, "", 6);
}

static enum ctl_rc cmd_trace(struct ctl *c, char **argv)
{
	json_t *tr;
	enum ctl_rc rc = api_at(c, "GET", "/admin/v1/messages/", argv[0], "", NULL, &tr);
	if (rc)
		return rc;
	if (c->json) {
		print_json(tr);
		json_decref(tr);
		return CTL_OK;
	}
	TEXTS(t);
	json_t *origin = json_object_get(tr, "origin");
	kv("message", "%s", tx(&t, tr, "message", CELL_TEXT));
	kv("room", "%s", tx(&t, tr, "room", CELL_TEXT));
	kv("sender", "%s", tx(&t, tr, "sender", CELL_TEXT));
	kv("type", "%s", tx(&t, tr, "type", CELL_TEXT));
	kv("origin", "%s (native id %s)", tx(&t, origin, "network", CELL_TEXT), tx(&t, origin, "native_id", CELL_TEXT));
	kv("accepted", "%s", tx(&t, tr, "accepted_at", CELL_TIME));
	kv("content", "%s", json_is_true(json_object_get(tr, "content_deleted")) ? "deleted" : "kept");
	json_t *decisions = json_object_get(tr, "decisions"), *deliveries = json_object_get(tr, "deliveries");
	puts("\ndecisions");
	rc = print_rows(c, decisions, decision_cols, "none recorded (the policy allowed it)", 2);
	puts("\ndeliveries");
	if (!json_array_size(deliveries))
		puts("  none");
	size_t i;
	json_t *d;
	json_array_foreach(deliveries, i, d)
		print_delivery(c, d, &rc);
	json_decref(tr);
	return rc;
}

/* A kv line made of parts, as long as they are: until the forty-ninth
 * session's review status's decisions (a verdict and reason each, of some
 * forty reasons) and its XMPP components (each with its last error) were
 * cut at 899 bytes without a word. */
struct line {
	char *p; /* open_memstream's, freed by line_done */
	size_t len;
	FILE *f; /* NULL until the first part */
	bool failed;
};

#define LINE_INIT { NULL, 0, NULL, false }

__attribute__((format(printf, 2, 3))) static void line_add(struct line *l, const char *fmt, ...)
{
	if (!l->failed && !l->f && !(l->f = open_memstream(&l->p, &l->len)))
		l->failed = true;
	if (l->failed)
		return;
	va_list ap;
	va_start(ap, fmt);
	if (vfprintf(l->f, fmt, ap) < 0)
		l->failed = true;
	va_end(ap);
}

/* kv(key, the line), or none when nothing was added. */
static void line_done(struct line *l, const char *key, const char *none)
{
	if (l->f && fclose(l->f) != 0)
		l->failed = true;
	if (l->failed)
		kv(key, "? (out of memory)");
	else
		kv(key, "%s", l->p && *l->p ? l->p : none ? none : "");
	free(l->p);
}

/* One line per adapter of readyz (matrix, xmpp), whose health shapes are
 * their own: the well-known members, else the JSON as it is. */
static void print_adapter(const char *name, const json_t *h)
{
	TEXTS(t);
	if (strcmp(name, "matrix") == 0 && jstr(h, "homeserver")) {
		const char *err = jstr(h, "last_error"), *del = jstr(h, "delivery");
		/* delivery held while the homeserver refuses the as_token (since
		 * the fifty-first session: docs/operations.md) */
		bool held = del && strcmp(del, "token_refused") == 0;
		kv(name, "%s, ping %s%s%s%s", tx(&t, h, "homeserver", CELL_TEXT), tx(&t, h, "ping", CELL_TEXT),
		   held ? ", delivery held: the homeserver refuses the as_token" : "",
		   err && *err ? ", last error: " : "", err && *err ? err : "");
	} else if (strcmp(name, "xmpp") == 0 && json_is_object(json_object_get(h, "components"))) {
		struct line l = LINE_INIT;
		const char *dom;
		json_t *x;
		line_add(&l, "%s:%s", tx(&t, h, "server", CELL_TEXT), tx(&t, h, "port", CELL_TEXT));
		json_object_foreach(json_object_get(h, "components"), dom, x) {
			const char *err = jstr(x, "last_error");
			line_add(&l, "; %s %s%s%s%s", dom, tx(&t, x, "state", CELL_TEXT), err && *err ? " (" : "",
				 err && *err ? err : "", err && *err ? ")" : "");
		}
		line_done(&l, name, NULL);
	} else {
		char *s = cell_text(h, CELL_TEXT, 200);
		kv(name, "%s", s ? s : "?");
		free(s);
	}
}

/* "peer in 42, peer out 40" of stats' totals, or "x rule_deny 7" of its decisions. */
static void counts_line(const char *key, const json_t *arr, const char *a, const char *b, const char *none)
{
	TEXTS(t);
	struct line l = LINE_INIT;
	size_t i;
	json_t *e;
	json_array_foreach(arr, i, e)
		line_add(&l, "%s%s %s %s", i ? ", " : "", tx(&t, e, a, CELL_TEXT), tx(&t, e, b, CELL_TEXT),
			 tx(&t, e, "count", CELL_TEXT));
	line_done(&l, key, none);
}

/* The policy snapshot of readyz: current, or stale for N s with the
 * reload's failure (docs/operations.md, "A policy that does not reload");
 * another shape as the JSON it is. */
static void print_policy(const json_t *p)
{
	TEXTS(t);
	const char *st = jstr(p, "status");
	if (st && strcmp(st, "current") == 0) {
		kv("policy", "current (version %s)", tx(&t, p, "version", CELL_TEXT));
	} else if (st && strcmp(st, "stale") == 0) {
		const char *d = jstr(p, "detail");
		kv("policy", "stale for %s s (version %s in force)%s%s", tx(&t, p, "stale_for_s", CELL_TEXT),
		   tx(&t, p, "version", CELL_TEXT), d && *d ? ": " : "", d && *d ? d : "");
	} else if (st && strcmp(st, "degraded") == 0) {
		const char *d = jstr(p, "detail");
		kv("policy", "degraded (version %s)%s%s", tx(&t, p, "version", CELL_TEXT), d && *d ? ": " : "",
		   d && *d ? d : "");
	} else {
		char *s = cell_text(p, CELL_TEXT, 200);
		kv("policy", "%s", s ? s : "?");
		free(s);
	}
}

static void print_status(const struct ctl *c, const json_t *ready, const json_t *adapters, const char *adapters_why,
			 const json_t *stats, const char *stats_why)
{
	TEXTS(t);
	json_t *db = json_object_get(ready, "database"), *mig = json_object_get(ready, "migrations");
	kv("daemon", "%s: %s", c->shown_url, tx(&t, ready, "status", CELL_TEXT));
	kv("database", "%s, %s ms%s%s", tx(&t, db, "status", CELL_TEXT), tx(&t, db, "latency_ms", CELL_TEXT),
	   jstr(db, "detail") ? ": " : "", jstr(db, "detail") ? jstr(db, "detail") : "");
	kv("migrations", "%s (%s of %s applied)", tx(&t, mig, "status", CELL_TEXT),
	   tx(&t, mig, "applied", CELL_TEXT), tx(&t, mig, "expected", CELL_TEXT));
	/* Shown, not a cause of exit 1: a stale policy is reported, not a
	 * readiness condition, as the adapters' health is (docs/causewayctl.md). */
	json_t *pol = json_object_get(ready, "policy");
	if (!pol)
		pol = json_object_get(adapters, "policy");
	if (pol)
		print_policy(pol);
	const char *name;
	json_t *h;
	json_object_foreach(json_object_get(ready, "adapters"), name, h)
		print_adapter(name, json_object_get(adapters, name) ? json_object_get(adapters, name) : h);
	if (adapters) {
		json_t *p = json_object_get(adapters, "peer");
		kv("dispatcher", "%s", tx(&t, json_object_get(adapters, "dispatcher"), "status", CELL_TEXT));
		/* The push peers nothing is pushed to (push_url_problems, since
		 * the fifty-second session; a daemon before it says none), named
		 * as far as the API lists them. */
		struct line l = LINE_INIT;
		line_add(&l, "%s (%s enabled), %s pending, %s dead", tx(&t, p, "peers", CELL_TEXT),
			 tx(&t, p, "enabled", CELL_TEXT), tx(&t, p, "pending", CELL_TEXT), tx(&t, p, "dead", CELL_TEXT));
		json_int_t bad = json_integer_value(json_object_get(p, "push_url_problems"));
		json_t *names = json_object_get(p, "push_url_problem_peers");
		if (bad > 0) {
			line_add(&l, ", %lld push URL problem%s (", (long long)bad, bad == 1 ? "" : "s");
			size_t i;
			json_t *nm;
			json_array_foreach(names, i, nm)
				line_add(&l, "%s%s", i ? ", " : "", json_is_string(nm) ? json_string_value(nm) : "?");
			line_add(&l, "%s: causewayctl peers)", (size_t)bad > json_array_size(names) ? ", …" : "");
		}
		line_done(&l, "peers", NULL);
	} else {
		kv("adapters", "not shown: %s", adapters_why);
	}
	if (stats) {
		json_t *q = json_object_get(stats, "queue"), *l = json_object_get(stats, "latency_ms");
		kv("queue", "%s pending, %s in flight, %s held, %s dead, %s failed", tx(&t, q, "pending", CELL_TEXT),
		   tx(&t, q, "in_flight", CELL_TEXT), tx(&t, q, "held", CELL_TEXT), tx(&t, q, "dead", CELL_TEXT),
		   tx(&t, q, "failed", CELL_TEXT));
		kv("latency", "p50 %s ms, p90 %s ms, p99 %s ms (%s deliveries)", tx(&t, l, "p50", CELL_TEXT),
		   tx(&t, l, "p90", CELL_TEXT), tx(&t, l, "p99", CELL_TEXT), tx(&t, l, "count", CELL_TEXT));
		counts_line("last hour", json_object_get(stats, "totals"), "adapter", "direction", "no traffic");
		counts_line("decisions", json_object_get(stats, "decisions"), "verdict", "reason", "none");
	} else {
		kv("stats", "not shown: %s", stats_why);
	}
}

/* /readyz (no token) with /admin/v1/adapters and /admin/v1/stats: what
 * answers is shown even if another part is refused (then exit 1). */
static enum ctl_rc cmd_status(struct ctl *c, char **argv)
{
	struct answer ready, parts[2] = { { 0 }, { 0 } };
	static const char *const paths[2] = { "/admin/v1/adapters", "/admin/v1/stats" };
	char *why[2] = { NULL, NULL }; /* a part's refusal; NULL: it answered */
	enum ctl_rc rc = http_call(c, "GET", "/readyz", NULL, NULL, false, &ready);
	if (rc)
		return rc;
	/* Until the forty-seventh session's review a body that was not JSON
	 * (a proxy's error page) was said to be empty, and a redirect too. */
	if (!ready.body) {
		if (ready.location)
			rc = refusal(c, &ready, "GET /readyz: ", "");
		else
			rc = fail(c, CTL_EREFUSED, "the answer to GET /readyz (HTTP %ld) is %s: is %s causewayd?",
				  ready.status, ready.not_json ? "not a JSON object" : "empty", c->shown_url);
		answer_free(&ready);
		return rc;
	}
	for (int i = 0; i < 2 && !rc; i++) {
		rc = http_call(c, "GET", paths[i], NULL, NULL, true, &parts[i]);
		bool ok = !rc && parts[i].status >= 200 && parts[i].status <= 299 && parts[i].body;
		if (!rc && !ok) {
			refusal(c, &parts[i], "", "");
			if (!(why[i] = c->err)) /* taken over */
				rc = CTL_EREFUSED; /* out of memory */
			c->err = NULL;
		}
	}
	if (!rc && c->json) {
		json_t *all = json_pack("{s:O, s:O?, s:O?}", "ready", ready.body, "adapters", parts[0].body, "stats",
					parts[1].body);
		if (all)
			print_json(all);
		else
			rc = fail(c, CTL_EREFUSED, "out of memory");
		json_decref(all);
	} else if (!rc) {
		print_status(c, ready.body, why[0] ? NULL : parts[0].body, why[0], why[1] ? NULL : parts[1].body,
			     why[1]);
	}
	/* A daemon that is not ready (/readyz 503: the database down, a
	 * migration missing) is a status a script must see: exit 1 (until the
	 * thirty-fourth session it was 0 whenever the admin parts answered). */
	char unready[160] = "";
	if (!rc && (ready.status < 200 || ready.status > 299))
		snprintf(unready, sizeof(unready), "the daemon is not ready: GET /readyz answered %ld (%.40s)%s",
			 ready.status, jstr_or(ready.body, "status"), why[0] || why[1] ? "; " : "");
	if (!rc && (unready[0] || why[0] || why[1])) {
		/* One reason when both parts were refused alike (a wrong token). */
		if (!why[0] && !why[1])
			rc = fail(c, CTL_EREFUSED, "%s", unready);
		else if (!why[0] || !why[1] || strcmp(why[0], why[1]) == 0)
			rc = fail(c, CTL_EREFUSED, "%s%s", unready, why[0] ? why[0] : why[1]);
		else
			rc = fail(c, CTL_EREFUSED, "%sadapters: %s; stats: %s", unready, why[0], why[1]);
	}
	answer_free(&ready);
	answer_free(&parts[0]);
	answer_free(&parts[1]);
	free(why[0]);
	free(why[1]);
	return rc;
}

/* ------------------------------------------------------------ the command table */

struct command {
	const char *name;     /* one or two words */
	const char *args;     /* the synopsis after the name */
	int nargs;            /* positional arguments after the name */
	unsigned opts;        /* OPT_* it accepts */
	enum ctl_rc (*run)(struct ctl *, char **argv);
	const char *summary;  /* for the command list */
	const char *help;     /* for help COMMAND */
	enum ctl_rc (*check)(struct ctl *); /* the options, before anything is asked; may be NULL */
};

static const struct command commands[] = {
	{ "status", "", 0, 0, cmd_status, "readiness, adapters, queue and the last hour",
	  "Shows GET /readyz (asked without the token), GET /admin/v1/adapters and GET /admin/v1/stats\n"
	  "as one summary. A part the API refuses is left out and named; the exit status is then 1,\n"
	  "as it is when the daemon is not ready (/readyz answers 503). The policy line says \"stale\"\n"
	  "when the rules could not be reloaded for 5 s or more; that is shown, not an exit status of 1\n"
	  "(the daemon goes on with the rules in force, as it does with an adapter that is down).\n"
	  "With --json: {\"ready\": ..., \"adapters\": ..., \"stats\": ...}, each as the API answered.\n"
	  "\nexample: causewayctl status", NULL },
	{ "peers", "", 0, 0, cmd_peers, "the peer providers",
	  "Lists the peers (GET /admin/v1/peers): name, domain, mode, enabled, push URL.\n"
	  "\nexample: causewayctl peers", NULL },
	{ "peers add", "NAME DOMAIN --key KEY (--push-url URL | --pull) [--event-types T,T]", 2, OPT_KEY | OPT_PEER,
	  cmd_peer_add, "register a peer (its token shown once)",
	  "Registers a peer provider (POST /admin/v1/peers): its name (a-z, 0-9, '_', '-'), its domain\n"
	  "(its users are mimi://DOMAIN/u/...), its Ed25519 public key (--key: base64 of the 32 bytes,\n"
	  "which its requests are signed with), and how it is sent its events: pushed to --push-url\n"
	  "(POST URL/v1/notify) or, with --pull, pulled by it (GET /v1/events). --event-types lists\n"
	  "the event types it takes (message among them; default every type). The peer's bearer token\n"
	  "is printed this once: give it to the peer's operator. Needs an admin token.\n"
	  "\nexample: causewayctl peers add gk wa.example --key 11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo= "
	  "--push-url https://interop.wa.example", check_peer_add },
	{ "peers disable", "NAME", 1, 0, cmd_peer_disable, "refuse a peer's requests, hold its rows",
	  "Disables a peer (POST /admin/v1/peers/NAME/disable): every daemon process refuses its\n"
	  "requests (401) from its next one, and its deliveries wait until it is enabled again.\n"
	  "\nexample: causewayctl peers disable gk", NULL },
	{ "peers enable", "NAME", 1, 0, cmd_peer_enable, "take a disabled peer back",
	  "Enables a disabled peer again (POST /admin/v1/peers/NAME/enable).\n"
	  "\nexample: causewayctl peers enable gk", NULL },
	{ "peers rotate", "NAME [--key KEY]", 1, OPT_KEY, cmd_peer_rotate, "a new token for a peer (shown once)",
	  "Gives a peer a new bearer token (POST /admin/v1/peers/NAME/rotate), and with --key a new\n"
	  "Ed25519 public key; the old token is refused from then on. The new token is printed this\n"
	  "once: give it to the peer's operator.\n"
	  "\nexample: causewayctl peers rotate gk", NULL },
	{ "rules", "", 0, OPT_PAGE, cmd_rules, "the server rules",
	  "Lists the server rules (GET /admin/v1/rules), every page unless --limit.\n"
	  "\nexample: causewayctl rules --limit 20", NULL },
	{ "rules add", "SCOPE PATTERN [--mode M] [--limits JSON] [--comment TEXT] [--expires-in SECONDS]", 2, OPT_RULE,
	  cmd_rule_add, "make a server rule",
	  "Makes a server rule (POST /admin/v1/rules, docs/policy.md): SCOPE is domain, user or network;\n"
	  "PATTERN a domain (spam.example, *.example), a user (mimi://spam.example/u/eve) or a peer's\n"
	  "network (peer:gk, peer:*). --mode is open, allowlist, closed or deny; --limits a JSON object\n"
	  "of rate limits ('{\"messages_per_minute\": 30}'); a rule needs one or both. --expires-in ends\n"
	  "it after that many seconds. Every daemon process applies it within about a second.\n"
	  "\nexample: causewayctl rules add domain spam.example --mode deny --comment 'abuse wave'",
	  check_rule_add },
	{ "rules delete", "ID", 1, 0, cmd_rule_delete, "delete a server rule",
	  "Deletes a server rule (DELETE /admin/v1/rules/ID; the ID column of causewayctl rules).\n"
	  "\nexample: causewayctl rules delete 12", NULL },
	{ "users", "", 0, OPT_PAGE, cmd_users, "local users: opt-ins, consents, held",
	  "Lists the local users (GET /admin/v1/users) with their opt-ins, consents, held messages\n"
	  "and pending consent requests.\n"
	  "\nexample: causewayctl users", NULL },
	{ "held", "", 0, OPT_PAGE, cmd_held, "messages held for consent",
	  "Lists the messages held for consent (GET /admin/v1/held) and when each expires.\n"
	  "\nexample: causewayctl held", NULL },
	{ "trace", "MESSAGE-ID", 1, 0, cmd_trace, "a message's origin, decisions and deliveries",
	  "Shows where a message came from, each policy decision about it (verdict and reason),\n"
	  "and each delivery with every attempt (GET /admin/v1/messages/MESSAGE-ID).\n"
	  "\nexample: causewayctl trace msg_3q2fJ0bM1xk9W1p5f7YqAg", NULL },
	{ "outbox", "[--state S] [--destination D]", 0, OPT_OUTBOX | OPT_PAGE, cmd_outbox, "deliveries, by state",
	  "Lists the deliveries (GET /admin/v1/outbox) in id order: --state pending, held, in_flight,\n"
	  "delivered, failed, dead, dropped or expired; --destination peer:NAME, matrix or xmpp\n"
	  "(matched whole; xmpp for every component). Without --limit every page: with no --state that\n"
	  "is every delivery ever made (up to 100000 rows); give --state or --limit.\n"
	  "\nexample: causewayctl outbox --state failed --destination peer:gk", check_outbox },
	{ "deadletters", "", 0, OPT_PAGE, cmd_deadletters, "deliveries that gave up",
	  "Lists the dead letters (GET /admin/v1/outbox?state=dead): deliveries that used up their\n"
	  "retries. The ID column is what replay and discard take.\n"
	  "\nexample: causewayctl deadletters", NULL },
	{ "deadletters replay", "OUTBOX-ID", 1, 0, cmd_replay, "send a dead letter again",
	  "Sends a dead (or failed) delivery again from its first attempt\n"
	  "(POST /admin/v1/outbox/OUTBOX-ID/replay). Needs an admin token. The earliest\n"
	  "dead letter of a room to a destination goes first: a later one is refused (409,\n"
	  "naming the earlier) so that the room's messages arrive in order.\n"
	  "\nexample: causewayctl deadletters replay 12", NULL },
	{ "deadletters discard", "OUTBOX-ID", 1, 0, cmd_discard, "give up on a dead letter",
	  "Gives up on a dead (or failed) delivery: it becomes dropped, and the trace keeps it\n"
	  "(POST /admin/v1/outbox/OUTBOX-ID/discard). Needs an admin token.\n"
	  "\nexample: causewayctl deadletters discard 12", NULL },
	{ "reports", "[--open]", 0, OPT_OPEN | OPT_PAGE, cmd_reports, "abuse reports",
	  "Lists the abuse reports (GET /admin/v1/reports), oldest first; with --open only those\n"
	  "not handled yet. The ID column is what handle and dismiss take.\n"
	  "\nexample: causewayctl reports --open", NULL },
	{ "reports handle", "REPORT-ID", 1, 0, cmd_report_handle, "mark a report handled",
	  "Marks a report handled (POST /admin/v1/reports/REPORT-ID/handle; audited as report.handle).\n"
	  "A report handled already is refused (409, naming when and by whom). Needs an admin token.\n"
	  "\nexample: causewayctl reports handle 12", NULL },
	{ "reports dismiss", "REPORT-ID", 1, 0, cmd_report_dismiss, "dismiss a report",
	  "Dismisses a report (POST /admin/v1/reports/REPORT-ID/dismiss): it is handled, and no longer\n"
	  "counts toward the automatic limit of its subject; a limit in force stays (docs/policy.md,\n"
	  "\"Dismissed reports\"), and is named. Needs an admin token.\n"
	  "\nexample: causewayctl reports dismiss 12", NULL },
	{ "token list", "", 0, 0, cmd_token_list, "the named admin tokens",
	  "Lists the named admin tokens (GET /admin/v1/tokens); never the tokens themselves.\n"
	  "\nexample: causewayctl token list", NULL },
	{ "token create", "NAME [--role admin|viewer]", 1, OPT_ROLE, cmd_token_create, "make a token (shown once)",
	  "Makes a named token (POST /admin/v1/tokens) with the role admin (the default) or viewer\n"
	  "(may read everything, change nothing). The token is printed this once: keep it then.\n"
	  "\nexample: causewayctl token create night-shift --role viewer", NULL },
	{ "token revoke", "NAME", 1, 0, cmd_token_revoke, "revoke a token at once",
	  "Revokes a named token (POST /admin/v1/tokens/NAME/revoke): every daemon process refuses it\n"
	  "within about a second. The name stays taken.\n"
	  "\nexample: causewayctl token revoke night-shift", NULL },
	{ "audit", "[--action A] [--actor X] [--message MSG]", 0, OPT_FILTER | OPT_PAGE, cmd_audit, "the audit log",
	  "Lists the audit log (GET /admin/v1/audit), oldest first. --action takes an action\n"
	  "(token.create) or a prefix ending in a dot (policy.); --actor an actor (admin:night-shift);\n"
	  "--message a message id.\n"
	  "\nexample: causewayctl audit --action outbox. --limit 50", NULL },
};

static const char global_help[] =
	"options:\n"
	"  --url URL          the daemon's URL (else CAUSEWAY_URL, else the file's, else " DEFAULT_URL ")\n"
	"  --token TOKEN      the admin token (else CAUSEWAY_ADMIN_TOKEN, else the file);\n"
	"                     other users can see it in ps: prefer --token-file\n"
	"  --token-file FILE  read the token from the first line of FILE\n"
	"  --ca-file FILE     https://: the CA certificates to trust (else CAUSEWAY_CA_FILE,\n"
	"                     else the file's, else the system's); certificate and host name are verified\n"
	"  --config FILE      the settings file (default $XDG_CONFIG_HOME/causeway/causewayctl.ini\n"
	"                     or ~/.config/causeway/causewayctl.ini): [causewayctl] url, token, token_file,\n"
	"                     ca_file\n"
	"  --json             print the API's JSON answer (pretty-printed) instead of a table\n"
	"  --limit N          list commands: show at most N rows (default: every page)\n"
	"  --after ID         list commands: start after the row ID\n"
	"  -h, --help         this text; help COMMAND for one command\n"
	"\n"
	"exit status: 0 done, 1 the API refused (the reason is printed), 2 usage error,\n"
	"3 the daemon cannot be reached.\n";

static void usage(FILE *f)
{
	fputs("usage: causewayctl [options] COMMAND [ARGUMENTS]\n\n"
	      "The operator's command-line client of causewayd's admin API (/admin/v1).\n\ncommands:\n", f);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		char syn[120];
		const struct command *k = &commands[i];
		snprintf(syn, sizeof(syn), "%s%s%s", k->name, k->args[0] ? " " : "", k->args);
		if (strlen(syn) > 30) /* the summary on a line of its own */
			fprintf(f, "  %s\n  %-30s %s\n", syn, "", k->summary);
		else
			fprintf(f, "  %-30s %s\n", syn, k->summary);
	}
	fprintf(f, "  %-30s %s\n\n%s", "help [COMMAND]", "this text, or one command's", global_help);
}

/* Prints the help of the commands named w1 (and w2): "help token" shows
 * every token command.  Returns how many it printed. */
static int command_help(const char *w1, const char *w2)
{
	int shown = 0;
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		const struct command *k = &commands[i];
		size_t n1 = strlen(w1);
		bool first = strncmp(k->name, w1, n1) == 0 && (k->name[n1] == '\0' || k->name[n1] == ' ');
		bool match = first && (!w2 || (k->name[n1] == ' ' && strcmp(k->name + n1 + 1, w2) == 0));
		if (!match)
			continue;
		printf("%susage: causewayctl %s%s%s\n\n%s\n", shown++ ? "\n" : "", k->name, k->args[0] ? " " : "",
		       k->args, k->help);
	}
	if (shown)
		printf("\n%s", global_help);
	return shown;
}

/* "replay, discard" for "deadletters": false if word has no subcommands. */
static bool subcommands(const char *word, char *out, size_t len)
{
	size_t n1 = strlen(word);
	out[0] = '\0';
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (strncmp(commands[i].name, word, n1) == 0 && commands[i].name[n1] == ' ')
			snprintf(out + strlen(out), len - strlen(out), "%s%s", out[0] ? ", " : "",
				 commands[i].name + n1 + 1);
	return out[0] != '\0';
}

/* The command named by the first one or two words of args. */
static const struct command *find_command(int n, char **args, int *words)
{
	for (size_t i = 0; n >= 2 && i < sizeof(commands) / sizeof(commands[0]); i++) {
		size_t n1 = strlen(args[0]);
		if (strncmp(commands[i].name, args[0], n1) == 0 && commands[i].name[n1] == ' ' &&
		    strcmp(commands[i].name + n1 + 1, args[1]) == 0) {
			*words = 2;
			return &commands[i];
		}
	}
	for (size_t i = 0; n >= 1 && i < sizeof(commands) / sizeof(commands[0]); i++)
		if (strcmp(commands[i].name, args[0]) == 0) {
			*words = 1;
			return &commands[i];
		}
	return NULL;
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
	/* It quotes the command line back, which may come from elsewhere (a
	 * script's variable, a pasted id): defanged as the API's words are,
	 * where until the forty-ninth session's review an escape sequence in
	 * an unknown command went to the terminal as it was.  Whole: until the
	 * fiftieth session's review it was cut at 399 bytes without a mark. */
	va_list ap;
	va_start(ap, fmt);
	char *why = vformat(fmt, ap);
	va_end(ap);
	if (why)
		defang(why);
	fprintf(stderr, "causewayctl: %s (see causewayctl --help)\n", why ? why : "out of memory");
	free(why);
	return CTL_EUSAGE;
}

int main(int argc, char **argv)
{
	enum { O_URL = 256, O_TOKEN, O_TOKEN_FILE, O_CA_FILE, O_CONFIG, O_JSON, O_ROLE, O_ACTION, O_ACTOR, O_MESSAGE, O_LIMIT,
	       O_AFTER, O_KEY, O_PUSH_URL, O_PULL, O_EVENT_TYPES, O_MODE, O_LIMITS, O_COMMENT, O_EXPIRES_IN, O_OPEN,
	       O_STATE, O_DESTINATION };
	static const struct option longopts[] = {
		{ "url", required_argument, NULL, O_URL },
		{ "token", required_argument, NULL, O_TOKEN },
		{ "token-file", required_argument, NULL, O_TOKEN_FILE },
		{ "ca-file", required_argument, NULL, O_CA_FILE },
		{ "config", required_argument, NULL, O_CONFIG },
		{ "json", no_argument, NULL, O_JSON },
		{ "role", required_argument, NULL, O_ROLE },
		{ "action", required_argument, NULL, O_ACTION },
		{ "actor", required_argument, NULL, O_ACTOR },
		{ "message", required_argument, NULL, O_MESSAGE },
		{ "limit", required_argument, NULL, O_LIMIT },
		{ "after", required_argument, NULL, O_AFTER },
		{ "key", required_argument, NULL, O_KEY },
		{ "push-url", required_argument, NULL, O_PUSH_URL },
		{ "pull", no_argument, NULL, O_PULL },
		{ "event-types", required_argument, NULL, O_EVENT_TYPES },
		{ "mode", required_argument, NULL, O_MODE },
		{ "limits", required_argument, NULL, O_LIMITS },
		{ "comment", required_argument, NULL, O_COMMENT },
		{ "expires-in", required_argument, NULL, O_EXPIRES_IN },
		{ "open", no_argument, NULL, O_OPEN },
		{ "state", required_argument, NULL, O_STATE },
		{ "destination", required_argument, NULL, O_DESTINATION },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct ctl c = { 0 };
	struct source flags = { 0 };
	const char *config = NULL;
	bool help = false;
	long long num;
	int opt, rc = CTL_OK;
	/* wcwidth's table (columns_upto), whatever locale the terminal has:
	 * nothing else causewayctl does depends on LC_CTYPE. */
	setlocale(LC_CTYPE, "C.UTF-8");
	opterr = 0;
	while ((opt = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		char **slot = NULL;
		switch (opt) {
		case O_URL:
			slot = &flags.url;
			break;
		case O_TOKEN:
			slot = &flags.token;
			break;
		case O_TOKEN_FILE:
			slot = &flags.token_file;
			break;
		case O_CA_FILE:
			slot = &flags.ca_file;
			break;
		case O_CONFIG:
			config = optarg;
			break;
		case O_JSON:
			c.json = true;
			break;
		case 'h':
			help = true;
			break;
		case O_ROLE:
			if (strcmp(optarg, "admin") != 0 && strcmp(optarg, "viewer") != 0)
				rc = usage_error("--role takes admin or viewer, not '%.40s'", optarg);
			c.role = optarg;
			c.given |= OPT_ROLE;
			break;
		case O_ACTION:
		case O_ACTOR:
		case O_MESSAGE:
			*(opt == O_ACTION ? &c.action : opt == O_ACTOR ? &c.actor : &c.message) = optarg;
			c.given |= OPT_FILTER;
			break;
		case O_LIMIT:
			if (!cw_decimal(optarg, 1, 10000000, false, &num))
				rc = usage_error("--limit takes a number of rows from 1 on, not '%.40s'", optarg);
			c.limit = (long)num;
			c.given |= OPT_PAGE;
			break;
		case O_AFTER:
			if (!cw_decimal(optarg, 0, 999999999999999999LL, false, &num))
				rc = usage_error("--after takes a row id (0 or more), not '%.40s'", optarg);
			c.after = num;
			c.given |= OPT_PAGE;
			break;
		case O_KEY:
			c.key = optarg;
			c.given |= OPT_KEY;
			break;
		case O_PUSH_URL:
		case O_EVENT_TYPES:
			*(opt == O_PUSH_URL ? &c.push_url : &c.event_types) = optarg;
			c.given |= OPT_PEER;
			break;
		case O_PULL:
			c.pull = true;
			c.given |= OPT_PEER;
			break;
		case O_OPEN:
			c.open = true;
			c.given |= OPT_OPEN;
			break;
		case O_STATE:
		case O_DESTINATION:
			*(opt == O_STATE ? &c.state : &c.destination) = optarg;
			c.given |= OPT_OUTBOX;
			break;
		case O_MODE:
		case O_LIMITS:
		case O_COMMENT:
			*(opt == O_MODE ? &c.mode : opt == O_LIMITS ? &c.limits : &c.comment) = optarg;
			c.given |= OPT_RULE;
			break;
		case O_EXPIRES_IN:
			if (!cw_decimal(optarg, 1, 315360000LL, false, &num))
				rc = usage_error("--expires-in takes a number of seconds from 1 to ten years, not '%.40s'",
						 optarg);
			c.expires_in = num;
			c.given |= OPT_RULE;
			break;
		case ':':
			rc = usage_error("%s needs a value", argv[optind - 1]);
			break;
		default:
			if (optopt)
				rc = usage_error("unknown option '-%c'", optopt);
			else
				rc = usage_error("unknown option '%s'", argv[optind - 1]);
			break;
		}
		if (slot) {
			free(*slot);
			if (!(*slot = strdup(optarg)))
				rc = usage_error("out of memory");
			if (opt == O_TOKEN) /* out of ps's sight from now on (it was visible until here) */
				memset(optarg, 'x', strlen(optarg));
		}
		if (rc)
			goto out;
	}
	int n = argc - optind;
	char **args = argv + optind;
	const struct command *cmd = NULL;
	int words = 0;
	if (n >= 1 && strcmp(args[0], "help") == 0) {
		if (n == 1) {
			usage(stdout);
		} else if (n > 3 || !command_help(args[1], n == 3 ? args[2] : NULL)) {
			rc = usage_error("no command '%.40s%s%.40s'", args[1], n == 3 ? " " : "",
					 n == 3 ? args[2] : "");
		}
		goto out;
	}
	if (n == 0) {
		if (help)
			usage(stdout);
		else
			rc = usage_error("no command given");
		goto out;
	}
	if (!(cmd = find_command(n, args, &words))) {
		char subs[200];
		if (!subcommands(args[0], subs, sizeof(subs)))
			rc = usage_error("no command '%.40s'", args[0]);
		else if (n == 1)
			rc = usage_error("%s needs a subcommand: %s", args[0], subs);
		else
			rc = usage_error("%s has no subcommand '%.40s' (it has %s)", args[0], args[1], subs);
		goto out;
	}
	if (help) {
		command_help(args[0], words == 2 ? args[1] : NULL);
		goto out;
	}
	char subs[200];
	if (n - words > cmd->nargs && words == 1 && subcommands(args[0], subs, sizeof(subs))) {
		rc = usage_error("%s has no subcommand '%.40s' (it has %s)", args[0], args[1], subs);
		goto out;
	}
	if (n - words != cmd->nargs) {
		rc = usage_error("usage: causewayctl %s%s%s", cmd->name, cmd->args[0] ? " " : "", cmd->args);
		goto out;
	}
	if (c.given & ~cmd->opts) {
		unsigned extra = c.given & ~cmd->opts, bit = 0;
		while (!(extra & (1u << bit)))
			bit++;
		rc = usage_error("%s takes no %s", cmd->name, opt_names[bit]);
		goto out;
	}
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(c.curl = curl_easy_init())) {
		fputs("causewayctl: cannot start libcurl\n", stderr);
		rc = CTL_EREFUSED;
		goto out;
	}
	rc = cmd->check ? cmd->check(&c) : CTL_OK;
	if (!rc)
		rc = resolve(&c, &flags, config);
	if (!rc)
		rc = cmd->run(&c, args + words);
	if (rc)
		fprintf(stderr, "causewayctl: %s\n", c.err ? c.err : "out of memory");
	curl_easy_cleanup(c.curl);
	curl_global_cleanup();
out:
	if (fflush(stdout) != 0 || ferror(stdout)) {
		fprintf(stderr, "causewayctl: cannot write the output: %s\n", strerror(errno));
		rc = rc ? rc : CTL_EREFUSED;
	}
	curl_free(c.url);
	curl_free(c.shown_url);
	free(c.token);
	free(c.ca_file);
	free(c.err);
	json_decref(c.types_json);
	json_decref(c.limits_json);
	source_free(&flags);
	return rc;
}
