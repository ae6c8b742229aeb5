/* A local user's XEP-0050 ad-hoc command request to the component, as
 * read from its iq alone (XEP-0004 form included): the command, the
 * action, whether it is a later stage, and a submitted form's jid and
 * reason, or the error it is answered with.  Pure code: libstrophe's
 * stanza accessors and string functions, no I/O, no globals written, no
 * configuration; safe from any thread.  What needs the component's state
 * (who the requester is, her sessions, what the party names) stays with
 * the caller, xa_command (xmpp_cmd.c); the fuzz target
 * tests/fuzz/fuzz_xmpp_cmd.c holds xa_cmd_read to what is said here. */
#ifndef CW_XMPP_CMDFORM_H
#define CW_XMPP_CMDFORM_H

#include <stdbool.h>
#include <stddef.h>
#include <strophe.h>

#define XA_NS_COMMANDS "http://jabber.org/protocol/commands"
#define XA_NS_DATA "jabber:x:data"

#define XA_CMD_JID_MAX 1099     /* bytes of the jid field's value (trimmed); a longer one is refused */
#define XA_CMD_REASON_MAX 8192  /* bytes of a report's reason (the peer API's comment, POST /v1/reports) */

/* The component's commands (XEP-0050 nodes): staged, the command's first
 * stage is a form, its second the filled form (XEP-0050's session); the
 * others run at once, in one stage. */
struct xa_command_def {
	const char *node, *name;
	bool staged;
};
extern const struct xa_command_def xa_commands[];
extern const size_t xa_ncommands;

enum xa_cmd_what {
	XA_CMD_REFUSED,  /* answered with the error (error, error_type, cmd_error), before any session is
			  * looked at: no node, not set, an unknown node, an action XEP-0050 has not */
	XA_CMD_CANCEL,   /* action cancel, or a staged command's form sent back as type cancel (XEP-0004
			  * §3.1): answered canceled */
	XA_CMD_FORM,     /* a staged command without a submitted form: given the form */
	XA_CMD_RUN,      /* a one-stage command: run, whatever the payload */
	XA_CMD_BAD_FORM, /* a staged command's submitted form that is refused (bad-request, bad-payload, with
			  * text): two values of a single field, a value too long, no jid */
	XA_CMD_SUBMIT,   /* a staged command's submitted form: jid (never empty) and reason read */
};

/* A command request read (xa_cmd_read).  The pointers are into the
 * stanza read, or static text: valid while it is. */
struct xa_cmd_req {
	enum xa_cmd_what what;
	int command;                  /* the index in xa_commands; -1 when XA_CMD_REFUSED for no or an unknown node */
	const char *node;             /* the command element's node, or NULL */
	const char *action;           /* its action, or NULL */
	const char *sessionid;        /* its sessionid, or NULL */
	bool later;                   /* without a sessionid, a later stage of a staged command: bad-sessionid (XEP-0050
				       * §4.1: the sessionid "MUST be present for subsequent stages") */
	const char *error;            /* XA_CMD_REFUSED, XA_CMD_BAD_FORM: the RFC 6120 condition */
	const char *error_type;       /* and its type ("modify", "cancel") */
	const char *cmd_error;        /* XEP-0050's condition: XA_CMD_REFUSED's (malformed-action, bad-action) or
				       * NULL, XA_CMD_BAD_FORM's bad-payload */
	const char *text;             /* XA_CMD_BAD_FORM: the error's text */
	char jid[XA_CMD_JID_MAX + 1]; /* XA_CMD_SUBMIT: the jid field's value without the white space and
				       * zero-width characters around it (cw_utf8_trim), its domainpart (or a
				       * mimi:// address's scheme) in lower case (RFC 7622 §3.2); "" but in XA_CMD_SUBMIT */
	char reason[XA_CMD_REASON_MAX + 1]; /* XA_CMD_SUBMIT: the reason field's value without the white space
					     * and zero-width characters around it, "" when none */
};

/* Reads iq, a command request (any iq with a <command/> of XEP-0050's
 * namespace, or none), into *out.  In this order: no command element, no
 * node or an iq type other than set is bad-request; a node the component
 * has not item-not-found; an action other than execute, cancel, next and
 * complete bad-request with malformed-action (prev: bad-action; no stage
 * here offers it); all XA_CMD_REFUSED.  Else what is asked: action
 * cancel, XA_CMD_CANCEL; a one-stage command, XA_CMD_RUN; a staged one
 * by its form (XEP-0004 x of jabber:x:data): type cancel, XA_CMD_CANCEL;
 * none or not submit, XA_CMD_FORM; a jid or reason field given two values
 * (over all fields of that var), or a reason longer than
 * XA_CMD_REASON_MAX bytes or a jid longer than XA_CMD_JID_MAX (each
 * measured trimmed), or a jid with a zero-width character within it
 * (cw_utf8_zero_width: the text names it), or no jid (none, or empty
 * once trimmed), XA_CMD_BAD_FORM; else XA_CMD_SUBMIT.  later is
 * set (whatever what is) for a staged command without a sessionid past its
 * first stage (xa_cmd_later_stage). */
void xa_cmd_read(xmpp_stanza_t *iq, struct xa_cmd_req *out);

/* XEP-0050's condition for action (NULL: none given), or NULL when it is
 * one of execute, cancel, next and complete: "bad-action" for prev (no
 * stage here offers it), "malformed-action" for any other value. */
const char *xa_cmd_action_problem(const char *action);

/* Whether a command request cmd (the command element) without a
 * sessionid is past its first stage: a first stage is action execute (or
 * none) without a form; a form (filled, or of any type: XEP-0004 has the
 * requester send back only the forms it was given) or action next or
 * complete answers a stage.  cancel is not a stage: it ends nothing and
 * changes nothing. */
bool xa_cmd_later_stage(xmpp_stanza_t *cmd, const char *action);

#endif
