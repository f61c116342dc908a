/*
 * log: format into a stack buffer, then one write(2) so lines from threads never interleave.
 */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_BYTES 2048

enum log_level log_min_level = LOG_LEVEL_INFO;
int log_json;

static _Thread_local int thread_worker = -1;

void log_set_thread_worker(int index)
{
    thread_worker = index;
}

static const char *const level_names[] = {"TRACE", "DEBUG", "INFO", "WARN", "ERROR"};

int log_parse_level(const char *s, enum log_level *out)
{
    for (unsigned i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    if (strcasecmp(s, "warning") == 0 || strcasecmp(s, "err") == 0) {
        *out = s[0] == 'w' || s[0] == 'W' ? LOG_LEVEL_WARN : LOG_LEVEL_ERROR;
        return 0;
    }
    return -EINVAL;
}

/* ---- bounded buffer ---- */

void log_buf_raw(struct log_buf *b, const char *s, size_t n)
{
    if (b->full || b->len + n >= b->cap) {
        b->full = 1;
        return;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void log_buf_printf(struct log_buf *b, const char *fmt, ...)
{
    if (b->full)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= b->cap - b->len) {
        b->full = 1;
        b->p[b->len] = '\0';
        return;
    }
    b->len += (size_t)n;
}

/* The two-byte escape of <c> shared by JSON and logfmt (\" \\ \n \r \t), or 0. */
static size_t esc_short(unsigned char c, char *out)
{
    char e = c == '"'    ? '"'
             : c == '\\' ? '\\'
             : c == '\n' ? 'n'
             : c == '\r' ? 'r'
             : c == '\t' ? 't'
                         : 0;
    if (e == 0)
        return 0;
    out[0] = '\\';
    out[1] = e;
    return 2;
}

/* Escapes one byte for a JSON string; returns the bytes written to <out> (at most 6). */
static size_t esc_json(unsigned char c, char *out)
{
    size_t n = esc_short(c, out);
    if (n != 0)
        return n;
    if (c < 0x20 || c >= 0x7f) {
        snprintf(out, 7, "\\u%04x", c);
        return 6;
    }
    out[0] = (char)c;
    return 1;
}

/* Escapes one byte for a quoted logfmt value; returns the bytes written (at most 4). */
static size_t esc_logfmt(unsigned char c, char *out)
{
    size_t n = esc_short(c, out);
    if (n != 0)
        return n;
    if (c < 0x20 || c >= 0x7f) {
        snprintf(out, 5, "\\x%02x", c);
        return 4;
    }
    out[0] = (char)c;
    return 1;
}

static void quoted(struct log_buf *b, const char *s, size_t (*esc)(unsigned char, char *))
{
    char tmp[8];
    size_t n = strnlen(s, LOG_VALUE_MAX);
    log_buf_raw(b, "\"", 1);
    for (size_t i = 0; i < n && !b->full; i++) {
        size_t k = esc((unsigned char)s[i], tmp);
        log_buf_raw(b, tmp, k);
    }
    log_buf_raw(b, "\"", 1);
}

void log_buf_json_str(struct log_buf *b, const char *s)
{
    if (s == NULL)
        log_buf_raw(b, "null", 4);
    else
        quoted(b, s, esc_json);
}

void log_buf_logfmt_val(struct log_buf *b, const char *s)
{
    if (s == NULL)
        return;
    size_t n = strnlen(s, LOG_VALUE_MAX);
    int bare = n > 0;
    for (size_t i = 0; i < n && bare; i++) {
        unsigned char c = (unsigned char)s[i];
        bare = c > 0x20 && c < 0x7f && c != '"' && c != '=' && c != '\\';
    }
    if (bare)
        log_buf_raw(b, s, n);
    else
        quoted(b, s, esc_logfmt);
}

void log_buf_time(struct log_buf *b, uint64_t unix_ms)
{
    time_t sec = (time_t)(unix_ms / 1000);
    struct tm tm;
    gmtime_r(&sec, &tm);
    log_buf_printf(b, "%04d-%02d-%02dT%02d:%02d:%02d.%03uZ", tm.tm_year + 1900, tm.tm_mon + 1,
                   tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (unsigned)(unix_ms % 1000));
}

const char *log_esc(char *buf, size_t size, const char *s)
{
    if (size == 0)
        return "";
    struct log_buf b = {buf, 0, size, 0};
    buf[0] = '\0';
    if (s == NULL)
        log_buf_raw(&b, "-", 1);
    else
        log_buf_logfmt_val(&b, s);
    if (b.full) {
        /* Only a buffer under LOG_ESC_BYTES gets here: keep what fits, still one value. */
        b.full = 0;
        b.len = b.len < size - 1 ? b.len : size - 1;
        buf[b.len] = '\0';
    }
    return buf;
}

/* ---- rate limit ---- */

void log_limit_init(struct log_limit *l, uint32_t window_ms)
{
    memset(l, 0, sizeof(*l));
    l->window_ms = window_ms != 0 ? window_ms : 1;
    snprintf(l->other.key, sizeof(l->other.key), "other");
}

/* Opens <e>'s window at <now_ms>: its line is written; returns 1 for log_limit_pass. */
static int open_window(struct log_limit_slot *e, uint64_t now_ms, uint64_t *before)
{
    if (before != NULL)
        *before = e->suppressed;
    e->since_ms = now_ms;
    e->suppressed = 0;
    return 1;
}

int log_limit_pass(struct log_limit *l, const char *key, uint64_t now_ms, uint64_t *before)
{
    char k[LOG_LIMIT_KEY_MAX];
    snprintf(k, sizeof(k), "%s", key);
    if (before != NULL)
        *before = 0;
    struct log_limit_slot *e = NULL;
    for (size_t i = 0; i < l->n && e == NULL; i++)
        if (strcmp(l->slot[i].key, k) == 0)
            e = &l->slot[i];
    if (e == NULL && l->n < LOG_LIMIT_KEYS) {
        e = &l->slot[l->n++];
        memcpy(e->key, k, sizeof(k));
        e->suppressed = 0;
        return open_window(e, now_ms, before);
    }
    if (e == NULL) {
        e = &l->other;
        if (e->since_ms == 0)
            return open_window(e, now_ms, before);
    }
    if (now_ms - e->since_ms >= l->window_ms)
        return open_window(e, now_ms, before);
    e->suppressed++;
    return 0;
}

uint64_t log_limit_flush(struct log_limit *l, uint64_t now_ms,
                         void (*report)(void *arg, const char *key, uint64_t suppressed,
                                        uint64_t open_ms),
                         void *arg)
{
    uint64_t next = 0;
    for (size_t i = 0; i <= l->n;) {
        int other = i == l->n;
        struct log_limit_slot *e = other ? &l->other : &l->slot[i];
        if (other && e->since_ms == 0)
            break;
        uint64_t open_ms = now_ms - e->since_ms;
        if (open_ms < l->window_ms) {
            uint64_t left = l->window_ms - open_ms;
            next = next == 0 || left < next ? left : next;
            i++;
            continue;
        }
        if (e->suppressed != 0 && report != NULL)
            report(arg, e->key, e->suppressed, open_ms);
        e->suppressed = 0;
        if (other) {
            e->since_ms = 0;
            break;
        }
        /* Forget the key: the last slot takes its place (and is looked at next). */
        l->slot[i] = l->slot[--l->n];
    }
    return next;
}

/* ---- lines ---- */

/*
 * The number after <key> at the start of <msg> or after a space, or -1. Matches inside a
 * quoted value (LOG_ESC) do not count: a peer's string must not name the connection.
 */
static long long number_after(const char *msg, const char *key)
{
    size_t kl = strlen(key);
    int quoted = 0;
    for (const char *p = msg; *p != '\0'; p++) {
        if (quoted && *p == '\\' && p[1] != '\0') {
            p++;
        } else if (*p == '"') {
            quoted = !quoted;
        } else if (!quoted && (p == msg || p[-1] == ' ') && strncmp(p, key, kl) == 0 &&
                   p[kl] >= '0' && p[kl] <= '9') {
            return strtoll(p + kl, NULL, 10);
        }
    }
    return -1;
}

/*
 * Appends <n> bytes of a text-form message with every control character and byte outside
 * ASCII as \xNN, so no argument can end the line early or smuggle terminal escapes.
 */
static void text_msg(struct log_buf *b, const char *msg, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n && !b->full; i++) {
        unsigned char c = (unsigned char)msg[i];
        if (c >= 0x20 && c < 0x7f) {
            log_buf_raw(b, (const char *)&msg[i], 1);
        } else {
            char e[4] = {'\\', 'x', hex[c >> 4], hex[c & 15]};
            log_buf_raw(b, e, sizeof(e));
        }
    }
}

void log_write(enum log_level level, const char *fmt, ...)
{
    /* Escaping grows a byte to at most 6, so the JSON form of any message fits. */
    char msg[LINE_MAX_BYTES], line[LINE_MAX_BYTES * 6 + 256];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t now_ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (m < 0)
        msg[0] = '\0';

    struct log_buf b = {line, 0, sizeof(line) - 1, 0};
    line[0] = '\0';
    if (log_json) {
        log_buf_raw(&b, "{\"time\":\"", 9);
        log_buf_time(&b, now_ms);
        log_buf_printf(&b, "\",\"level\":\"%s\",\"msg\":", level_names[level]);
        /* The message is cut to LOG_VALUE_MAX bytes per chunk; emit it in chunks so long
         * messages survive whole while each chunk stays bounded. */
        size_t n = strlen(msg);
        log_buf_raw(&b, "\"", 1);
        for (size_t off = 0; off < n; off += LOG_VALUE_MAX) {
            char chunk[LOG_VALUE_MAX + 1];
            size_t k = n - off < LOG_VALUE_MAX ? n - off : LOG_VALUE_MAX;
            memcpy(chunk, msg + off, k);
            chunk[k] = '\0';
            struct log_buf q = {b.p + b.len, 0, b.cap - b.len, 0};
            log_buf_json_str(&q, chunk);
            if (q.full || q.len < 2)
                break;
            /* Drop the chunk's own quotes: shift it left over the opening one. */
            memmove(b.p + b.len, b.p + b.len + 1, q.len - 2);
            b.len += q.len - 2;
        }
        log_buf_raw(&b, "\"", 1);
        long long conn = number_after(msg, "conn=");
        long long worker = number_after(msg, "worker ");
        if (worker < 0)
            worker = number_after(msg, "worker=");
        if (worker < 0)
            worker = thread_worker;
        if (conn >= 0)
            log_buf_printf(&b, ",\"conn\":%lld", conn);
        if (worker >= 0)
            log_buf_printf(&b, ",\"worker\":%lld", worker);
        log_buf_raw(&b, "}", 1);
    } else {
        log_buf_time(&b, now_ms);
        log_buf_printf(&b, " [%s] ", level_names[level]);
        /* Escaping grows a byte to at most 4, so the whole message always fits. */
        text_msg(&b, msg, strlen(msg));
    }
    line[b.len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, b.len);
    (void)w;
}
