"""The whole job, end to end: ``python examples/demo.py`` (``make demo``).

Makes a throwaway CA (trustme), a server certificate and a client PKCS#12
(cryptography); starts an HTTPS server on 127.0.0.1 that requires a client
certificate from that CA (``ssl.CERT_REQUIRED``); pre-authorizes the client
identity in keychain_ext's embedded token; POSTs JSON through curl with it
(the key stays in the token: OpenSSL 3's pkcs11 provider, or OpenSSL's pkcs11
engine where the provider is not installed); removes it; shows the token no
longer holds it and that the same request now fails.  Needs keychain_ext,
the ``demo`` extra (trustme, cryptography) and curl.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from keychain_ext import Identity, Keychain
from keychain_ext.curl import client_env, curl_args

Command = tuple[list[str], dict[str, str]]
BODY = {"hello": "mutual TLS", "from": "keychain_ext demo"}
CLIENT_CN = "demo-client"


class Handler(BaseHTTPRequestHandler):
    """Answers a POST with the verified client's CN and the JSON it sent."""

    def do_POST(self) -> None:
        assert isinstance(self.connection, ssl.SSLSocket)
        peer = self.connection.getpeercert() or {}
        subject = dict(pair for rdn in peer.get("subject", ()) for pair in rdn)
        posted = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        data = json.dumps({"client_cn": subject.get("commonName"), "json": posted}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MTLSServer(ThreadingHTTPServer):
    """HTTPS on 127.0.0.1 (a free port) that requires a client certificate."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__(("127.0.0.1", 0), Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)  # the handshake runs in the connection's thread
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # refused handshakes are the point


def step(n: int, text: str) -> None:
    print(f"[{n}/8] {text}", flush=True)


def make_files(tmp: Path, password: str) -> tuple[trustme.CA, Path, Path]:
    """A trustme CA (its PEM written for curl) and a client PKCS#12 file."""
    ca = trustme.CA()
    ca_pem = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    client = ca.issue_cert(CLIENT_CN, common_name=CLIENT_CN)
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), None)
    cert = x509.load_pem_x509_certificate(client.cert_chain_pems[0].bytes())
    p12 = tmp / "client.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            CLIENT_CN.encode(),
            key,  # type: ignore[arg-type]
            cert,
            None,
            serialization.BestAvailableEncryption(password.encode()),
        )
    )
    p12.chmod(0o600)
    return ca, ca_pem, p12


def curl_command(url: str, ca_pem: Path, ident: Identity, tmp: Path) -> tuple[str, Command]:
    """The route, and curl's argv and environment for a POST with ``ident``.

    The provider's files are copied into ``tmp`` (they hold no secret: the
    key's PEM names it in the token), so that the very same command can be
    run again once the identity is killed."""
    env = client_env(ident)
    if "KEYCHAIN_EXT_KEY" in env:  # OpenSSL 3's pkcs11 provider: the default route
        route = "OpenSSL 3's pkcs11 provider (--cert PEM, --key naming the token's key)"
        for name in ("KEYCHAIN_EXT_CERT", "KEYCHAIN_EXT_KEY", "OPENSSL_CONF"):
            env[name] = shutil.copy(env[name], tmp)
        tls = ["--cert", env["KEYCHAIN_EXT_CERT"], "--key", env["KEYCHAIN_EXT_KEY"]]
    else:  # no provider here: the engine, named by PKCS#11 URIs
        route = "curl --engine pkcs11 (no pkcs11 provider installed)"
        tls = curl_args(ident)
    argv = ["curl", "-sS", "--fail", "--cacert", str(ca_pem), *tls]
    argv += ["-H", "Content-Type: application/json", "-d", json.dumps(BODY), url]
    return route, (argv, env)


def post(command: Command) -> subprocess.CompletedProcess[str]:
    argv, env = command
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def main() -> int:
    started = time.monotonic()
    if not shutil.which("curl"):
        print("curl is not installed (apt-get install curl)", file=sys.stderr)
        return 1
    label = f"keychain-ext-demo-{os.getpid()}"
    password = "demo-password"
    print("== keychain_ext demo: a mutual-TLS POST with a pre-authorized identity")
    with tempfile.TemporaryDirectory(prefix="keychain-ext-demo-") as tmp:
        step(1, f"making a throwaway CA, server certificate and client .p12 in {tmp}")
        ca, ca_pem, p12 = make_files(Path(tmp), password)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)  # the CA is the only trust anchor
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        server = MTLSServer(context)
        url = f"https://127.0.0.1:{server.server_address[1]}/"
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            with Keychain() as kc:
                step(2, f"HTTPS server on {url} requires a client certificate from that CA")
                step(3, f"embedded store: token '{kc.token}' via {kc.module}")
                ident = kc.preauth_key(p12, password, label)
                try:
                    step(
                        4,
                        f"pre-authorized {p12.name} as '{label}': certificate + key "
                        f"({ident.key_type}, key id {ident.key_id.hex()[:16]}...)",
                    )
                    route, command = curl_command(url, ca_pem, ident, Path(tmp))
                    step(5, f"POST {json.dumps(BODY)} through curl, {route}")
                    result = post(command)
                    if result.returncode != 0:
                        print(f"      curl failed ({result.returncode}): {result.stderr.strip()}")
                        return 1
                    print(f"      server answered: {result.stdout.strip()}")
                    if json.loads(result.stdout).get("client_cn") != CLIENT_CN:
                        print("      the server did not see our client certificate")
                        return 1
                finally:
                    step(6, f"removing '{label}': certificate, then private key")
                    kc.kill_key(label, missing_ok=True)
                left = [i.label for i in kc.items() if i.label == label]
                step(7, f"the token holds {left or 'nothing'} under '{label}'")
                again = post(command)
                step(8, f"the same request now fails: curl exit {again.returncode}")
                print(f"      {again.stderr.strip().splitlines()[-1] if again.stderr else ''}")
                if left or again.returncode == 0:
                    return 1
        finally:
            server.shutdown()
            thread.join()
            server.server_close()
    print(f"== done in {time.monotonic() - started:.1f}s: server stopped, nothing left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
