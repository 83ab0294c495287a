/*
 * limit.c -- the floor for keychain_ext's PKCS#11 backend: exactly the
 * PKCS#11 calls csrc/keychain_pkcs11.c makes per operation, in a loop, in
 * plain C, with no Python and no binding in between.
 *
 *   preauth = find(CKA_LABEL) + find(CKO_PRIVATE_KEY, CKA_ID)
 *             [+ C_CreateObject(lease)] + C_CreateObject(certificate)
 *             + C_CreateObject(private key)
 *   kill    = find(CKO_CERTIFICATE, CKA_LABEL) + C_DestroyObject
 *             + find(CKO_PRIVATE_KEY, CKA_LABEL, CKA_ID) + C_DestroyObject
 *             [+ find(CKO_DATA, CKA_LABEL, CKA_APPLICATION) + C_DestroyObject]
 *   (the lease -- a CKO_DATA object naming the owner process -- only for
 *   token objects: session objects die with their owner)
 *   lookup  = find(CKA_LABEL) + one C_GetAttributeValue per object found
 *   find    = C_FindObjectsInit + one C_FindObjects + C_FindObjectsFinal
 *
 * The key material is parsed once with the same OpenSSL calls the C layer
 * makes (d2i_PKCS12, PKCS12_verify_mac, PKCS12_parse, X509_check_private_key,
 * X509_pubkey_digest, then the key's numbers and the certificate's DER
 * fields); with parse=1 that parse is repeated, and timed, every iteration.
 *
 * Two ways to run it, same code:
 *   - a program: the run's settings arrive on standard input, one
 *     key=value per line (the PIN and the p12 password never go in argv),
 *     the result is one JSON object on standard output;
 *   - a shared library (-DLIMIT_LIBRARY): limit_run(spec, out, cap) with the
 *     same settings text, called in-process by the benchmark so that it
 *     shares the one SoftHSM2 instance with the other implementations.
 *     It never calls C_Finalize then.
 *
 * Settings: module, token, pin, p12, password, label, mode (cycle | lookup |
 * threads), iterations, token_objects (0 = session objects), parse (0|1),
 * threads; p12_1 .. p12_7: the identity of threads 1..7 in threads mode:
 * two threads cannot import the same key, the store refuses a duplicate).
 * When the module exports p11shim_total (tests/p11shim), the JSON
 * also carries the PKCS#11 calls each operation made in the first
 * iteration.
 *
 * Build: cc -O2 $(pkg-config --cflags p11-kit-1) limit.c -o limit -ldl -lcrypto -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

#define MAX_FOUND 64
#define ATTR(type, ptr, len) {(type), (void *)(ptr), (CK_ULONG)(len)}
#define N_RSA 8
#define LEASE_APPLICATION "keychain_ext"

/* ------------------------------------------------------------- settings */

typedef struct settings {
    char module[4096], token[64], pin[256], p12[4096], password[256];
    char label[200], mode[16];
    char thread_p12[8][4096];    /* p12_1 .. p12_7: thread t's identity */
    long iterations;
    int token_objects, parse, threads;
} settings;

static void set_field(settings *s, const char *key, const char *val)
{
#define STR(name) if (!strcmp(key, #name)) { snprintf(s->name, sizeof s->name, "%s", val); return; }
    STR(module) STR(token) STR(pin) STR(p12) STR(password) STR(label) STR(mode)
#undef STR
    if (!strncmp(key, "p12_", 4) && key[4] >= '1' && key[4] <= '7' && !key[5]) {
        snprintf(s->thread_p12[key[4] - '0'], sizeof s->thread_p12[0], "%s", val);
        return;
    }
    if (!strcmp(key, "iterations")) s->iterations = atol(val);
    else if (!strcmp(key, "token_objects")) s->token_objects = atoi(val);
    else if (!strcmp(key, "parse")) s->parse = atoi(val);
    else if (!strcmp(key, "threads")) s->threads = atoi(val);
}

static void parse_settings(const char *text, settings *s)
{
    const char *p = text;
    memset(s, 0, sizeof *s);
    snprintf(s->label, sizeof s->label, "limit");
    snprintf(s->mode, sizeof s->mode, "cycle");
    s->iterations = 100;
    s->threads = 1;
    while (*p) {
        const char *nl = strchr(p, '\n'), *eq;
        size_t n = nl ? (size_t)(nl - p) : strlen(p);
        char line[8192];
        if (n >= sizeof line) n = sizeof line - 1;
        memcpy(line, p, n);
        line[n] = 0;
        if ((eq = strchr(line, '='))) {
            line[eq - line] = 0;
            set_field(s, line, eq + 1);
        }
        p += n + (nl ? 1 : 0);
    }
}

/* ---------------------------------------------------------------- output */

typedef struct outbuf {
    char *p;
    size_t cap, len;
} outbuf;

static void out(outbuf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void out(outbuf *o, const char *fmt, ...)
{
    va_list ap;
    int n;
    if (o->len >= o->cap)
        return;
    va_start(ap, fmt);
    n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
    va_end(ap);
    if (n > 0)
        o->len += (size_t)n < o->cap - o->len ? (size_t)n : o->cap - o->len - 1;
}

static int fail(outbuf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(outbuf *o, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    o->len = 0;
    out(o, "{\"error\": \"%s\"}", msg);
    return 1;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, long n)
{
    if (n <= 0)
        return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* --------------------------------------------------------------- module */

typedef unsigned long (*shim_total_fn)(void);

typedef struct p11 {
    void *dl;
    CK_FUNCTION_LIST_PTR f;
    CK_SLOT_ID slot;
    int initialized_here;
    shim_total_fn calls;     /* p11shim_total when the module is the shim */
} p11;

static int p11_open(p11 *m, const settings *s, outbuf *o)
{
    CK_C_GetFunctionList get_list;
    CK_C_INITIALIZE_ARGS args;
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64, i;
    CK_TOKEN_INFO info;
    CK_UTF8CHAR want[32];
    size_t len = strlen(s->token);
    CK_RV rv;

    memset(m, 0, sizeof *m);
    if (!(m->dl = dlopen(s->module, RTLD_NOW | RTLD_LOCAL)))
        return fail(o, "cannot load the module");
    get_list = (CK_C_GetFunctionList)dlsym(m->dl, "C_GetFunctionList");
    if (!get_list || get_list(&m->f) != CKR_OK)
        return fail(o, "not a PKCS#11 module");
    m->calls = (shim_total_fn)dlsym(m->dl, "p11shim_total");
    memset(&args, 0, sizeof args);
    args.flags = CKF_OS_LOCKING_OK;
    rv = m->f->C_Initialize(&args);
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED)
        return fail(o, "C_Initialize: 0x%lx", rv);
    m->initialized_here = rv == CKR_OK;
    if ((rv = m->f->C_GetSlotList(CK_TRUE, slots, &n)) != CKR_OK)
        return fail(o, "C_GetSlotList: 0x%lx", rv);
    memset(want, ' ', sizeof want);
    memcpy(want, s->token, len < sizeof want ? len : sizeof want);
    for (i = 0; i < n; i++)
        if (m->f->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
            (info.flags & CKF_TOKEN_INITIALIZED) &&
            !memcmp(info.label, want, sizeof want)) {
            m->slot = slots[i];
            return 0;
        }
    return fail(o, "no token with that label");
}

static int p11_session(p11 *m, const settings *s, CK_SESSION_HANDLE *h, outbuf *o)
{
    CK_RV rv = m->f->C_OpenSession(m->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                   NULL, NULL, h);
    if (rv != CKR_OK)
        return fail(o, "C_OpenSession: 0x%lx", rv);
    rv = m->f->C_Login(*h, CKU_USER, (CK_UTF8CHAR_PTR)s->pin, strlen(s->pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
        return fail(o, "C_Login: 0x%lx", rv);
    return 0;
}

static unsigned long calls(const p11 *m)
{
    return m->calls ? m->calls() : 0;
}

/* -------------------------------------------------------- key material */

typedef struct blob {
    unsigned char *p;
    int n;
} blob;

typedef struct material {
    int rsa;
    CK_BYTE key_id[SHA_DIGEST_LENGTH];
    blob cert, subject, issuer, serial;
    blob k[N_RSA];               /* RSA numbers, or EC params + value */
} material;

static void material_free(material *mt)
{
    int i;
    OPENSSL_free(mt->cert.p);
    OPENSSL_free(mt->subject.p);
    OPENSSL_free(mt->issuer.p);
    OPENSSL_free(mt->serial.p);
    for (i = 0; i < N_RSA; i++)
        OPENSSL_clear_free(mt->k[i].p, mt->k[i].n > 0 ? (size_t)mt->k[i].n : 0);
    memset(mt, 0, sizeof *mt);
}

static int bn_blob(EVP_PKEY *key, const char *name, int pad, blob *b)
{
    BIGNUM *bn = NULL;
    if (!EVP_PKEY_get_bn_param(key, name, &bn))
        return 0;
    b->n = pad ? pad : BN_num_bytes(bn);
    b->p = OPENSSL_malloc(b->n ? (size_t)b->n : 1);
    if (b->p)
        BN_bn2binpad(bn, b->p, b->n);
    BN_clear_free(bn);
    return b->p != NULL;
}

/* The C layer's copy_identity_from_pkcs12 plus its template blobs. */
static int material_from_p12(const unsigned char *data, long len,
                             const char *password, material *mt)
{
    static const char *rsa_params[N_RSA] = {
        OSSL_PKEY_PARAM_RSA_N, OSSL_PKEY_PARAM_RSA_E, OSSL_PKEY_PARAM_RSA_D,
        OSSL_PKEY_PARAM_RSA_FACTOR1, OSSL_PKEY_PARAM_RSA_FACTOR2,
        OSSL_PKEY_PARAM_RSA_EXPONENT1, OSSL_PKEY_PARAM_RSA_EXPONENT2,
        OSSL_PKEY_PARAM_RSA_COEFFICIENT1};
    const unsigned char *p = data;
    const char *pass = password;
    PKCS12 *p12 = d2i_PKCS12(NULL, &p, len);
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    STACK_OF(X509) *ca = NULL;
    unsigned int n = 0;
    char group[64];
    int ok = 0, i;

    memset(mt, 0, sizeof *mt);
    if (!p12)
        goto out;
    if (PKCS12_mac_present(p12) && !PKCS12_verify_mac(p12, pass, -1)) {
        if (*pass == 0 && PKCS12_verify_mac(p12, NULL, 0))
            pass = NULL;
        else
            goto out;
    }
    if (!PKCS12_parse(p12, pass, &key, &cert, &ca) || !key || !cert ||
        !X509_check_private_key(cert, key) ||
        !X509_pubkey_digest(cert, EVP_sha1(), mt->key_id, &n))
        goto out;
    mt->cert.n = i2d_X509(cert, &mt->cert.p);
    mt->subject.n = i2d_X509_NAME(X509_get_subject_name(cert), &mt->subject.p);
    mt->issuer.n = i2d_X509_NAME(X509_get_issuer_name(cert), &mt->issuer.p);
    mt->serial.n = i2d_ASN1_INTEGER(X509_get_serialNumber(cert), &mt->serial.p);
    mt->rsa = EVP_PKEY_get_base_id(key) == EVP_PKEY_RSA;
    ok = 1;
    if (mt->rsa) {
        for (i = 0; i < N_RSA && ok; i++)
            ok = bn_blob(key, rsa_params[i], 0, &mt->k[i]);
    } else {
        ok = EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME,
                                            group, sizeof group, NULL);
        if (ok) {
            mt->k[0].n = i2d_ASN1_OBJECT(OBJ_nid2obj(OBJ_txt2nid(group)), &mt->k[0].p);
            ok = mt->k[0].n > 0 &&
                 bn_blob(key, OSSL_PKEY_PARAM_PRIV_KEY,
                         (EVP_PKEY_get_bits(key) + 7) / 8, &mt->k[1]);
        }
    }
out:
    sk_X509_pop_free(ca, X509_free);
    EVP_PKEY_free(key);
    X509_free(cert);
    PKCS12_free(p12);
    ERR_clear_error();
    if (!ok)
        material_free(mt);
    return ok;
}

/* ------------------------------------------------------- the operations */

static CK_RV find(p11 *m, CK_SESSION_HANDLE s, CK_ATTRIBUTE *t, CK_ULONG n,
                  CK_OBJECT_HANDLE *found, CK_ULONG *count)
{
    CK_RV rv, rv2;
    *count = 0;
    if ((rv = m->f->C_FindObjectsInit(s, t, n)) != CKR_OK)
        return rv;
    rv = m->f->C_FindObjects(s, found, MAX_FOUND, count);
    rv2 = m->f->C_FindObjectsFinal(s);
    return rv != CKR_OK ? rv : rv2;
}

static CK_RV preauth(p11 *m, CK_SESSION_HANDLE s, const material *mt,
                     const char *label, CK_BBOOL token)
{
    static const CK_ATTRIBUTE_TYPE rsa_types[N_RSA] = {
        CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT, CKA_PRIME_1,
        CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT};
    CK_OBJECT_CLASS cert_cls = CKO_CERTIFICATE, key_cls = CKO_PRIVATE_KEY;
    CK_CERTIFICATE_TYPE ctype = CKC_X_509;
    CK_KEY_TYPE ktype = mt->rsa ? CKK_RSA : CKK_EC;
    CK_BBOOL t = CK_TRUE, f = CK_FALSE;
    size_t ll = strlen(label);
    CK_ATTRIBUTE by_label[] = {ATTR(CKA_LABEL, label, ll)};
    CK_ATTRIBUTE by_id[] = {ATTR(CKA_CLASS, &key_cls, sizeof key_cls),
                            ATTR(CKA_ID, mt->key_id, sizeof mt->key_id)};
    CK_ATTRIBUTE cert[] = {
        ATTR(CKA_CLASS, &cert_cls, sizeof cert_cls),
        ATTR(CKA_CERTIFICATE_TYPE, &ctype, sizeof ctype),
        ATTR(CKA_TOKEN, &token, sizeof token),
        ATTR(CKA_PRIVATE, &f, sizeof f),
        ATTR(CKA_LABEL, label, ll),
        ATTR(CKA_ID, mt->key_id, sizeof mt->key_id),
        ATTR(CKA_VALUE, mt->cert.p, mt->cert.n),
        ATTR(CKA_SUBJECT, mt->subject.p, mt->subject.n),
        ATTR(CKA_ISSUER, mt->issuer.p, mt->issuer.n),
        ATTR(CKA_SERIAL_NUMBER, mt->serial.p, mt->serial.n),
    };
    CK_ATTRIBUTE key[32] = {
        ATTR(CKA_CLASS, &key_cls, sizeof key_cls),
        ATTR(CKA_KEY_TYPE, &ktype, sizeof ktype),
        ATTR(CKA_TOKEN, &token, sizeof token),
        ATTR(CKA_LABEL, label, ll),
        ATTR(CKA_ID, mt->key_id, sizeof mt->key_id),
        ATTR(CKA_PRIVATE, &t, 1), ATTR(CKA_SENSITIVE, &t, 1),
        ATTR(CKA_EXTRACTABLE, &f, 1), ATTR(CKA_SIGN, &t, 1),
        ATTR(CKA_DECRYPT, &f, 1), ATTR(CKA_UNWRAP, &f, 1),
        ATTR(CKA_DERIVE, &f, 1), ATTR(CKA_SIGN_RECOVER, &f, 1),
        ATTR(CKA_ALWAYS_AUTHENTICATE, &f, 1),
    };
    CK_OBJECT_CLASS data_cls = CKO_DATA;
    char text[512], hex[2 * SHA_DIGEST_LENGTH + 1];
    CK_ATTRIBUTE lease[] = {
        ATTR(CKA_CLASS, &data_cls, sizeof data_cls),
        ATTR(CKA_TOKEN, &t, 1), ATTR(CKA_PRIVATE, &t, 1),
        ATTR(CKA_LABEL, label, ll),
        ATTR(CKA_APPLICATION, LEASE_APPLICATION, strlen(LEASE_APPLICATION)),
        ATTR(CKA_VALUE, text, 0),
    };
    CK_ULONG nk = 14, count;
    CK_OBJECT_HANDLE h[MAX_FOUND], hc, hk, hl = CK_INVALID_HANDLE;
    CK_RV rv;
    int i;

    if (mt->rsa) {
        for (i = 0; i < N_RSA; i++)
            key[nk++] = (CK_ATTRIBUTE)ATTR(rsa_types[i], mt->k[i].p, mt->k[i].n);
    } else {
        key[nk++] = (CK_ATTRIBUTE)ATTR(CKA_EC_PARAMS, mt->k[0].p, mt->k[0].n);
        key[nk++] = (CK_ATTRIBUTE)ATTR(CKA_VALUE, mt->k[1].p, mt->k[1].n);
    }
    if ((rv = find(m, s, by_label, 1, h, &count)) != CKR_OK)
        return rv;
    if (count)
        return CKR_GENERAL_ERROR; /* duplicate: refuse */
    if ((rv = find(m, s, by_id, 2, h, &count)) != CKR_OK)
        return rv;
    if (count)
        return CKR_GENERAL_ERROR;
    if (token) {
        for (i = 0; i < SHA_DIGEST_LENGTH; i++)
            snprintf(hex + 2 * i, 3, "%02x", mt->key_id[i]);
        snprintf(text, sizeof text, "keychain_ext-lease/1 pid=%ld id=%s",
                 (long)getpid(), hex);
        lease[5].ulValueLen = strlen(text);
        if ((rv = m->f->C_CreateObject(s, lease, 6, &hl)) != CKR_OK)
            return rv;
    }
    if ((rv = m->f->C_CreateObject(s, cert, 10, &hc)) != CKR_OK) {
        if (token)
            m->f->C_DestroyObject(s, hl);
        return rv;
    }
    if ((rv = m->f->C_CreateObject(s, key, nk, &hk)) != CKR_OK) {
        m->f->C_DestroyObject(s, hc);
        if (token)
            m->f->C_DestroyObject(s, hl);
        return rv;
    }
    return CKR_OK;
}

static CK_RV kill_key(p11 *m, CK_SESSION_HANDLE s, const material *mt,
                      const char *label, CK_BBOOL token)
{
    CK_OBJECT_CLASS cert_cls = CKO_CERTIFICATE, key_cls = CKO_PRIVATE_KEY,
                    data_cls = CKO_DATA;
    size_t ll = strlen(label);
    CK_ATTRIBUTE cert_t[] = {ATTR(CKA_CLASS, &cert_cls, sizeof cert_cls),
                             ATTR(CKA_LABEL, label, ll)};
    CK_ATTRIBUTE key_t[] = {ATTR(CKA_CLASS, &key_cls, sizeof key_cls),
                            ATTR(CKA_LABEL, label, ll),
                            ATTR(CKA_ID, mt->key_id, sizeof mt->key_id)};
    CK_ATTRIBUTE lease_t[] = {
        ATTR(CKA_CLASS, &data_cls, sizeof data_cls), ATTR(CKA_LABEL, label, ll),
        ATTR(CKA_APPLICATION, LEASE_APPLICATION, strlen(LEASE_APPLICATION))};
    CK_OBJECT_HANDLE h[MAX_FOUND];
    CK_ULONG count, i, total = 0;
    CK_RV rv;

    if ((rv = find(m, s, cert_t, 2, h, &count)) != CKR_OK)
        return rv;
    total += count;
    for (i = 0; i < count; i++)
        if ((rv = m->f->C_DestroyObject(s, h[i])) != CKR_OK)
            return rv;
    if ((rv = find(m, s, key_t, 3, h, &count)) != CKR_OK)
        return rv;
    total += count;
    for (i = 0; i < count; i++)
        if ((rv = m->f->C_DestroyObject(s, h[i])) != CKR_OK)
            return rv;
    if (token) {
        if ((rv = find(m, s, lease_t, 3, h, &count)) != CKR_OK)
            return rv;
        for (i = 0; i < count; i++)
            if ((rv = m->f->C_DestroyObject(s, h[i])) != CKR_OK)
                return rv;
    }
    return total == 2 ? CKR_OK : CKR_GENERAL_ERROR;
}

typedef struct object {
    CK_OBJECT_CLASS cls;
    CK_BBOOL token;
    CK_KEY_TYPE key_type;
    CK_BYTE id[64];
    char label[256];
    CK_BYTE value[8192];
} object;

static CK_RV lookup(p11 *m, CK_SESSION_HANDLE s, const char *label,
                    object *o, CK_ULONG *found)
{
    CK_ATTRIBUTE t[] = {ATTR(CKA_LABEL, label, strlen(label))};
    CK_OBJECT_HANDLE h[MAX_FOUND];
    CK_ULONG count, i;
    CK_RV rv;

    if ((rv = find(m, s, t, 1, h, &count)) != CKR_OK)
        return rv;
    for (i = 0; i < count; i++) {
        CK_ATTRIBUTE a[] = {
            ATTR(CKA_CLASS, &o->cls, sizeof o->cls),
            ATTR(CKA_TOKEN, &o->token, sizeof o->token),
            ATTR(CKA_KEY_TYPE, &o->key_type, sizeof o->key_type),
            ATTR(CKA_ID, o->id, sizeof o->id),
            ATTR(CKA_LABEL, o->label, sizeof o->label - 1),
            ATTR(CKA_VALUE, o->value, sizeof o->value),
        };
        rv = m->f->C_GetAttributeValue(s, h[i], a, 6);
        if (rv != CKR_OK && rv != CKR_ATTRIBUTE_SENSITIVE &&
            rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_BUFFER_TOO_SMALL)
            return rv;
    }
    *found = count;
    return CKR_OK;
}

/* ------------------------------------------------------------ the runs */

typedef struct run {
    const settings *s;
    p11 *m;
    const unsigned char *p12;
    long p12_len;
    const material *mt;
    char label[256];
    long iterations;
    CK_RV rv;
    double *parse, *pre, *kill;
    unsigned long calls_parse, calls_preauth, calls_kill;
} run;

static void *cycles(void *arg)
{
    run *r = arg;
    CK_SESSION_HANDLE s;
    outbuf dummy = {NULL, 0, 0};
    CK_BBOOL token = r->s->token_objects ? CK_TRUE : CK_FALSE;
    long i;

    if (p11_session(r->m, r->s, &s, &dummy)) {
        r->rv = CKR_GENERAL_ERROR;
        return NULL;
    }
    for (i = 0; i < r->iterations; i++) {
        material fresh;
        const material *mt = r->mt;
        double t0 = now_ms(), t1, t2, t3;
        unsigned long c0 = calls(r->m), c1, c2;
        if (r->s->parse) {
            if (!material_from_p12(r->p12, r->p12_len, r->s->password, &fresh)) {
                r->rv = CKR_FUNCTION_FAILED;
                break;
            }
            mt = &fresh;
        }
        t1 = now_ms();
        r->rv = preauth(r->m, s, mt, r->label, token);
        t2 = now_ms();
        c1 = calls(r->m);
        if (r->rv == CKR_OK)
            r->rv = kill_key(r->m, s, mt, r->label, token);
        t3 = now_ms();
        c2 = calls(r->m);
        if (r->s->parse)
            material_free(&fresh);
        if (r->rv != CKR_OK)
            break;
        if (r->parse) {
            r->parse[i] = t1 - t0;
            r->pre[i] = t2 - t1;
            r->kill[i] = t3 - t2;
        }
        if (i == 0) {
            r->calls_preauth = c1 - c0;
            r->calls_kill = c2 - c1;
        }
    }
    r->m->f->C_CloseSession(s);
    return NULL;
}

static int read_file(const char *path, unsigned char **data, long *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return 0;
    fseek(fp, 0, SEEK_END);
    *len = ftell(fp);
    rewind(fp);
    *data = malloc(*len > 0 ? (size_t)*len : 1);
    if (!*data || fread(*data, 1, (size_t)*len, fp) != (size_t)*len) {
        fclose(fp);
        return 0;
    }
    fclose(fp);
    return 1;
}

static pthread_once_t providers_once = PTHREAD_ONCE_INIT;
static void load_providers(void)
{
    OSSL_PROVIDER_try_load(NULL, "legacy", 1);
    ERR_clear_error();
}

static int run_settings(const settings *s, outbuf *o, int library)
{
    p11 m;
    unsigned char *p12 = NULL;
    long p12_len = 0, n = s->iterations, i;
    material mt;
    int rc = 1, t;

    pthread_once(&providers_once, load_providers);
    memset(&mt, 0, sizeof mt);
    if (n < 1)
        return fail(o, "iterations must be positive");
    if (!read_file(s->p12, &p12, &p12_len))
        return fail(o, "cannot read the p12 file");
    if (!material_from_p12(p12, p12_len, s->password, &mt)) {
        free(p12);
        return fail(o, "cannot parse the p12 file");
    }
    if (p11_open(&m, s, o))
        goto done;

    if (!strcmp(s->mode, "cycle")) {
        run r;
        double *cyc, *tot;
        memset(&r, 0, sizeof r);
        r.s = s; r.m = &m; r.p12 = p12; r.p12_len = p12_len; r.mt = &mt;
        r.iterations = n;
        snprintf(r.label, sizeof r.label, "%s", s->label);
        r.parse = calloc(n, sizeof(double));
        r.pre = calloc(n, sizeof(double));
        r.kill = calloc(n, sizeof(double));
        cyc = calloc(n, sizeof(double));
        tot = calloc(n, sizeof(double));
        cycles(&r);
        if (r.rv != CKR_OK) {
            fail(o, "cycle failed: 0x%lx", r.rv);
        } else {
            for (i = 0; i < n; i++) {
                cyc[i] = r.pre[i] + r.kill[i];
                tot[i] = cyc[i] + r.parse[i];
            }
            out(o, "{\"mode\": \"cycle\", \"iterations\": %ld, \"parse\": %d, "
                   "\"token_objects\": %d, \"key\": \"%s\"",
                n, s->parse, s->token_objects, mt.rsa ? "rsa" : "ec");
            out(o, ", \"total_ms\": %.6f", median(tot, n));
            out(o, ", \"cycle_ms\": %.6f", median(cyc, n));
            out(o, ", \"parse_ms\": %.6f", median(r.parse, n));
            out(o, ", \"preauth_ms\": %.6f", median(r.pre, n));
            out(o, ", \"kill_ms\": %.6f", median(r.kill, n));
            out(o, ", \"samples_ms\": [");
            for (i = 0; i < n; i++)
                out(o, "%s%.6f", i ? ", " : "", s->parse ? tot[i] : cyc[i]);
            out(o, "]");
            if (m.calls)
                out(o, ", \"calls\": {\"preauth\": %lu, \"kill\": %lu}",
                    r.calls_preauth, r.calls_kill);
            out(o, "}");
            rc = 0;
        }
        free(r.parse); free(r.pre); free(r.kill); free(cyc); free(tot);
    } else if (!strcmp(s->mode, "lookup")) {
        CK_SESSION_HANDLE sess;
        object *obj = malloc(sizeof *obj);
        double *hit = calloc(n, sizeof(double)), *miss = calloc(n, sizeof(double));
        char missing[256];
        CK_ULONG found = 0;
        CK_RV rv = CKR_OK;
        unsigned long c0, c1, c2, ch = 0, cm = 0;
        snprintf(missing, sizeof missing, "%s-missing", s->label);
        if (p11_session(&m, s, &sess, o))
            goto lookup_done;
        rv = preauth(&m, sess, &mt, s->label, s->token_objects ? CK_TRUE : CK_FALSE);
        for (i = 0; rv == CKR_OK && i < n; i++) {
            double t0 = now_ms(), t1, t2;
            c0 = calls(&m);
            rv = lookup(&m, sess, s->label, obj, &found);
            t1 = now_ms();
            c1 = calls(&m);
            if (rv == CKR_OK && found != (s->token_objects ? 3u : 2u))
                rv = CKR_GENERAL_ERROR; /* certificate, key (and lease) */
            if (rv == CKR_OK)
                rv = lookup(&m, sess, missing, obj, &found);
            t2 = now_ms();
            c2 = calls(&m);
            if (rv == CKR_OK && found != 0)
                rv = CKR_GENERAL_ERROR;
            hit[i] = t1 - t0;
            miss[i] = t2 - t1;
            if (i == 0) {
                ch = c1 - c0;
                cm = c2 - c1;
            }
        }
        if (kill_key(&m, sess, &mt, s->label, s->token_objects ? CK_TRUE : CK_FALSE) != CKR_OK &&
            rv == CKR_OK)
            rv = CKR_GENERAL_ERROR;
        m.f->C_CloseSession(sess);
        if (rv != CKR_OK) {
            fail(o, "lookup failed: 0x%lx", rv);
        } else {
            out(o, "{\"mode\": \"lookup\", \"iterations\": %ld", n);
            out(o, ", \"hit_ms\": %.6f, \"miss_ms\": %.6f", median(hit, n), median(miss, n));
            if (m.calls)
                out(o, ", \"calls\": {\"lookup_hit\": %lu, \"lookup_miss\": %lu}", ch, cm);
            out(o, "}");
            rc = 0;
        }
    lookup_done:
        free(obj); free(hit); free(miss);
    } else if (!strcmp(s->mode, "threads")) {
        int nt = s->threads < 1 ? 1 : s->threads;
        run r[8];
        pthread_t tid[8];
        material tmt[8];
        unsigned char *tp12[8] = {NULL};
        long tlen[8] = {0};
        double t0, t1;
        if (nt > 8)
            nt = 8;
        memset(tmt, 0, sizeof tmt);
        for (t = 1; t < nt; t++)
            if (!s->thread_p12[t][0] || !read_file(s->thread_p12[t], &tp12[t], &tlen[t]) ||
                !material_from_p12(tp12[t], tlen[t], s->password, &tmt[t])) {
                fail(o, "thread %d needs its own identity (p12_%d)", t, t);
                for (t = 1; t < nt; t++) { material_free(&tmt[t]); free(tp12[t]); }
                goto done;
            }
        t0 = now_ms();
        for (t = 0; t < nt; t++) {
            memset(&r[t], 0, sizeof r[t]);
            r[t].s = s; r[t].m = &m;
            r[t].p12 = t ? tp12[t] : p12; r[t].p12_len = t ? tlen[t] : p12_len;
            r[t].mt = t ? &tmt[t] : &mt; r[t].iterations = n;
            snprintf(r[t].label, sizeof r[t].label, "%s-t%d", s->label, t);
            pthread_create(&tid[t], NULL, cycles, &r[t]);
        }
        for (t = 0; t < nt; t++)
            pthread_join(tid[t], NULL);
        t1 = now_ms();
        for (t = 1; t < nt; t++) {
            material_free(&tmt[t]);
            free(tp12[t]);
        }
        for (t = 0; t < nt; t++)
            if (r[t].rv != CKR_OK) {
                fail(o, "thread %d failed: 0x%lx", t, r[t].rv);
                goto done;
            }
        out(o, "{\"mode\": \"threads\", \"threads\": %d, \"iterations\": %ld, "
               "\"seconds\": %.6f, \"cycles_per_s\": %.3f}",
            nt, n, (t1 - t0) / 1e3, nt * n / ((t1 - t0) / 1e3));
        rc = 0;
    } else {
        fail(o, "unknown mode");
    }
done:
    if (!library && m.f && m.initialized_here)
        m.f->C_Finalize(NULL);
    material_free(&mt);
    free(p12);
    return rc;
}

/* In-process entry point (the shared-library build): settings text in,
 * JSON out.  Returns 0 on success. */
int limit_run(const char *spec, char *result, size_t cap)
{
    settings s;
    outbuf o = {result, cap, 0};
    int rc;
    if (cap)
        result[0] = 0;
    parse_settings(spec, &s);
    rc = run_settings(&s, &o, 1);
    OPENSSL_cleanse(&s, sizeof s);
    return rc;
}

#ifndef LIMIT_LIBRARY
int main(void)
{
    static char text[65536], result[1 << 22];
    size_t n = fread(text, 1, sizeof text - 1, stdin);
    settings s;
    outbuf o = {result, sizeof result, 0};
    int rc;
    text[n] = 0;
    parse_settings(text, &s);
    OPENSSL_cleanse(text, sizeof text);
    rc = run_settings(&s, &o, 0);
    OPENSSL_cleanse(&s, sizeof s);
    puts(result);
    return rc;
}
#endif
