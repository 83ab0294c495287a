"""The keychain-ext command's conventions (issue 13, item 5): --version,
global options before or after the command, help for every option, errors
as JSON, secret files and --pin-file, the token checked before the PIN, the
embedded store by name, CLI flags in hints, doctor and a missing module."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from keychain_ext import __version__
from keychain_ext.cli import _parser

from . import test_cli
from .conftest import Token
from .pki import ClientIdentity
from .test_cli import cli
from .test_ownership import Owner

# test_cli's fixtures serve here too
cli_env = test_cli.cli_env
password_file = test_cli.password_file
token_left_empty = test_cli.token_left_empty


@pytest.fixture
def no_token_env(cli_env: dict[str, str]) -> dict[str, str]:
    """cli_env without the variables that name the token and its PIN."""
    drop = ("KEYCHAIN_EXT_TOKEN", "KEYCHAIN_EXT_PIN_FILE")
    return {k: v for k, v in cli_env.items() if k not in drop}


def p12_args(client: ClientIdentity, label: str, password: Path) -> list[str]:
    return ["--p12", str(client.p12), "--label", label, "--password-file", str(password)]


def test_version(cli_env: dict[str, str]) -> None:
    done = cli(cli_env, "--version")
    assert (done.returncode, done.stdout) == (0, f"keychain-ext {__version__}\n")


def test_global_options_before_or_after_the_command(
    no_token_env: dict[str, str], token: Token, cli_env: dict[str, str]
) -> None:
    where = ["--token", token.label, "--pin-file", cli_env["KEYCHAIN_EXT_PIN_FILE"]]
    for args in (
        [*where, "list", "--json"],
        [*where, "--json", "list"],
        ["list", *where, "--json"],
        ["--json", "list", *where],
    ):
        done = cli(no_token_env, *args)
        assert done.returncode == 0, (args, done.stderr)
        assert json.loads(done.stdout) == [], args
    # -v after the command: DEBUG steps on stderr
    verbose = cli(no_token_env, "list", "-v", *where)
    assert verbose.returncode == 0, verbose.stderr
    assert f"opening token '{token.label}'" in verbose.stderr
    # the last of two values wins, wherever each was given
    done = cli(no_token_env, "--token", "not-this-one", "list", *where)
    assert done.returncode == 0, done.stderr


def test_every_option_has_help() -> None:
    parser = _parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = {"keychain-ext": parser, **subparsers[0].choices}
    assert {"preauth", "kill", "lookup", "list", "purge", "doctor", "run"} <= set(parsers)
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, p in parsers.items()
        for action in p._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


def test_errors_as_json(
    cli_env: dict[str, str], rsa_client: ClientIdentity, password_file: Path
) -> None:
    done = cli(cli_env, "lookup", "--label", "nothing-here", "--json")
    assert done.returncode == 4 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    error = json.loads(line)
    assert error["error"] == "ItemNotFoundError" and error["status"] == -25300
    assert "nothing-here" in error["message"]
    # before the command too, and for usage errors the code stays 2
    env = {k: v for k, v in cli_env.items() if k != "KEYCHAIN_EXT_P12_PASSWORD"}
    done = cli(env, "--json", "preauth", "--p12", str(rsa_client.p12), "--label", "x")
    assert done.returncode == 2
    error = json.loads(done.stderr)
    assert error["error"] == "UsageError" and error["status"] is None
    assert "--password-file" in error["message"]
    # a file error: no OSStatus
    done = cli(cli_env, "preauth", "--json", "--p12", "/nonexistent.p12", "--label", "x",
               "--password-file", str(password_file))  # fmt: skip
    assert done.returncode == 12
    assert json.loads(done.stderr)["error"] == "FileNotFoundError"


def test_parse_errors_text_or_json(cli_env: dict[str, str]) -> None:
    text = cli(cli_env, "kill")
    assert text.returncode == 2 and text.stdout == ""
    assert text.stderr.startswith("usage: keychain-ext kill ")
    assert "error: the following arguments are required: --label" in text.stderr
    done = cli(cli_env, "--json", "kill")
    assert done.returncode == 2
    error = json.loads(done.stderr)
    assert error["error"] == "UsageError" and "--label" in error["message"]
    assert json.loads(cli(cli_env, "list", "--json", "--bogus").stderr)["status"] is None


def test_secret_files_readable_by_others_warn(
    cli_env: dict[str, str], rsa_client: ClientIdentity, tmp_path: Path
) -> None:
    pin = tmp_path / "pin"
    shutil.copy(cli_env["KEYCHAIN_EXT_PIN_FILE"], pin)
    pin.chmod(0o640)
    password = tmp_path / "password"
    password.write_text(rsa_client.password)
    password.chmod(0o604)
    env = {**cli_env, "KEYCHAIN_EXT_PIN_FILE": str(pin)}
    done = cli(env, "preauth", *p12_args(rsa_client, "exposed", password))
    assert done.returncode == 0, done.stderr
    assert f"PIN file {pin} is readable by group or others (mode 0640)" in done.stderr
    assert f"password file {password} is readable by group or others" in done.stderr
    # under --json the warning is a JSON line; a private file gets none
    pin.chmod(0o600)
    done = cli(env, "kill", "--label", "exposed", "--json", "--pin-file", str(password))
    assert done.returncode == 6  # the password is not the PIN
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert lines[0]["level"] == "warning" and "password" in lines[0]["message"]
    assert lines[1]["error"] == "AuthFailedError"
    done = cli(env, "kill", "--label", "exposed")
    assert done.returncode == 0 and done.stderr == ""


def test_pin_file_missing_wrong_or_relative(
    no_token_env: dict[str, str],
    token: Token,
    cli_env: dict[str, str],
    rsa_client: ClientIdentity,
    password_file: Path,
) -> None:
    named = ["--token", token.label]
    missing = cli(no_token_env, *named, "--pin-file", "/nonexistent/pin", "list")
    assert missing.returncode == 12 and "No such file" in missing.stderr
    # a PIN file for the embedded store is not silently ignored
    embedded = cli(no_token_env, "--pin-file", cli_env["KEYCHAIN_EXT_PIN_FILE"], "list")
    assert embedded.returncode == 10
    assert "--pin-file is for a token named by --token" in embedded.stderr
    # relative: absolute in what is stored and handed on (the key's URI)
    pin = Path(cli_env["KEYCHAIN_EXT_PIN_FILE"])
    done = cli(no_token_env, "preauth", *named, "--pin-file", pin.name, "--json",
               *p12_args(rsa_client, "relative", password_file), cwd=pin.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"pin-source=file:{pin}" in json.loads(done.stdout)["key_uri"]
    assert cli(cli_env, "kill", "--label", "relative").returncode == 0


def test_missing_token_before_missing_pin(no_token_env: dict[str, str], token: Token) -> None:
    done = cli(no_token_env, "--token", "nope", "list")
    assert done.returncode == 8 and "no token labelled 'nope'" in done.stderr
    done = cli(no_token_env, "--token", token.label, "list")
    assert done.returncode == 9
    assert "needs a PIN: use --pin-file or KEYCHAIN_EXT_PIN_FILE" in done.stderr


def test_embedded_store_by_name(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SOFTHSM2_CONF", "KEYCHAIN_EXT_TOKEN", "KEYCHAIN_EXT_PIN_FILE")
    }
    env["KEYCHAIN_EXT_HOME"] = str(tmp_path / "home")
    unnamed = cli(env, "list", "--json")
    named = cli(env, "--token", "keychain_ext", "list", "--json")
    assert (unnamed.returncode, named.returncode) == (0, 0), named.stderr
    assert json.loads(named.stdout) == json.loads(unnamed.stdout) == []


def test_duplicate_key_names_its_label(
    cli_env: dict[str, str], rsa_client: ClientIdentity, password_file: Path
) -> None:
    assert cli(cli_env, "preauth", *p12_args(rsa_client, "first", password_file)).returncode == 0
    done = cli(cli_env, "preauth", *p12_args(rsa_client, "second", password_file))
    assert done.returncode == 3
    assert "already in the store under the label 'first'" in done.stderr
    assert cli(cli_env, "kill", "--label", "first").returncode == 0


def test_hints_name_cli_flags(
    cli_env: dict[str, str], token: Token, rsa_client: ClientIdentity, password_file: Path
) -> None:
    live = Owner(token, rsa_client, "live")
    assert live.outcome == "ready"
    done = cli(cli_env, "kill", "--label", "live")
    assert done.returncode == 13 and "(--force to override)" in done.stderr
    assert live.kill() == "killed"
    live.crash()
    dead = Owner(token, rsa_client, "dead")
    dead.crash()
    done = cli(cli_env, "preauth", *p12_args(rsa_client, "dead", password_file), "--json")
    assert done.returncode == 3
    message = json.loads(done.stderr)["message"]
    assert "--reclaim-stale" in message and "stale=" not in message
    again = ["--reclaim-stale", *p12_args(rsa_client, "dead", password_file)]
    assert cli(cli_env, "preauth", *again).returncode == 0
    assert cli(cli_env, "kill", "--label", "dead").returncode == 0


def test_doctor_fails_for_a_missing_module(cli_env: dict[str, str]) -> None:
    done = cli({**cli_env, "KEYCHAIN_EXT_MODULE": "/nonexistent/module.so"}, "doctor")
    assert done.returncode == 1
    assert "[FAIL] PKCS#11 module /nonexistent/module.so" in done.stdout


def test_doctor_under_json(cli_env: dict[str, str]) -> None:
    """--json: one object whose "ok" is the exit status and whose checks say
    what failed and why."""
    good = cli(cli_env, "doctor", "--json")
    report = json.loads(good.stdout)
    assert good.returncode == 0 and report["ok"] is True, good.stdout
    assert all(c["ok"] for c in report["checks"] if "optional" not in c["what"])
    bad = cli({**cli_env, "KEYCHAIN_EXT_MODULE": "/nonexistent/module.so"}, "doctor", "--json")
    report = json.loads(bad.stdout)
    assert bad.returncode == 1 and report["ok"] is False
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed[0]["what"] == "PKCS#11 module /nonexistent/module.so"
    assert "KEYCHAIN_EXT_MODULE" in failed[0]["hint"]


def test_every_cli_hint_translates_a_real_message() -> None:
    """CLI_HINTS rewrites the library's wording: each Python phrase must
    still be one the C layer or the façade writes, or it silently stops
    translating."""
    from keychain_ext.cli import CLI_HINTS

    import keychain_ext

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    if not csrc.is_dir():
        pytest.skip("reads the C sources: run from a checkout (make test does)")
    package = Path(keychain_ext.__file__).parent  # the one under test
    sources = [*package.glob("*.py"), *csrc.glob("*.c")]
    text = "".join(p.read_text() for p in sources if p.name != "cli.py")
    text = re.sub(r'"\s*\n\s*f?"', "", text)  # adjacent string literals joined
    assert [python for python, _ in CLI_HINTS if python not in text] == []
