/*
 * h1parse: a strict, incremental HTTP/1.1 parser and serializer (RFC 9110, RFC 9112).
 *
 * Pure: bytes in, a result out; no allocation, no global state, no I/O. The parse functions
 * are stateless in the manner of picohttpparser: call them again with the whole (longer)
 * buffer when more bytes arrive. Results point into that buffer (http.h).
 *
 * Strict on purpose, because a proxy that reads a message differently from the server behind
 * it is the request-smuggling bug. Refused (-EBADMSG): both Content-Length and
 * Transfer-Encoding; Content-Length values that differ, or a Content-Length list; any
 * Transfer-Encoding other than one "chunked" (no other coding is supported); Transfer-Encoding
 * in an HTTP/1.0 message; obs-fold (a line starting with whitespace); whitespace between a
 * field name and its colon; a bare CR; a bare LF (a line must end in CRLF); NUL or another
 * control character outside HTAB in a field; a field name or method that is not a token; a
 * target with bytes outside VCHAR or of the wrong form for the method; a version other than
 * HTTP/1.0 and HTTP/1.1; an HTTP/1.1 request without exactly one Host; more than one Host;
 * empty lines before the request line. Byte-identical duplicate Content-Length fields are
 * folded (RFC 9110 section 8.6): the first is kept, the others are flagged HTTP_HDR_DUP;
 * "3" and "03" differ.
 */
#ifndef CONNECTD_H1PARSE_H
#define CONNECTD_H1PARSE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "http.h"

/* Envoy's default max_request_headers_kb: a head larger than this is refused (431). */
#define H1_HEAD_MAX (60u * 1024u)
/* Bounds of a chunked body's framing (per chunk-size line, and the whole trailer section). */
#define H1_CHUNK_EXT_MAX      1024u
#define H1_TRAILERS_MAX       8192u
#define H1_TRAILERS_COUNT_MAX 32u

/*
 * Parses the request head at the start of <buf> (<len> bytes); <req->headers> and
 * <req->headers_cap> are the caller's header slots. Returns the head's length (> 0, with the
 * blank line) and fills <req>; -EAGAIN when the head is incomplete and fine so far;
 * -EBADMSG when it is malformed or smuggling-prone (400); -EMSGSIZE when the head is longer
 * than <head_max> bytes or has more fields than slots (431). On -EBADMSG and -EMSGSIZE,
 * *<why> (when <why> is not NULL) is set to a short static reason. Bytes after the head (a
 * body, a pipelined request) are not looked at.
 */
int h1_parse_request(const char *buf, size_t len, size_t head_max, struct http_request *req,
                     const char **why);

/*
 * Parses a response head as h1_parse_request() does. <req_method> is the method of the
 * request it answers, which decides the framing of a HEAD or CONNECT answer. A 1xx other than
 * 101 is an interim response: parse again after it for the final one.
 */
int h1_parse_response(const char *buf, size_t len, size_t head_max, enum http_method req_method,
                      struct http_response *res, const char **why);

/* The state of one chunked body's decoder; zero it (or h1_chunked_init) before the body. */
struct h1_chunked {
    int state;
    unsigned digits;    /* hex digits of the current chunk size */
    unsigned trailers;  /* trailer fields so far */
    size_t line;        /* bytes of the current size line's extension or trailer section */
    uint64_t remaining; /* of the current chunk's data */
};

void h1_chunked_init(struct h1_chunked *c);

/*
 * Decodes a chunked body incrementally from <buf> (<len> bytes, any split). Returns how many
 * bytes it consumed, with *<data> set to the chunk data among them (len 0 when none); one
 * call yields at most one data span, so loop until the input is used up or the body is done.
 * -EBADMSG for malformed framing (a bad or overflowing chunk size, a bare CR or LF, a bad
 * trailer field); -EMSGSIZE when an extension or the trailer section exceeds its bound.
 * Chunk extensions are checked and skipped; trailer fields are checked and discarded. Once
 * the body is complete, h1_chunked_done() is true and the decoder consumes nothing more.
 */
ssize_t h1_chunked_decode(struct h1_chunked *c, const char *buf, size_t len,
                          struct http_slice *data, const char **why);

int h1_chunked_done(const struct h1_chunked *c);

/*
 * Writes a request head to forward: the request line as HTTP/1.1 (a proxy sends its own
 * version), the fields of <req> except the hop-by-hop and duplicate ones (HTTP_HDR_HOP,
 * HTTP_HDR_DUP), then <extra> (<nextra> fields the caller adds, such as its own framing or
 * Connection), then the blank line. Returns the length written to <out> (at most <cap>),
 * -ENOSPC when it does not fit, -EINVAL when an extra field is not a token name with a
 * field value (CR, LF or NUL would inject a field). An extra field flagged HTTP_HDR_H1OK is
 * not checked: the caller checked it (h1_field_ok()) or made it of known bytes.
 */
int h1_write_request_head(char *out, size_t cap, const struct http_request *req,
                          const struct http_header *extra, size_t nextra);

/* The same for a response head: "HTTP/1.1 <status> <reason>" and the fields. */
int h1_write_response_head(char *out, size_t cap, const struct http_response *res,
                           const struct http_header *extra, size_t nextra);

/* Whether a field may be written as it is: <name> a token, <value> only field-value bytes. */
int h1_field_ok(struct http_slice name, struct http_slice value);

/*
 * The value of the request fields named <name> (<name_len> bytes, any case) among <hs>, as a
 * matcher sees it (RFC 9110 section 5.3): one field's value as is, several joined with ","
 * into a new allocation left in *<joined> (the caller frees it; NULL otherwise). Fields
 * flagged HTTP_HDR_DUP or HTTP_HDR_DROP are left out. Returns how many fields there were.
 */
size_t h1_field_value(const struct http_header *hs, size_t n, const char *name, size_t name_len,
                      struct http_slice *v, char **joined);
/*
 * Case-insensitive comparison of a slice with a NUL-terminated lower-case string. Inline: it
 * runs for several names per field of every head, and inlined the length of a literal is
 * known at compile time instead of a strlen() per call.
 */
static inline int h1_slice_eq(struct http_slice s, const char *lower)
{
    size_t n = strlen(lower);
    if (s.len != n)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c - 'A' + 'a');
        if (c != (unsigned char)lower[i])
            return 0;
    }
    return 1;
}

#endif
