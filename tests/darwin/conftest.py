"""The macOS backend's public-API and CLI tests, run on Linux.

``make test-darwin-double`` (scripts/test-darwin-double) builds
``keychain_ext._native`` from csrc/keychain_darwin.c over the
Security.framework TEST DOUBLE of tests/darwin_double -- an in-memory item
store written by this project, not Apple's framework.  It is the one test
double in this suite, and it is acceptable only because no real
Security.framework can exist on Linux: what these tests prove is the
backend's and the façade's logic, not Apple's behaviour (README, "macOS").

The double is strict: unknown query keys abort, every CF retain/release is
counted (the ``dbl`` fixture fails a test that leaks one), and any of its
calls can be made to fail (``lib.dbl_fail_call``).  Under any other build
of ``_native`` (plain ``pytest`` on Linux) nothing here is collected.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import keychain_ext
from keychain_ext import _native_backend

BUILD = os.environ.get("KEYCHAIN_EXT_DOUBLE_BUILD", "")
if BUILD:
    # the store lock's directory: never the user's keychain_ext directory
    os.environ["KEYCHAIN_EXT_HOME"] = tempfile.mkdtemp(prefix="keychain-ext-darwin-")
lib: Any = _native_backend.lib
ffi: Any = _native_backend.ffi
UNDER_DOUBLE = (
    bool(BUILD)
    and os.path.realpath(keychain_ext.__file__).startswith(os.path.realpath(BUILD))
    and hasattr(lib, "dbl_reset")
)
if not UNDER_DOUBLE:
    collect_ignore_glob = ["test_*.py"]

KEY_ID = bytes([0xA1, *range(2, 21)])
PASSWORD = "s3cret"
# what a walk over every call injects: errSecNotAvailable
INJECTED = -25291


@pytest.fixture(autouse=True)
def dbl() -> Iterator[Any]:
    """A fresh double; after the test, every CF reference is released."""
    lib.dbl_reset()
    yield lib
    assert lib.dbl_outstanding() == 0, "CF references leaked"
    lib.dbl_fail_call(0, 0)


def fake_text(cn: str, password: str = PASSWORD, key_id: bytes = KEY_ID, flags: int = 0) -> bytes:
    """The double's stand-in for a PKCS#12 payload (double.c SecPKCS12Import)."""
    return f"DBLP12\ncn={cn}\npass={password}\nid={key_id.hex()}\ncount=1\nflags={flags}\n".encode()


@pytest.fixture
def make_p12() -> Callable[..., bytes]:
    """dbl_make_p12: a well-formed DER PFX carrying the double's payload."""

    def make(
        cn: str = "alice",
        password: str = PASSWORD,
        key_id: bytes = KEY_ID,
        count: int = 1,
        flags: int = 0,
    ) -> bytes:
        buf = ffi.new("char[]", 4096)
        n = lib.dbl_make_p12(
            buf, 4096, cn.encode(), password.encode(), key_id, len(key_id), count, flags
        )
        assert n > 0
        return bytes(ffi.buffer(buf, n))

    return make


@pytest.fixture
def kc() -> Iterator[keychain_ext.Keychain]:
    with keychain_ext.Keychain() as k:
        yield k


def calls() -> list[str]:
    """The double's call log since the last dbl_log_clear."""
    return [ffi.string(lib.dbl_call(i)).decode() for i in range(lib.dbl_calls())]


def count(cls: str, keychain: int = -1) -> int:
    """Items of class 'c' (certificate), 'k' (key), 'g' (owner record)."""
    return int(lib.dbl_count(cls.encode(), keychain))


def record(label: str) -> str | None:
    text = lib.dbl_record(label.encode())
    return None if text == ffi.NULL else ffi.string(text).decode()


def owner_text(
    *pids: int,
    held: bool = False,
    shared: bool = False,
    key_id: bytes = b"",
    p12: bytes = b"",
    host: str = "",
) -> str:
    """An owner record as csrc/keychain_darwin.c writes it; p12: the file
    whose SHA-256 it records (a shared identity is joined with it only)."""
    host = host or os.uname().nodename
    owners = ",".join(f"{pid}@{host}" for pid in pids)
    digest = hashlib.sha256(p12).hexdigest() if p12 else "00" * 32
    return (
        f"keychain_ext-owner-v1 held={int(held)} shared={int(shared)} id={key_id.hex()} "
        f"p12={digest} owners={owners}"
    )


def put_record(label: str, text: str, keychain: int = 0) -> None:
    raw = text.encode()
    lib.dbl_put_record(b"keychain_ext", label.encode(), raw, len(raw), keychain)


def store_empty() -> bool:
    return count("c") == 0 and count("k") == 0 and count("g") == 0


# --- DER, for hostile PKCS#12 files ------------------------------------------


def tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        head = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + head + body


def ber(tag: int, *parts: bytes) -> bytes:
    """An indefinite-length (BER) constructed element."""
    return bytes([tag, 0x80]) + b"".join(parts) + b"\0\0"


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytes([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return tlv(0x06, body)


def integer(n: int) -> bytes:
    return tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def octets(b: bytes) -> bytes:
    return tlv(0x04, b)


def ctx0(b: bytes) -> bytes:
    return tlv(0xA0, b)


DATA = "1.2.840.113549.1.7.1"
ENCRYPTED_DATA = "1.2.840.113549.1.7.6"
SHROUDED_KEY_BAG = "1.2.840.113549.1.12.10.1.2"
SAFE_CONTENTS_BAG = "1.2.840.113549.1.12.10.1.6"
SECRET_BAG = "1.2.840.113549.1.12.10.1.5"


def pbes2(iterations: int, kdf: str = "1.2.840.113549.1.5.12") -> bytes:
    """PBES2 with PBKDF2 (HMAC-SHA256) and AES-256-CBC."""
    prf = seq(oid("1.2.840.113549.2.9"), tlv(0x05, b""))
    kdf_params = seq(octets(b"s" * 8), integer(iterations), prf)
    aes = seq(oid("2.16.840.1.101.3.4.1.42"), octets(b"i" * 16))
    return seq(oid("1.2.840.113549.1.5.13"), seq(seq(oid(kdf), kdf_params), aes))


def pkcs12_pbe(iterations: int) -> bytes:
    """pbeWithSHAAnd3-KeyTripleDES-CBC (what -legacy files use)."""
    return seq(oid("1.2.840.113549.1.12.1.3"), seq(octets(b"s" * 8), integer(iterations)))


def shrouded_key_bag(alg: bytes) -> bytes:
    return seq(oid(SHROUDED_KEY_BAG), ctx0(seq(alg, octets(b"k" * 32))))


def secret_bag(payload: bytes) -> bytes:
    return seq(oid(SECRET_BAG), ctx0(octets(payload)))


def data_content(*bags: bytes) -> bytes:
    return seq(oid(DATA), ctx0(octets(seq(*bags))))


def encrypted_content(alg: bytes) -> bytes:
    eci = seq(oid(DATA), alg, tlv(0x80, b"e" * 32))
    return seq(oid(ENCRYPTED_DATA), ctx0(seq(integer(0), eci)))


def mac_data(iterations: int | None = 2048) -> bytes:
    digest = seq(seq(oid("2.16.840.1.101.3.4.2.1"), tlv(0x05, b"")), octets(bytes(32)))
    return seq(digest, octets(bytes(8)), *([] if iterations is None else [integer(iterations)]))


def pfx(*contents: bytes, mac: bytes | None = None) -> bytes:
    """PFX { 3, data { AuthenticatedSafe }, MacData }; mac=b"" leaves it out."""
    auth = seq(oid(DATA), ctx0(octets(seq(*contents))))
    return seq(integer(3), auth, mac_data() if mac is None else mac)
