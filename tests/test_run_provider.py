"""`keychain-ext run` hands the identity to any OpenSSL 3 program through
the pkcs11 provider: curl, openssl s_client and Python children, bare and
wrapped (timeout, env, sh -c), get KEYCHAIN_EXT_CERT, KEYCHAIN_EXT_KEY and
an OPENSSL_CONF that loads the provider; nginx, demanding a client
certificate, sees the right DN; every child exits cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keychain_ext._provider import problem

from . import test_cli
from .conftest import Token
from .pki import PKI, ClientIdentity
from .servers import NginxServer

if problem() is not None:  # install-deps installs it; CI must not skip
    pytestmark = pytest.mark.skipif(not os.environ.get("CI"), reason=str(problem()))

CURL = 'curl -sS --fail --cacert "$CA" --cert "$KEYCHAIN_EXT_CERT" --key "$KEYCHAIN_EXT_KEY" "$URL"'
OPENSSL = (  # bash: pipefail, so a crash of openssl at exit fails the test
    "set -o pipefail; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | "
    "openssl s_client -quiet -verify_return_error "
    '-CAfile "$CA" -cert "$KEYCHAIN_EXT_CERT" -key "$KEYCHAIN_EXT_KEY" '
    '-connect "$CONNECT" 2>/dev/null | tail -n 1'
)
PYTHON = """
import os, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=os.environ["CA"])
ctx.load_cert_chain(os.environ["KEYCHAIN_EXT_CERT"], os.environ["KEYCHAIN_EXT_KEY"])
with urllib.request.urlopen(os.environ["URL"], context=ctx, timeout=30) as answer:
    sys.stdout.write(answer.read().decode())
"""

COMMANDS = {
    "curl bare": ["curl", "-sS", "--fail", "--cacert", "{ca}", "{url}"],
    "curl sh -c": ["sh", "-c", CURL],
    "curl timeout env sh -c": ["timeout", "60", "env", "X=1", "sh", "-c", CURL],
    "openssl bash -c": ["bash", "-c", OPENSSL],
    "openssl timeout bash -c": ["timeout", "60", "bash", "-c", OPENSSL],
    "python bare": [sys.executable, "-c", PYTHON],
    "python timeout env": ["timeout", "60", "env", "X=1", sys.executable, "-c", PYTHON],
}


@pytest.fixture(scope="module")
def nginx(pki: PKI) -> Iterator[NginxServer]:
    with NginxServer(pki) as server:
        yield server


@pytest.fixture(autouse=True)
def token_left_empty(token: Token) -> Iterator[None]:
    yield
    assert token.objects() == []


cli_env = test_cli.cli_env  # test_cli's fixture serves here too


@pytest.fixture(scope="module")
def env(cli_env: dict[str, str], pki: PKI) -> dict[str, str]:
    return {**cli_env, "CA": str(pki.ca_cert)}


def run(
    env: dict[str, str], client: ClientIdentity, label: str, command: list[str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keychain_ext", "run", "--p12", str(client.p12)]
        + ["--label", label, "--password-env", "PW", "--", *command],
        env={**env, "PW": client.password},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_run_hands_the_identity_to_the_child(
    env: dict[str, str], nginx: NginxServer, ec_client: ClientIdentity, name: str
) -> None:
    command = [a.replace("{ca}", env["CA"]).replace("{url}", nginx.url) for a in COMMANDS[name]]
    env = {**env, "URL": nginx.url, "CONNECT": f"127.0.0.1:{nginx.port}"}
    done = run(env, ec_client, "run & co; 100%", command)
    assert done.returncode == 0, done.stderr  # no crash at exit either
    assert json.loads(done.stdout) == {"client": f"CN={ec_client.cn}"}


CHILD_ENV = """
import json, os, sys
env = dict(os.environ)
names = ("KEYCHAIN_EXT_CERT", "KEYCHAIN_EXT_KEY", "OPENSSL_CONF")
print(json.dumps({k: env.get(k) for k in names}))
print(json.dumps(env))
"""


def test_child_environment_and_merged_configuration(
    env: dict[str, str], ec_client: ClientIdentity, token: Token, tmp_path: Path
) -> None:
    """The child's OPENSSL_CONF includes the one it had; no secret reaches it."""
    own = tmp_path / "own.cnf"
    own.write_text(
        "openssl_conf = init\n[init]\nproviders = provs\n"
        "[provs]\ndefault = dflt\n[dflt]\nactivate = 1\n"
    )
    done = run(
        {**env, "OPENSSL_CONF": str(own)}, ec_client, "envs", [sys.executable, "-c", CHILD_ENV]
    )
    assert done.returncode == 0, done.stderr
    first, whole = done.stdout.splitlines()
    files = json.loads(first)
    assert files["KEYCHAIN_EXT_KEY"].startswith(str(Path(files["OPENSSL_CONF"]).parent))
    # gone with the identity once run ends
    assert not any(Path(p).exists() for p in files.values())
    assert token.pin not in whole and ec_client.password not in whole


def test_merged_configuration_text(tmp_path: Path) -> None:
    """Merging adds the provider to the list the user's file activates, or
    its own list and init section where the file has none."""
    from keychain_ext._provider import NAME, config

    own = tmp_path / "own.cnf"
    own.write_text(
        "openssl_conf = init\n[init]\nproviders = provs\n[provs]\ndefault = d\n[d]\nactivate = 1\n"
    )
    text = config("/lib/m.so", None, str(own))
    assert f'.include "{own}"' in text and f"[provs]\n{NAME} = {NAME}_sect" in text
    bare = tmp_path / "bare.cnf"
    bare.write_text("HOME = .\n")
    text = config("/lib/m.so", None, str(bare))
    assert "[default]\nopenssl_conf = keychain_ext_init" in text
    assert "[keychain_ext_providers]\ndefault = keychain_ext_default" in text
    for conf in (own, bare):  # OpenSSL itself reads the result and loads the provider
        path = tmp_path / f"merged-{conf.name}"
        path.write_text(config("/lib/m.so", None, str(conf)))
        listed = subprocess.run(
            ["openssl", "list", "-providers"],
            env={**os.environ, "OPENSSL_CONF": str(path)},
            capture_output=True,
            text=True,
        )
        assert listed.returncode == 0, listed.stderr
        assert NAME in listed.stdout and "default" in listed.stdout


# Debian 13's openssl.cnf: the default provider listed, not activated (OpenSSL
# loads it implicitly only while no provider is activated explicitly).
LISTED_NOT_ACTIVE = (
    "openssl_conf = init\n[init]\nproviders = provs\n[provs]\ndefault = d\n[d]\n# activate = 1\n"
)


def active_providers(conf: Path) -> set[str]:
    listed = subprocess.run(
        ["openssl", "list", "-providers"],
        env={**os.environ, "OPENSSL_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    return {line.strip() for line in listed.stdout.splitlines() if line.startswith("  ") and
            not line.startswith("   ")}  # fmt: skip


@pytest.mark.parametrize(
    "included, default_active",
    [
        (LISTED_NOT_ACTIVE, True),  # the child had it implicitly: it keeps it
        ("openssl_conf = init\n[init]\nproviders = provs\n[provs]\nother = o\n[o]\n", True),
        # the file activates another provider explicitly: the child never had
        # the default one, and does not get it from us either
        ("openssl_conf = init\n[init]\nproviders = provs\n[provs]\nbase = b\n[b]\nactivate = 1\n",
         False),
    ],
)  # fmt: skip
def test_merged_configuration_keeps_the_implicit_default_provider(
    tmp_path: Path, included: str, default_active: bool
) -> None:
    from keychain_ext._provider import NAME, config

    own = tmp_path / "own.cnf"
    own.write_text(included)
    merged = tmp_path / "merged.cnf"
    merged.write_text(config("/lib/m.so", None, str(own)))
    providers = active_providers(merged)
    assert NAME in providers
    assert ("default" in providers) == default_active, providers


def test_curl_through_the_provider_with_debian_13s_configuration(
    env: dict[str, str], nginx: NginxServer, ec_client: ClientIdentity, tmp_path: Path
) -> None:
    """Debian 13 regression: with the default provider only listed, the
    merged configuration left curl without a random generator ("curl: (35)
    Insufficient randomness")."""
    own = tmp_path / "debian13.cnf"
    own.write_text(LISTED_NOT_ACTIVE)
    command = [
        a.replace("{ca}", env["CA"]).replace("{url}", nginx.url) for a in COMMANDS["curl bare"]
    ]
    done = run({**env, "OPENSSL_CONF": str(own)}, ec_client, "debian13", command)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"client": f"CN={ec_client.cn}"}


def test_bare_curl_falls_back_to_the_engine_without_the_provider(
    env: dict[str, str], nginx: NginxServer, ec_client: ClientIdentity, tmp_path: Path
) -> None:
    no_provider = {**env, "OPENSSL_MODULES": str(tmp_path)}  # no pkcs11.so there
    done = run(no_provider, ec_client, "engine", ["sh", "-c", 'test -z "$KEYCHAIN_EXT_KEY"'])
    assert done.returncode == 0, done.stderr  # no provider files for the child ...
    done = run(no_provider, ec_client, "engine", ["curl", "-sS", "--cacert", env["CA"], nginx.url])
    assert done.returncode == 0, done.stderr  # ... a bare one the engine arguments
    assert json.loads(done.stdout) == {"client": f"CN={ec_client.cn}"}


LABEL = "a&b;c/d%e f?\u00e9\u6f22"  # every kind of character a URI must encode


def test_env_and_cert_for_another_shell(
    env: dict[str, str],
    token: Token,
    nginx: NginxServer,
    ec_client: ClientIdentity,
    tmp_path: Path,
) -> None:
    """`env LABEL` prints what another shell needs (provider and engine
    routes, no secret), `cert LABEL` the certificate; a relative --pin-file
    works from anywhere; kill removes the files `env` left."""
    from cryptography import x509

    (tmp_path / "pin").write_text(token.pin)
    (tmp_path / "pin").chmod(0o600)
    shell = {k: v for k, v in env.items() if k != "KEYCHAIN_EXT_PIN_FILE"}
    cli = [sys.executable, "-m", "keychain_ext", "--pin-file", "pin"]

    def keychain_ext(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], env=shell, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )

    pw = {**shell, "PW": ec_client.password}
    done = subprocess.run(
        [*cli, "preauth", "--p12", str(ec_client.p12), "--label", LABEL, "--password-env", "PW"],
        env=pw,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    try:
        exports = keychain_ext("env", LABEL)
        assert exports.returncode == 0, exports.stderr
        assert token.pin not in exports.stdout
        provider = 'curl -sS --cert "$KEYCHAIN_EXT_CERT" --key "$KEYCHAIN_EXT_KEY"'
        engine = (
            'curl -sS --engine pkcs11 --cert-type ENG --cert "$KEYCHAIN_EXT_CERT_URI" '
            '--key-type ENG --key "$KEYCHAIN_EXT_KEY_URI"'
        )
        for curl in (provider, engine):
            script = f'{exports.stdout}\n{curl} --cacert "$CA" "$1"'
            used = subprocess.run(
                ["sh", "-c", script, "sh", nginx.url],
                env={"PATH": os.environ["PATH"], "CA": env["CA"]},  # another shell: only that
                cwd="/",
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert used.returncode == 0, used.stderr
            assert json.loads(used.stdout) == {"client": f"CN={ec_client.cn}"}, curl
        printed = keychain_ext("cert", LABEL)
        assert keychain_ext("cert", LABEL, "-o", "out.pem").returncode == 0
        assert (tmp_path / "out.pem").read_text() == printed.stdout
        cert = x509.load_pem_x509_certificate(printed.stdout.encode())
        assert cert.subject.rfc4514_string() == f"CN={ec_client.cn}"
        files = ("export KEYCHAIN_EXT_CERT", "export KEYCHAIN_EXT_KEY", "export OPENSSL_CONF")
        lines = [line.split("=", 1) for line in exports.stdout.splitlines()]
        left = [Path(v.strip("'")) for k, v in lines if k in files]
        assert len(left) == 3 and all(p.exists() for p in left)
    finally:
        assert keychain_ext("kill", "--label", LABEL).returncode == 0
    assert not any(p.exists() for p in left)


def test_doctor_says_which_routes_work(env: dict[str, str], tmp_path: Path) -> None:
    def doctor(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keychain_ext", "doctor"],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = doctor({})
    assert done.returncode == 0, done.stdout
    assert "[ok] OpenSSL 3 pkcs11 provider" in done.stdout
    assert "[ok] OpenSSL pkcs11 engine" in done.stdout
    missing = doctor({"OPENSSL_MODULES": str(tmp_path)})  # no pkcs11.so there
    assert missing.returncode == 0, missing.stdout  # the engine route still works
    assert "[FAIL] OpenSSL 3 pkcs11 provider" in missing.stdout
    assert "apt-get install pkcs11-provider" in missing.stdout
