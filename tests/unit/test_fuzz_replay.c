/*
 * Replays the committed decode corpus (tests/fuzz/corpus/decode/) through the fuzz target, so
 * the normal test run covers it without clang or libFuzzer. Run from the repository root.
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

/* The target itself, so the replay runs exactly what the fuzzer runs. */
#include "../fuzz/fuzz_decode.c"

#define CORPUS_DIR "tests/fuzz/corpus/decode"

static void test_replay_decode_corpus(void **state)
{
    (void)state;
    corpus_replay(CORPUS_DIR, LLVMFuzzerTestOneInput);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_replay_decode_corpus),
    };
    return cmocka_run_group_tests_name("fuzz_replay", tests, NULL, NULL);
}
