/*
 * fuzz_p12.c -- libFuzzer target over the PKCS#12 parsing and import path of
 * the PKCS#11 backend (kc_preauth_key -> copy_identity_from_pkcs12 ->
 * create_cert / create_key on a SoftHSM2 token -> kc_kill_key).
 *
 * The backend's sources (csrc/build_ffi.py PKCS11_SOURCES) are compiled
 * into this target, so they are instrumented for coverage and sanitizers
 * along with the harness.
 *
 * Environment (nothing secret in argv):
 *   KEYCHAIN_EXT_MODULE    PKCS#11 module (SoftHSM2)
 *   KEYCHAIN_EXT_TOKEN     label of a throwaway, initialized token
 *   KEYCHAIN_EXT_TEST_PIN  its user PIN, or
 *   KEYCHAIN_EXT_PIN_FILE  a file holding it (first line)
 *   KC_FUZZ_REMAC          "0" disables the second call described below
 *
 * For every input:
 *   1. kc_preauth_key(kc, data, size, "pw", "fuzz", KC_PREAUTH_EPHEMERAL)
 *   2. if that failed the MAC check and the bytes decode as a PKCS#12
 *      structure, the same structure with its MAC recomputed for "pw" is imported too: without this nearly
 *      every mutation stops at the MAC check and never reaches the bag
 *      parsing, decryption, key conversion and C_CreateObject code behind it.
 * Each call must end in success (then kc_kill_key must succeed) or in one of
 * the statuses keychain.h documents for kc_preauth_key, with err filled
 * (same status, non-empty message); afterwards kc_lookup_keychain_item must
 * report errSecItemNotFound.  Anything else abort()s, which libFuzzer
 * reports as a crash with the input saved.
 *
 * Build: see tests/fuzz/run.
 */
#include "keychain.h"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pkcs12.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_LABEL "fuzz"
#define FUZZ_PASSWORD "pw"

static kc_keychain *fuzz_kc;
static int fuzz_remac = 1;

static void die(const char *what, int32_t st, const kc_error *err)
{
    fprintf(stderr, "fuzz_p12: %s (status %d, native %lld, message '%s')\n",
            what, (int)st, err ? (long long)err->native_code : 0LL,
            err ? err->message : "");
    abort();
}

static char *read_pin(void)
{
    const char *env = getenv("KEYCHAIN_EXT_TEST_PIN");
    const char *path = getenv("KEYCHAIN_EXT_PIN_FILE");
    char buf[256];
    FILE *f;
    size_t n;

    if (env && *env)
        return strdup(env);
    if (!path || !*path) {
        fprintf(stderr, "fuzz_p12: set KEYCHAIN_EXT_TEST_PIN or "
                        "KEYCHAIN_EXT_PIN_FILE\n");
        abort();
    }
    if (!(f = fopen(path, "r"))) {
        fprintf(stderr, "fuzz_p12: cannot read the PIN file\n");
        abort();
    }
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    buf[strcspn(buf, "\r\n")] = 0;
    char *pin = strdup(buf);
    OPENSSL_cleanse(buf, sizeof buf);
    return pin;
}

static void open_once(void)
{
    kc_options opts;
    kc_error err;
    int32_t st;
    char *pin;
    const char *remac = getenv("KC_FUZZ_REMAC");

    if (fuzz_kc)
        return;
    if (remac && strcmp(remac, "0") == 0)
        fuzz_remac = 0;
    memset(&opts, 0, sizeof opts);
    memset(&err, 0, sizeof err);
    opts.module = getenv("KEYCHAIN_EXT_MODULE");
    opts.token = getenv("KEYCHAIN_EXT_TOKEN");
    if (!opts.module || !opts.token) {
        fprintf(stderr, "fuzz_p12: set KEYCHAIN_EXT_MODULE and "
                        "KEYCHAIN_EXT_TOKEN\n");
        abort();
    }
    pin = read_pin();
    opts.pin = pin;
    st = kc_open(&opts, &fuzz_kc, &err);
    OPENSSL_cleanse(pin, strlen(pin));
    free(pin);
    if (st)
        die("kc_open failed", st, &err);
    /* the token must start empty under our label */
    st = kc_lookup_keychain_item(fuzz_kc, FUZZ_LABEL, NULL, &err);
    if (st != KC_errSecItemNotFound)
        die("the token already holds the fuzz label", st, &err);
}

/* The statuses keychain.h documents for a kc_preauth_key failure on a store
 * that holds nothing under the label. */
static int documented(int32_t st)
{
    switch (st) {
    case KC_errSecPkcs12VerifyFailure: /* wrong password */
    case KC_errSecDecode:              /* not PKCS#12 / no key / no cert */
    case KC_errSecParam:
    case KC_errSecUnimplemented:       /* key type the store cannot hold */
        return 1;
    default:
        return 0;
    }
}

/* Returns the status of kc_preauth_key. */
static int32_t import_one(const uint8_t *data, size_t size)
{
    int32_t result;
    kc_item_info info;
    kc_error err;
    int32_t st;

    memset(&err, 0, sizeof err);
    memset(&info, 0, sizeof info);
    st = kc_preauth_key(fuzz_kc, data, size, FUZZ_PASSWORD, FUZZ_LABEL,
                        KC_PREAUTH_EPHEMERAL, &info, &err);
    result = st;
    if (st == KC_errSecSuccess) {
        if (!info.has_certificate || !info.has_private_key ||
            info.key_id_len != SHA_DIGEST_LENGTH || !info.ephemeral ||
            strcmp(info.label, FUZZ_LABEL) != 0)
            die("preauth succeeded with an inconsistent kc_item_info", st,
                &err);
        memset(&err, 0, sizeof err);
        st = kc_kill_key(fuzz_kc, FUZZ_LABEL, 0, &err);
        if (st != KC_errSecSuccess)
            die("kc_kill_key after a successful import failed", st, &err);
    } else {
        if (!documented(st))
            die("kc_preauth_key returned an undocumented status", st, &err);
        if (err.status != st)
            die("kc_error.status differs from the returned status", st, &err);
        if (err.message[0] == 0)
            die("kc_preauth_key failed with an empty message", st, &err);
        if (memchr(err.message, 0, sizeof err.message) == NULL)
            die("kc_error.message is not NUL-terminated", st, &err);
    }
    memset(&err, 0, sizeof err);
    st = kc_lookup_keychain_item(fuzz_kc, FUZZ_LABEL, &info, &err);
    if (st != KC_errSecItemNotFound)
        die("an identity was left on the token", st, &err);
    return result;
}

/* The input re-encoded with a MAC for FUZZ_PASSWORD (1 iteration, SHA-1:
 * cheap), or NULL when it is no PKCS#12 structure. */
static unsigned char *remac(const uint8_t *data, size_t size, int *out_len)
{
    const unsigned char *p = data;
    PKCS12 *p12;
    unsigned char *der = NULL;

    *out_len = 0;
    if (size == 0 || size > 1 << 20)
        return NULL;
    p12 = d2i_PKCS12(NULL, &p, (long)size);
    if (!p12) {
        ERR_clear_error();
        return NULL;
    }
    if (PKCS12_set_mac(p12, FUZZ_PASSWORD, -1, NULL, 0, 1, EVP_sha1()))
        *out_len = i2d_PKCS12(p12, &der);
    PKCS12_free(p12);
    ERR_clear_error();
    if (*out_len <= 0) {
        OPENSSL_free(der);
        return NULL;
    }
    return der;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *again;
    int again_len;

    open_once();
    /* only a MAC failure leaves code behind the MAC unreached */
    if (import_one(data, size) == KC_errSecPkcs12VerifyFailure && fuzz_remac &&
        (again = remac(data, size, &again_len)) != NULL) {
        import_one(again, (size_t)again_len);
        OPENSSL_free(again);
    }
    return 0;
}
