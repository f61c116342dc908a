/*
 * alog: the access log, one line per finished session, in JSON or logfmt, and with protocol
 * http one more line per request (a record whose <method> is set).
 *
 * Each line is formatted into a bounded stack buffer and written with one write(2) to a
 * descriptor opened with O_APPEND, so lines from several worker threads never interleave
 * (a regular file or a pipe, for lines under PIPE_BUF, appends atomically). Values are cut to
 * LOG_VALUE_MAX bytes and escaped (log.h), so every line is well-formed whatever a peer sent.
 */
#ifndef CONNECTD_ALOG_H
#define CONNECTD_ALOG_H

#include <stddef.h>
#include <stdint.h>

enum alog_format {
    ALOG_JSON = 0,
    ALOG_LOGFMT,
};

/* One finished session. Strings are borrowed; NULL means "not known" (JSON null). */
struct alog_rec {
    uint64_t time_ms;        /* when it ended, Unix milliseconds */
    const char *direction;   /* "inbound" or "outbound" */
    const char *source;      /* caller's SPIFFE ID inbound; local client address outbound */
    const char *destination; /* our SPIFFE ID inbound; upstream's expected SPIFFE ID outbound */
    const char *upstream;    /* upstream name (outbound only) */
    const char *endpoint;    /* what we dialled: local application or upstream endpoint */
    const char *local_addr;  /* our address of the accepted connection */
    const char *remote_addr; /* peer address of the accepted connection */
    const char *alpn;        /* inbound: the protocol the mesh hop's TLS selected by ALPN
                                ("h2", "http/1.1"); NULL (not written) when none */
    const char *listener;    /* an exposed listener's name ("expose:21500"); NULL (not written)
                                for the public and upstream listeners */
    uint64_t bytes_in;       /* from the accepted connection's peer */
    uint64_t bytes_out;      /* to the accepted connection's peer */
    uint64_t duration_ms;
    const char *result; /* "ok", "denied", ... (session_result_name()) */
    const char *reason;
    uint64_t conn;
    unsigned worker;
    /* A request record (L7): <method> set; the fields below are written only then. */
    const char *protocol;    /* "HTTP/1.1", "HTTP/1.0" */
    const char *method;      /* as sent */
    const char *authority;   /* Host */
    const char *path;        /* the request target as sent (escaped and cut like every value) */
    const char *request_id;  /* X-Request-Id as forwarded */
    int status;              /* the status answered; 0 when none was */
    const char *grpc_status; /* gRPC: the grpc-status answered; NULL when none was */
    uint64_t stream;         /* the request's number on its connection, from 1 */
    /* Outbound, a routed request (NULL resolver: not written): the index of the route it took
     * in its upstream's table and the resolver its split named. */
    size_t route;
    const char *resolver;
    unsigned retries; /* outbound: retries of the request's retry policy; 0: not written */
};

/* Longest line alog_format_line writes, newline included. */
#define ALOG_LINE_MAX 65536

/* Parses "json" or "logfmt". 0 or -EINVAL. */
int alog_parse_format(const char *s, enum alog_format *out);

/*
 * Formats <r> as one line ending in '\n' into <buf> (at least ALOG_LINE_MAX bytes; NUL
 * terminated). Returns the line's length. Pure: no I/O.
 */
size_t alog_format_line(char *buf, size_t cap, enum alog_format fmt, const struct alog_rec *r);

/*
 * Opens the access log: <path> is a file (created 0640, appended to), or "-" / "stderr".
 * Call before any worker starts. 0, or -errno with <err> naming the path.
 */
int alog_open(const char *path, enum alog_format fmt, char *err, size_t errlen);
/* Reopens the file (after log rotation; on SIGHUP). 0 or -errno; the old one stays on error. */
int alog_reopen(void);
/* Whether an access log is open. */
int alog_enabled(void);
/* Formats and writes one line; nothing when no access log is open. Any thread. */
void alog_write(const struct alog_rec *r);
/* Closes the access log. After the workers stopped. */
void alog_close(void);

#endif
