/*
 * p11_error.c -- kc_error filling for the PKCS#11 backend: CK_RV and
 * OpenSSL failures mapped onto OSStatus, the native code kept.
 */
#define _GNU_SOURCE
#include "p11.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>

int open_regular(int dir, const char *path, int flags, mode_t mode)
{
    struct stat st;
    int fd = openat(dir, path, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, mode);
    if (fd < 0)
        return -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        errno = EINVAL;
        return -1;
    }
    return fd;
}

int32_t fail(kc_error *err, int32_t status, int64_t native, const char *fmt,
             ...)
{
    if (err) {
        va_list ap;
        err->status = status;
        err->native_code = native;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return status;
}

const char *ckr_name(CK_RV rv)
{
    switch (rv) {
#define N(x) case x: return #x;
    N(CKR_OK) N(CKR_HOST_MEMORY) N(CKR_SLOT_ID_INVALID) N(CKR_GENERAL_ERROR)
    N(CKR_FUNCTION_FAILED) N(CKR_ARGUMENTS_BAD) N(CKR_ATTRIBUTE_READ_ONLY)
    N(CKR_ATTRIBUTE_SENSITIVE) N(CKR_ATTRIBUTE_TYPE_INVALID)
    N(CKR_ATTRIBUTE_VALUE_INVALID) N(CKR_DEVICE_ERROR) N(CKR_DEVICE_MEMORY)
    N(CKR_DEVICE_REMOVED) N(CKR_FUNCTION_NOT_SUPPORTED)
    N(CKR_KEY_TYPE_INCONSISTENT) N(CKR_OBJECT_HANDLE_INVALID)
    N(CKR_OPERATION_ACTIVE) N(CKR_OPERATION_NOT_INITIALIZED)
    N(CKR_PIN_INCORRECT) N(CKR_PIN_INVALID) N(CKR_PIN_LEN_RANGE)
    N(CKR_PIN_EXPIRED) N(CKR_PIN_LOCKED) N(CKR_SESSION_CLOSED)
    N(CKR_SESSION_COUNT) N(CKR_SESSION_HANDLE_INVALID)
    N(CKR_SESSION_READ_ONLY) N(CKR_TEMPLATE_INCOMPLETE)
    N(CKR_TEMPLATE_INCONSISTENT) N(CKR_TOKEN_NOT_PRESENT)
    N(CKR_TOKEN_NOT_RECOGNIZED) N(CKR_TOKEN_WRITE_PROTECTED)
    N(CKR_USER_ALREADY_LOGGED_IN) N(CKR_USER_NOT_LOGGED_IN)
    N(CKR_USER_PIN_NOT_INITIALIZED) N(CKR_USER_TYPE_INVALID)
    N(CKR_BUFFER_TOO_SMALL) N(CKR_CRYPTOKI_NOT_INITIALIZED)
    N(CKR_CRYPTOKI_ALREADY_INITIALIZED) N(CKR_MECHANISM_INVALID)
#undef N
    default: return "CKR_VENDOR_OR_UNKNOWN";
    }
}

/* CK_RV -> OSStatus: the closest errSec* meaning; the CK_RV stays in
 * kc_error.native_code. */
static int32_t ckr_status(CK_RV rv)
{
    switch (rv) {
    case CKR_OK: return KC_errSecSuccess;
    case CKR_PIN_INCORRECT: case CKR_PIN_INVALID: case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED: case CKR_PIN_LOCKED: case CKR_USER_NOT_LOGGED_IN:
    case CKR_USER_PIN_NOT_INITIALIZED:
        return KC_errSecAuthFailed;
    case CKR_SLOT_ID_INVALID: case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED: case CKR_DEVICE_REMOVED:
        return KC_errSecNoSuchKeychain;
    case CKR_HOST_MEMORY: case CKR_DEVICE_MEMORY: case CKR_SESSION_COUNT:
        return KC_errSecAllocate;
    case CKR_ARGUMENTS_BAD: case CKR_ATTRIBUTE_VALUE_INVALID:
    case CKR_ATTRIBUTE_TYPE_INVALID: case CKR_TEMPLATE_INCOMPLETE:
    case CKR_TEMPLATE_INCONSISTENT: case CKR_ATTRIBUTE_READ_ONLY:
        return KC_errSecParam;
    case CKR_OBJECT_HANDLE_INVALID: case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
        return KC_errSecInvalidItemRef;
    case CKR_TOKEN_WRITE_PROTECTED: case CKR_SESSION_READ_ONLY:
        return KC_errSecReadOnly;
    case CKR_FUNCTION_NOT_SUPPORTED: case CKR_KEY_TYPE_INCONSISTENT:
    case CKR_MECHANISM_INVALID:
        return KC_errSecUnimplemented;
    case CKR_CRYPTOKI_NOT_INITIALIZED:
        return KC_errSecNotAvailable;
    default:
        return KC_errSecIO;
    }
}

int32_t fail_ck(kc_error *err, CK_RV rv, const char *what)
{
    return fail(err, ckr_status(rv), (int64_t)rv, "%s failed: %s (0x%lx)",
                what, ckr_name(rv), (unsigned long)rv);
}

/* Fail with OpenSSL's reason for the newest queued error, then clear the
 * queue: it is per thread and shared with libcurl. */
int32_t fail_ssl(kc_error *err, int32_t status, const char *what)
{
    unsigned long e = ERR_peek_last_error();
    char reason[256] = "no OpenSSL reason";
    if (e)
        ERR_error_string_n(e, reason, sizeof reason);
    ERR_clear_error();
    return fail(err, status, (int64_t)e, "%s (%s)", what, reason);
}

/* Transient results SoftHSM2 gives under concurrent use (see DESIGN.md). */
int transient(CK_RV rv)
{
    return rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_DEVICE_ERROR ||
           rv == CKR_GENERAL_ERROR;
}

void backoff(int attempt)
{
    long long ns = 2000000LL << attempt; /* 2, 4, 8, ... ms */
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    nanosleep(&ts, NULL);
}
