/* Logging in logfmt to one file descriptor, one write() per record. */
#include "config.h"
#include "log.h"
#include "cw.h"
#include "utf8.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define CW_LOG_LINE_MAX 4096
#define CW_LOG_KV_MAX 32

atomic_int cw_log_threshold = CW_LOG_INFO;
static atomic_int log_fd = 2;
static _Atomic(int64_t (*)(void)) log_clock = cw_wall_ms;
static _Atomic(struct cw_log_limit *) log_limits; /* the registry: every limiter used */
static _Thread_local const char *log_request_id;

static const char *const level_names[] = { "error", "warn", "info", "debug" };

void cw_log_set_level(int level)
{
	if (level >= CW_LOG_ERROR && level <= CW_LOG_DEBUG)
		atomic_store(&cw_log_threshold, level);
}

int cw_log_level_parse(const char *name)
{
	for (size_t i = 0; i < CW_ARRAY_LEN(level_names); i++)
		if (strcasecmp(name, level_names[i]) == 0)
			return (int)i;
	return -1;
}

const char *cw_log_level_name(int level)
{
	return level >= 0 && level < (int)CW_ARRAY_LEN(level_names) ? level_names[level] : "?";
}

void cw_log_set_fd(int fd) { atomic_store(&log_fd, fd); }
void cw_log_set_clock(int64_t (*clock_ms)(void)) { atomic_store(&log_clock, clock_ms ? clock_ms : cw_wall_ms); }
static int64_t log_now_ms(void) { return atomic_load(&log_clock)(); }
void cw_log_set_request_id(const char *request_id) { log_request_id = request_id; }

/* The length of the UTF-8 character at v (n bytes left) a record writes
 * as it is, or 0 for a byte it escapes (each byte of the character alike,
 * as \xHH): one that starts no valid sequence, or a character
 * cw_utf8_display_control names (C1 controls, U+0080-U+009F; the
 * bidirectional controls and marks; since the forty-fifth session the
 * line and paragraph separators, U+2028 and U+2029, which a viewer that
 * honours them shows as a line break: a path could fake a record).  Until the forty-fourth session such bytes from
 * outside (a request's path "/%ff", a peer's error text) were written
 * raw: a record that is not UTF-8 is shown by journalctl as "[N bytes
 * blob data]", hiding the whole line, a C1 control (U+009B is CSI)
 * reaches a terminal that shows the log, and a U+202E in a path turned
 * round what a terminal or a log viewer showed after it.  Since the
 * forty-eighth session's review also a character that shows nothing
 * (cw_utf8_invisible: a zero-width space or joiner, U+FEFF, a filler), so
 * that "alice<U+200B>" does not pass for alice, and a white space that is
 * not ASCII (cw_utf8_blank: U+00A0, U+2003, U+3000...), which in a value
 * without quotes showed as the space between two fields. */
static size_t shown_as_is(const unsigned char *v, size_t n)
{
	unsigned cp;
	size_t k = cw_utf8_seq(v, n, &cp);
	return k && (cw_utf8_display_control(cp) || cw_utf8_blank(cp) || cw_utf8_invisible(cp)) ? 0 : k;
}

static bool needs_quotes(const char *v)
{
	if (*v == '\0')
		return true;
	size_t n = strlen(v);
	for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
		if (*p <= ' ' || *p == '=' || *p == '"' || *p == '\\' || *p == 0x7f)
			return true;
		if (*p >= 0x80) {
			size_t k = shown_as_is(p, n - (size_t)(p - (const unsigned char *)v));
			if (!k)
				return true;
			p += k - 1;
		}
	}
	return false;
}

/* The escaped form of byte c inside a quoted value into out (at least 4
 * bytes); returns its length. */
static size_t escape_byte(unsigned char c, char *out)
{
	static const char hx[] = "0123456789abcdef";
	switch (c) {
	case '"': memcpy(out, "\\\"", 2); return 2;
	case '\\': memcpy(out, "\\\\", 2); return 2;
	case '\n': memcpy(out, "\\n", 2); return 2;
	case '\r': memcpy(out, "\\r", 2); return 2;
	case '\t': memcpy(out, "\\t", 2); return 2;
	default:
		if (c < 0x20 || c >= 0x7f) { /* DEL, and a byte >= 0x80 escaped (shown_as_is) */
			out[0] = '\\';
			out[1] = 'x';
			out[2] = hx[c >> 4];
			out[3] = hx[c & 15];
			return 4;
		}
		out[0] = (char)c;
		return 1;
	}
}

/* Room is kept for the final newline and NUL: a pair ends at len - 2 at
 * most.  A pair whose key (and opening quote) does not fit is left out; a
 * value that does not fit is cut before the escape that would not, and its
 * quote closed: a cut record is still whole logfmt (until the thirty-first
 * session its last quote stayed open, or an escape was cut in two). */
size_t cw_log_append_pair(char *buf, size_t len, size_t pos, const char *key, const char *val)
{
	if (!val)
		val = "";
	if (len < 2 || pos + 2 > len)
		return pos;
	size_t end = len - 2;
	bool quoted = needs_quotes(val);
	size_t head = (pos > 0) + strlen(key) + 1 + (quoted ? 2 : 0);
	if (head > end - pos)
		return pos;
	if (pos > 0)
		buf[pos++] = ' ';
	size_t kl = strlen(key);
	memcpy(buf + pos, key, kl);
	pos += kl;
	buf[pos++] = '=';
	if (!quoted) { /* ASCII, or whole characters of UTF-8 (needs_quotes) */
		size_t left = strlen(val);
		for (const unsigned char *v = (const unsigned char *)val; *v;) {
			size_t k = *v >= 0x80 ? shown_as_is(v, left) : 1;
			if (k > end - pos)
				break;
			memcpy(buf + pos, v, k);
			pos += k;
			v += k;
			left -= k;
		}
		return pos;
	}
	buf[pos++] = '"';
	size_t left = strlen(val);
	for (const unsigned char *v = (const unsigned char *)val; *v;) {
		size_t k = *v >= 0x80 ? shown_as_is(v, left) : 0;
		if (k) { /* a character of UTF-8, whole or not at all */
			if (k + 1 > end - pos)
				break;
			memcpy(buf + pos, v, k);
			pos += k;
			v += k;
			left -= k;
			continue;
		}
		char esc[4];
		size_t n = escape_byte(*v, esc);
		if (n + 1 > end - pos) /* and the closing quote */
			break;
		memcpy(buf + pos, esc, n);
		pos += n;
		v++;
		left--;
	}
	buf[pos++] = '"';
	return pos;
}

size_t cw_log_format(char *buf, size_t len, long long ts_ms, int level,
		     const char *msg, const char *request_id, const char *const *kv)
{
	char ts[40];
	time_t secs = (time_t)(ts_ms / 1000);
	struct tm tm;
	gmtime_r(&secs, &tm);
	size_t n = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(ts + n, sizeof(ts) - n, ".%03lldZ", ts_ms % 1000);

	size_t pos = 0;
	pos = cw_log_append_pair(buf, len, pos, "ts", ts);
	pos = cw_log_append_pair(buf, len, pos, "level", cw_log_level_name(level));
	pos = cw_log_append_pair(buf, len, pos, "msg", msg);
	if (request_id)
		pos = cw_log_append_pair(buf, len, pos, "request_id", request_id);
	for (size_t i = 0; kv && kv[i]; i += 2)
		pos = cw_log_append_pair(buf, len, pos, kv[i], kv[i + 1]);
	buf[pos++] = '\n';
	buf[pos] = '\0';
	return pos;
}

static void emit_at(int64_t ts_ms, int level, const char *msg, const char *request_id, const char *const *kv)
{
	char line[CW_LOG_LINE_MAX];
	size_t n = cw_log_format(line, sizeof(line), ts_ms, level, msg, request_id, kv);
	int fd = atomic_load(&log_fd);
	for (size_t off = 0; off < n;) {
		ssize_t w = write(fd, line + off, n - off);
		if (w <= 0)
			return; /* nowhere to report a failing log */
		off += (size_t)w;
	}
}

static void emit(int level, const char *msg, const char *const *kv)
{
	emit_at(log_now_ms(), level, msg, log_request_id, kv);
}

/* The key/value pairs up to the NULL into kv (room for max pairs and the
 * NULL); returns the count of strings. */
static size_t collect_kv(const char **kv, size_t max, va_list ap)
{
	size_t n = 0;
	for (;;) {
		const char *k = va_arg(ap, const char *);
		if (!k || n >= 2 * max)
			break;
		kv[n++] = k;
		kv[n++] = va_arg(ap, const char *);
	}
	kv[n] = NULL;
	return n;
}

void cw_log_kv_(int level, const char *msg, ...)
{
	const char *kv[2 * CW_LOG_KV_MAX + 1];
	va_list ap;
	va_start(ap, msg);
	collect_kv(kv, CW_LOG_KV_MAX, ap);
	va_end(ap);
	emit(level, msg, kv);
}

/* ------------------------------------------------------------- the limits */

/* Whether a line of site l may be written now, at *now_ms (the time to
 * give the record); if so, *suppressed is the count of lines it must tell
 * were left out (0: none). */
static bool limit_admit(struct cw_log_limit *l, int64_t *now_ms, unsigned long *suppressed)
{
	pthread_mutex_lock(&l->mu);
	/* Read under the lock: the lines of one limiter see the clock in
	 * order, and a line's time is the second it was counted in. */
	*now_ms = log_now_ms();
	int64_t second = *now_ms / 1000;
	if (!l->registered) {
		l->registered = true;
		struct cw_log_limit *head = atomic_load(&log_limits);
		do
			l->next = head;
		while (!atomic_compare_exchange_weak(&log_limits, &head, l));
	}
	if (second != l->second) { /* a new second (or the clock stepped back) */
		l->second = second;
		l->written = 0;
	}
	bool write = l->written < l->per_s;
	*suppressed = 0;
	if (write) {
		l->written++;
		*suppressed = l->left_out;
		l->left_out = 0;
	} else {
		l->left_out++;
	}
	pthread_mutex_unlock(&l->mu);
	return write;
}

void cw_log_kv_limited_(struct cw_log_limit *l, ...)
{
	int64_t now_ms;
	unsigned long suppressed;
	if (!limit_admit(l, &now_ms, &suppressed))
		return;
	const char *kv[2 * CW_LOG_KV_MAX + 3];
	va_list ap;
	va_start(ap, l);
	size_t n = collect_kv(kv, CW_LOG_KV_MAX, ap);
	va_end(ap);
	char count[24];
	if (suppressed) {
		snprintf(count, sizeof(count), "%lu", suppressed);
		kv[n++] = "suppressed";
		kv[n++] = count;
		kv[n] = NULL;
	}
	emit_at(now_ms, l->level, l->msg, log_request_id, kv);
}

static void limits_flush(bool all)
{
	for (struct cw_log_limit *l = atomic_load(&log_limits); l; l = l->next) {
		pthread_mutex_lock(&l->mu);
		int64_t now_ms = log_now_ms();
		unsigned long n = all || l->second != now_ms / 1000 ? l->left_out : 0;
		l->left_out -= n;
		int level = l->level;
		const char *msg = l->msg;
		pthread_mutex_unlock(&l->mu);
		if (!n) /* written whatever the level now: they were counted at the site's */
			continue;
		char count[24];
		snprintf(count, sizeof(count), "%lu", n);
		const char *kv[] = { "suppressed", count, NULL };
		emit_at(now_ms, level, msg, NULL, kv); /* no request's: the count is of many */
	}
}

void cw_log_limits_flush(void) { limits_flush(false); }
void cw_log_limits_flush_all(void) { limits_flush(true); }

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	pthread_t thread;
	bool running, stop;
} flusher = { .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };

static void *flusher_main(void *arg)
{
	(void)arg;
	cw_thread_name("cw-log");
	pthread_mutex_lock(&flusher.mu);
	while (!flusher.stop) {
		struct timespec t;
		clock_gettime(CLOCK_REALTIME, &t);
		t.tv_sec += 1;
		pthread_cond_timedwait(&flusher.cv, &flusher.mu, &t);
		pthread_mutex_unlock(&flusher.mu);
		limits_flush(false);
		pthread_mutex_lock(&flusher.mu);
	}
	pthread_mutex_unlock(&flusher.mu);
	return NULL;
}

void cw_log_flusher_start(void)
{
	pthread_mutex_lock(&flusher.mu);
	flusher.stop = false;
	if (!flusher.running) {
		/* The thread takes no signal, whenever it is started: the
		 * daemon's stop signals are the main thread's (sigwait), and a
		 * thread made before they are blocked would take them. */
		sigset_t all, was;
		sigfillset(&all);
		pthread_sigmask(SIG_BLOCK, &all, &was);
		flusher.running = pthread_create(&flusher.thread, NULL, flusher_main, NULL) == 0;
		pthread_sigmask(SIG_SETMASK, &was, NULL);
	}
	pthread_mutex_unlock(&flusher.mu);
}

void cw_log_flusher_stop(void)
{
	pthread_mutex_lock(&flusher.mu);
	bool running = flusher.running;
	flusher.stop = true;
	flusher.running = false;
	pthread_cond_signal(&flusher.cv);
	pthread_mutex_unlock(&flusher.mu);
	if (running)
		pthread_join(flusher.thread, NULL);
}

void cw_logf_(int level, const char *fmt, ...)
{
	char msg[CW_LOG_LINE_MAX / 2];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	emit(level, msg, NULL);
}
