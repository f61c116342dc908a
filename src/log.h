/*
 * log: leveled logging to stderr, one line per call, safe from any thread.
 *
 * Use the LOG_* macros: they check the level before any argument is formatted. Lines about a
 * connection start with its id ("conn=12 in ...") so every line can be traced to one session;
 * lines about a worker say "worker N". With log_json set each line is one JSON object
 * {"time","level","msg"} plus "conn" and "worker" taken from those prefixes when present.
 * Never pass private keys or tokens to these functions.
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

#endif
