/*
 * fuzz_p12_walk.c -- libFuzzer target for csrc/p12_walk.c, the Darwin
 * backend's bounded walk over a PKCS#12 file (no OpenSSL, no keychain).
 * Any input must end in errSecSuccess or errSecDecode with a message;
 * ASan and UBSan catch any read past the input.  Built and run by
 * tests/test_darwin_logic.py (a short smoke run).
 */
#include <stdint.h>
#include <stdlib.h>

#include "p12_walk.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kc_error err;
    int32_t st;

    err.message[0] = '\0';
    st = kc_p12_check_kdf(data, size, &err);
    if (st != KC_errSecSuccess && st != KC_errSecDecode)
        abort();
    if (st != KC_errSecSuccess && err.message[0] == '\0')
        abort();
    return 0;
}
