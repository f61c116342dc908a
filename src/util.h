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
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
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

/* Returns a random 64-bit value (not for cryptography: jitter and balancing only). */
uint64_t util_rand(void);

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b)     ((a) < (b) ? (a) : (b))
#define MAX(a, b)     ((a) > (b) ? (a) : (b))

#endif
