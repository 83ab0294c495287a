/*
 * walk_files.c -- prints "<status> <file>" for csrc/p12_walk.c's verdict on
 * each PKCS#12 file named in argv (tests/test_darwin_logic.py feeds it real
 * files from OpenSSL and cryptography).
 */
#include <stdio.h>
#include <stdlib.h>

#include "p12_walk.h"

int main(int argc, char **argv)
{
    static uint8_t buf[1 << 20];
    kc_error err;
    int i;

    for (i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        size_t n;

        if (f == NULL)
            return 2;
        n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        err.message[0] = '\0';
        printf("%d %s %s\n", (int)kc_p12_check_kdf(buf, n, &err), argv[i],
               err.message);
    }
    return 0;
}
