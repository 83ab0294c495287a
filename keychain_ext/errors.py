"""Typed exceptions for OSStatus codes.

Every backend reports failures as an OSStatus (Apple's ``errSec*`` values,
also on Linux).  The numbers are keychain.h's ``KC_errSec*`` constants, read
off the compiled module; the one table below maps each symbol to an
exception class and a default message.  A code the table does not know
raises :class:`KeychainError` itself with the code kept in ``.status``.

Each class also inherits the builtin that fits where one exists, so callers
may catch either: ``ItemNotFoundError`` is a ``LookupError``,
``DecodeError`` a ``ValueError``, ``DuplicateItemError`` a
``FileExistsError`` and so on.
"""

from __future__ import annotations

from typing import NoReturn, Optional

from ._native_backend import STATUS


class KeychainError(OSError):
    """A key store operation failed.

    Attributes:
        status: the OSStatus (``errSec*``) code, 0 never.
        symbol: the code's name, e.g. ``"errSecDuplicateItem"``.
        operation: what was being done, e.g. ``"preauth_key"``.
        native_code: the backend's own code (``CK_RV``, OpenSSL error or
            OSStatus), or None.
        detail: the backend's message (never contains a PIN or password).
    """

    status: int = STATUS["errSecSuccess"]  # each subclass's: set from _TABLE below

    def __init__(
        self,
        status: Optional[int] = None,
        detail: Optional[str] = None,
        *,
        operation: Optional[str] = None,
        native_code: Optional[int] = None,
    ) -> None:
        if status is None:
            status = type(self).status
        self.status = status
        self.symbol, _, default = _BY_STATUS.get(
            status, ("unknown OSStatus", KeychainError, "unknown error")
        )
        self.detail = detail or default
        self.operation = operation
        self.native_code = native_code
        where = f"{operation}: " if operation else ""
        super().__init__(f"{where}{self.detail} [{self.symbol} {status}]")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.status, self.detail, self.operation, self.native_code))


def _rebuild(
    cls: type[KeychainError],
    status: int,
    detail: str,
    operation: Optional[str],
    native_code: Optional[int],
) -> KeychainError:
    return cls(status, detail, operation=operation, native_code=native_code)


class UnimplementedError(KeychainError):
    """The store cannot do this (e.g. an unsupported key type)."""


class IOFailureError(KeychainError):
    """The store failed with an I/O or device error."""


class ParamError(KeychainError, ValueError):
    """An argument was invalid (empty label, NUL byte, too long, ...)."""


class WritePermissionError(KeychainError, PermissionError):
    """No write permission on the store."""


class AllocateError(KeychainError, MemoryError):
    """Memory or store capacity ran out."""


class UserCanceledError(KeychainError):
    """The user canceled the operation."""


class NotAvailableError(KeychainError):
    """The store is not available."""


class ReadOnlyError(KeychainError, PermissionError):
    """The store is read-only."""


class AuthFailedError(KeychainError, PermissionError):
    """Authentication failed: wrong PIN (or, on macOS, wrong p12 password)."""


class NoSuchKeychainError(KeychainError, LookupError):
    """The store does not exist: module, token or keychain missing."""


class DuplicateItemError(KeychainError, FileExistsError):
    """An identity with this label (or this key) is already in the store."""


class ItemNotFoundError(KeychainError, LookupError):
    """Nothing in the store carries this label."""


class InvalidItemRefError(KeychainError):
    """An item vanished or its reference is no longer valid."""


class NoDefaultKeychainError(KeychainError, LookupError):
    """There is no default store."""


class InteractionNotAllowedError(KeychainError):
    """The operation would need user interaction, which is never allowed."""


class InteractionRequiredError(KeychainError):
    """The operation needs input that was not given (e.g. a PIN)."""


class UnknownFormatError(KeychainError, ValueError):
    """The data is in a format the store does not know."""


class PassphraseRequiredError(KeychainError, ValueError):
    """The PKCS#12 data needs a password."""


class Pkcs12VerifyFailureError(AuthFailedError):
    """The PKCS#12 password is wrong (its MAC did not verify)."""


class DecodeError(KeychainError, ValueError):
    """The data is not a usable PKCS#12 identity (corrupt, empty, no key...)."""


class InvalidOwnerEditError(KeychainError, PermissionError):
    """The identity is not this process's to remove: another live process
    owns it, or keychain_ext did not make it (``force=True`` overrides)."""


class MissingEntitlementError(KeychainError, PermissionError):
    """The process lacks an entitlement the keychain requires (macOS)."""


# The one table: symbol (keychain.h KC_<symbol>) -> class, default message.
_TABLE: dict[str, tuple[type[KeychainError], str]] = {
    "errSecSuccess": (KeychainError, "no error"),
    "errSecUnimplemented": (UnimplementedError, "function or operation not implemented"),
    "errSecIO": (IOFailureError, "I/O error"),
    "errSecParam": (ParamError, "one or more parameters passed to a function were not valid"),
    "errSecWrPerm": (WritePermissionError, "write permissions error"),
    "errSecAllocate": (AllocateError, "failed to allocate memory"),
    "errSecUserCanceled": (UserCanceledError, "user canceled the operation"),
    "errSecNotAvailable": (NotAvailableError, "no keychain is available"),
    "errSecReadOnly": (ReadOnlyError, "this keychain cannot be modified"),
    "errSecAuthFailed": (
        AuthFailedError,
        "the user name or passphrase you entered is not correct",
    ),
    "errSecNoSuchKeychain": (NoSuchKeychainError, "the specified keychain could not be found"),
    "errSecDuplicateItem": (
        DuplicateItemError,
        "the specified item already exists in the keychain",
    ),
    "errSecItemNotFound": (
        ItemNotFoundError,
        "the specified item could not be found in the keychain",
    ),
    "errSecInvalidItemRef": (InvalidItemRefError, "the specified item is no longer valid"),
    "errSecNoDefaultKeychain": (NoDefaultKeychainError, "a default keychain could not be found"),
    "errSecInteractionNotAllowed": (
        InteractionNotAllowedError,
        "user interaction is not allowed",
    ),
    "errSecInteractionRequired": (InteractionRequiredError, "user interaction is required"),
    "errSecUnknownFormat": (
        UnknownFormatError,
        "the item you are trying to import has an unknown format",
    ),
    "errSecPassphraseRequired": (
        PassphraseRequiredError,
        "a passphrase is required for import/export",
    ),
    "errSecPkcs12VerifyFailure": (
        Pkcs12VerifyFailureError,
        "MAC verification failed during PKCS12 import",
    ),
    "errSecDecode": (DecodeError, "unable to decode the provided data"),
    "errSecMissingEntitlement": (MissingEntitlementError, "a required entitlement is missing"),
    "errSecInvalidOwnerEdit": (
        InvalidOwnerEditError,
        "invalid attempt to change the owner of this item",
    ),
}

# status -> (symbol, class, message); each class learns its status
_BY_STATUS: dict[int, tuple[str, type[KeychainError], str]] = {}
for _symbol, (_cls, _message) in _TABLE.items():
    _BY_STATUS[STATUS[_symbol]] = (_symbol, _cls, _message)
    if _cls is not KeychainError:
        _cls.status = STATUS[_symbol]


def error_class(status: int) -> type[KeychainError]:
    """The exception class for an OSStatus (KeychainError if unknown)."""
    return _BY_STATUS.get(status, ("", KeychainError, ""))[1]


def symbol(status: int) -> str:
    """The ``errSec*`` name of an OSStatus, or ``"unknown OSStatus"``."""
    return _BY_STATUS.get(status, ("unknown OSStatus", KeychainError, ""))[0]


def raise_status(
    status: int,
    detail: Optional[str] = None,
    *,
    operation: Optional[str] = None,
    native_code: Optional[int] = None,
) -> NoReturn:
    """Raise the exception the table maps ``status`` to."""
    raise error_class(status)(status, detail, operation=operation, native_code=native_code)


__all__ = [
    "KeychainError",
    "error_class",
    "raise_status",
    "symbol",
    *(cls.__name__ for cls, _ in _TABLE.values() if cls is not KeychainError),
]
