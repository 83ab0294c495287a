"""The p11shim test module: counts, traces and fails PKCS#11 calls while
forwarding to SoftHSM2, in process (ctypes control API) and in child
processes (environment).  Needs SoftHSM2, a C compiler, libp11-kit-dev and
PyKCS11; outside CI a missing one skips, in CI it fails."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SHIM_DIR = Path(__file__).resolve().parent / "p11shim"
LABEL = "p11shim-t"
N_OBJECTS = 12  # PyKCS11 fetches 10 per C_FindObjects: 10, 2, 0
CKR_GENERAL_ERROR = 0x05
CKR_DEVICE_ERROR = 0x30
CKR_TOKEN_NOT_PRESENT = 0xE0


def _missing(why: str):
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def _load_build():
    spec = importlib.util.spec_from_file_location("p11shim_build", SHIM_DIR / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _softhsm() -> str:
    from keychain_ext._store import SOFTHSM2_MODULES  # where each distribution puts it

    for path in (os.environ.get("SOFTHSM2_MODULE"), *SOFTHSM2_MODULES):
        if path and os.path.exists(path):
            return path
    _missing("SoftHSM2 not found (apt-get install softhsm2, or set SOFTHSM2_MODULE)")


try:
    import PyKCS11
    from PyKCS11 import PyKCS11Error
except ImportError:  # pragma: no cover - depends on the machine
    PyKCS11 = None


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fresh SoftHSM2 token "t" with N_OBJECTS public data objects, used
    through the shim.  PINs are random and never leave this process."""
    if PyKCS11 is None:
        _missing("PyKCS11 not installed (pip install PyKCS11)")
    target = _softhsm()
    build = _load_build()
    tmp = tmp_path_factory.mktemp("p11shim")
    so = build.build_shim(tmp / "build")
    so_pin, pin = secrets.token_hex(8), secrets.token_hex(8)

    with pytest.MonkeyPatch.context() as mp:
        # SoftHSM2 is one instance per process, configured by conftest.py
        # (SOFTHSM2_CONF); the shim forwards to that same instance.
        mp.setenv("P11SHIM_TARGET", target)
        for var in ("P11SHIM_FAIL_AT", "P11SHIM_FAIL_RV", "P11SHIM_FAIL_FUNCTION"):
            mp.delenv(var, raising=False)
        shim = build.Shim(so)
        shim.clear_faults()
        lib = PyKCS11.PyKCS11Lib().load(str(so))
        # C_InitToken wants the label blank-padded to 32 bytes; PyKCS11 does not pad.
        free = [
            sl
            for sl in lib.getSlotList(tokenPresent=True)
            if not lib.getTokenInfo(sl).flags & PyKCS11.CKF_TOKEN_INITIALIZED
        ]
        lib.initToken(free[0], so_pin, LABEL.ljust(32))
        slot = _slot(lib)
        s = lib.openSession(slot, PyKCS11.CKF_RW_SESSION)
        s.login(so_pin, PyKCS11.CKU_SO)
        s.initPin(pin)
        s.logout()
        s.login(pin)
        for i in range(N_OBJECTS):
            s.createObject(
                [
                    (PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA),
                    (PyKCS11.CKA_TOKEN, True),
                    (PyKCS11.CKA_PRIVATE, False),
                    (PyKCS11.CKA_LABEL, "obj"),
                    (PyKCS11.CKA_VALUE, bytes([i])),
                ]
            )
        s.logout()
        s.closeSession()
        yield {"lib": lib, "shim": shim, "so": so, "slot": slot, "build": build}
        shim.clear_faults()
        # No lib.unload(): its C_Finalize would end SoftHSM2 for every other
        # user in this process.  Keep the object alive so __del__ never runs.
        _KEEP_ALIVE.append(lib)


_KEEP_ALIVE: list = []


def _slot(lib):
    for slot in lib.getSlotList(tokenPresent=True):
        if lib.getTokenInfo(slot).label.strip() == LABEL:
            return slot
    raise AssertionError("token not found")


@pytest.fixture
def shim(env):
    env["shim"].clear_faults()
    env["shim"].reset()
    yield env["shim"]
    env["shim"].clear_faults()
    env["lib"].closeAllSessions(env["slot"])


def find_op(env):
    """Open session + find objects + close: the operation under test."""
    s = env["lib"].openSession(env["slot"])
    found = s.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA), (PyKCS11.CKA_LABEL, "obj")])
    s.closeSession()
    return len(found)


EXPECTED_TRACE = (
    ["C_OpenSession", "C_FindObjectsInit"]
    + ["C_FindObjects"] * 3
    + ["C_FindObjectsFinal", "C_CloseSession"]
)


def test_build_is_cached_and_exports_the_module_api(env, tmp_path):
    so = env["so"]
    assert env["build"].build_shim(so.parent) == so
    lib = ctypes.CDLL(str(so))
    for name in (
        "C_GetFunctionList",
        "C_Initialize",
        "C_FindObjects",
        "C_WaitForSlotEvent",
        "p11shim_reset",
        "p11shim_count",
        "p11shim_total",
        "p11shim_dump",
        "p11shim_trace",
        "p11shim_fail_at",
        "p11shim_fail_function",
    ):
        assert hasattr(lib, name), name
    assert (tmp_path / "x" / "libp11shim.so") == env["build"].build_shim(tmp_path / "x")


def test_counts_open_session_and_find(env, shim):
    assert find_op(env) == N_OBJECTS
    expected = {
        "C_OpenSession": 1,
        "C_FindObjectsInit": 1,
        "C_FindObjects": 3,
        "C_FindObjectsFinal": 1,
        "C_CloseSession": 1,
    }
    assert shim.counts() == expected
    for name, n in expected.items():
        assert shim.count(name) == n
    assert shim.count("C_Login") == 0
    assert shim.count("C_GetFunctionList") == 0
    assert shim.total() == 7
    find_op(env)
    assert shim.total() == 14 and shim.count("C_FindObjects") == 6
    shim.reset()
    assert shim.total() == 0 and shim.counts() == {} and shim.trace() == []


def test_unknown_function_names_are_errors(shim):
    with pytest.raises(KeyError):
        shim.count("C_FindObject")
    with pytest.raises(KeyError):
        shim.fail_function("C_Bogus", 1, CKR_DEVICE_ERROR)
    with pytest.raises(KeyError):
        shim.fail_function("C_GetFunctionList", 1, CKR_DEVICE_ERROR)


def test_trace_lists_every_call_in_order(env, shim):
    find_op(env)
    assert shim.trace() == EXPECTED_TRACE


def test_trace_and_dump_follow_snprintf_rules(env, shim):
    find_op(env)
    lib = shim._lib
    text = "".join(n + "\n" for n in EXPECTED_TRACE)
    assert lib.p11shim_trace(None, 0) == len(text)
    buf = ctypes.create_string_buffer(b"\xff" * 9, 9)
    assert lib.p11shim_trace(buf, 8) == len(text)
    assert buf.raw == text[:7].encode() + b"\0\xff"  # nothing past n bytes
    assert lib.p11shim_dump(None, 0) == len("".join(f"{k}={v}\n" for k, v in shim.counts().items()))


def test_nth_call_fails_and_next_succeeds(env, shim):
    shim.fail_at(1, CKR_DEVICE_ERROR)
    with pytest.raises(PyKCS11Error) as e:
        env["lib"].openSession(env["slot"])
    assert e.value.value == CKR_DEVICE_ERROR
    assert shim.fired() == 1 and shim.trace() == ["C_OpenSession"]
    # The failed call was not forwarded: no session exists.  The next works.
    assert find_op(env) == N_OBJECTS
    assert shim.fired() == 1 and shim.total() == 1 + len(EXPECTED_TRACE)


@pytest.mark.parametrize("n", range(1, len(EXPECTED_TRACE) + 2))
def test_every_call_position_fails(env, shim, n):
    shim.fail_at(n, CKR_DEVICE_ERROR)
    if n > len(EXPECTED_TRACE):
        assert find_op(env) == N_OBJECTS
        assert shim.fired() == 0
        return
    with pytest.raises(PyKCS11Error) as e:
        find_op(env)
    assert e.value.value == CKR_DEVICE_ERROR
    assert shim.fired() == 1
    assert shim.trace() == EXPECTED_TRACE[:n]  # the op stopped at the fault
    env["lib"].closeAllSessions(env["slot"])
    shim.reset()  # position n is in the past now
    shim.fail_at(0, 0)
    assert find_op(env) == N_OBJECTS and shim.fired() == 0


def test_fail_named_function_kth_call(env, shim):
    shim.fail_function("C_FindObjects", 2, CKR_TOKEN_NOT_PRESENT)
    with pytest.raises(PyKCS11Error) as e:
        find_op(env)
    assert e.value.value == CKR_TOKEN_NOT_PRESENT
    assert shim.trace() == EXPECTED_TRACE[:4]
    env["lib"].closeAllSessions(env["slot"])
    assert find_op(env) == N_OBJECTS  # 4th and 5th C_FindObjects pass
    shim.reset()
    shim.fail_function("C_FindObjects", 0, 0)
    assert find_op(env) == N_OBJECTS and shim.fired() == 0


def test_counters_are_exact_under_threads(env, shim):
    lib = shim._lib  # the exported C_* symbols forward like the list does
    lib.C_GetSlotList.argtypes = [ctypes.c_ubyte, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
    lib.C_GetSlotList.restype = ctypes.c_ulong
    threads, per_thread, fail_pos = 8, 500, 1234
    shim.fail_at(fail_pos, CKR_DEVICE_ERROR)
    results = []

    def work():
        count = ctypes.c_ulong()
        rvs = [lib.C_GetSlotList(1, None, ctypes.byref(count)) for _ in range(per_thread)]
        results.extend(rvs)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(results) == threads * per_thread
    assert sorted(set(results)) == [0, CKR_DEVICE_ERROR]
    assert results.count(CKR_DEVICE_ERROR) == 1 and shim.fired() == 1
    assert shim.count("C_GetSlotList") == shim.total() == threads * per_thread
    assert shim.trace() == ["C_GetSlotList"] * (threads * per_thread)


# Python threads mostly take turns under the GIL; this C driver makes the
# shim's counters race for real (it fails if the mutex is removed).
HAMMER_C = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
typedef unsigned long (*fn1)(unsigned long);
static fn1 status;
static long per_thread;
static void *work(void *arg)
{
    for (long i = 0; i < per_thread; i++)
        status(0);
    return arg;
}
int main(int argc, char **argv)
{
    void *h = dlopen(argv[1], RTLD_NOW);
    int threads = atoi(argv[2]);
    pthread_t t[64];
    if (h == NULL || argc < 4 || threads > 64)
        return 2;
    per_thread = atol(argv[3]);
    unsigned long (*init)(void *) = (unsigned long (*)(void *))dlsym(h, "C_Initialize");
    void (*reset)(void) = (void (*)(void))dlsym(h, "p11shim_reset");
    unsigned long (*total)(void) = (unsigned long (*)(void))dlsym(h, "p11shim_total");
    unsigned long (*count)(const char *) =
        (unsigned long (*)(const char *))dlsym(h, "p11shim_count");
    status = (fn1)dlsym(h, "C_GetFunctionStatus");
    if (init(NULL) != 0)
        return 3;
    reset();
    for (int i = 0; i < threads; i++)
        pthread_create(&t[i], NULL, work, NULL);
    for (int i = 0; i < threads; i++)
        pthread_join(t[i], NULL);
    printf("%lu %lu\n", total(), count("C_GetFunctionStatus"));
    return 0;
}
"""


def test_counters_are_exact_under_native_threads(env, tmp_path):
    src = tmp_path / "hammer.c"
    src.write_text(HAMMER_C)
    exe = tmp_path / "hammer"
    cc = os.environ.get("CC", "cc").split()
    subprocess.run([*cc, "-O2", "-pthread", "-o", str(exe), str(src), "-ldl"], check=True)
    threads, per_thread = 8, 100_000
    e = {k: v for k, v in os.environ.items() if not k.startswith("P11SHIM_FAIL")}
    res = subprocess.run(
        [str(exe), str(env["so"]), str(threads), str(per_thread)],
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(threads * per_thread)] * 2


CHILD = r"""
import importlib.util, json, sys
import PyKCS11
from PyKCS11 import PyKCS11Error
spec = importlib.util.spec_from_file_location("b", sys.argv[1])
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
shim = b.Shim(sys.argv[2])
out = {"error": None, "found": None}
try:
    lib = PyKCS11.PyKCS11Lib().load(sys.argv[2])
    slot = [s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == "p11shim-t"][0]
    s = lib.openSession(slot)
    out["found"] = len(s.findObjects([(PyKCS11.CKA_LABEL, "obj")]))
    s.closeSession()
except PyKCS11Error as e:
    out["error"] = e.value
out["trace"] = shim.trace()
print(json.dumps(out))
"""


def run_child(env, **extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith("P11SHIM_")}
    e["P11SHIM_TARGET"] = os.environ["P11SHIM_TARGET"]
    e.update(extra)
    e = {k: v for k, v in e.items() if v is not None}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(SHIM_DIR / "build.py"), str(env["so"])],
        env=e,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr


def test_env_configured_failure_in_child(env):
    base, _ = run_child(env)
    assert base["error"] is None and base["found"] == N_OBJECTS
    trace = base["trace"]
    assert trace[0] == "C_Initialize" and trace[-1] == "C_CloseSession"
    pos = trace.index("C_FindObjectsInit") + 1
    out, _ = run_child(env, P11SHIM_FAIL_AT=str(pos), P11SHIM_FAIL_RV="0x30")
    assert out["error"] == CKR_DEVICE_ERROR and out["found"] is None
    assert out["trace"] == trace[:pos]


def test_env_configured_function_failure_in_child(env):
    out, _ = run_child(env, P11SHIM_FAIL_FUNCTION="C_OpenSession:1:0xE0")
    assert out["error"] == CKR_TOKEN_NOT_PRESENT
    assert out["trace"][-1] == "C_OpenSession"
    out, _ = run_child(env, P11SHIM_FAIL_FUNCTION="C_OpenSession:2:0xE0")
    assert out["error"] is None and out["found"] == N_OBJECTS
    # Without an rv the default is CKR_GENERAL_ERROR.
    out, _ = run_child(env, P11SHIM_FAIL_AT="1")
    assert out["error"] == CKR_GENERAL_ERROR and out["trace"] == ["C_Initialize"]


@pytest.mark.parametrize("target", [None, "", "libc.so.6", "no-such-module.so"])
def test_bad_target_fails_initialize(env, target):
    out, err = run_child(env, P11SHIM_TARGET=target)
    assert out["error"] == CKR_GENERAL_ERROR
    assert out["trace"] == ["C_Initialize"]
    assert "p11shim:" in err
