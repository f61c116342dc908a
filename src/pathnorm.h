/*
 * pathnorm: what an inbound L7 request's path and header names become before per-request
 * authorization sees them, as the mesh config entry's HTTP.Incoming.RequestNormalization says
 * (Consul hands the same settings to Envoy's HTTP connection manager as normalize_path,
 * merge_slashes, path_with_escaped_slashes_action and headers_with_underscores_action).
 *
 * Pure: bytes in, bytes out into the caller's buffer; no allocation, no global state. Safe
 * from any thread.
 *
 * The path is normalized in Envoy's order:
 *   1. escaped slashes: %2F, %2f, %5C and %5c are kept, refused, or decoded to '/' and '\'
 *      (path_with_escaped_slashes_action); this step runs even with normalization off;
 *   2. unless InsecureDisablePathNormalization, RFC 3986 normalization as Envoy's
 *      normalize_path does it (the URL path canonicalizer Envoy takes from Chromium):
 *      '\' is a '/'; "." and ".." segments are removed (also when written %2E), and ".."
 *      never climbs above the root (it is dropped there, not refused); percent-encoded
 *      unreserved characters (ALPHA DIGIT - . _ ~) are decoded; other percent-encodings stay
 *      encoded with their hex digits upper-cased; bytes that may not appear raw in a path
 *      (controls, space, " < > ^ ` { | } DEL and bytes >= 0x80) are percent-encoded; a path
 *      that does not begin with '/' gets one;
 *   3. with MergeSlashes, runs of '/' become one.
 * Refused (-EBADMSG, the caller answers 400): a '%' not followed by two hex digits (stricter
 * than Envoy's legacy canonicalizer, which passes it on, and like its newer header
 * validator), an encoded or raw NUL, a '#' (Envoy refuses a fragment in a request path), and
 * with REJECT_REQUEST any escaped slash. Where Envoy's merge_slashes leaves a path of slashes
 * only ("//") as it is, the result here is "/".
 *
 * The caller passes the path alone: it cuts the request target at the first '?' (the query
 * is neither normalized nor matched, as in Envoy) and forwards "<normalized path>?<query>".
 */
#ifndef CONNECTD_PATHNORM_H
#define CONNECTD_PATHNORM_H

#include <stddef.h>
#include <sys/types.h>

#include "http.h"

/* PathWithEscapedSlashesAction. "" and IMPLEMENTATION_SPECIFIC_DEFAULT mean KEEP_UNCHANGED,
 * as in Envoy. */
enum pathnorm_escaped_slash {
    PATHNORM_SLASH_KEEP,
    PATHNORM_SLASH_REJECT,
    PATHNORM_SLASH_UNESCAPE_FORWARD,
    PATHNORM_SLASH_UNESCAPE_REDIRECT
};

/* HeadersWithUnderscoresAction; "" means ALLOW. */
enum pathnorm_underscore {
    PATHNORM_UNDERSCORE_ALLOW,
    PATHNORM_UNDERSCORE_REJECT,
    PATHNORM_UNDERSCORE_DROP
};

/* HTTP.Incoming.RequestNormalization; all zero = Consul's defaults. */
struct mesh_http_cfg {
    int disable_path_normalization; /* InsecureDisablePathNormalization */
    int merge_slashes;              /* MergeSlashes */
    enum pathnorm_escaped_slash escaped_slash;
    enum pathnorm_underscore underscore;
};

/* The most bytes pathnorm_path() can write for a <len>-byte path: each byte may become a
 * three-byte percent-encoding, and a path not beginning with '/' gets one. */
#define PATHNORM_OUT_MAX(len) (3 * (len) + 1)

/*
 * Normalizes the path part of an origin-form target <path> (<len> bytes, query not included)
 * into <out> (<cap> bytes, not NUL-terminated). Returns the output's length; -EBADMSG when the
 * request must be refused (400); -ENOSPC when <cap> is too small (PATHNORM_OUT_MAX(len)
 * always suffices). *<redirect> (not NULL) is set to 1 when the action is
 * UNESCAPE_AND_REDIRECT and escaped slashes were decoded (the caller answers 307 with the
 * normalized path and the query as Location), else 0. <path> and <out> must not overlap.
 */
ssize_t pathnorm_path(const struct mesh_http_cfg *cfg, const char *path, size_t len, char *out,
                      size_t cap, int *redirect);

/* What to do with a header named <name> under cfg->underscore: 0 keep it, 1 drop it,
 * -EBADMSG refuse the request (400). Only names with an '_' are dropped or refused. */
int pathnorm_header(const struct mesh_http_cfg *cfg, struct http_slice name);

/*
 * The whole of the entry's request normalization for one request, as authorization sees it
 * and as it is forwarded: the path part of <target> (up to its first '?') through
 * pathnorm_path() into <out>, then the query unchanged; and each of the <n> header names
 * through pathnorm_header(), those to drop flagged HTTP_HDR_DROP. <cap> must be at least
 * PATHNORM_OUT_MAX(target.len). Returns the length written to <out> (the target to forward),
 * with *<path_len> the length of its path part; -EBADMSG (400) with *<why> a static reason.
 * *<redirect> as for pathnorm_path().
 */
ssize_t pathnorm_request(const struct mesh_http_cfg *cfg, struct http_slice target,
                         struct http_header *h, size_t n, char *out, size_t cap, size_t *path_len,
                         int *redirect, const char **why);

/* The mesh config entry's spelling of each action ("KEEP_UNCHANGED", "ALLOW", ...); static. */
const char *pathnorm_escaped_slash_name(enum pathnorm_escaped_slash a);
const char *pathnorm_underscore_name(enum pathnorm_underscore a);

/* Reads the entry's spelling (exact, as Consul validates it; "" is the default) into *<out>:
 * 0, or -EINVAL for anything else. */
int pathnorm_escaped_slash_parse(const char *s, enum pathnorm_escaped_slash *out);
int pathnorm_underscore_parse(const char *s, enum pathnorm_underscore *out);

#endif
