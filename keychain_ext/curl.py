"""Hand a pre-authorized identity to curl (command line) or pycurl.

Both go through OpenSSL's ``pkcs11`` engine (Debian: libengine-pkcs11-openssl)
with the certificate and key named by PKCS#11 URIs (RFC 7512).  The PIN never
travels in argv: the URIs carry ``pin-source=file:`` pointing at a 0600 file,
and pycurl gets it through KEYPASSWD, in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from .errors import InteractionNotAllowedError, UnimplementedError
from .keychain import Identity

ENGINE = "pkcs11"

PYCURL_HELP = (
    "pip install --force-reinstall --no-binary pycurl pycurl "
    "(with libcurl4-openssl-dev installed): the PyPI wheel bundles its own "
    "libcurl and OpenSSL, which cannot load the system's pkcs11 engine"
)


def _require_shared(identity: Identity, user: str) -> None:
    if identity.ephemeral:
        raise InteractionNotAllowedError(
            detail=f"identity '{identity.label}' is ephemeral: its objects live only in "
            f"this process, so {user} cannot see them; preauthorize it with "
            "ephemeral=False, or use pycurl in this process",
            operation="curl",
        )


def curl_args(identity: Identity) -> list[str]:
    """Arguments that make the curl CLI authenticate with ``identity``.

    Raises:
        InteractionNotAllowedError: the identity is ephemeral (another
            process cannot see session objects).
    """
    _require_shared(identity, "a curl process")
    return [
        "--engine", ENGINE,
        "--cert-type", "ENG", "--cert", identity.cert_uri,
        "--key-type", "ENG", "--key", identity.key_uri,
    ]  # fmt: skip


def client_env(identity: Identity, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment a child process needs to use ``identity``: ``base``
    (default: this process's) plus the token's variables, the engine's module
    path and KEYCHAIN_EXT_* variables naming the identity (documented in the
    README).  Holds no PIN."""
    _require_shared(identity, "a child process")
    env = dict(os.environ if base is None else base)
    env.update(identity.env)
    env.update(
        KEYCHAIN_EXT_LABEL=identity.label,
        KEYCHAIN_EXT_CERT_URI=identity.cert_uri,
        KEYCHAIN_EXT_KEY_URI=identity.key_uri,
        KEYCHAIN_EXT_ENGINE=ENGINE,
        KEYCHAIN_EXT_MODULE=identity.module,
    )
    if identity.lock_path:
        env["KEYCHAIN_EXT_LOCK"] = identity.lock_path
    return env


def pycurl_problem() -> Optional[str]:
    """Why pycurl cannot use the pkcs11 engine here, or None if it can."""
    try:
        import pycurl
    except ImportError:
        return f"pycurl is not installed: {PYCURL_HELP}"
    package_dir = os.path.dirname(os.path.dirname(pycurl.__file__ or ""))
    if any(n.startswith("pycurl") and n.endswith(".libs") for n in os.listdir(package_dir)):
        return f"pycurl is the PyPI wheel: {PYCURL_HELP}"
    if "OpenSSL/" not in pycurl.version:
        return f"pycurl's libcurl is not built with OpenSSL ({pycurl.version}): {PYCURL_HELP}"
    return None


def setup_pycurl(handle: Any, identity: Identity) -> None:
    """Set the options that make a ``pycurl.Curl`` handle authenticate with
    ``identity``: SSLENGINE, SSLCERT/SSLKEY as PKCS#11 URIs of type ENG, and
    KEYPASSWD (the PIN, in memory).  Ephemeral identities work here: the
    engine shares this process's PKCS#11 module.

    Raises:
        UnimplementedError: pycurl cannot load the engine (PyPI wheel);
            the message says how to install one that can.
    """
    problem = pycurl_problem()
    if problem:
        raise UnimplementedError(detail=problem, operation="setup_pycurl")
    import pycurl

    # the engine reads the module path when it first loads
    os.environ.setdefault("PKCS11_MODULE_PATH", identity.module)
    for key, value in identity.env.items():
        os.environ.setdefault(key, value)
    pin = ""
    if identity.pin_file is not None:
        with open(identity.pin_file, encoding="utf-8") as f:
            pin = f.read().rstrip("\r\n")
    handle.setopt(pycurl.SSLENGINE, ENGINE)
    handle.setopt(pycurl.SSLCERTTYPE, "ENG")
    handle.setopt(pycurl.SSLCERT, identity.cert_uri)
    handle.setopt(pycurl.SSLKEYTYPE, "ENG")
    handle.setopt(pycurl.SSLKEY, identity.key_uri)
    handle.setopt(pycurl.KEYPASSWD, pin)
