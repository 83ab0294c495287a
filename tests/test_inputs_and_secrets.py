"""Every kind of input the API and CLI accept, good and bad, and where the
PIN and the p12 password must never show up."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    NoEncryption,
    load_pem_private_key,
    pkcs12,
)
from cryptography.x509 import load_pem_x509_certificate
from cryptography.x509.oid import NameOID

from keychain_ext import DecodeError, Keychain, ParamError, Pkcs12VerifyFailureError
from keychain_ext._store import private_dir, write_secret
from keychain_ext.errors import UnimplementedError

from .conftest import Token
from .pki import ClientIdentity, P12Variants


def repack(client: ClientIdentity, password: bytes | None) -> bytes:
    """The client's identity as a PKCS#12 with another password."""
    key = load_pem_private_key(client.key.read_bytes(), None)
    cert = load_pem_x509_certificate(client.cert.read_bytes())
    enc = BestAvailableEncryption(password) if password else NoEncryption()
    return pkcs12.serialize_key_and_certificates(b"x", key, cert, None, enc)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "password",
    [b"", "pässwörd-ünïcode".encode(), b"x" * 4096, b" leading and trailing "],
    ids=["empty", "non-ascii", "huge", "spaces"],
)
def test_passwords_round_trip(kc: Keychain, ec_client: ClientIdentity, password: bytes) -> None:
    data = repack(ec_client, password)
    for given in (password, password.decode("utf-8")):
        with kc.preauthorized(data, given, "pw") as ident:
            assert ident.common_name == ec_client.cn


@pytest.mark.parametrize(
    "password,error",
    [
        ("wrong", Pkcs12VerifyFailureError),
        ("", Pkcs12VerifyFailureError),
        ("x" * 100_000, Pkcs12VerifyFailureError),
        ("nul\0inside", ParamError),
        ("\udcff", ParamError),
        (42, TypeError),
    ],
)
def test_bad_passwords(
    kc: Keychain, token: Token, rsa_client: ClientIdentity, password: object, error: type
) -> None:
    with pytest.raises(error):
        kc.preauth_key(rsa_client.p12, password, "bad-pw")  # type: ignore[arg-type]
    assert token.objects() == []


def test_oversized_and_truncated_p12(
    kc: Keychain, token: Token, rsa_client: ClientIdentity
) -> None:
    data = rsa_client.p12.read_bytes()
    with pytest.raises(DecodeError, match="too large"):
        kc.preauth_key(data + b"\0" * (17 * 1024 * 1024), rsa_client.password, "big")
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises((DecodeError, Pkcs12VerifyFailureError)):
            kc.preauth_key(data[:cut], rsa_client.password, "cut")
    assert token.objects() == []


def self_signed_p12(key: Any, cn: str, digest: Any) -> bytes:
    """A PKCS#12 (password "pw") with a self-signed certificate for key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, digest)
    )
    return pkcs12.serialize_key_and_certificates(
        cn.encode(), key, cert, None, BestAvailableEncryption(b"pw")
    )


def test_unsupported_key_type(kc: Keychain, token: Token) -> None:
    """An Ed25519 identity is refused (RSA and EC only), store unchanged."""
    data = self_signed_p12(ed25519.Ed25519PrivateKey.generate(), "ed", None)
    with pytest.raises(UnimplementedError, match="RSA and EC"):
        kc.preauth_key(data, "pw", "ed")
    assert token.objects() == []


def test_other_curves(kc: Keychain) -> None:
    for curve in (ec.SECP384R1(), ec.SECP521R1()):
        data = self_signed_p12(ec.generate_private_key(curve), curve.name, hashes.SHA256())
        with kc.preauthorized(data, "pw", curve.name) as ident:
            assert ident.key_type == "ec" and ident.common_name == curve.name


def test_stale_argument_is_checked(kc: Keychain, rsa_client: ClientIdentity) -> None:
    with pytest.raises(ValueError, match="stale"):
        kc.preauth_key(rsa_client.p12, rsa_client.password, "x", stale="sometimes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- secrets


def test_secrets_absent_from_logs_errors_and_reprs(
    token: Token, rsa_client: ClientIdentity, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with token.open() as kc:
        ident = kc.preauth_key(rsa_client.p12, rsa_client.password, "secret")
        seen += [repr(kc), str(kc), repr(ident), str(vars(kc))]
        for bad in ("wrong-password-123", ""):
            try:
                kc.preauth_key(rsa_client.p12, bad, "secret2")
            except Exception as exc:  # noqa: BLE001 - the text is what we check
                seen += [str(exc), repr(exc)]
        kc.kill_key("secret")
    try:
        Keychain(token.module, token.label, "wrong-pin-456")
    except Exception as exc:  # noqa: BLE001
        seen += [str(exc), repr(exc)]
    seen.append(caplog.text)
    text = "\n".join(seen)
    for secret in (token.pin, rsa_client.password, "wrong-password-123", "wrong-pin-456"):
        assert secret not in text


def test_run_child_sees_no_secret_in_argv_or_environment(
    token: Token, rsa_client: ClientIdentity, tmp_path: Path
) -> None:
    pin_file, pw_file = tmp_path / "pin", tmp_path / "pw"
    write_secret(pin_file, token.pin)
    write_secret(pw_file, rsa_client.password)
    dump = (
        "import sys; from pathlib import Path\n"
        "sys.stdout.buffer.write(Path('/proc/self/cmdline').read_bytes() + b'\\n' + "
        "Path('/proc/self/environ').read_bytes())\n"
    )
    env = {**os.environ, "KEYCHAIN_EXT_TOKEN": token.label, "KEYCHAIN_EXT_PIN_FILE": str(pin_file)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "keychain_ext",
            "run",
            "--p12",
            str(rsa_client.p12),
            "--label",
            "argv",
            "--password-file",
            str(pw_file),
            "--",
            sys.executable,
            "-c",
            dump,
            "{key}",
        ],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert b"pin-source=file:" in done.stdout  # the child got the identity...
    assert token.pin.encode() not in done.stdout  # ...but no PIN
    assert rsa_client.password.encode() not in done.stdout


def test_secret_files_and_directories_are_private(tmp_path: Path) -> None:
    old = os.umask(0)  # the most permissive umask must not leak
    try:
        d = private_dir(tmp_path / "a" / "b")
        write_secret(d / "pin", "1234")
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "pin").stat().st_mode) == 0o600
    assert (d / "pin").read_text() == "1234"
    assert [p.name for p in d.iterdir()] == ["pin"]  # no temporary file left
    (d / "pin").chmod(0o644)
    write_secret(d / "pin", "5678")  # replaced, not rewritten in place
    assert stat.S_IMODE((d / "pin").stat().st_mode) == 0o600
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    with pytest.raises(PermissionError, match="not 0700"):
        private_dir(loose)  # not ours to chmod: refused
    assert stat.S_IMODE(loose.stat().st_mode) == 0o755


def test_mac_iteration_count_is_capped(
    kc: Keychain, token: Token, ec_client: ClientIdentity, tmp_path: Path
) -> None:
    """An untrusted file must not buy unbounded CPU with its MAC: above
    2,000,000 iterations it is refused before the MAC is computed."""
    out = tmp_path / "mac.p12"
    subprocess.run(
        ["openssl", "pkcs12", "-export", "-inkey", str(ec_client.key), "-in", str(ec_client.cert),
         "-out", str(out), "-passout", "env:P12_PW", "-keypbe", "NONE", "-certpbe", "NONE",
         "-iter", "2000001", "-maciter"],
        env={**os.environ, "P12_PW": "pw"}, check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(DecodeError, match="2000001 key derivation iterations"):
        kc.preauth_key(out, "pw", "mac")
    assert token.objects() == []


def _openssl_p12(client: ClientIdentity, out: Path, *extra: str) -> Path:
    subprocess.run(
        ["openssl", "pkcs12", "-export", "-inkey", str(client.key), "-in", str(client.cert),
         "-out", str(out), "-passout", "env:P12_PW", *extra],
        env={**os.environ, "P12_PW": "pw"}, check=True, capture_output=True,
    )  # fmt: skip
    return out


def test_key_derivation_of_every_part_is_capped(
    kc: Keychain, token: Token, ec_client: ClientIdentity, tmp_path: Path
) -> None:
    """3,000,000 PBKDF2 iterations per encrypted part (the MAC stays at
    OpenSSL's 2,048): refused before any of them is derived."""
    out = _openssl_p12(ec_client, tmp_path / "bags.p12", "-iter", "3000000")
    with pytest.raises(DecodeError, match="3000000 key derivation iterations"):
        kc.preauth_key(out, "pw", "bags")
    assert token.objects() == []


def test_p12_without_mac(
    kc: Keychain, token: Token, ec_client: ClientIdentity, tmp_path: Path
) -> None:
    """A file without a MAC is accepted with the right password; a wrong one
    is reported as a wrong password that says the file has no MAC."""
    out = _openssl_p12(ec_client, tmp_path / "nomac.p12", "-nomac")
    with pytest.raises(Pkcs12VerifyFailureError, match="no MAC"):
        kc.preauth_key(out, "wrong", "nomac")
    assert token.objects() == []
    with kc.preauthorized(out, "pw", "nomac") as ident:
        assert ident.common_name == ec_client.cn


def test_p12_with_two_private_keys_is_refused(
    kc: Keychain,
    token: Token,
    ec_client: ClientIdentity,
    rsa_client: ClientIdentity,
    tmp_path: Path,
) -> None:
    """Built with OpenSSL's own PKCS12_add_key (ctypes on the libcrypto this
    process uses): two keys, one certificate."""
    import ctypes
    import ctypes.util

    crypto = ctypes.CDLL(ctypes.util.find_library("crypto"))
    vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for name, res, args in (
        ("BIO_new_file", vp, [cp, cp]), ("BIO_free", ci, [vp]),
        ("PEM_read_bio_PrivateKey", vp, [vp, vp, vp, vp]),
        ("PEM_read_bio_X509", vp, [vp, vp, vp, vp]),
        ("PKCS12_add_key", vp, [vp, vp, ci, ci, ci, cp]),
        ("PKCS12_add_cert", vp, [vp, vp]),
        ("PKCS12_add_safe", ci, [vp, vp, ci, ci, cp]),
        ("PKCS12_add_safes", vp, [vp, ci]),
        ("PKCS12_set_mac", ci, [vp, cp, ci, vp, ci, ci, vp]),
        ("i2d_PKCS12_bio", ci, [vp, vp]),
    ):  # fmt: skip
        getattr(crypto, name).restype, getattr(crypto, name).argtypes = res, args

    def read(path: Path, what: str) -> int:
        bio = crypto.BIO_new_file(str(path).encode(), b"r")
        obj = getattr(crypto, what)(bio, None, None, None)
        crypto.BIO_free(bio)
        assert obj
        return int(obj)

    bags = ctypes.c_void_p()
    for client in (ec_client, rsa_client):
        key = read(client.key, "PEM_read_bio_PrivateKey")
        assert crypto.PKCS12_add_key(ctypes.byref(bags), key, 0, 2048, -1, b"pw")
    assert crypto.PKCS12_add_cert(ctypes.byref(bags), read(ec_client.cert, "PEM_read_bio_X509"))
    safes = ctypes.c_void_p()
    assert crypto.PKCS12_add_safe(ctypes.byref(safes), bags, -1, 2048, b"pw")
    p12 = crypto.PKCS12_add_safes(safes, 0)
    assert p12 and crypto.PKCS12_set_mac(p12, b"pw", -1, None, 0, 2048, None)
    out = tmp_path / "two-keys.p12"
    bio = crypto.BIO_new_file(str(out).encode(), b"wb")
    assert crypto.i2d_PKCS12_bio(bio, p12)
    crypto.BIO_free(bio)
    with pytest.raises(DecodeError, match="2 private keys"):
        kc.preauth_key(out, "pw", "two-keys")
    assert token.objects() == []


def test_legacy_p12_leaves_the_process_default_context_alone(
    variants: P12Variants, rsa_client: ClientIdentity, token: Token
) -> None:
    """Importing an RC2 (legacy) file loads OpenSSL's legacy provider only
    into keychain_ext's own library context: MD4 stays unavailable to the
    rest of the process."""
    code = (
        "import hashlib, sys\n"
        "from keychain_ext import Keychain\n"
        "m, t, p12, pw = sys.argv[1:5]\n"
        "with Keychain(m, t, sys.stdin.read()) as kc:\n"
        "    with kc.preauthorized(p12, pw, 'legacy', ephemeral=True): pass\n"
        "try:\n"
        "    hashlib.new('md4'); print('md4 available')\n"
        "except ValueError:\n"
        "    print('md4 unavailable')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, token.module, token.label, str(variants.legacy),
         rsa_client.password],
        input=token.pin, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "md4 unavailable", done.stderr
