"""The little DER the ctypes port needs without OpenSSL's C API.

- :func:`tlv` / :func:`children`: a strict DER reader (definite lengths).
- :func:`cert_fields`: raw TBS pieces of a certificate (serial, issuer,
  subject, public key bits) exactly as encoded, like ``i2d_X509_NAME`` and
  ``X509_pubkey_digest`` see them.
- :func:`describe_name`: subject and CN as keychain_pkcs11.c's
  ``describe_cert`` prints them (``X509_NAME_print_ex`` with
  ``XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB``, ``ASN1_STRING_to_UTF8``).
- :func:`pfx_mac_verifies`: the PKCS#12 MAC check (RFC 7292 appendix B), to
  tell a wrong password from a corrupt file.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import NamedTuple, Optional


class DerError(ValueError):
    """Not the DER that was expected."""


class Tlv(NamedTuple):
    """One DER element: tag byte, content, and the whole encoding."""

    tag: int
    content: bytes
    raw: bytes


def tlv(data: bytes, pos: int = 0) -> tuple[Tlv, int]:
    """The element at ``pos`` and the offset after it."""
    if pos + 2 > len(data):
        raise DerError("truncated element")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise DerError("high tag numbers are not supported")
    n = data[pos + 1]
    at = pos + 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or at + k > len(data):
            raise DerError("bad length")
        n = int.from_bytes(data[at : at + k], "big")
        at += k
    end = at + n
    if end > len(data):
        raise DerError("truncated element")
    return Tlv(tag, data[at:end], data[pos:end]), end


def children(content: bytes) -> list[Tlv]:
    """The elements of a constructed value's content."""
    out: list[Tlv] = []
    pos = 0
    while pos < len(content):
        item, pos = tlv(content, pos)
        out.append(item)
    return out


def oid_text(content: bytes) -> str:
    """Dotted text of an OBJECT IDENTIFIER's content octets."""
    arcs: list[int] = []
    value = 0
    for b in content:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        return ""
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def oid_der(dotted: str) -> bytes:
    """The DER of an OBJECT IDENTIFIER (what i2d_ASN1_OBJECT writes)."""
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return bytes([0x06, len(body)]) + bytes(body)


class CertFields(NamedTuple):
    """Raw pieces of a certificate's TBSCertificate."""

    serial: bytes  # the INTEGER, whole encoding
    issuer: bytes  # the Name, whole encoding
    subject: bytes  # the Name, whole encoding
    key_algorithm: str  # SubjectPublicKeyInfo algorithm OID
    key_bits: bytes  # the BIT STRING's bits (no unused-bits octet)


def cert_fields(der: bytes) -> CertFields:
    """Serial, issuer, subject and public key of a DER certificate."""
    cert, _ = tlv(der)
    if cert.tag != 0x30:
        raise DerError("not a certificate")
    tbs = children(cert.content)[0]
    items = children(tbs.content)
    if items and items[0].tag == 0xA0:  # [0] EXPLICIT version
        items = items[1:]
    if len(items) < 6:
        raise DerError("short TBSCertificate")
    serial, _sig, issuer, _validity, subject, spki = items[:6]
    alg, bits = children(spki.content)[:2]
    if bits.tag != 0x03 or not bits.content:
        raise DerError("bad public key")
    return CertFields(
        serial.raw,
        issuer.raw,
        subject.raw,
        oid_text(children(alg.content)[0].content),
        bits.content[1:],
    )


# OpenSSL 3.0's short names (OBJ_nid2sn) for the arcs distinguished names
# use: X.520, PKCS#9, RFC 4519 / COSINE, EV jurisdiction.  An attribute
# outside this table prints as OpenSSL prints one it does not know.
SHORT_NAMES: dict[str, str] = {
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.2": "textEncodedORAddress",
    "0.9.2342.19200300.100.1.3": "mail",
    "0.9.2342.19200300.100.1.4": "info",
    "0.9.2342.19200300.100.1.5": "favouriteDrink",
    "0.9.2342.19200300.100.1.6": "roomNumber",
    "0.9.2342.19200300.100.1.7": "photo",
    "0.9.2342.19200300.100.1.8": "userClass",
    "0.9.2342.19200300.100.1.9": "host",
    "0.9.2342.19200300.100.1.10": "manager",
    "0.9.2342.19200300.100.1.11": "documentIdentifier",
    "0.9.2342.19200300.100.1.12": "documentTitle",
    "0.9.2342.19200300.100.1.13": "documentVersion",
    "0.9.2342.19200300.100.1.14": "documentAuthor",
    "0.9.2342.19200300.100.1.15": "documentLocation",
    "0.9.2342.19200300.100.1.20": "homeTelephoneNumber",
    "0.9.2342.19200300.100.1.21": "secretary",
    "0.9.2342.19200300.100.1.22": "otherMailbox",
    "0.9.2342.19200300.100.1.23": "lastModifiedTime",
    "0.9.2342.19200300.100.1.24": "lastModifiedBy",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.26": "aRecord",
    "0.9.2342.19200300.100.1.27": "pilotAttributeType27",
    "0.9.2342.19200300.100.1.28": "mXRecord",
    "0.9.2342.19200300.100.1.29": "nSRecord",
    "0.9.2342.19200300.100.1.30": "sOARecord",
    "0.9.2342.19200300.100.1.31": "cNAMERecord",
    "0.9.2342.19200300.100.1.37": "associatedDomain",
    "0.9.2342.19200300.100.1.38": "associatedName",
    "0.9.2342.19200300.100.1.39": "homePostalAddress",
    "0.9.2342.19200300.100.1.40": "personalTitle",
    "0.9.2342.19200300.100.1.41": "mobileTelephoneNumber",
    "0.9.2342.19200300.100.1.42": "pagerTelephoneNumber",
    "0.9.2342.19200300.100.1.43": "friendlyCountryName",
    "0.9.2342.19200300.100.1.44": "uid",
    "0.9.2342.19200300.100.1.45": "organizationalStatus",
    "0.9.2342.19200300.100.1.46": "janetMailbox",
    "0.9.2342.19200300.100.1.47": "mailPreferenceOption",
    "0.9.2342.19200300.100.1.48": "buildingName",
    "0.9.2342.19200300.100.1.49": "dSAQuality",
    "0.9.2342.19200300.100.1.50": "singleLevelQuality",
    "0.9.2342.19200300.100.1.51": "subtreeMinimumQuality",
    "0.9.2342.19200300.100.1.52": "subtreeMaximumQuality",
    "0.9.2342.19200300.100.1.53": "personalSignature",
    "0.9.2342.19200300.100.1.54": "dITRedirect",
    "0.9.2342.19200300.100.1.55": "audio",
    "0.9.2342.19200300.100.1.56": "documentPublisher",
    "1.2.840.113549.1.9.1": "emailAddress",
    "1.2.840.113549.1.9.2": "unstructuredName",
    "1.2.840.113549.1.9.3": "contentType",
    "1.2.840.113549.1.9.4": "messageDigest",
    "1.2.840.113549.1.9.5": "signingTime",
    "1.2.840.113549.1.9.6": "countersignature",
    "1.2.840.113549.1.9.7": "challengePassword",
    "1.2.840.113549.1.9.8": "unstructuredAddress",
    "1.2.840.113549.1.9.9": "extendedCertificateAttributes",
    "1.2.840.113549.1.9.14": "extReq",
    "1.2.840.113549.1.9.15": "SMIME-CAPS",
    "1.2.840.113549.1.9.16": "SMIME",
    "1.2.840.113549.1.9.20": "friendlyName",
    "1.2.840.113549.1.9.21": "localKeyID",
    "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionL",
    "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionST",
    "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionC",
    "2.5.4.3": "CN",
    "2.5.4.4": "SN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "street",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.12": "title",
    "2.5.4.13": "description",
    "2.5.4.14": "searchGuide",
    "2.5.4.15": "businessCategory",
    "2.5.4.16": "postalAddress",
    "2.5.4.17": "postalCode",
    "2.5.4.18": "postOfficeBox",
    "2.5.4.19": "physicalDeliveryOfficeName",
    "2.5.4.20": "telephoneNumber",
    "2.5.4.21": "telexNumber",
    "2.5.4.22": "teletexTerminalIdentifier",
    "2.5.4.23": "facsimileTelephoneNumber",
    "2.5.4.24": "x121Address",
    "2.5.4.25": "internationaliSDNNumber",
    "2.5.4.26": "registeredAddress",
    "2.5.4.27": "destinationIndicator",
    "2.5.4.28": "preferredDeliveryMethod",
    "2.5.4.29": "presentationAddress",
    "2.5.4.30": "supportedApplicationContext",
    "2.5.4.31": "member",
    "2.5.4.32": "owner",
    "2.5.4.33": "roleOccupant",
    "2.5.4.34": "seeAlso",
    "2.5.4.35": "userPassword",
    "2.5.4.36": "userCertificate",
    "2.5.4.37": "cACertificate",
    "2.5.4.38": "authorityRevocationList",
    "2.5.4.39": "certificateRevocationList",
    "2.5.4.40": "crossCertificatePair",
    "2.5.4.41": "name",
    "2.5.4.42": "GN",
    "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier",
    "2.5.4.45": "x500UniqueIdentifier",
    "2.5.4.46": "dnQualifier",
    "2.5.4.47": "enhancedSearchGuide",
    "2.5.4.48": "protocolInformation",
    "2.5.4.49": "distinguishedName",
    "2.5.4.50": "uniqueMember",
    "2.5.4.51": "houseIdentifier",
    "2.5.4.52": "supportedAlgorithms",
    "2.5.4.53": "deltaRevocationList",
    "2.5.4.54": "dmdName",
    "2.5.4.65": "pseudonym",
    "2.5.4.72": "role",
    "2.5.4.97": "organizationIdentifier",
    "2.5.4.98": "c3",
    "2.5.4.99": "n3",
    "2.5.4.100": "dnsName",
}

# crypto/asn1/charmap.h: how X509_NAME_print_ex treats each ASCII character.
_ESC_2253, _ESC_CTRL, _FIRST, _LAST = 0x01, 0x02, 0x20, 0x40
_CHAR_TYPE = (
    [1026]
    + [2] * 31
    + [120, 0, 1, 40, 0, 0, 0, 16, 16, 16, 0, 25, 25, 16, 16, 16]
    + [16] * 10
    + [16, 9, 9, 16, 9, 16]
    + [0]
    + [16] * 26
    + [0, 1, 0, 0, 0]
    + [0]
    + [16] * 26
    + [0, 0, 0, 0, 2]
)
# ASN.1 tag -> bytes per character (asn1/a_strex.c tag2nbyte); 0 = UTF-8
_NBYTE = {12: 0, 18: 1, 19: 1, 20: 1, 22: 1, 23: 1, 24: 1, 26: 1, 28: 4, 30: 2}
_FLAGS = _ESC_2253 | _ESC_CTRL


def _escape(byte: int, flags: int) -> bytes:
    if byte > 0x7F:
        return bytes([byte])  # ASN1_STRFLGS_ESC_MSB is off: raw UTF-8
    kind = _CHAR_TYPE[byte] & flags
    if kind & (_ESC_2253 | _FIRST | _LAST):
        return b"\\" + bytes([byte])
    if kind & _ESC_CTRL:
        return b"\\%02X" % byte
    return bytes([byte])


def _chars(tag: int, content: bytes) -> Optional[list[bytes]]:
    """The value as a list of characters, each as UTF-8 bytes (UTF8String:
    each byte, as OpenSSL walks it)."""
    width = _NBYTE[tag]
    if width == 0:
        return [bytes([b]) for b in content]
    if len(content) % width:
        return None
    out = []
    for i in range(0, len(content), width):
        c = int.from_bytes(content[i : i + width], "big")
        out.append(chr(c).encode("utf-8", "surrogatepass") if c < 0x110000 else b"")
    return out


def _print_value(tag: int, value: Tlv, dump: bool) -> bytes:
    if dump or tag not in _NBYTE:
        return b"#" + value.raw.hex().upper().encode()
    chars = _chars(tag, value.content)
    if chars is None:
        return b""
    out = bytearray()
    last = len(chars) - 1
    for i, char in enumerate(chars):
        # a_strex.c do_buf: the "last" flag replaces the "first" one
        extra = _LAST if i == last else _FIRST if i == 0 else 0
        for byte in char:
            out += _escape(byte, _FLAGS | extra)
    return bytes(out)


def _to_utf8(tag: int, content: bytes) -> Optional[bytes]:
    """ASN1_STRING_to_UTF8, or None where it fails."""
    width = _NBYTE.get(tag)
    try:
        if width == 0:
            content.decode("utf-8")
            return content
        if width == 1:
            return content.decode("latin-1").encode("utf-8")
        if width == 2:
            return content.decode("utf-16-be").encode("utf-8")
        if width == 4:
            return content.decode("utf-32-be").encode("utf-8")
    except UnicodeError:
        return None
    return None


def describe_name(name_der: bytes) -> tuple[bytes, Optional[bytes]]:
    """(subject, common name) of a DER Name, as UTF-8 bytes, unbounded; the
    common name is None without a CN or where OpenSSL cannot convert it."""
    entries: list[tuple[int, str, Tlv]] = []
    for index, rdn in enumerate(children(tlv(name_der)[0].content)):
        for atv in children(rdn.content):
            kind, value = children(atv.content)[:2]
            entries.append((index, oid_text(kind.content), value))
    parts = bytearray()
    prev = -1
    for index, oid, value in reversed(entries):  # XN_FLAG_DN_REV: every entry
        if prev != -1:
            parts += b"+" if prev == index else b","
        prev = index
        short = SHORT_NAMES.get(oid)
        parts += (short or oid).encode() + b"="
        parts += _print_value(value.tag, value, dump=short is None)
    common_name = None
    for _, oid, value in entries:
        if oid == "2.5.4.3":  # the first CN only, as X509_NAME_get_index_by_NID
            common_name = _to_utf8(value.tag, value.content)
            if common_name is not None:
                common_name = common_name.split(b"\0", 1)[0]  # snprintf("%.*s")
            break
    return bytes(parts), common_name


# ---------------------------------------------------------------- PKCS#12

_MAC_HASHES = {
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.5": "sha512_224",
    "2.16.840.1.101.3.4.2.6": "sha512_256",
}


class Pfx(NamedTuple):
    """What the MAC check needs of a PFX."""

    auth_safe: Optional[bytes]  # the data the MAC covers, if found
    mac: Optional[Tlv]  # MacData, if present


def parse_pfx(data: bytes) -> Pfx:
    """The PFX structure (RFC 7292 section 4), as d2i_PKCS12 checks it."""
    pfx, _ = tlv(data)  # like d2i: trailing bytes are ignored
    if pfx.tag != 0x30:
        raise DerError("not a SEQUENCE")
    items = children(pfx.content)
    if len(items) < 2 or items[0].tag != 0x02 or items[1].tag != 0x30:
        raise DerError("not a PFX")
    info = children(items[1].content)
    if not info or info[0].tag != 0x06:
        raise DerError("authSafe is not a ContentInfo")
    auth_safe = None
    if oid_text(info[0].content) == "1.2.840.113549.1.7.1" and len(info) > 1:
        inner = children(info[1].content)
        if inner and inner[0].tag == 0x04:
            auth_safe = inner[0].content
    mac = items[2] if len(items) > 2 and items[2].tag == 0x30 else None
    return Pfx(auth_safe, mac)


def _kdf(hash_name: str, password: bytes, salt: bytes, iterations: int, n: int) -> bytes:
    """RFC 7292 appendix B.2 with ID 3 (MAC key)."""
    v = hashlib.new(hash_name).block_size
    d = bytes([3]) * v

    def fill(s: bytes) -> bytes:
        if not s:
            return b""
        length = v * ((len(s) + v - 1) // v)
        return (s * (length // len(s) + 1))[:length]

    i = bytearray(fill(salt) + fill(password))
    out = b""
    while True:
        a = hashlib.new(hash_name, d + bytes(i)).digest()
        for _ in range(iterations - 1):
            a = hashlib.new(hash_name, a).digest()
        out += a
        if len(out) >= n:
            return out[:n]
        b = int.from_bytes((a * (v // len(a) + 1))[:v], "big") + 1
        for j in range(0, len(i), v):
            block = (int.from_bytes(i[j : j + v], "big") + b) % (1 << (8 * v))
            i[j : j + v] = block.to_bytes(v, "big")


def _bmp(password: Optional[bytes]) -> bytes:
    """The password as PKCS#12 wants it: BMPString plus two zero octets;
    NULL (None) is no password at all."""
    if password is None:
        return b""
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        text = password.decode("latin-1")
    return text.encode("utf-16-be") + b"\0\0"


def pfx_mac_iterations(pfx: Pfx) -> Optional[int]:
    """The MAC's iteration count (1 if absent from MacData), None without a
    readable MAC."""
    if pfx.mac is None:
        return None
    try:
        parts = children(pfx.mac.content)
        return int.from_bytes(parts[2].content, "big") if len(parts) > 2 else 1
    except (DerError, IndexError):
        return None


def pfx_mac_verifies(pfx: Pfx, password: Optional[bytes]) -> Optional[bool]:
    """Whether the MAC verifies with the password; None if it cannot be
    checked here (no MAC, an algorithm this code does not know)."""
    if pfx.mac is None or pfx.auth_safe is None:
        return None
    try:
        parts = children(pfx.mac.content)
        digest_info = children(parts[0].content)
        alg = oid_text(children(digest_info[0].content)[0].content)
        expected = digest_info[1].content
        salt = parts[1].content
        iterations = int.from_bytes(parts[2].content, "big") if len(parts) > 2 else 1
    except (DerError, IndexError):
        return None
    hash_name = _MAC_HASHES.get(alg)
    if hash_name is None or not 0 < iterations <= 10_000_000:
        return None
    size = hashlib.new(hash_name).digest_size
    key = _kdf(hash_name, _bmp(password), salt, iterations, size)
    return hmac.compare_digest(hmac.new(key, pfx.auth_safe, hash_name).digest(), expected)
