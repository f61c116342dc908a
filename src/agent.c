/*
 * agent: libcurl's multi-socket interface driven by our epoll loop.
 *
 * curl tells us which sockets to watch (socket callback) and when to wake it (timer
 * callback); we tell curl what happened with curl_multi_socket_action(). After every such
 * call, finished transfers are taken off the multi handle and queued on <done>, and only then
 * are their callbacks run, one at a time, outside any curl call. That gives the guarantees in
 * agent.h: a callback never runs inside agent_request(), and it may start or cancel requests
 * freely (a cancelled request still waiting on <done> is unlinked and never called back).
 *
 * Socket watchers are small heap objects that curl associates with each socket. When curl
 * stops watching a socket, its watcher is unregistered from epoll at once but freed only
 * through loop_defer(): the current epoll batch may still hold an event that points at it.
 *
 * Connections stay in the multi handle's cache between requests, so a watch that re-issues
 * its blocking query reuses the same connection.
 *
 * Secrets: answers carry the leaf's private key and requests carry the ACL token, so nothing
 * that held them goes back to the heap unwiped. Bodies grow by allocate, copy and wipe (never
 * realloc), and are wiped when freed. libcurl's own buffers (the request it builds, what it
 * receives, zlib's window when the agent compresses) come from allocation callbacks that wipe
 * every block on free (curl_global_init_mem). The token lives in one header list that every
 * request without a body shares; a request with a body copies it into its own list, wiped when
 * the request is freed.
 */
#include "agent.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/un.h>

#define DEFAULT_ADDR       "127.0.0.1:8500"
#define DEFAULT_MAX_BODY   (16u * 1024 * 1024)
#define CONNECT_TIMEOUT_MS 10000L
#define AGENT_RECV_BUF     4096L /* CURLOPT_BUFFERSIZE; see setup_easy() */
#define BODY_TOO_LARGE     "response body too large"

struct sock {
    struct loop_io io;
    struct loop_defer reap;
    struct sock *prev, *next; /* in agent->socks while curl watches the socket */
};

struct agent_req {
    struct agent *a;
    CURL *easy;
    struct curl_slist *headers;
    agent_cb cb;
    void *data;
    struct agent_req *prev, *next; /* in agent->active, then in agent->done */
    int queued_done;               /* on <done> rather than <active> */
    char *body;
    size_t body_len, body_cap;
    int too_big;
    struct agent_headers hdr;
    CURLcode result;
    long status;
    char errbuf[CURL_ERROR_SIZE];
};

struct req_list {
    struct agent_req *head, *tail;
};

struct agent {
    struct loop *loop;
    CURLM *multi;
    struct loop_timer timer;
    struct loop_timer kick; /* runs <done> when a request failed before reaching curl */
    struct req_list active, done;
    struct sock *socks;
    struct agent_req *dispatching; /* whose callback is running now */
    int closing;                   /* in agent_free(): ignore curl's socket callbacks */
    char *addr;                    /* as given, for logs */
    char *base_url;                /* scheme://host[:port][/prefix], no trailing '/' */
    char *unix_path;
    struct curl_slist *token_list; /* one "X-Consul-Token: ..." node, or NULL */
    char *ca_file, *ca_path, *client_cert, *client_key;
    struct curl_slist *connect_to;
    int https;
    int ssl_verify;
    size_t max_body;
};

/* ---- one-time library initialisation ---- */

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_rc;

/* libcurl's allocator: the heap's, except that every block is wiped before it is freed. */
static void *curl_malloc_wiping(size_t n)
{
    return malloc(n);
}

static void *curl_realloc_wiping(void *p, size_t n)
{
    return util_wipe_realloc(p, n);
}

static char *curl_strdup_wiping(const char *s)
{
    return strdup(s);
}

static void *curl_calloc_wiping(size_t nmemb, size_t size)
{
    return calloc(nmemb, size);
}

static void global_init_once(void)
{
    global_rc = curl_global_init_mem(CURL_GLOBAL_DEFAULT, curl_malloc_wiping, util_wipe_free_block,
                                     curl_realloc_wiping, curl_strdup_wiping, curl_calloc_wiping);
}

int agent_global_init(void)
{
    pthread_once(&global_once, global_init_once);
    return global_rc == CURLE_OK ? 0 : -ENOMEM;
}

void agent_global_cleanup(void)
{
    curl_global_cleanup();
}

/* ---- request lists ---- */

static void list_push(struct req_list *l, struct agent_req *r)
{
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail != NULL)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
}

static void list_unlink(struct req_list *l, struct agent_req *r)
{
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
}

/* Frees a header list after wiping its strings (one may carry the token). */
static void slist_wipe_free(struct curl_slist *l)
{
    for (struct curl_slist *n = l; n != NULL; n = n->next)
        util_wipe(n->data, strlen(n->data));
    curl_slist_free_all(l);
}

static void req_free(struct agent_req *r)
{
    if (r->easy != NULL)
        curl_easy_cleanup(r->easy);
    slist_wipe_free(r->headers);
    util_wipe_free(r->body, r->body_cap);
    free(r);
}

/* ---- completion ---- */

static void run_done(struct agent *a)
{
    struct agent_req *r;
    while ((r = a->done.head) != NULL) {
        list_unlink(&a->done, r);
        r->queued_done = 0;

        struct agent_response resp = {0};
        resp.status = r->status;
        resp.error = "";
        if (r->too_big) {
            resp.status = 0;
            resp.error = BODY_TOO_LARGE;
            resp.body_too_large = 1;
        } else if (r->result != CURLE_OK) {
            resp.status = 0;
            resp.error = r->errbuf[0] != '\0' ? r->errbuf : curl_easy_strerror(r->result);
        }
        resp.body = r->body != NULL && !r->too_big ? r->body : "";
        resp.body_len = r->too_big ? 0 : r->body_len;
        resp.index = r->hdr.index;
        resp.content_hash = r->hdr.content_hash;
        resp.default_acl_policy = r->hdr.acl_policy;

        a->dispatching = r;
        r->cb(r->data, &resp);
        a->dispatching = NULL;
        req_free(r);
    }
}

static void on_kick(struct loop_timer *t)
{
    run_done(t->data);
}

/* Moves every finished transfer from curl to <done>, then runs their callbacks. */
static void collect_and_run(struct agent *a)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(a->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *easy = msg->easy_handle;
        CURLcode result = msg->data.result; /* <msg> dies with curl_multi_remove_handle() */
        struct agent_req *r = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&r);
        curl_multi_remove_handle(a->multi, easy);
        r->result = result;
        if (result == CURLE_FILESIZE_EXCEEDED) /* Content-Length above max_body */
            r->too_big = 1;
        curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &r->status);
        list_unlink(&a->active, r);
        list_push(&a->done, r);
        r->queued_done = 1;
    }
    run_done(a);
}

/* ---- curl's socket and timer callbacks ---- */

static void on_sock_reap(struct loop_defer *d)
{
    free((char *)d - offsetof(struct sock, reap));
}

static void sock_release(struct agent *a, struct sock *s)
{
    if (loop_io_want(a->loop, &s->io, 0) != 0)
        s->io.want = 0; /* the fd is gone already, and with it the registration */
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        a->socks = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    loop_defer(a->loop, &s->reap, on_sock_reap);
}

static void on_sock_event(struct loop_io *io, unsigned events)
{
    struct agent *a = io->data;
    int mask = 0;
    if (events & LOOP_READ)
        mask |= CURL_CSELECT_IN;
    if (events & LOOP_WRITE)
        mask |= CURL_CSELECT_OUT;
    if (events & LOOP_ERROR)
        mask |= CURL_CSELECT_ERR;
    int running;
    curl_multi_socket_action(a->multi, io->fd, mask, &running);
    collect_and_run(a);
}

static int on_curl_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    struct agent *a = userp;
    struct sock *s = socketp;
    (void)easy;
    if (a->closing)
        return 0;
    if (what == CURL_POLL_REMOVE) {
        if (s != NULL) {
            curl_multi_assign(a->multi, fd, NULL);
            sock_release(a, s);
        }
        return 0;
    }
    if (s == NULL) {
        s = xcalloc(1, sizeof(*s));
        loop_io_init(&s->io, fd, on_sock_event, a);
        s->next = a->socks;
        if (a->socks != NULL)
            a->socks->prev = s;
        a->socks = s;
        curl_multi_assign(a->multi, fd, s);
    }
    unsigned want = 0;
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
        want |= LOOP_READ;
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
        want |= LOOP_WRITE;
    int rc = loop_io_want(a->loop, &s->io, want);
    if (rc != 0) {
        LOG_ERROR("agent %s: cannot watch socket %d: %s", a->addr, (int)fd, util_strerror(rc));
        return -1;
    }
    return 0;
}

static void on_timer(struct loop_timer *t)
{
    struct agent *a = t->data;
    int running;
    curl_multi_socket_action(a->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    collect_and_run(a);
}

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    struct agent *a = userp;
    (void)multi;
    /* Never call curl back from here: the loop runs the timer, even for a 0 ms timeout. */
    if (timeout_ms < 0)
        loop_timer_stop(a->loop, &a->timer);
    else
        loop_timer_start(a->loop, &a->timer, (uint64_t)timeout_ms);
    return 0;
}

/* ---- per-transfer data callbacks ---- */

/* An https:// agent's SSL_CTX, before its first handshake. */
static CURLcode on_ssl_ctx(CURL *easy, void *ssl_ctx, void *userp)
{
    (void)easy;
    (void)userp;
    tls_agent_ctx_setup(ssl_ctx);
    return CURLE_OK;
}

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userp)
{
    struct agent_req *r = userp;
    size_t n = size * nmemb;
    if (n > r->a->max_body - r->body_len) {
        r->too_big = 1;
        return 0; /* fails the transfer with CURLE_WRITE_ERROR */
    }
    if (r->body_len + n + 1 > r->body_cap) {
        size_t cap = r->body_cap ? r->body_cap : 4096;
        while (cap < r->body_len + n + 1)
            cap *= 2;
        r->body = util_wipe_realloc(r->body, cap); /* the old block is wiped, not left behind */
        r->body_cap = cap;
    }
    memcpy(r->body + r->body_len, ptr, n);
    r->body_len += n;
    r->body[r->body_len] = '\0';
    return n;
}

/*
 * Copies a header value without surrounding blanks. Values that do not fit, and values with a
 * control byte inside (a NUL would cut the text short and leave a CR before it), are dropped.
 */
static void copy_value(char *dst, size_t dst_len, const char *v, size_t len)
{
    while (len > 0 && (*v == ' ' || *v == '\t')) {
        v++;
        len--;
    }
    while (len > 0 &&
           (v[len - 1] == '\r' || v[len - 1] == '\n' || v[len - 1] == ' ' || v[len - 1] == '\t'))
        len--;
    if (len >= dst_len)
        len = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)v[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            len = 0;
    }
    memcpy(dst, v, len);
    dst[len] = '\0';
}

static int header_is(const char *line, size_t len, const char *name, const char **value,
                     size_t *value_len)
{
    size_t n = strlen(name);
    if (len <= n || line[n] != ':' || strncasecmp(line, name, n) != 0)
        return 0;
    *value = line + n + 1;
    *value_len = len - n - 1;
    return 1;
}

void agent_parse_header(const char *line, size_t len, struct agent_headers *h)
{
    const char *v;
    size_t vlen;
    if (len >= 5 && memcmp(line, "HTTP/", 5) == 0) {
        /* A new response (after 100 Continue, say): forget the previous one's headers. */
        h->index = 0;
        h->content_hash[0] = '\0';
        h->acl_policy[0] = '\0';
    } else if (header_is(line, len, "X-Consul-Index", &v, &vlen)) {
        char buf[32];
        copy_value(buf, sizeof(buf), v, vlen);
        char *end;
        errno = 0;
        unsigned long long idx = strtoull(buf, &end, 10);
        h->index = buf[0] >= '0' && buf[0] <= '9' && *end == '\0' && errno == 0 ? idx : 0;
    } else if (header_is(line, len, "X-Consul-ContentHash", &v, &vlen)) {
        copy_value(h->content_hash, sizeof(h->content_hash), v, vlen);
    } else if (header_is(line, len, "X-Consul-Default-ACL-Policy", &v, &vlen)) {
        copy_value(h->acl_policy, sizeof(h->acl_policy), v, vlen);
    }
}

static size_t on_header(char *line, size_t size, size_t nmemb, void *userp)
{
    struct agent_req *r = userp;
    size_t len = size * nmemb;
    agent_parse_header(line, len, &r->hdr);
    return len;
}

/* ---- address parsing ---- */

static int has_ctl(const char *s)
{
    for (; *s != '\0'; s++) {
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return 1;
    }
    return 0;
}

/*
 * Splits "host[:port][/prefix]" (the part after "http(s)://") into the authority and the
 * prefix. The authority must name a host.
 */
static int split_authority(const char *rest, char **authority, char **prefix)
{
    size_t alen = strcspn(rest, "/?#");
    if (alen == 0 || rest[alen] == '?' || rest[alen] == '#' || strchr(rest, '@') != NULL)
        return -EINVAL;
    const char *p = rest + alen;
    size_t plen = strlen(p);
    if (strpbrk(p, "?#") != NULL)
        return -EINVAL;
    while (plen > 0 && p[plen - 1] == '/')
        plen--;
    *authority = xstrndup(rest, alen);
    *prefix = xstrndup(p, plen);
    return 0;
}

/*
 * With a TLS server name, the URL carries that name (so curl sends it as SNI and verifies the
 * certificate against it) while CURLOPT_CONNECT_TO sends the connection to the real host.
 */
static int setup_server_name(struct agent *a, const char *authority, const char *prefix,
                             const char *server_name, char *err, size_t errlen)
{
    char host[256];
    int port = 443;
    if (util_split_hostport(authority, host, sizeof(host), &port) != 0) {
        size_t hl = strlen(authority);
        if (hl >= sizeof(host) || strchr(authority, ':') != NULL) {
            snprintf(err, errlen, "agent address \"%s\": cannot find host and port", a->addr);
            return -EINVAL;
        }
        memcpy(host, authority, hl + 1);
    }
    char name[256];
    size_t nl = strcspn(server_name, ":"); /* CONSUL_TLS_SERVER_NAME drops any :port */
    if (nl == 0 || nl >= sizeof(name) || has_ctl(server_name)) {
        snprintf(err, errlen, "bad tls_server_name \"%s\"", server_name);
        return -EINVAL;
    }
    memcpy(name, server_name, nl);
    name[nl] = '\0';
    int v6 = strchr(host, ':') != NULL;
    char *map = xasprintf("%s:%d:%s%s%s:%d", name, port, v6 ? "[" : "", host, v6 ? "]" : "", port);
    a->connect_to = curl_slist_append(NULL, map);
    free(map);
    if (a->connect_to == NULL)
        abort();
    a->base_url = xasprintf("https://%s:%d%s", name, port, prefix);
    return 0;
}

static int parse_addr(struct agent *a, const struct agent_opts *opts, char *err, size_t errlen)
{
    const char *addr = a->addr;
    if (has_ctl(addr) || strchr(addr, ' ') != NULL) {
        snprintf(err, errlen, "agent address \"%s\": contains blanks or control characters", addr);
        return -EINVAL;
    }
    if (strncmp(addr, "unix://", 7) == 0) {
        const char *path = addr + 7;
        if (path[0] == '\0' || strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
            snprintf(err, errlen, "agent address \"%s\": bad unix socket path", addr);
            return -EINVAL;
        }
        a->unix_path = xstrdup(path);
        /* Like Consul's Go client, speak to the socket as host "localhost". */
        a->base_url = xstrdup("http://localhost");
        return 0;
    }
    const char *rest;
    if (strncmp(addr, "http://", 7) == 0) {
        rest = addr + 7;
    } else if (strncmp(addr, "https://", 8) == 0) {
        rest = addr + 8;
        a->https = 1;
    } else if (strstr(addr, "://") != NULL) {
        snprintf(err, errlen,
                 "agent address \"%s\": unsupported scheme (use http://, https:// or unix://)",
                 addr);
        return -EINVAL;
    } else {
        char host[256];
        int port;
        if (util_split_hostport(addr, host, sizeof(host), &port) != 0 || host[0] == '\0' ||
            strchr(addr, '/') != NULL) {
            snprintf(err, errlen, "agent address \"%s\": expected host:port or a URL", addr);
            return -EINVAL;
        }
        a->base_url = xasprintf("http://%s", addr);
        return 0;
    }
    char *authority, *prefix;
    if (split_authority(rest, &authority, &prefix) != 0) {
        snprintf(err, errlen, "agent address \"%s\": expected scheme://host[:port][/prefix]", addr);
        return -EINVAL;
    }
    int rc = 0;
    if (a->https && opts->tls_server_name != NULL && opts->tls_server_name[0] != '\0')
        rc = setup_server_name(a, authority, prefix, opts->tls_server_name, err, errlen);
    else
        a->base_url = xasprintf("%s://%s%s", a->https ? "https" : "http", authority, prefix);
    free(authority);
    free(prefix);
    return rc;
}

static char *dup_opt(const char *s)
{
    return s != NULL && s[0] != '\0' ? xstrdup(s) : NULL;
}

/* ---- public interface ---- */

struct agent *agent_new(struct loop *loop, const struct agent_opts *opts, char *err, size_t errlen)
{
    static const struct agent_opts no_opts = {.ssl_verify = 1};
    if (opts == NULL)
        opts = &no_opts;
    if (errlen > 0)
        err[0] = '\0';
    if (agent_global_init() != 0) {
        snprintf(err, errlen, "cannot initialise libcurl");
        return NULL;
    }
    struct agent *a = xcalloc(1, sizeof(*a));
    a->loop = loop;
    a->addr = xstrdup(opts->addr != NULL && opts->addr[0] != '\0' ? opts->addr : DEFAULT_ADDR);
    a->max_body = opts->max_body_bytes ? opts->max_body_bytes : DEFAULT_MAX_BODY;
    a->ssl_verify = opts->ssl_verify;
    loop_timer_init(&a->timer, on_timer, a);
    loop_timer_init(&a->kick, on_kick, a);

    if (parse_addr(a, opts, err, errlen) != 0)
        goto fail;
    if (opts->token != NULL && opts->token[0] != '\0') {
        if (has_ctl(opts->token)) {
            snprintf(err, errlen, "token: contains control characters");
            goto fail;
        }
        char *h = xasprintf("X-Consul-Token: %s", opts->token);
        a->token_list = curl_slist_append(NULL, h);
        util_wipe_free(h, strlen(h));
        if (a->token_list == NULL)
            abort(); /* out of memory */
    }
    a->ca_file = dup_opt(opts->ca_file);
    a->ca_path = dup_opt(opts->ca_path);
    a->client_cert = dup_opt(opts->client_cert);
    a->client_key = dup_opt(opts->client_key);
    if ((a->client_cert == NULL) != (a->client_key == NULL)) {
        snprintf(
            err, errlen, "%s given without %s",
            a->client_cert ? "client_cert (CONSUL_CLIENT_CERT)" : "client_key (CONSUL_CLIENT_KEY)",
            a->client_cert ? "client_key (CONSUL_CLIENT_KEY)" : "client_cert (CONSUL_CLIENT_CERT)");
        goto fail;
    }

    a->multi = curl_multi_init();
    if (a->multi == NULL) {
        snprintf(err, errlen, "cannot create a libcurl multi handle");
        goto fail;
    }
    curl_multi_setopt(a->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(a->multi, CURLMOPT_SOCKETDATA, a);
    curl_multi_setopt(a->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(a->multi, CURLMOPT_TIMERDATA, a);
    return a;

fail:
    agent_free(a);
    return NULL;
}

void agent_free(struct agent *a)
{
    if (a == NULL)
        return;
    struct agent_req *r;
    while ((r = a->active.head) != NULL)
        agent_cancel(r);
    while ((r = a->done.head) != NULL)
        agent_cancel(r);
    /*
     * Unregister the sockets of cached connections while their fds are still open; curl may
     * close them during cleanup without calling the socket callback.
     */
    a->closing = 1;
    if (a->multi != NULL) {
        while (a->socks != NULL) {
            curl_multi_assign(a->multi, a->socks->io.fd, NULL);
            sock_release(a, a->socks);
        }
        curl_multi_cleanup(a->multi);
    }
    loop_timer_stop(a->loop, &a->timer);
    loop_timer_stop(a->loop, &a->kick);
    curl_slist_free_all(a->connect_to);
    free(a->addr);
    free(a->base_url);
    free(a->unix_path);
    slist_wipe_free(a->token_list);
    free(a->ca_file);
    free(a->ca_path);
    free(a->client_cert);
    free(a->client_key);
    free(a);
}

const char *agent_addr(const struct agent *a)
{
    return a->addr;
}

struct loop *agent_loop(const struct agent *a)
{
    return a->loop;
}

char *agent_scope_query(const char *ns, const char *partition)
{
    int send_ns = ns[0] != '\0' && strcmp(ns, "default") != 0;
    int send_part = partition[0] != '\0' && strcmp(partition, "default") != 0;
    char *ens = util_url_escape(ns), *epart = util_url_escape(partition);
    char *q = xasprintf("%s%s%s%s", send_ns ? "&ns=" : "", send_ns ? ens : "",
                        send_part ? "&partition=" : "", send_part ? epart : "");
    free(ens);
    free(epart);
    return q;
}

static void add_header(struct agent_req *r, const char *h)
{
    struct curl_slist *l = curl_slist_append(r->headers, h);
    if (l == NULL)
        abort(); /* out of memory */
    r->headers = l;
}

static void setup_easy(struct agent *a, struct agent_req *r, const char *method, const char *path,
                       const char *body, long timeout_ms)
{
    CURL *e = r->easy;
    char *url = xasprintf("%s%s", a->base_url, path);
    curl_easy_setopt(e, CURLOPT_URL, url);
    free(url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    /* The agent is local: environment proxy settings must not reroute (or see) our token. */
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_USERAGENT, "connectd");
    curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms > 0 ? timeout_ms : 0L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, CONNECT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    /* Every request in flight holds a receive buffer this big, and a sidecar always has one
     * blocking query per watch waiting: libcurl's default of 16 KiB each was an eighth of an
     * idle sidecar's heap. A bigger answer takes a few more reads. */
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, AGENT_RECV_BUF);
    curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)a->max_body);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    if (a->unix_path != NULL)
        curl_easy_setopt(e, CURLOPT_UNIX_SOCKET_PATH, a->unix_path);
    if (a->connect_to != NULL)
        curl_easy_setopt(e, CURLOPT_CONNECT_TO, a->connect_to);
    if (a->https) {
        if (a->ca_file != NULL)
            curl_easy_setopt(e, CURLOPT_CAINFO, a->ca_file);
        if (a->ca_path != NULL)
            curl_easy_setopt(e, CURLOPT_CAPATH, a->ca_path);
        if (a->client_cert != NULL) {
            curl_easy_setopt(e, CURLOPT_SSLCERT, a->client_cert);
            curl_easy_setopt(e, CURLOPT_SSLKEY, a->client_key);
        }
        /*
         * HTTP/1.1 even where ALPN offers h2: nghttp2 keeps every header it sent or received,
         * the token among them, in its HPACK tables and buffers, allocated and freed out of our
         * reach (and the agent is local: multiplexing saves little).
         */
        curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
        /* Not built in unless libcurl uses OpenSSL, which is then ours too. */
        curl_easy_setopt(e, CURLOPT_SSL_CTX_FUNCTION, on_ssl_ctx);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, a->ssl_verify ? 1L : 0L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, a->ssl_verify ? 2L : 0L);
    }

    if (body != NULL && a->token_list != NULL)
        add_header(r, a->token_list->data);
    if (strcmp(method, "GET") == 0 && body == NULL) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else {
        if (body != NULL) {
            add_header(r, "Content-Type: application/json");
            add_header(r, "Expect:"); /* no 100-continue round trip for large bodies */
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
            curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, body);
        } else if (strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0) {
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
            curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, "");
        }
        if (strcmp(method, "POST") != 0)
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    }
    /* Requests without a body need no header but the token: they share the agent's list. */
    if (r->headers != NULL)
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
    else if (a->token_list != NULL)
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, a->token_list);
}

/* Finishes <r> with a transport error from the loop, never from inside agent_request(). */
static void fail_later(struct agent *a, struct agent_req *r, const char *why)
{
    snprintf(r->errbuf, sizeof(r->errbuf), "%s", why);
    r->result = CURLE_FAILED_INIT;
    list_push(&a->done, r);
    r->queued_done = 1;
    loop_timer_start(a->loop, &a->kick, 0);
}

struct agent_req *agent_request(struct agent *a, const char *method, const char *path,
                                const char *body, long timeout_ms, agent_cb cb, void *data)
{
    struct agent_req *r = xcalloc(1, sizeof(*r));
    r->a = a;
    r->cb = cb;
    r->data = data;
    r->easy = curl_easy_init();
    if (r->easy == NULL) {
        fail_later(a, r, "cannot create a libcurl handle");
        return r;
    }
    setup_easy(a, r, method, path, body, timeout_ms);
    LOG_TRACE("agent %s: %s %s", a->addr, method, path);
    CURLMcode mc = curl_multi_add_handle(a->multi, r->easy);
    if (mc != CURLM_OK) {
        fail_later(a, r, curl_multi_strerror(mc));
        return r;
    }
    list_push(&a->active, r);
    return r;
}

void agent_cancel(struct agent_req *r)
{
    if (r == NULL)
        return;
    struct agent *a = r->a;
    if (a->dispatching == r)
        return; /* its callback is running; it is freed when that returns */
    if (r->queued_done) {
        list_unlink(&a->done, r);
    } else {
        list_unlink(&a->active, r);
        curl_multi_remove_handle(a->multi, r->easy);
    }
    req_free(r);
}

const char *agent_lib_version(void)
{
    return curl_version();
}
