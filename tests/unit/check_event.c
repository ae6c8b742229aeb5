/* Identifiers, event bodies and batches of the neutral API, table-driven from
 * tests/unit/data/event_ids.txt, event_cases.txt and event_batch_cases.txt. */
#include "config.h"
#include "media.h"
#include "peer/event.h"
#include "peer/peers.h"
#include "unit.h"

#include <stdint.h>

/* ------------------------------------------------------------ case files */

/* One case of event_cases.txt or event_batch_cases.txt. */
struct ecase {
	char name[200];
	char code[32];           /* "ok" or an error code */
	char pointer[200];       /* expected pointer, decoded */
	char detail[200];        /* substring of the detail, or "" */
	unsigned flags;
	struct event_limits lim;
	char checks[16][300];    /* "field = value" or "json <ptr> = <json>" */
	int nchecks;
	char items[16][300];     /* batch: "ok" or "<code> <pointer>" */
	int nitems;
	char *body;              /* raw, undecoded */
	size_t body_len;
	int line;
};

static void trim_newline(char *s)
{
	size_t n = strlen(s);
	while (n && (s[n - 1] == '\n' || s[n - 1] == '\r'))
		s[--n] = '\0';
}

static void set_limit(struct event_limits *l, const char *spec, const char *where)
{
	char name[64];
	unsigned long long v;
	ck_assert_msg(sscanf(spec, "%63s = %llu", name, &v) == 2, "%s: bad limit line %s", where, spec);
	if (!strcmp(name, "max_event_bytes")) l->max_event_bytes = v;
	else if (!strcmp(name, "max_body_bytes")) l->max_body_bytes = v;
	else if (!strcmp(name, "max_parts")) l->max_parts = v;
	else if (!strcmp(name, "max_attachments")) l->max_attachments = v;
	else if (!strcmp(name, "max_attachment_bytes")) l->max_attachment_bytes = v;
	else if (!strcmp(name, "max_batch")) l->max_batch = v;
	else if (!strcmp(name, "max_batch_bytes")) l->max_batch_bytes = v;
	else if (!strcmp(name, "part_types")) l->part_types = (unsigned)v;
	else if (!strcmp(name, "max_ts")) l->max_ts = (int64_t)v;
	else ck_abort_msg("%s: unknown limit %s", where, name);
}

/* "code [pointer]" -> code, decoded pointer. */
static void parse_expect(const char *s, char *code, size_t csize, char *pointer, size_t psize)
{
	const char *sp = strchr(s, ' ');
	size_t clen = sp ? (size_t)(sp - s) : strlen(s);
	ck_assert_uint_lt(clen, csize);
	memcpy(code, s, clen);
	code[clen] = '\0';
	size_t plen;
	char *p = unit_decode(sp ? sp + 1 : "", &plen);
	ck_assert_uint_lt(plen, psize);
	memcpy(pointer, p, plen + 1);
	free(p);
}

static int load_cases(const char *file, struct ecase *cases, int max)
{
	FILE *f = fopen(unit_data_path(file), "r");
	ck_assert_msg(f != NULL, "cannot open %s", unit_data_path(file));
	char *line = NULL;
	size_t lcap = 0;
	int n = -1, lineno = 0;
	bool in_body = false;
	while (getline(&line, &lcap, f) != -1) {
		lineno++;
		if (strncmp(line, "=== ", 4) == 0) {
			ck_assert_int_lt(n + 1, max);
			struct ecase *k = &cases[++n];
			memset(k, 0, sizeof(*k));
			snprintf(k->name, sizeof(k->name), "%.199s", line + 4);
			trim_newline(k->name);
			k->lim = event_limits_default();
			k->line = lineno;
			in_body = false;
			continue;
		}
		/* '#' lines are comments in bodies too: no JSON text starts a line with '#'. */
		if (n < 0 || line[0] == '#' || (!in_body && line[0] == '\n'))
			continue;
		struct ecase *k = &cases[n];
		if (in_body) {
			size_t l = strlen(line);
			k->body = realloc(k->body, k->body_len + l + 1);
			ck_assert_ptr_nonnull(k->body);
			memcpy(k->body + k->body_len, line, l + 1);
			k->body_len += l;
			continue;
		}
		trim_newline(line);
		if (strncmp(line, "expect: ", 8) == 0) {
			parse_expect(line + 8, k->code, sizeof(k->code), k->pointer, sizeof(k->pointer));
		} else if (strcmp(line, "flags: require_room") == 0) {
			k->flags |= EVENT_REQUIRE_ROOM;
		} else if (strcmp(line, "flags: require_sender") == 0) {
			k->flags |= EVENT_REQUIRE_SENDER;
		} else if (strncmp(line, "limit: ", 7) == 0) {
			set_limit(&k->lim, line + 7, k->name);
		} else if (strncmp(line, "detail: ", 8) == 0) {
			snprintf(k->detail, sizeof(k->detail), "%.199s", line + 8);
		} else if (strncmp(line, "check: ", 7) == 0) {
			ck_assert_int_lt(k->nchecks, 16);
			snprintf(k->checks[k->nchecks++], sizeof(k->checks[0]), "%.299s", line + 7);
		} else if (strncmp(line, "item: ", 6) == 0) {
			ck_assert_int_lt(k->nitems, 16);
			snprintf(k->items[k->nitems++], sizeof(k->items[0]), "%.299s", line + 6);
		} else if (strcmp(line, "---") == 0) {
			in_body = true;
		} else {
			ck_abort_msg("%s line %d: unexpected line in case %s: %s", file, lineno, k->name, line);
		}
	}
	free(line);
	fclose(f);
	for (int i = 0; i <= n; i++) {
		ck_assert_msg(cases[i].code[0], "%s: case '%s' has no expect line", file, cases[i].name);
		ck_assert_msg(cases[i].body, "%s: case '%s' has no body", file, cases[i].name);
		/* The newlines before the next case are layout, not body. */
		while (cases[i].body_len && cases[i].body[cases[i].body_len - 1] == '\n')
			cases[i].body[--cases[i].body_len] = '\0';
	}
	return n + 1;
}

static void free_cases(struct ecase *cases, int n)
{
	for (int i = 0; i < n; i++)
		free(cases[i].body);
}

/* ------------------------------------------------------------ JSON helpers */

/* Resolves an RFC 6901 pointer (for checks; no error reporting needed). */
static json_t *resolve(json_t *root, const char *ptr)
{
	json_t *v = root;
	while (v && *ptr) {
		ck_assert_int_eq(*ptr, '/');
		ptr++;
		char tok[256];
		size_t n = 0;
		while (*ptr && *ptr != '/' && n + 1 < sizeof(tok)) {
			if (ptr[0] == '~' && ptr[1] == '0') {
				tok[n++] = '~';
				ptr += 2;
			} else if (ptr[0] == '~' && ptr[1] == '1') {
				tok[n++] = '/';
				ptr += 2;
			} else {
				tok[n++] = *ptr++;
			}
		}
		tok[n] = '\0';
		v = json_is_array(v) ? json_array_get(v, strtoul(tok, NULL, 10)) : json_object_get(v, tok);
	}
	return v;
}

static void uri_text(bool has, const struct mimi_uri *u, char *buf, size_t size)
{
	snprintf(buf, size, "(none)");
	if (has) {
		cw_errmsg e;
		ck_assert_int_eq(mimi_uri_format(u, buf, size, &e), CW_OK);
	}
}

/* The value of a field of struct event, as text, for "check:" lines. */
static void field_text(const struct event *ev, const char *name, char *buf, size_t size)
{
	static const char *const receipts[] = { "none", "delivered", "read" };
	static const char *const typings[] = { "none", "start", "stop" };
	static const char *const memberships[] = { "none", "join", "leave", "invite" };
	if (!strcmp(name, "type")) snprintf(buf, size, "%s", event_type_name(ev->type));
	else if (!strcmp(name, "sender")) uri_text(ev->has_sender, &ev->sender, buf, size);
	else if (!strcmp(name, "room")) uri_text(ev->has_room, &ev->room, buf, size);
	else if (!strcmp(name, "target")) uri_text(ev->has_target, &ev->target, buf, size);
	else if (!strcmp(name, "ts")) snprintf(buf, size, "%lld", (long long)ev->ts);
	else if (!strcmp(name, "expires")) snprintf(buf, size, "%lld", (long long)ev->expires);
	else if (!strcmp(name, "in_reply_to")) snprintf(buf, size, "%s", ev->in_reply_to ? ev->in_reply_to : "(null)");
	else if (!strcmp(name, "replaces")) snprintf(buf, size, "%s", ev->replaces ? ev->replaces : "(null)");
	else if (!strcmp(name, "topic")) snprintf(buf, size, "%s", ev->topic ? ev->topic : "(null)");
	else if (!strcmp(name, "disposition")) snprintf(buf, size, "%s", ev->disposition ? ev->disposition : "(null)");
	else if (!strcmp(name, "nparts")) snprintf(buf, size, "%zu", ev->nparts);
	else if (!strcmp(name, "body_bytes")) snprintf(buf, size, "%zu", ev->body_bytes);
	else if (!strcmp(name, "nattachments")) snprintf(buf, size, "%zu", ev->nattachments);
	else if (!strcmp(name, "attachment_bytes")) snprintf(buf, size, "%llu", (unsigned long long)ev->attachment_bytes);
	else if (!strcmp(name, "kinds"))
		snprintf(buf, size, "%s%s%s", (ev->kinds & EVENT_KIND_TEXT) ? "text" : "",
			 ev->kinds == (EVENT_KIND_TEXT | EVENT_KIND_MEDIA) ? "," : "",
			 (ev->kinds & EVENT_KIND_MEDIA) ? "media" : ev->kinds ? "" : "none");
	else if (!strcmp(name, "receipt")) snprintf(buf, size, "%s", receipts[ev->receipt]);
	else if (!strcmp(name, "typing")) snprintf(buf, size, "%s", typings[ev->typing]);
	else if (!strcmp(name, "membership")) snprintf(buf, size, "%s", memberships[ev->membership]);
	else if (!strcmp(name, "unblock")) snprintf(buf, size, "%s", ev->unblock ? "true" : "false");
	else ck_abort_msg("no field %s", name);
}

/* Runs the "check:" lines of case k against ev. */
static void run_checks(const struct ecase *k, const struct event *ev)
{
	for (int j = 0; j < k->nchecks; j++) {
		const char *chk = k->checks[j];
		if (strncmp(chk, "json ", 5) == 0) {
			/* json <pointer> = <JSON text>: the value kept in event.json. */
			const char *eq = strstr(chk, " = ");
			ck_assert_ptr_nonnull(eq);
			char ptr_raw[256];
			snprintf(ptr_raw, sizeof(ptr_raw), "%.*s", (int)(eq - chk - 5), chk + 5);
			size_t plen, wlen;
			char *ptr = unit_decode(ptr_raw, &plen);
			char *want_text = unit_decode(eq + 3, &wlen);
			json_error_t je;
			json_t *want = json_loadb(want_text, wlen, JSON_DECODE_ANY, &je);
			ck_assert_msg(want != NULL, "case '%s': bad expected JSON in: %s", k->name, chk);
			json_t *got = resolve(ev->json, ptr);
			ck_assert_msg(got != NULL, "case '%s': %s is missing from event.json", k->name, ptr);
			ck_assert_msg(json_equal(got, want), "case '%s': %s differs", k->name, ptr);
			json_decref(want);
			free(ptr);
			free(want_text);
			continue;
		}
		char name[64], want_raw[256], got[1024];
		ck_assert_msg(sscanf(chk, "%63s = %255[^\n]", name, want_raw) == 2, "case '%s': bad check %s", k->name, chk);
		size_t wlen;
		char *want = unit_decode(want_raw, &wlen);
		field_text(ev, name, got, sizeof(got));
		ck_assert_msg(strcmp(got, want) == 0, "case '%s': %s is '%s', expected '%s'", k->name, name, got, want);
		free(want);
	}
}

static void assert_error(const struct ecase *k, const char *code, const char *pointer,
			 const struct event_error *err, const char *want_code, const char *want_pointer)
{
	ck_assert_msg(strcmp(code, want_code) == 0 && strcmp(pointer, want_pointer) == 0,
		      "case '%s' (line %d): got %s '%s' (%s), expected %s '%s'", k->name, k->line, code, pointer,
		      err->detail, want_code, want_pointer);
	ck_assert_msg(strlen(err->detail) > 10, "case '%s': no detail", k->name);
	/* The detail goes into a problem+json answer: it must be a JSON string. */
	json_t *d = json_string(err->detail);
	ck_assert_msg(d != NULL, "case '%s': detail is not UTF-8", k->name);
	json_decref(d);
}

/* ------------------------------------------------------------ events */

START_TEST(event_cases)
{
	static struct ecase cases[300];
	int n = load_cases("event_cases.txt", cases, 300);
	ck_assert_int_ge(n, 60);
	for (int i = 0; i < n; i++) {
		struct ecase *k = &cases[i];
		size_t len;
		char *body = unit_decode(k->body, &len);
		struct event ev;
		struct event_error err;
		cw_err rc = event_parse(body, len, &k->lim, k->flags, &ev, &err);
		if (strcmp(k->code, "ok") == 0) {
			ck_assert_msg(rc == CW_OK, "case '%s' (line %d): expected ok, got %s '%s': %s", k->name, k->line,
				      err.code, err.pointer, err.detail);
			ck_assert_ptr_nonnull(ev.json);
			/* Nothing dropped or changed: the kept object equals a plain parse. */
			json_t *plain = json_loadb(body, len, 0, NULL);
			ck_assert_ptr_nonnull(plain);
			char *a = unit_json_canon(ev.json), *b = unit_json_canon(plain);
			ck_assert_msg(strcmp(a, b) == 0, "case '%s': event.json differs from the body", k->name);
			free(a);
			free(b);
			json_decref(plain);
			run_checks(k, &ev);
			event_free(&ev);
			ck_assert_ptr_null(ev.json);
		} else {
			ck_assert_msg(rc == CW_EINVAL, "case '%s' (line %d): expected %s, got rc %d", k->name, k->line,
				      k->code, rc);
			ck_assert_ptr_null(ev.json);
			assert_error(k, err.code, err.pointer, &err, k->code, k->pointer);
			if (k->detail[0])
				ck_assert_msg(strstr(err.detail, k->detail) != NULL, "case '%s': detail '%s' lacks '%s'",
					      k->name, err.detail, k->detail);
		}
		free(body);
	}
	free_cases(cases, n);
}
END_TEST

/* event_from_json (adapters build events as JSON) decides exactly as
 * event_parse decides on the same object as compact sorted text: same
 * verdict, code, pointer and fields, and its text is that text.  Run over
 * every case that is JSON at all (NULs in strings allowed, to reach the
 * \u0000 rule), with its limits. */
START_TEST(from_json_agrees_with_parse)
{
	static struct ecase cases[300];
	int n = load_cases("event_cases.txt", cases, 300);
	int compared = 0;
	for (int i = 0; i < n; i++) {
		struct ecase *k = &cases[i];
		size_t len;
		char *body = unit_decode(k->body, &len);
		json_t *root = json_loadb(body, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
		free(body);
		if (!root)
			continue;
		char *text = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
		ck_assert_ptr_nonnull(text);
		struct event a, b;
		struct event_error ea, eb;
		cw_err ra = event_parse(text, strlen(text), &k->lim, k->flags, &a, &ea);
		cw_err rb = event_from_json(root, &k->lim, k->flags, &b, &eb);
		ck_assert_msg(ra == rb, "case '%s': parse %d, from_json %d (%s)", k->name, ra, rb, eb.detail);
		if (ra == CW_OK) {
			ck_assert_str_eq(b.text, text);
			ck_assert(b.json == root);
			ck_assert_int_eq(a.type, b.type);
			ck_assert_int_eq(a.ts, b.ts);
			ck_assert_uint_eq(a.nparts, b.nparts);
			ck_assert_uint_eq(a.body_bytes, b.body_bytes);
			ck_assert_uint_eq(a.kinds, b.kinds);
			ck_assert_str_eq(a.in_reply_to ? a.in_reply_to : "-", b.in_reply_to ? b.in_reply_to : "-");
			event_free(&a);
			event_free(&b);
			ck_assert_ptr_null(b.text);
		} else {
			ck_assert_str_eq(ea.code, eb.code);
			ck_assert_str_eq(ea.pointer, eb.pointer);
			ck_assert_ptr_null(b.json);
			ck_assert_ptr_null(b.text);
		}
		compared++;
		free(text);
		json_decref(root);
	}
	ck_assert_int_ge(compared, 40);
	free_cases(cases, n);

	/* The text "\u0000" in a body is no NUL: kept.  A real NUL is
	 * refused, as the parser refuses \u0000. */
	struct event_limits lim = event_limits_default();
	struct event ev;
	struct event_error err;
	json_t *ok = json_pack("{s:s, s:{s:[{s:s, s:s}]}}", "type", "message", "content", "parts", "type",
			       "text/plain", "body", "a \\u0000 b");
	ck_assert_int_eq(event_from_json(ok, &lim, 0, &ev, &err), CW_OK);
	ck_assert_ptr_nonnull(strstr(ev.text, "a \\\\u0000 b"));
	event_free(&ev);
	json_decref(ok);
	json_t *nul = json_pack("{s:s, s:{s:[{s:s, s:s%}]}}", "type", "message", "content", "parts", "type",
				"text/plain", "body", "a\0b", (size_t)3);
	ck_assert_int_eq(event_from_json(nul, &lim, 0, &ev, &err), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(err.detail, "\\u0000"));
	ck_assert_ptr_null(ev.text);
	json_decref(nul);
}
END_TEST

static const char valid_message[] =
	"{\"type\":\"message\",\"sender\":\"mimi://wa.example/u/+4915112345678\","
	"\"room\":\"mimi://example.org/r/8f3c\",\"ts\":1764300000000,\"x-extra\":{\"k\":[1,2,{\"a\":null}]},"
	"\"content\":{\"parts\":[{\"type\":\"text/plain\",\"body\":\"hi\"},{\"type\":\"text/markdown\",\"body\":\"**hi**\"}],"
	"\"in_reply_to\":\"msg_1\",\"replaces\":null,\"topic\":null,\"expires\":null,"
	"\"attachments\":[{\"content_type\":\"image/jpeg\",\"url\":\"https://media.example/a\",\"size\":1234,"
	"\"sha256\":\"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\",\"filename\":\"a.jpg\"}]}}";

/* The body limit is inclusive: exactly max_event_bytes passes, one more fails. */
START_TEST(event_size_boundary)
{
	struct event_limits lim = event_limits_default();
	size_t max = lim.max_event_bytes;
	char *body = malloc(max + 2);
	ck_assert_ptr_nonnull(body);
	const char head[] = "{\"type\":\"typing\",\"content\":{\"state\":\"start\"},\"pad\":\"";
	const char tail[] = "\"}";
	size_t fill = max - (sizeof(head) - 1) - (sizeof(tail) - 1);
	memcpy(body, head, sizeof(head) - 1);
	memset(body + sizeof(head) - 1, 'a', fill);
	memcpy(body + sizeof(head) - 1 + fill, tail, sizeof(tail));
	ck_assert_uint_eq(strlen(body), max);
	struct event ev;
	struct event_error err;
	ck_assert_int_eq(event_parse(body, max, &lim, 0, &ev, &err), CW_OK);
	ck_assert_int_eq(ev.typing, EVENT_TYPING_START);
	event_free(&ev);
	/* One byte more (a space is still valid JSON) is too large. */
	body[max] = ' ';
	body[max + 1] = '\0';
	ck_assert_int_eq(event_parse(body, max + 1, &lim, 0, &ev, &err), CW_EINVAL);
	ck_assert_str_eq(err.code, "too_large");
	ck_assert_str_eq(err.pointer, "");
	free(body);
}
END_TEST

/* EVENT_STORED: a stored event whose attachment's content_type was taken
 * at its arrival and is refused by the RFC 6838 check since still parses,
 * with its kinds and sizes (the policy's release counts them); its length
 * is still held to, and a new event is refused as before. */
START_TEST(stored_event_content_type_taken_as_at_arrival)
{
	struct event_limits lim = event_limits_default();
	const char *body = "{\"type\":\"message\",\"content\":{\"attachments\":[{\"content_type\":"
			   "\"image/x-'or'1\",\"url\":\"mxc://example.org/abc\",\"size\":5000}]}}";
	struct event ev;
	struct event_error err;
	ck_assert_int_eq(event_parse(body, strlen(body), &lim, 0, &ev, &err), CW_EINVAL);
	ck_assert_str_eq(err.pointer, "/content/attachments/0/content_type");
	ck_assert_int_eq(event_parse(body, strlen(body), &lim, EVENT_STORED, &ev, &err), CW_OK);
	ck_assert_uint_eq(ev.kinds, EVENT_KIND_MEDIA);
	ck_assert_uint_eq(ev.attachment_bytes, 5000);
	event_free(&ev);
	char longer[600];
	snprintf(longer, sizeof(longer),
		 "{\"type\":\"message\",\"content\":{\"attachments\":[{\"content_type\":\"image/%0256d\","
		 "\"url\":\"mxc://example.org/abc\"}]}}", 0);
	ck_assert_int_eq(event_parse(longer, strlen(longer), &lim, EVENT_STORED, &ev, &err), CW_EINVAL);
}
END_TEST

/* media_type_valid is the one syntax of a media type: the peer API's
 * content_type (event_parse agrees with it on each), a Matrix mimetype
 * mapped in, a fetched file's type.  Until the fifty-third session a
 * fetched type was checked by media_type_ok, which took a name from a
 * symbol (the last rows): those are no RFC 6838 names, and a file so
 * answered is served as application/octet-stream now. */
START_TEST(media_type_valid_is_the_peer_apis_content_type)
{
	static const struct {
		const char *s;
		bool ok;
	} cases[] = {
		{ "image/png", true },
		{ "application/vnd.oasis.opendocument.text", true },
		{ "0a!#$&-^_.+/9Z!#$&-^_.+", true },
		{ "text/plain; charset=utf-8", true },
		{ "Text/Plain;charset=\"utf-8\" ;format=flowed", true },
		{ "image/png;", true },
		{ "", false },
		{ "image", false },
		{ "image/", false },
		{ "/png", false },
		{ "*/*", false },
		{ "image/x-'or'1", false },
		{ "image/png x", false },
		{ "image/png; a", false },
		{ "image/png; a=", false },
		{ "image/png; a=\"\xc3\xa9\"", false },
		{ "image/png; a=\"x", false },
		{ "image/png; a=\"\n\"", false },
		{ "image/+png", false },
		{ "-image/png", false },
		{ ".a/b", false },
		{ "+/+", false },
	};
	struct event_limits lim = event_limits_default();
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		ck_assert_msg(media_type_valid(cases[i].s) == cases[i].ok, "%s", cases[i].s);
		json_t *b = json_pack("{s:s, s:{s:[{s:s, s:s}]}}", "type", "message", "content", "attachments",
				      "content_type", cases[i].s, "url", "https://a.example/1");
		char *body = json_dumps(b, JSON_COMPACT);
		struct event ev;
		struct event_error err;
		cw_err rc = event_parse(body, strlen(body), &lim, 0, &ev, &err);
		ck_assert_msg((rc == CW_OK) == cases[i].ok, "%s", cases[i].s);
		if (rc == CW_OK)
			event_free(&ev);
		else
			ck_assert_str_eq(err.pointer, "/content/attachments/0/content_type");
		free(body);
		json_decref(b);
	}
	char name[300];
	snprintf(name, sizeof(name), "%0127d/%0127d", 0, 0);
	ck_assert(media_type_valid(name));
	snprintf(name, sizeof(name), "%0128d/png", 0);
	ck_assert(!media_type_valid(name));
	snprintf(name, sizeof(name), "image/%0128d", 0);
	ck_assert(!media_type_valid(name));
}
END_TEST

/* Every prefix and every single-byte change of a valid body: no crash, no
 * leak, and a failure always comes with a stable code and a pointer. */
START_TEST(event_mutations_never_crash)
{
	struct event_limits lim = event_limits_default();
	size_t len = strlen(valid_message);
	struct event ev;
	struct event_error err;
	ck_assert_int_eq(event_parse(valid_message, len, &lim, EVENT_REQUIRE_ROOM, &ev, &err), CW_OK);
	ck_assert_uint_eq(ev.kinds, EVENT_KIND_TEXT | EVENT_KIND_MEDIA);
	event_free(&ev);
	char *buf = malloc(len + 1);
	ck_assert_ptr_nonnull(buf);
	for (size_t cut = 0; cut < len; cut++) {
		ck_assert_int_eq(event_parse(valid_message, cut, &lim, 0, &ev, &err), CW_EINVAL);
		ck_assert_str_eq(err.code, "invalid_body");
	}
	static const char subst[] = { '\0', '"', '\\', '{', '}', '[', ']', ',', ':', '0', 'x', '\x80', '\xff', ' ' };
	for (size_t i = 0; i < len; i++) {
		for (size_t s = 0; s < sizeof(subst); s++) {
			memcpy(buf, valid_message, len + 1);
			buf[i] = subst[s];
			cw_err rc = event_parse(buf, len, &lim, 0, &ev, &err);
			if (rc == CW_OK) {
				event_free(&ev);
				continue;
			}
			ck_assert_int_eq(rc, CW_EINVAL);
			ck_assert(strcmp(err.code, "invalid_body") == 0 || strcmp(err.code, "too_large") == 0);
			ck_assert(err.pointer[0] == '\0' || err.pointer[0] == '/');
			json_t *d = json_string(err.detail);
			ck_assert_ptr_nonnull(d);
			json_decref(d);
		}
	}
	free(buf);
}
END_TEST

/* A pointer through keys that hold '~' and '/' is escaped (RFC 6901), and a
 * pointer too long for the buffer stops at the deepest whole token. */
START_TEST(pointer_escaping_and_truncation)
{
	struct event_limits lim = event_limits_default();
	struct event ev;
	struct event_error err;
	const char *deep = "{\"type\":\"typing\",\"content\":{\"state\":\"start\"},"
			   "\"a/b\":{\"c~d\":[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]}}";
	ck_assert_int_eq(event_parse(deep, strlen(deep), &lim, 0, &ev, &err), CW_EINVAL);
	ck_assert_str_eq(err.code, "invalid_body");
	ck_assert_str_eq(err.pointer, "/a~1b/c~0d/0/0/0/0/0/0/0/0/0/0/0/0/0/0");

	char body[1024];
	char key[101];
	memset(key, 'k', 100);
	key[100] = '\0';
	snprintf(body, sizeof(body),
		 "{\"type\":\"typing\",\"content\":{\"state\":\"start\"},\"%s\":{\"%s\":[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}}",
		 key, key);
	ck_assert_int_eq(event_parse(body, strlen(body), &lim, 0, &ev, &err), CW_EINVAL);
	char want[128];
	snprintf(want, sizeof(want), "/%s", key);
	ck_assert_str_eq(err.pointer, want);

	/* A key longer than the whole pointer buffer leaves the root. */
	char big[300];
	memset(big, 'z', 200);
	big[200] = '\0';
	snprintf(body, sizeof(body),
		 "{\"type\":\"typing\",\"content\":{\"state\":\"start\"},\"%s\":[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}", big);
	ck_assert_int_eq(event_parse(body, strlen(body), &lim, 0, &ev, &err), CW_EINVAL);
	ck_assert_str_eq(err.pointer, "");
}
END_TEST

START_TEST(defaults_and_free)
{
	struct event_limits lim = event_limits_default();
	ck_assert_uint_eq(lim.max_event_bytes, 65536);
	ck_assert_uint_eq(lim.max_body_bytes, 16384);
	ck_assert_uint_eq(lim.max_parts, 4);
	ck_assert_uint_eq(lim.max_attachments, 8);
	ck_assert_uint_eq(lim.max_attachment_bytes, 104857600);
	ck_assert_uint_eq(lim.max_batch, 256);
	ck_assert_uint_eq(lim.part_types, EVENT_PART_ALL);
	struct event ev;
	memset(&ev, 0, sizeof(ev));
	event_free(&ev);
	event_free(&ev);
	struct batch b;
	memset(&b, 0, sizeof(b));
	batch_free(&b);
	struct event_error err;
	ck_assert_int_eq(event_parse(NULL, 0, &lim, 0, &ev, &err), CW_EINVAL);
	ck_assert_str_eq(err.code, "invalid_body");
	for (int t = 0; t < EVENT_TYPE_COUNT; t++)
		ck_assert_str_ne(event_type_name((enum event_type)t), "unknown");
	ck_assert_str_eq(event_type_name((enum event_type)99), "unknown");
}
END_TEST

/* ------------------------------------------------------------ identifiers */

/* event_ids.txt: "<validator> ok|bad <text> [-> kind domain port id] [-- reason]". */
START_TEST(identifier_cases)
{
	FILE *f = fopen(unit_data_path("event_ids.txt"), "r");
	ck_assert_ptr_nonnull(f);
	char *line = NULL;
	size_t lcap = 0;
	int uri_cases = 0, other_cases = 0;
	while (getline(&line, &lcap, f) != -1) {
		trim_newline(line);
		if (line[0] == '#' || line[0] == '\0')
			continue;
		char which[16], verdict[8], text_raw[2048] = "", fields[2048] = "", reason[256] = "";
		char *arrow = strstr(line, " -> "), *dashes = strstr(line, " -- ");
		if (dashes) {
			snprintf(reason, sizeof(reason), "%s", dashes + 4);
			*dashes = '\0';
		}
		if (arrow) {
			snprintf(fields, sizeof(fields), "%s", arrow + 4);
			*arrow = '\0';
		}
		int got = sscanf(line, "%15s %7s %2047s", which, verdict, text_raw);
		ck_assert_msg(got >= 2, "bad line: %s", line);
		size_t len;
		char *text = unit_decode(text_raw, &len);
		bool want_ok = strcmp(verdict, "ok") == 0;
		ck_assert_msg(want_ok || strcmp(verdict, "bad") == 0, "bad verdict in: %s", line);
		if (strcmp(which, "uri") == 0) {
			struct mimi_uri u;
			cw_errmsg e = { { 0 } };
			cw_err rc = mimi_uri_parse(text, &u, &e);
			if (want_ok) {
				ck_assert_msg(rc == CW_OK, "uri %s: expected ok, got: %s", text, e.msg);
				char buf[MIMI_URI_MAX + 1];
				ck_assert_int_eq(mimi_uri_format(&u, buf, sizeof(buf), &e), CW_OK);
				ck_assert_msg(strcmp(buf, text) == 0, "round trip of %s gave %s", text, buf);
				if (fields[0]) {
					char kind[8], domain_raw[300], id_raw[1024];
					unsigned port;
					ck_assert_int_eq(sscanf(fields, "%7s %299s %u %1023s", kind, domain_raw, &port, id_raw), 4);
					size_t idl, dl;
					char *id = unit_decode(id_raw, &idl), *domain = unit_decode(domain_raw, &dl);
					ck_assert_int_eq(u.kind, strcmp(kind, "user") == 0 ? MIMI_USER : MIMI_ROOM);
					ck_assert_str_eq(u.domain, domain);
					ck_assert_uint_eq(u.port, port);
					ck_assert_str_eq(u.id, id);
					free(id);
					free(domain);
				}
				struct mimi_uri again;
				ck_assert_int_eq(mimi_uri_parse(buf, &again, &e), CW_OK);
				ck_assert(mimi_uri_equal(&u, &again));
			} else {
				ck_assert_msg(rc == CW_EINVAL, "uri %s: expected bad, got ok", text_raw);
				if (reason[0])
					ck_assert_msg(strstr(e.msg, reason) != NULL, "uri %s: '%s' lacks '%s'", text_raw,
						      e.msg, reason);
			}
			uri_cases++;
		} else {
			const char *arg = got == 3 ? text : "";
			if (strcmp(text_raw, "NULL") == 0)
				arg = NULL;
			bool ok;
			if (strcmp(which, "room_id") == 0)
				ok = room_public_id_valid(arg);
			else if (strcmp(which, "msg_id") == 0)
				ok = message_id_valid(arg);
			else if (strcmp(which, "idem") == 0)
				ok = idempotency_key_valid(arg);
			else
				ck_abort_msg("unknown validator in: %s", line);
			ck_assert_msg(ok == want_ok, "%s %s: got %s", which, text_raw, ok ? "ok" : "bad");
			other_cases++;
		}
		free(text);
	}
	free(line);
	fclose(f);
	ck_assert_int_ge(uri_cases, 30);
	ck_assert_int_ge(other_cases, 20);
}
END_TEST

START_TEST(uri_format_refuses_bad_components)
{
	struct mimi_uri u;
	cw_errmsg e;
	char buf[MIMI_URI_MAX + 1];
	memset(&u, 0, sizeof(u));
	u.kind = MIMI_USER;
	strcpy(u.domain, "example.org");
	strcpy(u.id, "@alice:matrix.org"); /* a native id that was not mapped */
	ck_assert_int_eq(mimi_uri_format(&u, buf, sizeof(buf), &e), CW_EINVAL);
	ck_assert_str_eq(buf, "");
	strcpy(u.id, "alice");
	strcpy(u.domain, "Example.org");
	ck_assert_int_eq(mimi_uri_format(&u, buf, sizeof(buf), &e), CW_EINVAL);
	strcpy(u.domain, "example.org");
	u.port = 8448; /* identifiers name no port */
	ck_assert_int_eq(mimi_uri_format(&u, buf, sizeof(buf), &e), CW_EINVAL);
	u.port = 0;
	ck_assert_int_eq(mimi_uri_format(&u, buf, sizeof(buf), &e), CW_OK);
	ck_assert_str_eq(buf, "mimi://example.org/u/alice");
	/* Too small a buffer: refused, and left empty rather than cut. */
	char small[10];
	ck_assert_int_eq(mimi_uri_format(&u, small, sizeof(small), &e), CW_EINVAL);
	ck_assert_str_eq(small, "");
	u.kind = MIMI_ROOM;
	strcpy(u.id, "a.b"); /* '.' is not a room id character */
	ck_assert_int_eq(mimi_uri_format(&u, buf, sizeof(buf), &e), CW_EINVAL);
	/* Components that are each valid but together longer than 512 bytes. */
	u.kind = MIMI_USER;
	memset(u.domain, 'a', 63);
	u.domain[63] = '.';
	memset(u.domain + 64, 'b', 63);
	u.domain[127] = '.';
	memset(u.domain + 128, 'c', 63);
	u.domain[191] = '.';
	memset(u.domain + 192, 'd', 61);
	u.domain[253] = '\0';
	memset(u.id, 'x', 255);
	u.id[255] = '\0';
	ck_assert_int_eq(mimi_uri_format(&u, buf, sizeof(buf), &e), CW_EINVAL);
	ck_assert_ptr_nonnull(strstr(e.msg, "512"));
	ck_assert_int_eq(mimi_uri_parse(NULL, &u, &e), CW_EINVAL);
}
END_TEST

/* The one fold of an address's part to lower case (peer_local_fold, the
 * XMPP commands' JIDs): ASCII capitals only, up to a stop byte. */
START_TEST(addr_fold_lower_stops_and_keeps_other_bytes)
{
	char a[] = "Alice.O_Neil+1";
	ck_assert(addr_fold_lower(a, NULL));
	ck_assert_str_eq(a, "alice.o_neil+1");
	ck_assert(!addr_fold_lower(a, NULL)); /* nothing left to fold */
	char jid[] = "Bob@XMPP.Test/Phone";
	ck_assert(addr_fold_lower(jid, "@/"));
	ck_assert_str_eq(jid, "bob@XMPP.Test/Phone");
	ck_assert(addr_fold_lower(jid + 4, "/"));
	ck_assert_str_eq(jid, "bob@xmpp.test/Phone");
	char utf8[] = "\xc3\x84Z\xc3\xa9"; /* A-umlaut, Z, e-acute: UTF-8 bytes are no ASCII capitals */
	ck_assert(addr_fold_lower(utf8, ""));
	ck_assert_str_eq(utf8, "\xc3\x84z\xc3\xa9");
	char at_once[] = "/ABC";
	ck_assert(!addr_fold_lower(at_once, "/"));
	ck_assert_str_eq(at_once, "/ABC");
	char empty[] = "";
	ck_assert(!addr_fold_lower(empty, NULL));
}
END_TEST

/* A typed address's scheme and domain in lower case, its path as typed
 * (the XMPP commands' and the Matrix bot's parties). */
START_TEST(mimi_addr_fold_folds_scheme_and_domain_only)
{
	char a[] = "MIMI://WA.Example/u/Wally";
	mimi_addr_fold(a);
	ck_assert_str_eq(a, "mimi://wa.example/u/Wally");
	char jid[] = "Wally@GK.Example";
	mimi_addr_fold(jid); /* no address: left alone */
	ck_assert_str_eq(jid, "Wally@GK.Example");
	char bare[] = "mimi://GK.EXAMPLE";
	mimi_addr_fold(bare);
	ck_assert_str_eq(bare, "mimi://gk.example");
	char shortest[] = "mimi:/";
	mimi_addr_fold(shortest);
	ck_assert_str_eq(shortest, "mimi:/");
}
END_TEST

/* ------------------------------------------------------------ batches */

START_TEST(batch_cases)
{
	static struct ecase cases[64];
	int n = load_cases("event_batch_cases.txt", cases, 64);
	ck_assert_int_ge(n, 10);
	for (int i = 0; i < n; i++) {
		struct ecase *k = &cases[i];
		size_t len;
		char *body = unit_decode(k->body, &len);
		struct batch b;
		struct event_error err;
		cw_err rc = batch_parse(body, len, &k->lim, k->flags, &b, &err);
		if (strcmp(k->code, "ok") == 0) {
			ck_assert_msg(rc == CW_OK, "case '%s': expected ok, got %s '%s': %s", k->name, err.code, err.pointer,
				      err.detail);
			ck_assert_msg(b.n == (size_t)k->nitems, "case '%s': %zu results for %d expected items", k->name,
				      b.n, k->nitems);
			size_t failed = 0;
			for (size_t j = 0; j < b.n; j++) {
				const struct batch_item *it = &b.items[j];
				char code[32], pointer[200];
				parse_expect(k->items[j], code, sizeof(code), pointer, sizeof(pointer));
				if (strcmp(code, "ok") == 0) {
					ck_assert_msg(it->rc == CW_OK, "case '%s' item %zu: expected ok, got %s '%s': %s",
						      k->name, j, it->err.code, it->err.pointer, it->err.detail);
					ck_assert_ptr_nonnull(it->ev.json);
					ck_assert(it->has_room);
					ck_assert(idempotency_key_valid(it->idempotency_key));
					ck_assert_ptr_eq(it->ev.json,
							 json_object_get(json_array_get(json_object_get(b.json, "events"), j),
									 "event"));
					/* The stored text: the event printed compact with sorted keys. */
					char *want = json_dumps(it->ev.json, JSON_COMPACT | JSON_SORT_KEYS);
					ck_assert_ptr_nonnull(it->ev.text);
					ck_assert_str_eq(it->ev.text, want);
					free(want);
				} else {
					ck_assert_msg(it->rc == CW_EINVAL, "case '%s' item %zu: expected %s, got ok",
						      k->name, j, code);
					ck_assert_ptr_null(it->ev.json);
					ck_assert_ptr_null(it->ev.text);
					assert_error(k, it->err.code, it->err.pointer, &it->err, code, pointer);
					failed++;
				}
			}
			ck_assert_uint_eq(b.nfailed, failed);
			run_checks(k, b.n ? &b.items[0].ev : NULL);
			batch_free(&b);
		} else {
			ck_assert_msg(rc == CW_EINVAL, "case '%s': expected %s, got rc %d", k->name, k->code, rc);
			ck_assert_ptr_null(b.items);
			ck_assert_ptr_null(b.json);
			assert_error(k, err.code, err.pointer, &err, k->code, k->pointer);
		}
		free(body);
	}
	free_cases(cases, n);
}
END_TEST

/* A full batch of max_batch items passes; one more is refused as a whole. */
START_TEST(batch_count_boundary)
{
	struct event_limits lim = event_limits_default();
	size_t cap = (lim.max_batch + 1) * 200 + 64, len = 0;
	char *body = malloc(cap);
	ck_assert_ptr_nonnull(body);
	len += (size_t)snprintf(body + len, cap - len, "{\"events\":[");
	for (size_t i = 0; i < lim.max_batch; i++)
		len += (size_t)snprintf(body + len, cap - len,
					"%s{\"idempotency_key\":\"k-%zu\",\"room\":\"mimi://hub.example/r/r%zu\","
					"\"event\":{\"type\":\"message\",\"content\":{\"parts\":[{\"type\":\"text/plain\",\"body\":\"%zu\"}]}}}",
					i ? "," : "", i, i % 7, i);
	size_t before_close = len;
	len += (size_t)snprintf(body + len, cap - len, "]}");
	struct batch b;
	struct event_error err;
	ck_assert_int_eq(batch_parse(body, len, &lim, 0, &b, &err), CW_OK);
	ck_assert_uint_eq(b.n, lim.max_batch);
	ck_assert_uint_eq(b.nfailed, 0);
	ck_assert_str_eq(b.items[255].idempotency_key, "k-255");
	ck_assert_str_eq(b.items[255].room.id, "r3");
	batch_free(&b);

	len = before_close;
	len += (size_t)snprintf(body + len, cap - len,
				",{\"idempotency_key\":\"k-x\",\"room\":\"mimi://hub.example/r/r\",\"event\":{}}]}");
	ck_assert_int_eq(batch_parse(body, len, &lim, 0, &b, &err), CW_EINVAL);
	ck_assert_str_eq(err.code, "too_large");
	ck_assert_str_eq(err.pointer, "/events");
	free(body);
}
END_TEST

/* An item refused for repeating a key names that key in its result (it
 * was empty, answered null, until the thirty-second session), and only a
 * valid item holds its key: an invalid one followed by its corrected
 * copy under the same key leaves the copy valid; a third copy repeats the
 * copy, not the invalid one. */
START_TEST(batch_repeated_keys)
{
	const char *body =
		"{\"events\":["
		"{\"idempotency_key\":\"k\",\"room\":\"mimi://hub.example/r/a\",\"event\":{\"type\":\"poke\"}},"
		"{\"idempotency_key\":\"k\",\"room\":\"mimi://hub.example/r/a\","
		"\"event\":{\"type\":\"typing\",\"content\":{\"state\":\"start\"}}},"
		"{\"idempotency_key\":\"k\",\"room\":\"mimi://hub.example/r/a\","
		"\"event\":{\"type\":\"typing\",\"content\":{\"state\":\"stop\"}}},"
		"{\"idempotency_key\":\"j\",\"room\":\"mimi://hub.example/r/a\","
		"\"event\":{\"type\":\"typing\",\"content\":{\"state\":\"stop\"}}}]}";
	struct event_limits lim = event_limits_default();
	struct batch b;
	struct event_error err;
	ck_assert_int_eq(batch_parse(body, strlen(body), &lim, 0, &b, &err), CW_OK);
	ck_assert_uint_eq(b.n, 4);
	ck_assert_uint_eq(b.nfailed, 2);
	ck_assert_int_eq(b.items[0].rc, CW_EINVAL);
	ck_assert_str_eq(b.items[0].err.pointer, "/events/0/event/type");
	ck_assert_int_eq(b.items[1].rc, CW_OK);
	ck_assert_int_eq(b.items[2].rc, CW_EINVAL);
	ck_assert_str_eq(b.items[2].err.pointer, "/events/2/idempotency_key");
	ck_assert_ptr_nonnull(strstr(b.items[2].err.detail, "repeats the key of item 1 of this batch"));
	ck_assert_int_eq(b.items[3].rc, CW_OK);
	for (size_t i = 0; i < 3; i++)
		ck_assert_str_eq(b.items[i].idempotency_key, "k");
	ck_assert_str_eq(b.items[3].idempotency_key, "j");
	batch_free(&b);
}
END_TEST

/* A peer's event_types as PostgreSQL prints a text[] ("{a,b}"; NULL: all). */
START_TEST(peer_event_types_match_whole_words)
{
	ck_assert(peer_event_type_wanted(NULL, "block"));
	ck_assert(peer_event_type_wanted("{message,block}", "block"));
	ck_assert(peer_event_type_wanted("{message,block}", "message"));
	ck_assert(!peer_event_type_wanted("{message,block}", "typing"));
	ck_assert(!peer_event_type_wanted("{message,blocks}", "block"));  /* whole words only */
	ck_assert(!peer_event_type_wanted("{messages}", "message"));
	ck_assert(!peer_event_type_wanted("{message}", "mess"));
	ck_assert(!peer_event_type_wanted("{}", "message"));
	ck_assert(!peer_event_type_wanted("{message}", ""));
}
END_TEST

START_TEST(label_goes_before_text_only)
{
	json_t *ev = json_loads("{\"type\":\"message\",\"content\":{\"parts\":[{\"type\":\"text/plain\",\"body\":\"hi\"},"
				"{\"type\":\"text/html\",\"body\":\"<b>hi</b>\"}],\"attachments\":[{\"url\":\"https://x\"}]}}",
				0, NULL);
	ck_assert_ptr_nonnull(ev);
	json_t *l = event_label(ev, "bob: ", "<b>bob</b>: ");
	ck_assert_ptr_ne(l, ev); /* a copy: the stored event stays as it is */
	json_t *parts = json_object_get(json_object_get(l, "content"), "parts");
	ck_assert_str_eq(json_string_value(json_object_get(json_array_get(parts, 0), "body")), "bob: hi");
	ck_assert_str_eq(json_string_value(json_object_get(json_array_get(parts, 1), "body")), "<b>bob</b>: <b>hi</b>");
	parts = json_object_get(json_object_get(ev, "content"), "parts");
	ck_assert_str_eq(json_string_value(json_object_get(json_array_get(parts, 0), "body")), "hi");
	json_decref(l);
	json_decref(ev);
	/* A reaction's part is its emoji, a receipt has none: nothing to label. */
	static const char *const same[] = {
		"{\"type\":\"reaction\",\"content\":{\"parts\":[{\"type\":\"text/plain\",\"body\":\"+1\"}]}}",
		"{\"type\":\"receipt\",\"content\":{}}",
		"{\"type\":\"message\",\"content\":{\"parts\":[]}}",
	};
	for (size_t i = 0; i < sizeof(same) / sizeof(same[0]); i++) {
		ev = json_loads(same[i], 0, NULL);
		ck_assert_ptr_nonnull(ev);
		l = event_label(ev, "bob: ", "<b>bob</b>: ");
		ck_assert_ptr_eq(l, ev);
		json_decref(l);
		json_decref(ev);
	}
	ev = json_loads("{\"type\":\"edit\",\"content\":{\"parts\":[{\"type\":\"text/markdown\",\"body\":\"*x*\"}]}}", 0, NULL);
	l = event_label(ev, "bob: ", "<b>bob</b>: ");
	ck_assert_str_eq(json_string_value(json_object_get(json_array_get(json_object_get(json_object_get(l, "content"),
		"parts"), 0), "body")), "bob: *x*");
	json_decref(l);
	json_decref(ev);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("event");
	TCase *tc = tcase_create("event");
	tcase_add_test(tc, event_cases);
	tcase_add_test(tc, event_size_boundary);
	tcase_add_test(tc, from_json_agrees_with_parse);
	tcase_add_test(tc, event_mutations_never_crash);
	tcase_add_test(tc, pointer_escaping_and_truncation);
	tcase_add_test(tc, defaults_and_free);
	tcase_add_test(tc, identifier_cases);
	tcase_add_test(tc, uri_format_refuses_bad_components);
	tcase_add_test(tc, addr_fold_lower_stops_and_keeps_other_bytes);
	tcase_add_test(tc, mimi_addr_fold_folds_scheme_and_domain_only);
	tcase_add_test(tc, batch_cases);
	tcase_add_test(tc, batch_count_boundary);
	tcase_add_test(tc, batch_repeated_keys);
	tcase_add_test(tc, peer_event_types_match_whole_words);
	tcase_add_test(tc, label_goes_before_text_only);
	tcase_add_test(tc, stored_event_content_type_taken_as_at_arrival);
	tcase_add_test(tc, media_type_valid_is_the_peer_apis_content_type);
	suite_add_tcase(s, tc);
	return unit_run(s);
}
