/* bench/benchd: the back-end application of the benchmarks, one thread, epoll.
 *
 *   benchd http PORT   answers every HTTP/1.1 request with 200 and a 64-byte body (1 KiB for
 *                      GET /1k; the request's own head for GET /_bench/head, so that the
 *                      harness can see what a proxy added); keeps the connection open unless
 *                      the request says "Connection: close", in which case it answers with
 *                      the same header and closes after the answer.
 *                      A connection that opens with the HTTP/2 preface speaks h2c (prior
 *                      knowledge, through libnghttp2): every request gets 200 and a 64-byte
 *                      body, and a request with content-type application/grpc gets a gRPC
 *                      answer instead (one length-prefixed 59-byte protobuf message, then the
 *                      trailer grpc-status: 0). One port serves both, so every L7 peer of the
 *                      h2 scenario can reach the application the way it does in production
 *                      (HTTP/1.1 or h2c).
 *   benchd echo PORT   writes back every byte it reads; closes when the client does.
 *
 * It listens on 127.0.0.1 only. A Python server would be the bottleneck of a saturated run,
 * so the proxies are measured against this instead. Not part of connectd: it is built by
 * `make bench` into build/release/benchd.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#include "bench.h"

#define BUF_BYTES 16384

/* One h2 request being answered; owned by its connection's list, freed when nghttp2 closes
 * the stream or the connection goes. */
struct h2stream {
    struct h2stream *next;
    struct h2stream **prevp;
    int grpc;        /* the request's content-type is application/grpc */
    size_t body_off; /* how much of the answer's body has been handed to nghttp2 */
    char *head;      /* :path /_bench/head: the request's headers, "name: value\n" each */
    size_t head_len;
};

enum proto { PROTO_UNKNOWN, PROTO_H1, PROTO_H2 };

struct conn {
    int fd;
    enum proto proto;
    size_t in_len;
    size_t out_len;
    size_t out_off;
    int close_after; /* close once the pending answer is written */
    nghttp2_session *h2;
    const uint8_t *h2_pend; /* output nghttp2 gave us that the socket has not taken yet */
    size_t h2_pend_len;
    struct h2stream *streams;
    char in[BUF_BYTES];
    char out[BUF_BYTES];
};

static const char BODY[] = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
static const char H2_PREFACE[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define H2_PREFACE_LEN (sizeof(H2_PREFACE) - 1)
/* The most of a request head GET /_bench/head sends back. */
#define HEAD_ECHO_MAX 4096
/* A gRPC message: flag 0 (not compressed), length 59, then a protobuf message whose field 1
 * holds 57 bytes; 64 bytes in all, the size of the plain answers. */
static uint8_t grpc_body[64];
static char body_1k[1025];
static int echo_mode;
static int ep;

static void conn_close(struct conn *c)
{
    if (c->h2 != NULL)
        nghttp2_session_del(c->h2);
    while (c->streams != NULL) {
        struct h2stream *st = c->streams;
        c->streams = st->next;
        free(st->head);
        free(st);
    }
    close(c->fd);
    free(c);
}

static void set_events(struct conn *c, unsigned events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Writes what is pending; returns 0 when all of it went out, 1 when the socket is full, -1 on
 * an error. */
static int flush_out(struct conn *c)
{
    int r = write_pending(c->fd, c->out, &c->out_off, c->out_len);
    if (r == 0)
        c->out_off = c->out_len = 0;
    return r;
}

static int has_close(const char *req, size_t len)
{
    static const char needle[] = "connection: close";
    size_t m = sizeof(needle) - 1;
    for (size_t i = 0; i + m <= len; i++)
        if (strncasecmp(req + i, needle, m) == 0)
            return 1;
    return 0;
}

/* Turns every complete request in c->in into an answer in c->out. */
static void answer_requests(struct conn *c)
{
    size_t done = 0;
    for (;;) {
        char *start = c->in + done;
        char *end = memmem(start, c->in_len - done, "\r\n\r\n", 4);
        if (end == NULL || c->close_after)
            break;
        size_t req_len = (size_t)(end + 4 - start);
        int close_it = has_close(start, req_len);
        const char *body = strncmp(start, "GET /1k ", 8) == 0 ? body_1k : BODY;
        size_t body_len = strlen(body);
        if (strncmp(start, "GET /_bench/head ", 17) == 0) {
            body = start;
            body_len = req_len < HEAD_ECHO_MAX ? req_len : HEAD_ECHO_MAX;
        }
        int n = snprintf(c->out + c->out_len, sizeof(c->out) - c->out_len,
                         "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                         "%s\r\n%.*s",
                         body_len, close_it ? "Connection: close\r\n" : "", (int)body_len, body);
        if (n < 0 || (size_t)n >= sizeof(c->out) - c->out_len)
            break; /* no room: answer after the pending bytes are written */
        c->out_len += (size_t)n;
        c->close_after = close_it;
        done += req_len;
    }
    memmove(c->in, c->in + done, c->in_len - done);
    c->in_len -= done;
}

/* ---- h2c (prior knowledge), through nghttp2's callbacks ---- */

static ssize_t h2_body_read(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t len,
                            uint32_t *flags, nghttp2_data_source *src, void *ud)
{
    (void)ud;
    struct h2stream *st = src->ptr;
    const uint8_t *body = st->grpc ? grpc_body : (const uint8_t *)BODY;
    size_t total = st->grpc ? sizeof(grpc_body) : sizeof(BODY) - 1;
    if (st->head != NULL) {
        body = (const uint8_t *)st->head;
        total = st->head_len;
    }
    size_t n = total - st->body_off < len ? total - st->body_off : len;
    memcpy(buf, body + st->body_off, n);
    st->body_off += n;
    if (st->body_off == total) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        if (st->grpc) {
            nghttp2_nv tr[] = {
                {(uint8_t *)"grpc-status", (uint8_t *)"0", 11, 1, NGHTTP2_NV_FLAG_NONE}};
            if (nghttp2_submit_trailer(s, sid, tr, 1) == 0)
                *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
        }
    }
    return (ssize_t)n;
}

static int h2_on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    struct conn *c = ud;
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    struct h2stream *st = xcalloc(1, sizeof(*st));
    st->next = c->streams;
    st->prevp = &c->streams;
    if (c->streams != NULL)
        c->streams->prevp = &st->next;
    c->streams = st;
    nghttp2_session_set_stream_user_data(s, f->hd.stream_id, st);
    return 0;
}

static int h2_on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                        void *ud)
{
    (void)flags;
    (void)ud;
    struct h2stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    static const char grpc[] = "application/grpc";
    if (st != NULL && namelen == 12 && memcmp(name, "content-type", 12) == 0 &&
        valuelen >= sizeof(grpc) - 1 && memcmp(value, grpc, sizeof(grpc) - 1) == 0)
        st->grpc = 1;
    if (st != NULL && st->head == NULL && namelen == 5 && memcmp(name, ":path", 5) == 0 &&
        valuelen == 12 && memcmp(value, "/_bench/head", 12) == 0)
        st->head = xcalloc(1, HEAD_ECHO_MAX);
    else if (st != NULL && st->head != NULL &&
             st->head_len + namelen + valuelen + 3 <= HEAD_ECHO_MAX) {
        memcpy(st->head + st->head_len, name, namelen);
        memcpy(st->head + st->head_len + namelen, ": ", 2);
        memcpy(st->head + st->head_len + namelen + 2, value, valuelen);
        st->head_len += namelen + valuelen + 3;
        st->head[st->head_len - 1] = '\n';
    }
    return 0;
}

/* Answers a request once all of it (head and body) has arrived. */
static int h2_on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud)
{
    (void)ud;
    if ((f->hd.type != NGHTTP2_HEADERS && f->hd.type != NGHTTP2_DATA) ||
        !(f->hd.flags & NGHTTP2_FLAG_END_STREAM))
        return 0;
    struct h2stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st == NULL)
        return 0;
#define NV(n, v)                                                                                   \
    {                                                                                              \
        (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1, NGHTTP2_NV_FLAG_NONE         \
    }
    static const nghttp2_nv plain[] = {NV(":status", "200"), NV("content-type", "text/plain"),
                                       NV("content-length", "64")};
    static const nghttp2_nv grpc[] = {NV(":status", "200"), NV("content-type", "application/grpc")};
#undef NV
    nghttp2_data_provider dp = {.source.ptr = st, .read_callback = h2_body_read};
    if (st->grpc || st->head != NULL)
        nghttp2_submit_response(s, f->hd.stream_id, st->head != NULL ? plain : grpc, 2, &dp);
    else
        nghttp2_submit_response(s, f->hd.stream_id, plain, 3, &dp);
    return 0;
}

static int h2_on_stream_close(nghttp2_session *s, int32_t sid, uint32_t err, void *ud)
{
    (void)err;
    (void)ud;
    struct h2stream *st = nghttp2_session_get_stream_user_data(s, sid);
    if (st == NULL)
        return 0;
    *st->prevp = st->next;
    if (st->next != NULL)
        st->next->prevp = st->prevp;
    free(st->head);
    free(st);
    return 0;
}

static nghttp2_session_callbacks *h2_callbacks;

static int h2_start(struct conn *c)
{
    if (nghttp2_session_server_new(&c->h2, h2_callbacks, c) != 0)
        return -1;
    nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 1000}};
    return nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, 1) == 0 ? 0 : -1;
}

/* Writes what nghttp2 has to send; returns like flush_out(), and -1 also when the session is
 * over (both sides done). */
static int h2_flush(struct conn *c)
{
    for (;;) {
        while (c->h2_pend_len > 0) {
            ssize_t n = write(c->fd, c->h2_pend, c->h2_pend_len);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return errno == EAGAIN ? 1 : -1;
            }
            c->h2_pend += n;
            c->h2_pend_len -= (size_t)n;
        }
        const uint8_t *data;
        ssize_t n = nghttp2_session_mem_send(c->h2, &data);
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        c->h2_pend = data;
        c->h2_pend_len = (size_t)n;
    }
    if (!nghttp2_session_want_read(c->h2) && !nghttp2_session_want_write(c->h2))
        return -1;
    return 0;
}

/* Decides the connection's protocol from its first bytes and hands h2 input to nghttp2.
 * Returns 0, or -1 to close the connection. */
static int take_input(struct conn *c)
{
    if (c->proto == PROTO_UNKNOWN) {
        size_t m = c->in_len < H2_PREFACE_LEN ? c->in_len : H2_PREFACE_LEN;
        if (memcmp(c->in, H2_PREFACE, m) != 0)
            c->proto = PROTO_H1;
        else if (m < H2_PREFACE_LEN)
            return 0; /* could still be either: wait for more */
        else if (h2_start(c) < 0)
            return -1;
        else
            c->proto = PROTO_H2;
    }
    if (c->proto == PROTO_H1) {
        answer_requests(c);
        return 0;
    }
    ssize_t n = nghttp2_session_mem_recv(c->h2, (const uint8_t *)c->in, c->in_len);
    c->in_len = 0;
    return n < 0 ? -1 : 0;
}

static int flush_any(struct conn *c)
{
    return c->proto == PROTO_H2 ? h2_flush(c) : flush_out(c);
}

static void on_readable(struct conn *c)
{
    for (;;) {
        if (echo_mode ? c->out_len > 0 : c->in_len == sizeof(c->in) || c->h2_pend_len > 0) {
            set_events(c, EPOLLIN | EPOLLOUT);
            return;
        }
        char *dst = echo_mode ? c->out : c->in + c->in_len;
        size_t room = echo_mode ? sizeof(c->out) : sizeof(c->in) - c->in_len;
        ssize_t n = read(c->fd, dst, room);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            conn_close(c);
            return;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        if (echo_mode) {
            c->out_len = (size_t)n;
        } else {
            c->in_len += (size_t)n;
            if (take_input(c) < 0) {
                conn_close(c);
                return;
            }
        }
        int r = flush_any(c);
        if (r < 0 || (r == 0 && c->close_after)) {
            conn_close(c);
            return;
        }
        if (r == 1) {
            set_events(c, EPOLLIN | EPOLLOUT);
            return;
        }
    }
}

static void on_writable(struct conn *c)
{
    int r = flush_any(c);
    if (r < 0 || (r == 0 && c->close_after)) {
        conn_close(c);
        return;
    }
    if (r == 0) {
        set_events(c, EPOLLIN);
        on_readable(c);
    }
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "http") != 0 && strcmp(argv[1], "echo") != 0)) {
        fprintf(stderr, "usage: benchd http|echo PORT\n");
        return 2;
    }
    echo_mode = strcmp(argv[1], "echo") == 0;
    char *endp;
    long port = strtol(argv[2], &endp, 10);
    if (*endp != '\0' || port <= 0 || port > 65535) {
        fprintf(stderr, "benchd: bad port %s\n", argv[2]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    memset(body_1k, 'k', sizeof(body_1k) - 1);
    grpc_body[4] = sizeof(grpc_body) - 5; /* message length, big-endian */
    grpc_body[5] = 0x0a;                  /* field 1, length-delimited */
    grpc_body[6] = sizeof(grpc_body) - 7;
    memset(grpc_body + 7, 'g', sizeof(grpc_body) - 7);
    if (nghttp2_session_callbacks_new(&h2_callbacks) != 0)
        return 1;
    nghttp2_session_callbacks_set_on_begin_headers_callback(h2_callbacks, h2_on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(h2_callbacks, h2_on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(h2_callbacks, h2_on_frame_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(h2_callbacks, h2_on_stream_close);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 4096) < 0) {
        fprintf(stderr, "benchd: listen 127.0.0.1:%ld: %s\n", port, strerror(errno));
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno != EINTR)
            return 1;
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                    c = xcalloc(1, sizeof(*c));
                    c->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT)
                on_writable(c);
            else
                on_readable(c);
        }
    }
}
