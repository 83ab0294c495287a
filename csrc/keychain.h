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

/* Sizes of the fixed buffers below (including the terminating NUL). */
#define KC_MESSAGE_MAX  512
#define KC_LABEL_MAX    256
#define KC_SUBJECT_MAX  512
#define KC_KEY_ID_MAX   64
#define KC_BACKEND_MAX  32

/* kc_preauth_key flags. */
#define KC_PREAUTH_EPHEMERAL      1  /* session objects: never on disk, gone
                                        when the handle closes or the process
                                        dies (PKCS#11 only; errSecUnimplemented
                                        on Darwin) */
#define KC_PREAUTH_RECLAIM_STALE  2  /* an identity under this label whose
                                        owner process is dead is removed
                                        first instead of refusing */

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
    const char *token;       /* PKCS#11: token label; Darwin: keychain path
                                or NULL for the default search list */
    const char *pin;         /* PKCS#11: user PIN (never copied into messages) */
    const char *lock_path;   /* PKCS#11: file to flock around token operations
                                so processes sharing the token serialize;
                                NULL = no cross-process lock */
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
    int64_t owner_pid;              /* process that imported it; 0 if unknown */
    int owner_alive;                /* 1 alive, 0 dead, -1 unknown */
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

/* Crypto.cpp preAuthKey: import the identity in the PKCS#12 bytes under
 * label so it can be used without a prompt, and remember its key id.
 * Refuses with errSecDuplicateItem, touching nothing, when a certificate or
 * key carries the label or a key has the same id.  All or nothing: on any
 * error the store holds what it held before.  On success fills *out (may be
 * NULL).  Other statuses: errSecPkcs12VerifyFailure (wrong password),
 * errSecDecode (not a PKCS#12 file, or no key / no certificate in it),
 * errSecParam, errSecUnimplemented (key type the store cannot hold). */
int32_t kc_preauth_key(kc_keychain *kc, const uint8_t *p12, size_t p12_len,
                       const char *password, const char *label, int flags,
                       kc_item_info *out, kc_error *err);

/* Crypto.cpp killKey: delete the certificate, then the private key
 * separately (by the id remembered at import, else by the certificate's
 * key id), and forget the id.  errSecItemNotFound if nothing carries the
 * label. */
int32_t kc_kill_key(kc_keychain *kc, const char *label, kc_error *err);

/* Crypto.cpp lookupKeychainItem: errSecSuccess and *out filled when a
 * certificate or key carries the label, errSecItemNotFound when nothing
 * does. */
int32_t kc_lookup_keychain_item(kc_keychain *kc, const char *label,
                                kc_item_info *out, kc_error *err);

/* Remove the identity under label only if its lease names an owner process
 * that is dead (a crash between preauth and kill), with the partial objects
 * such a crash leaves.  errSecItemNotFound if nothing carries the label or
 * it has no lease; errSecDuplicateItem if the owner runs or cannot be
 * judged (another host).  Decided under the store's lock, so a live
 * identity is never removed.  With label NULL, removes only the objects a
 * process killed inside C_CreateObject can leave (no label, no id, no
 * value: unusable by anyone); errSecItemNotFound if there are none.
 * errSecUnimplemented where there are no leases (Darwin). */
int32_t kc_reclaim_stale(kc_keychain *kc, const char *label, kc_error *err);

/* Every identity in the store that this library can see, one entry per
 * label (certificate, key and lease grouped), including incomplete ones
 * left by a crash (has_certificate or has_private_key 0).  Fills up to cap
 * entries and sets *count to the number present (which may exceed cap: call
 * again with a larger buffer).  errSecUnimplemented where the store cannot
 * enumerate. */
int32_t kc_list_items(kc_keychain *kc, kc_item_info *out, size_t cap,
                      size_t *count, kc_error *err);

/* PKCS#11 only: initialize the first uninitialized token of the module with
 * the label and PINs (used to create the embedded default store without
 * putting PINs in any argv).  errSecUnimplemented on Darwin. */
int32_t kc_init_token(const char *module, const char *token,
                      const char *so_pin, const char *user_pin, kc_error *err);

#endif
