/*
 * spiffe: Consul's SPIFFE identities and SNI names.
 *
 * The parser follows consul:agent/connect/uri.go: the path is matched segment by segment on its
 * raw (still percent-encoded) form, the way Go matches its regexes against RawPath, and only the
 * captured segments are decoded. It is stricter than Go's url.Parse in a few places that never
 * matter for identities Consul issues (no query, fragment, user info or port; no bytes outside
 * printable ASCII), because every one of those is a way to make two strings name one identity.
 */
#include "spiffe.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "util.h"

#define SCHEME     "spiffe://"
#define SCHEME_LEN (sizeof(SCHEME) - 1)

/* The most path segments any known kind has: ap/<p>/agent/client/dc/<dc>/id/<node>. */
#define MAX_SEGS 8

struct seg {
    const char *p;
    size_t len;
};

/*
 * Checks that <s> is well-formed percent-encoding and, when <out> is non-NULL, decodes it into
 * <out> (SPIFFE_NAME_MAX bytes). A decoded NUL is refused: it would silently cut the C string.
 */
static int decode_seg(const char *s, size_t len, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '%') {
            if (len - i < 3)
                return ERR_BAD_SPIFFE;
            int hi = util_hexval(s[i + 1]), lo = util_hexval(s[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
                return ERR_BAD_SPIFFE;
            c = (char)(hi << 4 | lo);
            i += 2;
        }
        if (out != NULL) {
            if (o + 1 >= SPIFFE_NAME_MAX)
                return ERR_BAD_SPIFFE;
            out[o] = c;
        }
        o++;
    }
    if (out != NULL)
        out[o] = '\0';
    return 0;
}

static int seg_is(const struct seg *s, const char *word)
{
    size_t n = strlen(word);
    return s->len == n && memcmp(s->p, word, n) == 0;
}

/* Trust domain characters: what SPIFFE allows, plus upper case (Go does not fold the host). */
static int td_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '-' || c == '_';
}

/* Bytes allowed anywhere in the path before decoding: printable ASCII but no query/fragment. */
static int path_char(char c)
{
    return c > 0x20 && c < 0x7f && c != '?' && c != '#';
}

/*
 * Matches the segments after an optional ap/<partition> prefix against the known kinds and fills
 * <out>. Anything unknown is SPIFFE_OTHER, which is still a successful parse.
 */
static int match_kind(const struct seg *sg, size_t n, struct spiffe_id *out)
{
    size_t b = 0;
    const struct seg *ap = NULL;
    if (n >= 2 && seg_is(&sg[0], "ap")) {
        ap = &sg[1];
        b = 2;
    }
    const struct seg *s = sg + b;
    size_t m = n - b;
    int rc;

    if (m == 6 && seg_is(&s[0], "ns") && seg_is(&s[2], "dc") && seg_is(&s[4], "svc")) {
        out->kind = SPIFFE_SERVICE;
        if ((rc = decode_seg(s[1].p, s[1].len, out->ns)) != 0 ||
            (rc = decode_seg(s[3].p, s[3].len, out->dc)) != 0 ||
            (rc = decode_seg(s[5].p, s[5].len, out->service)) != 0)
            return rc;
    } else if (m == 6 && seg_is(&s[0], "agent") && seg_is(&s[1], "client") && seg_is(&s[2], "dc") &&
               seg_is(&s[4], "id")) {
        out->kind = SPIFFE_AGENT;
        if ((rc = decode_seg(s[3].p, s[3].len, out->dc)) != 0)
            return rc;
    } else if (ap == NULL && m == 4 && seg_is(&s[0], "agent") && seg_is(&s[1], "server") &&
               seg_is(&s[2], "dc")) {
        out->kind = SPIFFE_SERVER;
        if ((rc = decode_seg(s[3].p, s[3].len, out->dc)) != 0)
            return rc;
    } else if (m == 4 && seg_is(&s[0], "gateway") && seg_is(&s[1], "mesh") && seg_is(&s[2], "dc")) {
        out->kind = SPIFFE_MESH_GATEWAY;
        if ((rc = decode_seg(s[3].p, s[3].len, out->dc)) != 0)
            return rc;
    } else {
        out->kind = SPIFFE_OTHER;
        return 0;
    }
    if (ap != NULL)
        return decode_seg(ap->p, ap->len, out->partition);
    return 0;
}

int spiffe_parse(const char *uri, size_t len, struct spiffe_id *out)
{
    memset(out, 0, sizeof(*out));
    if (uri == NULL || len < SCHEME_LEN || strncasecmp(uri, SCHEME, SCHEME_LEN) != 0)
        return ERR_BAD_SPIFFE;

    const char *td = uri + SCHEME_LEN, *end = uri + len;
    const char *p = td;
    while (p < end && *p != '/') {
        if (!td_char(*p))
            return ERR_BAD_SPIFFE;
        p++;
    }
    size_t td_len = (size_t)(p - td);
    if (td_len == 0 || td_len >= SPIFFE_NAME_MAX)
        return ERR_BAD_SPIFFE;
    memcpy(out->trust_domain, td, td_len);
    out->trust_domain[td_len] = '\0';
    memcpy(out->partition, "default", sizeof("default"));

    if (p == end) {
        /* Go accepts a path-less ID as the signing ID only when the host has a dot past its
         * first byte (cluster-id.domain). */
        const char *dot = memchr(td, '.', td_len);
        out->kind = dot != NULL && dot != td ? SPIFFE_SIGNING : SPIFFE_OTHER;
        return 0;
    }

    /* Split the path into raw segments, validating every byte and escape on the way. */
    struct seg sg[MAX_SEGS];
    size_t n = 0;
    int too_many = 0;
    while (p < end) {
        const char *s = ++p; /* skip the '/' */
        while (p < end && *p != '/') {
            if (!path_char(*p))
                return ERR_BAD_SPIFFE;
            p++;
        }
        size_t slen = (size_t)(p - s);
        if (decode_seg(s, slen, NULL) != 0)
            return ERR_BAD_SPIFFE;
        if (slen == 0 || n == MAX_SEGS)
            too_many = 1; /* an empty segment or a long path: no kind we know */
        else
            sg[n++] = (struct seg){s, slen};
    }
    if (too_many) {
        out->kind = SPIFFE_OTHER;
        return 0;
    }
    int rc = match_kind(sg, n, out);
    if (rc != 0)
        memset(out, 0, sizeof(*out));
    return rc;
}

/* Path characters Go's url.URL.EscapedPath leaves alone; '/' is escaped since we encode a
 * single segment. */
static int path_safe(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != '\0' && strchr("-._~$&+,:;=@", c) != NULL);
}

struct out {
    char *buf;
    size_t len, pos;
};

static void put(struct out *o, const char *s, size_t n)
{
    if (o->pos < o->len)
        memcpy(o->buf + o->pos, s, MIN(n, o->len - o->pos));
    o->pos += n;
}

static void put_str(struct out *o, const char *s)
{
    put(o, s, strlen(s));
}

static void put_escaped(struct out *o, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (path_safe(c)) {
            put(o, s, 1);
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            put(o, e, 3);
        }
    }
}

/* NUL-terminates and returns the length, or -ENOSPC when the text and its NUL do not fit. */
static int finish(struct out *o)
{
    if (o->pos >= o->len || o->pos > (size_t)0x7fffffff) {
        if (o->len > 0)
            o->buf[0] = '\0';
        return -ENOSPC;
    }
    o->buf[o->pos] = '\0';
    return (int)o->pos;
}

static int is_default(const char *s)
{
    return s == NULL || s[0] == '\0' || strcasecmp(s, "default") == 0;
}

static const char *or_default(const char *s)
{
    return s == NULL || s[0] == '\0' ? "default" : s;
}

int spiffe_format_service(char *buf, size_t len, const char *trust_domain, const char *partition,
                          const char *ns, const char *dc, const char *service)
{
    struct out o = {buf, len, 0};
    put_str(&o, SCHEME);
    put_str(&o, trust_domain);
    if (!is_default(partition)) {
        put_str(&o, "/ap/");
        put_escaped(&o, partition);
    }
    /* As Consul's NamespaceOrDefault: the namespace segment is never empty. */
    put_str(&o, "/ns/");
    put_escaped(&o, or_default(ns));
    put_str(&o, "/dc/");
    put_escaped(&o, dc);
    put_str(&o, "/svc/");
    put_escaped(&o, service);
    return finish(&o);
}

int spiffe_format(char *buf, size_t len, const struct spiffe_id *id)
{
    return spiffe_format_service(buf, len, id->trust_domain, id->partition, id->ns, id->dc,
                                 id->service);
}

int spiffe_format_sni(char *buf, size_t len, const char *subset, const char *service,
                      const char *ns, const char *partition, const char *dc,
                      const char *trust_domain)
{
    struct out o = {buf, len, 0};
    if (subset != NULL && subset[0] != '\0') {
        put_str(&o, subset);
        put_str(&o, ".");
    }
    put_str(&o, service);
    put_str(&o, ".");
    put_str(&o, or_default(ns));
    put_str(&o, ".");
    if (!is_default(partition)) {
        put_str(&o, partition);
        put_str(&o, ".");
        put_str(&o, dc);
        put_str(&o, ".internal-v1.");
    } else {
        put_str(&o, dc);
        put_str(&o, ".internal.");
    }
    put_str(&o, trust_domain);
    return finish(&o);
}

static int same_or_default(const char *a, const char *b)
{
    return strcasecmp(or_default(a), or_default(b)) == 0;
}

int spiffe_same_service(const struct spiffe_id *a, const struct spiffe_id *b,
                        int check_trust_domain)
{
    if (a->kind != SPIFFE_SERVICE || b->kind != SPIFFE_SERVICE)
        return 0;
    if (check_trust_domain && strcasecmp(a->trust_domain, b->trust_domain) != 0)
        return 0;
    return same_or_default(a->partition, b->partition) && same_or_default(a->ns, b->ns) &&
           strcasecmp(a->dc, b->dc) == 0 && strcasecmp(a->service, b->service) == 0;
}
