"""The Darwin backend on a real Mac, through the C layer (keychain_ext._native).

Runs only on macOS (the macos workflow, runner macos-14).  Everything happens
in a throwaway keychain created here, added to the user's search list for
the duration of the test and removed afterwards; the default keychain and
the login keychain are never written.  The label is the certificate's CN
(see csrc/keychain_darwin.c).
"""

import datetime
import hashlib
import os
import secrets
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "darwin",
    reason="needs macOS Security.framework (on Linux the backend's logic is "
    "tested by tests/test_darwin_logic.py against a test double)",
)

ERR_DUPLICATE = -25299
ERR_NOT_FOUND = -25300
ERR_PKCS12_VERIFY = -25264


def security(*args, check=True):
    proc = subprocess.run(["security", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError("security %s: %s" % (" ".join(args), proc.stderr))
    return proc


def user_search_list():
    out = security("list-keychains", "-d", "user").stdout
    return [line.strip().strip('"') for line in out.splitlines() if line.strip()]


@pytest.fixture
def keychain(tmp_path):
    path = str(tmp_path / "keychain-ext-test.keychain-db")
    password = secrets.token_hex(16)
    before = user_search_list()
    default_before = security("default-keychain").stdout
    security("create-keychain", "-p", password, path)
    try:
        security("set-keychain-settings", "-lut", "3600", path)
        security("unlock-keychain", "-p", password, path)
        security("list-keychains", "-d", "user", "-s", path, *before)
        yield path
    finally:
        security("list-keychains", "-d", "user", "-s", *before, check=False)
        security("delete-keychain", path, check=False)
    assert security("default-keychain").stdout == default_before


def interaction_allowed():
    """SecKeychainGetUserInteractionAllowed, read straight from the framework."""
    import ctypes

    sec = ctypes.CDLL("/System/Library/Frameworks/Security.framework/Security")
    flag = ctypes.c_ubyte(2)
    assert sec.SecKeychainGetUserInteractionAllowed(ctypes.byref(flag)) == 0
    return flag.value


def make_p12(cn, password):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    # 3DES/SHA-1 PKCS#12: the encryption every macOS release imports.
    enc = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)
        .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())
        .build(password.encode())
    )
    p12 = pkcs12.serialize_key_and_certificates(cn.encode(), key, cert, None, enc)
    # kSecAttrApplicationLabel of an RSA key: SHA-1 of its PKCS#1 public key
    pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    return p12, hashlib.sha1(pub).digest()


def test_preauth_lookup_kill_leaves_nothing(keychain):
    from keychain_ext._native import ffi, lib

    assert ffi.string(lib.kc_backend()) == b"darwin"
    label = "keychain-ext-ci-%s" % secrets.token_hex(4)
    password = secrets.token_hex(8)
    p12, key_id = make_p12(label, password)

    err = ffi.new("kc_error *")
    opts = ffi.new("kc_options *")
    token = ffi.new("char[]", keychain.encode())
    opts.token = token
    out = ffi.new("kc_keychain **")
    assert lib.kc_open(opts, out, err) == 0, ffi.string(err.message)
    kc = out[0]
    try:
        flag_before = interaction_allowed()
        info = ffi.new("kc_item_info *")
        st = lib.kc_preauth_key(kc, p12, len(p12), password.encode(), label.encode(), 0, info, err)
        assert st == 0, (st, ffi.string(err.message))
        assert interaction_allowed() == flag_before, "interaction flag not restored"
        assert info.has_certificate and info.has_private_key
        assert ffi.string(info.common_name).decode() == label
        assert bytes(info.key_id[0 : info.key_id_len]) == key_id

        found = security("find-certificate", "-c", label, keychain, check=False)
        assert found.returncode == 0, "certificate not in the throwaway keychain"

        info2 = ffi.new("kc_item_info *")
        assert lib.kc_lookup_keychain_item(kc, label.encode(), info2, err) == 0
        assert info2.has_private_key
        assert bytes(info2.key_id[0 : info2.key_id_len]) == key_id

        # already there: refused, nothing touched
        st = lib.kc_preauth_key(
            kc, p12, len(p12), password.encode(), label.encode(), 0, ffi.NULL, err
        )
        assert st == ERR_DUPLICATE, ffi.string(err.message)

        assert lib.kc_kill_key(kc, label.encode(), 0, err) == 0, ffi.string(err.message)
        assert lib.kc_lookup_keychain_item(kc, label.encode(), info2, err) == ERR_NOT_FOUND
        assert lib.kc_kill_key(kc, label.encode(), 0, err) == ERR_NOT_FOUND

        gone = security("find-certificate", "-c", label, keychain, check=False)
        assert gone.returncode != 0, "certificate left behind"
        dump = security("dump-keychain", keychain).stdout
        assert "0x00000010" not in dump, "private key left behind:\n" + dump
        assert "0x80001000" not in dump, "certificate left behind:\n" + dump

        # wrong password: reported as a PKCS#12 verify failure, nothing left
        st = lib.kc_preauth_key(kc, p12, len(p12), b"wrong", label.encode(), 0, ffi.NULL, err)
        assert st == ERR_PKCS12_VERIFY, (st, ffi.string(err.message))
        assert ffi.string(err.message)  # SecCopyErrorMessageString's text
        assert lib.kc_lookup_keychain_item(kc, label.encode(), info2, err) == ERR_NOT_FOUND
    finally:
        lib.kc_close(kc)


# --- the public API (keychain_ext.Keychain) in the throwaway keychain --------
# The same cases tests/darwin runs against the Security.framework test double
# on Linux, here against the real framework.  Never run by this project's
# Linux CI: only by .github/workflows/macos.yml.


def _label():
    return f"keychain-ext-ci-{secrets.token_hex(4)}"


def _records(keychain):
    """keychain_ext's owner records (generic passwords, service keychain_ext)."""
    dump = security("dump-keychain", keychain).stdout
    return dump.count('"svce"<blob>="keychain_ext"')


def test_public_api_round_trip(keychain):
    from keychain_ext import DarwinKeychain, DuplicateItemError, Keychain

    label, password = _label(), secrets.token_hex(8)
    p12, key_id = make_p12(label, password)
    with Keychain(token=keychain) as kc:
        assert kc.location == DarwinKeychain(keychain)
        ident = kc.preauth_key(p12, password, label)
        assert ident.key_id == key_id and ident.nickname == label
        assert ident.mine and ident.owner_alive is True
        assert _records(keychain) == 1
        found = kc.lookup(label)
        assert found is not None and found.key_id == key_id
        assert [i.label for i in kc.items()] == [label]
        with pytest.raises(DuplicateItemError):
            kc.preauth_key(p12, password, label)
        kc.kill_key(label)
        assert kc.lookup(label) is None and kc.items() == []
    assert _records(keychain) == 0
    dump = security("dump-keychain", keychain).stdout
    assert "0x00000010" not in dump and "0x80001000" not in dump, dump


def test_public_api_errors(keychain):
    from keychain_ext import (
        DecodeError,
        ItemNotFoundError,
        Keychain,
        ParamError,
        Pkcs12VerifyFailureError,
    )

    label, password = _label(), secrets.token_hex(8)
    p12, _ = make_p12(label, password)
    with Keychain(token=keychain) as kc:
        with pytest.raises(Pkcs12VerifyFailureError):
            kc.preauth_key(p12, "wrong", label)
        with pytest.raises(DecodeError):
            kc.preauth_key(b"not a pkcs12 file", password, label)
        with pytest.raises(ParamError):
            kc.preauth_key(p12, password, label + "-not-the-cn")
        with pytest.raises(ItemNotFoundError):
            kc.kill_key(label)
        assert kc.items() == []
    assert _records(keychain) == 0


def test_public_api_iteration_cap(keychain):
    """A file asking for more than 2,000,000 derivation rounds never
    reaches SecPKCS12Import (the walk in csrc/p12_walk.c)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    from keychain_ext import DecodeError, Keychain

    label, password = _label(), secrets.token_hex(8)
    p12, _ = make_p12(label, password)
    key, cert, _ca = pkcs12.load_key_and_certificates(p12, password.encode())
    enc = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2_000_001)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode())
    )
    hostile = pkcs12.serialize_key_and_certificates(label.encode(), key, cert, None, enc)
    with Keychain(token=keychain) as kc:
        with pytest.raises(DecodeError, match="key derivation iterations"):
            kc.preauth_key(hostile, password, label)
        assert kc.lookup(label) is None


def test_public_api_ownership(keychain):
    from keychain_ext import InvalidOwnerEditError, Keychain

    label, password = _label(), secrets.token_hex(8)
    p12, _ = make_p12(label, password)
    with Keychain(token=keychain) as kc:
        kc.preauth_key(p12, password, label, held=True)
        with Keychain(token=keychain) as other:
            assert other.lookup(label).held
            other.kill_key(label)  # held: anyone may kill it
        with kc.preauthorized(p12, password, label) as ident:
            assert ident.mine
        assert kc.lookup(label) is None
    # an identity keychain_ext did not import: never killed without force
    path = os.path.join(os.path.dirname(keychain), "foreign.p12")
    with open(path, "wb") as f:
        f.write(p12)
    # -A: any application may use (and delete) it: no prompt in CI
    security("import", path, "-k", keychain, "-P", password, "-f", "pkcs12", "-A")
    with Keychain(token=keychain) as kc:
        info = kc.lookup(label)
        assert info is not None and not info.ours
        with pytest.raises(InvalidOwnerEditError):
            kc.kill_key(label)
        kc.kill_key(label, force=True)
        assert kc.lookup(label) is None
