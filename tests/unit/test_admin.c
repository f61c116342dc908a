/*
 * Unit tests for the admin endpoint's request parser and query decoder (pure functions), the
 * replay of the committed corpus (tests/fuzz/corpus/admin/) through the fuzz target, and the
 * server's connection bounds against real clients (the server on a loop of its own thread).
 * Run from the repository root.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "corpus.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "loop.h"

/* The target itself, so the replay runs exactly what the fuzzer runs. */
#include "../fuzz/fuzz_admin.c"

#define CORPUS_DIR   "tests/fuzz/corpus/admin"
#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Parses <s> from an exact-size copy (so ASan sees over-reads). */
static int parse(const char *s, size_t n, struct admin_request *req)
{
    char *buf = malloc(n != 0 ? n : 1);
    assert_non_null(buf);
    memcpy(buf, s, n);
    int rc = admin_parse_request(buf, n, req);
    free(buf);
    return rc;
}

static void test_complete_request(void **state)
{
    (void)state;
    static const char r[] = "GET /authz?source=web HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nrest";
    struct admin_request req;
    int rc = parse(r, sizeof(r) - 1, &req);
    assert_int_equal(rc, (int)(sizeof(r) - 1 - 4));
    assert_string_equal(req.method, "GET");
    assert_string_equal(req.path, "/authz");
    assert_string_equal(req.query, "source=web");
    assert_int_equal(req.minor_version, 1);
}

/* Every truncation of a valid head is "need more", never "bad" or a success. */
static void test_every_truncation_needs_more(void **state)
{
    (void)state;
    static const char *const heads[] = {
        "GET /ready HTTP/1.1\r\nHost: localhost:19100\r\nUser-Agent: curl/8.5\r\n\r\n",
        "GET /metrics HTTP/1.0\n\n",
        "GET /authz?source=a%2Fb&namespace=ns HTTP/1.1\r\nX-Empty:\r\nX-Tab:\ta\tb\r\n\r\n",
    };
    for (size_t h = 0; h < sizeof(heads) / sizeof(heads[0]); h++) {
        size_t len = strlen(heads[h]);
        struct admin_request req;
        for (size_t n = 0; n < len; n++)
            assert_int_equal(parse(heads[h], n, &req), -EAGAIN);
        assert_int_equal(parse(heads[h], len, &req), (int)len);
    }
}

static void test_garbage_is_bad(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "\x16\x03\x01\x02\x00",         /* a TLS ClientHello */
        "GET\r\n\r\n",                  /* no target */
        "GET /ready\r\n\r\n",           /* HTTP/0.9 style */
        "GET ready HTTP/1.1\r\n\r\n",   /* not origin-form */
        "GET  /ready HTTP/1.1\r\n\r\n", /* two spaces */
        "GET /ready HTTP/1.1 \r\n\r\n", /* trailing space */
        "GET /ready HTTP/1.x\r\n\r\n",  /* bad version digit */
        "GET /ready HTTP/1.1\r\nNo colon\r\n\r\n",
        "GET /ready HTTP/1.1\r\n: empty name\r\n\r\n",
        "GET /ready HTTP/1.1\r\nX: a\rb\r\n\r\n", /* bare CR inside a line */
        "GET /ready HTTP/1.1\r\nX: a\x01\r\n\r\n",
        "G\x01", /* refused before the line ends */
        "GET /re\x7f",
    };
    /* Found by fuzz_admin: a NUL counted as a token character (strchr finds the terminator). */
    static const char nul_name[] = "GET / HTTP/1.1\r\nConte.\0ngth: 3\r\n\r\n";
    struct admin_request r;
    assert_int_equal(parse(nul_name, sizeof(nul_name) - 1, &r), -EBADMSG);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct admin_request req;
        int rc = parse(bad[i], strlen(bad[i]), &req);
        if (rc != -EBADMSG)
            fail_msg("case %zu: expected -EBADMSG, got %d", i, rc);
    }
}

static void test_limits(void **state)
{
    (void)state;
    struct admin_request req;
    char *big = malloc(ADMIN_REQUEST_MAX + 100);
    assert_non_null(big);
    /* A head that never ends within the cap. */
    int n = snprintf(big, 64, "GET / HTTP/1.1\r\nX: ");
    memset(big + n, 'a', ADMIN_REQUEST_MAX + 100 - (size_t)n);
    assert_int_equal(parse(big, ADMIN_REQUEST_MAX - 1, &req), -EAGAIN);
    assert_int_equal(parse(big, ADMIN_REQUEST_MAX, &req), -EMSGSIZE);
    assert_int_equal(parse(big, ADMIN_REQUEST_MAX + 100, &req), -EMSGSIZE);
    /* A target over ADMIN_TARGET_MAX. */
    n = snprintf(big, 8, "GET /");
    memset(big + n, 'a', ADMIN_TARGET_MAX);
    memcpy(big + n + ADMIN_TARGET_MAX, " HTTP/1.1\r\n\r\n", 13);
    assert_int_equal(parse(big, (size_t)n + ADMIN_TARGET_MAX + 13, &req), -ENAMETOOLONG);
    free(big);
    assert_int_equal(parse("GET / HTTP/2.0\r\n\r\n", 18, &req), -EPROTONOSUPPORT);
    /* Methods other than GET parse; the server answers 405. */
    assert_int_equal(parse("DELETE / HTTP/1.1\r\n\r\n", 21, &req), 21);
    assert_string_equal(req.method, "DELETE");
}

static void test_query_param(void **state)
{
    (void)state;
    char v[16];
    assert_int_equal(admin_query_param("source=web&namespace=ns1", "source", v, sizeof(v)), 3);
    assert_string_equal(v, "web");
    assert_int_equal(admin_query_param("source=web&namespace=ns1", "namespace", v, sizeof(v)), 3);
    assert_string_equal(v, "ns1");
    assert_int_equal(admin_query_param("sourcex=1&source=a%2Fb+c", "source", v, sizeof(v)), 5);
    assert_string_equal(v, "a/b c");
    assert_int_equal(admin_query_param("source", "source", v, sizeof(v)), 0);
    assert_int_equal(admin_query_param("", "source", v, sizeof(v)), -ENOENT);
    assert_int_equal(admin_query_param("source=%zz", "source", v, sizeof(v)), -EINVAL);
    assert_int_equal(admin_query_param("source=%2", "source", v, sizeof(v)), -EINVAL);
    assert_int_equal(admin_query_param("source=%00", "source", v, sizeof(v)), -EINVAL);
    assert_int_equal(admin_query_param("source=0123456789abcdefg", "source", v, sizeof(v)),
                     -ENOSPC);
}

static void test_writers_escape(void **state)
{
    (void)state;
    struct admin_buf b = {0};
    admin_buf_json_str(&b, "a\"b\\c\n\x01");
    assert_string_equal(b.data, "\"a\\\"b\\\\c\\u000a\\u0001\"");
    admin_buf_dispose(&b);
    admin_buf_label(&b, "x\"y\\z\n");
    assert_string_equal(b.data, "\"x\\\"y\\\\z\\n\"");
    admin_buf_dispose(&b);
}

/* ---- the server against real clients ---- */

struct server {
    struct loop *loop;
    struct admin *admin;
    pthread_t thread;
    char dir[64];   /* for the unix socket; "" for TCP */
    char path[100]; /* the unix socket (sun_path holds 108) */
    int port;       /* TCP */
};

static void answer(void *data, const struct admin_request *req, struct admin_reply *reply)
{
    (void)data;
    if (strcmp(req->path, "/ready") != 0)
        reply->status = 404;
    admin_buf_printf(&reply->body, "%s\n", reply->status == 200 ? "ready" : "not found");
    admin_reply_send(reply);
}

/* Runs on the server's thread when the test asks it to stop. */
static void on_stop(struct loop *loop, void *data)
{
    struct server *srv = data;
    admin_stop(srv->admin);
    srv->admin = NULL;
    loop_stop(loop);
}

static void *serve(void *arg)
{
    struct server *srv = arg;
    loop_run(srv->loop);
    return NULL;
}

/* A free loopback port (bound, read, released: another process could take it meanwhile). */
static int free_port(void)
{
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(in);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&in, sizeof(in)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&in, &len), 0);
    close(fd);
    return ntohs(in.sin_port);
}

/* Starts an admin server on a unix socket in a fresh directory, or on TCP 127.0.0.1. */
static void server_start(struct server *srv, int on_unix)
{
    char bind[200], err[256];
    memset(srv, 0, sizeof(*srv));
    if (on_unix) {
        snprintf(srv->dir, sizeof(srv->dir), "/tmp/connectd-admin-XXXXXX");
        assert_non_null(mkdtemp(srv->dir));
        snprintf(srv->path, sizeof(srv->path), "%s/admin.sock", srv->dir);
        snprintf(bind, sizeof(bind), "unix://%s", srv->path);
    } else {
        srv->port = free_port();
        snprintf(bind, sizeof(bind), "127.0.0.1:%d", srv->port);
    }
    srv->loop = loop_new();
    assert_non_null(srv->loop);
    srv->admin = admin_start(srv->loop, bind, answer, NULL, err, sizeof(err));
    if (srv->admin == NULL)
        fail_msg("admin_start %s: %s", bind, err);
    loop_set_wakeup(srv->loop, on_stop, srv);
    assert_int_equal(pthread_create(&srv->thread, NULL, serve, srv), 0);
}

static void server_stop(struct server *srv)
{
    loop_wakeup(srv->loop);
    assert_int_equal(pthread_join(srv->thread, NULL), 0);
    loop_free(srv->loop);
    if (srv->dir[0] != '\0')
        assert_int_equal(rmdir(srv->dir), 0); /* admin_stop removed the socket */
}

/* A blocking client connection (3 s receive timeout): the unix socket, or TCP from <src>. */
static int dial(const struct server *srv, const char *src)
{
    struct timeval tv = {.tv_sec = 3};
    int fd;
    if (srv->dir[0] != '\0') {
        struct sockaddr_un un = {.sun_family = AF_UNIX};
        snprintf(un.sun_path, sizeof(un.sun_path), "%s", srv->path);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        assert_true(fd >= 0);
        assert_int_equal(connect(fd, (struct sockaddr *)&un, sizeof(un)), 0);
    } else {
        struct sockaddr_in from = {.sin_family = AF_INET}, to = {.sin_family = AF_INET};
        assert_int_equal(inet_pton(AF_INET, src, &from.sin_addr), 1);
        assert_int_equal(inet_pton(AF_INET, "127.0.0.1", &to.sin_addr), 1);
        to.sin_port = htons((unsigned short)srv->port);
        fd = socket(AF_INET, SOCK_STREAM, 0);
        assert_true(fd >= 0);
        assert_int_equal(bind(fd, (struct sockaddr *)&from, sizeof(from)), 0);
        assert_int_equal(connect(fd, (struct sockaddr *)&to, sizeof(to)), 0);
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

/* GET /ready from <src>: the status line, or "" when the server closed without an answer. */
static void get_ready(const struct server *srv, const char *src, char *status, size_t len)
{
    static const char req[] = "GET /ready HTTP/1.1\r\nHost: admin\r\n\r\n";
    char buf[1024];
    size_t got = 0;
    int fd = dial(srv, src);
    assert_int_equal(send(fd, req, sizeof(req) - 1, MSG_NOSIGNAL), (ssize_t)(sizeof(req) - 1));
    for (;;) {
        ssize_t n = recv(fd, buf + got, sizeof(buf) - 1 - got, 0);
        if (n <= 0)
            break; /* EOF, a reset, or the 3 s timeout (then the check below fails) */
        got += (size_t)n;
    }
    buf[got] = '\0';
    close(fd);
    char *eol = strstr(buf, "\r\n");
    snprintf(status, len, "%.*s", eol != NULL ? (int)(eol - buf) : 0, buf);
}

/* Whether the server has closed <fd> within <wait_ms> (EOF or a reset, maybe after a 503). */
static int closed_by_server(int fd, int wait_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    char buf[256];
    if (poll(&p, 1, wait_ms) <= 0)
        return 0;
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            return 1;
        if (n < 0)
            return 0;
    }
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/*
 * Issue 7 defect 4: ADMIN_MAX_CONNS silent connections held every slot, and the probe's
 * GET /ready was closed at accept, unanswered: a readiness probe saw an outage. All come from
 * one peer, as a local probe and a local attacker do. Now the oldest silent one is evicted.
 */
static void silent_clients_cannot_starve_ready(int on_unix)
{
    struct server srv;
    int silent[2 * ADMIN_MAX_CONNS];
    size_t n = sizeof(silent) / sizeof(silent[0]);
    char status[128];
    server_start(&srv, on_unix);
    for (size_t i = 0; i < n; i++)
        silent[i] = dial(&srv, "127.0.0.1");
    uint64_t t0 = now_ms();
    get_ready(&srv, "127.0.0.1", status, sizeof(status));
    assert_string_equal(status, "HTTP/1.1 200 OK");
    /* Answered by eviction, not because deadlines freed the slots. */
    assert_true(now_ms() - t0 < ADMIN_HEAD_DEADLINE_MS / 2);
    /* The oldest went first; the newest still hold their slots. */
    assert_true(closed_by_server(silent[0], 1000));
    assert_false(closed_by_server(silent[n - 1], 0));
    /* And it keeps answering while the silent clients stay. */
    for (int i = 0; i < 3; i++) {
        get_ready(&srv, "127.0.0.1", status, sizeof(status));
        assert_string_equal(status, "HTTP/1.1 200 OK");
    }
    assert_false(closed_by_server(silent[n - 1], 0));
    for (size_t i = 0; i < n; i++)
        close(silent[i]);
    server_stop(&srv);
}

static void test_silent_clients_cannot_starve_ready_unix(void **state)
{
    (void)state;
    silent_clients_cannot_starve_ready(1);
}

static void test_silent_clients_cannot_starve_ready_tcp(void **state)
{
    (void)state;
    silent_clients_cannot_starve_ready(0);
}

/* A flood from one address evicts its own connections, not another peer's. */
static void test_one_peer_cannot_evict_another(void **state)
{
    (void)state;
    struct server srv;
    int other[ADMIN_MAX_CONNS_PER_PEER / 2], flood[3 * ADMIN_MAX_CONNS];
    char status[128];
    server_start(&srv, 0);
    for (size_t i = 0; i < ARRAY_LEN(other); i++)
        other[i] = dial(&srv, "127.0.0.2");
    for (size_t i = 0; i < ARRAY_LEN(flood); i++)
        flood[i] = dial(&srv, "127.0.0.1");
    get_ready(&srv, "127.0.0.1", status, sizeof(status));
    assert_string_equal(status, "HTTP/1.1 200 OK");
    get_ready(&srv, "127.0.0.3", status, sizeof(status));
    assert_string_equal(status, "HTTP/1.1 200 OK");
    assert_true(closed_by_server(flood[0], 1000));
    for (size_t i = 0; i < ARRAY_LEN(other); i++)
        assert_false(closed_by_server(other[i], 0));
    for (size_t i = 0; i < ARRAY_LEN(other); i++)
        close(other[i]);
    for (size_t i = 0; i < ARRAY_LEN(flood); i++)
        close(flood[i]);
    server_stop(&srv);
}

/* A client that sends no complete head is cut at the head deadline, well before the 5 s. */
static void test_head_deadline_is_short(void **state)
{
    (void)state;
    struct server srv;
    char buf[256];
    server_start(&srv, 0);
    int fd = dial(&srv, "127.0.0.1");
    uint64_t t0 = now_ms();
    assert_int_equal(send(fd, "GET /ready HTTP/1.1\r\n", 21, MSG_NOSIGNAL), 21);
    ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
    uint64_t took = now_ms() - t0;
    assert_true(n > 0);
    buf[n] = '\0';
    assert_non_null(strstr(buf, "HTTP/1.1 408"));
    assert_true(took >= ADMIN_HEAD_DEADLINE_MS - 100);
    assert_true(took < ADMIN_DEADLINE_MS - 1000);
    close(fd);
    server_stop(&srv);
}

static void test_replay_admin_corpus(void **state)
{
    (void)state;
    corpus_replay(CORPUS_DIR, LLVMFuzzerTestOneInput);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_complete_request),
        cmocka_unit_test(test_every_truncation_needs_more),
        cmocka_unit_test(test_garbage_is_bad),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_query_param),
        cmocka_unit_test(test_writers_escape),
        cmocka_unit_test(test_replay_admin_corpus),
        cmocka_unit_test(test_silent_clients_cannot_starve_ready_unix),
        cmocka_unit_test(test_silent_clients_cannot_starve_ready_tcp),
        cmocka_unit_test(test_one_peer_cannot_evict_another),
        cmocka_unit_test(test_head_deadline_is_short),
    };
    return cmocka_run_group_tests_name("admin", tests, NULL, NULL);
}
