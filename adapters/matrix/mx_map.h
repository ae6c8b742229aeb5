/* Matrix events <-> neutral events (/work/shared/spec/interop-api.md; the
 * neutral bodies are those event_parse() in peer/event.h accepts).  Pure
 * code: no I/O, no database, no clock; what the mapping needs from storage
 * (which neutral message a Matrix event id is, and back) comes from the
 * caller's lookup function.  Safe from any thread (libxml2 is initialised
 * once, on first use).
 *
 * Matrix -> neutral, room events (mx_to_neutral):
 *
 *   m.room.message m.text     message, parts [text/plain body, text/html
 *     (+ format org.matrix.   sanitised formatted_body]; the HTML part only
 *     custom.html)            with format "org.matrix.custom.html" (an <img>
 *                             its alt text: no peer can fetch mxc://), left out
 *                             when nothing remains after sanitising or when
 *                             it is longer than a part may be
 *   m.notice                  the same + content "x.matrix.msgtype":"m.notice"
 *   m.emote                   the same + "x.matrix.msgtype":"m.emote", and the
 *                             parts read "* <body>" (a readable text for
 *                             networks without emotes; stripped again on the
 *                             way back to Matrix)
 *   m.image m.file m.video    with a plain mxc:// url and info.size: the file
 *   m.audio                   as an attachment {content_type (info.mimetype,
 *                             else application/octet-stream), url (the mxc://
 *                             URI: the peer adapter offers it to peers under
 *                             a URL of Causeway's, peer_media.h), size,
 *                             filename}, and parts only for a caption (body
 *                             when filename differs; formatted_body gives an
 *                             HTML part).  Otherwise (no size, encrypted) a
 *                             readable fallback: "[image: cat.png]", "[file:
 *                             a.pdf] caption", "[image]" without a name.
 *   m.location, m.sticker     "[location: Berlin geo:52.5,13.4]",
 *   events, other msgtypes    "[sticker: body]"; unknown msgtypes: body as
 *                             is.
 *   m.key.verification.request IGNORE (device verification, not a message)
 *   reply: m.relates_to.m.in_reply_to.event_id known to to_msg
 *                             + "in_reply_to"; the reply fallback is stripped
 *                             (leading lines "> <@…" / "> * <@…" and the
 *                             "> " lines after them, then one blank line; the
 *                             whole <mx-reply> element of formatted_body).
 *                             Unknown target: a plain message, fallback kept
 *                             (the <mx-reply> becomes its inner blockquote).
 *   thread (rel_type m.thread) in_reply_to the m.in_reply_to target unless
 *                             is_falling_back, else the thread root (if known;
 *                             else the fallback's m.in_reply_to target)
 *   edit: rel_type m.replace + m.new_content
 *                             type "edit", "replaces": the target, parts from
 *                             m.new_content (the "* " fallback of the outer
 *                             content is not used); unknown target: IGNORE.
 *                             An m.sticker's edit too: "[sticker: body]" of
 *                             its m.new_content.
 *                             Note: "replaces" is whatever to_msg gives for
 *                             the target; Matrix edits name the original
 *                             event, an edit of an edit is invalid Matrix.
 *   m.reaction (m.annotation) type "reaction": {"parts":[{"type":"text/plain",
 *                             "body":key}],"disposition":"reaction",
 *                             "in_reply_to":target}; unknown target: IGNORE;
 *                             a key longer than 64 bytes (the neutral limit):
 *                             a message "[reaction: key]" in reply instead;
 *                             an image key (an mxc:// URI, MSC4027): its
 *                             shortcode as the key, else "[reaction: an
 *                             image]" in reply.
 *   m.room.redaction          type "delete", "replaces": the redacted event
 *                             ("redacts" at the top level, else in content:
 *                             room version 11; both, differing: INVALID);
 *                             unknown target: IGNORE.
 *   m.room.member             type "membership" (join, invite; leave and ban
 *                             -> leave) with "target": to_msg(ctx, state_key)
 *                             must give the member's mimi:// user URI (NULL:
 *                             IGNORE); profile changes (join after join) and
 *                             knocks: IGNORE.
 *   m.room.encryption, m.room.encrypted
 *                             MX_IN_ENCRYPTED: the caller tells the room that
 *                             the gateway cannot read it.
 *   other event types with a  message of that text (a poll, m.poll.start
 *   text fallback: m.text     or org.matrix.msc3381.poll.start, and its
 *   [{body}], org.matrix.     end carry one), never dropped in silence;
 *   msc1767.text, or body     with m.replace, an edit of m.new_content's
 *                             text (unknown target: IGNORE; without an
 *                             object m.new_content: INVALID); in reply or
 *                             in a thread, in_reply_to as for a message;
 *                             with m.reference (a poll's end), its target
 *   other state events (state_key present), other event types, redacted
 *   events (unsigned.redacted_because)
 *                             IGNORE.
 *
 * The output is {"type": ..., "ts": origin_server_ts, "content": {...}}
 * without "sender" and "room" (the caller adds them); once they are added it
 * passes event_parse() with event_limits_default().  A text longer than a
 * part may be (16 KiB) is INVALID, not cut; an HTML part that is too long
 * (or that would make the event's JSON too long) is left out, the text
 * stays.  Members of the Matrix content other than the ones above (m.mentions,
 * extensions) are not carried.
 *
 * Neutral -> Matrix (mx_from_neutral):
 *
 *   message   PUT send m.room.message: msgtype from "x.matrix.msgtype"
 *             (m.notice, m.emote; anything else m.text); body from the
 *             text/plain part, else text/markdown, else the text of the HTML;
 *             the text/html part (sanitised again: peers are not trusted;
 *             an <img> becomes its alt text) as
 *             formatted_body with format org.matrix.custom.html; emote: a
 *             leading "* " is removed from both; in_reply_to known to
 *             to_native: m.relates_to.m.in_reply_to (no fallback: spec 1.13
 *             dropped them), in the target's thread when to_native, asked
 *             for the target's Matrix event id itself, answers the root
 *             of the thread it is in (m.thread to the root,
 *             is_falling_back false); unknown: sent as a plain message.  A single
 *             attachment with an mxc:// url becomes m.image/m.video/m.audio/
 *             m.file (by content_type) with the text as caption; other
 *             attachments are listed in the body as "[image: a.jpg] <url>".
 *   edit      m.room.message with "* "-prefixed fallback body (and
 *             formatted_body), m.new_content, m.relates_to {m.replace,
 *             target}; unknown target: sent as a new message, "* " kept.
 *             A single mxc:// attachment (the file the new version
 *             keeps) makes both contents a media message's, as for a
 *             message, the text the caption (else the file's name).
 *   reaction  m.reaction {m.relates_to: {m.annotation, target, key: body
 *             with the emoji variation selectors Matrix clients send,
 *             mx_reaction_key}}; unknown target, or a key that is an
 *             mxc:// URI (a file the peer did not send): MX_OP_NONE.
 *   delete    MX_OP_REDACT of the target (content {}); unknown: MX_OP_NONE.
 *   receipt   "read": MX_OP_RECEIPT (m.read) on the target; "delivered"
 *             (Matrix has none) and unknown targets: MX_OP_NONE.
 *   typing    MX_OP_TYPING, typing = state == "start".
 *   membership, block: MX_OP_NONE (rooms are managed by the adapter).
 *
 * Every m.room.message carries "m.mentions": {} (a peer never pings anyone
 * by accident; a reaction has no text to ping by), and every send
 * marker_key: marker_value when marker_key is not NULL.  No other member of the neutral content is
 * copied into the Matrix content (until the thirtieth session namespaced
 * ones were, but a blocklist's: clients act on members of namespaces of
 * their own, such as com.beeper.per_message_profile, which shows another
 * sender's name and avatar); unknown members are kept in the neutral
 * event for the peers (interop-api.md), not given to Matrix clients.
 * "topic" and "expires" have no Matrix equivalent and are dropped.
 *
 * A message's or edit's content is kept under 61,440 bytes of compact JSON
 * (Matrix's 65,536 for the whole event, less what the homeserver and the
 * caller add), step by step: formatted_body left out; an edit's fallback
 * body "* " and the text's first 100 bytes; the text cut on a character,
 * ending "… (message shortened)".
 */
#ifndef CW_MX_MAP_H
#define CW_MX_MAP_H

#include "matrix/mx_id.h" /* MX_ID_MAX */

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The extension member that keeps a Matrix msgtype in neutral content. */
#define MX_MSGTYPE_KEY "x.matrix.msgtype"

/* Maps an id to another, or NULL when unknown.  The returned string must stay
 * valid until the next call (mx_* functions copy it at once). */
typedef const char *(*mx_lookup_fn)(void *ctx, const char *id);

/* The Matrix event ids a room event refers to (reply target, thread root,
 * m.replace / m.annotation / m.reference target, redacts), deduplicated, for
 * a batch lookup by the caller before mx_to_neutral().  ids[] point into ev.
 * Returns how many (at most max).  Only well-formed event ids are listed. */
size_t mx_event_refs(const json_t *ev, const char **ids, size_t max);

/* The event an m.room.redaction redacts: its top-level redacts, else
 * (room version 11) content.redacts (from_redaction says why that
 * order); NULL when neither is a well-formed event id.  Points into ev. */
const char *mx_redaction_target(const json_t *ev);

enum mx_in_result {
	MX_IN_OK,         /* *out holds the neutral body */
	MX_IN_IGNORE,     /* not carried over (why says what) */
	MX_IN_INVALID,    /* malformed (why says what is wrong) */
	MX_IN_ENCRYPTED,  /* the room is (or turned) end-to-end encrypted */
};

/* One room event of a transaction (client event format) to a neutral event
 * body.  to_msg(ctx, "$event") gives the neutral id ("msg_...") of a Matrix
 * event; for m.room.member it is also asked for the member's user id
 * ("@user:server") and must then give a mimi:// user URI.  Results that are
 * not valid ids are taken as unknown.  On MX_IN_OK *out is a new reference
 * (the caller decrefs it); otherwise *out is NULL and why (if not NULL) says
 * why, in English, without the event's data. */
enum mx_in_result mx_to_neutral(const json_t *ev, mx_lookup_fn to_msg, void *ctx, json_t **out, char *why,
				size_t whylen);

/* The event id ev replaces when mx_to_neutral reads it as an edit, else
 * NULL (points into ev): an m.replace (its event_id a string) with
 * m.new_content as an object, not redacted, not a state event, of
 * m.room.message, of m.sticker or of a type read as its text fallback (a poll: its
 * m.new_content has one).  The Matrix spec's rules of an edit are the same
 * whatever its type (among them: its target is no edit itself); until the
 * fifty-first session the adapter checked those of m.room.message only,
 * and a poll's edit of an edit went to the peer as an edit of the poll. */
const char *mx_edit_target(const json_t *ev);

/* Ephemeral m.typing (content.user_ids) and m.receipt ({event_id: {"m.read":
 * {user_id: {"ts": ...}}}}) events to neutral events: a new JSON array of
 * {"sender_mxid": user_id, "event": {...neutral body without sender...}}, one
 * per typing user (state "start": Matrix lists who types now; stops are the
 * users who left the list, which only the caller's memory knows) and per
 * (reader, known target) of an m.read receipt (receipt "read", "ts" the
 * receipt's when valid).  Private receipts (m.read.private) are not
 * forwarded.  Malformed entries are skipped; other event types give an
 * empty array.  At most 1024 items.  NULL only when memory runs out. */
json_t *mx_ephemeral_to_neutral(const json_t *ev, mx_lookup_fn to_msg, void *ctx);

/* What the neutral event becomes on the Matrix side. */
enum mx_op {
	MX_OP_SEND,     /* PUT /rooms/{room}/send/{event_type}/{txn} with content */
	MX_OP_REDACT,   /* PUT /rooms/{room}/redact/{target}/{txn} with content */
	MX_OP_RECEIPT,  /* POST /rooms/{room}/receipt/m.read/{target} */
	MX_OP_TYPING,   /* PUT /rooms/{room}/typing/{user} {typing} */
	MX_OP_NONE,     /* nothing to send (why says why) */
};

struct mx_out {
	enum mx_op op;
	char event_type[64];   /* SEND: "m.room.message" or "m.reaction" */
	json_t *content;       /* SEND, REDACT: owned; release with mx_out_clear() */
	char target[256];      /* REDACT, RECEIPT: the Matrix event id */
	bool typing;           /* TYPING: start (true) or stop */
};

/* What mx_from_neutral's why says, exactly, when memory ran out: the one
 * failure of its that trying again may mend. */
#define MX_WHY_NOMEM "out of memory"

/* A neutral event (as stored: type, content, ts, ...) to the Matrix request
 * that carries it.  to_native(ctx, "msg_...") gives the Matrix event id of a
 * neutral message, or NULL.  marker_key (may be NULL) and marker_value: the
 * outbox id travels in the content of sends under this namespaced key, so
 * that a re-send after a homeserver restart can be recognised.  false (out
 * cleared, why says why) when the event is malformed or of an unknown type
 * (the same event fails the same way again), or when memory ran out (why is
 * MX_WHY_NOMEM); true with MX_OP_NONE when there is nothing to send. */
bool mx_from_neutral(const json_t *neutral, mx_lookup_fn to_native, void *ctx, const char *marker_key,
		     const char *marker_value, struct mx_out *out, char *why, size_t whylen);
/* A reaction's key as Matrix clients send it (mx_from_neutral sends no
 * other): each character that is an emoji only with U+FE0F after it
 * ("\u2764" a heart as text, "\u2764\uFE0F" the emoji; Unicode's emoji
 * variation sequences) gets one, and so does a keycap ("1\u20E3"), unless
 * it has a variation selector or a skin tone after it.  Matrix counts
 * reactions by their exact key: without it a peer's heart would be one
 * of its own beside the Matrix users'.  Into out (size bytes; at most
 * MX_REACTION_KEY_MAX for a neutral reaction); false when key is not
 * UTF-8 or the result does not fit. */
#define MX_REACTION_KEY_MAX (4 * 64 + 1)
/* The unstable name of an image reaction's shortcode (MSC4027). */
#define MX_SHORTCODE_KEY "com.beeper.reaction.shortcode"
bool mx_reaction_key(const char *key, char *out, size_t size);

/* Releases out->content and clears out; safe on a cleared struct. */
void mx_out_clear(struct mx_out *o);

/* A homeserver's JSON body (a transaction, an answer) read with jansson
 * (flags: json_loadb's, JSON_ALLOW_NUL added) so that what is valid JSON
 * but only some events' trouble fails those events alone, never the whole
 * body.  A NUL in a string is read (json_string_length tells it;
 * mx_json_has_nul finds it).  What jansson refuses even so is put right
 * where jansson says it is (the error's position: the token's end), and
 * the body read again, up to 64 times: an integer past 64 bits (room
 * versions 1 to 5 allow any JSON number) is read as a real, that one
 * alone (carried where it is mere content, refused with its event where
 * an integer is needed); a number past a double's range (1e400) becomes a
 * string with a NUL (mx_json_number_out_of_range tells it), and a key with
 * a NUL (jansson keeps keys as C strings) a key of a mark's own (beside a
 * key written as that mark too: another), both found by mx_json_has_nul,
 * so that their event is refused alone.  Until the thirty-first session
 * an integer past 64 bits made the whole body read again with every
 * number as a real (another event's integer past 2^53 lost its low bits),
 * and the other two failed the whole body.  The readings are bounded (64,
 * and four times the body's bytes, or 4 MiB, in all); past that bound the
 * numbers jansson cannot read that are left are patched at once, in one
 * pass, as each would have been, and the body read once more, every other
 * number exactly (until the thirty-second session every number was read
 * as a real then, and a number past a double's range failed the body).
 * An array or object nested past what jansson reads (2048 levels, which
 * a homeserver's parser may take: Dendrite's takes 10000) becomes a string
 * with a NUL too (mx_json_too_deep tells it), all of them at once (until
 * the thirty-ninth session the whole body was refused).  With flags
 * JSON_REJECT_DUPLICATES a key that is its object's second of that name
 * becomes a key of a mark of its own too (mx_json_duplicate_key tells it,
 * mx_json_has_nul finds it; until the forty-second session the whole
 * body was refused).
 * Still refused, whole (NULL, err says why): not JSON, a key with a NUL
 * or a duplicate key past that bound.  err: not NULL. */
json_t *mx_json_load(const char *body, size_t len, size_t flags, json_error_t *err);

/* Whether a string anywhere in v (a value, nested at any depth) holds a
 * NUL, or a key did (mx_json_load's mark): PostgreSQL's jsonb and text
 * cannot store one, and C reads the string only up to it. */
bool mx_json_has_nul(const json_t *v);

/* Whether v holds, at any depth, a number past a double's range (read by
 * mx_json_load as a string that mx_json_has_nul finds too). */
bool mx_json_number_out_of_range(const json_t *v);

/* Whether v holds, at any depth, an array or object nested past what
 * jansson reads (read by mx_json_load as a string that mx_json_has_nul
 * finds too). */
bool mx_json_too_deep(const json_t *v);

/* Whether the object v (deep: or anything in it, at any depth) held a key
 * twice (read by mx_json_load, with JSON_REJECT_DUPLICATES, as a key of a
 * mark that mx_json_has_nul finds too). */
bool mx_json_duplicate_key(const json_t *v, bool deep);

/* HTML to the subset the Matrix spec recommends (libxml2's HTML parser),
 * as a peer's text/html part goes to Matrix (a formatted_body goes to a
 * peer so too, its reply fallback kept or not):
 *   - allowed elements: del h1-h6 blockquote p a ul ol sup sub li b i u
 *     strong em s code hr br div table thead tbody tr th td caption pre span
 *     details summary (font, deprecated, becomes span); others are dropped
 *     with their text kept, except that the whole content of an element of
 *     no message text (html.h cw_html_hidden: script, style, noscript, ...)
 *     and of mx-reply is dropped; comments and processing instructions too;
 *   - attributes per element: span data-mx-bg-color, data-mx-color ("#" + 6
 *     hex digits), data-mx-spoiler, data-mx-maths; a name, target, href (an
 *     absolute URL with scheme http, https, ftp, mailto, magnet or matrix);
 *     ol start (digits); code class (only its language-* classes); div
 *     data-mx-maths; font color -> data-mx-color;
 *   - an img is its alt text: an mxc:// file of the homeserver's store is
 *     none a peer can fetch, nor a peer's one it sent (media crosses
 *     re-hosted, as attachments; until the fifty-first session an img of
 *     an mxc:// src was kept here, which the mapping never asked for);
 *   - elements nested deeper than 100 keep only their text;
 *   - invalid UTF-8, NUL and the control characters HTML forbids become
 *     U+FFFD first; entities are decoded and the text re-escaped (& < > and
 *     " in attributes); the document's own charset declarations are ignored.
 * The output of well-nested input sanitises to itself again; libxml2 may
 * re-nest some misnested markup (a table inside a link) on a second pass,
 * which stays safe.  Returns a malloc'd NUL-terminated UTF-8 string (free()
 * it), "" for empty or NULL input; NULL when memory runs out or len is over
 * 1 MiB. */
char *mx_sanitize_html(const char *html, size_t len);

/* The bytes of the string pools of the HTML parser context this thread
 * keeps between parses (0: none kept), for the unit test of its bound. */
size_t mx_map_kept_html_usage(void);


/* The length of a plain-text reply fallback at the start of body: a line
 * "> <@user:server>" or "> * <@user:server>" (a valid user id, then a
 * space or the line's end) and the "> " lines after it, then one empty
 * line (the spec's "Fallbacks for rich replies", which clients put before a
 * reply's own text).  0 when body does not start with one. */
size_t mx_reply_fallback_len(const char *body);

/* One user a message mentions (mx_mentions). */
struct mx_mention {
	char user_id[MX_ID_MAX + 1];
	char label[256]; /* the trimmed text of its first link in formatted_body: "" without one (or longer) */
};

/* The users the m.room.message content c mentions (the Client-Server API's
 * "User and room mentions": a client's "pill" puts the user's display name
 * in body, a link to her id in formatted_body and her id in
 * m.mentions.user_ids), each once, other than those of skip (a NULL-ended
 * list, or NULL): the valid user ids of m.mentions.user_ids when it names
 * any, else those of the links in an org.matrix.custom.html formatted_body
 * (https://matrix.to/#/<id>, percent-encoded or not, and matrix:u/<id>;
 * the links of the reply fallback, <mx-reply>, are not mentions).  The
 * first max go into out, labelled from the links; returns how many there
 * are (exact up to max; beyond it, at least max + 1). */
size_t mx_mentions(const json_t *c, const char *const *skip, struct mx_mention *out, size_t max);

#endif
