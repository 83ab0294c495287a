"""The built extension: one C API, nothing else exported."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from keychain_ext import Keychain, _native

from .pki import ClientIdentity, P12Variants


def test_only_the_module_init_is_exported() -> None:
    """The support units' functions (fail, find, begin, ...) are not
    exported, so they can never clash with another library's symbols."""
    if shutil.which("nm") is None:
        pytest.skip("nm not found (apt-get install binutils)")
    out = subprocess.run(
        ["nm", "-D", "--defined-only", _native.__file__],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert exported == {"PyInit__native"}


def test_static_openssl_build_is_self_contained(
    kc: Keychain, variants: P12Variants, rsa_client: ClientIdentity
) -> None:
    """Built against $KEYCHAIN_EXT_OPENSSL (scripts/build-openssl, what the
    wheels ship): no libcrypto is loaded from the system, and an RC2-40
    (`openssl pkcs12 -export -legacy`) file imports through the legacy
    provider built into the static library, with no module path."""
    if not os.environ.get("KEYCHAIN_EXT_OPENSSL"):
        pytest.skip("KEYCHAIN_EXT_OPENSSL is not set: the extension links the system's libcrypto")
    if shutil.which("ldd") is None:
        pytest.skip("ldd not found")
    needed = subprocess.run(
        ["ldd", _native.__file__], capture_output=True, text=True, check=True
    ).stdout
    assert "libcrypto" not in needed and "libssl" not in needed, needed
    with kc.preauthorized(variants.legacy, rsa_client.password, "static-legacy") as ident:
        assert ident.common_name == rsa_client.cn
