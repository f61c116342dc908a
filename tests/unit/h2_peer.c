/*
 * h2_peer: the HTTP/2 codec on a real socket, for tests/integ/test_h2_interop.py, which
 * checks it against independent HTTP/2 implementations (curl, h2load, Python's h2, gRPC's C
 * core). Not part of connectd; built by `make test-tools`. Plain h2c (prior knowledge), one
 * connection at a time, blocking I/O: the codec does no I/O itself, so this loop is all it
 * needs.
 *
 *   h2_peer serve
 *       Listens on 127.0.0.1 (a free port, printed as the first line of stdout) and answers
 *       every request: gRPC requests (content-type application/grpc...) get their message
 *       back with trailers grpc-status 0; /deny gets a trailers-only grpc-status 7; /big?n=N
 *       gets N bytes; anything else gets its own body back, with x-method, x-path and
 *       x-authority headers. Runs until killed.
 *   h2_peer get PORT PATH [grpc]
 *       Sends one request (a GET, or with "grpc" a unary gRPC POST of a 5-byte message) and
 *       prints the response as one JSON line: status, headers, body length and FNV-1a hash,
 *       trailers, close code.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "h2.h"

#define BODY_MAX (8u << 20)

struct pstream {
    int32_t id;
    uint8_t *body;
    size_t len, cap, off;
    int grpc;  /* 1 a gRPC echo, 0 a plain echo, -1 answered at once */
    int ended; /* all of the body to send is in <body> */
};

struct peer {
    int fd;
    int server;
    /* Client: what came back. */
    int status, done;
    uint32_t close_code;
    size_t body_len;
    uint64_t body_hash;
    char headers[8192], trailers[1024];
    struct pstream req;
};

static void json_str(char *dst, size_t cap, struct http_slice s)
{
    size_t used = strlen(dst);
    for (size_t i = 0; i < s.len && used + 8 < cap; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if (c == '"' || c == '\\')
            used += (size_t)snprintf(dst + used, cap - used, "\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            used += (size_t)snprintf(dst + used, cap - used, "\\u%04x", c);
        else
            dst[used++] = (char)c;
    }
    dst[used] = '\0';
}

static void json_fields(char *dst, size_t cap, const struct http_header *f, size_t n)
{
    dst[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        size_t used = strlen(dst);
        snprintf(dst + used, cap - used, "%s[\"", i ? "," : "");
        json_str(dst, cap, f[i].name);
        used = strlen(dst);
        snprintf(dst + used, cap - used, "\",\"");
        json_str(dst, cap, f[i].value);
        used = strlen(dst);
        snprintf(dst + used, cap - used, "\"]");
    }
}

static void put(struct pstream *st, const uint8_t *p, size_t n)
{
    if (st->len + n > st->cap) {
        st->cap = (st->len + n) * 2;
        st->body = realloc(st->body, st->cap);
        if (st->body == NULL)
            abort();
    }
    memcpy(st->body + st->len, p, n);
    st->len += n;
}

static int on_head(struct h2_session *s, int32_t id, void *su, const struct h2_head *h, void *u)
{
    struct peer *pe = u;
    (void)su;
    if (!pe->server) {
        pe->status = h->status;
        json_fields(pe->headers, sizeof(pe->headers), h->headers, h->nheaders);
        return 0;
    }
    struct pstream *st = calloc(1, sizeof(*st));
    if (st == NULL)
        abort();
    st->id = id;
    for (size_t i = 0; i < h->nheaders; i++)
        if (h->headers[i].name.len == 12 && memcmp(h->headers[i].name.p, "content-type", 12) == 0 &&
            h->headers[i].value.len >= 16 &&
            memcmp(h->headers[i].value.p, "application/grpc", 16) == 0)
            st->grpc = 1;
    /* The head's slices die with this call: keep what the answer needs in the body buffer's
     * place until the request ends (the response is sent then). */
    char path[256];
    snprintf(path, sizeof(path), "%.*s", (int)h->path.len, h->path.p != NULL ? h->path.p : "");
    h2_stream_set_user(s, id, st);
    if (strcmp(path, "/deny") == 0) {
        static const struct http_header deny[] = {
            {{"content-type", 12}, {"application/grpc", 16}, 0},
            {{"grpc-status", 11}, {"7", 1}, 0},
            {{"grpc-message", 12}, {"denied", 6}, 0},
        };
        struct h2_out_head r = {.status = 200, .headers = deny, .nheaders = 3};
        h2_submit_response(s, id, &r, 0);
        st->grpc = -1; /* answered */
        st->ended = 1;
        return 0;
    }
    if (strncmp(path, "/big?n=", 7) == 0) {
        size_t n = strtoul(path + 7, NULL, 10);
        if (n > BODY_MAX)
            n = BODY_MAX;
        for (size_t i = 0; i < n; i++) {
            uint8_t b = (uint8_t)(i * 7 + (i >> 10));
            put(st, &b, 1);
        }
        st->ended = 1;
        struct h2_out_head r = {.status = 200};
        h2_submit_response(s, id, &r, 1);
        st->grpc = -1;
        return 0;
    }
    /* Echo: the response head is sent now, its body once the request's has arrived. */
    char xh[3][256];
    snprintf(xh[0], sizeof(xh[0]), "%.*s", (int)h->method.len, h->method.p);
    snprintf(xh[1], sizeof(xh[1]), "%s", path);
    snprintf(xh[2], sizeof(xh[2]), "%.*s", (int)h->authority.len,
             h->authority.p != NULL ? h->authority.p : "");
    struct http_header rh[] = {
        {{"content-type", 12},
         st->grpc ? (struct http_slice){"application/grpc", 16}
                  : (struct http_slice){"application/octet-stream", 24},
         0},
        {{"x-method", 8}, {xh[0], strlen(xh[0])}, 0},
        {{"x-path", 6}, {xh[1], strlen(xh[1])}, 0},
        {{"x-authority", 11}, {xh[2], strlen(xh[2])}, 0},
    };
    struct h2_out_head r = {.status = 200, .headers = rh, .nheaders = 4};
    h2_submit_response(s, id, &r, 1);
    return 0;
}

static int on_data(struct h2_session *s, int32_t id, void *su, const uint8_t *p, size_t n, void *u)
{
    struct peer *pe = u;
    struct pstream *st = su;
    if (!pe->server) {
        for (size_t i = 0; i < n; i++)
            pe->body_hash = (pe->body_hash ^ p[i]) * 1099511628211ull;
        pe->body_len += n;
    } else if (st != NULL && st->grpc != -1) {
        if (st->len + n > BODY_MAX)
            return -EMSGSIZE;
        put(st, p, n);
        h2_resume(s, id);
    }
    h2_consume(s, id, n);
    return 0;
}

static int on_trailers(struct h2_session *s, int32_t id, void *su, const struct http_header *f,
                       size_t n, void *u)
{
    struct peer *pe = u;
    (void)s;
    (void)id;
    (void)su;
    if (!pe->server)
        json_fields(pe->trailers, sizeof(pe->trailers), f, n);
    return 0;
}

static void on_end_stream(struct h2_session *s, int32_t id, void *su, void *u)
{
    struct peer *pe = u;
    struct pstream *st = su;
    if (!pe->server || st == NULL || st->grpc == -1)
        return;
    /* The whole request is in: the echo can end. */
    st->ended = 1;
    h2_resume(s, id);
}

static void on_close(struct h2_session *s, int32_t id, void *su, uint32_t code, void *u)
{
    struct peer *pe = u;
    struct pstream *st = su;
    (void)s;
    (void)id;
    if (!pe->server) {
        pe->done = 1;
        pe->close_code = code;
        return;
    }
    if (st != NULL) {
        free(st->body);
        free(st);
    }
}

static const struct http_header grpc_ok[] = {{{"grpc-status", 11}, {"0", 1}, 0},
                                             {{"grpc-message", 12}, {"OK", 2}, 0}};

/* Echo bodies flow as the request's arrive (on_data resumes them) and end with it. */
static ssize_t read_body(struct h2_session *s, int32_t id, void *su, uint8_t *buf, size_t cap,
                         unsigned *flags, void *u)
{
    struct peer *pe = u;
    struct pstream *st = pe->server ? su : &pe->req;
    size_t left = st->len - st->off;
    size_t n = left < cap ? left : cap;
    if (n == 0 && !st->ended)
        return H2_BODY_DEFER;
    if (n > 0)
        memcpy(buf, st->body + st->off, n);
    st->off += n;
    if (st->ended && st->off == st->len) {
        *flags |= H2_BODY_EOF;
        if (pe->server && st->grpc == 1) {
            *flags |= H2_BODY_TRAILERS;
            h2_submit_trailers(s, id, grpc_ok, 2);
        }
    }
    return (ssize_t)n;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Runs one connection until the codec wants nothing more or the peer goes away. */
static void run(struct peer *pe, struct h2_session *s)
{
    static uint8_t buf[65536];
    for (;;) {
        ssize_t n;
        while ((n = h2_output(s, buf, sizeof(buf))) > 0)
            if (write_all(pe->fd, buf, (size_t)n) < 0)
                return;
        if (n < 0 || (!h2_wants_read(s) && !h2_wants_write(s)) || (!pe->server && pe->done))
            return;
        ssize_t r = read(pe->fd, buf, sizeof(buf));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return;
        if (h2_feed(s, buf, (size_t)r) < 0) {
            while ((n = h2_output(s, buf, sizeof(buf))) > 0)
                if (write_all(pe->fd, buf, (size_t)n) < 0)
                    return;
            fprintf(stderr, "h2_peer: %s\n", h2_error(s));
            return;
        }
    }
}

static const struct h2_callbacks cbs = {on_head,  on_data, on_trailers, on_end_stream,
                                        on_close, NULL,    read_body};

static int serve(void)
{
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(ls, 16) != 0 ||
        getsockname(ls, (struct sockaddr *)&sa, &sl) != 0) {
        perror("h2_peer: listen");
        return 1;
    }
    printf("%d\n", ntohs(sa.sin_port));
    fflush(stdout);
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            perror("h2_peer: accept");
            return 1;
        }
        struct peer pe = {.fd = fd, .server = 1};
        struct h2_session *s = h2_session_new(H2_SERVER, NULL, &cbs, &pe);
        run(&pe, s);
        h2_session_free(s);
        close(fd);
    }
}

static int get(int port, const char *path, int grpc)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        perror("h2_peer: connect");
        return 1;
    }
    struct peer pe = {.fd = fd, .body_hash = 1469598103934665603ull};
    struct h2_session *s = h2_session_new(H2_CLIENT, NULL, &cbs, &pe);
    static const struct http_header gh[] = {{{"content-type", 12}, {"application/grpc", 16}, 0},
                                            {{"te", 2}, {"trailers", 8}, 0}};
    static uint8_t msg[] = {0, 0, 0, 0, 0}; /* an empty protobuf message */
    char authority[32];
    snprintf(authority, sizeof(authority), "127.0.0.1:%d", port);
    struct h2_out_head h = {.method = {grpc ? "POST" : "GET", grpc ? 4 : 3},
                            .scheme = {"http", 4},
                            .authority = {authority, strlen(authority)},
                            .path = {path, strlen(path)},
                            .headers = grpc ? gh : NULL,
                            .nheaders = grpc ? 2 : 0};
    pe.req.body = msg;
    pe.req.len = grpc ? sizeof(msg) : 0;
    pe.req.ended = 1;
    if (h2_submit_request(s, &h, grpc, NULL) < 0) {
        fprintf(stderr, "h2_peer: submit failed\n");
        return 1;
    }
    run(&pe, s);
    printf("{\"status\":%d,\"headers\":[%s],\"body_len\":%zu,\"body_fnv\":%llu,"
           "\"trailers\":[%s],\"close_code\":%u,\"done\":%d}\n",
           pe.status, pe.headers, pe.body_len, (unsigned long long)pe.body_hash, pe.trailers,
           pe.close_code, pe.done);
    h2_session_free(s);
    close(fd);
    return pe.done ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "serve") == 0)
        return serve();
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "get") == 0)
        return get((int)strtol(argv[2], NULL, 10), argv[3],
                   argc == 5 && strcmp(argv[4], "grpc") == 0);
    fprintf(stderr, "usage: h2_peer serve | h2_peer get PORT PATH [grpc]\n");
    return 2;
}
