/*
 * xprt: one end of a session's connection, plain TCP (or a unix socket) or TLS, behind one set
 * of byte operations (redis' ConnectionType): the relay and the HTTP codec never ask which.
 *
 * I/O follows the project convention: >0 bytes, 0 for the end of the stream, -EAGAIN to wait
 * (then xprt_wants() says for which events), another negative code on failure (then
 * xprt_error() describes it). An end belongs to its session; only its worker's thread uses it.
 */
#ifndef CONNECTD_XPRT_H
#define CONNECTD_XPRT_H

#include <stddef.h>
#include <sys/types.h>

#include "loop.h"
#include "outlier.h"
#include "tls.h"

struct xprt {
    int fd; /* -1 when closed */
    struct loop_io io;
    struct tls_conn *tls; /* NULL on a plain end; owned */
    int rd_eof;           /* the read side reached the end of the stream */
    int wr_shut;          /* our write side is shut down (close_notify or SHUT_WR sent) */
    /* Outbound L7: the upstream whose connection count (limits.max_connections) this end
     * holds a unit of, with a reference; xprt_close() gives both back. Moves with the end. */
    struct outlier *counted;
};

/* Reads up to <len> bytes. */
ssize_t xprt_read(struct xprt *x, void *buf, size_t len);
/* Writes up to <len> bytes; after -EAGAIN on TLS the same bytes must be offered again. */
ssize_t xprt_write(struct xprt *x, const void *buf, size_t len);
/* Ends our write side: TLS close_notify, or shutdown(SHUT_WR) on a plain end. 0, -EAGAIN or
 * an error. */
int xprt_shutdown(struct xprt *x);
/* The events the end waits for after -EAGAIN from an operation that, on a plain end, needs
 * <plain> (LOOP_READ or LOOP_WRITE): TLS may need the other one. */
unsigned xprt_wants(const struct xprt *x, unsigned plain);
/* Whether bytes are readable without the descriptor (TLS: decrypted, or read ahead). */
int xprt_pending(const struct xprt *x);
/* The caller reads the end again only after an event: TLS buffers are given back. */
void xprt_rest(struct xprt *x);
/* One line describing the failure <rc> of the last operation. */
const char *xprt_error(const struct xprt *x, int rc);
/* Stops the end's events (on <loop>), frees its TLS and closes its descriptor; idempotent. */
void xprt_close(struct loop *loop, struct xprt *x);

#endif
