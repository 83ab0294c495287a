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
#include <openssl/provider.h>

#define MAX_MAC_ITERATIONS 2000000 /* OpenSSL writes 2048, others ~600000 */

static pthread_once_t providers_once = PTHREAD_ONCE_INIT;

/* `openssl pkcs12 -export -legacy` files use RC2-40: the legacy provider.
 * retain_fallbacks keeps the default provider available too. */
static OSSL_PROVIDER *legacy_provider; /* loaded once, for the process */

static void load_providers(void)
{
    legacy_provider = OSSL_PROVIDER_try_load(NULL, "legacy", 1);
    ERR_clear_error();
}

void free_identity(identity *id)
{
    EVP_PKEY_free(id->key);
    X509_free(id->cert);
    memset(id, 0, sizeof *id);
}

/* Decode the PKCS#12 bytes and decrypt them with the password: *out gets
 * the private key and its certificate (either may be NULL if the file has
 * none).  Statuses: errSecDecode, errSecPkcs12VerifyFailure. */
int32_t parse_pkcs12(const uint8_t *data, size_t len, const char *password,
                     identity *out, kc_error *err)
{
    const unsigned char *p = data;
    const char *pass = password ? password : "";
    PKCS12 *p12 = NULL;
    STACK_OF(X509) *ca = NULL;
    const ASN1_INTEGER *mac_iter = NULL;
    int32_t st = KC_errSecSuccess;

    pthread_once(&providers_once, load_providers);
    ERR_clear_error();
    if (!data || len == 0)
        return fail(err, KC_errSecDecode, 0, "empty PKCS#12 data");
    if (len > 16 * 1024 * 1024)
        return fail(err, KC_errSecDecode, 0, "PKCS#12 data too large");
    p12 = d2i_PKCS12(NULL, &p, (long)len);
    if (!p12) {
        st = fail_ssl(err, KC_errSecDecode, "not a PKCS#12 file");
        goto out;
    }
    /* an untrusted file must not buy minutes of CPU with its MAC */
    PKCS12_get0_mac(NULL, NULL, NULL, &mac_iter, p12);
    if (mac_iter && ASN1_INTEGER_get(mac_iter) > MAX_MAC_ITERATIONS) {
        st = fail(err, KC_errSecDecode, 0,
                  "PKCS#12 MAC iteration count %ld is above the limit of %d",
                  ASN1_INTEGER_get(mac_iter), MAX_MAC_ITERATIONS);
        goto out;
    }
    /* PKCS12_parse checks the MAC itself (an empty password also as "no
     * password"): checking it here first would cost the PBKDF twice */
    if (!PKCS12_parse(p12, pass, &out->key, &out->cert, &ca)) {
        if (ERR_GET_REASON(ERR_peek_last_error()) == PKCS12_R_MAC_VERIFY_FAILURE) {
            ERR_clear_error();
            st = fail(err, KC_errSecPkcs12VerifyFailure, 0,
                      "wrong password for the PKCS#12 file "
                      "(MAC verification failed)");
        } else {
            st = fail_ssl(err, KC_errSecDecode,
                          "cannot decrypt the PKCS#12 file");
        }
        goto out;
    }
out:
    sk_X509_pop_free(ca, X509_free);
    PKCS12_free(p12);
    if (st)
        free_identity(out);
    ERR_clear_error();
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
