"""The whole job with real TLS: curl (CLI) and pycurl (in process) POST with
a pre-authorized identity to servers that require client certificates."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keychain_ext import InteractionNotAllowedError, Keychain
from keychain_ext.curl import client_env, curl_args, engine_problem, pycurl_problem, setup_pycurl
from keychain_ext.errors import UnimplementedError
from keychain_ext.keychain import Identity

from .conftest import Token
from .pki import PKI, ClientIdentity
from .servers import MTLSServer, NginxServer


@pytest.fixture(scope="module")
def server(pki: PKI) -> Iterator[MTLSServer]:
    with MTLSServer(pki) as srv:
        yield srv


def curl_post(
    url: str, pki: PKI, ident: Identity, body: str = '{"n": 1}'
) -> subprocess.CompletedProcess[str]:
    argv = ["curl", "-sS", "--fail", "--cacert", str(pki.ca_cert), *curl_args(ident)]
    argv += ["-H", "Content-Type: application/json", "-d", body, url]
    return subprocess.run(argv, env=client_env(ident), capture_output=True, text=True, timeout=60)


def require_pycurl() -> None:
    problem = pycurl_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)


def require_engine() -> None:
    problem = engine_problem()
    if problem:
        pytest.skip(problem)


@pytest.mark.parametrize(
    "which", ["rsa_client", "ec_client", "variants.legacy", "variants.openssl_default"]
)
def test_curl_post_with_identity_then_fails_after_kill(
    kc: Keychain,
    token: Token,
    pki: PKI,
    server: MTLSServer,
    which: str,
    request: pytest.FixtureRequest,
) -> None:
    if which.startswith("variants."):
        p12 = getattr(request.getfixturevalue("variants"), which.split(".")[1])
        client: ClientIdentity = request.getfixturevalue("rsa_client")
    else:
        client = request.getfixturevalue(which)
        p12 = client.p12
    ident = kc.preauth_key(p12, client.password, "curl-post")
    try:
        done = curl_post(server.url, pki, ident)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {
            "client_cn": client.cn,
            "method": "POST",
            "path": "/",
            "json": {"n": 1},
        }
    finally:
        kc.kill_key("curl-post")
    after = curl_post(server.url, pki, ident)
    assert after.returncode != 0 and "client_cn" not in after.stdout
    assert token.objects() == []


def test_nginx_requires_and_gets_the_client_cert(
    kc: Keychain, pki: PKI, ec_client: ClientIdentity
) -> None:
    with (
        NginxServer(pki) as nginx,
        kc.preauthorized(ec_client.p12, ec_client.password, "ng") as ident,
    ):
        done = curl_post(nginx.url, pki, ident)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"client": f"CN={ec_client.cn}"}


class HoldServer:
    """Accepts one TCP connection and holds it without answering, so a curl
    stays alive (with its key loaded) until the test lets it go."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self.conn: socket.socket | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.conn, _ = self.sock.accept()
        self.accepted.set()

    def close(self) -> None:
        if self.conn:
            self.conn.close()
        self.sock.close()


def test_no_pin_in_the_running_curls_argv_or_environment(
    kc: Keychain, token: Token, pki: PKI, ec_client: ClientIdentity
) -> None:
    hold = HoldServer()
    with kc.preauthorized(ec_client.p12, ec_client.password, "argv") as ident:
        argv = ["curl", "-sS", "--cacert", str(pki.ca_cert), *curl_args(ident)]
        argv += ["--max-time", "60", f"https://127.0.0.1:{hold.port}/"]
        proc = subprocess.Popen(argv, env=client_env(ident), stderr=subprocess.PIPE)
        try:
            assert hold.accepted.wait(30), "curl never connected"
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        finally:
            hold.close()
            proc.wait(60)
    assert b"pin-source=file:" in cmdline  # the PIN's file, not the PIN
    assert token.pin.encode() not in cmdline
    assert token.pin.encode() not in environ
    assert b"pin-value" not in cmdline


def test_ephemeral_identity_cannot_go_to_another_process(
    kc: Keychain, ec_client: ClientIdentity
) -> None:
    with kc.preauthorized(ec_client.p12, ec_client.password, "eph", ephemeral=True) as ident:
        with pytest.raises(InteractionNotAllowedError, match="ephemeral"):
            curl_args(ident)
        with pytest.raises(InteractionNotAllowedError):
            client_env(ident)


PYCURL_ROUTE = """
import io, json, sys
import pycurl
from keychain_ext import Keychain
from keychain_ext.curl import setup_pycurl
module, token, p12, url, ca, route, ephemeral = sys.argv[1:8]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
with Keychain(module, token, pin) as kc:
    with kc.preauthorized(p12, password, "pyc", ephemeral=ephemeral == "1") as ident:
        handle, buf = pycurl.Curl(), io.BytesIO()
        setup_pycurl(handle, ident, route=route)
        handle.setopt(pycurl.URL, url)
        handle.setopt(pycurl.CAINFO, ca)
        handle.setopt(pycurl.POSTFIELDS, '{"in": "process"}')
        handle.setopt(pycurl.HTTPHEADER, ["Content-Type: application/json"])
        handle.setopt(pycurl.WRITEDATA, buf)
        handle.perform()
        code = handle.getinfo(pycurl.RESPONSE_CODE)
        handle.close()
    answer = json.loads(buf.getvalue())
    print(json.dumps({"code": code, "cn": answer["client_cn"], "json": answer["json"],
                      "after": kc.lookup("pyc")}))
"""


@pytest.mark.parametrize("ephemeral", [False, True], ids=["token", "ephemeral"])
@pytest.mark.parametrize("route", ["provider", "engine"])
def test_pycurl_in_process(
    token: Token,
    pki: PKI,
    server: MTLSServer,
    rsa_client: ClientIdentity,
    route: str,
    ephemeral: bool,
) -> None:
    """pycurl in the process that holds the identity, on each route, in a
    process of its own: libp11 0.4.13 finalizes the module when libcurl
    lets go of the engine, which would leave the provider of a shared
    process (this test run's) without its module."""
    require_pycurl()
    if route == "engine":
        require_engine()
    done = subprocess.run(
        [sys.executable, "-c", PYCURL_ROUTE, token.module, token.label, str(rsa_client.p12),
         server.url, str(pki.ca_cert), route, "1" if ephemeral else "0"],
        input=f"{token.pin}\n{rsa_client.password}\n",
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "code": 200, "cn": rsa_client.cn, "json": {"in": "process"}, "after": None
    }  # fmt: skip
    assert token.objects() == []


CHILD = """
import io, json, sys
import pycurl
from keychain_ext import Keychain
from keychain_ext.curl import setup_pycurl
module, token, p12, url, ca = sys.argv[1:6]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
kc = Keychain(module, token, pin)
ident = kc.preauth_key(p12, password, "eph-child", ephemeral=True)
handle, buf = pycurl.Curl(), io.BytesIO()
setup_pycurl(handle, ident)
handle.setopt(pycurl.URL, url); handle.setopt(pycurl.CAINFO, ca)
handle.setopt(pycurl.WRITEDATA, buf); handle.perform()
print(json.loads(buf.getvalue())["client_cn"], flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_ephemeral_identity_gone_when_its_process_is_killed(
    token: Token, pki: PKI, server: MTLSServer, ec_client: ClientIdentity
) -> None:
    require_pycurl()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            token.module,
            token.label,
            str(ec_client.p12),
            server.url,
            str(pki.ca_cert),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin and child.stdout
    child.stdin.write(f"{token.pin}\n{ec_client.password}\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == ec_client.cn  # it used the identity
    assert token.objects() == []  # never on the token, even while alive
    child.kill()
    assert child.wait() == -signal.SIGKILL
    assert token.objects() == []
    with Keychain(token.module, token.label, token.pin) as kc:
        assert kc.lookup("eph-child") is None


ENGINE_THEN_FINALIZE = """
import ctypes, io, json, sys
import pycurl
from keychain_ext import Keychain
from keychain_ext.curl import setup_pycurl
module, token, p12, url, ca = sys.argv[1:6]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
kc = Keychain(module, token, pin)
ident = kc.preauth_key(p12, password, "engine-unloads")
handle, buf = pycurl.Curl(), io.BytesIO()
setup_pycurl(handle, ident)
handle.setopt(pycurl.URL, url); handle.setopt(pycurl.CAINFO, ca)
handle.setopt(pycurl.WRITEDATA, buf); handle.perform()
handle.close()
# what libp11 does when its engine is destroyed (libp11 0.4.12: at OpenSSL's
# cleanup; other versions: when curl lets go of the engine)
ctypes.CDLL(module).C_Finalize(None)
kill = "ok"
try:
    kc.kill_key("engine-unloads")
except Exception as exc:
    kill = type(exc).__name__
print(json.dumps({"cn": json.loads(buf.getvalue())["client_cn"], "kill": kill,
                  "after": kc.lookup("engine-unloads")}))
kc.close()
"""


def test_kill_after_pycurl_used_the_identity_and_libp11_finalized(
    token: Token, pki: PKI, server: MTLSServer, ec_client: ClientIdentity
) -> None:
    """Real pycurl and libp11 share the module with us and sign with the
    key; then the module is finalized as libp11 does when its engine goes:
    kill_key still finds and removes the certificate and the key."""
    require_pycurl()
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_THEN_FINALIZE, token.module, token.label,
         str(ec_client.p12), server.url, str(pki.ca_cert)],
        input=f"{token.pin}\n{ec_client.password}\n",
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cn": ec_client.cn, "kill": "ok", "after": None}
    assert token.objects() == []


def test_demo_runs(tmp_path: Path) -> None:
    """examples/demo.py (make demo): the whole flow against its own server."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["KEYCHAIN_EXT_HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "examples" / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"client_cn": "demo-client"' in done.stdout
    assert "the token holds nothing" in done.stdout
    assert "the same request now fails" in done.stdout


def test_setup_pycurl_replaces_another_module_path(
    token: Token, pki: PKI, server: MTLSServer, ec_client: ClientIdentity
) -> None:
    """A PKCS11_MODULE_PATH left for another module would make the engine
    load that one: setup_pycurl sets the identity's (issue 13, item 5)."""
    require_pycurl()
    script = CHILD.replace("sys.stdin.read()  # wait to be killed", "kc.close()")
    done = subprocess.run(
        [sys.executable, "-c", script, token.module, token.label, str(ec_client.p12),
         server.url, str(pki.ca_cert)],
        input=f"{token.pin}\n{ec_client.password}\n",
        env={**os.environ, "PKCS11_MODULE_PATH": "/nonexistent/other-pkcs11.so"},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ec_client.cn
