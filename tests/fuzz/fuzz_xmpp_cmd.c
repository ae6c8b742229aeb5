/* libFuzzer target: an ad-hoc command request (XEP-0050, with its
 * XEP-0004 form) a local user sends the XMPP component, as the component
 * reads it from the iq alone (adapters/xmpp/xmpp_cmdform.h: xa_cmd_read;
 * xa_command acts on what it reads).  The input is parsed by libstrophe
 * (the adapter gets stanzas from libstrophe's parser too), through the
 * guard in front of expat (adapters/xmpp/xmpp_xml.c), as in causewayd.
 * Properties: nothing crashes or leaks (ASan/UBSan/LeakSanitizer); a
 * refusal has a condition of its kind (no command: bad-request or
 * item-not-found; an action: bad-request with XEP-0050's condition); any
 * other read names one of the component's commands by its node, with an
 * action XEP-0050 has; a one-stage command runs (unless cancelled), a
 * staged one gets its form, a refusal of the form with a text, or the
 * form's values; a later stage is of a staged command without a
 * sessionid; the values are NUL-terminated within their bounds, valid
 * UTF-8, without white space around them (cw_utf8_space_at), the jid's
 * domainpart without capitals; and the same stanza reads
 * the same twice. */
#include "config.h"
#include "xmpp/xmpp_cmdform.h"
#include "utf8.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static xmpp_ctx_t *ctx;

/* Whether s (n bytes, valid UTF-8) neither starts nor ends with white
 * space. */
static bool trimmed(const char *s, size_t n)
{
	if (cw_utf8_space_at(s))
		return false;
	size_t last = 0; /* where the last character starts */
	for (size_t k = 0, l; k < n; k += l) {
		l = cw_utf8_seq((const unsigned char *)s + k, n - k, NULL);
		l = l ? l : 1;
		last = k;
	}
	return !n || !cw_utf8_space_at(s + last);
}

static void fail(const char *what, const struct xa_cmd_req *r)
{
	fprintf(stderr, "%s: what %d command %d node \"%s\" action \"%s\" sessionid \"%s\" later %d error %s/%s/%s "
			"text \"%s\"\n",
		what, (int)r->what, r->command, r->node ? r->node : "(none)", r->action ? r->action : "(none)",
		r->sessionid ? r->sessionid : "(none)", r->later, r->error ? r->error : "-",
		r->error_type ? r->error_type : "-", r->cmd_error ? r->cmd_error : "-", r->text ? r->text : "");
	abort();
}

static bool same(const char *a, const char *b)
{
	return a == b || (a && b && strcmp(a, b) == 0);
}

/* Whether the jid as read has a capital in its domainpart (after the '@'
 * before the first '/', else from its start, up to that '/'). */
static bool domain_has_capital(const char *jid)
{
	const char *slash = strchr(jid, '/'), *at = strchr(jid, '@');
	const char *p = at && (!slash || at < slash) ? at + 1 : jid;
	for (; *p && *p != '/'; p++)
		if (*p >= 'A' && *p <= 'Z')
			return true;
	return false;
}

/* Whether the jid as read (not a mimi:// address) keeps its domainpart's
 * final dot (RFC 7622 §3.2: stripped), a single one (".." is no
 * domainpart anyway). */
static bool domain_has_final_dot(const char *jid)
{
	if (strncmp(jid, "mimi://", 7) == 0)
		return false;
	const char *slash = strchr(jid, '/'), *at = strchr(jid, '@');
	const char *p = at && (!slash || at < slash) ? at + 1 : jid;
	size_t n = strcspn(p, "/"), before = 0;
	for (size_t k = 0, l; k + 1 < n; k += l) { /* a dot after white space is none (stripped, the value ended so) */
		l = cw_utf8_seq((const unsigned char *)p + k, n - 1 - k, NULL);
		l = l ? l : 1;
		before = k;
	}
	return n > 1 && p[n - 1] == '.' && p[n - 2] != '.' && !cw_utf8_space_at(p + before);
}

static void check(const struct xa_cmd_req *r)
{
	bool cancel = r->action && strcmp(r->action, "cancel") == 0;
	if (r->what == XA_CMD_REFUSED) {
		if (!r->error || !r->error_type || r->text)
			fail("a refusal without its condition", r);
		if (r->command < 0 && (r->cmd_error || !((strcmp(r->error, "bad-request") == 0 &&
							     strcmp(r->error_type, "modify") == 0) ||
							    (strcmp(r->error, "item-not-found") == 0 &&
							     strcmp(r->error_type, "cancel") == 0))))
			fail("a refusal of no command with another condition", r);
		if (r->command >= 0 && (!r->cmd_error || strcmp(r->error, "bad-request") != 0 ||
					!same(r->cmd_error, xa_cmd_action_problem(r->action))))
			fail("a refusal of a command that is not of its action", r);
		if (r->command >= (int)xa_ncommands || r->later)
			fail("a refusal of a command not there, or of a later stage", r);
		return;
	}
	if (r->command < 0 || r->command >= (int)xa_ncommands || !r->node ||
	    strcmp(r->node, xa_commands[r->command].node) != 0)
		fail("a command read that is not the node's", r);
	if (xa_cmd_action_problem(r->action))
		fail("a command read with an action XEP-0050 has not", r);
	bool staged = xa_commands[r->command].staged;
	if (r->later && (!staged || r->sessionid))
		fail("a later stage of a one-stage command, or with a sessionid", r);
	switch (r->what) {
	case XA_CMD_CANCEL:
		break;
	case XA_CMD_RUN:
		if (staged || cancel)
			fail("a staged or cancelled command run", r);
		break;
	case XA_CMD_FORM:
	case XA_CMD_SUBMIT:
	case XA_CMD_BAD_FORM:
		if (!staged || cancel)
			fail("a form of a one-stage or cancelled command", r);
		break;
	default:
		fail("nothing read", r);
	}
	if (r->what == XA_CMD_BAD_FORM && (!r->text || !same(r->error, "bad-request") || !same(r->error_type, "modify") ||
					   !same(r->cmd_error, "bad-payload")))
		fail("a form refused without its text or bad-payload", r);
	if (r->what != XA_CMD_BAD_FORM && (r->error || r->text || r->cmd_error))
		fail("an error of no refusal", r);
	if (r->what == XA_CMD_SUBMIT && !r->jid[0])
		fail("a form submitted without its contact", r);
	size_t jl = strnlen(r->jid, sizeof(r->jid)), rl = strnlen(r->reason, sizeof(r->reason));
	if (jl > XA_CMD_JID_MAX || rl > XA_CMD_REASON_MAX)
		fail("a value not NUL-terminated within its bound", r);
	if (r->what != XA_CMD_SUBMIT && (jl || rl))
		fail("values of no submitted form", r);
	if (!cw_utf8_valid(r->jid, jl) || !cw_utf8_valid(r->reason, rl))
		fail("a value not valid UTF-8", r);
	if (!trimmed(r->jid, jl) || !trimmed(r->reason, rl))
		fail("a value with white space around it", r);
	if (domain_has_capital(r->jid))
		fail("the jid's domainpart not in lower case", r);
	if (domain_has_final_dot(r->jid))
		fail("the jid's domainpart with its final dot", r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!ctx) {
		xmpp_initialize();
		ctx = xmpp_ctx_new(NULL, NULL);
	}
	char *text = malloc(size + 1);
	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	xmpp_stanza_t *iq = xmpp_stanza_new_from_string(ctx, text);
	free(text);
	if (!iq)
		return 0;
	struct xa_cmd_req *a = malloc(sizeof(*a)), *b = malloc(sizeof(*b));
	if (a && b) {
		memset(a, 0x55, sizeof(*a));
		memset(b, 0xaa, sizeof(*b));
		xa_cmd_read(iq, a);
		xa_cmd_read(iq, b);
		check(a);
		if (a->what != b->what || a->command != b->command || a->node != b->node || a->action != b->action ||
		    a->sessionid != b->sessionid || a->later != b->later || !same(a->error, b->error) ||
		    !same(a->error_type, b->error_type) || !same(a->cmd_error, b->cmd_error) ||
		    !same(a->text, b->text) || strcmp(a->jid, b->jid) != 0 || strcmp(a->reason, b->reason) != 0)
			fail("read differently the second time", a);
	}
	free(a);
	free(b);
	xmpp_stanza_release(iq);
	return 0;
}
