"""The façade: :class:`Keychain` (an open store) and :class:`Identity`."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Union
from urllib.parse import quote

from . import _store
from ._backend import EPHEMERAL, RECLAIM_STALE, Backend, ItemInfo, Store
from .errors import (
    DuplicateItemError,
    InteractionRequiredError,
    ItemNotFoundError,
    NoSuchKeychainError,
    ParamError,
)

if TYPE_CHECKING:
    P12Source = Union[str, os.PathLike[str], bytes, bytearray, memoryview]
else:
    P12Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

Secret = Union[str, bytes, None]
Stale = Literal["refuse", "reclaim"]

LABEL_MAX = 255  # bytes of UTF-8 (KC_LABEL_MAX - 1)


class _Hidden:
    """A secret that does not show in repr(), vars() or tracebacks."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<hidden>"


def _backend(impl: str) -> Backend:
    if impl == "native":
        from ._native_backend import NativeBackend

        return NativeBackend()
    if impl == "ctypes":
        from .ports.ctypes_pkcs11 import CtypesBackend

        return CtypesBackend()
    raise ValueError(f"unknown impl {impl!r}: use 'native' or 'ctypes'")


def _label(label: str) -> bytes:
    if not isinstance(label, str):
        raise TypeError(f"label must be str, not {type(label).__name__}")
    if not label:
        raise ParamError(detail="the label is empty", operation="label")
    if "\0" in label:
        raise ParamError(detail="the label contains a NUL character", operation="label")
    try:
        raw = label.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError(detail="the label is not valid Unicode", operation="label") from None
    if len(raw) > LABEL_MAX:
        raise ParamError(detail=f"the label is longer than {LABEL_MAX} bytes", operation="label")
    return raw


def _secret(value: Secret, what: str) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError:
            raise ParamError(detail=f"the {what} is not valid Unicode", operation=what) from None
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")
    if b"\0" in value:
        raise ParamError(detail=f"the {what} contains a NUL character", operation=what)
    return value


def _p12_bytes(p12: P12Source) -> bytes:
    if isinstance(p12, (bytes, bytearray, memoryview)):
        return bytes(p12)
    if isinstance(p12, (str, os.PathLike)):
        with open(p12, "rb") as f:  # FileNotFoundError, PermissionError, ...
            return f.read()
    raise TypeError(f"p12 must be a path or bytes, not {type(p12).__name__}")


def pkcs11_uri(token: str, label: str, kind: str, pin_file: Optional[Path] = None) -> str:
    """An RFC 7512 URI for the object ``label`` of ``kind`` ("cert" or
    "private") on ``token``; with ``pin_file``, the PIN source the OpenSSL
    pkcs11 engine reads (never the PIN itself)."""
    safe = "-._~!$&'()*+,=:@"  # pchar minus ';' '/' '?' (RFC 7512 pk11-pchar)
    uri = f"pkcs11:token={quote(token, safe=safe)};object={quote(label, safe=safe)};type={kind}"
    if pin_file is not None:
        uri += f"?pin-source=file:{quote(str(pin_file), safe='/' + safe)}"
    return uri


@dataclass(frozen=True)
class Identity:
    """A client identity in the store, and what a TLS client needs to use it.

    Attributes:
        label: the label certificate and key carry.
        key_id: SHA-1 of the public key (CKA_ID / kSecImportItemKeyID).
        subject: certificate subject (RFC 2253); common_name its CN.
        key_type: "rsa" or "ec".
        ephemeral: session objects, gone when the process ends.
        module: the PKCS#11 module path; token: the token label.
        owner_pid, owner_alive: the process that imported it (from its
            lease) and whether it still runs (None: cannot tell).
        pin_file: a 0600 file holding the token PIN, for TLS clients.
        lock_path: the file keychain_ext flocks around its token
            operations; another program reading the same SoftHSM2 token
            while others write it should hold it too (SoftHSM2 readers can
            miss objects while another process writes): ``flock PATH curl``.
        env: environment a child process needs to see the token.
    """

    label: str
    key_id: bytes
    subject: str
    common_name: str
    key_type: Optional[str]
    ephemeral: bool
    module: str
    token: str
    owner_pid: int = 0
    owner_alive: Optional[bool] = None
    pin_file: Optional[Path] = None
    lock_path: Optional[str] = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def cert_uri(self) -> str:
        """PKCS#11 URI of the certificate (with the PIN source)."""
        return pkcs11_uri(self.token, self.label, "cert", self.pin_file)

    @property
    def key_uri(self) -> str:
        """PKCS#11 URI of the private key (with the PIN source)."""
        return pkcs11_uri(self.token, self.label, "private", self.pin_file)


class Keychain:
    """An open key store: the embedded SoftHSM2 token or any PKCS#11 token.

    ``Keychain()`` opens the embedded default store, creating it on first
    use (no configuration needed).  ``Keychain(token=..., pin=...)`` opens
    any PKCS#11 token by label, through ``module`` (default: SoftHSM2).
    Environment fallbacks: ``KEYCHAIN_EXT_MODULE``, ``KEYCHAIN_EXT_TOKEN``,
    ``KEYCHAIN_EXT_PIN_FILE``.  Never prompts.

    Use as a context manager or call :meth:`close`; closing removes the
    handle's ephemeral identities.  One Keychain may be shared by threads.
    ``lock=False`` skips the per-token lock file that serializes processes
    (only for a token nothing else uses); ``impl="ctypes"`` selects the
    pure-Python port.

    Raises:
        NoSuchKeychainError: module or token missing.
        AuthFailedError: wrong PIN.
        InteractionRequiredError: no PIN given for an explicit token.
        InteractionNotAllowedError: the token would need a PIN pad.
    """

    def __init__(
        self,
        module: Optional[str] = None,
        token: Optional[str] = None,
        pin: Secret = None,
        *,
        pin_file: Optional[Union[str, os.PathLike[str]]] = None,
        impl: str = "native",
        lock: bool = True,
    ) -> None:
        self._backend = _backend(impl)
        self._lock = threading.Lock()
        self._pin_files: dict[str, Path] = {}  # label -> PIN file we wrote
        module = module or os.environ.get("KEYCHAIN_EXT_MODULE")
        token = token or os.environ.get("KEYCHAIN_EXT_TOKEN")
        self.env: dict[str, str] = {}
        self._owned_pin: Optional[_Hidden] = None
        if token is None:
            self._store = self._open_embedded(module, lock)
            return
        self.module = module or _store.softhsm2_module()
        self.token = token
        pin_file = pin_file or os.environ.get("KEYCHAIN_EXT_PIN_FILE")
        self.pin_file: Optional[Path] = None
        if pin is None and pin_file is not None:
            pin = _store.read_secret(Path(pin_file))
            self.pin_file = Path(pin_file)
        if pin is None:
            raise InteractionRequiredError(
                detail=f"token '{token}' needs a PIN: pass pin= or pin_file=, "
                "or set KEYCHAIN_EXT_PIN_FILE",
                operation="open",
            )
        self._owned_pin = _Hidden(_secret(pin, "PIN"))
        if "SOFTHSM2_CONF" in os.environ:
            self.env["SOFTHSM2_CONF"] = os.environ["SOFTHSM2_CONF"]
        self._store = self._open(self._owned_pin.value.decode("utf-8"), lock)

    def _open(self, pin: str, lock: bool) -> Store:
        self.lock_path = _store.lock_path(self.module, self.token) if lock else None
        return self._backend.open(self.module, self.token, pin, self.lock_path)

    def _open_embedded(self, module: Optional[str], lock: bool) -> Store:
        store = _store.embedded(module)
        self.module, self.token, self.pin_file = store.module, _store.EMBEDDED_TOKEN, store.pin_file
        self.env.update(store.env())
        with _store.file_lock(store.lock):
            if not store.pin_file.exists():
                _store.write_secret(store.pin_file, _store.new_pin())
            pin = _store.read_secret(store.pin_file)
            try:
                return self._open(pin, lock)
            except NoSuchKeychainError:
                # first use: the SO PIN is not kept; the token is disposable
                self._backend.init_token(self.module, self.token, _store.new_pin(), pin)
                return self._open(pin, lock)

    def __repr__(self) -> str:
        return (
            f"Keychain(module={self.module!r}, token={self.token!r}, impl={self._backend.name!r})"
        )

    def __enter__(self) -> Keychain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the store; its ephemeral identities vanish.  Idempotent."""
        self._store.close()
        with self._lock:
            for path in self._pin_files.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._pin_files.clear()

    def _identity(self, info: ItemInfo) -> Identity:
        return Identity(
            label=info.label,
            key_id=info.key_id,
            subject=info.subject,
            common_name=info.common_name,
            key_type=info.key_type,
            ephemeral=info.ephemeral,
            module=self.module,
            token=self.token,
            owner_pid=info.owner_pid,
            owner_alive=info.owner_alive,
            pin_file=self._client_pin_file(info.label),
            lock_path=self.lock_path,
            env={**self.env, "PKCS11_MODULE_PATH": self.module},
        )

    def _client_pin_file(self, label: str) -> Optional[Path]:
        """A 0600 PIN file for TLS clients: the store's own, or one written
        for this identity and removed when it is killed."""
        if self.pin_file is not None:
            return self.pin_file
        if self._owned_pin is None:
            return None
        with self._lock:
            path = self._pin_files.get(label)
            if path is None:
                pins = _store.private_dir(_store.base_dir() / "pins")
                path = pins / f"{os.getpid()}-{_store.new_pin()}"
                _store.write_secret(path, self._owned_pin.value.decode("utf-8"))
                self._pin_files[label] = path
            return path

    def preauth_key(
        self,
        p12: P12Source,
        password: Secret,
        label: str,
        *,
        ephemeral: bool = False,
        stale: Stale = "refuse",
    ) -> Identity:
        """Import the PKCS#12 identity under ``label`` (Crypto.cpp preAuthKey).

        The store gains a certificate and a private key (private, sensitive,
        never extractable, sign-only), both labelled ``label`` with the key
        id as CKA_ID.  All or nothing: on any error the store is unchanged.

        Args:
            p12: path of a PKCS#12 file, or its bytes.
            password: the PKCS#12 password (str or bytes; None = empty).
            label: the name certificate and key get (1-255 UTF-8 bytes).
            ephemeral: session objects instead of token objects: never on
                disk, gone when this Keychain closes or the process dies;
                usable only by libcurl inside this process.
            stale: what to do when the label is taken by an identity whose
                owner process died before removing it (its lease says so):
                "refuse" (default, DuplicateItemError naming the dead owner)
                or "reclaim" (remove it, with the partial objects a crash
                leaves, and import).  A live owner's identity is always
                refused.

        Raises:
            FileNotFoundError, PermissionError: p12 path unreadable.
            TypeError: an argument of the wrong type.
            ParamError: empty label, NUL byte, label too long.
            DuplicateItemError: the label or the key is already present.
            Pkcs12VerifyFailureError: wrong password.
            DecodeError: not a PKCS#12 identity (corrupt, empty, no key).
        """
        raw_label = _label(label)
        password_bytes = _secret(password, "password")
        data = _p12_bytes(p12)
        if stale not in ("refuse", "reclaim"):
            raise ValueError(f"stale must be 'refuse' or 'reclaim', not {stale!r}")
        flags = (EPHEMERAL if ephemeral else 0) | (RECLAIM_STALE if stale == "reclaim" else 0)
        info = self._store.preauth_key(data, password_bytes, raw_label, flags)
        return self._identity(info)

    def kill_key(self, label: str, *, missing_ok: bool = False) -> None:
        """Remove the certificate, then the private key (Crypto.cpp killKey).

        Works for identities imported by another handle or process (the key
        is found by the certificate's key id).

        Raises:
            ItemNotFoundError: nothing carries the label (unless missing_ok).
        """
        raw = _label(label)
        try:
            self._store.kill_key(raw)
        except ItemNotFoundError:
            if not missing_ok:
                raise
        finally:
            with self._lock:
                path = self._pin_files.pop(label, None)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def lookup(self, label: str) -> Optional[Identity]:
        """The identity under ``label``, or None.  Changes nothing."""
        info = self._store.lookup(_label(label))
        return None if info is None else self._identity(info)

    def items(self) -> list[ItemInfo]:
        """Everything the store holds that looks like an identity, incomplete
        ones included.  Changes nothing."""
        return self._store.list_items()

    def purge(self, *, dry_run: bool = True) -> list[ItemInfo]:
        """Identities whose owner process died without removing them
        (complete or left half-made by a crash), removed unless ``dry_run``.

        Each removal is decided again under the store's lock, so an identity
        that a live process reclaimed meanwhile is left alone.  Returns what
        was (or would be) removed.
        """
        # the empty label groups the crash orphans: objects with nothing but
        # defaults, left by a process killed inside C_CreateObject
        stale = [i for i in self.items() if i.owner_alive is False or not i.label]
        if dry_run:
            return stale
        removed = []
        for item in stale:
            try:
                self._store.reclaim_stale(_label(item.label) if item.label else None)
            except (ItemNotFoundError, DuplicateItemError):
                continue  # gone already, or taken over by a live process
            removed.append(item)
        return removed

    @contextlib.contextmanager
    def preauthorized(
        self,
        p12: P12Source,
        password: Secret,
        label: str,
        *,
        ephemeral: bool = False,
        stale: Stale = "refuse",
    ) -> Iterator[Identity]:
        """``preauth_key`` on entry, ``kill_key`` on exit, also when the body
        raises: the store is left as it was found."""
        identity = self.preauth_key(p12, password, label, ephemeral=ephemeral, stale=stale)
        try:
            yield identity
        finally:
            self.kill_key(label, missing_ok=True)
