/*
 * xprt: the byte operations of a session's two kinds of ends. A plain end retries EINTR and
 * maps EWOULDBLOCK to -EAGAIN; a TLS end is tls.c's, which already follows the convention.
 */
#include "xprt.h"
#include "util.h"

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

ssize_t xprt_read(struct xprt *x, void *buf, size_t len)
{
    if (x->tls != NULL)
        return tls_read(x->tls, buf, len);
    for (;;) {
        ssize_t n = recv(x->fd, buf, len, 0);
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    }
}

ssize_t xprt_write(struct xprt *x, const void *buf, size_t len)
{
    if (x->tls != NULL)
        return tls_write(x->tls, buf, len);
    for (;;) {
        ssize_t n = send(x->fd, buf, len, MSG_NOSIGNAL);
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    }
}

int xprt_shutdown(struct xprt *x)
{
    if (x->tls != NULL)
        return tls_shutdown(x->tls);
    return shutdown(x->fd, SHUT_WR) == -1 ? -errno : 0;
}

unsigned xprt_wants(const struct xprt *x, unsigned plain)
{
    return x->tls != NULL ? tls_conn_wants(x->tls) : plain;
}

int xprt_pending(const struct xprt *x)
{
    return x->tls != NULL && tls_conn_has_pending(x->tls);
}

void xprt_rest(struct xprt *x)
{
    if (x->tls != NULL)
        tls_conn_rest(x->tls);
}

const char *xprt_error(const struct xprt *x, int rc)
{
    if (x->tls != NULL && tls_conn_error(x->tls)[0] != '\0')
        return tls_conn_error(x->tls);
    return util_strerror(rc);
}

void xprt_close(struct loop *loop, struct xprt *x)
{
    if (x->fd < 0)
        return;
    if (x->tls != NULL) {
        tls_conn_free(x->tls);
        x->tls = NULL;
    }
    x->io.fd = x->fd;
    loop_io_close(loop, &x->io); /* no EPOLL_CTL_DEL: the close takes it out */
    x->fd = -1;
    x->rd_eof = x->wr_shut = 0;
    if (x->counted != NULL) {
        outlier_release(x->counted, OUTLIER_LIMIT_CONNECTIONS);
        outlier_unref(x->counted);
        x->counted = NULL;
    }
}
