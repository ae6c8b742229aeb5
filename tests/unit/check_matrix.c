/* The Matrix adapter's pure parts: identifiers and ghosts (mx_id.h, cases in
 * tests/unit/data/matrix_ids.txt) and the content mapping (mx_map.h, cases in
 * tests/unit/data/matrix_map.txt), plus property loops over random input. */
#include "config.h"
#include "matrix/matrix_int.h"
#include "matrix/mx_cmd.h"
#include "matrix/mx_id.h"
#include "matrix/mx_map.h"
#include "peer/event.h"
#include "unit.h"

#include <ctype.h>
#include <libxml/xmlversion.h>
#include <pthread.h>
#include <stdint.h>

#define PREFIX "_cw_"
#define SERVER "example.org"
#define SENDER "mimi://example.org/u/alice"
#define ROOM "mimi://hub.example/r/r1"

/* ------------------------------------------------------------ helpers */

static void trim_newline(char *s)
{
	size_t n = strlen(s);
	while (n && (s[n - 1] == '\n' || s[n - 1] == '\r'))
		s[--n] = '\0';
}

/* Deterministic random numbers (xorshift64*), so failures repeat. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rnd(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1Dull;
}

static unsigned rnd_below(unsigned n)
{
	return (unsigned)(rnd() % n);
}

/* A neutral body from the mapping, with sender and room added, must pass the
 * neutral API's own validation. */
static void assert_event_parses_as(const json_t *neutral, const char *what, const char *sender, const char *room)
{
	json_t *full = json_deep_copy(neutral);
	ck_assert_ptr_nonnull(full);
	json_object_set_new(full, "sender", json_string(sender));
	json_object_set_new(full, "room", json_string(room));
	char *text = json_dumps(full, JSON_COMPACT);
	ck_assert_ptr_nonnull(text);
	struct event_limits lim = event_limits_default();
	struct event ev;
	struct event_error err;
	cw_err rc = event_parse(text, strlen(text), &lim, EVENT_REQUIRE_ROOM, &ev, &err);
	ck_assert_msg(rc == CW_OK, "%s: event_parse refused the mapping's output (%s %s: %s): %.300s", what, err.code,
		      err.pointer, err.detail, text);
	event_free(&ev);
	free(text);
	json_decref(full);
}

static void assert_event_parses(const json_t *neutral, const char *what)
{
	assert_event_parses_as(neutral, what, SENDER, ROOM);
}

/* ------------------------------------------------------------ identifier cases */

/* A token of matrix_ids.txt: "" is the empty string, escapes decoded. */
static char *token(const char *raw)
{
	size_t len;
	if (strcmp(raw, "\"\"") == 0)
		return strdup("");
	char *s = unit_decode(raw, &len);
	return s;
}

static int split(char *line, char **tok, int max)
{
	int n = 0;
	for (char *p = strtok(line, " "); p && n < max; p = strtok(NULL, " "))
		tok[n++] = p;
	return n;
}

START_TEST(id_cases)
{
	FILE *f = fopen(unit_data_path("matrix_ids.txt"), "r");
	ck_assert_msg(f != NULL, "cannot open %s", unit_data_path("matrix_ids.txt"));
	char *line = NULL;
	size_t cap = 0;
	int cases = 0, ghosts = 0, lineno = 0;
	while (getline(&line, &cap, f) != -1) {
		lineno++;
		trim_newline(line);
		if (line[0] == '#' || line[0] == '\0')
			continue;
		char *t[12];
		int n = split(line, t, 12);
		ck_assert_msg(n >= 2, "line %d: too short", lineno);
		const char *kind = t[0];
		if (strcmp(kind, "ghost") == 0) {
			/* ghost <prefix> <network> <remote> <server> -> <id>|bad */
			ck_assert_msg(n == 7 && strcmp(t[5], "->") == 0, "line %d: bad ghost line", lineno);
			char *prefix = token(t[1]), *net = token(t[2]), *remote = token(t[3]), *server = token(t[4]);
			char out[MX_ID_MAX + 1];
			bool ok = mx_ghost_id(prefix, net, remote, server, out, sizeof(out));
			if (strcmp(t[6], "bad") == 0) {
				ck_assert_msg(!ok, "line %d: ghost built %s, expected a refusal", lineno, out);
			} else {
				char *want = token(t[6]);
				ck_assert_msg(ok, "line %d: ghost refused, expected %s", lineno, want);
				ck_assert_msg(strcmp(out, want) == 0, "line %d: ghost %s, expected %s", lineno, out, want);
				ck_assert_msg(mx_user_id_parse(out, NULL, 0, NULL, 0), "line %d: not a user id", lineno);
				char local[MX_ID_MAX + 1];
				ck_assert(mx_user_id_parse(out, local, sizeof(local), NULL, 0) == false ||
					  mx_localpart_compliant(local));
				char srv[MX_ID_MAX + 1];
				ck_assert(mx_user_id_parse(out, local, sizeof(local), srv, sizeof(srv)));
				ck_assert_msg(mx_localpart_compliant(local), "line %d: %s is not compliant", lineno, local);
				char pn[MX_ID_MAX + 1], pr[MX_ID_MAX + 1];
				ck_assert_msg(mx_ghost_parse(prefix, server, out, pn, sizeof(pn), pr, sizeof(pr)),
					      "line %d: the ghost does not parse back", lineno);
				ck_assert_str_eq(pn, net);
				ck_assert_str_eq(pr, remote);
				/* A buffer one byte short fails cleanly. */
				ck_assert(!mx_ghost_id(prefix, net, remote, server, out, strlen(want)));
				ck_assert(!mx_ghost_parse(prefix, server, want, pn, strlen(net), pr, sizeof(pr)));
				ck_assert(!mx_ghost_parse(prefix, server, want, pn, sizeof(pn), pr, strlen(remote)));
				free(want);
				ghosts++;
			}
			free(prefix);
			free(net);
			free(remote);
			free(server);
		} else if (strcmp(kind, "unghost") == 0) {
			/* unghost <prefix> <server> <id> -> <network> <remote> | bad */
			ck_assert_msg(n >= 6 && strcmp(t[4], "->") == 0, "line %d: bad unghost line", lineno);
			char *prefix = token(t[1]), *server = token(t[2]), *id = token(t[3]);
			char net[MX_ID_MAX + 1], remote[MX_ID_MAX + 1];
			bool ok = mx_ghost_parse(prefix, server, id, net, sizeof(net), remote, sizeof(remote));
			if (strcmp(t[5], "bad") == 0) {
				ck_assert_msg(!ok, "line %d: %s parsed as ghost (%s, %s)", lineno, id, net, remote);
				ck_assert_str_eq(net, "");
				ck_assert_str_eq(remote, "");
			} else {
				ck_assert_msg(n == 7, "line %d: unghost needs network and remote", lineno);
				char *wn = token(t[5]), *wr = token(t[6]);
				ck_assert_msg(ok, "line %d: %s does not parse as a ghost", lineno, id);
				ck_assert_str_eq(net, wn);
				ck_assert_str_eq(remote, wr);
				char again[MX_ID_MAX + 1];
				ck_assert(mx_ghost_id(prefix, net, remote, server, again, sizeof(again)));
				ck_assert_str_eq(again, id);
				free(wn);
				free(wr);
			}
			free(prefix);
			free(server);
			free(id);
		} else {
			/* <kind> ok|bad <text> [-> <localpart> <server>] */
			ck_assert_msg(n == 3 || n == 6, "line %d: bad line", lineno);
			bool want = strcmp(t[1], "ok") == 0;
			ck_assert_msg(want || strcmp(t[1], "bad") == 0, "line %d: ok or bad", lineno);
			char *s = token(t[2]);
			char local[MX_ID_MAX + 1] = "", server[MX_ID_MAX + 1] = "";
			bool got;
			if (strcmp(kind, "user") == 0)
				got = mx_user_id_parse(s, local, sizeof(local), server, sizeof(server));
			else if (strcmp(kind, "alias") == 0)
				got = mx_room_alias_parse(s, local, sizeof(local), server, sizeof(server));
			else if (strcmp(kind, "room") == 0)
				got = mx_room_id_valid(s);
			else if (strcmp(kind, "event") == 0)
				got = mx_event_id_valid(s);
			else if (strcmp(kind, "server") == 0)
				got = mx_server_name_valid(s);
			else if (strcmp(kind, "compliant") == 0)
				got = mx_localpart_compliant(s);
			else if (strcmp(kind, "mxc") == 0) {
				const char *mid = NULL;
				got = mx_mxc_parse(s, server, sizeof(server), &mid);
				if (got)
					snprintf(local, sizeof(local), "%s", mid);
			}
			else
				ck_abort_msg("line %d: unknown kind %s", lineno, kind);
			ck_assert_msg(got == want, "line %d: %s %s: got %s", lineno, kind, t[2], got ? "ok" : "bad");
			if (n == 6) {
				ck_assert_msg(strcmp(t[3], "->") == 0, "line %d: expected ->", lineno);
				char *wl = token(t[4]), *ws = token(t[5]);
				ck_assert_msg(strcmp(local, wl) == 0, "line %d: localpart '%s', expected '%s'", lineno, local, wl);
				ck_assert_str_eq(server, ws);
				free(wl);
				free(ws);
			}
			free(s);
		}
		cases++;
	}
	free(line);
	fclose(f);
	ck_assert_int_ge(cases, 60);
	ck_assert_int_ge(ghosts, 10);
}
END_TEST

/* The room directory's path of an alias: the alias one escaped segment
 * ('#', ':' and '/' too), or nothing when it does not fit. */
START_TEST(alias_directory_path)
{
	char p[128];
	ck_assert(mx_alias_directory_path("#_cw_room_ab:example.org", p, sizeof(p)));
	ck_assert_str_eq(p, "/_matrix/client/v3/directory/room/%23_cw_room_ab%3Aexample.org");
	ck_assert(mx_alias_directory_path("#a/b c:example.org:8448", p, sizeof(p)));
	ck_assert_str_eq(p, "/_matrix/client/v3/directory/room/%23a%2Fb%20c%3Aexample.org%3A8448");
	size_t need = strlen("/_matrix/client/v3/directory/room/%23x%3Ay") + 1;
	ck_assert(mx_alias_directory_path("#x:y", p, need));
	ck_assert(!mx_alias_directory_path("#x:y", p, need - 1));
	ck_assert_str_eq(p, "");
	ck_assert(!mx_alias_directory_path(NULL, p, sizeof(p)));
	ck_assert_str_eq(p, "");
}
END_TEST

START_TEST(id_null_and_buffers)
{
	char a[8], b[64];
	ck_assert(!mx_user_id_parse(NULL, NULL, 0, NULL, 0));
	ck_assert(!mx_room_id_valid(NULL));
	ck_assert(!mx_event_id_valid(NULL));
	ck_assert(!mx_room_alias_parse(NULL, NULL, 0, NULL, 0));
	ck_assert(!mx_server_name_valid(NULL));
	ck_assert(!mx_localpart_compliant(NULL));
	ck_assert(!mx_mxc_parse(NULL, NULL, 0, NULL));
	ck_assert(mx_mxc_parse("mxc://example.org/x", NULL, 0, NULL)); /* validation only */
	ck_assert(!mx_mxc_parse("mxc://example.org/x", a, 8, NULL));   /* the server does not fit */
	ck_assert(!mx_ghost_id(NULL, "wa", "x", SERVER, b, sizeof(b)));
	ck_assert(!mx_ghost_id(PREFIX, NULL, "x", SERVER, b, sizeof(b)));
	ck_assert(!mx_ghost_id(PREFIX, "wa", NULL, SERVER, b, sizeof(b)));
	ck_assert(!mx_ghost_id(PREFIX, "wa", "x", NULL, b, sizeof(b)));
	ck_assert(!mx_ghost_id(PREFIX, "wa", "x", SERVER, NULL, 0));
	ck_assert(!mx_ghost_parse(PREFIX, SERVER, NULL, a, sizeof(a), b, sizeof(b)));
	ck_assert(!mx_ghost_parse(NULL, SERVER, "@_cw_wa_x:example.org", a, sizeof(a), b, sizeof(b)));
	/* Outputs: NULL with size 0 only validates; too small a buffer fails. */
	ck_assert(mx_user_id_parse("@alice:example.org", NULL, 0, NULL, 0));
	ck_assert(mx_user_id_parse("@alice:example.org", a, sizeof(a), NULL, 0));
	ck_assert_str_eq(a, "alice");
	ck_assert(!mx_user_id_parse("@alice:example.org", a, 5, NULL, 0));
	ck_assert(!mx_user_id_parse("@alice:example.org", NULL, 0, a, sizeof(a)));
	ck_assert(!mx_user_id_parse("@alice:example.org", NULL, 3, NULL, 0));
	ck_assert(mx_ghost_parse(PREFIX, SERVER, "@_cw_wa_x:example.org", NULL, 0, NULL, 0));
	ck_assert(mx_ghost_parse(PREFIX, SERVER, "@_cw_wa_x:example.org", a, sizeof(a), b, sizeof(b)));
	ck_assert_str_eq(a, "wa");
	ck_assert_str_eq(b, "x");
	/* Exactly 255 bytes is a ghost; 256 is not. */
	char remote[300], id[300];
	size_t fixed = strlen("@_cw_wa_:example.org");
	memset(remote, 'x', 255 - fixed);
	remote[255 - fixed] = '\0';
	ck_assert(mx_ghost_id(PREFIX, "wa", remote, SERVER, id, sizeof(id)));
	ck_assert_uint_eq(strlen(id), 255);
	ck_assert(mx_user_id_parse(id, NULL, 0, NULL, 0));
	strcat(remote, "x");
	ck_assert(!mx_ghost_id(PREFIX, "wa", remote, SERVER, id, sizeof(id)));
	ck_assert_str_eq(id, "");
	/* UTF-8 sequences. */
	ck_assert_uint_eq(cw_utf8_seq((const unsigned char *)"\xC3\xA9", 2, NULL), 2);
	ck_assert_uint_eq(cw_utf8_seq((const unsigned char *)"\xC3\xA9", 1, NULL), 0);
	ck_assert_uint_eq(cw_utf8_seq((const unsigned char *)"\xC0\x80", 2, NULL), 0);
	ck_assert_uint_eq(cw_utf8_seq((const unsigned char *)"\xED\xA0\x80", 3, NULL), 0);
	ck_assert_uint_eq(cw_utf8_seq((const unsigned char *)"\xF4\x90\x80\x80", 4, NULL), 0);
	ck_assert_uint_eq(cw_utf8_seq((const unsigned char *)"\xF0\x9F\x91\x8D", 4, NULL), 4);
	ck_assert(cw_utf8_valid("", 0));
}
END_TEST

/* The escaped length of a remote localpart or network, as mx_ghost_id
 * writes it (an independent count). */
static size_t escaped_len(const unsigned char *s, size_t n, bool network)
{
	size_t len = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = s[i];
		bool plain = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' ||
			     (!network && c == '/');
		if (plain)
			len += 1;
		else if (!network && ((c >= 'A' && c <= 'Z') || c == '_'))
			len += 2;
		else
			len += 3;
	}
	return len;
}

/* Random bytes (no NUL): valid UTF-8 half of the time. */
static size_t random_bytes(unsigned char *buf, size_t max)
{
	size_t n = 1 + rnd_below((unsigned)max);
	bool utf8 = rnd() & 1;
	size_t i = 0;
	while (i < n) {
		if (!utf8) {
			unsigned choice = rnd_below(4);
			if (choice == 0)
				buf[i++] = (unsigned char)(1 + rnd_below(255));
			else if (choice == 1)
				buf[i++] = "aZ_=+./-:@0 "[rnd_below(12)];
			else
				buf[i++] = (unsigned char)('a' + rnd_below(26));
			continue;
		}
		unsigned cp;
		switch (rnd_below(4)) {
		case 0: cp = 1 + rnd_below(0x7F); break;
		case 1: cp = 0x80 + rnd_below(0x780); break;
		case 2: cp = 0x800 + rnd_below(0xF800); break;
		default: cp = 0x10000 + rnd_below(0x100000); break;
		}
		if (cp >= 0xD800 && cp <= 0xDFFF)
			cp = 'q';
		unsigned char tmp[4];
		size_t l = unit_utf8_put(cp, tmp);
		if (i + l > n)
			break;
		memcpy(buf + i, tmp, l);
		i += l;
	}
	if (i == 0)
		buf[i++] = 'x';
	buf[i] = '\0';
	return i;
}

/* build then parse gives the input back; the id is compliant and <= 255
 * bytes; build fails exactly when the id would be longer. */
START_TEST(ghost_round_trip_property)
{
	unsigned char net[40], remote[200];
	char id[MX_ID_MAX + 1], pn[MX_ID_MAX + 1], pr[MX_ID_MAX + 1];
	int built = 0;
	for (int i = 0; i < 20000; i++) {
		size_t nl = random_bytes(net, i % 5 == 0 ? 30 : 8);
		size_t rl = random_bytes(remote, i % 3 == 0 ? 150 : 40);
		size_t want = 1 + strlen(PREFIX) + escaped_len(net, nl, true) + 1 + escaped_len(remote, rl, false) + 1 +
			      strlen(SERVER);
		bool ok = mx_ghost_id(PREFIX, (char *)net, (char *)remote, SERVER, id, sizeof(id));
		ck_assert_msg(ok == (want <= MX_ID_MAX), "case %d: built %d for %zu bytes", i, ok, want);
		if (!ok)
			continue;
		built++;
		ck_assert_uint_eq(strlen(id), want);
		char local[MX_ID_MAX + 1];
		ck_assert(mx_user_id_parse(id, local, sizeof(local), NULL, 0));
		ck_assert_msg(mx_localpart_compliant(local), "case %d: %s", i, id);
		ck_assert_msg(strchr(local, '+') == NULL, "case %d: '+' left in %s", i, id);
		ck_assert_msg(mx_ghost_parse(PREFIX, SERVER, id, pn, sizeof(pn), pr, sizeof(pr)), "case %d: %s", i, id);
		ck_assert_msg(strcmp(pn, (char *)net) == 0 && strcmp(pr, (char *)remote) == 0, "case %d: %s", i, id);
		/* Another server or prefix is not ours. */
		ck_assert(!mx_ghost_parse(PREFIX, "example.com", id, pn, sizeof(pn), pr, sizeof(pr)));
		ck_assert(!mx_ghost_parse("_xx_", SERVER, id, pn, sizeof(pn), pr, sizeof(pr)));
	}
	ck_assert_int_gt(built, 10000);
}
END_TEST

/* Random strings that look like ghosts, and one-byte changes of real
 * ghosts: either refused or rebuilt to exactly themselves. */
START_TEST(ghost_parse_property)
{
	static const char alphabet[] = "abcz019_=-./+A:Zf3e";
	char id[400], again[MX_ID_MAX + 1], pn[MX_ID_MAX + 1], pr[MX_ID_MAX + 1];
	int accepted = 0;
	for (int i = 0; i < 40000; i++) {
		size_t n = 0;
		n += (size_t)snprintf(id, sizeof(id), "@%s", i % 7 ? PREFIX : "_cw");
		size_t body = 1 + rnd_below(i % 11 == 0 ? 260 : 16);
		for (size_t k = 0; k < body && n < sizeof(id) - 20; k++)
			id[n++] = alphabet[rnd_below(sizeof(alphabet) - 1)];
		snprintf(id + n, sizeof(id) - n, ":%s", SERVER);
		if (mx_ghost_parse(PREFIX, SERVER, id, pn, sizeof(pn), pr, sizeof(pr))) {
			ck_assert(mx_in_ghost_namespace(PREFIX, SERVER, id));
			accepted++;
			ck_assert_msg(mx_ghost_id(PREFIX, pn, pr, SERVER, again, sizeof(again)), "%s", id);
			ck_assert_msg(strcmp(again, id) == 0, "%s rebuilt as %s", id, again);
		}
	}
	ck_assert_int_gt(accepted, 100);
	/* The namespace is the prefix on this server, ghost or not (until the
	 * thirtieth session any server's: a remote @_cw_...:elsewhere was
	 * taken for one of the gateway's own). */
	ck_assert(mx_in_ghost_namespace(PREFIX, SERVER, "@" PREFIX "junk:" SERVER));
	ck_assert(mx_in_ghost_namespace(PREFIX, SERVER, "@" PREFIX ":" SERVER));
	ck_assert(!mx_in_ghost_namespace(PREFIX, SERVER, "@" PREFIX "junk:elsewhere.org"));
	ck_assert(!mx_in_ghost_namespace(PREFIX, SERVER, "@" PREFIX "junk:" SERVER ".evil.com"));
	ck_assert(!mx_in_ghost_namespace(PREFIX, SERVER, "@" PREFIX "junk:x" SERVER));
	ck_assert(!mx_in_ghost_namespace(PREFIX, SERVER, "@" PREFIX SERVER));
	ck_assert(!mx_in_ghost_namespace(PREFIX, SERVER, "@_cw:" SERVER) &&
		  !mx_in_ghost_namespace(PREFIX, SERVER, PREFIX "a:" SERVER));
	ck_assert(!mx_in_ghost_namespace(PREFIX, SERVER, NULL));
	ck_assert(!mx_in_ghost_namespace(PREFIX, SERVER, "@alice:" SERVER));
	/* Mutations of real ghost ids. */
	static const char *const samples[][2] = {
		{ "wa", "+4915112345678" }, { "my_peer", "Alice_B" }, { "x", "\xc3\xa9t\xc3\xa9=1" }, { "gk", "a/b.c-d" },
	};
	for (size_t s = 0; s < CW_ARRAY_LEN(samples); s++) {
		char base[MX_ID_MAX + 1];
		ck_assert(mx_ghost_id(PREFIX, samples[s][0], samples[s][1], SERVER, base, sizeof(base)));
		size_t len = strlen(base);
		for (size_t pos = 0; pos < len; pos++) {
			for (size_t a = 0; a < sizeof(alphabet) - 1; a++) {
				memcpy(id, base, len + 1);
				id[pos] = alphabet[a];
				if (mx_ghost_parse(PREFIX, SERVER, id, pn, sizeof(pn), pr, sizeof(pr))) {
					ck_assert(mx_ghost_id(PREFIX, pn, pr, SERVER, again, sizeof(again)));
					ck_assert_msg(strcmp(again, id) == 0, "%s rebuilt as %s", id, again);
				}
			}
		}
	}
}
END_TEST

/* ------------------------------------------------------------ mapping cases */

struct mcase {
	char name[200];
	char dir[16];
	char expect[64];
	char why[200];
	char marker_key[64], marker_value[64];
	char lookup[16][2][300];
	int nlookup;
	bool roundtrip_exact;
	char *input;
	char *output;
	int line;
};

static void append(char **dst, const char *line)
{
	size_t have = *dst ? strlen(*dst) : 0, l = strlen(line);
	*dst = realloc(*dst, have + l + 1);
	ck_assert_ptr_nonnull(*dst);
	memcpy(*dst + have, line, l + 1);
}

static void trim_trailing_newlines(char *s)
{
	if (!s)
		return;
	size_t n = strlen(s);
	while (n && s[n - 1] == '\n')
		s[--n] = '\0';
}

static int load_map_cases(struct mcase *cases, int max)
{
	const char *file = "matrix_map.txt";
	FILE *f = fopen(unit_data_path(file), "r");
	ck_assert_msg(f != NULL, "cannot open %s", unit_data_path(file));
	char *line = NULL;
	size_t cap = 0;
	int n = -1, lineno = 0, section = 0; /* 0 header, 1 input, 2 output */
	while (getline(&line, &cap, f) != -1) {
		lineno++;
		if (strncmp(line, "=== ", 4) == 0) {
			ck_assert_int_lt(n + 1, max);
			struct mcase *k = &cases[++n];
			memset(k, 0, sizeof(*k));
			snprintf(k->name, sizeof(k->name), "%.199s", line + 4);
			trim_newline(k->name);
			k->line = lineno;
			section = 0;
			continue;
		}
		/* '#' lines are comments in bodies too (no JSON or HTML case starts a
		 * line with '#'). */
		if (n < 0 || line[0] == '#' || (section == 0 && line[0] == '\n'))
			continue;
		struct mcase *k = &cases[n];
		if (section == 0) {
			trim_newline(line);
			if (strncmp(line, "dir: ", 5) == 0)
				snprintf(k->dir, sizeof(k->dir), "%s", line + 5);
			else if (strncmp(line, "expect: ", 8) == 0)
				snprintf(k->expect, sizeof(k->expect), "%s", line + 8);
			else if (strncmp(line, "why: ", 5) == 0)
				snprintf(k->why, sizeof(k->why), "%s", line + 5);
			else if (strncmp(line, "marker: ", 8) == 0)
				ck_assert(sscanf(line + 8, "%63s %63s", k->marker_key, k->marker_value) == 2);
			else if (strncmp(line, "lookup: ", 8) == 0) {
				ck_assert_int_lt(k->nlookup, 16);
				ck_assert_msg(sscanf(line + 8, "%299s %299s", k->lookup[k->nlookup][0],
						     k->lookup[k->nlookup][1]) == 2,
					      "line %d: lookup needs two ids", lineno);
				k->nlookup++;
			} else if (strcmp(line, "roundtrip: exact") == 0)
				k->roundtrip_exact = true;
			else if (strcmp(line, "---") == 0)
				section = 1;
			else
				ck_abort_msg("%s line %d: unexpected line in case %s: %s", file, lineno, k->name, line);
			continue;
		}
		if (section == 1 && strcmp(line, "+++\n") == 0) {
			section = 2;
			continue;
		}
		append(section == 1 ? &k->input : &k->output, line);
	}
	free(line);
	fclose(f);
	for (int i = 0; i <= n; i++) {
		ck_assert_msg(cases[i].dir[0] && cases[i].input, "case '%s' is incomplete", cases[i].name);
		trim_trailing_newlines(cases[i].input);
		trim_trailing_newlines(cases[i].output);
	}
	return n + 1;
}

static void free_map_cases(struct mcase *cases, int n)
{
	for (int i = 0; i < n; i++) {
		free(cases[i].input);
		free(cases[i].output);
	}
}

/* Lookup over a case's "lookup:" lines (forward or reversed). */
struct table {
	const struct mcase *k;
	bool reverse;
	int calls;
};

static const char *table_lookup(void *ctx, const char *id)
{
	struct table *t = ctx;
	t->calls++;
	for (int i = 0; i < t->k->nlookup; i++)
		if (strcmp(t->k->lookup[i][t->reverse ? 1 : 0], id) == 0)
			return t->k->lookup[i][t->reverse ? 0 : 1];
	return NULL;
}

static json_t *load_json_text(const char *text, const struct mcase *k, const char *what)
{
	size_t len;
	char *raw = unit_decode(text ? text : "", &len);
	json_error_t je;
	json_t *v = json_loadb(raw, len, JSON_DECODE_ANY, &je);
	ck_assert_msg(v != NULL, "case '%s' (line %d): bad %s JSON: %s", k->name, k->line, what, je.text);
	free(raw);
	return v;
}

static const char *result_name(enum mx_in_result r)
{
	switch (r) {
	case MX_IN_OK: return "ok";
	case MX_IN_IGNORE: return "ignore";
	case MX_IN_INVALID: return "invalid";
	case MX_IN_ENCRYPTED: return "encrypted";
	}
	return "?";
}

static const char *op_name(enum mx_op op)
{
	switch (op) {
	case MX_OP_SEND: return "send";
	case MX_OP_REDACT: return "redact";
	case MX_OP_RECEIPT: return "receipt";
	case MX_OP_TYPING: return "typing";
	case MX_OP_NONE: return "none";
	}
	return "?";
}

/* The text/plain body of neutral content, or NULL. */
static const char *plain_of(const json_t *content)
{
	size_t i;
	json_t *p;
	json_array_foreach(json_object_get(content, "parts"), i, p)
		if (strcmp(json_string_value(json_object_get(p, "type")), "text/plain") == 0)
			return json_string_value(json_object_get(p, "body"));
	return NULL;
}

static void check_matrix_content(const struct mcase *k, const struct mx_out *o)
{
	/* What every send must be for a homeserver: an object, a body for
	 * messages, and well below the 64 KiB event limit. */
	ck_assert_ptr_nonnull(o->content);
	ck_assert(json_is_object(o->content));
	if (strcmp(o->event_type, "m.room.message") == 0) {
		ck_assert_msg(json_is_string(json_object_get(o->content, "body")), "case '%s': no body", k->name);
		ck_assert(json_is_string(json_object_get(o->content, "msgtype")));
	}
	char *text = json_dumps(o->content, JSON_COMPACT);
	ck_assert_uint_lt(strlen(text), 65536 - 1024);
	free(text);
}

/* neutral -> Matrix -> neutral: the text, reply, edit target, reaction key
 * and msgtype come back (the whole content when the case says exact). */
static void round_trip(const struct mcase *k, const json_t *neutral, const struct mx_out *o)
{
	const char *type = json_string_value(json_object_get(neutral, "type"));
	const json_t *nc = json_object_get(neutral, "content");
	json_t *ev = json_pack("{s:s, s:s, s:s, s:s, s:I, s:O}", "type", o->event_type, "event_id", "$roundtrip",
			       "room_id", "!room:example.org", "sender", "@alice:example.org", "origin_server_ts",
			       (json_int_t)1700000000000, "content", o->content);
	struct table t = { k, true, 0 };
	json_t *back = NULL;
	char why[200];
	enum mx_in_result r = mx_to_neutral(ev, table_lookup, &t, &back, why, sizeof(why));
	ck_assert_msg(r == MX_IN_OK, "case '%s': the round trip gave %s: %s", k->name, result_name(r), why);
	assert_event_parses(back, k->name);
	const json_t *bc = json_object_get(back, "content");
	const char *bt = json_string_value(json_object_get(back, "type"));
	bool sent_as_new = strcmp(type, "edit") == 0 && !json_object_get(o->content, "m.relates_to");
	if (!sent_as_new)
		ck_assert_msg(strcmp(bt, type) == 0, "case '%s': round trip type %s", k->name, bt);
	if (k->roundtrip_exact) {
		unit_assert_json_eq(bc, nc, k->name);
	} else if (strcmp(type, "reaction") == 0) {
		/* the key Matrix got (with the emoji's selectors) comes back */
		const char *key = json_string_value(json_object_get(json_object_get(o->content, "m.relates_to"), "key"));
		char want[MX_REACTION_KEY_MAX];
		ck_assert(mx_reaction_key(plain_of(nc), want, sizeof(want)));
		ck_assert_str_eq(key, want);
		ck_assert_str_eq(plain_of(bc), key);
	} else if (!json_object_get(nc, "attachments") && plain_of(nc) && !sent_as_new) {
		/* An emote always comes back as "* text". */
		const char *mt = json_string_value(json_object_get(nc, MX_MSGTYPE_KEY));
		char want[1024];
		snprintf(want, sizeof(want), "%s%s",
			 mt && strcmp(mt, "m.emote") == 0 && strncmp(plain_of(nc), "* ", 2) != 0 ? "* " : "", plain_of(nc));
		ck_assert_msg(strcmp(plain_of(bc), want) == 0, "case '%s': text '%s' came back as '%s'", k->name, want,
			      plain_of(bc));
	}
	static const char *const keys[] = { "in_reply_to", "replaces", MX_MSGTYPE_KEY };
	for (size_t i = 0; i < CW_ARRAY_LEN(keys) && !sent_as_new; i++) {
		const json_t *want = json_object_get(nc, keys[i]);
		/* A target Matrix does not know cannot come back. */
		if (want && json_is_string(want) && strcmp(keys[i], MX_MSGTYPE_KEY) != 0) {
			const char *native = table_lookup(&(struct table){ k, false, 0 }, json_string_value(want));
			if (!native || !mx_event_id_valid(native))
				continue;
		}
		/* Only notices and emotes keep a msgtype (others are sent as m.text). */
		if (want && strcmp(keys[i], MX_MSGTYPE_KEY) == 0 && strcmp(json_string_value(want), "m.notice") != 0 &&
		    strcmp(json_string_value(want), "m.emote") != 0)
			continue;
		const json_t *got = json_object_get(bc, keys[i]);
		ck_assert_msg((want == NULL) == (got == NULL) && (!want || json_equal(want, got)),
			      "case '%s': %s did not come back", k->name, keys[i]);
	}
	json_decref(back);
	json_decref(ev);
}

START_TEST(map_cases)
{
	static struct mcase cases[400];
	int n = load_map_cases(cases, 400);
	int counts[6] = { 0 }; /* in, out, eph, html, refs, round trips */
	for (int i = 0; i < n; i++) {
		struct mcase *k = &cases[i];
		char why[256] = "";
		if (strcmp(k->dir, "in") == 0) {
			counts[0]++;
			json_t *ev = load_json_text(k->input, k, "input");
			struct table t = { k, false, 0 };
			json_t *out = (json_t *)0x1;
			enum mx_in_result r = mx_to_neutral(ev, table_lookup, &t, &out, why, sizeof(why));
			ck_assert_msg(strcmp(result_name(r), k->expect) == 0, "case '%s' (line %d): got %s (%s), expected %s",
				      k->name, k->line, result_name(r), why, k->expect);
			if (r == MX_IN_OK) {
				ck_assert_ptr_nonnull(out);
				if (k->output) {
					json_t *want = load_json_text(k->output, k, "expected");
					unit_assert_json_eq(out, want, k->name);
					json_decref(want);
				}
				assert_event_parses(out, k->name);
				/* What the mapping reads as an edit is what the
				 * adapter checks as one (an edit of an edit). */
				bool edit = strcmp(json_string_value(json_object_get(out, "type")), "edit") == 0;
				ck_assert_msg(edit == (mx_edit_target(ev) != NULL), "case '%s': mx_edit_target says %s",
					      k->name, mx_edit_target(ev) ? mx_edit_target(ev) : "none");
				json_decref(out);
			} else {
				ck_assert_ptr_null(out);
				ck_assert_msg(strlen(why) > 5, "case '%s': no reason", k->name);
				json_t *w = json_string(why);
				ck_assert_msg(w != NULL, "case '%s': the reason is not UTF-8", k->name);
				json_decref(w);
			}
			if (k->why[0])
				ck_assert_msg(strstr(why, k->why) != NULL, "case '%s': why '%s' lacks '%s'", k->name, why, k->why);
			json_decref(ev);
		} else if (strcmp(k->dir, "out") == 0) {
			counts[1]++;
			json_t *neutral = load_json_text(k->input, k, "input");
			struct table t = { k, false, 0 };
			struct mx_out o;
			bool ok = mx_from_neutral(neutral, table_lookup, &t, k->marker_key[0] ? k->marker_key : NULL,
						  k->marker_value, &o, why, sizeof(why));
			char want_op[32] = "", want_arg[300] = "";
			sscanf(k->expect, "%31s %299s", want_op, want_arg);
			if (strcmp(want_op, "fail") == 0) {
				ck_assert_msg(!ok, "case '%s' (line %d): expected a refusal, got %s", k->name, k->line,
					      op_name(o.op));
				ck_assert_ptr_null(o.content);
				ck_assert_int_eq(o.op, MX_OP_NONE);
			} else {
				ck_assert_msg(ok, "case '%s' (line %d): refused: %s", k->name, k->line, why);
				ck_assert_msg(strcmp(op_name(o.op), want_op) == 0, "case '%s' (line %d): op %s, expected %s (%s)",
					      k->name, k->line, op_name(o.op), want_op, why);
				if (o.op == MX_OP_SEND) {
					ck_assert_str_eq(o.event_type, want_arg);
					check_matrix_content(k, &o);
				} else if (o.op == MX_OP_REDACT || o.op == MX_OP_RECEIPT) {
					ck_assert_str_eq(o.target, want_arg);
				} else if (o.op == MX_OP_TYPING) {
					ck_assert_int_eq(o.typing, strcmp(want_arg, "start") == 0);
				}
				if (k->output) {
					json_t *want = load_json_text(k->output, k, "expected");
					ck_assert_msg(o.content != NULL, "case '%s': no content", k->name);
					unit_assert_json_eq(o.content, want, k->name);
					json_decref(want);
				}
				const char *nt = json_string_value(json_object_get(neutral, "type"));
				if (o.op == MX_OP_SEND && nt &&
				    (strcmp(nt, "message") == 0 || strcmp(nt, "edit") == 0 || strcmp(nt, "reaction") == 0) &&
				    !json_object_get(o.content, "url")) {
					round_trip(k, neutral, &o);
					counts[5]++;
				}
			}
			if (k->why[0])
				ck_assert_msg(strstr(why, k->why) != NULL, "case '%s': why '%s' lacks '%s'", k->name, why, k->why);
			mx_out_clear(&o);
			mx_out_clear(&o);
			json_decref(neutral);
		} else if (strcmp(k->dir, "eph") == 0) {
			counts[2]++;
			json_t *ev = load_json_text(k->input, k, "input");
			struct table t = { k, false, 0 };
			json_t *list = mx_ephemeral_to_neutral(ev, table_lookup, &t);
			ck_assert_ptr_nonnull(list);
			json_t *want = load_json_text(k->output, k, "expected");
			unit_assert_json_eq(list, want, k->name);
			size_t j;
			json_t *x;
			json_array_foreach(list, j, x) {
				ck_assert(mx_user_id_parse(json_string_value(json_object_get(x, "sender_mxid")), NULL, 0, NULL, 0));
				assert_event_parses(json_object_get(x, "event"), k->name);
			}
			json_decref(want);
			json_decref(list);
			json_decref(ev);
		} else if (strcmp(k->dir, "html") == 0) {
			counts[3]++;
			size_t len, wlen;
			char *in = unit_decode(k->input, &len);
			char *want = unit_decode(k->output ? k->output : "", &wlen);
			char *got = mx_sanitize_html(in, len);
			ck_assert_ptr_nonnull(got);
			ck_assert_msg(strcmp(got, want) == 0, "case '%s' (line %d):\n  got  %s\n  want %s", k->name, k->line, got,
				      want);
			/* Sanitising is idempotent. */
			char *again = mx_sanitize_html(got, strlen(got));
			ck_assert_msg(strcmp(again, got) == 0, "case '%s': not idempotent: %s", k->name, again);
			free(again);
			free(got);
			free(in);
			free(want);
		} else if (strcmp(k->dir, "refs") == 0) {
			counts[4]++;
			json_t *ev = load_json_text(k->input, k, "input");
			const char *ids[8];
			size_t cnt = mx_event_refs(ev, ids, 8);
			json_t *got = json_array();
			for (size_t j = 0; j < cnt; j++)
				json_array_append_new(got, json_string(ids[j]));
			json_t *want = load_json_text(k->output, k, "expected");
			unit_assert_json_eq(got, want, k->name);
			if (cnt > 1)
				ck_assert_uint_eq(mx_event_refs(ev, ids, 1), 1);
			json_decref(got);
			json_decref(want);
			json_decref(ev);
		} else {
			ck_abort_msg("case '%s': unknown dir %s", k->name, k->dir);
		}
	}
	free_map_cases(cases, n);
	fprintf(stderr, "map_cases: %d in, %d out, %d ephemeral, %d html, %d refs; %d round trips\n", counts[0], counts[1],
		counts[2], counts[3], counts[4], counts[5]);
	ck_assert_int_ge(counts[0] + counts[1] + counts[2] + counts[3], 80);
	ck_assert_int_ge(counts[0], 40);
	ck_assert_int_ge(counts[1], 25);
	ck_assert_int_ge(counts[3], 20);
	ck_assert_int_ge(counts[5], 10);
}
END_TEST

/* ------------------------------------------------------------ properties */

/* Every 'in' case's input with single bytes changed: never a crash, every
 * OK result passes event_parse. */
START_TEST(in_mutations_property)
{
	static struct mcase cases[400];
	int n = load_map_cases(cases, 400);
	static const char subst[] = { '"', '{', '}', '[', ']', ',', ':', '0', '1', 'x', ' ', '$', '@', '>', '<', '\n' };
	int ok = 0, runs = 0;
	for (int i = 0; i < n; i++) {
		struct mcase *k = &cases[i];
		if (strcmp(k->dir, "in") != 0)
			continue;
		size_t len;
		char *text = unit_decode(k->input, &len);
		if (len > 4000) {
			free(text);
			continue;
		}
		char *buf = malloc(len + 1);
		for (size_t pos = 0; pos < len; pos++) {
			for (size_t s = 0; s < sizeof(subst); s += 1 + (pos % 3)) {
				memcpy(buf, text, len + 1);
				buf[pos] = subst[s];
				json_t *ev = json_loadb(buf, len, 0, NULL);
				if (!ev)
					continue;
				struct table t = { k, false, 0 };
				json_t *out = NULL;
				char why[200];
				runs++;
				if (mx_to_neutral(ev, table_lookup, &t, &out, why, sizeof(why)) == MX_IN_OK) {
					assert_event_parses(out, k->name);
					ok++;
					json_decref(out);
				} else {
					ck_assert_ptr_null(out);
				}
				json_decref(ev);
			}
		}
		free(buf);
		free(text);
	}
	free_map_cases(cases, n);
	ck_assert_int_gt(runs, 1000);
	ck_assert_int_gt(ok, 100);
}
END_TEST

static const char *id_lookup(void *ctx, const char *id)
{
	(void)ctx;
	if (strcmp(id, "$known") == 0 || strcmp(id, "$other:example.org") == 0)
		return "msg_known";
	if (strcmp(id, "$bad") == 0)
		return "not a message id";
	if (strcmp(id, "@bob:example.org") == 0)
		return "mimi://example.org/u/bob";
	return NULL;
}

/* A random JSON value (depth-bounded), from a pool that hits the mapping's
 * members with right and wrong types. */
static json_t *random_value(int depth);

static json_t *random_string(void)
{
	static const char *const pool[] = {
		"", "hi", "m.text", "m.notice", "m.emote", "m.image", "m.file", "m.location", "m.replace", "m.annotation",
		"m.thread", "$known", "$bad", "$unknown", "$other:example.org", "@bob:example.org", "join", "leave",
		"invite", "ban", "org.matrix.custom.html", "<b>x</b><script>y</script>", "> <@a:b> q\n\nreply",
		"\xf0\x9f\x91\x8d", "mxc://example.org/abc", "geo:1,2", "* x", "\xe2\x80\xae", "<mx-reply>r</mx-reply>z",
	};
	if (rnd_below(8) == 0) {
		size_t n = rnd_below(20000);
		char *s = malloc(n + 1);
		memset(s, 'a' + (int)rnd_below(26), n);
		s[n] = '\0';
		json_t *v = json_string(s);
		free(s);
		return v;
	}
	return json_string(pool[rnd_below(CW_ARRAY_LEN(pool))]);
}

static json_t *random_object(int depth)
{
	static const char *const keys[] = {
		"msgtype", "body", "format", "formatted_body", "m.relates_to", "rel_type", "event_id", "m.in_reply_to",
		"key", "m.new_content", "redacts", "membership", "filename", "url", "geo_uri", "is_falling_back", "info",
		"user_ids", "m.read", "ts", "prev_content", "redacted_because", "state_key",
	};
	json_t *o = json_object();
	unsigned n = rnd_below(7);
	for (unsigned i = 0; i < n; i++)
		json_object_set_new(o, keys[rnd_below(CW_ARRAY_LEN(keys))], random_value(depth + 1));
	return o;
}

static json_t *random_value(int depth)
{
	unsigned c = rnd_below(depth > 4 ? 5 : 8);
	switch (c) {
	case 0: return json_integer((json_int_t)rnd_below(3) - 1);
	case 1: return rnd() & 1 ? json_true() : json_false();
	case 2: return json_null();
	case 3:
	case 4: return random_string();
	case 5: {
		json_t *a = json_array();
		unsigned n = rnd_below(4);
		for (unsigned i = 0; i < n; i++)
			json_array_append_new(a, random_value(depth + 1));
		return a;
	}
	default: return random_object(depth);
	}
}

START_TEST(random_events_property)
{
	static const char *const types[] = {
		"m.room.message", "m.reaction", "m.room.redaction", "m.room.member", "m.sticker", "m.room.encrypted",
		"m.room.name", "m.typing", "m.receipt",
	};
	int ok = 0;
	for (int i = 0; i < 30000; i++) {
		json_t *content = random_object(1);
		/* Bias towards the shapes the mapping accepts. */
		if (rnd() & 1)
			json_object_set_new(content, "body", random_string());
		if (rnd() & 1)
			json_object_set_new(content, "msgtype", random_string());
		if (rnd_below(3) == 0)
			json_object_set_new(content, "m.relates_to", random_object(2));
		json_t *ev = json_pack("{s:s, s:o, s:I, s:s}", "type", types[rnd_below(CW_ARRAY_LEN(types))], "content",
				       content, "origin_server_ts", (json_int_t)(rnd_below(4) ? 1700000000000 : 0),
				       "event_id", "$e");
		if (rnd_below(4) == 0)
			json_object_set_new(ev, "state_key", random_value(3));
		if (rnd_below(4) == 0)
			json_object_set_new(ev, "redacts", random_string());
		if (rnd_below(4) == 0)
			json_object_set_new(ev, "unsigned", random_object(2));
		json_t *out = NULL;
		char why[200] = "";
		enum mx_in_result r = mx_to_neutral(ev, id_lookup, NULL, &out, why, sizeof(why));
		if (r == MX_IN_OK) {
			assert_event_parses(out, "random event");
			ok++;
			json_decref(out);
		} else {
			ck_assert_ptr_null(out);
			ck_assert(why[0]);
		}
		const char *ids[4];
		size_t nref = mx_event_refs(ev, ids, 4);
		for (size_t j = 0; j < nref; j++)
			ck_assert(mx_event_id_valid(ids[j]));
		json_t *eph = mx_ephemeral_to_neutral(ev, id_lookup, NULL);
		ck_assert_ptr_nonnull(eph);
		json_decref(eph);
		json_decref(ev);
	}
	ck_assert_int_gt(ok, 300);
}
END_TEST

/* Random neutral messages (random UTF-8 text, notices, emotes, replies,
 * edits, reactions) -> Matrix -> neutral keep text, reply, edit target,
 * reaction key and msgtype. */
static const char *rt_lookup(void *ctx, const char *id)
{
	(void)ctx;
	static const char *const pairs[][2] = { { "msg_a", "$ea" }, { "msg_b", "$eb:example.org" } };
	for (size_t i = 0; i < CW_ARRAY_LEN(pairs); i++) {
		if (strcmp(id, pairs[i][0]) == 0)
			return pairs[i][1];
		if (strcmp(id, pairs[i][1]) == 0)
			return pairs[i][0];
	}
	return NULL;
}

START_TEST(random_round_trip_property)
{
	unsigned char text[300];
	for (int i = 0; i < 5000; i++) {
		size_t n;
		do {
			n = random_bytes(text, 200);
		} while (!cw_utf8_valid((char *)text, n) || text[0] == '>' || text[0] == '*');
		for (size_t j = 0; j < n; j++)
			if (text[j] < 0x20 && text[j] != '\n')
				text[j] = ' ';
		const char *kind = (const char *[]){ "message", "edit", "reaction" }[rnd_below(3)];
		const char *msgtype = (const char *[]){ NULL, "m.notice", "m.emote" }[rnd_below(3)];
		const char *ref = rnd() & 1 ? "msg_a" : "msg_b";
		json_t *content = json_object();
		char body[400];
		snprintf(body, sizeof(body), "%s%s", msgtype && strcmp(msgtype, "m.emote") == 0 ? "* " : "", (char *)text);
		if (strcmp(kind, "reaction") == 0) {
			if (n > 64)
				text[rnd_below(20) + 1] = '\0';
			if (!cw_utf8_valid((char *)text, strlen((char *)text)))
				strcpy((char *)text, "\xf0\x9f\x91\x8d");
			/* within a neutral reaction's 64 bytes in Matrix too
			 * (its emoji selectors added): else it comes back as a
			 * reply "[reaction: ...]" */
			char key[MX_REACTION_KEY_MAX];
			if (!mx_reaction_key((char *)text, key, sizeof(key)) || strlen(key) > 64)
				strcpy((char *)text, "\xe2\x9d\xa4");
			json_object_set_new(content, "parts",
					    json_pack("[{s:s, s:s}]", "type", "text/plain", "body", (char *)text));
			json_object_set_new(content, "disposition", json_string("reaction"));
			json_object_set_new(content, "in_reply_to", json_string(ref));
		} else {
			json_object_set_new(content, "parts", json_pack("[{s:s, s:s}]", "type", "text/plain", "body", body));
			if (msgtype)
				json_object_set_new(content, MX_MSGTYPE_KEY, json_string(msgtype));
			json_object_set_new(content, strcmp(kind, "edit") == 0 ? "replaces" : "in_reply_to", json_string(ref));
		}
		json_t *neutral = json_pack("{s:s, s:o}", "type", kind, "content", content);
		struct mx_out o;
		char why[200];
		ck_assert_msg(mx_from_neutral(neutral, rt_lookup, NULL, "org.causeway.outbox_id", "7", &o, why, sizeof(why)),
			      "%s", why);
		ck_assert_int_eq(o.op, MX_OP_SEND);
		json_t *ev = json_pack("{s:s, s:s, s:I, s:O}", "type", o.event_type, "event_id", "$x", "origin_server_ts",
				       (json_int_t)1700000000000, "content", o.content);
		json_t *back = NULL;
		enum mx_in_result r = mx_to_neutral(ev, rt_lookup, NULL, &back, why, sizeof(why));
		ck_assert_msg(r == MX_IN_OK, "%s: %s", kind, why);
		assert_event_parses(back, kind);
		/* The marker is not content: it does not come back.  A
		 * reaction's key comes back as Matrix has it (mx_reaction_key). */
		json_t *want = json_deep_copy(content);
		if (strcmp(kind, "reaction") == 0) {
			char key[MX_REACTION_KEY_MAX];
			ck_assert(mx_reaction_key((char *)text, key, sizeof(key)));
			json_object_set_new(json_array_get(json_object_get(want, "parts"), 0), "body", json_string(key));
		}
		unit_assert_json_eq(json_object_get(back, "content"), want, kind);
		ck_assert_str_eq(json_string_value(json_object_get(back, "type")), kind);
		json_decref(want);
		json_decref(back);
		json_decref(ev);
		mx_out_clear(&o);
		json_decref(neutral);
	}
}
END_TEST

/* What the output of the sanitiser may hold: allowed tags with their
 * allowed attributes only, and no raw '<' in text. */
static void assert_safe_html(const char *h, const char *input)
{
	static const char *const tags[] = {
		"del", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "p", "a", "ul", "ol", "sup", "sub", "li",
		"b", "i", "u", "strong", "em", "s", "code", "hr", "br", "div", "table", "thead", "tbody", "tr", "th",
		"td", "caption", "pre", "span", "details", "summary",
	};
	static const char *const attrs[] = {
		"span data-mx-bg-color", "span data-mx-color", "span data-mx-spoiler", "span data-mx-maths", "a name",
		"a target", "a href", "ol start", "code class", "div data-mx-maths",
	};
	static const char *const schemes[] = { "http:", "https:", "ftp:", "mailto:", "magnet:", "matrix:" };
	ck_assert_msg(cw_utf8_valid(h, strlen(h)), "not UTF-8 for input %s", input);
	size_t lt = 0, gt = 0; /* every '>' a tag's (none in text or attributes) */
	for (const char *p = h; *p; p++)
		lt += *p == '<', gt += *p == '>';
	ck_assert_msg(lt == gt, "a '>' of no tag in %s (input %s)", h, input);
	for (const char *p = strchr(h, '<'); p; p = strchr(p + 1, '<')) {
		const char *q = p + 1;
		if (*q == '/')
			q++;
		char name[32];
		size_t n = 0;
		while (isalnum((unsigned char)*q) && n + 1 < sizeof(name))
			name[n++] = *q++;
		name[n] = '\0';
		bool known = false;
		for (size_t i = 0; i < CW_ARRAY_LEN(tags); i++)
			known |= strcmp(tags[i], name) == 0;
		ck_assert_msg(known, "tag <%s> in %s (input %s)", name, h, input);
		/* Attributes: name="value" pairs up to '>'. */
		while (*q == ' ') {
			q++;
			char an[64];
			size_t al = 0;
			while (*q && *q != '=' && al + 1 < sizeof(an))
				an[al++] = *q++;
			an[al] = '\0';
			char pair[128];
			snprintf(pair, sizeof(pair), "%s %s", name, an);
			bool ok = false;
			for (size_t i = 0; i < CW_ARRAY_LEN(attrs); i++)
				ok |= strcmp(attrs[i], pair) == 0;
			ck_assert_msg(ok, "attribute %s in %s (input %s)", pair, h, input);
			ck_assert(q[0] == '=' && q[1] == '"');
			const char *end = strchr(q + 2, '"');
			ck_assert_ptr_nonnull(end);
			size_t vlen = (size_t)(end - q - 2);
			ck_assert_msg(!memchr(q + 2, '<', vlen) && !memchr(q + 2, '>', vlen), "bracket in an attribute: %s",
				      h);
			bool scheme_ok = strcmp(an, "href") != 0;
			for (size_t i = 0; i < CW_ARRAY_LEN(schemes); i++)
				scheme_ok |= strncasecmp(q + 2, schemes[i], strlen(schemes[i])) == 0;
			ck_assert_msg(scheme_ok, "href in %s (input %s)", h, input);
			q = end + 1;
		}
		ck_assert_msg(*q == '>', "malformed tag in %s", h);
	}
}

START_TEST(html_property)
{
	static const char *const pieces[] = {
		"<b>", "</b>", "<i>", "</i>", "<p>", "</p>", "<div>", "</div>", "<script>", "</script>", "<style>",
		"</style>", "<a href=\"https://x.org/?a=1&b=2\">", "<a href=\"javascript:alert(1)\">", "<a href=\"JaVaScRiPt:x\">",
		"<a href='data:text/html,x'>", "</a>", "<img src=\"mxc://example.org/abc\" onerror=\"x\">",
		"<img src=\"https://evil/x.png\" alt=\"pic\">", "<span data-mx-color=\"#ff0000\" style=\"x\">", "</span>",
		"<font color=\"#00ff00\">", "</font>", "<mx-reply>", "</mx-reply>", "<table>", "<tr>", "<td>", "</td>",
		"<!-- c -->", "<![CDATA[x]]>", "&amp;", "&lt;", "&#x3c;", "&eacute;", "&bogus;", "text", " ", "\n", "\"",
		"'", ">", "<", "&", "\xc3\xa9", "\xff", "\xe2\x80", "<ol start=\"3\">", "<li>", "</ol>", "<code class=\"language-c x\">",
		"</code>", "<pre>", "</pre>", "<br>", "<hr/>", "<unknown attr=1>", "</unknown>", "<svg onload=x>", "<iframe>",
		"<head>", "</head>", "<body onload=x>", "<title>", "</title>", "<h1>", "</h1>", "<details>", "<summary>",
		"<object>", "<textarea>", "<select><option>", "<math>", "<base href=x>", "<meta charset=\"latin1\">",
		"\x01", "\x7f", "\xef\xbf\xbe", "<a href=\"jav&#x61;script:x\">", "<a href=\" java\tscript:x\">",
		"<a href=\"&#106;avascript:x\" onclick=x style=\"x\">", "<a href=\"vbscript:x\">",
		"<a href=\"//evil/x\">", "<a href=\"https://x/&quot;onmouseover=x\" name=\"&quot;><script>\">",
		"<svg><script>", "</svg>", "<math><mi><style>", "</math>", "<template>", "</template>", "<noscript>",
		"</noscript>", "<xmp>", "</xmp>", "<img src=x onerror=alert(1)>", "<image src=\"mxc://example.org/a\">",
		"<span data-mx-spoiler=\"a&quot;b\">", "<div data-mx-maths=\"<b>\">", "<![CDATA[<script>]]>",
		"<!--<script>-->", "<plaintext>", "<x:script>",
	};
	int renested = 0;
	for (int i = 0; i < 4000; i++) {
		char buf[4096];
		size_t n = 0;
		int count = 1 + (int)rnd_below(40);
		for (int k = 0; k < count; k++) {
			const char *p = pieces[rnd_below(CW_ARRAY_LEN(pieces))];
			size_t l = strlen(p);
			if (n + l + 1 >= sizeof(buf))
				break;
			memcpy(buf + n, p, l);
			n += l;
		}
		buf[n] = '\0';
		char *out = mx_sanitize_html(buf, n);
		ck_assert_ptr_nonnull(out);
		assert_safe_html(out, buf);
		/* Safe again after another pass; usually the same text (libxml2
		 * re-nests some misnested input, e.g. a table inside a link, when it
		 * reads the output again), and then stable. */
		char *again = mx_sanitize_html(out, strlen(out));
		ck_assert_ptr_nonnull(again);
		assert_safe_html(again, out);
		if (strcmp(out, again) != 0) {
			renested++;
			char *third = mx_sanitize_html(again, strlen(again));
			ck_assert_msg(strcmp(third, again) == 0, "not stable:\n  input %s\n  twice %s\n  thrice %s", buf, again,
				      third);
			free(third);
		}
		free(again);
		free(out);
	}
	fprintf(stderr, "html_property: %d of 4000 re-nested on a second pass\n", renested);
	ck_assert_int_lt(renested, 400);
	/* Deep nesting: at most 100 levels are kept, nothing crashes. */
	size_t depth = 20000, n = 0;
	char *deep = malloc(depth * 7 + 16);
	for (size_t i = 0; i < depth; i++)
		n += (size_t)sprintf(deep + n, "<div>");
	n += (size_t)sprintf(deep + n, "x");
	char *out = mx_sanitize_html(deep, n);
	ck_assert_ptr_nonnull(out);
	size_t opened = 0;
	for (const char *p = strstr(out, "<div>"); p; p = strstr(p + 1, "<div>"))
		opened++;
	ck_assert_uint_le(opened, 100);
	ck_assert_ptr_nonnull(strchr(out, 'x'));
	free(out);
	free(deep);
	/* NULL and empty. */
	out = mx_sanitize_html(NULL, 0);
	ck_assert_str_eq(out, "");
	free(out);
	out = mx_sanitize_html("", 0);
	ck_assert_str_eq(out, "");
	free(out);
	/* Bytes after a NUL are part of the input. */
	out = mx_sanitize_html("a\0<b>c</b>", 10);
	ck_assert_str_eq(out, "a\xef\xbf\xbd<b>c</b>");
	free(out);
}
END_TEST

/* Each thread keeps its HTML parser context between parses (fifty-ninth
 * session): what a parse leaves in it (a document's parse without implied
 * elements, one stopped at its first element, one whose first-element
 * handler never ran, a deep one) must change nothing of the next, nor may
 * the way a kept context takes its input (a UTF-8 byte order mark at the
 * start, skipped by the encoding switch, is one difference that shows).
 * The same inputs, one after another on one thread, against each on a
 * thread of its own (a new context). */
#define KEPT_INPUTS 2000

struct kept_run {
	char **in;
	size_t *len;
	char **out;
	size_t first, count;
};

static void *kept_run_thread(void *arg)
{
	struct kept_run *r = arg;
	for (size_t i = r->first; i < r->first + r->count; i++) {
		char *html = mx_sanitize_html(r->in[i], r->len[i]);
		json_t *c = json_pack("{s:s, s:s}", "format", "org.matrix.custom.html", "formatted_body", r->in[i]);
		struct mx_mention m[4];
		size_t n = mx_mentions(c, NULL, m, 4);
		json_decref(c);
		size_t l = strlen(html ? html : "-") + 64 + n * sizeof(m[0].user_id);
		r->out[i] = malloc(l);
		int w = snprintf(r->out[i], l, "%s|%zu", html ? html : "-", n);
		for (size_t k = 0; k < n && k < 4 && w > 0; k++)
			w += snprintf(r->out[i] + w, l - (size_t)w, "|%s", m[k].user_id);
		free(html);
	}
	return NULL;
}

START_TEST(html_kept_context_changes_no_parse)
{
	static const char *const pieces[] = {
		"<html>", "<body>", "<head><title>t</title></head>", "</body>", "</html>", "<!-- <html> -->", "<!DOCTYPE html>",
		"<b>", "</b>", "<p>", "</p>", "</br>", "text", " ", "<a href=\"https://matrix.to/#/@bob:example.org\">",
		"Bob", "</a>", "<mx-reply>", "</mx-reply>", "<div>", "</div>", "&amp;", "&#x80;", "<htmlx>", "<x-y z=1>",
		"\xc3\xa9", "<table><tr><td>", "<?xml version=\"1.0\"?>", "<ul><li>", "<br>", "\xef\xbb\xbf", "\xff",
		"\xe2\x80", "\xf0\x9f\x98\x80", "<meta charset=\"latin1\">", "&#150;", "\x01", "<a title=\"\xc3\xa9\">",
	};
	static char *in[KEPT_INPUTS], *fresh[KEPT_INPUTS], *kept[KEPT_INPUTS];
	static size_t len[KEPT_INPUTS];
	for (size_t i = 0; i < KEPT_INPUTS; i++) {
		char buf[2048];
		size_t n = 0;
		int count = 1 + (int)rnd_below(12);
		for (int k = 0; k < count; k++) {
			const char *piece = pieces[rnd_below(CW_ARRAY_LEN(pieces))];
			size_t l = strlen(piece);
			memcpy(buf + n, piece, l);
			n += l;
		}
		if (i % 50 == 7) { /* deep: stacks past what a kept context keeps */
			n = 0;
			for (int k = 0; k < 400; k++)
				n += (size_t)sprintf(buf + n, "<b>");
		}
		buf[n] = '\0';
		in[i] = strdup(buf);
		len[i] = n;
	}
	for (size_t i = 0; i < KEPT_INPUTS; i++) {
		struct kept_run r = { in, len, fresh, i, 1 };
		pthread_t t;
		ck_assert_int_eq(pthread_create(&t, NULL, kept_run_thread, &r), 0);
		pthread_join(t, NULL);
	}
	struct kept_run r = { in, len, kept, 0, KEPT_INPUTS };
	pthread_t t;
	ck_assert_int_eq(pthread_create(&t, NULL, kept_run_thread, &r), 0);
	pthread_join(t, NULL);
	for (size_t i = 0; i < KEPT_INPUTS; i++)
		ck_assert_msg(strcmp(fresh[i], kept[i]) == 0, "input %s (after %s): alone %s, after others %s", in[i],
			      i ? in[i - 1] : "-", fresh[i], kept[i]);
	for (size_t i = 0; i < KEPT_INPUTS; i++) {
		free(in[i]);
		free(fresh[i]);
		free(kept[i]);
	}
}
END_TEST

/* The kept context's dictionary takes the names of entity references of
 * any length (libxml2 2.9's htmlParseName): bounded by bytes too since the
 * fifty-ninth session's review, where a bound of 1,024 names alone let a
 * thousand such names of up to an event's size stay on a reader thread. */
START_TEST(html_kept_context_is_bounded_by_bytes)
{
	size_t name = 6 * 1024, most = 0;
	char *in = malloc(name + 64);
	ck_assert_ptr_nonnull(in);
	for (int i = 0; i < 40; i++) {
		int w = snprintf(in, 64, "<b>x</b> &");
		for (size_t k = 0; k < name; k++)
			in[w + (int)k] = (char)('a' + (k * 7 + (size_t)i * 13) % 26);
		snprintf(in + w + name, 16, "%02d;", i);
		char *html = mx_sanitize_html(in, strlen(in));
		free(html);
		size_t used = mx_map_kept_html_usage();
		if (used > most)
			most = used;
		ck_assert_msg(used <= 64 * 1024, "parse %d: the kept context holds %zu bytes of names", i, used);
	}
	free(in);
#if LIBXML_VERSION < 21000
	/* the names went into it: the bound, not their absence, kept it small */
	ck_assert_msg(most >= name, "the kept context held at most %zu bytes", most);
#endif
}
END_TEST

START_TEST(from_neutral_edges)
{
	struct mx_out o;
	char why[200];
	/* Not an object, no type, no content: refused, nothing to free. */
	static const char *const bad[] = { "[]", "{}", "{\"type\":\"message\"}", "{\"type\":7,\"content\":{}}",
					   "{\"type\":\"message\",\"content\":[]}" };
	for (size_t i = 0; i < CW_ARRAY_LEN(bad); i++) {
		json_t *v = json_loads(bad[i], JSON_DECODE_ANY, NULL);
		ck_assert(!mx_from_neutral(v, NULL, NULL, NULL, NULL, &o, why, sizeof(why)));
		ck_assert_ptr_null(o.content);
		ck_assert(why[0]);
		json_decref(v);
	}
	ck_assert(!mx_from_neutral(NULL, NULL, NULL, NULL, NULL, &o, why, sizeof(why)));
	/* No lookup function: replies go as plain messages. */
	json_t *v = json_loads("{\"type\":\"message\",\"content\":{\"parts\":[{\"type\":\"text/plain\",\"body\":\"x\"}],"
			       "\"in_reply_to\":\"msg_1\"}}",
			       0, NULL);
	ck_assert(mx_from_neutral(v, NULL, NULL, NULL, NULL, &o, NULL, 0));
	ck_assert_ptr_null(json_object_get(o.content, "m.relates_to"));
	mx_out_clear(&o);
	json_decref(v);
	/* A lookup that answers junk is taken as unknown. */
	v = json_loads("{\"type\":\"delete\",\"content\":{\"replaces\":\"msg_1\"}}", 0, NULL);
	ck_assert(mx_from_neutral(v, id_lookup, NULL, NULL, NULL, &o, why, sizeof(why)));
	ck_assert_int_eq(o.op, MX_OP_NONE);
	mx_out_clear(&o);
	json_decref(v);
	mx_out_clear(NULL);
	/* to_neutral with a NULL lookup and a NULL why. */
	v = json_loads("{\"type\":\"m.room.message\",\"origin_server_ts\":5,\"content\":{\"msgtype\":\"m.text\",\"body\":\"b\","
		       "\"m.relates_to\":{\"m.in_reply_to\":{\"event_id\":\"$x\"}}}}",
		       0, NULL);
	json_t *out;
	ck_assert_int_eq(mx_to_neutral(v, NULL, NULL, &out, NULL, 0), MX_IN_OK);
	ck_assert_ptr_null(json_object_get(json_object_get(out, "content"), "in_reply_to"));
	json_decref(out);
	json_decref(v);
	ck_assert_int_eq(mx_to_neutral(NULL, NULL, NULL, &out, why, sizeof(why)), MX_IN_INVALID);
	ck_assert_ptr_null(out);
	json_t *eph = mx_ephemeral_to_neutral(NULL, NULL, NULL);
	ck_assert_uint_eq(json_array_size(eph), 0);
	json_decref(eph);
	ck_assert_uint_eq(mx_event_refs(NULL, NULL, 0), 0);
}
END_TEST

/* What mx_to_neutral gives passes event_parse whatever sender and room the
 * caller adds (each up to MIMI_URI_MAX): a caption of control characters
 * (six bytes of JSON each) beside a file whose url, name and type are as
 * long as they may be.  Until the fiftieth session the attachment was not
 * counted, and such an event was taken unmeasured and then refused. */
START_TEST(to_neutral_fits_any_envelope)
{
	char server[256], url[600], mime[128], name[256], sender[MIMI_URI_MAX + 1], room[MIMI_URI_MAX + 1];
	memset(server, 'a', 255); /* four labels of 63, the longest server name */
	server[63] = server[127] = server[191] = '.';
	server[255] = '\0';
	char media[256];
	memset(media, 'm', 255);
	media[255] = '\0';
	snprintf(url, sizeof(url), "mxc://%s/%s", server, media);
	memset(mime, 'x', sizeof(mime) - 1);
	memcpy(mime, "application/", 12);
	mime[sizeof(mime) - 1] = '\0';
	memset(name, '"', sizeof(name) - 1);
	name[sizeof(name) - 1] = '\0';
	/* the longest URIs: a domain of 247 bytes, a local part of 255 */
	char domain[248], local[256];
	memset(domain, 'd', 247);
	domain[63] = domain[127] = domain[191] = '.';
	domain[247] = '\0';
	memset(local, 'l', 255);
	local[255] = '\0';
	snprintf(sender, sizeof(sender), "mimi://%s/u/%s", domain, local);
	snprintf(room, sizeof(room), "mimi://%s/r/%.128s", domain, local); /* a room id: 128 at most */
	ck_assert_uint_eq(strlen(sender), MIMI_URI_MAX);
	int mapped = 0;
	for (size_t n = 10400; n <= 10700; n += 25) {
		char *caption = malloc(n + 1);
		ck_assert_ptr_nonnull(caption);
		memset(caption, 1, n);
		caption[n] = '\0';
		json_t *ev = json_pack("{s:s, s:I, s:{s:s, s:s, s:s, s:s, s:{s:s, s:i}, s:{s:{s:s}}}}", "type",
				       "m.room.message", "origin_server_ts", (json_int_t)1700000000000, "content", "msgtype",
				       "m.file", "body", caption, "filename", name, "url", url, "info", "mimetype", mime,
				       "size", 5, "m.relates_to", "m.in_reply_to", "event_id", "$known");
		ck_assert_ptr_nonnull(ev);
		free(caption);
		json_t *out = NULL;
		char why[200];
		enum mx_in_result r = mx_to_neutral(ev, id_lookup, NULL, &out, why, sizeof(why));
		if (r == MX_IN_OK) {
			mapped++;
			ck_assert_ptr_nonnull(json_object_get(json_object_get(out, "content"), "attachments"));
			assert_event_parses_as(out, "a caption of controls beside a long file", sender, room);
		} else {
			ck_assert_int_eq(r, MX_IN_INVALID);
			ck_assert_ptr_null(out);
		}
		json_decref(out);
		json_decref(ev);
	}
	ck_assert_int_gt(mapped, 0);
}
END_TEST

/* A homeserver's transaction as jansson reads it (mx_json_load): valid JSON
 * that a plain json_loadb refuses, a NUL in a string or an integer past 64
 * bits, must not fail the whole body, only the events holding it (until
 * the thirtieth session one such event failed the transaction, which the
 * homeserver then sent again for ever). */
START_TEST(json_load_lenient)
{
	json_error_t err;
	/* A NUL in a string: read, and found by mx_json_has_nul. */
	const char nul[] = "{\"events\":[{\"a\":\"x\\u0000y\"},{\"a\":\"fine\"}]}";
	json_t *v = mx_json_load(nul, strlen(nul), JSON_REJECT_DUPLICATES, &err);
	ck_assert_ptr_nonnull(v);
	json_t *evs = json_object_get(v, "events");
	ck_assert(mx_json_has_nul(json_array_get(evs, 0)));
	ck_assert(!mx_json_has_nul(json_array_get(evs, 1)));
	ck_assert_uint_eq(json_string_length(json_object_get(json_array_get(evs, 0), "a")), 3);
	json_decref(v);
	/* Deep inside arrays and objects too. */
	const char deep[] = "[{\"a\":[1,{\"b\":[\"\\u0000\"]}]}]";
	v = mx_json_load(deep, strlen(deep), 0, &err);
	ck_assert_ptr_nonnull(v);
	ck_assert(mx_json_has_nul(v));
	json_decref(v);
	ck_assert(!mx_json_has_nul(NULL));
	/* An integer past 64 bits: that one becomes a real, every other
	 * number stays as a first parse gives it (integers as integers up to
	 * 2^53, where a real is exact; reals as reals). */
	const char big[] = "{\"events\":[{\"n\":1000000000000000000000000,\"ts\":1764300000000},"
			   "{\"ts\":1764300000001,\"k\":[-5,0,2.5,9007199254740991,-9007199254740991]}]}";
	v = mx_json_load(big, strlen(big), JSON_REJECT_DUPLICATES, &err);
	ck_assert_ptr_nonnull(v);
	evs = json_object_get(v, "events");
	json_t *n = json_object_get(json_array_get(evs, 0), "n");
	ck_assert(json_is_real(n));
	ck_assert(json_real_value(n) == 1e24);
	json_t *ts = json_object_get(json_array_get(evs, 0), "ts");
	ck_assert(json_is_integer(ts) && json_integer_value(ts) == 1764300000000);
	ts = json_object_get(json_array_get(evs, 1), "ts");
	ck_assert(json_is_integer(ts) && json_integer_value(ts) == 1764300000001);
	json_t *k = json_object_get(json_array_get(evs, 1), "k");
	ck_assert(json_is_integer(json_array_get(k, 0)) && json_integer_value(json_array_get(k, 0)) == -5);
	ck_assert(json_is_integer(json_array_get(k, 1)) && json_integer_value(json_array_get(k, 1)) == 0);
	ck_assert(json_is_real(json_array_get(k, 2)) && json_real_value(json_array_get(k, 2)) == 2.5);
	ck_assert_int_eq(json_integer_value(json_array_get(k, 3)), 9007199254740991);
	ck_assert_int_eq(json_integer_value(json_array_get(k, 4)), -9007199254740991);
	json_decref(v);
	/* A negative one past 64 bits, and both at once. */
	const char both[] = "[-99999999999999999999999, \"\\u0000\", 7]";
	v = mx_json_load(both, strlen(both), 0, &err);
	ck_assert_ptr_nonnull(v);
	ck_assert(json_is_real(json_array_get(v, 0)));
	ck_assert(json_is_integer(json_array_get(v, 2)));
	ck_assert(mx_json_has_nul(v));
	json_decref(v);
	/* The other integers of a body with one past 64 bits are read as
	 * they are, past 2^53 too (until the thirty-first session the whole
	 * body was read again with every number a real, and these lost their
	 * low bits). */
	const char exact[] = "{\"events\":[{\"n\":-1000000000000000000000000},"
			     "{\"k\":[9007199254740993,9223372036854775807,-9223372036854775807,1.0]}]}";
	v = mx_json_load(exact, strlen(exact), JSON_REJECT_DUPLICATES, &err);
	ck_assert_ptr_nonnull(v);
	evs = json_object_get(v, "events");
	ck_assert(json_is_real(json_object_get(json_array_get(evs, 0), "n")));
	ck_assert(!mx_json_has_nul(json_array_get(evs, 0)));
	k = json_object_get(json_array_get(evs, 1), "k");
	ck_assert_int_eq(json_integer_value(json_array_get(k, 0)), 9007199254740993LL);
	ck_assert_int_eq(json_integer_value(json_array_get(k, 1)), 9223372036854775807LL);
	ck_assert_int_eq(json_integer_value(json_array_get(k, 2)), -9223372036854775807LL);
	ck_assert(json_is_real(json_array_get(k, 3)));
	json_decref(v);
	/* What jansson cannot read at all, a NUL in an object's key (jansson
	 * keeps keys as C strings) or a number past a double's range, is its
	 * event's trouble alone too: the event reads as holding a NUL (a
	 * number out of range told apart), the others as they are. */
	static const char *const alone[] = {
		"{\"events\":[{\"a\\u0000\":1,\"b\":2},{\"c\":3}]}",
		"{\"events\":[{\"b\":2,\"a\":{\"x\\\\\\\"\\u0000\":[1]}},{\"c\":3}]}",
		"{\"events\":[{\"n\":1e400,\"b\":2},{\"c\":3}]}",
		"{\"events\":[{\"n\":-1" "000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
		"000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
		"000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
		"000000000000000000000000000000000000000000000000000000000000000000000000000000000000,\"b\":2},"
		"{\"c\":3}]}",
		/* a key of the marker's own text beside a key with a NUL */
		"{\"events\":[{\"\\u0001cw:unreadable:0\":1,\"a\\u0000\":1,\"b\":2},{\"c\":3}]}",
	};
	for (size_t i = 0; i < CW_ARRAY_LEN(alone); i++) {
		v = mx_json_load(alone[i], strlen(alone[i]), JSON_REJECT_DUPLICATES, &err);
		ck_assert_msg(v != NULL, "%s: %s", alone[i], err.text);
		evs = json_object_get(v, "events");
		ck_assert_msg(mx_json_has_nul(json_array_get(evs, 0)), "%s", alone[i]);
		ck_assert_msg(mx_json_number_out_of_range(json_array_get(evs, 0)) == (i == 2 || i == 3), "%s", alone[i]);
		ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(evs, 0), "b")), 2);
		ck_assert(!mx_json_has_nul(json_array_get(evs, 1)));
		ck_assert(!mx_json_number_out_of_range(json_array_get(evs, 1)));
		ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(evs, 1), "c")), 3);
		json_decref(v);
	}
	/* Any number of integers past 64 bits is read (room versions 1 to 5
	 * allow them): past the readings allowed (64, or four times a large
	 * body) the rest are read at once as reals, as before the thirty-first
	 * session, and the body is never refused for them. */
	for (size_t count = 64; count <= 200; count += 136) {
		size_t blen = 16 + count * 27;
		char *many = malloc(blen);
		ck_assert_ptr_nonnull(many);
		size_t at = (size_t)snprintf(many, blen, "[7");
		for (size_t i = 0; i < count; i++)
			at += (size_t)snprintf(many + at, blen - at, ",100000000000000000000000%zu", i % 10);
		snprintf(many + at, blen - at, "]");
		v = mx_json_load(many, strlen(many), 0, &err);
		ck_assert_msg(v != NULL, "%zu: %s", count, err.text);
		ck_assert_uint_eq(json_array_size(v), count + 1);
		ck_assert_int_eq(json_integer_value(json_array_get(v, 0)), 7);
		ck_assert(json_is_real(json_array_get(v, count)));
		json_decref(v);
		free(many);
	}
	/* Past the readings allowed, the integers past 64 bits left are read
	 * as reals all at once, and every other number exactly as a first
	 * parse gives it: an integer past 2^53 of another event keeps its low
	 * bits (until the thirty-second session the whole body was read again
	 * with every number a real, and it lost them), a real stays a real,
	 * and a number past a double's range is its event's trouble alone
	 * (the mark), wherever it comes. */
	{
		size_t count = 100, blen = 512 + count * 40;
		char *many = malloc(blen);
		ck_assert_ptr_nonnull(many);
		size_t at = (size_t)snprintf(many, blen, "{\"events\":[{\"a\":[");
		for (size_t i = 0; i < count; i++)
			at += (size_t)snprintf(many + at, blen - at, "%s-1000000000000000000000%zu", i ? "," : "", i % 10);
		snprintf(many + at, blen - at,
			 "]},{\"k\":[9007199254740993,-9223372036854775807,2.0,0.5e1,\"1e400 \\\"99999999999999999999\"],"
			 "\"s\":\"x\"},{\"n\":1e400},{\"m\":[10000000000000000000000000,-0,3]}]}");
		v = mx_json_load(many, strlen(many), JSON_REJECT_DUPLICATES, &err);
		ck_assert_msg(v != NULL, "%s", err.text);
		evs = json_object_get(v, "events");
		json_t *a = json_object_get(json_array_get(evs, 0), "a");
		ck_assert_uint_eq(json_array_size(a), count);
		for (size_t i = 0; i < count; i++)
			ck_assert(json_is_real(json_array_get(a, i)) && json_real_value(json_array_get(a, i)) < -1e21);
		ck_assert(!mx_json_has_nul(json_array_get(evs, 0)));
		k = json_object_get(json_array_get(evs, 1), "k");
		ck_assert(json_is_integer(json_array_get(k, 0)));
		ck_assert_int_eq(json_integer_value(json_array_get(k, 0)), 9007199254740993LL);
		ck_assert_int_eq(json_integer_value(json_array_get(k, 1)), -9223372036854775807LL);
		ck_assert(json_is_real(json_array_get(k, 2)) && json_real_value(json_array_get(k, 2)) == 2.0);
		ck_assert(json_is_real(json_array_get(k, 3)) && json_real_value(json_array_get(k, 3)) == 5.0);
		ck_assert_str_eq(json_string_value(json_array_get(k, 4)), "1e400 \"99999999999999999999");
		ck_assert(!mx_json_has_nul(json_array_get(evs, 1)));
		ck_assert(mx_json_number_out_of_range(json_array_get(evs, 2)));
		ck_assert(!mx_json_number_out_of_range(json_array_get(evs, 3)));
		json_t *mm = json_object_get(json_array_get(evs, 3), "m");
		ck_assert(json_is_real(json_array_get(mm, 0)));
		ck_assert(json_is_integer(json_array_get(mm, 1)) && json_integer_value(json_array_get(mm, 1)) == 0);
		ck_assert(json_is_integer(json_array_get(mm, 2)) && json_integer_value(json_array_get(mm, 2)) == 3);
		json_decref(v);
		free(many);
	}
	/* A large body is read at most four times over, whatever it holds:
	 * 4 MiB of text with 64 such integers at its end. */
	size_t blen = (size_t)8 << 20, at;
	char *large = malloc(blen);
	ck_assert_ptr_nonnull(large);
	at = (size_t)snprintf(large, blen, "[\"");
	memset(large + at, 'x', (size_t)4 << 20);
	at += (size_t)4 << 20;
	at += (size_t)snprintf(large + at, blen - at, "\"");
	for (int i = 0; i < 64; i++)
		at += (size_t)snprintf(large + at, blen - at, ",-100000000000000000000000%d", i % 10);
	snprintf(large + at, blen - at, "]");
	v = mx_json_load(large, strlen(large), 0, &err);
	ck_assert_msg(v != NULL, "%s", err.text);
	ck_assert_uint_eq(json_array_size(v), 65);
	ck_assert(json_is_real(json_array_get(v, 64)));
	json_decref(v);
	free(large);
	/* A duplicate key, when asked to refuse them, is a key of a mark of
	 * its own, found by mx_json_duplicate_key and mx_json_has_nul, the
	 * first value kept (since the forty-second session; until then the
	 * whole body was refused); beside a key with a NUL too, and beside a
	 * key written as the mark. */
	static const char *const dups[] = { "{\"a\":1,\"a\":2}", "{\"a\\u0000\":1,\"x\":1,\"x\":2}",
					    "[{\"\\u0001cw:duplicate:0\":0,\"x\":1,\"x\":2}]",
					    "{\"o\":{\"a\":1,\"a\":2,\"a\":3}}" };
	for (size_t i = 0; i < CW_ARRAY_LEN(dups); i++) {
		v = mx_json_load(dups[i], strlen(dups[i]), JSON_REJECT_DUPLICATES, &err);
		ck_assert_msg(v != NULL, "%s: %s", dups[i], err.text);
		ck_assert(mx_json_duplicate_key(v, true) && mx_json_has_nul(v));
		ck_assert(mx_json_duplicate_key(v, false) == (i < 2));
		json_decref(v);
	}
	v = mx_json_load("{\"a\":{\"b\":1}}", 13, JSON_REJECT_DUPLICATES, &err);
	ck_assert(v && !mx_json_duplicate_key(v, true));
	json_decref(v);
	/* What is still refused whole: not JSON, an unfinished body. */
	static const char *const refused[] = { "{not json", "[1" };
	for (size_t i = 0; i < CW_ARRAY_LEN(refused); i++) {
		v = mx_json_load(refused[i], strlen(refused[i]), JSON_REJECT_DUPLICATES, &err);
		ck_assert_msg(v == NULL, "%s", refused[i]);
	}
}
END_TEST

static const char *orig_lookup(void *ctx, const char *id)
{
	(void)ctx;
	return strcmp(id, "msg_orig") == 0 ? "$orig:example.org" : NULL;
}

/* A neutral event whose Matrix event would pass 65,536 bytes is made to
 * fit, step by step: the HTML left out, an edit's fallback made short,
 * then the text cut on a character with a marker (never refused: a
 * homeserver answers 413 M_TOO_LARGE to a larger one). */
START_TEST(from_neutral_fits_an_event)
{
	static const struct {
		const char *type;
		size_t plain, html; /* bytes of "é" (2 a character) and of "&" */
		bool html_kept, fallback_short, cut;
		bool quotes; /* the text is of '"' (two bytes of JSON each), not of "é" */
	} cases[] = {
		{ "message", 20000, 16000, false, false, false, false },
		{ "message", 20000, 4000, true, false, false, false },
		{ "message", 70000, 0, false, false, true, false },
		{ "edit", 20000, 0, false, false, false, false },
		{ "edit", 40000, 100, false, true, false, false },
		{ "edit", 70000, 0, false, true, true, false },
		{ "message", 70000, 0, false, false, true, true },
		{ "edit", 70000, 0, false, true, true, true },
	};
	for (size_t i = 0; i < CW_ARRAY_LEN(cases); i++) {
		char *plain = malloc(cases[i].plain + 1), *html = malloc(cases[i].html + 1);
		ck_assert(plain && html);
		for (size_t k = 0; k + 1 < cases[i].plain; k += 2)
			memcpy(plain + k, cases[i].quotes ? "\"\"" : "\xc3\xa9", 2);
		plain[cases[i].plain] = '\0';
		memset(html, '&', cases[i].html);
		html[cases[i].html] = '\0';
		json_t *v = json_pack("{s:s, s:{s:[{s:s, s:s}], s:s}}", "type", cases[i].type, "content", "parts", "type",
				      "text/plain", "body", plain, "replaces", "msg_orig");
		if (cases[i].html)
			json_array_append_new(json_object_get(json_object_get(v, "content"), "parts"),
					      json_pack("{s:s, s:s}", "type", "text/html", "body", html));
		struct mx_out o;
		char why[200] = "";
		ck_assert_msg(mx_from_neutral(v, orig_lookup, NULL, "org.causeway.outbox_id", "12345678901234567890", &o,
					      why, sizeof(why)),
			      "case %zu: %s", i, why);
		char *doc = json_dumps(o.content, JSON_COMPACT);
		ck_assert_msg(strlen(doc) <= 65536 - 4096, "case %zu: %zu bytes", i, strlen(doc));
		free(doc);
		bool edit = strcmp(cases[i].type, "edit") == 0;
		const json_t *text = edit ? json_object_get(o.content, "m.new_content") : o.content;
		const char *body = json_string_value(json_object_get(text, "body"));
		ck_assert_msg((json_object_get(text, "formatted_body") != NULL) == cases[i].html_kept, "case %zu", i);
		ck_assert(cw_utf8_valid(body, strlen(body)));
		if (cases[i].cut) {
			const char *mark = "\xe2\x80\xa6 (message shortened)";
			/* As much as fits: 60,000 bytes of "é", 30,000 of quotes
			 * (until a review of the thirtieth session's change, a text of
			 * quotes was cut to nothing but the marker). */
			ck_assert_msg(strlen(body) > (cases[i].quotes ? 30000u : 60000u) &&
					      strstr(body, mark) == body + strlen(body) - strlen(mark),
				      "case %zu: %zu bytes", i, strlen(body));
			ck_assert(strncmp(body, plain, strlen(body) - strlen(mark)) == 0);
		} else {
			ck_assert_str_eq(body, plain);
		}
		if (edit) {
			const char *fb = json_string_value(json_object_get(o.content, "body"));
			ck_assert(strncmp(fb, "* ", 2) == 0);
			ck_assert_msg((strlen(fb) < 200) == cases[i].fallback_short, "case %zu: fallback %zu", i, strlen(fb));
			ck_assert(cw_utf8_valid(fb, strlen(fb)));
			ck_assert_str_eq(json_string_value(json_object_get(json_object_get(o.content, "m.relates_to"),
									   "event_id")),
					 "$orig:example.org");
		}
		mx_out_clear(&o);
		json_decref(v);
		free(plain);
		free(html);
	}
}
END_TEST

/* m.typing with more users than one event may turn into: capped. */
START_TEST(ephemeral_cap)
{
	json_t *ids = json_array();
	for (int i = 0; i < 1500; i++) {
		char id[64];
		snprintf(id, sizeof(id), "@u%d:example.org", i);
		json_array_append_new(ids, json_string(id));
	}
	json_t *ev = json_pack("{s:s, s:{s:o}}", "type", "m.typing", "content", "user_ids", ids);
	json_t *list = mx_ephemeral_to_neutral(ev, NULL, NULL);
	ck_assert_uint_eq(json_array_size(list), 1024);
	json_decref(list);
	json_decref(ev);
}
END_TEST

/* ------------------------------------------------------------ media worker's queue */

/* A struct matrix with only what mx_media_ask touches: the queue, the
 * memo, their lock and the worker's signal (no worker runs). */
static void media_init(struct matrix *m)
{
	static struct cw_config cfg = { .media_max_bytes = 50L << 20 };
	memset(m, 0, sizeof(*m));
	m->cfg = &cfg;
	pthread_mutex_init(&m->mu, NULL);
	pthread_cond_init(&m->media_cond, NULL);
	m->media_queue = json_array();
	m->media_state = json_object();
	ck_assert_ptr_nonnull(m->media_queue);
	ck_assert_ptr_nonnull(m->media_state);
}

static enum mx_rehost media_ask(struct matrix *m, int i, cw_errmsg *e)
{
	char url[64];
	snprintf(url, sizeof(url), "https://media.wa.example/f/%d", i);
	json_t *att = json_pack("{s:s, s:s}", "url", url, "content_type", "image/png");
	char why[160] = "";
	/* Files of eight signers in turn: one signer may hold at most
	 * MX_MEDIA_QUEUE_PER_SIGNER of the places (media_one_signer_is_capped). */
	char signer[32];
	snprintf(signer, sizeof(signer), "wa%d.example", i % 8);
	enum mx_rehost r = mx_media_ask(m, 1000 + i, "@_cw_gk_wally:example.org", signer, att, why, sizeof(why), e);
	json_decref(att);
	return r;
}

/* One peer's files fill at most MX_MEDIA_QUEUE_PER_SIGNER places, so
 * that a slow store leaves the others room (thirty-second session). */
START_TEST(media_one_signer_is_capped)
{
	struct matrix m;
	media_init(&m);
	cw_errmsg e = { { 0 } };
	char why[160];
	for (int i = 0; i <= MX_MEDIA_QUEUE_PER_SIGNER; i++) {
		char url[64];
		snprintf(url, sizeof(url), "https://media.wa.example/one/%d", i);
		json_t *att = json_pack("{s:s, s:s}", "url", url, "content_type", "image/png");
		enum mx_rehost r = mx_media_ask(&m, 1000 + i, "@_cw_gk_wally:example.org", "slow.example", att,
						why, sizeof(why), &e);
		json_decref(att);
		ck_assert_int_eq(r, i < MX_MEDIA_QUEUE_PER_SIGNER ? MX_REHOST_WAIT : MX_REHOST_RETRY);
	}
	ck_assert_uint_eq(json_array_size(m.media_queue), MX_MEDIA_QUEUE_PER_SIGNER);
	/* Each file queued for the event whose row asked for it: the worker
	 * looks at that event again before the upload (mx_rehost). */
	ck_assert_int_eq(json_integer_value(json_array_get(json_array_get(m.media_queue, 7), 3)), 1007);
	/* Another signer still finds room. */
	ck_assert_int_eq(media_ask(&m, 1, &e), MX_REHOST_WAIT);
	json_decref(m.media_queue);
	json_decref(m.media_state);
	pthread_cond_destroy(&m.media_cond);
	pthread_mutex_destroy(&m.mu);
}
END_TEST

/* style.md: every growable buffer has a cap.  The queue holds at most
 * MX_MEDIA_QUEUE_MAX files (one more is asked for again later, the row
 * told why), a file is never queued twice, and the memo's reset at
 * MX_MEDIA_STATE_MAX keeps what is still queued (until the twentieth
 * session it forgot it, and each reset queued the same files again, the
 * queue growing without bound behind a slow store). */
START_TEST(media_queue_is_bounded)
{
	struct matrix m;
	media_init(&m);
	cw_errmsg e = { { 0 } };
	for (int i = 0; i < MX_MEDIA_QUEUE_MAX; i++)
		ck_assert_int_eq(media_ask(&m, i, &e), MX_REHOST_WAIT);
	ck_assert_uint_eq(json_array_size(m.media_queue), MX_MEDIA_QUEUE_MAX);
	/* Full: the next file is not queued, the row goes again later. */
	ck_assert_int_eq(media_ask(&m, MX_MEDIA_QUEUE_MAX, &e), MX_REHOST_RETRY);
	ck_assert_msg(strstr(e.msg, "queue") != NULL, "%s", e.msg);
	ck_assert_uint_eq(json_array_size(m.media_queue), MX_MEDIA_QUEUE_MAX);
	/* A file queued already waits, not queued twice. */
	ck_assert_int_eq(media_ask(&m, 0, &e), MX_REHOST_WAIT);
	ck_assert_uint_eq(json_array_size(m.media_queue), MX_MEDIA_QUEUE_MAX);
	/* The worker takes two; the memo fills up with files it could not
	 * carry, and a new file resets it: what is queued stays known. */
	json_array_remove(m.media_queue, 0);
	json_array_remove(m.media_queue, 0);
	for (int i = 0; json_object_size(m.media_state) < MX_MEDIA_STATE_MAX; i++) {
		char key[64];
		snprintf(key, sizeof(key), "wa.example\nhttps://gone.example/%d", i);
		json_object_set_new(m.media_state, key, json_pack("{s:s, s:s}", "s", "notice", "why", "gone"));
	}
	ck_assert_int_eq(media_ask(&m, MX_MEDIA_QUEUE_MAX + 1, &e), MX_REHOST_WAIT);
	ck_assert_uint_eq(json_array_size(m.media_queue), MX_MEDIA_QUEUE_MAX - 1);
	ck_assert_uint_le(json_object_size(m.media_state), MX_MEDIA_STATE_MAX);
	for (int i = 2; i < MX_MEDIA_QUEUE_MAX; i++)
		ck_assert_int_eq(media_ask(&m, i, &e), MX_REHOST_WAIT);
	ck_assert_uint_eq(json_array_size(m.media_queue), MX_MEDIA_QUEUE_MAX - 1);
	json_decref(m.media_queue);
	json_decref(m.media_state);
	pthread_cond_destroy(&m.media_cond);
	pthread_mutex_destroy(&m.mu);
}
END_TEST

/* mx_mentions: the users a message mentions, as clients send them (a pill:
 * the link in formatted_body, the id in m.mentions), for the bot's
 * commands. */
static size_t mentions_of(const char *json, struct mx_mention *out, size_t max)
{
	static const char *const skip[] = { "@_cw_bot:example.org", "@alice:example.org", NULL };
	json_error_t err;
	json_t *c = json_loads(json, 0, &err);
	ck_assert_msg(c != NULL, "%s: %s", json, err.text);
	memset(out, 0x55, max * sizeof(*out));
	size_t n = mx_mentions(c, skip, out, max);
	json_decref(c);
	return n;
}

START_TEST(mentions)
{
	struct mx_mention m[2];
	const char *wally = "@_cw_gk_wally:example.org";
	/* Element's pill: m.mentions gives the id, the link its label. */
	ck_assert_uint_eq(mentions_of("{\"body\":\"accept Wally (gk)\",\"format\":\"org.matrix.custom.html\","
				      "\"formatted_body\":\"accept <a href=\\\"https://matrix.to/#/@_cw_gk_wally:"
				      "example.org\\\"> Wally &amp; co (gk) </a>\",\"m.mentions\":{\"user_ids\":"
				      "[\"@_cw_gk_wally:example.org\"]}}", m, 2), 1);
	ck_assert_str_eq(m[0].user_id, wally);
	ck_assert_str_eq(m[0].label, "Wally & co (gk)");
	/* No m.mentions: the links, percent-encoded or not, matrix: URIs; each
	 * user once; links to rooms, events and the web are none. */
	ck_assert_uint_eq(mentions_of("{\"body\":\"x\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
				      "\"<a href='https://matrix.to/#/%40_cw_gk_wally%3Aexample.org?via=x'>W</a>"
				      "<a href='matrix:u/_cw_gk_wally:example.org?action=chat'>W2</a>"
				      "<a href='https://matrix.to/#/!room:example.org/$ev'>r</a>"
				      "<a href='https://matrix.to/#/#alias:example.org'>a</a>"
				      "<a href='https://example.org/@x:y'>w</a><a href='https://matrix.to/#/@bad'>b</a>\"}",
				      m, 2), 1);
	ck_assert_str_eq(m[0].user_id, wally);
	ck_assert_str_eq(m[0].label, "W");
	/* The reply fallback's link and the skipped ids (the bot, the sender)
	 * are no mentions; nor are links of a body that is not HTML. */
	ck_assert_uint_eq(mentions_of("{\"body\":\"x\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
				      "\"<mx-reply><blockquote><a href='https://matrix.to/#/@bob:example.org'>b</a>"
				      "</blockquote></mx-reply>block <a href='https://matrix.to/#/@alice:example.org'>"
				      "me</a>\",\"m.mentions\":{\"user_ids\":[\"@_cw_bot:example.org\",\"@alice:example.org\","
				      "\"not an id\",7]}}", m, 2), 0);
	ck_assert_uint_eq(mentions_of("{\"body\":\"x\",\"formatted_body\":\"<a href='https://matrix.to/#/"
				      "@bob:example.org'>b</a>\"}", m, 2), 0);
	/* m.mentions names whom the links do not show: it counts, unlabelled;
	 * links to others then count not. */
	ck_assert_uint_eq(mentions_of("{\"body\":\"x\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
				      "\"<a href='https://matrix.to/#/@bob:example.org'>b</a>\",\"m.mentions\":"
				      "{\"user_ids\":[\"@_cw_gk_wally:example.org\",\"@_cw_gk_wally:example.org\"]}}", m, 2),
			  1);
	ck_assert_str_eq(m[0].user_id, wally);
	ck_assert_str_eq(m[0].label, "");
	/* Several: counted past max. */
	ck_assert_uint_eq(mentions_of("{\"body\":\"x\",\"m.mentions\":{\"user_ids\":[\"@a:x.org\",\"@b:x.org\","
				      "\"@c:x.org\"]}}", m, 2), 3);
	ck_assert_str_eq(m[1].user_id, "@b:x.org");
}
END_TEST

/* mx_bot_parse: a bot command as clients send it (an edit, a reply, a
 * pill), read as the bot acts on it. */
static const struct mx_bot_names bot_names = { .bot = "@_cw_bot:example.org", .server = "example.org",
					       .prefix = "_cw_" };

/* mx_bot_parse of json as alice's, into *cmd (filled with garbage first). */
static bool bot_read(const char *json, struct mx_bot_cmd *cmd)
{
	json_error_t err;
	json_t *c = json_loads(json, 0, &err);
	ck_assert_msg(c != NULL, "%s: %s", json, err.text);
	memset(cmd, 0x55, sizeof(*cmd));
	bool ok = mx_bot_parse(c, "@alice:example.org", &bot_names, cmd);
	json_decref(c);
	return ok;
}

static void bot_case(const char *json, const char *verb, const char *party, enum mx_bot_party kind, bool mentioned,
		     const char *reason)
{
	struct mx_bot_cmd cmd;
	bool ok = bot_read(json, &cmd);
	ck_assert_msg(ok == (verb != NULL), "%s: read %d", json, ok);
	if (!verb)
		return;
	ck_assert_msg(strcmp(cmd.verb, verb) == 0, "%s: verb \"%s\"", json, cmd.verb);
	ck_assert_msg(strcmp(cmd.party, party) == 0, "%s: party \"%s\"", json, cmd.party);
	ck_assert_msg(cmd.kind == kind, "%s: kind %d", json, (int)cmd.kind);
	ck_assert_msg(cmd.mentioned == mentioned, "%s: mentioned %d", json, cmd.mentioned);
	ck_assert_msg(strcmp(cmd.reason, reason) == 0, "%s: reason \"%s\"", json, cmd.reason);
	ck_assert_msg(cmd.text, "%s: read as no text", json);
}

/* Whether json is read as a text message (list, the only command in
 * these), or as one of another kind, with nothing read of it. */
static void bot_text_case(const char *json, bool text)
{
	struct mx_bot_cmd cmd;
	ck_assert_msg(bot_read(json, &cmd), "%s: not read", json);
	ck_assert_msg(cmd.text == text, "%s: text %d", json, cmd.text);
	ck_assert_str_eq(cmd.verb, text ? "list" : "");
	ck_assert_str_eq(cmd.party, "");
	ck_assert_str_eq(cmd.reason, "");
	ck_assert(!cmd.mentioned);
}

#define PILL(id, label) "<a href=\\\"https://matrix.to/#/" id "\\\">" label "</a>"
#define WALLY "@_cw_gk_wally:example.org"

START_TEST(bot_parse)
{
	const enum mx_bot_party S = MX_BOT_PARTY_SUBJECT;
	bot_case("{\"body\":\"list\"}", "list", "", S, false, "");
	/* An m.notice is never answered (the specification: "must never be
	 * automatically responded to"), an edit into one neither; until the
	 * forty-fourth session the bot answered it as any command. */
	bot_case("{\"msgtype\":\"m.notice\",\"body\":\"list\"}", NULL, "", S, false, "");
	bot_case("{\"msgtype\":\"m.text\",\"body\":\"* list\",\"m.new_content\":{\"msgtype\":\"m.notice\","
		 "\"body\":\"list\"},\"m.relates_to\":{\"rel_type\":\"m.replace\",\"event_id\":\"$x\"}}", NULL, "",
		 S, false, "");
	/* Only text is a command (no msgtype is read as text): an emote, an
	 * image, a file, a msgtype of no string, an edit into one are read as
	 * no text (verb ""); until the forty-seventh session their body was
	 * a command, and an image sent to the bot got the help. */
	bot_text_case("{\"msgtype\":\"m.text\",\"body\":\"list\"}", true);
	bot_text_case("{\"body\":\"list\"}", true);
	bot_text_case("{\"msgtype\":\"m.emote\",\"body\":\"list\"}", false);
	bot_text_case("{\"msgtype\":\"m.image\",\"body\":\"block x.org\",\"url\":\"mxc://a/b\"}", false);
	bot_text_case("{\"msgtype\":\"m.file\",\"body\":\"accept @x:y.org\"}", false);
	bot_text_case("{\"msgtype\":7,\"body\":\"list\"}", false);
	bot_text_case("{\"msgtype\":\"m.text\",\"body\":\"* list\",\"m.new_content\":{\"msgtype\":\"m.emote\","
		      "\"body\":\"list\"},\"m.relates_to\":{\"rel_type\":\"m.replace\",\"event_id\":\"$x\"}}", false);
	bot_text_case("{\"msgtype\":\"m.image\",\"body\":\"* x\",\"m.new_content\":{\"msgtype\":\"m.text\","
		      "\"body\":\"list\"},\"m.relates_to\":{\"rel_type\":\"m.replace\",\"event_id\":\"$x\"}}", true);
	bot_case("{\"body\":\"\"}", "", "", S, false, "");
	bot_case("{\"body\":\" \\t\\n \"}", "", "", S, false, "");
	/* The verb in any case; blanks around the words. */
	bot_case("{\"body\":\"  ACCEPT   mimi://wa.example/u/bob  \"}", "accept", "mimi://wa.example/u/bob", S,
		 false, "");
	bot_case("{\"body\":\"Opt-In peer:gk\"}", "opt-in", "peer:gk", S, false, "");
	/* A network in any case: a peer's name is lower case (until the
	 * forty-second session "opt-in GK" was "I know no network GK"); a
	 * party of another command keeps its case (a remote user's id). */
	bot_case("{\"body\":\"opt-in GK\"}", "opt-in", "gk", S, false, "");
	bot_case("{\"body\":\"OPT-OUT Peer:Gk\"}", "opt-out", "peer:gk", S, false, "");
	bot_case("{\"body\":\"block mimi://wa.example/u/Wally\"}", "block", "mimi://wa.example/u/Wally", S, false,
		 "");
	/* White space of any kind between and around the words: a no-break
	 * space (phones put one in), an ideographic space, a tab, an em
	 * space (until the forty-second session "opt-in" U+00A0 "gk" was no
	 * command: the help). */
	bot_case("{\"body\":\"opt-in\u00a0gk\"}", "opt-in", "gk", S, false, "");
	bot_case("{\"body\":\"\u00a0\u3000opt-in\\tGK\u00a0\"}", "opt-in", "gk", S, false, "");
	bot_case("{\"body\":\"block\u2003mimi://wa.example/u/wally\u202f\"}", "block",
		 "mimi://wa.example/u/wally", S, false, "");
	bot_case("{\"body\":\"report\u00a0mimi://x.example/u/bob\u00a0he\u00a0spams\u3000\"}", "report",
		 "mimi://x.example/u/bob", S, false, "he\xc2\xa0" "spams");
	/* ... and a zero-width character, which is no white space but shows
	 * nothing either (cw_utf8_zero_width: until the forty-third session
	 * "accept" U+200B "@x:y" was one word, the verb, and the user got
	 * the help); one within a reason stays. */
	bot_case("{\"body\":\"opt-in\u200bgk\"}", "opt-in", "gk", S, false, "");
	bot_case("{\"body\":\"\ufeffblock\u2060mimi://wa.example/u/wally\u200b\"}", "block",
		 "mimi://wa.example/u/wally", S, false, "");
	bot_case("{\"body\":\"report\u200bmimi://x.example/u/bob\u200b\u200che\u200dspams\u200b\"}", "report",
		 "mimi://x.example/u/bob", S, false, "he\xe2\x80\x8d" "spams");
	/* A report's reason: the rest of its line, CR or LF ending it. */
	bot_case("{\"body\":\"Report mimi://x.example/u/bob   he spams  \\nsecond line\"}", "report",
		 "mimi://x.example/u/bob", S, false, "he spams");
	bot_case("{\"body\":\"report mimi://x.example/u/bob spam\\r\\nmore\"}", "report", "mimi://x.example/u/bob", S,
		 false, "spam");
	bot_case("{\"body\":\"report mimi://x.example/u/bob\\nnext line\"}", "report", "mimi://x.example/u/bob", S,
		 false, "next line"); /* the blanks before the reason are skipped, a line break too (as before) */
	/* An edit: the edited content, not the fallback "* ..."; one without
	 * a body to read is not answered. */
	bot_case("{\"body\":\"* block x.org\",\"m.new_content\":{\"body\":\"block y.org\",\"msgtype\":\"m.text\"},"
		 "\"m.relates_to\":{\"rel_type\":\"m.replace\",\"event_id\":\"$e\"}}", "block", "y.org", S, false, "");
	bot_case("{\"body\":\"* block x.org\",\"m.relates_to\":{\"rel_type\":\"m.replace\",\"event_id\":\"$e\"}}",
		 NULL, NULL, S, false, NULL);
	bot_case("{\"body\":\"* block x.org\",\"m.new_content\":{\"msgtype\":\"m.text\"},"
		 "\"m.relates_to\":{\"rel_type\":\"m.replace\"}}", NULL, NULL, S, false, NULL);
	bot_case("{\"body\":\"* block x.org\",\"m.new_content\":\"block y.org\",\"m.relates_to\":{\"rel_type\":"
		 "\"m.replace\"}}", NULL, NULL, S, false, NULL);
	bot_case("{\"msgtype\":\"m.text\"}", NULL, NULL, S, false, NULL);
	bot_case("{\"body\":7}", NULL, NULL, S, false, NULL);
	/* Another relation (a thread) is the message itself. */
	bot_case("{\"body\":\"block x.org\",\"m.relates_to\":{\"rel_type\":\"m.thread\"}}", "block", "x.org", S, false,
		 "");
	/* A reply: after the quote of what it answers, whose link is no
	 * mention. */
	bot_case("{\"body\":\"> <@_cw_bot:example.org> Wally (gk) asks to write to you\\n> more\\n\\nblock z.org\","
		 "\"format\":\"org.matrix.custom.html\",\"formatted_body\":\"<mx-reply><blockquote>"
		 PILL("@bob:example.org", "bob") "</blockquote></mx-reply>block z.org\"}",
		 "block", "z.org", S, false, "");
	/* A pill: the display name in body, the id in the link and in
	 * m.mentions; the reason after the name. */
	bot_case("{\"body\":\"report Wally (gk) spams me\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
		 "\"report " PILL(WALLY, "Wally (gk)") " spams me\",\"m.mentions\":{\"user_ids\":[\"" WALLY "\"]}}",
		 "report", WALLY, S, true, "spams me");
	/* ... the link alone (no m.mentions), and the id typed. */
	bot_case("{\"body\":\"accept Wally\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
		 "\"accept " PILL(WALLY, "Wally") "\"}", "accept", WALLY, S, true, "");
	bot_case("{\"body\":\"report " WALLY " abuse\",\"m.mentions\":{\"user_ids\":[\"" WALLY "\"]}}", "report",
		 WALLY, S, true, "abuse");
	/* m.mentions alone, the text not showing her: all of the line the
	 * reason. */
	bot_case("{\"body\":\"report he spams\\nme\",\"m.mentions\":{\"user_ids\":[\"" WALLY "\"]}}", "report", WALLY,
		 S, true, "he spams");
	/* The bot and the sender mentioned are no party: the word typed is. */
	bot_case("{\"body\":\"block x.org\",\"m.mentions\":{\"user_ids\":[\"@_cw_bot:example.org\","
		 "\"@alice:example.org\"]}}", "block", "x.org", S, false, "");
	/* Several mentioned: none picked. */
	bot_case("{\"body\":\"block W and V\",\"m.mentions\":{\"user_ids\":[\"" WALLY "\",\"@_cw_gk_v:example.org\"]}}",
		 "block", "", MX_BOT_PARTY_SEVERAL, false, "and V");
	/* A Matrix user who is no ghost, mentioned or typed: no party of an
	 * accept or block; of a report one of this server's is. */
	bot_case("{\"body\":\"accept bob\",\"m.mentions\":{\"user_ids\":[\"@bob:other.org\"]}}", "accept",
		 "@bob:other.org", MX_BOT_PARTY_NOT_REMOTE, true, "bob");
	bot_case("{\"body\":\"block @bob:example.org\"}", "block", "@bob:example.org", MX_BOT_PARTY_NOT_REMOTE, false,
		 "");
	bot_case("{\"body\":\"report @bob:example.org said things\"}", "report", "@bob:example.org",
		 MX_BOT_PARTY_LOCAL, false, "said things");
	bot_case("{\"body\":\"report bob\",\"m.mentions\":{\"user_ids\":[\"@bob:example.org\"]}}", "report",
		 "@bob:example.org", MX_BOT_PARTY_LOCAL, true, "bob");
	bot_case("{\"body\":\"report @bob:other.org\"}", "report", "@bob:other.org", MX_BOT_PARTY_NOT_REMOTE, false, "");
	/* The bot's id (in the ghosts' namespace with the default names):
	 * the bot, typed or picked (until the fortieth session it was looked
	 * up as a ghost's, "Whom?"); a mention of it elsewhere is none. */
	const enum mx_bot_party B = MX_BOT_PARTY_BOT;
	bot_case("{\"body\":\"report @_cw_bot:example.org\"}", "report", "@_cw_bot:example.org", B, false, "");
	bot_case("{\"body\":\"block @_cw_bot:example.org now\"}", "block", "@_cw_bot:example.org", B, false, "now");
	bot_case("{\"body\":\"accept Causeway: please\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
		 "\"accept " PILL("@_cw_bot:example.org", "Causeway") ": please\",\"m.mentions\":{\"user_ids\":"
		 "[\"@_cw_bot:example.org\"]}}", "accept", "@_cw_bot:example.org", B, true, "please");
	bot_case("{\"body\":\"block x.org Causeway\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
		 "\"block x.org " PILL("@_cw_bot:example.org", "Causeway") "\"}", "block", "x.org", S, false, "Causeway");
	bot_case("{\"body\":\"report CausewayX\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
		 "\"report " PILL("@_cw_bot:example.org", "Causeway") "X\"}", "report", "CausewayX", S, false, "");
	/* A pill's label (or the id typed) is matched as a whole word only:
	 * "Wal" is not the start of "Wally spams" (until the fortieth session
	 * the reason was "ly spams"); a ':' after it is skipped. */
	bot_case("{\"body\":\"report Wally spams\",\"m.mentions\":{\"user_ids\":[\"" WALLY "\"]},"
		 "\"format\":\"org.matrix.custom.html\",\"formatted_body\":\"report " PILL(WALLY, "Wal") "\"}",
		 "report", WALLY, S, true, "Wally spams");
	bot_case("{\"body\":\"report Wally: spams\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
		 "\"report " PILL(WALLY, "Wally") ": spams\"}", "report", WALLY, S, true, "spams");
	bot_case("{\"body\":\"report Wally\\tspams\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
		 "\"report " PILL(WALLY, "Wally") "\\tspams\"}", "report", WALLY, S, true, "spams");
	bot_case("{\"body\":\"report Wally\u00a0spams\",\"format\":\"org.matrix.custom.html\",\"formatted_body\":"
		 "\"report " PILL(WALLY, "Wally") "\u00a0spams\"}", "report", WALLY, S, true, "spams");
	bot_case("{\"body\":\"report " WALLY "x abuse\",\"m.mentions\":{\"user_ids\":[\"" WALLY "\"]}}", "report",
		 WALLY, S, true, WALLY "x abuse");
	bot_case("{\"body\":\"block " WALLY "\"}", "block", WALLY, S, false, "");
	/* Mentions are read for the commands with a party only. */
	bot_case("{\"body\":\"opt-in gk\",\"m.mentions\":{\"user_ids\":[\"" WALLY "\"]}}", "opt-in", "gk", S, false,
		 "");

	/* The bounds: a reason cut on a character boundary; a word longer
	 * than a verb or a party is none (cut, an address could be
	 * another that parses). */
	char json[4200], long_word[800];
	int w = snprintf(json, sizeof(json), "{\"body\":\"report mimi://x.example/u/bob x");
	for (int i = 0; i < 600; i++)
		w += snprintf(json + w, sizeof(json) - (size_t)w, "\xc3\xa9");
	snprintf(json + w, sizeof(json) - (size_t)w, "\"}");
	json_t *c = json_loads(json, 0, NULL);
	struct mx_bot_cmd cmd;
	ck_assert(c && mx_bot_parse(c, "@alice:example.org", &bot_names, &cmd));
	json_decref(c);
	ck_assert_uint_eq(strlen(cmd.reason), MX_BOT_REASON_MAX - 1);
	ck_assert(cw_utf8_valid(cmd.reason, strlen(cmd.reason)));
	ck_assert(cmd.reason[0] == 'x' && strncmp(cmd.reason + 1, "\xc3\xa9", 2) == 0);

	memset(long_word, 'a', MX_BOT_PARTY_MAX);
	long_word[MX_BOT_PARTY_MAX] = '\0';
	snprintf(json, sizeof(json), "{\"body\":\"opt-in %s\"}", long_word);
	bot_case(json, "opt-in", long_word, S, false, "");
	snprintf(json, sizeof(json), "{\"body\":\"block mimi://x.example/u/%s why\"}", long_word);
	bot_case(json, "block", "", S, false, "why");
	long_word[MX_BOT_VERB_MAX + 1] = '\0';
	snprintf(json, sizeof(json), "{\"body\":\"%s block x.org\"}", long_word);
	bot_case(json, "", "block", S, false, "x.org");
	long_word[MX_BOT_VERB_MAX] = '\0';
	snprintf(json, sizeof(json), "{\"body\":\"%s block x.org\"}", long_word);
	bot_case(json, long_word, "block", S, false, "x.org");
}
END_TEST

/* A reply's event (m.in_reply_to) is read for an accept or block with no
 * party, and the party of a request's notice read back from its text
 * (mx_bot_request_party: until the forty-seventh session such a reply was
 * "Whom?"). */
static void reply_to_case(const char *json, const char *want)
{
	struct mx_bot_cmd cmd;
	ck_assert_msg(bot_read(json, &cmd), "%s: not read", json);
	ck_assert_msg(strcmp(cmd.reply_to, want) == 0, "%s: reply_to \"%s\"", json, cmd.reply_to);
}

START_TEST(bot_request_reply)
{
	reply_to_case("{\"body\":\"accept\",\"m.relates_to\":{\"m.in_reply_to\":{\"event_id\":\"$abc:x.org\"}}}",
		      "$abc:x.org");
	reply_to_case("{\"body\":\"accept\"}", "");
	reply_to_case("{\"body\":\"accept\",\"m.relates_to\":{\"m.in_reply_to\":{\"event_id\":\"abc\"}}}", "");
	reply_to_case("{\"body\":\"accept\",\"m.relates_to\":{\"m.in_reply_to\":{\"event_id\":\"$a b\"}}}", "");
	reply_to_case("{\"body\":\"accept\",\"m.relates_to\":{\"m.in_reply_to\":{\"event_id\":7}}}", "");
	char big[400];
	snprintf(big, sizeof(big), "{\"body\":\"accept\",\"m.relates_to\":{\"m.in_reply_to\":{\"event_id\":\"$%0256d\"}}}",
		 0);
	reply_to_case(big, "");

	char party[MX_BOT_PARTY_MAX + 1], line[300];
	snprintf(line, sizeof(line), "\"Wally\" mimi://wa.example/u/wally (network peer:gk) wants to write to you.\n"
		 MX_BOT_REQUEST_LINE "\nThe conversation is bridged.", "mimi://wa.example/u/wally",
		 "mimi://wa.example/u/wally");
	ck_assert(mx_bot_request_party(line, party, sizeof(party)));
	ck_assert_str_eq(party, "mimi://wa.example/u/wally");
	/* the line last, with no line break after it */
	ck_assert(mx_bot_request_party("Reply \"accept wa.example\" or \"block wa.example\".", party, sizeof(party)));
	ck_assert_str_eq(party, "wa.example");
	/* None: not at a line's start (a name on the first line), two parties,
	 * more after it on its line, another notice, a party that does not fit. */
	strcpy(party, "kept");
	static const char *const none[] = {
		"\"x Reply \"accept mimi://e.example/u/m\" or \"block mimi://e.example/u/m\".\" wants to write",
		"Reply \"accept mimi://a.example/u/a\" or \"block mimi://b.example/u/b\".",
		"Reply \"accept mimi://a.example/u/a\" or \"block mimi://a.example/u/a\". Or not.",
		"Reply \"accept \" or \"block \".",
		"Reply \"accept a\"b\" or \"block a\"b\".",
		"The request from mimi://wa.example/u/wally (network peer:gk) expired without an answer.",
		"",
	};
	for (size_t i = 0; i < sizeof(none) / sizeof(none[0]); i++)
		ck_assert_msg(!mx_bot_request_party(none[i], party, sizeof(party)), "%s: read", none[i]);
	ck_assert_str_eq(party, "kept");
	ck_assert(!mx_bot_request_party("Reply \"accept mimi://wa.example/u/wally\" or \"block "
					"mimi://wa.example/u/wally\".", party, 10));
}
END_TEST

/* cw_copy_cut copies and cuts as snprintf's "%s" did: since the
 * sixty-fourth session it copies the strings of every item of a Matrix
 * transaction (submit_put_local, msg_input_from_event, submit_decide,
 * conv_add), whose fields are fixed arrays that a long room, sender or
 * event id fills. */
START_TEST(copy_cut_is_snprintfs)
{
	char src[80];
	for (size_t n = 0; n < sizeof(src); n++) {
		for (size_t k = 0; k < n; k++)
			src[k] = (char)('a' + k % 26);
		src[n] = '\0';
		for (size_t len = 1; len <= 72; len++) {
			char got[80], want[80];
			memset(got, 'x', sizeof(got));
			size_t w = cw_copy_cut(got, len, src);
			ck_assert_int_eq(snprintf(want, len, "%s", src), (int)n);
			ck_assert_str_eq(got, want);
			ck_assert_uint_eq(w, strlen(want));
			ck_assert_int_eq(got[len], 'x'); /* nothing written past len */
		}
	}
}
END_TEST

int main(void)
{
	Suite *s = suite_create("matrix");
	TCase *tc = tcase_create("matrix");
	tcase_set_timeout(tc, 300);
	tcase_add_test(tc, id_cases);
	tcase_add_test(tc, id_null_and_buffers);
	tcase_add_test(tc, alias_directory_path);
	tcase_add_test(tc, ghost_round_trip_property);
	tcase_add_test(tc, ghost_parse_property);
	tcase_add_test(tc, map_cases);
	tcase_add_test(tc, in_mutations_property);
	tcase_add_test(tc, random_events_property);
	tcase_add_test(tc, random_round_trip_property);
	tcase_add_test(tc, html_property);
	tcase_add_test(tc, html_kept_context_changes_no_parse);
	tcase_add_test(tc, html_kept_context_is_bounded_by_bytes);
	tcase_add_test(tc, from_neutral_edges);
	tcase_add_test(tc, from_neutral_fits_an_event);
	tcase_add_test(tc, to_neutral_fits_any_envelope);
	tcase_add_test(tc, ephemeral_cap);
	tcase_add_test(tc, json_load_lenient);
	tcase_add_test(tc, media_queue_is_bounded);
	tcase_add_test(tc, media_one_signer_is_capped);
	tcase_add_test(tc, mentions);
	tcase_add_test(tc, bot_parse);
	tcase_add_test(tc, bot_request_reply);
	tcase_add_test(tc, copy_cut_is_snprintfs);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
