/*
 * keychain_pkcs11.c -- the keychain.h API on a PKCS#11 token: the flow.
 *
 * The Linux counterpart of Passenger's Crypto.cpp, with its functions in
 * the same names and order as keychain_darwin.c:
 *
 *   create_query_dict          a CK_ATTRIBUTE search template
 *   lookup_keychain_item       C_FindObjects with it
 *   create_access              the key attributes that play SecAccess
 *   copy_identity_from_pkcs12  OpenSSL's PKCS12_parse (SecPKCS12Import)
 *   kc_preauth_key, kc_kill_key, kc_lookup_keychain_item
 *
 * A token chosen by label plays the keychain, and CKA_ID (the SHA-1 of the
 * public key, the bytes macOS reports as kSecImportItemKeyID) is the
 * remembered key id.  Token identities carry a lease (p11_lease.c) so that
 * what a crashed process left can be told from what a running one owns.
 * Sessions, the token lock, object I/O and OpenSSL live in the p11_*.c
 * support units (p11.h).
 */
#include "p11.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/objects.h>

#define ANY_CLASS ((CK_OBJECT_CLASS)-1)

/* ------------------------------------------------- Crypto.cpp helpers */

/* A search template and the values it points to. */
typedef struct query {
    CK_ATTRIBUTE attrs[4];
    CK_ULONG n;
    CK_OBJECT_CLASS cls;
} query;

/* createQueryDict: objects of class cls (ANY_CLASS: every class) carrying
 * label, and with key_id (NULL: any) the identity's key id -- CKA_ID of a
 * certificate or key, CKA_OBJECT_ID of a lease.  Leases are also matched
 * by CKA_APPLICATION, so another application's data objects never are. */
static void create_query_dict(query *q, CK_OBJECT_CLASS cls,
                              const char *label, const CK_BYTE *key_id,
                              CK_ULONG key_id_len)
{
    q->n = 0;
    q->cls = cls;
    if (cls != ANY_CLASS)
        q->attrs[q->n++] = (CK_ATTRIBUTE)ATTR(CKA_CLASS, &q->cls, sizeof q->cls);
    if (label)
        q->attrs[q->n++] = (CK_ATTRIBUTE)ATTR(CKA_LABEL, label, strlen(label));
    if (cls == CKO_DATA)
        q->attrs[q->n++] = (CK_ATTRIBUTE)ATTR(
            CKA_APPLICATION, LEASE_APPLICATION, strlen(LEASE_APPLICATION));
    if (key_id)
        q->attrs[q->n++] = (CK_ATTRIBUTE)ATTR(
            cls == CKO_DATA ? CKA_OBJECT_ID : CKA_ID, key_id, key_id_len);
}

/* lookupKeychainItem: up to max handles of what the query finds. */
static int32_t lookup_keychain_item(kc_keychain *kc, query *q,
                                    CK_OBJECT_HANDLE *found, CK_ULONG max,
                                    CK_ULONG *count, kc_error *err)
{
    CK_RV rv = find(kc, q->attrs, q->n, found, max, count);
    return rv == CKR_OK ? KC_errSecSuccess
                        : fail_ck(err, rv, "searching the token");
}

/* createAccess: the SecAccess "only this application" becomes a private
 * key that is private, sensitive, never extractable and good for signing
 * only.  Appends its attributes to t; returns how many. */
static CK_ULONG create_access(CK_ATTRIBUTE *t, CK_BBOOL *yes, CK_BBOOL *no)
{
    const CK_ATTRIBUTE access[] = {
        ATTR(CKA_PRIVATE, yes, sizeof *yes),
        ATTR(CKA_SENSITIVE, yes, sizeof *yes),
        ATTR(CKA_EXTRACTABLE, no, sizeof *no),
        ATTR(CKA_SIGN, yes, sizeof *yes),
        ATTR(CKA_DECRYPT, no, sizeof *no),
        ATTR(CKA_UNWRAP, no, sizeof *no),
        ATTR(CKA_DERIVE, no, sizeof *no),
        ATTR(CKA_SIGN_RECOVER, no, sizeof *no),
        ATTR(CKA_ALWAYS_AUTHENTICATE, no, sizeof *no),
    };
    memcpy(t, access, sizeof access);
    return sizeof access / sizeof access[0];
}

/* copyIdentityFromPKCS12: certificate and private key out of the PKCS#12
 * bytes, the key type, and the key id (SHA-1 of the public key). */
static int32_t copy_identity_from_pkcs12(const uint8_t *data, size_t len,
                                         const char *password, identity *out,
                                         kc_error *err)
{
    unsigned int n = 0;
    int32_t st;

    if ((st = parse_pkcs12(data, len, password, out, err)))
        return st;
    if (!out->key) {
        st = fail(err, KC_errSecDecode, 0,
                  "the PKCS#12 file holds no private key");
    } else if (!out->cert) {
        st = fail(err, KC_errSecDecode, 0,
                  "the PKCS#12 file holds no certificate for its private key");
    } else if (!X509_check_private_key(out->cert, out->key)) {
        st = fail_ssl(err, KC_errSecDecode,
                      "the private key does not match the certificate");
    } else if (EVP_PKEY_get_base_id(out->key) != EVP_PKEY_RSA &&
               EVP_PKEY_get_base_id(out->key) != EVP_PKEY_EC) {
        st = fail(err, KC_errSecUnimplemented, 0,
                  "unsupported key type %s (RSA and EC are supported)",
                  OBJ_nid2sn(EVP_PKEY_get_base_id(out->key)));
    } else if (!X509_pubkey_digest(out->cert, EVP_sha1(), out->key_id, &n) ||
               n != SHA_DIGEST_LENGTH) {
        st = fail_ssl(err, KC_errSecDecode, "cannot hash the public key");
    }
    if (st)
        free_identity(out);
    else
        out->key_type = EVP_PKEY_get_base_id(out->key) == EVP_PKEY_RSA
                            ? KC_KEY_RSA : KC_KEY_EC;
    ERR_clear_error();
    return st;
}

/* ----------------------------------------------- importing an identity */

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
    };
    CK_ULONG n = 5;
    blob b[N_KEY_BLOBS];
    char group[64];
    int i, ok = 1;
    int32_t st;

    n += create_access(tmpl + n, &t, &f);
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

/* ------------------------------------------------ removing an identity */

/* Destroy what the query finds, adding the count to *found. */
static int32_t destroy_found(kc_keychain *kc, query *q, const char *what,
                             CK_ULONG *found, kc_error *err)
{
    CK_ULONG n = 0;
    int32_t st = destroy_all(kc, q->attrs, q->n, what, &n, err);
    *found += n;
    return st;
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
    query q;
    int32_t st;
    CK_RV rv;

    *found = 0;
    if (cert != CK_INVALID_HANDLE) {
        if ((rv = destroy(kc, cert)) != CKR_OK)
            return fail_ck(err, rv, "removing the certificate");
        *found = 1;
    } else {
        create_query_dict(&q, CKO_CERTIFICATE, label, key_id, key_id_len);
        if ((st = destroy_found(kc, &q, "removing the certificate", found, err)))
            return st;
    }
    create_query_dict(&q, CKO_PRIVATE_KEY, label, key_id, key_id_len);
    if ((st = destroy_found(kc, &q, "removing the private key", found, err)))
        return st;
    if (!with_lease)
        return KC_errSecSuccess;
    create_query_dict(&q, CKO_DATA, label, key_id, key_id_len);
    return destroy_found(kc, &q, "removing the lease", found, err);
}

/* The lease of the token identity under label, if any. */
static int read_lease(kc_keychain *kc, const char *label, lease *l)
{
    CK_OBJECT_HANDLE h;
    CK_ULONG count;
    object *o;
    query q;
    int ok = 0;

    create_query_dict(&q, CKO_DATA, label, NULL, 0);
    if (lookup_keychain_item(kc, &q, &h, 1, &count, NULL) || !count)
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
    CK_OBJECT_HANDLE h;
    CK_ULONG count;
    query q;
    lease l;
    int alive;
    int32_t st;

    /* a crash may have left objects no label leads to */
    if ((flags & KC_PREAUTH_RECLAIM_STALE) && (st = sweep_orphans(kc, &count, err)))
        return st;
    create_query_dict(&q, ANY_CLASS, label, NULL, 0);
    if ((st = lookup_keychain_item(kc, &q, &h, 1, &count, err)))
        return st;
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
    create_query_dict(&q, CKO_PRIVATE_KEY, NULL, id->key_id, sizeof id->key_id);
    if ((st = lookup_keychain_item(kc, &q, &h, 1, &count, err)))
        return st;
    if (count)
        return fail(err, KC_errSecDuplicateItem, 0,
                    "the private key of this identity is already in the "
                    "store under another label; refusing to import it twice");
    return KC_errSecSuccess;
}

/* ------------------------------------------------------------- the API */

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

int32_t kc_kill_key(kc_keychain *kc, const char *label, kc_error *err)
{
    CK_BYTE key_id[KC_KEY_ID_MAX];
    CK_ULONG key_id_len = 0, count, found;
    CK_OBJECT_HANDLE cert = CK_INVALID_HANDLE;
    int ours, with_lease = 1;
    query q;
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
        create_query_dict(&q, CKO_CERTIFICATE, label, NULL, 0);
        if ((st = lookup_keychain_item(kc, &q, &cert, 1, &count, err)))
            goto out;
        if (count) {
            CK_ATTRIBUTE a = ATTR(CKA_ID, key_id, sizeof key_id);
            if (kc->mod->f->C_GetAttributeValue(kc->session, cert, &a, 1) == CKR_OK)
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
    CK_OBJECT_HANDLE h[MAX_FOUND];
    CK_ULONG count = 0, i;
    kc_item_info info;
    object *o = NULL;
    query q;
    CK_RV rv;
    int32_t st;

    if ((st = check_label(label, err)))
        return st;
    memset(&info, 0, sizeof info);
    create_query_dict(&q, ANY_CLASS, label, NULL, 0);
    if ((st = begin(kc, err)))
        return st;
    if ((st = lookup_keychain_item(kc, &q, h, MAX_FOUND, &count, err)))
        goto out;
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

int32_t kc_reclaim_stale(kc_keychain *kc, const char *label, kc_error *err)
{
    CK_ULONG removed;
    lease l;
    int alive;
    int32_t st;

    if (label && (st = check_label(label, err)))
        return st;
    if ((st = begin(kc, err)))
        return st;
    if (!label) {
        st = sweep_orphans(kc, &removed, err);
        if (!st && !removed)
            st = fail(err, KC_errSecItemNotFound, 0,
                      "no objects left by a crash in the store");
    } else if (!read_lease(kc, label, &l)) {
        st = fail(err, KC_errSecItemNotFound, 0,
                  "no leased identity labelled '%s' in the store", label);
    } else if ((alive = lease_alive(&l)) != 0) {
        st = fail(err, KC_errSecDuplicateItem, 0,
                  "the identity labelled '%s' is owned by process %ld on %s "
                  "(%s): not stale", label, l.pid, l.host,
                  alive > 0 ? "running" : "unknown");
    } else {
        st = reclaim(kc, label, err);
    }
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
