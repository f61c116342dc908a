/*
 * sock: thin wrappers over the socket calls, with the options every leg wants.
 */
#include "sock.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
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

int sock_listen_unix(const char *path, int mode, unsigned long *ino, char *err, size_t errlen)
{
    struct sockaddr_un un;
    struct stat st;
    int fd = -1, rc = fill_unix(path, &un);
    if (rc != 0)
        goto fail;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            rc = -EEXIST;
            goto fail;
        }
        unlink(path); /* a stale socket from an earlier run */
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1) {
        rc = -errno;
        goto fail;
    }
    if (bind(fd, (struct sockaddr *)&un, sizeof(un)) == -1 ||
        (mode >= 0 && chmod(path, (mode_t)mode) == -1) || listen(fd, 1024) == -1 ||
        stat(path, &st) == -1) {
        rc = -errno;
        goto fail;
    }
    *ino = (unsigned long)st.st_ino;
    return fd;
fail:
    if (fd != -1)
        close(fd);
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
