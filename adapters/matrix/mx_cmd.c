/* The bot's commands read from a message's content (mx_cmd.h). */
#include "config.h"
#include "matrix/mx_cmd.h"
#include "matrix/mx_id.h"
#include "matrix/mx_map.h"
#include "utf8.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

/* The words of a command are separated by white space of any kind and
 * zero-width characters (cw_utf8_space_at: a no-break space, an
 * ideographic space, a tab, a zero-width space as much as a space). */
static const char *skip_blanks(const char *p)
{
	for (size_t l; (l = cw_utf8_space_at(p));)
		p += l;
	return p;
}

static const char *skip_word(const char *p)
{
	while (*p && !cw_utf8_space_at(p))
		p++;
	return p;
}

/* The word at p (blanks before it skipped) into out, "" when it does not
 * fit: a word cut would be another word (a longer address cut to one that
 * parses).  Returns where the word ends. */
static const char *word(const char *p, char *out, size_t outlen)
{
	p = skip_blanks(p);
	const char *end = skip_word(p);
	size_t n = (size_t)(end - p);
	if (n >= outlen)
		n = 0;
	memcpy(out, p, n);
	out[n] = '\0';
	return end;
}

/* A report's reason: the rest of the line at after (the white space
 * around it left out), whole UTF-8 sequences, at most restlen - 1 bytes.  Until the
 * thirty-eighth session a typed reason was cut at 299 bytes, in the
 * middle of a character if it fell there: the database refused the
 * invalid text, and the report could not be stored however often the
 * user sent it (a review's finding). */
static void reason_of(const char *after, char *rest, size_t restlen)
{
	after = skip_blanks(after);
	size_t k = 0, left = strlen(after);
	while (k < left && after[k] != '\n' && after[k] != '\r') {
		size_t l = cw_utf8_seq((const unsigned char *)after + k, left - k, NULL);
		if (l == 0 || k + l >= restlen)
			break;
		k += l;
	}
	memcpy(rest, after, k);
	rest[k] = '\0';
	cw_utf8_trim(rest); /* its start has none: the end */
}

/* Where the party's text ends in typed, the text after the verb, when it
 * starts with text (a pill's label or an id) as a whole word: followed by
 * its end, a blank or ':' (a client writes "Wally: " for a pill at the
 * start of a line; the ':' is skipped); else NULL.  Until the fortieth
 * session a byte prefix matched: the label "Wal" against "Wally spams"
 * left the reason "ly spams". */
static const char *after_word(const char *typed, const char *text)
{
	size_t n = strlen(text);
	if (!n || strncmp(typed, text, n) != 0)
		return NULL;
	if (typed[n] == ':')
		return typed + n + 1;
	return !typed[n] || cw_utf8_space_at(typed + n) ? typed + n : NULL;
}

/* Whether who is a Matrix id of a user of this homeserver: not the bot,
 * not in the ghosts' namespace. */
static bool local_matrix_user(const struct mx_bot_names *names, const char *who)
{
	char server[MX_ID_MAX + 1];
	return mx_user_id_parse(who, NULL, 0, server, sizeof(server)) && strcmp(server, names->server) == 0 &&
	       strcmp(who, names->bot) != 0 && !mx_in_ghost_namespace(names->prefix, names->server, who);
}

/* Whether content is an m.notice: the Client-Server API says one "must
 * never be automatically responded to" (two automated clients would
 * answer each other for ever).  Until the forty-fourth session the bot
 * answered one as any command. */
static bool is_notice(const json_t *content)
{
	const char *t = json_string_value(json_object_get(content, "msgtype"));
	return t && strcmp(t, "m.notice") == 0;
}

bool mx_bot_parse(const json_t *content, const char *sender, const struct mx_bot_names *names,
		  struct mx_bot_cmd *out)
{
	const json_t *rel = json_object_get(content, "m.relates_to");
	const char *rel_type = json_string_value(json_object_get(rel, "rel_type"));
	if (is_notice(content))
		return false;
	if (rel_type && strcmp(rel_type, "m.replace") == 0) {
		content = json_object_get(content, "m.new_content");
		if (!json_is_object(content) || is_notice(content))
			return false;
	}
	const char *body = json_string_value(json_object_get(content, "body"));
	if (!body)
		return false;
	/* Text only: an image's body is its caption or file name, an emote's
	 * an action ("/me waves"), neither a command to carry out. */
	const json_t *msgtype = json_object_get(content, "msgtype");
	out->text = !msgtype || (json_is_string(msgtype) && strcmp(json_string_value(msgtype), "m.text") == 0);
	out->kind = MX_BOT_PARTY_SUBJECT;
	out->mentioned = false;
	out->reply_to[0] = '\0';
	if (!out->text) {
		out->verb[0] = out->party[0] = out->reason[0] = '\0';
		return true;
	}
	const char *to = json_string_value(json_object_get(json_object_get(rel, "m.in_reply_to"), "event_id"));
	if (to && to[0] == '$' && strlen(to) <= MX_BOT_EVENT_ID_MAX) {
		bool clean = true;
		for (const char *p = to; *p && clean; p++)
			clean = (unsigned char)*p > 0x20 && *p != 0x7f;
		if (clean)
			strcpy(out->reply_to, to);
	}
	/* A reply (to a consent request, say) may start with the quote of
	 * what it answers. */
	body += mx_reply_fallback_len(body);
	const char *typed = skip_blanks(word(body, out->verb, sizeof(out->verb))); /* the text after the verb */
	for (char *p = out->verb; *p; p++)
		*p = (char)tolower((unsigned char)*p);
	const char *after = word(typed, out->party, sizeof(out->party)); /* a report's reason: after the party */
	/* A network is a peer's name ([a-z0-9][a-z0-9_-]*, "peer:" before it
	 * or not): lower case by definition, so "opt-in GK" is for gk (until
	 * the forty-second session "I know no network GK"). */
	if (strcmp(out->verb, "opt-in") == 0 || strcmp(out->verb, "opt-out") == 0)
		for (char *p = out->party; *p; p++)
			*p = (char)tolower((unsigned char)*p);
	reason_of(after, out->reason, sizeof(out->reason));
	bool report = strcmp(out->verb, "report") == 0;
	if (!report && strcmp(out->verb, "accept") != 0 && strcmp(out->verb, "block") != 0)
		return true;

	const char *skip[] = { names->bot, sender, NULL };
	struct mx_mention men[2];
	size_t n = mx_mentions(content, skip, men, 2);
	if (n > 1) {
		out->kind = MX_BOT_PARTY_SEVERAL;
		out->party[0] = '\0';
		return true;
	}
	if (n == 1) {
		out->mentioned = true;
		snprintf(out->party, sizeof(out->party), "%s", men[0].user_id);
		/* The reason is what follows the name the client wrote for her
		 * (or her id, typed); a mention the text does not show
		 * (m.mentions alone) leaves all of the line the reason. */
		const char *a = after_word(typed, men[0].label);
		if (!a)
			a = after_word(typed, men[0].user_id);
		reason_of(a ? a : typed, out->reason, sizeof(out->reason));
	} else {
		/* The bot itself, its id typed or its pill (mx_mentions skips
		 * it: a mention of the bot is no party, but a pill of it where
		 * the party goes names it). */
		const char *only_sender[] = { sender, NULL };
		n = mx_mentions(content, only_sender, men, 2);
		for (size_t i = 0; i < n && i < 2 && strcmp(out->party, names->bot) != 0; i++) {
			const char *a = strcmp(men[i].user_id, names->bot) == 0 ? after_word(typed, men[i].label) : NULL;
			if (a) {
				snprintf(out->party, sizeof(out->party), "%s", names->bot);
				out->mentioned = true;
				reason_of(a, out->reason, sizeof(out->reason));
			}
		}
		if (strcmp(out->party, names->bot) == 0) {
			out->kind = MX_BOT_PARTY_BOT;
			return true;
		}
	}
	/* A Matrix user, mentioned or typed, whom no consent is about; a
	 * report may name one of this server's (another member of a group,
	 * whose words the bot relays). */
	if (mx_user_id_parse(out->party, NULL, 0, NULL, 0) &&
	    !mx_in_ghost_namespace(names->prefix, names->server, out->party))
		out->kind = report && local_matrix_user(names, out->party) ? MX_BOT_PARTY_LOCAL : MX_BOT_PARTY_NOT_REMOTE;
	return true;
}

bool mx_bot_request_party(const char *body, char *out, size_t len)
{
	static const char start[] = "Reply \"accept ";
	for (const char *line = body; line; line = strchr(line, '\n'), line = line ? line + 1 : NULL) {
		if (strncmp(line, start, sizeof(start) - 1) != 0)
			continue;
		const char *who = line + sizeof(start) - 1, *end = skip_word(who);
		size_t n = (size_t)(end - who);
		if (n < 2 || who[n - 1] != '"' || n - 1 > MX_BOT_PARTY_MAX || n - 1 >= len)
			return false;
		char party[MX_BOT_PARTY_MAX + 1], want[2 * MX_BOT_PARTY_MAX + 64];
		memcpy(party, who, n - 1);
		party[n - 1] = '\0';
		if (strchr(party, '"'))
			return false;
		snprintf(want, sizeof(want), MX_BOT_REQUEST_LINE, party, party);
		size_t wl = strlen(want);
		if (strncmp(line, want, wl) != 0 || (line[wl] && line[wl] != '\n'))
			return false;
		memcpy(out, party, n); /* its '\0' */
		return true;
	}
	return false;
}
