/* Configuration: one declarative option table drives the INI parser, the
 * environment overrides, --check-config, --list-options, the "show config"
 * output and the test that docs and code list the same options. */
#ifndef CW_CONF_H
#define CW_CONF_H

#include "cw.h"
#include <stdio.h>

struct cw_config {
	/* [server] */
	char *listen_address;
	long port;
	long http_threads;
	long connection_limit;
	long connection_limit_per_client;
	long connection_timeout_s;
	long max_body_bytes;
	long drain_timeout_ms;
	char *public_url;
	char *domain;
	long media_max_bytes;
	long media_fetches;
	long media_link_lifetime_s;
	bool media_private_addresses;
	char *ca_file;
	char *policy_url;    /* https, or empty: both published in the directory */
	char *abuse_contact; /* https or mailto:, or empty */
	/* [peer] */
	char *signing_key_file;
	char *signature_tag;
	long max_clock_skew_s;
	long replay_cache_entries;
	long peer_max_batch;
	long peer_max_long_polls;
	/* [rooms] */
	long rooms_max_members;
	/* [dispatcher] */
	long dispatch_batch_max;
	long retry_budget;
	long retry_base_ms;
	long retry_max_ms;
	long typing_stale_ms;
	long claim_timeout_s;
	long http_timeout_ms;
	long dispatch_lanes;
	/* [policy] */
	long policy_sweep_interval_ms;
	long policy_reload_interval_s;
	long policy_rate_buckets;
	/* [retention] */
	long retention_content_days;
	long retention_idempotency_days;
	long retention_attempts_days;
	long retention_rows_days;
	long retention_audit_days;
	long retention_reports_days;
	long retention_consent_requests_days;
	long retention_interval_s;
	/* [database] */
	char *db_url;
	char *schema_dir;
	long db_pool_size;
	long db_batch_max;
	long db_batch_delay_us;
	long db_request_timeout_ms;
	long db_statement_timeout_ms;
	long db_retry_after_s;
	long db_reconnect_max_ms;
	long db_startup_timeout_ms;
	/* [matrix] */
	char *mx_homeserver_url;
	char *mx_server_name;
	char *mx_id;
	char *mx_url;
	char *mx_as_token;
	char *mx_hs_token;
	char *mx_sender_localpart;
	char *mx_user_prefix;
	long mx_max_txn_bytes;
	char *mx_alias_prefix;
	/* [xmpp] */
	char *xmpp_components;
	char *xmpp_server_host;
	long xmpp_server_port;
	char *xmpp_secret;
	char *xmpp_domain;
	long xmpp_reconnect_max_ms;
	long xmpp_resend_window_ms;
	long xmpp_dedup_window_s;
	long xmpp_max_stanza_bytes;
	long xmpp_command_session_lifetime_s;
	long xmpp_user_groups_per_day;
	/* [admin] */
	char *admin_token_sha256;
	/* [log] */
	long log_level;
	bool access_log;
	/* The values of reloadable strings that a reload replaced, kept until
	 * cfg_free: a request thread may still read one (GET
	 * /admin/v1/config, cfg_value_text); only the reload (the main
	 * thread) adds to them. */
	char **retired;
	size_t nretired;
	/* The value, as text, that the file read by the last reload gives
	 * each option that takes effect at a restart only, where it differs
	 * from the value in force (NULL: none waits; the array itself NULL
	 * until a reload): cfg_option_count entries, published and replaced
	 * as the reloadable strings are (the old ones retired). */
	char **pending;
	/* The first secret the file (not the environment) holds, NULL: none:
	 * a masked string option set to a value, database.url only with a
	 * password, admin.token_sha256 never (the hash is not the token).
	 * The file gives it away to whoever may read it, even when the
	 * environment sets the option too (and wins). */
	const struct cfg_option *file_secret;
};

enum cfg_type { CFG_STR, CFG_INT, CFG_SIZE, CFG_BOOL, CFG_LOGLEVEL };

struct cfg_option {
	const char *section;
	const char *name;
	enum cfg_type type;
	size_t offset;        /* into struct cw_config */
	const char *def;      /* default, as it would be written in the file */
	long min, max;        /* bounds for numbers */
	bool reloadable;      /* SIGHUP applies it without a restart */
	bool secret;          /* masked wherever the configuration is shown */
	const char *doc;      /* one line */
};

extern const struct cfg_option cfg_options[];
extern const size_t cfg_option_count;

/* Sets every option to its default. Caller frees with cfg_free. */
void cfg_defaults(struct cw_config *c);
void cfg_free(struct cw_config *c);
/* The length of server.public_url without its trailing slashes (0: not
 * set): request targets and file links are appended to that prefix. */
size_t cfg_public_url_len(const struct cw_config *c);
/* The longest server.public_url taken (the buffers that hold it, with a
 * request's target or a file link's path, are sized from it). */
#define CFG_PUBLIC_URL_MAX 512

/* Sets one option from its text form; "section", "name" as in the file. */
cw_err cfg_set(struct cw_config *c, const char *section, const char *name,
	       const char *value, cw_errmsg *e);

/* Defaults, then the file (NULL: none), then CAUSEWAY_<SECTION>_<NAME>
 * variables from getenv_fn (NULL: getenv), then every check that depends
 * on the configuration alone, the adapters' and the HTTP front's included
 * (xa_config_check, cfg_matrix_tokens_check,
 * cw_http_listen_address_check): what it takes, the daemon can start with
 * as far as its configuration goes.  On failure e says where
 * ("file:line: section.name: why") and c is left freed. */
cw_err cfg_load(struct cw_config *c, const char *path,
		const char *(*getenv_fn)(const char *), cw_errmsg *e);
/* The same but for two checks: matrix.homeserver_url may be set without
 * the tokens, which --matrix-registration makes, and database.url may be
 * unset (the registration connects to nothing). */
cw_err cfg_load_registration(struct cw_config *c, const char *path,
			     const char *(*getenv_fn)(const char *), cw_errmsg *e);
/* Whether the Matrix tokens can be bearer tokens (at most 512 bytes of
 * printable ASCII without spaces) and differ. */
cw_err cfg_matrix_tokens_check(const char *as, const char *hs, cw_errmsg *e);

/* The environment variable for an option: CAUSEWAY_SECTION_NAME. */
void cfg_env_name(const struct cfg_option *o, char *buf, size_t len);

/* The current value as text (secrets masked when mask is true). */
void cfg_value_text(const struct cw_config *c, const struct cfg_option *o,
		    bool mask, char *buf, size_t len);

/* Copies the reloadable options from next into c; for every other option
 * that differs, log a warning that a restart is needed.  Returns how many
 * options changed.  A string's old value stays allocated (c->retired)
 * and the new one is published atomically: other threads may read c
 * meanwhile (cfg_value_text). */
int cfg_apply_reload(struct cw_config *c, const struct cw_config *next);

/* The value of option o that waits for a restart (what the last reload
 * read, as text, masked as cfg_value_text masks when mask is true), or
 * NULL when none waits: the caller frees it. */
char *cfg_pending_text(const struct cw_config *c, const struct cfg_option *o, bool mask);

/* Prints the option table, a line an option, tab-separated: name, type,
 * default, reloadable or restart, environment variable, doc, and the values
 * taken (MIN..MAX of a number; empty for a string). */
void cfg_list_options(FILE *out);

#endif
