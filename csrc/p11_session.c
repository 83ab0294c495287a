/*
 * p11_session.c -- modules, logins, slots and the handle.
 *
 * Process-wide state, kept on purpose:
 *  - a module is dlopen'ed once and never unloaded, and C_Finalize is never
 *    called: libcurl's pkcs11 engine may share the module in this process;
 *  - one "anchor" session per token stays open for the life of the process,
 *    so closing a handle never closes the token's last session (SoftHSM2
 *    #464, and the login would be lost for every other user).
 *
 * Every token operation runs under a per-token flock shared by all
 * processes (SoftHSM2's file store is fragile under concurrent writers).
 */
#define _GNU_SOURCE
#include "p11.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#ifndef KC_VERSION
#define KC_VERSION "0.0.0"
#endif

/* --------------------------------------------------------------- modules */

static pthread_mutex_t modules_lock = PTHREAD_MUTEX_INITIALIZER;
static module *modules;

/* ------------------------------------------------------------------ fork */

/* fork() copies every mutex as it is: one held by another thread would
 * stay locked forever in the child.  So every call into the library holds
 * in_library for reading, fork takes it for writing -- it waits until no
 * thread is inside the library (OpenSSL's locks included: the p12 parse
 * runs under it too) -- and the child starts with every lock free (and, in
 * p11_lease.c, as a new owner). */
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static pthread_rwlock_t in_library;

static void init_in_library(void)
{
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* a steady stream of calls must not starve a fork */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&in_library, &attr);
    pthread_rwlockattr_destroy(&attr);
}

static void atfork_prepare(void)
{
    pthread_rwlock_wrlock(&in_library);
    pthread_mutex_lock(&modules_lock);
    owner_atfork_prepare();
}

static void atfork_parent(void)
{
    owner_atfork_parent();
    pthread_mutex_unlock(&modules_lock);
    pthread_rwlock_unlock(&in_library);
}

static void atfork_child(void)
{
    owner_atfork_child();
    pthread_mutex_init(&modules_lock, NULL);
    init_in_library();
}

static void setup_fork(void)
{
    init_in_library();
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* Every public entry point runs between these two, once (not nested). */
void library_enter(void)
{
    pthread_once(&fork_once, setup_fork);
    pthread_rwlock_rdlock(&in_library);
}

void library_leave(void) { pthread_rwlock_unlock(&in_library); }

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
    args.pReserved = m->init_args; /* NSS: "configdir=..." */
    rv = m->f->C_Initialize(&args);
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED)
        return fail_ck(err, rv, "C_Initialize");
    m->init_pid = getpid();
    return KC_errSecSuccess;
}

/* The module at path, loaded and initialized in this process with
 * init_args.  Modules are known by their file, not their path: a symlink
 * and its target are one module, with one login state. */
static int32_t get_module(const char *path, const char *init_args,
                          module **out, kc_error *err)
{
    module *m;
    int32_t st = KC_errSecSuccess;
    void *dl;
    CK_C_GetFunctionList get_list;
    CK_FUNCTION_LIST_PTR f = NULL;
    struct stat file;
    CK_RV rv;

    *out = NULL;
    if (stat(path, &file) != 0)
        return fail(err, KC_errSecNoSuchKeychain, errno,
                    "cannot load PKCS#11 module %s: %s", path, strerror(errno));
    pthread_mutex_lock(&modules_lock);
    for (m = modules; m; m = m->next)
        if (m->dev == file.st_dev && m->ino == file.st_ino)
            break;
    if (m && strcmp(m->init_args ? m->init_args : "", init_args ? init_args : "")) {
        st = fail(err, KC_errSecParam, 0,
                  "module %s is already initialized with other arguments", path);
        m = NULL;
        goto out;
    }
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
        if (!m || !(m->path = strdup(path)) ||
            (init_args && !(m->init_args = strdup(init_args)))) {
            if (m)
                free(m->path);
            free(m);
            m = NULL;
            st = fail(err, KC_errSecAllocate, 0, "out of memory");
            goto out; /* the dlopen handle stays: harmless, rare */
        }
        m->f = f;
        m->dev = file.st_dev;
        m->ino = file.st_ino;
        m->next = modules;
        modules = m;
    }
    st = module_ready(m, err);
out:
    pthread_mutex_unlock(&modules_lock);
    *out = st ? NULL : m;
    return st;
}

/* Log the token in once per process, keeping an anchor session open.  A
 * later login with another PIN while logged in would get
 * CKR_USER_ALREADY_LOGGED_IN, so we compare against the digest of the PIN
 * that C_Login accepted.  A PIN is never recorded unless C_Login itself
 * accepted it: when another user of the module in this process logged in
 * first, it stays unverified and every login tries C_Login again. */
static int32_t login(module *m, CK_SLOT_ID slot, const char *pin,
                     kc_error *err)
{
    unsigned char digest[SHA256_DIGEST_LENGTH];
    slot_login *l = NULL;
    int32_t st = KC_errSecSuccess;
    CK_RV rv;
    size_t i;

    SHA256((const unsigned char *)pin, strlen(pin), digest);
    pthread_mutex_lock(&modules_lock);
    for (i = 0; i < m->n_logins && !l; i++)
        if (m->logins[i].slot == slot)
            l = &m->logins[i];
    if (l && l->verified &&
        CRYPTO_memcmp(l->pin_digest, digest, sizeof digest)) {
        st = fail(err, KC_errSecAuthFailed, (int64_t)CKR_PIN_INCORRECT,
                  "C_Login failed: CKR_PIN_INCORRECT (0xa0)");
        goto out;
    }
    if (l && l->pid == getpid() && l->verified)
        goto out;
    if (!l) {
        if (m->n_logins == MAX_SLOTS) {
            st = fail(err, KC_errSecAllocate, 0, "too many tokens open");
            goto out;
        }
        l = &m->logins[m->n_logins++];
        memset(l, 0, sizeof *l);
        l->slot = slot;
    }
    /* First login of this process (a forked child keeps the digest: the
     * token may still count it as logged in, and then only the digest can
     * tell a wrong PIN). */
    if (l->pid != getpid()) {
        rv = m->f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                 NULL, NULL, &l->anchor);
        if (rv != CKR_OK) {
            st = fail_ck(err, rv, "C_OpenSession");
            goto out;
        }
        l->pid = getpid();
    }
    rv = m->f->C_Login(l->anchor, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
    if (rv == CKR_OK) {
        memcpy(l->pin_digest, digest, sizeof digest);
        l->verified = 1;
    } else if (rv != CKR_USER_ALREADY_LOGGED_IN) {
        st = fail_ck(err, rv, "C_Login");
    }
out:
    pthread_mutex_unlock(&modules_lock);
    OPENSSL_cleanse(digest, sizeof digest);
    return st;
}

/* Forget this process's login to kc's token (another user of the module
 * closed all sessions or finalized it): the next login starts afresh. */
static void forget_login(kc_keychain *kc, int finalized)
{
    size_t i;
    pthread_mutex_lock(&modules_lock);
    if (finalized)
        kc->mod->init_pid = 0;
    for (i = 0; i < kc->mod->n_logins; i++)
        if (finalized || kc->mod->logins[i].slot == kc->slot)
            kc->mod->logins[i].pid = 0;
    pthread_mutex_unlock(&modules_lock);
    kc->pid = 0;
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
            CK_ULONG room = n;
            slots = calloc(room, sizeof *slots);
            if (!slots)
                return fail(err, KC_errSecAllocate, 0, "out of memory");
            rv = m->f->C_GetSlotList(CK_TRUE, slots, &n);
            if (rv == CKR_OK && n > room)
                rv = CKR_FUNCTION_FAILED; /* a broken module: trust none of it */
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

const char *kc_backend(void) { return "pkcs11"; }
const char *kc_version(void) { return KC_VERSION; }

static void free_secret(char *s)
{
    if (s) {
        OPENSSL_cleanse(s, strlen(s));
        free(s);
    }
}

/* The token lock: state_dir/lock, never through a symlink. */
static int open_lock_file(const char *state_dir)
{
    char path[4096];
    int n = snprintf(path, sizeof path, "%s/lock", state_dir);
    if (n <= 0 || (size_t)n >= sizeof path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return open_regular(AT_FDCWD, path, O_RDWR | O_CREAT, 0600);
}

/* A wait for the token lock by a helper thread, so that the caller can
 * give up after a while: flock itself cannot time out, and polling
 * instead would let a busy process starve the others. */
typedef struct lock_wait {
    pthread_mutex_t m;
    pthread_cond_t c;
    int fd;          /* a dup of the lock file's: the helper's to close */
    int result;      /* 0 waiting, 1 locked, -1 failed (err_no) */
    int err_no;
    int refs;        /* caller and helper: the last one frees */
} lock_wait;

static void release_wait(lock_wait *w)
{
    int last;
    pthread_mutex_lock(&w->m);
    last = --w->refs == 0;
    pthread_mutex_unlock(&w->m);
    if (last) {
        pthread_mutex_destroy(&w->m);
        pthread_cond_destroy(&w->c);
        free(w);
    }
}

static void *wait_for_lock(void *arg)
{
    lock_wait *w = arg;
    int rc, abandoned;
    while ((rc = flock(w->fd, LOCK_EX)) != 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&w->m);
    w->result = rc == 0 ? 1 : -1;
    w->err_no = errno;
    abandoned = w->refs == 1; /* the caller gave up and let go */
    pthread_cond_signal(&w->c);
    pthread_mutex_unlock(&w->m);
    /* the lock stays with the open file (the caller's descriptor shares
     * it), unless the caller gave up and closed its own */
    if (abandoned && rc == 0)
        flock(w->fd, LOCK_UN);
    close(w->fd);
    release_wait(w);
    return NULL;
}

/* Take the token lock on fd, waiting at most wait_ms.  On a timeout the
 * caller must close fd and open the lock file afresh: the helper may
 * still get the lock on that open file, and then drops it. */
static int32_t take_lock(int fd, long wait_ms, kc_error *err)
{
    struct timespec until;
    pthread_attr_t attr;
    pthread_t helper;
    lock_wait *w;
    int result, err_no, rc = 0;

    if (flock(fd, LOCK_EX | LOCK_NB) == 0)
        return KC_errSecSuccess; /* the common case: nobody holds it */
    if (errno != EWOULDBLOCK && errno != EINTR)
        return fail(err, KC_errSecIO, errno, "cannot lock the token: %s",
                    strerror(errno));
    if (!(w = calloc(1, sizeof *w)))
        return fail(err, KC_errSecAllocate, 0, "out of memory");
    pthread_mutex_init(&w->m, NULL);
    pthread_cond_init(&w->c, NULL);
    w->refs = 2;
    if ((w->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) {
        w->refs = 1;
        release_wait(w);
        return fail(err, KC_errSecIO, errno, "cannot lock the token: %s",
                    strerror(errno));
    }
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&helper, &attr, wait_for_lock, w) != 0) {
        pthread_attr_destroy(&attr);
        close(w->fd);
        w->refs = 1;
        release_wait(w);
        return fail(err, KC_errSecAllocate, 0, "cannot start a thread");
    }
    pthread_attr_destroy(&attr);
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += wait_ms / 1000;
    until.tv_nsec += (wait_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&w->m);
    while (!w->result && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&w->c, &w->m, &until);
    result = w->result;
    err_no = w->err_no;
    pthread_mutex_unlock(&w->m);
    release_wait(w);
    if (result == 1)
        return KC_errSecSuccess;
    if (result == -1)
        return fail(err, KC_errSecIO, err_no, "cannot lock the token: %s",
                    strerror(err_no));
    return fail(err, KC_errSecIO, EWOULDBLOCK,
                "another process has held the token lock for %ld s; "
                "giving up", wait_ms / 1000);
}

/* Open (or, after fork(), reopen) the lock file: a forked child needs its
 * own open file, since flock locks belong to the open file. */
static int32_t open_lock(kc_keychain *kc, kc_error *err)
{
    if (!kc->state_dir || (kc->lock_fd >= 0 && kc->pid == getpid()))
        return KC_errSecSuccess;
    if (kc->lock_fd >= 0)
        close(kc->lock_fd);
    kc->lock_fd = open_lock_file(kc->state_dir);
    if (kc->lock_fd < 0)
        return fail(err, KC_errSecIO, errno,
                    "cannot open the lock file in %s: %s", kc->state_dir,
                    strerror(errno));
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
    /* A reopen (after fork, or after another user of the module finalized
     * it): slot IDs may have changed -- SoftHSM2 numbers its slots afresh
     * in every C_Initialize -- so the token is found again by its label. */
    if (kc->session != CK_INVALID_HANDLE) {
        CK_FLAGS flags;
        if ((st = find_slot(kc->mod, kc->token, 0, &kc->slot, &flags, err)))
            return st;
    }
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


/* The session, logged in: recovered when another user of the module in
 * this process (libp11 under libcurl's engine, when it unloads) logged
 * out, closed all sessions or called C_Finalize -- a key is invisible to a
 * session without a login, and a kill must never miss it. */
static int32_t ensure_login(kc_keychain *kc, kc_error *err)
{
    CK_SESSION_INFO info;
    CK_RV rv = CKR_OK;
    int attempt;
    for (attempt = 0; attempt < TRANSIENT_RETRIES; attempt++) {
        if (attempt)
            backoff(attempt);
        if (!transient(rv = kc->mod->f->C_GetSessionInfo(kc->session, &info)))
            break;
    }
    if (rv == CKR_OK && (info.state == CKS_RW_USER_FUNCTIONS ||
                         info.state == CKS_RO_USER_FUNCTIONS))
        return KC_errSecSuccess;
    if (rv == CKR_OK) {
        rv = kc->mod->f->C_Login(kc->session, CKU_USER,
                                 (CK_UTF8CHAR_PTR)kc->pin, strlen(kc->pin));
        return rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN
                   ? KC_errSecSuccess
                   : fail_ck(err, rv, "C_Login (again)");
    }
    if (rv != CKR_SESSION_HANDLE_INVALID && rv != CKR_SESSION_CLOSED &&
        rv != CKR_CRYPTOKI_NOT_INITIALIZED)
        return fail_ck(err, rv, "C_GetSessionInfo");
    forget_login(kc, rv == CKR_CRYPTOKI_NOT_INITIALIZED);
    return ensure_session(kc, err);
}

static void close_keychain(kc_keychain *kc);

static int32_t open_keychain(const kc_options *opts, kc_keychain **out,
                             kc_error *err)
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
    if (opts->state_dir) {
        if ((lock_fd = open_lock_file(opts->state_dir)) < 0)
            return fail(err, KC_errSecIO, errno,
                        "cannot open the lock file in %s: %s", opts->state_dir,
                        strerror(errno));
        if ((st = take_lock(lock_fd, opts->lock_wait_ms > 0 ? opts->lock_wait_ms
                                                          : DEFAULT_LOCK_WAIT_MS,
                            err)))
            goto out;
    }
    if ((st = get_module(opts->module, opts->init_args, &m, err)))
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
    snprintf(kc->token, sizeof kc->token, "%s", opts->token);
    kc->lock_fd = -1;
    kc->pid = 0; /* ensure_session opens session and lock file */
    kc->pin = strdup(opts->pin);
    kc->state_dir = opts->state_dir ? strdup(opts->state_dir) : NULL;
    kc->exclusive = opts->exclusive;
    kc->lock_wait_ms = opts->lock_wait_ms > 0 ? opts->lock_wait_ms
                                              : DEFAULT_LOCK_WAIT_MS;
    if (!kc->pin || (opts->state_dir && !kc->state_dir))
        st = fail(err, KC_errSecAllocate, 0, "out of memory");
    else if (!(st = open_lock(kc, err)))
        st = ensure_session(kc, err);
    if (st) {
        close_keychain(kc);
        goto out;
    }
    *out = kc;
out:
    if (lock_fd >= 0)
        close(lock_fd);
    return st;
}

static void close_keychain(kc_keychain *kc)
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
    free(kc->state_dir);
    pthread_mutex_destroy(&kc->lock);
    free(kc);
}

void end(kc_keychain *kc)
{
    if (kc->lock_fd >= 0)
        flock(kc->lock_fd, LOCK_UN);
    pthread_mutex_unlock(&kc->lock);
    library_leave();
}

int32_t begin(kc_keychain *kc, kc_error *err)
{
    int32_t st;
    if (!kc)
        return fail(err, KC_errSecParam, 0, "no keychain handle");
    library_enter();
    pthread_mutex_lock(&kc->lock);
    if ((st = open_lock(kc, err)) ||
        (kc->lock_fd >= 0 && (st = take_lock(kc->lock_fd, kc->lock_wait_ms, err)))) {
        if (kc->lock_fd >= 0 && st == KC_errSecIO) {
            close(kc->lock_fd); /* see take_lock: a fresh one next time */
            kc->lock_fd = -1;
        }
        pthread_mutex_unlock(&kc->lock);
        library_leave();
        return st;
    }
    /* after fork(), the child's session opens under the lock */
    if ((st = ensure_session(kc, err)) || (st = ensure_login(kc, err))) {
        end(kc);
        return st;
    }
    return KC_errSecSuccess;
}


int32_t check_label(const char *label, kc_error *err)
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

static int32_t init_token(const char *module_path, const char *token,
                          const char *so_pin, const char *user_pin,
                          kc_error *err)
{
    CK_INFO info;
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
    if ((st = get_module(module_path, NULL, &m, err)))
        return st;
    /* Only a SoftHSM2 token, the embedded store, is ever initialized: on a
     * real device a blank card would be initialized with an SO PIN nobody
     * keeps. */
    rv = m->f->C_GetInfo(&info);
    if (rv != CKR_OK || memcmp(info.manufacturerID, "SoftHSM", 7) != 0)
        return fail(err, KC_errSecParam, (int64_t)rv,
                    "%s is not SoftHSM2: keychain_ext initializes only its "
                    "own embedded SoftHSM2 store", module_path);
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

/* ------------------------------------------------------- entry points */

int32_t kc_open(const kc_options *opts, kc_keychain **out, kc_error *err)
{
    int32_t st;
    library_enter();
    st = open_keychain(opts, out, err);
    library_leave();
    return st;
}

void kc_close(kc_keychain *kc)
{
    library_enter();
    close_keychain(kc);
    library_leave();
}

int32_t kc_init_token(const char *module, const char *token,
                      const char *so_pin, const char *user_pin, kc_error *err)
{
    int32_t st;
    library_enter();
    st = init_token(module, token, so_pin, user_pin, err);
    library_leave();
    return st;
}
