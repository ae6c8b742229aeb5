/* Logging: one logfmt line per record on stderr, the level checked before
 * anything is formatted.  Values are quoted and escaped, so a hostile string
 * (a path, a header) cannot forge a field or a line. */
#ifndef CW_LOG_H
#define CW_LOG_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

/* A line someone outside can cause at will, once per request or event
 * (a refused signature, a refused event, libmicrohttpd's refusal of a
 * connection), is written through a limiter of its site: at most per_s of
 * its lines a second of the wall clock (the records' times); the others
 * are counted, and the next line written says how many were left out
 * (suppressed=N).  A count whose second has passed with no further line is
 * written on a line of its own, the site's level and message and
 * suppressed=N alone, by cw_log_limits_flush (the daemon's policy thread
 * calls it every turn, about once a second).  Static, no allocation: a
 * limiter registers itself (a list) the first time it is used.  Not for
 * the access log, one line per request by design. */
struct cw_log_limit {
	unsigned per_s;
	pthread_mutex_t mu;
	/* under mu */
	int64_t second;          /* the window counted (wall clock, s) */
	unsigned written;        /* lines written in it */
	unsigned long left_out;  /* lines left out in it, not yet told */
	int level;               /* the site's, set with it (CW_LOG_LIMIT_INIT), */
	const char *msg;         /* for a count written alone */
	bool registered;
	struct cw_log_limit *next; /* the registry; set before the limiter is published */
};
/* The site's level and msg are set with it, so that they must be
 * constants (a level's counts are written at it; a msg is read again
 * when its count is written alone, after the line that gave it). */
#define CW_LOG_LIMIT_INIT(n, lvl, m) { .per_s = (n), .level = (lvl), .msg = "" m "", .mu = PTHREAD_MUTEX_INITIALIZER }
/* The limit of the lines outsiders cause: enough for any legitimate
 * traffic's refusals to show, few enough that a flood's are a few KB a
 * second. */
#define CW_LOG_OUTSIDE_PER_S 10

/* A line of site l, at its level with its msg, if its limit lets it be
 * written now.  The level is the caller's to check first: a line not
 * written at the level in force is not counted. */
void cw_log_kv_limited_(struct cw_log_limit *l, ...);
/* LOG_KV through a limiter of this site (one static limiter for each place
 * the macro is written): at most per_s lines a second, or
 * CW_LOG_OUTSIDE_PER_S for LOG_KV_LIMITED. */
#define LOG_KV_LIMITED_N(per_s, lvl, text, ...) \
	do { \
		static struct cw_log_limit cw_log_limit_ = CW_LOG_LIMIT_INIT(per_s, lvl, text); \
		if (cw_log_enabled(lvl)) \
			cw_log_kv_limited_(&cw_log_limit_, ##__VA_ARGS__, (const char *)NULL); \
	} while (0)
#define LOG_KV_LIMITED(lvl, text, ...) LOG_KV_LIMITED_N(CW_LOG_OUTSIDE_PER_S, lvl, text, ##__VA_ARGS__)

/* Writes every limiter's count of lines left out in a second now past, on
 * a line of its own.  _all: also those of the current second (at the stop:
 * no line comes after). */
void cw_log_limits_flush(void);
void cw_log_limits_flush_all(void);
/* A thread of the log's own that flushes every second, waiting on nothing
 * else (the database may hold every other thread); stop joins it. */
void cw_log_flusher_start(void);
void cw_log_flusher_stop(void);

/* Context added to every record of the calling thread (the request being
 * served); the string must outlive the records, NULL clears it. */
void cw_log_set_request_id(const char *request_id);

void cw_log_set_level(int level);
/* "error", "warn", "info", "debug" -> level, or -1. */
int cw_log_level_parse(const char *name);
const char *cw_log_level_name(int level);

/* Where records go (stderr by default); for tests. */
void cw_log_set_fd(int fd);
/* The wall clock of the records' times and of the limits, in ms (NULL:
 * cw_wall_ms, the default); for tests. */
void cw_log_set_clock(int64_t (*clock_ms)(void));

/* Pure formatting, for tests and for the writer: one record, with its
 * newline, into buf; returns the length written (truncated records still end
 * in a newline). kv is a NULL-terminated array of key, value pairs. */
size_t cw_log_format(char *buf, size_t len, long long ts_ms, int level,
		     const char *msg, const char *request_id, const char *const *kv);

/* Appends key=value to buf with logfmt quoting; returns the new length. */
size_t cw_log_append_pair(char *buf, size_t len, size_t pos, const char *key, const char *val);

#endif
