/*
 * admin: the admin endpoint's small HTTP/1.1 server, run on the control thread's loop.
 *
 * GET only, one request per connection (every answer carries Connection: close). The request
 * head (request line and headers) is capped at ADMIN_REQUEST_MAX bytes and must arrive within
 * ADMIN_HEAD_DEADLINE_MS; each connection has one deadline for its whole life. At most
 * ADMIN_MAX_CONNS connections are open at once, and at most ADMIN_MAX_CONNS_PER_PEER from one
 * peer address (every client of a unix socket is one peer). A connection past either bound
 * evicts the oldest connection that is only waiting on its client (its head not complete yet,
 * or its answer already sent), of the same peer when that peer is at its bound; it is refused
 * only when none is waiting. So silent clients cannot keep a probe's GET /ready from being
 * answered. Nothing here touches the data path: the server only reads what its owner renders
 * into a reply.
 *
 * The request parser is pure (buffer in, request or "need more" or "bad" out) and fuzzed.
 */
#ifndef CONNECTD_ADMIN_H
#define CONNECTD_ADMIN_H

#include <stdarg.h>
#include <stddef.h>

#include "loop.h"

#define ADMIN_REQUEST_MAX        8192 /* request line + headers */
#define ADMIN_TARGET_MAX         2048 /* request target (path + query) */
#define ADMIN_MAX_CONNS          16
#define ADMIN_MAX_CONNS_PER_PEER 8
#define ADMIN_HEAD_DEADLINE_MS   2000 /* from accept to a complete request head */
#define ADMIN_DEADLINE_MS        5000 /* a connection's whole life: read, handle, write */

struct admin_request {
    char method[16];
    char path[ADMIN_TARGET_MAX];  /* as sent, without the query */
    char query[ADMIN_TARGET_MAX]; /* after '?', as sent; "" when none */
    int minor_version;            /* HTTP/1.<minor_version> */
};

/*
 * Parses the request head at the start of <buf> (<len> bytes). Returns the head's length
 * (> 0, including the blank line) with <req> filled; -EAGAIN when the head is incomplete but
 * fine so far; -EBADMSG for a malformed head (400); -EMSGSIZE when <len> reached
 * ADMIN_REQUEST_MAX without a complete head (431); -ENAMETOOLONG when the target exceeds
 * ADMIN_TARGET_MAX (414); -EPROTONOSUPPORT for a version other than HTTP/1.x (505). Bare LF
 * line ends are accepted. Pure: no allocation, no global state.
 */
int admin_parse_request(const char *buf, size_t len, struct admin_request *req);

/*
 * Finds query parameter <name> in <query> and percent-decodes its value into <out> (<len>
 * bytes). Returns the decoded length, -ENOENT when absent, -EINVAL when malformed, -ENOSPC
 * when it does not fit.
 */
int admin_query_param(const char *query, const char *name, char *out, size_t len);

/* A growing text buffer (allocation aborts on OOM). */
struct admin_buf {
    char *data;
    size_t len, cap;
};

void admin_buf_dispose(struct admin_buf *b);
void admin_buf_add(struct admin_buf *b, const char *s, size_t n);
void admin_buf_printf(struct admin_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Appends <s> as a JSON string literal, quotes included (NULL gives null). */
void admin_buf_json_str(struct admin_buf *b, const char *s);
/* Appends <s> as a Prometheus label value, escaped, quotes included. */
void admin_buf_label(struct admin_buf *b, const char *s);

/*
 * One request's answer. The handler sets <status> and <content_type> and fills <body>, then
 * calls admin_reply_send() at once or later (from the same loop). If the connection ends
 * before that (deadline), <cancel> is called with <cancel_data> when set, and the reply must
 * not be touched afterwards.
 */
struct admin_reply {
    int status;
    const char *content_type; /* static string; "text/plain; charset=utf-8" when NULL */
    struct admin_buf body;
    void (*cancel)(void *cancel_data);
    void *cancel_data;
};

void admin_reply_send(struct admin_reply *r);

/* Handles a parsed GET request; must lead to admin_reply_send(<reply>) (see above). */
typedef void (*admin_handler)(void *data, const struct admin_request *req,
                              struct admin_reply *reply);

struct admin;

/*
 * Listens on <bind> ("host:port", "[v6]:port" or "unix:///path") and serves requests on
 * <loop>, calling <handler> with <data> for well-formed GET requests. Returns the server, or
 * NULL with <err> filled naming the address.
 */
struct admin *admin_start(struct loop *loop, const char *bind, admin_handler handler, void *data,
                          char *err, size_t errlen);
/* Closes the listener and every connection (pending replies are cancelled); NULL is fine. */
void admin_stop(struct admin *a);

#endif
