/*
 * h1parse: the strict HTTP/1.1 head parser, chunked decoder and head serializer (h1parse.h
 * lists the rules). A head is parsed in two passes: the first splits it into lines and checks
 * every byte against its RFC 9110/9112 class; the second reads the fields that decide
 * framing and connection handling, where the smuggling rules live.
 */
#include "h1parse.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

#include "util.h"

#define FAIL(reason)                                                                               \
    do {                                                                                           \
        *why = (reason);                                                                           \
        return -EBADMSG;                                                                           \
    } while (0)

/*
 * The byte classes, one table lookup per byte of a head (this runs for every byte of every
 * request and response). Built at compile time from the RFC's definitions below.
 */
enum {
    CL_TCHAR = 1,    /* tchar (RFC 9110 section 5.6.2) */
    CL_FIELD = 2,    /* field-vchar / SP / HTAB (section 5.5): obs-text allowed, controls not */
    CL_LINE_END = 4, /* CR, LF, NUL: where next_line() stops to look */
    CL_AUTHORITY = 8 /* reg-name, IPv4 and IP-literal bytes, and ':' (RFC 3986) */
};

#define ALNUM_(c)                                                                                  \
    (((c) >= '0' && (c) <= '9') || ((c) >= 'a' && (c) <= 'z') || ((c) >= 'A' && (c) <= 'Z'))
#define TCHAR_(c)                                                                                  \
    (ALNUM_(c) || (c) == '!' || (c) == '#' || (c) == '$' || (c) == '%' || (c) == '&' ||            \
     (c) == '\'' || (c) == '*' || (c) == '+' || (c) == '-' || (c) == '.' || (c) == '^' ||          \
     (c) == '_' || (c) == '`' || (c) == '|' || (c) == '~')
#define FIELD_(c) ((c) == '\t' || ((c) >= 0x20 && (c) != 0x7f))
#define AUTHORITY_(c)                                                                              \
    (ALNUM_(c) || (c) == '-' || (c) == '.' || (c) == '_' || (c) == '~' || (c) == '!' ||            \
     (c) == '$' || (c) == '&' || (c) == '\'' || (c) == '(' || (c) == ')' || (c) == '*' ||          \
     (c) == '+' || (c) == ',' || (c) == ';' || (c) == '=' || (c) == ':' || (c) == '[' ||           \
     (c) == ']' || (c) == '%')
#define CLASS_(c)                                                                                  \
    ((TCHAR_(c) ? CL_TCHAR : 0) | (FIELD_(c) ? CL_FIELD : 0) |                                     \
     ((c) == '\r' || (c) == '\n' || (c) == 0 ? CL_LINE_END : 0) |                                  \
     (AUTHORITY_(c) ? CL_AUTHORITY : 0))
#define ROW_(b)                                                                                    \
    CLASS_((b) + 0), CLASS_((b) + 1), CLASS_((b) + 2), CLASS_((b) + 3), CLASS_((b) + 4),           \
        CLASS_((b) + 5), CLASS_((b) + 6), CLASS_((b) + 7), CLASS_((b) + 8), CLASS_((b) + 9),       \
        CLASS_((b) + 10), CLASS_((b) + 11), CLASS_((b) + 12), CLASS_((b) + 13), CLASS_((b) + 14),  \
        CLASS_((b) + 15)

static const unsigned char byte_class[256] = {
    ROW_(0x00), ROW_(0x10), ROW_(0x20), ROW_(0x30), ROW_(0x40), ROW_(0x50), ROW_(0x60), ROW_(0x70),
    ROW_(0x80), ROW_(0x90), ROW_(0xa0), ROW_(0xb0), ROW_(0xc0), ROW_(0xd0), ROW_(0xe0), ROW_(0xf0),
};

static inline int is_tchar(unsigned char c)
{
    return byte_class[c] & CL_TCHAR;
}

static inline int is_field_char(unsigned char c)
{
    return byte_class[c] & CL_FIELD;
}

static int is_ows(unsigned char c)
{
    return c == ' ' || c == '\t';
}

static unsigned char lower(unsigned char c)
{
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c + 32) : c;
}

static int slice_eq_slice(struct http_slice a, struct http_slice b)
{
    if (a.len != b.len)
        return 0;
    for (size_t i = 0; i < a.len; i++)
        if (lower((unsigned char)a.p[i]) != lower((unsigned char)b.p[i]))
            return 0;
    return 1;
}

static int all_tchar(const char *p, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!is_tchar((unsigned char)p[i]))
            return 0;
    return 1;
}

/*
 * Finds the line starting at <pos>: sets *<end> to its CR. Returns 0, -EAGAIN when the line
 * is incomplete within <lim> bytes, -EBADMSG for a bare CR, a bare LF or a NUL (each refused
 * wherever it appears, so no later pass can read it differently).
 */
static int next_line(const char *buf, size_t lim, size_t pos, size_t *end, const char **why)
{
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    size_t i = pos;
    /* Eight bytes at a time to the first word holding a CR, an LF or a NUL ("has a zero
     * byte" on the word and on its XOR with each of the first two). The lowest flagged byte
     * is exact (only bytes after a match can be flagged wrongly): on a little-endian machine
     * it is the first such byte of the line. */
    for (; i + 8 <= lim; i += 8) {
        uint64_t x, cr, lf, hit;
        memcpy(&x, buf + i, 8);
        cr = x ^ (ones * '\r');
        lf = x ^ (ones * '\n');
        hit = (((x - ones) & ~x) | ((cr - ones) & ~cr) | ((lf - ones) & ~lf)) & highs;
        if (hit != 0) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            i += (size_t)__builtin_ctzll(hit) / 8;
#endif
            break;
        }
    }
    for (; i < lim; i++) {
        if (!(byte_class[(unsigned char)buf[i]] & CL_LINE_END))
            continue;
        if (buf[i] == '\r') {
            if (i + 1 == lim)
                return -EAGAIN;
            if (buf[i + 1] != '\n')
                FAIL("bare CR");
            *end = i;
            return 0;
        }
        if (buf[i] == '\n')
            FAIL("bare LF (lines end in CRLF)");
        FAIL("NUL in head");
    }
    return -EAGAIN;
}

/* "HTTP/1.0" or "HTTP/1.1". */
static int parse_version(const char *p, size_t n, int *minor)
{
    if (n != 8 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1'))
        return -1;
    *minor = p[7] - '0';
    return 0;
}

/*
 * Whether every byte of <p> is a field-value byte (is_field_char()). Eight bytes at a time:
 * every field value of every head goes through here. A word with a byte below 0x20 or equal
 * to 0x7f (tab included, which is allowed) is looked at byte by byte.
 */
static int field_value_ok(const char *p, size_t n)
{
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x, y;
        memcpy(&x, p + i, 8);
        y = x ^ (ones * 0x7f);
        /* The classic "has a byte less than k" test, exact for bytes below 0x80. */
        if ((((x - ones * 0x20) & ~x) | ((y - ones) & ~y)) & highs) {
            for (size_t j = i; j < i + 8; j++)
                if (!is_field_char((unsigned char)p[j]))
                    return 0;
        }
    }
    for (; i < n; i++)
        if (!is_field_char((unsigned char)p[i]))
            return 0;
    return 1;
}

/*
 * Splits the field lines from <pos> to the blank line into <hdrs>. Returns the head's length,
 * -EAGAIN, -EBADMSG or -EMSGSIZE.
 */
static int parse_fields(const char *buf, size_t len, size_t head_max, size_t pos,
                        struct http_header *hdrs, size_t cap, size_t *nhdrs, const char **why)
{
    size_t lim = len < head_max ? len : head_max;
    size_t n = 0;
    for (;;) {
        size_t end;
        int rc = next_line(buf, lim, pos, &end, why);
        if (rc == -EAGAIN && len >= head_max) {
            *why = "head too large";
            return -EMSGSIZE;
        }
        if (rc < 0)
            return rc;
        if (end == pos) {
            *nhdrs = n;
            return (int)(end + 2);
        }
        const char *line = buf + pos;
        size_t ll = end - pos;
        if (is_ows((unsigned char)line[0]))
            FAIL("obs-fold (a field line starting with whitespace)");
        size_t colon = 0;
        while (colon < ll && is_tchar((unsigned char)line[colon]))
            colon++;
        if (colon == ll)
            FAIL("field line without a colon");
        if (line[colon] != ':') {
            if (is_ows((unsigned char)line[colon]))
                FAIL("whitespace before a field's colon");
            FAIL("field name is not a token");
        }
        if (colon == 0)
            FAIL("empty field name");
        size_t vs = colon + 1, ve = ll;
        if (!field_value_ok(line + vs, ll - vs))
            FAIL("control character in a field value");
        while (vs < ve && is_ows((unsigned char)line[vs]))
            vs++;
        while (ve > vs && is_ows((unsigned char)line[ve - 1]))
            ve--;
        if (n == cap) {
            *why = "too many header fields";
            return -EMSGSIZE;
        }
        hdrs[n].name = (struct http_slice){line, colon};
        hdrs[n].value = (struct http_slice){line + vs, ve - vs};
        hdrs[n].flags = 0;
        n++;
        pos = end + 2;
    }
}

/* What the framing and connection fields of a head say (shared by requests and responses). */
struct fields {
    int minor_version;
    int has_cl, has_te;
    uint64_t cl;
    struct http_slice cl_value;
    size_t nhost;
    struct http_slice host, upgrade;
    unsigned flags;
    struct http_slice *tokens;
    size_t ntokens;
};

/* 1*DIGIT, below 2^62 so that any sum of lengths stays far from overflow. */
static int parse_length(struct http_slice v, uint64_t *out)
{
    uint64_t x = 0;
    if (v.len == 0 || v.len > 18)
        return -1;
    for (size_t i = 0; i < v.len; i++) {
        if (v.p[i] < '0' || v.p[i] > '9')
            return -1;
        x = x * 10 + (uint64_t)(v.p[i] - '0');
    }
    *out = x;
    return 0;
}

/* A #token list (RFC 9110 section 5.6.1): empty elements are allowed, anything else is not. */
static int parse_conn_tokens(struct http_slice v, struct fields *f, const char **why)
{
    size_t i = 0;
    while (i < v.len) {
        while (i < v.len && (is_ows((unsigned char)v.p[i]) || v.p[i] == ','))
            i++;
        size_t s = i;
        while (i < v.len && is_tchar((unsigned char)v.p[i]))
            i++;
        if (i == s) {
            if (i < v.len)
                FAIL("Connection is not a token list");
            break;
        }
        struct http_slice t = {v.p + s, i - s};
        while (i < v.len && is_ows((unsigned char)v.p[i]))
            i++;
        if (i < v.len && v.p[i] != ',')
            FAIL("Connection is not a token list");
        if (f->ntokens == HTTP_CONN_TOKENS_MAX)
            FAIL("too many Connection tokens");
        f->tokens[f->ntokens++] = t;
        if (h1_slice_eq(t, "close"))
            f->flags |= HTTP_F_CONN_CLOSE;
        else if (h1_slice_eq(t, "keep-alive"))
            f->flags |= HTTP_F_KEEP_ALIVE;
        else if (h1_slice_eq(t, "upgrade"))
            f->flags |= HTTP_F_UPGRADE;
    }
    return 0;
}

/* The field names read_fields() acts on. */
enum known_name {
    NAME_OTHER,
    NAME_CONTENT_LENGTH,
    NAME_TRANSFER_ENCODING,
    NAME_CONNECTION,
    NAME_HOST,
    NAME_UPGRADE,
    NAME_EXPECT,
    NAME_HOP, /* the other standard hop-by-hop fields: Keep-Alive, Proxy-Connection, TE, Trailer */
};

/* One switch on the length per field, then at most two comparisons. */
static enum known_name name_of(struct http_slice n)
{
    switch (n.len) {
    case 2:
        return h1_slice_eq(n, "te") ? NAME_HOP : NAME_OTHER;
    case 4:
        return h1_slice_eq(n, "host") ? NAME_HOST : NAME_OTHER;
    case 6:
        return h1_slice_eq(n, "expect") ? NAME_EXPECT : NAME_OTHER;
    case 7:
        if (h1_slice_eq(n, "upgrade"))
            return NAME_UPGRADE;
        return h1_slice_eq(n, "trailer") ? NAME_HOP : NAME_OTHER;
    case 10:
        if (h1_slice_eq(n, "connection"))
            return NAME_CONNECTION;
        return h1_slice_eq(n, "keep-alive") ? NAME_HOP : NAME_OTHER;
    case 14:
        return h1_slice_eq(n, "content-length") ? NAME_CONTENT_LENGTH : NAME_OTHER;
    case 16:
        return h1_slice_eq(n, "proxy-connection") ? NAME_HOP : NAME_OTHER;
    case 17:
        return h1_slice_eq(n, "transfer-encoding") ? NAME_TRANSFER_ENCODING : NAME_OTHER;
    default:
        return NAME_OTHER;
    }
}

/*
 * Reads the fields that matter to a proxy and applies the smuggling rules. A Connection token
 * may make any field hop-by-hop except Content-Length and Host: dropping either while still
 * framing or routing by it would make the next hop read a different message.
 */
static int read_fields(struct http_header *h, size_t n, int is_request, struct fields *f,
                       const char **why)
{
    for (size_t i = 0; i < n; i++) {
        struct http_slice v = h[i].value;
        enum known_name k = name_of(h[i].name);
        if (k == NAME_HOP) {
            h[i].flags |= HTTP_HDR_HOP;
        } else if (k == NAME_CONTENT_LENGTH) {
            uint64_t x;
            if (parse_length(v, &x) != 0)
                FAIL("bad Content-Length");
            /* Duplicates must be byte-identical: "3" and "03" are refused, not folded. */
            if (f->has_cl && (v.len != f->cl_value.len || memcmp(v.p, f->cl_value.p, v.len) != 0))
                FAIL("differing Content-Lengths");
            if (f->has_cl)
                h[i].flags |= HTTP_HDR_DUP;
            f->has_cl = 1;
            f->cl = x;
            f->cl_value = v;
        } else if (k == NAME_TRANSFER_ENCODING) {
            h[i].flags |= HTTP_HDR_HOP;
            if (f->has_te || !h1_slice_eq(v, "chunked"))
                FAIL("Transfer-Encoding other than one chunked");
            f->has_te = 1;
        } else if (k == NAME_CONNECTION) {
            h[i].flags |= HTTP_HDR_HOP;
            int rc = parse_conn_tokens(v, f, why);
            if (rc < 0)
                return rc;
        } else if (k == NAME_HOST) {
            f->nhost++;
            f->host = v;
        } else if (k == NAME_UPGRADE) {
            h[i].flags |= HTTP_HDR_HOP;
            f->upgrade = v;
        } else if (is_request && k == NAME_EXPECT) {
            if (h1_slice_eq(v, "100-continue"))
                f->flags |= HTTP_F_EXPECT_CONTINUE;
            else
                f->flags |= HTTP_F_EXPECT_OTHER;
        }
    }
    if (f->has_cl && f->has_te)
        FAIL("both Content-Length and Transfer-Encoding");
    if (f->has_te && f->minor_version == 0)
        FAIL("Transfer-Encoding in HTTP/1.0");
    /* The standard hop-by-hop fields were flagged above; now those named by a token. */
    for (size_t i = 0; f->ntokens > 0 && i < n; i++) {
        enum known_name k;
        if ((h[i].flags & HTTP_HDR_HOP) || (k = name_of(h[i].name)) == NAME_CONTENT_LENGTH ||
            k == NAME_HOST)
            continue;
        for (size_t t = 0; t < f->ntokens; t++)
            if (slice_eq_slice(h[i].name, f->tokens[t]))
                h[i].flags |= HTTP_HDR_HOP;
    }
    /* HTTP/1.1 is persistent unless closed; HTTP/1.0 only when keep-alive was asked for. */
    if (f->flags & HTTP_F_CONN_CLOSE)
        f->flags &= ~HTTP_F_KEEP_ALIVE;
    else if (f->minor_version == 1)
        f->flags |= HTTP_F_KEEP_ALIVE;
    if (!(f->flags & HTTP_F_UPGRADE) || f->upgrade.p == NULL || f->minor_version == 0)
        f->flags &= ~HTTP_F_UPGRADE;
    /* An HTTP/1.0 client cannot know 100 Continue: it sends the body anyway (RFC 9110
     * section 10.1.1 says to ignore the expectation). */
    if (f->minor_version == 0)
        f->flags &= ~(HTTP_F_EXPECT_CONTINUE | HTTP_F_EXPECT_OTHER);
    return 0;
}

/* uri-host [":" port] with the characters of reg-name, IPv4 and IP-literal (RFC 3986). */
static int valid_authority(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!(byte_class[(unsigned char)p[i]] & CL_AUTHORITY))
            return 0;
    return 1;
}

static int classify_target(struct http_request *req, const char **why)
{
    const char *t = req->target.p;
    size_t n = req->target.len;
    if (req->method == HTTP_METHOD_CONNECT) {
        /* host ":" port, where port is required. */
        const char *colon = memrchr(t, ':', n);
        if (colon == NULL || colon == t || colon + 1 == t + n || !valid_authority(t, n))
            FAIL("CONNECT target is not host:port");
        for (const char *q = colon + 1; q < t + n; q++)
            if (*q < '0' || *q > '9')
                FAIL("CONNECT target is not host:port");
        req->target_form = HTTP_TARGET_AUTHORITY;
        return 0;
    }
    if (t[0] == '/') {
        req->target_form = HTTP_TARGET_ORIGIN;
        return 0;
    }
    if (n == 1 && t[0] == '*') {
        if (req->method != HTTP_METHOD_OPTIONS)
            FAIL("asterisk target outside OPTIONS");
        req->target_form = HTTP_TARGET_ASTERISK;
        return 0;
    }
    /* scheme ":" hier-part: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) then "://". */
    size_t i = 0;
    unsigned char c0 = lower((unsigned char)t[0]);
    if (!(c0 >= 'a' && c0 <= 'z'))
        FAIL("bad request target");
    while (i < n) {
        unsigned char c = lower((unsigned char)t[i]);
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '-' || c == '.'))
            break;
        i++;
    }
    if (i + 3 > n || memcmp(t + i, "://", 3) != 0)
        FAIL("bad request target");
    req->target_form = HTTP_TARGET_ABSOLUTE;
    return 0;
}

static const struct {
    const char *name;
    enum http_method m;
} methods[] = {
    {"GET", HTTP_METHOD_GET},         {"HEAD", HTTP_METHOD_HEAD},
    {"POST", HTTP_METHOD_POST},       {"PUT", HTTP_METHOD_PUT},
    {"DELETE", HTTP_METHOD_DELETE},   {"CONNECT", HTTP_METHOD_CONNECT},
    {"OPTIONS", HTTP_METHOD_OPTIONS}, {"TRACE", HTTP_METHOD_TRACE},
    {"PATCH", HTTP_METHOD_PATCH},
};

/* Methods are case-sensitive (RFC 9110 section 9.1). */
static enum http_method method_of(struct http_slice s)
{
    for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
        if (strlen(methods[i].name) == s.len && memcmp(methods[i].name, s.p, s.len) == 0)
            return methods[i].m;
    return HTTP_METHOD_OTHER;
}

static int parse_request(const char *buf, size_t len, size_t head_max, struct http_request *req,
                         const char **why)
{
    size_t lim = len < head_max ? len : head_max, end;
    int rc = next_line(buf, lim, 0, &end, why);
    if (rc == -EAGAIN && len >= head_max) {
        *why = "head too large";
        return -EMSGSIZE;
    }
    if (rc < 0)
        return rc;
    /* method SP request-target SP HTTP-version, single spaces. */
    const char *sp1 = memchr(buf, ' ', end);
    if (sp1 == NULL)
        FAIL("bad request line");
    const char *tgt = sp1 + 1;
    const char *sp2 = memchr(tgt, ' ', (size_t)(buf + end - tgt));
    if (sp2 == NULL)
        FAIL("bad request line");
    req->method_name = (struct http_slice){buf, (size_t)(sp1 - buf)};
    req->target = (struct http_slice){tgt, (size_t)(sp2 - tgt)};
    if (!all_tchar(req->method_name.p, req->method_name.len))
        FAIL("method is not a token");
    if (req->target.len == 0)
        FAIL("empty request target");
    for (size_t i = 0; i < req->target.len; i++)
        if ((unsigned char)tgt[i] <= 0x20 || (unsigned char)tgt[i] >= 0x7f)
            FAIL("bad character in request target");
    if (parse_version(sp2 + 1, (size_t)(buf + end - sp2 - 1), &req->minor_version) != 0)
        FAIL("version is not HTTP/1.0 or HTTP/1.1");
    req->method = method_of(req->method_name);
    rc = classify_target(req, why);
    if (rc < 0)
        return rc;

    int head = parse_fields(buf, len, head_max, end + 2, req->headers, req->headers_cap,
                            &req->nheaders, why);
    if (head < 0)
        return head;
    struct fields f = {.minor_version = req->minor_version, .tokens = req->conn_tokens};
    rc = read_fields(req->headers, req->nheaders, 1, &f, why);
    if (rc < 0)
        return rc;
    if (f.nhost > 1)
        FAIL("several Host fields");
    if (f.nhost == 0 && req->minor_version == 1)
        FAIL("HTTP/1.1 request without Host");
    if (f.nhost == 1 && !valid_authority(f.host.p, f.host.len))
        FAIL("bad Host");
    req->host = f.host;
    req->nconn_tokens = f.ntokens;
    req->flags = f.flags;
    req->upgrade = (f.flags & HTTP_F_UPGRADE) ? f.upgrade : (struct http_slice){NULL, 0};
    if (f.has_te) {
        req->framing = HTTP_BODY_CHUNKED;
    } else if (f.has_cl) {
        req->framing = HTTP_BODY_LENGTH;
        req->content_length = f.cl;
    }
    return head;
}

int h1_parse_request(const char *buf, size_t len, size_t head_max, struct http_request *req,
                     const char **why)
{
    const char *ignored;
    struct http_header *headers = req->headers;
    size_t cap = req->headers_cap;
    memset(req, 0, sizeof(*req));
    req->headers = headers;
    req->headers_cap = cap;
    if (head_max > INT_MAX)
        head_max = INT_MAX; /* the length must fit the return value */
    return parse_request(buf, len, head_max, req, why != NULL ? why : &ignored);
}

static int parse_response(const char *buf, size_t len, size_t head_max, enum http_method req_method,
                          struct http_response *res, const char **why)
{
    size_t lim = len < head_max ? len : head_max, end;
    int rc = next_line(buf, lim, 0, &end, why);
    if (rc == -EAGAIN && len >= head_max) {
        *why = "head too large";
        return -EMSGSIZE;
    }
    if (rc < 0)
        return rc;
    /* HTTP-version SP 3DIGIT [SP reason-phrase]: the space is often left out with the reason. */
    if (end < 12 || parse_version(buf, 8, &res->minor_version) != 0 || buf[8] != ' ')
        FAIL("bad status line");
    for (int i = 9; i < 12; i++)
        if (buf[i] < '0' || buf[i] > '9')
            FAIL("bad status code");
    res->status = (buf[9] - '0') * 100 + (buf[10] - '0') * 10 + (buf[11] - '0');
    if (res->status < 100 || res->status > 599)
        FAIL("status code out of range");
    if (end > 12) {
        if (buf[12] != ' ')
            FAIL("bad status line");
        for (size_t i = 13; i < end; i++)
            if (!is_field_char((unsigned char)buf[i]))
                FAIL("control character in reason phrase");
        res->reason = (struct http_slice){buf + 13, end - 13};
    } else {
        res->reason = (struct http_slice){buf + 12, 0};
    }

    int head = parse_fields(buf, len, head_max, end + 2, res->headers, res->headers_cap,
                            &res->nheaders, why);
    if (head < 0)
        return head;
    struct fields f = {.minor_version = res->minor_version, .tokens = res->conn_tokens};
    rc = read_fields(res->headers, res->nheaders, 0, &f, why);
    if (rc < 0)
        return rc;
    res->nconn_tokens = f.ntokens;
    res->flags = f.flags & (HTTP_F_KEEP_ALIVE | HTTP_F_CONN_CLOSE);
    res->upgrade = f.upgrade;
    int st = res->status;
    if (st == 101) {
        res->framing = HTTP_BODY_TUNNEL;
    } else if (req_method == HTTP_METHOD_CONNECT && st >= 200 && st < 300) {
        res->framing = HTTP_BODY_TUNNEL;
    } else if (st < 200 || st == 204 || st == 304 || req_method == HTTP_METHOD_HEAD) {
        res->framing = HTTP_BODY_NONE;
    } else if (f.has_te) {
        res->framing = HTTP_BODY_CHUNKED;
    } else if (f.has_cl) {
        res->framing = HTTP_BODY_LENGTH;
        res->content_length = f.cl;
    } else {
        res->framing = HTTP_BODY_UNTIL_CLOSE;
        res->flags &= ~HTTP_F_KEEP_ALIVE;
    }
    if (res->framing == HTTP_BODY_TUNNEL)
        res->flags &= ~HTTP_F_KEEP_ALIVE;
    return head;
}

int h1_parse_response(const char *buf, size_t len, size_t head_max, enum http_method req_method,
                      struct http_response *res, const char **why)
{
    const char *ignored;
    struct http_header *headers = res->headers;
    size_t cap = res->headers_cap;
    memset(res, 0, sizeof(*res));
    res->headers = headers;
    res->headers_cap = cap;
    if (head_max > INT_MAX)
        head_max = INT_MAX;
    return parse_response(buf, len, head_max, req_method, res, why != NULL ? why : &ignored);
}

/* ---- Chunked bodies (RFC 9112 section 7.1) ---- */

enum {
    CH_SIZE_FIRST, /* expecting the first hex digit of a chunk size */
    CH_SIZE,       /* more hex digits, BWS, ";" or CR */
    CH_SIZE_BWS,   /* whitespace after the size: only ";" may follow */
    CH_EXT,        /* inside the extensions, up to CR */
    CH_SIZE_LF,    /* after the size line's CR */
    CH_DATA,
    CH_DATA_CR, /* after a chunk's data */
    CH_DATA_LF,
    CH_TRAILER_START, /* at the start of a trailer line or the final blank line */
    CH_TRAILER_NAME,
    CH_TRAILER_VALUE,
    CH_TRAILER_LF,
    CH_END_LF, /* after the final blank line's CR */
    CH_DONE,
};

void h1_chunked_init(struct h1_chunked *c)
{
    memset(c, 0, sizeof(*c));
}

int h1_chunked_done(const struct h1_chunked *c)
{
    return c->state == CH_DONE;
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = lower(c);
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

#define CFAIL(reason)                                                                              \
    do {                                                                                           \
        *why = (reason);                                                                           \
        return -EBADMSG;                                                                           \
    } while (0)

#define CBIG(reason)                                                                               \
    do {                                                                                           \
        *why = (reason);                                                                           \
        return -EMSGSIZE;                                                                          \
    } while (0)

static ssize_t chunked_decode(struct h1_chunked *c, const char *buf, size_t len,
                              struct http_slice *data, const char **why)
{
    size_t i = 0;
    *data = (struct http_slice){buf, 0};
    while (i < len && c->state != CH_DONE) {
        unsigned char b = (unsigned char)buf[i];
        if (c->state == CH_DATA) {
            size_t take = len - i;
            if ((uint64_t)take > c->remaining)
                take = (size_t)c->remaining;
            *data = (struct http_slice){buf + i, take};
            c->remaining -= take;
            if (c->remaining == 0)
                c->state = CH_DATA_CR;
            return (ssize_t)(i + take);
        }
        i++;
        switch (c->state) {
        case CH_SIZE_FIRST:
        case CH_SIZE: {
            int h = hexval(b);
            if (h >= 0) {
                /* Sixteen digits hold any 64-bit size; a longer one is refused even when it
                 * is all leading zeros, so a size line is always short. */
                if (++c->digits > 16 || c->remaining > (UINT64_MAX >> 4))
                    CFAIL("chunk size too large");
                c->remaining = (c->remaining << 4) | (uint64_t)h;
                c->state = CH_SIZE;
                break;
            }
            if (c->state == CH_SIZE_FIRST)
                CFAIL("bad chunk size");
            if (b == '\r')
                c->state = CH_SIZE_LF;
            else if (b == ';')
                c->state = CH_EXT;
            else if (is_ows(b))
                c->state = CH_SIZE_BWS;
            else
                CFAIL("bad chunk size");
            c->line = 0;
            break;
        }
        case CH_SIZE_BWS:
            if (b == ';')
                c->state = CH_EXT;
            else if (!is_ows(b))
                CFAIL("bad chunk extension");
            if (++c->line > H1_CHUNK_EXT_MAX)
                CBIG("chunk extension too long");
            break;
        case CH_EXT:
            if (b == '\r')
                c->state = CH_SIZE_LF;
            else if (!is_field_char(b))
                CFAIL("bad chunk extension");
            else if (++c->line > H1_CHUNK_EXT_MAX)
                CBIG("chunk extension too long");
            break;
        case CH_SIZE_LF:
            if (b != '\n')
                CFAIL("bare CR in chunk size line");
            c->digits = 0;
            c->line = 0;
            c->state = c->remaining == 0 ? CH_TRAILER_START : CH_DATA;
            break;
        case CH_DATA_CR:
            if (b != '\r')
                CFAIL("chunk data not followed by CRLF");
            c->state = CH_DATA_LF;
            break;
        case CH_DATA_LF:
            if (b != '\n')
                CFAIL("chunk data not followed by CRLF");
            c->state = CH_SIZE_FIRST;
            break;
        case CH_TRAILER_START:
            if (++c->line > H1_TRAILERS_MAX)
                CBIG("trailer section too large");
            if (b == '\r') {
                c->state = CH_END_LF;
            } else if (is_tchar(b)) {
                if (++c->trailers > H1_TRAILERS_COUNT_MAX)
                    CBIG("too many trailer fields");
                c->state = CH_TRAILER_NAME;
            } else if (is_ows(b)) {
                CFAIL("obs-fold in trailers");
            } else {
                CFAIL("bad trailer field");
            }
            break;
        case CH_TRAILER_NAME:
            if (++c->line > H1_TRAILERS_MAX)
                CBIG("trailer section too large");
            if (b == ':')
                c->state = CH_TRAILER_VALUE;
            else if (!is_tchar(b))
                CFAIL("bad trailer field name");
            break;
        case CH_TRAILER_VALUE:
            if (++c->line > H1_TRAILERS_MAX)
                CBIG("trailer section too large");
            if (b == '\r')
                c->state = CH_TRAILER_LF;
            else if (!is_field_char(b))
                CFAIL("control character in a trailer field");
            break;
        case CH_TRAILER_LF:
            if (b != '\n')
                CFAIL("bare CR in trailers");
            c->state = CH_TRAILER_START;
            break;
        case CH_END_LF:
            if (b != '\n')
                CFAIL("bare CR after trailers");
            c->state = CH_DONE;
            break;
        default:
            CFAIL("bad chunked decoder state");
        }
    }
    return (ssize_t)i;
}

ssize_t h1_chunked_decode(struct h1_chunked *c, const char *buf, size_t len,
                          struct http_slice *data, const char **why)
{
    const char *ignored;
    return chunked_decode(c, buf, len, data, why != NULL ? why : &ignored);
}

/* ---- Serializer ---- */

struct out {
    char *p;
    size_t cap, n;
    int full;
};

static void put(struct out *o, const char *s, size_t n)
{
    if (n == 0)
        return;
    if (o->full || o->cap - o->n < n) {
        o->full = 1;
        return;
    }
    memcpy(o->p + o->n, s, n);
    o->n += n;
}

static void puts_(struct out *o, const char *s)
{
    put(o, s, strlen(s));
}

int h1_field_ok(struct http_slice name, struct http_slice value)
{
    return all_tchar(name.p, name.len) && field_value_ok(value.p, value.len);
}

/* Checks the caller's extra fields (those it has not vouched for with HTTP_HDR_H1OK). */
static int valid_extra(const struct http_header *extra, size_t nextra)
{
    for (size_t i = 0; i < nextra; i++) {
        if (!(extra[i].flags & HTTP_HDR_H1OK) && !h1_field_ok(extra[i].name, extra[i].value))
            return 0;
    }
    return 1;
}

static int put_fields(struct out *o, const struct http_header *h, size_t n,
                      const struct http_header *extra, size_t nextra)
{
    for (size_t i = 0; i < n; i++) {
        if (h[i].flags & (HTTP_HDR_HOP | HTTP_HDR_DUP | HTTP_HDR_DROP))
            continue;
        put(o, h[i].name.p, h[i].name.len);
        put(o, ": ", 2);
        put(o, h[i].value.p, h[i].value.len);
        put(o, "\r\n", 2);
    }
    for (size_t i = 0; i < nextra; i++) {
        put(o, extra[i].name.p, extra[i].name.len);
        put(o, ": ", 2);
        put(o, extra[i].value.p, extra[i].value.len);
        put(o, "\r\n", 2);
    }
    put(o, "\r\n", 2);
    if (o->full || o->n > (size_t)INT32_MAX)
        return -ENOSPC;
    return (int)o->n;
}

int h1_write_request_head(char *out, size_t cap, const struct http_request *req,
                          const struct http_header *extra, size_t nextra)
{
    struct out o = {out, cap, 0, 0};
    if (!valid_extra(extra, nextra))
        return -EINVAL;
    put(&o, req->method_name.p, req->method_name.len);
    put(&o, " ", 1);
    put(&o, req->target.p, req->target.len);
    puts_(&o, " HTTP/1.1\r\n");
    return put_fields(&o, req->headers, req->nheaders, extra, nextra);
}

int h1_write_response_head(char *out, size_t cap, const struct http_response *res,
                           const struct http_header *extra, size_t nextra)
{
    struct out o = {out, cap, 0, 0};
    char status[5];
    if (!valid_extra(extra, nextra) || res->status < 100 || res->status > 599)
        return -EINVAL;
    status[0] = (char)('0' + res->status / 100);
    status[1] = (char)('0' + res->status / 10 % 10);
    status[2] = (char)('0' + res->status % 10);
    status[3] = ' ';
    status[4] = '\0';
    puts_(&o, "HTTP/1.1 ");
    puts_(&o, status);
    put(&o, res->reason.p, res->reason.len);
    put(&o, "\r\n", 2);
    return put_fields(&o, res->headers, res->nheaders, extra, nextra);
}

static int field_named(const struct http_header *x, const char *name, size_t name_len)
{
    if ((x->flags & (HTTP_HDR_DUP | HTTP_HDR_DROP)) != 0 || x->name.len != name_len)
        return 0;
    for (size_t i = 0; i < name_len; i++)
        if (lower((unsigned char)x->name.p[i]) != lower((unsigned char)name[i]))
            return 0;
    return 1;
}

size_t h1_field_value(const struct http_header *hs, size_t n, const char *name, size_t name_len,
                      struct http_slice *v, char **joined)
{
    size_t count = 0, total = 0;
    *joined = NULL;
    *v = (struct http_slice){NULL, 0};
    for (size_t i = 0; i < n; i++) {
        if (!field_named(&hs[i], name, name_len))
            continue;
        if (count++ == 0)
            *v = hs[i].value;
        total += hs[i].value.len + 1;
    }
    if (count < 2)
        return count;
    char *out = xmalloc(total);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (!field_named(&hs[i], name, name_len))
            continue;
        if (o > 0)
            out[o++] = ',';
        if (hs[i].value.len > 0)
            memcpy(out + o, hs[i].value.p, hs[i].value.len);
        o += hs[i].value.len;
    }
    *joined = out;
    *v = (struct http_slice){out, o};
    return count;
}
