"""A throwaway PKI for the tests.

:func:`make_pki` is a ``trustme`` CA and its server certificate for
127.0.0.1/localhost, written as PEM files for curl and nginx;
:func:`make_client` a client identity signed by that CA, as PKCS#12 (plus its
certificate and key as PEM); :func:`make_variants` the other PKCS#12
flavours and the bad inputs the tests feed the key store.  Client
certificates carry nothing but their CN as subject (the tests compare
``CN=...``), so they are built here with ``cryptography``, signed by the
trustme CA's key.  Every file holding a private key is written 0600.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["rsa", "ec"]
PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]

_PASSWORD_ENV = "KEYCHAIN_EXT_TEST_P12_PASSWORD"


@dataclass(frozen=True)
class PKI:
    """A trustme CA and a server certificate signed by it, as PEM files."""

    directory: Path
    ca: trustme.CA = field(repr=False)
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class ClientIdentity:
    """A client identity: PKCS#12 file and the same certificate/key as PEM."""

    cn: str
    p12: Path
    cert: Path
    key: Path
    password: str = field(repr=False)


@dataclass(frozen=True)
class P12Variants:
    """Other encodings of one client identity, and inputs that are not one."""

    legacy: Path  # `openssl pkcs12 -export -legacy`: RC2-40 + 3DES, SHA-1 MAC
    openssl_default: Path  # `openssl pkcs12 -export` defaults (AES-256, PBKDF2)
    cert_only: Path  # PKCS#12 with the certificate but no private key
    key_only: Path  # PKCS#12 with the private key but no certificate
    pem: Path  # the certificate as PEM, not PKCS#12
    empty: Path  # zero bytes
    garbage: Path  # random bytes


def make_pki(directory: Union[str, os.PathLike[str]]) -> PKI:
    """A trustme CA and a server certificate (DNS:localhost, IP:127.0.0.1)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    pki = PKI(d, ca, d / "ca.pem", d / "server.pem", d / "server.key")
    _write(pki.ca_cert, ca.cert_pem.bytes())
    _write(pki.server_cert, b"".join(blob.bytes() for blob in server.cert_chain_pems))
    _write(pki.server_key, server.private_key_pem.bytes(), private=True)
    return pki


def make_client(
    pki: PKI,
    *,
    cn: str,
    password: str,
    key_type: KeyType = "rsa",
    name: str | None = None,
) -> ClientIdentity:
    """A client identity signed by the CA of ``pki``, in its directory.

    ``key_type`` is ``"rsa"`` (RSA-2048) or ``"ec"`` (P-256).  Files are
    ``<name>.p12``, ``<name>.pem`` and ``<name>.key``; ``name`` defaults to
    ``client-<key_type>``.  The PKCS#12 is encrypted with ``password`` and
    carries ``cn`` as its friendly name.
    """
    key: PrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"key_type must be 'rsa' or 'ec', not {key_type!r}")
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), None)
    assert isinstance(ca_key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    stem = pki.directory / (name or f"client-{key_type}")
    client = ClientIdentity(
        cn=cn,
        p12=stem.with_suffix(".p12"),
        cert=stem.with_suffix(".pem"),
        key=stem.with_suffix(".key"),
        password=password,
    )
    _write(client.p12, _p12(cn, key, cert, password), private=True)
    _write(client.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write(client.key, _key_pem(key), private=True)
    return client


def make_variants(client: ClientIdentity) -> P12Variants:
    """Write the variants of ``client`` next to its files.

    The two ``openssl`` files are made by the ``openssl`` CLI, which gets the
    password through its environment, never through argv.  Encrypted files
    use the client's password.
    """
    stem = client.p12.with_suffix("")
    v = P12Variants(
        legacy=Path(f"{stem}-legacy.p12"),
        openssl_default=Path(f"{stem}-openssl.p12"),
        cert_only=Path(f"{stem}-cert-only.p12"),
        key_only=Path(f"{stem}-key-only.p12"),
        pem=Path(f"{stem}-not-p12.pem"),
        empty=Path(f"{stem}-empty.p12"),
        garbage=Path(f"{stem}-garbage.p12"),
    )
    _openssl_export(client, v.legacy, "-legacy")
    _openssl_export(client, v.openssl_default)
    cert = x509.load_pem_x509_certificate(client.cert.read_bytes())
    key = serialization.load_pem_private_key(client.key.read_bytes(), None)
    assert isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
    _write(v.cert_only, _p12(client.cn, None, cert, client.password))
    _write(v.key_only, _p12(client.cn, key, None, client.password), private=True)
    _write(v.pem, client.cert.read_bytes())
    _write(v.empty, b"")
    _write(v.garbage, os.urandom(1024))
    return v


def _p12(cn: str, key: PrivateKey | None, cert: x509.Certificate | None, password: str) -> bytes:
    return pkcs12.serialize_key_and_certificates(
        cn.encode(), key, cert, None, serialization.BestAvailableEncryption(password.encode())
    )


def _openssl_export(client: ClientIdentity, out: Path, *extra: str) -> None:
    _write(out, b"", private=True)  # create it 0600 before openssl fills it
    subprocess.run(
        ["openssl", "pkcs12", "-export", *extra, "-in", str(client.cert)]
        + ["-inkey", str(client.key), "-name", client.cn, "-out", str(out)]
        + ["-passout", f"env:{_PASSWORD_ENV}"],
        env={**os.environ, _PASSWORD_ENV: client.password},
        check=True,
        capture_output=True,
    )


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # also for a file that existed before
        f.write(data)
