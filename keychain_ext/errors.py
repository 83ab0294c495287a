"""Typed exceptions for OSStatus codes.

Every backend reports failures as an OSStatus (Apple's ``errSec*`` values,
also on Linux). One table below maps each code to its symbol, a default
message and an exception class; a code the table does not know raises
:class:`KeychainError` itself with the code kept in ``.status``.

Each class also inherits the builtin that fits where one exists, so callers
may catch either: ``ItemNotFoundError`` is a ``LookupError``,
``DecodeError`` a ``ValueError``, ``DuplicateItemError`` a
``FileExistsError`` and so on.
"""

from __future__ import annotations

from typing import NoReturn, Optional


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

    status: int = 0

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
        self.symbol, default = _SYMBOLS.get(status, ("unknown OSStatus", "unknown error"))
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

    status = -4


class IOFailureError(KeychainError):
    """The store failed with an I/O or device error."""

    status = -36


class ParamError(KeychainError, ValueError):
    """An argument was invalid (empty label, NUL byte, too long, ...)."""

    status = -50


class WritePermissionError(KeychainError, PermissionError):
    """No write permission on the store."""

    status = -61


class AllocateError(KeychainError, MemoryError):
    """Memory or store capacity ran out."""

    status = -108


class UserCanceledError(KeychainError):
    """The user canceled the operation."""

    status = -128


class NotAvailableError(KeychainError):
    """The store is not available."""

    status = -25291


class ReadOnlyError(KeychainError, PermissionError):
    """The store is read-only."""

    status = -25292


class AuthFailedError(KeychainError, PermissionError):
    """Authentication failed: wrong PIN (or, on macOS, wrong p12 password)."""

    status = -25293


class NoSuchKeychainError(KeychainError, LookupError):
    """The store does not exist: module, token or keychain missing."""

    status = -25294


class DuplicateItemError(KeychainError, FileExistsError):
    """An identity with this label (or this key) is already in the store."""

    status = -25299


class ItemNotFoundError(KeychainError, LookupError):
    """Nothing in the store carries this label."""

    status = -25300


class InvalidItemRefError(KeychainError):
    """An item vanished or its reference is no longer valid."""

    status = -25304


class NoDefaultKeychainError(KeychainError, LookupError):
    """There is no default store."""

    status = -25307


class InteractionNotAllowedError(KeychainError):
    """The operation would need user interaction, which is never allowed."""

    status = -25308


class InteractionRequiredError(KeychainError):
    """The operation needs input that was not given (e.g. a PIN)."""

    status = -25315


class UnknownFormatError(KeychainError, ValueError):
    """The data is in a format the store does not know."""

    status = -25257


class PassphraseRequiredError(KeychainError, ValueError):
    """The PKCS#12 data needs a password."""

    status = -25260


class Pkcs12VerifyFailureError(AuthFailedError):
    """The PKCS#12 password is wrong (its MAC did not verify)."""

    status = -25264


class DecodeError(KeychainError, ValueError):
    """The data is not a usable PKCS#12 identity (corrupt, empty, no key...)."""

    status = -26275


class MissingEntitlementError(KeychainError, PermissionError):
    """The process lacks an entitlement the keychain requires (macOS)."""

    status = -34018


# The one table: OSStatus -> (symbol, default message); classes by status.
_SYMBOLS: dict[int, tuple[str, str]] = {
    0: ("errSecSuccess", "no error"),
    -4: ("errSecUnimplemented", "function or operation not implemented"),
    -36: ("errSecIO", "I/O error"),
    -50: ("errSecParam", "one or more parameters passed to a function were not valid"),
    -61: ("errSecWrPerm", "write permissions error"),
    -108: ("errSecAllocate", "failed to allocate memory"),
    -128: ("errSecUserCanceled", "user canceled the operation"),
    -25291: ("errSecNotAvailable", "no keychain is available"),
    -25292: ("errSecReadOnly", "this keychain cannot be modified"),
    -25293: ("errSecAuthFailed", "the user name or passphrase you entered is not correct"),
    -25294: ("errSecNoSuchKeychain", "the specified keychain could not be found"),
    -25299: ("errSecDuplicateItem", "the specified item already exists in the keychain"),
    -25300: ("errSecItemNotFound", "the specified item could not be found in the keychain"),
    -25304: ("errSecInvalidItemRef", "the specified item is no longer valid"),
    -25307: ("errSecNoDefaultKeychain", "a default keychain could not be found"),
    -25308: ("errSecInteractionNotAllowed", "user interaction is not allowed"),
    -25315: ("errSecInteractionRequired", "user interaction is required"),
    -25257: ("errSecUnknownFormat", "the item you are trying to import has an unknown format"),
    -25260: ("errSecPassphraseRequired", "a passphrase is required for import/export"),
    -25264: ("errSecPkcs12VerifyFailure", "MAC verification failed during PKCS12 import"),
    -26275: ("errSecDecode", "unable to decode the provided data"),
    -34018: ("errSecMissingEntitlement", "a required entitlement is missing"),
}

_CLASSES: dict[int, type[KeychainError]] = {
    cls.status: cls
    for cls in (
        UnimplementedError,
        IOFailureError,
        ParamError,
        WritePermissionError,
        AllocateError,
        UserCanceledError,
        NotAvailableError,
        ReadOnlyError,
        AuthFailedError,
        NoSuchKeychainError,
        DuplicateItemError,
        ItemNotFoundError,
        InvalidItemRefError,
        NoDefaultKeychainError,
        InteractionNotAllowedError,
        InteractionRequiredError,
        UnknownFormatError,
        PassphraseRequiredError,
        Pkcs12VerifyFailureError,
        DecodeError,
        MissingEntitlementError,
    )
}


def error_class(status: int) -> type[KeychainError]:
    """The exception class for an OSStatus (KeychainError if unknown)."""
    return _CLASSES.get(status, KeychainError)


def symbol(status: int) -> str:
    """The ``errSec*`` name of an OSStatus, or ``"unknown OSStatus"``."""
    return _SYMBOLS.get(status, ("unknown OSStatus", ""))[0]


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
    *(cls.__name__ for cls in _CLASSES.values()),
]
