/* Logging: one logfmt line per record on stderr, the level checked before
 * anything is formatted.  Values are quoted and escaped, so a hostile string
 * (a path, a header) cannot forge a field or a line. */
#ifndef CW_LOG_H
#define CW_LOG_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>

enum cw_log_level { CW_LOG_ERROR = 0, CW_LOG_WARN, CW_LOG_INFO, CW_LOG_DEBUG };

extern atomic_int cw_log_threshold;

#define cw_log_enabled(lvl) \
	((int)(lvl) <= atomic_load_explicit(&cw_log_threshold, memory_order_relaxed))

/* Record with a fixed message and key/value string pairs; the list ends with
 * NULL (the macro adds it).  A NULL value is written as an empty string. */
void cw_log_kv_(int level, const char *msg, ...);
#define LOG_KV(lvl, msg, ...) \
	do { if (cw_log_enabled(lvl)) cw_log_kv_((lvl), (msg), ##__VA_ARGS__, (const char *)NULL); } while (0)

/* Record whose message is printf-formatted. */
void cw_logf_(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_error(...) do { if (cw_log_enabled(CW_LOG_ERROR)) cw_logf_(CW_LOG_ERROR, __VA_ARGS__); } while (0)
#define log_warn(...)  do { if (cw_log_enabled(CW_LOG_WARN)) cw_logf_(CW_LOG_WARN, __VA_ARGS__); } while (0)
#define log_info(...)  do { if (cw_log_enabled(CW_LOG_INFO)) cw_logf_(CW_LOG_INFO, __VA_ARGS__); } while (0)
#define log_debug(...) do { if (cw_log_enabled(CW_LOG_DEBUG)) cw_logf_(CW_LOG_DEBUG, __VA_ARGS__); } while (0)

/* Context added to every record of the calling thread (the request being
 * served); the string must outlive the records, NULL clears it. */
void cw_log_set_request_id(const char *request_id);

void cw_log_set_level(int level);
/* "error", "warn", "info", "debug" -> level, or -1. */
int cw_log_level_parse(const char *name);
const char *cw_log_level_name(int level);

/* Where records go (stderr by default); for tests. */
void cw_log_set_fd(int fd);

/* Pure formatting, for tests and for the writer: one record, with its
 * newline, into buf; returns the length written (truncated records still end
 * in a newline). kv is a NULL-terminated array of key, value pairs. */
size_t cw_log_format(char *buf, size_t len, long long ts_ms, int level,
		     const char *msg, const char *request_id, const char *const *kv);

/* Appends key=value to buf with logfmt quoting; returns the new length. */
size_t cw_log_append_pair(char *buf, size_t len, size_t pos, const char *key, const char *val);

#endif
