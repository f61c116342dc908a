/*
 * expose: the exposed listeners' paths, from the registration and from the parent service's
 * health checks (see expose.h for why a check's path is read from its output).
 *
 *   registration (Expose.Paths) ----------------------------.
 *                                                            +--> expose_build() --> snapshot
 *   GET /v1/agent/checks (polled, Expose.Checks only) -------'
 *     -> per check with an ExposedPort: expose_check_path() (the last path learned for the
 *        same check and port is kept while an output names none)
 */
#include "expose.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a check's path ---- */

/*
 * The URL at the start of an HTTP check's output: "HTTP <METHOD> <url>: <status> ..." when
 * the request got an answer, "<Op> \"<url>\": <error>" (Go's url.Error) when it did not.
 * Points *url at it and returns its length, or 0.
 */
static size_t output_url(const char *out, const char **url)
{
    const char *p = out;
    int quoted = 0;
    if (strncmp(p, "HTTP ", 5) == 0) {
        p += 5;
    } else {
        quoted = 1;
    }
    while (*p >= 'A' && *p <= 'Z') /* the method, or the Op ("Get", "Post") */
        p++;
    while (*p >= 'a' && *p <= 'z')
        p++;
    if (*p++ != ' ')
        return 0;
    if (quoted && *p++ != '"')
        return 0;
    size_t n = strcspn(p, quoted ? "\"" : " ");
    if (quoted && p[n] != '"')
        return 0;
    if (!quoted && n > 0 && p[n - 1] == ':')
        n--; /* "...: 200 OK" */
    *url = p;
    return n;
}

/* The path of <url> (<n> bytes) when it is http:// to port <port>; *path_len set. NULL else. */
static const char *url_path(const char *url, size_t n, int port, size_t *path_len)
{
    static const char scheme[] = "http://";
    if (n < sizeof(scheme) - 1 || memcmp(url, scheme, sizeof(scheme) - 1) != 0)
        return NULL;
    const char *auth = url + sizeof(scheme) - 1, *end = url + n;
    const char *slash = auth;
    while (slash < end && *slash != '/' && *slash != '?')
        slash++;
    const char *colon = slash;
    while (colon > auth && colon[-1] != ':' && colon[-1] != ']')
        colon--;
    if (colon == auth || colon[-1] != ':')
        return NULL;
    long p = 0;
    for (const char *d = colon; d < slash; d++) {
        if (*d < '0' || *d > '9' || p > 65535)
            return NULL;
        p = p * 10 + (*d - '0');
    }
    if (p != port)
        return NULL;
    if (slash == end || *slash == '?') {
        *path_len = 1;
        return "/"; /* Go's client asks for "/" when the URL has no path */
    }
    const char *q = slash;
    while (q < end && *q != '?' && *q != '#')
        q++;
    *path_len = (size_t)(q - slash);
    return slash;
}

int expose_check_path(const struct dec_check *c, int local_port, struct expose_path *out)
{
    memset(out, 0, sizeof(*out));
    if (c->exposed_port <= 0 || local_port <= 0)
        return -ENOENT;
    out->listener_port = c->exposed_port;
    out->local_path_port = local_port;
    if (strcmp(c->type, "grpc") == 0) {
        out->protocol = PROTO_HTTP2;
        out->path = xstrdup(EXPOSE_GRPC_HEALTH_PATH);
        return 0;
    }
    if (strcmp(c->type, "http") != 0)
        return -ENOENT;
    const char *url;
    size_t n = output_url(c->output, &url), plen = 0;
    const char *path = n > 0 ? url_path(url, n, c->exposed_port, &plen) : NULL;
    if (path == NULL)
        return -EAGAIN;
    if (!proxycfg_expose_path_valid(path, plen))
        return -EINVAL;
    out->protocol = PROTO_HTTP;
    out->path = xmalloc(plen + 1);
    memcpy(out->path, path, plen);
    out->path[plen] = '\0';
    return 0;
}

/* ---- the listeners ---- */

static int port_taken(const struct proxy_cfg *cfg, int port)
{
    if (port == cfg->bind_port)
        return 1;
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        if (cfg->upstreams[i].bind_socket_path[0] == '\0' && cfg->upstreams[i].bind_port == port)
            return 1;
    return 0;
}

/* The listener on <port> in v[0..*n), added when <add>; NULL when absent and not added. */
static struct snap_expose *listener_for(struct snap_expose **v, size_t *n, int port, int add)
{
    for (size_t i = 0; i < *n; i++)
        if ((*v)[i].port == port)
            return &(*v)[i];
    if (!add)
        return NULL;
    *v = xrealloc(*v, (*n + 1) * sizeof(**v));
    struct snap_expose *e = &(*v)[(*n)++];
    memset(e, 0, sizeof(*e));
    e->port = port;
    snprintf(e->name, sizeof(e->name), "expose:%d", port);
    return e;
}

static void add_path(struct snap_expose *e, const struct expose_path *p)
{
    for (size_t i = 0; i < e->n_paths; i++)
        if (strcmp(e->paths[i], p->path) == 0)
            return;
    e->local_port = p->local_path_port;
    e->protocol = p->protocol;
    e->paths = xrealloc(e->paths, (e->n_paths + 1) * sizeof(*e->paths));
    e->paths[e->n_paths++] = xstrdup(p->path);
}

static int by_port(const void *a, const void *b)
{
    const struct snap_expose *x = a, *y = b;
    return (x->port > y->port) - (x->port < y->port);
}

struct snap_exposes *expose_build(const struct proxy_cfg *cfg, const struct expose_path *checks,
                                  size_t n_checks, struct limit_state *limit,
                                  const char *agent_addr, char *warn, size_t wlen)
{
    struct snap_expose *v = NULL;
    size_t n = 0, n_explicit;
    if (warn != NULL && wlen > 0)
        warn[0] = '\0';
    /* proxycfg_build() made sure paths sharing a port agree on where they go. */
    for (size_t i = 0; i < cfg->n_expose_paths; i++)
        add_path(listener_for(&v, &n, cfg->expose_paths[i].listener_port, 1),
                 &cfg->expose_paths[i]);
    n_explicit = n;
    for (size_t i = 0; i < n_checks; i++) {
        const struct expose_path *p = &checks[i];
        struct snap_expose *e = listener_for(&v, &n, p->listener_port, 0);
        int explicit = e != NULL && (size_t)(e - v) < n_explicit;
        if (explicit || port_taken(cfg, p->listener_port) ||
            (e != NULL && (e->local_port != p->local_path_port || e->protocol != p->protocol))) {
            if (warn != NULL)
                snprintf(warn, wlen,
                         "Expose.Checks: the check path %s is not exposed: its port %d is taken "
                         "by %s",
                         p->path, p->listener_port,
                         explicit    ? "an Expose.Paths listener"
                         : e != NULL ? "another check going elsewhere"
                                     : "the public listener or an upstream");
            continue;
        }
        e = listener_for(&v, &n, p->listener_port, 1);
        e->from_checks = 1;
        add_path(e, p);
    }
    if (n == 0)
        return NULL;
    qsort(v, n, sizeof(*v), by_port);
    struct snap_exposes *x = snap_exposes_new(v, n, limit);
    snprintf(x->agent_addr, sizeof(x->agent_addr), "%s", agent_addr != NULL ? agent_addr : "");
    return x;
}

/* ---- the checks watch ---- */

struct expose_checks {
    struct agent *agent;
    struct watch_reach *reach;
    void (*changed)(void *data);
    void *data;
    struct watch *watch;
    char *service_id; /* the parent's ID the watch is for */
    char *ns, *partition;
    int local_port;
    /* The paths now, and for each the check it came from (to keep a learned path). */
    struct expose_path *paths;
    char **check_ids;
    size_t n;
};

struct expose_checks *expose_checks_new(struct agent *a, struct watch_reach *reach,
                                        void (*changed)(void *data), void *data)
{
    struct expose_checks *x = xcalloc(1, sizeof(*x));
    x->agent = a;
    x->reach = reach;
    x->changed = changed;
    x->data = data;
    return x;
}

static void paths_free(struct expose_path *p, char **ids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(p[i].path);
        free(ids[i]);
    }
    free(p);
    free(ids);
}

static void drop_paths(struct expose_checks *x)
{
    paths_free(x->paths, x->check_ids, x->n);
    x->paths = NULL;
    x->check_ids = NULL;
    x->n = 0;
}

static void stop(struct expose_checks *x)
{
    if (x->watch != NULL)
        watch_stop(x->watch);
    x->watch = NULL;
    free(x->service_id);
    free(x->ns);
    free(x->partition);
    x->service_id = x->ns = x->partition = NULL;
}

void expose_checks_free(struct expose_checks *x)
{
    if (x == NULL)
        return;
    stop(x);
    drop_paths(x);
    free(x);
}

/* The path learned before for the same check and port, or NULL. */
static const char *known_path(const struct expose_checks *x, const struct dec_check *c)
{
    for (size_t i = 0; i < x->n; i++)
        if (strcmp(x->check_ids[i], c->check_id) == 0 &&
            x->paths[i].listener_port == c->exposed_port)
            return x->paths[i].path;
    return NULL;
}

static int same_paths(const struct expose_checks *x, const struct expose_path *p, size_t n)
{
    if (n != x->n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (p[i].listener_port != x->paths[i].listener_port ||
            p[i].local_path_port != x->paths[i].local_path_port ||
            p[i].protocol != x->paths[i].protocol || p[i].path == NULL ||
            x->paths[i].path == NULL || strcmp(p[i].path, x->paths[i].path) != 0)
            return 0;
    return 1;
}

static int on_checks(void *data, const struct agent_response *resp)
{
    struct expose_checks *x = data;
    char err[256];
    struct dec_check *v;
    size_t n;
    int rc =
        decode_agent_checks(resp->body, resp->body_len, x->service_id, &v, &n, err, sizeof(err));
    if (rc != 0) {
        enum log_level lvl = watch_reject_level(x->watch, err);
        LOG_AT(lvl, "checks of %s: %s; keeping the exposed check paths", x->service_id, err);
        return rc;
    }
    struct expose_path *paths = xcalloc(n + 1, sizeof(*paths));
    char **ids = xcalloc(n + 1, sizeof(*ids));
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        struct expose_path p;
        int prc = expose_check_path(&v[i], x->local_port, &p);
        const char *known = prc == -EAGAIN ? known_path(x, &v[i]) : NULL;
        if (known != NULL) {
            p.protocol = PROTO_HTTP;
            p.path = xstrdup(known);
            prc = 0;
        }
        if (prc == -EAGAIN)
            LOG_DEBUG("check %s of %s: exposed on port %d, its path not known yet (no URL in "
                      "its output)",
                      LOG_ESC(v[i].check_id), x->service_id, v[i].exposed_port);
        else if (prc == -EINVAL)
            LOG_WARN("check %s of %s: its URL's path cannot be exposed", LOG_ESC(v[i].check_id),
                     x->service_id);
        if (prc != 0 || p.path == NULL)
            continue;
        paths[k] = p;
        ids[k++] = xstrdup(v[i].check_id);
    }
    dec_checks_free(v, n);
    if (same_paths(x, paths, k)) {
        paths_free(paths, ids, k);
        return 0;
    }
    drop_paths(x);
    x->paths = paths;
    x->check_ids = ids;
    x->n = k;
    LOG_INFO("checks of %s: %zu exposed check path(s)", x->service_id, k);
    for (size_t i = 0; i < k; i++)
        LOG_DEBUG("exposed check %s: port %d %s -> local port %d (%s)", LOG_ESC(ids[i]),
                  paths[i].listener_port, LOG_ESC(paths[i].path), paths[i].local_path_port,
                  proxycfg_protocol_name(paths[i].protocol));
    x->changed(x->data);
    return 0;
}

static int differs(const char *a, const char *b)
{
    return a == NULL || strcmp(a, b) != 0;
}

void expose_checks_reconcile(struct expose_checks *x, const struct proxy_cfg *cfg)
{
    int want = cfg->expose_checks && cfg->service_id != NULL && cfg->service_id[0] != '\0';
    if (!want || differs(x->service_id, cfg->service_id) || differs(x->ns, cfg->ns) ||
        differs(x->partition, cfg->partition) || x->local_port != cfg->local_port) {
        int had = x->n > 0;
        stop(x);
        drop_paths(x);
        if (had)
            x->changed(x->data);
    }
    if (!want || x->watch != NULL)
        return;
    x->service_id = xstrdup(cfg->service_id);
    x->ns = xstrdup(cfg->ns);
    x->partition = xstrdup(cfg->partition);
    x->local_port = cfg->local_port;
    /* The agent filters (a service ID with quotes is filtered here only, by the decoder). */
    char *filter = NULL;
    if (strpbrk(cfg->service_id, "\"\\") == NULL) {
        char *expr = xasprintf("ServiceID == \"%s\"", cfg->service_id);
        filter = util_url_escape(expr);
        free(expr);
    }
    char *scope = agent_scope_query(cfg->ns, cfg->partition);
    char *path = xasprintf("/v1/agent/checks?%s%s%s", filter != NULL ? "filter=" : "",
                           filter != NULL ? filter : "", scope);
    char *name = xasprintf("checks of %s", cfg->service_id);
    struct watch_spec spec = {.name = name,
                              .method = "GET",
                              .path = path,
                              .block = WATCH_POLL,
                              .poll_ms = EXPOSE_CHECKS_POLL_MS,
                              .reach = x->reach};
    x->watch = watch_start(x->agent, &spec, on_checks, x);
    free(filter);
    free(scope);
    free(path);
    free(name);
}

const struct expose_path *expose_checks_paths(const struct expose_checks *x, size_t *n)
{
    *n = x->n;
    return x->paths;
}

void expose_checks_each_watch(const struct expose_checks *x, watch_visit_cb fn, void *data)
{
    if (x->watch != NULL)
        fn(data, "expose-checks", x->watch);
}
