/*
 * fuzz_proxycfg: a libFuzzer target for what the agent's registration answer becomes: the body
 * of /v1/agent/service/<id> is decoded, then its Proxy.Config and upstream Config keys are
 * validated and turned into a proxy configuration, which is copied and freed.
 *
 * Beyond "no crash, no leak" it checks proxycfg_build()'s contract: on failure the output is
 * zeroed and the message names something; on success the identity is set, every port is in
 * range, every upstream has a unique key and a port or a socket, and the deep
 * copy matches the original.
 *
 *   make fuzz FUZZ_SECONDS=60           (every target; this one is build/fuzz/fuzz_proxycfg)
 *   build/fuzz/fuzz_proxycfg -max_len=65536 tests/fuzz/corpus/proxycfg
 *
 * tests/unit/test_fuzz_replay.c includes this file to replay the committed corpus with gcc.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "proxycfg.h"
#include "util.h"

int fuzz_proxycfg_one(const uint8_t *data, size_t size);

#undef FUZZ_CHECK
#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_proxycfg: %s:%d: check failed: %s\n", __FILE__, __LINE__,        \
                    #cond);                                                                        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static int pcfg_all_zero(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != 0)
            return 0;
    return 1;
}

static int pcfg_same_str(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static void pcfg_check_upstreams(const struct proxy_cfg *c)
{
    for (size_t i = 0; i < c->n_upstreams; i++) {
        const struct upstream_cfg *u = &c->upstreams[i];
        FUZZ_CHECK(u->key != NULL && u->key[0] != '\0');
        FUZZ_CHECK(u->destination_name != NULL && u->destination_name[0] != '\0');
        FUZZ_CHECK(strcmp(u->destination_type, "service") == 0 ||
                   strcmp(u->destination_type, "prepared_query") == 0);
        FUZZ_CHECK(u->bind_port >= 0 && u->bind_port <= 65535);
        FUZZ_CHECK(u->bind_port != 0 || u->bind_socket_path[0] != '\0');
        for (size_t j = 0; j < i; j++)
            FUZZ_CHECK(strcmp(c->upstreams[j].key, u->key) != 0);
    }
}

static void pcfg_check_copy(const struct proxy_cfg *a, const struct proxy_cfg *b)
{
    FUZZ_CHECK(pcfg_same_str(a->proxy_id, b->proxy_id));
    FUZZ_CHECK(pcfg_same_str(a->service, b->service));
    FUZZ_CHECK(pcfg_same_str(a->bind_address, b->bind_address));
    FUZZ_CHECK(pcfg_same_str(a->local_address, b->local_address));
    FUZZ_CHECK(pcfg_same_str(a->tls_cipher_suites, b->tls_cipher_suites));
    FUZZ_CHECK(a->bind_port == b->bind_port && a->local_port == b->local_port);
    FUZZ_CHECK(a->n_upstreams == b->n_upstreams && b->n_warnings == 0);
    for (size_t i = 0; i < a->n_upstreams; i++)
        FUZZ_CHECK(strcmp(a->upstreams[i].key, b->upstreams[i].key) == 0);
}

int fuzz_proxycfg_one(const uint8_t *data, size_t size)
{
    struct dec_service svc;
    char err[512] = "";
    if (decode_agent_service((const char *)data, size, &svc, err, sizeof(err)) != 0)
        return 0; /* the decoder's own contract is fuzz_decode's */

    struct proxy_cfg cfg;
    err[0] = '\0';
    int rc = proxycfg_build(&svc, &cfg, err, sizeof(err));
    dec_service_dispose(&svc);
    if (rc != 0) {
        FUZZ_CHECK(rc == ERR_BAD_CONFIG);
        FUZZ_CHECK(err[0] != '\0' && strlen(err) < sizeof(err));
        FUZZ_CHECK(pcfg_all_zero(&cfg, sizeof(cfg)));
        return 0;
    }
    FUZZ_CHECK(cfg.service != NULL && cfg.service[0] != '\0');
    FUZZ_CHECK(cfg.proxy_id != NULL);
    FUZZ_CHECK(cfg.bind_port >= 0 && cfg.bind_port <= 65535);
    FUZZ_CHECK(cfg.local_port >= 0 && cfg.local_port <= 65535);
    FUZZ_CHECK(cfg.tls_min_version == 0 || cfg.tls_min_version == 12 || cfg.tls_min_version == 13);
    FUZZ_CHECK(cfg.tls_max_version == 0 || cfg.tls_max_version == 12 || cfg.tls_max_version == 13);
    for (size_t i = 0; i < cfg.n_warnings; i++)
        FUZZ_CHECK(cfg.warnings[i] != NULL && strlen(cfg.warnings[i]) < SIZE_MAX);
    pcfg_check_upstreams(&cfg);

    struct proxy_cfg copy;
    proxycfg_copy(&copy, &cfg);
    pcfg_check_copy(&cfg, &copy);
    proxycfg_dispose(&copy);
    proxycfg_dispose(&cfg);
    return 0;
}

#ifndef FUZZ_REPLAY
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_proxycfg_one(data, size);
}
#endif
