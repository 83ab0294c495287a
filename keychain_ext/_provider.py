"""OpenSSL 3's pkcs11 provider: a token's key for every OpenSSL 3 client.

The provider (Debian: ``pkcs11-provider``) lets OpenSSL 3 use a key that
stays in a PKCS#11 token wherever a key file is expected: the "key file" is
a PEM naming the key's PKCS#11 URI (``-----BEGIN PKCS#11 PROVIDER
URI-----``), which OpenSSL reads once a configuration has activated the
provider.  Python's ``ssl`` (urllib, requests, httpx, urllib3, aiohttp),
curl and ``openssl`` all take it.  In this process the configuration is
loaded at run time into the libcrypto that ``ssl`` uses; a child process
gets it as ``OPENSSL_CONF``, merged with the configuration it would have
read.  The PIN reaches the provider as ``pin-source=file:`` in the key's
URI (a 0600 file): never in the PEM, the configuration or the environment.
In a process, the provider serves one PKCS#11 module, and lists its tokens
once, when it first uses it: a token initialized later in that process
stays invisible to it.

Exit: SoftHSM2 is C++; the destructors of its global objects are registered
when the module is loaded, after OpenSSL's own exit handler, so they run
first; OpenSSL's handler then unloads the provider, which finalizes the
module -- a call into destroyed objects (``openssl s_client`` exits with
SIGSEGV).  The provider's ``no-deinit`` quirk skips that call, so every
process exits cleanly (the process is ending: the token is released by the
kernel anyway).
"""

from __future__ import annotations

import base64
import ctypes
import os
import ssl
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from . import _store
from ._backend import Pkcs11Token
from .errors import ItemNotFoundError, ParamError, UnimplementedError

NAME = "keychain_ext_pkcs11"  # the provider instance in OpenSSL configurations
INSTALL = "apt-get install pkcs11-provider (Debian 12: -t bookworm-backports)"
_PEM = "PKCS#11 PROVIDER URI"
_PEM_DESCRIPTION = b"PKCS#11 Provider URI v1.0"
_INFO_CONFIG_DIR, _INFO_MODULES_DIR = 1001, 1003  # OPENSSL_info() (crypto.h)
_STORE_INFO_CERT = 5  # OSSL_STORE_INFO_CERT (store.h)
_EMPTY_LOADS = 64  # empty OSSL_STORE_load results before a store counts as stuck

# The provider's settings in every configuration keychain_ext writes:
# (name, value, why), the reason written into the file as a comment.
OPTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "pkcs11-module-quirks",
        "no-deinit",
        "SoftHSM2 is gone when OpenSSL's exit handler runs (see keychain_ext._provider)",
    ),
    (
        "pkcs11-module-cache-keys",
        "false",
        "no session copy of a key: a killed identity must be gone",
    ),
)


@dataclass(frozen=True)
class ProviderFiles:
    """What an OpenSSL 3 client needs to use an identity through the
    provider: ``cert`` (PEM certificate), ``key`` (the provider's PEM naming
    the token key) and ``conf`` (an OpenSSL configuration that activates the
    provider, merged with the one this process's children would read).
    All 0600 in a 0700 directory; they name the PIN file, never hold it."""

    cert: Path
    key: Path
    conf: Path


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def key_pem(uri: str) -> str:
    """The provider's PEM for a key URI: DER ``SEQUENCE { VisibleString
    "PKCS#11 Provider URI v1.0", UTF8String uri }``."""
    der = _der(0x30, _der(0x1A, _PEM_DESCRIPTION) + _der(0x0C, uri.encode("utf-8")))
    b64 = base64.b64encode(der).decode("ascii")
    lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN {_PEM}-----\n{lines}\n-----END {_PEM}-----\n"


def _quote(value: str) -> str:
    """A value as OpenSSL's configuration syntax reads it back verbatim."""
    if any(c in value for c in "\n\r\0"):
        raise ParamError(detail=f"{value!r} cannot be written to an OpenSSL configuration")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _ConfValue(ctypes.Structure):  # CONF_VALUE (conf.h)
    _fields_ = [("section", ctypes.c_char_p), ("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


class _LibCrypto:
    """The libcrypto that Python's ``ssl`` uses, through ctypes."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        p, s, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        for name, res, args in (
            ("OpenSSL_version", s, [i]),
            ("OPENSSL_info", s, [i]),
            ("OSSL_LIB_CTX_load_config", i, [p, s]),
            ("OSSL_PROVIDER_available", i, [p, s]),
            ("ERR_get_error", ctypes.c_ulong, []),
            ("ERR_error_string_n", None, [ctypes.c_ulong, s, ctypes.c_size_t]),
            ("ERR_clear_error", None, []),
            ("NCONF_new", p, [p]),
            ("NCONF_load", i, [p, s, ctypes.POINTER(ctypes.c_long)]),
            ("NCONF_get_string", s, [p, s, s]),
            ("NCONF_get_section", p, [p, s]),
            ("OPENSSL_sk_num", i, [p]),
            ("OPENSSL_sk_value", ctypes.POINTER(_ConfValue), [p, i]),
            ("NCONF_free", None, [p]),
            ("OSSL_STORE_open_ex", p, [s, p, s, p, p, p, p, p]),
            ("OSSL_STORE_expect", i, [p, i]),
            ("OSSL_STORE_load", p, [p]),
            ("OSSL_STORE_eof", i, [p]),
            ("OSSL_STORE_error", i, [p]),
            ("OSSL_STORE_INFO_get_type", i, [p]),
            ("OSSL_STORE_INFO_get1_CERT", p, [p]),
            ("OSSL_STORE_INFO_free", None, [p]),
            ("OSSL_STORE_close", i, [p]),
            ("i2d_X509", i, [p, ctypes.POINTER(ctypes.c_char_p)]),
            ("X509_free", None, [p]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args

    def errors(self) -> str:
        """OpenSSL's error queue as text, emptied."""
        found = []
        while code := self.lib.ERR_get_error():
            buf = ctypes.create_string_buffer(256)
            self.lib.ERR_error_string_n(code, buf, len(buf))
            found.append(buf.value.decode(errors="replace"))
        return "; ".join(found) or "no details from OpenSSL"

    def info(self, what: int) -> str:
        return bytes(self.lib.OPENSSL_info(what) or b"").decode()


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def linked_libcrypto(extension_file: str) -> Optional[str]:
    """The file of the libcrypto that the shared object ``extension_file``
    (already loaded) links: a symbol looked up through its handle resolves
    in its own dependencies, and dladdr names the file.  (Another libcrypto
    of the same version may be in the process: a wheel's bundled copy, ours
    among them.)  None when it has OpenSSL linked in, or links none."""
    try:
        symbol = ctypes.CDLL(extension_file, mode=os.RTLD_NOLOAD).OpenSSL_version
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    path = os.fsdecode(info.dli_fname)
    return None if os.path.realpath(path) == os.path.realpath(extension_file) else path


def ssl_libcrypto_path() -> Optional[str]:
    """The shared libcrypto that Python's ``ssl`` links, or None (built in,
    or OpenSSL linked in statically)."""
    import _ssl

    ssl_file = getattr(_ssl, "__file__", None)
    return linked_libcrypto(ssl_file) if ssl_file else None


def _process_libcrypto() -> _LibCrypto:
    """The shared libcrypto this process's ``ssl`` module uses.

    Raises:
        UnimplementedError: not Linux, OpenSSL older than 3, or ``ssl`` has
            its OpenSSL linked in statically.
    """
    if ssl.OPENSSL_VERSION_INFO < (3,):
        raise UnimplementedError(
            detail=f"Python's ssl uses {ssl.OPENSSL_VERSION}: OpenSSL providers need "
            "OpenSSL 3; use a Python built against OpenSSL 3, or the engine route "
            "(keychain_ext.curl)",
            operation="provider",
        )
    if not sys.platform.startswith("linux"):
        raise UnimplementedError(
            detail="the pkcs11 provider route is implemented on Linux only",
            operation="provider",
        )
    path = ssl_libcrypto_path()
    if path is not None:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
        version = lib.OpenSSL_version
        version.restype, version.argtypes = ctypes.c_char_p, [ctypes.c_int]
        if bytes(version(0) or b"").decode() == ssl.OPENSSL_VERSION:
            return _LibCrypto(lib)
    raise UnimplementedError(
        detail=f"Python's ssl module ({ssl.OPENSSL_VERSION}) has OpenSSL linked in "
        "statically: the pkcs11 provider cannot be loaded into it; use a Python "
        "whose ssl links a shared libcrypto.so.3 (Debian's python3), or the engine "
        "route (keychain_ext.curl)",
        operation="provider",
    )


_lock = threading.Lock()
_crypto: Optional[_LibCrypto] = None
_loaded: Optional[tuple[str, Optional[str]]] = None  # (module, init_args) in this process


def _libcrypto() -> _LibCrypto:
    global _crypto
    if _crypto is None:
        _crypto = _process_libcrypto()
    return _crypto


def provider_path(crypto: Optional[_LibCrypto] = None) -> str:
    """Where OpenSSL looks for the pkcs11 provider (``OPENSSL_MODULES``
    or the modules directory compiled into libcrypto).

    Raises:
        UnimplementedError: the route cannot work here (the provider is not
            installed, or see :func:`_process_libcrypto`).
    """
    crypto = crypto or _libcrypto()
    modules = os.environ.get("OPENSSL_MODULES") or crypto.info(_INFO_MODULES_DIR)
    path = os.path.join(modules, "pkcs11.so")
    if not os.path.exists(path):
        raise UnimplementedError(
            detail=f"OpenSSL's pkcs11 provider is not installed ({path} is missing): {INSTALL}",
            operation="provider",
        )
    return path


def problem() -> Optional[str]:
    """Why the provider route cannot work in this process, or None."""
    try:
        provider_path()
    except UnimplementedError as exc:
        return exc.detail
    return None


def config(module: str, init_args: Optional[str], include: Optional[str] = None) -> str:
    """An OpenSSL configuration that activates the pkcs11 provider for the
    PKCS#11 ``module`` (and the default provider); with ``include``, that
    configuration plus the provider, added to its own provider list."""
    crypto = _libcrypto()
    section = [
        f"[{NAME}_sect]",
        f"module = {_quote(provider_path(crypto))}",
        f"pkcs11-module-path = {_quote(module)}",
        *([f"pkcs11-module-init-args = {_quote(init_args)}"] if init_args else []),
        *(line for name, value, why in OPTIONS for line in (f"# {why}", f"{name} = {value}")),
        "activate = 1",
    ]
    own_providers = [
        "[keychain_ext_providers]",
        "default = keychain_ext_default",
        f"{NAME} = {NAME}_sect",
        "[keychain_ext_default]",
        "activate = 1",
    ]
    if include is None:
        head = ["openssl_conf = keychain_ext_init", "[keychain_ext_init]"]
        lines = [*head, "providers = keychain_ext_providers", *own_providers, *section]
        return "\n".join(lines) + "\n"
    included = _included(crypto, include)
    lines = ["# keychain_ext: the pkcs11 provider added to", f".include {_quote(include)}"]
    if included.providers:  # add ours to the list the included file activates
        lines += [f"[{included.providers}]", f"{NAME} = {NAME}_sect"]
        if included.implicit_default:
            # Activating ours explicitly ends the implicit load of the default
            # provider (Debian 13's openssl.cnf lists it without activating
            # it): activate it, or the child has no random generator at all.
            if included.default_section:
                lines += [f"[{included.default_section}]", "activate = 1"]
            else:
                lines += [
                    "default = keychain_ext_default",
                    "[keychain_ext_default]",
                    "activate = 1",
                ]
    else:
        if not included.init:
            lines += ["[default]", "openssl_conf = keychain_ext_init"]
        lines += [f"[{included.init or 'keychain_ext_init'}]", "providers = keychain_ext_providers"]
        lines += own_providers
    return "\n".join([*lines, *section]) + "\n"


@dataclass(frozen=True)
class _Included:
    """What an OpenSSL configuration says about providers, as OpenSSL reads
    it: its init section (``openssl_conf``), the provider list that names,
    the section of the list's ``default`` provider, and whether the default
    provider is loaded only implicitly (the list activates no provider)."""

    init: Optional[str]
    providers: Optional[str]
    default_section: Optional[str]
    implicit_default: bool


_FALSE = {"0", "no", "false", "off"}  # OpenSSL's boolean words for "not active"


def _included(crypto: _LibCrypto, path: str) -> _Included:
    lib = crypto.lib
    conf = lib.NCONF_new(None)
    try:
        line = ctypes.c_long(0)
        if lib.NCONF_load(conf, os.fsencode(path), ctypes.byref(line)) != 1:
            raise ParamError(
                detail=f"OpenSSL cannot read the configuration {path} (line {line.value}): "
                f"{crypto.errors()}",
                operation="provider",
            )

        def get(section: Optional[bytes], name: bytes) -> Optional[bytes]:
            return lib.NCONF_get_string(conf, section, name)  # type: ignore[no-any-return]

        init = get(None, b"openssl_conf")
        providers = get(init, b"providers") if init else None
        entries = lib.NCONF_get_section(conf, providers) if providers else None
        default_section, active = None, False
        for i in range(lib.OPENSSL_sk_num(entries) if entries else 0):
            entry = lib.OPENSSL_sk_value(entries, i).contents
            if entry.name == b"default":
                default_section = entry.value
            activate = get(entry.value, b"activate")
            active = active or (activate is not None and activate.decode().lower() not in _FALSE)
        lib.ERR_clear_error()  # a missing name is not an error here
        return _Included(
            init=init.decode() if init else None,
            providers=providers.decode() if providers else None,
            default_section=default_section.decode() if default_section else None,
            implicit_default=not active,
        )
    finally:
        lib.NCONF_free(conf)


def default_config() -> str:
    """The configuration an OpenSSL 3 program reads when OPENSSL_CONF is unset."""
    return os.path.join(_libcrypto().info(_INFO_CONFIG_DIR), "openssl.cnf")


def load_into_process(module: str, init_args: Optional[str]) -> None:
    """Activate the provider for ``module`` in the OpenSSL of Python's
    ``ssl`` (idempotent; one PKCS#11 module per process).

    Raises:
        UnimplementedError: the route cannot work here, or OpenSSL refused.
        ParamError: the provider already serves another module here.
    """
    global _loaded
    with _lock:
        if _loaded == (module, init_args):
            return
        if _loaded is not None:
            raise ParamError(
                detail=f"this process's OpenSSL already has the pkcs11 provider for "
                f"{_loaded[0]}: one PKCS#11 module per process",
                operation="provider",
            )
        crypto = _libcrypto()
        text = config(module, init_args)
        directory, fd = _store.hold_private_dir(_store.base_dir() / "provider")
        try:
            path = directory / "openssl.cnf"
            _store.write_secret(path, text)
            crypto.lib.ERR_clear_error()
            ok = crypto.lib.OSSL_LIB_CTX_load_config(None, os.fsencode(path)) == 1
        finally:
            _store.release_secret(directory, fd)
        if not ok or crypto.lib.OSSL_PROVIDER_available(None, NAME.encode()) != 1:
            raise UnimplementedError(
                detail=f"OpenSSL did not load the pkcs11 provider: {crypto.errors()}",
                operation="provider",
            )
        _loaded = (module, init_args)


def certificate_pem(uri: str) -> str:
    """The certificate at a PKCS#11 URI, read through the provider in this
    process (it sees this process's session objects too), as PEM.

    Raises:
        ItemNotFoundError: no certificate there.
    """
    crypto = _libcrypto()
    lib = crypto.lib
    lib.ERR_clear_error()
    store = lib.OSSL_STORE_open_ex(uri.encode(), None, None, None, None, None, None, None)
    if not store:
        raise ItemNotFoundError(detail=f"OpenSSL cannot open {uri}: {crypto.errors()}")
    try:
        lib.OSSL_STORE_expect(store, _STORE_INFO_CERT)
        empty = 0
        while not lib.OSSL_STORE_eof(store):
            info = lib.OSSL_STORE_load(store)
            if not info:
                # An empty load is allowed before eof, but a failing store may
                # neither report an error nor ever reach eof (a provider whose
                # module another user finalized): looping on it hangs.
                empty += 1
                if lib.OSSL_STORE_error(store) or empty > _EMPTY_LOADS:
                    break
                continue
            try:
                if lib.OSSL_STORE_INFO_get_type(info) == _STORE_INFO_CERT:
                    return ssl.DER_cert_to_PEM_cert(_x509_der(lib, info))
            finally:
                lib.OSSL_STORE_INFO_free(info)
    finally:
        lib.OSSL_STORE_close(store)
    raise ItemNotFoundError(detail=f"no certificate at {uri}: {crypto.errors()}")


def _x509_der(lib: Any, info: int) -> bytes:
    cert = lib.OSSL_STORE_INFO_get1_CERT(info)
    try:
        size = lib.i2d_X509(cert, None)
        buf = ctypes.create_string_buffer(size)
        out = ctypes.cast(buf, ctypes.c_char_p)
        lib.i2d_X509(cert, ctypes.byref(out))
        return buf.raw[:size]
    finally:
        lib.X509_free(cert)


def write_files(
    directory: Path,
    token: Pkcs11Token,
    label: str,
    init_args: Optional[str],
    *,
    rewrite: bool = False,
) -> ProviderFiles:
    """Write the files a client needs for ``label`` on ``token`` into
    ``directory``, a private directory its caller removes: once, or again
    with ``rewrite`` (a directory that may have outlived an identity)."""
    files = ProviderFiles(directory / "cert.pem", directory / "key.pem", directory / "openssl.cnf")
    if rewrite or not files.conf.exists():
        load_into_process(token.module, init_args)
        include = os.environ.get("OPENSSL_CONF") or default_config()
        _store.write_secret(files.cert, certificate_pem(token.uri(label, "cert")))
        _store.write_secret(files.key, key_pem(token.uri(label, "private")))
        text = config(token.module, init_args, include if os.path.exists(include) else None)
        _store.write_secret(files.conf, text)  # last: its presence says all are there
    return files


def ssl_context(
    files: ProviderFiles,
    cafile: Optional[str] = None,
    capath: Optional[str] = None,
    cadata: Union[str, bytes, None] = None,
) -> ssl.SSLContext:
    """A client context (as ssl.create_default_context) with the identity."""
    context = ssl.create_default_context(cafile=cafile, capath=capath, cadata=cadata)
    try:
        context.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        raise UnimplementedError(
            detail=f"OpenSSL's pkcs11 provider could not load the key: {exc}",
            operation="ssl_context",
        ) from None
    return context
