"""Tests of the test helpers: the PKCS#12 files of tests/pki.py are what the
tests take them for (legacy RC2, OpenSSL defaults, partial files), and the
servers of tests/servers.py demand a client certificate from the CA."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from .pki import (
    PKI,
    ClientIdentity,
    P12Variants,
    make_client,
    make_pki,
    make_variants,
)
from .servers import MTLSServer, NginxServer, find_nginx

PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rsa_client(pki: PKI) -> ClientIdentity:
    return make_client(pki, cn="alice-rsa", password=PASSWORD)


@pytest.fixture(scope="module")
def ec_client(pki: PKI) -> ClientIdentity:
    return make_client(pki, cn="bob-ec", password=PASSWORD, key_type="ec")


@pytest.fixture(scope="module")
def variants(rsa_client: ClientIdentity) -> P12Variants:
    return make_variants(rsa_client)


@pytest.fixture(scope="module")
def foreign_client(tmp_path_factory: pytest.TempPathFactory) -> ClientIdentity:
    """A client whose certificate comes from another CA."""
    other = make_pki(tmp_path_factory.mktemp("other-pki"))
    return make_client(other, cn="mallory", password=PASSWORD)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _assert_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """Check the signature (trustme's CA is EC; works on cryptography < 40)."""
    assert cert.issuer == ca.subject
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_key.verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        ec.ECDSA(cert.signature_hash_algorithm),
    )


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


def _openssl_info(p12: Path, *extra: str) -> str:
    """`openssl pkcs12 -info` output; the password goes through the env."""
    result = subprocess.run(
        ["openssl", "pkcs12", "-in", str(p12), "-info", "-noout", *extra]
        + ["-passin", "env:P12_PASSWORD"],
        env={**os.environ, "P12_PASSWORD": PASSWORD},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout + result.stderr


# --- PKI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_fixture", "key_class", "cn"),
    [
        ("rsa_client", rsa.RSAPrivateKey, "alice-rsa"),
        ("ec_client", ec.EllipticCurvePrivateKey, "bob-ec"),
    ],
)
def test_client_p12_holds_key_and_ca_signed_cert(
    request: pytest.FixtureRequest,
    pki: PKI,
    client_fixture: str,
    key_class: type,
    cn: str,
) -> None:
    client: ClientIdentity = request.getfixturevalue(client_fixture)
    assert client.cn == cn
    p12 = pkcs12.load_pkcs12(client.p12.read_bytes(), PASSWORD.encode())
    assert isinstance(p12.key, key_class)
    if isinstance(p12.key, rsa.RSAPrivateKey):
        assert p12.key.key_size == 2048
    if isinstance(p12.key, ec.EllipticCurvePrivateKey):
        assert isinstance(p12.key.curve, ec.SECP256R1)
    assert p12.cert is not None
    assert p12.cert.friendly_name == cn.encode()
    cert = p12.cert.certificate
    assert cert == _cert(client.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn
    _assert_issued_by(cert, _cert(pki.ca_cert))
    assert _public_der(p12.key) == _public_der(
        serialization.load_pem_private_key(client.key.read_bytes(), None)
    )


def test_key_files_are_0600(pki: PKI, rsa_client: ClientIdentity, variants: P12Variants) -> None:
    private = [pki.server_key, rsa_client.p12, rsa_client.key]
    private += [variants.legacy, variants.openssl_default, variants.key_only]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize("which", ["p12", "legacy", "openssl_default"])
def test_p12_loads_with_password_and_not_without(
    rsa_client: ClientIdentity, variants: P12Variants, which: str
) -> None:
    path = rsa_client.p12 if which == "p12" else getattr(variants, which)
    data = path.read_bytes()
    key, cert, _ = pkcs12.load_key_and_certificates(data, PASSWORD.encode())
    assert cert == _cert(rsa_client.cert)
    assert key is not None
    assert _public_der(key) == _public_der(cert)
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(data, b"wrong password")


def test_legacy_p12_is_rc2_and_default_is_aes(variants: P12Variants) -> None:
    assert "RC2-40" not in _openssl_info(variants.openssl_default)
    assert "AES-256-CBC" in _openssl_info(variants.openssl_default)
    assert "pbeWithSHA1And40BitRC2-CBC" in _openssl_info(variants.legacy, "-legacy")


def test_partial_p12s(rsa_client: ClientIdentity, variants: P12Variants) -> None:
    key, cert, cas = pkcs12.load_key_and_certificates(
        variants.cert_only.read_bytes(), PASSWORD.encode()
    )
    # Without a key to match it, PKCS12_parse lists the cert with the CAs.
    assert key is None
    assert [c for c in (cert, *cas) if c is not None] == [_cert(rsa_client.cert)]
    key, cert, cas = pkcs12.load_key_and_certificates(
        variants.key_only.read_bytes(), PASSWORD.encode()
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    assert (cert, cas) == (None, [])


@pytest.mark.parametrize("which", ["pem", "empty", "garbage"])
def test_non_p12_inputs_do_not_load(variants: P12Variants, which: str) -> None:
    data = getattr(variants, which).read_bytes()
    assert (len(data) == 0) == (which == "empty")
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(data, PASSWORD.encode())


# --- MTLSServer --------------------------------------------------------------


def _request(
    server: MTLSServer,
    pki: PKI,
    client: ClientIdentity | None,
    method: str = "POST",
    body: object = None,
) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
    try:
        payload = None if body is None else json.dumps(body)
        conn.request(method, "/x", payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_mtls_server_answers_with_client_cn_and_echo(
    pki: PKI, rsa_client: ClientIdentity, ec_client: ClientIdentity
) -> None:
    with MTLSServer(pki) as server:
        assert server.url == f"https://127.0.0.1:{server.port}/"
        for client in (rsa_client, ec_client):
            status, answer = _request(server, pki, client, body={"n": [1, "two"]})
            assert status == 200
            assert answer == {
                "client_cn": client.cn,
                "method": "POST",
                "path": "/x",
                "json": {"n": [1, "two"]},
            }
        status, answer = _request(server, pki, rsa_client, method="GET")
        assert (status, answer["client_cn"], answer["method"]) == (
            200,
            "alice-rsa",
            "GET",
        )


def test_mtls_server_refuses_client_without_cert(pki: PKI, rsa_client: ClientIdentity) -> None:
    with MTLSServer(pki) as server:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _request(server, pki, None, body={})
        # The server survives the refused handshake.
        assert _request(server, pki, rsa_client, body={})[0] == 200


def test_mtls_server_refuses_cert_from_other_ca(pki: PKI, foreign_client: ClientIdentity) -> None:
    with MTLSServer(pki) as server, pytest.raises((ssl.SSLError, ConnectionError)):
        _request(server, pki, foreign_client, body={})


def test_mtls_server_stops(pki: PKI) -> None:
    with MTLSServer(pki) as server:
        port = server.port
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# --- NginxServer -------------------------------------------------------------


def _have_nginx() -> bool:
    try:
        find_nginx()
    except FileNotFoundError:
        return False
    return True


needs_nginx = pytest.mark.skipif(not _have_nginx(), reason="nginx not installed")


def _curl(server: NginxServer, pki: PKI, client: ClientIdentity | None) -> tuple[int, str]:
    args = ["curl", "-sS", "--cacert", str(pki.ca_cert)]
    if client is not None:
        args += ["--cert", str(client.cert), "--key", str(client.key)]
    args += ["-d", "{}", "-H", "Content-Type: application/json"]
    args += ["-w", "\n%{http_code}", server.url]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


@needs_nginx
def test_nginx_server_names_client_dn(
    pki: PKI,
    rsa_client: ClientIdentity,
    ec_client: ClientIdentity,
    foreign_client: ClientIdentity,
) -> None:
    with NginxServer(pki) as server:
        for client in (rsa_client, ec_client):
            status, body = _curl(server, pki, client)
            assert status == 200
            assert json.loads(body) == {"client": f"CN={client.cn}"}
        # nginx completes the handshake, then answers 400 without a valid cert.
        assert _curl(server, pki, None)[0] == 400
        assert _curl(server, pki, foreign_client)[0] == 400


@needs_nginx
def test_nginx_server_stops_and_cleans_up(pki: PKI) -> None:
    with NginxServer(pki) as server:
        port, log = server.port, server.error_log
        assert log.exists()
    assert not log.parent.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_nginx_server_names_missing_binary(pki: PKI) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-nginx-binary"):
        NginxServer(pki, nginx="no-such-nginx-binary")
