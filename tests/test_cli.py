"""The keychain-ext command: subcommands, exit codes, and `run` removing the
identity on success, on a failing command, on SIGTERM and on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Token
from .pki import PKI, ClientIdentity, P12Variants
from .servers import NginxServer


@pytest.fixture(scope="module")
def cli_env(token: Token, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment selecting the test token; PIN in a 0600 file."""
    pin_file = tmp_path_factory.mktemp("cli") / "pin"
    pin_file.write_text(token.pin)
    pin_file.chmod(0o600)
    return {
        **os.environ,
        "KEYCHAIN_EXT_MODULE": token.module,
        "KEYCHAIN_EXT_TOKEN": token.label,
        "KEYCHAIN_EXT_PIN_FILE": str(pin_file),
    }


@pytest.fixture(scope="module")
def password_file(rsa_client: ClientIdentity, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pw") / "password"
    path.write_text(rsa_client.password + "\n")
    path.chmod(0o600)  # others' eyes get a warning (test_cli_conventions)
    return path


@pytest.fixture(autouse=True)
def token_left_empty(token: Token) -> Iterator[None]:
    yield
    assert token.objects() == []


def cli(env: dict[str, str], *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "keychain_ext", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def test_preauth_lookup_list_kill(
    cli_env: dict[str, str], rsa_client: ClientIdentity, password_file: Path
) -> None:
    done = cli(
        cli_env,
        "preauth",
        "--p12",
        str(rsa_client.p12),
        "--label",
        "c1",
        "--password-file",
        str(password_file),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["common_name"] == rsa_client.cn
    looked = json.loads(cli(cli_env, "lookup", "--label", "c1", "--json").stdout)
    assert looked["label"] == "c1" and looked["key_type"] == "rsa"
    assert "pin-source=file:" in looked["key_uri"]
    human = cli(cli_env, "lookup", "--label", "c1").stdout
    assert "subject:" in human and f"CN={rsa_client.cn}" in human
    listed = cli(cli_env, "list").stdout
    assert "c1\t" in listed and "1 identities" in listed
    dup = cli(
        cli_env,
        "preauth",
        "--p12",
        str(rsa_client.p12),
        "--label",
        "c1",
        "--password-file",
        str(password_file),
    )
    assert dup.returncode == 3 and dup.stderr.count("\n") == 1  # one line, no traceback
    assert "already in the store" in dup.stderr
    assert cli(cli_env, "kill", "--label", "c1").returncode == 0
    assert cli(cli_env, "lookup", "--label", "c1").returncode == 4
    assert cli(cli_env, "kill", "--label", "c1").returncode == 4
    assert cli(cli_env, "kill", "--label", "c1", "--missing-ok").returncode == 0


@pytest.mark.parametrize(
    "args,code,text",
    [
        (["--p12", "{missing}"], 12, "No such file"),
        (["--p12", "{garbage}"], 7, "not a PKCS#12"),
        (["--p12", "{p12}", "--password-env", "WRONG_PW"], 5, "wrong password"),
        (["--p12", "{p12}", "--label", ""], 10, "empty"),
    ],
)
def test_error_exit_codes(
    cli_env: dict[str, str],
    rsa_client: ClientIdentity,
    variants: P12Variants,
    password_file: Path,
    tmp_path: Path,
    args: list[str],
    code: int,
    text: str,
) -> None:
    values = {
        "missing": str(tmp_path / "nope.p12"),
        "garbage": str(variants.garbage),
        "p12": str(rsa_client.p12),
    }
    args = [a.format(**values) for a in args]
    if "--label" not in args:
        args += ["--label", "bad"]
    if "--password-env" not in args:
        args += ["--password-file", str(password_file)]
    done = cli({**cli_env, "WRONG_PW": "nope"}, "preauth", *args)
    assert done.returncode == code, done.stderr
    assert text in done.stderr and "Traceback" not in done.stderr
    assert rsa_client.password not in done.stderr + done.stdout


def test_verbose_shows_details(cli_env: dict[str, str]) -> None:
    done = cli(cli_env, "--verbose", "kill", "--label", "nothing-here")
    assert done.returncode == 4
    assert "symbol=errSecItemNotFound" in done.stderr and "Traceback" in done.stderr


def test_wrong_pin_and_missing_token(cli_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "pin"
    bad.write_text("not-the-pin")
    done = cli({**cli_env, "KEYCHAIN_EXT_PIN_FILE": str(bad)}, "list")
    assert done.returncode == 6 and "not-the-pin" not in done.stderr
    assert cli({**cli_env, "KEYCHAIN_EXT_TOKEN": "nope"}, "list").returncode == 8


def test_no_password_source_is_a_usage_error(
    cli_env: dict[str, str], rsa_client: ClientIdentity
) -> None:
    env = {k: v for k, v in cli_env.items() if k != "KEYCHAIN_EXT_P12_PASSWORD"}
    done = cli(env, "preauth", "--p12", str(rsa_client.p12), "--label", "x")
    assert done.returncode == 2 and "--password-file" in done.stderr


def test_password_from_default_env_var(cli_env: dict[str, str], rsa_client: ClientIdentity) -> None:
    env = {**cli_env, "KEYCHAIN_EXT_P12_PASSWORD": rsa_client.password}
    assert cli(env, "preauth", "--p12", str(rsa_client.p12), "--label", "envpw").returncode == 0
    assert cli(env, "kill", "--label", "envpw").returncode == 0


def test_doctor(cli_env: dict[str, str]) -> None:
    done = cli(cli_env, "doctor")
    assert done.returncode == 0, done.stdout
    assert "[ok] token" in done.stdout and "[ok] OpenSSL pkcs11 engine" in done.stdout
    broken = cli({**cli_env, "KEYCHAIN_EXT_MODULE": "/nonexistent/module.so"}, "doctor")
    assert broken.returncode == 1 and "[FAIL] token" in broken.stdout


def test_run_curl_against_nginx(
    cli_env: dict[str, str], pki: PKI, rsa_client: ClientIdentity, password_file: Path
) -> None:
    """The issue's done-when: `run ... -- curl --cacert ca.pem -d '{}' URL`."""
    with NginxServer(pki) as nginx:
        done = cli(
            cli_env,
            "run",
            "--p12",
            str(rsa_client.p12),
            "--label",
            "x",
            "--password-file",
            str(password_file),
            "--",
            "curl",
            "-sS",
            "--fail",
            "--cacert",
            str(pki.ca_cert),
            "-d",
            "{}",
            nginx.url,
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"client": f"CN={rsa_client.cn}"}


def test_run_placeholders_and_environment(
    cli_env: dict[str, str], rsa_client: ClientIdentity, password_file: Path
) -> None:
    script = "import os, sys; print(sys.argv[1]); print(os.environ['KEYCHAIN_EXT_KEY_URI'])"
    done = cli(
        cli_env,
        "run",
        "--p12",
        str(rsa_client.p12),
        "--label",
        "ph",
        "--password-file",
        str(password_file),
        "--",
        sys.executable,
        "-c",
        script,
        "{cert}",
    )
    assert done.returncode == 0, done.stderr
    cert_uri, key_uri = done.stdout.split()
    assert cert_uri.startswith("pkcs11:") and "object=ph;type=cert" in cert_uri
    assert "type=private" in key_uri


def test_run_propagates_failure_and_cleans_up(
    cli_env: dict[str, str], rsa_client: ClientIdentity, password_file: Path
) -> None:
    done = cli(
        cli_env,
        "run",
        "--p12",
        str(rsa_client.p12),
        "--label",
        "fails",
        "--password-file",
        str(password_file),
        "--",
        "sh",
        "-c",
        "exit 7",
    )
    assert done.returncode == 7


def test_run_refuses_an_existing_label_and_keeps_it(
    cli_env: dict[str, str], rsa_client: ClientIdentity, password_file: Path
) -> None:
    pre = ["--p12", str(rsa_client.p12), "--label", "mine", "--password-file", str(password_file)]
    assert cli(cli_env, "preauth", *pre).returncode == 0
    done = cli(cli_env, "run", *pre, "--", "true")
    assert done.returncode == 3
    assert cli(cli_env, "lookup", "--label", "mine").returncode == 0  # not deleted
    assert cli(cli_env, "kill", "--label", "mine").returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_cleans_up_on_signal(
    cli_env: dict[str, str],
    token: Token,
    rsa_client: ClientIdentity,
    password_file: Path,
    sig: signal.Signals,
) -> None:
    wait = "import sys; print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keychain_ext",
            "run",
            "--p12",
            str(rsa_client.p12),
            "--label",
            "sig",
            "--password-file",
            str(password_file),
            "--",
            sys.executable,
            "-c",
            wait,
        ],
        env=cli_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    assert {o["label"] for o in token.objects()} == {"sig"}  # present while CMD runs
    proc.send_signal(sig)
    assert proc.wait(60) == 128 + sig
    # token_left_empty checks nothing is left


def test_python_m_and_console_script_agree(cli_env: dict[str, str]) -> None:
    exe = Path(sys.executable).with_name("keychain-ext")
    if not exe.exists():
        pytest.skip("console script not installed next to this interpreter")
    a = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=cli_env)
    assert a.returncode == 0 and "preauth" in a.stdout
