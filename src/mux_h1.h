/*
 * mux_h1: the inbound HTTP/1.1 codec (protocol http). It takes over an inbound session once
 * the caller's identity is verified, reads request heads from the TLS end, authorizes each
 * request (stream.h), forwards allowed ones to the local application over one plain HTTP/1.1
 * connection it dials and keeps alive, and carries the responses back, one stream at a time.
 * Outbound it serves the local application's HTTP/1.1 to an upstream. When the far side speaks
 * HTTP/2 (an http2 or grpc service or upstream) it translates: each request is a stream on a
 * connection the worker's sessions share (h2up.h).
 *
 * Worker thread only.
 */
#ifndef CONNECTD_MUX_H1_H
#define CONNECTD_MUX_H1_H

struct session_mux;

/* The codec as a session carrier (session_int.h). */
extern const struct session_mux mux_h1_mux;

#endif
