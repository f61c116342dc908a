/*
 * config: one table of flags; each row names the flag, its environment fallback and its
 * meaning. Parsing, -help and the documentation read the same rows.
 */
#include "config.h"
#include "cpus.h"
#include "util.h"

#include <ctype.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define TOKEN_FILE_MAX 4096

enum flag_kind {
    FLAG_GROUP = 0, /* not a flag: the heading of the rows that follow, in -help and the docs */
    FLAG_STRING,
    FLAG_BOOL,
    FLAG_LIST, /* repeatable string: a struct config_list */
};

struct flag_def {
    const char *name; /* FLAG_GROUP: the heading */
    enum flag_kind kind;
    const char *env; /* fallback variable, or NULL */
    size_t offset;   /* of a char * (FLAG_STRING), int (FLAG_BOOL) or struct config_list */
    const char *doc;
};

#define F(field) offsetof(struct config, field)
#define GROUP(title)                                                                               \
    {                                                                                              \
        title, FLAG_GROUP, NULL, 0, NULL                                                           \
    }
static const struct flag_def flags[] = {
    GROUP("Which proxy to serve"),
    {"proxy-id", FLAG_STRING, "CONNECT_PROXY_ID", F(proxy_id),
     "ID of the connect-proxy service registered with the local agent."},
    {"sidecar-for", FLAG_STRING, "CONNECT_SIDECAR_FOR", F(sidecar_for),
     "ID of the service whose one sidecar proxy registration this process serves."},
    GROUP("Flags mode (a static configuration, no registration)"),
    {"service", FLAG_STRING, NULL, F(service),
     "Flags mode: the service identity to present, with a static configuration from "
     "-listen, -service-addr and -upstream instead of a registration."},
    {"service-addr", FLAG_STRING, NULL, F(service_addr),
     "Flags mode: host:port of the local application (required with -listen)."},
    {"listen", FLAG_STRING, NULL, F(listen),
     "Flags mode: host:port of the public mTLS listener (none when absent)."},
    {"upstream", FLAG_LIST, NULL, F(upstreams),
     "Flags mode, repeatable: name[.type]:[addr:]port, type service (default) or query, "
     "addr 127.0.0.1 by default."},
    {"register", FLAG_BOOL, NULL, F(register_self),
     "Flags mode: register this proxy with the agent as a connect-proxy (ID "
     "<service>-proxy[-<register-id>], TTL check) and deregister on exit."},
    {"register-id", FLAG_STRING, NULL, F(register_id),
     "Suffix of the ID -register uses: <service>-proxy-<register-id>."},
    GROUP("Consul agent"),
    {"http-addr", FLAG_STRING, "CONSUL_HTTP_ADDR", F(http_addr),
     "Agent address: host:port, http://, https:// or unix:///path (default 127.0.0.1:8500)."},
    {"token", FLAG_STRING, "CONSUL_HTTP_TOKEN", F(token), "ACL token for agent requests."},
    {"token-file", FLAG_STRING, "CONSUL_HTTP_TOKEN_FILE", F(token_file),
     "File holding the ACL token (takes precedence over -token)."},
    {"ca-file", FLAG_STRING, "CONSUL_CACERT", F(ca_file), "CA file to verify an https agent."},
    {"ca-path", FLAG_STRING, "CONSUL_CAPATH", F(ca_path), "CA directory to verify an https agent."},
    {"client-cert", FLAG_STRING, "CONSUL_CLIENT_CERT", F(client_cert),
     "Client certificate for an https agent with verify_incoming."},
    {"client-key", FLAG_STRING, "CONSUL_CLIENT_KEY", F(client_key),
     "Key of the client certificate."},
    {"tls-server-name", FLAG_STRING, "CONSUL_TLS_SERVER_NAME", F(tls_server_name),
     "Server name to verify the https agent's certificate against."},
    {"http-ssl-verify", FLAG_STRING, "CONSUL_HTTP_SSL_VERIFY", F(ssl_verify),
     "Verify the https agent's certificate (true or false, default true)."},
    {"watch-wait", FLAG_STRING, NULL, F(watch_wait),
     "The wait of every blocking query to the agent: a duration such as 30s or 5m, 1s to 10m "
     "(default 5m, the agent's own default). Shorter when a hop in front of the agent cuts "
     "connections idle for less; a request with no answer is given up this long plus a sixteenth "
     "plus 10 s after it started."},
    GROUP("Logging"),
    {"log-level", FLAG_STRING, NULL, F(log_level), "trace, debug, info (default), warn or error."},
    {"log-json", FLAG_BOOL, NULL, F(log_json),
     "Write each log line as a JSON object: time, level, msg, and conn and worker when the "
     "line is about one."},
    {"access-log", FLAG_STRING, NULL, F(access_log),
     "Write one line per finished connection to this file (appended; reopened on SIGHUP), or "
     "to stderr with - or stderr (default: no access log)."},
    {"access-log-format", FLAG_STRING, NULL, F(access_log_format),
     "Access log format: json (default) or logfmt."},
    GROUP("Running"),
    {"workers", FLAG_STRING, NULL, F(workers),
     "Number of worker threads, 1 to 256 (default: 2, or 1 when this process may use only one "
     "CPU: its affinity mask and its cgroup's CPU quota count). A sidecar shares the node with its "
     "application; one worker carries tens of thousands of requests per second."},
    {"drain-timeout", FLAG_STRING, NULL, F(drain_timeout),
     "On SIGTERM or SIGINT, how long open connections may run on after the listeners close: "
     "a duration such as 500ms, 10s or 1m, or milliseconds (default 5s; 0 stops at once). A "
     "second signal stops at once."},
    {"allow-core-dumps", FLAG_BOOL, NULL, F(allow_core_dumps),
     "Leave the process dumpable. By default connectd marks itself non-dumpable at start-up "
     "(no core dump, no ptrace or /proc/<pid>/mem by other unprivileged processes of the same "
     "user), because its memory holds the leaf's private key and the ACL token."},
    {"admin-bind", FLAG_STRING, NULL, F(admin_bind),
     "Serve the admin endpoint (/ready, /metrics, /connections, /authz, /config) on this "
     "address: host:port (keep it on loopback, e.g. 127.0.0.1:19100) or unix:///path (mode "
     "0600). Off when not set."},
    GROUP("Information"),
    {"help", FLAG_BOOL, NULL, F(help), "Print this help and exit."},
    {"version", FLAG_BOOL, NULL, F(version),
     "Print the version and the OpenSSL, libcurl and jansson versions in use, and exit."},
    {"config-doc", FLAG_BOOL, NULL, F(config_doc),
     "Print the Markdown reference of every flag and Config key (doc/config.md) and exit."},
    {"man", FLAG_BOOL, NULL, F(man), "Print the manual page (doc/connectd.8, troff) and exit."},
};
#undef GROUP
#undef F

static char **str_field(struct config *c, const struct flag_def *f)
{
    return (char **)((char *)c + f->offset);
}

static const struct flag_def *find_flag(const char *name, size_t len)
{
    for (size_t i = 0; i < ARRAY_SIZE(flags); i++)
        if (flags[i].kind != FLAG_GROUP && strlen(flags[i].name) == len &&
            strncmp(flags[i].name, name, len) == 0)
            return &flags[i];
    return NULL;
}

static int parse_bool(const char *s, int *out)
{
    static const char *const yes[] = {"1", "t", "T", "true", "TRUE", "True"};
    static const char *const no[] = {"0", "f", "F", "false", "FALSE", "False"};
    for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
        if (strcmp(s, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcmp(s, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    return -EINVAL;
}

/* Parses a duration: an integer with a unit ms, s or m, or a bare integer of milliseconds. */
static int parse_duration_ms(const char *s, uint32_t *out)
{
    static const struct {
        const char *suffix;
        long scale;
    } units[] = {{"ms", 1}, {"s", 1000}, {"m", 60000}};
    size_t len = strlen(s), digits = 0;
    while (digits < len && isdigit((unsigned char)s[digits]))
        digits++;
    long scale = 1;
    if (digits < len) {
        size_t u = 0;
        while (u < ARRAY_SIZE(units) && strcmp(s + digits, units[u].suffix) != 0)
            u++;
        if (u == ARRAY_SIZE(units))
            return -EINVAL;
        scale = units[u].scale;
    }
    if (digits == 0 || digits > 9)
        return -EINVAL;
    char num[10];
    memcpy(num, s, digits);
    num[digits] = '\0';
    long v;
    if (util_parse_int(num, 0, 86400000L / scale, &v) != 0)
        return -EINVAL;
    *out = (uint32_t)(v * scale);
    return 0;
}

/*
 * Reads the token with read(2) into a stack buffer that is wiped before returning: stdio would
 * leave a copy in a FILE buffer freed unwiped.
 */
static int read_token_file(const char *path, char **out, char *err, size_t errlen, const char *what)
{
    int rc = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "%s: cannot open %s: %s", what, path, strerror(errno));
        return -EINVAL;
    }
    char buf[TOKEN_FILE_MAX + 1];
    size_t n = 0;
    while (n < sizeof(buf)) {
        ssize_t got = read(fd, buf + n, sizeof(buf) - n);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            snprintf(err, errlen, "%s: cannot read %s: %s", what, path, strerror(errno));
            rc = -EINVAL;
            goto out;
        }
        if (got == 0)
            break;
        n += (size_t)got;
    }
    if (n > TOKEN_FILE_MAX) {
        snprintf(err, errlen, "%s: %s is larger than %d bytes", what, path, TOKEN_FILE_MAX);
        rc = -EINVAL;
        goto out;
    }
    size_t a = 0, b = n;
    while (a < b && isspace((unsigned char)buf[a]))
        a++;
    while (b > a && isspace((unsigned char)buf[b - 1]))
        b--;
    *out = xstrndup(buf + a, b - a);
out:
    close(fd);
    util_wipe(buf, n);
    return rc;
}

int config_parse(struct config *c, int argc, char **argv, const char *(*getenv_fn)(const char *),
                 char *err, size_t errlen)
{
    int flag_token_file = 0, flag_token = 0;
    memset(c, 0, sizeof(*c));
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-') {
            snprintf(err, errlen, "unexpected argument \"%s\" (flags start with -)", a);
            goto fail;
        }
        a += a[1] == '-' ? 2 : 1;
        const char *eq = strchr(a, '=');
        size_t len = eq != NULL ? (size_t)(eq - a) : strlen(a);
        const struct flag_def *f = find_flag(a, len);
        if (f == NULL) {
            snprintf(err, errlen, "unknown flag -%.*s (see -help)", (int)len, a);
            goto fail;
        }
        if (f->kind == FLAG_BOOL) {
            int v = 1;
            if (eq != NULL && parse_bool(eq + 1, &v) != 0) {
                snprintf(err, errlen, "flag -%s: \"%s\" is not a boolean", f->name, eq + 1);
                goto fail;
            }
            *(int *)((char *)c + f->offset) = v;
            continue;
        }
        const char *v = eq != NULL ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (v == NULL) {
            snprintf(err, errlen, "flag -%s needs a value", f->name);
            goto fail;
        }
        if (f->kind == FLAG_LIST) {
            struct config_list *l = (struct config_list *)((char *)c + f->offset);
            l->v = xrealloc(l->v, (l->n + 1) * sizeof(*l->v));
            l->v[l->n++] = xstrdup(v);
            continue;
        }
        char **field = str_field(c, f);
        free(*field);
        *field = xstrdup(v);
        flag_token_file |= strcmp(f->name, "token-file") == 0;
        flag_token |= strcmp(f->name, "token") == 0;
    }
    if (c->help || c->version || c->config_doc || c->man)
        return 0;

    /* Environment fallbacks, except the token pair, resolved below by precedence. */
    for (size_t i = 0; i < ARRAY_SIZE(flags); i++) {
        const struct flag_def *f = &flags[i];
        if (f->env == NULL || f->kind != FLAG_STRING || strcmp(f->name, "token") == 0 ||
            strcmp(f->name, "token-file") == 0)
            continue;
        char **field = str_field(c, f);
        const char *v = getenv_fn(f->env);
        if (*field == NULL && v != NULL && v[0] != '\0')
            *field = xstrdup(v);
    }

    /* Token precedence as in Consul: -token-file, -token, CONSUL_HTTP_TOKEN_FILE,
     * CONSUL_HTTP_TOKEN. CONNECT_PROXY_TOKEN (managed proxies) comes last. */
    if (flag_token_file) {
        free(c->token);
        c->token = NULL;
        if (read_token_file(c->token_file, &c->token, err, errlen, "flag -token-file") != 0)
            goto fail;
    } else if (!flag_token) {
        const char *tf = getenv_fn("CONSUL_HTTP_TOKEN_FILE");
        const char *t = getenv_fn("CONSUL_HTTP_TOKEN");
        const char *pt = getenv_fn("CONNECT_PROXY_TOKEN");
        if (tf != NULL && tf[0] != '\0') {
            if (read_token_file(tf, &c->token, err, errlen, "CONSUL_HTTP_TOKEN_FILE") != 0)
                goto fail;
        } else if (t != NULL && t[0] != '\0') {
            c->token = xstrdup(t);
        } else if (pt != NULL && pt[0] != '\0') {
            c->token = xstrdup(pt);
        }
    }

    c->level = LOG_LEVEL_INFO;
    if (c->log_level != NULL && log_parse_level(c->log_level, &c->level) != 0) {
        snprintf(err, errlen,
                 "flag -log-level: \"%s\" is not one of trace, debug, info, warn, "
                 "error",
                 c->log_level);
        goto fail;
    }
    c->alog_format = ALOG_JSON;
    if (c->access_log_format != NULL &&
        alog_parse_format(c->access_log_format, &c->alog_format) != 0) {
        snprintf(err, errlen, "flag -access-log-format: \"%s\" is not json or logfmt",
                 c->access_log_format);
        goto fail;
    }
    if (c->access_log != NULL && c->access_log[0] == '\0') {
        snprintf(err, errlen, "flag -access-log: empty path");
        goto fail;
    }
    long n = cpus_default_workers(cpus_usable());
    if (c->workers != NULL && util_parse_int(c->workers, 1, 256, &n) != 0) {
        snprintf(err, errlen, "flag -workers: \"%s\" is not an integer in [1, 256]", c->workers);
        goto fail;
    }
    c->n_workers = (int)n;
    c->drain_timeout_ms = 5000;
    if (c->drain_timeout != NULL &&
        parse_duration_ms(c->drain_timeout, &c->drain_timeout_ms) != 0) {
        snprintf(err, errlen,
                 "flag -drain-timeout: \"%s\" is not a duration (like 500ms, 10s or 1m) of at most "
                 "24 hours",
                 c->drain_timeout);
        goto fail;
    }
    c->watch_wait_ms = 300000;
    if (c->watch_wait != NULL && (parse_duration_ms(c->watch_wait, &c->watch_wait_ms) != 0 ||
                                  c->watch_wait_ms < 1000 || c->watch_wait_ms > 600000)) {
        snprintf(err, errlen,
                 "flag -watch-wait: \"%s\" is not a duration (like 30s or 5m) from 1s to 10m",
                 c->watch_wait);
        goto fail;
    }
    c->verify = 1;
    if (c->ssl_verify != NULL && parse_bool(c->ssl_verify, &c->verify) != 0) {
        snprintf(err, errlen, "CONSUL_HTTP_SSL_VERIFY / -http-ssl-verify: \"%s\" is not a boolean",
                 c->ssl_verify);
        goto fail;
    }
    if ((c->proxy_id != NULL) + (c->sidecar_for != NULL) + (c->service != NULL) > 1) {
        snprintf(err, errlen, "flags -proxy-id, -sidecar-for and -service are mutually exclusive");
        goto fail;
    }
    if (c->proxy_id == NULL && c->sidecar_for == NULL && c->service == NULL) {
        snprintf(err, errlen,
                 "one of -proxy-id, -sidecar-for or -service is required (or "
                 "CONNECT_PROXY_ID / CONNECT_SIDECAR_FOR)");
        goto fail;
    }
    if (c->service == NULL && (c->listen != NULL || c->service_addr != NULL || c->upstreams.n > 0 ||
                               c->register_self || c->register_id != NULL)) {
        snprintf(err, errlen,
                 "flags -listen, -service-addr, -upstream, -register and "
                 "-register-id need -service");
        goto fail;
    }
    if (c->listen != NULL && c->service_addr == NULL) {
        snprintf(err, errlen, "flag -listen needs -service-addr");
        goto fail;
    }
    if (c->register_self && c->listen == NULL) {
        snprintf(err, errlen, "flag -register needs -listen");
        goto fail;
    }
    if ((c->client_cert == NULL) != (c->client_key == NULL)) {
        snprintf(err, errlen,
                 "-client-cert and -client-key (CONSUL_CLIENT_CERT / "
                 "CONSUL_CLIENT_KEY) must be given together");
        goto fail;
    }
    return 0;
fail:
    config_dispose(c);
    return -EINVAL;
}

void config_dispose(struct config *c)
{
    if (c->token != NULL)
        explicit_bzero(c->token, strlen(c->token));
    for (size_t i = 0; i < ARRAY_SIZE(flags); i++) {
        if (flags[i].kind == FLAG_STRING) {
            free(*str_field(c, &flags[i]));
        } else if (flags[i].kind == FLAG_LIST) {
            struct config_list *l = (struct config_list *)((char *)c + flags[i].offset);
            for (size_t j = 0; j < l->n; j++)
                free(l->v[j]);
            free(l->v);
        }
    }
    memset(c, 0, sizeof(*c));
}

/* Writes <text> wrapped at 80 columns, each line indented by <indent> spaces. */
static void put_wrapped(FILE *f, const char *text, int indent)
{
    const int width = 80 - indent;
    while (*text != '\0') {
        int n = (int)strlen(text);
        if (n > width) {
            n = width;
            while (n > 0 && text[n] != ' ')
                n--;
            if (n == 0)
                n = width;
        }
        fprintf(f, "%*s%.*s\n", indent, "", n, text);
        text += n;
        while (*text == ' ')
            text++;
    }
}

void config_usage(FILE *f)
{
    fprintf(f, "Usage: connectd -proxy-id ID | -sidecar-for SERVICE_ID | -service NAME "
               "[flags]\n\n"
               "A Consul Connect sidecar proxy: mutual TLS, SPIFFE identities and intentions "
               "for one service\ninstance, configured from the local Consul agent.\n");
    for (size_t i = 0; i < ARRAY_SIZE(flags); i++) {
        const struct flag_def *d = &flags[i];
        if (d->kind == FLAG_GROUP) {
            fprintf(f, "\n%s:\n", d->name);
            continue;
        }
        fprintf(f, "  -%s%s%s%s\n", d->name, d->kind == FLAG_BOOL ? "" : " VALUE",
                d->env != NULL ? "    env " : "", d->env != NULL ? d->env : "");
        put_wrapped(f, d->doc, 8);
    }
    fprintf(f, "\nExample:\n"
               "  connectd -sidecar-for web -http-addr 127.0.0.1:8500 \\\n"
               "      -access-log /var/log/connectd/web.log -log-json\n\n"
               "Every flag and Proxy.Config key: doc/config.md, or man 8 connectd.\n");
}

void config_write_doc(FILE *f)
{
    fprintf(f, "| flag | environment | meaning |\n|---|---|---|\n");
    for (size_t i = 0; i < ARRAY_SIZE(flags); i++) {
        if (flags[i].kind == FLAG_GROUP) {
            fprintf(f, "| **%s** | | |\n", flags[i].name);
            continue;
        }
        fprintf(f, "| `-%s` | %s%s%s | %s |\n", flags[i].name, flags[i].env ? "`" : "",
                flags[i].env ? flags[i].env : "", flags[i].env ? "`" : "", flags[i].doc);
    }
}

void config_write_man_options(FILE *f)
{
    for (size_t i = 0; i < ARRAY_SIZE(flags); i++) {
        const struct flag_def *d = &flags[i];
        if (d->kind == FLAG_GROUP) {
            fprintf(f, ".SS ");
            util_fput_troff(f, d->name);
            fputc('\n', f);
            continue;
        }
        fprintf(f, ".TP\n.B \\-");
        util_fput_troff(f, d->name);
        if (d->kind != FLAG_BOOL)
            fprintf(f, " \\fIvalue\\fR");
        fputc('\n', f);
        util_fput_troff(f, d->doc);
        if (d->env != NULL)
            fprintf(f, "\nEnvironment: \\fB%s\\fR.", d->env);
        fputc('\n', f);
    }
}

void config_write_man_env(FILE *f)
{
    for (size_t i = 0; i < ARRAY_SIZE(flags); i++) {
        if (flags[i].env == NULL)
            continue;
        fprintf(f, ".TP\n.B %s\nFallback for \\fB\\-", flags[i].env);
        util_fput_troff(f, flags[i].name);
        fprintf(f, "\\fR.\n");
    }
}
