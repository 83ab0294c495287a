/*
 * p12_walk.h -- a bounded walk over a PKCS#12 file's DER structure, for the
 * Darwin backend (no OpenSSL there): every key derivation SecPKCS12Import
 * would run is read and capped BEFORE the file reaches it.
 */
#ifndef KEYCHAIN_EXT_P12_WALK_H
#define KEYCHAIN_EXT_P12_WALK_H

#include <stddef.h>
#include <stdint.h>

#include "keychain.h"

/* The same cap as the PKCS#11 backend (p11_openssl.c): OpenSSL writes
 * 2,048 iterations, Java 10,000, cryptography 20,000, NSS 600,000. */
#define KC_P12_MAX_ITERATIONS 2000000

/* Walk the PFX without decrypting anything: the MAC's iteration count
 * (and a PBMAC1 MAC's PBKDF2), and each encrypted part's derivation
 * (PBES2 with PBKDF2, PKCS#12 PBE, PBES1) in the authenticated safe, the
 * shrouded key bags and nested safe-contents bags.  DER and BER (indefinite
 * lengths, constructed OCTET STRINGs) are read; depth and sizes are bounded
 * by the input.  Returns KC_errSecSuccess, or KC_errSecDecode with err
 * filled: not a password-integrity PKCS#12 file, a derivation keychain_ext
 * does not know, or more than KC_P12_MAX_ITERATIONS iterations. */
int32_t kc_p12_check_kdf(const uint8_t *p12, size_t len, kc_error *err);

#endif
