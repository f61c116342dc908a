/*
 * http: the types of an HTTP message head, shared by the HTTP/1 codec (h1parse) and, later,
 * the HTTP/2 one. Types and constants only, no functions (HAProxy's `-t.h` headers).
 *
 * Every string is a slice: a pointer and a length into the buffer the head was parsed from,
 * never NUL-terminated and never owned. A head stays valid only as long as that buffer is
 * neither freed nor moved. Header slots are a fixed array the caller provides, so parsing a
 * head allocates nothing.
 */
#ifndef CONNECTD_HTTP_H
#define CONNECTD_HTTP_H

#include <stddef.h>
#include <stdint.h>

/* Bytes of the caller's buffer; not NUL-terminated. An absent value has p == NULL, len 0. */
struct http_slice {
    const char *p;
    size_t len;
};

/* The header is hop-by-hop: a standard one (Connection, Keep-Alive, Proxy-Connection, TE,
 * Transfer-Encoding, Upgrade, Trailer) or one named by a Connection token. The serializer
 * does not forward it. */
#define HTTP_HDR_HOP 0x1u
/* A duplicate of an earlier identical Content-Length, folded into it; not forwarded. */
#define HTTP_HDR_DUP 0x2u
/* Left out by request normalization (a name with '_' under DROP_HEADER): neither matched by
 * intentions nor forwarded. */
#define HTTP_HDR_DROP 0x4u
/* The field is fit to go out over HTTP/2 as it is: its name is a lower-case token, its value
 * passes RFC 9113 section 8.2.1, and it is not one HTTP/2 forbids (section 8.2.2). The HTTP/2
 * codec sets it on every field nghttp2 accepted from a peer (nghttp2 checks all of that and
 * drops or refuses the rest), so a field relayed from one HTTP/2 session to another is not
 * lower-cased and checked a second time. A field whose name or value is changed loses it. */
#define HTTP_HDR_H2OK 0x8u
/* The field is fit to go out over HTTP/1.1 as it is: its name is a token and its value holds
 * only field-value bytes (h1_field_ok()). Set by the HTTP/1.1 codec on a field it made of known
 * bytes or checked once for the connection (X-Forwarded-Client-Cert), so that the serializer
 * does not check it again on every request. A field whose name or value is changed loses it. */
#define HTTP_HDR_H1OK 0x10u

struct http_header {
    struct http_slice name;  /* a token, as sent (compare case-insensitively) */
    struct http_slice value; /* without leading and trailing whitespace; may be empty */
    unsigned flags;          /* HTTP_HDR_* */
};

enum http_method {
    HTTP_METHOD_OTHER = 0, /* a valid token we have no name for: see method_name */
    HTTP_METHOD_GET,
    HTTP_METHOD_HEAD,
    HTTP_METHOD_POST,
    HTTP_METHOD_PUT,
    HTTP_METHOD_DELETE,
    HTTP_METHOD_CONNECT,
    HTTP_METHOD_OPTIONS,
    HTTP_METHOD_TRACE,
    HTTP_METHOD_PATCH,
};

/* RFC 9112 section 3.2. */
enum http_target_form {
    HTTP_TARGET_ORIGIN,    /* "/path?query" */
    HTTP_TARGET_ABSOLUTE,  /* "http://host/path" (to a proxy) */
    HTTP_TARGET_AUTHORITY, /* "host:port", CONNECT only */
    HTTP_TARGET_ASTERISK,  /* "*", OPTIONS only */
};

/* How the message's body is delimited (RFC 9112 section 6.3). */
enum http_framing {
    HTTP_BODY_NONE,        /* no body: no framing header, HEAD, 1xx, 204, 304 */
    HTTP_BODY_LENGTH,      /* content_length bytes (which may be 0) */
    HTTP_BODY_CHUNKED,     /* Transfer-Encoding: chunked, decode with h1_chunked_decode() */
    HTTP_BODY_UNTIL_CLOSE, /* a response without framing: the body ends when the peer closes */
    HTTP_BODY_TUNNEL,      /* 101, or 2xx to CONNECT: raw bytes both ways from here on */
};

/* Message flags. */
#define HTTP_F_KEEP_ALIVE      0x01u /* the connection may carry another message after this */
#define HTTP_F_EXPECT_CONTINUE 0x02u /* request: Expect: 100-continue */
#define HTTP_F_EXPECT_OTHER    0x04u /* request: an expectation we cannot meet (417) */
#define HTTP_F_UPGRADE         0x08u /* request: Upgrade offered (Connection: upgrade + Upgrade) */
#define HTTP_F_CONN_CLOSE      0x10u /* Connection: close was sent */

/* The most Connection tokens a head may carry; more is refused as malformed. */
#define HTTP_CONN_TOKENS_MAX 16

struct http_request {
    /* In: the caller's header slots. */
    struct http_header *headers;
    size_t headers_cap;

    /* Out: */
    size_t nheaders;
    struct http_slice method_name;
    enum http_method method;
    struct http_slice target;
    enum http_target_form target_form;
    int minor_version;         /* HTTP/1.<minor_version>: 0 or 1 */
    struct http_slice host;    /* the Host header's value; absent for an HTTP/1.0 request without */
    struct http_slice upgrade; /* the Upgrade header's value when HTTP_F_UPGRADE */
    enum http_framing framing;
    uint64_t content_length; /* when framing is HTTP_BODY_LENGTH */
    unsigned flags;          /* HTTP_F_* */
    /* The Connection header's tokens, for the caller's own decisions (the hop-by-hop headers
     * they name are already flagged HTTP_HDR_HOP). */
    struct http_slice conn_tokens[HTTP_CONN_TOKENS_MAX];
    size_t nconn_tokens;
};

struct http_response {
    /* In: the caller's header slots. */
    struct http_header *headers;
    size_t headers_cap;

    /* Out: */
    size_t nheaders;
    int minor_version;
    int status;               /* 100 - 599 */
    struct http_slice reason; /* may be empty */
    struct http_slice upgrade;
    enum http_framing framing;
    uint64_t content_length;
    unsigned flags; /* HTTP_F_KEEP_ALIVE, HTTP_F_CONN_CLOSE */
    struct http_slice conn_tokens[HTTP_CONN_TOKENS_MAX];
    size_t nconn_tokens;
};

#endif
