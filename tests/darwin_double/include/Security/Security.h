/*
 * TEST DOUBLE -- NOT Apple's Security.framework.
 *
 * Written from scratch for keychain_ext's Linux logic tests.  It declares
 * only the Security calls and constants csrc/keychain_darwin.c uses, with
 * compatible signatures; the OSStatus values are the public ones listed in
 * DESIGN.md.  double.c implements them over an in-memory item store and
 * can fail any call on demand (see double_control.h).
 */
#ifndef KC_TEST_DOUBLE_SECURITY_H
#define KC_TEST_DOUBLE_SECURITY_H

#include <CoreFoundation/CoreFoundation.h>

typedef const struct dbl_keychain *SecKeychainRef;
typedef const struct dbl_access *SecAccessRef;
typedef const struct dbl_identity *SecIdentityRef;
typedef const struct dbl_certificate *SecCertificateRef;
typedef const struct dbl_key *SecKeyRef;
typedef UInt32 SecKeychainStatus;

enum {
    errSecSuccess = 0,
    errSecUnimplemented = -4,
    errSecIO = -36,
    errSecParam = -50,
    errSecAllocate = -108,
    errSecNoSuchKeychain = -25294,
    errSecAuthFailed = -25293,
    errSecDuplicateItem = -25299,
    errSecItemNotFound = -25300,
    errSecInvalidItemRef = -25304,
    errSecInvalidOwnerEdit = -25244,
    errSecInteractionNotAllowed = -25308,
    errSecDecode = -26275,
    errSecPkcs12VerifyFailure = -25264
};

extern const CFStringRef kSecClass;
extern const CFStringRef kSecClassIdentity;
extern const CFStringRef kSecClassCertificate;
extern const CFStringRef kSecClassKey;
extern const CFStringRef kSecClassGenericPassword;
extern const CFStringRef kSecAttrService;
extern const CFStringRef kSecAttrAccount;
extern const CFStringRef kSecAttrGeneric;
extern const CFStringRef kSecReturnAttributes;
extern const CFStringRef kSecUseKeychain;
extern const CFStringRef kSecReturnRef;
extern const CFStringRef kSecMatchLimit;
extern const CFStringRef kSecMatchLimitOne;
extern const CFStringRef kSecMatchLimitAll;
extern const CFStringRef kSecMatchSubjectWholeString;
extern const CFStringRef kSecMatchSearchList;
extern const CFStringRef kSecMatchItemList;
extern const CFStringRef kSecAttrKeyClass;
extern const CFStringRef kSecAttrKeyClassPrivate;
extern const CFStringRef kSecAttrApplicationLabel;
extern const CFStringRef kSecAttrKeyType;
extern const CFStringRef kSecAttrKeyTypeRSA;
extern const CFStringRef kSecAttrKeyTypeECSECPrimeRandom;
extern const CFStringRef kSecImportExportPassphrase;
extern const CFStringRef kSecImportExportAccess;
extern const CFStringRef kSecImportExportKeychain;
extern const CFStringRef kSecImportItemIdentity;
extern const CFStringRef kSecImportItemKeyID;
extern const CFStringRef kSecImportItemCertChain;

OSStatus SecItemCopyMatching(CFDictionaryRef query, CFTypeRef *result);
OSStatus SecItemDelete(CFDictionaryRef query);
OSStatus SecItemAdd(CFDictionaryRef attributes, CFTypeRef *result);
OSStatus SecItemUpdate(CFDictionaryRef query, CFDictionaryRef attributesToUpdate);
OSStatus SecPKCS12Import(CFDataRef pkcs12_data, CFDictionaryRef options,
                         CFArrayRef *items);
OSStatus SecAccessCreate(CFStringRef descriptor, CFArrayRef trustedlist,
                         SecAccessRef *accessRef);
OSStatus SecKeychainOpen(const char *pathName, SecKeychainRef *keychain);
OSStatus SecKeychainGetStatus(SecKeychainRef keychain,
                              SecKeychainStatus *keychainStatus);
OSStatus SecKeychainSetUserInteractionAllowed(Boolean state);
OSStatus SecKeychainGetUserInteractionAllowed(Boolean *state);
CFStringRef SecCopyErrorMessageString(OSStatus status, void *reserved);
OSStatus SecIdentityCopyCertificate(SecIdentityRef identity,
                                    SecCertificateRef *certificateRef);
OSStatus SecIdentityCopyPrivateKey(SecIdentityRef identity,
                                   SecKeyRef *privateKeyRef);
OSStatus SecCertificateCopyCommonName(SecCertificateRef certificate,
                                      CFStringRef *commonName);
CFStringRef SecCertificateCopySubjectSummary(SecCertificateRef certificate);
CFDictionaryRef SecKeyCopyAttributes(SecKeyRef key);

#endif
