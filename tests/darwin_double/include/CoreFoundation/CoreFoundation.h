/*
 * TEST DOUBLE -- NOT Apple's CoreFoundation.
 *
 * Written from scratch for keychain_ext's Linux logic tests: it declares
 * only the small subset of CoreFoundation that csrc/keychain_darwin.c uses,
 * with signatures compatible with the real framework, so the backend compiles
 * unchanged with gcc on Linux.  The implementation (double.c) keeps every
 * object in memory and counts creates, retains and releases.  Nothing here
 * describes the real framework's behaviour beyond what the backend needs.
 */
#ifndef KC_TEST_DOUBLE_COREFOUNDATION_H
#define KC_TEST_DOUBLE_COREFOUNDATION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef unsigned char Boolean;
typedef uint8_t UInt8;
typedef uint32_t UInt32;
typedef int32_t OSStatus;
typedef long CFIndex;
typedef unsigned long CFTypeID;
typedef uint32_t CFStringEncoding;

/* Distinct struct tags give the same type checking as the real headers. */
typedef const void *CFTypeRef;
typedef const struct dbl_allocator *CFAllocatorRef;
typedef const struct dbl_string *CFStringRef;
typedef const struct dbl_data *CFDataRef;
typedef const struct dbl_array *CFArrayRef;
typedef const struct dbl_dictionary *CFDictionaryRef;
typedef const struct dbl_boolean *CFBooleanRef;

#define kCFStringEncodingUTF8 ((CFStringEncoding)0x08000100)

extern const CFAllocatorRef kCFAllocatorDefault;
extern const CFBooleanRef kCFBooleanTrue;
extern const CFBooleanRef kCFBooleanFalse;

/* Callback tables: only their addresses matter to the double (non-NULL =
 * the container retains what it holds, as with the kCFType* tables). */
typedef struct { int dbl_retains; } CFArrayCallBacks;
typedef struct { int dbl_retains; } CFDictionaryKeyCallBacks;
typedef struct { int dbl_retains; } CFDictionaryValueCallBacks;
extern const CFArrayCallBacks kCFTypeArrayCallBacks;
extern const CFDictionaryKeyCallBacks kCFTypeDictionaryKeyCallBacks;
extern const CFDictionaryValueCallBacks kCFTypeDictionaryValueCallBacks;

CFTypeRef CFRetain(CFTypeRef cf);
void CFRelease(CFTypeRef cf);
CFTypeID CFGetTypeID(CFTypeRef cf);
Boolean CFEqual(CFTypeRef a, CFTypeRef b);

CFStringRef CFStringCreateWithCString(CFAllocatorRef alloc, const char *cStr,
                                      CFStringEncoding encoding);
const char *CFStringGetCStringPtr(CFStringRef s, CFStringEncoding encoding);
Boolean CFStringGetCString(CFStringRef s, char *buffer, CFIndex bufferSize,
                           CFStringEncoding encoding);

CFTypeID CFDataGetTypeID(void);
CFDataRef CFDataCreate(CFAllocatorRef alloc, const UInt8 *bytes,
                       CFIndex length);
CFIndex CFDataGetLength(CFDataRef data);
const UInt8 *CFDataGetBytePtr(CFDataRef data);

CFArrayRef CFArrayCreate(CFAllocatorRef alloc, const void **values,
                         CFIndex numValues, const CFArrayCallBacks *callBacks);
CFIndex CFArrayGetCount(CFArrayRef array);
const void *CFArrayGetValueAtIndex(CFArrayRef array, CFIndex idx);

CFDictionaryRef CFDictionaryCreate(CFAllocatorRef alloc, const void **keys,
                                   const void **values, CFIndex numValues,
                                   const CFDictionaryKeyCallBacks *keyCallBacks,
                                   const CFDictionaryValueCallBacks *valueCallBacks);
const void *CFDictionaryGetValue(CFDictionaryRef dict, const void *key);

#endif
