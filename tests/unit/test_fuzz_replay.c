/*
 * Replays the committed corpora (tests/fuzz/corpus/<target>/) through their fuzz targets, so
 * the normal test run covers them without clang or libFuzzer. Run from the repository root.
 * The admin corpus is replayed by test_admin.c.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "corpus.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The targets themselves, so the replay runs exactly what the fuzzers run; FUZZ_REPLAY leaves
 * out each one's LLVMFuzzerTestOneInput, which would collide. */
#define FUZZ_REPLAY
#include "../fuzz/fuzz_agent.c"
#include "../fuzz/fuzz_config.c"
#include "../fuzz/fuzz_decode.c"
#include "../fuzz/fuzz_h1parse.c"
#include "../fuzz/fuzz_intent.c"
#include "../fuzz/fuzz_pathnorm.c"
#include "../fuzz/fuzz_h2.c"
#include "../fuzz/fuzz_proxycfg.c"
#include "../fuzz/fuzz_spiffe.c"

static void test_replay_decode_corpus(void **state)
{
    (void)state;
    corpus_replay("tests/fuzz/corpus/decode", fuzz_decode_one);
}

static void test_replay_spiffe_corpus(void **state)
{
    (void)state;
    corpus_replay("tests/fuzz/corpus/spiffe", fuzz_spiffe_one);
}

static void test_replay_proxycfg_corpus(void **state)
{
    (void)state;
    corpus_replay("tests/fuzz/corpus/proxycfg", fuzz_proxycfg_one);
}

static void test_replay_agent_corpus(void **state)
{
    (void)state;
    corpus_replay("tests/fuzz/corpus/agent", fuzz_agent_one);
}

static void test_replay_h1parse_corpus(void **state)
{
    (void)state;
    corpus_replay("tests/fuzz/corpus/h1parse", fuzz_h1parse_one);
}

static void test_replay_intent_corpus(void **state)
{
    (void)state;
    corpus_replay("tests/fuzz/corpus/intent", fuzz_intent_one);
}

static void test_replay_pathnorm_corpus(void **state)
{
    (void)state;
    corpus_replay("tests/fuzz/corpus/pathnorm", fuzz_pathnorm_one);
}

static void test_replay_h2_corpus(void **state)
{
    (void)state;
    corpus_replay("tests/fuzz/corpus/h2", fuzz_h2_one);
}

static void test_replay_config_corpus(void **state)
{
    (void)state;
    corpus_replay("tests/fuzz/corpus/config", fuzz_config_one);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_replay_decode_corpus),   cmocka_unit_test(test_replay_spiffe_corpus),
        cmocka_unit_test(test_replay_proxycfg_corpus), cmocka_unit_test(test_replay_agent_corpus),
        cmocka_unit_test(test_replay_config_corpus),   cmocka_unit_test(test_replay_h1parse_corpus),
        cmocka_unit_test(test_replay_pathnorm_corpus), cmocka_unit_test(test_replay_h2_corpus),
        cmocka_unit_test(test_replay_intent_corpus),
    };
    return cmocka_run_group_tests_name("fuzz_replay", tests, NULL, NULL);
}
