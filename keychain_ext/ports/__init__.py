"""Pure-Python implementations of the C API (keychain.h).

:mod:`keychain_ext.ports.ctypes_pkcs11` is the PKCS#11 backend written with
``ctypes`` (no compiler needed; needs the ``cryptography`` package), selected
with ``Keychain(impl="ctypes")``.
"""
