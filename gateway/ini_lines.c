/* libinih's line reader shared by the daemon's configuration and
 * causewayctl's settings file (ini_lines.h). */
#include "config.h"
#include "ini_lines.h"

#include <ctype.h>
#include <errno.h>
#include <string.h>

/* inih reads a line into a buffer of its build's INI_MAX_LINE (200 in
 * Debian's) and parses what did not fit as a line of its own: a long
 * database.url was a syntax error on the wrong line, and the end of a
 * long comment was read as an option, and taken if it named one (until
 * the twentieth session).  Such a line stops the parse here, and the
 * caller says so (x->refusal, of line x->line).
 * Debian's inih also reads a line with leading whitespace as the
 * continuation of the option above (INI_ALLOW_MULTILINE), whose value it
 * replaced: an indented "hs_token = ..." became matrix.id (until the
 * twenty-fourth session).  The spec's INI is pgbouncer.ini's, where an
 * indented line is a line like any other, so the whitespace goes before
 * inih sees the line.
 * And it takes ';' after whitespace as a comment (INI_ALLOW_INLINE_COMMENTS,
 * quotes or not), which cut "as_token = abc ;def" to "abc" (until the
 * twenty-fourth session).  A value must be the one in the file, so such an
 * option line stops the parse too; on a comment or a section's line the
 * comment cuts nothing. */
char *ini_lines_read(char *str, int num, void *stream)
{
	struct ini_lines *x = stream;
	errno = 0;
	/* fgets says nothing of a NUL byte it read, and the string ends there:
	 * a file saved as UTF-16 (a NUL in every other byte) was refused as
	 * "line longer than 199 bytes" (until the forty-seventh session's
	 * review), for the newline went unseen.  The buffer is filled first,
	 * so the last NUL in it is the one fgets wrote after what it read. */
	if (num < 1)
		return NULL;
	memset(str, 1, (size_t)num);
	char *s = fgets(str, num, x->f);
	if (!s) {
		/* inih takes a failed read for the end of the file: a directory
		 * named as the file (EISDIR) was an empty configuration, and the
		 * start, --check-config and a reload went on with the defaults
		 * and the environment (until the forty-first session). */
		if (ferror(x->f))
			x->read_errno = errno ? errno : EIO;
		return NULL;
	}
	x->line++;
	size_t end = (size_t)num - 1;
	while (s[end])
		end--;
	if (strlen(s) < end) {
		x->refusal = INI_LINE_NUL;
		return NULL;
	}
	if (!strchr(s, '\n')) {
		int ch = fgetc(x->f);
		if (ch != EOF && ch != '\n') {
			x->refusal = INI_LINE_OVERLONG;
			x->max = num;
			return NULL;
		}
	}
	size_t indent = 0;
	while (isspace((unsigned char)s[indent]))
		indent++;
	memmove(s, s + indent, strlen(s + indent) + 1);
	/* The first line's UTF-8 byte order mark, which inih skips: the line
	 * is looked at after it. */
	const char *t = x->line == 1 && strncmp(s, "\xEF\xBB\xBF", 3) == 0 ? s + 3 : s;
	while (t != s && isspace((unsigned char)*t))
		t++;
	/* inih ignores what follows a section's ']': "[server] port = 9000"
	 * was the section alone, and the default port stayed, --check-config
	 * saying valid (until the forty-seventh session's review).  Only
	 * blanks or a comment may follow it. */
	const char *close = *t == '[' ? strchr(t, ']') : NULL;
	if (close) {
		const char *p = close + 1;
		while (*p && isspace((unsigned char)*p))
			p++;
		if (*p && *p != ';' && *p != '#') {
			x->refusal = INI_LINE_AFTER_SECTION;
			return NULL;
		}
	}
	if (*t != ';' && *t != '#' && *t != '[')
		for (const char *p = t; *p && p[1]; p++)
			if (isspace((unsigned char)p[0]) && p[1] == ';') {
				x->refusal = INI_LINE_CUT;
				return NULL;
			}
	return s;
}
