/* Matrix identifiers (the Matrix specification's appendix "Identifier
 * Grammar") and the ghost users that stand for remote users.  Pure code: no
 * I/O, no globals; safe from any thread.
 *
 * Every function takes NUL-terminated text; NULL is never valid.  Output
 * buffers may be NULL when their size is 0 (the caller only validates); a
 * buffer too small for its part makes the function return false. */
#ifndef CW_MX_ID_H
#define CW_MX_ID_H

#include <stdbool.h>
#include <stddef.h>

#include "utf8.h" /* cw_utf8_seq, cw_utf8_valid */

/* Bytes of a user id, room id, room alias or event id, sigil and server
 * name included (the spec's limit for each of them). */
#define MX_ID_MAX 255

/* A server name:  hostname [ ":" port ]  where hostname is a dotted-quad IPv4
 * literal (each number 0-255), "[" IPv6 literal "]" (RFC 3513), or a DNS name
 * of [A-Za-z0-9-] labels joined by single dots (no empty label); port is 1-5
 * digits, at most 65535.  Case-sensitive, as the spec says: no folding. */
bool mx_server_name_valid(const char *s);

/* A content URI  "mxc://" server_name "/" media_id  with a media id of 1 to
 * 255 of [A-Za-z0-9_-] (the Client-Server API's "Matrix Content URI").
 * Copies the server name into server; *media_id (may be NULL) points at
 * the media id inside uri. */
bool mx_mxc_parse(const char *uri, char *server, size_t slen, const char **media_id);

/* A localpart of the current grammar (spec v1.8): 1 or more of
 * a-z 0-9 . _ = - / +.  What the gateway itself may create. */
bool mx_localpart_compliant(const char *localpart);

/* A user id  "@" localpart ":" server_name, at most 255 bytes.  The localpart
 * follows the historical grammar that servers and clients MUST still accept
 * for other users: any valid UTF-8 without ':' (and NUL), the empty string
 * included; use mx_localpart_compliant() where the current grammar is
 * required.  Copies the parts into localpart and server. */
bool mx_user_id_parse(const char *s, char *localpart, size_t llen, char *server, size_t slen);

/* A room id: "!" opaque ":" server_name (room versions 1-11: opaque is
 * 1 or more bytes of valid UTF-8 without ':'), or "!" followed by 1 or more
 * unpadded base64 characters [A-Za-z0-9+/_-] without a server name (the
 * hash-based ids of room version 12).  At most 255 bytes. */
bool mx_room_id_valid(const char *s);

/* An event id: "$" opaque ":" server_name (room versions 1 and 2) or "$"
 * followed by 1 or more unpadded base64 characters [A-Za-z0-9+/_-] (version 3
 * uses the standard alphabet, 4 and later the URL-safe one).  At most 255
 * bytes. */
bool mx_event_id_valid(const char *s);

/* A room alias "#" localpart ":" server_name: localpart 1 or more bytes of
 * valid UTF-8 without ':'; at most 255 bytes. */
bool mx_room_alias_parse(const char *s, char *localpart, size_t llen, char *server, size_t slen);

/* The room directory's path of alias (GET it to resolve the alias, DELETE
 * it to remove it): "/_matrix/client/v3/directory/room/" and the alias
 * URL-escaped ('#' and ':' too: one path segment), into out.  False when
 * it does not fit (out is "" then) or out of memory. */
bool mx_alias_directory_path(const char *alias, char *out, size_t outlen);

/* ------------------------------------------------------------ ghosts
 *
 * The ghost of remote user R of network N (a peer name) on this homeserver:
 *
 *     "@" prefix esc(N) "_" esc'(R) ":" server
 *
 *   prefix   the namespace of the registration (e.g. "_cw_"): 1 or more
 *            characters of the current localpart grammar
 *   esc(N)   every byte outside [a-z0-9.-] becomes "=xx" (two lower-case hex
 *            digits), so esc(N) holds no '_' and the first '_' after the
 *            prefix ends it: "my_peer" -> "my=5fpeer"
 *   esc'(R)  the appendix "Mapping from other character sets": an upper-case
 *            A-Z becomes '_' and the lower-case letter ("A" -> "_a"), '_'
 *            becomes "__", a-z 0-9 . - / stay, and every other byte (UTF-8
 *            or not, '=' itself and '+' included) becomes "=xx":
 *            "+4915112345678" -> "=2b4915112345678", "Ünal" -> "=c3=9cnal".
 *            '+' is escaped although spec v1.8 allows it in localparts:
 *            homeservers older than that refuse it at registration.
 *
 * The result uses only the current grammar and is at most 255 bytes.  N and
 * R may hold any bytes but NUL; both are non-empty.  mx_ghost_parse accepts
 * exactly the ids mx_ghost_id makes (the same prefix and server byte for
 * byte, canonical escapes only, lower-case hex, no escape of a byte that
 * stands for itself), so parse(build(x)) == x and build(parse(id)) == id.
 */
bool mx_ghost_id(const char *prefix, const char *network, const char *remote_local, const char *server,
		 char *out, size_t outlen);
bool mx_ghost_parse(const char *prefix, const char *server, const char *user_id, char *network, size_t nlen,
		    char *remote_local, size_t rlen);
/* Whether user_id is in the ghosts' (exclusive) namespace,
 * "@<prefix>...:<server>", whether or not it names a ghost mx_ghost_parse
 * would accept (until the thirtieth session any server's was taken). */
bool mx_in_ghost_namespace(const char *prefix, const char *server, const char *user_id);

#endif
