/* bench/benchd: the back-end application of the benchmarks, one thread, epoll.
 *
 *   benchd http PORT   answers every HTTP/1.1 request with 200 and a 64-byte body (1 KiB for
 *                      GET /1k); keeps the connection open unless the request says
 *                      "Connection: close", in which case it answers with the same header and
 *                      closes after the answer.
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

#include "bench.h"

#define BUF_BYTES 16384

struct conn {
    int fd;
    size_t in_len;
    size_t out_len;
    size_t out_off;
    int close_after; /* close once the pending answer is written */
    char in[BUF_BYTES];
    char out[BUF_BYTES];
};

static const char BODY[] = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
static char body_1k[1025];
static int echo_mode;
static int ep;

static void conn_close(struct conn *c)
{
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
        int n = snprintf(c->out + c->out_len, sizeof(c->out) - c->out_len,
                         "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                         "%s\r\n%s",
                         strlen(body), close_it ? "Connection: close\r\n" : "", body);
        if (n < 0 || (size_t)n >= sizeof(c->out) - c->out_len)
            break; /* no room: answer after the pending bytes are written */
        c->out_len += (size_t)n;
        c->close_after = close_it;
        done += req_len;
    }
    memmove(c->in, c->in + done, c->in_len - done);
    c->in_len -= done;
}

static void on_readable(struct conn *c)
{
    for (;;) {
        if (echo_mode ? c->out_len > 0 : c->in_len == sizeof(c->in)) {
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
            answer_requests(c);
        }
        int r = flush_out(c);
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
    int r = flush_out(c);
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

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
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
