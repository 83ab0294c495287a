"""The façade's seam: the platform's key store.

keychain.h has one backend per platform, compiled into ``keychain_ext._native``
(csrc/build_ffi.py picks it by platform): any PKCS#11 token on Linux, the
Security.framework keychain on macOS.  :func:`platform_backend` hands the
façade (:mod:`keychain_ext.keychain`) the one this build carries; the façade
never sees cffi or PKCS#11 types.  Both reach the C layer through the one
binding, :mod:`keychain_ext._native_backend`, and raise
:class:`~keychain_ext.errors.KeychainError` subclasses for every failure.

What a TLS client needs to reach an identity differs by store: a
:class:`Pkcs11Token` (module, token, PIN file: PKCS#11 URIs) or a
:class:`DarwinKeychain` (a keychain file, or the user's search list).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Union
from urllib.parse import quote

from . import _native_backend as native
from ._native_backend import ItemInfo

__all__ = [
    "DarwinBackend",
    "DarwinKeychain",
    "ItemInfo",
    "Pkcs11Backend",
    "Pkcs11Token",
    "SECURE_TRANSPORT_ENV",
    "Store",
    "StoreLocation",
    "platform_backend",
]


class Store(Protocol):
    """An open store (kc_keychain). Safe to use from several threads."""

    def preauth_key(self, p12: bytes, password: bytes, label: bytes, flags: int) -> ItemInfo: ...

    def kill_key(self, label: bytes, force: bool = False) -> None: ...

    def reclaim_stale(self, label: Optional[bytes]) -> None:
        """Remove label's identity if its owners are dead; None: what a
        crash left on an exclusive store."""

    def lookup(self, label: bytes) -> Optional[ItemInfo]: ...

    def list_items(self) -> list[ItemInfo]: ...

    def close(self) -> None: ...


def pkcs11_uri(token: str, label: str, kind: str, pin_file: Optional[Path] = None) -> str:
    """An RFC 7512 URI for the object ``label`` of ``kind`` ("cert" or
    "private") on ``token``; with ``pin_file``, the PIN source the OpenSSL
    pkcs11 engine and provider read (never the PIN itself).

    Every byte but RFC 3986's unreserved characters is percent-encoded
    (UTF-8): RFC 7512 allows more unencoded, but libp11 and pkcs11-provider
    misread some of them ('&' in a label: "invalid id", nothing found)."""
    uri = f"pkcs11:token={quote(token, safe='')};object={quote(label, safe='')};type={kind}"
    if pin_file is not None:
        uri += f"?pin-source=file:{quote(str(pin_file), safe='/')}"
    return uri


@dataclass(frozen=True)
class Pkcs11Token:
    """A PKCS#11 token, as a TLS client in this or another process reaches it.

    Attributes:
        module: the PKCS#11 module path; token: the token label.
        pin_file: a 0600 file holding the token PIN, for TLS clients.
        lock_path: the file keychain_ext flocks around its token
            operations; another program reading the same SoftHSM2 token
            while others write it should hold it too (SoftHSM2 readers can
            miss objects while another process writes): ``flock PATH curl``.
        env: environment a child process needs to see the token.
    """

    module: str
    token: str
    pin_file: Optional[Path] = None
    lock_path: Optional[str] = None
    env: Mapping[str, str] = field(default_factory=dict)

    def uri(self, label: str, kind: str) -> str:
        """PKCS#11 URI of ``label``'s "cert" or "private" key, with the PIN source."""
        return pkcs11_uri(self.token, label, kind, self.pin_file)


# Apple's /usr/bin/curl and /usr/lib/libcurl are built with several TLS
# backends (LibreSSL the default, Secure Transport beside it): only Secure
# Transport reads the keychain, and this selects it (curl's MultiSSL).
SECURE_TRANSPORT_ENV: Mapping[str, str] = {"CURL_SSL_BACKEND": "secure-transport"}


@dataclass(frozen=True)
class DarwinKeychain:
    """A macOS keychain, as a TLS client reaches an identity in it.

    Attributes:
        path: a keychain file, or None for the user's default keychain
            search list (the only keychains curl searches).
        env: environment a child process needs: Secure Transport selected
            in Apple's multi-backend curl and libcurl.

    A client names the identity by its nickname, the certificate's common
    name (the label): curl ``--cert NICKNAME`` and libcurl
    ``CURLOPT_SSLCERT`` with Secure Transport.  No PIN, no password: the
    key's access list lets the importing application use it.
    """

    path: Optional[str] = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(SECURE_TRANSPORT_ENV))


StoreLocation = Union[Pkcs11Token, DarwinKeychain]


class Pkcs11Backend:
    """keychain_pkcs11.c: any PKCS#11 token, opened by module and token label."""

    name = "pkcs11"

    def open(
        self,
        module: str,
        token: str,
        pin: Optional[str],
        state_dir: str,
        init_args: Optional[str] = None,
        exclusive: bool = False,
        lock_timeout: float = 0,
    ) -> Store:
        return native.NativeBackend().open(
            module, token, pin, state_dir, init_args, exclusive, lock_timeout
        )

    def init_token(self, module: str, token: str, so_pin: str, user_pin: str) -> None:
        native.NativeBackend().init_token(module, token, so_pin, user_pin)


class DarwinBackend:
    """keychain_darwin.c: the Security.framework keychain (no module, no PIN)."""

    name = "darwin"

    def open(self, keychain: Optional[str], state_dir: Optional[str] = None) -> Store:
        """A keychain file, or None: the user's default keychain search
        list; ``state_dir`` holds the lock every process changing owner
        records takes (None: none)."""
        return native.NativeBackend().open(None, keychain, None, state_dir)


def platform_backend() -> Union[Pkcs11Backend, DarwinBackend]:
    """The backend compiled into this build (by platform)."""
    return DarwinBackend() if DarwinBackend.name == native.BACKEND else Pkcs11Backend()
