/*
 * tls: mutual TLS for the mesh, over non-blocking sockets.
 *
 * The only module that includes OpenSSL; no OpenSSL type appears here. A tls_ctx is built
 * once per certificate generation (leaf + roots) and holds both the server context (inbound:
 * client certificate required) and the client context (outbound). Connections keep the
 * context they were created with, so swapping in a new tls_ctx never disturbs open ones.
 *
 * I/O functions follow the project convention: >0 bytes, 0 for a clean end of stream, -EAGAIN
 * to wait (then tls_conn_wants() says for what), or another negative code for failure (then
 * tls_conn_error() holds the drained OpenSSL error queue as one line).
 */
#ifndef CONNECTD_TLS_H
#define CONNECTD_TLS_H

#include <stddef.h>
#include <sys/types.h>

struct tls_ctx;
struct tls_conn;

struct tls_ctx_opts {
    int min_version; /* 0 = TLS 1.2; else 12 or 13 */
    int max_version; /* 0 = no maximum; else 12 or 13 */
    /* NULL for the defaults, or comma-separated IANA names of TLS 1.2 cipher suites (e.g.
     * "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"); TLS 1.3 suites stay the defaults. */
    const char *cipher_suites;
};

/*
 * Builds a context from <cert_pem> (the leaf followed by any intermediates, all sent in the
 * handshake), <key_pem> and <n_roots> root PEMs (every one trusted; nothing else is). Verification
 * requires a chain to one of the roots; host names are never checked (Consul leaves carry
 * identities as URI SANs). <opts> may be NULL for the defaults. Returns 0 and a context with one
 * reference, ERR_BAD_CERT with a message in <err> (never containing key material), or -EINVAL with
 * a message when <opts> names an unknown or empty version range or an unknown cipher suite (the
 * message names it).
 */
int tls_ctx_new(const char *cert_pem, const char *key_pem, const char *const *root_pems,
                size_t n_roots, const struct tls_ctx_opts *opts, struct tls_ctx **out, char *err,
                size_t errlen);

/*
 * A private key parsed once and kept only in OpenSSL's binary form, so a caller that must
 * rebuild contexts (new roots, new TLS settings) need not keep the PEM text: parse it, wipe it,
 * and keep this. tls_key_new() returns 0 and a key, or ERR_BAD_CERT with a message in <err>
 * (never containing key material); <key_pem> is not kept and stays the caller's to wipe.
 * tls_key_free() accepts NULL; contexts built from a key keep their own reference to it.
 */
struct tls_key;
int tls_key_new(const char *key_pem, struct tls_key **out, char *err, size_t errlen);
void tls_key_free(struct tls_key *key);
/* tls_ctx_new() with a parsed key (not taken; NULL is ERR_BAD_CERT). */
int tls_ctx_new_with_key(const char *cert_pem, const struct tls_key *key,
                         const char *const *root_pems, size_t n_roots,
                         const struct tls_ctx_opts *opts, struct tls_ctx **out, char *err,
                         size_t errlen);
struct tls_ctx *tls_ctx_ref(struct tls_ctx *ctx);
/* Safe from any thread; the last unref frees. */
void tls_ctx_unref(struct tls_ctx *ctx);

/* Seconds since the epoch at which the leaf stops being valid (for logs and metrics). */
long long tls_ctx_leaf_not_after(const struct tls_ctx *ctx);
/* Seconds since the epoch from which the leaf is valid. */
long long tls_ctx_leaf_not_before(const struct tls_ctx *ctx);
/* Sessions in the server's resumption cache. */
size_t tls_ctx_server_sessions(const struct tls_ctx *ctx);
/* Client sessions kept for <resume_key> (tls_conn_new_client) now. */
size_t tls_ctx_client_sessions(struct tls_ctx *ctx, const char *resume_key);
/*
 * Drops the server sessions that have expired at <now> (seconds since the epoch): OpenSSL
 * drops them only when the cache is full or every 255 handshakes, so a quiet sidecar would
 * keep them. Returns how many went. Safe from any thread (the cache has its own lock).
 */
size_t tls_ctx_flush_sessions(struct tls_ctx *ctx, long long now);

/*
 * Creates a connection over the connected non-blocking socket <fd> (not owned: the caller
 * closes it after tls_conn_free()). A server connection requires and verifies the client's
 * certificate; a client connection sends <sni> (may be NULL) and verifies the server's chain.
 * With a <resume_key> (the peer: endpoint and SNI) a client offers a session an earlier
 * connection to that key received, when the context holds one, and keeps the sessions it
 * receives under that key; NULL runs full handshakes only. Resumed or not, the peer
 * certificate is the one verified under this context's roots. A server keeps the sessions it
 * issues in this context's cache (a new context starts with none) no longer than the peer's
 * certificate is valid, and refuses a resumed handshake whose peer certificate is not valid now.
 * Returns NULL only when OpenSSL cannot allocate.
 */
struct tls_conn *tls_conn_new_server(struct tls_ctx *ctx, int fd);
struct tls_conn *tls_conn_new_client(struct tls_ctx *ctx, int fd, const char *sni,
                                     const char *resume_key);
void tls_conn_free(struct tls_conn *c);
/*
 * Client side, before the handshake: offers the one ALPN protocol <proto> ("http/1.1"), as
 * Envoy's outbound cluster does for an http upstream. Returns 0, or -EINVAL (an empty or
 * over-long name) or -ENOMEM.
 */
int tls_conn_offer_alpn(struct tls_conn *c, const char *proto);

/* Drives the handshake: 0 when complete, -EAGAIN to wait, or an error (ERR_TLS). */
int tls_handshake(struct tls_conn *c);

/* Reads decrypted bytes: >0, 0 when the peer sent close_notify (or closed cleanly), -EAGAIN,
 * or an error. */
ssize_t tls_read(struct tls_conn *c, void *buf, size_t len);
/* Writes: >0 bytes taken (may be fewer than len), -EAGAIN, or an error. After -EAGAIN the
 * next call must pass the same bytes again (at least as many). */
ssize_t tls_write(struct tls_conn *c, const void *buf, size_t len);
/* Sends close_notify once; reading may continue afterwards. 0 when sent, -EAGAIN, or error.
 * Call it only when no tls_write() is left to retry after -EAGAIN. A connection freed before
 * its close_notify was sent loses its session (OpenSSL no longer resumes it). */
int tls_shutdown(struct tls_conn *c);

/* After -EAGAIN from the last call: LOOP_READ and/or LOOP_WRITE (the values of loop.h). */
unsigned tls_conn_wants(const struct tls_conn *c);
/* Bytes already decrypted and buffered inside the connection (readable without the fd). */
size_t tls_conn_pending(const struct tls_conn *c);
/* Whether the connection holds anything to read without the fd: decrypted bytes, or received
 * bytes not processed yet. Every connection reads ahead (a read takes what the socket holds,
 * not one record's header and then its body, from the first handshake byte on): a reader must
 * not wait for the fd while this says yes, since no event will come for those bytes. */
int tls_conn_has_pending(const struct tls_conn *c);
/*
 * The caller waits for the fd before its next read: OpenSSL's record buffers go back to the
 * allocator unless they hold something (a partial record read ahead, an unsent write), so an
 * idle connection holds none. What tls_read() does itself after a read that says EAGAIN.
 */
void tls_conn_rest(struct tls_conn *c);
/* One line describing the last failure ("" when none). Valid until the next call on c. */
const char *tls_conn_error(const struct tls_conn *c);

/* Why a handshake failed, in the classes the metrics tell apart. */
enum tls_failure {
    TLS_FAIL_NONE = 0,
    TLS_FAIL_NOT_TLS,            /* the peer's first bytes are not a TLS handshake record */
    TLS_FAIL_PROTOCOL_VERSION,   /* no protocol version in common (a TLS 1.0 or 1.1 hello) */
    TLS_FAIL_NO_PEER_CERT,       /* the peer presented no certificate */
    TLS_FAIL_UNKNOWN_CA,         /* the peer's chain leads to none of the trusted roots */
    TLS_FAIL_CERT_EXPIRED,       /* a certificate of the chain is past its notAfter */
    TLS_FAIL_CERT_NOT_YET_VALID, /* a certificate of the chain is before its notBefore */
    TLS_FAIL_BAD_CERT,           /* any other verification failure of the peer's chain */
    TLS_FAIL_OTHER,              /* anything else: alerts, a peer that went away, ... */
};

/* After tls_handshake() failed: which class the failure belongs to (TLS_FAIL_NONE before). */
enum tls_failure tls_conn_failure(const struct tls_conn *c);

/*
 * Raw bytes read from the socket so far. 0 after a failed handshake means the peer never
 * spoke TLS at all (a plain TCP connect-and-close, such as Consul's sidecar health check).
 */
unsigned long long tls_conn_bytes_received(const struct tls_conn *c);

/*
 * Copies the first URI SAN of the peer's (verified) leaf into <buf>. Returns its length, or
 * ERR_NO_URI when the peer sent no certificate or the certificate has no URI SAN, or -ENOSPC.
 */
int tls_conn_peer_uri(const struct tls_conn *c, char *buf, size_t len);
/*
 * The number of URI SANs in the peer's (verified) leaf, 0 without a verified peer. A SPIFFE
 * certificate carries exactly one; with several, verifiers that read different ones would
 * see different callers.
 */
int tls_conn_peer_uri_count(const struct tls_conn *c);
/*
 * Writes the serial of the peer's leaf as colon-separated lower-case hex bytes ("3a:0f:..."),
 * the form Consul uses. Returns the length, ERR_NO_URI without a verified peer, or -ENOSPC.
 */
int tls_conn_peer_serial(const struct tls_conn *c, char *buf, size_t len);
/*
 * Writes the SHA-256 of the peer's (verified) leaf certificate in DER as 64 lower-case hex
 * digits (the Hash of an X-Forwarded-Client-Cert). Returns 64, ERR_NO_URI without a verified
 * peer, -ENOSPC when <len> is under 65, or ERR_TLS.
 */
int tls_conn_peer_cert_sha256_hex(const struct tls_conn *c, char *buf, size_t len);
/*
 * Server: whether the handshake selects an HTTP protocol by ALPN ("h2", else "http/1.1", when
 * the client offers one): on for an L7 service, off (the default) for tcp. Before the
 * handshake.
 */
void tls_conn_set_alpn_l7(struct tls_conn *c, int on);
/* Copies the protocol ALPN selected into <buf> (NUL-terminated). Returns its length, 0 when
 * none was, or -ENOSPC. */
int tls_conn_alpn(const struct tls_conn *c, char *buf, size_t len);
/* 1 when the completed handshake resumed an earlier session. */
int tls_conn_resumed(const struct tls_conn *c);
/* Negotiated protocol ("TLSv1.3") and cipher, for logs. */
const char *tls_conn_version(const struct tls_conn *c);
const char *tls_conn_cipher(const struct tls_conn *c);

/* Process-wide set-up (call once before threads start). */
void tls_global_init(void);
/*
 * For the agent transport's libcurl, which hands over each SSL_CTX it creates for an https://
 * agent (<ssl_ctx> is an SSL_CTX *): what OpenSSL decrypts is wiped once libcurl has read it
 * (SSL_OP_CLEANSE_PLAINTEXT), since the leaf's answer carries the private key.
 */
void tls_agent_ctx_setup(void *ssl_ctx);
/* The OpenSSL version in use, e.g. "OpenSSL 3.0.13 30 Jan 2024" (static). */
const char *tls_lib_version(void);

#endif
