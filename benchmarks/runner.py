"""The benchmark machinery: implementations, one shared token, interleaved
measurements.

Every implementation runs in this one process against the same SoftHSM2
token (one SoftHSM2 instance per process: SOFTHSM2_CONF is read once, by the
first C_Initialize).  The C extension opens the token first, so the module is
initialized with CKF_OS_LOCKING_OK (NULL init args, which python-pkcs11 and
PyKCS11 would pass, make SoftHSM2 switch its mutexes off for the whole
process); nobody ever calls C_Finalize.

Measurements are interleaved: each repetition runs one batch per
implementation, in turn, so machine drift hits all alike; a row's figure is
the median of all its samples, kept with their spread (min, quartiles,
max).  Every row is measured directly, none derived from other rows.

The raw-C column is benchmarks/kc_bench.c: the C layer's own kc_*
functions, compiled from the sources and with the flags csrc/build_ffi.py
gives the extension, called in a loop from C.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LIMIT, NATIVE, CTYPES = "raw C", "C extension", "ctypes port"
PKCS11, PYKCS11 = "python-pkcs11", "PyKCS11"
# The corpus rows' extra columns: the key derivations alone (kdf_floor.c) on
# the OpenSSL the C extension links, and the wheel (the extension linking a
# static OpenSSL, scripts/build-openssl) with its own floor.
FLOOR, WHEEL, WHEEL_FLOOR = "KDF floor", "wheel", "KDF floor, wheel"
IMPLS = (LIMIT, NATIVE, CTYPES, PKCS11, PYKCS11, FLOOR, WHEEL, WHEEL_FLOOR)
PORTS = (CTYPES, PKCS11, PYKCS11)
EPHEMERAL = 1
# The memory row of SoftHSM2's own growth (bare PKCS#11 calls, no keychain_ext)
SOFTHSM2_ALONE = "SoftHSM2 alone"

# PBKDF2 iterations per encrypted bag of the corpus files: OpenSSL's export
# default, Java keytool, cryptography's BestAvailableEncryption, NSS pk12util.
CORPUS = (2048, 10000, 20000, 600000)
# Their MAC (PKCS#12 KDF, SHA-256): cryptography's builder fixes it at 2,048.
CORPUS_MAC_ITERATIONS = 2048

# The fewest PKCS#11 calls each operation needs with the semantics of
# keychain.h and what the C layer must do (counted through tests/p11shim
# with the C extension).  A search is C_FindObjectsInit + one C_FindObjects
# + C_FindObjectsFinal: PKCS#11 2.x has no one-call search.  Every operation
# starts with one C_GetSessionInfo (begin() -> ensure_login(): another user
# of the module in the process -- libp11 under libcurl's engine -- may have
# logged out or closed the session).  Leases are files in the token's state
# directory: no PKCS#11 call.
MINIMUM_CALLS = {
    "preauth": 9,  # C_GetSessionInfo + 2 searches (label, any class and scope;
    # private key by CKA_ID) + 2 C_CreateObject (cert, key)
    "kill": 8,  # ephemeral: C_GetSessionInfo + 1 search (session objects of
    # any class under the label) + 1 C_GetAttributeValue (CKA_CLASS)
    # per object found (2) + 2 C_DestroyObject (cert first, then key)
    "cycle": 17,  # ephemeral preauth + kill
    "cycle_token": 21,  # token objects: preauth 12 (+1 search for unlabelled objects, so
    # that a failed create's leftovers can be told from others') +
    # kill 9 (C_GetSessionInfo + cert by class+label+CKA_ID, destroy
    # + key likewise, as Crypto.cpp removes them; the lease file
    # says the key id)
    "lookup_hit": 6,  # C_GetSessionInfo + 1 search + 1 C_GetAttributeValue per object
    "lookup_miss": 4,  # C_GetSessionInfo + 1 search
    "kill_foreign": 9,  # token identity another handle of this process imported: the
    # lease names this process, so the same as the kill above
}

# Call counts and rows where the ports follow their own path, not the C
# layer's: token identities.  The C layer keeps their leases as files in the
# token's state directory; the ports know nothing of those and still put a
# CKO_DATA lease object on the token (what the C layer did before).  Their
# figures are reported, never compared with the C layer's.
PORTS_OWN_PATH_CALLS = ("cycle_token",)


@dataclass
class Config:
    """How much to measure.  ``quick()`` is the < 60 s variant."""

    reps: int = 25  # interleaved repetitions
    batch: int = 20  # ephemeral cycles per implementation per repetition
    p12_batch: int = 4  # the same from p12 bytes (cryptography's RSA parse: ~70 ms)
    token_reps: int = 6  # repetitions of the token-object rows
    token_batch: int = 4
    lookup_reps: int = 15
    lookup_batch: int = 20
    fillers: tuple = (0, 100, 1000, 10000)
    thread_seconds: float = 2.0
    processes: tuple = (1, 8)
    process_seconds: float = 3.0
    memory_cycles: int = 20000
    key_types: tuple = ("rsa", "ec")
    corpus: tuple = CORPUS
    corpus_reps: int = 4
    rows: Optional[set] = None  # None = everything

    @classmethod
    def quick(cls) -> Config:
        return cls(
            reps=5,
            batch=8,
            p12_batch=1,
            token_reps=2,
            token_batch=1,
            lookup_reps=3,
            lookup_batch=6,
            fillers=(0, 100, 1000),
            thread_seconds=0.4,
            process_seconds=0.5,
            memory_cycles=1000,
            corpus=(2048, 20000),
            corpus_reps=1,
        )

    def wants(self, kind: str) -> bool:
        return self.rows is None or kind in self.rows


# ------------------------------------------------------------------ setup


def prepare_environment(root: Path) -> None:
    """A throwaway SoftHSM2 configuration under root; must run before
    anything loads SoftHSM2 in this process."""
    (root / "tokens").mkdir(parents=True)
    (root / "home").mkdir(mode=0o700)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ["KEYCHAIN_EXT_HOME"] = str(root / "home")
    for var in ("KEYCHAIN_EXT_MODULE", "KEYCHAIN_EXT_TOKEN", "KEYCHAIN_EXT_PIN_FILE"):
        os.environ.pop(var, None)


def new_token(label: str = "bench") -> tuple[str, str, str]:
    """Initialize a fresh token (PINs never in argv); (module, label, pin)."""
    from keychain_ext._native_backend import NativeBackend
    from keychain_ext._store import softhsm2_module

    pin = secrets.token_hex(8)
    NativeBackend().init_token(softhsm2_module(), label, secrets.token_hex(8), pin)
    return softhsm2_module(), label, pin


@dataclass(frozen=True)
class P12:
    path: Path
    data: bytes
    password: str


def make_identities(workdir: Path, count: int = 2, corpus: tuple = ()) -> dict:
    """Client identities as PKCS#12: {(key_type, "enc"|"clear", n): P12}.

    "enc" is what `openssl pkcs12 -export` writes by default (OpenSSL 3:
    AES-256-CBC, PBKDF2-SHA256 2048 iterations, SHA-256 MAC); "clear" has no
    encryption and no MAC, so parsing it is DER decoding only.  n: distinct
    keys (two threads cannot import the same key: the store refuses a
    duplicate CKA_ID).  For each iteration count in corpus, key 0 also as
    (key_type, "pbkdf2-N", 0): the same encryption with N PBKDF2 iterations
    per bag (the MAC stays at CORPUS_MAC_ITERATIONS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    from tests.pki import make_client, make_pki

    pki = make_pki(workdir / "pki")
    password = secrets.token_hex(8)
    out = {}
    for key_type in ("rsa", "ec"):
        for n in range(count):
            client = make_client(
                pki,
                cn=f"bench-{key_type}-{n}",
                password=password,
                key_type=key_type,
                name=f"bench-{key_type}-{n}",
            )
            key = serialization.load_pem_private_key(client.key.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(client.cert.read_bytes())

            def encryption(rounds: int) -> Any:
                return (
                    serialization.PrivateFormat.PKCS12.encryption_builder()
                    .kdf_rounds(rounds)
                    .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
                    .hmac_hash(hashes.SHA256())
                    .build(password.encode())
                )

            kinds = [("enc", encryption(2048)), ("clear", serialization.NoEncryption())]
            if n == 0:
                kinds += [(f"pbkdf2-{rounds}", encryption(rounds)) for rounds in corpus]
            for kind, alg in kinds:
                data = pkcs12.serialize_key_and_certificates(
                    client.cn.encode(), key, cert, None, alg
                )
                path = workdir / f"bench-{key_type}-{n}-{kind}.p12"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                out[(key_type, kind, n)] = P12(path, data, "" if kind == "clear" else password)
    return out


def _p11kit_cflags() -> list[str]:
    res = subprocess.run(
        ["pkg-config", "--cflags", "p11-kit-1"], capture_output=True, text=True, check=True
    )
    return shlex.split(res.stdout)


def _load_build_ffi(openssl: Optional[str] = None) -> Any:
    """csrc/build_ffi.py, loaded by path (it only declares the cffi build);
    openssl: the KEYCHAIN_EXT_OPENSSL prefix to load it with (None: the
    environment's, as the in-place extension was built)."""
    path = ROOT / "csrc" / "build_ffi.py"
    spec = importlib.util.spec_from_file_location("_kc_build_ffi", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    saved = os.environ.get("KEYCHAIN_EXT_OPENSSL")
    if openssl is not None:
        os.environ["KEYCHAIN_EXT_OPENSSL"] = openssl
    try:
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    finally:
        if saved is None:
            os.environ.pop("KEYCHAIN_EXT_OPENSSL", None)
        else:
            os.environ["KEYCHAIN_EXT_OPENSSL"] = saved
    return mod


def _csrc_path(entry: Any) -> Path:
    path = Path(entry)
    if path.is_absolute():
        return path
    return ROOT / path if (ROOT / path).exists() else ROOT / "csrc" / path


def c_layer_build(openssl: Optional[str] = None) -> dict:
    """How the extension's PKCS#11 C layer is compiled, as csrc/build_ffi.py
    says: {"sources": [Path], "cflags": [str], "libs": [str]}.

    Sources: build_ffi.PKCS11_SOURCES.  Flags: the interpreter's CFLAGS and CCSHARED (what
    setuptools compiles the extension with), then the include dirs, macros,
    extra compile args and libraries build_ffi hands to cffi's set_source
    (falling back to the documented ones if cffi's record is missing)."""
    import sysconfig

    mod = _load_build_ffi(openssl)
    csrc = ROOT / "csrc"
    sources = [_csrc_path(s) for s in mod.PKCS11_SOURCES]
    assigned = getattr(getattr(mod, "ffibuilder", None), "_assigned_source", None)
    kw: dict = dict(assigned[3]) if assigned and len(assigned) > 3 else {}
    version = kw.get("define_macros") or [("KC_VERSION", f'"{mod._version()}"')]
    extra = kw.get("extra_compile_args") or [*mod.STRICT, *_p11kit_cflags()]
    libraries = kw.get("libraries") or ["crypto", "dl", "pthread"]
    cflags = [
        *shlex.split(sysconfig.get_config_var("CFLAGS") or "-O2"),
        *shlex.split(sysconfig.get_config_var("CCSHARED") or "-fPIC"),
        *(f"-I{_csrc_path(d)}" for d in kw.get("include_dirs") or [csrc]),
        *(f"-D{k}" if v is None else f"-D{k}={v}" for k, v in version),
        *extra,
    ]
    missing = [str(s) for s in sources if not s.is_file()]
    if not sources or missing:
        raise RuntimeError(f"C layer sources missing: {missing or 'none listed'}")
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return {
        "cc": shlex.split(cc),
        "sources": sources,
        "cflags": cflags,
        "libs": [
            *(kw.get("extra_objects") or []),  # a static libcrypto (KEYCHAIN_EXT_OPENSSL)
            *(kw.get("extra_link_args") or []),
            *(f"-l{x}" for x in libraries),
        ],
    }


def build_driver(outdir: Path) -> tuple[Path, Path]:
    """Compile benchmarks/kc_bench.c with the C layer's own sources and
    flags (c_layer_build), twice: the program and the in-process library.
    Returns (program, library)."""
    build = c_layer_build()
    cc = build["cc"]
    objdir = outdir / "kc_bench_obj"
    objdir.mkdir(exist_ok=True)

    def run(cmd: list) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(
                f"building the raw-C driver failed:\n{shlex.join(cmd)}\n{res.stderr}"
            )

    objs = []
    for i, src in enumerate(build["sources"]):
        obj = objdir / f"{i:02d}-{src.stem}.o"
        run([*cc, *build["cflags"], "-c", str(src), "-o", str(obj)])
        objs.append(str(obj))
    driver = HERE / "kc_bench.c"
    prog, lib = outdir / "kc_bench", outdir / "libkc_bench.so"
    run([*cc, *build["cflags"], str(driver), *objs, "-o", str(prog), *build["libs"]])
    run(
        [
            *cc,
            *build["cflags"],
            "-shared",
            "-DKC_BENCH_LIBRARY",
            str(driver),
            *objs,
            "-o",
            str(lib),
            *build["libs"],
        ]
    )
    return prog, lib


def check_extension_links(build: dict) -> None:
    """The in-place extension must link the libcrypto c_layer_build says
    (raw C and the KDF floor are built from it): KEYCHAIN_EXT_OPENSSL
    now as when the extension was built."""
    from keychain_ext import _native

    res = subprocess.run(["ldd", _native.__file__], capture_output=True, text=True)
    if res.returncode != 0:
        return  # no ldd: nothing to compare
    dynamic = "libcrypto" in res.stdout
    if dynamic != ("-lcrypto" in build["libs"]):
        raise RuntimeError(
            f"keychain_ext._native {'links the system libcrypto' if dynamic else 'is static'}, "
            "but KEYCHAIN_EXT_OPENSSL says otherwise: set it as when the extension was built"
        )


def build_floor(outdir: Path, openssl: Optional[str] = None) -> Path:
    """benchmarks/kdf_floor.c, linked with the libcrypto the extension gets
    (openssl: a KEYCHAIN_EXT_OPENSSL prefix instead of the environment's)."""
    build = c_layer_build(openssl)
    prog = outdir / ("kdf_floor_static" if openssl else "kdf_floor")
    cmd = [*build["cc"], *build["cflags"], str(HERE / "kdf_floor.c"), "-o", str(prog)]
    res = subprocess.run([*cmd, *build["libs"]], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building kdf_floor failed:\n{shlex.join(cmd)}\n{res.stderr}")
    return prog


def run_floor(prog: Path, iterations: int, samples: int) -> dict:
    """The key derivations of one corpus file (CORPUS_MAC_ITERATIONS for
    the MAC), alone: {"openssl": version, "samples_ms": [...]}."""
    spec = f"pbkdf2={iterations}\nbags=2\nmac={CORPUS_MAC_ITERATIONS}\niterations={samples}\n"
    res = subprocess.run([str(prog)], input=spec, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"kdf_floor: {res.stdout}{res.stderr}")
    return json.loads(res.stdout)


def load_shim_tools() -> Any:
    """tests/p11shim/build.py (build_shim, Shim), loaded by path."""
    path = ROOT / "tests" / "p11shim" / "build.py"
    spec = importlib.util.spec_from_file_location("_p11shim_build", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


# -------------------------------------------------------- implementations


class Impl:
    """One implementation under test."""

    name = ""
    available = True
    reason = ""
    parser = ""  # who parses the p12: "OpenSSL" or "cryptography"

    def open(self, module: str, token: str, pin: str, pin_file: Path) -> Any:
        raise NotImplementedError

    def preauth(self, h: Any, p12: P12, label: str, eph: bool) -> None:
        raise NotImplementedError

    def kill(self, h: Any, label: str) -> None:
        raise NotImplementedError

    def lookup(self, h: Any, label: str) -> Any:
        raise NotImplementedError

    def close(self, h: Any) -> None:
        h.close()

    def list_items(self, h: Any) -> Any:
        """Everything the store holds (kc_list_items' counterpart); raises
        NotImplementedError where the implementation cannot list."""
        fn = getattr(h, "list_items", None) or getattr(h, "items", None)
        if fn is None:
            raise NotImplementedError
        return fn()

    # pre-parsed key material (ports only)
    parse: Optional[Callable] = None

    def preauth_material(self, h: Any, material: Any, label: str, eph: bool) -> None:
        raise NotImplementedError


class KeychainImpl(Impl):
    """keychain_ext's public API, Keychain.  Opened with the token's PIN
    file (as the embedded store is) and without the cross-process flock, so
    it makes the same PKCS#11 calls as the others and nothing else."""

    parser = "OpenSSL"

    def __init__(self, name: str) -> None:
        self.name = name

    def open(self, module: str, token: str, pin: str, pin_file: Path) -> Any:
        from keychain_ext import Keychain

        return Keychain(module, token, pin_file=pin_file)

    def preauth(self, h: Any, p12: P12, label: str, eph: bool) -> None:
        h.preauth_key(p12.data, p12.password, label, ephemeral=eph)

    def kill(self, h: Any, label: str) -> None:
        h.kill_key(label)

    def lookup(self, h: Any, label: str) -> Any:
        return h.lookup(label)


class PortImpl(Impl):
    parser = "cryptography"

    def __init__(self, name: str, modname: str) -> None:
        self.name = name
        try:
            self.mod = importlib.import_module(f"benchmarks.ports.{modname}")
            from benchmarks.ports._material import parse_p12

            self.parse = staticmethod(parse_p12)  # type: ignore[assignment]
        except ImportError as exc:
            self.available, self.reason = False, f"not available ({exc})"

    def open(self, module: str, token: str, pin: str, pin_file: Path) -> Any:
        return self.mod.open_store(module, token, pin)

    def preauth(self, h: Any, p12: P12, label: str, eph: bool) -> None:
        h.preauth_key(p12.data, p12.password.encode(), label.encode(), EPHEMERAL if eph else 0)

    def preauth_material(self, h: Any, material: Any, label: str, eph: bool) -> None:
        h.preauth_material(material, label.encode(), EPHEMERAL if eph else 0)

    def kill(self, h: Any, label: str) -> None:
        h.kill_key(label.encode())

    def lookup(self, h: Any, label: str) -> Any:
        return h.lookup(label.encode())


class CtypesImpl(PortImpl):
    """The ctypes port (ports/ctypes_port.py): the façade's Store protocol
    in pure Python, called as the façade calls the C extension's store.  It
    parses the p12 itself (cryptography + its own DER code): no pre-parsed
    material rows."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "ctypes_port")
        self.parse = None


class Driver:
    """The raw-C column: benchmarks/kc_bench.c, which calls the C layer's
    own kc_* functions (compiled from the same sources with the same flags
    as the extension) in a timed loop.  In this process through ctypes
    (libkc_bench.so; ctypes releases the GIL for the call), or as its own
    process for the threads experiment."""

    name = LIMIT

    def __init__(self, lib_path: Path, prog_path: Path) -> None:
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.kc_bench_run.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        self.lib.kc_bench_run.restype = ctypes.c_int
        self.prog = prog_path
        self.buf = ctypes.create_string_buffer(1 << 22)

    @staticmethod
    def spec(module: str, token: str, pin: str, p12: Optional[P12] = None, **kw: Any) -> str:
        """The settings text (PIN and password included: it goes to the
        library call or the program's stdin, never to argv)."""
        lines: dict[str, Any] = {"module": module, "token": token, "pin": pin}
        from keychain_ext import _store

        lines["state_dir"] = _store.state_dir(token)  # the lock and leases Keychain uses
        if p12 is not None:
            lines |= {"p12": str(p12.path), "password": p12.password}
        lines |= kw
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    def run(self, spec: str) -> dict:
        rc = self.lib.kc_bench_run(spec.encode(), self.buf, len(self.buf))
        out = json.loads(self.buf.value.decode())
        if rc != 0:
            raise RuntimeError(f"kc_bench: {out.get('error')}")
        return out

    def run_program(self, spec: str) -> dict:
        """The standalone program (no Python in its process); settings
        through stdin, never argv."""
        res = subprocess.run(
            [str(self.prog)], input=spec, capture_output=True, text=True, timeout=600
        )
        out = json.loads(res.stdout)
        if res.returncode != 0:
            raise RuntimeError(f"kc_bench: {out.get('error')}")
        return out


# ------------------------------------------------------------ measurement


def _ms(ns: int) -> float:
    return ns / 1e6


def _med(samples: list) -> Optional[float]:
    return statistics.median(samples) if samples else None


def spread(samples: list) -> Optional[dict]:
    """min, quartiles and max of a row's samples (None without samples)."""
    if not samples:
        return None
    xs = sorted(samples)
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return {"min": xs[0], "q1": q1, "median": q2, "q3": q3, "max": xs[-1]}


def cycle_batch(impl: Impl, h: Any, p12: P12, label: str, eph: bool, n: int, out: list) -> None:
    """n timed preauth + kill cycles of impl on handle h; samples (ms) to out."""
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        impl.preauth(h, p12, label, eph)
        impl.kill(h, label)
        out.append(_ms(clock() - t0))


def _reply(obj: Any) -> None:
    """A child's answer to the runner: one JSON line on stdout."""
    print(json.dumps(obj), flush=True)


def wheel_child() -> None:
    """The wheel column, in the process the runner starts with the unpacked
    wheel first on sys.path.  stdin: the settings (one JSON line), then one
    request a line, {"path", "password", "n"}: n ephemeral cycles of that
    file -> one line of samples (ms); the runner asks in turn with its own
    implementations, so the wheel is interleaved with them."""
    import keychain_ext

    spec = json.loads(sys.stdin.readline())
    site = Path(spec["site"]).resolve()
    if Path(keychain_ext.__file__).resolve().parent.parent != site:
        raise RuntimeError(f"keychain_ext came from {keychain_ext.__file__}, not the wheel")
    impl = KeychainImpl(WHEEL)
    h = impl.open(spec["module"], spec["token"], "", Path(spec["pin_file"]))
    gc.disable()
    _reply("ready")
    for line in sys.stdin:
        req = json.loads(line)
        p12 = P12(Path(req["path"]), Path(req["path"]).read_bytes(), req["password"])
        out: list = []
        cycle_batch(impl, h, p12, "bench-wheel", True, req["n"], out)
        _reply(out)
    impl.close(h)


def process_child() -> None:
    """One of the processes of the processes row: the C extension (the
    in-place build) cycling one ephemeral identity.  stdin: the settings
    (one JSON line); it answers "ready" once warm, waits for a line, cycles
    for `seconds` and answers {cycles, start, end} (wall clock)."""
    spec = json.loads(sys.stdin.readline())
    impl = KeychainImpl(NATIVE)
    h = impl.open(spec["module"], spec["token"], "", Path(spec["pin_file"]))
    p12 = P12(Path(spec["p12"]), Path(spec["p12"]).read_bytes(), spec["password"])
    impl.preauth(h, p12, "bench-proc", True)  # warm up, untimed
    impl.kill(h, "bench-proc")
    _reply("ready")
    sys.stdin.readline()  # every process is ready: go
    cycles, start = 0, time.time()
    while time.time() - start < spec["seconds"]:
        impl.preauth(h, p12, "bench-proc", True)
        impl.kill(h, "bench-proc")
        cycles += 1
    _reply({"cycles": cycles, "start": start, "end": time.time()})
    impl.close(h)


class Child:
    """A child process of the runner (python -m benchmarks --<kind>-child):
    settings as the first stdin line (secrets through stdin, never argv),
    then one JSON line asked, one answered."""

    def __init__(self, kind: str, spec: dict, cwd: Path, env: Optional[dict] = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks", f"--{kind}-child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )
        self.send(spec)

    def send(self, obj: Any) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> Any:
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=60)
            raise RuntimeError(f"benchmark child failed:\n{self.proc.stderr.read()}")  # type: ignore[union-attr]
        return json.loads(line)

    def ask(self, obj: Any) -> Any:
        self.send(obj)
        return self.answer()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        if self.proc.wait(timeout=60) != 0:
            raise RuntimeError(f"benchmark child failed:\n{self.proc.stderr.read()}")  # type: ignore[union-attr]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Bench:
    module: str
    token: str
    pin: str
    workdir: Path
    config: Config
    log: Callable[[str], None] = print
    impls: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    def setup(self) -> None:
        self.pin_file = self.workdir / "pin"
        fd = os.open(self.pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.pin)
        self.ids = make_identities(
            self.workdir, count=2, corpus=self.config.corpus if self.config.wants("corpus") else ()
        )
        check_extension_links(c_layer_build())
        prog, lib = build_driver(self.workdir)
        self.limit = Driver(lib, prog)
        impls: list[Impl] = [
            KeychainImpl(NATIVE),  # first: initializes the module
            CtypesImpl(CTYPES),
            PortImpl(PKCS11, "pkcs11_port"),
            PortImpl(PYKCS11, "pykcs11_port"),
        ]
        self.handles: dict[str, Any] = {}
        for impl in impls:
            self.impls[impl.name] = impl
            if impl.available:
                try:
                    self.handles[impl.name] = impl.open(
                        self.module, self.token, self.pin, self.pin_file
                    )
                except Exception as exc:
                    impl.available, impl.reason = False, f"not available ({exc})"
        self.results = {
            "impls": {name: (None if i.available else i.reason) for name, i in self.impls.items()},
            "rows": {},
            "calls": {},
            "threads": {},
            "memory": {},
            "parse": {},
        }
        self.results["impls"][LIMIT] = None

    def live(self) -> list:
        return [i for i in self.impls.values() if i.available]

    def close(self) -> None:
        import contextlib

        for name, h in self.handles.items():
            with contextlib.suppress(Exception):
                self.impls[name].close(h)

    def _row(
        self,
        key: str,
        label: str,
        group: str,
        samples: dict,
        note: str = "",
        ports_compared: bool = True,
    ) -> None:
        """A measured row; ports_compared=False: the ports' figures are
        reported but not compared with the C layer's (their own path)."""
        self.results["rows"][key] = {
            "label": label,
            "group": group,
            "note": note,
            "ports_compared": ports_compared,
            "ms": {name: _med(s) for name, s in samples.items()},
            "n": {name: len(s) for name, s in samples.items()},
            "spread": {name: spread(s) for name, s in samples.items()},
        }

    # -- cycles -------------------------------------------------------------

    def _cycle_batch(self, impl: Impl, p12: P12, label: str, eph: bool, n: int, out: list) -> None:
        cycle_batch(impl, self.handles[impl.name], p12, label, eph, n, out)

    def _material_batch(self, impl: Impl, material: Any, label: str, n: int, out: list) -> None:
        h = self.handles[impl.name]
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            impl.preauth_material(h, material, label, True)
            impl.kill(h, label)
            out.append(_ms(clock() - t0))

    def _limit_cycles(self, p12: P12, n: int, token: bool) -> list:
        """n cycles of kc_preauth_key + kc_kill_key from p12 bytes by the
        raw-C driver; the sample of each cycle (ms)."""
        r = self.limit.run(
            Driver.spec(
                self.module,
                self.token,
                self.pin,
                p12,
                mode="cycle",
                label="bench-limit",
                iterations=n,
                ephemeral=int(not token),
            )
        )
        return r["samples_ms"]

    def measure_cycles(self) -> None:
        cfg = self.config
        gc_was = gc.isenabled()
        for key_type in cfg.key_types:
            enc, clear = self.ids[(key_type, "enc", 0)], self.ids[(key_type, "clear", 0)]
            kt = "RSA-2048" if key_type == "rsa" else "EC P-256"
            # 1. ephemeral cycle from encrypted p12 bytes, 2. from cleartext p12
            # (every implementation, raw C included: the same kc_* calls);
            # 3. from pre-parsed material and 4. the parse alone, measured
            # where an implementation has such an entry point (the ports).
            # keychain.h takes p12 bytes only, so the C extension and raw C
            # have no row 3 and 4: no figure is derived from other rows.
            full = {i.name: [] for i in self.live()} | {LIMIT: []}
            clr = {i.name: [] for i in self.live()} | {LIMIT: []}
            pre = {i.name: [] for i in self.live() if i.parse}
            parse_enc: list = []
            parse_clear: list = []
            materials = {}
            if pre:
                from benchmarks.ports._material import parse_p12

                materials[key_type] = parse_p12(enc.data, enc.password.encode())
            self.log(f"  cycles, ephemeral, {kt}")
            gc.disable()
            try:
                for _ in range(cfg.reps):
                    for impl in self.live():
                        slow = impl.parser != "OpenSSL" and key_type != "ec"
                        n = cfg.p12_batch if slow else cfg.batch
                        self._cycle_batch(impl, enc, "bench-cycle", True, n, full[impl.name])
                        self._cycle_batch(impl, clear, "bench-cycle", True, n, clr[impl.name])
                        if impl.parse:
                            self._material_batch(
                                impl, materials[key_type], "bench-cycle", cfg.batch, pre[impl.name]
                            )
                    full[LIMIT] += self._limit_cycles(enc, cfg.batch, False)
                    clr[LIMIT] += self._limit_cycles(clear, cfg.batch, False)
                    if pre:
                        for p12, bucket in ((enc, parse_enc), (clear, parse_clear)):
                            for _ in range(cfg.p12_batch):
                                t0 = time.perf_counter_ns()
                                parse_p12(p12.data, p12.password.encode())
                                bucket.append(_ms(time.perf_counter_ns() - t0))
            finally:
                if gc_was:
                    gc.enable()
            self._row(
                f"cycle_eph_{key_type}", f"cycle, ephemeral, {kt}", "cycle (p12 bytes → kill)", full
            )
            self._row(
                f"cycle_clear_{key_type}",
                f"cycle from cleartext p12, ephemeral, {kt}",
                "cycle (p12 bytes → kill)",
                clr,
                note="p12 without encryption or MAC: parsing is DER decoding only",
            )
            if not pre:
                continue
            self._row(
                f"create_destroy_{key_type}",
                f"create+destroy excl. parse, ephemeral, {kt}",
                "excl. p12 parsing",
                pre,
                note="from pre-parsed key material; keychain.h (C extension, raw C) "
                "takes p12 bytes only: compare the cleartext-p12 cycle instead",
            )
            self.results["parse"][key_type] = {
                "enc": {"cryptography": spread(parse_enc)},
                "clear": {"cryptography": spread(parse_clear)},
            }
            self._row(
                f"parse_{key_type}",
                f"p12 parse alone (cryptography), {kt}",
                "excl. p12 parsing",
                {name: parse_enc for name in pre},
                note="the ports' parse (cryptography), encrypted p12; keychain.h has no "
                "parse-only entry point",
            )

    # -- the corpus: realistic iteration counts, the floor, the wheel ---------

    def _wheel(self) -> tuple:
        """The wheel column's child process, or (None, reason).
        $KEYCHAIN_EXT_BENCH_WHEEL is a wheel file (built with
        KEYCHAIN_EXT_OPENSSL: a static OpenSSL); unpacked here and run in a
        child process (a second _native cannot load into this one) that
        the corpus loop asks in turn with the other implementations."""
        wheel = os.environ.get("KEYCHAIN_EXT_BENCH_WHEEL")
        if not wheel:
            return None, "not available (KEYCHAIN_EXT_BENCH_WHEEL names no wheel file)"
        site = self.workdir / "wheel"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
        spec = {
            "site": str(site),
            "module": self.module,
            "token": self.token,
            "pin_file": str(self.pin_file),
        }
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
        child = Child("wheel", spec, cwd=site, env=env)
        if child.answer() != "ready":
            raise RuntimeError("wheel child: no ready")
        return child, None

    def measure_corpus(self) -> None:
        """The ephemeral cycle of each corpus file (CORPUS iterations, both
        key types) by every implementation, the key derivations alone
        (KDF floor) on the extension's OpenSSL, and, when given, the wheel
        and the floor of its static OpenSSL."""
        cfg = self.config
        floors = {FLOOR: build_floor(self.workdir)}
        self.results["impls"][FLOOR] = None
        prefix = os.environ.get("KEYCHAIN_EXT_BENCH_OPENSSL")
        if prefix:
            floors[WHEEL_FLOOR] = build_floor(self.workdir, prefix)
        self.results["impls"][WHEEL_FLOOR] = (
            None if prefix else "not available (KEYCHAIN_EXT_BENCH_OPENSSL names no static OpenSSL)"
        )
        files = {
            (kt, n): self.ids[(kt, f"pbkdf2-{n}", 0)] for kt in cfg.key_types for n in cfg.corpus
        }
        per = {n: 1 if n >= 100000 else 2 for n in cfg.corpus}
        wheel, self.results["impls"][WHEEL] = self._wheel()
        versions: dict = {}
        gc_was = gc.isenabled()
        for (key_type, n), p12 in files.items():
            kt = "RSA-2048" if key_type == "rsa" else "EC P-256"
            self.log(f"  corpus, {n:,} PBKDF2 iterations, {kt}")
            samples = {i.name: [] for i in self.live()} | {LIMIT: []} | {f: [] for f in floors}
            if wheel:
                samples[WHEEL] = []
            gc.disable()
            try:
                for _ in range(cfg.corpus_reps):
                    for impl in self.live():
                        self._cycle_batch(
                            impl, p12, "bench-corpus", True, per[n], samples[impl.name]
                        )
                    samples[LIMIT] += self._limit_cycles(p12, per[n], False)
                    if wheel:
                        ask = {"path": str(p12.path), "password": p12.password, "n": per[n]}
                        samples[WHEEL] += wheel.ask(ask)
                    for name, prog in floors.items():
                        r = run_floor(prog, n, per[n])
                        samples[name] += r["samples_ms"]
                        versions[name] = r["openssl"]
            finally:
                if gc_was:
                    gc.enable()
            self._row(
                f"corpus_{key_type}_{n}",
                f"cycle, {n:,} PBKDF2 iterations, {kt}",
                "corpus (p12 bytes → kill)",
                samples,
                note=f"PBES2 AES-256-CBC, PBKDF2-HMAC-SHA256 x {n:,} per bag (key, certificate), "
                f"SHA-256 MAC x {CORPUS_MAC_ITERATIONS:,}; KDF floor: those 3 derivations alone",
            )
        self.results["openssl"] = versions
        if wheel:
            wheel.close()

    def measure_token_cycles(self) -> None:
        cfg = self.config
        for key_type in cfg.key_types:
            enc = self.ids[(key_type, "enc", 0)]
            kt = "RSA-2048" if key_type == "rsa" else "EC P-256"
            self.log(f"  cycles, token objects, {kt}")
            samples = {i.name: [] for i in self.live()} | {LIMIT: []}
            for _ in range(cfg.token_reps):
                for impl in self.live():
                    self._cycle_batch(
                        impl, enc, "bench-token", False, cfg.token_batch, samples[impl.name]
                    )
                samples[LIMIT] += self._limit_cycles(enc, cfg.token_batch, True)
            self._row(
                f"cycle_tok_{key_type}",
                f"cycle, token objects, {kt}",
                "cycle (p12 bytes → kill)",
                samples,
                ports_compared=False,
                note="ports: their own token path (a CKO_DATA lease object on the "
                "token), not the C layer's (lease files in the state "
                "directory): reported, not compared",
            )

    # -- lookups -----------------------------------------------------------

    def _add_fillers(self, count: int) -> None:
        """count more token objects with other labels (certificates),
        created with PyKCS11 directly."""
        import PyKCS11

        from benchmarks.ports._material import CKA_CLASS, CKA_LABEL, cert_template, parse_p12
        from benchmarks.ports.pykcs11_port import _lib

        clear = self.ids[("ec", "clear", 0)]
        m = parse_p12(clear.data, b"")
        lib = _lib(self.module)
        slot = next(
            s
            for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == self.token
        )
        session = lib.openSession(slot, PyKCS11.CKF_RW_SESSION)
        try:
            start = self.results.get("_fillers", 0)
            for i in range(start, start + count):
                label = f"filler-{i:05d}"
                t = [
                    (k, label if k == CKA_LABEL else v)
                    for k, v in cert_template(m, label.encode(), True)
                    if k != CKA_CLASS
                ]
                session.createObject([(CKA_CLASS, PyKCS11.CKO_CERTIFICATE), *t])
            self.results["_fillers"] = start + count
        finally:
            session.closeSession()

    def measure_lookups(self) -> None:
        cfg = self.config
        target = "bench-lookup"
        native = self.handles[NATIVE]
        native.preauth_key(self.ids[("rsa", "clear", 1)].data, "", target)  # token objects
        missing = "bench-lookup-missing"
        listers = []
        for impl in self.live():
            try:
                impl.list_items(self.handles[impl.name])
                listers.append(impl)
            except NotImplementedError:
                pass
        try:
            for n_fill in cfg.fillers:
                have = self.results.get("_fillers", 0)
                if n_fill > have:
                    self.log(f"  adding {n_fill - have} token objects")
                    self._add_fillers(n_fill - have)
                self.log(f"  lookups and lists, {n_fill} other objects")
                for impl in listers:  # sized once, untimed, as raw C sizes its buffer
                    impl.list_items(self.handles[impl.name])
                hit = {i.name: [] for i in self.live()} | {LIMIT: []}
                miss = {i.name: [] for i in self.live()} | {LIMIT: []}
                lists = {i.name: [] for i in listers} | {LIMIT: []}
                clock = time.perf_counter_ns
                reps = cfg.lookup_reps if n_fill < 1000 else max(2, cfg.lookup_reps // 2)
                batch = cfg.lookup_batch if n_fill < 1000 else max(2, cfg.lookup_batch // 4)
                if n_fill >= 10000:  # ~0.1 s a lookup: fewer samples
                    reps, batch = 3, 2
                list_batch = max(1, batch // 2)
                for _ in range(reps):
                    for impl in self.live():
                        h = self.handles[impl.name]
                        for _ in range(batch):
                            t0 = clock()
                            found = impl.lookup(h, target)
                            t1 = clock()
                            gone = impl.lookup(h, missing)
                            t2 = clock()
                            assert found is not None and gone is None, impl.name
                            hit[impl.name].append(_ms(t1 - t0))
                            miss[impl.name].append(_ms(t2 - t1))
                        if impl in listers:
                            for _ in range(list_batch):
                                t0 = clock()
                                items = impl.list_items(h)
                                lists[impl.name].append(_ms(clock() - t0))
                                assert len(items) == n_fill + 1, (impl.name, len(items))
                    # raw C: the same kc_* calls on the same identity
                    r = self.limit.run(
                        Driver.spec(
                            self.module,
                            self.token,
                            self.pin,
                            mode="lookup",
                            label=target,
                            missing=missing,
                            iterations=batch,
                        )
                    )
                    hit[LIMIT] += r["hit_samples_ms"]
                    miss[LIMIT] += r["miss_samples_ms"]
                    r = self.limit.run(
                        Driver.spec(
                            self.module, self.token, self.pin, mode="list", iterations=list_batch
                        )
                    )
                    assert r["count"] == n_fill + 1, r["count"]
                    lists[LIMIT] += r["samples_ms"]
                self._row(
                    f"lookup_hit_{n_fill}", f"lookup hit, {n_fill} other objects", "lookup", hit
                )
                self._row(
                    f"lookup_miss_{n_fill}", f"lookup miss, {n_fill} other objects", "lookup", miss
                )
                self._row(
                    f"list_{n_fill}",
                    f"list, {n_fill} other objects",
                    "lookup",
                    lists,
                    note="implementations that can list the store",
                )
        finally:
            native.kill_key(target)

    # -- PKCS#11 calls -----------------------------------------------------

    def measure_calls(self) -> None:
        """Every implementation once more, on the p11shim module (which
        forwards to the same SoftHSM2 instance and counts calls)."""
        self.log("  PKCS#11 calls (p11shim)")
        tools = load_shim_tools()
        os.environ["P11SHIM_TARGET"] = self.module
        shim_path = tools.build_shim(self.workdir / "shim")
        shim = tools.Shim(shim_path)
        clear = self.ids[("rsa", "clear", 0)]
        counts: dict[str, dict] = {}
        for impl in self.live():
            h = impl.open(str(shim_path), self.token, self.pin, self.pin_file)
            try:
                c: dict[str, Any] = {}
                impl.preauth(h, clear, "bench-calls", True)  # warm up
                impl.kill(h, "bench-calls")
                shim.reset()
                impl.preauth(h, clear, "bench-calls", True)
                c["preauth"] = shim.total()
                c["preauth_by_function"] = shim.counts()
                shim.reset()
                impl.kill(h, "bench-calls")
                c["kill"] = shim.total()
                c["kill_by_function"] = shim.counts()
                c["cycle"] = c["preauth"] + c["kill"]
                # token objects: the ports' own path (PORTS_OWN_PATH_CALLS)
                shim.reset()
                impl.preauth(h, clear, "bench-calls", False)
                impl.kill(h, "bench-calls")
                c["cycle_token"] = shim.total()
                c["cycle_token_by_function"] = shim.counts()
                impl.preauth(h, clear, "bench-calls", True)
                shim.reset()
                impl.lookup(h, "bench-calls")
                c["lookup_hit"] = shim.total()
                c["lookup_hit_by_function"] = shim.counts()
                shim.reset()
                impl.lookup(h, "bench-calls-missing")
                c["lookup_miss"] = shim.total()
                impl.kill(h, "bench-calls")
                counts[impl.name] = c
                if impl.name != NATIVE:
                    continue  # the ports know nothing of the C layer's leases
                # kill of a token identity another handle of this process
                # imported: its lease names this process as the owner
                other = self.handles[NATIVE]
                other.preauth_key(clear.data, "", "bench-calls-other", ephemeral=False)
                shim.reset()
                impl.kill(h, "bench-calls-other")
                c["kill_foreign"] = shim.total()
                c["kill_foreign_by_function"] = shim.counts()
                counts[impl.name] = c
            finally:
                impl.close(h)
        # raw C: the same operations through the driver's kc_* calls
        r = self.limit.run(
            Driver.spec(
                str(shim_path),
                self.token,
                self.pin,
                clear,
                mode="calls",
                label="bench-calls",
                iterations=1,
            )
        )
        counts[LIMIT] = {**r["calls"], "cycle": r["calls"]["preauth"] + r["calls"]["kill"]}
        self.results["calls"] = {
            "counts": counts,
            "minimum": MINIMUM_CALLS,
            "ports_own_path": list(PORTS_OWN_PATH_CALLS),
        }

    # -- threads -----------------------------------------------------------

    def _thread_rate(self, impl: Impl, n_threads: int, kind: str, seconds: float) -> float:
        """cycles/s of n_threads threads, each with its own handle and
        identity, cycling for `seconds`."""
        handles = [
            impl.open(self.module, self.token, self.pin, self.pin_file) for _ in range(n_threads)
        ]
        stop = threading.Event()
        counts = [0] * n_threads
        errors: list = []
        barrier = threading.Barrier(n_threads + 1)

        def work(t: int) -> None:
            p12 = self.ids[("ec", kind, t)]
            label = f"bench-thread-{t}"
            h = handles[t]
            barrier.wait()
            try:
                while not stop.is_set():
                    impl.preauth(h, p12, label, True)
                    impl.kill(h, label)
                    counts[t] += 1
            except Exception as exc:  # pragma: no cover - reported
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        for h in handles:
            impl.close(h)
        if errors:
            raise errors[0]
        return sum(counts) / elapsed

    def measure_threads(self) -> None:
        cfg = self.config
        self.log("  threads")
        out: dict[str, Any] = {}
        for kind in ("enc", "clear"):
            rates: dict[str, dict] = {}
            for impl in self.live():
                rates[impl.name] = {
                    n: self._thread_rate(impl, n, kind, cfg.thread_seconds) for n in (1, 2)
                }
            out[kind] = rates
        # raw C, no Python in the process: the standalone program, the same
        # kc_* cycle on the same files for the same time
        limit: dict[str, dict] = {}
        for kind in ("enc", "clear"):
            limit[kind] = {}
            for n in (1, 2):
                spec = Driver.spec(
                    self.module,
                    self.token,
                    self.pin,
                    self.ids[("ec", kind, 0)],
                    mode="threads",
                    label="bench-limit-thread",
                    threads=n,
                    seconds=cfg.thread_seconds,
                    p12_1=self.ids[("ec", kind, 1)].path,
                )
                limit[kind][n] = self.limit.run_program(spec)["cycles_per_s"]
            out[kind][LIMIT] = limit[kind]

        # the machine's own parallelism: OpenSSL PBKDF2 (releases the GIL)
        def kdf(n: int) -> None:
            import hashlib

            for _ in range(n):
                hashlib.pbkdf2_hmac("sha256", b"pin", b"salt", 10000)

        control = {}
        for n in (1, 2):
            k = max(4, int(cfg.thread_seconds * 60))
            ths = [threading.Thread(target=kdf, args=(k,)) for _ in range(n)]
            t0 = time.perf_counter()
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            control[n] = n * k / (time.perf_counter() - t0)
        out["cpu_control"] = control
        self.results["threads"] = out

    # -- processes ---------------------------------------------------------

    def measure_processes(self) -> None:
        """Aggregate ephemeral cycles/s of N processes, each a Python with the
        C extension and its own SoftHSM2 instance on the shared token,
        cycling the encrypted EC p12 for the same seconds from the same
        moment."""
        cfg = self.config
        p12 = self.ids[("ec", "enc", 0)]
        out: dict = {}
        for n in cfg.processes:
            self.log(f"  processes, {n}")
            spec = {
                "module": self.module,
                "token": self.token,
                "pin_file": str(self.pin_file),
                "p12": str(p12.path),
                "password": p12.password,
                "seconds": cfg.process_seconds,
            }
            children = [Child("process", spec, cwd=ROOT) for _ in range(n)]
            for c in children:  # each warm, its token open
                if c.answer() != "ready":
                    raise RuntimeError("process child: no ready")
            for c in children:
                c.send("go")
            runs = [c.answer() for c in children]
            for c in children:
                c.close()
            # the aggregate over the wall-clock span of them all
            span = max(r["end"] for r in runs) - min(r["start"] for r in runs)
            cycles = sum(r["cycles"] for r in runs)
            out[n] = {"cycles": cycles, "seconds": span, "rate": cycles / span}
        self.results["processes"] = out

    # -- memory ------------------------------------------------------------

    def measure_memory(self) -> None:
        cfg = self.config
        n = cfg.memory_cycles
        out: dict[str, Any] = {}
        plan = [(NATIVE, "rsa", "enc")] + [(i.name, "ec", "clear") for i in self.live()]
        for name, key_type, kind in plan:
            impl = self.impls[name]
            if not impl.available:
                continue
            src = "encrypted" if kind == "enc" else "cleartext"
            self.log(f"  memory, {name}, {n} cycles from {src} {key_type.upper()} p12")
            p12 = self.ids[(key_type, kind, 0)]
            h = self.handles[name]
            for _ in range(min(500, n)):  # warm up caches and pools
                impl.preauth(h, p12, "bench-mem", True)
                impl.kill(h, "bench-mem")
            gc.collect()
            before = rss_kib()
            for _ in range(n):
                impl.preauth(h, p12, "bench-mem", True)
                impl.kill(h, "bench-mem")
            gc.collect()
            after = rss_kib()
            out[f"{name} ({key_type}, {kind})"] = {
                "impl": name,
                "p12": kind,
                "key": key_type,
                "cycles": n,
                "before_kib": before,
                "after_kib": after,
                "growth_kib": after - before,
            }
        # SoftHSM2 alone: the same cycles as bare PKCS#11 calls (PyKCS11 from
        # pre-parsed material: no keychain_ext code, no p12 parsing in the loop)
        bare = self.impls.get(PYKCS11)
        if bare is not None and bare.available and bare.parse is not None:
            self.log(f"  memory, SoftHSM2 alone (PyKCS11, pre-parsed), {n} cycles")
            material = bare.parse(self.ids[("ec", "clear", 0)].data, b"")
            h = self.handles[PYKCS11]
            for _ in range(min(500, n)):
                bare.preauth_material(h, material, "bench-mem", True)
                bare.kill(h, "bench-mem")
            gc.collect()
            before = rss_kib()
            for _ in range(n):
                bare.preauth_material(h, material, "bench-mem", True)
                bare.kill(h, "bench-mem")
            gc.collect()
            after = rss_kib()
            out[SOFTHSM2_ALONE] = {
                "impl": PYKCS11,
                "p12": "pre-parsed",
                "key": "ec",
                "cycles": n,
                "before_kib": before,
                "after_kib": after,
                "growth_kib": after - before,
            }
        # raw C, in this process, same number of cycles: what SoftHSM2 itself keeps
        self.log(f"  memory, raw C, {n} cycles from cleartext EC p12")
        p12 = self.ids[("ec", "clear", 0)]
        self.limit.run(
            Driver.spec(
                self.module,
                self.token,
                self.pin,
                p12,
                mode="cycle",
                label="bench-mem-limit",
                iterations=min(500, n),
            )
        )
        before = rss_kib()
        self.limit.run(
            Driver.spec(
                self.module,
                self.token,
                self.pin,
                p12,
                mode="cycle",
                label="bench-mem-limit",
                iterations=n,
            )
        )
        after = rss_kib()
        out[f"{LIMIT} (ec, clear)"] = {
            "impl": LIMIT,
            "p12": "clear",
            "key": "ec",
            "cycles": n,
            "before_kib": before,
            "after_kib": after,
            "growth_kib": after - before,
        }
        self.results["memory"] = out

    # -- all -----------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        self.results["load_before"] = os.getloadavg()
        steps = [
            ("cycle", self.measure_cycles),
            ("corpus", self.measure_corpus),
            ("token", self.measure_token_cycles),
            ("calls", self.measure_calls),
            ("threads", self.measure_threads),
            ("processes", self.measure_processes),
            ("memory", self.measure_memory),
            ("lookup", self.measure_lookups),
        ]
        for kind, step in steps:
            if cfg.wants(kind):
                step()
        self.results.pop("_fillers", None)
        self.results["seconds"] = time.perf_counter() - t0
        self.results["load_after"] = os.getloadavg()
        return self.results


def run_standalone(config: Config, log: Callable[[str], None] = print, keep: bool = False) -> dict:
    """A whole run in a fresh temp dir with its own SoftHSM2 configuration
    (call before anything else loads SoftHSM2 in this process)."""
    import tempfile

    # tmpfs when there is one: where keychain_ext's embedded store lives
    # ($XDG_RUNTIME_DIR); on a disk every token object costs a file write
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="keychain-ext-bench-", dir=base))
    try:
        prepare_environment(root)
        module, token, pin = new_token()
        work = root / "work"
        work.mkdir()
        bench = Bench(module, token, pin, work, config, log=log)
        bench.setup()
        try:
            return bench.run()
        finally:
            bench.close()
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
