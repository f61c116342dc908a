/*
 * sock: thin wrappers over the socket calls, with the options every leg wants.
 */
#include "sock.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static int fill_addr(const char *addr, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    memset(ss, 0, sizeof(*ss));
    if (inet_pton(AF_INET, addr, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((unsigned short)port);
        *len = sizeof(*in4);
        return 0;
    }
    if (inet_pton(AF_INET6, addr, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((unsigned short)port);
        *len = sizeof(*in6);
        return 0;
    }
    return -EINVAL;
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

int sock_listen(const char *addr, int port, int reuseport, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t len;
    int one = 1, fd, rc;
    if (fill_addr(addr, port, &ss, &len) != 0) {
        snprintf(err, errlen, "listen %s:%d: not a numeric IP address", addr, port);
        return -EINVAL;
    }
    fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1) {
        rc = -errno;
        goto fail;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (reuseport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&ss, len) == -1 || listen(fd, 1024) == -1) {
        rc = -errno;
        close(fd);
        goto fail;
    }
    return fd;
fail:
    snprintf(err, errlen, "listen %s:%d: %s", addr, port, strerror(-rc));
    return rc;
}

int sock_connect(const char *addr, int port)
{
    struct sockaddr_storage ss;
    socklen_t len;
    if (fill_addr(addr, port, &ss, &len) != 0)
        return -EINVAL;
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1)
        return -errno;
    set_nodelay(fd);
    if (connect(fd, (struct sockaddr *)&ss, len) == -1 && errno != EINPROGRESS) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

static int fill_unix(const char *path, struct sockaddr_un *un)
{
    memset(un, 0, sizeof(*un));
    un->sun_family = AF_UNIX;
    if (path[0] == '\0' || strlen(path) >= sizeof(un->sun_path))
        return -ENAMETOOLONG;
    memcpy(un->sun_path, path, strlen(path) + 1);
    return 0;
}

/*
 * Frees <path> for a new listener. Nothing there: fine. A socket nobody accepts on (connect
 * is refused: a stale file from an earlier run): removed. Anything else is left alone and is
 * an error: a regular file, a directory or a symbolic link (-EEXIST), a socket in use
 * (-EADDRINUSE; a registration naming another program's socket must not take it over), or a
 * socket whose state cannot be told (the connect's -errno).
 */
static int clear_path(const char *path, const struct sockaddr_un *un, char *err, size_t errlen)
{
    struct stat st;
    if (lstat(path, &st) == -1) {
        if (errno == ENOENT)
            return 0;
        int rc = -errno;
        snprintf(err, errlen, "listen unix %s: %s", path, strerror(-rc));
        return rc;
    }
    if (!S_ISSOCK(st.st_mode)) {
        snprintf(err, errlen, "listen unix %s: the path exists and is not a socket (left as it is)",
                 path);
        return -EEXIST;
    }
    /* Non-blocking, so a live listener with a full backlog answers EAGAIN instead of a wait. */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1) {
        int rc = -errno;
        snprintf(err, errlen, "listen unix %s: %s", path, strerror(-rc));
        return rc;
    }
    int rc = connect(fd, (const struct sockaddr *)un, sizeof(*un)) == 0 ? 0 : -errno;
    close(fd);
    if (rc == -ECONNREFUSED) {
        if (unlink(path) == -1 && errno != ENOENT) {
            rc = -errno;
            snprintf(err, errlen, "listen unix %s: removing the stale socket: %s", path,
                     strerror(-rc));
            return rc;
        }
        return 0;
    }
    if (rc == 0 || rc == -EAGAIN || rc == -EINPROGRESS) {
        snprintf(err, errlen,
                 "listen unix %s: a socket there is in use (something accepts on it); not "
                 "replaced",
                 path);
        return -EADDRINUSE;
    }
    snprintf(err, errlen,
             "listen unix %s: cannot tell whether the socket there is in use (%s); "
             "not replaced",
             path, strerror(-rc));
    return rc;
}

/*
 * Binds <fd> to <path> with exactly <mode>, never through a symbolic link and never with a
 * mode decided by the umask: the socket is bound in a fresh private directory (0700) beside
 * <path>, its mode set there where no one else can swap the file, and then hard-linked to
 * <path> (link() never replaces: a file that appeared meanwhile is an error). The umask is
 * process-wide and other threads create files, so it is not touched. Returns 0 or -errno.
 */
static int bind_private(int fd, const char *path, mode_t mode, char *err, size_t errlen)
{
    struct sockaddr_un un;
    char dir[sizeof(un.sun_path)];
    const char *slash = strrchr(path, '/');
    int n = slash == NULL
                ? snprintf(dir, sizeof(dir), ".connectd-XXXXXX")
                : snprintf(dir, sizeof(dir), "%.*s/.connectd-XXXXXX", (int)(slash - path), path);
    int rc;
    /* The temporary name is longer than <path> when its last component is short. */
    if (n < 0 || (size_t)n + 3 > sizeof(un.sun_path))
        return -ENAMETOOLONG;
    if (mkdtemp(dir) == NULL) {
        rc = -errno;
        snprintf(err, errlen, "listen unix %s: creating a private directory beside it: %s", path,
                 strerror(-rc));
        return rc;
    }
    memset(&un, 0, sizeof(un));
    un.sun_family = AF_UNIX;
    memcpy(un.sun_path, dir, (size_t)n);
    memcpy(un.sun_path + n, "/s", 3);
    if (bind(fd, (struct sockaddr *)&un, sizeof(un)) == -1 || chmod(un.sun_path, mode) == -1) {
        rc = -errno;
        snprintf(err, errlen, "listen unix %s: %s", path, strerror(-rc));
    } else if (link(un.sun_path, path) == -1) {
        rc = -errno;
        if (rc == -EEXIST)
            snprintf(err, errlen, "listen unix %s: the path was created meanwhile; not replaced",
                     path);
        else
            snprintf(err, errlen, "listen unix %s: %s", path, strerror(-rc));
    } else {
        rc = 0;
    }
    unlink(un.sun_path);
    rmdir(dir);
    return rc;
}

/*
 * No room for bind_private's name beside <un>'s path: binds at the path itself, where the
 * fchmod before bind is all there is, and refuses a mode the umask narrowed rather than run
 * with a wrong one. Returns 0 or -errno (with <err> filled for a wrong mode).
 */
static int bind_in_place(int fd, const struct sockaddr_un *un, mode_t mode, char *err,
                         size_t errlen)
{
    struct stat st;
    int rc = 0;
    if (bind(fd, (const struct sockaddr *)un, sizeof(*un)) == -1)
        return -errno;
    if (lstat(un->sun_path, &st) == -1) {
        rc = -errno;
    } else if ((st.st_mode & 07777) != mode) {
        snprintf(err, errlen,
                 "listen unix %s: the umask narrowed its mode to %04o instead of %04o (a shorter "
                 "path lets connectd set the mode exactly)",
                 un->sun_path, (unsigned)(st.st_mode & 07777), (unsigned)mode);
        rc = -EPERM;
    }
    if (rc != 0)
        unlink(un->sun_path);
    return rc;
}

int sock_listen_unix(const char *path, int mode, unsigned long *ino, char *err, size_t errlen)
{
    struct sockaddr_un un;
    struct stat st;
    mode_t m = mode >= 0 ? (mode_t)mode : SOCK_UNIX_DEFAULT_MODE;
    int fd = -1, bound = 0, rc = fill_unix(path, &un);
    err[0] = '\0';
    if (rc != 0 || (rc = clear_path(path, &un, err, errlen)) != 0)
        goto fail;
    /*
     * Linux creates the file with the socket's own mode less the umask, so after this fchmod
     * the file is never more open than <m>, not even for an instant; bind_private then makes
     * it exactly <m>.
     */
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1 || fchmod(fd, m) == -1) {
        rc = -errno;
        goto fail;
    }
    rc = bind_private(fd, path, m, err, errlen);
    if (rc == -ENAMETOOLONG) {
        err[0] = '\0';
        rc = bind_in_place(fd, &un, m, err, errlen);
    }
    if (rc != 0)
        goto fail;
    bound = 1;
    if (listen(fd, 1024) == -1 || lstat(path, &st) == -1) {
        rc = -errno;
        goto fail;
    }
    *ino = (unsigned long)st.st_ino;
    return fd;
fail:
    if (bound)
        unlink(path);
    if (fd != -1)
        close(fd);
    if (err[0] == '\0')
        snprintf(err, errlen, "listen unix %s: %s", path, strerror(-rc));
    return rc;
}

void sock_unlink_unix(const char *path, unsigned long ino)
{
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode) && (unsigned long)st.st_ino == ino)
        unlink(path);
}

int sock_connect_unix(const char *path)
{
    struct sockaddr_un un;
    int rc = fill_unix(path, &un);
    if (rc != 0)
        return rc;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1)
        return -errno;
    if (connect(fd, (struct sockaddr *)&un, sizeof(un)) == -1 && errno != EINPROGRESS) {
        rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

int sock_connect_result(int fd)
{
    int soerr = 0;
    socklen_t len = sizeof(soerr);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == -1)
        return -errno;
    return -soerr;
}

static void format_addr(const struct sockaddr_storage *ss, char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &in4->sin_addr, ip, sizeof(ip));
        snprintf(buf, len, "%s:%u", ip, ntohs(in4->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
        snprintf(buf, len, "[%s]:%u", ip, ntohs(in6->sin6_port));
    } else if (ss->ss_family == AF_UNIX) {
        snprintf(buf, len, "unix");
    } else {
        snprintf(buf, len, "?");
    }
}

int sock_accept(int lfd, char *peer, size_t peer_len)
{
    struct sockaddr_storage ss = {0};
    socklen_t len = sizeof(ss);
    int fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd == -1)
        return -errno;
    set_nodelay(fd);
    format_addr(&ss, peer, peer_len);
    return fd;
}

void sock_peer_name(int fd, char *buf, size_t len)
{
    struct sockaddr_storage ss = {0};
    socklen_t sl = sizeof(ss);
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) == -1) {
        snprintf(buf, len, "?");
        return;
    }
    format_addr(&ss, buf, len);
}

void sock_local_name(int fd, char *buf, size_t len)
{
    struct sockaddr_storage ss = {0};
    socklen_t sl = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == -1) {
        snprintf(buf, len, "?");
        return;
    }
    format_addr(&ss, buf, len);
}
