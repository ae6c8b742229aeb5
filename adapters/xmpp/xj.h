/* JIDs (RFC 7622) as the XMPP adapter uses them, and the reversible mapping
 * of remote users' ids to JID localparts.  Pure code: no I/O, no globals;
 * safe from any thread.  NULL is never valid input; an output buffer may be
 * NULL when its size is 0 (the caller only validates); a buffer too small
 * for its part makes the function return false. */
#ifndef CW_XJ_H
#define CW_XJ_H

#include <stdbool.h>
#include <stddef.h>

#define XJ_PART_MAX 1023  /* bytes of a localpart, domainpart or resourcepart */
#define XJ_JID_MAX 3071   /* bytes of a whole JID */

/* Splits and checks a JID  [local "@"] domain ["/" resource]:
 *   local     1-1023 bytes of valid UTF-8 without the characters RFC 7622
 *             forbids there (" & ' / : < > @, space, control characters
 *             U+0000-U+001F and U+007F); '\' is allowed (XEP-0106)
 *   domain    1-1023 bytes: a DNS name of [a-z0-9-] labels (lower case,
 *             labels 1-63, not starting or ending with '-') joined by single
 *             dots, or an IPv4 literal, or "[" IPv6 "]"; a trailing dot is
 *             not accepted; a name of digits and dots only must be an IPv4
 *             dotted quad (0-255, no leading zeros)
 *   resource  1-1023 bytes of valid UTF-8 without control characters
 *             (U+0000-U+001F, U+007F)
 * The resource starts at the first '/', the localpart ends at the first '@'
 * before it (RFC 7622 section 3.2), so "a/b@c" is the domain a with the
 * resource b@c.  Absent parts give "" in their buffers.  false when anything
 * is invalid; then every buffer of size > 0 holds "". */
bool xj_split(const char *jid, char *local, size_t llen, char *domain, size_t dlen, char *resource, size_t rlen);

/* A remote user's id (a mimi:// localpart: 1-255 bytes, any bytes but NUL
 * accepted here) as a JID localpart, reversibly:
 *   - the ten characters of XEP-0106 become its escapes:
 *       space \20  " \22  & \26  ' \27  / \2f  : \3a  < \3c  > \3e  @ \40  \ \5c
 *     ('\' is always escaped, so every '\' of the output starts an escape);
 *   - the capital letters A-Z become '\' and two lower-case hex digits of
 *     their code (A -> \41 ... Z -> \5a): JID localparts are case-folded by
 *     servers, so "Bob" and "bob" must not meet;
 *   - control bytes (below 0x20, 0x7f) and every byte of 0x80 and above
 *     become '\' + two lower-case hex digits too (no Unicode normalisation
 *     or case folding by the server can then change them);
 *   - every other byte is copied.
 * The output is lower-case ASCII without the forbidden characters, so
 * servers leave it as it is.  false when id is empty, longer than 255 bytes,
 * or out is too small (4 * 255 + 1 bytes are always enough; 3 * 255 + 1 is
 * the most it takes). */
bool xj_escape_local(const char *id, char *out, size_t len);

/* The inverse: false unless local is exactly what xj_escape_local() writes
 * for some id (so that the mapping is one-to-one): every '\' followed by two
 * lower-case hex digits of a byte that xj_escape_local escapes (not \00),
 * no byte that it would have escaped left as it is, and 1-255 bytes out.
 * On false a buffer of size > 0 holds "". */
bool xj_unescape_local(const char *local, char *out, size_t len);

#endif
