/*
 * Unit tests for sock's unix-socket listeners: what an existing path may be replaced, and the
 * mode of the file whatever the umask. Each test works in a fresh directory under /tmp and
 * leaves nothing behind.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "sock.h"

struct dir {
    char path[64];
    char sock[96]; /* <path>/s.sock */
};

static int dir_setup(void **state)
{
    struct dir *d = calloc(1, sizeof(*d));
    assert_non_null(d);
    snprintf(d->path, sizeof(d->path), "/tmp/connectd-sock-XXXXXX");
    assert_non_null(mkdtemp(d->path));
    snprintf(d->sock, sizeof(d->sock), "%s/s.sock", d->path);
    *state = d;
    return 0;
}

/* Removes what is left in the directory (files only); returns how many entries there were. */
static int dir_clear(struct dir *d)
{
    DIR *dp = opendir(d->path);
    struct dirent *e;
    int n = 0;
    char p[sizeof(d->path) + 1 + sizeof(e->d_name)];
    assert_non_null(dp);
    while ((e = readdir(dp)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        n++;
        snprintf(p, sizeof(p), "%s/%s", d->path, e->d_name);
        unlink(p);
    }
    closedir(dp);
    return n;
}

/* Checks that exactly <expect> entries are left (no private directory, no stray file). */
static void dir_expect_and_clear(struct dir *d, int expect)
{
    assert_int_equal(dir_clear(d), expect);
}

static int dir_teardown(void **state)
{
    struct dir *d = *state;
    dir_clear(d); /* after a failed check */
    rmdir(d->path);
    free(d);
    return 0;
}

/* A plain listening socket at <path>, as another program would have. */
static int other_listener(const char *path)
{
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    snprintf(un.sun_path, sizeof(un.sun_path), "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(bind(fd, (struct sockaddr *)&un, sizeof(un)), 0);
    assert_int_equal(listen(fd, 8), 0);
    return fd;
}

/* Connects to <path>, sends a byte, and checks <lfd> accepts it and gets the byte. */
static void check_serves(const char *path, int lfd)
{
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    char c = 0;
    snprintf(un.sun_path, sizeof(un.sun_path), "%s", path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    assert_int_equal(connect(fd, (struct sockaddr *)&un, sizeof(un)), 0);
    assert_int_equal(send(fd, "x", 1, 0), 1);
    int afd = -1;
    for (int i = 0; i < 1000 && afd < 0; i++) { /* the listener may be non-blocking */
        afd = accept(lfd, NULL, NULL);
        if (afd < 0)
            usleep(1000);
    }
    assert_true(afd >= 0);
    fcntl(afd, F_SETFL, 0);
    assert_int_equal(recv(afd, &c, 1, 0), 1);
    assert_int_equal(c, 'x');
    close(afd);
    close(fd);
}

static mode_t mode_of(const char *path)
{
    struct stat st;
    assert_int_equal(lstat(path, &st), 0);
    return st.st_mode & 07777;
}

/*
 * Issue 7 defect 7: any socket at the path was unlinked, so a registration naming another
 * program's socket (say /run/docker.sock) took it over. A socket in use is now an error and
 * the other program keeps serving.
 */
static void test_live_socket_is_not_replaced(void **state)
{
    struct dir *d = *state;
    char err[300] = "";
    unsigned long ino = 0;
    int other = other_listener(d->sock);
    int fd = sock_listen_unix(d->sock, 0600, &ino, err, sizeof(err));
    assert_int_equal(fd, -EADDRINUSE);
    assert_non_null(strstr(err, d->sock));
    assert_non_null(strstr(err, "in use"));
    /* The probe that found it in use shows up there as one connection, closed at once. */
    int probe = accept(other, NULL, NULL);
    char c;
    assert_true(probe >= 0);
    assert_int_equal(recv(probe, &c, 1, 0), 0);
    close(probe);
    check_serves(d->sock, other);
    close(other);
    dir_expect_and_clear(d, 1);
}

/* A socket nobody accepts on (a stale file of an earlier run) is replaced. */
static void test_stale_socket_is_replaced(void **state)
{
    struct dir *d = *state;
    char err[300] = "";
    unsigned long ino = 0;
    struct stat st;
    close(other_listener(d->sock)); /* the file stays, nobody listens */
    int fd = sock_listen_unix(d->sock, -1, &ino, err, sizeof(err));
    if (fd < 0)
        fail_msg("sock_listen_unix: %s", err);
    assert_int_equal(lstat(d->sock, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal((unsigned long)st.st_ino, ino);
    check_serves(d->sock, fd);
    close(fd);
    sock_unlink_unix(d->sock, ino);
    dir_expect_and_clear(d, 0); /* no private directory left behind either */
}

/* A regular file, a symbolic link (to a file, or dangling) or a directory: error, untouched. */
static void test_other_files_are_left_alone(void **state)
{
    struct dir *d = *state;
    char err[300] = "", target[128], dangling[128];
    unsigned long ino = 0;
    struct stat st;
    char buf[16] = "";

    int f = open(d->sock, O_CREAT | O_WRONLY, 0640);
    assert_true(f >= 0);
    assert_int_equal(write(f, "data", 4), 4);
    close(f);
    assert_int_equal(sock_listen_unix(d->sock, 0666, &ino, err, sizeof(err)), -EEXIST);
    assert_non_null(strstr(err, "not a socket"));
    assert_int_equal(mode_of(d->sock), 0640);
    f = open(d->sock, O_RDONLY);
    assert_int_equal(read(f, buf, sizeof(buf)), 4);
    close(f);
    assert_string_equal(buf, "data");
    unlink(d->sock);

    snprintf(target, sizeof(target), "%s/target", d->path);
    f = open(target, O_CREAT | O_WRONLY, 0640);
    assert_true(f >= 0);
    close(f);
    assert_int_equal(symlink(target, d->sock), 0);
    assert_int_equal(sock_listen_unix(d->sock, 0666, &ino, err, sizeof(err)), -EEXIST);
    assert_int_equal(lstat(d->sock, &st), 0);
    assert_true(S_ISLNK(st.st_mode));
    assert_int_equal(mode_of(target), 0640);
    unlink(d->sock);

    snprintf(dangling, sizeof(dangling), "%s/nothing", d->path);
    assert_int_equal(symlink(dangling, d->sock), 0);
    assert_int_equal(sock_listen_unix(d->sock, 0666, &ino, err, sizeof(err)), -EEXIST);
    assert_int_equal(lstat(dangling, &st), -1); /* nothing was created through the link */
    unlink(d->sock);

    assert_int_equal(mkdir(d->sock, 0700), 0);
    assert_int_equal(sock_listen_unix(d->sock, 0666, &ino, err, sizeof(err)), -EEXIST);
    rmdir(d->sock);
    dir_expect_and_clear(d, 1); /* target */
}

/*
 * Issue 7 defect 7: without LocalBindSocketMode the mode came from the umask (0777 under
 * umask 000: anyone on the host could use the upstream as this service). Now 0600.
 */
static void test_default_mode_is_0600_whatever_the_umask(void **state)
{
    struct dir *d = *state;
    char err[300] = "";
    unsigned long ino = 0;
    mode_t old = umask(0);
    int fd = sock_listen_unix(d->sock, -1, &ino, err, sizeof(err));
    umask(old);
    if (fd < 0)
        fail_msg("sock_listen_unix: %s", err);
    assert_int_equal(mode_of(d->sock), 0600);
    close(fd);
    sock_unlink_unix(d->sock, ino);
    dir_expect_and_clear(d, 0);
}

/* A configured mode is exact: not narrowed by the umask, not widened either. */
static void test_configured_mode_is_exact(void **state)
{
    struct dir *d = *state;
    static const struct {
        mode_t umask, mode;
    } cases[] = {{022, 0666}, {077, 0660}, {0, 0640}, {0, 0700}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char err[300] = "";
        unsigned long ino = 0;
        mode_t old = umask(cases[i].umask);
        int fd = sock_listen_unix(d->sock, (int)cases[i].mode, &ino, err, sizeof(err));
        umask(old);
        if (fd < 0)
            fail_msg("sock_listen_unix: %s", err);
        assert_int_equal(mode_of(d->sock), cases[i].mode);
        check_serves(d->sock, fd);
        close(fd);
        sock_unlink_unix(d->sock, ino);
        dir_expect_and_clear(d, 0);
    }
}

/*
 * A path too long for the private directory's name beside it (a short last component near
 * the 107-byte limit) is bound in place: fine when the umask leaves the mode as asked, a clear
 * error when it would narrow it.
 */
static void test_long_path_binds_in_place(void **state)
{
    struct dir *d = *state;
    char sub[128], path[sizeof(sub) + 2], err[300] = "";
    unsigned long ino = 0;
    size_t len = strlen(d->path);
    memset(sub, 0, sizeof(sub));
    memcpy(sub, d->path, len);
    sub[len] = '/';
    memset(sub + len + 1, 'd', 104 - len - 1 - 2);
    assert_int_equal(mkdir(sub, 0700), 0);
    snprintf(path, sizeof(path), "%s/s", sub);
    assert_int_equal(strlen(path), 104);
    mode_t old = umask(0);
    int fd = sock_listen_unix(path, -1, &ino, err, sizeof(err));
    umask(old);
    if (fd < 0)
        fail_msg("sock_listen_unix: %s", err);
    assert_int_equal(mode_of(path), 0600);
    close(fd);
    sock_unlink_unix(path, ino);
    old = umask(022);
    fd = sock_listen_unix(path, 0666, &ino, err, sizeof(err));
    umask(old);
    assert_true(fd < 0);
    assert_non_null(strstr(err, "umask"));
    assert_int_equal(access(path, F_OK), -1); /* removed again */
    assert_int_equal(rmdir(sub), 0);
    dir_expect_and_clear(d, 0);
}

/* sock_unlink_unix removes only the file it created, not one that replaced it. */
static void test_unlink_only_our_own(void **state)
{
    struct dir *d = *state;
    char err[300] = "";
    unsigned long ino = 0;
    char other[128];
    int fd = sock_listen_unix(d->sock, -1, &ino, err, sizeof(err));
    if (fd < 0)
        fail_msg("sock_listen_unix: %s", err);
    /* Another socket renamed over ours while ours is open (so its inode cannot be reused). */
    snprintf(other, sizeof(other), "%s/other.sock", d->path);
    close(other_listener(other));
    assert_int_equal(rename(other, d->sock), 0);
    sock_unlink_unix(d->sock, ino);
    assert_int_equal(access(d->sock, F_OK), 0);
    close(fd);
    dir_expect_and_clear(d, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_live_socket_is_not_replaced, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_stale_socket_is_replaced, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_other_files_are_left_alone, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_default_mode_is_0600_whatever_the_umask, dir_setup,
                                        dir_teardown),
        cmocka_unit_test_setup_teardown(test_configured_mode_is_exact, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_long_path_binds_in_place, dir_setup, dir_teardown),
        cmocka_unit_test_setup_teardown(test_unlink_only_our_own, dir_setup, dir_teardown),
    };
    return cmocka_run_group_tests_name("sock", tests, NULL, NULL);
}
