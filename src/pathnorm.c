/*
 * pathnorm: request path normalization and the header-underscore policy.
 *
 * The path is read once, left to right. Escaped slashes are decoded on the fly (a token of
 * three input bytes that reads as '/' or '\'), so the dot-segment rules see exactly what
 * Envoy's canonicalizer sees after its escaped-slash pass, without a scratch buffer. The
 * dot-segment walk follows the one Envoy took from Chromium: a "." or ".." counts as a segment
 * only right after a '/' in the output, and ".." cuts the output back to the previous '/',
 * never past the first.
 */
#include "pathnorm.h"
#include "util.h"

#include <errno.h>
#include <string.h>

/* How a byte met raw in the path is written when normalizing. */
enum raw_class {
    RAW_COPY,   /* written as it is */
    RAW_ESCAPE, /* written as %XX: it may not appear raw in a path */
};

/* RFC 3986 unreserved: decoded when found percent-encoded. */
static int unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_' || c == '~';
}

/* The bytes Chromium's path table escapes ('%' is read as an encoding; NUL and '#' are
 * refused before this is asked). */
static enum raw_class raw_class(unsigned char c)
{
    if (c <= 0x20 || c >= 0x7f)
        return RAW_ESCAPE;
    switch (c) {
    case '"':
    case '<':
    case '>':
    case '?':
    case '^':
    case '`':
    case '{':
    case '|':
    case '}':
        return RAW_ESCAPE;
    default:
        return RAW_COPY;
    }
}

static const char HEX[] = "0123456789ABCDEF";

/* An escaped slash at <p>[i]: '/' or '\' for %2F %2f %5C %5c, else 0. */
static char escaped_slash_at(const char *p, size_t n, size_t i)
{
    if (i + 3 > n || p[i] != '%')
        return 0;
    if (p[i + 1] == '2' && (p[i + 2] == 'F' || p[i + 2] == 'f'))
        return '/';
    if (p[i + 1] == '5' && (p[i + 2] == 'C' || p[i + 2] == 'c'))
        return '\\';
    return 0;
}

/* The input as the normalizer reads it: the path, with escaped slashes decoded or not. */
struct in {
    const char *p;
    size_t n;
    int unescape; /* decode escaped slashes (UNESCAPE_AND_FORWARD / _AND_REDIRECT) */
};

/* The character at <i> and how many input bytes it takes (3 for a decoded escaped slash). */
static char peek(const struct in *in, size_t i, size_t *len)
{
    char s = in->unescape ? escaped_slash_at(in->p, in->n, i) : 0;
    *len = s ? 3 : 1;
    return s ? s : in->p[i];
}

static int is_slash_at(const struct in *in, size_t i)
{
    size_t l;
    if (i >= in->n)
        return 0;
    char c = peek(in, i, &l);
    return c == '/' || c == '\\';
}

/* A dot at <i>: 1 for '.', 3 for "%2E"/"%2e", else 0. */
static size_t dot_at(const struct in *in, size_t i)
{
    if (i >= in->n)
        return 0;
    if (in->p[i] == '.')
        return 1;
    if (i + 3 <= in->n && in->p[i] == '%' && in->p[i + 1] == '2' &&
        (in->p[i + 2] == 'e' || in->p[i + 2] == 'E'))
        return 3;
    return 0;
}

enum dot_kind { DOT_NAME, DOT_CUR, DOT_UP };

/*
 * Classifies the dot that ends just before <after> (it follows a '/' in the output): part of
 * a name, the current directory or the parent. *<consumed> gets the input bytes after the
 * first dot that belong to the segment (a second dot, a following slash).
 */
static enum dot_kind classify_dot(const struct in *in, size_t after, size_t *consumed)
{
    size_t l;
    *consumed = 0;
    if (after == in->n)
        return DOT_CUR;
    if (is_slash_at(in, after)) {
        peek(in, after, &l);
        *consumed = l;
        return DOT_CUR;
    }
    size_t d2 = dot_at(in, after);
    if (d2 == 0)
        return DOT_NAME;
    size_t after2 = after + d2;
    if (after2 == in->n) {
        *consumed = d2;
        return DOT_UP;
    }
    if (is_slash_at(in, after2)) {
        peek(in, after2, &l);
        *consumed = d2 + l;
        return DOT_UP;
    }
    return DOT_NAME;
}

/* Output with a capacity; <overflow> once anything did not fit. */
struct out {
    char *p;
    size_t len, cap;
    int overflow;
};

static void put(struct out *o, char c)
{
    if (o->len < o->cap)
        o->p[o->len++] = c;
    else
        o->overflow = 1;
}

static void put_escaped(struct out *o, unsigned char c)
{
    put(o, '%');
    put(o, HEX[c >> 4]);
    put(o, HEX[c & 15]);
}

/* Cuts the output (which ends in '/') back to the '/' before the last segment; never past the
 * first byte: ".." at the root stays at the root. */
static void back_up(struct out *o)
{
    if (o->len <= 1)
        return;
    size_t i = o->len - 2;
    while (i > 0 && o->p[i] != '/')
        i--;
    o->len = i + 1;
}

static int normalize(const struct in *in, struct out *o)
{
    if (in->n == 0 || !is_slash_at(in, 0))
        put(o, '/');
    for (size_t i = 0; i < in->n && !o->overflow;) {
        size_t tl;
        unsigned char c = (unsigned char)peek(in, i, &tl);
        size_t dl = tl == 1 ? dot_at(in, i) : 0;
        if (dl > 0) {
            size_t consumed = 0;
            enum dot_kind k = o->len > 0 && o->p[o->len - 1] == '/'
                                  ? classify_dot(in, i + dl, &consumed)
                                  : DOT_NAME;
            if (k == DOT_NAME) {
                put(o, '.');
                i += dl;
            } else {
                if (k == DOT_UP)
                    back_up(o);
                i += dl + consumed;
            }
            continue;
        }
        i += tl;
        if (c == '/' || c == '\\') {
            put(o, '/');
        } else if (c == '%') {
            int hi = i < in->n ? util_hexval(in->p[i]) : -1;
            int lo = i + 1 < in->n ? util_hexval(in->p[i + 1]) : -1;
            if (hi < 0 || lo < 0)
                return -EBADMSG; /* not a percent-encoding: refused rather than guessed at */
            unsigned char v = (unsigned char)(hi << 4 | lo);
            i += 2;
            if (v == 0)
                return -EBADMSG;
            if (unreserved(v))
                put(o, (char)v);
            else
                put_escaped(o, v); /* kept encoded, hex upper-cased */
        } else if (raw_class(c) == RAW_ESCAPE) {
            put_escaped(o, c);
        } else {
            put(o, (char)c);
        }
    }
    return 0;
}

/* Normalization off: the escaped-slash step only. */
static void copy(const struct in *in, struct out *o)
{
    for (size_t i = 0; i < in->n && !o->overflow;) {
        size_t tl;
        put(o, peek(in, i, &tl));
        i += tl;
    }
}

static void merge_slashes(struct out *o)
{
    size_t w = 0;
    for (size_t r = 0; r < o->len; r++) {
        if (o->p[r] == '/' && w > 0 && o->p[w - 1] == '/')
            continue;
        o->p[w++] = o->p[r];
    }
    o->len = w;
}

ssize_t pathnorm_path(const struct mesh_http_cfg *cfg, const char *path, size_t len, char *out,
                      size_t cap, int *redirect)
{
    struct in in = {.p = path, .n = len};
    struct out o = {.p = out, .cap = cap};
    int found = 0;
    *redirect = 0;
    /* A fragment never belongs in a request target; a NUL ends a path in too many places. */
    if (len > 0 && (memchr(path, '#', len) != NULL || memchr(path, '\0', len) != NULL))
        return -EBADMSG;
    for (size_t i = 0; i + 3 <= len && !found; i++)
        found = escaped_slash_at(path, len, i) != 0;
    if (found && cfg->escaped_slash == PATHNORM_SLASH_REJECT)
        return -EBADMSG;
    in.unescape = found && (cfg->escaped_slash == PATHNORM_SLASH_UNESCAPE_FORWARD ||
                            cfg->escaped_slash == PATHNORM_SLASH_UNESCAPE_REDIRECT);
    if (cfg->disable_path_normalization) {
        copy(&in, &o);
    } else {
        int rc = normalize(&in, &o);
        if (rc != 0)
            return rc;
    }
    if (o.overflow)
        return -ENOSPC;
    if (cfg->merge_slashes)
        merge_slashes(&o);
    *redirect = in.unescape && cfg->escaped_slash == PATHNORM_SLASH_UNESCAPE_REDIRECT;
    return (ssize_t)o.len;
}

int pathnorm_header(const struct mesh_http_cfg *cfg, struct http_slice name)
{
    if (cfg->underscore == PATHNORM_UNDERSCORE_ALLOW || name.len == 0 ||
        memchr(name.p, '_', name.len) == NULL)
        return 0;
    return cfg->underscore == PATHNORM_UNDERSCORE_DROP ? 1 : -EBADMSG;
}

static const char *const SLASH_NAMES[] = {
    [PATHNORM_SLASH_KEEP] = "KEEP_UNCHANGED",
    [PATHNORM_SLASH_REJECT] = "REJECT_REQUEST",
    [PATHNORM_SLASH_UNESCAPE_FORWARD] = "UNESCAPE_AND_FORWARD",
    [PATHNORM_SLASH_UNESCAPE_REDIRECT] = "UNESCAPE_AND_REDIRECT",
};

static const char *const UNDERSCORE_NAMES[] = {
    [PATHNORM_UNDERSCORE_ALLOW] = "ALLOW",
    [PATHNORM_UNDERSCORE_REJECT] = "REJECT_REQUEST",
    [PATHNORM_UNDERSCORE_DROP] = "DROP_HEADER",
};

const char *pathnorm_escaped_slash_name(enum pathnorm_escaped_slash a)
{
    return (unsigned)a < sizeof(SLASH_NAMES) / sizeof(SLASH_NAMES[0]) ? SLASH_NAMES[a] : "?";
}

const char *pathnorm_underscore_name(enum pathnorm_underscore a)
{
    return (unsigned)a < sizeof(UNDERSCORE_NAMES) / sizeof(UNDERSCORE_NAMES[0])
               ? UNDERSCORE_NAMES[a]
               : "?";
}

int pathnorm_escaped_slash_parse(const char *s, enum pathnorm_escaped_slash *out)
{
    if (s[0] == '\0' || strcmp(s, "IMPLEMENTATION_SPECIFIC_DEFAULT") == 0) {
        *out = PATHNORM_SLASH_KEEP;
        return 0;
    }
    for (unsigned i = 0; i < sizeof(SLASH_NAMES) / sizeof(SLASH_NAMES[0]); i++) {
        if (strcmp(s, SLASH_NAMES[i]) == 0) {
            *out = (enum pathnorm_escaped_slash)i;
            return 0;
        }
    }
    return -EINVAL;
}

int pathnorm_underscore_parse(const char *s, enum pathnorm_underscore *out)
{
    if (s[0] == '\0') {
        *out = PATHNORM_UNDERSCORE_ALLOW;
        return 0;
    }
    for (unsigned i = 0; i < sizeof(UNDERSCORE_NAMES) / sizeof(UNDERSCORE_NAMES[0]); i++) {
        if (strcmp(s, UNDERSCORE_NAMES[i]) == 0) {
            *out = (enum pathnorm_underscore)i;
            return 0;
        }
    }
    return -EINVAL;
}

ssize_t pathnorm_request(const struct mesh_http_cfg *cfg, struct http_slice target,
                         struct http_header *h, size_t n, char *out, size_t cap, size_t *path_len,
                         int *redirect, const char **why)
{
    *redirect = 0;
    for (size_t i = 0; i < n; i++) {
        int rc = pathnorm_header(cfg, h[i].name);
        if (rc < 0) {
            *why = "a header name with an underscore";
            return -EBADMSG;
        }
        if (rc == 1)
            h[i].flags |= HTTP_HDR_DROP;
    }
    const char *t = target.p != NULL ? target.p : "";
    const char *q = memchr(t, '?', target.len);
    size_t plen = q != NULL ? (size_t)(q - t) : target.len;
    if (cap < PATHNORM_OUT_MAX(target.len)) {
        *why = "no room for the normalized path";
        return -EBADMSG;
    }
    ssize_t w = pathnorm_path(cfg, t, plen, out, cap, redirect);
    if (w < 0) {
        *why = "a path request normalization refuses";
        return -EBADMSG;
    }
    *path_len = (size_t)w;
    if (q != NULL) {
        size_t qlen = target.len - plen; /* with the '?' */
        memcpy(out + w, q, qlen);
        w += (ssize_t)qlen;
    }
    return w;
}
