"""Every Python example of README.md runs as pasted: each fenced ``python``
block in a fresh interpreter, with the environment the examples name
(CLIENT_P12, CLIENT_P12_PASSWORD, SERVER_URL, SERVER_CA; MODULE, TOKEN,
PIN_FILE), against a server that demands a client certificate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Token
from .pki import PKI, ClientIdentity
from .servers import MTLSServer

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


@pytest.fixture(scope="module")
def server(pki: PKI) -> Iterator[MTLSServer]:
    with MTLSServer(pki) as srv:
        yield srv


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(
    index: int,
    token: Token,
    pki: PKI,
    server: MTLSServer,
    rsa_client: ClientIdentity,
    tmp_path: Path,
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin)
    pin_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}  # the embedded store
    env.update(
        KEYCHAIN_EXT_HOME=str(tmp_path / "home"),
        CLIENT_P12=str(rsa_client.p12),
        CLIENT_P12_PASSWORD=rsa_client.password,
        SERVER_URL=server.url,
        SERVER_CA=str(pki.ca_cert),
        MODULE=token.module,
        TOKEN=token.label,
        PIN_FILE=str(pin_file),
    )
    code = BLOCKS[index]
    if 'os.environ["MODULE"]' in code:  # the test token, not the embedded store
        env["SOFTHSM2_CONF"] = os.environ["SOFTHSM2_CONF"]
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"README example {index + 1}:\n{code}\n{done.stderr}"
    if "SERVER_URL" in code:  # it talked to the server as the client
        assert f'"client_cn": "{rsa_client.cn}"' in done.stdout.replace("'", '"')
