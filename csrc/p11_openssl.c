/*
 * p11_openssl.c -- what OpenSSL does for the PKCS#11 backend: decode a
 * PKCS#12 file (SecPKCS12Import's parsing half), print names, and hand out
 * key material for C_CreateObject.
 */
#include "p11.h"

#include <stdio.h>
#include <string.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/pkcs12.h>
#include <openssl/pkcs7.h>
#include <openssl/provider.h>

/* An untrusted file must not buy minutes of CPU: every key derivation it
 * asks for (the MAC's and each encrypted part's) is capped.  OpenSSL writes
 * 2,048 iterations, Java 10,000, cryptography 20,000, NSS 600,000. */
#define MAX_KDF_ITERATIONS 2000000
#define MAX_NESTING 4 /* SafeContents bags inside SafeContents bags */

static pthread_once_t providers_once = PTHREAD_ONCE_INIT;

/* PKCS#12 runs in a library context of its own, with the default and the
 * legacy provider (`openssl pkcs12 -export -legacy` files use RC2-40):
 * loading the legacy provider into the process's default context would
 * hand MD4 and RC4 to every OpenSSL user in the process. */
static OSSL_LIB_CTX *p12_ctx;

static void load_providers(void)
{
    if ((p12_ctx = OSSL_LIB_CTX_new())) {
        OSSL_PROVIDER_load(p12_ctx, "default");
        OSSL_PROVIDER_load(p12_ctx, "legacy"); /* may be absent: then RC2 fails */
    }
    ERR_clear_error();
}

void free_identity(identity *id)
{
    EVP_PKEY_free(id->key);
    X509_free(id->cert);
    memset(id, 0, sizeof *id);
}

/* The iteration count a password-based encryption algorithm asks for
 * (PKCS#12 PBE or PBES2 with PBKDF2); -1 if it cannot be read. */
static long kdf_iterations(const X509_ALGOR *alg)
{
    const ASN1_OBJECT *oid;
    const void *param;
    int type;
    long iter = -1;

    X509_ALGOR_get0(&oid, &type, &param, alg);
    if (type != V_ASN1_SEQUENCE)
        return -1;
    if (OBJ_obj2nid(oid) == NID_pbes2) {
        PBE2PARAM *pbe2 = ASN1_TYPE_unpack_sequence(ASN1_ITEM_rptr(PBE2PARAM),
                                                    alg->parameter);
        if (pbe2 && OBJ_obj2nid(pbe2->keyfunc->algorithm) == NID_id_pbkdf2) {
            PBKDF2PARAM *kdf = ASN1_TYPE_unpack_sequence(
                ASN1_ITEM_rptr(PBKDF2PARAM), pbe2->keyfunc->parameter);
            if (kdf)
                iter = ASN1_INTEGER_get(kdf->iter);
            PBKDF2PARAM_free(kdf);
        }
        PBE2PARAM_free(pbe2);
    } else {
        PBEPARAM *pbe = ASN1_TYPE_unpack_sequence(ASN1_ITEM_rptr(PBEPARAM),
                                                  alg->parameter);
        if (pbe)
            iter = ASN1_INTEGER_get(pbe->iter);
        PBEPARAM_free(pbe);
    }
    return iter;
}

static int32_t check_kdf(const X509_ALGOR *alg, const char *what, kc_error *err)
{
    long iter = kdf_iterations(alg);
    if (iter < 1 || iter > MAX_KDF_ITERATIONS)
        return fail(err, KC_errSecDecode, 0,
                    "the PKCS#12 %s asks for %ld key derivation iterations "
                    "(limit %d, or a derivation keychain_ext does not know)",
                    what, iter, MAX_KDF_ITERATIONS);
    return KC_errSecSuccess;
}

/* What the bags of a PKCS#12 file hold. */
typedef struct contents {
    const char *pass;
    int pass_len;
    int has_mac;
    int keys;                   /* private keys seen */
    EVP_PKEY *key;              /* the first */
    STACK_OF(X509) *certs;
} contents;

/* A decryption failure: without a MAC, the only sign of a wrong password. */
static int32_t fail_decrypt(const contents *c, kc_error *err)
{
    if (!c->has_mac) {
        ERR_clear_error();
        return fail(err, KC_errSecPkcs12VerifyFailure, 0,
                    "wrong password for the PKCS#12 file (it has no MAC, and "
                    "its contents did not decrypt)");
    }
    return fail_ssl(err, KC_errSecDecode, "cannot decrypt the PKCS#12 file");
}

static int32_t read_bags(const STACK_OF(PKCS12_SAFEBAG) *bags, contents *c,
                         int depth, kc_error *err)
{
    const X509_ALGOR *alg;
    const X509_SIG *sig;
    PKCS8_PRIV_KEY_INFO *p8 = NULL;
    EVP_PKEY *key;
    X509 *cert;
    int i, nid;
    int32_t st;

    for (i = 0; i < sk_PKCS12_SAFEBAG_num(bags); i++) {
        const PKCS12_SAFEBAG *bag = sk_PKCS12_SAFEBAG_value(bags, i);
        key = NULL;
        switch ((nid = PKCS12_SAFEBAG_get_nid(bag))) {
        case NID_keyBag:
            key = EVP_PKCS82PKEY(PKCS12_SAFEBAG_get0_p8inf(bag));
            break;
        case NID_pkcs8ShroudedKeyBag:
            sig = PKCS12_SAFEBAG_get0_pkcs8(bag);
            X509_SIG_get0(sig, &alg, NULL);
            if ((st = check_kdf(alg, "private key", err)))
                return st;
            if (!(p8 = PKCS12_decrypt_skey(bag, c->pass, c->pass_len)))
                return fail_decrypt(c, err);
            key = EVP_PKCS82PKEY(p8);
            PKCS8_PRIV_KEY_INFO_free(p8);
            break;
        case NID_certBag:
            if (PKCS12_SAFEBAG_get_bag_nid(bag) != NID_x509Certificate)
                continue;
            if (!(cert = PKCS12_SAFEBAG_get1_cert(bag)) ||
                !sk_X509_push(c->certs, cert)) {
                X509_free(cert);
                return fail_ssl(err, KC_errSecDecode,
                                "cannot read a certificate of the PKCS#12 file");
            }
            continue;
        case NID_safeContentsBag:
            if (depth >= MAX_NESTING)
                return fail(err, KC_errSecDecode, 0,
                            "the PKCS#12 file nests its contents too deep");
            if ((st = read_bags(PKCS12_SAFEBAG_get0_safes(bag), c, depth + 1, err)))
                return st;
            continue;
        default:
            continue; /* CRLs, secrets: nothing keychain_ext imports */
        }
        if (!key)
            return fail_ssl(err, KC_errSecDecode,
                            "cannot read the private key of the PKCS#12 file");
        if (c->keys++)
            EVP_PKEY_free(key);
        else
            c->key = key;
    }
    return KC_errSecSuccess;
}

/* Decode the PKCS#12 bytes and decrypt them with the password, walking its
 * parts (as PKCS12_parse does) so that every key derivation is capped,
 * a file without a MAC is told from a wrong password, and a second private
 * key is refused instead of ignored.  *out gets the private key and the
 * certificate that matches it (either NULL if the file has none).
 * Statuses: errSecDecode, errSecPkcs12VerifyFailure. */
int32_t parse_pkcs12(const uint8_t *data, size_t len, const char *password,
                     identity *out, kc_error *err)
{
    const unsigned char *p = data;
    const ASN1_INTEGER *mac_iter = NULL;
    const X509_ALGOR *mac_alg = NULL;
    STACK_OF(PKCS7) *safes = NULL;
    STACK_OF(PKCS12_SAFEBAG) *bags;
    OSSL_LIB_CTX *previous = NULL;
    contents c;
    PKCS12 *p12 = NULL;
    PKCS7 *p7;
    int32_t st = KC_errSecSuccess;
    int i;

    memset(&c, 0, sizeof c);
    if (!data || len == 0)
        return fail(err, KC_errSecDecode, 0, "empty PKCS#12 data");
    if (len > 16 * 1024 * 1024)
        return fail(err, KC_errSecDecode, 0, "PKCS#12 data too large");
    pthread_once(&providers_once, load_providers);
    if (!p12_ctx)
        return fail(err, KC_errSecAllocate, 0, "no OpenSSL library context");
    previous = OSSL_LIB_CTX_set0_default(p12_ctx); /* this thread only */
    ERR_clear_error();
    if (!(c.certs = sk_X509_new_null())) {
        st = fail(err, KC_errSecAllocate, 0, "out of memory");
        goto out;
    }
    if (!(p12 = d2i_PKCS12(NULL, &p, (long)len))) {
        st = fail_ssl(err, KC_errSecDecode, "not a PKCS#12 file");
        goto out;
    }
    c.pass = password ? password : "";
    c.pass_len = (int)strlen(c.pass);
    if ((c.has_mac = PKCS12_mac_present(p12))) {
        PKCS12_get0_mac(NULL, &mac_alg, NULL, &mac_iter, p12);
        if (mac_iter && (ASN1_INTEGER_get(mac_iter) < 1 ||
                         ASN1_INTEGER_get(mac_iter) > MAX_KDF_ITERATIONS)) {
            st = fail(err, KC_errSecDecode, 0,
                      "the PKCS#12 MAC asks for %ld key derivation iterations "
                      "(limit %d)", ASN1_INTEGER_get(mac_iter), MAX_KDF_ITERATIONS);
            goto out;
        }
        /* an empty password is also tried as "no password", as
         * PKCS12_parse does: producers write either */
        if (!*c.pass && !PKCS12_verify_mac(p12, "", 0) &&
            PKCS12_verify_mac(p12, NULL, 0)) {
            c.pass = NULL;
        } else if (!PKCS12_verify_mac(p12, c.pass, c.pass_len)) {
            ERR_clear_error();
            st = fail(err, KC_errSecPkcs12VerifyFailure, 0,
                      "wrong password for the PKCS#12 file "
                      "(MAC verification failed)");
            goto out;
        }
    }
    if (!(safes = PKCS12_unpack_authsafes(p12))) {
        st = fail_ssl(err, KC_errSecDecode, "cannot read the PKCS#12 contents");
        goto out;
    }
    for (i = 0; i < sk_PKCS7_num(safes) && !st; i++) {
        p7 = sk_PKCS7_value(safes, i);
        if (OBJ_obj2nid(p7->type) == NID_pkcs7_data) {
            bags = PKCS12_unpack_p7data(p7);
        } else if (OBJ_obj2nid(p7->type) == NID_pkcs7_encrypted) {
            if (!p7->d.encrypted || !p7->d.encrypted->enc_data ||
                (st = check_kdf(p7->d.encrypted->enc_data->algorithm,
                                "encrypted part", err)))
                break;
            if (!(bags = PKCS12_unpack_p7encdata(p7, c.pass, c.pass_len))) {
                st = fail_decrypt(&c, err);
                break;
            }
        } else {
            continue; /* enveloped data: public-key protected, unsupported */
        }
        if (!bags) {
            st = fail_ssl(err, KC_errSecDecode, "cannot read the PKCS#12 contents");
            break;
        }
        st = read_bags(bags, &c, 0, err);
        sk_PKCS12_SAFEBAG_pop_free(bags, PKCS12_SAFEBAG_free);
    }
    if (!st && c.keys > 1)
        st = fail(err, KC_errSecDecode, 0,
                  "the PKCS#12 file holds %d private keys; keychain_ext "
                  "imports one identity per file", c.keys);
    if (st)
        goto out;
    out->key = c.key;
    c.key = NULL;
    /* the certificate of the key (others are its chain) */
    for (i = 0; out->key && i < sk_X509_num(c.certs); i++)
        if (X509_check_private_key(sk_X509_value(c.certs, i), out->key)) {
            out->cert = sk_X509_value(c.certs, i);
            X509_up_ref(out->cert);
            break;
        }
out:
    EVP_PKEY_free(c.key);
    sk_X509_pop_free(c.certs, X509_free);
    sk_PKCS7_pop_free(safes, PKCS7_free);
    PKCS12_free(p12);
    if (st)
        free_identity(out);
    ERR_clear_error();
    OSSL_LIB_CTX_set0_default(previous);
    return st;
}

/* Subject (RFC 2253) and common name of a certificate, as UTF-8. */
void describe_name(const X509_NAME *name, kc_item_info *info)
{
    BIO *bio = BIO_new(BIO_s_mem());
    int i, n;
    unsigned char *cn = NULL;

    if (bio) {
        X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
        n = BIO_read(bio, info->subject, sizeof info->subject - 1);
        info->subject[n > 0 ? n : 0] = 0;
        BIO_free(bio);
    }
    i = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
    if (i >= 0) {
        n = ASN1_STRING_to_UTF8(
            &cn, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i)));
        if (n >= 0)
            snprintf(info->common_name, sizeof info->common_name, "%.*s", n,
                     (const char *)cn);
        OPENSSL_free(cn);
    }
    ERR_clear_error();
}

void free_blob(blob *b)
{
    OPENSSL_clear_free(b->p, (size_t)(b->n > 0 ? b->n : 0));
    b->p = NULL;
    b->n = 0;
}

/* A big number parameter of the key, big-endian, left-padded to pad bytes
 * (0: minimal length). */
int bn_blob(EVP_PKEY *key, const char *name, int pad, blob *b)
{
    BIGNUM *bn = NULL;
    if (!EVP_PKEY_get_bn_param(key, name, &bn))
        return 0;
    b->n = pad ? pad : BN_num_bytes(bn);
    b->p = OPENSSL_malloc(b->n ? (size_t)b->n : 1);
    if (b->p && BN_bn2binpad(bn, b->p, b->n) < 0)
        free_blob(b);
    BN_clear_free(bn);
    return b->p != NULL;
}
