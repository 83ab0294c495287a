"""The keychain_ext flow written with python-pkcs11 (benchmark only, not
shipped).

Same calls as csrc/keychain_pkcs11.c for the ephemeral cycle and lookups,
where python-pkcs11 allows it:

- every operation starts with ``C_GetSessionInfo`` (the C layer's
  ``ensure_login``, logging the session in again if another user of the
  module in the process logged it out).  python-pkcs11 does not wrap that
  function: the port calls it, and ``C_Login`` when needed, through the
  module's own function list with ctypes, on python-pkcs11's session handle;
- an ephemeral kill makes one search of the session objects under the
  label and destroys certificates first, then keys;
- searches use ``SearchIter`` with one batch of 64 handles, then stop:
  C_FindObjectsInit + one C_FindObjects + C_FindObjectsFinal.
  (``Session.get_objects`` calls C_FindObjects until it returns nothing: one
  call more per search.)
- What python-pkcs11 does not let us avoid: every object it hands back —
  created or found — goes through ``make_object``, which reads ten
  attributes (CKA_CLASS and the capability flags) in two
  C_GetAttributeValue calls (sizes, then values) to pick the Python class;
  and ``get_attributes`` is two calls as well.  So a preauth costs 4 calls
  more than the C layer's 9 (the two created objects), an ephemeral kill 2
  more than its 8 (4 reads of the two objects found instead of the C
  layer's two CKA_CLASS reads, which the port takes from them), a cycle 6
  more than 17, and a lookup hit 6 more than its 6.  The call order differs
  too: python-pkcs11 reads the found objects before C_FindObjectsFinal.

The token-object path is this port's own, not the C layer's: the C layer
keeps a token identity's lease as a file in the token's state directory,
which the port does not model; here a token identity still carries the
CKO_DATA lease object the C layer used before.  Its figures are reported,
not compared.

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

import ctypes
import threading
from typing import Optional

import pkcs11
from pkcs11 import Attribute, ObjectClass
from pkcs11 import _pkcs11 as _impl

from . import ctypes_port as _ck
from ._material import (
    CKK_EC,
    CKK_RSA,
    EPHEMERAL,
    LEASE_APPLICATION,
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

_libs: dict[str, object] = {}  # never unloaded: no C_Finalize
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


def _function_list(module: str) -> _ck.CK_FUNCTION_LIST:
    """The module's CK_FUNCTION_LIST through ctypes (the same loaded
    library: dlopen counts references), for what python-pkcs11 does not
    wrap.  C_GetFunctionList is no PKCS#11 call the shim counts."""
    with _libs_lock:
        flist = _flists.get(module)
        if flist is None:
            dll = ctypes.CDLL(module)
            get = dll.C_GetFunctionList
            get.restype = _ck.CK_ULONG
            get.argtypes = [ctypes.POINTER(ctypes.POINTER(_ck.CK_FUNCTION_LIST))]
            ptr = ctypes.POINTER(_ck.CK_FUNCTION_LIST)()
            rv = get(ctypes.byref(ptr))
            if rv != _ck.CKR_OK or not ptr:
                raise pkcs11.PKCS11Error(f"C_GetFunctionList of {module} failed: {rv:#x}")
            flist = _flists[module] = ptr.contents
            _dlls.append(dll)  # never unloaded
        return flist


_flists: dict[str, _ck.CK_FUNCTION_LIST] = {}
_dlls: list = []


def _dict(template: list) -> dict:
    # python-pkcs11 packs CKA_LABEL from str; everything else from bytes/int/bool
    return {t: (v.decode() if t == Attribute.LABEL else v) for t, v in template}


class Pkcs11Store:
    """One session on the token."""

    name = NAME

    def __init__(self, module: str, token: str, pin: str) -> None:
        lib = _lib(module)
        self._f = _function_list(module)
        self._pin = pin.encode()
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

    def _ensure_login(self) -> None:
        """C_GetSessionInfo, and C_Login again if the session lost its
        login (the C layer's ensure_login).  python-pkcs11 cannot reopen a
        session in place: a closed one raises."""
        info = _ck.CK_SESSION_INFO()
        rv = self._f.C_GetSessionInfo(self._session.handle, ctypes.byref(info))
        if rv != _ck.CKR_OK:
            raise pkcs11.PKCS11Error(f"C_GetSessionInfo failed: {rv:#x}")
        if info.state in (_ck.CKS_RO_USER_FUNCTIONS, _ck.CKS_RW_USER_FUNCTIONS):
            return
        rv = self._f.C_Login(self._session.handle, _ck.CKU_USER, self._pin, len(self._pin))
        if rv not in (_ck.CKR_OK, _ck.CKR_USER_ALREADY_LOGGED_IN):
            raise pkcs11.PKCS11Error(f"C_Login (again) failed: {rv:#x}")

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
            self._ensure_login()
            if self._find({Attribute.LABEL: label.decode()}) or self._find(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: m.key_id}
            ):
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
            self._ensure_login()
            ours = self._imported is not None and self._imported[0] == label
            if not (ours and self._imported[2]):  # type: ignore[index]
                # an ephemeral identity of this process goes first; the
                # class of each object python-pkcs11 has read already
                found = self._find({Attribute.TOKEN: False, Attribute.LABEL: text})
                if found:
                    for obj in found:
                        if isinstance(obj, pkcs11.Certificate):
                            obj.destroy()
                    for obj in found:
                        if not isinstance(obj, pkcs11.Certificate):
                            obj.destroy()
                    if ours:
                        self._imported = None
                    return
            # a token identity: this port's own path (a CKO_DATA lease)
            key_id = self._imported[1] if ours else None  # type: ignore[index]
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
            for obj in self._find(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.LABEL: text,
                    Attribute.APPLICATION: LEASE_APPLICATION,
                }
            ):
                obj.destroy()  # the lease, last
            if ours:
                self._imported = None
        if not certs and not keys:
            raise ItemNotFoundError(detail="nothing carries the label", operation="kill_key")

    def lookup(self, label: bytes) -> Optional[LookupResult]:
        certs, keys = [], []
        with self._lock:
            self._ensure_login()
            for obj in self._find({Attribute.LABEL: label.decode()}):
                if isinstance(obj, pkcs11.Certificate):
                    certs.append(
                        obj.get_attributes(
                            [Attribute.TOKEN, Attribute.ID, Attribute.LABEL, Attribute.VALUE]
                        )
                    )
                elif isinstance(obj, pkcs11.PrivateKey):
                    keys.append(
                        obj.get_attributes(
                            [Attribute.TOKEN, Attribute.KEY_TYPE, Attribute.ID, Attribute.LABEL]
                        )
                    )
        if not certs and not keys:
            return None
        first = (certs or keys)[0]
        kt = int(keys[0][Attribute.KEY_TYPE]) if keys else None
        return LookupResult(
            label=label.decode(),
            has_certificate=bool(certs),
            has_private_key=bool(keys),
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
