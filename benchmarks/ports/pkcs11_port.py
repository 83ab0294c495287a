"""The keychain_ext flow written with python-pkcs11 (benchmark only, not
shipped).

Same calls as csrc/keychain_pkcs11.c where python-pkcs11 allows it:

- searches use ``SearchIter`` with one batch of 64 handles, then stop:
  C_FindObjectsInit + one C_FindObjects + C_FindObjectsFinal.
  (``Session.get_objects`` calls C_FindObjects until it returns nothing: one
  call more per search.)
- What python-pkcs11 does not let us avoid: every object it hands back —
  created or found — goes through ``make_object``, which reads ten
  attributes (CKA_CLASS and the capability flags) in two
  C_GetAttributeValue calls (sizes, then values) to pick the Python class;
  and ``get_attributes`` is two calls as well.  So a cycle costs 8 calls
  more than the C layer's 16, and a lookup hit 6 more than its 5.

Module handling: the ``pkcs11.lib()`` entry point calls
``C_Initialize(NULL)`` and raises when the module is already initialized
(CKR_CRYPTOKI_ALREADY_INITIALIZED), and NULL init args make SoftHSM2 turn its
mutexes off for the whole process.  So the library object is created without
running its ``__init__`` and initializes the module only if nobody did
(the benchmark always opens the C extension first, with
CKF_OS_LOCKING_OK).  It is kept alive for the life of the process: never
``unload()``ed, never ``C_Finalize``d.

A python-pkcs11 session opened with a PIN calls ``C_Logout`` in
``close()``, which logs out every session of the application: the store
logs in only if the token is not logged in yet, and ``close()`` never
closes a session it logged in with.
"""

from __future__ import annotations

import threading
from typing import Optional

import pkcs11
from pkcs11 import Attribute, ObjectClass
from pkcs11 import _pkcs11 as _impl

from ._material import (
    LEASE_APPLICATION,
    CKK_EC,
    CKK_RSA,
    EPHEMERAL,
    DuplicateItemError,
    ItemNotFoundError,
    LookupResult,
    Material,
    cert_template,
    key_template,
    lease_template,
    parse_p12,
)

NAME = "python-pkcs11"
MAX_FOUND = 64

_libs: dict[str, object] = {}   # never unloaded: no C_Finalize
_libs_lock = threading.Lock()


def _lib(module: str):  # type: ignore[no-untyped-def]
    with _libs_lock:
        lib = _libs.get(module)
        if lib is None:
            lib = _impl.lib.__new__(_impl.lib, module)  # loads, does not initialize
            try:
                lib.initialize()
            except pkcs11.PKCS11Error as exc:
                if "already initialized" not in str(exc):
                    raise
            _libs[module] = lib
        return lib


def _dict(template: list) -> dict:
    # python-pkcs11 packs CKA_LABEL from str; everything else from bytes/int/bool
    return {t: (v.decode() if t == Attribute.LABEL else v) for t, v in template}


class Pkcs11Store:
    """One session on the token."""

    name = NAME

    def __init__(self, module: str, token: str, pin: str) -> None:
        lib = _lib(module)
        tok = next(iter(lib.get_tokens(token_label=token)), None)
        if tok is None:
            raise LookupError(f"no token labelled {token!r}")
        self._logged_in_here = True
        try:
            self._session = tok.open(rw=True, user_pin=pin)
        except pkcs11.UserAlreadyLoggedIn:
            # The application is logged in already (login state is shared by
            # all sessions).  python-pkcs11 does not hand back the session of
            # the failed attempt; it stays open until the process ends.
            self._session = tok.open(rw=True)
            self._logged_in_here = False
        self._lock = threading.Lock()
        self._imported: Optional[tuple] = None  # (label, key id, token objects)

    def _find(self, attrs: dict) -> list:
        with _impl.SearchIter(self._session, attrs, MAX_FOUND) as search:
            try:
                return list(next(search))
            except StopIteration:
                return []

    def preauth_key(self, p12: bytes, password: bytes, label: bytes, flags: int) -> Material:
        return self.preauth_material(parse_p12(p12, password), label, flags)

    def preauth_material(self, m: Material, label: bytes, flags: int) -> Material:
        token = not (flags & EPHEMERAL)
        with self._lock:
            if self._find({Attribute.LABEL: label.decode()}) or self._find(
                    {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: m.key_id}):
                raise DuplicateItemError(detail="already in the store", operation="preauth_key")
            made = []
            try:
                if token:
                    made.append(self._session.create_object(_dict(lease_template(m, label))))
                made.append(self._session.create_object(_dict(cert_template(m, label, token))))
                self._session.create_object(_dict(key_template(m, label, token)))
            except Exception:
                for obj in reversed(made):  # all or nothing
                    obj.destroy()
                raise
            self._imported = (label, m.key_id, token)
        return m

    def kill_key(self, label: bytes) -> None:
        text = label.decode()
        cert_t = {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: text}
        with self._lock:
            key_id = self._imported[1] if self._imported and self._imported[0] == label else None
            if key_id is None:
                certs = self._find(cert_t)
                if certs:
                    key_id = certs[0][Attribute.ID]
            certs = self._find(cert_t)
            for obj in certs:
                obj.destroy()
            key_t = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: text}
            if key_id:
                key_t[Attribute.ID] = key_id
            keys = self._find(key_t)
            for obj in keys:
                obj.destroy()
            ours = self._imported and self._imported[0] == label
            if not ours or self._imported[2]:  # the lease of a token identity, last
                for obj in self._find({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: text,
                                       Attribute.APPLICATION: LEASE_APPLICATION}):
                    obj.destroy()
            if self._imported and self._imported[0] == label:
                self._imported = None
        if not certs and not keys:
            raise ItemNotFoundError(detail="nothing carries the label", operation="kill_key")

    def lookup(self, label: bytes) -> Optional[LookupResult]:
        certs, keys = [], []
        with self._lock:
            for obj in self._find({Attribute.LABEL: label.decode()}):
                if isinstance(obj, pkcs11.Certificate):
                    certs.append(obj.get_attributes(
                        [Attribute.TOKEN, Attribute.ID, Attribute.LABEL, Attribute.VALUE]))
                elif isinstance(obj, pkcs11.PrivateKey):
                    keys.append(obj.get_attributes(
                        [Attribute.TOKEN, Attribute.KEY_TYPE, Attribute.ID, Attribute.LABEL]))
        if not certs and not keys:
            return None
        first = (certs or keys)[0]
        kt = int(keys[0][Attribute.KEY_TYPE]) if keys else None
        return LookupResult(
            label=label.decode(), has_certificate=bool(certs), has_private_key=bool(keys),
            ephemeral=not first[Attribute.TOKEN],
            key_type={CKK_RSA: "rsa", CKK_EC: "ec"}.get(kt),  # type: ignore[arg-type]
            key_id=first[Attribute.ID],
        )

    def close(self) -> None:
        with self._lock:
            if self._session is not None and not self._logged_in_here:
                self._session.close()  # no PIN: no C_Logout
            self._session = None


def open_store(module: str, token: str, pin: str) -> Pkcs11Store:
    return Pkcs11Store(module, token, pin)
