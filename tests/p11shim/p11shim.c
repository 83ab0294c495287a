/*
 * p11shim: a test-only PKCS#11 module that forwards every call to a real
 * module (env P11SHIM_TARGET) while counting calls, recording their order and
 * failing chosen calls on command.  See p11shim.h for the control API.
 *
 * What is counted: every C_* call except C_GetFunctionList (the loader's
 * entry point, called any number of times before anything happens).  The
 * counters, the trace and the fault positions all use the same numbering,
 * 1-based from the last p11shim_reset() (or from load time).
 */
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/pkcs11.h>

#include "p11shim.h"

/* Every forwarded function except C_Initialize and C_GetFunctionList, which
 * are written by hand below: X(name, parameter list, argument list). */
#define GENERIC(X) \
X(C_Finalize, (void *r), (r)) \
X(C_GetInfo, (CK_INFO_PTR i), (i)) \
X(C_GetSlotInfo, (CK_SLOT_ID s, CK_SLOT_INFO_PTR i), (s, i)) \
X(C_GetTokenInfo, (CK_SLOT_ID s, CK_TOKEN_INFO_PTR i), (s, i)) \
X(C_GetMechanismList, (CK_SLOT_ID s, CK_MECHANISM_TYPE_PTR m, CK_ULONG_PTR c), (s, m, c)) \
X(C_GetMechanismInfo, (CK_SLOT_ID s, CK_MECHANISM_TYPE t, CK_MECHANISM_INFO_PTR i), (s, t, i)) \
X(C_InitToken, (CK_SLOT_ID s, CK_UTF8CHAR_PTR p, CK_ULONG n, CK_UTF8CHAR_PTR l), (s, p, n, l)) \
X(C_InitPIN, (CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR p, CK_ULONG n), (h, p, n)) \
X(C_SetPIN, (CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR o, CK_ULONG on, CK_UTF8CHAR_PTR p, CK_ULONG n), (h, o, on, p, n)) \
X(C_OpenSession, (CK_SLOT_ID s, CK_FLAGS f, CK_VOID_PTR a, CK_NOTIFY cb, CK_SESSION_HANDLE_PTR h), (s, f, a, cb, h)) \
X(C_CloseSession, (CK_SESSION_HANDLE h), (h)) \
X(C_CloseAllSessions, (CK_SLOT_ID s), (s)) \
X(C_GetSessionInfo, (CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR i), (h, i)) \
X(C_GetOperationState, (CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG_PTR n), (h, s, n)) \
X(C_SetOperationState, (CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG n, CK_OBJECT_HANDLE e, CK_OBJECT_HANDLE a), (h, s, n, e, a)) \
X(C_Login, (CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR_PTR p, CK_ULONG n), (h, u, p, n)) \
X(C_Logout, (CK_SESSION_HANDLE h), (h)) \
X(C_CreateObject, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR o), (h, t, n, o)) \
X(C_CopyObject, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR no), (h, o, t, n, no)) \
X(C_DestroyObject, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o), (h, o)) \
X(C_GetObjectSize, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ULONG_PTR n), (h, o, n)) \
X(C_SetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, o, t, n)) \
X(C_FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, t, n)) \
X(C_FindObjectsFinal, (CK_SESSION_HANDLE h), (h)) \
X(C_EncryptInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k)) \
X(C_Encrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_EncryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_EncryptFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, o, on)) \
X(C_DecryptInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k)) \
X(C_Decrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_DecryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_DecryptFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, o, on)) \
X(C_DigestInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m), (h, m)) \
X(C_Digest, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_DigestUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn), (h, d, dn)) \
X(C_DigestKey, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE k), (h, k)) \
X(C_DigestFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, o, on)) \
X(C_SignInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k)) \
X(C_Sign, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_SignUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn), (h, d, dn)) \
X(C_SignFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, o, on)) \
X(C_SignRecoverInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k)) \
X(C_SignRecover, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_VerifyInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k)) \
X(C_Verify, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR s, CK_ULONG sn), (h, d, dn, s, sn)) \
X(C_VerifyUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn), (h, d, dn)) \
X(C_VerifyFinal, (CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG sn), (h, s, sn)) \
X(C_VerifyRecoverInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k)) \
X(C_VerifyRecover, (CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG sn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, s, sn, o, on)) \
X(C_DigestEncryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_DecryptDigestUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_SignEncryptUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG dn, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, d, dn, o, on)) \
X(C_GenerateKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k), (h, m, t, n, k)) \
X(C_GenerateKeyPair, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_ATTRIBUTE_PTR pt, CK_ULONG pn, CK_ATTRIBUTE_PTR st, CK_ULONG sn, CK_OBJECT_HANDLE_PTR pk, CK_OBJECT_HANDLE_PTR sk), (h, m, pt, pn, st, sn, pk, sk)) \
X(C_WrapKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE w, CK_OBJECT_HANDLE k, CK_BYTE_PTR o, CK_ULONG_PTR on), (h, m, w, k, o, on)) \
X(C_UnwrapKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE u, CK_BYTE_PTR w, CK_ULONG wn, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k), (h, m, u, w, wn, t, n, k)) \
X(C_DeriveKey, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k), (h, m, b, t, n, k)) \
X(C_SeedRandom, (CK_SESSION_HANDLE h, CK_BYTE_PTR s, CK_ULONG n), (h, s, n)) \
X(C_GenerateRandom, (CK_SESSION_HANDLE h, CK_BYTE_PTR r, CK_ULONG n), (h, r, n)) \
X(C_GetFunctionStatus, (CK_SESSION_HANDLE h), (h)) \
X(C_CancelFunction, (CK_SESSION_HANDLE h), (h)) \
X(C_WaitForSlotEvent, (CK_FLAGS f, CK_SLOT_ID_PTR s, CK_VOID_PTR r), (f, s, r))

/* The functions that can lie (P11SHIM_LIE): forwarded like the others, then
 * their answer is bent as a buggy module would bend it (see lie_* below). */
#define LIARS(X) \
X(C_GetSlotList, (CK_BBOOL p, CK_SLOT_ID_PTR l, CK_ULONG_PTR c), (p, l, c)) \
X(C_GetAttributeValue, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, o, t, n)) \
X(C_FindObjects, (CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR o, CK_ULONG m, CK_ULONG_PTR n), (h, o, m, n))

#define ALL(X) GENERIC(X) LIARS(X)

#define AS_ENUM(name, params, args) IDX_##name,
#define AS_NAME(name, params, args) #name,
enum { IDX_C_Initialize, IDX_C_GetFunctionList, ALL(AS_ENUM) N_FUNCS };
static const char *const names[N_FUNCS] = {
    "C_Initialize", "C_GetFunctionList", ALL(AS_NAME)
};

/* The trace keeps one byte per call; the cap bounds memory in long
 * benchmark runs (counters stay exact past it). */
#define TRACE_CAP (1UL << 24)

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long counts[N_FUNCS], total, fired;
static unsigned char *trace;
static unsigned long trace_len, trace_size;
static unsigned long fail_n, fail_rv;                 /* p11shim_fail_at */
static unsigned long kill_after_n;                    /* P11SHIM_KILL_AFTER */
static unsigned long fn_fail_k[N_FUNCS], fn_fail_rv[N_FUNCS];
static enum { LIE_NONE, LIE_FIND_COUNT, LIE_SLOT_COUNT, LIE_ATTR_LENGTH } lie_mode;
static unsigned long lies; /* answers bent since the last reset */

static void *target_handle;
static CK_FUNCTION_LIST_PTR real;  /* the target's list, NULL until loaded */

static int name_index(const char *fname)
{
    if (fname == NULL)
        return -1;
    for (int i = 0; i < N_FUNCS; i++)
        if (strcmp(names[i], fname) == 0)
            return i;
    return -1;
}

/* Count and trace one call; returns 1 (and the rv to return) when the call
 * must fail instead of being forwarded. */
static int shim_enter(int idx, CK_RV *rv, int *kill_after)
{
    int fail = 0;

    pthread_mutex_lock(&lock);
    unsigned long n = ++total;
    unsigned long k = ++counts[idx];
    if (trace_len == trace_size && trace_size < TRACE_CAP) {
        unsigned long size = trace_size ? trace_size * 2 : 4096;
        unsigned char *p = realloc(trace, size);
        if (p != NULL) {
            trace = p;
            trace_size = size;
        }
    }
    if (trace_len < trace_size)
        trace[trace_len++] = (unsigned char)idx;
    if (fail_n != 0 && n == fail_n) {
        fail = 1;
        *rv = fail_rv;
    } else if (fn_fail_k[idx] != 0 && k == fn_fail_k[idx]) {
        fail = 1;
        *rv = fn_fail_rv[idx];
    }
    fired += fail;
    *kill_after = kill_after_n != 0 && n == kill_after_n;
    pthread_mutex_unlock(&lock);
    return fail;
}

/* The list handed out points at these static functions rather than at the
 * exported C_* symbols, so that another module's C_* loaded RTLD_GLOBAL in
 * the same process can never interpose and bypass the shim. */
#define FORWARD_THEN(name, params, args, then)           \
    static CK_RV shim_##name params                      \
    {                                                    \
        CK_RV rv;                                        \
        int kill_after;                                  \
        if (shim_enter(IDX_##name, &rv, &kill_after))    \
            return rv;                                   \
        if (real == NULL)                                \
            return CKR_CRYPTOKI_NOT_INITIALIZED;         \
        if (real->name == NULL)                          \
            return CKR_FUNCTION_NOT_SUPPORTED;           \
        rv = real->name args;                            \
        if (kill_after)                                  \
            raise(SIGKILL); /* a crash right after it */ \
        then;                                            \
        return rv;                                       \
    }
#define FORWARD(name, params, args) FORWARD_THEN(name, params, args, (void)0)
#define FORWARD_LIAR(name, params, args) \
    FORWARD_THEN(name, params, args, if (rv == CKR_OK) lie_##name args)
GENERIC(FORWARD)


static void told_a_lie(void)
{
    pthread_mutex_lock(&lock);
    lies++;
    pthread_mutex_unlock(&lock);
}

/* A count beyond the room the caller gave (only max handles written). */
static void lie_C_FindObjects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR o,
                              CK_ULONG max, CK_ULONG_PTR n)
{
    (void)h, (void)o;
    if (lie_mode == LIE_FIND_COUNT) {
        *n = max + 1000;
        told_a_lie();
    }
}

/* More slots than the list it filled holds. */
static void lie_C_GetSlotList(CK_BBOOL p, CK_SLOT_ID_PTR l, CK_ULONG_PTR c)
{
    (void)p;
    if (lie_mode == LIE_SLOT_COUNT && l != NULL) {
        *c += 1000;
        told_a_lie();
    }
}

/* Values longer than the buffers they were written into. */
static void lie_C_GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE o,
                                    CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
    (void)h, (void)o;
    if (lie_mode != LIE_ATTR_LENGTH)
        return;
    for (CK_ULONG i = 0; i < n; i++)
        if (t[i].pValue != NULL && t[i].ulValueLen != CK_UNAVAILABLE_INFORMATION) {
            t[i].ulValueLen += 1000;
            told_a_lie();
        }
}
LIARS(FORWARD_LIAR)

/* Load the target once and keep it for the life of the process: unloading
 * on C_Finalize would break callers that re-initialize. */
static CK_RV load_target(void)
{
    CK_RV rv = CKR_OK;

    pthread_mutex_lock(&lock);
    if (real == NULL) {
        const char *path = getenv("P11SHIM_TARGET");
        CK_C_GetFunctionList get = NULL;
        if (path == NULL || *path == '\0') {
            fprintf(stderr, "p11shim: P11SHIM_TARGET is not set\n");
            rv = CKR_GENERAL_ERROR;
        } else if (target_handle == NULL &&
                   (target_handle = dlopen(path, RTLD_NOW | RTLD_LOCAL)) == NULL) {
            fprintf(stderr, "p11shim: %s\n", dlerror());
            rv = CKR_GENERAL_ERROR;
        } else {
            /* POSIX blesses this object-to-function pointer conversion. */
            *(void **)&get = dlsym(target_handle, "C_GetFunctionList");
            if (get == NULL || get(&real) != CKR_OK || real == NULL) {
                fprintf(stderr, "p11shim: %s is not a PKCS#11 module\n", path);
                real = NULL;
                rv = CKR_GENERAL_ERROR;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    return rv;
}

static CK_RV shim_C_Initialize(CK_VOID_PTR args)
{
    CK_RV rv;
    int kill_after; /* C_Initialize is never a crash point worth a test */

    if (shim_enter(IDX_C_Initialize, &rv, &kill_after))
        return rv;
    rv = load_target();
    if (rv != CKR_OK)
        return rv;
    return real->C_Initialize(args);
}

static CK_RV shim_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

#define AS_MEMBER(name, params, args) .name = shim_##name,
static CK_FUNCTION_LIST function_list = {
    .version = {CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR},
    .C_Initialize = shim_C_Initialize,
    .C_GetFunctionList = shim_C_GetFunctionList,
    ALL(AS_MEMBER)
};

/* Not counted: loaders call it freely, and it never reaches the target. */
static CK_RV shim_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    *list = &function_list;
    return CKR_OK;
}

/* The exported C_* symbols, for callers that dlsym them directly. */
CK_RV C_Initialize(CK_VOID_PTR args) { return shim_C_Initialize(args); }
CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR l) { return shim_C_GetFunctionList(l); }
#define EXPORT(name, params, args) \
    CK_RV name params { return shim_##name args; }
ALL(EXPORT)

/* ---- control API ---------------------------------------------------- */

void p11shim_reset(void)
{
    pthread_mutex_lock(&lock);
    memset(counts, 0, sizeof counts);
    total = fired = trace_len = lies = 0;
    pthread_mutex_unlock(&lock);
}

unsigned long p11shim_lies(void)
{
    pthread_mutex_lock(&lock);
    unsigned long n = lies;
    pthread_mutex_unlock(&lock);
    return n;
}

unsigned long p11shim_count(const char *fname)
{
    int i = name_index(fname);
    unsigned long n;

    if (i < 0)
        return ULONG_MAX;  /* a typo must not read as "never called" */
    pthread_mutex_lock(&lock);
    n = counts[i];
    pthread_mutex_unlock(&lock);
    return n;
}

unsigned long p11shim_total(void)
{
    pthread_mutex_lock(&lock);
    unsigned long n = total;
    pthread_mutex_unlock(&lock);
    return n;
}

unsigned long p11shim_fired(void)
{
    pthread_mutex_lock(&lock);
    unsigned long n = fired;
    pthread_mutex_unlock(&lock);
    return n;
}

void p11shim_fail_at(unsigned long n, unsigned long rv)
{
    pthread_mutex_lock(&lock);
    fail_n = n;
    fail_rv = rv;
    pthread_mutex_unlock(&lock);
}

int p11shim_fail_function(const char *fname, unsigned long k, unsigned long rv)
{
    int i = name_index(fname);

    if (i < 0 || i == IDX_C_GetFunctionList)
        return -1;
    pthread_mutex_lock(&lock);
    fn_fail_k[i] = k;
    fn_fail_rv[i] = rv;
    pthread_mutex_unlock(&lock);
    return 0;
}

void p11shim_clear_faults(void)
{
    pthread_mutex_lock(&lock);
    fail_n = fail_rv = 0;
    memset(fn_fail_k, 0, sizeof fn_fail_k);
    memset(fn_fail_rv, 0, sizeof fn_fail_rv);
    pthread_mutex_unlock(&lock);
}

/* snprintf-like output: writes at most n bytes including the NUL and
 * returns the length the whole text needs. */
struct out { char *buf; size_t n, len; };

static void put(struct out *o, const char *s)
{
    size_t l = strlen(s);
    if (o->buf != NULL && o->len < o->n) {
        size_t room = o->n - o->len - 1;
        size_t c = l < room ? l : room;
        memcpy(o->buf + o->len, s, c);
        o->buf[o->len + c] = '\0';
    }
    o->len += l;
}

size_t p11shim_dump(char *buf, size_t n)
{
    struct out o = {buf, n, 0};
    char line[64];

    if (buf != NULL && n > 0)
        buf[0] = '\0';
    pthread_mutex_lock(&lock);
    for (int i = 0; i < N_FUNCS; i++) {
        if (counts[i] == 0)
            continue;
        snprintf(line, sizeof line, "%s=%lu\n", names[i], counts[i]);
        put(&o, line);
    }
    pthread_mutex_unlock(&lock);
    return o.len;
}

size_t p11shim_trace(char *buf, size_t n)
{
    struct out o = {buf, n, 0};

    if (buf != NULL && n > 0)
        buf[0] = '\0';
    pthread_mutex_lock(&lock);
    for (unsigned long i = 0; i < trace_len; i++) {
        put(&o, names[trace[i]]);
        put(&o, "\n");
    }
    pthread_mutex_unlock(&lock);
    return o.len;
}

/* Child processes configure faults through the environment, read once when
 * the shim is loaded. */
__attribute__((constructor)) static void read_env(void)
{
    const char *at = getenv("P11SHIM_FAIL_AT");
    const char *rvs = getenv("P11SHIM_FAIL_RV");
    const char *fn = getenv("P11SHIM_FAIL_FUNCTION");
    const char *kill_after = getenv("P11SHIM_KILL_AFTER");
    const char *lie = getenv("P11SHIM_LIE");
    unsigned long rv = rvs ? strtoul(rvs, NULL, 0) : CKR_GENERAL_ERROR;

    /* P11SHIM_KILL_AFTER=n: the process dies by SIGKILL right after the
     * n-th call returns from the target (a crash at a chosen point) */
    if (kill_after != NULL)
        kill_after_n = strtoul(kill_after, NULL, 0);

    /* P11SHIM_LIE=find-count|slot-count|attr-length: every successful
     * answer of that kind is bent as a buggy module would bend it */
    if (lie != NULL) {
        if (strcmp(lie, "find-count") == 0)
            lie_mode = LIE_FIND_COUNT;
        else if (strcmp(lie, "slot-count") == 0)
            lie_mode = LIE_SLOT_COUNT;
        else if (strcmp(lie, "attr-length") == 0)
            lie_mode = LIE_ATTR_LENGTH;
        else
            fprintf(stderr, "p11shim: unknown P11SHIM_LIE\n");
    }

    if (at != NULL)
        p11shim_fail_at(strtoul(at, NULL, 0), rv);
    if (fn != NULL) {
        /* "C_Name:k" or "C_Name:k:rv" */
        char name[64];
        unsigned long k = 1;
        const char *colon = strchr(fn, ':');
        size_t l = colon ? (size_t)(colon - fn) : strlen(fn);
        if (l < sizeof name) {
            char *end = NULL;
            memcpy(name, fn, l);
            name[l] = '\0';
            if (colon != NULL) {
                k = strtoul(colon + 1, &end, 0);
                if (end != NULL && *end == ':')
                    rv = strtoul(end + 1, NULL, 0);
            }
            if (p11shim_fail_function(name, k, rv) != 0)
                fprintf(stderr, "p11shim: unknown function in P11SHIM_FAIL_FUNCTION\n");
        }
    }
}
