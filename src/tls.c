/*
 * tls: OpenSSL behind the small contract of tls.h.
 *
 * A tls_ctx owns two SSL_CTX built from objects decoded once (leaf, chain, key, one trust
 * store shared by both), so a new connection costs one SSL_new() and nothing is re-parsed per
 * handshake. Every SSL holds its own reference to its SSL_CTX, which is why a connection
 * outlives the tls_ctx it was made from; only a client connection that keeps its sessions
 * (a resume key) also holds a tls_ctx reference, for the table they go into.
 *
 * Error discipline (STYLE rule 10): every I/O call starts with an empty OpenSSL error queue
 * and errno, and every failure drains the queue into the connection's one-line message, so no
 * stale error can be blamed on a later call or another connection of the same thread.
 */
#include "tls.h"

#include "log.h"
#include "loop.h"
#include "util.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

/* ECDHE with AEAD only, AES first (hardware-accelerated), as Consul's Go proxy offers. */
#define TLS12_CIPHERS                                                                              \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"                                   \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"                                   \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
/* OpenSSL's default TLS 1.3 order puts AES-256 first; AES-128 is cheaper and as safe here. */
#define TLS13_CIPHERSUITES                                                                         \
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
/* X25519 first (the client's one key share); P-384 only for peers that insist on it. */
#define TLS_GROUPS "X25519:P-256:P-384"

/* Server-side session cache: bounded so a burst of handshakes cannot grow memory without end. */
#define TLS_SESSION_CACHE_SIZE 1024
/*
 * How long the server keeps a session for resumption (and the ticket lifetime it tells the
 * client), as nginx's and HAProxy's defaults: OpenSSL's 7,200 s kept the sessions of a burst
 * of connections, most of them never resumed (the client keeps a few per peer), and the pages
 * they pinned (~15 KiB each) for two hours. A caller idle for longer does a full handshake.
 */
#define TLS_SESSION_TIMEOUT_S 300
static const unsigned char session_id_context[] = "connectd";
/* A connection's failure text, at most (tls_conn_error). */
#define TLS_ERR_MAX 512

/*
 * Client-side resumption. The sessions peers issue are kept per peer key (endpoint and SNI)
 * so that the next connection to the same sidecar resumes instead of running a full mutual
 * handshake. The newest is offered by every dial until a newer one comes, not taken out: an
 * OpenSSL server forgets a session on use only when it accepts early data (anti-replay, which
 * we never enable), so connections opened at the same moment all resume, as nginx's and
 * HAProxy's upstream sides do, where one ticket each made 12 of 16 run full handshakes. RFC
 * 8446 (C.4) advises against a ticket on several connections because an observer can link
 * them; on a mesh hop they are linked anyway, by the two sidecars' addresses. Forward secrecy
 * stays (every resumption runs a fresh (EC)DHE), and a session the server no longer knows is
 * dropped after the full handshake it caused (tls_handshake).
 */
#define TLS_CLIENT_SESSIONS          256
#define TLS_CLIENT_SESSIONS_PER_PEER 4

struct client_session {
    uint64_t hash; /* of key; 0 marks a free slot */
    uint64_t seq;  /* arrival order: the oldest goes first */
    SSL_SESSION *sess;
    char *key;
};

struct tls_ctx {
    atomic_uint refs;
    SSL_CTX *server;
    SSL_CTX *client;
    long long leaf_not_after;
    long long leaf_not_before;
    /* the client's sessions, shared by every worker (allocated on first use) */
    pthread_mutex_t sess_lock;
    uint64_t sess_seq;
    struct client_session *sessions;
};

struct tls_conn {
    SSL *ssl;
    char *resume_key;    /* client: where this connection's sessions are kept; NULL: not kept */
    struct tls_ctx *ctx; /* with a resume_key: the context that keeps them (a reference) */
    uint64_t offered;    /* client: the kept session offered (its seq), until the handshake ends */
    unsigned wants;      /* LOOP_READ / LOOP_WRITE wanted by the last -EAGAIN */
    int shutdown_sent;   /* close_notify is out (or queued inside OpenSSL) */
    int fatal;           /* SSL_ERROR_SSL/SYSCALL seen: SSL_shutdown() must not be called */
    const char *preset;  /* a failure found before any I/O, reported by tls_handshake() */
    enum tls_failure failure; /* the class of the last failure (conn_fail) */
    int alpn_l7;              /* server: select "h2" or "http/1.1" when the client offers them */
    /* The last failure's text (TLS_ERR_MAX bytes), made at the first failure: 512 bytes in
     * every connection were 3 % of what an idle one costs, for a line few ever write. */
    char *err;
};

/* ---- error text ---------------------------------------------------------------------------- */

static void append(char *buf, size_t size, const char *s)
{
    size_t n = strnlen(buf, size);
    if (n + 1 >= size)
        return;
    snprintf(buf + n, size - n, "%s", s);
}

/*
 * Appends the drained OpenSSL error queue to <buf> as "; <error>[: <data>]" items. The PEM and
 * decoder errors name reasons and expected types, not input bytes, so no key material gets in
 * (test_bad_inputs checks this for broken, mismatched and encrypted keys).
 */
static void drain_errors(char *buf, size_t size)
{
    for (;;) {
        const char *data = NULL;
        int flags = 0;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
        unsigned long e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags);
#else
        unsigned long e = ERR_get_error_line_data(NULL, NULL, &data, &flags);
#endif
        if (e == 0)
            break;
        char one[256];
        ERR_error_string_n(e, one, sizeof(one));
        append(buf, size, "; ");
        append(buf, size, one);
        if (data != NULL && *data != '\0' && (flags & ERR_TXT_STRING)) {
            append(buf, size, ": ");
            append(buf, size, data);
        }
    }
}

/*
 * The class of a failure from the chain verification result <v> and the first queued error
 * <e>. Verification comes first: OpenSSL queues a generic "certificate verify failed" for
 * every kind. "Not TLS" is a first record OpenSSL could not take for TLS at all, before any
 * handshake message was read (<before_hello>): garbage, plain HTTP, an HTTP proxy request.
 */
static enum tls_failure classify(long v, unsigned long e, int before_hello)
{
    switch (v) {
    case X509_V_OK:
        break;
    case X509_V_ERR_CERT_HAS_EXPIRED:
        return TLS_FAIL_CERT_EXPIRED;
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return TLS_FAIL_CERT_NOT_YET_VALID;
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
        return TLS_FAIL_UNKNOWN_CA;
    default:
        return TLS_FAIL_BAD_CERT;
    }
    if (e == 0 || ERR_GET_LIB(e) != ERR_LIB_SSL)
        return TLS_FAIL_OTHER;
    switch (ERR_GET_REASON(e)) {
    case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
        return TLS_FAIL_NO_PEER_CERT;
    case SSL_R_UNSUPPORTED_PROTOCOL:
    case SSL_R_VERSION_TOO_LOW:
    case SSL_R_WRONG_SSL_VERSION:
    case SSL_R_NO_PROTOCOLS_AVAILABLE:
    case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
        return TLS_FAIL_PROTOCOL_VERSION;
    case SSL_R_WRONG_VERSION_NUMBER:
    case SSL_R_HTTP_REQUEST:
    case SSL_R_HTTPS_PROXY_REQUEST:
    case SSL_R_PACKET_LENGTH_TOO_LONG:
    case SSL_R_UNKNOWN_PROTOCOL:
    case SSL_R_UNEXPECTED_RECORD:
    case SSL_R_RECORD_LENGTH_MISMATCH:
        return before_hello ? TLS_FAIL_NOT_TLS : TLS_FAIL_OTHER;
    default:
        return TLS_FAIL_OTHER;
    }
}

/* The connection's failure text, made on first use (TLS_ERR_MAX bytes, empty). */
static char *err_buf(struct tls_conn *c)
{
    if (c->err == NULL)
        c->err = xcalloc(1, TLS_ERR_MAX);
    return c->err;
}

/* Records "<what>[: <detail>]; <queue>; verify: <reason>" as the connection's failure. */
static void conn_fail(struct tls_conn *c, const char *what, const char *detail)
{
    long v = SSL_get_verify_result(c->ssl);
    char *e = err_buf(c);
    c->failure = classify(v, ERR_peek_error(), SSL_get_state(c->ssl) == TLS_ST_BEFORE);
    snprintf(e, TLS_ERR_MAX, "%s", what);
    if (detail != NULL) {
        append(e, TLS_ERR_MAX, ": ");
        append(e, TLS_ERR_MAX, detail);
    }
    drain_errors(e, TLS_ERR_MAX);
    if (v != X509_V_OK) {
        append(e, TLS_ERR_MAX, "; verify: ");
        append(e, TLS_ERR_MAX, X509_verify_cert_error_string(v));
    }
}

/* Fills a setup-time message: "<what>" plus the drained queue. Always returns <code>. */
static int ctx_fail(char *err, size_t errlen, int code, const char *what)
{
    if (err != NULL && errlen > 0) {
        snprintf(err, errlen, "%s", what);
        drain_errors(err, errlen);
    } else {
        ERR_clear_error();
    }
    return code;
}

/* ---- client sessions ----------------------------------------------------------------------- */

static void slot_clear(struct client_session *e)
{
    SSL_SESSION_free(e->sess);
    free(e->key);
    memset(e, 0, sizeof(*e));
}

/* Keeps <sess> (ownership moves here) for <key>, the newest of at most a few per peer. */
static void session_put(struct tls_ctx *ctx, const char *key, SSL_SESSION *sess)
{
    uint64_t h = util_hash_str(key);
    pthread_mutex_lock(&ctx->sess_lock);
    if (ctx->sessions == NULL)
        ctx->sessions = xcalloc(TLS_CLIENT_SESSIONS, sizeof(*ctx->sessions));
    struct client_session *free_slot = NULL, *oldest = NULL, *oldest_same = NULL;
    int same = 0;
    for (size_t i = 0; i < TLS_CLIENT_SESSIONS; i++) {
        struct client_session *e = &ctx->sessions[i];
        if (e->hash == 0) {
            if (free_slot == NULL)
                free_slot = e;
            continue;
        }
        if (oldest == NULL || e->seq < oldest->seq)
            oldest = e;
        if (e->hash == h && strcmp(e->key, key) == 0) {
            same++;
            if (oldest_same == NULL || e->seq < oldest_same->seq)
                oldest_same = e;
        }
    }
    struct client_session *e = same >= TLS_CLIENT_SESSIONS_PER_PEER ? oldest_same
                               : free_slot != NULL                  ? free_slot
                                                                    : oldest;
    if (e->hash != 0)
        slot_clear(e);
    e->hash = h;
    e->seq = ++ctx->sess_seq;
    e->sess = sess;
    e->key = xstrdup(key);
    pthread_mutex_unlock(&ctx->sess_lock);
}

/* A copy of the newest unexpired session kept for <key> (the caller owns it; *seq says which
 * one it was), or NULL. A copy, not a reference: OpenSSL marks a connection's session unusable
 * when the connection ends without close_notify, which must not spoil it for the dials that
 * share it. */
static SSL_SESSION *session_get(struct tls_ctx *ctx, const char *key, uint64_t *seq)
{
    uint64_t h = util_hash_str(key);
    time_t now = time(NULL);
    SSL_SESSION *sess = NULL;
    pthread_mutex_lock(&ctx->sess_lock);
    for (;;) {
        struct client_session *best = NULL;
        for (size_t i = 0; ctx->sessions != NULL && i < TLS_CLIENT_SESSIONS; i++) {
            struct client_session *e = &ctx->sessions[i];
            if (e->hash == h && strcmp(e->key, key) == 0 && (best == NULL || e->seq > best->seq))
                best = e;
        }
        if (best == NULL)
            break;
        /* Neither an expired session (the server has forgotten it too) nor one whose server
         * certificate has expired since it was verified: resumption verifies nothing again. */
        const X509 *peer = SSL_SESSION_get0_peer(best->sess);
        if ((time_t)SSL_SESSION_get_time(best->sess) + (time_t)SSL_SESSION_get_timeout(best->sess) >
                now &&
            peer != NULL && X509_cmp_time(X509_get0_notAfter(peer), &now) > 0) {
            sess = SSL_SESSION_dup(best->sess);
            if (sess == NULL)
                ERR_clear_error();
            else
                *seq = best->seq;
            break;
        }
        slot_clear(best);
    }
    pthread_mutex_unlock(&ctx->sess_lock);
    return sess;
}

/* Forgets the session session_get() copied as <seq>, if still kept: its server no longer
 * knows it. */
static void session_drop(struct tls_ctx *ctx, uint64_t seq)
{
    pthread_mutex_lock(&ctx->sess_lock);
    for (size_t i = 0; ctx->sessions != NULL && i < TLS_CLIENT_SESSIONS; i++) {
        struct client_session *e = &ctx->sessions[i];
        if (e->hash != 0 && e->seq == seq)
            slot_clear(e);
    }
    pthread_mutex_unlock(&ctx->sess_lock);
}

/*
 * OpenSSL hands over each session a server issues (in TLS 1.3, after the handshake). A copy is
 * kept: OpenSSL marks the connection's own object unusable when the connection ends without
 * close_notify, which must not cost the next connection its resumption.
 */
/*
 * Server ALPN: an L7 service (tls_conn_set_alpn_l7) selects "h2" before "http/1.1" among what
 * the client offers, as Envoy's inbound listener does; a tcp service, or a client offering
 * neither, negotiates nothing (no alert: ALPN stays optional on the mesh hop).
 */
static int on_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned inlen, void *arg)
{
    static const unsigned char ours[] = "\x02h2\x08http/1.1";
    const struct tls_conn *c = SSL_get_app_data(ssl);
    unsigned char *sel = NULL;
    unsigned char sel_len = 0;
    (void)arg;
    if (c == NULL || !c->alpn_l7)
        return SSL_TLSEXT_ERR_NOACK;
    if (SSL_select_next_proto(&sel, &sel_len, ours, sizeof(ours) - 1, in, inlen) !=
        OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = sel;
    *outlen = sel_len;
    return SSL_TLSEXT_ERR_OK;
}

static int on_new_session(SSL *ssl, SSL_SESSION *sess)
{
    const struct tls_conn *c = SSL_get_app_data(ssl);
    if (c == NULL || c->resume_key == NULL || !SSL_SESSION_is_resumable(sess))
        return 0;
    SSL_SESSION *copy = SSL_SESSION_dup(sess);
    if (copy == NULL) {
        ERR_clear_error();
        return 0;
    }
    /* A TLS 1.3 ticket is kept no longer than the lifetime the server gave it (RFC 8446
     * 4.6.1): past it the server has forgotten the session, and offering it wastes a try. */
    unsigned long hint = SSL_SESSION_get_ticket_lifetime_hint(copy);
    if (hint > 0 && (long)hint < SSL_SESSION_get_timeout(copy))
        SSL_SESSION_set_timeout(copy, (long)hint);
    session_put(c->ctx, c->resume_key, copy);
    return 0; /* OpenSSL keeps and frees its own reference */
}

/* ---- server sessions ----------------------------------------------------------------------- */

/* Seconds since the epoch of <t>, or -1 when it cannot be read. */
static time_t asn1_time_to_epoch(const ASN1_TIME *t)
{
    struct tm tm;
    if (t == NULL || !ASN1_TIME_to_tm(t, &tm))
        return -1;
    return timegm(&tm);
}

/*
 * A resumed handshake verifies no certificate: the peer's is the one kept in the session. A
 * session is therefore good only while that certificate is itself valid; past its notAfter
 * (or before its notBefore) the caller must run a full handshake, which then fails.
 */
static int peer_valid_now(const X509 *peer)
{
    time_t now = time(NULL);
    return peer != NULL && X509_cmp_time(X509_get0_notBefore(peer), &now) < 0 &&
           X509_cmp_time(X509_get0_notAfter(peer), &now) >= 0;
}

/*
 * Caps the lifetime of a session the server issues at the validity left to the peer's
 * certificate, so the cache forgets it when the certificate expires instead of after
 * OpenSSL's default timeout (refreshed by every resumption). A session without a peer is
 * left alone (the server requires one, so none is cached).
 */
static void cap_session_timeout(SSL_SESSION *sess)
{
    const X509 *peer = SSL_SESSION_get0_peer(sess);
    if (peer == NULL)
        return;
    time_t not_after = asn1_time_to_epoch(X509_get0_notAfter(peer));
    long born = SSL_SESSION_get_time(sess);
    long left = not_after < 0 ? 0 : (long)(not_after - (time_t)born);
    if (left < 0)
        left = 0;
    if (left < SSL_SESSION_get_timeout(sess))
        SSL_SESSION_set_timeout(sess, left);
}

/* TLS 1.3: runs before the ticket is written, so its lifetime tells the client the same. */
static int on_server_ticket(SSL *ssl, void *arg)
{
    (void)arg;
    SSL_SESSION *sess = SSL_get_session(ssl);
    if (sess != NULL)
        cap_session_timeout(sess);
    return 1;
}

/*
 * A resumed handshake issues no new ticket: the client offers the one it has to every dial
 * until it expires (session_get), so a new one per connection only made, cached and sent a
 * session more per connection, each kept ~1 KiB on both ends until it expired. A caller that
 * resumes keeps the lifetime its ticket had (then a full handshake brings a new one). The
 * server knows it resumes once its ServerHello is decided, and counts its tickets only after
 * the client's Finished.
 */
static void on_server_state(const SSL *ssl, int where, int ret)
{
    (void)ret;
    if ((where & SSL_CB_ACCEPT_LOOP) && SSL_get_state(ssl) == TLS_ST_SW_SRVR_HELLO &&
        SSL_session_reused(ssl) == 1)
        SSL_set_num_tickets((SSL *)ssl, 0); /* the connection's own object, not const */
}

/* Every session that enters the server cache (TLS 1.2 session ids too). */
static int on_server_session(SSL *ssl, SSL_SESSION *sess)
{
    (void)ssl;
    cap_session_timeout(sess);
    return 0; /* OpenSSL keeps and frees its own reference */
}

/* ---- contexts ------------------------------------------------------------------------------ */

/* Never prompt for a passphrase: an encrypted key is simply a key we cannot use. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return 0;
}

/*
 * Decodes every CERTIFICATE block of <pem> and appends it to <out>. Returns the number
 * decoded (at least one), or -1 on a malformed block or when there is none.
 */
static int read_certs(const char *pem, STACK_OF(X509) * out)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    if (bio == NULL)
        return -1;
    int n = 0;
    for (;;) {
        X509 *x = PEM_read_bio_X509(bio, NULL, no_passphrase, NULL);
        if (x == NULL)
            break;
        if (!sk_X509_push(out, x)) {
            X509_free(x);
            n = -1;
            break;
        }
        n++;
    }
    BIO_free(bio);
    if (n < 0)
        return -1;
    /* The loop always ends on an error; "no start line" after a certificate is the clean end. */
    unsigned long e = ERR_peek_last_error();
    if (n == 0 || ERR_GET_LIB(e) != ERR_LIB_PEM || ERR_GET_REASON(e) != PEM_R_NO_START_LINE)
        return -1;
    ERR_clear_error();
    return n;
}

/* Adds a trust anchor; the same root listed twice is harmless, any other failure is not. */
static int store_add(X509_STORE *store, X509 *x)
{
    if (X509_STORE_add_cert(store, x))
        return 0;
    unsigned long e = ERR_peek_last_error();
    if (ERR_GET_LIB(e) != ERR_LIB_X509 || ERR_GET_REASON(e) != X509_R_CERT_ALREADY_IN_HASH_TABLE)
        return -1;
    ERR_clear_error();
    return 0;
}

static int version_of(int v, int *out)
{
    switch (v) {
    case 0:
        *out = 0;
        return 0;
    case 12:
        *out = TLS1_2_VERSION;
        return 0;
    case 13:
        *out = TLS1_3_VERSION;
        return 0;
    default:
        return -EINVAL;
    }
}

/* Maps opts (NULL = defaults) to OpenSSL versions: minimum TLS 1.2, no maximum (0). */
static int version_range(const struct tls_ctx_opts *opts, int *min_v, int *max_v)
{
    if (version_of(opts ? opts->min_version : 0, min_v) < 0 ||
        version_of(opts ? opts->max_version : 0, max_v) < 0)
        return -EINVAL;
    if (*min_v == 0)
        *min_v = TLS1_2_VERSION;
    if (*max_v != 0 && *max_v < *min_v)
        return -EINVAL;
    return 0;
}

#define CIPHER_LIST_MAX 2048

/*
 * Translates <names>, comma-separated IANA (RFC) suite names as Consul writes them, into an
 * OpenSSL cipher list in <out>. Only TLS 1.2 suites qualify. Returns 0, or -EINVAL with the
 * offending name in <err>.
 */
static int cipher_list_from_iana(const char *names, char *out, size_t outlen, char *err,
                                 size_t errlen)
{
    int rc = -EINVAL;
    size_t at = 0;
    SSL_CTX *probe = SSL_CTX_new(TLS_method());
    if (probe == NULL || !SSL_CTX_set_cipher_list(probe, "ALL:COMPLEMENTOFALL")) {
        snprintf(err, errlen, "cannot list the cipher suites OpenSSL knows");
        goto out;
    }
    STACK_OF(SSL_CIPHER) *all = SSL_CTX_get_ciphers(probe);
    out[0] = '\0';
    for (const char *p = names; *p != '\0';) {
        const char *end = strchr(p, ',');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        while (len > 0 && (*p == ' ' || *p == '\t')) {
            p++;
            len--;
        }
        while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            len--;
        const SSL_CIPHER *found = NULL;
        for (int i = 0; len > 0 && found == NULL && i < sk_SSL_CIPHER_num(all); i++) {
            const SSL_CIPHER *c = sk_SSL_CIPHER_value(all, i);
            const char *std = SSL_CIPHER_standard_name(c);
            if (std != NULL && strlen(std) == len && strncmp(std, p, len) == 0 &&
                strcmp(SSL_CIPHER_get_version(c), "TLSv1.3") != 0)
                found = c;
        }
        if (len > 0) {
            const char *name = found != NULL ? SSL_CIPHER_get_name(found) : NULL;
            if (name == NULL) {
                snprintf(err, errlen, "unknown TLS 1.2 cipher suite \"%.*s\"", (int)MIN(len, 128),
                         p);
                goto out;
            }
            int n = snprintf(out + at, outlen - at, "%s%s", at > 0 ? ":" : "", name);
            if (n < 0 || (size_t)n >= outlen - at) {
                snprintf(err, errlen, "too many cipher suites");
                goto out;
            }
            at += (size_t)n;
        }
        p = end != NULL ? end + 1 : p + len;
    }
    if (at == 0) {
        snprintf(err, errlen, "empty cipher suite list");
        goto out;
    }
    rc = 0;
out:
    SSL_CTX_free(probe);
    return rc;
}

/* Applies what both sides share. Returns 0, or -1 with the reason on the error queue. */
static int setup_common(SSL_CTX *sc, X509 *leaf, STACK_OF(X509) * chain, EVP_PKEY *key,
                        X509_STORE *store, int min_v, int max_v, const char *cipher_list)
{
    if (!SSL_CTX_set_min_proto_version(sc, min_v) || !SSL_CTX_set_max_proto_version(sc, max_v))
        return -1;
    if (!SSL_CTX_set_cipher_list(sc, cipher_list) ||
        !SSL_CTX_set_ciphersuites(sc, TLS13_CIPHERSUITES) ||
        !SSL_CTX_set1_groups_list(sc, TLS_GROUPS))
        return -1;
    if (!SSL_CTX_use_certificate(sc, leaf))
        return -1;
    for (int i = 0; i < sk_X509_num(chain); i++) {
        if (!SSL_CTX_add1_chain_cert(sc, sk_X509_value(chain, i)))
            return -1;
    }
    if (!SSL_CTX_use_PrivateKey(sc, key) || !SSL_CTX_check_private_key(sc))
        return -1;
    if (!X509_STORE_up_ref(store))
        return -1;
    SSL_CTX_set_cert_store(sc, store);

    uint64_t opts = SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION;
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
    /*
     * A peer that closes its socket without close_notify is a plain end of stream for an L4
     * relay (the application protocol frames its own data). Without this option OpenSSL 3
     * turns it into a fatal error that also forbids writing the other direction.
     */
    opts |= SSL_OP_IGNORE_UNEXPECTED_EOF;
#endif
    SSL_CTX_set_options(sc, opts);
    /*
     * The chain we send is exactly cert_pem: no per-handshake chain building from the store
     * (which costs CPU and could append a root). Buffers go back to the pool while idle.
     */
    SSL_CTX_set_mode(sc, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                             SSL_MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN);
    /*
     * Read-ahead from the first handshake byte: a read takes what the socket holds, not one
     * record's header and then its body, so a handshake flight of several records costs one
     * read() rather than two per record. Every reader of a connection must then look inside
     * OpenSSL (tls_conn_has_pending()) before it waits for the fd: the caller's first request
     * may come with its Finished and be read by the handshake.
     */
    SSL_CTX_set_read_ahead(sc, 1);
    SSL_CTX_set_verify_depth(sc, 8);
    return 0;
}

struct tls_key {
    EVP_PKEY *pkey;
};

/* Parses an unencrypted PEM private key; NULL with OpenSSL's reason on its error queue. */
static EVP_PKEY *read_key(const char *key_pem)
{
    BIO *bio;
    EVP_PKEY *key = NULL;
    if (key_pem != NULL && (bio = BIO_new_mem_buf(key_pem, -1)) != NULL) {
        key = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
        BIO_free(bio);
    }
    return key;
}

int tls_key_new(const char *key_pem, struct tls_key **out, char *err, size_t errlen)
{
    *out = NULL;
    ERR_clear_error();
    EVP_PKEY *key = read_key(key_pem);
    if (key == NULL)
        return ctx_fail(err, errlen, ERR_BAD_CERT, "private key: no valid unencrypted PEM key");
    *out = xcalloc(1, sizeof(**out));
    (*out)->pkey = key;
    return 0;
}

void tls_key_free(struct tls_key *k)
{
    if (k == NULL)
        return;
    EVP_PKEY_free(k->pkey);
    free(k);
}

/* tls_ctx_new() and tls_ctx_new_with_key(): exactly one of <key_pem> and <pkey> is set. */
static int ctx_new(const char *cert_pem, const char *key_pem, EVP_PKEY *pkey,
                   const char *const *root_pems, size_t n_roots, const struct tls_ctx_opts *opts,
                   struct tls_ctx **out, char *err, size_t errlen)
{
    char what[128];
    int rc = ERR_BAD_CERT;
    STACK_OF(X509) *certs = NULL;
    STACK_OF(X509) *roots = NULL;
    X509 *leaf = NULL;
    EVP_PKEY *key = NULL;
    X509_STORE *store = NULL;
    SSL_CTX *server = NULL;
    SSL_CTX *client = NULL;
    struct tls_ctx *ctx;
    int min_v, max_v;
    char cipher_list[CIPHER_LIST_MAX] = TLS12_CIPHERS;

    *out = NULL;
    ERR_clear_error();
    if (version_range(opts, &min_v, &max_v) < 0) {
        rc = ctx_fail(err, errlen, -EINVAL, "invalid TLS version range (use 12 or 13)");
        goto out;
    }
    if (opts != NULL && opts->cipher_suites != NULL &&
        cipher_list_from_iana(opts->cipher_suites, cipher_list, sizeof(cipher_list), err, errlen) !=
            0) {
        rc = -EINVAL;
        goto out;
    }

    certs = sk_X509_new_null();
    roots = sk_X509_new_null();
    store = X509_STORE_new();
    if (certs == NULL || roots == NULL || store == NULL) {
        rc = ctx_fail(err, errlen, ERR_BAD_CERT, "out of memory");
        goto out;
    }
    if (cert_pem == NULL || read_certs(cert_pem, certs) < 0) {
        rc = ctx_fail(err, errlen, ERR_BAD_CERT, "certificate: no valid PEM certificate");
        goto out;
    }
    leaf = sk_X509_shift(certs); /* the rest of <certs> is the chain we send */

    if (pkey != NULL && EVP_PKEY_up_ref(pkey))
        key = pkey;
    else if (pkey == NULL)
        key = read_key(key_pem);
    if (key == NULL) {
        rc = ctx_fail(err, errlen, ERR_BAD_CERT, "private key: no valid unencrypted PEM key");
        goto out;
    }
    if (!X509_check_private_key(leaf, key)) {
        rc = ctx_fail(err, errlen, ERR_BAD_CERT, "private key does not match the leaf certificate");
        goto out;
    }

    if (n_roots == 0) {
        rc = ctx_fail(err, errlen, ERR_BAD_CERT, "no trusted roots");
        goto out;
    }
    for (size_t i = 0; i < n_roots; i++) {
        int before = sk_X509_num(roots);
        if (root_pems[i] == NULL || read_certs(root_pems[i], roots) < 0) {
            snprintf(what, sizeof(what), "root %zu: no valid PEM certificate", i);
            rc = ctx_fail(err, errlen, ERR_BAD_CERT, what);
            goto out;
        }
        for (int j = before; j < sk_X509_num(roots); j++) {
            if (store_add(store, sk_X509_value(roots, j)) < 0) {
                snprintf(what, sizeof(what), "root %zu: cannot add to the trust store", i);
                rc = ctx_fail(err, errlen, ERR_BAD_CERT, what);
                goto out;
            }
        }
    }

    server = SSL_CTX_new(TLS_server_method());
    client = SSL_CTX_new(TLS_client_method());
    if (server == NULL || client == NULL ||
        setup_common(server, leaf, certs, key, store, min_v, max_v, cipher_list) < 0 ||
        setup_common(client, leaf, certs, key, store, min_v, max_v, cipher_list) < 0) {
        rc = ctx_fail(err, errlen, ERR_BAD_CERT, "cannot configure TLS context");
        goto out;
    }

    /* Inbound: a certificate chaining to one of the roots is mandatory (purpose sslclient). */
    SSL_CTX_set_verify(server, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    /*
     * Resumption through a stateful server cache: with SSL_OP_NO_TICKET a TLS 1.3 ticket is
     * only a cache key, cheaper to resume than a self-contained ticket (no certificate to
     * re-decode). The cache belongs to this SSL_CTX, so sessions never outlive the roots that
     * verified them. The session id context is required once client certificates are verified.
     */
    SSL_CTX_set_options(server, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_TICKET);
    SSL_CTX_set_alpn_select_cb(server, on_alpn_select, NULL);
    SSL_CTX_set_session_cache_mode(server, SSL_SESS_CACHE_SERVER);
    SSL_CTX_sess_set_cache_size(server, TLS_SESSION_CACHE_SIZE);
    SSL_CTX_set_timeout(server, TLS_SESSION_TIMEOUT_S);
    SSL_CTX_set_num_tickets(server, 1);
    SSL_CTX_set_info_callback(server, on_server_state);
    /* No session outlives the certificate of the peer it vouches for (cap_session_timeout). */
    SSL_CTX_sess_set_new_cb(server, on_server_session);
    if (!SSL_CTX_set_session_ticket_cb(server, on_server_ticket, NULL, NULL)) {
        rc = ctx_fail(err, errlen, ERR_BAD_CERT, "cannot set the session ticket callback");
        goto out;
    }
    if (!SSL_CTX_set_session_id_context(server, session_id_context,
                                        sizeof(session_id_context) - 1)) {
        rc = ctx_fail(err, errlen, ERR_BAD_CERT, "cannot set session id context");
        goto out;
    }
    /* Outbound: the server's chain is verified (purpose sslserver); identity is checked later.
     * Sessions are kept by this module (session_put), not in OpenSSL's client cache. */
    SSL_CTX_set_verify(client, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_session_cache_mode(client,
                                   SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(client, on_new_session);

    time_t leaf_not_after = asn1_time_to_epoch(X509_get0_notAfter(leaf));
    time_t leaf_not_before = asn1_time_to_epoch(X509_get0_notBefore(leaf));
    if (leaf_not_after == -1 || leaf_not_before == -1) {
        rc = ctx_fail(err, errlen, ERR_BAD_CERT, "certificate: unreadable validity period");
        goto out;
    }

    ctx = xcalloc(1, sizeof(*ctx));
    atomic_init(&ctx->refs, 1);
    ctx->server = server;
    ctx->client = client;
    ctx->leaf_not_after = (long long)leaf_not_after;
    ctx->leaf_not_before = (long long)leaf_not_before;
    pthread_mutex_init(&ctx->sess_lock, NULL);
    server = client = NULL;
    *out = ctx;
    rc = 0;

out:
    SSL_CTX_free(server);
    SSL_CTX_free(client);
    EVP_PKEY_free(key);
    X509_free(leaf);
    sk_X509_pop_free(certs, X509_free);
    sk_X509_pop_free(roots, X509_free);
    X509_STORE_free(store);
    return rc;
}

int tls_ctx_new(const char *cert_pem, const char *key_pem, const char *const *root_pems,
                size_t n_roots, const struct tls_ctx_opts *opts, struct tls_ctx **out, char *err,
                size_t errlen)
{
    return ctx_new(cert_pem, key_pem, NULL, root_pems, n_roots, opts, out, err, errlen);
}

int tls_ctx_new_with_key(const char *cert_pem, const struct tls_key *key,
                         const char *const *root_pems, size_t n_roots,
                         const struct tls_ctx_opts *opts, struct tls_ctx **out, char *err,
                         size_t errlen)
{
    if (key == NULL) {
        *out = NULL;
        return ctx_fail(err, errlen, ERR_BAD_CERT, "private key: none");
    }
    return ctx_new(cert_pem, NULL, key->pkey, root_pems, n_roots, opts, out, err, errlen);
}

struct tls_ctx *tls_ctx_ref(struct tls_ctx *ctx)
{
    atomic_fetch_add_explicit(&ctx->refs, 1, memory_order_relaxed);
    return ctx;
}

void tls_ctx_unref(struct tls_ctx *ctx)
{
    if (ctx == NULL)
        return;
    if (atomic_fetch_sub_explicit(&ctx->refs, 1, memory_order_acq_rel) != 1)
        return;
    SSL_CTX_free(ctx->server);
    SSL_CTX_free(ctx->client);
    for (size_t i = 0; ctx->sessions != NULL && i < TLS_CLIENT_SESSIONS; i++)
        if (ctx->sessions[i].hash != 0)
            slot_clear(&ctx->sessions[i]);
    free(ctx->sessions);
    pthread_mutex_destroy(&ctx->sess_lock);
    free(ctx);
}

long long tls_ctx_leaf_not_after(const struct tls_ctx *ctx)
{
    return ctx->leaf_not_after;
}

long long tls_ctx_leaf_not_before(const struct tls_ctx *ctx)
{
    return ctx->leaf_not_before;
}

size_t tls_ctx_server_sessions(const struct tls_ctx *ctx)
{
    return (size_t)SSL_CTX_sess_number(ctx->server);
}

size_t tls_ctx_client_sessions(struct tls_ctx *ctx, const char *resume_key)
{
    uint64_t h = util_hash_str(resume_key);
    size_t n = 0;
    pthread_mutex_lock(&ctx->sess_lock);
    for (size_t i = 0; ctx->sessions != NULL && i < TLS_CLIENT_SESSIONS; i++)
        n += ctx->sessions[i].hash == h && strcmp(ctx->sessions[i].key, resume_key) == 0;
    pthread_mutex_unlock(&ctx->sess_lock);
    return n;
}

size_t tls_ctx_flush_sessions(struct tls_ctx *ctx, long long now)
{
    size_t before = tls_ctx_server_sessions(ctx);
    SSL_CTX_flush_sessions(ctx->server, (long)now);
    size_t after = tls_ctx_server_sessions(ctx);
    return before > after ? before - after : 0;
}

/* ---- connections --------------------------------------------------------------------------- */

static struct tls_conn *conn_new(SSL_CTX *sc, int fd)
{
    ERR_clear_error();
    SSL *ssl = SSL_new(sc);
    if (ssl == NULL || !SSL_set_fd(ssl, fd)) {
        LOG_ERROR("tls: cannot create a connection (out of memory)");
        SSL_free(ssl);
        ERR_clear_error();
        return NULL;
    }
    struct tls_conn *c = xcalloc(1, sizeof(*c));
    c->ssl = ssl;
    SSL_set_app_data(ssl, c);
    return c;
}

struct tls_conn *tls_conn_new_server(struct tls_ctx *ctx, int fd)
{
    struct tls_conn *c = conn_new(ctx->server, fd);
    if (c != NULL)
        SSL_set_accept_state(c->ssl);
    return c;
}

struct tls_conn *tls_conn_new_client(struct tls_ctx *ctx, int fd, const char *sni,
                                     const char *resume_key)
{
    struct tls_conn *c = conn_new(ctx->client, fd);
    if (c == NULL)
        return NULL;
    SSL_set_connect_state(c->ssl);
    /* A name OpenSSL refuses (over 255 bytes) fails the handshake rather than go unsent:
     * a mesh gateway routes on it. */
    if (sni != NULL && *sni != '\0' && !SSL_set_tlsext_host_name(c->ssl, sni)) {
        ERR_clear_error();
        c->preset = "SNI name rejected (too long?)";
    }
    if (resume_key != NULL) {
        /* A ticket can arrive after the caller dropped its own reference. */
        c->ctx = tls_ctx_ref(ctx);
        c->resume_key = xstrdup(resume_key);
        uint64_t seq = 0;
        SSL_SESSION *sess = session_get(ctx, resume_key, &seq);
        if (sess != NULL) {
            /* No chain is verified again on resumption: the session carries the peer
             * certificate verified when it was made, under this same context's roots, and
             * the caller still checks the identity in it. */
            if (SSL_set_session(c->ssl, sess))
                c->offered = seq;
            else
                ERR_clear_error();
            SSL_SESSION_free(sess);
        }
    }
    return c;
}

int tls_conn_offer_alpn(struct tls_conn *c, const char *proto)
{
    size_t n = strlen(proto);
    unsigned char wire[256];
    if (n == 0 || n > 255)
        return -EINVAL;
    wire[0] = (unsigned char)n;
    memcpy(wire + 1, proto, n);
    /* SSL_set_alpn_protos returns 0 on success, unlike most of OpenSSL. */
    if (SSL_set_alpn_protos(c->ssl, wire, (unsigned)(n + 1)) != 0) {
        ERR_clear_error();
        return -ENOMEM;
    }
    return 0;
}

void tls_conn_free(struct tls_conn *c)
{
    if (c == NULL)
        return;
    SSL_free(c->ssl);
    free(c->err);
    free(c->resume_key);
    tls_ctx_unref(c->ctx);
    free(c);
}

static void before_io(struct tls_conn *c)
{
    /* SSL_get_error() reads the thread's error queue, so it must be empty before each call.
     * It nearly always is already: ERR_clear_error() wipes all 16 slots of the queue and
     * costs ~800 instructions, several times per request on a keep-alive connection, while
     * peeking is a few loads. */
    if (ERR_peek_error() != 0)
        ERR_clear_error();
    errno = 0;
    c->wants = 0;
    if (c->err != NULL)
        c->err[0] = '\0';
}

/*
 * Maps a failed SSL_* call. <is_read> lets a clean or unexpected end of stream become 0;
 * everywhere else it is a failure. Must run right after the call (it reads errno).
 */
static int io_result(struct tls_conn *c, const char *what, int is_read)
{
    int saved_errno = errno;
    int e = SSL_get_error(c->ssl, 0);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        c->wants = LOOP_READ;
        return -EAGAIN;
    case SSL_ERROR_WANT_WRITE:
        c->wants = LOOP_WRITE;
        return -EAGAIN;
    case SSL_ERROR_ZERO_RETURN:
        if (is_read)
            return 0;
        conn_fail(c, what, "connection closed by the peer");
        return ERR_TLS;
    case SSL_ERROR_SYSCALL:
        c->fatal = 1;
        if (ERR_peek_error() == 0 && saved_errno == 0) {
            /* OpenSSL 1.1 style unexpected EOF: nothing queued and no errno. */
            if (is_read)
                return 0;
            conn_fail(c, what, "connection closed by the peer");
            return ERR_TLS;
        }
        conn_fail(c, what, saved_errno != 0 ? strerror(saved_errno) : NULL);
        return ERR_TLS;
    case SSL_ERROR_SSL:
#ifdef SSL_R_UNEXPECTED_EOF_WHILE_READING
        /* OpenSSL 3 without SSL_OP_IGNORE_UNEXPECTED_EOF (kept for safety). */
        if (is_read && ERR_GET_LIB(ERR_peek_error()) == ERR_LIB_SSL &&
            ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            ERR_clear_error();
            c->fatal = 1;
            return 0;
        }
#endif
        c->fatal = 1;
        conn_fail(c, what, NULL);
        return ERR_TLS;
    default:
        c->fatal = 1;
        conn_fail(c, what, "unexpected OpenSSL state");
        return ERR_TLS;
    }
}

int tls_handshake(struct tls_conn *c)
{
    if (c->preset != NULL) {
        snprintf(err_buf(c), TLS_ERR_MAX, "handshake: %s", c->preset);
        c->failure = TLS_FAIL_OTHER;
        return ERR_TLS;
    }
    if (SSL_is_init_finished(c->ssl))
        return 0;
    before_io(c);
    if (SSL_do_handshake(c->ssl) == 1) {
        /* The cache forgets a session when its peer certificate expires (cap_session_timeout);
         * this covers a clock stepped back or forth meanwhile: a resumed session whose
         * certificate is not valid now is refused, and removed so it is not offered again. */
        if (SSL_is_server(c->ssl) && SSL_session_reused(c->ssl) == 1 &&
            !peer_valid_now(SSL_SESSION_get0_peer(SSL_get0_session(c->ssl)))) {
            SSL_CTX_remove_session(SSL_get_SSL_CTX(c->ssl), SSL_get0_session(c->ssl));
            c->fatal = 1;
            conn_fail(c, "handshake",
                      "resumed session: the peer certificate is expired or not yet valid");
            return ERR_TLS;
        }
        /* An offered session the server did not take (it restarted, or dropped it from a
         * full cache) would only cost every later dial the same wasted try. */
        if (c->offered != 0 && SSL_session_reused(c->ssl) != 1)
            session_drop(c->ctx, c->offered);
        c->offered = 0;
        return 0;
    }
    int rc = io_result(c, "handshake", 0);
    /* Nor may a session whose handshake failed fail the next dials the same way: they run a
     * full handshake (when the session had nothing to do with it, that costs one). */
    if (rc != -EAGAIN && c->offered != 0) {
        session_drop(c->ctx, c->offered);
        c->offered = 0;
    }
    return rc;
}

ssize_t tls_read(struct tls_conn *c, void *buf, size_t len)
{
    size_t n = 0;
    before_io(c);
    if (SSL_read_ex(c->ssl, buf, len, &n) == 1)
        return (ssize_t)n;
    int rc = io_result(c, "read", 1);
    /*
     * SSL_MODE_RELEASE_BUFFERS frees the read buffer only once a record is consumed; a read
     * that then finds the socket empty allocates it again (~17 KiB) and keeps it, so every
     * idle outbound connection held one (issue 11: 23 KiB of private memory each, 16 after).
     * Nothing is in it when the read waits for the socket: SSL_free_buffers() refuses when a
     * partial record (read ahead) or an unsent write is there, and the next read takes a
     * buffer from the allocator again, one malloc against a record's decryption.
     */
    if (rc == -EAGAIN && c->wants == LOOP_READ)
        (void)SSL_free_buffers(c->ssl);
    return rc;
}

ssize_t tls_write(struct tls_conn *c, const void *buf, size_t len)
{
    size_t n = 0;
    if (len == 0)
        return 0;
    before_io(c);
    if (SSL_write_ex(c->ssl, buf, len, &n) == 1)
        return (ssize_t)n;
    return io_result(c, "write", 0);
}

int tls_shutdown(struct tls_conn *c)
{
    if (c->shutdown_sent)
        return 0;
    if (c->fatal) {
        snprintf(err_buf(c), TLS_ERR_MAX, "shutdown: connection already failed");
        return ERR_TLS;
    }
    before_io(c);
    /*
     * 0 means close_notify was written and the peer's has not arrived; 1 means both are done.
     * Calling again after 0 would wait for the peer's, which a half-close must not do.
     */
    int r = SSL_shutdown(c->ssl);
    if (r >= 0) {
        c->shutdown_sent = 1;
        return 0;
    }
    return io_result(c, "shutdown", 0);
}

unsigned tls_conn_wants(const struct tls_conn *c)
{
    return c->wants;
}

size_t tls_conn_pending(const struct tls_conn *c)
{
    int n = SSL_pending(c->ssl);
    return n > 0 ? (size_t)n : 0;
}

int tls_conn_has_pending(const struct tls_conn *c)
{
    return SSL_has_pending(c->ssl);
}

void tls_conn_rest(struct tls_conn *c)
{
    (void)SSL_free_buffers(c->ssl); /* refuses, harmlessly, when a buffer holds bytes */
}

const char *tls_conn_error(const struct tls_conn *c)
{
    return c->err != NULL ? c->err : "";
}

enum tls_failure tls_conn_failure(const struct tls_conn *c)
{
    return c->failure;
}

unsigned long long tls_conn_bytes_received(const struct tls_conn *c)
{
    return (unsigned long long)BIO_number_read(SSL_get_rbio(c->ssl));
}

/* The peer's leaf once the handshake completed with a verified chain, else NULL. */
static X509 *verified_peer(const struct tls_conn *c)
{
    /* With SSL_VERIFY_PEER a completed handshake implies a verified chain; check anyway. */
    if (!SSL_is_init_finished(c->ssl) || SSL_get_verify_result(c->ssl) != X509_V_OK)
        return NULL;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    return SSL_get0_peer_certificate(c->ssl);
#else
    X509 *peer = SSL_get_peer_certificate(c->ssl);
    X509_free(peer); /* the session keeps its own reference */
    return peer;
#endif
}

int tls_conn_peer_uri(const struct tls_conn *c, char *buf, size_t len)
{
    X509 *peer = verified_peer(c);
    if (peer == NULL)
        return ERR_NO_URI;
    GENERAL_NAMES *names = X509_get_ext_d2i(peer, NID_subject_alt_name, NULL, NULL);
    int rc = ERR_NO_URI;
    for (int i = 0; names != NULL && i < sk_GENERAL_NAME_num(names); i++) {
        const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);
        if (gn->type != GEN_URI)
            continue;
        const unsigned char *p = ASN1_STRING_get0_data(gn->d.uniformResourceIdentifier);
        int n = ASN1_STRING_length(gn->d.uniformResourceIdentifier);
        if (n <= 0 || memchr(p, '\0', (size_t)n) != NULL) {
            rc = ERR_NO_URI; /* the first URI decides, as in Consul; a broken one is none */
        } else if ((size_t)n >= len) {
            rc = -ENOSPC;
        } else {
            memcpy(buf, p, (size_t)n);
            buf[n] = '\0';
            rc = n;
        }
        break;
    }
    GENERAL_NAMES_free(names);
    ERR_clear_error(); /* a missing extension may leave decoder noise behind */
    return rc;
}

int tls_conn_peer_uri_count(const struct tls_conn *c)
{
    X509 *peer = verified_peer(c);
    if (peer == NULL)
        return 0;
    GENERAL_NAMES *names = X509_get_ext_d2i(peer, NID_subject_alt_name, NULL, NULL);
    int n = 0;
    for (int i = 0; names != NULL && i < sk_GENERAL_NAME_num(names); i++)
        n += sk_GENERAL_NAME_value(names, i)->type == GEN_URI;
    GENERAL_NAMES_free(names);
    ERR_clear_error();
    return n;
}

int tls_conn_peer_serial(const struct tls_conn *c, char *buf, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const X509 *peer = verified_peer(c);
    if (peer == NULL || len == 0)
        return ERR_NO_URI;
    const ASN1_INTEGER *serial = X509_get0_serialNumber(peer);
    const unsigned char *p = ASN1_STRING_get0_data(serial);
    int n = ASN1_STRING_length(serial);
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        if (at + 4 > len)
            return -ENOSPC;
        if (i > 0)
            buf[at++] = ':';
        buf[at++] = hex[p[i] >> 4];
        buf[at++] = hex[p[i] & 15];
    }
    buf[at] = '\0';
    return (int)at;
}

int tls_conn_peer_cert_sha256_hex(const struct tls_conn *c, char *buf, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    const X509 *peer = verified_peer(c);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (peer == NULL)
        return ERR_NO_URI;
    if (len < 65)
        return -ENOSPC;
    /* X509_digest hashes the DER encoding: what Envoy's XFCC Hash is made of. */
    if (X509_digest(peer, EVP_sha256(), md, &n) != 1 || n != 32)
        return ERR_TLS;
    for (unsigned int i = 0; i < n; i++) {
        buf[2 * i] = hex[md[i] >> 4];
        buf[2 * i + 1] = hex[md[i] & 15];
    }
    buf[64] = '\0';
    return 64;
}

void tls_conn_set_alpn_l7(struct tls_conn *c, int on)
{
    c->alpn_l7 = on != 0;
}

int tls_conn_alpn(const struct tls_conn *c, char *buf, size_t len)
{
    const unsigned char *p = NULL;
    unsigned n = 0;
    SSL_get0_alpn_selected(c->ssl, &p, &n);
    if (p == NULL || n == 0)
        return 0;
    if (n >= len)
        return -ENOSPC;
    memcpy(buf, p, n);
    buf[n] = '\0';
    return (int)n;
}

int tls_conn_resumed(const struct tls_conn *c)
{
    return SSL_session_reused(c->ssl) == 1;
}

const char *tls_conn_version(const struct tls_conn *c)
{
    return SSL_get_version(c->ssl);
}

const char *tls_conn_cipher(const struct tls_conn *c)
{
    const SSL_CIPHER *cipher = SSL_get_current_cipher(c->ssl);
    return cipher != NULL ? SSL_CIPHER_get_name(cipher) : "(none)";
}

void tls_global_init(void)
{
    OPENSSL_init_ssl(OPENSSL_INIT_LOAD_SSL_STRINGS | OPENSSL_INIT_LOAD_CRYPTO_STRINGS, NULL);
}

void tls_agent_ctx_setup(void *ssl_ctx)
{
#ifdef SSL_OP_CLEANSE_PLAINTEXT
    SSL_CTX_set_options(ssl_ctx, SSL_OP_CLEANSE_PLAINTEXT);
#else
    (void)ssl_ctx;
#endif
}

const char *tls_lib_version(void)
{
    return OpenSSL_version(OPENSSL_VERSION);
}
