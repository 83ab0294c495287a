/*
 * double.c -- TEST DOUBLE of the Security/CoreFoundation subset used by
 * csrc/keychain_darwin.c.  NOT Apple's framework: written from scratch for
 * the Linux logic tests.
 *
 * Every CF object is a `struct obj` with a reference count.  Released
 * objects are marked dead but kept until dbl_reset, so a second release or a
 * use after release aborts with a message instead of corrupting memory.
 * Misuse the real framework would crash on (CFRelease(NULL), NULL in a
 * kCFType container, wrong type) aborts too.  Queries with keys the double
 * does not know abort: the backend must use exactly the attributes tested.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <CommonCrypto/CommonDigest.h>
#include <openssl/sha.h>

#include "double_control.h"

#define MAGIC 0x4b434442u   /* "KCDB" */

enum type { T_STRING = 1, T_DATA, T_ARRAY, T_DICT, T_BOOL, T_ALLOC,
            T_KEYCHAIN, T_ACCESS, T_IDENTITY, T_CERT, T_KEY, T_GENP };

struct obj {
    unsigned magic;
    int type;
    long refs;
    int immortal;               /* constants: never counted or freed */
    int dead;
    struct obj *all_next;       /* every created object, for dbl_reset */
    char *str;                  /* T_STRING text, T_CERT cn, T_KEYCHAIN path,
                                   T_GENP account */
    uint8_t *bytes;             /* T_DATA bytes, T_CERT/T_KEY key id,
                                   T_GENP kSecAttrGeneric */
    size_t len;
    const void **keys, **vals;  /* T_ARRAY (vals), T_DICT */
    long n;
    int retains;                /* container retains its members */
    int keychain;               /* T_CERT/T_KEY/T_KEYCHAIN: keychain index */
    int key_type;               /* T_KEY: 1 RSA, 2 EC */
    struct obj *cert, *key;     /* T_IDENTITY */
    char *svc;                  /* T_GENP kSecAttrService */
};

#define CONST_OBJ(var, t, text) \
    static struct obj var##_obj = { MAGIC, t, 1, 1, 0, NULL, (char *)text, \
                                    NULL, 0, NULL, NULL, 0, 0, 0, 0, NULL, NULL, \
                                    NULL }
#define CONST_STR(name, text) \
    CONST_OBJ(name, T_STRING, text); \
    const CFStringRef name = (CFStringRef)&name##_obj

CONST_OBJ(alloc_default, T_ALLOC, "default");
const CFAllocatorRef kCFAllocatorDefault = (CFAllocatorRef)&alloc_default_obj;
CONST_OBJ(bool_true, T_BOOL, "true");
CONST_OBJ(bool_false, T_BOOL, "false");
const CFBooleanRef kCFBooleanTrue = (CFBooleanRef)&bool_true_obj;
const CFBooleanRef kCFBooleanFalse = (CFBooleanRef)&bool_false_obj;
const CFArrayCallBacks kCFTypeArrayCallBacks = { 1 };
const CFDictionaryKeyCallBacks kCFTypeDictionaryKeyCallBacks = { 1 };
const CFDictionaryValueCallBacks kCFTypeDictionaryValueCallBacks = { 1 };

CONST_STR(kSecClass, "class");
CONST_STR(kSecClassIdentity, "idnt");
CONST_STR(kSecClassCertificate, "cert");
CONST_STR(kSecClassKey, "keys");
CONST_STR(kSecClassGenericPassword, "genp");
CONST_STR(kSecAttrService, "svce");
CONST_STR(kSecAttrAccount, "acct");
CONST_STR(kSecAttrGeneric, "gena");
CONST_STR(kSecReturnAttributes, "r_Attributes");
CONST_STR(kSecUseKeychain, "u_Keychain");
CONST_STR(kSecReturnRef, "r_Ref");
CONST_STR(kSecMatchLimit, "m_Limit");
CONST_STR(kSecMatchLimitOne, "m_LimitOne");
CONST_STR(kSecMatchLimitAll, "m_LimitAll");
CONST_STR(kSecMatchSubjectWholeString, "m_SubjectWholeString");
CONST_STR(kSecMatchSearchList, "m_SearchList");
CONST_STR(kSecMatchItemList, "m_ItemList");
CONST_STR(kSecAttrKeyClass, "kcls");
CONST_STR(kSecAttrKeyClassPrivate, "1");
CONST_STR(kSecAttrApplicationLabel, "klbl");
CONST_STR(kSecAttrKeyType, "type");
CONST_STR(kSecAttrKeyTypeRSA, "42");
CONST_STR(kSecAttrKeyTypeECSECPrimeRandom, "73");
CONST_STR(kSecImportExportPassphrase, "passphrase");
CONST_STR(kSecImportExportAccess, "access");
CONST_STR(kSecImportExportKeychain, "keychain");
CONST_STR(kSecImportItemIdentity, "identity");
CONST_STR(kSecImportItemKeyID, "keyid");
CONST_STR(kSecImportItemCertChain, "chain");

/* --- state --------------------------------------------------------------- */

#define MAX_ITEMS 256
#define MAX_LOG 4096
#define MAX_KEYCHAINS 8

static struct obj *all_objs;
static long created;
static struct obj *store[MAX_ITEMS];    /* T_CERT and T_KEY, one ref each */
static int nstore;
static char log_buf[MAX_LOG][160];
static int nlog;
static int fail_at;
static OSStatus fail_status;
static int fired;
static Boolean interaction = true;
static int interaction_at_import = -1;
static int cstring_ptr;
static char keychains[MAX_KEYCHAINS][256];
static int nkeychains = 1;              /* 0 = the default keychain */

static void die(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "darwin double: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    abort();
}

/* Log a fallible call; returns the injected status when it is its turn. */
static OSStatus call(const char *name, const char *fmt, ...)
{
    char detail[128] = "";
    va_list ap;

    if (fmt != NULL) {
        va_start(ap, fmt);
        vsnprintf(detail, sizeof detail, fmt, ap);
        va_end(ap);
    }
    if (nlog < MAX_LOG)
        snprintf(log_buf[nlog], sizeof log_buf[nlog], "%s(%s)", name, detail);
    nlog++;
    if (fail_at != 0 && nlog == fail_at) {
        fired = 1;
        return fail_status;
    }
    return errSecSuccess;
}

static struct obj *check(CFTypeRef cf, int type, const char *where)
{
    struct obj *o = (struct obj *)cf;

    if (o == NULL)
        die("%s: NULL object", where);
    if (o->magic != MAGIC)
        die("%s: not a double object", where);
    if (o->dead)
        die("%s: object used after its last release", where);
    if (type != 0 && o->type != type)
        die("%s: wrong object type %d (want %d)", where, o->type, type);
    return o;
}

static struct obj *new_obj(int type)
{
    struct obj *o = calloc(1, sizeof *o);

    if (o == NULL)
        die("out of memory");
    o->magic = MAGIC;
    o->type = type;
    o->refs = 1;
    o->all_next = all_objs;
    all_objs = o;
    created++;
    return o;
}

static char *dup_bytes(const void *p, size_t len)
{
    char *d = malloc(len + 1);

    if (d == NULL)
        die("out of memory");
    if (len > 0)
        memcpy(d, p, len);
    d[len] = '\0';
    return d;
}

static void hex(const uint8_t *p, size_t len, char *out, size_t cap)
{
    size_t i;

    out[0] = '\0';
    for (i = 0; i < len && 2 * i + 2 < cap; i++)
        sprintf(out + 2 * i, "%02x", p[i]);
}

/* --- CoreFoundation ------------------------------------------------------ */

CFTypeRef CFRetain(CFTypeRef cf)
{
    struct obj *o = check(cf, 0, "CFRetain");

    if (!o->immortal)
        o->refs++;
    return cf;
}

void CFRelease(CFTypeRef cf)
{
    struct obj *o = check(cf, 0, "CFRelease");
    long i;

    if (o->immortal)
        return;
    if (--o->refs > 0)
        return;
    o->dead = 1;
    if (o->retains) {
        for (i = 0; i < o->n; i++) {
            if (o->keys != NULL)
                CFRelease(o->keys[i]);
            CFRelease(o->vals[i]);
        }
    }
    if (o->type == T_IDENTITY) {
        CFRelease(o->cert);
        CFRelease(o->key);
    }
}

CFTypeID CFGetTypeID(CFTypeRef cf)
{
    return (CFTypeID)check(cf, 0, "CFGetTypeID")->type;
}

CFTypeID CFDataGetTypeID(void)
{
    return T_DATA;
}

Boolean CFEqual(CFTypeRef a, CFTypeRef b)
{
    struct obj *x = check(a, 0, "CFEqual"), *y = check(b, 0, "CFEqual");

    if (x == y)
        return true;
    if (x->type != y->type)
        return false;
    if (x->type == T_STRING)
        return strcmp(x->str, y->str) == 0;
    if (x->type == T_DATA)
        return x->len == y->len && memcmp(x->bytes, y->bytes, x->len) == 0;
    return false;
}

CFStringRef CFStringCreateWithCString(CFAllocatorRef alloc, const char *s,
                                      CFStringEncoding enc)
{
    struct obj *o;

    (void)alloc;
    if (s == NULL || enc != kCFStringEncodingUTF8)
        die("CFStringCreateWithCString: bad argument");
    if (call("CFStringCreateWithCString", "%s", s) != errSecSuccess)
        return NULL;
    o = new_obj(T_STRING);
    o->str = dup_bytes(s, strlen(s));
    return (CFStringRef)o;
}

const char *CFStringGetCStringPtr(CFStringRef s, CFStringEncoding enc)
{
    struct obj *o = check(s, T_STRING, "CFStringGetCStringPtr");

    (void)enc;
    return cstring_ptr ? o->str : NULL;
}

Boolean CFStringGetCString(CFStringRef s, char *buf, CFIndex size,
                           CFStringEncoding enc)
{
    struct obj *o = check(s, T_STRING, "CFStringGetCString");

    (void)enc;
    if (call("CFStringGetCString", "%s", o->str) != errSecSuccess)
        return false;
    if ((CFIndex)strlen(o->str) >= size)
        return false;
    strcpy(buf, o->str);
    return true;
}

CFDataRef CFDataCreate(CFAllocatorRef alloc, const UInt8 *bytes, CFIndex len)
{
    struct obj *o;

    (void)alloc;
    if (len < 0 || (len > 0 && bytes == NULL))
        die("CFDataCreate: bad argument");
    if (call("CFDataCreate", "%ld", (long)len) != errSecSuccess)
        return NULL;
    o = new_obj(T_DATA);
    o->bytes = (uint8_t *)dup_bytes(bytes, (size_t)len);
    o->len = (size_t)len;
    return (CFDataRef)o;
}

CFIndex CFDataGetLength(CFDataRef d)
{
    return (CFIndex)check(d, T_DATA, "CFDataGetLength")->len;
}

const UInt8 *CFDataGetBytePtr(CFDataRef d)
{
    return check(d, T_DATA, "CFDataGetBytePtr")->bytes;
}

static struct obj *new_container(int type, const void **keys,
                                 const void **vals, long n, int retains)
{
    struct obj *o = new_obj(type);
    long i;

    o->n = n;
    o->retains = retains;
    o->vals = calloc((size_t)n + 1, sizeof *o->vals);
    if (keys != NULL)
        o->keys = calloc((size_t)n + 1, sizeof *o->keys);
    if (o->vals == NULL || (keys != NULL && o->keys == NULL))
        die("out of memory");
    for (i = 0; i < n; i++) {
        if (vals[i] == NULL || (keys != NULL && keys[i] == NULL))
            die("container created with a NULL member");
        o->vals[i] = vals[i];
        if (keys != NULL)
            o->keys[i] = keys[i];
        if (retains) {
            CFRetain(vals[i]);
            if (keys != NULL)
                CFRetain(keys[i]);
        }
    }
    return o;
}

CFArrayRef CFArrayCreate(CFAllocatorRef alloc, const void **values, CFIndex n,
                         const CFArrayCallBacks *cb)
{
    (void)alloc;
    if (call("CFArrayCreate", "%ld", (long)n) != errSecSuccess)
        return NULL;
    return (CFArrayRef)new_container(T_ARRAY, NULL, values, n, cb != NULL);
}

CFIndex CFArrayGetCount(CFArrayRef a)
{
    return check(a, T_ARRAY, "CFArrayGetCount")->n;
}

const void *CFArrayGetValueAtIndex(CFArrayRef a, CFIndex i)
{
    struct obj *o = check(a, T_ARRAY, "CFArrayGetValueAtIndex");

    if (i < 0 || i >= o->n)
        die("CFArrayGetValueAtIndex: index %ld out of range", (long)i);
    return o->vals[i];
}

CFDictionaryRef CFDictionaryCreate(CFAllocatorRef alloc, const void **keys,
                                   const void **values, CFIndex n,
                                   const CFDictionaryKeyCallBacks *kcb,
                                   const CFDictionaryValueCallBacks *vcb)
{
    (void)alloc;
    if ((kcb == NULL) != (vcb == NULL))
        die("CFDictionaryCreate: mixed callbacks");
    if (call("CFDictionaryCreate", "%ld", (long)n) != errSecSuccess)
        return NULL;
    return (CFDictionaryRef)new_container(T_DICT, keys, values, n,
                                          kcb != NULL);
}

const void *CFDictionaryGetValue(CFDictionaryRef d, const void *key)
{
    struct obj *o = check(d, T_DICT, "CFDictionaryGetValue");
    long i;

    for (i = 0; i < o->n; i++)
        if (CFEqual(o->keys[i], key))
            return o->vals[i];
    return NULL;
}

/* --- the item store -------------------------------------------------------- */

static void store_add(struct obj *o)
{
    if (nstore == MAX_ITEMS)
        die("store full");
    store[nstore++] = o;    /* takes the creator's reference */
}

static void store_remove(int i)
{
    struct obj *o = store[i];

    store[i] = store[--nstore];
    CFRelease(o);
}

static struct obj *new_cert(const char *cn, const uint8_t *id, size_t len,
                            int keychain)
{
    struct obj *c = new_obj(T_CERT);

    c->str = dup_bytes(cn, strlen(cn));
    c->bytes = (uint8_t *)dup_bytes(id, len);
    c->len = len;
    c->keychain = keychain;
    return c;
}

static struct obj *new_key(const uint8_t *id, size_t len, int keychain,
                           int key_type)
{
    struct obj *k = new_obj(T_KEY);

    k->bytes = (uint8_t *)dup_bytes(id, len);
    k->len = len;
    k->keychain = keychain;
    k->key_type = key_type;
    return k;
}

static struct obj *find_key(const uint8_t *id, size_t len, int keychain)
{
    int i;

    for (i = 0; i < nstore; i++)
        if (store[i]->type == T_KEY && store[i]->len == len
            && memcmp(store[i]->bytes, id, len) == 0
            && (keychain < 0 || store[i]->keychain == keychain))
            return store[i];
    return NULL;
}

static struct obj *string_of(const char *s);

/* The parsed form of a query dictionary. */
struct query {
    struct obj *cls, *limit, *subject, *search, *items, *app_label, *kclass;
    struct obj *service, *account, *generic, *use_keychain;
    int return_ref, return_attrs;
};

static void parse_query(CFDictionaryRef q, struct query *out, const char *who)
{
    struct obj *d = check(q, T_DICT, who);
    long i;

    memset(out, 0, sizeof *out);
    for (i = 0; i < d->n; i++) {
        const void *k = d->keys[i];
        struct obj *v = check(d->vals[i], 0, who);

        if (k == kSecClass)
            out->cls = v;
        else if (k == kSecReturnRef)
            out->return_ref = (v == &bool_true_obj);
        else if (k == kSecMatchLimit)
            out->limit = v;
        else if (k == kSecMatchSubjectWholeString)
            out->subject = check(v, T_STRING, who);
        else if (k == kSecMatchSearchList)
            out->search = check(v, T_ARRAY, who);
        else if (k == kSecMatchItemList)
            out->items = check(v, T_ARRAY, who);
        else if (k == kSecAttrApplicationLabel)
            out->app_label = check(v, T_DATA, who);
        else if (k == kSecAttrKeyClass)
            out->kclass = v;
        else if (k == kSecAttrService)
            out->service = check(v, T_STRING, who);
        else if (k == kSecAttrAccount)
            out->account = check(v, T_STRING, who);
        else if (k == kSecAttrGeneric)
            out->generic = check(v, T_DATA, who);
        else if (k == kSecReturnAttributes)
            out->return_attrs = (v == &bool_true_obj);
        else if (k == kSecUseKeychain)
            out->use_keychain = check(v, T_KEYCHAIN, who);
        else
            die("%s: query key '%s' is not supported by the double", who,
                check(k, T_STRING, who)->str);
    }
    if (strcmp(who, "SecItemUpdate attributes") == 0)
        return;     /* what to change: checked by SecItemUpdate */
    if (out->cls == NULL)
        die("%s: query without kSecClass", who);
    if (out->cls == &kSecClassGenericPassword_obj
        && (out->service == NULL || out->subject != NULL
            || out->app_label != NULL || out->kclass != NULL))
        die("%s: a generic password is found by service (and account)", who);
    if (out->cls != &kSecClassGenericPassword_obj
        && (out->service != NULL || out->account != NULL
            || out->generic != NULL || out->return_attrs))
        die("%s: service, account, generic and return-attributes are used "
            "with generic passwords only", who);
}

static int in_search(const struct query *q, int keychain)
{
    long i;

    if (q->search == NULL)
        return 1;   /* default search list: every keychain */
    for (i = 0; i < q->search->n; i++)
        if (check(q->search->vals[i], T_KEYCHAIN, "search list")->keychain
            == keychain)
            return 1;
    return 0;
}

static const char *class_name(const struct obj *cls)
{
    return cls->str;
}

static int record_matches(const struct query *q, const struct obj *o)
{
    return o->type == T_GENP && in_search(q, o->keychain)
        && strcmp(o->svc, q->service->str) == 0
        && (q->account == NULL || strcmp(o->str, q->account->str) == 0);
}

/* A record's attributes: account, service and generic (if set). */
static struct obj *record_attrs(const struct obj *o)
{
    struct obj *acct = string_of(o->str), *svc = string_of(o->svc), *gen = NULL;
    struct obj *d;
    const void *keys[3], *vals[3];
    long n = 2;

    keys[0] = kSecAttrAccount;
    vals[0] = acct;
    keys[1] = kSecAttrService;
    vals[1] = svc;
    if (o->bytes != NULL) {
        gen = new_obj(T_DATA);
        gen->bytes = (uint8_t *)dup_bytes(o->bytes, o->len);
        gen->len = o->len;
        keys[2] = kSecAttrGeneric;
        vals[2] = gen;
        n = 3;
    }
    d = new_container(T_DICT, keys, vals, n, 1);
    CFRelease(acct);
    CFRelease(svc);
    if (gen != NULL)
        CFRelease(gen);
    return d;
}

/* Generic passwords: attributes only (never the secret data, which could
 * prompt), one dictionary or an array of them. */
static OSStatus copy_records(const struct query *q, CFTypeRef *result)
{
    const void *found[MAX_ITEMS];
    long n = 0, j;
    int i, all = q->limit == &kSecMatchLimitAll_obj;
    OSStatus st;

    if (!q->return_attrs || q->return_ref || result == NULL
        || (q->limit != &kSecMatchLimitOne_obj && !all))
        die("SecItemCopyMatching: records are read as attributes, limit "
            "one or all");
    st = call("SecItemCopyMatching", "genp %s", q->account != NULL
              ? q->account->str : "*");
    if (st != errSecSuccess)
        return st;
    for (i = 0; i < nstore; i++) {
        if (!record_matches(q, store[i]))
            continue;
        found[n++] = record_attrs(store[i]);
        if (!all)
            break;
    }
    if (n == 0)
        return errSecItemNotFound;
    if (!all) {
        *result = found[0];
        return errSecSuccess;
    }
    *result = new_container(T_ARRAY, NULL, found, n, 1);
    for (j = 0; j < n; j++)
        CFRelease(found[j]);
    return errSecSuccess;
}

OSStatus SecItemAdd(CFDictionaryRef attributes, CFTypeRef *result)
{
    struct query q;
    int i, keychain = 0;
    OSStatus st;

    parse_query(attributes, &q, "SecItemAdd");
    if (q.cls != &kSecClassGenericPassword_obj || q.account == NULL
        || q.search != NULL || q.limit != NULL || q.return_ref
        || q.return_attrs || result != NULL)
        die("SecItemAdd: the double adds generic passwords (service, "
            "account, generic, use-keychain), returning nothing");
    st = call("SecItemAdd", "genp %s", q.account->str);
    if (st != errSecSuccess)
        return st;
    if (q.use_keychain != NULL) {
        if (q.use_keychain->keychain < 0)
            return errSecNoSuchKeychain;
        keychain = q.use_keychain->keychain;
    }
    for (i = 0; i < nstore; i++)
        if (store[i]->type == T_GENP && store[i]->keychain == keychain
            && strcmp(store[i]->svc, q.service->str) == 0
            && strcmp(store[i]->str, q.account->str) == 0)
            return errSecDuplicateItem;
    dbl_put_record(q.service->str, q.account->str,
                   q.generic != NULL ? q.generic->bytes : NULL,
                   q.generic != NULL ? q.generic->len : 0, keychain);
    return errSecSuccess;
}

OSStatus SecItemUpdate(CFDictionaryRef query, CFDictionaryRef attributes)
{
    struct query q, a;
    int i, n = 0;
    OSStatus st;

    parse_query(query, &q, "SecItemUpdate");
    parse_query(attributes, &a, "SecItemUpdate attributes");
    if (q.cls != &kSecClassGenericPassword_obj || q.account == NULL
        || q.limit != NULL || q.return_ref || q.return_attrs
        || a.cls != NULL || a.generic == NULL || a.service != NULL
        || a.account != NULL || a.search != NULL)
        die("SecItemUpdate: the double updates one record's generic "
            "attribute");
    st = call("SecItemUpdate", "genp %s", q.account->str);
    if (st != errSecSuccess)
        return st;
    for (i = 0; i < nstore; i++) {
        struct obj *o = store[i];

        if (!record_matches(&q, o))
            continue;
        free(o->bytes);
        o->bytes = (uint8_t *)dup_bytes(a.generic->bytes, a.generic->len);
        o->len = a.generic->len;
        n++;
    }
    return n ? errSecSuccess : errSecItemNotFound;
}

OSStatus SecItemCopyMatching(CFDictionaryRef query, CFTypeRef *result)
{
    struct query q;
    OSStatus st;
    int i;

    parse_query(query, &q, "SecItemCopyMatching");
    if (q.cls == &kSecClassGenericPassword_obj)
        return copy_records(&q, result);
    if (!q.return_ref || q.limit != &kSecMatchLimitOne_obj || result == NULL)
        die("SecItemCopyMatching: the double supports return-ref, limit-one");
    st = call("SecItemCopyMatching", "%s %s", class_name(q.cls),
              q.subject != NULL ? q.subject->str : "");
    if (st != errSecSuccess)
        return st;
    for (i = 0; i < nstore; i++) {
        struct obj *o = store[i], *key;

        if (!in_search(&q, o->keychain))
            continue;
        if (q.app_label != NULL && (o->len != q.app_label->len
            || memcmp(o->bytes, q.app_label->bytes, o->len) != 0))
            continue;
        if (q.cls == &kSecClassKey_obj) {
            if (o->type != T_KEY)
                continue;
            *result = CFRetain(o);
            return errSecSuccess;
        }
        if (o->type != T_CERT)
            continue;
        if (q.subject != NULL && strcasecmp(o->str, q.subject->str) != 0)
            continue;
        if (q.cls == &kSecClassCertificate_obj) {
            *result = CFRetain(o);
            return errSecSuccess;
        }
        if (q.cls != &kSecClassIdentity_obj)
            die("SecItemCopyMatching: unknown class");
        key = find_key(o->bytes, o->len, o->keychain);
        if (key == NULL)
            continue;   /* a certificate without its key is no identity */
        {
            struct obj *idn = new_obj(T_IDENTITY);

            idn->cert = (struct obj *)CFRetain(o);
            idn->key = (struct obj *)CFRetain(key);
            *result = idn;
        }
        return errSecSuccess;
    }
    return errSecItemNotFound;
}

OSStatus SecItemDelete(CFDictionaryRef query)
{
    struct query q;
    char idhex[2 * 64 + 1];
    OSStatus st;
    int i, deleted = 0;

    parse_query(query, &q, "SecItemDelete");
    if (q.cls == &kSecClassCertificate_obj) {
        struct obj *c;

        if (q.items == NULL || q.items->n != 1)
            die("SecItemDelete: certificates are deleted by reference");
        c = check(q.items->vals[0], T_CERT, "SecItemDelete");
        st = call("SecItemDelete", "certificate cn=%s", c->str);
        if (st != errSecSuccess)
            return st;
        for (i = 0; i < nstore; i++) {
            if (store[i] == c && in_search(&q, c->keychain)) {
                store_remove(i);
                return errSecSuccess;
            }
        }
        return errSecItemNotFound;
    }
    if (q.cls == &kSecClassKey_obj) {
        if (q.app_label == NULL || q.kclass != &kSecAttrKeyClassPrivate_obj)
            die("SecItemDelete: keys are deleted by private key class and "
                "kSecAttrApplicationLabel only");
        hex(q.app_label->bytes, q.app_label->len, idhex, sizeof idhex);
        st = call("SecItemDelete", "key id=%s", idhex);
        if (st != errSecSuccess)
            return st;
        for (i = nstore - 1; i >= 0; i--) {
            struct obj *k = store[i];

            if (k->type == T_KEY && in_search(&q, k->keychain)
                && k->len == q.app_label->len
                && memcmp(k->bytes, q.app_label->bytes, k->len) == 0) {
                store_remove(i);
                deleted++;
            }
        }
        return deleted ? errSecSuccess : errSecItemNotFound;
    }
    if (q.cls == &kSecClassGenericPassword_obj) {
        if (q.account == NULL)
            die("SecItemDelete: records are deleted one account at a time");
        st = call("SecItemDelete", "genp %s", q.account->str);
        if (st != errSecSuccess)
            return st;
        for (i = nstore - 1; i >= 0; i--) {
            if (record_matches(&q, store[i])) {
                store_remove(i);
                deleted++;
            }
        }
        return deleted ? errSecSuccess : errSecItemNotFound;
    }
    die("SecItemDelete: class '%s' not supported (delete the certificate "
        "and the key separately)", class_name(q.cls));
    return errSecParam;
}

OSStatus SecAccessCreate(CFStringRef descriptor, CFArrayRef trusted,
                         SecAccessRef *out)
{
    struct obj *d = check(descriptor, T_STRING, "SecAccessCreate");
    OSStatus st;

    if (trusted != NULL || out == NULL)
        die("SecAccessCreate: the trusted list must be NULL (this app only)");
    st = call("SecAccessCreate", "%s", d->str);
    if (st != errSecSuccess)
        return st;
    *out = (SecAccessRef)new_obj(T_ACCESS);
    return errSecSuccess;
}

OSStatus SecKeychainOpen(const char *path, SecKeychainRef *out)
{
    struct obj *k;
    OSStatus st;
    int i;

    st = call("SecKeychainOpen", "%s", path);
    if (st != errSecSuccess)
        return st;
    k = new_obj(T_KEYCHAIN);
    k->str = dup_bytes(path, strlen(path));
    k->keychain = -1;   /* opening never creates: unknown stays unknown */
    for (i = 1; i < nkeychains; i++)
        if (strcmp(keychains[i], path) == 0)
            k->keychain = i;
    *out = (SecKeychainRef)k;
    return errSecSuccess;
}

OSStatus SecKeychainGetStatus(SecKeychainRef keychain, SecKeychainStatus *s)
{
    struct obj *k = check(keychain, T_KEYCHAIN, "SecKeychainGetStatus");
    OSStatus st = call("SecKeychainGetStatus", "%s", k->str);

    if (st != errSecSuccess)
        return st;
    if (k->keychain < 0)
        return errSecNoSuchKeychain;
    *s = 3;
    return errSecSuccess;
}

OSStatus SecKeychainSetUserInteractionAllowed(Boolean state)
{
    OSStatus st = call("SecKeychainSetUserInteractionAllowed", "%d",
                       (int)state);

    if (st == errSecSuccess)
        interaction = state;
    return st;
}

OSStatus SecKeychainGetUserInteractionAllowed(Boolean *state)
{
    OSStatus st = call("SecKeychainGetUserInteractionAllowed", NULL);

    if (st == errSecSuccess)
        *state = interaction;
    return st;
}

CFStringRef SecCopyErrorMessageString(OSStatus status, void *reserved)
{
    char text[64];

    (void)reserved;
    if (call("SecCopyErrorMessageString", "%d", (int)status) != errSecSuccess)
        return NULL;
    snprintf(text, sizeof text, "double message for %d", (int)status);
    {
        struct obj *o = new_obj(T_STRING);

        o->str = dup_bytes(text, strlen(text));
        return (CFStringRef)o;
    }
}

OSStatus SecIdentityCopyCertificate(SecIdentityRef identity,
                                    SecCertificateRef *out)
{
    struct obj *i = check(identity, T_IDENTITY, "SecIdentityCopyCertificate");
    OSStatus st = call("SecIdentityCopyCertificate", "%s", i->cert->str);

    if (st != errSecSuccess)
        return st;
    *out = (SecCertificateRef)CFRetain(i->cert);
    return errSecSuccess;
}

OSStatus SecIdentityCopyPrivateKey(SecIdentityRef identity, SecKeyRef *out)
{
    struct obj *i = check(identity, T_IDENTITY, "SecIdentityCopyPrivateKey");
    OSStatus st = call("SecIdentityCopyPrivateKey", "%s", i->cert->str);

    if (st != errSecSuccess)
        return st;
    *out = (SecKeyRef)CFRetain(i->key);
    return errSecSuccess;
}

static struct obj *string_of(const char *s)
{
    struct obj *o = new_obj(T_STRING);

    o->str = dup_bytes(s, strlen(s));
    return o;
}

OSStatus SecCertificateCopyCommonName(SecCertificateRef cert, CFStringRef *cn)
{
    struct obj *c = check(cert, T_CERT, "SecCertificateCopyCommonName");
    OSStatus st = call("SecCertificateCopyCommonName", "%s", c->str);

    if (st != errSecSuccess)
        return st;
    *cn = (CFStringRef)string_of(c->str);
    return errSecSuccess;
}

CFStringRef SecCertificateCopySubjectSummary(SecCertificateRef cert)
{
    struct obj *c = check(cert, T_CERT, "SecCertificateCopySubjectSummary");

    if (call("SecCertificateCopySubjectSummary", "%s", c->str)
        != errSecSuccess)
        return NULL;
    return (CFStringRef)string_of(c->str);
}

CFDictionaryRef SecKeyCopyAttributes(SecKeyRef key)
{
    struct obj *k = check(key, T_KEY, "SecKeyCopyAttributes");
    struct obj *id, *d;
    const void *keys[2], *vals[2];

    if (call("SecKeyCopyAttributes", NULL) != errSecSuccess)
        return NULL;
    id = new_obj(T_DATA);
    id->bytes = (uint8_t *)dup_bytes(k->bytes, k->len);
    id->len = k->len;
    keys[0] = kSecAttrApplicationLabel;
    vals[0] = id;
    keys[1] = kSecAttrKeyType;
    vals[1] = k->key_type == 2 ? kSecAttrKeyTypeECSECPrimeRandom
                               : kSecAttrKeyTypeRSA;
    d = new_container(T_DICT, keys, vals, 2, 1);
    CFRelease(id);
    return (CFDictionaryRef)d;
}

/* The fake PKCS#12 blob: "DBLP12\n" then "name=value\n" lines. */
static const char *field(const char *blob, const char *name, char *out,
                         size_t cap)
{
    size_t n = strlen(name);
    const char *p = blob;

    while ((p = strchr(p, '\n')) != NULL) {
        p++;
        if (strncmp(p, name, n) == 0 && p[n] == '=') {
            const char *e = strchr(p + n + 1, '\n');
            size_t len = e != NULL ? (size_t)(e - p - n - 1) : strlen(p + n + 1);

            if (len >= cap)
                len = cap - 1;
            memcpy(out, p + n + 1, len);
            out[len] = '\0';
            return out;
        }
    }
    return NULL;
}

OSStatus SecPKCS12Import(CFDataRef data, CFDictionaryRef options,
                         CFArrayRef *items)
{
    struct obj *d = check(data, T_DATA, "SecPKCS12Import");
    struct obj *opt = check(options, T_DICT, "SecPKCS12Import");
    struct obj *pass = NULL, *access = NULL, *target = NULL;
    char *blob, cn[256], pw[256], idhex[160], num[16], flags_s[16];
    uint8_t id[64];
    size_t id_len = 0;
    const void **entries;
    struct obj *arr;
    int count, flags, keychain = 0, i;
    long j;
    OSStatus st;

    for (j = 0; j < opt->n; j++) {
        if (opt->keys[j] == kSecImportExportPassphrase)
            pass = check(opt->vals[j], T_STRING, "SecPKCS12Import");
        else if (opt->keys[j] == kSecImportExportAccess)
            access = check(opt->vals[j], T_ACCESS, "SecPKCS12Import");
        else if (opt->keys[j] == kSecImportExportKeychain)
            target = check(opt->vals[j], T_KEYCHAIN, "SecPKCS12Import");
        else
            die("SecPKCS12Import: unsupported option");
    }
    if (pass == NULL || access == NULL || items == NULL)
        die("SecPKCS12Import: a passphrase and an access are required");
    st = call("SecPKCS12Import", "%s", target != NULL ? target->str : "");
    if (st != errSecSuccess)
        return st;
    interaction_at_import = interaction;
    if (target != NULL) {
        if (target->keychain < 0)
            return errSecNoSuchKeychain;
        keychain = target->keychain;
    }
    /* the text of dbl_make_p12, inside its DER wrapping */
    blob = memmem(d->bytes, d->len, "DBLP12\n", 7);
    blob = blob != NULL ? dup_bytes(blob, d->len - (size_t)((uint8_t *)blob
                                                            - d->bytes))
                        : dup_bytes("", 0);
    if (strncmp(blob, "DBLP12\n", 7) != 0
        || field(blob, "cn", cn, sizeof cn) == NULL
        || field(blob, "pass", pw, sizeof pw) == NULL
        || field(blob, "id", idhex, sizeof idhex) == NULL
        || field(blob, "count", num, sizeof num) == NULL
        || field(blob, "flags", flags_s, sizeof flags_s) == NULL) {
        free(blob);
        return errSecDecode;
    }
    free(blob);
    if (strcmp(pw, pass->str) != 0)
        return errSecAuthFailed;    /* what macOS reports for a bad MAC */
    for (i = 0; idhex[2 * i] != '\0' && i < 64; i++) {
        unsigned v;

        sscanf(idhex + 2 * i, "%2x", &v);
        id[i] = (uint8_t)v;
    }
    id_len = (size_t)i;
    count = atoi(num);
    flags = atoi(flags_s);
    for (i = 0; i < count; i++) {
        id[0] = (uint8_t)(id[0] + i);
        if (find_key(id, id_len, keychain) != NULL)
            return errSecDuplicateItem;
        id[0] = (uint8_t)(id[0] - i);
    }
    entries = calloc((size_t)count + 1, sizeof *entries);
    if (entries == NULL)
        die("out of memory");
    for (i = 0; i < count; i++) {
        struct obj *c, *k, *idn, *kid, *item;
        const void *ikeys[2], *ivals[2];
        char name[300];

        id[0] = (uint8_t)(id[0] + i);
        snprintf(name, sizeof name, i == 0 ? "%s" : "%s-%d", cn, i);
        c = new_cert(name, id, id_len, keychain);
        store_add(c);
        if (flags & DBL_P12_NO_KEY) {
            /* a certificate without its key: imported all the same, and
             * reported as a chain without an identity */
            const void *one[1];
            struct obj *chain;

            one[0] = c;
            chain = new_container(T_ARRAY, NULL, one, 1, 1);
            ikeys[0] = kSecImportItemCertChain;
            ivals[0] = chain;
            entries[i] = new_container(T_DICT, ikeys, ivals, 1, 1);
            CFRelease(chain);
            id[0] = (uint8_t)(id[0] - i);
            continue;
        }
        k = new_key(id, id_len, keychain, (flags & DBL_P12_EC) ? 2 : 1);
        store_add(k);
        idn = new_obj(T_IDENTITY);
        idn->cert = (struct obj *)CFRetain(c);
        idn->key = (struct obj *)CFRetain(k);
        kid = new_obj(T_DATA);
        kid->bytes = (uint8_t *)dup_bytes(id, id_len);
        kid->len = id_len;
        ikeys[0] = kSecImportItemIdentity;
        ivals[0] = idn;
        ikeys[1] = kSecImportItemKeyID;
        ivals[1] = kid;
        item = new_container(T_DICT, ikeys, ivals,
                             (flags & DBL_P12_NO_KEYID) ? 1 : 2, 1);
        CFRelease(idn);
        CFRelease(kid);
        entries[i] = item;
        id[0] = (uint8_t)(id[0] - i);
    }
    arr = new_container(T_ARRAY, NULL, entries, count, 1);
    for (i = 0; i < count; i++)
        CFRelease(entries[i]);
    free(entries);
    *items = (CFArrayRef)arr;
    return errSecSuccess;
}

/* --- CommonCrypto -------------------------------------------------------- */

unsigned char *CC_SHA256(const void *data, CC_LONG len, unsigned char *md)
{
    return SHA256(data, len, md);
}

/* --- control ------------------------------------------------------------- */

void dbl_reset(void)
{
    struct obj *o, *next;

    for (o = all_objs; o != NULL; o = next) {
        next = o->all_next;
        free(o->str);
        free(o->svc);
        free(o->bytes);
        free(o->keys);
        free(o->vals);
        free(o);
    }
    all_objs = NULL;
    created = 0;
    nstore = 0;
    nlog = 0;
    fail_at = 0;
    fired = 0;
    interaction = true;
    interaction_at_import = -1;
    cstring_ptr = 0;
    nkeychains = 1;
}

void dbl_fail_call(int n, OSStatus status)
{
    fail_at = n;
    fail_status = status;
    fired = 0;
}

int dbl_fired(void) { return fired; }
void dbl_log_clear(void) { nlog = 0; }
int dbl_calls(void) { return nlog; }

const char *dbl_call(int i)
{
    return i >= 0 && i < nlog && i < MAX_LOG ? log_buf[i] : "";
}

void dbl_set_interaction(Boolean allowed) { interaction = allowed; }
Boolean dbl_interaction(void) { return interaction; }
int dbl_interaction_at_import(void) { return interaction_at_import; }
void dbl_set_cstring_ptr(int enabled) { cstring_ptr = enabled; }
long dbl_created(void) { return created; }

long dbl_outstanding(void)
{
    struct obj *o;
    long refs = 0;

    for (o = all_objs; o != NULL; o = o->all_next)
        if (!o->dead)
            refs += o->refs;
    return refs - nstore;
}

int dbl_add_keychain(const char *path)
{
    if (nkeychains == MAX_KEYCHAINS)
        die("too many keychains");
    snprintf(keychains[nkeychains], sizeof keychains[0], "%s", path);
    return nkeychains++;
}

int dbl_count(char cls, int keychain)
{
    int i, n = 0;

    for (i = 0; i < nstore; i++)
        if (store[i]->type == (cls == 'c' ? T_CERT : cls == 'g' ? T_GENP
                               : T_KEY)
            && (keychain < 0 || store[i]->keychain == keychain))
            n++;
    return n;
}

int dbl_has_cert(const char *cn, int keychain)
{
    int i;

    for (i = 0; i < nstore; i++)
        if (store[i]->type == T_CERT && strcmp(store[i]->str, cn) == 0
            && (keychain < 0 || store[i]->keychain == keychain))
            return 1;
    return 0;
}

void dbl_put_record(const char *service, const char *account,
                    const uint8_t *generic, size_t len, int keychain)
{
    struct obj *o = new_obj(T_GENP);

    o->str = dup_bytes(account, strlen(account));
    o->svc = dup_bytes(service, strlen(service));
    if (generic != NULL) {
        o->bytes = (uint8_t *)dup_bytes(generic, len);
        o->len = len;
    }
    o->keychain = keychain;
    store_add(o);
}

const char *dbl_record(const char *account)
{
    int i;

    for (i = 0; i < nstore; i++)
        if (store[i]->type == T_GENP && strcmp(store[i]->str, account) == 0)
            return store[i]->bytes != NULL ? (const char *)store[i]->bytes
                                           : "";
    return NULL;
}

int dbl_has_key(const uint8_t *id, size_t len)
{
    return find_key(id, len, -1) != NULL;
}

void dbl_put(const char *cn, const uint8_t *id, size_t len, int keychain,
             int with_cert, int with_key)
{
    if (with_cert)
        store_add(new_cert(cn, id, len, keychain));
    if (with_key)
        store_add(new_key(id, len, keychain, 1));
}

/* Wrap buf[0..len) in a DER header of tag, in place; 0 if it does not fit. */
static size_t der_wrap(uint8_t *buf, size_t len, size_t cap, uint8_t tag)
{
    size_t hdr = len < 128 ? 2 : len < 256 ? 3 : 4;

    if (len > 65535 || len + hdr > cap)
        return 0;
    memmove(buf + hdr, buf, len);
    buf[0] = tag;
    if (hdr == 2) {
        buf[1] = (uint8_t)len;
    } else if (hdr == 3) {
        buf[1] = 0x81;
        buf[2] = (uint8_t)len;
    } else {
        buf[1] = 0x82;
        buf[2] = (uint8_t)(len >> 8);
        buf[3] = (uint8_t)len;
    }
    return len + hdr;
}

static size_t der_prepend(uint8_t *buf, size_t len, size_t cap,
                          const char *pre, size_t n)
{
    if (len == 0 || len + n > cap)
        return 0;
    memmove(buf + n, buf, len);
    memcpy(buf, pre, n);
    return len + n;
}

#define OID_DATA_DER "\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x01"
#define OID_SECRET_BAG_DER \
    "\x06\x0b\x2a\x86\x48\x86\xf7\x0d\x01\x0c\x0a\x01\x05"
/* MacData: SHA-256, 32-byte digest and 8-byte salt of zeros, 2,048
 * iterations (what OpenSSL writes). */
static const char MAC_DATA_DER[] =
    "\x30\x41\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04"
    "\x02\x01\x05\x00\x04\x20"
    "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    "\x04\x08\0\0\0\0\0\0\0\0\x02\x02\x08\x00";

/* The fake blob's text travels as a secret bag in a DER PFX, so that the
 * backend's walk over the PKCS#12 structure sees a well-formed file:
 * PFX { 3, data { [ data { [ secretBag { text } ] } ] }, MacData }. */
size_t dbl_make_p12(char *out, size_t cap, const char *cn,
                    const char *password, const uint8_t *id, size_t id_len,
                    int count, int flags)
{
    char idhex[2 * 64 + 1];
    uint8_t *buf = (uint8_t *)out;
    int n;
    size_t len;

    hex(id, id_len, idhex, sizeof idhex);
    n = snprintf(out, cap,
                 "DBLP12\ncn=%s\npass=%s\nid=%s\ncount=%d\nflags=%d\n",
                 cn, password, idhex, count, flags);
    if (n < 0 || (size_t)n >= cap)
        return 0;
    len = (size_t)n;
    len = der_wrap(buf, len, cap, 0x04);
    len = der_wrap(buf, len, cap, 0xa0);
    len = der_prepend(buf, len, cap, OID_SECRET_BAG_DER,
                      sizeof OID_SECRET_BAG_DER - 1);
    len = der_wrap(buf, len, cap, 0x30);    /* SafeBag */
    len = der_wrap(buf, len, cap, 0x30);    /* SafeContents */
    len = der_wrap(buf, len, cap, 0x04);
    len = der_wrap(buf, len, cap, 0xa0);
    len = der_prepend(buf, len, cap, OID_DATA_DER, sizeof OID_DATA_DER - 1);
    len = der_wrap(buf, len, cap, 0x30);    /* ContentInfo */
    len = der_wrap(buf, len, cap, 0x30);    /* AuthenticatedSafe */
    len = der_wrap(buf, len, cap, 0x04);
    len = der_wrap(buf, len, cap, 0xa0);
    len = der_prepend(buf, len, cap, OID_DATA_DER, sizeof OID_DATA_DER - 1);
    len = der_wrap(buf, len, cap, 0x30);    /* authSafe ContentInfo */
    len = der_prepend(buf, len, cap, "\x02\x01\x03", 3);
    if (len == 0 || len + sizeof MAC_DATA_DER - 1 > cap)
        return 0;
    memcpy(buf + len, MAC_DATA_DER, sizeof MAC_DATA_DER - 1);
    len += sizeof MAC_DATA_DER - 1;
    return der_wrap(buf, len, cap, 0x30);   /* PFX */
}
