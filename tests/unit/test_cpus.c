/*
 * Unit tests for cpus: quota arithmetic, cpu.max parsing, and the cgroup walk over fake v1,
 * v2 and hybrid trees built in a temporary directory.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cpus.h"

static void test_quota_rounds_up(void **state)
{
    (void)state;
    assert_int_equal(cpus_quota(-1, 100000), 0);
    assert_int_equal(cpus_quota(100000, 0), 0);
    assert_int_equal(cpus_quota(50000, 100000), 1);
    assert_int_equal(cpus_quota(1, 100000), 1);
    assert_int_equal(cpus_quota(100000, 100000), 1);
    assert_int_equal(cpus_quota(150000, 100000), 2);
    assert_int_equal(cpus_quota(800000, 100000), 8);
}

static void test_cpu_max_text(void **state)
{
    (void)state;
    assert_int_equal(cpus_quota_v2("max 100000\n"), 0);
    assert_int_equal(cpus_quota_v2("max"), 0);
    assert_int_equal(cpus_quota_v2("150000 100000\n"), 2);
    assert_int_equal(cpus_quota_v2("200000 100000"), 2);
    assert_int_equal(cpus_quota_v2("20000 100000\n"), 1);
    /* Not the format: no limit rather than a guess. */
    assert_int_equal(cpus_quota_v2(""), 0);
    assert_int_equal(cpus_quota_v2("abc 100000"), 0);
    assert_int_equal(cpus_quota_v2("-5 100000"), 0);
    assert_int_equal(cpus_quota_v2("100000 "), 0);
    assert_int_equal(cpus_quota_v2("99999999999999999999999 1"), 0);
}

static void test_workers_default_is_at_most_two(void **state)
{
    (void)state;
    assert_int_equal(cpus_default_workers(0), 1);
    assert_int_equal(cpus_default_workers(1), 1);
    assert_int_equal(cpus_default_workers(2), 2);
    assert_int_equal(cpus_default_workers(64), CPUS_DEFAULT_WORKERS_MAX);
    assert_int_equal(CPUS_DEFAULT_WORKERS_MAX, 2);
}

/* A fake cgroup mount root, removed by the teardown. */
static char tmp[256];

static int tree_setup(void **state)
{
    (void)state;
    snprintf(tmp, sizeof(tmp), "%s/cpus-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    return mkdtemp(tmp) == NULL ? -1 : 0;
}

static int tree_teardown(void **state)
{
    char cmd[PATH_MAX + 16];
    (void)state;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp);
    return system(cmd) == 0 ? 0 : -1;
}

/* Writes text to tmp/rel, creating its directories. */
static void put(const char *rel, const char *text)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/%s", tmp, rel);
    for (char *p = path + strlen(tmp) + 1; (p = strchr(p, '/')) != NULL; p++) {
        *p = '\0';
        mkdir(path, 0755);
        *p = '/';
    }
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_v2_own_cgroup_and_ancestors(void **state)
{
    (void)state;
    put("kubepods/pod1/ctr/cpu.max", "max 100000\n");
    put("kubepods/pod1/cpu.max", "150000 100000\n");
    put("kubepods/cpu.max", "400000 100000\n");
    /* The pod's quota (1.5 CPUs → 2) binds, not the container's "max". */
    assert_int_equal(cpus_cgroup_limit(tmp, "0::/kubepods/pod1/ctr\n"), 2);
    put("kubepods/pod1/ctr/cpu.max", "50000 100000\n");
    assert_int_equal(cpus_cgroup_limit(tmp, "0::/kubepods/pod1/ctr\n"), 1);
    /* A cgroup namespace shows "/": the mount's own files count. */
    put("cpu.max", "300000 100000\n");
    assert_int_equal(cpus_cgroup_limit(tmp, "0::/\n"), 3);
    /* A path absent under this mount (a container's view) falls back to the mount's root. */
    assert_int_equal(cpus_cgroup_limit(tmp, "0::/elsewhere/x\n"), 3);
}

static void test_v1_cpu_controller(void **state)
{
    (void)state;
    put("cpu,cpuacct/docker/c1/cpu.cfs_quota_us", "250000\n");
    put("cpu,cpuacct/docker/c1/cpu.cfs_period_us", "100000\n");
    put("cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
    put("cpu,cpuacct/cpu.cfs_period_us", "100000\n");
    const char *self = "12:pids:/docker/c1\n"
                       "4:cpu,cpuacct:/docker/c1\n"
                       "1:name=systemd:/docker/c1\n";
    assert_int_equal(cpus_cgroup_limit(tmp, self), 3);
    /* No quota anywhere: no limit. */
    put("cpu,cpuacct/docker/c1/cpu.cfs_quota_us", "-1\n");
    assert_int_equal(cpus_cgroup_limit(tmp, self), 0);
    /* Garbage in a file is no limit, not a crash or a guess. */
    put("cpu,cpuacct/docker/c1/cpu.cfs_quota_us", "lots\n");
    assert_int_equal(cpus_cgroup_limit(tmp, self), 0);
    /* "cpuacct" alone is not the cpu controller. */
    put("cpuacct/x/cpu.cfs_quota_us", "100000\n");
    put("cpuacct/x/cpu.cfs_period_us", "100000\n");
    assert_int_equal(cpus_cgroup_limit(tmp, "3:cpuacct:/x\n"), 0);
}

static void test_hybrid_takes_the_tightest(void **state)
{
    (void)state;
    put("cpu/svc/cpu.cfs_quota_us", "400000\n");
    put("cpu/svc/cpu.cfs_period_us", "100000\n");
    put("unified/svc/cpu.max", "100000 100000\n");
    assert_int_equal(cpus_cgroup_limit(tmp, "1:cpu:/svc\n0::/svc\n"), 1);
    /* No trailing newline, and empty or malformed lines, are fine. */
    assert_int_equal(cpus_cgroup_limit(tmp, "\n:\nbad\n1:cpu:/svc"), 4);
    assert_int_equal(cpus_cgroup_limit(tmp, ""), 0);
}

static void test_usable_is_at_least_one(void **state)
{
    (void)state;
    long n = cpus_usable();
    assert_true(n >= 1);
    assert_true(n <= sysconf(_SC_NPROCESSORS_ONLN));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quota_rounds_up),
        cmocka_unit_test(test_cpu_max_text),
        cmocka_unit_test(test_workers_default_is_at_most_two),
        cmocka_unit_test_setup_teardown(test_v2_own_cgroup_and_ancestors, tree_setup,
                                        tree_teardown),
        cmocka_unit_test_setup_teardown(test_v1_cpu_controller, tree_setup, tree_teardown),
        cmocka_unit_test_setup_teardown(test_hybrid_takes_the_tightest, tree_setup, tree_teardown),
        cmocka_unit_test(test_usable_is_at_least_one),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
