/*
 * proxycfg: the proxy's registration (decoded /v1/agent/service/<id>) turned into typed,
 * validated settings, driven by one table of known Proxy.Config and upstream Config keys.
 *
 * Pure: no I/O. The same table documents every key (doc/config.md is generated from it).
 */
#ifndef CONNECTD_PROXYCFG_H
#define CONNECTD_PROXYCFG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "decode.h"
#include "limit.h"
#include "outlier.h"

/*
 * Proxy.Config.protocol: how inbound connections are served. PROTO_TCP relays bytes (L4);
 * PROTO_HTTP parses each request (L7, HTTP/1.1). PROTO_HTTP2 and PROTO_GRPC are accepted but
 * relayed at L4 until the HTTP/2 codec is wired into sessions (a warning says so).
 */
enum proxycfg_protocol {
    PROTO_TCP = 0,
    PROTO_HTTP,
    PROTO_HTTP2,
    PROTO_GRPC,
};

/* The protocol a name stands for ("tcp", "http", "http2", "grpc"; "" is tcp), or -EINVAL. */
int proxycfg_protocol_from_name(const char *name);
/* The name of <protocol> ("tcp" for anything unknown). */
const char *proxycfg_protocol_name(int protocol);

struct upstream_cfg {
    char *key;              /* unique and stable: "<type>:<ns>/<partition>/<dc>/<name>" */
    char *destination_type; /* "service" or "prepared_query" */
    char *destination_name;
    char *ns;         /* "" = default */
    char *partition;  /* "" = default */
    char *datacenter; /* "" = the agent's */
    char *bind_address;
    int bind_port;          /* 0 when the listener is a unix socket */
    char *bind_socket_path; /* LocalBindSocketPath; "" for a TCP listener */
    int bind_socket_mode;   /* LocalBindSocketMode (octal text), -1 = 0600 (sock.h) */
    uint32_t connect_timeout_ms;
    int connect_timeout_set;   /* connect_timeout_ms was given: it overrides the chain's */
    uint32_t poll_interval_ms; /* prepared queries: how often the query is executed */
    uint32_t idle_timeout_ms;  /* 0 = off */
    struct limit_cfg limits;   /* of the upstream's listener */
    /* L7: limits.max_pending_requests and limits.max_concurrent_requests (0 = no limit), and
     * passive_health_check (outlier.h; zeros stand for Envoy's defaults). */
    uint32_t max_pending_requests;
    uint32_t max_concurrent_requests;
    struct outlier_cfg passive;
    int protocol;     /* enum proxycfg_protocol; meaningful when protocol_set */
    int protocol_set; /* Config.protocol was given (not ""): it overrides the chain's */
    /* HTTP: the most bytes of a request (head and body) held so that a retry can send it
     * again; a longer request is never retried. */
    uint32_t retry_buffer_bytes;
};

/*
 * One exposed path (Proxy.Expose.Paths[], or a health check of the parent service when
 * Expose.Checks is set): requests for exactly <path> on the plain listener <listener_port> go
 * to the local application's <local_path_port>, over HTTP/1.1 (PROTO_HTTP) or h2c
 * (PROTO_HTTP2).
 */
struct expose_path {
    int listener_port;   /* 1..65535 */
    int local_path_port; /* 1..65535 */
    char *path;          /* see proxycfg_expose_path_valid() */
    int protocol;        /* PROTO_HTTP or PROTO_HTTP2 */
};

/*
 * Whether <path> (<len> bytes) may be exposed: it begins with '/' and has no query or
 * fragment ('?', '#'), no space, control or non-ASCII byte, and at most DEC_EXPOSE_PATH_MAX
 * bytes. Requests are matched against it byte for byte.
 */
int proxycfg_expose_path_valid(const char *path, size_t len);

struct proxy_cfg {
    char *proxy_id;
    char *service;    /* Proxy.DestinationServiceName: the identity we present */
    char *service_id; /* Proxy.DestinationServiceID */
    char *datacenter;
    char *ns;
    char *partition;
    char *bind_address;     /* public listener */
    int bind_port;          /* 0 = no TCP public listener */
    char *bind_socket_path; /* the registration's SocketPath when it has no port: the public
                               listener is this unix socket; else "" */
    char *local_address;
    int local_port;
    char *local_socket_path; /* Proxy.LocalServiceSocketPath; "" = local_address:local_port */
    uint32_t local_connect_timeout_ms;
    uint32_t handshake_timeout_ms;
    /* TLS of every mesh connection, in and out */
    int tls_min_version;     /* 0 (TLS_AUTO: 1.2), 12 or 13 */
    int tls_max_version;     /* 0 (TLS_AUTO: none), 12 or 13 */
    char *tls_cipher_suites; /* NULL, or comma-separated IANA names (TLS 1.2 suites) */
    int verify_trust_domain; /* 1: peers must be of the roots' trust domain */
    int tls_resumption;      /* 1: outbound connections resume sessions per endpoint */
    /* inbound authorization: 0 = the local intention table, 1 = ask the agent per connection */
    int authorize_with_agent;
    uint32_t authorize_cache_ms; /* reuse of an agent answer for the same caller; 0 = never */
    uint32_t authorize_timeout_ms;
    uint32_t idle_timeout_ms;         /* inbound (local_idle_timeout_ms); 0 = off */
    uint32_t max_lifetime_ms;         /* every session; 0 = off */
    uint32_t reauthorize_interval_ms; /* periodic re-authorization; 0 = off */
    struct limit_cfg limits;          /* of the public listener */
    int protocol;                     /* enum proxycfg_protocol */
    /* L7 inbound (protocol http): request head bound (431 past it), how long a started request
     * head may take, and how long the local application may take to answer (504; 0 = off). */
    uint32_t max_request_headers_kb;
    uint32_t request_headers_timeout_ms;
    uint32_t local_request_timeout_ms;
    struct upstream_cfg *upstreams;
    size_t n_upstreams;
    /* Proxy.Expose: the paths served without mTLS on plain listeners of bind_address, and
     * whether the parent service's HTTP and gRPC checks are exposed too (control.c adds
     * those paths from the agent's checks). */
    struct expose_path *expose_paths;
    size_t n_expose_paths;
    int expose_checks;
    /* Things to warn about once: keys no table knows. At most PROXYCFG_MAX_WARNINGS of them,
     * then one more line that counts the rest. */
    char **warnings;
    size_t n_warnings;
    size_t n_unwarned; /* unknown keys past the bound, counted while building */
};

/* How many warnings one build keeps (plus one counting the rest). */
#define PROXYCFG_MAX_WARNINGS 32

/*
 * Builds <out> from a decoded registration. Fails with ERR_BAD_CONFIG and a message naming
 * the key or field when the service is not a connect-proxy, has no destination service, a
 * known key has a bad type or value, an upstream has neither port nor socket, or two upstreams
 * bind the same address and port. On failure <out> is zeroed.
 */
int proxycfg_build(const struct dec_service *svc, struct proxy_cfg *out, char *err, size_t errlen);
void proxycfg_dispose(struct proxy_cfg *c);

/* Flags mode (consul-api.md 4.2): a static configuration from command-line flags. */
struct proxycfg_flags {
    const char *service;      /* identity; required */
    const char *proxy_id;     /* the ID to report (and register under) */
    const char *listen;       /* "host:port" of the public listener, or NULL for none */
    const char *service_addr; /* "host:port" of the local application; required with listen */
    char *const *upstreams;   /* "name[.type]:[addr:]port", type "service" or "query" */
    size_t n_upstreams;
};

/*
 * Builds <out> from flags, with the same defaults and checks as a registration. Fails with
 * ERR_BAD_CONFIG and a message naming the flag and value that is wrong. On failure <out> is
 * zeroed.
 */
int proxycfg_from_flags(const struct proxycfg_flags *f, struct proxy_cfg *out, char *err,
                        size_t errlen);

/*
 * The warnings already logged, so that each is logged once however often the registration
 * changes. Bounded: at most PROXYCFG_WARNED_MAX distinct messages, remembered by a 64-bit hash
 * in a fixed open-addressing table (no allocation); a lookup costs O(1). Zero-initialise it.
 */
#define PROXYCFG_WARNED_MAX 256
struct proxycfg_warned {
    uint64_t slots[2 * PROXYCFG_WARNED_MAX]; /* 0 = empty */
    size_t n;
    int full_said;
};

/*
 * Returns the line to log for warning <msg> now: <msg> itself the first time it is seen; once
 * the set is full, a notice saying that further warnings are not logged (once), else NULL.
 */
const char *proxycfg_warn_once(struct proxycfg_warned *w, const char *msg);

/* Deep copy of <src> into <dst>, without the warnings. */
void proxycfg_copy(struct proxy_cfg *dst, const struct proxy_cfg *src);

/* Writes the Markdown table of every Config key (name, scope, type, default, meaning). */
void proxycfg_write_doc(FILE *f);
/* Writes every key as troff .TP entries (scope, type, default, meaning) for the man page. */
void proxycfg_write_man(FILE *f);

#endif
