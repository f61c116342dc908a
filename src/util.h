/*
 * util: allocation wrappers that abort on OOM, the project error table, small helpers.
 *
 * This is the lowest layer: it includes only libc headers and may be used by every module.
 */
#ifndef CONNECTD_UTIL_H
#define CONNECTD_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <errno.h>

/*
 * Project error codes. Fallible functions return 0, -errno, or one of these (all below
 * -ERR_BASE so they never collide with errno values). util_strerror() maps either kind
 * to a message.
 */
#define ERR_BASE 10000
#define ERR_MAP(X)                                                                                 \
    X(BAD_JSON, "malformed JSON")                                                                  \
    X(BAD_FIELD, "missing or invalid field")                                                       \
    X(TOO_BIG, "response body too large")                                                          \
    X(HTTP_STATUS, "unexpected HTTP status")                                                       \
    X(TLS, "TLS failure")                                                                          \
    X(BAD_CERT, "bad certificate or key")                                                          \
    X(NO_URI, "peer certificate has no URI SAN")                                                   \
    X(BAD_SPIFFE, "not a SPIFFE service identity")                                                 \
    X(TRUST_DOMAIN, "trust domain mismatch")                                                       \
    X(WRONG_PEER, "peer identity does not match the expected service")                             \
    X(DENIED, "denied by intentions")                                                              \
    X(NO_ENDPOINT, "no healthy endpoint")                                                          \
    X(TIMEOUT, "timed out")                                                                        \
    X(BAD_CONFIG, "bad configuration")                                                             \
    X(SHUTDOWN, "shutting down")

enum util_err_index {
#define X(name, msg) ERR_IDX_##name,
    ERR_MAP(X)
#undef X
        ERR_IDX_COUNT_
};

enum util_err {
#define X(name, msg) ERR_##name = -(ERR_BASE + ERR_IDX_##name),
    ERR_MAP(X)
#undef X
};

/* Returns a static message for 0, a negative errno or a negative project code. */
const char *util_strerror(int err);

/* Allocation: these never return NULL; they abort the process when memory runs out. */
void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t size);
void *xrealloc(void *p, size_t n);
/*
 * A zeroed block for a big table of which little is ever written (the per-source slots of a
 * limit): it is mapped, not taken from the heap, so a page costs memory only once something
 * writes to it, where calloc() may clear (and so make resident) all of it. Released with
 * xfree_pages() and its size.
 */
void *xcalloc_pages(size_t n);
void xfree_pages(void *p, size_t n);
/*
 * Gives the allocator's free pages back to the system (glibc's malloc_trim(0)); any thread.
 * Nothing under AddressSanitizer, whose allocator is not glibc's: there malloc_trim() would
 * set up glibc's unused heap on first call, and two threads doing that at once crashed.
 */
void util_trim_heap(void);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
/* xstrndup() with ASCII letters lowered (for case-insensitive matching); NUL bytes are kept. */
char *xstrndup_lower(const char *s, size_t n);
/* <c> with an ASCII capital lowered. */
static inline char util_ascii_lower(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}
/*
 * Wiping: memory that held key or token bytes is overwritten before it goes back to the heap,
 * so neither a later read of the process's memory nor a core dump finds stale copies.
 * util_wipe() is explicit_bzero (never optimised away). util_wipe_free() wipes <n> bytes of <p>
 * (may be NULL) and frees it. util_wipe_free_block() wipes the whole usable size of a block
 * from malloc (NULL is a no-op): it is the free function given to libraries (libcurl, jansson)
 * whose frees carry no size. util_wipe_realloc() grows or shrinks <p> by allocate, copy, wipe
 * and free, never by realloc(), which can leave a stale copy behind when it moves a block; it
 * never returns NULL for n > 0 (OOM aborts), and returns NULL after freeing <p> for n == 0.
 */
void util_wipe(void *p, size_t n);
void util_wipe_free(void *p, size_t n);
void util_wipe_free_block(void *p);
void *util_wipe_realloc(void *p, size_t n);

/*
 * A 128-bit keyed digest (SipHash-2-4-128) under a key drawn once per process from getrandom:
 * for telling whether two byte strings differ without keeping either (a collision, even one an
 * adversary aims for, is out of reach without the key). Thread-safe. util_siphash128() is the
 * same with a caller's key, for tests against the reference vectors.
 */
struct util_digest {
    uint64_t h[2];
};
void util_digest(const void *p, size_t n, struct util_digest *out);
void util_siphash128(const uint8_t key[16], const void *p, size_t n, uint8_t out[16]);

/*
 * FNV-1a (64-bit) of the NUL-terminated <s>, never 0 (so 0 can mark a free slot): a cheap,
 * unkeyed hash for bounded in-memory tables, not for anything an adversary's collisions could
 * make unbounded.
 */
uint64_t util_hash_str(const char *s);

/* printf into a fresh allocation (never NULL). */
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Writes <s> as troff text: backslashes and dashes escaped, a leading '.' or '\'' guarded. */
void util_fput_troff(FILE *f, const char *s);

/* Monotonic clock in milliseconds. */
uint64_t util_now_ms(void);
/* Wall clock (CLOCK_REALTIME) in Unix milliseconds, for timestamps. */
uint64_t util_wall_ms(void);

/* Parses a decimal integer in [min, max]; returns 0 or -EINVAL. Rejects trailing junk. */
int util_parse_int(const char *s, long min, long max, long *out);
/* The same in <base> (8 for file modes such as "0600"). */
int util_parse_int_base(const char *s, int base, long min, long max, long *out);

/* Parses "host:port", "[v6]:port" into host (caller-owned buffer) and port. 0 or -EINVAL. */
int util_split_hostport(const char *s, char *host, size_t host_len, int *port);

/* The value of hexadecimal digit <c>, or -1. */
int util_hexval(char c);

/* Percent-encodes everything in <s> but RFC 3986 unreserved characters (fresh allocation). */
char *util_url_escape(const char *s);
/*
 * The same into <buf> (<len> > 0 bytes, always NUL-terminated): stops before the character
 * that might not fit with its terminator. Returns the length written.
 */
size_t util_url_escape_buf(char *buf, size_t len, const char *s);

/* Returns a random 64-bit value (not for cryptography: jitter and balancing only). */
uint64_t util_rand(void);

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b)     ((a) < (b) ? (a) : (b))
#define MAX(a, b)     ((a) > (b) ? (a) : (b))

#endif
