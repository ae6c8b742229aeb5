/* libFuzzer target: the configuration file (gateway/conf.c through inih):
 * any file gives either a configuration or an error that says where,
 * without crashing or leaking.  The file is a memfd, read through its
 * /proc path as cfg_load reads any path; no environment variables. */
#define _GNU_SOURCE
#include "config.h"
#include "conf.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *no_env(const char *name)
{
	(void)name;
	return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int fd = -1;
	static char path[64];
	if (fd < 0) {
		fd = memfd_create("causeway-fuzz-config", 0);
		if (fd < 0)
			abort();
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	}
	if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size)
		abort();
	struct cw_config c;
	cw_errmsg e;
	if (cfg_load(&c, path, no_env, &e) == CW_OK) {
		char buf[4096];
		for (size_t i = 0; i < cfg_option_count; i++)
			cfg_value_text(&c, &cfg_options[i], true, buf, sizeof(buf));
		cfg_free(&c);
	} else if (!e.msg[0]) {
		abort(); /* an error must say why */
	}
	return 0;
}
