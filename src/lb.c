#include "lb.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "util.h"

/* ---- xxHash64 ---- */

#define P1 0x9E3779B185EBCA87ull
#define P2 0xC2B2AE3D27D4EB4Full
#define P3 0x165667B19E3779F9ull
#define P4 0x85EBCA77C2B2AE63ull
#define P5 0x27D4EB2F165667C5ull

static uint64_t rotl(uint64_t x, unsigned r)
{
    return (x << r) | (x >> (64 - r));
}

/* Little-endian reads whatever the host's order, as the algorithm is specified. */
static uint64_t rd64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t xround(uint64_t acc, uint64_t in)
{
    acc += in * P2;
    return rotl(acc, 31) * P1;
}

static uint64_t xmerge(uint64_t acc, uint64_t v)
{
    acc ^= xround(0, v);
    return acc * P1 + P4;
}

uint64_t lb_xxh64(const void *data, size_t len, uint64_t seed)
{
    const unsigned char *p = data, *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const unsigned char *limit = end - 32;
        do {
            v1 = xround(v1, rd64(p));
            v2 = xround(v2, rd64(p + 8));
            v3 = xround(v3, rd64(p + 16));
            v4 = xround(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        h = xmerge(h, v1);
        h = xmerge(h, v2);
        h = xmerge(h, v3);
        h = xmerge(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    for (; end - p >= 8; p += 8) {
        h ^= xround(0, rd64(p));
        h = rotl(h, 27) * P1 + P4;
    }
    if (end - p >= 4) {
        h ^= (uint64_t)rd32(p) * P1;
        h = rotl(h, 23) * P2 + P3;
        p += 4;
    }
    for (; p < end; p++) {
        h ^= (uint64_t)*p * P5;
        h = rotl(h, 11) * P1;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

int lb_policy_hashed(enum dec_lb_policy p)
{
    return p == DEC_LB_RING_HASH || p == DEC_LB_MAGLEV;
}

/* ---- tables ---- */

struct ring_entry {
    uint64_t hash;
    uint32_t ep;
};

struct lb_table {
    enum dec_lb_policy policy;
    size_t n;      /* endpoints */
    size_t size;   /* ring entries or maglev slots */
    void *entries; /* struct ring_entry[size] sorted by hash, or uint32_t[size] */
};

static int ring_cmp(const void *a, const void *b)
{
    const struct ring_entry *x = a, *y = b;
    if (x->hash != y->hash)
        return x->hash < y->hash ? -1 : 1;
    return x->ep < y->ep ? -1 : x->ep > y->ep;
}

static void build_ring(struct lb_table *t, uint32_t ring_min, uint32_t ring_max,
                       const char *const *keys)
{
    uint64_t lo = ring_min ? ring_min : LB_RING_MIN_DEFAULT;
    uint64_t hi = ring_max ? ring_max : LB_RING_MAX_DEFAULT;
    if (hi > LB_RING_CAP)
        hi = LB_RING_CAP;
    if (lo > hi)
        lo = hi;
    /* Envoy with equal weights: scale = min(ceil(min * w) / w, max) with w = 1 / n, and each
     * endpoint takes scale * w hashes (at least one). */
    uint64_t scale = (lo + t->n - 1) / t->n * t->n;
    if (scale > hi)
        scale = hi;
    size_t per = (size_t)((scale + t->n - 1) / t->n);
    if (per == 0)
        per = 1;
    if (per * t->n > LB_RING_CAP)
        per = LB_RING_CAP / t->n > 0 ? LB_RING_CAP / t->n : 1;
    struct ring_entry *r = xcalloc(per * t->n, sizeof(*r));
    size_t k = 0;
    for (size_t i = 0; i < t->n; i++) {
        /* "<key>_<j>": the key and '_' once, then each j's decimal digits after them. */
        size_t klen = strlen(keys[i]);
        char *buf = xmalloc(klen + 24);
        memcpy(buf, keys[i], klen);
        buf[klen] = '_';
        for (size_t j = 0; j < per; j++) {
            char digits[24];
            size_t nd = 0;
            for (size_t v = j;; v /= 10) {
                digits[nd++] = (char)('0' + v % 10);
                if (v < 10)
                    break;
            }
            for (size_t d = 0; d < nd; d++)
                buf[klen + 1 + d] = digits[nd - 1 - d];
            r[k].hash = lb_xxh64(buf, klen + 1 + nd, 0);
            r[k++].ep = (uint32_t)i;
        }
        free(buf);
    }
    qsort(r, k, sizeof(*r), ring_cmp);
    t->entries = r;
    t->size = k;
}

static void build_maglev(struct lb_table *t, const char *const *keys)
{
    const uint32_t m = LB_MAGLEV_SIZE;
    uint32_t *table = xmalloc(sizeof(uint32_t) * m);
    uint64_t *offset = xcalloc(t->n, sizeof(uint64_t));
    uint64_t *skip = xcalloc(t->n, sizeof(uint64_t));
    uint64_t *next = xcalloc(t->n, sizeof(uint64_t));
    for (uint32_t i = 0; i < m; i++)
        table[i] = UINT32_MAX;
    for (size_t i = 0; i < t->n; i++) {
        size_t len = strlen(keys[i]);
        offset[i] = lb_xxh64(keys[i], len, 0) % m;
        skip[i] = lb_xxh64(keys[i], len, 1) % (m - 1) + 1;
    }
    /* Each endpoint in turn takes the next free slot of its permutation (offset + j * skip)
     * mod m until every slot is taken: the endpoints get equal shares, and removing one
     * moves mostly its own slots. */
    for (uint32_t filled = 0;;) {
        for (size_t i = 0; i < t->n; i++) {
            uint64_t c = (offset[i] + next[i] * skip[i]) % m;
            while (table[c] != UINT32_MAX) {
                next[i]++;
                c = (offset[i] + next[i] * skip[i]) % m;
            }
            table[c] = (uint32_t)i;
            next[i]++;
            if (++filled == m)
                goto out;
        }
    }
out:
    free(offset);
    free(skip);
    free(next);
    t->entries = table;
    t->size = m;
}

struct lb_table *lb_table_new(enum dec_lb_policy p, uint32_t ring_min, uint32_t ring_max,
                              const char *const *keys, size_t n)
{
    if (!lb_policy_hashed(p) || n == 0 || n >= (1u << 31))
        return NULL;
    struct lb_table *t = xcalloc(1, sizeof(*t));
    t->policy = p;
    t->n = n;
    if (p == DEC_LB_RING_HASH)
        build_ring(t, ring_min, ring_max, keys);
    else
        build_maglev(t, keys);
    return t;
}

void lb_table_free(struct lb_table *t)
{
    if (t == NULL)
        return;
    free(t->entries);
    free(t);
}

size_t lb_table_size(const struct lb_table *t)
{
    return t->size;
}

size_t lb_table_pick(const struct lb_table *t, uint64_t hash, const unsigned char *skip)
{
    size_t at;
    if (t->policy == DEC_LB_RING_HASH) {
        /* The first entry whose hash is at or after <hash>, wrapping to the start. */
        const struct ring_entry *r = t->entries;
        size_t lo = 0, hi = t->size;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (r[mid].hash < hash)
                lo = mid + 1;
            else
                hi = mid;
        }
        at = lo == t->size ? 0 : lo;
        for (size_t k = 0; k < t->size; k++) {
            uint32_t ep = r[(at + k) % t->size].ep;
            if (skip == NULL || !skip[ep])
                return ep;
        }
        return t->n;
    }
    const uint32_t *table = t->entries;
    at = (size_t)(hash % t->size);
    for (size_t k = 0; k < t->size; k++) {
        uint32_t ep = table[(at + k) % t->size];
        if (skip == NULL || !skip[ep])
            return ep;
    }
    return t->n;
}

/* ---- choosing ---- */

/* The <k>th (from 0) endpoint of <n> whose skip flag is clear. */
static size_t nth_left(const unsigned char *skip, size_t n, size_t k)
{
    for (size_t i = 0; i < n; i++)
        if ((skip == NULL || !skip[i]) && k-- == 0)
            return i;
    return 0;
}

static size_t uniform(const unsigned char *skip, size_t n, uint64_t (*rnd)(void))
{
    size_t left = 0;
    for (size_t i = 0; i < n; i++)
        left += skip == NULL || !skip[i];
    if (left == 0)
        return 0;
    return nth_left(skip, n, (size_t)(rnd() % left));
}

size_t lb_choose(const struct dec_load_balancer *lb, const struct lb_table *t, struct lb_state *st,
                 const unsigned char *skip, size_t n, int hashed, uint64_t hash,
                 uint64_t (*rnd)(void))
{
    enum dec_lb_policy p = lb != NULL ? lb->policy : DEC_LB_DEFAULT;
    switch (p) {
    case DEC_LB_ROUND_ROBIN:
        if (st == NULL || st->n != n)
            break;
        for (size_t k = 0; k < n; k++) {
            size_t i = (size_t)(st->rr++ % n);
            if (skip == NULL || !skip[i])
                return i;
        }
        return 0;
    case DEC_LB_LEAST_REQUEST: {
        if (st == NULL || st->n != n || st->active == NULL)
            break;
        uint32_t c = lb->choice_count ? lb->choice_count : LB_CHOICE_DEFAULT;
        if (c > LB_CHOICE_MAX)
            c = LB_CHOICE_MAX;
        size_t best = uniform(skip, n, rnd);
        for (uint32_t k = 1; k < c; k++) {
            size_t i = uniform(skip, n, rnd);
            if (st->active[i] < st->active[best])
                best = i;
        }
        return best;
    }
    case DEC_LB_RING_HASH:
    case DEC_LB_MAGLEV:
        if (hashed && t != NULL && t->n == n) {
            size_t i = lb_table_pick(t, hash, skip);
            if (i < n)
                return i;
        }
        break;
    default:
        break;
    }
    return uniform(skip, n, rnd);
}

/* ---- the request's hash ---- */

static int name_is(struct http_slice s, const char *name)
{
    size_t len = strlen(name);
    return s.len == len && strncasecmp(s.p, name, len) == 0;
}

static int slice_cmp(const void *a, const void *b)
{
    const struct http_slice *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = n ? memcmp(x->p, y->p, n) : 0;
    if (c != 0)
        return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

/* Envoy's header policy: the values of every field of that name, sorted, hashed as one. */
static int hash_header(const struct lb_req *rq, const char *name, uint64_t *h)
{
    size_t n = 0, total = 0;
    for (size_t i = 0; i < rq->nheaders; i++)
        n += !(rq->headers[i].flags & HTTP_HDR_DROP) && name_is(rq->headers[i].name, name);
    if (n == 0)
        return 0;
    struct http_slice *v = xcalloc(n, sizeof(*v));
    size_t k = 0;
    for (size_t i = 0; i < rq->nheaders; i++)
        if (!(rq->headers[i].flags & HTTP_HDR_DROP) && name_is(rq->headers[i].name, name)) {
            v[k++] = rq->headers[i].value;
            total += rq->headers[i].value.len;
        }
    if (n == 1) {
        *h = lb_xxh64(v[0].p, v[0].len, 0);
    } else {
        qsort(v, n, sizeof(*v), slice_cmp);
        char *buf = xmalloc(total ? total : 1);
        size_t off = 0;
        for (size_t i = 0; i < n; i++) {
            if (v[i].len)
                memcpy(buf + off, v[i].p, v[i].len);
            off += v[i].len;
        }
        *h = lb_xxh64(buf, off, 0);
        free(buf);
    }
    free(v);
    return 1;
}

/* The value of the first cookie <name> in the Cookie fields, quotes removed; 0 when none. */
static int find_cookie(const struct lb_req *rq, const char *name, struct http_slice *out)
{
    size_t nlen = strlen(name);
    for (size_t i = 0; i < rq->nheaders; i++) {
        const struct http_header *hd = &rq->headers[i];
        if ((hd->flags & HTTP_HDR_DROP) || !name_is(hd->name, "cookie"))
            continue;
        const char *p = hd->value.p, *end = p + hd->value.len;
        while (p < end) {
            while (p < end && (*p == ' ' || *p == '\t' || *p == ';'))
                p++;
            const char *pair = p;
            while (p < end && *p != ';')
                p++;
            const char *eq = memchr(pair, '=', (size_t)(p - pair));
            if (eq == NULL || (size_t)(eq - pair) != nlen || memcmp(pair, name, nlen) != 0)
                continue;
            const char *v = eq + 1, *ve = p;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            if (ve - v >= 2 && v[0] == '"' && ve[-1] == '"') {
                v++;
                ve--;
            }
            *out = (struct http_slice){v, (size_t)(ve - v)};
            return 1;
        }
    }
    return 0;
}

/* The raw value of the first query parameter <name> ("a" alone has the value ""). */
static int find_param(struct http_slice q, const char *name, struct http_slice *out)
{
    size_t nlen = strlen(name);
    if (q.p == NULL)
        return 0;
    const char *p = q.p, *end = q.p + q.len;
    while (p < end) {
        const char *pair = p;
        while (p < end && *p != '&')
            p++;
        const char *eq = memchr(pair, '=', (size_t)(p - pair));
        const char *ne = eq != NULL ? eq : p;
        if ((size_t)(ne - pair) == nlen && memcmp(pair, name, nlen) == 0) {
            *out = eq != NULL ? (struct http_slice){eq + 1, (size_t)(p - eq - 1)}
                              : (struct http_slice){p, 0};
            return 1;
        }
        if (p < end)
            p++;
    }
    return 0;
}

int lb_request_hash(const struct dec_load_balancer *lb, const struct lb_req *rq, uint64_t *hash,
                    struct lb_set_cookie *sc)
{
    uint64_t acc = 0;
    int have = 0;
    if (sc != NULL)
        sc->policy = NULL;
    if (lb == NULL || !lb_policy_hashed(lb->policy))
        return 0;
    for (size_t i = 0; i < lb->n_hash; i++) {
        const struct dec_hash_policy *hp = &lb->hash[i];
        struct http_slice v;
        uint64_t h = 0;
        int got = 0;
        if (hp->source_ip) {
            if (rq->source_ip.len > 0) {
                h = lb_xxh64(rq->source_ip.p, rq->source_ip.len, 0);
                got = 1;
            }
        } else if (hp->field == DEC_HASH_HEADER) {
            got = hash_header(rq, hp->field_value, &h);
        } else if (hp->field == DEC_HASH_COOKIE) {
            if (find_cookie(rq, hp->field_value, &v) && v.len > 0) {
                h = lb_xxh64(v.p, v.len, 0);
                got = 1;
            } else if ((hp->cookie_ttl_ms > 0 || hp->cookie_session) && sc != NULL &&
                       sc->policy == NULL) {
                /* Envoy generates the value from the client connection's addresses, so that
                 * the requests of one connection racing for a cookie get the same one. */
                uint64_t g = lb_xxh64(rq->conn.p, rq->conn.len, 0);
                snprintf(sc->value, sizeof(sc->value), "%016llx", (unsigned long long)g);
                sc->policy = hp;
                h = lb_xxh64(sc->value, 16, 0);
                got = 1;
            }
        } else if (hp->field == DEC_HASH_QUERY_PARAMETER) {
            if (find_param(rq->query, hp->field_value, &v)) {
                h = lb_xxh64(v.p, v.len, 0);
                got = 1;
            }
        }
        if (got) {
            acc = have ? rotl(acc, 1) ^ h : h;
            have = 1;
        }
        if (hp->terminal && have)
            break;
    }
    if (have)
        *hash = acc;
    return have;
}

/* A cookie name is an RFC 6265 token; a path any visible ASCII but ';'. */
static int token_ok(const char *s, int path)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p <= 0x20 || *p >= 0x7f || *p == ';')
            return 0;
        if (!path && strchr("()<>@,:\\\"/[]?={}", *p) != NULL)
            return 0;
    }
    return 1;
}

int lb_set_cookie_format(const struct lb_set_cookie *sc, char *out, size_t len)
{
    const struct dec_hash_policy *hp = sc->policy;
    const char *path = hp->cookie_path != NULL ? hp->cookie_path : "";
    if (len > 0)
        out[0] = '\0';
    if (hp->field_value == NULL || hp->field_value[0] == '\0' || !token_ok(hp->field_value, 0) ||
        !token_ok(path, 1))
        return -EINVAL;
    char age[32] = "";
    if (!hp->cookie_session && hp->cookie_ttl_ms > 0)
        snprintf(age, sizeof(age), "; Max-Age=%lu",
                 (unsigned long)((hp->cookie_ttl_ms + 999) / 1000));
    int n = snprintf(out, len, "%s=\"%s\"%s%s%s; HttpOnly", hp->field_value, sc->value, age,
                     path[0] ? "; Path=" : "", path);
    if (n < 0 || (size_t)n >= len) {
        if (len > 0)
            out[0] = '\0';
        return -ENOSPC;
    }
    return n;
}
