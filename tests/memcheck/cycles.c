/*
 * cycles.c -- drive the PKCS#11 backend through N preauth/lookup/kill
 * cycles, for valgrind memcheck (tests/test_memcheck.py).
 *
 *   cycles [-n N] [-m mixed|ephemeral|token] [-s] P12_FILE
 *
 * Environment (nothing secret in argv):
 *   KEYCHAIN_EXT_MODULE             PKCS#11 module (SoftHSM2)
 *   KEYCHAIN_EXT_TOKEN              label of an initialized token
 *   KEYCHAIN_EXT_STATE_DIR          its state directory (lock, leases)
 *   KEYCHAIN_EXT_TEST_PIN           its user PIN, or
 *   KEYCHAIN_EXT_PIN_FILE           a file holding it (first line)
 *   KEYCHAIN_EXT_TEST_P12_PASSWORD  the password of P12_FILE
 *
 * Each cycle: preauth (ephemeral or token objects: -m mixed alternates),
 * lookup (must find certificate and key), a second preauth under the same
 * label (must be refused: errSecDuplicateItem), a preauth with a wrong
 * password (errSecPkcs12VerifyFailure), list, kill, lookup
 * (errSecItemNotFound).  So the error paths run as often as the good ones.
 * -s (short): only preauth, lookup, kill, lookup -- a third of the work,
 * for the long runs.
 * Exit status 0 when every cycle behaved, 1 otherwise, 2 on bad usage.
 */
#include "keychain.h"

#include <openssl/crypto.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LABEL "memcheck"

static int expect(int32_t st, int32_t want, const char *what, long cycle,
                  const kc_error *err)
{
    if (st == want)
        return 1;
    fprintf(stderr, "cycles: cycle %ld: %s returned %d, expected %d (%s)\n",
            cycle, what, (int)st, (int)want, err ? err->message : "");
    return 0;
}

static char *read_file(const char *path, size_t *len, size_t max)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    if (!f)
        return NULL;
    buf = malloc(max + 1);
    if (buf)
        *len = fread(buf, 1, max, f);
    fclose(f);
    if (buf)
        buf[*len] = 0;
    return buf;
}

static void free_secret(char *s, size_t len)
{
    if (s) {
        OPENSSL_cleanse(s, len);
        free(s);
    }
}

int main(int argc, char **argv)
{
    long n = 200, i, failed = 0;
    const char *mode = "mixed";
    const char *pin_env = getenv("KEYCHAIN_EXT_TEST_PIN");
    const char *pin_file = getenv("KEYCHAIN_EXT_PIN_FILE");
    const char *password = getenv("KEYCHAIN_EXT_TEST_P12_PASSWORD");
    char *pin = NULL, *p12;
    size_t pin_len = 0, p12_len = 0;
    kc_options opts;
    kc_keychain *kc = NULL;
    kc_item_info info, list[4];
    kc_error err;
    size_t count;
    int32_t st;
    int opt, short_cycles = 0;
    struct timespec t0, t1;

    while ((opt = getopt(argc, argv, "n:m:s")) != -1) {
        if (opt == 's')
            short_cycles = 1;
        else if (opt == 'n')
            n = strtol(optarg, NULL, 10);
        else if (opt == 'm')
            mode = optarg;
        else
            return 2;
    }
    if (optind != argc - 1 || n < 0 ||
        (strcmp(mode, "mixed") && strcmp(mode, "ephemeral") &&
         strcmp(mode, "token"))) {
        fprintf(stderr, "usage: cycles [-n N] [-m mixed|ephemeral|token] "
                        "[-s] P12_FILE\n");
        return 2;
    }
    if (!password) {
        fprintf(stderr, "cycles: set KEYCHAIN_EXT_TEST_P12_PASSWORD\n");
        return 2;
    }
    if (pin_env && *pin_env) {
        pin = strdup(pin_env);
        pin_len = pin ? strlen(pin) : 0;
    } else if (pin_file && (pin = read_file(pin_file, &pin_len, 255))) {
        pin[strcspn(pin, "\r\n")] = 0;
    }
    if (!pin) {
        fprintf(stderr, "cycles: set KEYCHAIN_EXT_TEST_PIN or "
                        "KEYCHAIN_EXT_PIN_FILE\n");
        return 2;
    }
    if (!(p12 = read_file(argv[optind], &p12_len, 1 << 20))) {
        fprintf(stderr, "cycles: cannot read %s\n", argv[optind]);
        free_secret(pin, pin_len);
        return 2;
    }

    memset(&opts, 0, sizeof opts);
    memset(&err, 0, sizeof err);
    opts.module = getenv("KEYCHAIN_EXT_MODULE");
    opts.token = getenv("KEYCHAIN_EXT_TOKEN");
    opts.state_dir = getenv("KEYCHAIN_EXT_STATE_DIR");
    opts.pin = pin;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    st = kc_open(&opts, &kc, &err);
    free_secret(pin, pin_len);
    if (st) {
        fprintf(stderr, "cycles: kc_open: %d (%s)\n", (int)st, err.message);
        free_secret(p12, p12_len);
        return 1;
    }

    for (i = 0; i < n && failed < 5; i++) {
        int ephemeral = strcmp(mode, "ephemeral") == 0 ||
                        (strcmp(mode, "mixed") == 0 && (i & 1));
        int flags = ephemeral ? KC_PREAUTH_EPHEMERAL : 0;
        int ok = 1;

        st = kc_preauth_key(kc, (const uint8_t *)p12, p12_len, password, LABEL,
                            flags, &info, &err);
        ok &= expect(st, 0, "kc_preauth_key", i, &err);
        st = kc_lookup_keychain_item(kc, LABEL, &info, &err);
        ok &= expect(st, 0, "kc_lookup_keychain_item", i, &err);
        if (st == 0 && (!info.has_certificate || !info.has_private_key ||
                        info.ephemeral != ephemeral)) {
            fprintf(stderr, "cycles: cycle %ld: lookup reports cert %d key %d "
                            "ephemeral %d\n", i, info.has_certificate,
                    info.has_private_key, info.ephemeral);
            ok = 0;
        }
        if (short_cycles)
            goto kill;
        st = kc_preauth_key(kc, (const uint8_t *)p12, p12_len, password, LABEL,
                            flags, NULL, &err);
        ok &= expect(st, KC_errSecDuplicateItem, "duplicate kc_preauth_key", i,
                     &err);
        st = kc_preauth_key(kc, (const uint8_t *)p12, p12_len, "wrong", "other",
                            flags, NULL, &err);
        ok &= expect(st, KC_errSecPkcs12VerifyFailure,
                     "wrong-password kc_preauth_key", i, &err);
        st = kc_list_items(kc, list, 4, &count, &err);
        ok &= expect(st, 0, "kc_list_items", i, &err);
        if (st == 0 && count != 1) {
            fprintf(stderr, "cycles: cycle %ld: %zu items listed\n", i, count);
            ok = 0;
        }
    kill:
        st = kc_kill_key(kc, LABEL, 0, &err);
        ok &= expect(st, 0, "kc_kill_key", i, &err);
        st = kc_lookup_keychain_item(kc, LABEL, &info, &err);
        ok &= expect(st, KC_errSecItemNotFound, "kc_lookup_keychain_item after "
                     "kill", i, &err);
        if (!ok)
            failed++;
    }
    kc_close(kc);
    free_secret(p12, p12_len);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("cycles: %ld run, %ld failed, mode %s, %.1f s\n", i, failed, mode,
           (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    fflush(stdout); /* before LeakSanitizer's report at exit */
    return failed ? 1 : 0;
}
