"""The ctypes port against the C extension: same PKCS#11 calls, same
descriptions of tricky certificates, same errors under injected faults, each
reading what the other wrote.  Everything else runs for both impls through
the `impl` fixture of the other test modules."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from keychain_ext import AuthFailedError, Keychain

from .conftest import IMPLS, Token, new_token

SHIM_BUILD = Path(__file__).resolve().parent / "p11shim" / "build.py"


def _p12(name: x509.Name) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return pkcs12.serialize_key_and_certificates(
        b"n", key, cert, None, serialization.BestAvailableEncryption(b"pw")
    )


def _attr(oid: x509.ObjectIdentifier, value: str, kind: _ASN1Type | None = None) -> x509.NameAttribute:
    with warnings.catch_warnings():  # over-long values are the point
        warnings.simplefilter("ignore")
        if kind is None:
            return x509.NameAttribute(oid, value, _validate=False)
        return x509.NameAttribute(oid, value, _type=kind, _validate=False)


A = NameOID
NAMES = {
    "escapes": [_attr(A.COMMON_NAME, ',+"\\<>;=/ x')],
    "leading_hash_and_spaces": [_attr(A.COMMON_NAME, "# lead"), _attr(A.ORGANIZATION_NAME, " o ")],
    "single_hash": [_attr(A.COMMON_NAME, "#")],
    "single_space": [_attr(A.COMMON_NAME, " ")],
    "controls": [_attr(A.COMMON_NAME, "a\x01b\x1fc\x7fd")],
    "utf8": [_attr(A.COMMON_NAME, "Zoë 💡 日本"), _attr(A.LOCALITY_NAME, "Köln")],
    "bmp_and_universal": [
        _attr(A.COMMON_NAME, "Straße", _ASN1Type.BMPString),
        _attr(A.ORGANIZATION_NAME, "Ünï", _ASN1Type.UniversalString),
    ],
    "printable_ia5_t61": [
        _attr(A.COUNTRY_NAME, "DE", _ASN1Type.PrintableString),
        _attr(A.EMAIL_ADDRESS, "a@b.example", _ASN1Type.IA5String),
        _attr(A.ORGANIZATIONAL_UNIT_NAME, "t61 unit", _ASN1Type.T61String),
    ],
    "short_names": [
        _attr(A.DOMAIN_COMPONENT, "example"), _attr(A.USER_ID, "u1"),
        _attr(A.SERIAL_NUMBER, "42"), _attr(A.STATE_OR_PROVINCE_NAME, "Bavaria"),
        _attr(A.STREET_ADDRESS, "Main St 1"), _attr(A.GIVEN_NAME, "Ada"),
        _attr(A.SURNAME, "L"), _attr(A.TITLE, "Dr"), _attr(A.PSEUDONYM, "p"),
        _attr(A.BUSINESS_CATEGORY, "b"), _attr(A.POSTAL_CODE, "80331"),
        _attr(A.JURISDICTION_COUNTRY_NAME, "DE"),
        _attr(A.ORGANIZATION_IDENTIFIER, "VATDE-1"),
    ],
    "unknown_oid": [_attr(x509.ObjectIdentifier("1.2.3.4.5"), "odd"), _attr(A.COMMON_NAME, "k")],
    "two_cns": [_attr(A.COMMON_NAME, "first"), _attr(A.COMMON_NAME, "second")],
    "no_cn": [_attr(A.ORGANIZATION_NAME, "only org")],
    # past KC_SUBJECT_MAX and KC_LABEL_MAX: truncated alike (mid-character)
    "long": [_attr(A.COMMON_NAME, "é" * 200)] + [_attr(A.ORGANIZATIONAL_UNIT_NAME, "u" * 60)] * 8,
}


@pytest.fixture(scope="module")
def tricky() -> dict[str, bytes]:
    out = {}
    for key, attrs in NAMES.items():
        out[key] = _p12(x509.Name(attrs))
    # a multi-valued RDN: OpenSSL reverses its entries too
    out["multi_valued"] = _p12(
        x509.Name([
            x509.RelativeDistinguishedName([_attr(A.COUNTRY_NAME, "DE")]),
            x509.RelativeDistinguishedName(
                [_attr(A.ORGANIZATION_NAME, "O1"), _attr(A.ORGANIZATIONAL_UNIT_NAME, "U1"),
                 _attr(A.COMMON_NAME, "multi")]
            ),
        ])
    )  # fmt: skip
    return out


@pytest.mark.parametrize("which", [*NAMES, "multi_valued"])
def test_certificate_descriptions_match_native(
    token: Token, tricky: dict[str, bytes], which: str
) -> None:
    """Subject (RFC 2253 as OpenSSL prints it) and CN, at import and as read
    back from the token, are the same in both implementations."""
    seen = {}
    for impl in ("native", "ctypes"):
        with token.open(impl) as kc:
            for ephemeral in (True, False):
                made = kc.preauth_key(tricky[which], "pw", f"desc-{impl}", ephemeral=ephemeral)
                found = kc.lookup(f"desc-{impl}")
                listed = [i for i in kc.items() if i.label == f"desc-{impl}"]
                kc.kill_key(f"desc-{impl}")
                assert found is not None and len(listed) == 1
                seen[impl, ephemeral] = [
                    (made.subject, made.common_name, made.key_id),
                    (found.subject, found.common_name, found.key_id),
                    (listed[0].subject, listed[0].common_name, listed[0].key_id),
                ]
    for ephemeral in (True, False):
        assert seen["ctypes", ephemeral] == seen["native", ephemeral]


@pytest.mark.parametrize("writer,reader", [("native", "ctypes"), ("ctypes", "native")])
def test_each_reads_and_removes_what_the_other_wrote(
    token: Token, rsa_client: object, writer: str, reader: str
) -> None:
    client = rsa_client
    with token.open(writer) as w, token.open(reader) as r:
        made = w.preauth_key(client.p12, client.password, "interop")  # type: ignore[attr-defined]
        seen = [w.lookup("interop"), r.lookup("interop")]
        assert [dataclasses.replace(i, pin_file=None) for i in seen if i is not None] == [
            dataclasses.replace(made, pin_file=None)
        ] * 2
        assert w.items() == r.items()
        r.kill_key("interop")
        assert w.lookup("interop") is None
    assert token.objects() == []


def test_missing_cryptography_is_a_clear_import_error(
    token: Token, ec_client: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.serialization", None)
    with token.open("ctypes") as kc:
        with pytest.raises(ImportError, match="'cryptography' package"):
            kc.preauth_key(ec_client.p12, ec_client.password, "no-crypto")  # type: ignore[attr-defined]
        assert kc.lookup("no-crypto") is None


WRONG_PIN_CHILD = """
import json, sys
from keychain_ext import AuthFailedError, Keychain
module, label, impl = sys.argv[1:4]
pin = sys.stdin.read()
out = []
def attempt(p):
    try:
        Keychain(module, label, p, impl=impl).close()
        out.append("ok")
    except AuthFailedError as exc:
        out.append([exc.symbol, exc.native_code, "CKR_PIN_INCORRECT" in str(exc)])
attempt("wrong-" + pin)   # first contact of this process: a real C_Login
attempt(pin)              # logs in
attempt("wrong-" + pin)   # already logged in: the PIN digest check
print(json.dumps(out))
"""


@pytest.mark.parametrize("impl", IMPLS)
def test_wrong_pin_in_a_fresh_process(token: Token, impl: str) -> None:
    """A wrong PIN as the very first contact, then after a right one.  A
    fresh interpreter, because in this process the other implementation may
    already have logged the token in (then C_Login cannot tell a wrong PIN,
    see test_keychain.py::test_wrong_pin)."""
    out = subprocess.run(
        [sys.executable, "-c", WRONG_PIN_CHILD, token.module, token.label, impl],
        input=token.pin, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    refused = ["errSecAuthFailed", 0xA0, True]
    assert json.loads(out) == [refused, "ok", refused]


SHIM_CHILD = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("p11shim_build", sys.argv[1])
build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)
shim_path, label, impl, p12, fault = sys.argv[2:7]
os.environ["P11SHIM_TARGET"] = os.environ.pop("SHIM_TARGET")
shim = build.Shim(shim_path)
from keychain_ext import Keychain, KeychainError
pin = sys.stdin.read()
steps = {}
shim.reset()
kc = Keychain(shim_path, label, pin, impl=impl, lock=False)
steps["open"] = shim.trace()
def step(name, fn):
    shim.reset()
    try:
        fn(); result = "ok"
    except KeychainError as exc:
        result = [exc.status, exc.detail, exc.operation, exc.native_code]
    steps[name] = [result, shim.trace()]
data = open(p12, "rb").read()
for eph in (True, False):
    step(f"preauth-{eph}", lambda: kc.preauth_key(data, "pw", "shim", ephemeral=eph))
    step(f"duplicate-{eph}", lambda: kc.preauth_key(data, "pw", "shim2", ephemeral=eph))
    step(f"lookup-{eph}", lambda: kc.lookup("shim"))
    step(f"items-{eph}", lambda: kc.items())
    step(f"kill-{eph}", lambda: kc.kill_key("shim"))
    step(f"lookup-miss-{eph}", lambda: kc.lookup("shim"))
    step(f"kill-miss-{eph}", lambda: kc.kill_key("shim"))
name, k, rv = fault.split(":")
shim.fail_function(name, int(k), int(rv, 0))
step("preauth-fault", lambda: kc.preauth_key(data, "pw", "shim", ephemeral=False))
shim.clear_faults()
step("lookup-after-fault", lambda: kc.lookup("shim"))
step("cleanup", lambda: kc.kill_key("shim", missing_ok=True))
kc.close()
print(json.dumps(steps))
"""


@pytest.fixture(scope="module")
def shim_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Token, Path]:
    spec = importlib.util.spec_from_file_location("p11shim_build", SHIM_BUILD)
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        so = build.build_shim(tmp_path_factory.mktemp("shim"))
    except RuntimeError as exc:  # no compiler / no p11-kit header
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot build the p11shim: {exc}")
    p12 = tmp_path_factory.mktemp("shim-p12") / "shim.p12"
    p12.write_bytes(_p12(x509.Name([_attr(A.COMMON_NAME, "shim")])))
    return str(so), new_token(), p12


@pytest.mark.parametrize(
    "fault",
    ["C_CreateObject:3:0x31", "C_CreateObject:2:0x31", "C_FindObjectsInit:1:0x31",
     "C_FindObjects:2:0x31", "C_DestroyObject:1:0x31",  # undo fails: nothing to undo
     "C_CreateObject:1:0x5", "C_CreateObject:3:0x30"],  # transient: retried
)  # fmt: skip
def test_same_pkcs11_calls_as_native(
    shim_token: tuple[str, Token, Path], fault: str
) -> None:
    """Through the counting shim, in a child process per impl: every
    operation makes the same PKCS#11 calls in the same order, and an
    injected failure gives the same error and leaves the same state.  (Not
    per impl: it compares the two.)"""
    so, token, p12 = shim_token
    runs = {}
    for impl in ("native", "ctypes"):
        env = {**os.environ, "SHIM_TARGET": token.module}
        env.pop("P11SHIM_TARGET", None)
        out = subprocess.run(
            [sys.executable, "-c", SHIM_CHILD, str(SHIM_BUILD), so, token.label, impl,
             str(p12), fault],
            input=token.pin, env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        runs[impl] = json.loads(out)
    for step in runs["native"]:
        assert runs["ctypes"][step] == runs["native"][step], step
    assert token.objects() == []


# An object put on the token behind keychain_ext's back (PyKCS11, real
# module): a crash orphan (a data object with nothing but defaults) or a
# labelled data object of someone else.  One at a time: SoftHSM2 lists
# objects in an order that differs between processes.
MAKE_OBJECTS = """
import os, sys, PyKCS11
from PyKCS11.LowLevel import CKA_CLASS, CKA_LABEL, CKA_TOKEN, CKA_VALUE, CKO_DATA
lib = PyKCS11.PyKCS11Lib(); lib.load(sys.argv[1])
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == sys.argv[2])
session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
session.login(sys.stdin.read())
if sys.argv[3] == "orphan":
    session.createObject([(CKA_CLASS, CKO_DATA), (CKA_TOKEN, True)])
else:
    session.createObject([(CKA_CLASS, CKO_DATA), (CKA_TOKEN, True), (CKA_LABEL, "foreign"),
                          (CKA_VALUE, b"x")])
session.logout(); session.closeSession()
"""

# A process that imports token identities and dies without removing them.
DEAD_OWNER = """
import os, sys
from keychain_ext import Keychain
module, label = sys.argv[1:3]
kc = Keychain(module, label, sys.stdin.read(), impl="native")
for p12, name in zip(sys.argv[3::2], sys.argv[4::2]):
    kc.preauth_key(open(p12, "rb").read(), "pw", name)
os._exit(0)
"""

STALE_CHILD = """
import importlib.util, json, os, re, subprocess, sys
spec = importlib.util.spec_from_file_location("p11shim_build", sys.argv[1])
build = importlib.util.module_from_spec(spec); spec.loader.exec_module(build)
shim_path, label, impl, p12_a, p12_b, p12_c = sys.argv[2:8]
real = os.environ.pop("SHIM_TARGET")
os.environ["P11SHIM_TARGET"] = real
shim = build.Shim(shim_path)
from keychain_ext import Keychain, KeychainError
pin = sys.stdin.read()
A, B, C = (open(p, "rb").read() for p in (p12_a, p12_b, p12_c))
steps = {}
def norm(value):
    # owner pids differ between the runs of the two impls
    return re.sub(r"process [0-9]+", "process N", value) if isinstance(value, str) else value
def step(name, fn, fault=None):
    if fault:
        fname, k, rv = fault
        shim.fail_function(fname, k, rv)
    shim.reset()
    try:
        out = fn()
        if isinstance(out, list) and out and hasattr(out[0], "label"):
            out = sorted([i.label, i.has_certificate, i.has_private_key, i.ephemeral,
                          i.owner_alive, i.key_type] for i in out)
        result = ["ok", out if isinstance(out, list) else None]
    except KeychainError as exc:
        result = [exc.status, norm(exc.detail), exc.operation, exc.native_code]
    shim.clear_faults()
    steps[name] = [result, shim.trace()]
def run(script, *args):
    subprocess.run([sys.executable, "-c", os.environ[script], *args], input=pin, text=True,
                   check=True)
kc = Keychain(shim_path, label, pin, impl=impl, lock=False)
store = kc._store
run("MAKE_OBJECTS", real, label, "orphan")
step("items-orphan", kc.items)
step("sweep", lambda: store.reclaim_stale(None))
step("sweep-none", lambda: store.reclaim_stale(None))
run("MAKE_OBJECTS", real, label, "foreign")
step("sweep-foreign", lambda: store.reclaim_stale(None))
step("items-unreadable", kc.items, ("C_GetAttributeValue", 1, 0x13))
step("sweep-unreadable", lambda: store.reclaim_stale(None), ("C_GetAttributeValue", 1, 0x13))
step("sweep-fault", lambda: store.reclaim_stale(None), ("C_FindObjects", 1, 0x31))
run("DEAD_OWNER", real, label, p12_a, "stale", p12_b, "stale2")
step("items-dead", kc.items)
step("refuse-dead", lambda: kc.preauth_key(B, "pw", "stale2"))
step("preauth-live", lambda: kc.preauth_key(C, "pw", "live"))
step("reclaim-live", lambda: store.reclaim_stale(b"live"))
step("reclaim-missing", lambda: store.reclaim_stale(b"nothing"))
step("reclaim-dead", lambda: store.reclaim_stale(b"stale"))
step("preauth-reclaim", lambda: kc.preauth_key(B, "pw", "stale2", stale="reclaim"))
step("kill-stale2", lambda: kc.kill_key("stale2"))
step("kill-live", lambda: kc.kill_key("live"))
# kill by the remembered key id: an identity that replaced ours stays
other = Keychain(shim_path, label, pin, impl=impl, lock=False)
step("preauth-swap", lambda: kc.preauth_key(A, "pw", "swap"))
step("kill-swap-other", lambda: other.kill_key("swap"))
step("preauth-swap-other", lambda: other.preauth_key(C, "pw", "swap"))
step("kill-replaced", lambda: kc.kill_key("swap"))
step("lookup-replaced", lambda: [kc.lookup("swap").key_id.hex()])
step("kill-swap-other-2", lambda: other.kill_key("swap"))
# a lease that cannot be removed stops the removal; a retry completes it
step("preauth-lr", lambda: kc.preauth_key(A, "pw", "lr"))
step("kill-lease-fault", lambda: kc.kill_key("lr"), ("C_DestroyObject", 3, 0x31))
step("kill-lr-again", lambda: kc.kill_key("lr"))
step("open-missing-token", lambda: Keychain(shim_path, label + "-no", pin, impl=impl, lock=False))
# fork: the child re-initializes, logs in again and still checks the PIN
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    step("fork-lookup", lambda: kc.lookup("nothing"))
    step("fork-wrong-pin", lambda: Keychain(shim_path, label, "wrong-" + pin, impl=impl,
                                            lock=False))
    step("fork-open", lambda: Keychain(shim_path, label, pin, impl=impl, lock=False).close())
    os.write(w, json.dumps(steps).encode()); os._exit(0)
os.close(w)
with os.fdopen(r) as f:
    steps = json.loads(f.read())
os.wait()
other.close(); kc.close()
print(json.dumps(steps))
"""


def test_same_pkcs11_calls_for_leftovers(
    shim_token: tuple[str, Token, Path], tmp_path: Path
) -> None:
    """Crash orphans, unreadable objects, dead owners, reclaim, kill by key
    id and fork, through the shim: the same PKCS#11 calls and results."""
    so, token, _ = shim_token
    p12s = []
    for name in "abc":
        p12s.append(tmp_path / f"{name}.p12")
        p12s[-1].write_bytes(_p12(x509.Name([_attr(A.COMMON_NAME, name)])))
    runs = {}
    for impl in ("native", "ctypes"):
        assert token.objects() == []
        env = {**os.environ, "SHIM_TARGET": token.module, "MAKE_OBJECTS": MAKE_OBJECTS,
               "DEAD_OWNER": DEAD_OWNER}  # fmt: skip
        env.pop("P11SHIM_TARGET", None)
        out = subprocess.run(
            [sys.executable, "-c", STALE_CHILD, str(SHIM_BUILD), so, token.label, impl,
             *map(str, p12s)],
            input=token.pin, env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        runs[impl] = json.loads(out.stdout)
    native = runs["native"]
    for step in native:
        assert runs["ctypes"][step] == native[step], step
    # what the steps are about did happen (in both, as they are equal)
    assert native["items-orphan"][0] == ["ok", [["", False, False, False, False, None]]]
    assert native["sweep"][0] == ["ok", None] and "C_DestroyObject" in native["sweep"][1]
    assert native["sweep-none"][0][0] == -25300
    assert native["sweep-foreign"][0][0] == -25300  # labelled: not an orphan
    assert native["items-unreadable"][0] == ["ok", [["", False, False, False, False, None]]]
    assert native["sweep-unreadable"][0] == ["ok", None]
    assert native["sweep-fault"][0][0] == -108
    assert native["refuse-dead"][0][0] == -25299 and "(dead)" in native["refuse-dead"][0][1]
    assert native["reclaim-live"][0][0] == -25299
    assert native["reclaim-missing"][0][0] == -25300
    assert native["preauth-reclaim"][0] == ["ok", None]
    assert native["kill-replaced"][0][0] == -25300
    assert "C_DestroyObject" not in native["kill-replaced"][1]  # its lease (CKA_OBJECT_ID) kept
    assert native["lookup-replaced"][0][0] == "ok"
    assert "removing the lease" in native["kill-lease-fault"][0][1]
    assert native["open-missing-token"][0][0] == -25294
    assert native["open-missing-token"][1].count("C_GetSlotList") == 10  # 5 tries
    assert native["fork-wrong-pin"][0][0] == -25293
    assert "C_Login" not in native["fork-wrong-pin"][1]
    assert native["fork-open"][0] == ["ok", None]
    assert token.objects() == []


def test_init_token_refuses_an_empty_module_path() -> None:
    from keychain_ext.keychain import _backend

    errors = []
    for impl in IMPLS:
        with pytest.raises(Exception) as info:
            _backend(impl).init_token("", "t", "so", "user")
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    assert "module, token label and both PINs are required" in errors[0][1]


def test_wrong_pin_after_native_login_is_not_detectable_by_c_login(token: Token) -> None:
    """Documents the shared-process limit both implementations have: the
    first PIN an implementation sees after another one logged the token in
    cannot be checked (C_Login says CKR_USER_ALREADY_LOGGED_IN); each impl
    checks later PINs against its own first one."""
    fresh = new_token()
    with fresh.open("native"):
        pass  # the native backend logged this token in for the process
    with pytest.raises(AuthFailedError):
        Keychain(fresh.module, fresh.label, "wrong", impl="native")
    with fresh.open("ctypes"):  # right PIN registered first: checks work
        with pytest.raises(AuthFailedError):
            Keychain(fresh.module, fresh.label, "wrong", impl="ctypes")
