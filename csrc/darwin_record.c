/*
 * darwin_record.c -- owner records: who owns an identity, and is it alive.
 *
 * Who owns an identity lives in a companion item: a generic password of
 * service "keychain_ext", account = the label, whose kSecAttrGeneric holds
 * RECORD_TAG " held=H shared=S id=HEX p12=HEX owners=PID@HOST,..." (no
 * secret data: reading the attributes never prompts).  kc_preauth_key adds
 * it BEFORE the import (SecItemAdd refuses a second one: two processes
 * cannot both claim a label) and completes it with the key id after;
 * kc_kill_key deletes it last.  A crash in between leaves a record that
 * proves the identity (or the nothing) under the label ours, and names its
 * dead owners.  p12 is the SHA-256 of the PKCS#12 file imported: a shared
 * identity is joined only with the same file.
 */
#include "darwin.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define RECORD_SERVICE "keychain_ext"
#define RECORD_TAG "keychain_ext-owner-v1"
#define RECORD_MAX 4096

void my_host(char *buf, size_t size)
{
    if (gethostname(buf, size) != 0 || buf[0] == '\0')
        snprintf(buf, size, "unknown");
    buf[size - 1] = '\0';
}

/* The records of label (NULL: all) in the handle's search scope; mode
 * RQ_MATCH for update/delete, RQ_ONE / RQ_ALL return attributes. */
CFDictionaryRef create_record_query(kc_keychain *kc, const char *label,
                                    int mode)
{
    const void *keys[6], *values[6];
    CFIndex n = 0;
    CFStringRef service, account = NULL;
    CFDictionaryRef query = NULL;

    service = CFStringCreateWithCString(kCFAllocatorDefault, RECORD_SERVICE,
                                        kCFStringEncodingUTF8);
    if (service == NULL)
        return NULL;
    keys[n] = kSecClass;
    values[n++] = kSecClassGenericPassword;
    keys[n] = kSecAttrService;
    values[n++] = service;
    if (label != NULL) {
        account = CFStringCreateWithCString(kCFAllocatorDefault, label,
                                            kCFStringEncodingUTF8);
        if (account == NULL)
            goto cleanup;
        keys[n] = kSecAttrAccount;
        values[n++] = account;
    }
    if (mode != RQ_MATCH) {
        keys[n] = kSecReturnAttributes;
        values[n++] = kCFBooleanTrue;
        keys[n] = kSecMatchLimit;
        values[n++] = mode == RQ_ALL ? kSecMatchLimitAll : kSecMatchLimitOne;
    }
    if (kc->search_list != NULL) {
        KC_DEPRECATED_BEGIN
        keys[n] = kSecMatchSearchList;
        KC_DEPRECATED_END
        values[n++] = kc->search_list;
    }
    query = CFDictionaryCreate(kCFAllocatorDefault, keys, values, n,
                               &kCFTypeDictionaryKeyCallBacks,
                               &kCFTypeDictionaryValueCallBacks);
cleanup:
    release(account);
    release(service);
    return query;
}

/* The value of "name=" in text (up to the next space), as a C string in
 * buf; NULL if absent or too long. */
static const char *record_field(const char *text, const char *name,
                                char *buf, size_t size)
{
    const char *p = strstr(text, name);
    size_t n;

    if (p == NULL)
        return NULL;
    p += strlen(name);
    n = strcspn(p, " ");
    if (n >= size)
        return NULL;
    memcpy(buf, p, n);
    buf[n] = '\0';
    return buf;
}

/* Hex into bytes: exactly *len bytes if want > 0, else up to cap. */
static int unhex(const char *hex, uint8_t *out, size_t cap, size_t *len)
{
    size_t i, n = strlen(hex);

    if (n % 2 != 0 || n / 2 > cap)
        return 0;
    for (i = 0; i < n / 2; i++) {
        unsigned byte;

        if (sscanf(hex + 2 * i, "%2x", &byte) != 1)
            return 0;
        out[i] = (uint8_t)byte;
    }
    *len = n / 2;
    return 1;
}

/* Parse a record's attributes; errSecDecode if it is not one of ours. */
OSStatus parse_record(CFDictionaryRef attrs, kc_record *rec)
{
    CFTypeRef v = CFDictionaryGetValue(attrs, kSecAttrGeneric);
    char text[RECORD_MAX], field[RECORD_MAX], *owner, *next;
    CFIndex len;
    size_t n;

    memset(rec, 0, sizeof *rec);
    if (v == NULL || CFGetTypeID(v) != CFDataGetTypeID())
        return errSecDecode;
    len = CFDataGetLength((CFDataRef)v);
    if (len <= 0 || len >= RECORD_MAX)
        return errSecDecode;
    memcpy(text, CFDataGetBytePtr((CFDataRef)v), (size_t)len);
    text[len] = '\0';
    if (strncmp(text, RECORD_TAG " ", strlen(RECORD_TAG) + 1) != 0
        || sscanf(text, RECORD_TAG " held=%d shared=%d", &rec->held,
                  &rec->shared) != 2
        || record_field(text, " id=", field, sizeof field) == NULL
        || !unhex(field, rec->id, sizeof rec->id, &rec->id_len)
        || record_field(text, " p12=", field, sizeof field) == NULL
        || !unhex(field, rec->p12, sizeof rec->p12, &n)
        || (n != 0 && n != sizeof rec->p12)
        || record_field(text, " owners=", field, sizeof field) == NULL)
        return errSecDecode;
    for (owner = field; *owner != '\0'; owner = next) {
        kc_owner *o = &rec->owners[rec->nowners];
        char *at;

        next = owner + strcspn(owner, ",");
        if (*next == ',')
            *next++ = '\0';
        at = strchr(owner, '@');
        if (rec->nowners == MAX_OWNERS || at == NULL
            || (size_t)(strlen(at + 1)) >= sizeof o->host
            || sscanf(owner, "%lld@", &o->pid) != 1)
            return errSecDecode;
        snprintf(o->host, sizeof o->host, "%s", at + 1);
        rec->nowners++;
    }
    return errSecSuccess;
}

/* The record's text; 0 when it does not fit. */
static int format_record(const kc_record *rec, char *text, size_t size)
{
    size_t used, i;
    int n;

    n = snprintf(text, size, RECORD_TAG " held=%d shared=%d id=",
                 rec->held, rec->shared);
    for (i = 0; n > 0 && i < rec->id_len; i++)
        n += snprintf(text + n, size - (size_t)n, "%02x", rec->id[i]);
    n += snprintf(text + n, size - (size_t)n, " p12=");
    for (i = 0; i < sizeof rec->p12; i++)
        n += snprintf(text + n, size - (size_t)n, "%02x", rec->p12[i]);
    n += snprintf(text + n, size - (size_t)n, " owners=");
    for (i = 0; i < (size_t)rec->nowners; i++)
        n += snprintf(text + n, size - (size_t)n, "%s%lld@%s",
                      i > 0 ? "," : "", rec->owners[i].pid,
                      rec->owners[i].host);
    used = (size_t)n;
    return used < size ? n : 0;
}

/* The record of label: errSecSuccess, errSecItemNotFound, or an error. */
OSStatus read_record(kc_keychain *kc, const char *label,
                     kc_record *rec)
{
    CFDictionaryRef query;
    CFTypeRef attrs = NULL;
    OSStatus status;

    memset(rec, 0, sizeof *rec);
    query = create_record_query(kc, label, RQ_ONE);
    if (query == NULL)
        return errSecAllocate;
    status = SecItemCopyMatching(query, &attrs);
    CFRelease(query);
    if (status == errSecSuccess)
        status = attrs != NULL ? parse_record((CFDictionaryRef)attrs, rec)
                               : errSecItemNotFound;
    release(attrs);
    return status;
}

/* Add label's record (add) or replace its text. */
OSStatus write_record(kc_keychain *kc, const char *label,
                      const kc_record *rec, int add)
{
    char text[RECORD_MAX];
    CFDataRef data = NULL;
    CFDictionaryRef query = NULL, attrs = NULL, match = NULL;
    CFStringRef service = NULL, account = NULL;
    const void *keys[5], *values[5];
    CFIndex n = 0;
    OSStatus status = errSecAllocate;
    int len;

    len = format_record(rec, text, sizeof text);
    if (len == 0)
        return errSecParam;
    data = CFDataCreate(kCFAllocatorDefault, (const UInt8 *)text, len);
    if (data == NULL)
        goto cleanup;
    if (!add) {
        keys[0] = kSecAttrGeneric;
        values[0] = data;
        attrs = CFDictionaryCreate(kCFAllocatorDefault, keys, values, 1,
                                   &kCFTypeDictionaryKeyCallBacks,
                                   &kCFTypeDictionaryValueCallBacks);
        match = create_record_query(kc, label, RQ_MATCH);
        if (attrs != NULL && match != NULL)
            status = SecItemUpdate(match, attrs);
        goto cleanup;
    }
    service = CFStringCreateWithCString(kCFAllocatorDefault, RECORD_SERVICE,
                                        kCFStringEncodingUTF8);
    account = CFStringCreateWithCString(kCFAllocatorDefault, label,
                                        kCFStringEncodingUTF8);
    if (service == NULL || account == NULL)
        goto cleanup;
    keys[n] = kSecClass;
    values[n++] = kSecClassGenericPassword;
    keys[n] = kSecAttrService;
    values[n++] = service;
    keys[n] = kSecAttrAccount;
    values[n++] = account;
    keys[n] = kSecAttrGeneric;
    values[n++] = data;
    if (kc->keychain != NULL) {
        KC_DEPRECATED_BEGIN
        keys[n] = kSecUseKeychain;
        KC_DEPRECATED_END
        values[n++] = kc->keychain;
    }
    query = CFDictionaryCreate(kCFAllocatorDefault, keys, values, n,
                               &kCFTypeDictionaryKeyCallBacks,
                               &kCFTypeDictionaryValueCallBacks);
    if (query != NULL)
        status = SecItemAdd(query, NULL);
cleanup:
    release(query);
    release(match);
    release(attrs);
    release(account);
    release(service);
    release(data);
    return status;
}

OSStatus delete_record(kc_keychain *kc, const char *label)
{
    CFDictionaryRef query = create_record_query(kc, label, RQ_MATCH);
    OSStatus status;

    if (query == NULL)
        return errSecAllocate;
    status = SecItemDelete(query);
    CFRelease(query);
    return status;
}

/* 1 the owner runs, 0 it is dead, -1 cannot tell (another host, or no
 * pid).  A reused pid reads as alive: the safe side. */
int one_alive(const kc_owner *o)
{
    char host[KC_HOST_MAX];

    my_host(host, sizeof host);
    if (o->pid <= 0 || strcmp(host, o->host) != 0)
        return -1;
    if ((pid_t)o->pid == getpid() || kill((pid_t)o->pid, 0) == 0)
        return 1;
    return errno == ESRCH ? 0 : errno == EPERM ? 1 : -1;
}

int is_me(const kc_owner *o)
{
    char host[KC_HOST_MAX];

    my_host(host, sizeof host);
    return (pid_t)o->pid == getpid() && strcmp(host, o->host) == 0;
}

/* Over the owners other than this process (all: others_only 0): 1 one
 * runs (or the identity is held), -1 none runs but one cannot be judged,
 * 0 all are dead (or there are none). */
int owners_alive(const kc_record *rec, int others_only)
{
    int i, verdict = 0, a;

    if (rec->held)
        return 1;
    for (i = 0; i < rec->nowners; i++) {
        if (others_only && is_me(&rec->owners[i]))
            continue;
        a = one_alive(&rec->owners[i]);
        if (a > 0)
            return 1;
        if (a < 0)
            verdict = -1;
    }
    return verdict;
}

int owner_alive(const kc_record *rec)
{
    return rec->nowners == 0 && !rec->held ? -1 : owners_alive(rec, 0);
}

/* This process's index among the owners, or -1. */
int my_index(const kc_record *rec)
{
    int i;

    for (i = 0; i < rec->nowners; i++)
        if (is_me(&rec->owners[i]))
            return i;
    return -1;
}

void drop_owner(kc_record *rec, int i)
{
    memmove(&rec->owners[i], &rec->owners[i + 1],
            (size_t)(rec->nowners - i - 1) * sizeof rec->owners[0]);
    rec->nowners--;
}

void fill_owner(const kc_record *rec, kc_item_info *out)
{
    const kc_owner *shown = NULL;
    int i;

    out->ours = 1;
    out->held = rec->held;
    out->shared = rec->shared;
    out->owners = rec->nowners;
    out->mine = my_index(rec) >= 0;
    for (i = 0; i < rec->nowners && shown == NULL; i++)
        if (one_alive(&rec->owners[i]) > 0)
            shown = &rec->owners[i];
    if (shown == NULL && rec->nowners > 0)
        shown = &rec->owners[0];
    out->owner_pid = shown != NULL ? shown->pid : 0;
    snprintf(out->owner_host, sizeof out->owner_host, "%s",
             shown != NULL ? shown->host : "");
    out->owner_alive = owner_alive(rec);
}
