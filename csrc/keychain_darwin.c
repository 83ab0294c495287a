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
 *
 * This file is the flow: the Crypto.cpp helpers and kc_preauth_key,
 * kc_kill_key, kc_lookup_keychain_item, kc_reclaim_stale, kc_list_items, in
 * the same names and order as keychain_pkcs11.c.  The handle, errors, the
 * interaction flag and the store lock (darwin_handle.c), owner records
 * (darwin_record.c) and the PKCS#12 walk (p12_walk.c) are support units
 * behind darwin.h.
 */
#include "darwin.h"
#include "p12_walk.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

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

/* An item without an identity (a certificate without its key): macOS
 * imported its certificates all the same.  Those whose CN is the label are
 * ours (nothing carried the label before the import); other chain
 * certificates may have been there before and stay.  1 when all went. */
static int rollback_chain(CFDictionaryRef item, const char *label)
{
    CFTypeRef chain = CFDictionaryGetValue(item, kSecImportItemCertChain);
    CFIndex i, n;
    int all_gone = 1;

    if (chain == NULL)
        return 1;
    n = CFArrayGetCount((CFArrayRef)chain);
    for (i = 0; i < n; i++) {
        SecCertificateRef cert = (SecCertificateRef)CFArrayGetValueAtIndex(
            (CFArrayRef)chain, i);
        CFStringRef cn = NULL;
        char buf[KC_LABEL_MAX];

        if (SecCertificateCopyCommonName(cert, &cn) != errSecSuccess) {
            all_gone = 0;
            continue;
        }
        cf_to_cstr(cn, buf, sizeof buf);
        release(cn);
        if (strcmp(buf, label) == 0 && delete_certificate(cert) != errSecSuccess)
            all_gone = 0;
    }
    return all_gone;
}

/* Undo an import: certificate, then key, of every identity in items.
 * Best effort (the caller already has an error to report); returns 1 when
 * everything went. */
static int rollback_import(kc_keychain *kc, CFArrayRef items,
                           const char *label)
{
    CFIndex i, n = CFArrayGetCount(items);
    int all_gone = 1;

    for (i = 0; i < n; i++) {
        CFDictionaryRef item = CFArrayGetValueAtIndex(items, i);
        SecIdentityRef identity;
        SecCertificateRef cert = NULL;
        CFDataRef id = NULL;

        identity = (SecIdentityRef)CFDictionaryGetValue(item,
                                                        kSecImportItemIdentity);
        if (identity == NULL) {
            if (!rollback_chain(item, label))
                all_gone = 0;
            continue;
        }
        if (copy_key_info(identity, &id, NULL) != errSecSuccess)
            all_gone = 0;
        if (SecIdentityCopyCertificate(identity, &cert) != errSecSuccess
            || delete_certificate(cert) != errSecSuccess)
            all_gone = 0;
        if (id != NULL && delete_private_key(kc, id) != errSecSuccess)
            all_gone = 0;
        release(cert);
        release(id);
    }
    return all_gone;
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
    out->owner_alive = -1;  /* no record: nobody known */
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
 * lone certificate, and the label's owner record. */
static OSStatus lookup_locked(kc_keychain *kc, const char *label,
                              kc_item_info *out, kc_error *err)
{
    CFTypeRef found = NULL;
    kc_record rec;
    OSStatus status, rst;
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
    if (status != errSecSuccess)
        goto cleanup;
    rst = read_record(kc, label, &rec);
    if (rst != errSecSuccess && rst != errSecItemNotFound) {
        status = fail(err, rst, "reading the owner record of '%s'", label);
        goto cleanup;
    }
    if (out != NULL) {
        fill_info(found, is_identity, label, out);
        if (rst == errSecSuccess)
            fill_owner(&rec, out);
    }
cleanup:
    release(found);
    return status;
}

/* --- the C API --------------------------------------------------------- */

/* What label carries -- identity first, then a lone certificate (*found
 * stays NULL when neither) -- and its owner record (*rst: errSecSuccess or
 * errSecItemNotFound).  Returns errSecSuccess or errSecItemNotFound for
 * the item, any other status as a failure already set in err. */
static OSStatus find_labelled(kc_keychain *kc, const char *label,
                              CFTypeRef *found, int *is_identity,
                              kc_record *rec, OSStatus *rst, kc_error *err)
{
    OSStatus status;

    *is_identity = 1;
    status = lookup_keychain_item(kc, kSecClassIdentity, label, found);
    if (status == errSecItemNotFound) {
        *is_identity = 0;
        status = lookup_keychain_item(kc, kSecClassCertificate, label, found);
    }
    if (status != errSecSuccess && status != errSecItemNotFound)
        return fail(err, status, "looking up '%s'", label);
    *rst = read_record(kc, label, rec);
    if (*rst != errSecSuccess && *rst != errSecItemNotFound)
        return fail(err, *rst, "reading the owner record of '%s'", label);
    return status;
}

/* Remove what label carries (certificate, then key by the recorded id),
 * then its record.  Without KC_KILL_FORCE only what a record proves
 * keychain_ext's and whose owner is this process, nobody (held) or dead. */
static OSStatus remove_locked(kc_keychain *kc, const char *label, int flags,
                              kc_error *err)
{
    CFTypeRef found = NULL;
    SecCertificateRef cert = NULL;
    CFDataRef id = NULL, have = NULL;
    kc_record rec;
    OSStatus status, rst, key_status = errSecItemNotFound;
    int is_identity, force = (flags & KC_KILL_FORCE) != 0, alive;

    status = find_labelled(kc, label, &found, &is_identity, &rec, &rst, err);
    if (status != errSecSuccess && status != errSecItemNotFound)
        goto cleanup;
    if (rst == errSecItemNotFound && found == NULL) {
        status = fail(err, errSecItemNotFound,
                      "nothing carries the label '%s'", label);
        goto cleanup;
    }
    /* Crypto.cpp deleted whatever had the name: only what a record proves
     * ours, unless forced. */
    if (rst == errSecItemNotFound && !force) {
        status = fail(err, errSecInvalidOwnerEdit,
                      "no keychain_ext owner record names '%s': it was not "
                      "imported by keychain_ext; not deleted (force to "
                      "override)", label);
        goto cleanup;
    }
    if (rst == errSecSuccess && !force && !rec.held
        && (alive = owners_alive(&rec, 1)) != 0) {
        int me = my_index(&rec), i;
        const kc_owner *o = &rec.owners[0];

        if (me >= 0 && rec.shared) {
            /* this process gives it up; the other owners keep it */
            drop_owner(&rec, me);
            status = write_record(kc, label, &rec, 0);
            if (status != errSecSuccess)
                fail(err, status, "leaving the owners of '%s'", label);
            goto cleanup;
        }
        for (i = 0; i < rec.nowners; i++)
            if (!is_me(&rec.owners[i]) && one_alive(&rec.owners[i]) != 0)
                o = &rec.owners[i];
        status = fail(err, errSecInvalidOwnerEdit,
                      "'%s' belongs to pid %lld on %s, which %s; not deleted "
                      "(force to override)", label, o->pid, o->host,
                      alive > 0 ? "is running" : "cannot be judged");
        goto cleanup;
    }
    /* The key id: the recorded one, else the identity's own. */
    if (rst == errSecSuccess && rec.id_len > 0) {
        id = CFDataCreate(kCFAllocatorDefault, rec.id, (CFIndex)rec.id_len);
        if (id == NULL) {
            status = fail(err, errSecAllocate, "copying the key id");
            goto cleanup;
        }
    }
    if (found != NULL && is_identity) {
        status = copy_key_info((SecIdentityRef)found, &have, NULL);
        if (status != errSecSuccess) {
            fail(err, status, "reading the key id of '%s'", label);
            goto cleanup;
        }
        /* Only the identity we imported is ours: one that merely carries
         * the name (ours removed by someone else, a new one added) stays. */
        if (id != NULL && !CFEqual(have, id) && !force) {
            status = fail(err, errSecInvalidOwnerEdit, "the identity labeled "
                          "'%s' is not the one keychain_ext imported; not "
                          "deleted", label);
            goto cleanup;
        }
        if (id == NULL || force) {
            release(id);
            id = (CFDataRef)CFRetain(have);
        }
    }
    /* A certificate alone with no record: someone else's (forced here). */
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
        /* Certificate first, then the key separately (one call for the
         * pair failed when running as root). */
        status = delete_certificate(cert);
        if (status != errSecSuccess) {
            fail(err, status, "deleting the certificate of '%s'", label);
            goto cleanup;
        }
    }
    if (id != NULL) {
        key_status = delete_private_key(kc, id);
        if (key_status != errSecSuccess && key_status != errSecItemNotFound) {
            status = fail(err, key_status,
                          "deleting the private key of '%s'", label);
            goto cleanup;
        }
    }
    if (rst == errSecSuccess) {
        status = delete_record(kc, label);
        if (status != errSecSuccess && status != errSecItemNotFound) {
            fail(err, status, "deleting the owner record of '%s'", label);
            goto cleanup;
        }
    }
    status = errSecSuccess;
cleanup:
    release(have);
    release(id);
    release(cert);
    release(found);
    return status;
}

/* Undo a failed preauth: the import, then the claim if nothing is left. */
static void undo_preauth(kc_keychain *kc, CFArrayRef items, int recorded,
                         const char *label)
{
    int left = items != NULL && !rollback_import(kc, items, label);

    if (recorded && !left)
        delete_record(kc, label);
}

/* Join a shared identity made from the same file: dead owners leave, this
 * process comes in (once), and *out describes it. */
static OSStatus join_locked(kc_keychain *kc, const char *label,
                            kc_record *rec, kc_item_info *out, kc_error *err)
{
    OSStatus status;
    int i;

    for (i = rec->nowners - 1; i >= 0; i--)
        if (one_alive(&rec->owners[i]) == 0)
            drop_owner(rec, i);
    if (my_index(rec) < 0) {
        if (rec->nowners == MAX_OWNERS)
            return fail(err, errSecParam, "'%s' has %d owners already",
                        label, MAX_OWNERS);
        rec->owners[rec->nowners].pid = (long long)getpid();
        my_host(rec->owners[rec->nowners].host,
                sizeof rec->owners[rec->nowners].host);
        rec->nowners++;
    }
    status = write_record(kc, label, rec, 0);
    if (status != errSecSuccess)
        return fail(err, status, "joining the owners of '%s'", label);
    return lookup_locked(kc, label, out, err);
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
    int flag_changed = 0, recorded = 0, alive;
    int existing_is_identity, locked = 0;
    kc_record rec;
    OSStatus status, rst;
    char cn_buf[KC_LABEL_MAX];
    uint8_t digest[CC_SHA256_DIGEST_LENGTH];

    clear_error(err);
    if (kc == NULL || p12 == NULL || p12_len == 0 || !valid_label(label)
        || (flags & ~(KC_PREAUTH_EPHEMERAL | KC_PREAUTH_RECLAIM_STALE
                      | KC_PREAUTH_HELD | KC_PREAUTH_SHARED)) != 0)
        return fail(err, errSecParam, "kc_preauth_key: bad argument");
    if (flags & KC_PREAUTH_EPHEMERAL)
        return fail(err, errSecUnimplemented,
                    "ephemeral identities need a PKCS#11 token");
    if ((flags & KC_PREAUTH_HELD) && (flags & KC_PREAUTH_SHARED))
        return fail(err, errSecParam, "an identity is held or shared");
    /* Every key derivation the import would run is capped first. */
    status = kc_p12_check_kdf(p12, p12_len, err);
    if (status != errSecSuccess)
        return status;
    /* The same file is the same identity: what a shared join compares. */
    CC_SHA256(p12, (CC_LONG)p12_len, digest);

    pthread_mutex_lock(&kc->lock);
    pthread_mutex_lock(&interaction_lock);
    /* No prompt from here on: not for the import, not for a reclaim. */
    status = interaction_off(&previous, err);
    if (status != errSecSuccess)
        goto cleanup;
    flag_changed = 1;
    status = store_lock(kc, err);
    if (status != errSecSuccess)
        goto cleanup;
    locked = 1;

    /* Refuse when the identity (or its certificate) is already there: a
     * warning beats a popup.  One whose recorded owner died is removed
     * first with KC_PREAUTH_RECLAIM_STALE. */
    status = find_labelled(kc, label, &existing, &existing_is_identity, &rec,
                           &rst, err);
    if (status != errSecSuccess && status != errSecItemNotFound)
        goto cleanup;
    alive = rst == errSecSuccess ? owner_alive(&rec) : -1;
    if (status == errSecSuccess && existing_is_identity
        && rst == errSecSuccess && (flags & KC_PREAUTH_SHARED) && rec.shared
        && memcmp(rec.p12, digest, sizeof digest) == 0) {
        status = join_locked(kc, label, &rec, out, err);
        goto cleanup;
    }
    if (status == errSecSuccess || rst == errSecSuccess) {
        if (rst == errSecSuccess && alive == 0
            && (existing == NULL || (flags & KC_PREAUTH_RECLAIM_STALE))) {
            /* a dead owner's identity (reclaim asked), or a record a crash
             * left with nothing under it */
            status = remove_locked(kc, label, KC_KILL_FORCE, err);
            if (status != errSecSuccess)
                goto cleanup;
        } else if (rst == errSecSuccess && alive == 0) {
            status = fail(err, errSecDuplicateItem, "'%s' is taken by an "
                          "identity whose owner pid %lld died without "
                          "removing it (reclaim it)", label,
                          rec.nowners > 0 ? rec.owners[0].pid : 0LL);
            goto cleanup;
        } else {
            status = fail(err, errSecDuplicateItem,
                          "an identity labeled '%s' is already in the "
                          "keychain", label);
            goto cleanup;
        }
    }

    /* The claim comes first: SecItemAdd refuses a second record. */
    memset(&rec, 0, sizeof rec);
    rec.held = (flags & KC_PREAUTH_HELD) != 0;
    rec.shared = (flags & KC_PREAUTH_SHARED) != 0;
    memcpy(rec.p12, digest, sizeof rec.p12);
    if (!rec.held) {
        rec.owners[0].pid = (long long)getpid();
        my_host(rec.owners[0].host, sizeof rec.owners[0].host);
        rec.nowners = 1;
    }
    status = write_record(kc, label, &rec, 1);
    if (status != errSecSuccess) {
        fail(err, status, "adding the owner record of '%s'", label);
        goto cleanup;
    }
    recorded = 1;

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
        status = fail(err, errSecDecode, "the PKCS#12 file holds no private "
                      "key for its certificate");
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
    if (CFDataGetLength(id) <= 0 || CFDataGetLength(id) > KC_KEY_ID_MAX) {
        status = fail(err, errSecDecode, "the key id of '%s' is %ld bytes",
                      label, (long)CFDataGetLength(id));
        goto cleanup;
    }
    rec.id_len = (size_t)CFDataGetLength(id);
    memcpy(rec.id, CFDataGetBytePtr(id), rec.id_len);
    /* recorded before anything else can fail: what a failed rollback
     * leaves, kill finds by this id */
    status = write_record(kc, label, &rec, 0);
    if (status != errSecSuccess) {
        fail(err, status, "recording the key id of '%s'", label);
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

    if (out != NULL) {
        fill_info(identity, 1, label, out);
        fill_owner(&rec, out);
    }

cleanup:
    /* All or nothing, with interaction still off: undo an import we cannot
     * stand behind, then the claim (kept if the rollback failed: it proves
     * the rest ours).  A flag that cannot be restored undoes it too. */
    if (status != errSecSuccess)
        undo_preauth(kc, items, recorded, label);
    if (flag_changed) {
        OSStatus before = status;

        status = interaction_restore(previous, status, err);
        if (before == errSecSuccess && status != errSecSuccess)
            undo_preauth(kc, items, recorded, label);
    }
    if (locked)
        store_unlock(kc);
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
    Boolean previous = true;
    OSStatus status;

    clear_error(err);
    if (kc == NULL || !valid_label(label) || (flags & ~KC_KILL_FORCE) != 0)
        return fail(err, errSecParam, "kc_kill_key: bad argument");
    pthread_mutex_lock(&kc->lock);
    pthread_mutex_lock(&interaction_lock);
    status = interaction_off(&previous, err);
    if (status == errSecSuccess) {
        status = store_lock(kc, err);
        if (status == errSecSuccess) {
            status = remove_locked(kc, label, flags, err);
            store_unlock(kc);
        }
        status = interaction_restore(previous, status, err);
    }
    pthread_mutex_unlock(&interaction_lock);
    pthread_mutex_unlock(&kc->lock);
    return status;
}

int32_t kc_lookup_keychain_item(kc_keychain *kc, const char *label,
                                kc_item_info *out, kc_error *err)
{
    Boolean previous = true;
    OSStatus status;

    clear_error(err);
    if (kc == NULL || !valid_label(label))
        return fail(err, errSecParam, "kc_lookup_keychain_item: bad argument");
    pthread_mutex_lock(&kc->lock);
    pthread_mutex_lock(&interaction_lock);
    /* a locked keychain would ask for its password: fail instead */
    status = interaction_off(&previous, err);
    if (status == errSecSuccess) {
        status = lookup_locked(kc, label, out, err);
        status = interaction_restore(previous, status, err);
    }
    pthread_mutex_unlock(&interaction_lock);
    pthread_mutex_unlock(&kc->lock);
    return status;
}

int32_t kc_reclaim_stale(kc_keychain *kc, const char *label, kc_error *err)
{
    Boolean previous = true;
    kc_record rec;
    OSStatus status;

    clear_error(err);
    if (kc == NULL)
        return fail(err, errSecParam, "kc_reclaim_stale: bad argument");
    if (label == NULL)
        return fail(err, errSecInvalidOwnerEdit, "the keychain is not "
                    "keychain_ext's alone: nothing unlabelled is ours");
    if (!valid_label(label))
        return fail(err, errSecParam, "kc_reclaim_stale: bad argument");
    pthread_mutex_lock(&kc->lock);
    pthread_mutex_lock(&interaction_lock);
    status = store_lock(kc, err);
    if (status != errSecSuccess)
        goto unlock;
    status = read_record(kc, label, &rec);
    if (status == errSecItemNotFound)
        fail(err, status, "no owner record names '%s'", label);
    else if (status != errSecSuccess)
        fail(err, status, "reading the owner record of '%s'", label);
    else if (owner_alive(&rec) != 0)
        status = fail(err, errSecDuplicateItem, "the owner of '%s' runs, "
                      "cannot be judged, or it is held", label);
    else if ((status = interaction_off(&previous, err)) == errSecSuccess) {
        status = remove_locked(kc, label, KC_KILL_FORCE, err);
        status = interaction_restore(previous, status, err);
    }
    store_unlock(kc);
unlock:
    pthread_mutex_unlock(&interaction_lock);
    pthread_mutex_unlock(&kc->lock);
    return status;
}

/* keychain_ext's identities: one entry per owner record (the keychain
 * holds the user's own identities too; those are not listed). */
int32_t kc_list_items(kc_keychain *kc, kc_item_info *out, size_t cap,
                      size_t *count, kc_error *err)
{
    CFDictionaryRef query = NULL;
    CFTypeRef found = NULL;
    CFIndex i, n;
    Boolean previous = true;
    int flag_changed = 0;
    OSStatus status;

    clear_error(err);
    if (kc == NULL || count == NULL || (cap > 0 && out == NULL))
        return fail(err, errSecParam, "kc_list_items: bad argument");
    *count = 0;
    pthread_mutex_lock(&kc->lock);
    pthread_mutex_lock(&interaction_lock);
    status = interaction_off(&previous, err);
    if (status != errSecSuccess)
        goto unlock;
    flag_changed = 1;
    query = create_record_query(kc, NULL, RQ_ALL);
    if (query == NULL) {
        status = fail(err, errSecAllocate, "creating the record query");
        goto cleanup;
    }
    status = SecItemCopyMatching(query, &found);
    if (status == errSecItemNotFound) {
        status = errSecSuccess;
        goto cleanup;
    }
    if (status != errSecSuccess) {
        fail(err, status, "listing the owner records");
        goto cleanup;
    }
    n = CFArrayGetCount((CFArrayRef)found);
    for (i = 0; i < n; i++) {
        CFDictionaryRef attrs = CFArrayGetValueAtIndex((CFArrayRef)found, i);
        CFTypeRef account = CFDictionaryGetValue(attrs, kSecAttrAccount);
        char label[KC_LABEL_MAX];
        kc_item_info info;
        kc_record rec;

        cf_to_cstr((CFStringRef)account, label, sizeof label);
        if (account == NULL || !valid_label(label)
            || parse_record(attrs, &rec) != errSecSuccess)
            continue;   /* not a record of ours */
        status = lookup_locked(kc, label, &info, err);
        if (status == errSecItemNotFound) {
            /* a record with nothing under it: a crash mid-preauth */
            memset(&info, 0, sizeof info);
            snprintf(info.label, sizeof info.label, "%s", label);
            fill_owner(&rec, &info);
        } else if (status != errSecSuccess) {
            goto cleanup;
        }
        if (*count < cap)
            out[*count] = info;
        (*count)++;
    }
    status = errSecSuccess;
    clear_error(err);
cleanup:
    release(found);
    release(query);
    if (flag_changed)
        status = interaction_restore(previous, status, err);
unlock:
    pthread_mutex_unlock(&interaction_lock);
    pthread_mutex_unlock(&kc->lock);
    return status;
}
