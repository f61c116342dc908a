/*
 * config: command-line flags and environment variables, Consul style (-flag value or
 * -flag=value; one or two dashes), from one table that also prints -help.
 */
#ifndef CONNECTD_CONFIG_H
#define CONNECTD_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "alog.h"
#include "log.h"

/* A repeatable flag's values, in command-line order. */
struct config_list {
    char **v;
    size_t n;
};

struct config {
    char *proxy_id;    /* -proxy-id, CONNECT_PROXY_ID */
    char *sidecar_for; /* -sidecar-for, CONNECT_SIDECAR_FOR */
    char *http_addr;   /* -http-addr, CONSUL_HTTP_ADDR */
    char *token;       /* resolved from -token-file, -token, CONSUL_HTTP_TOKEN_FILE, ..._TOKEN */
    char *token_file;
    char *ca_file;           /* -ca-file, CONSUL_CACERT */
    char *ca_path;           /* -ca-path, CONSUL_CAPATH */
    char *client_cert;       /* -client-cert, CONSUL_CLIENT_CERT */
    char *client_key;        /* -client-key, CONSUL_CLIENT_KEY */
    char *tls_server_name;   /* -tls-server-name, CONSUL_TLS_SERVER_NAME */
    char *ssl_verify;        /* CONSUL_HTTP_SSL_VERIFY (bool text) */
    char *log_level;         /* -log-level */
    char *workers;           /* -workers */
    int log_json;            /* -log-json */
    char *access_log;        /* -access-log PATH, "-" or "stderr" */
    char *access_log_format; /* -access-log-format json|logfmt */
    /* flags mode, like `consul connect proxy -service ...`: a static configuration */
    char *service;                /* -service: the identity to present */
    char *service_addr;           /* -service-addr host:port of the local application */
    char *listen;                 /* -listen host:port of the public listener */
    struct config_list upstreams; /* -upstream name[.type]:[addr:]port, repeatable */
    char *register_id;            /* -register-id suffix */
    int register_self;            /* -register */
    char *drain_timeout;          /* -drain-timeout */
    char *watch_wait;             /* -watch-wait */
    char *admin_bind;             /* -admin-bind: host:port or unix:///path; NULL = off */
    int allow_core_dumps;         /* -allow-core-dumps: stay dumpable (PR_SET_DUMPABLE) */
    int help;
    int version;
    int config_doc;
    int man;
    /* resolved */
    enum log_level level;
    enum alog_format alog_format;
    int n_workers;             /* default: online CPUs */
    uint32_t drain_timeout_ms; /* 0 = stop at once */
    uint32_t watch_wait_ms;    /* the blocking queries' wait */
    int verify;
};

/*
 * Parses argv and the environment <getenv_fn> (pass getenv; tests pass their own). Returns 0,
 * or -EINVAL with a message naming the flag or variable in <err>. Reads the token file.
 */
int config_parse(struct config *c, int argc, char **argv, const char *(*getenv_fn)(const char *),
                 char *err, size_t errlen);
void config_dispose(struct config *c);
void config_usage(FILE *f);
/* Writes the Markdown table of every flag. */
void config_write_doc(FILE *f);
/* Writes every flag, grouped, as troff (.SS headings, .TP entries) for the man page. */
void config_write_man_options(FILE *f);
/* Writes every environment variable a flag falls back to, as troff .TP entries. */
void config_write_man_env(FILE *f);

#endif
