"""keychain.h in pure Python: ``ctypes`` against the PKCS#11 module.

A benchmark rival, never shipped: the C layer's PKCS#11 backend
(``csrc/keychain_pkcs11.c``) re-written with ``ctypes``, measured against the
C extension (benchmarks/runner.py) and held to its PKCS#11 calls by
tests/test_benchmark_ports.py.  It implements the façade's ``Store`` protocol
(:mod:`keychain_ext._backend`): for an ephemeral identity and for lookups
call for call (the same PKCS#11 functions in the same order with the same
templates), with the same OSStatus mapping and messages, the same
all-or-nothing import and the same process-wide rules:

- a module is loaded once per path and never ``C_Finalize``'d (libcurl's
  pkcs11 engine may share it); ``C_Initialize`` accepts
  ``CKR_CRYPTOKI_ALREADY_INITIALIZED`` and runs again after ``fork()``;
- one anchor session per token stays open for the life of the process, and
  a second open of a token already logged in compares PIN digests so a
  wrong PIN is still reported (the digests survive ``fork()``: a child's
  first open logs in again and is still checked against them);
- each handle has its own session (reopened after ``fork()``), a
  ``threading.Lock`` serializing its calls and, with a lock path, an
  ``flock`` around every operation -- and around opening (slot, login,
  session), since SoftHSM2 misreads a token another process writes;
- every operation starts with ``C_GetSessionInfo`` and logs the session in
  again (or reopens it) when another user of the module in the process
  logged out, closed all sessions or finalized the module (the C layer's
  ``ensure_login``);
- crash leftovers (objects with nothing but defaults, or unreadable ones)
  are swept on reclaim and listed under the empty label.

Held to the C layer's calls (tests/test_benchmark_ports.py): the ephemeral
cycle and lookup.  An ephemeral kill searches the session objects of any
class under the label (only this process sees them, so they are its own),
reads each one's CKA_CLASS and destroys certificates first, then keys, as
``kc_kill_key`` does.

The token-object path is this port's own and is not compared with the C
layer's: the C layer keeps a token identity's lease as a file in the
token's state directory (csrc/p11_lease.c), which this port does not model.
Here a token identity still carries the lease the C layer used before that
(a CKO_DATA object, CKA_APPLICATION "keychain_ext", naming the owner
process), created first and removed last; the benchmark reports its
token-object figures without comparing them.

The PKCS#12 file is read with the ``cryptography`` package (imported when
first needed); certificate fields and the key id come from the certificate's
own DER, so they are the bytes OpenSSL would hand over.

This module keeps its own registry of modules and logins, separate from the
C extension's: in one process both may share a module, and the token's login
state is the module's, per process (see ``_login``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import hmac
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, TypeVar

from keychain_ext._backend import ItemInfo
from keychain_ext._native_backend import EPHEMERAL, KEY_TYPES, RECLAIM_STALE
from keychain_ext.errors import raise_status

from . import _ctypes_asn1 as _asn1

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = ["CtypesBackend", "CtypesStore", "open_store"]

T = TypeVar("T")

# ------------------------------------------------------------ OSStatus

errSecSuccess = 0
errSecUnimplemented = -4
errSecIO = -36
errSecParam = -50
errSecAllocate = -108
errSecNotAvailable = -25291
errSecReadOnly = -25292
errSecAuthFailed = -25293
errSecNoSuchKeychain = -25294
errSecDuplicateItem = -25299
errSecItemNotFound = -25300
errSecInvalidItemRef = -25304
errSecInteractionNotAllowed = -25308
errSecInteractionRequired = -25315
errSecPkcs12VerifyFailure = -25264
errSecDecode = -26275

MESSAGE_MAX = 512  # KC_MESSAGE_MAX
LABEL_MAX = 256  # KC_LABEL_MAX
SUBJECT_MAX = 512  # KC_SUBJECT_MAX
KEY_ID_MAX = 64  # KC_KEY_ID_MAX
KEY_NONE, KEY_RSA, KEY_EC = 0, 1, 2  # KC_KEY_*

TOKEN_LABEL_LEN = 32
MAX_SLOTS = 16
MAX_FOUND = 64
TRANSIENT_RETRIES = 5
P12_MAX = 16 * 1024 * 1024
MAX_MAC_ITERATIONS = 2_000_000  # keychain_pkcs11.c: OpenSSL writes 2048, others ~600000
CERT_VALUE_MAX = 8192  # keychain_pkcs11.c object.value
APPLICATION_MAX = 32  # keychain_pkcs11.c object.application
LEASE_APPLICATION = b"keychain_ext"

# ------------------------------------------------------------- PKCS#11

CK_ULONG = ctypes.c_ulong
CK_BBOOL = ctypes.c_ubyte
CK_UNAVAILABLE_INFORMATION = (1 << (8 * ctypes.sizeof(CK_ULONG))) - 1
CK_INVALID_HANDLE = 0

CKR_OK = 0x0
_CKR_NAMES = {
    0x0: "CKR_OK", 0x2: "CKR_HOST_MEMORY", 0x3: "CKR_SLOT_ID_INVALID",
    0x5: "CKR_GENERAL_ERROR", 0x6: "CKR_FUNCTION_FAILED", 0x7: "CKR_ARGUMENTS_BAD",
    0x10: "CKR_ATTRIBUTE_READ_ONLY", 0x11: "CKR_ATTRIBUTE_SENSITIVE",
    0x12: "CKR_ATTRIBUTE_TYPE_INVALID", 0x13: "CKR_ATTRIBUTE_VALUE_INVALID",
    0x30: "CKR_DEVICE_ERROR", 0x31: "CKR_DEVICE_MEMORY", 0x32: "CKR_DEVICE_REMOVED",
    0x54: "CKR_FUNCTION_NOT_SUPPORTED", 0x63: "CKR_KEY_TYPE_INCONSISTENT",
    0x82: "CKR_OBJECT_HANDLE_INVALID", 0x90: "CKR_OPERATION_ACTIVE",
    0x91: "CKR_OPERATION_NOT_INITIALIZED", 0xA0: "CKR_PIN_INCORRECT",
    0xA1: "CKR_PIN_INVALID", 0xA2: "CKR_PIN_LEN_RANGE", 0xA3: "CKR_PIN_EXPIRED",
    0xA4: "CKR_PIN_LOCKED", 0xB0: "CKR_SESSION_CLOSED", 0xB1: "CKR_SESSION_COUNT",
    0xB3: "CKR_SESSION_HANDLE_INVALID", 0xB5: "CKR_SESSION_READ_ONLY",
    0xD0: "CKR_TEMPLATE_INCOMPLETE", 0xD1: "CKR_TEMPLATE_INCONSISTENT",
    0xE0: "CKR_TOKEN_NOT_PRESENT", 0xE1: "CKR_TOKEN_NOT_RECOGNIZED",
    0xE2: "CKR_TOKEN_WRITE_PROTECTED", 0x100: "CKR_USER_ALREADY_LOGGED_IN",
    0x101: "CKR_USER_NOT_LOGGED_IN", 0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x103: "CKR_USER_TYPE_INVALID", 0x150: "CKR_BUFFER_TOO_SMALL",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED", 0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
    0x70: "CKR_MECHANISM_INVALID",
}  # fmt: skip
CKR_GENERAL_ERROR = 0x5
CKR_ATTRIBUTE_SENSITIVE = 0x11
CKR_ATTRIBUTE_TYPE_INVALID = 0x12
CKR_ATTRIBUTE_VALUE_INVALID = 0x13
CKR_DEVICE_ERROR = 0x30
CKR_OBJECT_HANDLE_INVALID = 0x82
CKR_OPERATION_ACTIVE = 0x90
CKR_SESSION_CLOSED = 0xB0
CKR_SESSION_HANDLE_INVALID = 0xB3
CKR_PIN_INCORRECT = 0xA0
CKR_TOKEN_NOT_PRESENT = 0xE0
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_BUFFER_TOO_SMALL = 0x150
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191

# CK_RV -> OSStatus (keychain_pkcs11.c ckr_status); anything else: errSecIO
_CKR_STATUS = {
    CKR_OK: errSecSuccess,
    **dict.fromkeys((0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0x101, 0x102), errSecAuthFailed),
    **dict.fromkeys((0x3, 0xE0, 0xE1, 0x32), errSecNoSuchKeychain),
    **dict.fromkeys((0x2, 0x31, 0xB1), errSecAllocate),
    **dict.fromkeys((0x7, 0x13, 0x12, 0xD0, 0xD1, 0x10), errSecParam),
    **dict.fromkeys((0x82, 0xB3, 0xB0), errSecInvalidItemRef),
    **dict.fromkeys((0xE2, 0xB5), errSecReadOnly),
    **dict.fromkeys((0x54, 0x63, 0x70), errSecUnimplemented),
    0x190: errSecNotAvailable,
}

CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_VALUE = 0x0, 0x1, 0x2, 0x3, 0x11
CKA_APPLICATION = 0x10
CKA_OBJECT_ID = 0x12
CKA_CERTIFICATE_TYPE, CKA_ISSUER, CKA_SERIAL_NUMBER = 0x80, 0x81, 0x82
CKA_KEY_TYPE, CKA_SUBJECT, CKA_ID, CKA_SENSITIVE = 0x100, 0x101, 0x102, 0x103
CKA_DECRYPT, CKA_UNWRAP, CKA_SIGN, CKA_SIGN_RECOVER, CKA_DERIVE = 0x105, 0x107, 0x108, 0x109, 0x10C
CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT = 0x120, 0x122, 0x123
CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT = (
    0x124,
    0x125,
    0x126,
    0x127,
    0x128,
)
CKA_EXTRACTABLE, CKA_EC_PARAMS, CKA_ALWAYS_AUTHENTICATE = 0x162, 0x180, 0x202
CKO_DATA, CKO_CERTIFICATE, CKO_PRIVATE_KEY = 0, 1, 3
CKK_RSA, CKK_EC = 0, 3
CKC_X_509 = 0
CKU_SO, CKU_USER = 0, 1
CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS = 1, 3
CKF_RW_SESSION, CKF_SERIAL_SESSION = 0x2, 0x4
CKF_PROTECTED_AUTHENTICATION_PATH, CKF_TOKEN_INITIALIZED = 0x100, 0x400
CKF_OS_LOCKING_OK = 0x2


class CK_VERSION(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", CK_ULONG)]


class CK_TOKEN_INFO(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_ubyte * 32),
        ("manufacturerID", ctypes.c_ubyte * 32),
        ("model", ctypes.c_ubyte * 16),
        ("serialNumber", ctypes.c_ubyte * 16),
        ("flags", CK_ULONG),
        ("ulMaxSessionCount", CK_ULONG),
        ("ulSessionCount", CK_ULONG),
        ("ulMaxRwSessionCount", CK_ULONG),
        ("ulRwSessionCount", CK_ULONG),
        ("ulMaxPinLen", CK_ULONG),
        ("ulMinPinLen", CK_ULONG),
        ("ulTotalPublicMemory", CK_ULONG),
        ("ulFreePublicMemory", CK_ULONG),
        ("ulTotalPrivateMemory", CK_ULONG),
        ("ulFreePrivateMemory", CK_ULONG),
        ("hardwareVersion", CK_VERSION),
        ("firmwareVersion", CK_VERSION),
        ("utcTime", ctypes.c_ubyte * 16),
    ]


class CK_SESSION_INFO(ctypes.Structure):
    _fields_ = [
        ("slotID", CK_ULONG),
        ("state", CK_ULONG),
        ("flags", CK_ULONG),
        ("ulDeviceError", CK_ULONG),
    ]


class CK_C_INITIALIZE_ARGS(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", ctypes.c_void_p),
    ]


_P_ULONG = ctypes.POINTER(CK_ULONG)
_P_ATTR = ctypes.POINTER(CK_ATTRIBUTE)
_U, _V, _S = CK_ULONG, ctypes.c_void_p, ctypes.c_char_p


def _fn(*args: Any) -> Any:
    return ctypes.CFUNCTYPE(CK_ULONG, *args)  # CK_RV; calls release the GIL


# The functions this backend calls; every other slot is an opaque pointer.
_PROTOTYPES: dict[str, Any] = {
    "C_Initialize": _fn(_V),
    "C_GetSlotList": _fn(CK_BBOOL, _P_ULONG, _P_ULONG),
    "C_GetTokenInfo": _fn(_U, ctypes.POINTER(CK_TOKEN_INFO)),
    "C_InitToken": _fn(_U, _S, _U, _S),
    "C_InitPIN": _fn(_U, _S, _U),
    "C_OpenSession": _fn(_U, _U, _V, _V, _P_ULONG),
    "C_CloseSession": _fn(_U),
    "C_GetSessionInfo": _fn(_U, ctypes.POINTER(CK_SESSION_INFO)),
    "C_Login": _fn(_U, _U, _S, _U),
    "C_Logout": _fn(_U),
    "C_CreateObject": _fn(_U, _P_ATTR, _U, _P_ULONG),
    "C_DestroyObject": _fn(_U, _U),
    "C_GetAttributeValue": _fn(_U, _U, _P_ATTR, _U),
    "C_FindObjectsInit": _fn(_U, _P_ATTR, _U),
    "C_FindObjects": _fn(_U, _P_ULONG, _U, _P_ULONG),
    "C_FindObjectsFinal": _fn(_U),
}

# CK_FUNCTION_LIST, PKCS#11 v2.40 section 5.16, in order.
_FUNCTIONS = [
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GetObjectSize",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_EncryptInit",
    "C_Encrypt",
    "C_EncryptUpdate",
    "C_EncryptFinal",
    "C_DecryptInit",
    "C_Decrypt",
    "C_DecryptUpdate",
    "C_DecryptFinal",
    "C_DigestInit",
    "C_Digest",
    "C_DigestUpdate",
    "C_DigestKey",
    "C_DigestFinal",
    "C_SignInit",
    "C_Sign",
    "C_SignUpdate",
    "C_SignFinal",
    "C_SignRecoverInit",
    "C_SignRecover",
    "C_VerifyInit",
    "C_Verify",
    "C_VerifyUpdate",
    "C_VerifyFinal",
    "C_VerifyRecoverInit",
    "C_VerifyRecover",
    "C_DigestEncryptUpdate",
    "C_DecryptDigestUpdate",
    "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate",
    "C_GenerateKey",
    "C_GenerateKeyPair",
    "C_WrapKey",
    "C_UnwrapKey",
    "C_DeriveKey",
    "C_SeedRandom",
    "C_GenerateRandom",
    "C_GetFunctionStatus",
    "C_CancelFunction",
    "C_WaitForSlotEvent",
]
assert len(_FUNCTIONS) == 68


class CK_FUNCTION_LIST(ctypes.Structure):
    _fields_ = [("version", CK_VERSION)] + [
        (name, _PROTOTYPES.get(name, ctypes.c_void_p)) for name in _FUNCTIONS
    ]


# ---------------------------------------------------------------- errors


class _Failure(Exception):
    """kc_error: raised inside, turned into the mapped KeychainError at the
    API boundary with the operation's name."""

    def __init__(self, status: int, native: int, message: str) -> None:
        super().__init__(status)
        self.status = status
        self.native = native
        # vsnprintf into char[KC_MESSAGE_MAX], read back with "replace"
        raw = message.encode("utf-8", "surrogateescape")[: MESSAGE_MAX - 1]
        self.message = raw.decode("utf-8", "replace")


def _ckr_name(rv: int) -> str:
    return _CKR_NAMES.get(rv, "CKR_VENDOR_OR_UNKNOWN")


def _fail_ck(rv: int, what: str) -> _Failure:
    return _Failure(_CKR_STATUS.get(rv, errSecIO), rv, f"{what} failed: {_ckr_name(rv)} (0x{rv:x})")


def _api(operation: str, call: Callable[[], T]) -> T:
    """Run ``call``; a failure raises the exception errors.py maps it to."""
    try:
        return call()
    except _Failure as exc:
        failure = exc
    raise_status(
        failure.status, failure.message, operation=operation, native_code=failure.native or None
    )


def _transient(rv: int) -> bool:
    return rv in (CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_ERROR, CKR_GENERAL_ERROR)


def _unreadable(rv: int) -> bool:
    """SoftHSM2 answers CKR_ATTRIBUTE_VALUE_INVALID for every attribute of
    an object whose file a crash left half-written."""
    return rv == CKR_ATTRIBUTE_VALUE_INVALID


def _backoff(attempt: int) -> None:
    time.sleep(0.002 * (1 << attempt))  # 2, 4, 8, ... ms


def _cstr(value: bytes) -> bytes:
    """What C sees of a ``const char *``: up to the first NUL."""
    return value.split(b"\0", 1)[0]


def _text(raw: bytes, limit: int) -> str:
    """A fixed char[limit] field read back by the native wrapper."""
    return _cstr(raw)[: limit - 1].decode("utf-8", "replace")


# ------------------------------------------------------ attribute templates


def _ulong(value: int) -> bytes:
    return bytes(CK_ULONG(value))


_TRUE, _FALSE = b"\x01", b"\x00"


class _Template:
    """A CK_ATTRIBUTE array over byte strings this object keeps alive."""

    __slots__ = ("array", "count", "_keep")

    def wipe(self) -> None:
        """Zero the copies (they may hold private key material)."""
        for buf in self._keep:
            ctypes.memset(buf, 0, ctypes.sizeof(buf))

    def __init__(self, items: list[tuple[int, bytes]]) -> None:
        self.count = len(items)
        self.array = (CK_ATTRIBUTE * max(self.count, 1))()
        self._keep = [ctypes.create_string_buffer(value, len(value) or 1) for _, value in items]
        for slot, (kind, value), buf in zip(self.array, items, self._keep):
            slot.type = kind
            slot.pValue = ctypes.addressof(buf)
            slot.ulValueLen = len(value)


# ----------------------------------------------------------- modules


@dataclass
class _SlotLogin:
    slot: int
    pid: int  # process that logged in
    anchor: int  # never closed: see module docstring
    pin_digest: bytes


@dataclass
class _Module:
    path: str
    dll: ctypes.CDLL
    f: Any  # CK_FUNCTION_LIST
    init_pid: int = 0
    logins: list[_SlotLogin] = field(default_factory=list)


_modules_lock = threading.Lock()
_modules: dict[str, _Module] = {}


def _module_ready(m: _Module) -> None:
    """C_Initialize once per process (again in a forked child: its logins
    are redone by _login, which keeps the PIN digests).  Call with
    _modules_lock held."""
    if m.init_pid == os.getpid():
        return
    args = CK_C_INITIALIZE_ARGS(flags=CKF_OS_LOCKING_OK)
    rv = m.f.C_Initialize(ctypes.addressof(args))
    if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
        raise _fail_ck(rv, "C_Initialize")
    m.init_pid = os.getpid()


def _get_module(path: str) -> _Module:
    """The module at path, loaded and initialized in this process."""
    with _modules_lock:
        m = _modules.get(path)
        if m is None:
            try:
                dll = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
            except OSError as exc:
                raise _Failure(
                    errSecNoSuchKeychain, 0, f"cannot load PKCS#11 module {path}: {exc}"
                ) from None
            try:
                get_list = dll.C_GetFunctionList
            except AttributeError:
                _dlclose(dll)
                raise _Failure(
                    errSecNoSuchKeychain,
                    0,
                    f"{path} is not a PKCS#11 module (no C_GetFunctionList)",
                ) from None
            get_list.restype = CK_ULONG
            get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(CK_FUNCTION_LIST))]
            flist = ctypes.POINTER(CK_FUNCTION_LIST)()
            rv = get_list(ctypes.byref(flist))
            if rv != CKR_OK or not flist:
                _dlclose(dll)
                raise _Failure(
                    errSecNoSuchKeychain,
                    rv,
                    f"C_GetFunctionList of {path} failed: {_ckr_name(rv)}",
                )
            m = _modules[path] = _Module(path, dll, flist.contents)
        _module_ready(m)
        return m


def _dlclose(dll: ctypes.CDLL) -> None:
    import _ctypes

    _ctypes.dlclose(dll._handle)


def _login(m: _Module, slot: int, pin: bytes) -> None:
    """Log the token in once per process, keeping an anchor session open.

    A later login while logged in gets CKR_USER_ALREADY_LOGGED_IN whatever
    the PIN, so a second open compares PIN digests to still report a wrong
    PIN.  The digests are this module's own: if something else in the
    process (the C extension, libcurl's engine) logged the token in first,
    the first PIN given here cannot be checked -- as in the C backend.
    After fork() the digests stay: the child's first login opens a new
    anchor and logs in again (the token may still count the parent's
    login, and then only the digest can tell a wrong PIN).
    """
    digest = hashlib.sha256(pin).digest()
    with _modules_lock:
        known = next((login for login in m.logins if login.slot == slot), None)
        if known is not None and not hmac.compare_digest(known.pin_digest, digest):
            raise _Failure(
                errSecAuthFailed, CKR_PIN_INCORRECT, "C_Login failed: CKR_PIN_INCORRECT (0xa0)"
            )
        if known is not None and known.pid == os.getpid():
            return
        if known is None and len(m.logins) == MAX_SLOTS:
            raise _Failure(errSecAllocate, 0, "too many tokens open")
        # First login of this process (a forked child keeps the digest: the
        # token may still count it as logged in, and then only the digest
        # can tell a wrong PIN).
        anchor = CK_ULONG(CK_INVALID_HANDLE)
        rv = m.f.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None,
                               ctypes.byref(anchor))  # fmt: skip
        if rv != CKR_OK:
            raise _fail_ck(rv, "C_OpenSession")
        rv = m.f.C_Login(anchor, CKU_USER, pin, len(pin))
        if rv not in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
            m.f.C_CloseSession(anchor)
            raise _fail_ck(rv, "C_Login")
        if known is None:
            m.logins.append(_SlotLogin(slot, os.getpid(), anchor.value, digest))
        else:
            known.pid, known.anchor, known.pin_digest = os.getpid(), anchor.value, digest


def _pad_label(label: bytes) -> bytes:
    return label[:TOKEN_LABEL_LEN].ljust(TOKEN_LABEL_LEN, b" ")


def _find_slot(m: _Module, label: bytes, want_uninitialized: bool) -> tuple[int, int]:
    """(slot, token flags) of the token labelled ``label``; with
    want_uninitialized, of the first token not initialized yet."""
    want = _pad_label(label)
    info = CK_TOKEN_INFO()
    rv = CKR_OK
    for attempt in range(TRANSIENT_RETRIES):
        if attempt:
            _backoff(attempt)
        n = CK_ULONG(0)
        slots = (CK_ULONG * 1)()
        rv = m.f.C_GetSlotList(1, None, ctypes.byref(n))
        if rv == CKR_OK and n.value:
            slots = (CK_ULONG * n.value)()
            rv = m.f.C_GetSlotList(1, slots, ctypes.byref(n))
        if rv != CKR_OK:
            if _transient(rv) or rv == CKR_BUFFER_TOO_SMALL:
                continue
            break
        for i in range(n.value):
            if m.f.C_GetTokenInfo(slots[i], ctypes.byref(info)) != CKR_OK:
                continue
            initialized = bool(info.flags & CKF_TOKEN_INITIALIZED)
            if not initialized if want_uninitialized else initialized and bytes(info.label) == want:
                return int(slots[i]), int(info.flags)
        # a token another process is writing may briefly not show: a miss
        # is retried like a transient error
        rv = CKR_OK
    if rv != CKR_OK:
        raise _fail_ck(rv, "C_GetSlotList")
    name = label.decode("utf-8", "surrogateescape")
    raise _Failure(
        errSecNoSuchKeychain, 0,
        f"module {m.path} has no free slot for token '{name}'" if want_uninitialized
        else f"module {m.path} has no token labelled '{name}'",
    )  # fmt: skip


# ------------------------------------------------------------- PKCS#12


class _Identity(NamedTuple):
    """copy_identity_from_pkcs12's result, ready for the token."""

    key_type: int  # KEY_RSA / KEY_EC
    key_id: bytes  # SHA-1 of the public key bits
    cert_der: bytes
    cert: _asn1.CertFields
    key_attrs: list[tuple[int, bytes]]  # CKA_* of the private key material


def _cryptography() -> Any:
    try:
        from cryptography.hazmat.primitives.serialization import pkcs12
    except ImportError as exc:
        raise ImportError(
            "the ctypes port reads PKCS#12 files with the 'cryptography' "
            "package, which is not installed: pip install cryptography"
        ) from exc
    return pkcs12


_RSA_PSS = "1.2.840.113549.1.1.10"
_UNSUPPORTED_NAMES = {  # OBJ_nid2sn of what cryptography may return
    "Ed25519PrivateKey": "ED25519", "Ed448PrivateKey": "ED448",
    "X25519PrivateKey": "X25519", "X448PrivateKey": "X448",
    "DSAPrivateKey": "DSA", "DHPrivateKey": "dhKeyAgreement",
}  # fmt: skip


def _big(value: int, pad: int = 0) -> bytes:
    """BN_bn2binpad: big-endian, minimal length or left-padded to pad."""
    return value.to_bytes(pad or (value.bit_length() + 7) // 8, "big")


def _curve_oid(name: str) -> Optional[str]:
    from cryptography.hazmat.primitives.asymmetric import ec

    oid = getattr(ec.EllipticCurveOID, name.upper(), None)
    return None if oid is None else str(oid.dotted_string)


def _key_attrs(key: PrivateKeyTypes, key_type: int) -> list[tuple[int, bytes]]:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if key_type == KEY_RSA:
        assert isinstance(key, rsa.RSAPrivateKey)
        n = key.private_numbers()
        return [
            (CKA_MODULUS, _big(n.public_numbers.n)),
            (CKA_PUBLIC_EXPONENT, _big(n.public_numbers.e)),
            (CKA_PRIVATE_EXPONENT, _big(n.d)),
            (CKA_PRIME_1, _big(n.p)),
            (CKA_PRIME_2, _big(n.q)),
            (CKA_EXPONENT_1, _big(n.dmp1)),
            (CKA_EXPONENT_2, _big(n.dmq1)),
            (CKA_COEFFICIENT, _big(n.iqmp)),
        ]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    oid = _curve_oid(key.curve.name)
    if oid is None:
        raise _Failure(
            errSecUnimplemented, 0,
            "cannot read the private key's parameters (unknown curve)",
        )  # fmt: skip
    value = _big(key.private_numbers().private_value, (key.curve.key_size + 7) // 8)
    return [(CKA_EC_PARAMS, _asn1.oid_der(oid)), (CKA_VALUE, value)]


def _p12_failure(data: bytes, password: bytes, exc: Exception) -> _Failure:
    """Why cryptography could not read the file, in the C backend's terms:
    not a PKCS#12 structure, a MAC that does not verify (wrong password), or
    contents that do not decrypt."""
    try:
        pfx = _asn1.parse_pfx(data)
    except (_asn1.DerError, IndexError) as why:
        return _Failure(errSecDecode, 0, f"not a PKCS#12 file ({why})")
    if pfx.mac is not None:
        ok = _asn1.pfx_mac_verifies(pfx, password)
        if not ok and not password:
            # an empty password may have been encoded as "no password"
            ok = _asn1.pfx_mac_verifies(pfx, None)
        if not ok:
            return _Failure(
                errSecPkcs12VerifyFailure, 0,
                "wrong password for the PKCS#12 file (MAC verification failed)",
            )  # fmt: skip
    return _Failure(errSecDecode, 0, f"cannot decrypt the PKCS#12 file ({exc})")


def _copy_identity_from_pkcs12(data: bytes, password: bytes) -> _Identity:
    """Crypto.cpp copyIdentityFromPKCS12: certificate, private key and key
    id out of the PKCS#12 bytes."""
    if not data:
        raise _Failure(errSecDecode, 0, "empty PKCS#12 data")
    if len(data) > P12_MAX:
        raise _Failure(errSecDecode, 0, "PKCS#12 data too large")
    try:  # an untrusted file must not buy minutes of CPU with its MAC
        iterations = _asn1.pfx_mac_iterations(_asn1.parse_pfx(data))
    except (_asn1.DerError, IndexError):
        iterations = None  # not a PFX: cryptography says why below
    if iterations is not None and iterations > MAX_MAC_ITERATIONS:
        raise _Failure(
            errSecDecode, 0,
            f"PKCS#12 MAC iteration count {iterations} is above the limit of {MAX_MAC_ITERATIONS}",
        )  # fmt: skip
    pkcs12 = _cryptography()
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        key, cert, _ = pkcs12.load_key_and_certificates(data, password or None)
    except Exception as exc:  # noqa: BLE001 - ValueError, UnsupportedAlgorithm, ...
        failure = _p12_failure(data, password, exc)
        raise failure from None
    if key is None:
        raise _Failure(errSecDecode, 0, "the PKCS#12 file holds no private key")
    if cert is None:
        raise _Failure(errSecDecode, 0, "the PKCS#12 file holds no certificate for its private key")
    der = cert.public_bytes(Encoding.DER)
    try:
        fields = _asn1.cert_fields(der)
        matches = key.public_key() == cert.public_key()
    except Exception:  # noqa: BLE001 - an algorithm cryptography cannot load
        matches = False
    if not matches:
        raise _Failure(
            errSecDecode, 0, "the private key does not match the certificate (key values mismatch)"
        )
    if fields.key_algorithm == _RSA_PSS:
        key_type = KEY_NONE
        name = "RSASSA-PSS"
    elif isinstance(key, rsa.RSAPrivateKey):
        key_type, name = KEY_RSA, "rsaEncryption"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        key_type, name = KEY_EC, "id-ecPublicKey"
    else:
        key_type = KEY_NONE
        name = _UNSUPPORTED_NAMES.get(type(key).__name__.lstrip("_"), type(key).__name__)
    if key_type == KEY_NONE:
        raise _Failure(
            errSecUnimplemented, 0, f"unsupported key type {name} (RSA and EC are supported)"
        )
    return _Identity(
        key_type, hashlib.sha1(fields.key_bits).digest(), der, fields, _key_attrs(key, key_type)
    )


# ------------------------------------------------------------ item info


@dataclass
class _Info:
    """kc_item_info, filled as keychain_pkcs11.c fills it."""

    label: bytes = b""
    has_certificate: bool = False
    has_private_key: bool = False
    ephemeral: bool = False
    key_type: int = KEY_NONE
    key_id: bytes = b""
    subject: bytes = b""
    common_name: bytes = b""
    owner_pid: int = 0
    owner_alive: int = 0

    def describe_cert(self, cert_der: bytes) -> bool:
        """describe_cert: subject (RFC 2253) and CN; False if the DER is not
        a certificate."""
        try:
            subject, common_name = _asn1.describe_name(_asn1.cert_fields(cert_der).subject)
        except (_asn1.DerError, IndexError, ValueError):
            return False
        self.subject = subject
        if common_name is not None:
            self.common_name = common_name
        return True

    def item(self) -> ItemInfo:
        return ItemInfo(
            label=_text(self.label, LABEL_MAX),
            key_id=self.key_id,
            subject=_text(self.subject, SUBJECT_MAX),
            common_name=_text(self.common_name, LABEL_MAX),
            key_type=KEY_TYPES.get(self.key_type),
            ephemeral=self.ephemeral,
            has_certificate=self.has_certificate,
            has_private_key=self.has_private_key,
            # the port predates leases in the state directory (a benchmark
            # rival: its ownership fields are not compared)
            ours=self.ephemeral,
            held=False,
            shared=False,
            owners=1 if self.owner_pid else 0,
            mine=self.ephemeral,
            owner_pid=self.owner_pid,
            owner_host="",
            owner_alive=None if self.owner_alive < 0 else bool(self.owner_alive),
        )


class _Object(NamedTuple):
    """What read_object reports of one object."""

    cls: int
    token: bool
    key_type: int
    key_id: bytes
    label: bytes
    value: bytes  # certificate DER or lease text
    application: bytes


class _ObjectBuffers:
    """The fixed buffers of keychain_pkcs11.c's ``object``, reused."""

    def __init__(self) -> None:
        self.cls = CK_ULONG()
        self.token = CK_BBOOL()
        self.key_type = CK_ULONG()
        self.key_id = (ctypes.c_ubyte * KEY_ID_MAX)()
        self.label = (ctypes.c_char * (LABEL_MAX - 1))()
        self.value = (ctypes.c_ubyte * (CERT_VALUE_MAX - 1))()
        self.application = (ctypes.c_char * (APPLICATION_MAX - 1))()
        self.template = (CK_ATTRIBUTE * 7)()
        self._spec = [
            (CKA_CLASS, self.cls), (CKA_TOKEN, self.token), (CKA_KEY_TYPE, self.key_type),
            (CKA_ID, self.key_id), (CKA_LABEL, self.label), (CKA_VALUE, self.value),
            (CKA_APPLICATION, self.application),
        ]  # fmt: skip

    def reset(self) -> None:
        for slot, (kind, buf) in zip(self.template, self._spec):
            slot.type = kind
            slot.pValue = ctypes.addressof(buf)
            slot.ulValueLen = ctypes.sizeof(buf)
        self.cls.value = CK_UNAVAILABLE_INFORMATION  # (CK_OBJECT_CLASS)-1
        self.key_type.value = CK_UNAVAILABLE_INFORMATION
        self.token.value = 0


# what list_items folds in for an unreadable object (C: memset(o, 0, ...))
_ZEROED = _Object(cls=0, token=False, key_type=0, key_id=b"", label=b"", value=b"",
                  application=b"")  # fmt: skip


def _add_object(o: _Object, info: _Info) -> None:
    """Fold one object into the description of its label (add_object)."""
    if not info.label:
        info.label = o.label
    lease = _parse_lease(o)
    if lease is not None:
        info.owner_pid = lease.pid
        info.owner_alive = _lease_alive(lease)
        return
    if o.cls == CKO_CERTIFICATE:
        info.has_certificate = True
        info.describe_cert(o.value)
    elif o.cls == CKO_PRIVATE_KEY:
        info.has_private_key = True
        info.key_type = {CKK_RSA: KEY_RSA, CKK_EC: KEY_EC}.get(o.key_type, KEY_NONE)
    else:
        return
    if not info.key_id and len(o.key_id) <= KEY_ID_MAX:
        info.key_id = o.key_id
    info.ephemeral = not o.token
    if info.ephemeral:
        info.owner_pid = os.getpid()  # session objects belong to this process
        info.owner_alive = 1
    elif not info.owner_pid:
        info.owner_alive = -1  # until its lease says otherwise


# ---------------------------------------------------------------- leases


class _Lease(NamedTuple):
    """A lease's text: the owner process and the key id."""

    pid: int
    start: int
    boot: str
    host: str
    key_id_hex: str


_LEASE_RE = re.compile(
    rb"keychain_ext-lease/1\s*pid=\s*([+-]?\d+)\s*start=\s*([+-]?\d+)\s*boot=\s*(\S{1,39})"
    rb"\s*host=\s*(\S{1,127})\s*id=\s*(\S{1,40})"
)


def _start_time(pid: int) -> int:
    """Start time of a process in clock ticks since boot (/proc/PID/stat
    field 22); 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(1023)
    except OSError:
        return 0
    end = stat.rfind(b")")  # the command name may hold spaces and ')'
    fields = stat[end + 1 :].split() if end >= 0 else []
    try:
        return int(fields[19]) if len(fields) > 19 else 0
    except ValueError:
        return 0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8", errors="replace") as f:
            boot = f.readline().split("\n", 1)[0]
    except OSError:
        boot = ""
    return boot[:39] or "unknown"


def _host_name() -> str:
    try:
        host = os.uname().nodename[:127]
    except OSError:
        host = ""
    return re.split(r"[ \t\n]", host, maxsplit=1)[0] if host else "unknown"


def _make_lease(key_id: bytes) -> bytes:
    pid = os.getpid()
    text = (
        f"keychain_ext-lease/1 pid={pid} start={_start_time(pid)} boot={_boot_id()} "
        f"host={_host_name()} id={key_id.hex()}"
    )
    return text.encode("utf-8", "replace")[:511]


def _parse_lease(o: _Object) -> Optional[_Lease]:
    if o.cls != CKO_DATA or o.application != LEASE_APPLICATION:
        return None
    match = _LEASE_RE.match(_cstr(o.value))
    if match is None:
        return None
    pid, start, boot, host, key_id = match.groups()
    return _Lease(
        int(pid), int(start) % (1 << 64), boot.decode("utf-8", "replace"),
        host.decode("utf-8", "replace"), key_id.decode("ascii", "replace"),
    )  # fmt: skip


def _lease_alive(lease: _Lease) -> int:
    """1 the owner runs, 0 it is dead, -1 cannot tell (another host)."""
    if _host_name() != lease.host:
        return -1
    if _boot_id() != lease.boot:
        return 0  # rebooted since
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return 0
    except OSError:
        pass
    # a recycled pid has another start time
    return 1 if _start_time(lease.pid) == lease.start else 0


# ---------------------------------------------------------------- handle


class _Secret:
    """A PIN kept to log in again after fork(); hidden from repr()."""

    __slots__ = ("value",)

    def __init__(self, value: bytes) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<hidden>"


class CtypesStore:
    """An open store (kc_keychain) on a PKCS#11 token.  Thread-safe."""

    def __init__(self, mod: _Module, slot: int, pin: bytes, lock_path: Optional[str]) -> None:
        self._lock = threading.Lock()  # serializes this handle's calls
        self._mod = mod
        self._f = mod.f
        self._slot = slot
        self._session = CK_INVALID_HANDLE
        self._pid = 0  # process that opened session and lock file
        self._pin: Optional[_Secret] = _Secret(pin)
        self._lock_path = lock_path
        self._lock_fd = -1
        self._closed = False
        # Crypto.cpp's `id` member, done right: the key id of the last
        # import and the label it was imported under.
        self._imported: Optional[tuple[bytes, bytes, bool]] = None  # label, id, ephemeral
        self._buffers = _ObjectBuffers()
        self._found = (CK_ULONG * MAX_FOUND)()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"slot {self._slot}"
        return f"<CtypesStore {self._mod.path} {state}>"

    # ---------------------------------------------------- session and lock

    def _ensure_session(self, reopen_lock: bool = True) -> None:
        """Open (or, after fork(), reopen) the session and the lock file
        (reopen_lock=False: the session only, the lock file is held)."""
        if self._pid == os.getpid():
            return
        with _modules_lock:
            _module_ready(self._mod)
        assert self._pin is not None
        _login(self._mod, self._slot, self._pin.value)
        if self._lock_path and reopen_lock:
            # a forked child gets its own open file: flock is per open file
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
            try:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                        0o600)  # fmt: skip
            except OSError as exc:
                raise _Failure(
                    errSecIO,
                    exc.errno or 0,
                    f"cannot open lock file {self._lock_path}: {exc.strerror}",
                ) from None
        session = CK_ULONG(CK_INVALID_HANDLE)
        rv = self._f.C_OpenSession(self._slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None,
                                   ctypes.byref(session))  # fmt: skip
        if rv != CKR_OK:
            raise _fail_ck(rv, "C_OpenSession")
        self._session = session.value
        self._pid = os.getpid()

    def _ensure_login(self) -> None:
        """The session, logged in (ensure_login): C_GetSessionInfo, and a
        login again when another user of the module in this process
        (libp11 under libcurl's engine, when it unloads) logged out, or a
        new session when it closed all sessions or called C_Finalize -- a
        key is invisible to a session without a login, and a kill must
        never miss it."""
        info = CK_SESSION_INFO()
        rv = CKR_OK
        for attempt in range(TRANSIENT_RETRIES):
            if attempt:
                _backoff(attempt)
            rv = self._f.C_GetSessionInfo(self._session, ctypes.byref(info))
            if not _transient(rv):
                break
        if rv == CKR_OK and info.state in (CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS):
            return
        if rv == CKR_OK:
            assert self._pin is not None
            pin = self._pin.value
            rv = self._f.C_Login(self._session, CKU_USER, pin, len(pin))
            if rv not in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN):
                raise _fail_ck(rv, "C_Login (again)")
            return
        if rv not in (CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
                      CKR_CRYPTOKI_NOT_INITIALIZED):  # fmt: skip
            raise _fail_ck(rv, "C_GetSessionInfo")
        finalized = rv == CKR_CRYPTOKI_NOT_INITIALIZED
        with _modules_lock:  # forget the login (and the C_Initialize)
            if finalized:
                self._mod.init_pid = 0
            for login in self._mod.logins:
                if finalized or login.slot == self._slot:
                    login.pid = 0
        self._pid = 0
        self._ensure_session(reopen_lock=False)  # under the token lock, which stays held

    def _live(self) -> None:
        if self._closed:
            raise_status(errSecParam, "the keychain is closed", operation="keychain")

    def _begin(self) -> None:
        """The handle's lock, the session (reopened after fork), the
        cross-process token lock and the login (every operation starts
        with C_GetSessionInfo, as the C layer's begin()); _end() releases
        them."""
        self._lock.acquire()
        try:
            self._live()
            self._ensure_session()
        except BaseException:
            self._lock.release()
            raise
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # retried on EINTR
        try:
            self._ensure_login()
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._lock.release()

    def _locked(self, operation: str, body: Callable[[], T]) -> T:
        def run() -> T:
            self._begin()
            try:
                return body()
            finally:
                self._end()

        return _api(operation, run)

    # ----------------------------------------------------- token objects

    def _find_init(self, template: Optional[_Template]) -> int:
        """C_FindObjectsInit, recovering a session whose previous search was
        never finished (its C_FindObjectsFinal failed)."""
        f, s = self._f, self._session
        array, count = (None, 0) if template is None else (template.array, template.count)
        rv = f.C_FindObjectsInit(s, array, count)
        if rv == CKR_OPERATION_ACTIVE:
            f.C_FindObjectsFinal(s)
            rv = f.C_FindObjectsInit(s, array, count)
        return int(rv)

    def _find(self, template: _Template, limit: int) -> tuple[int, list[int]]:
        """C_FindObjectsInit / C_FindObjects / C_FindObjectsFinal: up to
        limit handles.  A search changes nothing: transient failures are
        retried."""
        f, s = self._f, self._session
        count = CK_ULONG(0)
        rv = CKR_OK
        for attempt in range(TRANSIENT_RETRIES):
            if attempt:
                _backoff(attempt)
            count.value = 0
            rv = self._find_init(template)
            if rv == CKR_OK:
                rv = f.C_FindObjects(s, self._found, limit, ctypes.byref(count))
                rv_final = f.C_FindObjectsFinal(s)
                if rv == CKR_OK:
                    rv = rv_final
            if not _transient(rv):
                break
        return int(rv), list(self._found[: count.value])

    def _all_objects(self) -> tuple[int, list[int]]:
        """Every object this session can see (all handles first, then the
        caller reads them)."""
        f, s = self._f, self._session
        handles: list[int] = []
        rv = self._find_init(None)
        if rv != CKR_OK:
            return rv, []
        got = CK_ULONG(0)
        while True:
            got.value = 0
            rv = f.C_FindObjects(s, self._found, MAX_FOUND, ctypes.byref(got))
            handles.extend(self._found[: got.value])
            if rv != CKR_OK or got.value != MAX_FOUND:
                break
        f.C_FindObjectsFinal(s)
        return (int(rv), handles) if rv == CKR_OK else (int(rv), [])

    def _read_object(self, handle: int) -> tuple[int, Optional[_Object]]:
        """The attributes lookup reports, in one C_GetAttributeValue."""
        b = self._buffers
        t = b.template
        rv = CKR_OK
        for attempt in range(TRANSIENT_RETRIES):
            if attempt:
                _backoff(attempt)
            b.reset()
            rv = self._f.C_GetAttributeValue(self._session, handle, t, 7)
            if not _transient(rv):
                break
        # These three still fill every attribute they can (PKCS#11 5.7):
        # a key's CKA_VALUE is sensitive, a certificate has no CKA_KEY_TYPE.
        if rv not in (CKR_OK, CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID,
                      CKR_BUFFER_TOO_SMALL):  # fmt: skip
            return rv, None
        if t[0].ulValueLen == CK_UNAVAILABLE_INFORMATION:
            return CKR_OBJECT_HANDLE_INVALID, None

        def length(i: int) -> int:
            n = int(t[i].ulValueLen)
            return 0 if n == CK_UNAVAILABLE_INFORMATION else n

        cls = int(b.cls.value)
        label = _cstr(b.label.raw[: length(4)])
        value = bytes(b.value[: length(5)]) if cls in (CKO_CERTIFICATE, CKO_DATA) else b""
        return CKR_OK, _Object(
            cls, bool(b.token.value), int(b.key_type.value), bytes(b.key_id[: length(3)]),
            label, value, _cstr(b.application.raw[: length(6)]),
        )  # fmt: skip

    def _destroy(self, handle: int) -> int:
        rv = CKR_OK
        for attempt in range(TRANSIENT_RETRIES):
            if attempt:
                _backoff(attempt)
            rv = self._f.C_DestroyObject(self._session, handle)
            if not _transient(rv):
                break
        # already gone (another session removed it) is what we wanted
        return CKR_OK if rv == CKR_OBJECT_HANDLE_INVALID else int(rv)

    def _destroy_all(self, template: _Template, what: str) -> int:
        """Destroy every object the template finds; returns their number."""
        rv, handles = self._find(template, MAX_FOUND)
        if rv != CKR_OK:
            raise _fail_ck(rv, what)
        for h in handles:
            rv = self._destroy(h)
            if rv != CKR_OK:
                raise _fail_ck(rv, what)
        return len(handles)

    # ------------------------------------------------------------ import

    def _read_lease(self, label: bytes) -> Optional[_Lease]:
        """The lease of the token identity under label, if any."""
        tmpl = _Template([(CKA_CLASS, _ulong(CKO_DATA)), (CKA_LABEL, label),
                          (CKA_APPLICATION, LEASE_APPLICATION)])  # fmt: skip
        rv, found = self._find(tmpl, 1)
        if rv != CKR_OK or not found:
            return None
        rv, obj = self._read_object(found[0])
        return _parse_lease(obj) if rv == CKR_OK and obj is not None else None

    def _remove_identity(
        self, label: bytes, key_id: Optional[bytes], with_lease: bool, cert: Optional[int] = None
    ) -> int:
        """Crypto.cpp killKey's core: the certificate, then the private key
        separately (deleting the pair in one call failed when running as
        root), then the lease last, so an interrupted removal still names
        its owner.  With key_id, only objects of that identity go: an
        identity that has replaced ours under the label is left alone.
        cert: the certificate when the caller found it already.
        Returns how many objects went."""
        by_id = [] if key_id is None else [(CKA_ID, key_id)]
        if cert is not None:
            rv = self._destroy(cert)
            if rv != CKR_OK:
                raise _fail_ck(rv, "removing the certificate")
            found = 1
        else:
            found = self._destroy_all(
                _Template([(CKA_CLASS, _ulong(CKO_CERTIFICATE)), (CKA_LABEL, label), *by_id]),
                "removing the certificate",
            )
        found += self._destroy_all(
            _Template([(CKA_CLASS, _ulong(CKO_PRIVATE_KEY)), (CKA_LABEL, label), *by_id]),
            "removing the private key",
        )
        if with_lease:
            by_object_id = [] if key_id is None else [(CKA_OBJECT_ID, key_id)]
            found += self._destroy_all(
                _Template([(CKA_CLASS, _ulong(CKO_DATA)), (CKA_LABEL, label),
                           (CKA_APPLICATION, LEASE_APPLICATION), *by_object_id]),
                "removing the lease",
            )  # fmt: skip
        return found

    def _crash_orphan(self, handle: int, o: _Object) -> bool:
        """An object that holds nothing but PKCS#11 defaults: no label, no
        id, no value or key material.  SoftHSM2 leaves these when a process
        dies inside C_CreateObject (the object exists before its template
        is committed).  Nobody can use one, so removing it harms no one."""
        if o.label or o.key_id:
            return False
        if o.cls == CKO_CERTIFICATE:
            return not o.value
        if o.cls == CKO_DATA:
            return not o.value and not o.application
        if o.cls != CKO_PRIVATE_KEY:
            return False
        material = (CK_ATTRIBUTE * 2)(CK_ATTRIBUTE(CKA_MODULUS, None, 0),
                                      CK_ATTRIBUTE(CKA_EC_PARAMS, None, 0))  # fmt: skip
        self._f.C_GetAttributeValue(self._session, handle, material, 2)
        return all(a.ulValueLen in (0, CK_UNAVAILABLE_INFORMATION) for a in material)

    def _sweep_orphans(self) -> int:
        """Remove every crash orphan (see _crash_orphan) and every object a
        crash left unreadable; returns how many went."""
        rv, handles = self._all_objects()
        if rv != CKR_OK:
            raise _fail_ck(rv, "searching for objects left by a crash")
        removed = 0
        for h in handles:
            rv, obj = self._read_object(h)
            if not _unreadable(rv) and not (
                rv == CKR_OK and obj is not None and self._crash_orphan(h, obj)
            ):
                continue
            rv = self._destroy(h)
            if rv != CKR_OK:
                raise _fail_ck(rv, "removing an object left by a crash")
            removed += 1
        return removed

    def _reclaim(self, label: bytes) -> None:
        """Remove what a dead owner left under label, and the crash orphans
        its death may have left."""
        self._remove_identity(label, None, True)
        self._sweep_orphans()

    def _refuse_duplicate(self, label: bytes, ident: _Identity, flags: int) -> None:
        """Nothing may carry the label (unless its owner is dead and the
        caller asked to reclaim it), and no private key the same id."""
        if flags & RECLAIM_STALE:
            self._sweep_orphans()  # a crash may have left objects no label leads to
        rv, found = self._find(_Template([(CKA_LABEL, label)]), 1)
        if rv != CKR_OK:
            raise _fail_ck(rv, "searching the token")
        if found:
            lease = self._read_lease(label)
            if lease is None:
                raise _Failure(
                    errSecDuplicateItem, 0,
                    f"an identity labelled '{_name(label)}' is already in the store; "
                    "refusing to import over it",
                )  # fmt: skip
            alive = _lease_alive(lease)
            if alive != 0 or not flags & RECLAIM_STALE:
                state = "running" if alive > 0 else "dead" if alive == 0 else "unknown"
                hint = ": reclaim it (stale='reclaim') or purge" if alive == 0 else ""
                raise _Failure(
                    errSecDuplicateItem, 0,
                    f"an identity labelled '{_name(label)}' is already in the store, owned "
                    f"by process {lease.pid} on {lease.host} ({state}); refusing to import "
                    f"over it{hint}",
                )  # fmt: skip
            self._reclaim(label)
        by_id = _Template([(CKA_CLASS, _ulong(CKO_PRIVATE_KEY)), (CKA_ID, ident.key_id)])
        rv, found = self._find(by_id, 1)
        if rv != CKR_OK:
            raise _fail_ck(rv, "searching the token")
        if found:
            raise _Failure(
                errSecDuplicateItem, 0,
                "the private key of this identity is already in the store under another "
                "label; refusing to import it twice",
            )  # fmt: skip

    def _create(self, items: list[tuple[int, bytes]], cls: int, label: bytes, what: str) -> int:
        """C_CreateObject.  After a transient failure the object may exist
        anyway (SoftHSM2 #573): look for it (class and label identify it)
        before trying again, so that nothing is created twice."""
        t = _Template(items)
        probe = _Template([(CKA_CLASS, _ulong(cls)), (CKA_LABEL, label)])
        handle = CK_ULONG(CK_INVALID_HANDLE)
        rv = CKR_OK
        try:
            for attempt in range(TRANSIENT_RETRIES):
                if attempt:
                    _backoff(attempt)
                    st, found = self._find(probe, 1)
                    if st == CKR_OK and found:
                        return found[0]
                rv = self._f.C_CreateObject(self._session, t.array, t.count, ctypes.byref(handle))
                if rv == CKR_OK:
                    return int(handle.value)
                if not _transient(rv):
                    break
        finally:
            t.wipe()
        raise _fail_ck(rv, what)

    def _create_cert(self, ident: _Identity, label: bytes, token: bytes) -> int:
        return self._create(
            [
                (CKA_CLASS, _ulong(CKO_CERTIFICATE)),
                (CKA_CERTIFICATE_TYPE, _ulong(CKC_X_509)),
                (CKA_TOKEN, token),
                (CKA_PRIVATE, _FALSE),
                (CKA_LABEL, label),
                (CKA_ID, ident.key_id),
                (CKA_VALUE, ident.cert_der),
                (CKA_SUBJECT, ident.cert.subject),
                (CKA_ISSUER, ident.cert.issuer),
                (CKA_SERIAL_NUMBER, ident.cert.serial),
            ],
            CKO_CERTIFICATE,
            label,
            "C_CreateObject (certificate)",
        )

    def _create_key(self, ident: _Identity, label: bytes, token: bytes) -> int:
        # Crypto.cpp createAccess: private, sensitive, never extractable,
        # good for signing only.
        return self._create(
            [
                (CKA_CLASS, _ulong(CKO_PRIVATE_KEY)),
                (CKA_KEY_TYPE, _ulong(CKK_RSA if ident.key_type == KEY_RSA else CKK_EC)),
                (CKA_TOKEN, token),
                (CKA_LABEL, label),
                (CKA_ID, ident.key_id),
                (CKA_PRIVATE, _TRUE),
                (CKA_SENSITIVE, _TRUE),
                (CKA_EXTRACTABLE, _FALSE),
                (CKA_SIGN, _TRUE),
                (CKA_DECRYPT, _FALSE),
                (CKA_UNWRAP, _FALSE),
                (CKA_DERIVE, _FALSE),
                (CKA_SIGN_RECOVER, _FALSE),
                (CKA_ALWAYS_AUTHENTICATE, _FALSE),
                *ident.key_attrs,
            ],
            CKO_PRIVATE_KEY,
            label,
            "C_CreateObject (private key)",
        )

    def _create_lease(self, ident: _Identity, label: bytes) -> int:
        return self._create(
            [
                (CKA_CLASS, _ulong(CKO_DATA)),
                (CKA_TOKEN, _TRUE),
                (CKA_PRIVATE, _TRUE),
                (CKA_LABEL, label),
                (CKA_APPLICATION, LEASE_APPLICATION),
                # the key id, so kill finds its own lease without reading it
                (CKA_OBJECT_ID, ident.key_id),
                (CKA_VALUE, _make_lease(ident.key_id)),
            ],
            CKO_DATA,
            label,
            "C_CreateObject (lease)",
        )

    def preauth_key(self, p12: bytes, password: bytes, label: bytes, flags: int) -> ItemInfo:
        """Crypto.cpp preAuthKey (kc_preauth_key)."""
        self._live()
        label, password = _cstr(label), _cstr(password)
        token = _FALSE if flags & EPHEMERAL else _TRUE

        def checked() -> _Identity:
            _check_label(label)
            if flags & ~(EPHEMERAL | RECLAIM_STALE):
                raise _Failure(errSecParam, 0, f"unknown flags 0x{flags & 0xFFFFFFFF:x}")
            # parse before touching the store: a bad file changes nothing
            return _copy_identity_from_pkcs12(p12, password)

        ident = _api("preauth_key", checked)

        def body() -> ItemInfo:
            self._refuse_duplicate(label, ident, flags)
            made: list[int] = []  # lease, certificate, key: undone in reverse
            try:
                # The lease goes first and leaves last: every partial state
                # a crash can leave names its (dead) owner.
                if token == _TRUE:
                    made.append(self._create_lease(ident, label))
                made.append(self._create_cert(ident, label, token))
                made.append(self._create_key(ident, label, token))
            except _Failure as exc:
                # all or nothing: take back out what this call created
                message = exc.message
                for h in reversed(made):
                    rv = self._destroy(h)
                    if rv != CKR_OK:
                        message += f"; undoing the import also failed: {_ckr_name(rv)}"
                if message == exc.message:
                    raise
                raise _Failure(exc.status, exc.native, message) from None
            self._imported = (label, ident.key_id, token == _FALSE)
            info = _Info(
                label=label, has_certificate=True, has_private_key=True,
                ephemeral=token == _FALSE, key_type=ident.key_type, key_id=ident.key_id,
                owner_pid=os.getpid(), owner_alive=1,
            )  # fmt: skip
            info.describe_cert(ident.cert_der)
            return info.item()

        return self._locked("preauth_key", body)

    # -------------------------------------------------------------- kill

    def _remove_session_objects(self, handles: list[int]) -> None:
        """Remove an ephemeral identity: the session objects found under its
        label (only this process sees them, so they are ours), certificates
        first -- one C_GetAttributeValue (CKA_CLASS) per object, then the
        destroys, as kc_kill_key does."""
        classes = []
        for h in handles:
            cls = CK_ULONG(0)
            attr = CK_ATTRIBUTE(CKA_CLASS, ctypes.addressof(cls), ctypes.sizeof(cls))
            rv = self._f.C_GetAttributeValue(self._session, h, ctypes.byref(attr), 1)
            if rv != CKR_OK:
                raise _fail_ck(rv, "reading the identity's objects")
            classes.append(int(cls.value))
        for certificates in (True, False):
            for h, cls in zip(handles, classes):
                if (cls == CKO_CERTIFICATE) != certificates:
                    continue
                rv = self._destroy(h)
                if rv != CKR_OK:
                    raise _fail_ck(
                        rv,
                        "removing the certificate" if certificates else "removing the private key",
                    )

    def kill_key(self, label: bytes) -> None:
        """Crypto.cpp killKey (kc_kill_key): the certificate, then the key
        separately.  An ephemeral identity is found as the C layer finds
        it (one search of the session objects under the label); a token
        identity by the remembered id, else by the certificate's (this
        port's own token path, see the module docstring)."""
        self._live()
        label = _cstr(label)
        _api("kill_key", lambda: _check_label(label))

        def body() -> None:
            imported = self._imported
            ours = imported is not None and imported[0] == label
            if imported is not None and ours and not imported[2]:
                # a token identity this handle imported: its lease is ours
                if not self._remove_identity(label, imported[1], True):
                    raise _Failure(
                        errSecItemNotFound, 0, f"no identity labelled '{_name(label)}' in the store"
                    )
                self._imported = None
                return
            # An ephemeral identity of this process goes first.
            scope = _Template([(CKA_TOKEN, _FALSE), (CKA_LABEL, label)])
            rv, found = self._find(scope, MAX_FOUND)
            if rv != CKR_OK:
                raise _fail_ck(rv, "searching the token")
            if found:
                self._remove_session_objects(found)
                if ours:
                    self._imported = None
                return
            # A token identity another handle or process imported: the key
            # id is the certificate's.
            key_id: Optional[bytes] = None
            cert: Optional[int] = None
            cert_tmpl = _Template([(CKA_CLASS, _ulong(CKO_CERTIFICATE)), (CKA_LABEL, label)])
            rv, found = self._find(cert_tmpl, 1)
            if rv != CKR_OK:
                raise _fail_ck(rv, "searching the certificate")
            if found:
                cert = found[0]
                buf = (ctypes.c_ubyte * KEY_ID_MAX)()
                attr = CK_ATTRIBUTE(CKA_ID, ctypes.addressof(buf), KEY_ID_MAX)
                rv = self._f.C_GetAttributeValue(self._session, cert,
                                                 ctypes.byref(attr), 1)  # fmt: skip
                if rv == CKR_OK and attr.ulValueLen:
                    key_id = bytes(buf[: attr.ulValueLen])
            if not self._remove_identity(label, key_id, True, cert):
                raise _Failure(
                    errSecItemNotFound, 0, f"no identity labelled '{_name(label)}' in the store"
                )
            if ours:
                self._imported = None

        self._locked("kill_key", body)

    # ----------------------------------------------------------- reclaim

    def reclaim_stale(self, label: Optional[bytes]) -> None:
        """kc_reclaim_stale: remove label's identity if its owner process is
        dead (errSecItemNotFound if it has no lease, errSecDuplicateItem if
        the owner runs or cannot be judged).  With label None (or empty),
        remove only the objects a process killed inside C_CreateObject can
        leave; errSecItemNotFound if there are none."""
        self._live()
        if not label:

            def sweep() -> None:
                if not self._sweep_orphans():
                    raise _Failure(errSecItemNotFound, 0, "no objects left by a crash in the store")

            self._locked("reclaim_stale", sweep)
            return
        name = _cstr(label)
        _api("reclaim_stale", lambda: _check_label(name))

        def body() -> None:
            lease = self._read_lease(name)
            if lease is None:
                raise _Failure(
                    errSecItemNotFound, 0,
                    f"no leased identity labelled '{_name(name)}' in the store",
                )  # fmt: skip
            alive = _lease_alive(lease)
            if alive != 0:
                raise _Failure(
                    errSecDuplicateItem, 0,
                    f"the identity labelled '{_name(name)}' is owned by process {lease.pid} "
                    f"on {lease.host} ({'running' if alive > 0 else 'unknown'}): not stale",
                )  # fmt: skip
            self._reclaim(name)

        self._locked("reclaim_stale", body)

    # ---------------------------------------------------- lookup and list

    def lookup(self, label: bytes) -> Optional[ItemInfo]:
        """Crypto.cpp lookupKeychainItem: None when nothing carries the label."""
        self._live()
        label = _cstr(label)
        _api("lookup_keychain_item", lambda: _check_label(label))

        def body() -> Optional[ItemInfo]:
            rv, handles = self._find(_Template([(CKA_LABEL, label)]), MAX_FOUND)
            if rv != CKR_OK:
                raise _fail_ck(rv, "searching the token")
            info = _Info()
            for h in handles:
                rv, obj = self._read_object(h)
                if rv == CKR_OBJECT_HANDLE_INVALID:
                    continue  # removed meanwhile by another session
                if rv != CKR_OK or obj is None:
                    raise _fail_ck(rv, "reading an object")
                _add_object(obj, info)
            if not info.has_certificate and not info.has_private_key:
                return None  # errSecItemNotFound
            return info.item()

        return self._locked("lookup_keychain_item", body)

    def list_items(self) -> list[ItemInfo]:
        """Every identity on the token, one entry per label, incomplete ones
        included (kc_list_items)."""
        self._live()

        def body() -> list[ItemInfo]:
            rv, handles = self._all_objects()
            if rv != CKR_OK:
                raise _fail_ck(rv, "listing the token")
            items: dict[bytes, _Info] = {}
            for h in handles:
                # identities (labelled certificates, keys, our leases), and
                # crash leftovers, which group under the empty label
                rv, obj = self._read_object(h)
                if _unreadable(rv):
                    obj = _ZEROED
                elif rv != CKR_OK or obj is None:
                    continue
                elif obj.label:
                    if (
                        obj.cls not in (CKO_CERTIFICATE, CKO_PRIVATE_KEY)
                        and obj.application != LEASE_APPLICATION
                    ):
                        continue
                elif not self._crash_orphan(h, obj):
                    continue
                _add_object(obj, items.setdefault(obj.label, _Info()))
            return [info.item() for info in items.values()]

        return self._locked("list_items", body)

    def close(self) -> None:
        """Close the handle: its session objects vanish.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Only the process that opened the session may close it: a
            # forked child's copy must not close its parent's session.
            if self._pid == os.getpid() and self._session != CK_INVALID_HANDLE:
                self._f.C_CloseSession(self._session)
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
            self._pin = None


def _name(label: bytes) -> str:
    return label.decode("utf-8", "surrogateescape")


def _check_label(label: bytes) -> None:
    if not label:
        raise _Failure(errSecParam, 0, "empty label")
    if len(label) >= LABEL_MAX:
        raise _Failure(errSecParam, 0, f"label longer than {LABEL_MAX - 1} bytes")


# --------------------------------------------------------------- backend


class CtypesBackend:
    """keychain.h through ctypes (no compiled extension)."""

    name = "ctypes"

    def open(self, module: str, token: str, pin: str, lock_path: Optional[str]) -> CtypesStore:
        """kc_open: the token labelled ``token`` of ``module``, logged in."""

        def run() -> CtypesStore:
            if not module:
                raise _Failure(errSecParam, 0, "no PKCS#11 module given")
            if not token:
                raise _Failure(errSecParam, 0, "no token label given")
            raw_token = _cstr(token.encode("utf-8"))
            if len(raw_token) > TOKEN_LABEL_LEN:
                raise _Failure(errSecParam, 0, f"token label longer than {TOKEN_LABEL_LEN} bytes")
            m = _get_module(module)
            # Reading the token while another process writes it is what
            # SoftHSM2 gets wrong: opening takes the token lock too (closing
            # the file drops it).  A lock file that cannot be opened here is
            # reported by the session's own open below.
            lock_fd = -1
            if lock_path:
                with contextlib.suppress(OSError):
                    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if lock_fd >= 0:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # retried on EINTR
                return self._open_locked(m, raw_token, pin, lock_path)
            finally:
                if lock_fd >= 0:
                    os.close(lock_fd)

        return _api("open", run)

    @staticmethod
    def _open_locked(
        m: _Module, raw_token: bytes, pin: Optional[str], lock_path: Optional[str]
    ) -> CtypesStore:
        """kc_open's part under the token lock: slot, login, session."""
        slot, flags = _find_slot(m, raw_token, want_uninitialized=False)
        # A PIN pad or other protected path would prompt someone: never.
        if flags & CKF_PROTECTED_AUTHENTICATION_PATH:
            raise _Failure(
                errSecInteractionNotAllowed, 0,
                f"token '{_name(raw_token)}' needs a protected authentication path (PIN pad); "
                "keychain_ext never prompts",
            )  # fmt: skip
        if pin is None:
            raise _Failure(
                errSecInteractionRequired,
                0,
                f"token '{_name(raw_token)}' needs a PIN and none was given",
            )
        store = CtypesStore(m, slot, _cstr(pin.encode("utf-8")), lock_path or None)
        try:
            store._ensure_session()
        except BaseException:
            store.close()
            raise
        return store

    def init_token(self, module: str, token: str, so_pin: str, user_pin: str) -> None:
        """kc_init_token: initialize the first free token with the label
        and PINs (no PIN ever in an argv)."""

        def run() -> None:
            if not module or not token or so_pin is None or user_pin is None:
                raise _Failure(errSecParam, 0, "module, token label and both PINs are required")
            raw_token = _cstr(token.encode("utf-8"))
            if len(raw_token) > TOKEN_LABEL_LEN:
                raise _Failure(errSecParam, 0, f"token label longer than {TOKEN_LABEL_LEN} bytes")
            so, user = _cstr(so_pin.encode("utf-8")), _cstr(user_pin.encode("utf-8"))
            m = _get_module(module)
            slot, _ = _find_slot(m, raw_token, want_uninitialized=True)
            f = m.f
            rv = f.C_InitToken(slot, so, len(so), _pad_label(raw_token))
            if rv != CKR_OK:
                raise _fail_ck(rv, "C_InitToken")
            session = CK_ULONG(CK_INVALID_HANDLE)
            rv = f.C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, None, None,
                                 ctypes.byref(session))  # fmt: skip
            if rv != CKR_OK:
                raise _fail_ck(rv, "C_OpenSession")
            try:
                rv = f.C_Login(session, CKU_SO, so, len(so))
                if rv != CKR_OK:
                    raise _fail_ck(rv, "C_Login (SO)")
                rv = f.C_InitPIN(session, user, len(user))
                f.C_Logout(session)
                if rv != CKR_OK:
                    raise _fail_ck(rv, "C_InitPIN")
            finally:
                f.C_CloseSession(session)

        _api("init_token", run)


def open_store(module: str, token: str, pin: str, lock_path: Optional[str] = None) -> CtypesStore:
    """The benchmark ports' entry point (benchmarks/runner.py PortImpl)."""
    return CtypesBackend().open(module, token, pin, lock_path)


if TYPE_CHECKING:
    from keychain_ext._backend import Store

    # CtypesStore must structurally match the protocol the façade talks to.
    _store_conforms: type[Store] = CtypesStore
