"""The core: round trips, bad inputs, duplicates, ownership, ephemeral
objects, threads and fork, on a real SoftHSM2 token."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, pkcs12

import keychain_ext
from keychain_ext import (
    AuthFailedError,
    DecodeError,
    DuplicateItemError,
    InteractionRequiredError,
    InvalidOwnerEditError,
    ItemNotFoundError,
    Keychain,
    KeychainError,
    NoSuchKeychainError,
    ParamError,
    Pkcs12VerifyFailureError,
    errors,
)

from .conftest import Token
from .pki import PKI, ClientIdentity, P12Variants, make_client


def public_key_sha1(client: ClientIdentity) -> bytes:
    """What macOS reports as kSecImportItemKeyID: SHA-1 of the public key
    bits (the BIT STRING of SubjectPublicKeyInfo)."""
    _, cert, _ = pkcs12.load_key_and_certificates(client.p12.read_bytes(), client.password.encode())
    assert cert is not None
    pub = cert.public_key()
    try:
        raw = pub.public_bytes(Encoding.DER, PublicFormat.PKCS1)  # RSA
    except ValueError:
        raw = pub.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)  # EC
    return hashlib.sha1(raw).digest()


def test_binding_smoke() -> None:
    """The cffi binding itself."""
    from keychain_ext._native import ffi, lib

    assert ffi.string(lib.kc_backend()) == b"pkcs11"
    assert ffi.string(lib.kc_version()).decode() == keychain_ext.__version__
    assert lib.KC_errSecDuplicateItem == -25299


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_round_trip(kc: Keychain, token: Token, kind: str, request: pytest.FixtureRequest) -> None:
    client: ClientIdentity = request.getfixturevalue(f"{kind}_client")
    ident = kc.preauth_key(client.p12, client.password, "round-trip")
    assert (ident.label, ident.common_name, ident.key_type) == ("round-trip", client.cn, kind)
    assert ident.subject == f"CN={client.cn}"
    assert ident.key_id == public_key_sha1(client)
    assert not ident.ephemeral
    seen = token.objects()
    assert {(o["class"], o["label"], o["id"]) for o in seen} == {
        ("certificate", "round-trip", ident.key_id.hex()),
        ("private", "round-trip", ident.key_id.hex()),
    }  # the lease naming the owner lives in the token's state directory
    assert (ident.owners, ident.mine, ident.ours, ident.held) == (1, True, True, False)
    found = kc.lookup("round-trip")
    assert found is not None and found.key_id == ident.key_id and found.key_type == kind
    kc.kill_key("round-trip")
    assert kc.lookup("round-trip") is None
    assert token.objects() == []


@pytest.mark.parametrize("which", ["legacy", "openssl_default"])
def test_openssl_cli_files_round_trip(
    kc: Keychain, token: Token, variants: P12Variants, rsa_client: ClientIdentity, which: str
) -> None:
    ident = kc.preauth_key(getattr(variants, which), rsa_client.password, which)
    assert ident.key_id == public_key_sha1(rsa_client)
    assert len(token.objects()) == 2  # certificate, key
    kc.kill_key(which)


def test_p12_as_bytes_and_password_as_bytes(kc: Keychain, ec_client: ClientIdentity) -> None:
    data = ec_client.p12.read_bytes()
    with kc.preauthorized(bytearray(data), ec_client.password.encode(), "bytes") as ident:
        assert ident.common_name == ec_client.cn


def test_private_key_attributes_are_locked_down(
    kc: Keychain, token: Token, rsa_client: ClientIdentity
) -> None:
    """createAccess: private, sensitive, non-extractable, sign only."""
    with kc.preauthorized(rsa_client.p12, rsa_client.password, "access"):
        code = (
            "import os, sys, PyKCS11\n"
            "from PyKCS11.LowLevel import *\n"
            "lib = PyKCS11.PyKCS11Lib(); lib.load(os.environ['VIEW_MODULE'])\n"
            "slot = [s for s in lib.getSlotList(True) "
            "if lib.getTokenInfo(s).label.strip() == os.environ['VIEW_TOKEN']][0]\n"
            "s = lib.openSession(slot); s.login(sys.stdin.read())\n"
            "k = s.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, 'access')])[0]\n"
            "attrs = [CKA_PRIVATE, CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_SIGN, CKA_DECRYPT,\n"
            "         CKA_UNWRAP, CKA_DERIVE, CKA_SIGN_RECOVER, CKA_ALWAYS_AUTHENTICATE]\n"
            "print(' '.join(str(int(bool(v))) for v in s.getAttributeValue(k, attrs)))\n"
        )
        env = {**os.environ, "VIEW_MODULE": token.module, "VIEW_TOKEN": token.label}
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=token.pin,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    assert out == ["1", "1", "0", "1", "0", "0", "0", "0", "0"]


BAD_P12 = [
    ("garbage", DecodeError, "not a PKCS#12"),
    ("empty", DecodeError, "empty"),
    ("pem", DecodeError, "not a PKCS#12"),
    ("cert_only", DecodeError, "no private key"),
    ("key_only", DecodeError, "no certificate"),
]


@pytest.mark.parametrize("which,error,text", BAD_P12)
def test_bad_p12_leaves_store_unchanged(
    kc: Keychain,
    token: Token,
    variants: P12Variants,
    rsa_client: ClientIdentity,
    which: str,
    error: type[Exception],
    text: str,
) -> None:
    with pytest.raises(error, match=text) as info:
        kc.preauth_key(getattr(variants, which), rsa_client.password, "bad")
    assert info.value.operation == "preauth_key"  # type: ignore[attr-defined]
    assert kc.lookup("bad") is None
    assert token.objects() == []


def test_wrong_password(kc: Keychain, token: Token, rsa_client: ClientIdentity) -> None:
    with pytest.raises(Pkcs12VerifyFailureError) as info:
        kc.preauth_key(rsa_client.p12, "not-the-password", "bad")
    assert isinstance(info.value, AuthFailedError)
    assert info.value.symbol == "errSecPkcs12VerifyFailure"
    assert "not-the-password" not in str(info.value) + repr(info.value)
    assert token.objects() == []


def test_missing_and_unreadable_files(kc: Keychain, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        kc.preauth_key(tmp_path / "missing.p12", "pw", "bad")
    with pytest.raises(ParamError, match="not a regular file"):
        kc.preauth_key(tmp_path, "pw", "bad")  # a directory: refused before any read
    with pytest.raises(TypeError):
        kc.preauth_key(42, "pw", "bad")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "label,error",
    [
        ("", ParamError),
        ("a\0b", ParamError),
        ("x" * 256, ParamError),
        ("\udcff", ParamError),
        (b"bytes", TypeError),
        (None, TypeError),
    ],
)
def test_bad_labels(kc: Keychain, rsa_client: ClientIdentity, label: object, error: type) -> None:
    with pytest.raises(error):
        kc.preauth_key(rsa_client.p12, rsa_client.password, label)  # type: ignore[arg-type]
    if error is ParamError:
        assert isinstance(pytest.raises(ValueError, kc.lookup, label).value, ParamError)


def test_longest_and_unicode_labels(kc: Keychain, ec_client: ClientIdentity) -> None:
    for label in ("é" * 127, "x" * 255, "with space;and/slash?"):
        with kc.preauthorized(ec_client.p12, ec_client.password, label) as ident:
            assert kc.lookup(label) == ident
            assert ident.label == label


def test_duplicate_label_refused_and_existing_untouched(
    kc: Keychain, token: Token, rsa_client: ClientIdentity, ec_client: ClientIdentity
) -> None:
    first = kc.preauth_key(rsa_client.p12, rsa_client.password, "dup")
    before = token.objects()
    with pytest.raises(DuplicateItemError, match="already in the store") as info:
        kc.preauth_key(ec_client.p12, ec_client.password, "dup")
    assert isinstance(info.value, FileExistsError)
    with pytest.raises(DuplicateItemError, match="under the label 'dup'"):
        kc.preauth_key(rsa_client.p12, rsa_client.password, "dup-same-key")
    assert token.objects() == before
    assert kc.lookup("dup") == first
    kc.kill_key("dup")


def test_identity_is_the_item_info_and_its_store(kc: Keychain, ec_client: ClientIdentity) -> None:
    """The seam is the platform: an Identity is the store's ItemInfo plus
    where it lives; PKCS#11 URIs only for a PKCS#11 token."""
    import dataclasses

    from keychain_ext import DarwinKeychain, Pkcs11Token
    from keychain_ext._backend import ItemInfo, Pkcs11Backend, platform_backend
    from keychain_ext.curl import curl_args, setup_pycurl
    from keychain_ext.errors import UnimplementedError

    assert isinstance(platform_backend(), Pkcs11Backend)  # this build: Linux
    ident = kc.preauth_key(ec_client.p12, ec_client.password, "seam")
    try:
        assert isinstance(ident, ItemInfo) and kc.lookup("seam") == ident
        assert isinstance(ident.store, Pkcs11Token)
        assert (ident.store.module, ident.store.token) == (kc.module, kc.token)
        assert ident.cert_uri == ident.store.uri("seam", "cert")
        assert ident.key_uri is not None and "object=seam;type=private" in ident.key_uri
        on_mac = dataclasses.replace(ident, store=DarwinKeychain())
        assert on_mac.cert_uri is None and on_mac.key_uri is None
        assert ident.nickname is None and on_mac.nickname == "seam"
        assert curl_args(on_mac) == ["--cert", "seam"]  # Secure Transport's nickname
        with pytest.raises(UnimplementedError, match="pycurl"):
            setup_pycurl(object(), on_mac)  # no Secure Transport here
    finally:
        kc.kill_key("seam")


def test_darwin_facade(monkeypatch: pytest.MonkeyPatch) -> None:
    """On macOS the same Keychain opens a keychain file (or the search list)
    through kc_open with no module and no PIN, and its identities name it.
    A stand-in store takes the backend's place here; the backend itself runs
    over the Security.framework test double in tests/darwin (make
    test-darwin-double) and on a Mac in tests/macos."""
    from keychain_ext import DarwinKeychain
    from keychain_ext import keychain as facade
    from keychain_ext._backend import DarwinBackend, ItemInfo

    item = ItemInfo(
        "mac", b"\x01" * 20, "CN=mac", "mac", "ec", False, True, True,
        True, False, False, 1, True, 0, "", None,
    )  # fmt: skip
    opened: list[object] = []

    class Store:
        def lookup(self, label: bytes) -> ItemInfo:
            return item

        def close(self) -> None:
            opened.append("closed")

    class Darwin(DarwinBackend):
        def open(self, keychain: object, state_dir: object = None) -> Store:  # type: ignore[override]
            assert state_dir is not None  # the store lock's directory
            opened.append(keychain)
            return Store()

    monkeypatch.setattr(facade, "platform_backend", Darwin)
    with pytest.raises(ParamError, match="no PKCS#11 module and no PIN"):
        Keychain(pin="1234")
    with Keychain(token="/tmp/x.keychain-db") as kc:
        found = kc.lookup("mac")
        assert found is not None and found.store == DarwinKeychain("/tmp/x.keychain-db")
        assert found.cert_uri is None and found.common_name == "mac"
    with Keychain() as kc:
        assert kc.location == DarwinKeychain(None)
    assert opened == ["/tmp/x.keychain-db", "closed", None, "closed"]


def test_kill_missing(kc: Keychain) -> None:
    with pytest.raises(ItemNotFoundError) as info:
        kc.kill_key("never-there")
    assert isinstance(info.value, LookupError)
    kc.kill_key("never-there", missing_ok=True)


def test_kill_by_another_handle(token: Token, kc: Keychain, ec_client: ClientIdentity) -> None:
    kc.preauth_key(ec_client.p12, ec_client.password, "other-handle")
    with token.open() as other:
        assert other.lookup("other-handle") is not None
        other.kill_key("other-handle")
    assert kc.lookup("other-handle") is None


def _kill_in_another_process(token: Token, label: str, force: bool = False) -> str:
    """kill_key(label) in a child process; its error class name, or ""."""
    code = (
        "import sys; from keychain_ext import Keychain, KeychainError\n"
        "m, t, label, force = sys.argv[1:5]\n"
        "with Keychain(m, t, sys.stdin.read()) as kc:\n"
        "    try: kc.kill_key(label, force=force == '1')\n"
        "    except KeychainError as e: print(type(e).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, token.module, token.label, label, "1" if force else "0"],
        input=token.pin,
        text=True,
        capture_output=True,
        check=True,
    )
    return done.stdout.strip()


def test_kill_by_another_process_needs_force_while_the_owner_runs(
    token: Token, kc: Keychain, ec_client: ClientIdentity
) -> None:
    kc.preauth_key(ec_client.p12, ec_client.password, "other-process")
    before = token.objects()
    assert _kill_in_another_process(token, "other-process") == "InvalidOwnerEditError"
    assert token.objects() == before
    assert _kill_in_another_process(token, "other-process", force=True) == ""
    assert kc.lookup("other-process") is None


def test_held_identity_is_killed_by_any_process(
    token: Token, kc: Keychain, ec_client: ClientIdentity
) -> None:
    ident = kc.preauth_key(ec_client.p12, ec_client.password, "held", held=True)
    assert (ident.held, ident.owners, ident.mine, ident.owner_alive) == (True, 0, False, True)
    assert kc.purge(dry_run=False) == []
    assert _kill_in_another_process(token, "held") == ""
    assert kc.lookup("held") is None


def test_preauthorized_kills_when_body_raises(kc: Keychain, rsa_client: ClientIdentity) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with kc.preauthorized(rsa_client.p12, rsa_client.password, "ctx"):
            assert kc.lookup("ctx") is not None
            raise RuntimeError("boom")
    assert kc.lookup("ctx") is None


def test_ephemeral_objects_never_reach_the_token(
    token: Token, kc: Keychain, rsa_client: ClientIdentity
) -> None:
    with token.open() as eph:
        ident = eph.preauth_key(rsa_client.p12, rsa_client.password, "eph", ephemeral=True)
        assert ident.ephemeral
        assert kc.lookup("eph") is not None  # same process: visible
        assert token.objects() == []  # other processes: nothing
        with pytest.raises(DuplicateItemError):
            kc.preauth_key(rsa_client.p12, rsa_client.password, "eph")
    assert kc.lookup("eph") is None  # closing the handle destroyed them


def test_ephemeral_kill(kc: Keychain, ec_client: ClientIdentity) -> None:
    kc.preauth_key(ec_client.p12, ec_client.password, "eph-kill", ephemeral=True)
    kc.kill_key("eph-kill")
    assert kc.lookup("eph-kill") is None


def test_wrong_pin(token: Token, kc: Keychain) -> None:
    """Also while this process is logged in with the right PIN: login state
    is the module's, per process, so C_Login answers
    CKR_USER_ALREADY_LOGGED_IN whatever the PIN, and the C layer checks a
    later PIN against the digest of the one `kc` logged in with."""
    with pytest.raises(AuthFailedError, match="CKR_PIN_INCORRECT") as info:
        Keychain(token.module, token.label, "wrong-pin")
    assert "wrong-pin" not in str(info.value)
    assert info.value.native_code == 0xA0


def test_missing_token_and_module(token: Token, tmp_path: Path) -> None:
    with pytest.raises(NoSuchKeychainError, match="no token labelled"):
        Keychain(token.module, "no-such-token", "1234")
    with pytest.raises(NoSuchKeychainError, match="cannot load"):
        Keychain(str(tmp_path / "missing.so"), token.label, "1234")
    with open("/proc/self/maps", encoding="utf-8") as maps:  # this process's libc, wherever it is
        libc = next(line.split()[-1] for line in maps if "/libc.so" in line or "/libc-" in line)
    with pytest.raises(NoSuchKeychainError, match="not a PKCS#11 module"):
        Keychain(libc, token.label, "1234")


def test_no_pin_is_an_error_not_a_prompt(token: Token) -> None:
    with pytest.raises(InteractionRequiredError):
        Keychain(token.module, token.label)


def test_pin_file(token: Token, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin + "\n")
    with Keychain(token.module, token.label, pin_file=pin_file) as kc:
        assert kc.items() == []


def test_closed_keychain(token: Token) -> None:
    kc = token.open()
    kc.close()
    kc.close()
    with pytest.raises(ParamError, match="closed"):
        kc.lookup("x")


def test_repr_has_no_pin(token: Token) -> None:
    with token.open() as kc:
        assert token.pin not in repr(kc) and token.pin not in str(vars(kc))


def test_items_lists_identities(
    kc: Keychain, rsa_client: ClientIdentity, ec_client: ClientIdentity
) -> None:
    with (
        kc.preauthorized(rsa_client.p12, rsa_client.password, "a"),
        kc.preauthorized(ec_client.p12, ec_client.password, "b", ephemeral=True),
    ):
        items = {i.label: i for i in kc.items()}
        assert set(items) == {"a", "b"}
        assert items["b"].ephemeral and not items["a"].ephemeral
        assert items["a"].has_certificate and items["a"].has_private_key


def test_threads_share_one_keychain(kc: Keychain, pki: PKI) -> None:
    clients = [
        make_client(pki, cn=f"t{n}", password="pw", key_type="ec", name=f"t{n}") for n in range(4)
    ]
    errors: list[BaseException] = []

    def work(n: int) -> None:
        data = clients[n].p12.read_bytes()
        try:
            for i in range(10):
                label = f"thread-{n}-{i}"
                kc.preauth_key(data, "pw", label, ephemeral=i % 2 == 0)
                assert kc.lookup(label) is not None
                kc.kill_key(label)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert kc.items() == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_works_in_a_forked_child(kc: Keychain, ec_client: ClientIdentity) -> None:
    kc.lookup("warm-up")  # the parent has used its session
    data = ec_client.p12.read_bytes()
    pid = os.fork()
    if pid == 0:  # child: exit status tells the parent what happened
        code = 1
        try:
            kc.preauth_key(data, ec_client.password, "forked")
            code = 0 if kc.lookup("forked") is not None else 2
            kc.kill_key("forked")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert kc.lookup("forked") is None
    kc.preauth_key(data, ec_client.password, "after-fork")  # parent still fine
    kc.kill_key("after-fork")


def test_embedded_default_store(tmp_path: Path, ec_client: ClientIdentity) -> None:
    """Keychain() needs no configuration: it creates its token on first use,
    with a 0700 directory and a 0600 PIN file, and reuses it after."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["KEYCHAIN_EXT_HOME"] = str(home)
    code = (
        "import sys; from keychain_ext import Keychain\n"
        "with Keychain() as kc:\n"
        "    with kc.preauthorized(sys.argv[1], sys.stdin.read(), 'embedded') as i:\n"
        "        assert kc.lookup('embedded') is not None\n"
        "    print(len(kc.items()), i.store.env['SOFTHSM2_CONF'])\n"
    )
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code, str(ec_client.p12)],
            input=ec_client.password,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out == ["0", str(home / "softhsm" / "softhsm2.conf")]
    assert (home / "softhsm").stat().st_mode & 0o777 == 0o700
    assert (home / "softhsm" / "pin").stat().st_mode & 0o777 == 0o600


def test_embedded_refuses_foreign_softhsm_conf() -> None:
    with pytest.raises(ParamError, match="SOFTHSM2_CONF"):
        Keychain()


def test_error_table_is_keychain_h() -> None:
    """errors.py's one table names every OSStatus of keychain.h (the
    KC_errSec* constants of the compiled module) and nothing else; each
    class's status is the header's number."""
    from keychain_ext._native import lib

    header = {n[len("KC_") :]: getattr(lib, n) for n in dir(lib) if n.startswith("KC_errSec")}
    assert set(errors._TABLE) == set(header)
    for symbol, (cls, _message) in errors._TABLE.items():
        assert errors.symbol(header[symbol]) == symbol
        assert errors.error_class(header[symbol]) is cls
        assert cls is errors.KeychainError or cls.status == header[symbol], symbol
    classes = [cls for cls, _ in errors._TABLE.values()]
    assert len(set(classes)) == len(classes)  # one class per status


@pytest.mark.parametrize(
    "name", [cls.__name__ for cls, _ in errors._TABLE.values() if cls is not KeychainError]
)
def test_error_table(name: str) -> None:
    cls = getattr(errors, name)
    status = cls.status
    assert errors.error_class(status) is cls
    exc = cls(status, "detail text", operation="op", native_code=7)
    assert isinstance(exc, KeychainError) and isinstance(exc, OSError)
    assert exc.symbol.startswith("errSec") and exc.symbol in str(exc)
    assert (exc.status, exc.operation, exc.native_code) == (status, "op", 7)
    assert str(exc) == f"op: detail text [{exc.symbol} {status}]"
    assert isinstance(cls(), cls) and cls().status == status  # default detail
    import pickle

    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is cls and str(again) == str(exc)


def test_error_table_builtins_and_unknown_codes() -> None:
    from keychain_ext import errors

    assert issubclass(errors.ItemNotFoundError, LookupError)
    assert issubclass(errors.ParamError, ValueError)
    assert issubclass(errors.DecodeError, ValueError)
    assert issubclass(errors.DuplicateItemError, FileExistsError)
    assert issubclass(errors.Pkcs12VerifyFailureError, errors.AuthFailedError)
    with pytest.raises(KeychainError) as info:
        errors.raise_status(-99999, "odd")
    assert type(info.value) is KeychainError
    assert info.value.status == -99999 and info.value.symbol == "unknown OSStatus"
    assert errors.symbol(-25300) == "errSecItemNotFound"


FOREIGN_CERT = """
import os, sys, PyKCS11
from PyKCS11.LowLevel import *
lib = PyKCS11.PyKCS11Lib(); lib.load(os.environ["VIEW_MODULE"])
slot = [s for s in lib.getSlotList(True)
        if lib.getTokenInfo(s).label.strip() == os.environ["VIEW_TOKEN"]][0]
s = lib.openSession(slot, CKF_RW_SESSION); s.login(sys.stdin.read())
der = open(sys.argv[1], "rb").read()
s.createObject([(CKA_CLASS, CKO_CERTIFICATE), (CKA_CERTIFICATE_TYPE, CKC_X_509),
                (CKA_TOKEN, True), (CKA_LABEL, "foreign"), (CKA_VALUE, der),
                (CKA_SUBJECT, b"")])  # SoftHSM2 insists on the attribute
"""


def test_certificate_without_subject_attribute(
    kc: Keychain, token: Token, rsa_client: ClientIdentity, tmp_path: Path
) -> None:
    """A certificate another tool stored with an empty CKA_SUBJECT is
    described from its value; it is not keychain_ext's, so kill removes it
    only when forced."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = tmp_path / "cert.der"
    der.write_bytes(
        x509.load_pem_x509_certificate(rsa_client.cert.read_bytes()).public_bytes(Encoding.DER)
    )
    env = {**os.environ, "VIEW_MODULE": token.module, "VIEW_TOKEN": token.label}
    subprocess.run([sys.executable, "-c", FOREIGN_CERT, str(der)], input=token.pin, env=env,
                   text=True, check=True)  # fmt: skip
    found = kc.lookup("foreign")
    assert found is not None
    assert (found.common_name, found.subject) == (rsa_client.cn, f"CN={rsa_client.cn}")
    assert not found.ours
    with pytest.raises(InvalidOwnerEditError, match="has no lease"):
        kc.kill_key("foreign")
    assert kc.lookup("foreign") is not None
    kc.kill_key("foreign", force=True)


def test_every_item_info_field_is_filled_from_c() -> None:
    """_info fills ItemInfo without its __init__: a field added to the class
    and not filled there would be missing, not defaulted."""
    from dataclasses import fields

    from keychain_ext._native_backend import _info, ffi

    c = ffi.new("kc_item_info *")
    c.label, c.owner_alive = b"x", -1
    info = _info(c)
    assert set(vars(info)) == {f.name for f in fields(info)}
    assert info.label == "x" and info.owner_alive is None and hash(info) == hash(_info(c))
