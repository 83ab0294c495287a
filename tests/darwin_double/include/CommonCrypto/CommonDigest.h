/*
 * TEST DOUBLE -- NOT Apple's CommonCrypto.
 *
 * Written from scratch for keychain_ext's Linux logic tests: the one
 * CommonCrypto call csrc/keychain_darwin.c uses, with a compatible
 * signature; double.c computes it with OpenSSL's SHA256.
 */
#ifndef KC_TEST_DOUBLE_COMMONDIGEST_H
#define KC_TEST_DOUBLE_COMMONDIGEST_H

#include <stdint.h>

typedef uint32_t CC_LONG;
#define CC_SHA256_DIGEST_LENGTH 32

unsigned char *CC_SHA256(const void *data, CC_LONG len, unsigned char *md);

#endif
