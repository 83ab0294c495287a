"""The C sources of the PKCS#11 backend, as csrc/build_ffi.py compiles them,
for the harnesses that build the backend themselves (fuzzing, memcheck)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pkcs11_sources() -> list[Path]:
    spec = importlib.util.spec_from_file_location("build_ffi", ROOT / "csrc" / "build_ffi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.PKCS11_SOURCES)
