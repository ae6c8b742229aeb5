/* Shared scaffolding of the Check unit tests. */
#ifndef CW_UNIT_H
#define CW_UNIT_H

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Path of a file under tests/unit/data in the source tree ($top_srcdir is
 * set by the test harness; the source tree when run by hand). */
static inline const char *unit_data_path(const char *name)
{
	static char path[4096];
	const char *top = getenv("top_srcdir");
	snprintf(path, sizeof(path), "%s/tests/unit/data/%s", top && *top ? top : ".", name);
	return path;
}

/* Runs one suite and turns its result into the exit status. */
static inline int unit_run(Suite *s)
{
	SRunner *sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

#endif
