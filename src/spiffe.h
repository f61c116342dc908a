/*
 * spiffe: parse and format Consul's SPIFFE identities and SNI names (consul-api.md 3.1, 3.2).
 *
 * Pure functions over caller buffers; no allocation. Segments longer than the fixed fields
 * are rejected, not truncated.
 */
#ifndef CONNECTD_SPIFFE_H
#define CONNECTD_SPIFFE_H

#include <stddef.h>

enum spiffe_kind {
    SPIFFE_SERVICE = 1,  /* /[ap/<p>/]ns/<ns>/dc/<dc>/svc/<service> */
    SPIFFE_AGENT,        /* /[ap/<p>/]agent/client/dc/<dc>/id/<node-id> */
    SPIFFE_SERVER,       /* /agent/server/dc/<dc> */
    SPIFFE_MESH_GATEWAY, /* /[ap/<p>/]gateway/mesh/dc/<dc> */
    SPIFFE_SIGNING,      /* no path: spiffe://<trust-domain> */
    SPIFFE_OTHER,        /* a well-formed spiffe:// URI of no kind we know */
};

#define SPIFFE_NAME_MAX 256

struct spiffe_id {
    enum spiffe_kind kind;
    char trust_domain[SPIFFE_NAME_MAX];
    char partition[SPIFFE_NAME_MAX]; /* "default" when the URI has no /ap/ segment */
    char ns[SPIFFE_NAME_MAX];        /* service IDs only */
    char dc[SPIFFE_NAME_MAX];        /* service, agent, server, mesh gateway */
    char service[SPIFFE_NAME_MAX];   /* service IDs only */
};

/*
 * Parses <uri> (<len> bytes, need not be NUL-terminated). Path segments are percent-decoded.
 * Returns 0 with <out> filled, or ERR_BAD_SPIFFE for anything that is not a spiffe:// URI with
 * a non-empty trust domain (then <out> is unspecified).
 */
int spiffe_parse(const char *uri, size_t len, struct spiffe_id *out);

/*
 * Formats the service identity spiffe://<td>[/ap/<partition>]/ns/<ns>/dc/<dc>/svc/<service>
 * (the ap segment only when partition is non-empty and not "default"). Returns the length, or
 * -ENOSPC if <buf> is too small.
 */
int spiffe_format_service(char *buf, size_t len, const char *trust_domain, const char *partition,
                          const char *ns, const char *dc, const char *service);

/* Formats id like spiffe_format_service(). */
int spiffe_format(char *buf, size_t len, const struct spiffe_id *id);

/*
 * Formats the SNI name for a service target: <svc>.<ns>.<dc>.internal.<td>, or with a partition
 * other than default <svc>.<ns>.<partition>.<dc>.internal-v1.<td>; <subset> (may be NULL or "")
 * is prepended with a dot. Returns the length or -ENOSPC.
 */
int spiffe_format_sni(char *buf, size_t len, const char *subset, const char *service,
                      const char *ns, const char *partition, const char *dc,
                      const char *trust_domain);

/*
 * Compares two service identities: kind, namespace, datacenter, service and partition compare
 * case-insensitively (as Consul's Go SDK does); the trust domain is compared only when
 * <check_trust_domain> is non-zero. Returns 1 when they name the same service.
 */
int spiffe_same_service(const struct spiffe_id *a, const struct spiffe_id *b,
                        int check_trust_domain);

#endif
