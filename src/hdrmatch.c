/*
 * hdrmatch: header conditions of intentions and routes (hdrmatch.h).
 */
#include "hdrmatch.h"

#include <stdlib.h>
#include <string.h>

#include "h1parse.h"
#include "rx.h"
#include "util.h"

/* Equal bytes; <b> is already lower-cased when <fold>. */
static int bytes_eq(const char *a, const char *b, size_t n, int fold)
{
    if (!fold)
        return memcmp(a, b, n) == 0;
    for (size_t i = 0; i < n; i++)
        if (util_ascii_lower(a[i]) != b[i])
            return 0;
    return 1;
}

static int name_is(const struct hdr_cond *h, const char *lit)
{
    size_t n = strlen(lit);
    return h->name_len == n && bytes_eq(h->name, lit, n, 1);
}

int hdr_cond_init(struct hdr_cond *h, const struct dec_perm_header *d, char *err, size_t errlen)
{
    memset(h, 0, sizeof(*h));
    h->name = xstrdup(d->name != NULL ? d->name : "");
    h->name_len = strlen(h->name);
    h->reads = name_is(h, "host") || name_is(h, ":authority") ? HDR_NAME_AUTHORITY
               : name_is(h, ":method")                        ? HDR_NAME_METHOD
               : name_is(h, ":path")                          ? HDR_NAME_PATH
               : h->name_len > 0 && h->name[0] == ':'         ? HDR_NAME_PSEUDO
                                                              : HDR_NAME_FIELD;
    h->match = d->match;
    h->invert = d->invert != 0;
    h->ignore_case =
        d->ignore_case != 0 && d->match != DEC_HDR_PRESENT && d->match != DEC_HDR_REGEX;
    const char *v = d->value != NULL ? d->value : "";
    h->value_len = strlen(v);
    h->value = h->ignore_case ? xstrndup_lower(v, h->value_len) : xstrdup(v);
    if (h->match == DEC_HDR_REGEX && rx_compile(h->value, h->value_len, &h->rx, err, errlen) != 0)
        return -1;
    return 0;
}

void hdr_cond_dispose(struct hdr_cond *h)
{
    free(h->name);
    free(h->value);
    rx_free(h->rx);
    memset(h, 0, sizeof(*h));
}

/* The plain string kinds (Exact, Prefix, Suffix, Contains) on a present value. */
static int value_matches(const struct hdr_cond *h, const char *v, size_t len)
{
    int fold = h->ignore_case;
    switch (h->match) {
    case DEC_HDR_EXACT:
        return len == h->value_len && bytes_eq(v, h->value, len, fold);
    case DEC_HDR_PREFIX:
        return len >= h->value_len && bytes_eq(v, h->value, h->value_len, fold);
    case DEC_HDR_SUFFIX:
        return len >= h->value_len &&
               bytes_eq(v + len - h->value_len, h->value, h->value_len, fold);
    case DEC_HDR_CONTAINS: {
        if (!fold)
            return memmem(v, len, h->value, h->value_len) != NULL;
        /* memmem is linear; a folded copy keeps it so whatever the caller sends. */
        char *low = xstrndup_lower(v, len);
        int found = memmem(low, len, h->value, h->value_len) != NULL;
        free(low);
        return found;
    }
    default:
        return 0;
    }
}

int hdr_cond_eval(const struct hdr_cond *h, const struct hdr_req *rq)
{
    struct http_slice v = {NULL, 0};
    char *joined = NULL;
    int present = 0;
    switch (h->reads) {
    case HDR_NAME_AUTHORITY:
        present = rq->authority.p != NULL;
        v = rq->authority;
        break;
    case HDR_NAME_METHOD:
        present = rq->method.p != NULL;
        v = rq->method;
        break;
    case HDR_NAME_PATH:
        if (rq->path.p == NULL) {
            if (!rq->pseudo_absent)
                return -1;
            break;
        }
        present = 1;
        v = rq->path;
        if (rq->query.p != NULL) {
            joined = xmalloc(rq->path.len + 1 + rq->query.len + 1);
            memcpy(joined, rq->path.p, rq->path.len);
            joined[rq->path.len] = '?';
            memcpy(joined + rq->path.len + 1, rq->query.p, rq->query.len);
            v = (struct http_slice){joined, rq->path.len + 1 + rq->query.len};
        }
        break;
    case HDR_NAME_PSEUDO:
        if (!rq->pseudo_absent)
            return -1;
        break;
    case HDR_NAME_FIELD:
        present = h1_field_value(rq->headers, rq->nheaders, h->name, h->name_len, &v, &joined) > 0;
        break;
    }
    int r;
    const char *p = v.p != NULL ? v.p : "";
    if (!present)
        /* Envoy: a missing header matches only an inverted presence test. */
        r = h->match == DEC_HDR_PRESENT && h->invert;
    else if (h->match == DEC_HDR_PRESENT)
        r = 1;
    else if (h->match == DEC_HDR_REGEX)
        r = h->rx != NULL ? rx_match(h->rx, p, v.len) : -1;
    else
        r = value_matches(h, p, v.len);
    if (present && h->invert && r >= 0)
        r = !r;
    free(joined);
    return r < 0 ? -1 : r;
}
