/*
 * fuzz_pathnorm: a libFuzzer target for request path normalization, run under all sixteen
 * combinations of the path settings (normalization on/off, MergeSlashes, the four escaped-slash
 * actions) and the three header-underscore actions.
 *
 * Beyond "no crash, no over-read" it checks the module's contract: the result is a length or
 * -EBADMSG, never -ENOSPC with PATHNORM_OUT_MAX bytes; normalizing the output again gives the
 * same output and no redirect (idempotent); the output grows only by the percent-encodings of
 * bytes that may not appear raw and a leading '/'; with normalization on it has no "." or ".."
 * segment, no '\', no raw byte that needs encoding and only upper-case encodings of reserved
 * bytes; with MergeSlashes no "//"; after any action but KEEP_UNCHANGED no escaped slash; with
 * everything off the path is unchanged; a redirect only for UNESCAPE_AND_REDIRECT.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_pathnorm)
 *   build/fuzz/fuzz_pathnorm -max_len=4096 tests/fuzz/corpus/pathnorm
 *
 * tests/unit/test_fuzz_replay.c includes this file to replay the committed corpus with gcc.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pathnorm.h"

int fuzz_pathnorm_one(const uint8_t *data, size_t size);

#undef FUZZ_CHECK
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_pathnorm: %s:%d: check failed: %s\n", __FILE__, __LINE__,        \
                    #cond);                                                                        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Bytes the normalizer writes percent-encoded when it meets them raw. */
static int must_encode(unsigned char c)
{
    return c <= 0x20 || c >= 0x7f || strchr("\"<>?^`{|}", c) != NULL;
}

static int is_upper_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F');
}

static int unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_' || c == '~';
}

static int has_escaped_slash(const char *p, size_t n)
{
    for (size_t i = 0; i + 3 <= n; i++)
        if (p[i] == '%' && ((p[i + 1] == '2' && (p[i + 2] == 'F' || p[i + 2] == 'f')) ||
                            (p[i + 1] == '5' && (p[i + 2] == 'C' || p[i + 2] == 'c'))))
            return 1;
    return 0;
}

/* The properties of a normalized (not disabled) output. */
static void check_normalized(const char *o, size_t n)
{
    FUZZ_CHECK(n > 0 && o[0] == '/');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)o[i];
        FUZZ_CHECK(c != '\\' && c != '#' && !must_encode(c));
        if (c == '%') {
            FUZZ_CHECK(i + 2 < n && is_upper_hex(o[i + 1]) && is_upper_hex(o[i + 2]));
            unsigned v = (unsigned)strtoul((char[]){o[i + 1], o[i + 2], 0}, NULL, 16);
            FUZZ_CHECK(v != 0 && !unreserved((unsigned char)v));
        }
    }
    /* No dot segment: every segment between slashes is other than "." and "..". */
    for (size_t s = 1; s <= n;) {
        size_t e = s;
        while (e < n && o[e] != '/')
            e++;
        size_t len = e - s;
        FUZZ_CHECK(!(len == 1 && o[s] == '.') && !(len == 2 && o[s] == '.' && o[s + 1] == '.'));
        s = e + 1;
    }
}

static void one(const struct mesh_http_cfg *cfg, const char *in, size_t n, char *out, char *again)
{
    int redirect = -1;
    ssize_t rc = pathnorm_path(cfg, in, n, out, PATHNORM_OUT_MAX(n), &redirect);
    FUZZ_CHECK(rc >= 0 || rc == -EBADMSG);
    FUZZ_CHECK(redirect == 0 || redirect == 1);
    if (rc < 0)
        return;
    size_t len = (size_t)rc;
    FUZZ_CHECK(len <= PATHNORM_OUT_MAX(n));
    FUZZ_CHECK(!redirect || cfg->escaped_slash == PATHNORM_SLASH_UNESCAPE_REDIRECT);
    if (cfg->disable_path_normalization) {
        FUZZ_CHECK(len <= n);
        if (!cfg->merge_slashes && cfg->escaped_slash == PATHNORM_SLASH_KEEP)
            FUZZ_CHECK(len == n && memcmp(in, out, n) == 0);
    } else {
        size_t grow = n == 0 || (in[0] != '/' && in[0] != '\\');
        for (size_t i = 0; i < n; i++)
            grow += 2 * (size_t)must_encode((unsigned char)in[i]);
        FUZZ_CHECK(len <= n + grow);
        check_normalized(out, len);
    }
    if (cfg->merge_slashes)
        FUZZ_CHECK(memmem(out, len, "//", 2) == NULL);
    if (cfg->escaped_slash != PATHNORM_SLASH_KEEP)
        FUZZ_CHECK(!has_escaped_slash(out, len));

    /* Idempotent: what was normalized stays as it is, and asks for no redirect. */
    int redirect2 = -1;
    ssize_t rc2 = pathnorm_path(cfg, out, len, again, PATHNORM_OUT_MAX(len), &redirect2);
    if (rc2 != rc || memcmp(out, again, len) != 0 || redirect2 != 0) {
        fprintf(stderr,
                "fuzz_pathnorm: not idempotent (off=%d merge=%d slash=%d): %zd \"%.*s\" "
                "-> %zd \"%.*s\"\n",
                cfg->disable_path_normalization, cfg->merge_slashes, (int)cfg->escaped_slash, rc,
                (int)len, out, rc2, rc2 > 0 ? (int)rc2 : 0, again);
        abort();
    }
}

int fuzz_pathnorm_one(const uint8_t *data, size_t size)
{
    /* Exact-size copies, so ASan sees any read past the end. */
    char *in = malloc(size != 0 ? size : 1);
    char *out = malloc(PATHNORM_OUT_MAX(size));
    char *again = malloc(PATHNORM_OUT_MAX(PATHNORM_OUT_MAX(size)));
    if (in == NULL || out == NULL || again == NULL)
        goto out;
    memcpy(in, data, size);
    for (int off = 0; off < 2; off++)
        for (int merge = 0; merge < 2; merge++)
            for (int slash = PATHNORM_SLASH_KEEP; slash <= PATHNORM_SLASH_UNESCAPE_REDIRECT;
                 slash++) {
                struct mesh_http_cfg cfg = {.disable_path_normalization = off,
                                            .merge_slashes = merge,
                                            .escaped_slash = (enum pathnorm_escaped_slash)slash};
                one(&cfg, in, size, out, again);
            }
    int has_us = memchr(in, '_', size) != NULL;
    struct http_slice name = {in, size};
    for (int u = PATHNORM_UNDERSCORE_ALLOW; u <= PATHNORM_UNDERSCORE_DROP; u++) {
        struct mesh_http_cfg cfg = {.underscore = (enum pathnorm_underscore)u};
        int rc = pathnorm_header(&cfg, name);
        int want = !has_us || u == PATHNORM_UNDERSCORE_ALLOW ? 0
                   : u == PATHNORM_UNDERSCORE_DROP           ? 1
                                                             : -EBADMSG;
        FUZZ_CHECK(rc == want);
    }
out:
    free(in);
    free(out);
    free(again);
    return 0;
}

#ifndef FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_pathnorm_one(data, size);
}
#endif
