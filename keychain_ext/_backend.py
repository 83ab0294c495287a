"""What every implementation of the store provides (C extension, ctypes port).

The façade (:mod:`keychain_ext.keychain`) talks to a :class:`Backend`; it
never sees cffi, ctypes or PKCS#11 types.  Backends raise
:class:`~keychain_ext.errors.KeychainError` subclasses for every failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

EPHEMERAL = 1  # KC_PREAUTH_EPHEMERAL
RECLAIM_STALE = 2  # KC_PREAUTH_RECLAIM_STALE

KEY_TYPES = {0: None, 1: "rsa", 2: "ec"}  # KC_KEY_*


@dataclass(frozen=True)
class ItemInfo:
    """What the store holds under one label (kc_item_info)."""

    label: str
    key_id: bytes
    subject: str
    common_name: str
    key_type: Optional[str]
    ephemeral: bool
    has_certificate: bool
    has_private_key: bool
    owner_pid: int
    owner_alive: Optional[bool]


class Store(Protocol):
    """An open store (kc_keychain). Safe to use from several threads."""

    def preauth_key(self, p12: bytes, password: bytes, label: bytes, flags: int) -> ItemInfo: ...

    def kill_key(self, label: bytes) -> None: ...

    def reclaim_stale(self, label: Optional[bytes]) -> None:
        """Remove label's identity if its owner is dead; None: crash orphans."""

    def lookup(self, label: bytes) -> Optional[ItemInfo]: ...

    def list_items(self) -> list[ItemInfo]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """An implementation of the C API (keychain.h)."""

    name: str

    def open(self, module: str, token: str, pin: str, lock_path: Optional[str]) -> Store: ...

    def init_token(self, module: str, token: str, so_pin: str, user_pin: str) -> None: ...
