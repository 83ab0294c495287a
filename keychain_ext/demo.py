"""The whole job, end to end: ``python -m keychain_ext.demo`` (``make demo``).

Makes a throwaway CA, server certificate and client PKCS#12; starts an
HTTPS server on 127.0.0.1 that requires a client certificate from that CA;
pre-authorizes the client identity in the embedded token; POSTs JSON through
curl with it; removes it; shows the token no longer holds it and that the
same request now fails.  Needs the ``cryptography`` package and curl.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .curl import client_env, curl_args
from .keychain import Identity, Keychain
from .testing.pki import make_client, make_pki
from .testing.server import MTLSServer

BODY = {"hello": "mutual TLS", "from": "keychain_ext demo"}


def step(n: int, text: str) -> None:
    print(f"[{n}/8] {text}", flush=True)


def post(url: str, ca: Path, ident: Identity) -> subprocess.CompletedProcess[str]:
    argv = ["curl", "-sS", "--fail", "--cacert", str(ca), *curl_args(ident)]
    argv += ["-H", "Content-Type: application/json", "-d", json.dumps(BODY), url]
    return subprocess.run(argv, env=client_env(ident), capture_output=True, text=True, timeout=60)


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
        pki = make_pki(tmp)
        client = make_client(pki, cn="demo-client", password=password, key_type="ec")
        with MTLSServer(pki) as server, Keychain() as kc:
            step(2, f"HTTPS server on {server.url} requires a client certificate from that CA")
            step(3, f"embedded store: token '{kc.token}' via {kc.module}")
            ident = kc.preauth_key(client.p12, password, label)
            try:
                step(
                    4,
                    f"pre-authorized {client.p12.name} as '{label}': certificate + key "
                    f"({ident.key_type}, key id {ident.key_id.hex()[:16]}...)",
                )
                step(5, f"POST {json.dumps(BODY)} through curl --engine pkcs11")
                result = post(server.url, pki.ca_cert, ident)
                if result.returncode != 0:
                    print(f"      curl failed ({result.returncode}): {result.stderr.strip()}")
                    return 1
                answer = json.loads(result.stdout)
                print(f"      server answered: {result.stdout.strip()}")
                if answer.get("client_cn") != client.cn:
                    print("      the server did not see our client certificate")
                    return 1
            finally:
                step(6, f"removing '{label}': certificate, then private key")
                kc.kill_key(label, missing_ok=True)
            left = [i.label for i in kc.items() if i.label == label]
            step(7, f"the token holds {left or 'nothing'} under '{label}'")
            again = post(server.url, pki.ca_cert, ident)
            step(8, f"the same request now fails: curl exit {again.returncode}")
            print(f"      {again.stderr.strip().splitlines()[-1] if again.stderr else ''}")
            if left or again.returncode == 0:
                return 1
    print(f"== done in {time.monotonic() - started:.1f}s: server stopped, nothing left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
