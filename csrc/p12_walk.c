/*
 * p12_walk.c -- see p12_walk.h.  Only reads: every element is bounded by
 * its parent, nesting by MAX_DEPTH, and the bytes of constructed OCTET
 * STRINGs are joined into buffers no larger than the input.
 */
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "p12_walk.h"

#define MAX_DEPTH 24
#define MAX_BUFS 64

enum { T_INTEGER = 0x02, T_OCTETS = 0x04, T_OID = 0x06, T_SEQUENCE = 0x30,
       T_OCTETS_C = 0x24, T_CTX0 = 0xa0 };

typedef struct span {
    const uint8_t *p;
    size_t n;
} span;

typedef struct walk {
    kc_error *err;
    uint8_t *bufs[MAX_BUFS];    /* joined constructed OCTET STRINGs */
    int nbufs;
} walk;

/* 1.2.840.113549.1 (pkcs) then the rest */
#define PKCS "\x2a\x86\x48\x86\xf7\x0d\x01"
static const char OID_DATA[] = PKCS "\x07\x01";
static const char OID_ENCRYPTED_DATA[] = PKCS "\x07\x06";
static const char OID_SHROUDED_KEY_BAG[] = PKCS "\x0c\x0a\x01\x02";
static const char OID_SAFE_CONTENTS_BAG[] = PKCS "\x0c\x0a\x01\x06";
static const char OID_PBES2[] = PKCS "\x05\x0d";
static const char OID_PBKDF2[] = PKCS "\x05\x0c";
static const char OID_PBMAC1[] = PKCS "\x05\x0e";
static const char OID_PKCS12_PBE[] = PKCS "\x0c\x01";    /* + 1..6 */
static const char OID_PKCS5[] = PKCS "\x05";             /* + PBES1 ids */

static int32_t bad(walk *w, const char *fmt, ...)
{
    va_list ap;

    if (w->err != NULL) {
        w->err->status = KC_errSecDecode;
        w->err->native_code = 0;
        va_start(ap, fmt);
        vsnprintf(w->err->message, sizeof w->err->message, fmt, ap);
        va_end(ap);
    }
    return KC_errSecDecode;
}

static int oid_is(span oid, const char *want, size_t want_len)
{
    return oid.n == want_len && memcmp(oid.p, want, want_len) == 0;
}
#define OID_IS(oid, name) oid_is(oid, name, sizeof name - 1)

/* The next element of *in: its tag and content; *in moves past it.  An
 * indefinite length (BER) ends at the end-of-contents of its level. */
static int next(span *in, int depth, unsigned *tag, span *content)
{
    size_t i, len = 0, hdr = 2;
    unsigned nlen;

    if (depth > MAX_DEPTH || in->n < 2)
        return 0;
    *tag = in->p[0];
    if ((*tag & 0x1f) == 0x1f)
        return 0;                       /* high tag numbers: not PKCS#12 */
    if (in->p[1] == 0x80) {             /* indefinite: constructed only */
        span rest = { in->p + 2, in->n - 2 }, child;
        unsigned t;

        if (!(*tag & 0x20))
            return 0;
        for (;;) {
            if (rest.n >= 2 && rest.p[0] == 0 && rest.p[1] == 0)
                break;
            if (!next(&rest, depth + 1, &t, &child))
                return 0;
        }
        content->p = in->p + 2;
        content->n = (size_t)(rest.p - content->p);
        in->n -= (size_t)(rest.p + 2 - in->p);
        in->p = rest.p + 2;
        return 1;
    }
    if (in->p[1] & 0x80) {
        nlen = in->p[1] & 0x7f;
        if (nlen > sizeof(size_t) || nlen > 4 || in->n < 2 + (size_t)nlen)
            return 0;
        for (i = 0; i < nlen; i++)
            len = (len << 8) | in->p[2 + i];
        hdr += nlen;
    } else {
        len = in->p[1];
    }
    if (len > in->n - hdr)
        return 0;
    content->p = in->p + hdr;
    content->n = len;
    in->p += hdr + len;
    in->n -= hdr + len;
    return 1;
}

/* The next element, which must have tag want. */
static int expect(span *in, int depth, unsigned want, span *content)
{
    unsigned tag;

    return next(in, depth, &tag, content) && tag == want;
}

/* An OCTET STRING's bytes: primitive, or constructed (BER) joined. */
static int octets(walk *w, span *in, int depth, span *out)
{
    unsigned tag;
    span c, piece;
    uint8_t *buf;
    size_t used = 0;

    if (!next(in, depth, &tag, &c))
        return 0;
    if (tag == T_OCTETS) {
        *out = c;
        return 1;
    }
    if (tag != T_OCTETS_C || w->nbufs == MAX_BUFS)
        return 0;
    buf = malloc(c.n > 0 ? c.n : 1);    /* the pieces fit in their parent */
    if (buf == NULL)
        return 0;
    w->bufs[w->nbufs++] = buf;
    while (c.n > 0) {
        if (!octets(w, &c, depth + 1, &piece))
            return 0;
        memcpy(buf + used, piece.p, piece.n);
        used += piece.n;
    }
    out->p = buf;
    out->n = used;
    return 1;
}

/* A non-negative INTEGER; LONG_MAX stands for anything larger. */
static int integer(span *in, int depth, long *value)
{
    span c;
    size_t i;
    unsigned long v = 0;

    if (!expect(in, depth, T_INTEGER, &c) || c.n == 0 || (c.p[0] & 0x80))
        return 0;
    for (i = 0; i < c.n; i++) {
        if (v > (unsigned long)LONG_MAX >> 8) {
            v = (unsigned long)LONG_MAX;
            break;
        }
        v = (v << 8) | c.p[i];
    }
    *value = v > (unsigned long)LONG_MAX ? LONG_MAX : (long)v;
    return 1;
}

static int32_t cap(walk *w, long iterations, const char *what)
{
    if (iterations == LONG_MAX)
        return bad(w, "the PKCS#12 %s asks for more than %ld key derivation "
                   "iterations (limit %d)", what, LONG_MAX,
                   KC_P12_MAX_ITERATIONS);
    if (iterations < 1 || iterations > KC_P12_MAX_ITERATIONS)
        return bad(w, "the PKCS#12 %s asks for %ld key derivation iterations "
                   "(limit %d)", what, iterations, KC_P12_MAX_ITERATIONS);
    return KC_errSecSuccess;
}

/* PBKDF2-params ::= SEQUENCE { salt, iterationCount INTEGER, ... } inside
 * an AlgorithmIdentifier whose OID must be PBKDF2. */
static int32_t check_pbkdf2(walk *w, span *in, int depth, const char *what)
{
    span alg, oid, params, salt;
    long iter;

    if (!expect(in, depth, T_SEQUENCE, &alg)
        || !expect(&alg, depth + 1, T_OID, &oid))
        return bad(w, "the PKCS#12 %s has no key derivation", what);
    if (!OID_IS(oid, OID_PBKDF2))
        return bad(w, "the PKCS#12 %s uses a key derivation keychain_ext "
                   "does not know", what);
    if (!expect(&alg, depth + 1, T_SEQUENCE, &params)
        || !expect(&params, depth + 2, T_OCTETS, &salt)
        || !integer(&params, depth + 2, &iter))
        return bad(w, "the PKCS#12 %s has malformed PBKDF2 parameters", what);
    return cap(w, iter, what);
}

/* An encryption AlgorithmIdentifier: PBES2 (PBKDF2), PKCS#12 PBE or
 * PBES1; anything else cannot be checked and is refused. */
static int32_t check_alg(walk *w, span *in, int depth, const char *what)
{
    span alg, oid, params, salt;
    long iter;
    int pkcs12_pbe, pbes1;

    if (!expect(in, depth, T_SEQUENCE, &alg)
        || !expect(&alg, depth + 1, T_OID, &oid))
        return bad(w, "the PKCS#12 %s has no encryption algorithm", what);
    if (OID_IS(oid, OID_PBES2)) {
        if (!expect(&alg, depth + 1, T_SEQUENCE, &params))
            return bad(w, "the PKCS#12 %s has malformed PBES2 parameters",
                       what);
        return check_pbkdf2(w, &params, depth + 2, what);
    }
    pkcs12_pbe = oid.n == sizeof OID_PKCS12_PBE
        && memcmp(oid.p, OID_PKCS12_PBE, oid.n - 1) == 0
        && oid.p[oid.n - 1] >= 1 && oid.p[oid.n - 1] <= 6;
    pbes1 = oid.n == sizeof OID_PKCS5
        && memcmp(oid.p, OID_PKCS5, oid.n - 1) == 0
        && strchr("\x01\x03\x04\x06\x0a\x0b", oid.p[oid.n - 1]) != NULL
        && oid.p[oid.n - 1] != 0;
    if (!pkcs12_pbe && !pbes1)
        return bad(w, "the PKCS#12 %s uses an encryption keychain_ext does "
                   "not know", what);
    if (!expect(&alg, depth + 1, T_SEQUENCE, &params)
        || !octets(w, &params, depth + 2, &salt)
        || !integer(&params, depth + 2, &iter))
        return bad(w, "the PKCS#12 %s has malformed PBE parameters", what);
    return cap(w, iter, what);
}

/* SafeContents ::= SEQUENCE OF SafeBag { bagId, [0] bagValue, attrs } */
static int32_t walk_bags(walk *w, span in, int depth)
{
    span bags, bag, oid, value, inner;
    int32_t st;

    if (!expect(&in, depth, T_SEQUENCE, &bags))
        return bad(w, "a PKCS#12 safe holds no bags");
    while (bags.n > 0) {
        if (!expect(&bags, depth + 1, T_SEQUENCE, &bag)
            || !expect(&bag, depth + 2, T_OID, &oid)
            || !expect(&bag, depth + 2, T_CTX0, &value))
            return bad(w, "a PKCS#12 bag is malformed");
        if (OID_IS(oid, OID_SHROUDED_KEY_BAG)) {
            if (!expect(&value, depth + 3, T_SEQUENCE, &inner))
                return bad(w, "a PKCS#12 key bag is malformed");
            st = check_alg(w, &inner, depth + 4, "key bag");
        } else if (OID_IS(oid, OID_SAFE_CONTENTS_BAG)) {
            st = walk_bags(w, value, depth + 3);
        } else {
            st = KC_errSecSuccess;  /* key, certificate, CRL, secret bags */
        }
        if (st != KC_errSecSuccess)
            return st;
    }
    return KC_errSecSuccess;
}

/* AuthenticatedSafe ::= SEQUENCE OF ContentInfo (data or encryptedData) */
static int32_t walk_safe(walk *w, span in, int depth)
{
    span safe, ci, oid, content, data, enc, eci, eoid;
    long version;
    int32_t st;

    if (!expect(&in, depth, T_SEQUENCE, &safe))
        return bad(w, "the PKCS#12 authenticated safe is malformed");
    while (safe.n > 0) {
        if (!expect(&safe, depth + 1, T_SEQUENCE, &ci)
            || !expect(&ci, depth + 2, T_OID, &oid)
            || !expect(&ci, depth + 2, T_CTX0, &content))
            return bad(w, "a PKCS#12 content is malformed");
        if (OID_IS(oid, OID_DATA)) {
            if (!octets(w, &content, depth + 3, &data))
                return bad(w, "a PKCS#12 data content is malformed");
            st = walk_bags(w, data, depth + 3);
        } else if (OID_IS(oid, OID_ENCRYPTED_DATA)) {
            if (!expect(&content, depth + 3, T_SEQUENCE, &enc)
                || !integer(&enc, depth + 4, &version)
                || !expect(&enc, depth + 4, T_SEQUENCE, &eci)
                || !expect(&eci, depth + 5, T_OID, &eoid))
                return bad(w, "a PKCS#12 encrypted content is malformed");
            st = check_alg(w, &eci, depth + 5, "encrypted part");
        } else {
            return bad(w, "a PKCS#12 content is neither data nor "
                       "password-encrypted data");
        }
        if (st != KC_errSecSuccess)
            return st;
    }
    return KC_errSecSuccess;
}

/* MacData ::= SEQUENCE { DigestInfo { AlgorithmIdentifier, digest },
 *                        macSalt OCTET STRING, iterations INTEGER DEFAULT 1 } */
static int32_t walk_mac(walk *w, span in, int depth)
{
    span mac, digest_info, alg, oid, params, salt;
    long iter = 1;
    int32_t st;

    if (!expect(&in, depth, T_SEQUENCE, &mac)
        || !expect(&mac, depth + 1, T_SEQUENCE, &digest_info)
        || !expect(&digest_info, depth + 2, T_SEQUENCE, &alg)
        || !expect(&alg, depth + 3, T_OID, &oid)
        || !octets(w, &mac, depth + 1, &salt))
        return bad(w, "the PKCS#12 MAC is malformed");
    if (mac.n > 0 && !integer(&mac, depth + 1, &iter))
        return bad(w, "the PKCS#12 MAC's iteration count is malformed");
    st = cap(w, iter, "MAC");
    if (st == KC_errSecSuccess && OID_IS(oid, OID_PBMAC1)) {
        /* PBMAC1-params ::= SEQUENCE { keyDerivationFunc, messageAuthScheme } */
        if (!expect(&alg, depth + 3, T_SEQUENCE, &params))
            return bad(w, "the PKCS#12 PBMAC1 parameters are malformed");
        st = check_pbkdf2(w, &params, depth + 4, "MAC");
    }
    return st;
}

int32_t kc_p12_check_kdf(const uint8_t *p12, size_t len, kc_error *err)
{
    walk w;
    span in = { p12, len }, pfx, auth, oid, content, data;
    long version;
    int32_t st;
    int i;

    memset(&w, 0, sizeof w);
    w.err = err;
    if (p12 == NULL || !expect(&in, 0, T_SEQUENCE, &pfx) || in.n != 0
        || !integer(&pfx, 1, &version) || version != 3
        || !expect(&pfx, 1, T_SEQUENCE, &auth)) {
        st = bad(&w, "not a PKCS#12 file");
        goto out;
    }
    if (!expect(&auth, 2, T_OID, &oid) || !OID_IS(oid, OID_DATA)
        || !expect(&auth, 2, T_CTX0, &content)
        || !octets(&w, &content, 3, &data)) {
        st = bad(&w, "not a password-integrity PKCS#12 file");
        goto out;
    }
    st = walk_safe(&w, data, 3);
    if (st == KC_errSecSuccess && pfx.n > 0)
        st = walk_mac(&w, pfx, 1);
out:
    for (i = 0; i < w.nbufs; i++)
        free(w.bufs[i]);
    return st;
}
