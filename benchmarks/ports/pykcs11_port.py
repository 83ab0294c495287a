"""The keychain_ext flow written with PyKCS11 (benchmark only, not shipped).

Same calls as csrc/keychain_pkcs11.c for the ephemeral cycle and lookups
(tests/test_benchmark_ports.py holds it to them):

- every operation starts with ``C_GetSessionInfo`` (the C layer's
  ``ensure_login``): logged out by another user of the module in the
  process, the session logs in again; closed, it is opened again;
- an ephemeral kill makes one search of the session objects under the
  label, reads each one's CKA_CLASS (one ``C_GetAttributeValue``) and
  destroys certificates first, then keys;
- searches go through the low-level ``C_FindObjectsInit`` /
  ``C_FindObjects`` (one call, room for 64 handles) / ``C_FindObjectsFinal``:
  the high-level ``Session.findObjects`` calls ``C_FindObjects`` until it
  returns nothing, one call more per search;
- lookup reads six attributes in one ``C_GetAttributeValue`` with reserved
  buffers, as the C layer does: the high-level ``getAttributeValue`` makes
  two calls (sizes, then values), and falls back to two calls per attribute
  when one is sensitive (a private key's CKA_VALUE);
- objects are created and destroyed with the public ``createObject`` /
  ``destroyObject``.

The token-object path is this port's own, not the C layer's: the C layer
keeps a token identity's lease as a file in the token's state directory,
which the port does not model; here a token identity still carries the
CKO_DATA lease object the C layer used before.  Its figures are reported,
not compared.

The library object is kept alive for the life of the process and never
unloaded: ``PyKCS11Lib.unload``/``__del__`` would call ``C_Finalize`` when
PyKCS11 initialized the module itself, and that breaks every other user of
the module in the process (the C extension, libcurl's engine).  When the
module is already initialized (the benchmark opens the C extension first,
with CKF_OS_LOCKING_OK), PyKCS11 neither initializes nor finalizes it.
"""

from __future__ import annotations

import threading
from typing import Optional

import PyKCS11
from PyKCS11 import LowLevel

from ._material import (
    CKA_APPLICATION,
    CKA_CLASS,
    CKA_ID,
    CKA_KEY_TYPE,
    CKA_LABEL,
    CKA_TOKEN,
    CKA_VALUE,
    CKK_EC,
    CKK_RSA,
    CKO_CERTIFICATE,
    CKO_DATA,
    CKO_PRIVATE_KEY,
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

NAME = "PyKCS11"
MAX_FOUND = 64
_OK_PARTIAL = (
    PyKCS11.CKR_OK,
    PyKCS11.CKR_ATTRIBUTE_SENSITIVE,
    PyKCS11.CKR_ATTRIBUTE_TYPE_INVALID,
    PyKCS11.CKR_BUFFER_TOO_SMALL,
)

_libs: dict[str, PyKCS11.PyKCS11Lib] = {}  # never unloaded: no C_Finalize
_libs_lock = threading.Lock()


def _lib(module: str) -> PyKCS11.PyKCS11Lib:
    with _libs_lock:
        lib = _libs.get(module)
        if lib is None:
            lib = _libs[module] = PyKCS11.PyKCS11Lib().load(module)
        return lib


def _check(rv: int, what: str) -> None:
    if rv != PyKCS11.CKR_OK:
        raise PyKCS11.PyKCS11Error(rv, what)


def _pairs(template: list, label: bytes) -> list:
    # PyKCS11 types CKA_LABEL as a string attribute
    return [(t, label.decode() if t == CKA_LABEL else v) for t, v in template]


class PyKCS11Store:
    """One session on the token, logged in (the login is per application:
    already logged in through another session is fine)."""

    name = NAME

    def __init__(self, module: str, token: str, pin: str) -> None:
        self._pkcs11 = lib = _lib(module)
        for slot in lib.getSlotList(tokenPresent=True):
            if lib.getTokenInfo(slot).label.strip() == token:
                break
        else:
            raise LookupError(f"no token labelled {token!r}")
        self._slot, self._pin = slot, pin
        self._session = lib.openSession(slot, PyKCS11.CKF_RW_SESSION)
        self._login()
        self._ll = self._session.lib  # LowLevel.CPKCS11Lib
        self._h = self._session.session  # CK_SESSION_HANDLE
        self._lock = threading.Lock()
        self._imported: Optional[tuple] = None  # (label, key id, token objects)

    def _login(self) -> None:
        try:
            self._session.login(self._pin)
        except PyKCS11.PyKCS11Error as exc:
            if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                raise

    def _ensure_login(self) -> None:
        """The session, logged in (the C layer's ensure_login): another
        user of the module in the process may have logged out or closed
        every session, and a key is invisible without a login."""
        info = LowLevel.CK_SESSION_INFO()
        rv = self._ll.C_GetSessionInfo(self._h, info)
        if rv == PyKCS11.CKR_OK:
            if info.state not in (PyKCS11.CKS_RO_USER_FUNCTIONS, PyKCS11.CKS_RW_USER_FUNCTIONS):
                self._login()
            return
        if rv not in (PyKCS11.CKR_SESSION_HANDLE_INVALID, PyKCS11.CKR_SESSION_CLOSED):
            _check(rv, "C_GetSessionInfo")
        self._session = self._pkcs11.openSession(self._slot, PyKCS11.CKF_RW_SESSION)
        self._login()
        self._h = self._session.session

    # -- the three PKCS#11 building blocks -------------------------------

    def _find(self, template: list) -> list:
        t = self._session._template2ckattrlist(template)
        _check(self._ll.C_FindObjectsInit(self._h, t), "C_FindObjectsInit")
        found = LowLevel.ckulonglist(MAX_FOUND)
        rv = self._ll.C_FindObjects(self._h, found)
        rv2 = self._ll.C_FindObjectsFinal(self._h)
        _check(rv, "C_FindObjects")
        _check(rv2, "C_FindObjectsFinal")
        handles = []
        for x in found:
            h = LowLevel.CK_OBJECT_HANDLE()
            h.assign(x)
            handles.append(h)
        return handles

    def _class(self, handle: int) -> int:
        """CKA_CLASS of one object, one C_GetAttributeValue."""
        t = LowLevel.ckattrlist(1)
        t[0].SetType(CKA_CLASS)
        t[0].Reserve(8)
        _check(self._ll.C_GetAttributeValue(self._h, handle, t), "C_GetAttributeValue")
        return int(t[0].GetNum())

    def _read(self, handle: int) -> Optional[dict]:
        t = LowLevel.ckattrlist(6)
        for i, (typ, size) in enumerate(
            (
                (CKA_CLASS, 8),
                (CKA_TOKEN, 1),
                (CKA_KEY_TYPE, 8),
                (CKA_ID, 64),
                (CKA_LABEL, 255),
                (CKA_VALUE, 8192),
            )
        ):
            t[i].SetType(typ)
            t[i].Reserve(size)
        rv = self._ll.C_GetAttributeValue(self._h, handle, t)
        if rv == PyKCS11.CKR_OBJECT_HANDLE_INVALID:
            return None
        if rv not in _OK_PARTIAL:
            _check(rv, "C_GetAttributeValue")
        if t[0].GetLen() == 0:
            return None
        return {
            "class": t[0].GetNum(),
            "token": t[1].GetBool() if t[1].GetLen() else False,
            "key_type": t[2].GetNum() if t[2].GetLen() else None,
            "id": bytes(t[3].GetBin()),
            "label": bytes(t[4].GetBin()),
        }

    # -- the API ----------------------------------------------------------

    def preauth_key(self, p12: bytes, password: bytes, label: bytes, flags: int) -> Material:
        return self.preauth_material(parse_p12(p12, password), label, flags)

    def preauth_material(self, m: Material, label: bytes, flags: int) -> Material:
        token = not (flags & EPHEMERAL)
        with self._lock:
            self._ensure_login()
            if self._find([(CKA_LABEL, label.decode())]) or self._find(
                [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_ID, m.key_id)]
            ):
                raise DuplicateItemError(detail="already in the store", operation="preauth_key")
            made = []
            try:
                if token:
                    made.append(self._session.createObject(_pairs(lease_template(m, label), label)))
                made.append(
                    self._session.createObject(_pairs(cert_template(m, label, token), label))
                )
                self._session.createObject(_pairs(key_template(m, label, token), label))
            except Exception:
                for h in reversed(made):  # all or nothing
                    self._session.destroyObject(h)
                raise
            self._imported = (label, m.key_id, token)
        return m

    def kill_key(self, label: bytes) -> None:
        text = label.decode()
        with self._lock:
            self._ensure_login()
            ours = self._imported is not None and self._imported[0] == label
            if not (ours and self._imported[2]):  # type: ignore[index]
                # an ephemeral identity of this process goes first
                found = self._find([(CKA_TOKEN, False), (CKA_LABEL, text)])
                if found:
                    classes = [self._class(h) for h in found]
                    for certificates in (True, False):
                        for h, cls in zip(found, classes):
                            if (cls == CKO_CERTIFICATE) == certificates:
                                self._session.destroyObject(h)
                    if ours:
                        self._imported = None
                    return
            # a token identity: this port's own path (a CKO_DATA lease)
            key_id = self._imported[1] if ours else None  # type: ignore[index]
            if key_id is None:
                certs = self._find([(CKA_CLASS, CKO_CERTIFICATE), (CKA_LABEL, text)])
                if certs:
                    key_id = (self._read(certs[0]) or {}).get("id")
            certs = self._find([(CKA_CLASS, CKO_CERTIFICATE), (CKA_LABEL, text)])
            for h in certs:
                self._session.destroyObject(h)
            key_t = [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, text)]
            if key_id:
                key_t.append((CKA_ID, key_id))
            keys = self._find(key_t)
            for h in keys:
                self._session.destroyObject(h)
            for h in self._find(
                [(CKA_CLASS, CKO_DATA), (CKA_LABEL, text), (CKA_APPLICATION, LEASE_APPLICATION)]
            ):
                self._session.destroyObject(h)  # the lease, last
            if ours:
                self._imported = None
        if not certs and not keys:
            raise ItemNotFoundError(detail="nothing carries the label", operation="kill_key")

    def lookup(self, label: bytes) -> Optional[LookupResult]:
        with self._lock:
            self._ensure_login()
            objects = [o for o in map(self._read, self._find([(CKA_LABEL, label.decode())])) if o]
        certs = [o for o in objects if o["class"] == CKO_CERTIFICATE]
        keys = [o for o in objects if o["class"] == CKO_PRIVATE_KEY]
        if not certs and not keys:
            return None
        first = (certs or keys)[0]
        kt = keys[0]["key_type"] if keys else None
        return LookupResult(
            label=label.decode(),
            has_certificate=bool(certs),
            has_private_key=bool(keys),
            ephemeral=not first["token"],
            key_type={CKK_RSA: "rsa", CKK_EC: "ec"}.get(kt),
            key_id=first["id"],
        )

    def close(self) -> None:
        # close the session only: C_Logout would log every session out
        with self._lock:
            if self._session is not None:
                self._session.closeSession()
                self._session = None


def open_store(module: str, token: str, pin: str) -> PyKCS11Store:
    return PyKCS11Store(module, token, pin)
