"""keychain_ext: use a TLS client identity from the OS key store without any
prompt, for exactly as long as needed, and leave nothing behind."""

from ._backend import DarwinKeychain, Pkcs11Token
from ._version import __version__
from .errors import (
    AuthFailedError,
    DecodeError,
    DuplicateItemError,
    InteractionNotAllowedError,
    InteractionRequiredError,
    InvalidOwnerEditError,
    ItemNotFoundError,
    KeychainError,
    NoSuchKeychainError,
    ParamError,
    Pkcs12VerifyFailureError,
)
from .keychain import Identity, Keychain

__all__ = [
    "AuthFailedError",
    "DarwinKeychain",
    "DecodeError",
    "DuplicateItemError",
    "Identity",
    "InteractionNotAllowedError",
    "InteractionRequiredError",
    "InvalidOwnerEditError",
    "ItemNotFoundError",
    "Keychain",
    "KeychainError",
    "NoSuchKeychainError",
    "ParamError",
    "Pkcs11Token",
    "Pkcs12VerifyFailureError",
    "__version__",
]
