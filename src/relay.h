/*
 * relay: the L4 byte relay between a session's two ends, once both legs are up.
 *
 * Worker thread only; the session (session_int.h) is the relay's whole state.
 */
#ifndef CONNECTD_RELAY_H
#define CONNECTD_RELAY_H

struct session;
struct session_mux;

/* The relay as a session carrier (start = relay_start, advance = relay_pump, on_timer = the
 * idle timer). */
extern const struct session_mux relay_mux;

/*
 * Enters RELAY (the state timer becomes the idle timer when one is configured) and moves
 * bytes as far as they go. Bytes already in s->buf[d] (read from end[d] by a codec before it
 * handed over, e.g. after an HTTP Upgrade) are written first. May finish the session.
 */
void relay_start(struct session *s);

/* Moves bytes both ways until neither direction makes progress, then registers the events
 * each end waits for; finishes the session when both directions have shut down or on error. */
void relay_pump(struct session *s);

#endif
