/*
 * corpus.h: replays a committed fuzz corpus through a fuzz target inside a cmocka test, so
 * the normal test run covers it without clang or libFuzzer. Include after <cmocka.h>; run
 * from the repository root.
 */
#ifndef CONNECTD_TEST_CORPUS_H
#define CONNECTD_TEST_CORPUS_H

#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

/* Corpus entries are small; a bigger file is a mistake worth failing on. */
#define CORPUS_MAX_ENTRY_BYTES (1u << 20)

/* Reads <name> into an allocation of exactly its size (so ASan sees over-reads). */
static uint8_t *corpus_read_entry(int dirfd, const char *name, size_t *len)
{
    int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
        (uint64_t)st.st_size > CORPUS_MAX_ENTRY_BYTES) {
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    size_t n = (size_t)st.st_size, got = 0;
    uint8_t *buf = malloc(n != 0 ? n : 1);
    assert_non_null(buf);
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    if (got != n) {
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

static int corpus_not_hidden(const struct dirent *d)
{
    return d->d_name[0] != '.';
}

/*
 * Feeds every regular file of <dir> (sub-directories are skipped) to <target>. Fails the test
 * when the directory is missing, an entry is unreadable or too large, or there is no entry.
 */
static void corpus_replay(const char *dir, int (*target)(const uint8_t *, size_t))
{
    struct dirent **names;
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        fail_msg("cannot open %s (run from the repository root)", dir);
    int n = scandir(dir, &names, corpus_not_hidden, alphasort);
    assert_true(n >= 0);
    int replayed = 0;
    for (int i = 0; i < n; i++) {
        size_t len;
        struct stat st;
        if (fstatat(dirfd, names[i]->d_name, &st, 0) == 0 && S_ISDIR(st.st_mode)) {
            free(names[i]);
            continue;
        }
        uint8_t *data = corpus_read_entry(dirfd, names[i]->d_name, &len);
        if (data == NULL)
            fail_msg("%s/%s: unreadable or larger than %u bytes", dir, names[i]->d_name,
                     CORPUS_MAX_ENTRY_BYTES);
        target(data, len);
        free(data);
        free(names[i]);
        replayed++;
    }
    free(names);
    close(dirfd);
    if (replayed == 0)
        fail_msg("%s holds no corpus files", dir);
    print_message("replayed %d corpus files from %s\n", replayed, dir);
}

#endif
