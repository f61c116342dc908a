/*
 * register: -register. The proxy registers itself as an unmanaged connect-proxy with a TTL
 * check, passes the check every HEARTBEAT_MS (registering again when the agent answers 404)
 * and deregisters when asked to leave.
 */
#include "register.h"
#include "decode.h"
#include "log.h"
#include "util.h"

#include <stdlib.h>

#define HEARTBEAT_MS  10000 /* TTL check pass, well inside its 30 s TTL */
#define CHECK_TTL     "30s"
#define DEREGISTER_MS 5000

struct register_ctx {
    struct agent *agent;
    struct loop *loop;
    struct watch_reach *reach;
    char *proxy_id;
    char *reg_body;
    char *check_id;
    int registered;
    struct agent_req *reg_req;
    struct loop_timer heartbeat;
    void (*done)(void *data);
    void *done_data;
};

static void on_register(void *data, const struct agent_response *resp)
{
    struct register_ctx *r = data;
    r->reg_req = NULL;
    watch_reach_note(r->reach, resp);
    if (resp->status == 200) {
        r->registered = 1;
        LOG_INFO("registered %s with the agent", r->proxy_id);
    } else {
        LOG_ERROR("registering %s: PUT /v1/agent/service/register answered %s%ld%s%.200s; "
                  "retrying in %d s",
                  r->proxy_id, resp->status ? "HTTP " : "", resp->status, resp->status ? ": " : " ",
                  resp->status ? resp->body : resp->error, HEARTBEAT_MS / 1000);
    }
}

static void put_registration(struct register_ctx *r)
{
    r->reg_req = agent_request(r->agent, "PUT", "/v1/agent/service/register", r->reg_body, 30000,
                               on_register, r);
}

static void on_pass(void *data, const struct agent_response *resp)
{
    struct register_ctx *r = data;
    r->reg_req = NULL;
    watch_reach_note(r->reach, resp);
    if (resp->status == 404) {
        /* The agent lost us (a restart of a dev agent, a deregistration): register again. */
        LOG_WARN("the agent no longer knows %s; registering it again", r->proxy_id);
        r->registered = 0;
        put_registration(r);
    } else if (resp->status != 200) {
        LOG_DEBUG("heartbeat of %s answered %ld", r->check_id, resp->status);
    }
}

static void on_heartbeat(struct loop_timer *t)
{
    struct register_ctx *r = t->data;
    loop_timer_start(r->loop, &r->heartbeat, HEARTBEAT_MS);
    if (r->reg_req != NULL)
        return;
    if (!r->registered) {
        put_registration(r);
        return;
    }
    char *esc = util_url_escape(r->check_id);
    char *path = xasprintf("/v1/agent/check/pass/%s", esc);
    r->reg_req = agent_request(r->agent, "PUT", path, NULL, 30000, on_pass, r);
    free(path);
    free(esc);
}

static void on_deregister(void *data, const struct agent_response *resp)
{
    struct register_ctx *r = data;
    r->reg_req = NULL;
    if (resp->status == 200)
        LOG_INFO("deregistered %s", r->proxy_id);
    else
        LOG_WARN("deregistering %s answered %s%ld%s", r->proxy_id,
                 resp->status ? "HTTP " : "transport error ", resp->status,
                 resp->status ? "" : resp->error);
    r->done(r->done_data);
}

struct register_ctx *register_start(struct agent *a, struct watch_reach *reach,
                                    const struct proxy_cfg *c, const char *proxy_id,
                                    void (*done)(void *data), void *data)
{
    struct register_ctx *r = xcalloc(1, sizeof(*r));
    r->agent = a;
    r->loop = agent_loop(a);
    r->reach = reach;
    r->done = done;
    r->done_data = data;
    r->proxy_id = xstrdup(proxy_id);
    loop_timer_init(&r->heartbeat, on_heartbeat, r);
    char *name = xasprintf("%s-proxy", c->service);
    r->check_id = xasprintf("%s-ttl", r->proxy_id);
    struct dec_proxy_registration reg = {
        .id = r->proxy_id,
        .name = name,
        .address = c->bind_address,
        .port = c->bind_port,
        .destination_service_name = c->service,
        .local_service_address = c->local_address,
        .local_service_port = c->local_port,
        .check_id = r->check_id,
        .check_name = "proxy heartbeat",
        .check_ttl = CHECK_TTL,
    };
    r->reg_body = decode_proxy_registration_json(&reg);
    free(name);
    loop_timer_start(r->loop, &r->heartbeat, HEARTBEAT_MS);
    put_registration(r);
    return r;
}

void register_leave(struct register_ctx *r)
{
    /* Deregister while the drain runs (a second signal does not wait). */
    loop_timer_stop(r->loop, &r->heartbeat);
    if (r->reg_req != NULL)
        agent_cancel(r->reg_req);
    char *esc = util_url_escape(r->proxy_id);
    char *path = xasprintf("/v1/agent/service/deregister/%s", esc);
    r->reg_req = agent_request(r->agent, "PUT", path, NULL, DEREGISTER_MS, on_deregister, r);
    free(path);
    free(esc);
}

int register_busy(const struct register_ctx *r)
{
    return r != NULL && r->reg_req != NULL;
}

void register_free(struct register_ctx *r)
{
    if (r == NULL)
        return;
    if (r->reg_req != NULL)
        agent_cancel(r->reg_req);
    loop_timer_stop(r->loop, &r->heartbeat);
    free(r->proxy_id);
    free(r->reg_body);
    free(r->check_id);
    free(r);
}
