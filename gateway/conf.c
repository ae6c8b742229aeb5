/* The option table and the INI (libinih) + environment loader. */
#include "config.h"
#include "conf.h"
#include "ini_lines.h"
#include "http.h"
#include "peer/event.h"
#include "xmpp/xmpp.h"
#include "log.h"
#include "matrix/mx_id.h"
#include "store.h"
#include "utf8.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <ini.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#define OFF(f) offsetof(struct cw_config, f)

const struct cfg_option cfg_options[] = {
	{ "server", "listen_address", CFG_STR, OFF(listen_address), "127.0.0.1", 0, 0, false, false,
	  "IPv4 or IPv6 address the HTTP front listens on" },
	{ "server", "port", CFG_INT, OFF(port), "8480", 0, 65535, false, false,
	  "TCP port of the HTTP front (0: any free port, printed at start)" },
	{ "server", "http_threads", CFG_INT, OFF(http_threads), "2", 1, 64, false, false,
	  "size of libmicrohttpd's thread pool" },
	{ "server", "connection_limit", CFG_INT, OFF(connection_limit), "1024", 8, 100000, false, false,
	  "most HTTP connections open at once" },
	{ "server", "connection_limit_per_client", CFG_INT, OFF(connection_limit_per_client), "0", 0, 100000, false,
	  false, "most HTTP connections open at once from one client address (0: no limit but connection_limit; "
	  "behind a reverse proxy every connection is the proxy's)" },
	{ "server", "connection_timeout_s", CFG_INT, OFF(connection_timeout_s), "30", 1, 3600, false, false,
	  "idle HTTP connections are closed after this many seconds, and one whose request head (request line "
	  "and headers) is not whole this long (and a second) after it was accepted or its last request ended, "
	  "and one whose request body is read slower than that and a second more per 500 bytes from its head's end" },
	{ "server", "max_body_bytes", CFG_SIZE, OFF(max_body_bytes), "1MiB", 1024, 64L << 20, false, false,
	  "largest request body accepted (larger: 413), and about the most of stored events in one pull answer or "
	  "one delivery batch; suffixes KiB, MiB" },
	{ "server", "drain_timeout_ms", CFG_INT, OFF(drain_timeout_ms), "10000", 0, 600000, false, false,
	  "on SIGTERM, how long in-flight requests may take before the daemon exits anyway" },
	{ "server", "public_url", CFG_STR, OFF(public_url), "", 0, 0, false, false,
	  "URL peers and homeservers use to reach this daemon (empty: http://listen_address:port, 0.0.0.0 "
	  "as 127.0.0.1); peers' request signatures must cover it as their @target-uri, whatever Host they send: "
	  "set it whenever peers call another URL (a DNS name, TLS, a proxy); an absolute http or https URL with "
	  "a host, no user, query or fragment, in its normal form (host in lower case, no default port, no leading zero in the port), at most "
	  "512 bytes (else the start fails)" },
	{ "server", "domain", CFG_STR, OFF(domain), "", 0, 0, false, false,
	  "this provider's domain, a lower-case DNS name with a dot, without a port: local users are mimi://DOMAIN/u/...; "
	  "the interop API is off while empty" },
	{ "server", "media_max_bytes", CFG_SIZE, OFF(media_max_bytes), "20MiB", 1024, 512L << 20, false, false,
	  "largest file carried across the gateway (re-hosted, or offered to a peer); larger ones become a text notice" },
	{ "server", "media_fetches", CFG_INT, OFF(media_fetches), "4", 1, 64, false, false,
	  "files fetched at once for peers, links in XMPP messages and vCard photos (more: 503 / resource-constraint, try again)" },
	{ "server", "media_link_lifetime_s", CFG_INT, OFF(media_link_lifetime_s), "604800", 60, 31622400, false, false,
	  "how long a link to a peer's file in an XMPP message (/media/...) can be followed (later: 410), and how "
	  "long a peer may fetch a local user's file offered to it (/v1/media/..., from when the event was sent or "
	  "pulled; later: 404), in seconds (7 days); either ends sooner with its message (deleted, expired, erased: "
	  "404)" },
	{ "server", "media_private_addresses", CFG_BOOL, OFF(media_private_addresses), "false", 0, 0, false, false,
	  "let fetches of URLs a peer names (its files, avatars) reach loopback, private and link-local addresses "
	  "(a test set-up, or a peer's store on your private network); off, they are refused (SSRF)" },
	{ "server", "ca_file", CFG_STR, OFF(ca_file), "", 0, 0, false, false,
	  "CA bundle (PEM) trusted for outbound HTTPS to peers, the homeserver and media (empty: the system's)" },
	{ "server", "policy_url", CFG_STR, OFF(policy_url), "", 0, 0, false, false,
	  "an https URL of this provider's interop policy, published in the peers' directory "
	  "(/.well-known/mimi-protocol-directory); empty: not published" },
	{ "server", "abuse_contact", CFG_STR, OFF(abuse_contact), "", 0, 0, false, false,
	  "where abuse is reported to this provider, published in the peers' directory: an https URL or a "
	  "mailto: address (mailto:abuse@example.org); empty: not published" },

	{ "peer", "signing_key_file", CFG_STR, OFF(signing_key_file), CW_STATE_DIR "/signing.key", 0, 0, false, false,
	  "Causeway's Ed25519 private key (PEM); created with mode 0600 on first start" },
	{ "peer", "signature_tag", CFG_STR, OFF(signature_tag), "causeway-interop", 0, 0, false, false,
	  "the tag parameter every request signature must carry (RFC 9421)" },
	{ "peer", "max_clock_skew_s", CFG_INT, OFF(max_clock_skew_s), "300", 5, 3600, false, false,
	  "a signature's created time may differ this much from ours" },
	{ "peer", "replay_cache_entries", CFG_INT, OFF(replay_cache_entries), "100000", 1000, 10000000, false, false,
	  "signature nonces remembered to refuse replays (per daemon process): the signed requests taken in "
	  "twice peer.max_clock_skew_s should fit (the default: 166 a second; about 60 bytes each)" },
	{ "peer", "max_batch", CFG_INT, OFF(peer_max_batch), "256", 1, 1024, false, false,
	  "most events a peer submits in one POST /v1/batch (more: 413), published in the directory; "
	  "the body is also bounded by server.max_body_bytes" },
	{ "peer", "max_long_polls", CFG_INT, OFF(peer_max_long_polls), "4", 1, 1000, false, false,
	  "most long polls (GET /v1/events with wait) one pull peer keeps waiting at once in this process, and "
	  "apart from them most of its pulls without wait being answered at once (more: 429 with Retry-After)" },

	{ "rooms", "max_members", CFG_INT, OFF(rooms_max_members), "1000", 2, 100000, false, false,
	  "most members (joined or invited) a group may have, published in the directory: a room created with "
	  "more, or an add that would take a group past it, is refused, whoever makes it (a peer's POST /v1/rooms "
	  "or /v1/rooms/{room}/members, a peer's user's own join: 413 too_large; an XMPP or Matrix member's "
	  "invitation), and nothing is changed; a group above it (made before, or the bound lowered since) keeps "
	  "its members and takes no new one until it is below" },

	{ "dispatcher", "batch_max", CFG_INT, OFF(dispatch_batch_max), "250", 1, 1000, false, false,
	  "most outbox rows claimed at once and sent to one destination in one request (peers take 256 a request)" },
	{ "dispatcher", "retry_budget", CFG_INT, OFF(retry_budget), "12", 1, 1000, false, false,
	  "delivery attempts before a row is dead-lettered" },
	{ "dispatcher", "retry_base_ms", CFG_INT, OFF(retry_base_ms), "500", 10, 3600000, false, false,
	  "first retry delay (at most retry_max_ms); doubles with each attempt (and with each 429 without Retry-After in a row, "
	  "which spends no attempt), with 50-100 % jitter" },
	{ "dispatcher", "retry_max_ms", CFG_INT, OFF(retry_max_ms), "300000", 10, 86400000, false, false,
	  "longest delay between two attempts" },
	{ "dispatcher", "typing_stale_ms", CFG_INT, OFF(typing_stale_ms), "30000", 100, 3600000, false, false,
	  "a typing notification not sent within this time of its acceptance is expired, not sent late (best-effort)" },
	{ "dispatcher", "claim_timeout_s", CFG_INT, OFF(claim_timeout_s), "60", 5, 3600, false, false,
	  "a claimed row not finished in this time (its daemon died) is due again" },
	{ "dispatcher", "http_timeout_ms", CFG_INT, OFF(http_timeout_ms), "10000", 100, 600000, false, false,
	  "timeout of one outbound HTTP request to a peer" },
	{ "dispatcher", "lanes", CFG_INT, OFF(dispatch_lanes), "4", 1, 64, false, false,
	  "destinations delivered to at once, each on a thread and a database connection of its own: a destination that answers slowly holds up only its lane" },

	{ "policy", "sweep_interval_ms", CFG_INT, OFF(policy_sweep_interval_ms), "2000", 100, 600000, false, false,
	  "how often held messages are released or dropped by the users' consent and expired ones deleted" },
	{ "policy", "reload_interval_s", CFG_INT, OFF(policy_reload_interval_s), "60", 1, 3600, false, false,
	  "rules and consent are reloaded on every change (NOTIFY) and at least this often" },
	{ "policy", "rate_buckets", CFG_INT, OFF(policy_rate_buckets), "65536", 1024, 16777216, false, false,
	  "token buckets kept for rate limits (per daemon process; the least recently used is reused)" },

	{ "retention", "content_days", CFG_INT, OFF(retention_content_days), "30", 0, 3650, false, false,
	  "an event's content is erased this many days after its acceptance once no delivery of it is open "
	  "(pending, held, in flight, failed, dead); rows and ids stay (0: kept for ever)" },
	{ "retention", "idempotency_days", CFG_INT, OFF(retention_idempotency_days), "7", 0, 3650, false, false,
	  "the idempotency keys of room creations are forgotten after this many days (0: kept for ever); "
	  "an event's key stays with the event" },
	{ "retention", "attempts_days", CFG_INT, OFF(retention_attempts_days), "30", 0, 3650, false, false,
	  "delivery attempts (the admin message trace) are deleted after this many days, but those of a message "
	  "still open (a dead letter, or one replayed and not yet delivered: its replay looks for what they sent) "
	  "(0: kept for ever)" },
	{ "retention", "rows_days", CFG_INT, OFF(retention_rows_days), "0", 0, 3650, false, false,
	  "an event is deleted with its deliveries and native ids, a message with its edits, deletes and reactions, "
	  "once all of them are this many days old and no delivery of them or of a reply to them is open "
	  "(0: kept for ever; 365 is a reasonable setting, docs/operations.md)" },
	{ "retention", "audit_days", CFG_INT, OFF(retention_audit_days), "0", 0, 3650, false, false,
	  "audit log records (policy decisions, administrative changes) are deleted this many days after they were "
	  "written, but an operator's consent change an XMPP component has not yet sent to its rosters "
	  "(0: kept for ever; a year, like rows_days, is a reasonable setting, docs/operations.md)" },
	{ "retention", "reports_days", CFG_INT, OFF(retention_reports_days), "365", 0, 3650, false, false,
	  "abuse reports the operator handled or dismissed are deleted this many days after that (and never within "
	  "policy.report_window_seconds of being made); an open report is kept until handled (0: kept for ever)" },
	{ "retention", "consent_requests_days", CFG_INT, OFF(retention_consent_requests_days), "30", 0, 3650, false,
	  false,
	  "consent requests answered or expired are deleted this many days after that (7 at least, and never within "
	  "policy.consent_request_window_seconds); a pending request is kept (0: kept for ever)" },
	{ "retention", "interval_s", CFG_INT, OFF(retention_interval_s), "60", 1, 86400, false, false,
	  "how often the retention sweep runs (every second while it finds a full batch of 1000 due)" },

	{ "database", "url", CFG_STR, OFF(db_url), "", 0, 0, false, true,
	  "libpq connection URL or key=value string of the PostgreSQL database (required)" },
	{ "database", "schema_dir", CFG_STR, OFF(schema_dir), CW_SCHEMA_DIR, 0, 0, false, false,
	  "directory holding the numbered SQL migrations (NNN_name.sql)" },
	{ "database", "pool_size", CFG_INT, OFF(db_pool_size), "2", 1, 64, false, false,
	  "connections for reads (the group-commit writer has one more of its own)" },
	{ "database", "batch_max", CFG_INT, OFF(db_batch_max), "256", 1, 10000, false, false,
	  "most queued writes committed in one group-commit transaction" },
	{ "database", "batch_delay_us", CFG_INT, OFF(db_batch_delay_us), "500", 0, 50000, false, false,
	  "how long the writer lets a batch fill before committing it (microseconds); skipped after a batch of a single write" },
	{ "database", "request_timeout_ms", CFG_INT, OFF(db_request_timeout_ms), "5000", 100, 600000, false, false,
	  "deadline of a queued database job; past it the request answers 503" },
	{ "database", "statement_timeout_ms", CFG_INT, OFF(db_statement_timeout_ms), "10000", 100, 3600000, false, false,
	  "PostgreSQL statement_timeout set on every connection but the migrations' and the start's move of local "
	  "users (they run to their end; the move's wait for a lock is bounded by it)" },
	{ "database", "retry_after_s", CFG_INT, OFF(db_retry_after_s), "2", 1, 3600, false, false,
	  "Retry-After sent with 503 while the database is away" },
	{ "database", "reconnect_max_ms", CFG_INT, OFF(db_reconnect_max_ms), "5000", 50, 600000, false, false,
	  "upper bound of the exponential reconnect backoff" },
	{ "database", "startup_timeout_ms", CFG_INT, OFF(db_startup_timeout_ms), "30000", 0, 3600000, false, false,
	  "how long start-up waits for the database before giving up" },

	{ "matrix", "homeserver_url", CFG_STR, OFF(mx_homeserver_url), "", 0, 0, false, false,
	  "client-server API base URL of the Matrix homeserver (e.g. http://127.0.0.1:8008); empty: the Matrix adapter is off" },
	{ "matrix", "server_name", CFG_STR, OFF(mx_server_name), "", 0, 0, false, false,
	  "the homeserver's server name (the part after ':' in its user ids); default server.domain (localhost "
	  "when that is empty too)" },
	{ "matrix", "id", CFG_STR, OFF(mx_id), "causeway", 0, 0, false, false,
	  "the application service's id in its registration and its ping's path: 1 to 255 bytes of UTF-8 without "
	  "white space, control characters or characters that show nothing" },
	{ "matrix", "url", CFG_STR, OFF(mx_url), "", 0, 0, false, false,
	  "the URL at which the homeserver reaches causewayd (registration url); default http://<listen_address>:<port>" },
	{ "matrix", "as_token", CFG_STR, OFF(mx_as_token), "", 0, 0, false, true,
	  "the token causewayd presents to the homeserver (from the registration)" },
	{ "matrix", "hs_token", CFG_STR, OFF(mx_hs_token), "", 0, 0, false, true,
	  "the token the homeserver presents to causewayd (from the registration)" },
	{ "matrix", "sender_localpart", CFG_STR, OFF(mx_sender_localpart), "_cw_bot", 0, 0, false, false,
	  "localpart of the gateway's bot (the management room): a-z 0-9 . _ = - / +" },
	{ "matrix", "user_prefix", CFG_STR, OFF(mx_user_prefix), "_cw_", 0, 0, false, false,
	  "localpart prefix of the ghost users standing for remote users (an exclusive namespace): 1 to 64 of "
	  "a-z 0-9 . _ = - / +" },
	{ "matrix", "alias_prefix", CFG_STR, OFF(mx_alias_prefix), "_cw_", 0, 0, false, false,
	  "alias prefix of the gateway's rooms (an exclusive namespace): 1 to 64 of a-z 0-9 . _ = - / +" },
	{ "matrix", "max_transaction_bytes", CFG_SIZE, OFF(mx_max_txn_bytes), "16MiB", 1L << 20, 256L << 20, false, false,
	  "largest homeserver transaction body taken (100 events of up to 64 KiB, and ephemeral data), "
	  "for a request that carries the hs_token; server.max_body_bytes bounds every other request" },

	{ "xmpp", "components", CFG_STR, OFF(xmpp_components), "", 0, 0, false, false,
	  "external components (XEP-0114), one per remote network: DOMAIN=PEER pairs separated by spaces or commas "
	  "(e.g. gk.example.org=gk); empty: the XMPP adapter is off" },
	{ "xmpp", "server_host", CFG_STR, OFF(xmpp_server_host), "127.0.0.1", 0, 0, false, false,
	  "host of the XMPP server's component port (keep it on loopback or a private link: XEP-0114 has no TLS)" },
	{ "xmpp", "server_port", CFG_INT, OFF(xmpp_server_port), "5347", 1, 65535, false, false,
	  "the XMPP server's component port" },
	{ "xmpp", "secret", CFG_STR, OFF(xmpp_secret), "", 0, 0, false, true,
	  "the components' shared secret (component_secret in Prosody, password in ejabberd)" },
	{ "xmpp", "domain", CFG_STR, OFF(xmpp_domain), "", 0, 0, false, false,
	  "the XMPP domain of this provider's users (alice@DOMAIN is mimi://server.domain/u/alice); default server.domain" },
	{ "xmpp", "reconnect_max_ms", CFG_INT, OFF(xmpp_reconnect_max_ms), "30000", 100, 3600000, false, false,
	  "upper bound of the exponential backoff between two connection attempts" },
	{ "xmpp", "resend_window_ms", CFG_INT, OFF(xmpp_resend_window_ms), "10000", 0, 600000, false, false,
	  "stanzas first written this long before a stream broke, or written since the server last answered a "
	  "ping, are written again (same id) after the reconnect" },
	{ "xmpp", "dedup_window_s", CFG_INT, OFF(xmpp_dedup_window_s), "600", 1, 86400, false, false,
	  "a stanza from a local user with the same conversation, id and content as one taken this many seconds "
	  "before or less is a resend (stored once); later, the same id is a new message (ids are unique per "
	  "stream only, RFC 6120 8.1.3); a stanza with an origin-id (XEP-0359) is a resend whenever it comes "
	  "again" },
	{ "xmpp", "max_stanza_bytes", CFG_SIZE, OFF(xmpp_max_stanza_bytes), "1MiB", 10000, 64L << 20, false, false,
	  "largest stanza taken from the XMPP server, from its start tag to its end tag; a larger one is refused "
	  "(its sender gets policy-violation) and the stream goes on; a single tag, or the stream header, larger "
	  "than it closes the stream with policy-violation (at least 10000: RFC 6120 13.12)" },
	{ "xmpp", "command_session_lifetime_s", CFG_INT, OFF(xmpp_command_session_lifetime_s), "600", 1, 86400,
	  false, false,
	  "how long an ad-hoc command's form stays valid (XEP-0050 session), in seconds; submitted later: "
	  "session-expired, and the user starts the command again" },
	{ "xmpp", "user_groups_per_day", CFG_INT, OFF(xmpp_user_groups_per_day), "20", 1, 100000, false, false,
	  "how many new groups one local user may make in any 24 hours by joining a room nobody has (counted from "
	  "the groups stored, in every process alike: docs/xmpp.md); past it the join is refused "
	  "(resource-constraint, type wait) and nothing is made; joining a group that exists is never limited" },

	{ "admin", "token_sha256", CFG_STR, OFF(admin_token_sha256), "", 0, 0, true, true,
	  "hex SHA-256 of the bootstrap admin token, role admin, name config (causewayd --new-admin-token makes one); "
	  "empty: only named tokens (docs/admin-api.md)" },

	{ "log", "level", CFG_LOGLEVEL, OFF(log_level), "info", 0, 0, true, false,
	  "error, warn, info or debug" },
	{ "log", "access_log", CFG_BOOL, OFF(access_log), "true", 0, 0, true, false,
	  "one logfmt line per HTTP request" },
};
const size_t cfg_option_count = CW_ARRAY_LEN(cfg_options);

#define FIELD(c, o, T) ((T *)((char *)(c) + (o)->offset))
#define CFIELD(c, o, T) ((const T *)((const char *)(c) + (o)->offset))

static const struct cfg_option *find_option(const char *section, const char *name)
{
	for (size_t i = 0; i < cfg_option_count; i++)
		if (strcmp(cfg_options[i].section, section) == 0 && strcmp(cfg_options[i].name, name) == 0)
			return &cfg_options[i];
	return NULL;
}

static cw_err parse_long(const char *v, long *out, bool size_suffix)
{
	if (!*v || isspace((unsigned char)*v))
		return CW_EINVAL;
	errno = 0;
	char *end;
	long n = strtol(v, &end, 10);
	if (errno || end == v)
		return CW_EINVAL;
	long mul = 1;
	if (size_suffix && *end) {
		if (strcasecmp(end, "KiB") == 0 || strcasecmp(end, "K") == 0)
			mul = 1024;
		else if (strcasecmp(end, "MiB") == 0 || strcasecmp(end, "M") == 0)
			mul = 1024L * 1024;
		else if (strcasecmp(end, "GiB") == 0 || strcasecmp(end, "G") == 0)
			mul = 1024L * 1024 * 1024;
		else
			return CW_EINVAL;
		end += strlen(end);
	}
	if (*end)
		return CW_EINVAL;
	if (n > LONG_MAX / mul || n < LONG_MIN / mul)
		return CW_EINVAL;
	*out = n * mul;
	return CW_OK;
}

static cw_err set_option(struct cw_config *c, const struct cfg_option *o, const char *value, cw_errmsg *e)
{
	switch (o->type) {
	case CFG_STR: {
		char *s = strdup(value);
		if (!s)
			return cw_fail(e, CW_ENOMEM, "out of memory");
		free(*FIELD(c, o, char *));
		*FIELD(c, o, char *) = s;
		return CW_OK;
	}
	case CFG_INT:
	case CFG_SIZE: {
		long n;
		if (parse_long(value, &n, o->type == CFG_SIZE))
			return cw_fail(e, CW_EINVAL, "%s.%s: '%s' is not %s", o->section, o->name, value,
				       o->type == CFG_SIZE ? "a size (e.g. 512KiB)" : "a whole number");
		if (n < o->min || n > o->max)
			return cw_fail(e, CW_EINVAL, "%s.%s: %ld is out of range %ld..%ld", o->section,
				       o->name, n, o->min, o->max);
		*FIELD(c, o, long) = n;
		return CW_OK;
	}
	case CFG_BOOL: {
		static const char *const yes[] = { "true", "yes", "on", "1" };
		static const char *const no[] = { "false", "no", "off", "0" };
		for (size_t i = 0; i < CW_ARRAY_LEN(yes); i++) {
			if (strcasecmp(value, yes[i]) == 0) { *FIELD(c, o, bool) = true; return CW_OK; }
			if (strcasecmp(value, no[i]) == 0) { *FIELD(c, o, bool) = false; return CW_OK; }
		}
		return cw_fail(e, CW_EINVAL, "%s.%s: '%s' is not true or false", o->section, o->name, value);
	}
	case CFG_LOGLEVEL: {
		int lvl = cw_log_level_parse(value);
		if (lvl < 0)
			return cw_fail(e, CW_EINVAL, "%s.%s: '%s' is not one of error, warn, info, debug",
				       o->section, o->name, value);
		*FIELD(c, o, long) = lvl;
		return CW_OK;
	}
	}
	return cw_fail(e, CW_EINTERNAL, "bad option type");
}

cw_err cfg_set(struct cw_config *c, const char *section, const char *name, const char *value, cw_errmsg *e)
{
	const struct cfg_option *o = find_option(section, name);
	if (!o)
		return cw_fail(e, CW_EINVAL, "%s.%s: unknown option", section, name);
	return set_option(c, o, value, e);
}

void cfg_defaults(struct cw_config *c)
{
	memset(c, 0, sizeof(*c));
	for (size_t i = 0; i < cfg_option_count; i++) {
		cw_errmsg e;
		cw_err rc = set_option(c, &cfg_options[i], cfg_options[i].def, &e);
		if (rc) { /* a broken table is a bug caught by the unit tests */
			fprintf(stderr, "causeway: bad default: %s\n", e.msg);
			abort();
		}
	}
}

size_t cfg_public_url_len(const struct cw_config *c)
{
	size_t n = c->public_url ? strlen(c->public_url) : 0;
	while (n && c->public_url[n - 1] == '/')
		n--;
	return n;
}

void cfg_free(struct cw_config *c)
{
	for (size_t i = 0; i < cfg_option_count; i++)
		if (cfg_options[i].type == CFG_STR) {
			free(*FIELD(c, &cfg_options[i], char *));
			*FIELD(c, &cfg_options[i], char *) = NULL;
		}
	for (size_t i = 0; i < c->nretired; i++)
		free(c->retired[i]);
	free(c->retired);
	c->retired = NULL;
	c->nretired = 0;
	if (c->pending)
		for (size_t i = 0; i < cfg_option_count; i++)
			free(c->pending[i]);
	free(c->pending);
	c->pending = NULL;
}

struct ini_ctx {
	struct cw_config *c;
	const char *path;
	cw_errmsg *e;
	int errors;
	struct ini_lines lines; /* the reader's (ini_lines.h) */
	int *seen;    /* per option of the table: the line that set it, 0: not yet */
	int first_error; /* the line of the first error on_ini_pair found, 0: none */
};

static int on_ini_pair(void *user, const char *section, const char *name, const char *value)
{
	struct ini_ctx *x = user;
	int lineno = x->lines.line;
	cw_errmsg e;
	if (!x->first_error)
		x->first_error = lineno; /* taken back below when the pair is good */
	/* An option set twice: which value the operator meant is a guess, and
	 * "the last one wins" hid a second `port =` pasted below the first
	 * (until the thirty-second session).  Refused, both lines named. */
	const struct cfg_option *o = find_option(section, name);
	if (o) {
		size_t i = (size_t)(o - cfg_options);
		if (x->seen[i]) {
			if (x->errors++ == 0)
				cw_fail(x->e, CW_EINVAL, "%s:%d: %s.%s is set twice (first on line %d); keep one",
					x->path, lineno, section, name, x->seen[i]);
			return 0;
		}
		x->seen[i] = lineno;
	}
	if (cfg_set(x->c, section, name, value, &e)) {
		if (x->errors++ == 0)
			cw_fail(x->e, CW_EINVAL, "%s:%d: %s", x->path, lineno, e.msg);
		return 0;
	}
	if (o && o->secret && o->type == CFG_STR && !x->c->file_secret && *value &&
	    strcmp(o->name, "token_sha256") != 0 && (o->offset != OFF(db_url) ||
						      store_url_has_password(value)))
		x->c->file_secret = o;
	if (!x->errors)
		x->first_error = 0;
	return 1;
}

void cfg_env_name(const struct cfg_option *o, char *buf, size_t len)
{
	snprintf(buf, len, "CAUSEWAY_%s_%s", o->section, o->name);
	for (char *p = buf; *p; p++)
		*p = (char)toupper((unsigned char)*p);
}

static const char *plain_getenv(const char *name) { return getenv(name); }

/* Names of the environment that look like an option's but are not: the
 * command-line tool's (docs/causewayctl.md). */
static const char *const env_not_options[] = { "CAUSEWAY_ADMIN_TOKEN" };

/* A CAUSEWAY_<SECTION>_<NAME> of the process's environment whose section
 * is one of the table's but whose name is no option of it: refused like an
 * unknown key in the file.  Until the thirty-first session such a typo
 * (CAUSEWAY_SERVER_PROT) was ignored and the default stayed in force.
 * The names are compared without regard to case: an option's name in
 * another case than upper (CAUSEWAY_server_port) is refused too, naming
 * the one it looks like, for getenv finds only the upper-case one and it
 * too was ignored without a word (until the thirty-sixth session).  Other
 * CAUSEWAY_ names (CAUSEWAY_CONFIG, CAUSEWAY_URL, the tests') are not the
 * daemon's, in any case. */
static cw_err env_unknown_option(cw_errmsg *e)
{
	extern char **environ;
	for (char **ev = environ; ev && *ev; ev++) {
		const char *eq = strchr(*ev, '=');
		size_t n = eq ? (size_t)(eq - *ev) : strlen(*ev);
		char name[128], up[128];
		if (strncasecmp(*ev, "CAUSEWAY_", 9) != 0 || n >= sizeof(name))
			continue;
		memcpy(name, *ev, n);
		name[n] = '\0';
		for (size_t i = 0; i <= n; i++)
			up[i] = (char)toupper((unsigned char)name[i]);
		bool known_section = false, option = false;
		for (size_t i = 0; i < cfg_option_count && !option; i++) {
			char on[128];
			cfg_env_name(&cfg_options[i], on, sizeof(on));
			size_t sl = 9 + strlen(cfg_options[i].section);
			known_section = known_section || (strncmp(up, on, sl + 1) == 0 && n > sl);
			option = strcmp(up, on) == 0;
		}
		bool not_ours = false;
		for (size_t i = 0; i < sizeof(env_not_options) / sizeof(env_not_options[0]) && !not_ours; i++)
			not_ours = strcmp(up, env_not_options[i]) == 0;
		if (not_ours)
			continue;
		if (option && strcmp(name, up) != 0)
			return cw_fail(e, CW_EINVAL, "environment %s: not an option: option names in the environment are "
				       "upper case (did you mean %s?)", name, up);
		if (known_section && !option)
			return cw_fail(e, CW_EINVAL, "environment %s: unknown option (CAUSEWAY_<SECTION>_<NAME> names an "
				       "option of docs/configuration.md's table)", name);
	}
	return CW_OK;
}

/* Whether u has no such part (none: the code libcurl answers then). */
static bool url_lacks(CURLU *u, CURLUPart part, CURLUcode none)
{
	char *v = NULL;
	CURLUcode rc = curl_url_get(u, part, &v, 0);
	curl_free(v);
	return rc == none;
}

/* s as a refusal may quote it: a URL is refused when it carries a user
 * (matrix.homeserver_url, server.public_url, ...), and the password after
 * it must not reach the terminal or a log (docs/security.md: secrets never
 * in logs).  libcurl's parser takes the password out; a value it cannot
 * parse is not quoted at all when it has an '@'.  Until the thirty-fourth
 * session the whole value was quoted. */
static void url_quotable(const char *s, char *buf, size_t len)
{
	CURLU *u = curl_url();
	char *pw = NULL, *out = NULL;
	bool parsed = u && curl_url_set(u, CURLUPART_URL, s, CURLU_NON_SUPPORT_SCHEME) == CURLUE_OK;
	if (parsed && curl_url_get(u, CURLUPART_PASSWORD, &pw, 0) == CURLUE_OK) {
		if (curl_url_set(u, CURLUPART_PASSWORD, "(password not shown)", 0) == CURLUE_OK &&
		    curl_url_get(u, CURLUPART_URL, &out, 0) == CURLUE_OK)
			snprintf(buf, len, "%s", out);
		else
			snprintf(buf, len, "%s", "(not shown: it has a password)");
	} else if (!parsed && strchr(s, '@')) {
		snprintf(buf, len, "%s", "(not shown: it may have a password)");
	} else {
		snprintf(buf, len, "%s", s);
	}
	curl_free(pw);
	curl_free(out);
	curl_url_cleanup(u);
}

/* Whether s is an absolute URL with a host and without a user or password,
 * https (or http too, http_too); libcurl's parser, which the daemon's
 * fetches use too.  base: without a query or fragment either (a base URL
 * that paths are appended to). */
static bool web_url_ok(const char *s, bool http_too, bool base)
{
	CURLU *u = curl_url();
	char *scheme = NULL, *host = NULL, *port = NULL;
	/* libcurl takes port 0, to which nothing connects: the homeserver's
	 * URL with it failed every request, and a public_url with it was no
	 * URL a peer could sign (until the forty-seventh session's review). */
	bool ok = u && curl_url_set(u, CURLUPART_URL, s, 0) == CURLUE_OK &&
		  curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
		  (strcmp(scheme, "https") == 0 || (http_too && strcmp(scheme, "http") == 0)) &&
		  curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK && *host &&
		  (curl_url_get(u, CURLUPART_PORT, &port, 0) != CURLUE_OK || strtol(port, NULL, 10) > 0) &&
		  url_lacks(u, CURLUPART_USER, CURLUE_NO_USER) &&
		  (!base || (url_lacks(u, CURLUPART_QUERY, CURLUE_NO_QUERY) &&
			     url_lacks(u, CURLUPART_FRAGMENT, CURLUE_NO_FRAGMENT)));
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_url_cleanup(u);
	return ok;
}

/* Whether s can be server.public_url: an absolute http or https URL with
 * a host (a port and a path may follow), without a user, a query or a
 * fragment, of printable ASCII and at most CFG_PUBLIC_URL_MAX bytes.
 * Every peer's signature covers it as the start of its @target-uri, and
 * the daemon's file links begin with it. */
static bool public_url_ok(const char *s)
{
	size_t n = strlen(s);
	if (n > CFG_PUBLIC_URL_MAX || (strncmp(s, "https://", 8) != 0 && strncmp(s, "http://", 7) != 0))
		return false;
	const char *after = strstr(s, "://") + 3; /* libcurl reads https:///v1 as the host v1 */
	if (!*after || *after == '/')
		return false;
	for (const unsigned char *p = (const unsigned char *)s; *p; p++)
		if (*p <= ' ' || *p >= 0x7f)
			return false;
	return !strchr(s, '?') && !strchr(s, '#') && web_url_ok(s, true, true);
}

/* Whether public_url_ok's s is in its normal form: its authority (after
 * the scheme, up to the path) without upper-case letters, and its port,
 * if any, neither the scheme's default (:443 for https, :80 for http) nor
 * written with a leading zero or empty. */
static bool public_url_normal(const char *s)
{
	bool tls = strncmp(s, "https://", 8) == 0;
	const char *a = s + (tls ? 8 : 7);
	size_t n = strcspn(a, "/");
	for (size_t i = 0; i < n; i++)
		if (a[i] >= 'A' && a[i] <= 'Z')
			return false;
	/* The port, after the host (an IPv6 address's brackets hold colons):
	 * written without leading zeros, which its normal form drops, and
	 * not the scheme's default (until the forty-seventh session's review
	 * https://gw.example:0443 was taken, and a peer's signature over
	 * https://gw.example never matched it). */
	const char *host_end = a[0] == '[' ? memchr(a, ']', n) : a;
	const char *colon = host_end ? memchr(host_end, ':', n - (size_t)(host_end - a)) : NULL;
	if (!colon)
		return true;
	const char *port = colon + 1, *dflt = tls ? "443" : "80";
	size_t pn = n - (size_t)(port - a);
	return pn > 0 && port[0] != '0' && !(pn == strlen(dflt) && strncmp(port, dflt, pn) == 0);
}

static bool https_url_ok(const char *s)
{
	return web_url_ok(s, false, false);
}

/* Whether s is mailto: and one address (RFC 6068, no header fields).
 * libcurl does not parse mailto:, but an address is a URL's userinfo@host
 * with the same percent-encoding, so it is read as https://ADDRESS: a
 * user, a host, and nothing else. */
static bool mailto_ok(const char *s)
{
	if (strncmp(s, "mailto:", 7) != 0 || strchr(s + 7, '/'))
		return false;
	char url[1024];
	if ((size_t)snprintf(url, sizeof(url), "https://%s", s + 7) >= sizeof(url))
		return false;
	CURLU *u = curl_url();
	char *user = NULL, *host = NULL;
	bool ok = u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		  curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK && *user &&
		  curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK && *host &&
		  url_lacks(u, CURLUPART_PASSWORD, CURLUE_NO_PASSWORD) && url_lacks(u, CURLUPART_PORT, CURLUE_NO_PORT) &&
		  url_lacks(u, CURLUPART_QUERY, CURLUE_NO_QUERY) && url_lacks(u, CURLUPART_FRAGMENT, CURLUE_NO_FRAGMENT);
	curl_free(user);
	curl_free(host);
	curl_url_cleanup(u);
	return ok;
}

/* The longest Matrix token taken: each request's Authorization header is
 * made in a buffer of 600 bytes. */
#define MX_TOKEN_MAX 512

/* Whether token can be a bearer token: it travels in an Authorization
 * header (and the homeserver splits that header at its spaces). */
static cw_err check_token(const char *name, const char *token, cw_errmsg *e)
{
	size_t n = strlen(token);
	if (n > MX_TOKEN_MAX)
		return cw_fail(e, CW_EINVAL, "%s is longer than %d bytes", name, MX_TOKEN_MAX);
	/* The INI file takes a value as written: copied from a YAML
	 * registration with its quotes, it is not the homeserver's token. */
	if (n >= 2 && (token[0] == '"' || token[0] == '\'') && token[n - 1] == token[0])
		return cw_fail(e, CW_EINVAL, "%s is wrapped in quotes, which would be part of the token: write it "
			       "without them (a value is taken as written, to the end of the line)", name);
	for (const unsigned char *p = (const unsigned char *)token; *p; p++)
		if (*p <= 0x20 || *p >= 0x7f)
			return cw_fail(e, CW_EINVAL, "%s has a %s: it cannot travel in an Authorization header", name,
				       *p == ' ' ? "space" : *p < 0x20 || *p == 0x7f ? "control character" : "non-ASCII byte");
	return CW_OK;
}

cw_err cfg_matrix_tokens_check(const char *as, const char *hs, cw_errmsg *e)
{
	cw_err rc = check_token("matrix.as_token", as, e);
	if (!rc)
		rc = check_token("matrix.hs_token", hs, e);
	if (!rc && strcmp(as, hs) == 0)
		rc = cw_fail(e, CW_EINVAL, "matrix.as_token and matrix.hs_token must differ");
	return rc;
}

/* Whether s is set (not NULL, not empty). */
static bool set(const char *s)
{
	return s && *s;
}

/* The longest matrix.user_prefix and alias_prefix taken: a ghost's user id
 * (prefix, network, remote localpart, server name) is at most 255 bytes. */
#define MX_PREFIX_MAX 64

/* matrix.id: the registration's id (matrix_print_registration) and a
 * segment of the ping's path (/_matrix/client/v1/appservice/{id}/ping).
 * The specification asks only for a string that never changes; one that
 * is empty, has white space or a control character (a value copied with
 * its line's tab, a name of two words), shows nothing, is not UTF-8 or
 * runs past MX_ID_MAX bytes names no application service an operator
 * could give the homeserver as written, and was taken until the
 * thirty-sixth session (the homeserver then refused the registration, or
 * the ping found no such service).  The value is not quoted back: it may
 * hold what a terminal should not be sent. */
static cw_err check_matrix_id(const char *id, cw_errmsg *e)
{
	size_t n = strlen(id);
	if (n == 0 || n > MX_ID_MAX)
		return cw_fail(e, CW_EINVAL, "matrix.id must be 1 to %d bytes (it is %zu): it is the application "
			       "service's id in its registration", MX_ID_MAX, n);
	for (size_t i = 0; i < n;) {
		unsigned cp;
		size_t k = cw_utf8_seq((const unsigned char *)id + i, n - i, &cp);
		if (k == 0)
			return cw_fail(e, CW_EINVAL, "matrix.id is not UTF-8 (byte %zu)", i + 1);
		if (cw_utf8_blank(cp))
			return cw_fail(e, CW_EINVAL, "matrix.id has white space or a control character (U+%04X at byte "
				       "%zu): the registration's id is one word, written without quotes", cp, i + 1);
		if (cw_utf8_invisible(cp))
			return cw_fail(e, CW_EINVAL, "matrix.id has a character that shows nothing (U+%04X at byte %zu)",
				       cp, i + 1);
		i += k;
	}
	return CW_OK;
}

/* The Matrix names the gateway makes: in the current localpart grammar
 * (mx_localpart_compliant), as the homeserver registers them.  Until the
 * thirty-first session an empty prefix passed: the registration's regex
 * became ^@.*:SERVER$, an exclusive claim on every user of the homeserver,
 * and every local user was taken for a ghost and refused. */
static cw_err check_matrix_names(const struct cw_config *c, cw_errmsg *e)
{
	const struct {
		const char *name, *value;
	} prefixes[] = { { "matrix.user_prefix", c->mx_user_prefix }, { "matrix.alias_prefix", c->mx_alias_prefix } };
	for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++) {
		const char *v = prefixes[i].value ? prefixes[i].value : "";
		if (!mx_localpart_compliant(v) || strlen(v) > MX_PREFIX_MAX)
			return cw_fail(e, CW_EINVAL, "%s must be 1 to %d of the characters a Matrix localpart allows "
				       "(a-z 0-9 . _ = - / +), not \"%.100s\": it is an exclusive namespace on the homeserver",
				       prefixes[i].name, MX_PREFIX_MAX, v);
	}
	if (!mx_localpart_compliant(c->mx_sender_localpart) || strlen(c->mx_sender_localpart) > MX_ID_MAX / 2)
		return cw_fail(e, CW_EINVAL, "matrix.sender_localpart must be a Matrix localpart (1 to %d of a-z 0-9 "
			       ". _ = - / +), not \"%.100s\"", MX_ID_MAX / 2,
			       c->mx_sender_localpart ? c->mx_sender_localpart : "");
	if (check_matrix_id(c->mx_id ? c->mx_id : "", e))
		return CW_EINVAL;
	/* The part after ':' of the bot's and every ghost's id: one that is no
	 * server name (a space, an '@', a port past 65535) was taken until the
	 * thirty-fourth session, and no ghost's id parsed, nor matched the
	 * registration's namespace: nothing was bridged. */
	if (set(c->mx_server_name) &&
	    (!mx_server_name_valid(c->mx_server_name) ||
	     strlen(c->mx_sender_localpart) + strlen(c->mx_server_name) + 2 > MX_ID_MAX))
		return cw_fail(e, CW_EINVAL, "matrix.server_name must be a Matrix server name (a DNS name or an IP "
			       "address, a port may follow: example.org, example.org:8448, [::1]:8448) that leaves the "
			       "bot's id @%s:NAME at most %d bytes, not \"%.100s\"", c->mx_sender_localpart, MX_ID_MAX,
			       c->mx_server_name);
	return CW_OK;
}

/* Whether s is a host getaddrinfo can look up: an IPv4 or IPv6 address,
 * or a DNS name (letters, digits, '-', dot-separated labels of 1 to 63,
 * at most 253 in all). */
static bool host_ok(const char *s)
{
	unsigned char addr[16];
	if (inet_pton(AF_INET, s, addr) == 1 || inet_pton(AF_INET6, s, addr) == 1)
		return true;
	size_t n = strlen(s), label = 0;
	if (n > 0 && s[n - 1] == '.') /* a fully qualified name's root */
		n--;
	if (n == 0 || n > 253)
		return false;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '.') {
			if (label == 0)
				return false;
			label = 0;
		} else if (isalnum((unsigned char)s[i]) || s[i] == '-' || s[i] == '_') {
			/* '_': no DNS host name has it, but container and
			 * /etc/hosts names do (xmpp_server), and the resolver
			 * takes them (a review found them refused) */
			if (++label > 63)
				return false;
		} else {
			return false;
		}
	}
	return label > 0;
}

/* Values of the file's own syntax that the daemon could not use, found at
 * the start or later (until the thirty-first session --check-config passed
 * them): a Matrix URL that is not one (the adapter then failed each
 * request), a CA file that is not there (each HTTPS fetch failed), an
 * empty or unquotable signature tag (every peer's signature refused). */
static cw_err check_values(const struct cw_config *c, cw_errmsg *e)
{
	const struct {
		const char *name, *value;
	} urls[] = { { "matrix.homeserver_url", c->mx_homeserver_url }, { "matrix.url", c->mx_url } };
	char shown[256];
	for (size_t i = 0; i < sizeof(urls) / sizeof(urls[0]); i++)
		if (set(urls[i].value) && !web_url_ok(urls[i].value, true, true)) {
			url_quotable(urls[i].value, shown, sizeof(shown));
			return cw_fail(e, CW_EINVAL, "%s must be an http or https URL with a host (and without a user, "
				       "query or fragment), not \"%.200s\"", urls[i].name, shown);
		}
	if (set(c->ca_file)) {
		struct stat st;
		FILE *f = fopen(c->ca_file, "r");
		if (!f)
			return cw_fail(e, CW_EINVAL, "server.ca_file: cannot read %.200s: %s", c->ca_file, strerror(errno));
		bool regular = fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode);
		/* A file without a certificate in PEM (DER, a key, the wrong
		 * file) was taken, and every outbound HTTPS request then failed
		 * (libcurl: "error setting certificate file"; until the
		 * forty-seventh session's review).  Other PEM blocks are passed
		 * over, as OpenSSL passes them. */
		int certs = 0;
		for (X509 *x; regular && certs < 1 && (x = PEM_read_X509(f, NULL, NULL, NULL)); certs++)
			X509_free(x);
		ERR_clear_error();
		fclose(f);
		if (!regular)
			return cw_fail(e, CW_EINVAL, "server.ca_file: %.200s is not a file (a CA bundle in PEM)", c->ca_file);
		if (!certs)
			return cw_fail(e, CW_EINVAL, "server.ca_file: %.200s holds no certificate in PEM (-----BEGIN "
				       "CERTIFICATE-----)", c->ca_file);
	}
	/* A signature's tag parameter is a structured-field string (RFC 8941):
	 * printable ASCII, and the daemon writes it unescaped. */
	bool tag_ok = set(c->signature_tag);
	for (const char *p = c->signature_tag; tag_ok && *p; p++)
		tag_ok = *p >= 0x20 && *p < 0x7f && *p != '"' && *p != '\\';
	if (!tag_ok)
		return cw_fail(e, CW_EINVAL, "peer.signature_tag must be 1 or more printable ASCII characters without "
			       "'\"' or '\\', not \"%.100s\"", c->signature_tag ? c->signature_tag : "");
	/* libstrophe connects to it as it stands: an empty one, or one with a
	 * port or a space, was taken until the thirty-fourth session, and
	 * every component stayed down, trying again for ever. */
	if (!host_ok(c->xmpp_server_host ? c->xmpp_server_host : ""))
		return cw_fail(e, CW_EINVAL, "xmpp.server_host must be a host name or an IP address (the port is "
			       "xmpp.server_port), not \"%.100s\"", c->xmpp_server_host ? c->xmpp_server_host : "");
	return CW_OK;
}

/* Every check of the options together and of what the daemon makes of
 * them: here, so that --check-config, the start (before the migrations)
 * and a reload refuse alike.  Until the twenty-fourth session the Matrix
 * and XMPP adapters and the HTTP front made some of them themselves, after
 * the migrations, and --check-config passed the file.  registration: for
 * --matrix-registration, which makes the Matrix tokens (so they need not
 * be set when matrix.homeserver_url is) and connects to no database (so
 * database.url need not be set: until the forty-fifth session it had to
 * be, and an operator who set up the homeserver first was refused). */
static cw_err cfg_check(const struct cw_config *c, bool registration, cw_errmsg *e)
{
	if (!set(c->db_url) && !registration)
		return cw_fail(e, CW_EINVAL, "database.url is not set (in the file or CAUSEWAY_DATABASE_URL)");
	if (set(c->db_url) && store_check_url(c->db_url, e))
		return CW_EINVAL;
	if (set(c->admin_token_sha256)) {
		bool hex = strlen(c->admin_token_sha256) == 64;
		for (const char *p = c->admin_token_sha256; hex && *p; p++)
			hex = (*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f');
		if (!hex)
			return cw_fail(e, CW_EINVAL, "admin.token_sha256 must be 64 lower-case hex digits");
	}
	if (set(c->xmpp_components) && set(c->mx_homeserver_url))
		return cw_fail(e, CW_EINVAL, "matrix.homeserver_url and xmpp.components are both set: a daemon serves "
			       "one local network (run one daemon per network; docs/xmpp.md)");
	if (xa_config_check(c, NULL, 0, NULL, NULL, e))
		return CW_EINVAL;
	if (set(c->mx_homeserver_url) && !registration && (!set(c->mx_as_token) || !set(c->mx_hs_token)))
		return cw_fail(e, CW_EINVAL, "matrix.homeserver_url is set but matrix.as_token or matrix.hs_token is "
			       "not (causewayd --matrix-registration makes both)");
	if (set(c->mx_homeserver_url) && set(c->mx_as_token) && set(c->mx_hs_token) &&
	    cfg_matrix_tokens_check(c->mx_as_token, c->mx_hs_token, e))
		return CW_EINVAL;
	if (check_matrix_names(c, e) || check_values(c, e))
		return CW_EINVAL;
	/* libmicrohttpd would take it, and the global limit would refuse
	 * first: a value no client can reach says the operator meant another. */
	if (c->connection_limit_per_client > c->connection_limit)
		return cw_fail(e, CW_EINVAL,
			       "server.connection_limit_per_client (%ld) is above server.connection_limit (%ld): "
			       "no client could open that many; lower it, or 0 for no limit per client",
			       c->connection_limit_per_client, c->connection_limit);
	/* The delays double from the first up to the longest: a first above
	 * the longest was never waited (every retry waited the longest, from
	 * the first on), and the operator meant one or the other (until the
	 * fiftieth session's review taken without a word). */
	if (c->retry_base_ms > c->retry_max_ms)
		return cw_fail(e, CW_EINVAL,
			       "dispatcher.retry_base_ms (%ld) is above dispatcher.retry_max_ms (%ld): the first retry's "
			       "delay would be cut to the longest; lower it, or raise retry_max_ms",
			       c->retry_base_ms, c->retry_max_ms);
	if (!set(c->listen_address))
		return cw_fail(e, CW_EINVAL, "server.listen_address is empty");
	if (cw_http_listen_address_check(c->listen_address, e))
		return CW_EINVAL;
	/* It names every local user (mimi://DOMAIN/u/...): a name peers could
	 * not parse back would refuse every room later, not at start.  The
	 * URIs' own check (until the twentieth session a check of its own,
	 * which took a single label such as localhost: the README's demo ran
	 * on it and no local user could be named, a review's finding). */
	cw_errmsg de;
	if (set(c->domain) && mimi_domain_check(c->domain, strlen(c->domain), &de))
		return cw_fail(e, CW_EINVAL, "server.domain must be a lower-case DNS name with a dot and without a port "
			       "(such as example.org), not \"%.100s\": %s", c->domain, de.msg);
	/* Until the thirty-first session any value was taken: one without a
	 * scheme started, and every peer request then failed its signature. */
	char shown[256];
	if (set(c->public_url) && !public_url_ok(c->public_url)) {
		url_quotable(c->public_url, shown, sizeof(shown));
		return cw_fail(e, CW_EINVAL,
			       "server.public_url must be an absolute http or https URL with a host (a port and a path "
			       "may follow), without a user, query or fragment, at most %d bytes, such as "
			       "https://causeway.example.org; not \"%.200s\"",
			       CFG_PUBLIC_URL_MAX, shown);
	}
	/* Written in its normal form (RFC 9110 §4.2.3: a host in lower case,
	 * no default port), as a peer's client most likely sends it: a peer
	 * signs the @target-uri it sends, and the daemon checks it against
	 * this value byte for byte, while its own pushes are signed over the
	 * normal form of the peer's push_url.  Until the forty-fourth session
	 * https://GW.example:443 was taken, and a peer that signed
	 * https://gw.example was refused every request. */
	if (set(c->public_url) && !public_url_normal(c->public_url)) {
		url_quotable(c->public_url, shown, sizeof(shown));
		return cw_fail(e, CW_EINVAL,
			       "server.public_url must be written in its normal form, its host in lower case and "
			       "without the scheme's default port (such as https://causeway.example.org), as peers "
			       "sign it; not \"%.200s\"", shown);
	}
	/* Both are shown to every peer as they are: a value a peer cannot
	 * follow is refused at start, not found out by the peer. */
	if (set(c->policy_url) && !https_url_ok(c->policy_url)) {
		url_quotable(c->policy_url, shown, sizeof(shown));
		return cw_fail(e, CW_EINVAL, "server.policy_url must be an https URL with a host, not \"%.200s\"",
			       shown);
	}
	if (set(c->abuse_contact) && !https_url_ok(c->abuse_contact) && !mailto_ok(c->abuse_contact)) {
		/* mailto:user:password@host would be quoted whole */
		if (strncmp(c->abuse_contact, "mailto:", 7) != 0)
			url_quotable(c->abuse_contact, shown, sizeof(shown));
		else
			snprintf(shown, sizeof(shown), "%s",
				 strchr(c->abuse_contact + 7, ':') ? "(not shown: it may have a password)"
								   : c->abuse_contact);
		return cw_fail(e, CW_EINVAL, "server.abuse_contact must be an https URL or a mailto: address, not \"%.200s\"",
			       shown);
	}
	return CW_OK;
}

/* Where the value a check of the options together refused came from, put
 * before e's message: "FILE:LINE: " when the file set it, "environment
 * CAUSEWAY_...: " when the environment did (and won), nothing for a
 * default.  The option is the one the message begins with (every check
 * names the option it refuses first).  Until the fiftieth session's review
 * these refusals (server.domain, server.public_url, the Matrix URLs,
 * server.ca_file, ...) named neither: the log's "configuration invalid"
 * did not say whether to mend the file, and which line, or the unit's
 * environment. */
static void where_refused(cw_errmsg *e, const char *path, const int *line, const bool *from_env)
{
	const struct cfg_option *o = NULL;
	for (size_t i = 0; i < cfg_option_count && !o; i++) {
		size_t sl = strlen(cfg_options[i].section), nl = strlen(cfg_options[i].name);
		const char *m = e->msg;
		if (strncmp(m, cfg_options[i].section, sl) == 0 && m[sl] == '.' &&
		    strncmp(m + sl + 1, cfg_options[i].name, nl) == 0 &&
		    !isalnum((unsigned char)m[sl + 1 + nl]) && m[sl + 1 + nl] != '_')
			o = &cfg_options[i];
	}
	if (!o)
		return;
	size_t i = (size_t)(o - cfg_options);
	char where[160];
	if (from_env[i]) {
		char env[128];
		cfg_env_name(o, env, sizeof(env));
		snprintf(where, sizeof(where), "environment %s: ", env);
	} else if (line[i]) {
		snprintf(where, sizeof(where), "%.120s:%d: ", path, line[i]);
	} else {
		return;
	}
	size_t wl = strlen(where), ml = strlen(e->msg);
	if (wl + ml >= sizeof(e->msg)) /* its end is cut, as cw_fail cuts */
		ml = sizeof(e->msg) - 1 - wl;
	memmove(e->msg + wl, e->msg, ml);
	memcpy(e->msg, where, wl);
	e->msg[wl + ml] = '\0';
}

static cw_err load(struct cw_config *c, const char *path, const char *(*getenv_fn)(const char *), bool registration,
		   cw_errmsg *e)
{
	cfg_defaults(c);
	/* per option: the file's line that set it (0: none), whether the
	 * environment set it */
	int *line = calloc(cfg_option_count, sizeof(*line));
	bool *from_env = calloc(cfg_option_count, sizeof(*from_env));
	cw_err rc = CW_EINVAL;
	if (!line || !from_env) {
		rc = cw_fail(e, CW_ENOMEM, "out of memory");
		goto out;
	}
	if (path) {
		FILE *f = fopen(path, "r");
		if (!f) {
			cw_fail(e, CW_EINVAL, "%s: cannot open: %s", path, strerror(errno));
			goto out;
		}
		struct ini_ctx x = { .c = c, .path = path, .e = e, .lines = { .f = f }, .seen = line };
		int prc = ini_parse_stream(ini_lines_read, &x.lines, on_ini_pair, &x);
		fclose(f);
		if (x.lines.read_errno) {
			cw_fail(e, CW_EINVAL, "%s: cannot read: %s", path, strerror(x.lines.read_errno));
			goto out;
		}
		if (x.lines.refusal && !x.errors) {
			char why[160] = "";
			if (x.lines.refusal == INI_LINE_OVERLONG)
				snprintf(why, sizeof(why), "line longer than %d bytes, which the INI parser (libinih) "
					 "cannot read whole", x.lines.max - 1);
			cw_fail(e, CW_EINVAL, "%s:%d: %s%s", path, x.lines.line, why,
				       x.lines.refusal == INI_LINE_OVERLONG
					       ? "; set a long value by the environment (CAUSEWAY_<SECTION>_<NAME>)"
				       : x.lines.refusal == INI_LINE_AFTER_SECTION
					       ? "text after the section's ']', which the INI parser (libinih) would "
						 "ignore; put each option on a line of its own"
				       : x.lines.refusal == INI_LINE_NUL ? INI_LINE_NUL_HINT
					       : "';' after a space starts a comment in this INI dialect (libinih), which "
						 "would cut the value here; put a comment on a line of its own, and set a "
						 "value holding \" ;\" by the environment (CAUSEWAY_<SECTION>_<NAME>)");
			goto out;
		}
		if (prc != 0 || x.errors) {
			/* A syntax error inih found itself, before any of ours:
			 * "[server" without its ']' left the options below it in
			 * the section above, and until the forty-seventh
			 * session's review the error named the first of them
			 * (database.port: unknown option), not the line to mend. */
			if (prc < 0 && !x.errors) {
				cw_fail(e, CW_ENOMEM, "%s: out of memory", path); /* inih's -2 */
			} else if (prc > 0 && (!x.errors || prc < x.first_error)) {
				cw_fail(e, CW_EINVAL, "%s:%d: syntax error (expected [section] or name = value)", path, prc);
				if (x.errors) {
					size_t n = strlen(e->msg);
					snprintf(e->msg + n, sizeof(e->msg) - n, " (and %d more errors)", x.errors);
				}
			} else if (x.errors > 1) {
				size_t n = strlen(e->msg);
				snprintf(e->msg + n, sizeof(e->msg) - n, " (and %d more errors)", x.errors - 1);
			}
			goto out;
		}
	}
	if (!getenv_fn)
		getenv_fn = plain_getenv;
	for (size_t i = 0; i < cfg_option_count; i++) {
		char name[128];
		cfg_env_name(&cfg_options[i], name, sizeof(name));
		const char *v = getenv_fn(name);
		if (!v)
			continue;
		cw_errmsg e2;
		if (set_option(c, &cfg_options[i], v, &e2)) {
			cw_fail(e, CW_EINVAL, "environment %s: %s", name, e2.msg);
			goto out;
		}
		from_env[i] = true;
	}
	if (getenv_fn == plain_getenv && env_unknown_option(e))
		goto out;
	if (cfg_check(c, registration, e)) {
		where_refused(e, path, line, from_env);
		goto out;
	}
	rc = CW_OK;
out:
	free(line);
	free(from_env);
	if (rc)
		cfg_free(c);
	return rc;
}

cw_err cfg_load(struct cw_config *c, const char *path, const char *(*getenv_fn)(const char *), cw_errmsg *e)
{
	return load(c, path, getenv_fn, false, e);
}

cw_err cfg_load_registration(struct cw_config *c, const char *path, const char *(*getenv_fn)(const char *),
			     cw_errmsg *e)
{
	return load(c, path, getenv_fn, true, e);
}

/* A string option's value, as a reload publishes it (reload_str): read
 * while the main thread may replace it. */
static const char *cfg_str(const struct cw_config *c, const struct cfg_option *o)
{
	return __atomic_load_n(CFIELD(c, o, char *const), __ATOMIC_ACQUIRE);
}

/* A reloadable string's new value: the old one is kept (c->retired, freed
 * by cfg_free), since a request thread may be reading it (GET
 * /admin/v1/config), and the new one published atomically.  Until the
 * fortieth session no string was reloadable; set_option frees the old
 * value at once, which only the start may do. */
/* Publishes value (a copy; NULL: none) in *slot, the old one retired. */
static cw_err publish_str(struct cw_config *c, char **slot, const char *value, cw_errmsg *e)
{
	char **grown = realloc(c->retired, (c->nretired + 1) * sizeof(*grown));
	if (!grown)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	c->retired = grown;
	char *s = NULL;
	if (value && !(s = strdup(value)))
		return cw_fail(e, CW_ENOMEM, "out of memory");
	char *old = __atomic_exchange_n(slot, s, __ATOMIC_ACQ_REL);
	if (old)
		c->retired[c->nretired++] = old;
	return CW_OK;
}

static cw_err reload_str(struct cw_config *c, const struct cfg_option *o, const char *value, cw_errmsg *e)
{
	return publish_str(c, FIELD(c, o, char *), value, e);
}

/* Option i's value waiting for a restart becomes then (NULL: none). */
static void set_pending(struct cw_config *c, size_t i, const char *then)
{
	char **p = __atomic_load_n(&c->pending, __ATOMIC_ACQUIRE);
	if (!p && !then)
		return;
	if (!p) {
		if (!(p = calloc(cfg_option_count, sizeof(*p))))
			return; /* out of memory: not shown, as before (the log says it) */
		__atomic_store_n(&c->pending, p, __ATOMIC_RELEASE);
	}
	const char *was = __atomic_load_n(&p[i], __ATOMIC_ACQUIRE);
	if ((was == NULL) != (then == NULL) || (was && strcmp(was, then) != 0)) {
		cw_errmsg e;
		publish_str(c, &p[i], then, &e);
	}
}

char *cfg_pending_text(const struct cw_config *c, const struct cfg_option *o, bool mask)
{
	char **p = __atomic_load_n(&c->pending, __ATOMIC_ACQUIRE);
	const char *v = p ? __atomic_load_n(&p[o - cfg_options], __ATOMIC_ACQUIRE) : NULL;
	if (!v)
		return NULL;
	return strdup(mask && o->secret ? (*v ? "********" : "") : v);
}

void cfg_value_text(const struct cw_config *c, const struct cfg_option *o, bool mask, char *buf, size_t len)
{
	if (mask && o->secret) {
		const char *s = cfg_str(c, o);
		snprintf(buf, len, "%s", s && *s ? "********" : "");
		return;
	}
	switch (o->type) {
	case CFG_STR: {
		const char *s = cfg_str(c, o);
		snprintf(buf, len, "%s", s ? s : "");
		break;
	}
	case CFG_INT:
	case CFG_SIZE:
		snprintf(buf, len, "%ld", *CFIELD(c, o, long));
		break;
	case CFG_BOOL:
		snprintf(buf, len, "%s", *CFIELD(c, o, bool) ? "true" : "false");
		break;
	case CFG_LOGLEVEL:
		snprintf(buf, len, "%s", cw_log_level_name((int)*CFIELD(c, o, long)));
		break;
	}
}

/* A string option's value and next's are compared whole, the others as
 * text (a number, a boolean, a level: short).  Until the forty-fourth
 * session's review strings were compared as their first 1023 bytes: a
 * restart-only one changed after them was not said to wait for a
 * restart, and a reloadable one would have been taken cut. */
int cfg_apply_reload(struct cw_config *c, const struct cw_config *next)
{
	int changed = 0;
	for (size_t i = 0; i < cfg_option_count; i++) {
		const struct cfg_option *o = &cfg_options[i];
		char a[64], b[64];
		const char *now = a, *then = b;
		if (o->type == CFG_STR) {
			now = cfg_str(c, o);
			then = cfg_str(next, o);
			now = now ? now : "";
			then = then ? then : "";
		} else {
			cfg_value_text(c, o, false, a, sizeof(a));
			cfg_value_text(next, o, false, b, sizeof(b));
		}
		if (strcmp(now, then) == 0) {
			if (!o->reloadable)
				set_pending(c, i, NULL); /* the file says what is in force again */
			continue;
		}
		if (!o->reloadable) {
			LOG_KV(CW_LOG_WARN, "option changed; it takes effect after a restart",
			       "option", o->name, "section", o->section);
			set_pending(c, i, then); /* GET /admin/v1/config shows it (since the fifty-first session) */
			continue;
		}
		cw_errmsg e;
		cw_err rc = o->type == CFG_STR ? reload_str(c, o, then, &e) : set_option(c, o, then, &e);
		if (rc == CW_OK) {
			changed++;
			LOG_KV(CW_LOG_INFO, "option reloaded", "section", o->section, "option", o->name,
			       "value", o->secret && *then ? "********" : then); /* a secret emptied: "" (turned off) */
		}
	}
	return changed;
}

static const char *type_name(enum cfg_type t)
{
	switch (t) {
	case CFG_STR: return "string";
	case CFG_INT: return "integer";
	case CFG_SIZE: return "size";
	case CFG_BOOL: return "boolean";
	case CFG_LOGLEVEL: return "level";
	}
	return "?";
}

/* A size as the file would say it: in the largest unit that divides it. */
static void size_text(long n, char *buf, size_t len)
{
	static const char *const unit[] = { "GiB", "MiB", "KiB" };
	for (int k = 0; k < 3; k++) {
		long m = 1L << (10 * (3 - k));
		if (n >= m && n % m == 0) {
			snprintf(buf, len, "%ld%s", n / m, unit[k]);
			return;
		}
	}
	snprintf(buf, len, "%ld", n);
}

/* The seventh column, the values taken (a number out of it is refused,
 * naming the range): since the thirty-fourth session, so that the
 * documentation's table can show them and a test compare it. */
static void cfg_range_text(const struct cfg_option *o, char *buf, size_t len)
{
	char lo[24], hi[24];
	switch (o->type) {
	case CFG_INT:
		snprintf(buf, len, "%ld..%ld", o->min, o->max);
		return;
	case CFG_SIZE:
		size_text(o->min, lo, sizeof(lo));
		size_text(o->max, hi, sizeof(hi));
		snprintf(buf, len, "%s..%s", lo, hi);
		return;
	case CFG_BOOL:
		snprintf(buf, len, "true, false");
		return;
	case CFG_LOGLEVEL:
		snprintf(buf, len, "error, warn, info, debug");
		return;
	case CFG_STR:
		break;
	}
	snprintf(buf, len, "%s", "");
}

void cfg_list_options(FILE *out)
{
	for (size_t i = 0; i < cfg_option_count; i++) {
		const struct cfg_option *o = &cfg_options[i];
		char env[128], range[96];
		cfg_env_name(o, env, sizeof(env));
		cfg_range_text(o, range, sizeof(range));
		fprintf(out, "%s.%s\t%s\t%s\t%s\t%s\t%s\t%s\n", o->section, o->name, type_name(o->type),
			o->def, o->reloadable ? "reloadable" : "restart", env, o->doc, range);
	}
}
