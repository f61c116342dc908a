/*
 * log: leveled logging to stderr, one line per call, safe from any thread.
 *
 * Use the LOG_* macros: they check the level before any argument is formatted. Lines about a
 * connection start with its id ("conn=12 in ...") so every line can be traced to one session;
 * lines about a worker say "worker N". With log_json set each line is one JSON object
 * {"time","level","msg"} plus "conn" and "worker" taken from those prefixes when present.
 * Never pass private keys or tokens to these functions.
 *
 * One call is always one line, whatever its arguments hold: the JSON form escapes the whole
 * message, and the text form writes every control character and byte outside ASCII as \xNN.
 * A value a peer or the agent chose (a certificate's URI, a name, an error body) goes through
 * LOG_ESC() as well, which also quotes it when it holds spaces, quotes or '=', so that it can
 * neither end the line nor pose as another key=value of it.
 *
 * The bounded-buffer escaping helpers below are shared with the access log (alog.h).
 */
#ifndef CONNECTD_LOG_H
#define CONNECTD_LOG_H

#include <stddef.h>
#include <stdint.h>

enum log_level {
    LOG_LEVEL_TRACE = 0,
    LOG_LEVEL_DEBUG,
    LOG_LEVEL_INFO,
    LOG_LEVEL_WARN,
    LOG_LEVEL_ERROR,
};

extern enum log_level log_min_level;
/* Non-zero: write each line as a JSON object (-log-json). Set before any thread starts. */
extern int log_json;

/* Names the calling thread's worker number, added to its JSON lines that do not name one. */
void log_set_thread_worker(int index);

/* Parses "trace|debug|info|warn|error" (any case). 0 or -EINVAL. */
int log_parse_level(const char *s, enum log_level *out);

/* Writes one line with a timestamp and level. Use the macros below instead. */
void log_write(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define LOG_AT(lvl, ...)                                                                           \
    do {                                                                                           \
        if ((lvl) >= log_min_level)                                                                \
            log_write((lvl), __VA_ARGS__);                                                         \
    } while (0)
#define LOG_TRACE(...) LOG_AT(LOG_LEVEL_TRACE, __VA_ARGS__)
#define LOG_DEBUG(...) LOG_AT(LOG_LEVEL_DEBUG, __VA_ARGS__)
#define LOG_INFO(...)  LOG_AT(LOG_LEVEL_INFO, __VA_ARGS__)
#define LOG_WARN(...)  LOG_AT(LOG_LEVEL_WARN, __VA_ARGS__)
#define LOG_ERROR(...) LOG_AT(LOG_LEVEL_ERROR, __VA_ARGS__)

/*
 * A bounded output buffer: appends never write past <cap> - 1 bytes and set <full> when
 * something did not fit, so a line stays well-formed as long as callers bound each value
 * (see LOG_VALUE_MAX). <p> is the caller's memory.
 */
struct log_buf {
    char *p;
    size_t len, cap;
    int full;
};

/* Longest value, in input bytes, the escaping appends write; the rest is cut off. */
#define LOG_VALUE_MAX 512

/* Appends <n> raw bytes, or nothing and sets <full> when they do not fit. */
void log_buf_raw(struct log_buf *b, const char *s, size_t n);
/* Appends printf output, or nothing and sets <full> when it does not fit. */
void log_buf_printf(struct log_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/*
 * Appends <s> (at most LOG_VALUE_MAX bytes of it) as a quoted JSON string: '"' and '\\'
 * escaped, control characters as \n, \t, \r or \u00XX, and bytes outside ASCII as \u00XX,
 * so the output is always ASCII and valid JSON. NULL is written as null.
 */
void log_buf_json_str(struct log_buf *b, const char *s);
/*
 * Appends <s> (at most LOG_VALUE_MAX bytes) as a logfmt value: bare when it is non-empty and
 * has only printable ASCII other than space, '"', '=' and '\\'; else quoted with '"' and '\\'
 * escaped, \n, \t, \r, and other bytes as \xXX. NULL is written as an empty value.
 */
void log_buf_logfmt_val(struct log_buf *b, const char *s);
/* Appends an RFC 3339 UTC time with milliseconds, e.g. 2026-11-23T13:20:37.123Z. */
void log_buf_time(struct log_buf *b, uint64_t unix_ms);

/* Room for any value LOG_ESC writes: LOG_VALUE_MAX bytes of at most 4 each, quotes, NUL. */
#define LOG_ESC_BYTES (LOG_VALUE_MAX * 4 + 3)

/*
 * Writes <s> into <buf> (<size> bytes, at least LOG_ESC_BYTES to hold every value whole) as a
 * logfmt value (log_buf_logfmt_val): bare when it is harmless, else quoted and escaped; "-" for
 * NULL. Returns <buf>, always NUL-terminated.
 */
const char *log_esc(char *buf, size_t size, const char *s);

/*
 * log_esc() into a buffer that lives until the end of the enclosing block, for use as a "%s"
 * argument of the LOG_* macros: LOG_WARN("peer %s", LOG_ESC(uri)). Inside those macros it is
 * evaluated only when the level is enabled.
 */
#define LOG_ESC(s) log_esc((char[LOG_ESC_BYTES]){0}, LOG_ESC_BYTES, (s))

/*
 * A rate limit for lines about many sources (such as failed handshakes, per peer address):
 * the first line about a key is written, the ones that follow within <window_ms> are only
 * counted, and the count is reported when the window ends, so a flood from one source costs a
 * couple of lines a second while every other source still gets its first line at once. It
 * tracks LOG_LIMIT_KEYS keys; keys beyond that share one more window under the key "other".
 * Pure: the caller supplies the time and writes the lines. Not thread-safe (one per thread).
 */
#define LOG_LIMIT_KEYS    64
#define LOG_LIMIT_KEY_MAX 64

struct log_limit_slot {
    char key[LOG_LIMIT_KEY_MAX];
    uint64_t since_ms;   /* when this key's window opened (its first line was written) */
    uint64_t suppressed; /* lines counted and not written since then */
};

struct log_limit {
    uint32_t window_ms;
    size_t n;
    struct log_limit_slot slot[LOG_LIMIT_KEYS];
    struct log_limit_slot other; /* keys that found no slot; open when since_ms != 0 */
};

/* A limiter with no open window. <window_ms> must not be 0. */
void log_limit_init(struct log_limit *l, uint32_t window_ms);

/*
 * Decides about one line on <key> (cut to LOG_LIMIT_KEY_MAX - 1 bytes) at <now_ms> (a
 * monotonic clock, never 0). Returns 1 when it should be written, 0 when it was counted
 * instead. When a window of the key ended with lines counted and not reported yet, *<before>
 * (may be NULL) receives that count, which the written line should mention; else 0.
 */
int log_limit_pass(struct log_limit *l, const char *key, uint64_t now_ms, uint64_t *before);

/*
 * Ends every window that is over at <now_ms>: calls <report> for each that counted lines
 * (with its key, the count and how long the window was open) and forgets the key. Returns the
 * milliseconds until the next open window ends (at least 1), or 0 when none is open: the
 * caller's timer runs while this is non-zero.
 */
uint64_t log_limit_flush(struct log_limit *l, uint64_t now_ms,
                         void (*report)(void *arg, const char *key, uint64_t suppressed,
                                        uint64_t open_ms),
                         void *arg);

#endif
