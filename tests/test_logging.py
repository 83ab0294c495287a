"""The logger ``keychain_ext`` (issue 13, item 6): every step at DEBUG,
WARNING for unsafe set-ups, and never a PIN or password at any level -- in
the records of this process and in the CLI's stderr under -v."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keychain_ext import (
    AuthFailedError,
    DuplicateItemError,
    Keychain,
    Pkcs12VerifyFailureError,
)
from keychain_ext._store import file_lock, on_tmpfs

from .conftest import Token
from .pki import ClientIdentity
from .test_cli import cli
from .test_ownership import Owner


def forms(*secrets: str) -> list[str]:
    """Each secret as it could leak: itself, repr of str and bytes, hex."""
    out = []
    for s in secrets:
        raw = s.encode()
        out += [s, repr(s), repr(raw), raw.hex(), raw.hex().upper()]
    return out


def leaked(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


def record_text(record: logging.LogRecord) -> str:
    text = f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text


@pytest.fixture(autouse=True)
def token_left_empty(token: Token) -> Iterator[None]:
    yield
    assert token.objects() == []


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="keychain_ext")
    yield caplog


@pytest.fixture
def pin_file(token: Token, tmp_path: Path) -> Path:
    path = tmp_path / "pin"
    path.write_text(token.pin)
    path.chmod(0o600)
    return path


def test_debug_steps_and_no_secret(
    debug_log: pytest.LogCaptureFixture, token: Token, pin_file: Path, rsa_client: ClientIdentity
) -> None:
    p12, password = rsa_client.p12, rsa_client.password
    wrong_pin, wrong_password = "wrong-" + token.pin, "wrong-" + password
    with Keychain(token.module, token.label, pin_file=pin_file) as kc:
        kc.preauth_key(p12, password, "logged")
        assert kc.lookup("logged") is not None
        kc.items()
        with pytest.raises(DuplicateItemError):
            kc.preauth_key(p12, password, "logged")
        with pytest.raises(Pkcs12VerifyFailureError):
            kc.preauth_key(p12, wrong_password, "other")
        kc.kill_key("logged")
        kc.kill_key("logged", missing_ok=True)
    with pytest.raises(AuthFailedError):
        Keychain(token.module, token.label, wrong_pin)
    # the PIN in memory: a PIN file is written for TLS clients
    with token.open() as kc, kc.preauthorized(p12, password, "eph"):
        pass
    dead = Owner(token, rsa_client, "dead")
    dead.crash()
    with token.open() as kc:
        assert [i.label for i in kc.purge(dry_run=False)] == ["dead"]

    debug = [r.getMessage() for r in debug_log.records if r.levelno == logging.DEBUG]
    for step in (
        f"opening token '{token.label}' through {token.module} (token lock ",
        f"opened token '{token.label}'",
        "importing 'logged' into token",
        "created certificate and key 'logged' (key id ",
        "lookup 'logged': found",
        "killing 'logged'",
        "killed 'logged'",
        "nothing labelled 'logged' to kill",
        "wrote the PIN file ",
        "reclaiming stale 'dead'",
    ):
        assert any(step in m for m in debug), step
    secrets = forms(token.pin, password, wrong_pin, wrong_password)
    assert debug_log.records
    for record in debug_log.records:
        assert leaked(record_text(record), secrets) == [], record.getMessage()


def test_cli_verbose_never_shows_a_secret(
    token: Token, pin_file: Path, rsa_client: ClientIdentity, tmp_path: Path
) -> None:
    env = {**os.environ, "KEYCHAIN_EXT_MODULE": token.module, "KEYCHAIN_EXT_TOKEN": token.label,
           "KEYCHAIN_EXT_PIN_FILE": str(pin_file)}  # fmt: skip
    password = tmp_path / "password"
    password.write_text(rsa_client.password)
    password.chmod(0o600)
    wrong_pin, wrong_password = tmp_path / "wrong-pin", tmp_path / "wrong-password"
    wrong_pin.write_text("wrong-" + token.pin)
    wrong_password.write_text("wrong-" + rsa_client.password)
    p12 = ["--p12", str(rsa_client.p12), "--label", "cli-logged"]
    runs = [
        ["-v", "preauth", *p12, "--password-file", str(password)],
        ["lookup", "--label", "cli-logged", "-v"],
        ["-v", "--json", "list"],
        ["-v", "preauth", *p12, "--password-file", str(wrong_password)],
        ["-v", "--pin-file", str(wrong_pin), "list"],
        ["kill", "-v", "--label", "cli-logged"],
    ]
    outputs = [(done.stdout + done.stderr) for done in (cli(env, *args) for args in runs)]
    codes_and_steps = [
        "keychain-ext: DEBUG: created certificate and key 'cli-logged'",
        "keychain-ext: DEBUG: lookup 'cli-logged': found",
        '"level": "debug"',
        "MAC verification failed",
        "AuthFailedError",
        "keychain-ext: DEBUG: killed 'cli-logged'",
    ]
    for out, expected in zip(outputs, codes_and_steps):
        assert expected in out, out
    secrets = forms(token.pin, rsa_client.password, "wrong-" + token.pin)
    secrets += forms("wrong-" + rsa_client.password)
    assert [leaked(out, secrets) for out in outputs] == [[]] * len(runs)


def test_pin_file_readable_by_others_warns(
    debug_log: pytest.LogCaptureFixture, token: Token, pin_file: Path
) -> None:
    with Keychain(token.module, token.label, pin_file=pin_file):
        pass
    assert [r for r in debug_log.records if r.levelno >= logging.WARNING] == []
    pin_file.chmod(0o644)
    with Keychain(token.module, token.label, pin_file=pin_file):
        pass
    (warning,) = [r for r in debug_log.records if r.levelno >= logging.WARNING]
    assert warning.levelno == logging.WARNING and warning.name.startswith("keychain_ext")
    assert warning.getMessage() == (
        f"PIN file {pin_file} is readable by group or others (mode 0644): chmod 600 it"
    )


def test_lock_wait_is_logged(debug_log: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "lock"
    waiting, got = threading.Event(), threading.Event()

    class OnWait(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("waiting for the lock"):
                waiting.set()

    handler = OnWait()
    logging.getLogger("keychain_ext").addHandler(handler)
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)

        def take() -> None:
            with file_lock(path):
                got.set()

        thread = threading.Thread(target=take)
        thread.start()
        assert waiting.wait(60), "no DEBUG record before waiting"
        assert not got.is_set()
    finally:
        os.close(holder)  # lets the thread in
        logging.getLogger("keychain_ext").removeHandler(handler)
    thread.join(60)
    assert got.is_set()
    (record,) = [r for r in debug_log.records if r.getMessage().startswith("waiting")]
    assert record.levelno == logging.DEBUG and str(path) in record.getMessage()


def _embedded_home(kind: str, tmp_path: Path) -> Path:
    if kind == "disk":
        if on_tmpfs(tmp_path) is False:
            return tmp_path / "home"
        # Debian 13's /tmp is tmpfs; /var/tmp stays on disk (FHS)
        if on_tmpfs(Path("/var/tmp")) is not False:
            pytest.skip(f"neither {tmp_path} nor /var/tmp is on a persistent disk here")
        return Path(tempfile.mkdtemp(dir="/var/tmp", prefix="keychain-ext-test-"))
    if on_tmpfs(Path("/dev/shm")) is not True:
        pytest.skip("no tmpfs at /dev/shm")
    return Path(tempfile.mkdtemp(dir="/dev/shm", prefix="keychain-ext-test-"))


@pytest.mark.parametrize("kind", ["disk", "tmpfs"])
def test_embedded_store_on_disk_warns(kind: str, tmp_path: Path) -> None:
    home = _embedded_home(kind, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["KEYCHAIN_EXT_HOME"] = str(home)
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from keychain_ext import Keychain; Keychain().close()"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if not home.is_relative_to(tmp_path):
            shutil.rmtree(home, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    # no handler configured: logging's last resort prints WARNING to stderr
    expected = f"the embedded store {home / 'softhsm'} is on a persistent disk, not tmpfs"
    assert (expected in done.stderr) == (kind == "disk"), done.stderr
