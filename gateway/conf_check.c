/* Checks of the configuration that need a library's parser, apart from
 * the code that uses the values, so that the configuration's fuzz target
 * links them alone: database.url by libpq's (store_check_url, store.h),
 * server.listen_address by getaddrinfo (http.h). */
#include "config.h"
#include "http.h"
#include "store.h"
#include <ctype.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/types.h>

/* url parsed by libpq (PQconninfoFree), and into *conninfo whether it is
 * a URI or key=value string, as libpq's expand_dbname tells them (a URI
 * by its two prefixes only: a database may be named "postgres" or
 * "postgres_x"); NULL for anything else, a database's name, or one libpq
 * cannot parse (whose message, which quotes the URL, password and all, is
 * dropped). */
static PQconninfoOption *parse_url(const char *url, bool *conninfo)
{
	*conninfo = strchr(url, '=') || strncmp(url, "postgresql://", 13) == 0 || strncmp(url, "postgres://", 11) == 0;
	char *perr = NULL;
	PQconninfoOption *parsed = *conninfo ? PQconninfoParse(url, &perr) : NULL;
	PQfreemem(perr);
	return parsed;
}

/* The values libpq (15, Debian's) takes for the parameters it checks only
 * when it connects (connectOptions2, PQconnectPoll): PQconninfoParse takes
 * any.  Until the fiftieth session's review sslmode=required passed
 * --check-config, and the start then tried the connection again and again
 * for database.startup_timeout_ms (30 s) before it gave up on the
 * parameter's error.  An empty value is refused as libpq refuses it, but
 * for the TLS bounds' (none). */
static const struct {
	const char *keyword, *values; /* values: '|'-separated */
	bool any_case, empty_ok;
} libpq_enums[] = {
	{ "sslmode", "disable|allow|prefer|require|verify-ca|verify-full", false, false },
	{ "gssencmode", "disable|prefer|require", false, false },
	{ "channel_binding", "disable|prefer|require", false, false },
	{ "target_session_attrs", "any|read-write|read-only|primary|standby|prefer-standby", false, false },
	{ "ssl_min_protocol_version", "TLSv1|TLSv1.1|TLSv1.2|TLSv1.3", true, true },
	{ "ssl_max_protocol_version", "TLSv1|TLSv1.1|TLSv1.2|TLSv1.3", true, true },
};

/* libpq's integer parameters (parse_int_param: an int, strtol's blanks
 * and sign before it, blanks after; empty is not one).  keepalives_idle,
 * _interval and _count go to setsockopt on each TCP connection when
 * keepalives is on (the daemon's default), and Linux takes them only
 * within tcp_min..tcp_max: a 0 or -1 failed every connection, as the
 * start's retries ran out ("setsockopt(TCP_KEEPIDLE) failed").  On a Unix
 * socket libpq does not look at them. */
static const struct {
	const char *keyword;
	long tcp_min, tcp_max; /* 0, 0: any int */
} libpq_ints[] = {
	{ "connect_timeout", 0, 0 },	     { "keepalives", 0, 0 },	       { "keepalives_idle", 1, 32767 },
	{ "keepalives_interval", 1, 32767 }, { "keepalives_count", 1, 127 }, { "tcp_user_timeout", 0, 0 },
};

static bool one_of(const char *v, const char *values, bool any_case)
{
	size_t n = strlen(v);
	for (const char *p = values; *p;) {
		size_t k = strcspn(p, "|");
		if (k == n && (any_case ? strncasecmp(p, v, n) : strncmp(p, v, n)) == 0)
			return true;
		p += k + (p[k] == '|');
	}
	return false;
}

/* v's first n bytes an int as libpq's parse_int_param reads one. */
static bool libpq_int(const char *v, size_t n, long *out)
{
	char buf[64];
	if (n >= sizeof(buf)) /* blanks around a number that long: not worth taking */
		return false;
	memcpy(buf, v, n);
	buf[n] = '\0';
	char *end;
	errno = 0;
	long x = strtol(buf, &end, 10);
	if (end == buf || errno || x != (int)x)
		return false;
	while (isspace((unsigned char)*end))
		end++;
	*out = x;
	return !*end;
}

/* The number of a host list's comma-separated values, as libpq counts
 * them (no quoting). */
static size_t count_list(const char *v)
{
	size_t n = 1;
	for (; *v; v++)
		n += *v == ',';
	return n;
}

/* Each of a port's comma-separated values (one a host) empty (the
 * default) or a port number (libpq's int, 1 to 65535). */
static bool ports_ok(const char *v)
{
	for (const char *p = v;;) {
		size_t k = strcspn(p, ",");
		long port;
		if (k > 0 && (!libpq_int(p, k, &port) || port < 1 || port > 65535))
			return false;
		if (!p[k])
			return true;
		p += k + 1;
	}
}

static const char *param(const PQconninfoOption *parsed, const char *keyword)
{
	for (const PQconninfoOption *o = parsed; o && o->keyword; o++)
		if (strcmp(o->keyword, keyword) == 0)
			return o->val && *o->val ? o->val : NULL;
	return NULL;
}

/* Whether libpq would make a TCP connection to one of the hosts: a
 * hostaddr, or a host not a socket's directory ('/' or '@' first); none
 * is the default socket (PGHOST aside). */
static bool some_tcp(const PQconninfoOption *parsed)
{
	if (param(parsed, "hostaddr"))
		return true;
	for (const char *p = param(parsed, "host"); p;) {
		size_t k = strcspn(p, ",");
		if (k > 0 && *p != '/' && *p != '@')
			return true;
		p = p[k] ? p + k + 1 : NULL;
	}
	return false;
}

/* As connectOptions2: as many host names as hostaddr values, and one port
 * for every host or one per host.  Hosts the URL does not give (PGHOST,
 * the default socket) are not counted. */
static cw_err check_hosts(const PQconninfoOption *parsed, cw_errmsg *e)
{
	const char *host = param(parsed, "host"), *addr = param(parsed, "hostaddr"), *port = param(parsed, "port");
	if (!host && !addr)
		return CW_OK;
	size_t hosts = count_list(addr ? addr : host);
	if (host && addr && count_list(host) != hosts)
		return cw_fail(e, CW_EINVAL, "database.url: host \"%.80s\" has %zu names for %zu hostaddr values (one "
			       "address per name)", host, count_list(host), hosts);
	if (port && count_list(port) != 1 && count_list(port) != hosts)
		return cw_fail(e, CW_EINVAL, "database.url: port \"%.40s\" has %zu values for %zu hosts (one port "
			       "for all, or one per host)", port, count_list(port), hosts);
	return CW_OK;
}

/* The parameters libpq checks only as it connects; their values (never
 * the password's) may be quoted. */
static cw_err check_params(const PQconninfoOption *parsed, cw_errmsg *e)
{
	const char *ka = param(parsed, "keepalives");
	long on = 1;
	bool tcp_keepalives = some_tcp(parsed) && (!ka || !libpq_int(ka, strlen(ka), &on) || on != 0);
	for (const PQconninfoOption *o = parsed; o && o->keyword; o++) {
		if (!o->val)
			continue;
		if (strcmp(o->keyword, "port") == 0 && !ports_ok(o->val))
			return cw_fail(e, CW_EINVAL, "database.url: port \"%.40s\" is not a port number (1 to 65535; "
				       "one per host, comma-separated)", o->val);
		for (size_t i = 0; i < sizeof(libpq_enums) / sizeof(libpq_enums[0]); i++)
			if (strcmp(o->keyword, libpq_enums[i].keyword) == 0 && !(libpq_enums[i].empty_ok && !*o->val) &&
			    !one_of(o->val, libpq_enums[i].values, libpq_enums[i].any_case))
				return cw_fail(e, CW_EINVAL, "database.url: %s \"%.40s\" is not one of libpq's values (%s)",
					       o->keyword, o->val, libpq_enums[i].values);
		for (size_t i = 0; i < sizeof(libpq_ints) / sizeof(libpq_ints[0]); i++) {
			long x;
			if (strcmp(o->keyword, libpq_ints[i].keyword) != 0)
				continue;
			if (!libpq_int(o->val, strlen(o->val), &x))
				return cw_fail(e, CW_EINVAL, "database.url: %s \"%.40s\" is not an integer (libpq takes "
					       "digits only, a sign and blanks around them)", o->keyword, o->val);
			if (tcp_keepalives && libpq_ints[i].tcp_max && (x < libpq_ints[i].tcp_min || x > libpq_ints[i].tcp_max))
				return cw_fail(e, CW_EINVAL, "database.url: %s \"%.40s\" is not within %ld to %ld: the "
					       "kernel would refuse it on every TCP connection with keepalives on",
					       o->keyword, o->val, libpq_ints[i].tcp_min, libpq_ints[i].tcp_max);
		}
	}
	return check_hosts(parsed, e);
}

cw_err store_check_url(const char *url, cw_errmsg *e)
{
	/* libpq's message for a URL it cannot parse quotes the URL, password
	 * and all: say what is wrong without it. */
	bool conninfo;
	PQconninfoOption *parsed = parse_url(url, &conninfo);
	if (conninfo && !parsed)
		return cw_fail(e, CW_EINVAL, "database.url is not a valid PostgreSQL URL or key=value string "
					     "(libpq's message is not shown: it would show the password)");
	cw_err rc = check_params(parsed, e);
	PQconninfoFree(parsed);
	if (rc)
		return rc;
	/* libpq takes anything else for a database's name, on the default
	 * socket: a URL it does not know as one (written in quotes, of
	 * another scheme, jdbc:postgresql://...) was checked valid, the start
	 * asked another server than the one meant for a database of that
	 * name, and logged the server's refusal, which quotes the name,
	 * password and all (until the forty-first session).  No database is
	 * meant by a name that holds "://", an '@' or a quote. */
	if (!conninfo && (strstr(url, "://") || strchr(url, '@') || strpbrk(url, "\"'")))
		return cw_fail(e, CW_EINVAL, "database.url is not a valid PostgreSQL URL or key=value string: a URL "
					     "begins postgresql:// (or postgres://), is written without quotes, and "
					     "a value without one of these forms is a database's name (the value "
					     "is not shown: it may hold a password)");
	return CW_OK;
}

bool store_url_has_password(const char *url)
{
	bool conninfo;
	PQconninfoOption *parsed = parse_url(url, &conninfo);
	bool has = false;
	for (PQconninfoOption *o = parsed; o && o->keyword; o++)
		if (strcmp(o->keyword, "password") == 0 && o->val && *o->val)
			has = true;
	PQconninfoFree(parsed);
	return has;
}

/* The socket address of listen_address and port (*ai: freeaddrinfo), or
 * CW_EINVAL: only a numeric address, no name looked up. */
cw_err cw_listen_addrinfo(const char *listen_address, unsigned port, struct addrinfo **ai, cw_errmsg *e)
{
	char p[8];
	snprintf(p, sizeof(p), "%u", port);
	struct addrinfo hints = { .ai_flags = AI_NUMERICHOST | AI_PASSIVE, .ai_socktype = SOCK_STREAM };
	int gai = getaddrinfo(listen_address, p, &hints, ai);
	if (gai)
		return cw_fail(e, CW_EINVAL, "server.listen_address '%s' is not a numeric address: %s", listen_address,
			       gai_strerror(gai));
	return CW_OK;
}

cw_err cw_http_listen_address_check(const char *listen_address, cw_errmsg *e)
{
	struct addrinfo *ai = NULL;
	if (cw_listen_addrinfo(listen_address, 0, &ai, e))
		return CW_EINVAL;
	freeaddrinfo(ai);
	return CW_OK;
}
