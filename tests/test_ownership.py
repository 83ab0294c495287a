"""Ownership: never touch what is not ours, never leave what is.

Real processes on real tokens (SoftHSM2, and NSS softoken where the test
says any_token): owners, held and shared identities, foreign objects, PID
namespaces, and concurrent writers with readers inside and outside the
library.  What is on the token is read by tests/token_view.c, logged in,
unlabelled objects included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from keychain_ext import DuplicateItemError, InvalidOwnerEditError, Keychain

from .conftest import Token, _token_view, new_token
from .pki import PKI, ClientIdentity, make_client

ROOT = Path(__file__).resolve().parents[1]

# A process that owns one identity until told: "kill" (kill_key, prints
# the outcome) or end of input (exits without kill_key: a crash, for the
# store).  argv: module token init_args p12 label mode (owned/shared/held).
OWNER = """
import sys
from keychain_ext import Keychain, KeychainError
module, token, init_args, p12, label, mode = sys.argv[1:7]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
kc = Keychain(module, token, pin, init_args=init_args or None)
try:
    kc.preauth_key(p12, password, label, shared=mode == "shared", held=mode == "held")
    print("ready", flush=True)
except KeychainError as e:
    print(type(e).__name__, flush=True)
    sys.exit(0)
for line in sys.stdin:
    if line.strip() == "kill":
        try:
            kc.kill_key(label)
            print("killed", flush=True)
        except KeychainError as e:
            print(type(e).__name__, flush=True)
"""


class Owner:
    """A child process owning an identity (see OWNER)."""

    def __init__(
        self,
        token: Token,
        client: ClientIdentity,
        label: str,
        mode: str = "owned",
        prefix: Optional[list[str]] = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-c", OWNER, token.module, token.label,
             token.init_args or "", str(client.p12), label, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{token.pin}\n{client.password}\n")
        self.proc.stdin.flush()
        self.outcome = self.proc.stdout.readline().strip()

    def kill(self) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("kill\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def crash(self) -> None:
        """End without kill_key."""
        assert self.proc.stdin
        self.proc.stdin.close()
        assert self.proc.wait(60) == 0


def classes(token: Token) -> list[tuple[str, object]]:
    return sorted((str(o["class"]), o["label"]) for o in token.objects())


@pytest.fixture
def store(any_token: Token) -> Iterator[Keychain]:
    with any_token.open() as kc:
        yield kc
    assert any_token.objects() == [], "test left objects on the token"


# ------------------------------------------------------------ every token


@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest.mark.parametrize("ephemeral", [False, True], ids=["token", "ephemeral"])
def test_import_lookup_kill(
    store: Keychain, any_token: Token, kind: str, ephemeral: bool, request: pytest.FixtureRequest
) -> None:
    client: ClientIdentity = request.getfixturevalue(f"{kind}_client")
    ident = store.preauth_key(client.p12, client.password, "core", ephemeral=ephemeral)
    assert (ident.key_type, ident.ephemeral, ident.mine, ident.ours) == (kind, ephemeral, 1, 1)
    found = store.lookup("core")
    assert found is not None and found.key_id == ident.key_id and found.mine
    expected = [] if ephemeral else [("certificate", "core"), ("private", "core")]
    assert classes(any_token) == expected
    with pytest.raises(DuplicateItemError):
        store.preauth_key(client.p12, client.password, "core-again")  # same key
    store.kill_key("core")
    assert store.lookup("core") is None


def test_dead_owner_is_reclaimed_and_purged(
    store: Keychain, any_token: Token, rsa_client: ClientIdentity, ec_client: ClientIdentity
) -> None:
    owner = Owner(any_token, rsa_client, "leased")
    assert owner.outcome == "ready"
    found = store.lookup("leased")
    assert found and found.owner_pid == owner.proc.pid and found.owner_alive is True
    assert not found.mine
    with pytest.raises(DuplicateItemError, match="running"):
        store.preauth_key(ec_client.p12, ec_client.password, "leased", stale="reclaim")
    assert store.purge(dry_run=False) == []
    owner.crash()
    found = store.lookup("leased")
    assert found and found.owner_alive is False
    ident = store.preauth_key(ec_client.p12, ec_client.password, "leased", stale="reclaim")
    assert ident.common_name == ec_client.cn and classes(any_token) == [
        ("certificate", "leased"),
        ("private", "leased"),
    ]
    store.kill_key("leased")
    dead = Owner(any_token, rsa_client, "dead")
    dead.crash()
    assert [i.label for i in store.purge(dry_run=False)] == ["dead"]


def test_a_stale_handle_cannot_kill_a_live_owners_identity(
    store: Keychain, any_token: Token, rsa_client: ClientIdentity, ec_client: ClientIdentity
) -> None:
    store.preauth_key(rsa_client.p12, rsa_client.password, "relabelled")
    store.kill_key("relabelled")
    other = Owner(any_token, ec_client, "relabelled")
    assert other.outcome == "ready"
    before = any_token.objects()
    with pytest.raises(InvalidOwnerEditError, match=f"process {other.proc.pid} .*running"):
        store.kill_key("relabelled")
    assert any_token.objects() == before
    found = store.lookup("relabelled")
    assert found and found.common_name == ec_client.cn and not found.mine
    assert other.kill() == "killed"
    other.crash()


def test_shared_identity_goes_with_its_last_owner(
    store: Keychain, any_token: Token, ec_client: ClientIdentity, rsa_client: ClientIdentity
) -> None:
    owners = [Owner(any_token, ec_client, "shared", "shared") for _ in range(4)]
    assert [o.outcome for o in owners] == ["ready"] * 4
    found = store.lookup("shared")
    assert found and (found.shared, found.owners, found.mine) == (True, 4, False)
    # another identity, or an unshared import, under the label is refused
    assert Owner(any_token, rsa_client, "shared", "shared").outcome == "DuplicateItemError"
    assert Owner(any_token, ec_client, "shared").outcome == "DuplicateItemError"
    for i, owner in enumerate(owners[:3]):
        assert owner.kill() == "killed"
        found = store.lookup("shared")
        assert found and found.owners == 3 - i
        assert classes(any_token) == [("certificate", "shared"), ("private", "shared")]
    owners[0].crash()
    assert owners[3].kill() == "killed"
    assert any_token.objects() == []
    for owner in owners[1:]:
        owner.crash()
    # a sharer that dies leaves the identity to the others; the last one's
    # kill removes it
    a, b = (Owner(any_token, ec_client, "shared2", "shared") for _ in range(2))
    a.crash()
    assert b.kill() == "killed"
    b.crash()
    assert store.lookup("shared2") is None


def test_held_identity_outlives_its_maker_and_purge(
    store: Keychain, any_token: Token, ec_client: ClientIdentity
) -> None:
    maker = Owner(any_token, ec_client, "held", "held")
    assert maker.outcome == "ready"
    maker.crash()
    found = store.lookup("held")
    assert found and (found.held, found.owners, found.owner_alive) == (True, 0, True)
    assert store.purge(dry_run=False) == []
    with pytest.raises(DuplicateItemError, match="held"):
        store.preauth_key(ec_client.p12, ec_client.password, "held", stale="reclaim")
    store.kill_key("held")  # any process may kill a held identity
    assert store.lookup("held") is None


def test_cli_preauth_is_held_until_cli_kill(
    any_token: Token, ec_client: ClientIdentity, tmp_path: Path
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(any_token.pin)
    pin_file.chmod(0o600)
    base = [sys.executable, "-m", "keychain_ext", "--module", any_token.module,
            "--token", any_token.label, "--pin-file", str(pin_file)]  # fmt: skip
    if any_token.init_args:
        base.append(f"--init-args={any_token.init_args}")
    env = {**os.environ, "KEYCHAIN_EXT_P12_PASSWORD": ec_client.password}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], env=env, capture_output=True, text=True)

    done = cli("preauth", "--p12", str(ec_client.p12), "--label", "by-cli")
    assert done.returncode == 0, done.stderr
    assert "held until killed" in cli("list").stdout
    purge = cli("purge", "--yes")
    assert purge.returncode == 0 and "0 stale" in purge.stdout
    listed = json.loads(cli("list", "--json").stdout)
    assert [(i["label"], i["held"]) for i in listed] == [("by-cli", True)]
    assert cli("kill", "--label", "by-cli").returncode == 0
    assert any_token.objects() == []


# ------------------------------------------------ what is not ours stays

FOREIGN = """
import os, sys
import PyKCS11
from PyKCS11.LowLevel import *
lib = PyKCS11.PyKCS11Lib()
lib.load(os.environ["VIEW_MODULE"])
slot = [s for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.strip() == os.environ["VIEW_TOKEN"]][0]
session = lib.openSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION)
session.login(sys.stdin.readline().strip())
der = open(sys.argv[2], "rb").read()
if sys.argv[1] == "make":
    for template in (
        # another application's data object, no label
        [(CKA_CLASS, CKO_DATA), (CKA_TOKEN, True), (CKA_APPLICATION, "other-app"),
         (CKA_VALUE, b"x" * 16)],
        # a certificate with no label and no id
        [(CKA_CLASS, CKO_CERTIFICATE), (CKA_TOKEN, True), (CKA_CERTIFICATE_TYPE, CKC_X_509),
         (CKA_VALUE, der), (CKA_SUBJECT, b"0\\x00")],
        # a labelled data object larger than 8 KiB
        [(CKA_CLASS, CKO_DATA), (CKA_TOKEN, True), (CKA_LABEL, "other-app-big"),
         (CKA_VALUE, b"y" * 20000)],
        # a key type keychain_ext never imports, without a label
        [(CKA_CLASS, CKO_SECRET_KEY), (CKA_TOKEN, True), (CKA_KEY_TYPE, CKK_GENERIC_SECRET),
         (CKA_VALUE, b"z" * 32)],
        # an empty data object: blank, but not made by keychain_ext
        [(CKA_CLASS, CKO_DATA), (CKA_TOKEN, True)],
    ):
        session.createObject(template)
else:
    for obj in session.findObjects([]):
        session.destroyObject(obj)
session.logout()
"""


def foreign(token: Token, action: str, der: Path) -> None:
    env = {**os.environ, "VIEW_MODULE": token.module, "VIEW_TOKEN": token.label}
    subprocess.run([sys.executable, "-c", FOREIGN, action, str(der)], input=token.pin + "\n",
                   env=env, text=True, check=True)  # fmt: skip


def test_foreign_objects_survive_purge_and_reclaim(
    rsa_client: ClientIdentity, ec_client: ClientIdentity, tmp_path: Path
) -> None:
    """Objects of other applications -- unlabelled, larger than 8 KiB, of key
    types keychain_ext never imports, even an empty one -- survive purge,
    purge --yes and reclaiming imports."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    token = new_token()
    der = tmp_path / "cert.der"
    der.write_bytes(
        x509.load_pem_x509_certificate(rsa_client.cert.read_bytes()).public_bytes(Encoding.DER)
    )
    foreign(token, "make", der)
    theirs = token.objects()
    assert len(theirs) == 5
    dead = Owner(token, rsa_client, "ours")
    dead.crash()
    with token.open() as kc:
        assert [i.label for i in kc.purge(dry_run=False)] == ["ours"]
        kc.preauth_key(ec_client.p12, ec_client.password, "ours", stale="reclaim")
        kc.kill_key("ours")
        assert not any(i.ours for i in kc.items())
        with pytest.raises(InvalidOwnerEditError):
            kc._store.reclaim_stale(None)  # unlabelled objects: not provably ours
    env = {**os.environ, "KEYCHAIN_EXT_PIN_FILE": str(tmp_path / "pin")}
    (tmp_path / "pin").write_text(token.pin)
    purge = subprocess.run(
        [sys.executable, "-m", "keychain_ext", "--module", token.module, "--token",
         token.label, "purge", "--yes"],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert purge.returncode == 0, purge.stderr
    assert token.objects() == theirs
    with token.open(exclusive=True) as kc:  # even told the token is ours alone
        kc.purge(dry_run=False)
    assert len(token.objects()) == 4  # only the empty data object went
    foreign(token, "remove", der)


# ---------------------------------------------------------- PID namespaces


def _unshare_problem() -> str:
    """Why a PID namespace cannot be made here ("" if it can)."""
    if shutil.which("unshare") is None:
        return "unshare is not installed (util-linux)"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    if probe.returncode == 0:
        return ""
    return f"unshare --pid --fork --mount-proc fails here (needs root): {probe.stderr.strip()}"


UNSHARE_PROBLEM = _unshare_problem()


@pytest.mark.skipif(bool(UNSHARE_PROBLEM), reason=UNSHARE_PROBLEM)
def test_owner_in_another_pid_namespace_keeps_its_identity(
    token: Token, kc: Keychain, ec_client: ClientIdentity, rsa_client: ClientIdentity
) -> None:
    """The owner's pid means nothing here (in its namespace it is 1 or 2, a
    pid this namespace may use for something else): its owner file's flock
    says it runs."""
    owner = Owner(token, ec_client, "namespaced",
                  prefix=["unshare", "--pid", "--fork", "--mount-proc"])  # fmt: skip
    assert owner.outcome == "ready"
    found = kc.lookup("namespaced")
    assert found and found.owner_alive is True and found.owner_pid != owner.proc.pid
    assert kc.purge(dry_run=False) == []
    with pytest.raises(DuplicateItemError, match="running"):
        kc.preauth_key(rsa_client.p12, rsa_client.password, "namespaced", stale="reclaim")
    with pytest.raises(InvalidOwnerEditError):
        kc.kill_key("namespaced")
    assert owner.kill() == "killed"
    owner.crash()
    assert token.objects() == []


# ------------------------------------------------------------ concurrency

WORKER = """
import json, sys
from keychain_ext import Keychain
module, token, init_args, p12, label, cycles = sys.argv[1:7]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
data = open(p12, "rb").read()
failed, hidden = 0, []
with Keychain(module, token, pin, init_args=init_args or None, exclusive=True) as kc:
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i in range(int(cycles)):
        name = f"{label}-{i}"
        try:
            kc.preauth_key(data, password, name)
            assert kc.lookup(name) is not None
            kc.kill_key(name)
        except Exception as e:
            if "hidden from this process" in str(e):
                hidden.append(name)  # SoftHSM2's, said so; its lease stays
                continue
            failed += 1
            print(repr(e), file=sys.stderr)
            kc.kill_key(name, missing_ok=True)
print(json.dumps({"failed": failed, "hidden": hidden}), flush=True)
"""

LISTER = """
import sys
from keychain_ext import Keychain
module, token, init_args = sys.argv[1:4]
pin = sys.stdin.readline().strip()
with Keychain(module, token, pin, init_args=init_args or None) as kc:
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(100000):  # bounded; the test ends it when done
        kc.items()
"""


def _child(code: str, args: list[str], secrets: list[str]) -> subprocess.Popen[str]:
    pipe = subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=pipe, stdout=pipe, stderr=pipe, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdin
    proc.stdin.write("".join(s + "\n" for s in secrets))
    proc.stdin.flush()
    return proc


def test_writers_with_readers_inside_and_outside_the_lock(pki: PKI, any_token: Token) -> None:
    """8 processes x N preauth/lookup/kill cycles while a lister runs through
    the library (under its lock) and an outside program lists the token
    without the lock: no failed cycle, nothing left -- unlabelled objects
    included.  KEYCHAIN_EXT_STRESS_CYCLES sets N (default 50).

    SoftHSM2 can also hide an identity from the process that wrote it, for
    good (measured: still unseen 7 s later, while other processes see it).
    That process then gets a typed error saying so, keeps the lease, and
    the identity goes with the purge once its owner has ended.

    SoftHSM2 leaves blank objects (a class and nothing else) when an
    unlocked reader races its writes.  The token is keychain_ext's alone
    here (exclusive), so those are provably ours: each operation removes
    the ones it sees, and the next use of the store (the purge below)
    removes those that appeared after the last one."""
    cycles = os.environ.get("KEYCHAIN_EXT_STRESS_CYCLES", "50")
    clients = [make_client(pki, cn=f"stress-{i}", password="pw", key_type="ec",
                           name=f"stress-{i}") for i in range(8)]  # fmt: skip
    init = any_token.init_args or ""
    workers = [
        _child(WORKER, [any_token.module, any_token.label, init, str(c.p12), f"s{i}", cycles],
               [any_token.pin, "pw"])
        for i, c in enumerate(clients)
    ]  # fmt: skip
    lister = _child(LISTER, [any_token.module, any_token.label, init], [any_token.pin])
    stop, reads = threading.Event(), []
    env = {**os.environ, "VIEW_MODULE": any_token.module, "VIEW_TOKEN": any_token.label}
    if any_token.init_args:
        env["VIEW_INIT_ARGS"] = any_token.init_args
    viewer = str(_token_view())

    def outside_reader() -> None:
        while not stop.is_set() and len(reads) < 100000:
            done = subprocess.run(
                [viewer], input=any_token.pin.encode(), env=env, capture_output=True
            )
            reads.append(done.returncode)

    # Everyone has opened the token before the outside reader starts: an
    # unlocked reader racing a process's C_Initialize can make SoftHSM2 miss
    # the token there (a clean NoSuchKeychainError; the cycles are the test)
    for p in [*workers, lister]:
        assert p.stdout and p.stdout.readline().strip() == "ready"
    reader = threading.Thread(target=outside_reader, daemon=True)
    reader.start()
    for p in [*workers, lister]:
        assert p.stdin
        p.stdin.write("go\n")
        p.stdin.flush()
    results: list[Any] = [p.communicate(timeout=1200) for p in workers]
    stop.set()
    reader.join()
    lister.kill()
    lister.wait()
    reports = [json.loads(r[0].strip().splitlines()[-1]) for r in results]
    assert [r["failed"] for r in reports] == [0] * 8, [r[1][-2000:] for r in results if r[1]]
    assert reads, "the outside reader never ran"
    # identities SoftHSM2 hid from their own process were reported so, and
    # their leases name them: once their owners have ended, purge removes
    # them with the blank objects an unlocked reader leaves
    hidden = {name for r in reports for name in r["hidden"]}
    with any_token.open(exclusive=True) as kc:
        swept = kc.purge(dry_run=False)
    assert {i.label for i in swept if i.label} == hidden, swept
    assert any_token.objects() == []
