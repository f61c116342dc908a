/*
 * rx: RE2-style regular expressions on PCRE2.
 *
 * Two steps make PCRE2 behave as RE2 does for the patterns Consul users write. First a small
 * scanner walks the pattern (escapes, \Q...\E, character classes, groups, quantifiers) and
 * refuses every construct RE2 does not have; the checks are textual because PCRE2 has no
 * option to turn most of them off. Then PCRE2 compiles it with the options that give RE2's
 * meaning: anchored at both ends (Envoy's safe_regex is a full match), UTF-8 with invalid
 * subjects matching nothing rather than failing, $ only at the very end, \C refused, no
 * Unicode properties for \d \w \s (ASCII, as RE2).
 *
 * RE2 runs in linear time; PCRE2 backtracks. The match limit, depth limit and heap limit bound
 * a single match (a catastrophic pattern such as (a+)+$ against a long subject stops at the
 * limit and reports -ERANGE), and the JIT's default 32 KiB stack bounds the compiled code. A
 * caller treats -ERANGE as "unknown" and fails closed.
 *
 * Thread safety: the code, its JIT code and the match context are written once in
 * rx_compile() and only read afterwards; PCRE2 documents compiled patterns and contexts as
 * shareable between threads. Each rx_match() call makes its own match data block.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "rx.h"

#include <errno.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/*
 * A backtracking step budget per match. (a+)+$ on 30 a's and a b needs about 2^30 steps; a
 * sane pattern over a 60 KiB header value needs well under this. Reaching it costs a few
 * milliseconds at most.
 */
#define RX_MATCH_LIMIT    200000u
#define RX_DEPTH_LIMIT    10000u
#define RX_HEAP_LIMIT_KIB 4096u

struct rx {
    pcre2_code *code;
    pcre2_match_context *mctx;
    int jit; /* compiled to machine code: a match keeps no frames in its match data */
    /* The fewest characters a match has (PCRE2_INFO_MINLENGTH): a shorter subject, in
     * bytes, cannot match, and is answered without a call into PCRE2 (a route's path regex
     * on "/" of most requests). */
    uint32_t min_len;
};

/*
 * The match-data block a thread's JIT matches share, made at its first one and freed when
 * the thread ends: a block per match cost a malloc and a free on every regex a route or
 * an intention evaluates. Only JIT matches share it: the interpreter keeps its backtracking
 * frames in the block (up to RX_HEAP_LIMIT_KIB), which must not outlive the match.
 */
static pthread_key_t md_key;
static pthread_once_t md_once = PTHREAD_ONCE_INIT;
static _Thread_local pcre2_match_data *md_mine;

static void md_free(void *md)
{
    pcre2_match_data_free(md);
}

static void md_key_init(void)
{
    if (pthread_key_create(&md_key, md_free) != 0)
        abort();
}

static pcre2_match_data *thread_md(void)
{
    if (md_mine == NULL) {
        pthread_once(&md_once, md_key_init);
        md_mine = pcre2_match_data_create(1, NULL);
        if (md_mine != NULL && pthread_setspecific(md_key, md_mine) != 0) {
            pcre2_match_data_free(md_mine);
            md_mine = NULL;
        }
    }
    return md_mine;
}

static int refuse(char *err, size_t errlen, size_t at, const char *what)
{
    if (err != NULL && errlen > 0)
        snprintf(err, errlen, "%s (offset %zu)", what, at);
    return -EINVAL;
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/*
 * Parses a counted repetition "{n}", "{n,}" or "{n,m}" at p[i] == '{'. Returns the index just
 * past the '}' with the largest count in *max, or 0 when the brace is a literal (PCRE2 and RE2
 * both read a brace that does not start a well-formed count as a literal).
 */
static size_t counted(const char *p, size_t n, size_t i, unsigned long *max)
{
    size_t j = i + 1;
    unsigned long a = 0, b = 0;
    int digits = 0;
    *max = 0;
    while (j < n && is_digit(p[j])) {
        a = a < 100000 ? a * 10 + (unsigned long)(p[j] - '0') : a;
        j++;
        digits++;
    }
    if (digits == 0)
        return 0;
    b = a;
    if (j < n && p[j] == ',') {
        j++;
        b = 0;
        while (j < n && is_digit(p[j])) {
            b = b < 100000 ? b * 10 + (unsigned long)(p[j] - '0') : b;
            j++;
        }
    }
    if (j >= n || p[j] != '}')
        return 0;
    *max = a > b ? a : b;
    return j + 1;
}

static int name_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

/*
 * At p[j] == '[' and p[j + 1] == ':' inside a class: the index past a POSIX class name's
 * ":]", or 0 when PCRE2 would not read one here. PCRE2's own rule: a ']' or another "[:"
 * before the ":]" means the '[' is a literal, so the scan must not skip past that ']'.
 */
static size_t posix_end(const char *p, size_t n, size_t j)
{
    for (size_t k = j + 2; k < n; k++) {
        if (p[k] == '\\' && k + 1 < n && (p[k + 1] == ']' || p[k + 1] == '\\'))
            k++;
        else if (p[k] == ']' || (p[k] == '[' && k + 1 < n && p[k + 1] == ':'))
            return 0;
        else if (p[k] == ':' && k + 1 < n && p[k + 1] == ']')
            return k + 2;
    }
    return 0;
}

/* Where an escape's argument in braces (\x{41}, \p{Greek}) ends, else i + 2. */
static size_t escape_end(const char *p, size_t n, size_t i)
{
    char e = p[i + 1];
    if ((e == 'x' || e == 'p' || e == 'P') && i + 2 < n && p[i + 2] == '{') {
        const char *close = memchr(p + i + 2, '}', n - i - 2);
        return close != NULL ? (size_t)(close - p) + 1 : n;
    }
    return i + 2;
}

/* Refuses the escapes RE2 lacks or means differently; 0 for the others. */
static int check_escape(const char *p, size_t i, char *err, size_t errlen)
{
    char e = p[i + 1];
    if (e >= '1' && e <= '9')
        return refuse(err, errlen, i, "backreferences are not supported");
    switch (e) {
    case 'g':
    case 'k':
        return refuse(err, errlen, i, "backreferences and subroutine calls are not supported");
    case 'C':
        return refuse(err, errlen, i, "\\C (any single byte) is not supported");
    case 'K':
        return refuse(err, errlen, i, "\\K (reset match start) is not supported");
    case 'G':
        return refuse(err, errlen, i, "\\G is not supported");
    case 'Z':
        return refuse(err, errlen, i, "\\Z is not supported (RE2 has \\z)");
    case 'R':
    case 'X':
    case 'N':
    case 'h':
    case 'H':
    case 'v':
    case 'V':
        return refuse(err, errlen, i, "a PCRE-only escape is not supported");
    default:
        return 0;
    }
}

/* Checks the group opener at p[i] == '(' with p[i + 1] == '?'. */
static int check_group(const char *p, size_t n, size_t i, char *err, size_t errlen)
{
    char a = i + 2 < n ? p[i + 2] : '\0';
    char b = i + 3 < n ? p[i + 3] : '\0';
    switch (a) {
    case ':':
        return 0;
    case 'P':
        if (b == '<')
            return i + 4 < n && name_start(p[i + 4])
                       ? 0
                       : refuse(err, errlen, i, "a group name must start with a letter or '_'");
        if (b == '=')
            return refuse(err, errlen, i, "backreferences are not supported");
        return refuse(err, errlen, i, "recursion and subroutine calls are not supported");
    case '<':
        if (b == '=' || b == '!' || b == '*')
            return refuse(err, errlen, i, "lookahead and lookbehind are not supported");
        if (!name_start(b)) /* PCRE2 has more (?<... forms than names */
            return refuse(err, errlen, i, "a group name must start with a letter or '_'");
        return 0; /* (?<name>...) */
    case '=':
    case '!':
        return refuse(err, errlen, i, "lookahead and lookbehind are not supported");
    case '>':
        return refuse(err, errlen, i, "atomic groups are not supported");
    case '|':
        return refuse(err, errlen, i, "branch reset groups are not supported");
    case '#':
        return refuse(err, errlen, i, "comments are not supported");
    case '(':
        return refuse(err, errlen, i, "conditional groups are not supported");
    case 'C':
        return refuse(err, errlen, i, "callouts are not supported");
    case '\'':
        return refuse(err, errlen, i, "(?'name'...) is not supported (RE2 has (?P<name>...))");
    case 'R':
    case '&':
    case '+':
        return refuse(err, errlen, i, "recursion and subroutine calls are not supported");
    default:
        break;
    }
    if (is_digit(a) || (a == '-' && is_digit(b)))
        return refuse(err, errlen, i, "recursion and subroutine calls are not supported");
    /* Flags: (?imsU-imsU) or (?flags:...). */
    for (size_t j = i + 2; j < n && p[j] != ')' && p[j] != ':'; j++)
        if (strchr("imsU-", p[j]) == NULL || p[j] == '\0')
            return refuse(err, errlen, j, "only the flags i, m, s and U are supported");
    return 0;
}

/* Walks the pattern once; 0 when RE2 would accept everything PCRE2 will be asked about. */
static int check_re2(const char *p, size_t n, char *err, size_t errlen)
{
    size_t i = 0;
    int quantified = 0; /* the previous token was a greedy quantifier */
    while (i < n) {
        char c = p[i];
        int after_quantifier = quantified;
        quantified = 0;
        if (c == '\\' && i + 1 < n) {
            if (p[i + 1] == 'Q') {
                const char *end = memmem(p + i + 2, n - i - 2, "\\E", 2);
                i = end != NULL ? (size_t)(end - p) + 2 : n;
                continue;
            }
            int rc = check_escape(p, i, err, errlen);
            if (rc != 0)
                return rc;
            i = escape_end(p, n, i);
        } else if (c == '[') {
            /* A class: ']' first (after an optional '^') is literal; [:name:] inside. */
            size_t j = i + 1;
            if (j < n && p[j] == '^')
                j++;
            if (j < n && p[j] == ']')
                j++;
            while (j < n && p[j] != ']') {
                if (p[j] == '\\' && j + 1 < n) {
                    int rc = check_escape(p, j, err, errlen);
                    if (rc != 0)
                        return rc;
                    j = escape_end(p, n, j);
                } else if (p[j] == '[' && j + 1 < n && p[j + 1] == ':' && posix_end(p, n, j) != 0) {
                    j = posix_end(p, n, j);
                } else {
                    j++;
                }
            }
            i = j < n ? j + 1 : n;
        } else if (c == '(') {
            if (i + 1 < n && p[i + 1] == '*')
                return refuse(err, errlen, i, "(*...) verbs and options are not supported");
            if (i + 1 < n && p[i + 1] == '?') {
                int rc = check_group(p, n, i, err, errlen);
                if (rc != 0)
                    return rc;
                i += 2;
            } else {
                i++;
            }
        } else if (c == '*' || c == '+' || c == '?') {
            if (after_quantifier && c == '+')
                return refuse(err, errlen, i, "possessive quantifiers are not supported");
            /* "x*?" is lazy, which RE2 has; a quantifier after that is PCRE2's to refuse. */
            quantified = !(after_quantifier && c == '?');
            i++;
        } else if (c == '{') {
            unsigned long max;
            size_t end = counted(p, n, i, &max);
            if (end == 0) {
                i++;
            } else {
                if (max > RX_REPEAT_MAX)
                    return refuse(err, errlen, i, "counted repetition above 1000");
                quantified = 1;
                i = end;
            }
        } else {
            i++;
        }
    }
    return 0;
}

int rx_compile(const char *pattern, size_t len, struct rx **out, char *err, size_t errlen)
{
    *out = NULL;
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (pattern == NULL)
        return refuse(err, errlen, 0, "no pattern");
    if (len > RX_PATTERN_MAX)
        return refuse(err, errlen, RX_PATTERN_MAX, "the pattern is too long");
    if (memchr(pattern, '\0', len) != NULL)
        return refuse(err, errlen, (size_t)((const char *)memchr(pattern, '\0', len) - pattern),
                      "a NUL byte in the pattern");
    int rc = check_re2(pattern, len, err, errlen);
    if (rc != 0)
        return rc;

    uint32_t opts = PCRE2_ANCHORED | PCRE2_ENDANCHORED | PCRE2_UTF | PCRE2_MATCH_INVALID_UTF |
                    PCRE2_NEVER_BACKSLASH_C | PCRE2_NEVER_UCP | PCRE2_DOLLAR_ENDONLY;
    int code_err;
    PCRE2_SIZE at;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)pattern, len, opts, &code_err, &at, NULL);
    if (code == NULL) {
        PCRE2_UCHAR msg[160];
        if (pcre2_get_error_message(code_err, msg, sizeof(msg)) < 0)
            snprintf((char *)msg, sizeof(msg), "error %d", code_err);
        return refuse(err, errlen, (size_t)at, (const char *)msg);
    }
    struct rx *rx = xcalloc(1, sizeof(*rx));
    rx->code = code;
    /* Without JIT support (or memory for it) the interpreter gives the same answers. */
    size_t jit_size = 0;
    rx->jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0 &&
              pcre2_pattern_info(code, PCRE2_INFO_JITSIZE, &jit_size) == 0 && jit_size > 0;
    if (pcre2_pattern_info(code, PCRE2_INFO_MINLENGTH, &rx->min_len) != 0)
        rx->min_len = 0;
    rx->mctx = pcre2_match_context_create(NULL);
    if (rx->mctx == NULL)
        abort(); /* out of memory, as the x* allocators do */
    pcre2_set_match_limit(rx->mctx, RX_MATCH_LIMIT);
    pcre2_set_depth_limit(rx->mctx, RX_DEPTH_LIMIT);
    pcre2_set_heap_limit(rx->mctx, RX_HEAP_LIMIT_KIB);
    *out = rx;
    return 0;
}

int rx_match(const struct rx *rx, const char *subject, size_t len)
{
    if (len < rx->min_len)
        return 0; /* a character takes at least one byte */
    pcre2_match_data *md = rx->jit ? thread_md() : pcre2_match_data_create(1, NULL);
    if (md == NULL)
        return -ENOMEM;
    int rc = pcre2_match(rx->code, (PCRE2_SPTR)(subject != NULL ? subject : ""), len, 0, 0, md,
                         rx->mctx);
    if (!rx->jit)
        pcre2_match_data_free(md);
    if (rc >= 0) /* 0: matched, with more groups than the one-pair vector holds */
        return 1;
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc == PCRE2_ERROR_NOMEMORY)
        return -ENOMEM;
    /* The limits, the JIT stack, or anything else: the answer is unknown. */
    return -ERANGE;
}

void rx_free(struct rx *rx)
{
    if (rx == NULL)
        return;
    pcre2_match_context_free(rx->mctx);
    pcre2_code_free(rx->code);
    free(rx);
}
