/* The INI files' line reader for libinih (ini_parse_stream): the
 * daemon's configuration (conf.c) and causewayctl's settings file read
 * their lines alike, as written, or stop at one libinih would misread. */
#ifndef CW_INI_LINES_H
#define CW_INI_LINES_H

#include <stdio.h>

enum ini_line_refusal {
	INI_LINE_OK = 0,
	INI_LINE_OVERLONG,      /* longer than libinih's buffer (max - 1 bytes) */
	INI_LINE_AFTER_SECTION, /* more than a comment after a section's ']' */
	INI_LINE_CUT,           /* an option's value with ';' after a blank (libinih's inline comment) */
	INI_LINE_NUL,           /* a NUL byte: a UTF-16 file, most likely (INI_LINE_NUL_HINT) */
};

/* What to tell of a line with a NUL byte. */
#define INI_LINE_NUL_HINT "the line holds a NUL byte: is the file UTF-16? save it as UTF-8"


struct ini_lines {
	FILE *f;
	int line;                      /* of the last line read (libinih's handler is not told it) */
	enum ini_line_refusal refusal; /* why the parse stopped at line, INI_LINE_OK: it did not */
	int max;                       /* libinih's buffer (INI_MAX_LINE of the library's build) */
	int read_errno;                /* a read that failed (EISDIR, EIO), 0: none */
};

/* libinih's reader (ini_reader): stream is a struct ini_lines. */
char *ini_lines_read(char *str, int num, void *stream);

#endif
