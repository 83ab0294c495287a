/*
 * keychain_pkcs11.c -- the keychain.h API on a PKCS#11 token.
 *
 * The Linux counterpart of Passenger's Crypto.cpp: a token chosen by label
 * plays the keychain, a CK_ATTRIBUTE template plays the query dictionary,
 * key attributes (private, sensitive, non-extractable, sign-only) play the
 * SecAccess, OpenSSL's PKCS12_parse plays SecPKCS12Import, and CKA_ID (the
 * SHA-1 of the public key, the bytes macOS reports as kSecImportItemKeyID)
 * is the remembered key id.
 *
 * Token identities carry a lease (see "leases" below) so that what a crashed
 * process left behind can be told from what a running one owns; every
 * token operation runs under a per-token flock shared by all processes.
 *
 * Process-wide state, kept on purpose:
 *  - a module is dlopen'ed once and never unloaded, and C_Finalize is never
 *    called: libcurl's pkcs11 engine may share the module in this process;
 *  - one "anchor" session per token stays open for the life of the process,
 *    so closing a handle never closes the token's last session (SoftHSM2
 *    #464, and the login would be lost for every other user).
 */
#define _GNU_SOURCE
#include "keychain.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pkcs12.h>
#include <openssl/provider.h>
#include <openssl/sha.h>
#include <openssl/x509.h>

#include <p11-kit/pkcs11.h>

#ifndef KC_VERSION
#define KC_VERSION "0.0.0"
#endif

#define TOKEN_LABEL_LEN 32   /* CK_TOKEN_INFO.label: space padded */
#define MAX_SLOTS 16         /* tokens per module we remember logins for */
#define MAX_FOUND 64         /* objects one label may carry that we handle */
#define TRANSIENT_RETRIES 5  /* tries for CKR_TOKEN_NOT_PRESENT and kin */
#define LEASE_APPLICATION "keychain_ext"
#define MAX_MAC_ITERATIONS 2000000 /* OpenSSL writes 2048, others ~600000 */

/* ---------------------------------------------------------------- errors */

static int32_t fail(kc_error *err, int32_t status, int64_t native,
                    const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int32_t fail(kc_error *err, int32_t status, int64_t native,
                    const char *fmt, ...)
{
    if (err) {
        va_list ap;
        err->status = status;
        err->native_code = native;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return status;
}

static const char *ckr_name(CK_RV rv)
{
    switch (rv) {
#define N(x) case x: return #x;
    N(CKR_OK) N(CKR_HOST_MEMORY) N(CKR_SLOT_ID_INVALID) N(CKR_GENERAL_ERROR)
    N(CKR_FUNCTION_FAILED) N(CKR_ARGUMENTS_BAD) N(CKR_ATTRIBUTE_READ_ONLY)
    N(CKR_ATTRIBUTE_SENSITIVE) N(CKR_ATTRIBUTE_TYPE_INVALID)
    N(CKR_ATTRIBUTE_VALUE_INVALID) N(CKR_DEVICE_ERROR) N(CKR_DEVICE_MEMORY)
    N(CKR_DEVICE_REMOVED) N(CKR_FUNCTION_NOT_SUPPORTED)
    N(CKR_KEY_TYPE_INCONSISTENT) N(CKR_OBJECT_HANDLE_INVALID)
    N(CKR_OPERATION_ACTIVE) N(CKR_OPERATION_NOT_INITIALIZED)
    N(CKR_PIN_INCORRECT) N(CKR_PIN_INVALID) N(CKR_PIN_LEN_RANGE)
    N(CKR_PIN_EXPIRED) N(CKR_PIN_LOCKED) N(CKR_SESSION_CLOSED)
    N(CKR_SESSION_COUNT) N(CKR_SESSION_HANDLE_INVALID)
    N(CKR_SESSION_READ_ONLY) N(CKR_TEMPLATE_INCOMPLETE)
    N(CKR_TEMPLATE_INCONSISTENT) N(CKR_TOKEN_NOT_PRESENT)
    N(CKR_TOKEN_NOT_RECOGNIZED) N(CKR_TOKEN_WRITE_PROTECTED)
    N(CKR_USER_ALREADY_LOGGED_IN) N(CKR_USER_NOT_LOGGED_IN)
    N(CKR_USER_PIN_NOT_INITIALIZED) N(CKR_USER_TYPE_INVALID)
    N(CKR_BUFFER_TOO_SMALL) N(CKR_CRYPTOKI_NOT_INITIALIZED)
    N(CKR_CRYPTOKI_ALREADY_INITIALIZED) N(CKR_MECHANISM_INVALID)
#undef N
    default: return "CKR_VENDOR_OR_UNKNOWN";
    }
}

/* CK_RV -> OSStatus: the closest errSec* meaning; the CK_RV stays in
 * kc_error.native_code. */
static int32_t ckr_status(CK_RV rv)
{
    switch (rv) {
    case CKR_OK: return KC_errSecSuccess;
    case CKR_PIN_INCORRECT: case CKR_PIN_INVALID: case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED: case CKR_PIN_LOCKED: case CKR_USER_NOT_LOGGED_IN:
    case CKR_USER_PIN_NOT_INITIALIZED:
        return KC_errSecAuthFailed;
    case CKR_SLOT_ID_INVALID: case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED: case CKR_DEVICE_REMOVED:
        return KC_errSecNoSuchKeychain;
    case CKR_HOST_MEMORY: case CKR_DEVICE_MEMORY: case CKR_SESSION_COUNT:
        return KC_errSecAllocate;
    case CKR_ARGUMENTS_BAD: case CKR_ATTRIBUTE_VALUE_INVALID:
    case CKR_ATTRIBUTE_TYPE_INVALID: case CKR_TEMPLATE_INCOMPLETE:
    case CKR_TEMPLATE_INCONSISTENT: case CKR_ATTRIBUTE_READ_ONLY:
        return KC_errSecParam;
    case CKR_OBJECT_HANDLE_INVALID: case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
        return KC_errSecInvalidItemRef;
    case CKR_TOKEN_WRITE_PROTECTED: case CKR_SESSION_READ_ONLY:
        return KC_errSecReadOnly;
    case CKR_FUNCTION_NOT_SUPPORTED: case CKR_KEY_TYPE_INCONSISTENT:
    case CKR_MECHANISM_INVALID:
        return KC_errSecUnimplemented;
    case CKR_CRYPTOKI_NOT_INITIALIZED:
        return KC_errSecNotAvailable;
    default:
        return KC_errSecIO;
    }
}

static int32_t fail_ck(kc_error *err, CK_RV rv, const char *what)
{
    return fail(err, ckr_status(rv), (int64_t)rv, "%s failed: %s (0x%lx)",
                what, ckr_name(rv), (unsigned long)rv);
}

/* Fail with OpenSSL's reason for the newest queued error, then clear the
 * queue: it is per thread and shared with libcurl. */
static int32_t fail_ssl(kc_error *err, int32_t status, const char *what)
{
    unsigned long e = ERR_peek_last_error();
    char reason[256] = "no OpenSSL reason";
    if (e)
        ERR_error_string_n(e, reason, sizeof reason);
    ERR_clear_error();
    return fail(err, status, (int64_t)e, "%s (%s)", what, reason);
}

/* Transient results SoftHSM2 gives under concurrent use (see DESIGN.md). */
static int transient(CK_RV rv)
{
    return rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_DEVICE_ERROR ||
           rv == CKR_GENERAL_ERROR;
}

static void backoff(int attempt)
{
    struct timespec ts = {0, 2000000L << attempt}; /* 2, 4, 8, ... ms */
    nanosleep(&ts, NULL);
}

/* --------------------------------------------------------------- modules */

typedef struct slot_login {
    CK_SLOT_ID slot;
    pid_t pid;                          /* process that logged in */
    CK_SESSION_HANDLE anchor;           /* never closed, see top comment */
    unsigned char pin_digest[SHA256_DIGEST_LENGTH];
} slot_login;

typedef struct module {
    struct module *next;
    char *path;
    CK_FUNCTION_LIST_PTR f;
    pid_t init_pid;                     /* process that C_Initialize'd */
    slot_login logins[MAX_SLOTS];
    size_t n_logins;
} module;

static pthread_mutex_t modules_lock = PTHREAD_MUTEX_INITIALIZER;
static module *modules;

/* After fork() the child must initialize the module again (and it has none
 * of the parent's logins). */
static int32_t module_ready(module *m, kc_error *err)
{
    CK_C_INITIALIZE_ARGS args;
    CK_RV rv;
    if (m->init_pid == getpid())
        return KC_errSecSuccess;
    memset(&args, 0, sizeof args);
    args.flags = CKF_OS_LOCKING_OK;
    rv = m->f->C_Initialize(&args);
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED)
        return fail_ck(err, rv, "C_Initialize");
    m->init_pid = getpid();
    return KC_errSecSuccess;
}

/* The module at path, loaded and initialized in this process. */
static int32_t get_module(const char *path, module **out, kc_error *err)
{
    module *m;
    int32_t st = KC_errSecSuccess;
    void *dl;
    CK_C_GetFunctionList get_list;
    CK_FUNCTION_LIST_PTR f = NULL;
    CK_RV rv;

    pthread_mutex_lock(&modules_lock);
    for (m = modules; m; m = m->next)
        if (strcmp(m->path, path) == 0)
            break;
    if (!m) {
        dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!dl) {
            st = fail(err, KC_errSecNoSuchKeychain, 0,
                      "cannot load PKCS#11 module %s: %s", path, dlerror());
            goto out;
        }
        get_list = (CK_C_GetFunctionList)dlsym(dl, "C_GetFunctionList");
        if (!get_list) {
            dlclose(dl);
            st = fail(err, KC_errSecNoSuchKeychain, 0,
                      "%s is not a PKCS#11 module (no C_GetFunctionList)",
                      path);
            goto out;
        }
        rv = get_list(&f);
        if (rv != CKR_OK || !f) {
            dlclose(dl);
            st = fail(err, KC_errSecNoSuchKeychain, (int64_t)rv,
                      "C_GetFunctionList of %s failed: %s", path,
                      ckr_name(rv));
            goto out;
        }
        m = calloc(1, sizeof *m);
        if (!m || !(m->path = strdup(path))) {
            free(m);
            m = NULL;
            st = fail(err, KC_errSecAllocate, 0, "out of memory");
            goto out; /* the dlopen handle stays: harmless, rare */
        }
        m->f = f;
        m->next = modules;
        modules = m;
    }
    st = module_ready(m, err);
out:
    pthread_mutex_unlock(&modules_lock);
    *out = m;
    return st;
}

/* Log the token in once per process, keeping an anchor session open.  A
 * later login with another PIN while logged in would get
 * CKR_USER_ALREADY_LOGGED_IN, so we compare PIN digests to still report a
 * wrong PIN. */
static int32_t login(module *m, CK_SLOT_ID slot, const char *pin,
                     kc_error *err)
{
    unsigned char digest[SHA256_DIGEST_LENGTH];
    CK_SESSION_HANDLE anchor = CK_INVALID_HANDLE;
    int32_t st = KC_errSecSuccess;
    CK_RV rv;
    size_t i;
    int known;

    SHA256((const unsigned char *)pin, strlen(pin), digest);
    pthread_mutex_lock(&modules_lock);
    for (i = 0; i < m->n_logins; i++)
        if (m->logins[i].slot == slot)
            break;
    known = i < m->n_logins;
    if (known && CRYPTO_memcmp(m->logins[i].pin_digest, digest, sizeof digest)) {
        st = fail(err, KC_errSecAuthFailed, (int64_t)CKR_PIN_INCORRECT,
                  "C_Login failed: CKR_PIN_INCORRECT (0xa0)");
        goto out;
    }
    if (known && m->logins[i].pid == getpid())
        goto out;
    if (!known && m->n_logins == MAX_SLOTS) {
        st = fail(err, KC_errSecAllocate, 0, "too many tokens open");
        goto out;
    }
    /* First login of this process (a forked child keeps the digest: the
     * token may still count it as logged in, and then only the digest can
     * tell a wrong PIN). */
    rv = m->f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL,
                             NULL, &anchor);
    if (rv != CKR_OK) {
        st = fail_ck(err, rv, "C_OpenSession");
        goto out;
    }
    rv = m->f->C_Login(anchor, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        m->f->C_CloseSession(anchor);
        st = fail_ck(err, rv, "C_Login");
        goto out;
    }
    if (!known)
        m->n_logins++;
    m->logins[i].slot = slot;
    m->logins[i].pid = getpid();
    m->logins[i].anchor = anchor;
    memcpy(m->logins[i].pin_digest, digest, sizeof digest);
out:
    pthread_mutex_unlock(&modules_lock);
    OPENSSL_cleanse(digest, sizeof digest);
    return st;
}

static void pad_label(const char *label, CK_UTF8CHAR out[TOKEN_LABEL_LEN])
{
    size_t n = strlen(label);
    memset(out, ' ', TOKEN_LABEL_LEN);
    memcpy(out, label, n < TOKEN_LABEL_LEN ? n : TOKEN_LABEL_LEN);
}

/* The slot whose token carries label; with want_uninitialized, instead the
 * first slot holding a token that is not initialized yet. */
static int32_t find_slot(module *m, const char *label, int want_uninitialized,
                         CK_SLOT_ID *out, CK_FLAGS *flags, kc_error *err)
{
    CK_UTF8CHAR want[TOKEN_LABEL_LEN];
    CK_SLOT_ID *slots = NULL;
    CK_ULONG n = 0, i;
    CK_TOKEN_INFO info;
    CK_RV rv = CKR_OK;
    int32_t st;
    int attempt;

    pad_label(label, want);
    for (attempt = 0; attempt < TRANSIENT_RETRIES; attempt++) {
        if (attempt)
            backoff(attempt);
        free(slots);
        slots = NULL;
        rv = m->f->C_GetSlotList(CK_TRUE, NULL, &n);
        if (rv == CKR_OK && n) {
            slots = calloc(n, sizeof *slots);
            if (!slots)
                return fail(err, KC_errSecAllocate, 0, "out of memory");
            rv = m->f->C_GetSlotList(CK_TRUE, slots, &n);
        }
        if (rv != CKR_OK) {
            if (transient(rv) || rv == CKR_BUFFER_TOO_SMALL)
                continue;
            break;
        }
        /* a token another process is writing may briefly not show: a miss
         * is retried like a transient error */
        for (i = 0; i < n; i++) {
            rv = m->f->C_GetTokenInfo(slots[i], &info);
            if (rv != CKR_OK)
                continue;
            if (want_uninitialized
                    ? !(info.flags & CKF_TOKEN_INITIALIZED)
                    : (info.flags & CKF_TOKEN_INITIALIZED) &&
                          memcmp(info.label, want, TOKEN_LABEL_LEN) == 0) {
                *out = slots[i];
                *flags = info.flags;
                free(slots);
                return KC_errSecSuccess;
            }
        }
        rv = CKR_OK;
    }
    free(slots);
    if (rv != CKR_OK)
        return fail_ck(err, rv, "C_GetSlotList");
    st = fail(err, KC_errSecNoSuchKeychain, 0,
              want_uninitialized ? "module %s has no free slot for token '%s'"
                                 : "module %s has no token labelled '%s'",
              m->path, label);
    return st;
}

/* ---------------------------------------------------------------- handle */

struct kc_keychain {
    pthread_mutex_t lock;           /* serializes this handle's calls */
    module *mod;
    CK_SLOT_ID slot;
    CK_SESSION_HANDLE session;
    pid_t pid;                      /* process that opened session/lock */
    char *pin;                      /* to log in again after fork() */
    char *lock_path;
    int lock_fd;
    /* Crypto.cpp's `id` member, done right: the key id of the last import
     * and the label it was imported under. */
    char imported_label[KC_LABEL_MAX];
    CK_BYTE imported_id[SHA_DIGEST_LENGTH];
    int has_imported_id;
    int imported_ephemeral;         /* session objects: no lease */
};

const char *kc_backend(void) { return "pkcs11"; }
const char *kc_version(void) { return KC_VERSION; }

static void free_secret(char *s)
{
    if (s) {
        OPENSSL_cleanse(s, strlen(s));
        free(s);
    }
}

/* Open (or, after fork(), reopen) the lock file: a forked child needs its
 * own open file, since flock locks belong to the open file. */
static int32_t open_lock(kc_keychain *kc, kc_error *err)
{
    if (!kc->lock_path || (kc->lock_fd >= 0 && kc->pid == getpid()))
        return KC_errSecSuccess;
    if (kc->lock_fd >= 0)
        close(kc->lock_fd);
    kc->lock_fd = open(kc->lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (kc->lock_fd < 0)
        return fail(err, KC_errSecIO, errno, "cannot open lock file %s: %s",
                    kc->lock_path, strerror(errno));
    return KC_errSecSuccess;
}

/* Open (or, after fork(), reopen) the session. */
static int32_t ensure_session(kc_keychain *kc, kc_error *err)
{
    CK_RV rv;
    int32_t st;

    if (kc->pid == getpid())
        return KC_errSecSuccess;
    pthread_mutex_lock(&modules_lock);
    st = module_ready(kc->mod, err);
    pthread_mutex_unlock(&modules_lock);
    if (st)
        return st;
    if ((st = login(kc->mod, kc->slot, kc->pin, err)))
        return st;
    rv = kc->mod->f->C_OpenSession(kc->slot,
                                   CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL,
                                   NULL, &kc->session);
    if (rv != CKR_OK)
        return fail_ck(err, rv, "C_OpenSession");
    kc->pid = getpid();
    return KC_errSecSuccess;
}


int32_t kc_open(const kc_options *opts, kc_keychain **out, kc_error *err)
{
    kc_keychain *kc = NULL;
    module *m;
    CK_SLOT_ID slot;
    CK_FLAGS flags = 0;
    int lock_fd = -1;
    int32_t st;

    if (!out)
        return fail(err, KC_errSecParam, 0, "no output handle");
    *out = NULL;
    if (!opts || !opts->module || !*opts->module)
        return fail(err, KC_errSecParam, 0, "no PKCS#11 module given");
    if (!opts->token || !*opts->token)
        return fail(err, KC_errSecParam, 0, "no token label given");
    if (strlen(opts->token) > TOKEN_LABEL_LEN)
        return fail(err, KC_errSecParam, 0,
                    "token label longer than %d bytes", TOKEN_LABEL_LEN);
    /* Reading the token while another process writes it is what SoftHSM2
     * gets wrong, and it reads its tokens in C_Initialize: opening takes
     * the token lock too, from before the module loads (closing drops it). */
    if (opts->lock_path &&
        (lock_fd = open(opts->lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) >= 0)
        while (flock(lock_fd, LOCK_EX) < 0 && errno == EINTR)
            ;
    if ((st = get_module(opts->module, &m, err)))
        goto out;
    if ((st = find_slot(m, opts->token, 0, &slot, &flags, err)))
        goto out;
    /* A PIN pad or other protected path would prompt someone: never. */
    if (flags & CKF_PROTECTED_AUTHENTICATION_PATH) {
        st = fail(err, KC_errSecInteractionNotAllowed, 0,
                  "token '%s' needs a protected authentication path "
                  "(PIN pad); keychain_ext never prompts", opts->token);
        goto out;
    }
    if (!opts->pin) {
        st = fail(err, KC_errSecInteractionRequired, 0,
                  "token '%s' needs a PIN and none was given", opts->token);
        goto out;
    }
    if (!(kc = calloc(1, sizeof *kc))) {
        st = fail(err, KC_errSecAllocate, 0, "out of memory");
        goto out;
    }
    pthread_mutex_init(&kc->lock, NULL);
    kc->mod = m;
    kc->slot = slot;
    kc->lock_fd = -1;
    kc->pid = 0; /* ensure_session opens session and lock file */
    kc->pin = strdup(opts->pin);
    kc->lock_path = opts->lock_path ? strdup(opts->lock_path) : NULL;
    if (!kc->pin || (opts->lock_path && !kc->lock_path))
        st = fail(err, KC_errSecAllocate, 0, "out of memory");
    else if (!(st = open_lock(kc, err)))
        st = ensure_session(kc, err);
    if (st) {
        kc_close(kc);
        goto out;
    }
    *out = kc;
out:
    if (lock_fd >= 0)
        close(lock_fd);
    return st;
}

void kc_close(kc_keychain *kc)
{
    if (!kc)
        return;
    /* Only the process that opened the session may close it: a forked
     * child's copy must not close its parent's session on a real device. */
    if (kc->pid == getpid() && kc->session != CK_INVALID_HANDLE)
        kc->mod->f->C_CloseSession(kc->session);
    if (kc->lock_fd >= 0)
        close(kc->lock_fd);
    free_secret(kc->pin);
    free(kc->lock_path);
    pthread_mutex_destroy(&kc->lock);
    free(kc);
}

static void end(kc_keychain *kc)
{
    if (kc->lock_fd >= 0)
        flock(kc->lock_fd, LOCK_UN);
    pthread_mutex_unlock(&kc->lock);
}

/* Every operation runs between begin() and end(): the handle's mutex, the
 * session (reopened after fork) and the cross-process token lock. */
static int32_t begin(kc_keychain *kc, kc_error *err)
{
    int32_t st;
    if (!kc)
        return fail(err, KC_errSecParam, 0, "no keychain handle");
    pthread_mutex_lock(&kc->lock);
    if ((st = open_lock(kc, err))) {
        pthread_mutex_unlock(&kc->lock);
        return st;
    }
    if (kc->lock_fd >= 0)
        while (flock(kc->lock_fd, LOCK_EX) < 0 && errno == EINTR)
            ;
    /* after fork(), the child's session opens under the lock */
    if ((st = ensure_session(kc, err))) {
        end(kc);
        return st;
    }
    return KC_errSecSuccess;
}


static int32_t check_label(const char *label, kc_error *err)
{
    size_t n;
    if (!label || !*label)
        return fail(err, KC_errSecParam, 0, "empty label");
    n = strlen(label);
    if (n >= KC_LABEL_MAX)
        return fail(err, KC_errSecParam, 0, "label longer than %d bytes",
                    KC_LABEL_MAX - 1);
    return KC_errSecSuccess;
}

/* ---------------------------------------------------------- token objects */

#define ATTR(type, ptr, len) {(type), (void *)(ptr), (CK_ULONG)(len)}

/* C_FindObjectsInit, recovering a session whose previous search was never
 * finished (its C_FindObjectsFinal failed). */
static CK_RV find_init(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n)
{
    CK_RV rv = kc->mod->f->C_FindObjectsInit(kc->session, tmpl, n);
    if (rv == CKR_OPERATION_ACTIVE) {
        kc->mod->f->C_FindObjectsFinal(kc->session);
        rv = kc->mod->f->C_FindObjectsInit(kc->session, tmpl, n);
    }
    return rv;
}

/* C_FindObjectsInit / C_FindObjects / C_FindObjectsFinal: up to max
 * handles matching the template.  A search changes nothing, so transient
 * failures are simply retried. */
static CK_RV find(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                  CK_OBJECT_HANDLE *found, CK_ULONG max, CK_ULONG *count)
{
    CK_FUNCTION_LIST_PTR f = kc->mod->f;
    CK_RV rv = CKR_OK, rv_final;
    int attempt;
    for (attempt = 0; attempt < TRANSIENT_RETRIES; attempt++) {
        if (attempt)
            backoff(attempt);
        *count = 0;
        rv = find_init(kc, tmpl, n);
        if (rv == CKR_OK) {
            rv = f->C_FindObjects(kc->session, found, max, count);
            rv_final = f->C_FindObjectsFinal(kc->session);
            if (rv == CKR_OK)
                rv = rv_final;
        }
        if (!transient(rv))
            break;
    }
    return rv;
}

/* Every object this session can see: *out is malloc'ed, the caller frees. */
static CK_RV all_objects(kc_keychain *kc, CK_OBJECT_HANDLE **out,
                         CK_ULONG *count)
{
    CK_OBJECT_HANDLE *h = NULL, *grown;
    CK_ULONG n = 0, got = 0;
    CK_RV rv = find_init(kc, NULL, 0);
    if (rv != CKR_OK)
        return rv;
    do {
        if (!(grown = realloc(h, (n + MAX_FOUND) * sizeof *h))) {
            rv = CKR_HOST_MEMORY;
            break;
        }
        h = grown;
        rv = kc->mod->f->C_FindObjects(kc->session, h + n, MAX_FOUND, &got);
        n += got;
    } while (rv == CKR_OK && got == MAX_FOUND);
    kc->mod->f->C_FindObjectsFinal(kc->session);
    if (rv != CKR_OK) {
        free(h);
        return rv;
    }
    *out = h;
    *count = n;
    return CKR_OK;
}

/* The attributes lookup reports, read in one C_GetAttributeValue. */
typedef struct object {
    CK_OBJECT_HANDLE handle;
    CK_OBJECT_CLASS cls;
    CK_BBOOL token;
    CK_KEY_TYPE key_type;
    CK_BYTE id[KC_KEY_ID_MAX];
    CK_ULONG id_len;
    char label[KC_LABEL_MAX];
    char application[32];
    CK_BYTE value[8192];            /* certificate DER or lease text */
    CK_ULONG value_len;
    CK_BYTE subject[1024];          /* certificate subject DER */
    CK_ULONG subject_len;
} object;

static CK_RV read_object(kc_keychain *kc, CK_OBJECT_HANDLE h, object *o)
{
    CK_ATTRIBUTE t[] = {
        ATTR(CKA_CLASS, &o->cls, sizeof o->cls),
        ATTR(CKA_TOKEN, &o->token, sizeof o->token),
        ATTR(CKA_KEY_TYPE, &o->key_type, sizeof o->key_type),
        ATTR(CKA_ID, o->id, sizeof o->id),
        ATTR(CKA_LABEL, o->label, sizeof o->label - 1),
        ATTR(CKA_VALUE, o->value, sizeof o->value - 1),
        ATTR(CKA_APPLICATION, o->application, sizeof o->application - 1),
        ATTR(CKA_SUBJECT, o->subject, sizeof o->subject),
    };
    CK_ULONG size[8], i;
    CK_RV rv = CKR_OK;
    int attempt;
    for (i = 0; i < 8; i++)
        size[i] = t[i].ulValueLen;
    for (attempt = 0; attempt < TRANSIENT_RETRIES; attempt++) {
        if (attempt)
            backoff(attempt);
        memset(o, 0, sizeof *o);
        o->handle = h;
        o->cls = (CK_OBJECT_CLASS)-1;
        o->key_type = (CK_KEY_TYPE)-1;
        for (i = 0; i < 8; i++)
            t[i].ulValueLen = size[i]; /* the call overwrote them */
        rv = kc->mod->f->C_GetAttributeValue(kc->session, h, t, 8);
        if (!transient(rv))
            break;
    }
    /* These three still fill every attribute they can (PKCS#11 5.7): a
     * key's CKA_VALUE is sensitive, a certificate has no CKA_KEY_TYPE... */
    if (rv != CKR_OK && rv != CKR_ATTRIBUTE_SENSITIVE &&
        rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_BUFFER_TOO_SMALL)
        return rv;
    if (t[0].ulValueLen == CK_UNAVAILABLE_INFORMATION)
        return CKR_OBJECT_HANDLE_INVALID;
/* unavailable (~0), or the size a too small buffer needed (older
 * modules): 0 */
#define LEN(i) (t[i].ulValueLen > size[i] ? 0 : t[i].ulValueLen)
    o->id_len = LEN(3);
    o->label[LEN(4)] = 0;
    o->value_len = LEN(5);
    o->value[o->value_len] = 0;
    o->application[LEN(6)] = 0;
    o->subject_len = LEN(7);
#undef LEN
    return CKR_OK;
}

/* C_CreateObject.  After a transient failure the object may exist anyway
 * (SoftHSM2 #573): look for it before trying again, so that nothing is
 * created twice.  cls and label identify it (duplicates were refused). */
static int32_t create_object(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                             CK_OBJECT_CLASS cls, const char *label,
                             CK_OBJECT_HANDLE *out, const char *what,
                             kc_error *err)
{
    CK_ATTRIBUTE probe[] = {ATTR(CKA_CLASS, &cls, sizeof cls),
                            ATTR(CKA_LABEL, label, strlen(label))};
    CK_ULONG count;
    CK_RV rv = CKR_OK;
    int attempt;
    for (attempt = 0; attempt < TRANSIENT_RETRIES; attempt++) {
        if (attempt) {
            backoff(attempt);
            if (find(kc, probe, 2, out, 1, &count) == CKR_OK && count)
                return KC_errSecSuccess;
        }
        rv = kc->mod->f->C_CreateObject(kc->session, tmpl, n, out);
        if (rv == CKR_OK)
            return KC_errSecSuccess;
        if (!transient(rv))
            break;
    }
    return fail_ck(err, rv, what);
}

static CK_RV destroy(kc_keychain *kc, CK_OBJECT_HANDLE h)
{
    CK_RV rv = CKR_OK;
    int attempt;
    for (attempt = 0; attempt < TRANSIENT_RETRIES; attempt++) {
        if (attempt)
            backoff(attempt);
        rv = kc->mod->f->C_DestroyObject(kc->session, h);
        if (!transient(rv))
            break;
    }
    /* already gone (another session removed it) is what we wanted */
    return rv == CKR_OBJECT_HANDLE_INVALID ? CKR_OK : rv;
}

/* ------------------------------------------------------------- leases */

/* A token identity carries a lease: a CKO_DATA object with the same label,
 * CKA_APPLICATION "keychain_ext" and a value naming the owner process (pid,
 * its start time, the boot id, the host) and the key id.  A later run can
 * then tell an identity whose owner died (crash between preauth and kill)
 * from one in use.  Session objects need none: they die with their owner. */
typedef struct lease {
    long pid;
    unsigned long long start;
    char boot[40];
    char host[128];
    char key_id_hex[2 * SHA_DIGEST_LENGTH + 1];
} lease;

/* Start time of a process in clock ticks since boot (/proc/PID/stat field
 * 22); 0 if unknown. */
static unsigned long long start_time(long pid)
{
    char path[64], buf[1024], *p;
    unsigned long long start = 0;
    size_t n;
    FILE *f;
    int i;

    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    if (!(f = fopen(path, "re")))
        return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* the command name may hold spaces and ')': skip to the last ')' */
    if (!(p = strrchr(buf, ')')))
        return 0;
    for (i = 2; i < 22 && p; i++)
        p = strchr(p + 1, ' ');
    if (p)
        sscanf(p + 1, "%llu", &start);
    return start;
}

static void boot_id(char *out, size_t n)
{
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");
    out[0] = 0;
    if (f) {
        if (fgets(out, (int)n, f))
            out[strcspn(out, "\n")] = 0;
        fclose(f);
    }
    if (!out[0])
        snprintf(out, n, "unknown");
}

static void host_name(char *out, size_t n)
{
    if (gethostname(out, n) != 0 || !out[0])
        snprintf(out, n, "unknown");
    out[n - 1] = 0;
    out[strcspn(out, " \t\n")] = 0;
}

static void to_hex(const CK_BYTE *bytes, size_t n, char *out)
{
    size_t i;
    for (i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", bytes[i]);
    out[2 * n] = 0;
}

static void make_lease(const CK_BYTE *key_id, char *out, size_t n)
{
    lease l;
    memset(&l, 0, sizeof l);
    boot_id(l.boot, sizeof l.boot);
    host_name(l.host, sizeof l.host);
    to_hex(key_id, SHA_DIGEST_LENGTH, l.key_id_hex);
    snprintf(out, n, "keychain_ext-lease/1 pid=%ld start=%llu boot=%s host=%s id=%s",
             (long)getpid(), start_time(getpid()), l.boot, l.host,
             l.key_id_hex);
}

static int parse_lease(const object *o, lease *l)
{
    memset(l, 0, sizeof *l);
    return o->cls == CKO_DATA &&
           strcmp(o->application, LEASE_APPLICATION) == 0 &&
           sscanf((const char *)o->value,
                  "keychain_ext-lease/1 pid=%ld start=%llu boot=%39s "
                  "host=%127s id=%40s",
                  &l->pid, &l->start, l->boot, l->host, l->key_id_hex) == 5;
}

/* 1 the owner runs, 0 it is dead, -1 cannot tell (another host). */
static int lease_alive(const lease *l)
{
    char boot[40], host[128];
    host_name(host, sizeof host);
    if (strcmp(host, l->host) != 0)
        return -1;
    boot_id(boot, sizeof boot);
    if (strcmp(boot, l->boot) != 0)
        return 0; /* rebooted since */
    if (kill((pid_t)l->pid, 0) != 0 && errno == ESRCH)
        return 0;
    /* a recycled pid has another start time */
    return start_time(l->pid) == l->start ? 1 : 0;
}

/* ------------------------------------------------------------- PKCS#12 */

typedef struct identity {
    EVP_PKEY *key;
    X509 *cert;
    CK_BYTE key_id[SHA_DIGEST_LENGTH];
    int key_type;
} identity;

static void free_identity(identity *id)
{
    EVP_PKEY_free(id->key);
    X509_free(id->cert);
    memset(id, 0, sizeof *id);
}

static pthread_once_t providers_once = PTHREAD_ONCE_INIT;

/* `openssl pkcs12 -export -legacy` files use RC2-40: the legacy provider.
 * retain_fallbacks keeps the default provider available too. */
static OSSL_PROVIDER *legacy_provider; /* loaded once, for the process */

static void load_providers(void)
{
    legacy_provider = OSSL_PROVIDER_try_load(NULL, "legacy", 1);
    ERR_clear_error();
}

/* Crypto.cpp copyIdentityFromPKCS12: certificate and private key out of the
 * PKCS#12 bytes, and the key id (SHA-1 of the public key). */
static int32_t copy_identity_from_pkcs12(const uint8_t *data, size_t len,
                                         const char *password, identity *out,
                                         kc_error *err)
{
    const unsigned char *p = data;
    const char *pass = password ? password : "";
    PKCS12 *p12 = NULL;
    STACK_OF(X509) *ca = NULL;
    const ASN1_INTEGER *mac_iter = NULL;
    unsigned int n = 0;
    int32_t st = KC_errSecSuccess;

    pthread_once(&providers_once, load_providers);
    ERR_clear_error();
    if (!data || len == 0)
        return fail(err, KC_errSecDecode, 0, "empty PKCS#12 data");
    if (len > 16 * 1024 * 1024)
        return fail(err, KC_errSecDecode, 0, "PKCS#12 data too large");
    p12 = d2i_PKCS12(NULL, &p, (long)len);
    if (!p12) {
        st = fail_ssl(err, KC_errSecDecode, "not a PKCS#12 file");
        goto out;
    }
    /* an untrusted file must not buy minutes of CPU with its MAC */
    PKCS12_get0_mac(NULL, NULL, NULL, &mac_iter, p12);
    if (mac_iter && ASN1_INTEGER_get(mac_iter) > MAX_MAC_ITERATIONS) {
        st = fail(err, KC_errSecDecode, 0,
                  "PKCS#12 MAC iteration count %ld is above the limit of %d",
                  ASN1_INTEGER_get(mac_iter), MAX_MAC_ITERATIONS);
        goto out;
    }
    /* PKCS12_parse checks the MAC itself (an empty password also as "no
     * password"): checking it here first would cost the PBKDF twice */
    if (!PKCS12_parse(p12, pass, &out->key, &out->cert, &ca)) {
        if (ERR_GET_REASON(ERR_peek_last_error()) == PKCS12_R_MAC_VERIFY_FAILURE) {
            ERR_clear_error();
            st = fail(err, KC_errSecPkcs12VerifyFailure, 0,
                      "wrong password for the PKCS#12 file "
                      "(MAC verification failed)");
        } else {
            st = fail_ssl(err, KC_errSecDecode,
                          "cannot decrypt the PKCS#12 file");
        }
        goto out;
    }
    if (!out->key) {
        st = fail(err, KC_errSecDecode, 0,
                  "the PKCS#12 file holds no private key");
        goto out;
    }
    if (!out->cert) {
        st = fail(err, KC_errSecDecode, 0,
                  "the PKCS#12 file holds no certificate for its private key");
        goto out;
    }
    if (!X509_check_private_key(out->cert, out->key)) {
        st = fail_ssl(err, KC_errSecDecode,
                      "the private key does not match the certificate");
        goto out;
    }
    switch (EVP_PKEY_get_base_id(out->key)) {
    case EVP_PKEY_RSA: out->key_type = KC_KEY_RSA; break;
    case EVP_PKEY_EC: out->key_type = KC_KEY_EC; break;
    default:
        st = fail(err, KC_errSecUnimplemented, 0,
                  "unsupported key type %s (RSA and EC are supported)",
                  OBJ_nid2sn(EVP_PKEY_get_base_id(out->key)));
        goto out;
    }
    if (!X509_pubkey_digest(out->cert, EVP_sha1(), out->key_id, &n) ||
        n != SHA_DIGEST_LENGTH) {
        st = fail_ssl(err, KC_errSecDecode, "cannot hash the public key");
        goto out;
    }
out:
    sk_X509_pop_free(ca, X509_free);
    PKCS12_free(p12);
    if (st)
        free_identity(out);
    ERR_clear_error();
    return st;
}

/* Subject (RFC 2253) and common name of a certificate, as UTF-8. */
static void describe_name(const X509_NAME *name, kc_item_info *info)
{
    BIO *bio = BIO_new(BIO_s_mem());
    int i, n;
    unsigned char *cn = NULL;

    if (bio) {
        X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
        n = BIO_read(bio, info->subject, sizeof info->subject - 1);
        info->subject[n > 0 ? n : 0] = 0;
        BIO_free(bio);
    }
    i = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
    if (i >= 0) {
        n = ASN1_STRING_to_UTF8(
            &cn, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i)));
        if (n >= 0)
            snprintf(info->common_name, sizeof info->common_name, "%.*s", n,
                     (const char *)cn);
        OPENSSL_free(cn);
    }
    ERR_clear_error();
}

/* ------------------------------------------------------ creating objects */

typedef struct blob {
    unsigned char *p;
    int n;
} blob;

static void free_blob(blob *b)
{
    OPENSSL_clear_free(b->p, (size_t)(b->n > 0 ? b->n : 0));
    b->p = NULL;
    b->n = 0;
}

/* A big number parameter of the key, big-endian, left-padded to pad bytes
 * (0: minimal length). */
static int bn_blob(EVP_PKEY *key, const char *name, int pad, blob *b)
{
    BIGNUM *bn = NULL;
    if (!EVP_PKEY_get_bn_param(key, name, &bn))
        return 0;
    b->n = pad ? pad : BN_num_bytes(bn);
    b->p = OPENSSL_malloc(b->n ? (size_t)b->n : 1);
    if (b->p && BN_bn2binpad(bn, b->p, b->n) < 0)
        free_blob(b);
    BN_clear_free(bn);
    return b->p != NULL;
}

/* Crypto.cpp createAccess: the SecAccess "only this application" becomes a
 * private key that is private, sensitive, never extractable and good for
 * signing only. */
#define ACCESS_ATTRS(t, f)                                                 \
    ATTR(CKA_PRIVATE, &(t), sizeof(CK_BBOOL)),                             \
    ATTR(CKA_SENSITIVE, &(t), sizeof(CK_BBOOL)),                           \
    ATTR(CKA_EXTRACTABLE, &(f), sizeof(CK_BBOOL)),                         \
    ATTR(CKA_SIGN, &(t), sizeof(CK_BBOOL)),                                \
    ATTR(CKA_DECRYPT, &(f), sizeof(CK_BBOOL)),                             \
    ATTR(CKA_UNWRAP, &(f), sizeof(CK_BBOOL)),                              \
    ATTR(CKA_DERIVE, &(f), sizeof(CK_BBOOL)),                              \
    ATTR(CKA_SIGN_RECOVER, &(f), sizeof(CK_BBOOL)),                        \
    ATTR(CKA_ALWAYS_AUTHENTICATE, &(f), sizeof(CK_BBOOL))

enum { RSA_N, RSA_E, RSA_D, RSA_P, RSA_Q, RSA_DP, RSA_DQ, RSA_QINV, N_KEY_BLOBS };

static int32_t create_key(kc_keychain *kc, const identity *id,
                          const char *label, CK_BBOOL token,
                          CK_OBJECT_HANDLE *out, kc_error *err)
{
    static const char *rsa_params[N_KEY_BLOBS] = {
        OSSL_PKEY_PARAM_RSA_N, OSSL_PKEY_PARAM_RSA_E, OSSL_PKEY_PARAM_RSA_D,
        OSSL_PKEY_PARAM_RSA_FACTOR1, OSSL_PKEY_PARAM_RSA_FACTOR2,
        OSSL_PKEY_PARAM_RSA_EXPONENT1, OSSL_PKEY_PARAM_RSA_EXPONENT2,
        OSSL_PKEY_PARAM_RSA_COEFFICIENT1};
    static const CK_ATTRIBUTE_TYPE rsa_types[N_KEY_BLOBS] = {
        CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT, CKA_PRIME_1,
        CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT};
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_KEY_TYPE type = id->key_type == KC_KEY_RSA ? CKK_RSA : CKK_EC;
    CK_BBOOL t = CK_TRUE, f = CK_FALSE;
    CK_ATTRIBUTE tmpl[32] = {
        ATTR(CKA_CLASS, &cls, sizeof cls),
        ATTR(CKA_KEY_TYPE, &type, sizeof type),
        ATTR(CKA_TOKEN, &token, sizeof token),
        ATTR(CKA_LABEL, label, strlen(label)),
        ATTR(CKA_ID, id->key_id, sizeof id->key_id),
        ACCESS_ATTRS(t, f),
    };
    CK_ULONG n = 14;
    blob b[N_KEY_BLOBS];
    char group[64];
    int i, ok = 1;
    int32_t st;

    memset(b, 0, sizeof b);
    if (id->key_type == KC_KEY_RSA) {
        for (i = 0; i < N_KEY_BLOBS && ok; i++) {
            ok = bn_blob(id->key, rsa_params[i], 0, &b[i]);
            tmpl[n++] = (CK_ATTRIBUTE)ATTR(rsa_types[i], b[i].p, b[i].n);
        }
    } else {
        /* CKA_EC_PARAMS: the DER of the named curve's OID */
        ok = EVP_PKEY_get_utf8_string_param(id->key,
                                            OSSL_PKEY_PARAM_GROUP_NAME,
                                            group, sizeof group, NULL);
        if (ok) {
            b[0].n = i2d_ASN1_OBJECT(OBJ_nid2obj(OBJ_txt2nid(group)), &b[0].p);
            ok = b[0].n > 0 &&
                 bn_blob(id->key, OSSL_PKEY_PARAM_PRIV_KEY,
                         (EVP_PKEY_get_bits(id->key) + 7) / 8, &b[1]);
        }
        tmpl[n++] = (CK_ATTRIBUTE)ATTR(CKA_EC_PARAMS, b[0].p, b[0].n);
        tmpl[n++] = (CK_ATTRIBUTE)ATTR(CKA_VALUE, b[1].p, b[1].n);
    }
    if (!ok) {
        st = fail_ssl(err, KC_errSecUnimplemented,
                      "cannot read the private key's parameters");
        goto out;
    }
    st = create_object(kc, tmpl, n, cls, label, out,
                       "C_CreateObject (private key)", err);
out:
    for (i = 0; i < N_KEY_BLOBS; i++)
        free_blob(&b[i]);
    ERR_clear_error();
    return st;
}

static int32_t create_cert(kc_keychain *kc, const identity *id,
                           const char *label, CK_BBOOL token,
                           CK_OBJECT_HANDLE *out, kc_error *err)
{
    CK_OBJECT_CLASS cls = CKO_CERTIFICATE;
    CK_CERTIFICATE_TYPE type = CKC_X_509;
    CK_BBOOL f = CK_FALSE;
    unsigned char *p[4] = {NULL, NULL, NULL, NULL};
    int len[4];
    int32_t st = KC_errSecSuccess;
    int i;

    len[0] = i2d_X509(id->cert, &p[0]);
    len[1] = i2d_X509_NAME(X509_get_subject_name(id->cert), &p[1]);
    len[2] = i2d_X509_NAME(X509_get_issuer_name(id->cert), &p[2]);
    len[3] = i2d_ASN1_INTEGER(X509_get_serialNumber(id->cert), &p[3]);
    for (i = 0; i < 4; i++)
        if (len[i] <= 0) {
            st = fail_ssl(err, KC_errSecDecode, "cannot encode the certificate");
            goto out;
        }
    {
        CK_ATTRIBUTE tmpl[] = {
            ATTR(CKA_CLASS, &cls, sizeof cls),
            ATTR(CKA_CERTIFICATE_TYPE, &type, sizeof type),
            ATTR(CKA_TOKEN, &token, sizeof token),
            ATTR(CKA_PRIVATE, &f, sizeof f),
            ATTR(CKA_LABEL, label, strlen(label)),
            ATTR(CKA_ID, id->key_id, sizeof id->key_id),
            ATTR(CKA_VALUE, p[0], len[0]),
            ATTR(CKA_SUBJECT, p[1], len[1]),
            ATTR(CKA_ISSUER, p[2], len[2]),
            ATTR(CKA_SERIAL_NUMBER, p[3], len[3]),
        };
        st = create_object(kc, tmpl, 10, cls, label, out,
                           "C_CreateObject (certificate)", err);
    }
out:
    for (i = 0; i < 4; i++)
        OPENSSL_free(p[i]);
    return st;
}

/* Destroy every object the template finds; *found counts them. */
static int32_t destroy_all(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                           const char *what, CK_ULONG *found, kc_error *err)
{
    CK_OBJECT_HANDLE h[MAX_FOUND];
    CK_ULONG count, i;
    CK_RV rv = find(kc, tmpl, n, h, MAX_FOUND, &count);
    *found = count;
    if (rv != CKR_OK)
        return fail_ck(err, rv, what);
    for (i = 0; i < count; i++)
        if ((rv = destroy(kc, h[i])) != CKR_OK)
            return fail_ck(err, rv, what);
    return KC_errSecSuccess;
}

/* Crypto.cpp killKey's core: the certificate, then the private key
 * separately (deleting the pair in one call failed when running as root),
 * then the lease last, so an interrupted removal still names its owner.
 * With key_id, only objects of that identity go: an identity that has
 * replaced ours under the label is left alone.  cert: the certificate when
 * the caller found it already, else CK_INVALID_HANDLE (search for it). */
static int32_t remove_identity(kc_keychain *kc, const char *label,
                               const CK_BYTE *key_id, CK_ULONG key_id_len,
                               CK_OBJECT_HANDLE cert, int with_lease,
                               CK_ULONG *found, kc_error *err)
{
    CK_OBJECT_CLASS cert_cls = CKO_CERTIFICATE, key_cls = CKO_PRIVATE_KEY,
                    data_cls = CKO_DATA;
    CK_ULONG label_len = strlen(label), n;
    CK_ATTRIBUTE cert_tmpl[] = {ATTR(CKA_CLASS, &cert_cls, sizeof cert_cls),
                                ATTR(CKA_LABEL, label, label_len),
                                ATTR(CKA_ID, key_id, key_id_len)};
    CK_ATTRIBUTE key_tmpl[] = {ATTR(CKA_CLASS, &key_cls, sizeof key_cls),
                               ATTR(CKA_LABEL, label, label_len),
                               ATTR(CKA_ID, key_id, key_id_len)};
    CK_ATTRIBUTE lease_tmpl[] = {
        ATTR(CKA_CLASS, &data_cls, sizeof data_cls),
        ATTR(CKA_LABEL, label, label_len),
        ATTR(CKA_APPLICATION, LEASE_APPLICATION, strlen(LEASE_APPLICATION)),
        ATTR(CKA_OBJECT_ID, key_id, key_id_len)};
    int32_t st;
    CK_RV rv;

    *found = 0;
    if (cert != CK_INVALID_HANDLE) {
        if ((rv = destroy(kc, cert)) != CKR_OK)
            return fail_ck(err, rv, "removing the certificate");
        n = 1;
    } else if ((st = destroy_all(kc, cert_tmpl, key_id ? 3 : 2,
                                 "removing the certificate", &n, err))) {
        return st;
    }
    *found += n;
    if ((st = destroy_all(kc, key_tmpl, key_id ? 3 : 2,
                          "removing the private key", &n, err)))
        return st;
    *found += n;
    if (with_lease) {
        if ((st = destroy_all(kc, lease_tmpl, key_id ? 4 : 3,
                              "removing the lease", &n, err)))
            return st;
        *found += n;
    }
    return KC_errSecSuccess;
}

/* The lease of the token identity under label, if any. */
static int read_lease(kc_keychain *kc, const char *label, lease *l)
{
    CK_OBJECT_CLASS data_cls = CKO_DATA;
    CK_ATTRIBUTE tmpl[] = {
        ATTR(CKA_CLASS, &data_cls, sizeof data_cls),
        ATTR(CKA_LABEL, label, strlen(label)),
        ATTR(CKA_APPLICATION, LEASE_APPLICATION, strlen(LEASE_APPLICATION))};
    CK_OBJECT_HANDLE h;
    CK_ULONG count;
    object *o;
    int ok = 0;
    if (find(kc, tmpl, 3, &h, 1, &count) != CKR_OK || !count)
        return 0;
    if ((o = malloc(sizeof *o))) {
        ok = read_object(kc, h, o) == CKR_OK && parse_lease(o, l);
        free(o);
    }
    return ok;
}

/* An object that holds nothing but PKCS#11 defaults: no label, no id, no
 * value or key material.  SoftHSM2 leaves these when a process dies inside
 * C_CreateObject (the object exists before its template is committed).
 * Nobody can use one, so removing it harms no one. */
static int crash_orphan(kc_keychain *kc, const object *o)
{
    CK_ATTRIBUTE material[] = {ATTR(CKA_MODULUS, NULL, 0),
                               ATTR(CKA_EC_PARAMS, NULL, 0)};
    if (o->label[0] || o->id_len)
        return 0;
    switch (o->cls) {
    case CKO_CERTIFICATE:
        return o->value_len == 0;
    case CKO_DATA:
        return o->value_len == 0 && !o->application[0];
    case CKO_PRIVATE_KEY:
        kc->mod->f->C_GetAttributeValue(kc->session, o->handle, material, 2);
        return (material[0].ulValueLen == 0 ||
                material[0].ulValueLen == CK_UNAVAILABLE_INFORMATION) &&
               (material[1].ulValueLen == 0 ||
                material[1].ulValueLen == CK_UNAVAILABLE_INFORMATION);
    default:
        return 0;
    }
}

/* SoftHSM2 answers CKR_ATTRIBUTE_VALUE_INVALID for every attribute of an
 * object whose file a crash left half-written. */
static int unreadable(CK_RV rv) { return rv == CKR_ATTRIBUTE_VALUE_INVALID; }

/* Remove every crash orphan (see crash_orphan) and every object a crash
 * left unreadable; *removed counts them. */
static int32_t sweep_orphans(kc_keychain *kc, CK_ULONG *removed,
                             kc_error *err)
{
    CK_OBJECT_HANDLE *h = NULL;
    CK_ULONG n = 0, i;
    int32_t st = KC_errSecSuccess;
    object *o;
    CK_RV rv;

    *removed = 0;
    if (!(o = malloc(sizeof *o)))
        return fail(err, KC_errSecAllocate, 0, "out of memory");
    if ((rv = all_objects(kc, &h, &n)) != CKR_OK)
        st = fail_ck(err, rv, "searching for objects left by a crash");
    for (i = 0; i < n && !st; i++) {
        rv = read_object(kc, h[i], o);
        if (!unreadable(rv) && !(rv == CKR_OK && crash_orphan(kc, o)))
            continue;
        if ((rv = destroy(kc, h[i])) != CKR_OK)
            st = fail_ck(err, rv, "removing an object left by a crash");
        else
            ++*removed;
    }
    free(h);
    free(o);
    return st;
}

/* Remove what a dead owner left under label, and the crash orphans its
 * death may have left. */
static int32_t reclaim(kc_keychain *kc, const char *label, kc_error *err)
{
    CK_ULONG found;
    int32_t st = remove_identity(kc, label, NULL, 0, CK_INVALID_HANDLE, 1,
                                 &found, err);
    return st ? st : sweep_orphans(kc, &found, err);
}

/* Crypto.cpp lookupKeychainItem's refusal: nothing may carry the label
 * (unless its owner is dead and the caller asked to reclaim it), and no
 * private key may have the same id. */
static int32_t refuse_duplicate(kc_keychain *kc, const char *label,
                                const identity *id, int flags, kc_error *err)
{
    CK_OBJECT_CLASS key_cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE by_label[] = {ATTR(CKA_LABEL, label, strlen(label))};
    CK_ATTRIBUTE by_id[] = {ATTR(CKA_CLASS, &key_cls, sizeof key_cls),
                            ATTR(CKA_ID, id->key_id, sizeof id->key_id)};
    CK_OBJECT_HANDLE h;
    CK_ULONG count;
    lease l;
    int alive;
    int32_t st;
    CK_RV rv;

    /* a crash may have left objects no label leads to */
    if ((flags & KC_PREAUTH_RECLAIM_STALE) && (st = sweep_orphans(kc, &count, err)))
        return st;
    rv = find(kc, by_label, 1, &h, 1, &count);
    if (rv != CKR_OK)
        return fail_ck(err, rv, "searching the token");
    if (count) {
        if (!read_lease(kc, label, &l))
            return fail(err, KC_errSecDuplicateItem, 0,
                        "an identity labelled '%s' is already in the store; "
                        "refusing to import over it", label);
        alive = lease_alive(&l);
        if (alive != 0 || !(flags & KC_PREAUTH_RECLAIM_STALE))
            return fail(err, KC_errSecDuplicateItem, 0,
                        "an identity labelled '%s' is already in the store, "
                        "owned by process %ld on %s (%s); refusing to import "
                        "over it%s", label, l.pid, l.host,
                        alive > 0 ? "running" : alive == 0 ? "dead" : "unknown",
                        alive == 0 ? ": reclaim it (stale='reclaim') or purge"
                                   : "");
        if ((st = reclaim(kc, label, err)))
            return st;
    }
    rv = find(kc, by_id, 2, &h, 1, &count);
    if (rv != CKR_OK)
        return fail_ck(err, rv, "searching the token");
    if (count)
        return fail(err, KC_errSecDuplicateItem, 0,
                    "the private key of this identity is already in the "
                    "store under another label; refusing to import it twice");
    return KC_errSecSuccess;
}

static void identity_info(const identity *id, const char *label,
                          int ephemeral, kc_item_info *info)
{
    memset(info, 0, sizeof *info);
    info->has_certificate = 1;
    info->has_private_key = 1;
    info->ephemeral = ephemeral;
    info->key_type = id->key_type;
    snprintf(info->label, sizeof info->label, "%s", label);
    memcpy(info->key_id, id->key_id, sizeof id->key_id);
    info->key_id_len = sizeof id->key_id;
    describe_name(X509_get_subject_name(id->cert), info);
    info->owner_pid = getpid();
    info->owner_alive = 1;
}

static int32_t create_lease(kc_keychain *kc, const identity *id,
                            const char *label, CK_OBJECT_HANDLE *out,
                            kc_error *err)
{
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_BBOOL t = CK_TRUE;
    char text[512];
    CK_ATTRIBUTE tmpl[] = {
        ATTR(CKA_CLASS, &cls, sizeof cls),
        ATTR(CKA_TOKEN, &t, sizeof t),
        ATTR(CKA_PRIVATE, &t, sizeof t),
        ATTR(CKA_LABEL, label, strlen(label)),
        ATTR(CKA_APPLICATION, LEASE_APPLICATION, strlen(LEASE_APPLICATION)),
        /* the key id, so kill finds its own lease without reading it */
        ATTR(CKA_OBJECT_ID, id->key_id, sizeof id->key_id),
        ATTR(CKA_VALUE, text, 0),
    };
    make_lease(id->key_id, text, sizeof text);
    tmpl[6].ulValueLen = strlen(text);
    return create_object(kc, tmpl, 7, cls, label, out,
                         "C_CreateObject (lease)", err);
}

int32_t kc_preauth_key(kc_keychain *kc, const uint8_t *p12, size_t p12_len,
                       const char *password, const char *label, int flags,
                       kc_item_info *out, kc_error *err)
{
    identity id;
    CK_BBOOL token = (flags & KC_PREAUTH_EPHEMERAL) ? CK_FALSE : CK_TRUE;
    CK_OBJECT_HANDLE made[3]; /* lease, certificate, key: undone in reverse */
    int n_made = 0;
    CK_RV rv;
    int32_t st;

    memset(&id, 0, sizeof id);
    if ((st = check_label(label, err)))
        return st;
    if (flags & ~(KC_PREAUTH_EPHEMERAL | KC_PREAUTH_RECLAIM_STALE))
        return fail(err, KC_errSecParam, 0, "unknown flags 0x%x", flags);
    /* Parse before touching the store: a bad file changes nothing. */
    if ((st = copy_identity_from_pkcs12(p12, p12_len, password, &id, err)))
        return st;
    if ((st = begin(kc, err)))
        goto out;
    if ((st = refuse_duplicate(kc, label, &id, flags, err)))
        goto unlock;
    /* The lease goes first and leaves last: every partial state a crash
     * can leave names its (dead) owner. */
    if (token && (st = create_lease(kc, &id, label, &made[n_made], err)))
        goto undo;
    n_made += token;
    if ((st = create_cert(kc, &id, label, token, &made[n_made], err)))
        goto undo;
    n_made++;
    if ((st = create_key(kc, &id, label, token, &made[n_made], err)))
        goto undo;
    n_made++;
    snprintf(kc->imported_label, sizeof kc->imported_label, "%s", label);
    memcpy(kc->imported_id, id.key_id, sizeof id.key_id);
    kc->has_imported_id = 1;
    kc->imported_ephemeral = !token;
    if (out)
        identity_info(&id, label, !token, out);
    goto unlock;
undo:
    /* all or nothing: take back out what this call created */
    while (n_made-- > 0)
        if ((rv = destroy(kc, made[n_made])) != CKR_OK && err)
            snprintf(err->message + strlen(err->message),
                     sizeof err->message - strlen(err->message),
                     "; undoing the import also failed: %s", ckr_name(rv));
unlock:
    end(kc);
out:
    free_identity(&id);
    return st;
}

int32_t kc_reclaim_stale(kc_keychain *kc, const char *label, kc_error *err)
{
    lease l;
    int alive;
    int32_t st;

    CK_ULONG removed;

    if (!label) {
        if ((st = begin(kc, err)))
            return st;
        st = sweep_orphans(kc, &removed, err);
        if (!st && !removed)
            st = fail(err, KC_errSecItemNotFound, 0,
                      "no objects left by a crash in the store");
        end(kc);
        return st;
    }
    if ((st = check_label(label, err)))
        return st;
    if ((st = begin(kc, err)))
        return st;
    if (!read_lease(kc, label, &l))
        st = fail(err, KC_errSecItemNotFound, 0,
                  "no leased identity labelled '%s' in the store", label);
    else if ((alive = lease_alive(&l)) != 0)
        st = fail(err, KC_errSecDuplicateItem, 0,
                  "the identity labelled '%s' is owned by process %ld on %s "
                  "(%s): not stale", label, l.pid, l.host,
                  alive > 0 ? "running" : "unknown");
    else
        st = reclaim(kc, label, err);
    end(kc);
    return st;
}

int32_t kc_kill_key(kc_keychain *kc, const char *label, kc_error *err)
{
    CK_OBJECT_CLASS cert_cls = CKO_CERTIFICATE;
    CK_BYTE key_id[KC_KEY_ID_MAX];
    CK_ULONG key_id_len = 0, count, found;
    CK_OBJECT_HANDLE cert = CK_INVALID_HANDLE;
    int ours, with_lease = 1;
    CK_RV rv;
    int32_t st;

    if ((st = check_label(label, err)))
        return st;
    if ((st = begin(kc, err)))
        return st;
    /* The key id: remembered from our own import, else the certificate's
     * (another handle or process imported it). */
    ours = kc->has_imported_id && strcmp(kc->imported_label, label) == 0;
    if (ours) {
        memcpy(key_id, kc->imported_id, sizeof kc->imported_id);
        key_id_len = sizeof kc->imported_id;
        with_lease = !kc->imported_ephemeral;
    } else {
        CK_ATTRIBUTE cert_tmpl[] = {
            ATTR(CKA_CLASS, &cert_cls, sizeof cert_cls),
            ATTR(CKA_LABEL, label, strlen(label))};
        rv = find(kc, cert_tmpl, 2, &cert, 1, &count);
        if (rv != CKR_OK) {
            st = fail_ck(err, rv, "searching the certificate");
            goto out;
        }
        if (count) {
            CK_ATTRIBUTE a = ATTR(CKA_ID, key_id, sizeof key_id);
            rv = kc->mod->f->C_GetAttributeValue(kc->session, cert, &a, 1);
            if (rv == CKR_OK)
                key_id_len = a.ulValueLen;
        } else {
            cert = CK_INVALID_HANDLE;
        }
    }
    if ((st = remove_identity(kc, label, key_id_len ? key_id : NULL,
                              key_id_len, cert, with_lease, &found, err)))
        goto out;
    if (!found)
        st = fail(err, KC_errSecItemNotFound, 0,
                  "no identity labelled '%s' in the store", label);
    if (ours)
        kc->has_imported_id = 0;
out:
    end(kc);
    return st;
}

/* Fold one object into the description of its label. */
static void add_object(const object *o, kc_item_info *info)
{
    lease l;
    if (!info->label[0])
        snprintf(info->label, sizeof info->label, "%s", o->label);
    if (parse_lease(o, &l)) {
        info->owner_pid = l.pid;
        info->owner_alive = lease_alive(&l);
        return;
    }
    if (o->cls == CKO_CERTIFICATE) {
        /* CKA_SUBJECT is cheap to decode; the whole certificate costs ~100x
         * more in OpenSSL 3 (it decodes the public key): only without one */
        const unsigned char *p = o->subject;
        X509_NAME *name = o->subject_len
                              ? d2i_X509_NAME(NULL, &p, (long)o->subject_len)
                              : NULL;
        X509 *cert = NULL;
        info->has_certificate = 1;
        if (name) {
            describe_name(name, info);
            X509_NAME_free(name);
        } else {
            p = o->value;
            if ((cert = d2i_X509(NULL, &p, (long)o->value_len)))
                describe_name(X509_get_subject_name(cert), info);
            X509_free(cert);
        }
        ERR_clear_error();
    } else if (o->cls == CKO_PRIVATE_KEY) {
        info->has_private_key = 1;
        info->key_type = o->key_type == CKK_RSA  ? KC_KEY_RSA
                         : o->key_type == CKK_EC ? KC_KEY_EC
                                                 : KC_KEY_NONE;
    } else {
        return;
    }
    if (!info->key_id_len && o->id_len <= sizeof info->key_id) {
        memcpy(info->key_id, o->id, o->id_len);
        info->key_id_len = o->id_len;
    }
    info->ephemeral = !o->token;
    if (info->ephemeral) {
        /* session objects belong to this process */
        info->owner_pid = getpid();
        info->owner_alive = 1;
    } else if (!info->owner_pid) {
        info->owner_alive = -1; /* until its lease says otherwise */
    }
}

int32_t kc_lookup_keychain_item(kc_keychain *kc, const char *label,
                                kc_item_info *out, kc_error *err)
{
    CK_ATTRIBUTE tmpl[1];
    CK_OBJECT_HANDLE h[MAX_FOUND];
    CK_ULONG count = 0, i;
    kc_item_info info;
    object *o = NULL;
    CK_RV rv;
    int32_t st;

    if ((st = check_label(label, err)))
        return st;
    memset(&info, 0, sizeof info);
    tmpl[0] = (CK_ATTRIBUTE)ATTR(CKA_LABEL, label, strlen(label));
    if ((st = begin(kc, err)))
        return st;
    rv = find(kc, tmpl, 1, h, MAX_FOUND, &count);
    if (rv != CKR_OK) {
        st = fail_ck(err, rv, "searching the token");
        goto out;
    }
    if (count && !(o = malloc(sizeof *o))) {
        st = fail(err, KC_errSecAllocate, 0, "out of memory");
        goto out;
    }
    for (i = 0; i < count; i++) {
        rv = read_object(kc, h[i], o);
        if (rv == CKR_OBJECT_HANDLE_INVALID)
            continue; /* removed meanwhile by another session */
        if (rv != CKR_OK) {
            st = fail_ck(err, rv, "reading an object");
            goto out;
        }
        add_object(o, &info);
    }
    if (!info.has_certificate && !info.has_private_key)
        st = fail(err, KC_errSecItemNotFound, 0,
                  "no identity labelled '%s' in the store", label);
    else if (out)
        *out = info;
out:
    free(o);
    end(kc);
    return st;
}

int32_t kc_list_items(kc_keychain *kc, kc_item_info *out, size_t cap,
                      size_t *count, kc_error *err)
{
    CK_OBJECT_HANDLE *h = NULL;
    CK_ULONG n = 0, i;
    kc_item_info *items = NULL, *grown;
    size_t n_items = 0, j;
    object *o;
    CK_RV rv;
    int32_t st;

    if (!count)
        return fail(err, KC_errSecParam, 0, "no count output");
    *count = 0;
    if (!(o = malloc(sizeof *o)))
        return fail(err, KC_errSecAllocate, 0, "out of memory");
    if ((st = begin(kc, err))) {
        free(o);
        return st;
    }
    if ((rv = all_objects(kc, &h, &n)) != CKR_OK) {
        st = fail_ck(err, rv, "listing the token");
        goto out;
    }
    for (i = 0; i < n; i++) {
        /* identities (labelled certificates, keys, our leases), and crash
         * leftovers, which group under the empty label */
        rv = read_object(kc, h[i], o);
        if (unreadable(rv))
            memset(o, 0, sizeof *o);
        else if (rv != CKR_OK ||
                 (o->label[0] ? o->cls != CKO_CERTIFICATE &&
                                    o->cls != CKO_PRIVATE_KEY &&
                                    strcmp(o->application, LEASE_APPLICATION)
                              : !crash_orphan(kc, o)))
            continue;
        for (j = 0; j < n_items; j++)
            if (strcmp(items[j].label, o->label) == 0)
                break;
        if (j == n_items) {
            if (!(grown = realloc(items, (n_items + 1) * sizeof *items))) {
                st = fail(err, KC_errSecAllocate, 0, "out of memory");
                goto out;
            }
            items = grown;
            memset(&items[n_items++], 0, sizeof *items);
        }
        add_object(o, &items[j]);
    }
    for (j = 0; j < n_items && j < cap; j++)
        out[j] = items[j];
    *count = n_items;
out:
    free(h);
    free(items);
    free(o);
    end(kc);
    return st;
}

int32_t kc_init_token(const char *module_path, const char *token,
                      const char *so_pin, const char *user_pin, kc_error *err)
{
    CK_UTF8CHAR label[TOKEN_LABEL_LEN];
    CK_SESSION_HANDLE s;
    CK_SLOT_ID slot;
    CK_FLAGS flags;
    module *m;
    CK_RV rv;
    int32_t st;

    if (!module_path || !*module_path || !token || !*token || !so_pin ||
        !user_pin)
        return fail(err, KC_errSecParam, 0,
                    "module, token label and both PINs are required");
    if (strlen(token) > TOKEN_LABEL_LEN)
        return fail(err, KC_errSecParam, 0,
                    "token label longer than %d bytes", TOKEN_LABEL_LEN);
    if ((st = get_module(module_path, &m, err)))
        return st;
    if ((st = find_slot(m, token, 1, &slot, &flags, err)))
        return st;
    pad_label(token, label);
    rv = m->f->C_InitToken(slot, (CK_UTF8CHAR_PTR)so_pin, strlen(so_pin),
                           label);
    if (rv != CKR_OK)
        return fail_ck(err, rv, "C_InitToken");
    rv = m->f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL,
                             NULL, &s);
    if (rv != CKR_OK)
        return fail_ck(err, rv, "C_OpenSession");
    rv = m->f->C_Login(s, CKU_SO, (CK_UTF8CHAR_PTR)so_pin, strlen(so_pin));
    if (rv == CKR_OK) {
        rv = m->f->C_InitPIN(s, (CK_UTF8CHAR_PTR)user_pin, strlen(user_pin));
        m->f->C_Logout(s);
        st = rv == CKR_OK ? KC_errSecSuccess : fail_ck(err, rv, "C_InitPIN");
    } else {
        st = fail_ck(err, rv, "C_Login (SO)");
    }
    m->f->C_CloseSession(s);
    return st;
}
