"""Where stores live: the embedded SoftHSM2 token, PIN files, lock files.

The embedded default store is a SoftHSM2 token created on first use.
Identities are transient, so it lives in ``$XDG_RUNTIME_DIR`` (per user,
0700, tmpfs: never on disk, gone at reboot) when that exists, else under the
user's data directory.  ``KEYCHAIN_EXT_HOME`` overrides both.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import NoSuchKeychainError, ParamError

log = logging.getLogger(__name__)

EMBEDDED_TOKEN = "keychain_ext"

# Where Debian, Fedora, Homebrew and source builds put SoftHSM2's module.
SOFTHSM2_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def softhsm2_module() -> str:
    """The SoftHSM2 module: ``$KEYCHAIN_EXT_MODULE`` or the first one installed.

    Raises:
        NoSuchKeychainError: SoftHSM2 is not installed.
    """
    env = os.environ.get("KEYCHAIN_EXT_MODULE")
    if env:
        return env
    for path in SOFTHSM2_MODULES:
        if os.path.exists(path):
            return path
    raise NoSuchKeychainError(
        detail="SoftHSM2 is not installed (apt-get install softhsm2) and "
        "KEYCHAIN_EXT_MODULE names no PKCS#11 module",
        operation="open",
    )


# Caps on what is read from a file a user names: a PKCS#12 identity is a few
# KiB, a PIN or password one line; a device or a sparse file must not be
# read whole (memory) and a FIFO must not be waited on (a hang).
P12_CAP = 1 << 20
SECRET_CAP = 64 << 10


def read_regular(
    path: str | os.PathLike[str], cap: int, what: str, *, follow: bool = True
) -> bytes:
    """The bytes of the regular file ``path``, at most ``cap`` of them.

    Opened non-blocking (a FIFO never waits for a writer) and checked with
    fstat before any read: a FIFO, device or directory, or a file larger
    than ``cap``, is a ParamError at once that names ``what``, never its
    content.  ``follow``: a path the user gave may be a symlink (a secret
    mounted by Kubernetes or a secrets manager is one; reading through a
    link gains an attacker nothing the caller could not read); files
    keychain_ext made itself are opened with O_NOFOLLOW.

    Raises:
        ParamError: not a regular file, or larger than cap.
        FileNotFoundError, PermissionError: as open() reports them.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ParamError(detail=f"the {what} {path} is not a regular file", operation="read")
        too_large = ParamError(
            detail=f"the {what} {path} is larger than {cap} bytes", operation="read"
        )
        if st.st_size > cap:
            raise too_large
        chunks, size = [], 0
        while size <= cap:  # a file growing after fstat: stop at cap + 1
            chunk = os.read(fd, cap + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > cap:
            raise too_large
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_dir(fd: int, path: str, *, final: bool) -> None:
    """A directory on the way to a private one is safe when only root or
    the caller can change it: owned by one of them, and not writable by
    group or others unless sticky (/tmp: others cannot rename our entries).
    The directory itself must be the caller's and 0700."""
    st = os.fstat(fd)
    mode, uid = stat.S_IMODE(st.st_mode), os.geteuid()
    if final:
        if st.st_uid != uid:
            raise PermissionError(errno.EPERM, "directory belongs to another user", path)
        if mode & 0o077:
            # never chmod a directory keychain_ext did not create: it may be
            # someone's on purpose
            raise PermissionError(
                errno.EPERM, f"directory is mode {mode:04o}, not 0700: chmod 700 it", path
            )
    elif st.st_uid not in (0, uid) or (mode & 0o022 and not mode & stat.S_ISVTX):
        raise PermissionError(errno.EPERM, "directory on the way is writable by another user", path)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents, 0700) readable by this user only.

    Walked from ``/`` one component at a time with O_NOFOLLOW relative to the
    parent's descriptor, so no symlink is followed and no component can be
    swapped between check and use; each existing ancestor is checked (see
    _check_dir).  Only directories created here are chmodded.

    Raises:
        PermissionError: a symlink on the path, an ancestor another user can
            change, or a final directory not the caller's or not 0700.
    """
    path = Path(os.path.abspath(path))
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        parts = path.parts[1:]
        for i, name in enumerate(parts):
            here = os.path.join("/", *parts[: i + 1])
            created = False
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
                created = True
            except FileExistsError:
                pass
            try:
                child = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PermissionError(
                        errno.EPERM, "not a directory or a symlink: refused", here
                    ) from None
                raise
            os.close(fd)
            fd = child
            if created:
                os.fchmod(fd, 0o700)  # ours: whatever the umask did
            _check_dir(fd, here, final=i == len(parts) - 1)
    finally:
        os.close(fd)
    return path


def _runtime_dir() -> Optional[str]:
    """$XDG_RUNTIME_DIR if it is the caller's directory.  Root after `su`
    or `sudo -E` still has the user's: a directory that user controls, so
    it is not used."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        return None
    try:
        st = os.stat(runtime)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    if st.st_uid != os.geteuid():
        log.warning(
            "XDG_RUNTIME_DIR %s belongs to uid %d, not this user (uid %d): not used",
            runtime,
            st.st_uid,
            os.geteuid(),
        )
        return None
    return runtime


def base_dir() -> Path:
    """keychain_ext's per-user directory (see module docstring)."""
    env = os.environ.get("KEYCHAIN_EXT_HOME")
    if env:
        return private_dir(Path(env))
    runtime = _runtime_dir()
    if runtime:
        return private_dir(Path(runtime) / "keychain_ext")
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return private_dir(Path(data) / "keychain_ext")


def write_secret(path: Path, secret: str, *, hold: bool = False) -> Optional[int]:
    """Write a secret file atomically, 0600 from its first byte.

    With ``hold``, return an open descriptor holding a shared flock on the
    file (taken before the file appears under its name): the file is needed
    as long as someone holds it, and :func:`sweep_unheld` removes it once
    its process has ended.  Release with :func:`release_secret`.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if hold:
            fcntl.flock(fd, fcntl.LOCK_SH)
        os.write(fd, secret.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hold:
        return fd
    os.close(fd)
    return None


def hold_private_dir(parent: Path) -> tuple[Path, int]:
    """A new 0700 directory under ``parent`` for files holding or naming
    secrets, and a descriptor holding a shared flock on it (taken before
    anything is written in it): like a held secret file, removed by
    :func:`release_secret`, or by :func:`sweep_unheld` once its process
    has ended."""
    sweep_unheld(private_dir(parent))  # what ended processes left
    name = f"{os.getpid()}-{new_pin()}"
    tmp, path = parent / f".{name}", parent / name  # swept only once held
    tmp.mkdir(mode=0o700)
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        tmp.rmdir()
        raise
    return path, fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def release_secret(path: Path, fd: int) -> None:
    """Remove a held secret file or directory (see write_secret,
    hold_private_dir) and let it go."""
    _remove(path)
    os.close(fd)


# A secret file or directory under its temporary dot-name is flocked only
# once it is open: younger than this, it may be one being written.
WRITING_SECONDS = 60


# The names keychain_ext gives held secret files and directories
# (write_secret's and hold_private_dir's, of f"{pid}-{new_pin()}"), also
# under their temporary names: the sweep touches nothing else.
_HELD_NAME = re.compile(r"\.?[0-9]+-[A-Za-z0-9_-]{24}(\.[0-9]+\.tmp)?")


def sweep_unheld(directory: Path) -> None:
    """Remove the secret files and directories in directory that no process
    holds any more (their writer ended without removing them), and the
    temporary ones a writer that died mid-write left.

    Only entries named as keychain_ext names them, of the caller, regular
    files or directories: a foreign file, a symlink or a FIFO planted there
    is left alone (and never opened blocking)."""
    for path in directory.iterdir():
        if not _HELD_NAME.fullmatch(path.name):
            continue  # not ours
        try:
            if path.name.startswith(".") and (
                time.time() - path.lstat().st_mtime < WRITING_SECONDS
            ):
                continue  # maybe being written right now
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or not (
                stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
            ):
                log.warning("%s is not a file keychain_ext made: left alone", path)
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: still needed
        else:
            _remove(path)
        finally:
            os.close(fd)


def read_secret(path: Path, what: Optional[str] = None) -> str:
    """A PIN or password from a file (one line; trailing newline dropped).

    ``what`` ("PIN file", "password file") names a file the user gave: it
    may be a symlink, and gets a warning when group or others can read it.
    Without it the file is keychain_ext's own, opened with O_NOFOLLOW.

    Raises:
        ParamError: not a regular file, larger than SECRET_CAP, or not
            UTF-8 (the message shows no byte of it).
    """
    name = what or "secret file"
    data = read_regular(path, SECRET_CAP, name, follow=what is not None)
    if what is not None:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o044:
            log.warning(
                "%s %s is readable by group or others (mode %04o): chmod 600 it", what, path, mode
            )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # the exception's text quotes the byte and its position: not shown
        raise ParamError(detail=f"the {name} {path} is not UTF-8 text", operation="read") from None
    return text.rstrip("\r\n")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.debug("waiting for the lock %s (another process holds it)", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def on_tmpfs(path: Path) -> Optional[bool]:
    """Whether path is on a RAM file system (None: cannot tell, no /proc)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", ""
    for point, fstype in mounts:
        # /proc/self/mounts writes space, tab, newline and backslash as \ooo
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind in ("tmpfs", "ramfs")


def state_dir(token: str, init_args: Optional[str] = None) -> str:
    """The token's state directory (keychain.h kc_options.state_dir): the
    lock every process using the token flocks, owner files and leases.

    Named by the token label and the module's init string (NSS: its
    database), not by the module path: processes reaching one token through
    different modules (p11-kit's proxy, a shim) must share its lock and its
    leases."""
    key = f"{token}\0{init_args or ''}".encode()
    return str(private_dir(base_dir() / "tokens" / hashlib.sha256(key).hexdigest()[:16]))


@dataclass(frozen=True)
class Embedded:
    """The embedded SoftHSM2 store's files."""

    home: Path
    module: str

    @property
    def conf(self) -> Path:
        return self.home / "softhsm2.conf"

    @property
    def tokens(self) -> Path:
        return self.home / "tokens"

    def discard_tokens(self) -> None:
        """Remove the store's token files (a first initialization failed
        half-way; the store is keychain_ext's alone and held nothing)."""
        for token in self.tokens.iterdir():
            shutil.rmtree(token, ignore_errors=True)

    @property
    def pin_file(self) -> Path:
        return self.home / "pin"

    @property
    def lock(self) -> Path:
        return self.home / "token.lock"

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to see this token."""
        return {"SOFTHSM2_CONF": str(self.conf)}


def embedded(module: Optional[str] = None) -> Embedded:
    """The embedded store's files, created (0700/0600) if missing.

    SoftHSM2 reads ``SOFTHSM2_CONF`` once per process, when the module is
    first initialized, so this sets it in ``os.environ``; a process already
    pointed at another SoftHSM2 configuration must name its token explicitly.

    Raises:
        ParamError: SOFTHSM2_CONF already names another configuration.
    """
    home = base_dir() / "softhsm"
    store = Embedded(private_dir(home), module or softhsm2_module())
    tokens = private_dir(store.tokens)
    current = os.environ.get("SOFTHSM2_CONF")
    if current and os.path.realpath(current) != os.path.realpath(store.conf):
        raise ParamError(
            detail=f"SOFTHSM2_CONF is set to {current}; the embedded store needs "
            f"{store.conf}: unset it, or open that token with Keychain(token=..., pin=...)",
            operation="open",
        )
    _warn_if_on_disk(str(home))
    if not store.conf.exists():
        write_secret(
            store.conf,
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n",
        )
    os.environ["SOFTHSM2_CONF"] = str(store.conf)
    return store


@functools.cache  # once per process and directory
def _warn_if_on_disk(home: str) -> None:
    if on_tmpfs(Path(home)) is False:
        log.warning(
            "the embedded store %s is on a persistent disk, not tmpfs: identities are "
            "written to disk (set XDG_RUNTIME_DIR or KEYCHAIN_EXT_HOME to a tmpfs directory)",
            home,
        )


def new_pin() -> str:
    return secrets.token_urlsafe(18)
