"""The built extension: one C API, nothing else exported."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from keychain_ext import _native


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
