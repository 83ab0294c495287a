"""A throwaway PKI for demos and tests.

:func:`make_pki` writes a CA and a server certificate for 127.0.0.1/localhost,
:func:`make_client` a client identity as PKCS#12 (plus its certificate and key
as PEM), and :func:`make_variants` the other PKCS#12 flavours and the bad
inputs the tests feed the key store. Every file holding a private key is
written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["rsa", "ec"]

_PASSWORD_ENV = "KEYCHAIN_EXT_TESTING_P12_PASSWORD"


@dataclass(frozen=True)
class PKI:
    """A CA and a server certificate signed by it, as PEM files."""

    directory: Path
    ca_cert: Path
    ca_key: Path
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


def make_pki(directory: str | os.PathLike[str]) -> PKI:
    """Write a CA and a server certificate (DNS:localhost, IP:127.0.0.1)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("keychain_ext throwaway CA")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server_cert = (
        _leaf(_name("localhost"), server_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = PKI(
        directory=d,
        ca_cert=d / "ca.pem",
        ca_key=d / "ca.key",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
    )
    _write(pki.ca_cert, _cert_pem(ca_cert))
    _write(pki.ca_key, _key_pem(ca_key), private=True)
    _write(pki.server_cert, _cert_pem(server_cert))
    _write(pki.server_key, _key_pem(server_key), private=True)
    return pki


def make_client(
    pki: PKI,
    *,
    cn: str,
    password: str,
    key_type: KeyType = "rsa",
    name: str | None = None,
) -> ClientIdentity:
    """Write a client identity signed by the CA of ``pki`` into its directory.

    ``key_type`` is ``"rsa"`` (RSA-2048) or ``"ec"`` (P-256). Files are
    ``<name>.p12``, ``<name>.pem`` and ``<name>.key``; ``name`` defaults to
    ``client-<key_type>``. The PKCS#12 is encrypted with ``password`` and
    carries ``cn`` as its friendly name.
    """
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"key_type must be 'rsa' or 'ec', not {key_type!r}")
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{pki.ca_key} is not the EC key make_pki writes")
    cert = _leaf(_name(cn), key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH).sign(
        ca_key, hashes.SHA256()
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
    _write(client.cert, _cert_pem(cert))
    _write(client.key, _key_pem(key), private=True)
    return client


def make_variants(client: ClientIdentity) -> P12Variants:
    """Write the variants of ``client`` next to its files.

    The two ``openssl`` files are made by the ``openssl`` CLI, which gets the
    password through its environment, never through argv. Encrypted files use
    the client's password.
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
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise TypeError(f"{client.key} is not an RSA or EC key")
    _write(v.cert_only, _p12(client.cn, None, cert, client.password))
    _write(v.key_only, _p12(client.cn, key, None, client.password), private=True)
    _write(v.pem, _cert_pem(cert))
    _write(v.empty, b"")
    _write(v.garbage, os.urandom(1024))
    return v


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now().astimezone()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def _leaf(
    subject: x509.Name,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return (
        _builder(subject, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _p12(
    cn: str,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None,
    cert: x509.Certificate | None,
    password: str,
) -> bytes:
    return pkcs12.serialize_key_and_certificates(
        cn.encode(),
        key,
        cert,
        None,
        serialization.BestAvailableEncryption(password.encode()),
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


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
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
