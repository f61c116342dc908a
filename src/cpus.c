/*
 * cpus: the CPUs this process may use. See cpus.h.
 */
#include "cpus.h"

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

long cpus_quota(long quota, long period)
{
    if (quota < 0 || period <= 0)
        return 0;
    long n = quota / period + (quota % period != 0);
    return n < 1 ? 1 : n;
}

/* A decimal long filling the whole of [s, end); -1 when it is not one. */
static long parse_long(const char *s, const char *end)
{
    long v = 0;
    if (s == end)
        return -1;
    for (; s < end; s++) {
        if (*s < '0' || *s > '9' || v > (LONG_MAX - 9) / 10)
            return -1;
        v = v * 10 + (*s - '0');
    }
    return v;
}

long cpus_quota_v2(const char *cpu_max)
{
    const char *sp = strchr(cpu_max, ' ');
    if (sp == NULL || strncmp(cpu_max, "max ", 4) == 0)
        return 0;
    const char *end = sp + 1 + strcspn(sp + 1, " \n");
    long quota = parse_long(cpu_max, sp), period = parse_long(sp + 1, end);
    if (quota < 0 || period < 0)
        return 0;
    return cpus_quota(quota, period);
}

/* The first line of a small file into buf; -1 when it cannot be read. */
static int read_line(const char *path, char *buf, size_t len)
{
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    int rc = fgets(buf, (int)len, f) != NULL ? 0 : -1;
    fclose(f);
    return rc;
}

/* The CPUs granted by the quota files of one cgroup directory; 0 for none or unreadable. */
static long dir_limit(const char *dir, int v2)
{
    char path[PATH_MAX], line[128];
    if (v2) {
        if (snprintf(path, sizeof(path), "%s/cpu.max", dir) >= (int)sizeof(path) ||
            read_line(path, line, sizeof(line)) != 0)
            return 0;
        return cpus_quota_v2(line);
    }
    long quota, period;
    char *end;
    if (snprintf(path, sizeof(path), "%s/cpu.cfs_quota_us", dir) >= (int)sizeof(path) ||
        read_line(path, line, sizeof(line)) != 0)
        return 0;
    errno = 0;
    quota = strtol(line, &end, 10);
    if (errno != 0 || end == line)
        return 0;
    if (snprintf(path, sizeof(path), "%s/cpu.cfs_period_us", dir) >= (int)sizeof(path) ||
        read_line(path, line, sizeof(line)) != 0)
        return 0;
    errno = 0;
    period = strtol(line, &end, 10);
    if (errno != 0 || end == line)
        return 0;
    return cpus_quota(quota, period);
}

/* The tightest limit of mount/<cgroup path> and its ancestors up to mount itself. */
static long walk_limit(const char *mount, const char *cg, size_t cg_len, int v2)
{
    char dir[PATH_MAX];
    long best = 0;
    if (snprintf(dir, sizeof(dir), "%s%.*s", mount, (int)cg_len, cg) >= (int)sizeof(dir))
        return 0;
    size_t base = strlen(mount);
    for (;;) {
        long n = dir_limit(dir, v2);
        if (n > 0 && (best == 0 || n < best))
            best = n;
        char *slash = strrchr(dir + base, '/');
        if (slash == NULL)
            break;
        *slash = '\0';
    }
    return best;
}

/* Whether the comma-separated controller list [s, end) names the cpu controller. */
static int lists_cpu(const char *s, const char *end)
{
    while (s < end) {
        const char *comma = memchr(s, ',', (size_t)(end - s));
        const char *e = comma != NULL ? comma : end;
        if (e - s == 3 && memcmp(s, "cpu", 3) == 0)
            return 1;
        s = e + 1;
    }
    return 0;
}

static long min_limit(long a, long b)
{
    return a == 0 ? b : b == 0 ? a : a < b ? a : b;
}

long cpus_cgroup_limit(const char *root, const char *self)
{
    long best = 0;
    char mount[PATH_MAX];
    for (const char *line = self; *line != '\0';) {
        const char *nl = strchr(line, '\n');
        const char *eol = nl != NULL ? nl : line + strlen(line);
        const char *c1 = memchr(line, ':', (size_t)(eol - line));
        const char *c2 = c1 != NULL ? memchr(c1 + 1, ':', (size_t)(eol - c1 - 1)) : NULL;
        if (c2 != NULL && c2[1] == '/') {
            const char *cg = c2 + 1;
            size_t cg_len = (size_t)(eol - cg);
            /* Path "/" walks nothing below the mount: keep the mount itself. */
            if (cg_len == 1)
                cg_len = 0;
            if (c2 == c1 + 1) {
                if (snprintf(mount, sizeof(mount), "%s/unified", root) < (int)sizeof(mount) &&
                    access(mount, F_OK) == 0)
                    best = min_limit(best, walk_limit(mount, cg, cg_len, 1));
                best = min_limit(best, walk_limit(root, cg, cg_len, 1));
            } else if (lists_cpu(c1 + 1, c2)) {
                if (snprintf(mount, sizeof(mount), "%s/%.*s", root, (int)(c2 - c1 - 1), c1 + 1) <
                        (int)sizeof(mount) &&
                    access(mount, F_OK) == 0)
                    best = min_limit(best, walk_limit(mount, cg, cg_len, 0));
                else if (snprintf(mount, sizeof(mount), "%s/cpu", root) < (int)sizeof(mount))
                    best = min_limit(best, walk_limit(mount, cg, cg_len, 0));
            }
        }
        line = nl != NULL ? nl + 1 : eol;
    }
    return best;
}

long cpus_usable(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        long a = CPU_COUNT(&set);
        if (a > 0 && (n < 1 || a < n))
            n = a;
    }
    char self[4096];
    FILE *f = fopen("/proc/self/cgroup", "re");
    if (f != NULL) {
        size_t got = fread(self, 1, sizeof(self) - 1, f);
        fclose(f);
        self[got] = '\0';
        long q = cpus_cgroup_limit("/sys/fs/cgroup", self);
        if (q > 0 && (n < 1 || q < n))
            n = q;
    }
    return n < 1 ? 1 : n;
}

int cpus_default_workers(long usable)
{
    return usable < 1                          ? 1
           : usable > CPUS_DEFAULT_WORKERS_MAX ? CPUS_DEFAULT_WORKERS_MAX
                                               : (int)usable;
}
