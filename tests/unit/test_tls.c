/*
 * test_tls: mutual TLS between two tls_conns over a non-blocking socketpair.
 *
 * The certificates are made at run time with OpenSSL (P-256, like Consul's built-in CA): two
 * unrelated roots, an intermediate under the first, and leaves carrying SPIFFE URI SANs. A
 * small poll() loop drives both ends in one thread, so every -EAGAIN path is really taken.
 * Where the API cannot express a case (a client without a certificate, session resumption,
 * what the server saw as SNI), the other end is raw OpenSSL.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "loop.h"
#include "tls.h"
#include "util.h"

#define TD           "11111111-2222-3333-4444-555555555555.consul"
#define URI_WEB      "spiffe://" TD "/ns/default/dc/dc1/svc/web"
#define URI_DB       "spiffe://" TD "/ns/default/dc/dc1/svc/db"
#define URI_API      "spiffe://" TD "/ns/default/dc/dc1/svc/api"
#define SNI_DB       "db.default.dc1.internal." TD
#define POLL_TIMEOUT 5000

/* ---- certificates -------------------------------------------------------------------------- */

struct cert {
    X509 *x;
    EVP_PKEY *key;
    char *cert_pem;
    char *key_pem;
};

static struct pki {
    struct cert ca1, ca2, inter;
    struct cert web, db, rogue, api, nouri;
    char *api_chain_pem; /* api leaf + intermediate */
    time_t web_not_after;
} pki;

static char *bio_take(BIO *b)
{
    char *p;
    long n = BIO_get_mem_data(b, &p);
    char *s = xstrndup(p, (size_t)n);
    BIO_free(b);
    return s;
}

static void add_ext(X509 *x, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, issuer, x, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    assert_non_null(ext);
    assert_true(X509_add_ext(x, ext, -1));
    X509_EXTENSION_free(ext);
}

/* Issues <out> from <issuer> (NULL: self-signed). <uri> NULL means no SAN at all. */
static void make_cert(struct cert *out, const struct cert *issuer, int is_ca, const char *cn,
                      const char *uri, time_t not_after)
{
    static long serial = 1;
    EVP_PKEY *key = EVP_EC_gen("P-256");
    assert_non_null(key);
    X509 *x = X509_new();
    assert_non_null(x);
    assert_true(X509_set_version(x, 2));
    assert_true(ASN1_INTEGER_set(X509_get_serialNumber(x), serial++));
    assert_non_null(X509_gmtime_adj(X509_getm_notBefore(x), -3600));
    assert_non_null(ASN1_TIME_set(X509_getm_notAfter(x), not_after));
    X509_NAME *name = X509_get_subject_name(x);
    assert_true(
        X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0));
    assert_true(X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer->x) : name));
    assert_true(X509_set_pubkey(x, key));
    X509 *signer = issuer ? issuer->x : x;
    add_ext(x, signer, NID_subject_key_identifier, "hash");
    if (issuer != NULL)
        add_ext(x, signer, NID_authority_key_identifier, "keyid:always");
    if (is_ca) {
        add_ext(x, signer, NID_basic_constraints, "critical,CA:TRUE");
        add_ext(x, signer, NID_key_usage, "critical,keyCertSign,cRLSign,digitalSignature");
    } else {
        add_ext(x, signer, NID_basic_constraints, "critical,CA:FALSE");
        add_ext(x, signer, NID_key_usage, "critical,digitalSignature,keyEncipherment");
        add_ext(x, signer, NID_ext_key_usage, "serverAuth,clientAuth");
    }
    if (uri != NULL) {
        char san[256];
        snprintf(san, sizeof(san), "URI:%s", uri);
        add_ext(x, signer, NID_subject_alt_name, san);
    }
    assert_true(X509_sign(x, issuer ? issuer->key : key, EVP_sha256()) > 0);

    BIO *b = BIO_new(BIO_s_mem());
    assert_true(PEM_write_bio_X509(b, x));
    out->cert_pem = bio_take(b);
    b = BIO_new(BIO_s_mem());
    /* "EC PRIVATE KEY", the form Consul's agent hands out. */
    assert_true(PEM_write_bio_PrivateKey_traditional(b, key, NULL, NULL, 0, NULL, NULL));
    out->key_pem = bio_take(b);
    out->x = x;
    out->key = key;
}

static void free_cert(struct cert *c)
{
    X509_free(c->x);
    EVP_PKEY_free(c->key);
    free(c->cert_pem);
    free(c->key_pem);
}

static int pki_setup(void **state)
{
    (void)state;
    time_t now = time(NULL);
    time_t ca_end = now + 10 * 365 * 86400L;
    pki.web_not_after = now + 72 * 3600;
    make_cert(&pki.ca1, NULL, 1, "Consul CA 1", "spiffe://" TD, ca_end);
    make_cert(&pki.ca2, NULL, 1, "Unrelated CA",
              "spiffe://99999999-0000-0000-0000-000000000000.consul", ca_end);
    make_cert(&pki.inter, &pki.ca1, 1, "Consul intermediate", "spiffe://" TD, ca_end);
    make_cert(&pki.web, &pki.ca1, 0, "web", URI_WEB, pki.web_not_after);
    make_cert(&pki.db, &pki.ca1, 0, "db", URI_DB, now + 72 * 3600);
    make_cert(&pki.rogue, &pki.ca2, 0, "web", URI_WEB, now + 72 * 3600);
    make_cert(&pki.api, &pki.inter, 0, "api", URI_API, now + 72 * 3600);
    make_cert(&pki.nouri, &pki.ca1, 0, "nouri", NULL, now + 72 * 3600);
    pki.api_chain_pem = xasprintf("%s%s", pki.api.cert_pem, pki.inter.cert_pem);
    return 0;
}

static int pki_teardown(void **state)
{
    (void)state;
    struct cert *all[] = {&pki.ca1, &pki.ca2,   &pki.inter, &pki.web,
                          &pki.db,  &pki.rogue, &pki.api,   &pki.nouri};
    for (size_t i = 0; i < ARRAY_SIZE(all); i++)
        free_cert(all[i]);
    free(pki.api_chain_pem);
    return 0;
}

/* A context from <cert_pem> (defaults to the leaf's) trusting <root> (or roots[]). */
static struct tls_ctx *ctx_roots(const struct cert *leaf, const char *cert_pem,
                                 const char *const *roots, size_t n_roots, int min_v, int max_v)
{
    struct tls_ctx_opts opts = {.min_version = min_v, .max_version = max_v};
    struct tls_ctx *ctx = NULL;
    char err[512] = "";
    int rc = tls_ctx_new(cert_pem ? cert_pem : leaf->cert_pem, leaf->key_pem, roots, n_roots, &opts,
                         &ctx, err, sizeof(err));
    if (rc != 0)
        fail_msg("tls_ctx_new: %d %s", rc, err);
    return ctx;
}

static struct tls_ctx *ctx_for(const struct cert *leaf, const struct cert *root)
{
    const char *roots[] = {root->cert_pem};
    return ctx_roots(leaf, NULL, roots, 1, 0, 0);
}

/* ---- raw OpenSSL ends ---------------------------------------------------------------------- */

static SSL_CTX *raw_ctx(int server, const struct cert *leaf, const struct cert *root)
{
    SSL_CTX *sc = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    assert_non_null(sc);
    if (leaf != NULL) {
        assert_true(SSL_CTX_use_certificate(sc, leaf->x));
        assert_true(SSL_CTX_use_PrivateKey(sc, leaf->key));
    }
    assert_true(X509_STORE_add_cert(SSL_CTX_get_cert_store(sc), root->x));
    SSL_CTX_set_verify(sc, SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), NULL);
    return sc;
}

/* ---- driving both ends --------------------------------------------------------------------- */

/* One end of a socketpair: a tls_conn, or a raw SSL for cases the API cannot express. */
struct end {
    int fd;
    struct tls_conn *tc;
    SSL *raw;
    unsigned wants;
    int rc; /* handshake: -EAGAIN while running, 0 done, other negative failed */
};

static void pair(int fds[2])
{
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fds), 0);
}

static short poll_events(unsigned wants)
{
    return (short)((wants & LOOP_READ ? POLLIN : 0) | (wants & LOOP_WRITE ? POLLOUT : 0));
}

static void wait_fd(int fd, unsigned wants)
{
    assert_true(wants != 0);
    struct pollfd p = {.fd = fd, .events = poll_events(wants)};
    assert_int_equal(poll(&p, 1, POLL_TIMEOUT), 1);
}

static int end_handshake(struct end *e)
{
    if (e->tc != NULL) {
        int rc = tls_handshake(e->tc);
        e->wants = rc == -EAGAIN ? tls_conn_wants(e->tc) : 0;
        return rc;
    }
    ERR_clear_error();
    int r = SSL_do_handshake(e->raw);
    if (r == 1)
        return 0;
    switch (SSL_get_error(e->raw, r)) {
    case SSL_ERROR_WANT_READ:
        e->wants = LOOP_READ;
        return -EAGAIN;
    case SSL_ERROR_WANT_WRITE:
        e->wants = LOOP_WRITE;
        return -EAGAIN;
    default:
        ERR_clear_error();
        return ERR_TLS;
    }
}

/*
 * Runs both handshakes until each has finished or failed. A failing end shuts its socket down
 * so its peer sees the alert, then end of stream, instead of waiting for ever.
 */
static void handshake_both(struct end *a, struct end *b)
{
    struct end *ends[2] = {a, b};
    a->rc = b->rc = -EAGAIN;
    for (int round = 0; round < 10000; round++) {
        struct pollfd p[2];
        nfds_t n = 0;
        for (int i = 0; i < 2; i++) {
            struct end *e = ends[i];
            if (e->rc != -EAGAIN)
                continue;
            e->rc = end_handshake(e);
            if (e->rc == -EAGAIN)
                p[n++] = (struct pollfd){.fd = e->fd, .events = poll_events(e->wants)};
            else if (e->rc != 0)
                shutdown(e->fd, SHUT_RDWR);
        }
        if (n == 0)
            return;
        assert_true(poll(p, n, POLL_TIMEOUT) > 0);
    }
    fail_msg("handshake did not converge");
}

static void write_all(struct tls_conn *c, int fd, const void *buf, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = tls_write(c, (const char *)buf + off, len - off);
        if (n == -EAGAIN) {
            wait_fd(fd, tls_conn_wants(c));
            continue;
        }
        if (n <= 0)
            fail_msg("tls_write: %zd %s", n, tls_conn_error(c));
        off += (size_t)n;
    }
}

/* Reads until end of stream (which must come); returns the byte count. */
static size_t read_to_eof(struct tls_conn *c, int fd, char *buf, size_t cap)
{
    size_t off = 0;
    for (;;) {
        assert_true(off < cap);
        ssize_t n = tls_read(c, buf + off, cap - off);
        if (n == 0)
            return off;
        if (n == -EAGAIN) {
            wait_fd(fd, tls_conn_wants(c));
            continue;
        }
        if (n < 0)
            fail_msg("tls_read: %zd %s", n, tls_conn_error(c));
        off += (size_t)n;
    }
}

static void read_exact(struct tls_conn *c, int fd, char *buf, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = tls_read(c, buf + off, len - off);
        if (n == -EAGAIN) {
            wait_fd(fd, tls_conn_wants(c));
            continue;
        }
        if (n <= 0)
            fail_msg("tls_read: %zd %s", n, tls_conn_error(c));
        off += (size_t)n;
    }
}

/* Reads until a failure, which must come; returns it. */
static int read_until_error(struct tls_conn *c, int fd)
{
    char buf[256];
    for (;;) {
        ssize_t n = tls_read(c, buf, sizeof(buf));
        if (n == -EAGAIN) {
            wait_fd(fd, tls_conn_wants(c));
            continue;
        }
        if (n <= 0)
            return (int)n;
    }
}

/* A client/server pair of tls_conns over a fresh socketpair (client on fds[0]). */
struct duo {
    int fds[2];
    struct end cli, srv;
    const char *resume_key; /* the client's, for duo_open_resuming */
};

/* Both ends made (the client's kept session chosen), no handshake run yet. */
static void duo_start(struct duo *d, struct tls_ctx *cli_ctx, struct tls_ctx *srv_ctx,
                      const char *sni, const char *resume_key)
{
    memset(d, 0, sizeof(*d));
    d->resume_key = resume_key;
    pair(d->fds);
    d->cli.fd = d->fds[0];
    d->srv.fd = d->fds[1];
    d->cli.tc = tls_conn_new_client(cli_ctx, d->cli.fd, sni, d->resume_key);
    d->srv.tc = tls_conn_new_server(srv_ctx, d->srv.fd);
    assert_non_null(d->cli.tc);
    assert_non_null(d->srv.tc);
}

static void duo_open_resuming(struct duo *d, struct tls_ctx *cli_ctx, struct tls_ctx *srv_ctx,
                              const char *sni, const char *resume_key)
{
    duo_start(d, cli_ctx, srv_ctx, sni, resume_key);
    handshake_both(&d->cli, &d->srv);
}

static void duo_open(struct duo *d, struct tls_ctx *cli_ctx, struct tls_ctx *srv_ctx,
                     const char *sni)
{
    duo_open_resuming(d, cli_ctx, srv_ctx, sni, NULL);
}

static void duo_close(struct duo *d)
{
    tls_conn_free(d->cli.tc);
    tls_conn_free(d->srv.tc);
    SSL_free(d->cli.raw);
    SSL_free(d->srv.raw);
    close(d->fds[0]);
    close(d->fds[1]);
}

static void assert_peer_uri(struct tls_conn *c, const char *want)
{
    char uri[256];
    int n = tls_conn_peer_uri(c, uri, sizeof(uri));
    assert_int_equal(n, (int)strlen(want));
    assert_string_equal(uri, want);
}

/* ---- tests: handshakes and identity -------------------------------------------------------- */

/* The normal mesh hop: mutual verification, TLS 1.3, both identities readable. */
static void test_mutual_handshake(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct duo d;
    duo_open(&d, web, db, SNI_DB);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(d.srv.rc, 0);
    assert_int_equal(tls_handshake(d.cli.tc), 0); /* idempotent once done */
    assert_peer_uri(d.cli.tc, URI_DB);
    assert_peer_uri(d.srv.tc, URI_WEB);
    assert_string_equal(tls_conn_version(d.cli.tc), "TLSv1.3");
    assert_string_equal(tls_conn_version(d.srv.tc), "TLSv1.3");
    assert_string_equal(tls_conn_cipher(d.cli.tc), "TLS_AES_128_GCM_SHA256");
    assert_string_equal(tls_conn_error(d.cli.tc), "");
    assert_true(tls_ctx_leaf_not_after(web) == (long long)pki.web_not_after);

    char small[16];
    assert_int_equal(tls_conn_peer_uri(d.cli.tc, small, sizeof(small)), -ENOSPC);
    char exact[sizeof(URI_DB)];
    assert_int_equal(tls_conn_peer_uri(d.cli.tc, exact, sizeof(URI_DB) - 1), -ENOSPC);
    assert_int_equal(tls_conn_peer_uri(d.cli.tc, exact, sizeof(exact)), (int)strlen(URI_DB));
    duo_close(&d);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
}

/*
 * Issue 9: the XFCC Hash an L7 inbound sidecar sends is the SHA-256 of the caller's leaf in
 * DER, as lower-case hex: computed here independently from the certificate object.
 */
static void test_peer_cert_sha256(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct duo d;
    unsigned char md[32];
    unsigned int mdlen = 0;
    char want[65], got[80];
    assert_int_equal(X509_digest(pki.web.x, EVP_sha256(), md, &mdlen), 1);
    for (unsigned i = 0; i < 32; i++)
        snprintf(want + 2 * i, 3, "%02x", md[i]);
    int fds[2];
    pair(fds);
    struct tls_conn *fresh = tls_conn_new_server(db, fds[1]);
    assert_int_equal(tls_conn_peer_cert_sha256_hex(fresh, got, sizeof(got)), ERR_NO_URI);
    tls_conn_free(fresh);
    close(fds[0]);
    close(fds[1]);
    duo_open(&d, web, db, SNI_DB);
    assert_int_equal(tls_conn_peer_cert_sha256_hex(d.srv.tc, got, sizeof(got)), 64);
    assert_string_equal(got, want);
    assert_int_equal(tls_conn_peer_cert_sha256_hex(d.srv.tc, got, 64), -ENOSPC);
    duo_close(&d);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
}

static void assert_no_key_material(const char *err, const char *key_pem);

/*
 * The control thread parses the leaf's key once and wipes the PEM (issue 7: the PEM copy it
 * kept for rebuilds was one of four copies of the key in memory). Contexts built from the
 * parsed key, even after the PEM is gone and the key object is freed, still handshake.
 */
static void test_parsed_key(void **state)
{
    (void)state;
    char err[512] = "";
    const char *roots[] = {pki.ca1.cert_pem};
    char *pem = xstrdup(pki.web.key_pem);
    struct tls_key *key = NULL;
    assert_int_equal(tls_key_new(pem, &key, err, sizeof(err)), 0);
    assert_non_null(key);
    util_wipe(pem, strlen(pem));
    struct tls_ctx *web = NULL, *again = NULL;
    assert_int_equal(
        tls_ctx_new_with_key(pki.web.cert_pem, key, roots, 1, NULL, &web, err, sizeof(err)), 0);
    /* A rebuild (new roots, say) from the same key object. */
    const char *two_roots[] = {pki.ca1.cert_pem, pki.ca2.cert_pem};
    assert_int_equal(
        tls_ctx_new_with_key(pki.web.cert_pem, key, two_roots, 2, NULL, &again, err, sizeof(err)),
        0);
    tls_key_free(key); /* the contexts hold their own references */
    free(pem);

    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct duo d;
    duo_open(&d, again, db, SNI_DB);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(d.srv.rc, 0);
    assert_peer_uri(d.srv.tc, URI_WEB);
    duo_close(&d);

    /* Bad keys are refused without key material in the message; no key is no context. */
    assert_int_equal(tls_key_new("garbage", &key, err, sizeof(err)), ERR_BAD_CERT);
    assert_null(key);
    assert_non_null(strstr(err, "private key"));
    char *broken = xstrndup(pki.web.key_pem, strlen(pki.web.key_pem) - 40);
    assert_int_equal(tls_key_new(broken, &key, err, sizeof(err)), ERR_BAD_CERT);
    assert_no_key_material(err, pki.web.key_pem);
    free(broken);
    assert_int_equal(tls_key_new(NULL, &key, err, sizeof(err)), ERR_BAD_CERT);
    struct tls_ctx *ctx = NULL;
    assert_int_equal(
        tls_ctx_new_with_key(pki.web.cert_pem, NULL, roots, 1, NULL, &ctx, err, sizeof(err)),
        ERR_BAD_CERT);
    assert_null(ctx);
    /* Another leaf's key, well formed but not this certificate's. */
    assert_int_equal(tls_key_new(pki.db.key_pem, &key, err, sizeof(err)), 0);
    assert_int_equal(
        tls_ctx_new_with_key(pki.web.cert_pem, key, roots, 1, NULL, &ctx, err, sizeof(err)),
        ERR_BAD_CERT);
    assert_non_null(strstr(err, "does not match"));
    tls_key_free(key);
    tls_key_free(NULL);
    assert_int_equal(ERR_peek_error(), 0);

    tls_ctx_unref(web);
    tls_ctx_unref(again);
    tls_ctx_unref(db);
}

static void test_tls12(void **state)
{
    (void)state;
    const char *roots[] = {pki.ca1.cert_pem};
    struct tls_ctx *cli = ctx_roots(&pki.web, NULL, roots, 1, 12, 12);
    struct tls_ctx *srv = ctx_for(&pki.db, &pki.ca1);
    struct duo d;
    duo_open(&d, cli, srv, NULL);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(d.srv.rc, 0);
    assert_string_equal(tls_conn_version(d.srv.tc), "TLSv1.2");
    assert_string_equal(tls_conn_cipher(d.srv.tc), "ECDHE-ECDSA-AES128-GCM-SHA256");
    assert_peer_uri(d.srv.tc, URI_WEB);
    assert_peer_uri(d.cli.tc, URI_DB);
    duo_close(&d);

    /* A 1.3-only server refuses a 1.2-only client. */
    struct tls_ctx *srv13 = ctx_roots(&pki.db, NULL, roots, 1, 13, 0);
    duo_open(&d, cli, srv13, NULL);
    assert_int_equal(d.srv.rc, ERR_TLS);
    assert_int_equal(d.cli.rc, ERR_TLS);
    assert_non_null(strstr(tls_conn_error(d.srv.tc), "handshake"));
    duo_close(&d);
    tls_ctx_unref(cli);
    tls_ctx_unref(srv);
    tls_ctx_unref(srv13);
}

/* The API always presents a certificate, so the certificate-less client is raw OpenSSL. */
static void test_client_without_cert_refused(void **state)
{
    (void)state;
    struct tls_ctx *srv = ctx_for(&pki.db, &pki.ca1);
    SSL_CTX *raw = raw_ctx(0, NULL, &pki.ca1);
    struct duo d;
    memset(&d, 0, sizeof(d));
    pair(d.fds);
    d.cli.fd = d.fds[0];
    d.srv.fd = d.fds[1];
    d.cli.raw = SSL_new(raw);
    assert_true(SSL_set_fd(d.cli.raw, d.cli.fd));
    SSL_set_connect_state(d.cli.raw);
    d.srv.tc = tls_conn_new_server(srv, d.srv.fd);
    handshake_both(&d.cli, &d.srv);
    assert_int_equal(d.srv.rc, ERR_TLS);
    const char *err = tls_conn_error(d.srv.tc);
    assert_non_null(strstr(err, "handshake"));
    assert_non_null(strstr(err, "peer did not return a certificate"));
    assert_int_equal(tls_conn_peer_uri(d.srv.tc, (char[64]){0}, 64), ERR_NO_URI);
    /* Nothing more is possible on the failed connection, not even close_notify. */
    assert_int_equal(tls_shutdown(d.srv.tc), ERR_TLS);
    duo_close(&d);
    SSL_CTX_free(raw);
    tls_ctx_unref(srv);
}

/*
 * Server ALPN (issue 9): an L7 service's handshake selects "h2" before "http/1.1" among what
 * the client offers; a tcp service (the default) or a client offering neither negotiates
 * nothing, and the handshake succeeds either way (ALPN stays optional on the mesh hop).
 */
static void test_alpn_select(void **state)
{
    (void)state;
    static const struct {
        const char *offer; /* wire format; NULL: no ALPN extension */
        unsigned offer_len;
        int l7;
        const char *want; /* "" for none */
    } cases[] = {
        {"\x08http/1.1\x02h2", 12, 1, "h2"},
        {"\x08http/1.1", 9, 1, "http/1.1"},
        {"\x02h2", 3, 0, ""},
        {"\x06spdy/3", 7, 1, ""},
        {NULL, 0, 1, ""},
    };
    struct tls_ctx *srv = ctx_for(&pki.db, &pki.ca1);
    SSL_CTX *raw = raw_ctx(0, &pki.web, &pki.ca1);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct duo d;
        char got[32] = "x";
        memset(&d, 0, sizeof(d));
        pair(d.fds);
        d.cli.fd = d.fds[0];
        d.srv.fd = d.fds[1];
        d.cli.raw = SSL_new(raw);
        assert_true(SSL_set_fd(d.cli.raw, d.cli.fd));
        SSL_set_connect_state(d.cli.raw);
        if (cases[i].offer != NULL)
            assert_int_equal(SSL_set_alpn_protos(d.cli.raw, (const unsigned char *)cases[i].offer,
                                                 cases[i].offer_len),
                             0);
        d.srv.tc = tls_conn_new_server(srv, d.srv.fd);
        tls_conn_set_alpn_l7(d.srv.tc, cases[i].l7);
        handshake_both(&d.cli, &d.srv);
        assert_int_equal(d.srv.rc, 0);
        assert_int_equal(d.cli.rc, 0);
        int n = tls_conn_alpn(d.srv.tc, got, sizeof(got));
        assert_int_equal(n, (int)strlen(cases[i].want));
        if (n > 0)
            assert_string_equal(got, cases[i].want);
        assert_int_equal(tls_conn_alpn(d.srv.tc, got, 2), n > 1 ? -ENOSPC : n);
        duo_close(&d);
    }
    SSL_CTX_free(raw);
    tls_ctx_unref(srv);
}

static void test_leaf_from_other_ca_refused(void **state)
{
    (void)state;
    struct tls_ctx *rogue = ctx_for(&pki.rogue, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct duo d;

    /* Inbound: the server refuses the client's chain... */
    duo_open(&d, rogue, db, NULL);
    assert_int_equal(d.srv.rc, ERR_TLS);
    const char *err = tls_conn_error(d.srv.tc);
    assert_non_null(strstr(err, "certificate verify failed"));
    assert_non_null(strstr(err, "verify: unable to get local issuer certificate"));
    /* ...and the TLS 1.3 client, done before the server judged it, learns it on reading. */
    if (d.cli.rc == 0) {
        assert_int_equal(read_until_error(d.cli.tc, d.cli.fd), ERR_TLS);
        assert_non_null(strstr(tls_conn_error(d.cli.tc), "alert"));
    }
    duo_close(&d);

    /* Outbound: the client refuses the server's chain during its handshake. */
    duo_open(&d, web, rogue, NULL);
    assert_int_equal(d.cli.rc, ERR_TLS);
    assert_non_null(strstr(tls_conn_error(d.cli.tc), "unable to get local issuer certificate"));
    assert_int_equal(tls_conn_peer_uri(d.cli.tc, (char[128]){0}, 128), ERR_NO_URI);
    duo_close(&d);

    /* Every root passed is trusted: with both roots the same leaf is accepted. */
    const char *both[] = {pki.ca1.cert_pem, pki.ca2.cert_pem};
    struct tls_ctx *db2 = ctx_roots(&pki.db, NULL, both, 2, 0, 0);
    duo_open(&d, rogue, db2, NULL);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(d.srv.rc, 0);
    assert_peer_uri(d.srv.tc, URI_WEB);
    duo_close(&d);

    tls_ctx_unref(rogue);
    tls_ctx_unref(db);
    tls_ctx_unref(web);
    tls_ctx_unref(db2);
}

/* root -> intermediate -> leaf: the peer sends the intermediate, only the root is trusted. */
static void test_intermediate_chain(void **state)
{
    (void)state;
    const char *roots[] = {pki.ca1.cert_pem};
    struct tls_ctx *api = ctx_roots(&pki.api, pki.api_chain_pem, roots, 1, 0, 0);
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct duo d;

    duo_open(&d, web, api, NULL); /* the server sends the chain */
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(d.srv.rc, 0);
    assert_peer_uri(d.cli.tc, URI_API);
    duo_close(&d);

    duo_open(&d, api, web, NULL); /* the client sends the chain */
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(d.srv.rc, 0);
    assert_peer_uri(d.srv.tc, URI_API);
    duo_close(&d);

    /* Without the intermediate in cert_pem nothing links the leaf to the root. */
    struct tls_ctx *bare = ctx_roots(&pki.api, pki.api.cert_pem, roots, 1, 0, 0);
    duo_open(&d, web, bare, NULL);
    assert_int_equal(d.cli.rc, ERR_TLS);
    assert_non_null(strstr(tls_conn_error(d.cli.tc), "unable to get local issuer certificate"));
    duo_close(&d);

    /* An intermediate is never a trust anchor by itself: trusting it alone is not enough. */
    const char *inter_only[] = {pki.inter.cert_pem};
    struct tls_ctx *web_i = ctx_roots(&pki.web, NULL, inter_only, 1, 0, 0);
    duo_open(&d, web_i, api, NULL);
    assert_int_equal(d.cli.rc, ERR_TLS);
    duo_close(&d);

    tls_ctx_unref(api);
    tls_ctx_unref(web);
    tls_ctx_unref(bare);
    tls_ctx_unref(web_i);
}

static void test_peer_without_uri(void **state)
{
    (void)state;
    struct tls_ctx *nouri = ctx_for(&pki.nouri, &pki.ca1);
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct duo d;
    memset(&d, 0, sizeof(d));
    pair(d.fds);
    d.cli.fd = d.fds[0];
    d.srv.fd = d.fds[1];
    d.cli.tc = tls_conn_new_client(web, d.cli.fd, "", NULL);
    d.srv.tc = tls_conn_new_server(nouri, d.srv.fd);
    char uri[256];
    assert_int_equal(tls_conn_peer_uri(d.cli.tc, uri, sizeof(uri)), ERR_NO_URI); /* too early */
    handshake_both(&d.cli, &d.srv);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(tls_conn_peer_uri(d.cli.tc, uri, sizeof(uri)), ERR_NO_URI);
    assert_peer_uri(d.srv.tc, URI_WEB);
    duo_close(&d);
    tls_ctx_unref(nouri);
    tls_ctx_unref(web);
}

/* The client sends the SNI it was given, and none when given "" or NULL. */
static void test_sni(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    SSL_CTX *raw = raw_ctx(1, &pki.db, &pki.ca1);
    const char *cases[][2] = {{SNI_DB, SNI_DB}, {"", NULL}, {NULL, NULL}};
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct duo d;
        memset(&d, 0, sizeof(d));
        pair(d.fds);
        d.cli.fd = d.fds[0];
        d.srv.fd = d.fds[1];
        d.cli.tc = tls_conn_new_client(web, d.cli.fd, cases[i][0], NULL);
        d.srv.raw = SSL_new(raw);
        assert_true(SSL_set_fd(d.srv.raw, d.srv.fd));
        SSL_set_accept_state(d.srv.raw);
        handshake_both(&d.cli, &d.srv);
        assert_int_equal(d.cli.rc, 0);
        assert_int_equal(d.srv.rc, 0);
        const char *seen = SSL_get_servername(d.srv.raw, TLSEXT_NAMETYPE_host_name);
        if (cases[i][1] == NULL)
            assert_null(seen);
        else
            assert_string_equal(seen, cases[i][1]);
        assert_peer_uri(d.cli.tc, URI_DB);
        duo_close(&d);
    }

    /* A name OpenSSL cannot send fails the handshake instead of silently going unsent. */
    char longname[300];
    memset(longname, 'a', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    int fds[2];
    pair(fds);
    struct tls_conn *c = tls_conn_new_client(web, fds[0], longname, NULL);
    assert_non_null(c);
    assert_int_equal(tls_handshake(c), ERR_TLS);
    assert_non_null(strstr(tls_conn_error(c), "SNI"));
    tls_conn_free(c);
    close(fds[0]);
    close(fds[1]);
    SSL_CTX_free(raw);
    tls_ctx_unref(web);
}

/*
 * The server's session cache: a raw client resumes, and the resumed server connection still
 * knows (and vouches for) the client's identity, which lives in the cached session.
 */
static void test_session_resumption(void **state)
{
    (void)state;
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    SSL_CTX *raw = raw_ctx(0, &pki.web, &pki.ca1);
    SSL_SESSION *sess = NULL;
    for (int round = 0; round < 2; round++) {
        struct duo d;
        memset(&d, 0, sizeof(d));
        pair(d.fds);
        d.cli.fd = d.fds[0];
        d.srv.fd = d.fds[1];
        d.cli.raw = SSL_new(raw);
        assert_true(SSL_set_fd(d.cli.raw, d.cli.fd));
        SSL_set_connect_state(d.cli.raw);
        if (sess != NULL)
            assert_true(SSL_set_session(d.cli.raw, sess));
        d.srv.tc = tls_conn_new_server(db, d.srv.fd);
        handshake_both(&d.cli, &d.srv);
        assert_int_equal(d.cli.rc, 0);
        assert_int_equal(d.srv.rc, 0);
        assert_int_equal(SSL_session_reused(d.cli.raw), round == 1);
        assert_peer_uri(d.srv.tc, URI_WEB);

        /* TLS 1.3 tickets arrive after the handshake: read a byte to take them in. */
        write_all(d.srv.tc, d.srv.fd, "x", 1);
        char c;
        size_t got = 0;
        for (;;) {
            ERR_clear_error();
            int r = SSL_read_ex(d.cli.raw, &c, 1, &got);
            if (r == 1)
                break;
            assert_int_equal(SSL_get_error(d.cli.raw, r), SSL_ERROR_WANT_READ);
            wait_fd(d.cli.fd, LOOP_READ);
        }
        assert_int_equal(c, 'x');
        SSL_SESSION_free(sess);
        sess = SSL_get1_session(d.cli.raw);
        assert_non_null(sess);
        assert_true(SSL_SESSION_is_resumable(sess));
        /*
         * OpenSSL invalidates a session when its connection is freed before close_notify was
         * sent (ssl_clear_bad_session): on the server it leaves the cache, on the client the
         * saved SSL_SESSION becomes not resumable. A clean close is part of resumption.
         */
        assert_int_equal(tls_shutdown(d.srv.tc), 0);
        assert_true(SSL_shutdown(d.cli.raw) >= 0);
        duo_close(&d);
    }
    SSL_SESSION_free(sess);
    SSL_CTX_free(raw);
    tls_ctx_unref(db);
}

/*
 * One connection of a raw client to a connectd server, offering <*sess> when set. On a
 * completed handshake the server writes a byte (so a TLS 1.3 ticket reaches the client), the
 * client's session replaces <*sess>, and both ends close cleanly (a server connection freed
 * without close_notify loses its session). Returns the server's handshake result; <resumed>
 * says whether the client resumed.
 */
static int raw_round(SSL_CTX *raw, struct tls_ctx *srv, SSL_SESSION **sess, int *resumed)
{
    struct duo d;
    memset(&d, 0, sizeof(d));
    pair(d.fds);
    d.cli.fd = d.fds[0];
    d.srv.fd = d.fds[1];
    d.cli.raw = SSL_new(raw);
    assert_true(SSL_set_fd(d.cli.raw, d.cli.fd));
    SSL_set_connect_state(d.cli.raw);
    if (*sess != NULL)
        assert_true(SSL_set_session(d.cli.raw, *sess));
    d.srv.tc = tls_conn_new_server(srv, d.srv.fd);
    handshake_both(&d.cli, &d.srv);
    *resumed = SSL_session_reused(d.cli.raw) == 1;
    int rc = d.srv.rc;
    if (rc == 0) {
        assert_peer_uri(d.srv.tc, URI_WEB);
        write_all(d.srv.tc, d.srv.fd, "x", 1);
        char c;
        size_t got = 0;
        for (;;) {
            ERR_clear_error();
            int r = SSL_read_ex(d.cli.raw, &c, 1, &got);
            if (r == 1)
                break;
            assert_int_equal(SSL_get_error(d.cli.raw, r), SSL_ERROR_WANT_READ);
            wait_fd(d.cli.fd, LOOP_READ);
        }
        SSL_SESSION_free(*sess);
        *sess = SSL_get1_session(d.cli.raw);
        assert_non_null(*sess);
        assert_int_equal(tls_shutdown(d.srv.tc), 0);
        assert_true(SSL_shutdown(d.cli.raw) >= 0);
    }
    ERR_clear_error();
    duo_close(&d);
    return rc;
}

/*
 * Regression (issue 7, defect 1): the server's session cache kept a caller's session for
 * OpenSSL's default 7200 s, so a caller whose leaf had expired (and could no longer be renewed)
 * still resumed, and the identity was read from the cached certificate. A session now lives no
 * longer than the peer certificate it carries: after expiry the caller is refused, resumed or
 * not. The ticket's lifetime says so to the client too.
 */
static void server_resumption_not_past_peer_expiry(int max_version)
{
    time_t not_after = time(NULL) + 3;
    struct cert short_web;
    make_cert(&short_web, &pki.ca1, 0, "web", URI_WEB, not_after);
    const char *roots[] = {pki.ca1.cert_pem};
    struct tls_ctx *db = ctx_roots(&pki.db, NULL, roots, 1, 0, max_version);
    SSL_CTX *raw = raw_ctx(0, &short_web, &pki.ca1);
    SSL_SESSION *sess = NULL;
    int resumed = -1;
    assert_int_equal(raw_round(raw, db, &sess, &resumed), 0);
    assert_int_equal(resumed, 0);
    unsigned long hint = SSL_SESSION_get_ticket_lifetime_hint(sess); /* 0 without a ticket */
    assert_int_equal(raw_round(raw, db, &sess, &resumed), 0);
    assert_int_equal(resumed, 1);
    while (time(NULL) <= not_after + 1)
        usleep(100 * 1000);
    /* A client may offer the session all the same (an age of 0 makes OpenSSL's client send
     * it whatever lifetime the ticket named): the server must not take it. */
    SSL_SESSION_set_time(sess, (long)time(NULL));
    int rc = raw_round(raw, db, &sess, &resumed);
    if (rc == 0)
        fail_msg("TLS max %d: a caller whose certificate expired was admitted (resumed %d)",
                 max_version, resumed);
    if (hint > 3)
        fail_msg("the ticket's lifetime (%lu s) outlives the caller's certificate (3 s)", hint);
    SSL_SESSION_free(sess);
    SSL_CTX_free(raw);
    tls_ctx_unref(db);
    free_cert(&short_web);
}

static void test_server_resumption_not_past_peer_expiry(void **state)
{
    (void)state;
    server_resumption_not_past_peer_expiry(0);
}

static void test_server_resumption_not_past_peer_expiry_tls12(void **state)
{
    (void)state;
    server_resumption_not_past_peer_expiry(12);
}

/* The server cache belongs to one generation of leaf and roots: a context with other roots
 * resumes none of the sessions an earlier one issued (a full handshake runs instead). */
static void test_server_cache_per_roots(void **state)
{
    (void)state;
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    const char *roots[] = {pki.ca1.cert_pem, pki.ca2.cert_pem};
    struct tls_ctx *db_rotated = ctx_roots(&pki.db, NULL, roots, 2, 0, 0);
    SSL_CTX *raw = raw_ctx(0, &pki.web, &pki.ca1);
    SSL_SESSION *sess = NULL;
    int resumed = -1;
    assert_int_equal(raw_round(raw, db, &sess, &resumed), 0);
    assert_int_equal(raw_round(raw, db, &sess, &resumed), 0);
    assert_int_equal(resumed, 1);
    assert_int_equal(raw_round(raw, db_rotated, &sess, &resumed), 0);
    assert_int_equal(resumed, 0);
    SSL_SESSION_free(sess);
    SSL_CTX_free(raw);
    tls_ctx_unref(db);
    tls_ctx_unref(db_rotated);
}

/*
 * The server keeps a session 300 s (nginx's and HAProxy's default; OpenSSL's 7,200 s kept a
 * burst's sessions and their memory for two hours) and says so in the ticket's lifetime; a
 * sweep drops the expired ones, which OpenSSL alone does only when the cache fills.
 */
static void test_server_sessions_expire_and_sweep(void **state)
{
    (void)state;
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    SSL_CTX *raw = raw_ctx(0, &pki.web, &pki.ca1);
    SSL_SESSION *sess = NULL;
    int resumed = -1;
    assert_int_equal(raw_round(raw, db, &sess, &resumed), 0);
    assert_int_equal(SSL_SESSION_get_ticket_lifetime_hint(sess), 300);
    assert_int_equal(tls_ctx_server_sessions(db), 1);
    long long now = (long long)time(NULL);
    assert_int_equal(tls_ctx_flush_sessions(db, now), 0);
    assert_int_equal(tls_ctx_server_sessions(db), 1);
    assert_int_equal(tls_ctx_flush_sessions(db, now + 301), 1);
    assert_int_equal(tls_ctx_server_sessions(db), 0);
    assert_int_equal(raw_round(raw, db, &sess, &resumed), 0);
    assert_int_equal(resumed, 0); /* swept: a full handshake */
    SSL_SESSION_free(sess);
    SSL_CTX_free(raw);
    tls_ctx_unref(db);
}

/*
 * Resumption between two connectd ends: the client keeps the session the server issued under
 * its resume key and offers it on the next connections to the same key (a full handshake
 * brings a ticket, a resumed one none). Both ends still know the peer's identity. A client
 * connection freed without close_notify does not spoil the kept session; no key, or another
 * key, means a full handshake.
 */
static void test_client_resumption(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    static const struct {
        const char *key;
        int resumed;
    } rounds[] = {
        {"127.0.0.1:1|" SNI_DB, 0}, /* nothing kept yet */
        {"127.0.0.1:1|" SNI_DB, 1}, /* the ticket of round 0 */
        {NULL, 0},                  /* resumption not asked for */
        {"127.0.0.1:2|" SNI_DB, 0}, /* another peer */
        {"127.0.0.1:1|" SNI_DB, 1}, /* still the ticket of round 0 */
        {"127.0.0.1:1|" SNI_DB, 1}, /* and again */
    };
    for (size_t i = 0; i < ARRAY_SIZE(rounds); i++) {
        struct duo d;
        duo_open_resuming(&d, web, db, SNI_DB, rounds[i].key);
        assert_int_equal(d.cli.rc, 0);
        assert_int_equal(d.srv.rc, 0);
        if (tls_conn_resumed(d.cli.tc) != rounds[i].resumed)
            fail_msg("round %zu: resumed %d, want %d", i, tls_conn_resumed(d.cli.tc),
                     rounds[i].resumed);
        assert_int_equal(tls_conn_resumed(d.srv.tc), rounds[i].resumed);
        assert_peer_uri(d.cli.tc, URI_DB);
        assert_peer_uri(d.srv.tc, URI_WEB);
        /* TLS 1.3 tickets arrive after the handshake: a byte read takes them in. */
        char c;
        write_all(d.srv.tc, d.srv.fd, "x", 1);
        read_exact(d.cli.tc, d.cli.fd, &c, 1);
        /* The server ends cleanly (its cache keeps the session); the client just goes. */
        assert_int_equal(tls_shutdown(d.srv.tc), 0);
        duo_close(&d);
    }
    /* A session never outlives its context: a new generation starts without any. */
    struct tls_ctx *web2 = ctx_for(&pki.web, &pki.ca1);
    struct duo d;
    duo_open_resuming(&d, web2, db, SNI_DB, "127.0.0.1:1|" SNI_DB);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(tls_conn_resumed(d.cli.tc), 0);
    duo_close(&d);
    tls_ctx_unref(web2);

    /* The caller may drop the context first: a ticket arriving then is kept all the same. */
    struct tls_ctx *web3 = ctx_for(&pki.web, &pki.ca1);
    duo_open_resuming(&d, web3, db, SNI_DB, "127.0.0.1:3|" SNI_DB);
    tls_ctx_unref(web3);
    char c;
    write_all(d.srv.tc, d.srv.fd, "y", 1);
    read_exact(d.cli.tc, d.cli.fd, &c, 1);
    assert_int_equal(c, 'y');
    duo_close(&d);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
}

/* Resumption verifies no certificate again, so a session whose server certificate has
 * expired since is not offered: the next connection runs a full handshake (which then fails
 * on the expired certificate, as it must). */
static void test_client_resumption_not_past_peer_expiry(void **state)
{
    (void)state;
    struct cert short_db;
    make_cert(&short_db, &pki.ca1, 0, "db", URI_DB, time(NULL) + 2);
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&short_db, &pki.ca1);
    struct duo d;
    duo_open_resuming(&d, web, db, SNI_DB, "127.0.0.1:1|" SNI_DB);
    assert_int_equal(d.cli.rc, 0);
    char c;
    write_all(d.srv.tc, d.srv.fd, "z", 1);
    read_exact(d.cli.tc, d.cli.fd, &c, 1);
    assert_int_equal(tls_shutdown(d.srv.tc), 0);
    duo_close(&d);
    sleep(3);
    duo_open_resuming(&d, web, db, SNI_DB, "127.0.0.1:1|" SNI_DB);
    assert_int_not_equal(d.cli.rc, 0);
    assert_int_equal(tls_conn_resumed(d.cli.tc), 0);
    duo_close(&d);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
    free_cert(&short_db);
}

/* Reads the byte the server sends, which takes in the tickets the server sent before it, then
 * ends both sides (the server cleanly: its cache keeps the session). */
static void duo_settle_close(struct duo *d)
{
    char c;
    write_all(d->srv.tc, d->srv.fd, "t", 1);
    read_exact(d->cli.tc, d->cli.fd, &c, 1);
    assert_int_equal(c, 't');
    assert_int_equal(tls_shutdown(d->srv.tc), 0);
    duo_close(d);
}

/*
 * Connections opened at the same moment all resume on the one session kept: an OpenSSL server
 * forgets a session on use only when it accepts early data. Before, the session was taken out
 * when offered, so of dials made together one resumed and the rest ran full handshakes. A
 * resumed handshake brings no new ticket: the server cache keeps the one session of the full
 * handshake (it held one more per resumed connection), and the client's ticket still serves.
 */
static void test_concurrent_dials_share_the_session(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    const char *key = "127.0.0.1:1|" SNI_DB;
    struct duo d;
    duo_open_resuming(&d, web, db, SNI_DB, key);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(tls_conn_resumed(d.cli.tc), 0);
    duo_settle_close(&d);
    assert_int_equal(tls_ctx_server_sessions(db), 1);
    assert_int_equal(tls_ctx_client_sessions(web, key), 1);

    struct duo many[4];
    for (size_t i = 0; i < ARRAY_SIZE(many); i++)
        duo_start(&many[i], web, db, SNI_DB, key);
    for (size_t i = 0; i < ARRAY_SIZE(many); i++) {
        handshake_both(&many[i].cli, &many[i].srv);
        assert_int_equal(many[i].cli.rc, 0);
        if (!tls_conn_resumed(many[i].cli.tc) || !tls_conn_resumed(many[i].srv.tc))
            fail_msg("dial %zu of %zu made together: a full handshake", i, ARRAY_SIZE(many));
        assert_peer_uri(many[i].cli.tc, URI_DB);
        assert_peer_uri(many[i].srv.tc, URI_WEB);
    }
    for (size_t i = 0; i < ARRAY_SIZE(many); i++)
        duo_settle_close(&many[i]);
    if (tls_ctx_server_sessions(db) != 1)
        fail_msg("the server cache holds %zu sessions after 4 resumed connections, want 1",
                 tls_ctx_server_sessions(db));
    assert_int_equal(tls_ctx_client_sessions(web, key), 1);
    duo_open_resuming(&d, web, db, SNI_DB, key);
    assert_int_equal(tls_conn_resumed(d.cli.tc), 1);
    duo_settle_close(&d);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
}

/* A kept session the server does not know any more (another generation of its context, a
 * restart) is dropped after the full handshake it caused, and one offered to a handshake that
 * failed is dropped too: neither is offered to every later dial. */
static void test_refused_session_is_dropped(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct tls_ctx *db_restarted = ctx_for(&pki.db, &pki.ca1);
    const char *key = "127.0.0.1:1|" SNI_DB;
    struct duo d;
    duo_open_resuming(&d, web, db, SNI_DB, key);
    duo_settle_close(&d);
    assert_int_equal(tls_ctx_client_sessions(web, key), 1);
    duo_open_resuming(&d, web, db_restarted, SNI_DB, key);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(tls_conn_resumed(d.cli.tc), 0);
    /* Before the new ticket is read: the refused session is gone. */
    assert_int_equal(tls_ctx_client_sessions(web, key), 0);
    duo_settle_close(&d);
    assert_int_equal(tls_ctx_client_sessions(web, key), 1);
    /* A server whose certificate the client's roots do not vouch for: the session is offered,
     * the handshake fails. */
    struct tls_ctx *db_other = ctx_for(&pki.rogue, &pki.ca2);
    duo_open_resuming(&d, web, db_other, SNI_DB, key);
    assert_int_not_equal(d.cli.rc, 0);
    assert_int_equal(tls_ctx_client_sessions(web, key), 0);
    duo_close(&d);
    tls_ctx_unref(db_other);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
    tls_ctx_unref(db_restarted);
}

/* TLS 1.2 resumes by session id and issues nothing new on resumption: the session offered
 * stays kept, so every connection after the first resumes. */
static void test_client_resumption_tls12(void **state)
{
    (void)state;
    const char *roots[] = {pki.ca1.cert_pem};
    struct tls_ctx *web = ctx_roots(&pki.web, NULL, roots, 1, 12, 12);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    for (int i = 0; i < 4; i++) {
        struct duo d;
        duo_open_resuming(&d, web, db, SNI_DB, "127.0.0.1:1|" SNI_DB);
        assert_int_equal(d.cli.rc, 0);
        assert_string_equal(tls_conn_version(d.cli.tc), "TLSv1.2");
        if (tls_conn_resumed(d.cli.tc) != (i > 0))
            fail_msg("connection %d: resumed %d", i, tls_conn_resumed(d.cli.tc));
        assert_peer_uri(d.cli.tc, URI_DB);
        assert_peer_uri(d.srv.tc, URI_WEB);
        assert_int_equal(tls_shutdown(d.srv.tc), 0);
        duo_close(&d);
    }
    tls_ctx_unref(web);
    tls_ctx_unref(db);
}

/* ---- tests: data ----------------------------------------------------------------------------- */

struct flow {
    struct end *from, *to;
    unsigned char *src, *dst;
    size_t len, sent, got;
    unsigned partial, eagain;
};

static unsigned char *pattern(size_t len, unsigned salt)
{
    unsigned char *p = xmalloc(len);
    for (size_t i = 0; i < len; i++)
        p[i] = (unsigned char)(i * 31u + (i >> 13) + salt);
    return p;
}

/* Both directions at once, so writes wait on a full socket while the peer is still writing. */
static void test_bulk_both_ways(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct duo d;
    duo_open(&d, web, db, SNI_DB);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(d.srv.rc, 0);

    /* Small socket buffers: records cross the socket in pieces and writes wait often. */
    for (int i = 0; i < 2; i++) {
        int sz = 24 * 1024;
        assert_int_equal(setsockopt(d.fds[i], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz)), 0);
    }
    const size_t len = 3u << 20; /* 3 MiB each way */
    struct flow flows[2] = {
        {.from = &d.cli, .to = &d.srv, .src = pattern(len, 1), .dst = xmalloc(len), .len = len},
        {.from = &d.srv, .to = &d.cli, .src = pattern(len, 7), .dst = xmalloc(len), .len = len},
    };
    for (int rounds = 0;; rounds++) {
        assert_true(rounds < 1000000);
        unsigned wants[2] = {0, 0}; /* per end: 0 = client, 1 = server */
        int progress = 0, done = 1;
        for (int i = 0; i < 2; i++) {
            struct flow *f = &flows[i];
            if (f->sent < f->len) {
                done = 0;
                size_t left = f->len - f->sent;
                ssize_t n = tls_write(f->from->tc, f->src + f->sent, left);
                if (n > 0) {
                    f->partial += (size_t)n < left;
                    f->sent += (size_t)n;
                    progress = 1;
                } else {
                    if (n != -EAGAIN)
                        fail_msg("tls_write: %zd %s", n, tls_conn_error(f->from->tc));
                    f->eagain++;
                    wants[f->from == &d.srv] |= tls_conn_wants(f->from->tc);
                }
            }
            /* The reader starts once the writer has had to wait, so both paths are taken. */
            if (f->got < f->len && (f->eagain > 0 || f->sent == f->len)) {
                done = 0;
                ssize_t n = tls_read(f->to->tc, f->dst + f->got, MIN(f->len - f->got, 16384));
                if (n > 0) {
                    f->got += (size_t)n;
                    progress = 1;
                } else {
                    if (n != -EAGAIN)
                        fail_msg("tls_read: %zd %s", n, tls_conn_error(f->to->tc));
                    wants[f->to == &d.srv] |= tls_conn_wants(f->to->tc);
                }
            }
        }
        if (done)
            break;
        if (progress)
            continue;
        struct pollfd p[2] = {{.fd = d.cli.fd, .events = poll_events(wants[0])},
                              {.fd = d.srv.fd, .events = poll_events(wants[1])}};
        assert_true(poll(p, 2, POLL_TIMEOUT) > 0);
    }
    for (int i = 0; i < 2; i++) {
        assert_memory_equal(flows[i].src, flows[i].dst, len);
        assert_true(flows[i].partial > 0); /* a 3 MiB write is taken a record at a time */
        assert_true(flows[i].eagain > 0);  /* and the socket did fill up */
        free(flows[i].src);
        free(flows[i].dst);
    }
    duo_close(&d);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
}

/* Decrypted bytes OpenSSL holds are visible, because no poll() would report them. */
static void test_pending(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct duo d;
    duo_open(&d, web, db, NULL);
    char msg[100], got[100];
    memset(msg, 'm', sizeof(msg));
    write_all(d.cli.tc, d.cli.fd, msg, sizeof(msg));
    read_exact(d.srv.tc, d.srv.fd, got, 10);
    assert_int_equal(tls_conn_pending(d.srv.tc), 90);
    assert_int_equal(tls_read(d.srv.tc, got + 10, 90), 90);
    assert_int_equal(tls_conn_pending(d.srv.tc), 0);
    assert_memory_equal(msg, got, sizeof(msg));
    assert_int_equal(tls_write(d.srv.tc, msg, 0), 0);
    duo_close(&d);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
}

/*
 * Half-close: after one side's close_notify the other reads end of stream, yet its own
 * direction keeps flowing until it closes too. Run for TLS 1.3 and 1.2.
 */
static void half_close(int max_version)
{
    const char *roots[] = {pki.ca1.cert_pem};
    struct tls_ctx *web = ctx_roots(&pki.web, NULL, roots, 1, 0, max_version);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct duo d;
    duo_open(&d, web, db, NULL);
    assert_int_equal(d.cli.rc, 0);
    char buf[64];

    write_all(d.cli.tc, d.cli.fd, "request", 7);
    assert_int_equal(tls_shutdown(d.cli.tc), 0);
    assert_int_equal(tls_shutdown(d.cli.tc), 0); /* once only */
    assert_int_equal(read_to_eof(d.srv.tc, d.srv.fd, buf, sizeof(buf)), 7);
    assert_memory_equal(buf, "request", 7);
    assert_int_equal(tls_read(d.srv.tc, buf, sizeof(buf)), 0); /* and stays at the end */

    write_all(d.srv.tc, d.srv.fd, "response, after the client's close", 34);
    assert_int_equal(tls_shutdown(d.srv.tc), 0);
    assert_int_equal(read_to_eof(d.cli.tc, d.cli.fd, buf, sizeof(buf)), 34);
    assert_memory_equal(buf, "response, after the client's close", 34);
    /* Writing after our own close_notify is a failure, not a silent drop. */
    assert_int_equal(tls_write(d.cli.tc, "late", 4), ERR_TLS);
    assert_true(strlen(tls_conn_error(d.cli.tc)) > 0);
    duo_close(&d);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
}

static void test_half_close_tls13(void **state)
{
    (void)state;
    half_close(0);
}

static void test_half_close_tls12(void **state)
{
    (void)state;
    half_close(12);
}

/* A peer that closes its socket without close_notify: end of stream, the rest still works. */
static void test_unexpected_eof(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct duo d;
    duo_open(&d, web, db, NULL);
    char buf[64];
    write_all(d.cli.tc, d.cli.fd, "abc", 3);
    assert_int_equal(shutdown(d.cli.fd, SHUT_WR), 0);
    assert_int_equal(read_to_eof(d.srv.tc, d.srv.fd, buf, sizeof(buf)), 3);
    write_all(d.srv.tc, d.srv.fd, "xyz", 3);
    assert_int_equal(tls_shutdown(d.srv.tc), 0);
    assert_int_equal(read_to_eof(d.cli.tc, d.cli.fd, buf, sizeof(buf)), 3);
    assert_memory_equal(buf, "xyz", 3);
    duo_close(&d);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
}

/* Not TLS at all: the server fails with a one-line reason. */
static void test_garbage_from_peer(void **state)
{
    (void)state;
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    int fds[2];
    pair(fds);
    struct tls_conn *s = tls_conn_new_server(db, fds[1]);
    assert_int_equal(tls_handshake(s), -EAGAIN);
    assert_int_equal(tls_conn_wants(s), LOOP_READ);
    const char req[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_int_equal(write(fds[0], req, sizeof(req) - 1), (ssize_t)sizeof(req) - 1);
    assert_int_equal(tls_handshake(s), ERR_TLS);
    const char *err = tls_conn_error(s);
    assert_non_null(strstr(err, "handshake; error:"));
    assert_null(strchr(err, '\n'));
    tls_conn_free(s);
    close(fds[0]);
    close(fds[1]);

    /* A peer that vanishes mid-handshake is a failure too (not an end of stream). */
    pair(fds);
    s = tls_conn_new_server(db, fds[1]);
    assert_int_equal(tls_handshake(s), -EAGAIN);
    close(fds[0]);
    assert_int_equal(tls_handshake(s), ERR_TLS);
    assert_true(strlen(tls_conn_error(s)) > 0);
    tls_conn_free(s);
    close(fds[1]);
    tls_ctx_unref(db);
}

/* ---- tests: contexts ----------------------------------------------------------------------- */

/* Connections keep the context they were made with: rotation may drop it under them. */
static void test_ctx_dropped_under_connection(void **state)
{
    (void)state;
    struct tls_ctx *web = ctx_for(&pki.web, &pki.ca1);
    struct tls_ctx *db = ctx_for(&pki.db, &pki.ca1);
    struct duo d;
    memset(&d, 0, sizeof(d));
    pair(d.fds);
    d.cli.fd = d.fds[0];
    d.srv.fd = d.fds[1];
    assert_ptr_equal(tls_ctx_ref(web), web);
    tls_ctx_unref(web); /* back to one reference */
    d.cli.tc = tls_conn_new_client(web, d.cli.fd, NULL, NULL);
    d.srv.tc = tls_conn_new_server(db, d.srv.fd);
    tls_ctx_unref(web);
    tls_ctx_unref(db);
    tls_ctx_unref(NULL);
    handshake_both(&d.cli, &d.srv);
    assert_int_equal(d.cli.rc, 0);
    assert_int_equal(d.srv.rc, 0);
    assert_peer_uri(d.srv.tc, URI_WEB);
    duo_close(&d);
}

static void *ref_churn(void *arg)
{
    struct tls_ctx *ctx = arg;
    for (int i = 0; i < 20000; i++)
        tls_ctx_unref(tls_ctx_ref(ctx));
    tls_ctx_unref(ctx); /* the reference taken for this thread */
    return NULL;
}

static void test_ctx_refs_across_threads(void **state)
{
    (void)state;
    struct tls_ctx *ctx = ctx_for(&pki.web, &pki.ca1);
    pthread_t t[4];
    for (size_t i = 0; i < ARRAY_SIZE(t); i++)
        assert_int_equal(pthread_create(&t[i], NULL, ref_churn, tls_ctx_ref(ctx)), 0);
    tls_ctx_unref(ctx); /* a thread frees it, whichever is last */
    for (size_t i = 0; i < ARRAY_SIZE(t); i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);
}

static int try_ctx(const char *cert, const char *key, const char *const *roots, size_t n,
                   const struct tls_ctx_opts *opts, char *err, size_t errlen)
{
    struct tls_ctx *ctx = (struct tls_ctx *)&ctx; /* must be reset to NULL on failure */
    err[0] = '\0';
    int rc = tls_ctx_new(cert, key, roots, n, opts, &ctx, err, errlen);
    if (rc == 0)
        tls_ctx_unref(ctx);
    else
        assert_null(ctx);
    return rc;
}

/* The base64 body of a PEM must not appear in a message, not even a line of it. */
static void assert_no_key_material(const char *err, const char *key_pem)
{
    const char *line = strchr(key_pem, '\n');
    assert_non_null(line);
    for (line++; *line != '\0' && *line != '-';) {
        const char *end = strchr(line, '\n');
        char piece[17];
        snprintf(piece, sizeof(piece), "%.16s", line);
        assert_null(strstr(err, piece));
        line = end ? end + 1 : line + strlen(line);
    }
}

static void test_bad_inputs(void **state)
{
    (void)state;
    char err[512];
    const char *roots[] = {pki.ca1.cert_pem};
    const char *const cert = pki.web.cert_pem, *const key = pki.web.key_pem;

    assert_int_equal(try_ctx(cert, key, roots, 1, NULL, err, sizeof(err)), 0);

    assert_int_equal(try_ctx("not a certificate", key, roots, 1, NULL, err, sizeof(err)),
                     ERR_BAD_CERT);
    assert_non_null(strstr(err, "certificate"));
    assert_int_equal(try_ctx("", key, roots, 1, NULL, err, sizeof(err)), ERR_BAD_CERT);
    char *truncated = xstrndup(cert, strlen(cert) / 2);
    assert_int_equal(try_ctx(truncated, key, roots, 1, NULL, err, sizeof(err)), ERR_BAD_CERT);
    free(truncated);
    /* A good certificate followed by a broken block is refused, not silently cut short. */
    char *trailing =
        xasprintf("%s-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", cert);
    assert_int_equal(try_ctx(trailing, key, roots, 1, NULL, err, sizeof(err)), ERR_BAD_CERT);
    free(trailing);

    assert_int_equal(try_ctx(cert, "garbage", roots, 1, NULL, err, sizeof(err)), ERR_BAD_CERT);
    assert_non_null(strstr(err, "private key"));
    char *broken_key = xstrndup(key, strlen(key) - 40);
    assert_int_equal(try_ctx(cert, broken_key, roots, 1, NULL, err, sizeof(err)), ERR_BAD_CERT);
    assert_no_key_material(err, key);
    free(broken_key);
    /* The key of another leaf: well formed, wrong. */
    assert_int_equal(try_ctx(cert, pki.db.key_pem, roots, 1, NULL, err, sizeof(err)), ERR_BAD_CERT);
    assert_non_null(strstr(err, "does not match"));
    assert_no_key_material(err, pki.db.key_pem);
    assert_no_key_material(err, key);
    /* An encrypted key is refused at once; nothing may prompt on a terminal. */
    BIO *b = BIO_new(BIO_s_mem());
    assert_true(PEM_write_bio_PrivateKey(b, pki.web.key, EVP_aes_128_cbc(),
                                         (const unsigned char *)"secret", 6, NULL, NULL));
    char *encrypted = bio_take(b);
    assert_int_equal(try_ctx(cert, encrypted, roots, 1, NULL, err, sizeof(err)), ERR_BAD_CERT);
    assert_no_key_material(err, encrypted);
    free(encrypted);
    /* Key and certificate swapped. */
    assert_int_equal(try_ctx(key, cert, roots, 1, NULL, err, sizeof(err)), ERR_BAD_CERT);
    assert_no_key_material(err, key);

    const char *bad_roots[] = {pki.ca1.cert_pem, "junk"};
    assert_int_equal(try_ctx(cert, key, bad_roots, 2, NULL, err, sizeof(err)), ERR_BAD_CERT);
    assert_non_null(strstr(err, "root 1"));
    assert_int_equal(try_ctx(cert, key, roots, 0, NULL, err, sizeof(err)), ERR_BAD_CERT);
    assert_non_null(strstr(err, "roots"));
    const char *dup_roots[] = {pki.ca1.cert_pem, pki.ca1.cert_pem};
    assert_int_equal(try_ctx(cert, key, dup_roots, 2, NULL, err, sizeof(err)), 0);

    struct tls_ctx_opts bad[] = {{11, 0, NULL}, {0, 14, NULL}, {13, 12, NULL}, {-1, 0, NULL}};
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        assert_int_equal(try_ctx(cert, key, roots, 1, &bad[i], err, sizeof(err)), -EINVAL);
        assert_non_null(strstr(err, "version"));
    }
    struct tls_ctx_opts good[] = {
        {12, 12, NULL}, {13, 13, NULL}, {12, 13, NULL}, {0, 12, NULL}, {13, 0, NULL}};
    for (size_t i = 0; i < ARRAY_SIZE(good); i++)
        assert_int_equal(try_ctx(cert, key, roots, 1, &good[i], err, sizeof(err)), 0);

    /* Cipher suites by IANA name, TLS 1.2 ones only; a bad one is named. */
    struct tls_ctx_opts suites = {
        0, 0,
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"};
    assert_int_equal(try_ctx(cert, key, roots, 1, &suites, err, sizeof(err)), 0);
    const char *bad_suites[] = {"TLS_NO_SUCH_SUITE", "TLS_AES_128_GCM_SHA256", "", " , "};
    for (size_t i = 0; i < ARRAY_SIZE(bad_suites); i++) {
        suites.cipher_suites = bad_suites[i];
        assert_int_equal(try_ctx(cert, key, roots, 1, &suites, err, sizeof(err)), -EINVAL);
        assert_non_null(strstr(err, "cipher suite"));
    }
    suites.cipher_suites = "TLS_NO_SUCH_SUITE";
    assert_int_equal(try_ctx(cert, key, roots, 1, &suites, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "TLS_NO_SUCH_SUITE"));

    /* A tiny message buffer truncates, and no buffer at all is allowed. */
    assert_int_equal(try_ctx("x", key, roots, 1, NULL, err, 8), ERR_BAD_CERT);
    assert_int_equal(strlen(err), 7);
    struct tls_ctx *ctx = NULL;
    assert_int_equal(tls_ctx_new("x", key, roots, 1, NULL, &ctx, NULL, 0), ERR_BAD_CERT);
    /* Failures leave nothing on this thread's OpenSSL error queue. */
    assert_int_equal(ERR_peek_error(), 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    tls_global_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mutual_handshake),
        cmocka_unit_test(test_peer_cert_sha256),
        cmocka_unit_test(test_parsed_key),
        cmocka_unit_test(test_tls12),
        cmocka_unit_test(test_client_without_cert_refused),
        cmocka_unit_test(test_alpn_select),
        cmocka_unit_test(test_leaf_from_other_ca_refused),
        cmocka_unit_test(test_intermediate_chain),
        cmocka_unit_test(test_peer_without_uri),
        cmocka_unit_test(test_sni),
        cmocka_unit_test(test_session_resumption),
        cmocka_unit_test(test_server_resumption_not_past_peer_expiry),
        cmocka_unit_test(test_server_resumption_not_past_peer_expiry_tls12),
        cmocka_unit_test(test_server_cache_per_roots),
        cmocka_unit_test(test_server_sessions_expire_and_sweep),
        cmocka_unit_test(test_concurrent_dials_share_the_session),
        cmocka_unit_test(test_refused_session_is_dropped),
        cmocka_unit_test(test_client_resumption),
        cmocka_unit_test(test_client_resumption_tls12),
        cmocka_unit_test(test_client_resumption_not_past_peer_expiry),
        cmocka_unit_test(test_bulk_both_ways),
        cmocka_unit_test(test_pending),
        cmocka_unit_test(test_half_close_tls13),
        cmocka_unit_test(test_half_close_tls12),
        cmocka_unit_test(test_unexpected_eof),
        cmocka_unit_test(test_garbage_from_peer),
        cmocka_unit_test(test_ctx_dropped_under_connection),
        cmocka_unit_test(test_ctx_refs_across_threads),
        cmocka_unit_test(test_bad_inputs),
    };
    return cmocka_run_group_tests(tests, pki_setup, pki_teardown);
}
