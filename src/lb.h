/*
 * lb: the choice of an endpoint inside one target, by the resolver's LoadBalancer (L7.md 4):
 * random, round_robin, least_request (power of ChoiceCount choices over active requests),
 * ring_hash (a ketama-like ring) and maglev (a 65537-entry lookup table), and the request
 * hash the HashPolicies compute (header, cookie, query parameter, source IP; Terminal).
 *
 * Pure: endpoints are named by keys (their "address:port", as Envoy hashes a host by its
 * address), requests by slices. The hash is xxHash64 (seed 0), Envoy's, so that a key maps
 * to the endpoint it would map to on an Envoy ring built the same way.
 *
 * A table (lb_table_new) is immutable once built and may be read by any thread; the mutable
 * per-worker state (round-robin cursor, active request counts) is a struct lb_state its
 * owner keeps next to the table (session.c: one per worker and endpoint set).
 */
#ifndef CONNECTD_LB_H
#define CONNECTD_LB_H

#include <stddef.h>
#include <stdint.h>

#include "decode.h"
#include "http.h"

/* Maglev's table size (Envoy's default, a prime). */
#define LB_MAGLEV_SIZE 65537u
/* Envoy's ring sizes when RingHashConfig leaves them unset. */
#define LB_RING_MIN_DEFAULT 1024u
#define LB_RING_MAX_DEFAULT (8u * 1024u * 1024u)
/* The most ring entries connectd builds, whatever MinimumRingSize asks: each worker builds
 * and holds a ring per endpoint set (16 bytes an entry) on its own thread, and 2^16 keeps one
 * at 1 MiB and its build to milliseconds, like a maglev table (Envoy's default ring is
 * 1,024 entries). */
#define LB_RING_CAP (1u << 16)
/* LeastRequestConfig.ChoiceCount when unset (Envoy's default), and the most honoured. */
#define LB_CHOICE_DEFAULT 2u
#define LB_CHOICE_MAX     64u

/* xxHash64 of <len> bytes at <p> with <seed> (the published algorithm). */
uint64_t lb_xxh64(const void *p, size_t len, uint64_t seed);

/* Whether policy <p> chooses by the request's hash (ring_hash, maglev). */
int lb_policy_hashed(enum dec_lb_policy p);

/* An immutable ring or maglev table over <n> endpoints. */
struct lb_table;

/*
 * Builds the table of policy <p> (DEC_LB_RING_HASH or DEC_LB_MAGLEV) over the endpoints named
 * <keys>[0..n) (NUL-terminated; n >= 1 and below 2^31). The ring has, for each endpoint,
 * ceil(min(ceil(ring_min / n) * n, ring_max) / n) entries hashed from "<key>_<i>" (Envoy's
 * scheme with equal weights; 0 = the default sizes, at most LB_RING_CAP entries in all);
 * maglev fills LB_MAGLEV_SIZE slots by each endpoint's permutation (offset xxh64(key, 0),
 * skip xxh64(key, 1)). Returns NULL for another policy or n == 0; allocation aborts.
 */
struct lb_table *lb_table_new(enum dec_lb_policy p, uint32_t ring_min, uint32_t ring_max,
                              const char *const *keys, size_t n);
void lb_table_free(struct lb_table *t);
/* Entries in the ring, or slots in the maglev table. */
size_t lb_table_size(const struct lb_table *t);

/*
 * The endpoint (index into the keys) that <hash> maps to, the first one at or after that
 * place (the ring's next entry, the table's next slot) whose skip[i] is 0 when <skip> is not
 * NULL; n when every endpoint is skipped.
 */
size_t lb_table_pick(const struct lb_table *t, uint64_t hash, const unsigned char *skip);

/* The mutable per-worker state of a policy over <n> endpoints. */
struct lb_state {
    uint64_t rr;      /* round_robin: the next pick's position */
    uint32_t *active; /* least_request: requests in flight per endpoint (n of them), or NULL */
    size_t n;
};

/*
 * The endpoint policy <lb> picks among <n> (>= 1) for a request, leaving out those whose
 * skip[i] is set (<skip> may be NULL; at least one must be left): random and the default a
 * uniform draw; round_robin the next after <st>'s cursor; least_request the one with the
 * fewest active requests among ChoiceCount uniform draws (the first on ties); ring_hash and
 * maglev lb_table_pick(<t>, <hash>) when <hashed>, else a uniform draw (no policy produced a
 * hash, as Envoy). <rnd> gives the draws (uniform over uint64_t). <st> and <t> may be NULL
 * for the policies that do not use them (then round_robin and least_request draw uniformly).
 * Returns an index below n.
 */
size_t lb_choose(const struct dec_load_balancer *lb, const struct lb_table *t, struct lb_state *st,
                 const unsigned char *skip, size_t n, int hashed, uint64_t hash,
                 uint64_t (*rnd)(void));

/* One request as the hash policies see it; slices into the caller's buffers. */
struct lb_req {
    const struct http_header *headers; /* as received (HTTP_HDR_DROP ones are skipped) */
    size_t nheaders;
    struct http_slice query;     /* after '?', without it (absent: p == NULL) */
    struct http_slice source_ip; /* the client's address without its port */
    /* What a generated cookie's value derives from: the client connection's addresses, as
     * Envoy hashes remote and local address. */
    struct http_slice conn;
};

/* A cookie the response must set (a cookie policy with a TTL, or Session, whose cookie the
 * request did not carry). */
struct lb_set_cookie {
    const struct dec_hash_policy *policy; /* NULL: nothing to set; else its name and path */
    char value[17];                       /* 16 hex digits */
};

/*
 * Computes the hash of request <rq> by the HashPolicies of <lb> in order, as Envoy: each
 * policy that produces a value hashes it (xxh64), and the running hash becomes
 * rotl(hash, 1) ^ new; a Terminal policy that produced one ends the walk with what is
 * known. header: the header's values (names case-insensitive), several sorted and hashed as
 * one concatenation; cookie: the first cookie of that name in the Cookie headers (quotes
 * around the value removed), and when absent and the policy has a TTL or Session, a
 * generated value (16 hex digits of xxh64(rq->conn)) that is hashed and returned in <sc>;
 * query_parameter: the first parameter of that name, raw; SourceIP: rq->source_ip when not
 * empty. Returns 1 and sets *hash when some policy produced a value, else 0. <sc> may be
 * NULL (nothing is generated then). Only the hash-based policies have HashPolicies
 * (Consul's validation); others return 0.
 */
int lb_request_hash(const struct dec_load_balancer *lb, const struct lb_req *rq, uint64_t *hash,
                    struct lb_set_cookie *sc);

/*
 * Writes the Set-Cookie value for <sc> into <out> as Envoy does: name="value", then
 * "; Max-Age=<TTL seconds>" unless it is a session cookie, "; Path=<path>" when set, and
 * "; HttpOnly". Returns its length, or -ENOSPC (out holds "" then) or -EINVAL (a name or path
 * that cannot go in a header).
 */
int lb_set_cookie_format(const struct lb_set_cookie *sc, char *out, size_t len);

#endif
