/*
 * notify: systemd's readiness protocol (sd_notify) without libsystemd.
 *
 * When $NOTIFY_SOCKET names a unix datagram socket (a path, or an abstract name starting with
 * '@'), each call sends one datagram such as "READY=1" to it; otherwise it does nothing.
 */
#ifndef CONNECTD_NOTIFY_H
#define CONNECTD_NOTIFY_H

/*
 * Sends <state> (newline-separated VAR=value assignments) to $NOTIFY_SOCKET. Any thread.
 * Returns 1 when sent, 0 when no socket is configured, or -errno.
 */
int notify_send(const char *state);

#endif
