/*
 * h2: the HTTP/2 codec over nghttp2's session API (h2.h is the contract).
 *
 * nghttp2 does the framing, HPACK, stream states, flow-control arithmetic and most of
 * RFC 9113 section 8's message checks; this file turns its callbacks into ours, bounds what a
 * peer can make us hold, and keeps the caller in charge of the receive windows.
 *
 * Header blocks: HEADERS and its CONTINUATIONs cannot interleave with any other frame, so one
 * accumulator per session (not per stream) collects the fields of the block being received,
 * as offsets into one buffer that grows up to the header-list bound; the head is handed out
 * at the end of the block, with slices into that buffer.
 *
 * Streams: each stream the codec knows has a small struct of ours (the caller's pointer, the
 * bytes delivered and not consumed, flags), kept in a list so h2_session_free() finds them
 * all, and set as nghttp2's stream user data so callbacks find theirs at once.
 */
#include "h2.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nghttp2/nghttp2.h>

#include "memcache.h"
#include "util.h"

/* Stream flags. */
#define ST_HANDED 0x01u /* the caller knows the stream: on_close is owed */
#define ST_FINAL  0x02u /* the final head arrived: a later HEADERS carries trailers */
#define ST_DROP   0x04u /* refused by the codec: its DATA is consumed and dropped */
#define ST_RESP   0x08u /* server: the final response head was submitted */

struct stream {
    int32_t id;
    unsigned flags;
    void *user;
    size_t unconsumed; /* bytes given to on_data and not yet given back by h2_consume */
    uint32_t refused;  /* the code the codec reset it with, reported at close */
    struct stream *prev, *next;
};

/* A field of the block being received: offsets into s->hbuf. */
struct hfield {
    uint32_t noff, nlen, voff, vlen;
};

/* The pseudo-fields we keep, and Host. */
enum { PS_METHOD, PS_SCHEME, PS_AUTHORITY, PS_PATH, PS_STATUS, PS_HOST, PS_COUNT };

struct h2_session {
    nghttp2_session *ng;
    enum h2_role role;
    struct h2_limits lim;
    struct h2_callbacks cb;
    void *user;
    struct h2_stats stats;
    struct stream *streams;
    size_t nstreams;
    /* The stream stream_get() found last (NULL: none): a frame's callbacks and the caller's
     * calls that follow ask for the same stream several times in a row. */
    struct stream *last;

    /* The header block being received. */
    int32_t hb_stream;
    size_t hb_list;    /* RFC 9113 section 6.5.2 size so far */
    size_t hb_wire;    /* HEADERS + CONTINUATION payload bytes */
    unsigned hb_conts; /* CONTINUATION frames */
    int hb_over;       /* over a bound: fields are no longer kept */
    char *hbuf;        /* names and values */
    size_t hlen, hcap;
    struct hfield *hf; /* regular fields, lim.max_headers slots */
    size_t nhf;
    struct hfield ps[PS_COUNT];
    unsigned ps_set;          /* bit per PS_* */
    int64_t hb_clen;          /* the content-length field's value, -1 when none came */
    struct http_header *hdrs; /* the slices handed out */

    /* Output taken from nghttp2 and not yet copied out; valid until the next mem_send. */
    const uint8_t *pend;
    size_t npend;

    /*
     * nghttp2's answers to want_write and want_read, kept while <known> has their bit: the
     * caller's loops ask several times per round (~80 instructions each time for want_write),
     * and the answers only change when the session does. Every function that can change the
     * session clears <known> (changed()); h2_output() learns that nothing is left to send when
     * nghttp2 gives no more bytes.
     */
    unsigned known; /* KNOWN_* */
    int can_write, can_read;

    /* Peer RST_STREAM token bucket, in thousandths of a token. */
    uint64_t rst_tokens_milli;
    uint64_t rst_last_ms;

    int failed;   /* fatal: no more input or output */
    char why[96]; /* h2_error(); empty while the session is fine */
};

#define KNOWN_WRITE 0x1u
#define KNOWN_READ  0x2u

/* ---- helpers -------------------------------------------------------------------------- */

/* The session may have changed: h2_wants_write() and h2_wants_read() ask nghttp2 again. */
static void changed(struct h2_session *s)
{
    s->known = 0;
}

/* Records why the session ended: <what>, then <detail> when not NULL. */
static void set_why(struct h2_session *s, const char *what, const char *detail)
{
    if (s->why[0] != '\0')
        return; /* the first reason is the real one */
    snprintf(s->why, sizeof(s->why), "%s%s", what, detail != NULL ? detail : "");
}

static uint32_t pick(uint32_t v, uint32_t def)
{
    return v != 0 ? v : def;
}

static unsigned char lower(unsigned char c)
{
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c + 32) : c;
}

int h2_value_ok(const void *v, size_t n)
{
    const unsigned char *p = v;
    if (n == 0)
        return 1;
    if (p[0] == ' ' || p[0] == '\t' || p[n - 1] == ' ' || p[n - 1] == '\t')
        return 0;
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        /* A byte below 0x20 (high bit clear) or equal to 0x7f flags its word; such a word
         * (HTAB is one) is looked at byte by byte. Bytes from 0x80 up are never flagged. */
        uint64_t del = w ^ (0x7fULL * ones);
        if ((((w - 0x20ULL * ones) & ~w) | ((del - ones) & ~del)) & highs)
            break;
    }
    for (; i < n; i++)
        if ((p[i] < 0x20 && p[i] != '\t') || p[i] == 0x7f)
            return 0;
    return 1;
}

static int slice_is(const char *p, size_t n, const char *lit)
{
    size_t m = strlen(lit);
    if (n != m)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (lower((unsigned char)p[i]) != (unsigned char)lit[i])
            return 0;
    return 1;
}

static struct stream *stream_new(struct h2_session *s, int32_t id, void *user)
{
    struct stream *st = memcache_calloc(1, sizeof(*st));
    st->id = id;
    st->user = user;
    st->next = s->streams;
    if (s->streams != NULL)
        s->streams->prev = st;
    s->streams = st;
    s->nstreams++;
    return st;
}

static void stream_free(struct h2_session *s, struct stream *st)
{
    if (st->prev != NULL)
        st->prev->next = st->next;
    else
        s->streams = st->next;
    if (st->next != NULL)
        st->next->prev = st->prev;
    s->nstreams--;
    if (s->last == st)
        s->last = NULL;
    memcache_free(st);
}

/* The stream nghttp2 knows as <id> (its user data), NULL when none. */
static struct stream *stream_lookup(const struct h2_session *s, int32_t id)
{
    if (id <= 0)
        return NULL;
    return nghttp2_session_get_stream_user_data(s->ng, id);
}

/*
 * stream_lookup(), remembered: a stream stays nghttp2's user data for its id from the lookup
 * until cb_stream_close() clears it and frees the stream, which forgets it here.
 */
static struct stream *stream_get(struct h2_session *s, int32_t id)
{
    if (s->last != NULL && s->last->id == id && id > 0)
        return s->last;
    struct stream *st = stream_lookup(s, id);
    if (st != NULL)
        s->last = st;
    return st;
}

/*
 * A stream we opened as a client but nghttp2 has not created yet (its HEADERS wait in the
 * queue, say under the peer's concurrency limit). nghttp2 creates it, with our struct as its
 * user data, when it takes the HEADERS from the queue, and if they cannot be sent then (a
 * GOAWAY came, or h2_submit_rst() cancelled them) closes it at once, so on_close still comes.
 */
static struct stream *stream_find(const struct h2_session *s, int32_t id)
{
    for (struct stream *st = s->streams; st != NULL; st = st->next)
        if (st->id == id)
            return st;
    return NULL;
}

/* Resets a stream the codec refuses; its data is dropped from here on. */
static void refuse(struct h2_session *s, struct stream *st, int32_t id, uint32_t code)
{
    if (st != NULL) {
        st->flags |= ST_DROP;
        st->refused = code;
    }
    nghttp2_submit_rst_stream(s->ng, NGHTTP2_FLAG_NONE, id, code);
}

/* Ends the session for a reason of ours: GOAWAY(<code>) is queued, input stops. */
static void terminate(struct h2_session *s, uint32_t code, const char *why)
{
    set_why(s, why, NULL);
    nghttp2_session_terminate_session(s->ng, code);
}

/*
 * ---- nghttp2 allocator: memcache (OOM aborts like everywhere else) ----------------------
 *
 * nghttp2 allocates ~8 small blocks per stream (the stream, queued frames, copies of header
 * lists, HPACK strings) and frees them when it is done; with many streams in flight these
 * come in bursts that glibc's per-thread cache cannot hold. The thread's memcache keeps them
 * for the next streams, and is emptied when the thread's last session ends.
 */

static _Thread_local size_t live_sessions;

static void *mem_malloc(size_t n, void *u)
{
    (void)u;
    return memcache_alloc(n);
}

static void mem_free(void *p, void *u)
{
    (void)u;
    memcache_free(p);
}

static void *mem_calloc(size_t nmemb, size_t size, void *u)
{
    (void)u;
    return memcache_calloc(nmemb, size);
}

static void *mem_realloc(void *p, size_t n, void *u)
{
    (void)u;
    return memcache_realloc(p, n);
}

/* ---- receiving heads ------------------------------------------------------------------ */

static void hb_reset(struct h2_session *s, int32_t stream_id)
{
    s->hb_stream = stream_id;
    s->hb_list = 0;
    s->hlen = 0;
    s->nhf = 0;
    s->ps_set = 0;
    s->hb_over = 0;
    s->hb_clen = -1;
}

static int hb_append(struct h2_session *s, const uint8_t *p, size_t n, uint32_t *off)
{
    if (s->hlen + n > s->hcap) {
        size_t cap = s->hcap != 0 ? s->hcap : 1024;
        while (cap < s->hlen + n)
            cap *= 2;
        s->hbuf = xrealloc(s->hbuf, cap);
        s->hcap = cap;
    }
    if (n > 0)
        memcpy(s->hbuf + s->hlen, p, n);
    *off = (uint32_t)s->hlen;
    s->hlen += n;
    return 0;
}

static struct http_slice ps_slice(const struct h2_session *s, int which)
{
    struct http_slice sl = {NULL, 0};
    if (s->ps_set & (1u << which)) {
        sl.p = s->hbuf + s->ps[which].voff;
        sl.len = s->ps[which].vlen;
    }
    return sl;
}

/*
 * Splits an authority into host and port; an absent or empty port is the scheme's default
 * (RFC 3986 section 6.2.3). An IPv6 literal keeps its brackets in the host.
 */
static void split_authority(struct http_slice a, struct http_slice scheme, struct http_slice *host,
                            struct http_slice *port)
{
    size_t colon = a.len;
    for (size_t i = a.len; i > 0; i--) {
        if (a.p[i - 1] == ']')
            break;
        if (a.p[i - 1] == ':') {
            colon = i - 1;
            break;
        }
    }
    host->p = a.p;
    host->len = colon;
    port->p = colon < a.len ? a.p + colon + 1 : NULL;
    port->len = colon < a.len ? a.len - colon - 1 : 0;
    if (port->len == 0) {
        if (scheme.p != NULL && slice_is(scheme.p, scheme.len, "https"))
            *port = (struct http_slice){"443", 3};
        else
            *port = (struct http_slice){"80", 2};
    }
}

/* :authority and Host name the same origin after scheme-based normalization. */
static int same_authority(struct http_slice a, struct http_slice b, struct http_slice scheme)
{
    struct http_slice ha, pa, hb, pb;
    split_authority(a, scheme, &ha, &pa);
    split_authority(b, scheme, &hb, &pb);
    if (ha.len != hb.len || pa.len != pb.len || memcmp(pa.p, pb.p, pa.len) != 0)
        return 0;
    for (size_t i = 0; i < ha.len; i++)
        if (lower((unsigned char)ha.p[i]) != lower((unsigned char)hb.p[i]))
            return 0;
    return 1;
}

static size_t build_fields(struct h2_session *s)
{
    for (size_t i = 0; i < s->nhf; i++) {
        s->hdrs[i].name = (struct http_slice){s->hbuf + s->hf[i].noff, s->hf[i].nlen};
        s->hdrs[i].value = (struct http_slice){s->hbuf + s->hf[i].voff, s->hf[i].vlen};
        s->hdrs[i].flags = HTTP_HDR_H2OK; /* nghttp2 checked it (see http.h) */
    }
    return s->nhf;
}

static int status_of(const struct h2_session *s)
{
    struct http_slice st = ps_slice(s, PS_STATUS);
    if (st.len != 3)
        return 0;
    return (st.p[0] - '0') * 100 + (st.p[1] - '0') * 10 + (st.p[2] - '0');
}

/* A callback's refusal of a stream: -EAGAIN refuses it (retry-safe), the rest is internal. */
static void callback_refused(struct h2_session *s, struct stream *st, int rc)
{
    refuse(s, st, st->id, rc == -EAGAIN ? H2_REFUSED_STREAM : H2_INTERNAL_ERROR);
}

/* Server: answers 431 by itself, then asks the client to stop sending the body. */
static void answer_431(struct h2_session *s, struct stream *st, int end_stream)
{
    static const nghttp2_nv nv[] = {
        {(uint8_t *)":status", (uint8_t *)"431", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-length", (uint8_t *)"0", 14, 1, NGHTTP2_NV_FLAG_NONE},
    };
    st->flags |= ST_DROP | ST_RESP;
    nghttp2_submit_response(s->ng, st->id, nv, 2, NULL);
    if (!end_stream)
        nghttp2_submit_rst_stream(s->ng, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_NO_ERROR);
}

static int deliver_head(struct h2_session *s, const nghttp2_frame *f, struct stream *st)
{
    int end_stream = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    int trailers = 0;
    if (f->headers.cat == NGHTTP2_HCAT_HEADERS && (st->flags & ST_FINAL))
        trailers = 1;
    if (s->role == H2_SERVER && f->headers.cat == NGHTTP2_HCAT_HEADERS)
        trailers = 1;

    if (s->hb_over) {
        s->stats.headers_too_large++;
        if (s->role == H2_SERVER && !trailers)
            answer_431(s, st, end_stream);
        else
            refuse(s, st, st->id, H2_INTERNAL_ERROR);
        return 0;
    }
    size_t n = build_fields(s);
    if (trailers) {
        if (s->cb.on_trailers != NULL && (st->flags & ST_HANDED)) {
            int rc = s->cb.on_trailers(s, st->id, st->user, s->hdrs, n, s->user);
            if (rc < 0) {
                callback_refused(s, st, rc);
                return 0;
            }
        }
        return 1;
    }

    struct h2_head h = {0};
    h.headers = s->hdrs;
    h.nheaders = n;
    h.content_length = s->hb_clen;
    h.end_stream = end_stream;
    if (s->role == H2_SERVER) {
        h.method = ps_slice(s, PS_METHOD);
        h.scheme = ps_slice(s, PS_SCHEME);
        h.authority = ps_slice(s, PS_AUTHORITY);
        h.path = ps_slice(s, PS_PATH);
        struct http_slice host = ps_slice(s, PS_HOST);
        if (h.authority.p == NULL) {
            h.authority = host;
        } else if (host.p != NULL && !same_authority(h.authority, host, h.scheme)) {
            /* RFC 9113 section 8.3.1: a request naming two origins is malformed. */
            s->stats.malformed++;
            refuse(s, st, st->id, H2_PROTOCOL_ERROR);
            return 0;
        }
        st->flags |= ST_FINAL;
    } else {
        h.status = status_of(s);
        if (h.status >= 200)
            st->flags |= ST_FINAL;
    }
    if (s->cb.on_head == NULL)
        return 1;
    int rc = s->cb.on_head(s, st->id, st->user, &h, s->user);
    if (rc < 0) {
        callback_refused(s, st, rc);
        return 0;
    }
    st->flags |= ST_HANDED;
    return 1;
}

/* ---- nghttp2 callbacks ---------------------------------------------------------------- */

static int cb_begin_frame(nghttp2_session *ng, const nghttp2_frame_hd *hd, void *u)
{
    struct h2_session *s = u;
    (void)ng;
    if (hd->type == NGHTTP2_HEADERS) {
        s->hb_wire = hd->length;
        s->hb_conts = 0;
    } else if (hd->type == NGHTTP2_CONTINUATION) {
        s->hb_wire += hd->length;
        s->hb_conts++;
    } else {
        return 0;
    }
    /*
     * CVE-2024-27316: a header block must end. nghttp2 counts CONTINUATION frames
     * (max_continuations) but not their bytes, and HPACK lets a small block expand, so the
     * compressed block is bounded here too: twice the header-list bound is more than any
     * block encoding an acceptable list needs.
     */
    if (s->hb_conts > s->lim.max_continuations ||
        s->hb_wire > 2 * (size_t)s->lim.max_header_list_bytes) {
        set_why(s, "header block flood (CONTINUATION)", NULL);
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

static int cb_begin_headers(nghttp2_session *ng, const nghttp2_frame *f, void *u)
{
    struct h2_session *s = u;
    if (f->hd.type != NGHTTP2_HEADERS)
        return 0;
    hb_reset(s, f->hd.stream_id);
    if (s->role == H2_SERVER && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
        struct stream *st = stream_new(s, f->hd.stream_id, NULL);
        nghttp2_session_set_stream_user_data(ng, f->hd.stream_id, st);
        s->stats.streams_opened++;
    }
    return 0;
}

/*
 * Which of the pseudo-fields we keep <name> is, or -1. nghttp2 hands out only names it
 * checked (RFC 9113 section 8.2.1: no upper case; a pseudo-field it knows, in its place), so
 * the comparisons are exact; this runs for every field of every head.
 */
static int pseudo_field(const uint8_t *name, size_t len)
{
    switch (len) {
    case 5:
        return memcmp(name, ":path", 5) == 0 ? PS_PATH : -1;
    case 7:
        if (memcmp(name, ":method", 7) == 0)
            return PS_METHOD;
        if (memcmp(name, ":scheme", 7) == 0)
            return PS_SCHEME;
        return memcmp(name, ":status", 7) == 0 ? PS_STATUS : -1;
    case 10:
        return memcmp(name, ":authority", 10) == 0 ? PS_AUTHORITY : -1;
    default:
        /* Others (:protocol, which we do not enable) nghttp2 has refused already. */
        return -1;
    }
}

static int cb_header(nghttp2_session *ng, const nghttp2_frame *f, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags, void *u)
{
    struct h2_session *s = u;
    (void)ng;
    (void)flags;
    if (f->hd.type != NGHTTP2_HEADERS || f->hd.stream_id != s->hb_stream || s->hb_over)
        return 0;
    s->hb_list += namelen + valuelen + 32;
    int pseudo = namelen > 0 && name[0] == ':';
    int which = pseudo ? pseudo_field(name, namelen) : -1;
    if (!pseudo && s->role == H2_SERVER && namelen == 4 && memcmp(name, "host", 4) == 0)
        which = PS_HOST;
    if (s->hb_list > s->lim.max_header_list_bytes ||
        (which < 0 && !pseudo && s->nhf >= s->lim.max_headers)) {
        /*
         * Keep decoding (the HPACK table must stay in step with the peer's) but keep nothing:
         * the head is refused at the end of its block.
         */
        s->hb_over = 1;
        return 0;
    }
    if (pseudo && which < 0)
        return 0;
    if (!pseudo && s->hb_clen < 0 && namelen == 14 && memcmp(name, "content-length", 14) == 0) {
        /* nghttp2 accepted it, so it is digits that fit in int64_t (and only one came). */
        int64_t v = 0;
        for (size_t k = 0; k < valuelen; k++)
            v = v * 10 + (value[k] - '0');
        s->hb_clen = v;
    }
    struct hfield fl;
    hb_append(s, name, namelen, &fl.noff);
    fl.nlen = (uint32_t)namelen;
    hb_append(s, value, valuelen, &fl.voff);
    fl.vlen = (uint32_t)valuelen;
    if (which >= 0) {
        s->ps[which] = fl;
        s->ps_set |= 1u << which;
    } else {
        s->hf[s->nhf++] = fl;
    }
    return 0;
}

/* CVE-2023-44487: every RST_STREAM from the peer takes a token; none left ends the session. */
static int rst_flood(struct h2_session *s)
{
    uint64_t now = util_now_ms();
    uint64_t cap = (uint64_t)s->lim.reset_burst * 1000;
    uint64_t add = (now - s->rst_last_ms) * s->lim.reset_rate_per_s; /* milli-tokens */
    s->rst_last_ms = now;
    s->rst_tokens_milli = s->rst_tokens_milli + add > cap ? cap : s->rst_tokens_milli + add;
    if (s->rst_tokens_milli < 1000)
        return 1;
    s->rst_tokens_milli -= 1000;
    return 0;
}

static int cb_frame_recv(nghttp2_session *ng, const nghttp2_frame *f, void *u)
{
    struct h2_session *s = u;
    struct stream *st = stream_get(s, f->hd.stream_id);
    int end = (f->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    (void)ng;
    switch (f->hd.type) {
    case NGHTTP2_HEADERS:
        if (st == NULL || (st->flags & ST_DROP))
            return 0;
        if (!deliver_head(s, f, st))
            return 0;
        break;
    case NGHTTP2_DATA:
        if (st == NULL || (st->flags & ST_DROP))
            return 0;
        break;
    case NGHTTP2_RST_STREAM:
        s->stats.resets_received++;
        /* A server's resets of our requests are its business (REFUSED_STREAM under load is
         * normal); the attack is a client's. */
        if (s->role == H2_SERVER && rst_flood(s))
            terminate(s, H2_ENHANCE_YOUR_CALM, "stream reset flood (rapid reset)");
        return 0;
    case NGHTTP2_GOAWAY:
        if (s->cb.on_goaway != NULL)
            s->cb.on_goaway(s, f->goaway.last_stream_id, f->goaway.error_code, s->user);
        return 0;
    default:
        return 0;
    }
    if (end && (st->flags & ST_HANDED) && s->cb.on_end_stream != NULL)
        s->cb.on_end_stream(s, st->id, st->user, s->user);
    return 0;
}

static int cb_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t stream_id, const uint8_t *data,
                         size_t len, void *u)
{
    struct h2_session *s = u;
    struct stream *st = stream_get(s, stream_id);
    (void)flags;
    if (st == NULL || (st->flags & ST_DROP) || !(st->flags & ST_HANDED) || s->cb.on_data == NULL) {
        /* Nobody takes these bytes: give the window back at once. */
        nghttp2_session_consume(ng, stream_id, len);
        return 0;
    }
    st->unconsumed += len;
    int rc = s->cb.on_data(s, stream_id, st->user, data, len, s->user);
    if (rc < 0)
        callback_refused(s, st, rc);
    return 0;
}

static void close_stream(struct h2_session *s, struct stream *st, uint32_t code)
{
    if (st->unconsumed > 0) {
        /* The caller's bytes of a finished stream are its own business now; the
         * connection's window must not stay charged for them. */
        nghttp2_session_consume_connection(s->ng, st->unconsumed);
        st->unconsumed = 0;
    }
    /* A stream the codec refused closes with the refusal's code even when the peer's
     * END_STREAM closed it before our RST_STREAM could leave. */
    if (st->refused != 0 && code == H2_NO_ERROR)
        code = st->refused;
    if ((st->flags & ST_HANDED) && s->cb.on_close != NULL)
        s->cb.on_close(s, st->id, st->user, code, s->user);
    stream_free(s, st);
}

static int cb_stream_close(nghttp2_session *ng, int32_t stream_id, uint32_t code, void *u)
{
    struct h2_session *s = u;
    struct stream *st = stream_get(s, stream_id);
    if (st == NULL)
        return 0;
    nghttp2_session_set_stream_user_data(ng, stream_id, NULL);
    close_stream(s, st, code);
    return 0;
}

static int cb_frame_send(nghttp2_session *ng, const nghttp2_frame *f, void *u)
{
    struct h2_session *s = u;
    (void)ng;
    if (f->hd.type == NGHTTP2_RST_STREAM) {
        s->stats.resets_sent++;
        if (f->rst_stream.error_code == NGHTTP2_REFUSED_STREAM && s->role == H2_SERVER)
            s->stats.streams_refused++;
    } else if (f->hd.type == NGHTTP2_GOAWAY && f->goaway.error_code != NGHTTP2_NO_ERROR) {
        /* A connection error nghttp2 found: its debug data says what. */
        char txt[64];
        size_t n = f->goaway.opaque_data_len < sizeof(txt) - 1 ? f->goaway.opaque_data_len
                                                               : sizeof(txt) - 1;
        for (size_t i = 0; i < n; i++) {
            unsigned char c = f->goaway.opaque_data[i];
            txt[i] = c >= 0x20 && c < 0x7f ? (char)c : '?';
        }
        txt[n] = '\0';
        set_why(s, "GOAWAY sent: ", n > 0 ? txt : nghttp2_http2_strerror(f->goaway.error_code));
    }
    return 0;
}

static int cb_invalid_frame(nghttp2_session *ng, const nghttp2_frame *f, int lib_error, void *u)
{
    struct h2_session *s = u;
    (void)ng;
    (void)lib_error;
    if (f->hd.type == NGHTTP2_HEADERS)
        s->stats.malformed++;
    return 0;
}

static ssize_t cb_read_body(nghttp2_session *ng, int32_t stream_id, uint8_t *buf, size_t length,
                            uint32_t *data_flags, nghttp2_data_source *src, void *u)
{
    struct h2_session *s = u;
    struct stream *st = src->ptr;
    (void)ng;
    if (s->cb.read_body == NULL)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    unsigned flags = 0;
    ssize_t r = s->cb.read_body(s, stream_id, st->user, buf, length, &flags, s->user);
    if (r == H2_BODY_DEFER)
        return NGHTTP2_ERR_DEFERRED;
    if (r < 0 || (size_t)r > length)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    if (flags & H2_BODY_EOF) {
        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
        if (flags & H2_BODY_TRAILERS)
            *data_flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
    }
    return r;
}

/* ---- the session ---------------------------------------------------------------------- */

struct h2_session *h2_session_new(enum h2_role role, const struct h2_limits *limits,
                                  const struct h2_callbacks *cb, void *user)
{
    struct h2_session *s = xcalloc(1, sizeof(*s));
    struct h2_limits l = limits != NULL ? *limits : (struct h2_limits){0};
    live_sessions++;
    s->role = role;
    s->cb = *cb;
    s->user = user;
    s->lim.max_concurrent_streams =
        pick(l.max_concurrent_streams, H2_DEFAULT_MAX_CONCURRENT_STREAMS);
    s->lim.max_header_list_bytes = pick(l.max_header_list_bytes, H2_DEFAULT_MAX_HEADER_LIST_BYTES);
    s->lim.max_headers = pick(l.max_headers, H2_DEFAULT_MAX_HEADERS);
    s->lim.stream_window_bytes = pick(l.stream_window_bytes, H2_DEFAULT_STREAM_WINDOW_BYTES);
    s->lim.conn_window_bytes = pick(l.conn_window_bytes, H2_DEFAULT_CONN_WINDOW_BYTES);
    s->lim.max_continuations = pick(l.max_continuations, H2_DEFAULT_MAX_CONTINUATIONS);
    s->lim.reset_burst = pick(l.reset_burst, H2_DEFAULT_RESET_BURST);
    s->lim.reset_rate_per_s = pick(l.reset_rate_per_s, H2_DEFAULT_RESET_RATE_PER_S);
    s->lim.max_outbound_ack = pick(l.max_outbound_ack, H2_DEFAULT_MAX_OUTBOUND_ACK);
    s->lim.max_settings = pick(l.max_settings, H2_DEFAULT_MAX_SETTINGS);
    if (s->lim.stream_window_bytes > H2_WINDOW_MAX)
        s->lim.stream_window_bytes = H2_WINDOW_MAX;
    if (s->lim.conn_window_bytes > H2_WINDOW_MAX)
        s->lim.conn_window_bytes = H2_WINDOW_MAX;
    /* RFC 9113 section 6.9.2: the connection window starts at 65535 and only grows. */
    if (s->lim.conn_window_bytes < 65535)
        s->lim.conn_window_bytes = 65535;
    s->hf = xcalloc(s->lim.max_headers, sizeof(*s->hf));
    s->hdrs = xcalloc(s->lim.max_headers, sizeof(*s->hdrs));
    s->rst_tokens_milli = (uint64_t)s->lim.reset_burst * 1000;
    s->rst_last_ms = util_now_ms();

    nghttp2_session_callbacks *cbs;
    if (nghttp2_session_callbacks_new(&cbs) != 0)
        abort(); /* only NGHTTP2_ERR_NOMEM, which our allocator never returns */
    nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, cb_begin_frame);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, cb_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, cb_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, cb_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, cb_data_chunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, cb_stream_close);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, cb_frame_send);
    nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cbs, cb_invalid_frame);

    nghttp2_option *opt;
    if (nghttp2_option_new(&opt) != 0)
        abort();
    /* The caller opens the windows (h2_consume): that is the back-pressure. */
    nghttp2_option_set_no_auto_window_update(opt, 1);
    /* No RFC 7540 priority tree, so closed streams need not be kept for it. */
    nghttp2_option_set_no_closed_streams(opt, 1);
    nghttp2_option_set_max_outbound_ack(opt, s->lim.max_outbound_ack);
    nghttp2_option_set_max_settings(opt, s->lim.max_settings);
    nghttp2_option_set_max_continuations(opt, s->lim.max_continuations);
    /* Debian's 1.52.0-1+deb12u1 backport of the rapid-reset fix: a looser backstop behind our
     * own bucket (cb_frame_recv), which answers first and ends the session outright. */
    nghttp2_option_set_stream_reset_rate_limit(opt, 2 * (uint64_t)s->lim.reset_burst,
                                               2 * (uint64_t)s->lim.reset_rate_per_s);

    nghttp2_mem mem = {NULL, mem_malloc, mem_free, mem_calloc, mem_realloc};
    int rv = role == H2_SERVER ? nghttp2_session_server_new3(&s->ng, cbs, s, opt, &mem)
                               : nghttp2_session_client_new3(&s->ng, cbs, s, opt, &mem);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cbs);
    if (rv != 0)
        abort(); /* only NGHTTP2_ERR_NOMEM */

    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, s->lim.max_concurrent_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, s->lim.stream_window_bytes},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, s->lim.max_header_list_bytes},
        {NGHTTP2_SETTINGS_NO_RFC7540_PRIORITIES, 1},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0}, /* a client's only: servers do not send it */
    };
    size_t niv = sizeof(iv) / sizeof(iv[0]) - (role == H2_SERVER ? 1 : 0);
    nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, iv, niv);
    nghttp2_session_set_local_window_size(s->ng, NGHTTP2_FLAG_NONE, 0,
                                          (int32_t)s->lim.conn_window_bytes);
    return s;
}

void h2_session_free(struct h2_session *s)
{
    if (s == NULL)
        return;
    nghttp2_session_del(s->ng);
    while (s->streams != NULL)
        stream_free(s, s->streams);
    free(s->hbuf);
    free(s->hf);
    free(s->hdrs);
    free(s);
    /* The last session of the thread: an idle worker keeps no cached blocks. */
    if (live_sessions > 0 && --live_sessions == 0)
        memcache_trim();
}

/*
 * nghttp2 bounds the PING and SETTINGS acks a peer that does not read can pile up, but not the
 * RST_STREAM frames it queues for refused or malformed streams, nor WINDOW_UPDATEs: a client
 * sending small bad HEADERS without ever reading would grow the queue without end. A server's
 * legitimate queue holds acks (their own bound) and a few frames per open stream (1xx and
 * final heads, trailers, a reset, a window update); past that, the peer is flooding.
 */
static size_t outbound_queue_max(const struct h2_session *s)
{
    return (size_t)s->lim.max_outbound_ack + 5 * (size_t)s->lim.max_concurrent_streams;
}

static ssize_t feed(struct h2_session *s, const uint8_t *buf, size_t len)
{
    if (s->failed)
        return -EPROTO;
    ssize_t r = nghttp2_session_mem_recv(s->ng, buf, len);
    if (r >= 0 && s->why[0] == '\0' && s->role == H2_SERVER &&
        nghttp2_session_get_outbound_queue_size(s->ng) > outbound_queue_max(s)) {
        terminate(s, H2_ENHANCE_YOUR_CALM, "outbound frame flood (peer does not read)");
        return -EPROTO;
    }
    if (r >= 0 && s->why[0] == '\0')
        return r;
    if (r >= 0) {
        /* One of our own bounds ended the session (GOAWAY queued). */
        return -EPROTO;
    }
    switch (r) {
    case NGHTTP2_ERR_BAD_CLIENT_MAGIC:
        /* Not HTTP/2 at all: there is nobody to send a GOAWAY to. */
        set_why(s, "bad client preface", NULL);
        s->failed = 1;
        return -EPROTO;
    case NGHTTP2_ERR_FLOODED:
        /* The peer does not read our acks: GOAWAY would queue behind them. */
        set_why(s, "PING/SETTINGS flood", NULL);
        s->failed = 1;
        return -EPROTO;
    case NGHTTP2_ERR_TOO_MANY_CONTINUATIONS:
        terminate(s, H2_ENHANCE_YOUR_CALM, "header block flood (CONTINUATION)");
        return -EPROTO;
    case NGHTTP2_ERR_CALLBACK_FAILURE:
        /* Only cb_begin_frame fails, for a header block flood (its reason is set). */
        terminate(s, H2_ENHANCE_YOUR_CALM, "callback failure");
        return -EPROTO;
    default:
        set_why(s, "nghttp2: ", nghttp2_strerror((int)r));
        terminate(s, H2_INTERNAL_ERROR, "internal error");
        return -EPROTO;
    }
}

ssize_t h2_feed(struct h2_session *s, const uint8_t *buf, size_t len)
{
    ssize_t r = feed(s, buf, len);
    changed(s);
    return r;
}

ssize_t h2_output(struct h2_session *s, uint8_t *buf, size_t cap)
{
    size_t n = 0;
    int drained = 0;
    while (n < cap) {
        if (s->npend == 0) {
            if (s->failed)
                break;
            const uint8_t *p;
            ssize_t r = nghttp2_session_mem_send(s->ng, &p);
            if (r < 0) {
                set_why(s, "nghttp2: ", nghttp2_strerror((int)r));
                s->failed = 1;
                changed(s);
                return n > 0 ? (ssize_t)n : -EPROTO;
            }
            if (r == 0) {
                drained = 1;
                break;
            }
            s->pend = p;
            s->npend = (size_t)r;
        }
        size_t k = s->npend < cap - n ? s->npend : cap - n;
        memcpy(buf + n, s->pend, k);
        s->pend += k;
        s->npend -= k;
        n += k;
    }
    /*
     * Sending changes the session (a stream closes once its last frame is out, a GOAWAY ends
     * reading). When nghttp2 had nothing more, it has nothing until the session changes
     * again: callbacks that submitted something during this call did so before it said so,
     * since nghttp2 takes newly queued frames before it answers 0.
     */
    s->known = drained ? KNOWN_WRITE : 0;
    s->can_write = 0;
    return (ssize_t)n;
}

int h2_wants_write(struct h2_session *s)
{
    if (s->npend > 0)
        return 1;
    if (s->failed)
        return 0;
    if (!(s->known & KNOWN_WRITE)) {
        s->can_write = nghttp2_session_want_write(s->ng) != 0;
        s->known |= KNOWN_WRITE;
    }
    return s->can_write;
}

int h2_wants_read(struct h2_session *s)
{
    /* A reason is only recorded when the session ends: read nothing more after it. */
    if (s->failed || s->why[0] != '\0')
        return 0;
    if (!(s->known & KNOWN_READ)) {
        s->can_read = nghttp2_session_want_read(s->ng) != 0;
        s->known |= KNOWN_READ;
    }
    return s->can_read;
}

const char *h2_error(const struct h2_session *s)
{
    return s->why[0] != '\0' ? s->why : NULL;
}

const struct h2_stats *h2_get_stats(const struct h2_session *s)
{
    return &s->stats;
}

/* ---- sending -------------------------------------------------------------------------- */

/* RFC 9113 section 8.2.2: fields HTTP/2 forbids. */
static int connection_specific(const struct http_header *h)
{
    static const char *const names[] = {"connection", "keep-alive", "proxy-connection",
                                        "transfer-encoding", "upgrade"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (slice_is(h->name.p, h->name.len, names[i]))
            return 1;
    if (slice_is(h->name.p, h->name.len, "te"))
        return !slice_is(h->value.p, h->value.len, "trailers");
    return 0;
}

static void nv_add(nghttp2_nv *nv, size_t *n, const char *name, size_t nlen, const char *value,
                   size_t vlen)
{
    nv[*n] = (nghttp2_nv){(uint8_t *)(uintptr_t)name, (uint8_t *)(uintptr_t)value, nlen, vlen,
                          NGHTTP2_NV_FLAG_NONE};
    (*n)++;
}

/*
 * Whether a field's value is new on every message, so that HPACK's dynamic table gains
 * nothing from it: X-Request-Id (a fresh UUID per request). Such a field is sent never
 * indexed. Indexed, each one would take a table entry of its own, pushing out the entries
 * that do repeat (X-Forwarded-Client-Cert, say), and nghttp2 compares every new value with
 * each entry of the same name before adding it (~100 memcmp() per request seen on the
 * inbound sidecar, all of them misses).
 */
static int unique_per_message(const char *lname, size_t len)
{
    return len == 12 && memcmp(lname, "x-request-id", 12) == 0;
}

/* Room on the caller's stack for the field list of a usual head (nghttp2 copies it). */
struct nv_space {
    nghttp2_nv nv[40];
    char names[1024];
};

/*
 * Builds the field list of a head or trailers: pseudo-fields first, then <fields> lowered and
 * filtered. *<nv> and *<names> are in <sp> when they fit, else fresh allocations; the caller
 * gives them back with nv_release(). Returns the count, or -EINVAL for a field that cannot be
 * sent. (Two allocations per head cost ~500 instructions, four heads per proxied request.)
 */
static ssize_t build_nv(const struct h2_out_head *h, const struct http_header *fields, size_t n,
                        char *status, struct nv_space *sp, nghttp2_nv **nvp, char **namesp)
{
    size_t total = 0, k = 0;
    for (size_t i = 0; i < n; i++)
        if (!(fields[i].flags & HTTP_HDR_H2OK))
            total += fields[i].name.len;
    nghttp2_nv *nv =
        n + 5 <= sizeof(sp->nv) / sizeof(sp->nv[0]) ? sp->nv : xcalloc(n + 5, sizeof(*nv));
    char *names = total <= sizeof(sp->names) ? sp->names : xmalloc(total);
    *nvp = nv;
    *namesp = names;
    if (h != NULL) {
        if (h->status != 0) {
            nv_add(nv, &k, ":status", 7, status, 3);
        } else {
            nv_add(nv, &k, ":method", 7, h->method.p, h->method.len);
            if (h->scheme.p != NULL)
                nv_add(nv, &k, ":scheme", 7, h->scheme.p, h->scheme.len);
            if (h->authority.p != NULL)
                nv_add(nv, &k, ":authority", 10, h->authority.p, h->authority.len);
            if (h->path.p != NULL)
                nv_add(nv, &k, ":path", 5, h->path.p, h->path.len);
        }
        for (size_t i = 0; i < k; i++) {
            if (!h2_value_ok(nv[i].value, nv[i].valuelen) || nv[i].valuelen == 0)
                return -EINVAL;
            /* The names are string constants in lower case: nghttp2 need not copy and lower
             * them (the values it copies). */
            nv[i].flags = NGHTTP2_NV_FLAG_NO_COPY_NAME;
        }
    }
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        const struct http_header *f = &fields[i];
        if (f->flags & (HTTP_HDR_HOP | HTTP_HDR_DUP))
            continue;
        if (h != NULL && h->authority.p != NULL && slice_is(f->name.p, f->name.len, "host"))
            continue;
        const char *lname = f->name.p;
        if (!(f->flags & HTTP_HDR_H2OK)) {
            /* Not known to be fit (from HTTP/1.1, a route's modifiers, connectd's own): lower
             * the name and check it all, as nghttp2 would check it on receipt. */
            if (connection_specific(f))
                continue;
            char *low = names + used;
            for (size_t c = 0; c < f->name.len; c++)
                low[c] = (char)lower((unsigned char)f->name.p[c]);
            used += f->name.len;
            lname = low;
            if (f->name.len == 0 || lname[0] == ':' ||
                !nghttp2_check_header_name((const uint8_t *)lname, f->name.len) ||
                !h2_value_ok(f->value.p, f->value.len))
                return -EINVAL;
        }
        nv_add(nv, &k, lname, f->name.len, f->value.p, f->value.len);
        if (unique_per_message(lname, f->name.len))
            nv[k - 1].flags = NGHTTP2_NV_FLAG_NO_INDEX;
    }
    return (ssize_t)k;
}

static void nv_release(struct nv_space *sp, nghttp2_nv *nv, char *names)
{
    if (nv != sp->nv)
        free(nv);
    if (names != sp->names)
        free(names);
}

int32_t h2_submit_request(struct h2_session *s, const struct h2_out_head *head, int has_body,
                          void *stream_user)
{
    changed(s);
    if (s->role != H2_CLIENT || head->method.p == NULL || head->status != 0)
        return -EINVAL;
    if (s->failed || !nghttp2_session_check_request_allowed(s->ng))
        return -ESHUTDOWN;
    struct nv_space sp;
    nghttp2_nv *nv;
    char *names;
    ssize_t n = build_nv(head, head->headers, head->nheaders, NULL, &sp, &nv, &names);
    int32_t id = -EINVAL;
    if (n < 0)
        goto out;
    struct stream *st = stream_new(s, 0, stream_user);
    nghttp2_data_provider prd = {{.ptr = st}, cb_read_body};
    id = nghttp2_submit_request(s->ng, NULL, nv, (size_t)n, has_body ? &prd : NULL, st);
    if (id < 0) {
        stream_free(s, st);
        id = id == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE ? -ESHUTDOWN : -EINVAL;
        goto out;
    }
    st->id = id;
    st->flags |= ST_HANDED;
    s->stats.streams_opened++;
out:
    nv_release(&sp, nv, names);
    return id;
}

int h2_submit_response(struct h2_session *s, int32_t stream_id, const struct h2_out_head *head,
                       int has_body)
{
    changed(s);
    struct stream *st = stream_get(s, stream_id);
    if (s->role != H2_SERVER || st == NULL || head->status < 100 || head->status > 599)
        return -EINVAL;
    if (st->flags & ST_RESP)
        return -EALREADY;
    int interim = head->status < 200;
    if (interim && has_body)
        return -EINVAL;
    /* Three digits (100-599, checked above), without snprintf() for each response. */
    char status[4] = {(char)('0' + head->status / 100), (char)('0' + head->status / 10 % 10),
                      (char)('0' + head->status % 10), '\0'};
    struct nv_space sp;
    nghttp2_nv *nv;
    char *names;
    int rc = -EINVAL;
    ssize_t n = build_nv(head, head->headers, head->nheaders, status, &sp, &nv, &names);
    if (n < 0)
        goto out;
    if (interim) {
        rc = nghttp2_submit_headers(s->ng, NGHTTP2_FLAG_NONE, stream_id, NULL, nv, (size_t)n, NULL);
    } else {
        nghttp2_data_provider prd = {{.ptr = st}, cb_read_body};
        rc = nghttp2_submit_response(s->ng, stream_id, nv, (size_t)n, has_body ? &prd : NULL);
        if (rc == 0)
            st->flags |= ST_RESP;
    }
    rc = rc < 0 ? -EINVAL : 0;
out:
    nv_release(&sp, nv, names);
    return rc;
}

int h2_submit_trailers(struct h2_session *s, int32_t stream_id, const struct http_header *fields,
                       size_t n)
{
    changed(s);
    if (stream_get(s, stream_id) == NULL)
        return -EINVAL;
    struct nv_space sp;
    nghttp2_nv *nv;
    char *names;
    int rc = -EINVAL;
    ssize_t k = build_nv(NULL, fields, n, NULL, &sp, &nv, &names);
    if (k >= 0)
        rc = nghttp2_submit_trailer(s->ng, stream_id, nv, (size_t)k) == 0 ? 0 : -EINVAL;
    nv_release(&sp, nv, names);
    return rc;
}

int h2_resume(struct h2_session *s, int32_t stream_id)
{
    changed(s);
    if (stream_get(s, stream_id) == NULL)
        return -EINVAL;
    int rv = nghttp2_session_resume_data(s->ng, stream_id);
    /* INVALID_ARGUMENT: the stream's data was not deferred, which is harmless. */
    return rv == 0 || rv == NGHTTP2_ERR_INVALID_ARGUMENT ? 0 : -EINVAL;
}

int h2_submit_rst(struct h2_session *s, int32_t stream_id, uint32_t code)
{
    changed(s);
    /* A client request still queued (its HEADERS not sent yet) has no nghttp2 stream yet: its
     * HEADERS are cancelled and, when nghttp2 would have sent them, the stream is opened and
     * closed with <code> (on_close). */
    if (stream_get(s, stream_id) == NULL && stream_find(s, stream_id) == NULL)
        return -EINVAL;
    return nghttp2_submit_rst_stream(s->ng, NGHTTP2_FLAG_NONE, stream_id, code) == 0 ? 0 : -EINVAL;
}

int h2_shutdown(struct h2_session *s)
{
    changed(s);
    int32_t last = nghttp2_session_get_last_proc_stream_id(s->ng);
    int rv = nghttp2_submit_goaway(s->ng, NGHTTP2_FLAG_NONE, last, NGHTTP2_NO_ERROR, NULL, 0);
    return rv == 0 ? 0 : -EALREADY;
}

int h2_shutdown_before(struct h2_session *s, int32_t stream_id)
{
    changed(s);
    int32_t last = nghttp2_session_get_last_proc_stream_id(s->ng);
    /* A peer's streams have odd ids, in order: the one before <stream_id> is 2 less. */
    if (stream_id > 0 && stream_id - 2 < last)
        last = stream_id > 2 ? stream_id - 2 : 0;
    int rv = nghttp2_submit_goaway(s->ng, NGHTTP2_FLAG_NONE, last, NGHTTP2_NO_ERROR, NULL, 0);
    return rv == 0 ? 0 : -EALREADY;
}

int h2_terminate(struct h2_session *s, uint32_t code)
{
    changed(s);
    return nghttp2_session_terminate_session(s->ng, code) == 0 ? 0 : -EALREADY;
}

int h2_consume(struct h2_session *s, int32_t stream_id, size_t n)
{
    changed(s);
    struct stream *st = stream_get(s, stream_id);
    if (st == NULL)
        return stream_id > 0 ? 0 : -EINVAL;
    if (n > st->unconsumed)
        return -EINVAL;
    st->unconsumed -= n;
    return nghttp2_session_consume(s->ng, stream_id, n) == 0 ? 0 : -EINVAL;
}

int h2_stream_set_user(struct h2_session *s, int32_t stream_id, void *stream_user)
{
    struct stream *st = stream_get(s, stream_id);
    if (st == NULL)
        st = stream_find(s, stream_id);
    if (st == NULL)
        return -EINVAL;
    st->user = stream_user;
    return 0;
}

int64_t h2_send_window(const struct h2_session *s, int32_t stream_id)
{
    if (stream_id == 0)
        return nghttp2_session_get_remote_window_size(s->ng);
    if (stream_lookup(s, stream_id) == NULL)
        return -1;
    return nghttp2_session_get_stream_remote_window_size(s->ng, stream_id);
}

size_t h2_open_streams(const struct h2_session *s)
{
    return s->nstreams;
}

uint32_t h2_peer_max_streams(const struct h2_session *s)
{
    uint32_t v =
        nghttp2_session_get_remote_settings(s->ng, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
    return v > 1000u ? 1000u : v;
}

int h2_preface_check(const void *p, size_t n)
{
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    size_t k = n < H2_PREFACE_LEN ? n : H2_PREFACE_LEN;
    if (k == 0)
        return 0;
    if (memcmp(p, preface, k) != 0)
        return -1;
    return n >= H2_PREFACE_LEN ? 1 : 0;
}
