"""The façade: :class:`Keychain` (an open store) and :class:`Identity`."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import ssl
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn, Optional, Union

from . import _provider, _store
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
    UnimplementedError,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    P12Source = Union[str, os.PathLike[str], bytes, bytearray, memoryview]
else:
    P12Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

Secret = Union[str, bytes, None]
Stale = Literal["refuse", "reclaim"]


def _release_client_files(files: dict[tuple[str, str], tuple[Path, int]]) -> None:
    """Remove the PIN files and provider directories a Keychain wrote (at
    close, or when it is collected or the interpreter exits without close)."""
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
        # a FIFO, a device or a huge file: ParamError at once, nothing read
        return _store.read_regular(p12, _store.P12_CAP, "PKCS#12 file")
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
    _keychain: Optional[weakref.ref[Keychain]] = field(default=None, repr=False, compare=False)

    def ssl_context(
        self,
        cafile: Optional[str] = None,
        capath: Optional[str] = None,
        cadata: Union[str, bytes, None] = None,
    ) -> ssl.SSLContext:
        """A TLS client context that authenticates with this identity, its
        private key staying in the token (OpenSSL 3's pkcs11 provider, loaded
        into the OpenSSL of Python's ``ssl``).  Server verification as
        ``ssl.create_default_context(cafile=..., capath=..., cadata=...)``.
        For requests, httpx, urllib3, aiohttp, urllib; token and ephemeral
        identities alike.  Make it once and reuse it: each call loads the
        key through the provider again (tens of PKCS#11 calls), where a
        handshake with a made context costs a signature in the token
        (benchmarks/HANDSHAKES.md).

        Raises:
            UnimplementedError: the route cannot work here (OpenSSL older
                than 3, the provider not installed, OpenSSL linked into
                ``ssl`` statically, not a PKCS#11 token); says what to do.
            ItemNotFoundError: the Keychain that made this identity is gone.
        """
        return _provider.ssl_context(self.provider_files(), cafile, capath, cadata)

    def provider_files(self, *, persistent: bool = False) -> _provider.ProviderFiles:
        """The certificate PEM, the provider's key PEM and the OpenSSL
        configuration an OpenSSL 3 program needs to use this identity
        (0600, in a 0700 directory removed when the identity is killed or
        its Keychain closed).  ``persistent``: in the token's state
        directory instead, kept until the identity is killed by any process
        (what ``keychain-ext env`` prints; needs a store with a PIN file).
        Raises as :meth:`ssl_context`."""
        keychain = self._keychain() if self._keychain is not None else None
        if keychain is None:
            raise ItemNotFoundError(
                detail=f"the Keychain that made identity '{self.label}' is gone",
                operation="provider_files",
            )
        return keychain._provider_files(self, persistent)

    def __getstate__(self) -> dict[str, object]:
        # a copy in another process has no Keychain here
        return {**vars(self), "_keychain": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

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
    ``token="keychain_ext"`` without a PIN names the embedded store; a
    ``pin`` or ``pin_file`` for the embedded store is a ParamError, as are
    both together.  A relative ``pin_file`` is made absolute; one that
    group or others can read gets a warning (logger ``keychain_ext``).
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
        ParamError: a module or PIN given for the macOS keychain, a PIN
            for the embedded store, or both pin and pin_file.
        FileNotFoundError, PermissionError: pin_file unreadable.
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
        # (label, "pin" or "provider") -> PIN file or provider directory
        # written for TLS clients, and the fd holding it
        self._client_files: dict[tuple[str, str], tuple[Path, int]] = {}
        weakref.finalize(self, _release_client_files, self._client_files)
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
        if pin is not None and pin_file is not None:
            raise ParamError(detail="give pin or pin_file, not both", operation="open")
        if token is None or (token == _store.EMBEDDED_TOKEN and pin is None and pin_file is None):
            if pin is not None or pin_file is not None:
                raise ParamError(
                    detail="the embedded store keeps its own PIN: pin and pin_file are "
                    "for a token named by token=",
                    operation="open",
                )
            self._store = self._open_embedded(module)
        else:
            self.module = module or _store.softhsm2_module()
            self.token = token
            pin_file = pin_file or os.environ.get("KEYCHAIN_EXT_PIN_FILE")
            if pin is None and pin_file is not None:
                # absolute before it is kept or handed to a child (URIs, env)
                self.pin_file = Path(os.path.abspath(pin_file))
                pin = _store.read_secret(self.pin_file, "PIN file")
            if "SOFTHSM2_CONF" in os.environ:
                self.env["SOFTHSM2_CONF"] = os.environ["SOFTHSM2_CONF"]
            if pin is None:
                self._no_pin()
            self._owned_pin = _Hidden(_secret(pin, "PIN"))
            self._store = self._open(self._owned_pin.value.decode("utf-8"))
        self.env["PKCS11_MODULE_PATH"] = self.module
        self.location = Pkcs11Token(
            self.module, self.token, self.pin_file, self.lock_path, dict(self.env)
        )

    def _open(self, pin: Optional[str]) -> Store:
        state = _store.state_dir(self.token, self._init_args)
        self.lock_path = os.path.join(state, "lock")
        log.debug(
            "opening token '%s' through %s (token lock %s, waits up to %g s)",
            self.token,
            self.module,
            self.lock_path,
            self._lock_timeout,
        )
        store = self._backend.open(
            self.module,
            self.token,
            pin,
            state,
            self._init_args,
            self._exclusive,
            self._lock_timeout,
        )
        log.debug("opened token '%s'", self.token)
        return store

    def _no_pin(self) -> NoReturn:
        """No PIN for a named token: a token that is not there says so
        first (the C layer looks for it before it wants the PIN)."""
        with contextlib.suppress(InteractionRequiredError):
            self._open(None).close()
        raise InteractionRequiredError(
            detail=f"token '{self.token}' needs a PIN: pass pin= or pin_file=, "
            "or set KEYCHAIN_EXT_PIN_FILE",
            operation="open",
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
                log.debug("creating the embedded store's token in %s", store.tokens)
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
            _release_client_files(self._client_files)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        # the parent's PIN files stay the parent's: the child lets go of its
        # copies of their descriptors (the parent's flock stays) and never
        # removes them
        for _path, fd in self._client_files.values():
            os.close(fd)
        self._client_files.clear()

    def _identity(self, info: ItemInfo) -> Identity:
        store = self.location
        if isinstance(store, Pkcs11Token) and store.pin_file is None:
            pin_file = self._client_pin_file(info.label)
            store = Pkcs11Token(store.module, store.token, pin_file, store.lock_path, store.env)
        return Identity(**vars(info), store=store, _keychain=weakref.ref(self))

    def _client_pin_file(self, label: str) -> Optional[Path]:
        """A 0600 PIN file for TLS clients: the store's own, or one written
        for this identity and removed when it is killed."""
        if self.pin_file is not None:
            return self.pin_file
        if self._owned_pin is None:
            return None
        with self._lock:
            held = self._client_files.get((label, "pin"))
            if held is None:
                pins = _store.private_dir(_store.base_dir() / "pins")
                _store.sweep_unheld(pins)  # what ended processes left
                path = pins / f"{os.getpid()}-{_store.new_pin()}"
                fd = _store.write_secret(path, self._owned_pin.value.decode("utf-8"), hold=True)
                assert fd is not None
                held = self._client_files[label, "pin"] = (path, fd)
                log.debug("wrote the PIN file %s for TLS clients of '%s'", path, label)
            return held[0]

    def _provider_files(self, ident: Identity, persistent: bool) -> _provider.ProviderFiles:
        """Identity.provider_files: written once per identity, removed with
        its PIN file (or, persistent, at any process's kill_key)."""
        if not isinstance(ident.store, Pkcs11Token):
            raise UnimplementedError(
                detail=f"identity '{ident.label}' is not on a PKCS#11 token: OpenSSL's "
                "pkcs11 provider cannot reach it",
                operation="provider_files",
            )
        _provider.provider_path()  # fails early, before anything is written
        if persistent:
            directory = self._exported_dir(ident.label)
            if directory is None or self.pin_file is None:
                raise ParamError(
                    detail="lasting provider files need a token opened with a PIN file",
                    operation="provider_files",
                )
            directory = _store.private_dir(directory)
            return _provider.write_files(
                directory, ident.store, ident.label, self._init_args, rewrite=True
            )
        key = (ident.label, "provider")
        with self._lock:
            held = self._client_files.get(key)
            if held is None:
                held = self._client_files[key] = _store.hold_private_dir(
                    _store.base_dir() / "provider"
                )
            try:
                return _provider.write_files(held[0], ident.store, ident.label, self._init_args)
            except BaseException as exc:
                _store.release_secret(*self._client_files.pop(key))  # half-written
                if isinstance(exc, ItemNotFoundError) and self._store.lookup(_label(ident.label)):
                    raise UnimplementedError(
                        detail=f"OpenSSL's pkcs11 provider does not see token "
                        f"'{ident.store.token}': it lists the tokens once per process, and "
                        "this one was initialized after that",
                        operation="provider_files",
                    ) from None
                raise

    def _exported_dir(self, label: str) -> Optional[Path]:
        """Where an identity's persistent provider files live: the token's
        state directory (shared by every process using the token)."""
        if self.lock_path is None:
            return None
        name = hashlib.sha256(label.encode("utf-8")).hexdigest()[:32]
        return Path(self.lock_path).parent / "exported" / name

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
            ParamError: p12 path not a regular file, or larger than 1 MiB.
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
        log.debug(
            "importing '%s' into token '%s' (ephemeral=%s held=%s shared=%s stale=%s)",
            label,
            self.token,
            ephemeral,
            held,
            shared,
            stale,
        )
        info = self._store.preauth_key(data, password_bytes, raw_label, flags)
        log.debug(
            "created certificate and key '%s' (key id %s, %s)",
            label,
            info.key_id.hex(),
            info.subject,
        )
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
        log.debug("killing '%s' on token '%s' (force=%s)", label, self.token, force)
        try:
            self._store.kill_key(raw, force)
        except ItemNotFoundError:
            if not missing_ok:
                raise
            log.debug("nothing labelled '%s' to kill", label)
        else:
            log.debug("killed '%s'", label)
        finally:
            with self._lock:
                held = [self._client_files.pop((label, k), None) for k in ("provider", "pin")]
            for files in held:
                if files is not None:
                    _store.release_secret(*files)
        exported = self._exported_dir(label)
        if exported is not None and exported.exists() and self._store.lookup(raw) is None:
            shutil.rmtree(exported, ignore_errors=True)

    def lookup(self, label: str) -> Optional[Identity]:
        """The identity under ``label``, or None.  Changes nothing."""
        info = self._store.lookup(_label(label))
        log.debug("lookup '%s': %s", label, "found" if info else "not found")
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
            log.debug("reclaiming stale '%s'", item.label or "(objects without a label)")
            try:
                self._store.reclaim_stale(_label(item.label) if item.label else None)
            except (ItemNotFoundError, DuplicateItemError):
                log.debug("'%s' is gone or taken over: left alone", item.label)
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
