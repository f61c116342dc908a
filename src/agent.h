/*
 * agent: HTTP transport to the local Consul agent (libcurl multi driven by our loop).
 *
 * The only module that includes libcurl. Everything runs on the thread that owns <loop>
 * (the control thread). Callbacks never fire before agent_request() returns.
 */
#ifndef CONNECTD_AGENT_H
#define CONNECTD_AGENT_H

#include <stddef.h>
#include <stdint.h>

#include "loop.h"

struct agent;
struct agent_req;

struct agent_opts {
    /* "host:port", "http://host:port[/prefix]", "https://host:port[/prefix]" or
     * "unix:///path/to/socket". NULL means "127.0.0.1:8500". */
    const char *addr;
    const char *token; /* sent as X-Consul-Token; NULL or "" for none; never logged */
    const char *ca_file;
    const char *ca_path;
    const char *client_cert;
    const char *client_key;
    const char *tls_server_name;
    int ssl_verify;        /* 1 unless CONSUL_HTTP_SSL_VERIFY=false */
    size_t max_body_bytes; /* 0 = 16 MiB */
};

/*
 * Initialises libcurl once per process (curl_global_init). agent_new() calls it too, but call
 * it from main() before any thread starts. Returns 0 or -ENOMEM. agent_global_cleanup() is for
 * the very end of main(), after every agent is freed.
 */
int agent_global_init(void);
/* The libcurl version in use, e.g. "libcurl/8.5.0 OpenSSL/3.0.13 ..." (static). */
const char *agent_lib_version(void);
void agent_global_cleanup(void);

/*
 * Creates the transport. Returns NULL with a message in <err> when the options are invalid
 * (bad scheme, client cert without key...), naming the offending option.
 */
struct agent *agent_new(struct loop *loop, const struct agent_opts *opts, char *err, size_t errlen);
/*
 * Cancels every outstanding request without calling its callback, closes cached connections
 * and frees <a>. Not from inside one of <a>'s callbacks (stop its users there and free it
 * after loop_run() returns). Socket watchers are released through loop_defer(), so the loop
 * must run once more or be freed (loop_free runs what is still queued).
 */
void agent_free(struct agent *a);

struct agent_response {
    long status;       /* HTTP status, or 0 when the request failed below HTTP */
    const char *error; /* transport error text when status == 0 (else "") */
    const char *body;  /* NUL-terminated; "" when empty */
    size_t body_len;
    uint64_t index;                 /* X-Consul-Index, 0 when absent or unparsable */
    const char *content_hash;       /* X-Consul-ContentHash, "" when absent */
    const char *default_acl_policy; /* X-Consul-Default-ACL-Policy, "" when absent */
    /* 1 when the agent answered but the body was over max_body_bytes: status is then 0, body
     * "" and error says so, yet the agent is not unreachable. */
    int body_too_large;
};

/* Called once per request on the loop thread; <resp> is valid only during the call. */
typedef void (*agent_cb)(void *data, const struct agent_response *resp);

/*
 * Starts a request. <path> is the part after the address, with query, e.g.
 * "/v1/agent/service/web?hash=abc&wait=300000ms"; it is appended to any path prefix of the
 * address. <body> may be NULL (no body; otherwise sent as application/json). <timeout_ms> caps
 * the whole request. A body over max_body_bytes fails the request (status 0, error says so).
 * The returned handle is valid until the callback has run or agent_cancel() was called.
 */
struct agent_req *agent_request(struct agent *a, const char *method, const char *path,
                                const char *body, long timeout_ms, agent_cb cb, void *data);
/*
 * Cancels a request; its callback will not run. Harmless on a request whose callback is
 * running right now (it is freed when that callback returns).
 */
void agent_cancel(struct agent_req *r);

#define AGENT_HEADER_VALUE_MAX 256

/* The response headers the transport keeps (what struct agent_response reports). */
struct agent_headers {
    uint64_t index;                            /* X-Consul-Index; 0 when absent or unparsable */
    char content_hash[AGENT_HEADER_VALUE_MAX]; /* X-Consul-ContentHash; "" when absent */
    char acl_policy[AGENT_HEADER_VALUE_MAX];   /* X-Consul-Default-ACL-Policy; "" when absent */
};

/*
 * Reads one raw header line as libcurl hands it over (<len> bytes, "Name: value\r\n", not
 * NUL-terminated, from the agent) into <h>: a status line ("HTTP/...") starts a new response
 * and clears <h>; a value with blanks around it is trimmed, one too long for its field or with
 * a control byte inside is dropped, an index that is not a plain decimal number is 0. Pure;
 * for the transport itself, its tests and the fuzzer.
 */
void agent_parse_header(const char *line, size_t len, struct agent_headers *h);

/* The address as given, for logs (no token). */
const char *agent_addr(const struct agent *a);
/* The loop the transport runs on (for users that need timers of their own). */
struct loop *agent_loop(const struct agent *a);

/*
 * The "&ns=<ns>&partition=<partition>" suffix (escaped, fresh allocation) of a query about a
 * service in <ns> and <partition>. CE agents refuse a non-empty ns/partition other than
 * default, and Enterprise agents take a missing one as default, so only what differs is sent:
 * "" for the defaults.
 */
char *agent_scope_query(const char *ns, const char *partition);

#endif
