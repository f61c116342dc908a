/*
 * authq: two-thread mailboxes for authorization questions. A mutex guards each box's list;
 * it is held only to link or unlink, never across a callback or I/O.
 */
#include "authq.h"
#include "util.h"

#include <pthread.h>
#include <stdlib.h>

struct authq_box {
    pthread_mutex_t lock;
    struct authq_req *head, *tail;
    struct loop_receiver arrived;
    void (*on_post)(void *data);
    void *data;
};

struct authq_req *authq_req_new(const char *target, const char *client_uri,
                                const char *client_serial)
{
    struct authq_req *r = xcalloc(1, sizeof(*r));
    r->target = xstrdup(target);
    r->client_uri = xstrdup(client_uri);
    r->client_serial = xstrdup(client_serial);
    return r;
}

void authq_req_free(struct authq_req *r)
{
    if (r == NULL)
        return;
    free(r->target);
    free(r->client_uri);
    free(r->client_serial);
    free(r);
}

static void on_arrived(struct loop_receiver *rcv)
{
    struct authq_box *b = rcv->data;
    b->on_post(b->data);
}

struct authq_box *authq_box_new(struct loop *loop, void (*on_post)(void *data), void *data)
{
    struct authq_box *b = xcalloc(1, sizeof(*b));
    pthread_mutex_init(&b->lock, NULL);
    b->on_post = on_post;
    b->data = data;
    loop_receiver_register(loop, &b->arrived, on_arrived, b);
    return b;
}

void authq_box_free(struct authq_box *b)
{
    if (b == NULL)
        return;
    loop_receiver_unregister(&b->arrived);
    struct authq_req *r = b->head;
    while (r != NULL) {
        struct authq_req *next = r->next;
        authq_req_free(r);
        r = next;
    }
    pthread_mutex_destroy(&b->lock);
    free(b);
}

void authq_box_post(struct authq_box *b, struct authq_req *r)
{
    r->next = NULL;
    pthread_mutex_lock(&b->lock);
    if (b->tail != NULL)
        b->tail->next = r;
    else
        b->head = r;
    b->tail = r;
    pthread_mutex_unlock(&b->lock);
    loop_receiver_notify(&b->arrived);
}

struct authq_req *authq_box_take(struct authq_box *b)
{
    pthread_mutex_lock(&b->lock);
    struct authq_req *r = b->head;
    b->head = b->tail = NULL;
    pthread_mutex_unlock(&b->lock);
    return r;
}
