/*
 * authq: authorization questions between threads, for the "authorize" mode (consul-api.md
 * 2.3). A worker cannot talk to the agent (the control thread owns libcurl), so an inbound
 * session in AUTHORIZE posts a question to the control thread's box; the control thread
 * answers (from its cache or with POST /v1/agent/connect/authorize) and posts the same object
 * back to the asking worker's box. A box is a mutex-protected list plus its loop's wake-up;
 * the data path of other connections never waits on it.
 *
 * Ownership follows the object: the asker owns a question until it posts it, the control
 * thread until it posts the answer back, and the asker's thread again after that. A session
 * that ends while its question is out clears <owner>; its worker frees the answer on arrival.
 */
#ifndef CONNECTD_AUTHQ_H
#define CONNECTD_AUTHQ_H

#include <stdint.h>

#include "loop.h"

struct authq_box;

struct authq_req {
    struct authq_req *next;  /* list link inside a box */
    char *target;            /* destination service name (the identity this proxy fronts) */
    char *client_uri;        /* the caller's SPIFFE ID, as presented */
    char *client_serial;     /* the caller's certificate serial, colon-separated hex */
    uint32_t cache_ms;       /* how long the answer may be reused for this caller; 0 = never */
    int recheck;             /* about an open connection (re-authorization), not a new one */
    unsigned asks;           /* control thread: times sent to the agent so far */
    struct authq_box *reply; /* the asker's box */
    void *owner;             /* the asking session; NULL once it went away (asker's thread) */
    /* the answer */
    int allowed;
    char reason[256];
    /* the answer differs from the intentions the control thread holds (one of the two views
     * is stale): an admitted connection must be re-checked, as after an intention change */
    int disputed;
};

/* A question with copies of the strings; reply/owner/cache_ms are for the caller to set. */
struct authq_req *authq_req_new(const char *target, const char *client_uri,
                                const char *client_serial);
void authq_req_free(struct authq_req *r);

/*
 * A box whose arrivals wake <loop>: <on_post> then runs with <data> on the loop's thread (its
 * own loop_receiver) and takes what arrived. Create it on the loop's thread or before the
 * loop runs.
 */
struct authq_box *authq_box_new(struct loop *loop, void (*on_post)(void *data), void *data);
/* Frees the box and every request still inside it. No thread may post to it any more, and its
 * loop must not be running (or this is its thread). */
void authq_box_free(struct authq_box *b);
/* Any thread: appends <r> (ownership moves with it) and wakes the box's loop. */
void authq_box_post(struct authq_box *b, struct authq_req *r);
/* The box's loop thread: takes everything posted so far, oldest first (a NULL-ended list). */
struct authq_req *authq_box_take(struct authq_box *b);

#endif
