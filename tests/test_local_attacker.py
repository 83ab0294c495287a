"""A local attacker and a careless user (issue 21): symlinked and foreign
directories, foreign files in keychain_ext's directories, FIFOs, devices
and huge files as inputs, secrets that are not UTF-8, files of the wrong
type planted in the state directories.  Real CLI processes, each bounded by
a timeout: a hang is a failure, not a stuck suite."""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from keychain_ext import _store, cli
from keychain_ext.errors import ParamError

from .conftest import Token
from .pki import ClientIdentity

OTHER_UID = 54321  # a second user, made up: root can act as any uid


def _limit_memory() -> None:
    # a CLI that reads an endless device whole must fail, not eat the machine
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keychain_ext", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,  # a FIFO opened blocking would hang here for good
        stdin=subprocess.DEVNULL,
        preexec_fn=_limit_memory,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def env(token: Token, tmp_path: Path, home: Path) -> dict[str, str]:
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin)
    pin_file.chmod(0o600)
    return {
        **os.environ,
        "KEYCHAIN_EXT_HOME": str(home),
        "KEYCHAIN_EXT_MODULE": token.module,
        "KEYCHAIN_EXT_TOKEN": token.label,
        "KEYCHAIN_EXT_PIN_FILE": str(pin_file),
    }


@pytest.fixture
def password_file(rsa_client: ClientIdentity, tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(rsa_client.password)
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def token_left_empty(token: Token) -> object:
    yield
    assert token.objects() == []


def _error(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # one JSON line, no traceback
    record: dict[str, object] = json.loads(lines[0])
    return record


# -- item 1: directories -------------------------------------------------


def test_private_dir_follows_no_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(PermissionError, match="symlink"):
        _store.private_dir(tmp_path / "link" / "keychain_ext")
    with pytest.raises(PermissionError, match="symlink"):
        _store.private_dir(tmp_path / "link")
    assert list(target.iterdir()) == []  # nothing created through the link
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # and not chmodded


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")
def test_root_uses_no_directory_of_another_user(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """root after `su`/`sudo -E` with user B's XDG_RUNTIME_DIR: B's symlink
    there to a root directory is not followed, the directory is not used."""
    tmp_path = tmp_path_factory.mktemp("shared")
    tmp_path.chmod(0o755)  # B must reach its runtime directory below
    for up in tmp_path.parents:  # pytest's base directories are root's, 0700
        if up.stat().st_uid == 0 and not stat.S_IMODE(up.stat().st_mode) & 0o001:
            up.chmod(up.stat().st_mode | 0o711)
    victim = tmp_path / "root-owned"
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    (victim / "provider").mkdir()
    (victim / "provider" / "notes.txt").write_text("root's")
    runtime = tmp_path / "run-user-b"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, OTHER_UID, OTHER_UID)
    planted = subprocess.run(  # B plants the link, as B
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
         "ln", "-s", str(victim), str(runtime / "keychain_ext")],
        capture_output=True, text=True, timeout=30,
    )
    assert planted.returncode == 0, planted.stderr
    assert (runtime / "keychain_ext").lstat().st_uid == OTHER_UID
    child_env = {k: v for k, v in env.items() if k != "KEYCHAIN_EXT_HOME"}
    child_env["XDG_RUNTIME_DIR"] = str(runtime)
    child_env["XDG_DATA_HOME"] = str(tmp_path / "data")
    done = run_cli(child_env, "list", "--json")
    assert done.returncode == 0, done.stderr
    assert "XDG_RUNTIME_DIR" in done.stderr and "not used" in done.stderr
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    assert sorted(p.name for p in victim.iterdir()) == ["provider"]
    assert (victim / "provider" / "notes.txt").read_text() == "root's"
    assert (tmp_path / "data" / "keychain_ext" / "tokens").is_dir()  # the fallback


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")
def test_ancestor_another_user_can_change_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)  # B could swap what is below
    with pytest.raises(PermissionError, match="another user"):
        _store.private_dir(theirs / "mine")
    assert list(theirs.iterdir()) == []


def test_preexisting_loose_directory_is_not_chmodded(env: dict[str, str], home: Path) -> None:
    home.chmod(0o750)  # someone's directory, on purpose
    done = run_cli(env, "list", "--json")
    assert done.returncode == 12, done.stderr
    assert "not 0700" in _error(done)["message"]  # type: ignore[operator]
    assert stat.S_IMODE(home.stat().st_mode) == 0o750


# -- item 2: only ours is swept ------------------------------------------


def _foreign(directory: Path) -> None:
    directory.mkdir(mode=0o700)
    (directory / "notes.txt").write_text("mine")
    (directory / "sub").mkdir()
    os.mkfifo(directory / "fifo")
    os.mkfifo(directory / f"1-{'A' * 24}")  # named like ours, but a FIFO


def test_sweep_leaves_foreign_content(
    env: dict[str, str], home: Path, rsa_client: ClientIdentity, password_file: Path
) -> None:
    """KEYCHAIN_EXT_HOME at an application's directory: its provider/ and
    pins/ content is not keychain_ext's and stays (and a FIFO there is
    never opened blocking)."""
    for sub in ("provider", "pins"):
        _foreign(home / sub)
    args = ("--p12", str(rsa_client.p12), "--label", "attk", "--password-file")
    done = run_cli(env, "preauth", *args, str(password_file), "--json")
    assert done.returncode == 0, done.stderr
    try:
        cert = run_cli(env, "cert", "attk")  # sweeps provider/
        assert cert.returncode == 0, cert.stderr
    finally:
        assert run_cli(env, "kill", "--label", "attk").returncode == 0
    for sub in ("provider", "pins"):
        names = {p.name for p in (home / sub).iterdir()}
        assert {"notes.txt", "sub", "fifo", f"1-{'A' * 24}"} <= names
        assert (home / sub / "notes.txt").read_text() == "mine"


# -- item 4: inputs are regular files of bounded size ----------------------


def test_fifo_as_p12_or_password_file_fails_at_once(
    env: dict[str, str], tmp_path: Path, rsa_client: ClientIdentity, password_file: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for p12, password in ((fifo, password_file), (rsa_client.p12, fifo)):
        done = run_cli(
            env, "run", "--p12", str(p12), "--label", "attk",
            "--password-file", str(password), "--json", "--", "true",
        )
        assert done.returncode == 10, done.stderr
        record = _error(done)
        assert record["error"] == "ParamError"
        assert "not a regular file" in record["message"]  # type: ignore[operator]


def test_device_and_huge_p12_are_refused_unread(
    env: dict[str, str], tmp_path: Path, password_file: Path
) -> None:
    sparse = tmp_path / "sparse.p12"
    with open(sparse, "wb") as f:
        f.truncate(2 << 30)  # 2 GB, no disk: read whole it would need 2 GB of memory
    for p12, why in (("/dev/zero", "not a regular file"), (str(sparse), "larger than")):
        done = run_cli(
            env, "preauth", "--p12", p12, "--label", "attk",
            "--password-file", str(password_file), "--json",
        )
        assert done.returncode == 10, done.stderr
        assert why in _error(done)["message"]  # type: ignore[operator]


def test_read_regular_caps_a_growing_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 11)
    assert _store.read_regular(path, 11, "file") == b"x" * 11
    with pytest.raises(ParamError, match="larger than 10 bytes"):
        _store.read_regular(path, 10, "file")


# -- item 5: every error typed, JSON under --json ----------------------------


def test_password_file_not_utf8_is_typed_and_shows_nothing(
    env: dict[str, str], tmp_path: Path, rsa_client: ClientIdentity
) -> None:
    bad = tmp_path / "password"
    bad.write_bytes(b"s3cr\xe9t\xff")
    bad.chmod(0o600)
    done = run_cli(
        env, "preauth", "--p12", str(rsa_client.p12), "--label", "attk",
        "--password-file", str(bad), "--json",
    )
    assert done.returncode == 10, done.stderr
    record = _error(done)
    assert record["error"] == "ParamError" and "not UTF-8" in record["message"]  # type: ignore[operator]
    for leak in ("s3cr", "xe9", "xff", "0xe9", "position"):
        assert leak not in done.stderr


@pytest.mark.parametrize(
    ("surprise", "code", "message"),
    [(MemoryError(), 14, "out of memory"), (RuntimeError("s3cret"), 15, "internal error")],
)
def test_surprises_at_the_cli_boundary_are_one_line(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    surprise: Exception,
    code: int,
    message: str,
) -> None:
    """Exceptions no test can provoke through the real store on demand
    (memory running out mid-command, a bug) at the boundary that reports."""

    def explode(args: object) -> int:
        raise surprise

    monkeypatch.setattr(cli, "cmd_list", explode)
    for as_json in (True, False):
        argv = ["list", "--json"] if as_json else ["list"]
        assert cli.main(argv) == code
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and message in err[0] and "s3cret" not in err[0]
        if as_json:
            assert json.loads(err[0])["error"] == type(surprise).__name__


# -- item 6: files of the wrong type planted in the state directories --------


def test_planted_fifos_in_state_directories_do_not_block(
    env: dict[str, str], home: Path, token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYCHAIN_EXT_HOME", str(home))
    state = Path(_store.state_dir(token.label))
    for sub, name in (("leases", "0" * 64), ("owners", "f" * 32)):
        (state / sub).mkdir(mode=0o700, exist_ok=True)
        os.mkfifo(state / sub / name)
    for args in (("list", "--json"), ("purge", "--yes", "--json")):
        done = run_cli(env, *args)
        assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO((state / "leases" / ("0" * 64)).lstat().st_mode)  # left alone
    shutil.rmtree(state)
