/*
 * Unit tests for decode: every decoder on realistic agent bodies (pretty-printed as a dev agent
 * sends them, with unknown fields and null maps), on every truncation of those bodies, and on
 * malformed input: wrong types, missing fields, bad JSON. Run under ASan so a leak or an
 * over-read on any failure path fails the suite.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "decode.h"
#include "util.h"

#define TD "11111111-2222-3333-4444-555555555555.consul"

/* The same bodies are committed as the fuzz corpus under tests/fuzz/corpus/decode/. */
static const char ROOTS_JSON[] =
    "{\n"
    "    \"ActiveRootID\": \"c4:1a:9e:0b:7d:22:5f:93:4e:18:a1:6c:3b:d0:77:e2:95:08:fb:41\",\n"
    "    \"TrustDomain\": \"11111111-2222-3333-4444-555555555555.consul\",\n"
    "    \"Roots\": [\n"
    "        {\n"
    "            \"ID\": \"c4:1a:9e:0b:7d:22:5f:93:4e:18:a1:6c:3b:d0:77:e2:95:08:fb:41\",\n"
    "            \"Name\": \"Consul CA Primary Cert\",\n"
    "            \"SerialNumber\": 12,\n"
    "            \"SigningKeyID\": "
    "\"5e:21:aa:0c:91:3d:7b:42:18:e0:c6:9f:24:b7:03:5a:ee:61:d8:17\",\n"
    "            \"ExternalTrustDomain\": \"11111111-2222-3333-4444-555555555555\",\n"
    "            \"NotBefore\": \"2024-05-01T10:00:00Z\",\n"
    "            \"NotAfter\": \"2034-05-01T10:00:00Z\",\n"
    "            \"RootCert\": \"-----BEGIN "
    "CERTIFICATE-----"
    "\\nMIICDzCCAbWgAwIBAgIBDDAKBggqhkjOPQQDAjAwMS4wLAYDVQQDEyVwcmktMXE0\\nbmZ4eC5jb25zdWwuY2EuMTEx"
    "MTExMTEuY29uc3VsMB4XDTI0MDUwMTEwMDAwMFoX\\n-----END CERTIFICATE-----\\n\",\n"
    "            \"IntermediateCerts\": null,\n"
    "            \"Active\": true,\n"
    "            \"PrivateKeyType\": \"ec\",\n"
    "            \"PrivateKeyBits\": 256,\n"
    "            \"CreateIndex\": 8,\n"
    "            \"ModifyIndex\": 8\n"
    "        },\n"
    "        {\n"
    "            \"ID\": \"0f:3b:5c:61:aa:90:12:de:47:c8:0e:b3:59:21:7a:f4:66:9d:30:c2\",\n"
    "            \"Name\": \"Consul CA Root Cert\",\n"
    "            \"SerialNumber\": 7,\n"
    "            \"SigningKeyID\": "
    "\"9a:44:1e:b0:27:cc:83:5d:f1:06:3a:e8:72:94:bd:10:4f:c3:58:2e\",\n"
    "            \"ExternalTrustDomain\": \"11111111-2222-3333-4444-555555555555\",\n"
    "            \"NotBefore\": \"2023-05-01T10:00:00Z\",\n"
    "            \"NotAfter\": \"2033-05-01T10:00:00Z\",\n"
    "            \"RootCert\": \"-----BEGIN "
    "CERTIFICATE-----\\nMIICDjCCAbSgAwIBAgIBBzAKBggqhkjOPQQDAjAwMS4wLAYDVQQDEyVwcmktMWpm\\n-----"
    "END CERTIFICATE-----\\n\",\n"
    "            \"IntermediateCerts\": [\n"
    "                \"-----BEGIN "
    "CERTIFICATE-----\\nMIICKjCCAdCgAwIBAgIBCDAKBggqhkjOPQQDAjAw\\n-----END CERTIFICATE-----\\n\"\n"
    "            ],\n"
    "            \"Active\": false,\n"
    "            \"PrivateKeyType\": \"ec\",\n"
    "            \"PrivateKeyBits\": 256,\n"
    "            \"CreateIndex\": 5,\n"
    "            \"ModifyIndex\": 9\n"
    "        }\n"
    "    ]\n"
    "}\n";

static const char LEAF_JSON[] =
    "{\n"
    "    \"SerialNumber\": \"3a:0f:91:c2:5e:17\",\n"
    "    \"CertPEM\": \"-----BEGIN "
    "CERTIFICATE-----\\nMIICHTCCAcOgAwIBAgIGOg+"
    "RwlvXMAoGCCqGSM49BAMCMDAxLjAsBgNVBAMTJXBy\\naS0xcTRuZnh4LmNvbnN1bC5jYS4xMTExMTExMS5jb25zdWwwHh"
    "cNMjQwNTAxMTAw\\n-----END CERTIFICATE-----\\n-----BEGIN "
    "CERTIFICATE-----\\nMIICKjCCAdCgAwIBAgIBCDAKBggqhkjOPQQDAjAw\\n-----END "
    "CERTIFICATE-----\\n\",\n"
    "    \"PrivateKeyPEM\": \"-----BEGIN EC PRIVATE "
    "KEY-----"
    "\\nMHcCAQEEIBkq3mF0cm5QmOt4Zr6Y0R9jJwQe1x3b7n8d2P1Q4vYKoAoGCCqGSM49\\nAwEHoUQDQgAE5Xo2V8gM3b3J"
    "b3c9Q1g2w7oH1y5l3nB6qK8U1L3c4Z0s9x1T2u3v\\n-----END EC PRIVATE KEY-----\\n\",\n"
    "    \"Service\": \"web\",\n"
    "    \"ServiceURI\": "
    "\"spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web\",\n"
    "    \"ValidAfter\": \"2024-05-01T10:00:00Z\",\n"
    "    \"ValidBefore\": \"2024-05-04T10:00:00.123456789Z\",\n"
    "    \"CreateIndex\": 31,\n"
    "    \"ModifyIndex\": 31\n"
    "}\n";

static const char SERVICE_JSON[] =
    "{\n"
    "    \"Kind\": \"connect-proxy\",\n"
    "    \"ID\": \"web-sidecar-proxy\",\n"
    "    \"Service\": \"web-sidecar-proxy\",\n"
    "    \"Tags\": [],\n"
    "    \"Meta\": null,\n"
    "    \"Port\": 21000,\n"
    "    \"Address\": \"\",\n"
    "    \"SocketPath\": \"\",\n"
    "    \"TaggedAddresses\": {\n"
    "        \"lan_ipv4\": {\n"
    "            \"Address\": \"10.0.0.5\",\n"
    "            \"Port\": 21000\n"
    "        }\n"
    "    },\n"
    "    \"Weights\": {\n"
    "        \"Passing\": 1,\n"
    "        \"Warning\": 1\n"
    "    },\n"
    "    \"EnableTagOverride\": false,\n"
    "    \"Proxy\": {\n"
    "        \"DestinationServiceName\": \"web\",\n"
    "        \"DestinationServiceID\": \"web\",\n"
    "        \"LocalServiceAddress\": \"127.0.0.1\",\n"
    "        \"LocalServicePort\": 8080,\n"
    "        \"LocalServiceSocketPath\": \"\",\n"
    "        \"Mode\": \"\",\n"
    "        \"Config\": {\n"
    "            \"bind_address\": \"0.0.0.0\",\n"
    "            \"handshake_timeout_ms\": 10000,\n"
    "            \"limits\": {\n"
    "                \"max_connections\": 5,\n"
    "                \"rate\": {\n"
    "                    \"per_second\": 2.5\n"
    "                }\n"
    "            },\n"
    "            \"envoy_extra_static_clusters_json\": \"\",\n"
    "            \"protocol\": \"tcp\",\n"
    "            \"tracing\": null,\n"
    "            \"verbose\": true,\n"
    "            \"alpn\": [\n"
    "                \"h2\",\n"
    "                \"http/1.1\"\n"
    "            ]\n"
    "        },\n"
    "        \"Upstreams\": [\n"
    "            {\n"
    "                \"DestinationType\": \"service\",\n"
    "                \"DestinationName\": \"db\",\n"
    "                \"DestinationNamespace\": \"\",\n"
    "                \"DestinationPartition\": \"\",\n"
    "                \"DestinationPeer\": \"\",\n"
    "                \"Datacenter\": \"\",\n"
    "                \"LocalBindAddress\": \"\",\n"
    "                \"LocalBindPort\": 9191,\n"
    "                \"Config\": {\n"
    "                    \"connect_timeout_ms\": \"5000\",\n"
    "                    \"limits\": {\n"
    "                        \"max_connections\": 100\n"
    "                    }\n"
    "                },\n"
    "                \"MeshGateway\": {\n"
    "                    \"Mode\": \"\"\n"
    "                }\n"
    "            },\n"
    "            {\n"
    "                \"DestinationName\": \"nearest-cache\",\n"
    "                \"DestinationType\": \"prepared_query\",\n"
    "                \"Datacenter\": \"dc2\",\n"
    "                \"LocalBindSocketPath\": \"/run/web/cache.sock\",\n"
    "                \"LocalBindSocketMode\": \"0600\",\n"
    "                \"Config\": null,\n"
    "                \"MeshGateway\": {}\n"
    "            }\n"
    "        ],\n"
    "        \"MeshGateway\": {\n"
    "            \"Mode\": \"\"\n"
    "        },\n"
    "        \"Expose\": {},\n"
    "        \"AccessLogs\": {}\n"
    "    },\n"
    "    \"ContentHash\": \"c1f5d3f0a8a7b9e2\",\n"
    "    \"Datacenter\": \"dc1\",\n"
    "    \"PeerName\": \"\",\n"
    "    \"Namespace\": \"\",\n"
    "    \"Partition\": \"\"\n"
    "}\n";

static const char SERVICES_JSON[] = "{\n"
                                    "    \"db\": {\n"
                                    "        \"ID\": \"db\",\n"
                                    "        \"Service\": \"db\",\n"
                                    "        \"Tags\": [],\n"
                                    "        \"Meta\": {},\n"
                                    "        \"Port\": 5432,\n"
                                    "        \"Address\": \"\",\n"
                                    "        \"Weights\": {\n"
                                    "            \"Passing\": 1,\n"
                                    "            \"Warning\": 1\n"
                                    "        },\n"
                                    "        \"EnableTagOverride\": false,\n"
                                    "        \"Datacenter\": \"dc1\"\n"
                                    "    },\n"
                                    "    \"db-sidecar-proxy\": {\n"
                                    "        \"Kind\": \"connect-proxy\",\n"
                                    "        \"ID\": \"db-sidecar-proxy\",\n"
                                    "        \"Service\": \"db-sidecar-proxy\",\n"
                                    "        \"Tags\": [],\n"
                                    "        \"Meta\": {},\n"
                                    "        \"Port\": 21001,\n"
                                    "        \"Address\": \"\",\n"
                                    "        \"Proxy\": {\n"
                                    "            \"DestinationServiceName\": \"db\",\n"
                                    "            \"DestinationServiceID\": \"db\",\n"
                                    "            \"LocalServiceAddress\": \"127.0.0.1\",\n"
                                    "            \"LocalServicePort\": 5432,\n"
                                    "            \"Config\": null,\n"
                                    "            \"MeshGateway\": {},\n"
                                    "            \"Expose\": {}\n"
                                    "        },\n"
                                    "        \"Datacenter\": \"dc1\"\n"
                                    "    },\n"
                                    "    \"web\": {\n"
                                    "        \"ID\": \"web\",\n"
                                    "        \"Service\": \"web\",\n"
                                    "        \"Tags\": [\n"
                                    "            \"v1\"\n"
                                    "        ],\n"
                                    "        \"Meta\": null,\n"
                                    "        \"Port\": 8080,\n"
                                    "        \"Address\": \"\",\n"
                                    "        \"Connect\": {},\n"
                                    "        \"Datacenter\": \"dc1\"\n"
                                    "    },\n"
                                    "    \"web-sidecar-proxy\": {\n"
                                    "        \"Kind\": \"connect-proxy\",\n"
                                    "        \"ID\": \"web-sidecar-proxy\",\n"
                                    "        \"Service\": \"web-sidecar-proxy\",\n"
                                    "        \"Tags\": [\n"
                                    "            \"v1\"\n"
                                    "        ],\n"
                                    "        \"Meta\": null,\n"
                                    "        \"Port\": 21000,\n"
                                    "        \"Address\": \"\",\n"
                                    "        \"Proxy\": {\n"
                                    "            \"DestinationServiceName\": \"web\",\n"
                                    "            \"DestinationServiceID\": \"web\",\n"
                                    "            \"LocalServiceAddress\": \"127.0.0.1\",\n"
                                    "            \"LocalServicePort\": 8080,\n"
                                    "            \"Upstreams\": [\n"
                                    "                {\n"
                                    "                    \"DestinationType\": \"service\",\n"
                                    "                    \"DestinationName\": \"db\",\n"
                                    "                    \"LocalBindPort\": 9191\n"
                                    "                }\n"
                                    "            ]\n"
                                    "        },\n"
                                    "        \"Datacenter\": \"dc1\"\n"
                                    "    }\n"
                                    "}\n";

static const char INTENTIONS_JSON[] =
    "{\n"
    "    \"db\": [\n"
    "        {\n"
    "            \"ID\": \"\",\n"
    "            \"Description\": \"\",\n"
    "            \"SourcePeer\": \"\",\n"
    "            \"SourceSamenessGroup\": \"\",\n"
    "            \"SourcePartition\": \"\",\n"
    "            \"SourceNS\": \"default\",\n"
    "            \"SourceName\": \"web\",\n"
    "            \"DestinationPartition\": \"\",\n"
    "            \"DestinationNS\": \"default\",\n"
    "            \"DestinationName\": \"db\",\n"
    "            \"SourceType\": \"consul\",\n"
    "            \"Action\": \"allow\",\n"
    "            \"Permissions\": null,\n"
    "            \"JWT\": null,\n"
    "            \"Meta\": {},\n"
    "            \"Precedence\": 9,\n"
    "            \"CreatedAt\": \"0001-01-01T00:00:00Z\",\n"
    "            \"UpdatedAt\": \"0001-01-01T00:00:00Z\",\n"
    "            \"CreateIndex\": 14,\n"
    "            \"ModifyIndex\": 14\n"
    "        },\n"
    "        {\n"
    "            \"ID\": \"b1a6e3a2-54f1-6d2c-0c1f-0f0d4f3e9b11\",\n"
    "            \"Description\": \"admin UI over HTTP only\",\n"
    "            \"SourceNS\": \"default\",\n"
    "            \"SourceName\": \"admin\",\n"
    "            \"DestinationNS\": \"default\",\n"
    "            \"DestinationName\": \"db\",\n"
    "            \"SourceType\": \"consul\",\n"
    "            \"Action\": \"\",\n"
    "            \"Permissions\": [\n"
    "                {\n"
    "                    \"Action\": \"allow\",\n"
    "                    \"HTTP\": {\n"
    "                        \"PathPrefix\": \"/admin\",\n"
    "                        \"Methods\": [\n"
    "                            \"GET\"\n"
    "                        ]\n"
    "                    }\n"
    "                }\n"
    "            ],\n"
    "            \"Meta\": null,\n"
    "            \"Precedence\": 9,\n"
    "            \"CreateIndex\": 15,\n"
    "            \"ModifyIndex\": 15\n"
    "        },\n"
    "        {\n"
    "            \"SourcePeer\": \"dc2-peer\",\n"
    "            \"SourceNS\": \"default\",\n"
    "            \"SourceName\": \"web\",\n"
    "            \"DestinationNS\": \"default\",\n"
    "            \"DestinationName\": \"db\",\n"
    "            \"SourceType\": \"consul\",\n"
    "            \"Action\": \"allow\",\n"
    "            \"Precedence\": 9\n"
    "        },\n"
    "        {\n"
    "            \"SourceNS\": \"default\",\n"
    "            \"SourceName\": \"*\",\n"
    "            \"DestinationNS\": \"default\",\n"
    "            \"DestinationName\": \"db\",\n"
    "            \"SourceType\": \"consul\",\n"
    "            \"Action\": \"deny\",\n"
    "            \"Precedence\": 8\n"
    "        },\n"
    "        {\n"
    "            \"SourceNS\": \"default\",\n"
    "            \"SourceName\": \"*\",\n"
    "            \"DestinationNS\": \"default\",\n"
    "            \"DestinationName\": \"*\",\n"
    "            \"SourceType\": \"consul\",\n"
    "            \"Action\": \"allow\",\n"
    "            \"Precedence\": 5\n"
    "        }\n"
    "    ]\n"
    "}\n";

static const char HEALTH_JSON[] =
    "[\n"
    "    {\n"
    "        \"Node\": {\n"
    "            \"ID\": \"adf4238a-882b-9ddc-4a9d-5b6758e4159e\",\n"
    "            \"Node\": \"node-a\",\n"
    "            \"Address\": \"10.0.0.5\",\n"
    "            \"Datacenter\": \"dc1\",\n"
    "            \"TaggedAddresses\": {\n"
    "                \"lan\": \"10.0.0.5\",\n"
    "                \"lan_ipv4\": \"10.0.0.5\",\n"
    "                \"wan\": \"198.51.100.5\",\n"
    "                \"wan_ipv4\": \"198.51.100.5\"\n"
    "            },\n"
    "            \"Meta\": {\n"
    "                \"consul-network-segment\": \"\"\n"
    "            },\n"
    "            \"CreateIndex\": 11,\n"
    "            \"ModifyIndex\": 13\n"
    "        },\n"
    "        \"Service\": {\n"
    "            \"Kind\": \"connect-proxy\",\n"
    "            \"ID\": \"db-sidecar-proxy\",\n"
    "            \"Service\": \"db-sidecar-proxy\",\n"
    "            \"Tags\": [],\n"
    "            \"Address\": \"\",\n"
    "            \"TaggedAddresses\": null,\n"
    "            \"Meta\": null,\n"
    "            \"Port\": 21001,\n"
    "            \"SocketPath\": \"\",\n"
    "            \"Weights\": {\n"
    "                \"Passing\": 1,\n"
    "                \"Warning\": 1\n"
    "            },\n"
    "            \"EnableTagOverride\": false,\n"
    "            \"Proxy\": {\n"
    "                \"DestinationServiceName\": \"db\",\n"
    "                \"DestinationServiceID\": \"db\",\n"
    "                \"LocalServiceAddress\": \"127.0.0.1\",\n"
    "                \"LocalServicePort\": 5432,\n"
    "                \"Mode\": \"\",\n"
    "                \"MeshGateway\": {},\n"
    "                \"Expose\": {}\n"
    "            },\n"
    "            \"Connect\": {},\n"
    "            \"PeerName\": \"\",\n"
    "            \"CreateIndex\": 20,\n"
    "            \"ModifyIndex\": 20\n"
    "        },\n"
    "        \"Checks\": [\n"
    "            {\n"
    "                \"Node\": \"node-a\",\n"
    "                \"CheckID\": \"serfHealth\",\n"
    "                \"Name\": \"Serf Health Status\",\n"
    "                \"Status\": \"passing\",\n"
    "                \"Notes\": \"\",\n"
    "                \"Output\": \"Agent alive and reachable\",\n"
    "                \"ServiceID\": \"\",\n"
    "                \"ServiceName\": \"\",\n"
    "                \"ServiceTags\": [],\n"
    "                \"Type\": \"\",\n"
    "                \"ExposedPort\": 0,\n"
    "                \"Definition\": {},\n"
    "                \"CreateIndex\": 11,\n"
    "                \"ModifyIndex\": 11\n"
    "            },\n"
    "            {\n"
    "                \"Node\": \"node-a\",\n"
    "                \"CheckID\": \"service:db-sidecar-proxy:1\",\n"
    "                \"Name\": \"Connect Sidecar Listening\",\n"
    "                \"Status\": \"passing\",\n"
    "                \"ServiceID\": \"db-sidecar-proxy\",\n"
    "                \"ServiceName\": \"db-sidecar-proxy\",\n"
    "                \"ServiceTags\": [],\n"
    "                \"Type\": \"tcp\",\n"
    "                \"Definition\": {\n"
    "                    \"TCP\": \"127.0.0.1:21001\",\n"
    "                    \"Interval\": \"10s\"\n"
    "                }\n"
    "            }\n"
    "        ]\n"
    "    },\n"
    "    {\n"
    "        \"Node\": {\n"
    "            \"ID\": \"5e1d0c17-0c3a-4b8e-9d3e-9c5e0a6b2f10\",\n"
    "            \"Node\": \"node-b\",\n"
    "            \"Address\": \"10.0.0.6\",\n"
    "            \"Datacenter\": \"dc1\",\n"
    "            \"TaggedAddresses\": null,\n"
    "            \"Meta\": null\n"
    "        },\n"
    "        \"Service\": {\n"
    "            \"Kind\": \"\",\n"
    "            \"ID\": \"db-native-2\",\n"
    "            \"Service\": \"db\",\n"
    "            \"Tags\": [\n"
    "                \"native\"\n"
    "            ],\n"
    "            \"Address\": \"10.0.1.9\",\n"
    "            \"Port\": 5433,\n"
    "            \"SocketPath\": \"\",\n"
    "            \"Connect\": {\n"
    "                \"Native\": true\n"
    "            },\n"
    "            \"Namespace\": \"\",\n"
    "            \"Partition\": \"\"\n"
    "        },\n"
    "        \"Checks\": [\n"
    "            {\n"
    "                \"Node\": \"node-b\",\n"
    "                \"CheckID\": \"serfHealth\",\n"
    "                \"Status\": \"passing\"\n"
    "            },\n"
    "            {\n"
    "                \"Node\": \"node-b\",\n"
    "                \"CheckID\": \"service:db-native-2\",\n"
    "                \"Status\": \"critical\",\n"
    "                \"Output\": \"dial tcp 10.0.1.9:5433: connect: connection refused\"\n"
    "            }\n"
    "        ]\n"
    "    }\n"
    "]\n";

/* A real chain with a router, a splitter and resolvers with a LoadBalancer (Consul 1.22.7,
 * answer to POST /v1/discovery-chain/db): route Destination durations as strings, the
 * resolver's RequestTimeout and the cookie TTL as integer nanoseconds. */
static const char ROUTER_CHAIN_JSON[] =
    "{\n"
    " \"Chain\": {\n"
    "  \"ServiceName\": \"db\",\n"
    "  \"Namespace\": \"default\",\n"
    "  \"Partition\": \"default\",\n"
    "  \"Datacenter\": \"dc1\",\n"
    "  \"Protocol\": \"http\",\n"
    "  \"StartNode\": \"router:db.default.default\",\n"
    "  \"Nodes\": {\n"
    "   \"resolver:db2.default.default.dc1\": {\n"
    "    \"Type\": \"resolver\",\n"
    "    \"Name\": \"db2.default.default.dc1\",\n"
    "    \"Resolver\": {\n"
    "     \"ConnectTimeout\": \"5s\",\n"
    "     \"Default\": true,\n"
    "     \"Target\": \"db2.default.default.dc1\"\n"
    "    }\n"
    "   },\n"
    "   \"resolver:v1.db.default.default.dc1\": {\n"
    "    \"Type\": \"resolver\",\n"
    "    \"Name\": \"v1.db.default.default.dc1\",\n"
    "    \"Resolver\": {\n"
    "     \"ConnectTimeout\": \"3s\",\n"
    "     \"RequestTimeout\": 7000000000,\n"
    "     \"Target\": \"v1.db.default.default.dc1\",\n"
    "     \"Failover\": {\n"
    "      \"Targets\": [\n"
    "       \"db2.default.default.dc1\"\n"
    "      ]\n"
    "     }\n"
    "    },\n"
    "    \"LoadBalancer\": {\n"
    "     \"Policy\": \"ring_hash\",\n"
    "     \"RingHashConfig\": {\n"
    "      \"MinimumRingSize\": 1024,\n"
    "      \"MaximumRingSize\": 8192\n"
    "     },\n"
    "     \"HashPolicies\": [\n"
    "      {\n"
    "       \"Field\": \"header\",\n"
    "       \"FieldValue\": \"x-user\"\n"
    "      },\n"
    "      {\n"
    "       \"Field\": \"cookie\",\n"
    "       \"FieldValue\": \"sess\",\n"
    "       \"CookieConfig\": {\n"
    "        \"TTL\": 10000000000,\n"
    "        \"Path\": \"/\"\n"
    "       }\n"
    "      },\n"
    "      {\n"
    "       \"SourceIP\": true,\n"
    "       \"Terminal\": true\n"
    "      }\n"
    "     ]\n"
    "    }\n"
    "   },\n"
    "   \"resolver:v2.db.default.default.dc1\": {\n"
    "    \"Type\": \"resolver\",\n"
    "    \"Name\": \"v2.db.default.default.dc1\",\n"
    "    \"Resolver\": {\n"
    "     \"ConnectTimeout\": \"3s\",\n"
    "     \"RequestTimeout\": 7000000000,\n"
    "     \"Target\": \"v2.db.default.default.dc1\",\n"
    "     \"Failover\": {\n"
    "      \"Targets\": [\n"
    "       \"db2.default.default.dc1\"\n"
    "      ]\n"
    "     }\n"
    "    },\n"
    "    \"LoadBalancer\": {\n"
    "     \"Policy\": \"ring_hash\",\n"
    "     \"RingHashConfig\": {\n"
    "      \"MinimumRingSize\": 1024,\n"
    "      \"MaximumRingSize\": 8192\n"
    "     },\n"
    "     \"HashPolicies\": [\n"
    "      {\n"
    "       \"Field\": \"header\",\n"
    "       \"FieldValue\": \"x-user\"\n"
    "      },\n"
    "      {\n"
    "       \"Field\": \"cookie\",\n"
    "       \"FieldValue\": \"sess\",\n"
    "       \"CookieConfig\": {\n"
    "        \"TTL\": 10000000000,\n"
    "        \"Path\": \"/\"\n"
    "       }\n"
    "      },\n"
    "      {\n"
    "       \"SourceIP\": true,\n"
    "       \"Terminal\": true\n"
    "      }\n"
    "     ]\n"
    "    }\n"
    "   },\n"
    "   \"router:db.default.default\": {\n"
    "    \"Type\": \"router\",\n"
    "    \"Name\": \"db.default.default\",\n"
    "    \"Routes\": [\n"
    "     {\n"
    "      \"Definition\": {\n"
    "       \"Match\": {\n"
    "        \"HTTP\": {\n"
    "         \"PathPrefix\": \"/api\",\n"
    "         \"CaseInsensitive\": true,\n"
    "         \"Header\": [\n"
    "          {\n"
    "           \"Name\": \"x-a\",\n"
    "           \"Exact\": \"b\",\n"
    "           \"Invert\": true\n"
    "          },\n"
    "          {\n"
    "           \"Name\": \"x-p\",\n"
    "           \"Present\": true\n"
    "          }\n"
    "         ],\n"
    "         \"QueryParam\": [\n"
    "          {\n"
    "           \"Name\": \"q\",\n"
    "           \"Exact\": \"1\"\n"
    "          },\n"
    "          {\n"
    "           \"Name\": \"r\",\n"
    "           \"Present\": true\n"
    "          },\n"
    "          {\n"
    "           \"Name\": \"s\",\n"
    "           \"Regex\": \"a.*\"\n"
    "          }\n"
    "         ],\n"
    "         \"Methods\": [\n"
    "          \"GET\",\n"
    "          \"PUT\"\n"
    "         ]\n"
    "        }\n"
    "       },\n"
    "       \"Destination\": {\n"
    "        \"RequestTimeout\": \"2s\",\n"
    "        \"IdleTimeout\": \"1.5s\",\n"
    "        \"Service\": \"db\",\n"
    "        \"ServiceSubset\": \"v2\",\n"
    "        \"PrefixRewrite\": \"/\",\n"
    "        \"NumRetries\": 3,\n"
    "        \"RetryOnConnectFailure\": true,\n"
    "        \"RetryOn\": [\n"
    "         \"5xx\",\n"
    "         \"reset\"\n"
    "        ],\n"
    "        \"RetryOnStatusCodes\": [\n"
    "         503,\n"
    "         429\n"
    "        ],\n"
    "        \"RequestHeaders\": {\n"
    "         \"Add\": {\n"
    "          \"x-add\": \"1\"\n"
    "         },\n"
    "         \"Set\": {\n"
    "          \"x-set\": \"2\"\n"
    "         },\n"
    "         \"Remove\": [\n"
    "          \"x-rm\"\n"
    "         ]\n"
    "        }\n"
    "       }\n"
    "      },\n"
    "      \"NextNode\": \"resolver:v2.db.default.default.dc1\"\n"
    "     },\n"
    "     {\n"
    "      \"Definition\": {\n"
    "       \"Match\": {\n"
    "        \"HTTP\": {\n"
    "         \"PathRegex\": \"/re.*\"\n"
    "        }\n"
    "       },\n"
    "       \"Destination\": {\n"
    "        \"Service\": \"db2\"\n"
    "       }\n"
    "      },\n"
    "      \"NextNode\": \"resolver:db2.default.default.dc1\"\n"
    "     },\n"
    "     {\n"
    "      \"Definition\": {\n"
    "       \"Match\": {\n"
    "        \"HTTP\": {\n"
    "         \"PathPrefix\": \"/\"\n"
    "        }\n"
    "       },\n"
    "       \"Destination\": {\n"
    "        \"Service\": \"db\",\n"
    "        \"Namespace\": \"default\",\n"
    "        \"Partition\": \"default\"\n"
    "       }\n"
    "      },\n"
    "      \"NextNode\": \"splitter:db.default.default\"\n"
    "     }\n"
    "    ]\n"
    "   },\n"
    "   \"splitter:db.default.default\": {\n"
    "    \"Type\": \"splitter\",\n"
    "    \"Name\": \"db.default.default\",\n"
    "    \"Splits\": [\n"
    "     {\n"
    "      \"Definition\": {\n"
    "       \"Weight\": 90,\n"
    "       \"ServiceSubset\": \"v1\",\n"
    "       \"RequestHeaders\": {\n"
    "        \"Set\": {\n"
    "         \"x-split\": \"v1\"\n"
    "        }\n"
    "       }\n"
    "      },\n"
    "      \"Weight\": 90,\n"
    "      \"NextNode\": \"resolver:v1.db.default.default.dc1\"\n"
    "     },\n"
    "     {\n"
    "      \"Definition\": {\n"
    "       \"Weight\": 10,\n"
    "       \"ServiceSubset\": \"v2\",\n"
    "       \"ResponseHeaders\": {\n"
    "        \"Add\": {\n"
    "         \"x-s\": \"2\"\n"
    "        },\n"
    "        \"Remove\": [\n"
    "         \"x-r\"\n"
    "        ]\n"
    "       }\n"
    "      },\n"
    "      \"Weight\": 10,\n"
    "      \"NextNode\": \"resolver:v2.db.default.default.dc1\"\n"
    "     }\n"
    "    ],\n"
    "    \"LoadBalancer\": {\n"
    "     \"Policy\": \"ring_hash\",\n"
    "     \"RingHashConfig\": {\n"
    "      \"MinimumRingSize\": 1024,\n"
    "      \"MaximumRingSize\": 8192\n"
    "     },\n"
    "     \"HashPolicies\": [\n"
    "      {\n"
    "       \"Field\": \"header\",\n"
    "       \"FieldValue\": \"x-user\"\n"
    "      },\n"
    "      {\n"
    "       \"Field\": \"cookie\",\n"
    "       \"FieldValue\": \"sess\",\n"
    "       \"CookieConfig\": {\n"
    "        \"TTL\": 10000000000,\n"
    "        \"Path\": \"/\"\n"
    "       }\n"
    "      },\n"
    "      {\n"
    "       \"SourceIP\": true,\n"
    "       \"Terminal\": true\n"
    "      }\n"
    "     ]\n"
    "    }\n"
    "   }\n"
    "  },\n"
    "  \"Targets\": {\n"
    "   \"db2.default.default.dc1\": {\n"
    "    \"ConnectTimeout\": \"5s\",\n"
    "    \"ID\": \"db2.default.default.dc1\",\n"
    "    \"Service\": \"db2\",\n"
    "    \"Namespace\": \"default\",\n"
    "    \"Partition\": \"default\",\n"
    "    \"Datacenter\": \"dc1\",\n"
    "    \"MeshGateway\": {},\n"
    "    \"Subset\": {},\n"
    "    \"TransparentProxy\": {},\n"
    "    \"SNI\": \"db2.default.dc1.internal.8b1a4d52-fd0a-49ba-a5f2-2e829eefd780.consul\",\n"
    "    \"Name\": \"db2.default.dc1.internal.8b1a4d52-fd0a-49ba-a5f2-2e829eefd780.consul\"\n"
    "   },\n"
    "   \"v1.db.default.default.dc1\": {\n"
    "    \"ConnectTimeout\": \"3s\",\n"
    "    \"ID\": \"v1.db.default.default.dc1\",\n"
    "    \"Service\": \"db\",\n"
    "    \"ServiceSubset\": \"v1\",\n"
    "    \"Namespace\": \"default\",\n"
    "    \"Partition\": \"default\",\n"
    "    \"Datacenter\": \"dc1\",\n"
    "    \"MeshGateway\": {},\n"
    "    \"Subset\": {\n"
    "     \"Filter\": \"Service.Meta.version == v1\"\n"
    "    },\n"
    "    \"TransparentProxy\": {},\n"
    "    \"SNI\": \"v1.db.default.dc1.internal.8b1a4d52-fd0a-49ba-a5f2-2e829eefd780.consul\",\n"
    "    \"Name\": \"v1.db.default.dc1.internal.8b1a4d52-fd0a-49ba-a5f2-2e829eefd780.consul\"\n"
    "   },\n"
    "   \"v2.db.default.default.dc1\": {\n"
    "    \"ConnectTimeout\": \"3s\",\n"
    "    \"ID\": \"v2.db.default.default.dc1\",\n"
    "    \"Service\": \"db\",\n"
    "    \"ServiceSubset\": \"v2\",\n"
    "    \"Namespace\": \"default\",\n"
    "    \"Partition\": \"default\",\n"
    "    \"Datacenter\": \"dc1\",\n"
    "    \"MeshGateway\": {},\n"
    "    \"Subset\": {\n"
    "     \"Filter\": \"Service.Meta.version == v2\",\n"
    "     \"OnlyPassing\": true\n"
    "    },\n"
    "    \"TransparentProxy\": {},\n"
    "    \"SNI\": \"v2.db.default.dc1.internal.8b1a4d52-fd0a-49ba-a5f2-2e829eefd780.consul\",\n"
    "    \"Name\": \"v2.db.default.dc1.internal.8b1a4d52-fd0a-49ba-a5f2-2e829eefd780.consul\"\n"
    "   }\n"
    "  },\n"
    "  \"AutoVirtualIPs\": [\n"
    "   \"240.0.0.1\"\n"
    "  ],\n"
    "  \"ManualVirtualIPs\": []\n"
    " }\n"
    "}\n";

/* A real chain (Consul 1.22): resolver with DefaultSubset v2 (OnlyPassing) and failover. */
static const char CHAIN_JSON[] =
    "{\n"
    "    \"Chain\": {\n"
    "        \"ServiceName\": \"db\",\n"
    "        \"Namespace\": \"default\",\n"
    "        \"Partition\": \"default\",\n"
    "        \"Datacenter\": \"dc1\",\n"
    "        \"Protocol\": \"tcp\",\n"
    "        \"StartNode\": \"resolver:v2.db.default.default.dc1\",\n"
    "        \"Nodes\": {\n"
    "            \"resolver:v2.db.default.default.dc1\": {\n"
    "                \"Type\": \"resolver\",\n"
    "                \"Name\": \"v2.db.default.default.dc1\",\n"
    "                \"Resolver\": {\n"
    "                    \"ConnectTimeout\": \"3s\",\n"
    "                    \"Target\": \"v2.db.default.default.dc1\",\n"
    "                    \"Failover\": {\n"
    "                        \"Targets\": [\n"
    "                            \"dbb.default.default.dc1\"\n"
    "                        ]\n"
    "                    }\n"
    "                }\n"
    "            }\n"
    "        },\n"
    "        \"Targets\": {\n"
    "            \"dbb.default.default.dc1\": {\n"
    "                \"ConnectTimeout\": \"5s\",\n"
    "                \"ID\": \"dbb.default.default.dc1\",\n"
    "                \"Service\": \"dbb\",\n"
    "                \"Namespace\": \"default\",\n"
    "                \"Partition\": \"default\",\n"
    "                \"Datacenter\": \"dc1\",\n"
    "                \"MeshGateway\": {},\n"
    "                \"Subset\": {},\n"
    "                \"TransparentProxy\": {},\n"
    "                \"SNI\": "
    "\"dbb.default.dc1.internal.e824508e-766c-fec1-f12d-afc5c776ebfe.consul\",\n"
    "                \"Name\": "
    "\"dbb.default.dc1.internal.e824508e-766c-fec1-f12d-afc5c776ebfe.consul\"\n"
    "            },\n"
    "            \"v2.db.default.default.dc1\": {\n"
    "                \"ConnectTimeout\": \"3s\",\n"
    "                \"ID\": \"v2.db.default.default.dc1\",\n"
    "                \"Service\": \"db\",\n"
    "                \"ServiceSubset\": \"v2\",\n"
    "                \"Namespace\": \"default\",\n"
    "                \"Partition\": \"default\",\n"
    "                \"Datacenter\": \"dc1\",\n"
    "                \"MeshGateway\": {},\n"
    "                \"Subset\": {\n"
    "                    \"Filter\": \"Service.Meta.version == v2\",\n"
    "                    \"OnlyPassing\": true\n"
    "                },\n"
    "                \"TransparentProxy\": {},\n"
    "                \"SNI\": "
    "\"v2.db.default.dc1.internal.e824508e-766c-fec1-f12d-afc5c776ebfe.consul\",\n"
    "                \"Name\": "
    "\"v2.db.default.dc1.internal.e824508e-766c-fec1-f12d-afc5c776ebfe.consul\"\n"
    "            }\n"
    "        },\n"
    "        \"AutoVirtualIPs\": [\n"
    "            \"240.0.0.1\"\n"
    "        ],\n"
    "        \"ManualVirtualIPs\": []\n"
    "    }\n"
    "}\n";

/* A real prepared-query answer with connect=true (check statuses set to passing). */
static const char QUERY_JSON[] =
    "{\n"
    "    \"Service\": \"db\",\n"
    "    \"Nodes\": [\n"
    "        {\n"
    "            \"Node\": {\n"
    "                \"ID\": \"e244f3c4-9fdf-a6dd-7f4d-fff1526214cb\",\n"
    "                \"Node\": \"vm\",\n"
    "                \"Address\": \"127.0.0.1\",\n"
    "                \"Datacenter\": \"dc1\",\n"
    "                \"TaggedAddresses\": {\n"
    "                    \"lan\": \"127.0.0.1\",\n"
    "                    \"lan_ipv4\": \"127.0.0.1\",\n"
    "                    \"wan\": \"127.0.0.1\",\n"
    "                    \"wan_ipv4\": \"127.0.0.1\"\n"
    "                },\n"
    "                \"Meta\": {\n"
    "                    \"consul-network-segment\": \"\",\n"
    "                    \"consul-version\": \"1.22.7\"\n"
    "                }\n"
    "            },\n"
    "            \"Service\": {\n"
    "                \"Kind\": \"connect-proxy\",\n"
    "                \"ID\": \"db-sidecar-proxy\",\n"
    "                \"Service\": \"db-sidecar-proxy\",\n"
    "                \"Tags\": [],\n"
    "                \"Address\": \"\",\n"
    "                \"Meta\": {\n"
    "                    \"version\": \"v2\"\n"
    "                },\n"
    "                \"Port\": 21999,\n"
    "                \"Proxy\": {\n"
    "                    \"DestinationServiceName\": \"db\",\n"
    "                    \"DestinationServiceID\": \"db\",\n"
    "                    \"LocalServiceAddress\": \"127.0.0.1\",\n"
    "                    \"LocalServicePort\": 5432\n"
    "                }\n"
    "            },\n"
    "            \"Checks\": [\n"
    "                {\n"
    "                    \"CheckID\": \"serfHealth\",\n"
    "                    \"Name\": \"Serf Health Status\",\n"
    "                    \"Status\": \"passing\",\n"
    "                    \"ServiceID\": \"\"\n"
    "                },\n"
    "                {\n"
    "                    \"CheckID\": \"service:db-sidecar-proxy:1\",\n"
    "                    \"Name\": \"Connect Sidecar Listening\",\n"
    "                    \"Status\": \"passing\",\n"
    "                    \"ServiceID\": \"db-sidecar-proxy\"\n"
    "                },\n"
    "                {\n"
    "                    \"CheckID\": \"service:db-sidecar-proxy:2\",\n"
    "                    \"Name\": \"Connect Sidecar Aliasing db\",\n"
    "                    \"Status\": \"passing\",\n"
    "                    \"ServiceID\": \"db-sidecar-proxy\"\n"
    "                }\n"
    "            ]\n"
    "        }\n"
    "    ],\n"
    "    \"DNS\": {\n"
    "        \"TTL\": \"\"\n"
    "    },\n"
    "    \"Datacenter\": \"dc1\",\n"
    "    \"PeerName\": \"\",\n"
    "    \"Failovers\": 0,\n"
    "    \"Index\": 1\n"
    "}\n";

/* ---- one entry point per decoder, so the generic tests can loop over them ---- */

enum which { ROOTS, LEAF, SERVICE, SIDECAR, INTENTIONS, HEALTH, CHAIN, QUERY };

static const char *const which_names[] = {"roots",      "leaf",   "service", "sidecar",
                                          "intentions", "health", "chain",   "query"};

static int is_zero(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != 0)
            return 0;
    return 1;
}

/*
 * Runs one decoder and releases what it returned. On failure it checks the contract: the
 * output is zeroed (and, with ASan, that nothing stayed allocated).
 */
static int run(enum which w, const char *buf, size_t len, char *err, size_t errlen)
{
    int rc = -1;
    switch (w) {
    case ROOTS: {
        struct dec_roots r;
        memset(&r, 0xa5, sizeof(r));
        rc = decode_roots(buf, len, &r, err, errlen);
        if (rc != 0)
            assert_true(is_zero(&r, sizeof(r)));
        dec_roots_dispose(&r);
        break;
    }
    case LEAF: {
        struct dec_leaf l;
        memset(&l, 0xa5, sizeof(l));
        rc = decode_leaf(buf, len, &l, err, errlen);
        if (rc != 0)
            assert_true(is_zero(&l, sizeof(l)));
        dec_leaf_dispose(&l);
        break;
    }
    case SERVICE: {
        struct dec_service s;
        memset(&s, 0xa5, sizeof(s));
        rc = decode_agent_service(buf, len, &s, err, errlen);
        if (rc != 0)
            assert_true(is_zero(&s, sizeof(s)));
        dec_service_dispose(&s);
        break;
    }
    case SIDECAR: {
        char *id = (char *)"poison";
        rc = decode_sidecar_for(buf, len, "web", &id, err, errlen);
        if (rc != 0)
            assert_null(id);
        free(id);
        break;
    }
    case INTENTIONS: {
        struct dec_intention *v = (struct dec_intention *)1;
        size_t n = 99;
        rc = decode_intentions_match(buf, len, "db", &v, &n, err, errlen);
        if (rc != 0) {
            assert_null(v);
            assert_int_equal(n, 0);
        }
        dec_intentions_free(v, n);
        break;
    }
    case HEALTH: {
        struct dec_endpoint *v = (struct dec_endpoint *)1;
        size_t n = 99;
        rc = decode_health_connect(buf, len, &v, &n, err, errlen);
        if (rc != 0) {
            assert_null(v);
            assert_int_equal(n, 0);
        }
        dec_endpoints_free(v, n);
        break;
    }
    case CHAIN: {
        struct dec_chain c;
        memset(&c, 0xa5, sizeof(c));
        rc = decode_discovery_chain(buf, len, &c, err, errlen);
        if (rc != 0)
            assert_true(is_zero(&c, sizeof(c)));
        dec_chain_dispose(&c);
        break;
    }
    case QUERY: {
        struct dec_query q;
        memset(&q, 0xa5, sizeof(q));
        rc = decode_prepared_query(buf, len, &q, err, errlen);
        if (rc != 0)
            assert_true(is_zero(&q, sizeof(q)));
        dec_query_dispose(&q);
        break;
    }
    }
    return rc;
}

/*
 * Every proper prefix of a good body (up to its closing bracket) is incomplete JSON and must
 * fail cleanly. Each prefix is copied into an allocation of exactly its size so ASan catches a
 * decoder that reads past <len>.
 */
static void check_truncations(enum which w, const char *body)
{
    size_t len = strlen(body), n = len;
    char err[256];
    while (n > 0 && (body[n - 1] == '\n' || body[n - 1] == ' '))
        n--;
    for (size_t i = 0; i < n; i++) {
        char *copy = malloc(i != 0 ? i : 1);
        assert_non_null(copy);
        memcpy(copy, body, i);
        err[0] = '\0';
        int rc = run(w, copy, i, err, sizeof(err));
        free(copy);
        if (rc != ERR_BAD_JSON)
            fail_msg("%s: prefix of %zu/%zu bytes gave %d, want ERR_BAD_JSON", which_names[w], i, n,
                     rc);
        assert_true(err[0] != '\0');
    }
    /* The body without its trailing newline, and whole, both decode. */
    char *copy = malloc(n);
    assert_non_null(copy);
    memcpy(copy, body, n);
    assert_int_equal(run(w, copy, n, err, sizeof(err)), 0);
    free(copy);
    assert_int_equal(run(w, body, len, err, sizeof(err)), 0);
}

static const struct dec_kv *find_kv(const struct dec_kv *v, size_t n, const char *key)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i].key, key) == 0)
            return &v[i];
    fail_msg("config key \"%s\" not found", key);
    return NULL;
}

/* ---- roots ---- */

static void test_roots_good(void **state)
{
    (void)state;
    struct dec_roots r;
    char err[256];
    assert_int_equal(decode_roots(ROOTS_JSON, strlen(ROOTS_JSON), &r, err, sizeof(err)), 0);
    assert_string_equal(r.trust_domain, TD);
    assert_string_equal(r.active_root_id,
                        "c4:1a:9e:0b:7d:22:5f:93:4e:18:a1:6c:3b:d0:77:e2:95:08:fb:41");
    assert_int_equal(r.n_roots, 2);
    assert_string_equal(r.roots[0].id, r.active_root_id);
    assert_string_equal(r.roots[0].name, "Consul CA Primary Cert");
    assert_int_equal(r.roots[0].active, 1);
    assert_int_equal(r.roots[1].active, 0);
    /* JSON escapes are decoded: the PEM has real newlines. */
    assert_true(strncmp(r.roots[1].root_cert_pem, "-----BEGIN CERTIFICATE-----\nMIIC", 32) == 0);
    assert_non_null(strstr(r.roots[1].root_cert_pem, "-----END CERTIFICATE-----\n"));
    dec_roots_dispose(&r);
    assert_null(r.roots);
    dec_roots_dispose(&r); /* twice is harmless */
}

static void test_roots_minimal(void **state)
{
    (void)state;
    static const char body[] = "{\"TrustDomain\": \"td.consul\", \"Roots\": [{\"RootCert\": "
                               "\"PEM\", \"IntermediateCerts\": null}]}";
    struct dec_roots r;
    char err[256];
    assert_int_equal(decode_roots(body, strlen(body), &r, err, sizeof(err)), 0);
    assert_string_equal(r.active_root_id, "");
    assert_string_equal(r.roots[0].id, "");
    assert_string_equal(r.roots[0].name, "");
    assert_int_equal(r.roots[0].active, 0);
    dec_roots_dispose(&r);
}

static void test_roots_truncated(void **state)
{
    (void)state;
    check_truncations(ROOTS, ROOTS_JSON);
}

/* ---- leaf ---- */

static void test_leaf_good(void **state)
{
    (void)state;
    struct dec_leaf l;
    char err[256];
    assert_int_equal(decode_leaf(LEAF_JSON, strlen(LEAF_JSON), &l, err, sizeof(err)), 0);
    assert_string_equal(l.serial, "3a:0f:91:c2:5e:17");
    assert_string_equal(l.service, "web");
    assert_string_equal(l.service_uri, "spiffe://" TD "/ns/default/dc/dc1/svc/web");
    assert_string_equal(l.valid_after, "2024-05-01T10:00:00Z");
    assert_string_equal(l.valid_before, "2024-05-04T10:00:00.123456789Z");
    assert_true(strncmp(l.key_pem, "-----BEGIN EC PRIVATE KEY-----\n", 31) == 0);
    /* The bundle keeps both certificates. */
    const char *second = strstr(l.cert_pem, "-----END CERTIFICATE-----\n-----BEGIN");
    assert_non_null(second);
    dec_leaf_dispose(&l);
    assert_null(l.key_pem);
}

static void test_leaf_truncated(void **state)
{
    (void)state;
    check_truncations(LEAF, LEAF_JSON);
}

/*
 * Issue 7: parsing the leaf put the private key into jansson's lexer buffers and the tree's
 * strings, which jansson freed unwiped. After the first decode, jansson frees through the
 * wiping free (and allocates with plain malloc, so anything it returns is free()-able).
 */
static void test_jansson_frees_wiping(void **state)
{
    (void)state;
    struct dec_leaf l;
    char err[256];
    assert_int_equal(decode_leaf(LEAF_JSON, strlen(LEAF_JSON), &l, err, sizeof(err)), 0);
    dec_leaf_dispose(&l);
    json_malloc_t m = NULL;
    json_free_t f = NULL;
    json_get_alloc_funcs(&m, &f);
    assert_ptr_equal(f, util_wipe_free_block);
    assert_ptr_equal(m, malloc);
}

/* ---- agent service ---- */

static void test_service_good(void **state)
{
    (void)state;
    struct dec_service s;
    char err[256];
    assert_int_equal(decode_agent_service(SERVICE_JSON, strlen(SERVICE_JSON), &s, err, sizeof(err)),
                     0);
    assert_string_equal(s.kind, "connect-proxy");
    assert_string_equal(s.id, "web-sidecar-proxy");
    assert_string_equal(s.service, "web-sidecar-proxy");
    assert_string_equal(s.address, "");
    assert_int_equal(s.port, 21000);
    assert_string_equal(s.socket_path, "");
    assert_string_equal(s.datacenter, "dc1");
    assert_string_equal(s.ns, "");
    assert_string_equal(s.partition, "");
    assert_string_equal(s.content_hash, "c1f5d3f0a8a7b9e2");
    assert_string_equal(s.destination_service_name, "web");
    assert_string_equal(s.destination_service_id, "web");
    assert_string_equal(s.local_service_address, "127.0.0.1");
    assert_int_equal(s.local_service_port, 8080);
    assert_string_equal(s.local_service_socket_path, "");
    assert_string_equal(s.mode, "");

    /* Nested objects flatten with dots; numbers keep their text. */
    assert_int_equal(s.n_config, 9);
    const struct dec_kv *kv = find_kv(s.config, s.n_config, "limits.max_connections");
    assert_int_equal(kv->type, DEC_KV_NUMBER);
    assert_string_equal(kv->str, "5");
    assert_true(kv->num == 5.0);
    kv = find_kv(s.config, s.n_config, "limits.rate.per_second");
    assert_int_equal(kv->type, DEC_KV_NUMBER);
    assert_string_equal(kv->str, "2.5");
    kv = find_kv(s.config, s.n_config, "handshake_timeout_ms");
    assert_string_equal(kv->str, "10000");
    kv = find_kv(s.config, s.n_config, "protocol");
    assert_int_equal(kv->type, DEC_KV_STRING);
    assert_string_equal(kv->str, "tcp");
    kv = find_kv(s.config, s.n_config, "envoy_extra_static_clusters_json");
    assert_int_equal(kv->type, DEC_KV_STRING);
    assert_string_equal(kv->str, "");
    kv = find_kv(s.config, s.n_config, "tracing");
    assert_int_equal(kv->type, DEC_KV_NULL);
    assert_string_equal(kv->str, "");
    kv = find_kv(s.config, s.n_config, "verbose");
    assert_int_equal(kv->type, DEC_KV_BOOL);
    assert_int_equal(kv->boolean, 1);
    kv = find_kv(s.config, s.n_config, "alpn");
    assert_int_equal(kv->type, DEC_KV_OTHER);
    assert_string_equal(kv->str, "");
    find_kv(s.config, s.n_config, "bind_address");

    assert_int_equal(s.n_upstreams, 2);
    const struct dec_upstream *u = &s.upstreams[0];
    assert_string_equal(u->destination_type, "service");
    assert_string_equal(u->destination_name, "db");
    assert_string_equal(u->destination_namespace, "");
    assert_string_equal(u->destination_partition, "");
    assert_string_equal(u->destination_peer, "");
    assert_string_equal(u->datacenter, "");
    assert_string_equal(u->local_bind_address, "");
    assert_int_equal(u->local_bind_port, 9191);
    assert_string_equal(u->local_bind_socket_path, "");
    assert_string_equal(u->local_bind_socket_mode, "");
    assert_int_equal(u->n_config, 2);
    kv = find_kv(u->config, u->n_config, "connect_timeout_ms");
    assert_int_equal(kv->type, DEC_KV_STRING);
    assert_string_equal(kv->str, "5000");
    kv = find_kv(u->config, u->n_config, "limits.max_connections");
    assert_string_equal(kv->str, "100");

    u = &s.upstreams[1];
    assert_string_equal(u->destination_type, "prepared_query");
    assert_string_equal(u->destination_name, "nearest-cache");
    assert_string_equal(u->datacenter, "dc2");
    assert_int_equal(u->local_bind_port, 0);
    assert_string_equal(u->local_bind_socket_path, "/run/web/cache.sock");
    assert_string_equal(u->local_bind_socket_mode, "0600");
    assert_int_equal(u->n_config, 0);
    dec_service_dispose(&s);
    assert_null(s.id);
}

static void test_service_without_proxy(void **state)
{
    (void)state;
    /* A typical service: no Kind, no Proxy block; every Proxy field reads as "". */
    static const char body[] = "{\n  \"ID\": \"web\",\n  \"Service\": \"web\",\n  \"Port\": 8080,\n"
                               "  \"Meta\": null,\n  \"Proxy\": null,\n  \"Connect\": {}\n}\n";
    struct dec_service s;
    char err[256];
    assert_int_equal(decode_agent_service(body, strlen(body), &s, err, sizeof(err)), 0);
    assert_string_equal(s.kind, "");
    assert_string_equal(s.destination_service_name, "");
    assert_string_equal(s.destination_service_id, "");
    assert_string_equal(s.local_service_address, "");
    assert_string_equal(s.mode, "");
    assert_string_equal(s.content_hash, "");
    assert_int_equal(s.local_service_port, 0);
    assert_int_equal(s.n_config, 0);
    assert_int_equal(s.n_upstreams, 0);
    dec_service_dispose(&s);
}

static void test_service_null_maps(void **state)
{
    (void)state;
    static const char body[] =
        "{\"Kind\": \"connect-proxy\", \"ID\": \"p\", \"Service\": \"p\", \"Port\": 21000,"
        " \"Proxy\": {\"DestinationServiceName\": \"web\", \"Config\": null, \"Upstreams\": null,"
        " \"Expose\": null, \"TransparentProxy\": null}}";
    struct dec_service s;
    char err[256];
    assert_int_equal(decode_agent_service(body, strlen(body), &s, err, sizeof(err)), 0);
    assert_string_equal(s.destination_service_name, "web");
    assert_int_equal(s.n_config, 0);
    assert_int_equal(s.n_upstreams, 0);
    dec_service_dispose(&s);

    /* Empty objects and arrays are the same as null. */
    static const char body2[] = "{\"ID\": \"p\", \"Service\": \"p\", \"Proxy\": {\"Config\": "
                                "{\"limits\": {}}, \"Upstreams\": []}}";
    assert_int_equal(decode_agent_service(body2, strlen(body2), &s, err, sizeof(err)), 0);
    assert_int_equal(s.n_config, 0);
    assert_int_equal(s.n_upstreams, 0);
    dec_service_dispose(&s);
}

/* Decodes {"ID":"p","Service":"p","Proxy":{"Config":{"k": <value>}}} and checks k. */
static void check_number_text(const char *value, const char *want_text, double want_num)
{
    char body[256], err[256];
    struct dec_service s;
    snprintf(body, sizeof(body),
             "{\"ID\":\"p\",\"Service\":\"p\",\"Proxy\":{\"Config\":{\"k\": %s}}}", value);
    assert_int_equal(decode_agent_service(body, strlen(body), &s, err, sizeof(err)), 0);
    assert_int_equal(s.n_config, 1);
    assert_string_equal(s.config[0].key, "k");
    assert_int_equal(s.config[0].type, DEC_KV_NUMBER);
    if (strcmp(s.config[0].str, want_text) != 0)
        fail_msg("%s: text \"%s\", want \"%s\"", value, s.config[0].str, want_text);
    assert_true(s.config[0].num == want_num);
    dec_service_dispose(&s);
}

static void test_config_number_text(void **state)
{
    (void)state;
    check_number_text("5", "5", 5);
    check_number_text("-3", "-3", -3);
    check_number_text("0", "0", 0);
    /* Integers keep every digit, even past a double's precision. */
    check_number_text("9007199254740993", "9007199254740993", 9007199254740993.0);
    /* Reals: the shortest text that reads back, integral ones without exponent or fraction
     * (as Go prints the float64s that central config passes through). */
    check_number_text("2.5", "2.5", 2.5);
    check_number_text("0.1", "0.1", 0.1);
    check_number_text("5.0", "5", 5);
    check_number_text("1e3", "1000", 1000);
    check_number_text("-0.25", "-0.25", -0.25);
    check_number_text("1.5e300", "1.5e+300", 1.5e300);
    /* Regression: integral reals beyond long long were cast before the range check (UB). */
    check_number_text("1e300", "1e+300", 1e300);
    check_number_text("-1e19", "-1e+19", -1e19);
    check_number_text("1e-7", "1e-07", 1e-7);
}

static void test_config_caps(void **state)
{
    (void)state;
    char err[256];
    struct dec_service s;
    size_t cap = 4096;
    char *body = malloc(cap);
    assert_non_null(body);

    /* A key of 1024 bytes is fine; 1025 is refused, naming the map. */
    for (int klen = 1024; klen <= 1025; klen++) {
        int n = snprintf(body, cap, "{\"ID\":\"p\",\"Service\":\"p\",\"Proxy\":{\"Config\":{\"");
        memset(body + n, 'k', (size_t)klen);
        snprintf(body + n + klen, cap - (size_t)(n + klen), "\": 1}}}");
        int rc = decode_agent_service(body, strlen(body), &s, err, sizeof(err));
        if (klen == 1024) {
            assert_int_equal(rc, 0);
            assert_int_equal(strlen(s.config[0].key), 1024);
            dec_service_dispose(&s);
        } else {
            assert_int_equal(rc, ERR_BAD_FIELD);
            assert_non_null(strstr(err, "Proxy.Config"));
        }
    }

    /* Dotted paths count too: a.b.c... past the limit. */
    int n = snprintf(body, cap, "{\"ID\":\"p\",\"Service\":\"p\",\"Proxy\":{\"Config\":");
    for (int i = 0; i < 3; i++)
        n += snprintf(body + n, cap - (size_t)n, "{\"%0400d\":", i);
    n += snprintf(body + n, cap - (size_t)n, "1}}}}}");
    assert_int_equal(decode_agent_service(body, strlen(body), &s, err, sizeof(err)), ERR_BAD_FIELD);

    /* 32 levels of nesting are fine, 33 are not. */
    for (int depth = 32; depth <= 33; depth++) {
        n = snprintf(body, cap, "{\"ID\":\"p\",\"Service\":\"p\",\"Proxy\":{\"Config\":");
        for (int i = 0; i < depth; i++)
            n += snprintf(body + n, cap - (size_t)n, "{\"a\":");
        n += snprintf(body + n, cap - (size_t)n, "1");
        for (int i = 0; i < depth + 2; i++)
            n += snprintf(body + n, cap - (size_t)n, "}");
        int rc = decode_agent_service(body, strlen(body), &s, err, sizeof(err));
        if (depth == 32) {
            assert_int_equal(rc, 0);
            assert_int_equal(s.n_config, 1);
            assert_int_equal(strlen(s.config[0].key), 31 * 2 + 1);
            dec_service_dispose(&s);
        } else {
            assert_int_equal(rc, ERR_BAD_FIELD);
            assert_non_null(strstr(err, "deeper"));
        }
    }
    free(body);
}

static void test_service_truncated(void **state)
{
    (void)state;
    check_truncations(SERVICE, SERVICE_JSON);
}

/* ---- -sidecar-for ---- */

static int sidecar(const char *body, const char *target, char **id, char *err, size_t errlen)
{
    return decode_sidecar_for(body, strlen(body), target, id, err, errlen);
}

static void test_sidecar_found(void **state)
{
    (void)state;
    char *id;
    char err[256];
    assert_int_equal(sidecar(SERVICES_JSON, "web", &id, err, sizeof(err)), 0);
    assert_string_equal(id, "web-sidecar-proxy");
    free(id);
    assert_int_equal(sidecar(SERVICES_JSON, "db", &id, err, sizeof(err)), 0);
    assert_string_equal(id, "db-sidecar-proxy");
    free(id);
}

static void test_sidecar_none(void **state)
{
    (void)state;
    char *id;
    char err[256];
    assert_int_equal(sidecar(SERVICES_JSON, "api", &id, err, sizeof(err)), -ENOENT);
    assert_null(id);
    assert_non_null(strstr(err, "\"api\""));
    assert_int_equal(sidecar("{}", "web", &id, err, sizeof(err)), -ENOENT);
    /* A proxy for web that is not a connect-proxy, or has no Proxy block, does not count. */
    static const char body[] =
        "{\"gw\": {\"Kind\": \"mesh-gateway\", \"ID\": \"gw\", \"Proxy\": "
        "{\"DestinationServiceID\": \"web\"}}, \"x\": {\"Kind\": \"connect-proxy\", \"ID\": \"x\", "
        "\"Proxy\": null}, \"y\": {\"ID\": \"y\", \"Proxy\": {\"DestinationServiceID\": \"web\"}}}";
    assert_int_equal(sidecar(body, "web", &id, err, sizeof(err)), -ENOENT);
}

static void test_sidecar_several(void **state)
{
    (void)state;
    static const char body[] =
        "{\"web-sidecar-proxy\": {\"Kind\": \"connect-proxy\", \"ID\": \"web-sidecar-proxy\","
        " \"Proxy\": {\"DestinationServiceID\": \"web\"}},"
        " \"web-proxy-2\": {\"Kind\": \"connect-proxy\", \"ID\": \"web-proxy-2\","
        " \"Proxy\": {\"DestinationServiceID\": \"web\"}}}";
    char *id;
    char err[256];
    assert_int_equal(sidecar(body, "web", &id, err, sizeof(err)), -EEXIST);
    assert_null(id);
    assert_non_null(strstr(err, "\"web-sidecar-proxy\""));
    assert_non_null(strstr(err, "\"web-proxy-2\""));

    /* A short buffer still gets a terminated, truncated message. */
    char small[24];
    assert_int_equal(sidecar(body, "web", &id, small, sizeof(small)), -EEXIST);
    assert_int_equal(strlen(small), sizeof(small) - 1);
    assert_int_equal(sidecar(body, "web", &id, NULL, 0), -EEXIST);
}

static void test_sidecar_case(void **state)
{
    (void)state;
    /* Consul lowercases the registered DestinationServiceID only, so "Web" registered is found
     * by "web", while asking for "Web" never matches. */
    static const char body[] = "{\"Web-sidecar-proxy\": {\"Kind\": \"connect-proxy\", "
                               "\"ID\": \"Web-sidecar-proxy\", \"Proxy\": "
                               "{\"DestinationServiceID\": \"Web\"}}}";
    char *id;
    char err[256];
    assert_int_equal(sidecar(body, "web", &id, err, sizeof(err)), 0);
    assert_string_equal(id, "Web-sidecar-proxy");
    free(id);
    assert_int_equal(sidecar(body, "Web", &id, err, sizeof(err)), -ENOENT);
    assert_int_equal(sidecar(body, "we", &id, err, sizeof(err)), -ENOENT);
    assert_int_equal(sidecar(body, "webx", &id, err, sizeof(err)), -ENOENT);
}

static void test_sidecar_id_from_key(void **state)
{
    (void)state;
    /* Without an ID field, the map key is the service ID. */
    static const char body[] = "{\"p1\": {\"Kind\": \"connect-proxy\", \"Proxy\": "
                               "{\"DestinationServiceID\": \"web\"}}}";
    char *id;
    char err[256];
    assert_int_equal(sidecar(body, "web", &id, err, sizeof(err)), 0);
    assert_string_equal(id, "p1");
    free(id);
    assert_int_equal(sidecar(body, NULL, &id, err, sizeof(err)), -EINVAL);
    assert_null(id);
}

static void test_sidecar_truncated(void **state)
{
    (void)state;
    check_truncations(SIDECAR, SERVICES_JSON);
}

/* ---- intentions ---- */

static void test_intentions_good(void **state)
{
    (void)state;
    struct dec_intention *v;
    size_t n;
    char err[256];
    assert_int_equal(decode_intentions_match(INTENTIONS_JSON, strlen(INTENTIONS_JSON), "db", &v, &n,
                                             err, sizeof(err)),
                     0);
    assert_int_equal(n, 5);
    /* The agent's order is kept. */
    assert_string_equal(v[0].source_name, "web");
    assert_string_equal(v[0].source_ns, "default");
    assert_string_equal(v[0].source_partition, "");
    assert_string_equal(v[0].destination_ns, "default");
    assert_string_equal(v[0].destination_name, "db");
    assert_string_equal(v[0].action, "allow");
    assert_string_equal(v[0].id, "");
    assert_int_equal(v[0].has_permissions, 0);
    assert_int_equal(v[0].precedence, 9);

    assert_string_equal(v[1].id, "b1a6e3a2-54f1-6d2c-0c1f-0f0d4f3e9b11");
    assert_string_equal(v[1].description, "admin UI over HTTP only");
    assert_string_equal(v[1].action, "");
    assert_int_equal(v[1].has_permissions, 1);
    /* Absent peer and sameness fields read as "". */
    assert_string_equal(v[1].source_peer, "");
    assert_string_equal(v[1].source_sameness_group, "");

    assert_string_equal(v[2].source_peer, "dc2-peer");
    assert_string_equal(v[3].source_name, "*");
    assert_string_equal(v[3].action, "deny");
    assert_int_equal(v[3].precedence, 8);
    assert_string_equal(v[4].destination_name, "*");
    assert_int_equal(v[4].precedence, 5);
    dec_intentions_free(v, n);
}

static void test_intentions_empty(void **state)
{
    (void)state;
    static const char *const bodies[] = {"{}", "{\"db\": null}", "{\"db\": []}",
                                         "{\"other\": [{\"Bad\": 1}]}"};
    for (size_t i = 0; i < ARRAY_SIZE(bodies); i++) {
        struct dec_intention *v;
        size_t n = 7;
        char err[256];
        assert_int_equal(
            decode_intentions_match(bodies[i], strlen(bodies[i]), "db", &v, &n, err, sizeof(err)),
            0);
        assert_int_equal(n, 0);
        dec_intentions_free(v, n);
    }
    /* Permissions [] is no permissions. */
    static const char body[] =
        "{\"db\": [{\"SourceName\": \"web\", \"DestinationName\": \"db\", \"Action\": \"allow\","
        " \"Permissions\": [], \"Precedence\": 9}]}";
    struct dec_intention *v;
    size_t n;
    char err[256];
    assert_int_equal(decode_intentions_match(body, strlen(body), "db", &v, &n, err, sizeof(err)),
                     0);
    assert_int_equal(v[0].has_permissions, 0);
    assert_string_equal(v[0].source_ns, "");
    dec_intentions_free(v, n);
}

static void test_intentions_truncated(void **state)
{
    (void)state;
    check_truncations(INTENTIONS, INTENTIONS_JSON);
}

/* What a Consul 1.22 dev agent answered on /v1/connect/intentions/match for a
 * service-intentions entry with Permissions (written through PUT /v1/config): "Action" is left
 * out when Permissions are set, and every kind of condition comes back as written. */
static const char L7_INTENTIONS_JSON[] =
    "{\n"
    "    \"db\": [\n"
    "        {\n"
    "            \"SourceNS\": \"default\",\n"
    "            \"SourceName\": \"web\",\n"
    "            \"DestinationNS\": \"default\",\n"
    "            \"DestinationName\": \"db\",\n"
    "            \"SourceType\": \"consul\",\n"
    "            \"Permissions\": [\n"
    "                {\n"
    "                    \"Action\": \"allow\",\n"
    "                    \"HTTP\": {\n"
    "                        \"PathPrefix\": \"/api\",\n"
    "                        \"Header\": [\n"
    "                            {\"Name\": \"x-role\", \"Exact\": \"ops\", \"IgnoreCase\": "
    "true},\n"
    "                            {\"Name\": \"x-debug\", \"Present\": true, \"Invert\": true},\n"
    "                            {\"Name\": \"x-c\", \"Contains\": \"abc\"}\n"
    "                        ],\n"
    "                        \"Methods\": [\"GET\", \"PUT\"]\n"
    "                    }\n"
    "                },\n"
    "                {\"Action\": \"deny\", \"HTTP\": {\"PathRegex\": \"/adm.*\"}},\n"
    "                {\n"
    "                    \"Action\": \"allow\",\n"
    "                    \"HTTP\": {\n"
    "                        \"PathExact\": \"/x\",\n"
    "                        \"Header\": [\n"
    "                            {\"Name\": \"x-re\", \"Regex\": \"a+b\"},\n"
    "                            {\"Name\": \"x-s\", \"Suffix\": \"z\"},\n"
    "                            {\"Name\": \"x-p\", \"Prefix\": \"q\"}\n"
    "                        ]\n"
    "                    }\n"
    "                }\n"
    "            ],\n"
    "            \"Precedence\": 9,\n"
    "            \"CreateIndex\": 19,\n"
    "            \"ModifyIndex\": 19\n"
    "        },\n"
    "        {\n"
    "            \"SourceNS\": \"default\",\n"
    "            \"SourceName\": \"*\",\n"
    "            \"DestinationNS\": \"default\",\n"
    "            \"DestinationName\": \"db\",\n"
    "            \"SourceType\": \"consul\",\n"
    "            \"Action\": \"deny\",\n"
    "            \"Precedence\": 8,\n"
    "            \"CreateIndex\": 19,\n"
    "            \"ModifyIndex\": 19\n"
    "        }\n"
    "    ]\n"
    "}\n";

static void test_intentions_permissions(void **state)
{
    (void)state;
    struct dec_intention *v;
    size_t n;
    char err[256];
    assert_int_equal(decode_intentions_match(L7_INTENTIONS_JSON, strlen(L7_INTENTIONS_JSON), "db",
                                             &v, &n, err, sizeof(err)),
                     0);
    assert_int_equal(n, 2);
    assert_string_equal(v[0].action, "");
    assert_int_equal(v[0].has_permissions, 1);
    assert_int_equal(v[0].n_permissions, 3);
    assert_int_equal(v[0].has_jwt, 0);

    const struct dec_permission *p = &v[0].permissions[0];
    assert_int_equal(p->allow, 1);
    assert_int_equal(p->path_match, DEC_PATH_PREFIX);
    assert_string_equal(p->path, "/api");
    assert_int_equal(p->n_headers, 3);
    assert_string_equal(p->headers[0].name, "x-role");
    assert_int_equal(p->headers[0].match, DEC_HDR_EXACT);
    assert_string_equal(p->headers[0].value, "ops");
    assert_int_equal(p->headers[0].ignore_case, 1);
    assert_int_equal(p->headers[0].invert, 0);
    assert_int_equal(p->headers[1].match, DEC_HDR_PRESENT);
    assert_string_equal(p->headers[1].value, "");
    assert_int_equal(p->headers[1].invert, 1);
    assert_int_equal(p->headers[2].match, DEC_HDR_CONTAINS);
    assert_string_equal(p->headers[2].value, "abc");
    assert_int_equal(p->n_methods, 2);
    assert_string_equal(p->methods[0], "GET");
    assert_string_equal(p->methods[1], "PUT");
    assert_int_equal(p->has_jwt, 0);

    p = &v[0].permissions[1];
    assert_int_equal(p->allow, 0);
    assert_int_equal(p->path_match, DEC_PATH_REGEX);
    assert_string_equal(p->path, "/adm.*");
    assert_int_equal(p->n_headers, 0);
    assert_null(p->headers);
    assert_int_equal(p->n_methods, 0);

    p = &v[0].permissions[2];
    assert_int_equal(p->path_match, DEC_PATH_EXACT);
    assert_string_equal(p->path, "/x");
    assert_int_equal(p->headers[0].match, DEC_HDR_REGEX);
    assert_string_equal(p->headers[0].value, "a+b");
    assert_int_equal(p->headers[1].match, DEC_HDR_SUFFIX);
    assert_int_equal(p->headers[2].match, DEC_HDR_PREFIX);
    assert_string_equal(p->headers[2].value, "q");

    assert_int_equal(v[1].n_permissions, 0);
    assert_null(v[1].permissions);
    assert_string_equal(v[1].action, "deny");
    dec_intentions_free(v, n);
    check_truncations(INTENTIONS, L7_INTENTIONS_JSON);
}

/* An absent or empty HTTP block matches everything (Consul's generator), and JWT blocks are
 * noted so the evaluator can fail closed on them. */
static void test_intentions_permissions_any_and_jwt(void **state)
{
    (void)state;
    static const char body[] =
        "{\"db\": [{\"SourceName\": \"web\", \"DestinationName\": \"db\", \"Precedence\": 9,"
        " \"JWT\": {\"Providers\": [{\"Name\": \"okta\"}]},"
        " \"Permissions\": [{\"Action\": \"deny\"}, {\"Action\": \"allow\", \"HTTP\": {},"
        " \"JWT\": {\"Providers\": [{\"Name\": \"okta\"}]}},"
        " {\"Action\": \"allow\", \"HTTP\": {\"PathExact\": \"\", \"PathPrefix\": \"/p\","
        " \"Header\": null, \"Methods\": null}}]}]}";
    struct dec_intention *v;
    size_t n;
    char err[256];
    assert_int_equal(decode_intentions_match(body, strlen(body), "db", &v, &n, err, sizeof(err)),
                     0);
    assert_int_equal(v[0].has_jwt, 1);
    assert_int_equal(v[0].n_permissions, 3);
    assert_int_equal(v[0].permissions[0].path_match, DEC_PATH_ANY);
    assert_string_equal(v[0].permissions[0].path, "");
    assert_int_equal(v[0].permissions[0].has_jwt, 0);
    assert_int_equal(v[0].permissions[1].path_match, DEC_PATH_ANY);
    assert_int_equal(v[0].permissions[1].has_jwt, 1);
    /* An empty string is an unset kind (Go's omitempty), so one path kind is set here. */
    assert_int_equal(v[0].permissions[2].path_match, DEC_PATH_PREFIX);
    assert_string_equal(v[0].permissions[2].path, "/p");
    dec_intentions_free(v, n);
}

/* Wraps one permission (or the whole Permissions value) in an otherwise good answer. */
static char *with_permissions(const char *perms)
{
    return xasprintf("{\"db\": [{\"SourceName\": \"web\", \"DestinationName\": \"db\","
                     " \"Precedence\": 9, \"Permissions\": %s}]}",
                     perms);
}

static char *repeat_join(const char *item, size_t n)
{
    size_t len = strlen(item);
    char *out = xmalloc(n * (len + 1) + 1);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            out[o++] = ',';
        memcpy(out + o, item, len);
        o += len;
    }
    out[o] = '\0';
    return out;
}

static void test_intentions_permissions_malformed(void **state)
{
    (void)state;
    static const struct {
        const char *perms;
        const char *want; /* in the message */
    } bad[] = {
        {"{}", "Permissions must be an array"},
        {"[1]", "Permissions[0] must be an object"},
        {"[{\"HTTP\": {}}]", "Permissions[0].Action is missing"},
        {"[{\"Action\": \"ALLOW\"}]", "Permissions[0].Action must be \"allow\" or \"deny\""},
        {"[{\"Action\": \"\"}]", "Permissions[0].Action"},
        {"[{\"Action\": 1}]", "Permissions[0].Action must be a string"},
        {"[{\"Action\": \"allow\", \"HTTP\": []}]", "Permissions[0].HTTP must be an object"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"PathExact\": \"/a\", \"PathPrefix\": \"/b\"}}]",
         "at most one of PathExact, PathPrefix or PathRegex"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"PathRegex\": 5}}]",
         "HTTP.PathRegex must be a string"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": {}}}]", "HTTP.Header must be an array"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [\"x\"]}}]",
         "Header[0] must be an object"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Exact\": \"a\"}]}}]",
         "Header[0].Name is missing"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": \"x\"}]}}]",
         "exactly one of Present, Exact"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": \"x\", \"Invert\": true}]}}]",
         "exactly one of Present, Exact"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": \"x\", \"Exact\": \"a\","
         " \"Regex\": \"b\"}]}}]",
         "exactly one of"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": \"x\", \"Present\": true,"
         " \"Suffix\": \"b\"}]}}]",
         "exactly one of"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": \"x\", \"Present\": "
         "\"yes\"}]}}]",
         "Header[0].Present must be true or false"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": \"x\", \"Present\": true,"
         " \"Invert\": 1}]}}]",
         "Header[0].Invert must be true or false"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": \"x\", \"Exact\": \"a\","
         " \"IgnoreCase\": \"y\"}]}}]",
         "IgnoreCase must be true or false"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": 3, \"Exact\": \"a\"}]}}]",
         "Header[0].Name must be a string"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Methods\": \"GET\"}}]",
         "HTTP.Methods must be an array"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Methods\": [\"GET\", 1]}}]", "Methods must hold"},
        {"[{\"Action\": \"allow\", \"HTTP\": {\"Methods\": [\"\"]}}]", "Methods must hold"},
        {"[{\"Action\": \"allow\"}, {\"Action\": \"deny\", \"HTTP\": {\"PathExact\": 1}}]",
         "Permissions[1].HTTP.PathExact"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        char *body = with_permissions(bad[i].perms);
        char err[256] = "";
        int rc = run(INTENTIONS, body, strlen(body), err, sizeof(err));
        if (rc != ERR_BAD_FIELD)
            fail_msg("%s: rc %d (%s), want ERR_BAD_FIELD", bad[i].perms, rc, err);
        if (strstr(err, bad[i].want) == NULL)
            fail_msg("%s: message \"%s\" does not say \"%s\"", bad[i].perms, err, bad[i].want);
        assert_non_null(strstr(err, "db[0]"));
        free(body);
    }
}

static void test_intentions_permissions_bounds(void **state)
{
    (void)state;
    char err[256];
    /* Exactly at each bound decodes; one more is refused. */
    static const struct {
        const char *item;
        const char *key; /* the HTTP key that holds the list; NULL: Permissions itself */
        size_t max;
        const char *want;
    } lists[] = {
        {"{\"Action\": \"deny\"}", NULL, DEC_PERMISSIONS_MAX, "Permissions has too many"},
        {"{\"Name\": \"x\", \"Present\": true}", "Header", DEC_PERM_HEADERS_MAX,
         "Header has too many"},
        {"\"GET\"", "Methods", DEC_PERM_METHODS_MAX, "Methods has too many"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(lists); i++) {
        for (size_t extra = 0; extra <= 1; extra++) {
            char *items = repeat_join(lists[i].item, lists[i].max + extra);
            char *list = xasprintf("[%s]", items);
            char *one = xasprintf("{\"Action\": \"deny\", \"HTTP\": {\"%s\": %s}}",
                                  lists[i].key != NULL ? lists[i].key : "", list);
            char *perms = lists[i].key == NULL ? xstrdup(list) : xasprintf("[%s]", one);
            char *body = with_permissions(perms);
            int rc = run(INTENTIONS, body, strlen(body), err, sizeof(err));
            if (extra == 0 && rc != 0)
                fail_msg("%zu at the bound refused: %s", i, err);
            if (extra == 1 && (rc != ERR_BAD_FIELD || strstr(err, lists[i].want) == NULL))
                fail_msg("%zu past the bound: rc %d, %s", i, rc, err);
            free(items);
            free(list);
            free(one);
            free(perms);
            free(body);
        }
    }
    /* Strings: DEC_PERM_STR_MAX bytes decode, one more does not. */
    for (size_t extra = 0; extra <= 1; extra++) {
        char *path = xmalloc(DEC_PERM_STR_MAX + 2);
        memset(path, 'a', DEC_PERM_STR_MAX + extra);
        path[0] = '/';
        path[DEC_PERM_STR_MAX + extra] = '\0';
        char *perms = xasprintf("[{\"Action\": \"allow\", \"HTTP\": {\"Header\": [{\"Name\": "
                                "\"x\", \"Contains\": \"%s\"}]}}]",
                                path);
        char *body = with_permissions(perms);
        int rc = run(INTENTIONS, body, strlen(body), err, sizeof(err));
        assert_int_equal(rc, extra == 0 ? 0 : ERR_BAD_FIELD);
        if (extra == 1)
            assert_non_null(strstr(err, "Contains is too long"));
        free(path);
        free(perms);
        free(body);
    }
}

/* ---- health ---- */

static void test_health_good(void **state)
{
    (void)state;
    struct dec_endpoint *v;
    size_t n;
    char err[256];
    assert_int_equal(
        decode_health_connect(HEALTH_JSON, strlen(HEALTH_JSON), &v, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 2);

    /* A sidecar: no Service.Address, so Node.Address; it presents its destination's identity. */
    assert_string_equal(v[0].node, "node-a");
    assert_string_equal(v[0].node_datacenter, "dc1");
    assert_string_equal(v[0].address, "10.0.0.5");
    assert_int_equal(v[0].port, 21001);
    assert_string_equal(v[0].socket_path, "");
    assert_string_equal(v[0].service_id, "db-sidecar-proxy");
    assert_string_equal(v[0].identity_service, "db");
    assert_string_equal(v[0].ns, "");
    assert_string_equal(v[0].partition, "");
    assert_int_equal(v[0].passing, 1);
    assert_int_equal(v[0].critical, 0);

    /* Connect native: its own address and name; a critical service check. */
    assert_string_equal(v[1].node, "node-b");
    assert_string_equal(v[1].address, "10.0.1.9");
    assert_int_equal(v[1].port, 5433);
    assert_string_equal(v[1].service_id, "db-native-2");
    assert_string_equal(v[1].identity_service, "db");
    assert_int_equal(v[1].passing, 0);
    assert_int_equal(v[1].critical, 1);
    dec_endpoints_free(v, n);
}

static void test_health_checks(void **state)
{
    (void)state;
    struct {
        const char *checks;
        int passing, critical;
    } cases[] = {
        {"null", 1, 0},
        {"[]", 1, 0},
        {"[{\"Status\": \"passing\"}, {\"Status\": \"warning\"}]", 0, 0},
        {"[{\"Status\": \"maintenance\"}]", 0, 0},
        {"[{\"Status\": \"warning\"}, {\"Status\": \"critical\"}]", 0, 1},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        char body[512], err[256];
        struct dec_endpoint *v;
        size_t n;
        snprintf(body, sizeof(body),
                 "[{\"Node\": {\"Node\": \"n\", \"Address\": \"10.0.0.1\"}, \"Service\": "
                 "{\"Service\": \"db\", \"Port\": 1}, \"Checks\": %s}]",
                 cases[i].checks);
        assert_int_equal(decode_health_connect(body, strlen(body), &v, &n, err, sizeof(err)), 0);
        assert_int_equal(v[0].passing, cases[i].passing);
        assert_int_equal(v[0].critical, cases[i].critical);
        dec_endpoints_free(v, n);
    }
}

static void test_health_empty_and_socket(void **state)
{
    (void)state;
    struct dec_endpoint *v;
    size_t n;
    char err[256];
    assert_int_equal(decode_health_connect("[]", 2, &v, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 0);
    dec_endpoints_free(v, n);
    assert_int_equal(decode_health_connect("null", 4, &v, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 0);
    dec_endpoints_free(v, n);

    /* A unix-socket endpoint needs no address. */
    static const char body[] = "[{\"Node\": {}, \"Service\": {\"Kind\": \"connect-proxy\", "
                               "\"Service\": \"db-proxy\", \"SocketPath\": \"/run/db.sock\", "
                               "\"Proxy\": {\"DestinationServiceName\": \"db\"}}}]";
    assert_int_equal(decode_health_connect(body, strlen(body), &v, &n, err, sizeof(err)), 0);
    assert_string_equal(v[0].address, "");
    assert_string_equal(v[0].socket_path, "/run/db.sock");
    assert_string_equal(v[0].identity_service, "db");
    dec_endpoints_free(v, n);
}

static void test_health_truncated(void **state)
{
    (void)state;
    check_truncations(HEALTH, HEALTH_JSON);
}

/* ---- discovery chain ---- */

static void test_chain_good(void **state)
{
    (void)state;
    struct dec_chain c;
    char err[256];
    assert_int_equal(decode_discovery_chain(CHAIN_JSON, strlen(CHAIN_JSON), &c, err, sizeof(err)),
                     0);
    assert_string_equal(c.service_name, "db");
    assert_string_equal(c.protocol, "tcp");
    assert_int_equal(c.connect_timeout_ms, 3000);
    assert_int_equal(c.n_targets, 2);
    /* The primary is the resolver's target: the default subset, with its filter. */
    assert_string_equal(c.targets[0].id, "v2.db.default.default.dc1");
    assert_string_equal(c.targets[0].service, "db");
    assert_string_equal(c.targets[0].service_subset, "v2");
    assert_string_equal(c.targets[0].ns, "default");
    assert_string_equal(c.targets[0].datacenter, "dc1");
    assert_string_equal(c.targets[0].filter, "Service.Meta.version == v2");
    assert_int_equal(c.targets[0].only_passing, 1);
    assert_int_equal(c.targets[0].connect_timeout_ms, 3000);
    assert_true(strncmp(c.targets[0].sni, "v2.db.default.dc1.internal.", 27) == 0);
    /* Then the failover, in order. */
    assert_string_equal(c.targets[1].id, "dbb.default.default.dc1");
    assert_string_equal(c.targets[1].service, "dbb");
    assert_string_equal(c.targets[1].filter, "");
    assert_int_equal(c.targets[1].only_passing, 0);
    assert_int_equal(c.targets[1].connect_timeout_ms, 5000);
    dec_chain_dispose(&c);
}

#define CH(resolver, targets)                                                                      \
    "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"resolver:db\", \"Nodes\": "            \
    "{\"resolver:db\": {\"Type\": \"resolver\", \"Resolver\": {" resolver "}}}, "                  \
    "\"Targets\": {" targets "}}}"
#define TGT(id, extra) "\"" id "\": {\"Service\": \"" id "\"" extra "}"

/* A chain that starts at a router: <routes>, then a catch-all to resolver:db; <more> nodes. */
#define RCH(routes, more)                                                                          \
    "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"router:db\", \"Nodes\": {"             \
    "\"router:db\": {\"Type\": \"router\", \"Routes\": [" routes                                   \
    "{\"NextNode\": \"resolver:db\"}]}, "                                                          \
    "\"resolver:db\": {\"Type\": \"resolver\", \"Resolver\": {\"Target\": \"db\"}}" more "}, "     \
    "\"Targets\": {" TGT("db", "") "}}}"
/* A route to resolver:db with this Match.HTTP and Destination. */
#define RT(match, dest)                                                                            \
    "{\"Definition\": {\"Match\": {\"HTTP\": {" match "}}, \"Destination\": {" dest "}}, "         \
    "\"NextNode\": \"resolver:db\"},"
/* A route to the splitter "splitter:s" with these splits. */
#define SPL(splits)                                                                                \
    RCH("{\"NextNode\": \"splitter:s\"},",                                                         \
        ", \"splitter:s\": {\"Type\": \"splitter\", \"Splits\": [" splits "]}")
/* A chain whose resolver node carries this LoadBalancer. */
#define LBC(lb)                                                                                    \
    "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"resolver:db\", \"Nodes\": "            \
    "{\"resolver:db\": {\"Type\": \"resolver\", \"Resolver\": {\"Target\": \"db\"}, "              \
    "\"LoadBalancer\": " lb "}}, \"Targets\": {" TGT("db", "") "}}}"

static void test_chain_shapes(void **state)
{
    (void)state;
    struct dec_chain c;
    char err[256];
    /* Minimal: no timeout (5 s default), failover targets deduplicated, ID taken from the key;
     * integer nanoseconds are accepted for a ConnectTimeout. */
    const char *body = CH("\"Target\": \"a\", \"Failover\": {\"Targets\": [\"b\", \"a\", \"b\"]}",
                          TGT("a", ", \"ConnectTimeout\": 250000000") "," TGT("b", ""));
    assert_int_equal(decode_discovery_chain(body, strlen(body), &c, err, sizeof(err)), 0);
    assert_int_equal(c.connect_timeout_ms, 5000);
    assert_int_equal(c.n_targets, 2);
    assert_string_equal(c.targets[0].id, "a");
    assert_int_equal(c.targets[0].connect_timeout_ms, 250);
    assert_string_equal(c.targets[1].id, "b");
    assert_string_equal(c.targets[1].sni, "");
    dec_chain_dispose(&c);
}

/*
 * Issue 9 point 5: an L7 upstream asks for its chain without OverrideProtocol tcp, so the chain
 * may start at a router or a splitter. Every resolver reachable gives its targets (the
 * router's catch-all first, then the other routes, a splitter's splits in order, each node
 * once) and the chain's Protocol is read; before, anything but a resolver was an error.
 */
static void test_chain_router_splitter(void **state)
{
    (void)state;
    struct dec_chain c;
    char err[256];
    const char *body =
        "{\"Chain\": {\"ServiceName\": \"web\", \"Protocol\": \"http\", "
        "\"StartNode\": \"router:web\", \"Nodes\": {"
        "\"router:web\": {\"Type\": \"router\", \"Routes\": ["
        "  {\"Definition\": {}, \"NextNode\": \"splitter:admin\"},"
        "  {\"Definition\": {}, \"NextNode\": \"resolver:web\"}]},"
        "\"splitter:admin\": {\"Type\": \"splitter\", \"Splits\": ["
        "  {\"Weight\": 50, \"NextNode\": \"resolver:a\"},"
        "  {\"Weight\": 50, \"NextNode\": \"resolver:web\"}]},"
        "\"resolver:web\": {\"Type\": \"resolver\", \"Resolver\": {\"Target\": \"web\", "
        "  \"ConnectTimeout\": \"2s\", \"Failover\": {\"Targets\": [\"b\"]}}},"
        "\"resolver:a\": {\"Type\": \"resolver\", \"Resolver\": {\"Target\": \"a\", "
        "  \"ConnectTimeout\": \"9s\"}}}, "
        "\"Targets\": {" TGT("web", "") "," TGT("a", "") "," TGT("b", "") "}}}";
    assert_int_equal(decode_discovery_chain(body, strlen(body), &c, err, sizeof(err)), 0);
    assert_string_equal(c.protocol, "http");
    assert_int_equal(c.connect_timeout_ms, 2000);
    assert_int_equal(c.n_targets, 3);
    assert_string_equal(c.targets[0].id, "web");
    assert_string_equal(c.targets[1].id, "b");
    assert_string_equal(c.targets[2].id, "a");
    dec_chain_dispose(&c);
}

/*
 * Issue 10: the routing of a real router chain is decoded in full: routes in order with
 * their matches and destinations, the compiler's catch-all last and leading to the splitter,
 * splits with compiled weights and header modifiers, resolvers with failover and LoadBalancer.
 */
static void test_chain_routes_real(void **state)
{
    (void)state;
    struct dec_chain c;
    char err[256];
    if (decode_discovery_chain(ROUTER_CHAIN_JSON, strlen(ROUTER_CHAIN_JSON), &c, err,
                               sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_int_equal(c.n_routes, 3);
    const struct dec_chain_route *r = &c.routes[0];
    assert_int_equal(r->path_match, DEC_PATH_PREFIX);
    assert_string_equal(r->path, "/api");
    assert_int_equal(r->case_insensitive, 1);
    assert_int_equal(r->n_headers, 2);
    assert_string_equal(r->headers[0].name, "x-a");
    assert_int_equal(r->headers[0].match, DEC_HDR_EXACT);
    assert_string_equal(r->headers[0].value, "b");
    assert_int_equal(r->headers[0].invert, 1);
    assert_int_equal(r->headers[1].match, DEC_HDR_PRESENT);
    assert_int_equal(r->n_query, 3);
    assert_int_equal(r->query[0].match, DEC_QUERY_EXACT);
    assert_string_equal(r->query[0].value, "1");
    assert_int_equal(r->query[1].match, DEC_QUERY_PRESENT);
    assert_int_equal(r->query[2].match, DEC_QUERY_REGEX);
    assert_string_equal(r->query[2].value, "a.*");
    assert_int_equal(r->n_methods, 2);
    assert_string_equal(r->methods[1], "PUT");
    assert_string_equal(r->prefix_rewrite, "/");
    assert_int_equal(r->request_timeout_ms, 2000);
    assert_int_equal(r->idle_timeout_ms, 1500);
    assert_int_equal(r->num_retries, 3);
    assert_int_equal(r->retry_on_connect_failure, 1);
    assert_int_equal(r->retry_on, (1u << DEC_RETRY_ON_IDX_5XX) | (1u << DEC_RETRY_ON_IDX_RESET));
    assert_int_equal(r->n_retry_status_codes, 2);
    assert_int_equal(r->request_headers.n_add, 1);
    assert_int_equal(r->request_headers.n_set, 1);
    assert_int_equal(r->request_headers.n_remove, 1);
    assert_int_equal(r->n_splits, 1);
    assert_string_equal(c.resolvers[r->splits[0].resolver].name,
                        "resolver:v2.db.default.default.dc1");
    assert_int_equal(c.routes[1].path_match, DEC_PATH_REGEX);
    assert_string_equal(c.resolvers[c.routes[1].splits[0].resolver].name,
                        "resolver:db2.default.default.dc1");
    /* the catch-all */
    const struct dec_chain_route *all = &c.routes[2];
    assert_int_equal(all->path_match, DEC_PATH_PREFIX);
    assert_string_equal(all->path, "/");
    assert_string_equal(all->next_node, "splitter:db.default.default");
    assert_int_equal(all->n_splits, 2);
    assert_true(all->splits[0].weight == 90.0 && all->splits[1].weight == 10.0);
    assert_string_equal(all->splits[0].request_headers.set[0].value, "v1");
    assert_string_equal(all->splits[1].response_headers.remove[0], "x-r");
    const struct dec_chain_resolver *v1 = &c.resolvers[all->splits[0].resolver];
    assert_string_equal(v1->name, "resolver:v1.db.default.default.dc1");
    assert_int_equal(v1->connect_timeout_ms, 3000);
    assert_int_equal(v1->request_timeout_ms, 7000);
    assert_int_equal(v1->n_targets, 2);
    assert_string_equal(c.targets[v1->targets[0]].id, "v1.db.default.default.dc1");
    assert_string_equal(c.targets[v1->targets[1]].id, "db2.default.default.dc1");
    assert_int_equal(v1->lb.policy, DEC_LB_RING_HASH);
    assert_int_equal(v1->lb.n_hash, 3);
    assert_int_equal(v1->lb.hash[1].cookie_ttl_ms, 10000);
    assert_int_equal(c.n_resolvers, 3);
    dec_chain_dispose(&c);
}

static void test_chain_routes_truncated(void **state)
{
    (void)state;
    check_truncations(CHAIN, ROUTER_CHAIN_JSON);
}

/* Counts and string sizes are bounded: one past a bound makes the chain malformed. */
static void test_chain_routes_bounds(void **state)
{
    (void)state;
    struct dec_chain c;
    char err[256];
    struct {
        size_t n;
        const char *el, *what;
    } lists[] = {
        {DEC_CHAIN_ROUTES_MAX, "{\"NextNode\": \"resolver:db\"}", "Routes has too many"},
        {DEC_ROUTE_QUERY_MAX, "{\"Name\": \"q\", \"Present\": true}", "QueryParam has too many"},
        {DEC_PERM_METHODS_MAX, "\"GET\"", "Methods has too many"},
        {DEC_RETRY_CODES_MAX, "503", "RetryOnStatusCodes has too many"},
        {DEC_CHAIN_SPLITS_MAX, "{\"Weight\": 1, \"NextNode\": \"resolver:db\"}",
         "Splits has too many"},
    };
    for (size_t k = 0; k < ARRAY_SIZE(lists); k++) {
        for (size_t n = lists[k].n; n <= lists[k].n + 1; n++) {
            size_t cap = (n + 1) * (strlen(lists[k].el) + 1) + 1024;
            char *items = xmalloc(cap), *body = xmalloc(cap + 1024);
            size_t o = 0;
            for (size_t i = 0; i < n; i++)
                o += (size_t)snprintf(items + o, cap - o, "%s%s", i ? "," : "", lists[k].el);
            items[o] = '\0';
            const char *head =
                "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"router:db\", "
                "\"Nodes\": {\"resolver:db\": {\"Type\": \"resolver\", "
                "\"Resolver\": {\"Target\": \"db\"}}, ";
            const char *tail = "}, \"Targets\": {\"db\": {\"Service\": \"db\"}}}}";
            if (k == 0)
                snprintf(body, cap + 1024,
                         "%s\"router:db\": {\"Type\": \"router\", \"Routes\": [%s]}%s", head, items,
                         tail);
            else if (k == 1 || k == 2)
                snprintf(body, cap + 1024,
                         "%s\"router:db\": {\"Type\": \"router\", \"Routes\": ["
                         "{\"Definition\": {\"Match\": {\"HTTP\": {\"%s\": [%s]}}}, "
                         "\"NextNode\": \"resolver:db\"}]}%s",
                         head, k == 1 ? "QueryParam" : "Methods", items, tail);
            else if (k == 3)
                snprintf(body, cap + 1024,
                         "%s\"router:db\": {\"Type\": \"router\", \"Routes\": ["
                         "{\"Definition\": {\"Destination\": {\"RetryOnStatusCodes\": [%s]}}, "
                         "\"NextNode\": \"resolver:db\"}]}%s",
                         head, items, tail);
            else
                snprintf(body, cap + 1024,
                         "%s\"router:db\": {\"Type\": \"router\", \"Routes\": ["
                         "{\"NextNode\": \"s\"}]}, \"s\": {\"Type\": \"splitter\", "
                         "\"Splits\": [%s]}%s",
                         head, items, tail);
            int rc = decode_discovery_chain(body, strlen(body), &c, err, sizeof(err));
            if (n == lists[k].n) {
                if (rc != 0)
                    fail_msg("%zu entries (%s): %s", n, lists[k].what, err);
                dec_chain_dispose(&c);
            } else {
                assert_int_equal(rc, ERR_BAD_FIELD);
                if (strstr(err, lists[k].what) == NULL)
                    fail_msg("%zu entries: \"%s\", want \"%s\"", n, err, lists[k].what);
            }
            free(items);
            free(body);
        }
    }
    /* A path of DEC_CHAIN_STR_MAX bytes is fine, one more is not. */
    for (size_t len = DEC_CHAIN_STR_MAX; len <= DEC_CHAIN_STR_MAX + 1; len++) {
        char *path = xmalloc(len + 1), *body = xmalloc(len + 1024);
        memset(path, 'a', len);
        path[0] = '/';
        path[len] = '\0';
        snprintf(body, len + 1024,
                 "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"r\", \"Nodes\": {"
                 "\"r\": {\"Type\": \"router\", \"Routes\": [{\"Definition\": "
                 "{\"Match\": {\"HTTP\": {\"PathPrefix\": \"%s\"}}}, \"NextNode\": \"d\"}]}, "
                 "\"d\": {\"Type\": \"resolver\", \"Resolver\": {\"Target\": \"db\"}}}, "
                 "\"Targets\": {\"db\": {\"Service\": \"db\"}}}}",
                 path);
        int rc = decode_discovery_chain(body, strlen(body), &c, err, sizeof(err));
        if (len == DEC_CHAIN_STR_MAX) {
            assert_int_equal(rc, 0);
            dec_chain_dispose(&c);
        } else {
            assert_int_equal(rc, ERR_BAD_FIELD);
            assert_non_null(strstr(err, "PathPrefix is too long"));
        }
        free(path);
        free(body);
    }
}

static void test_chain_truncated(void **state)
{
    (void)state;
    check_truncations(CHAIN, CHAIN_JSON);
}

static void test_durations(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        int rc;
        uint64_t ms;
    } cases[] = {
        {"5s", 0, 5000},     {"250ms", 0, 250},   {"1m30s", 0, 90000},
        {"1.5s", 0, 1500},   {"1h", 0, 3600000},  {"0", 0, 0},
        {"1500us", 0, 2},    {"1ns", 0, 1},       {"", -EINVAL, 0},
        {"5", -EINVAL, 0},   {"s", -EINVAL, 0},   {"5x", -EINVAL, 0},
        {"-1s", -EINVAL, 0}, {"5s ", -EINVAL, 0}, {"99999999999999999999h", -EINVAL, 0},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        uint64_t ms = 77;
        int rc = decode_duration_ms(cases[i].s, &ms);
        if (rc != cases[i].rc || ms != cases[i].ms)
            fail_msg("duration \"%s\": rc %d ms %llu, want rc %d ms %llu", cases[i].s, rc,
                     (unsigned long long)ms, cases[i].rc, (unsigned long long)cases[i].ms);
    }
}

/* ---- prepared query ---- */

static void test_query_good(void **state)
{
    (void)state;
    struct dec_query q;
    char err[256];
    assert_int_equal(decode_prepared_query(QUERY_JSON, strlen(QUERY_JSON), &q, err, sizeof(err)),
                     0);
    assert_string_equal(q.service, "db");
    assert_string_equal(q.datacenter, "dc1");
    assert_int_equal(q.n_nodes, 1);
    assert_string_equal(q.nodes[0].identity_service, "db");
    assert_string_equal(q.nodes[0].node_datacenter, "dc1");
    assert_string_equal(q.nodes[0].address, "127.0.0.1");
    assert_int_equal(q.nodes[0].port, 21999);
    assert_int_equal(q.nodes[0].passing, 1);
    dec_query_dispose(&q);
    assert_int_equal(decode_prepared_query("{\"Nodes\": null}", 15, &q, err, sizeof(err)), 0);
    assert_int_equal(q.n_nodes, 0);
    dec_query_dispose(&q);
}

static void test_query_truncated(void **state)
{
    (void)state;
    check_truncations(QUERY, QUERY_JSON);
}

/* ---- malformed input, table-driven ---- */

struct bad_case {
    enum which w;
    const char *body;
    int rc;
    const char *err_has; /* a substring the message must contain */
};

/* Shorthand: a minimal valid proxy registration with <proxy> spliced into Proxy. */
#define SVC(top, proxy) "{\"ID\": \"p\", \"Service\": \"p\"" top ", \"Proxy\": {" proxy "}}"
#define UPS(u)          SVC("", "\"Upstreams\": [" u "]")
#define ROOTS1(extra)   "{\"TrustDomain\": \"td\", \"Roots\": [{\"RootCert\": \"x\"" extra "}]}"
#define LEAF1(extra)    "{\"CertPEM\": \"c\", \"PrivateKeyPEM\": \"k\"" extra "}"
#define IX(fields)      "{\"db\": [{" fields "}]}"
#define IXOK            "\"SourceName\": \"web\", \"DestinationName\": \"db\", \"Precedence\": 9"
#define HEP(node, svc, checks)                                                                     \
    "[{\"Node\": {\"Address\": \"10.0.0.1\"" node "}, \"Service\": {\"Service\": \"db\"" svc       \
    "}" checks "}]"

static const struct bad_case bad_cases[] = {
    /* Not JSON at all, or not only JSON. */
    {ROOTS, "", ERR_BAD_JSON, "line"},
    {ROOTS, "   \n", ERR_BAD_JSON, "line"},
    {ROOTS, "{", ERR_BAD_JSON, "line 1"},
    {ROOTS, ROOTS1("") " x", ERR_BAD_JSON, "end of file expected"},
    {ROOTS, ROOTS1("") ROOTS1(""), ERR_BAD_JSON, ""},
    {ROOTS, "{\"TrustDomain\": \"a\", \"TrustDomain\": \"b\", \"Roots\": [{\"RootCert\": \"x\"}]}",
     ERR_BAD_JSON, "duplicate"},
    {ROOTS, "{\"TrustDomain\": \"t\\u0000d\", \"Roots\": [{\"RootCert\": \"x\"}]}", ERR_BAD_JSON,
     ""},
    {ROOTS, "{\"TrustDomain\": \"\xff\", \"Roots\": [{\"RootCert\": \"x\"}]}", ERR_BAD_JSON, ""},
    {ROOTS, "{'TrustDomain': 'td'}", ERR_BAD_JSON, ""},
    {LEAF, "{\"CertPEM\": \"c\",}", ERR_BAD_JSON, ""},
    {HEALTH, "[1, 2,]", ERR_BAD_JSON, ""},

    /* Roots. */
    {ROOTS, "[]", ERR_BAD_FIELD, "object"},
    {ROOTS, "null", ERR_BAD_FIELD, "object"},
    {ROOTS, "{\"Roots\": [{\"RootCert\": \"x\"}]}", ERR_BAD_FIELD, "TrustDomain is missing"},
    {ROOTS, "{\"TrustDomain\": \"\", \"Roots\": [{\"RootCert\": \"x\"}]}", ERR_BAD_FIELD,
     "TrustDomain must not be empty"},
    {ROOTS, "{\"TrustDomain\": 7, \"Roots\": [{\"RootCert\": \"x\"}]}", ERR_BAD_FIELD,
     "TrustDomain must be a string"},
    {ROOTS, "{\"TrustDomain\": \"td\"}", ERR_BAD_FIELD, "Roots is missing"},
    {ROOTS, "{\"TrustDomain\": \"td\", \"Roots\": null}", ERR_BAD_FIELD, "Roots is missing"},
    {ROOTS, "{\"TrustDomain\": \"td\", \"Roots\": []}", ERR_BAD_FIELD, "Roots must not be empty"},
    {ROOTS, "{\"TrustDomain\": \"td\", \"Roots\": {}}", ERR_BAD_FIELD, "Roots must be an array"},
    {ROOTS, "{\"TrustDomain\": \"td\", \"Roots\": [\"x\"]}", ERR_BAD_FIELD,
     "Roots[0] must be an object"},
    {ROOTS, "{\"TrustDomain\": \"td\", \"Roots\": [{\"RootCert\": \"x\"}, {\"ID\": \"b\"}]}",
     ERR_BAD_FIELD, "Roots[1].RootCert is missing"},
    {ROOTS, ROOTS1(", \"Active\": \"yes\""), ERR_BAD_FIELD,
     "Roots[0].Active must be true or false"},
    {ROOTS, ROOTS1(", \"Name\": []"), ERR_BAD_FIELD, "Roots[0].Name must be a string"},
    {ROOTS, "{\"ActiveRootID\": 1, \"TrustDomain\": \"td\", \"Roots\": [{\"RootCert\": \"x\"}]}",
     ERR_BAD_FIELD, "ActiveRootID must be a string"},

    /* Leaf. */
    {LEAF, "\"leaf\"", ERR_BAD_FIELD, "object"},
    {LEAF, "{\"PrivateKeyPEM\": \"k\"}", ERR_BAD_FIELD, "CertPEM is missing"},
    {LEAF, "{\"CertPEM\": \"c\", \"PrivateKeyPEM\": \"\"}", ERR_BAD_FIELD,
     "PrivateKeyPEM must not be empty"},
    {LEAF, "{\"CertPEM\": \"c\", \"PrivateKeyPEM\": null}", ERR_BAD_FIELD,
     "PrivateKeyPEM is missing"},
    {LEAF, LEAF1(", \"Service\": 5"), ERR_BAD_FIELD, "Service must be a string"},
    {LEAF, LEAF1(", \"ValidBefore\": {}"), ERR_BAD_FIELD, "ValidBefore must be a string"},

    /* Agent service. */
    {SERVICE, "[]", ERR_BAD_FIELD, "object"},
    {SERVICE, "{\"Service\": \"p\"}", ERR_BAD_FIELD, "ID is missing"},
    {SERVICE, "{\"ID\": \"p\"}", ERR_BAD_FIELD, "Service is missing"},
    {SERVICE, "{\"ID\": \"p\", \"Service\": \"p\", \"Kind\": 1}", ERR_BAD_FIELD,
     "Kind must be a string"},
    {SERVICE, SVC(", \"Port\": \"21000\"", ""), ERR_BAD_FIELD,
     "Port must be an integer in [0, 65535]"},
    {SERVICE, SVC(", \"Port\": 70000", ""), ERR_BAD_FIELD, "Port"},
    {SERVICE, SVC(", \"Port\": -1", ""), ERR_BAD_FIELD, "Port"},
    {SERVICE, SVC(", \"Port\": 21000.5", ""), ERR_BAD_FIELD, "Port"},
    {SERVICE, SVC(", \"Port\": true", ""), ERR_BAD_FIELD, "Port"},
    {SERVICE, "{\"ID\": \"p\", \"Service\": \"p\", \"Proxy\": \"x\"}", ERR_BAD_FIELD,
     "Proxy must be an object"},
    {SERVICE, SVC("", "\"LocalServicePort\": \"8080\""), ERR_BAD_FIELD,
     "Proxy.LocalServicePort must be an integer"},
    {SERVICE, SVC("", "\"DestinationServiceName\": 1"), ERR_BAD_FIELD,
     "Proxy.DestinationServiceName must be a string"},
    {SERVICE, SVC("", "\"Config\": []"), ERR_BAD_FIELD, "Proxy.Config must be an object"},
    {SERVICE, SVC("", "\"Config\": \"protocol=tcp\""), ERR_BAD_FIELD,
     "Proxy.Config must be an object"},
    {SERVICE, SVC("", "\"Upstreams\": {}"), ERR_BAD_FIELD, "Proxy.Upstreams must be an array"},
    {SERVICE, UPS("\"db\""), ERR_BAD_FIELD, "Proxy.Upstreams[0] must be an object"},
    {SERVICE, UPS("{\"DestinationName\": \"db\", \"LocalBindPort\": 1}, {\"LocalBindPort\": 2}"),
     ERR_BAD_FIELD, "Proxy.Upstreams[1].DestinationName is missing"},
    {SERVICE, UPS("{\"DestinationName\": \"\"}"), ERR_BAD_FIELD,
     "Proxy.Upstreams[0].DestinationName must not be empty"},
    {SERVICE, UPS("{\"DestinationName\": \"db\", \"LocalBindPort\": \"9191\"}"), ERR_BAD_FIELD,
     "Proxy.Upstreams[0].LocalBindPort must be an integer"},
    {SERVICE, UPS("{\"DestinationName\": \"db\", \"LocalBindPort\": 65536}"), ERR_BAD_FIELD,
     "Proxy.Upstreams[0].LocalBindPort"},
    {SERVICE, UPS("{\"DestinationName\": \"db\", \"Datacenter\": false}"), ERR_BAD_FIELD,
     "Proxy.Upstreams[0].Datacenter must be a string"},
    {SERVICE, UPS("{\"DestinationName\": \"db\", \"Config\": [1]}"), ERR_BAD_FIELD,
     "Proxy.Upstreams[0].Config must be an object"},
    /* A bad upstream after a good one with a config map: the good one's map is freed too. */
    {SERVICE,
     UPS("{\"DestinationName\": \"db\", \"Config\": {\"a\": {\"b\": 1}, \"c\": \"d\"}}, "
         "{\"DestinationName\": 3}"),
     ERR_BAD_FIELD, "Proxy.Upstreams[1].DestinationName must be a string"},

    /* -sidecar-for. */
    {SIDECAR, "[]", ERR_BAD_FIELD, "object"},
    {SIDECAR, "{\"a\": 1}", ERR_BAD_FIELD, "services[\"a\"] must be an object"},
    {SIDECAR, "{\"a\": {\"Kind\": 1}}", ERR_BAD_FIELD, "services[\"a\"].Kind must be a string"},
    {SIDECAR, "{\"a\": {\"Kind\": \"connect-proxy\", \"Proxy\": []}}", ERR_BAD_FIELD,
     "services[\"a\"].Proxy must be an object"},
    {SIDECAR, "{\"a\": {\"Kind\": \"connect-proxy\", \"Proxy\": {\"DestinationServiceID\": 5}}}",
     ERR_BAD_FIELD, "services[\"a\"].Proxy.DestinationServiceID must be a string"},

    /* Intentions. */
    {INTENTIONS, "[]", ERR_BAD_FIELD, "object"},
    {INTENTIONS, "{\"db\": {}}", ERR_BAD_FIELD, "db must be an array"},
    {INTENTIONS, "{\"db\": [1]}", ERR_BAD_FIELD, "db[0] must be an object"},
    {INTENTIONS, IX("\"DestinationName\": \"db\", \"Precedence\": 9"), ERR_BAD_FIELD,
     "db[0].SourceName is missing"},
    {INTENTIONS, IX("\"SourceName\": \"web\", \"Precedence\": 9"), ERR_BAD_FIELD,
     "db[0].DestinationName is missing"},
    {INTENTIONS, IX("\"SourceName\": \"web\", \"DestinationName\": \"db\""), ERR_BAD_FIELD,
     "db[0].Precedence is missing"},
    {INTENTIONS, IX("\"SourceName\": \"web\", \"DestinationName\": \"db\", \"Precedence\": \"9\""),
     ERR_BAD_FIELD, "db[0].Precedence must be an integer"},
    {INTENTIONS, IX(IXOK ", \"Precedence2\": 1, \"Permissions\": {}"), ERR_BAD_FIELD,
     "db[0].Permissions must be an array"},
    {INTENTIONS, IX(IXOK ", \"Action\": 1"), ERR_BAD_FIELD, "db[0].Action must be a string"},
    {INTENTIONS, IX(IXOK ", \"SourcePeer\": []"), ERR_BAD_FIELD,
     "db[0].SourcePeer must be a string"},
    {INTENTIONS, "{\"db\": [{" IXOK "}, {" IXOK ", \"SourceNS\": 0}]}", ERR_BAD_FIELD,
     "db[1].SourceNS must be a string"},

    /* Health. */
    {HEALTH, "{}", ERR_BAD_FIELD, "array"},
    {HEALTH, "[1]", ERR_BAD_FIELD, "[0] must be an object"},
    {HEALTH, "[{\"Service\": {\"Service\": \"db\"}}]", ERR_BAD_FIELD, "[0].Node is missing"},
    {HEALTH, "[{\"Node\": {\"Address\": \"10.0.0.1\"}}]", ERR_BAD_FIELD, "[0].Service is missing"},
    {HEALTH, "[{\"Node\": [], \"Service\": {}}]", ERR_BAD_FIELD, "[0].Node must be an object"},
    {HEALTH, HEP("", "", ", \"Checks\": {}"), ERR_BAD_FIELD, "[0].Checks must be an array"},
    {HEALTH, HEP("", "", ", \"Checks\": [\"passing\"]"), ERR_BAD_FIELD,
     "[0].Checks[0] must be an object"},
    {HEALTH, HEP("", "", ", \"Checks\": [{\"Status\": \"passing\"}, {\"CheckID\": \"x\"}]"),
     ERR_BAD_FIELD, "[0].Checks[1].Status is missing"},
    {HEALTH, HEP("", "", ", \"Checks\": [{\"Status\": 1}]"), ERR_BAD_FIELD,
     "[0].Checks[0].Status must be a string"},
    {HEALTH, HEP("", ", \"Port\": \"21000\"", ""), ERR_BAD_FIELD,
     "[0].Service.Port must be an integer"},
    {HEALTH, HEP(", \"Datacenter\": 1", "", ""), ERR_BAD_FIELD,
     "[0].Node.Datacenter must be a string"},
    {HEALTH, HEP("", ", \"Address\": 10", ""), ERR_BAD_FIELD,
     "[0].Service.Address must be a string"},
    {HEALTH, "[{\"Node\": {\"Address\": \"10.0.0.1\"}, \"Service\": {\"Port\": 1}}]", ERR_BAD_FIELD,
     "[0].Service.Service is missing"},
    {HEALTH, HEP("", ", \"Kind\": \"connect-proxy\"", ""), ERR_BAD_FIELD,
     "[0].Service.Proxy is missing for a connect-proxy"},
    {HEALTH,
     HEP("", ", \"Kind\": \"connect-proxy\", \"Proxy\": {\"DestinationServiceName\": \"\"}", ""),
     ERR_BAD_FIELD, "[0].Service.Proxy.DestinationServiceName must not be empty"},
    {HEALTH, "[{\"Node\": {\"Address\": \"\"}, \"Service\": {\"Service\": \"db\"}}]", ERR_BAD_FIELD,
     "[0] has no Service.Address, Node.Address or Service.SocketPath"},
    {HEALTH, "[" HEP("", "", "") "]", ERR_BAD_FIELD, "[0] must be an object"},

    /* Discovery chains. */
    {CHAIN, "[]", ERR_BAD_FIELD, "must be a JSON object"},
    {CHAIN, "{}", ERR_BAD_FIELD, "Chain is missing"},
    {CHAIN, "{\"Chain\": {\"StartNode\": \"x\"}}", ERR_BAD_FIELD, "Chain.ServiceName is missing"},
    {CHAIN, CH("\"Target\": \"a\"", TGT("a", "")) "x", ERR_BAD_JSON, ""},
    {CHAIN,
     "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"r\", \"Nodes\": {}, "
     "\"Targets\": {}}}",
     ERR_BAD_FIELD, "Chain.StartNode \"r\" is not an object in Chain.Nodes"},
    {CHAIN,
     "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"r\", \"Nodes\": {\"r\": "
     "{\"Type\": \"router\"}}, \"Targets\": {}}}",
     ERR_BAD_FIELD, "Chain.Nodes[\"r\"].Routes is missing"},
    {CHAIN,
     "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"r\", \"Nodes\": {\"r\": "
     "{\"Type\": \"gateway\"}}, \"Targets\": {}}}",
     ERR_BAD_FIELD, "is not resolver, router or splitter"},
    /* A router whose route loops back to itself: visited once, no resolver. */
    {CHAIN,
     "{\"Chain\": {\"ServiceName\": \"db\", \"StartNode\": \"r\", \"Nodes\": {\"r\": "
     "{\"Type\": \"router\", \"Routes\": [{\"NextNode\": \"r\"}]}}, "
     "\"Targets\": {}}}",
     ERR_BAD_FIELD, "no resolver reachable"},
    {CHAIN, CH("", TGT("a", "")), ERR_BAD_FIELD, ".Resolver.Target is missing"},
    {CHAIN, CH("\"Target\": \"b\"", TGT("a", "")), ERR_BAD_FIELD,
     "Chain.Targets[\"b\"] is missing"},
    {CHAIN, CH("\"Target\": \"a\", \"ConnectTimeout\": \"soon\"", TGT("a", "")), ERR_BAD_FIELD,
     "ConnectTimeout must be a duration"},
    {CHAIN, CH("\"Target\": \"a\", \"ConnectTimeout\": true", TGT("a", "")), ERR_BAD_FIELD,
     "ConnectTimeout must be a duration"},
    {CHAIN, CH("\"Target\": \"a\", \"Failover\": {\"Targets\": [1]}", TGT("a", "")), ERR_BAD_FIELD,
     "Failover.Targets[0] must be a target ID"},
    {CHAIN, CH("\"Target\": \"a\", \"Failover\": {\"Targets\": [\"c\"]}", TGT("a", "")),
     ERR_BAD_FIELD, "Chain.Targets[\"c\"] is missing"},
    {CHAIN, CH("\"Target\": \"a\"", "\"a\": {\"Service\": \"\"}"), ERR_BAD_FIELD,
     "Service must not be empty"},
    {CHAIN, CH("\"Target\": \"a\"", "\"a\": []"), ERR_BAD_FIELD, "must be an object"},
    /* Regression (found by fuzz_decode): an ID other than its key let one target be added
     * again and again past the array sized for the map (a heap overflow under ASan). */
    {CHAIN,
     CH("\"Target\": \"a\", \"Failover\": {\"Targets\": [\"b\", \"b\"]}",
        "\"a\": {\"Service\": \"a\"}, \"b\": {\"ID\": \"c\", \"Service\": \"b\"}"),
     ERR_BAD_FIELD, "Chain.Targets[\"b\"].ID must equal the target's key"},
    {CHAIN, CH("\"Target\": \"a\"", TGT("a", ", \"Subset\": {\"Filter\": 3}")), ERR_BAD_FIELD,
     "Filter must be a string"},
    {CHAIN, CH("\"Target\": \"a\"", TGT("a", ", \"Subset\": {\"OnlyPassing\": 1}")), ERR_BAD_FIELD,
     "OnlyPassing must be true or false"},

    /* The chain's routing (issue 10): every field checked, bounded; one bad field fails the
     * whole chain, so the last good route table stays. */
    {CHAIN, RCH(RT("\"PathExact\": \"x\"", ""), ""), ERR_BAD_FIELD,
     "PathExact must begin with \"/\""},
    {CHAIN, RCH(RT("\"PathExact\": \"/x\", \"PathPrefix\": \"/\"", ""), ""), ERR_BAD_FIELD,
     "must set at most one of PathExact, PathPrefix or PathRegex"},
    {CHAIN, RCH(RT("\"PathRegex\": 7", ""), ""), ERR_BAD_FIELD, "PathRegex must be a string"},
    {CHAIN, RCH(RT("\"CaseInsensitive\": \"yes\"", ""), ""), ERR_BAD_FIELD,
     "CaseInsensitive must be true or false"},
    {CHAIN, RCH(RT("\"Header\": [{\"Name\": \"x\", \"Exact\": \"a\", \"Prefix\": \"b\"}]", ""), ""),
     ERR_BAD_FIELD, "Header[0] must set exactly one of"},
    {CHAIN, RCH(RT("\"Header\": [{\"Exact\": \"a\"}]", ""), ""), ERR_BAD_FIELD,
     "Header[0].Name is missing"},
    {CHAIN,
     RCH(RT("\"QueryParam\": [{\"Name\": \"q\", \"Present\": true, \"Exact\": \"1\"}]", ""), ""),
     ERR_BAD_FIELD, "QueryParam[0] must set exactly one of Present, Exact or Regex"},
    {CHAIN, RCH(RT("\"QueryParam\": [{\"Name\": \"q\"}]", ""), ""), ERR_BAD_FIELD,
     "QueryParam[0] must set exactly one of Present, Exact or Regex"},
    {CHAIN, RCH(RT("\"QueryParam\": [{\"Exact\": \"1\"}]", ""), ""), ERR_BAD_FIELD,
     "QueryParam[0].Name is missing"},
    {CHAIN, RCH(RT("\"QueryParam\": {}", ""), ""), ERR_BAD_FIELD, "QueryParam must be an array"},
    {CHAIN, RCH(RT("\"Methods\": [1]", ""), ""), ERR_BAD_FIELD,
     "Methods must hold non-empty strings"},
    {CHAIN, RCH(RT("", "\"RetryOn\": [\"5xx\", \"sometimes\"]"), ""), ERR_BAD_FIELD,
     "RetryOn[1] \"sometimes\" is not a value Consul accepts"},
    {CHAIN, RCH(RT("", "\"RetryOnStatusCodes\": [\"503\"]"), ""), ERR_BAD_FIELD,
     "RetryOnStatusCodes[0] must be an HTTP status"},
    {CHAIN, RCH(RT("", "\"RetryOnStatusCodes\": [1000]"), ""), ERR_BAD_FIELD,
     "RetryOnStatusCodes[0] must be an HTTP status"},
    {CHAIN, RCH(RT("", "\"RequestTimeout\": \"soon\""), ""), ERR_BAD_FIELD,
     "Destination.RequestTimeout must be a duration"},
    {CHAIN, RCH(RT("", "\"IdleTimeout\": -5"), ""), ERR_BAD_FIELD,
     "Destination.IdleTimeout must be a duration"},
    {CHAIN, RCH(RT("", "\"NumRetries\": -1"), ""), ERR_BAD_FIELD, "NumRetries must be an integer"},
    {CHAIN, RCH(RT("", "\"RetryOnConnectFailure\": 1"), ""), ERR_BAD_FIELD,
     "RetryOnConnectFailure must be true or false"},
    {CHAIN, RCH(RT("", "\"PrefixRewrite\": \"/a\\r\\nx: y\""), ""), ERR_BAD_FIELD,
     "PrefixRewrite must not hold CR or LF"},
    {CHAIN, RCH(RT("", "\"RequestHeaders\": {\"Set\": {\"x-a\": \"a\\r\\nx-b: b\"}}"), ""),
     ERR_BAD_FIELD, "RequestHeaders.Set[\"x-a\"] must be a header value"},
    {CHAIN, RCH(RT("", "\"ResponseHeaders\": {\"Add\": {\"bad name\": \"v\"}}"), ""), ERR_BAD_FIELD,
     "ResponseHeaders.Add: \"bad name\" is not a header name"},
    {CHAIN, RCH(RT("", "\"RequestHeaders\": {\"Remove\": [\"a:b\"]}"), ""), ERR_BAD_FIELD,
     "RequestHeaders.Remove[0] is not a header name"},
    {CHAIN, RCH(RT("", "\"RequestHeaders\": {\"Add\": {\"x\": 1}}"), ""), ERR_BAD_FIELD,
     "must be a header value"},
    {CHAIN, RCH(RT("", "\"RequestHeaders\": []"), ""), ERR_BAD_FIELD,
     "RequestHeaders must be an object"},
    {CHAIN, RCH("{\"NextNode\": \"router:db\"},", ""), ERR_BAD_FIELD,
     "leads to \"router:db\", a router: a splitter or resolver belongs there"},
    {CHAIN, RCH("{\"NextNode\": \"nowhere\"},", ""), ERR_BAD_FIELD,
     "Chain node \"nowhere\" is not an object in Chain.Nodes"},
    {CHAIN, SPL("{\"Weight\": 100, \"NextNode\": \"splitter:s\"}"), ERR_BAD_FIELD,
     "leads to \"splitter:s\", a splitter: a resolver belongs there"},
    {CHAIN, SPL("{\"Weight\": 100.5, \"NextNode\": \"resolver:db\"}"), ERR_BAD_FIELD,
     "Splits[0].Weight must be a number in [0, 100]"},
    {CHAIN, SPL("{\"Weight\": \"50\", \"NextNode\": \"resolver:db\"}"), ERR_BAD_FIELD,
     "Splits[0].Weight must be a number in [0, 100]"},
    {CHAIN, SPL("{\"NextNode\": \"resolver:db\"}"), ERR_BAD_FIELD,
     "Splits[0].Weight must be a number in [0, 100]"},
    {CHAIN, SPL(""), ERR_BAD_FIELD, "Splits must not be empty"},
    {CHAIN,
     SPL("{\"Weight\": 100, \"NextNode\": \"resolver:db\", \"Definition\": {\"RequestHeaders\": "
         "{\"Set\": {\"x\": \"\\n\"}}}}"),
     ERR_BAD_FIELD, "Splits[0].RequestHeaders.Set[\"x\"] must be a header value"},
    {CHAIN, CH("\"Target\": \"a\", \"RequestTimeout\": \"x\"", TGT("a", "")), ERR_BAD_FIELD,
     "RequestTimeout must be a duration"},
    {CHAIN, LBC("{\"Policy\": \"fastest\"}"), ERR_BAD_FIELD,
     "LoadBalancer.Policy must be random, round_robin, least_request, ring_hash or maglev"},
    {CHAIN, LBC("{\"LeastRequestConfig\": {\"ChoiceCount\": -2}}"), ERR_BAD_FIELD,
     "ChoiceCount must be an integer"},
    {CHAIN, LBC("{\"HashPolicies\": [{\"Field\": \"header\"}]}"), ERR_BAD_FIELD,
     "HashPolicies[0] must set Field with FieldValue, or SourceIP alone"},
    {CHAIN,
     LBC("{\"HashPolicies\": [{\"SourceIP\": true, \"Field\": \"cookie\", "
         "\"FieldValue\": \"c\"}]}"),
     ERR_BAD_FIELD, "HashPolicies[0] must set Field with FieldValue, or SourceIP alone"},
    {CHAIN, LBC("{\"HashPolicies\": [{\"Field\": \"body\", \"FieldValue\": \"x\"}]}"),
     ERR_BAD_FIELD, "HashPolicies[0].Field must be header, cookie or query_parameter"},
    {CHAIN,
     LBC("{\"HashPolicies\": [{\"Field\": \"cookie\", \"FieldValue\": \"c\", "
         "\"CookieConfig\": {\"TTL\": \"forever\"}}]}"),
     ERR_BAD_FIELD, "TTL must be a duration"},
    {CHAIN, LBC("[]"), ERR_BAD_FIELD, "LoadBalancer must be an object"},

    /* Prepared queries. */
    {QUERY, "[]", ERR_BAD_FIELD, "must be a JSON object"},
    {QUERY, "{\"Nodes\": {}}", ERR_BAD_FIELD, "Nodes must be an array"},
    {QUERY, "{\"Service\": 1}", ERR_BAD_FIELD, "Service must be a string"},
    {QUERY, "{\"Nodes\": [1]}", ERR_BAD_FIELD, "Nodes[0] must be an object"},
    {QUERY, "{\"Nodes\": [{\"Node\": {\"Address\": \"a\"}, \"Service\": {}}]}", ERR_BAD_FIELD,
     "Nodes[0].Service.Service is missing"},
};

/* Regression: a root serial above INT64_MAX (Go's uint64) made the whole roots answer fail, so
 * a rotated-in root was never trusted. Integers beyond long long now decode as doubles. */
static void test_uint64_fields(void **state)
{
    struct dec_roots r;
    struct dec_service svc;
    char err[256];
    char *body = xstrdup(ROOTS_JSON);
    char *p = strstr(body, "\"SerialNumber\": 12,");
    (void)state;
    assert_non_null(p);
    char *big = xasprintf("%.*s\"SerialNumber\": 12760219534612555758,%s", (int)(p - body), body,
                          p + strlen("\"SerialNumber\": 12,"));
    assert_int_equal(decode_roots(big, strlen(big), &r, err, sizeof(err)), 0);
    assert_int_equal(r.n_roots, 2);
    dec_roots_dispose(&r);
    free(big);
    free(body);

    /* Integer fields keep working when the body had to be read with doubles. */
    static const char svc_big[] =
        "{\"Kind\": \"connect-proxy\", \"ID\": \"p\", \"Service\": \"p\", \"Port\": 21000,"
        " \"Proxy\": {\"DestinationServiceName\": \"web\", \"LocalServicePort\": 8080,"
        " \"Config\": {\"huge\": 18446744073709551615, \"bind_port\": 21001}}}";
    assert_int_equal(decode_agent_service(svc_big, strlen(svc_big), &svc, err, sizeof(err)), 0);
    assert_int_equal(svc.port, 21000);
    assert_int_equal(svc.local_service_port, 8080);
    const struct dec_kv *bp = find_kv(svc.config, svc.n_config, "bind_port");
    assert_string_equal(bp->str, "21001");
    dec_service_dispose(&svc);

    /* A huge value where a small integer is expected is still refused by name. */
    static const char svc_bad[] =
        "{\"Kind\": \"connect-proxy\", \"ID\": \"p\", \"Service\": \"p\", \"Port\": "
        "18446744073709551615, \"Proxy\": {\"DestinationServiceName\": \"web\"}}";
    assert_int_equal(decode_agent_service(svc_bad, strlen(svc_bad), &svc, err, sizeof(err)),
                     ERR_BAD_FIELD);
    if (strstr(err, "Port") == NULL)
        fail_msg("error does not name Port: %s", err);
}

/* ---- agent self ---- */

static const char SELF_JSON[] =
    "{\n"
    "    \"Config\": { \"Datacenter\": \"dc1\", \"Version\": \"1.22.7\" },\n"
    "    \"DebugConfig\": {\n"
    "        \"ACLResolverSettings\": { \"ACLDefaultPolicy\": \"allow\" },\n"
    "        \"ACLsEnabled\": false,\n"
    "        \"DefaultIntentionPolicy\": \"deny\",\n"
    "        \"Experiments\": []\n"
    "    },\n"
    "    \"Member\": {\"Name\": \"n1\", \"Addr\": \"10.0.0.7\", \"Port\": 8301}, \"xDS\": null\n"
    "}\n";

static void test_agent_self(void **state)
{
    struct dec_agent_self self;
    char err[256];
    size_t n = strlen(SELF_JSON);
    (void)state;
    assert_int_equal(decode_agent_self(SELF_JSON, n, &self, err, sizeof(err)), 0);
    assert_string_equal(self.datacenter, "dc1");
    assert_string_equal(self.default_intention_policy, "deny");
    assert_string_equal(self.acl_default_policy, "allow");
    assert_int_equal(self.acls_enabled, 0);
    assert_string_equal(self.member_addr, "10.0.0.7");
    dec_agent_self_dispose(&self);

    /* Older agents lack the fields: all optional, "" (or -1) when absent. */
    assert_int_equal(decode_agent_self("{}", 2, &self, err, sizeof(err)), 0);
    assert_string_equal(self.default_intention_policy, "");
    assert_int_equal(self.acls_enabled, -1);
    assert_string_equal(self.member_addr, "");
    dec_agent_self_dispose(&self);

    /* Wrong shapes name the field; every truncation fails cleanly. */
    static const char bad[] = "{\"DebugConfig\": {\"DefaultIntentionPolicy\": 1}}";
    assert_int_equal(decode_agent_self(bad, strlen(bad), &self, err, sizeof(err)), ERR_BAD_FIELD);
    assert_non_null(strstr(err, "DefaultIntentionPolicy"));
    assert_null(self.datacenter);
    assert_int_equal(decode_agent_self("[]", 2, &self, err, sizeof(err)), ERR_BAD_FIELD);
    for (size_t i = 0; i + 1 < n; i++) {
        char *copy = malloc(i + 1);
        assert_non_null(copy);
        memcpy(copy, SELF_JSON, i);
        assert_int_equal(decode_agent_self(copy, i, &self, err, sizeof(err)), ERR_BAD_JSON);
        free(copy);
    }
}

/* The mesh config entry of case-l7-intentions-request-normalization, as the agent renders it. */
static const char MESH_JSON[] =
    "{\"Kind\":\"mesh\",\"TransparentProxy\":{\"MeshDestinationsOnly\":false},"
    "\"HTTP\":{\"SanitizeXForwardedClientCert\":false,\"Incoming\":{\"RequestNormalization\":{"
    "\"InsecureDisablePathNormalization\":false,\"MergeSlashes\":true,"
    "\"PathWithEscapedSlashesAction\":\"UNESCAPE_AND_FORWARD\","
    "\"HeadersWithUnderscoresAction\":\"REJECT_REQUEST\"}}},"
    "\"Hash\":18446744073709551615,\"CreateIndex\":20,\"ModifyIndex\":21}";

static int mesh(const char *body, struct mesh_http_cfg *m, char *err, size_t errlen)
{
    /* A poisoned output shows that every field is written, on success and on failure. */
    memset(m, 0xa5, sizeof(*m));
    return decode_mesh_http(body, strlen(body), m, err, errlen);
}

/* A service-defaults entry as Consul Enterprise returns it (Community refuses RateLimits). */
static const char RATES_JSON[] =
    "{\"Kind\":\"service-defaults\",\"Name\":\"web\",\"Protocol\":\"http\","
    "\"RateLimits\":{\"InstanceLevel\":{\"RequestsPerSecond\":5,\"RequestsMaxBurst\":7,"
    "\"Routes\":[{\"PathExact\":\"/e\",\"RequestsPerSecond\":1},"
    "{\"PathPrefix\":\"/p\",\"RequestsPerSecond\":2,\"RequestsMaxBurst\":4},"
    "{\"PathRegex\":\"/r/.*\",\"RequestsPerSecond\":3}]}},"
    "\"CreateIndex\":20,\"ModifyIndex\":21}";

static int rates(const char *body, struct dec_rate_limits *c, char *err, size_t errlen)
{
    memset(c, 0xa5, sizeof(*c));
    return decode_rate_limits(body, strlen(body), c, err, errlen);
}

static void test_rate_limits(void **state)
{
    struct dec_rate_limits c;
    char err[512];
    (void)state;
    assert_int_equal(rates(RATES_JSON, &c, err, sizeof(err)), 0);
    assert_int_equal(c.per_second, 5);
    assert_int_equal(c.burst, 7);
    assert_int_equal(c.n_routes, 3);
    assert_int_equal(c.routes[0].kind, DEC_PATH_EXACT);
    assert_string_equal(c.routes[0].path, "/e");
    assert_int_equal(c.routes[0].per_second, 1);
    assert_int_equal(c.routes[0].burst, 0);
    assert_int_equal(c.routes[1].kind, DEC_PATH_PREFIX);
    assert_int_equal(c.routes[1].burst, 4);
    assert_int_equal(c.routes[2].kind, DEC_PATH_REGEX);
    assert_string_equal(c.routes[2].path, "/r/.*");
    dec_rate_limits_dispose(&c);
    /* No RateLimits, or an empty one: no limit. */
    assert_int_equal(
        rates("{\"Kind\":\"service-defaults\",\"Name\":\"web\"}", &c, err, sizeof(err)), 0);
    assert_int_equal(c.per_second, 0);
    assert_int_equal(c.n_routes, 0);
    assert_null(c.routes);
    assert_int_equal(rates("{\"RateLimits\":{\"InstanceLevel\":{}}}", &c, err, sizeof(err)), 0);
    assert_int_equal(c.per_second, 0);
    /* Errors name the field and leave nothing behind. */
    static const char *const bad[] = {
        "{\"RateLimits\":{\"InstanceLevel\":{\"RequestsPerSecond\":-1}}}",
        "{\"RateLimits\":{\"InstanceLevel\":{\"RequestsPerSecond\":\"5\"}}}",
        "{\"RateLimits\":{\"InstanceLevel\":{\"Routes\":[{\"RequestsPerSecond\":1}]}}}",
        "{\"RateLimits\":{\"InstanceLevel\":{\"Routes\":[{\"PathExact\":\"/a\","
        "\"PathPrefix\":\"/b\"}]}}}",
        "{\"RateLimits\":{\"InstanceLevel\":{\"Routes\":[{\"PathExact\":\"/a\"},7]}}}",
        "{\"RateLimits\":{\"InstanceLevel\":{\"Routes\":{}}}}",
        "{\"Kind\":\"mesh\"}",
        "[]",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_not_equal(rates(bad[i], &c, err, sizeof(err)), 0);
        assert_int_equal(c.n_routes, 0);
        assert_null(c.routes);
        assert_true(err[0] != '\0');
    }
    assert_int_equal(rates("{\"RateLimits\":{\"InstanceLevel\":{\"Routes\":[{\"PathExact\":"
                           "\"/a\",\"PathPrefix\":\"/b\"}]}}}",
                           &c, err, sizeof(err)),
                     ERR_BAD_FIELD);
    assert_non_null(strstr(err, "RateLimits.InstanceLevel.Routes[0]"));
    /* Too many routes is refused, not truncated. */
    char big[64 + (DEC_RATE_ROUTES_MAX + 1) * 24];
    size_t n =
        (size_t)snprintf(big, sizeof(big), "{\"RateLimits\":{\"InstanceLevel\":{\"Routes\":[");
    for (int i = 0; i <= DEC_RATE_ROUTES_MAX; i++)
        n += (size_t)snprintf(big + n, sizeof(big) - n, "%s{\"PathExact\":\"/%d\"}", i ? "," : "",
                              i);
    snprintf(big + n, sizeof(big) - n, "]}}}");
    assert_int_equal(rates(big, &c, err, sizeof(err)), ERR_BAD_FIELD);
}

static void test_mesh_http(void **state)
{
    struct mesh_http_cfg m;
    const struct mesh_http_cfg zero = {0};
    char err[512];
    (void)state;
    assert_int_equal(mesh(MESH_JSON, &m, err, sizeof(err)), 0);
    assert_int_equal(m.disable_path_normalization, 0);
    assert_int_equal(m.merge_slashes, 1);
    assert_int_equal(m.escaped_slash, PATHNORM_SLASH_UNESCAPE_FORWARD);
    assert_int_equal(m.underscore, PATHNORM_UNDERSCORE_REJECT);

    /* The -disabled case: "" is the default for both actions. */
    static const char disabled[] =
        "{\"Kind\":\"mesh\",\"HTTP\":{\"Incoming\":{\"RequestNormalization\":{"
        "\"InsecureDisablePathNormalization\":true,\"PathWithEscapedSlashesAction\":\"\","
        "\"HeadersWithUnderscoresAction\":\"\"}}}}";
    assert_int_equal(mesh(disabled, &m, err, sizeof(err)), 0);
    assert_int_equal(m.disable_path_normalization, 1);
    assert_int_equal(m.merge_slashes, 0);
    assert_int_equal(m.escaped_slash, PATHNORM_SLASH_KEEP);
    assert_int_equal(m.underscore, PATHNORM_UNDERSCORE_ALLOW);

    /* Every block is optional (or null): Consul's defaults. */
    static const char *const empty[] = {
        "{}",
        "{\"Kind\":\"mesh\",\"HTTP\":null}",
        "{\"HTTP\":{\"SanitizeXForwardedClientCert\":true}}",
        "{\"HTTP\":{\"Incoming\":{}}}",
        "{\"HTTP\":{\"Incoming\":{\"RequestNormalization\":null}}}",
        "{\"HTTP\":{\"Incoming\":{\"RequestNormalization\":{\"PathWithEscapedSlashesAction\":"
        "\"IMPLEMENTATION_SPECIFIC_DEFAULT\"}}}}",
    };
    for (size_t i = 0; i < ARRAY_SIZE(empty); i++) {
        if (mesh(empty[i], &m, err, sizeof(err)) != 0 || memcmp(&m, &zero, sizeof(m)) != 0)
            fail_msg("%s: %s", empty[i], err);
    }

    /* An action Consul does not know (or spelt otherwise) is an error naming the field, and
     * the output is all defaults: the caller keeps its last good settings. */
    static const struct {
        const char *body, *err_has;
    } bad[] = {
        {"{\"HTTP\":{\"Incoming\":{\"RequestNormalization\":{\"PathWithEscapedSlashesAction\":"
         "\"UNESCAPE_AND_FROBNICATE\"}}}}",
         "HTTP.Incoming.RequestNormalization.PathWithEscapedSlashesAction \"UNESCAPE_AND_"},
        {"{\"HTTP\":{\"Incoming\":{\"RequestNormalization\":{\"PathWithEscapedSlashesAction\":"
         "\"reject_request\"}}}}",
         "PathWithEscapedSlashesAction \"reject_request\" is not one of"},
        {"{\"HTTP\":{\"Incoming\":{\"RequestNormalization\":{\"HeadersWithUnderscoresAction\":"
         "\"DROP\"}}}}",
         "HeadersWithUnderscoresAction \"DROP\" is not one of ALLOW, REJECT_REQUEST, DROP_HEADER"},
        {"{\"HTTP\":{\"Incoming\":{\"RequestNormalization\":{\"MergeSlashes\":\"true\"}}}}",
         "HTTP.Incoming.RequestNormalization.MergeSlashes must be true or false"},
        {"{\"HTTP\":{\"Incoming\":{\"RequestNormalization\":{\"InsecureDisablePathNormalization\":"
         "1}}}}",
         "InsecureDisablePathNormalization must be true or false"},
        {"{\"HTTP\":{\"Incoming\":{\"RequestNormalization\":{\"HeadersWithUnderscoresAction\":"
         "7}}}}",
         "HeadersWithUnderscoresAction must be a string"},
        {"{\"HTTP\":{\"Incoming\":[]}}", "HTTP.Incoming must be an object"},
        {"{\"HTTP\":\"x\"}", "HTTP must be an object"},
        {"{\"Kind\":\"service-defaults\"}", "not \"mesh\""},
        {"[]", "must be a JSON object"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        int rc = mesh(bad[i].body, &m, err, sizeof(err));
        if (rc != ERR_BAD_FIELD || strstr(err, bad[i].err_has) == NULL ||
            memcmp(&m, &zero, sizeof(m)) != 0)
            fail_msg("%s: rc %d, err \"%s\" (want \"%s\")", bad[i].body, rc, err, bad[i].err_has);
    }

    /* Every truncation fails cleanly. */
    size_t n = strlen(MESH_JSON);
    for (size_t i = 0; i + 1 < n; i++) {
        char *copy = malloc(i + 1);
        assert_non_null(copy);
        memcpy(copy, MESH_JSON, i);
        assert_int_equal(decode_mesh_http(copy, i, &m, err, sizeof(err)), ERR_BAD_JSON);
        assert_memory_equal(&m, &zero, sizeof(m));
        free(copy);
    }
}

static void test_malformed(void **state)
{
    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(bad_cases); i++) {
        const struct bad_case *c = &bad_cases[i];
        char err[256] = "";
        int rc = run(c->w, c->body, strlen(c->body), err, sizeof(err));
        if (rc != c->rc || strstr(err, c->err_has) == NULL || err[0] == '\0')
            fail_msg("case %zu (%s) %s: rc %d (want %d), err \"%s\" (want \"%s\")", i,
                     which_names[c->w], c->body, rc, c->rc, err, c->err_has);
    }
}

static void test_null_and_tiny_err_buffers(void **state)
{
    (void)state;
    /* Failures with no message buffer, or a one-byte one, are still clean. */
    for (size_t i = 0; i < ARRAY_SIZE(bad_cases); i++) {
        const struct bad_case *c = &bad_cases[i];
        char one[1] = {'x'};
        assert_int_equal(run(c->w, c->body, strlen(c->body), NULL, 0), c->rc);
        assert_int_equal(run(c->w, c->body, strlen(c->body), one, sizeof(one)), c->rc);
        assert_int_equal(one[0], '\0');
    }
    struct dec_roots r;
    assert_int_equal(decode_roots(NULL, 0, &r, NULL, 0), ERR_BAD_JSON);
}

static void test_every_decoder_rejects_the_others(void **state)
{
    (void)state;
    /* Each good body given to every other decoder fails cleanly (or, where the shape happens
     * to fit, succeeds) without leaking. Only the outcome's cleanliness is checked. */
    static const char *const bodies[] = {ROOTS_JSON,      LEAF_JSON,   SERVICE_JSON, SERVICES_JSON,
                                         INTENTIONS_JSON, HEALTH_JSON, CHAIN_JSON,   QUERY_JSON};
    for (size_t b = 0; b < ARRAY_SIZE(bodies); b++)
        for (int w = ROOTS; w <= QUERY; w++) {
            char err[256] = "";
            int rc = run((enum which)w, bodies[b], strlen(bodies[b]), err, sizeof(err));
            if (rc != 0)
                assert_true(err[0] != '\0');
        }
}

/* ---- Proxy.Expose and /v1/agent/checks (expose paths) ---- */

/* A sidecar registration whose Proxy block ends with <expose> (JSON text of Expose's value). */
static int decode_with_expose(const char *expose, struct dec_service *s, char *err, size_t len)
{
    char body[8192];
    snprintf(body, sizeof(body),
             "{\"Kind\":\"connect-proxy\",\"ID\":\"web-sidecar-proxy\",\"Service\":\"web-sp\","
             "\"Port\":21000,\"Proxy\":{\"DestinationServiceName\":\"web\","
             "\"LocalServicePort\":8080,\"Expose\":%s}}",
             expose);
    return decode_agent_service(body, strlen(body), s, err, len);
}

static void test_service_expose(void **state)
{
    (void)state;
    struct dec_service s;
    char err[256];
    assert_int_equal(decode_with_expose(
                         "{\"Checks\":true,\"Paths\":[{\"ListenerPort\":21500,\"Path\":\"/health\","
                         "\"LocalPathPort\":8080,\"ParsedFromCheck\":false},{\"ListenerPort\":"
                         "21501,\"Path\":\"/grpc\",\"LocalPathPort\":9090,\"Protocol\":\"http2\"}"
                         "]}",
                         &s, err, sizeof(err)),
                     0);
    assert_true(s.expose_checks);
    assert_int_equal(s.n_expose_paths, 2);
    assert_int_equal(s.expose_paths[0].listener_port, 21500);
    assert_int_equal(s.expose_paths[0].local_path_port, 8080);
    assert_string_equal(s.expose_paths[0].path, "/health");
    assert_string_equal(s.expose_paths[0].protocol, "");
    assert_string_equal(s.expose_paths[1].protocol, "http2");
    assert_int_equal(s.expose_paths[1].local_path_port, 9090);
    dec_service_dispose(&s);

    /* Absent, null and empty are all "nothing exposed". */
    const char *none[] = {"null", "{}", "{\"Paths\":null}", "{\"Checks\":false,\"Paths\":[]}"};
    for (size_t i = 0; i < ARRAY_SIZE(none); i++) {
        assert_int_equal(decode_with_expose(none[i], &s, err, sizeof(err)), 0);
        assert_false(s.expose_checks);
        assert_int_equal(s.n_expose_paths, 0);
        dec_service_dispose(&s);
    }

    /* Wrong shapes name the field; nothing is left allocated (ASan). */
    static const struct {
        const char *json, *field;
    } bad[] = {
        {"[]", "Proxy.Expose must be an object"},
        {"{\"Checks\":\"yes\"}", "Proxy.Expose.Checks must be true or false"},
        {"{\"Paths\":{}}", "Proxy.Expose.Paths must be an array"},
        {"{\"Paths\":[7]}", "Proxy.Expose.Paths[0] must be an object"},
        {"{\"Paths\":[{\"Path\":\"/a\",\"ListenerPort\":\"21500\"}]}",
         "Proxy.Expose.Paths[0].ListenerPort must be an integer"},
        {"{\"Paths\":[{\"Path\":\"/a\"},{\"Path\":\"/b\",\"LocalPathPort\":70000}]}",
         "Proxy.Expose.Paths[1].LocalPathPort must be an integer"},
        {"{\"Paths\":[{\"Path\":5}]}", "Proxy.Expose.Paths[0].Path must be a string"},
        {"{\"Paths\":[{\"Path\":\"/a\",\"Protocol\":2}]}",
         "Proxy.Expose.Paths[0].Protocol must be a string"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        assert_int_equal(decode_with_expose(bad[i].json, &s, err, sizeof(err)), ERR_BAD_FIELD);
        if (strstr(err, bad[i].field) == NULL)
            fail_msg("%s: got \"%s\", want \"%s\"", bad[i].json, err, bad[i].field);
        assert_null(s.expose_paths);
    }

    /* Bounded: DEC_EXPOSE_PATHS_MAX paths, paths of DEC_EXPOSE_PATH_MAX bytes. */
    char *many = xmalloc(8192);
    size_t n = (size_t)snprintf(many, 8192, "{\"Paths\":[");
    for (int i = 0; i <= DEC_EXPOSE_PATHS_MAX; i++)
        n += (size_t)snprintf(many + n, 8192 - n, "%s{\"Path\":\"/p%d\"}", i ? "," : "", i);
    snprintf(many + n, 8192 - n, "]}");
    assert_int_equal(decode_with_expose(many, &s, err, sizeof(err)), ERR_BAD_FIELD);
    assert_non_null(strstr(err, "more than 64"));
    char *longp = xmalloc(DEC_EXPOSE_PATH_MAX + 64);
    n = (size_t)snprintf(longp, DEC_EXPOSE_PATH_MAX + 64, "{\"Paths\":[{\"Path\":\"/");
    memset(longp + n, 'a', DEC_EXPOSE_PATH_MAX);
    snprintf(longp + n + DEC_EXPOSE_PATH_MAX, 64, "\"}]}");
    assert_int_equal(decode_with_expose(longp, &s, err, sizeof(err)), ERR_BAD_FIELD);
    assert_non_null(strstr(err, "Path is longer than 1024 bytes"));
    free(many);
    free(longp);
}

static void test_agent_checks(void **state)
{
    (void)state;
    static const char body[] =
        "{\"service:web:1\":{\"Node\":\"n\",\"CheckID\":\"service:web:1\",\"Name\":\"h\","
        "\"Status\":\"passing\",\"Output\":\"HTTP GET http://127.0.0.1:21500/health: 200 OK\","
        "\"ServiceID\":\"web\",\"ServiceName\":\"web\",\"Type\":\"http\",\"ExposedPort\":21500,"
        "\"Definition\":{}},"
        "\"service:web-sidecar-proxy\":{\"CheckID\":\"service:web-sidecar-proxy\","
        "\"ServiceID\":\"web-sidecar-proxy\",\"Type\":\"tcp\",\"ExposedPort\":0},"
        "\"serfHealth\":{\"CheckID\":\"serfHealth\",\"ServiceID\":\"\",\"Type\":\"\"},"
        "\"service:web:2\":{\"CheckID\":\"service:web:2\",\"ServiceID\":\"web\",\"Type\":\"grpc\","
        "\"Status\":\"critical\",\"Output\":null,\"ExposedPort\":21501}}";
    struct dec_check *v;
    size_t n;
    char err[256];
    assert_int_equal(decode_agent_checks(body, strlen(body), "web", &v, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 2);
    assert_string_equal(v[0].check_id, "service:web:1");
    assert_string_equal(v[0].type, "http");
    assert_string_equal(v[0].status, "passing");
    assert_int_equal(v[0].exposed_port, 21500);
    assert_string_equal(v[0].output, "HTTP GET http://127.0.0.1:21500/health: 200 OK");
    assert_string_equal(v[1].type, "grpc");
    assert_string_equal(v[1].output, "");
    assert_int_equal(v[1].exposed_port, 21501);
    dec_checks_free(v, n);

    assert_int_equal(decode_agent_checks("{}", 2, "web", &v, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 0);
    dec_checks_free(v, n);

    static const char *const bad[] = {
        "[]",
        "{\"a\":3}",
        "{\"a\":{\"ServiceID\":\"web\"}}", /* no CheckID */
        "{\"a\":{\"CheckID\":\"a\",\"ServiceID\":\"web\",\"ExposedPort\":-1}}",
        "{\"a\":{\"CheckID\":\"a\",\"ServiceID\":\"web\",\"Output\":[]}}",
        "{\"a\":{\"CheckID\":\"a\",\"ServiceID\":7}}",
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        assert_int_not_equal(
            decode_agent_checks(bad[i], strlen(bad[i]), "web", &v, &n, err, sizeof(err)), 0);
        assert_null(v);
        assert_int_equal(n, 0);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_service_expose),
        cmocka_unit_test(test_agent_checks),
        cmocka_unit_test(test_agent_self),
        cmocka_unit_test(test_mesh_http),
        cmocka_unit_test(test_rate_limits),
        cmocka_unit_test(test_uint64_fields),
        cmocka_unit_test(test_roots_good),
        cmocka_unit_test(test_roots_minimal),
        cmocka_unit_test(test_roots_truncated),
        cmocka_unit_test(test_leaf_good),
        cmocka_unit_test(test_leaf_truncated),
        cmocka_unit_test(test_jansson_frees_wiping),
        cmocka_unit_test(test_service_good),
        cmocka_unit_test(test_service_without_proxy),
        cmocka_unit_test(test_service_null_maps),
        cmocka_unit_test(test_config_number_text),
        cmocka_unit_test(test_config_caps),
        cmocka_unit_test(test_service_truncated),
        cmocka_unit_test(test_sidecar_found),
        cmocka_unit_test(test_sidecar_none),
        cmocka_unit_test(test_sidecar_several),
        cmocka_unit_test(test_sidecar_case),
        cmocka_unit_test(test_sidecar_id_from_key),
        cmocka_unit_test(test_sidecar_truncated),
        cmocka_unit_test(test_intentions_good),
        cmocka_unit_test(test_intentions_empty),
        cmocka_unit_test(test_intentions_truncated),
        cmocka_unit_test(test_intentions_permissions),
        cmocka_unit_test(test_intentions_permissions_any_and_jwt),
        cmocka_unit_test(test_intentions_permissions_malformed),
        cmocka_unit_test(test_intentions_permissions_bounds),
        cmocka_unit_test(test_health_good),
        cmocka_unit_test(test_health_checks),
        cmocka_unit_test(test_health_empty_and_socket),
        cmocka_unit_test(test_health_truncated),
        cmocka_unit_test(test_chain_good),
        cmocka_unit_test(test_chain_shapes),
        cmocka_unit_test(test_chain_router_splitter),
        cmocka_unit_test(test_chain_truncated),
        cmocka_unit_test(test_chain_routes_real),
        cmocka_unit_test(test_chain_routes_truncated),
        cmocka_unit_test(test_chain_routes_bounds),
        cmocka_unit_test(test_durations),
        cmocka_unit_test(test_query_good),
        cmocka_unit_test(test_query_truncated),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_null_and_tiny_err_buffers),
        cmocka_unit_test(test_every_decoder_rejects_the_others),
    };
    return cmocka_run_group_tests_name("decode", tests, NULL, NULL);
}
