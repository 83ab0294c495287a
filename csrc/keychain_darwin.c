/*
 * keychain_darwin.c -- the Security.framework backend of csrc/keychain.h.
 *
 * Follows Phusion Passenger's Crypto.cpp (preAuthKey, killKey,
 * lookupKeychainItem, createQueryDict, createAccess,
 * copyIdentityFromPKCS12File) with the defects listed in DESIGN.md fixed:
 *  - every function has a single exit (goto cleanup) that releases every
 *    CF object it owns, on every path;
 *  - the user-interaction flag is saved before and restored to its PREVIOUS
 *    value after the import, on every path (Crypto.cpp forced it to true);
 *  - the key id is kept in the handle (no shadowing local) and matched
 *    against the private key's kSecAttrApplicationLabel, the attribute that
 *    holds the SHA-1 of the public key that kSecImportItemKeyID reports;
 *  - CFStringGetCStringPtr may return NULL: we fall back to CFStringGetCString;
 *  - an import that succeeds with zero items is an error, and a missing
 *    kSecImportItemKeyID falls back to the key's own application label;
 *  - a lookup status other than errSecItemNotFound is an error, not "found".
 *
 * What "label" means here: the certificate subject's common name.  The
 * identity is searched with kSecMatchSubjectWholeString, as Crypto.cpp did,
 * and that is also the name curl's Secure Transport backend resolves a
 * CURLOPT_SSLCERT nickname to.  kSecAttrLabel is not used: SecPKCS12Import
 * picks item labels itself and offers no way to set them.  Because of this
 * kc_preauth_key checks that the imported certificate's CN equals the label
 * exactly and rolls the import back if not (else kill could never find it).
 *
 * We never create a keychain and never change the default keychain or the
 * search list.  opts->token may name an existing keychain file: it is opened
 * (not created) and used to scope searches and as the import target.
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <CoreFoundation/CoreFoundation.h>
#include <Security/Security.h>

#include "keychain.h"

#ifndef KC_VERSION
#define KC_VERSION "0.0.0"
#endif

/* Silence deprecation warnings around the few legacy keychain calls and
 * constants only (SecAccessCreate, SecKeychain*, the file-keychain search
 * and import options): SDKs from macOS 12 on deprecate them and there is no
 * replacement for file keychains.  Used as a statement-level bracket. */
#define KC_DEPRECATED_BEGIN                                     \
    _Pragma("GCC diagnostic push")                              \
    _Pragma("GCC diagnostic ignored \"-Wdeprecated-declarations\"")
#define KC_DEPRECATED_END _Pragma("GCC diagnostic pop")

/* The key id remembered at import, per label (Crypto.cpp's member `id`). */
typedef struct kc_key_id {
    struct kc_key_id *next;
    char label[KC_LABEL_MAX];
    uint8_t id[KC_KEY_ID_MAX];
    size_t len;
} kc_key_id;

struct kc_keychain {
    pthread_mutex_t lock;       /* serializes calls on this handle */
    SecKeychainRef keychain;    /* opts->token opened, or NULL */
    CFArrayRef search_list;     /* [keychain] or NULL = default list */
    kc_key_id *ids;
};

/* The user-interaction flag is process-wide: two handles must not interleave
 * their save/disable/restore, or one would "restore" the other's false. */
static pthread_mutex_t interaction_lock = PTHREAD_MUTEX_INITIALIZER;

static void release(CFTypeRef ref)
{
    if (ref != NULL)
        CFRelease(ref);
}

/* Copy a CFString into buf as UTF-8; "" when it cannot be converted. */
static void cf_to_cstr(CFStringRef s, char *buf, size_t size)
{
    const char *p;

    buf[0] = '\0';
    if (s == NULL)
        return;
    /* Fast path only: Crypto.cpp used it without the NULL check. */
    p = CFStringGetCStringPtr(s, kCFStringEncodingUTF8);
    if (p != NULL) {
        snprintf(buf, size, "%s", p);
        return;
    }
    if (!CFStringGetCString(s, buf, (CFIndex)size, kCFStringEncodingUTF8))
        buf[0] = '\0';
}

/* Fill err with status, the native OSStatus behind it, "what" and
 * Security.framework's own message for the native status. */
static int32_t vfail(kc_error *err, OSStatus status, OSStatus native,
                     const char *fmt, va_list ap)
{
    char what[KC_MESSAGE_MAX / 2 - 16];  /* room for the rest below */
    char sec[KC_MESSAGE_MAX / 2 - 16];
    CFStringRef msg;

    if (err == NULL)
        return status;
    vsnprintf(what, sizeof what, fmt, ap);
    msg = SecCopyErrorMessageString(native, NULL);
    cf_to_cstr(msg, sec, sizeof sec);
    release(msg);
    err->status = status;
    err->native_code = native;
    if (sec[0] != '\0')
        snprintf(err->message, sizeof err->message, "%s: %s (OSStatus %d)",
                 what, sec, (int)native);
    else
        snprintf(err->message, sizeof err->message, "%s (OSStatus %d)",
                 what, (int)native);
    return status;
}

static int32_t fail(kc_error *err, OSStatus status, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfail(err, status, status, fmt, ap);
    va_end(ap);
    return status;
}

static int32_t fail_native(kc_error *err, OSStatus status, OSStatus native,
                           const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfail(err, status, native, fmt, ap);
    va_end(ap);
    return status;
}

static void clear_error(kc_error *err)
{
    if (err != NULL)
        memset(err, 0, sizeof *err);
}

static int valid_label(const char *label)
{
    return label != NULL && label[0] != '\0' && strlen(label) < KC_LABEL_MAX;
}

/* --- remembered key ids ------------------------------------------------ */

static kc_key_id *find_id(kc_keychain *kc, const char *label)
{
    kc_key_id *e;

    for (e = kc->ids; e != NULL; e = e->next)
        if (strcmp(e->label, label) == 0)
            return e;
    return NULL;
}

static void forget_id(kc_keychain *kc, const char *label)
{
    kc_key_id **pp, *e;

    for (pp = &kc->ids; (e = *pp) != NULL; pp = &e->next) {
        if (strcmp(e->label, label) == 0) {
            *pp = e->next;
            free(e);
            return;
        }
    }
}

static OSStatus remember_id(kc_keychain *kc, const char *label, CFDataRef id)
{
    kc_key_id *e;
    CFIndex len = CFDataGetLength(id);

    if (len <= 0 || len > KC_KEY_ID_MAX)
        return errSecDecode;
    e = calloc(1, sizeof *e);
    if (e == NULL)
        return errSecAllocate;
    snprintf(e->label, sizeof e->label, "%s", label);
    memcpy(e->id, CFDataGetBytePtr(id), (size_t)len);
    e->len = (size_t)len;
    forget_id(kc, label);
    e->next = kc->ids;
    kc->ids = e;
    return errSecSuccess;
}

/* --- Crypto.cpp helpers ------------------------------------------------ */

/* createQueryDict: items of class cls whose subject is the label, scoped to
 * the handle's keychain if it has one.  NULL on allocation failure. */
static CFDictionaryRef create_query_dict(kc_keychain *kc, CFStringRef cls,
                                         const char *label)
{
    CFStringRef cf_label;
    CFDictionaryRef query;
    KC_DEPRECATED_BEGIN  /* kSecMatch* of file keychains (newer SDKs) */
    const void *keys[5] = { kSecClass, kSecReturnRef, kSecMatchLimit,
                            kSecMatchSubjectWholeString, kSecMatchSearchList };
    KC_DEPRECATED_END
    const void *values[5];
    CFIndex n = kc->search_list != NULL ? 5 : 4;

    cf_label = CFStringCreateWithCString(kCFAllocatorDefault, label,
                                         kCFStringEncodingUTF8);
    if (cf_label == NULL)
        return NULL;
    /* No kSecMatchPolicy (Crypto.cpp had an SSL policy): the duplicate check
     * must see every identity under the name, valid for TLS or not. */
    values[0] = cls;
    values[1] = kCFBooleanTrue;
    values[2] = kSecMatchLimitOne;
    values[3] = cf_label;
    values[4] = kc->search_list;
    query = CFDictionaryCreate(kCFAllocatorDefault, keys, values, n,
                               &kCFTypeDictionaryKeyCallBacks,
                               &kCFTypeDictionaryValueCallBacks);
    CFRelease(cf_label);
    return query;
}

/* lookupKeychainItem: *out receives a retained item of class cls (an
 * identity or a certificate) or NULL. */
static OSStatus lookup_keychain_item(kc_keychain *kc, CFStringRef cls,
                                     const char *label, CFTypeRef *out)
{
    CFDictionaryRef query;
    OSStatus status;

    *out = NULL;
    query = create_query_dict(kc, cls, label);
    if (query == NULL)
        return errSecAllocate;
    status = SecItemCopyMatching(query, out);
    CFRelease(query);
    if (status != errSecSuccess && *out != NULL) {
        CFRelease(*out);
        *out = NULL;
    }
    if (status == errSecSuccess && *out == NULL)
        status = errSecItemNotFound;
    return status;
}

/* createAccess: the label as descriptor, a NULL trusted list = only this
 * application may use the key without a prompt. */
static OSStatus create_access(const char *label, SecAccessRef *out)
{
    CFStringRef descriptor;
    OSStatus status;

    *out = NULL;
    descriptor = CFStringCreateWithCString(kCFAllocatorDefault, label,
                                           kCFStringEncodingUTF8);
    if (descriptor == NULL)
        return errSecAllocate;
    KC_DEPRECATED_BEGIN
    status = SecAccessCreate(descriptor, NULL, out);
    KC_DEPRECATED_END
    CFRelease(descriptor);
    if (status != errSecSuccess && *out != NULL) {
        CFRelease(*out);
        *out = NULL;
    }
    return status;
}

/* The private key's kSecAttrApplicationLabel (SHA-1 of the public key) and
 * key type, from an identity.  *id receives a retained CFData. */
static OSStatus copy_key_info(SecIdentityRef identity, CFDataRef *id,
                              int *key_type)
{
    SecKeyRef key = NULL;
    CFDictionaryRef attrs = NULL;
    CFTypeRef v;
    OSStatus status;

    *id = NULL;
    if (key_type != NULL)
        *key_type = KC_KEY_NONE;
    status = SecIdentityCopyPrivateKey(identity, &key);
    if (status != errSecSuccess)
        goto cleanup;
    attrs = SecKeyCopyAttributes(key);
    if (attrs == NULL) {
        status = errSecInvalidItemRef;
        goto cleanup;
    }
    v = CFDictionaryGetValue(attrs, kSecAttrApplicationLabel);
    if (v == NULL || CFGetTypeID(v) != CFDataGetTypeID()) {
        status = errSecDecode;
        goto cleanup;
    }
    *id = (CFDataRef)CFRetain(v);
    v = CFDictionaryGetValue(attrs, kSecAttrKeyType);
    if (key_type != NULL && v != NULL) {
        if (CFEqual(v, kSecAttrKeyTypeRSA))
            *key_type = KC_KEY_RSA;
        else if (CFEqual(v, kSecAttrKeyTypeECSECPrimeRandom))
            *key_type = KC_KEY_EC;
    }
cleanup:
    release(attrs);
    release(key);
    return status;
}

/* Delete one certificate, by reference (kSecMatchItemList, as Crypto.cpp). */
static OSStatus delete_certificate(SecCertificateRef cert)
{
    CFArrayRef list;
    CFDictionaryRef query = NULL;
    OSStatus status = errSecAllocate;
    KC_DEPRECATED_BEGIN
    const void *keys[3] = { kSecClass, kSecMatchItemList, kSecMatchLimit };
    KC_DEPRECATED_END
    const void *values[3];

    list = CFArrayCreate(kCFAllocatorDefault, (const void **)&cert, 1,
                         &kCFTypeArrayCallBacks);
    if (list == NULL)
        goto cleanup;
    values[0] = kSecClassCertificate;
    values[1] = list;
    values[2] = kSecMatchLimitAll;
    query = CFDictionaryCreate(kCFAllocatorDefault, keys, values, 3,
                               &kCFTypeDictionaryKeyCallBacks,
                               &kCFTypeDictionaryValueCallBacks);
    if (query == NULL)
        goto cleanup;
    status = SecItemDelete(query);
cleanup:
    release(query);
    release(list);
    return status;
}

/* Delete the private key whose kSecAttrApplicationLabel is id. */
static OSStatus delete_private_key(kc_keychain *kc, CFDataRef id)
{
    CFDictionaryRef query;
    OSStatus status;
    KC_DEPRECATED_BEGIN
    const void *keys[4] = { kSecClass, kSecAttrKeyClass,
                            kSecAttrApplicationLabel, kSecMatchSearchList };
    KC_DEPRECATED_END
    const void *values[4];

    values[0] = kSecClassKey;
    values[1] = kSecAttrKeyClassPrivate;
    values[2] = id;
    values[3] = kc->search_list;
    query = CFDictionaryCreate(kCFAllocatorDefault, keys, values,
                               kc->search_list != NULL ? 4 : 3,
                               &kCFTypeDictionaryKeyCallBacks,
                               &kCFTypeDictionaryValueCallBacks);
    if (query == NULL)
        return errSecAllocate;
    status = SecItemDelete(query);
    CFRelease(query);
    return status;
}

/* Undo an import: certificate, then key, of every identity in items.
 * Best effort; the caller already has an error to report. */
static void rollback_import(kc_keychain *kc, CFArrayRef items)
{
    CFIndex i, n = CFArrayGetCount(items);

    for (i = 0; i < n; i++) {
        CFDictionaryRef item = CFArrayGetValueAtIndex(items, i);
        SecIdentityRef identity;
        SecCertificateRef cert = NULL;
        CFDataRef id = NULL;

        identity = (SecIdentityRef)CFDictionaryGetValue(item,
                                                        kSecImportItemIdentity);
        if (identity == NULL)
            continue;
        copy_key_info(identity, &id, NULL);
        if (SecIdentityCopyCertificate(identity, &cert) == errSecSuccess)
            delete_certificate(cert);
        if (id != NULL)
            delete_private_key(kc, id);
        release(cert);
        release(id);
    }
}

/* copyIdentityFromPKCS12: SecPKCS12Import of the bytes with the passphrase
 * and an access for the label.  *items receives the retained import result,
 * at least one item long. */
static OSStatus copy_identity_from_pkcs12(kc_keychain *kc, const uint8_t *p12,
                                          size_t p12_len, const char *password,
                                          const char *label, CFArrayRef *items,
                                          kc_error *err)
{
    CFDataRef data = NULL;
    CFStringRef pass = NULL;
    SecAccessRef access = NULL;
    CFDictionaryRef options = NULL;
    OSStatus status;
    KC_DEPRECATED_BEGIN  /* access and keychain options (newer SDKs) */
    const void *keys[3] = { kSecImportExportPassphrase, kSecImportExportAccess,
                            kSecImportExportKeychain };
    KC_DEPRECATED_END
    const void *values[3];

    *items = NULL;
    status = errSecAllocate;
    data = CFDataCreate(kCFAllocatorDefault, p12, (CFIndex)p12_len);
    if (data == NULL) {
        fail(err, status, "copying the PKCS#12 data");
        goto cleanup;
    }
    pass = CFStringCreateWithCString(kCFAllocatorDefault,
                                     password != NULL ? password : "",
                                     kCFStringEncodingUTF8);
    if (pass == NULL) {
        /* never put the password itself in the message */
        status = errSecParam;
        fail(err, status, "the password is not valid UTF-8");
        goto cleanup;
    }
    status = create_access(label, &access);
    if (status != errSecSuccess) {
        fail(err, status, "SecAccessCreate for '%s'", label);
        goto cleanup;
    }
    values[0] = pass;
    values[1] = access;
    values[2] = kc->keychain;
    options = CFDictionaryCreate(kCFAllocatorDefault, keys, values,
                                 kc->keychain != NULL ? 3 : 2,
                                 &kCFTypeDictionaryKeyCallBacks,
                                 &kCFTypeDictionaryValueCallBacks);
    if (options == NULL) {
        status = errSecAllocate;
        fail(err, status, "creating the import options");
        goto cleanup;
    }
    status = SecPKCS12Import(data, options, items);
    if (status == errSecAuthFailed) {
        /* macOS reports a wrong password as errSecAuthFailed; keychain.h
         * promises errSecPkcs12VerifyFailure and keeps the native code. */
        status = fail_native(err, errSecPkcs12VerifyFailure, status,
                             "SecPKCS12Import for '%s' (wrong password?)",
                             label);
        goto cleanup;
    }
    if (status != errSecSuccess) {
        fail(err, status, "SecPKCS12Import for '%s'", label);
        goto cleanup;
    }
    if (*items == NULL || CFArrayGetCount(*items) == 0) {
        /* Crypto.cpp mapped this to errSecAuthFailed; it is a file with no
         * identity in it. */
        status = errSecDecode;
        fail(err, status, "SecPKCS12Import for '%s' returned no identity",
             label);
        goto cleanup;
    }
cleanup:
    if (status != errSecSuccess && *items != NULL) {
        CFRelease(*items);
        *items = NULL;
    }
    release(options);
    release(access);
    release(pass);
    release(data);
    return status;
}

/* Fill *out from an identity or a certificate found under label. */
static void fill_info(CFTypeRef found, int is_identity, const char *label,
                      kc_item_info *out)
{
    SecCertificateRef cert = NULL;
    CFStringRef s = NULL;
    CFDataRef id = NULL;

    memset(out, 0, sizeof *out);
    out->owner_alive = -1;  /* Darwin records no owner process */
    snprintf(out->label, sizeof out->label, "%s", label);
    out->has_certificate = 1;
    if (is_identity) {
        out->has_private_key = 1;
        if (SecIdentityCopyCertificate((SecIdentityRef)found, &cert)
            != errSecSuccess)
            cert = NULL;
        if (copy_key_info((SecIdentityRef)found, &id, &out->key_type)
            == errSecSuccess && CFDataGetLength(id) >= 0 &&
            (size_t)CFDataGetLength(id) <= sizeof out->key_id) {
            /* any item of the user's may carry the label: bound its id */
            out->key_id_len = (size_t)CFDataGetLength(id);
            memcpy(out->key_id, CFDataGetBytePtr(id), out->key_id_len);
        }
    } else {
        cert = (SecCertificateRef)CFRetain(found);
    }
    if (cert != NULL) {
        if (SecCertificateCopyCommonName(cert, &s) == errSecSuccess) {
            cf_to_cstr(s, out->common_name, sizeof out->common_name);
            release(s);
        }
        /* Security.framework has no RFC 2253 formatter; the summary is
         * the closest public call. */
        s = SecCertificateCopySubjectSummary(cert);
        cf_to_cstr(s, out->subject, sizeof out->subject);
        release(s);
    }
    release(id);
    release(cert);
}

/* Look up under label without taking the lock: identity first, then a
 * lone certificate (a key left without its certificate is found by kill
 * through the remembered id). */
static OSStatus lookup_locked(kc_keychain *kc, const char *label,
                              kc_item_info *out, kc_error *err)
{
    CFTypeRef found = NULL;
    OSStatus status;
    int is_identity = 1;

    status = lookup_keychain_item(kc, kSecClassIdentity, label, &found);
    if (status == errSecItemNotFound) {
        is_identity = 0;
        status = lookup_keychain_item(kc, kSecClassCertificate, label, &found);
    }
    if (status == errSecItemNotFound)
        fail(err, status, "nothing carries the label '%s'", label);
    else if (status != errSecSuccess)
        fail(err, status, "looking up '%s'", label);
    else if (out != NULL)
        fill_info(found, is_identity, label, out);
    release(found);
    return status;
}

/* --- the C API --------------------------------------------------------- */

const char *kc_backend(void)
{
    return "darwin";
}

const char *kc_version(void)
{
    return KC_VERSION;
}

int32_t kc_open(const kc_options *opts, kc_keychain **out, kc_error *err)
{
    kc_keychain *kc = NULL;
    SecKeychainStatus kstatus = 0;
    OSStatus status = errSecSuccess;

    clear_error(err);
    if (out == NULL)
        return fail(err, errSecParam, "kc_open: out is NULL");
    *out = NULL;
    kc = calloc(1, sizeof *kc);
    if (kc == NULL)
        return fail(err, errSecAllocate, "kc_open: out of memory");
    if (pthread_mutex_init(&kc->lock, NULL) != 0) {
        free(kc);
        return fail(err, errSecAllocate, "kc_open: pthread_mutex_init");
    }
    if (opts != NULL && opts->token != NULL && opts->token[0] != '\0') {
        /* Open, never create: SecKeychainOpen succeeds for a missing file,
         * SecKeychainGetStatus tells whether it exists. */
        KC_DEPRECATED_BEGIN
        status = SecKeychainOpen(opts->token, &kc->keychain);
        if (status == errSecSuccess)
            status = SecKeychainGetStatus(kc->keychain, &kstatus);
        KC_DEPRECATED_END
        if (status != errSecSuccess) {
            fail(err, status, "opening keychain '%s'", opts->token);
            goto cleanup;
        }
        kc->search_list = CFArrayCreate(kCFAllocatorDefault,
                                        (const void **)&kc->keychain, 1,
                                        &kCFTypeArrayCallBacks);
        if (kc->search_list == NULL) {
            status = fail(err, errSecAllocate, "kc_open: CFArrayCreate");
            goto cleanup;
        }
    }
    *out = kc;
    kc = NULL;
cleanup:
    kc_close(kc);
    return status;
}

void kc_close(kc_keychain *kc)
{
    if (kc == NULL)
        return;
    while (kc->ids != NULL)
        forget_id(kc, kc->ids->label);
    release(kc->search_list);
    release(kc->keychain);
    pthread_mutex_destroy(&kc->lock);
    free(kc);
}

int32_t kc_preauth_key(kc_keychain *kc, const uint8_t *p12, size_t p12_len,
                       const char *password, const char *label, int flags,
                       kc_item_info *out, kc_error *err)
{
    CFTypeRef existing = NULL;
    CFArrayRef items = NULL;
    CFDataRef id = NULL;
    CFStringRef cn = NULL;
    SecCertificateRef cert = NULL;
    SecIdentityRef identity;
    CFDictionaryRef item;
    CFTypeRef v;
    Boolean previous = true;
    int flag_changed = 0;
    OSStatus status, st2;
    char cn_buf[KC_LABEL_MAX];

    clear_error(err);
    if (kc == NULL || p12 == NULL || p12_len == 0 || !valid_label(label)
        || (flags & ~(KC_PREAUTH_EPHEMERAL | KC_PREAUTH_RECLAIM_STALE)) != 0)
        return fail(err, errSecParam, "kc_preauth_key: bad argument");
    if (flags & KC_PREAUTH_EPHEMERAL)
        return fail(err, errSecUnimplemented,
                    "ephemeral identities need a PKCS#11 token");

    pthread_mutex_lock(&kc->lock);
    pthread_mutex_lock(&interaction_lock);

    /* Refuse when the identity (or its certificate) is already there: a
     * warning beats a popup.  KC_PREAUTH_RECLAIM_STALE cannot help here:
     * the keychain records no owner process, so nothing is provably stale. */
    status = lookup_keychain_item(kc, kSecClassIdentity, label, &existing);
    if (status == errSecItemNotFound)
        status = lookup_keychain_item(kc, kSecClassCertificate, label,
                                      &existing);
    if (status == errSecSuccess) {
        status = fail(err, errSecDuplicateItem,
                      "an identity labeled '%s' is already in the keychain",
                      label);
        goto cleanup;
    }
    if (status != errSecItemNotFound) {
        fail(err, status, "looking up '%s'", label);
        goto cleanup;
    }

    /* Disable interaction around the import only, remembering the value. */
    KC_DEPRECATED_BEGIN
    status = SecKeychainGetUserInteractionAllowed(&previous);
    KC_DEPRECATED_END
    if (status != errSecSuccess) {
        fail(err, status, "reading the user-interaction flag");
        goto cleanup;
    }
    KC_DEPRECATED_BEGIN
    status = SecKeychainSetUserInteractionAllowed(false);
    KC_DEPRECATED_END
    if (status != errSecSuccess) {
        fail(err, status, "disabling user interaction");
        goto cleanup;
    }
    flag_changed = 1;

    status = copy_identity_from_pkcs12(kc, p12, p12_len, password, label,
                                       &items, err);
    if (status != errSecSuccess)
        goto cleanup;
    if (CFArrayGetCount(items) != 1) {
        status = fail(err, errSecParam,
                      "the PKCS#12 file holds %ld identities, expected one",
                      (long)CFArrayGetCount(items));
        goto cleanup;
    }
    item = CFArrayGetValueAtIndex(items, 0);
    identity = (SecIdentityRef)CFDictionaryGetValue(item,
                                                    kSecImportItemIdentity);
    if (identity == NULL) {
        status = fail(err, errSecDecode, "the import returned no identity");
        goto cleanup;
    }

    /* The label must be the certificate's CN, or lookup/kill miss it. */
    status = SecIdentityCopyCertificate(identity, &cert);
    if (status == errSecSuccess)
        status = SecCertificateCopyCommonName(cert, &cn);
    if (status != errSecSuccess) {
        fail(err, status, "reading the imported certificate's CN");
        goto cleanup;
    }
    cf_to_cstr(cn, cn_buf, sizeof cn_buf);
    if (strcmp(cn_buf, label) != 0) {
        status = fail(err, errSecParam,
                      "the certificate CN '%s' is not the label '%s'",
                      cn_buf, label);
        goto cleanup;
    }

    /* kSecImportItemKeyID may be missing: take the key's own label then. */
    v = CFDictionaryGetValue(item, kSecImportItemKeyID);
    if (v != NULL && CFGetTypeID(v) == CFDataGetTypeID()) {
        id = (CFDataRef)CFRetain(v);
    } else {
        status = copy_key_info(identity, &id, NULL);
        if (status != errSecSuccess) {
            fail(err, status, "reading the imported key's id");
            goto cleanup;
        }
    }
    status = remember_id(kc, label, id);
    if (status != errSecSuccess) {
        fail(err, status, "remembering the key id of '%s'", label);
        goto cleanup;
    }
    if (out != NULL)
        fill_info(identity, 1, label, out);

cleanup:
    if (flag_changed) {
        KC_DEPRECATED_BEGIN
        st2 = SecKeychainSetUserInteractionAllowed(previous);
        KC_DEPRECATED_END
        if (st2 != errSecSuccess && status == errSecSuccess) {
            status = fail(err, st2, "restoring the user-interaction flag");
            forget_id(kc, label);
        }
    }
    /* All or nothing: undo an import we cannot stand behind. */
    if (status != errSecSuccess && items != NULL)
        rollback_import(kc, items);
    release(cn);
    release(cert);
    release(id);
    release(items);
    release(existing);
    pthread_mutex_unlock(&interaction_lock);
    pthread_mutex_unlock(&kc->lock);
    return status;
}

int32_t kc_kill_key(kc_keychain *kc, const char *label, int flags,
                    kc_error *err)
{
    CFTypeRef found = NULL;
    SecCertificateRef cert = NULL;
    CFDataRef id = NULL;
    kc_key_id *known;
    OSStatus status, key_status = errSecItemNotFound;
    int is_identity = 1;

    clear_error(err);
    if (kc == NULL || !valid_label(label) || (flags & ~KC_KILL_FORCE) != 0)
        return fail(err, errSecParam, "kc_kill_key: bad argument");
    pthread_mutex_lock(&kc->lock);

    status = lookup_keychain_item(kc, kSecClassIdentity, label, &found);
    if (status == errSecItemNotFound) {
        is_identity = 0;
        status = lookup_keychain_item(kc, kSecClassCertificate, label, &found);
    }
    if (status != errSecSuccess && status != errSecItemNotFound) {
        fail(err, status, "looking up '%s'", label);
        goto cleanup;
    }

    /* The key id: the one remembered at import, else the identity's own. */
    known = find_id(kc, label);
    /* A certificate alone under the label was not imported here (an import
     * brings certificate and key): someone else's, unless forced. */
    if (known == NULL && found != NULL && !is_identity &&
        !(flags & KC_KILL_FORCE)) {
        status = fail(err, errSecInvalidOwnerEdit,
                      "the certificate labeled '%s' was not imported by "
                      "keychain_ext; not deleted (force to override)", label);
        goto cleanup;
    }
    if (known != NULL) {
        id = CFDataCreate(kCFAllocatorDefault, known->id, (CFIndex)known->len);
        if (id == NULL) {
            status = fail(err, errSecAllocate, "copying the key id");
            goto cleanup;
        }
    } else if (found != NULL && is_identity) {
        status = copy_key_info((SecIdentityRef)found, &id, NULL);
        if (status != errSecSuccess) {
            fail(err, status, "reading the key id of '%s'", label);
            goto cleanup;
        }
    }

    /* With a remembered id, only the identity we imported is ours: one
     * that merely carries the name (ours removed by someone else, a new one
     * added) is left alone -- Crypto.cpp deleted whatever had the name. */
    if (known != NULL && found != NULL && is_identity) {
        CFDataRef have = NULL;

        status = copy_key_info((SecIdentityRef)found, &have, NULL);
        if (status == errSecSuccess && !CFEqual(have, id))
            status = errSecInvalidItemRef;
        release(have);
        if (status != errSecSuccess) {
            fail(err, status, "the identity labeled '%s' is not the one "
                 "imported here; not deleted", label);
            goto cleanup;
        }
    }

    /* Certificate first, then the key separately (one call for the pair
     * failed when running as root). */
    if (found != NULL) {
        if (is_identity) {
            status = SecIdentityCopyCertificate((SecIdentityRef)found, &cert);
            if (status != errSecSuccess) {
                fail(err, status, "getting the certificate of '%s'", label);
                goto cleanup;
            }
        } else {
            cert = (SecCertificateRef)CFRetain(found);
        }
        status = delete_certificate(cert);
        if (status != errSecSuccess) {
            fail(err, status, "deleting the certificate of '%s'", label);
            goto cleanup;
        }
    }
    if (id != NULL) {
        key_status = delete_private_key(kc, id);
        if (key_status != errSecSuccess
            && !(key_status == errSecItemNotFound && found != NULL)) {
            /* a missing key is fine only if the certificate was there */
            status = fail(err, key_status,
                          "deleting the private key of '%s'", label);
            goto cleanup;
        }
    }
    if (found == NULL && key_status != errSecSuccess) {
        status = fail(err, errSecItemNotFound,
                      "nothing carries the label '%s'", label);
        goto cleanup;
    }
    status = errSecSuccess;
    forget_id(kc, label);

cleanup:
    release(id);
    release(cert);
    release(found);
    pthread_mutex_unlock(&kc->lock);
    return status;
}

int32_t kc_lookup_keychain_item(kc_keychain *kc, const char *label,
                                kc_item_info *out, kc_error *err)
{
    OSStatus status;

    clear_error(err);
    if (kc == NULL || !valid_label(label))
        return fail(err, errSecParam, "kc_lookup_keychain_item: bad argument");
    pthread_mutex_lock(&kc->lock);
    status = lookup_locked(kc, label, out, err);
    pthread_mutex_unlock(&kc->lock);
    return status;
}

int32_t kc_reclaim_stale(kc_keychain *kc, const char *label, kc_error *err)
{
    (void)kc;
    (void)label;
    clear_error(err);
    return fail(err, errSecUnimplemented,
                "the keychain records no owner process: no stale identities");
}

int32_t kc_list_items(kc_keychain *kc, kc_item_info *out, size_t cap,
                      size_t *count, kc_error *err)
{
    (void)kc;
    (void)out;
    (void)cap;
    clear_error(err);
    if (count != NULL)
        *count = 0;
    return fail(err, errSecUnimplemented,
                "listing identities is not implemented on Darwin");
}

int32_t kc_init_token(const char *module, const char *token,
                      const char *so_pin, const char *user_pin, kc_error *err)
{
    (void)module;
    (void)token;
    (void)so_pin;
    (void)user_pin;
    clear_error(err);
    return fail(err, errSecUnimplemented, "tokens are PKCS#11 only");
}
