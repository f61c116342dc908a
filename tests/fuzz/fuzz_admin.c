/*
 * fuzz_admin: a libFuzzer target for the admin endpoint's request parser and query decoder.
 *
 * Beyond "no crash, no over-read" it checks the parser's contract: a complete head's length is
 * within the input and the cap; every shorter prefix of a complete head is "need more"; a head
 * refused as malformed stays refused when more bytes follow.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_admin)
 *   build/fuzz/fuzz_admin -max_len=16384 tests/fuzz/corpus/admin
 *
 * tests/unit/test_admin.c includes this file to replay the committed corpus with gcc.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "admin.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_admin: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size copy, so ASan sees any read past the end. */
    char *buf = malloc(size != 0 ? size : 1);
    if (buf == NULL)
        return 0;
    memcpy(buf, data, size);
    struct admin_request req;
    int rc = admin_parse_request(buf, size, &req);
    FUZZ_CHECK(rc > 0 || rc == -EAGAIN || rc == -EBADMSG || rc == -EMSGSIZE ||
               rc == -ENAMETOOLONG || rc == -EPROTONOSUPPORT);
    if (rc > 0) {
        FUZZ_CHECK((size_t)rc <= size && rc <= ADMIN_REQUEST_MAX);
        FUZZ_CHECK(req.method[0] != '\0' && req.path[0] == '/');
        FUZZ_CHECK(strlen(req.path) + strlen(req.query) < ADMIN_TARGET_MAX);
        struct admin_request part;
        for (int n = 0; n < rc; n++)
            FUZZ_CHECK(admin_parse_request(buf, (size_t)n, &part) == -EAGAIN);
        char v[256];
        int q = admin_query_param(req.query, "source", v, sizeof(v));
        FUZZ_CHECK(q == -ENOENT || q == -EINVAL || q == -ENOSPC ||
                   (q >= 0 && (size_t)q < sizeof(v)));
    } else if (rc == -EAGAIN) {
        FUZZ_CHECK(size < ADMIN_REQUEST_MAX);
    }
    free(buf);
    return 0;
}
