/*
 * registration.h: the decoded registration of a plain sidecar (web-sidecar-proxy for web,
 * public port 21000, local app 127.0.0.1:8080) that the proxycfg tests start from and vary,
 * and an upstream for it.
 */
#ifndef CONNECTD_TEST_REGISTRATION_H
#define CONNECTD_TEST_REGISTRATION_H

#include "decode.h"

static inline struct dec_service base_service(void)
{
    struct dec_service s = {0};
    s.kind = "connect-proxy";
    s.id = "web-sidecar-proxy";
    s.service = "web-sidecar-proxy";
    s.address = "";
    s.port = 21000;
    s.socket_path = "";
    s.datacenter = "dc1";
    s.ns = "";
    s.partition = "";
    s.content_hash = "abc";
    s.destination_service_name = "web";
    s.destination_service_id = "web";
    s.local_service_address = "127.0.0.1";
    s.local_service_port = 8080;
    s.local_service_socket_path = "";
    s.mode = "";
    return s;
}

/* An upstream "db" on port 9191 with every string field empty and no Config. */
static inline struct dec_upstream db_upstream(void)
{
    return (struct dec_upstream){.destination_type = "",
                                 .destination_name = "db",
                                 .destination_namespace = "",
                                 .destination_partition = "",
                                 .destination_peer = "",
                                 .datacenter = "",
                                 .local_bind_address = "",
                                 .local_bind_port = 9191,
                                 .local_bind_socket_path = "",
                                 .local_bind_socket_mode = ""};
}

#endif
