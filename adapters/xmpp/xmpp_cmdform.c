/* A command request read from its iq alone (xmpp_cmdform.h).  Taken out
 * of xa_command in the fortieth session, no behaviour changed, so that it
 * can be fuzzed (tests/fuzz/fuzz_xmpp_cmd.c). */
#include "config.h"
#include "xmpp/xmpp_cmdform.h"
#include "peer/event.h"
#include "utf8.h"

#include <string.h>
#include <strings.h>

/* In the order of xa_command's verbs (xmpp_cmd.c). */
const struct xa_command_def xa_commands[] = {
	{ "list", "List my contact requests and decisions", false },
	{ "accept", "Accept a contact (or a whole domain)", true },
	{ "block", "Block a contact (or a whole domain)", true },
	{ "opt-in", "Let strangers of this network send me contact requests", false },
	{ "opt-out", "Stop contact requests from this network", false },
	{ "report", "Report a contact to the operator", true },
};
const size_t xa_ncommands = sizeof(xa_commands) / sizeof(xa_commands[0]);

/* The field's value in out, without the white space of any kind or the
 * zero-width characters around it (cw_utf8_trim: a no-break space a phone
 * puts in, a tab, a zero-width space of a text copied), as the Matrix bot
 * reads its commands; false when what is left does not fit (out is
 * then empty: never a value cut inside a character).  Trimmed before it is
 * measured: until the forty-third session a value padded past the limit
 * was refused although what the user meant fitted. */
static bool form_value(xmpp_stanza_t *x, const char *var, char *out, size_t len)
{
	out[0] = '\0';
	for (xmpp_stanza_t *f = x ? xmpp_stanza_get_children(x) : NULL; f; f = xmpp_stanza_get_next(f)) {
		const char *name = xmpp_stanza_get_name(f), *v = xmpp_stanza_get_attribute(f, "var");
		if (!name || strcmp(name, "field") != 0 || !v || strcmp(v, var) != 0)
			continue;
		xmpp_stanza_t *val = xmpp_stanza_get_child_by_name(f, "value");
		char *text = val ? xmpp_stanza_get_text(val) : NULL;
		if (text)
			cw_utf8_trim(text);
		bool fits = !text || strlen(text) < len;
		if (text) {
			if (fits)
				memcpy(out, text, strlen(text) + 1);
			xmpp_free(xmpp_stanza_get_context(f), text);
		}
		return fits;
	}
	return true;
}

/* Whether jid holds what cw_utf8_display_control names, or is no UTF-8. */
static bool display_control_in(const char *jid)
{
	const unsigned char *p = (const unsigned char *)jid;
	for (size_t i = 0, n = strlen(jid), l; i < n; i += l) {
		unsigned cp = 0;
		if (!(l = cw_utf8_seq(p + i, n - i, &cp)) || cw_utf8_display_control(cp))
			return true;
	}
	return false;
}

/* The refusal of a jid with a zero-width character within it (none is
 * left at its ends: form_value), naming the first, or NULL when it has
 * none.  It would be refused anyway (no address has one), as "... is not
 * a contact" with the character unseen in the text. */
static const char *zero_width_in(const char *jid)
{
	static const struct {
		unsigned cp;
		const char *text;
	} named[] = {
		{ 0x200B, "The contact has a zero-width space (U+200B) in it, which does not show: type it again "
			  "without." },
		{ 0x200C, "The contact has a zero-width non-joiner (U+200C) in it, which does not show: type it "
			  "again without." },
		{ 0x200D, "The contact has a zero-width joiner (U+200D) in it, which does not show: type it again "
			  "without." },
		{ 0x2060, "The contact has a word joiner (U+2060) in it, which does not show: type it again "
			  "without." },
		{ 0xFEFF, "The contact has a zero-width no-break space (U+FEFF) in it, which does not show: type it "
			  "again without." },
	};
	const unsigned char *p = (const unsigned char *)jid;
	for (size_t i = 0, n = strlen(jid), l; i < n; i += l ? l : 1) {
		unsigned cp = 0;
		l = cw_utf8_seq(p + i, n - i, &cp);
		for (size_t k = 0; l && k < sizeof(named) / sizeof(named[0]); k++)
			if (named[k].cp == cp)
				return named[k].text;
	}
	return NULL;
}

/* How many values the form gives var (over every field of that var):
 * the form's jid-single and text-single fields hold one (XEP-0004 §3.3),
 * and a second one would be dropped unread. */
static size_t form_values(xmpp_stanza_t *x, const char *var)
{
	size_t n = 0;
	for (xmpp_stanza_t *f = x ? xmpp_stanza_get_children(x) : NULL; f; f = xmpp_stanza_get_next(f)) {
		const char *name = xmpp_stanza_get_name(f), *v = xmpp_stanza_get_attribute(f, "var");
		if (!name || strcmp(name, "field") != 0 || !v || strcmp(v, var) != 0)
			continue;
		for (xmpp_stanza_t *val = xmpp_stanza_get_children(f); val; val = xmpp_stanza_get_next(val)) {
			const char *vn = xmpp_stanza_get_name(val);
			n += xmpp_stanza_is_tag(val) && vn && strcmp(vn, "value") == 0;
		}
	}
	return n;
}

bool xa_cmd_later_stage(xmpp_stanza_t *cmd, const char *action)
{
	if (action && strcmp(action, "cancel") == 0)
		return false;
	return (action && strcmp(action, "execute") != 0) ||
	       xmpp_stanza_get_child_by_name_and_ns(cmd, "x", XA_NS_DATA);
}

const char *xa_cmd_action_problem(const char *action)
{
	static const char *const actions[] = { "execute", "cancel", "next", "complete", NULL };
	if (!action)
		return NULL;
	for (int i = 0; actions[i]; i++)
		if (strcmp(action, actions[i]) == 0)
			return NULL;
	return strcmp(action, "prev") == 0 ? "bad-action" : "malformed-action";
}

static void refused(struct xa_cmd_req *out, const char *error, const char *type, const char *cmd_error)
{
	out->what = XA_CMD_REFUSED;
	out->error = error;
	out->error_type = type;
	out->cmd_error = cmd_error;
}

/* XEP-0050 §4.6's bad-payload: "cannot accept the specified payload
 * (e.g. the data form did not provide one or more required fields)".
 * Until the forty-seventh session a refused form was a bare bad-request. */
static void bad_form(struct xa_cmd_req *out, const char *text)
{
	out->what = XA_CMD_BAD_FORM;
	out->error = "bad-request";
	out->error_type = "modify";
	out->cmd_error = "bad-payload";
	out->text = text;
}

void xa_cmd_read(xmpp_stanza_t *iq, struct xa_cmd_req *out)
{
	memset(out, 0, sizeof(*out));
	out->command = -1;
	xmpp_stanza_t *cmd = xmpp_stanza_get_child_by_name_and_ns(iq, "command", XA_NS_COMMANDS);
	const char *type = xmpp_stanza_get_type(iq);
	out->node = cmd ? xmpp_stanza_get_attribute(cmd, "node") : NULL;
	out->action = cmd ? xmpp_stanza_get_attribute(cmd, "action") : NULL;
	out->sessionid = cmd ? xmpp_stanza_get_attribute(cmd, "sessionid") : NULL;
	/* A command without a node, or asked with get (XEP-0050 runs them
	 * with set), is malformed: bad-request (RFC 6120 §8.3.3.1). */
	if (!out->node || !type || strcmp(type, "set") != 0) {
		refused(out, "bad-request", "modify", NULL);
		return;
	}
	size_t k = 0;
	while (k < xa_ncommands && strcmp(xa_commands[k].node, out->node) != 0)
		k++;
	if (k == xa_ncommands) {
		refused(out, "item-not-found", "cancel", NULL);
		return;
	}
	out->command = (int)k;
	const char *why = xa_cmd_action_problem(out->action);
	if (why) {
		refused(out, "bad-request", "modify", why);
		return;
	}
	bool staged = xa_commands[k].staged;
	out->later = staged && !out->sessionid && xa_cmd_later_stage(cmd, out->action);
	if (out->action && strcmp(out->action, "cancel") == 0) {
		out->what = XA_CMD_CANCEL;
		return;
	}
	if (!staged) {
		out->what = XA_CMD_RUN;
		return;
	}
	xmpp_stanza_t *x = xmpp_stanza_get_child_by_name_and_ns(cmd, "x", XA_NS_DATA);
	const char *xt = x ? xmpp_stanza_get_type(x) : NULL;
	if (xt && strcmp(xt, "cancel") == 0) {
		/* XEP-0004 §3.1: the requester cancelled the form */
		out->what = XA_CMD_CANCEL;
		return;
	}
	if (!x || !xt || strcmp(xt, "submit") != 0) {
		out->what = XA_CMD_FORM;
		return;
	}
	if (form_values(x, "jid") > 1 || form_values(x, "reason") > 1) {
		/* one contact a time: the second would be dropped unread */
		bad_form(out, "Give one contact (and one reason): a command decides one contact or one network at "
			      "a time.");
		return;
	}
	if (!form_value(x, "reason", out->reason, sizeof(out->reason))) {
		bad_form(out, "The reason is too long: at most 8192 bytes.");
		return;
	}
	if (cw_utf8_text_problem(out->reason, strlen(out->reason))) {
		/* the report's comment, shown to the operator as it is
		 * (policy_report_fields_problem; until the forty-eighth
		 * session stored as it came) */
		out->reason[0] = '\0';
		bad_form(out, "The reason holds a control character (but line breaks and tabs), a bidirectional control "
			      "or a noncharacter, which the operator would not see as you typed it: send it without.");
		return;
	}
	if (!form_value(x, "jid", out->jid, sizeof(out->jid))) {
		/* longer than any JID of the component's (until the forty-third
		 * session read as none, and refused as " is not a contact") */
		out->reason[0] = '\0';
		bad_form(out, "The contact is too long: at most 1099 bytes.");
		return;
	}
	if (!out->jid[0]) {
		/* the form's one required field (command_form) left out or
		 * empty: until the forty-seventh session refused as
		 * " is not a contact of this network", naming nothing */
		out->reason[0] = '\0';
		bad_form(out, "Give the contact: the form's contact field is required.");
		return;
	}
	const char *hidden = zero_width_in(out->jid);
	if (hidden) {
		out->jid[0] = out->reason[0] = '\0';
		bad_form(out, hidden);
		return;
	}
	/* A control, a bidirectional control or mark, a line separator: in no
	 * JID (RFC 7622 refuses them) nor address, and the answers that name
	 * the contact would quote it back, turning their words round in her
	 * client (cw_utf8_echo): refused, naming nothing.  Until the
	 * fifty-second session "... is not a contact of this network" quoted
	 * it as typed. */
	if (display_control_in(out->jid)) {
		out->jid[0] = out->reason[0] = '\0';
		bad_form(out, "The contact holds a control character or a bidirectional control, which no JID or "
			      "address has: type it again without.");
		return;
	}
	/* Both trimmed (form_value): until the forty-second session
	 * "wally@gk.xmpp.test " named nobody.  The domainpart in any case
	 * (RFC 7622 §3.2: domainparts are case-insensitive; a user types this
	 * one): until the thirtieth session wally@GK.xmpp.test named nobody.
	 * The localpart's capitals stay: the peer's ids are case-sensitive. */
	char *slash = strchr(out->jid, '/'), *at = strchr(out->jid, '@');
	if (at && slash && at > slash)
		at = NULL; /* an '@' of the resource: no localpart */
	if (strncasecmp(out->jid, "mimi://", 7) == 0) {
		mimi_addr_fold(out->jid);
	} else {
		char *dom = at ? at + 1 : out->jid;
		addr_fold_lower(dom, "/");
		/* RFC 7622 §3.2: a domainpart's final dot "MUST be stripped"
		 * before the JID is compared (until the forty-seventh session
		 * wally@gk.xmpp.test. named nobody); not one after white space
		 * ("x  ." names nobody): stripped, it left the value ending in
		 * white space (found by the fuzz smoke, fifty-fourth session) */
		size_t dn = strcspn(dom, "/"), before = 0;
		for (size_t i = 0, l; i + 1 < dn; i += l) { /* where the character before the dot starts */
			l = cw_utf8_seq((const unsigned char *)dom + i, dn - 1 - i, NULL);
			l = l ? l : 1;
			before = i;
		}
		if (dn > 1 && dom[dn - 1] == '.' && dom[dn - 2] != '.' && !cw_utf8_space_at(dom + before))
			memmove(dom + dn - 1, dom + dn, strlen(dom + dn) + 1);
	}
	out->what = XA_CMD_SUBMIT;
}
