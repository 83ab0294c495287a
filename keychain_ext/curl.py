"""Hand a pre-authorized identity to curl (command line), pycurl, or any
OpenSSL 3 program in a child process.

PKCS#11 tokens: client_env hands a child OpenSSL 3's pkcs11 provider (see
keychain_ext._provider) where it is installed, and setup_pycurl loads it
into this process where pycurl shares ``ssl``'s OpenSSL: the default route.
curl_args and setup_pycurl's fallback go through OpenSSL's deprecated
``pkcs11`` engine (Debian: libengine-pkcs11-openssl) with the certificate
and key named by PKCS#11 URIs (RFC 7512).  The PIN never
travels in argv: the URIs carry ``pin-source=file:`` pointing at a 0600
file, and pycurl gets it through KEYPASSWD, in memory.

The macOS keychain: curl and libcurl with Secure Transport name the identity
by its nickname (``--cert LABEL``, CURLOPT_SSLCERT); Apple's curl carries
Secure Transport beside its default LibreSSL and CURL_SSL_BACKEND selects
it.  There is no secret to hand over.  OpenSSL-based curls (Homebrew, PyPI
pycurl wheels) cannot reach the keychain (README, "macOS").
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, Optional

from . import _provider
from ._backend import DarwinKeychain, Pkcs11Token
from .errors import (
    InteractionNotAllowedError,
    ItemNotFoundError,
    ParamError,
    UnimplementedError,
)
from .keychain import Identity

log = logging.getLogger(__name__)

ENGINE = "pkcs11"
ENGINE_INSTALL = "apt-get install libengine-pkcs11-openssl"

PYCURL_HELP = (
    "pip install --force-reinstall --no-binary pycurl pycurl "
    "(with libcurl4-openssl-dev installed): the PyPI wheel bundles its own "
    "libcurl and OpenSSL, which cannot load the system's pkcs11 engine"
)


def _token(identity: Identity, operation: str) -> Pkcs11Token:
    if not isinstance(identity.store, Pkcs11Token):
        raise UnimplementedError(
            detail=f"identity '{identity.label}' is not on a PKCS#11 token: curl's "
            "pkcs11 engine cannot reach it",
            operation=operation,
        )
    return identity.store


def _require_shared(identity: Identity, user: str) -> Pkcs11Token:
    token = _token(identity, "curl")
    if identity.ephemeral:
        raise InteractionNotAllowedError(
            detail=f"identity '{identity.label}' is ephemeral: its objects live only in "
            f"this process, so {user} cannot see them; preauthorize it with "
            "ephemeral=False, or use pycurl in this process",
            operation="curl",
        )
    return token


def curl_args(identity: Identity) -> list[str]:
    """Arguments that make the curl CLI authenticate with ``identity``.

    Raises:
        InteractionNotAllowedError: the identity is ephemeral (another
            process cannot see session objects).
        UnimplementedError: the identity is not on a PKCS#11 token.
    """
    if isinstance(identity.store, DarwinKeychain):
        return ["--cert", identity.label]  # Secure Transport's nickname
    token = _require_shared(identity, "a curl process")
    return [
        "--engine", ENGINE,
        "--cert-type", "ENG", "--cert", token.uri(identity.label, "cert"),
        "--key-type", "ENG", "--key", token.uri(identity.label, "private"),
    ]  # fmt: skip


def client_env(
    identity: Identity, base: Optional[Mapping[str, str]] = None, *, persistent: bool = False
) -> dict[str, str]:
    """The environment a child process needs to use ``identity``: ``base``
    (default: this process's) plus the token's variables, the engine's module
    path and KEYCHAIN_EXT_* variables naming the identity (documented in the
    README); where OpenSSL's pkcs11 provider can serve it (see
    Identity.provider_files) also
    KEYCHAIN_EXT_CERT (PEM certificate), KEYCHAIN_EXT_KEY (the provider's PEM
    naming the key) and OPENSSL_CONF (a configuration activating the
    provider, which includes the one this process's children would read;
    ``persistent``: see Identity.provider_files).  Holds no PIN.  macOS:
    Secure Transport selected (CURL_SSL_BACKEND), KEYCHAIN_EXT_LABEL and
    KEYCHAIN_EXT_KEYCHAIN (a keychain file, if the identity is not in the
    search list)."""
    env = dict(os.environ if base is None else base)
    if isinstance(identity.store, DarwinKeychain):
        env.update(identity.store.env)
        env["KEYCHAIN_EXT_LABEL"] = identity.label
        if identity.store.path:
            env["KEYCHAIN_EXT_KEYCHAIN"] = identity.store.path
        return env
    token = _require_shared(identity, "a child process")
    env.update(token.env)
    env.update(
        KEYCHAIN_EXT_LABEL=identity.label,
        KEYCHAIN_EXT_CERT_URI=token.uri(identity.label, "cert"),
        KEYCHAIN_EXT_KEY_URI=token.uri(identity.label, "private"),
        KEYCHAIN_EXT_ENGINE=ENGINE,
        KEYCHAIN_EXT_MODULE=token.module,
    )
    if token.lock_path:
        env["KEYCHAIN_EXT_LOCK"] = token.lock_path
    try:
        files = identity.provider_files(persistent=persistent)
    except (ItemNotFoundError, UnimplementedError):
        return env  # killed, or no provider route here: the engine's variables only
    env.update(
        KEYCHAIN_EXT_CERT=str(files.cert),
        KEYCHAIN_EXT_KEY=str(files.key),
        OPENSSL_CONF=str(files.conf),
    )
    return env


def engine_problem() -> Optional[str]:
    """Why OpenSSL's pkcs11 engine (libp11) is not there for curl, or None."""
    try:
        out = subprocess.run(
            ["openssl", "version", "-e"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "the openssl command is missing: apt-get install openssl"
    engines = out.split('"')[1] if '"' in out else ""
    if not any(os.path.exists(os.path.join(engines, n)) for n in ("pkcs11.so", "libpkcs11.so")):
        return f"OpenSSL's pkcs11 engine is not in {engines or '?'}: {ENGINE_INSTALL}"
    return None


def pycurl_problem(darwin: bool = False) -> Optional[str]:
    """Why pycurl cannot use the pkcs11 engine here (``darwin``: the
    keychain through Secure Transport), or None if it can."""
    try:
        import pycurl
    except ImportError:
        return f"pycurl is not installed: {PYCURL_HELP}"
    if darwin:
        # "(SecureTransport)" in parentheses: built in but not selected
        if "SecureTransport" not in pycurl.version or "(SecureTransport)" in pycurl.version:
            return (
                f"pycurl's libcurl does not use Secure Transport ({pycurl.version}): "
                "build pycurl against Apple's libcurl (pip install --no-binary pycurl "
                "pycurl) and set CURL_SSL_BACKEND=secure-transport before importing it"
            )
        return None
    package_dir = os.path.dirname(os.path.dirname(pycurl.__file__ or ""))
    if any(n.startswith("pycurl") and n.endswith(".libs") for n in os.listdir(package_dir)):
        return f"pycurl is the PyPI wheel: {PYCURL_HELP}"
    if "OpenSSL/" not in pycurl.version:
        return f"pycurl's libcurl is not built with OpenSSL ({pycurl.version}): {PYCURL_HELP}"
    return None


def _pycurl_shares_ssls_openssl() -> bool:
    """pycurl's libcurl uses the libcrypto of Python's ``ssl``: the one
    keychain_ext loads the pkcs11 provider into in this process."""
    import pycurl

    native = sys.modules.get("pycurl._pycurl", pycurl)  # 7.46 and later: a package around it
    ours = _provider.ssl_libcrypto_path()
    theirs = _provider.linked_libcrypto(native.__file__ or "")
    return ours is not None and theirs is not None and os.path.samefile(ours, theirs)


def _provider_files(identity: Identity) -> Optional[_provider.ProviderFiles]:
    """The identity's provider files where pycurl in this process can use
    them (its OpenSSL is ``ssl``'s, the provider is installed and sees the
    token), else None."""
    if not _pycurl_shares_ssls_openssl():
        return None
    try:
        return identity.provider_files()
    except (ItemNotFoundError, UnimplementedError, ParamError):
        return None  # no provider here, it cannot see the token, or serves another module


ROUTES = ("provider", "engine")


def setup_pycurl(handle: Any, identity: Identity, *, route: Optional[str] = None) -> None:
    """Set the options that make a ``pycurl.Curl`` handle authenticate with
    ``identity``.

    PKCS#11 tokens, ``route`` (default: the provider where it can serve
    this process, else the engine):

    - ``"provider"``: OpenSSL 3's pkcs11 provider, loaded into this
      process's OpenSSL (pycurl's libcurl must use the libcrypto of Python's
      ``ssl``): SSLCERT the certificate's PEM file, SSLKEY the provider's
      PEM naming the key, which stays in the token.
    - ``"engine"``: OpenSSL's pkcs11 engine (deprecated; gone in OpenSSL 4):
      SSLENGINE, SSLKEY the key's PKCS#11 URI of type ENG, the certificate in
      memory where the provider can read it (SSLCERT_BLOB; else its URI),
      KEYPASSWD the PIN, in memory.  libp11 0.4.13 (Debian 13) finalizes the
      PKCS#11 module when libcurl lets go of the engine: every session of
      the process ends, an ephemeral identity's objects with them.

    Ephemeral identities work on both: provider and engine share this
    process's PKCS#11 module.  macOS: SSLCERT is the identity's keychain
    nickname (libcurl with Secure Transport).

    Raises:
        UnimplementedError: pycurl cannot use either route here (e.g. the
            PyPI wheel; the message says how to install one that can), the
            route asked for cannot serve, or the identity is not on a
            PKCS#11 token.
        ParamError: an unknown ``route``.
    """
    if route is not None and route not in ROUTES:
        raise ParamError(detail=f"route must be one of {ROUTES}, not {route!r}")
    darwin = isinstance(identity.store, DarwinKeychain)
    problem = pycurl_problem(darwin)
    if problem:
        raise UnimplementedError(detail=problem, operation="setup_pycurl")
    import pycurl

    if darwin:
        handle.setopt(pycurl.SSLCERT, identity.label)  # the keychain nickname
        return
    token = _token(identity, "setup_pycurl")
    files = _provider_files(identity) if route != "engine" else None
    if files is not None:
        handle.setopt(pycurl.SSLCERTTYPE, "PEM")
        handle.setopt(pycurl.SSLCERT, str(files.cert))
        handle.setopt(pycurl.SSLKEYTYPE, "PEM")
        handle.setopt(pycurl.SSLKEY, str(files.key))
        return
    if route == "provider":
        raise UnimplementedError(
            detail=_provider.problem()
            or "the pkcs11 provider cannot serve pycurl here: pycurl's libcurl does not "
            "use the OpenSSL of Python's ssl, or the provider cannot see the token",
            operation="setup_pycurl",
        )
    _setup_engine(handle, identity, token)


def _setup_engine(handle: Any, identity: Identity, token: Pkcs11Token) -> None:
    import pycurl

    # the engine reads the module path when it first loads: the identity's
    # module, never one left there for another token
    for key, value in token.env.items():
        os.environ.setdefault(key, value)
    if os.environ.get("PKCS11_MODULE_PATH") != token.module:
        log.debug(
            "PKCS11_MODULE_PATH was %s: set to %s, the module of '%s'",
            os.environ.get("PKCS11_MODULE_PATH"),
            token.module,
            identity.label,
        )
        os.environ["PKCS11_MODULE_PATH"] = token.module
    pin = ""
    if token.pin_file is not None:
        with open(token.pin_file, encoding="utf-8") as f:
            pin = f.read().rstrip("\r\n")
    handle.setopt(pycurl.SSLENGINE, ENGINE)
    # The certificate in memory where the provider reads it: named by its
    # URI, libcurl has the engine search the token for it on every
    # connection, a cost that grows with the objects on the token
    # (benchmarks/HANDSHAKES.md).  The key is still looked up per
    # connection, so a killed identity stops working.
    try:
        cert: Optional[bytes] = (
            identity.provider_files().cert.read_bytes() if hasattr(pycurl, "SSLCERT_BLOB") else None
        )
    except (ItemNotFoundError, UnimplementedError, ParamError):
        cert = None
    if cert is not None:
        handle.setopt(pycurl.SSLCERTTYPE, "PEM")
        handle.setopt(pycurl.SSLCERT_BLOB, cert)
    else:
        handle.setopt(pycurl.SSLCERTTYPE, "ENG")
        handle.setopt(pycurl.SSLCERT, token.uri(identity.label, "cert"))
    handle.setopt(pycurl.SSLKEYTYPE, "ENG")
    handle.setopt(pycurl.SSLKEY, token.uri(identity.label, "private"))
    handle.setopt(pycurl.KEYPASSWD, pin)
