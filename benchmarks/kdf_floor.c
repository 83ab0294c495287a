/*
 * kdf_floor.c -- the floor under an encrypted PKCS#12 import: the key
 * derivations a corpus file asks for, done alone with the libcrypto the C
 * layer links (the runner builds it with csrc/build_ffi.py's flags: the
 * system's OpenSSL, or the static one under $KEYCHAIN_EXT_OPENSSL).
 *
 * Settings on standard input, one key=value per line:
 *   pbkdf2=N      iterations of each PKCS5_PBKDF2_HMAC (SHA-256, 32 bytes)
 *   bags=K        how many (one per encrypted bag; default 2: key and cert)
 *   mac=M         iterations of the MAC's PKCS#12 KDF (SHA-256; 0 = none)
 *   iterations=R  samples
 * Output, one JSON object: openssl (the version linked), samples_ms.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pkcs12.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(void) {
    long pbkdf2 = 0, bags = 2, mac = 0, reps = 1;
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        long *slot = !strncmp(line, "pbkdf2=", 7) ? &pbkdf2
                     : !strncmp(line, "bags=", 5) ? &bags
                     : !strncmp(line, "mac=", 4) ? &mac
                     : !strncmp(line, "iterations=", 11) ? &reps
                                                          : NULL;
        if (slot)
            *slot = strtol(strchr(line, '=') + 1, NULL, 10);
    }
    if (pbkdf2 < 1 || bags < 0 || mac < 0 || reps < 1 || pbkdf2 > 100000000 || mac > 100000000) {
        printf("{\"error\": \"bad settings\"}\n");
        return 2;
    }
    static const char pass[] = "kdf-floor";
    static const unsigned char salt[16] = "0123456789abcdef";
    unsigned char key[32];
    printf("{\"openssl\": \"%s\", \"samples_ms\": [", OpenSSL_version(OPENSSL_VERSION));
    for (long r = 0; r < reps; r++) {
        double t0 = now_ms();
        for (long b = 0; b < bags; b++)
            if (!PKCS5_PBKDF2_HMAC(pass, sizeof pass - 1, salt, sizeof salt, (int)pbkdf2,
                                   EVP_sha256(), sizeof key, key))
                return 1;
        if (mac && !PKCS12_key_gen_utf8(pass, sizeof pass - 1, (unsigned char *)salt, 8,
                                        PKCS12_MAC_ID, (int)mac, sizeof key, key, EVP_sha256()))
            return 1;
        printf("%s%.4f", r ? ", " : "", now_ms() - t0);
    }
    printf("]}\n");
    return 0;
}
