/*
 * driver.c -- runs csrc/keychain_darwin.c (and its darwin_*.c units) against
 * the TEST DOUBLE of Security/CoreFoundation (double.c).  Built and run by
 * tests/test_darwin_logic.py:  driver <scenario>  exits 0 and prints
 * "PASS <scenario> (<n> checks)" when every check held; any failed check
 * prints "FAIL ..." and exits 1; misuse of the framework aborts.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "double_control.h"
#include "keychain.h"
#include "p12_walk.h"

static long checks;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        checks++;                                                           \
        if (!(cond)) {                                                      \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                   \
            fprintf(stderr, "\n");                                          \
            exit(1);                                                        \
        }                                                                   \
    } while (0)

#define INJECTED (-25291)   /* errSecNotAvailable: what the walks inject */

static const uint8_t ID_A[20] = { 0xa1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                  11, 12, 13, 14, 15, 16, 17, 18, 19, 20 };
static char p12[1024];
static size_t p12_len;

static void make_p12(const char *cn, const uint8_t *id, int count, int flags)
{
    p12_len = dbl_make_p12(p12, sizeof p12, cn, "s3cret", id, 20, count,
                           flags);
}

static kc_keychain *open_default(void)
{
    kc_keychain *kc = NULL;
    kc_error err;

    CHECK(kc_open(NULL, &kc, &err) == 0, "kc_open: %s", err.message);
    return kc;
}

static int32_t preauth(kc_keychain *kc, const char *label, kc_item_info *info,
                       kc_error *err)
{
    return kc_preauth_key(kc, (const uint8_t *)p12, p12_len, "s3cret", label,
                          0, info, err);
}

/* Index of the first logged call starting with prefix, from `from`; -1. */
static int find_call(const char *prefix, int from)
{
    int i;

    for (i = from; i < dbl_calls(); i++)
        if (strncmp(dbl_call(i), prefix, strlen(prefix)) == 0)
            return i;
    return -1;
}

static void dump_log(void)
{
    int i;

    for (i = 0; i < dbl_calls(); i++)
        fprintf(stderr, "  %d %s\n", i + 1, dbl_call(i));
}

/* Calls whose failure must come back as the status, never be taken for
 * "not found" or ignored. */
static int must_propagate(const char *call)
{
    static const char *const names[] = {
        "SecItemCopyMatching", "SecItemDelete", "SecKeychain",
        "SecAccessCreate", "SecPKCS12Import",
    };
    size_t i;

    for (i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strncmp(call, names[i], strlen(names[i])) == 0)
            return 1;
    return 0;
}

static void check_balanced(const char *where)
{
    CHECK(dbl_outstanding() == 0, "%s: %ld CF references not released",
          where, dbl_outstanding());
}

/* --- scenarios ----------------------------------------------------------- */

static void roundtrip_with(Boolean initial, int cstring_ptr)
{
    kc_keychain *kc;
    kc_item_info info;
    kc_error err;

    dbl_reset();
    dbl_set_interaction(initial);
    dbl_set_cstring_ptr(cstring_ptr);
    make_p12("alice", ID_A, 1, 0);
    kc = open_default();
    CHECK(preauth(kc, "alice", &info, &err) == 0, "preauth: %s", err.message);
    CHECK(dbl_interaction_at_import() == 0, "interaction was allowed during "
          "the import");
    CHECK(dbl_interaction() == initial, "flag not restored to %d", initial);
    CHECK(info.has_certificate && info.has_private_key, "info incomplete");
    CHECK(strcmp(info.label, "alice") == 0, "label '%s'", info.label);
    CHECK(strcmp(info.common_name, "alice") == 0, "cn '%s'", info.common_name);
    CHECK(strcmp(info.subject, "alice") == 0, "subject '%s'", info.subject);
    CHECK(info.key_id_len == 20 && memcmp(info.key_id, ID_A, 20) == 0,
          "key id not the imported one");
    CHECK(info.key_type == KC_KEY_RSA, "key type %d", info.key_type);
    CHECK(info.ours && info.mine && info.owner_alive == 1
          && info.owner_pid == (int64_t)getpid() && info.owners == 1
          && !info.held, "owner record not reported");
    CHECK(dbl_count('g', -1) == 1, "no owner record");
    CHECK(dbl_count('c', -1) == 1 && dbl_count('k', -1) == 1, "store");

    memset(&info, 0, sizeof info);
    CHECK(kc_lookup_keychain_item(kc, "alice", &info, &err) == 0,
          "lookup: %s", err.message);
    CHECK(info.has_private_key && info.key_id_len == 20, "lookup info");
    CHECK(kc_kill_key(kc, "alice", 0, &err) == 0, "kill: %s", err.message);
    CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0,
          "kill left items behind");
    CHECK(kc_lookup_keychain_item(kc, "alice", &info, &err) == -25300,
          "lookup after kill");
    CHECK(err.status == -25300 && err.message[0] != '\0', "error not filled");
    CHECK(kc_kill_key(kc, "alice", 0, &err) == -25300, "second kill");
    CHECK(dbl_interaction() == initial, "flag changed by kill/lookup");
    kc_close(kc);
    check_balanced("roundtrip");
    CHECK(dbl_created() > 10, "the double saw only %ld objects",
          dbl_created());
}

static void roundtrip(void)
{
    roundtrip_with(true, 0);
    roundtrip_with(false, 0);
    roundtrip_with(true, 1);
}

static void duplicate(void)
{
    kc_keychain *kc;
    kc_error err;
    int32_t st;
    static const uint8_t other[20] = { 0xbb };

    dbl_reset();
    make_p12("alice", ID_A, 1, 0);
    kc = open_default();
    CHECK(preauth(kc, "alice", NULL, &err) == 0, "preauth: %s", err.message);
    dbl_log_clear();
    st = preauth(kc, "alice", NULL, &err);
    CHECK(st == -25299, "second preauth returned %d", (int)st);
    CHECK(err.status == -25299 && strstr(err.message, "already") != NULL,
          "message '%s'", err.message);
    CHECK(find_call("SecPKCS12Import", 0) < 0, "imported anyway");
    CHECK(dbl_interaction() == true, "interaction flag not restored");
    CHECK(dbl_count('c', -1) == 1 && dbl_count('k', -1) == 1,
          "store changed");
    /* RECLAIM_STALE: the owner (this process) runs: still refused. */
    st = kc_preauth_key(kc, (const uint8_t *)p12, p12_len, "s3cret", "alice",
                        KC_PREAUTH_RECLAIM_STALE, NULL, &err);
    CHECK(st == -25299, "reclaim-stale preauth returned %d", (int)st);
    CHECK(kc_kill_key(kc, "alice", 0, &err) == 0, "kill: %s", err.message);

    /* A foreign certificate alone (no key) under the name also refuses. */
    dbl_put("bob", other, 20, 0, 1, 0);
    make_p12("bob", ID_A, 1, 0);
    CHECK(preauth(kc, "bob", NULL, &err) == -25299, "lone cert not refused");
    CHECK(dbl_has_cert("bob", 0) && !dbl_has_key(ID_A, 20), "store changed");
    /* The identity check is case-insensitive like kSecMatchSubjectWholeString */
    dbl_put("Carol", other, 20, 0, 0, 1);
    dbl_put("Carol", other, 20, 0, 1, 0);
    make_p12("carol", ID_A, 1, 0);
    CHECK(preauth(kc, "carol", NULL, &err) == -25299, "Carol not refused");
    kc_close(kc);
    check_balanced("duplicate");
}

static void kill_separately(void)
{
    kc_keychain *kc, *kc2;
    kc_error err;
    int c, k;

    dbl_reset();
    make_p12("alice", ID_A, 1, 0);
    kc = open_default();
    CHECK(preauth(kc, "alice", NULL, &err) == 0, "preauth: %s", err.message);
    dbl_log_clear();
    CHECK(kc_kill_key(kc, "alice", 0, &err) == 0, "kill: %s", err.message);
    c = find_call("SecItemDelete(certificate cn=alice)", 0);
    k = find_call("SecItemDelete(key id=a10203040506070809", 0);
    if (c < 0 || k < 0)
        dump_log();
    CHECK(c >= 0, "certificate not deleted by reference");
    CHECK(k > c, "key not deleted after the certificate by the recorded id");
    CHECK(find_call("SecItemDelete", c + 1) == k
          && find_call("SecItemDelete", k + 1)
             == find_call("SecItemDelete(genp alice)", 0)
          && find_call("SecItemDelete",
                       find_call("SecItemDelete(genp alice)", 0) + 1) < 0,
          "not certificate, key, then the owner record");
    CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0, "left items");

    /* Another handle of this process: the record makes it ours too. */
    CHECK(preauth(kc, "alice", NULL, &err) == 0, "preauth: %s", err.message);
    kc2 = open_default();
    dbl_log_clear();
    CHECK(kc_kill_key(kc2, "alice", 0, &err) == 0, "kill: %s", err.message);
    CHECK(find_call("SecKeyCopyAttributes", 0) >= 0, "no key id lookup");
    CHECK(find_call("SecItemDelete(key id=a10203", 0) >
          find_call("SecItemDelete(certificate cn=alice)", 0),
          "order cert, key");
    CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0, "left items");
    kc_close(kc2);
    /* A foreign identity that now carries the name has no owner record:
     * not ours, left alone. */
    {
        static const uint8_t foreign[20] = { 0xf0, 0x0d };

        dbl_put("alice", foreign, 20, 0, 1, 1);
        dbl_log_clear();
        CHECK(kc_kill_key(kc, "alice", 0, &err) == -25244,
              "a foreign identity was killed: %s", err.message);
        CHECK(find_call("SecItemDelete", 0) < 0, "something was deleted");
        CHECK(dbl_has_cert("alice", 0) && dbl_has_key(foreign, 20),
              "foreign items touched");
    }
    /* A certificate alone under a name, not imported here, is someone
     * else's: only a forced kill deletes it. */
    {
        static const uint8_t lone[20] = { 0xc0, 0x01 };

        dbl_put("bob", lone, 20, 0, 1, 0);
        CHECK(kc_kill_key(kc, "bob", 0, &err) == -25244,
              "a foreign certificate was killed: %s", err.message);
        CHECK(dbl_has_cert("bob", 0), "foreign certificate touched");
        CHECK(kc_kill_key(kc, "bob", KC_KILL_FORCE, &err) == 0,
              "forced kill: %s", err.message);
        CHECK(!dbl_has_cert("bob", 0), "forced kill left the certificate");
    }
    /* An identity of the user's with a key label longer than any key id:
     * lookup reports no id rather than overflowing (ASan runs this). */
    {
        static uint8_t longer[80];
        kc_item_info info;

        memset(longer, 0xab, sizeof longer);
        dbl_put("carol", longer, sizeof longer, 0, 1, 1);
        CHECK(kc_lookup_keychain_item(kc, "carol", &info, &err) == 0,
              "lookup: %s", err.message);
        CHECK(info.key_id_len == 0, "an oversized key id was copied");
        CHECK(kc_kill_key(kc, "carol", KC_KILL_FORCE, &err) == 0, "kill: %s",
              err.message);
    }
    kc_close(kc);
    check_balanced("kill_separately");
}

static void missing_key_id(void)
{
    kc_keychain *kc;
    kc_item_info info;
    kc_error err;

    dbl_reset();
    make_p12("alice", ID_A, 1, DBL_P12_NO_KEYID | DBL_P12_EC);
    kc = open_default();
    CHECK(preauth(kc, "alice", &info, &err) == 0, "preauth: %s", err.message);
    CHECK(info.key_id_len == 20 && memcmp(info.key_id, ID_A, 20) == 0,
          "key id");
    CHECK(info.key_type == KC_KEY_EC, "key type %d", info.key_type);
    dbl_log_clear();
    CHECK(kc_kill_key(kc, "alice", 0, &err) == 0, "kill: %s", err.message);
    CHECK(find_call("SecItemDelete(key id=a10203", 0) >= 0,
          "key not deleted by the id derived at import");
    CHECK(dbl_count('k', -1) == 0, "key left behind");
    kc_close(kc);
    check_balanced("missing_key_id");
}

static void bad_imports(void)
{
    kc_keychain *kc;
    kc_error err;
    int32_t st;

    dbl_reset();
    dbl_set_interaction(false);
    kc = open_default();

    make_p12("alice", ID_A, 0, 0);
    st = preauth(kc, "alice", NULL, &err);
    CHECK(st == -26275, "zero items gave %d", (int)st);
    CHECK(dbl_interaction() == false, "flag not restored");

    make_p12("alice", ID_A, 1, 0);
    st = preauth(kc, "mallory", NULL, &err);
    CHECK(st == -50, "CN mismatch gave %d", (int)st);
    CHECK(strstr(err.message, "'alice'") != NULL, "message '%s'", err.message);
    CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0,
          "mismatched import not rolled back");

    make_p12("alice", ID_A, 2, 0);
    st = preauth(kc, "alice", NULL, &err);
    CHECK(st == -50, "two identities gave %d", (int)st);
    CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0,
          "two-identity import not rolled back");

    make_p12("alice", ID_A, 1, 0);
    st = kc_preauth_key(kc, (const uint8_t *)p12, p12_len, "wrong", "alice",
                        0, NULL, &err);
    CHECK(st == -25264 && err.native_code == -25293,
          "wrong password gave %d/%lld", (int)st, (long long)err.native_code);
    /* SecCopyErrorMessageString's text reaches the message. */
    CHECK(strstr(err.message, "double message for -25293") != NULL,
          "message '%s'", err.message);
    CHECK(strstr(err.message, "wrong") == NULL || strstr(err.message,
          "wrong password?") != NULL, "password leaked into the message");

    st = kc_preauth_key(kc, (const uint8_t *)"garbage", 7, "", "alice", 0,
                        NULL, &err);
    CHECK(st == -26275, "garbage gave %d", (int)st);
    st = kc_preauth_key(kc, (const uint8_t *)p12, p12_len, "s3cret", "alice",
                        KC_PREAUTH_EPHEMERAL, NULL, &err);
    CHECK(st == -4, "ephemeral gave %d", (int)st);
    st = kc_preauth_key(kc, (const uint8_t *)p12, p12_len, "s3cret", "", 0,
                        NULL, &err);
    CHECK(st == -50, "empty label gave %d", (int)st);
    st = kc_preauth_key(kc, NULL, 0, "s3cret", "alice", 0, NULL, NULL);
    CHECK(st == -50, "NULL p12 gave %d", (int)st);
    CHECK(dbl_interaction() == false, "flag not restored");
    CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0, "store");
    kc_close(kc);
    check_balanced("bad_imports");
}

/* Fail every fallible call of a successful preauth in turn. */
static void walk_preauth_with(Boolean initial)
{
    kc_keychain *kc;
    kc_item_info info;
    kc_error err;
    int n, pos, failures = 0;
    int32_t st;

    dbl_reset();
    make_p12("alice", ID_A, 1, 0);
    kc = open_default();
    dbl_log_clear();
    CHECK(preauth(kc, "alice", NULL, &err) == 0, "preauth: %s", err.message);
    n = dbl_calls();
    kc_close(kc);
    CHECK(n > 10, "only %d calls to walk", n);

    for (pos = 1; pos <= n; pos++) {
        int restore_call;

        dbl_reset();
        dbl_set_interaction(initial);
        make_p12("alice", ID_A, 1, 0);
        kc = open_default();
        dbl_log_clear();
        dbl_fail_call(pos, INJECTED);
        memset(&err, 0, sizeof err);
        st = preauth(kc, "alice", &info, &err);
        CHECK(dbl_fired(), "position %d never reached", pos);
        /* the second Set call is the restore; if it fails, the flag is
         * necessarily left as it was set, and that must be reported */
        restore_call = find_call("SecKeychainSetUserInteractionAllowed",
                                 find_call("SecKeychainSetUserInteractionAllowed",
                                           0) + 1) == pos - 1;
        if (restore_call) {
            CHECK(st == INJECTED && strstr(err.message, "restoring") != NULL,
                  "pos %d: failed restore not reported: %d '%s'", pos,
                  (int)st, err.message);
        } else {
            CHECK(dbl_interaction() == initial,
                  "pos %d (%s): flag not restored to %d", pos,
                  dbl_call(pos - 1), initial);
        }
        if (must_propagate(dbl_call(pos - 1)))
            CHECK(st == INJECTED, "pos %d (%s): failure not reported: %d",
                  pos, dbl_call(pos - 1), (int)st);
        if (st != 0) {
            failures++;
            CHECK(err.status == st && err.message[0] != '\0',
                  "pos %d: error not filled", pos);
            CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0,
                  "pos %d (%s): failed preauth left items", pos,
                  dbl_call(pos - 1));
            dbl_fail_call(0, 0);
            CHECK(kc_kill_key(kc, "alice", 0, &err) == -25300,
                  "pos %d: something to kill after a failed preauth", pos);
        } else {
            dbl_fail_call(0, 0);
            CHECK(kc_kill_key(kc, "alice", 0, &err) == 0, "pos %d: kill", pos);
            CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0,
                  "pos %d: items left", pos);
        }
        kc_close(kc);
        if (dbl_outstanding() != 0)
            dump_log();
        CHECK(dbl_outstanding() == 0, "pos %d (%s): %ld references leaked",
              pos, dbl_call(pos - 1), dbl_outstanding());
    }
    CHECK(failures >= n / 2, "only %d of %d injected failures surfaced",
          failures, n);
}

static void walk_preauth(void)
{
    walk_preauth_with(true);
    walk_preauth_with(false);
}

/* Fail every fallible call of kill in turn; a second kill must clean up. */
static void walk_kill(void)
{
    kc_keychain *kc;
    kc_error err;
    int n, pos, failures = 0;
    int32_t st;

    dbl_reset();
    make_p12("alice", ID_A, 1, 0);
    kc = open_default();
    CHECK(preauth(kc, "alice", NULL, &err) == 0, "preauth: %s", err.message);
    dbl_log_clear();
    CHECK(kc_kill_key(kc, "alice", 0, &err) == 0, "kill: %s", err.message);
    n = dbl_calls();
    kc_close(kc);

    for (pos = 1; pos <= n; pos++) {
        dbl_reset();
        make_p12("alice", ID_A, 1, 0);
        kc = open_default();
        CHECK(preauth(kc, "alice", NULL, &err) == 0, "preauth");
        dbl_log_clear();
        dbl_fail_call(pos, INJECTED);
        st = kc_kill_key(kc, "alice", 0, &err);
        CHECK(dbl_fired(), "position %d never reached", pos);
        dbl_fail_call(0, 0);
        if (strcmp(dbl_call(pos - 1), "SecKeychainSetUserInteractionAllowed(1)")
            == 0) {
            /* the restore itself failed: reported, and all else done */
            CHECK(st == INJECTED && dbl_count('g', -1) == 0, "restore");
            dbl_set_interaction(true);
            kc_close(kc);
            continue;
        }
        CHECK(dbl_interaction() == true, "pos %d: flag not restored", pos);
        if (must_propagate(dbl_call(pos - 1)))
            CHECK(st == INJECTED, "pos %d (%s): failure not reported: %d",
                  pos, dbl_call(pos - 1), (int)st);
        if (st != 0) {
            failures++;
            CHECK(err.status == st && err.message[0] != '\0', "error");
            /* what is left is still proven ours: the record goes last */
            CHECK(dbl_count('g', -1) == 1, "pos %d: record gone on failure",
                  pos);
            /* A retry removes what is left, the lone key included. */
            CHECK(kc_kill_key(kc, "alice", 0, &err) == 0, "pos %d: retry: %s",
                  pos, err.message);
        }
        CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0,
              "pos %d: items left", pos);
        kc_close(kc);
        CHECK(dbl_outstanding() == 0, "pos %d (%s): %ld references leaked",
              pos, dbl_call(pos - 1), dbl_outstanding());
    }
    CHECK(failures > 0, "no injected failure surfaced");
}

/* Fail every call of lookup and open: statuses reported, nothing leaked. */
static void walk_lookup_open(void)
{
    kc_keychain *kc;
    kc_item_info info;
    kc_error err;
    kc_options opts = { .token = "/k/throwaway.keychain" };
    int n, pos;
    int32_t st;

    dbl_reset();
    make_p12("alice", ID_A, 1, 0);
    kc = open_default();
    CHECK(preauth(kc, "alice", NULL, &err) == 0, "preauth");
    dbl_log_clear();
    CHECK(kc_lookup_keychain_item(kc, "alice", &info, &err) == 0, "lookup");
    n = dbl_calls();
    for (pos = 1; pos <= n; pos++) {
        dbl_log_clear();
        dbl_fail_call(pos, INJECTED);
        st = kc_lookup_keychain_item(kc, "alice", &info, &err);
        CHECK(st == 0 || st == INJECTED || st == -108,
              "pos %d: lookup gave %d", pos, (int)st);
        dbl_fail_call(0, 0);
        CHECK(dbl_outstanding() == 0, "pos %d (%s): leaked", pos,
              dbl_call(pos - 1));
    }
    kc_close(kc);

    dbl_reset();
    dbl_add_keychain(opts.token);
    dbl_log_clear();
    CHECK(kc_open(&opts, &kc, &err) == 0, "open: %s", err.message);
    n = dbl_calls();
    kc_close(kc);
    for (pos = 1; pos <= n; pos++) {
        dbl_log_clear();
        dbl_fail_call(pos, INJECTED);
        kc = (kc_keychain *)&kc;   /* must be reset to NULL on failure */
        st = kc_open(&opts, &kc, &err);
        dbl_fail_call(0, 0);
        CHECK(st != 0 && kc == NULL && err.status == st,
              "pos %d: open gave %d", pos, (int)st);
        CHECK(dbl_outstanding() == 0, "pos %d: leaked", pos);
    }
}

static void scoped_keychain(void)
{
    kc_keychain *kc, *plain;
    kc_item_info info;
    kc_error err;
    kc_options opts = { .token = "/k/throwaway.keychain" };
    kc_options missing = { .token = "/k/missing.keychain" };
    static const uint8_t other[20] = { 0xcc };
    int idx;

    dbl_reset();
    idx = dbl_add_keychain(opts.token);
    kc = (kc_keychain *)&kc;
    CHECK(kc_open(&missing, &kc, &err) == -25294 && kc == NULL,
          "a missing keychain was not refused");
    CHECK(strstr(err.message, "missing.keychain") != NULL, "message");
    CHECK(kc_open(&opts, &kc, &err) == 0, "open: %s", err.message);
    make_p12("alice", ID_A, 1, 0);
    CHECK(preauth(kc, "alice", NULL, &err) == 0, "preauth: %s", err.message);
    CHECK(dbl_count('c', idx) == 1 && dbl_count('k', idx) == 1
          && dbl_count('c', 0) == 0, "not imported into the opened keychain");
    /* Searches are scoped: an identity in the default keychain is unseen. */
    dbl_put("bob", other, 20, 0, 1, 1);
    CHECK(kc_lookup_keychain_item(kc, "bob", &info, &err) == -25300,
          "scoped lookup saw the default keychain");
    CHECK(kc_kill_key(kc, "bob", 0, &err) == -25300, "scoped kill reached out");
    plain = open_default();
    CHECK(kc_lookup_keychain_item(plain, "bob", &info, &err) == 0,
          "default search list");
    kc_close(plain);
    CHECK(kc_kill_key(kc, "alice", 0, &err) == 0, "kill: %s", err.message);
    CHECK(dbl_count('c', idx) == 0 && dbl_count('k', idx) == 0, "left");
    CHECK(dbl_has_cert("bob", 0) && dbl_has_key(other, 20), "bob touched");
    kc_close(kc);
    check_balanced("scoped_keychain");
}

static void misc_api(void)
{
    kc_keychain *kc;
    kc_error err;
    kc_item_info items[2];
    size_t count = 7;

    dbl_reset();
    CHECK(strcmp(kc_backend(), "darwin") == 0, "backend '%s'", kc_backend());
    CHECK(strcmp(kc_version(), "9.8.7-test") == 0, "version '%s'",
          kc_version());
    kc = open_default();
    CHECK(kc_list_items(kc, items, 2, &count, &err) == 0 && count == 0,
          "list");
    CHECK(kc_init_token("m", "t", "1", "2", &err) == -4, "init_token");
    CHECK(kc_reclaim_stale(kc, "a", &err) == -25300, "reclaim_stale");
    CHECK(kc_reclaim_stale(kc, NULL, &err) == -25244, "reclaim_stale NULL");
    CHECK(kc_open(NULL, NULL, &err) == -50, "open without out");
    CHECK(kc_lookup_keychain_item(NULL, "a", NULL, &err) == -50, "NULL kc");
    CHECK(kc_kill_key(kc, NULL, 0, NULL) == -50, "NULL label");
    kc_close(kc);
    kc_close(NULL);
    check_balanced("misc_api");
}

struct worker { kc_keychain *kc; int n; int32_t failed; };

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    char label[32];
    uint8_t id[20];
    kc_error err;
    int i;

    for (i = 0; i < 25 && w->failed == 0; i++) {
        snprintf(label, sizeof label, "w%d-%d", w->n, i);
        memset(id, 0, sizeof id);
        id[0] = (uint8_t)w->n;
        id[1] = (uint8_t)i;
        id[2] = 0x77;
        /* build the blob locally: the shared buffer is per-thread-unsafe */
        {
            char blob[512];
            size_t len = dbl_make_p12(blob, sizeof blob, label, "pw", id, 20,
                                      1, 0);
            int32_t st = kc_preauth_key(w->kc, (const uint8_t *)blob, len,
                                        "pw", label, 0, NULL, &err);
            if (st == 0)
                st = kc_kill_key(w->kc, label, 0, &err);
            if (st != 0)
                w->failed = st;
        }
    }
    return NULL;
}

/* One handle, four threads: the handle's mutex serializes them. */
static void threads(void)
{
    pthread_t t[4];
    struct worker w[4];
    kc_keychain *kc;
    int i;

    dbl_reset();
    kc = open_default();
    for (i = 0; i < 4; i++) {
        w[i].kc = kc;
        w[i].n = i + 1;
        w[i].failed = 0;
        CHECK(pthread_create(&t[i], NULL, worker_main, &w[i]) == 0, "thread");
    }
    for (i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CHECK(w[i].failed == 0, "thread %d failed with %d", i,
              (int)w[i].failed);
    }
    CHECK(dbl_interaction() == true, "flag");
    CHECK(dbl_count('c', -1) == 0 && dbl_count('k', -1) == 0, "left");
    kc_close(kc);
    check_balanced("threads");
}

/* The checks themselves must bite: a leaked reference is seen ... */
static void selftest_leak_detected(void)
{
    CFStringRef s;

    dbl_reset();
    s = CFStringCreateWithCString(kCFAllocatorDefault, "x",
                                  kCFStringEncodingUTF8);
    CHECK(dbl_outstanding() == 1, "a leaked string was not counted");
    CFRelease(s);
    CHECK(dbl_outstanding() == 0, "a released string still counted");
}

/* The PKCS#12 walk over every truncation and many single-byte changes of
 * a well-formed file, each in a buffer of exactly its size (ASan and
 * valgrind see any read past it): it never crashes, accepts only the
 * whole file, and reports every refusal as errSecDecode with a message. */
static void walk_mutations(void)
{
    static const uint8_t values[] = { 0x00, 0x01, 0x7f, 0x80, 0x81, 0x84,
                                      0xff, 0x30, 0x24, 0xa0 };
    kc_error err;
    uint8_t *copy;
    size_t len, i, v;
    int32_t st;

    dbl_reset();
    make_p12("alice", ID_A, 1, 0);
    CHECK(kc_p12_check_kdf((const uint8_t *)p12, p12_len, &err) == 0,
          "the well-formed file: %s", err.message);
    for (len = 0; len < p12_len; len++) {
        copy = malloc(len + 1);
        CHECK(copy != NULL, "malloc");
        memcpy(copy, p12, len);
        memset(&err, 0, sizeof err);
        st = kc_p12_check_kdf(copy, len, &err);
        CHECK(st == KC_errSecDecode && err.message[0] != '\0',
              "a %zu-byte prefix was accepted (%d)", len, (int)st);
        free(copy);
    }
    for (i = 0; i < p12_len; i++) {
        for (v = 0; v < sizeof values; v++) {
            copy = malloc(p12_len);
            CHECK(copy != NULL, "malloc");
            memcpy(copy, p12, p12_len);
            copy[i] = values[v];
            st = kc_p12_check_kdf(copy, p12_len, &err);
            CHECK(st == 0 || st == KC_errSecDecode, "status %d", (int)st);
            free(copy);
        }
    }
}

/* ... and an over-release aborts (the test expects this to fail). */
static void selftest_overrelease(void)
{
    CFStringRef s;

    dbl_reset();
    s = CFStringCreateWithCString(kCFAllocatorDefault, "x",
                                  kCFStringEncodingUTF8);
    CFRelease(s);
    CFRelease(s);
}

static const struct { const char *name; void (*fn)(void); } scenarios[] = {
    { "roundtrip", roundtrip },
    { "duplicate", duplicate },
    { "kill_separately", kill_separately },
    { "missing_key_id", missing_key_id },
    { "bad_imports", bad_imports },
    { "walk_preauth", walk_preauth },
    { "walk_kill", walk_kill },
    { "walk_lookup_open", walk_lookup_open },
    { "scoped_keychain", scoped_keychain },
    { "misc_api", misc_api },
    { "threads", threads },
    { "walk_mutations", walk_mutations },
    { "selftest_leak_detected", selftest_leak_detected },
    { "selftest_overrelease", selftest_overrelease },
};

int main(int argc, char **argv)
{
    size_t i;
    int all = argc > 1 && strcmp(argv[1], "all") == 0, ran = 0;

    if (argc != 2) {
        fprintf(stderr, "usage: %s <scenario>|all\n", argv[0]);
        return 2;
    }
    for (i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++) {
        /* "all" skips the selftest that must abort */
        if ((all && strcmp(scenarios[i].name, "selftest_overrelease") != 0)
            || strcmp(argv[1], scenarios[i].name) == 0) {
            long before = checks;

            scenarios[i].fn();
            printf("PASS %s (%ld checks)\n", scenarios[i].name,
                   checks - before);
            ran++;
        }
    }
    dbl_reset();   /* frees every double object: what remains is ours */
    if (ran == 0) {
        fprintf(stderr, "unknown scenario %s\n", argv[1]);
        return 2;
    }
    return 0;
}
