"""Build and drive the p11shim test module (see p11shim.h).

    from build import build_shim, Shim       # or load this file by path
    so = build_shim(tmpdir)                  # compiles with the system cc
    os.environ["P11SHIM_TARGET"] = softhsm   # before the first C_Initialize
    ... load `so` as the PKCS#11 module (PyKCS11, python-pkcs11, the C layer)
    shim = Shim(so)                          # same process: same counters
    shim.reset(); op(); shim.trace() -> ["C_OpenSession", ...]

Needs a C compiler ($CC or cc) and the PKCS#11 header of Debian's
libp11-kit-dev (found through pkg-config p11-kit-1).
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "p11shim.c", HERE / "p11shim.h")
LIBNAME = "libp11shim.so"
CFLAGS = ["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread"]


def _p11kit_cflags() -> list[str]:
    pkg_config = shutil.which("pkg-config")
    if pkg_config is None:
        raise RuntimeError("pkg-config not found (apt-get install pkg-config libp11-kit-dev)")
    res = subprocess.run([pkg_config, "--cflags", "p11-kit-1"], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            "pkg-config p11-kit-1 failed (apt-get install libp11-kit-dev): " + res.stderr.strip()
        )
    return shlex.split(res.stdout)


def build_shim(outdir) -> Path:
    """Compile p11shim.c into outdir/libp11shim.so and return its path.

    Reuses an existing build newer than the sources; the result is renamed
    into place, so concurrent builders (xdist workers) never see half a file.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / LIBNAME
    newest = max(p.stat().st_mtime for p in SOURCES)
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    cc = shlex.split(os.environ.get("CC", "cc"))
    fd, tmp = tempfile.mkstemp(prefix=".p11shim-", suffix=".so", dir=outdir)
    os.close(fd)
    try:
        cmd = [
            *cc,
            *CFLAGS,
            *_p11kit_cflags(),
            "-I",
            str(HERE),
            "-o",
            tmp,
            str(HERE / "p11shim.c"),
            "-ldl",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building p11shim failed:\n{shlex.join(cmd)}\n{res.stderr}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class Shim:
    """ctypes view of the shim's control API, for the process that uses it.

    Loading the same path as the PKCS#11 user returns the same library
    instance (dlopen reference counting), hence the same counters.
    """

    def __init__(self, path):
        self.path = str(path)
        lib = self._lib = ctypes.CDLL(self.path)
        ul, sz, cp = ctypes.c_ulong, ctypes.c_size_t, ctypes.c_char_p
        for name, res, args in (
            ("p11shim_reset", None, []),
            ("p11shim_count", ul, [cp]),
            ("p11shim_total", ul, []),
            ("p11shim_fired", ul, []),
            ("p11shim_fail_at", None, [ul, ul]),
            ("p11shim_fail_function", ctypes.c_int, [cp, ul, ul]),
            ("p11shim_clear_faults", None, []),
            ("p11shim_dump", sz, [ctypes.c_void_p, sz]),
            ("p11shim_trace", sz, [ctypes.c_void_p, sz]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args

    def reset(self) -> None:
        self._lib.p11shim_reset()

    def count(self, fname: str) -> int:
        n = self._lib.p11shim_count(fname.encode())
        if n == ctypes.c_ulong(-1).value:
            raise KeyError(f"not a PKCS#11 function: {fname}")
        return n

    def total(self) -> int:
        return self._lib.p11shim_total()

    def fired(self) -> int:
        return self._lib.p11shim_fired()

    def fail_at(self, n: int, rv: int) -> None:
        self._lib.p11shim_fail_at(n, rv)

    def fail_function(self, fname: str, k: int, rv: int) -> None:
        if self._lib.p11shim_fail_function(fname.encode(), k, rv) != 0:
            raise KeyError(f"not a PKCS#11 function: {fname}")

    def clear_faults(self) -> None:
        self._lib.p11shim_clear_faults()

    def _text(self, fn) -> str:
        # The text may grow between the two calls (other threads): loop.
        size = fn(None, 0) + 1
        while True:
            buf = ctypes.create_string_buffer(size)
            need = fn(buf, size)
            if need < size:
                return buf.value.decode()
            size = need + 1

    def counts(self) -> dict[str, int]:
        """Every function called since the reset, with its count."""
        pairs = (line.split("=") for line in self._text(self._lib.p11shim_dump).splitlines())
        return {name: int(n) for name, n in pairs}

    def trace(self) -> list[str]:
        """The names of the counted calls since the reset, in order."""
        return self._text(self._lib.p11shim_trace).splitlines()
