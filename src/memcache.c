/*
 * memcache: per-thread lists of freed blocks by size class (memcache.h is the contract).
 *
 * A block is [struct hdr][payload]; the header holds the payload's capacity: a class's full
 * size (a multiple of CLASS_BYTES up to MEMCACHE_BLOCK_MAX), or the exact size asked for a
 * larger block, which malloc serves alone. A cached block's first bytes link it to the next
 * one of its class.
 */
#include "memcache.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* Under AddressSanitizer every block is really freed (a test may force either way). */
#ifndef MEMCACHE_PASSTHROUGH
#if defined(__SANITIZE_ADDRESS__)
#define MEMCACHE_PASSTHROUGH 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MEMCACHE_PASSTHROUGH 1
#endif
#endif
#endif
#ifndef MEMCACHE_PASSTHROUGH
#define MEMCACHE_PASSTHROUGH 0
#endif

#define CLASS_BYTES 64u
#define NCLASS      (MEMCACHE_BLOCK_MAX / CLASS_BYTES)

/* 16 bytes, so the payload keeps malloc's alignment. */
struct hdr {
    size_t cap;
    size_t unused;
};

struct free_block {
    struct free_block *next;
};

struct tcache {
    struct free_block *head[NCLASS];
    size_t bytes; /* cached, headers included */
};

static _Thread_local struct tcache tc;

static struct hdr *hdr_of(void *p)
{
    return (struct hdr *)p - 1;
}

void *memcache_alloc(size_t n)
{
    if (n > MEMCACHE_BLOCK_MAX) {
        struct hdr *h = xmalloc(sizeof(*h) + n);
        h->cap = n;
        return h + 1;
    }
    size_t c = n == 0 ? 0 : (n - 1) / CLASS_BYTES;
    struct free_block *b = tc.head[c];
    if (b != NULL) {
        tc.head[c] = b->next;
        tc.bytes -= sizeof(struct hdr) + (c + 1) * CLASS_BYTES;
        return b;
    }
    struct hdr *h = xmalloc(sizeof(*h) + (c + 1) * CLASS_BYTES);
    h->cap = (c + 1) * CLASS_BYTES;
    return h + 1;
}

void *memcache_calloc(size_t nmemb, size_t size)
{
    if (size != 0 && nmemb > SIZE_MAX / size)
        abort();
    void *p = memcache_alloc(nmemb * size);
    memset(p, 0, nmemb * size);
    return p;
}

void memcache_free(void *p)
{
    if (p == NULL)
        return;
    struct hdr *h = hdr_of(p);
    size_t total = sizeof(*h) + h->cap;
    if (MEMCACHE_PASSTHROUGH || h->cap > MEMCACHE_BLOCK_MAX ||
        tc.bytes + total > MEMCACHE_MAX_BYTES) {
        free(h);
        return;
    }
    size_t c = h->cap / CLASS_BYTES - 1;
    struct free_block *b = p;
    b->next = tc.head[c];
    tc.head[c] = b;
    tc.bytes += total;
}

void *memcache_realloc(void *p, size_t n)
{
    if (p == NULL)
        return memcache_alloc(n);
    struct hdr *h = hdr_of(p);
    if (n <= h->cap)
        return p;
    if (h->cap > MEMCACHE_BLOCK_MAX) {
        /* Both sizes are past the classes: malloc's realloc may grow it in place. */
        h = xrealloc(h, sizeof(*h) + n);
        h->cap = n;
        return h + 1;
    }
    void *q = memcache_alloc(n);
    memcpy(q, p, h->cap);
    memcache_free(p);
    return q;
}

void memcache_trim(void)
{
    for (size_t c = 0; c < NCLASS; c++) {
        while (tc.head[c] != NULL) {
            struct free_block *b = tc.head[c];
            tc.head[c] = b->next;
            free(hdr_of(b));
        }
    }
    tc.bytes = 0;
}

size_t memcache_cached_bytes(void)
{
    return tc.bytes;
}
