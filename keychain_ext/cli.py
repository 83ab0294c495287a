"""The ``keychain-ext`` command (also ``python -m keychain_ext``).

Errors print one line and exit with a code per error class (see
EXIT_CODES); ``--verbose`` adds the details and the library's DEBUG log;
under ``--json`` every line on stderr (errors, warnings) is a JSON object
and stdout holds only results.  PINs and passwords are read from files,
environment variables or a TTY prompt, never from argv.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any, Callable, NoReturn, Optional

from . import _provider, _store
from ._backend import ItemInfo, Pkcs11Token
from ._version import __version__
from .curl import client_env, curl_args, engine_problem, pycurl_problem
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
    (MemoryError, 14),
    (Exception, 15),  # a bug: reported as one line (JSON under --json) too
]

PASSWORD_ENV = "KEYCHAIN_EXT_P12_PASSWORD"

# What the library's messages suggest in Python terms, in this command's
# terms (the API keeps its own wording).
CLI_HINTS: list[tuple[str, str]] = [
    ("stale='reclaim'", "--reclaim-stale"),
    ("(force to override)", "(--force to override)"),
    (
        "pass pin= or pin_file=, or set KEYCHAIN_EXT_PIN_FILE",
        "use --pin-file or KEYCHAIN_EXT_PIN_FILE",
    ),
    (
        "pin and pin_file are for a token named by token=",
        "--pin-file is for a token named by --token",
    ),
    ("Keychain(token=..., pin=...)", "--token and --pin-file"),
]


def cli_message(message: str) -> str:
    """message with the library's Python hints given as CLI flags."""
    for python, flag in CLI_HINTS:
        message = message.replace(python, flag)
    return message


class UsageError(Exception):
    """Bad command line (exit 2); usage: the usage of the parser that found
    it ("": the main parser's)."""

    def __init__(self, message: str, usage: str = "") -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """Raises UsageError instead of exiting, so that main() reports parse
    errors like every other (as JSON under --json)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage())


def exit_code(exc: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def _password(args: argparse.Namespace) -> str:
    """The PKCS#12 password: --password-file, --password-env (default
    KEYCHAIN_EXT_P12_PASSWORD), or a prompt when stdin is a TTY."""
    if args.password_file:
        return _store.read_secret(Path(args.password_file), "password file")
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
    with _open(args) as kc:  # a missing token is reported before any prompt
        password = _password(args)
        ident = kc.preauth_key(args.p12, password, args.label, held=True, stale=args.stale)
        _print_identity(ident, args.json)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    with _open(args) as kc:
        kc.kill_key(args.label, missing_ok=args.missing_ok, force=args.force)
    return 0


def _lookup(kc: Keychain, label: str) -> Identity:
    ident = kc.lookup(label)
    if ident is None:
        raise ItemNotFoundError(detail=f"no identity labelled '{label}'", operation="lookup")
    return ident


def cmd_lookup(args: argparse.Namespace) -> int:
    with _open(args) as kc:
        ident = _lookup(kc, args.label)
    _print_identity(ident, args.json)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    """Print the exports another shell needs to use the identity (no
    secret); its files stay until the identity is killed."""
    with _open(args) as kc:
        env = client_env(_lookup(kc, args.label), {}, persistent=True)
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_cert(args: argparse.Namespace) -> int:
    """Write the identity's certificate as PEM (read through the provider)."""
    with _open(args) as kc:
        pem = _lookup(kc, args.label).provider_files().cert.read_text()
    if args.output:
        Path(args.output).write_text(pem)
    else:
        sys.stdout.write(pem)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as kc:
        items = kc.items()
    if args.json:
        _print_items(items)
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


def _print_items(items: list[ItemInfo]) -> None:
    print(json.dumps([{**asdict(i), "key_id": i.key_id.hex()} for i in items], indent=2))


def cmd_purge(args: argparse.Namespace) -> int:
    with _open(args) as kc:
        items = kc.purge(dry_run=not args.yes)
    if args.json:
        _print_items(items)
        return 0
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


def _expand(command: Sequence[str], ident: Identity, env: dict[str, str]) -> list[str]:
    """{cert}, {key} and {engine} in CMD become the identity's URIs and the
    engine name (macOS: {cert} is the keychain nickname); `curl` without
    placeholders gets --cert/--key (the provider's files, read with the
    OPENSSL_CONF in env), or curl_args (the engine's, or the nickname)."""
    values = {
        "cert": ident.cert_uri or ident.nickname or "",
        "key": ident.key_uri or "",
        "engine": "pkcs11",
    }
    pattern = re.compile(r"\{(cert|key|engine)\}")
    argv = [pattern.sub(lambda m: values[m.group(1)], arg) for arg in command]
    if os.path.basename(command[0]) == "curl" and not any(pattern.search(a) for a in command):
        if "KEYCHAIN_EXT_KEY" in env:
            argv[1:1] = ["--cert", env["KEYCHAIN_EXT_CERT"], "--key", env["KEYCHAIN_EXT_KEY"]]
        else:
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
                    env = _child_env(ident, args, password)
                    child = subprocess.Popen(_expand(command, ident, env), env=env)
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


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check what the backend and the TLS clients need: one line per check,
    or (--json) one JSON object {"ok", "checks": [{"ok", "what", "hint"}]}."""
    checks: list[dict[str, Any]] = []

    def check(ok: bool, what: str, hint: str = "") -> bool:
        checks.append({"ok": ok, "what": what, "hint": "" if ok else hint})
        return ok

    good = True
    module = ""
    try:
        module = args.module or _store.softhsm2_module()
        good &= check(
            os.path.isfile(module),
            f"PKCS#11 module {module}",
            "no such file: fix --module or KEYCHAIN_EXT_MODULE",
        )
    except KeychainError as exc:
        good &= check(False, "PKCS#11 module", f"{exc.detail}")
    try:
        with _open(args) as kc:
            count = len(kc.items())
            good &= check(True, f"token '{kc.token}' present and logged in ({count} identities)")
    except (KeychainError, OSError) as exc:
        good &= check(False, "token", cli_message(str(exc)))
    engine_missing = engine_problem()
    engine = check(
        engine_missing is None,
        "OpenSSL pkcs11 engine (the fallback route: curl_args, setup_pycurl without the "
        "provider; deprecated, gone in OpenSSL 4)",
        engine_missing or "",
    )
    try:  # loading it is the test
        init_args = args.init_args or os.environ.get("KEYCHAIN_EXT_INIT_ARGS")
        _provider.load_into_process(module or "(none)", init_args)
        provider, why = True, ""
    except KeychainError as exc:
        provider, why = False, exc.detail
    provider = check(
        provider,
        "OpenSSL 3 pkcs11 provider (the provider route: Identity.ssl_context, "
        "run/env with any OpenSSL 3 program)",
        why,
    )
    good &= provider or engine  # one route is enough
    curl = shutil.which("curl")
    good &= check(curl is not None, f"curl {curl or 'not found'}", "apt-get install curl")
    problem = pycurl_problem()
    check(problem is None, "pycurl (optional)", problem or "")
    if args.json:
        print(json.dumps({"ok": bool(good), "checks": checks}, indent=2))
    else:
        for c in checks:
            print(f"[{'ok' if c['ok'] else 'FAIL'}] {c['what']}")
            if c["hint"]:
                print(f"       -> {c['hint']}")
    return 0 if good else 1


# Options every command takes, before or after its name (see _global_options).
GLOBAL_DEFAULTS: dict[str, Any] = {
    "module": None,
    "token": None,
    "pin_file": None,
    "init_args": None,
    "verbose": False,
    "json": False,
}


def _global_options() -> _Parser:
    """The global options, defined once: a parent of the main parser and of
    every command's.  Their defaults are SUPPRESSed, so a command's parser
    never resets what was given before the command; main() starts from
    GLOBAL_DEFAULTS."""
    g = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    g.add_argument("--module", help="PKCS#11 module (default: SoftHSM2; env KEYCHAIN_EXT_MODULE)")
    g.add_argument(
        "--token",
        help=f"token label (default: the embedded store, also named '{_store.EMBEDDED_TOKEN}'; "
        "env KEYCHAIN_EXT_TOKEN)",
    )
    g.add_argument(
        "--pin-file",
        help="file holding the token PIN, for a token named by --token (env KEYCHAIN_EXT_PIN_FILE)",
    )
    g.add_argument(
        "--init-args",
        help="the module's C_Initialize init string, for modules that need one "
        "(NSS softoken: \"configdir='sql:DIR'\"; env KEYCHAIN_EXT_INIT_ARGS)",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log every step (DEBUG) and show error details",
    )
    g.add_argument(
        "--json",
        action="store_true",
        help="results as JSON on stdout; errors and warnings as JSON lines on stderr",
    )
    return g


def _parser() -> _Parser:
    common = _global_options()
    p = _Parser(
        prog=PROG,
        description="Pre-authorize a PKCS#12 TLS client identity in a key store "
        "(a PKCS#11 token), use it without prompts, and remove it again.",
        parents=[common],
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the version and exit",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="what to do")

    def command(name: str, func: Callable[[argparse.Namespace], int], **kw: Any) -> Any:
        sp = sub.add_parser(name, parents=[common], **kw)
        sp.set_defaults(func=func)
        return sp

    def with_label(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--label", required=True, help=what)

    def with_p12(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--p12", required=True, help="PKCS#12 file (certificate + key)")
        with_label(sp, "label for certificate and key")
        sp.add_argument("--password-file", help="file holding the PKCS#12 password")
        sp.add_argument(
            "--password-env",
            metavar="VAR",
            help=f"environment variable holding it (default {PASSWORD_ENV})",
        )
        sp.add_argument(
            "--reclaim-stale",
            dest="stale",
            action="store_const",
            const="reclaim",
            default="refuse",
            help="remove a dead owner's identity under the label first",
        )

    with_p12(
        command(
            "preauth",
            cmd_preauth,
            help="import an identity, held until `kill` removes it (token objects)",
        )
    )

    sp = command("kill", cmd_kill, help="remove an identity: certificate, then key")
    with_label(sp, "label of the identity to remove")
    sp.add_argument("--missing-ok", action="store_true", help="no error when nothing is there")
    sp.add_argument(
        "--force",
        action="store_true",
        help="remove it even if another running process owns it or keychain_ext did not make it",
    )

    with_label(command("lookup", cmd_lookup, help="show an identity"), "label to look up")

    sp = command(
        "env",
        cmd_env,
        help="print the exports (shell-quoted, no secret) another shell needs to use an "
        "identity: KEYCHAIN_EXT_CERT, KEYCHAIN_EXT_KEY, OPENSSL_CONF, ...",
    )
    sp.add_argument("label", help="the identity's label")

    sp = command("cert", cmd_cert, help="write an identity's certificate as PEM")
    sp.add_argument("label", help="the identity's label")
    sp.add_argument("-o", "--output", metavar="FILE", help="write it to FILE (default: stdout)")

    command("list", cmd_list, help="list identities in the store")

    sp = command(
        "purge",
        cmd_purge,
        help="remove keychain_ext's identities whose owners all died (dry run); "
        "held ones and anything not keychain_ext's stay",
    )
    sp.add_argument("--yes", action="store_true", help="really remove them")

    command("doctor", cmd_doctor, help="check what the backend and TLS clients need")

    sp = command(
        "run",
        cmd_run,
        help="preauth, run CMD with the identity, always remove it",
        description="Runs CMD with KEYCHAIN_EXT_CERT_URI, KEYCHAIN_EXT_KEY_URI, "
        "KEYCHAIN_EXT_ENGINE, KEYCHAIN_EXT_LABEL, PKCS11_MODULE_PATH (and SOFTHSM2_CONF for "
        "the embedded store) set; {cert}, {key} and {engine} in CMD are replaced; a bare "
        "`curl` gets the engine arguments. Exits with CMD's status.",
    )
    with_p12(sp)
    sp.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ARGS",
        help="the command to run with the identity, after --",
    )
    return p


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname.lower(), "message": record.getMessage()})


def _log_to_stderr(args: argparse.Namespace) -> logging.Handler:
    """The library's log on stderr: warnings, and with --verbose every step."""
    handler = logging.StreamHandler(sys.stderr)
    if args.json:
        handler.setFormatter(_JsonLines())
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    logger = logging.getLogger("keychain_ext")
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    logger.addHandler(handler)
    return handler


def _report(exc: BaseException, args: argparse.Namespace) -> None:
    """One line on stderr: text, or under --json {"error": class name,
    "status": OSStatus or null, "message": ...}."""
    if isinstance(exc, KeychainError):
        message = exc.detail
    elif isinstance(exc, (OSError, UsageError)):
        message = str(exc)
    elif isinstance(exc, MemoryError):
        message = "out of memory"
    else:
        # a surprise's text may quote its input (UnicodeDecodeError shows a
        # byte of a secret): only its class; --verbose adds the traceback
        message = f"internal error ({type(exc).__name__}): please report it"
    if args.json:
        status = exc.status if isinstance(exc, KeychainError) else None
        record = {"error": type(exc).__name__, "status": status, "message": cli_message(message)}
        print(json.dumps(record), file=sys.stderr)
        return
    text = str(exc) if isinstance(exc, KeychainError) else message
    print(f"{PROG}: error: {cli_message(text)}", file=sys.stderr)
    if args.verbose and not isinstance(exc, UsageError):
        if isinstance(exc, KeychainError):
            print(
                f"  status={exc.status} symbol={exc.symbol} operation={exc.operation} "
                f"native_code={exc.native_code}",
                file=sys.stderr,
            )
        traceback.print_exc()


def _usage_error(exc: UsageError, args: argparse.Namespace, parser: _Parser) -> int:
    if not args.json:
        sys.stderr.write(exc.usage or parser.format_usage())
    _report(exc, args)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv, namespace=argparse.Namespace(**GLOBAL_DEFAULTS))
    except UsageError as exc:
        # nothing parsed: --json before CMD's "--" still asks for JSON
        options = argv[: argv.index("--")] if "--" in argv else argv
        seen = argparse.Namespace(**{**GLOBAL_DEFAULTS, "json": "--json" in options})
        return _usage_error(exc, seen, parser)
    handler = _log_to_stderr(args)
    try:
        return int(args.func(args))
    except UsageError as exc:
        return _usage_error(exc, args, parser)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception as exc:  # KeychainError, OSError, MemoryError, a bug: one line each
        _report(exc, args)
        return exit_code(exc)
    finally:
        logging.getLogger("keychain_ext").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
