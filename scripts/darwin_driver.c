/*
 * darwin_driver.c -- a tiny program linked by scripts/check-darwin so that
 * every kc_* symbol of the Darwin backend is resolved against the macOS
 * SDK's Security and CoreFoundation stubs.  It is only linked, never run
 * here; run on a Mac it prints the backend and opens the default search list.
 */
#include <stdio.h>

#include "keychain.h"

int main(int argc, char **argv)
{
    kc_keychain *kc = NULL;
    kc_item_info info;
    kc_error err;
    size_t count = 0;
    const char *label = argc > 1 ? argv[1] : "keychain-ext-check";
    int32_t status;

    printf("%s %s\n", kc_backend(), kc_version());
    status = kc_open(NULL, &kc, &err);
    if (status != KC_errSecSuccess) {
        printf("kc_open: %s\n", err.message);
        return 1;
    }
    status = kc_lookup_keychain_item(kc, label, &info, &err);
    printf("lookup %s: %d\n", label, (int)status);
    /* Referenced so the linker must resolve them; the arguments are
     * refused before any keychain is touched. */
    if (argc > 2) {
        kc_preauth_key(kc, NULL, 0, NULL, label, 0, NULL, &err);
        kc_kill_key(kc, label, 0, &err);
        kc_list_items(kc, NULL, 0, &count, &err);
        kc_reclaim_stale(kc, label, &err);
        kc_init_token(NULL, NULL, NULL, NULL, &err);
    }
    kc_close(kc);
    return 0;
}
