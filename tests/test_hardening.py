"""Hardening: secrets in child processes, signals, PIN and session state
shared with other PKCS#11 users in the process, fork -- real processes on a
real SoftHSM2 token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from keychain_ext import AuthFailedError, Keychain
from keychain_ext._store import softhsm2_module, write_secret

from .conftest import Token
from .pki import ClientIdentity

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slow_p12(ec_client: ClientIdentity, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600,000 PBKDF2 iterations per part (what NSS writes): an import takes
    about a second, a window for signals to land in."""
    out = tmp_path_factory.mktemp("slow") / "slow.p12"
    subprocess.run(
        ["openssl", "pkcs12", "-export", "-inkey", str(ec_client.key), "-in", str(ec_client.cert),
         "-out", str(out), "-passout", "env:P12_PW", "-iter", "600000", "-maciter"],
        env={**os.environ, "P12_PW": "pw"}, check=True, capture_output=True,
    )  # fmt: skip
    return out


def _cli_env(token: Token, tmp_path: Path) -> dict[str, str]:
    pin_file = tmp_path / "pin"
    write_secret(pin_file, token.pin)
    return {**os.environ, "KEYCHAIN_EXT_TOKEN": token.label, "KEYCHAIN_EXT_PIN_FILE": str(pin_file)}


# ------------------------------------------------------------------ secrets


def test_run_hands_no_secret_to_the_child(
    token: Token, ec_client: ClientIdentity, tmp_path: Path
) -> None:
    """--password-env VAR: neither VAR nor any variable holding the password
    or the PIN reaches CMD's environment."""
    env = {**_cli_env(token, tmp_path), "MY_P12_PW": ec_client.password,
           "ALSO_THE_PIN": token.pin, "KEYCHAIN_EXT_P12_PASSWORD": ec_client.password}  # fmt: skip
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    done = subprocess.run(
        [sys.executable, "-m", "keychain_ext", "run", "--p12", str(ec_client.p12), "--label",
         "no-secret", "--password-env", "MY_P12_PW", "--", sys.executable, "-c", dump],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout)
    assert "KEYCHAIN_EXT_LABEL" in child  # it is the child's environment
    for name in ("MY_P12_PW", "ALSO_THE_PIN", "KEYCHAIN_EXT_P12_PASSWORD"):
        assert name not in child
    assert not [k for k, v in child.items() if v in (ec_client.password, token.pin)]
    assert token.objects() == []


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_interrupted_at_any_moment_leaves_nothing(
    token: Token, slow_p12: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """The signal lands before, during and after the slow import (about a
    second, from 0.5 s on) and while CMD runs: every time, nothing stays."""
    env = _cli_env(token, tmp_path)
    env["KEYCHAIN_EXT_P12_PASSWORD"] = "pw"
    wait = "import sys; sys.stdin.read()"
    for delay in (0.0, 0.4, 0.8, 1.6):
        proc = subprocess.Popen(
            [sys.executable, "-m", "keychain_ext", "run", "--p12", str(slow_p12), "--label",
             "sig", "--", sys.executable, "-c", wait],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(0.5 + delay)  # the moment the signal lands, not synchronisation
        proc.send_signal(sig)
        assert proc.stdin
        proc.stdin.close()
        proc.wait(120)
        assert token.objects() == [], f"signal after {0.5 + delay:.1f} s left objects"


INTERRUPTED = """
import signal, sys
from keychain_ext import Keychain
module, token, p12, delay = sys.argv[1:5]
def interrupt(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, interrupt)
with Keychain(module, token, sys.stdin.read()) as kc:
    signal.setitimer(signal.ITIMER_REAL, float(delay))
    try:
        with kc.preauthorized(p12, "pw", "interrupted"):
            signal.pause()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def test_preauthorized_interrupted_at_any_moment_leaves_nothing(
    token: Token, slow_p12: Path
) -> None:
    """A KeyboardInterrupt raised as soon as the import returns (Python runs
    signal handlers right after a C call), or at any later moment."""
    for delay in ("0.05", "0.5", "1.0", "2.0"):
        done = subprocess.run(
            [sys.executable, "-c", INTERRUPTED, token.module, token.label, str(slow_p12), delay],
            input=token.pin, capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert done.stdout.strip() == "interrupted", done.stderr
        assert token.objects() == [], f"interrupt after {delay} s left objects"


# ----------------------------------------------------- PIN and session state

SHARED_LOGIN = """
import ctypes, sys
from keychain_ext import Keychain, AuthFailedError
module, token, mode = sys.argv[1:4]
right = sys.stdin.readline().strip()
if mode == "other-library-first":
    # another PKCS#11 user in the process logs in first
    import PyKCS11
    lib = PyKCS11.PyKCS11Lib(); lib.load(module)
    slot = [s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == token][0]
    session = lib.openSession(slot); session.login(right)
try:
    Keychain(module, token, "wrong-pin").close()
    print("wrong accepted")
except AuthFailedError:
    print("wrong refused")
Keychain(module, token, right).close()
print("right accepted")
"""


@pytest.mark.parametrize("mode", ["alone", "other-library-first"])
def test_a_wrong_pin_never_locks_out_the_right_one(token: Token, mode: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SHARED_LOGIN, token.module, token.label, mode],
        input=token.pin, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    lines = done.stdout.split()
    assert done.returncode == 0, done.stderr
    assert lines[-2:] == ["accepted", "right"] or done.stdout.strip().endswith("right accepted")
    if mode == "alone":
        assert done.stdout.startswith("wrong refused")


def test_symlink_and_real_path_are_one_module(token: Token, tmp_path: Path) -> None:
    link = tmp_path / "libsofthsm2-link.so"
    link.symlink_to(os.path.realpath(token.module))
    with Keychain(str(link), token.label, token.pin):
        with pytest.raises(AuthFailedError):
            Keychain(os.path.realpath(token.module), token.label, "wrong-pin")
        with Keychain(os.path.realpath(token.module), token.label, token.pin):
            pass


TAKEN_AWAY = """
import ctypes, sys
from keychain_ext import Keychain
module, token, p12, what = sys.argv[1:5]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
so = ctypes.CDLL(module)  # the same module: another PKCS#11 user in the process
with Keychain(module, token, pin) as kc:
    kc.preauth_key(p12, password, "taken")
    if what == "logout":
        slots = (ctypes.c_ulong * 16)(); n = ctypes.c_ulong(16)
        so.C_GetSlotList(1, slots, ctypes.byref(n))
        for i in range(n.value):
            so.C_CloseAllSessions(ctypes.c_ulong(slots[i]))
    else:
        so.C_Finalize(None)
    kc.kill_key("taken")
    print(kc.lookup("taken"))
"""


@pytest.mark.parametrize("what", ["close-all-sessions", "finalize"])
def test_kill_after_another_user_closed_sessions_or_finalized(
    token: Token, ec_client: ClientIdentity, what: str
) -> None:
    """libp11 under libcurl's engine calls C_CloseAllSessions or C_Finalize
    when it unloads; the next kill_key must still see and remove the key."""
    done = subprocess.run(
        [sys.executable, "-c", TAKEN_AWAY, token.module, token.label, str(ec_client.p12),
         "logout" if what == "close-all-sessions" else "finalize"],
        input=f"{token.pin}\n{ec_client.password}\n",
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert token.objects() == []


# --------------------------------------------------------------------- fork

FORKS = """
import os, sys, threading
from keychain_ext import Keychain
module, token, p12, child_p12 = sys.argv[1:5]
pin, pw, child_pw = (sys.stdin.readline().strip() for _ in range(3))
kc = Keychain(module, token, pin)
stop = threading.Event()
def busy():
    while not stop.is_set():
        kc.preauth_key(p12, pw, "busy", ephemeral=True)
        kc.kill_key("busy")
worker = threading.Thread(target=busy)
worker.start()
children = []
for i in range(20):
    pid = os.fork()
    if pid == 0:  # the child: its first call must not hang on a lock
        kc.lookup("anything")
        kc.preauth_key(child_p12, child_pw, f"child-{i}", ephemeral=True)
        kc.kill_key(f"child-{i}")
        os._exit(0)
    children.append(pid)
codes = [os.waitpid(pid, 0)[1] for pid in children]
stop.set(); worker.join(); kc.close()
print(sum(c == 0 for c in codes))
"""


def test_fork_while_a_thread_is_inside_the_library(
    token: Token, ec_client: ClientIdentity, rsa_client: ClientIdentity
) -> None:
    """20 forks while a thread cycles through the library: no child hangs
    on a lock it inherited held, and each can import and kill."""
    done = subprocess.run(
        [sys.executable, "-c", FORKS, token.module, token.label, str(ec_client.p12),
         str(rsa_client.p12)],
        input=f"{token.pin}\n{ec_client.password}\n{rsa_client.password}\n",
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "20", done.stderr[-3000:]
    assert token.objects() == []


FORK_WHILE_LOCKS_HELD = """
import os, sys, threading
from keychain_ext import Keychain
module, token, p12, child_p12 = sys.argv[1:5]
pin, pw, child_pw = (sys.stdin.readline().strip() for _ in range(3))
kc = Keychain(module, token, pin)
mine = kc.preauth_key(p12, pw, "parent", ephemeral=True)
held, release = threading.Event(), threading.Event()
def hold():  # a thread inside both of the facade's locks when fork() comes
    with kc._lock, kc._store._lock:
        held.set()
        release.wait()
threading.Thread(target=hold).start()
held.wait()
pid = os.fork()
if pid == 0:
    kc.preauth_key(child_p12, child_pw, "child", ephemeral=True)
    kc.kill_key("child")
    kc.close()
    sys.exit(0)  # a normal exit: close, atexit and finalizers all run
release.set()
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), mine.store.pin_file.exists())
kc.kill_key("parent")
"""


def test_a_forked_child_gets_free_locks_and_leaves_the_parents_pin_file(
    token: Token, ec_client: ClientIdentity, rsa_client: ClientIdentity
) -> None:
    """fork() while another thread holds the Keychain's and the store's
    Python locks: the child's calls do not wait forever, and the child, ending
    normally, does not remove the PIN file its parent's TLS clients use."""
    done = subprocess.run(
        [sys.executable, "-c", FORK_WHILE_LOCKS_HELD, token.module, token.label,
         str(ec_client.p12), str(rsa_client.p12)],
        input=f"{token.pin}\n{ec_client.password}\n{rsa_client.password}\n",
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True"], done.stderr
    assert token.objects() == []


# ------------------------------------------------------ the embedded store

EMBEDDED = """
from keychain_ext import Keychain
with Keychain() as kc:
    print(kc.token, len(kc.items()))
"""


def _embedded(
    home: Path, module: str, extra_env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env.update(KEYCHAIN_EXT_HOME=str(home), KEYCHAIN_EXT_MODULE=module, **extra_env)
    return subprocess.run([sys.executable, "-c", EMBEDDED], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)  # fmt: skip


def test_only_softhsm2_is_ever_initialized(token: Token) -> None:
    """A module that is not SoftHSM2 (p11-kit's proxy here; a blank smart
    card in life) is never initialized."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    proxy = os.path.join("/usr/lib", multiarch, "p11-kit-proxy.so")
    if not os.path.exists(proxy):
        pytest.skip("p11-kit-proxy.so not installed")
    from keychain_ext import ParamError
    from keychain_ext._native_backend import NativeBackend

    with pytest.raises(ParamError, match="not SoftHSM2"):
        NativeBackend().init_token(proxy, "blank", "so-pin-1234", "user-pin-1234")


def _build_shim(tmp_path: Path) -> str:
    """tests/p11shim, built for this test (see p11shim.h)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "p11shim_build", Path(__file__).parent / "p11shim" / "build.py"
    )
    assert spec and spec.loader
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return str(build.build_shim(tmp_path / "shim"))


def test_a_failed_first_initialization_leaves_no_half_token(tmp_path: Path) -> None:
    """C_InitPIN fails after C_InitToken: the embedded store keeps no token
    without a user PIN, and the next use starts afresh; an existing token is
    never initialized again."""
    shim = _build_shim(tmp_path)
    home = tmp_path / "home"
    target = {"P11SHIM_TARGET": softhsm2_module()}
    failed = _embedded(home, shim, {**target, "P11SHIM_FAIL_FUNCTION": "C_InitPIN:1"})
    assert failed.returncode != 0 and "C_InitPIN" in failed.stderr
    assert list((home / "softhsm" / "tokens").iterdir()) == []
    first = _embedded(home, shim, target)
    assert first.returncode == 0 and first.stdout.split() == ["keychain_ext", "0"], first.stderr
    again = _embedded(home, shim, target)
    assert again.returncode == 0, again.stderr
    assert len(list((home / "softhsm" / "tokens").iterdir())) == 1


PIN_FILE_OWNER = """
import os, sys
from keychain_ext import Keychain
module, token, p12, how = sys.argv[1:5]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
kc = Keychain(module, token, pin)
ident = kc.preauth_key(p12, password, "pin-file", ephemeral=True)
print(ident.store.pin_file, flush=True)
if how == "crash":
    os._exit(0)  # no close, no atexit
"""


def test_pin_files_go_with_their_process(token: Token, ec_client: ClientIdentity) -> None:
    """The 0600 PIN file written for TLS clients of an explicit token goes at
    exit even without close(); after a crash, the next process that writes
    one removes it (its writer no longer holds it)."""

    def run(how: str) -> Path:
        done = subprocess.run(
            [sys.executable, "-c", PIN_FILE_OWNER, token.module, token.label,
             str(ec_client.p12), how],
            input=f"{token.pin}\n{ec_client.password}\n", capture_output=True, text=True,
            timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return Path(done.stdout.strip())

    exited = run("exit")
    assert not exited.exists()
    crashed = run("crash")
    assert crashed.exists() and crashed.stat().st_mode & 0o077 == 0
    run("exit")  # writes its own PIN file: sweeps the crashed one first
    assert not crashed.exists()


def test_what_a_writer_that_died_mid_write_left_is_swept(
    token: Token, ec_client: ClientIdentity
) -> None:
    """A secret file or directory still under its temporary dot-name, older
    than a write can take and held by nobody, was left by a writer that
    died mid-write: the next sweep removes it.  A fresh one, or one a
    process holds, stays."""
    import fcntl

    from keychain_ext import _store

    pins = _store.private_dir(_store.base_dir() / "pins")
    old = time.time() - 2 * _store.WRITING_SECONDS
    # named as keychain_ext names them: the sweep touches nothing else
    def tmp_name() -> str:
        return f".1-{_store.new_pin()}.1.tmp"

    dead_file, dead_dir = pins / tmp_name(), pins / f".1-{_store.new_pin()}"
    fresh, held = pins / tmp_name(), pins / tmp_name()
    dead_dir.mkdir(mode=0o700)
    (dead_dir / "key.pem").write_text("names a key")
    for path in (dead_file, fresh, held):
        path.write_text("secret")
    for path in (dead_file, dead_dir, held):
        os.utime(path, (old, old))
    with open(held) as holder:
        fcntl.flock(holder, fcntl.LOCK_SH)
        with token.open() as kc:  # the PIN file it writes for clients sweeps first
            kc.preauth_key(ec_client.p12, ec_client.password, "sweeps", ephemeral=True)
            kc.kill_key("sweeps")
        assert not dead_file.exists() and not dead_dir.exists()
        assert fresh.exists() and held.exists()
    for path in (fresh, held):
        path.unlink()


def test_a_stuck_lock_holder_is_an_error_not_a_hang(
    token: Token, ec_client: ClientIdentity
) -> None:
    """Another process holds the token lock and does not let go: an
    operation gives up after lock_timeout with a typed error, and works
    again once the lock is free."""
    from keychain_ext.errors import IOFailureError

    with token.open(lock_timeout=0.5) as kc:
        assert kc.lock_path
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
             "print('held', flush=True); sys.stdin.read()", kc.lock_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert holder.stdout and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(IOFailureError, match="held the token lock"):
            kc.lookup("anything")
        assert 0.4 < time.monotonic() - started < 30
        assert holder.stdin
        holder.stdin.close()
        holder.wait(30)
        with kc.preauthorized(ec_client.p12, ec_client.password, "after") as ident:
            assert kc.lookup("after") == ident
    assert token.objects() == []


# -------------------------------------------------- a module that lies

LIAR = """
import ctypes, json, sys
from keychain_ext import Keychain, KeychainError
shim, token, p12 = sys.argv[1:4]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
outcomes = []
def attempt(what, op):
    try:
        op()
        outcomes.append([what, "ok"])
    except KeychainError as exc:
        outcomes.append([what, type(exc).__name__])
kc = None
def open_it():
    global kc
    kc = Keychain(shim, token, pin)
attempt("open", open_it)
if kc is not None:
    attempt("preauth", lambda: kc.preauth_key(p12, password, "lied-to"))
    attempt("lookup", lambda: kc.lookup("lied-to"))
    attempt("items", kc.items)
    attempt("kill", lambda: kc.kill_key("lied-to"))
    kc.close()
print(json.dumps({"outcomes": outcomes, "lies": ctypes.CDLL(shim).p11shim_lies()}))
"""


@pytest.mark.parametrize("lie", ["find-count", "slot-count", "attr-length"])
def test_a_module_that_lies_about_counts_and_lengths(
    token: Token, ec_client: ClientIdentity, tmp_path: Path, lie: str
) -> None:
    """A module claims more handles or slots than the room it was given, or
    values longer than their buffers: nothing is read or written past a
    buffer (the process ends normally), every failure is a typed error, and
    what the lie left undone a truthful process finishes: nothing left."""
    shim = _build_shim(tmp_path)
    env = {**os.environ, "P11SHIM_TARGET": softhsm2_module(), "P11SHIM_LIE": lie}
    done = subprocess.run(
        [sys.executable, "-c", LIAR, shim, token.label, str(ec_client.p12)],
        input=f"{token.pin}\n{ec_client.password}\n", env=env,
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["lies"] > 0  # the lie was told
    outcomes = dict(report["outcomes"])
    if lie == "slot-count":  # no token can be trusted: none is opened
        assert outcomes == {"open": "IOFailureError"}
    if lie == "find-count":  # every search fails before anything is made
        assert outcomes["preauth"] == "IOFailureError"
        assert outcomes["kill"] != "ok"
    with token.open() as kc:
        kc.kill_key("lied-to", missing_ok=True)
    assert token.objects() == []
