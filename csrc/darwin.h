/*
 * darwin.h -- private header of the Security.framework backend.
 *
 * keychain_darwin.c holds the flow (the Crypto.cpp functions, in the same
 * names and order as keychain_pkcs11.c); these support units hold the rest:
 *
 *   darwin_handle.c  kc_error filling, the user-interaction flag, the store
 *                    lock, kc_open / kc_close / kc_init_token
 *   darwin_record.c  owner records: who owns an identity, and is it alive
 *   p12_walk.c       the bounded PKCS#12 walk (p12_walk.h)
 *
 * Nothing here is exported from the built module (-fvisibility=hidden).
 */
#ifndef KEYCHAIN_EXT_DARWIN_H
#define KEYCHAIN_EXT_DARWIN_H

#include "keychain.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <CommonCrypto/CommonDigest.h>
#include <CoreFoundation/CoreFoundation.h>
#include <Security/Security.h>

/* Silence deprecation warnings around the few legacy keychain calls and
 * constants only (SecAccessCreate, SecKeychain*, the file-keychain search
 * and import options): SDKs from macOS 12 on deprecate them and there is no
 * replacement for file keychains.  Used as a statement-level bracket. */
#define KC_DEPRECATED_BEGIN                                     \
    _Pragma("GCC diagnostic push")                              \
    _Pragma("GCC diagnostic ignored \"-Wdeprecated-declarations\"")
#define KC_DEPRECATED_END _Pragma("GCC diagnostic pop")

struct kc_keychain {
    pthread_mutex_t lock;       /* serializes calls on this handle */
    SecKeychainRef keychain;    /* opts->token opened, or NULL */
    CFArrayRef search_list;     /* [keychain] or NULL = default list */
    int lock_fd;                /* opts->state_dir/lock, or -1 */
};

/* ------------------------------------------------------ darwin_handle.c */

void release(CFTypeRef ref);
void cf_to_cstr(CFStringRef s, char *buf, size_t size);
int32_t fail(kc_error *err, OSStatus status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int32_t fail_native(kc_error *err, OSStatus status, OSStatus native,
                    const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void clear_error(kc_error *err);
int valid_label(const char *label);

/* The user-interaction flag is process-wide: interaction_off and
 * interaction_restore run under interaction_lock. */
extern pthread_mutex_t interaction_lock;
OSStatus interaction_off(Boolean *previous, kc_error *err);
OSStatus interaction_restore(Boolean previous, OSStatus status,
                             kc_error *err);
OSStatus store_lock(kc_keychain *kc, kc_error *err);
void store_unlock(kc_keychain *kc);

/* ------------------------------------------------------ darwin_record.c */

#define MAX_OWNERS 32

typedef struct kc_owner {
    long long pid;
    char host[KC_HOST_MAX];
} kc_owner;

typedef struct kc_record {
    int held;                       /* owned by no process until killed */
    int shared;                     /* processes may join */
    int nowners;                    /* 0 when held */
    kc_owner owners[MAX_OWNERS];
    uint8_t id[KC_KEY_ID_MAX];      /* the imported key's id; 0 long until
                                       the import completed */
    size_t id_len;
    uint8_t p12[CC_SHA256_DIGEST_LENGTH];
} kc_record;

/* create_record_query's modes: RQ_MATCH for update/delete, RQ_ONE /
 * RQ_ALL return attributes. */
enum { RQ_MATCH, RQ_ONE, RQ_ALL };

void my_host(char *buf, size_t size);
CFDictionaryRef create_record_query(kc_keychain *kc, const char *label,
                                    int mode);
OSStatus parse_record(CFDictionaryRef attrs, kc_record *rec);
OSStatus read_record(kc_keychain *kc, const char *label, kc_record *rec);
OSStatus write_record(kc_keychain *kc, const char *label,
                      const kc_record *rec, int add);
OSStatus delete_record(kc_keychain *kc, const char *label);
int one_alive(const kc_owner *o);   /* 1 runs, 0 dead, -1 cannot tell */
int is_me(const kc_owner *o);
int owners_alive(const kc_record *rec, int others_only);
int owner_alive(const kc_record *rec);
int my_index(const kc_record *rec);
void drop_owner(kc_record *rec, int i);
void fill_owner(const kc_record *rec, kc_item_info *out);

#endif
