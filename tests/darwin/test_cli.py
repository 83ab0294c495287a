"""The ``keychain-ext`` command on the macOS backend, against the
Security.framework TEST DOUBLE (conftest.py: the one acceptable double).
The double's store lives in this process, so the CLI runs in-process
(``cli.main``); ``run``'s child is a real process that reports what it got."""

from __future__ import annotations

import json
import os
import sys

import pytest

from keychain_ext import cli

from .conftest import KEY_ID, PASSWORD, calls, count, lib, owner_text, record, store_empty


@pytest.fixture
def files(tmp_path, make_p12):
    p12 = tmp_path / "alice.p12"
    p12.write_bytes(make_p12())
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    pw.chmod(0o600)
    return p12, pw


def test_preauth_lookup_list_kill(files, capsys):
    p12, pw = files
    assert (
        cli.main(["preauth", "--p12", str(p12), "--label", "alice", "--password-file", str(pw)])
        == 0
    )
    assert "held=1" in (record("alice") or "")  # outlives the command
    capsys.readouterr()
    assert cli.main(["lookup", "--label", "alice", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["key_id"] == KEY_ID.hex() and info["keychain"] == "(default search list)"
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "held until killed" in out and "1 identities" in out
    assert cli.main(["kill", "--label", "alice"]) == 0
    assert store_empty()


@pytest.mark.parametrize(
    ("setup", "argv", "code"),
    [
        ("none", ["kill", "--label", "nobody"], 4),
        ("none", ["lookup", "--label", "nobody"], 4),
        ("foreign", ["kill", "--label", "alice"], 13),
        (
            "foreign",
            ["preauth", "--p12", "{p12}", "--label", "alice", "--password-file", "{pw}"],
            3,
        ),
        (
            "wrong-pw",
            ["preauth", "--p12", "{p12}", "--label", "alice", "--password-file", "{pw}"],
            5,
        ),
        (
            "corrupt",
            ["preauth", "--p12", "{p12}", "--label", "alice", "--password-file", "{pw}"],
            7,
        ),
    ],
    ids=[
        "kill-missing",
        "lookup-missing",
        "kill-foreign",
        "duplicate",
        "wrong-password",
        "corrupt",
    ],
)
def test_errors_exit_with_their_codes(files, capsys, setup, argv, code):
    p12, pw = files
    if setup == "foreign":
        lib.dbl_put(b"alice", b"\x07" * 20, 20, 0, 1, 1)
    elif setup == "wrong-pw":
        pw.write_text("not-the-password")
    elif setup == "corrupt":
        p12.write_bytes(b"\x30\x03\x02\x01\x03garbage")
    argv = [a.format(p12=p12, pw=pw) for a in argv]
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "keychain-ext: error:" in err and "not-the-password" not in err
    if setup == "foreign":
        assert (count("c"), count("k"), count("g")) == (1, 1, 0)
        lib.dbl_reset()
    else:
        assert store_empty()


REPORT = """import json, os, sys
json.dump({"argv": sys.argv, "env": dict(os.environ)}, open(os.environ["REPORT"], "w"))
sys.exit(int(os.environ.get("STATUS", "0")))
"""


@pytest.fixture
def fake_curl(tmp_path, monkeypatch):
    """A `curl` first on PATH that reports its argv and environment."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    curl = bindir / "curl"
    curl.write_text(f"#!{sys.executable}\n{REPORT}")
    curl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("REPORT", str(tmp_path / "report.json"))
    return tmp_path / "report.json"


def test_run_hands_curl_the_keychain_nickname_and_no_secret(files, fake_curl, monkeypatch):
    p12, _pw = files
    monkeypatch.setenv("KEYCHAIN_EXT_P12_PASSWORD", PASSWORD)
    lib.dbl_log_clear()
    argv = ["run", "--p12", str(p12), "--label", "alice", "--", "curl", "https://example.test/"]
    assert cli.main(argv) == 0
    report = json.loads(fake_curl.read_text())
    assert report["argv"][1:] == ["--cert", "alice", "https://example.test/"]
    assert report["env"]["CURL_SSL_BACKEND"] == "secure-transport"
    assert report["env"]["KEYCHAIN_EXT_LABEL"] == "alice"
    assert "KEYCHAIN_EXT_P12_PASSWORD" not in report["env"]
    assert PASSWORD not in json.dumps(report)
    log = calls()
    imported = next(i for i, c in enumerate(log) if c.startswith("SecPKCS12Import"))
    deleted = next(i for i, c in enumerate(log) if c.startswith("SecItemDelete(certificate"))
    assert imported < deleted
    assert store_empty()


def test_run_placeholders_and_exit_status(files, fake_curl, tmp_path, monkeypatch):
    p12, pw = files
    monkeypatch.setenv("STATUS", "3")
    script = tmp_path / "client.py"
    script.write_text(REPORT)
    argv = ["run", "--p12", str(p12), "--label", "alice", "--password-file", str(pw)]
    assert cli.main([*argv, "--", sys.executable, str(script), "--cert={cert}"]) == 3
    report = json.loads(fake_curl.read_text())
    assert report["argv"][1:] == ["--cert=alice"]
    assert store_empty()  # removed although the child failed


def test_run_refuses_a_taken_label_and_runs_nothing(files, fake_curl):
    p12, pw = files
    lib.dbl_put(b"alice", b"\x07" * 20, 20, 0, 1, 1)
    argv = ["run", "--p12", str(p12), "--label", "alice", "--password-file", str(pw), "--", "curl"]
    assert cli.main(argv) == 3
    assert not fake_curl.exists()
    assert (count("c"), count("k")) == (1, 1)
    lib.dbl_reset()


def test_purge_and_forced_kill(files, capsys):
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lib.dbl_put(b"alice", KEY_ID, 20, 0, 1, 1)
    text = owner_text(proc.pid, key_id=KEY_ID).encode()
    lib.dbl_put_record(b"keychain_ext", b"alice", text, len(text), 0)
    lib.dbl_put(b"bob", b"\x0b" * 20, 20, 0, 1, 1)  # the user's own
    assert cli.main(["purge"]) == 0
    assert "would remove: alice" in capsys.readouterr().out
    assert count("g") == 1
    assert cli.main(["purge", "--yes"]) == 0
    assert (count("c"), count("k"), count("g")) == (1, 1, 0)
    assert cli.main(["kill", "--label", "bob"]) == 13
    assert cli.main(["kill", "--label", "bob", "--force"]) == 0
    assert store_empty()
