/* UTF-8 as RFC 3629 has it: the one decoder the adapters share (Matrix ids
 * and bodies, XMPP JIDs and stanza text).  Pure code, safe from any thread. */
#ifndef CW_UTF8_H
#define CW_UTF8_H

#include <stdbool.h>
#include <stddef.h>

/* The length of the valid UTF-8 sequence at s (n bytes available): 1-4, or
 * 0 when s does not start with one (overlong forms, surrogates and code
 * points above U+10FFFF are not valid).  *cp, when cp is not NULL, gets the
 * code point. */
size_t cw_utf8_seq(const unsigned char *s, size_t n, unsigned *cp);

/* Whether the n bytes at s are all valid UTF-8 (an empty string is). */
bool cw_utf8_valid(const char *s, size_t n);

/* Whether the n bytes of valid UTF-8 at s hold a control character: C0,
 * DEL or C1 (U+0080-U+009F, 0xC2 0x80-0x9F). */
bool cw_utf8_has_control(const char *s, size_t n);

/* Whether the n bytes of valid UTF-8 at s hold a bidirectional embedding,
 * override or isolate (U+202A-U+202E, U+2066-U+2069): what reorders the
 * text shown after it ("invoice.pdf" U+202E "gpj.exe" shows as
 * "invoice.pdfexe.jpg").  The marks (U+200E, U+200F, U+061C) change no
 * order of their own and are not among them. */
bool cw_utf8_has_bidi_control(const char *s, size_t n);

/* Whether cp is one of Unicode's Bidi_Control characters: the embeddings,
 * overrides and isolates above, and the marks (U+200E, U+200F, U+061C),
 * which give the neutral text around them (spaces, punctuation, digits
 * after them) a direction, so that it may be shown moved.  The one list
 * of what a log record (log.c) escapes and causewayctl shows as '?' or a
 * \u escape (since the forty-fourth session; the marks were written raw
 * by both, and log records held the others raw too). */
bool cw_utf8_bidi_format(unsigned cp);

/* Whether cp, written raw where a person reads it (a log record, log.c;
 * causewayctl's tables and --json), could drive the terminal or change
 * what is shown around it: a control (C0, DEL, C1: U+009B is CSI), a
 * bidirectional control or mark (cw_utf8_bidi_format), or the line or
 * paragraph separator (U+2028, U+2029), which a viewer that honours them
 * (a browser's log view, an editor, JavaScript's line splitting) shows
 * as a line break: a path holding one would start a forged record there.
 * The one list both escape (until the forty-fifth session each had its
 * own copy of it, without the separators); the web console has a copy
 * (console.js, DISPLAY_CONTROL: a browser cannot call this), which
 * tests/unit/check_utf8.c holds to it. */
bool cw_utf8_display_control(unsigned cp);

/* Why the n bytes of valid UTF-8 at s are no text a person's words are
 * shown as to another (a report's comment or reason, in the console and
 * causewayctl): NULL when they are one.  Refused are the controls (C0,
 * DEL, C1) but the line feed and the tab, the bidirectional embeddings,
 * overrides and isolates (cw_utf8_has_bidi_control) and the
 * noncharacters (cw_utf8_has_noncharacter). */
const char *cw_utf8_text_problem(const char *s, size_t n);

/* Whether the n bytes of valid UTF-8 at s hold a noncharacter (U+FDD0-
 * U+FDEF, and the last two code points of every plane: U+FFFE, U+FFFF,
 * U+1FFFE, ...): never text, and U+FFFE and U+FFFF are not characters
 * XML 1.0 allows (an XMPP server closes a stream that holds one). */
bool cw_utf8_has_noncharacter(const char *s, size_t n);

/* Whether code point cp shows nothing (as a name's part, it hides what
 * comes after it or passes for a blank): the bidirectional controls
 * above and the marks, zero-width characters (U+200B-U+200D, U+2060-
 * U+2064, U+FEFF), the soft hyphen, U+034F, U+180E, and the fillers that
 * render as blanks (Hangul U+115F, U+1160, U+3164, U+FFA0; Braille's
 * blank U+2800). */
bool cw_utf8_invisible(unsigned cp);

/* Whether cp is a blank: white space (cw_utf8_space) and controls (C0,
 * DEL, C1). */
bool cw_utf8_blank(unsigned cp);

/* Whether cp is white space, Unicode's White_Space: tab, line feed,
 * vertical tab, form feed, carriage return, space, U+0085, the no-break
 * space U+00A0, U+1680, U+2000-U+200A, the line and paragraph separators
 * (U+2028, U+2029), U+202F, U+205F and U+3000.  The zero-width space
 * (U+200B) and U+FEFF are none (cw_utf8_invisible). */
bool cw_utf8_space(unsigned cp);

/* Whether cp is a zero-width character a user may paste into a command
 * unseen: the zero-width space U+200B, the (non-)joiners U+200C and
 * U+200D, the word joiner U+2060 and U+FEFF (a BOM, or the old word
 * joiner).  No white space (cw_utf8_space), and none shows
 * (cw_utf8_invisible). */
bool cw_utf8_zero_width(unsigned cp);

/* The length in bytes of the separator s (NUL-terminated) starts with, 0
 * when it starts with none: white space (cw_utf8_space) or a zero-width
 * character (cw_utf8_zero_width).  What separates the words of a command
 * a user types (the Matrix bot's, mx_cmd.c; the XMPP component's form
 * fields, xmpp_cmdform.c), where phones and some clients put a no-break
 * space for a space, and a text copied from a web page may bring a
 * zero-width space.  Until the forty-second session only ASCII white space
 * (isspace) did, and "opt-in" U+00A0 "gk" was no command; until the
 * forty-third a zero-width character was part of a word ("accept" U+200B
 * "@x:y" was the verb "accept\u200b@x:y"). */
size_t cw_utf8_space_at(const char *s);

/* Leaves out the separators (cw_utf8_space_at: white space, zero-width
 * characters) at the start and the end of s (NUL-terminated), in place;
 * those within are kept. */
void cw_utf8_trim(char *s);

/* The characters of a remote user's name as shown on a local network at
 * most (clients cut long names, and the "(<peer>)" after it must stay in
 * sight). */
#define CW_NAME_SHOWN_MAX 64

/* A remote user's name as a Matrix ghost's display name and an XMPP
 * contact's vCard show it, before its "(<peer>)", into out (len:
 * strlen(name) + 4 bytes at least): what shows nothing left out
 * (cw_utf8_invisible: fillers, zero-width characters, bidirectional
 * controls, which would hide the "(<peer>)" or turn it round), and bytes
 * that are not UTF-8, each run of blanks (white space, controls) one
 * space, none around, at most CW_NAME_SHOWN_MAX characters (a name cut
 * ends with "…").  "" when nothing of it shows: the caller shows
 * something else (the user's local part, as the same). */
void cw_utf8_name_shown(const char *name, char *out, size_t len);

/* Whether the n bytes at s are a name the local networks show as it is
 * (a group's name: the peer API takes no other since the thirty-first
 * session): valid UTF-8 without a NUL, a control character, a
 * bidirectional control, a noncharacter or a line or paragraph separator,
 * with at least one character that shows (not invisible, not blank).  A
 * name stored before may fail it: shown as cw_utf8_name_shown makes it. */
bool cw_utf8_name_ok(const char *s, size_t n);

/* Characters are counted here as the bytes that do not continue a sequence
 * (not 10xxxxxx): for valid UTF-8 these are its code points, and a cut
 * before one never splits a character.  s is NUL-terminated. */

/* The code points of s. */
size_t cw_utf8_count(const char *s);

/* The length in bytes of s's first max characters (all of s when it has no
 * more); *chars, when chars is not NULL, gets how many those are. */
size_t cw_utf8_prefix(const char *s, size_t max, size_t *chars);

/* The length in bytes of the longest start of s that is at most max bytes
 * and does not end inside a character. */
size_t cw_utf8_cut(const char *s, size_t max);

/* The characters of what a user typed that a bot's answer quotes at most. */
#define CW_UTF8_ECHO_MAX 100

/* What a user typed (s, NUL-terminated), as a bot's answer quotes it back to
 * her (the Matrix bot's notices, the XMPP component's command answers), into
 * out (len bytes, at least 4): each character that could drive a terminal
 * or change what is shown around it (cw_utf8_display_control: controls,
 * bidirectional controls and marks, line and paragraph separators) and
 * each byte that is not UTF-8 written as U+FFFD, at most CW_UTF8_ECHO_MAX
 * characters and len - 1 bytes (a cut one ends with U+2026).  Since the
 * fifty-second session: until then "I know no network %s" and the like
 * quoted a bidirectional override as typed, which turned the bot's words
 * round in her client. */
void cw_utf8_echo(const char *s, char *out, size_t len);

/* A copy of s (NUL-terminated) in which every byte that does not start a
 * valid sequence is U+FFFD: text that must be UTF-8 (a JSON string) from
 * text that may hold outside bytes or a character cut in two.  malloc'd,
 * NULL without memory. */
char *cw_utf8_scrub(const char *s);

#endif
