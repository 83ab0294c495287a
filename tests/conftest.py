"""Shared fixtures: one SoftHSM2 configuration for the whole test session,
and NSS softoken databases as a second kind of token.

SoftHSM2 reads SOFTHSM2_CONF once per process, when the module is first
initialized, so it is set here, at import, before anything loads the module;
every test module makes its own tokens inside it.  Nothing touches the
user's tokens or the user's keychain_ext directory.  NSS encrypts every
sensitive attribute with 10,000 PBKDF2 rounds; the tests lower that to 1
(NSS_MAX_MP_PBE_ITERATION_COUNT, read when NSS starts).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from .nss_token import FAST_ENV

_ROOT = Path(tempfile.mkdtemp(prefix="keychain-ext-tests-"))
(_ROOT / "tokens").mkdir()
(_ROOT / "home").mkdir(mode=0o700)
SOFTHSM2_CONF = _ROOT / "softhsm2.conf"
SOFTHSM2_CONF.write_text(
    f"directories.tokendir = {_ROOT / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
)
os.environ["SOFTHSM2_CONF"] = str(SOFTHSM2_CONF)
os.environ["KEYCHAIN_EXT_HOME"] = str(_ROOT / "home")
for _var in ("KEYCHAIN_EXT_MODULE", "KEYCHAIN_EXT_TOKEN", "KEYCHAIN_EXT_PIN_FILE"):
    os.environ.pop(_var, None)
os.environ.update(FAST_ENV)

from keychain_ext import Keychain  # noqa: E402
from keychain_ext._native_backend import NativeBackend  # noqa: E402
from keychain_ext._store import softhsm2_module  # noqa: E402

from .nss_token import create_nss_token, softokn_module  # noqa: E402
from .pki import (  # noqa: E402
    PKI,
    ClientIdentity,
    P12Variants,
    make_client,
    make_pki,
    make_variants,
)

TOKEN_VIEW = Path(__file__).resolve().parent / "token_view.c"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_ROOT, ignore_errors=True)


def _token_view() -> Path:
    """tests/token_view.c, built once per test session (or prebuilt:
    KEYCHAIN_EXT_TEST_TOKEN_VIEW, for runs without a compiler)."""
    prebuilt = os.environ.get("KEYCHAIN_EXT_TEST_TOKEN_VIEW")
    if prebuilt:
        return Path(prebuilt)
    exe = _ROOT / "token_view"
    if not exe.exists():
        cflags = subprocess.run(
            ["pkg-config", "--cflags", "p11-kit-1"], capture_output=True, text=True, check=True
        ).stdout.split()
        subprocess.run(
            ["gcc", "-O1", "-Wall", "-Werror", *cflags, "-o", str(exe), str(TOKEN_VIEW), "-ldl"],
            check=True,
        )
    return exe


@dataclass(frozen=True)
class Token:
    """A fresh token of this test session: SoftHSM2, or NSS softoken when
    init_args names its database."""

    module: str
    label: str
    pin: str
    init_args: Optional[str] = None

    def open(self, **kwargs: object) -> Keychain:
        if self.init_args:
            kwargs.setdefault("init_args", self.init_args)
        return Keychain(self.module, self.label, self.pin, **kwargs)  # type: ignore[arg-type]

    def objects(self) -> list[dict[str, object]]:
        """Every object on the token as another process sees it, logged in
        (token objects only: session objects are private to their process),
        unlabelled ones included.  Read by tests/token_view.c in a child
        process, independent of keychain_ext."""
        env = {**os.environ, "VIEW_MODULE": self.module, "VIEW_TOKEN": self.label}
        if self.init_args:
            env["VIEW_INIT_ARGS"] = self.init_args
        done = subprocess.run(
            [str(_token_view())], input=self.pin, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"token_view failed: {done.stderr}"
        found = json.loads(done.stdout)
        return sorted(found, key=lambda o: (str(o["label"]), str(o["class"])))  # type: ignore[no-any-return]


def new_token(label: str | None = None) -> Token:
    label = label or f"t{secrets.token_hex(6)}"
    pin = secrets.token_hex(8)
    NativeBackend().init_token(softhsm2_module(), label, secrets.token_hex(8), pin)
    return Token(softhsm2_module(), label, pin)


@pytest.fixture(scope="module")
def token() -> Token:
    """A token of its own for each test module."""
    return new_token()


@pytest.fixture
def kc(token: Token) -> Iterator[Keychain]:
    with token.open() as keychain:
        yield keychain
    # a test must leave its token as it found it
    assert token.objects() == [], "test left objects on the token"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def rsa_client(pki: PKI) -> ClientIdentity:
    return make_client(pki, cn="client-rsa", password="s3cret-rsa", key_type="rsa")


@pytest.fixture(scope="session")
def ec_client(pki: PKI) -> ClientIdentity:
    return make_client(pki, cn="client-ec", password="s3cret-ec", key_type="ec")


@pytest.fixture(scope="session")
def variants(rsa_client: ClientIdentity) -> P12Variants:
    return make_variants(rsa_client)


def new_nss_token() -> Token:
    """A fresh NSS softoken database (skips when NSS is not installed)."""
    if softokn_module() is None or shutil.which("certutil") is None:
        pytest.skip("NSS softoken needs libnss3 and libnss3-tools (apt-get install libnss3-tools)")
    nss = create_nss_token(Path(tempfile.mkdtemp(dir=_ROOT, prefix="nss-")), secrets.token_hex(8))
    return Token(nss.module, nss.token_label, nss.pin, nss.init_string)


@pytest.fixture(scope="module", params=["softhsm2", "nss"])
def any_token(request: pytest.FixtureRequest) -> Token:
    """Each kind of token the core tests run on: SoftHSM2 and NSS softoken."""
    return new_token() if request.param == "softhsm2" else new_nss_token()
