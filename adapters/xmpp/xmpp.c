/* The XMPP adapter's streams: one thread per component, holding the
 * component's advisory lock and its XEP-0114 stream, with the queue other
 * threads hand stanzas through; and the stanzas every component answers
 * itself (disco, ping, version, errors). */
#include "config.h"
#include "xmpp_int.h"
#include "buf.h"
#include "log.h"
#include "peers.h"
#include "store.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <unistd.h>

#define NS_DISCO_INFO "http://jabber.org/protocol/disco#info"
#define NS_DISCO_ITEMS "http://jabber.org/protocol/disco#items"
#define NS_PING "urn:xmpp:ping"
#define NS_VERSION "jabber:iq:version"
#define NS_COMMANDS "http://jabber.org/protocol/commands"
#define NS_STANZAS "urn:ietf:params:xml:ns:xmpp-stanzas"
#define NS_GATEWAY "jabber:iq:gateway"

#define QUEUE_MAX 20000         /* stanzas waiting for one component's thread */
#define LOOP_TIMEOUT_MS 5       /* one turn of libstrophe's loop while connecting */
#define IDLE_WAIT_MS 200        /* longest sleep of an up stream with nothing to do */
#define PING_EVERY_MS 60000     /* XEP-0199 keepalive to the server */
#define PING_TIMEOUT_MS 30000
/* From the connect to the handshake's answer: a server that takes the
 * connection and then says nothing (hung, or a proxy in front of a dead
 * one) is given up after this, as an unanswered ping is (libstrophe
 * bounds the TCP connect and, once the server's header came, the
 * handshake, but not the wait for that header). */
#define OPEN_TIMEOUT_MS PING_TIMEOUT_MS
#define HOUSEKEEPING_MS 1000    /* consent requests, the lock connection */
#define STANDBY_RETRY_MS 2000

static pthread_once_t strophe_once = PTHREAD_ONCE_INIT;
static void strophe_init(void) { xmpp_initialize(); }

static const char *state_name(enum xc_state s)
{
	switch (s) {
	case XC_STARTING: return "starting";
	case XC_STANDBY: return "standby";
	case XC_CONNECTING: return "connecting";
	case XC_UP: return "up";
	case XC_DOWN: return "down";
	case XC_AUTH_FAILED: return "auth_failed";
	}
	return "unknown";
}

static void strophe_log(void *userdata, xmpp_log_level_t level, const char *area, const char *msg)
{
	(void)userdata;
	if (level == XMPP_LEVEL_ERROR)
		LOG_KV(CW_LOG_WARN, "libstrophe", "area", area, "detail", msg);
	else if (level == XMPP_LEVEL_DEBUG && cw_log_enabled(CW_LOG_DEBUG)) {
		/* libstrophe's debug output holds every stanza: message bodies,
		 * and the handshake digest that with the stream id allows an
		 * offline guess of the component secret, sent and also logged
		 * on its own by the "auth" area ("Digest: ...": until the
		 * twentieth session it passed).  Traffic and that area are left
		 * out (its errors stay, above); the connection's own events
		 * stay. */
		if (strncmp(msg, "SENT:", 5) == 0 || strncmp(msg, "RECV:", 5) == 0 || strstr(msg, "<handshake") ||
		    strncmp(msg, "parse error [", 13) == 0 || /* with what was read */
		    (area && strcmp(area, "auth") == 0))
			return;
		LOG_KV(CW_LOG_DEBUG, "libstrophe", "area", area, "detail", msg);
	}
}
static const xmpp_log_t strophe_logger = { strophe_log, NULL };

/* A thread's own libstrophe context, and the chat stanza it keeps in it
 * (xm_keep: released before the context that made it). */
struct thread_strophe {
	xmpp_ctx_t *ctx;
	struct xm_keep keep;
};

static void ctx_release(void *p)
{
	struct thread_strophe *t = p;
	xm_keep_drop(&t->keep);
	xmpp_ctx_free(t->ctx);
	free(t);
}

static struct thread_strophe *thread_strophe(struct xmpp *x)
{
	struct thread_strophe *t = pthread_getspecific(x->ctx_key);
	if (!t) {
		t = calloc(1, sizeof(*t));
		if (t)
			t->ctx = xmpp_ctx_new(NULL, &strophe_logger);
		if (!t || !t->ctx || pthread_setspecific(x->ctx_key, t) != 0) {
			if (t && t->ctx)
				xmpp_ctx_free(t->ctx);
			free(t);
			return NULL;
		}
	}
	return t;
}

xmpp_ctx_t *xa_thread_ctx(struct xmpp *x)
{
	struct thread_strophe *t = thread_strophe(x);
	return t ? t->ctx : NULL;
}

struct xm_keep *xa_thread_keep(struct xmpp *x)
{
	struct thread_strophe *t = thread_strophe(x);
	return t ? &t->keep : NULL;
}

struct xcomp *xa_comp_by_domain(struct xmpp *x, const char *domain)
{
	for (int i = 0; i < x->ncomp; i++)
		if (strcmp(x->comp[i].domain, domain) == 0)
			return &x->comp[i];
	return NULL;
}

bool xa_serves_domain(struct xmpp *x, const char *domain)
{
	return strcmp(x->local_domain, domain) == 0 || xa_comp_by_domain(x, domain);
}

const char *xa_component_peer(struct xmpp *x, const char *domain)
{
	struct xcomp *xc = xa_comp_by_domain(x, domain);
	return xc ? xc->peer : NULL;
}

struct xcomp *xa_comp_by_peer(struct xmpp *x, const char *peer)
{
	for (int i = 0; i < x->ncomp; i++)
		if (strcmp(x->comp[i].peer, peer) == 0)
			return &x->comp[i];
	return NULL;
}

/* ------------------------------------------------------------ set-up */

/* One component of xa_new's (x: arg), checked by xa_config_check. */
static cw_err component_add(void *arg, const char *d, const char *peer, cw_errmsg *e)
{
	(void)e;
	struct xmpp *x = arg;
	struct xcomp *xc = &x->comp[x->ncomp];
	xc->x = x;
	xc->index = x->ncomp++;
	snprintf(xc->domain, sizeof(xc->domain), "%s", d);
	snprintf(xc->peer, sizeof(xc->peer), "%s", peer);
	pthread_mutex_init(&xc->mu, NULL);
	pthread_mutex_init(&xc->in_mu, NULL);
	pthread_cond_init(&xc->written, NULL);
	xc->next_seq = 1;
	xc->wake_fd[0] = xc->wake_fd[1] = -1;
	xc->reserve_fd = -1;
	xc->sock_fd = -1;
	xc->audit_seen = -1;
	xc->profiles_xid = -1;
	return CW_OK;
}

cw_err xa_new(struct xmpp **out, struct cw_app *app, cw_errmsg *e)
{
	*out = NULL;
	const struct cw_config *cfg = app->cfg;
	if (!cfg->xmpp_components || !*cfg->xmpp_components)
		return CW_OK;
	pthread_once(&strophe_once, strophe_init);
	struct xmpp *x = calloc(1, sizeof(*x));
	if (!x)
		return cw_fail(e, CW_ENOMEM, "out of memory");
	x->app = app;
	x->cfg = cfg;
	/* cfg_load checked the options with it already: this reads them */
	cw_err rc = xa_config_check(cfg, x->local_domain, sizeof(x->local_domain), component_add, x, e);
	/* The guard (xmpp_xml.c) stands in front of expat's functions: a
	 * libstrophe built with libxml2 would read the stream unguarded, no
	 * restricted XML, no stanza cap (docs/xmpp.md, "Stanza size").  Until
	 * the twenty-eighth session that was a warning, and the daemon ran on. */
	if (!rc && !xa_xml_guards_libstrophe())
		rc = cw_fail(e, CW_EINVAL,
			     "xmpp: libstrophe does not parse with expat (built with libxml2?): the stream's guard "
			     "(restricted XML, xmpp.max_stanza_bytes) needs a libstrophe built with expat, as Debian's is");
	if (!rc && pthread_key_create(&x->ctx_key, ctx_release) != 0)
		rc = cw_fail(e, CW_ENOMEM, "cannot create a thread key");
	if (rc) {
		for (int i = 0; i < x->ncomp; i++) {
			pthread_mutex_destroy(&x->comp[i].mu);
			pthread_mutex_destroy(&x->comp[i].in_mu);
			pthread_cond_destroy(&x->comp[i].written);
		}
		free(x);
		return rc;
	}
	*out = x;
	return CW_OK;
}

/* ------------------------------------------------------------ the queue */

/* Writes to the wake-up pipe unless a wake-up is on its way already (the
 * thread takes the whole queue when it wakes); call under mu, and write
 * outside it when this answers true. */
static bool wake_due(struct xcomp *xc)
{
	if (xc->woken || !xc->head || xc->wake_fd[1] < 0)
		return false;
	xc->woken = true;
	return true;
}

static void wake_write(struct xcomp *xc)
{
	char b = 1;
	ssize_t w = write(xc->wake_fd[1], &b, 1);
	(void)w;
}

void xa_wake_thread(struct xcomp *xc)
{
	if (xc->wake_fd[1] >= 0)
		wake_write(xc);
}

void xa_wake(struct xcomp *xc)
{
	pthread_mutex_lock(&xc->mu);
	bool due = wake_due(xc);
	pthread_mutex_unlock(&xc->mu);
	if (due)
		wake_write(xc);
}

static struct xq_item *item_new(const char *text, size_t len)
{
	struct xq_item *it = malloc(sizeof(*it) + len + 1);
	if (!it)
		return NULL;
	it->next = NULL;
	it->kept = false;
	it->len = len;
	memcpy(it->text, text, len);
	it->text[len] = '\0';
	return it;
}

/* Under xc->mu: it at the queue's tail, or false (it freed).  A stanza
 * whose write its sender waits for (seq: an outbox row's) is refused unless
 * the stream is up, and that is judged under the same hold of mu in which
 * the thread drops the queue and leaves UP (set_state): one queued while
 * the stream is down would be written after the reconnect although its
 * sender, told it was not written, had its row go again. */
static bool append_locked(struct xcomp *xc, struct xq_item *it, uint64_t *seq)
{
	if (atomic_load(&xc->x->stop) || xc->queued >= QUEUE_MAX || (seq && xc->state != XC_UP)) {
		free(it);
		return false;
	}
	it->seq = xc->next_seq++;
	if (xc->tail)
		xc->tail->next = it;
	else
		xc->head = it;
	xc->tail = it;
	xc->queued++;
	if (seq)
		*seq = it->seq;
	return true;
}

static bool enqueue(struct xcomp *xc, const char *text, size_t len, uint64_t *seq, bool wake, bool kept)
{
	struct xq_item *it = item_new(text, len);
	if (!it)
		return false;
	it->kept = kept;
	pthread_mutex_lock(&xc->mu);
	bool ok = append_locked(xc, it, seq);
	bool due = ok && wake && wake_due(xc);
	pthread_mutex_unlock(&xc->mu);
	if (due)
		wake_write(xc);
	return ok;
}

size_t xa_queue_room_locked(const struct xcomp *xc)
{
	return xc->queued < QUEUE_MAX ? QUEUE_MAX - xc->queued : 0;
}

bool xa_enqueue(struct xcomp *xc, const char *text, size_t len, uint64_t *seq, bool wake)
{
	return enqueue(xc, text, len, seq, wake, false);
}

bool xa_enqueue_locked(struct xcomp *xc, const char *text, size_t len)
{
	struct xq_item *it = item_new(text, len);
	return it && append_locked(xc, it, NULL);
}

static bool enqueue_stanza(struct xcomp *xc, xmpp_stanza_t *st, bool kept)
{
	char *buf = NULL;
	size_t len = 0;
	bool ok = st && xmpp_stanza_to_text(st, &buf, &len) == XMPP_EOK;
	xmpp_ctx_t *ctx = st ? xmpp_stanza_get_context(st) : NULL;
	if (ok)
		ok = enqueue(xc, buf, len, NULL, true, kept);
	if (buf)
		xmpp_free(ctx, buf);
	if (st)
		xmpp_stanza_release(st);
	return ok;
}

bool xa_enqueue_stanza(struct xcomp *xc, xmpp_stanza_t *st)
{
	return enqueue_stanza(xc, st, false);
}

bool xa_answer(struct xcomp *xc, xmpp_stanza_t *st)
{
	return enqueue_stanza(xc, st, true);
}

bool xa_wait_written(struct xcomp *xc, uint64_t seq, long timeout_ms)
{
	struct timespec dl;
	cw_deadline_ts(&dl, CLOCK_REALTIME, (int64_t)timeout_ms * 1000);
	pthread_mutex_lock(&xc->mu);
	while (xc->written_seq < seq && xc->state == XC_UP && !atomic_load(&xc->x->stop))
		if (pthread_cond_timedwait(&xc->written, &xc->mu, &dl) == ETIMEDOUT)
			break;
	bool ok = xc->written_seq >= seq;
	if (!ok && xc->state == XC_UP && !atomic_load(&xc->x->stop)) {
		/* The wait passed its time: a stanza still in our queue is
		 * taken back (its row goes again, and it is not written
		 * besides); one handed to libstrophe (drain) goes out, or is
		 * written again after a break (the re-send window holds all
		 * that was handed and not yet written), so it counts. */
		struct xq_item **pp = &xc->head, *prev = NULL;
		while (*pp && (*pp)->seq != seq) {
			prev = *pp;
			pp = &(*pp)->next;
		}
		struct xq_item *it = *pp;
		if (it) {
			*pp = it->next;
			if (xc->tail == it)
				xc->tail = prev;
			xc->queued--;
			free(it);
		} else {
			ok = seq <= xc->handed_seq;
		}
	}
	/* A seq within the ranges the ring forgot (lost_floor_from to
	 * lost_floor, all of them and what was written between) may have
	 * been lost: counted as not written (its
	 * row goes again; a stanza twice rather than none).  Until the
	 * fifty-second session the ring had 8 ranges, two a break, and a
	 * stream that broke five times while a batch's rows were waited for
	 * in turn (up to 5 s each) had the older lost stanzas count as
	 * written. */
	if (ok && xc->lost_floor && seq >= xc->lost_floor_from && seq <= xc->lost_floor)
		ok = false;
	for (unsigned i = 0; ok && i < XA_LOST_MAX && i < xc->lost_n; i++)
		if (seq >= xc->lost_from[i] && seq <= xc->lost_to[i])
			ok = false;
	pthread_mutex_unlock(&xc->mu);
	return ok;
}

/* Under xc->mu: seqs from..to lost.  The ring's oldest range, when it is
 * full, goes into the one range it forgot (lost_floor_from..lost_floor:
 * ranges rise, so that is the oldest one to the newest one forgotten). */
static void lost_range(struct xcomp *xc, uint64_t from, uint64_t to)
{
	unsigned k = xc->lost_n % XA_LOST_MAX;
	if (xc->lost_n >= XA_LOST_MAX) {
		if (!xc->lost_floor)
			xc->lost_floor_from = xc->lost_from[k];
		xc->lost_floor = xc->lost_to[k];
	}
	xc->lost_from[k] = from;
	xc->lost_to[k] = to;
	xc->lost_n++;
}

/* Under xc->mu: what is queued leaves the queue (the caller frees it with
 * queue_free).  It never reached the wire: its senders learn it (their rows
 * go again); the seqs are remembered as lost.  The answers to users'
 * stanzas stay (xa_answer), for the next stream. */
static struct xq_item *queue_take_lost_locked(struct xcomp *xc)
{
	struct xq_item *lost = NULL, *lost_tail = NULL, *kept = NULL, *kept_tail = NULL;
	size_t nkept = 0;
	/* What was handed to libstrophe and not yet written is written again
	 * after the reconnect (recent_resend: drain hands no more than the
	 * window holds); without a window it is lost. */
	if (xc->handed_seq > xc->written_seq) {
		if (xc->x->cfg->xmpp_resend_window_ms <= 0)
			lost_range(xc, xc->written_seq + 1, xc->handed_seq);
		xc->written_seq = xc->handed_seq;
	}
	for (struct xq_item *it = xc->head, *next; it; it = next) {
		next = it->next;
		it->next = NULL;
		struct xq_item **head = it->kept ? &kept : &lost, **tail = it->kept ? &kept_tail : &lost_tail;
		if (*tail)
			(*tail)->next = it;
		else
			*head = it;
		*tail = it;
		nkept += it->kept;
	}
	if (lost) {
		lost_range(xc, lost->seq, lost_tail->seq);
		if (xc->written_seq < lost_tail->seq)
			xc->written_seq = lost_tail->seq; /* later seqs are judged against the lost ranges */
	}
	xc->head = kept;
	xc->tail = kept_tail;
	xc->queued = nkept;
	xc->woken = false;
	pthread_cond_broadcast(&xc->written);
	return lost;
}

static void queue_free(struct xq_item *it)
{
	while (it) {
		struct xq_item *n = it->next;
		free(it);
		it = n;
	}
}

/* The queue is dropped (see queue_take_lost_locked). */
void xa_queue_drop(struct xcomp *xc)
{
	pthread_mutex_lock(&xc->mu);
	struct xq_item *it = queue_take_lost_locked(xc);
	pthread_mutex_unlock(&xc->mu);
	queue_free(it);
}

/* A state change's line.  A stream that breaks again and again without
 * staying up (a server that takes the handshake and closes the stream at
 * once, one restarting in a loop, one refusing the connection) has its
 * lines (connecting, up, down), from the FLAP_LOUD-th break in a row on,
 * written at most once a FLAP_LOG_MS: the others are counted, and the next
 * one written says how many were left out (unlogged) and how many breaks
 * in a row there were (breaks).  Until the forty-fifth session each
 * attempt wrote its three lines, every 125-250 ms (the backoff started
 * again at every handshake). */
#define FLAP_LOUD 3
#define FLAP_LOG_MS 60000
static void state_line(struct xcomp *xc, enum xc_state s, const char *why, bool calm)
{
	int level = calm ? CW_LOG_INFO : CW_LOG_WARN;
	if (xc->short_breaks < FLAP_LOUD || atomic_load(&xc->x->stop)) {
		LOG_KV(level, "xmpp component", "component", xc->domain, "state", state_name(s), "detail", why ? why : "");
		return;
	}
	int64_t now = cw_now_us() / 1000;
	if (now < xc->flap_log_next_ms) {
		xc->flap_unlogged++;
		return;
	}
	xc->flap_log_next_ms = now + FLAP_LOG_MS;
	char breaks[24], unlogged[24];
	snprintf(breaks, sizeof(breaks), "%u", xc->short_breaks);
	snprintf(unlogged, sizeof(unlogged), "%lu", xc->flap_unlogged);
	xc->flap_unlogged = 0;
	LOG_KV(level, "xmpp component", "component", xc->domain, "state", state_name(s), "detail", why ? why : "",
	       "breaks", breaks, "unlogged", unlogged);
}

/* drop: the queue is dropped in the same hold of mu, so that no outbox
 * row's stanza is queued between the two (append_locked). */
static void set_state(struct xcomp *xc, enum xc_state s, const char *why, bool drop)
{
	pthread_mutex_lock(&xc->mu);
	enum xc_state old = xc->state;
	xc->state = s;
	if (why)
		snprintf(xc->last_error, sizeof(xc->last_error), "%s", why);
	if (s == XC_UP) {
		xc->connected_since_ms = cw_wall_ms();
		xc->last_error[0] = '\0';
	}
	struct xq_item *lost = drop ? queue_take_lost_locked(xc) : NULL;
	pthread_cond_broadcast(&xc->written);
	pthread_mutex_unlock(&xc->mu);
	queue_free(lost);
	/* a stream going because the daemon stops is no trouble */
	bool calm = s == XC_UP || s == XC_CONNECTING || s == XC_STANDBY || atomic_load(&xc->x->stop);
	if (old != s)
		state_line(xc, s, why, calm);
}

/* ------------------------------------------------------------ answers */

xmpp_stanza_t *xa_error_reply(xmpp_stanza_t *st, const char *type, const char *condition, const char *text)
{
	char *clean = text ? xm_xml_text(text) : NULL; /* XML 1.0 text, as xa_text_child's */
	xmpp_stanza_t *r = !text || clean ? xmpp_stanza_reply_error(st, type, condition, clean) : NULL;
	free(clean);
	if (r && xmpp_stanza_get_to(st))
		xmpp_stanza_set_from(r, xmpp_stanza_get_to(st));
	return r;
}

/* xmpp_stanza_reply() keeps the request's type: an iq answer is a result. */
xmpp_stanza_t *xa_iq_result(xmpp_stanza_t *iq)
{
	xmpp_stanza_t *r = xmpp_stanza_reply(iq);
	if (r)
		xmpp_stanza_set_type(r, "result");
	return r;
}

/* What is written at once, outside the drain's batches, while a stanza of
 * the server is served (on_stanza: the answers to its requests, errors,
 * notices), is handed to libstrophe only while its send queue holds fewer
 * than XA_DIRECT_QUEUE_MAX pieces not yet begun, and of them at most
 * XA_DIRECT_BYTES_MAX bytes so written (xa_direct_fits): past that the
 * server does not read what it asks for, and the answer is dropped and
 * counted (answers_dropped).  Until the fifty-second session a server that
 * wrote requests and read nothing had every answer queued in libstrophe,
 * whose queue has no bound; in the fifty-second the bytes were counted
 * since the queue was last found empty, so a server that read, but whose
 * stream was busy enough that the queue was never empty at an answer,
 * reached the bound over time and lost answers.  What the thread writes of
 * its own accord is bounded where it is made (the keepalive ping, one a
 * minute; the re-send after a reconnect, by the window; the housekeeping's
 * notices and presences, by their queries' limits; the rooms' goodbyes, by
 * OCCUPANTS_MAX) and is not dropped: the dead letters are marked told once
 * written. */
void xa_direct_handed(struct xa_direct *d, size_t len)
{
	if (d->n == XA_DIRECT_QUEUE_MAX) { /* past the bound anyway while it is queued */
		d->bytes -= d->len[d->head];
		d->head = (d->head + 1) % XA_DIRECT_QUEUE_MAX;
		d->n--;
	}
	d->len[(d->head + d->n) % XA_DIRECT_QUEUE_MAX] = len;
	d->n++;
	d->bytes += len;
}

bool xa_direct_fits(struct xa_direct *d, int queued, size_t len)
{
	size_t waiting = queued > 0 ? (size_t)queued : 0;
	while (d->n > waiting) {
		d->bytes -= d->len[d->head];
		d->head = (d->head + 1) % XA_DIRECT_QUEUE_MAX;
		d->n--;
	}
	return waiting < XA_DIRECT_QUEUE_MAX && len <= XA_DIRECT_BYTES_MAX && d->bytes + len <= XA_DIRECT_BYTES_MAX;
}

/* Every piece the component writes goes to libstrophe here (direct: its
 * bytes count in the direct bound). */
static void hand(struct xcomp *xc, const char *buf, size_t len, bool direct)
{
	xmpp_send_raw(xc->conn, buf, len);
	xa_direct_handed(&xc->direct, direct ? len : 0);
}

static bool direct_room(struct xcomp *xc, size_t len)
{
	int queued = xmpp_conn_send_queue_len(xc->conn);
	if (xa_direct_fits(&xc->direct, queued, len))
		return true;
	atomic_fetch_add(&xc->answers_dropped, 1);
	if (!xc->direct_full) { /* once each time the bound is reached */
		char n[24];
		snprintf(n, sizeof(n), "%d", queued);
		LOG_KV_LIMITED(CW_LOG_WARN, "xmpp: the server does not read what the component writes: stanzas written "
			       "at once are dropped", "component", xc->domain, "pieces_waiting", n);
	}
	xc->direct_full = true;
	return false;
}

/* bounded: counted in the direct bound (direct_room) while a stanza of the
 * server is served */
static void send_direct(struct xcomp *xc, xmpp_stanza_t *st, bool bounded)
{
	if (!st)
		return;
	char *buf = NULL;
	size_t len = 0;
	bool direct = bounded && xc->serving;
	if (xc->conn && xc->state == XC_UP && !xc->closing && xmpp_stanza_to_text(st, &buf, &len) == XMPP_EOK && buf &&
	    (!direct || direct_room(xc, len))) {
		xc->direct_full = false;
		hand(xc, buf, len, direct);
		atomic_fetch_add(&xc->stanzas_out, 1);
	}
	if (buf)
		xmpp_free(xc->ctx, buf);
	xmpp_stanza_release(st);
}

void xa_send_now(struct xcomp *xc, xmpp_stanza_t *st)
{
	send_direct(xc, st, true);
}

void xa_answer_now(struct xcomp *xc, xmpp_stanza_t *st)
{
	if (xc->conn && xc->state == XC_UP && !xc->closing)
		xa_send_now(xc, st);
	else
		xa_answer(xc, st);
}

static void answer_error(struct xcomp *xc, xmpp_stanza_t *st, const char *type, const char *condition)
{
	const char *t = xmpp_stanza_get_type(st);
	if (t && strcmp(t, "error") == 0)
		return; /* never answer an error with an error */
	if (!xmpp_stanza_get_from(st))
		return;
	atomic_fetch_add(&xc->errors_out, 1);
	xa_send_now(xc, xa_error_reply(st, type, condition, NULL));
}

void xa_disco_identity(xmpp_ctx_t *ctx, xmpp_stanza_t *q, const char *category, const char *type, const char *name)
{
	xmpp_stanza_t *id = q ? xa_child(ctx, q, "identity", NULL) : NULL;
	if (!id)
		return;
	xmpp_stanza_set_attribute(id, "category", category);
	xmpp_stanza_set_attribute(id, "type", type);
	if (name)
		xmpp_stanza_set_attribute(id, "name", name);
}

void xa_disco_features(xmpp_ctx_t *ctx, xmpp_stanza_t *q, const char *const *features)
{
	for (const char *const *f = features; q && *f; f++) {
		xmpp_stanza_t *fe = xa_child(ctx, q, "feature", NULL);
		if (fe)
			xmpp_stanza_set_attribute(fe, "var", *f);
	}
}

xmpp_stanza_t *xa_child(xmpp_ctx_t *ctx, xmpp_stanza_t *parent, const char *name, const char *ns)
{
	xmpp_stanza_t *c = xmpp_stanza_new(ctx);
	if (!c)
		return NULL;
	xmpp_stanza_set_name(c, name);
	if (ns)
		xmpp_stanza_set_ns(c, ns);
	xmpp_stanza_add_child(parent, c);
	xmpp_stanza_release(c); /* the parent holds it */
	return c;
}

static const char *const user_features[] = {
	NS_DISCO_INFO, NS_PING, "urn:xmpp:receipts", "urn:xmpp:chat-markers:0", "urn:xmpp:message-correct:0",
	"urn:xmpp:message-retract:1", "urn:xmpp:reactions:0", "urn:xmpp:reply:0", "urn:xmpp:fallback:0",
	"http://jabber.org/protocol/chatstates", "urn:xmpp:sid:0", "jabber:x:oob", "vcard-temp", NULL,
};
static const char *const component_features[] = {
	NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_VERSION, NS_COMMANDS, NS_GATEWAY, "http://jabber.org/protocol/muc",
	NULL,
};

/* Whether st comes from a user of this XMPP server (any resource). */
static bool from_local_user(struct xcomp *xc, xmpp_stanza_t *st)
{
	char bare[XJ_JID_MAX + 1], local[XJ_PART_MAX + 1];
	const char *from = xmpp_stanza_get_from(st);
	return from && xa_local_user(xc->x, from, bare, sizeof(bare), local, sizeof(local));
}

static void disco_info(struct xcomp *xc, xmpp_stanza_t *st, bool user, const char *remote_id)
{
	xmpp_ctx_t *ctx = xc->ctx;
	xmpp_stanza_t *r = xa_iq_result(st);
	if (!r)
		return;
	xmpp_stanza_set_from(r, xmpp_stanza_get_to(st));
	xmpp_stanza_t *q = xa_child(ctx, r, "query", NS_DISCO_INFO);
	xmpp_stanza_t *in = xmpp_stanza_get_child_by_name_and_ns(st, "query", NS_DISCO_INFO);
	const char *node = in ? xmpp_stanza_get_attribute(in, "node") : NULL;
	if (node && q)
		xmpp_stanza_set_attribute(q, "node", node);
	if (node) { /* the component's nodes are its commands'; a user's JID has
		     none (XEP-0030 §7: item-not-found).  A command's node is
		     this server's users' only: to anyone else it is a node not
		     there (xa_command: their command is service-unavailable,
		     nothing says a command exists); the commands' list node
		     names none (disco_items). */
		bool ours = strcmp(node, NS_COMMANDS) == 0 || from_local_user(xc, st);
		if (q && !user && ours && xa_command_info(xc, q, node)) {
			xa_send_now(xc, r);
		} else {
			xmpp_stanza_release(r);
			answer_error(xc, st, "cancel", "item-not-found");
		}
		return;
	}
	char name[400];
	if (user)
		snprintf(name, sizeof(name), "%.250s (%.60s)", remote_id, xc->peer);
	else
		snprintf(name, sizeof(name), "Causeway gateway to %.60s", xc->peer);
	xa_disco_identity(ctx, q, "gateway", "mimi", name);
	if (!user) { /* the component serves the groups' rooms too (XEP-0045, xmpp_muc.c) */
		snprintf(name, sizeof(name), "Groups with %.60s", xc->peer);
		xa_disco_identity(ctx, q, "conference", "text", name);
	} else { /* a remote user's JID is the PEP service of their avatar (XEP-0084) */
		xa_disco_identity(ctx, q, "pubsub", "pep", NULL);
	}
	xa_disco_features(ctx, q, user ? user_features : component_features);
	xa_send_now(xc, r);
}

static void disco_items(struct xcomp *xc, xmpp_stanza_t *st, bool user)
{
	xmpp_stanza_t *r = xa_iq_result(st);
	if (!r)
		return;
	xmpp_stanza_set_from(r, xmpp_stanza_get_to(st));
	xmpp_stanza_t *q = xa_child(xc->ctx, r, "query", NS_DISCO_ITEMS);
	xmpp_stanza_t *in = xmpp_stanza_get_child_by_name_and_ns(st, "query", NS_DISCO_ITEMS);
	const char *node = in ? xmpp_stanza_get_attribute(in, "node") : NULL;
	if (q && node)
		xmpp_stanza_set_attribute(q, "node", node);
	if (node && (user || strcmp(node, NS_COMMANDS) != 0)) {
		/* the only node is the component's commands' (XEP-0030 §7) */
		xmpp_stanza_release(r);
		answer_error(xc, st, "cancel", "item-not-found");
		return;
	}
	/* The commands are this server's users' (XEP-0050 §2.2: "The
	 * responder is not required to send the same list of commands to all
	 * requesters"): anyone else, who may run none (xa_command), gets an
	 * empty list.  Until the forty-seventh session the list went to
	 * anyone, another server's user too, while running one of them
	 * answered as if it did not exist. */
	if (q && node && from_local_user(xc, st))
		xa_command_items(xc, q);
	xa_send_now(xc, r);
}

xmpp_stanza_t *xa_text_child(xmpp_ctx_t *ctx, xmpp_stanza_t *parent, const char *name, const char *ns,
			     const char *text)
{
	/* Only characters XML 1.0 allows (since the thirty-first session):
	 * before, a peer's group name or display name with U+FFFE went to
	 * the stream as it was, the server closed it (not-well-formed), and
	 * the re-send after the reconnect closed it again, for ever. */
	char *clean = xm_xml_text(text ? text : "");
	xmpp_stanza_t *f = clean ? xa_child(ctx, parent, name, ns) : NULL;
	xmpp_stanza_t *t = f ? xmpp_stanza_new(ctx) : NULL;
	if (t) {
		xmpp_stanza_set_text(t, clean);
		xmpp_stanza_add_child(f, t);
		xmpp_stanza_release(t);
	}
	free(clean);
	return t ? f : NULL;
}

static void version(struct xcomp *xc, xmpp_stanza_t *st)
{
	xmpp_stanza_t *r = xa_iq_result(st);
	if (!r)
		return;
	xmpp_stanza_set_from(r, xmpp_stanza_get_to(st));
	xmpp_stanza_t *q = xa_child(xc->ctx, r, "query", NS_VERSION);
	if (q) {
		xa_text_child(xc->ctx, q, "name", NULL, "Causeway");
		xa_text_child(xc->ctx, q, "version", NULL, PACKAGE_VERSION);
	}
	xa_send_now(xc, r);
}

/* XEP-0100 jabber:iq:gateway: a client asks how to write to a contact
 * (get: a description and a prompt) and turns the contact's id on the
 * remote network into its JID (set: <prompt>id</prompt> -> <jid/>). */
static void gateway_iq(struct xcomp *xc, xmpp_stanza_t *st, xmpp_stanza_t *q, bool get)
{
	char jid[XJ_JID_MAX + 1];
	if (!get) {
		xmpp_stanza_t *p = xmpp_stanza_get_child_by_name(q, "prompt");
		char *id = p ? xmpp_stanza_get_text(p) : NULL;
		char rid[300], rbare[XJ_JID_MAX + 1];
		bool ok = id && xa_remote_jid(xc, id, jid, sizeof(jid)) &&
			  xa_remote_user(xc, jid, rid, sizeof(rid), rbare, sizeof(rbare));
		if (id)
			xmpp_free(xc->ctx, id);
		if (!ok)
			return answer_error(xc, st, "modify", "not-acceptable");
	}
	xmpp_stanza_t *r = xa_iq_result(st);
	if (!r)
		return;
	xmpp_stanza_set_from(r, xmpp_stanza_get_to(st));
	xmpp_stanza_t *rq = xa_child(xc->ctx, r, "query", NS_GATEWAY);
	if (rq && get) {
		char desc[XJ_PART_MAX + 200];
		snprintf(desc, sizeof(desc), "The id of your contact on %s, as that network shows it", xc->peer);
		xa_text_child(xc->ctx, rq, "desc", NULL, desc);
		xa_text_child(xc->ctx, rq, "prompt", NULL, "Contact id");
	} else if (rq) {
		xa_text_child(xc->ctx, rq, "jid", NULL, jid);
	}
	xa_send_now(xc, r);
}

static void on_iq(struct xcomp *xc, xmpp_stanza_t *st)
{
	const char *type = xmpp_stanza_get_type(st), *to = xmpp_stanza_get_to(st), *id = xmpp_stanza_get_id(st);
	if (!type)
		return answer_error(xc, st, "modify", "bad-request");
	if (strcmp(type, "result") == 0 || strcmp(type, "error") == 0) {
		if (id && xc->ping_sent_ms && strcmp(id, xc->ping_id) == 0) {
			/* the server answered our ping (an error answer proves it
			 * alive too): what was written before it got there */
			xc->proven_ms = xc->ping_sent_ms;
			xc->ping_sent_ms = 0;
			xc->pings_answered = xc->pings_sent;
		}
		return;
	}
	if ((strcmp(type, "get") != 0 && strcmp(type, "set") != 0) || !id)
		return answer_error(xc, st, "modify", "bad-request");
	char local[XJ_PART_MAX + 1], domain[XJ_PART_MAX + 1], res[XJ_PART_MAX + 1];
	if (!to || !xj_split(to, local, sizeof(local), domain, sizeof(domain), res, sizeof(res)))
		return answer_error(xc, st, "modify", "jid-malformed");
	/* A get or set holds exactly one child element (RFC 6120 §8.2.3):
	 * Prosody refuses others from its clients, but not over s2s. Until the
	 * twenty-third session the first child was served, the rest ignored. */
	xmpp_stanza_t *q = NULL;
	int children = 0;
	for (xmpp_stanza_t *c = xmpp_stanza_get_children(st); c; c = xmpp_stanza_get_next(c))
		if (xmpp_stanza_is_tag(c) && !children++)
			q = c;
	if (children != 1)
		return answer_error(xc, st, "modify", "bad-request");
	const char *ns = xmpp_stanza_get_ns(q);
	bool get = strcmp(type, "get") == 0;
	if (local[0] == '#') { /* a group chat (xmpp_muc.c) */
		if (!xa_muc_iq(xc, st, ns, get))
			answer_error(xc, st, "cancel", "service-unavailable");
		return;
	}
	bool user = local[0] != '\0';
	char remote_id[MIMI_LOCAL_MAX + 1] = "", bare[XJ_JID_MAX + 1];
	/* A localpart that is no escape of a remote id, or the escape of an
	 * id the neutral model cannot carry, names nobody: an unknown
	 * recipient, as for a message (RFC 6121 §8.5.1; xa_remote_user is
	 * the messages' test).  Until the thirty-sixth session any escape was
	 * served as a user: disco#info put the id in its identity's name,
	 * and bytes that are no UTF-8 (\ff) there made the server close the
	 * component's stream. */
	if (user && !xa_remote_user(xc, to, remote_id, sizeof(remote_id), bare, sizeof(bare)))
		return answer_error(xc, st, "cancel", "service-unavailable");
	if (ns && get && strcmp(ns, NS_DISCO_INFO) == 0)
		disco_info(xc, st, user, remote_id);
	else if (ns && get && strcmp(ns, NS_DISCO_ITEMS) == 0)
		disco_items(xc, st, user);
	else if (ns && get && strcmp(ns, NS_PING) == 0) {
		xmpp_stanza_t *r = xa_iq_result(st);
		if (r)
			xmpp_stanza_set_from(r, to);
		xa_send_now(xc, r);
	} else if (ns && get && !user && strcmp(ns, NS_VERSION) == 0)
		version(xc, st);
	else if (ns && get && user && (strcmp(ns, "vcard-temp") == 0 || strcmp(ns, "http://jabber.org/protocol/pubsub") == 0) &&
		 !from_local_user(xc, st))
		/* A remote user's name and picture are for this server's
		 * users: anyone else (another server's, over s2s) could
		 * otherwise look up names by phone number.  The same answer as
		 * for nobody. */
		answer_error(xc, st, "cancel", "service-unavailable");
	else if (ns && get && user && strcmp(ns, "vcard-temp") == 0)
		xa_vcard(xc, st, remote_id);
	else if (ns && get && user && strcmp(ns, "http://jabber.org/protocol/pubsub") == 0)
		xa_avatar_items(xc, st, q, remote_id);
	else if (ns && !user && strcmp(ns, NS_COMMANDS) == 0 && xa_command(xc, st))
		;
	else if (ns && !user && strcmp(ns, NS_GATEWAY) == 0)
		gateway_iq(xc, st, q, get);
	else
		answer_error(xc, st, "cancel", "service-unavailable");
}

/* Every stanza of the stream. */
/* A stanza larger than xmpp.max_stanza_bytes, or nested deeper than
 * XA_STANZA_DEPTH_MAX, cut there (xmpp_xml.c): what
 * was built of it is its first part only.  Refused, not taken: its sender
 * is told (policy-violation, modify; a result or an error is not answered)
 * and the stream goes on.  Until the twenty-eighth session the stream was
 * closed, and since the server writes a stanza out larger than it read it
 * (Prosody escapes ' and " as &apos; and &quot;, and gives a namespaced
 * attribute its own declaration), any user within the server's own cap
 * could close it (a review's finding). */
static void refuse_cut(struct xcomp *xc, xmpp_stanza_t *st)
{
	atomic_fetch_add(&xc->stanzas_cut, 1);
	bool deep = xa_xml_cut_deep();
	long cap = deep ? XA_STANZA_DEPTH_MAX : xc->x->cfg->xmpp_max_stanza_bytes;
	const char *name = xmpp_stanza_get_name(st), *from = xmpp_stanza_get_from(st), *t = xmpp_stanza_get_type(st);
	char caps[24];
	snprintf(caps, sizeof(caps), "%ld", cap);
	if (deep)
		LOG_KV_LIMITED(CW_LOG_WARN, "xmpp: a stanza nested deeper than the cap is refused", "component",
			       xc->domain, "name", name ? name : "", "from", from ? from : "", "levels", caps);
	else
		LOG_KV_LIMITED(CW_LOG_WARN, "xmpp: a stanza larger than the cap is refused", "component", xc->domain,
			       "name", name ? name : "", "from", from ? from : "", "cap", caps, "setting",
			       "xmpp.max_stanza_bytes");
	if (!name || !from || (strcmp(name, "message") != 0 && strcmp(name, "presence") != 0 && strcmp(name, "iq") != 0) ||
	    (t && (strcmp(t, "error") == 0 || strcmp(t, "result") == 0)))
		return;
	char text[96];
	if (deep)
		snprintf(text, sizeof(text), "the stanza nests elements deeper than %ld levels, the most this gateway takes",
			 cap);
	else
		snprintf(text, sizeof(text), "the stanza is larger than %ld bytes, the most this gateway takes", cap);
	atomic_fetch_add(&xc->errors_out, 1);
	xa_send_now(xc, xa_error_reply(st, "modify", "policy-violation", text));
}

static int on_stanza(xmpp_conn_t *conn, xmpp_stanza_t *st, void *arg)
{
	(void)conn;
	struct xcomp *xc = arg;
	if (xa_xml_cut()) {
		xc->serving = true;
		refuse_cut(xc, st);
		xc->serving = false;
		return 1;
	}
	atomic_fetch_add(&xc->stanzas_in, 1);
	const char *name = xmpp_stanza_get_name(st);
	if (!name)
		return 1;
	const char *to = xmpp_stanza_get_to(st), *from = xmpp_stanza_get_from(st);
	if (!to || !from) {
		/* The server stamps both; without them there is nobody to answer. */
		LOG_KV_LIMITED(CW_LOG_INFO, "xmpp stanza without from or to dropped", "component", xc->domain, "name", name);
		return 1;
	}
	/* The server routes to the component only what is addressed to its
	 * domain (a JID at it).  Anything else is not the component's to
	 * answer: its answer would come from that other address, which the
	 * server refuses from a component (Prosody closes the stream:
	 * invalid-from), and a message to it would be taken as one to a
	 * remote user.  Until the fifty-first session such a stanza was
	 * served (disco#info to another domain answered as the gateway). */
	char tl[XJ_PART_MAX + 1], td[XJ_PART_MAX + 1], tr[XJ_PART_MAX + 1];
	if (!xj_split(to, tl, sizeof(tl), td, sizeof(td), tr, sizeof(tr)) || strcasecmp(td, xc->domain) != 0) {
		LOG_KV_LIMITED(CW_LOG_WARN, "xmpp: a stanza not addressed to the component dropped", "component",
			       xc->domain, "name", name, "to", to);
		return 1;
	}
	xc->serving = true; /* its answers: within the direct bound (direct_room) */
	if (strcmp(name, "iq") == 0)
		on_iq(xc, st);
	else if (strcmp(name, "message") == 0)
		xa_in_message(xc, st);
	else if (strcmp(name, "presence") == 0)
		xa_presence(xc, st);
	xc->serving = false;
	return 1;
}

/* What expat holds for the stream's parser, published; a renewal of it
 * (xmpp_xml.c: past its bound, expat's tables of the names read are
 * dropped between two stanzas, the stream going on) counted and said. */
static void parser_memory(struct xcomp *xc)
{
	unsigned long renewed = xa_xml_renewed();
	if (renewed) {
		atomic_fetch_add(&xc->parser_renewals, renewed);
		char n[24], bound[24];
		snprintf(n, sizeof(n), "%lu", renewed);
		snprintf(bound, sizeof(bound), "%ld", xa_xml_renew_bound());
		LOG_KV(CW_LOG_INFO, "xmpp: the stream's parser was renewed, what it held past its bound dropped",
		       "component", xc->domain, "renewals", n, "bound_bytes", bound);
	}
	const char *off = xa_xml_renewal_off();
	if (off)
		LOG_KV(CW_LOG_WARN, "xmpp: the stream's parser will not be renewed on this stream", "component",
		       xc->domain, "detail", off);
	atomic_store(&xc->parser_bytes, xa_xml_held());
}

/* The component whose thread this is (libstrophe's callbacks run on it). */
static __thread struct xcomp *this_comp;

static int check_fd(xmpp_conn_t *conn, void *sock)
{
	(void)conn;
	int fd = *(int *)sock;
	if (this_comp)
		this_comp->sock_fd = fd;
	/* libstrophe waits with select(): a descriptor past FD_SETSIZE would be
	 * written outside the set. */
	if (fd >= FD_SETSIZE) {
		LOG_KV(CW_LOG_ERROR, "xmpp: the component socket's descriptor is too high for libstrophe's select()");
		return -1;
	}
	/* What the thread writes is one write already (drain): a small one
	 * after it (a ping, an answer) goes at once, not after the server's
	 * acknowledgement of the last (Nagle's algorithm, with the peer's
	 * delayed acknowledgement: up to 40 ms each on Linux). */
	int one = 1;
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return 0;
}

/* Whether the server closed the stream for what the component wrote: XML
 * it could not read (RFC 6120 §4.9.3.13 not-well-formed, §4.9.3.8
 * invalid-xml).  libstrophe knows not-well-formed only by RFC 3920's
 * name (xml-not-well-formed): Prosody's is undefined-condition to it. */
static bool unreadable_error(const xmpp_stream_error_t *se)
{
	if (se->type == XMPP_SE_XML_NOT_WELL_FORMED || se->type == XMPP_SE_INVALID_XML)
		return true;
	for (xmpp_stanza_t *c = se->stanza ? xmpp_stanza_get_children(se->stanza) : NULL; c;
	     c = xmpp_stanza_get_next(c)) {
		const char *name = xmpp_stanza_get_name(c), *ns = xmpp_stanza_get_ns(c);
		if (name && ns && strcmp(ns, "urn:ietf:params:xml:ns:xmpp-streams") == 0 &&
		    (strcmp(name, "not-well-formed") == 0 || strcmp(name, "xml-not-well-formed") == 0 ||
		     strcmp(name, "invalid-xml") == 0))
			return true;
	}
	return false;
}

static void stream_up(struct xcomp *xc);

static void on_conn(xmpp_conn_t *conn, xmpp_conn_event_t ev, int error, xmpp_stream_error_t *se, void *arg)
{
	(void)conn;
	struct xcomp *xc = arg;
	if (ev == XMPP_CONN_CONNECT || ev == XMPP_CONN_RAW_CONNECT) {
		atomic_fetch_add(&xc->connects, 1);
		xc->up_event = true;
		stream_up(xc);
		return;
	}
	char why[200];
	if (se && se->type == XMPP_SE_NOT_AUTHORIZED) {
		snprintf(why, sizeof(why), "the XMPP server refused the component secret (not-authorized)");
		xc->auth_failed = true;
	} else if (se) {
		xc->unreadable = unreadable_error(se);
		snprintf(why, sizeof(why), "stream error %d%s%.120s", (int)se->type, se->text ? ": " : "",
			 se->text ? se->text : "");
	} else if (error) {
		snprintf(why, sizeof(why), "connection: %s", strerror(error));
	} else {
		snprintf(why, sizeof(why), "the stream closed");
	}
	snprintf(xc->drop_reason, sizeof(xc->drop_reason), "%s", why);
	xc->dropped = true;
}

/* ------------------------------------------------------------ the thread */

static int64_t mono_ms(void) { return cw_now_us() / 1000; }

/* Sleeps up to ms, or until something is queued. */
static void nap(struct xcomp *xc, int ms)
{
	store_sleep_fd(xc->wake_fd[0], ms);
}

static void recent_drop_oldest(struct xcomp *xc)
{
	struct xr_item *r = &xc->recent[xc->recent_head];
	xc->recent_bytes -= strlen(r->text);
	free(r->text);
	r->text = NULL;
	xc->recent_head = (xc->recent_head + 1) % XMPP_RECENT_MAX;
	xc->recent_n--;
}

static void recent_clear(struct xcomp *xc)
{
	while (xc->recent_n)
		recent_drop_oldest(xc);
	xc->recent_head = 0;
}

/* Whether a stanza written before a break at ref_ms is written again
 * after the reconnect: one the server may not have (written again, or
 * first, since it last answered a ping: proven_ms, or the stream's start),
 * or one first written in the window before the break (a server may lose
 * what it took in its last seconds).  A stanza written again is counted
 * from its first write: until the forty-sixth session it was stamped anew
 * at each re-send, so a stream that broke every few seconds wrote the same
 * stanzas again after every reconnect, for as long as it flapped. */
static bool recent_needed(const struct xcomp *xc, const struct xr_item *r, int64_t ref_ms)
{
	return r->at_ms >= xc->proven_ms || r->first_ms >= ref_ms - xc->x->cfg->xmpp_resend_window_ms;
}

/* Remembers a written stanza (takes text; first_ms: its first write) and
 * forgets those no re-send needs (recent_needed), and the oldest past
 * XMPP_RECENT_MAX stanzas or XMPP_RECENT_BYTES.  An <iq/> is not kept: an
 * answer to a request is asked for again, and a vCard with its avatar is
 * large. */
static void recent_keep(struct xcomp *xc, char *text, int64_t first_ms, int64_t now_ms)
{
	size_t len = strlen(text);
	if (xc->x->cfg->xmpp_resend_window_ms <= 0 || strncmp(text, "<iq", 3) == 0 || len > XMPP_RECENT_BYTES / 4) {
		free(text);
		return;
	}
	while (xc->recent_n && (xc->recent_n == XMPP_RECENT_MAX || !recent_needed(xc, &xc->recent[xc->recent_head], now_ms) ||
				xc->recent_bytes + len > XMPP_RECENT_BYTES))
		recent_drop_oldest(xc);
	struct xr_item *r = &xc->recent[(xc->recent_head + xc->recent_n) % XMPP_RECENT_MAX];
	r->at_ms = now_ms;
	r->first_ms = first_ms;
	r->text = text;
	xc->recent_n++;
	xc->recent_bytes += len;
}

/* A stanza written now for the first time (takes text). */
static void recent_add(struct xcomp *xc, char *text, int64_t now_ms)
{
	recent_keep(xc, text, now_ms, now_ms);
}

void xa_send_kept(struct xcomp *xc, xmpp_stanza_t *st)
{
	if (!st)
		return;
	char *buf = NULL;
	size_t len = 0;
	if (xc->conn && xc->state == XC_UP && xmpp_stanza_to_text(st, &buf, &len) == XMPP_EOK && buf &&
	    (!xc->serving || direct_room(xc, len))) {
		xc->direct_full = false;
		hand(xc, buf, len, xc->serving);
		atomic_fetch_add(&xc->stanzas_out, 1);
		char *copy = strdup(buf);
		if (copy)
			recent_add(xc, copy, mono_ms());
	}
	if (buf)
		xmpp_free(xc->ctx, buf);
	xmpp_stanza_release(st);
}

void xa_peer_name(const struct xcomp *xc, const char *name, const char *fallback, char *out, size_t len)
{
	char shown[4 * CW_NAME_SHOWN_MAX + 8];
	cw_utf8_name_shown(name ? name : "", shown, sizeof(shown));
	if (!shown[0] && fallback)
		cw_utf8_name_shown(fallback, shown, sizeof(shown));
	if (shown[0])
		snprintf(out, len, "%s (%s)", shown, xc->peer);
	else if (len)
		out[0] = '\0';
}

void xa_notice(struct xcomp *xc, enum xa_write how, const char *to, const char *fmt, ...)
{
	xmpp_ctx_t *ctx = how == XA_QUEUED ? xa_thread_ctx(xc->x) : xc->ctx;
	xmpp_stanza_t *m = ctx ? xmpp_message_new(ctx, "chat", to, NULL) : NULL;
	if (!m)
		return;
	char text[2 * XJ_JID_MAX + 700];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	xmpp_stanza_set_from(m, xc->domain);
	/* An id, and the same origin-id (XEP-0359), as every message the
	 * component writes: a notice written again after a break (kept) is
	 * the same message to a client that deduplicates.  Until the
	 * forty-sixth session a notice had none, and showed twice. */
	unsigned char raw[8];
	char id[8 + 2 * sizeof(raw) + 1];
	cw_random(raw, sizeof(raw));
	memcpy(id, "cw-note-", 8);
	cw_hex(id + 8, raw, sizeof(raw));
	xmpp_stanza_set_id(m, id);
	xa_text_child(ctx, m, "body", NULL, text); /* XML 1.0 text: a cut may split a character */
	xmpp_stanza_t *oid = xa_child(ctx, m, "origin-id", "urn:xmpp:sid:0");
	if (oid)
		xmpp_stanza_set_attribute(oid, "id", id);
	if (how == XA_QUEUED)
		xa_enqueue_stanza(xc, m);
	else if (how == XA_NOW)
		xa_send_now(xc, m);
	else
		xa_send_kept(xc, m);
}

/* After a reconnect: what was written in the window before the break, or
 * since the server last proved it had everything, goes again, with the
 * same ids (XEP-0114 acknowledges nothing), and is kept as written now:
 * a second break before the server proves it has them sends them again. */
static void recent_resend(struct xcomp *xc, int64_t drop_ms, int64_t now)
{
	size_t n = 0, total = xc->recent_n;
	struct xr_item *all = malloc((total ? total : 1) * sizeof(*all));
	if (!all) {
		recent_clear(xc);
		LOG_KV(CW_LOG_WARN, "xmpp: out of memory; the stanzas before the break are not written again",
		       "component", xc->domain);
		return;
	}
	for (size_t i = 0; i < total; i++) {
		all[i] = xc->recent[(xc->recent_head + i) % XMPP_RECENT_MAX];
		xc->recent[(xc->recent_head + i) % XMPP_RECENT_MAX].text = NULL;
	}
	xc->recent_head = xc->recent_n = xc->recent_bytes = 0;
	for (size_t i = 0; i < total; i++) {
		if (!recent_needed(xc, &all[i], drop_ms)) {
			free(all[i].text);
			continue;
		}
		hand(xc, all[i].text, strlen(all[i].text), false);
		recent_keep(xc, all[i].text, all[i].first_ms, now);
		n++;
	}
	free(all);
	if (n) {
		char count[24];
		snprintf(count, sizeof(count), "%zu", n);
		LOG_KV(CW_LOG_INFO, "xmpp: stanzas of the seconds before the break written again", "component",
		       xc->domain, "stanzas", count);
	}
}

/* What one drain hands to libstrophe at most, and only once libstrophe has
 * written all it was handed before (its send queue is empty): libstrophe's
 * queue has no bound and takes whatever is given, whether the server reads
 * or not.  Until the fifty-first session the whole queue (up to QUEUE_MAX
 * stanzas) was handed at every turn and counted written at once, so a
 * server that read slowly let libstrophe's queue grow without limit, and a
 * break lost what was handed before the newest XMPP_RECENT_MAX stanzas
 * while its rows counted as delivered.  A batch is far below the re-send
 * window's bounds (XMPP_RECENT_MAX, XMPP_RECENT_BYTES). */
#define DRAIN_BATCH_MAX 512
#define DRAIN_BATCH_BYTES (64u << 10)
_Static_assert(2 * DRAIN_BATCH_MAX <= XMPP_RECENT_MAX && 2 * DRAIN_BATCH_BYTES <= XMPP_RECENT_BYTES / 4,
	       "the re-send window holds what is handed and not yet written");

static void drain(struct xcomp *xc)
{
	/* libstrophe does not count an element it has begun writing, so a
	 * blank (white space between stanzas, RFC 6120 4.6.1) goes after
	 * each batch: an empty count then means the batch is on the wire. */
	bool idle = xmpp_conn_send_queue_len(xc->conn) == 0;
	pthread_mutex_lock(&xc->mu);
	if (idle && xc->handed_seq > xc->written_seq) {
		xc->written_seq = xc->handed_seq;
		pthread_cond_broadcast(&xc->written);
	}
	struct xq_item *it = idle ? xc->head : NULL, *end = it;
	size_t n = 0, total = 0;
	while (end && n < DRAIN_BATCH_MAX && (n == 0 || total + end->len <= DRAIN_BATCH_BYTES)) {
		total += end->len;
		n++;
		if (end->seq > xc->handed_seq) /* answers kept from before a break have older seqs */
			xc->handed_seq = end->seq;
		end = end->next;
	}
	if (it) {
		xc->head = end;
		if (!end)
			xc->tail = NULL;
		xc->queued -= n;
		xc->woken = false;
	}
	pthread_mutex_unlock(&xc->mu);
	if (!it)
		return;
	int64_t now = mono_ms();
	/* One write for the batch (libstrophe writes each queued piece
	 * with a send() of its own): stanzas are only concatenated. */
	char *all = malloc(total + 1);
	if (all) {
		size_t off = 0;
		for (struct xq_item *x = it; x != end; x = x->next) {
			memcpy(all + off, x->text, x->len);
			off += x->len;
		}
		all[total] = '\0'; /* libstrophe reads what it is given as a C string too */
		hand(xc, all, total, false);
		free(all);
	}
	while (it != end) {
		struct xq_item *next = it->next;
		if (!all)
			hand(xc, it->text, it->len, false);
		atomic_fetch_add(&xc->stanzas_out, 1);
		/* the item's memory becomes the remembered text */
		memmove(it, it->text, it->len + 1);
		recent_add(xc, (char *)it, now);
		it = next;
	}
	hand(xc, " ", 1, false);
}

static bool lock_component(struct xcomp *xc, PGconn *c)
{
	char key[XJ_PART_MAX + 32];
	snprintf(key, sizeof(key), "causeway.xmpp:%s", xc->domain);
	const char *p[] = { key };
	PGresult *r = PQexecParams(c, "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", 1, NULL, p, NULL, NULL, 0);
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 && PQgetvalue(r, 0, 0)[0] == 't';
	PQclear(r);
	return ok;
}

/* Rows that waited for the stream are due now (their backoff may be long). */
static void outbox_due_now(struct xcomp *xc, PGconn *c)
{
	const char *p[] = { xc->peer };
	PGresult *r = PQexecParams(c,
		"WITH u AS (UPDATE outbox o SET next_attempt_at = now() FROM events ev JOIN identities s ON s.id = ev.sender_id "
		" JOIN peers p ON p.id = s.peer_id WHERE o.destination = 'xmpp' AND o.state = 'pending' "
		" AND o.next_attempt_at > now() AND ev.id = o.event_id AND p.name = $1 RETURNING 1) "
		"SELECT count(*), pg_notify('causeway_outbox', '') FROM u",
		1, NULL, p, NULL, NULL, 0);
	PQclear(r);
}

/* The handshake was answered: the stream is up from here on, inside the
 * libstrophe turn that read the answer, so the stanzas read with it in the
 * same turn (a user's message, ping or subscribe sent at that very moment)
 * are served on an up stream.  Until the forty-sixth session the stream
 * counted as up only after that turn: their answers, kept or not, were
 * dropped unwritten (xa_send_now, xa_send_kept: nothing is written while
 * not up).  What was written before the break goes first (recent_resend),
 * then the rooms' occupants are taken over (before a join read with the
 * answer would find them empty and keep them from being loaded), and the
 * rows that waited for the stream are made due. */
static void stream_up(struct xcomp *xc)
{
	set_state(xc, XC_UP, NULL, false);
	/* What is written from now on, the stanzas written again included
	 * (stamped with the same time: a later one would count them as
	 * proven, and a second break would forget them), is proven by the
	 * next ping. */
	int64_t up_ms = mono_ms();
	recent_resend(xc, xc->drop_ms, up_ms);
	xc->proven_ms = up_ms;
	xc->resend_pending = true;
	xc->resend_after = 0;
	xc->audit_seen = -1; /* the roster sync goes on from the stored cursor */
	xc->profiles_xid = -1; /* and so do the profiles */
	/* The first ping goes at once, after what the first housekeeping
	 * writes (the pending requests): its answer proves what was written
	 * again, which a break soon after then need not write a third time.
	 * Until the forty-sixth session it went a minute later, and a stream
	 * that broke every few seconds never proved anything. */
	xc->ping_sent_ms = 0;
	xc->ping_next_ms = mono_ms();
	xc->pings_answered = xc->pings_sent; /* none is on its way */
	xc->fanout_gate = 0;
	if (xc->lock) {
		xa_muc_load(xc, xc->lock);
		outbox_due_now(xc, xc->lock);
	}
}

/* libstrophe waits with select(), which cannot watch a descriptor at or
 * above FD_SETSIZE, and the HTTP front may hold a thousand connections.  A
 * descriptor is taken at start, while they are all low, and given up just
 * before the stream's socket is made, which then gets the lowest free one
 * (POSIX): that one, unless another thread opens something in between.
 * check_fd refuses a socket that still ends up too high (the stream is
 * tried again later). */
static void reserve_low_fd(struct xcomp *xc)
{
	if (xc->reserve_fd < 0)
		xc->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

static void release_low_fd(struct xcomp *xc)
{
	if (xc->reserve_fd >= 0) {
		close(xc->reserve_fd);
		xc->reserve_fd = -1;
	}
}

static void stream_close(struct xcomp *xc)
{
	if (!xc->conn)
		return;
	if (xc->state == XC_UP && !xc->dropped)
		xa_muc_shutdown(xc); /* the rooms' occupants learn that they are out */
	/* What is read from here on (the server wrote it before it saw the
	 * stream's end) is not answered into the stream being closed, where
	 * the server ignores it: the answers to users' stanzas are queued
	 * for the next stream (xa_answer_now), the rest is not written. */
	xc->closing = true;
	if (xmpp_conn_is_connected(xc->conn) || xmpp_conn_is_connecting(xc->conn)) {
		xmpp_disconnect(xc->conn);
		for (int i = 0; i < 50 && !xc->dropped; i++)
			xmpp_run_once(xc->ctx, 10);
	}
	xmpp_conn_release(xc->conn);
	xc->closing = false;
	xc->conn = NULL;
	xc->dropped = false;
	xc->up_event = false;
	xc->sock_fd = -1;
	reserve_low_fd(xc);
}

/* The stream is given up, whichever way: a break, the connection that
 * holds the lock lost, the daemon stopping.  The socket closes (the rooms'
 * occupants told first when the stream is still good); what is queued never
 * reached the wire and is dropped as the state leaves UP (set_state), its
 * rows to go again; the time is kept for the re-send of the stanzas written
 * just before.  keep_recent false: those are forgotten instead, since the
 * stream may be another process's before this one holds it again, and they
 * would come late and twice. */
static void stream_give_up(struct xcomp *xc, enum xc_state s, const char *why, bool keep_recent)
{
	stream_close(xc);
	set_state(xc, s, why, true);
	xc->drop_ms = mono_ms();
	if (!keep_recent) {
		recent_clear(xc);
		/* The presences waiting (probe answers, a profile change's) are
		 * this process's memory only: not handed over (docs/xmpp.md,
		 * "Profiles"), but said. */
		size_t left = xa_fanout_left(xc);
		if (left) {
			char n[24];
			snprintf(n, sizeof(n), "%zu", left);
			LOG_KV(CW_LOG_WARN, "xmpp: presences waiting to be written are forgotten with the stream",
			       "component", xc->domain, "recipients", n);
		}
		xa_fanout_clear(xc);
	}
}

static void send_ping(struct xcomp *xc, int64_t now)
{
	unsigned char raw[8];
	cw_random(raw, sizeof(raw));
	memcpy(xc->ping_id, "cw-ping-", 8);
	cw_hex(xc->ping_id + 8, raw, sizeof(raw));
	xmpp_stanza_t *iq = xmpp_iq_new(xc->ctx, "get", xc->ping_id);
	if (!iq)
		return;
	xmpp_stanza_set_from(iq, xc->domain);
	xmpp_stanza_set_to(iq, xc->x->local_domain);
	xa_child(xc->ctx, iq, "ping", NS_PING);
	send_direct(xc, iq, false); /* one a minute: never dropped, or the stream would break for it */
	xc->pings_sent++;
	xc->ping_sent_ms = now;
	xc->ping_next_ms = now + PING_EVERY_MS;
}

/* libstrophe 0.12.2 (Debian 12) allocates a connection's stream
 * management state only in xmpp_connect_client(), but reads it for every
 * stanza a component receives too: a component connection without one
 * crashes on its first stanza.  The state is taken from a client connection
 * of the same context that is refused at once (a loopback port nobody
 * listens on, found by binding and closing it) and handed to the component's
 * connection with the public API.  A libstrophe that gives a connection its
 * state by itself refuses the second one, which is then freed. */
static void sm_scratch_event(xmpp_conn_t *conn, xmpp_conn_event_t ev, int error, xmpp_stream_error_t *se,
			     void *arg)
{
	(void)conn;
	(void)error;
	(void)se;
	if (ev == XMPP_CONN_DISCONNECT || ev == XMPP_CONN_FAIL)
		*(bool *)arg = true;
}

/* The scratch connection's socket is waited for with libstrophe's select()
 * too (xmpp_run_once): one at or past FD_SETSIZE is refused (glibc's
 * FD_SET aborts the daemon for it: __fdelt_chk), the connect fails, and
 * the state is taken all the same (it is made before the connect).  Until
 * the fifty-second session it was not looked at: the scratch socket is
 * made while the low descriptor kept for the stream's (reserve_low_fd) is
 * still held, so a daemon with a thousand HTTP connections aborted at the
 * stream's next reconnect. */
static int scratch_fd(xmpp_conn_t *conn, void *sock)
{
	(void)conn;
	return *(int *)sock >= FD_SETSIZE ? -1 : 0;
}

static void give_sm_state(xmpp_ctx_t *ctx, xmpp_conn_t *conn)
{
	int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	bool ok = bind(s, (struct sockaddr *)&a, sizeof(a)) == 0 && getsockname(s, (struct sockaddr *)&a, &len) == 0;
	close(s);
	if (!ok)
		return;
	xmpp_conn_t *scratch = xmpp_conn_new(ctx);
	if (!scratch)
		return;
	bool over = false;
	xmpp_conn_set_jid(scratch, "causeway@localhost");
	xmpp_conn_set_flags(scratch, XMPP_CONN_FLAG_DISABLE_TLS);
	xmpp_conn_set_sockopt_callback(scratch, scratch_fd);
	if (xmpp_connect_client(scratch, "127.0.0.1", ntohs(a.sin_port), sm_scratch_event, &over) == XMPP_EOK)
		for (int i = 0; i < 200 && !over; i++)
			xmpp_run_once(ctx, 5);
	xmpp_sm_state_t *sm = xmpp_conn_is_disconnected(scratch) ? xmpp_conn_get_sm_state(scratch) : NULL;
	xmpp_conn_release(scratch);
	if (sm && xmpp_conn_set_sm_state(conn, sm) != XMPP_EOK)
		xmpp_free_sm_state(sm);
}

/* The server's stream held markup XMPP forbids (RFC 6120 §11.1: a DTD, an
 * entity declaration, a comment, a processing instruction), at which
 * xmpp_xml.c stopped its parser: nothing from there on was read.  The
 * receiving side closes such a stream with restricted-xml.  Or (broken) it
 * was not well-formed XML, which libstrophe answered with invalid-xml but
 * kept open, every later read failing, until the ping's timeout.  Or a
 * stanza was larger than xmpp.max_stanza_bytes (RFC 6120 §4.9.3.14: closed
 * with policy-violation), and none of it was served.  It is given up as
 * any break, and connected again after the backoff.  The rooms' occupants
 * are not told first (nothing more is written to a stream in error); the
 * server is given half a second to close it. */
static void refuse_stream(struct xcomp *xc, const char *why, enum xa_xml_stop kind)
{
	char reason[sizeof(xc->drop_reason)]; /* not the connection handler's "the stream closed" */
	if (kind == XA_XML_BROKEN) {
		LOG_KV(CW_LOG_WARN, "xmpp: the server's stream is not well-formed XML: closed", "component", xc->domain,
		       "detail", why);
		snprintf(reason, sizeof(reason), "the server's stream is not well-formed XML (%s)", why);
	} else if (kind == XA_XML_TOO_LARGE) {
		long cap = xc->x->cfg->xmpp_max_stanza_bytes;
		/* a tag, the stream header (why says which), or elements open
		 * past what a stanza of the cap can open (a third of it) */
		bool deep = strstr(why, "nested") != NULL;
		const char *what = strstr(why, "stream header") ? "a stream header" : deep ? "elements nested" : "a tag";
		char caps[24], msg[112], bound[48];
		snprintf(caps, sizeof(caps), "%ld", cap);
		snprintf(bound, sizeof(bound), deep ? "deeper than %ld levels" : "larger than %ld bytes", deep ? cap / 3 : cap);
		snprintf(msg, sizeof(msg), "xmpp: the server sent %s %s the cap: closed with policy-violation", what,
			 deep ? "deeper than" : "larger than");
		LOG_KV(CW_LOG_WARN, msg, "component", xc->domain, "cap", caps, "setting", "xmpp.max_stanza_bytes");
		snprintf(reason, sizeof(reason), "the server sent %s %s (xmpp.max_stanza_bytes; policy-violation)", what,
			 bound);
		atomic_fetch_add(&xc->stanza_too_large, 1);
		char text[96];
		snprintf(text, sizeof(text), "%s %s", what + (what[0] == 'a' && what[1] == ' ' ? 2 : 0), bound);
		xmpp_send_error(xc->conn, XMPP_SE_POLICY_VIOLATION, text);
	} else {
		LOG_KV(CW_LOG_WARN,
		       "xmpp: the server's stream holds markup XMPP forbids (RFC 6120 11.1): closed with restricted-xml",
		       "component", xc->domain, "markup", why);
		snprintf(reason, sizeof(reason), "the server's stream held %s (restricted-xml)", why);
		atomic_fetch_add(&xc->restricted_xml, 1);
		xmpp_send_error(xc->conn, XMPP_SE_RESTRICTED_XML, NULL);
	}
	xmpp_disconnect(xc->conn);
	for (int i = 0; i < 50 && !xc->dropped; i++)
		xmpp_run_once(xc->ctx, 10);
	memcpy(xc->drop_reason, reason, sizeof(reason));
	xc->dropped = true;
}

/* One turn of the stream.  While it is up, the thread sleeps in poll() on
 * the socket and the wake pipe (libstrophe's own select() cannot see the
 * pipe), so a queued stanza goes out at once and an idle stream costs
 * nothing; libstrophe then reads and writes what is ready without waiting.
 * Connecting and the handshake use libstrophe's loop with short turns. */
static void turn(struct xcomp *xc, int64_t next_house)
{
	if (xc->state != XC_UP || xc->sock_fd < 0) { /* state: only this thread writes it */
		xmpp_run_once(xc->ctx, LOOP_TIMEOUT_MS);
		return;
	}
	struct pollfd p[2] = { { .fd = xc->sock_fd, .events = POLLIN }, { .fd = xc->wake_fd[0], .events = POLLIN } };
	if (xmpp_conn_send_queue_len(xc->conn) > 0)
		p[0].events |= POLLOUT;
	int64_t wait = next_house - mono_ms();
	if (wait < 0)
		wait = 0;
	if (wait > IDLE_WAIT_MS)
		wait = IDLE_WAIT_MS;
	if (poll(p, 2, (int)wait) > 0 && (p[1].revents & POLLIN)) {
		char buf[256];
		while (read(xc->wake_fd[0], buf, sizeof(buf)) > 0)
			;
	}
	/* libstrophe logs each piece it has written whole ("SENT: %s", at
	 * debug level, in xmpp_run_once) and, with a handler of the caller's,
	 * formats it before the handler can say no: the text of a drained
	 * batch (up to DRAIN_BATCH_BYTES) copied twice through vsnprintf
	 * (into 1 KB, then again at full size), for strophe_log to drop it
	 * at every level.  Until the fifty-eighth session that was some 45 %
	 * of this thread's CPU on tests/bench/xmpp's release, about 1 us a
	 * message (docs/performance.md, "Fifty-eighth session").  A turn that
	 * has something to write runs without a handler unless debug lines
	 * are logged.  What libstrophe 0.12 says at error level on a stream
	 * that is up is a failed allocation or select()'s own error ("event
	 * watcher internal error"), lost in such a turn; a stream that breaks
	 * still reaches on_conn, which logs it, and the handshake's errors come
	 * before the stream is up, with the handler. */
	bool quiet = xmpp_conn_send_queue_len(xc->conn) > 0 && !cw_log_enabled(CW_LOG_DEBUG);
	if (quiet)
		xc->log.handler = NULL;
	xmpp_run_once(xc->ctx, 0);
	xc->log.handler = strophe_log;
}

/* A profile change's presences (xa_fanout_add) go a batch of FANOUT_BATCH
 * recipients (two stanzas each) at a time, each batch followed by a ping
 * and the next one written once the server has answered it: it has then
 * taken all before, so a message queued meanwhile waits behind one batch
 * at most, not behind a remote user's every contact.  Until the
 * forty-sixth session they were all queued at once (20,000 stanzas for
 * 10,000 contacts, the queue's bound), and a message waited seconds for
 * them, or found the queue full. */
#define FANOUT_BATCH 128
static void fanout_turn(struct xcomp *xc, int64_t now)
{
	if (xc->pings_answered < xc->fanout_gate) {
		if (!xc->ping_sent_ms) /* the one answered went before the batch */
			send_ping(xc, now);
		return;
	}
	/* not while libstrophe still has stanzas to write (drain) */
	if (xmpp_conn_send_queue_len(xc->conn) > 0 || !xa_fanout_left(xc) || !xa_fanout_queue(xc, xc->lock, FANOUT_BATCH))
		return;
	drain(xc); /* one write, kept for a re-send as every queued stanza, then the ping */
	xc->fanout_gate = xc->pings_sent + 1;
	if (!xc->ping_sent_ms)
		send_ping(xc, now);
}

long xa_reconnect_backoff(long prev, int64_t up_ms, bool auth, long max)
{
	long b = (long)store_backoff_next(up_ms >= XA_STABLE_MS ? 0 : prev, 250, max);
	if (auth && b < 5000)
		b = 5000;
	return b > max ? max : b;
}

/* A stream that broke again and again stayed up XA_STABLE_MS: its lines
 * are all written again, and this one says so once, with how many were
 * left out. */
static void stream_stable(struct xcomp *xc)
{
	if (xc->short_breaks >= FLAP_LOUD) {
		char breaks[24], unlogged[24];
		snprintf(breaks, sizeof(breaks), "%u", xc->short_breaks);
		snprintf(unlogged, sizeof(unlogged), "%lu", xc->flap_unlogged);
		LOG_KV(CW_LOG_INFO, "xmpp component: the stream stays up again", "component", xc->domain, "breaks",
		       breaks, "unlogged", unlogged);
	}
	xc->short_breaks = 0;
	xc->flap_unlogged = 0;
	xc->flap_log_next_ms = 0;
}

static bool comp_gives_up(void *arg)
{
	struct xmpp *x = arg;
	return atomic_load(&x->stop);
}

/* Whether the connection that holds the component's lock still answers
 * (without it the lock is gone: another process may take the component). */
static bool lock_alive(PGconn *lock)
{
	PGresult *r = PQexec(lock, "SELECT 1");
	bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;
	PQclear(r);
	return ok;
}

/* The lock's connection was found lost: the stream is given up (it may be
 * another process's next) and the connection closed; when to connect to
 * the database again. */
static int64_t lock_lost(struct xcomp *xc, PGconn **lock, struct store_backoff *db_wait, int64_t now)
{
	stream_give_up(xc, XC_DOWN, "lost the database connection that holds the component's lock", false);
	PQfinish(*lock);
	*lock = xc->lock = NULL;
	return now + store_backoff_failed(db_wait, xc->x->cfg->db_reconnect_max_ms);
}

static void *comp_main(void *arg)
{
	cw_thread_name("cw-xmpp");
	struct xcomp *xc = arg;
	this_comp = xc;
	struct xmpp *x = xc->x;
	const struct cw_config *cfg = x->cfg;
	PGconn *lock = NULL;
	long backoff = 0;
	int64_t next_try = 0, next_house = 0, up_since = 0; /* mono_ms() it came up, 0: down */
	int64_t connect_since = 0; /* mono_ms() of the connect being tried */
	/* The pace of the lock connection's connects while the database is
	 * away: 250 ms, then twice as long each time up to
	 * database.reconnect_max_ms (until the forty-eighth session every
	 * second, each attempt blocking the stop up to connect_timeout, 5 s,
	 * when the database's host took the connection and never answered). */
	struct store_backoff db_wait = { 0, 0 };
	while (!atomic_load(&x->stop)) {
		int64_t now = mono_ms();
		if (!lock) {
			if (now < next_try) {
				nap(xc, (int)(next_try - now)); /* woken by a stop (xa_stop) */
				continue;
			}
			cw_errmsg e;
			lock = store_connect_abortable(cfg->db_url, cfg->db_statement_timeout_ms, -1, comp_gives_up, x, &e);
			static const struct store_stmt *const lock_stmts[] = { dispatcher_dead_stmts, NULL };
			if (lock && !store_prepare_all(lock, lock_stmts, &e)) {
				PQfinish(lock);
				lock = NULL;
			}
			if (!lock) {
				set_state(xc, XC_DOWN, "the database is away: waiting for it to take the component's lock",
					  false);
				next_try = mono_ms() + store_backoff_failed(&db_wait, cfg->db_reconnect_max_ms);
				continue;
			}
			store_backoff_reset(&db_wait);
			if (!lock_component(xc, lock)) {
				PQfinish(lock);
				lock = NULL;
				set_state(xc, XC_STANDBY, "another causewayd process holds this component", false);
				next_try = now + STANDBY_RETRY_MS;
				continue;
			}
			/* Stanzas queued while this process did not hold the
			 * stream answer one that may have been another's since. */
			xa_queue_drop(xc);
			next_try = 0;
			xc->lock = lock;
		}
		if (!xc->conn) {
			if (now < next_try) {
				nap(xc, (int)(next_try - now));
				continue;
			}
			/* The lock is looked at before each connect: the
			 * housekeeping that looks at it does not run during the
			 * backoff's wait (up to xmpp.reconnect_max_ms).  Until the
			 * fifty-first session a lock lost then was found only once
			 * the stream was up again: a process without it took the
			 * stream, and the one that had taken the lock meanwhile was
			 * refused by the server (conflict) and backed off. */
			if (!lock_alive(lock)) {
				next_try = lock_lost(xc, &lock, &db_wait, now);
				continue;
			}
			xa_xml_watch(true, cfg->xmpp_max_stanza_bytes); /* its parser: see refuse_stream */
			xc->conn = xmpp_conn_new(xc->ctx);
			xa_xml_watch(false, 0);
			if (!xc->conn) {
				next_try = now + 1000;
				continue;
			}
			give_sm_state(xc->ctx, xc->conn);
			xmpp_conn_set_jid(xc->conn, xc->domain);
			xmpp_conn_set_pass(xc->conn, cfg->xmpp_secret);
			xmpp_conn_set_sockopt_callback(xc->conn, check_fd);
			xmpp_handler_add(xc->conn, on_stanza, NULL, NULL, NULL, xc);
			set_state(xc, XC_CONNECTING, NULL, false);
			connect_since = now;
			release_low_fd(xc);
			if (xmpp_connect_component(xc->conn, cfg->xmpp_server_host, (unsigned short)cfg->xmpp_server_port,
						   on_conn, xc) != XMPP_EOK) {
				snprintf(xc->drop_reason, sizeof(xc->drop_reason), "cannot connect to %s:%ld",
					 cfg->xmpp_server_host, cfg->xmpp_server_port);
				xc->dropped = true;
			}
		}
		if (!xc->dropped) {
			turn(xc, next_house);
			enum xa_xml_stop kind;
			const char *why = xa_xml_refused(&kind);
			if (why)
				refuse_stream(xc, why, kind);
			parser_memory(xc);
		}
		now = mono_ms();
		if (!xc->dropped && xc->state == XC_CONNECTING && now - connect_since >= OPEN_TIMEOUT_MS) {
			/* Until the fifty-first session such a server kept the
			 * component "connecting" for good, never tried again. */
			snprintf(xc->drop_reason, sizeof(xc->drop_reason),
				 "the server did not open the stream and answer the handshake within %d s",
				 OPEN_TIMEOUT_MS / 1000);
			xc->dropped = true;
		}
		if (xc->up_event && !xc->dropped) { /* up since the handshake's answer (stream_up) */
			xc->up_event = false;
			up_since = now;
			next_house = 0;
		}
		if (xc->dropped) {
			bool auth = xc->auth_failed, unreadable = xc->unreadable;
			char why[200];
			snprintf(why, sizeof(why), "%s", xc->drop_reason);
			xc->auth_failed = xc->unreadable = false;
			/* The server refused what the component wrote: one of the
			 * stanzas kept for a re-send is the reason, and writing
			 * them again after the reconnect broke the stream again,
			 * for ever (until the thirty-first session).  None is
			 * written again: the server took those before the bad one,
			 * and those after it in the same read are lost. */
			if (unreadable && xc->recent_n) {
				char count[24];
				snprintf(count, sizeof(count), "%zu", xc->recent_n);
				LOG_KV(CW_LOG_WARN,
				       "xmpp: the server found the stream not well-formed: the stanzas of the seconds before "
				       "the break are not written again (those after the refused one are lost)",
				       "component", xc->domain, "stanzas", count);
			}
			/* A stream that did not stay up (or never came up) lets
			 * the backoff grow: until the forty-fifth session it
			 * started again at every handshake, and a server that
			 * took it and closed the stream at once was connected to
			 * every 125-250 ms. */
			int64_t up_ms = up_since ? now - up_since : -1;
			xc->short_breaks = up_ms >= XA_STABLE_MS ? 0 : xc->short_breaks + 1;
			stream_give_up(xc, auth ? XC_AUTH_FAILED : XC_DOWN, why, !unreadable);
			backoff = xa_reconnect_backoff(backoff, up_ms, auth, cfg->xmpp_reconnect_max_ms);
			up_since = 0;
			next_try = now + store_jittered(backoff);
			continue;
		}
		pthread_mutex_lock(&xc->mu);
		bool up = xc->state == XC_UP;
		pthread_mutex_unlock(&xc->mu);
		if (up) {
			drain(xc);
			fanout_turn(xc, now);
		}
		if (up && xc->short_breaks && now - up_since >= XA_STABLE_MS)
			stream_stable(xc);
		if (now >= next_house) {
			next_house = now + HOUSEKEEPING_MS;
			if (!lock_alive(lock)) {
				up_since = 0;
				next_try = lock_lost(xc, &lock, &db_wait, now);
				continue;
			}
			if (up) {
				xa_requests(xc, lock);
				xa_roster_sync(xc, lock);
				xa_profiles(xc, lock);
				xa_dead_letters(xc, lock);
				xa_muc_members(xc, lock);
				xa_muc_sync(xc, lock);
				if (xc->ping_sent_ms && now - xc->ping_sent_ms > PING_TIMEOUT_MS) {
					snprintf(xc->drop_reason, sizeof(xc->drop_reason), "the server did not answer a ping");
					xc->dropped = true;
				} else if (!xc->ping_sent_ms && now >= xc->ping_next_ms) {
					send_ping(xc, now);
				}
			}
		}
	}
	stream_give_up(xc, XC_DOWN, "the daemon is stopping", false);
	if (lock)
		xa_muc_sync(xc, lock); /* nobody is in any more */
	PQfinish(lock);
	xc->lock = NULL;
	release_low_fd(xc);
	return NULL;
}

void xa_start(struct xmpp *x)
{
	if (!x)
		return;
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	for (int i = 0; i < x->ncomp; i++) {
		struct xcomp *xc = &x->comp[i];
		if (pipe2(xc->wake_fd, O_NONBLOCK | O_CLOEXEC) != 0) {
			xc->wake_fd[0] = xc->wake_fd[1] = -1;
			LOG_KV(CW_LOG_ERROR, "xmpp: cannot make a pipe", "component", xc->domain);
			continue;
		}
		reserve_low_fd(xc);
		xc->log = strophe_logger;
		xc->ctx = xmpp_ctx_new(NULL, &xc->log);
		if (xc->ctx && pthread_create(&xc->thread, NULL, comp_main, xc) == 0)
			xc->started = true;
		else
			LOG_KV(CW_LOG_ERROR, "xmpp: cannot start the component's thread", "component", xc->domain);
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

void xa_stop(struct xmpp *x)
{
	if (!x)
		return;
	atomic_store(&x->stop, true);
	for (int i = 0; i < x->ncomp; i++) {
		struct xcomp *xc = &x->comp[i];
		if (xc->wake_fd[1] >= 0) {
			char b = 1;
			ssize_t w = write(xc->wake_fd[1], &b, 1);
			(void)w;
		}
		pthread_mutex_lock(&xc->mu);
		pthread_cond_broadcast(&xc->written);
		pthread_mutex_unlock(&xc->mu);
		if (xc->started) {
			pthread_join(xc->thread, NULL);
			xc->started = false;
		}
	}
}

void xa_free(struct xmpp *x)
{
	if (!x)
		return;
	xa_stop(x);
	for (int i = 0; i < x->ncomp; i++) {
		struct xcomp *xc = &x->comp[i];
		if (xc->ctx)
			xmpp_ctx_free(xc->ctx);
		for (int k = 0; k < 2; k++)
			if (xc->wake_fd[k] >= 0)
				close(xc->wake_fd[k]);
		/* What is left queued: the answers to users' stanzas kept for a
		 * next stream (queue_take_lost_locked keeps them when one breaks)
		 * that does not come.  Nothing is queued after xa_stop (x->stop,
		 * append_locked).  Until the fifty-eighth session they were left
		 * unfreed: an answer stored just after the stream broke, then the
		 * stop, was a leak LeakSanitizer reported in a CI run. */
		queue_free(xc->head);
		xc->head = xc->tail = NULL;
		pthread_mutex_destroy(&xc->mu);
		pthread_mutex_destroy(&xc->in_mu); /* nothing waits: every store job has finished (in_finished) */
		json_decref(xc->in_flight);
		pthread_cond_destroy(&xc->written);
		json_decref(xc->vcards);
		json_decref(xc->vcard_none);
		json_decref(xc->fanouts);
		json_decref(xc->fanout_dropped);
		json_decref(xc->muc);
		json_decref(xc->muc_members);
		json_decref(xc->muc_gone);
		json_decref(xc->muc_stored);
	}
	struct thread_strophe *t = pthread_getspecific(x->ctx_key);
	if (t) {
		ctx_release(t);
		pthread_setspecific(x->ctx_key, NULL);
	}
	pthread_key_delete(x->ctx_key);
	free(x);
}

/* ------------------------------------------------------------ health */

bool xa_ready(void *ctx)
{
	struct xmpp *x = ctx;
	bool up = false;
	for (int i = 0; x && i < x->ncomp && !up; i++) {
		pthread_mutex_lock(&x->comp[i].mu);
		up = x->comp[i].state == XC_UP;
		pthread_mutex_unlock(&x->comp[i].mu);
	}
	return up;
}

json_t *xa_health(struct xmpp *x)
{
	json_t *comps = json_object();
	for (int i = 0; i < x->ncomp; i++) {
		struct xcomp *xc = &x->comp[i];
		size_t waiting = xa_in_waiting(xc); /* under in_mu, never taken with mu */
		pthread_mutex_lock(&xc->mu);
		json_t *o = json_pack("{s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "state",
				      state_name(xc->state), "peer", xc->peer, "last_error", xc->last_error, "connected_since_ms",
				      (json_int_t)(xc->state == XC_UP ? xc->connected_since_ms : 0), "queued",
				      (json_int_t)xc->queued, "stanzas_waiting", (json_int_t)waiting, "stanzas_in",
				      (json_int_t)atomic_load(&xc->stanzas_in),
				      "stanzas_out", (json_int_t)atomic_load(&xc->stanzas_out), "room_occupants",
				      (json_int_t)xa_muc_count_locked(xc), "restricted_xml",
				      (json_int_t)atomic_load(&xc->restricted_xml), "stanza_too_large",
				      (json_int_t)atomic_load(&xc->stanza_too_large), "stanzas_cut",
				      (json_int_t)atomic_load(&xc->stanzas_cut), "parser_bytes",
				      (json_int_t)atomic_load(&xc->parser_bytes), "parser_renewals",
				      (json_int_t)atomic_load(&xc->parser_renewals), "answers_dropped",
				      (json_int_t)atomic_load(&xc->answers_dropped));
		pthread_mutex_unlock(&xc->mu);
		json_object_set_new(comps, xc->domain, o);
	}
	return json_pack("{s:s, s:I, s:o}", "server", x->cfg->xmpp_server_host, "port",
			 (json_int_t)x->cfg->xmpp_server_port, "components", comps);
}

bool xa_all_up(struct xmpp *x)
{
	bool up = true;
	for (int i = 0; i < x->ncomp; i++) {
		pthread_mutex_lock(&x->comp[i].mu);
		up = up && x->comp[i].state == XC_UP;
		pthread_mutex_unlock(&x->comp[i].mu);
	}
	return up;
}

void xa_metrics(struct xmpp *x, struct cw_buf *b)
{
	cw_buf_printf(b, "# HELP causeway_xmpp_stream_up 1 while the component's stream is up (0: down, standby, refused).\n"
			 "# TYPE causeway_xmpp_stream_up gauge\n");
	for (int i = 0; i < x->ncomp; i++) {
		pthread_mutex_lock(&x->comp[i].mu);
		int up = x->comp[i].state == XC_UP;
		pthread_mutex_unlock(&x->comp[i].mu);
		cw_buf_printf(b, "causeway_xmpp_stream_up{component=\"%s\"} %d\n", x->comp[i].domain, up);
	}
	cw_buf_printf(b, "# HELP causeway_xmpp_room_occupants Resources of local users in the component's group rooms.\n"
			 "# TYPE causeway_xmpp_room_occupants gauge\n");
	for (int i = 0; i < x->ncomp; i++) {
		pthread_mutex_lock(&x->comp[i].mu);
		size_t n = xa_muc_count_locked(&x->comp[i]);
		pthread_mutex_unlock(&x->comp[i].mu);
		cw_buf_printf(b, "causeway_xmpp_room_occupants{component=\"%s\"} %zu\n", x->comp[i].domain, n);
	}
	cw_buf_printf(b, "# HELP causeway_xmpp_stanzas_waiting Users' stanzas waiting for an earlier one of their "
			 "conversation to be stored.\n"
			 "# TYPE causeway_xmpp_stanzas_waiting gauge\n");
	for (int i = 0; i < x->ncomp; i++)
		cw_buf_printf(b, "causeway_xmpp_stanzas_waiting{component=\"%s\"} %zu\n", x->comp[i].domain,
			      xa_in_waiting(&x->comp[i]));
	static const char *const names[] = { "in", "out", "errors_out", "connects", "restricted_xml",
					     "stanza_too_large", "cut", "dropped" };
	cw_buf_printf(b, "# HELP causeway_xmpp_stanzas_total Stanzas read from and written to the streams; error answers; "
			 "stream (re)connections; streams closed for markup XMPP forbids, or for a tag or stream "
			 "header over the size cap; stanzas over the cap, refused; stanzas to be written at once dropped, the "
			 "server not reading.\n"
			 "# TYPE causeway_xmpp_stanzas_total counter\n");
	for (int i = 0; i < x->ncomp; i++) {
		struct xcomp *xc = &x->comp[i];
		unsigned long long v[] = { atomic_load(&xc->stanzas_in), atomic_load(&xc->stanzas_out),
					   atomic_load(&xc->errors_out), atomic_load(&xc->connects),
					   atomic_load(&xc->restricted_xml), atomic_load(&xc->stanza_too_large),
					   atomic_load(&xc->stanzas_cut), atomic_load(&xc->answers_dropped) };
		for (size_t k = 0; k < CW_ARRAY_LEN(names); k++)
			cw_buf_printf(b, "causeway_xmpp_stanzas_total{component=\"%s\",kind=\"%s\"} %llu\n", xc->domain,
				      names[k], v[k]);
	}
	cw_buf_printf(b, "# HELP causeway_xmpp_parser_bytes What expat holds for the stream's parser.\n"
			 "# TYPE causeway_xmpp_parser_bytes gauge\n");
	for (int i = 0; i < x->ncomp; i++)
		cw_buf_printf(b, "causeway_xmpp_parser_bytes{component=\"%s\"} %ld\n", x->comp[i].domain,
			      atomic_load(&x->comp[i].parser_bytes));
	cw_buf_printf(b, "# HELP causeway_xmpp_parser_renewals_total The stream's parser renewed between stanzas, "
			 "for the names expat kept past its bound.\n"
			 "# TYPE causeway_xmpp_parser_renewals_total counter\n");
	for (int i = 0; i < x->ncomp; i++)
		cw_buf_printf(b, "causeway_xmpp_parser_renewals_total{component=\"%s\"} %llu\n", x->comp[i].domain,
			      atomic_load(&x->comp[i].parser_renewals));
}
