/*
 * admin: a bounded HTTP/1.1 server for the admin endpoint.
 *
 * A connection goes through three states, each bounded by the one deadline:
 *
 *   READING --(complete head)--> HANDLING --(admin_reply_send)--> WRITING --(all sent)--> CLOSED
 *      |  \--(bad or too big head: error answer)------------------^   |
 *      \--(deadline: 408 best effort, or peer EOF/error)--> CLOSED <--/ (deadline, error)
 *
 * After the answer is written the write side is shut down and the rest of the request is read
 * and dropped until EOF or the deadline, so a client still sending does not get a reset that
 * would destroy the answer.
 *
 * READING has a shorter deadline of its own (the head deadline), and a READING or lingering
 * connection is the one evicted when a new connection finds the slots full: both only wait on
 * their client. A connection being handled or written is never evicted, since its owner or
 * its answer is in flight.
 */
#include "admin.h"
#include "log.h"
#include "sock.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- request parsing ---- */

static int is_tchar(unsigned char c)
{
    /* c != 0 first: strchr() would find the terminator. */
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Validates the request line <p> (<n> bytes, no line end) into <req>. */
static int parse_request_line(const char *p, size_t n, struct admin_request *req)
{
    size_t i = 0, m = 0;
    while (i < n && is_tchar((unsigned char)p[i])) {
        if (m + 1 >= sizeof(req->method))
            return -EBADMSG;
        req->method[m++] = p[i++];
    }
    req->method[m] = '\0';
    if (m == 0 || i >= n || p[i] != ' ')
        return -EBADMSG;
    size_t t0 = ++i;
    while (i < n && p[i] > ' ' && p[i] < 0x7f)
        i++;
    size_t tlen = i - t0;
    if (tlen == 0 || i >= n || p[i] != ' ')
        return -EBADMSG;
    if (p[t0] != '/')
        return -EBADMSG;
    if (tlen >= ADMIN_TARGET_MAX)
        return -ENAMETOOLONG;
    const char *q = memchr(p + t0, '?', tlen);
    size_t plen = q != NULL ? (size_t)(q - (p + t0)) : tlen;
    memcpy(req->path, p + t0, plen);
    req->path[plen] = '\0';
    if (q != NULL) {
        size_t qlen = tlen - plen - 1;
        memcpy(req->query, q + 1, qlen);
        req->query[qlen] = '\0';
    } else {
        req->query[0] = '\0';
    }
    i++;
    if (n - i != 8 || memcmp(p + i, "HTTP/", 5) != 0 || p[i + 6] != '.' || p[i + 5] < '0' ||
        p[i + 5] > '9' || p[i + 7] < '0' || p[i + 7] > '9')
        return -EBADMSG;
    if (p[i + 5] != '1')
        return -EPROTONOSUPPORT;
    req->minor_version = p[i + 7] - '0';
    return 0;
}

/* Validates one header line (no line end): a token, a colon, then visible text or tabs. */
static int parse_header_line(const char *p, size_t n)
{
    size_t i = 0;
    while (i < n && is_tchar((unsigned char)p[i]))
        i++;
    if (i == 0 || i >= n || p[i] != ':')
        return -EBADMSG;
    for (i++; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if ((c < ' ' && c != '\t') || c == 0x7f)
            return -EBADMSG;
    }
    return 0;
}

/*
 * Checks the incomplete tail of the head: whatever has arrived must still be able to become a
 * valid line, so garbage is refused before the cap is reached.
 */
static int check_partial(const char *p, size_t n, int first_line)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\r' && i + 1 == n)
            break;
        if ((c < ' ' && c != '\t') || c == 0x7f)
            return -EBADMSG;
        if (first_line && c == ' ')
            first_line = 0; /* the method ended; the rest is checked when the line is complete */
        else if (first_line && !is_tchar(c))
            return -EBADMSG;
    }
    return 0;
}

int admin_parse_request(const char *buf, size_t len, struct admin_request *req)
{
    size_t pos = 0;
    int line = 0;
    size_t cap = MIN(len, (size_t)ADMIN_REQUEST_MAX);
    memset(req, 0, sizeof(*req));
    for (;;) {
        const char *nl = memchr(buf + pos, '\n', cap - pos);
        if (nl == NULL) {
            int rc = check_partial(buf + pos, cap - pos, line == 0);
            if (rc != 0)
                return rc;
            return len >= ADMIN_REQUEST_MAX ? -EMSGSIZE : -EAGAIN;
        }
        size_t n = (size_t)(nl - (buf + pos));
        if (n > 0 && buf[pos + n - 1] == '\r')
            n--;
        if (memchr(buf + pos, '\r', n) != NULL)
            return -EBADMSG;
        if (line == 0) {
            int rc = parse_request_line(buf + pos, n, req);
            if (rc != 0)
                return rc;
        } else if (n == 0) {
            return (int)(nl - buf) + 1;
        } else {
            int rc = parse_header_line(buf + pos, n);
            if (rc != 0)
                return rc;
        }
        pos = (size_t)(nl - buf) + 1;
        line++;
    }
}

int admin_query_param(const char *query, const char *name, char *out, size_t len)
{
    size_t nlen = strlen(name);
    const char *p = query;
    while (*p != '\0') {
        const char *end = strchr(p, '&');
        if (end == NULL)
            end = p + strlen(p);
        if ((size_t)(end - p) >= nlen && strncmp(p, name, nlen) == 0 &&
            (p[nlen] == '=' || p + nlen == end)) {
            const char *v = p + nlen + (p[nlen] == '=' ? 1 : 0);
            size_t o = 0;
            for (; v < end; v++) {
                char c = *v;
                if (c == '%') {
                    if (end - v < 3)
                        return -EINVAL;
                    int hi = util_hexval(v[1]);
                    int lo = util_hexval(v[2]);
                    if (hi < 0 || lo < 0)
                        return -EINVAL;
                    c = (char)(hi * 16 + lo);
                    v += 2;
                } else if (c == '+') {
                    c = ' ';
                }
                if (c == '\0')
                    return -EINVAL;
                if (o + 1 >= len)
                    return -ENOSPC;
                out[o++] = c;
            }
            out[o] = '\0';
            return (int)o;
        }
        p = *end == '&' ? end + 1 : end;
    }
    return -ENOENT;
}

/* ---- buffers ---- */

void admin_buf_dispose(struct admin_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}

static void reserve(struct admin_buf *b, size_t more)
{
    if (b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more + 1)
        cap *= 2;
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
}

void admin_buf_add(struct admin_buf *b, const char *s, size_t n)
{
    reserve(b, n);
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void admin_buf_printf(struct admin_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void admin_buf_json_str(struct admin_buf *b, const char *s)
{
    if (s == NULL) {
        admin_buf_add(b, "null", 4);
        return;
    }
    admin_buf_add(b, "\"", 1);
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            admin_buf_add(b, e, 2);
        } else if (c < 0x20 || c == 0x7f) {
            admin_buf_printf(b, "\\u%04x", c);
        } else {
            admin_buf_add(b, (const char *)&c, 1);
        }
    }
    admin_buf_add(b, "\"", 1);
}

void admin_buf_label(struct admin_buf *b, const char *s)
{
    admin_buf_add(b, "\"", 1);
    for (; *s != '\0'; s++) {
        if (*s == '"' || *s == '\\')
            admin_buf_add(b, "\\", 1);
        if (*s == '\n')
            admin_buf_add(b, "\\n", 2);
        else
            admin_buf_add(b, s, 1);
    }
    admin_buf_add(b, "\"", 1);
}

/* ---- connections ---- */

enum conn_state { C_READING, C_HANDLING, C_WRITING, C_LINGER, C_CLOSED };

struct admin_conn {
    struct admin_conn *next, *prev;
    struct admin *srv;
    int fd;
    enum conn_state state;
    char peer[64];        /* "ip:port", "[v6]:port" or "unix", from accept */
    uint64_t accepted_ms; /* loop clock at accept: the whole-life deadline counts from here */
    struct loop_io io;
    struct loop_timer deadline;
    struct loop_defer reap;
    char in[ADMIN_REQUEST_MAX];
    size_t in_len;
    struct admin_request req;
    struct admin_reply reply;
    struct admin_buf out;
    size_t out_off;
};

struct admin {
    struct loop *loop;
    int fd;
    struct loop_io io;
    char *unix_path;
    unsigned long unix_ino;
    admin_handler handler;
    void *data;
    struct admin_conn *conns;
    size_t n_conns;
};

static void conn_reap(struct loop_defer *d)
{
    struct admin_conn *c = (struct admin_conn *)((char *)d - offsetof(struct admin_conn, reap));
    admin_buf_dispose(&c->reply.body);
    admin_buf_dispose(&c->out);
    free(c);
}

/* The one way out of a connection. */
static void conn_close(struct admin_conn *c)
{
    if (c->state == C_CLOSED)
        return;
    if (c->state == C_HANDLING && c->reply.cancel != NULL)
        c->reply.cancel(c->reply.cancel_data);
    c->state = C_CLOSED;
    struct admin *a = c->srv;
    loop_io_want(a->loop, &c->io, 0);
    loop_timer_stop(a->loop, &c->deadline);
    close(c->fd);
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        a->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    a->n_conns--;
    loop_defer(a->loop, &c->reap, conn_reap);
}

static const char *reason_phrase(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 414:
        return "URI Too Long";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 503:
        return "Service Unavailable";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Unknown";
    }
}

static void conn_write(struct admin_conn *c)
{
    while (c->out_off < c->out.len) {
        ssize_t n = send(c->fd, c->out.data + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            loop_io_want(c->srv->loop, &c->io, LOOP_WRITE);
            return;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            conn_close(c);
            return;
        }
    }
    shutdown(c->fd, SHUT_WR);
    c->state = C_LINGER;
    loop_io_want(c->srv->loop, &c->io, LOOP_READ);
}

void admin_reply_send(struct admin_reply *r)
{
    struct admin_conn *c = (struct admin_conn *)((char *)r - offsetof(struct admin_conn, reply));
    if (c->state != C_HANDLING && c->state != C_READING)
        return;
    c->state = C_WRITING;
    admin_buf_printf(&c->out,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
                     r->status, reason_phrase(r->status),
                     r->content_type != NULL ? r->content_type : "text/plain; charset=utf-8",
                     r->body.len);
    if (r->body.len > 0)
        admin_buf_add(&c->out, r->body.data, r->body.len);
    conn_write(c);
}

static void reply_error(struct admin_conn *c, int status, const char *text)
{
    c->reply.status = status;
    c->reply.content_type = NULL;
    admin_buf_printf(&c->reply.body, "%s\n", text);
    admin_reply_send(&c->reply);
}

static void conn_handle(struct admin_conn *c)
{
    int rc = admin_parse_request(c->in, c->in_len, &c->req);
    if (rc == -EAGAIN)
        return;
    struct loop *loop = c->srv->loop;
    loop_io_want(loop, &c->io, 0);
    /* The head is in: from here the whole-life deadline applies instead of the head's. */
    uint64_t end_ms = c->accepted_ms + ADMIN_DEADLINE_MS, now_ms = loop_now_ms(loop);
    loop_timer_start(loop, &c->deadline, end_ms > now_ms ? end_ms - now_ms : 0);
    switch (rc) {
    case -EBADMSG:
        reply_error(c, 400, "malformed request");
        return;
    case -EMSGSIZE:
        reply_error(c, 431, "request head too large");
        return;
    case -ENAMETOOLONG:
        reply_error(c, 414, "request target too long");
        return;
    case -EPROTONOSUPPORT:
        reply_error(c, 505, "only HTTP/1.x is served");
        return;
    default:
        break;
    }
    if (rc < 0) {
        reply_error(c, 400, "malformed request");
        return;
    }
    if (strcmp(c->req.method, "GET") != 0) {
        reply_error(c, 405, "only GET is served");
        return;
    }
    c->state = C_HANDLING;
    c->reply.status = 200;
    c->srv->handler(c->srv->data, &c->req, &c->reply);
}

static void on_conn_io(struct loop_io *io, unsigned events)
{
    struct admin_conn *c = io->data;
    (void)events;
    if (c->state == C_WRITING) {
        conn_write(c);
        return;
    }
    char drop[1024] = {0};
    for (;;) {
        char *dst = c->state == C_READING ? c->in + c->in_len : drop;
        size_t room = c->state == C_READING ? sizeof(c->in) - c->in_len : sizeof(drop);
        ssize_t n = recv(c->fd, dst, room, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            conn_close(c);
            return;
        }
        if (c->state != C_READING)
            continue; /* lingering: the rest of the request is dropped */
        c->in_len += (size_t)n;
        conn_handle(c);
        if (c->state != C_READING)
            return;
    }
}

static void on_deadline(struct loop_timer *t)
{
    struct admin_conn *c = t->data;
    if (c->state == C_READING) {
        /* Best effort: one non-blocking send of the 408, then the connection is cut. */
        static const char msg[] = "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                                  "Connection: close\r\n\r\n";
        ssize_t n = send(c->fd, msg, sizeof(msg) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)n;
    }
    conn_close(c);
}

/* Whether peer names <x> and <y> ("ip:port", "[v6]:port", "unix") are of one address. */
static int same_peer(const char *x, const char *y)
{
    const char *xc = strrchr(x, ':'), *yc = strrchr(y, ':');
    size_t xn = xc != NULL ? (size_t)(xc - x) : strlen(x);
    size_t yn = yc != NULL ? (size_t)(yc - y) : strlen(y);
    return xn == yn && memcmp(x, y, xn) == 0;
}

/*
 * Makes room for a new connection from <peer>: returns 0 when there is a free slot, or after
 * closing the oldest connection that only waits on its client (of <peer> itself when <peer>
 * holds its share); -EBUSY when every candidate is being handled or written.
 */
static int make_room(struct admin *a, const char *peer)
{
    size_t from_peer = 0;
    struct admin_conn *oldest = NULL, *oldest_of_peer = NULL;
    /* The list is newest first, so the last match is the oldest. At most ADMIN_MAX_CONNS. */
    for (struct admin_conn *c = a->conns; c != NULL; c = c->next) {
        int mine = same_peer(c->peer, peer);
        from_peer += (size_t)mine;
        if (c->state != C_READING && c->state != C_LINGER)
            continue;
        oldest = c;
        if (mine)
            oldest_of_peer = c;
    }
    struct admin_conn *victim;
    if (from_peer >= ADMIN_MAX_CONNS_PER_PEER)
        victim = oldest_of_peer;
    else if (a->n_conns >= ADMIN_MAX_CONNS)
        victim = oldest;
    else
        return 0;
    if (victim == NULL)
        return -EBUSY;
    LOG_DEBUG("admin: %s evicts the oldest waiting connection (%s)", peer, victim->peer);
    if (victim->state == C_READING) {
        /* Best effort, as at the deadline: one non-blocking send, then the cut. */
        static const char msg[] = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                  "Connection: close\r\n\r\n";
        ssize_t n = send(victim->fd, msg, sizeof(msg) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)n;
    }
    conn_close(victim);
    return 0;
}

static void on_accept(struct loop_io *io, unsigned events)
{
    struct admin *a = io->data;
    char peer[64];
    (void)events;
    for (;;) {
        int fd = sock_accept(a->fd, peer, sizeof(peer));
        if (fd < 0)
            return;
        if (make_room(a, peer) != 0) {
            LOG_DEBUG("admin: refusing %s: %zu connections open, none waiting on its client", peer,
                      a->n_conns);
            close(fd);
            continue;
        }
        struct admin_conn *c = xcalloc(1, sizeof(*c));
        c->srv = a;
        c->fd = fd;
        c->state = C_READING;
        snprintf(c->peer, sizeof(c->peer), "%s", peer);
        c->accepted_ms = loop_now_ms(a->loop);
        loop_io_init(&c->io, fd, on_conn_io, c);
        loop_timer_init(&c->deadline, on_deadline, c);
        c->next = a->conns;
        if (a->conns != NULL)
            a->conns->prev = c;
        a->conns = c;
        a->n_conns++;
        loop_timer_start(a->loop, &c->deadline, ADMIN_HEAD_DEADLINE_MS);
        if (loop_io_want(a->loop, &c->io, LOOP_READ) != 0)
            conn_close(c);
    }
}

struct admin *admin_start(struct loop *loop, const char *bind, admin_handler handler, void *data,
                          char *err, size_t errlen)
{
    struct admin *a = xcalloc(1, sizeof(*a));
    a->loop = loop;
    a->handler = handler;
    a->data = data;
    if (strncmp(bind, "unix://", 7) == 0) {
        a->unix_path = xstrdup(bind + 7);
        a->fd = sock_listen_unix(a->unix_path, 0600, &a->unix_ino, err, errlen);
    } else {
        char host[256];
        int port;
        if (util_split_hostport(bind, host, sizeof(host), &port) != 0) {
            snprintf(err, errlen, "-admin-bind: \"%s\" is not host:port or unix:///path", bind);
            goto fail;
        }
        a->fd = sock_listen(host, port, 0, err, errlen);
    }
    if (a->fd < 0)
        goto fail;
    loop_io_init(&a->io, a->fd, on_accept, a);
    if (loop_io_want(loop, &a->io, LOOP_READ) != 0) {
        snprintf(err, errlen, "-admin-bind %s: cannot watch the listener", bind);
        close(a->fd);
        goto fail;
    }
    LOG_INFO("admin endpoint on %s", bind);
    return a;
fail:
    free(a->unix_path);
    free(a);
    return NULL;
}

void admin_stop(struct admin *a)
{
    if (a == NULL)
        return;
    while (a->conns != NULL)
        conn_close(a->conns);
    loop_io_want(a->loop, &a->io, 0);
    close(a->fd);
    if (a->unix_path != NULL)
        sock_unlink_unix(a->unix_path, a->unix_ino);
    free(a->unix_path);
    free(a);
}
