/*
 * fuzz_spiffe: a libFuzzer target for the SPIFFE URI parser, which reads the URI SAN of every
 * peer certificate, and for the formatters that turn what it parsed back into text.
 *
 * Beyond "no crash, no over-read" it checks the parser's contract: a parsed identity has a
 * non-empty, terminated trust domain and partition; a service identity formats back into a URI
 * that parses to the same service (the round trip a sidecar relies on when it compares the
 * identity it dialled with the one it was shown); formatting never writes past the buffer and
 * fails with -ENOSPC when the buffer is short.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_spiffe)
 *   build/fuzz/fuzz_spiffe -max_len=4096 tests/fuzz/corpus/spiffe
 *
 * tests/unit/test_fuzz_replay.c includes this file to replay the committed corpus with gcc.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spiffe.h"
#include "util.h"

int fuzz_spiffe_one(const uint8_t *data, size_t size);

#undef FUZZ_CHECK
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_spiffe: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);  \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static void spf_check_field(const char *f)
{
    FUZZ_CHECK(memchr(f, '\0', SPIFFE_NAME_MAX) != NULL);
}

/* Formats into a buffer of exactly <len> bytes, so ASan sees any write past it. */
static void spf_format_short(const struct spiffe_id *id, int full_len)
{
    size_t len = (size_t)full_len; /* one byte short of the text and its NUL */
    char *buf = malloc(len != 0 ? len : 1);
    FUZZ_CHECK(buf != NULL);
    FUZZ_CHECK(spiffe_format(buf, len, id) == -ENOSPC);
    FUZZ_CHECK(len == 0 || buf[0] == '\0');
    free(buf);
}

int fuzz_spiffe_one(const uint8_t *data, size_t size)
{
    /* An exact-size copy without a terminator: the parser must respect <len>. */
    char *uri = malloc(size != 0 ? size : 1);
    FUZZ_CHECK(uri != NULL);
    memcpy(uri, data, size);

    struct spiffe_id id;
    int rc = spiffe_parse(uri, size, &id);
    free(uri);
    if (rc != 0) {
        FUZZ_CHECK(rc == ERR_BAD_SPIFFE);
        return 0;
    }
    FUZZ_CHECK(id.kind >= SPIFFE_SERVICE && id.kind <= SPIFFE_OTHER);
    spf_check_field(id.trust_domain);
    spf_check_field(id.partition);
    spf_check_field(id.ns);
    spf_check_field(id.dc);
    spf_check_field(id.service);
    FUZZ_CHECK(id.trust_domain[0] != '\0' && id.partition[0] != '\0');

    char sni[5 * SPIFFE_NAME_MAX + 64];
    int n = spiffe_format_sni(sni, sizeof(sni), id.ns, id.service, id.ns, id.partition, id.dc,
                              id.trust_domain);
    FUZZ_CHECK(n >= 0 && (size_t)n == strlen(sni));

    if (id.kind != SPIFFE_SERVICE)
        return 0;
    FUZZ_CHECK(id.ns[0] != '\0' && id.dc[0] != '\0' && id.service[0] != '\0');
    FUZZ_CHECK(spiffe_same_service(&id, &id, 1));

    /* Every decoded byte may be escaped as %XX: 3 bytes per byte of five fields is enough. */
    char text[5 * 3 * SPIFFE_NAME_MAX + 64];
    n = spiffe_format(text, sizeof(text), &id);
    FUZZ_CHECK(n > 0 && (size_t)n == strlen(text));
    struct spiffe_id again;
    FUZZ_CHECK(spiffe_parse(text, (size_t)n, &again) == 0);
    FUZZ_CHECK(again.kind == SPIFFE_SERVICE);
    FUZZ_CHECK(spiffe_same_service(&id, &again, 1));
    FUZZ_CHECK(spiffe_same_service(&again, &id, 1));
    spf_format_short(&id, n);
    return 0;
}

#ifndef FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_spiffe_one(data, size);
}
#endif
