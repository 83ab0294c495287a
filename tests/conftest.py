"""Shared fixtures: one SoftHSM2 configuration for the whole test session.

SoftHSM2 reads SOFTHSM2_CONF once per process, when the module is first
initialized, so it is set here, at import, before anything loads the module;
every test module makes its own tokens inside it.  Nothing touches the
user's tokens or the user's keychain_ext directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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

from keychain_ext import Keychain  # noqa: E402
from keychain_ext._native_backend import NativeBackend  # noqa: E402
from keychain_ext._store import softhsm2_module  # noqa: E402

from .pki import (  # noqa: E402
    PKI,
    ClientIdentity,
    P12Variants,
    make_client,
    make_pki,
    make_variants,
)

TOKEN_VIEW = Path(__file__).resolve().parent / "token_view.py"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_ROOT, ignore_errors=True)


@dataclass(frozen=True)
class Token:
    """A fresh SoftHSM2 token of this test session."""

    module: str
    label: str
    pin: str

    def open(self, **kwargs: object) -> Keychain:
        return Keychain(self.module, self.label, self.pin, **kwargs)  # type: ignore[arg-type]

    def objects(self) -> list[dict[str, object]]:
        """Every object on the token as another process sees it (token
        objects only: session objects are private to their process).  Read
        with PyKCS11 in a child process, independent of keychain_ext."""
        env = {**os.environ, "VIEW_MODULE": self.module, "VIEW_TOKEN": self.label}
        done = subprocess.run(
            [sys.executable, str(TOKEN_VIEW)],
            input=self.pin,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"token_view failed: {done.stderr}"
        return json.loads(done.stdout)  # type: ignore[no-any-return]


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
