/*
 * hdrmatch: one header condition of Consul's HTTP matches (an intention permission's
 * Header[], a service-router route's Match.HTTP.Header[]), compiled, and how it is evaluated
 * on a request, with Envoy's HeaderMatcher semantics. intent.c and route.c both use it, so an
 * intention and a route read the same request the same way.
 *
 * A compiled condition is immutable: any number of threads may evaluate it at once.
 */
#ifndef CONNECTD_HDRMATCH_H
#define CONNECTD_HDRMATCH_H

#include <stddef.h>

#include "decode.h"
#include "http.h"

struct rx;

/* What a condition's name reads, decided once when it is compiled. */
enum hdr_name {
    HDR_NAME_FIELD,     /* the request's fields of that name */
    HDR_NAME_AUTHORITY, /* "Host", ":authority" */
    HDR_NAME_METHOD,    /* ":method" */
    HDR_NAME_PATH,      /* ":path" */
    HDR_NAME_PSEUDO,    /* any other pseudo-header (":scheme", ...) */
};

struct hdr_cond {
    char *name; /* compared case-insensitively; "Host"/":authority" name the authority */
    size_t name_len;
    enum hdr_name reads;
    enum dec_header_match match;
    char *value; /* lower-cased when ignore_case (ASCII, as Envoy) */
    size_t value_len;
    int invert;
    int ignore_case; /* Exact, Prefix, Suffix and Contains only (Consul passes it for these) */
    struct rx *rx;   /* DEC_HDR_REGEX when the pattern compiled, else NULL */
};

/*
 * Compiles <d> into <h> (owned strings; dispose with hdr_cond_dispose()). Returns 0, or -1
 * when its regex does not compile: <err> (<errlen> bytes) says why, h->rx stays NULL and the
 * condition evaluates as unknown. Allocation aborts.
 */
int hdr_cond_init(struct hdr_cond *h, const struct dec_perm_header *d, char *err, size_t errlen);
void hdr_cond_dispose(struct hdr_cond *h);

/* The request a condition reads; slices into the caller's buffers. */
struct hdr_req {
    struct http_slice method;          /* ":method" */
    struct http_slice authority;       /* "Host" / ":authority" (absent: p == NULL) */
    struct http_slice path, query;     /* ":path" is path?query; path.p NULL: not carried */
    const struct http_header *headers; /* as received (HTTP_HDR_DUP/DROP ones are skipped) */
    size_t nheaders;
    /* A pseudo-header the request does not carry (":scheme", or ":path" without a path) is
     * absent when set (a route), unknown otherwise (an intention fails closed on it). */
    int pseudo_absent;
};

/*
 * Evaluates <h> on <rq>: 1 it matches, 0 it does not, -1 unknown (a regex that did not
 * compile or hit its match limit, or a pseudo-header not carried unless pseudo_absent). The
 * value is the authority for "Host" and ":authority", the method for ":method", path?query for
 * ":path", else every field of that name joined with ","; an absent header matches only an
 * inverted Present; Invert negates the rest (never an unknown). May allocate briefly (joined
 * values, a folded copy for an ignore-case Contains, kept linear whatever the value).
 */
int hdr_cond_eval(const struct hdr_cond *h, const struct hdr_req *rq);

#endif
