/*
 * bench.h: helpers shared by the benchmark's own programs (benchd, openloop), which are built
 * each from one file and use nothing of src/.
 */
#ifndef CONNECTD_BENCH_H
#define CONNECTD_BENCH_H

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

/* calloc that aborts rather than return NULL: a benchmark tool has no way to go on. */
static inline void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (p == NULL)
        abort();
    return p;
}

/*
 * Writes buf[*off..len) to the non-blocking <fd>, advancing *off. Returns 0 when all of it
 * went out, 1 when the socket is full (wait for EPOLLOUT), -1 on an error (errno says which).
 */
static inline int write_pending(int fd, const char *buf, size_t *off, size_t len)
{
    while (*off < len) {
        ssize_t n = write(fd, buf + *off, len - *off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN ? 1 : -1;
        }
        *off += (size_t)n;
    }
    return 0;
}

#endif
