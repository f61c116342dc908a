/*
 * authorize: authorize mode (Proxy.Config authorization = "authorize"). The workers' questions
 * are answered from a short cache, joined to the same question already on its way, or asked
 * of the agent with POST /v1/agent/connect/authorize; an allow the intentions here refuse
 * is refused (refuse_stale_allow); re-checks of open connections whose answer still disagrees
 * with the intentions here are asked again a little later.
 */
#include "authorize.h"
#include "decode.h"
#include "log.h"
#include "spiffe.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>

#define AUTHORIZE_HTTP_MS 10000
#define RECHECK_RETRY_MS  500  /* a re-check the agent answered stale: ask again after */
#define RECHECK_ASKS      10   /* ...at most this many times in all */
#define AUTHZ_CACHE_MAX   1024 /* callers remembered at once; the oldest make room */
#define LOGGED_ONCE_MAX   32   /* callers a disagreement was logged for, per intention table */

/*
 * The callers one kind of disagreement with the agent was logged for under intention table
 * <gen>: the first time per caller at WARN or INFO, then at DEBUG, and past LOGGED_ONCE_MAX
 * callers at DEBUG too. A new table starts over.
 */
struct logged_once {
    char *uri[LOGGED_ONCE_MAX];
    size_t n;
    uint64_t gen;
};

/* One remembered answer of the agent for one caller. */
struct authz_entry {
    char *target, *uri;
    int allowed;
    char reason[256];
    uint64_t expires_ms;
};

/* A question the agent is answering now. */
struct authz_pending {
    struct authz_pending *next, *prev;
    struct authorize *az;
    struct authq_req *req;
    struct authq_req *waiters; /* the same question, asked again before the answer came */
    struct agent_req *areq;
    uint64_t asked_under; /* inputs_intents_gen() when the question left */
};

struct authorize {
    struct agent *agent;
    struct loop *loop;
    struct watch_reach *reach;
    const struct inputs *in;
    struct authz_pending *asking;
    /* re-checks of open connections whose answer disagreed with the intentions here: asked
     * again a little later, when the agent's copy has had time to catch up */
    struct authq_req *recheck_later;
    struct loop_timer recheck_timer;
    struct authz_entry *cache;
    size_t n_cache;
    struct logged_once vetoed;    /* callers whose allow the intentions here refused */
    struct logged_once overruled; /* callers the agent denied whom the intentions here allow */
};

static void authz_entry_dispose(struct authz_entry *e)
{
    free(e->target);
    free(e->uri);
}

void authorize_cache_clear(struct authorize *az)
{
    if (az->n_cache > 0)
        LOG_DEBUG("authorize cache: %zu answer(s) dropped", az->n_cache);
    for (size_t i = 0; i < az->n_cache; i++)
        authz_entry_dispose(&az->cache[i]);
    free(az->cache);
    az->cache = NULL;
    az->n_cache = 0;
}

static struct authz_entry *authz_cache_find(struct authorize *az, const struct authq_req *r)
{
    uint64_t now = util_now_ms();
    for (size_t i = 0; i < az->n_cache; i++) {
        struct authz_entry *e = &az->cache[i];
        if (e->expires_ms > now && strcmp(e->uri, r->client_uri) == 0 &&
            strcmp(e->target, r->target) == 0)
            return e;
    }
    return NULL;
}

static void authz_cache_put(struct authorize *az, const struct authq_req *r)
{
    uint64_t now = util_now_ms();
    size_t keep = 0;
    for (size_t i = 0; i < az->n_cache; i++) { /* drop expired entries and this caller's */
        struct authz_entry *e = &az->cache[i];
        if (e->expires_ms <= now ||
            (strcmp(e->uri, r->client_uri) == 0 && strcmp(e->target, r->target) == 0))
            authz_entry_dispose(e);
        else
            az->cache[keep++] = *e;
    }
    az->n_cache = keep;
    if (az->n_cache == AUTHZ_CACHE_MAX) { /* full of live entries: the oldest goes */
        authz_entry_dispose(&az->cache[0]);
        memmove(&az->cache[0], &az->cache[1], (az->n_cache - 1) * sizeof(az->cache[0]));
        az->n_cache--;
    }
    az->cache = xrealloc(az->cache, (az->n_cache + 1) * sizeof(*az->cache));
    struct authz_entry *e = &az->cache[az->n_cache++];
    e->target = xstrdup(r->target);
    e->uri = xstrdup(r->client_uri);
    e->allowed = r->allowed;
    snprintf(e->reason, sizeof(e->reason), "%s", r->reason);
    e->expires_ms = now + r->cache_ms;
}

/*
 * The agent answers /authorize from its own copy of the intentions, which reaches it by a
 * blocking query of its own and so may lag behind ours or run ahead of it. An answer is kept
 * only when the intentions did not change while it was asked (<asked_under> is still the
 * current generation) and the current table decides the same way: two views that disagree
 * mean one is stale, and a stale "allow" cached for authorize_cache_ms would outlive the deny
 * that replaced it. An answer that is not kept still decides its own connection, as the
 * agent's word; the next caller asks again.
 */
static int authz_agrees(const struct authorize *az, const struct authq_req *r)
{
    struct spiffe_id id;
    const struct intent_table *intents = inputs_intents(az->in);
    if (intents == NULL || spiffe_parse(r->client_uri, strlen(r->client_uri), &id) != 0 ||
        id.kind != SPIFFE_SERVICE)
        return -1;
    struct intent_decision d = intent_eval(intents, id.partition, id.ns, id.service);
    return d.allow == (r->allowed != 0);
}

static void logged_once_clear(struct logged_once *o)
{
    for (size_t i = 0; i < o->n; i++)
        free(o->uri[i]);
    o->n = 0;
}

/* Whether <uri> is to be logged above DEBUG: the first time under the current intentions. */
static int logged_first(struct authorize *az, struct logged_once *o, const char *uri)
{
    uint64_t gen = inputs_intents_gen(az->in);
    if (o->gen != gen) {
        logged_once_clear(o);
        o->gen = gen;
    }
    for (size_t i = 0; i < o->n; i++)
        if (strcmp(o->uri[i], uri) == 0)
            return 0;
    if (o->n == LOGGED_ONCE_MAX)
        return 0;
    o->uri[o->n++] = xstrdup(uri);
    return 1;
}

/*
 * The agent's allow of <r> is taken only when the intentions here do not refuse it. Its
 * answer comes from its own copy of the intentions (consul-api.md 2.3), which carries no
 * index and was seen to keep answering an allow for more than 15 s after the intention was
 * flipped to deny, while our blocking watch, which returns as soon as the agent's index
 * moves, already held the deny; re-asking and then taking its word let that stale allow
 * outlive the intention it was based on. So an intention here that denies the caller wins,
 * and so does our table when the agent allows by an intention it no longer has (or does
 * not have yet: then the deny lasts until our watch catches up, which fails closed). The
 * agent keeps the last word where the two disagree only about the default policy (no
 * intention matched on either side): that is what authorize mode follows, e.g. /authorize
 * allows with ACLs off even when acl.default_policy is deny (consul-api.md 2.4.5). Without a
 * table here (none yet) the agent's answer stands. Sets r->allowed to 0 and says why in
 * r->reason when the allow is refused; returns 1 then.
 */
static int refuse_stale_allow(struct authorize *az, struct authq_req *r)
{
    struct spiffe_id id;
    const struct intent_table *intents = inputs_intents(az->in);
    if (!r->allowed || intents == NULL ||
        spiffe_parse(r->client_uri, strlen(r->client_uri), &id) != 0 || id.kind != SPIFFE_SERVICE)
        return 0;
    struct intent_decision d = intent_eval(intents, id.partition, id.ns, id.service);
    int agent_matched = strncmp(r->reason, "Matched ", 8) == 0;
    if (d.allow || (d.matched == NULL && d.rule == NULL && !agent_matched))
        return 0;
    char here[300], agent_said[128];
    intent_describe(&d, here, sizeof(here));
    snprintf(agent_said, sizeof(agent_said), "%.127s", r->reason);
    if (logged_first(az, &az->vetoed, r->client_uri))
        LOG_WARN("authorize: the agent allows %s (\"%s\"), but the intentions here deny it "
                 "(%s); failing closed: its copy of the intentions lags behind",
                 LOG_ESC(r->client_uri), agent_said, here);
    else
        LOG_DEBUG("authorize: the agent's allow of %s refused again (%s)", r->client_uri, here);
    snprintf(r->reason, sizeof(r->reason), "%.150s here, over the agent's stale allow", here);
    r->allowed = 0;
    return 1;
}

/*
 * A re-check of an open connection that the agent answered differently from the intentions
 * here is asked again a little later rather than answered: a stale "allow" would otherwise
 * leave the connection open after the deny that should end it. New connections are answered
 * at once (they wait), as the agent's word.
 */
static void on_recheck_timer(struct loop_timer *t)
{
    struct authorize *az = t->data;
    struct authq_req *r = az->recheck_later;
    az->recheck_later = NULL;
    while (r != NULL) {
        struct authq_req *next = r->next;
        authorize_submit(az, r);
        r = next;
    }
}

static void recheck_later(struct authorize *az, struct authq_req *r)
{
    r->next = az->recheck_later;
    az->recheck_later = r;
    if (!loop_timer_armed(&az->recheck_timer))
        loop_timer_start(az->loop, &az->recheck_timer, RECHECK_RETRY_MS);
}

/* A re-check and the re-checks that joined it (<waiters>) wait together to be asked again. */
static void recheck_group_later(struct authorize *az, struct authq_req *r,
                                struct authq_req *waiters)
{
    while (waiters != NULL) {
        struct authq_req *w = waiters;
        waiters = w->next;
        recheck_later(az, w);
    }
    recheck_later(az, r);
}

static void on_authorized(void *data, const struct agent_response *resp)
{
    struct authz_pending *p = data;
    struct authorize *az = p->az;
    struct authq_req *r = p->req;
    uint64_t asked_under = p->asked_under;
    struct authq_req *waiters = p->waiters;
    char err[256];
    if (p->prev != NULL)
        p->prev->next = p->next;
    else
        az->asking = p->next;
    if (p->next != NULL)
        p->next->prev = p->prev;
    free(p);
    watch_reach_note(az->reach, resp);

    if (resp->status == 200 && decode_authorize(resp->body, resp->body_len, &r->allowed, r->reason,
                                                sizeof(r->reason), err, sizeof(err)) == 0) {
        refuse_stale_allow(az, r);
        int agrees = authz_agrees(az, r);
        if (r->recheck && agrees == 0 && r->asks < RECHECK_ASKS) {
            LOG_DEBUG("authorize: the agent's answer for %s (re-check) differs from the "
                      "intentions here; asking again in %d ms",
                      r->client_uri, RECHECK_RETRY_MS);
            recheck_group_later(az, r, waiters);
            return;
        }
        if (agrees == 0 && r->recheck)
            LOG_INFO("authorize: the agent still answers %s for %s after %u re-check(s), unlike "
                     "the intentions here; its answer is taken",
                     r->allowed ? "allow" : "deny", r->client_uri, r->asks);
        else if (agrees == 0 && !r->allowed && logged_first(az, &az->overruled, r->client_uri))
            LOG_INFO("authorize: the agent denies %s (\"%.127s\"), but the intentions here "
                     "allow it; its deny is taken and not cached (its copy of the intentions may "
                     "lag behind; logged once per caller until the intentions change)",
                     LOG_ESC(r->client_uri), r->reason);
        else if (agrees == 0)
            LOG_DEBUG("authorize: the agent's answer for %s differs from the intentions here; "
                      "not cached",
                      r->client_uri);
        if (r->cache_ms > 0 && asked_under == inputs_intents_gen(az->in) && agrees == 1)
            authz_cache_put(az, r);
        /* An allow the intentions here refuse admits its connection, but only until the two
         * views agree: the worker re-checks it at once, and the intention-change sweep, which
         * skipped it while it waited, never comes back for it. */
        r->disputed = !r->recheck && agrees == 0;
    } else {
        /* No answer means no for a new caller, who may try again; an open connection is not
         * cut for it: its re-check is asked again, and after the last try it stays. */
        r->allowed = 0;
        if (resp->status == 200)
            snprintf(r->reason, sizeof(r->reason), "unusable answer: %.200s", err);
        else if (resp->status != 0)
            snprintf(r->reason, sizeof(r->reason), "POST /v1/agent/connect/authorize: HTTP %ld%s",
                     resp->status, resp->status == 403 ? " (the token lacks service:write)" : "");
        else
            snprintf(r->reason, sizeof(r->reason),
                     "POST /v1/agent/connect/authorize: transport error: %s", resp->error);
        if (r->recheck && r->asks < RECHECK_ASKS) {
            recheck_group_later(az, r, waiters);
            return;
        }
        if (r->recheck) {
            LOG_WARN("authorize: no answer to the re-check of %s (%s); its connections stay "
                     "open",
                     r->client_uri, r->reason);
            r->allowed = 1;
        }
    }
    int shared = 0;
    while (waiters != NULL) {
        struct authq_req *w = waiters;
        waiters = w->next;
        w->allowed = r->allowed;
        w->disputed = r->disputed;
        snprintf(w->reason, sizeof(w->reason), "%s", r->reason);
        authq_box_post(w->reply, w);
        shared++;
    }
    if (shared > 0)
        LOG_DEBUG("authorize: the answer for %s also decided %d connection(s) that asked "
                  "meanwhile",
                  r->client_uri, shared);
    authq_box_post(r->reply, r);
}

/*
 * A question already on its way to the agent under the current intentions: a burst of
 * connections from one caller (or the same caller on many connections at once) makes one
 * request, not one each. NULL when there is none.
 */
static struct authz_pending *authz_asking(const struct authorize *az, const struct authq_req *r)
{
    for (struct authz_pending *p = az->asking; p != NULL; p = p->next)
        if (p->asked_under == inputs_intents_gen(az->in) && p->req->recheck == r->recheck &&
            strcmp(p->req->client_uri, r->client_uri) == 0 &&
            strcmp(p->req->target, r->target) == 0 &&
            strcmp(p->req->client_serial, r->client_serial) == 0)
            return p;
    return NULL;
}

/* Answers <r> from the cache, joins it to the same question on its way, or asks the agent. */
void authorize_submit(struct authorize *az, struct authq_req *r)
{
    const struct authz_entry *e = r->cache_ms > 0 ? authz_cache_find(az, r) : NULL;
    struct authz_pending *same = e == NULL ? authz_asking(az, r) : NULL;
    if (e != NULL) {
        r->allowed = e->allowed;
        snprintf(r->reason, sizeof(r->reason), "%.200s (cached)", e->reason);
        authq_box_post(r->reply, r);
    } else if (same != NULL) {
        r->next = same->waiters;
        same->waiters = r;
    } else {
        struct authz_pending *p = xcalloc(1, sizeof(*p));
        char *body = decode_authorize_request_json(r->target, r->client_uri, r->client_serial);
        r->asks++;
        p->az = az;
        p->req = r;
        p->asked_under = inputs_intents_gen(az->in);
        p->next = az->asking;
        if (p->next != NULL)
            p->next->prev = p;
        az->asking = p;
        /* The target is in the proxy's namespace and partition, as the intentions watch. */
        const char *scope = inputs_scope(az->in);
        char *path = xasprintf("/v1/agent/connect/authorize%s%s", scope[0] ? "?" : "",
                               scope[0] ? scope + 1 : "");
        p->areq = agent_request(az->agent, "POST", path, body, AUTHORIZE_HTTP_MS, on_authorized, p);
        free(path);
        free(body);
    }
}

struct authorize *authorize_new(struct agent *a, struct watch_reach *reach, const struct inputs *in)
{
    struct authorize *az = xcalloc(1, sizeof(*az));
    az->agent = a;
    az->loop = agent_loop(a);
    az->reach = reach;
    az->in = in;
    loop_timer_init(&az->recheck_timer, on_recheck_timer, az);
    return az;
}

void authorize_free(struct authorize *az)
{
    if (az == NULL)
        return;
    while (az->asking != NULL) { /* the workers are gone: nobody waits for these answers */
        struct authz_pending *p = az->asking;
        az->asking = p->next;
        agent_cancel(p->areq);
        authq_req_free(p->req);
        while (p->waiters != NULL) {
            struct authq_req *w = p->waiters;
            p->waiters = w->next;
            authq_req_free(w);
        }
        free(p);
    }
    loop_timer_stop(az->loop, &az->recheck_timer);
    logged_once_clear(&az->vetoed);
    logged_once_clear(&az->overruled);
    while (az->recheck_later != NULL) {
        struct authq_req *r = az->recheck_later;
        az->recheck_later = r->next;
        authq_req_free(r);
    }
    authorize_cache_clear(az);
    free(az);
}
