/*
 * darwin_handle.c -- the handle and what every call runs under: kc_error
 * filling (Security.framework's own message kept), the process-wide
 * user-interaction flag, the store lock, and kc_open / kc_close (with
 * kc_backend, kc_version, kc_init_token), as p11_session.c for PKCS#11.
 */
#include "darwin.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#ifndef KC_VERSION
#define KC_VERSION "0.0.0"
#endif

void release(CFTypeRef ref)
{
    if (ref != NULL)
        CFRelease(ref);
}

/* Copy a CFString into buf as UTF-8; "" when it cannot be converted. */
void cf_to_cstr(CFStringRef s, char *buf, size_t size)
{
    const char *p;

    buf[0] = '\0';
    if (s == NULL)
        return;
    /* Fast path only: Crypto.cpp used it without the NULL check. */
    p = CFStringGetCStringPtr(s, kCFStringEncodingUTF8);
    if (p != NULL) {
        snprintf(buf, size, "%s", p);
        return;
    }
    if (!CFStringGetCString(s, buf, (CFIndex)size, kCFStringEncodingUTF8))
        buf[0] = '\0';
}

/* Fill err with status, the native OSStatus behind it, "what" and
 * Security.framework's own message for the native status. */
static int32_t vfail(kc_error *err, OSStatus status, OSStatus native,
                     const char *fmt, va_list ap)
{
    char what[KC_MESSAGE_MAX / 2 - 16];  /* room for the rest below */
    char sec[KC_MESSAGE_MAX / 2 - 16];
    CFStringRef msg;

    if (err == NULL)
        return status;
    vsnprintf(what, sizeof what, fmt, ap);
    msg = SecCopyErrorMessageString(native, NULL);
    cf_to_cstr(msg, sec, sizeof sec);
    release(msg);
    err->status = status;
    err->native_code = native;
    if (sec[0] != '\0')
        snprintf(err->message, sizeof err->message, "%s: %s (OSStatus %d)",
                 what, sec, (int)native);
    else
        snprintf(err->message, sizeof err->message, "%s (OSStatus %d)",
                 what, (int)native);
    return status;
}

int32_t fail(kc_error *err, OSStatus status, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfail(err, status, status, fmt, ap);
    va_end(ap);
    return status;
}

int32_t fail_native(kc_error *err, OSStatus status, OSStatus native,
                    const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfail(err, status, native, fmt, ap);
    va_end(ap);
    return status;
}

void clear_error(kc_error *err)
{
    if (err != NULL)
        memset(err, 0, sizeof *err);
}

int valid_label(const char *label)
{
    return label != NULL && label[0] != '\0' && strlen(label) < KC_LABEL_MAX;
}

/* The user-interaction flag is process-wide: two handles must not interleave
 * their save/disable/restore, or one would "restore" the other's false. */
pthread_mutex_t interaction_lock = PTHREAD_MUTEX_INITIALIZER;

/* The user-interaction flag is off around everything that writes or
 * deletes (a foreign key's ACL would prompt on delete): saved first,
 * restored to its PREVIOUS value after.  Call under interaction_lock. */
OSStatus interaction_off(Boolean *previous, kc_error *err)
{
    OSStatus status;

    KC_DEPRECATED_BEGIN
    status = SecKeychainGetUserInteractionAllowed(previous);
    KC_DEPRECATED_END
    if (status != errSecSuccess)
        return fail(err, status, "reading the user-interaction flag");
    KC_DEPRECATED_BEGIN
    status = SecKeychainSetUserInteractionAllowed(false);
    KC_DEPRECATED_END
    if (status != errSecSuccess)
        return fail(err, status, "disabling user interaction");
    return errSecSuccess;
}

/* Restore the flag; a failure to do so is reported unless status already
 * reports one. */
OSStatus interaction_restore(Boolean previous, OSStatus status,
                             kc_error *err)
{
    OSStatus st2;

    KC_DEPRECATED_BEGIN
    st2 = SecKeychainSetUserInteractionAllowed(previous);
    KC_DEPRECATED_END
    if (st2 != errSecSuccess && status == errSecSuccess)
        return fail(err, st2, "restoring the user-interaction flag");
    return status;
}

/* The store lock (opts->state_dir/lock): owner records are read, changed
 * and written back under it, so processes joining or leaving at the same
 * instant cannot lose each other's entries.  No lock file: no-op. */
OSStatus store_lock(kc_keychain *kc, kc_error *err)
{
    while (kc->lock_fd >= 0 && flock(kc->lock_fd, LOCK_EX) != 0)
        if (errno != EINTR)
            return fail_native(err, errSecIO, errno, "locking the store");
    return errSecSuccess;
}

void store_unlock(kc_keychain *kc)
{
    if (kc->lock_fd >= 0)
        flock(kc->lock_fd, LOCK_UN);
}

/* --- the C API: the handle --------------------------------------------- */

const char *kc_backend(void)
{
    return "darwin";
}

const char *kc_version(void)
{
    return KC_VERSION;
}

int32_t kc_open(const kc_options *opts, kc_keychain **out, kc_error *err)
{
    kc_keychain *kc = NULL;
    SecKeychainStatus kstatus = 0;
    OSStatus status = errSecSuccess;

    clear_error(err);
    if (out == NULL)
        return fail(err, errSecParam, "kc_open: out is NULL");
    *out = NULL;
    kc = calloc(1, sizeof *kc);
    if (kc == NULL)
        return fail(err, errSecAllocate, "kc_open: out of memory");
    if (pthread_mutex_init(&kc->lock, NULL) != 0) {
        free(kc);
        return fail(err, errSecAllocate, "kc_open: pthread_mutex_init");
    }
    kc->lock_fd = -1;
    if (opts != NULL && opts->state_dir != NULL && opts->state_dir[0] != '\0') {
        /* every process changing owner records serializes on this file */
        char path[4096];

        if (snprintf(path, sizeof path, "%s/lock", opts->state_dir)
            >= (int)sizeof path) {
            status = fail(err, errSecParam, "kc_open: state_dir too long");
            goto cleanup;
        }
        kc->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW,
                           0600);
        if (kc->lock_fd < 0) {
            status = fail_native(err, errSecIO, errno, "opening the lock "
                                 "file in '%s'", opts->state_dir);
            goto cleanup;
        }
    }
    if (opts != NULL && opts->token != NULL && opts->token[0] != '\0') {
        /* Open, never create: SecKeychainOpen succeeds for a missing file,
         * SecKeychainGetStatus tells whether it exists. */
        KC_DEPRECATED_BEGIN
        status = SecKeychainOpen(opts->token, &kc->keychain);
        if (status == errSecSuccess)
            status = SecKeychainGetStatus(kc->keychain, &kstatus);
        KC_DEPRECATED_END
        if (status != errSecSuccess) {
            fail(err, status, "opening keychain '%s'", opts->token);
            goto cleanup;
        }
        kc->search_list = CFArrayCreate(kCFAllocatorDefault,
                                        (const void **)&kc->keychain, 1,
                                        &kCFTypeArrayCallBacks);
        if (kc->search_list == NULL) {
            status = fail(err, errSecAllocate, "kc_open: CFArrayCreate");
            goto cleanup;
        }
    }
    *out = kc;
    kc = NULL;
cleanup:
    kc_close(kc);
    return status;
}

void kc_close(kc_keychain *kc)
{
    if (kc == NULL)
        return;
    release(kc->search_list);
    release(kc->keychain);
    if (kc->lock_fd >= 0)
        close(kc->lock_fd);
    pthread_mutex_destroy(&kc->lock);
    free(kc);
}

int32_t kc_init_token(const char *module, const char *token,
                      const char *so_pin, const char *user_pin, kc_error *err)
{
    (void)module;
    (void)token;
    (void)so_pin;
    (void)user_pin;
    clear_error(err);
    return fail(err, errSecUnimplemented, "tokens are PKCS#11 only");
}
