"""Differential test of src/h1parse.c against an independent HTTP/1.1 parser, Python's h11.

Each input (every file of the fuzz corpus tests/fuzz/corpus/h1parse plus generated cases) is
read as a stream of pipelined requests by both: by tests/unit/h1parse_dump.c (built by the
Makefile like the unit tests, not part of connectd) and by an h11 server connection. For each
request the verdict, method, target, version, header list and body must agree, and so must
the way the stream ends (incomplete, refused, or done).

Our parser is stricter than h11 on purpose (L7.md section 2), so a disagreement where we
refuse what h11 accepts is allowed only when the input shows one of the features in STRICTER,
each with its reason. Every other disagreement fails, in particular any input we accept and
h11 refuses.
"""
import json
import os
import re
import subprocess

import pytest

import h11  # scripts/deps installs it; missing, the comparison must fail, not skip

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CORPUS = os.path.join(REPO, "tests", "fuzz", "corpus", "h1parse")
HEAD_MAX = 60 * 1024
DUMP_SLOTS = 100  # header slots of h1parse_dump


@pytest.fixture(scope="module")
def dump_bin():
    subprocess.run(["make", "-s", "VARIANT=asan", "test-tools"], cwd=REPO, check=True)
    return os.path.join(REPO, "build", "asan", "tests", "h1parse_dump")


def ours(dump_bin, data):
    """[(kind, request-dict)...] then a final ("end"|"again"|"bad", why)."""
    out = subprocess.run([dump_bin], input=data, capture_output=True, check=True).stdout
    msgs, end, off = [], ("end", "", 0), 0
    for line in out.decode("ascii").splitlines():
        d = json.loads(line)
        if not d["ok"]:
            end = ("again" if d["error"] == "EAGAIN" else "bad", d["why"], off)
            break
        b = lambda s: s.encode("latin-1")  # noqa: E731
        msgs.append({
            "method": b(d["method"]),
            "target": b(d["target"]),
            "version": d["version"].encode(),
            # Identical duplicate Content-Lengths are folded (flag 2), as h11 folds them.
            "headers": [norm(b(n), b(v)) for n, v, fl in d["headers"] if not fl & 2],
            "body": b(d["body"]) if "body" in d else None,
            "start": off,
        })
        off += d["len"] + d.get("used", 0)
    return msgs, end


def norm(name, value):
    name = name.lower()
    if name == b"transfer-encoding":
        value = value.lower()  # h11 lower-cases it
    return (name, value)


def theirs(data):
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_MAX)
    conn.receive_data(data)
    msgs, cur = [], None
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as e:
            return msgs, ("bad", str(e))
        if ev is h11.NEED_DATA:
            if cur is None and not conn.trailing_data[0]:
                return msgs, ("end", "")
            return msgs, ("again", "")
        if ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
            return msgs, ("end", "")
        if isinstance(ev, h11.Request):
            cur = {
                "method": ev.method,
                "target": ev.target,
                "version": ev.http_version,
                "headers": [norm(n, v) for n, v in ev.headers.raw_items()],
                "body": None,
            }
            body = b""
            msgs.append(cur)
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            cur["body"] = body
            cur = None
            try:
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                return msgs, ("end", "")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return msgs, ("end", "")
            conn.start_next_cycle()


def has_bare_lf(d):
    return re.search(rb"(?<!\r)\n", d) is not None


def has_ctl_in_field(d):
    return re.search(rb"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]", d) is not None


def bad_connection(d):
    tchar = re.compile(rb"^[-!#$%&'*+.^_`|~0-9A-Za-z]+$")
    for v in re.findall(rb"(?im)^connection:([^\r\n]*)", d):
        elems = [e.strip(b" \t") for e in v.split(b",")]
        toks = [e for e in elems if e]
        if len(toks) > 16 or not all(tchar.match(t) for t in toks):
            return True
    return False


# Where we refuse on purpose what h11 accepts: (name, reason, predicate over the input).
STRICTER = [
    ("bare-lf", "a line must end in CRLF; h11 also accepts a bare LF (L7.md: bare CR/LF)",
     has_bare_lf),
    ("control-char", "RFC 9110 5.5: no control character but HTAB in a field value or line; "
     "h11's field-value class only excludes NUL and whitespace", has_ctl_in_field),
    ("target-form", "RFC 9112 3.2: '*' only for OPTIONS, authority-form only (and always) for "
     "CONNECT, otherwise origin- or absolute-form; h11 takes any VCHARs",
     lambda d: re.match(rb"(CONNECT |[A-Z]+ \* |[!-~]+ [^/ ])", d) is not None),
    ("host-syntax", "RFC 9110 7.2: Host is uri-host [':' port]; h11 takes any field value",
     lambda d: any(re.search(rb"[^-A-Za-z0-9._~!$&'()*+,;=:\[\]%]", v.strip(b" \t"))
                   for v in re.findall(rb"(?im)^host:([^\r\n]*)", d))),
    ("obs-fold", "RFC 9112 5.2: obs-fold is refused by a proxy (or replaced); h11 unfolds it",
     lambda d: re.search(rb"\r?\n[ \t]", d.split(b"\r\n\r\n")[0]) is not None),
    ("cl-and-te", "L7.md 2: a request with both Content-Length and Transfer-Encoding is refused; "
     "h11 lets Transfer-Encoding win (RFC 9112 6.3 allows either)",
     lambda d: re.search(rb"(?im)^content-length:", d) and
     re.search(rb"(?im)^transfer-encoding:", d)),
    ("chunk-size-ws", "RFC 9112 7.1: whitespace after a chunk size is allowed only before ';'; "
     "h11 allows trailing whitespace", lambda d: re.search(rb"(?m)^[0-9A-Fa-f]+[ \t]+\r?$", d)),
    ("te-http10", "RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing; h11 "
     "decodes it", lambda d: re.match(rb"[^\r\n]* HTTP/1\.0\r?\n", d) and
     re.search(rb"(?im)^transfer-encoding:", d)),
    ("head-size", "a head over 60 KiB is refused; h11 checks its limit only while a head is "
     "incomplete, so one that arrives whole passes", lambda d: len(d) > HEAD_MAX),
    ("several-host", "RFC 9112 3.2: exactly one Host; h11 does not count them",
     lambda d: len(re.findall(rb"(?im)^host:", d)) > 1),
    ("content-length-list", "we fold identical Content-Length fields but refuse a list within "
     "one field ('3, 3'); h11 folds both",
     lambda d: re.search(rb"(?im)^content-length:[^\r\n]*,", d) is not None),
    ("content-length-digits", "a Content-Length over 18 digits could overflow a reader; h11 "
     "takes any digits", lambda d: re.search(rb"(?im)^content-length:[ \t]*[0-9]{19}", d)),
    ("connection-syntax", "the Connection tokens name the fields we drop, so the list must "
     "parse (at most %d tokens); h11 does not read it strictly" % 16, bad_connection),
    ("chunk-size-digits", "more than 16 hex digits (even leading zeros) in a chunk size; h11 "
     "allows 20", lambda d: re.search(rb"(?m)^[0-9A-Fa-f]{17}", d) is not None),
    ("version", "only HTTP/1.0 and HTTP/1.1; h11 takes HTTP/1.x and any later major version",
     lambda d: re.search(rb"HTTP/(1\.[2-9]|[2-9]\.)", d) is not None),
    ("header-slots", "h1parse_dump has %d header slots; h11 has no count limit" % DUMP_SLOTS,
     lambda d: d.count(b"\n") > DUMP_SLOTS),
]


def verdict(r):
    msgs, end = r
    return [(m["method"], m["target"], m["version"], m["headers"], m["body"]) for m in msgs], end


def compare(dump_bin, data):
    """None when both agree, else the disagreement as text."""
    a, b = ours(dump_bin, data), theirs(data)
    va, vb = verdict(a), verdict(b)
    if va[0] == vb[0] and va[1][0] == vb[1][0]:
        return None
    return "ours=%r\nh11=%r" % (va, vb)


# Rules that explain a refused body rather than a refused head.
BODY_RULES = {"bare-lf", "control-char", "chunk-size-digits", "chunk-size-ws"}


def stricter_reason(dump_bin, data):
    """The STRICTER rule that explains a disagreement where we refuse and h11 accepts."""
    a, b = ours(dump_bin, data), theirs(data)
    # h11 closes after every HTTP/1.0 request; we honour "Connection: keep-alive" there
    # (L7.md 2: HTTP/1.0 keep-alive as negotiated) and read the next request, which h11
    # never sees.
    n = len(b[0])
    if (b[1][0] == "end" and 0 < n <= len(a[0]) and b[0][-1]["version"] == b"1.0" and
            verdict(a)[0][:n] == verdict(b)[0]):
        return "http10-keep-alive"
    # Same messages up to where we stop, and there we refuse while h11 goes on.
    if a[1][0] != "bad" or len(a[0]) > len(b[0]):
        return None
    # Where we stopped: the refused head, or the body of the last message when it was refused.
    seg = data[a[1][2]:]
    in_body = bool(a[0]) and a[0][-1]["body"] is None
    if not in_body and b"\r\n\r\n" in seg:
        seg = seg[:seg.index(b"\r\n\r\n") + 4]
    va, vb = verdict(a)[0], verdict(b)[0][:len(a[0])]
    if in_body:  # the refused body's message agrees up to its body
        va, vb = va[:-1] + [va[-1][:4]], vb[:-1] + [vb[-1][:4]]
    if va != vb:
        return None
    for name, _, pred in STRICTER:
        if (not in_body or name in BODY_RULES) and pred(seg):
            return name
    return None


def corpus_inputs():
    for name in sorted(os.listdir(CORPUS)):
        with open(os.path.join(CORPUS, name), "rb") as f:
            yield "corpus/" + name, f.read()


BASE = b"GET /p?q=1 HTTP/1.1\r\nHost: example.com\r\nX-Field: value\r\n\r\n"


def generated_inputs():
    # Every byte in each part of a request: method, target, field name, field value.
    for c in range(256):
        bc = bytes([c])
        yield "method-%02x" % c, b"G" + bc + b"T / HTTP/1.1\r\nHost: h\r\n\r\n"
        yield "target-%02x" % c, b"GET /a" + bc + b"b HTTP/1.1\r\nHost: h\r\n\r\n"
        yield "name-%02x" % c, b"GET / HTTP/1.1\r\nHost: h\r\nX" + bc + b"Y: v\r\n\r\n"
        yield "value-%02x" % c, b"GET / HTTP/1.1\r\nHost: h\r\nX: a" + bc + b"b\r\n\r\n"
        yield "host-%02x" % c, b"GET / HTTP/1.1\r\nHost: a" + bc + b"b\r\n\r\n"
        yield "chunk-%02x" % c, (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                                 b"\r\n1" + bc + b"\r\nx\r\n0\r\n\r\n")
    # Every truncation of a pipelined stream with a chunked body.
    stream = (b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"
              b"GET /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok")
    for i in range(len(stream) + 1):
        yield "truncated-%d" % i, stream[:i]
    # Framing headers, one by one and paired.
    framings = [b"Content-Length: 3", b"Content-Length: 03", b"Content-Length: 3, 3",
                b"Content-Length: 4", b"Content-Length: -1", b"Content-Length: 3 ",
                b"Transfer-Encoding: chunked", b"Transfer-Encoding: CHUNKED",
                b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: identity",
                b"Transfer-Encoding: chunked , ", b"Connection: close",
                b"Connection: keep-alive", b"Expect: 100-continue", b"Host: other"]
    for i, f1 in enumerate(framings):
        for j, f2 in enumerate(framings):
            for v in (b"1.1", b"1.0"):
                yield "framing-%d-%d-%s" % (i, j, v.decode()), (
                    b"POST / HTTP/" + v + b"\r\nHost: h\r\n" + f1 + b"\r\n" + f2 +
                    b"\r\n\r\n0\r\n\r\nabcGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    for v in (b"HTTP/1.0", b"HTTP/1.1", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/1", b"http/1.1"):
        yield "version-" + v.decode(), b"GET / " + v + b"\r\nHost: h\r\n\r\n"
    for t in (b"*", b"/", b"http://h/x", b"h:443", b"foo", b"//x", b"HTTP://h"):
        for m in (b"GET", b"OPTIONS", b"CONNECT"):
            yield "form-%s-%s" % (m.decode(), t.decode()), m + b" " + t + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    yield "obs-fold", BASE[:-2] + b" folded\r\n\r\n"
    yield "connection-not-a-list", b"GET / HTTP/1.1\r\nHost: h\r\nConnection: a b\r\n\r\n"
    yield "connection-17-tokens", (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: " +
                                   b",".join(b"t%d" % i for i in range(17)) + b"\r\n\r\n")
    yield "ws-before-colon", b"GET / HTTP/1.1\r\nHost : h\r\n\r\n"
    yield "leading-crlf", b"\r\n" + BASE
    yield "no-host", b"GET / HTTP/1.1\r\n\r\n"
    yield "many-fields", b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 150 + b"\r\n"
    yield "huge-head", b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * (HEAD_MAX + 10) + b"\r\n\r\n"


ALL = list(corpus_inputs()) + list(generated_inputs())


def test_h1parse_agrees_with_h11(dump_bin):
    failures, allowed = [], {}
    for name, data in ALL:
        diff = compare(dump_bin, data)
        if diff is None:
            continue
        why = stricter_reason(dump_bin, data)
        if why is None:
            failures.append("%s: %r\n%s" % (name, data[:200], diff[:600]))
        else:
            allowed.setdefault(why, []).append(name)
    for why, names in sorted(allowed.items()):
        print("allowed disagreement %s (%d): %s" % (why, len(names), " ".join(names[:8])))
    assert not failures, "%d disagreements with h11:\n\n%s" % (
        len(failures), "\n\n".join(failures[:20]))
    # The comparison is not vacuous: most inputs agree, accepted and refused alike.
    agreed = len(ALL) - sum(len(v) for v in allowed.values())
    assert agreed > len(ALL) // 2


def test_dump_sees_pipelined_requests_in_order(dump_bin):
    msgs, end = ours(dump_bin, b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
                               b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert [m["target"] for m in msgs] == [b"/1", b"/2"] and end[0] == "end"
