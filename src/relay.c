/*
 * relay: the L4 byte relay.
 *
 *   RELAY: per direction d (end[d] -> end[1 - d]):
 *     EMPTY --read--> HOLDING --write all--> EMPTY
 *       | EOF on end[d] and nothing held
 *       v
 *     SHUT (end[1 - d]'s write side shut: close_notify or SHUT_WR)
 *   both directions SHUT -> session finishes "ok"; any I/O error -> finishes "error"
 *
 * buf[d] carries bytes read from end[d] to end[1 - d]. A direction reads only when its buffer
 * is empty (back-pressure: a slow reader stops the writer's side), writes what it holds, and
 * once its source reached EOF and the buffer drained, shuts down the write side of its
 * destination: half-close is carried both ways and the other direction keeps flowing. The
 * pump runs both directions until neither makes progress, then registers exactly the events
 * each end is blocked on; TLS may need the opposite event of the operation (a read that wants
 * a write), which xprt_wants() reports. Buffers come from the worker's pool and go back when
 * a direction holds nothing and waits, so an idle connection holds none. The idle timer only
 * looks at last_io_ms (session.c), so moving bytes never touches the timer heap.
 *
 * An end is read only after an event for it or a read that did not drain it (a full buffer,
 * or records left inside OpenSSL): the loop is level-triggered, so more bytes come with an
 * event, and the read that would only say EAGAIN (a system call, and for TLS an SSL_read that
 * takes and gives back a record buffer) is saved. The TLS end reads ahead (tls.c), so a
 * record costs one read() rather than two (header, then body); records it leaves inside
 * OpenSSL are read without waiting for an event that will not come.
 */
#include "relay.h"
#include "session_int.h"

#include <errno.h>
#include <stdio.h>

void relay_start(struct session *s)
{
    session_set_state(s, S_RELAY);
    s->carrier = &relay_mux;
    /* The handshake or a codec may have left bytes inside OpenSSL (TLS reads ahead). */
    s->buf[0].rd_ok = s->buf[1].rd_ok = 1;
    s->last_io_ms = loop_now_ms(s->host->loop);
    if (session_idle_timeout_ms(s) != 0)
        loop_timer_start(s->host->loop, &s->timer, session_idle_timeout_ms(s));
    relay_pump(s);
}

void relay_pump(struct session *s)
{
    unsigned wants[2];
    for (int d = 0; d < 2; d++) {
        if (s->end[d].io.fired != 0)
            s->buf[d].rd_ok = 1;
        s->end[d].io.fired = 0;
    }
    for (;;) {
        int progress = 0;
        wants[0] = wants[1] = 0;
        for (int d = 0; d < 2; d++) {
            struct xprt *src = &s->end[d], *dst = &s->end[1 - d];
            struct relay_buf *b = &s->buf[d];
            ssize_t n;
            if (b->len == 0 && !src->rd_eof && !b->rd_ok) {
                wants[d] |= b->rd_wants;
                session_buf_give_back(s->host, b); /* an idle direction holds no buffer */
            } else if (b->len == 0 && !src->rd_eof) {
                session_buf_take(s->host, b);
                n = xprt_read(src, b->data, SESSION_RELAY_BUF_BYTES);
                if (n > 0 && (size_t)n < SESSION_RELAY_BUF_BYTES && !xprt_pending(src)) {
                    /* A short read drained the socket (as nginx assumes): wait for an event. */
                    b->rd_ok = 0;
                    b->rd_wants = LOOP_READ; /* asked for once what it holds is written */
                    xprt_rest(src);
                }
                if (n > 0) {
                    b->off = 0;
                    b->len = (size_t)n;
                    s->bytes[d] += (uint64_t)n;
                    if (d == 0)
                        STAT_ADD(s->lstat->bytes_in, (uint64_t)n);
                    else
                        STAT_ADD(s->lstat->bytes_out, (uint64_t)n);
                    progress = 1;
                } else if (n == 0) {
                    src->rd_eof = 1;
                    progress = 1;
                    session_buf_give_back(s->host, b);
                } else if (n == -EAGAIN) {
                    b->rd_ok = 0;
                    b->rd_wants = xprt_wants(src, LOOP_READ);
                    wants[d] |= b->rd_wants;
                    session_buf_give_back(s->host, b);
                } else {
                    session_finish(s, SESSION_RES_ERROR, xprt_error(src, (int)n));
                    return;
                }
            }
            if (b->len > 0) {
                n = xprt_write(dst, b->data + b->off, b->len);
                if (n > 0) {
                    b->off += (size_t)n;
                    b->len -= (size_t)n;
                    progress = 1;
                } else if (n == -EAGAIN) {
                    wants[1 - d] |= xprt_wants(dst, LOOP_WRITE);
                } else {
                    session_finish(s, SESSION_RES_ERROR, xprt_error(dst, (int)n));
                    return;
                }
            }
            if (b->len == 0 && src->rd_eof && !dst->wr_shut) {
                int rc = xprt_shutdown(dst);
                if (rc == 0) {
                    dst->wr_shut = 1;
                    progress = 1;
                } else if (rc == -EAGAIN) {
                    wants[1 - d] |= xprt_wants(dst, LOOP_WRITE);
                } else {
                    session_finish(s, SESSION_RES_ERROR, xprt_error(dst, rc));
                    return;
                }
            }
        }
        if (s->end[0].wr_shut && s->end[1].wr_shut) {
            session_finish(s, SESSION_RES_OK, "closed");
            return;
        }
        if (!progress)
            break;
        s->last_io_ms = loop_now_ms(s->host->loop);
    }
    if (session_want(s, 0, wants[0]) == 0)
        session_want(s, 1, wants[1]);
}

/* RELAY's state timer is the idle timer: it re-arms itself for the rest of the period. */
static void relay_on_timer(struct session *s)
{
    uint64_t idle = loop_now_ms(s->host->loop) - s->last_io_ms, limit = session_idle_timeout_ms(s);
    if (idle < limit) {
        loop_timer_start(s->host->loop, &s->timer, limit - idle);
        return;
    }
    char why[100];
    snprintf(why, sizeof(why), "idle for %llu ms (%s %llu)", (unsigned long long)idle,
             s->inbound ? "local_idle_timeout_ms" : "idle_timeout_ms", (unsigned long long)limit);
    session_finish(s, SESSION_RES_IDLE_TIMEOUT, why);
}

const struct session_mux relay_mux = {
    .name = "relay",
    .start = relay_start,
    .advance = relay_pump,
    .on_timer = relay_on_timer,
};
