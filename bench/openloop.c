/* bench/openloop: an open-loop HTTP/1.1 load generator for S3.
 *
 *   openloop PORT RATE CONNS SECONDS PATH
 *
 * Sends RATE requests per second in total, spread round-robin over CONNS keep-alive
 * connections to 127.0.0.1:PORT, for SECONDS, on a fixed schedule that does not wait for
 * answers (requests are pipelined when answers are late). Each request is padded to 1 KiB.
 * The latency of a request is measured from the time it was *scheduled* to be sent to the
 * end of its answer, so a stalled proxy shows up in the percentiles instead of slowing the
 * load down (wrk measures closed loop and cannot do this). Prints one JSON object:
 * sent, answered, errors, p50_us, p99_us, p999_us, max_us.
 *
 * One thread, epoll, a timerfd at the next scheduled send. Not part of connectd: built by
 * `make bench-tools` into build/release/openloop.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define REQ_BYTES 1024
#define IN_BYTES 65536
#define OUT_BYTES (256 * 1024)
#define MAX_PENDING 65536

struct conn {
    int fd;
    int dead;
    size_t in_len;
    size_t out_len;
    size_t out_off;
    uint64_t *pending; /* scheduled send times (ns) of the requests not answered yet, FIFO */
    size_t pend_head;
    size_t pend_count;
    char in[IN_BYTES];
    char out[OUT_BYTES];
};

static char request[REQ_BYTES];
static uint64_t *lat_ns;
static size_t answered;
static size_t errors;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void kill_conn(struct conn *c)
{
    if (c->dead)
        return;
    c->dead = 1;
    errors += c->pend_count;
    c->pend_count = 0;
    close(c->fd);
}

static void flush_out(struct conn *c)
{
    int r = write_pending(c->fd, c->out, &c->out_off, c->out_len);
    if (r < 0)
        kill_conn(c);
    else if (r == 0)
        c->out_off = c->out_len = 0;
}

/* Consumes every complete answer in c->in. */
static void parse_answers(struct conn *c, uint64_t now)
{
    size_t off = 0;
    for (;;) {
        char *start = c->in + off;
        size_t avail = c->in_len - off;
        char *end = memmem(start, avail, "\r\n\r\n", 4);
        if (end == NULL)
            break;
        size_t head = (size_t)(end + 4 - start);
        char *cl = memmem(start, head, "Content-Length:", 15);
        size_t body = cl ? strtoul(cl + 15, NULL, 10) : 0;
        if (avail < head + body)
            break;
        if (c->pend_count > 0) {
            uint64_t sched = c->pending[c->pend_head];
            c->pend_head = (c->pend_head + 1) % MAX_PENDING;
            c->pend_count--;
            lat_ns[answered++] = now - sched;
        }
        off += head + body;
    }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
}

static void on_readable(struct conn *c)
{
    for (;;) {
        ssize_t n = read(c->fd, c->in + c->in_len, sizeof(c->in) - c->in_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            kill_conn(c);
            return;
        }
        c->in_len += (size_t)n;
        parse_answers(c, now_ns());
        if (c->in_len == sizeof(c->in)) {
            kill_conn(c); /* an answer larger than the buffer: not ours */
            return;
        }
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_us(size_t n, double p)
{
    if (n == 0)
        return -1;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return (double)lat_ns[i] / 1000.0;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: openloop PORT RATE CONNS SECONDS PATH\n");
        return 2;
    }
    long port = strtol(argv[1], NULL, 10), rate = strtol(argv[2], NULL, 10);
    long nconns = strtol(argv[3], NULL, 10), seconds = strtol(argv[4], NULL, 10);
    if (port <= 0 || port > 65535 || rate <= 0 || nconns <= 0 || nconns > 4096 || seconds <= 0) {
        fprintf(stderr, "openloop: bad arguments\n");
        return 2;
    }
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

    /* A 1 KiB request: the headers padded with one X-Pad header. */
    int head = snprintf(request, sizeof(request), "GET %s HTTP/1.1\r\nHost: bench\r\nX-Pad: ",
                        argv[5]);
    if (head < 0 || head > REQ_BYTES - 8)
        return 2;
    memset(request + head, 'p', (size_t)(REQ_BYTES - head - 4));
    memcpy(request + REQ_BYTES - 4, "\r\n\r\n", 4);

    size_t total = (size_t)rate * (size_t)seconds;
    lat_ns = xcalloc(total, sizeof(*lat_ns));
    struct conn **conns = xcalloc((size_t)nconns, sizeof(*conns));
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int one = 1;
    for (long i = 0; i < nconns; i++) {
        struct conn *c = xcalloc(1, sizeof(*c));
        c->pending = xcalloc(MAX_PENDING, sizeof(*c->pending));
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            fprintf(stderr, "openloop: connect 127.0.0.1:%ld: %s\n", port, strerror(errno));
            return 1;
        }
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK) < 0)
            return 1;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
        conns[i] = c;
    }
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

    uint64_t start = now_ns() + 10000000u, interval = 1000000000u / (uint64_t)rate;
    uint64_t drain_until = start + (uint64_t)seconds * 1000000000u + 5000000000u;
    size_t sent = 0;
    struct epoll_event evs[256];
    for (;;) {
        uint64_t now = now_ns();
        while (sent < total && start + sent * interval <= now) {
            struct conn *c = conns[sent % (size_t)nconns];
            uint64_t sched = start + sent * interval;
            sent++;
            if (c->dead || c->pend_count == MAX_PENDING ||
                c->out_len + REQ_BYTES > sizeof(c->out)) {
                errors++;
                continue;
            }
            memcpy(c->out + c->out_len, request, REQ_BYTES);
            c->out_len += REQ_BYTES;
            c->pending[(c->pend_head + c->pend_count) % MAX_PENDING] = sched;
            c->pend_count++;
            flush_out(c);
        }
        if (sent == total && answered + errors >= total)
            break;
        if (now >= drain_until)
            break;
        uint64_t next = sent < total ? start + sent * interval : drain_until;
        struct itimerspec its = {.it_value = {.tv_sec = (time_t)(next / 1000000000u),
                                              .tv_nsec = (long)(next % 1000000000u)}};
        timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                uint64_t exp;
                ssize_t r = read(tfd, &exp, sizeof(exp));
                (void)r;
                continue;
            }
            if (c->dead)
                continue;
            if (evs[i].events & EPOLLOUT)
                flush_out(c);
            if (!c->dead && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                on_readable(c);
        }
    }
    size_t unanswered = 0;
    for (long i = 0; i < nconns; i++)
        if (!conns[i]->dead)
            unanswered += conns[i]->pend_count;
    qsort(lat_ns, answered, sizeof(*lat_ns), cmp_u64);
    printf("{\"sent\": %zu, \"answered\": %zu, \"errors\": %zu, \"p50_us\": %.1f, "
           "\"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f}\n",
           sent, answered, errors + unanswered, pct_us(answered, 0.5), pct_us(answered, 0.99),
           pct_us(answered, 0.999), pct_us(answered, 1.0));
    return 0;
}
