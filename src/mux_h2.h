/*
 * mux_h2: the HTTP/2 codec, both roles. Inbound (protocols http2 and grpc, and any L7 caller
 * that speaks HTTP/2: ALPN "h2" on the mesh hop, or the connection preface without ALPN): it
 * takes over a session once the caller's identity is verified, serves the caller's streams
 * with an HTTP/2 server session (h2.h), authorizes each request (stream.h), and forwards
 * allowed ones as streams on the worker's shared h2c connection to the local application
 * (h2up.h; http2, grpc), or as HTTP/1.1 exchanges, one connection each (http). Outbound (an
 * http2 or grpc upstream whose application speaks h2c): each of the application's streams goes
 * out, unauthorized, as a stream on a shared mTLS connection (ALPN h2) to an endpoint of the
 * upstream (session_dial_h2). connectd's drain sends GOAWAY (the carrier's drain).
 *
 * Worker thread only.
 */
#ifndef CONNECTD_MUX_H2_H
#define CONNECTD_MUX_H2_H

struct session_mux;

/* The codec as a session carrier (session_int.h). */
extern const struct session_mux mux_h2_mux;

#endif
