/*
 * fuzz_agent: a libFuzzer target for the agent transport's response-header parser, which reads
 * the X-Consul-Index, X-Consul-ContentHash and X-Consul-Default-ACL-Policy headers that every
 * watch blocks and decides on.
 *
 * The input is a header block; each line (up to and including its '\n') goes to the parser as
 * an exact-size copy, as libcurl hands lines over. Beyond "no crash, no over-read" it checks the
 * parser's contract: both text fields stay terminated inside their arrays and free of line
 * ends; a status line clears everything; an index comes only from a line that names the index.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_agent)
 *   build/fuzz/fuzz_agent -max_len=16384 tests/fuzz/corpus/agent
 *
 * tests/unit/test_fuzz_replay.c includes this file to replay the committed corpus with gcc.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "agent.h"

int fuzz_agent_one(const uint8_t *data, size_t size);

#undef FUZZ_CHECK
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_agent: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static void agt_check_field(const char *f)
{
    const char *nul = memchr(f, '\0', AGENT_HEADER_VALUE_MAX);
    FUZZ_CHECK(nul != NULL);
    size_t n = (size_t)(nul - f);
    FUZZ_CHECK(n == 0 || (f[0] != ' ' && f[0] != '\t' && f[n - 1] != '\r' && f[n - 1] != '\n'));
}

int fuzz_agent_one(const uint8_t *data, size_t size)
{
    struct agent_headers h;
    memset(&h, 0, sizeof(h));
    size_t at = 0;
    while (at < size) {
        const uint8_t *nl = memchr(data + at, '\n', size - at);
        size_t len = nl != NULL ? (size_t)(nl - (data + at)) + 1 : size - at;
        char *line = malloc(len);
        FUZZ_CHECK(line != NULL);
        memcpy(line, data + at, len);
        uint64_t before = h.index;
        agent_parse_header(line, len, &h);
        if (len >= 5 && memcmp(line, "HTTP/", 5) == 0)
            FUZZ_CHECK(h.index == 0 && h.content_hash[0] == '\0' && h.acl_policy[0] == '\0');
        else if (h.index != before)
            FUZZ_CHECK(len >= 15 && strncasecmp(line, "X-Consul-Index:", 15) == 0);
        free(line);
        agt_check_field(h.content_hash);
        agt_check_field(h.acl_policy);
        at += len;
    }
    return 0;
}

#ifndef FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_agent_one(data, size);
}
#endif
