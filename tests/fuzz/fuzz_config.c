/*
 * fuzz_config: a libFuzzer target for the command-line parser (flags, their values, durations
 * such as -drain-timeout, booleans, worker counts).
 *
 * The input is the argument vector, arguments separated by NUL bytes; the environment is
 * empty. Inputs naming -token-file are skipped: that flag opens the file it names. Beyond "no
 * crash, no leak" it checks config_parse()'s contract: a failure names what is wrong; a success
 * has exactly one identity flag, a level, 1 to 256 workers and a drain timeout of at most a day.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_config)
 *   build/fuzz/fuzz_config -max_len=4096 tests/fuzz/corpus/config
 *
 * tests/unit/test_fuzz_replay.c includes this file to replay the committed corpus with gcc.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "util.h"

int fuzz_config_one(const uint8_t *data, size_t size);

#undef FUZZ_CHECK
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_config: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);  \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define CFG_MAX_ARGS 64

static const char *cfg_no_env(const char *name)
{
    (void)name;
    return NULL;
}

int fuzz_config_one(const uint8_t *data, size_t size)
{
    if (size > 4096 || memmem(data, size, "token-file", 10) != NULL)
        return 0;
    /* One terminated copy; each argument is a NUL-terminated run inside it. */
    char *text = malloc(size + 1);
    FUZZ_CHECK(text != NULL);
    memcpy(text, data, size);
    text[size] = '\0';
    char *argv[CFG_MAX_ARGS + 2];
    int argc = 0;
    argv[argc++] = "connectd";
    for (size_t at = 0; at < size && argc <= CFG_MAX_ARGS; at += strlen(text + at) + 1)
        argv[argc++] = text + at;
    argv[argc] = NULL;

    struct config c;
    char err[512] = "";
    int rc = config_parse(&c, argc, argv, cfg_no_env, err, sizeof(err));
    if (rc != 0) {
        FUZZ_CHECK(rc == -EINVAL && err[0] != '\0' && strlen(err) < sizeof(err));
        free(text);
        return 0;
    }
    if (!(c.help || c.version || c.config_doc || c.man)) {
        FUZZ_CHECK((c.proxy_id != NULL) + (c.sidecar_for != NULL) + (c.service != NULL) == 1);
        FUZZ_CHECK(c.level >= LOG_LEVEL_TRACE && c.level <= LOG_LEVEL_ERROR);
        FUZZ_CHECK(c.n_workers >= 1 && c.n_workers <= 256);
        FUZZ_CHECK(c.drain_timeout_ms <= 86400000u);
        FUZZ_CHECK(c.verify == 0 || c.verify == 1);
    }
    config_dispose(&c);
    free(text);
    return 0;
}

#ifndef FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_config_one(data, size);
}
#endif
