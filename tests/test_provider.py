"""OpenSSL 3's pkcs11 provider route: Identity.ssl_context() for the
clients Python services use (urllib, requests, httpx, urllib3, aiohttp),
POSTing to servers that demand a client certificate (the test server and
nginx), for token and ephemeral identities; its files and their removal;
the typed error where the route cannot work."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from keychain_ext import Keychain
from keychain_ext._provider import problem
from keychain_ext.errors import UnimplementedError

from .conftest import Token, new_nss_token, new_token
from .pki import PKI, ClientIdentity
from .servers import MTLSServer, NginxServer

BODY = {"n": 13}

# The provider lists the module's slots once, when this process first uses
# it (an earlier test module may have): a token initialized later in the
# same process stays invisible to it.  This module's token is made at
# collection, before any test runs.
_TOKEN = new_token()


@pytest.fixture(scope="module")
def token() -> Token:
    return _TOKEN


if problem() is not None:  # install-deps installs it; CI must not skip
    pytestmark = pytest.mark.skipif(not os.environ.get("CI"), reason=str(problem()))


def post_urllib(url: str, ctx: ssl.SSLContext) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(BODY).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, context=ctx, timeout=30) as answer:
        return json.loads(answer.read())


def post_requests(url: str, ctx: ssl.SSLContext) -> Any:
    import requests
    from requests.adapters import HTTPAdapter

    class ContextAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["ssl_context"] = ctx
            super().init_poolmanager(*args, **kwargs)

    with requests.Session() as session:
        session.mount("https://", ContextAdapter())
        answer = session.post(url, json=BODY, timeout=30)
        answer.raise_for_status()
        return answer.json()


def post_httpx(url: str, ctx: ssl.SSLContext) -> Any:
    import httpx

    answer = httpx.post(url, json=BODY, verify=ctx, timeout=30)
    answer.raise_for_status()
    return answer.json()


def post_urllib3(url: str, ctx: ssl.SSLContext) -> Any:
    import urllib3

    with urllib3.PoolManager(ssl_context=ctx) as pool:
        answer = pool.request("POST", url, json=BODY, timeout=30)
        assert answer.status == 200, answer.data
        return json.loads(answer.data)


def post_aiohttp(url: str, ctx: ssl.SSLContext) -> Any:
    import aiohttp

    async def post() -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=BODY, ssl=ctx) as answer,
        ):
            answer.raise_for_status()
            return await answer.json(content_type=None)

    return asyncio.run(post())


CLIENTS: dict[str, Callable[[str, ssl.SSLContext], Any]] = {
    "urllib": post_urllib,
    "requests": post_requests,
    "httpx": post_httpx,
    "urllib3": post_urllib3,
    "aiohttp": post_aiohttp,
}


@pytest.fixture(scope="module")
def mtls(pki: PKI) -> Iterator[MTLSServer]:
    with MTLSServer(pki) as server:
        yield server


@pytest.fixture(scope="module")
def nginx(pki: PKI) -> Iterator[NginxServer]:
    with NginxServer(pki) as server:
        yield server


def expected(server: str, cn: str) -> dict[str, Any]:
    """What each server answers for a client certificate with CN ``cn``."""
    if server == "nginx":
        return {"client": f"CN={cn}"}
    return {"client_cn": cn, "method": "POST", "path": "/", "json": BODY}


@pytest.mark.parametrize("ephemeral", [False, True], ids=["token", "ephemeral"])
@pytest.mark.parametrize("server", ["mtls", "nginx"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_client_posts_with_the_identity(
    kc: Keychain,
    pki: PKI,
    rsa_client: ClientIdentity,
    client: str,
    server: str,
    ephemeral: bool,
    request: pytest.FixtureRequest,
) -> None:
    url = request.getfixturevalue(server).url
    with kc.preauthorized(rsa_client.p12, rsa_client.password, "ctx", ephemeral=ephemeral) as ident:
        ctx = ident.ssl_context(cafile=str(pki.ca_cert))
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        assert CLIENTS[client](url, ctx) == expected(server, rsa_client.cn)


@pytest.mark.parametrize("ephemeral", [False, True], ids=["token", "ephemeral"])
def test_a_context_stops_working_when_its_identity_is_killed(
    kc: Keychain, pki: PKI, mtls: MTLSServer, ec_client: ClientIdentity, ephemeral: bool
) -> None:
    """No copy of the key outlives it (the provider's key cache is off)."""
    with kc.preauthorized(ec_client.p12, ec_client.password, "gone", ephemeral=ephemeral) as ident:
        ctx = ident.ssl_context(cafile=str(pki.ca_cert))
        assert post_urllib(mtls.url, ctx) == expected("mtls", ec_client.cn)
    with pytest.raises(OSError):  # URLError or SSLError: the handshake fails
        post_urllib(mtls.url, ctx)


def test_reserved_characters_in_the_label(
    kc: Keychain, pki: PKI, mtls: MTLSServer, ec_client: ClientIdentity
) -> None:
    label = "a&b;c/d%e f?g=h\u00e9\u6f22"
    with kc.preauthorized(ec_client.p12, ec_client.password, label) as ident:
        assert ident.key_uri is not None and "&" not in ident.key_uri.split("?")[0]
        ctx = ident.ssl_context(cafile=str(pki.ca_cert))
        assert post_urllib(mtls.url, ctx) == expected("mtls", ec_client.cn)


def test_files_private_pinless_and_gone_with_the_identity(
    token: Token, pki: PKI, ec_client: ClientIdentity
) -> None:
    with token.open() as kc:
        ident = kc.preauth_key(ec_client.p12, ec_client.password, "files")
        files = ident.provider_files()
        assert oct(stat.S_IMODE(files.conf.parent.stat().st_mode)) == "0o700"
        for path in (files.cert, files.key, files.conf):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert token.pin not in path.read_text()
        assert files.key.read_text().startswith("-----BEGIN PKCS#11 PROVIDER URI-----")
        assert ident.provider_files() == files  # written once per identity
        kc.kill_key("files")
        assert not files.conf.parent.exists()
        again = kc.preauth_key(ec_client.p12, ec_client.password, "files")
        directory = again.provider_files().conf.parent
    assert not directory.exists()  # close removes what kill did not
    with token.open() as kc:
        kc.kill_key("files")  # a token identity outlives its handle's close
    assert token.objects() == []


CHILD = """
import json, sys, urllib.request
from keychain_ext import Keychain
module, token, p12, url, ca = sys.argv[1:6]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
with Keychain(module, token, pin) as kc:
    with kc.preauthorized(p12, password, "exit", ephemeral=True) as ident:
        ctx = ident.ssl_context(cafile=ca)
        with urllib.request.urlopen(url, context=ctx, timeout=30) as answer:
            print(json.loads(answer.read())["client_cn"])
"""


def test_a_process_using_the_provider_exits_cleanly(
    token: Token, pki: PKI, mtls: MTLSServer, ec_client: ClientIdentity
) -> None:
    """SoftHSM2 is destroyed before OpenSSL's exit handler runs; without the
    no-deinit quirk that handler crashes (SIGSEGV) calling into it."""
    argv = [sys.executable, "-c", CHILD, token.module, token.label, str(ec_client.p12)]
    done = subprocess.run(
        [*argv, mtls.url, str(pki.ca_cert)],
        input=f"{token.pin}\n{ec_client.password}\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout.strip()) == (0, ec_client.cn), done.stderr


NO_PROVIDER = """
import sys
from keychain_ext import Keychain
from keychain_ext.errors import UnimplementedError
module, token, p12 = sys.argv[1:4]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
with Keychain(module, token, pin) as kc:
    with kc.preauthorized(p12, password, "none") as ident:
        try:
            ident.ssl_context()
        except UnimplementedError as exc:
            print(exc)
"""


def test_a_missing_provider_is_a_typed_error_saying_what_to_do(
    token: Token, ec_client: ClientIdentity, tmp_path: Any
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_PROVIDER, token.module, token.label, str(ec_client.p12)],
        input=f"{token.pin}\n{ec_client.password}\n",
        env={**os.environ, "OPENSSL_MODULES": str(tmp_path)},  # no pkcs11.so there
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "pkcs11 provider is not installed" in done.stdout
    assert "apt-get install pkcs11-provider" in done.stdout
    assert token.objects() == []


def test_a_token_made_after_the_provider_started_is_a_typed_error(
    kc: Keychain, ec_client: ClientIdentity, pki: PKI
) -> None:
    with kc.preauthorized(ec_client.p12, ec_client.password, "first") as ident:
        ident.ssl_context(cafile=str(pki.ca_cert))  # the provider lists the tokens now
    late = new_token()
    with (
        late.open() as other,
        other.preauthorized(ec_client.p12, ec_client.password, "late") as ident,
        pytest.raises(UnimplementedError, match="does not see token"),
    ):
        ident.ssl_context()
    assert late.objects() == []


def test_an_identity_pickles_without_its_keychain(kc: Keychain, ec_client: ClientIdentity) -> None:
    import pickle

    from keychain_ext.errors import ItemNotFoundError

    with kc.preauthorized(ec_client.p12, ec_client.password, "pickled") as ident:
        copy = pickle.loads(pickle.dumps(ident))
        assert copy == ident and copy.key_uri == ident.key_uri
        with pytest.raises(ItemNotFoundError, match="Keychain that made"):
            copy.ssl_context()


NSS_CHILD = """
import json, sys, urllib.request
from keychain_ext import Keychain
module, label, init_args, p12, url, ca, ephemeral = sys.argv[1:8]
pin, password = sys.stdin.readline().strip(), sys.stdin.readline().strip()
with Keychain(module, label, pin, init_args=init_args) as kc:
    with kc.preauthorized(p12, password, "nss", ephemeral=ephemeral == "yes") as ident:
        ctx = ident.ssl_context(cafile=ca)
        with urllib.request.urlopen(url, b"{}", context=ctx, timeout=30) as answer:
            print(json.loads(answer.read())["client_cn"])
"""


@pytest.mark.parametrize("ephemeral", ["no", "yes"], ids=["token", "ephemeral"])
def test_the_provider_route_on_nss_softoken(
    pki: PKI, mtls: MTLSServer, ec_client: ClientIdentity, ephemeral: str
) -> None:
    """The second kind of token: the provider gets NSS's init string
    (pkcs11-module-init-args).  In its own process: one module per process."""
    nss = new_nss_token()
    assert nss.init_args
    done = subprocess.run(
        [sys.executable, "-c", NSS_CHILD, nss.module, nss.label, nss.init_args,
         str(ec_client.p12), mtls.url, str(pki.ca_cert), ephemeral],
        input=f"{nss.pin}\n{ec_client.password}\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ec_client.cn
    assert nss.objects() == []
