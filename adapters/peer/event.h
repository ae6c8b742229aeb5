/* Validation of the neutral API's inputs (docs: /work/shared/spec/interop-api.md):
 * mimi:// identifiers, opaque ids, idempotency keys, event bodies and batches.
 * Pure code: no I/O, no clock, no globals; safe from any thread. */
#ifndef CW_PEER_EVENT_H
#define CW_PEER_EVENT_H

#include "cw.h"

#include <jansson.h>

/* ------------------------------------------------------------ identifiers
 *
 * A user is  mimi://<domain>[:<port>]/u/<local>   (MIMI_USER)
 * a room is  mimi://<domain>[:<port>]/r/<id>      (MIMI_ROOM)
 *
 * The parser accepts only the canonical spelling, so that an identifier is
 * compared byte for byte and mimi_uri_format(mimi_uri_parse(s)) == s:
 *   scheme    exactly "mimi://" (lower case)
 *   domain    a lower-case DNS name: labels of 1-63 bytes of [a-z0-9-], not
 *             starting or ending with '-', joined by single dots; at least one
 *             dot (no single-label "localhost"); the last label not all digits
 *             (IP literals are not identifiers); at most 253 bytes
 *   port      optional ":<1-65535>", no leading zero
 *   local     1-255 bytes of  A-Z a-z 0-9 - . _ ~ + =  (RFC 3986 unreserved,
 *             plus '+' for E.164 numbers and '=' for padding-like escapes);
 *             case-sensitive; not "." or ".." (dot-segments); no '/', '%',
 *             '?', '#', spaces or control bytes
 *   room id   1-128 bytes of  A-Z a-z 0-9 _ -
 *   whole     at most 512 bytes; nothing after the local part or room id (no
 *             trailing slash, query or fragment)
 */
#define MIMI_URI_MAX 512
#define MIMI_DOMAIN_MAX 253
#define MIMI_LOCAL_MAX 255
#define MIMI_ROOM_ID_MAX 128

enum mimi_kind { MIMI_USER, MIMI_ROOM };

struct mimi_uri {
	enum mimi_kind kind;
	char domain[MIMI_DOMAIN_MAX + 1]; /* host name without the port */
	uint16_t port;                    /* always 0: identifiers name no port (the parser refuses one) */
	char id[MIMI_LOCAL_MAX + 1];      /* user local part or room id */
};

/* Parses s into out (out is cleared first). CW_EINVAL with the reason in e. */
cw_err mimi_uri_parse(const char *s, struct mimi_uri *out, cw_errmsg *e);
/* Writes the canonical text into buf (MIMI_URI_MAX + 1 bytes are always
 * enough). Validates the components as the parser does, so an adapter that
 * builds a struct mimi_uri from a native id gets CW_EINVAL, never a URI the
 * parser would refuse; CW_EINVAL too when buf is too small. */
cw_err mimi_uri_format(const struct mimi_uri *u, char *buf, size_t size, cw_errmsg *e);
bool mimi_uri_equal(const struct mimi_uri *a, const struct mimi_uri *b);
/* A domain as mimi:// URIs hold it (d: len bytes): lower-case DNS labels,
 * at least one dot, the last label not all digits (an IP address is no
 * identifier).  CW_EINVAL with the reason in e. */
cw_err mimi_domain_check(const char *d, size_t len, cw_errmsg *e);
/* Folds the ASCII capitals of s to lower case, in place, up to its end or
 * the first byte of stop (NULL: none): a part of an address that is
 * compared in any case (a local user's localpart where the XMPP server
 * keeps it in lower case, RFC 7622 §3.3; a JID's domainpart, §3.2).  Other
 * bytes (UTF-8 sequences too) are left as they are.  Whether it changed
 * any. */
bool addr_fold_lower(char *s, const char *stop);
/* A typed mimi:// address's scheme and domain to lower case, in place (a
 * user types MIMI://WA.Example/u/Wally; DNS names are case-insensitive,
 * and mimi_uri_parse takes lower case only, as the admin API does): the
 * path, a remote user's case-sensitive id, stays as typed.  Anything
 * not starting with mimi:// (in any case) is left alone. */
void mimi_addr_fold(char *s);

/* Opaque ids used in URL paths and bodies (never decoded or escaped):
 *   room public id   "r_"   + 1-64 of [A-Za-z0-9_-]   (/v1/rooms/{room})
 *   message id       "msg_" + 1-64 of [A-Za-z0-9_-]   (/v1/messages/{id})
 *   idempotency key  1-128 of [A-Za-z0-9._:-]  (the Idempotency-Key header
 *                    and the batch items' "idempotency_key")
 * NULL is never valid. */
#define EVENT_OPAQUE_ID_MAX 64
#define IDEMPOTENCY_KEY_MAX 128
bool room_public_id_valid(const char *id);
bool message_id_valid(const char *id);
bool idempotency_key_valid(const char *key);

/* event_label gives the event (a message or an edit; a stored event,
 * {"type", "content": {...}}) with a label in front of the body of each
 * text part (html for text/html, text for the others): a new reference,
 * ev itself when there is nothing to label.  In a group's Matrix room,
 * another local member's message is relayed by the bot after the member's
 * name (docs/matrix.md). */
json_t *event_label(json_t *ev, const char *text, const char *html);

/* ------------------------------------------------------------ limits */

/* Part content types (a bit set in event_limits.part_types). */
#define EVENT_PART_PLAIN    0x1u  /* text/plain */
#define EVENT_PART_MARKDOWN 0x2u  /* text/markdown */
#define EVENT_PART_HTML     0x4u  /* text/html (carried as is: sanitising is the renderer's job) */
#define EVENT_PART_ALL      0x7u

struct event_limits {
	size_t max_event_bytes;         /* one event's JSON text (64 KiB) */
	size_t max_body_bytes;          /* one part's body (16 KiB) */
	size_t max_parts;               /* content.parts entries (4) */
	size_t max_attachments;         /* content.attachments entries (8) */
	uint64_t max_attachment_bytes;  /* an attachment's declared size (100 MiB) */
	size_t max_batch;               /* events in one POST /v1/batch (256) */
	size_t max_batch_bytes;         /* a batch's JSON text (16 MiB = 256 x 64 KiB;
	                                   the HTTP front's max_body_bytes caps first) */
	unsigned part_types;            /* EVENT_PART_* accepted (all) */
	int64_t max_ts;                 /* the latest ts taken, in ms (0: no more than the
	                                   syntax's bound; the peer API: EVENT_TS_AHEAD_MS
	                                   after its clock) */
};

struct event_limits event_limits_default(void);

/* Fixed bounds (not configurable: they are part of the API's syntax). */
#define EVENT_MAX_DEPTH 16            /* containers nested, the event object = 1 */
#define EVENT_TOPIC_MAX 1024          /* bytes */
#define EVENT_REACTION_MAX 64         /* bytes of a reaction's body */
#define EVENT_URL_MAX 2048            /* bytes of an attachment url */
#define EVENT_FILENAME_MAX 255        /* bytes of an attachment filename */

/* An attachment's filename: 1..EVENT_FILENAME_MAX bytes of UTF-8 without
 * '/', '\\', control characters (C0, DEL, C1) or bidirectional controls
 * (cw_utf8_has_bidi_control: since the thirtieth session), not "." or "..". */
bool event_filename_valid(const char *s);
/* An attachment's url as event_parse takes it: https:// or mxc://, a
 * host, visible ASCII, no user or password, at most EVENT_URL_MAX bytes
 * (what an adapter makes an attachment of, a local user's link). */
bool event_url_valid(const char *s);
#define EVENT_CONTENT_TYPE_MAX 255    /* bytes of an attachment content_type */
#define EVENT_TS_LIMIT 9007199254740992LL /* 2^53: ts, and every integer's magnitude, are below it */
/* expires is below 10^15 (the year 33658): schema/014's event_expires(),
 * which the expiry sweep and retention read, takes at most 15 digits (a
 * longer one was accepted and then never expired, until the thirtieth
 * session). */
#define EVENT_EXPIRES_LIMIT 1000000000000000LL
/* Numbers, anywhere in an event (unknown members too), are what the store
 * keeps as they came (RFC 7493, I-JSON): an integer within +-(2^53 - 1),
 * any other number 0 or of a magnitude from EVENT_REAL_MIN to below 2^53.
 * PostgreSQL's jsonb writes a number out in plain decimal: 1e19 came back
 * as 20 digits that jansson cannot read as an integer (the event went out
 * without its content), 1e300 and 1e-300 as 301 digits each (5 bytes in,
 * 301 stored).  Refused: invalid_body, pointing at the number. */
#define EVENT_REAL_MIN 1e-15
/* An event holds at most this many JSON values (every object, array,
 * string, number, true, false and null, the event itself included):
 * unknown members are kept and carried, and what they cost in memory
 * (jansson holds each value in some 50-100 bytes) is bounded with them.
 * More: too_large, pointing at the first value past the limit. */
#define EVENT_MAX_VALUES 1024
#define EVENT_TS_AHEAD_MS 86400000LL /* a peer's ts may be a day ahead of the clock, no more */

/* ------------------------------------------------------------ events
 *
 * An event body is one JSON object (UTF-8, no NUL anywhere, no duplicate keys
 * at any level, at most max_event_bytes, at most EVENT_MAX_DEPTH containers
 * deep, at most EVENT_MAX_VALUES values, numbers as EVENT_REAL_MIN says).
 * Envelope members:
 *   type      required: message edit delete reaction receipt typing
 *             membership block; anything else is refused
 *   sender    user URI; required only with EVENT_REQUIRE_SENDER (a peer's
 *             events: the local adapters' have none yet); the peer's
 *             identity comes from its credential, and the caller checks the
 *             sender's domain against it
 *   room      room URI; required only with EVENT_REQUIRE_ROOM (the URL path
 *             names the room otherwise; comparing the two is the caller's job)
 *   ts        optional integer milliseconds, 0 < ts < 2^53, and at most
 *             lim->max_ts when that is set
 *   content   required object, for every type
 *
 * Members of content, checked whenever present, for every type:
 *   parts        array of 1..max_parts objects {type, body}: type one of
 *                text/plain text/markdown text/html (and allowed by
 *                part_types), body a string of 1..max_body_bytes bytes
 *   attachments  array of 0..max_attachments objects:
 *                  content_type  required, a media type (media_type_valid:
 *                                RFC 6838 names, RFC 9110 parameters),
 *                                <= 255 bytes
 *                  url           required, "https://..." or "mxc://..." with
 *                                a rest of visible ASCII (no space, no " < >
 *                                \ ^ ` { | }) that starts with a host (not
 *                                with '/', '?', '#' or ':'), no user or
 *                                password ('@' before the path), <= 2048 bytes
 *                                (event_url_valid)
 *                  size          optional integer 0..max_attachment_bytes;
 *                                absent: unknown (counted as
 *                                max_attachment_bytes in attachment_bytes)
 *                  sha256        optional, 64 lower-case hex digits (any
 *                                other length: invalid_body)
 *                  filename      optional, 1..255 bytes, no '/', '\', control
 *                                characters (C0, DEL, C1), not "." or ".."
 *   in_reply_to  null or a message id (msg_...)
 *   replaces     null or a message id; always the first version (as in MIMI)
 *   topic        null or a string of at most 1024 bytes
 *   expires      null or integer milliseconds, 0 < expires < 10^15
 *   disposition  a MIMI disposition: unspecified render reaction profile
 *                inline icon attachment session preview
 *
 * Per type ("no parts" = content.parts absent; "no attachments" =
 * content.attachments absent or empty; the type-specific members receipt,
 * state, membership and target are checked only for their own type and are
 * ordinary unknown members of any other). For every type: replaces only on
 * edit and delete, disposition "reaction" only on a reaction.
 *
 *   type        requires                                   refuses
 *   ----------  -----------------------------------------  -------------------
 *   message     >= 1 part or >= 1 attachment               -
 *   edit        replaces, >= 1 part                        -
 *   delete      replaces                                   parts, attachments
 *   reaction    in_reply_to, disposition "reaction",       attachments
 *               exactly 1 part, its body <= 64 bytes
 *   receipt     in_reply_to, receipt "delivered"|"read"    parts, attachments
 *   typing      state "start"|"stop"                       parts, attachments
 *   membership  membership "join"|"leave"|"invite",        parts, attachments
 *               target user URI (who joins, leaves or is invited)
 *   block       target user URI (the blocked user);        parts, attachments
 *               action "block" (the default) | "unblock"
 *
 * Removing a reaction is a delete whose replaces names the reaction event.
 * Unknown members, at the top level, in content, in parts and attachments,
 * are kept unchanged in event.json and passed on; strings are data, never
 * interpreted (SQL or markup characters are accepted as they are).
 *
 * Errors: code is "invalid_body" (shape, syntax, missing or wrong members;
 * 400) or "too_large" (any byte or count maximum: the body, a part body, a
 * reaction, topic, url, filename, attachment size, number of parts,
 * attachments or batch items; 413). Identifiers that are too long are
 * invalid_body: their length is part of their syntax. pointer is an RFC 6901
 * JSON pointer to the offending member ("" = the whole body; a missing
 * required member is named where it should be), detail an English sentence
 * that never repeats the caller's data.
 */
#define EVENT_ERR_INVALID "invalid_body"
#define EVENT_ERR_TOO_LARGE "too_large"

struct event_error {
	char code[32];
	char pointer[128]; /* cut at the deepest whole reference token that fits */
	char detail[256];
};

enum event_type {
	EVENT_MESSAGE,
	EVENT_EDIT,
	EVENT_DELETE,
	EVENT_REACTION,
	EVENT_RECEIPT,
	EVENT_TYPING,
	EVENT_MEMBERSHIP,
	EVENT_BLOCK,
};
#define EVENT_TYPE_COUNT 8
const char *event_type_name(enum event_type t);

enum event_receipt { EVENT_RECEIPT_NONE, EVENT_RECEIPT_DELIVERED, EVENT_RECEIPT_READ };
enum event_typing { EVENT_TYPING_NONE, EVENT_TYPING_START, EVENT_TYPING_STOP };
enum event_membership {
	EVENT_MEMBERSHIP_NONE,
	EVENT_MEMBERSHIP_JOIN,
	EVENT_MEMBERSHIP_LEAVE,
	EVENT_MEMBERSHIP_INVITE,
};

/* Content kinds for the policy engine (a bit set). */
#define EVENT_KIND_TEXT  0x1u  /* at least one part */
#define EVENT_KIND_MEDIA 0x2u  /* at least one attachment */

/* Flags of event_parse. */
#define EVENT_REQUIRE_ROOM 0x1u  /* the body must name the room */
/* The body must name its sender (a peer's event: docs/openapi.json has it
 * required).  Until the fiftieth session's review the peer API checked
 * that itself after parsing: a batch item without one still held its
 * idempotency key, and its corrected copy later in the batch was refused
 * as a repeat, though an invalid item holds no key. */
#define EVENT_REQUIRE_SENDER 0x2u
/* A stored event, taken under the rules of its arrival (the policy's
 * release of a held message reads it so, policy_live.c's held_content):
 * an attachment's content_type is not held to a syntax made stricter
 * since (RFC 6838's names, the fifty-second session), only to its length,
 * so that such a message still counts its size and content kinds.  Until
 * then it parsed as nothing there, and counted none against the rules. */
#define EVENT_STORED 0x4u

struct event {
	json_t *json;               /* the whole validated object, unknown members
	                               included; owned: release with event_free() */
	char *text;                 /* NULL, or json as compact text with sorted
	                               keys (event_from_json); owned */
	enum event_type type;
	bool has_sender, has_room, has_target;
	struct mimi_uri sender;     /* valid when has_sender */
	struct mimi_uri room;       /* valid when has_room */
	struct mimi_uri target;     /* membership and block: valid when has_target */
	int64_t ts;                 /* 0 when absent */
	int64_t expires;            /* 0 when absent or null */
	/* These point into json (valid until event_free); NULL when absent or null. */
	const char *in_reply_to;
	const char *replaces;
	const char *topic;
	const char *disposition;
	size_t nparts;
	size_t body_bytes;          /* sum of the parts' body lengths */
	size_t nattachments;
	uint64_t attachment_bytes;  /* sum of the attachments' declared sizes (an
	                               unknown one: lim->max_attachment_bytes) */
	unsigned kinds;             /* EVENT_KIND_* */
	enum event_receipt receipt;
	enum event_typing typing;
	enum event_membership membership;
	bool unblock;               /* block: content.action "unblock" (the end of a block) */
};

/* A JSON value a peer sends that is stored as it came and handed back (a
 * room's policy: POST /v1/rooms, GET /v1/rooms/{room}), held to an event's
 * rules for what it may hold: at most EVENT_MAX_DEPTH containers deep (v
 * itself counting as 1), at most EVENT_MAX_VALUES values, numbers as
 * EVENT_REAL_MIN says (jsonb writes 1e20 back as 21 digits, which jansson
 * cannot read: the policy was left out of the room's state).  name is the
 * member it is (the pointer's first token, and the detail's noun).
 * CW_EINVAL with err set (invalid_body or too_large), else CW_OK. */
cw_err event_json_value_check(json_t *v, const char *name, struct event_error *err);

/* Parses and validates one event body of len bytes (body need not be
 * NUL-terminated and may contain NULs, which are refused). On CW_OK out holds
 * a new reference in out->json. On CW_EINVAL err says why and out holds
 * nothing to free; CW_ENOMEM when jansson runs out of memory (err->code is
 * "unavailable"). */
cw_err event_parse(const char *body, size_t len, const struct event_limits *lim, unsigned flags,
		   struct event *out, struct event_error *err);
/* The same checks for an event an adapter built as JSON (no text to parse):
 * root is serialised once (out->text, compact with sorted keys), its size
 * checked against lim, and it is validated as event_parse would validate
 * that text.  out->json is a new reference to root. */
cw_err event_from_json(json_t *root, const struct event_limits *lim, unsigned flags, struct event *out,
		       struct event_error *err);
/* Drops the reference and clears ev; safe on a cleared or failed event. */
void event_free(struct event *ev);

/* ------------------------------------------------------------ batches
 *
 * POST /v1/batch: {"events": [{"idempotency_key": K, "room": R, "event": E}, ...]}
 * with 1..max_batch items (more: too_large at /events) and at most
 * max_batch_bytes of text. K is an idempotency key, unique within the batch
 * (a repeated key fails the later item); R a room URI; E an event as above
 * with the room optional, and if E names a room it must equal R. Each item
 * counts its own depth (the item object = 1, its event object = 1). Unknown
 * members of the batch object and of items are kept.
 *
 * A wrong top-level shape (not JSON, not an object, no events array, too many
 * items, too many bytes) fails the whole batch: CW_EINVAL and err. So do
 * faults the JSON parser sees before any item is looked at: invalid UTF-8,
 * \u0000 or a repeated key anywhere in the document. Otherwise
 * CW_OK and one result per item, in order; an item that fails does not fail
 * the others. Pointers in item errors are absolute in the batch document
 * ("/events/3/event/content/parts/0/body").
 */
struct batch_item {
	cw_err rc;                  /* CW_OK, or CW_EINVAL with err filled */
	char idempotency_key[IDEMPOTENCY_KEY_MAX + 1]; /* "" when missing or malformed */
	bool has_room;
	struct mimi_uri room;       /* the item's room, valid when has_room */
	struct event ev;            /* valid when rc == CW_OK */
	struct event_error err;     /* when rc != CW_OK */
};

struct batch {
	json_t *json;               /* the whole batch document */
	size_t n;
	struct batch_item *items;   /* n results, in order */
	size_t nfailed;
};

/* flags are event_parse's, applied to each item's event (the item names
 * its room: EVENT_REQUIRE_ROOM makes its event name it too).  An item
 * whose event they refuse is an invalid item like any other: it holds no
 * key.  On CW_OK the caller releases out with batch_free(); on failure
 * nothing is left to free. CW_ENOMEM when memory runs out. */
cw_err batch_parse(const char *body, size_t len, const struct event_limits *lim, unsigned flags,
		   struct batch *out, struct event_error *err);
void batch_free(struct batch *b);

/* A peer's name, as POST /admin/v1/peers takes it: 1 to 32 of a-z, 0-9,
 * '_' and '-', starting with a letter or digit.  Here, beside the
 * other names of the neutral model, so that the configuration's check
 * (xmpp.components) links without the peer registry. */
bool peer_name_valid(const char *s);

#endif
