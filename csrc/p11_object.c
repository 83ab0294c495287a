/*
 * p11_object.c -- object I/O on the token, with the retries SoftHSM2 needs
 * under concurrent use (transient CK_RVs, see DESIGN.md).
 */
#include "p11.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>

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
CK_RV find(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n,
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
            if (rv == CKR_OK && *count > max)
                rv = CKR_FUNCTION_FAILED; /* a broken module: trust none of it */
            if (rv != CKR_OK)
                *count = 0;
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
CK_RV all_objects(kc_keychain *kc, CK_OBJECT_HANDLE **out, CK_ULONG *count)
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
        if (rv == CKR_OK && got > MAX_FOUND)
            rv = CKR_FUNCTION_FAILED; /* a broken module: trust none of it */
        if (rv == CKR_OK)
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

CK_RV read_object(kc_keychain *kc, CK_OBJECT_HANDLE h, object *o)
{
    CK_ATTRIBUTE t[] = {
        ATTR(CKA_CLASS, &o->cls, sizeof o->cls),
        ATTR(CKA_TOKEN, &o->token, sizeof o->token),
        ATTR(CKA_KEY_TYPE, &o->key_type, sizeof o->key_type),
        ATTR(CKA_ID, o->id, sizeof o->id),
        ATTR(CKA_LABEL, o->label, sizeof o->label - 1),
        ATTR(CKA_SUBJECT, o->subject, sizeof o->subject),
    };
    enum { N = sizeof t / sizeof t[0] };
    CK_ULONG size[N], i;
    CK_RV rv = CKR_OK;
    int attempt;
    for (i = 0; i < N; i++)
        size[i] = t[i].ulValueLen;
    for (attempt = 0; attempt < TRANSIENT_RETRIES; attempt++) {
        if (attempt)
            backoff(attempt);
        memset(o, 0, sizeof *o);
        o->handle = h;
        o->cls = (CK_OBJECT_CLASS)-1;
        o->key_type = (CK_KEY_TYPE)-1;
        for (i = 0; i < N; i++)
            t[i].ulValueLen = size[i]; /* the call overwrote them */
        rv = kc->mod->f->C_GetAttributeValue(kc->session, h, t, N);
        if (!transient(rv))
            break;
    }
    /* These three still fill every attribute they can (PKCS#11 5.7): a
     * certificate has no CKA_KEY_TYPE, a data object no CKA_SUBJECT... */
    if (rv != CKR_OK && rv != CKR_ATTRIBUTE_SENSITIVE &&
        rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_BUFFER_TOO_SMALL)
        return rv;
    if (t[0].ulValueLen == CK_UNAVAILABLE_INFORMATION)
        return CKR_OBJECT_HANDLE_INVALID;
/* unavailable (~0), or the size a too small buffer needed (older
 * modules): 0 -- never trust a length the module reports */
#define LEN(i) (t[i].ulValueLen > size[i] ? 0 : t[i].ulValueLen)
    o->id_len = LEN(3);
    o->label[LEN(4)] = 0;
    o->subject_len = LEN(5);
#undef LEN
    return CKR_OK;
}

/* An object that holds nothing but PKCS#11 defaults: a class, and no
 * label, id, subject, application, value or key material -- or that the
 * module cannot read at all (SoftHSM2's half-written object file).
 * SoftHSM2 leaves these when a C_CreateObject fails, when its process dies
 * inside one, or when an unlocked reader races its writes.  Only lengths
 * are read, never a value.  A private key's CKA_VALUE is sensitive even
 * when blank, so its material is judged by its public parts; a secret key
 * is all value, so it never counts as blank. */
int is_blank(kc_keychain *kc, CK_OBJECT_HANDLE h)
{
    CK_OBJECT_CLASS cls = (CK_OBJECT_CLASS)-1;
    CK_ATTRIBUTE t[] = {ATTR(CKA_CLASS, &cls, sizeof cls),
                        ATTR(CKA_LABEL, NULL, 0), ATTR(CKA_ID, NULL, 0),
                        ATTR(CKA_SUBJECT, NULL, 0), ATTR(CKA_APPLICATION, NULL, 0),
                        ATTR(CKA_MODULUS, NULL, 0), ATTR(CKA_EC_PARAMS, NULL, 0),
                        ATTR(CKA_PRIME, NULL, 0)};
    CK_ATTRIBUTE value = ATTR(CKA_VALUE, NULL, 0);
    enum { N = sizeof t / sizeof t[0] };
    CK_ULONG i;
    CK_RV rv = kc->mod->f->C_GetAttributeValue(kc->session, h, t, N);
    if (rv == CKR_ATTRIBUTE_VALUE_INVALID)
        return 1;
    if (rv != CKR_OK && rv != CKR_ATTRIBUTE_TYPE_INVALID)
        return 0;
    for (i = 1; i < N; i++)
        if (t[i].ulValueLen != 0 && t[i].ulValueLen != CK_UNAVAILABLE_INFORMATION)
            return 0;
    if (cls == CKO_PRIVATE_KEY)
        return 1;
    if (cls == CKO_SECRET_KEY)
        return 0;
    rv = kc->mod->f->C_GetAttributeValue(kc->session, h, &value, 1);
    return (rv == CKR_OK && value.ulValueLen == 0) || rv == CKR_ATTRIBUTE_TYPE_INVALID;
}

static CK_RV find_unlabelled(kc_keychain *kc, CK_OBJECT_HANDLE *h,
                             CK_ULONG max, CK_ULONG *n)
{
    CK_ATTRIBUTE empty = ATTR(CKA_LABEL, "", 0);
    return find(kc, &empty, 1, h, max, n);
}

int32_t note_blanks(kc_keychain *kc, blanks *b, kc_error *err)
{
    CK_OBJECT_HANDLE h[MAX_FOUND + 1];
    CK_ULONG n = 0;
    CK_RV rv = find_unlabelled(kc, h, MAX_FOUND + 1, &n);
    if (rv != CKR_OK)
        return fail_ck(err, rv, "searching the token");
    b->complete = n <= MAX_FOUND; /* else: too many to tell new ones */
    b->n = b->complete ? n : 0;
    memcpy(b->h, h, b->n * sizeof *h);
    return KC_errSecSuccess;
}

/* On a store only keychain_ext uses, every blank object is ours: what a
 * failed or interrupted C_CreateObject left, or what SoftHSM2 leaves when a
 * reader that does not take the token lock races its writes.  Destroy the
 * blank ones among h[0..n); *removed counts them. */
static int32_t destroy_blanks(kc_keychain *kc, const CK_OBJECT_HANDLE *h,
                              CK_ULONG n, CK_ULONG *removed, kc_error *err)
{
    CK_ULONG i;
    CK_RV rv;
    for (i = 0; i < n; i++) {
        if (!is_blank(kc, h[i]))
            continue;
        if ((rv = destroy(kc, h[i])) != CKR_OK)
            return fail_ck(err, rv, "removing an object left by a crash");
        ++*removed;
    }
    return KC_errSecSuccess;
}

/* The blank objects a label search finds (cheap: after each operation). */
int32_t remove_blanks(kc_keychain *kc, CK_ULONG *removed, kc_error *err)
{
    CK_OBJECT_HANDLE h[MAX_FOUND];
    CK_ULONG n = 0;
    CK_RV rv;
    *removed = 0;
    if ((rv = find_unlabelled(kc, h, MAX_FOUND, &n)) != CKR_OK)
        return fail_ck(err, rv, "searching for objects left by a crash");
    return destroy_blanks(kc, h, n, removed, err);
}

/* Every blank object, also those SoftHSM2 cannot read at all (a process
 * killed while writing one), which no search template matches. */
int32_t remove_all_blanks(kc_keychain *kc, CK_ULONG *removed, kc_error *err)
{
    CK_OBJECT_HANDLE *h = NULL;
    CK_ULONG n = 0;
    int32_t st;
    CK_RV rv;
    *removed = 0;
    if ((rv = all_objects(kc, &h, &n)) != CKR_OK)
        return fail_ck(err, rv, "searching for objects left by a crash");
    st = destroy_blanks(kc, h, n, removed, err);
    free(h);
    return st;
}

/* Destroy the blank objects that appeared since *before: a failed create
 * of ours left them, under the token lock (a blank object is of no use to
 * anyone, and none of these existed before we tried). */
void remove_new_blanks(kc_keychain *kc, const blanks *before)
{
    CK_OBJECT_HANDLE h[MAX_FOUND];
    CK_ULONG n = 0, i, j;
    if (!before || !before->complete ||
        find_unlabelled(kc, h, MAX_FOUND, &n) != CKR_OK)
        return;
    for (i = 0; i < n; i++) {
        for (j = 0; j < before->n && before->h[j] != h[i]; j++)
            ;
        if (j == before->n && is_blank(kc, h[i]))
            destroy(kc, h[i]);
    }
}

/* C_CreateObject.  After a transient failure the object may exist anyway
 * (SoftHSM2 #573): look for it before trying again, so that nothing is
 * created twice (cls and label identify it: duplicates were refused), and
 * remove what the failed call left (before: the blank objects seen before
 * the first try, NULL for session objects).  On final failure, too. */
int32_t create_object(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                      CK_OBJECT_CLASS cls, const char *label,
                      const blanks *before, CK_OBJECT_HANDLE *out,
                      const char *what, kc_error *err)
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
        remove_new_blanks(kc, before);
        if (!transient(rv))
            break;
    }
    return fail_ck(err, rv, what);
}

CK_RV destroy(kc_keychain *kc, CK_OBJECT_HANDLE h)
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

/* Destroy every object the template finds; *found counts them. */
int32_t destroy_all(kc_keychain *kc, CK_ATTRIBUTE *tmpl, CK_ULONG n,
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

/* Remove an ephemeral identity: the session objects found under its label
 * (only this process sees them, so they are ours), certificates first. */
int32_t destroy_session_objects(kc_keychain *kc, CK_OBJECT_HANDLE *h,
                                CK_ULONG n, kc_error *err)
{
    CK_OBJECT_CLASS cls[MAX_FOUND];
    CK_ULONG i;
    int pass;
    CK_RV rv;
    for (i = 0; i < n; i++) {
        CK_ATTRIBUTE a = ATTR(CKA_CLASS, &cls[i], sizeof cls[i]);
        if ((rv = kc->mod->f->C_GetAttributeValue(kc->session, h[i], &a, 1)) != CKR_OK)
            return fail_ck(err, rv, "reading the identity's objects");
    }
    for (pass = 0; pass < 2; pass++)
        for (i = 0; i < n; i++)
            if ((cls[i] == CKO_CERTIFICATE) == (pass == 0) &&
                (rv = destroy(kc, h[i])) != CKR_OK)
                return fail_ck(err, rv, pass ? "removing the private key"
                                             : "removing the certificate");
    return KC_errSecSuccess;
}

/* Describe a certificate that has no CKA_SUBJECT (some producers omit
 * it) from its value. */
static void describe_by_value(kc_keychain *kc, CK_OBJECT_HANDLE h,
                              kc_item_info *info)
{
    CK_ATTRIBUTE a = ATTR(CKA_VALUE, NULL, 0);
    const unsigned char *p;
    CK_ULONG size;
    X509 *cert;
    if (kc->mod->f->C_GetAttributeValue(kc->session, h, &a, 1) != CKR_OK ||
        a.ulValueLen == 0 || a.ulValueLen > 1024 * 1024 ||
        !(a.pValue = malloc(size = a.ulValueLen)))
        return;
    /* the module says how much it wrote: never more than we gave it */
    if (kc->mod->f->C_GetAttributeValue(kc->session, h, &a, 1) == CKR_OK &&
        a.ulValueLen <= size) {
        p = a.pValue;
        if ((cert = d2i_X509(NULL, &p, (long)a.ulValueLen)))
            describe_name(X509_get_subject_name(cert), info);
        X509_free(cert);
        ERR_clear_error();
    }
    free_read(a.pValue, size);
}

/* Fold one object into the description of its label. */
void describe_object(kc_keychain *kc, const object *o, kc_item_info *info)
{
    if (!info->label[0])
        snprintf(info->label, sizeof info->label, "%s", o->label);
    if (o->cls == CKO_CERTIFICATE) {
        const unsigned char *p = o->subject;
        X509_NAME *name = d2i_X509_NAME(NULL, &p, (long)o->subject_len);
        info->has_certificate = 1;
        if (name)
            describe_name(name, info);
        else
            describe_by_value(kc, o->handle, info);
        X509_NAME_free(name);
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
}
