"""The façade: :class:`Keychain` (an open store) and :class:`Identity`."""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Union

from . import _store
from ._backend import (
    DarwinBackend,
    DarwinKeychain,
    ItemInfo,
    Pkcs11Backend,
    Pkcs11Token,
    Store,
    StoreLocation,
    platform_backend,
)
from ._fork import renew_in_child
from ._native_backend import EPHEMERAL, HELD, LABEL_MAX, RECLAIM_STALE, SHARED
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


def _release_pin_files(files: dict[str, tuple[Path, int]]) -> None:
    """Remove the PIN files a Keychain wrote (at close, or when it is
    collected or the interpreter exits without close)."""
    for path, fd in files.values():
        _store.release_secret(path, fd)
    files.clear()


class _Hidden:
    """A secret that does not show in repr(), vars() or tracebacks."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<hidden>"


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


@dataclass(frozen=True)
class Identity(ItemInfo):
    """A client identity in the store, and what a TLS client needs to use it.

    The :class:`ItemInfo` the store reports (label, key_id = SHA-1 of the
    public key as CKA_ID / kSecImportItemKeyID, subject in RFC 2253 and its
    common_name, key_type "rsa" or "ec", ephemeral = session objects gone
    when the process ends, owner_pid / owner_alive from its lease, None:
    cannot tell), plus the ``store`` that holds it: a
    :class:`~keychain_ext._backend.Pkcs11Token` (module, token, PIN file,
    lock file, environment for child processes) or a
    :class:`~keychain_ext._backend.DarwinKeychain` (keychain file, and
    the environment that selects Secure Transport in Apple's curl: see
    :attr:`nickname`).
    """

    store: StoreLocation

    @property
    def cert_uri(self) -> Optional[str]:
        """PKCS#11 URI of the certificate (with the PIN source); None
        unless the store is a PKCS#11 token."""
        return self._uri("cert")

    @property
    def key_uri(self) -> Optional[str]:
        """PKCS#11 URI of the private key (with the PIN source); None
        unless the store is a PKCS#11 token."""
        return self._uri("private")

    @property
    def nickname(self) -> Optional[str]:
        """What Secure Transport curl takes as ``--cert`` (libcurl:
        CURLOPT_SSLCERT): the certificate's common name, which is the
        label on macOS; None unless the store is the macOS keychain."""
        return self.label if isinstance(self.store, DarwinKeychain) else None

    def _uri(self, kind: str) -> Optional[str]:
        return self.store.uri(self.label, kind) if isinstance(self.store, Pkcs11Token) else None


class Keychain:
    """An open key store: the platform's (see :mod:`keychain_ext._backend`).

    Linux (PKCS#11): ``Keychain()`` opens the embedded default store, a
    SoftHSM2 token created on first use (no configuration needed);
    ``Keychain(token=..., pin=...)`` opens any PKCS#11 token by label,
    through ``module`` (default: SoftHSM2).  Environment fallbacks:
    ``KEYCHAIN_EXT_MODULE``, ``KEYCHAIN_EXT_TOKEN``, ``KEYCHAIN_EXT_PIN_FILE``.
    ``init_args``: the module's C_Initialize init string, for modules that
    need one (NSS softoken: ``"configdir='sql:DIR'"``).  Processes using
    one token share its state directory: the lock that serializes them and
    the leases that say who owns each identity (README, "Ownership").
    ``exclusive=True`` says that only keychain_ext uses the token (the
    embedded store always is): then :meth:`purge` may also remove the blank
    objects a process killed inside C_CreateObject leaves, which no label
    can prove anyone's.  ``lock_timeout``: how long (seconds) to wait for
    another process's hold on the token lock before failing with
    IOFailureError.

    macOS (Security.framework): ``Keychain()`` uses the user's default
    keychain search list, ``Keychain(token=PATH)`` the keychain file PATH
    (searched only by this handle; the default keychain and the search
    list are never changed); there is no module and no PIN.  The label is
    the certificate's common name; owners are recorded in the keychain (a
    ``keychain_ext`` generic password per label); ``shared`` joins only
    with the same PKCS#12 file; ``ephemeral`` raises UnimplementedError
    (README, "macOS").

    Never prompts.  Use as a context manager or call :meth:`close`; closing
    removes the handle's ephemeral identities.  One Keychain may be shared
    by threads.

    Attributes:
        location: where identities live (what :attr:`Identity.store` holds).
        module, token: the PKCS#11 module path and token label (on macOS:
            "" and the keychain path, "" for the search list).

    Raises:
        NoSuchKeychainError: module, token or keychain missing.
        AuthFailedError: wrong PIN.
        InteractionRequiredError: no PIN given for an explicit token.
        InteractionNotAllowedError: the token would need a PIN pad.
        ParamError: a module or PIN given for the macOS keychain.
    """

    def __init__(
        self,
        module: Optional[str] = None,
        token: Optional[str] = None,
        pin: Secret = None,
        *,
        pin_file: Optional[Union[str, os.PathLike[str]]] = None,
        init_args: Optional[str] = None,
        exclusive: bool = False,
        lock_timeout: float = 120.0,
    ) -> None:
        self._lock = threading.Lock()
        # label -> PIN file written for TLS clients, and the fd holding it
        self._pin_files: dict[str, tuple[Path, int]] = {}
        weakref.finalize(self, _release_pin_files, self._pin_files)
        renew_in_child(self)
        self.env: dict[str, str] = {}
        self._owned_pin: Optional[_Hidden] = None
        self.pin_file: Optional[Path] = None
        self.lock_path: Optional[str] = None
        self._exclusive = exclusive  # only keychain_ext uses the token
        self._lock_timeout = lock_timeout
        self._init_args = init_args
        backend = platform_backend()
        if isinstance(backend, DarwinBackend):
            if module is not None or pin is not None or pin_file is not None or init_args:
                raise ParamError(
                    detail="the macOS keychain takes no PKCS#11 module and no PIN",
                    operation="open",
                )
            self.module, self.token = "", token or ""
            self.location: StoreLocation = DarwinKeychain(token or None)
            # processes changing this keychain's owner records share a lock
            state = _store.state_dir(f"macos-keychain:{token or ''}")
            self.lock_path = os.path.join(state, "lock")
            self._store = backend.open(token or None, state)
            return
        self._backend: Pkcs11Backend = backend
        module = module or os.environ.get("KEYCHAIN_EXT_MODULE")
        token = token or os.environ.get("KEYCHAIN_EXT_TOKEN")
        if token is None:
            self._store = self._open_embedded(module)
        else:
            self.module = module or _store.softhsm2_module()
            self.token = token
            pin_file = pin_file or os.environ.get("KEYCHAIN_EXT_PIN_FILE")
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
            self._store = self._open(self._owned_pin.value.decode("utf-8"))
        self.env["PKCS11_MODULE_PATH"] = self.module
        self.location = Pkcs11Token(
            self.module, self.token, self.pin_file, self.lock_path, dict(self.env)
        )

    def _open(self, pin: str) -> Store:
        state = _store.state_dir(self.token, self._init_args)
        self.lock_path = os.path.join(state, "lock")
        return self._backend.open(
            self.module,
            self.token,
            pin,
            state,
            self._init_args,
            self._exclusive,
            self._lock_timeout,
        )

    def _open_embedded(self, module: Optional[str]) -> Store:
        store = _store.embedded(module)
        self.module, self.token, self.pin_file = store.module, _store.EMBEDDED_TOKEN, store.pin_file
        self._exclusive = True  # the embedded token is keychain_ext's alone
        self.env.update(store.env())
        with _store.file_lock(store.lock):
            if not store.pin_file.exists():
                _store.write_secret(store.pin_file, _store.new_pin())
            pin = _store.read_secret(store.pin_file)
            try:
                return self._open(pin)
            except NoSuchKeychainError:
                if any(store.tokens.iterdir()):
                    raise  # not a first use: never initialize over a token
                # first use: the SO PIN is not kept; the token is disposable
                try:
                    self._backend.init_token(self.module, self.token, _store.new_pin(), pin)
                except BaseException:
                    store.discard_tokens()  # no half-initialized token stays
                    raise
                return self._open(pin)

    def __repr__(self) -> str:
        return f"Keychain(module={self.module!r}, token={self.token!r})"

    def __enter__(self) -> Keychain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the store; its ephemeral identities vanish.  Idempotent."""
        self._store.close()
        with self._lock:
            _release_pin_files(self._pin_files)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        # the parent's PIN files stay the parent's: the child lets go of its
        # copies of their descriptors (the parent's flock stays) and never
        # removes them
        for _path, fd in self._pin_files.values():
            os.close(fd)
        self._pin_files.clear()

    def _identity(self, info: ItemInfo) -> Identity:
        store = self.location
        if isinstance(store, Pkcs11Token) and store.pin_file is None:
            pin_file = self._client_pin_file(info.label)
            store = Pkcs11Token(store.module, store.token, pin_file, store.lock_path, store.env)
        return Identity(**vars(info), store=store)

    def _client_pin_file(self, label: str) -> Optional[Path]:
        """A 0600 PIN file for TLS clients: the store's own, or one written
        for this identity and removed when it is killed."""
        if self.pin_file is not None:
            return self.pin_file
        if self._owned_pin is None:
            return None
        with self._lock:
            held = self._pin_files.get(label)
            if held is None:
                pins = _store.private_dir(_store.base_dir() / "pins")
                _store.sweep_unheld(pins)  # what ended processes left
                path = pins / f"{os.getpid()}-{_store.new_pin()}"
                fd = _store.write_secret(path, self._owned_pin.value.decode("utf-8"), hold=True)
                assert fd is not None
                held = self._pin_files[label] = (path, fd)
            return held[0]

    def preauth_key(
        self,
        p12: P12Source,
        password: Secret,
        label: str,
        *,
        ephemeral: bool = False,
        held: bool = False,
        shared: bool = False,
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
                usable only by TLS clients inside this process.
            held: owned by no process: it stays until :meth:`kill_key`
                (from any process), and purge never removes it -- what
                ``keychain-ext preauth`` makes.
            shared: several processes (workers of one service) may each
                pre-authorize the same identity under the same label; each
                joins its owners, and the identity goes with the last
                owner's kill_key (or when every owner has died).
            stale: what to do when the label is taken by an identity whose
                owners all died before removing it (its lease says so):
                "refuse" (default, DuplicateItemError naming the dead owner)
                or "reclaim" (remove it and import).  A live owner's or a
                held identity is always refused.  At most one of
                ephemeral, held and shared.

        Raises:
            FileNotFoundError, PermissionError: p12 path unreadable.
            TypeError: an argument of the wrong type.
            ParamError: empty label, NUL byte, label too long.
            DuplicateItemError: the label or the key is already present.
            ParamError: more than one of ephemeral, held and shared.
            Pkcs12VerifyFailureError: wrong password.
            DecodeError: not a PKCS#12 identity (corrupt, empty, no key).
        """
        raw_label = _label(label)
        password_bytes = _secret(password, "password")
        data = _p12_bytes(p12)
        if stale not in ("refuse", "reclaim"):
            raise ValueError(f"stale must be 'refuse' or 'reclaim', not {stale!r}")
        flags = (
            (EPHEMERAL if ephemeral else 0)
            | (HELD if held else 0)
            | (SHARED if shared else 0)
            | (RECLAIM_STALE if stale == "reclaim" else 0)
        )
        info = self._store.preauth_key(data, password_bytes, raw_label, flags)
        try:
            return self._identity(info)
        except BaseException:  # KeyboardInterrupt included: nothing may stay
            self.kill_key(label, missing_ok=True)
            raise

    def kill_key(self, label: str, *, missing_ok: bool = False, force: bool = False) -> None:
        """Give the identity up; with no other owner left, remove the
        certificate, then the private key (Crypto.cpp killKey), by the key
        id its lease records.

        Removes an identity this process owns (through any handle), a held
        one, or one whose owners have all died.  Another live process's
        identity, or one keychain_ext did not make, only with ``force``.

        Raises:
            ItemNotFoundError: nothing carries the label (unless missing_ok).
            InvalidOwnerEditError: another live process owns it, or no lease
                proves keychain_ext made it (and not ``force``); nothing
                changed.
        """
        raw = _label(label)
        try:
            self._store.kill_key(raw, force)
        except ItemNotFoundError:
            if not missing_ok:
                raise
        finally:
            with self._lock:
                held = self._pin_files.pop(label, None)
            if held is not None:
                _store.release_secret(*held)

    def lookup(self, label: str) -> Optional[Identity]:
        """The identity under ``label``, or None.  Changes nothing."""
        info = self._store.lookup(_label(label))
        return None if info is None else self._identity(info)

    def items(self) -> list[ItemInfo]:
        """Everything the store holds that looks like an identity, incomplete
        ones included.  Changes nothing."""
        return self._store.list_items()

    def purge(self, *, dry_run: bool = True) -> list[ItemInfo]:
        """Identities keychain_ext made whose owners all died without
        removing them (complete or half-made by a crash), removed unless
        ``dry_run``.  Held identities and anything no lease proves ours
        stay; on the embedded store, which only keychain_ext uses, so do
        not the blank objects a crash left (listed under the label "").

        Each removal is decided again under the store's lock, so an identity
        that a live process reclaimed meanwhile is left alone.  Returns what
        was (or would be) removed.
        """
        stale = [
            i
            for i in self.items()
            if i.ours and (not i.label or (not i.held and i.owner_alive is False))
        ]
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
        shared: bool = False,
        stale: Stale = "refuse",
    ) -> Iterator[Identity]:
        """``preauth_key`` on entry, ``kill_key`` on exit, also when the body
        raises: the store is left as it was found."""
        # preauth_key removes what it made if interrupted before returning;
        # from its return to the try below no interrupt can be raised
        identity = self.preauth_key(
            p12, password, label, ephemeral=ephemeral, shared=shared, stale=stale
        )
        try:
            yield identity
        finally:
            self.kill_key(label, missing_ok=True)
