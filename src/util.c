/*
 * util: allocation wrappers, the error table and small parsing helpers.
 */
#include "util.h"

#include <malloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/random.h>

static const char *const err_msgs[] = {
#define X(name, msg) msg,
    ERR_MAP(X)
#undef X
};

const char *util_strerror(int err)
{
    if (err == 0)
        return "ok";
    if (err <= -ERR_BASE && err > -(ERR_BASE + ERR_IDX_COUNT_))
        return err_msgs[-err - ERR_BASE];
    return strerror(-err);
}

static void oom(size_t n)
{
    fprintf(stderr, "connectd: out of memory allocating %zu bytes\n", n);
    abort();
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        oom(n);
    return p;
}

void *xcalloc(size_t nmemb, size_t size)
{
    void *p = calloc(nmemb ? nmemb : 1, size ? size : 1);
    if (p == NULL)
        oom(nmemb * size);
    return p;
}

void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (p == NULL)
        oom(n);
    return p;
}

void *xcalloc_pages(size_t n)
{
    void *p = mmap(NULL, n ? n : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        oom(n);
    return p;
}

void xfree_pages(void *p, size_t n)
{
    if (p != NULL)
        (void)munmap(p, n ? n : 1);
}

#if defined(__SANITIZE_ADDRESS__) /* GCC */
#define UTIL_ASAN 1
#elif defined(__has_feature) /* clang */
#if __has_feature(address_sanitizer)
#define UTIL_ASAN 1
#endif
#endif

void util_trim_heap(void)
{
#if defined(__GLIBC__) && !defined(UTIL_ASAN)
    (void)malloc_trim(0);
#endif
}

void util_wipe(void *p, size_t n)
{
    if (p != NULL && n > 0)
        explicit_bzero(p, n);
}

void util_wipe_free(void *p, size_t n)
{
    util_wipe(p, n);
    free(p);
}

void util_wipe_free_block(void *p)
{
    if (p == NULL)
        return;
    /* The usable size covers at least what was asked for; under ASan it is exactly that. */
    explicit_bzero(p, malloc_usable_size(p));
    free(p);
}

void *util_wipe_realloc(void *p, size_t n)
{
    if (n == 0) {
        util_wipe_free_block(p);
        return NULL;
    }
    void *q = xmalloc(n);
    if (p != NULL) {
        size_t old = malloc_usable_size(p);
        memcpy(q, p, MIN(old, n));
        util_wipe_free_block(p);
    }
    return q;
}

/* ---- SipHash-2-4 with 128-bit output (Aumasson and Bernstein's reference, outlen 16) ---- */

#define ROTL64(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

static uint64_t load64_le(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static void store64_le(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void sip_rounds(uint64_t v[4], int n)
{
    for (int i = 0; i < n; i++) {
        v[0] += v[1];
        v[1] = ROTL64(v[1], 13);
        v[1] ^= v[0];
        v[0] = ROTL64(v[0], 32);
        v[2] += v[3];
        v[3] = ROTL64(v[3], 16);
        v[3] ^= v[2];
        v[0] += v[3];
        v[3] = ROTL64(v[3], 21);
        v[3] ^= v[0];
        v[2] += v[1];
        v[1] = ROTL64(v[1], 17);
        v[1] ^= v[2];
        v[2] = ROTL64(v[2], 32);
    }
}

void util_siphash128(const uint8_t key[16], const void *p, size_t n, uint8_t out[16])
{
    const uint8_t *in = p;
    uint64_t k0 = load64_le(key), k1 = load64_le(key + 8);
    uint64_t v[4] = {0x736f6d6570736575ull ^ k0, 0x646f72616e646f6dull ^ k1,
                     0x6c7967656e657261ull ^ k0, 0x7465646279746573ull ^ k1};
    v[1] ^= 0xee;
    size_t full = n - n % 8;
    for (size_t i = 0; i < full; i += 8) {
        uint64_t m = load64_le(in + i);
        v[3] ^= m;
        sip_rounds(v, 2);
        v[0] ^= m;
    }
    uint64_t b = (uint64_t)n << 56;
    for (size_t i = 0; i < n % 8; i++)
        b |= (uint64_t)in[full + i] << (8 * i);
    v[3] ^= b;
    sip_rounds(v, 2);
    v[0] ^= b;
    v[2] ^= 0xee;
    sip_rounds(v, 4);
    store64_le(out, v[0] ^ v[1] ^ v[2] ^ v[3]);
    v[1] ^= 0xdd;
    sip_rounds(v, 4);
    store64_le(out + 8, v[0] ^ v[1] ^ v[2] ^ v[3]);
}

static pthread_once_t digest_once = PTHREAD_ONCE_INIT;
static uint8_t digest_key[16];

static void digest_key_init(void)
{
    if (getrandom(digest_key, sizeof(digest_key), 0) != (ssize_t)sizeof(digest_key)) {
        /* No entropy yet: a weaker key still tells accidental changes apart. */
        uint64_t a = util_rand(), b = util_rand();
        store64_le(digest_key, a);
        store64_le(digest_key + 8, b);
    }
}

uint64_t util_hash_str(const char *s)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++)
        h = (h ^ *p) * UINT64_C(1099511628211);
    return h != 0 ? h : 1;
}

void util_digest(const void *p, size_t n, struct util_digest *out)
{
    uint8_t d[16];
    pthread_once(&digest_once, digest_key_init);
    util_siphash128(digest_key, p, n, d);
    out->h[0] = load64_le(d);
    out->h[1] = load64_le(d + 8);
}

char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

char *xstrndup(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

char *xstrndup_lower(const char *s, size_t n)
{
    char *p = xstrndup(s, n);
    for (size_t i = 0; i < n; i++)
        p[i] = util_ascii_lower(p[i]);
    return p;
}

char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        oom(0);
    char *p = xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(p, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return p;
}

uint64_t util_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

uint64_t util_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int util_parse_int(const char *s, long min, long max, long *out)
{
    return util_parse_int_base(s, 10, min, max, out);
}

int util_parse_int_base(const char *s, int base, long min, long max, long *out)
{
    char *end;
    if (s == NULL || *s == '\0')
        return -EINVAL;
    errno = 0;
    long v = strtol(s, &end, base);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return -EINVAL;
    *out = v;
    return 0;
}

int util_split_hostport(const char *s, char *host, size_t host_len, int *port)
{
    const char *colon, *h = s;
    size_t hl;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (close == NULL || close[1] != ':')
            return -EINVAL;
        h = s + 1;
        hl = (size_t)(close - h);
        colon = close + 1;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL)
            return -EINVAL;
        hl = (size_t)(colon - s);
    }
    if (hl >= host_len)
        return -EINVAL;
    long p;
    if (util_parse_int(colon + 1, 0, 65535, &p) != 0)
        return -EINVAL;
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port = (int)p;
    return 0;
}

int util_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

size_t util_url_escape_buf(char *buf, size_t len, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;
    for (; *s != '\0' && n + 4 < len; s++) {
        unsigned char c = (unsigned char)*s;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '-' || c == '.' || c == '_' || c == '~') {
            buf[n++] = (char)c;
        } else {
            buf[n++] = '%';
            buf[n++] = hex[c >> 4];
            buf[n++] = hex[c & 15];
        }
    }
    buf[n] = '\0';
    return n;
}

char *util_url_escape(const char *s)
{
    size_t len = strlen(s) * 3 + 4; /* every byte escaped, and the bound's slack */
    char *out = xmalloc(len);
    util_url_escape_buf(out, len, s);
    return out;
}

uint64_t util_rand(void)
{
    static __thread uint64_t state;
    if (state == 0) {
        if (getrandom(&state, sizeof(state), 0) != sizeof(state) || state == 0)
            state = 0x9e3779b97f4a7c15ull ^ util_now_ms();
    }
    /* xorshift64* */
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545f4914f6cdd1dull;
}

void util_fput_troff(FILE *f, const char *s)
{
    if (*s == '.' || *s == '\'')
        fputs("\\&", f);
    for (; *s != '\0'; s++) {
        if (*s == '\\')
            fputs("\\e", f);
        else if (*s == '-')
            fputs("\\-", f);
        else
            fputc(*s, f);
    }
}
