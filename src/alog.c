/*
 * alog: the access log. The descriptor lives in an atomic so a SIGHUP reopen can swap it
 * while workers write; the old descriptor is closed only after a grace period (a worker that
 * loaded it just before the swap finishes its one write first).
 */
#include "alog.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static _Atomic int alog_fd = -1;
static int alog_owned; /* the descriptor is a file we opened (not stderr) */
static enum alog_format alog_fmt;
static char alog_path[4096];

int alog_parse_format(const char *s, enum alog_format *out)
{
    if (strcmp(s, "json") == 0)
        *out = ALOG_JSON;
    else if (strcmp(s, "logfmt") == 0)
        *out = ALOG_LOGFMT;
    else
        return -EINVAL;
    return 0;
}

static void field_str(struct log_buf *b, enum alog_format fmt, const char *key, const char *v)
{
    if (fmt == ALOG_JSON) {
        log_buf_printf(b, ",\"%s\":", key);
        log_buf_json_str(b, v);
    } else {
        log_buf_printf(b, " %s=", key);
        log_buf_logfmt_val(b, v);
    }
}

static void field_u64(struct log_buf *b, enum alog_format fmt, const char *key, uint64_t v)
{
    log_buf_printf(b, fmt == ALOG_JSON ? ",\"%s\":%llu" : " %s=%llu", key, (unsigned long long)v);
}

size_t alog_format_line(char *buf, size_t cap, enum alog_format fmt, const struct alog_rec *r)
{
    struct log_buf b = {buf, 0, cap - 1, 0}; /* keeps one byte for the newline */
    buf[0] = '\0';
    log_buf_raw(&b, fmt == ALOG_JSON ? "{\"time\":\"" : "time=", fmt == ALOG_JSON ? 9 : 5);
    log_buf_time(&b, r->time_ms);
    if (fmt == ALOG_JSON)
        log_buf_raw(&b, "\"", 1);
    field_str(&b, fmt, "direction", r->direction);
    field_str(&b, fmt, "source", r->source);
    field_str(&b, fmt, "destination", r->destination);
    field_str(&b, fmt, "upstream", r->upstream);
    field_str(&b, fmt, "endpoint", r->endpoint);
    field_str(&b, fmt, "local_addr", r->local_addr);
    field_str(&b, fmt, "remote_addr", r->remote_addr);
    if (r->alpn != NULL)
        field_str(&b, fmt, "alpn", r->alpn);
    if (r->listener != NULL)
        field_str(&b, fmt, "listener", r->listener);
    field_u64(&b, fmt, "bytes_in", r->bytes_in);
    field_u64(&b, fmt, "bytes_out", r->bytes_out);
    field_u64(&b, fmt, "duration_ms", r->duration_ms);
    if (r->method != NULL) {
        field_str(&b, fmt, "protocol", r->protocol);
        field_str(&b, fmt, "method", r->method);
        field_str(&b, fmt, "authority", r->authority);
        field_str(&b, fmt, "path", r->path);
        field_u64(&b, fmt, "status", (uint64_t)(r->status > 0 ? r->status : 0));
        if (r->grpc_status != NULL)
            field_str(&b, fmt, "grpc_status", r->grpc_status);
        field_str(&b, fmt, "request_id", r->request_id);
        field_u64(&b, fmt, "stream", r->stream);
        if (r->resolver != NULL) {
            field_u64(&b, fmt, "route", r->route);
            field_str(&b, fmt, "resolver", r->resolver);
        }
        if (r->retries > 0)
            field_u64(&b, fmt, "retries", r->retries);
    }
    field_str(&b, fmt, "result", r->result);
    field_str(&b, fmt, "reason", r->reason);
    field_u64(&b, fmt, "conn", r->conn);
    field_u64(&b, fmt, "worker", r->worker);
    if (fmt == ALOG_JSON)
        log_buf_raw(&b, "}", 1);
    /* Seventeen values of at most 6 * LOG_VALUE_MAX + 2 bytes and the keys fit ALOG_LINE_MAX, so
     * <full> cannot happen with a big enough buffer; a small one gets a cut line. */
    buf[b.len++] = '\n';
    buf[b.len] = '\0';
    return b.len;
}

static int open_path(const char *path, int *owned, char *err, size_t errlen)
{
    if (strcmp(path, "-") == 0 || strcmp(path, "stderr") == 0) {
        *owned = 0;
        return STDERR_FILENO;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (fd == -1) {
        int e = errno;
        if (err != NULL)
            snprintf(err, errlen, "access log %s: %s", path, strerror(e));
        return -e;
    }
    *owned = 1;
    return fd;
}

int alog_open(const char *path, enum alog_format fmt, char *err, size_t errlen)
{
    int owned = 0;
    int fd = open_path(path, &owned, err, errlen);
    if (fd < 0)
        return fd;
    snprintf(alog_path, sizeof(alog_path), "%s", path);
    alog_fmt = fmt;
    alog_owned = owned;
    atomic_store(&alog_fd, fd);
    return 0;
}

int alog_reopen(void)
{
    if (!alog_owned || atomic_load(&alog_fd) < 0)
        return 0;
    char err[256];
    int owned = 0;
    int fd = open_path(alog_path, &owned, err, sizeof(err));
    if (fd < 0) {
        LOG_ERROR("%s; still writing to the old file", err);
        return fd;
    }
    /* dup2() swaps the file behind the descriptor number the writers use in one step: a write
     * in flight finishes in the old file, the next goes to the new one, and no writer can
     * ever hold a closed (or reused) descriptor. */
    int rc = dup2(fd, atomic_load(&alog_fd)) < 0 ? -errno : 0;
    close(fd);
    if (rc != 0) {
        LOG_ERROR("access log %s: cannot reopen: %s; still writing to the old file", alog_path,
                  strerror(-rc));
        return rc;
    }
    LOG_INFO("access log %s reopened", alog_path);
    return 0;
}

int alog_enabled(void)
{
    return atomic_load(&alog_fd) >= 0;
}

void alog_write(const struct alog_rec *r)
{
    int fd = atomic_load(&alog_fd);
    if (fd < 0)
        return;
    char line[ALOG_LINE_MAX];
    size_t n = alog_format_line(line, sizeof(line), alog_fmt, r);
    ssize_t w = write(fd, line, n);
    (void)w;
}

void alog_close(void)
{
    int fd = atomic_exchange(&alog_fd, -1);
    if (fd >= 0 && alog_owned)
        close(fd);
    alog_owned = 0;
}
