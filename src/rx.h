/*
 * rx: regular expressions with RE2's meaning, through PCRE2 (the only file that includes it).
 *
 * Consul documents its intention and route regexes as RE2 (Envoy's engine). PCRE2 accepts far
 * more, so a pattern is first checked for the constructs RE2 refuses: backreferences,
 * lookahead and lookbehind, atomic groups, possessive quantifiers, \C, recursion and
 * subroutine calls, conditionals, callouts, comments, backtracking verbs, \K and \G, flags
 * other than i, m, s and U, and counted repetition beyond 1000. Such a pattern is refused with
 * a message naming the construct. A pattern is matched against the whole subject (anchored at
 * both ends), in UTF-8 mode where invalid UTF-8 in a subject simply does not match, with a
 * match limit so no pattern and no subject can hold a worker for long.
 *
 * A compiled struct rx is immutable: any number of threads may call rx_match() on it at once.
 */
#ifndef CONNECTD_RX_H
#define CONNECTD_RX_H

#include <stddef.h>

/* The longest pattern accepted, in bytes. */
#define RX_PATTERN_MAX 4096
/* The largest counted repetition, {n} or {n,m}, as in RE2. */
#define RX_REPEAT_MAX 1000

struct rx;

/*
 * Compiles <pattern> (<len> bytes, which may hold no NUL). Returns 0 and a new struct rx in
 * *out (free it with rx_free()), or -EINVAL with *out NULL and a one-line message in <err>
 * ("lookahead and lookbehind are not supported (offset 3)"). Never aborts on bad input.
 */
int rx_compile(const char *pattern, size_t len, struct rx **out, char *err, size_t errlen);

/*
 * Matches the whole of <subject> (<len> bytes). Returns 1 on a match, 0 on none, or -ERANGE
 * when the match limit was reached (the answer is unknown: callers must fail closed) and
 * -ENOMEM when no match data could be had. Thread-safe; allocates a small match block per
 * call.
 */
int rx_match(const struct rx *rx, const char *subject, size_t len);

/* Frees <rx>; NULL is accepted. */
void rx_free(struct rx *rx);

#endif
