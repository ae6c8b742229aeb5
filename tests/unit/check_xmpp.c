/* The XMPP adapter's pure parts: JIDs and the remote-id escaping (xj.h, cases
 * in tests/unit/data/xmpp_jids.txt) and the stanza mapping (xm.h, cases in
 * tests/unit/data/xmpp_in.txt and xmpp_out.txt), plus property loops; and
 * the rule of a component's queue that needs no stream (xmpp_int.h). */
#include "config.h"
#include "xmpp/xj.h"
#include "xmpp/xm.h"
#include "xmpp/xmpp_int.h"
#include "xmpp/xmpp.h"
#include "xmpp/xmpp_cmdform.h"
#include "peer/event.h"
#include "peers.h"
#include "conf.h"
#include "unit.h"

#include <expat.h>
#include <limits.h>
#include <stdint.h>

#define SENDER "mimi://example.org/u/alice"
#define TS 1700000000000LL
#define FROM "+4915112345678@wa.example.org"
#define TO "alice@example.org"
#define OUT_ID "cw-1"

static xmpp_ctx_t *ctx;

static void setup(void)
{
	ctx = xmpp_ctx_new(NULL, NULL);
	ck_assert_ptr_nonnull(ctx);
}

static void teardown(void)
{
	xmpp_ctx_free(ctx);
	ctx = NULL;
}

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

/* A token of the case files: "" is the empty string, escapes decoded. */
static char *token(const char *raw)
{
	size_t len;
	if (strcmp(raw, "\"\"") == 0)
		return strdup("");
	return unit_decode(raw, &len);
}

static int split_words(char *line, char **tok, int max)
{
	int n = 0;
	for (char *p = strtok(line, " "); p && n < max; p = strtok(NULL, " "))
		tok[n++] = p;
	return n;
}

/* Splits line in place at every occurrence of sep. */
static int split_on(char *line, const char *sep, char **f, int max)
{
	int n = 0;
	size_t sl = strlen(sep);
	f[n++] = line;
	for (char *p = strstr(line, sep); p && n < max; p = strstr(p, sep)) {
		*p = '\0';
		p += sl;
		f[n++] = p;
	}
	return n;
}

/* A neutral body from the mapping, with the sender added, must pass the
 * neutral API's own validation. */
static void assert_event_parses(const json_t *neutral, const char *what)
{
	json_t *full = json_deep_copy(neutral);
	ck_assert_ptr_nonnull(full);
	json_object_set_new(full, "sender", json_string(SENDER));
	char *text = json_dumps(full, JSON_COMPACT);
	ck_assert_ptr_nonnull(text);
	struct event_limits lim = event_limits_default();
	struct event ev;
	struct event_error err;
	cw_err rc = event_parse(text, strlen(text), &lim, 0, &ev, &err);
	ck_assert_msg(rc == CW_OK, "%s: event_parse refused the mapping's output (%s %s: %s): %.300s", what, err.code,
		      err.pointer, err.detail, text);
	event_free(&ev);
	free(text);
	json_decref(full);
}

/* Every body of an XM_IN_OK array: ts as given, passes event_parse. */
static void assert_events_parse(const json_t *list, const char *what)
{
	ck_assert_msg(json_is_array(list) && json_array_size(list) > 0, "%s: not a non-empty array", what);
	size_t i;
	json_t *ev;
	json_array_foreach(list, i, ev) {
		ck_assert(json_is_object(ev));
		ck_assert_int_eq(json_integer_value(json_object_get(ev, "ts")), TS);
		assert_event_parses(ev, what);
	}
}

static xmpp_stanza_t *parse_stanza(const char *text, const char *what)
{
	xmpp_stanza_t *st = xmpp_stanza_new_from_string(ctx, text);
	ck_assert_msg(st != NULL, "%s: libstrophe cannot read %.300s", what, text);
	return st;
}

/* Serialises st and reads it back, as the other end of the stream would. */
static xmpp_stanza_t *reparse(xmpp_stanza_t *st, const char *what)
{
	char *buf = NULL;
	size_t len = 0;
	ck_assert_int_eq(xmpp_stanza_to_text(st, &buf, &len), XMPP_EOK);
	xmpp_stanza_t *back = xmpp_stanza_new_from_string(ctx, buf);
	ck_assert_msg(back != NULL, "%s: the stanza is not well-formed XML: %.400s", what, buf);
	xmpp_free(ctx, buf);
	return back;
}

static const char *plain_of(const json_t *content)
{
	return json_string_value(json_object_get(json_array_get(json_object_get(content, "parts"), 0), "body"));
}

/* ------------------------------------------------------------ xj: cases */

START_TEST(jid_cases)
{
	FILE *f = fopen(unit_data_path("xmpp_jids.txt"), "r");
	ck_assert_msg(f != NULL, "cannot open %s", unit_data_path("xmpp_jids.txt"));
	char *line = NULL;
	size_t cap = 0;
	int lineno = 0, splits = 0, escapes = 0, unescapes = 0;
	static char l[XJ_PART_MAX + 1], d[XJ_PART_MAX + 1], r[XJ_PART_MAX + 1];
	while (getline(&line, &cap, f) != -1) {
		lineno++;
		trim_newline(line);
		if (line[0] == '#' || line[0] == '\0')
			continue;
		char *t[8];
		int n = split_words(line, t, 8);
		ck_assert_msg(n >= 3, "line %d: too short", lineno);
		if (strcmp(t[0], "split") == 0) {
			bool want = strcmp(t[1], "ok") == 0;
			char *jid = token(t[2]);
			bool got = xj_split(jid, l, sizeof(l), d, sizeof(d), r, sizeof(r));
			ck_assert_msg(got == want, "line %d: split %s: got %s", lineno, t[2], got ? "ok" : "bad");
			ck_assert(xj_split(jid, NULL, 0, NULL, 0, NULL, 0) == want);
			if (want) {
				ck_assert_msg(n == 7 && strcmp(t[3], "->") == 0, "line %d: expected -> local domain resource",
					      lineno);
				char *wl = token(t[4]), *wd = token(t[5]), *wr = token(t[6]);
				ck_assert_msg(strcmp(l, wl) == 0, "line %d: local '%s'", lineno, l);
				ck_assert_msg(strcmp(d, wd) == 0, "line %d: domain '%s'", lineno, d);
				ck_assert_msg(strcmp(r, wr) == 0, "line %d: resource '%s'", lineno, r);
				/* A buffer one byte short fails; NULL with 0 only validates. */
				if (*wl)
					ck_assert(!xj_split(jid, l, strlen(wl), NULL, 0, NULL, 0));
				ck_assert(!xj_split(jid, NULL, 0, d, strlen(wd), NULL, 0));
				if (*wr)
					ck_assert(!xj_split(jid, NULL, 0, NULL, 0, r, strlen(wr)));
				free(wl);
				free(wd);
				free(wr);
			} else {
				ck_assert_msg(n == 3, "line %d: a refused JID has no result", lineno);
				ck_assert(l[0] == '\0' && d[0] == '\0' && r[0] == '\0');
			}
			free(jid);
			splits++;
		} else if (strcmp(t[0], "escape") == 0) {
			char out[4 * 255 + 1], back[256];
			if (strcmp(t[1], "bad") == 0) {
				char *id = token(t[2]);
				ck_assert_msg(!xj_escape_local(id, out, sizeof(out)), "line %d: escaped", lineno);
				ck_assert_str_eq(out, "");
				free(id);
			} else {
				ck_assert_msg(n == 4 && strcmp(t[2], "->") == 0, "line %d: escape <id> -> <local>", lineno);
				char *id = token(t[1]), *want = token(t[3]);
				ck_assert_msg(xj_escape_local(id, out, sizeof(out)), "line %d: refused", lineno);
				ck_assert_msg(strcmp(out, want) == 0, "line %d: escaped to %s", lineno, out);
				ck_assert(xj_escape_local(id, NULL, 0));
				char small[4 * 255 + 1];
				ck_assert(!xj_escape_local(id, small, strlen(want)));
				ck_assert_str_eq(small, "");
				ck_assert_msg(xj_unescape_local(out, back, sizeof(back)), "line %d: not unescaped", lineno);
				ck_assert_msg(strcmp(back, id) == 0, "line %d: unescaped to %s", lineno, back);
				ck_assert(!xj_unescape_local(out, back, strlen(id)));
				/* The result is a localpart of a valid JID, kept as it is. */
				char jid[4 * 255 + 32];
				snprintf(jid, sizeof(jid), "%s@wa.example.org", out);
				ck_assert_msg(xj_split(jid, l, sizeof(l), d, sizeof(d), NULL, 0), "line %d: %s", lineno, jid);
				ck_assert_str_eq(l, out);
				for (const char *p = out; *p; p++)
					ck_assert_msg(!(*p >= 'A' && *p <= 'Z') && (unsigned char)*p > 0x20 &&
							      (unsigned char)*p < 0x7f,
						      "line %d: %s", lineno, out);
				free(id);
				free(want);
			}
			escapes++;
		} else if (strcmp(t[0], "unescape") == 0) {
			char out[300];
			char *local = token(t[2]);
			bool got = xj_unescape_local(local, out, sizeof(out));
			if (strcmp(t[1], "bad") == 0) {
				ck_assert_msg(!got, "line %d: %s unescaped to %s", lineno, t[2], out);
				ck_assert_str_eq(out, "");
				ck_assert(!xj_unescape_local(local, NULL, 0));
			} else {
				ck_assert_msg(n == 5 && strcmp(t[3], "->") == 0, "line %d: unescape ok <local> -> <id>", lineno);
				char *want = token(t[4]);
				ck_assert_msg(got, "line %d: refused", lineno);
				ck_assert_str_eq(out, want);
				char again[4 * 255 + 1];
				ck_assert(xj_escape_local(out, again, sizeof(again)));
				ck_assert_str_eq(again, local);
				free(want);
			}
			free(local);
			unescapes++;
		} else {
			ck_abort_msg("line %d: unknown kind %s", lineno, t[0]);
		}
	}
	free(line);
	fclose(f);
	ck_assert_int_ge(splits, 70);
	ck_assert_int_ge(escapes, 35);
	ck_assert_int_ge(unescapes, 30);
}
END_TEST

START_TEST(jid_null_and_buffers)
{
	char a[16], b[16], c[16];
	ck_assert(!xj_split(NULL, a, sizeof(a), b, sizeof(b), c, sizeof(c)));
	ck_assert(!xj_escape_local(NULL, a, sizeof(a)));
	ck_assert(!xj_unescape_local(NULL, a, sizeof(a)));
	/* A buffer of size 0 (not NULL) holds nothing, not even "". */
	ck_assert(!xj_split("a@b.c", a, 0, NULL, 0, NULL, 0));
	ck_assert(!xj_split("b.c", NULL, 0, b, sizeof(b), c, 0));
	ck_assert(xj_split("b.c", a, 1, b, 4, c, 1));
	ck_assert_str_eq(a, "");
	ck_assert_str_eq(b, "b.c");
	ck_assert(!xj_split("b.c", NULL, 0, b, 3, NULL, 0));
	ck_assert_str_eq(b, "");
	ck_assert(!xj_escape_local("Ab", a, 4));
	ck_assert_str_eq(a, "");
	ck_assert(xj_escape_local("Ab", a, 5));
	ck_assert_str_eq(a, "\\41b");
	ck_assert(!xj_unescape_local("\\41b", a, 2));
	ck_assert(xj_unescape_local("\\41b", a, 3));
	ck_assert_str_eq(a, "Ab");
	ck_assert(xj_unescape_local("\\41b", NULL, 0));
	/* The whole escaped range fits in 4 * 255 + 1 (3 * 255 + 1 in fact). */
	char id[256], out[4 * 255 + 1];
	memset(id, 0xff, 255);
	id[255] = '\0';
	ck_assert(xj_escape_local(id, out, 3 * 255 + 1));
	ck_assert_uint_eq(strlen(out), 3 * 255);
	ck_assert(!xj_escape_local(id, out, 3 * 255));
	char back[256];
	ck_assert(xj_unescape_local("\\ff", back, sizeof(back)));
	ck_assert_str_eq(back, "\xff");
}
END_TEST

/* Random byte strings (1-255 bytes, no NUL) escape to a localpart that
 * xj_split accepts as it is, and unescape back to themselves. */
START_TEST(escape_property)
{
	unsigned char id[256];
	char esc[4 * 255 + 1], back[256], jid[4 * 255 + 32];
	static char l[XJ_PART_MAX + 1], d[XJ_PART_MAX + 1], r[XJ_PART_MAX + 1];
	for (int i = 0; i < 10000; i++) {
		size_t n = 1 + rnd_below(i % 10 == 0 ? 255 : 24);
		for (size_t k = 0; k < n; k++) {
			switch (rnd_below(4)) {
			case 0: id[k] = (unsigned char)(1 + rnd_below(255)); break;
			case 1: id[k] = (unsigned char)" \"&'/:<>@\\AZaz09.+=~_-"[rnd_below(22)]; break;
			default: id[k] = (unsigned char)(0x20 + rnd_below(0x60)); break;
			}
		}
		id[n] = '\0';
		/* An independent count of the escaped length. */
		size_t want = 0;
		for (size_t k = 0; k < n; k++) {
			unsigned char ch = id[k];
			bool plain = ch > 0x20 && ch < 0x7f && !(ch >= 'A' && ch <= 'Z') && !strchr("\"&'/:<>@\\", ch);
			want += plain ? 1 : 3;
		}
		ck_assert_msg(xj_escape_local((char *)id, esc, sizeof(esc)), "case %d", i);
		ck_assert_uint_eq(strlen(esc), want);
		snprintf(jid, sizeof(jid), "%s@d.example", esc);
		ck_assert_msg(xj_split(jid, l, sizeof(l), d, sizeof(d), r, sizeof(r)), "case %d: %s", i, jid);
		ck_assert_str_eq(l, esc);
		ck_assert_str_eq(d, "d.example");
		ck_assert_str_eq(r, "");
		ck_assert_msg(xj_unescape_local(l, back, sizeof(back)), "case %d: %s", i, l);
		ck_assert_msg(strcmp(back, (char *)id) == 0, "case %d: %s", i, l);
	}
}
END_TEST

/* Random localparts: either refused, or the unescaped id escapes to exactly
 * the same localpart (the mapping is one-to-one). */
START_TEST(unescape_property)
{
	static const char alphabet[] = "\\\\\\0123456789abcdefABF@ x.+~\xc3\xa9";
	char local[64], id[256], again[4 * 255 + 1];
	int accepted = 0;
	for (int i = 0; i < 40000; i++) {
		size_t n = 1 + rnd_below(12);
		for (size_t k = 0; k < n; k++)
			local[k] = alphabet[rnd_below(sizeof(alphabet) - 1)];
		local[n] = '\0';
		if (xj_unescape_local(local, id, sizeof(id))) {
			accepted++;
			ck_assert_msg(xj_escape_local(id, again, sizeof(again)), "%s", local);
			ck_assert_msg(strcmp(again, local) == 0, "%s escapes back as %s", local, again);
		} else {
			ck_assert_str_eq(id, "");
		}
	}
	ck_assert_int_gt(accepted, 1000);
}
END_TEST

/* ------------------------------------------------------------ xm: inbound */

/* The fixed lookups of xmpp_in.txt. */
struct in_tables {
	json_t *ids;  /* XMPP id -> msg id */
	json_t *rx;   /* msg id -> {key: msg id} */
	int calls;
};

static const char *tbl_to_msg(void *c, const char *id)
{
	struct in_tables *t = c;
	t->calls++;
	ck_assert_ptr_nonnull(id);
	ck_assert_msg(strlen(id) >= 1 && strlen(id) <= XM_ID_MAX, "an id of %zu bytes was looked up", strlen(id));
	return json_string_value(json_object_get(t->ids, id));
}

static const json_t *tbl_reactions(void *c, const char *msg)
{
	struct in_tables *t = c;
	ck_assert_msg(message_id_valid(msg), "reactions of %s", msg);
	return json_object_get(t->rx, msg);
}

static void tables_init(struct in_tables *t)
{
	t->ids = json_loads("{\"m1\":\"msg_1\",\"o1\":\"msg_1\",\"m2\":\"msg_2\",\"o2\":\"msg_2\",\"m3\":\"msg_3\","
			    "\"junk\":\"not a message id\"}",
			    0, NULL);
	t->rx = json_loads("{\"msg_1\":{\"\xf0\x9f\x91\x8d\":\"msg_r1\",\"\xe2\x9d\xa4\xef\xb8\x8f\":\"msg_r2\"},"
			   "\"msg_3\":{\"b\":\"msg_rb\",\"a\":\"msg_ra\",\"c\":\"bad id\"}}",
			   0, NULL);
	ck_assert_ptr_nonnull(t->ids);
	ck_assert_ptr_nonnull(t->rx);
	t->calls = 0;
}

static void tables_free(struct in_tables *t)
{
	json_decref(t->ids);
	json_decref(t->rx);
}

static const char *in_name(enum xm_in_result r)
{
	switch (r) {
	case XM_IN_OK: return "ok";
	case XM_IN_IGNORE: return "ignore";
	case XM_IN_INVALID: return "invalid";
	case XM_IN_TOO_LONG: return "too_long";
	}
	return "?";
}

START_TEST(in_cases)
{
	FILE *f = fopen(unit_data_path("xmpp_in.txt"), "r");
	ck_assert_msg(f != NULL, "cannot open %s", unit_data_path("xmpp_in.txt"));
	struct in_tables t;
	tables_init(&t);
	struct xm_in_lookup l = { tbl_to_msg, tbl_reactions, &t };
	char *line = NULL;
	size_t cap = 0;
	int lineno = 0, cases = 0, oks = 0;
	while (getline(&line, &cap, f) != -1) {
		lineno++;
		trim_newline(line);
		if (line[0] == '#' || line[0] == '\0')
			continue;
		char *fl[6];
		int n = split_on(line, " | ", fl, 6);
		ck_assert_msg(n == 4, "line %d: expected 4 fields, got %d", lineno, n);
		const char *name = fl[0], *expect = fl[1];
		size_t len;
		char *xml = unit_decode(fl[2], &len);
		char *want_text = unit_decode(fl[3], &len);
		xmpp_stanza_t *st = parse_stanza(xml, name);
		json_t *out = (json_t *)1;
		char why[200] = "x";
		enum xm_in_result r = xm_to_neutral(st, &l, TS, &out, why, sizeof(why));
		ck_assert_msg(strcmp(in_name(r), expect) == 0, "line %d (%s): got %s (%s)", lineno, name, in_name(r), why);
		if (r == XM_IN_OK) {
			oks++;
			assert_events_parse(out, name);
			/* Deterministic: the same stanza maps to the same events. */
			json_t *again = NULL;
			ck_assert_int_eq(xm_to_neutral(st, &l, TS, &again, NULL, 0), XM_IN_OK);
			unit_assert_json_eq(again, out, name);
			json_decref(again);
			size_t i;
			json_t *ev;
			json_array_foreach(out, i, ev)
				json_object_del(ev, "ts");
			json_error_t je;
			json_t *want = json_loads(want_text, 0, &je);
			ck_assert_msg(want != NULL, "line %d: bad JSON: %s", lineno, je.text);
			unit_assert_json_eq(out, want, name);
			json_decref(want);
			json_decref(out);
		} else {
			ck_assert_ptr_null(out);
			ck_assert_msg(why[0], "line %d: no reason", lineno);
			if (strcmp(want_text, "-") != 0)
				ck_assert_msg(strstr(why, want_text) != NULL, "line %d (%s): reason '%s' lacks '%s'", lineno,
					      name, why, want_text);
		}
		/* The references are the stored kind of id, each once. */
		const char *ids[16];
		size_t nref = xm_message_refs(st, ids, 16);
		for (size_t i = 0; i < nref; i++) {
			ck_assert(strlen(ids[i]) >= 1 && strlen(ids[i]) <= XM_ID_MAX);
			for (size_t j = 0; j < i; j++)
				ck_assert_str_ne(ids[i], ids[j]);
		}
		xmpp_stanza_release(st);
		free(xml);
		free(want_text);
		cases++;
	}
	free(line);
	fclose(f);
	tables_free(&t);
	ck_assert_int_ge(cases, 120);
	ck_assert_int_ge(oks, 80);
}
END_TEST

/* A <message/> with a body built by hand (any bytes, as libstrophe allows). */
static xmpp_stanza_t *hand_message(const char *type, const char *body)
{
	xmpp_stanza_t *m = xmpp_message_new(ctx, type, "bob@wa.example.org", "h1");
	ck_assert_ptr_nonnull(m);
	if (body)
		ck_assert_int_eq(xmpp_message_set_body(m, body), XMPP_EOK);
	return m;
}

static xmpp_stanza_t *add_el(xmpp_stanza_t *parent, const char *name, const char *ns, const char *id)
{
	xmpp_stanza_t *e = xmpp_stanza_new(ctx);
	xmpp_stanza_set_name(e, name);
	if (ns)
		xmpp_stanza_set_ns(e, ns);
	if (id)
		xmpp_stanza_set_attribute(e, "id", id);
	xmpp_stanza_add_child_ex(parent, e, 0);
	return e;
}

START_TEST(in_edges)
{
	struct in_tables t;
	tables_init(&t);
	struct xm_in_lookup l = { tbl_to_msg, tbl_reactions, &t };
	json_t *out;
	char why[200];
	/* Not valid UTF-8 (a stanza built by hand; a parser refuses it). */
	xmpp_stanza_t *m = hand_message("chat", "a\377b");
	ck_assert_int_eq(xm_to_neutral(m, &l, TS, &out, why, sizeof(why)), XM_IN_INVALID);
	ck_assert_ptr_null(out);
	ck_assert_ptr_nonnull(strstr(why, "UTF-8"));
	xmpp_stanza_release(m);
	m = hand_message("chat", "\xed\xa0\x80");
	ck_assert_int_eq(xm_to_neutral(m, &l, TS, &out, why, sizeof(why)), XM_IN_INVALID);
	xmpp_stanza_release(m);
	/* Control characters are text: carried, and still a valid event, even
	 * 16 KiB of them (six bytes each in JSON). */
	char *big = malloc(16385);
	memset(big, 1, 16384);
	big[16384] = '\0';
	m = hand_message("chat", big);
	enum xm_in_result r = xm_to_neutral(m, &l, TS, &out, why, sizeof(why));
	ck_assert_msg(r == XM_IN_OK || r == XM_IN_TOO_LONG, "%d", r);
	if (r == XM_IN_OK) {
		assert_events_parse(out, "control characters");
		json_decref(out);
	}
	xmpp_stanza_release(m);
	free(big);
	m = hand_message("chat", "a\001b");
	ck_assert_int_eq(xm_to_neutral(m, &l, TS, &out, why, sizeof(why)), XM_IN_OK);
	assert_events_parse(out, "control character");
	ck_assert_str_eq(plain_of(json_object_get(json_array_get(out, 0), "content")), "a\001b");
	json_decref(out);
	xmpp_stanza_release(m);
	/* Children without a namespace inherit the extension's. */
	m = hand_message("chat", NULL);
	xmpp_stanza_t *rs = add_el(m, "reactions", "urn:xmpp:reactions:0", "m2");
	xmpp_stanza_t *re = add_el(rs, "reaction", NULL, NULL);
	xmpp_stanza_t *tx = xmpp_stanza_new(ctx);
	xmpp_stanza_set_text(tx, "\xf0\x9f\x8e\x89");
	xmpp_stanza_add_child_ex(re, tx, 0);
	ck_assert_int_eq(xm_to_neutral(m, &l, TS, &out, why, sizeof(why)), XM_IN_OK);
	ck_assert_str_eq(plain_of(json_object_get(json_array_get(out, 0), "content")), "\xf0\x9f\x8e\x89");
	json_decref(out);
	xmpp_stanza_release(m);
	/* Ids with control characters are not ids. */
	m = hand_message("chat", NULL);
	add_el(m, "received", "urn:xmpp:receipts", "m1\x01");
	int calls = t.calls;
	ck_assert_int_eq(xm_to_neutral(m, &l, TS, &out, why, sizeof(why)), XM_IN_IGNORE);
	ck_assert_int_eq(t.calls, calls);
	xmpp_stanza_release(m);
	/* No lookup, or lookups without functions: every reference unknown. */
	m = parse_stanza("<message type='chat'><body>&gt; Hi\nyo</body><reply id='m1' xmlns='urn:xmpp:reply:0'/>"
			 "<fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:reply:0'><body start='0' end='5'/></fallback>"
			 "</message>",
			 "no lookup");
	ck_assert_int_eq(xm_to_neutral(m, NULL, TS, &out, NULL, 0), XM_IN_OK);
	ck_assert_str_eq(plain_of(json_object_get(json_array_get(out, 0), "content")), "> Hi\nyo");
	json_decref(out);
	struct xm_in_lookup empty = { NULL, NULL, NULL };
	ck_assert_int_eq(xm_to_neutral(m, &empty, TS, &out, why, sizeof(why)), XM_IN_OK);
	ck_assert_ptr_null(json_object_get(json_object_get(json_array_get(out, 0), "content"), "in_reply_to"));
	json_decref(out);
	/* ts: only 0 < ts < 2^53 is written. */
	ck_assert_int_eq(xm_to_neutral(m, &l, 0, &out, why, sizeof(why)), XM_IN_OK);
	ck_assert_ptr_null(json_object_get(json_array_get(out, 0), "ts"));
	assert_event_parses(json_array_get(out, 0), "no ts");
	json_decref(out);
	ck_assert_int_eq(xm_to_neutral(m, &l, EVENT_TS_LIMIT, &out, why, sizeof(why)), XM_IN_OK);
	ck_assert_ptr_null(json_object_get(json_array_get(out, 0), "ts"));
	json_decref(out);
	ck_assert_int_eq(xm_to_neutral(m, &l, -5, &out, why, sizeof(why)), XM_IN_OK);
	ck_assert_ptr_null(json_object_get(json_array_get(out, 0), "ts"));
	json_decref(out);
	/* A reactions lookup without a reactions function: nothing stored. */
	struct xm_in_lookup no_rx = { tbl_to_msg, NULL, &t };
	xmpp_stanza_t *rm = parse_stanza("<message><reactions id='m1' xmlns='urn:xmpp:reactions:0'><reaction>x</reaction>"
					 "</reactions></message>",
					 "no reactions function");
	ck_assert_int_eq(xm_to_neutral(rm, &no_rx, TS, &out, why, sizeof(why)), XM_IN_OK);
	ck_assert_uint_eq(json_array_size(out), 1);
	json_decref(out);
	xmpp_stanza_release(rm);
	/* A key longer than 64 bytes refuses the stanza (XEP-0444 §4.3:
	 * not-acceptable), whatever it reacts to; 64 bytes is a key. */
	char rx[400];
	snprintf(rx, sizeof(rx), "<message><reactions id='m1' xmlns='urn:xmpp:reactions:0'><reaction>%065d</reaction>"
		 "<reaction>y</reaction></reactions></message>", 0);
	rm = parse_stanza(rx, "a 65-byte reaction");
	ck_assert_int_eq(xm_to_neutral(rm, &l, TS, &out, why, sizeof(why)), XM_IN_TOO_LONG);
	ck_assert_ptr_null(out);
	ck_assert_str_eq(why, "a reaction is at most 64 bytes (a single emoji)");
	ck_assert_int_eq(xm_to_neutral(rm, NULL, TS, &out, why, sizeof(why)), XM_IN_TOO_LONG);
	xmpp_stanza_release(rm);
	snprintf(rx, sizeof(rx), "<message><reactions id='m1' xmlns='urn:xmpp:reactions:0'><reaction>%064d</reaction>"
		 "</reactions></message>", 0);
	rm = parse_stanza(rx, "a 64-byte reaction");
	ck_assert_int_eq(xm_to_neutral(rm, &l, TS, &out, why, sizeof(why)), XM_IN_OK);
	ck_assert_uint_eq(strlen(plain_of(json_object_get(json_array_get(out, 0), "content"))), 64);
	json_decref(out);
	xmpp_stanza_release(rm);
	/* NULL stanza, a text stanza, a NULL out. */
	ck_assert_int_eq(xm_to_neutral(NULL, &l, TS, &out, why, sizeof(why)), XM_IN_INVALID);
	ck_assert_ptr_null(out);
	ck_assert_int_eq(xm_to_neutral(m, &l, TS, NULL, why, sizeof(why)), XM_IN_INVALID);
	xmpp_stanza_t *text = xmpp_stanza_new(ctx);
	xmpp_stanza_set_text(text, "message");
	ck_assert_int_eq(xm_to_neutral(text, &l, TS, &out, why, sizeof(why)), XM_IN_INVALID);
	xmpp_stanza_release(text);
	xmpp_stanza_release(m);
	/* Many children: bounded work, at most 32 reactions and 8 receipts. */
	xmpp_stanza_t *many = hand_message("chat", NULL);
	for (int i = 0; i < 20000; i++)
		add_el(many, "received", "urn:xmpp:receipts", i % 2 ? "m1" : "m2");
	ck_assert_int_eq(xm_to_neutral(many, &l, TS, &out, why, sizeof(why)), XM_IN_OK);
	ck_assert_uint_eq(json_array_size(out), 2);
	json_decref(out);
	const char *ids[4];
	ck_assert_uint_eq(xm_message_refs(many, ids, 4), 2);
	xmpp_stanza_release(many);
	/* Deep nesting inside an unknown element is never walked. */
	size_t depth = 5000;
	char *deep = malloc(depth * 8 + 64);
	size_t n = (size_t)sprintf(deep, "<message><body>deep</body>");
	for (size_t i = 0; i < depth; i++)
		n += (size_t)sprintf(deep + n, "<a>");
	for (size_t i = 0; i < depth; i++)
		n += (size_t)sprintf(deep + n, "</a>");
	sprintf(deep + n, "</message>");
	xmpp_stanza_t *dm = xmpp_stanza_new_from_string(ctx, deep);
	if (dm) {
		ck_assert_int_eq(xm_to_neutral(dm, &l, TS, &out, why, sizeof(why)), XM_IN_OK);
		json_decref(out);
		xmpp_stanza_release(dm);
	}
	free(deep);
	tables_free(&t);
}
END_TEST

START_TEST(ids_and_refs)
{
	char id[XM_ID_MAX + 1], oid[XM_ID_MAX + 1];
	xmpp_stanza_t *m = parse_stanza("<message id='abc'><origin-id xmlns='urn:xmpp:sid:0' id='o-1'/><body>x</body></message>",
					"ids");
	xm_message_ids(m, id, oid);
	ck_assert_str_eq(id, "abc");
	ck_assert_str_eq(oid, "o-1");
	xmpp_stanza_release(m);
	m = parse_stanza("<message><origin-id xmlns='urn:xmpp:sid:1' id='o-1'/><origin-id xmlns='urn:xmpp:sid:0'/></message>",
			 "no ids");
	xm_message_ids(m, id, oid);
	ck_assert_str_eq(id, "");
	ck_assert_str_eq(oid, "");
	xmpp_stanza_release(m);
	char buf[600];
	snprintf(buf, sizeof(buf), "<message id='%0256d'><origin-id xmlns='urn:xmpp:sid:0' id='%0255d'/></message>", 0, 0);
	m = parse_stanza(buf, "long ids");
	xm_message_ids(m, id, oid);
	ck_assert_str_eq(id, "");
	ck_assert_uint_eq(strlen(oid), 255);
	xmpp_stanza_release(m);
	xm_message_ids(NULL, id, oid);
	ck_assert_str_eq(id, "");

	m = parse_stanza("<message><body>x</body><reply id='r' xmlns='urn:xmpp:reply:0'/>"
			 "<replace id='c' xmlns='urn:xmpp:message-correct:0'/><retract id='d' xmlns='urn:xmpp:message-retract:1'/>"
			 "<apply-to id='e' xmlns='urn:xmpp:fasten:0'><retract xmlns='urn:xmpp:message-retract:0'/></apply-to>"
			 "<reactions id='f' xmlns='urn:xmpp:reactions:0'/><received xmlns='urn:xmpp:receipts' id='g'/>"
			 "<displayed xmlns='urn:xmpp:chat-markers:0' id='r'/><acknowledged xmlns='urn:xmpp:chat-markers:0' id='h'/>"
			 "<received xmlns='urn:xmpp:chat-markers:0' id='i'/><received xmlns='urn:example:x' id='j'/>"
			 "<apply-to id='k' xmlns='urn:xmpp:fasten:0'/></message>",
			 "refs");
	const char *ids[16];
	size_t n = xm_message_refs(m, ids, 16);
	const char *want[] = { "d", "e", "f", "c", "r", "g", "h", "i" };
	ck_assert_uint_eq(n, CW_ARRAY_LEN(want));
	for (size_t i = 0; i < n; i++)
		ck_assert_str_eq(ids[i], want[i]);
	ck_assert_uint_eq(xm_message_refs(m, ids, 3), 3);
	ck_assert_uint_eq(xm_message_refs(m, ids, 0), 0);
	ck_assert_uint_eq(xm_message_refs(m, NULL, 4), 0);
	ck_assert_uint_eq(xm_message_refs(NULL, ids, 4), 0);
	xmpp_stanza_release(m);
	snprintf(buf, sizeof(buf), "<message><reply id='%0256d' xmlns='urn:xmpp:reply:0'/><reply id='x' xmlns='urn:xmpp:reply:0'/></message>",
		 0);
	m = parse_stanza(buf, "long ref");
	ck_assert_uint_eq(xm_message_refs(m, ids, 16), 0); /* the first reply only, and it is too long */
	xmpp_stanza_release(m);
}
END_TEST

/* ------------------------------------------------------------ xm: outbound */

/* A target of the table: when it has text, its content is one part of
 * that type (text/plain when NULL) with that body. */
struct named_target {
	const char *name;
	struct xm_target t;
	const char *type, *text;
};

static const struct named_target targets[] = {
	{ "-", { .known = false }, NULL, NULL },
	{ "last", { true, "m-last", "o-last", true, NULL, false, NULL }, NULL, "Earlier text" },
	{ "last2", { true, "m-last2", NULL, true, NULL, false, "room@conf.example/Wally" }, NULL, NULL },
	{ "old", { true, "m-old", "o-old", false, NULL, false, NULL }, NULL, "Line one\nLine two" },
	{ "utf8", { true, "m-u", "o-u", false, NULL, false, NULL }, NULL, "h\xc3\xa9llo \xf0\x9f\x91\x8d" },
	{ "long", { true, "m-long", NULL, false, NULL, false, NULL }, NULL,
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
		    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9" },
	{ "crlf", { true, "m-crlf", NULL, false, NULL, false, NULL }, NULL, "a\r\nb\rc\r\n\r\n" },
	{ "ctrl", { true, "m-ctrl", NULL, false, NULL, false, NULL }, NULL, "a\001b" },
	{ "badid", { true, "m\x01", NULL, true, NULL, false, NULL }, NULL, "text" },
	{ "rx", { true, "m-rx", NULL, false, NULL, true, NULL }, NULL, NULL },
	{ "html", { true, "m-html", NULL, false, NULL, false, NULL }, "text/html",
	  "<p>Hi <b>you</b></p><ul><li>one</li></ul><script>x()</script>" },
	{ "md", { true, "m-md", NULL, false, NULL, false, NULL }, "text/markdown", "**bold** move" },
	{ "noshow", { true, "m-noshow", NULL, false, NULL, false, NULL }, "text/html", "<script>x()</script>" },
	{ "msg", { true, "m-msg", "o-msg", false, NULL, false, NULL }, NULL, NULL },
	{ "msg2", { true, "m-msg2", NULL, false, NULL, false, NULL }, NULL, NULL },
};

/* The target of that name; its content, when it has one, is new (the
 * caller frees it with target_free). */
static struct xm_target target_named(const char *name, int lineno)
{
	for (size_t i = 0; i < CW_ARRAY_LEN(targets); i++) {
		const struct named_target *n = &targets[i];
		if (strcmp(n->name, name) != 0)
			continue;
		struct xm_target t = n->t;
		if (n->text) {
			t.content = json_pack("{s:[{s:s, s:s}]}", "parts", "type", n->type ? n->type : "text/plain", "body",
					      n->text);
			ck_assert_ptr_nonnull(t.content);
		}
		return t;
	}
	ck_abort_msg("line %d: unknown target %s", lineno, name);
	return targets[0].t;
}

static void target_free(struct xm_target *t)
{
	json_decref((json_t *)t->content);
	t->content = NULL;
}

/* The first child element named name. */
static xmpp_stanza_t *first_named(xmpp_stanza_t *st, const char *name)
{
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); c; c = xmpp_stanza_get_next(c))
		if (xmpp_stanza_is_tag(c) && strcmp(xmpp_stanza_get_name(c), name) == 0)
			return c;
	return NULL;
}

/* The element at path ("." or names joined by '/'), or NULL; with count,
 * *count gets how many children of the last name its parent has. */
static xmpp_stanza_t *at_path(xmpp_stanza_t *msg, const char *path, int *count)
{
	if (strcmp(path, ".") == 0)
		return msg;
	char buf[256];
	snprintf(buf, sizeof(buf), "%s", path);
	xmpp_stanza_t *cur = msg, *parent = msg;
	char *save = NULL;
	for (char *p = strtok_r(buf, "/", &save); p; p = strtok_r(NULL, "/", &save)) {
		if (!cur) {
			if (count)
				*count = 0;
			return NULL;
		}
		parent = cur;
		if (count) {
			*count = 0;
			for (xmpp_stanza_t *c = xmpp_stanza_get_children(parent); c; c = xmpp_stanza_get_next(c))
				*count += xmpp_stanza_is_tag(c) && strcmp(xmpp_stanza_get_name(c), p) == 0;
		}
		cur = first_named(parent, p);
	}
	return cur;
}

static void run_check(xmpp_stanza_t *msg, const char *check, const char *name, int lineno)
{
	char c[1024];
	snprintf(c, sizeof(c), "%s", check);
	size_t len = strlen(c);
	ck_assert_msg(len > 0, "line %d: empty check", lineno);
	if (c[len - 1] == '!' || c[len - 1] == '?') {
		bool want = c[len - 1] == '?';
		c[len - 1] = '\0';
		char *at = strchr(c, '@');
		if (at) {
			*at = '\0';
			xmpp_stanza_t *e = at_path(msg, c, NULL);
			ck_assert_msg(e, "line %d (%s): no element %s", lineno, name, c);
			bool has = xmpp_stanza_get_attribute(e, at + 1) != NULL;
			ck_assert_msg(has == want, "line %d (%s): attribute %s@%s %s", lineno, name, c, at + 1,
				      has ? "present" : "absent");
		} else {
			bool has = at_path(msg, c, NULL) != NULL;
			ck_assert_msg(has == want, "line %d (%s): element %s %s", lineno, name, c, has ? "present" : "absent");
		}
		return;
	}
	char *eq = strchr(c, '=');
	ck_assert_msg(eq, "line %d: bad check %s", lineno, check);
	*eq = '\0';
	size_t vl;
	char *value = unit_decode(eq + 1, &vl);
	if (c[0] == '#') {
		int count = -1;
		at_path(msg, c + 1, &count);
		ck_assert_msg(count == atoi(value), "line %d (%s): %d elements %s, expected %s", lineno, name, count, c + 1,
			      value);
	} else {
		char *at = strchr(c, '@');
		if (at)
			*at = '\0';
		xmpp_stanza_t *e = at_path(msg, c, NULL);
		ck_assert_msg(e, "line %d (%s): no element %s", lineno, name, c);
		if (at) {
			const char *v = strcmp(at + 1, "xmlns") == 0 ? xmpp_stanza_get_ns(e) : xmpp_stanza_get_attribute(e, at + 1);
			ck_assert_msg(v && strcmp(v, value) == 0, "line %d (%s): %s@%s is '%s', expected '%s'", lineno, name, c,
				      at + 1, v ? v : "(none)", value);
		} else {
			char *text = xmpp_stanza_get_text(e);
			ck_assert_msg(text && strcmp(text, value) == 0, "line %d (%s): %s is '%s', expected '%s'", lineno, name,
				      c, text ? text : "(none)", value);
			xmpp_free(ctx, text);
		}
	}
	free(value);
}

static const char *out_name(enum xm_out_result r)
{
	switch (r) {
	case XM_OUT_STANZA: return "stanza";
	case XM_OUT_NONE: return "none";
	case XM_OUT_INVALID: return "invalid";
	case XM_OUT_NOMEM: return "nomem";
	}
	return "?";
}

/* Asserts that two conversions of one case came out the same (result,
 * reason, and the stanza's bytes), the two named by label_a and label_b in
 * a failure; the stanzas released (the file's ctx).  True when they were stanzas. */
static bool same_out(int lineno, const char *label_a, const char *label_b, enum xm_out_result ra,
		     enum xm_out_result rb, const char *wa, const char *wb, xmpp_stanza_t *a, xmpp_stanza_t *b)
{
	ck_assert_msg(ra == rb, "line %d: %s %s, %s %s", lineno, out_name(ra), label_a, out_name(rb), label_b);
	ck_assert_str_eq(wa, wb);
	if (ra != XM_OUT_STANZA)
		return false;
	char *ta, *tb;
	size_t la, lb;
	ck_assert_int_eq(xmpp_stanza_to_text(a, &ta, &la), XMPP_EOK);
	ck_assert_int_eq(xmpp_stanza_to_text(b, &tb, &lb), XMPP_EOK);
	ck_assert_msg(strcmp(ta, tb) == 0, "line %d: %s %s\n%s %s", lineno, label_a, ta, label_b, tb);
	xmpp_free(ctx, ta);
	xmpp_free(ctx, tb);
	xmpp_stanza_release(a);
	xmpp_stanza_release(b);
	return true;
}

/* What every outbound stanza is: <message type="chat" from to id/>. */
static void check_envelope(xmpp_stanza_t *m, const struct xm_out_info *info, const char *name)
{
	ck_assert_str_eq(xmpp_stanza_get_name(m), "message");
	ck_assert_msg(strcmp(xmpp_stanza_get_type(m), "chat") == 0, "%s: type", name);
	ck_assert_str_eq(xmpp_stanza_get_from(m), info->from);
	ck_assert_str_eq(xmpp_stanza_get_to(m), info->to);
	ck_assert_str_eq(xmpp_stanza_get_id(m), info->id);
}

/* Each case of xmpp_out.txt (name | event | target | reacted | reaction
 * set | result | checks), to fn with its fields, its event and its info
 * (from FROM, to TO, id OUT_ID; the case's targets and reaction set), all
 * freed after it; returns how many. */
static int each_out_case(void (*fn)(char **fl, int lineno, json_t *ev, struct xm_out_info *info, void *arg),
			 void *arg)
{
	FILE *f = fopen(unit_data_path("xmpp_out.txt"), "r");
	ck_assert_msg(f != NULL, "cannot open %s", unit_data_path("xmpp_out.txt"));
	char *line = NULL;
	size_t cap = 0;
	int lineno = 0, cases = 0;
	while (getline(&line, &cap, f) != -1) {
		lineno++;
		trim_newline(line);
		if (line[0] == '#' || line[0] == '\0')
			continue;
		char *fl[8];
		int n = split_on(line, " | ", fl, 8);
		ck_assert_msg(n == 7, "line %d: expected 7 fields, got %d", lineno, n);
		size_t len;
		char *ev_text = unit_decode(fl[1], &len);
		json_error_t je;
		json_t *ev = json_loads(ev_text, JSON_DECODE_ANY, &je);
		ck_assert_msg(ev != NULL, "line %d: bad JSON: %s", lineno, je.text);
		json_t *set = NULL;
		if (strcmp(fl[4], "-") != 0) {
			char *set_text = unit_decode(fl[4], &len);
			set = json_loads(set_text, JSON_DECODE_ANY, &je);
			ck_assert_msg(set != NULL, "line %d: bad set JSON: %s", lineno, je.text);
			free(set_text);
		}
		struct xm_out_info info = { .from = FROM, .to = TO, .id = OUT_ID, .target = target_named(fl[2], lineno),
					    .reacted = target_named(fl[3], lineno), .reaction_set = set };
		fn(fl, lineno, ev, &info, arg);
		target_free(&info.target);
		target_free(&info.reacted);
		json_decref(set);
		json_decref(ev);
		free(ev_text);
		cases++;
	}
	free(line);
	fclose(f);
	return cases;
}

static void out_case(char **fl, int lineno, json_t *ev, struct xm_out_info *info, void *arg)
{
	int *stanzas = arg;
	const char *name = fl[0];
	xmpp_stanza_t *st = (xmpp_stanza_t *)1;
	char why[200] = "x";
	enum xm_out_result r = xm_from_neutral(ctx, ev, info, &st, why, sizeof(why));
	ck_assert_msg(strcmp(out_name(r), fl[5]) == 0, "line %d (%s): got %s (%s)", lineno, name, out_name(r), why);
	if (r == XM_OUT_STANZA) {
		xmpp_stanza_t *back = reparse(st, name);
		check_envelope(back, info, name);
		char *checks[40];
		int nc = split_on(fl[6], " ; ", checks, 40);
		for (int i = 0; i < nc; i++)
			run_check(back, checks[i], name, lineno);
		/* Deterministic: the same event gives the same text. */
		xmpp_stanza_t *again = NULL;
		ck_assert_int_eq(xm_from_neutral(ctx, ev, info, &again, NULL, 0), XM_OUT_STANZA);
		char *t1, *t2;
		size_t l1, l2;
		xmpp_stanza_to_text(st, &t1, &l1);
		xmpp_stanza_to_text(again, &t2, &l2);
		ck_assert_str_eq(t1, t2);
		xmpp_free(ctx, t1);
		xmpp_free(ctx, t2);
		xmpp_stanza_release(again);
		xmpp_stanza_release(back);
		xmpp_stanza_release(st);
		(*stanzas)++;
	} else {
		ck_assert_ptr_null(st);
		ck_assert_msg(why[0], "line %d: no reason", lineno);
		if (strcmp(fl[6], "-") != 0)
			ck_assert_msg(strstr(why, fl[6]) != NULL, "line %d (%s): reason '%s' lacks '%s'", lineno, name, why,
				      fl[6]);
	}
}

START_TEST(out_cases)
{
	int stanzas = 0;
	ck_assert_int_ge(each_out_case(out_case, &stanzas), 65);
	ck_assert_int_ge(stanzas, 45);
}
END_TEST

struct kept_count {
	struct xm_keep keep;
	int kept, fresh;
};

static void out_kept_case(char **fl, int lineno, json_t *ev, struct xm_out_info *info, void *arg)
{
	struct kept_count *k = arg;
	char from[64], to[64], id[32];
	snprintf(from, sizeof(from), "+49151%d@wa.example.org", lineno * 7);
	snprintf(to, sizeof(to), "u%d@example.org", lineno);
	snprintf(id, sizeof(id), "cw-%d", lineno * 13);
	info->from = from;
	info->to = to;
	info->id = id;
	xmpp_stanza_t *a = NULL, *b = NULL;
	char wa[200], wb[200];
	xmpp_stanza_t *before = k->keep.msg;
	enum xm_out_result ra = xm_from_neutral_kept(ctx, &k->keep, ev, info, &a, wa, sizeof(wa));
	enum xm_out_result rb = xm_from_neutral(ctx, ev, info, &b, wb, sizeof(wb));
	bool kept = before && a == before;
	if (same_out(lineno, "kept", "new", ra, rb, wa, wb, a, b)) {
		if (kept)
			k->kept++;
		else
			k->fresh++;
	}
}

/* The kept chat stanza (xm_keep): every case of xmpp_out.txt, in the
 * file's order through one keep (plain messages between the others, each
 * with its own from, to and id), renders the bytes a new stanza renders,
 * and a plain message after another is the kept stanza, changed in place. */
START_TEST(out_kept_same_bytes)
{
	struct kept_count k = { 0 };
	each_out_case(out_kept_case, &k);
	/* the plain messages after the first one went through the kept stanza */
	ck_assert_int_ge(k.kept, 3);
	ck_assert_int_ge(k.fresh, 40);
	xm_keep_drop(&k.keep);
	ck_assert_ptr_null(k.keep.msg);
}
END_TEST

/* The members a claim of destination "xmpp" leaves out of its trees
 * (XA_CLAIM_OMITS, dispatcher_opts.local_omits): every case of
 * xmpp_out.txt made from its event with them (as a claim of another
 * destination makes it) and without them gives the same outcome, reason
 * and bytes.  Since the sixty-first session, when the claim stopped
 * making them for the XMPP adapter. */
static void out_without_omitted_case(char **fl, int lineno, json_t *ev, struct xm_out_info *info, void *arg)
{
	(void)fl;
	int *compared = arg;
	static const struct {
		unsigned bit;
		const char *name;
		json_int_t value;
	} members[] = { { OUTBOX_ROOM_ID, "room_id", 0 },
			{ OUTBOX_ACCEPTED_TS, "accepted_ts", 1700000000123 },
			{ OUTBOX_TS, "ts", 1700000000456 } };
	json_t *full = json_deep_copy(ev), *lean = json_deep_copy(ev);
	ck_assert_ptr_nonnull(full);
	ck_assert_ptr_nonnull(lean);
	int omitted = 0;
	for (size_t i = 0; i < CW_ARRAY_LEN(members); i++) {
		if (!(XA_CLAIM_OMITS & members[i].bit))
			continue;
		omitted++;
		json_object_del(lean, members[i].name);
		if (!json_object_get(full, members[i].name))
			json_object_set_new(full, members[i].name,
					    members[i].value ? json_integer(members[i].value) : json_string("!r1:example.org"));
	}
	ck_assert_int_eq(omitted, 3);
	xmpp_stanza_t *a = NULL, *b = NULL;
	char wa[200], wb[200];
	enum xm_out_result ra = xm_from_neutral(ctx, full, info, &a, wa, sizeof(wa));
	enum xm_out_result rb = xm_from_neutral(ctx, lean, info, &b, wb, sizeof(wb));
	if (same_out(lineno, "with the members", "without", ra, rb, wa, wb, a, b))
		(*compared)++;
	json_decref(full);
	json_decref(lean);
}

START_TEST(out_without_omitted)
{
	int compared = 0;
	ck_assert_int_ge(each_out_case(out_without_omitted_case, &compared), 65);
	ck_assert_int_ge(compared, 45);
}
END_TEST

/* outbox_put_ll prints what snprintf's "%lld" prints: the lookup's rows
 * (xa_deliver) and the outcomes' ids (dispatcher.c's id_array) are
 * printed with it since the fifty-ninth session. */
START_TEST(put_ll_is_snprintfs)
{
	static const long long edges[] = { 0, 1, -1, 9, 10, -10, 99, 100, 123456789, -987654321, LLONG_MAX, LLONG_MIN,
					   LLONG_MIN + 1 };
	for (size_t i = 0; i < CW_ARRAY_LEN(edges) + 5000; i++) {
		long long v = i < CW_ARRAY_LEN(edges) ? edges[i] : (long long)(rnd() >> rnd_below(64));
		char got[32], want[32];
		size_t n = outbox_put_ll(got, v);
		ck_assert_uint_le(n, 20);
		got[n] = '\0';
		snprintf(want, sizeof(want), "%lld", v);
		ck_assert_str_eq(got, want);
	}
}
END_TEST

START_TEST(out_edges)
{
	json_t *ev = json_loads("{\"type\":\"message\",\"content\":{\"parts\":[{\"type\":\"text/plain\",\"body\":\"x\"}]}}",
				0, NULL);
	struct xm_out_info info = { .from = FROM, .to = TO, .id = OUT_ID };
	xmpp_stanza_t *st = (xmpp_stanza_t *)1;
	char why[200];
	ck_assert_int_eq(xm_from_neutral(NULL, ev, &info, &st, why, sizeof(why)), XM_OUT_INVALID);
	ck_assert_ptr_null(st);
	ck_assert_int_eq(xm_from_neutral(ctx, NULL, &info, &st, why, sizeof(why)), XM_OUT_INVALID);
	ck_assert_int_eq(xm_from_neutral(ctx, ev, NULL, &st, why, sizeof(why)), XM_OUT_INVALID);
	ck_assert_int_eq(xm_from_neutral(ctx, ev, &info, NULL, why, sizeof(why)), XM_OUT_INVALID);
	/* Addresses and ids that would not make a valid stanza. */
	static const char *const bad_jids[] = { NULL, "", "a@", "a b@wa.example.org", "a@WA.example.org", "a@x/\x01" };
	for (size_t i = 0; i < CW_ARRAY_LEN(bad_jids); i++) {
		info.from = bad_jids[i];
		ck_assert_int_eq(xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why)), XM_OUT_INVALID);
		ck_assert_ptr_null(st);
		info.from = FROM;
		info.to = bad_jids[i];
		ck_assert_int_eq(xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why)), XM_OUT_INVALID);
		info.to = TO;
	}
	char long_id[300];
	memset(long_id, 'i', 256);
	long_id[256] = '\0';
	static const char *bad_ids[] = { NULL, "", "a\x01", "\xff", NULL };
	bad_ids[4] = long_id;
	for (size_t i = 0; i < CW_ARRAY_LEN(bad_ids); i++) {
		info.id = bad_ids[i];
		ck_assert_int_eq(xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why)), XM_OUT_INVALID);
		ck_assert_ptr_null(st);
	}
	long_id[255] = '\0';
	info.id = long_id;
	ck_assert_int_eq(xm_from_neutral(ctx, ev, &info, &st, NULL, 0), XM_OUT_STANZA);
	ck_assert_str_eq(xmpp_stanza_get_id(st), long_id);
	xmpp_stanza_release(st);
	/* A full JID with a resource is a valid address too. */
	info.id = OUT_ID;
	info.to = "alice@example.org/phone";
	ck_assert_int_eq(xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why)), XM_OUT_STANZA);
	xmpp_stanza_release(st);
	json_decref(ev);
	/* Special characters in ids and addresses are escaped by libstrophe. */
	ev = json_loads("{\"type\":\"receipt\",\"content\":{\"receipt\":\"read\",\"in_reply_to\":\"msg_1\"}}", 0, NULL);
	info.to = "a&b@example.org";
	info.to = TO;
	info.id = "a\"b<c>&'";
	info.target = (struct xm_target){ true, "x\"y<z>&", NULL, true, NULL, false, NULL };
	ck_assert_int_eq(xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why)), XM_OUT_STANZA);
	xmpp_stanza_t *back = reparse(st, "escapes");
	ck_assert_str_eq(xmpp_stanza_get_id(back), "a\"b<c>&'");
	ck_assert_str_eq(xmpp_stanza_get_attribute(first_named(back, "displayed"), "id"), "x\"y<z>&");
	xmpp_stanza_release(back);
	xmpp_stanza_release(st);
	json_decref(ev);
}
END_TEST

/* ------------------------------------------------------------ round trip */

/* Random UTF-8 text the XML can carry as it is: no control characters but
 * line feeds, no CR, no U+FFFE or U+FFFF. */
static size_t random_text(char *buf, size_t max_bytes)
{
	size_t n = 0, want = 1 + rnd_below((unsigned)max_bytes);
	while (n < want) {
		unsigned cp;
		switch (rnd_below(6)) {
		case 0: cp = 0x20 + rnd_below(0x5F); break;
		case 1: cp = "\n <>&\"'\\"[rnd_below(8)]; break;
		case 2: cp = 0xA0 + rnd_below(0x700); break;
		case 3: cp = 0x800 + rnd_below(0xF000); break;
		case 4: cp = 0x1F300 + rnd_below(0x300); break;
		default: cp = 'a' + rnd_below(26); break;
		}
		if ((cp >= 0xD800 && cp <= 0xDFFF) || cp == 0xFFFE || cp == 0xFFFF)
			cp = 'q';
		unsigned char tmp[4];
		size_t l = unit_utf8_put(cp, tmp);
		if (n + l > want)
			break;
		memcpy(buf + n, tmp, l);
		n += l;
	}
	if (n == 0)
		buf[n++] = 'x';
	buf[n] = '\0';
	return n;
}

/* The inbound side of the round trip: the outbound stanzas' references
 * (m-a, o-a) are msg_a; the stored reactions are given per case. */
struct rt_tables {
	json_t *stored;
};

static const char *rt_to_msg(void *c, const char *id)
{
	(void)c;
	return strcmp(id, "m-a") == 0 || strcmp(id, "o-a") == 0 ? "msg_a" : NULL;
}

static const json_t *rt_reactions(void *c, const char *msg)
{
	return strcmp(msg, "msg_a") == 0 ? ((struct rt_tables *)c)->stored : NULL;
}

/* An allocator that fails once `budget` allocations were made (-1: never). */
static long alloc_budget = -1;

static void *budget_alloc(size_t size, void *userdata)
{
	(void)userdata;
	if (alloc_budget == 0)
		return NULL;
	if (alloc_budget > 0)
		alloc_budget--;
	return malloc(size);
}

static void budget_free(void *p, void *userdata)
{
	(void)userdata;
	free(p);
}

static void *budget_realloc(void *p, size_t size, void *userdata)
{
	(void)userdata;
	if (alloc_budget == 0)
		return NULL;
	if (alloc_budget > 0)
		alloc_budget--;
	return realloc(p, size);
}

/* Memory that runs out anywhere while a stanza is made is XM_OUT_NOMEM,
 * never XM_OUT_INVALID (whose row is a dead letter at once): the same
 * event goes once memory is back.  Until the twenty-fifth session it was
 * XM_OUT_INVALID, "out of memory". */
START_TEST(out_memory_is_not_invalid)
{
	static xmpp_mem_t mem = { budget_alloc, budget_free, budget_realloc, NULL };
	alloc_budget = -1;
	xmpp_ctx_t *c = xmpp_ctx_new(&mem, NULL);
	ck_assert_ptr_nonnull(c);
	static const char *const events[] = {
		"{\"type\":\"message\",\"content\":{\"parts\":[{\"type\":\"text/plain\",\"body\":\"hello\"}],"
		"\"in_reply_to\":\"msg_t\",\"topic\":\"t\",\"attachments\":[{\"url\":\"https://f.example/a\"}]}}",
		"{\"type\":\"edit\",\"content\":{\"replaces\":\"msg_t\",\"parts\":[{\"type\":\"text/html\","
		"\"body\":\"<b>new</b>\"}]}}",
		"{\"type\":\"reaction\",\"content\":{\"in_reply_to\":\"msg_t\",\"parts\":[{\"type\":\"text/plain\","
		"\"body\":\"+1\"}]}}",
		"{\"type\":\"delete\",\"content\":{\"replaces\":\"msg_t\"}}",
		"{\"type\":\"receipt\",\"content\":{\"receipt\":\"read\",\"in_reply_to\":\"msg_t\"}}",
		"{\"type\":\"typing\",\"content\":{\"state\":\"start\"}}",
	};
	json_t *set = json_loads("[\"+1\", \"x\"]", 0, NULL);
	json_t *original = json_pack("{s:[{s:s, s:s}]}", "parts", "type", "text/html", "body", "<p>the original</p>");
	struct xm_out_info info = { .from = FROM, .to = TO, .id = OUT_ID,
				    .target = { true, "t1", "o1", false, original, false, NULL },
				    .reacted = { true, "t1", "o1", false, NULL, false, NULL }, .reaction_set = set };
	for (size_t i = 0; i < CW_ARRAY_LEN(events); i++) {
		json_t *ev = json_loads(events[i], 0, NULL);
		ck_assert_ptr_nonnull(ev);
		bool failed = false, made = false;
		for (long n = 0; n < 400 && !made; n++) {
			xmpp_stanza_t *st = NULL;
			char why[200] = "";
			alloc_budget = n;
			enum xm_out_result r = xm_from_neutral(c, ev, &info, &st, why, sizeof(why));
			alloc_budget = -1;
			if (r == XM_OUT_STANZA) {
				ck_assert_ptr_nonnull(st);
				xmpp_stanza_release(st);
				made = true;
				continue;
			}
			ck_assert_msg(r == XM_OUT_NOMEM, "%s, budget %ld: %s (%s)", events[i], n, out_name(r), why);
			ck_assert_str_eq(why, "out of memory");
			ck_assert_ptr_null(st);
			failed = true;
		}
		ck_assert_msg(made && failed, "%s: made %d, failed %d", events[i], made, failed);
		json_decref(ev);
	}
	json_decref(set);
	json_decref(original);
	xmpp_ctx_free(c);
}
END_TEST

START_TEST(round_trip_property)
{
	static const char *const kinds[] = { "message", "reply", "edit", "old-edit", "reaction", "unreact", "delete",
					     "receipt", "typing" };
	char text[1200], quoted[400], key[80];
	int counts[CW_ARRAY_LEN(kinds)] = { 0 };
	for (int i = 0; i < 4000; i++) {
		size_t k = rnd_below(CW_ARRAY_LEN(kinds));
		const char *kind = kinds[k];
		counts[k]++;
		random_text(text, i % 10 == 0 ? 1000 : 60);
		random_text(quoted, 300);
		do
			random_text(key, 64);
		while (strlen(key) > 64);
		json_t *quoted_content = json_pack("{s:[{s:s, s:s}]}", "parts", "type", "text/plain", "body", quoted);
		struct xm_target a = { true, "m-a", rnd() & 1 ? "o-a" : NULL, true, quoted_content, false,
				       rnd() & 1 ? "w@x.example" : NULL };
		struct xm_out_info info = { .from = FROM, .to = TO, .id = OUT_ID };
		struct rt_tables rt = { NULL };
		json_t *ev, *set = NULL;
		if (strcmp(kind, "message") == 0) {
			ev = json_pack("{s:s, s:{s:[{s:s, s:s}]}}", "type", "message", "content", "parts", "type", "text/plain",
				       "body", text);
		} else if (strcmp(kind, "reply") == 0) {
			ev = json_pack("{s:s, s:{s:[{s:s, s:s}], s:s}}", "type", "message", "content", "parts", "type",
				       "text/plain", "body", text, "in_reply_to", "msg_a");
			info.target = a;
		} else if (strcmp(kind, "edit") == 0 || strcmp(kind, "old-edit") == 0) {
			ev = json_pack("{s:s, s:{s:[{s:s, s:s}], s:s}}", "type", "edit", "content", "parts", "type", "text/plain",
				       "body", text, "replaces", "msg_a");
			info.target = a;
			info.target.is_last = strcmp(kind, "edit") == 0;
		} else if (strcmp(kind, "reaction") == 0) {
			ev = json_pack("{s:s, s:{s:[{s:s, s:s}], s:s, s:s}}", "type", "reaction", "content", "parts", "type",
				       "text/plain", "body", key, "disposition", "reaction", "in_reply_to", "msg_a");
			info.reacted = a;
			set = json_pack("[s]", key);
			info.reaction_set = set;
		} else if (strcmp(kind, "unreact") == 0) {
			ev = json_pack("{s:s, s:{s:s}}", "type", "delete", "content", "replaces", "msg_rk");
			info.target = (struct xm_target){ true, "m-rk", NULL, false, NULL, true, NULL };
			info.reacted = a;
			set = json_array();
			info.reaction_set = set;
			rt.stored = json_pack("{s:s}", key, "msg_rk");
		} else if (strcmp(kind, "delete") == 0) {
			ev = json_pack("{s:s, s:{s:s}}", "type", "delete", "content", "replaces", "msg_a");
			info.target = a;
		} else if (strcmp(kind, "receipt") == 0) {
			ev = json_pack("{s:s, s:{s:s, s:s}}", "type", "receipt", "content", "receipt",
				       rnd() & 1 ? "read" : "delivered", "in_reply_to", "msg_a");
			info.target = a;
		} else {
			ev = json_pack("{s:s, s:{s:s}}", "type", "typing", "content", "state", rnd() & 1 ? "start" : "stop");
		}
		ck_assert_ptr_nonnull(ev);
		xmpp_stanza_t *st = NULL;
		char why[200];
		enum xm_out_result r = xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why));
		ck_assert_msg(r == XM_OUT_STANZA, "%s: %s", kind, why);
		xmpp_stanza_t *back = reparse(st, kind);
		struct xm_in_lookup l = { rt_to_msg, rt_reactions, &rt };
		json_t *out = NULL;
		enum xm_in_result ir = xm_to_neutral(back, &l, TS, &out, why, sizeof(why));
		ck_assert_msg(ir == XM_IN_OK, "%s: back %s (%s)", kind, in_name(ir), why);
		assert_events_parse(out, kind);
		ck_assert_uint_eq(json_array_size(out), 1);
		const json_t *b = json_array_get(out, 0), *bc = json_object_get(b, "content");
		const char *bt = json_string_value(json_object_get(b, "type"));
		const json_t *nc = json_object_get(ev, "content");
		const char *want_type = strcmp(kind, "old-edit") == 0 ? "message" : json_string_value(json_object_get(ev, "type"));
		ck_assert_msg(strcmp(bt, want_type) == 0, "%s: came back as %s", kind, bt);
		if (strcmp(kind, "old-edit") == 0) {
			char want[1300];
			snprintf(want, sizeof(want), "Correction: %s", text);
			ck_assert_str_eq(plain_of(bc), want);
			ck_assert_str_eq(json_string_value(json_object_get(bc, "in_reply_to")), "msg_a");
		} else if (strcmp(kind, "unreact") == 0) {
			ck_assert_str_eq(json_string_value(json_object_get(bc, "replaces")), "msg_rk");
		} else if (strcmp(kind, "typing") == 0 || strcmp(kind, "receipt") == 0 || strcmp(kind, "delete") == 0) {
			unit_assert_json_eq(bc, nc, kind);
		} else {
			/* text, in_reply_to, replaces, disposition: all of it */
			unit_assert_json_eq(bc, nc, kind);
		}
		json_decref(out);
		xmpp_stanza_release(back);
		xmpp_stanza_release(st);
		json_decref(rt.stored);
		json_decref(set);
		json_decref(ev);
		json_decref(quoted_content);
	}
	for (size_t k = 0; k < CW_ARRAY_LEN(kinds); k++)
		ck_assert_int_gt(counts[k], 100);
}
END_TEST

/* ------------------------------------------------------------ hostile input */

/* pattern with its first "%s" replaced by text. */
static void fill(char *out, size_t size, const char *pattern, const char *text)
{
	const char *slot = strstr(pattern, "%s");
	if (!slot) {
		snprintf(out, size, "%s", pattern);
		return;
	}
	snprintf(out, size, "%.*s%s%s", (int)(slot - pattern), pattern, text, slot + 2);
}

START_TEST(hostile_stanzas_property)
{
	/* Whole elements ("%s": a random text), and a few loose pieces so that
	 * some stanzas are not well-formed (they never reach the mapping). */
	static const char *const pieces[] = {
		"<body>%s</body>", "<body/>", "<body xml:lang='de'>%s</body>", "<body xmlns='urn:x'>%s</body>",
		"<reply xmlns='urn:xmpp:reply:0' id='m1'/>", "<reply xmlns='urn:xmpp:reply:0'/>",
		"<reply xmlns='urn:xmpp:reply:0' id='%s'/>",
		"<fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:reply:0'><body start='0' end='3'/></fallback>",
		"<fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:reply:0'><body start='2' end='1'/><body/></fallback>",
		"<fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:reply:0'><body start='%s' end='999'/></fallback>",
		"<fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:reply:0'><body start='1' end='%s'/></fallback>",
		"<fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:reply:0'/>",
		"<fallback xmlns='urn:xmpp:fallback:0' for='urn:xmpp:message-retract:1'/>",
		"<replace xmlns='urn:xmpp:message-correct:0' id='m2'/>", "<replace xmlns='urn:xmpp:message-correct:0'/>",
		"<replace xmlns='urn:xmpp:message-correct:0' id='%s'/>",
		"<retract xmlns='urn:xmpp:message-retract:1' id='m1'/>", "<retract xmlns='urn:xmpp:message-retract:1'/>",
		"<apply-to xmlns='urn:xmpp:fasten:0' id='o1'><retract xmlns='urn:xmpp:message-retract:0'/></apply-to>",
		"<apply-to xmlns='urn:xmpp:fasten:0' id='%s'><retract xmlns='urn:xmpp:message-retract:0'/></apply-to>",
		"<reactions xmlns='urn:xmpp:reactions:0' id='m1'><reaction>%s</reaction><reaction>\xf0\x9f\x91\x8d</reaction></reactions>",
		"<reactions xmlns='urn:xmpp:reactions:0' id='m3'><reaction>a</reaction><reaction/><reaction>%s</reaction></reactions>",
		"<reactions xmlns='urn:xmpp:reactions:0' id='o2'/>", "<reactions xmlns='urn:xmpp:reactions:0'>%s</reactions>",
		"<received xmlns='urn:xmpp:receipts' id='m1'/>", "<received xmlns='urn:xmpp:receipts'/>",
		"<received xmlns='urn:xmpp:receipts' id='%s'/>", "<displayed xmlns='urn:xmpp:chat-markers:0' id='o2'/>",
		"<acknowledged xmlns='urn:xmpp:chat-markers:0' id='q'/>", "<received xmlns='urn:xmpp:chat-markers:0' id='m3'/>",
		"<composing xmlns='http://jabber.org/protocol/chatstates'/>", "<gone xmlns='http://jabber.org/protocol/chatstates'/>",
		"<x xmlns='jabber:x:oob'><url>%s</url></x>", "<x xmlns='jabber:x:oob'><url>https://f.example/a</url></x>",
		"<x xmlns='jabber:x:oob'/>", "<origin-id xmlns='urn:xmpp:sid:0' id='%s'/>", "<foo xmlns='urn:x'>%s<bar/></foo>",
		"<store xmlns='urn:xmpp:hints'/>", "<error type='cancel'/>", "<subject>%s</subject>", "<thread>t</thread>",
		"%s", "<body>", "</reactions>", "<reaction>",
	};
	static const char *const texts[] = {
		"", "hello", "&gt; q\n", "\xc3\xa9", "\xf0\x9f\x91\x8d", "&amp;&lt;", " ", "m1", "o2", "zz", "0", "-1",
		"99999999999", "https://f.example/x", "http://x", "https://f.example/a b", "\x0a\x0a", "\\R{70:k}",
		"\\R{300:i}", "\\R{40:\xc3\xa9}", "&#x1F44D;", "&#10;&#9;", "a'b", "a&quot;b",
	};
	static const char *const types[] = { "", " type='chat'", " type='normal'", " type='groupchat'", " type='error'",
					     " type='x'" };
	struct in_tables t;
	tables_init(&t);
	struct xm_in_lookup l = { tbl_to_msg, tbl_reactions, &t };
	int parsed = 0, ok = 0;
	for (int i = 0; i < 6000; i++) {
		char buf[8192];
		size_t n = (size_t)snprintf(buf, sizeof(buf), "<message%s id='s%d'>", types[rnd_below(CW_ARRAY_LEN(types))], i);
		int count = 1 + (int)rnd_below(10);
		for (int k = 0; k < count; k++) {
			const char *p = pieces[rnd_below(i % 20 ? CW_ARRAY_LEN(pieces) - 3 : CW_ARRAY_LEN(pieces))];
			char piece[2048];
			fill(piece, sizeof(piece), p, texts[rnd_below(CW_ARRAY_LEN(texts))]);
			size_t pl = strlen(piece);
			if (n + pl + 16 >= sizeof(buf))
				break;
			memcpy(buf + n, piece, pl);
			n += pl;
		}
		snprintf(buf + n, sizeof(buf) - n, "</message>");
		size_t len;
		char *xml = unit_decode(buf, &len);
		xmpp_stanza_t *st = xmpp_stanza_new_from_string(ctx, xml);
		free(xml);
		if (!st)
			continue; /* not well-formed: never reaches the mapping */
		parsed++;
		json_t *out = (json_t *)1;
		char why[200] = "";
		enum xm_in_result r = xm_to_neutral(st, &l, TS, &out, why, sizeof(why));
		if (r == XM_IN_OK) {
			ok++;
			assert_events_parse(out, buf);
			json_decref(out);
		} else {
			ck_assert_ptr_null(out);
			ck_assert_msg(why[0], "no reason for %s", buf);
		}
		const char *ids[8];
		size_t nref = xm_message_refs(st, ids, 8);
		ck_assert_uint_le(nref, 8);
		char id[XM_ID_MAX + 1], oid[XM_ID_MAX + 1];
		xm_message_ids(st, id, oid);
		ck_assert_uint_le(strlen(oid), XM_ID_MAX);
		xmpp_stanza_release(st);
	}
	ck_assert_int_gt(parsed, 4000);
	ck_assert_int_gt(ok, 1500);
	tables_free(&t);
}
END_TEST

/* A random JSON value of bounded depth. */
static json_t *random_value(int depth)
{
	static const char *const strs[] = { "", "x", "text/plain", "text/html", "text/markdown", "msg_1", "read",
					    "delivered", "start", "stop", "reaction", "https://f.example/a", "<b>x</b>",
					    "\xf0\x9f\x91\x8d", "a\001b", "mxc://m.example/x", "\r\n" };
	switch (rnd_below(depth > 0 ? 7 : 4)) {
	case 0: return json_string(strs[rnd_below(CW_ARRAY_LEN(strs))]);
	case 1: return json_integer((json_int_t)rnd_below(100) - 5);
	case 2: return json_null();
	case 3: return rnd() & 1 ? json_true() : json_false();
	case 4: {
		json_t *a = json_array();
		for (unsigned i = rnd_below(4); i > 0; i--)
			json_array_append_new(a, random_value(depth - 1));
		return a;
	}
	default: {
		static const char *const keys[] = { "type", "body", "url", "content_type", "size", "parts", "attachments",
						    "in_reply_to", "replaces", "receipt", "state", "disposition" };
		json_t *o = json_object();
		for (unsigned i = rnd_below(5); i > 0; i--)
			json_object_set_new(o, keys[rnd_below(CW_ARRAY_LEN(keys))], random_value(depth - 1));
		return o;
	}
	}
}

START_TEST(hostile_events_property)
{
	static const char *const types[] = { "message", "edit", "delete", "reaction", "receipt", "typing", "membership",
					     "block", "other" };
	int stanzas = 0;
	for (int i = 0; i < 6000; i++) {
		json_t *content = rnd_below(10) ? json_object() : random_value(2);
		if (json_is_object(content)) {
			static const char *const keys[] = { "parts", "attachments", "in_reply_to", "replaces", "receipt",
							    "state", "disposition", "topic" };
			for (unsigned k = rnd_below(5); k > 0; k--)
				json_object_set_new(content, keys[rnd_below(CW_ARRAY_LEN(keys))], random_value(3));
			/* mostly well-formed members, with random values inside */
			if (rnd_below(3)) {
				json_t *parts = json_array();
				for (unsigned k = rnd_below(4); k > 0; k--)
					json_array_append_new(parts, json_pack("{s:o, s:o}", "type", random_value(0), "body",
									       random_value(0)));
				if (rnd() & 1)
					json_array_append_new(parts, json_pack("{s:s, s:s}", "type", "text/plain", "body",
									       rnd() & 1 ? "text" : "a\x01\r\n<&>\xef\xbf\xbf"));
				json_object_set_new(content, "parts", parts);
			}
			if (rnd_below(3) == 0) {
				json_t *atts = json_array();
				for (unsigned k = rnd_below(4); k > 0; k--)
					json_array_append_new(atts, json_pack("{s:s, s:o}", "content_type", "image/png", "url",
									      random_value(0)));
				json_object_set_new(content, "attachments", atts);
			}
			static const char *const refs[] = { "in_reply_to", "replaces" };
			if (rnd() & 1)
				json_object_set_new(content, refs[rnd() & 1], json_string("msg_1"));
			if (rnd() & 1)
				json_object_set_new(content, rnd() & 1 ? "receipt" : "state",
						    json_string((const char *[]){ "read", "delivered", "start", "stop" }[rnd_below(4)]));
		}
		json_t *ev = json_pack("{s:s, s:o}", "type", types[rnd_below(CW_ARRAY_LEN(types))], "content", content);
		json_t *set = rnd() & 1 ? random_value(2) : NULL;
		size_t ti = rnd_below(CW_ARRAY_LEN(targets)), ri = rnd_below(CW_ARRAY_LEN(targets));
		struct xm_out_info info = { .from = FROM, .to = TO, .id = OUT_ID, .target = targets[ti].t,
					    .reacted = targets[ri].t, .reaction_set = set };
		xmpp_stanza_t *st = (xmpp_stanza_t *)1;
		char why[200] = "";
		enum xm_out_result r = xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why));
		if (r == XM_OUT_STANZA) {
			stanzas++;
			xmpp_stanza_t *back = reparse(st, "random event");
			check_envelope(back, &info, "random event");
			xmpp_stanza_release(back);
			xmpp_stanza_release(st);
		} else {
			ck_assert_ptr_null(st);
			ck_assert(why[0]);
		}
		json_decref(set);
		json_decref(ev);
	}
	ck_assert_int_gt(stanzas, 500);
}
END_TEST

/* Random HTML of the pieces a peer's message has (and hostile ones): its
 * text on XMPP never shows what is inside head, script or style (unless a
 * torn tag makes it text, as it would for a browser), has no run
 * of more than one blank line, no white space at either end, and, without
 * <pre>, no space at a line's end and no run of spaces but an item's
 * indentation. */
START_TEST(html_text_property)
{
	static const char *const pieces[] = {
		"a", "word", " ", "\n", "\t", "&amp;", "&nbsp;", "\xc3\xa9", "<p>", "</p>", "<div>", "</div>", "<br>",
		"<ul>", "</ul>", "<ol start='7'>", "</ol>", "<li>", "</li>", "<b>", "</b>", "<pre>", "</pre>",
		"<table><tr><td>", "</td><td>", "</td></tr></table>", "<h2>", "</h2>", "<hr>", "<!-- SECRET -->",
		"<a href='https://x.example/'>", "<a href='javascript:SECRET'>", "</a>", "<img alt='cat'>",
		"<script>SECRET</script>", "<style>SECRET{}</style>", "<head><title>SECRET</title></head>",
		"<template>SECRET</template>", "<noscript>SECRET</noscript>", "<!DOCTYPE html>", "<html>", "<body>",
		"<blockquote>", "</blockquote>", "<", ">", "&", "<p", "'",
	};
	int stanzas = 0;
	for (int i = 0; i < 3000; i++) {
		char html[2048] = "";
		bool pre = false, torn = false; /* torn: a piece may join the next one's tag ("<p<script>") */
		for (unsigned k = 1 + rnd_below(40); k > 0; k--) {
			const char *p = pieces[rnd_below(CW_ARRAY_LEN(pieces))];
			pre = pre || strstr(p, "pre") != NULL;
			torn = torn || strcmp(p, "<") == 0 || strcmp(p, "<p") == 0;
			strcat(html, p);
		}
		json_t *ev = json_pack("{s:s, s:{s:[{s:s, s:s}]}}", "type", "message", "content", "parts", "type",
				       "text/html", "body", html);
		struct xm_out_info info = { .from = FROM, .to = TO, .id = OUT_ID };
		xmpp_stanza_t *st = NULL;
		char why[200] = "";
		enum xm_out_result r = xm_from_neutral(ctx, ev, &info, &st, why, sizeof(why));
		ck_assert_msg(r == XM_OUT_STANZA || r == XM_OUT_INVALID, "%s: %s", html, why);
		if (r == XM_OUT_STANZA) {
			stanzas++;
			xmpp_stanza_t *back = reparse(st, html);
			char *text = xmpp_stanza_get_text(xmpp_stanza_get_child_by_name(back, "body"));
			ck_assert_msg(text && *text, "%s: no body", html);
			size_t n = strlen(text);
			ck_assert_msg(torn || !strstr(text, "SECRET"), "%s: %s", html, text);
			ck_assert_msg(!strstr(text, "\n\n\n"), "%s: %s", html, text);
			ck_assert_msg(!strchr(" \t\n", text[0]) && !strchr(" \t\n", text[n - 1]), "%s: [%s]", html, text);
			for (size_t j = 1; !pre && j < n; j++) {
				ck_assert_msg(!(text[j] == '\n' && text[j - 1] == ' '), "%s: [%s]", html, text);
				bool indent = true;
				for (size_t b = j; b > 0 && text[b - 1] != '\n'; b--)
					indent = indent && text[b - 1] == ' ';
				ck_assert_msg(!(text[j] == ' ' && text[j - 1] == ' ') || indent, "%s: [%s]", html, text);
			}
			xmpp_free(ctx, text);
			xmpp_stanza_release(back);
			xmpp_stanza_release(st);
		}
		json_decref(ev);
	}
	ck_assert_int_gt(stanzas, 1000);
}
END_TEST

/* An outbox row's stanza is queued only while the stream is up: one queued
 * while it is down (in the moment the thread gives the stream up, say)
 * would be written after the reconnect although its row, told it was not
 * written, goes again: twice.  Stanzas nobody waits for are still taken. */
START_TEST(queue_takes_rows_only_while_up)
{
	struct xmpp *x = calloc(1, sizeof(*x));
	ck_assert_ptr_nonnull(x);
	struct xcomp *xc = &x->comp[0];
	xc->x = x;
	pthread_mutex_init(&xc->mu, NULL);
	pthread_cond_init(&xc->written, NULL);
	xc->next_seq = 1;
	xc->wake_fd[0] = xc->wake_fd[1] = -1;
	static const enum xc_state not_up[] = { XC_STARTING, XC_STANDBY, XC_CONNECTING, XC_DOWN, XC_AUTH_FAILED };
	uint64_t seq = 0;
	for (size_t i = 0; i < sizeof(not_up) / sizeof(not_up[0]); i++) {
		xc->state = not_up[i];
		ck_assert_msg(!xa_enqueue(xc, "<message/>", 10, &seq, false), "a row queued in state %d", not_up[i]);
		ck_assert_uint_eq(xc->queued, 0);
	}
	ck_assert(xa_enqueue(xc, "<presence/>", 11, NULL, true));
	ck_assert_uint_eq(xc->queued, 1);
	xc->state = XC_UP;
	ck_assert(xa_enqueue(xc, "<message/>", 10, &seq, false));
	ck_assert_uint_eq(xc->queued, 2);
	ck_assert_uint_eq(seq, 2);
	while (xc->head) {
		struct xq_item *n = xc->head->next;
		free(xc->head);
		xc->head = n;
	}
	pthread_mutex_destroy(&xc->mu);
	pthread_cond_destroy(&xc->written);
	free(x);
}
END_TEST

/* A row's stanza dropped with the queue (a break) is not written, however
 * many breaks came before its wait was looked at: the rows of a batch are
 * waited for in turn (xmpp_out.c, up to 5 s each), and a stream that
 * flaps breaks meanwhile.  Until the fifty-second session the ring kept 8
 * ranges (up to two a break), and an older lost stanza counted as
 * written. */
START_TEST(a_lost_stanza_stays_lost_past_the_ring)
{
	struct xmpp *x = calloc(1, sizeof(*x));
	ck_assert_ptr_nonnull(x);
	struct cw_config cfg = { 0 };
	x->cfg = &cfg;
	struct xcomp *xc = &x->comp[0];
	xc->x = x;
	pthread_mutex_init(&xc->mu, NULL);
	pthread_cond_init(&xc->written, NULL);
	xc->next_seq = 1;
	xc->wake_fd[0] = xc->wake_fd[1] = -1;
	xc->state = XC_UP;
	enum { BREAKS = 3 * XA_LOST_MAX };
	uint64_t seqs[BREAKS];
	for (int i = 0; i < BREAKS; i++) {
		ck_assert(xa_enqueue(xc, "<message/>", 10, &seqs[i], false));
		xa_queue_drop(xc); /* the stream broke with it queued */
		if (i == 9) /* past the old ring's 8 */
			for (int k = 0; k <= i; k++)
				ck_assert_msg(!xa_wait_written(xc, seqs[k], 0), "seq %d of %d counted written", k, i);
	}
	for (int k = 0; k < BREAKS; k++)
		ck_assert_msg(!xa_wait_written(xc, seqs[k], 0), "seq %d counted written", k);
	/* one written after them is written */
	uint64_t seq;
	ck_assert(xa_enqueue(xc, "<message/>", 10, &seq, false));
	pthread_mutex_lock(&xc->mu);
	free(xc->head);
	xc->head = xc->tail = NULL;
	xc->queued = 0;
	xc->handed_seq = xc->written_seq = seq;
	pthread_mutex_unlock(&xc->mu);
	ck_assert(xa_wait_written(xc, seq, 0));
	pthread_mutex_destroy(&xc->mu);
	pthread_cond_destroy(&xc->written);
	free(x);
}
END_TEST

/* The queue's items freed (as the thread's drain would write them);
 * how many there were, and whether one of them holds needle. */
static size_t queue_free_all(struct xcomp *xc, const char *needle, bool *found)
{
	size_t n = 0;
	if (found)
		*found = false;
	while (xc->head) {
		struct xq_item *next = xc->head->next;
		if (found && strstr(xc->head->text, needle))
			*found = true;
		free(xc->head);
		xc->head = next;
		n++;
	}
	xc->tail = NULL;
	xc->queued = 0;
	return n;
}

/* A profile change's presences go a batch at a time (xa_fanout_take, the
 * database asked whether each is still to be told, xa_fanout_put).  A
 * batch the queue has no room for waits whole for the next turn: until
 * the forty-sixth session the stanzas it did not take were lost, and
 * their recipients counted done.  A pair whose roster is dropped while
 * the batch is made (a block: xa_fanout_forget, before the drop's own
 * presences are queued) is left out, and so is one the database no
 * longer counts (go false): the blocked contact is not shown online
 * after the drop's "unavailable".  A drop outside a batch keeps
 * nothing. */
/* A component up, with nothing queued, for the fan-out's tests. */
static struct xcomp *fanout_comp(void)
{
	struct xmpp *x = calloc(1, sizeof(*x));
	ck_assert_ptr_nonnull(x);
	struct xcomp *xc = &x->comp[0];
	xc->x = x;
	xc->ctx = ctx;
	snprintf(xc->domain, sizeof(xc->domain), "gk.example");
	pthread_mutex_init(&xc->mu, NULL);
	pthread_cond_init(&xc->written, NULL);
	xc->next_seq = 1;
	xc->wake_fd[0] = xc->wake_fd[1] = -1;
	xc->state = XC_UP;
	return xc;
}

static void fanout_comp_free(struct xcomp *xc)
{
	json_decref(xc->fanouts);
	json_decref(xc->fanout_dropped);
	pthread_mutex_destroy(&xc->mu);
	pthread_cond_destroy(&xc->written);
	free(xc->x);
}

START_TEST(a_profile_fanout_waits_for_room_and_leaves_out_dropped_pairs)
{
	struct xcomp *xc = fanout_comp();
	const char *wally = "wally@gk.example";
	json_t *to = json_pack("[s, s, s, s, s]", "a@x.example", "b@x.example", "c@x.example", "d@x.example",
			       "e@x.example");
	json_t *photo = json_pack("{s:s, s:s, s:s, s:i}", "url", "https://m.example/w.png", "type", "image/png", "sha1",
				  "0123456789abcdef", "bytes", 10);
	xa_fanout_forget(xc, wally, "a@x.example"); /* no batch under way: nothing kept */
	xa_fanout_add(xc, wally, "wally", true, to, photo);
	ck_assert_uint_eq(xa_fanout_left(xc), 5);

	/* The queue full: nothing of the batch goes, nothing is counted done. */
	size_t filled = 0;
	while (xa_enqueue(xc, "<x/>", 4, NULL, false))
		filled++;
	struct xa_fan_pick picks[8];
	memset(picks, 0, sizeof(picks));
	size_t n = xa_fanout_take(xc, picks, 3);
	ck_assert_uint_eq(n, 3);
	for (size_t i = 0; i < n; i++)
		picks[i].go = true;
	ck_assert_uint_eq(xa_fanout_put(xc, picks, n), 0);
	ck_assert_uint_eq(xc->queued, filled);
	ck_assert_uint_eq(xa_fanout_left(xc), 5);
	ck_assert_uint_eq(queue_free_all(xc, NULL, NULL), filled);

	/* Room: the same three again; b is no longer a contact, c's roster
	 * is dropped while the batch is made. */
	memset(picks, 0, sizeof(picks));
	n = xa_fanout_take(xc, picks, 3);
	ck_assert_uint_eq(n, 3);
	ck_assert_str_eq(picks[0].to, "a@x.example");
	picks[0].go = picks[2].go = true;
	xa_fanout_forget(xc, wally, "c@x.example");
	ck_assert_uint_eq(xa_fanout_put(xc, picks, n), 3);
	ck_assert_uint_eq(xa_fanout_left(xc), 2);
	bool found;
	ck_assert_uint_eq(queue_free_all(xc, "to=\"a@x.example\"", &found), 2); /* a's presence and event */
	ck_assert(found);
	ck_assert_uint_eq(json_object_size(xc->fanout_dropped), 0);

	/* The rest, c's drop forgotten with its batch. */
	memset(picks, 0, sizeof(picks));
	n = xa_fanout_take(xc, picks, 8);
	ck_assert_uint_eq(n, 2);
	ck_assert_str_eq(picks[0].to, "d@x.example");
	picks[0].go = picks[1].go = true;
	ck_assert_uint_eq(xa_fanout_put(xc, picks, n), 2);
	ck_assert_uint_eq(xa_fanout_left(xc), 0);
	ck_assert_uint_eq(json_array_size(xc->fanouts), 0);
	ck_assert_uint_eq(queue_free_all(xc, "to=\"e@x.example\"", &found), 4);
	ck_assert(found);
	ck_assert_uint_eq(xa_fanout_take(xc, picks, 8), 0);
	ck_assert(!xc->fanout_taking);

	json_decref(to);
	json_decref(photo);
	fanout_comp_free(xc);
}
END_TEST

/* The presence that answers a user's probe goes as a fan-out's
 * (xa_vcard_presence), so that it passes the same check: with the
 * avatar not known yet (photo NULL) it is the presence alone, without
 * the hash (XEP-0153: no <x/>, not ready to say) and without the PEP
 * event; known to have none, an empty photo. */
START_TEST(a_probe_answer_without_a_known_avatar_is_the_presence_alone)
{
	struct xcomp *xc = fanout_comp();
	json_t *to = json_pack("[s]", "a@x.example"), *none = json_pack("{s:s}", "url", "");
	xa_fanout_add(xc, "wally@gk.example", "wally", false, to, NULL);
	xa_fanout_add(xc, "wally@gk.example", "wally", false, to, none);
	struct xa_fan_pick picks[2];
	memset(picks, 0, sizeof(picks));
	ck_assert_uint_eq(xa_fanout_take(xc, picks, 1), 1);
	picks[0].go = true;
	ck_assert_uint_eq(xa_fanout_put(xc, picks, 1), 1);
	bool found;
	ck_assert_uint_eq(queue_free_all(xc, "vcard-temp:x:update", &found), 1); /* no event */
	ck_assert(!found);
	memset(picks, 0, sizeof(picks));
	ck_assert_uint_eq(xa_fanout_take(xc, picks, 2), 1);
	picks[0].go = true;
	ck_assert_uint_eq(xa_fanout_put(xc, picks, 1), 1);
	ck_assert_uint_eq(queue_free_all(xc, "vcard-temp:x:update", &found), 2); /* an empty photo; the event */
	ck_assert(found);
	json_decref(to);
	json_decref(none);
	fanout_comp_free(xc);
}
END_TEST

/* xmpp.components: each pair's PEER is checked by the peers' own rule
 * (until the twenty-fourth session a looser copy took gk.example). */
static cw_err count_pair(void *arg, const char *domain, const char *peer, cw_errmsg *e)
{
	(void)e;
	ck_assert(peer_name_valid(peer));
	ck_assert_ptr_nonnull(strchr(domain, '.'));
	++*(int *)arg;
	return CW_OK;
}

START_TEST(components_take_the_peers_rule)
{
	cw_errmsg e;
	int n = 0;
	ck_assert_int_eq(xa_components_parse("gk.localhost=gk, wa.localhost=wa_2\ttg.localhost=t-9", count_pair, &n,
					     &e), CW_OK);
	ck_assert_int_eq(n, 3);
	ck_assert_int_eq(xa_components_parse("", NULL, NULL, &e), CW_OK);
	const char *bad[] = { "gk.localhost=gk.example", "gk.localhost=-gk", "gk.localhost=_gk", "gk.localhost=GK",
			      "gk.localhost=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "gk.localhost=", "gk.localhost",
			      "gk..localhost=gk", "a@gk.localhost=gk", "gk.localhost=gk,wa.localhost=w.a", NULL };
	for (int i = 0; bad[i]; i++) {
		n = 0;
		ck_assert_msg(xa_components_parse(bad[i], count_pair, &n, &e) == CW_EINVAL, "%s", bad[i]);
		ck_assert_msg(strstr(e.msg, "xmpp.components: ") == e.msg, "%s", e.msg);
	}
	ck_assert_int_eq(n, 1); /* the pairs before the bad one were handed on */
	/* every name the peers' rule takes is taken */
	for (int c = 0; c < 256; c++) {
		char list[64], name[3] = { 'g', (char)c, '\0' };
		if (c == 0 || c == ' ' || c == ',' || c == '\t')
			continue;
		snprintf(list, sizeof(list), "gk.localhost=%s", name);
		ck_assert_int_eq(xa_components_parse(list, NULL, NULL, &e) == CW_OK, peer_name_valid(name));
	}
}
END_TEST

/* What cfg_load and xa_new both read the [xmpp] options with. */
START_TEST(config_check_takes_what_the_adapter_needs)
{
	struct cw_config c = { .xmpp_components = "gk.example.org=gk,wa.example.org=wa", .xmpp_secret = "s",
			       .domain = "example.org", .xmpp_domain = "" };
	cw_errmsg e;
	char local[64];
	int n = 0;
	ck_assert_int_eq(xa_config_check(&c, local, sizeof(local), count_pair, &n, &e), CW_OK);
	ck_assert_int_eq(n, 2);
	ck_assert_str_eq(local, "example.org");
	c.xmpp_domain = "chat.example.org";
	ck_assert_int_eq(xa_config_check(&c, local, sizeof(local), NULL, NULL, &e), CW_OK);
	ck_assert_str_eq(local, "chat.example.org");
	struct { const char *components, *secret, *domain, *why; } bad[] = {
		{ "gk.example.org=gk", "", "example.org", "xmpp.secret is not set" },
		{ "gk.example.org=gk", "s", "a@example.org", "xmpp.domain (or server.domain)" },
		{ "example.org=gk", "s", "example.org", "xmpp.components: example.org is the users' own domain" },
		{ "gk.example.org=gk gk.example.org=wa", "s", "example.org", "named twice" },
		{ "gk.example.org=gk wa.example.org=gk", "s", "example.org", "named twice" },
		{ " , ", "s", "example.org", "xmpp.components names no component" },
		{ "gk.example.org=-gk", "", "", "is not a peer name" }, /* the list's own errors first */
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
		c.xmpp_components = (char *)bad[i].components;
		c.xmpp_secret = (char *)bad[i].secret;
		c.xmpp_domain = (char *)bad[i].domain;
		ck_assert_msg(xa_config_check(&c, NULL, 0, NULL, NULL, &e) == CW_EINVAL, "%zu", i);
		ck_assert_msg(strstr(e.msg, bad[i].why), "%zu: %s", i, e.msg);
	}
	char list[1024] = "";
	for (int i = 0; i <= 16; i++) /* one more than XMPP_COMPONENTS_MAX */
		snprintf(list + strlen(list), sizeof(list) - strlen(list), "c%d.example.org=p%d ", i, i);
	c.xmpp_components = list;
	c.xmpp_secret = "s";
	c.xmpp_domain = "";
	ck_assert_int_eq(xa_config_check(&c, NULL, 0, NULL, NULL, &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "at most 16 components"));
	c.xmpp_components = "";
	ck_assert_int_eq(xa_config_check(&c, NULL, 0, NULL, NULL, &e), CW_OK); /* the adapter is off */
}
END_TEST

/* ------------------------------------------------------------ restricted XML */

static void XMLCALL count_chars(void *u, const XML_Char *s, int len)
{
	(void)s;
	*(int *)u += len;
}

/* A submitted command form's jid and reason as typed: the white space of
 * any kind around them left out (a no-break space, an ideographic space,
 * a tab; until the forty-second session "wally@gk.xmpp.test" with a
 * no-break space after it named nobody), what is within kept, the jid's
 * domainpart in lower case. */
START_TEST(a_command_forms_values_are_trimmed)
{
	static const struct {
		const char *jid, *reason, *jid_read, *reason_read;
	} cases[] = {
		{ "\xc2\xa0wally@GK.xmpp.test\t", "\xe3\x80\x80 he spams\xc2\xa0", "wally@gk.xmpp.test", "he spams" },
		{ " \xe2\x80\x83GK.XMPP.TEST\xe2\x80\xaf", "", "gk.xmpp.test", "" },
		{ "\xc2\xa0mimi://WA.example/u/Wally ", "a\xc2\xa0" "b", "mimi://wa.example/u/Wally", "a\xc2\xa0" "b" },
		/* a domainpart's final dot stripped (RFC 7622 §3.2; until the
		 * forty-seventh session kept: the contact named nobody) */
		{ "wally@GK.xmpp.test./phone", "", "wally@gk.xmpp.test/phone", "" },
		{ " gk.xmpp.test. ", "", "gk.xmpp.test", "" },
		{ "a.@gk.xmpp.test", "", "a.@gk.xmpp.test", "" },
		{ "wally@gk.xmpp.test../x.", "", "wally@gk.xmpp.test../x.", "" },
		/* not a final dot after white space: stripped, the value ended
		 * in white space (the fuzz smoke's finding, fifty-fourth session) */
		{ "x  .  ", "", "x  .", "" },
		{ "w@x\xc2\xa0.", "", "w@x\xc2\xa0.", "" },
		/* zero-width characters around them too (until the forty-third
		 * session kept: the contact named nobody); within a reason kept */
		{ "\xe2\x80\x8bwally@gk.xmpp.test\xef\xbb\xbf", "\xe2\x81\xa0he\xe2\x80\x8dspams\xe2\x80\x8c",
		  "wally@gk.xmpp.test", "he\xe2\x80\x8dspams" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char xml[1024];
		snprintf(xml, sizeof(xml), "<iq type='set' id='c'><command xmlns='" XA_NS_COMMANDS "' node='report' "
			 "sessionid='s'><x xmlns='" XA_NS_DATA "' type='submit'><field var='jid'><value>%s</value>"
			 "</field><field var='reason'><value>%s</value></field></x></command></iq>",
			 cases[i].jid, cases[i].reason);
		xmpp_stanza_t *iq = parse_stanza(xml, "a command form");
		struct xa_cmd_req *req = malloc(sizeof(*req));
		ck_assert_ptr_nonnull(req);
		xa_cmd_read(iq, req);
		ck_assert_int_eq(req->what, XA_CMD_SUBMIT);
		ck_assert_msg(strcmp(req->jid, cases[i].jid_read) == 0, "case %zu: jid \"%s\"", i, req->jid);
		ck_assert_msg(strcmp(req->reason, cases[i].reason_read) == 0, "case %zu: reason \"%s\"", i,
			      req->reason);
		free(req);
		xmpp_stanza_release(iq);
	}
}
END_TEST

/* A form's values are measured trimmed: padded with white space past
 * their limits (XA_CMD_JID_MAX, XA_CMD_REASON_MAX) they are taken when
 * what is left fits, and refused, saying the limit, when it does not.
 * Until the forty-third session the padding counted (and a jid too long
 * read as none). */
static struct xa_cmd_req *read_form(const char *jid_core, size_t jid_pad, size_t reason_len, size_t reason_pad)
{
	size_t cap = strlen(jid_core) + 2 * jid_pad * 2 + reason_len + 2 * reason_pad * 2 + 512;
	char *xml = malloc(cap), *p = xml;
	ck_assert_ptr_nonnull(xml);
	p += sprintf(p, "<iq type='set' id='c'><command xmlns='" XA_NS_COMMANDS "' node='report' sessionid='s'>"
		     "<x xmlns='" XA_NS_DATA "' type='submit'><field var='jid'><value>");
	for (size_t i = 0; i < jid_pad; i++)
		p += sprintf(p, "\xc2\xa0");
	p += sprintf(p, "%s", jid_core);
	for (size_t i = 0; i < jid_pad; i++)
		p += sprintf(p, "\xc2\xa0");
	p += sprintf(p, "</value></field><field var='reason'><value>");
	for (size_t i = 0; i < reason_pad; i++)
		*p++ = ' ';
	memset(p, 'r', reason_len);
	p += reason_len;
	for (size_t i = 0; i < reason_pad; i++)
		p += sprintf(p, "\t");
	sprintf(p, "</value></field></x></command></iq>");
	xmpp_stanza_t *iq = parse_stanza(xml, "a command form");
	struct xa_cmd_req *req = malloc(sizeof(*req));
	ck_assert_ptr_nonnull(req);
	xa_cmd_read(iq, req);
	xmpp_stanza_release(iq);
	free(xml);
	return req;
}

/* A jid with a zero-width character within it is refused, the text naming
 * the character (it shows nothing: " is not a contact" would not say what
 * is wrong with the contact the user sees). */
START_TEST(a_command_forms_jid_with_a_zero_width_character_is_refused)
{
	static const struct {
		const char *jid, *named;
	} cases[] = {
		{ "wally\xe2\x80\x8b@gk.xmpp.test", "zero-width space (U+200B)" },
		{ " wa\xe2\x80\x8dlly@gk.xmpp.test\xe2\x80\x8b", "zero-width joiner (U+200D)" },
		{ "mimi://wa.example/u/\xe2\x81\xa0wally", "word joiner (U+2060)" },
		{ "wally@gk\xef\xbb\xbf.xmpp.test\xe2\x80\x8c", "zero-width no-break space (U+FEFF)" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char xml[1024];
		snprintf(xml, sizeof(xml), "<iq type='set' id='c'><command xmlns='" XA_NS_COMMANDS "' node='report' "
			 "sessionid='s'><x xmlns='" XA_NS_DATA "' type='submit'><field var='jid'><value>%s</value>"
			 "</field><field var='reason'><value>spam</value></field></x></command></iq>", cases[i].jid);
		xmpp_stanza_t *iq = parse_stanza(xml, "a command form");
		struct xa_cmd_req *req = malloc(sizeof(*req));
		ck_assert_ptr_nonnull(req);
		xa_cmd_read(iq, req);
		ck_assert_int_eq(req->what, XA_CMD_BAD_FORM);
		ck_assert_msg(strstr(req->text, cases[i].named), "case %zu: %s", i, req->text);
		ck_assert_str_eq(req->jid, "");
		ck_assert_str_eq(req->reason, "");
		free(req);
		xmpp_stanza_release(iq);
	}
}
END_TEST

/* A jid holding a control, a bidirectional control or mark or a line
 * separator is refused naming nothing of it: the answers that name the
 * contact quoted it as typed until the fifty-second session, and an
 * override turned their words round in the user's client. */
START_TEST(a_command_forms_jid_with_a_display_control_is_refused)
{
	static const char *const jids[] = {
		"wally\xe2\x80\xae" "tset.ppmx.kg@", /* U+202E */
		"\xe2\x81\xa6wally@gk.xmpp.test\xe2\x81\xa9", /* U+2066, U+2069 */
		"wally@gk.xmpp.test\xe2\x80\x8f/x", /* U+200F */
		"mimi://wa.example/u/wal\xc2\x9bly", /* U+009B, CSI */
		"wally\xe2\x80\xa8@gk.xmpp.test", /* U+2028 */
	};
	for (size_t i = 0; i < sizeof(jids) / sizeof(jids[0]); i++) {
		char xml[1024];
		snprintf(xml, sizeof(xml), "<iq type='set' id='c'><command xmlns='" XA_NS_COMMANDS "' node='block' "
			 "sessionid='s'><x xmlns='" XA_NS_DATA "' type='submit'><field var='jid'><value>%s</value>"
			 "</field></x></command></iq>", jids[i]);
		xmpp_stanza_t *iq = parse_stanza(xml, "a command form");
		struct xa_cmd_req *req = malloc(sizeof(*req));
		ck_assert_ptr_nonnull(req);
		xa_cmd_read(iq, req);
		ck_assert_msg(req->what == XA_CMD_BAD_FORM, "case %zu: %d", i, (int)req->what);
		ck_assert_msg(strstr(req->text, "control character or a bidirectional control"), "case %zu: %s", i,
			      req->text);
		ck_assert_str_eq(req->jid, "");
		ck_assert(!cw_utf8_has_bidi_control(req->text, strlen(req->text)));
		free(req);
		xmpp_stanza_release(iq);
	}
}
END_TEST

/* A form without its one required field, the contact (none, an empty
 * one, one of white space only), is refused with XEP-0050's bad-payload
 * and a text that says so, as every refused form is; until the
 * forty-seventh session it was read as a submit of "" (refused later as
 * " is not a contact", naming nothing) and no refusal said bad-payload. */
START_TEST(a_command_form_without_its_contact_is_bad_payload)
{
	static const char *const fields[] = {
		"",
		"<field var='reason'><value>spam</value></field>",
		"<field var='jid'/>",
		"<field var='jid'><value></value></field>",
		"<field var='jid'><value>\xc2\xa0\t</value></field><field var='reason'><value>spam</value></field>",
		/* the other refusals: bad-payload too */
		"<field var='jid'><value>a@gk.xmpp.test</value><value>b@gk.xmpp.test</value></field>",
		"<field var='jid'><value>a\xe2\x80\x8b@gk.xmpp.test</value></field>",
	};
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
		char xml[1024];
		snprintf(xml, sizeof(xml), "<iq type='set' id='c'><command xmlns='" XA_NS_COMMANDS "' node='block' "
			 "sessionid='s'><x xmlns='" XA_NS_DATA "' type='submit'>%s</x></command></iq>", fields[i]);
		xmpp_stanza_t *iq = parse_stanza(xml, "a command form");
		struct xa_cmd_req *req = malloc(sizeof(*req));
		ck_assert_ptr_nonnull(req);
		xa_cmd_read(iq, req);
		ck_assert_msg(req->what == XA_CMD_BAD_FORM, "case %zu: read as %d", i, (int)req->what);
		ck_assert_str_eq(req->error, "bad-request");
		ck_assert_str_eq(req->cmd_error, "bad-payload");
		if (i < 5)
			ck_assert_str_eq(req->text, "Give the contact: the form's contact field is required.");
		ck_assert_str_eq(req->jid, "");
		ck_assert_str_eq(req->reason, "");
		free(req);
		xmpp_stanza_release(iq);
	}
}
END_TEST

START_TEST(a_command_forms_values_are_measured_trimmed)
{
	char jid[XA_CMD_JID_MAX + 2];
	memset(jid, 'w', XA_CMD_JID_MAX - 13);
	snprintf(jid + XA_CMD_JID_MAX - 13, 14, "@gk.xmpp.test"); /* XA_CMD_JID_MAX bytes */
	struct xa_cmd_req *req = read_form(jid, 600, XA_CMD_REASON_MAX, 600);
	ck_assert_int_eq(req->what, XA_CMD_SUBMIT);
	ck_assert_str_eq(req->jid, jid);
	ck_assert_uint_eq(strlen(req->reason), XA_CMD_REASON_MAX);
	free(req);
	req = read_form("wally@gk.xmpp.test", 0, XA_CMD_REASON_MAX + 1, 10);
	ck_assert_int_eq(req->what, XA_CMD_BAD_FORM);
	ck_assert_str_eq(req->text, "The reason is too long: at most 8192 bytes.");
	free(req);
	memmove(jid + 1, jid, XA_CMD_JID_MAX + 1); /* one byte more */
	req = read_form(jid, 10, 3, 0);
	ck_assert_int_eq(req->what, XA_CMD_BAD_FORM);
	ck_assert_str_eq(req->text, "The contact is too long: at most 1099 bytes.");
	ck_assert_str_eq(req->jid, "");
	free(req);
}
END_TEST

/* RFC 6120 §11.1: no DTD, entity declarations, comments or processing
 * instructions in XMPP.  Every expat parser of the process refuses them
 * (xmpp_xml.c), libstrophe's included; the stream's is watched. */
START_TEST(restricted_xml_is_refused)
{
	static const char *const bad[] = {
		"<message><body>a<!-- c -->b</body></message>",
		"<message><body>a<?evil x?>b</body></message>",
		"<message><!----><body>ab</body></message>",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++)
		ck_assert_msg(xmpp_stanza_new_from_string(ctx, bad[i]) == NULL, "%s", bad[i]);
	xmpp_stanza_t *ok = xmpp_stanza_new_from_string(ctx, "<message><body>a&amp;b&#x41;</body></message>");
	ck_assert_ptr_nonnull(ok);
	char *text = xmpp_message_get_body(ok);
	ck_assert_str_eq(text, "a&bA");
	xmpp_free(ctx, text);
	xmpp_stanza_release(ok);

	/* A three-level entity: stopped at the DOCTYPE, nothing expanded. */
	static const char laughs[] = "<!DOCTYPE s [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>"
				     "<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'>]><s><body>&c;</body></s>";
	XML_Parser p = XML_ParserCreate_MM(NULL, NULL, "\x1f");
	ck_assert_ptr_nonnull(p);
	int chars = 0;
	XML_SetUserData(p, &chars);
	XML_SetCharacterDataHandler(p, count_chars);
	ck_assert_int_eq(XML_Parse(p, laughs, (int)strlen(laughs), XML_TRUE), XML_STATUS_ERROR);
	ck_assert_int_eq(XML_GetErrorCode(p), XML_ERROR_ABORTED);
	ck_assert_int_eq(chars, 0);
	enum xa_xml_stop why;
	ck_assert_ptr_null(xa_xml_refused(&why)); /* not this thread's stream */
	/* The handlers survive a reset (which clears them). */
	ck_assert_int_eq(XML_ParserReset(p, NULL), XML_TRUE);
	ck_assert_int_eq(XML_Parse(p, "<s><?x y?></s>", 14, XML_TRUE), XML_STATUS_ERROR);
	ck_assert_int_eq(XML_GetErrorCode(p), XML_ERROR_ABORTED);
	XML_ParserFree(p);

	/* The stream's parser (the next one made after xa_xml_watch) is
	 * suspended, not failed (libstrophe would answer invalid-xml), and says
	 * why once. */
	xa_xml_watch(true, 0);
	p = XML_ParserCreate_MM(NULL, NULL, "\x1f");
	xa_xml_watch(false, 0);
	ck_assert_ptr_nonnull(p);
	chars = 0;
	XML_SetUserData(p, &chars);
	XML_SetCharacterDataHandler(p, count_chars);
	ck_assert_int_eq(XML_Parse(p, laughs, (int)strlen(laughs), XML_FALSE), XML_STATUS_SUSPENDED);
	ck_assert_int_eq(chars, 0);
	ck_assert_str_eq(xa_xml_refused(&why), "a DOCTYPE");
	ck_assert_int_eq(why, XA_XML_RESTRICTED);
	ck_assert_ptr_null(xa_xml_refused(&why));
	ck_assert_int_eq(XML_ParserReset(p, NULL), XML_TRUE);
	ck_assert_int_eq(XML_Parse(p, "<s>ok<!-- x --></s>", 19, XML_TRUE), XML_STATUS_SUSPENDED);
	ck_assert_str_eq(xa_xml_refused(&why), "a comment");
	/* and stays stopped: what follows is taken unread, no error of its own */
	chars = 0;
	ck_assert_int_eq(XML_Parse(p, "<s>more</s>", 11, XML_TRUE), XML_STATUS_OK);
	ck_assert_int_eq(chars, 0);
	ck_assert_ptr_null(xa_xml_refused(&why));
	/* Not well-formed: said too, as such. */
	ck_assert_int_eq(XML_ParserReset(p, NULL), XML_TRUE);
	ck_assert_int_eq(XML_Parse(p, "<s><a></b></s>", 14, XML_FALSE), XML_STATUS_ERROR);
	ck_assert_str_eq(xa_xml_refused(&why), "mismatched tag");
	ck_assert_int_eq(why, XA_XML_BROKEN);
	XML_ParserFree(p);
	/* Freed: no longer watched; a new parser at its address is not it. */
	p = XML_ParserCreate_MM(NULL, NULL, "\x1f");
	ck_assert_int_eq(XML_Parse(p, "<s><!-- x --></s>", 17, XML_TRUE), XML_STATUS_ERROR);
	ck_assert_ptr_null(xa_xml_refused(&why));
	XML_ParserFree(p);
}
END_TEST

/* What the stanza cap's handlers pass on: the names of the stanzas ended
 * (children of the root; "name!" for one cut at the cap, xa_xml_cut), and
 * every start seen. */
struct seen {
	int depth, starts;
	char ended[512];
};

static void XMLCALL seen_start(void *u, const XML_Char *name, const XML_Char **atts)
{
	struct seen *s = u;
	s->depth++;
	s->starts++;
}

static void XMLCALL seen_end(void *u, const XML_Char *name)
{
	struct seen *s = u;
	if (--s->depth == 1) {
		size_t n = strlen(s->ended);
		snprintf(s->ended + n, sizeof(s->ended) - n, "%s%s;", name, xa_xml_cut() ? "!" : "");
	}
}

/* A stanza of exactly n bytes (<NAME a='ppp...'/>, or with a body). */
static char *stanza_of(const char *name, size_t n, bool body)
{
	char *x = malloc(n + 1);
	ck_assert_ptr_nonnull(x);
	int h = snprintf(x, n + 1, body ? "<%s>" : "<%s a='", name);
	size_t tail = body ? strlen(name) + 3 : 3;
	ck_assert_uint_gt(n, h + tail);
	memset(x + h, body ? 'b' : 'p', n - h - tail);
	snprintf(x + n - tail, tail + 1, body ? "</%s>" : "'/>", name);
	ck_assert_uint_eq(strlen(x), n);
	return x;
}

static XML_Parser watched_parser(long cap, struct seen *s)
{
	xa_xml_watch(true, cap);
	XML_Parser p = XML_ParserCreate_MM(NULL, NULL, NULL);
	xa_xml_watch(false, 0);
	ck_assert_ptr_nonnull(p);
	memset(s, 0, sizeof(*s));
	XML_SetUserData(p, s);
	XML_SetElementHandler(p, seen_start, seen_end);
	return p;
}

/* quality.md: every stanza has a size limit.  A stanza (a child of the
 * root) larger than the stream parser's cap, from its start tag's '<' to
 * its end tag's '>', is cut: the handlers set on it (libstrophe's) get
 * nothing more of it than the ends of the elements they have open, its
 * own end with xa_xml_cut() true (libstrophe serves it then: the adapter
 * refuses it), and the stream goes on.  A tag larger than the cap stops
 * the parser (expat would hold it whole).  Whether it came whole or still
 * comes; one of exactly the cap passes, in one read or byte by byte.
 * Only the watched parser has a cap. */
START_TEST(oversized_stanza_is_refused)
{
	enum xa_xml_stop why;
	struct seen s;
	const long cap = 200;
	static const char root[] = "<s xmlns='jabber:component:accept'>";
	XML_Parser p = watched_parser(cap, &s);
	ck_assert_int_eq(XML_Parse(p, root, (int)strlen(root), XML_FALSE), XML_STATUS_OK);
	char *at = stanza_of("m1", cap, false), *body = stanza_of("m2", cap, true);
	ck_assert_int_eq(XML_Parse(p, at, (int)cap, XML_FALSE), XML_STATUS_OK);
	for (long i = 0; i < cap; i++) /* byte by byte: the same size */
		ck_assert_int_eq(XML_Parse(p, body + i, 1, XML_FALSE), XML_STATUS_OK);
	ck_assert_str_eq(s.ended, "m1;m2;");
	ck_assert_ptr_null(xa_xml_refused(&why));
	/* Many stanzas of the cap and whitespace between them: each is measured on its own. */
	for (int i = 0; i < 20; i++) {
		ck_assert_int_eq(XML_Parse(p, at, (int)cap, XML_FALSE), XML_STATUS_OK);
		ck_assert_int_eq(XML_Parse(p, " \n", 2, XML_FALSE), XML_STATUS_OK);
	}
	ck_assert_ptr_null(xa_xml_refused(&why));
	free(at);
	free(body);

	/* One byte over, whole in one read after an honest stanza: an empty
	 * element (a tag over the cap) stops the parser, nothing after it
	 * read; one with a body is cut, and what follows is read. */
	for (int k = 0; k < 2; k++) {
		ck_assert_int_eq(XML_ParserReset(p, NULL), XML_TRUE);
		memset(&s, 0, sizeof(s));
		XML_SetUserData(p, &s);
		XML_SetElementHandler(p, seen_start, seen_end);
		char *ok = stanza_of("ok", 50, false), *big = stanza_of("big", cap + 1, k == 1);
		char all[600];
		snprintf(all, sizeof(all), "%s%s%s<after/>", root, ok, big);
		enum XML_Status st = XML_Parse(p, all, (int)strlen(all), XML_FALSE);
		if (k == 0) {
			ck_assert_int_eq(st, XML_STATUS_SUSPENDED);
			ck_assert_str_eq(s.ended, "ok;");
			ck_assert_str_eq(xa_xml_refused(&why), "a tag larger than the cap");
			ck_assert_int_eq(why, XA_XML_TOO_LARGE);
			ck_assert_ptr_null(xa_xml_refused(&why));
			int starts = s.starts;
			ck_assert_int_eq(XML_Parse(p, "<more/>", 7, XML_FALSE), XML_STATUS_OK); /* taken unread */
			ck_assert_int_eq(s.starts, starts);
			ck_assert_str_eq(s.ended, "ok;");
		} else {
			ck_assert_int_eq(st, XML_STATUS_OK);
			ck_assert_str_eq(s.ended, "ok;big!;after;");
			ck_assert_ptr_null(xa_xml_refused(&why));
			ck_assert_int_eq(XML_Parse(p, "<more/>", 7, XML_FALSE), XML_STATUS_OK);
			ck_assert_str_eq(s.ended, "ok;big!;after;more;");
		}
		ck_assert(!xa_xml_cut());
		free(ok);
		free(big);
	}

	/* Still coming, its end not sent yet, past the cap: a body is cut (its
	 * elements begun after the cut never reach the handlers, its end does,
	 * cut); a start tag stops the parser. */
	static const char *const coming[] = { "<m><body>", "<m a='" };
	for (size_t k = 0; k < 2; k++) {
		ck_assert_int_eq(XML_ParserReset(p, NULL), XML_TRUE);
		memset(&s, 0, sizeof(s));
		XML_SetUserData(p, &s);
		XML_SetElementHandler(p, seen_start, seen_end);
		ck_assert_int_eq(XML_Parse(p, root, (int)strlen(root), XML_FALSE), XML_STATUS_OK);
		ck_assert_int_eq(XML_Parse(p, coming[k], (int)strlen(coming[k]), XML_FALSE), XML_STATUS_OK);
		char chunk[64];
		memset(chunk, 'x', sizeof(chunk));
		long sent = (long)strlen(coming[k]);
		while (sent + (long)sizeof(chunk) <= cap) {
			ck_assert_int_eq(XML_Parse(p, chunk, (int)sizeof(chunk), XML_FALSE), XML_STATUS_OK);
			sent += (long)sizeof(chunk);
		}
		xa_xml_flush(); /* what was held back (a_long_tag_is_scanned_in_linear_time): the cap's bytes */
		ck_assert_msg(xa_xml_refused(&why) == NULL, "%s: %ld bytes are not over", coming[k], sent);
		if (k == 1) {
			XML_Parse(p, chunk, (int)sizeof(chunk), XML_FALSE); /* stopped now, or held back */
			xa_xml_flush();                                      /* (no '>': the next read gives it) */
			ck_assert_str_eq(xa_xml_refused(&why), "a tag larger than the cap");
			ck_assert_int_eq(why, XA_XML_TOO_LARGE);
			ck_assert_str_eq(s.ended, "");
			continue;
		}
		for (int i = 0; i < 10; i++) /* long past the cap: text, then elements */
			ck_assert_int_eq(XML_Parse(p, chunk, (int)sizeof(chunk), XML_FALSE), XML_STATUS_OK);
		int starts = s.starts;
		for (int i = 0; i < 100; i++)
			ck_assert_int_eq(XML_Parse(p, "<i><j/></i>", 11, XML_FALSE), XML_STATUS_OK);
		ck_assert_int_eq(s.starts, starts);
		ck_assert_int_eq(XML_Parse(p, "</body></m><next/>", 18, XML_FALSE), XML_STATUS_OK);
		ck_assert_str_eq(s.ended, "m!;next;");
		ck_assert_int_eq(s.depth, 1);
		ck_assert_ptr_null(xa_xml_refused(&why));
	}
	XML_ParserFree(p);

	/* No cap (0), and any parser not watched: what libstrophe parses
	 * otherwise (a stored stanza) is not held to it. */
	char *huge = stanza_of("m", 100000, true);
	p = watched_parser(0, &s);
	ck_assert_int_eq(XML_Parse(p, root, (int)strlen(root), XML_FALSE), XML_STATUS_OK);
	ck_assert_int_eq(XML_Parse(p, huge, 100000, XML_FALSE), XML_STATUS_OK);
	ck_assert_str_eq(s.ended, "m;");
	XML_ParserFree(p);
	xmpp_stanza_t *st = xmpp_stanza_new_from_string(ctx, huge);
	ck_assert_ptr_nonnull(st);
	xmpp_stanza_release(st);
	free(huge);
	ck_assert_ptr_null(xa_xml_refused(&why));
}
END_TEST

/* A stream header of n bytes: the XML declaration and <stream:stream ...>
 * (padded in its id). */
static char *header_of(size_t n)
{
	static const char head[] = "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' "
				   "xmlns='jabber:component:accept' id='";
	char *x = malloc(n + 1);
	ck_assert_ptr_nonnull(x);
	ck_assert_uint_gt(n, sizeof(head) + 2);
	memcpy(x, head, sizeof(head) - 1);
	memset(x + sizeof(head) - 1, 'i', n - (sizeof(head) - 1) - 2);
	memcpy(x + n - 2, "'>", 3);
	ck_assert_uint_eq(strlen(x), n);
	return x;
}

static void reset_seen(XML_Parser p, struct seen *s)
{
	ck_assert_int_eq(XML_ParserReset(p, NULL), XML_TRUE);
	memset(s, 0, sizeof(*s));
	XML_SetUserData(p, s);
	XML_SetElementHandler(p, seen_start, seen_end);
}

/* The stream header (from the stream's first byte, the XML declaration
 * included, to the '>' of <stream:stream ...>) is not a stanza: it is not
 * counted in the first stanza's bytes, however the reads cut it, and is
 * held to the cap on its own (expat would keep one still coming in memory
 * whatever its length). */
START_TEST(stream_header_is_measured_apart)
{
	enum xa_xml_stop why;
	struct seen s;
	const long cap = 200;
	char *hdr = header_of(cap), *big = header_of(cap + 1), *st = stanza_of("m1", cap, false);
	XML_Parser p = watched_parser(cap, &s);
	/* A header of the cap, byte by byte, then a stanza of the cap in the read that ends the header. */
	for (long i = 0; i < cap - 1; i++)
		ck_assert_int_eq(XML_Parse(p, hdr + i, 1, XML_FALSE), XML_STATUS_OK);
	char rest[512];
	snprintf(rest, sizeof(rest), ">%s", st);
	ck_assert_int_eq(XML_Parse(p, rest, (int)strlen(rest), XML_FALSE), XML_STATUS_OK);
	ck_assert_str_eq(s.ended, "m1;");
	ck_assert_ptr_null(xa_xml_refused(&why));
	/* Header and stanza in one read, the stanza coming byte by byte after a part of it. */
	reset_seen(p, &s);
	snprintf(rest, sizeof(rest), "%s%.*s", hdr, 7, st);
	ck_assert_int_eq(XML_Parse(p, rest, (int)strlen(rest), XML_FALSE), XML_STATUS_OK);
	for (long i = 7; i < cap; i++)
		ck_assert_int_eq(XML_Parse(p, st + i, 1, XML_FALSE), XML_STATUS_OK);
	ck_assert_str_eq(s.ended, "m1;");
	ck_assert_ptr_null(xa_xml_refused(&why));
	/* A header one byte over: whole in one read (with a stanza after it), or still coming. */
	for (int k = 0; k < 2; k++) {
		reset_seen(p, &s);
		snprintf(rest, sizeof(rest), "%s%s", big, k == 0 ? st : "");
		int n = k == 0 ? (int)strlen(rest) : (int)cap - 1;
		if (k == 1) { /* not over yet; the next byte, the cap's, is not its '>': over */
			ck_assert_int_eq(XML_Parse(p, rest, n, XML_FALSE), XML_STATUS_OK);
			ck_assert_ptr_null(xa_xml_refused(&why));
			n = 1;
		}
		ck_assert_int_eq(XML_Parse(p, rest + (k == 1 ? cap - 1 : 0), n, XML_FALSE), XML_STATUS_SUSPENDED);
		ck_assert_str_eq(xa_xml_refused(&why), "a stream header larger than the cap");
		ck_assert_int_eq(why, XA_XML_TOO_LARGE);
		ck_assert_int_eq(s.starts, 0);
		ck_assert_str_eq(s.ended, "");
	}
	XML_ParserFree(p);
	free(hdr);
	free(big);
	free(st);
}
END_TEST

/* What the handlers set on the stream's parser (libstrophe's, which build
 * the stanza) are given of a stanza past the cap: nothing past its
 * first cap bytes but the ends of the elements they have open, whatever
 * the size of the read holding them, so what libstrophe builds of one is
 * bounded by the cap itself.  The rest of the read is parsed on. */
struct built {
	int depth;
	long chars, starts; /* inside stanzas */
};

static void XMLCALL built_start(void *u, const XML_Char *name, const XML_Char **atts)
{
	struct built *b = u;
	if (b->depth++ >= 1)
		b->starts++;
}

static void XMLCALL built_end(void *u, const XML_Char *name)
{
	struct built *b = u;
	b->depth--;
}

static void XMLCALL built_chars(void *u, const XML_Char *s, int len)
{
	struct built *b = u;
	if (b->depth >= 2)
		b->chars += len;
}

START_TEST(oversized_stanza_is_cut_at_the_cap)
{
	enum xa_xml_stop why;
	const long cap = 10000;
	static const char root[] = "<s xmlns='jabber:component:accept'>";
	static const char *const heads[] = { "<m><body>", "<m>" };
	for (int k = 0; k < 2; k++) {
		for (int buffer = 0; buffer < 2; buffer++) {
			/* one read of 64 KiB: a stanza with a long body, or many children */
			size_t n = 65536;
			char *x = malloc(n);
			ck_assert_ptr_nonnull(x);
			size_t h = strlen(heads[k]);
			memcpy(x, heads[k], h);
			for (size_t i = h; i < n; i++)
				x[i] = k == 0 ? 'b' : "<a/>"[(i - h) % 4];
			xa_xml_watch(true, cap);
			XML_Parser p = XML_ParserCreate_MM(NULL, NULL, NULL);
			xa_xml_watch(false, 0);
			struct built b = { 0 };
			XML_SetUserData(p, &b);
			XML_SetElementHandler(p, built_start, built_end);
			XML_SetCharacterDataHandler(p, built_chars);
			ck_assert_int_eq(XML_Parse(p, root, (int)strlen(root), XML_FALSE), XML_STATUS_OK);
			enum XML_Status st;
			if (buffer) {
				void *into = XML_GetBuffer(p, (int)n);
				ck_assert_ptr_nonnull(into);
				memcpy(into, x, n);
				st = XML_ParseBuffer(p, (int)n, XML_FALSE);
			} else {
				st = XML_Parse(p, x, (int)n, XML_FALSE);
			}
			ck_assert_int_eq(st, XML_STATUS_OK);
			ck_assert_ptr_null(xa_xml_refused(&why));
			if (k == 0)
				ck_assert_int_le(b.chars, cap - (long)h);
			else
				ck_assert_int_le(b.starts, (cap - (long)h) / 4 + 1);
			ck_assert_int_ge(k == 0 ? b.chars : b.starts * 4, cap - (long)h - 8);
			/* Its end: the handlers' elements all closed, nothing more built. */
			long chars = b.chars, starts = b.starts;
			char end[16]; /* the last <a/> of the read may still be coming */
			snprintf(end, sizeof(end), "%s</m>", k == 0 ? "</body>" : (n - h) % 4 ? "<a/>" + (n - h) % 4 : "");
			ck_assert_int_eq(XML_Parse(p, end, (int)strlen(end), XML_FALSE), XML_STATUS_OK);
			ck_assert_int_eq(b.depth, 1);
			ck_assert_int_eq(b.chars, chars);
			ck_assert_int_eq(b.starts, starts);
			XML_ParserFree(p);
			free(x);
		}
	}
	/* A read longer than the cap, of stanzas of the cap and less: cut into
	 * pieces where the cap falls, each stanza still measured whole. */
	struct seen s;
	XML_Parser p = watched_parser(cap, &s);
	ck_assert_int_eq(XML_Parse(p, root, (int)strlen(root), XML_FALSE), XML_STATUS_OK);
	size_t n = 0, size = 40 * (size_t)cap;
	char *all = malloc(size + 1);
	ck_assert_ptr_nonnull(all);
	for (int i = 0; i < 30; i++) {
		char *one = stanza_of(i % 2 ? "a" : "b", i % 3 ? (size_t)cap : 10 + (size_t)i, i % 5 == 0);
		n += (size_t)snprintf(all + n, size + 1 - n, "%s%s", one, i % 4 ? "" : " \n");
		free(one);
	}
	ck_assert_int_eq(XML_Parse(p, all, (int)n, XML_FALSE), XML_STATUS_OK);
	ck_assert_str_eq(s.ended, "b;a;b;a;b;a;b;a;b;a;b;a;b;a;b;a;b;a;b;a;b;a;b;a;b;a;b;a;b;a;");
	ck_assert_ptr_null(xa_xml_refused(&why));
	XML_ParserFree(p);
	free(all);
}
END_TEST

/* A cut stanza is read on to its end, and expat keeps each element still
 * open on its stack (some 36 bytes of memory per byte of "<a>"): the
 * stream's open elements are held to a third of the cap (each takes three
 * bytes at least, so no stanza within the cap has more), past which the
 * parser stops (a review found 20 MiB of "<a>" in a cut stanza take 1 GB).
 * After the stream's end nothing is open: a read then is no header. */
START_TEST(a_cut_stanza_cannot_nest_past_the_cap)
{
	enum xa_xml_stop why;
	struct seen s;
	const long cap = 10000;
	static const char root[] = "<s xmlns='jabber:component:accept'>";
	XML_Parser p = watched_parser(cap, &s);
	ck_assert_int_eq(XML_Parse(p, root, (int)strlen(root), XML_FALSE), XML_STATUS_OK);
	/* Within the cap, as deep as it can be: taken. */
	size_t n = 3;
	char *deep = malloc(8 * (size_t)cap);
	ck_assert_ptr_nonnull(deep);
	memcpy(deep, "<m>", 3);
	int levels = (int)(cap / 3) - 3; /* the root, <m> and the end tags' room */
	for (int i = 0; i < levels && n + 3 <= (size_t)cap; i++, n += 3)
		memcpy(deep + n, "<a>", 3);
	ck_assert_int_eq(XML_Parse(p, deep, (int)n, XML_FALSE), XML_STATUS_OK);
	ck_assert_ptr_null(xa_xml_refused(&why));
	reset_seen(p, &s);
	ck_assert_int_eq(XML_Parse(p, root, (int)strlen(root), XML_FALSE), XML_STATUS_OK);
	/* Cut (a long body), then nested on: stopped at a third of the cap. */
	n = (size_t)snprintf(deep, 16, "<m><b>");
	memset(deep + n, 'x', (size_t)cap);
	n += (size_t)cap;
	memcpy(deep + n, "</b>", 4);
	n += 4;
	for (long i = 0; i < 2 * cap / 3; i++, n += 3)
		memcpy(deep + n, "<a>", 3);
	enum XML_Status st = XML_STATUS_OK;
	for (size_t at = 0; at < n; at += 4000) {
		st = XML_Parse(p, deep + at, (int)(n - at < 4000 ? n - at : 4000), XML_FALSE);
		if (st != XML_STATUS_OK)
			break;
	}
	ck_assert_int_eq(st, XML_STATUS_SUSPENDED);
	ck_assert_str_eq(xa_xml_refused(&why), "elements nested deeper than the cap allows");
	ck_assert_int_eq(why, XA_XML_TOO_LARGE);
	ck_assert_str_eq(s.ended, "");
	/* A read after the stream's end, however much came before: no header. */
	reset_seen(p, &s);
	char *one = stanza_of("m", 9000, true);
	ck_assert_int_eq(XML_Parse(p, root, (int)strlen(root), XML_FALSE), XML_STATUS_OK);
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(XML_Parse(p, one, 9000, XML_FALSE), XML_STATUS_OK);
	ck_assert_int_eq(XML_Parse(p, "</s>\n", 5, XML_FALSE), XML_STATUS_OK);
	ck_assert_int_eq(XML_Parse(p, "\n", 1, XML_FALSE), XML_STATUS_OK);
	ck_assert_ptr_null(xa_xml_refused(&why));
	ck_assert_str_eq(s.ended, "m;m;m;");
	free(one);
	free(deep);
	XML_ParserFree(p);
}
END_TEST

/* libstrophe 0.12 sets the stream parser's element handlers with
 * XML_SetElementHandler; one setting them apart (XML_SetStartElementHandler,
 * XML_SetEndElementHandler: other versions, or a reset's re-set of one) is
 * held the same way: each setter replaces its own half only, the depth is
 * counted whatever was set, and a stanza over the cap still never ends in
 * the handlers set.  On other parsers they are expat's own. */
START_TEST(split_element_setters_keep_the_count)
{
	enum xa_xml_stop why;
	struct seen s;
	const long cap = 200;
	static const char root[] = "<s xmlns='jabber:component:accept'>";
	char *ok = stanza_of("ok", cap, true), *big = stanza_of("big", cap + 1, true);
	xa_xml_watch(true, cap);
	XML_Parser p = XML_ParserCreate_MM(NULL, NULL, NULL);
	xa_xml_watch(false, 0);
	memset(&s, 0, sizeof(s));
	XML_SetUserData(p, &s);
	/* End first, then start, as separate calls; the root read with no start handler at all. */
	XML_SetEndElementHandler(p, seen_end);
	ck_assert_int_eq(XML_Parse(p, root, (int)strlen(root), XML_FALSE), XML_STATUS_OK);
	ck_assert_int_eq(s.starts, 0);
	s.depth = 1; /* what the handlers did not see */
	XML_SetStartElementHandler(p, seen_start);
	ck_assert_int_eq(XML_Parse(p, ok, (int)cap, XML_FALSE), XML_STATUS_OK);
	ck_assert_str_eq(s.ended, "ok;");
	/* The start replaced alone keeps the end; the end removed alone keeps the start. */
	XML_SetStartElementHandler(p, NULL);
	s.depth = 2; /* as if its start had been seen */
	ck_assert_int_eq(XML_Parse(p, ok, (int)cap, XML_FALSE), XML_STATUS_OK);
	ck_assert_int_eq(s.starts, 1);
	ck_assert_str_eq(s.ended, "ok;ok;");
	XML_SetStartElementHandler(p, seen_start);
	XML_SetEndElementHandler(p, NULL);
	ck_assert_int_eq(XML_Parse(p, ok, (int)cap, XML_FALSE), XML_STATUS_OK);
	ck_assert_int_eq(s.starts, 2);
	ck_assert_str_eq(s.ended, "ok;ok;");
	ck_assert_ptr_null(xa_xml_refused(&why));
	/* The count went on through all of it: a stanza over the cap is cut,
	 * its end handed over as such. */
	XML_SetEndElementHandler(p, seen_end);
	s.depth = 1;
	memset(s.ended, 0, sizeof(s.ended));
	ck_assert_int_eq(XML_Parse(p, ok, (int)cap, XML_FALSE), XML_STATUS_OK);
	ck_assert_int_eq(XML_Parse(p, big, (int)cap + 1, XML_FALSE), XML_STATUS_OK);
	ck_assert_str_eq(s.ended, "ok;big!;");
	ck_assert_ptr_null(xa_xml_refused(&why));
	/* After a reset the halves set again the same way work as before. */
	ck_assert_int_eq(XML_ParserReset(p, NULL), XML_TRUE);
	memset(&s, 0, sizeof(s));
	XML_SetUserData(p, &s);
	XML_SetStartElementHandler(p, seen_start);
	XML_SetEndElementHandler(p, seen_end);
	char all[1024];
	snprintf(all, sizeof(all), "%s%s%s%s", root, ok, big, ok);
	ck_assert_int_eq(XML_Parse(p, all, (int)strlen(all), XML_FALSE), XML_STATUS_OK);
	ck_assert_str_eq(s.ended, "ok;big!;ok;");
	ck_assert_ptr_null(xa_xml_refused(&why));
	XML_ParserFree(p);
	/* Not watched: expat's own setters, no cap. */
	p = XML_ParserCreate_MM(NULL, NULL, NULL);
	memset(&s, 0, sizeof(s));
	XML_SetUserData(p, &s);
	XML_SetStartElementHandler(p, seen_start);
	XML_SetEndElementHandler(p, seen_end);
	snprintf(all, sizeof(all), "%s%s%s</s>", root, ok, big);
	ck_assert_int_eq(XML_Parse(p, all, (int)strlen(all), XML_TRUE), XML_STATUS_OK);
	ck_assert_str_eq(s.ended, "ok;big;");
	ck_assert_int_eq(s.starts, 3);
	ck_assert_ptr_null(xa_xml_refused(&why));
	XML_ParserFree(p);
	free(ok);
	free(big);
}
END_TEST

/* Everything a parser's handlers are told, written down: starts with their
 * attributes, ends, text (adjacent pieces joined, as their split is
 * expat's). */
struct rec {
	char *buf;
	size_t len, size;
	bool in_text;
	int depth, stanzas;
};

static void rec_add(struct rec *r, const char *s, size_t n)
{
	if (r->len + n + 1 > r->size) {
		r->size = (r->len + n + 1) * 2;
		r->buf = realloc(r->buf, r->size);
		ck_assert_ptr_nonnull(r->buf);
	}
	memcpy(r->buf + r->len, s, n);
	r->len += n;
	r->buf[r->len] = '\0';
}

static void XMLCALL rec_start(void *u, const XML_Char *name, const XML_Char **atts)
{
	struct rec *r = u;
	r->in_text = false;
	r->depth++;
	rec_add(r, "\n<", 2);
	rec_add(r, name, strlen(name));
	for (int i = 0; atts[i]; i += 2) {
		rec_add(r, " ", 1);
		rec_add(r, atts[i], strlen(atts[i]));
		rec_add(r, "=", 1);
		rec_add(r, atts[i + 1], strlen(atts[i + 1]));
	}
}

static void XMLCALL rec_end(void *u, const XML_Char *name)
{
	struct rec *r = u;
	r->in_text = false;
	if (--r->depth == 1)
		r->stanzas++;
	rec_add(r, "\n</", 3);
	rec_add(r, name, strlen(name));
	if (xa_xml_cut())
		rec_add(r, "!", 1);
}

static void XMLCALL rec_chars(void *u, const XML_Char *s, int len)
{
	struct rec *r = u;
	if (!r->in_text)
		rec_add(r, "\n\"", 2);
	r->in_text = true;
	rec_add(r, s, (size_t)len);
}

static XML_Parser rec_parser(bool watch, long cap, struct rec *r)
{
	xa_xml_watch(watch, cap);
	XML_Parser p = XML_ParserCreate_MM(NULL, NULL, "\x1f");
	xa_xml_watch(false, 0);
	ck_assert_ptr_nonnull(p);
	memset(r, 0, sizeof(*r));
	XML_SetUserData(p, r);
	XML_SetElementHandler(p, rec_start, rec_end);
	XML_SetCharacterDataHandler(p, rec_chars);
	return p;
}

static const char stream_root[] = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
				  "xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
				  "from='c.example' id='s1'>";

/* Expat keeps every distinct element, attribute and prefix name it has
 * read in tables that live as long as its parser, and libstrophe keeps one
 * parser for the stream's life: each XMPP user could grow the gateway's
 * memory by a name per stanza (a review's find; 200-byte names: about 1.3
 * bytes held per byte of name, never given back, a reset included).  The
 * stream's parser is renewed instead, between stanzas, once what it holds
 * passes a bound: nothing held of what came before, and nothing of it seen
 * by the handlers set (xa_xml_renewed counts the renewals). */
START_TEST(the_stream_parsers_memory_is_bounded)
{
	enum xa_xml_stop why;
	struct rec r;
	const long cap = 20000;
	XML_Parser p = rec_parser(true, cap, &r);
	ck_assert_int_eq(XML_Parse(p, stream_root, (int)strlen(stream_root), XML_FALSE), XML_STATUS_OK);
	long fresh = xa_xml_held();
	ck_assert_int_gt(fresh, 0);
	/* 3,000 stanzas, each with an element and an attribute name never
	 * seen before (4,000 bytes each: 24 MB of names). */
	char *st = malloc(10000);
	ck_assert_ptr_nonnull(st);
	long most = 0;
	const long bound = xa_xml_renew_bound() + 4 * cap;
	for (int i = 0; i < 3000; i++) {
		int n = snprintf(st, 100, "<message to='u@x'><e%07d", i);
		memset(st + n, 'n', 3992);
		n += 3992;
		n += snprintf(st + n, 100, " a%07d", i);
		memset(st + n, 'a', 3992);
		n += 3992;
		n += snprintf(st + n, 100, "='v' xmlns='urn:x:%d'/><db:result/></message>\n", i);
		ck_assert_int_eq(XML_Parse(p, st, n, XML_FALSE), XML_STATUS_OK);
		if (xa_xml_held() > most)
			most = xa_xml_held();
	}
	ck_assert_msg(most <= bound, "the stream parser held %ld bytes (bound %ld)", most, bound);
	ck_assert_uint_gt(xa_xml_renewed(), 0);
	ck_assert_int_eq(r.stanzas, 3000);
	/* What the handlers were told of the last stanza is what they would
	 * have been told without any renewal: the header's namespaces and
	 * prefixes in force, the names whole. */
	char want[300];
	snprintf(want, sizeof(want), "\n</urn:x:2999\x1f" "e0002999");
	ck_assert_ptr_nonnull(strstr(r.buf, want));
	ck_assert_ptr_nonnull(strstr(r.buf + r.len - 200, "\n<jabber:server:dialback\x1fresult\n</jabber:server:dialback\x1fresult"
							  "\n</jabber:component:accept\x1fmessage\n\"\n"));
	/* The stream's end matches its (replayed) start. */
	ck_assert_int_eq(XML_Parse(p, "</stream:stream>", 16, XML_FALSE), XML_STATUS_OK);
	ck_assert_ptr_null(xa_xml_refused(&why));
	ck_assert_int_eq(r.depth, 0);
	/* A reset (the stream made again) starts from a fresh parser, and no renewal. */
	ck_assert_int_eq(XML_ParserReset(p, NULL), XML_TRUE);
	ck_assert_uint_eq(xa_xml_renewed(), 0);
	ck_assert_int_le(xa_xml_held(), 2 * fresh);
	free(st);
	free(r.buf);
	XML_ParserFree(p);
}
END_TEST

/* A renewal is invisible to the handlers set: a stream cut into reads of
 * every size (a token, a character, a CR of a CRLF left pending across
 * them), the parser renewed at every stanza's end, tells them exactly what
 * an unwatched parser tells its own; stanzas over the cap are cut the same
 * way with or without renewals. */
START_TEST(a_renewal_is_not_seen_by_the_handlers)
{
	enum xa_xml_stop why;
	static const char *const body[] = {
		"<message from='a@x' to='b@y' id='1'><body>h\xc3\xa9llo &amp; &#x41;</body></message>",
		"\r\n ",
		"<db:verify from='a' to='b' id='x'>k</db:verify>",
		"<iq type='get' id='2'><query xmlns='http://jabber.org/protocol/disco#info' node='n'/></iq>",
		"<presence xmlns:p='urn:p' p:a='1'><p:x>\xf0\x9f\x91\x8d</p:x></presence>\r",
		"\n<message><body>",
		"line\r\nline\r",
		"\r\n</body><stream:features/></message>",
		"<presence to='a@x'/><iq type='result' id='3'/>",
	};
	char *all = malloc(1 << 16);
	ck_assert_ptr_nonnull(all);
	size_t n = (size_t)snprintf(all, 1 << 16, "%s", stream_root);
	for (int k = 0; k < 40; k++)
		for (size_t i = 0; i < sizeof(body) / sizeof(*body); i++)
			n += (size_t)snprintf(all + n, (1 << 16) - n, "%s", body[i]);
	/* One over the cap (cut), then more. */
	char *big = stanza_of("message", 1500, true);
	n += (size_t)snprintf(all + n, (1 << 16) - n, "%s%s</stream:stream>", big, body[0]);
	free(big);

	struct rec plain, seen;
	XML_Parser q = rec_parser(false, 0, &plain);
	ck_assert_int_eq(XML_Parse(q, all, (int)n, XML_FALSE), XML_STATUS_OK);
	XML_ParserFree(q);

	unsigned seed = 7;
	for (int round = 0; round < 60; round++) {
		XML_Parser p = rec_parser(true, 1000, &seen);
		xa_xml_renew_at(1); /* at every stanza's end that a read leaves clean */
		for (size_t at = 0; at < n;) {
			size_t piece = round == 0 ? 1 : 1 + rand_r(&seed) % (round < 30 ? 8 : 300);
			if (piece > n - at)
				piece = n - at;
			ck_assert_int_eq(XML_Parse(p, all + at, (int)piece, XML_FALSE), XML_STATUS_OK);
			at += piece;
		}
		xa_xml_flush(); /* what is held (none: the stream's end has its '>') */
		ck_assert_ptr_null(xa_xml_refused(&why));
		ck_assert_uint_eq(xa_xml_renewed(), (unsigned long)plain.stanzas); /* at every stanza's end */
		/* The unwatched parser has no cap: of the big stanza, it was
		 * told all, the watched one its first part and a cut end;
		 * before and after it, the same. */
		const char *text = "\n\"bbbb", *end = "\n</jabber:component:accept\x1fmessage";
		char *p_big = strstr(plain.buf, text), *s_big = strstr(seen.buf, text);
		ck_assert(p_big && s_big);
		ck_assert_int_eq(p_big - plain.buf, s_big - seen.buf);
		ck_assert_int_eq(memcmp(plain.buf, seen.buf, (size_t)(p_big - plain.buf)), 0);
		char *p_after = strstr(p_big, end), *s_after = strstr(s_big, end);
		ck_assert(p_after && s_after);
		ck_assert_int_eq(s_after[strlen(end)], '!');
		ck_assert_str_eq(p_after + strlen(end), s_after + strlen(end) + 1);
		ck_assert_int_eq(seen.stanzas, plain.stanzas);
		ck_assert_int_eq(seen.depth, 0);
		free(seen.buf);
		XML_ParserFree(p);
	}
	free(plain.buf);
	free(all);
}
END_TEST

/* A renewal does not wait for a read to end between two stanzas: with a
 * backlog, reads come full one after another, and with stanzas in step
 * with them none may ever end there (a review: 12.5 MB held against a
 * 2 MiB bound, until the backlog drained).  Work is renewed at the first
 * stanza's end past the bound, inside the read, and given the rest of it.
 * And a stream that declared another encoding is read again in it. */
START_TEST(a_renewal_comes_inside_a_read)
{
	enum xa_xml_stop why;
	struct rec r;
	const int rd = 4096;
	XML_Parser p = rec_parser(true, 1L << 20, &r);
	ck_assert_int_eq(XML_Parse(p, stream_root, (int)strlen(stream_root), XML_FALSE), XML_STATUS_OK);
	const int n = 1500;
	char *all = malloc((size_t)n * rd + 2000);
	ck_assert_ptr_nonnull(all);
	memset(all, ' ', 2000); /* whitespace first: the reads then end inside stanzas */
	for (int i = 0; i < n; i++) {
		char *st = all + 2000 + (size_t)i * rd;
		int h = snprintf(st, 64, "<message><x%06d", i);
		memset(st + h, 'n', (size_t)(rd - h - 20));
		memcpy(st + rd - 20, "/><y/></message>    ", 20);
	}
	long most = 0;
	size_t total = 2000 + (size_t)n * rd;
	for (size_t at = 0; at < total; at += rd) {
		ck_assert_int_eq(XML_Parse(p, all + at, (int)(total - at < (size_t)rd ? total - at : (size_t)rd), XML_FALSE),
				 XML_STATUS_OK);
		if (xa_xml_held() > most)
			most = xa_xml_held();
	}
	ck_assert_int_eq(r.stanzas, n);
	ck_assert_uint_gt(xa_xml_renewed(), 1);
	ck_assert_msg(most <= xa_xml_renew_bound() + 64 * 1024, "held %ld", most);
	ck_assert_int_eq(XML_Parse(p, "</stream:stream>", 16, XML_FALSE), XML_STATUS_OK);
	ck_assert_ptr_null(xa_xml_refused(&why));
	ck_assert_int_eq(r.depth, 0);
	free(r.buf);
	XML_ParserFree(p);
	free(all);

	/* ISO-8859-1, declared, with a Latin-1 byte in the header and in a
	 * body: every stanza's end renews, and nothing differs. */
	static const char latin[] = "<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream "
				    "xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' "
				    "id='caf\xe9'><message><body>\xe9t\xe9</body></message><message><body>x</body></message>"
				    "</stream:stream>";
	struct rec plain;
	XML_Parser q = rec_parser(false, 0, &plain);
	ck_assert_int_eq(XML_Parse(q, latin, (int)strlen(latin), XML_FALSE), XML_STATUS_OK);
	XML_ParserFree(q);
	p = rec_parser(true, 1L << 20, &r);
	xa_xml_renew_at(1);
	ck_assert_int_eq(XML_Parse(p, latin, (int)strlen(latin), XML_FALSE), XML_STATUS_OK);
	ck_assert_uint_eq(xa_xml_renewed(), 2);
	ck_assert_ptr_null(xa_xml_renewal_off());
	ck_assert_str_eq(r.buf, plain.buf);
	ck_assert_ptr_nonnull(strstr(r.buf, "\"\xc3\xa9t\xc3\xa9"));
	free(plain.buf);
	free(r.buf);
	XML_ParserFree(p);
}
END_TEST

/* Expat 2.5 scans a token still coming from its start again at each
 * read: a tag of 1 MiB in libstrophe's 4 KiB reads was scanned some 128 MB
 * (0.12 s of the component thread for one stanza, whoever sent it).
 * Within a token of 16 KiB or more, reads without a '>' are held back
 * until they add up to what expat holds of it, so that each scan at least
 * doubles what it has, whatever the reads' sizes (a review: TCP segments
 * of 1,448 bytes after one read of 4 KiB made the first version quadratic
 * again).  Nothing ends without a '>': a read with one is given at once,
 * with what is held, and no stanza waits (a review: the first version
 * held the small stanzas after a long tag for as long as reads came). */
START_TEST(a_long_tag_is_scanned_in_linear_time)
{
	enum xa_xml_stop why;
	struct rec r;
	const int rd = 4096;
	XML_Parser p = rec_parser(true, 4L << 20, &r);
	ck_assert_int_eq(XML_Parse(p, stream_root, (int)strlen(stream_root), XML_FALSE), XML_STATUS_OK);
	xa_xml_scanned();
	const int big = (1 << 20) + 1000;
	static const int sizes[] = { 4096, 1448, 2896, 4095, 1, 4096 };
	char *tag = stanza_of("message", (size_t)big, false);
	for (int at = 0, i = 0; at < big; i++) {
		int n = sizes[i % 6] < big - at ? sizes[i % 6] : big - at;
		ck_assert_int_eq(XML_Parse(p, tag + at, n, XML_FALSE), XML_STATUS_OK);
		at += n;
	}
	long scanned = xa_xml_scanned();
	ck_assert_msg(scanned <= 3L * big, "a tag of %d bytes was scanned %ld bytes", big, scanned);
	ck_assert_int_eq(r.stanzas, 1); /* its last read had its '>' */
	ck_assert(!xa_xml_holding());
	free(tag);

	/* Reads 1 to 3 of a tag are given (expat holds less than 16 KiB), 4
	 * to 6 held, the 7th given with them, 8 to 11 held (short of the
	 * 28 KiB expat holds); the 12th, with its '>' and whole stanzas after
	 * it, is given at once, and so is each small stanza after it. */
	tag = stanza_of("message", 12 * (size_t)rd, false);
	for (int i = 0; i < 11; i++)
		ck_assert_int_eq(XML_Parse(p, tag + i * rd, rd, XML_FALSE), XML_STATUS_OK);
	ck_assert(xa_xml_holding());
	ck_assert_int_eq(r.stanzas, 1);
	char last[2 * 4096];
	memcpy(last, tag + 11 * rd, (size_t)rd);
	memcpy(last + rd, "<iq/><iq/>", 10);
	ck_assert_int_eq(XML_Parse(p, last, rd + 10, XML_FALSE), XML_STATUS_OK);
	ck_assert_int_eq(r.stanzas, 4);
	ck_assert(!xa_xml_holding());
	for (int i = 0; i < 5; i++) {
		ck_assert_int_eq(XML_Parse(p, "<iq/>", 5, XML_FALSE), XML_STATUS_OK);
		ck_assert_int_eq(r.stanzas, 5 + i);
	}
	/* The stream's end goes as ever. */
	ck_assert_int_eq(XML_Parse(p, "</stream:stream>", 16, XML_FALSE), XML_STATUS_OK);
	ck_assert_ptr_null(xa_xml_refused(&why));
	ck_assert_int_eq(r.depth, 0);
	free(tag);
	free(r.buf);
	XML_ParserFree(p);
}
END_TEST

/* The same held back reads under a cap: a tag over it still stops the
 * parser (once what was held is given), a stanza over it is still cut. */
START_TEST(held_reads_keep_the_cap)
{
	enum xa_xml_stop why;
	struct rec r;
	const int rd = 4096;
	const long cap = 40000;
	XML_Parser p = rec_parser(true, cap, &r);
	ck_assert_int_eq(XML_Parse(p, stream_root, (int)strlen(stream_root), XML_FALSE), XML_STATUS_OK);
	/* of the cap exactly, in full reads and a short one: taken */
	char *x = stanza_of("message", (size_t)cap, false);
	for (long at = 0; at < cap; at += rd)
		ck_assert_int_eq(XML_Parse(p, x + at, (int)(cap - at < rd ? cap - at : rd), XML_FALSE), XML_STATUS_OK);
	xa_xml_flush();
	ck_assert_int_eq(r.stanzas, 1);
	free(x);
	/* a long body over the cap: cut, the stream goes on */
	x = stanza_of("message", 3 * (size_t)cap, true);
	for (long at = 0; at < 3 * cap; at += rd)
		ck_assert_int_eq(XML_Parse(p, x + at, (int)(3 * cap - at < rd ? 3 * cap - at : rd), XML_FALSE),
				 XML_STATUS_OK);
	xa_xml_flush();
	ck_assert_int_eq(r.stanzas, 2);
	ck_assert_ptr_nonnull(strstr(r.buf, "message!"));
	ck_assert_ptr_null(xa_xml_refused(&why));
	free(x);
	/* a tag over it, in full reads only: stopped, at the latest when the
	 * stream is idle */
	x = stanza_of("message", 3 * (size_t)cap, false);
	enum XML_Status st = XML_STATUS_OK;
	for (long at = 0; at + rd <= 3 * cap && st == XML_STATUS_OK; at += rd)
		st = XML_Parse(p, x + at, rd, XML_FALSE);
	xa_xml_flush();
	ck_assert_str_eq(xa_xml_refused(&why), "a tag larger than the cap");
	ck_assert_int_eq(why, XA_XML_TOO_LARGE);
	ck_assert_int_eq(r.stanzas, 2);
	free(x);
	free(r.buf);
	XML_ParserFree(p);
}
END_TEST

/* This libstrophe parses with the process's expat, so the guard is in
 * front of the stream's parser (one built with libxml2 would leave it
 * unguarded: causewayd refuses to start then, see xa_new). */
START_TEST(libstrophe_parses_with_the_guarded_expat)
{
	ck_assert(xa_xml_guards_libstrophe());
}
END_TEST

/* The reconnect's wait: doubling from 250 ms to the cap after each break
 * of a stream that did not stay up (never up, or up a moment: a server
 * that takes the handshake and closes at once), started again only after
 * one that stayed up XA_STABLE_MS; at least 5 s after a refused secret. */
START_TEST(the_reconnect_backoff_starts_again_only_after_a_stable_stream)
{
	long b = 0;
	long want[] = { 250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000 };
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		b = xa_reconnect_backoff(b, i % 2 ? 50 : -1, false, 30000); /* up 50 ms, or never up */
		ck_assert_int_eq(b, want[i]);
	}
	ck_assert_int_eq(xa_reconnect_backoff(b, XA_STABLE_MS - 1, false, 30000), 30000);
	ck_assert_int_eq(xa_reconnect_backoff(b, XA_STABLE_MS, false, 30000), 250);
	ck_assert_int_eq(xa_reconnect_backoff(0, -1, true, 30000), 5000);
	ck_assert_int_eq(xa_reconnect_backoff(5000, 100, true, 30000), 10000);
	ck_assert_int_eq(xa_reconnect_backoff(0, -1, true, 1000), 1000); /* the cap is the operator's */
	ck_assert_int_eq(xa_reconnect_backoff(250, -1, false, 100), 100);
	ck_assert_int_eq(xa_reconnect_backoff(3000000, -1, false, 3600000), 3600000);
}
END_TEST

/* The set the room's occupants were told (nicks, "#l:<local part>" for
 * this server's members, "#name"), as xc->muc_members holds it. */
static json_t *told_set(const char *nicks, const char *locals)
{
	json_t *set = json_pack("{s:s}", "#name", "G");
	char buf[200], key[220];
	snprintf(buf, sizeof(buf), "%s", nicks);
	for (char *t = strtok(buf, " "); t; t = strtok(NULL, " "))
		json_object_set_new(set, t, json_true());
	snprintf(buf, sizeof(buf), "%s", locals);
	for (char *t = strtok(buf, " "); t; t = strtok(NULL, " ")) {
		snprintf(key, sizeof(key), "#l:%s", t);
		json_object_set_new(set, key, json_true());
	}
	return set;
}

static void since_is(json_t *told, const char *members, const char *locals, const char *want)
{
	json_t *m = json_array(), *l = json_array();
	char buf[200], got[400] = "";
	snprintf(buf, sizeof(buf), "%s", members);
	for (char *t = strtok(buf, " "); t; t = strtok(NULL, " "))
		json_array_append_new(m, json_string(t));
	snprintf(buf, sizeof(buf), "%s", locals);
	for (char *t = strtok(buf, " "); t; t = strtok(NULL, " "))
		json_array_append_new(l, json_string(t));
	json_t *d = xa_muc_since(told, m, l, "carol");
	size_t i;
	json_t *v;
	json_array_foreach(d, i, v) {
		size_t n = strlen(got);
		snprintf(got + n, sizeof(got) - n, "%s%s%s", n ? " " : "", json_string_value(json_array_get(v, 0)),
			 json_string_value(json_array_get(v, 1)));
	}
	ck_assert_str_eq(got, want);
	json_decref(d);
	json_decref(m);
	json_decref(l);
	json_decref(told);
}

/* A joining occupant (carol, of this server) was told the members as
 * the join's snapshot had them; the others were told the set since: what
 * she is told on top.  A nick that names another member now (this
 * server's alice gone, the peer's alice, "alice@<domain>" while ours was
 * in, under her nick; or the reverse) went and came, as xa_muc_members
 * tells the others: until the forty-sixth session the nicks alone were
 * compared, and carol's view kept the peer's alice for ours. */
START_TEST(a_joiner_is_told_the_members_since_its_snapshot_by_who_they_are)
{
	since_is(told_set("alice bob carol", "alice carol"), "alice bob", "alice", "");
	since_is(told_set("alice bob carol dave", "alice carol"), "alice bob", "alice", "+dave");
	since_is(told_set("alice carol", "alice carol"), "alice bob", "alice", "-bob");
	since_is(told_set("alice bob carol", "carol"), "alice bob", "alice", "-alice +alice");
	since_is(told_set("alice bob carol", "alice carol"), "alice bob", "", "-alice +alice");
	since_is(told_set("bob carol", "carol"), "alice bob dave", "alice", "-alice -dave");
}
END_TEST

/* The history a join asks for, at now (2026-01-02T00:00:00Z): seconds
 * and since together give the messages that meet both (XEP-0045
 * §7.2.15), after the later of the two, whatever the zone since is
 * written in; until the forty-ninth session seconds alone counted. */
static void history_is(const char *attrs, int max, const char *since)
{
	char text[300], got[40] = "x";
	snprintf(text, sizeof(text), "<presence><x xmlns='http://jabber.org/protocol/muc'><history %s/></x></presence>",
		 attrs);
	xmpp_stanza_t *st = xmpp_stanza_new_from_string(ctx, text);
	ck_assert_ptr_nonnull(st);
	int m = -1;
	xa_muc_history_wanted(st, 1767312000, &m, got, sizeof(got));
	ck_assert_msg(m == max && strcmp(got, since) == 0, "%s: %d %s", attrs, m, got);
	xmpp_stanza_release(st);
}

START_TEST(a_joins_history_with_seconds_and_since_meets_both)
{
	history_is("", 20, "");
	history_is("maxstanzas='5' maxchars='0'", 0, "");
	history_is("seconds='60'", 20, "2026-01-01T23:59:00Z");
	history_is("since='2026-01-01T12:00:00Z'", 20, "2026-01-01T12:00:00Z");
	/* seconds the later */
	history_is("seconds='60' since='2026-01-01T12:00:00Z'", 20, "2026-01-01T23:59:00Z");
	/* since the later: it counts, as written */
	history_is("seconds='86400' since='2026-01-01T12:00:00.5Z'", 20, "2026-01-01T12:00:00.5Z");
	history_is("seconds='3600' since='2026-01-02T00:30:00+02:00'", 20, "2026-01-01T23:00:00Z");
	history_is("seconds='3600' since='2026-01-02T00:30:00+01:00'", 20, "2026-01-02T00:30:00+01:00");
	history_is("seconds='3600' since='2026-01-01T18:30:00-05:00'", 20, "2026-01-01T18:30:00-05:00");
	/* a since that is no DateTime counts for nothing */
	history_is("seconds='60' since='2026-13-01T00:00:00Z'", 20, "2026-01-01T23:59:00Z");
	history_is("since='yesterday'", 20, "");
}
END_TEST

/* A join refused because the component's rooms are full (10,000
 * occupants) leaves nothing behind: until the forty-ninth session each
 * such join left its room in xc->muc, empty, for good (one more room a
 * name, looked up on every turn of the members' housekeeping). */
START_TEST(a_join_refused_as_the_rooms_are_full_leaves_no_room)
{
	struct xmpp *x = calloc(1, sizeof(*x));
	struct cw_config *cfg = calloc(1, sizeof(*cfg));
	ck_assert_ptr_nonnull(x);
	ck_assert_ptr_nonnull(cfg);
	x->cfg = cfg;
	snprintf(x->local_domain, sizeof(x->local_domain), "x.example");
	struct xcomp *xc = &x->comp[0];
	xc->x = x;
	xc->ctx = ctx;
	snprintf(xc->domain, sizeof(xc->domain), "gk.example");
	pthread_mutex_init(&xc->mu, NULL);
	xc->state = XC_DOWN; /* the answers are queued */
	xc->wake_fd[0] = xc->wake_fd[1] = -1;
	xc->muc = json_object();
	json_t *full = json_object();
	for (int i = 0; i < 10000; i++) {
		char jid[64];
		snprintf(jid, sizeof(jid), "u%d@x.example/r", i);
		json_object_set_new(full, jid, json_pack("{s:s, s:s}", "nick", "n", "user", "u@x.example"));
	}
	json_object_set_new(xc->muc, "#full@gk.example", full);
	ck_assert_uint_eq(xa_muc_count_locked(xc), 10000);
	for (int i = 0; i < 3; i++) {
		char to[64];
		snprintf(to, sizeof(to), "#new%d@gk.example/alice", i);
		xmpp_stanza_t *p = xmpp_presence_new(ctx);
		xmpp_stanza_set_from(p, "alice@x.example/phone");
		xmpp_stanza_set_to(p, to);
		xmpp_stanza_t *mx = xmpp_stanza_new(ctx);
		xmpp_stanza_set_name(mx, "x");
		xmpp_stanza_set_ns(mx, "http://jabber.org/protocol/muc");
		xmpp_stanza_add_child(p, mx);
		xmpp_stanza_release(mx);
		xa_muc_presence(xc, p);
		xmpp_stanza_release(p);
	}
	ck_assert_uint_eq(xa_muc_count_locked(xc), 10000);
	ck_assert_uint_eq(json_object_size(xc->muc), 1);
	/* each told why, as a join's error (XEP-0045 §7.2.6: with the muc
	 * x), queued behind what may still be: until the forty-ninth session
	 * the refusal had neither the x nor the text, and went ahead */
	size_t answers = 0;
	for (struct xq_item *it = xc->head; it; it = it->next, answers++) {
		ck_assert_msg(strstr(it->text, "resource-constraint") && strstr(it->text, "type=\"error\"") &&
				      strstr(it->text, "<x xmlns=\"http://jabber.org/protocol/muc\"/>") &&
				      strstr(it->text, "group rooms are full"),
			      "%s", it->text);
	}
	ck_assert_uint_eq(answers, 3);
	queue_free_all(xc, "", NULL);
	json_decref(xc->muc);
	pthread_mutex_destroy(&xc->mu);
	free(cfg);
	free(x);
}
END_TEST


/* The direct bound is of what libstrophe holds now.  A server that reads,
 * on a stream busy enough that libstrophe's queue is never found empty at
 * an answer (one piece not begun each time), gets every answer: until the
 * fifty-third session the bytes were counted since the queue was last
 * found empty, and after 1 MiB of answers every one was dropped. */
START_TEST(the_direct_bound_is_of_what_libstrophe_holds_not_begun)
{
	static struct xa_direct d;
	memset(&d, 0, sizeof(d));
	/* a busy stream: 20,000 answers of 200 bytes (4 MB), the drain's
	 * batch and blank between them, one piece never begun at an answer */
	for (int i = 0; i < 20000; i++) {
		ck_assert_msg(xa_direct_fits(&d, 1, 200), "answer %d dropped", i);
		xa_direct_handed(&d, 200);
		xa_direct_handed(&d, 0); /* a batch of the drain */
		xa_direct_handed(&d, 0); /* its blank */
	}
	/* a server that reads nothing: what is not begun adds up to the bound */
	memset(&d, 0, sizeof(d));
	int queued = 0;
	size_t taken = 0;
	while (xa_direct_fits(&d, queued, 4096)) {
		xa_direct_handed(&d, 4096);
		queued++;
		taken += 4096;
	}
	ck_assert_uint_eq(taken, XA_DIRECT_BYTES_MAX);
	/* what it reads is forgotten: the newest 100 pieces are held now */
	ck_assert(xa_direct_fits(&d, 100, XA_DIRECT_BYTES_MAX - 100 * 4096));
	ck_assert(!xa_direct_fits(&d, 100, XA_DIRECT_BYTES_MAX - 100 * 4096 + 1));
	/* the pieces are bounded too, whatever their bytes, and the thread's
	 * own pieces (0 bytes) count as pieces */
	memset(&d, 0, sizeof(d));
	for (int i = 0; i < 3 * XA_DIRECT_QUEUE_MAX; i++)
		xa_direct_handed(&d, i % 2 ? 0 : 10);
	ck_assert(!xa_direct_fits(&d, XA_DIRECT_QUEUE_MAX, 1));
	ck_assert(xa_direct_fits(&d, XA_DIRECT_QUEUE_MAX - 1, 1));
	ck_assert_uint_eq(d.bytes, (XA_DIRECT_QUEUE_MAX - 1) / 2 * 10);
	/* one piece over the bound by itself is never taken */
	memset(&d, 0, sizeof(d));
	ck_assert(!xa_direct_fits(&d, 0, XA_DIRECT_BYTES_MAX + 1));
	ck_assert(xa_direct_fits(&d, 0, XA_DIRECT_BYTES_MAX));
}
END_TEST

int main(void)
{
	xmpp_initialize();
	Suite *s = suite_create("xmpp");
	TCase *tc = tcase_create("xmpp");
	tcase_set_timeout(tc, 300);
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, jid_cases);
	tcase_add_test(tc, jid_null_and_buffers);
	tcase_add_test(tc, escape_property);
	tcase_add_test(tc, unescape_property);
	tcase_add_test(tc, in_cases);
	tcase_add_test(tc, put_ll_is_snprintfs);
	tcase_add_test(tc, in_edges);
	tcase_add_test(tc, ids_and_refs);
	tcase_add_test(tc, out_cases);
	tcase_add_test(tc, out_kept_same_bytes);
	tcase_add_test(tc, out_without_omitted);
	tcase_add_test(tc, out_edges);
	tcase_add_test(tc, out_memory_is_not_invalid);
	tcase_add_test(tc, round_trip_property);
	tcase_add_test(tc, hostile_stanzas_property);
	tcase_add_test(tc, hostile_events_property);
	tcase_add_test(tc, html_text_property);
	tcase_add_test(tc, queue_takes_rows_only_while_up);
	tcase_add_test(tc, a_lost_stanza_stays_lost_past_the_ring);
	tcase_add_test(tc, a_profile_fanout_waits_for_room_and_leaves_out_dropped_pairs);
	tcase_add_test(tc, a_probe_answer_without_a_known_avatar_is_the_presence_alone);
	tcase_add_test(tc, components_take_the_peers_rule);
	tcase_add_test(tc, config_check_takes_what_the_adapter_needs);
	tcase_add_test(tc, restricted_xml_is_refused);
	tcase_add_test(tc, oversized_stanza_is_refused);
	tcase_add_test(tc, stream_header_is_measured_apart);
	tcase_add_test(tc, oversized_stanza_is_cut_at_the_cap);
	tcase_add_test(tc, split_element_setters_keep_the_count);
	tcase_add_test(tc, a_cut_stanza_cannot_nest_past_the_cap);
	tcase_add_test(tc, the_stream_parsers_memory_is_bounded);
	tcase_add_test(tc, a_renewal_is_not_seen_by_the_handlers);
	tcase_add_test(tc, a_renewal_comes_inside_a_read);
	tcase_add_test(tc, a_long_tag_is_scanned_in_linear_time);
	tcase_add_test(tc, held_reads_keep_the_cap);
	tcase_add_test(tc, libstrophe_parses_with_the_guarded_expat);
	tcase_add_test(tc, the_reconnect_backoff_starts_again_only_after_a_stable_stream);
	tcase_add_test(tc, a_joiner_is_told_the_members_since_its_snapshot_by_who_they_are);
	tcase_add_test(tc, a_command_forms_values_are_trimmed);
	tcase_add_test(tc, a_command_forms_values_are_measured_trimmed);
	tcase_add_test(tc, a_command_forms_jid_with_a_zero_width_character_is_refused);
	tcase_add_test(tc, a_command_forms_jid_with_a_display_control_is_refused);
	tcase_add_test(tc, a_command_form_without_its_contact_is_bad_payload);
	tcase_add_test(tc, a_join_refused_as_the_rooms_are_full_leaves_no_room);
	tcase_add_test(tc, a_joins_history_with_seconds_and_since_meets_both);
	tcase_add_test(tc, the_direct_bound_is_of_what_libstrophe_holds_not_begun);
	suite_add_tcase(s, tc);
	int rc = unit_run(s);
	xmpp_shutdown();
	return rc;
}
