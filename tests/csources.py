"""The C sources of the PKCS#11 backend, as csrc/build_ffi.py compiles them,
and the clang that builds them, for the harnesses that build the backend
themselves (fuzzing, memcheck, the Darwin logic)."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def pkcs11_sources() -> list[Path]:
    spec = importlib.util.spec_from_file_location("build_ffi", ROOT / "csrc" / "build_ffi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.PKCS11_SOURCES)


# Debian's unversioned names; each release's clang and runtime come with them
CLANG_INSTALL = "apt-get install clang libclang-rt-dev"


def find_clang() -> Optional[str]:
    """$CLANG, else ``clang``, else the newest ``clang-N`` on PATH; None if
    there is none.  No release's version is assumed."""
    for name in filter(None, (os.environ.get("CLANG"), "clang")):
        found = shutil.which(name)
        if found:
            return found
    versioned = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        for path in glob.glob(os.path.join(directory, "clang-[0-9]*")):
            match = re.fullmatch(r"clang-(\d+)", os.path.basename(path))
            if match and os.access(path, os.X_OK):
                versioned.append((int(match.group(1)), path))
    return max(versioned)[1] if versioned else None
