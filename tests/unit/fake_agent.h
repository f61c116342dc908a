/*
 * fake_agent.h: a tiny scripted HTTP/1.1 server for unit tests of the agent's users, run in a
 * thread on 127.0.0.1 (ephemeral port) or on a unix socket.
 *
 * The server answers the requests it receives, in order, with the test's script; a request
 * past the end of the script is held open without an answer, like a blocking query with
 * nothing new. Functions are static inline so that a test uses what it needs.
 */
#ifndef CONNECTD_TEST_FAKE_AGENT_H
#define CONNECTD_TEST_FAKE_AGENT_H

#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "util.h"

/* ---- the fake agent ---- */

struct fake_resp {
    int status;
    const char *headers; /* extra header lines, each ending in "\r\n" */
    const char *body;
    int chunked; /* send the body with Transfer-Encoding: chunked */
};

#define FAKE_MAX_REQS  32
#define FAKE_MAX_CONNS 16

struct fake_conn {
    int fd;
    int held; /* answered nothing to its last request; ignore it from now on */
    char buf[65536];
    size_t len;
};

struct fake {
    int lfd;
    int port;
    char dir[64];
    char sock_path[108];
    int stop_pipe[2];
    pthread_t thread;
    const struct fake_resp *script;
    size_t script_len;

    pthread_mutex_t mu; /* guards what follows */
    size_t nreq;
    char *reqs[FAKE_MAX_REQS]; /* request head and body as received */
    uint64_t req_ms[FAKE_MAX_REQS];
    unsigned accepts;
    char first_bytes[2048]; /* the first bytes of the first connection (a TLS hello, say) */
    size_t first_len;
};

static inline void send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0)
            return; /* the client gave up (body cap tests): fine */
        p += w;
        n -= (size_t)w;
    }
}

static inline void send_resp(int fd, const struct fake_resp *r)
{
    const char *body = r->body != NULL ? r->body : "";
    size_t blen = strlen(body);
    char *head = xasprintf("HTTP/1.1 %d X\r\n%sContent-Type: application/json\r\n", r->status,
                           r->headers != NULL ? r->headers : "");
    if (!r->chunked) {
        char *h2 = xasprintf("%sContent-Length: %zu\r\n\r\n", head, blen);
        send_all(fd, h2, strlen(h2));
        send_all(fd, body, blen);
        free(h2);
    } else {
        char *h2 = xasprintf("%sTransfer-Encoding: chunked\r\n\r\n", head);
        send_all(fd, h2, strlen(h2));
        free(h2);
        for (size_t off = 0; off < blen; off += 1000) {
            size_t n = MIN(blen - off, (size_t)1000);
            char sz[32];
            int k = snprintf(sz, sizeof(sz), "%zx\r\n", n);
            send_all(fd, sz, (size_t)k);
            send_all(fd, body + off, n);
            send_all(fd, "\r\n", 2);
        }
        send_all(fd, "0\r\n\r\n", 5);
    }
    free(head);
}

/* Handles every complete request in <c>'s buffer. */
static inline void serve(struct fake *f, struct fake_conn *c)
{
    while (!c->held) {
        c->buf[c->len] = '\0';
        char *end = strstr(c->buf, "\r\n\r\n");
        if (end == NULL)
            return;
        size_t head_len = (size_t)(end - c->buf) + 4;
        size_t body_len = 0;
        char *cl = strcasestr(c->buf, "\r\nContent-Length:");
        if (cl != NULL && cl < end)
            body_len = strtoul(cl + 17, NULL, 10);
        if (c->len < head_len + body_len)
            return;
        size_t total = head_len + body_len;

        pthread_mutex_lock(&f->mu);
        size_t i = f->nreq;
        if (i < FAKE_MAX_REQS) {
            f->reqs[i] = xstrndup(c->buf, total);
            f->req_ms[i] = util_now_ms();
            f->nreq++;
        }
        pthread_mutex_unlock(&f->mu);

        if (i < f->script_len)
            send_resp(c->fd, &f->script[i]);
        else
            c->held = 1;
        memmove(c->buf, c->buf + total, c->len - total);
        c->len -= total;
    }
}

static inline void *fake_main(void *arg)
{
    struct fake *f = arg;
    struct fake_conn *conns[FAKE_MAX_CONNS] = {0};
    for (;;) {
        struct pollfd pfd[FAKE_MAX_CONNS + 2];
        struct fake_conn *who[FAKE_MAX_CONNS + 2];
        nfds_t n = 0;
        pfd[n++] = (struct pollfd){.fd = f->stop_pipe[0], .events = POLLIN};
        pfd[n++] = (struct pollfd){.fd = f->lfd, .events = POLLIN};
        for (int i = 0; i < FAKE_MAX_CONNS; i++) {
            if (conns[i] != NULL) {
                who[n] = conns[i];
                pfd[n++] = (struct pollfd){.fd = conns[i]->fd, .events = POLLIN};
            }
        }
        if (poll(pfd, n, -1) < 0)
            continue;
        if (pfd[0].revents)
            break;
        if (pfd[1].revents & POLLIN) {
            int fd = accept(f->lfd, NULL, NULL);
            int slot = -1;
            for (int i = 0; i < FAKE_MAX_CONNS && fd >= 0; i++) {
                if (conns[i] == NULL) {
                    slot = i;
                    break;
                }
            }
            if (slot < 0) {
                if (fd >= 0)
                    close(fd);
            } else {
                conns[slot] = xcalloc(1, sizeof(struct fake_conn));
                conns[slot]->fd = fd;
                pthread_mutex_lock(&f->mu);
                f->accepts++;
                pthread_mutex_unlock(&f->mu);
            }
        }
        for (nfds_t k = 2; k < n; k++) {
            if (pfd[k].revents == 0)
                continue;
            struct fake_conn *c = who[k];
            ssize_t r = read(c->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len);
            if (r > 0) {
                pthread_mutex_lock(&f->mu);
                if (f->first_len == 0) {
                    f->first_len = MIN((size_t)r, sizeof(f->first_bytes));
                    memcpy(f->first_bytes, c->buf, f->first_len);
                }
                pthread_mutex_unlock(&f->mu);
                c->len += (size_t)r;
                serve(f, c);
            }
            if (r <= 0 || c->len == sizeof(c->buf) - 1) {
                for (int i = 0; i < FAKE_MAX_CONNS; i++) {
                    if (conns[i] == c)
                        conns[i] = NULL;
                }
                close(c->fd);
                free(c);
            }
        }
    }
    for (int i = 0; i < FAKE_MAX_CONNS; i++) {
        if (conns[i] != NULL) {
            close(conns[i]->fd);
            free(conns[i]);
        }
    }
    return NULL;
}

static inline void fake_start(struct fake *f, const struct fake_resp *script, size_t len,
                              int unix_sock)
{
    memset(f, 0, sizeof(*f));
    f->script = script;
    f->script_len = len;
    pthread_mutex_init(&f->mu, NULL);
    assert_int_equal(pipe(f->stop_pipe), 0);
    if (unix_sock) {
        snprintf(f->dir, sizeof(f->dir), "/tmp/connectd-test-XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        snprintf(f->sock_path, sizeof(f->sock_path), "%s/agent.sock", f->dir);
        struct sockaddr_un sun = {.sun_family = AF_UNIX};
        memcpy(sun.sun_path, f->sock_path, strlen(f->sock_path) + 1);
        f->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(f->lfd >= 0);
        assert_int_equal(bind(f->lfd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    } else {
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = 0};
        sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(f->lfd >= 0);
        assert_int_equal(bind(f->lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
        socklen_t sl = sizeof(sin);
        assert_int_equal(getsockname(f->lfd, (struct sockaddr *)&sin, &sl), 0);
        f->port = ntohs(sin.sin_port);
    }
    assert_int_equal(listen(f->lfd, 16), 0);
    assert_int_equal(pthread_create(&f->thread, NULL, fake_main, f), 0);
}

static inline void fake_stop(struct fake *f)
{
    char c = 'x';
    assert_int_equal(write(f->stop_pipe[1], &c, 1), 1);
    pthread_join(f->thread, NULL);
    close(f->stop_pipe[0]);
    close(f->stop_pipe[1]);
    close(f->lfd);
    if (f->sock_path[0] != '\0') {
        unlink(f->sock_path);
        rmdir(f->dir);
    }
    for (size_t i = 0; i < f->nreq; i++)
        free(f->reqs[i]);
    pthread_mutex_destroy(&f->mu);
}

static inline size_t fake_nreq(struct fake *f)
{
    pthread_mutex_lock(&f->mu);
    size_t n = f->nreq;
    pthread_mutex_unlock(&f->mu);
    return n;
}

/* The request line of request <i>, e.g. "GET /v1/x?wait=1000ms HTTP/1.1". */
static inline char *req_line(struct fake *f, size_t i)
{
    assert_true(i < fake_nreq(f));
    return xstrndup(f->reqs[i], strcspn(f->reqs[i], "\r"));
}

static inline void assert_req_line(struct fake *f, size_t i, const char *want)
{
    char *line = req_line(f, i);
    if (strcmp(line, want) != 0)
        fail_msg("request %zu: got \"%s\", want \"%s\"", i, line, want);
    free(line);
}

#endif
