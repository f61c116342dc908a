/*
 * sock: non-blocking TCP sockets on numeric addresses (IPv4 and IPv6).
 *
 * Addresses are never resolved through DNS here: workers must not block. Errors are returned
 * as -errno; setup-time failures also write a message naming the address into <err>.
 */
#ifndef CONNECTD_SOCK_H
#define CONNECTD_SOCK_H

#include <stddef.h>

/*
 * Opens a non-blocking listening socket on <addr>:<port> with SO_REUSEADDR, and SO_REUSEPORT
 * when <reuseport> is set (one listener per worker). Returns the fd or -errno.
 */
int sock_listen(const char *addr, int port, int reuseport, char *err, size_t errlen);

/*
 * Starts a non-blocking connect to <addr>:<port> with TCP_NODELAY set. Returns the fd (the
 * connection completes when it becomes writable; check sock_connect_result()) or -errno;
 * -EINVAL when <addr> is not a numeric address.
 */
int sock_connect(const char *addr, int port);

/* The mode of a unix listener's file when none is configured: the owner's only. */
#define SOCK_UNIX_DEFAULT_MODE 0600

/*
 * Opens a non-blocking listening unix stream socket at <path> whose file has exactly the
 * permissions <mode>, or SOCK_UNIX_DEFAULT_MODE when <mode> < 0, whatever the umask; the mode
 * is never applied through a symbolic link. What is already at <path> is replaced only when
 * it is a stale socket (connecting to it is refused); a socket in use gives -EADDRINUSE, a
 * regular file, directory or symbolic link -EEXIST, and they are left untouched. *ino
 * receives the file's inode so the owner can later remove the file only if it is still its
 * own (sock_unlink_unix). Thread-safe (the umask is not changed). Returns the fd, or -errno
 * with <err> naming the path and the reason.
 */
int sock_listen_unix(const char *path, int mode, unsigned long *ino, char *err, size_t errlen);

/* Removes the socket file at <path> if its inode is still <ino>. */
void sock_unlink_unix(const char *path, unsigned long ino);

/* Starts a non-blocking connect to the unix stream socket <path>. fd or -errno. */
int sock_connect_unix(const char *path);

/* After a pending connect became writable: 0 when connected, or -errno. */
int sock_connect_result(int fd);

/* Accepts one connection as non-blocking, close-on-exec, with TCP_NODELAY. fd or -errno. */
int sock_accept(int lfd, char *peer, size_t peer_len);

/* Formats the peer address of <fd> as "ip:port" ("?" when unknown). */
void sock_peer_name(int fd, char *buf, size_t len);

/* Formats the local address of <fd> as "ip:port" ("unix" for a unix socket, "?" unknown). */
void sock_local_name(int fd, char *buf, size_t len);

#endif
