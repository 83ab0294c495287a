/*
 * double_control.h -- the control side of the TEST DOUBLE of Security and
 * CoreFoundation (not Apple's framework).  Tests use these calls to set up
 * the in-memory store, inject failures and read back what happened.
 */
#ifndef KC_TEST_DOUBLE_CONTROL_H
#define KC_TEST_DOUBLE_CONTROL_H

#include <Security/Security.h>

/* Drop the store, the call log, the counters and every object. */
void dbl_reset(void);

/* Make the n-th fallible call (1-based, counted since the last
 * dbl_log_clear) fail: OSStatus calls return status, calls that return an
 * object return NULL.  n = 0 disables.  dbl_fired() says whether it hit. */
void dbl_fail_call(int n, OSStatus status);
int dbl_fired(void);

/* The fallible calls made since the last dbl_log_clear, in order, each as
 * "Name(detail)".  Every Sec* call and every CF*Create* call is logged. */
void dbl_log_clear(void);
int dbl_calls(void);
const char *dbl_call(int i);

/* The process-wide user-interaction flag, and its value when
 * SecPKCS12Import last ran (-1: it did not run since dbl_reset). */
void dbl_set_interaction(Boolean allowed);
Boolean dbl_interaction(void);
int dbl_interaction_at_import(void);

/* CFStringGetCStringPtr returns NULL unless enabled (real CF may). */
void dbl_set_cstring_ptr(int enabled);

/* Reference accounting over every object that is not a constant. */
long dbl_created(void);        /* objects created */
long dbl_outstanding(void);    /* references held by anyone but the store */

/* Keychain files that "exist" (index >= 1; 0 is the default keychain). */
int dbl_add_keychain(const char *path);
/* Items in the store: cls 'c' certificate, 'k' key or 'g' generic password
 * (keychain_ext's owner records); keychain -1 = any. */
int dbl_count(char cls, int keychain);
int dbl_has_cert(const char *cn, int keychain);
int dbl_has_key(const uint8_t *id, size_t len);
/* Put a certificate and/or key straight into a keychain (a foreign item). */
void dbl_put(const char *cn, const uint8_t *id, size_t len, int keychain,
             int with_cert, int with_key);

/* Put a generic password (an owner record) straight into a keychain, and
 * read back the kSecAttrGeneric text of the first one for account (NULL:
 * none; "" if it has none). */
void dbl_put_record(const char *service, const char *account,
                    const uint8_t *generic, size_t len, int keychain);
const char *dbl_record(const char *account);

/* A fake PKCS#12 blob the double's SecPKCS12Import understands. */
#define DBL_P12_NO_KEYID  1   /* the item has no kSecImportItemKeyID */
#define DBL_P12_EC        2   /* an EC key instead of RSA */
#define DBL_P12_NO_KEY    4   /* a certificate only (no identity) */
size_t dbl_make_p12(char *buf, size_t cap, const char *cn,
                    const char *password, const uint8_t *id, size_t id_len,
                    int count, int flags);

#endif
