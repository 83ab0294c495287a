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

/* Which objects a query sees: all, token objects only, or session objects
 * only (an ephemeral identity: only its own process sees them). */
enum scope { ANY_OBJECTS, TOKEN_OBJECTS, SESSION_OBJECTS };

/* A search template and the values it points to. */
typedef struct query {
    CK_ATTRIBUTE attrs[4];
    CK_ULONG n;
    CK_OBJECT_CLASS cls;
    CK_BBOOL token;
} query;

/* createQueryDict: objects of class cls (ANY_CLASS: every class) in scope,
 * carrying label (NULL: any), with key_id as CKA_ID (NULL: any). */
static void create_query_dict(query *q, CK_OBJECT_CLASS cls, enum scope scope,
                              const char *label, const CK_BYTE *key_id,
                              CK_ULONG key_id_len)
{
    q->n = 0;
    q->cls = cls;
    q->token = scope == TOKEN_OBJECTS;
    if (cls != ANY_CLASS)
        q->attrs[q->n++] = (CK_ATTRIBUTE)ATTR(CKA_CLASS, &q->cls, sizeof q->cls);
    if (scope != ANY_OBJECTS)
        q->attrs[q->n++] = (CK_ATTRIBUTE)ATTR(CKA_TOKEN, &q->token, sizeof q->token);
    if (label)
        q->attrs[q->n++] = (CK_ATTRIBUTE)ATTR(CKA_LABEL, label, strlen(label));
    if (key_id)
        q->attrs[q->n++] = (CK_ATTRIBUTE)ATTR(CKA_ID, key_id, key_id_len);
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

/* Whether anything the query describes is there. */
static int32_t exists(kc_keychain *kc, CK_OBJECT_CLASS cls, enum scope scope,
                      const char *label, const CK_BYTE *key_id,
                      CK_ULONG key_id_len, int *yes, kc_error *err)
{
    CK_OBJECT_HANDLE h;
    CK_ULONG count = 0;
    query q;
    int32_t st;
    create_query_dict(&q, cls, scope, label, key_id, key_id_len);
    st = lookup_keychain_item(kc, &q, &h, 1, &count, err);
    *yes = count > 0;
    return st;
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
                          const blanks *before, CK_OBJECT_HANDLE *out,
                          kc_error *err)
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
    st = create_object(kc, tmpl, n, cls, label, before, out,
                       "C_CreateObject (private key)", err);
out:
    for (i = 0; i < N_KEY_BLOBS; i++)
        free_blob(&b[i]);
    ERR_clear_error();
    return st;
}

static int32_t create_cert(kc_keychain *kc, const identity *id,
                           const char *label, CK_BBOOL token,
                           const blanks *before, CK_OBJECT_HANDLE *out,
                           kc_error *err)
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
        st = create_object(kc, tmpl, 10, cls, label, before, out,
                           "C_CreateObject (certificate)", err);
    }
out:
    for (i = 0; i < 4; i++)
        OPENSSL_free(p[i]);
    return st;
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
    info->ours = info->mine = 1;
    info->owner_pid = getpid();
    info->owner_alive = 1;
}

/* ------------------------------------------------ removing an identity */

/* Crypto.cpp killKey's core: the certificates, then the private keys
 * separately (deleting the pair in one call failed when running as root),
 * of label in scope, with key_id (NULL: any).  *found counts them. */
static int32_t remove_identity(kc_keychain *kc, const char *label,
                               enum scope scope, const CK_BYTE *key_id,
                               CK_ULONG key_id_len, CK_ULONG *found,
                               kc_error *err)
{
    static const CK_OBJECT_CLASS classes[] = {CKO_CERTIFICATE, CKO_PRIVATE_KEY};
    static const char *what[] = {"removing the certificate",
                                 "removing the private key"};
    CK_ULONG n, i;
    query q;
    int32_t st;

    *found = 0;
    for (i = 0; i < 2; i++) {
        create_query_dict(&q, classes[i], scope, label, key_id, key_id_len);
        if ((st = destroy_all(kc, q.attrs, q.n, what[i], &n, err)))
            return st;
        *found += n;
    }
    return KC_errSecSuccess;
}

/* This process's own identity that it cannot see.  SoftHSM2 can lose sight
 * of fresh objects in the process that wrote them, for good, when another
 * program reads the token without keychain_ext's lock; other processes
 * still see them.  The lease stays: it names them, so they can be removed
 * once this process has ended. */
static int32_t fail_hidden(const char *label, kc_error *err)
{
    return fail(err, KC_errSecIO, 0,
                "the objects of '%s' are hidden from this process (SoftHSM2 "
                "loses sight of fresh objects when another program reads the "
                "token without keychain_ext's lock); their lease stays, so "
                "they can be removed once this process has ended (purge)",
                label);
}

/* Remove the token identity a lease names: its objects (by the key id it
 * records: an identity that replaced ours under the label stays), then the
 * lease, last, so an interrupted removal still names its owners.  mine:
 * this process owns it (see fail_hidden). */
static int32_t remove_leased(kc_keychain *kc, const lease *l, int mine,
                             CK_ULONG *found, kc_error *err)
{
    int32_t st = KC_errSecSuccess;
    int attempt;
    /* objects not seen are looked for again before their lease goes (else
     * they would stay, unprovable) */
    for (attempt = 0; attempt < UNSEEN_RETRIES && !st; attempt++) {
        if (attempt)
            backoff(attempt);
        st = remove_identity(kc, l->label, TOKEN_OBJECTS, l->key_id,
                             sizeof l->key_id, found, err);
        if (*found)
            break;
    }
    if (!st && !*found && mine)
        return fail_hidden(l->label, err);
    return st ? st : lease_remove(kc, l->label, err);
}

/* Crypto.cpp lookupKeychainItem's refusal: nothing may carry the label --
 * unless it is the same shared identity (*join: the caller joins its
 * owners) or its owners are dead and the caller asked to reclaim it -- and
 * no private key may have the same id. */
static int32_t refuse_duplicate(kc_keychain *kc, const char *label,
                                const identity *id, int flags, lease *l,
                                int *join, kc_error *err)
{
    int taken, found, alive, same;
    CK_ULONG removed, count = 0;
    CK_OBJECT_HANDLE h;
    object o;
    query q;
    int32_t st;

    *join = 0;
    if ((st = exists(kc, ANY_CLASS, ANY_OBJECTS, label, NULL, 0, &taken, err)) ||
        (st = lease_read(kc, label, l, &found, err)))
        return st;
    if (found && taken && (flags & KC_PREAUTH_SHARED) && l->shared &&
        !memcmp(l->key_id, id->key_id, sizeof l->key_id)) {
        if ((st = exists(kc, CKO_PRIVATE_KEY, TOKEN_OBJECTS, label, id->key_id,
                          sizeof id->key_id, &same, err)))
            return st;
        *join = same;
        if (same)
            return KC_errSecSuccess;
    }
    if (found) {
        alive = lease_alive(kc, l);
        if (alive != 0 || !(flags & KC_PREAUTH_RECLAIM_STALE))
            return fail_owned(l, alive,
                              alive == 0 ? "reclaim it (stale='reclaim') or purge"
                                         : "refusing to import over it",
                              KC_errSecDuplicateItem, err);
        if ((st = remove_leased(kc, l, 0, &removed, err)) ||
            (st = exists(kc, ANY_CLASS, ANY_OBJECTS, label, NULL, 0, &taken, err)))
            return st;
    }
    if (taken)
        return fail(err, KC_errSecDuplicateItem, 0,
                    "an identity labelled '%s' is already in the store%s; "
                    "refusing to import over it", label,
                    found ? "" : " (not made by keychain_ext)");
    /* the same key under another label: say which (labels are no secret) */
    create_query_dict(&q, CKO_PRIVATE_KEY, ANY_OBJECTS, NULL, id->key_id,
                      sizeof id->key_id);
    if ((st = lookup_keychain_item(kc, &q, &h, 1, &count, err)))
        return st;
    if (count) {
        if (read_object(kc, h, &o) != CKR_OK)
            o.label[0] = 0;
        return fail(err, KC_errSecDuplicateItem, 0,
                    "the private key of this identity is already in the "
                    "store %s%s%s; refusing to import it twice",
                    o.label[0] ? "under the label '" : "without a label",
                    o.label, o.label[0] ? "'" : "");
    }
    return KC_errSecSuccess;
}

/* ------------------------------------------------------------- the API */

int32_t kc_preauth_key(kc_keychain *kc, const uint8_t *p12, size_t p12_len,
                       const char *password, const char *label, int flags,
                       kc_item_info *out, kc_error *err)
{
    const int modes = KC_PREAUTH_EPHEMERAL | KC_PREAUTH_HELD | KC_PREAUTH_SHARED;
    identity id;
    CK_BBOOL token = (flags & KC_PREAUTH_EPHEMERAL) ? CK_FALSE : CK_TRUE;
    CK_OBJECT_HANDLE made[2]; /* certificate, key: undone in reverse */
    int n_made = 0, join = 0, leased = 0, counted = 0;
    CK_ULONG swept;
    blanks before;
    lease l;
    CK_RV rv;
    int32_t st;

    memset(&id, 0, sizeof id);
    if ((st = check_label(label, err)))
        return st;
    if (flags & ~(modes | KC_PREAUTH_RECLAIM_STALE))
        return fail(err, KC_errSecParam, 0, "unknown flags 0x%x", flags);
    if ((flags & modes) & ((flags & modes) - 1))
        return fail(err, KC_errSecParam, 0,
                    "ephemeral, held and shared exclude each other");
    if (token && (!kc || !kc->state_dir))
        return fail(err, KC_errSecParam, 0,
                    "token identities need a state directory for their leases");
    /* Parse before touching the store: a bad file changes nothing (and no
     * token lock is held during the key derivations). */
    library_enter();
    st = copy_identity_from_pkcs12(p12, p12_len, password, &id, err);
    library_leave();
    if (st)
        return st;
    if ((st = begin(kc, err)))
        goto out;
    if ((st = refuse_duplicate(kc, label, &id, flags, &l, &join, err)))
        goto unlock;
    if (token) {
        /* The lease goes first and leaves last: every partial state a
         * crash can leave is named by a lease, so it can be proven ours. */
        if (!join) {
            memset(&l, 0, sizeof l);
            snprintf(l.label, sizeof l.label, "%s", label);
            memcpy(l.key_id, id.key_id, sizeof l.key_id);
            l.held = !!(flags & KC_PREAUTH_HELD);
            l.shared = !!(flags & KC_PREAUTH_SHARED);
        }
        lease_prune(kc, &l);
        counted = !l.held && !lease_mine(&l);
        if (counted && (st = lease_join(kc, &l, err)))
            goto unlock;
        if ((st = lease_write(kc, &l, err))) {
            if (counted)
                lease_unjoin(kc);
            goto unlock;
        }
        if (counted)
            lease_joined(kc);
        leased = 1;
        if (join)
            goto done;
        if ((st = note_blanks(kc, &before, err)))
            goto undo;
    }
    if ((st = create_cert(kc, &id, label, token, token ? &before : NULL,
                          &made[n_made], err)))
        goto undo;
    n_made++;
    if ((st = create_key(kc, &id, label, token, token ? &before : NULL,
                         &made[n_made], err)))
        goto undo;
    n_made++;
    if (token && kc->exclusive)
        remove_blanks(kc, &swept, NULL); /* see remove_blanks: best effort */
done:
    if (out) {
        identity_info(&id, label, !token, out);
        if (leased)
            lease_describe(kc, &l, out);
    }
    goto unlock;
undo:
    /* all or nothing: take back out what this call created */
    while (n_made-- > 0)
        if ((rv = destroy(kc, made[n_made])) != CKR_OK && err)
            snprintf(err->message + strlen(err->message),
                     sizeof err->message - strlen(err->message),
                     "; undoing the import also failed: %s", ckr_name(rv));
    if (leased && !lease_remove(kc, label, NULL) && counted)
        lease_released(kc);
unlock:
    end(kc);
out:
    free_identity(&id);
    return st;
}

int32_t kc_kill_key(kc_keychain *kc, const char *label, int flags,
                    kc_error *err)
{
    CK_OBJECT_HANDLE h[MAX_FOUND];
    CK_ULONG count = 0, found = 0, swept;
    int leased, alive, taken, mine = 0, force = flags & KC_KILL_FORCE;
    lease l;
    query q;
    int32_t st;

    if ((st = check_label(label, err)))
        return st;
    if (flags & ~KC_KILL_FORCE)
        return fail(err, KC_errSecParam, 0, "unknown flags 0x%x", flags);
    if ((st = begin(kc, err)))
        return st;
    /* A token identity's lease says who owns it. */
    if ((st = lease_read(kc, label, &l, &leased, err)))
        goto out;
    if (!leased || !lease_mine(&l)) {
        /* An ephemeral identity of this process goes first. */
        create_query_dict(&q, ANY_CLASS, SESSION_OBJECTS, label, NULL, 0);
        if ((st = lookup_keychain_item(kc, &q, h, MAX_FOUND, &count, err)))
            goto out;
        if (count) {
            st = destroy_session_objects(kc, h, count, err);
            goto out;
        }
    }
    if (!leased) {
        if ((st = exists(kc, ANY_CLASS, TOKEN_OBJECTS, label, NULL, 0, &taken, err)))
            goto out;
        if (!taken)
            st = fail(err, KC_errSecItemNotFound, 0,
                      "no identity labelled '%s' in the store", label);
        else if (!force)
            st = fail(err, KC_errSecInvalidOwnerEdit, 0,
                      "the identity labelled '%s' has no lease: keychain_ext "
                      "did not make it, so it will not remove it (force to "
                      "override)", label);
        else
            st = remove_identity(kc, label, TOKEN_OBJECTS, NULL, 0, &found, err);
        goto out;
    }
    mine = lease_leave(kc, &l);
    if (mine && l.shared && l.n_owners > 0) {
        /* other owners keep it */
        if (!(st = lease_write(kc, &l, err)))
            lease_released(kc);
        goto out;
    }
    alive = lease_alive(kc, &l);
    if (!l.held && alive != 0 && l.n_owners > 0 && !force) {
        st = fail_owned(&l, alive, "refusing to remove it (force to override)",
                        KC_errSecInvalidOwnerEdit, err);
        goto out;
    }
    if ((st = remove_leased(kc, &l, mine, &found, err)))
        goto out;
    if (mine)
        lease_released(kc);
    if (kc->exclusive)
        remove_blanks(kc, &swept, NULL); /* see remove_blanks: best effort */
    if (!found)
        st = fail(err, KC_errSecItemNotFound, 0,
                  "no identity labelled '%s' in the store (its lease is "
                  "removed)", label);
out:
    end(kc);
    return st;
}

/* Who owns what info describes: its lease l (NULL: none), or this process
 * for session objects; token objects without a lease are not ours. */
static void describe_owner(kc_keychain *kc, kc_item_info *info,
                           const lease *l)
{
    info->owner_alive = -1;
    if (info->ephemeral) {
        info->ours = info->mine = info->owners = 1;
        info->owner_pid = getpid();
        info->owner_alive = 1;
    } else if (l) {
        lease_describe(kc, l, info);
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
    lease l;
    int leased;
    CK_RV rv;
    int32_t st;

    if ((st = check_label(label, err)))
        return st;
    memset(&info, 0, sizeof info);
    create_query_dict(&q, ANY_CLASS, ANY_OBJECTS, label, NULL, 0);
    if ((st = begin(kc, err)))
        return st;
    if ((st = lookup_keychain_item(kc, &q, h, MAX_FOUND, &count, err)))
        goto out;
    /* a miss despite a lease: look again (see remove_leased) */
    for (i = 1, leased = 0; !count && i < UNSEEN_RETRIES; i++) {
        if ((st = lease_read(kc, label, &l, &leased, err)) || !leased)
            break;
        backoff((int)i);
        if ((st = lookup_keychain_item(kc, &q, h, MAX_FOUND, &count, err)))
            break;
    }
    if (!st && !count && leased && lease_mine(&l))
        st = fail_hidden(label, err);
    if (st)
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
        describe_object(kc, o, &info);
    }
    if (!info.has_certificate && !info.has_private_key)
        st = fail(err, KC_errSecItemNotFound, 0,
                  "no identity labelled '%s' in the store", label);
    else if (!(st = lease_read(kc, label, &l, &leased, err))) {
        describe_owner(kc, &info, leased ? &l : NULL);
        if (out)
            *out = info;
    }
out:
    free_read(o, sizeof *o);
    end(kc);
    return st;
}

int32_t kc_reclaim_stale(kc_keychain *kc, const char *label, kc_error *err)
{
    CK_ULONG removed = 0;
    lease l;
    int found, alive;
    int32_t st;

    if (label && (st = check_label(label, err)))
        return st;
    if ((st = begin(kc, err)))
        return st;
    if (!label) {
        if (!(st = sweep_crash_leftovers(kc, &removed, err)) && !removed)
            st = fail(err, KC_errSecItemNotFound, 0,
                      "nothing left by a crash in the store");
    } else if ((st = lease_read(kc, label, &l, &found, err))) {
        ;
    } else if (!found) {
        st = fail(err, KC_errSecItemNotFound, 0,
                  "no leased identity labelled '%s' in the store", label);
    } else if ((alive = lease_alive(kc, &l)) != 0) {
        st = fail_owned(&l, alive, "not stale", KC_errSecDuplicateItem, err);
    } else {
        st = remove_leased(kc, &l, 0, &removed, err);
    }
    end(kc);
    return st;
}

/* The entry for label in items (added if new); NULL when out of memory. */
static kc_item_info *entry(kc_item_info **items, size_t *n, const char *label)
{
    kc_item_info *grown;
    size_t j;
    for (j = 0; j < *n; j++)
        if (strcmp((*items)[j].label, label) == 0)
            return &(*items)[j];
    if (!(grown = realloc(*items, (*n + 1) * sizeof *grown)))
        return NULL;
    *items = grown;
    memset(&grown[*n], 0, sizeof *grown);
    snprintf(grown[*n].label, sizeof grown[*n].label, "%s", label);
    return &grown[(*n)++];
}

int32_t kc_list_items(kc_keychain *kc, kc_item_info *out, size_t cap,
                      size_t *count, kc_error *err)
{
    CK_OBJECT_HANDLE *h = NULL;
    CK_ULONG n = 0, i;
    kc_item_info *items = NULL, *item;
    lease *leases = NULL;
    size_t n_items = 0, n_leases = 0, j, k;
    object *o;
    CK_RV rv;
    int32_t st;

    if (!count)
        return fail(err, KC_errSecParam, 0, "no count output");
    *count = 0;
    if (!(o = malloc(sizeof *o)))
        return fail(err, KC_errSecAllocate, 0, "out of memory");
    if ((st = begin(kc, err))) {
        free_read(o, sizeof *o);
        return st;
    }
    if ((rv = all_objects(kc, &h, &n)) != CKR_OK) {
        st = fail_ck(err, rv, "listing the token");
        goto out;
    }
    for (i = 0; i < n; i++) {
        /* identities (labelled certificates and keys), and blank objects a
         * crash left, which group under the empty label */
        rv = read_object(kc, h[i], o);
        if (rv == CKR_ATTRIBUTE_VALUE_INVALID)
            memset(o, 0, sizeof *o);
        else if (rv != CKR_OK ||
                 (o->label[0] ? o->cls != CKO_CERTIFICATE &&
                                    o->cls != CKO_PRIVATE_KEY
                              : !is_blank(kc, h[i])))
            continue;
        if (!(item = entry(&items, &n_items, o->label))) {
            st = fail(err, KC_errSecAllocate, 0, "out of memory");
            goto out;
        }
        describe_object(kc, o, item);
    }
    /* leases whose objects are gone (a crash before the create) */
    if ((st = lease_all(kc, &leases, &n_leases, err)))
        goto out;
    for (k = 0; k < n_leases; k++)
        if (!leases[k].unreadable && !entry(&items, &n_items, leases[k].label)) {
            st = fail(err, KC_errSecAllocate, 0, "out of memory");
            goto out;
        }
    for (j = 0; j < n_items; j++) {
        if (!items[j].label[0]) {
            items[j].ours = kc->exclusive; /* blank objects */
            continue;
        }
        for (k = 0; k < n_leases; k++)
            if (!leases[k].unreadable && !strcmp(leases[k].label, items[j].label))
                break;
        describe_owner(kc, &items[j], k < n_leases ? &leases[k] : NULL);
    }
    for (j = 0; j < n_items && j < cap && !st; j++)
        out[j] = items[j];
    if (!st)
        *count = n_items;
out:
    free(leases);
    free(h);
    free(items);
    free_read(o, sizeof *o);
    end(kc);
    return st;
}
