/* The bot's commands as a local user writes them in her management room
 * ("accept @x", "block ...", "report <who> <reason>", "list", "help"), read
 * from an m.room.message's content.  Pure code: no I/O, no database, no
 * homeserver; safe from any thread (mx_mentions parses HTML with libxml2).
 * The bot (mx_bot.c) acts on what mx_bot_parse reads and answers; the
 * fuzz target tests/fuzz/fuzz_matrix_bot.c and check_matrix hold it to
 * what is said here. */
#ifndef CW_MX_CMD_H
#define CW_MX_CMD_H

#include <jansson.h>
#include <stdbool.h>

#define MX_BOT_VERB_MAX 31    /* bytes of a verb; a longer first word is none */
#define MX_BOT_PARTY_MAX 699  /* bytes of a typed party; a longer word is none */
#define MX_BOT_REASON_MAX 1000 /* bytes of a report's reason (the rest of its line), at most */
#define MX_BOT_EVENT_ID_MAX 255 /* bytes of an event id (the specification's bound) */

/* The line of the bot's notice of a consent request that names its party
 * (twice, the same address): what the bot writes (mx_bot.c, requests) and
 * mx_bot_request_party reads back. */
#define MX_BOT_REQUEST_LINE "Reply \"accept %s\" or \"block %s\"."

/* What the reading needs to know of the bot's homeserver. */
struct mx_bot_names {
	const char *bot;    /* the bot's user id */
	const char *server; /* this homeserver's name (mx_server_name) */
	const char *prefix; /* the ghosts' localpart prefix (mx_user_prefix) */
};

/* What the party of an accept, block or report is. */
enum mx_bot_party {
	MX_BOT_PARTY_SUBJECT,    /* party: to be looked up as a consent's subject (an address, a ghost's id, a
				  * domain, or words that are none of these; "" when none was given) */
	MX_BOT_PARTY_LOCAL,      /* party: a Matrix id of a user of this server (not the bot, no ghost), of a
				  * report */
	MX_BOT_PARTY_NOT_REMOTE, /* party: a Matrix id no command is about: of another server, or of this one
				  * for an accept or block, not a ghost's (the same whether she exists or not) */
	MX_BOT_PARTY_SEVERAL,    /* the message mentions more than one user (party ""): none is picked */
	MX_BOT_PARTY_BOT,        /* party: the bot's own id, typed, or its pill where the party goes (no
				  * one another network's: the gateway's bot) */
};

/* A command read. */
struct mx_bot_cmd {
	/* Whether the message is text (msgtype m.text, or none): only text is
	 * a command.  False for an image, a file, an emote, a location or any
	 * other msgtype (of an edit: its m.new_content's), and then nothing
	 * else of *out is read (verb, party, reason ""): the bot says in a
	 * line that it reads text only (until the forty-seventh session it
	 * read such a message's body as a command, and an image sent to it
	 * got the help). */
	bool text;
	char verb[MX_BOT_VERB_MAX + 1]; /* the first word, in lower case (ASCII); "" for none or a longer one */
	/* The word after the verb (of opt-in, opt-out: the network, in lower
	 * case, ASCII), "" for none or a longer one; of an accept, block or
	 * report whose message mentions one user (other than the bot and the
	 * sender) her id.  Words are separated by white space of any kind
	 * and zero-width characters (cw_utf8_space_at: U+00A0, U+3000 and
	 * U+200B as much as a space or a tab). */
	char party[MX_BOT_PARTY_MAX + 1];
	enum mx_bot_party kind;           /* MX_BOT_PARTY_SUBJECT but for an accept, block or report */
	bool mentioned;                   /* party is the user the message mentions */
	char reason[MX_BOT_REASON_MAX + 1]; /* of a report: what follows the party on its line, without the
					     * white space around it, whole UTF-8 sequences; "" for none */
	/* The event the message replies to (m.relates_to's m.in_reply_to
	 * event_id: a string of 1 to MX_BOT_EVENT_ID_MAX bytes starting with
	 * '$', no control character), "" for none: of an accept or block with
	 * no party, the bot's notice of the request it answers, maybe
	 * (mx_bot_request_party); of a report, the message it is about,
	 * maybe (policy_report_store takes it first as evidence if it is one
	 * of the party's delivered to her). */
	char reply_to[MX_BOT_EVENT_ID_MAX + 1];
};

/* Reads the command that sender (a Matrix id) sends the bot as content
 * (an m.room.message's), into *out.  The text read is the body, after a
 * reply's quote fallback (mx_reply_fallback_len); of an edit (m.relates_to
 * rel_type m.replace) the edited content, m.new_content.  The party of an
 * accept, block or report is the one user the message mentions, if any
 * (mx_mentions: a client's "pill" puts her display name in body and her
 * id only in formatted_body and m.mentions; the bot and the sender are
 * none, a reply mentions whom it answers), else the word typed after the
 * verb; a report's reason is the rest of the line after the party as
 * typed, after the pill's text (its label) or her id typed, each as a
 * whole word (followed by the end, a blank or a ':', which is skipped);
 * with a mention the text does not show as a whole word (m.mentions
 * alone), all of the line after the verb.  The bot's own id typed, or
 * its pill as the party, is MX_BOT_PARTY_BOT.  False, *out undefined, when the content has no command
 * to answer: no string body, or an edit without an m.new_content object
 * with one (until the thirty-eighth session the edit's fallback body
 * "* block ..." was read, and every edit got the help), or an m.notice
 * (msgtype of content or of the edit's m.new_content: the specification
 * says a notice must never be automatically responded to, the bot's own
 * included).  True with out->text false for a message of another
 * msgtype than m.text (above). */
bool mx_bot_parse(const json_t *content, const char *sender, const struct mx_bot_names *names,
		  struct mx_bot_cmd *out);

/* The party of the consent request whose notice the bot wrote as body
 * (its line MX_BOT_REQUEST_LINE, at a line's start, the same address
 * twice, one word of at most MX_BOT_PARTY_MAX bytes), into out (len bytes):
 * true; false for any other text (another notice of the bot's: an
 * expiry, an answer).  The line is found only at a line's start: the
 * notice's first line holds the remote user's name, with its line breaks
 * made spaces (mx_bot.c, name_for_line), so no name can make one. */
bool mx_bot_request_party(const char *body, char *out, size_t len);

#endif
