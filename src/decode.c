/*
 * decode: the agent's JSON into plain structures, with jansson (the only file that includes it).
 *
 * Every decoder parses the whole body into a jansson tree, copies what it needs and drops the
 * tree. Partial results are built in place in the caller's structure; on any error the matching
 * dispose function runs on that half-built structure, which is why every array is allocated
 * zeroed with its count set before it is filled, and why the dispose functions accept NULL
 * members.
 *
 * Validation is strict about types (a string where a number belongs is an error naming the
 * field) and lenient about presence: null and absent mean the same thing, because Go renders
 * empty maps and slices either way depending on omitempty (consul-api.md 1.6).
 *
 * jansson allocates through malloc but frees through util_wipe_free_block(): the leaf's body
 * puts the private key in the parser's buffers and in the tree's strings, and jansson's free
 * carries no size, so each freed block is wiped over its whole usable size. The allocator is
 * process-wide and set once, before this file's first call into jansson.
 */
#include "decode.h"

#include <jansson.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/*
 * Caps for flattening Proxy.Config maps. The agent's body is already size-capped, but a deep or
 * long-keyed map would otherwise cost time quadratic in its size; real keys are short and at
 * most a couple of levels deep.
 */
#define KEY_MAX   1024
#define DEPTH_MAX 32

#define CONNECT_PROXY "connect-proxy"

struct dctx {
    char *err;
    size_t errlen;
};

static int fail(struct dctx *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void err_append(struct dctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Fills the caller's message buffer, if any, and returns <code>. */
static int fail(struct dctx *c, int code, const char *fmt, ...)
{
    if (c->err != NULL && c->errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, c->errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* "Proxy.Upstreams[1]" + "LocalBindPort" -> "Proxy.Upstreams[1].LocalBindPort must be ...". */
static int bad_field(struct dctx *c, const char *where, const char *key, const char *what)
{
    const char *dot = where[0] != '\0' && key[0] != '\0' ? "." : "";
    return fail(c, ERR_BAD_FIELD, "%s%s%s %s", where, dot, key, what);
}

static void ctx_init(struct dctx *c, char *err, size_t errlen)
{
    c->err = err;
    c->errlen = errlen;
    if (err != NULL && errlen > 0)
        err[0] = '\0';
}

static pthread_once_t alloc_once = PTHREAD_ONCE_INIT;

static void set_alloc(void)
{
    json_set_alloc_funcs(malloc, util_wipe_free_block);
}

/* Called before anything that makes jansson allocate. */
static void use_wiping_alloc(void)
{
    pthread_once(&alloc_once, set_alloc);
}

static int load(struct dctx *c, const char *buf, size_t len, json_t **root)
{
    json_error_t je;
    *root = NULL;
    use_wiping_alloc();
    if (buf == NULL)
        return fail(c, ERR_BAD_JSON, "no response body");
    /*
     * Duplicate keys are refused: Go never sends them, and two readers could disagree. Any
     * top-level value is parsed so a bare null or number is reported as the wrong shape.
     */
    *root = json_loadb(buf, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    /*
     * jansson refuses integers beyond long long, but Go emits uint64 fields (a CA root's
     * SerialNumber often exceeds INT64_MAX). Parse such a body again with every integer as a
     * double; get_int() accepts integral doubles, and no field we use needs more precision.
     */
    if (*root == NULL && strstr(je.text, "too big") != NULL)
        *root = json_loadb(buf, len,
                           JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_DECODE_INT_AS_REAL, &je);
    if (*root == NULL)
        return fail(c, ERR_BAD_JSON, "line %d column %d: %s", je.line, je.column, je.text);
    return 0;
}

/* Looks up <key>, treating null as absent. <obj> may be NULL (a block that was absent). */
static json_t *member(json_t *obj, const char *key)
{
    json_t *v = obj != NULL ? json_object_get(obj, key) : NULL;
    return v != NULL && !json_is_null(v) ? v : NULL;
}

/* Points *dst into the tree (valid until it is released); "" when absent. */
static int peek_str(struct dctx *c, json_t *obj, const char *key, int required, const char *where,
                    const char **dst)
{
    json_t *v = member(obj, key);
    *dst = "";
    if (v == NULL)
        return required ? bad_field(c, where, key, "is missing") : 0;
    if (!json_is_string(v))
        return bad_field(c, where, key, "must be a string");
    *dst = json_string_value(v);
    if (required && (*dst)[0] == '\0')
        return bad_field(c, where, key, "must not be empty");
    return 0;
}

/* Copies a string member into a fresh allocation; "" when absent and optional. */
static int get_str(struct dctx *c, json_t *obj, const char *key, int required, const char *where,
                   char **dst)
{
    const char *s;
    int rc = peek_str(c, obj, key, required, where, &s);
    if (rc == 0)
        *dst = xstrdup(s);
    return rc;
}

static int get_int(struct dctx *c, json_t *obj, const char *key, int required, json_int_t min,
                   json_int_t max, const char *where, int *dst)
{
    json_t *v = member(obj, key);
    *dst = 0;
    if (v == NULL)
        return required ? bad_field(c, where, key, "is missing") : 0;
    json_int_t iv = 0;
    int ok = 0;
    if (json_is_integer(v)) {
        iv = json_integer_value(v);
        ok = 1;
    } else if (json_is_real(v)) {
        /* Range first: converting an out-of-range double to an integer is undefined. */
        double d = json_real_value(v);
        ok = d >= (double)min && d <= (double)max && d == (double)(json_int_t)d;
        iv = ok ? (json_int_t)d : 0;
    }
    if (!ok || iv < min || iv > max) {
        char what[96];
        snprintf(what, sizeof(what),
                 "must be an integer in [%" JSON_INTEGER_FORMAT ", %" JSON_INTEGER_FORMAT "]", min,
                 max);
        return bad_field(c, where, key, what);
    }
    *dst = (int)iv;
    return 0;
}

static int get_bool(struct dctx *c, json_t *obj, const char *key, const char *where, int *dst)
{
    json_t *v = member(obj, key);
    *dst = 0;
    if (v == NULL)
        return 0;
    if (!json_is_boolean(v))
        return bad_field(c, where, key, "must be true or false");
    *dst = json_is_true(v);
    return 0;
}

/* An optional (or required) object member; *dst is NULL when absent or null. */
static int get_obj(struct dctx *c, json_t *obj, const char *key, int required, const char *where,
                   json_t **dst)
{
    *dst = member(obj, key);
    if (*dst == NULL)
        return required ? bad_field(c, where, key, "is missing") : 0;
    if (!json_is_object(*dst))
        return bad_field(c, where, key, "must be an object");
    return 0;
}

static int get_arr(struct dctx *c, json_t *obj, const char *key, int required, const char *where,
                   json_t **dst)
{
    *dst = member(obj, key);
    if (*dst == NULL)
        return required ? bad_field(c, where, key, "is missing") : 0;
    if (!json_is_array(*dst))
        return bad_field(c, where, key, "must be an array");
    return 0;
}

/*
 * String members described by table: key, offset of the char * in the destination structure,
 * and whether it must be present and non-empty.
 */
struct str_field {
    const char *key;
    size_t off;
    int required;
};

#define SF(type, key, member, req)                                                                 \
    {                                                                                              \
        key, offsetof(type, member), req                                                           \
    }

static int get_strs(struct dctx *c, json_t *obj, const char *where, const struct str_field *f,
                    size_t n, void *base)
{
    for (size_t i = 0; i < n; i++) {
        char **dst = (char **)(void *)((char *)base + f[i].off);
        int rc = get_str(c, obj, f[i].key, f[i].required, where, dst);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Frees the strings <f> names in <base>: the other half of get_strs, so a field is listed once. */
static void free_strs(const struct str_field *f, size_t n, void *base)
{
    for (size_t i = 0; i < n; i++)
        free(*(char **)(void *)((char *)base + f[i].off));
}

/* ---- config maps ---- */

struct kv_vec {
    struct dec_kv *v;
    size_t n, cap;
};

static struct dec_kv *kv_push(struct kv_vec *kv, const char *key, size_t klen)
{
    if (kv->n == kv->cap) {
        kv->cap = kv->cap != 0 ? kv->cap * 2 : 8;
        kv->v = xrealloc(kv->v, kv->cap * sizeof(*kv->v));
    }
    struct dec_kv *e = &kv->v[kv->n++];
    memset(e, 0, sizeof(*e));
    e->key = xstrndup(key, klen);
    return e;
}

/*
 * The text of a JSON real. jansson keeps only the double, so this prints the shortest form that
 * reads back as the same double, and integral values without an exponent ("5", "1000"), which
 * is how Go prints the float64s that central config passes through.
 */
static char *real_text(double d)
{
    char buf[40];
    /* Range first: converting an out-of-range double to an integer is undefined. */
    if (d > -1e15 && d < 1e15 && d == (double)(long long)d) {
        snprintf(buf, sizeof(buf), "%.0f", d);
        return xstrdup(buf);
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof(buf), "%.*g", prec, d);
        if (strtod(buf, NULL) == d)
            break;
    }
    return xstrdup(buf);
}

static void kv_set(struct dec_kv *e, json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_STRING:
        e->type = DEC_KV_STRING;
        e->str = xstrdup(json_string_value(v));
        return;
    case JSON_INTEGER:
        e->type = DEC_KV_NUMBER;
        e->num = (double)json_integer_value(v);
        e->str = xasprintf("%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return;
    case JSON_REAL:
        e->type = DEC_KV_NUMBER;
        e->num = json_real_value(v);
        e->str = real_text(e->num);
        return;
    case JSON_TRUE:
    case JSON_FALSE:
        e->type = DEC_KV_BOOL;
        e->boolean = json_is_true(v);
        break;
    case JSON_NULL:
        e->type = DEC_KV_NULL;
        break;
    default:
        e->type = DEC_KV_OTHER;
        break;
    }
    e->str = xstrdup("");
}

/* Appends the leaves of <obj> under the dotted prefix path[0..plen). */
static int flatten(struct dctx *c, json_t *obj, char *path, size_t plen, int depth,
                   struct kv_vec *kv, const char *where)
{
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v)
    {
        size_t klen = strlen(key);
        size_t at = plen != 0 ? plen + 1 : 0;
        if (at + klen > KEY_MAX)
            return fail(c, ERR_BAD_FIELD, "%s: key \"%.40s...\" is longer than %d bytes", where,
                        plen != 0 ? path : key, KEY_MAX);
        if (plen != 0)
            path[plen] = '.';
        memcpy(path + at, key, klen);
        path[at + klen] = '\0';
        if (json_is_object(v)) {
            if (depth >= DEPTH_MAX)
                return fail(c, ERR_BAD_FIELD, "%s: key \"%.40s...\" nests deeper than %d levels",
                            where, path, DEPTH_MAX);
            int rc = flatten(c, v, path, at + klen, depth + 1, kv, where);
            if (rc != 0)
                return rc;
        } else {
            kv_set(kv_push(kv, path, at + klen), v);
        }
    }
    return 0;
}

static int get_config(struct dctx *c, json_t *obj, const char *where, struct dec_kv **out,
                      size_t *n)
{
    json_t *m;
    char path[KEY_MAX + 1];
    struct kv_vec kv = {NULL, 0, 0};
    int rc = get_obj(c, obj, "Config", 0, where, &m);
    if (rc == 0 && m != NULL) {
        char name[256];
        snprintf(name, sizeof(name), "%s%sConfig", where, where[0] != '\0' ? "." : "");
        rc = flatten(c, m, path, 0, 1, &kv, name);
    }
    /* Hand over even on failure so the caller's dispose frees what was built. */
    *out = kv.v;
    *n = kv.n;
    return rc;
}

void dec_kv_free(struct dec_kv *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(v[i].key);
        free(v[i].str);
    }
    free(v);
}

/* ---- /v1/agent/connect/ca/roots ---- */

static const struct str_field roots_fields[] = {
    SF(struct dec_roots, "ActiveRootID", active_root_id, 0),
    SF(struct dec_roots, "TrustDomain", trust_domain, 1),
};

static const struct str_field root_fields[] = {
    SF(struct dec_root, "ID", id, 0),
    SF(struct dec_root, "Name", name, 0),
    SF(struct dec_root, "RootCert", root_cert_pem, 1),
};

int decode_roots(const char *buf, size_t len, struct dec_roots *out, char *err, size_t errlen)
{
    struct dctx c;
    json_t *root, *arr;
    ctx_init(&c, err, errlen);
    memset(out, 0, sizeof(*out));
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "roots: the body must be a JSON object");
        goto out;
    }
    rc = get_strs(&c, root, "", roots_fields, ARRAY_SIZE(roots_fields), out);
    if (rc == 0)
        rc = get_arr(&c, root, "Roots", 1, "", &arr);
    if (rc != 0)
        goto out;
    if (json_array_size(arr) == 0) {
        rc = fail(&c, ERR_BAD_FIELD, "Roots must not be empty");
        goto out;
    }
    out->n_roots = json_array_size(arr);
    out->roots = xcalloc(out->n_roots, sizeof(*out->roots));
    for (size_t i = 0; i < out->n_roots && rc == 0; i++) {
        json_t *r = json_array_get(arr, i);
        char where[48];
        snprintf(where, sizeof(where), "Roots[%zu]", i);
        if (!json_is_object(r)) {
            rc = bad_field(&c, where, "", "must be an object");
            break;
        }
        rc = get_strs(&c, r, where, root_fields, ARRAY_SIZE(root_fields), &out->roots[i]);
        if (rc == 0)
            rc = get_bool(&c, r, "Active", where, &out->roots[i].active);
    }
out:
    json_decref(root);
    if (rc != 0)
        dec_roots_dispose(out);
    return rc;
}

void dec_roots_dispose(struct dec_roots *r)
{
    free_strs(roots_fields, ARRAY_SIZE(roots_fields), r);
    for (size_t i = 0; i < r->n_roots; i++)
        free_strs(root_fields, ARRAY_SIZE(root_fields), &r->roots[i]);
    free(r->roots);
    memset(r, 0, sizeof(*r));
}

/* ---- /v1/agent/connect/ca/leaf/<service> ---- */

static const struct str_field leaf_fields[] = {
    SF(struct dec_leaf, "SerialNumber", serial, 0),
    SF(struct dec_leaf, "CertPEM", cert_pem, 1),
    SF(struct dec_leaf, "PrivateKeyPEM", key_pem, 1),
    SF(struct dec_leaf, "Service", service, 0),
    SF(struct dec_leaf, "ServiceURI", service_uri, 0),
    SF(struct dec_leaf, "ValidAfter", valid_after, 0),
    SF(struct dec_leaf, "ValidBefore", valid_before, 0),
};

int decode_leaf(const char *buf, size_t len, struct dec_leaf *out, char *err, size_t errlen)
{
    struct dctx c;
    json_t *root;
    ctx_init(&c, err, errlen);
    memset(out, 0, sizeof(*out));
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root))
        rc = fail(&c, ERR_BAD_FIELD, "leaf: the body must be a JSON object");
    else
        rc = get_strs(&c, root, "", leaf_fields, ARRAY_SIZE(leaf_fields), out);
    /* The tree's copy of the private key, like the parser's, is wiped as jansson frees it. */
    json_decref(root);
    if (rc != 0)
        dec_leaf_dispose(out);
    return rc;
}

void dec_leaf_dispose(struct dec_leaf *l)
{
    if (l->key_pem != NULL)
        explicit_bzero(l->key_pem, strlen(l->key_pem));
    free_strs(leaf_fields, ARRAY_SIZE(leaf_fields), l);
    memset(l, 0, sizeof(*l));
}

/* ---- /v1/agent/service/<id> ---- */

static const struct str_field service_fields[] = {
    SF(struct dec_service, "Kind", kind, 0),
    SF(struct dec_service, "ID", id, 1),
    SF(struct dec_service, "Service", service, 1),
    SF(struct dec_service, "Address", address, 0),
    SF(struct dec_service, "SocketPath", socket_path, 0),
    SF(struct dec_service, "Datacenter", datacenter, 0),
    SF(struct dec_service, "Namespace", ns, 0),
    SF(struct dec_service, "Partition", partition, 0),
    SF(struct dec_service, "ContentHash", content_hash, 0),
};

/* Read from the Proxy block, which may be absent: then they are all "". */
static const struct str_field proxy_fields[] = {
    SF(struct dec_service, "DestinationServiceName", destination_service_name, 0),
    SF(struct dec_service, "DestinationServiceID", destination_service_id, 0),
    SF(struct dec_service, "LocalServiceAddress", local_service_address, 0),
    SF(struct dec_service, "LocalServiceSocketPath", local_service_socket_path, 0),
    SF(struct dec_service, "Mode", mode, 0),
};

static const struct str_field upstream_fields[] = {
    SF(struct dec_upstream, "DestinationType", destination_type, 0),
    SF(struct dec_upstream, "DestinationName", destination_name, 1),
    SF(struct dec_upstream, "DestinationNamespace", destination_namespace, 0),
    SF(struct dec_upstream, "DestinationPartition", destination_partition, 0),
    SF(struct dec_upstream, "DestinationPeer", destination_peer, 0),
    SF(struct dec_upstream, "Datacenter", datacenter, 0),
    SF(struct dec_upstream, "LocalBindAddress", local_bind_address, 0),
    SF(struct dec_upstream, "LocalBindSocketPath", local_bind_socket_path, 0),
    SF(struct dec_upstream, "LocalBindSocketMode", local_bind_socket_mode, 0),
};

static int decode_upstream(struct dctx *c, json_t *u, const char *where, struct dec_upstream *out)
{
    if (!json_is_object(u))
        return bad_field(c, where, "", "must be an object");
    int rc = get_strs(c, u, where, upstream_fields, ARRAY_SIZE(upstream_fields), out);
    if (rc == 0 && out->destination_type[0] == '\0') {
        free(out->destination_type);
        out->destination_type = xstrdup("service");
    }
    if (rc == 0)
        rc = get_int(c, u, "LocalBindPort", 0, 0, 65535, where, &out->local_bind_port);
    if (rc == 0)
        rc = get_config(c, u, where, &out->config, &out->n_config);
    return rc;
}

static const struct str_field expose_path_fields[] = {
    SF(struct dec_expose_path, "Path", path, 0),
    SF(struct dec_expose_path, "Protocol", protocol, 0),
};

/* Proxy.Expose: {"Checks": bool, "Paths": [{ListenerPort, LocalPathPort, Path, Protocol}]}. */
static int decode_expose(struct dctx *c, json_t *proxy, struct dec_service *out)
{
    json_t *expose, *paths = NULL;
    int rc = get_obj(c, proxy, "Expose", 0, "Proxy", &expose);
    if (rc == 0)
        rc = get_bool(c, expose, "Checks", "Proxy.Expose", &out->expose_checks);
    if (rc == 0)
        rc = get_arr(c, expose, "Paths", 0, "Proxy.Expose", &paths);
    if (rc != 0 || paths == NULL)
        return rc;
    if (json_array_size(paths) > DEC_EXPOSE_PATHS_MAX)
        return fail(c, ERR_BAD_FIELD, "Proxy.Expose.Paths has more than %d entries",
                    DEC_EXPOSE_PATHS_MAX);
    out->n_expose_paths = json_array_size(paths);
    out->expose_paths = xcalloc(out->n_expose_paths, sizeof(*out->expose_paths));
    for (size_t i = 0; i < out->n_expose_paths && rc == 0; i++) {
        struct dec_expose_path *p = &out->expose_paths[i];
        json_t *v = json_array_get(paths, i);
        char where[48];
        snprintf(where, sizeof(where), "Proxy.Expose.Paths[%zu]", i);
        if (!json_is_object(v))
            return bad_field(c, where, "", "must be an object");
        rc = get_strs(c, v, where, expose_path_fields, ARRAY_SIZE(expose_path_fields), p);
        if (rc == 0 && strlen(p->path) > DEC_EXPOSE_PATH_MAX)
            rc = bad_field(c, where, "Path", "is longer than 1024 bytes");
        if (rc == 0)
            rc = get_int(c, v, "ListenerPort", 0, 0, 65535, where, &p->listener_port);
        if (rc == 0)
            rc = get_int(c, v, "LocalPathPort", 0, 0, 65535, where, &p->local_path_port);
    }
    return rc;
}

int decode_agent_service(const char *buf, size_t len, struct dec_service *out, char *err,
                         size_t errlen)
{
    struct dctx c;
    json_t *root, *proxy = NULL, *ups = NULL;
    ctx_init(&c, err, errlen);
    memset(out, 0, sizeof(*out));
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "service: the body must be a JSON object");
        goto out;
    }
    rc = get_strs(&c, root, "", service_fields, ARRAY_SIZE(service_fields), out);
    if (rc == 0)
        rc = get_int(&c, root, "Port", 0, 0, 65535, "", &out->port);
    if (rc == 0)
        rc = get_obj(&c, root, "Proxy", 0, "", &proxy);
    if (rc == 0)
        rc = get_strs(&c, proxy, "Proxy", proxy_fields, ARRAY_SIZE(proxy_fields), out);
    if (rc == 0)
        rc = get_int(&c, proxy, "LocalServicePort", 0, 0, 65535, "Proxy", &out->local_service_port);
    if (rc == 0)
        rc = get_config(&c, proxy, "Proxy", &out->config, &out->n_config);
    if (rc == 0)
        rc = decode_expose(&c, proxy, out);
    if (rc == 0)
        rc = get_arr(&c, proxy, "Upstreams", 0, "Proxy", &ups);
    if (rc != 0 || ups == NULL)
        goto out;
    out->n_upstreams = json_array_size(ups);
    out->upstreams = xcalloc(out->n_upstreams, sizeof(*out->upstreams));
    for (size_t i = 0; i < out->n_upstreams && rc == 0; i++) {
        char where[48];
        snprintf(where, sizeof(where), "Proxy.Upstreams[%zu]", i);
        rc = decode_upstream(&c, json_array_get(ups, i), where, &out->upstreams[i]);
    }
out:
    json_decref(root);
    if (rc != 0)
        dec_service_dispose(out);
    return rc;
}

static void upstream_dispose(struct dec_upstream *u)
{
    free_strs(upstream_fields, ARRAY_SIZE(upstream_fields), u);
    dec_kv_free(u->config, u->n_config);
}

void dec_service_dispose(struct dec_service *s)
{
    free_strs(service_fields, ARRAY_SIZE(service_fields), s);
    free_strs(proxy_fields, ARRAY_SIZE(proxy_fields), s);
    dec_kv_free(s->config, s->n_config);
    for (size_t i = 0; i < s->n_upstreams; i++)
        upstream_dispose(&s->upstreams[i]);
    free(s->upstreams);
    for (size_t i = 0; i < s->n_expose_paths; i++)
        free_strs(expose_path_fields, ARRAY_SIZE(expose_path_fields), &s->expose_paths[i]);
    free(s->expose_paths);
    memset(s, 0, sizeof(*s));
}

/* ---- /v1/agent/checks ---- */

static const struct str_field check_fields[] = {
    SF(struct dec_check, "CheckID", check_id, 1), SF(struct dec_check, "ServiceID", service_id, 0),
    SF(struct dec_check, "Type", type, 0),        SF(struct dec_check, "Status", status, 0),
    SF(struct dec_check, "Output", output, 0),
};

int decode_agent_checks(const char *buf, size_t len, const char *service_id, struct dec_check **out,
                        size_t *n, char *err, size_t errlen)
{
    struct dctx c;
    json_t *root, *chk;
    const char *key;
    ctx_init(&c, err, errlen);
    *out = NULL;
    *n = 0;
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "checks: the body must be a JSON object");
        goto out;
    }
    if (json_object_size(root) > DEC_CHECKS_MAX) {
        rc = fail(&c, ERR_BAD_FIELD, "checks: more than %d checks", DEC_CHECKS_MAX);
        goto out;
    }
    *out = xcalloc(json_object_size(root) + 1, sizeof(**out));
    json_object_foreach(root, key, chk)
    {
        char where[96];
        const char *sid;
        snprintf(where, sizeof(where), "checks[\"%.64s\"]", key);
        if (!json_is_object(chk)) {
            rc = bad_field(&c, where, "", "must be an object");
            goto out;
        }
        if ((rc = peek_str(&c, chk, "ServiceID", 0, where, &sid)) != 0)
            goto out;
        if (strcmp(sid, service_id) != 0)
            continue;
        struct dec_check *d = &(*out)[(*n)++];
        rc = get_strs(&c, chk, where, check_fields, ARRAY_SIZE(check_fields), d);
        if (rc == 0)
            rc = get_int(&c, chk, "ExposedPort", 0, 0, 65535, where, &d->exposed_port);
        if (rc != 0)
            goto out;
    }
out:
    json_decref(root);
    if (rc != 0) {
        dec_checks_free(*out, *n);
        *out = NULL;
        *n = 0;
    }
    return rc;
}

void dec_checks_free(struct dec_check *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free_strs(check_fields, ARRAY_SIZE(check_fields), &v[i]);
    free(v);
}

/* ---- /v1/agent/services: -sidecar-for ---- */

/* Consul lowercases the registered ID only (consul-api.md 2.6); so do we, ASCII only. */
static int lower_equal(const char *registered, const char *want)
{
    for (; *registered != '\0' && *want != '\0'; registered++, want++) {
        char r = *registered;
        if (r >= 'A' && r <= 'Z')
            r = (char)(r - 'A' + 'a');
        if (r != *want)
            return 0;
    }
    return *registered == *want;
}

/* Appends to c->err without overflowing it. */
static void err_append(struct dctx *c, const char *fmt, ...)
{
    if (c->err == NULL || c->errlen == 0)
        return;
    size_t used = strnlen(c->err, c->errlen);
    if (used + 1 >= c->errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err + used, c->errlen - used, fmt, ap);
    va_end(ap);
}

int decode_sidecar_for(const char *buf, size_t len, const char *target_id, char **proxy_id,
                       char *err, size_t errlen)
{
    struct dctx c;
    json_t *root, *svc;
    const char *key, **ids = NULL;
    size_t n = 0;
    ctx_init(&c, err, errlen);
    *proxy_id = NULL;
    if (target_id == NULL)
        return fail(&c, -EINVAL, "no service ID to find a sidecar for");
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "services: the body must be a JSON object");
        goto out;
    }
    ids = xcalloc(json_object_size(root), sizeof(*ids));
    json_object_foreach(root, key, svc)
    {
        const char *kind, *dest, *id;
        json_t *proxy;
        char where[96], pwhere[112];
        snprintf(where, sizeof(where), "services[\"%.64s\"]", key);
        snprintf(pwhere, sizeof(pwhere), "%s.Proxy", where);
        if (!json_is_object(svc)) {
            rc = bad_field(&c, where, "", "must be an object");
            goto out;
        }
        if ((rc = peek_str(&c, svc, "Kind", 0, where, &kind)) != 0 ||
            (rc = peek_str(&c, svc, "ID", 0, where, &id)) != 0 ||
            (rc = get_obj(&c, svc, "Proxy", 0, where, &proxy)) != 0)
            goto out;
        if (strcmp(kind, CONNECT_PROXY) != 0 || proxy == NULL)
            continue;
        if ((rc = peek_str(&c, proxy, "DestinationServiceID", 0, pwhere, &dest)) != 0)
            goto out;
        if (lower_equal(dest, target_id))
            ids[n++] = id[0] != '\0' ? id : key;
    }
    if (n == 0) {
        rc = fail(&c, -ENOENT, "no sidecar proxy registered for \"%s\"", target_id);
    } else if (n > 1) {
        rc = fail(&c, -EEXIST, "more than one sidecar proxy registered for \"%s\":", target_id);
        for (size_t i = 0; i < n; i++)
            err_append(&c, "%s \"%s\"", i == 0 ? "" : ",", ids[i]);
    } else {
        *proxy_id = xstrdup(ids[0]);
    }
out:
    free(ids);
    json_decref(root);
    return rc;
}

/* ---- /v1/connect/intentions/match ---- */

static const struct str_field intention_fields[] = {
    SF(struct dec_intention, "ID", id, 0),
    SF(struct dec_intention, "Description", description, 0),
    SF(struct dec_intention, "SourcePeer", source_peer, 0),
    SF(struct dec_intention, "SourceSamenessGroup", source_sameness_group, 0),
    SF(struct dec_intention, "SourcePartition", source_partition, 0),
    SF(struct dec_intention, "SourceNS", source_ns, 0),
    SF(struct dec_intention, "SourceName", source_name, 1),
    SF(struct dec_intention, "DestinationNS", destination_ns, 0),
    SF(struct dec_intention, "DestinationName", destination_name, 1),
    SF(struct dec_intention, "Action", action, 0),
};

/*
 * A bounded string of a permission: a string of at most DEC_PERM_STR_MAX bytes without NUL
 * (a C string could not carry it, and a condition that silently lost its tail would match
 * more than was written). *dst is a fresh copy, "" when absent.
 */
static int get_perm_str(struct dctx *c, json_t *obj, const char *key, const char *where, char **dst)
{
    json_t *v = member(obj, key);
    *dst = NULL;
    if (v == NULL) {
        *dst = xstrdup("");
        return 0;
    }
    if (!json_is_string(v))
        return bad_field(c, where, key, "must be a string");
    size_t len = json_string_length(v);
    if (len > DEC_PERM_STR_MAX)
        return bad_field(c, where, key, "is too long");
    if (memchr(json_string_value(v), '\0', len) != NULL)
        return bad_field(c, where, key, "must not hold a NUL byte");
    *dst = xstrdup(json_string_value(v));
    return 0;
}

/* A header condition's match kinds, in Consul's order; Present is a boolean, the rest strings
 * of which an empty one counts as unset (Go's omitempty). */
static const char *const header_kinds[] = {"Present", "Exact",    "Prefix",
                                           "Suffix",  "Contains", "Regex"};
static const enum dec_header_match header_kind_values[] = {
    DEC_HDR_PRESENT, DEC_HDR_EXACT, DEC_HDR_PREFIX, DEC_HDR_SUFFIX, DEC_HDR_CONTAINS, DEC_HDR_REGEX,
};

static int decode_perm_header(struct dctx *c, json_t *o, const char *where,
                              struct dec_perm_header *h)
{
    if (!json_is_object(o))
        return bad_field(c, where, "", "must be an object");
    int rc = get_perm_str(c, o, "Name", where, &h->name);
    if (rc == 0 && (h->name == NULL || h->name[0] == '\0'))
        rc = bad_field(c, where, "Name", "is missing");
    int present = 0;
    if (rc == 0)
        rc = get_bool(c, o, "Present", where, &present);
    if (rc == 0)
        rc = get_bool(c, o, "Invert", where, &h->invert);
    if (rc == 0)
        rc = get_bool(c, o, "IgnoreCase", where, &h->ignore_case);
    int kinds = present;
    if (present)
        h->match = DEC_HDR_PRESENT;
    /* Every value kind is read (and type-checked); exactly one kind may be set. */
    for (size_t k = 1; k < ARRAY_SIZE(header_kinds) && rc == 0; k++) {
        char *v = NULL;
        rc = get_perm_str(c, o, header_kinds[k], where, &v);
        if (rc != 0 || v == NULL)
            break;
        if (v[0] != '\0') {
            kinds++;
            free(h->value);
            h->value = v;
            h->match = header_kind_values[k];
        } else {
            free(v);
        }
    }
    if (rc == 0 && kinds != 1)
        rc = bad_field(c, where, "",
                       "must set exactly one of Present, Exact, Prefix, Suffix, Contains or Regex");
    if (rc == 0 && h->value == NULL)
        h->value = xstrdup("");
    return rc;
}

/*
 * PathExact / PathPrefix / PathRegex of an HTTP match, at most one of them (none:
 * DEC_PATH_ANY and ""). With <rooted>, an exact or prefix path must begin with "/".
 */
static int decode_path_match(struct dctx *c, json_t *http, const char *where, int rooted,
                             char **path, enum dec_path_match *match)
{
    static const char *const path_keys[] = {"PathExact", "PathPrefix", "PathRegex"};
    static const enum dec_path_match path_values[] = {DEC_PATH_EXACT, DEC_PATH_PREFIX,
                                                      DEC_PATH_REGEX};
    int rc;
    for (size_t k = 0; k < ARRAY_SIZE(path_keys); k++) {
        char *v = NULL;
        if ((rc = get_perm_str(c, http, path_keys[k], where, &v)) != 0 || v == NULL)
            return rc;
        if (v[0] == '\0') {
            free(v);
        } else if (*path != NULL) {
            free(v);
            return bad_field(c, where, "",
                             "must set at most one of PathExact, PathPrefix or PathRegex");
        } else {
            *path = v;
            *match = path_values[k];
            if (rooted && k < 2 && v[0] != '/')
                return bad_field(c, where, path_keys[k], "must begin with \"/\"");
        }
    }
    if (*path == NULL)
        *path = xstrdup("");
    return 0;
}

/* Header[] of an HTTP match: at most DEC_PERM_HEADERS_MAX conditions. */
static int decode_header_conds(struct dctx *c, json_t *http, const char *where,
                               struct dec_perm_header **out, size_t *n)
{
    json_t *hdrs;
    int rc = get_arr(c, http, "Header", 0, where, &hdrs);
    if (rc != 0)
        return rc;
    if (hdrs != NULL && json_array_size(hdrs) > DEC_PERM_HEADERS_MAX)
        return bad_field(c, where, "Header", "has too many entries");
    *n = hdrs != NULL ? json_array_size(hdrs) : 0;
    *out = *n > 0 ? xcalloc(*n, sizeof(**out)) : NULL;
    for (size_t i = 0; i < *n && rc == 0; i++) {
        char hw[360];
        snprintf(hw, sizeof(hw), "%.320s.Header[%zu]", where, i);
        rc = decode_perm_header(c, json_array_get(hdrs, i), hw, &(*out)[i]);
    }
    return rc;
}

static int decode_permission(struct dctx *c, json_t *o, const char *where, struct dec_permission *p)
{
    char sub[200];
    json_t *http, *methods;
    const char *action;
    if (!json_is_object(o))
        return bad_field(c, where, "", "must be an object");
    int rc = peek_str(c, o, "Action", 1, where, &action);
    if (rc != 0)
        return rc;
    if (strcmp(action, "allow") != 0 && strcmp(action, "deny") != 0)
        return bad_field(c, where, "Action", "must be \"allow\" or \"deny\"");
    p->allow = strcmp(action, "allow") == 0;
    p->has_jwt = member(o, "JWT") != NULL;
    if ((rc = get_obj(c, o, "HTTP", 0, where, &http)) != 0)
        return rc;
    snprintf(sub, sizeof(sub), "%.150s.HTTP", where);
    if ((rc = decode_path_match(c, http, sub, 0, &p->path, &p->path_match)) != 0)
        return rc;
    rc = decode_header_conds(c, http, sub, &p->headers, &p->n_headers);
    if (rc == 0)
        rc = get_arr(c, http, "Methods", 0, sub, &methods);
    if (rc != 0)
        return rc;
    if (methods != NULL && json_array_size(methods) > DEC_PERM_METHODS_MAX)
        return bad_field(c, sub, "Methods", "has too many entries");
    p->n_methods = methods != NULL ? json_array_size(methods) : 0;
    p->methods = p->n_methods > 0 ? xcalloc(p->n_methods, sizeof(*p->methods)) : NULL;
    for (size_t i = 0; i < p->n_methods; i++) {
        json_t *m = json_array_get(methods, i);
        if (!json_is_string(m) || json_string_length(m) == 0 ||
            json_string_length(m) > DEC_PERM_STR_MAX ||
            strlen(json_string_value(m)) != json_string_length(m))
            return bad_field(c, sub, "Methods", "must hold non-empty strings");
        p->methods[i] = xstrdup(json_string_value(m));
    }
    return 0;
}

static void permissions_free(struct dec_permission *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < v[i].n_headers; j++) {
            free(v[i].headers[j].name);
            free(v[i].headers[j].value);
        }
        free(v[i].headers);
        for (size_t j = 0; j < v[i].n_methods; j++)
            free(v[i].methods[j]);
        free(v[i].methods);
        free(v[i].path);
    }
    free(v);
}

static int decode_intention(struct dctx *c, json_t *o, const char *where, struct dec_intention *out)
{
    json_t *perms;
    if (!json_is_object(o))
        return bad_field(c, where, "", "must be an object");
    int rc = get_strs(c, o, where, intention_fields, ARRAY_SIZE(intention_fields), out);
    if (rc == 0)
        rc = get_int(c, o, "Precedence", 1, INT32_MIN, INT32_MAX, where, &out->precedence);
    if (rc == 0)
        rc = get_arr(c, o, "Permissions", 0, where, &perms);
    if (rc != 0)
        return rc;
    out->has_jwt = member(o, "JWT") != NULL;
    if (perms == NULL || json_array_size(perms) == 0)
        return 0;
    if (json_array_size(perms) > DEC_PERMISSIONS_MAX)
        return bad_field(c, where, "Permissions", "has too many entries");
    out->n_permissions = json_array_size(perms);
    out->permissions = xcalloc(out->n_permissions, sizeof(*out->permissions));
    out->has_permissions = 1;
    for (size_t i = 0; i < out->n_permissions && rc == 0; i++) {
        char pw[160];
        snprintf(pw, sizeof(pw), "%.100s.Permissions[%zu]", where, i);
        rc = decode_permission(c, json_array_get(perms, i), pw, &out->permissions[i]);
    }
    return rc;
}

int decode_intentions_match(const char *buf, size_t len, const char *key,
                            struct dec_intention **out, size_t *n, char *err, size_t errlen)
{
    struct dctx c;
    json_t *root, *arr;
    ctx_init(&c, err, errlen);
    *out = NULL;
    *n = 0;
    if (key == NULL)
        return fail(&c, -EINVAL, "no intention match key");
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "intentions: the body must be a JSON object");
        goto out;
    }
    rc = get_arr(&c, root, key, 0, "", &arr);
    if (rc != 0 || arr == NULL)
        goto out;
    *n = json_array_size(arr);
    *out = xcalloc(*n, sizeof(**out));
    for (size_t i = 0; i < *n && rc == 0; i++) {
        char where[128];
        snprintf(where, sizeof(where), "%.64s[%zu]", key, i);
        rc = decode_intention(&c, json_array_get(arr, i), where, &(*out)[i]);
    }
out:
    json_decref(root);
    if (rc != 0) {
        dec_intentions_free(*out, *n);
        *out = NULL;
        *n = 0;
    }
    return rc;
}

void dec_intentions_free(struct dec_intention *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free_strs(intention_fields, ARRAY_SIZE(intention_fields), &v[i]);
        permissions_free(v[i].permissions, v[i].n_permissions);
    }
    free(v);
}

/* ---- /v1/health/connect/<service> ---- */

static const struct str_field node_fields[] = {
    SF(struct dec_endpoint, "Node", node, 0),
    SF(struct dec_endpoint, "Datacenter", node_datacenter, 0),
};

static const struct str_field endpoint_service_fields[] = {
    SF(struct dec_endpoint, "ID", service_id, 0),
    SF(struct dec_endpoint, "SocketPath", socket_path, 0),
    SF(struct dec_endpoint, "Namespace", ns, 0),
    SF(struct dec_endpoint, "Partition", partition, 0),
};

static int decode_checks(struct dctx *c, json_t *checks, const char *where, struct dec_endpoint *e)
{
    e->passing = 1;
    e->critical = 0;
    for (size_t i = 0; i < json_array_size(checks); i++) {
        json_t *ck = json_array_get(checks, i);
        const char *status;
        char cw[96];
        snprintf(cw, sizeof(cw), "%s.Checks[%zu]", where, i);
        if (!json_is_object(ck))
            return bad_field(c, cw, "", "must be an object");
        int rc = peek_str(c, ck, "Status", 1, cw, &status);
        if (rc != 0)
            return rc;
        if (strcmp(status, "passing") != 0)
            e->passing = 0;
        if (strcmp(status, "critical") == 0)
            e->critical = 1;
    }
    return 0;
}

static int decode_entry(struct dctx *c, json_t *o, const char *where, struct dec_endpoint *e)
{
    json_t *node, *svc, *proxy, *checks;
    const char *kind, *name, *saddr, *naddr, *ident;
    char sw[64], nw[64], pw[64];
    snprintf(sw, sizeof(sw), "%s.Service", where);
    snprintf(nw, sizeof(nw), "%s.Node", where);
    snprintf(pw, sizeof(pw), "%s.Service.Proxy", where);
    if (!json_is_object(o))
        return bad_field(c, where, "", "must be an object");
    int rc;
    if ((rc = get_obj(c, o, "Node", 1, where, &node)) != 0 ||
        (rc = get_obj(c, o, "Service", 1, where, &svc)) != 0 ||
        (rc = get_arr(c, o, "Checks", 0, where, &checks)) != 0 ||
        (rc = get_strs(c, node, nw, node_fields, ARRAY_SIZE(node_fields), e)) != 0 ||
        (rc = get_strs(c, svc, sw, endpoint_service_fields, ARRAY_SIZE(endpoint_service_fields),
                       e)) != 0 ||
        (rc = get_int(c, svc, "Port", 0, 0, 65535, sw, &e->port)) != 0 ||
        (rc = peek_str(c, svc, "Kind", 0, sw, &kind)) != 0 ||
        (rc = peek_str(c, svc, "Service", 1, sw, &name)) != 0 ||
        (rc = peek_str(c, svc, "Address", 0, sw, &saddr)) != 0 ||
        (rc = peek_str(c, node, "Address", 0, nw, &naddr)) != 0 ||
        (rc = get_obj(c, svc, "Proxy", 0, sw, &proxy)) != 0)
        return rc;
    /* Proxies present their destination's identity; connect-native services their own. */
    ident = name;
    if (strcmp(kind, CONNECT_PROXY) == 0) {
        if (proxy == NULL)
            return bad_field(c, sw, "Proxy", "is missing for a connect-proxy");
        rc = peek_str(c, proxy, "DestinationServiceName", 1, pw, &ident);
        if (rc != 0)
            return rc;
    }
    if (saddr[0] == '\0' && naddr[0] == '\0' && e->socket_path[0] == '\0')
        return bad_field(c, where, "",
                         "has no Service.Address, Node.Address or Service.SocketPath");
    e->identity_service = xstrdup(ident);
    e->address = xstrdup(saddr[0] != '\0' ? saddr : naddr);
    return decode_checks(c, checks, where, e);
}

int decode_health_connect(const char *buf, size_t len, struct dec_endpoint **out, size_t *n,
                          char *err, size_t errlen)
{
    struct dctx c;
    json_t *root;
    ctx_init(&c, err, errlen);
    *out = NULL;
    *n = 0;
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (json_is_null(root))
        goto out;
    if (!json_is_array(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "health: the body must be a JSON array");
        goto out;
    }
    *n = json_array_size(root);
    *out = xcalloc(*n, sizeof(**out));
    for (size_t i = 0; i < *n && rc == 0; i++) {
        char where[32];
        snprintf(where, sizeof(where), "[%zu]", i);
        rc = decode_entry(&c, json_array_get(root, i), where, &(*out)[i]);
    }
out:
    json_decref(root);
    if (rc != 0) {
        dec_endpoints_free(*out, *n);
        *out = NULL;
        *n = 0;
    }
    return rc;
}

void dec_endpoints_free(struct dec_endpoint *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free_strs(node_fields, ARRAY_SIZE(node_fields), &v[i]);
        free_strs(endpoint_service_fields, ARRAY_SIZE(endpoint_service_fields), &v[i]);
        /* the two strings decode_entry() derives rather than reads through a table */
        free(v[i].address);
        free(v[i].identity_service);
    }
    free(v);
}

/* ---- POST /v1/discovery-chain/<service> ---- */

int decode_duration_ms(const char *s, uint64_t *ms)
{
    /* Nanoseconds per unit; longer unit names first so "ms" is not read as "m". */
    static const struct {
        const char *name;
        double ns;
    } units[] = {{"ns", 1},  {"us", 1e3}, {"\xc2\xb5s", 1e3}, {"ms", 1e6},
                 {"s", 1e9}, {"m", 60e9}, {"h", 3600e9}};
    double total = 0;
    const char *p = s;
    *ms = 0;
    if (p == NULL || *p == '\0')
        return -EINVAL;
    if (strcmp(p, "0") == 0)
        return 0;
    while (*p != '\0') {
        double v = 0, scale = 1;
        int digits = 0;
        for (; *p >= '0' && *p <= '9'; p++, digits++)
            v = v * 10 + (*p - '0');
        if (*p == '.')
            for (p++; *p >= '0' && *p <= '9'; p++, digits++)
                v += (*p - '0') * (scale /= 10);
        if (digits == 0 || digits > 20)
            return -EINVAL;
        size_t i = 0;
        for (; i < ARRAY_SIZE(units); i++)
            if (strncmp(p, units[i].name, strlen(units[i].name)) == 0)
                break;
        if (i == ARRAY_SIZE(units))
            return -EINVAL;
        p += strlen(units[i].name);
        total += v * units[i].ns;
        if (total > 1e18)
            return -EINVAL;
    }
    *ms = (uint64_t)((total + 999999.0) / 1e6);
    return 0;
}

/* A ConnectTimeout: a duration string, or integer nanoseconds (consul-api.md 1.6). */
static int get_timeout_ms(struct dctx *c, json_t *obj, const char *key, const char *where,
                          uint32_t *dst)
{
    json_t *v = member(obj, key);
    uint64_t ms = 0;
    *dst = 0;
    if (v == NULL)
        return 0;
    if (json_is_string(v)) {
        if (decode_duration_ms(json_string_value(v), &ms) != 0)
            return bad_field(c, where, key, "must be a duration such as \"5s\"");
    } else if (json_is_integer(v) && json_integer_value(v) >= 0) {
        ms = ((uint64_t)json_integer_value(v) + 999999u) / 1000000u;
    } else {
        return bad_field(c, where, key, "must be a duration");
    }
    *dst = (uint32_t)MIN(ms, (uint64_t)UINT32_MAX);
    return 0;
}

static const struct str_field target_fields[] = {
    SF(struct dec_chain_target, "ID", id, 0),
    SF(struct dec_chain_target, "Service", service, 1),
    SF(struct dec_chain_target, "ServiceSubset", service_subset, 0),
    SF(struct dec_chain_target, "Namespace", ns, 0),
    SF(struct dec_chain_target, "Partition", partition, 0),
    SF(struct dec_chain_target, "Datacenter", datacenter, 0),
    SF(struct dec_chain_target, "Peer", peer, 0),
    SF(struct dec_chain_target, "SNI", sni, 0),
};

static int decode_target(struct dctx *c, json_t *targets, const char *id,
                         struct dec_chain_target *t)
{
    char where[320];
    json_t *o, *subset;
    snprintf(where, sizeof(where), "Chain.Targets[\"%s\"]", id);
    o = member(targets, id);
    if (o == NULL)
        return fail(c, ERR_BAD_FIELD, "%s is missing", where);
    if (!json_is_object(o))
        return bad_field(c, where, "", "must be an object");
    int rc;
    if ((rc = get_strs(c, o, where, target_fields, ARRAY_SIZE(target_fields), t)) != 0 ||
        (rc = get_obj(c, o, "Subset", 0, where, &subset)) != 0 ||
        (rc = get_str(c, subset, "Filter", 0, where, &t->filter)) != 0 ||
        (rc = get_bool(c, subset, "OnlyPassing", where, &t->only_passing)) != 0 ||
        (rc = get_timeout_ms(c, o, "ConnectTimeout", where, &t->connect_timeout_ms)) != 0)
        return rc;
    /* Targets are told apart by their key: an ID naming another target would defeat the
     * de-duplication that sizes the target array (Consul's are always equal). */
    if (t->id[0] != '\0' && strcmp(t->id, id) != 0)
        return bad_field(c, where, "ID", "must equal the target's key");
    if (t->id[0] == '\0') {
        free(t->id);
        t->id = xstrdup(id);
    }
    return 0;
}

/* Appends target <id> unless it is listed already. */
static int add_target(struct dctx *c, json_t *targets, const char *id, struct dec_chain *out)
{
    for (size_t i = 0; i < out->n_targets; i++)
        if (strcmp(out->targets[i].id, id) == 0)
            return 0;
    /* The array was sized for every name; the count grows before filling so dispose sees it. */
    struct dec_chain_target *t = &out->targets[out->n_targets++];
    return decode_target(c, targets, id, t);
}

#define CHAIN_MAX_DEPTH 16

/* The chain's nodes as the walk sees them: each visited once (a chain is a DAG, but a
 * hostile or broken one might not be). */
struct chain_walk {
    json_t *nodes, *targets;
    const char **seen;
    size_t n_seen, cap;
    int have_resolver;
};

/* Adds a resolver node's Target, then its Failover.Targets in order. */
static int walk_resolver(struct dctx *c, struct chain_walk *w, json_t *node, const char *where,
                         struct dec_chain *out)
{
    json_t *resolver, *failover = NULL, *fo_targets = NULL;
    const char *primary;
    uint32_t timeout_ms = 0;
    char rwhere[360];
    int rc;
    if ((rc = get_obj(c, node, "Resolver", 1, where, &resolver)) != 0)
        return rc;
    snprintf(rwhere, sizeof(rwhere), "%s.Resolver", where);
    if ((rc = peek_str(c, resolver, "Target", 1, rwhere, &primary)) != 0 ||
        (rc = get_timeout_ms(c, resolver, "ConnectTimeout", rwhere, &timeout_ms)) != 0 ||
        (rc = get_obj(c, resolver, "Failover", 0, rwhere, &failover)) != 0 ||
        (rc = get_arr(c, failover, "Targets", 0, rwhere, &fo_targets)) != 0)
        return rc;
    if (!w->have_resolver)
        out->connect_timeout_ms = timeout_ms != 0 ? timeout_ms : 5000;
    w->have_resolver = 1;
    if ((rc = add_target(c, w->targets, primary, out)) != 0)
        return rc;
    for (size_t i = 0; i < json_array_size(fo_targets); i++) {
        json_t *id = json_array_get(fo_targets, i);
        if (!json_is_string(id) || json_string_value(id)[0] == '\0')
            return fail(c, ERR_BAD_FIELD, "%s.Failover.Targets[%zu] must be a target ID", rwhere,
                        i);
        if ((rc = add_target(c, w->targets, json_string_value(id), out)) != 0)
            return rc;
    }
    return 0;
}

static int walk_node(struct dctx *c, struct chain_walk *w, const char *name, struct dec_chain *out,
                     unsigned depth);

/* The NextNode of every element of <node>'s <list> (Routes of a router, Splits of a
 * splitter, both members of the node itself as Consul's DiscoveryGraphNode renders them); a
 * router's last route (the compiler's catch-all, to the service itself) first. */
static int walk_next(struct dctx *c, struct chain_walk *w, json_t *node, const char *list,
                     const char *where, struct dec_chain *out, unsigned depth)
{
    json_t *arr;
    char lwhere[360];
    int rc = get_arr(c, node, list, 1, where, &arr);
    if (rc != 0)
        return rc;
    size_t n = json_array_size(arr);
    for (size_t k = 0; k < n; k++) {
        size_t i = strcmp(list, "Routes") == 0 ? (k == 0 ? n - 1 : k - 1) : k;
        const char *next;
        json_t *el = json_array_get(arr, i);
        snprintf(lwhere, sizeof(lwhere), "%s.%s[%zu]", where, list, i);
        if (!json_is_object(el))
            return fail(c, ERR_BAD_FIELD, "%s must be an object", lwhere);
        if ((rc = peek_str(c, el, "NextNode", 1, lwhere, &next)) != 0 ||
            (rc = walk_node(c, w, next, out, depth + 1)) != 0)
            return rc;
    }
    return 0;
}

/* Visits node <name>: a resolver adds its targets; a router or splitter visits its next
 * nodes. A compiled chain is at most router -> splitter -> resolver deep: the depth is
 * bounded so a hostile one cannot exhaust the stack. */
static int walk_node(struct dctx *c, struct chain_walk *w, const char *name, struct dec_chain *out,
                     unsigned depth)
{
    const char *type;
    char where[320];
    json_t *node = member(w->nodes, name);
    for (size_t i = 0; i < w->n_seen; i++)
        if (strcmp(w->seen[i], name) == 0)
            return 0;
    if (node == NULL || !json_is_object(node))
        return fail(c, ERR_BAD_FIELD, "Chain node \"%s\" is not an object in Chain.Nodes", name);
    if (depth > CHAIN_MAX_DEPTH || w->n_seen == w->cap)
        return fail(c, ERR_BAD_FIELD, "Chain node \"%s\" is more than %d nodes deep", name,
                    CHAIN_MAX_DEPTH);
    w->seen[w->n_seen++] = name;
    snprintf(where, sizeof(where), "Chain.Nodes[\"%s\"]", name);
    int rc = peek_str(c, node, "Type", 1, where, &type);
    if (rc != 0)
        return rc;
    if (strcmp(type, "resolver") == 0)
        return walk_resolver(c, w, node, where, out);
    if (strcmp(type, "router") == 0)
        return walk_next(c, w, node, "Routes", where, out, depth);
    if (strcmp(type, "splitter") == 0)
        return walk_next(c, w, node, "Splits", where, out, depth);
    return fail(c, ERR_BAD_FIELD, "%s.Type \"%s\" is not resolver, router or splitter", where,
                type);
}

/* ---- the chain's routing: routes -> splits -> resolvers ---- */

const char *dec_retry_on_name(unsigned index)
{
    static const char *const names[] = {
#define X(name, text) text,
        DEC_RETRY_ON_NAMES(X)
#undef X
    };
    return index < ARRAY_SIZE(names) ? names[index] : NULL;
}

static const char *const lb_policy_names[] = {"",          "random", "round_robin", "least_request",
                                              "ring_hash", "maglev"};

const char *dec_lb_policy_name(enum dec_lb_policy p)
{
    return (size_t)p < ARRAY_SIZE(lb_policy_names) ? lb_policy_names[p] : "";
}

static const char *const hash_field_names[] = {"", "header", "cookie", "query_parameter"};

const char *dec_hash_field_name(enum dec_hash_field f)
{
    return (size_t)f < ARRAY_SIZE(hash_field_names) ? hash_field_names[f] : "";
}

/* RFC 9110 tchar: what a header name may hold. */
static int is_token(const char *s)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    if (s[0] == '\0')
        return 0;
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              strchr(extra, ch) != NULL))
            return 0;
    }
    return 1;
}

/* A value that goes into a request or response head: no CR or LF (NUL is refused already). */
static int is_field_value(const char *s)
{
    return s != NULL && strpbrk(s, "\r\n") == NULL;
}

/* A bounded string array member (Remove[], Methods[], RetryOn[]): fresh copies in *out. */
static int get_str_list(struct dctx *c, json_t *obj, const char *key, const char *where, size_t max,
                        char ***out, size_t *n)
{
    json_t *arr;
    *out = NULL;
    *n = 0;
    int rc = get_arr(c, obj, key, 0, where, &arr);
    if (rc != 0 || arr == NULL || json_array_size(arr) == 0)
        return rc;
    if (json_array_size(arr) > max)
        return bad_field(c, where, key, "has too many entries");
    *out = xcalloc(json_array_size(arr), sizeof(**out));
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_string(v) || json_string_length(v) == 0 ||
            json_string_length(v) > DEC_CHAIN_STR_MAX ||
            strlen(json_string_value(v)) != json_string_length(v))
            return bad_field(c, where, key, "must hold non-empty strings");
        (*out)[(*n)++] = xstrdup(json_string_value(v));
    }
    return 0;
}

static void str_list_free(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

/* Add or Set: an object of header name -> value. */
static int get_header_kvs(struct dctx *c, json_t *obj, const char *key, const char *where,
                          struct dec_header_kv **out, size_t *n)
{
    json_t *map, *v;
    const char *name;
    *out = NULL;
    *n = 0;
    int rc = get_obj(c, obj, key, 0, where, &map);
    if (rc != 0 || map == NULL || json_object_size(map) == 0)
        return rc;
    if (json_object_size(map) > DEC_HEADER_MODS_MAX)
        return bad_field(c, where, key, "has too many entries");
    *out = xcalloc(json_object_size(map), sizeof(**out));
    json_object_foreach(map, name, v)
    {
        if (strlen(name) > DEC_CHAIN_STR_MAX || !is_token(name))
            return fail(c, ERR_BAD_FIELD, "%s.%s: \"%.64s\" is not a header name", where, key,
                        name);
        if (!json_is_string(v) || json_string_length(v) > DEC_CHAIN_STR_MAX ||
            strlen(json_string_value(v)) != json_string_length(v) ||
            !is_field_value(json_string_value(v)))
            return fail(c, ERR_BAD_FIELD, "%s.%s[\"%.64s\"] must be a header value", where, key,
                        name);
        struct dec_header_kv *kv = &(*out)[(*n)++];
        kv->name = xstrdup(name);
        kv->value = xstrdup(json_string_value(v));
    }
    return 0;
}

static void header_kvs_free(struct dec_header_kv *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(v[i].name);
        free(v[i].value);
    }
    free(v);
}

static int decode_header_mods(struct dctx *c, json_t *obj, const char *key, const char *where,
                              struct dec_header_mods *m)
{
    json_t *o;
    char sub[320];
    int rc = get_obj(c, obj, key, 0, where, &o);
    if (rc != 0 || o == NULL)
        return rc;
    snprintf(sub, sizeof(sub), "%.280s.%s", where, key);
    if ((rc = get_header_kvs(c, o, "Add", sub, &m->add, &m->n_add)) != 0 ||
        (rc = get_header_kvs(c, o, "Set", sub, &m->set, &m->n_set)) != 0 ||
        (rc = get_str_list(c, o, "Remove", sub, DEC_HEADER_MODS_MAX, &m->remove, &m->n_remove)) !=
            0)
        return rc;
    for (size_t i = 0; i < m->n_remove; i++)
        if (!is_token(m->remove[i]))
            return fail(c, ERR_BAD_FIELD, "%s.Remove[%zu] is not a header name", sub, i);
    return 0;
}

static void header_mods_dispose(struct dec_header_mods *m)
{
    header_kvs_free(m->add, m->n_add);
    header_kvs_free(m->set, m->n_set);
    str_list_free(m->remove, m->n_remove);
    memset(m, 0, sizeof(*m));
}

static int decode_query_param(struct dctx *c, json_t *o, const char *where,
                              struct dec_query_param *q)
{
    static const char *const kinds[] = {"Exact", "Regex"};
    static const enum dec_query_match values[] = {DEC_QUERY_EXACT, DEC_QUERY_REGEX};
    int present = 0;
    if (!json_is_object(o))
        return bad_field(c, where, "", "must be an object");
    int rc = get_perm_str(c, o, "Name", where, &q->name);
    if (rc == 0 && (q->name == NULL || q->name[0] == '\0'))
        rc = bad_field(c, where, "Name", "is missing");
    if (rc == 0)
        rc = get_bool(c, o, "Present", where, &present);
    int set = present;
    if (present)
        q->match = DEC_QUERY_PRESENT;
    for (size_t k = 0; k < ARRAY_SIZE(kinds) && rc == 0; k++) {
        char *v = NULL;
        if ((rc = get_perm_str(c, o, kinds[k], where, &v)) != 0 || v == NULL)
            break;
        if (v[0] != '\0') {
            set++;
            free(q->value);
            q->value = v;
            q->match = values[k];
        } else {
            free(v);
        }
    }
    if (rc == 0 && set != 1)
        rc = bad_field(c, where, "", "must set exactly one of Present, Exact or Regex");
    if (rc == 0 && q->value == NULL)
        q->value = xstrdup("");
    return rc;
}

/* Definition.Match.HTTP of a route; absent means every request. */
static int decode_route_match(struct dctx *c, json_t *http, const char *where,
                              struct dec_chain_route *r)
{
    json_t *query;
    int rc = decode_path_match(c, http, where, 1, &r->path, &r->path_match);
    if (rc == 0)
        rc = get_bool(c, http, "CaseInsensitive", where, &r->case_insensitive);
    if (rc == 0)
        rc = decode_header_conds(c, http, where, &r->headers, &r->n_headers);
    if (rc == 0)
        rc = get_arr(c, http, "QueryParam", 0, where, &query);
    if (rc != 0)
        return rc;
    if (query != NULL && json_array_size(query) > DEC_ROUTE_QUERY_MAX)
        return bad_field(c, where, "QueryParam", "has too many entries");
    r->n_query = query != NULL ? json_array_size(query) : 0;
    r->query = r->n_query > 0 ? xcalloc(r->n_query, sizeof(*r->query)) : NULL;
    for (size_t i = 0; i < r->n_query && rc == 0; i++) {
        char qw[360];
        snprintf(qw, sizeof(qw), "%.320s.QueryParam[%zu]", where, i);
        rc = decode_query_param(c, json_array_get(query, i), qw, &r->query[i]);
    }
    if (rc == 0)
        rc = get_str_list(c, http, "Methods", where, DEC_PERM_METHODS_MAX, &r->methods,
                          &r->n_methods);
    return rc;
}

/* Definition.Destination of a route (Service, ServiceSubset, ... are compiled into NextNode). */
static int decode_destination(struct dctx *c, json_t *d, const char *where,
                              struct dec_chain_route *r)
{
    json_t *codes;
    char **retry_on = NULL;
    size_t n_retry_on = 0;
    int n = 0;
    int rc = get_perm_str(c, d, "PrefixRewrite", where, &r->prefix_rewrite);
    if (rc == 0 && !is_field_value(r->prefix_rewrite))
        rc = bad_field(c, where, "PrefixRewrite", "must not hold CR or LF");
    if (rc != 0 ||
        (rc = get_timeout_ms(c, d, "RequestTimeout", where, &r->request_timeout_ms)) != 0 ||
        (rc = get_timeout_ms(c, d, "IdleTimeout", where, &r->idle_timeout_ms)) != 0 ||
        (rc = get_int(c, d, "NumRetries", 0, 0, INT32_MAX, where, &n)) != 0 ||
        (rc = get_bool(c, d, "RetryOnConnectFailure", where, &r->retry_on_connect_failure)) != 0 ||
        (rc = get_str_list(c, d, "RetryOn", where, DEC_RETRY_ON_MAX, &retry_on, &n_retry_on)) != 0)
        goto out;
    r->num_retries = (uint32_t)n;
    for (size_t i = 0; i < n_retry_on; i++) {
        unsigned k = 0;
        while (dec_retry_on_name(k) != NULL && strcmp(dec_retry_on_name(k), retry_on[i]) != 0)
            k++;
        if (dec_retry_on_name(k) == NULL) {
            rc = fail(c, ERR_BAD_FIELD, "%s.RetryOn[%zu] \"%.64s\" is not a value Consul accepts",
                      where, i, retry_on[i]);
            goto out;
        }
        r->retry_on |= 1u << k;
    }
    if ((rc = get_arr(c, d, "RetryOnStatusCodes", 0, where, &codes)) != 0)
        goto out;
    if (codes != NULL && json_array_size(codes) > DEC_RETRY_CODES_MAX) {
        rc = bad_field(c, where, "RetryOnStatusCodes", "has too many entries");
        goto out;
    }
    r->n_retry_status_codes = codes != NULL ? json_array_size(codes) : 0;
    r->retry_status_codes = r->n_retry_status_codes > 0
                                ? xcalloc(r->n_retry_status_codes, sizeof(*r->retry_status_codes))
                                : NULL;
    for (size_t i = 0; i < r->n_retry_status_codes; i++) {
        json_t *v = json_array_get(codes, i);
        if (!json_is_integer(v) || json_integer_value(v) < 100 || json_integer_value(v) > 999) {
            rc = fail(c, ERR_BAD_FIELD, "%s.RetryOnStatusCodes[%zu] must be an HTTP status", where,
                      i);
            goto out;
        }
        r->retry_status_codes[i] = (uint16_t)json_integer_value(v);
    }
    if ((rc = decode_header_mods(c, d, "RequestHeaders", where, &r->request_headers)) == 0)
        rc = decode_header_mods(c, d, "ResponseHeaders", where, &r->response_headers);
out:
    str_list_free(retry_on, n_retry_on);
    return rc;
}

static int decode_hash_policy(struct dctx *c, json_t *o, const char *where,
                              struct dec_hash_policy *h)
{
    const char *field;
    json_t *cookie;
    if (!json_is_object(o))
        return bad_field(c, where, "", "must be an object");
    int rc;
    if ((rc = peek_str(c, o, "Field", 0, where, &field)) != 0 ||
        (rc = get_perm_str(c, o, "FieldValue", where, &h->field_value)) != 0 ||
        (rc = get_bool(c, o, "SourceIP", where, &h->source_ip)) != 0 ||
        (rc = get_bool(c, o, "Terminal", where, &h->terminal)) != 0 ||
        (rc = get_obj(c, o, "CookieConfig", 0, where, &cookie)) != 0 ||
        (rc = get_bool(c, cookie, "Session", where, &h->cookie_session)) != 0 ||
        (rc = get_timeout_ms(c, cookie, "TTL", where, &h->cookie_ttl_ms)) != 0 ||
        (rc = get_perm_str(c, cookie, "Path", where, &h->cookie_path)) != 0)
        return rc;
    size_t k = 1;
    while (k < ARRAY_SIZE(hash_field_names) && strcmp(hash_field_names[k], field) != 0)
        k++;
    if (field[0] != '\0' && k == ARRAY_SIZE(hash_field_names))
        return bad_field(c, where, "Field", "must be header, cookie or query_parameter");
    h->field = field[0] != '\0' ? (enum dec_hash_field)k : DEC_HASH_NONE;
    /* Consul's validation: a field with its value, or SourceIP alone. */
    if (h->source_ip ? h->field != DEC_HASH_NONE || h->field_value[0] != '\0'
                     : h->field == DEC_HASH_NONE || h->field_value[0] == '\0')
        return bad_field(c, where, "", "must set Field with FieldValue, or SourceIP alone");
    if (h->field == DEC_HASH_HEADER && !is_token(h->field_value))
        return bad_field(c, where, "FieldValue", "is not a header name");
    if (!is_field_value(h->cookie_path))
        return bad_field(c, where, "CookieConfig.Path", "must not hold CR or LF");
    return 0;
}

static void hash_policies_free(struct dec_hash_policy *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(v[i].field_value);
        free(v[i].cookie_path);
    }
    free(v);
}

/* A node's LoadBalancer (absent: the default policy). */
static int decode_lb(struct dctx *c, json_t *node, const char *where, struct dec_load_balancer *lb)
{
    json_t *o, *least, *ring, *hash;
    const char *policy;
    char sub[360];
    int rc = get_obj(c, node, "LoadBalancer", 0, where, &o);
    if (rc != 0 || o == NULL)
        return rc;
    snprintf(sub, sizeof(sub), "%.320s.LoadBalancer", where);
    int choice = 0, rmin = 0, rmax = 0;
    if ((rc = peek_str(c, o, "Policy", 0, sub, &policy)) != 0 ||
        (rc = get_obj(c, o, "LeastRequestConfig", 0, sub, &least)) != 0 ||
        (rc = get_int(c, least, "ChoiceCount", 0, 0, INT32_MAX, sub, &choice)) != 0 ||
        (rc = get_obj(c, o, "RingHashConfig", 0, sub, &ring)) != 0 ||
        (rc = get_int(c, ring, "MinimumRingSize", 0, 0, INT32_MAX, sub, &rmin)) != 0 ||
        (rc = get_int(c, ring, "MaximumRingSize", 0, 0, INT32_MAX, sub, &rmax)) != 0 ||
        (rc = get_arr(c, o, "HashPolicies", 0, sub, &hash)) != 0)
        return rc;
    size_t k = 0;
    while (k < ARRAY_SIZE(lb_policy_names) && strcmp(lb_policy_names[k], policy) != 0)
        k++;
    if (k == ARRAY_SIZE(lb_policy_names))
        return bad_field(c, sub, "Policy",
                         "must be random, round_robin, least_request, ring_hash or maglev");
    lb->policy = (enum dec_lb_policy)k;
    lb->choice_count = (uint32_t)choice;
    lb->ring_min = (uint32_t)rmin;
    lb->ring_max = (uint32_t)rmax;
    if (hash != NULL && json_array_size(hash) > DEC_HASH_POLICIES_MAX)
        return bad_field(c, sub, "HashPolicies", "has too many entries");
    lb->n_hash = hash != NULL ? json_array_size(hash) : 0;
    lb->hash = lb->n_hash > 0 ? xcalloc(lb->n_hash, sizeof(*lb->hash)) : NULL;
    for (size_t i = 0; i < lb->n_hash && rc == 0; i++) {
        char hw[400];
        snprintf(hw, sizeof(hw), "%.360s.HashPolicies[%zu]", sub, i);
        rc = decode_hash_policy(c, json_array_get(hash, i), hw, &lb->hash[i]);
    }
    return rc;
}

/* What the routing pass shares: the tree and the result being filled. */
struct route_build {
    json_t *nodes;
    struct dec_chain *out;
    size_t cap_resolvers;
};

static int find_target(struct dctx *c, const struct dec_chain *out, const char *id,
                       const char *where, size_t *index)
{
    *index = 0;
    for (size_t i = 0; i < out->n_targets; i++) {
        if (strcmp(out->targets[i].id, id) == 0) {
            *index = i;
            return 0;
        }
    }
    return fail(c, ERR_BAD_FIELD, "%s: target \"%.200s\" is not in Chain.Targets", where, id);
}

/* The node <name>, which must be an object of type <type>. */
static int typed_node(struct dctx *c, json_t *nodes, const char *name, const char *from,
                      json_t **node, const char **type)
{
    *type = "";
    *node = member(nodes, name);
    if (*node == NULL || !json_is_object(*node))
        return fail(c, ERR_BAD_FIELD, "%s: node \"%.200s\" is not an object in Chain.Nodes", from,
                    name);
    return peek_str(c, *node, "Type", 1, from, type);
}

/* The index of resolver node <name> in out->resolvers, decoding it on first sight. */
static int resolver_index(struct dctx *c, struct route_build *b, const char *name, const char *from,
                          size_t *index)
{
    struct dec_chain *out = b->out;
    json_t *node, *resolver, *failover, *fo;
    const char *type, *target;
    char where[320];
    for (size_t i = 0; i < out->n_resolvers; i++) {
        if (strcmp(out->resolvers[i].name, name) == 0) {
            *index = i;
            return 0;
        }
    }
    int rc = typed_node(c, b->nodes, name, from, &node, &type);
    if (rc != 0)
        return rc;
    if (strcmp(type, "resolver") != 0)
        return fail(c, ERR_BAD_FIELD, "%s leads to \"%.200s\", a %.32s: a resolver belongs there",
                    from, name, type);
    if (out->n_resolvers == b->cap_resolvers)
        return fail(c, ERR_BAD_FIELD, "%s: too many resolvers", from);
    struct dec_chain_resolver *r = &out->resolvers[out->n_resolvers++];
    r->name = xstrdup(name);
    snprintf(where, sizeof(where), "Chain.Nodes[\"%.200s\"]", name);
    if ((rc = get_obj(c, node, "Resolver", 1, where, &resolver)) != 0 ||
        (rc = peek_str(c, resolver, "Target", 1, where, &target)) != 0 ||
        (rc = get_timeout_ms(c, resolver, "ConnectTimeout", where, &r->connect_timeout_ms)) != 0 ||
        (rc = get_timeout_ms(c, resolver, "RequestTimeout", where, &r->request_timeout_ms)) != 0 ||
        (rc = get_obj(c, resolver, "Failover", 0, where, &failover)) != 0 ||
        (rc = get_arr(c, failover, "Targets", 0, where, &fo)) != 0 ||
        (rc = decode_lb(c, node, where, &r->lb)) != 0)
        return rc;
    /* The walk checked the failover IDs and listed every one, duplicates dropped. */
    r->targets = xcalloc(1 + json_array_size(fo), sizeof(*r->targets));
    if ((rc = find_target(c, out, target, where, &r->targets[r->n_targets++])) != 0)
        return rc;
    for (size_t i = 0; i < json_array_size(fo); i++) {
        size_t t = 0;
        if ((rc = find_target(c, out, json_string_value(json_array_get(fo, i)), where, &t)) != 0)
            return rc;
        size_t j = 0;
        while (j < r->n_targets && r->targets[j] != t)
            j++;
        if (j == r->n_targets)
            r->targets[r->n_targets++] = t;
    }
    *index = out->n_resolvers - 1;
    return 0;
}

/* A route's next node: a splitter's splits, or one split of weight 100 to a resolver. */
static int route_splits(struct dctx *c, struct route_build *b, const char *name, const char *from,
                        struct dec_chain_route *r)
{
    json_t *node, *splits;
    const char *type;
    char where[320];
    int rc = typed_node(c, b->nodes, name, from, &node, &type);
    if (rc != 0)
        return rc;
    if (strcmp(type, "resolver") == 0) {
        r->splits = xcalloc(1, sizeof(*r->splits));
        r->n_splits = 1;
        r->splits[0].weight = 100;
        return resolver_index(c, b, name, from, &r->splits[0].resolver);
    }
    if (strcmp(type, "splitter") != 0)
        return fail(c, ERR_BAD_FIELD,
                    "%s leads to \"%.200s\", a %.32s: a splitter or resolver belongs there", from,
                    name, type);
    snprintf(where, sizeof(where), "Chain.Nodes[\"%.200s\"]", name);
    if ((rc = get_arr(c, node, "Splits", 1, where, &splits)) != 0)
        return rc;
    if (json_array_size(splits) == 0)
        return bad_field(c, where, "Splits", "must not be empty");
    if (json_array_size(splits) > DEC_CHAIN_SPLITS_MAX)
        return bad_field(c, where, "Splits", "has too many entries");
    r->splits = xcalloc(json_array_size(splits), sizeof(*r->splits));
    for (size_t i = 0; i < json_array_size(splits); i++) {
        struct dec_chain_split *sp = &r->splits[r->n_splits++];
        json_t *el = json_array_get(splits, i), *w, *def;
        const char *next;
        char sw[360];
        snprintf(sw, sizeof(sw), "%.300s.Splits[%zu]", where, i);
        if (!json_is_object(el))
            return bad_field(c, sw, "", "must be an object");
        w = member(el, "Weight");
        if (w == NULL || !json_is_number(w) || json_number_value(w) < 0 ||
            json_number_value(w) > 100)
            return bad_field(c, sw, "Weight", "must be a number in [0, 100]");
        sp->weight = json_number_value(w);
        if ((rc = get_obj(c, el, "Definition", 0, sw, &def)) != 0 ||
            (rc = decode_header_mods(c, def, "RequestHeaders", sw, &sp->request_headers)) != 0 ||
            (rc = decode_header_mods(c, def, "ResponseHeaders", sw, &sp->response_headers)) != 0 ||
            (rc = peek_str(c, el, "NextNode", 1, sw, &next)) != 0 ||
            (rc = resolver_index(c, b, next, sw, &sp->resolver)) != 0)
            return rc;
    }
    return 0;
}

/* Fills out->routes and out->resolvers from the start node (the walk has listed targets). */
static int decode_routing(struct dctx *c, json_t *nodes, const char *start, struct dec_chain *out)
{
    struct route_build b = {.nodes = nodes, .out = out, .cap_resolvers = json_object_size(nodes)};
    json_t *node, *routes;
    const char *type;
    char where[320];
    out->resolvers = xcalloc(b.cap_resolvers ? b.cap_resolvers : 1, sizeof(*out->resolvers));
    int rc = typed_node(c, nodes, start, "Chain.StartNode", &node, &type);
    if (rc != 0)
        return rc;
    if (strcmp(type, "router") != 0) {
        out->routes = xcalloc(1, sizeof(*out->routes));
        out->n_routes = 1;
        struct dec_chain_route *r = &out->routes[0];
        r->next_node = xstrdup("");
        r->path = xstrdup("");
        r->prefix_rewrite = xstrdup("");
        return route_splits(c, &b, start, "Chain.StartNode", r);
    }
    snprintf(where, sizeof(where), "Chain.Nodes[\"%.200s\"]", start);
    if ((rc = get_arr(c, node, "Routes", 1, where, &routes)) != 0)
        return rc;
    if (json_array_size(routes) == 0)
        return bad_field(c, where, "Routes", "must not be empty");
    if (json_array_size(routes) > DEC_CHAIN_ROUTES_MAX)
        return bad_field(c, where, "Routes", "has too many entries");
    out->routes = xcalloc(json_array_size(routes), sizeof(*out->routes));
    for (size_t i = 0; i < json_array_size(routes); i++) {
        struct dec_chain_route *r = &out->routes[out->n_routes++];
        json_t *el = json_array_get(routes, i), *def, *match, *http, *dest;
        const char *next;
        char rw[360], mw[400];
        snprintf(rw, sizeof(rw), "%.290s.Routes[%zu]", where, i);
        if (!json_is_object(el))
            return bad_field(c, rw, "", "must be an object");
        snprintf(mw, sizeof(mw), "%s.Definition.Match.HTTP", rw);
        if ((rc = peek_str(c, el, "NextNode", 1, rw, &next)) != 0)
            return rc;
        r->next_node = xstrdup(next);
        if ((rc = get_obj(c, el, "Definition", 0, rw, &def)) != 0 ||
            (rc = get_obj(c, def, "Match", 0, rw, &match)) != 0 ||
            (rc = get_obj(c, match, "HTTP", 0, rw, &http)) != 0 ||
            (rc = decode_route_match(c, http, mw, r)) != 0)
            return rc;
        snprintf(mw, sizeof(mw), "%s.Definition.Destination", rw);
        if ((rc = get_obj(c, def, "Destination", 0, rw, &dest)) != 0 ||
            (rc = decode_destination(c, dest, mw, r)) != 0 ||
            (rc = route_splits(c, &b, next, rw, r)) != 0)
            return rc;
    }
    return 0;
}

static void route_dispose(struct dec_chain_route *r)
{
    free(r->next_node);
    free(r->path);
    for (size_t j = 0; j < r->n_headers; j++) {
        free(r->headers[j].name);
        free(r->headers[j].value);
    }
    free(r->headers);
    for (size_t j = 0; j < r->n_query; j++) {
        free(r->query[j].name);
        free(r->query[j].value);
    }
    free(r->query);
    str_list_free(r->methods, r->n_methods);
    free(r->prefix_rewrite);
    free(r->retry_status_codes);
    header_mods_dispose(&r->request_headers);
    header_mods_dispose(&r->response_headers);
    for (size_t j = 0; j < r->n_splits; j++) {
        header_mods_dispose(&r->splits[j].request_headers);
        header_mods_dispose(&r->splits[j].response_headers);
    }
    free(r->splits);
}

void dec_chain_routes_free(struct dec_chain_route *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        route_dispose(&v[i]);
    free(v);
}

void dec_chain_resolvers_free(struct dec_chain_resolver *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(v[i].name);
        free(v[i].targets);
        hash_policies_free(v[i].lb.hash, v[i].lb.n_hash);
    }
    free(v);
}

int decode_discovery_chain(const char *buf, size_t len, struct dec_chain *out, char *err,
                           size_t errlen)
{
    struct dctx c;
    json_t *root, *chain, *nodes, *targets;
    const char *start;
    struct chain_walk w = {0};
    ctx_init(&c, err, errlen);
    memset(out, 0, sizeof(*out));
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "discovery chain: the body must be a JSON object");
        goto out;
    }
    if ((rc = get_obj(&c, root, "Chain", 1, "", &chain)) != 0 ||
        (rc = get_str(&c, chain, "ServiceName", 1, "Chain", &out->service_name)) != 0 ||
        (rc = get_str(&c, chain, "Protocol", 0, "Chain", &out->protocol)) != 0 ||
        (rc = peek_str(&c, chain, "StartNode", 1, "Chain", &start)) != 0 ||
        (rc = get_obj(&c, chain, "Nodes", 1, "Chain", &nodes)) != 0 ||
        (rc = get_obj(&c, chain, "Targets", 1, "Chain", &targets)) != 0)
        goto out;
    if (member(nodes, start) == NULL || !json_is_object(member(nodes, start))) {
        rc = fail(&c, ERR_BAD_FIELD, "Chain.StartNode \"%s\" is not an object in Chain.Nodes",
                  start);
        goto out;
    }
    /* Every target any resolver reachable from the start node names is listed, the chain's
     * own service's first (a router's catch-all route), for the L4 relay and the health
     * watches; the routing pass then points its resolvers at them. The array is sized for
     * every target the chain lists; add_target refuses a name it does not list. */
    w.nodes = nodes;
    w.targets = targets;
    w.cap = json_object_size(nodes);
    w.seen = xcalloc(w.cap ? w.cap : 1, sizeof(*w.seen));
    out->targets = xcalloc(json_object_size(targets) + 1, sizeof(*out->targets));
    if ((rc = walk_node(&c, &w, start, out, 0)) != 0)
        goto out;
    if (out->n_targets == 0) {
        rc = fail(&c, ERR_BAD_FIELD, "Chain: no resolver reachable from StartNode \"%s\"", start);
        goto out;
    }
    rc = decode_routing(&c, nodes, start, out);
out:
    free(w.seen);
    json_decref(root);
    if (rc != 0)
        dec_chain_dispose(out);
    return rc;
}

void dec_chain_dispose(struct dec_chain *c)
{
    for (size_t i = 0; i < c->n_targets; i++) {
        struct dec_chain_target *t = &c->targets[i];
        free_strs(target_fields, ARRAY_SIZE(target_fields), t);
        free(t->filter);
    }
    free(c->targets);
    dec_chain_routes_free(c->routes, c->n_routes);
    dec_chain_resolvers_free(c->resolvers, c->n_resolvers);
    free(c->service_name);
    free(c->protocol);
    memset(c, 0, sizeof(*c));
}

/* ---- GET /v1/query/<name>/execute ---- */

int decode_prepared_query(const char *buf, size_t len, struct dec_query *out, char *err,
                          size_t errlen)
{
    struct dctx c;
    json_t *root, *nodes;
    ctx_init(&c, err, errlen);
    memset(out, 0, sizeof(*out));
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "prepared query: the body must be a JSON object");
        goto out;
    }
    if ((rc = get_str(&c, root, "Service", 0, "", &out->service)) != 0 ||
        (rc = get_str(&c, root, "Datacenter", 0, "", &out->datacenter)) != 0 ||
        (rc = get_arr(&c, root, "Nodes", 0, "", &nodes)) != 0)
        goto out;
    out->n_nodes = json_array_size(nodes);
    out->nodes = xcalloc(out->n_nodes, sizeof(*out->nodes));
    for (size_t i = 0; i < out->n_nodes && rc == 0; i++) {
        char where[40];
        snprintf(where, sizeof(where), "Nodes[%zu]", i);
        rc = decode_entry(&c, json_array_get(nodes, i), where, &out->nodes[i]);
    }
out:
    json_decref(root);
    if (rc != 0)
        dec_query_dispose(out);
    return rc;
}

void dec_query_dispose(struct dec_query *q)
{
    dec_endpoints_free(q->nodes, q->n_nodes);
    free(q->service);
    free(q->datacenter);
    memset(q, 0, sizeof(*q));
}

/* ---- /v1/agent/self ---- */

int decode_agent_self(const char *buf, size_t len, struct dec_agent_self *out, char *err,
                      size_t errlen)
{
    struct dctx c;
    json_t *root, *config = NULL, *debug = NULL, *acl = NULL, *mem = NULL;
    ctx_init(&c, err, errlen);
    memset(out, 0, sizeof(*out));
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "agent self: the body must be a JSON object");
        goto out;
    }
    if ((rc = get_obj(&c, root, "Config", 0, "", &config)) != 0 ||
        (rc = get_obj(&c, root, "DebugConfig", 0, "", &debug)) != 0 ||
        (rc = get_obj(&c, debug, "ACLResolverSettings", 0, "DebugConfig", &acl)) != 0 ||
        (rc = get_str(&c, config, "Datacenter", 0, "Config", &out->datacenter)) != 0 ||
        (rc = get_str(&c, debug, "DefaultIntentionPolicy", 0, "DebugConfig",
                      &out->default_intention_policy)) != 0 ||
        (rc = get_str(&c, acl, "ACLDefaultPolicy", 0, "DebugConfig.ACLResolverSettings",
                      &out->acl_default_policy)) != 0 ||
        (rc = get_bool(&c, debug, "ACLsEnabled", "DebugConfig", &out->acls_enabled)) != 0 ||
        (rc = get_obj(&c, root, "Member", 0, "", &mem)) != 0 ||
        (rc = get_str(&c, mem, "Addr", 0, "Member", &out->member_addr)) != 0)
        goto out;
    if (member(debug, "ACLsEnabled") == NULL)
        out->acls_enabled = -1;
out:
    json_decref(root);
    if (rc != 0)
        dec_agent_self_dispose(out);
    return rc;
}

void dec_agent_self_dispose(struct dec_agent_self *s)
{
    free(s->datacenter);
    free(s->default_intention_policy);
    free(s->member_addr);
    free(s->acl_default_policy);
    memset(s, 0, sizeof(*s));
}

/* ---- GET /v1/config/service-defaults/<service>: RateLimits ---- */

#define RATE_MAX 100000000

void dec_rate_limits_dispose(struct dec_rate_limits *c)
{
    for (size_t i = 0; i < c->n_routes; i++)
        free(c->routes[i].path);
    free(c->routes);
    memset(c, 0, sizeof(*c));
}

int dec_rate_limits_equal(const struct dec_rate_limits *a, const struct dec_rate_limits *b)
{
    if (a->per_second != b->per_second || a->burst != b->burst || a->n_routes != b->n_routes)
        return 0;
    for (size_t i = 0; i < a->n_routes; i++) {
        const struct dec_rate_route *x = &a->routes[i], *y = &b->routes[i];
        if (x->kind != y->kind || x->per_second != y->per_second || x->burst != y->burst ||
            strcmp(x->path, y->path) != 0)
            return 0;
    }
    return 1;
}

int decode_rate_limits(const char *buf, size_t len, struct dec_rate_limits *out, char *err,
                       size_t errlen)
{
    static const char where[] = "RateLimits.InstanceLevel";
    static const char *const keys[] = {"PathExact", "PathPrefix", "PathRegex"};
    struct dctx c;
    json_t *root, *rl = NULL, *il = NULL, *routes = NULL;
    const char *kind = "";
    int rps = 0, burst = 0;
    ctx_init(&c, err, errlen);
    memset(out, 0, sizeof(*out));
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "service-defaults: the body must be a JSON object");
        goto out;
    }
    if ((rc = peek_str(&c, root, "Kind", 0, "", &kind)) != 0)
        goto out;
    if (kind[0] != '\0' && strcmp(kind, "service-defaults") != 0) {
        rc = fail(&c, ERR_BAD_FIELD, "service-defaults: Kind is \"%.64s\"", kind);
        goto out;
    }
    if ((rc = get_obj(&c, root, "RateLimits", 0, "", &rl)) != 0 || rl == NULL ||
        (rc = get_obj(&c, rl, "InstanceLevel", 0, "RateLimits", &il)) != 0 || il == NULL ||
        (rc = get_int(&c, il, "RequestsPerSecond", 0, 0, RATE_MAX, where, &rps)) != 0 ||
        (rc = get_int(&c, il, "RequestsMaxBurst", 0, 0, RATE_MAX, where, &burst)) != 0 ||
        (rc = get_arr(&c, il, "Routes", 0, where, &routes)) != 0)
        goto out;
    out->per_second = (uint32_t)rps;
    out->burst = (uint32_t)burst;
    size_t n = routes != NULL ? json_array_size(routes) : 0;
    if (n > DEC_RATE_ROUTES_MAX) {
        rc = fail(&c, ERR_BAD_FIELD, "%s.Routes has %zu entries, more than %d", where, n,
                  DEC_RATE_ROUTES_MAX);
        goto out;
    }
    out->routes = n ? xcalloc(n, sizeof(*out->routes)) : NULL;
    for (size_t i = 0; i < n; i++) {
        json_t *r = json_array_get(routes, i);
        char at[64];
        snprintf(at, sizeof(at), "%s.Routes[%zu]", where, i);
        if (!json_is_object(r)) {
            rc = fail(&c, ERR_BAD_FIELD, "%s must be an object", at);
            goto out;
        }
        struct dec_rate_route *u = &out->routes[out->n_routes];
        const char *path = NULL;
        for (int k = 0; k < 3; k++) {
            const char *v;
            if ((rc = peek_str(&c, r, keys[k], 0, at, &v)) != 0)
                goto out;
            if (v[0] == '\0')
                continue;
            if (path != NULL) {
                rc = fail(&c, ERR_BAD_FIELD,
                          "%s names more than one of PathExact, PathPrefix "
                          "and PathRegex",
                          at);
                goto out;
            }
            path = v;
            u->kind = k == 0 ? DEC_PATH_EXACT : k == 1 ? DEC_PATH_PREFIX : DEC_PATH_REGEX;
        }
        if (path == NULL) {
            rc =
                fail(&c, ERR_BAD_FIELD, "%s names none of PathExact, PathPrefix and PathRegex", at);
            goto out;
        }
        if (strlen(path) > 4096) {
            rc = fail(&c, ERR_BAD_FIELD, "%s: the path is longer than 4096 bytes", at);
            goto out;
        }
        if ((rc = get_int(&c, r, "RequestsPerSecond", 0, 0, RATE_MAX, at, &rps)) != 0 ||
            (rc = get_int(&c, r, "RequestsMaxBurst", 0, 0, RATE_MAX, at, &burst)) != 0)
            goto out;
        u->path = xstrdup(path);
        u->per_second = (uint32_t)rps;
        u->burst = (uint32_t)burst;
        out->n_routes++;
    }
out:
    json_decref(root);
    if (rc != 0)
        dec_rate_limits_dispose(out);
    return rc;
}

/* ---- GET /v1/config/mesh/mesh ---- */

int decode_mesh_http(const char *buf, size_t len, struct mesh_http_cfg *out, char *err,
                     size_t errlen)
{
    static const char where[] = "HTTP.Incoming.RequestNormalization";
    struct dctx c;
    json_t *root, *http = NULL, *incoming = NULL, *rn = NULL;
    const char *kind = "", *slash = "", *under = "";
    ctx_init(&c, err, errlen);
    memset(out, 0, sizeof(*out));
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    if (!json_is_object(root)) {
        rc = fail(&c, ERR_BAD_FIELD, "mesh config entry: the body must be a JSON object");
        goto out;
    }
    if ((rc = peek_str(&c, root, "Kind", 0, "", &kind)) != 0)
        goto out;
    if (kind[0] != '\0' && strcmp(kind, "mesh") != 0) {
        rc = fail(&c, ERR_BAD_FIELD, "mesh config entry: Kind is \"%s\", not \"mesh\"", kind);
        goto out;
    }
    if ((rc = get_obj(&c, root, "HTTP", 0, "", &http)) != 0 ||
        (rc = get_obj(&c, http, "Incoming", 0, "HTTP", &incoming)) != 0 ||
        (rc = get_obj(&c, incoming, "RequestNormalization", 0, "HTTP.Incoming", &rn)) != 0 ||
        (rc = get_bool(&c, rn, "InsecureDisablePathNormalization", where,
                       &out->disable_path_normalization)) != 0 ||
        (rc = get_bool(&c, rn, "MergeSlashes", where, &out->merge_slashes)) != 0 ||
        (rc = peek_str(&c, rn, "PathWithEscapedSlashesAction", 0, where, &slash)) != 0 ||
        (rc = peek_str(&c, rn, "HeadersWithUnderscoresAction", 0, where, &under)) != 0)
        goto out;
    /* An action we do not know is an error, not a default: guessing could let through what the
     * operator meant to refuse. */
    if (pathnorm_escaped_slash_parse(slash, &out->escaped_slash) != 0) {
        rc = fail(&c, ERR_BAD_FIELD,
                  "%s.PathWithEscapedSlashesAction \"%.64s\" is not one of "
                  "IMPLEMENTATION_SPECIFIC_DEFAULT, KEEP_UNCHANGED, REJECT_REQUEST, "
                  "UNESCAPE_AND_FORWARD, UNESCAPE_AND_REDIRECT",
                  where, slash);
        goto out;
    }
    if (pathnorm_underscore_parse(under, &out->underscore) != 0)
        rc = fail(&c, ERR_BAD_FIELD,
                  "%s.HeadersWithUnderscoresAction \"%.64s\" is not one of ALLOW, REJECT_REQUEST, "
                  "DROP_HEADER",
                  where, under);
out:
    json_decref(root);
    if (rc != 0)
        memset(out, 0, sizeof(*out));
    return rc;
}

char *decode_proxy_registration_json(const struct dec_proxy_registration *r)
{
    use_wiping_alloc();
    json_t *proxy = json_pack("{s:s}", "DestinationServiceName", r->destination_service_name);
    if (r->local_service_address != NULL && r->local_service_address[0] != '\0') {
        json_object_set_new(proxy, "LocalServiceAddress", json_string(r->local_service_address));
        json_object_set_new(proxy, "LocalServicePort", json_integer(r->local_service_port));
    }
    json_t *root = json_pack("{s:s, s:s, s:s, s:s, s:i, s:o, s:{s:s, s:s, s:s, s:s, s:s}}", "Kind",
                             CONNECT_PROXY, "ID", r->id, "Name", r->name, "Address", r->address,
                             "Port", r->port, "Proxy", proxy, "Check", "CheckID", r->check_id,
                             "Name", r->check_name, "TTL", r->check_ttl, "Status", "passing",
                             "Notes", "connectd -register heartbeat");
    char *text = root != NULL ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (text == NULL) /* jansson fails here only when out of memory */
        abort();
    return text; /* from malloc: jansson's allocator here is malloc itself */
}

char *decode_authorize_request_json(const char *target, const char *client_uri,
                                    const char *client_serial)
{
    use_wiping_alloc();
    json_t *root = json_pack("{s:s, s:s, s:s}", "Target", target, "ClientCertURI", client_uri,
                             "ClientCertSerial", client_serial);
    char *text = root != NULL ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (text == NULL) /* jansson fails here only when out of memory */
        abort();
    return text; /* from malloc: jansson's allocator here is malloc itself */
}

int decode_authorize(const char *buf, size_t len, int *allowed, char *reason, size_t reason_len,
                     char *err, size_t errlen)
{
    struct dctx c;
    json_t *root;
    const char *r;
    ctx_init(&c, err, errlen);
    *allowed = 0;
    if (reason_len > 0)
        reason[0] = '\0';
    int rc = load(&c, buf, len, &root);
    if (rc != 0)
        return rc;
    json_t *a = json_is_object(root) ? member(root, "Authorized") : NULL;
    if (a == NULL || !json_is_boolean(a)) {
        rc = fail(&c, ERR_BAD_FIELD, "authorize: Authorized must be a boolean");
        goto out;
    }
    if ((rc = peek_str(&c, root, "Reason", 0, "authorize", &r)) != 0)
        goto out;
    *allowed = json_is_true(a);
    snprintf(reason, reason_len, "%s", r);
out:
    json_decref(root);
    return rc;
}

const char *decode_lib_version(void)
{
    return jansson_version_str();
}
