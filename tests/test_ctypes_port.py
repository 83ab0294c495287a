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
