"""What the benchmark-only ports share: the PKCS#12 parse (with
``cryptography``) into the exact bytes the C layer puts into its templates,
the OSStatus-style errors, and the PKCS#11 constants both ports use.

The parse mirrors csrc/keychain_pkcs11.c copy_identity_from_pkcs12 +
create_cert/create_key: certificate DER, subject/issuer DER, serial as a DER
INTEGER, CKA_ID = SHA-1 of the public key's BIT STRING (X509_pubkey_digest,
which is what macOS reports as kSecImportItemKeyID), RSA numbers big-endian
minimal, EC: the named curve's OID DER and the private value padded to the
field size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from keychain_ext.errors import (
    DecodeError,
    DuplicateItemError,
    ItemNotFoundError,
    Pkcs12VerifyFailureError,
    UnimplementedError,
)

__all__ = [
    "Material",
    "parse_p12",
    "DuplicateItemError",
    "ItemNotFoundError",
    "LookupResult",
    "EPHEMERAL",
]

EPHEMERAL = 1  # KC_PREAUTH_EPHEMERAL

# PKCS#11 numbers (pkcs11t.h) used by both ports.
CKO_CERTIFICATE, CKO_PRIVATE_KEY = 1, 3
CKC_X_509 = 0
CKK_RSA, CKK_EC = 0, 3
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL = 0x0, 0x1, 0x2, 0x3
CKA_VALUE, CKA_CERTIFICATE_TYPE, CKA_ISSUER, CKA_SERIAL_NUMBER = 0x11, 0x80, 0x81, 0x82
CKA_KEY_TYPE, CKA_SUBJECT, CKA_ID, CKA_SENSITIVE = 0x100, 0x101, 0x102, 0x103
CKA_DECRYPT, CKA_UNWRAP, CKA_SIGN, CKA_SIGN_RECOVER, CKA_DERIVE = 0x105, 0x107, 0x108, 0x109, 0x10C
CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT = 0x120, 0x122, 0x123
CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT = (
    0x124,
    0x125,
    0x126,
    0x127,
    0x128,
)
CKA_EXTRACTABLE, CKA_EC_PARAMS, CKA_ALWAYS_AUTHENTICATE = 0x162, 0x180, 0x202
CKO_DATA, CKA_APPLICATION = 0, 0x10
LEASE_APPLICATION = "keychain_ext"

_CURVE_OIDS = {  # DER of the named curves' OBJECT IDENTIFIERs
    "secp256r1": bytes.fromhex("06082a8648ce3d030107"),
    "secp384r1": bytes.fromhex("06052b81040022"),
    "secp521r1": bytes.fromhex("06052b81040023"),
}


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    n = len(body)
    length = (
        bytes([n])
        if n < 0x80
        else bytes([0x80 | ((n.bit_length() + 7) // 8)])
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )
    return b"\x02" + length + body


def _be(value: int, size: int = 0) -> bytes:
    return value.to_bytes(size or max(1, (value.bit_length() + 7) // 8), "big")


@dataclass(frozen=True)
class Material:
    """An identity ready for C_CreateObject: the template values."""

    key_type: str  # "rsa" or "ec"
    key_id: bytes  # SHA-1 of the public key (CKA_ID)
    cert: bytes  # CKA_VALUE of the certificate
    subject: bytes
    issuer: bytes
    serial: bytes  # DER INTEGER
    key_attrs: tuple  # ((CKA_*, bytes), ...) of the private key's numbers


def parse_p12(data: bytes, password: bytes) -> Material:
    """PKCS#12 bytes -> Material, with the C layer's error statuses."""
    if not data:
        raise DecodeError(detail="empty PKCS#12 data", operation="preauth_key")
    try:
        key, cert, _ = pkcs12.load_key_and_certificates(data, password or None)
    except ValueError as exc:
        msg = str(exc).lower()
        if "password" in msg or "mac" in msg:
            raise Pkcs12VerifyFailureError(
                detail="wrong password for the PKCS#12 file", operation="preauth_key"
            ) from None
        raise DecodeError(detail=f"not a PKCS#12 file ({exc})", operation="preauth_key") from None
    if key is None:
        raise DecodeError(detail="the PKCS#12 file holds no private key", operation="preauth_key")
    if cert is None:
        raise DecodeError(detail="the PKCS#12 file holds no certificate", operation="preauth_key")
    pub = cert.public_key()
    if pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise DecodeError(
            detail="the private key does not match the certificate", operation="preauth_key"
        )
    key_id = x509.SubjectKeyIdentifier.from_public_key(pub).digest  # SHA-1 of the BIT STRING
    if isinstance(key, rsa.RSAPrivateKey):
        priv = key.private_numbers()
        pubn = priv.public_numbers
        key_type = "rsa"
        attrs: tuple = (
            (CKA_MODULUS, _be(pubn.n)),
            (CKA_PUBLIC_EXPONENT, _be(pubn.e)),
            (CKA_PRIVATE_EXPONENT, _be(priv.d)),
            (CKA_PRIME_1, _be(priv.p)),
            (CKA_PRIME_2, _be(priv.q)),
            (CKA_EXPONENT_1, _be(priv.dmp1)),
            (CKA_EXPONENT_2, _be(priv.dmq1)),
            (CKA_COEFFICIENT, _be(priv.iqmp)),
        )
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        oid = _CURVE_OIDS.get(key.curve.name)
        if oid is None:
            raise UnimplementedError(
                detail=f"unsupported curve {key.curve.name}", operation="preauth_key"
            )
        key_type = "ec"
        size = (key.curve.key_size + 7) // 8
        attrs = ((CKA_EC_PARAMS, oid), (CKA_VALUE, _be(key.private_numbers().private_value, size)))
    else:
        raise UnimplementedError(
            detail="unsupported key type (RSA and EC are supported)", operation="preauth_key"
        )
    return Material(
        key_type=key_type,
        key_id=key_id,
        cert=cert.public_bytes(serialization.Encoding.DER),
        subject=cert.subject.public_bytes(),
        issuer=cert.issuer.public_bytes(),
        serial=_der_integer(cert.serial_number),
        key_attrs=attrs,
    )


def cert_template(m: Material, label: bytes, token: bool) -> list:
    """(CKA_*, value) pairs of the certificate object, as the C layer."""
    return [
        (CKA_CLASS, CKO_CERTIFICATE),
        (CKA_CERTIFICATE_TYPE, CKC_X_509),
        (CKA_TOKEN, token),
        (CKA_PRIVATE, False),
        (CKA_LABEL, label),
        (CKA_ID, m.key_id),
        (CKA_VALUE, m.cert),
        (CKA_SUBJECT, m.subject),
        (CKA_ISSUER, m.issuer),
        (CKA_SERIAL_NUMBER, m.serial),
    ]


def key_template(m: Material, label: bytes, token: bool) -> list:
    """(CKA_*, value) pairs of the private key: private, sensitive, never
    extractable, sign only (createAccess)."""
    return [
        (CKA_CLASS, CKO_PRIVATE_KEY),
        (CKA_KEY_TYPE, CKK_RSA if m.key_type == "rsa" else CKK_EC),
        (CKA_TOKEN, token),
        (CKA_LABEL, label),
        (CKA_ID, m.key_id),
        (CKA_PRIVATE, True),
        (CKA_SENSITIVE, True),
        (CKA_EXTRACTABLE, False),
        (CKA_SIGN, True),
        (CKA_DECRYPT, False),
        (CKA_UNWRAP, False),
        (CKA_DERIVE, False),
        (CKA_SIGN_RECOVER, False),
        (CKA_ALWAYS_AUTHENTICATE, False),
        *m.key_attrs,
    ]


def lease_template(m: Material, label: bytes) -> list:
    """The ports' lease of a token identity (a CKO_DATA object naming the
    owner process), created first and removed last; session objects have
    none.  This is what the C layer did before its leases became files in
    the token's state directory (csrc/p11_lease.c): the ports' token-object
    path is their own, reported by the benchmark but not compared."""
    import os

    text = f"keychain_ext-lease/1 pid={os.getpid()} id={m.key_id.hex()}".encode()
    return [
        (CKA_CLASS, CKO_DATA),
        (CKA_TOKEN, True),
        (CKA_PRIVATE, True),
        (CKA_LABEL, label),
        (CKA_APPLICATION, LEASE_APPLICATION),
        (CKA_VALUE, text),
    ]


@dataclass(frozen=True)
class LookupResult:
    """What lookup reports (a subset of keychain_ext's ItemInfo)."""

    label: str
    has_certificate: bool
    has_private_key: bool
    ephemeral: bool
    key_type: Optional[str]
    key_id: bytes
