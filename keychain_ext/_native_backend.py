"""The binding to ``keychain_ext._native``: the one module that touches ``ffi/lib``.

One thin wrapper per C function of keychain.h: allocate with ``ffi.new``,
call (cffi releases the GIL), raise the mapped exception on a non-zero
OSStatus.  The constants of keychain.h (OSStatus values, flags, key types,
buffer sizes) reach the rest of the package from here, read off the compiled
module: they are written once, in the header.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional

from ._fork import renew_in_child
from ._version import __version__

try:
    from ._native import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "keychain_ext._native is not built: install the package with pip "
        "(it compiles csrc/ with cffi)"
    ) from exc

if ffi.string(lib.kc_version()).decode() != __version__:  # pragma: no cover
    raise ImportError(
        f"keychain_ext._native is version {ffi.string(lib.kc_version()).decode()}, "
        f"the package is {__version__}: rebuild it (pip install .)"
    )

BACKEND: str = ffi.string(lib.kc_backend()).decode()  # "pkcs11" or "darwin"

# OSStatus values: {"errSecItemNotFound": -25300, ...} (KC_errSec* of keychain.h)
STATUS: dict[str, int] = {
    name[len("KC_") :]: int(getattr(lib, name)) for name in dir(lib) if name.startswith("KC_errSec")
}
EPHEMERAL: int = lib.KC_PREAUTH_EPHEMERAL
RECLAIM_STALE: int = lib.KC_PREAUTH_RECLAIM_STALE
HELD: int = lib.KC_PREAUTH_HELD
SHARED: int = lib.KC_PREAUTH_SHARED
KILL_FORCE: int = lib.KC_KILL_FORCE
KEY_TYPES: dict[int, Optional[str]] = {
    lib.KC_KEY_NONE: None,
    lib.KC_KEY_RSA: "rsa",
    lib.KC_KEY_EC: "ec",
}
LABEL_MAX: int = lib.KC_LABEL_MAX - 1  # bytes of UTF-8, without the NUL

# errors.py reads STATUS: imported after it, used only at call time.
from . import errors  # noqa: E402


@dataclass(frozen=True)
class ItemInfo:
    """What the store holds under one label (kc_item_info).

    Ownership (see README, "Ownership"): ``ours`` -- keychain_ext made it
    (a lease names it, or it is this process's session objects); ``held``
    -- owned by no process until killed; ``shared`` -- processes may join
    its ``owners``; ``mine`` -- this process is one of them; ``owner_pid``
    and ``owner_host`` name an owner (a live one if any), ``owner_alive``
    says whether one runs (None: cannot tell).
    """

    label: str
    key_id: bytes
    subject: str
    common_name: str
    key_type: Optional[str]
    ephemeral: bool
    has_certificate: bool
    has_private_key: bool
    ours: bool
    held: bool
    shared: bool
    owners: int
    mine: bool
    owner_pid: int
    owner_host: str
    owner_alive: Optional[bool]


def _check(status: int, err: Any, operation: str) -> None:
    if status != 0:
        errors.raise_status(
            status,
            ffi.string(err.message).decode("utf-8", "replace"),
            operation=operation,
            native_code=int(err.native_code) or None,
        )


def _info(c: Any) -> ItemInfo:
    # Filled in without the frozen dataclass's __init__, whose one
    # object.__setattr__ per field was 40% of a listing's binding cost.
    info: ItemInfo = object.__new__(ItemInfo)
    info.__dict__.update(
        label=ffi.string(c.label).decode("utf-8", "replace"),
        key_id=ffi.buffer(c.key_id, min(c.key_id_len, lib.KC_KEY_ID_MAX))[:],
        subject=ffi.string(c.subject).decode("utf-8", "replace"),
        common_name=ffi.string(c.common_name).decode("utf-8", "replace"),
        key_type=KEY_TYPES.get(c.key_type),
        ephemeral=bool(c.ephemeral),
        has_certificate=bool(c.has_certificate),
        has_private_key=bool(c.has_private_key),
        ours=bool(c.ours),
        held=bool(c.held),
        shared=bool(c.shared),
        owners=int(c.owners),
        mine=bool(c.mine),
        owner_pid=int(c.owner_pid),
        owner_host=ffi.string(c.owner_host).decode("utf-8", "replace"),
        owner_alive=None if c.owner_alive < 0 else bool(c.owner_alive),
    )
    return info


class NativeStore:
    """An open kc_keychain handle."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        # close() must not free the handle under a call in another thread
        self._lock = threading.Lock()
        self._list_room = 64  # kc_item_info entries list_items offers
        renew_in_child(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def _live(self) -> Any:
        if self._handle is None:
            errors.raise_status(lib.KC_errSecParam, "the keychain is closed", operation="keychain")
        return self._handle

    def preauth_key(self, p12: bytes, password: bytes, label: bytes, flags: int) -> ItemInfo:
        err = ffi.new("kc_error *")
        out = ffi.new("kc_item_info *")
        try:
            with self._lock:
                st = lib.kc_preauth_key(
                    self._live(), p12, len(p12), password, label, flags, out, err
                )
            _check(st, err, "preauth_key")
            return _info(out)
        except BaseException:
            # A KeyboardInterrupt can be raised as the C call returns (cffi
            # runs signal handlers then): the caller never gets the identity,
            # so it must not stay.  *out is filled only by a success.
            if out.has_certificate:
                self.kill_key(label)
            raise

    def kill_key(self, label: bytes, force: bool = False) -> None:
        err = ffi.new("kc_error *")
        with self._lock:
            st = lib.kc_kill_key(self._live(), label, KILL_FORCE if force else 0, err)
        _check(st, err, "kill_key")

    def reclaim_stale(self, label: Optional[bytes]) -> None:
        err = ffi.new("kc_error *")
        with self._lock:
            st = lib.kc_reclaim_stale(self._live(), label or ffi.NULL, err)
        _check(st, err, "reclaim_stale")

    def lookup(self, label: bytes) -> Optional[ItemInfo]:
        err = ffi.new("kc_error *")
        out = ffi.new("kc_item_info *")
        with self._lock:
            st = lib.kc_lookup_keychain_item(self._live(), label, out, err)
        if st == lib.KC_errSecItemNotFound:
            return None
        _check(st, err, "lookup_keychain_item")
        return _info(out)

    def list_items(self) -> list[ItemInfo]:
        err = ffi.new("kc_error *")
        count = ffi.new("size_t *")
        while True:
            # room for what the last listing found (and a margin): one scan
            # of the token in the common case, a second one only if it grew
            cap = self._list_room
            out = ffi.new("kc_item_info[]", cap)
            with self._lock:
                st = lib.kc_list_items(self._live(), out, cap, count, err)
            _check(st, err, "list_items")
            self._list_room = max(64, count[0] + count[0] // 4)
            if count[0] <= cap:
                return [_info(out[i]) for i in range(count[0])]

    def close(self) -> None:
        with self._lock:
            handle, self._handle = self._handle, None
            if handle is not None:
                lib.kc_close(handle)


def _cstr(value: Optional[str], keep: list[Any]) -> Any:
    if value is None:
        return ffi.NULL
    buf = ffi.new("char[]", value.encode())
    keep.append(buf)  # alive until kc_open returns
    return buf


class NativeBackend:
    """kc_open and kc_init_token: the stores the compiled backend opens."""

    name = BACKEND

    def open(
        self,
        module: Optional[str],
        token: Optional[str],
        pin: Optional[str],
        state_dir: Optional[str],
        init_args: Optional[str] = None,
        exclusive: bool = False,
        lock_timeout: float = 0,
    ) -> NativeStore:
        """kc_open.  PKCS#11: module path, token label, PIN, the token's
        state directory (lock, leases), C_Initialize's init string, and
        whether only keychain_ext uses the token; Darwin: token is a
        keychain path or None (the default search list)."""
        err = ffi.new("kc_error *")
        out = ffi.new("kc_keychain **")
        opts = ffi.new("kc_options *")
        keep: list[Any] = []
        opts.module = _cstr(module, keep)
        opts.token = _cstr(token, keep)
        opts.pin = _cstr(pin, keep)
        opts.state_dir = _cstr(state_dir or None, keep)
        opts.init_args = _cstr(init_args or None, keep)
        opts.exclusive = int(exclusive)
        opts.lock_wait_ms = int(lock_timeout * 1000)  # 0: the C layer's default
        st = lib.kc_open(opts, out, err)
        _check(st, err, "open")
        return NativeStore(out[0])

    def init_token(self, module: str, token: str, so_pin: str, user_pin: str) -> None:
        """kc_init_token (PKCS#11): initialize the first free token."""
        err = ffi.new("kc_error *")
        st = lib.kc_init_token(
            module.encode(), token.encode(), so_pin.encode(), user_pin.encode(), err
        )
        _check(st, err, "init_token")
