/* XMPP <message/> stanzas <-> neutral events (../shared/spec/adapters.md,
 * xmpp; the neutral bodies are those event_parse() in peer/event.h accepts).
 * Pure code: no I/O, no database, no clock (the caller passes the time);
 * stanzas are libstrophe's (xmpp_stanza_t), built and read through its API,
 * never as hand-made XML.  What the mapping needs from storage comes from
 * the caller (lookups in, target descriptions out).
 *
 * Namespaces: XEP-0461 replies urn:xmpp:reply:0; XEP-0428 fallback
 * urn:xmpp:fallback:0; XEP-0308 corrections urn:xmpp:message-correct:0;
 * XEP-0424 retraction urn:xmpp:message-retract:1 (<retract id=.../>) and, read
 * only, the older urn:xmpp:message-retract:0 inside XEP-0422
 * <apply-to xmlns='urn:xmpp:fasten:0' id=...>; XEP-0444 reactions
 * urn:xmpp:reactions:0; XEP-0184 receipts urn:xmpp:receipts; XEP-0333 markers
 * urn:xmpp:chat-markers:0; XEP-0085 chat states
 * http://jabber.org/protocol/chatstates; XEP-0359 origin-id urn:xmpp:sid:0;
 * XEP-0066 OOB jabber:x:oob; XEP-0334 hints urn:xmpp:hints.
 *
 * XMPP -> neutral (xm_to_neutral), a <message/> of type chat or normal (or
 * none, or a type it does not know, which RFC 6121 section 5.2.2 says to
 * treat as normal) from a local user to a remote user's JID, or of type
 * groupchat to a group's room (the caller checks which); the output is
 * an array of neutral bodies {"type", "ts", "content"} (no "sender", no
 * "room": the caller adds them; "ts" only when 0 < ts < 2^53), in the order
 * they are to be submitted:
 *
 *   <retract id=X/> (either form)  delete, replaces to_msg(X); the new form
 *                                  is tried first, then the XEP-0422 one;
 *                                  unknown: nothing (the retraction's
 *                                  fallback body is never a message)
 *   <reactions id=X>               the sender's whole set for X: the
 *                                  difference from reactions(to_msg(X)):
 *                                  a reaction event per new key, in stanza
 *                                  order
 *                                  {"parts":[{"type":"text/plain","body":key}],
 *                                   "disposition":"reaction","in_reply_to":msg},
 *                                  then a delete per key no longer in the set
 *                                  (replaces: that reaction's msg id), sorted
 *                                  by key (strcmp; stored values that are not
 *                                  msg ids are skipped); keys empty, over 64
 *                                  bytes or repeated are skipped, at most 32
 *                                  <reaction> elements are read; no
 *                                  difference (the same set again):
 *                                  XM_IN_IGNORE; unknown X: nothing
 *   <replace id=X/> + <body>       edit, replaces to_msg(X), parts from the
 *                                  body (a reply fallback removed as below,
 *                                  no in_reply_to); unknown X: a message
 *                                  with the body; no body: nothing
 *   <body>                         message, parts [text/plain body]; with
 *                                  <reply id=X> known: in_reply_to and the
 *                                  XEP-0428 fallback for urn:xmpp:reply:0
 *                                  removed (its <body start= end=/> count
 *                                  Unicode code points, end excluded; no
 *                                  start/end, or a <fallback/> without
 *                                  children: the whole body; several ranges
 *                                  are all removed; one invalid range (not
 *                                  decimal, start > end, end beyond the
 *                                  body, only one of the two): the fallback
 *                                  is ignored and the body kept whole; so is
 *                                  it when nothing would remain); unknown X:
 *                                  the body as it is, no in_reply_to.  With
 *                                  <x xmlns='jabber:x:oob'><url>https://...:
 *                                  "attachments":[{"content_type":
 *                                  "application/octet-stream","url":...}]
 *                                  (no size: unknown; it was 0 until the
 *                                  thirty-second session); only https URLs that
 *                                  event_parse accepts, at most 2048 bytes,
 *                                  white space around them trimmed; at most
 *                                  8 <x> read, a repeated URL once); a body
 *                                  that is only that URL stays the text; OOB
 *                                  without a body: attachments only
 *   <received id=X/> (0184)        receipt {"receipt":"delivered","in_reply_to"}
 *   <displayed id=X/> (0333)       receipt {"receipt":"read","in_reply_to"}
 *                                  (receipts and markers with unknown X:
 *                                  nothing; <acknowledged/> is read too,
 *                                  the 0333 <received/> delivered; in
 *                                  document order, at most 8 elements read,
 *                                  the same kind for the same message once)
 *   chat state alone               typing: composing -> {"state":"start"};
 *                                  paused, active, inactive, gone ->
 *                                  {"state":"stop"} (the first one); a chat
 *                                  state in a stanza that has a <body>
 *                                  (even empty), a retraction, <reactions>,
 *                                  <replace>, OOB, a receipt or a marker
 *                                  (known or not) is dropped
 *
 * At most one of retract / reactions / body-message (edit or message) is
 * taken from one stanza (in that order, by the presence of the element);
 * receipts and markers come after it.  The body is the first <body> child
 * in the stanza's own namespace (jabber:client, jabber:server,
 * jabber:component:accept or none); an empty one counts as none.  X is
 * matched by the caller against both ids it stored for each message of the
 * conversation (id and origin-id); to_msg is only asked for ids of 1 to
 * XM_ID_MAX bytes of UTF-8 without control characters (others are unknown),
 * and an answer that is not a msg id is taken as unknown.  Extension
 * children without an xmlns of their own (<reaction>, <url>, the
 * fallback's <body>) inherit their parent's.
 *
 * Results: a body over 16 KiB (16384 bytes, the neutral model's limit), or
 * an event whose JSON would not leave room for the envelope within the
 * API's 64 KiB, is XM_IN_TOO_LONG (why is a sentence for the user: the
 * adapter answers not-acceptable with it, docs/xmpp.md "Errors"); one that
 * is not valid UTF-8 after libstrophe is XM_IN_INVALID, and so is anything
 * that is not a <message/>.  A <message/> of type error (the caller handles
 * those) or headline is XM_IN_IGNORE, and so is a stanza from
 * which nothing above comes (only unknown elements, unknown references,
 * an unchanged reaction set).
 *
 * Neutral -> XMPP (xm_from_neutral): one <message type="chat" from to id/>,
 * where id is info->id for every kind (from and to must be JIDs xj_split()
 * accepts and id an id as above, else XM_OUT_INVALID; a target whose id is
 * not one is unknown, an origin_id that is not one is not used):
 *
 *   message    <body> from the text/plain part, else text/markdown, else the
 *              text of text/html as plain text (libxml2's HTML parser: line
 *              breaks, list markers, link targets; docs/xmpp.md "Mapping");
 *              <origin-id id=info->id/>,
 *              <request xmlns='urn:xmpp:receipts'/>, <markable/>,
 *              <active/>; in_reply_to present and target known:
 *              <reply xmlns='urn:xmpp:reply:0'
 *              id=target's origin-id (or id) to=target.author (when
 *              given: XEP-0461 §3 says SHOULD)/>, and when target.content
 *              has text (chosen as above: what its own body showed) a
 *              "> " quote of its first 200 bytes (cut on a UTF-8 boundary,
 *              "…" marking the cut; every line starts with "> ", white space
 *              at the end dropped, a line feed after it; no quote when
 *              nothing remains) prepended, marked by <fallback
 *              for='urn:xmpp:reply:0'><body start='0' end='N'/></fallback>
 *              (N in code points, the line feed included); the first
 *              attachment as <x xmlns='jabber:x:oob'><url>, its url also the
 *              body when there is no text; other attachments listed in the
 *              body, one "url" per line (attachments without a url are
 *              skipped); no text and no attachment: XM_OUT_INVALID
 *   edit       target known and target.is_last: <replace id=target.id/> and
 *              the new body (+ origin-id, markable, receipt request; no
 *              chat state); older or unknown target: a message whose body
 *              is "Correction: " + the new text, as a reply to the target
 *              when known (with the quote and fallback as above).
 *              Attachments of an edit are not sent; no replaces or no text:
 *              XM_OUT_INVALID
 *   delete     target.is_reaction: a <reactions id=reacted's origin-id (or
 *              id)> stanza with info->reaction_set (possibly empty or NULL)
 *              and <store xmlns='urn:xmpp:hints'/> (reacted unknown:
 *              XM_OUT_NONE); otherwise target known:
 *              <retract xmlns='urn:xmpp:message-retract:1' id=target.id/>,
 *              <fallback xmlns='urn:xmpp:fallback:0'
 *              for='urn:xmpp:message-retract:1'/>, a body saying the sender
 *              retracted a message, and <store/>; unknown: XM_OUT_NONE
 *   reaction   reacted known: <reactions id=reacted's origin-id (or id)>
 *              with every key of info->reaction_set, and <store/>; the
 *              event's own key is added when the set lacks it; keys are the
 *              strings of 1-64 bytes, each once, at most 32; unknown:
 *              XM_OUT_NONE; no in_reply_to or no part: XM_OUT_INVALID
 *   receipt    delivered: <received xmlns='urn:xmpp:receipts' id=target.id/>;
 *              read: <displayed xmlns='urn:xmpp:chat-markers:0' id=target.id/>;
 *              unknown: XM_OUT_NONE
 *   typing     start <composing/>, stop <active/>, with
 *              <no-store xmlns='urn:xmpp:hints'/>
 *   membership, block: XM_OUT_NONE; another type: XM_OUT_INVALID
 *
 * Every text written (bodies, quotes, reaction keys, urls) is made fit for
 * XML 1.0: invalid UTF-8, control characters other than tab and line feed,
 * U+FFFE and U+FFFF become U+FFFD, and CR LF or a lone CR a line feed (what
 * a parser on the other side would make of them, so that the fallback
 * offsets stay right).  content.topic is the message's XEP-0201 <thread>
 * both ways (a message's only: a correction's thread is not read, and an
 * inbound thread that is empty, over EVENT_TOPIC_MAX bytes or not UTF-8 is
 * left out).  Content members the mapping does not name (expires,
 * extensions) are not carried.  The same input always gives the
 * same stanza.
 */
#ifndef CW_XM_H
#define CW_XM_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <strophe.h>

#define XM_ID_MAX 255 /* bytes of a stanza id / origin-id the adapter stores */

/* The ids of a message: its id attribute and its XEP-0359 origin-id (each
 * "" when absent, longer than XM_ID_MAX, or not UTF-8 without control
 * characters).  msg may be NULL (both ""). */
void xm_message_ids(xmpp_stanza_t *msg, char id[XM_ID_MAX + 1], char origin_id[XM_ID_MAX + 1]);

/* The XMPP ids the message refers to (retraction in either form,
 * reactions, correction, reply, then receipts and markers in document
 * order: the first 8 of those elements), deduplicated, for a batch lookup
 * by the caller before xm_to_neutral().  ids[] point into the stanza.
 * Returns how many (at most max); ids that are not ids as xm_message_ids()
 * keeps them are not listed. */
size_t xm_message_refs(xmpp_stanza_t *msg, const char **ids, size_t max);

struct xm_in_lookup {
	/* An XMPP id of this conversation (a message's id or origin-id) -> its
	 * neutral message id ("msg_..."), or NULL. */
	const char *(*to_msg)(void *ctx, const char *xmpp_id);
	/* The sender's current reactions to a neutral message: a JSON object
	 * {key: the reaction event's msg id}, or NULL for none.  Borrowed.
	 * Either function may be NULL (then nothing is known / stored). */
	const json_t *(*reactions)(void *ctx, const char *msg_id);
	void *ctx;
};

enum xm_in_result {
	XM_IN_OK,       /* *out: an array of 1 or more neutral bodies */
	XM_IN_IGNORE,   /* nothing to carry (why says what) */
	XM_IN_INVALID,  /* malformed (why says what) */
	XM_IN_TOO_LONG, /* over the neutral model's limits (why says which) */
};

/* One <message/> of a local user to neutral bodies (see above).  ts is the
 * "ts" of every output event.  l may be NULL (every reference unknown).  On
 * XM_IN_OK *out is a new array (the caller decrefs it); otherwise NULL.
 * why (may be NULL) says why, in English, without the stanza's data.  Out
 * of memory is XM_IN_INVALID ("out of memory"). */
enum xm_in_result xm_to_neutral(xmpp_stanza_t *msg, const struct xm_in_lookup *l, int64_t ts, json_t **out,
				char *why, size_t whylen);

/* A message the outbound event refers to, as the caller found it. */
struct xm_target {
	bool known;
	const char *id;         /* its XMPP id in this conversation */
	const char *origin_id;  /* its origin-id, or NULL (then id stands for it) */
	bool is_last;           /* the last message of its sender in the conversation */
	const json_t *content;  /* its neutral content ({"parts": ...}), or NULL:
				   a quote shows its text as its own body did */
	bool is_reaction;       /* (delete) the target is a reaction event */
	const char *author;     /* its sender's JID (bare in 1:1, room/nick in a
				   group): a reply's "to", or NULL */
};

struct xm_out_info {
	const char *from;          /* the remote user's JID (escaped localpart @ component) */
	const char *to;            /* the local user's bare JID */
	const char *id;            /* the stanza's id (and origin-id) */
	struct xm_target target;   /* in_reply_to (message, receipt) or replaces (edit, delete) */
	struct xm_target reacted;  /* reaction, delete of a reaction: the message reacted to */
	const json_t *reaction_set; /* reaction, delete of a reaction: the remote sender's keys on
				       reacted after this event (array of strings) */
	struct xm_target replied;  /* edit: the message the edited one answered (not known: none) */
};

enum xm_out_result {
	XM_OUT_STANZA,  /* *out: the stanza (the caller releases it) */
	XM_OUT_NONE,    /* nothing to send (why says why) */
	XM_OUT_INVALID, /* malformed event or unknown type (why says why): the
			 * same event fails the same way again */
	XM_OUT_NOMEM,   /* memory ran out (why says so): the one failure that
			 * trying again may mend (until the twenty-fifth session
			 * XM_OUT_INVALID, and its row a dead letter at once) */
};

/* The neutral event (as stored: type, content, ...) as a stanza for info
 * (see above).  *out is NULL unless XM_OUT_STANZA; why (may be NULL) says
 * why otherwise.  NULL ctx, event, info or out: XM_OUT_INVALID. */
enum xm_out_result xm_from_neutral(xmpp_ctx_t *ctx, const json_t *event, const struct xm_out_info *info,
				   xmpp_stanza_t **out, char *why, size_t whylen);

/* A plain chat message's stanza (a message with no reply, topic or
 * attachment: <message> with <body>, <origin-id>, <request>, <markable>,
 * <active>), kept by one thread from one message to the next: the next
 * plain message changes its from, to, id, body and origin-id in place
 * instead of building the tree again.  A chat's stanza is some 67
 * allocations of libstrophe's, made and freed per message (the DOM and
 * its release were 17 % of the dispatcher thread, docs/performance.md);
 * in place it is 13.  Zeroed before its first use; one ctx, one thread. */
struct xm_keep {
	xmpp_ctx_t *ctx;      /* the context the kept stanza was made in */
	xmpp_stanza_t *msg;   /* the kept <message> (one reference: the keep's), or NULL */
	xmpp_stanza_t *text;  /* its <body>'s text node */
	xmpp_stanza_t *origin; /* its <origin-id> */
};

/* xm_from_neutral, with keep (may be NULL: the same as xm_from_neutral).
 * A plain message's *out is then the kept stanza (a reference of its
 * own): the caller renders and releases it before its next call with the
 * same keep, and changes nothing in it.  The bytes it renders are a new
 * stanza's (check_xmpp compares them). */
enum xm_out_result xm_from_neutral_kept(xmpp_ctx_t *ctx, struct xm_keep *keep, const json_t *event,
					const struct xm_out_info *info, xmpp_stanza_t **out, char *why, size_t whylen);

/* Releases the kept stanza (before keep's ctx is freed). */
void xm_keep_drop(struct xm_keep *keep);

/* Text for an XML document: invalid UTF-8 and the characters XML 1.0 does
 * not allow (C0 controls but tab and line feed, U+FFFE, U+FFFF) become
 * U+FFFD; CR LF and lone CR become LF.  Every text the adapter writes into
 * a stanza goes through it (xa_text_child, and the stanzas made here): one
 * such character written to the stream makes the server close it
 * (not-well-formed).  malloc'd, NULL without memory. */
char *xm_xml_text(const char *s);

#endif
