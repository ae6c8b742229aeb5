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

#endif
