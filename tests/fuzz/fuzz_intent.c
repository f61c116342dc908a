/*
 * fuzz_intent: a libFuzzer target for per-request authorization: intention Permissions
 * decoded, compiled (regexes through rx) and evaluated against a request.
 *
 * The input is an intention match answer (JSON for destination "db"), a line holding only
 * "--", then a request: "METHOD PATH" and "name: value" header lines ("host" sets the
 * authority). Beyond "no crash, no leak, no over-read" it checks the decision's contract: a
 * deciding permission belongs to the deciding rule and gives its action; no rule means the
 * default policy; the matched rule is the L4 decision's rule; a rule without Permissions
 * decides alike per connection and per request (JWT aside); an L7 rule never allows per
 * connection; a failed-closed decision is a deny; and a table equals its rebuild. The request
 * path is also compiled as a regex and matched against the first header value, which fuzzes
 * rx's RE2 checks on their own.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_intent)
 *   build/fuzz/fuzz_intent -max_len=65536 tests/fuzz/corpus/intent
 *
 * tests/unit/test_fuzz_replay.c includes this file to replay the committed corpus with gcc.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "decode.h"
#include "intent.h"
#include "log.h"
#include "rx.h"
#include "util.h"

int fuzz_intent_one(const uint8_t *data, size_t size);

#undef FUZZ_CHECK
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_intent: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);  \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#define FZI_HDRS 16

struct fz_req {
    struct intent_http_req rq;
    struct http_header h[FZI_HDRS];
};

/* Splits <s> (<len> bytes) into lines; fills the request from them. Slices point into <s>. */
static void parse_request(const char *s, size_t len, struct fz_req *r)
{
    memset(r, 0, sizeof(*r));
    r->rq.headers = r->h;
    size_t i = 0;
    int first = 1;
    while (i < len) {
        const char *nl = memchr(s + i, '\n', len - i);
        size_t end = nl != NULL ? (size_t)(nl - s) : len;
        const char *line = s + i;
        size_t n = end - i;
        if (first) {
            const char *sp = memchr(line, ' ', n);
            size_t mlen = sp != NULL ? (size_t)(sp - line) : n;
            r->rq.method = (struct http_slice){line, mlen};
            if (sp != NULL)
                r->rq.path = (struct http_slice){sp + 1, n - mlen - 1};
            first = 0;
        } else if (r->rq.nheaders < FZI_HDRS) {
            const char *colon = n > 1 ? memchr(line + 1, ':', n - 1) : NULL;
            if (colon != NULL) {
                struct http_header *h = &r->h[r->rq.nheaders++];
                h->name = (struct http_slice){line, (size_t)(colon - line)};
                const char *v = colon + 1;
                while (v < line + n && *v == ' ')
                    v++;
                h->value = (struct http_slice){v, (size_t)(line + n - v)};
                if (h->name.len == 4 && strncasecmp(h->name.p, "host", 4) == 0)
                    r->rq.authority = h->value;
            }
        }
        i = end + 1;
    }
}

static void check_decision(const struct intent_table *t, const char *const caller[3],
                           const struct intent_http_req *rq)
{
    struct intent_decision d = intent_eval_http(t, caller[0], caller[1], caller[2], rq);
    struct intent_decision l4 = intent_eval(t, caller[0], caller[1], caller[2]);
    FUZZ_CHECK(d.allow == 0 || d.allow == 1);
    FUZZ_CHECK(d.matched == l4.rule);
    FUZZ_CHECK(l4.perm == -1 && l4.failed_closed == 0);
    FUZZ_CHECK(l4.rule == NULL || !l4.rule->has_permissions || !l4.allow);
    FUZZ_CHECK(!d.failed_closed || !d.allow);
    if (d.perm >= 0) {
        FUZZ_CHECK(d.rule != NULL && d.rule->has_permissions);
        FUZZ_CHECK((size_t)d.perm < d.rule->n_perms);
        /* A rule-level JWT can only turn the permission's allow into a deny. */
        FUZZ_CHECK(d.allow == d.rule->perms[d.perm].allow ||
                   (d.rule->has_jwt && !d.allow && d.failed_closed));
    }
    if (d.rule == NULL)
        FUZZ_CHECK(d.allow == intent_table_default_allow(t) && d.perm == -1);
    else
        FUZZ_CHECK(d.rule == d.matched);
    if (d.matched != NULL && !d.matched->has_permissions)
        FUZZ_CHECK(d.rule == d.matched &&
                   (d.allow == l4.allow || (d.matched->has_jwt && !d.allow)));
    char desc[512];
    FUZZ_CHECK(strlen(intent_describe(&d, desc, sizeof(desc))) < sizeof(desc));
    if (d.perm >= 0)
        FUZZ_CHECK(strlen(intent_perm_describe(&d.rule->perms[d.perm], desc, sizeof(desc))) <
                   sizeof(desc));
}

static void fuzz_rx(const struct fz_req *r)
{
    struct rx *rx;
    char err[200] = "";
    if (rx_compile(r->rq.path.p, r->rq.path.len, &rx, err, sizeof(err)) != 0) {
        FUZZ_CHECK(rx == NULL && err[0] != '\0');
        return;
    }
    struct http_slice s = r->rq.nheaders > 0 ? r->h[0].value : r->rq.method;
    int rc = rx_match(rx, s.p, s.len);
    FUZZ_CHECK(rc == 0 || rc == 1 || rc < 0);
    rx_free(rx);
}

int fuzz_intent_one(const uint8_t *data, size_t size)
{
    static const char sep[] = "\n--\n";
    const char *buf = (const char *)data;
    const char *at = size >= sizeof(sep) - 1 ? memmem(buf, size, sep, sizeof(sep) - 1) : NULL;
    size_t json_len = at != NULL ? (size_t)(at - buf) : size;
    const char *req = at != NULL ? at + sizeof(sep) - 1 : buf + size;
    size_t req_len = size - (size_t)(req - buf);

    /* Bad regexes are logged at warn: keep the fuzzer's output to its findings. */
    log_min_level = LOG_LEVEL_ERROR;
    struct fz_req r;
    parse_request(req, req_len, &r);
    fuzz_rx(&r);

    struct dec_intention *v;
    size_t n;
    char err[256] = "";
    if (decode_intentions_match(buf, json_len, "db", &v, &n, err, sizeof(err)) != 0) {
        FUZZ_CHECK(v == NULL && n == 0 && err[0] != '\0');
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        FUZZ_CHECK(v[i].has_permissions == (v[i].n_permissions > 0));
        FUZZ_CHECK(v[i].n_permissions <= DEC_PERMISSIONS_MAX);
        for (size_t j = 0; j < v[i].n_permissions; j++) {
            const struct dec_permission *p = &v[i].permissions[j];
            FUZZ_CHECK(p->n_headers <= DEC_PERM_HEADERS_MAX &&
                       p->n_methods <= DEC_PERM_METHODS_MAX);
            FUZZ_CHECK((p->path_match == DEC_PATH_ANY) == (p->path[0] == '\0'));
            for (size_t k = 0; k < p->n_headers; k++)
                FUZZ_CHECK(p->headers[k].name[0] != '\0' &&
                           (p->headers[k].match == DEC_HDR_PRESENT) ==
                               (p->headers[k].value[0] == '\0'));
            for (size_t k = 0; k < p->n_methods; k++)
                FUZZ_CHECK(p->methods[k][0] != '\0');
        }
    }
    for (int def = 0; def <= 1; def++) {
        struct intent_table *t = intent_table_new(v, n, def);
        struct intent_table *again = intent_table_new(v, n, def);
        FUZZ_CHECK(intent_table_equal(t, again));
        static const char *const callers[][3] = {
            {"", "", "web"}, {"", "", "api"}, {"team1", "billing", "web"}, {"", "", ""}};
        for (size_t i = 0; i < ARRAY_SIZE(callers); i++)
            check_decision(t, callers[i], &r.rq);
        intent_table_unref(again);
        intent_table_unref(t);
    }
    dec_intentions_free(v, n);
    return 0;
}

#ifndef FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_intent_one(data, size);
}
#endif
