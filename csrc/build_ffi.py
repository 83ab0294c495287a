"""cffi builder (out-of-line API mode) for keychain_ext._native.

The cdef is csrc/keychain.h itself, minus its preprocessor guard lines; the
backend is chosen by platform: Security.framework on macOS, a PKCS#11 token
(dlopen'ed at run time, never linked) with OpenSSL elsewhere.

OpenSSL is the system's libcrypto unless KEYCHAIN_EXT_OPENSSL names the
prefix of an OpenSSL built by scripts/build-openssl (static, legacy provider
built in): then libcrypto.a goes into the extension, its symbols hidden
(what the wheels ship).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent
ROOT = CSRC.parent
# Only PyInit__native is exported: the support units' symbols stay inside.
STRICT = ["-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]


def _version() -> str:
    text = (ROOT / "keychain_ext" / "_version.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    assert match, "keychain_ext/_version.py has no __version__"
    return match.group(1)


def _cdef(header: Path = CSRC / "keychain.h") -> str:
    """A header's declarations, minus its guard and #include lines."""
    lines = header.read_text().splitlines()
    keep = [
        line
        for line in lines
        if not re.match(r"\s*#\s*(ifndef|endif|include|define\s+\w+_H\b)", line)
    ]
    return "\n".join(keep)


def _pkg_config_cflags(package: str) -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", "--cflags", package], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["-I/usr/include/p11-kit-1"]
    return shlex.split(out)


def _openssl() -> tuple[list[str], dict[str, list[str]]]:
    """How the PKCS#11 backend gets libcrypto, as (compile args, link
    keywords): the system's, or the static one under $KEYCHAIN_EXT_OPENSSL
    (its headers first; --exclude-libs keeps every OpenSSL symbol out of the
    extension's exports)."""
    prefix = os.environ.get("KEYCHAIN_EXT_OPENSSL")
    if not prefix:
        return [], {"libraries": ["crypto", "dl", "pthread"]}
    static = Path(prefix).resolve() / "lib" / "libcrypto.a"
    if not static.is_file():
        raise SystemExit(f"KEYCHAIN_EXT_OPENSSL: no {static} (build it with scripts/build-openssl)")
    return [f"-I{static.parent.parent / 'include'}"], {
        "extra_objects": [str(static)],
        "extra_link_args": ["-Wl,--exclude-libs,ALL"],
        "libraries": ["dl", "pthread"],
    }


ffibuilder = FFI()
ffibuilder.cdef(_cdef())

# The PKCS#11 backend: the flow file, then its support units (p11.h).
# Harnesses that compile the backend themselves (fuzzing, memcheck, the
# benchmark's C driver) take this list too.
PKCS11_SOURCES = [CSRC / "keychain_pkcs11.c", *sorted(CSRC.glob("p11_*.c"))]
# The Darwin backend: the flow file, then its support units (darwin.h).
DARWIN_SOURCES = [CSRC / "keychain_darwin.c", *sorted(CSRC.glob("darwin_*.c")), CSRC / "p12_walk.c"]

# Tests only (make test-darwin-double): KEYCHAIN_EXT_DARWIN_DOUBLE names the
# Security.framework TEST DOUBLE's directory (tests/darwin_double); the
# Darwin backend is then built over it on any platform, and the double's
# control calls (double_control.h) join the cdef so tests can drive it.
DOUBLE = os.environ.get("KEYCHAIN_EXT_DARWIN_DOUBLE")
_header = '#include "keychain.h"'

if DOUBLE:
    _double = Path(DOUBLE).resolve()
    ffibuilder.cdef("typedef unsigned char Boolean; typedef int32_t OSStatus;")
    ffibuilder.cdef(_cdef(_double / "double_control.h"))
    _header += '\n#include "double_control.h"'
    _sources = [*DARWIN_SOURCES, _double / "double.c"]
    _kwargs: dict[str, list[str]] = {
        "extra_compile_args": [*STRICT, "-D_GNU_SOURCE"],
        "include_dirs": [str(CSRC), str(_double / "include"), str(_double)],
        "libraries": ["crypto"],  # the double's CC_SHA256
    }
elif sys.platform == "darwin":
    _sources = DARWIN_SOURCES
    _kwargs = {
        "extra_compile_args": STRICT,
        "extra_link_args": ["-framework", "Security", "-framework", "CoreFoundation"],
    }
else:
    _sources = PKCS11_SOURCES
    _openssl_cflags, _openssl_link = _openssl()
    _kwargs = {
        "extra_compile_args": STRICT + _pkg_config_cflags("p11-kit-1") + _openssl_cflags,
        **_openssl_link,
    }

_kwargs.setdefault("include_dirs", [str(CSRC.relative_to(ROOT))])
ffibuilder.set_source(
    "keychain_ext._native",
    _header,
    sources=[str(s if DOUBLE else s.relative_to(ROOT)) for s in _sources],
    define_macros=[("KC_VERSION", f'"{_version()}"')],
    **_kwargs,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
