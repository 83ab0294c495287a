"""All or nothing under injected faults, crash leftovers (leases, reclaim,
purge), and concurrent processes on one token."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keychain_ext import DuplicateItemError, Keychain
from keychain_ext.curl import client_env, curl_args
from keychain_ext.errors import AllocateError

from .conftest import Token, new_token
from .pki import PKI, ClientIdentity, make_client
from .servers import MTLSServer

CKR_DEVICE_MEMORY = 0x31  # not transient: must surface as AllocateError
CKR_TOKEN_NOT_PRESENT = 0xE0  # transient: must be retried away
SHIM_DIR = Path(__file__).resolve().parent / "p11shim"


def _load_shim_build() -> Any:
    spec = importlib.util.spec_from_file_location("p11shim_build", SHIM_DIR / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory, token: Token) -> Iterator[Any]:
    """The fault-injecting PKCS#11 shim in front of SoftHSM2 (same instance)."""
    build = _load_shim_build()
    so = build.build_shim(tmp_path_factory.mktemp("shim"))
    os.environ["P11SHIM_TARGET"] = token.module  # read when the shim loads
    shim = build.Shim(so)
    shim.so = str(so)
    yield shim
    shim.clear_faults()


@pytest.fixture
def plain(token: Token) -> Iterator[Keychain]:
    """A handle without the shim: sees this process's session objects too."""
    with token.open() as kc:
        yield kc
    assert token.objects() == []


def state(token: Token, plain: Keychain) -> tuple[Any, Any]:
    return token.objects(), sorted(
        (i.label, i.has_certificate, i.has_private_key) for i in plain.items()
    )


@pytest.mark.parametrize("ephemeral", [False, True], ids=["token", "ephemeral"])
def test_every_preauth_call_failing_leaves_the_store_unchanged(
    shim: Any,
    token: Token,
    plain: Keychain,
    ec_client: ClientIdentity,
    ephemeral: bool,
) -> None:
    with Keychain(shim.so, token.label, token.pin) as kc:
        shim.reset()
        kc.preauth_key(ec_client.p12, ec_client.password, "walk", ephemeral=ephemeral)
        calls = shim.trace()
        kc.kill_key("walk")
        assert "C_CreateObject" in calls and "C_FindObjectsInit" in calls
        before = state(token, plain)
        for n in range(1, len(calls) + 1):
            shim.reset()
            shim.fail_at(n, CKR_DEVICE_MEMORY)
            with pytest.raises(AllocateError) as info:
                kc.preauth_key(ec_client.p12, ec_client.password, "walk", ephemeral=ephemeral)
            shim.clear_faults()
            assert shim.fired() == 1, f"call {n} ({calls[n - 1]}) was not reached"
            assert info.value.native_code == CKR_DEVICE_MEMORY
            assert state(token, plain) == before, f"failing call {n} ({calls[n - 1]}) left objects"
        # a transient failure anywhere is retried and the import completes
        for n in range(1, len(calls) + 1):
            shim.reset()
            shim.fail_at(n, CKR_TOKEN_NOT_PRESENT)
            kc.preauth_key(ec_client.p12, ec_client.password, "walk", ephemeral=ephemeral)
            shim.clear_faults()
            found = plain.lookup("walk")
            assert found is not None and found.ephemeral == ephemeral
            expected = [] if ephemeral else ["certificate", "private"]
            assert sorted(o["class"] for o in token.objects()) == expected
            kc.kill_key("walk")


@pytest.mark.parametrize("ephemeral", [False, True], ids=["token", "ephemeral"])
def test_every_kill_call_failing_then_a_retry_completes(
    shim: Any,
    token: Token,
    plain: Keychain,
    ec_client: ClientIdentity,
    ephemeral: bool,
) -> None:
    with Keychain(shim.so, token.label, token.pin) as kc:
        kc.preauth_key(ec_client.p12, ec_client.password, "kill-walk", ephemeral=ephemeral)
        shim.reset()
        kc.kill_key("kill-walk")
        calls = shim.trace()
        assert calls.count("C_DestroyObject") == 2
        for n in range(1, len(calls) + 1):
            kc.preauth_key(ec_client.p12, ec_client.password, "kill-walk", ephemeral=ephemeral)
            shim.reset()
            shim.fail_at(n, CKR_DEVICE_MEMORY)
            with pytest.raises(AllocateError):
                kc.kill_key("kill-walk")
            shim.clear_faults()
            kc.kill_key("kill-walk")  # the retry removes what is left
            assert plain.lookup("kill-walk") is None
            assert state(token, plain) == ([], []), f"failing call {n} ({calls[n - 1]})"


# ---------------------------------------------------------------- leases

CRASHER = """
import os, sys
from keychain_ext import Keychain
module, token, p12, label = sys.argv[1:5]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
kc = Keychain(module, token, pin)
kc.preauth_key(p12, password, label)
print(os.getpid(), flush=True)
if sys.stdin.readline() == "":  # parent closed stdin: die without killKey
    os._exit(0)
"""


def start_owner(token: Token, client: ClientIdentity, label: str) -> subprocess.Popen[str]:
    """A process that preauthorizes `label`, prints its pid, and exits
    without removing it when its stdin closes (a crash, for the store)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, token.module, token.label, str(client.p12), label],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write(f"{token.pin}\n{client.password}\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line.strip() == str(proc.pid), "owner did not preauthorize"
    return proc


def crash(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin
    proc.stdin.close()
    assert proc.wait(60) == 0


def test_dead_owner_is_refused_by_default_and_reclaimed_on_request(
    token: Token, kc: Keychain, rsa_client: ClientIdentity, ec_client: ClientIdentity
) -> None:
    owner = start_owner(token, rsa_client, "leased")
    running = kc.lookup("leased")
    assert running and running.owner_pid == owner.pid and running.owner_alive is True
    with pytest.raises(DuplicateItemError, match="running"):
        kc.preauth_key(ec_client.p12, ec_client.password, "leased", stale="reclaim")
    assert kc.purge(dry_run=False) == []  # a live owner's identity stays
    crash(owner)
    dead = kc.lookup("leased")
    assert dead and dead.owner_pid == owner.pid and dead.owner_alive is False
    with pytest.raises(DuplicateItemError, match=f"process {owner.pid} .*dead"):
        kc.preauth_key(ec_client.p12, ec_client.password, "leased")
    ident = kc.preauth_key(ec_client.p12, ec_client.password, "leased", stale="reclaim")
    assert ident.common_name == ec_client.cn and ident.owner_pid == os.getpid()
    assert len(token.objects()) == 2  # only the new identity: cert, key
    kc.kill_key("leased")


def test_purge_removes_only_dead_owners(
    token: Token, kc: Keychain, rsa_client: ClientIdentity, ec_client: ClientIdentity
) -> None:
    dead = start_owner(token, rsa_client, "dead-one")
    crash(dead)
    alive = start_owner(token, ec_client, "live-one")
    try:
        assert [i.label for i in kc.purge()] == ["dead-one"]  # dry run
        assert kc.lookup("dead-one") is not None
        assert [i.label for i in kc.purge(dry_run=False)] == ["dead-one"]
        assert kc.lookup("dead-one") is None
        assert {o["label"] for o in token.objects()} == {"live-one"}
    finally:
        crash(alive)
    assert [i.label for i in kc.purge(dry_run=False)] == ["live-one"]


KILL_LOOP = """
import os, sys
from keychain_ext import Keychain
module, token, p12, label = sys.argv[1:5]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
kc = Keychain(module, token, pin)
data = open(p12, "rb").read()
print("ready", flush=True)
while True:
    kc.preauth_key(data, password, label, stale="reclaim")
    kc.kill_key(label)
"""


CRASH_AT = """
import ctypes, os, sys
from keychain_ext import Keychain
shim, token, p12 = sys.argv[1:4]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
kc = Keychain(shim, token, pin)
calls = ctypes.CDLL(shim).p11shim_total
calls.restype = ctypes.c_ulong
opened = calls()
kc.preauth_key(p12, password, "crash")
kc.kill_key("crash")
print(opened, calls(), flush=True)
"""


def test_sigkill_after_every_call_of_preauth_and_kill(
    shim: Any, token: Token, ec_client: ClientIdentity
) -> None:
    """The shim kills the process right after its n-th PKCS#11 call, for
    every n of preauth + kill: each time the next run reclaims what was
    left, and nothing stays behind."""
    probe = spawn(
        CRASH_AT, [shim.so, token.label, str(ec_client.p12)], [token.pin, ec_client.password]
    )
    out, errors = probe.communicate(timeout=120)
    assert probe.returncode == 0, errors
    opened, total = map(int, out.split())
    assert total - opened >= 12
    for n in range(opened + 1, total + 1):
        env = {**os.environ, "P11SHIM_KILL_AFTER": str(n)}
        child = subprocess.Popen(
            [sys.executable, "-c", CRASH_AT, shim.so, token.label, str(ec_client.p12)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        child.communicate(f"{token.pin}\n{ec_client.password}\n", timeout=120)
        assert child.returncode == -signal.SIGKILL, f"call {n} did not kill"
        later = spawn(
            LATER_RUN,
            [token.module, token.label, str(ec_client.p12)],
            [token.pin, ec_client.password],
        )
        out, errors = later.communicate(timeout=120)
        assert later.returncode == 0 and out.strip() == "ok", f"after call {n}: {errors}"
        assert token.objects() == [], f"killed after call {n}: objects left"


LATER_RUN = """
import sys
from keychain_ext import Keychain
module, token, p12 = sys.argv[1:4]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
with Keychain(module, token, pin, exclusive=True) as kc:
    kc.purge(dry_run=False)  # blank objects a kill inside C_CreateObject left
    kc.preauth_key(p12, password, "crash", stale="reclaim")
    kc.kill_key("crash")
print("ok")
"""


def test_sigkill_at_random_points_never_blocks_a_later_run(
    kc: Keychain, token: Token, ec_client: ClientIdentity
) -> None:
    """A process cycling preauth/kill is killed with SIGKILL at random
    moments; each time, a later run reclaims what it left and nothing stays
    behind.  KEYCHAIN_EXT_CRASH_RUNS sets the count (25 by default;
    scripts/long-runs runs 200)."""
    rng = random.Random(1234)
    for _ in range(int(os.environ.get("KEYCHAIN_EXT_CRASH_RUNS", "25"))):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                KILL_LOOP,
                token.module,
                token.label,
                str(ec_client.p12),
                "crash",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin and proc.stdout and proc.stderr
        proc.stdin.write(f"{token.pin}\n{ec_client.password}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.03))  # the kill point, not synchronisation
        assert proc.poll() is None, f"the cycling process failed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        # the next run (a new process: SoftHSM2 only indexes what a dead
        # process wrote when it starts) reclaims whatever was left
        later = spawn(
            LATER_RUN,
            [token.module, token.label, str(ec_client.p12)],
            [token.pin, ec_client.password],
        )
        out, errors = later.communicate(timeout=120)
        assert later.returncode == 0 and out.strip() == "ok", errors
        assert token.objects() == [], "a crash left objects that reclaim did not remove"


# ----------------------------------------------------------- concurrency

WORKER = """
import sys
from keychain_ext import Keychain
module, token, p12, label, cycles = sys.argv[1:6]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
data = open(p12, "rb").read()
with Keychain(module, token, pin) as kc:
    sys.stdin.readline()  # start together
    for i in range(int(cycles)):
        kc.preauth_key(data, password, label)
        assert kc.lookup(label) is not None
        kc.kill_key(label)
print("done", cycles, flush=True)
"""

LISTER = """
import sys
from keychain_ext import Keychain
module, token = sys.argv[1:3]
pin = sys.stdin.readline().strip()
with Keychain(module, token, pin) as kc:
    sys.stdin.readline()
    for _ in range(100000):  # bounded; the test kills it when done
        kc.items()
"""


def spawn(code: str, args: list[str], secrets: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin
    proc.stdin.write("".join(s + "\n" for s in secrets))
    proc.stdin.flush()
    return proc


def go(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        assert p.stdin
        p.stdin.write("go\n")
        p.stdin.flush()


def locked(path: str, read: Any) -> Any:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        return read()


class Background(threading.Thread):
    """Repeats a call until stopped; keeps every result."""

    def __init__(self, call: Any) -> None:
        super().__init__(daemon=True)
        self.call, self.results, self.stop = call, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and len(self.results) < 10000:
            self.results.append(self.call())

    def finish(self) -> list[Any]:
        self.stop.set()
        self.join()
        return self.results


def test_concurrent_processes_distinct_labels(pki: PKI) -> None:
    """8 processes x N cycles on one token while two processes list it
    through the library, a PKCS#11 reader outside it lists it too, and curl
    keeps POSTing with another identity: no failed cycle, nothing left.
    KEYCHAIN_EXT_CONCURRENT_CYCLES sets N (10; the full run is 50)."""
    token = new_token()
    cycles = os.environ.get("KEYCHAIN_EXT_CONCURRENT_CYCLES", "10")
    clients = [
        make_client(pki, cn=f"worker-{i}", password="pw", key_type="ec", name=f"worker-{i}")
        for i in range(9)
    ]
    with (
        MTLSServer(pki) as server,
        token.open() as kc,
        kc.preauthorized(clients[8].p12, "pw", "steady") as steady,
    ):
        # Readers outside keychain_ext hold its lock, as documented: without
        # it SoftHSM2 lets them miss objects while another process writes.
        assert steady.store.lock_path
        argv = [
            "flock",
            steady.store.lock_path,
            "curl",
            "-sS",
            "--fail",
            "--cacert",
            str(pki.ca_cert),
            *curl_args(steady),
            server.url,
        ]
        curl = Background(
            lambda: subprocess.run(argv, env=client_env(steady), capture_output=True).returncode
        )
        raw = Background(lambda: len(locked(steady.store.lock_path, token.objects)))
        workers = [
            spawn(
                WORKER, [token.module, token.label, str(c.p12), f"w{i}", cycles], [token.pin, "pw"]
            )
            for i, c in enumerate(clients[:8])
        ]
        listers = [spawn(LISTER, [token.module, token.label], [token.pin]) for _ in range(2)]
        curl.start()
        raw.start()
        go(workers + listers)
        results = [p.communicate(timeout=900) for p in workers]
        for p in listers:
            p.kill()
            p.wait()
        curl_codes, raw_counts = curl.finish(), raw.finish()
    assert [r[0].strip() for r in results] == [f"done {cycles}"] * 8, [r[1] for r in results]
    print(
        f"curl: {len(curl_codes)} requests, {curl_codes.count(0)} ok; raw reads: {len(raw_counts)}"
    )
    assert curl_codes and set(curl_codes) == {0}, curl_codes
    assert raw_counts  # the unlocked reader ran alongside
    assert token.objects() == []


RACER = """
import sys
from keychain_ext import Keychain, DuplicateItemError
module, token, p12 = sys.argv[1:4]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
data = open(p12, "rb").read()
with Keychain(module, token, pin) as kc:
    sys.stdin.readline()
    try:
        kc.preauth_key(data, password, "contested")
        print("won", flush=True)
    except DuplicateItemError:
        print("duplicate", flush=True)
"""


def test_processes_racing_for_one_label(pki: PKI, ec_client: ClientIdentity) -> None:
    token = new_token()
    racers = [
        spawn(
            RACER, [token.module, token.label, str(ec_client.p12)], [token.pin, ec_client.password]
        )
        for _ in range(8)
    ]
    go(racers)
    outcomes = sorted(p.communicate(timeout=300)[0].strip() for p in racers)
    assert outcomes == ["duplicate"] * 7 + ["won"]
    assert sorted(o["class"] for o in token.objects()) == ["certificate", "private"]
    with token.open() as kc:
        kc.purge(dry_run=False)  # the winner has exited: its identity is stale
    assert token.objects() == []
