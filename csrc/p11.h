/*
 * p11.h -- private header of the PKCS#11 backend.
 *
 * keychain_pkcs11.c holds the flow (the Crypto.cpp functions, in the same
 * names and order as keychain_darwin.c); these support units hold what
 * Security.framework does for Darwin and a PKCS#11 token does not:
 *
 *   p11_error.c    kc_error filling, CK_RV -> OSStatus, transient results
 *   p11_session.c  module registry, login, slots, the handle, the token
 *                  lock, kc_open / kc_close / kc_init_token
 *   p11_object.c   object I/O with retries: find, read, create, destroy
 *   p11_lease.c    leases: who owns a token identity, and is it alive
 *   p11_openssl.c  OpenSSL: PKCS#12 parsing, names, key material
 *
 * Nothing here is exported from the built module (-fvisibility=hidden).
 */
#ifndef KEYCHAIN_EXT_P11_H
#define KEYCHAIN_EXT_P11_H

#include "keychain.h"

#include <pthread.h>
#include <stdlib.h>
#include <sys/types.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <openssl/x509.h>

#include <p11-kit/pkcs11.h>

#define TOKEN_LABEL_LEN 32   /* CK_TOKEN_INFO.label: space padded */
#define MAX_SLOTS 16         /* tokens per module we remember logins for */
#define MAX_FOUND 64         /* objects one label may carry that we handle */
#define TRANSIENT_RETRIES 5  /* tries for CKR_TOKEN_NOT_PRESENT and kin */
/* tries before a leased identity whose objects are not seen counts as gone:
 * SoftHSM2 can hide them from their own writer for a while (about 2 s of
 * backoff in all, spent only on that anomaly) */
#define UNSEEN_RETRIES 10
#define DEFAULT_LOCK_WAIT_MS 120000 /* a lock held longer: an error, not a wait */

#define ATTR(type, ptr, len) {(type), (void *)(ptr), (CK_ULONG)(len)}

/* Free what was read from a token, cleansed first (read only what is
 * needed, and leave none of it in freed memory). */
static inline void free_read(void *p, size_t n)
{
    if (p) {
        OPENSSL_cleanse(p, n);
        free(p);
    }
}

/* ---------------------------------------------------------- p11_error.c */

int32_t fail(kc_error *err, int32_t status, int64_t native, const char *fmt,
             ...) __attribute__((format(printf, 4, 5)));
int32_t fail_ck(kc_error *err, CK_RV rv, const char *what);
int32_t fail_ssl(kc_error *err, int32_t status, const char *what);
const char *ckr_name(CK_RV rv);
int transient(CK_RV rv);
/* openat(dir, path, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, mode) of a
 * regular file only: a symlink, FIFO, directory or device planted in a
 * state directory is refused (-1, errno ELOOP or EINVAL), never waited on. */
int open_regular(int dir, const char *path, int flags, mode_t mode);
void backoff(int attempt);

/* -------------------------------------------------------- p11_session.c */

typedef struct slot_login {
    CK_SLOT_ID slot;
    pid_t pid;                          /* process that logged in */
    CK_SESSION_HANDLE anchor;           /* never closed: SoftHSM2 #464 */
    int verified;                       /* C_Login accepted pin_digest's PIN */
    unsigned char pin_digest[SHA256_DIGEST_LENGTH];
} slot_login;

typedef struct module {
    struct module *next;
    dev_t dev;                          /* the module file: its identity */
    ino_t ino;
    char *path;
    char *init_args;                    /* C_Initialize pReserved, or NULL */
    CK_FUNCTION_LIST_PTR f;
    pid_t init_pid;                     /* process that C_Initialize'd */
    slot_login logins[MAX_SLOTS];
    size_t n_logins;
} module;

struct kc_keychain {
    pthread_mutex_t lock;           /* serializes this handle's calls */
    module *mod;
    CK_SLOT_ID slot;
    char token[TOKEN_LABEL_LEN + 1];   /* finds the slot again (ensure_session) */
    CK_SESSION_HANDLE session;
    pid_t pid;                      /* process that opened session/lock */
    char *pin;                      /* to log in again after fork() */
    char *state_dir;                /* lock and leases; NULL: neither */
    int lock_fd;
    int exclusive;                  /* only keychain_ext uses the token */
    long lock_wait_ms;              /* how long to wait for the token lock */
};

void library_enter(void);
void library_leave(void);

/* Every operation runs between begin() and end(): the library (see fork
 * safety in p11_session.c), the handle's mutex, the session (reopened
 * after fork) and the cross-process token lock. */
int32_t begin(kc_keychain *kc, kc_error *err);
void end(kc_keychain *kc);
int32_t check_label(const char *label, kc_error *err);

/* --------------------------------------------------------- p11_object.c */

/* The attributes lookup reports, read in one C_GetAttributeValue (never
 * an object's value: certificates are described by CKA_SUBJECT). */
typedef struct object {
    CK_OBJECT_HANDLE handle;
    CK_OBJECT_CLASS cls;
    CK_BBOOL token;
    CK_KEY_TYPE key_type;
    CK_BYTE id[KC_KEY_ID_MAX];
    CK_ULONG id_len;
    char label[KC_LABEL_MAX];
    CK_BYTE subject[1024];          /* certificate subject DER */
    CK_ULONG subject_len;
} object;

/* Objects with an empty label seen before a create: what a failed
 * C_CreateObject leaves is blank and not among them. */
typedef struct blanks {
    CK_OBJECT_HANDLE h[MAX_FOUND];
    CK_ULONG n;
    int complete;                   /* all of them fit in h */
} blanks;

CK_RV find(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n,
           CK_OBJECT_HANDLE *found, CK_ULONG max, CK_ULONG *count);
CK_RV all_objects(kc_keychain *kc, CK_OBJECT_HANDLE **out, CK_ULONG *count);
CK_RV read_object(kc_keychain *kc, CK_OBJECT_HANDLE h, object *o);
int32_t create_object(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                      CK_OBJECT_CLASS cls, const char *label,
                      const blanks *before, CK_OBJECT_HANDLE *out,
                      const char *what, kc_error *err);
int32_t note_blanks(kc_keychain *kc, blanks *b, kc_error *err);
void remove_new_blanks(kc_keychain *kc, const blanks *before);
int32_t remove_blanks(kc_keychain *kc, CK_ULONG *removed, kc_error *err);
int32_t remove_all_blanks(kc_keychain *kc, CK_ULONG *removed, kc_error *err);
int is_blank(kc_keychain *kc, CK_OBJECT_HANDLE h);
int32_t destroy_session_objects(kc_keychain *kc, CK_OBJECT_HANDLE *h,
                                CK_ULONG n, kc_error *err);
void describe_object(kc_keychain *kc, const object *o, kc_item_info *info);
CK_RV destroy(kc_keychain *kc, CK_OBJECT_HANDLE h);
int32_t destroy_all(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                    const char *what, CK_ULONG *found, kc_error *err);

/* ---------------------------------------------------------- p11_lease.c */

#define OWNER_ID_LEN 32 /* hex characters of a random owner id */
#define MAX_OWNERS 32   /* processes sharing one identity */

typedef struct owner_ref {
    char id[OWNER_ID_LEN + 1];
    long pid;                       /* for people: liveness is the flock */
    char host[KC_HOST_MAX];
} owner_ref;

/* Who owns the token identity under a label (see p11_lease.c). */
typedef struct lease {
    char label[KC_LABEL_MAX];
    CK_BYTE key_id[SHA_DIGEST_LENGTH];
    int held, shared;
    int unreadable;                 /* a lease file we cannot parse */
    int n_owners;
    owner_ref owners[MAX_OWNERS];
} lease;

int32_t lease_read(kc_keychain *kc, const char *label, lease *l, int *found,
                   kc_error *err);
int32_t lease_write(kc_keychain *kc, const lease *l, kc_error *err);
int32_t lease_remove(kc_keychain *kc, const char *label, kc_error *err);
int32_t lease_all(kc_keychain *kc, lease **out, size_t *n, kc_error *err);
int32_t lease_join(kc_keychain *kc, lease *l, kc_error *err);
void lease_joined(kc_keychain *kc);
void lease_unjoin(kc_keychain *kc);
int lease_leave(kc_keychain *kc, lease *l);
void lease_released(kc_keychain *kc);
void lease_prune(kc_keychain *kc, lease *l);
int lease_mine(const lease *l);
int lease_alive(kc_keychain *kc, const lease *l); /* 1, 0, -1 cannot tell */
void lease_describe(kc_keychain *kc, const lease *l, kc_item_info *info);
int32_t sweep_owner_files(kc_keychain *kc, CK_ULONG *removed, kc_error *err);
int32_t sweep_crash_leftovers(kc_keychain *kc, CK_ULONG *removed, kc_error *err);
int32_t fail_owned(const lease *l, int alive, const char *why, int32_t status,
                   kc_error *err);
int is_me(const owner_ref *o);
void owner_atfork_prepare(void);
void owner_atfork_parent(void);
void owner_atfork_child(void);

/* -------------------------------------------------------- p11_openssl.c */

/* What copy_identity_from_pkcs12 takes out of a PKCS#12 file. */
typedef struct identity {
    EVP_PKEY *key;
    X509 *cert;
    CK_BYTE key_id[SHA_DIGEST_LENGTH]; /* SHA-1 of the public key */
    int key_type;                      /* KC_KEY_* */
} identity;

typedef struct blob {
    unsigned char *p;
    int n;
} blob;

int32_t parse_pkcs12(const uint8_t *data, size_t len, const char *password,
                     identity *out, kc_error *err);
void free_identity(identity *id);
void describe_name(const X509_NAME *name, kc_item_info *info);
int bn_blob(EVP_PKEY *key, const char *name, int pad, blob *b);
void free_blob(blob *b);

#endif
