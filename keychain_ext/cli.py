"""The ``keychain-ext`` command (also ``python -m keychain_ext``).

Errors print one line and exit with a code per error class (see
EXIT_CODES); ``--verbose`` adds the details.  PINs and passwords are read
from files, environment variables or a TTY prompt, never from argv.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

from . import _store
from ._backend import ItemInfo, Pkcs11Token
from .curl import client_env, curl_args, pycurl_problem
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

PROG = "keychain-ext"

# Most specific first; 1 is a failed check (doctor), 2 is a usage error.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (DuplicateItemError, 3),
    (ItemNotFoundError, 4),
    (Pkcs12VerifyFailureError, 5),
    (AuthFailedError, 6),
    (DecodeError, 7),
    (NoSuchKeychainError, 8),
    (InteractionNotAllowedError, 9),
    (InteractionRequiredError, 9),
    (ParamError, 10),
    (InvalidOwnerEditError, 13),
    (KeychainError, 11),
    (OSError, 12),
]

PASSWORD_ENV = "KEYCHAIN_EXT_P12_PASSWORD"


class UsageError(Exception):
    """Bad command line (exit 2)."""


def exit_code(exc: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def _password(args: argparse.Namespace) -> str:
    """The PKCS#12 password: --password-file, --password-env (default
    KEYCHAIN_EXT_P12_PASSWORD), or a prompt when stdin is a TTY."""
    if args.password_file:
        return _store.read_secret(Path(args.password_file))
    var = args.password_env or PASSWORD_ENV
    if var in os.environ:
        return os.environ[var]
    if args.password_env:
        raise UsageError(f"environment variable {args.password_env} is not set")
    if sys.stdin.isatty():
        return getpass.getpass(f"Password for {args.p12}: ")
    raise UsageError(
        f"no password for {args.p12}: use --password-file FILE, --password-env VAR "
        f"or {PASSWORD_ENV}"
    )


def _open(args: argparse.Namespace) -> Keychain:
    init_args = args.init_args or os.environ.get("KEYCHAIN_EXT_INIT_ARGS")
    return Keychain(args.module, args.token, pin_file=args.pin_file, init_args=init_args)


def _describe(ident: Identity) -> dict[str, Any]:
    info: dict[str, Any] = {
        "label": ident.label,
        "subject": ident.subject,
        "common_name": ident.common_name,
        "key_type": ident.key_type,
        "key_id": ident.key_id.hex(),
        "ephemeral": ident.ephemeral,
    }
    if isinstance(ident.store, Pkcs11Token):
        info.update(
            token=ident.store.token,
            module=ident.store.module,
            cert_uri=ident.cert_uri,
            key_uri=ident.key_uri,
        )
    else:
        info["keychain"] = ident.store.path or "(default search list)"
    return info


def _print_identity(ident: Identity, as_json: bool) -> None:
    info = _describe(ident)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info) + 1
        for key, value in info.items():
            print(f"{key + ':':<{width}} {value}")


def cmd_preauth(args: argparse.Namespace) -> int:
    """The identity outlives this command: held by no process until
    `keychain-ext kill` removes it; purge never does."""
    password = _password(args)
    with _open(args) as kc:
        ident = kc.preauth_key(args.p12, password, args.label, held=True, stale=args.stale)
        _print_identity(ident, args.json)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    with _open(args) as kc:
        kc.kill_key(args.label, missing_ok=args.missing_ok, force=args.force)
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    with _open(args) as kc:
        ident = kc.lookup(args.label)
    if ident is None:
        raise ItemNotFoundError(detail=f"no identity labelled '{args.label}'", operation="lookup")
    _print_identity(ident, args.json)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as kc:
        items = kc.items()
    if args.json:
        print(json.dumps([{**asdict(i), "key_id": i.key_id.hex()} for i in items], indent=2))
    else:
        for i in items:
            parts = {
                (True, True): "certificate+key",
                (True, False): "certificate only",
                (False, True): "key only",
                (False, False): "lease only",
            }
            what = parts[i.has_certificate, i.has_private_key]
            print(
                f"{i.label or '(no label)'}\t{i.common_name or '-'}\t{i.key_type or '-'}"
                f"\t{what}\t{_ownership(i)}"
            )
        print(f"{len(items)} identities")
    return 0


def _ownership(i: ItemInfo) -> str:
    """Who owns an identity, for people (README, "Ownership")."""
    if not i.ours:
        return "not keychain_ext's (left alone)"
    if i.ephemeral:
        return "ephemeral (this process)"
    if not i.label:
        return "left by a crash"
    if i.held:
        return "held until killed"
    alive = {True: "running", False: "dead", None: "cannot tell"}[i.owner_alive]
    owners = f"{i.owners} owners, " if i.shared else ""
    return f"{owners}owner pid {i.owner_pid} on {i.owner_host or '?'} ({alive})"


def cmd_purge(args: argparse.Namespace) -> int:
    with _open(args) as kc:
        items = kc.purge(dry_run=not args.yes)
    verb = "removed" if args.yes else "would remove"
    for i in items:
        if not i.label:
            print(f"{verb}: unlabelled objects left by a process killed while creating them")
            continue
        state = "complete" if i.has_certificate and i.has_private_key else "incomplete"
        print(f"{verb}: {i.label} ({state}, owner pid {i.owner_pid} is dead)")
    if not args.yes and items:
        print("dry run: add --yes to remove them")
    print(f"{len(items)} stale identities")
    return 0


def _expand(command: Sequence[str], ident: Identity) -> list[str]:
    """{cert}, {key} and {engine} in CMD become the identity's URIs and the
    engine name; `curl` without placeholders gets the engine arguments."""
    values = {
        "cert": ident.cert_uri or ident.nickname or "",  # macOS: the keychain nickname
        "key": ident.key_uri or "",
        "engine": "pkcs11",
    }
    pattern = re.compile(r"\{(cert|key|engine)\}")
    argv = [pattern.sub(lambda m: values[m.group(1)], arg) for arg in command]
    if os.path.basename(command[0]) == "curl" and not any(pattern.search(a) for a in command):
        argv[1:1] = curl_args(ident)
    return argv


def _child_env(ident: Identity, args: argparse.Namespace, password: str) -> dict[str, str]:
    """The identity's environment for CMD, without the secrets this command
    was given: the password's variable, and any variable holding the
    password or the PIN, however they came."""
    secrets = {password}
    if isinstance(ident.store, Pkcs11Token) and ident.store.pin_file is not None:
        with contextlib.suppress(OSError):
            secrets.add(_store.read_secret(ident.store.pin_file))
    drop = {PASSWORD_ENV, args.password_env}
    base = {k: v for k, v in os.environ.items() if k not in drop and v not in secrets}
    return client_env(ident, base)


def cmd_run(args: argparse.Namespace) -> int:
    """Pre-authorize, run CMD with the identity, and always remove it.

    A signal while the identity is being made waits until it is made (then
    it is removed and nothing runs); during CMD it goes to CMD, and the
    identity is removed when CMD ends."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("run needs a command after --")
    password = _password(args)
    child: Optional[subprocess.Popen[bytes]] = None
    pending: list[int] = []

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)  # let CMD end; we clean up after it
        else:
            pending.append(signum)  # acted on once the store is consistent

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous: dict[int, Callable[[int, Optional[FrameType]], Any] | int | None] = {
        s: signal.signal(s, on_signal) for s in signals
    }
    status = 0
    try:
        with _open(args) as kc:
            ident: Optional[Identity] = None
            try:
                if not pending:
                    ident = kc.preauth_key(args.p12, password, args.label, stale=args.stale)
                if ident is not None and not pending:
                    child = subprocess.Popen(
                        _expand(command, ident), env=_child_env(ident, args, password)
                    )
                    status = child.wait()
            finally:
                if ident is not None:
                    kc.kill_key(args.label, missing_ok=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pending and child is None:
        return 128 + pending[0]
    return 128 - status if status < 0 else status


def _check(ok: bool, what: str, hint: str = "") -> bool:
    print(f"[{'ok' if ok else 'FAIL'}] {what}" + ("" if ok or not hint else f"\n       -> {hint}"))
    return ok


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check what the backend and the TLS clients need."""
    good = True
    try:
        module = args.module or _store.softhsm2_module()
        good &= _check(True, f"PKCS#11 module {module}")
    except KeychainError as exc:
        good &= _check(False, "PKCS#11 module", f"{exc.detail}")
    try:
        with _open(args) as kc:
            count = len(kc.items())
            good &= _check(True, f"token '{kc.token}' present and logged in ({count} identities)")
    except (KeychainError, OSError) as exc:
        good &= _check(False, "token", str(exc))
    engines = ""
    try:
        out = subprocess.run(["openssl", "version", "-e"], capture_output=True, text=True).stdout
        engines = out.split('"')[1] if '"' in out else ""
    except OSError:
        pass
    engine = any(os.path.exists(os.path.join(engines, n)) for n in ("pkcs11.so", "libpkcs11.so"))
    good &= _check(engine, "OpenSSL pkcs11 engine", "apt-get install libengine-pkcs11-openssl")
    curl = shutil.which("curl")
    good &= _check(curl is not None, f"curl {curl or 'not found'}", "apt-get install curl")
    problem = pycurl_problem()
    _check(problem is None, "pycurl can use the engine (optional)", problem or "")
    return 0 if good else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Pre-authorize a PKCS#12 TLS client identity in a key store "
        "(a PKCS#11 token), use it without prompts, and remove it again.",
    )
    p.add_argument("--module", help="PKCS#11 module (default: SoftHSM2; env KEYCHAIN_EXT_MODULE)")
    p.add_argument(
        "--token", help="token label (default: the embedded store; env KEYCHAIN_EXT_TOKEN)"
    )
    p.add_argument("--pin-file", help="file holding the token PIN (env KEYCHAIN_EXT_PIN_FILE)")
    p.add_argument(
        "--init-args",
        help="the module's C_Initialize init string, for modules that need one "
        "(NSS softoken: \"configdir='sql:DIR'\"; env KEYCHAIN_EXT_INIT_ARGS)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show error details")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def with_p12(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--p12", required=True, help="PKCS#12 file (certificate + key)")
        sp.add_argument("--label", required=True, help="label for certificate and key")
        sp.add_argument("--password-file", help="file holding the PKCS#12 password")
        sp.add_argument(
            "--password-env", metavar="VAR", help=f"env var with it (default {PASSWORD_ENV})"
        )
        sp.add_argument(
            "--reclaim-stale",
            dest="stale",
            action="store_const",
            const="reclaim",
            default="refuse",
            help="remove a dead owner's identity under the label first",
        )

    sp = sub.add_parser(
        "preauth", help="import an identity, held until `kill` removes it (token objects)"
    )
    with_p12(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_preauth)

    sp = sub.add_parser("kill", help="remove an identity: certificate, then key")
    sp.add_argument("--label", required=True)
    sp.add_argument("--missing-ok", action="store_true", help="no error when nothing is there")
    sp.add_argument(
        "--force",
        action="store_true",
        help="remove it even if another running process owns it or keychain_ext did not make it",
    )
    sp.set_defaults(func=cmd_kill)

    sp = sub.add_parser("lookup", help="show an identity")
    sp.add_argument("--label", required=True)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_lookup)

    sp = sub.add_parser("list", help="list identities in the store")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser(
        "purge",
        help="remove keychain_ext's identities whose owners all died (dry run); "
        "held ones and anything not keychain_ext's stay",
    )
    sp.add_argument("--yes", action="store_true", help="really remove them")
    sp.set_defaults(func=cmd_purge)

    sp = sub.add_parser("doctor", help="check what the backend and TLS clients need")
    sp.set_defaults(func=cmd_doctor)

    sp = sub.add_parser(
        "run",
        help="preauth, run CMD with the identity, always remove it",
        description="Runs CMD with KEYCHAIN_EXT_CERT_URI, KEYCHAIN_EXT_KEY_URI, "
        "KEYCHAIN_EXT_ENGINE, KEYCHAIN_EXT_LABEL, PKCS11_MODULE_PATH (and SOFTHSM2_CONF for "
        "the embedded store) set; {cert}, {key} and {engine} in CMD are replaced; a bare "
        "`curl` gets the engine arguments. Exits with CMD's status.",
    )
    with_p12(sp)
    sp.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    sp.set_defaults(func=cmd_run)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except (KeychainError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        if args.verbose:
            if isinstance(exc, KeychainError):
                print(
                    f"  status={exc.status} symbol={exc.symbol} operation={exc.operation} "
                    f"native_code={exc.native_code}",
                    file=sys.stderr,
                )
            traceback.print_exc()
        return exit_code(exc)
    return 0  # pragma: no cover - parser.error exits


if __name__ == "__main__":
    sys.exit(main())
