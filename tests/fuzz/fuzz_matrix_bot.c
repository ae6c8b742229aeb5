/* libFuzzer target: a command a local user sends the bot in her management
 * room, as the bot reads it (adapters/matrix/mx_cmd.h: mx_bot_parse; an
 * edit's m.new_content, a reply's quote fallback, mentions in
 * formatted_body and m.mentions).  The input is an m.room.message's
 * content (JSON, read as the bot reads its inbox row), or, when it is no
 * JSON object, its bytes as the body (up to a NUL, invalid UTF-8 made
 * U+FFFD: a JSON string is UTF-8).  Properties: nothing crashes or leaks;
 * the verb is one word in lower case; the party and the reason are valid
 * UTF-8 within their bounds; the party typed is one word (no white space
 * of any kind, cw_utf8_space_at), of an opt-in or opt-out in lower case, the one
 * mentioned a valid user id, not the sender, the bot only as the bot's
 * kind (the bot's id as a party is always that kind); the reason is
 * one line without white space around it; only an accept, block or report has a
 * party of a kind other than a subject, only a report one of this
 * server's users; the same content reads the same twice. */
#include "config.h"
#include "matrix/mx_cmd.h"
#include "matrix/mx_id.h"
#include "utf8.h"

#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char sender[] = "@alice:example.org";
static const struct mx_bot_names names = { .bot = "@_cw_bot:example.org", .server = "example.org",
					   .prefix = "_cw_" };

static void fail(const char *what, const struct mx_bot_cmd *cmd)
{
	fprintf(stderr, "%s: verb \"%s\" party \"%s\" kind %d mentioned %d reason \"%s\"\n", what, cmd->verb,
		cmd->party, (int)cmd->kind, cmd->mentioned, cmd->reason);
	abort();
}

/* Whether s holds white space of any kind (cw_utf8_space_at). */
static bool has_blank(const char *s)
{
	for (; *s; s++)
		if (cw_utf8_space_at(s))
			return true;
	return false;
}

/* Whether s (valid UTF-8) ends with white space. */
static bool ends_blank(const char *s)
{
	size_t n = strlen(s), k = n;
	while (k > 0 && ((unsigned char)s[k - 1] & 0xC0) == 0x80)
		k--;
	return n && k > 0 && cw_utf8_space_at(s + k - 1);
}

static void check(const struct mx_bot_cmd *cmd)
{
	size_t vl = strnlen(cmd->verb, sizeof(cmd->verb)), pl = strnlen(cmd->party, sizeof(cmd->party)),
	       rl = strnlen(cmd->reason, sizeof(cmd->reason));
	if (vl > MX_BOT_VERB_MAX || pl > MX_BOT_PARTY_MAX || rl > MX_BOT_REASON_MAX)
		fail("not NUL-terminated within its bound", cmd);
	if (!cw_utf8_valid(cmd->verb, vl) || !cw_utf8_valid(cmd->party, pl) || !cw_utf8_valid(cmd->reason, rl))
		fail("not valid UTF-8", cmd);
	for (const char *p = cmd->verb; *p; p++)
		if (isupper((unsigned char)*p))
			fail("the verb is not in lower case", cmd);
	if (strcmp(cmd->verb, "opt-in") == 0 || strcmp(cmd->verb, "opt-out") == 0)
		for (const char *p = cmd->party; *p; p++)
			if (isupper((unsigned char)*p))
				fail("the network is not in lower case", cmd);
	if (has_blank(cmd->verb) || (!cmd->mentioned && has_blank(cmd->party)))
		fail("the verb or the party typed is more than one word", cmd);
	if (strchr(cmd->reason, '\n') || strchr(cmd->reason, '\r') || cw_utf8_space_at(cmd->reason) ||
	    ends_blank(cmd->reason))
		fail("the reason is not one trimmed line", cmd);
	bool report = strcmp(cmd->verb, "report") == 0;
	bool party_verb = report || strcmp(cmd->verb, "accept") == 0 || strcmp(cmd->verb, "block") == 0;
	switch (cmd->kind) {
	case MX_BOT_PARTY_SUBJECT:
		break;
	case MX_BOT_PARTY_SEVERAL:
		if (!party_verb || cmd->party[0] || cmd->mentioned)
			fail("several mentioned, but a party or no command with one", cmd);
		break;
	case MX_BOT_PARTY_LOCAL:
		if (!report)
			fail("a user of this server as the party of no report", cmd);
		/* fall through */
	case MX_BOT_PARTY_NOT_REMOTE:
		if (!party_verb || !mx_user_id_parse(cmd->party, NULL, 0, NULL, 0) ||
		    mx_in_ghost_namespace(names.prefix, names.server, cmd->party))
			fail("a Matrix user's party that is none", cmd);
		break;
	case MX_BOT_PARTY_BOT:
		if (!party_verb || strcmp(cmd->party, names.bot) != 0)
			fail("the bot as the party, but another or no command with one", cmd);
		break;
	default:
		fail("no kind of party", cmd);
	}
	if (cmd->kind != MX_BOT_PARTY_BOT && strcmp(cmd->party, names.bot) == 0 && party_verb)
		fail("the bot's id as a party of another kind", cmd);
	if (cmd->mentioned && (!party_verb || !mx_user_id_parse(cmd->party, NULL, 0, NULL, 0) ||
			       (strcmp(cmd->party, names.bot) == 0) != (cmd->kind == MX_BOT_PARTY_BOT) ||
			       strcmp(cmd->party, sender) == 0))
		fail("the mentioned party is no user id, or the sender, or the bot of another kind", cmd);
}

static void parse(const json_t *content)
{
	struct mx_bot_cmd a, b;
	memset(&a, 0x55, sizeof(a));
	memset(&b, 0xaa, sizeof(b));
	bool ok = mx_bot_parse(content, sender, &names, &a);
	if (ok != mx_bot_parse(content, sender, &names, &b))
		abort();
	if (!ok)
		return;
	check(&a);
	if (!a.text && (a.verb[0] || a.party[0] || a.reason[0] || a.mentioned))
		fail("a message that is no text read as a command", &a);
	if (a.text != b.text || strcmp(a.verb, b.verb) != 0 || strcmp(a.party, b.party) != 0 || a.kind != b.kind ||
	    a.mentioned != b.mentioned || strcmp(a.reason, b.reason) != 0)
		fail("read differently the second time", &a);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_t *content = json_loadb((const char *)data, size, 0, NULL);
	if (json_is_object(content)) {
		parse(content);
		json_decref(content);
		return 0;
	}
	json_decref(content);
	char *text = malloc(size + 1);
	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	char *body = cw_utf8_scrub(text);
	free(text);
	content = body ? json_pack("{s:s}", "body", body) : NULL;
	free(body);
	if (content)
		parse(content);
	json_decref(content);
	return 0;
}
