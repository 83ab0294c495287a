/*
 * keychain.h -- the one C API of keychain_ext, implemented by every backend.
 *
 * Shaped after Phusion Passenger's Crypto.cpp (preAuthKey, killKey,
 * lookupKeychainItem): import a PKCS#12 identity into the platform's key
 * store so a TLS client can use it without a prompt, then remove the
 * certificate and the private key again, separately.
 *
 * Backends: keychain_pkcs11.c (any PKCS#11 token; Linux) and
 * keychain_darwin.c (Security.framework; macOS).
 *
 * Conventions
 *  - Every function that can fail returns an OSStatus (int32_t, 0 =
 *    errSecSuccess, values from Apple's SecBase.h) on every platform.
 *  - Every such function takes a `kc_error *err` (may be NULL) that it fills
 *    on failure: the status again, the backend's native code (CK_RV, OpenSSL
 *    packed error, or OSStatus) and a human-readable message.  The message
 *    never contains a PIN or password.
 *  - Strings in and out are NUL-terminated UTF-8.  Output buffers are
 *    fixed-size members of caller-allocated structs: the caller owns all
 *    memory it passes in; the backend owns everything behind a kc_keychain.
 *  - A kc_keychain may be used from several threads at once; the backend
 *    serializes its own calls.
 *
 * This file is also the cdef that cffi parses: plain declarations only.
 */
#ifndef KEYCHAIN_EXT_KEYCHAIN_H
#define KEYCHAIN_EXT_KEYCHAIN_H

#include <stddef.h>
#include <stdint.h>

/* OSStatus values the backends return (SecBase.h). */
#define KC_errSecSuccess                 0
#define KC_errSecUnimplemented          -4
#define KC_errSecIO                     -36
#define KC_errSecParam                  -50
#define KC_errSecWrPerm                 -61
#define KC_errSecAllocate               -108
#define KC_errSecUserCanceled           -128
#define KC_errSecNotAvailable           -25291
#define KC_errSecReadOnly               -25292
#define KC_errSecAuthFailed             -25293
#define KC_errSecNoSuchKeychain         -25294
#define KC_errSecDuplicateItem          -25299
#define KC_errSecItemNotFound           -25300
#define KC_errSecInvalidItemRef         -25304
#define KC_errSecNoDefaultKeychain      -25307
#define KC_errSecInteractionNotAllowed  -25308
#define KC_errSecInteractionRequired    -25315
#define KC_errSecUnknownFormat          -25257
#define KC_errSecPassphraseRequired     -25260
#define KC_errSecPkcs12VerifyFailure    -25264
#define KC_errSecDecode                 -26275
#define KC_errSecMissingEntitlement     -34018
#define KC_errSecInvalidOwnerEdit       -25244

/* Sizes of the fixed buffers below (including the terminating NUL). */
#define KC_MESSAGE_MAX  512
#define KC_LABEL_MAX    256
#define KC_SUBJECT_MAX  512
#define KC_KEY_ID_MAX   64
#define KC_BACKEND_MAX  32
#define KC_HOST_MAX     64

/* kc_preauth_key flags. */
#define KC_PREAUTH_EPHEMERAL      1  /* session objects: never on disk, gone
                                        when the handle closes or the process
                                        dies (PKCS#11 only; errSecUnimplemented
                                        on Darwin) */
#define KC_PREAUTH_RECLAIM_STALE  2  /* an identity under this label whose
                                        owners are all dead is removed
                                        first instead of refusing */
#define KC_PREAUTH_HELD           4  /* owned by no process: stays until
                                        kc_kill_key, never stale */
#define KC_PREAUTH_SHARED         8  /* several processes may own it: if the
                                        label holds this same identity,
                                        shared, join its owners; it goes
                                        with the last owner (Darwin: the
                                        same PKCS#12 file, by SHA-256) */

/* kc_kill_key flags. */
#define KC_KILL_FORCE  1  /* remove it even if another live process owns it
                             or keychain_ext cannot prove it made it */

/* Key types reported in kc_item_info.key_type. */
#define KC_KEY_NONE  0
#define KC_KEY_RSA   1
#define KC_KEY_EC    2

typedef struct kc_error {
    int32_t status;                 /* the OSStatus also returned */
    int64_t native_code;            /* CK_RV / OpenSSL error / OSStatus; 0 if none */
    char message[KC_MESSAGE_MAX];   /* what failed and why */
} kc_error;

/* How to open a store.  Unused fields may be NULL. */
typedef struct kc_options {
    const char *module;      /* PKCS#11: path of the module to dlopen */
    const char *init_args;   /* PKCS#11: C_Initialize's pReserved string
                                (NSS: "configdir='sql:DIR'"), or NULL */
    const char *token;       /* PKCS#11: token label; Darwin: keychain path
                                or NULL for the default search list */
    const char *pin;         /* PKCS#11: user PIN (never copied into messages) */
    const char *state_dir;   /* PKCS#11: an existing directory shared by every
                                process using the token: the lock that
                                serializes them and the leases that say who
                                owns each token identity.  NULL: no lock, and
                                only ephemeral identities can be made.
                                Darwin: the lock only (NULL: none) */
    int exclusive;           /* PKCS#11: only keychain_ext uses this token (the
                                embedded store), so objects a crash left
                                without a label are provably ours */
    long lock_wait_ms;       /* PKCS#11: how long to wait for the token lock
                                before failing with errSecIO; 0 = 120 s */
} kc_options;

/* What a store holds under one label. */
typedef struct kc_item_info {
    int has_certificate;            /* a certificate carries the label */
    int has_private_key;            /* the matching private key is present */
    int ephemeral;                  /* session objects (PKCS#11) */
    int key_type;                   /* KC_KEY_* */
    char label[KC_LABEL_MAX];
    uint8_t key_id[KC_KEY_ID_MAX];  /* SHA-1 of the public key (CKA_ID /
                                       kSecAttrApplicationLabel) */
    size_t key_id_len;
    char subject[KC_SUBJECT_MAX];   /* certificate subject, RFC 2253 */
    char common_name[KC_LABEL_MAX]; /* subject CN, "" if none */
    int ours;                       /* keychain_ext made it: a lease names it,
                                       or it is session objects */
    int held;                       /* owned by no process, until killed */
    int shared;                     /* owners may join */
    int owners;                     /* processes owning it */
    int mine;                       /* this process is one of them */
    int64_t owner_pid;              /* an owner (a live one if any); 0 none */
    char owner_host[KC_HOST_MAX];   /* its host name */
    int owner_alive;                /* 1 an owner runs (or it is held), 0 all
                                       are dead, -1 cannot tell */
} kc_item_info;

typedef struct kc_keychain kc_keychain;

/* The backend compiled in: "pkcs11" or "darwin". Static string. */
const char *kc_backend(void);

/* The version string compiled into the extension. Static string. */
const char *kc_version(void);

/* Open the store described by opts; *out receives a handle the caller
 * releases with kc_close.  Returns errSecNoSuchKeychain (module or token
 * missing), errSecAuthFailed (wrong PIN), errSecInteractionNotAllowed (the
 * token would need a protected authentication path / a prompt), errSecParam. */
int32_t kc_open(const kc_options *opts, kc_keychain **out, kc_error *err);

/* Close the handle: its session objects vanish.  NULL is a no-op. */
void kc_close(kc_keychain *kc);

/* Who owns an identity (PKCS#11; see README "Ownership"):
 *  - a token identity carries a lease, a record in opts.state_dir written
 *    under the token lock before its objects are created: its label, key
 *    id and owners (processes), or none when it is held;
 *  - an owner is alive while it holds the flock on its owner file in
 *    state_dir, so PID namespaces, pid reuse and shared host names cannot
 *    fool the judgement; a missing or unreadable file is "cannot tell",
 *    which counts as alive;
 *  - session (ephemeral) objects belong to the process that sees them;
 *  - nothing is removed unless a lease or the session proves it ours and
 *    its owners are dead, or its owner asks (kc_kill_key).
 * Darwin: the lease is an owner record in the keychain itself, a generic
 * password (service "keychain_ext", account = label: held, owners, key
 * id, the PKCS#12 file's SHA-256) added before the import and deleted
 * last; an owner is alive while kill(pid, 0) finds it on this host
 * (another host: cannot tell).  opts.state_dir, if given, holds the lock
 * file processes changing owner records flock (waiting without a bound). */

/* Crypto.cpp preAuthKey: import the identity in the PKCS#12 bytes under
 * label so it can be used without a prompt, owned by this process (flags:
 * KC_PREAUTH_*).  Refuses with errSecDuplicateItem, touching nothing, when
 * a certificate or key carries the label (unless KC_PREAUTH_SHARED joins
 * the same shared identity, or KC_PREAUTH_RECLAIM_STALE removes one whose
 * owners are dead) or a key has the same id.  All or nothing: on any error
 * the store holds what it held before, and objects a failed create left
 * are removed.  On success fills *out (may be NULL).  Other statuses:
 * errSecPkcs12VerifyFailure (wrong password), errSecDecode (not a PKCS#12
 * file, or no key / no certificate in it), errSecParam,
 * errSecUnimplemented (key type the store cannot hold). */
int32_t kc_preauth_key(kc_keychain *kc, const uint8_t *p12, size_t p12_len,
                       const char *password, const char *label, int flags,
                       kc_item_info *out, kc_error *err);

/* Crypto.cpp killKey: this process gives up the identity under label; when
 * no other owner is left, delete the certificate, then the private key
 * separately, by the key id its lease records, then the lease.  Without
 * KC_KILL_FORCE, refuses with errSecInvalidOwnerEdit, changing nothing,
 * when another live process owns it or no lease proves keychain_ext made
 * it.  Verifies that what it deleted is gone.  errSecItemNotFound if
 * nothing carries the label. */
int32_t kc_kill_key(kc_keychain *kc, const char *label, int flags,
                    kc_error *err);

/* Crypto.cpp lookupKeychainItem: errSecSuccess and *out filled when a
 * certificate or key carries the label, errSecItemNotFound when nothing
 * does. */
int32_t kc_lookup_keychain_item(kc_keychain *kc, const char *label,
                                kc_item_info *out, kc_error *err);

/* Remove the identity under label only if its lease names owners that are
 * all dead (a crash between preauth and kill); a held identity is never
 * stale.  errSecItemNotFound if it has no lease; errSecDuplicateItem if an
 * owner runs or cannot be judged.  Decided under the store's lock.  With
 * label NULL, on an exclusive store only, removes the objects a process
 * killed inside C_CreateObject can leave (no label, no id, no value) and
 * the owner files of dead processes; errSecItemNotFound if there was
 * nothing, errSecInvalidOwnerEdit on a store that is not exclusive (the
 * macOS keychain never is). */
int32_t kc_reclaim_stale(kc_keychain *kc, const char *label, kc_error *err);

/* Every identity in the store that this library can see, one entry per
 * label (certificate, key and lease grouped), including incomplete ones
 * left by a crash (has_certificate or has_private_key 0).  Fills up to cap
 * entries and sets *count to the number present (which may exceed cap: call
 * again with a larger buffer).  Darwin: keychain_ext's identities only
 * (one per owner record), not the user's own. */
int32_t kc_list_items(kc_keychain *kc, kc_item_info *out, size_t cap,
                      size_t *count, kc_error *err);

/* PKCS#11 only: initialize the first uninitialized token of a SoftHSM2
 * module with the label and PINs (used to create the embedded default store
 * without putting PINs in any argv); any other module is refused with
 * errSecParam.  errSecUnimplemented on Darwin. */
int32_t kc_init_token(const char *module, const char *token,
                      const char *so_pin, const char *user_pin, kc_error *err);

#endif
