"""A fresh NSS softoken database as a second PKCS#11 token for the tests.

NSS softoken (libsoftokn3.so) refuses ``C_Initialize(NULL)`` with
CKR_ARGUMENTS_BAD: it needs ``CK_C_INITIALIZE_ARGS.pReserved`` set to
``init_string``.  The writable token of that database is ``token_label``
("NSS Certificate DB", slot "NSS User Private Key and Certificate Services");
the other slot ("NSS Generic Crypto Services") is read-only.

NSS encrypts every sensitive attribute with PBKDF2 at 10,000 iterations by
default (~45 ms per identity cycle); set ``FAST_ENV`` in the environment of
the processes that use the token to make that 1 (~2 ms; tests only).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

TOKEN_LABEL = "NSS Certificate DB"
FAST_ENV = {"NSS_MAX_MP_PBE_ITERATION_COUNT": "1"}
_MODULE_GLOBS = (
    "/usr/lib/*-linux-gnu*/libsoftokn3.so",  # Debian, Ubuntu (multiarch)
    "/usr/lib64/libsoftokn3.so",  # RHEL, Fedora, SUSE
    "/usr/lib/libsoftokn3.so",  # Arch, Alpine
    "/usr/lib*/nss/libsoftokn3.so",
)


@dataclass(frozen=True)
class NSSToken:
    """What a PKCS#11 caller needs to use the database as a token."""

    module: str  # path of libsoftokn3.so
    init_string: str  # for CK_C_INITIALIZE_ARGS.pReserved
    token_label: str
    pin: str
    directory: Path


def softokn_module() -> str | None:
    """The path of NSS softoken's PKCS#11 module, or None if not installed."""
    for pattern in _MODULE_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def init_string(directory: Path) -> str:
    """NSS's C_Initialize parameters for the sql: database in directory."""
    path = str(Path(directory).resolve())
    if "'" in path:
        raise ValueError(f"NSS parameters cannot quote a path with ': {path!r}")
    return f"configdir='sql:{path}' certPrefix='' keyPrefix='' secmod='secmod.db' flags="


def create_nss_token(directory: Path, pin: str) -> NSSToken:
    """Make a new NSS database in directory (created 0700, must not hold one).

    The PIN goes to certutil through a 0600 file, never through argv.
    """
    module, certutil = softokn_module(), shutil.which("certutil")
    if module is None or certutil is None:
        raise FileNotFoundError("NSS softoken needs Debian libnss3 and libnss3-tools (certutil)")
    directory = Path(directory).resolve()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (directory / "key4.db").exists():
        raise FileExistsError(f"{directory} already holds an NSS database")
    pin_file = directory / ".pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(pin + "\n")  # certutil reads the first line
        args = [certutil, "-N", "-d", f"sql:{directory}"]
        args += ["-f", str(pin_file)] if pin else ["--empty-password"]
        subprocess.run(
            args,
            env={**os.environ, **FAST_ENV},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
            timeout=60,
        )
    finally:
        pin_file.unlink()
    return NSSToken(module, init_string(directory), TOKEN_LABEL, pin, directory)
