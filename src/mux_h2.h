/*
 * mux_h2: the inbound HTTP/2 codec (protocols http2 and grpc, and any L7 caller that speaks
 * HTTP/2: ALPN "h2" on the mesh hop, or the connection preface without ALPN). It takes over an
 * inbound session once the caller's identity is verified, serves the caller's streams with an
 * HTTP/2 server session (h2.h), authorizes each request (stream.h), and forwards allowed ones
 * over one HTTP/2 prior-knowledge (h2c) connection to the local application, streams mapped
 * one to one (http2, grpc), or as HTTP/1.1 exchanges, one connection each (http).
 *
 * Worker thread only.
 */
#ifndef CONNECTD_MUX_H2_H
#define CONNECTD_MUX_H2_H

struct session_mux;

/* The codec as a session carrier (session_int.h). */
extern const struct session_mux mux_h2_mux;

#endif
