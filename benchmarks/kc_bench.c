/*
 * kc_bench.c -- the "raw C" column of the benchmark: the C layer's own
 * kc_* functions (csrc/keychain.h) called in a timed loop, with no Python
 * and no binding in between.
 *
 * The runner compiles this file together with the very csrc/ sources the
 * extension is built from (the list and the flags come from
 * csrc/build_ffi.py), so "C extension vs raw C" is the cost of the cffi
 * binding and nothing else.  This file makes no PKCS#11 or OpenSSL call of
 * its own: it cannot drift from the C layer (tests/test_benchmarks.py
 * checks that).  The one exception is reading the call counter of
 * tests/p11shim (p11shim_total) when the module is the shim.
 *
 * Two ways to run it, same code:
 *   - a program: the settings arrive on standard input, one key=value per
 *     line (the PIN and the p12 password never go in argv); the result is
 *     one JSON object on standard output;
 *   - a shared library (-DKC_BENCH_LIBRARY): kc_bench_run(spec, out, cap)
 *     with the same settings text, called in-process by the benchmark so
 *     that it shares the one SoftHSM2 instance with the other
 *     implementations.  (Its copy of the C layer has its own module
 *     registry: it finds the module initialized and the token logged in,
 *     which the C layer handles; nobody calls C_Finalize.)
 *
 * Settings: module, token, pin, state_dir, label, mode, iterations (default 100),
 * ephemeral (1 = session objects, the default; 0 = token objects),
 * p12 + password (the identity, a file read once before the loop);
 *   mode=cycle   kc_preauth_key + kc_kill_key per iteration
 *                -> samples_ms, calls {preauth, kill} (first iteration)
 *   mode=lookup  kc_lookup_keychain_item of label (a hit) and of
 *                missing (a miss) per iteration; with import=1 the p12 is
 *                imported under label first and killed at the end
 *                -> hit_samples_ms, miss_samples_ms, calls {lookup_hit,
 *                lookup_miss}
 *   mode=list    kc_list_items per iteration into a buffer sized by one
 *                untimed call first (so each sample is one call, as a C
 *                caller that keeps its buffer would make it; the binding
 *                starts from room for 64 every time, and what that costs
 *                shows up as its overhead) -> samples_ms, count
 *   mode=threads threads (1..8) threads, each with its own handle and its
 *                own identity (p12 for thread 0, p12_1 .. p12_7 for the
 *                others: the store refuses the same key twice), cycling
 *                ephemeral identities for `seconds`
 *                -> cycles, seconds, cycles_per_s
 *   mode=calls   the operations of the runner's call count, once each,
 *                on the module (the p11shim) -> calls {preauth, kill,
 *                cycle_token, lookup_hit, lookup_miss, kill_foreign}:
 *                ephemeral preauth and kill, a token-object cycle (its
 *                lease a file in state_dir), lookup hit and miss, and the
 *                kill of a token identity another handle of this process
 *                imported (the lease names this process: kc_kill_key
 *                removes it as its own)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "keychain.h"

#define MAX_THREADS 8

/* ------------------------------------------------------------- settings */

typedef struct settings {
    char module[4096], token[64], pin[256], p12[4096], password[256];
    char label[200], missing[256], mode[16], state_dir[4096];
    char thread_p12[MAX_THREADS][4096]; /* [0] unused: thread 0 has p12 */
    long iterations;
    int ephemeral, import, threads;
    double seconds;
} settings;

static void set_field(settings *s, const char *key, const char *val)
{
#define STR(name)                                                       \
    if (!strcmp(key, #name)) {                                          \
        snprintf(s->name, sizeof s->name, "%s", val);                   \
        return;                                                         \
    }
    STR(module) STR(token) STR(pin) STR(p12) STR(password) STR(label)
    STR(missing) STR(mode) STR(state_dir)
#undef STR
    if (!strncmp(key, "p12_", 4) && key[4] >= '1' && key[4] <= '7' && !key[5]) {
        snprintf(s->thread_p12[key[4] - '0'], sizeof s->thread_p12[0], "%s", val);
        return;
    }
    if (!strcmp(key, "iterations"))
        s->iterations = atol(val);
    else if (!strcmp(key, "ephemeral"))
        s->ephemeral = atoi(val);
    else if (!strcmp(key, "import"))
        s->import = atoi(val);
    else if (!strcmp(key, "threads"))
        s->threads = atoi(val);
    else if (!strcmp(key, "seconds"))
        s->seconds = atof(val);
}

static void parse_settings(const char *text, settings *s)
{
    const char *p = text;
    memset(s, 0, sizeof *s);
    snprintf(s->label, sizeof s->label, "kc-bench");
    snprintf(s->mode, sizeof s->mode, "cycle");
    s->iterations = 100;
    s->ephemeral = 1;
    s->threads = 1;
    s->seconds = 1.0;
    while (*p) {
        const char *nl = strchr(p, '\n');
        char *eq;
        size_t n = nl ? (size_t)(nl - p) : strlen(p);
        char line[8192];
        if (n >= sizeof line)
            n = sizeof line - 1;
        memcpy(line, p, n);
        line[n] = 0;
        if ((eq = strchr(line, '='))) {
            *eq = 0;
            set_field(s, line, eq + 1);
        }
        p += n + (nl ? 1 : 0);
    }
    if (!s->missing[0])
        snprintf(s->missing, sizeof s->missing, "%s-missing", s->label);
}

/* Overwrite the secrets (settings and the text they came from). */
static void wipe(volatile void *p, size_t n)
{
    volatile unsigned char *b = p;
    while (n--)
        *b++ = 0;
}

/* ---------------------------------------------------------------- output */

typedef struct outbuf {
    char *p;
    size_t cap, len;
} outbuf;

static void out(outbuf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out(outbuf *o, const char *fmt, ...)
{
    va_list ap;
    int n;
    if (!o->cap || o->len >= o->cap - 1)
        return;
    va_start(ap, fmt);
    n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
    va_end(ap);
    if (n > 0)
        o->len += (size_t)n < o->cap - o->len ? (size_t)n : o->cap - o->len - 1;
}

/* A JSON string body: the C layer's messages carry paths and labels. */
static void out_escaped(outbuf *o, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            out(o, "\\%c", c);
        else if (c < 0x20)
            out(o, "\\u%04x", c);
        else
            out(o, "%c", c);
    }
}

static int fail(outbuf *o, const char *what, int32_t status, const kc_error *err)
{
    o->len = 0;
    if (o->cap)
        o->p[0] = 0;
    out(o, "{\"error\": \"");
    out_escaped(o, what);
    if (status) {
        out(o, ": OSStatus %d", (int)status);
        if (err && err->message[0]) {
            out(o, " (");
            out_escaped(o, err->message);
            out(o, ")");
        }
    }
    out(o, "\", \"status\": %d}", (int)status);
    return 1;
}

static void out_samples(outbuf *o, const char *name, const double *v, long n)
{
    long i;
    out(o, ", \"%s\": [", name);
    for (i = 0; i < n; i++)
        out(o, "%s%.6f", i ? ", " : "", v[i]);
    out(o, "]");
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ----------------------------------------------------------- p11shim */

typedef unsigned long (*total_fn)(void);

/* p11shim_total of the module when it is tests/p11shim (already loaded by
 * kc_open), else NULL. */
static total_fn shim_counter(const char *module)
{
    void *dl = dlopen(module, RTLD_NOW | RTLD_NOLOAD);
    total_fn f = NULL;
    if (dl) {
        f = (total_fn)dlsym(dl, "p11shim_total");
        dlclose(dl); /* the C layer's own reference keeps it loaded */
    }
    return f;
}

static unsigned long calls(total_fn f)
{
    return f ? f() : 0;
}

/* ------------------------------------------------------------- inputs */

typedef struct bytes {
    uint8_t *p;
    size_t n;
} bytes;

static int read_file(const char *path, bytes *b)
{
    FILE *fp = fopen(path, "rb");
    long len;
    memset(b, 0, sizeof *b);
    if (!fp)
        return 0;
    if (fseek(fp, 0, SEEK_END) || (len = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET)) {
        fclose(fp);
        return 0;
    }
    b->n = (size_t)len;
    b->p = malloc(b->n ? b->n : 1);
    if (!b->p || fread(b->p, 1, b->n, fp) != b->n) {
        fclose(fp);
        free(b->p);
        b->p = NULL;
        return 0;
    }
    fclose(fp);
    return 1;
}

static int32_t open_store(const settings *s, kc_keychain **kc, kc_error *err)
{
    kc_options opts;
    memset(&opts, 0, sizeof opts);
    opts.module = s->module;
    opts.token = s->token;
    opts.pin = s->pin;
    opts.state_dir = s->state_dir[0] ? s->state_dir : NULL; /* as Keychain */
    return kc_open(&opts, kc, err);
}

static int flags_of(int ephemeral)
{
    return ephemeral ? KC_PREAUTH_EPHEMERAL : 0;
}

/* --------------------------------------------------------------- modes */

static int mode_cycle(const settings *s, const bytes *p12, outbuf *o)
{
    kc_keychain *kc = NULL;
    kc_error err;
    kc_item_info info;
    long n = s->iterations, i;
    double *samples = calloc((size_t)n, sizeof *samples);
    unsigned long c0, c1, c2, pre = 0, kill = 0;
    total_fn counter;
    int32_t st;
    int rc = 1;

    memset(&err, 0, sizeof err);
    if (!samples) {
        fail(o, "out of memory", 0, NULL);
        goto done;
    }
    if ((st = open_store(s, &kc, &err))) {
        fail(o, "kc_open", st, &err);
        goto done;
    }
    counter = shim_counter(s->module);
    for (i = 0; i < n; i++) {
        double t0 = now_ms();
        c0 = calls(counter);
        st = kc_preauth_key(kc, p12->p, p12->n, s->password, s->label,
                            flags_of(s->ephemeral), &info, &err);
        c1 = calls(counter);
        if (st) {
            fail(o, "kc_preauth_key", st, &err);
            goto done;
        }
        st = kc_kill_key(kc, s->label, 0, &err);
        samples[i] = now_ms() - t0;
        c2 = calls(counter);
        if (st) {
            fail(o, "kc_kill_key", st, &err);
            goto done;
        }
        if (i == 0) {
            pre = c1 - c0;
            kill = c2 - c1;
        }
    }
    out(o, "{\"mode\": \"cycle\", \"iterations\": %ld, \"ephemeral\": %d", n, s->ephemeral);
    out_samples(o, "samples_ms", samples, n);
    if (counter)
        out(o, ", \"calls\": {\"preauth\": %lu, \"kill\": %lu}", pre, kill);
    out(o, "}");
    rc = 0;
done:
    kc_close(kc);
    free(samples);
    return rc;
}

static int mode_lookup(const settings *s, const bytes *p12, outbuf *o)
{
    kc_keychain *kc = NULL;
    kc_error err;
    kc_item_info info;
    long n = s->iterations, i;
    double *hit = calloc((size_t)n, sizeof *hit), *miss = calloc((size_t)n, sizeof *miss);
    unsigned long c0, c1, c2, ch = 0, cm = 0;
    total_fn counter;
    int imported = 0, rc = 1;
    int32_t st;

    memset(&err, 0, sizeof err);
    if (!hit || !miss) {
        fail(o, "out of memory", 0, NULL);
        goto done;
    }
    if ((st = open_store(s, &kc, &err))) {
        fail(o, "kc_open", st, &err);
        goto done;
    }
    if (s->import) {
        if ((st = kc_preauth_key(kc, p12->p, p12->n, s->password, s->label,
                                 flags_of(s->ephemeral), &info, &err))) {
            fail(o, "kc_preauth_key", st, &err);
            goto done;
        }
        imported = 1;
    }
    counter = shim_counter(s->module);
    for (i = 0; i < n; i++) {
        double t0, t1, t2;
        c0 = calls(counter);
        t0 = now_ms();
        st = kc_lookup_keychain_item(kc, s->label, &info, &err);
        t1 = now_ms();
        c1 = calls(counter);
        if (st) {
            fail(o, "kc_lookup_keychain_item (hit)", st, &err);
            goto done;
        }
        st = kc_lookup_keychain_item(kc, s->missing, &info, &err);
        t2 = now_ms();
        c2 = calls(counter);
        if (st != KC_errSecItemNotFound) {
            fail(o, "kc_lookup_keychain_item (miss) did not report errSecItemNotFound",
                 st ? st : -1, &err);
            goto done;
        }
        hit[i] = t1 - t0;
        miss[i] = t2 - t1;
        if (i == 0) {
            ch = c1 - c0;
            cm = c2 - c1;
        }
    }
    out(o, "{\"mode\": \"lookup\", \"iterations\": %ld", n);
    out_samples(o, "hit_samples_ms", hit, n);
    out_samples(o, "miss_samples_ms", miss, n);
    if (counter)
        out(o, ", \"calls\": {\"lookup_hit\": %lu, \"lookup_miss\": %lu}", ch, cm);
    out(o, "}");
    rc = 0;
done:
    if (imported && (st = kc_kill_key(kc, s->label, 0, &err)) && !rc)
        rc = fail(o, "kc_kill_key", st, &err);
    kc_close(kc);
    free(hit);
    free(miss);
    return rc;
}

static int mode_list(const settings *s, outbuf *o)
{
    kc_keychain *kc = NULL;
    kc_error err;
    long n = s->iterations, i;
    double *samples = calloc((size_t)n, sizeof *samples);
    size_t cap = 64, count = 0;
    kc_item_info *items = calloc(cap, sizeof *items);
    int rc = 1;
    int32_t st;

    memset(&err, 0, sizeof err);
    if (!samples || !items) {
        fail(o, "out of memory", 0, NULL);
        goto done;
    }
    if ((st = open_store(s, &kc, &err))) {
        fail(o, "kc_open", st, &err);
        goto done;
    }
    for (i = -1; i < n; i++) { /* i = -1: sizes the buffer, untimed */
        double t0 = now_ms();
        for (;;) {
            if ((st = kc_list_items(kc, items, cap, &count, &err))) {
                fail(o, "kc_list_items", st, &err);
                goto done;
            }
            if (count <= cap)
                break;
            free(items);
            cap = count;
            if (!(items = calloc(cap, sizeof *items))) {
                fail(o, "out of memory", 0, NULL);
                goto done;
            }
        }
        if (i >= 0)
            samples[i] = now_ms() - t0;
    }
    out(o, "{\"mode\": \"list\", \"iterations\": %ld, \"count\": %zu", n, count);
    out_samples(o, "samples_ms", samples, n);
    out(o, "}");
    rc = 0;
done:
    kc_close(kc);
    free(items);
    free(samples);
    return rc;
}

typedef struct worker {
    const settings *s;
    kc_keychain *kc;
    bytes p12;
    char label[256];
    pthread_barrier_t *start;
    volatile int *stop;
    long cycles;
    int32_t status;
    kc_error err;
} worker;

static void *work(void *arg)
{
    worker *w = arg;
    kc_item_info info;
    pthread_barrier_wait(w->start);
    while (!__atomic_load_n(w->stop, __ATOMIC_ACQUIRE)) {
        if ((w->status = kc_preauth_key(w->kc, w->p12.p, w->p12.n, w->s->password,
                                        w->label, KC_PREAUTH_EPHEMERAL, &info, &w->err)))
            break;
        if ((w->status = kc_kill_key(w->kc, w->label, 0, &w->err)))
            break;
        w->cycles++;
    }
    return NULL;
}

static int mode_threads(const settings *s, const bytes *p12, outbuf *o)
{
    int nt = s->threads < 1 ? 1 : s->threads > MAX_THREADS ? MAX_THREADS : s->threads;
    worker w[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    pthread_barrier_t start;
    volatile int stop = 0;
    struct timespec pause;
    double t0, t1;
    long total = 0;
    int t, rc = 1;
    int32_t st;

    memset(w, 0, sizeof w);
    pthread_barrier_init(&start, NULL, (unsigned)nt + 1);
    for (t = 0; t < nt; t++) {
        w[t].s = s;
        w[t].start = &start;
        w[t].stop = &stop;
        snprintf(w[t].label, sizeof w[t].label, "%s-t%d", s->label, t);
        if (t == 0) {
            w[t].p12 = *p12;
        } else if (!s->thread_p12[t][0] || !read_file(s->thread_p12[t], &w[t].p12)) {
            fail(o, "every thread needs its own identity (p12_1 .. p12_7)", 0, NULL);
            goto done;
        }
        if ((st = open_store(s, &w[t].kc, &w[t].err))) {
            fail(o, "kc_open", st, &w[t].err);
            goto done;
        }
    }
    for (t = 0; t < nt; t++)
        pthread_create(&tid[t], NULL, work, &w[t]);
    pthread_barrier_wait(&start);
    t0 = now_ms();
    pause.tv_sec = (time_t)s->seconds;
    pause.tv_nsec = (long)((s->seconds - (double)pause.tv_sec) * 1e9);
    nanosleep(&pause, NULL);
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
    for (t = 0; t < nt; t++)
        pthread_join(tid[t], NULL);
    t1 = now_ms();
    for (t = 0; t < nt; t++) {
        if (w[t].status) {
            fail(o, "a thread's cycle failed", w[t].status, &w[t].err);
            goto done;
        }
        total += w[t].cycles;
    }
    out(o, "{\"mode\": \"threads\", \"threads\": %d, \"cycles\": %ld, \"seconds\": %.6f, "
           "\"cycles_per_s\": %.3f}",
        nt, total, (t1 - t0) / 1e3, (double)total / ((t1 - t0) / 1e3));
    rc = 0;
done:
    for (t = 0; t < nt; t++) {
        kc_close(w[t].kc);
        if (t)
            free(w[t].p12.p);
    }
    pthread_barrier_destroy(&start);
    return rc;
}

/* The runner's call count, operation by operation, for this driver. */
static int mode_calls(const settings *s, const bytes *p12, outbuf *o)
{
    kc_keychain *kc = NULL, *other = NULL;
    kc_error err;
    kc_item_info info;
    char foreign[256];
    unsigned long c0, pre, kill, cycle_token, hit, miss, kill_foreign;
    total_fn counter;
    int32_t st;
    int rc = 1;

#define STEP(call, what)                                                \
    if ((st = (call))) {                                                \
        fail(o, what, st, &err);                                        \
        goto done;                                                      \
    }
    memset(&err, 0, sizeof err);
    snprintf(foreign, sizeof foreign, "%s-other", s->label);
    STEP(open_store(s, &kc, &err), "kc_open");
    if (!(counter = shim_counter(s->module))) {
        fail(o, "the module is not the p11shim (no p11shim_total)", 0, NULL);
        goto done;
    }
    /* warm up */
    STEP(kc_preauth_key(kc, p12->p, p12->n, s->password, s->label, KC_PREAUTH_EPHEMERAL,
                        &info, &err), "kc_preauth_key");
    STEP(kc_kill_key(kc, s->label, 0, &err), "kc_kill_key");
    /* ephemeral preauth, kill */
    c0 = calls(counter);
    STEP(kc_preauth_key(kc, p12->p, p12->n, s->password, s->label, KC_PREAUTH_EPHEMERAL,
                        &info, &err), "kc_preauth_key");
    pre = calls(counter) - c0;
    c0 = calls(counter);
    STEP(kc_kill_key(kc, s->label, 0, &err), "kc_kill_key");
    kill = calls(counter) - c0;
    /* token-object cycle */
    c0 = calls(counter);
    STEP(kc_preauth_key(kc, p12->p, p12->n, s->password, s->label, 0, &info, &err),
         "kc_preauth_key (token objects)");
    STEP(kc_kill_key(kc, s->label, 0, &err), "kc_kill_key (token objects)");
    cycle_token = calls(counter) - c0;
    /* lookup hit and miss of an ephemeral identity */
    STEP(kc_preauth_key(kc, p12->p, p12->n, s->password, s->label, KC_PREAUTH_EPHEMERAL,
                        &info, &err), "kc_preauth_key");
    c0 = calls(counter);
    STEP(kc_lookup_keychain_item(kc, s->label, &info, &err), "kc_lookup_keychain_item");
    hit = calls(counter) - c0;
    c0 = calls(counter);
    st = kc_lookup_keychain_item(kc, s->missing, &info, &err);
    miss = calls(counter) - c0;
    if (st != KC_errSecItemNotFound) {
        fail(o, "kc_lookup_keychain_item (miss) did not report errSecItemNotFound",
             st ? st : -1, &err);
        goto done;
    }
    STEP(kc_kill_key(kc, s->label, 0, &err), "kc_kill_key");
    /* kill of a token identity another handle of this process imported:
     * ownership is per process (the lease names it), so no KC_KILL_FORCE */
    STEP(open_store(s, &other, &err), "kc_open (second handle)");
    STEP(kc_preauth_key(other, p12->p, p12->n, s->password, foreign, 0, &info, &err),
         "kc_preauth_key (second handle)");
    c0 = calls(counter);
    STEP(kc_kill_key(kc, foreign, 0, &err), "kc_kill_key (another handle's identity)");
    kill_foreign = calls(counter) - c0;
#undef STEP
    out(o, "{\"mode\": \"calls\", \"calls\": {\"preauth\": %lu, \"kill\": %lu, "
           "\"cycle_token\": %lu, \"lookup_hit\": %lu, \"lookup_miss\": %lu, "
           "\"kill_foreign\": %lu}}",
        pre, kill, cycle_token, hit, miss, kill_foreign);
    rc = 0;
done:
    kc_close(other);
    kc_close(kc);
    return rc;
}

static int run_settings(const settings *s, outbuf *o)
{
    bytes p12 = {NULL, 0};
    int rc;

    if (s->iterations < 1)
        return fail(o, "iterations must be positive", 0, NULL);
    /* every mode but list, and lookup of an identity already there, imports */
    if ((strcmp(s->mode, "list") && (strcmp(s->mode, "lookup") || s->import)) &&
        !read_file(s->p12, &p12))
        return fail(o, "cannot read the p12 file", 0, NULL);
    if (!strcmp(s->mode, "cycle"))
        rc = mode_cycle(s, &p12, o);
    else if (!strcmp(s->mode, "lookup"))
        rc = mode_lookup(s, &p12, o);
    else if (!strcmp(s->mode, "list"))
        rc = mode_list(s, o);
    else if (!strcmp(s->mode, "threads"))
        rc = mode_threads(s, &p12, o);
    else if (!strcmp(s->mode, "calls"))
        rc = mode_calls(s, &p12, o);
    else
        rc = fail(o, "unknown mode", 0, NULL);
    free(p12.p);
    return rc;
}

#ifdef KC_BENCH_LIBRARY
/* In-process entry point: settings text in, JSON out.  0 on success.
 * Exported even when the C layer's flags hide every other symbol
 * (-fvisibility=hidden). */
__attribute__((visibility("default"))) int kc_bench_run(const char *spec, char *result,
                                                        size_t cap);
int kc_bench_run(const char *spec, char *result, size_t cap)
{
    settings s;
    outbuf o = {result, cap, 0};
    int rc;
    if (cap)
        result[0] = 0;
    parse_settings(spec, &s);
    rc = run_settings(&s, &o);
    wipe(&s, sizeof s);
    return rc;
}
#else
int main(void)
{
    static char text[65536], result[1 << 22];
    size_t n = fread(text, 1, sizeof text - 1, stdin);
    settings s;
    outbuf o = {result, sizeof result, 0};
    int rc;
    text[n] = 0;
    parse_settings(text, &s);
    wipe(text, sizeof text);
    rc = run_settings(&s, &o);
    wipe(&s, sizeof s);
    puts(result);
    return rc;
}
#endif
