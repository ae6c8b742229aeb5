/* The policy engine: decide(snapshot, request) -> decision.
 *
 * Pure C: policy_decide() does no I/O, takes no lock and allocates nothing;
 * it reads an immutable snapshot (rules, defaults and consent facts, compiled
 * into hash tables by a builder) and the request.  Rate limits are token
 * buckets kept by the caller behind struct policy_rate (decide only names
 * the bucket, its size and its period).  The precedence is the contract of
 * ../shared/spec/policy.md and docs/policy.md (reason codes in
 * docs/policy-reasons.md):
 *
 *   1. a server rule with mode deny matching a remote party (user, domain
 *      exact or wildcard, network exact or wildcard)    -> deny
 *      (inbound and transit, an empty rate bucket first -> limit)
 *   2. the local user's blocked (user, then domain); outbound also the
 *      remote user's block of the local user             -> deny
 *      (inbound, an empty rate bucket first -> limit: docs/policy.md)
 *   3. rate limits of a remote sender (inbound, transit) -> limit
 *      size and content-kind limits                       -> deny
 *      outbound: the local sender's own outbound limits under the
 *      rules matching the recipient, asked after 3b and 4: what 3b
 *      refuses is denied and asks no bucket; what 4 refuses only peeks
 *      them (an empty one -> limit: 3 before 4, else 4's deny); what
 *      goes takes its tokens (docs/policy.md)            -> limit
 *   4. the remote party's effective mode (the most specific rule with a
 *      mode, else the default): closed, or allowlist     -> deny
 *   5. inbound: the local user not opted in to the network -> deny
 *   6. inbound: the local user's allowed (user, then domain) -> allow
 *   7. inbound: hold (typing and receipts, which cannot wait: deny);
 *      outbound and transit: allow.
 *
 * Specificity of rules, most specific first: user, exact domain, wildcard
 * domain (longest suffix first), exact network, wildcard network. */
#ifndef CW_POLICY_H
#define CW_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* INBOUND: a remote sender to a local recipient.  OUTBOUND: a local sender
 * to a remote recipient.  TRANSIT: remote to remote through this hub (only
 * server rules apply: there is no local user to consent). */
enum policy_direction { POLICY_INBOUND, POLICY_OUTBOUND, POLICY_TRANSIT };

/* What is asked for: an event, a new conversation (room creation by a remote
 * party; no recipient), a consent request (MIMI requestConsent) to a local
 * user, or the consent request a first contact's held message makes.  The
 * last two draw on consent_requests_per_day in buckets of their own: the
 * first is answered 429 to the peer, and must not tell it which users a
 * first contact asked (which would say who exists and has not blocked). */
enum policy_action { POLICY_ACT_EVENT, POLICY_ACT_NEW_ROOM, POLICY_ACT_CONSENT_REQUEST, POLICY_ACT_FIRST_CONTACT };

/* HOLD: stored, waiting for the local user's consent (for a consent
 * request: store the request).  LIMIT: refused for now, retry after. */
enum policy_verdict { POLICY_ALLOW, POLICY_DENY, POLICY_HOLD, POLICY_LIMIT };

enum policy_mode { POLICY_MODE_NONE, POLICY_MODE_OPEN, POLICY_MODE_ALLOWLIST, POLICY_MODE_CLOSED, POLICY_MODE_DENY };
enum policy_scope { POLICY_SCOPE_DOMAIN, POLICY_SCOPE_NETWORK, POLICY_SCOPE_USER };

/* Content kinds (the same bits as EVENT_KIND_*). */
#define POLICY_KIND_TEXT  0x1u
#define POLICY_KIND_MEDIA 0x2u

/* Limits a rule sets; `set` says which members are set (POLICY_LIM_*).
 * For each limit the most specific matching ordinary rule that sets it
 * applies, and every matching in_addition rule that sets it as well. */
#define POLICY_LIM_MSG_MINUTE       0x01u /* messages_per_minute: the rule's subject as a whole */
#define POLICY_LIM_MSG_MINUTE_USER  0x02u /* messages_per_minute_per_user: each remote user */
#define POLICY_LIM_NEW_CONV_HOUR    0x04u /* new_conversations_per_hour: the rule's subject as a whole */
#define POLICY_LIM_CONSENT_REQ_DAY  0x08u /* consent_requests_per_day: the rule's subject as a whole */
#define POLICY_LIM_MAX_BODY         0x10u /* max_body_bytes */
#define POLICY_LIM_MAX_ATTACH       0x20u /* max_attachment_bytes (sum of an event's attachments) */
#define POLICY_LIM_CONTENT_KINDS    0x40u /* content_kinds: the kinds allowed */
#define POLICY_LIM_NEW_CONV_HOUR_USER   0x80u  /* new_conversations_per_hour_per_user: each remote user */
#define POLICY_LIM_CONSENT_REQ_DAY_USER 0x100u /* consent_requests_per_day_per_user: each remote user */
/* Outbound only (since the twenty-sixth session): a local user's events to
 * the remote parties the rule matches, a bucket per local sender. */
#define POLICY_LIM_OUT_MSG_MINUTE_USER  0x200u /* outbound_messages_per_minute_per_user */
#define POLICY_LIM_OUT_NEW_CONV_HOUR_USER 0x400u /* outbound_new_conversations_per_hour_per_user */

struct policy_limits {
	unsigned set;
	uint32_t messages_per_minute;
	uint32_t messages_per_minute_per_user;
	uint32_t new_conversations_per_hour;
	uint32_t consent_requests_per_day;
	uint64_t max_body_bytes;
	uint64_t max_attachment_bytes;
	unsigned content_kinds;       /* POLICY_KIND_* allowed */
	uint32_t new_conversations_per_hour_per_user;
	uint32_t consent_requests_per_day_per_user;
	/* Outbound: every event but typing and receipts a local user sends to
	 * the remote parties the rule matches, each local user a bucket; and
	 * the conversations a local user starts with them (a message in a
	 * direct room to a remote user she has no consent fact about: she
	 * never wrote to them nor accepted them).  The inbound limits above
	 * never apply outbound, nor these inbound. */
	uint32_t outbound_messages_per_minute_per_user;
	uint32_t outbound_new_conversations_per_hour_per_user;
	/* The rule's limits are applied in addition to those of the ordinary
	 * rules (the most specific that sets each), never instead: they only
	 * ever tighten.  So every matching one applies, not only the most
	 * specific.  The automatic limit after abuse reports is one, so that
	 * a reported user stays in their domain's shared buckets, ordinary
	 * and in_addition alike. */
	bool in_addition;
};

/* Token buckets, kept by the caller.  take() takes one token from the bucket
 * named key (NUL-terminated, at most POLICY_RATE_KEY_MAX bytes), which holds
 * at most capacity tokens and refills capacity tokens per period_ms; it
 * returns 0 when a token was taken, else the milliseconds until one will be
 * available (> 0).  peek() answers the same without taking: 0 when a token
 * is there, else the wait; it never takes a token nor changes the
 * bucket's fill (the gateway's memo counts its refusal in the bucket's
 * episode, to record a flood once: gateway/policy_live.h).  Since the
 * twenty-eighth session: a local user's outbound limits asked of a message
 * step 4 refuses; NULL: they are not asked of it.  Keys:
 * "<limit>:<rule id>:<subject>", limit one of mpm (messages_per_minute),
 * mpu (messages_per_minute_per_user), ncu (new conversations), ncp (new
 * conversations per user), cru (MIMI consent requests), crp (MIMI consent
 * requests per user), crf (first contacts' consent requests), cfp (first
 * contacts' consent requests per user), omp (outbound messages per local
 * user), onp (outbound new conversations per local user).  The subject is
 * the sender's URI for the per-user ones (mpu, ncp, crp, cfp, omp, onp; the
 * local sender's for omp and onp), else the rule's pattern: one bucket for
 * all that the rule matches, so that rotating user names or subdomains does
 * not escape a domain's or network's limit (a user rule's pattern is the
 * user). */
#define POLICY_RATE_KEY_MAX 2200
struct policy_rate {
	int64_t (*take)(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms);
	void *ctx;
	int64_t (*peek)(void *ctx, const char *key, uint32_t capacity, int64_t period_ms, int64_t now_ms);
};

/* One party: a user URI (mimi://<domain>/u/<local>), its domain (lower
 * case) and its network (matrix, xmpp, local, peer:<name>). */
struct policy_party {
	const char *uri;
	const char *domain;
	const char *network;
};

struct policy_request {
	enum policy_direction direction;
	enum policy_action action;
	const char *event_type;       /* "message", "edit", "delete", "reaction", "receipt",
	                                 "typing", "membership", "block"; ACT_EVENT only */
	struct policy_party sender;
	struct policy_party recipient; /* uri NULL: none (ACT_NEW_ROOM) */
	uint64_t body_bytes;
	uint64_t attachment_bytes;
	unsigned content_kinds;       /* POLICY_KIND_* */
	int64_t now_ms;               /* wall clock, for rule expiry and buckets */
	const struct policy_rate *rate; /* NULL: rate limits are not applied */
	bool recipient_wrote_here;    /* inbound: the local recipient has written a message in
	                                 this group (the event's room) since the sender became
	                                 a member: consent to them there, and an opt-in unless
	                                 they opted out */
	bool group;                   /* outbound: the event's room is a group (a message there
	                                 starts no conversation with its members) */
	bool started_in_request;      /* outbound: an earlier message of the same job (a Matrix
	                                 transaction, or requests written together) started this
	                                 conversation: its consent fact is written with this one,
	                                 after the snapshot was taken, and this one starts none */
	bool invitation;              /* a membership event that invites someone (outbound limits
	                                 count it; a join or leave they do not) */
};

struct policy_decision {
	enum policy_verdict verdict;
	const char *reason;           /* a stable reason code (static string) */
	int64_t rule_id;              /* 0: no rule decided (default, consent fact) */
	int64_t retry_after_ms;       /* POLICY_LIMIT: > 0 */
	unsigned refused_kinds;       /* content_kind_disabled: the request's POLICY_KIND_*
	                                 the rule does not allow; else 0 */
};

/* Reason codes (docs/policy.md lists them with their meaning):
 * deny:  server_denied_user, server_denied_domain, server_denied_network,
 *        user_blocked_sender, user_blocked_domain, user_blocked_recipient,
 *        recipient_blocked_sender, too_large, content_kind_disabled,
 *        server_closed, server_not_allowlisted, user_not_opted_in,
 *        no_consent_yet (typing/receipt that cannot be held)
 * limit: rate_limited_domain, rate_limited_network, rate_limited_user,
 *        rate_limited_sender, rate_limited_new_conversations,
 *        rate_limited_sender_new_conversations,
 *        rate_limited_consent_requests,
 *        rate_limited_sender_consent_requests,
 *        rate_limited_recipient_consent_requests (a first contact's: the local
 *        recipient's own bound, rule id 0; decided by the write that would
 *        store the request, adapters/peer/peer_api.c, not here),
 *        rate_limited_local_sender, rate_limited_local_sender_new_conversations
 *        (outbound: the local sender's own limits)
 * hold:  no_consent_yet
 * allow: user_allowed_sender, user_allowed_domain, user_wrote_in_group, outbound, transit,
 *        new_room */
extern const char *const policy_reason_codes[];

struct policy_snapshot; /* immutable once built; share freely between threads */
struct policy_builder;

struct policy_builder *policy_builder_new(void);
void policy_builder_free(struct policy_builder *b);
/* Defaults (open and opted out unless set). */
void policy_builder_defaults(struct policy_builder *b, enum policy_mode default_mode, bool optin_default);
/* Adds a rule; mode NONE when it only sets limits; limits may be NULL.
 * expires_ms 0: never (else the rule is ignored from that wall time on).
 * Patterns: domain "a.example" or "*.example" (lower case); network
 * "matrix", "peer:gk" or "peer:*"; user a mimi:// URI.  Returns 0, -1 for a
 * malformed pattern or a (scope, pattern) given twice, -2 out of memory. */
int policy_builder_rule(struct policy_builder *b, int64_t id, enum policy_scope scope, const char *pattern,
			enum policy_mode mode, const struct policy_limits *limits, int64_t expires_ms);
/* A local user's explicit opt-in (or out) for a remote network. */
int policy_builder_optin(struct policy_builder *b, const char *local_uri, const char *network, bool opted_in);
/* A local user's decision about a remote user (by URI) or domain. */
int policy_builder_consent(struct policy_builder *b, const char *local_uri, bool subject_is_domain,
			   const char *subject, bool allowed);
/* A remote user does not want to be contacted by this local user (MIMI
 * updateConsent revoked, or a peer block). */
int policy_builder_remote_block(struct policy_builder *b, const char *remote_uri, const char *local_uri);
/* An overlay: a snapshot that holds the whole current facts of a few local
 * users and takes everything else (rules, defaults, every other user's
 * facts) from base, which must outlive it.  A change of one user's consent
 * then costs a snapshot of that user's facts, not a rebuild of all (90 ms
 * at 100,000 facts).  base is a full snapshot (an overlay's base is taken
 * when an overlay is given).  Each local user whose facts it holds is
 * named with policy_builder_user (with no facts: the user has none now);
 * facts of users not named are ignored. */
struct policy_builder *policy_builder_overlay(const struct policy_snapshot *base);
int policy_builder_user(struct policy_builder *b, const char *local_uri);
/* Compiles the snapshot and frees the builder (also on failure: NULL, out
 * of memory). */
struct policy_snapshot *policy_builder_finish(struct policy_builder *b, uint64_t version);

void policy_snapshot_free(struct policy_snapshot *s);
uint64_t policy_snapshot_version(const struct policy_snapshot *s);
size_t policy_snapshot_rule_count(const struct policy_snapshot *s);
/* Whether any rule (expired or not) sets a limit on what a message holds
 * (max_body_bytes, max_attachment_bytes, content_kinds): without one, a
 * request's body_bytes, attachment_bytes and content_kinds decide nothing. */
bool policy_snapshot_limits_content(const struct policy_snapshot *s);
/* opt-ins + consents + remote blocks in force (an overlay: its own of the
 * users it names, and its base's of the others) */
size_t policy_snapshot_fact_count(const struct policy_snapshot *s);
/* The full snapshot an overlay is made over; s itself when it is full. */
const struct policy_snapshot *policy_snapshot_base(const struct policy_snapshot *s);

/* The decision.  s may be NULL: an empty snapshot (defaults open, opted
 * out). */
void policy_decide(const struct policy_snapshot *s, const struct policy_request *r, struct policy_decision *d);

/* The facts the snapshot holds, as loaded: -1 none, 0 opted out / blocked,
 * 1 opted in / allowed.  s may be NULL (no facts). */
int policy_optin_fact(const struct policy_snapshot *s, const char *local_uri, const char *network);
/* policy.optin_default as loaded: what a local user with no opt-in fact
 * for a network is taken to be (false when s is NULL, as decided). */
bool policy_optin_default(const struct policy_snapshot *s);
int policy_consent_fact(const struct policy_snapshot *s, const char *local_uri, bool subject_is_domain,
			const char *subject);
/* Whether remote user remote_uri blocked local user local_uri (a peer's
 * POST /v1/blocks, block event or revoked consent: the fact step 2 reads
 * for recipient_blocked_sender).  s may be NULL (no facts). */
bool policy_remote_block_fact(const struct policy_snapshot *s, const char *remote_uri, const char *local_uri);

/* What a deny reason means to the local user whose message it stopped
 * (outbound), as the end of "Not delivered: ...": this server's rules,
 * the user's own decisions, her own outbound limits, and a remote user's
 * block of her (which she may know: the Matrix bot's list shows it).
 * NULL for what is not hers to learn (a remote sender's limit) and for a
 * reason it does not know. */
const char *policy_reason_text(const char *reason);
/* The same for a decision: for content_kind_disabled, the words name the
 * kinds refused (d->refused_kinds: text, files, or both), not one kind
 * whatever was refused; otherwise policy_reason_text(d->reason). */
const char *policy_decision_text(const struct policy_decision *d);
/* Whether a deny reason is the server's rules' or the local user's opt-in
 * (not a consent fact, a size or a rate limit): what a change of the
 * rules asks again of every message waiting, and a held message's
 * release too. */
bool policy_reason_is_servers(const char *reason);
/* Whether a deny reason is a limit on the message itself, its size or its
 * content kinds (too_large, content_kind_disabled): what a held message's
 * release asks again besides (a rate limit stays decided at arrival). */
bool policy_reason_is_content(const char *reason);
const char *policy_verdict_name(enum policy_verdict v);
const char *policy_mode_name(enum policy_mode m);
const char *policy_scope_name(enum policy_scope s);
/* Parsing of the names above; false when unknown. */
bool policy_mode_parse(const char *s, enum policy_mode *out);
bool policy_scope_parse(const char *s, enum policy_scope *out);

#endif
