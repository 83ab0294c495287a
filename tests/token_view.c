/*
 * token_view.c -- list a token's objects as JSON, independently of
 * keychain_ext (its own PKCS#11 calls, nothing of csrc/).
 *
 * Environment: VIEW_MODULE (the module), VIEW_TOKEN (token label),
 * VIEW_INIT_ARGS (C_Initialize's pReserved, for NSS; optional).  The PIN
 * comes on standard input, never in argv.  Logged in, so private objects
 * are listed too; objects without a label are listed with label "".
 * Output: one JSON array of {"class", "label", "id"} sorted by the caller.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/pkcs11.h>

static const char *class_name(CK_OBJECT_CLASS c)
{
    switch (c) {
    case CKO_DATA: return "data";
    case CKO_CERTIFICATE: return "certificate";
    case CKO_PUBLIC_KEY: return "public";
    case CKO_PRIVATE_KEY: return "private";
    case CKO_SECRET_KEY: return "secret";
    default: return "other";
    }
}

static void json_string(const unsigned char *s, CK_ULONG n)
{
    CK_ULONG i;
    putchar('"');
    for (i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\')
            printf("\\%c", s[i]);
        else if (s[i] < 0x20 || s[i] >= 0x7f)
            printf("\\u%04x", s[i]);
        else
            putchar(s[i]);
    }
    putchar('"');
}

int main(void)
{
    const char *module = getenv("VIEW_MODULE"), *want = getenv("VIEW_TOKEN");
    CK_C_INITIALIZE_ARGS args;
    CK_C_GetFunctionList get;
    CK_FUNCTION_LIST_PTR f;
    CK_SLOT_ID slots[64];
    CK_ULONG n = 64, i, got;
    CK_TOKEN_INFO info;
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE h[256];
    char pin[256], padded[32];
    size_t len, w;
    void *dl;
    int first = 1;

    if (!module || !want || !(dl = dlopen(module, RTLD_NOW)) ||
        !(get = (CK_C_GetFunctionList)dlsym(dl, "C_GetFunctionList")) ||
        get(&f) != CKR_OK)
        return fprintf(stderr, "token_view: cannot load the module\n"), 2;
    if (!fgets(pin, sizeof pin, stdin))
        pin[0] = 0;
    pin[strcspn(pin, "\r\n")] = 0;
    memset(&args, 0, sizeof args);
    args.flags = CKF_OS_LOCKING_OK;
    args.pReserved = getenv("VIEW_INIT_ARGS");
    if (f->C_Initialize(&args) != CKR_OK ||
        f->C_GetSlotList(CK_TRUE, slots, &n) != CKR_OK)
        return fprintf(stderr, "token_view: cannot initialize\n"), 2;
    len = strlen(want);
    memset(padded, ' ', sizeof padded);
    memcpy(padded, want, len < sizeof padded ? len : sizeof padded);
    for (i = 0; i < n; i++)
        if (f->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
            memcmp(info.label, padded, sizeof padded) == 0)
            break;
    if (i == n)
        return fprintf(stderr, "token_view: no token %s\n", want), 2;
    if (f->C_OpenSession(slots[i], CKF_SERIAL_SESSION, NULL, NULL, &s) != CKR_OK ||
        f->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)) != CKR_OK ||
        f->C_FindObjectsInit(s, NULL, 0) != CKR_OK ||
        f->C_FindObjects(s, h, 256, &got) != CKR_OK)
        return fprintf(stderr, "token_view: cannot list the token\n"), 2;
    f->C_FindObjectsFinal(s);
    putchar('[');
    for (i = 0; i < got; i++) {
        CK_OBJECT_CLASS cls = (CK_OBJECT_CLASS)-1;
        unsigned char label[512], id[256];
        CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls},
                            {CKA_LABEL, label, sizeof label},
                            {CKA_ID, id, sizeof id}};
        CK_RV rv = f->C_GetAttributeValue(s, h[i], t, 3);
        printf("%s{\"class\": ", first ? "" : ", ");
        first = 0;
        if (rv != CKR_OK && rv != CKR_ATTRIBUTE_TYPE_INVALID &&
            rv != CKR_ATTRIBUTE_SENSITIVE) {
            printf("\"unreadable\", \"label\": \"0x%lx\", \"id\": null}", (unsigned long)rv);
            continue;
        }
        printf("\"%s\", \"label\": ", class_name(cls));
        w = t[1].ulValueLen == CK_UNAVAILABLE_INFORMATION ? 0 : t[1].ulValueLen;
        json_string(label, w);
        printf(", \"id\": ");
        if (t[2].ulValueLen == CK_UNAVAILABLE_INFORMATION) {
            printf("null}");
        } else {
            putchar('"');
            for (w = 0; w < t[2].ulValueLen; w++)
                printf("%02x", id[w]);
            printf("\"}");
        }
    }
    printf("]\n");
    f->C_Logout(s);
    f->C_CloseSession(s);
    return 0;
}
